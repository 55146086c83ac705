//! Shared harness for the live `tcpwatch trace` tests: deciding whether a
//! test can run (and failing instead of skipping under CI), child processes
//! whose output is collected line by line and that are killed if a test
//! fails, a `tcpwatch` runner, the JSON line model, and the "peer" program
//! (the test binary re-executed to own sockets under a known pid).

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
pub use tcpwatch::views::summary::ExitSummary;

pub mod conns;
pub mod daemon;
pub mod deploy;
pub mod hardening;
pub mod overload;
pub mod timewait;

/// The line tcpwatch prints on stderr once its probe is attached.
pub const READY_LINE: &str = "tcpwatch: tracing TCP state transitions; Ctrl-C to stop";
/// What a binary built without `TCPWATCH_BPF_OBJECT` says when asked to trace.
pub const NO_OBJECT: &str = "built without its eBPF object";

pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
pub const PEER_TIMEOUT: Duration = Duration::from_secs(20);

pub fn tcpwatch_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tcpwatch")
}

// ---------------------------------------------------------------------------
// Skipping

/// Under CI (or when asked) a test that cannot run must fail, so a missing
/// privilege or toolchain piece can't turn the suite silently green.
pub fn strict() -> bool {
    std::env::var_os("CI").is_some()
        || std::env::var("TCPWATCH_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1")
}

/// Says why a test (or part of one) does not run; panics instead under
/// [`strict`].
pub fn skip(why: &str) {
    if strict() {
        panic!("cannot run (CI or TCPWATCH_REQUIRE_ROOT_TESTS=1 forbids skipping): {why}");
    }
    println!("skipped: {why}");
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether live tracing can work here: root, kernel BTF, and a binary that
/// embeds its eBPF object. Checked once per test process.
pub fn live() -> Result<(), String> {
    static LIVE: OnceLock<Result<(), String>> = OnceLock::new();
    LIVE.get_or_init(|| {
        if !is_root() {
            return Err("not running as root (live tracing loads eBPF programs)".into());
        }
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err("no kernel BTF at /sys/kernel/btf/vmlinux".into());
        }
        // A binary without its object says so before touching the kernel;
        // a BTF path that does not exist makes a complete binary stop too.
        let out = Command::new(tcpwatch_bin())
            .args(["trace", "--btf", "/nonexistent/tcpwatch-probe-check"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", tcpwatch_bin()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains(NO_OBJECT) {
            return Err(format!(
                "tcpwatch was built without its eBPF object (build it with \
                 TCPWATCH_BPF_OBJECT=<path> or `cargo xtask test`): {}",
                stderr.trim()
            ));
        }
        Ok(())
    })
    .clone()
}

/// Returns from the test (after [`skip`]) when live tracing cannot work.
#[macro_export]
macro_rules! require_live {
    () => {
        if let Err(why) = $crate::support::live() {
            $crate::support::skip(&why);
            return;
        }
    };
}

// ---------------------------------------------------------------------------
// Child processes

#[derive(Default)]
struct Stream {
    lines: Vec<String>,
    eof: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<Stream>,
    cv: Condvar,
}

impl Shared {
    fn collect(self: &Arc<Self>, pipe: impl Read + Send + 'static) -> JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::with_capacity(256 * 1024, pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if buf.last() == Some(&b'\n') {
                            buf.pop();
                        }
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        me.state.lock().unwrap().lines.push(line);
                        me.cv.notify_all();
                    }
                }
            }
            me.state.lock().unwrap().eof = true;
            me.cv.notify_all();
        })
    }

    fn snapshot(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }

    /// Waits until `n` lines satisfy `pred`; `Err` on timeout or EOF.
    fn wait(
        &self,
        pred: &dyn Fn(&str) -> bool,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap();
        loop {
            let hits: Vec<String> = st.lines.iter().filter(|l| pred(l)).cloned().collect();
            if hits.len() >= n {
                return Ok(hits);
            }
            if st.eof {
                return Err("stream closed".into());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out after {timeout:?}"));
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }
}

/// What a finished child printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// A child whose stdout and stderr are collected line by line as it runs.
/// Dropping it kills the child, so a failing test leaves nothing behind.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    out: Arc<Shared>,
    err: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: Command, with_stdin: bool) -> Proc {
        Proc::start(name, cmd, with_stdin, None)
    }

    /// Like [`Proc::spawn`] without stdin, but stdout goes to `stdout` (a
    /// file, or `Stdio::null()` for a flood nobody reads) and only stderr
    /// is collected.
    pub fn spawn_stdout_to(name: &str, cmd: Command, stdout: Stdio) -> Proc {
        Proc::start(name, cmd, false, Some(stdout))
    }

    fn start(name: &str, mut cmd: Command, with_stdin: bool, stdout: Option<Stdio>) -> Proc {
        cmd.stdout(stdout.unwrap_or_else(Stdio::piped))
            .stderr(Stdio::piped());
        cmd.stdin(if with_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let out = Arc::new(Shared::default());
        let err = Arc::new(Shared::default());
        let mut readers = vec![err.collect(child.stderr.take().unwrap())];
        match child.stdout.take() {
            Some(pipe) => readers.push(out.collect(pipe)),
            None => out.state.lock().unwrap().eof = true,
        }
        Proc {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child: Some(child),
            out,
            err,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child still owned").id()
    }

    fn describe(&self) -> String {
        format!(
            "--- {} stdout (last lines) ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            tail(&self.out.snapshot(), 30),
            self.name,
            tail(&self.err.snapshot(), 60)
        )
    }

    pub fn wait_stdout(&self, pred: impl Fn(&str) -> bool, n: usize, t: Duration) -> Vec<String> {
        self.out.wait(&pred, n, t).unwrap_or_else(|e| {
            panic!(
                "{}: waiting for stdout: {e}\n{}",
                self.name,
                self.describe()
            )
        })
    }

    pub fn wait_stderr(&self, pred: impl Fn(&str) -> bool, n: usize, t: Duration) -> Vec<String> {
        self.err.wait(&pred, n, t).unwrap_or_else(|e| {
            panic!(
                "{}: waiting for stderr: {e}\n{}",
                self.name,
                self.describe()
            )
        })
    }

    pub fn try_wait_stderr(&self, pred: impl Fn(&str) -> bool, t: Duration) -> bool {
        self.err.wait(&pred, 1, t).is_ok()
    }

    pub fn stderr_now(&self) -> Vec<String> {
        self.err.snapshot()
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("started with stdin");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: writing stdin: {e}\n{}", self.name, self.describe()));
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // own child, not yet reaped (we still own the Child).
        unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
    }

    /// Waits for the child to exit on its own (after a signal or by itself)
    /// and returns everything it printed. Kills it and panics on timeout.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        self.stdin.take();
        let deadline = Instant::now() + timeout;
        let status = loop {
            let child = self.child.as_mut().unwrap();
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{} did not exit within {timeout:?}\n{}",
                        self.name,
                        self.describe()
                    );
                }
                Err(e) => panic!("{}: wait: {e}", self.name),
            }
        };
        self.child = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished {
            status,
            stdout: std::mem::take(&mut self.out.state.lock().unwrap().lines),
            stderr: std::mem::take(&mut self.err.state.lock().unwrap().lines),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------
// tcpwatch

/// One JSON line of `tcpwatch trace --format json`.
#[derive(Clone, Debug, Deserialize)]
pub struct Line {
    pub ts: String,
    pub ts_mono_ns: u64,
    pub skaddr: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub owner_source: Option<String>,
    pub family: String,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    pub old: String,
    pub new: String,
    pub delta_ms: Option<f64>,
    pub netns: Option<u32>,
    pub cpu: u32,
}

pub const JSON_FIELDS: [&str; 17] = [
    "ts",
    "ts_mono_ns",
    "skaddr",
    "pid",
    "comm",
    "cgroup",
    "owner_source",
    "family",
    "saddr",
    "sport",
    "daddr",
    "dport",
    "old",
    "new",
    "delta_ms",
    "netns",
    "cpu",
];

impl Line {
    pub fn parse(text: &str) -> Line {
        let v: serde_json::Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {text}"));
        for f in JSON_FIELDS {
            assert!(obj.contains_key(f), "field {f} missing: {text}");
        }
        serde_json::from_value(v).unwrap_or_else(|e| panic!("bad field ({e}): {text}"))
    }

    pub fn has_port(&self, ports: &[u16]) -> bool {
        ports.contains(&self.sport) || ports.contains(&self.dport)
    }

    /// (skaddr, old, new): what the filter tests compare.
    pub fn key(&self) -> (String, String, String) {
        (self.skaddr.clone(), self.old.clone(), self.new.clone())
    }

    pub fn transition(&self) -> (&str, &str) {
        (self.old.as_str(), self.new.as_str())
    }
}

/// The figures of a `trace --format json` exit summary (its last line on
/// stderr, one JSON object).
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub seen: u64,
    pub shown: u64,
    pub lost: u64,
    pub undecodable: u64,
}

pub fn parse_summary(stderr: &[String]) -> Summary {
    let Some(ExitSummary::Trace(s)) = ExitSummary::from_stderr(stderr) else {
        panic!("no trace summary on stderr:\n{}", stderr.join("\n"));
    };
    let lost = s.stream.lost;
    assert_eq!(
        lost.total,
        lost.ring_full + lost.skipped,
        "lost is not ring + skipped: {s:?}"
    );
    Summary {
        seen: s.transitions_seen,
        shown: s.shown,
        lost: lost.total,
        undecodable: s.stream.undecodable,
    }
}

/// A finished `tcpwatch trace --format json` run.
#[derive(Debug)]
pub struct TraceRun {
    pub lines: Vec<Line>,
    /// stdout as printed, line by line.
    pub raw: Vec<String>,
    pub stderr: Vec<String>,
    pub summary: Summary,
}

impl TraceRun {
    /// Fails unless tcpwatch kept every event: the checks that follow
    /// compare exact sets, which a lost event would make meaningless.
    pub fn assert_nothing_lost(&self, name: &str) {
        assert!(
            self.summary.lost == 0,
            "{name}: tcpwatch lost {} of {} events (other traffic on this host filled the ring?); \
             stderr: {:?}",
            self.summary.lost,
            self.summary.seen + self.summary.lost,
            self.stderr
        );
    }

    /// Writes the run's lines to a file for a failure message to point at.
    pub fn dump(&self, name: &str) -> String {
        let path =
            std::env::temp_dir().join(format!("tcpwatch-test-{name}-{}.jsonl", std::process::id()));
        match fs::write(&path, self.raw.join("\n") + "\n") {
            Ok(()) => format!("(tcpwatch output saved in {})", path.display()),
            Err(e) => format!("(could not save tcpwatch output: {e})"),
        }
    }

    /// Lines of sockets in this network namespace using one of the test's
    /// ports (local or remote). Other namespaces have their own port space.
    pub fn with_ports(&self, ports: &[u16]) -> Vec<Line> {
        let netns = own_netns();
        self.lines
            .iter()
            .filter(|l| l.has_port(ports) && l.netns.is_none_or(|n| n == netns))
            .cloned()
            .collect()
    }
}

/// A running `tcpwatch trace --format json` (killed if dropped).
pub struct Tcpwatch {
    proc: Proc,
}

impl Tcpwatch {
    /// Starts tcpwatch and waits until its probe is attached.
    pub fn start(name: &str, extra: &[&str]) -> Tcpwatch {
        let tw = Tcpwatch::spawn(name, extra);
        tw.wait_ready();
        tw
    }

    /// Starts tcpwatch without waiting (to start several in parallel).
    pub fn spawn(name: &str, extra: &[&str]) -> Tcpwatch {
        Tcpwatch::spawn_wrapped(name, &[], extra)
    }

    /// Like [`Tcpwatch::spawn`], through a wrapper command that ends by
    /// exec'ing its arguments (`ip netns exec NS`, `unshare -m ...`), so the
    /// pid signalled is tcpwatch's.
    pub fn spawn_wrapped(name: &str, wrapper: &[&str], extra: &[&str]) -> Tcpwatch {
        let mut argv = wrapper.to_vec();
        argv.extend([tcpwatch_bin(), "trace", "--format", "json"]);
        argv.extend_from_slice(extra);
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        Tcpwatch {
            proc: Proc::spawn(
                &format!("tcpwatch {name} {wrapper:?} {extra:?}"),
                cmd,
                false,
            ),
        }
    }

    pub fn wait_ready(&self) {
        self.proc.wait_stderr(|l| l == READY_LINE, 1, START_TIMEOUT);
    }

    /// Waits up to `t` for a stderr line containing `needle` while running.
    pub fn saw_on_stderr(&self, needle: &str, t: Duration) -> bool {
        self.proc.try_wait_stderr(|l| l.contains(needle), t)
    }

    /// SIGINT, then everything it printed. Checks a clean exit and that the
    /// summary's "shown" matches the lines printed.
    pub fn stop(self) -> TraceRun {
        self.proc.signal(libc::SIGINT);
        let name = self.proc.name.clone();
        let f = self.proc.finish(STOP_TIMEOUT);
        assert!(
            f.status.success(),
            "{name} exited with {}\nstderr:\n{}",
            f.status,
            f.stderr.join("\n")
        );
        for l in &f.stderr {
            assert!(
                !l.contains("panicked"),
                "{name} panicked:\n{}",
                f.stderr.join("\n")
            );
        }
        let lines: Vec<Line> = f.stdout.iter().map(|l| Line::parse(l)).collect();
        let summary = parse_summary(&f.stderr);
        assert_eq!(
            summary.shown,
            lines.len() as u64,
            "{name}: summary's shown count differs from the lines printed"
        );
        assert_eq!(summary.undecodable, 0, "{name}: {:?}", f.stderr);
        TraceRun {
            lines,
            raw: f.stdout,
            stderr: f.stderr,
            summary,
        }
    }
}

/// Splits lines into socket lifetimes: by skaddr, in output order, a new
/// lifetime after each →CLOSE and at each birth (the kernel reuses freed
/// socket addresses).
pub fn lifetimes(lines: &[Line]) -> Vec<Vec<Line>> {
    let mut open: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<Vec<Line>> = Vec::new();
    for l in lines {
        // A birth starts a new lifetime even if the last one's end is missing.
        if is_birth(l) {
            open.remove(&l.skaddr);
        }
        let idx = match open.get(&l.skaddr) {
            Some(&i) => i,
            None => {
                out.push(Vec::new());
                open.insert(l.skaddr.clone(), out.len() - 1);
                out.len() - 1
            }
        };
        out[idx].push(l.clone());
        if l.new == "CLOSE" {
            open.remove(&l.skaddr);
        }
    }
    out
}

/// Transitions that begin a socket's life as tcpwatch sees it.
pub fn is_birth(l: &Line) -> bool {
    matches!(
        l.transition(),
        ("CLOSE", "SYN_SENT") | ("CLOSE", "LISTEN") | ("LISTEN", "SYN_RECV")
    )
}

pub fn transitions(life: &[Line]) -> Vec<(&str, &str)> {
    life.iter().map(|l| l.transition()).collect()
}

pub const CLIENT_SEQ: [(&str, &str); 5] = [
    ("CLOSE", "SYN_SENT"),
    ("SYN_SENT", "ESTABLISHED"),
    ("ESTABLISHED", "FIN_WAIT1"),
    ("FIN_WAIT1", "FIN_WAIT2"),
    ("FIN_WAIT2", "CLOSE"),
];
pub const ACCEPTED_SEQ: [(&str, &str); 5] = [
    ("LISTEN", "SYN_RECV"),
    ("SYN_RECV", "ESTABLISHED"),
    ("ESTABLISHED", "CLOSE_WAIT"),
    ("CLOSE_WAIT", "LAST_ACK"),
    ("LAST_ACK", "CLOSE"),
];
pub const LISTENER_SEQ: [(&str, &str); 2] = [("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")];

/// The kernel's TCP state numbers (include/net/tcp_states.h).
pub fn state_name(n: u32) -> &'static str {
    match n {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "?",
    }
}

/// Checks `ts` is RFC 3339 UTC with exactly 9 fractional digits and returns
/// it as nanoseconds since the epoch.
pub fn parse_ts(ts: &str) -> i128 {
    let b = ts.as_bytes();
    let shape_ok = b.len() == 30
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            29 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(shape_ok, "ts is not YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ: {ts}");
    let t = humantime::parse_rfc3339(ts).unwrap_or_else(|e| panic!("ts {ts}: {e}"));
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC now.
pub fn wall_minus_mono_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// This process's network namespace inode (what tcpwatch prints as netns).
pub fn own_netns() -> u32 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self/ns/net").unwrap().ino() as u32
}

pub fn proc_comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/comm: {e}"))
        .trim_end_matches('\n')
        .to_string()
}

/// Whether ::1 can be bound here (IPv6 may be disabled).
pub fn ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

fn parse_proc_port(field: &str) -> Option<u16> {
    u16::from_str_radix(field.rsplit(':').next()?, 16).ok()
}

/// Waits until no socket on these ports is in a state other than TIME_WAIT
/// (every transition the test caused has happened), reading /proc/net/tcp*.
pub fn settle(ports: &[u16], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut busy = Vec::new();
        for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = fs::read_to_string(file) else {
                continue;
            };
            for row in text.lines().skip(1) {
                let f: Vec<&str> = row.split_whitespace().collect();
                if f.len() < 4 {
                    continue;
                }
                let (lp, rp) = (parse_proc_port(f[1]), parse_proc_port(f[2]));
                let ours = [lp, rp]
                    .iter()
                    .any(|p| p.is_some_and(|p| ports.contains(&p)));
                if ours && f[3] != "06" {
                    busy.push(row.to_string());
                }
            }
        }
        if busy.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sockets on ports {ports:?} still open after {timeout:?}:\n{}",
            busy.join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kernel's `recursion_misses` of each loaded program named
/// `inet_sock_set_state`, by program id (runs skipped because another BPF
/// program was already running on that CPU), per `bpftool prog show`.
/// `None` without bpftool. Diagnostic only: it covers every instance's
/// programs, not just one tcpwatch's.
pub fn state_prog_recursion_misses() -> Option<HashMap<u64, u64>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter(|p| p["name"] == "inet_sock_set_state")
            .filter_map(|p| {
                Some((
                    p["id"].as_u64()?,
                    p["recursion_misses"].as_u64().unwrap_or(0),
                ))
            })
            .collect(),
    )
}

/// Misses added between two readings (programs loaded meanwhile count whole).
pub fn misses_between(before: &HashMap<u64, u64>, after: &HashMap<u64, u64>) -> u64 {
    after
        .iter()
        .map(|(id, a)| a.saturating_sub(before.get(id).copied().unwrap_or(0)))
        .sum()
}

// ---------------------------------------------------------------------------
// bpftrace (independent oracle)

pub const BPFTRACE: &str = "/usr/bin/bpftrace";

/// bpftrace printing every inet_sock_set_state of TCP sockets on `ports`.
pub struct Bpftrace {
    proc: Proc,
    sentinel: TcpListener,
}

/// One bpftrace line: (sport, dport, skaddr as "0x…", old, new).
pub type BtEvent = (u16, u16, String, &'static str, &'static str);

impl Bpftrace {
    /// Starts bpftrace and returns once it demonstrably sees events: it is
    /// also told about a sentinel port the test connects to until a
    /// sentinel line appears ("Attaching" is printed before attaching).
    pub fn start(ports: &[u16]) -> Bpftrace {
        let sentinel = TcpListener::bind("127.0.0.1:0").unwrap();
        let sport = sentinel.local_addr().unwrap().port();
        let cond = ports
            .iter()
            .chain(std::iter::once(&sport))
            .map(|p| format!("args->sport == {p} || args->dport == {p}"))
            .collect::<Vec<_>>()
            .join(" || ");
        let prog = format!(
            "tracepoint:sock:inet_sock_set_state /args->protocol == 6 && ({cond})/ \
             {{ printf(\"T %d %d %llx %d %d %u\\n\", args->sport, args->dport, \
             (uint64)args->skaddr, args->oldstate, args->newstate, \
             ((struct sock *)args->skaddr)->__sk_common.skc_net.net->ns.inum); }}"
        );
        let mut cmd = Command::new(BPFTRACE);
        cmd.args(["-B", "line", "-e", &prog]);
        let proc = Proc::spawn("bpftrace", cmd, false);
        proc.wait_stdout(|l| l.starts_with("Attaching"), 1, START_TIMEOUT);
        let bt = Bpftrace { proc, sentinel };
        let deadline = Instant::now() + START_TIMEOUT;
        let needle = format!(" {sport} ");
        loop {
            if let Ok(c) = TcpStream::connect(("127.0.0.1", sport)) {
                let _ = bt.sentinel.accept();
                drop(c);
            }
            if bt
                .proc
                .out
                .wait(
                    &|l: &str| l.starts_with("T ") && l.contains(&needle),
                    1,
                    Duration::from_millis(200),
                )
                .is_ok()
            {
                return bt;
            }
            assert!(
                Instant::now() < deadline,
                "bpftrace never reported the sentinel port\n{}",
                bt.proc.describe()
            );
        }
    }

    /// SIGINT, then the events on `ports` in this network namespace
    /// (sentinel lines dropped).
    pub fn stop(self, ports: &[u16]) -> Vec<BtEvent> {
        let netns = own_netns().to_string();
        self.proc.signal(libc::SIGINT);
        let f = self.proc.finish(STOP_TIMEOUT);
        assert!(
            f.status.success(),
            "bpftrace exited with {}: {}",
            f.status,
            f.stderr.join("\n")
        );
        f.stdout
            .iter()
            .filter_map(|l| l.strip_prefix("T "))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(f.len(), 6, "bpftrace line: {l}");
                let e: BtEvent = (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    format!("0x{}", f[2]),
                    state_name(f[3].parse().unwrap()),
                    state_name(f[4].parse().unwrap()),
                );
                (e, f[5] == netns)
            })
            .filter(|(e, ours)| *ours && (ports.contains(&e.0) || ports.contains(&e.1)))
            .map(|(e, _)| e)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Peers: the test binary re-executed, so sockets belong to a known pid.

/// Environment variable naming the peer role (`server` or `client`).
pub const PEER_ENV: &str = "TCPWATCH_PEER";

/// How to start a peer.
pub struct PeerSpec {
    name: String,
    env: Vec<(&'static str, String)>,
    gated: bool,
}

impl PeerSpec {
    /// Binds `bind` (port 0 picks one), prints `PEER port N`, listens,
    /// accepts connections one by one (each: read to EOF, wait the delay,
    /// close), then closes the listener and prints `PEER done`.
    pub fn server(name: &str, bind: &str) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            env: vec![
                (PEER_ENV, "server".into()),
                ("TCPWATCH_PEER_BIND", bind.into()),
            ],
            gated: false,
        }
    }

    /// Connects to each target in turn, prints `PEER local N` (its port),
    /// writes a few bytes and closes; prints `PEER done`.
    pub fn client(name: &str, targets: &[SocketAddr]) -> PeerSpec {
        let list = targets
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        PeerSpec {
            name: name.into(),
            env: vec![(PEER_ENV, "client".into()), ("TCPWATCH_PEER_CONNECT", list)],
            gated: false,
        }
    }

    pub fn accept(mut self, n: usize) -> Self {
        self.env.push(("TCPWATCH_PEER_ACCEPT", n.to_string()));
        self
    }

    pub fn delay_ms(mut self, ms: u64) -> Self {
        self.env.push(("TCPWATCH_PEER_DELAY_MS", ms.to_string()));
        self
    }

    /// Names the peer's process (and socket-using thread) `comm`.
    pub fn comm(mut self, comm: &str) -> Self {
        self.env.push(("TCPWATCH_PEER_COMM", comm.into()));
        self
    }

    /// Steps the peer waits for a "go" line before: server `listen`,
    /// client `connect` and/or `close`.
    pub fn gates(mut self, gates: &[&str]) -> Self {
        self.env.push(("TCPWATCH_PEER_GATES", gates.join(",")));
        self.gated = true;
        self
    }

    pub fn spawn(self) -> Peer {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", "peer_entry", "--nocapture", "--test-threads=1"]);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(&format!("peer {}", self.name), cmd, self.gated);
        let comm = peer_text(
            &proc.wait_stdout(
                |l| peer_text(l).is_some_and(|t| t.starts_with("PEER comm ")),
                1,
                PEER_TIMEOUT,
            )[0],
        )
        .unwrap()["PEER comm ".len()..]
            .to_string();
        // What the kernel will report for the peer: read while it is alive.
        let proc_comm = proc_comm(proc.pid());
        assert_eq!(comm, proc_comm, "peer thread and process comm differ");
        Peer { proc, comm }
    }
}

/// A peer's protocol line: libtest may print "test peer_entry ... " on the
/// same line before it.
fn peer_text(line: &str) -> Option<&str> {
    line.find("PEER ").map(|i| &line[i..])
}

pub struct Peer {
    pub proc: Proc,
    pub comm: String,
}

impl Peer {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The values of the first `n` stdout lines `PEER <key> <value>`.
    pub fn values(&self, key: &str, n: usize) -> Vec<String> {
        let prefix = format!("PEER {key} ");
        self.proc
            .wait_stdout(
                |l| peer_text(l).is_some_and(|t| t.starts_with(&prefix)),
                n,
                PEER_TIMEOUT,
            )
            .into_iter()
            .take(n)
            .map(|l| peer_text(&l).unwrap()[prefix.len()..].to_string())
            .collect()
    }

    pub fn port(&self) -> u16 {
        self.values("port", 1)[0].parse().unwrap()
    }

    pub fn wait_for(&self, key: &str) {
        let exact = format!("PEER {key}");
        let spaced = format!("{exact} ");
        self.proc.wait_stdout(
            |l| peer_text(l).is_some_and(|t| t == exact || t.starts_with(&spaced)),
            1,
            PEER_TIMEOUT,
        );
    }

    pub fn go(&mut self) {
        self.proc.send_line("go");
    }

    /// Waits for the peer to finish and checks it succeeded.
    pub fn finish(self) -> Vec<String> {
        let name = self.proc.name.clone();
        let f = self.proc.finish(PEER_TIMEOUT);
        assert!(
            f.status.success(),
            "{name} failed ({})\nstdout:\n{}\nstderr:\n{}",
            f.status,
            f.stdout.join("\n"),
            f.stderr.join("\n")
        );
        assert!(
            f.stdout.iter().any(|l| peer_text(l) == Some("PEER done")),
            "{name} did not finish: {:?}",
            f.stdout
        );
        f.stdout
    }
}

/// The peer program; does nothing unless [`PEER_ENV`] is set.
pub fn peer_main() {
    let Ok(role) = std::env::var(PEER_ENV) else {
        return;
    };
    name_this_thread();
    match role.as_str() {
        "server" => peer_server(),
        "client" => peer_client(),
        other => panic!("unknown peer role {other}"),
    }
    println!("PEER done");
    // Leave without the harness's own report after our last line.
    std::process::exit(0);
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn gate(name: &str) {
    let gates = env_or("TCPWATCH_PEER_GATES", "");
    if gates.split(',').any(|g| g == name) {
        println!("PEER waiting {name}");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
}

/// libtest runs the peer on a thread named after the test ("peer_entry"),
/// and the kernel's comm for socket events is the thread's. Give the thread
/// the process's name (or the requested one, for both), so what the test
/// reads in /proc/<pid>/comm is what tcpwatch must report.
fn name_this_thread() {
    let name = match std::env::var("TCPWATCH_PEER_COMM") {
        Ok(n) => {
            fs::write("/proc/self/comm", &n).expect("rename the main thread");
            n
        }
        Err(_) => fs::read_to_string("/proc/self/comm")
            .unwrap()
            .trim_end_matches('\n')
            .to_string(),
    };
    let c = std::ffi::CString::new(name.clone()).unwrap();
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) };
    assert_eq!(rc, 0, "prctl(PR_SET_NAME)");
    let me = fs::read_to_string("/proc/thread-self/comm").unwrap();
    println!("PEER comm {}", me.trim_end_matches('\n'));
}

/// bind() and listen() as separate steps, so a gate can sit between them
/// (bind makes no state transition; listen makes CLOSE→LISTEN).
fn bind_then_listen(addr: SocketAddr) -> TcpListener {
    use std::os::fd::FromRawFd;
    let (family, storage, len) = sockaddr(addr);
    // SAFETY: plain socket syscalls on a descriptor we own; storage holds a
    // valid sockaddr of `len` bytes.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::bind(fd, &storage as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        let listener = TcpListener::from_raw_fd(fd);
        println!("PEER port {}", listener.local_addr().unwrap().port());
        gate("listen");
        let rc = libc::listen(fd, 128);
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        println!("PEER listening");
        listener
    }
}

pub fn sockaddr(addr: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            (
                libc::AF_INET,
                storage,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (
                libc::AF_INET6,
                storage,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

fn peer_server() {
    let bind: SocketAddr = env_or("TCPWATCH_PEER_BIND", "127.0.0.1:0").parse().unwrap();
    let n: usize = env_or("TCPWATCH_PEER_ACCEPT", "1").parse().unwrap();
    let delay = Duration::from_millis(env_or("TCPWATCH_PEER_DELAY_MS", "0").parse().unwrap());
    let listener = bind_then_listen(bind);
    for _ in 0..n {
        let (mut s, remote) = listener.accept().unwrap();
        println!("PEER accepted {}", remote.port());
        let mut sink = Vec::new();
        s.read_to_end(&mut sink).unwrap();
        println!("PEER eof {}", sink.len());
        std::thread::sleep(delay);
        drop(s);
        println!("PEER closed {}", remote.port());
    }
    drop(listener);
}

fn peer_client() {
    let targets: Vec<SocketAddr> = env_or("TCPWATCH_PEER_CONNECT", "")
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect();
    gate("connect");
    let mut held = Vec::new();
    for t in targets {
        let mut s = TcpStream::connect(t).unwrap_or_else(|e| panic!("connect {t}: {e}"));
        println!("PEER local {}", s.local_addr().unwrap().port());
        s.write_all(b"hello from a tcpwatch test peer\n").unwrap();
        held.push(s);
        if !env_or("TCPWATCH_PEER_GATES", "").contains("close") {
            drop(held.pop());
        }
    }
    println!("PEER connected");
    gate("close");
    // Closing first makes the client the active closer (FIN_WAIT1 side).
    drop(held);
    println!("PEER closed");
}
