//! `cargo xtask fuzz`: runs the cargo-fuzz targets in fuzz/ for a set time
//! each and reports libFuzzer's figures for each (runs, executions per
//! second, corpus, peak RSS). `cargo xtask test` runs every target briefly.
//!
//! Each target grows its corpus in fuzz/corpus/TARGET (not committed),
//! starting from the seed inputs in fuzz/seeds/TARGET; a crash leaves its
//! input in fuzz/artifacts/TARGET. libFuzzer's own output goes to
//! target/fuzz/TARGET.log.

use std::{
    fs::{self, File},
    path::Path,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{
    process,
    workspace::{Toolchain, Workspace},
};

/// The targets, in the order they run.
pub const TARGETS: &[&str] = &["decode", "correlator", "record_reader", "http_query"];
/// Seconds per target when `cargo xtask fuzz` is not told.
pub const DEFAULT_SECONDS: u32 = 60;
/// Seconds per target in `cargo xtask test`.
pub const TEST_SECONDS: u32 = 15;
/// libFuzzer stops a target whose RSS passes this, and reports it.
const RSS_LIMIT_MB: u32 = 2048;
/// One input running longer than this is reported as a hang.
const INPUT_TIMEOUT_SECS: u32 = 10;

/// The targets named, or all of them; an unknown name is an error.
pub fn targets(names: &[String]) -> Result<Vec<&'static str>, String> {
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    names
        .iter()
        .map(|name| {
            TARGETS.iter().copied().find(|t| t == name).ok_or_else(|| {
                format!(
                    "error: unknown fuzz target '{name}' (targets: {})",
                    TARGETS.join(", ")
                )
            })
        })
        .collect()
}

/// What libFuzzer reported for one run.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    runs: Option<u64>,
    execs_per_sec: Option<u64>,
    /// Inputs and total size, as libFuzzer writes it (`366/12Kb`).
    corpus: Option<String>,
    peak_rss_mb: Option<u64>,
    /// The input that crashed, and what the target said.
    artifact: Option<String>,
    panic: Option<String>,
}

/// Reads the figures from libFuzzer's output (`-print_final_stats=1`).
fn parse_log(log: &str) -> Stats {
    let stat = |name: &str| {
        log.lines()
            .rev()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    let corpus = log
        .lines()
        .rev()
        .find_map(|l| l.split(" corp: ").nth(1)?.split_whitespace().next())
        .map(str::to_string);
    let artifact = log
        .lines()
        .find_map(|l| l.split("Test unit written to ").nth(1))
        .map(|p| p.trim().to_string());
    // A Rust panic prints `thread '...' panicked at FILE:LINE:COL:` and
    // its message on the next line.
    let mut lines = log.lines();
    let panic = lines
        .by_ref()
        .find(|l| l.contains("panicked at "))
        .map(|l| {
            let at = l.split("panicked at ").nth(1).unwrap_or(l);
            match lines.next() {
                Some(msg) => format!("{} {}", at.trim(), msg.trim()),
                None => at.trim().to_string(),
            }
        })
        .or_else(|| {
            log.lines()
                // libFuzzer writes `==PID== ERROR:`, the sanitizers
                // `==PID==ERROR:`.
                .find(|l| {
                    l.contains("== ERROR: ")
                        || l.contains("==ERROR: ")
                        || l.starts_with("SUMMARY: ")
                })
                .map(|l| l.trim().to_string())
        });
    Stats {
        runs: stat("stat::number_of_executed_units:"),
        execs_per_sec: stat("stat::average_exec_per_sec:"),
        corpus,
        peak_rss_mb: stat("stat::peak_rss_mb:"),
        artifact,
        panic,
    }
}

struct Outcome {
    target: &'static str,
    stats: Stats,
    seconds: f64,
    ok: bool,
}

/// Builds every target (nightly, sanitizers, debug assertions), then runs
/// each for `seconds` and prints the figures. Fails if any target found a
/// crash, a hang or a leak, or hit the memory limit.
pub fn run(ws: &Workspace, seconds: u32, targets: &[&'static str]) -> Result<()> {
    let mut build = ws.cargo(Toolchain::Nightly)?;
    build.args(["fuzz", "build", "--debug-assertions"]);
    eprintln!("building fuzz targets: {}", process::display(&build));
    process::run(&mut build)?;

    let logs = ws.root().join("target").join("fuzz");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut outcomes = Vec::new();
    for &target in targets {
        outcomes.push(run_target(ws, target, seconds, &logs)?);
    }
    println!("{}", table(&outcomes));
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.target)
        .collect();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

fn run_target(ws: &Workspace, target: &'static str, seconds: u32, logs: &Path) -> Result<Outcome> {
    let fuzz = ws.root().join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    let seeds = fuzz.join("seeds").join(target);
    let dict = fuzz.join("dict").join(format!("{target}.dict"));
    let log_path = logs.join(format!("{target}.log"));
    let log =
        File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;

    let mut cmd = ws.cargo(Toolchain::Nightly)?;
    // The first corpus directory is where libFuzzer adds inputs; the seeds
    // are only read.
    cmd.args(["fuzz", "run", "--debug-assertions", target])
        .arg(&corpus)
        .args(seeds.is_dir().then_some(&seeds))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .args(dict.is_file().then(|| format!("-dict={}", dict.display())))
        .stdout(log.try_clone().context("cannot share the log file")?)
        .stderr(log);
    eprintln!(
        "fuzz: {target} for {seconds} s: {} (output in {})",
        process::display(&cmd),
        log_path.display()
    );
    let start = Instant::now();
    let status = process::status(&mut cmd)?;
    let seconds = start.elapsed().as_secs_f64();
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let stats = parse_log(&text);
    let ok = status.success();
    if ok {
        eprintln!("fuzz: {target}: ok");
    } else {
        eprintln!(
            "fuzz: {target} FAILED ({status}): {}",
            stats.panic.as_deref().unwrap_or("see the log")
        );
        if let Some(input) = &stats.artifact {
            eprintln!(
                "fuzz: {target}: input saved in {input}; to reproduce: cargo +nightly fuzz run \
                 --debug-assertions {target} {input}"
            );
        }
    }
    Ok(Outcome {
        target,
        stats,
        seconds,
        ok,
    })
}

fn table(outcomes: &[Outcome]) -> String {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    let mut out = format!(
        "{:<14} {:>6} {:>12} {:>9} {:>14} {:>9}  RESULT",
        "TARGET", "SECS", "RUNS", "EXEC/S", "CORPUS", "PEAK_RSS"
    );
    for o in outcomes {
        let s = &o.stats;
        out.push_str(&format!(
            "\n{:<14} {:>6.0} {:>12} {:>9} {:>14} {:>9}  {}",
            o.target,
            o.seconds,
            or_dash(s.runs.map(|n| n.to_string())),
            or_dash(s.execs_per_sec.map(|n| n.to_string())),
            or_dash(s.corpus.clone()),
            or_dash(s.peak_rss_mb.map(|n| format!("{n} MB"))),
            if o.ok { "ok" } else { "FAILED" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DONE: &str = "\
INFO: Seed: 123
#65536\tpulse  cov: 300 ft: 900 corp: 300/10Kb exec/s: 21845 rss: 140Mb
#680302\tDONE   cov: 336 ft: 1011 corp: 338/12Kb lim: 4096 exec/s: 21945 rss: 151Mb
Done 680302 runs in 31 second(s)
stat::number_of_executed_units: 680302
stat::average_exec_per_sec:     21945
stat::new_units_added:          338
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              151
";

    const CRASH: &str = "\
#17011\tREDUCE cov: 134 ft: 337 corp: 94/1152b lim: 63 exec/s: 0 rss: 55Mb L: 5/38 MS: 1 EraseBytes-

thread '<unnamed>' (8642) panicked at fuzz_targets/http_query.rs:20:13:
200 bytes: no such path
stack backtrace:
==8642== ERROR: libFuzzer: deadly signal
SUMMARY: libFuzzer: deadly signal
artifact_prefix='/w/fuzz/artifacts/http_query/'; Test unit written to /w/fuzz/artifacts/http_query/crash-e363
stat::number_of_executed_units: 17189
stat::average_exec_per_sec:     0
stat::peak_rss_mb:              215
";

    #[test]
    fn reads_the_final_figures() {
        let s = parse_log(DONE);
        assert_eq!(s.runs, Some(680_302));
        assert_eq!(s.execs_per_sec, Some(21_945));
        assert_eq!(s.corpus.as_deref(), Some("338/12Kb"));
        assert_eq!(s.peak_rss_mb, Some(151));
        assert_eq!((s.artifact, s.panic), (None, None));
    }

    #[test]
    fn reads_a_crash() {
        let s = parse_log(CRASH);
        assert_eq!(s.runs, Some(17_189));
        assert_eq!(s.corpus.as_deref(), Some("94/1152b"));
        assert_eq!(
            s.artifact.as_deref(),
            Some("/w/fuzz/artifacts/http_query/crash-e363")
        );
        assert_eq!(
            s.panic.as_deref(),
            Some("fuzz_targets/http_query.rs:20:13: 200 bytes: no such path")
        );
    }

    #[test]
    fn a_crash_without_a_panic_gives_the_sanitizer_line() {
        let s = parse_log("INFO: x\n==1==ERROR: LeakSanitizer: detected memory leaks\n");
        assert_eq!(
            s.panic.as_deref(),
            Some("==1==ERROR: LeakSanitizer: detected memory leaks")
        );
        let s = parse_log("==2== ERROR: libFuzzer: timeout after 10 seconds\n");
        assert_eq!(
            s.panic.as_deref(),
            Some("==2== ERROR: libFuzzer: timeout after 10 seconds")
        );
        assert_eq!(parse_log(""), Stats::default());
    }

    #[test]
    fn target_names() {
        assert_eq!(targets(&[]).unwrap(), TARGETS);
        let named = targets(&["http_query".to_string(), "decode".to_string()]).unwrap();
        assert_eq!(named, ["http_query", "decode"]);
        let err = targets(&["nope".to_string()]).unwrap_err();
        assert!(
            err.starts_with("error: unknown fuzz target 'nope'"),
            "{err}"
        );
    }

    #[test]
    fn every_target_has_a_source_file() {
        let ws = Workspace::locate().unwrap();
        for t in TARGETS {
            let src = ws.root().join("fuzz/fuzz_targets").join(format!("{t}.rs"));
            assert!(src.is_file(), "{}", src.display());
        }
    }
}
