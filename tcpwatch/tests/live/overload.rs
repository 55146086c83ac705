//! Root integration tests of tcpwatch under overload, on the running kernel.
//!
//! - A SYN flood: in a namespace of the test's own, a listener with a
//!   backlog of 1 that never accepts, SYN cookies off and one SYN retry, so
//!   that thousands of nonblocking connect() calls from the same namespace
//!   stay half-open for about three seconds each and then time out.
//!   `tcpwatch trace`, `conns` and `timewait` run through it with a small
//!   `--max-sockets`.
//! - A ring burst: the three modes with a tiny `--ring-size` while a
//!   connection churn runs far faster than the ring can hold; and the
//!   daemon through the same burst, whose tracked sockets must fall to
//!   what the kernel lists once it is over.
//!
//! Each checks that tcpwatch stays up, that its resident memory stays under
//! a cap, that its tables stay under `--max-sockets` with the evictions
//! counted, that lost events are counted and reported with their cause, and
//! that once the overload is over its figures are right again: a known
//! batch of connections made afterwards is reported exactly (every
//! transition, every record, the TIME_WAIT count against the kernel's), and
//! no socket of the overload is left in its tables. Every figure is printed
//! (`--nocapture` shows them).
//!
//! tcpwatch runs inside the test namespace with `--laddr` this run's own
//! addresses; it still traces (and tracks) the whole host, so other
//! programs' traffic shares its tables and its ring buffer. A batch whose
//! window saw lost events is made again (at most three times).
//!
//! One module, with the figures: `cargo xtask test -- --test live --
//! overload:: --nocapture`.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use tcpwatch::daemon::Health;

use crate::require_live;
use crate::support::conns::Conn;
use crate::support::daemon::{metric, parse_exposition, request, Response};
use crate::support::netns::Netns;
use crate::support::overload::*;
use crate::support::sockets::listen;
use crate::support::summary::{Lost, Stream};
use crate::support::timewait::{
    make_timewaits, our_octet, server_ip, ss_lines, timewait_netns, Churn, Snap,
};
use crate::support::trace::{self, Line};
use crate::support::{tcpwatch_bin, Proc, START_TIMEOUT, STOP_TIMEOUT};

/// `--max-sockets` for the flood: far below the half-open sockets it makes.
const MAX_SOCKETS: usize = 2000;
/// Connections in the batch made after the overload.
const BATCH: u16 = 40;
/// Half-open sockets per second, and for how long.
const FLOOD_RATE: f64 = 4000.0;
const FLOOD_TIME: Duration = Duration::from_secs(5);
/// How long the flood keeps each socket: past its SYN timeout (one retry:
/// about 3 s), so the kernel, not the flood, ends it.
const FLOOD_HOLD: Duration = Duration::from_millis(3500);
/// The resident memory each tcpwatch may add to what it had once attached:
/// records taken from the ring and not yet handled, at most a ring
/// buffer's worth (16 MiB by default, see `ringbuf::MAX_BATCH`), its
/// tables (here capped at `MAX_SOCKETS` sockets of a few hundred bytes,
/// and at most 65,536 evicted socket addresses: under 6 MiB in all) and
/// the allocator's slack. Records piling up without bound (as the reader
/// once queued them) would break it within seconds of a stall; the tables'
/// own bound is checked through their peak.
const RSS_GROWTH_CAP_KIB: u64 = 24 * 1024;
/// Sockets tcpwatch may still count as open at exit that are not the
/// test's: other programs on the host open connections meanwhile.
const FOREIGN_SLACK: u64 = 64;

fn port_needles(port: u16) -> [String; 2] {
    [format!("\"sport\":{port},"), format!("\"dport\":{port},")]
}

/// The batch: `BATCH` connections to `server_ip():port` from ports `base`
/// up, each with a listener of its own, the client closing first, one
/// every 2 ms (so that a tiny ring buffer can carry them), made after the
/// overload; then waits (up to 10 s) until each mode printed them.
fn make_batch(ns: &Netns, watchers: &[Watcher], port: u16, base: u16) {
    for i in 0..BATCH {
        make_timewaits(ns, port, 1, base + i);
        std::thread::sleep(Duration::from_millis(2));
    }
    let needles = port_needles(port);
    for w in watchers {
        let has_port = |l: &str| needles.iter().any(|n| l.contains(n.as_str()));
        let wanted = match w.mode {
            // Each client and accepted socket: five transitions; each
            // listener: two.
            Mode::Trace => 12 * BATCH as usize,
            Mode::Conns => 2 * BATCH as usize,
            Mode::Timewait => 0,
        };
        w.wait_stdout(has_port, wanted, Duration::from_secs(10));
    }
}

/// Checks what `trace` printed for the batch on `port`: exactly the
/// client's, the accepted socket's and the listener's transitions.
fn check_trace_batch(stdout: &[String], port: u16, base: u16, netns: u32) -> Result<(), String> {
    let lines: Vec<Line> = stdout
        .iter()
        .filter(|l| trace::is_transition_line(l))
        .map(|l| Line::parse(l))
        .filter(|l| l.netns == Some(netns) && l.has_port(&[port]))
        .collect();
    let lives = trace::lifetimes(&lines);
    let mut clients = 0;
    let mut accepted = 0;
    let mut listeners = 0;
    for life in &lives {
        let steps = trace::transitions(life);
        let first = &life[0];
        if steps == trace::CLIENT_SEQ && first.dport == port {
            let sport = life[1].sport;
            if !(base..base + BATCH).contains(&sport) {
                return Err(format!("client from unexpected port {sport}"));
            }
            clients += 1;
        } else if steps == trace::ACCEPTED_SEQ && first.sport == port {
            accepted += 1;
        } else if steps == trace::LISTENER_SEQ {
            listeners += 1;
        } else {
            return Err(format!("unexpected lifetime {steps:?} of {}", first.skaddr));
        }
    }
    let got = (clients, accepted, listeners);
    if got != (BATCH as usize, BATCH as usize, BATCH as usize) {
        return Err(format!(
            "trace: {clients} client, {accepted} accepted and {listeners} listener lifetimes"
        ));
    }
    Ok(())
}

/// Checks what `conns` printed for the batch: one record per end, each
/// orderly, the client closing first into TIME_WAIT (or FIN_WAIT2, when the
/// server's ACK came before its FIN).
fn check_conns_batch(stdout: &[String], port: u16, base: u16, netns: u32) -> Result<(), String> {
    let needles = port_needles(port);
    let records: Vec<Conn> = stdout
        .iter()
        .filter(|l| needles.iter().any(|n| l.contains(n.as_str())))
        .map(|l| Conn::parse(l))
        .filter(|c| c.netns == Some(netns))
        .collect();
    let mut by_key: HashMap<(u16, u16), usize> = HashMap::new();
    for c in &records {
        c.check_shape();
        *by_key.entry((c.sport, c.dport)).or_default() += 1;
        let client = c.dport == port;
        let got = (c.open.as_str(), c.close.as_str(), c.closed_by.as_deref());
        // The client closes first. If the server's ACK comes before its
        // FIN, the client's closed socket goes from FIN_WAIT2 straight to
        // the kernel's timewait code (close kind `fin_wait2`, timewait
        // substate FIN_WAIT2); otherwise it closes `orderly` into TIME_WAIT.
        let timewait_state = match (client, got) {
            (true, ("active", "orderly", Some("local"))) => Some("TIME_WAIT"),
            (true, ("active", "fin_wait2", Some("local"))) => Some("FIN_WAIT2"),
            (false, ("passive", "orderly", Some("peer"))) => None,
            _ => return Err(format!("conns: {}", c.line)),
        };
        if let Some(state) = timewait_state {
            if c.timewait.as_ref().map(|t| t.state.as_str()) != Some(state) {
                return Err(format!("conns: no {state}: {}", c.line));
            }
        }
        if c.pid != Some(std::process::id()) {
            return Err(format!("conns: owner is not this test: {}", c.line));
        }
    }
    for i in 0..BATCH {
        for key in [(base + i, port), (port, base + i)] {
            if by_key.get(&key) != Some(&1) {
                return Err(format!(
                    "conns: {:?} records for {key:?} ({} records on port {port})",
                    by_key.get(&key),
                    records.len()
                ));
            }
        }
    }
    if records.len() != 2 * BATCH as usize {
        return Err(format!("conns: {} records on port {port}", records.len()));
    }
    Ok(())
}

/// Checks `timewait`'s first snapshot taken a second after the batch: the
/// batch's TIME_WAIT sockets, all attributed, and a total that is the
/// kernel's.
fn check_timewait_batch(w: &Watcher, ns: &Netns, port: u16) -> Result<Snap, String> {
    let key = SocketAddrV4::new(server_ip(), port).to_string();
    let done = crate::support::now_ns();
    let deadline = Instant::now() + Duration::from_secs(15);
    let is_snap = |l: &str| l.starts_with('{');
    loop {
        let n = w.wait_stdout(is_snap, 0, Duration::ZERO).len();
        let s = Snap::parse(&w.wait_stdout(is_snap, n + 1, Duration::from_secs(10))[n]);
        // What every snapshot keeps, lost events or not (an event lost in
        // the burst can leave a socket of ours under another namespace).
        assert_eq!(s.process_sum(), s.total, "{:?}", s.by_process);
        assert_eq!(s.time_wait + s.fin_wait2, s.total);
        if s.ts_ns() < done + 1_000_000_000 && Instant::now() < deadline {
            continue;
        }
        let k = ns.kernel_now();
        let batch = Snap::count_of(&s.by_remote, &key);
        let kernel = k.ss_time_wait + k.ss_fin_wait2;
        if batch != u64::from(BATCH) || s.kernel_listed != Some(s.total) || s.total != kernel {
            return Err(format!(
                "timewait: {batch} of the batch's {BATCH} toward {key}; total {} (TIME_WAIT {}, \
                 FIN_WAIT2 {}), kernel listed {:?}, ss {kernel}, unattributed {}, just closed {}",
                s.total, s.time_wait, s.fin_wait2, s.kernel_listed, s.unattributed, s.just_closed
            ));
        }
        return Ok(s);
    }
}

/// Makes batches until one whose window lost no event (at most three);
/// returns its port and client base port, checked as far as the modes
/// still running can be (the timewait snapshot); trace and conns are
/// checked on their output once stopped.
fn lossless_batch(ns: &Netns, watchers: &[Watcher], first_port: u16) -> (u16, u16) {
    for attempt in 0..3u16 {
        let (port, base) = (first_port + attempt, 30000 + 1000 * attempt);
        // The lost-event lines come at most every half second.
        std::thread::sleep(Duration::from_millis(600));
        let before: Vec<Lost> = watchers.iter().map(Watcher::lost_so_far).collect();
        make_batch(ns, watchers, port, base);
        let tw = watchers.iter().find(|w| w.mode == Mode::Timewait);
        let snap = tw.map(|w| check_timewait_batch(w, ns, port));
        std::thread::sleep(Duration::from_millis(600));
        let lost: Vec<u64> = watchers
            .iter()
            .zip(&before)
            .map(|(w, b)| w.lost_so_far().total - b.total)
            .collect();
        if lost.iter().all(|n| *n == 0) {
            if let Some(Err(e)) = snap {
                panic!("batch on port {port}, no event lost: {e}");
            }
            eprintln!("batch of {BATCH} connections on port {port}: no event lost in its window");
            return (port, base);
        }
        eprintln!(
            "note: batch on port {port}: events lost in its window ({lost:?} by mode {:?}); again",
            watchers.iter().map(|w| w.mode.name()).collect::<Vec<_>>()
        );
    }
    panic!(
        "three batches in a row lost events (other BPF programs or traffic on this host?): \
         cannot check that the figures are right again"
    );
}

/// The three modes running through an overload, their memory sampled.
struct Overload {
    watchers: Vec<Watcher>,
    /// (VmRSS, VmHWM) of each once attached, in KiB.
    start_rss: Vec<(u64, u64)>,
    sampler: RssSampler,
    started: Instant,
}

/// A mode once stopped, with its figures checked.
struct Checked {
    stopped: Stopped,
    secs: f64,
}

impl Overload {
    fn start(ns: &Netns, extra: &[&str]) -> Overload {
        let watchers: Vec<Watcher> = Mode::ALL
            .iter()
            .map(|m| Watcher::start(ns, *m, extra))
            .collect();
        let pids: Vec<u32> = watchers.iter().map(Watcher::pid).collect();
        let start_rss = pids
            .iter()
            .map(|p| {
                let kib = |f| status_kib(*p, f).unwrap_or(0);
                (kib("VmRSS:"), kib("VmHWM:"))
            })
            .collect();
        Overload {
            watchers,
            start_rss,
            sampler: RssSampler::start(&pids, Duration::from_millis(100)),
            started: Instant::now(),
        }
    }

    fn lost_so_far(&self) -> Vec<Lost> {
        self.watchers.iter().map(Watcher::lost_so_far).collect()
    }

    /// Once the overload is over: a batch (made again until its window
    /// lost nothing), then every mode stopped; checks the batch in each
    /// mode's output, its memory, and its summary with `limit` as
    /// `--max-sockets`.
    fn finish(self, ns: &Netns, first_port: u16, limit: usize) -> Vec<Checked> {
        let netns = ns.inode();
        let (port, base) = lossless_batch(ns, &self.watchers, first_port);
        let secs = self.started.elapsed().as_secs_f64();
        let series = self.sampler.series();
        drop(self.sampler);
        let stopped: Vec<Stopped> = self.watchers.into_iter().map(Watcher::stop).collect();
        let mut out = Vec::new();
        for (i, s) in stopped.into_iter().enumerate() {
            let rss = check_rss(s.mode, self.start_rss[i], &series[i], s.peak_rss_kib);
            check_summary(&s, secs, rss, limit);
            match s.mode {
                Mode::Trace => check_trace_batch(&s.stdout, port, base, netns).unwrap(),
                Mode::Conns => check_conns_batch(&s.stdout, port, base, netns).unwrap(),
                Mode::Timewait => {}
            }
            out.push(Checked { stopped: s, secs });
        }
        out
    }
}

/// Checks and prints a mode's resident memory: `start` is (VmRSS, VmHWM)
/// once attached (the peak includes start-up: reading the kernel's BTF),
/// `series` the VmRSS samples, `hwm_kib` VmHWM at the end. Returns the
/// largest sample.
fn check_rss(mode: Mode, start: (u64, u64), series: &[u64], hwm_kib: u64) -> u64 {
    let (start_kib, start_hwm) = start;
    let max = series.iter().copied().max().unwrap_or(0).max(start_kib);
    // A new peak after start-up can only come from the run itself.
    let peak = if hwm_kib > start_hwm { hwm_kib } else { max };
    eprintln!(
        "{}: RSS {start_kib} KiB once attached (VmHWM {start_hwm} KiB, start-up included), at \
         most {max} KiB sampled ({} samples), VmHWM {hwm_kib} KiB at exit; growth {} KiB (cap \
         {RSS_GROWTH_CAP_KIB} KiB)",
        mode.name(),
        series.len(),
        peak.saturating_sub(start_kib)
    );
    assert!(
        peak <= start_kib + RSS_GROWTH_CAP_KIB,
        "{}: resident memory grew by {} KiB",
        mode.name(),
        peak - start_kib
    );
    max
}

/// A half-open flood toward a listener with a backlog of 1, then a batch.
#[test]
fn syn_flood_leaves_tcpwatch_bounded_and_right() {
    require_live!();
    let nofile = raise_nofile();
    let hold_sockets = (FLOOD_RATE * FLOOD_HOLD.as_secs_f64()) as u64 + 1000;
    assert!(
        nofile >= hold_sockets,
        "the flood holds up to {hold_sockets} sockets; RLIMIT_NOFILE is {nofile}"
    );
    let ns = timewait_netns();
    // Every SYN beyond the queue is dropped (no cookies), and a connect
    // gives up after one retransmission (about 3 s).
    ns.sysctl("net.ipv4.tcp_syncookies", "0");
    ns.sysctl("net.ipv4.tcp_syn_retries", "1");
    let target = SocketAddrV4::new(server_ip(), 9000);
    let listener = ns.in_ns(|| listen(target.into(), 1)).expect("listen");
    let run = Overload::start(&ns, &["--max-sockets", &MAX_SOCKETS.to_string()]);

    let f = flood(&ns, target, FLOOD_RATE, FLOOD_TIME, FLOOD_HOLD);
    eprintln!(
        "flood: {} half-open connects in {:.1} s ({:.0}/s), at most {} open at once; {} timed \
         out in SYN_SENT, {} completed a handshake, {} still connecting when closed, {} errors",
        f.attempts,
        f.elapsed.as_secs_f64(),
        f.rate(),
        f.peak_open,
        f.timed_out,
        f.connected,
        f.pending_at_close,
        f.errors
    );
    assert!(
        f.peak_open > 2 * MAX_SOCKETS as u64,
        "the flood never held more half-open sockets than --max-sockets: {f:?}"
    );
    assert!(
        f.timed_out > f.attempts / 2,
        "most half-open sockets should die of their SYN timeout: {f:?}"
    );
    // The accept queue's few connections go with the listener.
    drop(listener);
    ns.settle(Duration::from_secs(15));

    for c in run.finish(&ns, 9100, MAX_SOCKETS) {
        assert!(
            c.stopped.tracking().evicted > 0,
            "{}: the flood overflowed --max-sockets {MAX_SOCKETS} without an eviction: {}",
            c.stopped.mode.name(),
            c.stopped.summary.json()
        );
    }
}

/// A churn far above what a 4 KiB ring buffer holds, then a batch.
#[test]
fn ring_burst_is_counted_and_recovered_from() {
    require_live!();
    let ns = timewait_netns();
    // Room for the burst's timewait sockets and the batch's after them: a
    // quiet host churns past the default 131072 in 3 s, and a full table
    // makes no timewait socket for the batch.
    ns.sysctl("net.ipv4.tcp_max_tw_buckets", &(1u32 << 20).to_string());
    let ring = "4K";
    let run = Overload::start(&ns, &["--ring-size", ring]);
    let churn = Churn::start(&ns, 2, 2, None);
    std::thread::sleep(Duration::from_secs(3));
    let r = churn.stop();
    eprintln!(
        "burst: {} connections in {:.1} s ({:.0}/s, about {:.0} events/s) against a {ring} ring \
         buffer (about 26 records), {} failed",
        r.connections,
        r.elapsed.as_secs_f64(),
        r.rate(),
        10.0 * r.rate(),
        r.failed
    );
    ns.settle(Duration::from_secs(15));
    // tcpwatch checks its tables against the kernel's list a second after
    // it hears of lost events, and then at most every two seconds.
    std::thread::sleep(Duration::from_secs(3));
    let burst_lost = run.lost_so_far();

    for (c, lost) in run.finish(&ns, 9200, 262_144).iter().zip(burst_lost) {
        let s = &c.stopped;
        let name = s.mode.name();
        eprintln!(
            "{name}: lost during the burst: {} ({} ring buffer full, {:.0}/s over the run)",
            lost.total,
            lost.ring_full,
            lost.total as f64 / c.secs
        );
        assert!(
            lost.ring_full > 0,
            "{name}: the burst never filled a {ring} ring buffer (or it was not reported as it \
             happened): {lost:?}"
        );
        assert!(
            s.stderr.iter().any(|l| l.starts_with("tcpwatch: LOST ")),
            "{name}: lost events were not reported as they happened"
        );
        assert!(s.stream().lost.ring_full >= lost.ring_full);
    }
}

/// Figures every mode's exit summary must show after an overload: the
/// lost-event split, a peak of tracked sockets within `limit`, and
/// (almost) nothing still tracked. Prints them.
fn check_summary(s: &Stopped, secs: f64, rss_max_kib: u64, limit: usize) {
    let name = s.mode.name();
    let line = s.summary.json();
    let Stream { events, lost, .. } = s.stream();
    eprintln!("{name}: {line}");
    eprintln!(
        "{name}: {events} events ({:.0}/s over {secs:.1} s), lost {} ({} ring buffer full, {} \
         skipped by the kernel), RSS at most {rss_max_kib} KiB",
        events as f64 / secs,
        lost.total,
        lost.ring_full,
        lost.skipped,
    );
    let t = s.tracking();
    let peak = t.peak;
    assert!(
        peak <= limit && t.limit == limit,
        "{name}: tracked {peak} sockets at once, more than --max-sockets: {line}"
    );
    eprintln!(
        "{name}: {} sockets evicted, {} dropped as closed while their events were lost, {peak} \
         tracked at peak (limit {limit})",
        t.evicted, t.stale
    );
    let left = t.at_exit as u64;
    assert!(
        left <= FOREIGN_SLACK,
        "{name}: {left} sockets still tracked at exit after the overload ended: {line}"
    );
}

/// `tcpwatch daemon` inside `ns`, serving on the namespace's loopback;
/// asked from a thread that enters the namespace.
struct NsDaemon {
    proc: Proc,
    addr: SocketAddr,
}

impl NsDaemon {
    fn start(ns: &Netns, extra: &[&str]) -> NsDaemon {
        let addr = SocketAddr::from(([127, our_octet(), 0, 9], 9977));
        let mut cmd = ns.command(tcpwatch_bin());
        cmd.args([
            "daemon",
            "--log-format",
            "json",
            "--listen",
            &addr.to_string(),
        ])
        .args(extra);
        let proc = Proc::spawn("tcpwatch daemon in the test namespace", cmd, false);
        proc.wait_stderr(|l| l.contains("listening on http://"), 1, START_TIMEOUT);
        NsDaemon { proc, addr }
    }

    fn get(&self, ns: &Netns, path: &str) -> Response {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let r = ns
            .in_ns(|| request(self.addr, &raw))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r
    }

    fn tracked(&self, ns: &Netns) -> u64 {
        let text = self.get(ns, "/metrics").body;
        let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("/metrics: {e}"));
        metric(&samples, "tcpwatch_tracked_sockets")
            .unwrap_or_else(|| panic!("no tcpwatch_tracked_sockets in /metrics:\n{text}"))
            as u64
    }
}

/// The full sockets the kernel lists in `ns` (sock_diag, as `ss` shows
/// them): every TCP socket but the timewait ones.
fn kernel_full_sockets(ns: &Netns) -> u64 {
    ns.in_ns(|| {
        ss_lines(&["-o", "exclude", "time-wait"])
            .iter()
            .filter(|l| !l.contains("timer:(timewait,"))
            .count() as u64
    })
}

/// The daemon through a churn far above what a 4 KiB ring buffer holds:
/// sockets whose close was lost are swept as `conns` and `timewait` sweep
/// them, so once the churn is over `tcpwatch_tracked_sockets` falls to
/// what the kernel lists within a few seconds (give or take the other
/// programs on the host, whose sockets it tracks too).
#[test]
fn daemon_sweeps_what_a_ring_burst_left() {
    require_live!();
    /// Time after the churn (and the namespace) settled for the count to
    /// fall: the sweep runs a second after a loss is heard of, and finishes
    /// once the events from before the kernel's list was read have come.
    const SWEPT_WITHIN: Duration = Duration::from_secs(5);
    let ns = timewait_netns();
    let daemon = NsDaemon::start(&ns, &["--ring-size", "4K", "--interval", "1"]);
    let churn = Churn::start(&ns, 2, 2, None);
    std::thread::sleep(Duration::from_secs(3));
    let during = daemon.tracked(&ns);
    let r = churn.stop();
    ns.settle(Duration::from_secs(15));
    let settled = Instant::now();
    let health = daemon.get(&ns, "/healthz").body;
    let ring_full = serde_json::from_str::<Health>(&health)
        .unwrap_or_else(|e| panic!("/healthz: {e}: {health}"))
        .lost_ring_full;
    eprintln!(
        "burst: {} connections in {:.1} s ({:.0}/s) against a 4K ring buffer: {ring_full} events \
         lost with the ring buffer full; {during} sockets tracked during the churn",
        r.connections,
        r.elapsed.as_secs_f64(),
        r.rate()
    );
    assert!(
        ring_full > 0,
        "the burst never filled a 4K ring buffer: nothing for the sweep to do ({health})"
    );
    let (tracked, kernel) = loop {
        let tracked = daemon.tracked(&ns);
        let kernel = kernel_full_sockets(&ns);
        if tracked <= kernel + FOREIGN_SLACK || settled.elapsed() > SWEPT_WITHIN {
            break (tracked, kernel);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "{:.1?} after the churn settled: tcpwatch_tracked_sockets {tracked}, the kernel lists \
         {kernel} full sockets in the namespace",
        settled.elapsed()
    );
    assert!(
        tracked <= kernel + FOREIGN_SLACK,
        "{SWEPT_WITHIN:?} after the churn the daemon still tracks {tracked} sockets; the \
         kernel lists {kernel} in its namespace (and at most {FOREIGN_SLACK} may be other \
         programs')"
    );

    daemon.proc.signal(libc::SIGTERM);
    let f = daemon.proc.finish(STOP_TIMEOUT);
    assert!(f.status.success(), "{}: {}", f.status, f.stderr.join("\n"));
    let last: serde_json::Value =
        serde_json::from_str(f.stderr.last().expect("a last log line")).expect("a JSON log line");
    assert_eq!(last["message"], "stopped: programs detached", "{last}");
    let stale = last["stale"].as_u64().unwrap_or(0);
    eprintln!("daemon's last log line: {last}");
    assert!(
        stale > 0,
        "the daemon dropped no socket as closed while its events were lost: {last}"
    );
}
