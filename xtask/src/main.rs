//! Developer tasks for tcpwatch, run as `cargo xtask <command>`.
//!
//! The eBPF object must be built with nightly (`-Z build-std=core`) for the
//! `bpfel-unknown-none` target and linked by bpf-linker; the userspace binary
//! is built with stable and embeds that object through `TCPWATCH_BPF_OBJECT`.
//! These tasks check the toolchain, build both halves in order, run the
//! result as root, run the tests, and measure tracing overhead.

mod bench;
mod churn;
mod compile;
mod fuzz;
mod process;
mod report;
mod run;
mod setup;
mod soak;
mod testing;
mod tracer;
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
        /// Build an unoptimised binary (the default is release: a debug
        /// tcpwatch cannot keep up with a busy host).
        #[arg(long)]
        debug: bool,
    },
    /// Build, then run tcpwatch as root with the arguments after `--`.
    Run {
        /// Build an unoptimised binary (the default is release).
        #[arg(long)]
        debug: bool,
        /// Arguments for tcpwatch.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the fuzz targets in fuzz/ (cargo-fuzz, nightly) for a while each
    /// and print libFuzzer's figures; fails if any target crashes.
    Fuzz {
        /// Seconds per target.
        #[arg(long, value_name = "N", default_value_t = fuzz::DEFAULT_SECONDS,
              value_parser = clap::value_parser!(u32).range(1..))]
        seconds: u32,
        /// Targets to run [default: all: decode, correlator, record_reader,
        /// http_query].
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Run the workspace's tests (with the eBPF object embedded), clippy,
    /// the rustfmt check and a short run of each fuzz target.
    Test {
        /// Extra arguments for `cargo test`; after a further `--`, for the
        /// test harness.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Measure what tracing costs under connection churn (as root): no
    /// tracer, the empty program, tcpwatch trace/conns/timewait and
    /// bpftrace, interleaved over rounds. Writes target/bench/bench.json,
    /// target/bench/bench.md and docs/performance.md.
    Bench {
        /// Rounds (1-100); each runs every variant once.
        #[arg(long, value_name = "N", default_value_t = 5,
              value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
        /// Seconds of churn per variant per round (1-3600).
        #[arg(long, value_name = "SECS", default_value_t = 5,
              value_parser = clap::value_parser!(u32).range(1..=3600))]
        seconds: u32,
        /// Client threads of the churn generator (1-256).
        #[arg(long, value_name = "N", default_value_t = 2,
              value_parser = clap::value_parser!(u32).range(1..=256))]
        threads: u32,
        /// Accept threads of the churn server (1-256) [default: as many as
        /// --threads].
        #[arg(long, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=256))]
        server_threads: Option<u32>,
        /// Leave out the bpftrace comparison.
        #[arg(long)]
        no_bpftrace: bool,
        /// Connections per second of the paced phase, which measures CPU
        /// per connection below saturation (100-1000000).
        #[arg(long, value_name = "N", default_value_t = 8000,
              value_parser = clap::value_parser!(u32).range(100..=1_000_000))]
        rate: u32,
    },
    /// Run tcpwatch timewait through minutes of connection churn at full
    /// rate (as root) and check that its memory stays flat, that no event
    /// is lost to a full ring buffer and that its TIME_WAIT count is the
    /// kernel's at the end. Writes the soak section of docs/performance.md.
    Soak {
        /// Minutes of churn (1-1440).
        #[arg(long, value_name = "N", default_value_t = 10,
              value_parser = clap::value_parser!(u32).range(1..=24 * 60))]
        minutes: u32,
        /// Client threads of the churn generator (and as many accept
        /// threads) (1-64).
        #[arg(long, value_name = "N", default_value_t = 2,
              value_parser = clap::value_parser!(u32).range(1..=64))]
        threads: u32,
        /// Soak `tcpwatch daemon` instead, under churn paced to keep the
        /// namespace's 131,072 timewait buckets full; checks RSS flat
        /// within 5% and at most 40 MB, and /metrics against the kernel.
        #[arg(long)]
        daemon: bool,
        /// Connections per second of the --daemon churn (100-1000000)
        /// [default: 2,621, the table's size over 60 s, with a fifth to spare].
        #[arg(long, value_name = "N", requires = "daemon",
              value_parser = clap::value_parser!(u32).range(100..=1_000_000))]
        rate: Option<u32>,
        /// The --daemon soak's `tcpwatch daemon --ring-size` (e.g. 4M)
        /// [default: the daemon's].
        #[arg(long, value_name = "BYTES", requires = "daemon")]
        ring_size: Option<String>,
        /// The --daemon soak runs this tcpwatch binary instead of building
        /// the workspace's (to compare two builds in one sitting).
        #[arg(long, value_name = "PATH", requires = "daemon")]
        binary: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match execute(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version as clap prints them; any other parse error as one line
/// (without clap's usage and tip lines), exit status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        _ => {
            eprintln!("{}", first_line(&e.to_string()));
            ExitCode::from(2)
        }
    }
}

/// The first non-empty line of a message.
fn first_line(message: &str) -> &str {
    message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("error: bad arguments")
}

/// Runs one command and returns the exit code for xtask.
fn execute(command: Cmd) -> Result<u8> {
    if let Cmd::Bench {
        rounds,
        seconds,
        threads,
        server_threads,
        no_bpftrace,
        rate,
    } = command
    {
        let options = bench::Options {
            rounds,
            seconds,
            threads,
            server_threads,
            bpftrace: !no_bpftrace,
            rate,
        };
        let ws = Workspace::locate()?;
        bench::run(&ws, &options)?;
        return Ok(0);
    }
    if let Cmd::Fuzz { seconds, targets } = &command {
        let targets = match fuzz::targets(targets) {
            Ok(targets) => targets,
            Err(e) => {
                eprintln!("{e}");
                return Ok(2);
            }
        };
        let ws = Workspace::locate()?;
        setup::fuzz_tools(&ws)?;
        fuzz::run(&ws, *seconds, &targets)?;
        return Ok(0);
    }
    if let Cmd::Soak {
        minutes,
        threads,
        daemon,
        rate,
        ring_size,
        binary,
    } = command
    {
        let ws = Workspace::locate()?;
        let met = if daemon {
            let rate = rate.unwrap_or_else(soak::daemon::default_rate);
            let options = soak::daemon::Options {
                minutes,
                threads,
                rate,
                ring_size,
                binary,
            };
            soak::daemon::run(&ws, &options)?
        } else {
            soak::run(&ws, &soak::Options { minutes, threads })?
        };
        return Ok(if met { 0 } else { 1 });
    }
    let ws = Workspace::locate()?;
    let build_only = setup::Options { test_tools: false };
    match command {
        Cmd::Setup { test_tools } => setup::run(&ws, setup::Options { test_tools })?,
        Cmd::BuildEbpf { release: _ } => {
            setup::run(&ws, build_only)?;
            compile::build_ebpf(&ws)?;
        }
        Cmd::Build { debug } => {
            let release = !debug;
            setup::run(&ws, build_only)?;
            let object = compile::build_ebpf(&ws)?;
            let binary = compile::build_tcpwatch(&ws, release, &object)?;
            println!("{}", binary.display());
        }
        Cmd::Run { debug, args } => {
            let release = !debug;
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
        Cmd::Bench { .. } | Cmd::Fuzz { .. } | Cmd::Soak { .. } => {
            unreachable!("handled above")
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
        let cli = Cli::try_parse_from(["xtask", "run", "--", "trace", "--bogus"]).unwrap();
        match cli.command {
            Cmd::Run { debug, args } => {
                assert!(!debug, "release by default");
                assert_eq!(args, ["trace", "--bogus"]);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn bench_defaults() {
        let cli = Cli::try_parse_from(["xtask", "bench"]).unwrap();
        match cli.command {
            Cmd::Bench {
                rounds,
                seconds,
                threads,
                server_threads,
                no_bpftrace,
                rate,
            } => {
                assert_eq!((rounds, seconds, threads, rate), (5, 5, 2, 8000));
                assert_eq!(server_threads, None);
                assert!(!no_bpftrace);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    /// An out-of-range number is clap's usage error (exit status 2),
    /// one line naming the option.
    fn assert_out_of_range(args: &[&str], option: &str) {
        let err = Cli::try_parse_from(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{args:?}");
        let line = first_line(&err.to_string()).to_string();
        assert!(
            line.starts_with("error: invalid value") && line.contains(option),
            "{args:?}: {line}"
        );
    }

    #[test]
    fn bench_options_out_of_range_are_one_line_usage_errors() {
        for (args, option) in [
            (&["xtask", "bench", "--threads", "0"][..], "--threads"),
            (&["xtask", "bench", "--threads", "257"], "--threads"),
            (&["xtask", "bench", "--seconds", "0"], "--seconds"),
            (&["xtask", "bench", "--seconds", "3601"], "--seconds"),
            (&["xtask", "bench", "--rounds", "0"], "--rounds"),
            (&["xtask", "bench", "--rounds", "101"], "--rounds"),
            (&["xtask", "bench", "--rate", "99"], "--rate"),
            (
                &["xtask", "bench", "--server-threads", "0"],
                "--server-threads",
            ),
        ] {
            assert_out_of_range(args, option);
        }
        let cli = Cli::try_parse_from([
            "xtask",
            "bench",
            "--threads",
            "256",
            "--rounds",
            "100",
            "--seconds",
            "3600",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Bench {
                threads: 256,
                rounds: 100,
                seconds: 3600,
                ..
            }
        ));
    }

    #[test]
    fn fuzz_defaults_and_targets() {
        let cli = Cli::try_parse_from(["xtask", "fuzz"]).unwrap();
        match cli.command {
            Cmd::Fuzz { seconds, targets } => {
                assert_eq!(seconds, 60);
                assert!(targets.is_empty());
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["xtask", "fuzz", "--seconds", "5", "decode", "http_query"])
            .unwrap();
        match cli.command {
            Cmd::Fuzz { seconds, targets } => {
                assert_eq!(seconds, 5);
                assert_eq!(targets, ["decode", "http_query"]);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["xtask", "fuzz", "--seconds", "0"]).is_err());
        let code = execute(Cmd::Fuzz {
            seconds: 1,
            targets: vec!["no_such_target".into()],
        })
        .unwrap();
        assert_eq!(code, 2);
    }

    #[test]
    fn soak_defaults_to_ten_minutes() {
        let cli = Cli::try_parse_from(["xtask", "soak"]).unwrap();
        match cli.command {
            Cmd::Soak {
                minutes,
                threads,
                daemon,
                rate,
                ring_size,
                binary,
            } => assert_eq!(
                (minutes, threads, daemon, rate, ring_size, binary),
                (10, 2, false, None, None, None)
            ),
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["xtask", "soak", "--minutes", "1"]).unwrap();
        assert!(matches!(cli.command, Cmd::Soak { minutes: 1, .. }));
        let cli =
            Cli::try_parse_from(["xtask", "soak", "--minutes", "1440", "--threads", "64"]).unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Soak {
                minutes: 1440,
                threads: 64,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["xtask", "soak", "--daemon", "--minutes", "2"]).unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Soak {
                minutes: 2,
                daemon: true,
                rate: None,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["xtask", "soak", "--daemon", "--rate", "3000"]).unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Soak {
                daemon: true,
                rate: Some(3000),
                ..
            }
        ));
        let cli =
            Cli::try_parse_from(["xtask", "soak", "--daemon", "--binary", "/tmp/tw"]).unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Soak { daemon: true, binary: Some(ref b), .. } if b.as_os_str() == "/tmp/tw"
        ));
        // --rate paces only the daemon soak, and --binary is the daemon's.
        assert!(Cli::try_parse_from(["xtask", "soak", "--rate", "3000"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "soak", "--binary", "/tmp/tw"]).is_err());
        assert_out_of_range(&["xtask", "soak", "--daemon", "--rate", "99"], "--rate");
        assert_out_of_range(&["xtask", "soak", "--minutes", "0"], "--minutes");
        assert_out_of_range(&["xtask", "soak", "--minutes", "1441"], "--minutes");
        assert_out_of_range(&["xtask", "soak", "--threads", "0"], "--threads");
        assert_out_of_range(&["xtask", "soak", "--threads", "65"], "--threads");
    }

    #[test]
    fn clap_errors_shrink_to_one_line() {
        let err = Cli::try_parse_from(["xtask", "bench", "--threads", "x"]).unwrap_err();
        let line = first_line(&err.to_string()).to_string();
        assert!(line.starts_with("error: invalid value 'x'"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn unknown_command_is_a_usage_error() {
        let err = Cli::try_parse_from(["xtask", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["xtask"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
