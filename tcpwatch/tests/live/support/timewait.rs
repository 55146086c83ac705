//! Helpers for the `timewait` tests (and the overload tests, which run in
//! the same kind of namespace): this run's own addresses, the kernel's own
//! view of a namespace (`ss`, `/proc/net/sockstat`) read from a thread that
//! entered it, the snapshot (the library's `Snapshot`) with the invariants
//! every snapshot must keep, a runner, the peers that make the connections,
//! and a multi-threaded connection churn.
//!
//! Every address the tests use is in [`our_net`], a /16 of 127/8 of this
//! test process's own, and tcpwatch is run with `--laddr` it: tcpwatch
//! traces every namespace on the host, and sockets of other namespaces
//! (other tests' loopback traffic, or another run of these tests in its own
//! namespaces) would otherwise be added to its totals as `other_netns`.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tcpwatch::model::timewait::{Group, Snapshot};

use super::netns::{enter, Netns};
use super::peer::{repeat, Peer, Pending};
use super::sockets;
use super::summary::timewait_summary;
use super::{read_json, tcpwatch_bin, Proc, START_TIMEOUT, STOP_TIMEOUT};

/// The second octet of this run's addresses: from the test process's pid,
/// so that two runs on one host keep apart; never 0, the host's own
/// 127.0.0.1.
pub fn our_octet() -> u8 {
    32 + (std::process::id() % 200) as u8
}

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
// The namespace and the kernel's view of it

/// A namespace for counting timewait sockets exactly: no reuse of
/// TIME_WAIT 4-tuples by connect() and RFC 1337 on (a stray RST must not
/// end a timewait socket early).
pub fn timewait_netns() -> Netns {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    ns.sysctl("net.ipv4.tcp_rfc1337", "1");
    ns
}

impl Netns {
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

/// One line of `tcpwatch timewait --format json`: the library's
/// `Snapshot` (its fields through `Deref`), checked on reading to have
/// every documented field.
#[derive(Clone, Debug)]
pub struct Snap(pub Snapshot);

impl Deref for Snap {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.0
    }
}

pub const SNAPSHOT_FIELDS: [&str; 21] = [
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
    "churn",
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
    /// Parses a line, checking every documented field is there (an absent
    /// `Option` field would otherwise read as `None`).
    pub fn parse(text: &str) -> Snap {
        let (snapshot, obj) = read_json(text, &SNAPSHOT_FIELDS);
        for f in KERNEL_FIELDS {
            assert!(
                obj["kernel"].get(f).is_some(),
                "field kernel.{f} missing: {text}"
            );
        }
        Snap(snapshot)
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
            // A process group is keyed by its command name, with its pids
            // (the pid itself when it is one process).
            if let Some(n) = g.processes {
                assert_eq!(g.comm.as_deref(), Some(g.key.as_str()), "{}: {g:?}", ctx());
                assert!(n >= 1 && !g.pids.is_empty(), "{}: {g:?}", ctx());
                assert_eq!(g.pid.is_some(), n == 1, "{}: {g:?}", ctx());
                assert!(g.pid.is_none_or(|p| g.pids == [p]), "{}: {g:?}", ctx());
            } else {
                assert!(g.pid.is_none() && g.pids.is_empty(), "{}: {g:?}", ctx());
            }
        }
    }

    /// Wall-clock time of the snapshot, ns since the epoch.
    pub fn ts_ns(&self) -> i128 {
        super::parse_ts(&self.ts)
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
        let mut cmd = ns.command(tcpwatch_bin());
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
        proc.wait_stderr(|l| l == READY_LINE, 1, START_TIMEOUT);
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
        let name = self.proc.name.clone();
        let top = self.top;
        let f = self.proc.interrupt(STOP_TIMEOUT);
        let stderr = f.stderr.join("\n");
        assert!(
            !f.stderr.iter().any(|l| l.starts_with("tcpwatch: ")
                && (l.contains("undecodable") || l.contains("cannot list"))),
            "{name}:\n{stderr}"
        );
        let snaps: Vec<Snap> = f.stdout.iter().map(|l| Snap::parse(l)).collect();
        let summary = timewait_summary(&f.stderr);
        assert_eq!(
            summary.snapshots,
            snaps.len() as u64,
            "{name}: summary's snapshot count: {summary:?}"
        );
        assert_eq!(summary.stream.undecodable, 0, "{name}: {summary:?}");
        for s in &snaps {
            s.check_invariants(top);
        }
        TimewaitRun {
            snaps,
            lost: summary.stream.lost.total,
            stderr: f.stderr,
        }
    }
}

// ---------------------------------------------------------------------------
// Peers: processes of known pid inside the namespace make the connections.

/// Who closes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// The client closes; the server reads EOF, then closes.
    ClientFirst,
    /// The server closes on accept; the client reads EOF, then closes.
    ServerFirst,
    /// The client closes; the server keeps its sockets open until
    /// released.
    ServerNever,
}

/// A peer running its part of `n` connections in the background.
pub struct TwPeer {
    peer: Peer,
    script: Option<Pending>,
}

impl TwPeer {
    /// `tw-server`, listening on [`server_addr`] and accepting `n`
    /// connections.
    pub fn server(ns: &Netns, n: usize, order: Order) -> TwPeer {
        let mut peer = Peer::spawn("tw-server", Some(ns));
        peer.run(&format!("listen {} 1024", server_addr()));
        let each = match order {
            Order::ClientFirst => "accept; eof; close",
            Order::ServerFirst => "accept; close",
            Order::ServerNever => "accept; hold",
        };
        let script = Some(peer.send(&repeat(each, n)));
        TwPeer { peer, script }
    }

    /// `tw-client`, making `n` connections to [`server_addr`] from
    /// [`client_ip`], ports [`CLIENT_BASE_PORT`] up, one after another.
    pub fn client(ns: &Netns, n: usize, order: Order) -> TwPeer {
        let mut peer = Peer::spawn("tw-client", Some(ns));
        let read = if order == Order::ServerFirst {
            "eof; "
        } else {
            ""
        };
        let cmds: Vec<String> = (0..n)
            .map(|i| {
                let src = SocketAddrV4::new(client_ip(), CLIENT_BASE_PORT + i as u16);
                format!("connect_from {src} {}; {read}close", server_addr())
            })
            .collect();
        let script = Some(peer.send(&cmds.join("; ")));
        TwPeer { peer, script }
    }

    pub fn pid(&self) -> u32 {
        self.peer.pid
    }

    /// Waits until its part is done; the values its commands printed.
    pub fn wait(&mut self) -> Vec<String> {
        self.script
            .take()
            .map(|p| self.peer.wait(p))
            .unwrap_or_default()
    }

    /// Closes the connections a `ServerNever` server holds.
    pub fn release(&mut self) {
        self.peer.run("release");
    }

    /// Waits for its part, then for it to exit successfully.
    pub fn finish(mut self) {
        self.wait();
        self.peer.finish();
    }
}

// ---------------------------------------------------------------------------
// Sockets

/// Makes `n` client-side timewait sockets from this process inside `ns`:
/// connections from [`client_ip`], ports `base` up, to `server_ip():port`,
/// the client closing first.
pub fn make_timewaits(ns: &Netns, port: u16, n: u16, base: u16) {
    ns.in_ns(|| {
        let server = SocketAddrV4::new(server_ip(), port).into();
        let listener = sockets::listen(server, 1024).expect("listen");
        for i in 0..n {
            let src = SocketAddrV4::new(client_ip(), base + i);
            let c = sockets::connect_from(src.into(), server, false)
                .unwrap_or_else(|e| panic!("connect from {src}: {e}"));
            let (mut s, _) = listener.accept().expect("accept");
            drop(c);
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).expect("read to EOF");
        }
    });
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
        let listener =
            Arc::new(ns.in_ns(|| sockets::listen(server_addr().into(), 4096).expect("listen")));
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
        match sockets::connect_from(src.into(), server_addr().into(), true) {
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
                let t = super::now_ns();
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
