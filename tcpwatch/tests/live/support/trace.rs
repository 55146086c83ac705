//! `tcpwatch trace --format json`: a runner, its JSON line, socket
//! lifetimes cut from the lines, the kernel's state names, and bpftrace as
//! an independent oracle.

use std::collections::HashMap;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::summary::{trace_summary, Lost, TraceSummary};
use super::{own_netns, read_json, tcpwatch_bin, Proc, START_TIMEOUT, STOP_TIMEOUT};

/// The line `trace` prints on stderr once its probe is attached.
pub const READY_LINE: &str = "tcpwatch: tracing TCP state transitions; Ctrl-C to stop";

/// One JSON line of `tcpwatch trace --format json`. (tcpwatch writes it from
/// a private struct of borrowed fields, which cannot be read back: this is
/// its owned twin, and [`JSON_FIELDS`] checks none is missing.)
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

/// A reset or retransmission line of `trace --format json` (transition
/// lines have no `event`).
#[derive(Clone, Debug, Deserialize)]
pub struct EventLine {
    pub skaddr: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub family: String,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    /// `reset_sent`, `reset_received` or `retransmit`.
    pub event: String,
    /// A reset sent: the sender's state (none: no socket) and the kernel's
    /// reason, by name and in words.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub reset_reason: Option<String>,
    #[serde(default)]
    pub reset_words: Option<String>,
    pub delta_ms: Option<f64>,
    pub netns: Option<u32>,
}

pub const EVENT_JSON_FIELDS: [&str; 14] = [
    "ts",
    "ts_mono_ns",
    "skaddr",
    "pid",
    "comm",
    "family",
    "saddr",
    "sport",
    "daddr",
    "dport",
    "event",
    "delta_ms",
    "netns",
    "cpu",
];

impl EventLine {
    /// A line of either kind: `None` for a transition.
    pub fn parse(text: &str) -> Option<EventLine> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        v.get("event")?;
        Some(read_json(text, &EVENT_JSON_FIELDS).0)
    }
}

/// Whether a `trace --format json` line is a transition's.
pub fn is_transition_line(text: &str) -> bool {
    EventLine::parse(text).is_none()
}

impl Line {
    pub fn parse(text: &str) -> Line {
        read_json(text, &JSON_FIELDS).0
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

/// A finished `tcpwatch trace --format json` run.
#[derive(Debug)]
pub struct TraceRun {
    /// The transition lines.
    pub lines: Vec<Line>,
    /// The reset and retransmission lines.
    pub events: Vec<EventLine>,
    /// stdout as printed, line by line.
    pub raw: Vec<String>,
    pub stderr: Vec<String>,
    pub summary: TraceSummary,
    pub lost: Lost,
}

impl TraceRun {
    /// Fails unless tcpwatch kept every event: the checks that follow
    /// compare exact sets, which a lost event would make meaningless.
    pub fn assert_nothing_lost(&self, name: &str) {
        assert!(
            self.lost.total == 0,
            "{name}: tcpwatch lost {} of {} events (other traffic on this host filled the ring?); \
             stderr: {:?}",
            self.lost.total,
            self.summary.transitions_seen + self.lost.total,
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

    /// Like [`Tcpwatch::start`], with the classic tracepoints forced (as on
    /// a kernel whose BTF tracepoints cannot load); waits for tcpwatch to
    /// say so.
    pub fn start_classic(name: &str, extra: &[&str]) -> Tcpwatch {
        let mut cmd = Command::new(tcpwatch_bin());
        cmd.args(["trace", "--format", "json"])
            .args(extra)
            .env("TCPWATCH_CLASSIC_TRACEPOINTS", "1");
        let tw = Tcpwatch {
            proc: Proc::spawn(&format!("tcpwatch {name} (classic) {extra:?}"), cmd, false),
        };
        tw.proc.wait_stderr(
            |l| {
                l.contains("sock:inet_sock_set_state")
                    && l.contains("attached as classic tracepoints")
                    && l.contains("TCPWATCH_CLASSIC_TRACEPOINTS is set")
            },
            1,
            START_TIMEOUT,
        );
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

    /// SIGINT, then everything it printed. Checks a clean exit, that the
    /// summary's "shown" matches the lines printed and that its lost events
    /// add up.
    pub fn stop(self) -> TraceRun {
        let name = self.proc.name.clone();
        let f = self.proc.interrupt(STOP_TIMEOUT);
        let events: Vec<EventLine> = f
            .stdout
            .iter()
            .filter_map(|l| EventLine::parse(l))
            .collect();
        let lines: Vec<Line> = f
            .stdout
            .iter()
            .filter(|l| is_transition_line(l))
            .map(|l| Line::parse(l))
            .collect();
        let summary = trace_summary(&f.stderr);
        assert_eq!(
            summary.shown,
            lines.len() as u64,
            "{name}: summary's shown count differs from the transition lines printed"
        );
        assert_eq!(
            summary.events_shown,
            events.len() as u64,
            "{name}: summary's events_shown differs from the reset and retransmission lines printed"
        );
        assert_eq!(summary.stream.undecodable, 0, "{name}: {:?}", f.stderr);
        TraceRun {
            lines,
            events,
            raw: f.stdout,
            stderr: f.stderr,
            lost: summary.stream.lost,
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
            if bt.proc.try_wait_stdout(
                |l: &str| l.starts_with("T ") && l.contains(&needle),
                Duration::from_millis(200),
            ) {
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
        let f = self.proc.interrupt(STOP_TIMEOUT);
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

/// One reset bpftrace saw sent: (sport, dport, state, reason), from the
/// sender's side, as `tcp:tcp_send_reset`'s own fields hold them.
pub type BtReset = (u16, u16, u32, u32);

/// bpftrace printing every `tcp:tcp_send_reset` with its `state` and
/// `reason` (the oracle for tcpwatch's reset reasons; ports from the
/// record's sockaddrs).
pub struct ResetOracle {
    proc: Proc,
}

impl ResetOracle {
    /// Starts bpftrace and returns once it has seen a reset the test
    /// caused (a connect to a closed port), so it is attached.
    pub fn start() -> ResetOracle {
        let prog = "tracepoint:tcp:tcp_send_reset { printf(\"R %d %d %d %d %d\\n\", \
                    args->saddr[0], (args->saddr[2] << 8) | args->saddr[3], \
                    (args->daddr[2] << 8) | args->daddr[3], args->state, args->reason); }";
        let mut cmd = Command::new(BPFTRACE);
        cmd.args(["-B", "line", "-e", prog]);
        let proc = Proc::spawn("bpftrace", cmd, false);
        proc.wait_stdout(|l| l.starts_with("Attaching"), 1, START_TIMEOUT);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let closed = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = closed.local_addr().unwrap().port();
            drop(closed);
            let _ = TcpStream::connect(("127.0.0.1", port));
            let needle = format!(" {port} ");
            if proc.try_wait_stdout(
                |l: &str| l.starts_with("R ") && l.contains(&needle),
                Duration::from_millis(300),
            ) {
                return ResetOracle { proc };
            }
            assert!(
                Instant::now() < deadline,
                "bpftrace never reported a reset\n{}",
                proc.describe()
            );
        }
    }

    /// SIGINT, then the resets sent from or to one of `ports`.
    pub fn stop(self, ports: &[u16]) -> Vec<BtReset> {
        let f = self.proc.interrupt(STOP_TIMEOUT);
        f.stdout
            .iter()
            .filter_map(|l| l.strip_prefix("R "))
            .map(|l| {
                let f: Vec<u32> = l.split_whitespace().map(|n| n.parse().unwrap()).collect();
                assert_eq!(f.len(), 5, "bpftrace line: {l}");
                (f[1] as u16, f[2] as u16, f[3], f[4])
            })
            .filter(|r| ports.contains(&r.0) || ports.contains(&r.1))
            .collect()
    }
}
