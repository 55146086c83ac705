//! Why a connect failed: each kind of failure made to happen in network
//! namespaces the test creates, and what `conns --format json` and
//! `ladder --format json` say checked against what the test saw: the
//! errno of its own connect(), how long it waited, and the SYNs a tcpdump
//! capture shows (how many, and when each was retransmitted).
//!
//! - timed out: SYNs to an address whose frames reach a namespace that
//!   drops them (the address is none of its own and it does not forward);
//! - host and network unreachable: a namespace that forwards answers with
//!   ICMP destination unreachable (a route of type `unreachable`, or no
//!   route at all);
//! - given up by the application: a nonblocking connect closed after
//!   300 ms in SYN_SENT;
//! - address not available: a namespace whose `ip_local_port_range` has
//!   two ports, both taken toward the destination.
//!
//! The refused connect is checked in `conns::refused_connect`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use serde_json::Value;
use tcpwatch::host::clock::Zone;
use tcpwatch::views::conns::record_text;
use tcpwatch::views::ladder::LadderRecord;

use crate::require_live;
use crate::support::conns::{find, Capture, Conn, Tw};
use crate::support::have;
use crate::support::netns::{Netns, VethPair, MAC_B, VETH_A};
use crate::support::peer::Peer;

/// How far apart tcpwatch's time of a SYN retransmission and tcpdump's may
/// be (the tracepoint fires as the segment is built, tcpdump sees it leave).
const SYN_TOLERANCE_MS: f64 = 20.0;

/// `conns --format json` and `ladder --format json` on one namespace.
struct Watch {
    conns: Tw,
    ladder: Tw,
}

impl Watch {
    fn start(ns: &Netns) -> Watch {
        let inode = ns.inode().to_string();
        Watch {
            conns: Tw::start(&["conns", "--format", "json", "--netns", &inode]),
            ladder: Tw::start(&["ladder", "--format", "json", "--netns", &inode]),
        }
    }

    /// The record and the ladder of the connection from `me` to `to`.
    fn finish(mut self, me: SocketAddr, to: SocketAddr) -> (Conn, LadderRecord) {
        self.conns.wait_conns(&[(me.port(), to.port())]);
        let needle = format!("\"endpoint\":\"{me}\"");
        self.ladder
            .wait_lines(|l| l.contains(&needle), 1, |l| l.contains(&needle));
        let conns = self.conns.stop_conns();
        let c = find(&conns, (me.port(), to.port())).clone();
        let ladder = self
            .ladder
            .stop()
            .stdout
            .iter()
            .filter(|l| l.contains(&needle))
            .map(|l| serde_json::from_str::<LadderRecord>(l).expect("ladder JSON"))
            .next()
            .expect("a ladder");
        println!("record: {}", c.line);
        println!("text: {}", record_text(&c.rec, Zone::Utc));
        println!("ladder notes: {:?}", ladder.notes);
        (c, ladder)
    }
}

/// tcpdump's time of day of a line (`HH:MM:SS.ffffff ...`), in seconds.
fn captured_at(line: &str) -> f64 {
    let t = line.split_whitespace().next().unwrap_or("");
    let parts: Vec<f64> = t.split(':').filter_map(|p| p.parse().ok()).collect();
    assert_eq!(parts.len(), 3, "no time in tcpdump line {line}");
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// The SYNs the capture shows from local port `sport`, in ms after the
/// first.
fn syns_sent(capture: Capture, sport: u16) -> Vec<f64> {
    let segs = capture.stop();
    let times: Vec<f64> = segs
        .iter()
        .filter(|s| s.sport == sport && s.flags == "S")
        .map(|s| captured_at(&s.line))
        .collect();
    println!("SYNs from port {sport} in the capture: {times:?}");
    let first = times.first().copied().unwrap_or(0.0);
    times.iter().map(|t| (t - first) * 1e3).collect()
}

/// The record and the ladder show the retransmitted SYNs the capture shows
/// (all but the first), each at its time.
fn check_syns(c: &Conn, ladder: &LadderRecord, syns: &[f64]) {
    assert!(!syns.is_empty(), "no SYN captured: {}", c.line);
    let retx = &syns[1..];
    assert_eq!(
        c.syn_retransmits_ms.len(),
        retx.len(),
        "SYN retransmissions: capture {retx:?}\nrecord: {}",
        c.line
    );
    for (got, want) in c.syn_retransmits_ms.iter().zip(retx) {
        assert!(
            (got - want).abs() < SYN_TOLERANCE_MS,
            "SYN retransmitted at {got} ms, tcpdump saw it at {want} ms\nrecord: {}",
            c.line
        );
    }
    assert_eq!(c.retransmits as usize, retx.len(), "{}", c.line);
    let drawn: Vec<f64> = ladder
        .rows
        .iter()
        .filter(|r| r.segment.as_deref() == Some("SYN retransmitted"))
        .map(|r| r.t_ms)
        .collect();
    assert_eq!(drawn.len(), retx.len(), "ladder rows: {:#?}", ladder.rows);
    for (d, r) in drawn.iter().zip(&c.syn_retransmits_ms) {
        assert!((d - r).abs() < 0.01, "ladder {d} ms, record {r} ms");
    }
}

/// Fields every failed connect has.
fn check_failed(c: &Conn, me: SocketAddr, to: SocketAddr, reason: &str, errno: Option<i32>) {
    let name = |e: i32| tcpwatch::views::conns::errno_name(e);
    c.expect(
        reason,
        &[
            ("saddr", me.ip().to_string().into()),
            ("sport", me.port().into()),
            ("daddr", to.ip().to_string().into()),
            ("dport", to.port().into()),
            ("role", "client".into()),
            ("close", "never_opened".into()),
            ("handshake_ms", Value::Null),
            ("srtt_us", Value::Null),
            ("connect_failure", reason.into()),
            ("connect_errno", errno.map(name).into()),
        ],
    );
    assert_eq!(
        c.transitions(),
        [("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")],
        "{}",
        c.line
    );
}

/// The ladder's closing words say why, as the record's text does.
fn check_words(c: &Conn, ladder: &LadderRecord, words: &str) {
    let text = record_text(&c.rec, Zone::Utc);
    assert!(text.contains(words), "text: {text}");
    assert!(
        ladder.notes.iter().any(|n| n.contains(words)),
        "ladder notes: {:?}",
        ladder.notes
    );
}

/// Namespace `a` whose frames to the returned address go to namespace `b`,
/// which drops them: the address is none of b's and b does not forward.
fn black_hole() -> (VethPair, Ipv4Addr) {
    let net = VethPair::create();
    net.b.sysctl("net.ipv4.ip_forward", "0");
    let hole = Ipv4Addr::from(u32::from(net.addr_b) + 1);
    net.a.ip(&[
        "neigh",
        "replace",
        &hole.to_string(),
        "lladdr",
        MAC_B,
        "dev",
        VETH_A,
        "nud",
        "permanent",
    ]);
    (net, hole)
}

/// A "ERRNO PORT" answer of the peer.
fn errno_port(v: &str) -> (i32, u16) {
    let (e, p) = v.split_once(' ').unwrap();
    (e.parse().unwrap(), p.parse().unwrap())
}

#[test]
fn syns_dropped_time_out() {
    require_live!();
    if !have(&["ip", "tcpdump"]) {
        return;
    }
    let (net, hole) = black_hole();
    let to = SocketAddr::new(hole.into(), 9);
    let watch = Watch::start(&net.a);
    let capture = Capture::start_in(Some(&net.a), VETH_A, &format!("tcp and host {hole}"));
    let mut client = Peer::spawn("twf-timeout", Some(&net.a));
    let started = Instant::now();
    let (errno, port) = errno_port(&client.run1(&format!("syncnt 2; connect_fail {to}")));
    let took = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(errno, libc::ETIMEDOUT, "the test's connect");
    let me = SocketAddr::new(net.addr_a.into(), port);
    let (c, ladder) = watch.finish(me, to);
    let syns = syns_sent(capture, port);
    check_failed(&c, me, to, "timed_out", Some(errno));
    assert!(syns.len() >= 2, "SYNs: {syns:?}");
    check_syns(&c, &ladder, &syns);
    assert!(
        (c.lifetime_ms - took).abs() < 500.0,
        "lifetime {} ms, the test's connect took {took} ms",
        c.lifetime_ms
    );
    check_words(
        &c,
        &ladder,
        &format!("timed out: {} SYNs unanswered", syns.len()),
    );
}

/// A namespace that forwards and answers with ICMP destination
/// unreachable: host unreachable for a route of type `unreachable`,
/// network unreachable where it has no route. Both are soft errors for a
/// socket in SYN_SENT (the SYNs go on until the kernel gives up), and the
/// connect fails with the ICMP's errno.
#[test]
fn unreachable_by_icmp() {
    require_live!();
    if !have(&["ip", "tcpdump"]) {
        return;
    }
    let net = VethPair::create();
    net.b.sysctl("net.ipv4.ip_forward", "1");
    net.a.ip(&[
        "route",
        "add",
        "10.232.0.0/16",
        "via",
        &net.addr_b.to_string(),
    ]);
    net.b.ip(&["route", "add", "unreachable", "10.232.1.0/24"]);
    let mut client = Peer::spawn("twf-unreach", Some(&net.a));
    for (dest, reason, want_errno) in [
        ("10.232.1.1", "host_unreachable", libc::EHOSTUNREACH),
        ("10.232.2.1", "net_unreachable", libc::ENETUNREACH),
    ] {
        let to = SocketAddr::new(dest.parse().unwrap(), 9);
        let watch = Watch::start(&net.a);
        let capture = Capture::start_in(Some(&net.a), VETH_A, &format!("tcp and host {dest}"));
        let started = Instant::now();
        let (errno, port) = errno_port(&client.run1(&format!("syncnt 1; connect_fail {to}")));
        let took = started.elapsed().as_secs_f64() * 1e3;
        println!("{dest}: connect failed with errno {errno} after {took:.0} ms");
        assert_eq!(errno, want_errno, "the test's connect to {dest}");
        let me = SocketAddr::new(net.addr_a.into(), port);
        let (c, ladder) = watch.finish(me, to);
        let syns = syns_sent(capture, port);
        check_failed(&c, me, to, reason, Some(errno));
        c.expect(reason, &[("errno", errno.into())]);
        check_syns(&c, &ladder, &syns);
        assert!(
            (c.lifetime_ms - took).abs() < 500.0,
            "lifetime {} ms, the test's connect took {took} ms",
            c.lifetime_ms
        );
        check_words(
            &c,
            &ladder,
            "ICMP destination unreachable answered the SYNs",
        );
    }
}

#[test]
fn given_up_by_the_application() {
    require_live!();
    if !have(&["ip", "tcpdump"]) {
        return;
    }
    let (net, hole) = black_hole();
    let to = SocketAddr::new(hole.into(), 9);
    let watch = Watch::start(&net.a);
    let capture = Capture::start_in(Some(&net.a), VETH_A, &format!("tcp and host {hole}"));
    let mut client = Peer::spawn("twf-giveup", Some(&net.a));
    const WAIT_MS: f64 = 300.0;
    let started = Instant::now();
    let port: u16 = client
        .run1(&format!("connect_give_up {to} {WAIT_MS}"))
        .parse()
        .unwrap();
    let took = started.elapsed().as_secs_f64() * 1e3;
    let me = SocketAddr::new(net.addr_a.into(), port);
    let (c, ladder) = watch.finish(me, to);
    let syns = syns_sent(capture, port);
    check_failed(&c, me, to, "given_up", None);
    // The kernel set no errno: the application stopped waiting.
    c.expect(
        "given_up",
        &[("error", Value::Null), ("errno", Value::Null)],
    );
    c.expect_owner("given_up", &client, "observed");
    // One SYN, not answered, before the application closed the socket.
    assert_eq!(syns.len(), 1, "SYNs: {syns:?}");
    check_syns(&c, &ladder, &syns);
    assert!(
        c.lifetime_ms >= WAIT_MS && c.lifetime_ms <= took,
        "lifetime {} ms: waited {WAIT_MS} ms, the command took {took} ms",
        c.lifetime_ms
    );
    check_words(
        &c,
        &ladder,
        &format!("given up by the application after {:.0} ms", c.lifetime_ms),
    );
}

/// Two ephemeral ports, both held toward the destination: the third
/// connect finds no local port. The kernel set SYN_SENT before looking for
/// one, and CLOSE right after, with nothing sent.
#[test]
fn no_local_port_left() {
    require_live!();
    if !have(&["ip", "tcpdump"]) {
        return;
    }
    let ns = Netns::new();
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40001");
    let mut server = Peer::spawn("twf-portsrv", Some(&ns));
    // Outside the two ephemeral ports.
    let to: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    server.run(&format!("listen {to}"));
    let watch = Watch::start(&ns);
    let capture = Capture::start_in(Some(&ns), "lo", &format!("tcp and port {}", to.port()));
    let mut client = Peer::spawn("twf-noport", Some(&ns));
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(errno_port(
            &client.run1(&format!("connect_port_at_connect {to}")),
        ));
    }
    println!("connects: {got:?}");
    assert_eq!(got[0].0, 0);
    assert_eq!(got[1].0, 0);
    assert_eq!(got[2], (libc::EADDRNOTAVAIL, 0), "the third connect");
    // The failed socket never had a local port.
    let me = SocketAddr::new(IpAddr::from(Ipv4Addr::LOCALHOST), 0);
    let (c, ladder) = watch.finish(me, to);
    let segs = capture.stop();
    let syns: Vec<u16> = segs
        .iter()
        .filter(|s| s.dport == to.port() && s.flags == "S")
        .map(|s| s.sport)
        .collect();
    // Only the two connects that got a port sent a SYN.
    assert_eq!(syns, [got[0].1, got[1].1], "SYNs in the capture");
    check_failed(
        &c,
        me,
        to,
        "address_not_available",
        Some(libc::EADDRNOTAVAIL),
    );
    c.expect(
        "address_not_available",
        &[("error", Value::Null), ("retransmits", 0.into())],
    );
    assert!(c.syn_retransmits_ms.is_empty(), "{}", c.line);
    assert!(c.lifetime_ms < 10.0, "{}", c.line);
    check_words(
        &c,
        &ladder,
        "no free local port, no SYN sent (EADDRNOTAVAIL)",
    );
    client.run("release");
    drop(server);
}
