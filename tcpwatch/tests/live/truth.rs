//! Live tests of figures that must hold on real hosts (issue 12, items 2,
//! 3, 5, 9 and 10): each one does to the kernel what a user's software
//! does (a burst of connections that then stops, clients on several source
//! addresses, a loop of real `curl` runs, a recording damaged on disk, a
//! `conns --from` client against a daemon that is slow or goes away) and
//! compares what tcpwatch prints with what the test did and with the
//! kernel's own view (`ss`, /proc/net/sockstat).
//!
//! The timewait tests run tcpwatch (and, where the metric is checked, the
//! daemon) inside a network namespace of their own with tcp_tw_reuse=0, so
//! the kernel lists only the test's timewait sockets. Tests that cannot run
//! (not root, no BTF, no eBPF object, no curl) say "skipped: <why>" (fail
//! under CI). Run them one at a time:
//! `TCPWATCH_BPF_OBJECT=<object> cargo test --release -p tcpwatch --test live -- --test-threads=1 truth::`.

use crate::support as common;
use crate::support::daemon::{find_sample, parse_exposition, request, Response, Sample};
use crate::support::netns::Netns;
use crate::support::sockets::{connect_from, listen};
use crate::support::timewait::*;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, START_TIMEOUT, STOP_TIMEOUT};
use serde_json::Value;
use tcpwatch::model::timewait::{Destination, Snapshot};
use tcpwatch::views::summary::{ExitSummary, FollowSummary};

fn ready() -> bool {
    if let Err(why) = common::live() {
        common::skip(&why);
        return false;
    }
    true
}

/// The address the test's clients use: `127.X.0.n` of this run's block.
fn our_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, our_octet(), 0, n)
}

/// Accepts `n` connections on `listener` (on a thread of the caller's),
/// reading each to EOF before closing it: the client closes first and
/// keeps the timewait socket.
fn serve_client_first(listener: TcpListener, n: usize) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut served = 0;
        let mut buf = [0u8; 512];
        while served < n {
            let Ok((mut s, _)) = listener.accept() else {
                break;
            };
            while matches!(s.read(&mut buf), Ok(k) if k > 0) {}
            served += 1;
        }
        served
    })
}

/// `n` connections from `src` (port chosen at connect time) to `dst`, at
/// most `per_s` a second; returns when all are closed by the client.
fn connect_burst(src: Ipv4Addr, dst: SocketAddrV4, n: usize, per_s: f64) {
    let started = Instant::now();
    for i in 0..n {
        while i as f64 > per_s * started.elapsed().as_secs_f64() {
            std::thread::sleep(Duration::from_micros(200));
        }
        let s = connect_from(SocketAddrV4::new(src, 0).into(), dst.into(), true)
            .unwrap_or_else(|e| panic!("connection {i} from {src} to {dst}: {e}"));
        drop(s);
    }
}

/// The destination of a snapshot for the pair (local address, remote).
fn destination<'a>(s: &'a Snap, local: Ipv4Addr, remote: &str) -> Option<&'a Destination> {
    s.destinations
        .iter()
        .find(|d| d.remote == remote && d.local == local.to_string())
}

/// Timewait sockets of this run's addresses, as the namespace's kernel
/// lists them (`ss`): the daemon's own HTTP answers to the test, on
/// 127.0.0.1, are left out.
fn ss_ours(ns: &Netns) -> u64 {
    ns.in_ns(|| ss_count(&["state", "time-wait", "src", &our_net()]))
}

// ---------------------------------------------------------------------------
// The daemon inside a test's namespace

/// `tcpwatch daemon` run inside `ns` on 127.0.0.1:9977 (the namespace's
/// own loopback: nothing else listens there), asked from a thread that
/// entered the namespace.
struct NsDaemon<'a> {
    ns: &'a Netns,
    proc: Proc,
}

const NS_DAEMON: &str = "127.0.0.1:9977";

impl<'a> NsDaemon<'a> {
    fn start(ns: &'a Netns, extra: &[&str]) -> NsDaemon<'a> {
        let mut cmd = ns.command(common::tcpwatch_bin());
        cmd.args(["daemon", "--listen", NS_DAEMON, "--interval", "1"])
            .args(extra);
        let proc = Proc::spawn(&format!("tcpwatch daemon in {}", ns.name), cmd, false);
        proc.wait_stderr(|l| l.contains("listening on http://"), 1, START_TIMEOUT);
        NsDaemon { ns, proc }
    }

    fn get(&self, path: &str) -> Response {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        self.ns
            .in_ns(|| request(NS_DAEMON.parse::<SocketAddr>().unwrap(), &raw))
            .unwrap_or_else(|e| panic!("GET {path} from the daemon in {}: {e}", self.ns.name))
    }

    fn metrics(&self) -> Vec<Sample> {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "{}", r.body);
        parse_exposition(&r.body).unwrap()
    }

    /// `/api/timewait`: the library's own snapshot.
    fn timewait(&self) -> Snapshot {
        let r = self.get("/api/timewait");
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(&r.body).unwrap()
    }

    /// Polls /metrics until `done` accepts it, for up to `timeout`.
    fn wait_metrics(&self, timeout: Duration, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics();
            if done(&m) || Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn stop(self) -> common::Finished {
        self.proc.signal(libc::SIGTERM);
        let f = self.proc.finish(STOP_TIMEOUT);
        assert!(f.status.success(), "{}", f.stderr.join("\n"));
        f
    }
}

/// The samples of `name`.
fn series<'a>(samples: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    samples.iter().filter(|s| s.name == name).collect()
}

/// Whether a sample has label `key` = `value`.
fn labelled(s: &Sample, key: &str, value: &str) -> bool {
    s.labels.get(key).map(String::as_str) == Some(value)
}

/// Events the daemon says it lost (all reasons).
fn daemon_lost(samples: &[Sample]) -> f64 {
    series(samples, "tcpwatch_lost_events_total")
        .iter()
        .map(|s| s.value)
        .sum()
}

/// "S snapshots, E events, L lost events (…)" of a stopped timewait run.
fn lost_in(run: &TimewaitRun) -> u64 {
    run.lost
}

// ---------------------------------------------------------------------------
// Item 2: the forecast follows the current rate

/// 3000 connections in about 0.6 s toward one destination, then nothing:
/// while they are made the ports are forecast to run out; the first
/// snapshot of an interval without new ones says the destination is no
/// longer being used up (rate 0, no forecast) and no finding says ports
/// run out, though the 3000 ports are still held.
#[test]
fn exhaustion_forecast_ends_with_the_traffic() {
    if !ready() {
        return;
    }
    const N: usize = 3000;
    let ns = timewait_netns();
    let tw = Timewait::start(&ns, 1.0, &["--top", "20"]);
    let _ = tw.nth(0);
    let server = server_addr();
    let remote = server.to_string();
    let client = our_ip(2);
    let (started, ended) = ns.in_ns(|| {
        let listener = listen(server.into(), 4096).expect("listen");
        let served = serve_client_first(listener, N);
        let started = common::now_ns();
        connect_burst(client, server, N, 5000.0);
        let ended = common::now_ns();
        assert_eq!(served.join().unwrap(), N);
        (started, ended)
    });
    ns.settle(Duration::from_secs(10));
    let burst_s = (ended - started) as f64 / 1e9;
    // Snapshots until the first whose whole interval came after the burst
    // and that counts no new timewait socket.
    let mut seen = Vec::new();
    let quiet = loop {
        let s = tw.next();
        let quiet = s.created_last_interval == 0
            && s.ts_ns() - (s.interval_s * 1e9) as i128 > ended
            && s.total > 0;
        seen.push(s.clone());
        if quiet {
            break s;
        }
        assert!(
            seen.len() < 10,
            "no quiet snapshot after the burst: {:?}",
            seen.iter()
                .map(|s| s.created_last_interval)
                .collect::<Vec<_>>()
        );
    };
    let kernel = ss_ours(&ns);
    let run = tw.stop();
    let lossless = lost_in(&run) == 0;
    let forecast: Vec<Option<f64>> = seen
        .iter()
        .map(|s| destination(s, client, &remote).and_then(|d| d.exhaustion_s))
        .collect();
    let d = destination(&quiet, client, &remote)
        .unwrap_or_else(|| panic!("no destination {client} -> {remote}: {quiet:?}"));
    let after_s = (quiet.ts_ns() - ended) as f64 / 1e9;
    println!(
        "{N} connections in {burst_s:.2} s; forecasts per snapshot {forecast:?}; the first quiet \
         snapshot, {after_s:.2} s after the burst: held {}, rate {}/s, runs out {:?}, findings {:?}; \
         kernel lists {} timewait sockets",
        d.ports_held, d.rate_per_s, d.exhaustion_s, quiet.findings, kernel
    );
    // The forecast existed while the ports were being used up...
    assert!(
        forecast.iter().any(|f| f.is_some()),
        "no forecast during the burst: {seen:?}"
    );
    // ...and is gone once the traffic stopped, within about one interval
    // (plus the moment events take to arrive).
    assert!(after_s <= 3.5, "quiet snapshot {after_s} s after the burst");
    assert_eq!(d.rate_per_s, 0.0, "{d:?}");
    assert_eq!(d.exhaustion_s, None, "{d:?}");
    assert_eq!(d.steady_state_ports, 0.0, "{d:?}");
    assert!(
        !quiet.findings.iter().any(|f| f.contains("run out")),
        "{:?}",
        quiet.findings
    );
    assert!(
        !quiet
            .findings
            .iter()
            .any(|f| f.contains("opened and closed at")),
        "{:?}",
        quiet.findings
    );
    // The ports are still held, as the kernel says.
    assert_eq!(kernel, N as u64);
    if lossless {
        assert_eq!(d.ports_held, N as u64, "{d:?}");
    } else {
        assert!(d.ports_held <= N as u64, "{d:?}");
    }
}

// ---------------------------------------------------------------------------
// Item 3: ports are held per (local address, destination)

/// Four local addresses, bound explicitly, 1500 connections each to one
/// destination: the kernel gives each address its own port range, so
/// tcpwatch shows four groups of 1500 (JSON, the text view and the daemon's
/// metric), not one of 6000, and exports tcp_tw_reuse.
#[test]
fn ports_held_are_per_local_address() {
    if !ready() {
        return;
    }
    const PER_ADDR: usize = 1500;
    let locals: Vec<Ipv4Addr> = (2..=5).map(our_ip).collect();
    let ns = timewait_netns();
    let tw = Timewait::start(&ns, 1.0, &["--top", "20"]);
    let daemon = NsDaemon::start(&ns, &["--top", "20"]);
    let server = server_addr();
    let remote = server.to_string();
    ns.in_ns(|| {
        let listener = listen(server.into(), 4096).expect("listen");
        let served = serve_client_first(listener, PER_ADDR * locals.len());
        for ip in &locals {
            for i in 0..PER_ADDR {
                // bind(ip, 0): the port comes from ip's own range.
                let s = connect_from(SocketAddrV4::new(*ip, 0).into(), server.into(), false)
                    .unwrap_or_else(|e| panic!("connection {i} from {ip}: {e}"));
                drop(s);
            }
        }
        assert_eq!(served.join().unwrap(), PER_ADDR * locals.len());
    });
    ns.settle(Duration::from_secs(10));
    let total = (PER_ADDR * locals.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = tw.next();
        if s.total == total && s.just_closed == 0 || Instant::now() > deadline {
            break s;
        }
    };
    let metrics = daemon.wait_metrics(Duration::from_secs(20), |m| {
        series(m, "tcpwatch_destination_ports_held")
            .iter()
            .filter(|s| labelled(s, "destination", &remote) && s.value == PER_ADDR as f64)
            .count()
            >= locals.len()
    });
    let daemon_lossless = daemon_lost(&metrics) == 0.0;
    let api = daemon.timewait();
    let kernel = ss_ours(&ns);
    daemon.stop();
    let run = tw.stop();
    let lossless = lost_in(&run) == 0;
    let held: Vec<(String, u64, Option<f64>)> = s
        .destinations
        .iter()
        .map(|d| {
            (
                format!("{} -> {}", d.local, d.remote),
                d.ports_held,
                d.exhaustion_s,
            )
        })
        .collect();
    let metric: Vec<&Sample> = series(&metrics, "tcpwatch_destination_ports_held")
        .into_iter()
        .filter(|s| labelled(s, "destination", &remote))
        .collect();
    let tw_reuse = find_sample(&metrics, "tcpwatch_kernel_tcp_tw_reuse", &[]);
    println!(
        "{} local addresses x {PER_ADDR} connections to {remote}; kernel lists {} timewait \
         sockets; tcpwatch destinations {held:?}; daemon metric {metric:?}; tcp_tw_reuse metric \
         {:?}",
        locals.len(),
        kernel,
        tw_reuse
    );
    assert_eq!(kernel, total);
    assert_eq!(s.total, total, "{s:?}");
    // Four groups, one per local address, none summed over them.
    assert_eq!(s.destinations.len(), locals.len(), "{held:?}");
    for ip in &locals {
        let d = destination(&s, *ip, &remote)
            .unwrap_or_else(|| panic!("no group {ip} -> {remote}: {held:?}"));
        if lossless {
            assert_eq!(d.ports_held, PER_ADDR as u64, "{held:?}");
        } else {
            assert!(d.ports_held <= PER_ADDR as u64, "{held:?}");
        }
        // A forecast, if the connections are still being made, is for
        // this address's own 28232 ports, of which it holds 1500.
        if let (Some(secs), Some(range)) = (d.exhaustion_s, d.port_range) {
            let held = d.ports_held as f64;
            let want = (f64::from(range) - held) / (d.rate_per_s - held / 60.0);
            assert!((secs - want).abs() < 1e-6, "{d:?}");
        }
        // The daemon's API and metric group the same way.
        let a = api
            .destinations
            .iter()
            .find(|a| a.local == ip.to_string() && a.remote == remote)
            .unwrap_or_else(|| panic!("API lacks {ip} -> {remote}: {:?}", api.destinations));
        let m = metric
            .iter()
            .find(|s| labelled(s, "local", &ip.to_string()))
            .unwrap_or_else(|| panic!("metric lacks local={ip}: {metric:?}"));
        if daemon_lossless {
            assert_eq!(a.ports_held, PER_ADDR as u64, "{a:?}");
            assert_eq!(m.value, PER_ADDR as f64, "{m:?}");
        } else {
            assert!(m.value <= PER_ADDR as f64, "{m:?}");
        }
    }
    assert!(
        !s.findings
            .iter()
            .any(|f| f.contains("run out") && f.contains(&format!(" {total} of "))),
        "{:?}",
        s.findings
    );
    assert_eq!(tw_reuse, Some(0.0));
}

// ---------------------------------------------------------------------------
// Item 5: TIME_WAIT by command name

/// A minimal HTTP/1.1 server: answers each request with 2 bytes and keeps
/// the connection until the client closes it (curl closes first, at exit).
fn http_server(listener: TcpListener, n: usize) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut served = 0;
        while served < n {
            let Ok((mut s, _)) = listener.accept() else {
                break;
            };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(k) if k > 0 => req.extend_from_slice(&buf[..k]),
                    _ => break,
                }
            }
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            while matches!(s.read(&mut buf), Ok(k) if k > 0) {}
            served += 1;
        }
        served
    })
}

fn curl_available() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// 150 runs of a real `curl` against a local server: one group `curl` of
/// 150 (not 150 groups of one pid), the finding says curl closed first on
/// 150 of 150, the pids are in the JSON, and the daemon's metric has the
/// command name as its only process label.
#[test]
fn curl_runs_are_one_group_by_command_name() {
    if !ready() {
        return;
    }
    if !curl_available() {
        common::skip("curl is not installed (cargo xtask test installs it)");
        return;
    }
    const RUNS: usize = 150;
    let ns = timewait_netns();
    let tw = Timewait::start(&ns, 1.0, &["--top", "20"]);
    let daemon = NsDaemon::start(&ns, &["--top", "20"]);
    let server = server_addr();
    let listener = ns.in_ns(|| listen(server.into(), 1024).expect("listen"));
    let served = http_server(listener, RUNS);
    let url = format!("http://{server}/");
    let source = our_ip(2).to_string();
    let mut pids = HashSet::new();
    for _ in 0..RUNS {
        let mut cmd = ns.command("curl");
        cmd.args(["-sS", "-o", "/dev/null", "--interface", &source, &url])
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("run curl");
        // `ip netns exec` execs curl in place: this pid is curl's.
        pids.insert(child.id());
        let status = child.wait().unwrap();
        assert!(status.success(), "curl failed: {status}");
    }
    assert_eq!(served.join().unwrap(), RUNS);
    ns.settle(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = tw.next();
        if s.total == RUNS as u64 && s.just_closed == 0 || Instant::now() > deadline {
            break s;
        }
    };
    let metrics = daemon.wait_metrics(Duration::from_secs(20), |m| {
        series(m, "tcpwatch_timewait_by_process")
            .iter()
            .any(|s| labelled(s, "process", "curl") && s.value >= RUNS as f64)
    });
    let api = daemon.timewait();
    let kernel = ss_ours(&ns);
    daemon.stop();
    let run = tw.stop();
    let lossless = lost_in(&run) == 0;
    let rows: Vec<(String, u64)> = s
        .by_process
        .iter()
        .map(|g| (g.key.clone(), g.count))
        .collect();
    let labels: Vec<&Sample> = series(&metrics, "tcpwatch_timewait_by_process");
    println!(
        "{RUNS} curl runs; kernel lists {} timewait sockets; tcpwatch rows {rows:?}; findings {:?}; \
         daemon series {labels:?}",
        kernel, s.findings
    );
    assert_eq!(kernel, RUNS as u64);
    assert_eq!(s.total, RUNS as u64);
    let curl = s
        .by_process
        .iter()
        .find(|g| g.key == "curl")
        .unwrap_or_else(|| panic!("no row curl: {rows:?}"));
    assert_eq!(curl.comm.as_deref(), Some("curl"));
    // The pids stay in the JSON: every one is a curl the test ran.
    assert_eq!(curl.pid, None, "150 processes have no single pid: {curl:?}");
    assert!(!curl.pids.is_empty(), "{curl:?}");
    assert!(curl.pids.iter().all(|p| pids.contains(p)), "{curl:?}");
    if lossless {
        assert_eq!(rows, vec![("curl".to_string(), RUNS as u64)]);
        assert_eq!(curl.processes, Some(RUNS as u64), "{curl:?}");
        let want = format!("curl closed first on {RUNS} of {RUNS} timewait sockets");
        assert!(
            s.findings.iter().any(|f| f.starts_with(&want)),
            "{:?}",
            s.findings
        );
    } else {
        assert!(curl.count <= RUNS as u64, "{rows:?}");
    }
    let api_curl = api
        .by_process
        .iter()
        .find(|g| g.key == "curl")
        .unwrap_or_else(|| panic!("API has no row curl: {:?}", api.by_process));
    assert!(
        !api_curl.pids.is_empty() && api_curl.processes >= Some(1),
        "{api_curl:?}"
    );
    // The process label is the command name: no pid, so no new series per
    // process. (The daemon sees every namespace: others' curl runs add to
    // the count, never a series.)
    for l in &labels {
        let p = &l.labels["process"];
        // The process and its network namespace, nothing else.
        assert_eq!(
            l.labels.keys().map(String::as_str).collect::<Vec<_>>(),
            ["netns", "process"],
            "{l:?}"
        );
        assert!(
            !p.split_whitespace()
                .next()
                .is_some_and(|w| w.bytes().all(|b| b.is_ascii_digit())),
            "pid in a label: {labels:?}"
        );
    }
    let curl_series = labels
        .iter()
        .find(|l| labelled(l, "process", "curl"))
        .unwrap_or_else(|| panic!("no series process=\"curl\": {labels:?}"));
    if daemon_lost(&metrics) == 0.0 {
        assert!(curl_series.value >= RUNS as f64, "{curl_series:?}");
    }
}

// ---------------------------------------------------------------------------
// Item 9: a damaged recording is found out

fn replay(file: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(common::tcpwatch_bin())
        .arg("replay")
        .arg(file)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A recording of real connections, then 16 bytes of 0xff written at byte
/// offset 3000: the replay processes the records before the damage, then
/// says in one line at which offset the damaged record starts, and exits 1
/// (as the README says), instead of replaying wrong figures.
#[test]
fn damaged_recording_names_the_offset_and_fails() {
    if !ready() {
        return;
    }
    const N: u16 = 40;
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("tcpwatch-truth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("whole.rec");
    let mut cmd = ns.command(common::tcpwatch_bin());
    cmd.args(["record", "-o"]).arg(&file);
    let rec = Proc::spawn("tcpwatch record", cmd, false);
    rec.wait_stderr(
        |l| l.contains("tracing TCP events into a recording"),
        1,
        START_TIMEOUT,
    );
    make_timewaits(&ns, SERVER_PORT, N, CLIENT_BASE_PORT);
    ns.settle(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    rec.signal(libc::SIGINT);
    let f = rec.finish(STOP_TIMEOUT);
    assert!(f.status.success(), "{}", f.stderr.join("\n"));

    let whole = std::fs::read(&file).unwrap();
    let good = replay(&file, &["conns", "--format", "json"]);
    assert!(good.status.success(), "{good:?}");
    let good_lines: Vec<&str> = std::str::from_utf8(&good.stdout).unwrap().lines().collect();
    // Both ends of each connection.
    let ours = format!("\"netns\":{},", ns.inode());
    assert!(
        good_lines.iter().filter(|l| l.contains(&ours)).count() >= 2 * N as usize,
        "{good_lines:?}"
    );

    // Where records start: after the header and the snapshot section, each
    // `event size` (+ its checksum) long.
    let u32_at = |i: usize| u32::from_le_bytes(whole[i..i + 4].try_into().unwrap());
    let version = u16::from_le_bytes([whole[8], whole[9]]);
    let header_len = u16::from_le_bytes([whole[10], whole[11]]) as usize;
    let events_start = header_len + u32_at(28) as usize;
    let record = u32_at(12) as usize + if version >= 2 { 4 } else { 0 };
    const AT: usize = 3000;
    assert!(
        events_start < AT && whole.len() > AT + 16 + record,
        "recording too short or snapshot too long: {} bytes, events from {events_start}",
        whole.len()
    );
    let damaged_at = events_start + (AT - events_start) / record * record;
    let mut bytes = whole.clone();
    bytes[AT..AT + 16].fill(0xff);
    let damaged = dir.join("damaged.rec");
    std::fs::write(&damaged, &bytes).unwrap();
    let bad = replay(&damaged, &["conns", "--format", "json"]);
    let stderr = String::from_utf8_lossy(&bad.stderr).into_owned();
    let bad_lines: Vec<&str> = std::str::from_utf8(&bad.stdout).unwrap().lines().collect();
    println!(
        "recording of {} bytes (format {version}, records of {record} bytes from {events_start}); \
         damaged at {AT}: exit {:?}, {} of {} connections before the damage, stderr:\n{stderr}",
        whole.len(),
        bad.status.code(),
        bad_lines.len(),
        good_lines.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(bad.status.code(), Some(1), "{stderr}");
    let naming: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("byte offset"))
        .collect();
    assert_eq!(naming.len(), 1, "{stderr}");
    assert!(
        naming[0].contains(&format!("byte offset {damaged_at}"))
            && naming[0].contains("damaged.rec"),
        "the record at {damaged_at} holds byte {AT}: {stderr}"
    );
    // What came before the damage is what the whole file gives there.
    assert!(bad_lines.len() < good_lines.len(), "{bad_lines:?}");
    for l in &bad_lines {
        assert!(good_lines.contains(l), "not in the undamaged replay: {l}");
    }
}

// ---------------------------------------------------------------------------
// Item 10: conns --from

/// A server on 127.0.0.1 that answers each connection with a few bytes and
/// closes first (as nginx does without keep-alive), for `n` connections.
/// The thread returns the listener: closed while tcpwatch runs, a listener
/// that was listening before it started would show as a connection.
fn server_closing_first(n: usize) -> (u16, std::thread::JoinHandle<(usize, TcpListener)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let mut served = 0;
        let mut buf = [0u8; 64];
        while served < n {
            let Ok((mut s, _)) = l.accept() else { break };
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
            served += 1;
        }
        (served, l)
    });
    (port, t)
}

/// `clients` threads each making `per_client` request/response exchanges
/// with the server at `port`, reading to its close before closing.
fn clients_of_server_first(port: u16, clients: usize, per_client: usize) {
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..per_client {
                    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The exit summary of `conns --from --format json` among its stderr lines
/// (an error line may follow it), and where it is.
fn follow_summary(stderr: &[String]) -> Option<(usize, FollowSummary)> {
    stderr.iter().enumerate().find_map(|(i, l)| {
        match serde_json::from_str::<ExitSummary>(l).ok()? {
            ExitSummary::ConnsFrom(s) => Some((i, s)),
            _ => None,
        }
    })
}

/// `conns --from` for the connections a daemon finishes.
fn conns_from(daemon: &common::daemon::Daemon, port: u16) -> Proc {
    let mut cmd = Command::new(common::tcpwatch_bin());
    cmd.args(["conns", "--format", "json", "--lport", &port.to_string()])
        .args(["--from", &daemon.url()]);
    let proc = Proc::spawn("conns --from", cmd, false);
    proc.wait_stderr(
        |l| l.contains("reading TCP connections from"),
        1,
        START_TIMEOUT,
    );
    proc
}

/// `conns --from` against a daemon, with ten clients of a server that
/// closes first (its sockets are freed at once and their addresses reused
/// by the next connections: the case that came out of order): the
/// connections come in time order, as direct mode prints them; when the
/// daemon goes away the client prints its summary and a clear line, and
/// exits 1. (The daemon holds every namespace's connections: its --keep is
/// large enough for a busy shared host.)
#[test]
fn conns_from_in_time_order_and_when_the_daemon_goes() {
    if !ready() {
        return;
    }
    const CLIENTS: usize = 10;
    const PER_CLIENT: usize = 10;
    const N: usize = CLIENTS * PER_CLIENT;
    let daemon = common::daemon::Daemon::start(&["--interval", "1", "--keep", "50000"]);
    let (port, server) = server_closing_first(N);
    // The server's sockets: the ones that close first.
    let from = conns_from(&daemon, port);
    let direct = {
        let mut cmd = Command::new(common::tcpwatch_bin());
        cmd.args(["conns", "--format", "json", "--lport", &port.to_string()]);
        let proc = Proc::spawn("conns direct", cmd, false);
        proc.wait_stderr(|l| l.contains("tracing TCP connections"), 1, START_TIMEOUT);
        proc
    };
    clients_of_server_first(port, CLIENTS, PER_CLIENT);
    // This namespace's server sockets (other namespaces have their own
    // port spaces).
    let (sport, netns) = (
        format!("\"sport\":{port},"),
        format!("\"netns\":{},", common::own_netns()),
    );
    let ours = |l: &str| l.contains(&sport) && l.contains(&netns);
    from.wait_stdout(ours, N, STOP_TIMEOUT);
    direct.wait_stdout(ours, N, STOP_TIMEOUT);
    let closed_ts = |lines: &[String]| -> Vec<i128> {
        lines
            .iter()
            .filter(|l| ours(l))
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                common::parse_ts(v["ts"].as_str().unwrap())
            })
            .collect()
    };
    direct.signal(libc::SIGINT);
    let d = direct.finish(STOP_TIMEOUT);
    assert!(d.status.success(), "{}", d.stderr.join("\n"));
    let direct_ts = closed_ts(&d.stdout);
    let from_ts = closed_ts(&from.wait_stdout(ours, N, Duration::ZERO));
    let backwards = |ts: &[i128]| ts.windows(2).filter(|w| w[1] < w[0]).count();
    println!(
        "{N} connections closed first by the server: direct mode printed {} ({} earlier than the \
         line before), --from {} ({} earlier than the line before)",
        direct_ts.len(),
        backwards(&direct_ts),
        from_ts.len(),
        backwards(&from_ts)
    );
    assert_eq!((direct_ts.len(), from_ts.len()), (N, N));
    assert_eq!(backwards(&direct_ts), 0, "direct mode out of time order");
    assert_eq!(backwards(&from_ts), 0, "--from out of time order");
    let (served, _listener) = server.join().unwrap();
    assert_eq!(served, N);

    // The daemon goes away: the client says so, prints its summary, and
    // exits 1.
    daemon.stop();
    let f = from.finish(Duration::from_secs(20));
    let stderr = f.stderr.join("\n");
    println!(
        "after the daemon stopped: exit {:?}\n{stderr}",
        f.status.code()
    );
    assert_eq!(f.status.code(), Some(1), "{stderr}");
    let (summary, _) = follow_summary(&f.stderr).unwrap_or_else(|| panic!("no summary: {stderr}"));
    let gone = f
        .stderr
        .iter()
        .position(|l| l.contains("the daemon went away"))
        .unwrap_or_else(|| panic!("no line saying the daemon went away: {stderr}"));
    assert!(summary < gone, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A `conns --from` client held up (SIGSTOP) while many more connections
/// finish than the daemon keeps says, on its next poll, that it fell
/// behind and by how many, and counts them in its summary.
#[test]
fn conns_from_says_when_it_fell_behind() {
    if !ready() {
        return;
    }
    const KEEP: usize = 50;
    const BEHIND: usize = 500;
    let daemon = common::daemon::Daemon::start(&["--interval", "1", "--keep", &KEEP.to_string()]);
    let (port, server) = server_closing_first(BEHIND);
    let from = conns_from(&daemon, port);
    from.signal(libc::SIGSTOP);
    clients_of_server_first(port, 1, BEHIND);
    // The daemon saw this listener start: closing it is no connection.
    let (served, listener) = server.join().unwrap();
    assert_eq!(served, BEHIND);
    drop(listener);
    common::settle(&[port], Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500));
    from.signal(libc::SIGCONT);
    let behind = from.wait_stderr(|l| l.contains("fell behind"), 1, Duration::from_secs(10));
    println!("after SIGCONT: {behind:?}");
    let missed: u64 = behind[0]
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no count in {behind:?}"));
    // Both ends of each connection finish; the daemon kept the last KEEP.
    assert!(missed >= (2 * BEHIND - KEEP) as u64, "{behind:?}");
    from.signal(libc::SIGINT);
    let f = from.finish(STOP_TIMEOUT);
    let stderr = f.stderr.join("\n");
    assert!(f.status.success(), "{stderr}");
    let (_, summary) = follow_summary(&f.stderr).unwrap_or_else(|| panic!("no summary: {stderr}"));
    let counted = summary.missed;
    assert!(counted >= missed, "{summary:?}");
    daemon.stop();
}
