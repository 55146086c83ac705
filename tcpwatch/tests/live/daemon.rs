//! `tcpwatch daemon` on a real kernel: known connections on loopback must
//! show in `/metrics`, `/api/timewait` and `/api/conns` with the right
//! figures (checked against what the test did and against `ss`); bad
//! requests and idle or garbage clients do not hurt it; and `conns --from`
//! and `timewait --from` show what direct mode shows.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tcpwatch::daemon::client::ConnsPage;
use tcpwatch::daemon::{Health, Status};
use tcpwatch::model::timewait::Snapshot;
use tcpwatch::views::conns::ConnRecord;

use crate::require_live;
use crate::support::conns::timeless;
use crate::support::daemon::{metric, parse_exposition, request, Daemon};
use crate::support::timewait::Snap;
use crate::support::{
    free_port, own_netns, tcpwatch_bin, Proc, Scratch, START_TIMEOUT, STOP_TIMEOUT,
};

const PAYLOAD: usize = 100;

/// A loopback server that reads each connection to its end and closes it,
/// so the client (which closes first) is left with a TIME_WAIT socket.
/// A listener below the ephemeral port range, as a real server's port is:
/// for sockets older than tracing, tcpwatch takes the higher port of a
/// timewait socket as the client's; and no earlier test's client can have
/// used the port, so no stale socket names it as its peer.
fn low_port_server() -> (u16, JoinHandle<()>, TcpListener) {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Each call in this process starts past the last one's port: a port an
    // earlier test used still has its timewait sockets.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let first = NEXT.fetch_add(100, Ordering::Relaxed);
    let base = std::process::id() % 5_000 + first;
    let listener = (0..5_000u32)
        .map(|i| 20_000 + ((base + i) % 10_000) as u16)
        .find_map(|p| TcpListener::bind(("127.0.0.1", p)).ok())
        .expect("a free port between 20000 and 30000");
    server_on(listener)
}

fn server_on(listener: TcpListener) -> (u16, JoinHandle<()>, TcpListener) {
    let port = listener.local_addr().unwrap().port();
    let l = listener.try_clone().unwrap();
    let h = std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            if buf == b"stop" {
                return;
            }
        }
    });
    (port, h, listener)
}

fn stop_server(port: u16, h: JoinHandle<()>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"stop").unwrap();
    drop(s);
    h.join().unwrap();
}

/// `n` connections to `port`, each sending PAYLOAD bytes; the client
/// closes first and waits for the server's FIN, so each leaves TIME_WAIT.
/// Returns the client ports used.
fn connect_n(port: u16, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let local = s.local_addr().unwrap().port();
            s.write_all(&[7u8; PAYLOAD]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            local
        })
        .collect()
}

/// TIME_WAIT sockets toward 127.0.0.1:port from the given client ports, as
/// `ss` lists them. (Other sockets may name that port as their peer: a
/// server's timewait socket toward an earlier client that used it.)
fn ss_timewait_to(port: u16, clients: &[u16]) -> usize {
    let out = Command::new("ss")
        .args([
            "-Htan",
            "state",
            "time-wait",
            "dst",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .expect("ss (iproute2) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // Recv-Q Send-Q Local:Port Peer:Port
            let local = l.split_whitespace().nth(2)?;
            local.rsplit(':').next()?.parse::<u16>().ok()
        })
        .filter(|p| clients.contains(p))
        .count()
}

/// The count of the remote-endpoint group `key`, if the snapshot has one.
fn remote_count(snapshot: &Snapshot, key: &str) -> Option<u64> {
    snapshot
        .by_remote
        .iter()
        .find(|g| g.key == key)
        .map(|g| g.count)
}

/// Ports held toward destination `key`, if the snapshot lists it.
fn ports_held(snapshot: &Snapshot, key: &str) -> Option<u64> {
    snapshot
        .destinations
        .iter()
        .find(|d| d.remote == key)
        .map(|d| d.ports_held)
}

/// A record of a socket in this test's network namespace toward or from
/// 127.0.0.1 (other namespaces have their own port space).
fn ours(r: &ConnRecord) -> bool {
    r.netns == Some(own_netns()) && r.daddr.to_string() == "127.0.0.1"
}

#[test]
fn daemon_reports_known_connections() {
    require_live!();
    const N: usize = 25;
    // Enough kept that connections made elsewhere on the host meanwhile do
    // not push the test's out.
    let daemon = Daemon::start(&["--interval", "1", "--top", "50", "--keep", "200000"]);
    let health: Health = daemon.get_as("/healthz");
    assert_eq!(health.status, Status::Ok, "{health:?}");

    let (port, server_thread, _l) = low_port_server();
    let dest = format!("127.0.0.1:{port}");
    let clients = connect_n(port, N);
    let ss_count = ss_timewait_to(port, &clients);

    // /api/timewait: the next snapshot has them, by remote endpoint.
    let started = Instant::now();
    let tw: Snapshot = daemon.wait_for("/api/timewait", Duration::from_secs(15), |s| {
        remote_count(s, &dest) == Some(N as u64)
    });
    eprintln!(
        "timewait toward {dest}: daemon {:?}, ss {ss_count}, test made {N} (seen after {:?})",
        remote_count(&tw, &dest),
        started.elapsed()
    );
    assert_eq!(remote_count(&tw, &dest), Some(N as u64), "{tw:?}");
    assert_eq!(ss_count, N, "ss disagrees with what the test did");
    assert_eq!(ports_held(&tw, &dest), Some(N as u64), "{tw:?}");

    // /metrics: the same figures, and the host-wide counters at least ours.
    let m = daemon.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(m.headers.contains("openmetrics-text"), "{}", m.headers);
    let text = m.body;
    let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("/metrics: {e}"));
    let series = |s: &str| metric(&samples, s).unwrap_or_else(|| panic!("no series {s}"));
    // TIME_WAIT series are per network namespace: the test's is the
    // daemon's own (labelled by its inode).
    let ns = own_netns();
    eprintln!(
        "metrics: timewait_by_destination {}, ports_held {}, opened active {}, passive {}, closed orderly {}, handshakes {}, events {}, lost ring_full {}, kernel_skipped {}",
        series(&format!("tcpwatch_timewait_by_destination{{netns=\"{ns}\",destination=\"{dest}\"}}")),
        series(&format!("tcpwatch_destination_ports_held{{netns=\"{ns}\",local=\"127.0.0.1\",destination=\"{dest}\"}}")),
        series("tcpwatch_connections_opened_total{direction=\"active\"}"),
        series("tcpwatch_connections_opened_total{direction=\"passive\"}"),
        series("tcpwatch_connections_closed_total{kind=\"orderly\"}"),
        series("tcpwatch_handshake_seconds_count{direction=\"active\"}"),
        series("tcpwatch_events_total"),
        series("tcpwatch_lost_events_total{reason=\"ring_full\"}"),
        series("tcpwatch_lost_events_total{reason=\"kernel_skipped\"}"),
    );
    assert_eq!(
        series(&format!(
            "tcpwatch_timewait_by_destination{{netns=\"{ns}\",destination=\"{dest}\"}}"
        )),
        N as f64
    );
    assert_eq!(
        series(&format!(
            "tcpwatch_destination_ports_held{{netns=\"{ns}\",local=\"127.0.0.1\",destination=\"{dest}\"}}"
        )),
        N as f64
    );
    for s in [
        "tcpwatch_connections_opened_total{direction=\"active\"}",
        "tcpwatch_connections_opened_total{direction=\"passive\"}",
        "tcpwatch_handshake_seconds_count{direction=\"active\"}",
        "tcpwatch_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\"}",
        "tcpwatch_transitions_total{from=\"FIN_WAIT2\",to=\"CLOSE\"}",
        "tcpwatch_timewait_created_total",
    ] {
        assert!(series(s) >= N as f64, "{s} = {} < {N}", series(s));
    }
    assert!(series("tcpwatch_connections_closed_total{kind=\"orderly\"}") >= 2.0 * N as f64);
    assert!(
        series(&format!(
            "tcpwatch_timewait_sockets{{netns=\"{ns}\",substate=\"time_wait\"}}"
        )) >= N as f64
    );
    assert!(series(&format!("tcpwatch_kernel_tw_max_buckets{{netns=\"{ns}\"}}")) > 0.0);
    assert!(
        series(&format!(
            "tcpwatch_local_port_range_ports{{netns=\"{ns}\"}}"
        )) > 0.0
    );
    assert!(metric(&samples, "tcpwatch_build_info{version=\"0.1.0\"}") == Some(1.0));
    assert!(text.trim_end().ends_with("# EOF"));

    // /api/conns: both ends of every connection, with what was sent.
    let page: ConnsPage = daemon.wait_for(
        "/api/conns?limit=100000",
        Duration::from_secs(10),
        |p: &ConnsPage| p.conns.iter().filter(|r| r.dport == port).count() >= N,
    );
    let conns = &page.conns;
    let clients: Vec<&ConnRecord> = conns
        .iter()
        .filter(|r| r.dport == port && ours(r))
        .collect();
    let servers: Vec<&ConnRecord> = conns
        .iter()
        .filter(|r| r.sport == port && ours(r))
        .collect();
    eprintln!(
        "/api/conns: {} records, {} client ends and {} server ends toward {dest}, next {}",
        conns.len(),
        clients.len(),
        servers.len(),
        page.next
    );
    assert_eq!(clients.len(), N, "{page:?}");
    assert_eq!(servers.len(), N, "{page:?}");
    let me = std::process::id();
    for c in &clients {
        assert_eq!(c.role.as_deref(), Some("client"), "{c:?}");
        assert_eq!(c.open, "active", "{c:?}");
        assert_eq!(c.close, "orderly", "{c:?}");
        assert_eq!(c.closed_by.as_deref(), Some("local"), "{c:?}");
        assert_eq!(c.bytes_sent, Some(PAYLOAD as u64), "{c:?}");
        let tw_state = c.timewait.as_ref().map(|t| t.state.as_str());
        assert_eq!(tw_state, Some("TIME_WAIT"), "{c:?}");
        assert_eq!(c.pid, Some(me), "{c:?}");
    }
    for s in &servers {
        assert_eq!(s.role.as_deref(), Some("server"), "{s:?}");
        assert_eq!(s.bytes_received, Some(PAYLOAD as u64), "{s:?}");
        assert_eq!(s.closed_by.as_deref(), Some("peer"), "{s:?}");
    }
    // `since` gives only what is newer.
    connect_n(port, 1);
    let newer: ConnsPage = daemon.wait_for(
        &format!("/api/conns?since={}", page.next),
        Duration::from_secs(10),
        |p: &ConnsPage| p.conns.iter().any(|r| r.dport == port),
    );
    assert!(newer
        .conns
        .iter()
        .all(|r| r.dport != port || r.ts > clients[N - 1].ts));
    let limited: ConnsPage = daemon.get_as("/api/conns?limit=1");
    assert_eq!(limited.conns.len(), 1);

    stop_server(port, server_thread);
    let f = daemon.stop();
    let last = f.stderr.last().cloned().unwrap_or_default();
    eprintln!("daemon's last log line: {last}");
    assert!(
        last.contains("stopped: programs detached"),
        "{}",
        f.stderr.join("\n")
    );
}

#[test]
fn bad_requests_and_bad_clients_do_not_hurt_it() {
    require_live!();
    let daemon = Daemon::start(&["--log-format", "json"]);
    let expect = |path: &str, status: u16| {
        let r = daemon.get(path);
        assert_eq!(r.status, status, "GET {path}: {}", r.body);
        if status != 200 {
            let v: Value = serde_json::from_str(&r.body)
                .unwrap_or_else(|e| panic!("GET {path}: error body is not JSON ({e}): {}", r.body));
            assert!(v["error"].is_string(), "{v}");
        }
    };
    expect("/nope", 404);
    expect("/api", 404);
    expect("/api/conns/7", 404);
    expect("/api/conns?limit=abc", 400);
    expect("/api/conns?limit=0", 400);
    expect("/api/conns?limit=5&limit=6", 400);
    expect("/api/conns?color=red", 400);
    expect("/metrics?x=1", 400);
    expect("/api/conns?limit=3", 200);
    let post = request(
        daemon.addr,
        "POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .expect("POST /metrics");
    assert_eq!(post.status, 405);
    assert!(
        post.headers.contains("allow: GET, HEAD"),
        "{}",
        post.headers
    );

    // Garbage: answered 400 and closed.
    let garbage =
        request(daemon.addr, "\u{1}\u{2}NOT HTTP AT ALL\r\n\r\n").expect("garbage request");
    assert_eq!(garbage.status, 400);
    // Clients that connect and send nothing, or half a request, do not
    // block others; the server drops them after its header timeout.
    let idle: Vec<TcpStream> = (0..8)
        .map(|i| {
            let mut s = TcpStream::connect(daemon.addr).unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /metr").unwrap();
            }
            s
        })
        .collect();
    let t = Instant::now();
    expect("/healthz", 200);
    let answered = t.elapsed();
    let t = Instant::now();
    let mut dropped = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = Vec::new();
        // The server closes the connection (perhaps with a 408 first).
        if s.read_to_end(&mut buf).is_ok() {
            dropped += 1;
        }
    }
    eprintln!(
        "with 8 idle clients /healthz answered in {answered:?}; they were dropped after {:?} ({dropped} of 8 closed by the server)",
        t.elapsed()
    );
    assert!(answered < Duration::from_secs(2));
    assert_eq!(dropped, 8);
    assert!(t.elapsed() < Duration::from_secs(25));
    expect("/healthz", 200);

    let f = daemon.stop();
    // --log-format json: every line on stderr is a JSON object.
    for l in &f.stderr {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
    }
    let last: Value = serde_json::from_str(f.stderr.last().unwrap()).unwrap();
    assert_eq!(last["message"], "stopped: programs detached");
    assert!(last["events"].as_u64().is_some(), "{last}");
}

#[test]
fn port_in_use_is_one_line_and_exit_1() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for listen in [addr.as_str(), "192.0.2.1:80", "not-an-address"] {
        let out = Command::new(tcpwatch_bin())
            .args(["daemon", "--listen", listen])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("--listen {listen}: exit {:?}: {err}", out.status.code());
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(listen), "{err}");
        let want = if listen == "not-an-address" { 2 } else { 1 };
        assert_eq!(out.status.code(), Some(want), "{err}");
    }
}

/// Starts `tcpwatch <args>` and waits for the stderr line saying it runs.
fn spawn_ready(name: &str, args: &[&str], ready: &str) -> Proc {
    let mut cmd = Command::new(tcpwatch_bin());
    cmd.args(args);
    let p = Proc::spawn(name, cmd, false);
    p.wait_stderr(|l| l.contains(ready), 1, START_TIMEOUT);
    p
}

/// The record's fields that do not depend on when each program read the
/// clock (the daemon and the direct run each load their own program).
fn clockless(r: &ConnRecord) -> ConnRecord {
    let mut r = timeless(r);
    r.transitions.clear();
    r
}

#[test]
fn from_mode_matches_direct_mode() {
    require_live!();
    const N: usize = 10;
    let daemon = Daemon::start(&["--interval", "1", "--top", "50", "--keep", "200000"]);
    let (port, server_thread, _l) = low_port_server();
    let p = port.to_string();
    let url = daemon.url();
    let direct = spawn_ready(
        "conns direct",
        &["conns", "--format", "json", "--rport", &p],
        "tracing TCP connections",
    );
    let from = spawn_ready(
        "conns --from",
        &["conns", "--format", "json", "--rport", &p, "--from", &url],
        "reading TCP connections from",
    );
    let from_text = spawn_ready(
        "conns --from text",
        &["conns", "--rport", &p, "--from", &url],
        "reading TCP connections from",
    );
    connect_n(port, N);
    let netns = own_netns();
    let ours_line = |l: &str| {
        l.contains(&format!("\"dport\":{port},"))
            && l.contains(&format!("\"netns\":{netns},"))
            && l.contains("\"daddr\":\"127.0.0.1\"")
    };
    direct.wait_stdout(ours_line, N, STOP_TIMEOUT);
    from.wait_stdout(ours_line, N, STOP_TIMEOUT);
    from_text.wait_stdout(|l| l.contains(&format!(":{port} ")), N, STOP_TIMEOUT);
    let mut outs = Vec::new();
    for proc in [direct, from, from_text] {
        outs.push(proc.interrupt(STOP_TIMEOUT).stdout);
    }
    // Other network namespaces have their own port space: only ours.
    let parse = |lines: &[String]| -> HashMap<u16, ConnRecord> {
        lines
            .iter()
            .map(|l| serde_json::from_str::<ConnRecord>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .filter(ours)
            .map(|r| (r.sport, r))
            .collect()
    };
    let (d, f) = (parse(&outs[0]), parse(&outs[1]));
    assert_eq!(d.len(), N, "direct: {:?}", outs[0]);
    assert_eq!(f.len(), N, "from: {:?}", outs[1]);
    let mut worst_ms: f64 = 0.0;
    for (sport, dv) in &d {
        let fv = f
            .get(sport)
            .unwrap_or_else(|| panic!("--from lacks :{sport}"));
        assert_eq!(clockless(dv), clockless(fv), "direct and --from differ");
        worst_ms = worst_ms.max((dv.lifetime_ms - fv.lifetime_ms).abs());
    }
    eprintln!(
        "{N} connections: direct and --from agree on every field but the clock readings; lifetimes differ by at most {:.3} µs",
        worst_ms * 1000.0
    );
    assert!(worst_ms < 1.0, "lifetimes differ by {worst_ms} ms");
    // Text: the header, then one line per connection with the same columns
    // direct mode prints (the clock columns aside).
    let text = &outs[2];
    assert!(text[0].starts_with("CLOSED(UTC)"), "{text:?}");
    let mut lines = 0;
    for l in &text[1..] {
        // The date and the time of day come first.
        let cols: Vec<&str> = l.split_whitespace().collect();
        let sport: u16 = cols[5].rsplit(':').next().unwrap().parse().unwrap();
        let Some(dv) = d.get(&sport) else { continue };
        if cols[6] != format!("127.0.0.1:{port}") {
            continue;
        }
        lines += 1;
        assert_eq!(
            format!("{}T{}", cols[0], cols[1]),
            f[&sport].ts[..26],
            "the daemon's closing time, to the microsecond: {l}"
        );
        assert_eq!(cols[2], dv.pid.expect("pid").to_string(), "{l}");
        assert_eq!(cols[4], "client", "{l}");
        assert!(l.contains("orderly") && l.contains("TIME_WAIT 60s"), "{l}");
    }
    assert_eq!(lines, N, "{text:?}");

    // timewait: the daemon's snapshot through --from and a direct run's
    // own agree on our destination.
    let tw_direct = spawn_ready(
        "timewait direct",
        &[
            "timewait",
            "--format",
            "json",
            "--interval",
            "1",
            "--top",
            "50",
        ],
        "tracing TCP connections",
    );
    let tw_from = spawn_ready(
        "timewait --from",
        &[
            "timewait",
            "--format",
            "json",
            "--interval",
            "1",
            "--from",
            &url,
        ],
        "reading TIME_WAIT snapshots from",
    );
    let dest = format!("\"key\":\"127.0.0.1:{port}\",");
    tw_direct.wait_stdout(|l| l.contains(&dest), 2, STOP_TIMEOUT);
    tw_from.wait_stdout(|l| l.contains(&dest), 2, STOP_TIMEOUT);
    let mut last = Vec::new();
    for proc in [tw_direct, tw_from] {
        let f = proc.interrupt(STOP_TIMEOUT);
        last.push(Snap::parse(f.stdout.last().expect("a snapshot")));
    }
    let key = format!("127.0.0.1:{port}");
    let counts: Vec<_> = last.iter().map(|s| remote_count(s, &key)).collect();
    eprintln!(
        "timewait toward {key}: direct {:?}, --from {:?}",
        counts[0], counts[1]
    );
    assert_eq!(counts[0], Some(N as u64));
    assert_eq!(counts[1], Some(N as u64));
    for s in &last {
        assert_eq!(ports_held(s, &key), Some(N as u64), "{s:?}");
    }
    stop_server(port, server_thread);
    daemon.stop();
}

#[test]
fn restart_picks_up_existing_timewait_sockets() {
    require_live!();
    const N: usize = 12;
    let first = Daemon::start(&["--interval", "1", "--top", "50"]);
    let (port, server_thread, _l) = low_port_server();
    let dest = format!("127.0.0.1:{port}");
    let clients = connect_n(port, N);
    let seen: Snapshot = first.wait_for("/api/timewait", Duration::from_secs(15), |s| {
        remote_count(s, &dest) == Some(N as u64)
    });
    assert_eq!(remote_count(&seen, &dest), Some(N as u64), "{seen:?}");
    first.stop();
    // A new daemon knows them from its first answer, from the kernel's list.
    let t = Instant::now();
    let second = Daemon::start(&["--interval", "1", "--top", "50"]);
    let snapshot: Snapshot = second.get_as("/api/timewait");
    let ss = ss_timewait_to(port, &clients);
    eprintln!(
        "after a restart ({:?} to serve): {:?} timewait sockets toward {dest}, ss {ss}, {} from before tracing",
        t.elapsed(),
        remote_count(&snapshot, &dest),
        snapshot.before_tracing
    );
    assert_eq!(
        remote_count(&snapshot, &dest),
        Some(N as u64),
        "{snapshot:?}"
    );
    assert_eq!(ss, N);
    assert!(snapshot.before_tracing >= N as u64);
    stop_server(port, server_thread);
    second.stop();
}

/// A `tcpwatch daemon` started by hand, its stderr read without blocking:
/// what it has written so far is all in the pipe, so a line written before
/// an answer is seen once the answer is.
struct Watched {
    child: std::process::Child,
    stderr: std::process::ChildStderr,
    log: String,
}

impl Watched {
    fn spawn(args: &[&str]) -> Watched {
        use std::os::fd::AsRawFd;
        use std::process::Stdio;
        let mut child = Command::new(tcpwatch_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpwatch daemon");
        let stderr = child.stderr.take().expect("piped stderr");
        // SAFETY: fcntl on a descriptor this process owns.
        unsafe {
            let fd = stderr.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            assert!(flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0);
        }
        Watched {
            child,
            stderr,
            log: String::new(),
        }
    }

    /// Everything written to stderr so far.
    fn log_now(&mut self) -> &str {
        let mut buf = [0u8; 4096];
        loop {
            match self.stderr.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.log.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading the daemon's stderr: {e}"),
            }
        }
        &self.log
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait for the daemon")
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /healthz` once: (status, body), or `None` while nothing listens.
fn healthz(addr: &str) -> Option<(u16, String)> {
    let r = request(
        addr.parse().ok()?,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .ok()?;
    Some((r.status, r.body))
}

/// `/healthz` is a readiness probe: from the moment the daemon listens it
/// answers 503 ("starting") until its probe is live and the first snapshot
/// is served, and only then 200 ("ok"). Polled from the moment the process
/// starts, no 200 may come before the line saying tracing began.
#[test]
fn healthz_is_ready_only_once_tracing() {
    require_live!();
    let addr = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let mut d = Watched::spawn(&["daemon", "--listen", &addr]);
    let live_line = format!("listening on http://{addr}; tracing TCP connections");
    let mut starting = 0;
    let first_ok = loop {
        assert!(
            started.elapsed() < START_TIMEOUT,
            "no 200 from /healthz within {START_TIMEOUT:?}: {}",
            d.log_now()
        );
        if let Some(status) = d.exited() {
            panic!(
                "the daemon exited ({status}) before it was live: {}",
                d.log_now()
            );
        }
        // Gently: each answer leaves a timewait socket behind.
        std::thread::sleep(Duration::from_millis(10));
        let Some((status, body)) = healthz(&addr) else {
            continue;
        };
        // Read after the answer: all the daemon wrote before answering.
        let said_live = d.log_now().contains(&live_line);
        let h: Health = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        match status {
            // (The line may be written just after a 503 is sent.)
            503 => {
                assert_eq!(h.status, Status::Starting, "{body}");
                starting += 1;
            }
            200 => {
                assert_eq!(h.status, Status::Ok, "{body}");
                assert!(
                    said_live,
                    "/healthz answered 200 before the daemon said tracing began:\n{}",
                    d.log
                );
                break started.elapsed();
            }
            other => panic!("/healthz answered {other}: {body}"),
        }
    };
    eprintln!(
        "/healthz: {starting} answers 503 while loading, then 200 at {first_ok:?}, after the line \
         saying tracing began"
    );
    assert!(
        starting > 0,
        "never saw the daemon starting: loading the probe takes longer than a poll (10 ms)"
    );
    // Serving: the first snapshot is there.
    let tw = request(
        addr.parse().unwrap(),
        "GET /api/timewait HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .expect("GET /api/timewait");
    assert_eq!(tw.status, 200, "{}", tw.body);
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", d.log_now());
}

/// A daemon that fails to load the probe never says it is healthy: while
/// it lives /healthz answers 503, then it exits 1 with one line saying
/// why. (Its BTF file is 255 MiB of zeros: read to the end, then refused,
/// which leaves time to ask.)
#[test]
fn healthz_never_ok_for_a_daemon_that_fails_to_load() {
    require_live!();
    let dir = Scratch::new("healthz");
    let btf = dir.join("zeros.btf");
    std::fs::File::create(&btf)
        .and_then(|f| f.set_len(255 << 20))
        .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut d = Watched::spawn(&["daemon", "--listen", &addr, "--btf", btf.to_str().unwrap()]);
    let deadline = Instant::now() + START_TIMEOUT;
    let mut answers = Vec::new();
    let status = loop {
        if let Some(status) = d.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running: {}", d.log_now());
        std::thread::sleep(Duration::from_millis(10));
        if let Some((code, body)) = healthz(&addr) {
            answers.push(code);
            assert_ne!(code, 200, "a daemon failing to load said ok: {body}");
        }
    };
    let log = d.log_now().to_string();
    eprintln!(
        "failing daemon: /healthz answered {} times while it lived ({} of them 503); {status}: \
         {log}",
        answers.len(),
        answers.iter().filter(|c| **c == 503).count()
    );
    assert_eq!(status.code(), Some(1), "{log}");
    assert_eq!(log.trim_end().lines().count(), 1, "{log}");
    assert!(log.contains("BTF"), "{log}");
    assert!(answers.iter().all(|c| *c == 503), "{answers:?}");
}

/// The sum over every series of `name` (e.g. one per BPF program).
fn sum_of(samples: &[crate::support::daemon::Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

/// The `# HELP` text of `name` in an exposition.
fn help_of<'a>(text: &'a str, name: &str) -> &'a str {
    let prefix = format!("# HELP {name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no HELP for {name} in\n{text}"))
}

/// Resident memory of `pid` as the kernel says in /proc/PID/status.
fn vm_rss_bytes(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kb * 1024.0
}

/// What the daemon costs is served as series: its CPU time and resident
/// memory, and (with --bpf-stats) its BPF programs' runs and run time,
/// which must grow by at least the transitions of the connections the test
/// makes. Without BPF statistics on, the HELP says the program series do
/// not count.
#[test]
fn daemon_serves_its_own_cost() {
    require_live!();
    const N: usize = 200;
    // Each connection is about ten transitions, five at each end.
    const TRANSITIONS_EACH: f64 = 10.0;
    let daemon = Daemon::start(&["--interval", "1", "--bpf-stats"]);
    let pid = daemon.proc.pid();
    let before_text = daemon.get("/metrics").body;
    let before = parse_exposition(&before_text).unwrap();
    let series = |s: &[crate::support::daemon::Sample], name: &str| {
        metric(s, name).unwrap_or_else(|| panic!("no series {name}"))
    };
    assert_eq!(series(&before, "tcpwatch_bpf_stats_enabled"), 1.0);
    assert!(
        help_of(&before_text, "tcpwatch_bpf_program_runs").contains("as they are now"),
        "{before_text}"
    );
    let programs: Vec<&str> = before
        .iter()
        .filter(|s| s.name == "tcpwatch_bpf_program_runs_total")
        .filter_map(|s| s.labels.get("program").map(String::as_str))
        .collect();
    assert!(!programs.is_empty(), "no program series:\n{before_text}");
    let started = Instant::now();

    let (port, server_thread, _l) = low_port_server();
    connect_n(port, N);
    stop_server(port, server_thread);
    // Until the daemon has taken the events in.
    let events_before = series(&before, "tcpwatch_events_total");
    let grew = |s: &Vec<crate::support::daemon::Sample>| {
        series(s, "tcpwatch_events_total") - events_before >= TRANSITIONS_EACH * N as f64
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut after = daemon.metrics();
    while !grew(&after) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        after = daemon.metrics();
    }
    let rss_now = vm_rss_bytes(pid);
    let elapsed = started.elapsed().as_secs_f64();

    let d = |name: &str| sum_of(&after, name) - sum_of(&before, name);
    let lost = d("tcpwatch_lost_events_total");
    let (runs, run_s, cpu_s) = (
        d("tcpwatch_bpf_program_runs_total"),
        d("tcpwatch_bpf_program_run_seconds_total"),
        d("tcpwatch_process_cpu_seconds_total"),
    );
    let rss = series(&after, "tcpwatch_process_resident_memory_bytes");
    eprintln!(
        "{N} connections: programs {programs:?} ran {runs} times for {:.3} ms ({:.0} ns each), \
         events +{}, lost +{lost}; daemon CPU +{:.3} s over {elapsed:.2} s, \
         RSS {:.1} MiB (VmRSS {:.1} MiB)",
        run_s * 1e3,
        run_s * 1e9 / runs.max(1.0),
        d("tcpwatch_events_total"),
        cpu_s,
        rss / 1048576.0,
        rss_now / 1048576.0
    );
    // The programs run once per transition, here and anywhere on the host.
    let want = TRANSITIONS_EACH * N as f64 - lost;
    assert!(
        runs >= want,
        "programs ran {runs} times, expected at least {want}"
    );
    // Each run takes some time, and well under a millisecond.
    assert!(run_s > 0.0, "run time did not grow");
    assert!(run_s / runs < 1e-3, "{run_s} s over {runs} runs");
    // The daemon worked on those events: its CPU time grew, by no more than
    // two cores over the time it had.
    assert!(cpu_s > 0.0, "CPU time did not grow");
    assert!(cpu_s <= 2.0 * elapsed + 0.1, "CPU {cpu_s} s in {elapsed} s");
    // The same memory as the kernel says, give or take what moved between.
    assert!(
        rss > 0.5 * rss_now && rss < 2.0 * rss_now,
        "RSS {rss} vs VmRSS {rss_now}"
    );
    daemon.stop();

    // Without --bpf-stats, what the HELP says agrees with the sysctl.
    let plain = Daemon::start(&["--interval", "1"]);
    let text = plain.get("/metrics").body;
    let samples = parse_exposition(&text).unwrap();
    let on = series(&samples, "tcpwatch_bpf_stats_enabled");
    let help = help_of(&text, "tcpwatch_bpf_program_run_seconds");
    eprintln!("without --bpf-stats: enabled {on}, HELP: {help}");
    if on == 0.0 {
        assert!(
            help.contains("it is 0 now, so this does not grow"),
            "{help}"
        );
    } else {
        assert!(help.contains("as they are now"), "{help}");
    }
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap();
    assert_eq!(on == 1.0, sysctl.trim() != "0", "sysctl {sysctl}");
    plain.stop();
}

/// `/api/conns?since=SEQ` pages forward: following it page by page from a
/// point before the test's connections gives every one of them exactly
/// once, each page the next `limit` after the last.
#[test]
fn conns_since_pages_forward() {
    require_live!();
    const N: usize = 30;
    const LIMIT: usize = 7;
    let daemon = Daemon::start(&["--interval", "1", "--keep", "200000"]);
    let start: ConnsPage = daemon.get_as("/api/conns?limit=1");
    let (port, server_thread, _l) = low_port_server();
    let clients = connect_n(port, N);
    // Until the daemon has finished both ends of each.
    let ends = |p: &ConnsPage| {
        p.conns
            .iter()
            .filter(|r| ours(r) && (r.dport == port || r.sport == port))
            .count()
    };
    daemon.wait_for(
        &format!("/api/conns?since={}&limit=100000", start.next),
        Duration::from_secs(15),
        |p: &ConnsPage| ends(p) >= 2 * N,
    );

    let mut since = start.next;
    let mut pages = 0;
    let mut seen: Vec<ConnRecord> = Vec::new();
    loop {
        let page: ConnsPage = daemon.get_as(&format!("/api/conns?since={since}&limit={LIMIT}"));
        pages += 1;
        assert_eq!(page.missed, 0, "nothing was dropped: {page:?}");
        assert!(page.conns.len() <= LIMIT, "{page:?}");
        if page.remaining > 0 {
            // Not the last page: full, and it moved on by that many.
            assert_eq!(page.conns.len(), LIMIT, "{page:?}");
            assert_eq!(page.next, since + LIMIT as u64, "{page:?}");
        }
        since = page.next;
        seen.extend(page.conns);
        if page.remaining == 0 {
            break;
        }
        assert!(pages < 100_000, "paging does not end");
    }
    let mut client_ports: Vec<u16> = seen
        .iter()
        .filter(|r| ours(r) && r.dport == port)
        .map(|r| r.sport)
        .collect();
    let server_ends = seen.iter().filter(|r| ours(r) && r.sport == port).count();
    eprintln!(
        "{pages} pages of {LIMIT} from {} to {since}: {} records, {} client ends, {server_ends} server ends toward port {port}",
        start.next,
        seen.len(),
        client_ports.len()
    );
    client_ports.sort_unstable();
    let mut want = clients.clone();
    want.sort_unstable();
    assert_eq!(client_ports, want, "client ends, each once");
    assert_eq!(server_ends, N, "server ends, each once");
    // Nothing newer after the last page.
    let after: ConnsPage = daemon.get_as(&format!("/api/conns?since={since}"));
    assert!(after
        .conns
        .iter()
        .all(|r| r.dport != port && r.sport != port));
    stop_server(port, server_thread);
    daemon.stop();
}

/// `--listen localhost:PORT` serves on the loopback address the name
/// resolves to, and says which.
#[test]
fn listen_takes_a_host_name() {
    require_live!();
    let port = free_port();
    let p = spawn_ready(
        "daemon on localhost",
        &["daemon", "--listen", &format!("localhost:{port}")],
        "tracing TCP connections",
    );
    let said = p.stderr_now().join("\n");
    let addr = format!("127.0.0.1:{port}");
    assert!(
        said.contains(&format!("listening on http://{addr}")),
        "{said}"
    );
    let (status, body) = healthz(&addr).expect("answers on 127.0.0.1");
    eprintln!("--listen localhost:{port}: GET http://{addr}/healthz {status} {body}");
    assert_eq!(status, 200, "{body}");
    p.signal(libc::SIGTERM);
    let f = p.finish(STOP_TIMEOUT);
    assert!(f.status.success(), "{}", f.stderr.join("\n"));
}
