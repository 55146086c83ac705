//! Root integration tests of `tcpwatch conns`, `ladder`, `record` and
//! `replay` on the running kernel.
//!
//! Each test makes one kind of connection ending happen deterministically
//! between two peers (the test binary re-executed, so each end has
//! its own known pid and comm), on loopback or between two network
//! namespaces the test creates, and checks the records tcpwatch printed for
//! the test's own ports: who opened and closed, how (orderly with three or
//! four teardown segments, FIN_WAIT2 hand-off, simultaneous, abortive,
//! refused, timed out), the timewait socket left behind, owners, byte
//! counts, errors, transitions and namespaces. The teardown segment count
//! is checked against a tcpdump capture and the `ladder` picture;
//! `replay` of a `record`ing made alongside is checked against the live
//! output, also for a recording cut in the middle of a record.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::require_live;
use crate::support::conns::*;
use crate::support::netns::{VethPair, MAC_A, MAC_B, VETH_A, VETH_B};
use crate::support::peer::{accept_one, connect_pair, Link, Peer};
use crate::support::summary::record_summary;
use crate::support::{
    family, have, loopbacks, mode, own_netns, parse_ts, run_ok, set_mode, tcpwatch_bin, Scratch,
};

type Steps = &'static [(&'static str, &'static str)];

const OPENED_BY_CONNECT: Steps = &[("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED")];
const OPENED_BY_ACCEPT: Steps = &[("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED")];
const CLOSED_FIRST: Steps = &[
    ("ESTABLISHED", "FIN_WAIT1"),
    ("FIN_WAIT1", "FIN_WAIT2"),
    ("FIN_WAIT2", "CLOSE"),
];
const CLOSED_SECOND: Steps = &[
    ("ESTABLISHED", "CLOSE_WAIT"),
    ("CLOSE_WAIT", "LAST_ACK"),
    ("LAST_ACK", "CLOSE"),
];
const CLOSED_TOGETHER: Steps = &[
    ("ESTABLISHED", "FIN_WAIT1"),
    ("FIN_WAIT1", "CLOSING"),
    ("CLOSING", "CLOSE"),
];
const RESET: Steps = &[("ESTABLISHED", "CLOSE")];
const NEVER_OPENED: Steps = &[("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")];

fn steps(open: Steps, close: Steps) -> Vec<(&'static str, &'static str)> {
    open.iter().chain(close).copied().collect()
}

/// Checks the endpoint fields of a record and its general shape.
fn check_end(what: &str, c: &Conn, me: SocketAddr, peer: SocketAddr, netns: u32) {
    c.check_shape();
    c.expect(
        what,
        &[
            ("family", family(me.ip()).into()),
            ("saddr", me.ip().to_string().into()),
            ("sport", me.port().into()),
            ("daddr", peer.ip().to_string().into()),
            ("dport", peer.port().into()),
            ("netns", netns.into()),
            ("before_trace", false.into()),
        ],
    );
}

/// Both ends of an established connection: owners, roles, how they opened,
/// and a handshake time (the client's is exactly SYN_SENT→ESTABLISHED).
fn check_opened(link: &Link, c: &Conn, s: &Conn, client: &Peer, server: &Peer, netns: (u32, u32)) {
    check_end("client", c, link.client, link.server, netns.0);
    check_end("server", s, link.server, link.client, netns.1);
    c.expect(
        "client",
        &[("role", "client".into()), ("open", "active".into())],
    );
    s.expect(
        "server",
        &[("role", "server".into()), ("open", "passive".into())],
    );
    c.expect_owner("client", client, "observed");
    s.expect(
        "server",
        &[
            ("pid", server.pid.into()),
            ("comm", server.comm.as_str().into()),
        ],
    );
    let syn_sent_to_established = c.rec.transitions[1].t_ms;
    assert_eq!(
        c.handshake_ms,
        Some(syn_sent_to_established),
        "client: handshake_ms\nrecord: {}",
        c.line
    );
    assert!(
        s.handshake_ms.is_some_and(|h| h > 0.0),
        "server handshake: {}",
        s.line
    );
    for x in [c, s] {
        let srtt = x.srtt_us.unwrap_or(0);
        assert!(srtt > 0 && srtt < 1_000_000, "srtt_us: {}", x.line);
    }
}

/// Loopback loses nothing: no retransmission on either end.
fn check_no_retransmits(c: &Conn, s: &Conn) {
    for x in [c, s] {
        x.expect(
            "no loss on loopback",
            &[("retransmits", 0.into()), ("total_retrans", 0.into())],
        );
    }
}

fn show(what: &str, c: &Conn) {
    println!(
        "{what}: pid {} comm {} role {} open {} close {} closed_by {} segments {} timewait {:?} error {} sent {} received {} handshake_ms {} lifetime_ms {} resets {}/{} retransmits {} netns {}",
        c.get("pid"),
        c.get("comm"),
        c.get("role"),
        c.get("open"),
        c.get("close"),
        c.get("closed_by"),
        c.get("teardown_segments"),
        c.timewait_left(),
        c.get("error"),
        c.get("bytes_sent"),
        c.get("bytes_received"),
        c.get("handshake_ms"),
        c.get("lifetime_ms"),
        c.get("resets_sent"),
        c.get("resets_received"),
        c.get("retransmits"),
        c.get("netns"),
    );
}

/// Client closes first (close()), the server closes the moment it reads
/// EOF: orderly on both ends, TIME_WAIT on the client only.
#[test]
fn client_closes_first_orderly_with_time_wait() {
    require_live!();
    let mut tw = Tw::conns();
    let mut server = Peer::spawn("twc-server", None);
    let mut client = Peer::spawn("twc-client", None);
    let mut links = Vec::new();
    for ip in loopbacks() {
        let link = connect_pair(&mut server, &mut client, ip, ip);
        client.run("write 1000");
        server.run("read 1000; write 500");
        client.run("read 500");
        // The server closes within microseconds of EOF, inside its
        // delayed-ACK window, so its FIN carries the ACK of ours: the
        // client's close()d socket gets the FIN itself and goes to
        // TIME_WAIT (a bare ACK would hand it to a FIN_WAIT2 mini-socket).
        let eof = server.send("eof; close");
        client.run("close");
        assert_eq!(server.wait(eof), ["0"]);
        links.push(link);
    }
    let keys: Vec<(u16, u16)> = links.iter().flat_map(Link::keys).collect();
    tw.wait_conns(&keys);
    let conns = tw.stop_conns();
    let netns = own_netns();
    for link in &links {
        let c = find(&conns, link.client_key());
        let s = find(&conns, link.server_key());
        show("client", c);
        show("server", s);
        check_opened(link, c, s, &client, &server, (netns, netns));
        check_no_retransmits(c, s);
        s.expect_owner("server", &server, "observed");
        c.expect(
            "client, closed first",
            &[
                ("close", "orderly".into()),
                ("closed_by", "local".into()),
                ("teardown_segments", 3.into()),
                ("error", Value::Null),
                ("bytes_sent", seq_bytes(1000, true, true).into()),
                ("bytes_received", seq_bytes(500, false, true).into()),
                ("resets_sent", 0.into()),
                ("resets_received", 0.into()),
            ],
        );
        s.expect(
            "server, closed second",
            &[
                ("close", "orderly".into()),
                ("closed_by", "peer".into()),
                ("teardown_segments", 3.into()),
                ("timewait", Value::Null),
                ("error", Value::Null),
                ("bytes_sent", seq_bytes(500, false, true).into()),
                ("bytes_received", seq_bytes(1000, false, true).into()),
                ("resets_sent", 0.into()),
                ("resets_received", 0.into()),
            ],
        );
        assert_eq!(c.timewait_left(), Some(("TIME_WAIT", 60.0)), "{}", c.line);
        c.expect_transitions("client", &steps(OPENED_BY_CONNECT, CLOSED_FIRST));
        s.expect_transitions("server", &steps(OPENED_BY_ACCEPT, CLOSED_SECOND));
    }
}

/// Server closes first, the client closes the moment it reads EOF:
/// orderly on both ends, TIME_WAIT on the server only.
#[test]
fn server_closes_first_orderly_with_time_wait() {
    require_live!();
    let mut tw = Tw::conns();
    let mut server = Peer::spawn("twc-server", None);
    let mut client = Peer::spawn("twc-client", None);
    let mut links = Vec::new();
    for ip in loopbacks() {
        let link = connect_pair(&mut server, &mut client, ip, ip);
        client.run("write 1000");
        // As above with the roles swapped: the client's FIN, sent right
        // after EOF, carries its ACK of the server's FIN.
        let eof = client.send("eof; close");
        server.run("read 1000; write 500; close");
        assert_eq!(client.wait(eof), ["500"]);
        links.push(link);
    }
    let keys: Vec<(u16, u16)> = links.iter().flat_map(Link::keys).collect();
    tw.wait_conns(&keys);
    let conns = tw.stop_conns();
    let netns = own_netns();
    for link in &links {
        let c = find(&conns, link.client_key());
        let s = find(&conns, link.server_key());
        show("client", c);
        show("server", s);
        check_opened(link, c, s, &client, &server, (netns, netns));
        check_no_retransmits(c, s);
        s.expect_owner("server", &server, "observed");
        s.expect(
            "server, closed first",
            &[
                ("close", "orderly".into()),
                ("closed_by", "local".into()),
                ("teardown_segments", 3.into()),
                ("error", Value::Null),
                ("bytes_sent", seq_bytes(500, false, true).into()),
                ("bytes_received", seq_bytes(1000, false, true).into()),
            ],
        );
        c.expect(
            "client, closed second",
            &[
                ("close", "orderly".into()),
                ("closed_by", "peer".into()),
                ("teardown_segments", 3.into()),
                ("timewait", Value::Null),
                ("error", Value::Null),
                ("bytes_sent", seq_bytes(1000, true, true).into()),
                ("bytes_received", seq_bytes(500, false, true).into()),
            ],
        );
        assert_eq!(s.timewait_left(), Some(("TIME_WAIT", 60.0)), "{}", s.line);
        s.expect_transitions("server", &steps(OPENED_BY_ACCEPT, CLOSED_FIRST));
        c.expect_transitions("client", &steps(OPENED_BY_CONNECT, CLOSED_SECOND));
    }
}

/// The client close()s; the server reads EOF but closes only 200 ms later,
/// so its delayed ACK goes out alone first. The orphaned client socket gets
/// that bare ACK and is handed to a FIN_WAIT2 timewait mini-socket at once;
/// the server's FIN reaches the mini-socket 200 ms later, which moves to
/// TIME_WAIT: an orderly close in four segments (the server is on this
/// host, so its own timeline tells).
#[test]
fn orphaned_closer_with_bare_ack_is_handed_off_then_time_wait() {
    require_live!();
    let mut tw = Tw::conns();
    let mut server = Peer::spawn("twc-server", None);
    let mut client = Peer::spawn("twc-client", None);
    let mut links = Vec::new();
    for ip in loopbacks() {
        let link = connect_pair(&mut server, &mut client, ip, ip);
        client.run("write 100");
        server.run("read 100");
        let eof = server.send("eof; sleep 200; close");
        client.run("close");
        assert_eq!(server.wait(eof), ["0"]);
        links.push(link);
    }
    let keys: Vec<(u16, u16)> = links.iter().flat_map(Link::keys).collect();
    tw.wait_conns(&keys);
    let conns = tw.stop_conns();
    let netns = own_netns();
    for link in &links {
        let c = find(&conns, link.client_key());
        let s = find(&conns, link.server_key());
        show("client", c);
        show("server", s);
        check_opened(link, c, s, &client, &server, (netns, netns));
        check_no_retransmits(c, s);
        c.expect(
            "client, orphaned, bare ACK, the server's FIN 200 ms later",
            &[
                ("close", "orderly".into()),
                ("closed_by", "local".into()),
                ("teardown_segments", 4.into()),
                ("error", Value::Null),
                ("bytes_sent", seq_bytes(100, true, true).into()),
                // The server's FIN reached the mini-socket, not this one.
                ("bytes_received", 0.into()),
            ],
        );
        assert_eq!(c.timewait_left(), Some(("TIME_WAIT", 60.0)), "{}", c.line);
        c.expect_transitions("client", &steps(OPENED_BY_CONNECT, CLOSED_FIRST));
        s.expect(
            "server, closed 200 ms after EOF",
            &[
                ("close", "orderly".into()),
                ("closed_by", "peer".into()),
                ("teardown_segments", 4.into()),
                ("timewait", Value::Null),
                ("bytes_sent", seq_bytes(0, false, true).into()),
                ("bytes_received", seq_bytes(100, false, true).into()),
            ],
        );
        s.expect_transitions("server", &steps(OPENED_BY_ACCEPT, CLOSED_SECOND));
        // The hand-off is immediate: FIN_WAIT2→CLOSE on the same segment.
        let t = &c.rec.transitions;
        let gap = t[4].t_ms - t[3].t_ms;
        assert!(gap < 100.0, "FIN_WAIT2 lasted {gap} ms: {}", c.line);
    }
}

/// As above, but the server never closes while tcpwatch waits: the client's
/// timewait socket really stays in FIN_WAIT2, and that is what is said.
#[test]
fn orphaned_closer_whose_peer_never_sends_fin_stays_fin_wait2() {
    require_live!();
    let mut tw = Tw::conns();
    let mut server = Peer::spawn("twc-server", None);
    let mut client = Peer::spawn("twc-client", None);
    let ip = IpAddr::from(Ipv4Addr::LOCALHOST);
    let link = connect_pair(&mut server, &mut client, ip, ip);
    client.run("write 100");
    server.run("read 100");
    let eof = server.send("eof");
    client.run("close");
    assert_eq!(server.wait(eof), ["0"]);
    tw.wait_conns(&[link.client_key()]);
    // Only now does the server close: its FIN comes after the record.
    server.run("close");
    tw.wait_conns(&[link.server_key()]);
    let conns = tw.stop_conns();
    let c = find(&conns, link.client_key());
    show("client", c);
    c.expect(
        "client, orphaned, bare ACK, no FIN from the server",
        &[
            ("close", "fin_wait2".into()),
            ("closed_by", "local".into()),
            ("teardown_segments", Value::Null),
            ("bytes_sent", seq_bytes(100, true, true).into()),
            ("bytes_received", 0.into()),
        ],
    );
    assert_eq!(
        c.timewait_left(),
        Some(("FIN_WAIT2", fin_timeout_s())),
        "{}",
        c.line
    );
    // Reported once the last check found it still waiting: a second or so
    // after it closed, not at once and not after the server's FIN.
    let s = find(&conns, link.server_key());
    let closed = parse_ts(&c.ts);
    let server_closed = parse_ts(&s.ts);
    assert!(
        server_closed > closed + 900_000_000,
        "{}\n{}",
        c.line,
        s.line
    );
}

/// The client half-closes (shutdown(SHUT_WR), so its socket stays a full
/// socket in FIN_WAIT2); the server closes at once after EOF (its FIN
/// carries its ACK: 3 segments) or 200 ms later (ACK alone first: 4).
/// tcpwatch's count must equal a packet capture's on both ends, and the
/// ladder must say so.
#[test]
fn teardown_three_or_four_segments_as_captured() {
    require_live!();
    if !have(&["tcpdump"]) {
        return;
    }
    let mut conns_tw = Tw::spawn(&["conns", "--format", "json"]);
    let mut ladder_tw = Tw::spawn(&["ladder"]);
    conns_tw.wait_ready();
    ladder_tw.wait_ready();
    let mut server = Peer::spawn("twc-server", None);
    let mut client = Peer::spawn("twc-client", None);
    // (link, expected segments, segments in the capture, what was counted)
    let mut cases: Vec<(Link, usize, usize, Vec<String>)> = Vec::new();
    for ip in loopbacks() {
        let port: u16 = server
            .run1(&format!("listen {}", SocketAddr::new(ip, 0)))
            .parse()
            .unwrap();
        let capture = Capture::start("lo", &format!("tcp port {port}"));
        let mut links = Vec::new();
        for (delay_ms, want) in [(0, 3), (200, 4)] {
            let link = accept_one(&mut server, &mut client, SocketAddr::new(ip, port), ip);
            client.run("write 100");
            server.run("read 100");
            let close = if delay_ms == 0 {
                server.send("eof; close")
            } else {
                server.send(&format!("eof; sleep {delay_ms}; close"))
            };
            client.run("shut_wr; eof; close");
            assert_eq!(server.wait(close), ["0"]);
            links.push((link, want));
        }
        server.run("close_listener");
        let segs = capture.stop();
        for (link, want) in links {
            let (n, counted) = teardown_in_capture(&segs, link.client.port(), link.server.port());
            cases.push((link, want, n, counted));
        }
    }
    let keys: Vec<(u16, u16)> = cases.iter().flat_map(|c| c.0.keys()).collect();
    conns_tw.wait_conns(&keys);
    let prefixes: Vec<String> = cases.iter().map(|c| ladder_header_prefix(&c.0)).collect();
    ladder_tw.wait_lines(
        |l| prefixes.iter().any(|p| l.starts_with(p.as_str())),
        prefixes.len(),
        |l| l.contains(" <-> "),
    );
    let conns = conns_tw.stop_conns();
    let blocks = ladder_blocks(&ladder_tw.stop().stdout);
    for (link, want, captured, counted) in &cases {
        let c = find(&conns, link.client_key());
        let s = find(&conns, link.server_key());
        println!(
            "{} -> {}: capture {captured} teardown segments, tcpwatch client {} server {}",
            link.client,
            link.server,
            c.get("teardown_segments"),
            s.get("teardown_segments")
        );
        let netns = own_netns();
        check_opened(link, c, s, &client, &server, (netns, netns));
        check_no_retransmits(c, s);
        assert_eq!(
            captured,
            want,
            "the capture does not show the case the test set up:\n{}",
            counted.join("\n")
        );
        for (what, x) in [("client", c), ("server", s)] {
            x.expect(
                what,
                &[
                    ("teardown_segments", (*captured).into()),
                    ("close", "orderly".into()),
                ],
            );
        }
        c.expect("client", &[("closed_by", "local".into())]);
        s.expect("server", &[("closed_by", "peer".into())]);
        assert_eq!(c.timewait_left(), Some(("TIME_WAIT", 60.0)), "{}", c.line);
        c.expect_transitions("client", &steps(OPENED_BY_CONNECT, CLOSED_FIRST));
        s.expect_transitions("server", &steps(OPENED_BY_ACCEPT, CLOSED_SECOND));

        let prefix = ladder_header_prefix(link);
        let block = blocks
            .iter()
            .find(|b| b.header.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no ladder for {prefix}"));
        let text = block.text();
        for l in block.body.iter().filter(|l| l.contains("teardown took")) {
            println!("ladder:{l}");
        }
        assert!(
            block.header.ends_with("[both ends on this host: exact]"),
            "{text}"
        );
        assert!(
            text.contains(&format!("teardown took {captured} segments")),
            "{text}"
        );
        assert!(
            text.contains(&format!("client {} closed first", link.client)),
            "{text}"
        );
        // Only a three-segment teardown has the FIN that carries the ACK.
        assert_eq!(text.contains("FIN/ACK"), *captured == 3, "{text}");
    }
}

/// Two namespaces joined by a veth pair. Both ends shut down while neither
/// can reach the other, so both FINs are built before either arrives: each
/// end receives the other's FIN in FIN_WAIT1 and goes to CLOSING.
#[test]
fn simultaneous_close_between_namespaces() {
    require_live!();
    if !have(&["ip"]) {
        return;
    }
    let net = VethPair::create();
    // Both namespaces are the test's own, neither is tcpwatch's.
    let mut tw = Tw::start(&["conns", "--format", "json", "--netns", "all"]);
    let mut server = Peer::spawn("twc-ns-server", Some(&net.b));
    let mut client = Peer::spawn("twc-ns-client", Some(&net.a));
    let link = connect_pair(
        &mut server,
        &mut client,
        net.addr_b.into(),
        net.addr_a.into(),
    );
    client.run("write 100");
    server.run("read 100");
    // Let any delayed ACK of the data go out before the link is held.
    std::thread::sleep(Duration::from_millis(200));
    // Hold the segments: neither end answers ARP any more (arp_ignore 8,
    // and an unanswered request teaches the receiver nothing) and both
    // forget each other's MAC, so each FIN waits in its host's neighbour
    // queue (up to 3 s) instead of leaving. Both are built before either
    // is delivered, whatever the timing; then both are released. (Taking
    // the link down instead drops the FINs, and they cross only if both
    // retransmission timers fire within microseconds of each other.)
    for (ns, dev) in [(&net.a, VETH_A), (&net.b, VETH_B)] {
        ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_ignore"), "8");
        ns.ip(&["neigh", "flush", "dev", dev]);
    }
    client.run("shut_wr");
    server.run("shut_wr");
    for (ns, peer) in [(&net.a, net.addr_b), (&net.b, net.addr_a)] {
        let state = ns.ip(&["neigh", "show", &peer.to_string()]);
        assert!(
            state.contains("INCOMPLETE"),
            "{}: FIN not held: {state}",
            ns.name
        );
    }
    for (ns, peer, mac, dev) in [
        (&net.a, net.addr_b, MAC_B, VETH_A),
        (&net.b, net.addr_a, MAC_A, VETH_B),
    ] {
        ns.ip(&[
            "neigh",
            "replace",
            &peer.to_string(),
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "reachable",
        ]);
    }
    let c_eof = client.send("eof; close");
    let s_eof = server.send("eof; close");
    assert_eq!(client.wait(c_eof), ["0"]);
    assert_eq!(server.wait(s_eof), ["0"]);
    tw.wait_conns(&link.keys());
    let conns = tw.stop_conns();

    let (ns_a, ns_b) = (net.a.inode(), net.b.inode());
    assert_ne!(ns_a, ns_b);
    assert!(ns_a != own_netns() && ns_b != own_netns());
    let c = find(&conns, link.client_key());
    let s = find(&conns, link.server_key());
    show("client", c);
    show("server", s);
    check_opened(&link, c, s, &client, &server, (ns_a, ns_b));
    s.expect_owner("server", &server, "observed");
    for (what, x) in [("client", c), ("server", s)] {
        x.expect(
            what,
            &[
                ("close", "simultaneous".into()),
                ("closed_by", "both".into()),
                ("teardown_segments", Value::Null),
                ("error", Value::Null),
            ],
        );
        assert_eq!(x.timewait_left(), Some(("TIME_WAIT", 60.0)), "{}", x.line);
        // A FIN held longer than the RTO is retransmitted into the queue:
        // whatever the count, tcpwatch saw at least what the kernel counted.
        let kernel = x.total_retrans.expect("total_retrans");
        assert!(x.retransmits >= kernel, "{what}: retransmits: {}", x.line);
    }
    c.expect(
        "client",
        &[
            ("bytes_sent", seq_bytes(100, true, true).into()),
            ("bytes_received", seq_bytes(0, false, true).into()),
        ],
    );
    s.expect(
        "server",
        &[
            ("bytes_sent", seq_bytes(0, false, true).into()),
            ("bytes_received", seq_bytes(100, false, true).into()),
        ],
    );
    c.expect_transitions("client", &steps(OPENED_BY_CONNECT, CLOSED_TOGETHER));
    s.expect_transitions("server", &steps(OPENED_BY_ACCEPT, CLOSED_TOGETHER));
}

/// SO_LINGER {on, 0} then close(): the aborting end sends a RST at once;
/// the other end's read fails with ECONNRESET. Once with the client
/// aborting, once with the server.
#[test]
fn abortive_close_with_linger_zero() {
    require_live!();
    let mut tw = Tw::conns();
    let mut server = Peer::spawn("twc-server", None);
    let mut client = Peer::spawn("twc-client", None);
    let ip = IpAddr::from(Ipv4Addr::LOCALHOST);
    let mut cases = Vec::new();
    for client_aborts in [true, false] {
        let link = connect_pair(&mut server, &mut client, ip, ip);
        client.run("write 100");
        server.run("read 100");
        let (aborter, other) = if client_aborts {
            (&mut client, &mut server)
        } else {
            (&mut server, &mut client)
        };
        let reset = other.send("read_reset");
        aborter.run("linger0; close");
        assert_eq!(other.wait(reset), [libc::ECONNRESET.to_string()]);
        other.run("close");
        cases.push((link, client_aborts));
    }
    let keys: Vec<(u16, u16)> = cases.iter().flat_map(|c| c.0.keys()).collect();
    tw.wait_conns(&keys);
    let conns = tw.stop_conns();
    let netns = own_netns();
    for (link, client_aborts) in &cases {
        let c = find(&conns, link.client_key());
        let s = find(&conns, link.server_key());
        show("client", c);
        show("server", s);
        check_opened(link, c, s, &client, &server, (netns, netns));
        check_no_retransmits(c, s);
        // No transition of an accepted socket that closes without a FIN
        // runs in its owner's context: its first read names the owner.
        s.expect_owner("server", &server, "observed");
        let (aborter, other) = if *client_aborts { (c, s) } else { (s, c) };
        aborter.expect(
            "aborting end",
            &[
                ("close", "aborted".into()),
                ("closed_by", "local".into()),
                ("resets_sent", 1.into()),
                ("resets_received", 0.into()),
                ("error", Value::Null),
                ("errno", Value::Null),
                ("timewait", Value::Null),
                ("teardown_segments", Value::Null),
            ],
        );
        other.expect(
            "end that got the RST",
            &[
                ("close", "reset_received".into()),
                ("closed_by", "peer".into()),
                ("resets_sent", 0.into()),
                ("resets_received", 1.into()),
                ("error", "ECONNRESET".into()),
                ("errno", libc::ECONNRESET.into()),
                ("timewait", Value::Null),
                ("teardown_segments", Value::Null),
            ],
        );
        // No FIN either way.
        c.expect(
            "client",
            &[
                ("bytes_sent", seq_bytes(100, true, false).into()),
                ("bytes_received", 0.into()),
            ],
        );
        s.expect(
            "server",
            &[("bytes_sent", 0.into()), ("bytes_received", 100.into())],
        );
        c.expect_transitions("client", &steps(OPENED_BY_CONNECT, RESET));
        s.expect_transitions("server", &steps(OPENED_BY_ACCEPT, RESET));
    }
}

/// connect() to a loopback port that is bound but not listening: the
/// kernel answers the SYN with a RST.
#[test]
fn refused_connect() {
    require_live!();
    let mut tw = Tw::conns();
    let mut holder = Peer::spawn("twc-holder", None);
    let mut client = Peer::spawn("twc-client", None);
    let mut cases = Vec::new();
    for ip in loopbacks() {
        // Bound, so no one else takes the port; not listening, so refused.
        let port: u16 = holder
            .run1(&format!("bind {}", SocketAddr::new(ip, 0)))
            .parse()
            .unwrap();
        let to = SocketAddr::new(ip, port);
        let v = client.run1(&format!("connect_fail {to}"));
        let (errno, cport) = v.split_once(' ').unwrap();
        assert_eq!(errno, libc::ECONNREFUSED.to_string());
        cases.push((SocketAddr::new(ip, cport.parse().unwrap()), to));
    }
    let keys: Vec<(u16, u16)> = cases.iter().map(|(c, s)| (c.port(), s.port())).collect();
    tw.wait_conns(&keys);
    let conns = tw.stop_conns();
    for (me, to) in &cases {
        let c = find(&conns, (me.port(), to.port()));
        show("refused client", c);
        check_end("refused client", c, *me, *to, own_netns());
        c.expect_owner("refused client", &client, "observed");
        c.expect(
            "refused client",
            &[
                ("role", "client".into()),
                ("open", "refused".into()),
                ("close", "never_opened".into()),
                // No round trip was ever measured: null, `-` in text.
                ("srtt_us", Value::Null),
                ("closed_by", Value::Null),
                ("error", "ECONNREFUSED".into()),
                ("errno", libc::ECONNREFUSED.into()),
                ("handshake_ms", Value::Null),
                ("timewait", Value::Null),
                ("teardown_segments", Value::Null),
                ("resets_received", 1.into()),
                ("resets_sent", 0.into()),
                ("bytes_sent", 0.into()),
                ("bytes_received", 0.into()),
                ("connect_failure", "refused".into()),
                ("connect_errno", "ECONNREFUSED".into()),
                ("syn_retransmits_ms", Value::Array(Vec::new())),
            ],
        );
        c.expect_transitions("refused client", NEVER_OPENED);
    }
}

/// connect() with TCP_SYNCNT=1 from one namespace to an address in another
/// whose link is down: the SYNs go nowhere (a permanent neighbour entry
/// means no ARP failure can end the connect early with EHOSTUNREACH), and
/// connect() gives up with ETIMEDOUT after ~3 s.
#[test]
fn timed_out_connect() {
    require_live!();
    if !have(&["ip"]) {
        return;
    }
    let net = VethPair::create();
    net.b.ip(&["link", "set", VETH_B, "down"]);
    net.a.ip(&[
        "neigh",
        "replace",
        &net.addr_b.to_string(),
        "lladdr",
        MAC_B,
        "dev",
        VETH_A,
        "nud",
        "permanent",
    ]);
    let ns_a = net.a.inode().to_string();
    let mut tw = Tw::start(&["conns", "--format", "json", "--netns", &ns_a]);
    let mut client = Peer::spawn("twc-ns-client", Some(&net.a));
    let to = SocketAddr::new(net.addr_b.into(), 9);
    let started = Instant::now();
    let v = client.run1(&format!("syncnt 1; connect_fail {to}"));
    let took = started.elapsed();
    let (errno, cport) = v.split_once(' ').unwrap();
    assert_eq!(
        errno,
        libc::ETIMEDOUT.to_string(),
        "connect did not time out"
    );
    let me = SocketAddr::new(net.addr_a.into(), cport.parse().unwrap());
    tw.wait_conns(&[(me.port(), 9)]);
    let conns = tw.stop_conns();
    let c = find(&conns, (me.port(), 9));
    show("timed-out client", c);
    check_end("timed-out client", c, me, to, net.a.inode());
    c.expect_owner("timed-out client", &client, "observed");
    c.expect(
        "timed-out client",
        &[
            ("role", "client".into()),
            ("open", "timed_out".into()),
            ("close", "never_opened".into()),
            ("srtt_us", Value::Null),
            ("closed_by", Value::Null),
            ("error", "ETIMEDOUT".into()),
            ("errno", libc::ETIMEDOUT.into()),
            ("handshake_ms", Value::Null),
            ("timewait", Value::Null),
            ("resets_received", 0.into()),
            ("connect_failure", "timed_out".into()),
            ("connect_errno", "ETIMEDOUT".into()),
        ],
    );
    c.expect_transitions("timed-out client", NEVER_OPENED);
    assert_eq!(
        c.syn_retransmits_ms.len() as u32,
        c.retransmits,
        "every retransmission was a SYN's: {}",
        c.line
    );
    // The kernel counted at least one SYN retransmission, and tcpwatch saw
    // exactly those (failed attempts, err≠0 at the tracepoint, put nothing
    // on the wire and are counted by neither).
    let kernel = c.total_retrans.expect("total_retrans");
    assert!(
        kernel >= 1 && c.retransmits == kernel,
        "SYN retransmissions: {}",
        c.line
    );
    let life = c.lifetime_ms;
    assert!(
        life > 2000.0 && life < 10_000.0 && (life - took.as_secs_f64() * 1e3).abs() < 500.0,
        "lifetime {life} ms, connect took {took:?}: {}",
        c.line
    );
}

/// Traffic for the record/replay tests: an orderly close on each loopback
/// family, an abort and a refused connect. Returns the records' keys.
fn mixed_traffic(server: &mut Peer, client: &mut Peer) -> Vec<(u16, u16)> {
    let mut keys = Vec::new();
    for ip in loopbacks() {
        let link = connect_pair(server, client, ip, ip);
        client.run("write 300");
        server.run("read 300; write 200");
        client.run("read 200");
        let eof = server.send("eof; close");
        client.run("close");
        server.wait(eof);
        keys.extend(link.keys());
    }
    let ip = IpAddr::from(Ipv4Addr::LOCALHOST);
    let link = connect_pair(server, client, ip, ip);
    let reset = server.send("read_reset");
    client.run("linger0; close");
    server.wait(reset);
    server.run("close");
    keys.extend(link.keys());
    let port = server.run1("bind 127.0.0.1:0");
    let v = client.run1(&format!("connect_fail 127.0.0.1:{port}"));
    keys.push((
        v.split_once(' ').unwrap().1.parse().unwrap(),
        port.parse().unwrap(),
    ));
    keys
}

/// Starts `record -o FILE` and `conns --format json` together.
fn record_and_watch(file: &Path) -> (Tw, Tw) {
    let mut recorder = Tw::spawn(&["record", "--format", "json", "-o", file.to_str().unwrap()]);
    let mut live = Tw::spawn(&["conns", "--format", "json"]);
    recorder.wait_ready();
    live.wait_ready();
    // The file is created before it says it is recording.
    assert!(
        file.exists(),
        "no recording at {} once tracing",
        file.display()
    );
    (recorder, live)
}

fn stop_recorder(recorder: Tw, file: &Path) {
    let f = recorder.stop();
    let s = record_summary(&f.stderr);
    assert_eq!(s.file, file, "{s:?}");
    if s.stream.lost.total > 0 {
        println!("note: the recorder lost events (busy host): {s:?}");
    }
    // Created 0600: it names processes and peers.
    assert_eq!(mode(file), 0o600, "recording mode");
}

/// A world-readable copy of a recording, for the unprivileged replay.
fn readable_copy(from: &Path, to: &Path, len: Option<usize>) {
    let bytes = fs::read(from).unwrap();
    fs::write(to, &bytes[..len.unwrap_or(bytes.len())]).unwrap();
    set_mode(to, 0o644);
}

fn parse_replay(run: &ReplayRun) -> Vec<Conn> {
    let conns: Vec<Conn> = run.stdout.iter().map(|l| Conn::parse(l)).collect();
    check_summary(&run.stderr, conns.len());
    conns
}

/// Nanoseconds between two RFC 3339 timestamps.
fn ts_gap(a: &str, b: &str) -> i128 {
    (parse_ts(a) - parse_ts(b)).abs()
}

/// Live and replayed records of one connection: every field equal, except
/// that times may differ by the few microseconds between the two probes'
/// clock reads (record and conns each load their own eBPF program, and
/// each stamps the same tracepoint hit with its own bpf_ktime_get_ns()).
/// Returns the largest time difference in ns.
fn same_connection(live: &Conn, replayed: &Conn) -> i128 {
    // A recording keeps the owner's cgroup id; the path (and what it
    // names) is the recording host's at the time, which a replay, perhaps
    // elsewhere and later, does not claim.
    let ids_only = |c: &Conn| {
        let mut r = timeless(c);
        if let Some(g) = &mut r.cgroup {
            (g.path, g.container, g.unit, g.pod) = (None, None, None, None);
        }
        r
    };
    assert!(
        replayed.cgroup.as_ref().is_none_or(|g| g.path.is_none()),
        "a replay names a cgroup path: {}",
        replayed.line
    );
    assert_eq!(
        ids_only(live),
        ids_only(replayed),
        "live and replayed records differ:\nlive:   {}\nreplay: {}",
        live.line,
        replayed.line
    );
    clock_gap(live, replayed)
}

/// The largest difference between two records of one connection's times,
/// checked to be under a millisecond (two probes each read the clock at
/// the same tracepoint hit).
fn clock_gap(live: &Conn, replayed: &Conn) -> i128 {
    let mut gaps = vec![
        ts_gap(&live.ts, &replayed.ts),
        ts_gap(&live.start_ts, &replayed.start_ts),
        ((live.lifetime_ms - replayed.lifetime_ms).abs() * 1e6) as i128,
    ];
    if let (Some(a), Some(b)) = (&live.timewait, &replayed.timewait) {
        gaps.push(ts_gap(&a.until, &b.until));
    }
    for (a, b) in live.rec.transitions.iter().zip(&replayed.rec.transitions) {
        gaps.push(ts_gap(&a.ts, &b.ts));
    }
    if let (Some(a), Some(b)) = (live.handshake_ms, replayed.handshake_ms) {
        gaps.push(((a - b).abs() * 1e6) as i128);
    }
    let worst = gaps.into_iter().max().unwrap();
    assert!(
        worst < 1_000_000,
        "times differ by {worst} ns:\nlive:   {}\nreplay: {}",
        live.line,
        replayed.line
    );
    worst
}

/// `record` alongside `conns`, then `replay FILE conns` as an unprivileged
/// user: the same records for the test's connections.
#[test]
fn replay_of_a_recording_matches_live_conns() {
    require_live!();
    if !have(&["setpriv"]) {
        return;
    }
    let dir = Scratch::new("replay");
    let file = dir.join("live.rec");
    let (recorder, mut live) = record_and_watch(&file);
    let mut server = Peer::spawn("twc-server", None);
    let mut client = Peer::spawn("twc-client", None);
    let keys = mixed_traffic(&mut server, &mut client);
    live.wait_conns(&keys);
    let live_conns = live.stop_conns();
    stop_recorder(recorder, &file);

    // As uid 65534 the 0600 original cannot be read.
    let denied = replay_as_nobody(&file, &["conns", "--format", "json"]);
    assert_eq!(denied.code, Some(1), "{:?}", denied.stderr);
    assert!(
        denied
            .stderr
            .iter()
            .any(|l| l.contains("Permission denied")),
        "{:?}",
        denied.stderr
    );
    let copy = dir.join("copy.rec");
    readable_copy(&file, &copy, None);
    let run = replay_as_nobody(&copy, &["conns", "--format", "json"]);
    assert_eq!(run.code, Some(0), "replay failed: {:?}", run.stderr);
    let replayed = parse_replay(&run);
    let mut worst = 0;
    for key in &keys {
        let l = find(&live_conns, *key);
        l.check_shape();
        worst = worst.max(same_connection(l, find(&replayed, *key)));
    }
    println!(
        "{} records identical live and replayed; times within {worst} ns",
        keys.len()
    );
}

/// The same traffic watched three ways at once: per-socket records
/// (`TCPWATCH_PER_SOCKET`, where the kernel allows them), one record per
/// transition (the default) and the classic tracepoints
/// (`TCPWATCH_CLASSIC_TRACEPOINTS`): each says which path it took, and
/// every record is the same but for the programs' own clock reads.
#[test]
fn per_socket_records_match_per_transition_events() {
    require_live!();
    let args = ["conns", "--format", "json"];
    let per_socket = ("TCPWATCH_PER_SOCKET", "1");
    let classic = ("TCPWATCH_CLASSIC_TRACEPOINTS", "1");
    let mut runs = [
        Tw::spawn_env(&args, &[per_socket]),
        Tw::spawn(&args),
        Tw::spawn_env(&args, &[classic]),
    ];
    for run in &mut runs {
        run.wait_ready();
    }
    let mut server = Peer::spawn("tws-server", None);
    let mut client = Peer::spawn("tws-client", None);
    let keys = mixed_traffic(&mut server, &mut client);
    for run in &mut runs {
        run.wait_conns(&keys);
    }
    let [records, events, classic_events] = runs.map(|r| r.stop_conns_and_stderr());
    let says = |stderr: &[String], what: &str| stderr.iter().any(|l| l.contains(what));
    let fallback = "one record per transition, not per socket";
    let per_socket_line = "one record per socket, not per transition (TCPWATCH_PER_SOCKET is set)";
    assert!(
        says(&records.1, per_socket_line)
            && !says(&records.1, fallback)
            && !says(&records.1, "classic tracepoints"),
        "per-socket records did not load on this kernel: {:?}",
        records.1
    );
    assert!(
        !says(&events.1, per_socket_line)
            && !says(&events.1, fallback)
            && !says(&events.1, "classic tracepoints"),
        "{:?}",
        events.1
    );
    assert!(
        !says(&classic_events.1, per_socket_line) && says(&classic_events.1, "classic tracepoints"),
        "{:?}",
        classic_events.1
    );
    let mut worst = 0;
    for key in &keys {
        let r = find(&records.0, *key);
        r.check_shape();
        for other in [find(&events.0, *key), find(&classic_events.0, *key)] {
            assert_eq!(
                timeless(r),
                timeless(other),
                "records differ:\nper socket:     {}\nper transition: {}",
                r.line,
                other.line
            );
            worst = worst.max(clock_gap(r, other));
        }
    }
    println!(
        "{} records identical from per-socket records, per-transition events and classic \
         tracepoints; times within {worst} ns",
        keys.len()
    );
}

/// A recording cut in the middle of a record (tcpwatch killed while
/// writing): replay prints the connections whose events all lie before the
/// cut, warns in one line naming the byte offset of the partial record, and
/// exits 0.
#[test]
fn replay_of_a_truncated_recording_prints_the_valid_prefix() {
    require_live!();
    if !have(&["setpriv"]) {
        return;
    }
    let dir = Scratch::new("truncated");
    let file = dir.join("live.rec");
    let (recorder, mut live) = record_and_watch(&file);
    let mut server = Peer::spawn("twc-server", None);
    let mut client = Peer::spawn("twc-client", None);
    let ip = IpAddr::from(Ipv4Addr::LOCALHOST);
    // Two connections, the second begun only once the first is reported:
    // every event of the first comes before any of the second.
    let mut links = Vec::new();
    for _ in 0..2 {
        let link = connect_pair(&mut server, &mut client, ip, ip);
        let eof = server.send("eof; close");
        client.run("write 10; close");
        server.wait(eof);
        live.wait_conns(&link.keys());
        links.push(link);
    }
    live.stop_conns();
    stop_recorder(recorder, &file);

    let raw = RawRecording::read(&file);
    assert_eq!(raw.partial, 0, "a finished recording holds whole records");
    // A record is a connection's if its ports are those of one of its
    // sockets: either end, the listener (remote port 0) or the client
    // before its port is chosen (local port 0).
    let of = |link: &Link, r: &(usize, u16, u16)| {
        let (c, s) = (link.client.port(), link.server.port());
        [(c, s), (s, c), (s, 0), (0, s)].contains(&(r.1, r.2))
    };
    let k = raw
        .records
        .iter()
        .position(|r| of(&links[1], r))
        .expect("no record of the second connection");
    assert!(
        raw.records[..k].iter().any(|r| of(&links[0], r))
            && !raw.records[k..].iter().any(|r| of(&links[0], r)),
        "the first connection's records are not all before the second's"
    );
    let offset = HEADER_LEN + raw.snapshot_len + k * RECORD_SIZE;
    assert_eq!(raw.records[k].0, offset);

    let full = dir.join("full.rec");
    readable_copy(&file, &full, None);
    let cut = dir.join("cut.rec");
    readable_copy(&file, &cut, Some(offset + RECORD_SIZE / 2));
    let whole = replay_as_nobody(&full, &["conns", "--format", "json"]);
    assert_eq!(whole.code, Some(0), "{:?}", whole.stderr);
    let whole = parse_replay(&whole);
    let part = replay_as_nobody(&cut, &["conns", "--format", "json"]);
    assert_eq!(part.code, Some(0), "truncated replay: {:?}", part.stderr);
    let errors: Vec<&String> = part
        .stderr
        .iter()
        .filter(|l| l.contains("byte offset"))
        .collect();
    assert_eq!(errors.len(), 1, "{:?}", part.stderr);
    let said: usize = errors[0]
        .split("byte offset ")
        .nth(1)
        .map(|t| {
            t.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in: {}", errors[0]));
    assert_eq!(said, offset, "{}", errors[0]);
    println!(
        "cut at {} (record {k}, header 40 + snapshot {}): {}",
        offset + RECORD_SIZE / 2,
        raw.snapshot_len,
        errors[0]
    );
    let part = parse_replay(&part);
    for key in links[0].keys() {
        // Same bytes before the cut: exactly the same records.
        assert_eq!(find(&part, key), find(&whole, key));
    }
    for key in links[1].keys() {
        find(&whole, key);
        assert!(
            !part.iter().any(|c| (c.sport, c.dport) == key),
            "a connection after the cut was printed"
        );
    }
}

/// `tcpwatch replay FILE ARGS` as root with `TZ` set: its stdout lines.
fn replay_in_zone(file: &Path, tz: &str, args: &[&str]) -> Vec<String> {
    let out = run_ok(
        std::process::Command::new(tcpwatch_bin())
            .arg("replay")
            .arg(file)
            .args(args)
            .env("TZ", tz),
    );
    out.lines().map(str::to_string).collect()
}

/// `2026-12-06T02:13:07.123456789Z` shifted by `offset_s` and written as
/// text output writes it: `2026-12-06 07:43:07.123456`.
fn shifted(rfc3339: &str, offset_s: u64) -> String {
    let t = humantime::parse_rfc3339(rfc3339).unwrap() + Duration::from_secs(offset_s);
    humantime::format_rfc3339_micros(t).to_string()[..26].replacen('T', " ", 1)
}

/// `record --lport P` next to an unfiltered `record`: the filtered file
/// holds the server side of the connections to P and nothing else (the
/// clients' own sockets, whose first transition has no local port yet, and
/// a second server's connections are left out and counted), its summary
/// says it was filtered and adds up, and its replay gives the same records
/// as the unfiltered file's for those sockets. The text views of the
/// replay, in a zone 5 h 30 min east of UTC with `--local-time`, show the
/// date and the time the JSON says, shifted, and `ladder --format json`
/// draws the same connections.
#[test]
fn filtered_recording_keeps_only_matching_sockets() {
    require_live!();
    let dir = Scratch::new("record-filter");
    let (all_file, some_file) = (dir.join("all.rec"), dir.join("some.rec"));
    let mut server = Peer::spawn("twc-server", None);
    let mut other = Peer::spawn("twc-other", None);
    let mut client = Peer::spawn("twc-client", None);
    let ip = IpAddr::from(Ipv4Addr::LOCALHOST);
    let listen = |p: &mut Peer| -> SocketAddr {
        let port: u16 = p.run1("listen 127.0.0.1:0").parse().unwrap();
        SocketAddr::new(ip, port)
    };
    let (to, elsewhere) = (listen(&mut server), listen(&mut other));
    let lport = to.port().to_string();
    let mut all = Tw::spawn(&[
        "record",
        "--format",
        "json",
        "-o",
        all_file.to_str().unwrap(),
    ]);
    let mut some = Tw::spawn(&[
        "record",
        "--format",
        "json",
        "--lport",
        &lport,
        "-o",
        some_file.to_str().unwrap(),
    ]);
    all.wait_ready();
    some.wait_ready();
    const N: usize = 3;
    let mut links = Vec::new();
    for _ in 0..N {
        for (srv, at) in [(&mut server, to), (&mut other, elsewhere)] {
            let link = accept_one(srv, &mut client, at, ip);
            client.run("write 10; close");
            srv.run("read 10; eof; close");
            links.push(link);
        }
    }
    server.run("close_listener");
    other.run("close_listener");
    // Both recorders have seen every close once they are stopped a moment on.
    std::thread::sleep(Duration::from_millis(300));
    let s = record_summary(&some.stop().stderr);
    let a = record_summary(&all.stop().stderr);
    println!("filtered: {s:?}\nall: {a:?}");
    assert_eq!(
        s.filter.as_deref(),
        Some(format!("--lport {lport}").as_str())
    );
    assert_eq!(a.filter, None);
    assert_eq!(a.left_out, 0);
    // Every decoded event is either in the file or counted as left out.
    assert_eq!(s.recorded + s.left_out, s.stream.events, "{s:?}");

    let json = |file: &Path| -> Vec<Conn> {
        replay_in_zone(file, "UTC", &["conns", "--format", "json"])
            .iter()
            .map(|l| Conn::parse(l))
            .collect()
    };
    let (kept, everything) = (json(&some_file), json(&all_file));
    let ours = |c: &&Conn| links.iter().any(|l| l.keys().contains(&(c.sport, c.dport)));
    let kept_ours: Vec<&Conn> = kept.iter().filter(ours).collect();
    // Nothing in the filtered file but sockets with local port P (the
    // listener closes too, but a listener is not a connection).
    for c in &kept {
        assert_eq!(c.sport, to.port(), "not on --lport {lport}: {}", c.line);
    }
    let want: Vec<(u16, u16)> = links
        .iter()
        .filter(|l| l.server == to)
        .map(|l| l.server_key())
        .collect();
    assert_eq!(kept_ours.len(), want.len(), "{kept:#?}");
    for key in &want {
        // The two recorders' probes stamp each event with their own clock
        // read: the same record but for times within a millisecond.
        same_connection(find(&everything, *key), find(&kept, *key));
    }
    // The left-out events are at least the clients' and the other
    // server's: five transitions a socket, 3 sockets per link but one.
    assert!(s.left_out >= (5 * (3 * N)) as u64, "{s:?}");

    // Text in local time, 5 h 30 min east of UTC.
    const TZ: &str = "IST-5:30";
    const EAST: u64 = 5 * 3600 + 30 * 60;
    let text = replay_in_zone(&some_file, TZ, &["conns", "--local-time"]);
    assert!(text[0].starts_with("CLOSED(LOCAL) "), "{}", text[0]);
    let utc = replay_in_zone(&some_file, TZ, &["conns", "--no-header"]);
    for key in &want {
        let c = find(&kept, *key);
        let line = text
            .iter()
            .find(|l| l.contains(&format!(":{} ", key.1)))
            .unwrap_or_else(|| panic!("no text line for {key:?}: {text:#?}"));
        assert!(line.starts_with(&shifted(&c.ts, EAST)), "{}\n{line}", c.ts);
        assert!(
            utc.iter().any(|l| l.starts_with(&shifted(&c.ts, 0))),
            "UTC unless asked: {utc:#?}"
        );
    }
    let trace = replay_in_zone(&some_file, TZ, &["trace", "--local-time"]);
    let trace_json = replay_in_zone(&some_file, TZ, &["trace", "--format", "json"]);
    assert!(trace[0].starts_with("TIME(LOCAL) "), "{}", trace[0]);
    assert_eq!(trace.len(), trace_json.len() + 1);
    for (t, j) in trace[1..].iter().zip(&trace_json) {
        let v: Value = serde_json::from_str(j).unwrap();
        assert!(
            t.starts_with(&shifted(v["ts"].as_str().unwrap(), EAST)),
            "{t}\n{j}"
        );
    }

    // Ladders: the client sockets are not in the file, so each server end
    // is drawn alone, its peer inferred.
    let ladders = replay_in_zone(&some_file, TZ, &["ladder", "--format", "json"]);
    let text = replay_in_zone(&some_file, TZ, &["ladder", "--local-time"]);
    let blocks = ladder_blocks(&text);
    assert_eq!(ladders.len(), blocks.len(), "{ladders:#?}\n{text:#?}");
    for key in &want {
        let client = format!("127.0.0.1:{}", key.1);
        let l: Value = ladders
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|v| v["right"]["endpoint"] == client.as_str())
            .unwrap_or_else(|| panic!("no ladder toward {client}: {ladders:#?}"));
        assert_eq!(l["exact"], false, "{l}");
        assert_eq!(l["left"]["endpoint"], to.to_string());
        assert_eq!(l["left"]["role"], "server");
        let segments: Vec<&str> = l["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["segment"].as_str())
            .collect();
        // Passive open (the handshake's last ACK), then the client's FIN
        // and the server's own; the client closed first.
        assert_eq!(segments.first(), Some(&"ACK"), "{l}");
        assert!(segments.contains(&"FIN"), "{l}");
        let block = blocks
            .iter()
            .find(|b| b.header.starts_with(&format!("{to} <-> {client}   ")))
            .unwrap_or_else(|| panic!("no picture for {client}: {text:#?}"));
        let when = format!("   {} +05:30   ", shifted(l["ts"].as_str().unwrap(), EAST));
        assert!(
            block.header.contains(&when),
            "{when} not in {}",
            block.header
        );
        assert_eq!(
            block.body.iter().filter(|b| b.contains("--")).count(),
            segments.len(),
            "{}",
            block.text()
        );
    }
}
