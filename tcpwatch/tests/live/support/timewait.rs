//! Harness for the live `tcpwatch timewait` tests: a private network
//! namespace per test, tcpwatch and "peer" processes run inside it with
//! `ip netns exec`, the kernel's own view of the namespace (`ss`,
//! `/proc/net/sockstat`) read from a thread that entered it, the JSON
//! snapshot model with the invariants every snapshot must keep, and a
//! multi-threaded connection churn.
//!
//! Every address the tests use is in [`our_net`], a /16 of 127/8 of this
//! test process's own, and tcpwatch is run with `--laddr` it: tcpwatch
//! traces every namespace on the host, and sockets of other namespaces
//! (other tests' loopback traffic, or another run of these tests in its own
//! namespaces) would otherwise be added to its totals as `other_netns`.

use std::fs;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::support::{self as common, ExitSummary, Proc};

/// The second octet of this run's addresses: from the test process's pid
/// (peers are told it), so that two runs on one host keep apart; never 0,
/// the host's own 127.0.0.1.
pub fn our_octet() -> u8 {
    static OCTET: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *OCTET.get_or_init(|| match std::env::var(OCTET_ENV) {
        Ok(v) => v.parse().expect("octet"),
        Err(_) => 32 + (std::process::id() % 200) as u8,
    })
}

const OCTET_ENV: &str = "TCPWATCH_TW_OCTET";

/// The addresses the tests use (all of 127/8 is local on a namespace's lo).
pub fn our_net() -> String {
    format!("127.{}.0.0/16", our_octet())
}

/// The servers' address.
pub fn server_ip() -> Ipv4Addr {
    Ipv4Addr::new(127, our_octet(), 0, 1)
}

/// The peer clients' address.
pub fn client_ip() -> Ipv4Addr {
    Ipv4Addr::new(127, our_octet(), 0, 2)
}
/// The server port; below every client port, as ephemeral ports are.
pub const SERVER_PORT: u16 = 8080;
/// Clients bind ports from here up, one per connection, so no two
/// connections share a 4-tuple (a SYN on a server-side TIME_WAIT 4-tuple
/// would end that timewait socket early).
pub const CLIENT_BASE_PORT: u16 = 20000;

/// The process groups of sockets the kernel lists that tcpwatch has no
/// entry for: recent ones (events still on their way), and older ones.
pub const JUST_CLOSED_GROUP: &str = "(closed in the last moment, not yet correlated)";
pub const UNSEEN_GROUP: &str = "(not seen made: lost events)";

/// What tcpwatch timewait prints on stderr once its probe is attached.
pub const READY_LINE: &str =
    "tcpwatch: tracing TCP connections for TIME_WAIT accounting; Ctrl-C to stop";

pub fn server_addr() -> SocketAddrV4 {
    SocketAddrV4::new(server_ip(), SERVER_PORT)
}

// ---------------------------------------------------------------------------
// Network namespaces

/// A network namespace of its own, deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `tcpwatch-tw-<pid>-<n>` with lo up, no reuse of TIME_WAIT 4-tuples by
    /// connect() and RFC 1337 on (a stray RST must not end a timewait
    /// socket early: the tests count them exactly).
    pub fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "tcpwatch-tw-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        // A leftover of a killed run that had the same pid.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
        ns.sysctl("net.ipv4.tcp_rfc1337", "1");
        ns
    }

    /// `ip netns exec NAME program`, for the caller to add arguments.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs a command inside the namespace; its stdout, or a panic.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]);
        run_ok(&mut cmd)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec_ok(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread that entered the namespace: its sockets, its
    /// /proc/thread-self/net and the processes it starts are the
    /// namespace's. No process start-up in between, so it is quick.
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&path);
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// What the kernel says right now: sockstat, then `ss`, then sockstat
    /// again (the two bracket the `ss` listing).
    pub fn kernel_now(&self) -> KernelNow {
        self.in_ns(|| {
            let started = Instant::now();
            let sockstat_before = sockstat_tw();
            let ss_time_wait = ss_count(&["state", "time-wait"]);
            // Orphaned full sockets in FIN_WAIT2 are listed too: only those
            // with a timewait timer are timewait sockets.
            let fin_wait2 = ss_lines(&["-o", "state", "fin-wait-2"]);
            let ss_fin_wait2 = fin_wait2
                .iter()
                .filter(|l| l.contains("timer:(timewait,"))
                .count() as u64;
            let sockstat_after = sockstat_tw();
            KernelNow {
                sockstat_before,
                ss_time_wait,
                ss_fin_wait2,
                ss_fin_wait2_full: fin_wait2.len() as u64 - ss_fin_wait2,
                sockstat_after,
                took: started.elapsed(),
            }
        })
    }

    /// sockstat alone (`ss` fields left 0): instant, so cheap while a
    /// churn runs.
    pub fn sockstat_now(&self) -> KernelNow {
        self.in_ns(|| {
            let started = Instant::now();
            let tw = sockstat_tw();
            KernelNow {
                sockstat_before: tw,
                ss_time_wait: 0,
                ss_fin_wait2: 0,
                ss_fin_wait2_full: 0,
                sockstat_after: tw,
                took: started.elapsed(),
            }
        })
    }

    /// Waits until every socket in the namespace is listening or a
    /// timewait socket, in either substate (every close the test caused
    /// has run its course).
    pub fn settle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let busy: Vec<String> = self.in_ns(|| {
                ss_lines(&["-o", "state", "connected", "exclude", "time-wait"])
                    .into_iter()
                    .filter(|l| !l.contains("timer:(timewait,"))
                    .collect()
            });
            if busy.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                let detail = self
                    .in_ns(|| ss_lines(&["-oie", "state", "connected", "exclude", "time-wait"]));
                panic!(
                    "{}: sockets still open after {timeout:?}:\n{}",
                    self.name,
                    detail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &str) {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on a descriptor we own; only this thread changes.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
}

/// `tw` of this thread's namespace's /proc/net/sockstat.
pub fn sockstat_tw() -> u64 {
    let text = fs::read_to_string("/proc/thread-self/net/sockstat").unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .unwrap_or_else(|| panic!("no TCP line in sockstat: {text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .chunks(2)
        .find(|p| p[0] == "tw")
        .and_then(|p| p.get(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tw in sockstat: {line}"))
}

/// A `TcpExt` counter of this thread's namespace's /proc/net/netstat.
pub fn tcp_ext(field: &str) -> Option<u64> {
    let text = fs::read_to_string("/proc/thread-self/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// `ss -tanH FILTER…` in this thread's namespace, line by line.
pub fn ss_lines(filter: &[&str]) -> Vec<String> {
    let out = Command::new("ss")
        .arg("-tanH")
        .args(filter)
        .stdin(Stdio::null())
        .output()
        .expect("run ss (iproute2)");
    assert!(
        out.status.success(),
        "ss {filter:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

pub fn ss_count(filter: &[&str]) -> u64 {
    ss_lines(filter).len() as u64
}

/// The kernel's figures read by the test.
#[derive(Clone, Copy, Debug)]
pub struct KernelNow {
    pub sockstat_before: u64,
    pub ss_time_wait: u64,
    /// Timewait sockets in their FIN_WAIT2 substate.
    pub ss_fin_wait2: u64,
    /// Full (orphaned) sockets in FIN_WAIT2: not timewait sockets.
    pub ss_fin_wait2_full: u64,
    pub sockstat_after: u64,
    /// How long the readings took.
    pub took: Duration,
}

// ---------------------------------------------------------------------------
// Snapshots

/// `kernel` of a snapshot.
#[derive(Clone, Debug, Deserialize)]
pub struct KernelFigures {
    pub sockstat_tw: Option<u64>,
    pub max_tw_buckets: Option<u64>,
    pub overflow_since_start: Option<u64>,
    pub overflow_last_interval: Option<u64>,
    pub port_range: Option<u32>,
    pub tw_reuse: Option<u8>,
    pub fin_timeout_s: Option<u32>,
    pub timestamps: Option<u8>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Group {
    pub key: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub count: u64,
    pub share: f64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Destination {
    pub remote: String,
    pub ports_held: u64,
    pub port_range: Option<u32>,
    pub rate_per_s: f64,
    pub exhaustion_s: Option<f64>,
    pub steady_state_ports: f64,
    pub tw_reuse_applies: bool,
}

/// One line of `tcpwatch timewait --format json`.
#[derive(Clone, Debug, Deserialize)]
pub struct Snap {
    pub ts: String,
    pub interval_s: f64,
    pub total: u64,
    pub time_wait: u64,
    pub fin_wait2: u64,
    pub before_tracing: u64,
    pub unattributed: u64,
    pub just_closed: u64,
    pub other_netns: u64,
    pub kernel_listed: Option<u64>,
    pub kernel: KernelFigures,
    pub created_last_interval: u64,
    pub rate_last_interval: f64,
    pub rate_last_minute: f64,
    pub by_process: Vec<Group>,
    pub by_remote: Vec<Group>,
    pub by_local: Vec<Group>,
    pub destinations: Vec<Destination>,
    pub findings: Vec<String>,
    pub untracked: u64,
}

pub const SNAPSHOT_FIELDS: [&str; 20] = [
    "ts",
    "interval_s",
    "total",
    "time_wait",
    "fin_wait2",
    "before_tracing",
    "unattributed",
    "just_closed",
    "other_netns",
    "kernel_listed",
    "kernel",
    "created_last_interval",
    "rate_last_interval",
    "rate_last_minute",
    "by_process",
    "by_remote",
    "by_local",
    "destinations",
    "findings",
    "untracked",
];

pub const KERNEL_FIELDS: [&str; 8] = [
    "sockstat_tw",
    "max_tw_buckets",
    "overflow_since_start",
    "overflow_last_interval",
    "port_range",
    "tw_reuse",
    "fin_timeout_s",
    "timestamps",
];

impl Snap {
    /// Parses a line, checking every documented field is there.
    pub fn parse(text: &str) -> Snap {
        let v: serde_json::Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {text}"));
        for f in SNAPSHOT_FIELDS {
            assert!(obj.contains_key(f), "field {f} missing: {text}");
        }
        for f in KERNEL_FIELDS {
            assert!(
                obj["kernel"].get(f).is_some(),
                "field kernel.{f} missing: {text}"
            );
        }
        serde_json::from_value(v).unwrap_or_else(|e| panic!("bad field ({e}): {text}"))
    }

    pub fn process(&self, pid: u32) -> Option<&Group> {
        self.by_process.iter().find(|g| g.pid == Some(pid))
    }

    /// Count of the group named `key` in `groups` (0 when absent).
    pub fn count_of(groups: &[Group], key: &str) -> u64 {
        groups
            .iter()
            .filter(|g| g.key == key)
            .map(|g| g.count)
            .sum()
    }

    pub fn process_sum(&self) -> u64 {
        self.by_process.iter().map(|g| g.count).sum()
    }

    /// What every snapshot must keep, whatever the traffic: the process
    /// groups add up to the total (with `--top`, the rest is in "other"),
    /// the substates add up to it, its parts fit in it, and it is what the
    /// kernel lists for the namespace.
    pub fn check_invariants(&self, top: usize) {
        let ctx = || format!("snapshot {}", self.ts);
        assert_eq!(
            self.process_sum(),
            self.total,
            "{}: process groups {:?} do not add up to the total",
            ctx(),
            self.by_process
        );
        assert_eq!(
            self.time_wait + self.fin_wait2,
            self.total,
            "{}: substates",
            ctx()
        );
        assert!(
            self.before_tracing + self.unattributed + self.just_closed + self.other_netns
                <= self.total,
            "{}: parts exceed the total: {self:?}",
            ctx()
        );
        assert_eq!(self.other_netns, 0, "{}: other namespaces counted", ctx());
        assert_eq!(
            Snap::count_of(&self.by_process, UNSEEN_GROUP),
            self.unattributed,
            "{}",
            ctx()
        );
        assert_eq!(
            Snap::count_of(&self.by_process, JUST_CLOSED_GROUP),
            self.just_closed,
            "{}",
            ctx()
        );
        // top groups, "other", and the two groups of sockets without an entry.
        assert!(self.by_process.len() <= top + 3, "{}", ctx());
        assert!(self.by_remote.len() <= top + 1, "{}", ctx());
        assert!(self.by_local.len() <= top + 1, "{}", ctx());
        assert!(self.destinations.len() <= top, "{}", ctx());
        if self.total > 0 {
            let shares: f64 = self.by_process.iter().map(|g| g.share).sum();
            assert!((shares - 1.0).abs() < 1e-6, "{}: shares {shares}", ctx());
        } else {
            assert!(
                self.findings.iter().any(|f| f == "no timewait sockets"),
                "{}: {:?}",
                ctx(),
                self.findings
            );
        }
        if self.interval_s > 0.0 {
            let rate = self.created_last_interval as f64 / self.interval_s;
            assert!(
                (self.rate_last_interval - rate).abs() <= 1e-6 * rate.max(1.0),
                "{}: rate {} for {} in {} s",
                ctx(),
                self.rate_last_interval,
                self.created_last_interval,
                self.interval_s
            );
        }
        assert!(self.rate_last_minute >= 0.0, "{}", ctx());
        for d in &self.destinations {
            assert!(
                (d.steady_state_ports - 60.0 * d.rate_per_s).abs()
                    <= 1e-6 * d.steady_state_ports.max(1.0),
                "{}: {d:?}",
                ctx()
            );
            assert!(
                !(d.tw_reuse_applies && d.exhaustion_s.is_some()),
                "{}: no exhaustion under tcp_tw_reuse: {d:?}",
                ctx()
            );
        }
        for g in &self.by_process {
            assert!(g.count > 0, "{}: empty group {g:?}", ctx());
            assert_eq!(
                g.pid.is_some(),
                g.key.starts_with(&format!("{} ", g.pid.unwrap_or(0))),
                "{}: group key {g:?}",
                ctx()
            );
        }
    }

    /// Wall-clock time of the snapshot, ns since the epoch.
    pub fn ts_ns(&self) -> i128 {
        common::parse_ts(&self.ts)
    }
}

/// |a - b| as a share of the larger (0 when both are 0).
pub fn rel_diff(a: u64, b: u64) -> f64 {
    let max = a.max(b);
    if max == 0 {
        0.0
    } else {
        a.abs_diff(b) as f64 / max as f64
    }
}

// ---------------------------------------------------------------------------
// tcpwatch timewait, inside a namespace

/// A running `tcpwatch timewait --format json` in a namespace (killed if
/// dropped).
pub struct Timewait {
    proc: Proc,
    interval: Duration,
    pub top: usize,
}

/// What a stopped tcpwatch timewait printed.
pub struct TimewaitRun {
    pub snaps: Vec<Snap>,
    pub stderr: Vec<String>,
    pub lost: u64,
}

impl Timewait {
    /// Starts tcpwatch inside `ns` with `--interval interval_s` (and
    /// `extra`) and waits until its probe is attached.
    pub fn start(ns: &Netns, interval_s: f64, extra: &[&str]) -> Timewait {
        let mut cmd = ns.command(common::tcpwatch_bin());
        cmd.args([
            "timewait",
            "--format",
            "json",
            "--interval",
            &interval_s.to_string(),
            "--laddr",
            &our_net(),
        ])
        .args(extra);
        let top = extra
            .iter()
            .position(|a| *a == "--top")
            .map_or(10, |i| extra[i + 1].parse().unwrap());
        let proc = Proc::spawn(&format!("tcpwatch timewait in {}", ns.name), cmd, false);
        proc.wait_stderr(|l| l == READY_LINE, 1, common::START_TIMEOUT);
        Timewait {
            proc,
            interval: Duration::from_secs_f64(interval_s),
            top,
        }
    }

    /// Snapshot lines printed so far.
    pub fn count(&self) -> usize {
        self.lines(0, Duration::ZERO).len()
    }

    fn lines(&self, n: usize, t: Duration) -> Vec<String> {
        self.proc.wait_stdout(|l| l.starts_with('{'), n, t)
    }

    /// The `n`th snapshot (from 0), waiting for it if need be.
    pub fn nth(&self, n: usize) -> Snap {
        let t = self.interval * (n as u32 + 3) + Duration::from_secs(10);
        Snap::parse(&self.lines(n + 1, t)[n])
    }

    /// The first snapshot printed after this call.
    pub fn next(&self) -> Snap {
        let n = self.count();
        let t = self.interval * 3 + Duration::from_secs(10);
        Snap::parse(&self.lines(n + 1, t)[n])
    }

    /// SIGINT, then all it printed; checks a clean exit, the closing
    /// summary, and that every snapshot keeps the invariants.
    pub fn stop(self) -> TimewaitRun {
        self.proc.signal(libc::SIGINT);
        let name = self.proc.name.clone();
        let top = self.top;
        let f = self.proc.finish(common::STOP_TIMEOUT);
        let stderr = f.stderr.join("\n");
        assert!(
            f.status.success(),
            "{name} exited with {}\n{stderr}",
            f.status
        );
        assert!(!stderr.contains("panicked"), "{name} panicked:\n{stderr}");
        assert!(
            !f.stderr.iter().any(|l| l.starts_with("tcpwatch: ")
                && (l.contains("undecodable") || l.contains("cannot list"))),
            "{name}:\n{stderr}"
        );
        let snaps: Vec<Snap> = f.stdout.iter().map(|l| Snap::parse(l)).collect();
        // The closing summary, `--format json`: the last line on stderr.
        let Some(ExitSummary::Timewait(summary)) = ExitSummary::from_stderr(&f.stderr) else {
            panic!("{name}: no closing summary:\n{stderr}")
        };
        assert_eq!(
            summary.snapshots,
            snaps.len() as u64,
            "{name}: summary's snapshot count: {summary:?}"
        );
        for s in &snaps {
            s.check_invariants(top);
        }
        assert_eq!(summary.stream.undecodable, 0, "{name}: {summary:?}");
        let lost = summary.stream.lost;
        assert_eq!(
            lost.total,
            lost.ring_full + lost.skipped,
            "{name}: lost is not ring + skipped: {summary:?}"
        );
        TimewaitRun {
            snaps,
            stderr: f.stderr,
            lost: lost.total,
        }
    }
}

// ---------------------------------------------------------------------------
// Peers: the test binary re-executed inside the namespace, so the sockets
// belong to a process of known pid.

pub const PEER_ENV: &str = "TCPWATCH_TW_PEER";

/// Who closes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// The client closes; the server reads EOF, then closes.
    ClientFirst,
    /// The server closes on accept; the client reads EOF, then closes.
    ServerFirst,
    /// The client closes; the server keeps its sockets open until told
    /// (a line on stdin, or stdin closing).
    ServerNever,
}

impl Order {
    fn name(self) -> &'static str {
        match self {
            Order::ClientFirst => "client-first",
            Order::ServerFirst => "server-first",
            Order::ServerNever => "server-never",
        }
    }
}

pub struct Peer {
    pub proc: Proc,
}

impl Peer {
    fn spawn(ns: &Netns, comm: &str, env: &[(&str, String)]) -> Peer {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = ns.command(exe.to_str().unwrap());
        cmd.args([
            "--exact",
            "tw_peer_entry",
            "--nocapture",
            "--test-threads=1",
        ]);
        cmd.env(PEER_ENV, "1")
            .env("TCPWATCH_TW_COMM", comm)
            .env(OCTET_ENV, our_octet().to_string());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(&format!("peer {comm}"), cmd, true);
        let peer = Peer { proc };
        peer.wait_for("named");
        // `ip netns exec` execs the program in place: the pid is the peer's.
        assert_eq!(
            common::proc_comm(peer.pid()),
            comm,
            "peer pid {} is not the peer",
            peer.pid()
        );
        peer
    }

    /// A server on [`server_addr`] accepting `n` connections.
    pub fn server(ns: &Netns, n: usize, order: Order) -> Peer {
        let p = Peer::spawn(
            ns,
            "tw-server",
            &[
                ("TCPWATCH_TW_ROLE", "server".into()),
                ("TCPWATCH_TW_N", n.to_string()),
                ("TCPWATCH_TW_ORDER", order.name().into()),
            ],
        );
        p.wait_for("listening");
        p
    }

    /// A client making `n` connections to [`server_addr`] from
    /// [`client_ip`], ports [`CLIENT_BASE_PORT`] up, one after another.
    pub fn client(ns: &Netns, n: usize, order: Order) -> Peer {
        Peer::spawn(
            ns,
            "tw-client",
            &[
                ("TCPWATCH_TW_ROLE", "client".into()),
                ("TCPWATCH_TW_N", n.to_string()),
                ("TCPWATCH_TW_ORDER", order.name().into()),
            ],
        )
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Waits for the line `TWPEER <what>`.
    pub fn wait_for(&self, what: &str) {
        let line = format!("TWPEER {what}");
        self.proc
            .wait_stdout(|l| l.ends_with(&line), 1, Duration::from_secs(30));
    }

    pub fn release(&mut self) {
        self.proc.send_line("go");
    }

    /// Waits for the peer to finish its work and exit successfully.
    pub fn finish(self) {
        let name = self.proc.name.clone();
        let f = self.proc.finish(Duration::from_secs(30));
        assert!(
            f.status.success() && f.stdout.iter().any(|l| l.ends_with("TWPEER done")),
            "{name} failed ({})\nstdout:\n{}\nstderr:\n{}",
            f.status,
            f.stdout.join("\n"),
            f.stderr.join("\n")
        );
    }
}

/// The peer program; returns at once unless [`PEER_ENV`] is set.
pub fn peer_main() {
    if std::env::var_os(PEER_ENV).is_none() {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("peer needs {k}"));
    name_process_and_thread(&var("TCPWATCH_TW_COMM"));
    println!("TWPEER named");
    let n: usize = var("TCPWATCH_TW_N").parse().unwrap();
    let order = var("TCPWATCH_TW_ORDER");
    match var("TCPWATCH_TW_ROLE").as_str() {
        "server" => peer_server(n, &order),
        "client" => peer_client(n, &order),
        other => panic!("unknown peer role {other}"),
    }
    println!("TWPEER done");
    // Leave without libtest's report after our last line.
    std::process::exit(0);
}

/// The kernel reports the comm of the thread that owns a socket; libtest
/// runs the peer on a thread of its own. Give both the same name.
fn name_process_and_thread(name: &str) {
    fs::write("/proc/self/comm", name).expect("rename the process");
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) };
    assert_eq!(rc, 0, "prctl(PR_SET_NAME)");
}

fn peer_server(n: usize, order: &str) {
    let listener = listen(server_addr(), 1024).expect("listen");
    println!("TWPEER listening");
    let mut held = Vec::new();
    for _ in 0..n {
        let (mut s, _) = listener.accept().expect("accept");
        match order {
            "client-first" => {
                let mut sink = Vec::new();
                s.read_to_end(&mut sink).expect("read to EOF");
            }
            "server-first" => {}
            _ => {
                held.push(s);
                continue;
            }
        }
        drop(s);
    }
    if order == "server-never" {
        println!("TWPEER holding {}", held.len());
        let mut line = String::new();
        let _ = io::stdin().read_line(&mut line);
    }
}

fn peer_client(n: usize, order: &str) {
    for i in 0..n {
        let src = SocketAddrV4::new(client_ip(), CLIENT_BASE_PORT + i as u16);
        let mut s = connect_from(src, server_addr(), false)
            .unwrap_or_else(|e| panic!("connect from {src}: {e}"));
        if order == "server-first" {
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).expect("read to EOF");
        }
        drop(s);
    }
    println!("TWPEER closed {n}");
}

// ---------------------------------------------------------------------------
// Sockets

/// Makes `n` client-side timewait sockets from this process inside `ns`:
/// connections from [`client_ip`], ports `base` up, to `server_ip():port`,
/// the client closing first.
pub fn make_timewaits(ns: &Netns, port: u16, n: u16, base: u16) {
    ns.in_ns(|| {
        let server = SocketAddrV4::new(server_ip(), port);
        let listener = listen(server, 1024).expect("listen");
        for i in 0..n {
            let src = SocketAddrV4::new(client_ip(), base + i);
            let c = connect_from(src, server, false)
                .unwrap_or_else(|e| panic!("connect from {src}: {e}"));
            let (mut s, _) = listener.accept().expect("accept");
            drop(c);
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).expect("read to EOF");
        }
    });
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A listener with a backlog of our choosing (std's is fixed).
pub fn listen(addr: SocketAddrV4, backlog: i32) -> io::Result<TcpListener> {
    // SAFETY: plain socket calls on a descriptor owned by the returned
    // listener from the moment it exists; the sockaddr is valid for its size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        check(fd)?;
        let l = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        check(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ))?;
        let sa = sockaddr_in(addr);
        check(libc::bind(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ))?;
        check(libc::listen(fd, backlog))?;
        Ok(l)
    }
}

/// connect() from `src`; with `port_at_connect` the port in `src` must be
/// 0 and is chosen at connect time by 4-tuple (IP_BIND_ADDRESS_NO_PORT),
/// so ports are shared across destinations rather than used up by bind.
pub fn connect_from(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    port_at_connect: bool,
) -> io::Result<TcpStream> {
    // SAFETY: as in `listen`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        check(fd)?;
        let s = TcpStream::from_raw_fd(fd);
        if port_at_connect {
            let one: libc::c_int = 1;
            check(libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ))?;
        }
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let sa = sockaddr_in(src);
        check(libc::bind(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            len,
        ))?;
        let da = sockaddr_in(dst);
        check(libc::connect(
            fd,
            &da as *const _ as *const libc::sockaddr,
            len,
        ))?;
        Ok(s)
    }
}

// ---------------------------------------------------------------------------
// Churn: many short connections per second from this process.

#[derive(Default)]
struct ChurnState {
    stop: AtomicBool,
    paused: AtomicBool,
    /// Client threads waiting while paused.
    parked: AtomicUsize,
    /// Connections made by clients, and closed by servers after the EOF.
    made: AtomicU64,
    served: AtomicU64,
    failed: AtomicU64,
}

/// Client and server threads inside a namespace: each client connects to
/// the server and closes first (its socket is left in TIME_WAIT), each
/// server thread accepts, reads to EOF and closes. It can be paused, so
/// that the kernel's figures hold still while they are compared.
pub struct Churn {
    state: Arc<ChurnState>,
    listener: Arc<TcpListener>,
    clients: Vec<JoinHandle<()>>,
    servers: Vec<JoinHandle<()>>,
    n_clients: usize,
    started: Instant,
    paused_for: Duration,
    paused_at: Option<Instant>,
}

/// What a churn did.
#[derive(Clone, Copy, Debug)]
pub struct ChurnResult {
    pub connections: u64,
    pub failed: u64,
    /// Time spent churning (pauses left out).
    pub elapsed: Duration,
}

impl ChurnResult {
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64()
    }
}

impl Churn {
    /// Starts `clients` client threads, each cycling through 250 source
    /// addresses of its own (127.X.(10+i).1-250) so that ports never run
    /// out, and `servers` server threads; at most `limit` connections per
    /// second in all, if given.
    pub fn start(ns: &Netns, clients: usize, servers: usize, limit: Option<f64>) -> Churn {
        let listener = Arc::new(ns.in_ns(|| listen(server_addr(), 4096).expect("listen")));
        let state = Arc::new(ChurnState::default());
        let servers = (0..servers)
            .map(|_| {
                let (l, st) = (listener.clone(), state.clone());
                std::thread::spawn(move || serve(&l, &st))
            })
            .collect();
        let n_clients = clients;
        let clients = (0..clients)
            .map(|i| {
                let st = state.clone();
                let path = ns.path();
                let limit = limit.map(|l| l / n_clients as f64);
                std::thread::spawn(move || {
                    enter(&path);
                    client_loop(i, &st, limit)
                })
            })
            .collect();
        Churn {
            state,
            listener,
            clients,
            servers,
            n_clients,
            started: Instant::now(),
            paused_for: Duration::ZERO,
            paused_at: None,
        }
    }

    pub fn made(&self) -> u64 {
        self.state.made.load(Ordering::SeqCst)
    }

    /// Stops making connections and waits until every one made is closed
    /// on both sides (so no timewait socket is still being made).
    pub fn pause(&mut self) {
        let st = &self.state;
        st.paused.store(true, Ordering::SeqCst);
        self.paused_at = Some(Instant::now());
        let deadline = Instant::now() + Duration::from_secs(20);
        while st.parked.load(Ordering::SeqCst) < self.n_clients
            || st.served.load(Ordering::SeqCst) < st.made.load(Ordering::SeqCst)
        {
            assert!(
                Instant::now() < deadline,
                "churn did not quiesce: {} made, {} served",
                st.made.load(Ordering::SeqCst),
                st.served.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // The servers' FINs are delivered by softirq right after close().
        std::thread::sleep(Duration::from_millis(20));
    }

    pub fn resume(&mut self) {
        if let Some(at) = self.paused_at.take() {
            self.paused_for += at.elapsed();
        }
        self.state.paused.store(false, Ordering::SeqCst);
    }

    /// Stops the clients, lets the servers close what was accepted, and
    /// stops them.
    pub fn stop(mut self) -> ChurnResult {
        self.halt()
    }

    fn halt(&mut self) -> ChurnResult {
        self.resume();
        self.state.stop.store(true, Ordering::SeqCst);
        for c in self.clients.drain(..) {
            let _ = c.join();
        }
        let elapsed = self.started.elapsed().saturating_sub(self.paused_for);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.state.served.load(Ordering::SeqCst) < self.made() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        // SAFETY: shutdown on a listener we own wakes the threads blocked
        // in accept(), which then fail and see the stop flag.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        ChurnResult {
            connections: self.made(),
            failed: self.state.failed.load(Ordering::SeqCst),
            elapsed,
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        if !self.clients.is_empty() || !self.servers.is_empty() {
            self.halt();
        }
    }
}

/// Connections made but not yet closed by a server, at most.
const MAX_IN_FLIGHT: u64 = 1024;

fn client_loop(i: usize, st: &ChurnState, limit: Option<f64>) {
    let mut n: u32 = 0;
    // Connections made since `since`, for the rate limit.
    let (mut since, mut made) = (Instant::now(), 0u32);
    while !st.stop.load(Ordering::Relaxed) {
        if st.paused.load(Ordering::Relaxed) {
            st.parked.fetch_add(1, Ordering::SeqCst);
            while st.paused.load(Ordering::SeqCst) && !st.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            st.parked.fetch_sub(1, Ordering::SeqCst);
            (since, made) = (Instant::now(), 0);
            continue;
        }
        // Keep the accept queue short: an overflowing one drops handshakes
        // the client saw complete, and those connections then take seconds
        // of retransmissions to close.
        let in_flight = st
            .made
            .load(Ordering::Relaxed)
            .saturating_sub(st.served.load(Ordering::Relaxed));
        if in_flight > MAX_IN_FLIGHT
            || limit.is_some_and(|l| f64::from(made) > l * since.elapsed().as_secs_f64())
        {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let src = SocketAddrV4::new(
            Ipv4Addr::new(127, our_octet(), 10 + i as u8, 1 + (n % 250) as u8),
            0,
        );
        n = n.wrapping_add(1);
        match connect_from(src, server_addr(), true) {
            Ok(s) => {
                drop(s);
                made += 1;
                st.made.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => {
                st.failed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

fn serve(listener: &TcpListener, st: &ChurnState) {
    let mut buf = [0u8; 256];
    loop {
        match listener.accept() {
            Ok((mut s, _)) => {
                // The client closes first: wait for its FIN.
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                drop(s);
                st.served.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) if st.stop.load(Ordering::SeqCst) => return,
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Reads the namespace's sockstat `tw` every `period` on a thread of its
/// own, with the wall-clock time of each reading, until dropped.
pub struct SockstatSampler {
    stop: Arc<AtomicBool>,
    samples: Arc<std::sync::Mutex<Vec<(i128, u64)>>>,
    handle: Option<JoinHandle<()>>,
}

impl SockstatSampler {
    pub fn start(ns: &Netns, period: Duration) -> SockstatSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (st, sa, path) = (stop.clone(), samples.clone(), ns.path());
        let handle = std::thread::spawn(move || {
            enter(&path);
            while !st.load(Ordering::Relaxed) {
                let tw = sockstat_tw();
                let t = common::now_ns();
                sa.lock().unwrap().push((t, tw));
                std::thread::sleep(period);
            }
        });
        SockstatSampler {
            stop,
            samples,
            handle: Some(handle),
        }
    }

    /// The last reading taken at or before `t_ns` (wall clock).
    pub fn at_or_before(&self, t_ns: i128) -> Option<(i128, u64)> {
        let s = self.samples.lock().unwrap();
        s.iter().rev().find(|(t, _)| *t <= t_ns).copied()
    }
}

impl Drop for SockstatSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
