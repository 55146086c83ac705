//! `cargo xtask test`: the workspace's tests with the eBPF object embedded,
//! then clippy, rustfmt and a short run of each fuzz target. Every step
//! runs; the task fails if any did.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::{
    fuzz, process,
    workspace::{Toolchain, Workspace, BPF_OBJECT_ENV, BPF_PACKAGE},
};

/// Runs tests, clippy and the format check. `extra` goes to `cargo test`:
/// words before a `--` to cargo, words after it to the test harness.
pub fn run(ws: &Workspace, object: &Path, extra: &[String]) -> Result<()> {
    let mut test = ws.cargo(Toolchain::Current)?;
    // Release: the live tests drive 10k+ connections/s past tcpwatch, which
    // an unoptimised build cannot follow on a 2-core machine.
    test.args([
        "test",
        "--release",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        BPF_PACKAGE,
    ])
    .args(test_args(extra))
    .env(BPF_OBJECT_ENV, object);

    let mut clippy = ws.cargo(Toolchain::Current)?;
    clippy
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            BPF_PACKAGE,
            "--all-targets",
        ])
        .args(["--", "-D", "warnings"])
        .env(BPF_OBJECT_ENV, object);

    let mut fmt = ws.cargo(Toolchain::Current)?;
    fmt.args(["fmt", "--all", "--", "--check"]);

    let mut failed = Vec::new();
    for (name, cmd) in [
        ("tests", &mut test),
        ("clippy", &mut clippy),
        ("rustfmt", &mut fmt),
    ] {
        if let Err(e) = run_step(name, cmd) {
            eprintln!("FAILED: {e:#}");
            failed.push(name);
        }
    }
    eprintln!("fuzz: {} s per target", fuzz::TEST_SECONDS);
    if let Err(e) = fuzz::run(ws, fuzz::TEST_SECONDS, fuzz::TARGETS) {
        eprintln!("FAILED: {e:#}");
        failed.push("fuzz");
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    eprintln!("all passed: tests, clippy, rustfmt, fuzz");
    Ok(())
}

fn run_step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("{name}: {}", process::display(cmd));
    process::run(cmd)
}

/// Arguments for `cargo test` after `--workspace --exclude ...`: the user's,
/// with `--test-threads=1` added for the harness unless they chose a count.
/// Integration tests attach probes and count events, so running them in
/// parallel would make them see each other's connections.
fn test_args(extra: &[String]) -> Vec<String> {
    let split = extra.iter().position(|arg| arg == "--");
    let (cargo_args, harness_args) = match split {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[][..]),
    };
    let mut args = cargo_args.to_vec();
    args.push("--".to_string());
    args.extend_from_slice(harness_args);
    if !harness_args
        .iter()
        .any(|arg| arg.starts_with("--test-threads"))
    {
        args.push("--test-threads=1".to_string());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn default_is_one_thread() {
        assert_eq!(test_args(&[]), strings(&["--", "--test-threads=1"]));
    }

    #[test]
    fn cargo_and_harness_args_are_kept_apart() {
        assert_eq!(
            test_args(&strings(&["-p", "tcpwatch", "--", "--nocapture"])),
            strings(&["-p", "tcpwatch", "--", "--nocapture", "--test-threads=1"])
        );
    }

    #[test]
    fn user_thread_count_wins() {
        assert_eq!(
            test_args(&strings(&["--", "--test-threads", "4"])),
            strings(&["--", "--test-threads", "4"])
        );
    }
}
