//! Why a reset was sent: three resets the test causes on loopback, each
//! with the reason the kernel gives (`tcp:tcp_send_reset`'s `reason`, 6.10
//! and later), checked in what `trace`, `conns`, `record` then `replay
//! ladder`/`replay conns`, and the daemon's counter show, against what the
//! test did and against bpftrace reading the same tracepoint:
//! - SO_LINGER 0 then close(): the kernel sends the RST from
//!   `tcp_disconnect`, reason TCP_STATE (its TCP_ABORT_ON_LINGER is for
//!   a FIN_WAIT2 socket with TCP_LINGER2 < 0, not this);
//! - close() with unread data: TCP_ABORT_ON_CLOSE;
//! - a SYN to a port bound but not listening: NO_SOCKET, sent on behalf of
//!   no socket (tcpwatch shows skaddr 0 and the ports from the segment),
//!   and the client's connect fails with ECONNREFUSED.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::require_live;
use crate::support::conns::*;
use crate::support::daemon::{find_sample, Daemon};
use crate::support::peer::{connect_pair, Link, Peer};
use crate::support::trace::{EventLine, ResetOracle, Tcpwatch};
use crate::support::{have, own_netns, set_mode, skip, Scratch};

/// What the test did to cause one reset: who sent it, from which port to
/// which, and the reason the kernel must give.
struct Caused {
    what: &'static str,
    /// The sending process (none: no socket sent it).
    sender: Option<(u32, String)>,
    /// The sender's (local port, remote port).
    from: (u16, u16),
    reason: &'static str,
    /// Number in the kernel's `enum sk_rst_reason`.
    number: u32,
    /// The sender's state as the tracepoint gives it (0: no socket).
    state: u32,
}

/// The three resets, each on a connection of its own. Returns what was
/// caused and the links of the two connections that opened.
fn cause_resets(
    server: &mut Peer,
    client: &mut Peer,
    holder: &mut Peer,
) -> (Vec<Caused>, Vec<Link>) {
    let ip = IpAddr::from(Ipv4Addr::LOCALHOST);
    let mut caused = Vec::new();
    let mut links = Vec::new();

    // SO_LINGER 0: the client aborts.
    let link = connect_pair(server, client, ip, ip);
    let reset = server.send("read_reset");
    client.run("linger0; close");
    assert_eq!(server.wait(reset), [libc::ECONNRESET.to_string()]);
    server.run("close");
    caused.push(Caused {
        what: "SO_LINGER 0",
        sender: Some((client.pid, client.comm.clone())),
        from: link.client_key(),
        reason: "TCP_STATE",
        number: 14,
        state: 7,
    });
    links.push(link);

    // Unread data: the client writes, the server closes without reading.
    let link = connect_pair(server, client, ip, ip);
    client.run("write 100");
    // Let the data arrive before the close.
    std::thread::sleep(Duration::from_millis(100));
    let reset = client.send("read_reset");
    server.run("close");
    assert_eq!(client.wait(reset), [libc::ECONNRESET.to_string()]);
    client.run("close");
    caused.push(Caused {
        what: "unread data",
        sender: Some((server.pid, server.comm.clone())),
        from: link.server_key(),
        reason: "TCP_ABORT_ON_CLOSE",
        number: 11,
        state: 7,
    });
    links.push(link);

    // A port bound but not listening: no socket answers the SYN.
    let port: u16 = holder
        .run1(&format!("bind {}", SocketAddr::new(ip, 0)))
        .parse()
        .unwrap();
    let v = client.run1(&format!("connect_fail {}", SocketAddr::new(ip, port)));
    let (errno, cport) = v.split_once(' ').unwrap();
    assert_eq!(errno, libc::ECONNREFUSED.to_string());
    caused.push(Caused {
        what: "closed port",
        sender: None,
        from: (port, cport.parse().unwrap()),
        reason: "NO_SOCKET",
        number: 1,
        state: 0,
    });
    (caused, links)
}

fn ports(caused: &[Caused]) -> Vec<u16> {
    caused.iter().flat_map(|c| [c.from.0, c.from.1]).collect()
}

/// The reset lines `trace` printed, each matched to what the test did, and
/// bpftrace's reason for the same reset equal to tcpwatch's.
#[test]
fn trace_conns_and_ladder_say_why_each_reset_was_sent() {
    require_live!();
    if !have(&["bpftrace"]) {
        return skip("bpftrace is not installed: no independent reading of the reset reasons");
    }
    let scratch = Scratch::new("resets");
    let file = scratch.join("resets.twr");
    let oracle = ResetOracle::start();
    let trace = Tcpwatch::start("resets", &[]);
    let mut conns = Tw::conns();
    let recorder = Tw::start(&["record", "--format", "json", "-o", file.to_str().unwrap()]);
    let mut server = Peer::spawn("twr-server", None);
    let mut client = Peer::spawn("twr-client", None);
    let mut holder = Peer::spawn("twr-holder", None);
    let (caused, links) = cause_resets(&mut server, &mut client, &mut holder);
    let refused = caused.last().unwrap().from;
    let mut keys: Vec<(u16, u16)> = links.iter().flat_map(|l| l.keys()).collect();
    keys.push((refused.1, refused.0));
    conns.wait_conns(&keys);
    // The recorder has seen them once the live conns has (same events).
    std::thread::sleep(Duration::from_millis(500));
    let run = trace.stop();
    let live = conns.stop_conns();
    let f = recorder.stop();
    assert!(f.status.success());
    let bt = oracle.stop(&ports(&caused));
    let netns = own_netns();

    // trace: one reset_sent line per reset caused, with the kernel's reason.
    let ours: Vec<&EventLine> = run
        .events
        .iter()
        .filter(|e| e.netns.is_none_or(|n| n == netns) || e.skaddr == "0x0")
        .collect();
    for c in &caused {
        let sent: Vec<&&EventLine> = ours
            .iter()
            .filter(|e| e.event == "reset_sent" && (e.sport, e.dport) == c.from)
            .collect();
        println!("{}: trace {sent:?}", c.what);
        assert_eq!(sent.len(), 1, "{}: reset lines {sent:?}", c.what);
        let e = sent[0];
        assert_eq!(
            e.reset_reason.as_deref(),
            Some(c.reason),
            "{}: {e:?}",
            c.what
        );
        assert!(e.reset_words.as_ref().is_some_and(|w| !w.is_empty()));
        assert_eq!(
            (e.family.as_str(), e.saddr.as_str(), e.daddr.as_str()),
            ("ipv4", "127.0.0.1", "127.0.0.1")
        );
        // The socket's owner, and the time since its last transition.
        let owner = e.pid.zip(e.comm.clone());
        assert_eq!(owner, c.sender, "{}: {e:?}", c.what);
        assert_eq!(
            e.delta_ms.is_some(),
            c.sender.is_some(),
            "{}: {e:?}",
            c.what
        );
        match c.state {
            0 => {
                assert_eq!(e.skaddr, "0x0", "{}: no socket sent it", c.what);
                assert_eq!(e.state, None, "{}", c.what);
                assert_eq!(e.reset_words.as_deref(), Some("no socket (port closed)"));
            }
            _ => {
                assert_ne!(e.skaddr, "0x0", "{}", c.what);
                assert_eq!(e.state.as_deref(), Some("CLOSE"), "{}", c.what);
            }
        }
        // bpftrace read the same reset, with the same reason and state.
        let seen: Vec<&(u16, u16, u32, u32)> = bt.iter().filter(|r| (r.0, r.1) == c.from).collect();
        println!("{}: bpftrace {seen:?}", c.what);
        assert_eq!(seen.len(), 1, "{}: bpftrace saw {seen:?}", c.what);
        assert_eq!((seen[0].2, seen[0].3), (c.state, c.number), "{}", c.what);
    }
    // The end that got each RST: a reset_received line for the two that
    // had a socket to receive it (the refused connect's is its SYN_SENT
    // socket's).
    for (link, c) in links.iter().zip(&caused) {
        let to = (c.from.1, c.from.0);
        assert!(
            ours.iter()
                .any(|e| e.event == "reset_received" && (e.sport, e.dport) == to),
            "{}: no reset_received at {to:?} for {link:?}",
            c.what
        );
    }

    // conns: the sender's record names the reason; the receiver's none.
    let check_conns = |conns: &[Conn], source: &str| {
        for c in &caused[..2] {
            let sender = find(conns, c.from);
            let receiver = find(conns, (c.from.1, c.from.0));
            sender.expect(
                &format!("{source}: {} sender", c.what),
                &[
                    ("close", "aborted".into()),
                    ("closed_by", "local".into()),
                    ("resets_sent", 1.into()),
                    ("reset_reason", c.reason.into()),
                ],
            );
            receiver.expect(
                &format!("{source}: {} receiver", c.what),
                &[
                    ("close", "reset_received".into()),
                    ("resets_received", 1.into()),
                    ("resets_sent", 0.into()),
                    ("reset_reason", Value::Null),
                ],
            );
        }
        let refused_client = find(conns, (refused.1, refused.0));
        refused_client.expect(
            &format!("{source}: refused client"),
            &[
                ("open", "refused".into()),
                ("close", "never_opened".into()),
                ("error", "ECONNREFUSED".into()),
                ("resets_received", 1.into()),
                ("resets_sent", 0.into()),
                ("reset_reason", Value::Null),
            ],
        );
    };
    check_conns(&live, "conns");

    // record, then replay: nothing lost on the way.
    let copy = scratch.join("copy.twr");
    std::fs::copy(&file, &copy).unwrap();
    set_mode(&copy, 0o644);
    let replayed = replay_as_nobody(&copy, &["conns", "--format", "json"]);
    assert_eq!(replayed.code, Some(0), "{:?}", replayed.stderr);
    let replayed: Vec<Conn> = replayed.stdout.iter().map(|l| Conn::parse(l)).collect();
    check_conns(&replayed, "replay conns");
    let trace_again = replay_as_nobody(&copy, &["trace", "--format", "json"]);
    let again: Vec<EventLine> = trace_again
        .stdout
        .iter()
        .filter_map(|l| EventLine::parse(l))
        .collect();
    for c in &caused {
        assert!(
            again.iter().any(|e| e.event == "reset_sent"
                && (e.sport, e.dport) == c.from
                && e.reset_reason.as_deref() == Some(c.reason)),
            "replay trace: no {} reset",
            c.what
        );
    }

    // The ladder's closing words: which end sent the RST, and why.
    let ladder = replay_as_nobody(&copy, &["ladder"]);
    assert_eq!(ladder.code, Some(0), "{:?}", ladder.stderr);
    let blocks = ladder_blocks(&ladder.stdout);
    for (link, (c, sender)) in links.iter().zip(caused.iter().zip(["client", "server"])) {
        let block = blocks
            .iter()
            .find(|b| b.header.starts_with(&ladder_header_prefix(link)))
            .unwrap_or_else(|| panic!("{}: no ladder for {link:?}", c.what));
        let text = block.text();
        println!("{text}");
        let endpoint = if sender == "client" {
            link.client
        } else {
            link.server
        };
        let want = format!("{sender} {endpoint} sent the RST: ");
        let line = block
            .body
            .iter()
            .find(|l| l.contains(&want))
            .unwrap_or_else(|| panic!("{}: no `{want}` in\n{text}", c.what));
        assert!(
            line.ends_with(&format!("({})", c.reason)),
            "{}: {line}",
            c.what
        );
    }
    drop(scratch);
}

/// The daemon counts resets by direction and reason: after the test's
/// three, each of its reasons has grown by at least one (other tests on
/// this host add their own), and a received one is counted too.
#[test]
fn daemon_counts_resets_by_reason() {
    require_live!();
    let daemon = Daemon::start(&["--interval", "1"]);
    let value = |labels: &[(&str, &str)]| {
        find_sample(&daemon.metrics(), "tcpwatch_resets_total", labels).unwrap_or(0.0)
    };
    let series = [
        [("direction", "sent"), ("reason", "TCP_STATE")],
        [("direction", "sent"), ("reason", "TCP_ABORT_ON_CLOSE")],
        [("direction", "sent"), ("reason", "NO_SOCKET")],
        [("direction", "received"), ("reason", "unknown")],
    ];
    let before: Vec<f64> = series.iter().map(|s| value(s)).collect();
    let mut server = Peer::spawn("twr-dserver", None);
    let mut client = Peer::spawn("twr-dclient", None);
    let mut holder = Peer::spawn("twr-dholder", None);
    let _ = cause_resets(&mut server, &mut client, &mut holder);
    // Two received: the SO_LINGER 0 and unread-data peers (the refused
    // client's is a third).
    let want = [1.0, 1.0, 1.0, 3.0];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now: Vec<f64> = series.iter().map(|s| value(s)).collect();
        let grew: Vec<f64> = now.iter().zip(&before).map(|(a, b)| a - b).collect();
        if grew.iter().zip(&want).all(|(g, w)| g >= w) {
            println!("tcpwatch_resets_total grew by {grew:?} for {series:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resets counted {grew:?}, expected at least {want:?} for {series:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.stop();
}
