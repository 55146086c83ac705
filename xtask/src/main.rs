//! Developer tasks for tcpwatch, run as `cargo xtask <command>`.
//!
//! The eBPF object must be built with nightly (`-Z build-std=core`) for the
//! `bpfel-unknown-none` target and linked by bpf-linker; the userspace binary
//! is built with stable and embeds that object through `TCPWATCH_BPF_OBJECT`.
//! These tasks check the toolchain, build both halves in order, run the
//! result as root, and run the tests.

mod compile;
mod process;
mod run;
mod setup;
mod testing;
mod workspace;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::workspace::Workspace;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, run and test tcpwatch",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check (and install where possible) nightly, rust-src, LLVM 22,
    /// bpf-linker and tracefs. Safe to run repeatedly.
    Setup {
        /// Also check the tools the integration tests use (tcpdump,
        /// bpftrace, ip, ss).
        #[arg(long)]
        test_tools: bool,
    },
    /// Build the eBPF object (always in release mode) into target/bpf.
    BuildEbpf {
        /// Accepted for symmetry with `build`; the eBPF object is always
        /// built in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Build the eBPF object, then the tcpwatch binary embedding it, and
    /// print the binary's path.
    Build {
        /// Build the userspace binary in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run tcpwatch as root with the arguments after `--`.
    Run {
        /// Build the userspace binary in release mode.
        #[arg(long)]
        release: bool,
        /// Arguments for tcpwatch.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the workspace's tests (with the eBPF object embedded), clippy and
    /// the rustfmt check.
    Test {
        /// Extra arguments for `cargo test`; after a further `--`, for the
        /// test harness.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command and returns the exit code for xtask.
fn execute(command: Cmd) -> Result<u8> {
    let ws = Workspace::locate()?;
    let build_only = setup::Options { test_tools: false };
    match command {
        Cmd::Setup { test_tools } => setup::run(&ws, setup::Options { test_tools })?,
        Cmd::BuildEbpf { release: _ } => {
            setup::run(&ws, build_only)?;
            compile::build_ebpf(&ws)?;
        }
        Cmd::Build { release } => {
            setup::run(&ws, build_only)?;
            let object = compile::build_ebpf(&ws)?;
            let binary = compile::build_tcpwatch(&ws, release, &object)?;
            println!("{}", binary.display());
        }
        Cmd::Run { release, args } => {
            setup::run(&ws, build_only)?;
            let object = compile::build_ebpf(&ws)?;
            let binary = compile::build_tcpwatch(&ws, release, &object)?;
            eprintln!("running: {}", binary.display());
            return run::exec(&binary, &args);
        }
        Cmd::Test { args } => {
            setup::run(&ws, setup::Options { test_tools: true })?;
            let object = compile::build_ebpf(&ws)?;
            testing::run(&ws, &object, &args)?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_arguments_after_double_dash() {
        let cli =
            Cli::try_parse_from(["xtask", "run", "--release", "--", "trace", "--bogus"]).unwrap();
        match cli.command {
            Cmd::Run { release, args } => {
                assert!(release);
                assert_eq!(args, ["trace", "--bogus"]);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn unknown_command_is_a_usage_error() {
        let err = Cli::try_parse_from(["xtask", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["xtask"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
