//! The pool churn finding (`timewait`, the daemon's
//! `tcpwatch_pool_churn_*` series, `replay FILE timewait`) against known
//! traffic in a namespace of the test's own: a client that opens a
//! connection per request and closes it first is found, with the rate and
//! median lifetime the test made; a client that keeps one connection, a
//! slow one, and one whose server closes first are not. Real clients:
//! redis-benchmark reconnecting for every request (`-k 0`) is found;
//! keep-alive (`-k 1`, `ab -k`) and ab against nginx without keep-alive
//! (nginx closes first) are not.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use tcpwatch::model::churn::Churn;

use crate::require_live;
use crate::support::conns::Tw;
use crate::support::netns::Netns;
use crate::support::peer::{repeat, Peer};
use crate::support::real_servers::{have_servers, ns_ok, Nginx, Redis, PAGE};
use crate::support::summary::record_summary;
use crate::support::timewait::{
    client_ip, our_net, server_addr, server_ip, timewait_netns, Snap, Timewait,
};
use crate::support::{assert_one_line, now_ns, parse_ts, run_tcpwatch, Scratch};

/// The churn window these tests ask for (seconds): short, so that a few
/// seconds of traffic fill it.
const WINDOW_S: f64 = 3.0;
/// How close a measured rate or lifetime must be to what the test did.
const TOLERANCE: f64 = 0.2;

/// What one client of the test did: its comm, how many connections, and
/// when (wall clock, ns) it started and ended.
struct Did {
    comm: String,
    connections: u64,
    start_ns: i128,
    end_ns: i128,
    /// Each run of the client: (start, end, connections).
    runs: Vec<(i128, i128, u64)>,
}

impl Did {
    fn new(comm: String, connections: u64, start_ns: i128, end_ns: i128) -> Did {
        Did {
            comm,
            connections,
            start_ns,
            end_ns,
            runs: vec![(start_ns, end_ns, connections)],
        }
    }

    /// Another run after this one.
    fn then(&mut self, more: Did) {
        self.connections += more.connections;
        self.end_ns = more.end_ns;
        self.runs.extend(more.runs);
    }

    fn rate(&self) -> f64 {
        self.connections as f64 / ((self.end_ns - self.start_ns) as f64 / 1e9)
    }

    /// The rate the client made over the `window_s` seconds before `ts`
    /// (each run's connections taken as spread evenly over it).
    fn rate_in(&self, ts: i128, window_s: f64) -> f64 {
        let from = ts - (window_s * 1e9) as i128;
        let made: f64 = self
            .runs
            .iter()
            .map(|(a, b, n)| {
                let overlap = (ts.min(*b) - from.max(*a)).max(0) as f64;
                *n as f64 * overlap / (*b - *a).max(1) as f64
            })
            .sum();
        made / window_s
    }
}

/// Runs `client` (a peer named `comm` in `ns`) through `client_cmds`
/// while `server` runs `server_cmds`.
fn run_client(
    ns: &Netns,
    server: &mut Peer,
    comm: &str,
    connections: u64,
    client_cmds: &str,
    server_cmds: &str,
) -> Did {
    let served = server.send(server_cmds);
    let mut client = Peer::spawn(comm, Some(ns));
    let start_ns = now_ns();
    client.run(client_cmds);
    let end_ns = now_ns();
    server.wait(served);
    let comm = client.comm.clone();
    client.finish();
    Did::new(comm, connections, start_ns, end_ns)
}

/// The churn entries of `comm` in `snaps`, with their snapshot's time.
fn churn_of<'a>(snaps: &'a [Snap], comm: &str) -> Vec<(i128, &'a Churn)> {
    snaps
        .iter()
        .flat_map(|s| {
            s.churn
                .iter()
                .filter(move |c| c.process == comm)
                .map(move |c| (parse_ts(&s.ts), c))
        })
        .collect()
}

/// `did`'s churn is in `snaps`, toward `to`: every entry whose window lay
/// wholly within what the client did has its rate, a median lifetime
/// between `min_life_ms` and the time each connection took the client,
/// and all of them left TIME_WAIT. Returns how many such entries there
/// were (at least one).
fn check_found(what: &str, snaps: &[Snap], did: &Did, to: SocketAddr, min_life_ms: f64) -> usize {
    let found = churn_of(snaps, &did.comm);
    assert!(
        !found.is_empty(),
        "{what}: {} not found; processes: {:?}; churn: {:?}",
        did.comm,
        snaps.iter().map(|s| &s.by_process).collect::<Vec<_>>(),
        snaps.iter().map(|s| &s.churn).collect::<Vec<_>>()
    );
    let rate = did.rate();
    let per_conn_ms = 1e3 / rate;
    let inside: Vec<(i128, &Churn)> = found
        .iter()
        .filter(|(ts, c)| {
            *ts <= did.end_ns
                && *ts - (c.window_s * 1e9) as i128 >= did.start_ns
                && c.window_s > WINDOW_S - 1.0
        })
        .copied()
        .collect();
    assert!(
        !inside.is_empty(),
        "{what}: no window within the client's run: {found:?}"
    );
    for (ts, c) in &inside {
        let rate = did.rate_in(*ts, c.window_s);
        println!(
            "{what}: {} (the test: {rate:.1}/s in that window, {per_conn_ms:.2} ms a connection)",
            c.finding()
        );
        assert_eq!(c.destination, to.to_string(), "{what}: {c:?}");
        assert!(
            (c.rate_per_s / rate - 1.0).abs() <= TOLERANCE,
            "{what}: rate {} against the test's {rate}",
            c.rate_per_s
        );
        assert!(
            c.median_life_ms >= min_life_ms * (1.0 - TOLERANCE)
                && c.median_life_ms <= per_conn_ms * (1.0 + TOLERANCE),
            "{what}: median life {} ms, the test: at least {min_life_ms} ms, at most {per_conn_ms} ms",
            c.median_life_ms
        );
        assert_eq!(c.timewait_share, 1.0, "{what}: {c:?}");
    }
    inside.len()
}

fn check_not_found(what: &str, snaps: &[Snap], comm: &str) {
    let found = churn_of(snaps, comm);
    assert!(found.is_empty(), "{what}: {comm} reported: {found:?}");
}

/// The timewait sockets a process closed first on, in a snapshot.
fn closed_first(s: &Snap, comm: &str) -> u64 {
    Snap::count_of(&s.by_process, comm)
}

/// `tcpwatch replay FILE timewait --format json ARGS`, parsed.
fn replay_timewait(file: &Path, args: &[&str]) -> Vec<Snap> {
    let mut all = vec![
        "replay",
        file.to_str().unwrap(),
        "timewait",
        "--format",
        "json",
    ];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_tcpwatch(&all);
    assert_eq!(code, Some(0), "replay failed:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stdout.lines().map(Snap::parse).collect()
}

/// A pool-less client loop is found (live and in a replay of a recording
/// of the same events), with the rate and lifetime the test made; one
/// long connection carrying the same requests, a slow loop and a loop
/// whose server closes first are not. The replay counts the same
/// timewait sockets per process as the live view.
#[test]
fn a_pool_less_client_loop_is_found_and_pooled_slow_and_server_closed_ones_are_not() {
    require_live!();
    let ns = timewait_netns();
    let dir = Scratch::new("churn");
    let file = dir.join("churn.rec");
    let window = WINDOW_S.to_string();
    let net = our_net();
    let tw = Timewait::start(&ns, 1.0, &["--churn-window", &window]);
    let mut recorder = Tw::spawn_in(
        Some(&ns),
        &[
            "record",
            "--format",
            "json",
            "-o",
            file.to_str().unwrap(),
            "--laddr",
            &net,
        ],
    );
    recorder.wait_ready();

    let to = SocketAddr::from(server_addr());
    // From this run's own client address: the source loopback would
    // choose (127.0.0.1) is outside the `--laddr` tcpwatch watches.
    let from = format!("{}:0", client_ip());
    let mut server = Peer::spawn("churnsrv", Some(&ns));
    server.run(&format!("listen {to}"));
    let accept_eof = "accept; eof; close";
    // About 4.3 ms a connection: 1200 take five seconds, more than the
    // window and a snapshot.
    let n = 1200;
    let hold_ms = 4.0;
    let poolless = run_client(
        &ns,
        &mut server,
        "poolless",
        n,
        &repeat(
            &format!("connect_from {from} {to}; write 32; sleep 4; close"),
            n as usize,
        ),
        &repeat(accept_eof, n as usize),
    );
    // The same requests on one connection.
    let pooled = run_client(
        &ns,
        &mut server,
        "pooled",
        1,
        &format!(
            "connect_from {from} {to}; {}; close",
            repeat("write 32; sleep 4", n as usize)
        ),
        accept_eof,
    );
    // About six connections a second for four seconds.
    let slow = run_client(
        &ns,
        &mut server,
        "slowloop",
        25,
        &repeat(
            &format!("connect_from {from} {to}; write 32; sleep 4; close; sleep 150"),
            25,
        ),
        &repeat(accept_eof, 25),
    );
    // The server closes each first: TIME_WAIT on its side.
    let server_closes = run_client(
        &ns,
        &mut server,
        "srvcloses",
        n,
        &repeat(&format!("connect_from {from} {to}; eof; close"), n as usize),
        &repeat("accept; close", n as usize),
    );
    println!(
        "the test: poolless {:.1}/s, slowloop {:.1}/s, srvcloses {:.1}/s",
        poolless.rate(),
        slow.rate(),
        server_closes.rate()
    );
    let server_comm = server.comm.clone();
    server.finish();
    // Two more snapshots, so the last has every connection.
    let last = tw.count() + 2;
    let _ = tw.nth(last);
    let live = tw.stop().snaps;
    // Events the recorder lost (a busy host) are connections the replay
    // cannot count.
    let lost = record_summary(&recorder.stop().stderr).stream.lost.total;

    let inside = check_found("live", &live, &poolless, to, hold_ms);
    println!("live: {inside} snapshots within the pool-less loop");
    for c in [&pooled.comm, &slow.comm, &server_closes.comm] {
        check_not_found("live", &live, c);
    }
    // Every connection was seen: the closer of each holds its TIME_WAIT.
    let end = live.last().unwrap();
    // The clients' own, exactly; the server's (9000 a second, each
    // handed to a FIN_WAIT2 timewait socket first) nearly all.
    let want = [(&poolless.comm, n), (&pooled.comm, 1), (&slow.comm, 25)];
    let server_share = |s: &Snap| closed_first(s, &server_comm) as f64 / n as f64;
    assert!(
        server_share(live.last().unwrap()) >= 0.9,
        "live: {server_comm}"
    );
    for (comm, count) in want {
        assert_eq!(
            closed_first(end, comm),
            count,
            "live: {comm} in {:?}",
            end.by_process
        );
    }

    let replayed = replay_timewait(
        &file,
        &[
            "--interval",
            "1",
            "--churn-window",
            &window,
            "--laddr",
            &net,
        ],
    );
    assert!(
        replayed.iter().all(|s| s.from_recording),
        "not marked as from a recording"
    );
    let inside = check_found("replay", &replayed, &poolless, to, hold_ms);
    println!("replay: {inside} snapshots within the pool-less loop");
    for c in [&pooled.comm, &slow.comm, &server_closes.comm] {
        check_not_found("replay", &replayed, c);
    }
    let end = replayed.last().unwrap();
    assert!(server_share(end) >= 0.9, "replay: {server_comm}");
    for (comm, count) in want {
        if lost > 0 {
            println!("note: the recorder lost {lost} events");
            let got = closed_first(end, comm);
            assert!(
                got <= count && got + lost >= count,
                "replay: {comm} {got} of {count}"
            );
            continue;
        }
        assert_eq!(
            closed_first(end, comm),
            count,
            "replay: {comm} in {:?}",
            end.by_process
        );
    }
    assert_eq!(
        end.kernel.fin_timeout_s,
        live.last().unwrap().kernel.fin_timeout_s
    );
    assert_eq!((end.kernel_listed, end.kernel.port_range), (None, None));
}

/// A file that is no recording, or none at all: one line, exit 1.
#[test]
fn replay_timewait_of_a_bad_file_says_so_in_one_line() {
    let dir = Scratch::new("badrec");
    let junk = dir.write("junk.rec", "this is not a recording\n");
    let missing = dir.join("missing.rec");
    for file in [junk, missing] {
        let (code, stdout, stderr) = run_tcpwatch(&["replay", file.to_str().unwrap(), "timewait"]);
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(stdout, "", "{file:?}");
        assert_one_line(&stderr, "replay of a bad file");
        assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
    }
}

/// Real clients, in namespaces of the test's own: redis-benchmark
/// reconnecting for every request (`-k 0`, it closes first) is found;
/// with keep-alive (`-k 1`) it is not, nor is ab with (`-k`) or without
/// keep-alive against nginx (without, nginx closes each connection first
/// and the TIME_WAIT is the server's).
#[test]
fn real_clients_without_a_pool_are_found_and_with_one_or_server_closed_are_not() {
    require_live!();
    if !have_servers() {
        return;
    }
    let ns = Netns::new();
    let window = WINDOW_S.to_string();
    // The clients connect from the source loopback chooses, 127.0.0.1:
    // watched too (the namespace is this test's own).
    let args = ["--churn-window", &window, "--laddr", "127.0.0.1"];
    let tw = Timewait::start(&ns, 1.0, &args);
    let redis_at = SocketAddr::from((server_ip(), 6379));
    let mut redis = Redis::start(&ns, redis_at);
    let benchmark = |keepalive: &str, requests: u64| -> Did {
        let start_ns = now_ns();
        let out = ns_ok(
            &ns,
            "redis-benchmark",
            &[
                "-h",
                &redis_at.ip().to_string(),
                "-p",
                "6379",
                "-c",
                "1",
                "-n",
                &requests.to_string(),
                "-k",
                keepalive,
                "-t",
                "get",
                "-q",
            ],
        );
        let end_ns = now_ns();
        assert!(out.contains("GET"), "{out}");
        Did::new(
            "redis-benchmark".into(),
            if keepalive == "0" { requests } else { 1 },
            start_ns,
            end_ns,
        )
    };
    // One test (GET; `-t ping` would run two), one connection per
    // request with `-k 0`. Keep-alive first: one connection (and the
    // one of its own setup).
    let started = Instant::now();
    let _ = benchmark("1", 50_000);
    let keepalive_for = started.elapsed();
    let _ = tw.nth(tw.count() + 1);
    let kept = tw.stop().snaps;
    check_not_found("redis-benchmark -k 1", &kept, "redis-benchmark");
    println!("redis-benchmark -k 1: {keepalive_for:?}, not reported");

    let tw = Timewait::start(&ns, 1.0, &args);
    // Reconnecting, in short runs one after another for long enough to
    // fill a window and a snapshot after it: at full speed (12,000 a
    // second here) the ports in TIME_WAIT fill the range within a window
    // and connect() slows down, so the rate would not be steady.
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    let mut did = benchmark("0", 200);
    while did.end_ns - did.start_ns < ((WINDOW_S + 3.0) * 1e9) as i128 {
        did.then(benchmark("0", 200));
    }
    let _ = tw.nth(tw.count() + 1);
    let snaps = tw.stop().snaps;
    // redis-benchmark opens a connection of its own first (a CONFIG
    // query): a lower bound on the life is the handshake, a few µs.
    let inside = check_found("redis-benchmark -k 0", &snaps, &did, redis_at, 0.0);
    println!("redis-benchmark -k 0: {inside} snapshots within the run");
    redis.stop();

    // ab against nginx, with and without keep-alive.
    let http = SocketAddr::from((server_ip(), 8080));
    let nginx = Nginx::start(&ns, &[http], 1, true);
    let tw = Timewait::start(&ns, 1.0, &args);
    let url = format!("http://{http}{PAGE}");
    let ab = |args: &[&str]| {
        let mut all = args.to_vec();
        // Fewer than the port range: no 4-tuple is reused, so every
        // one of nginx's timewait sockets stays.
        all.extend_from_slice(&["-c", "1", "-n", "4000", &url]);
        let out = ns_ok(&ns, "ab", &all);
        let done: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("Complete requests:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no request count in:\n{out}"));
        done
    };
    let with_keepalive = ab(&["-k"]);
    let started = Instant::now();
    let without = ab(&[]);
    let ab_rate = without as f64 / started.elapsed().as_secs_f64();
    let _ = tw.nth(tw.count() + 1);
    let snaps = tw.stop().snaps;
    println!(
        "ab -k: {with_keepalive} requests; ab: {without} requests, a connection each, {ab_rate:.0}/s"
    );
    assert_eq!((with_keepalive, without), (4000, 4000));
    assert!(ab_rate >= 100.0, "ab made {ab_rate}/s: too slow to tell");
    check_not_found("ab against nginx", &snaps, "ab");
    // nginx closed first on every one of ab's connections.
    let nginx_tw: u64 = snaps
        .iter()
        .map(|s| closed_first(s, "nginx"))
        .max()
        .unwrap_or(0);
    assert!(
        nginx_tw >= without,
        "nginx closed first on {nginx_tw} of {without}"
    );
    drop(nginx);
}
