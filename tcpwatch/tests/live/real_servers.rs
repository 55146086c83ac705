//! tcpwatch against real servers and clients from Debian (nginx driven by
//! ab and by curl, redis driven by redis-benchmark), each started by the
//! test inside network namespaces it made (a veth pair between two of
//! them, and loopback inside one), and checked against what the kernel and
//! the servers themselves say: tcpdump for segments, `ss` for states and
//! owners, nginx's access log for which worker served whom.
//!
//! - A server that closes first (nginx, keep-alive off) is handed to a
//!   FIN_WAIT2 timewait socket on the client's bare ACK; the client's FIN
//!   reaches that socket later. Every such close is orderly, in four
//!   segments, leaving TIME_WAIT (conns, ladder and the daemon agree), and
//!   only a client that never sends its FIN leaves FIN_WAIT2.
//! - A pre-fork server's connections belong to the worker that took them,
//!   from their handshake on (`trace --pid WORKER`), as `ss -tnp` says.
//! - A connection open before tracing (to redis) has exact byte counts, its
//!   role from the listener table and a lifetime that is a lower bound; the
//!   listener's close is not a connection.
//!
//! The clients are the peers of `support::peer` (the test binary
//! re-executed) and Debian's own programs, in `support::netns`'s namespaces. Run them one at a time:
//! `TCPWATCH_BPF_OBJECT=<object> cargo test -p tcpwatch --test live -- --test-threads=1 real_servers::`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::require_live;
use crate::support::conns::{fin_timeout_s, ladder_blocks, teardown_in_capture, Capture, Conn, Tw};
use crate::support::daemon::{metric, Daemon};
use crate::support::netns::{Netns, VethPair, VETH_A, VETH_B};
use crate::support::peer::Peer;
use crate::support::real_servers::*;
use crate::support::trace::Line;
use crate::support::{have, now_ns, parse_ts};

const HTTP_PORT: u16 = 8080;
const REQUESTS: usize = 300;

/// Records of `conns --format json` lines with local endpoint `local` in
/// network namespace `ns` (other tests may use the same address in
/// theirs).
fn records_at(lines: &[String], ns: &Netns, local: SocketAddr) -> Vec<Conn> {
    let wanted = at(ns, local);
    lines
        .iter()
        .filter(|l| wanted(l))
        .map(|l| Conn::parse(l))
        .collect()
}

/// A JSON line's predicate: local endpoint `local` in namespace `ns`.
fn at(ns: &Netns, local: SocketAddr) -> impl Fn(&str) -> bool {
    let addr = format!("\"saddr\":\"{}\"", local.ip());
    let port = format!("\"sport\":{},", local.port());
    let netns = format!("\"netns\":{},", ns.inode());
    move |l: &str| l.contains(&addr) && l.contains(&port) && l.contains(&netns)
}

/// Runs `ab -n REQUESTS -c 1` in `ns` against `url` (with more at once,
/// ab opens a few connections it closes unused); the bytes it received per
/// request (headers and body, from its "Total transferred").
fn ab(ns: &Netns, url: &str) -> u64 {
    let out = ns_ok(ns, "ab", &["-n", &REQUESTS.to_string(), "-c", "1", url]);
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no '{name}' in ab's report:\n{out}"))
    };
    assert_eq!(field("Complete requests:"), REQUESTS as u64, "{out}");
    assert_eq!(field("Failed requests:"), 0, "{out}");
    let total = field("Total transferred:");
    assert_eq!(total % REQUESTS as u64, 0, "{out}");
    total / REQUESTS as u64
}

/// Every route of `dev` in `ns` (and for loopback, the local route of
/// 127.0.0.1) made to ACK at once.
fn quickack_on(ns: &Netns, dev: &str) {
    if dev == "lo" {
        quickack(
            ns,
            &[
                "local",
                "127.0.0.1",
                "dev",
                "lo",
                "table",
                "local",
                "proto",
                "kernel",
                "scope",
                "host",
                "src",
                "127.0.0.1",
            ],
        );
        return;
    }
    let routes = ns.ip(&["route", "show", "dev", dev]);
    for r in routes.lines().filter(|l| !l.trim().is_empty()) {
        let mut args: Vec<&str> = r.split_whitespace().collect();
        args.extend_from_slice(&["dev", dev]);
        quickack(ns, &args);
    }
}

/// One ab run's case: where the server listened, where its clients were.
struct Case<'a> {
    name: &'static str,
    server: SocketAddr,
    client_ns: &'a Netns,
    capture: Capture,
    bytes_per_request: u64,
}

/// nginx closes first (keep-alive off) and never lingers; its clients ACK
/// its FIN at once, alone: each of its sockets is handed to a FIN_WAIT2
/// timewait socket, and each client's FIN reaches that socket a moment
/// later. tcpdump shows four teardown segments (two FINs) for each of the
/// 300 connections, `ss` shows 300 TIME-WAIT sockets and no FIN-WAIT-2:
/// tcpwatch must say orderly, closed by local, 4 segments, TIME_WAIT, for
/// a client on this host (loopback) and one behind a veth in another
/// namespace, in `conns`, in `ladder`'s closing words and in the daemon's
/// `tcpwatch_connections_closed_total{kind}`.
#[test]
fn server_that_closes_first_is_orderly_with_time_wait_in_four_segments() {
    require_live!();
    if !have_servers() {
        return;
    }
    let pair = VethPair::create();
    quickack_on(&pair.a, "lo");
    quickack_on(&pair.b, VETH_B);
    let local = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), HTTP_PORT);
    let remote = SocketAddr::new(pair.addr_a.into(), HTTP_PORT);
    let nginx = Nginx::start(&pair.a, &[local, remote], 2, false);
    // Other tests may churn meanwhile: a large --keep holds this test's
    // records until it reads them.
    let daemon = Daemon::start(&["--keep", "100000"]);
    // tcpwatch runs in the server's namespace and watches both: the
    // clients are in the other one.
    let mut conns = Tw::spawn_in(
        Some(&pair.a),
        &["conns", "--netns", "all", "--format", "json"],
    );
    let mut ladder = Tw::spawn_in(Some(&pair.a), &["ladder", "--netns", "all"]);
    conns.wait_ready();
    ladder.wait_ready();
    let before = daemon.metrics();
    let first_seq = daemon.get_as::<Value>("/api/conns?limit=1")["next"]
        .as_u64()
        .unwrap();

    let mut cases = Vec::new();
    for (name, server, client_ns, iface) in [
        ("client on this host (loopback)", local, &pair.a, "lo"),
        (
            "client behind a veth in another namespace",
            remote,
            &pair.b,
            VETH_A,
        ),
    ] {
        let capture = Capture::start_in(Some(&pair.a), iface, &format!("tcp port {HTTP_PORT}"));
        let bytes_per_request = ab(client_ns, &format!("http://{server}{PAGE}"));
        cases.push(Case {
            name,
            server,
            client_ns,
            capture,
            bytes_per_request,
        });
    }
    for c in &cases {
        conns.wait_lines(at(&pair.a, c.server), REQUESTS, at(&pair.a, c.server));
    }
    // The kernel's view, while the timewait sockets last (60 s).
    let time_wait = ss_peer_ports(&pair.a, "time-wait", HTTP_PORT);
    let fin_wait2 = ss_peer_ports(&pair.a, "fin-wait-2", HTTP_PORT);
    let served = nginx.served();
    let workers: HashSet<u32> = nginx.workers().iter().copied().collect();
    let mut ladder_headers = Vec::new();
    let finished = conns.stop();
    let mut all_server_ports = Vec::new();
    for c in cases {
        let segments = c.capture.stop();
        let records = records_at(&finished.stdout, &pair.a, c.server);
        assert_eq!(records.len(), REQUESTS, "{}: server records", c.name);
        let mut by_segments: HashMap<String, usize> = HashMap::new();
        // Known limit (README, Limits): when the peer's FIN reaches the full
        // socket itself (still in FIN_WAIT2, not yet handed off), tcpwatch
        // cannot tell it from a FIN that rode on the ACK and says 3. Seen
        // on at most one connection of 600; counted, bounded and printed.
        let mut said_three = Vec::new();
        let mut on_wire: HashMap<u16, u64> = HashMap::new();
        for r in &records {
            r.check_shape();
            let peer = r.dport;
            all_server_ports.push(peer);
            let (count, counted) = teardown_in_capture(&segments, HTTP_PORT, peer);
            let fins = counted.iter().filter(|l| l.contains("[F")).count();
            // Two FINs; usually four segments, three when ab's FIN rode on
            // its ACK of nginx's FIN (tcpwatch must then say 3 too).
            assert!(
                fins == 2 && (count == 4 || count == 3),
                "{}: tcpdump for port {peer}: {counted:#?}",
                c.name
            );
            on_wire.insert(peer, count as u64);
            let segs = if count == 4 && r.v["teardown_segments"] == 3 {
                said_three.push(r.line.clone());
                3u64
            } else {
                count as u64
            };
            r.expect(
                c.name,
                &[
                    ("role", "server".into()),
                    ("open", "passive".into()),
                    ("close", "orderly".into()),
                    ("closed_by", "local".into()),
                    ("teardown_segments", segs.into()),
                    ("comm", "nginx".into()),
                    ("owner_source", "observed".into()),
                    ("bytes_sent", c.bytes_per_request.into()),
                ],
            );
            assert_eq!(r.timewait_left(), Some(("TIME_WAIT", 60.0)), "{}", r.line);
            assert!(
                workers.contains(&(r.pid.unwrap_or(0))),
                "{}: not a worker: {}",
                c.name,
                r.line
            );
            // nginx's own count of the request's bytes, and the worker that
            // served it.
            let client = format!("{}:{peer}", r.daddr);
            let (_, worker) = served
                .iter()
                .find(|(who, _)| *who == client)
                .unwrap_or_else(|| panic!("{client} not in nginx's access log"));
            assert_eq!(r.pid.unwrap_or(0), *worker, "{}", r.line);
            assert!(
                time_wait.contains(&peer),
                "{}: ss has no TIME-WAIT socket for {peer}",
                c.name
            );
            *by_segments
                .entry(format!("{} in {count} segments", r.close))
                .or_default() += 1;
            if count == 4 && segs == 4 {
                ladder_headers.push((format!("{client} <-> {}   ", c.server), c.server, c.name));
            }
        }
        println!(
            "{}: {} of {REQUESTS} server records said 3 teardown segments where tcpdump saw 4: {said_three:#?}",
            c.name,
            said_three.len()
        );
        assert!(
            said_three.len() * 100 <= REQUESTS,
            "{}: more than 1% said 3 segments where tcpdump saw 4",
            c.name
        );
        // ab's own sockets: closed second, by the FIN's arrival.
        let clients: Vec<Conn> = finished
            .stdout
            .iter()
            .filter(|l| {
                l.contains(&format!("\"dport\":{HTTP_PORT},"))
                    && l.contains(&format!("\"daddr\":\"{}\"", c.server.ip()))
                    && l.contains(&format!("\"netns\":{},", c.client_ns.inode()))
            })
            .map(|l| Conn::parse(l))
            .collect();
        assert_eq!(clients.len(), REQUESTS, "{}: ab's records", c.name);
        for r in &clients {
            let wire = on_wire.get(&r.sport).copied();
            r.expect(
                c.name,
                &[
                    ("role", "client".into()),
                    ("comm", "ab".into()),
                    ("close", "orderly".into()),
                    ("closed_by", "peer".into()),
                    ("teardown_segments", wire.into()),
                    ("timewait", Value::Null),
                    ("bytes_received", c.bytes_per_request.into()),
                ],
            );
        }
        println!(
            "{}: {} server connections by close kind {:?}; tcpwatch's segments equal tcpdump's (2 FINs each)",
            c.name, REQUESTS, by_segments
        );
    }
    assert!(
        fin_wait2.is_empty(),
        "ss lists FIN-WAIT-2 sockets on port {HTTP_PORT}: {fin_wait2:?}"
    );
    println!(
        "ss in the server's namespace: {} TIME-WAIT sockets on port {HTTP_PORT}, {} FIN-WAIT-2",
        time_wait.len(),
        fin_wait2.len()
    );

    // ladder: the closing words of each of the 600 connections.
    let prefixes: Vec<String> = ladder_headers.iter().map(|(p, _, _)| p.clone()).collect();
    ladder.wait_lines(
        |l| prefixes.iter().any(|p| l.starts_with(p.as_str())),
        prefixes.len(),
        |l| l.contains(&format!(":{HTTP_PORT}")),
    );
    let blocks = ladder_blocks(&ladder.stop().stdout);
    for (prefix, server, name) in &ladder_headers {
        let block = blocks
            .iter()
            .find(|b| b.header.starts_with(prefix.as_str()))
            .unwrap_or_else(|| panic!("{name}: no ladder for {prefix}"));
        let text = block.text();
        for words in [
            format!("server {server} closed first; teardown took 4 segments: FIN, ACK, FIN, ACK each on its own"),
            "the peer's FIN reached it later, and it moved to TIME_WAIT".to_string(),
            format!("server {server} left a TIME_WAIT socket holding the 4-tuple for 60s"),
        ] {
            assert!(text.contains(&words), "{name}: ladder lacks '{words}':\n{text}");
        }
        assert!(
            !text.contains("FIN_WAIT2 socket holding"),
            "{name}:\n{text}"
        );
    }

    // The daemon: the same 600 server connections, and counters that agree
    // with the records it published.
    let ours: HashSet<u16> = all_server_ports.iter().copied().collect();
    let server_netns = pair.a.inode();
    let page: Value = daemon.wait_for(
        &format!("/api/conns?limit=100000&since={first_seq}"),
        Duration::from_secs(20),
        |v: &Value| {
            v["conns"].as_array().is_some_and(|a| {
                a.iter()
                    .filter(|c| {
                        c["sport"] == HTTP_PORT
                            && c["netns"] == server_netns
                            && ours.contains(&(c["dport"].as_u64().unwrap_or(0) as u16))
                    })
                    .count()
                    >= 2 * REQUESTS
            })
        },
    );
    let after = daemon.metrics();
    let published = page["conns"].as_array().unwrap();
    let mut ours_by_kind: HashMap<String, usize> = HashMap::new();
    let mut all_by_kind: HashMap<String, usize> = HashMap::new();
    for c in published {
        let kind = c["close"].as_str().unwrap().to_string();
        *all_by_kind.entry(kind.clone()).or_default() += 1;
        if c["sport"] == HTTP_PORT
            && c["netns"] == server_netns
            && ours.contains(&(c["dport"].as_u64().unwrap() as u16))
        {
            assert_eq!(
                (
                    c["teardown_segments"].as_u64(),
                    c["timewait"]["state"].as_str()
                ),
                (Some(4), Some("TIME_WAIT")),
                "{c}"
            );
            *ours_by_kind.entry(kind).or_default() += 1;
        }
    }
    assert_eq!(
        ours_by_kind,
        HashMap::from([("orderly".to_string(), 2 * REQUESTS)]),
        "the daemon's records of nginx's side"
    );
    let delta = |kind: &str| {
        let series = format!("tcpwatch_connections_closed_total{{kind=\"{kind}\"}}");
        metric(&after, &series).unwrap_or(0.0) - metric(&before, &series).unwrap_or(0.0)
    };
    // Every connection it published was counted once under its kind (other
    // traffic on this host included: the counters cover the whole host).
    assert_eq!(
        page["missed"], 0,
        "the daemon dropped records: raise --keep"
    );
    for kind in ["orderly", "fin_wait2"] {
        let published = all_by_kind.get(kind).copied().unwrap_or(0) as f64;
        assert!(
            delta(kind) >= published,
            "closed_total{{kind=\"{kind}\"}} grew by {} but {published} such records were published",
            delta(kind)
        );
    }
    println!(
        "daemon: closed_total grew by orderly {} fin_wait2 {}; of nginx's 600: {ours_by_kind:?}",
        delta("orderly"),
        delta("fin_wait2")
    );
    daemon.stop();
    drop(nginx);
}

/// The host side of settling a hand-off: an exact, batched sock_diag
/// lookup of 4-tuples, checked against sockets the test put in each state
/// in a namespace of its own (as `ss` lists them).
#[test]
fn exact_lookup_tells_each_timewait_substate() {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use tcpwatch::host::sockdiag::{ExactLookup, Found};
    use tcpwatch::model::{Endpoint, TcpState};
    require_live!();
    if !have(&["ss"]) {
        return;
    }
    let ns = Netns::new();
    quickack_on(&ns, "lo");
    let ep = |a: SocketAddr| Endpoint::new(a.ip(), a.port());
    let (found, expected, ss_fw2, ss_tw) = ns.in_ns(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let pair_up = || {
            let c = TcpStream::connect(server).unwrap();
            let (s, _) = listener.accept().unwrap();
            (c, s)
        };
        // TIME_WAIT: the client closes first, the server at once after.
        let (c, mut s) = pair_up();
        let tw = c.local_addr().unwrap();
        drop(c);
        s.read_to_end(&mut Vec::new()).unwrap();
        drop(s);
        // FIN_WAIT2: the client closes first, the server never does (its
        // quick ACK hands the client's socket to a timewait socket).
        let (c, mut held) = pair_up();
        let fw2 = c.local_addr().unwrap();
        drop(c);
        held.read_to_end(&mut Vec::new()).unwrap();
        // A connection still open, and a 4-tuple nobody has.
        let (mut open_c, _open_s) = pair_up();
        open_c.write_all(b"x").unwrap();
        let open = open_c.local_addr().unwrap();
        let nobody: SocketAddr = "127.0.0.1:9".parse().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let asked = [
            (ep(tw), ep(server)),
            (ep(fw2), ep(server)),
            (ep(open), ep(server)),
            (ep(nobody), ep(server)),
            // The server's own port with a peer it never had: the kernel
            // falls back to the listener, which is not this 4-tuple.
            (ep(server), ep(nobody)),
        ];
        let found = ExactLookup::open().unwrap().lookup(&asked).unwrap();
        let (ss_fw2, ss_tw) = (
            ss_lines(&ns, "fin-wait-2", ""),
            ss_lines(&ns, "time-wait", ""),
        );
        open_c.shutdown(Shutdown::Both).unwrap();
        drop(held);
        (found, [tw, fw2], ss_fw2, ss_tw)
    });
    println!("lookups: {found:?}");
    let listed =
        |lines: &[String], a: SocketAddr| lines.iter().any(|l| l.contains(&format!(" {a} ")));
    assert!(
        listed(&ss_tw, expected[0]) && listed(&ss_fw2, expected[1]),
        "ss: {ss_tw:?} {ss_fw2:?}"
    );
    let substate = |f: &Found| match f {
        Found::Timewait(t) => Some(t.substate),
        _ => None,
    };
    assert_eq!(substate(&found[0]), Some(TcpState::TimeWait), "{found:?}");
    assert_eq!(substate(&found[1]), Some(TcpState::FinWait2), "{found:?}");
    assert_eq!(found[2], Found::Connected);
    assert_eq!(found[3], Found::Nothing);
    assert_eq!(found[4], Found::Nothing);
}

/// The same server, but its client reads the whole response and then
/// neither closes nor sends anything: its ACK of the server's FIN hands the
/// server's socket to a FIN_WAIT2 timewait socket, which stays in FIN_WAIT2
/// (`ss`), with one FIN on the wire (tcpdump). That, and only that, is
/// `fin_wait2`.
#[test]
fn server_whose_client_never_sends_fin_stays_fin_wait2() {
    require_live!();
    if !have_servers() {
        return;
    }
    let pair = VethPair::create();
    quickack_on(&pair.b, VETH_B);
    let server = SocketAddr::new(pair.addr_a.into(), HTTP_PORT);
    let _nginx = Nginx::start(&pair.a, &[server], 1, false);
    let mut conns = Tw::spawn_in(
        Some(&pair.a),
        &["conns", "--netns", "all", "--format", "json"],
    );
    conns.wait_ready();
    let capture = Capture::start_in(Some(&pair.a), VETH_A, &format!("tcp port {HTTP_PORT}"));
    let mut client = Peer::spawn("twc-http", Some(&pair.b));
    let port: u16 = client.run1(&format!("connect {server}")).parse().unwrap();
    client.run(&format!("send GET {PAGE} HTTP/1.0\\r\\n\\r\\n"));
    let received: usize = client.run1("eof").parse().unwrap();
    assert!(received > PAGE_BYTES, "{received} bytes");
    let eof_at = now_ns();
    conns.wait_lines(
        |l| at(&pair.a, server)(l) && l.contains(&format!("\"dport\":{port},")),
        1,
        |l| l.contains(&format!(":{port}")) || l.contains(&format!("\"dport\":{port},")),
    );
    let reported_at = now_ns();
    // The kernel's view while the client still holds its socket open.
    let fin_wait2 = ss_peer_ports(&pair.a, "fin-wait-2", HTTP_PORT);
    let time_wait = ss_peer_ports(&pair.a, "time-wait", HTTP_PORT);
    let segments = capture.stop();
    let finished = conns.stop();
    client.run("close");
    let records: Vec<Conn> = records_at(&finished.stdout, &pair.a, server)
        .into_iter()
        .filter(|r| r.dport == port)
        .collect();
    assert_eq!(records.len(), 1, "{:#?}", finished.stdout);
    let r = &records[0];
    println!("server record: {}", r.line);
    let (_, counted) = teardown_in_capture(&segments, HTTP_PORT, port);
    let fins = counted.iter().filter(|l| l.contains("[F")).count();
    assert_eq!(fins, 1, "tcpdump: one FIN, the server's: {counted:#?}");
    assert!(
        fin_wait2.contains(&port),
        "ss: no FIN-WAIT-2 socket for {port}: {fin_wait2:?}"
    );
    assert!(!time_wait.contains(&port), "ss: TIME-WAIT for {port}");
    r.expect(
        "server, its client never sent a FIN",
        &[
            ("close", "fin_wait2".into()),
            ("closed_by", "local".into()),
            ("teardown_segments", Value::Null),
        ],
    );
    assert_eq!(
        r.timewait_left(),
        Some(("FIN_WAIT2", fin_timeout_s())),
        "{}",
        r.line
    );
    // Said once the last check still found it waiting, about a second
    // after the close.
    let closed = parse_ts(&r.ts);
    assert!(
        closed <= eof_at + 100_000_000,
        "closed at {closed}, EOF read at {eof_at}"
    );
    assert!(
        reported_at - closed >= 900_000_000,
        "reported {} ms after the close",
        (reported_at - closed) / 1_000_000
    );
}

/// nginx with two workers, keep-alive on, started before tcpwatch: the
/// master made the listener, the workers take its connections. Twelve
/// clients hold keep-alive connections open (`ss -tnp` names the worker
/// that holds each), and twenty short-lived curl processes come and go
/// (nginx's access log names the worker that served each). `trace --pid W`
/// for each worker W must show every transition of exactly W's
/// connections, the handshake included, as W's; `conns` must name W.
#[test]
fn pre_fork_server_connections_belong_to_the_worker_that_took_them() {
    require_live!();
    if !have_servers() {
        return;
    }
    let pair = VethPair::create();
    let server = SocketAddr::new(pair.addr_a.into(), HTTP_PORT);
    let nginx = Nginx::start(&pair.a, &[server], 2, true);
    let workers = nginx.workers().to_vec();
    println!("nginx master {} workers {workers:?}", nginx.master);
    let mut traces: Vec<(u32, Tw)> = workers
        .iter()
        .map(|w| {
            let pid = w.to_string();
            (
                *w,
                Tw::spawn_in(
                    Some(&pair.a),
                    &["trace", "--netns", "all", "--format", "json", "--pid", &pid],
                ),
            )
        })
        .collect();
    let mut conns = Tw::spawn_in(
        Some(&pair.a),
        &["conns", "--netns", "all", "--format", "json"],
    );
    for (_, t) in &mut traces {
        t.wait_ready();
    }
    conns.wait_ready();

    // Twelve keep-alive connections, held open.
    let mut holders = Vec::new();
    let mut held_ports = Vec::new();
    for i in 0..12 {
        let mut a = Peer::spawn(&format!("twc-keep{i}"), Some(&pair.b));
        let port: u16 = a.run1(&format!("connect {server}")).parse().unwrap();
        a.run(&format!(
            "send GET {PAGE} HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n; read_http"
        ));
        held_ports.push(port);
        holders.push(a);
    }
    // Each is owned by a worker once that worker has taken it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let owners = loop {
        let owners = ss_owners(&pair.a, HTTP_PORT);
        if held_ports.iter().all(|p| owners.contains_key(p)) {
            break owners;
        }
        assert!(
            Instant::now() < deadline,
            "ss -tnp never named owners for {held_ports:?}: {owners:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Twenty curl processes, one connection each.
    let mut curls = Vec::new();
    for _ in 0..20 {
        let mut cmd = pair.b.command("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{local_port}",
            &format!("http://{server}{PAGE}"),
        ]);
        let child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "curl: {out:?}");
        let port: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        curls.push((port, pid));
    }
    // The held clients close first; nginx closes after them.
    for mut a in holders {
        a.run("close");
    }
    let served: HashMap<u16, u32> = nginx
        .served()
        .iter()
        .filter_map(|(who, pid)| Some((who.rsplit_once(':')?.1.parse().ok()?, *pid)))
        .collect();
    // Who owns what, by the kernel (held) and by nginx (curl).
    let mut owner_of: HashMap<u16, u32> = held_ports.iter().map(|p| (*p, owners[p])).collect();
    for (port, _) in &curls {
        owner_of.insert(
            *port,
            *served
                .get(port)
                .unwrap_or_else(|| panic!("port {port} not in nginx's access log")),
        );
    }
    for w in owner_of.values() {
        assert!(workers.contains(w), "{w} is not a worker of {workers:?}");
    }
    let by_worker: HashMap<u32, usize> = owner_of.values().fold(HashMap::new(), |mut m, w| {
        *m.entry(*w).or_default() += 1;
        m
    });
    println!("connections by worker (ss -tnp for the held ones, the access log for curl's): {by_worker:?}");

    let mut trace_lines: HashMap<u32, Vec<Line>> = HashMap::new();
    for (w, mut t) in traces {
        let mine: Vec<u16> = owner_of
            .iter()
            .filter(|(_, o)| **o == w)
            .map(|(p, _)| *p)
            .collect();
        let ends: Vec<String> = mine.iter().map(|p| format!("\"dport\":{p},")).collect();
        t.wait_lines(
            |l| l.contains("\"new\":\"CLOSE\"") && ends.iter().any(|e| l.contains(e.as_str())),
            mine.len(),
            |l| l.contains(&format!("\"sport\":{HTTP_PORT},")),
        );
        let f = t.stop();
        trace_lines.insert(w, f.stdout.iter().map(|l| Line::parse(l)).collect());
    }
    let conn_records: Vec<Conn> = {
        let ports: Vec<String> = owner_of.keys().map(|p| format!("\"dport\":{p},")).collect();
        conns.wait_lines(
            |l| at(&pair.a, server)(l) && ports.iter().any(|p| l.contains(p.as_str())),
            owner_of.len(),
            |l| l.contains(&format!(":{HTTP_PORT}")),
        );
        conns.stop().stdout.iter().map(|l| Conn::parse(l)).collect()
    };
    // Other tests may use the same addresses in namespaces of their own.
    let (server_ns, client_ns) = (pair.a.inode(), pair.b.inode());
    let accepted = [
        ("LISTEN", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
    ];
    for (port, worker) in &owner_of {
        for (w, lines) in &trace_lines {
            let of_conn: Vec<&Line> = lines
                .iter()
                .filter(|l| {
                    l.sport == HTTP_PORT
                        && l.dport == *port
                        && l.saddr == server.ip().to_string()
                        && l.netns == Some(server_ns)
                })
                .collect();
            if w != worker {
                assert!(
                    of_conn.is_empty(),
                    "trace --pid {w} shows {worker}'s connection {port}: {of_conn:#?}"
                );
                continue;
            }
            let steps: Vec<(&str, &str)> = of_conn.iter().map(|l| l.transition()).collect();
            assert_eq!(
                steps, accepted,
                "trace --pid {w}, connection from port {port}: {of_conn:#?}"
            );
            for l in &of_conn {
                assert_eq!(
                    (l.pid, l.comm.as_deref(), l.owner_source.as_deref()),
                    (Some(*worker), Some("nginx"), Some("observed")),
                    "{l:?}"
                );
            }
        }
        let server_side: Vec<&Conn> = conn_records
            .iter()
            .filter(|c| c.sport == HTTP_PORT && c.dport == *port && c.netns == Some(server_ns))
            .collect();
        assert_eq!(server_side.len(), 1, "port {port}");
        server_side[0].expect(
            "nginx's side",
            &[
                ("pid", (*worker).into()),
                ("comm", "nginx".into()),
                ("owner_source", "observed".into()),
            ],
        );
    }
    // curl's own sockets: each its own short-lived process.
    for (port, pid) in &curls {
        let client: Vec<&Conn> = conn_records
            .iter()
            .filter(|c| c.sport == *port && c.dport == HTTP_PORT && c.netns == Some(client_ns))
            .collect();
        assert_eq!(client.len(), 1, "curl's port {port}");
        client[0].expect(
            "curl",
            &[
                ("pid", (*pid).into()),
                ("comm", "curl".into()),
                ("role", "client".into()),
            ],
        );
    }
    drop(nginx);
}

/// RESP for `SET key <value>`, exactly `len` bytes long.
fn redis_set(len: usize) -> String {
    // *3 $3 SET $3 key $N value: 27 bytes and N's digits besides the value.
    let value_len = (len.saturating_sub(30)..len)
        .find(|n| 27 + n.to_string().len() + n == len)
        .expect("a value length");
    let cmd = format!(
        "*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n${value_len}\r\n{}\r\n",
        "v".repeat(value_len)
    );
    assert_eq!(cmd.len(), len);
    cmd
}

/// A redis connection opened a while before tcpwatch starts, with exactly
/// 1000 bytes sent and a 5-byte reply, closed after it started; then redis
/// stops (its listener closes). tcpwatch must report the connection's bytes
/// exactly, take its role from the listener table of the start, give a
/// lifetime that is a lower bound and say so, and not report the listener
/// as a connection. redis-benchmark's connections, made while tracing,
/// belong to redis-benchmark and to redis.
#[test]
fn connection_open_before_tracing_is_counted_exactly() {
    require_live!();
    if !have_servers() {
        return;
    }
    let pair = VethPair::create();
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 6379);
    let mut redis = Redis::start(&pair.a, addr);
    let mut client = Peer::spawn("twc-redis", Some(&pair.a));
    let connected_at = now_ns();
    let port: u16 = client.run1(&format!("connect {addr}")).parse().unwrap();
    let request = redis_set(1000).replace('\r', "\\r").replace('\n', "\\n");
    assert_eq!(client.run1(&format!("send {request}")), "1000");
    client.run("read 5");
    std::thread::sleep(Duration::from_millis(1500));

    let mut json = Tw::spawn_in(
        Some(&pair.a),
        &["conns", "--netns", "all", "--format", "json"],
    );
    let mut text = Tw::spawn_in(Some(&pair.a), &["conns", "--netns", "all"]);
    json.wait_ready();
    text.wait_ready();
    let ready_at = now_ns();
    let bench = ns_ok(
        &pair.a,
        "redis-benchmark",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            "6379",
            "-n",
            "200",
            "-c",
            "4",
            "-t",
            "ping,set",
            "-q",
        ],
    );
    println!("redis-benchmark: {}", bench.trim());
    std::thread::sleep(Duration::from_millis(500));
    client.run("close");
    let closed_at = now_ns();
    let keys = [(port, 6379), (6379, port)];
    json.wait_conns(&keys);
    text.wait_lines(
        |l| l.contains(&format!("127.0.0.1:{port} ")),
        2,
        |l| l.contains(":6379"),
    );
    redis.stop();
    // The listener's close comes through before the summary.
    std::thread::sleep(Duration::from_millis(300));
    let records: Vec<Conn> = json.stop().stdout.iter().map(|l| Conn::parse(l)).collect();
    let text_lines = text.stop().stdout;

    // Other tests may use the same ports in namespaces of their own.
    let netns = pair.a.inode();
    let find = |local: u16, remote: u16| -> &Conn {
        let hits: Vec<&Conn> = records
            .iter()
            .filter(|c| {
                c.sport == local
                    && c.dport == remote
                    && c.saddr == IpAddr::V4(Ipv4Addr::LOCALHOST)
                    && c.netns == Some(netns)
            })
            .collect();
        assert_eq!(hits.len(), 1, "{local} -> {remote}: {hits:#?}");
        hits[0]
    };
    let c = find(port, 6379);
    let s = find(6379, port);
    println!("client: {}\nserver: {}", c.line, s.line);
    c.expect(
        "client, open before tracing",
        &[
            ("open", "before_trace".into()),
            ("before_trace", true.into()),
            ("role", "client".into()),
            ("pid", client.pid.into()),
            ("bytes_sent", 1000.into()),
            ("bytes_received", 5.into()),
            ("close", "orderly".into()),
            ("closed_by", "local".into()),
        ],
    );
    s.expect(
        "redis's side, open before tracing",
        &[
            ("open", "before_trace".into()),
            ("role", "server".into()),
            ("pid", redis.pid.into()),
            ("comm", "redis-server".into()),
            ("bytes_sent", 5.into()),
            ("bytes_received", 1000.into()),
            ("close", "orderly".into()),
            ("closed_by", "peer".into()),
        ],
    );
    // The lifetime: a lower bound, from when tracing started, and no more
    // than the connection really lived.
    for r in [c, s] {
        r.check_shape();
        let life_ns = (r.lifetime_ms * 1e6) as i128;
        let since_ready = closed_at - ready_at;
        let really = closed_at - connected_at;
        assert!(
            life_ns >= since_ready - 50_000_000,
            "{} ms < {} ms since tracing began: {}",
            life_ns / 1_000_000,
            since_ready / 1_000_000,
            r.line
        );
        assert!(
            life_ns <= really + 50_000_000,
            "{} ms > {} ms it lived: {}",
            life_ns / 1_000_000,
            really / 1_000_000,
            r.line
        );
        let start = parse_ts(&r.start_ts);
        assert!(
            start <= ready_at,
            "start_ts after tracing began: {}",
            r.line
        );
    }
    let row = text_lines
        .iter()
        .find(|l| l.contains(&format!("127.0.0.1:{port} ")) && l.contains(" client "))
        .unwrap_or_else(|| panic!("no text row for port {port}: {text_lines:#?}"));
    assert!(
        row.contains(" before_trace ") && row.contains(" >"),
        "the text row does not say the lifetime is a lower bound: {row}"
    );
    // The listener closed while tracing: not a connection.
    let listener: Vec<&Conn> = records
        .iter()
        .filter(|c| c.sport == 6379 && c.dport == 0 && c.netns == Some(netns))
        .collect();
    assert!(
        listener.is_empty(),
        "the listener printed as a connection: {listener:#?}"
    );
    // redis-benchmark's connections, made while tracing.
    let bench_clients: Vec<&Conn> = records
        .iter()
        .filter(|c| {
            c.dport == 6379
                && c.comm.as_deref() == Some("redis-benchmark")
                && c.netns == Some(netns)
        })
        .collect();
    assert!(
        bench_clients.len() >= 4,
        "{} redis-benchmark connections",
        bench_clients.len()
    );
    for b in &bench_clients {
        b.expect(
            "redis-benchmark",
            &[
                ("role", "client".into()),
                ("open", "active".into()),
                ("owner_source", "observed".into()),
            ],
        );
        let srv = find(6379, b.sport);
        srv.expect(
            "redis's side of redis-benchmark's connection",
            &[
                ("role", "server".into()),
                ("open", "passive".into()),
                ("pid", redis.pid.into()),
                ("owner_source", "observed".into()),
                ("bytes_received", b.get("bytes_sent").clone()),
                ("bytes_sent", b.get("bytes_received").clone()),
            ],
        );
    }
    println!(
        "{} redis-benchmark connections, each matched by redis's side",
        bench_clients.len()
    );
}
