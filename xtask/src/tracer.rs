//! Running a tracer under measurement, for `cargo xtask bench` and `cargo
//! xtask soak`: the release binary copied aside, Ctrl-C turned into a flag
//! both check, the tracer's process (its stdout and stderr read as it
//! runs, stopped with SIGINT as a user would), its exit summary read as
//! numbers, and its CPU time and memory from /proc.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{compile, process, setup, workspace::Workspace};

/// How long a tracer may take to attach, and to exit after SIGINT.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Interruption

/// Set by SIGINT/SIGTERM/SIGHUP: the bench or soak stops at the next
/// check, and its guards stop the tracer and restore what it changed.
pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub(crate) fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
}

pub(crate) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; tracers stopped and kernel.bpf_stats_enabled restored");
    }
    Ok(())
}

/// Sleeps for `d`, waking early (with an error) when interrupted.
pub(crate) fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

// ---------------------------------------------------------------------------
// The tracer's binary

/// For a task that runs tcpwatch as root (`task` says why it must be
/// root): checks root, builds release, and copies the binary into
/// target/TASK, so that a rebuild of target/release meanwhile cannot change
/// it. Returns target/TASK and the copy.
pub(crate) fn private_build(ws: &Workspace, task: &str, why: &str) -> Result<(PathBuf, PathBuf)> {
    if !process::is_root() {
        bail!("cargo xtask {task} must run as root ({why}); run: sudo -E cargo xtask {task}");
    }
    setup::run(ws, setup::Options { test_tools: false })?;
    let object = compile::build_ebpf(ws)?;
    let built = compile::build_tcpwatch(ws, true, &object)?;
    let out_dir = ws.root().join("target").join(task);
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let binary = out_dir.join("tcpwatch");
    let staging = out_dir.join("tcpwatch.new");
    fs::copy(&built, &staging).with_context(|| format!("cannot copy {}", built.display()))?;
    fs::rename(&staging, &binary)
        .with_context(|| format!("cannot rename to {}", binary.display()))?;
    Ok((out_dir, binary))
}

// ---------------------------------------------------------------------------
// Tracer processes

/// Where a tracer's stdout goes.
#[derive(Debug)]
pub(crate) enum Output {
    /// /dev/null.
    Discard,
    /// A pipe whose lines are counted (bpftrace: events, "Lost N events").
    Count,
    /// A file (the soak reads tcpwatch's snapshots back from it).
    File(fs::File),
}

/// What the stdout counter has seen so far.
#[derive(Default)]
struct StdoutCount {
    events: AtomicU64,
    lost: AtomicU64,
    ready: AtomicBool,
    other: Mutex<Vec<String>>,
}

/// What says a tracer's programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ready {
    /// tcpwatch's "tcpwatch: tracing ..." on stderr.
    Tcpwatch,
    /// bpftrace's BEGIN line "READY" on stdout (BEGIN runs once every
    /// probe is attached).
    BpftraceBegin,
    /// The daemon's log line "listening on ...; tracing TCP connections".
    Daemon,
}

pub(crate) struct Stopped {
    pub(crate) status: ExitStatus,
    pub(crate) stderr: Vec<String>,
    pub(crate) stdout_events: u64,
    pub(crate) stdout_lost: u64,
}

/// A running tracer; dropping it stops it (SIGINT, then SIGKILL) and
/// waits for it.
pub(crate) struct Tracer {
    child: Child,
    pub(crate) pid: u32,
    description: String,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<StdoutCount>,
    readers: Vec<JoinHandle<()>>,
    exited: Option<ExitStatus>,
}

impl Tracer {
    pub(crate) fn spawn(mut cmd: Command, output: Output) -> Result<Tracer> {
        let description = process::display(&cmd);
        cmd.stdin(Stdio::null())
            .stderr(Stdio::piped())
            .stdout(match output {
                Output::Discard => Stdio::null(),
                Output::Count => Stdio::piped(),
                Output::File(file) => Stdio::from(file),
            })
            // Its own process group: a Ctrl-C on the terminal reaches only
            // xtask, which stops the tracer itself after the measurement.
            .process_group(0);
        // SAFETY: prctl(2) is async-signal-safe; this only asks the kernel
        // to SIGTERM the tracer should xtask die without stopping it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run `{description}`"))?;
        let pid = child.id();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(StdoutCount::default());
        let mut readers = Vec::new();
        if let Some(pipe) = child.stderr.take() {
            let lines = Arc::clone(&stderr);
            readers.push(thread::spawn(move || collect_lines(pipe, &lines)));
        }
        if let Some(pipe) = child.stdout.take() {
            let count = Arc::clone(&stdout);
            readers.push(thread::spawn(move || count_lines(pipe, &count)));
        }
        Ok(Tracer {
            child,
            pid,
            description,
            stderr,
            stdout,
            readers,
            exited: None,
        })
    }

    fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits for the line saying the programs are attached: tcpwatch's
    /// "tcpwatch: tracing ..." on stderr, bpftrace's BEGIN line "READY"
    /// (BEGIN runs once every probe is attached).
    pub(crate) fn wait_ready(&mut self, signal: Ready) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = match signal {
                Ready::BpftraceBegin => self.stdout.ready.load(Ordering::SeqCst),
                Ready::Tcpwatch => self
                    .stderr_lines()
                    .iter()
                    .any(|l| l.starts_with("tcpwatch: tracing ")),
                Ready::Daemon => self
                    .stderr_lines()
                    .iter()
                    .any(|l| l.contains("tracing TCP connections")),
            };
            if ready {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("cannot wait for a tracer")? {
                self.exited = Some(status);
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                bail!(
                    "`{}` exited ({}) before attaching: {}",
                    self.description,
                    describe_status(status),
                    self.stderr_lines().join(" | ")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "`{}` did not attach within {} s: {}",
                    self.description,
                    READY_TIMEOUT.as_secs(),
                    self.stderr_lines().join(" | ")
                );
            }
            check_interrupted()?;
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT, wait (SIGKILL after [`STOP_TIMEOUT`]), and collect output.
    pub(crate) fn stop(mut self) -> Result<Stopped> {
        let status = self.terminate()?;
        Ok(Stopped {
            status,
            stderr: self.stderr_lines(),
            stdout_events: self.stdout.events.load(Ordering::SeqCst),
            stdout_lost: self.stdout.lost.load(Ordering::SeqCst),
        })
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        // SAFETY: kill(2) on our own child, which has not been reaped.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().context("cannot wait for a tracer")? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let status = self.child.wait().context("cannot wait for a tracer")?;
                self.exited = Some(status);
                bail!(
                    "`{}` did not exit within {} s of SIGINT; killed",
                    self.description,
                    STOP_TIMEOUT.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.exited = Some(status);
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Ok(status)
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.exited.is_none() {
            if let Err(e) = self.terminate() {
                eprintln!("xtask: {e:#}");
            }
        }
    }
}

fn collect_lines(pipe: impl Read, lines: &Mutex<Vec<String>>) {
    for line in BufReader::new(pipe).lines() {
        let Ok(line) = line else { break };
        if let Ok(mut lines) = lines.lock() {
            if lines.len() < 10_000 {
                lines.push(line);
            }
        }
    }
}

/// Counts bpftrace's output: event lines start with a digit (the time);
/// "Lost N events" lines add N to the lost count.
fn count_lines(pipe: impl Read, count: &StdoutCount) {
    let mut reader = BufReader::with_capacity(1 << 20, pipe);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.first().is_some_and(u8::is_ascii_digit) {
            count.events.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if let Some(n) = lost_count(text) {
            count.lost.fetch_add(n, Ordering::Relaxed);
        } else if text == "READY" {
            count.ready.store(true, Ordering::SeqCst);
        } else if !text.is_empty() {
            if let Ok(mut other) = count.other.lock() {
                if other.len() < 100 {
                    other.push(text.to_string());
                }
            }
        }
    }
}

/// N from bpftrace's "Lost N events".
fn lost_count(line: &str) -> Option<u64> {
    let rest = line.trim().strip_prefix("Lost ")?;
    let (n, tail) = rest.split_once(' ')?;
    tail.starts_with("events").then(|| n.parse().ok())?
}

pub(crate) fn lost_in(lines: &[String]) -> u64 {
    lines.iter().filter_map(|l| lost_count(l)).sum()
}

/// tcpwatch's exit summary (`--format json`: one JSON object, the last
/// line on stderr; the daemon's with `--log-format json`: its last log
/// line, "stopped: ...", whose fields are the counts) and its numbers by
/// path: `{"stream":{"lost":{"total":2}}}` gives ("stream.lost.total", 2).
pub(crate) fn exit_summary(stderr: &[String]) -> Option<(String, Vec<(String, u64)>)> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, u64)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&path, v, out);
                }
            }
            v => out.extend(v.as_u64().map(|n| (prefix.to_string(), n))),
        }
    }
    let line = stderr.iter().rev().find(|l| !l.trim().is_empty())?;
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let daemon_stopped = v
        .get("message")
        .and_then(|m| m.as_str())
        .is_some_and(|m| m.starts_with("stopped"));
    if v.get("summary").is_none() && !daemon_stopped {
        return None;
    }
    let mut counts = Vec::new();
    flatten("", &v, &mut counts);
    Some((line.clone(), counts))
}

pub(crate) fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => "unknown status".into(),
    }
}

// ---------------------------------------------------------------------------
// /proc readings

/// utime + stime of a process (all its threads), in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_split(pid).map(|(user, system)| user + system)
}

/// utime and stime of a process (all its threads), in seconds.
pub(crate) fn cpu_split(pid: u32) -> Option<(f64, f64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (utime, stime) = cpu_ticks(&stat)?;
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime as f64 / hz, stime as f64 / hz))
}

/// utime and stime (fields 14 and 15) of a /proc/PID/stat line, in ticks.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name (field 2) may hold spaces; fields after it start
    // after its closing parenthesis, with the state as field 3.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

pub(crate) fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines() {
        let get = |stderr: &[&str], label: &str| {
            let stderr: Vec<String> = stderr.iter().map(|l| l.to_string()).collect();
            exit_summary(&stderr)
                .and_then(|(_, counts)| counts.into_iter().find(|(l, _)| l == label))
                .map(|(_, n)| n)
        };
        let trace = r#"{"summary":"trace","transitions_seen":365805,"shown":365805,"stream":{"events":365805,"lost":{"total":2034,"ring_full":0,"skipped":2034},"undecodable":0},"tracking":{"evicted":0,"stale":0,"peak":9,"limit":262144,"at_exit":0},"transitions":[]}"#;
        assert_eq!(get(&[trace], "transitions_seen"), Some(365_805));
        assert_eq!(get(&[trace], "stream.lost.total"), Some(2034));
        assert_eq!(get(&[trace], "stream.lost.ring_full"), Some(0));
        assert_eq!(get(&[trace], "stream.lost.skipped"), Some(2034));
        assert_eq!(get(&[trace], "stream.undecodable"), Some(0));
        let conns = r#"{"summary":"conns","connections_finished":68576,"shown":68576,"still_open":0,"stream":{"events":348505,"lost":{"total":415,"ring_full":0,"skipped":415},"undecodable":0},"tracking":{"evicted":0,"stale":0,"peak":9,"limit":262144,"at_exit":0}}"#;
        assert_eq!(get(&[conns], "stream.events"), Some(348_505));
        assert_eq!(get(&[conns], "stream.lost.total"), Some(415));
        assert_eq!(get(&[conns], "connections_finished"), Some(68_576));
        // The summary is the last line; LOST lines before it do not count.
        let tw = r#"{"summary":"timewait","snapshots":3,"stream":{"events":900,"lost":{"total":7,"ring_full":0,"skipped":7},"undecodable":0},"tracking":{"evicted":0,"stale":0,"peak":9,"limit":262144,"at_exit":0}}"#;
        let lines = ["tcpwatch: LOST 7 events (7 in all: ...)", tw];
        assert_eq!(get(&lines, "snapshots"), Some(3));
        assert_eq!(get(&lines, "stream.events"), Some(900));
        assert_eq!(get(&lines, "tracking.peak"), Some(9));
        // A run that failed after its summary, or printed none, has none.
        assert_eq!(
            get(&[tw, "tcpwatch: writing output failed"], "snapshots"),
            None
        );
        assert_eq!(get(&["tcpwatch: 3 snapshots"], "snapshots"), None);
        // The daemon's last JSON log line.
        let daemon = r#"{"timestamp":"2026-12-06T01:23:09.679488Z","level":"INFO","message":"stopped: programs detached","events":812,"connections":80,"lost_ring_full":0,"lost_kernel_skipped":3,"evicted":0,"stale":0}"#;
        assert_eq!(get(&[daemon], "events"), Some(812));
        assert_eq!(get(&[daemon], "lost_kernel_skipped"), Some(3));
        let other = r#"{"timestamp":"x","level":"INFO","message":"listening","events":1}"#;
        assert_eq!(get(&[other], "events"), None);
    }

    #[test]
    fn bpftrace_lost_lines() {
        assert_eq!(lost_count("Lost 42 events"), Some(42));
        assert_eq!(lost_count("  Lost 7 events\n"), Some(7));
        assert_eq!(lost_count("Attaching 2 probes..."), None);
        assert_eq!(lost_count("Lost track"), None);
    }

    #[test]
    fn counting_bpftrace_output() {
        let out =
            b"Attaching 2 probes...\nREADY\n1 ffff 1 a 127.0.0.1 1 127.0.0.1 2 CLOSE -> SYN_SENT\n\
                    2 ffff 1 a 127.0.0.1 1 127.0.0.1 2 SYN_SENT -> ESTABLISHED\nLost 5 events\n\n";
        let count = StdoutCount::default();
        count_lines(&out[..], &count);
        assert_eq!(count.events.load(Ordering::SeqCst), 2);
        assert_eq!(count.lost.load(Ordering::SeqCst), 5);
        assert!(count.ready.load(Ordering::SeqCst));
        assert_eq!(
            count.other.lock().unwrap().as_slice(),
            ["Attaching 2 probes..."]
        );
    }

    #[test]
    fn proc_stat_cpu() {
        let stat = "1234 (tcp watch) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 2 0 \
                    100 1000000 500 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some((250, 30)));
    }
}
