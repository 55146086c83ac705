//! Helpers for the `conns`, `ladder`, `record` and `replay` tests:
//! - a runner for tcpwatch whose output goes to files read incrementally;
//! - the `conns --format json` record, read into the library's own
//!   `ConnRecord`, with the checks every record must pass;
//! - ladder blocks, a tcpdump capture counting teardown segments, and
//!   recordings: an unprivileged `replay` and an independent parse of the
//!   file layout.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Deref;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tcpwatch::views::conns::ConnRecord;

use super::netns::Netns;
use super::peer::{Link, Peer};
use super::summary::conns_summary;
use super::{is_ready, parse_ts, read_json, tcpwatch_bin, Finished, Proc, Scratch};
use super::{START_TIMEOUT, STOP_TIMEOUT};

/// Longest the test waits for tcpwatch to print a connection it caused.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// tcpwatch runners

/// Whether `pid` has a handler installed for SIGINT (/proc/PID/status).
fn catches_sigint(pid: u32) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGINT - 1)) != 0)
}

/// A running tcpwatch (killed if dropped). Its stdout and stderr go to
/// files that are read incrementally, so that a busy host printing many
/// other connections costs the waits nothing.
pub struct Tw {
    child: Option<Child>,
    pub name: String,
    dir: Scratch,
    /// Complete stdout lines read so far, and the byte offset after them.
    lines: Vec<String>,
    offset: u64,
}

impl Tw {
    /// Starts `tcpwatch ARGS` without waiting for it to attach.
    pub fn spawn(args: &[&str]) -> Tw {
        Tw::spawn_in(None, args)
    }

    /// Like [`Tw::spawn`], inside network namespace `netns` when given
    /// (`ip netns exec` execs in place: the pid is tcpwatch's).
    pub fn spawn_in(netns: Option<&Netns>, args: &[&str]) -> Tw {
        Tw::spawn_with(netns, args, &[])
    }

    /// Like [`Tw::spawn`], with these environment variables set.
    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Tw {
        Tw::spawn_with(None, args, env)
    }

    fn spawn_with(netns: Option<&Netns>, args: &[&str], env: &[(&str, &str)]) -> Tw {
        let dir = Scratch::new("tw");
        let out = fs::File::create(dir.join("stdout")).unwrap();
        let err = fs::File::create(dir.join("stderr")).unwrap();
        let name = format!("tcpwatch {}", args.join(" "));
        let mut cmd = match netns {
            Some(ns) => ns.command(tcpwatch_bin()),
            None => Command::new(tcpwatch_bin()),
        };
        let child = cmd
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Tw {
            child: Some(child),
            name,
            dir,
            lines: Vec::new(),
            offset: 0,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn stderr(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("stderr"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Reads the complete stdout lines printed since the last call.
    fn read_new(&mut self) {
        let mut f = fs::File::open(self.dir.join("stdout")).unwrap();
        f.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        self.offset += end as u64 + 1;
        let text = String::from_utf8_lossy(&buf[..end]);
        self.lines.extend(text.split('\n').map(String::from));
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Waits until it says it is tracing. By then it must handle SIGINT:
    /// scripts (and these tests) stop it with SIGINT as soon as it says
    /// so, and an earlier build that announced first died of that signal.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.stderr().iter().any(|l| is_ready(l)) {
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before tracing:\n{}",
                    self.name,
                    self.stderr().join("\n")
                );
            }
            assert!(Instant::now() < deadline, "{} never started", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            catches_sigint(self.pid()),
            "{} said it was tracing before it could handle SIGINT",
            self.name
        );
    }

    pub fn start(args: &[&str]) -> Tw {
        let mut tw = Tw::spawn(args);
        tw.wait_ready();
        tw
    }

    /// `tcpwatch conns --format json`, attached.
    pub fn conns() -> Tw {
        Tw::start(&["conns", "--format", "json"])
    }

    /// Waits until `n` stdout lines satisfy `pred`. On timeout, stops
    /// tcpwatch and fails with its stderr and the lines `related` picks.
    pub fn wait_lines(
        &mut self,
        pred: impl Fn(&str) -> bool,
        n: usize,
        related: impl Fn(&str) -> bool,
    ) {
        let deadline = Instant::now() + CONN_TIMEOUT;
        let mut scanned = 0;
        let mut hits = 0;
        loop {
            self.read_new();
            hits += self.lines[scanned..].iter().filter(|l| pred(l)).count();
            scanned = self.lines.len();
            if hits >= n {
                return;
            }
            let status = self.exited();
            if status.is_some() || Instant::now() > deadline {
                let why = match status {
                    Some(s) => format!("exited ({s})"),
                    None => format!("timed out after {CONN_TIMEOUT:?}"),
                };
                if let Some(c) = self.child.as_ref() {
                    // SAFETY: kill(2) on our own unreaped child.
                    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
                }
                let _ = self.child.as_mut().unwrap().wait();
                self.read_new();
                let related: Vec<&String> = self.lines.iter().filter(|l| related(l)).collect();
                panic!(
                    "{}: waiting for {n} lines, saw {hits}: {why}\nstderr:\n{}\nrelated stdout ({} lines in all):\n{}",
                    self.name,
                    self.stderr().join("\n"),
                    self.lines.len(),
                    related
                        .iter()
                        .map(|l| l.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the records with these (local port, remote port) have
    /// all been printed.
    pub fn wait_conns(&mut self, keys: &[(u16, u16)]) {
        let needles: Vec<(String, String)> = keys
            .iter()
            .map(|(l, r)| (format!("\"sport\":{l},"), format!("\"dport\":{r},")))
            .collect();
        let ports: Vec<String> = keys
            .iter()
            .flat_map(|(l, r)| [l, r])
            .flat_map(|p| [format!("\"sport\":{p},"), format!("\"dport\":{p},")])
            .collect();
        self.wait_lines(
            |l| needles.iter().any(|(a, b)| l.contains(a) && l.contains(b)),
            keys.len(),
            |l| ports.iter().any(|p| l.contains(p)),
        );
    }

    /// SIGINT; checks it exited cleanly and returns what it printed.
    pub fn stop(mut self) -> Finished {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within {STOP_TIMEOUT:?}:\n{}",
                    self.name,
                    self.stderr().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.read_new();
        let stderr = self.stderr();
        assert!(
            status.success(),
            "{} exited with {status}\nstderr:\n{}",
            self.name,
            stderr.join("\n")
        );
        assert!(
            !stderr.iter().any(|l| l.contains("panicked")),
            "{} panicked:\n{}",
            self.name,
            stderr.join("\n")
        );
        Finished {
            status,
            stdout: std::mem::take(&mut self.lines),
            stderr,
        }
    }

    /// Stops a `conns --format json` run: every line must be a complete
    /// record, and the summary must count them, with nothing lost.
    pub fn stop_conns(self) -> Vec<Conn> {
        self.stop_conns_and_stderr().0
    }

    /// Like [`Tw::stop_conns`], with what it said on stderr.
    pub fn stop_conns_and_stderr(self) -> (Vec<Conn>, Vec<String>) {
        let f = self.stop();
        let conns: Vec<Conn> = f.stdout.iter().map(|l| Conn::parse(l)).collect();
        check_summary(&f.stderr, conns.len());
        (conns, f.stderr)
    }
}

impl Drop for Tw {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Checks the exit summary of `conns`/`replay conns` (run with `--format
/// json`): "shown" equals the records printed and nothing was undecodable.
/// Returns the lost-event count; lost events are not a failure by
/// themselves (another busy process can fill the ring), but they are
/// announced, since they can make the timelines checked afterwards
/// incomplete.
pub fn check_summary(stderr: &[String], printed: usize) -> u64 {
    let s = conns_summary(stderr);
    assert_eq!(s.shown, printed as u64, "shown ≠ records printed: {s:?}");
    assert_eq!(s.stream.undecodable, 0, "{s:?}");
    let lost = s.stream.lost.total;
    if lost > 0 {
        println!(
            "note: {lost} events were lost (busy host), the checks below may see incomplete \
             timelines: {s:?}"
        );
    }
    lost
}

// ---------------------------------------------------------------------------
// conns records

/// Every field of a `conns --format json` record.
pub const CONN_FIELDS: [&str; 36] = [
    "ts",
    "start_ts",
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
    "netns",
    "role",
    "open",
    "before_trace",
    "handshake_ms",
    "lifetime_ms",
    "close",
    "closed_by",
    "teardown_segments",
    "timewait",
    "error",
    "errno",
    "connect_failure",
    "connect_errno",
    "syn_retransmits_ms",
    "bytes_sent",
    "bytes_received",
    "srtt_us",
    "retransmits",
    "total_retrans",
    "resets_sent",
    "resets_received",
    "reset_reason",
    "transitions",
];

/// One `conns --format json` record: the library's `ConnRecord` (its
/// fields through `Deref`), and the JSON object it was read from, for
/// checks against exact JSON values (`null` included).
#[derive(Clone, Debug, PartialEq)]
pub struct Conn {
    pub line: String,
    pub v: Map<String, Value>,
    pub rec: ConnRecord,
}

impl Deref for Conn {
    type Target = ConnRecord;

    fn deref(&self) -> &ConnRecord {
        &self.rec
    }
}

impl Conn {
    /// Parses a line, checking it has every field and no other.
    pub fn parse(line: &str) -> Conn {
        let (rec, v) = read_json(line, &CONN_FIELDS);
        assert_eq!(v.len(), CONN_FIELDS.len(), "unexpected fields: {line}");
        Conn {
            line: line.to_string(),
            v,
            rec,
        }
    }

    pub fn get(&self, k: &str) -> &Value {
        &self.v[k]
    }

    pub fn transitions(&self) -> Vec<(&str, &str)> {
        self.rec
            .transitions
            .iter()
            .map(|t| (t.old.as_str(), t.new.as_str()))
            .collect()
    }

    /// Checks fields against exact JSON values.
    pub fn expect(&self, what: &str, checks: &[(&str, Value)]) {
        for (k, want) in checks {
            assert_eq!(
                &self.v[*k], want,
                "{what}: field {k}\nrecord: {}",
                self.line
            );
        }
    }

    pub fn expect_transitions(&self, what: &str, want: &[(&str, &str)]) {
        assert_eq!(
            self.transitions(),
            want,
            "{what}: transitions\nrecord: {}",
            self.line
        );
    }

    /// The owner is this peer, seen in process context (or inherited from
    /// the listener that accepted it).
    pub fn expect_owner(&self, what: &str, peer: &Peer, source: &str) {
        self.expect(
            what,
            &[
                ("pid", peer.pid.into()),
                ("comm", peer.comm.as_str().into()),
                ("owner_source", source.into()),
            ],
        );
    }

    /// Checks what every finished record must get right: timestamps and
    /// durations that agree with each other and with the transitions, an
    /// errno and its name that agree, a timewait deadline `hold_s` after
    /// the close.
    pub fn check_shape(&self) {
        let line = &self.line;
        let ts = parse_ts(&self.ts);
        let start = parse_ts(&self.start_ts);
        assert!(start <= ts, "start_ts after ts: {line}");
        assert!(
            ((ts - start) as f64 / 1e6 - self.lifetime_ms).abs() < 1e-5,
            "lifetime_ms ≠ ts − start_ts: {line}"
        );
        assert!(self.skaddr.starts_with("0x"), "skaddr: {line}");
        let tr = &self.rec.transitions;
        assert!(!tr.is_empty(), "no transitions: {line}");
        let mut prev = 0.0;
        for t in tr {
            assert!(
                ((parse_ts(&t.ts) - start) as f64 / 1e6 - t.t_ms).abs() < 1e-5,
                "t_ms disagrees with ts: {t:?} in {line}"
            );
            assert!(t.t_ms >= prev, "transitions out of order: {line}");
            prev = t.t_ms;
        }
        if self.before_trace {
            // Open before tracing: start_ts is when tracing began, which
            // the first transition seen can only follow.
            assert!(
                parse_ts(&tr[0].ts) >= start,
                "first transition before start_ts: {line}"
            );
        } else {
            assert_eq!(tr[0].ts, self.start_ts, "first transition: {line}");
        }
        // tcpwatch keeps later transitions to the microsecond (from the
        // first), the close itself to the nanosecond.
        let last = &tr[tr.len() - 1];
        let last_ts = parse_ts(&last.ts);
        assert!(
            last_ts <= ts && ts - last_ts < 1000,
            "last transition is not the close: {line}"
        );
        assert_eq!(last.new, "CLOSE", "not closed: {line}");
        match (self.errno, self.error.as_deref()) {
            (None, None) => {}
            (Some(n), Some(name)) => {
                let known = match n {
                    104 => Some("ECONNRESET"),
                    110 => Some("ETIMEDOUT"),
                    111 => Some("ECONNREFUSED"),
                    _ => None,
                };
                if let Some(k) = known {
                    assert_eq!(name, k, "error name of errno {n}: {line}");
                }
            }
            _ => panic!("error and errno disagree: {line}"),
        }
        if let Some(tw) = &self.timewait {
            let until = parse_ts(&tw.until);
            assert_eq!(
                until - ts,
                (tw.hold_s * 1e9) as i128,
                "timewait.until: {line}"
            );
        }
        if let Some(h) = self.handshake_ms {
            assert!(h > 0.0 && h < 1000.0, "handshake_ms: {line}");
        }
    }

    /// The timewait socket left behind, without its `until` (checked by
    /// `check_shape`): (substate, hold_s).
    pub fn timewait_left(&self) -> Option<(&str, f64)> {
        self.timewait.as_ref().map(|t| (t.state.as_str(), t.hold_s))
    }
}

/// The record without what depends on when a program read the clock
/// (its timestamps and durations); the transitions keep their states.
pub fn timeless(rec: &ConnRecord) -> ConnRecord {
    let mut r = rec.clone();
    r.ts.clear();
    r.start_ts.clear();
    r.handshake_ms = None;
    r.lifetime_ms = 0.0;
    if let Some(tw) = &mut r.timewait {
        tw.until.clear();
    }
    for t in &mut r.transitions {
        t.ts.clear();
        t.t_ms = 0.0;
    }
    r
}

/// The one record with this local and remote port.
pub fn find(conns: &[Conn], key: (u16, u16)) -> &Conn {
    let hits: Vec<&Conn> = conns.iter().filter(|c| (c.sport, c.dport) == key).collect();
    assert_eq!(
        hits.len(),
        1,
        "records with local port {} and remote port {}: {hits:#?}\nall records:\n{}",
        key.0,
        key.1,
        conns
            .iter()
            .map(|c| c.line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    hits[0]
}

/// What tcpwatch reports as `bytes_sent` / `bytes_received` for `data`
/// application bytes: exactly that (it takes the SYN and FINs out of the
/// kernel's sequence-space counters, `tcp_sock.bytes_acked` and
/// `bytes_received`).
pub fn seq_bytes(data: u64, _syn: bool, _fin: bool) -> u64 {
    data
}

pub fn fin_timeout_s() -> f64 {
    fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------
// ladder

/// One connection drawn by `tcpwatch ladder`: its header line and the rest.
#[derive(Clone, Debug)]
pub struct LadderBlock {
    pub header: String,
    pub body: Vec<String>,
}

impl LadderBlock {
    pub fn text(&self) -> String {
        format!("{}\n{}", self.header, self.body.join("\n"))
    }
}

/// Splits ladder output into blocks (each ends with an empty line).
pub fn ladder_blocks(stdout: &[String]) -> Vec<LadderBlock> {
    let mut blocks: Vec<LadderBlock> = Vec::new();
    let mut open = false;
    for l in stdout {
        if l.is_empty() {
            open = false;
        } else if !open {
            blocks.push(LadderBlock {
                header: l.clone(),
                body: Vec::new(),
            });
            open = true;
        } else {
            blocks.last_mut().unwrap().body.push(l.clone());
        }
    }
    blocks
}

/// The header a paired ladder starts with: the client on the left.
pub fn ladder_header_prefix(link: &Link) -> String {
    format!("{} <-> {}   ", link.client, link.server)
}

// ---------------------------------------------------------------------------
// tcpdump

/// One captured TCP segment.
#[derive(Clone, Debug)]
pub struct Segment {
    pub sport: u16,
    pub dport: u16,
    /// tcpdump's flags: "S", "S.", ".", "P.", "F.", "R." ...
    pub flags: String,
    pub len: u32,
    pub line: String,
}

/// `tcpdump -l` on an interface, parsed on stop.
pub struct Capture {
    proc: Proc,
}

fn port_of(endpoint: &str) -> Option<u16> {
    endpoint
        .trim_end_matches(':')
        .rsplit('.')
        .next()?
        .parse()
        .ok()
}

impl Capture {
    /// Starts tcpdump and returns once it is capturing.
    pub fn start(iface: &str, filter: &str) -> Capture {
        Capture::start_in(None, iface, filter)
    }

    /// Like [`Capture::start`], on an interface of network namespace
    /// `netns` when given.
    pub fn start_in(netns: Option<&Netns>, iface: &str, filter: &str) -> Capture {
        let mut cmd = match netns {
            Some(ns) => ns.command("tcpdump"),
            None => Command::new("tcpdump"),
        };
        // Headers are all it needs: whole 64 KiB loopback segments would
        // fill its buffer and be dropped.
        cmd.args(["-i", iface, "-s", "128", "-B", "16384"]).args([
            "-nn",
            "-l",
            "--immediate-mode",
            filter,
        ]);
        let proc = Proc::spawn("tcpdump", cmd, false);
        proc.wait_stderr(|l| l.contains("listening on"), 1, START_TIMEOUT);
        Capture { proc }
    }

    /// Waits until nothing new was printed for a moment, stops tcpdump and
    /// returns the segments.
    pub fn stop(self) -> Vec<Segment> {
        let count = || self.proc.wait_stdout(|_| true, 0, Duration::ZERO).len();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = count();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = count();
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        let f = self.proc.interrupt(STOP_TIMEOUT);
        // A capture that missed segments cannot be compared with.
        let dropped = f
            .stderr
            .iter()
            .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
            .and_then(|n| n.trim().parse::<u64>().ok());
        assert_eq!(dropped, Some(0), "tcpdump: {}", f.stderr.join("\n"));
        f.stdout.iter().filter_map(|l| Segment::parse(l)).collect()
    }
}

impl Segment {
    /// One line of `tcpdump -nn`; `None` for a line that is not a TCP
    /// segment.
    fn parse(l: &str) -> Option<Segment> {
        let t: Vec<&str> = l.split_whitespace().collect();
        if t.len() < 7 || !t[1].starts_with("IP") || t[5] != "Flags" {
            return None;
        }
        let len = l.rsplit_once("length ")?.1;
        let len: String = len.chars().take_while(char::is_ascii_digit).collect();
        Some(Segment {
            sport: port_of(t[2])?,
            dport: port_of(t[4])?,
            flags: t[6]
                .trim_matches(|c| c == '[' || c == ']' || c == ',')
                .to_string(),
            len: len.parse().ok()?,
            line: l.to_string(),
        })
    }
}

/// Counts the teardown segments of the connection between ports `a` and
/// `b`: from the first segment carrying a FIN, every segment carrying a FIN
/// and every pure ACK (a FIN that also acknowledges the other FIN counts
/// once). Returns the count and the segments counted.
pub fn teardown_in_capture(segs: &[Segment], a: u16, b: u16) -> (usize, Vec<String>) {
    let conn: Vec<&Segment> = segs
        .iter()
        .filter(|s| (s.sport, s.dport) == (a, b) || (s.sport, s.dport) == (b, a))
        .collect();
    let Some(first) = conn.iter().position(|s| s.flags.contains('F')) else {
        return (0, Vec::new());
    };
    // What acknowledges each side's FIN: one past the FIN's sequence
    // number (past its data's end when it carries data), by sender port.
    let fin_acked_by: std::collections::HashMap<u16, u64> = conn[first..]
        .iter()
        .filter(|s| s.flags.contains('F'))
        .filter_map(|s| {
            let seq = seq_and_ack(&s.line).0?;
            let end = seq.rsplit(':').next()?.parse::<u64>().ok()?;
            Some((s.sport, end + 1))
        })
        .collect();
    // A pure ACK counts when it acknowledges the other side's FIN (a late
    // ACK of data only, sent after the FIN went out, is no teardown
    // segment); a segment sent again (a FIN retransmitted because its ACK
    // did not come in time: same direction, flags, sequence and
    // acknowledgment numbers) counts once.
    let acks_a_fin = |s: &Segment| {
        let ack = seq_and_ack(&s.line).1.and_then(|a| a.parse::<u64>().ok());
        ack.is_some() && ack == fin_acked_by.get(&s.dport).copied()
    };
    let mut sent = std::collections::HashSet::new();
    let counted: Vec<String> = conn[first..]
        .iter()
        .filter(|s| s.flags.contains('F') || (s.flags == "." && s.len == 0 && acks_a_fin(s)))
        .filter(|s| sent.insert((s.sport, s.flags.clone(), seq_and_ack(&s.line))))
        .map(|s| s.line.clone())
        .collect();
    (counted.len(), counted)
}

/// The `seq …` and `ack …` fields of a tcpdump line, as written.
fn seq_and_ack(line: &str) -> (Option<&str>, Option<&str>) {
    let field = |name: &str| {
        line.split(", ")
            .find_map(|f| f.strip_prefix(name))
            .map(|v| v.trim_end_matches(','))
    };
    (field("seq "), field("ack "))
}

// ---------------------------------------------------------------------------
// Recordings

/// What `tcpwatch replay` printed, run as an unprivileged user.
pub struct ReplayRun {
    pub code: Option<i32>,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

pub const NOBODY: &str = "65534";

/// `tcpwatch replay FILE ARGS` as uid/gid 65534 with no groups.
pub fn replay_as_nobody(file: &Path, args: &[&str]) -> ReplayRun {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        tcpwatch_bin(),
        "replay",
    ])
    .arg(file)
    .args(args);
    let proc = Proc::spawn("tcpwatch replay (uid 65534)", cmd, false);
    // A recording made on a busy host can hold millions of events.
    let f = proc.finish(Duration::from_secs(180));
    assert!(
        !f.stderr.iter().any(|l| l.contains("panicked")),
        "replay panicked:\n{}",
        f.stderr.join("\n")
    );
    ReplayRun {
        code: f.status.code(),
        stdout: f.stdout,
        stderr: f.stderr,
    }
}

/// A recording's layout, parsed here from its bytes and not with
/// tcpwatch's reader, so that the offsets tcpwatch reports are checked
/// independently: the header's snapshot length, then each whole record's
/// (byte offset, sport, dport), and the bytes of a last partial one. A
/// record is the 144-byte event and its CRC-32 (format version 2).
#[derive(Debug)]
pub struct RawRecording {
    pub len: usize,
    pub snapshot_len: usize,
    pub records: Vec<(usize, u16, u16)>,
    pub partial: usize,
}

pub const HEADER_LEN: usize = 40;
pub const EVENT_SIZE: usize = 144;
/// The event and its checksum.
pub const RECORD_SIZE: usize = EVENT_SIZE + 4;

impl RawRecording {
    pub fn read(path: &Path) -> RawRecording {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            bytes.len() >= HEADER_LEN && bytes.starts_with(b"TCPWATCH"),
            "{} has no header ({} bytes)",
            path.display(),
            bytes.len()
        );
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        assert_eq!(u32_at(12) as usize, EVENT_SIZE, "event size in the header");
        assert_eq!(
            u16::from_le_bytes([bytes[8], bytes[9]]),
            2,
            "format version"
        );
        let snapshot_len = u32_at(28) as usize;
        let start = HEADER_LEN + snapshot_len;
        let partial = (bytes.len() - start) % RECORD_SIZE;
        // struct Event (tcpwatch-common): sport at 128, dport at 130.
        let records = (start..bytes.len() - partial)
            .step_by(RECORD_SIZE)
            .map(|off| {
                let u16_at = |i: usize| u16::from_le_bytes([bytes[off + i], bytes[off + i + 1]]);
                (off, u16_at(128), u16_at(130))
            })
            .collect();
        RawRecording {
            len: bytes.len(),
            snapshot_len,
            records,
            partial,
        }
    }
}

/// A FIN sent twice (its ACK was lost in the server's hand-off to its
/// timewait socket; seen in a CI run) is one teardown segment.
#[test]
fn a_retransmitted_fin_is_counted_once() {
    let lines = [
        "09:26:54.524701 IP 10.231.8.1.8080 > 10.231.8.2.56182: Flags [F.], seq 20237, ack 93, win 64, options [nop,nop,TS val 2042344185 ecr 1695979084], length 0",
        "09:26:54.524708 IP 10.231.8.2.56182 > 10.231.8.1.8080: Flags [.], ack 20238, win 97, options [nop,nop,TS val 1695979084 ecr 2042344185], length 0",
        "09:26:54.524715 IP 10.231.8.2.56182 > 10.231.8.1.8080: Flags [F.], seq 93, ack 20238, win 97, options [nop,nop,TS val 1695979084 ecr 2042344185], length 0",
        "09:26:54.731271 IP 10.231.8.2.56182 > 10.231.8.1.8080: Flags [F.], seq 93, ack 20238, win 97, options [nop,nop,TS val 1695979291 ecr 2042344185], length 0",
        "09:26:54.731306 IP 10.231.8.1.8080 > 10.231.8.2.56182: Flags [.], ack 94, win 64, options [nop,nop,TS val 2042344392 ecr 1695979291], length 0",
    ];
    let segs: Vec<Segment> = lines.iter().filter_map(|l| Segment::parse(l)).collect();
    assert_eq!(segs.len(), 5);
    let (n, counted) = teardown_in_capture(&segs, 8080, 56182);
    assert_eq!(n, 4, "{counted:#?}");
    assert_eq!(counted.iter().filter(|l| l.contains("[F")).count(), 2);
    assert!(!counted.contains(&lines[3].to_string()));
    // A late ACK of data only, sent after the server's FIN went out (seen
    // in another CI run), is no teardown segment.
    let late = "10:00:26.178859 IP 10.231.8.2.56182 > 10.231.8.1.8080: Flags [.], ack 20237, win 97, options [nop,nop,TS val 1326421334 ecr 3098422953], length 0";
    let mut with_late: Vec<Segment> = segs
        .iter()
        .map(|s| Segment::parse(&s.line).unwrap())
        .collect();
    with_late.insert(1, Segment::parse(late).unwrap());
    let (n, counted) = teardown_in_capture(&with_late, 8080, 56182);
    assert_eq!(n, 4, "{counted:#?}");
    assert!(!counted.contains(&late.to_string()));
    // Without the repeat, the same four.
    let once: Vec<Segment> = segs
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(teardown_in_capture(&once, 8080, 56182).0, 4);
}
