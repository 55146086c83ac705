//! A real Prometheus server (Debian's `prometheus`) scraping `tcpwatch
//! daemon` every second: after connections the test makes, the series must
//! arrive in Prometheus with the right values, and the alert rules from
//! deploy/prometheus must evaluate on them without error.
//!
//! Both run on 127.0.0.1 on free ports; Prometheus keeps its data in a
//! scratch directory. Other tests may churn connections on this host at the
//! same time, so the test's own destination (a listener on a port of its
//! own) and its own client process are checked exactly, and host-wide
//! counters only as lower bounds.
//!
//! `prometheus_harness_scrapes_a_fixed_exposition` checks the harness alone
//! (no root): Prometheus scraping a fixed text served by the test.
//!
//! Root, kernel BTF and the eBPF object are needed for the live test: it is
//! skipped with a message without them, and fails under CI.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use crate::require_live;
use crate::support::daemon::*;
use crate::support::deploy::{dashboard_queries, deploy_file, read_deploy, DASHBOARD};
use crate::support::peer::{repeat, Peer};
use crate::support::{own_netns, settle, tool};

/// Connections the test makes (each leaves one TIME_WAIT socket).
const N: u64 = 100;
/// Connects refused by a port bound but not listening.
const REFUSED: u64 = 5;
const ARRIVAL: Duration = Duration::from_secs(30);

fn prometheus_bin() -> Option<PathBuf> {
    tool("prometheus")
}

/// Serves `body` as the answer to every request, until the test ends.
fn fixed_exporter(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn prometheus_harness_scrapes_a_fixed_exposition() {
    let Some(prometheus) = prometheus_bin() else {
        return;
    };
    const BODY: &str = "# TYPE fake_total counter\nfake_total{kind=\"a b\",x=\"1\"} 42\n\
                        # TYPE fake_gauge gauge\nfake_gauge 7.5\n";
    let samples = parse_exposition(BODY).unwrap();
    assert_eq!(
        find_sample(&samples, "fake_total", &[("kind", "a b")]),
        Some(42.0)
    );
    assert_eq!(find_sample(&samples, "fake_gauge", &[]), Some(7.5));
    assert_eq!(find_sample(&samples, "fake_total", &[("kind", "c")]), None);
    assert!(parse_exposition("fake_total{kind=\"a\" 1\n").is_err());
    assert_eq!(url_encode("a{b=\"c d\"}"), "a%7Bb%3D%22c%20d%22%7D");

    let target = fixed_exporter(BODY);
    let p = Prometheus::start(&prometheus, &target.to_string(), &[]);
    let v = p.wait_scalar("fake_total{kind=\"a b\"}", ARRIVAL, |v| v == 42.0);
    assert_eq!(v, Some(42.0), "the fixed series never arrived");
    assert_eq!(p.scalar("fake_gauge * 2"), Some(15.0));
    assert_eq!(p.scalar(&format!("up{{instance=\"{target}\"}}")), Some(1.0));
    assert_eq!(p.scalar("fake_total{kind=\"nothing\"}"), None);
    p.stop();
}

/// `name{labels}` for PromQL.
fn selector(name: &str, labels: &[(&str, &str)]) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// A counter's value now, 0 when it has no series yet.
fn counter(p: &Prometheus, name: &str, labels: &[(&str, &str)]) -> f64 {
    p.scalar(&selector(name, labels)).unwrap_or(0.0)
}

fn read_sysctl(name: &str) -> Vec<u64> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// What [`known_traffic`] did.
struct Traffic {
    target: SocketAddr,
    client_comm: String,
    /// Where the refused connects went.
    refused: SocketAddr,
}

/// N connections from a client process of a name of its own to a server of this
/// test's own; the client closes first and keeps a TIME_WAIT socket each.
/// Before them, REFUSED connects to a port of the server's bound but not
/// listening.
fn known_traffic() -> Traffic {
    let mut server = Peer::spawn("twpromserver", None);
    let port: u16 = server.run1("listen 127.0.0.1:0").parse().unwrap();
    let bound = server.run1("bind 127.0.0.1:0");
    let served = server.send(&repeat("accept; eof; close", N as usize));
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut client = Peer::spawn("twpromclient", None);
    // First, so that their series are out before the rest is done.
    let refused: SocketAddr = format!("127.0.0.1:{bound}").parse().unwrap();
    for v in client.run(&repeat(
        &format!("connect_fail {refused}"),
        REFUSED as usize,
    )) {
        let errno = v.split_once(' ').map(|(e, _)| e.to_string());
        assert_eq!(errno, Some(libc::ECONNREFUSED.to_string()), "connect: {v}");
    }
    let made = client.run(&repeat(
        &format!("connect {target}; write 32; close"),
        N as usize,
    ));
    assert_eq!(made.len(), N as usize, "connections made");
    server.wait(served);
    server.run("close_listener");

    let client_comm = client.comm.clone();
    client.finish();
    server.finish();
    settle(&[port], Duration::from_secs(10));
    Traffic {
        target,
        client_comm,
        refused,
    }
}

/// connect() to a loopback port nothing holds: refused.
fn refused_connect() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} was not closed"
    );
}

/// A series: metric name and labels.
type Series = (&'static str, &'static [(&'static str, &'static str)]);

/// The counters checked as lower bounds, with how much each must grow by.
const COUNTERS: &[(Series, u64)] = &[
    (
        (
            "tcpwatch_connections_opened_total",
            &[("direction", "active")],
        ),
        N,
    ),
    (
        (
            "tcpwatch_connections_opened_total",
            &[("direction", "passive")],
        ),
        N,
    ),
    // Both ends of each connection close in order.
    (
        ("tcpwatch_connections_closed_total", &[("kind", "orderly")]),
        2 * N,
    ),
    (("tcpwatch_timewait_created_total", &[]), N),
    (
        (
            "tcpwatch_transitions_total",
            &[("from", "SYN_SENT"), ("to", "ESTABLISHED")],
        ),
        N,
    ),
    (
        (
            "tcpwatch_transitions_total",
            &[("from", "FIN_WAIT1"), ("to", "FIN_WAIT2")],
        ),
        N,
    ),
    (
        (
            "tcpwatch_handshake_seconds_count",
            &[("direction", "active")],
        ),
        N,
    ),
    (
        (
            "tcpwatch_handshake_seconds_count",
            &[("direction", "passive")],
        ),
        N,
    ),
    (
        (
            "tcpwatch_connection_lifetime_seconds_count",
            &[("direction", "active")],
        ),
        N,
    ),
    // About ten transitions each.
    (("tcpwatch_events_total", &[]), 8 * N),
];

#[test]
fn prometheus_sees_what_the_daemon_saw() {
    require_live!();
    let Some(prometheus) = prometheus_bin() else {
        return;
    };
    let daemon = Daemon::start(&["--interval", "1", "--top", "50"]);
    let p = Prometheus::start(
        &prometheus,
        &daemon.addr.to_string(),
        &[deploy_file("prometheus/tcpwatch-alerts.yml")],
    );
    let up = p.wait_scalar("up{job=\"tcpwatch\"}", ARRIVAL, |v| v == 1.0);
    assert_eq!(up, Some(1.0), "Prometheus could not scrape the daemon");
    // Counters as Prometheus has them before the connections.
    let before: Vec<f64> = COUNTERS
        .iter()
        .map(|((name, labels), _)| counter(&p, name, labels))
        .collect();
    let lost_before = p.scalar("sum(tcpwatch_lost_events_total)").unwrap_or(0.0);

    let Traffic {
        target,
        client_comm,
        refused,
    } = known_traffic();
    let destination = target.to_string();
    // The process label is the command name alone (no pid: no new series
    // per process).
    let process = client_comm.clone();
    // The TIME_WAIT series are per network namespace; the test's are in
    // the daemon's own (not in /run/netns: labelled by its inode).
    let ns = own_netns().to_string();
    // From the kernel's own list of timewait sockets (sock_diag): exact.
    for q in [
        selector(
            "tcpwatch_timewait_by_destination",
            &[("netns", &ns), ("destination", &destination)],
        ),
        selector(
            "tcpwatch_destination_ports_held",
            &[("netns", &ns), ("destination", &destination)],
        ),
    ] {
        let v = p.wait_scalar(&q, ARRIVAL, |v| v == N as f64);
        println!("{q} = {v:?}");
        assert_eq!(v, Some(N as f64), "{q}");
    }
    // The owner comes from the traced events: exact unless the daemon lost
    // some (other BPF programs on a shared host can make the kernel skip it).
    let q = selector(
        "tcpwatch_timewait_by_process",
        &[("netns", &ns), ("process", &process)],
    );
    let v = p.wait_scalar(&q, ARRIVAL, |v| v == N as f64);
    let lost = p.scalar("sum(tcpwatch_lost_events_total)").unwrap_or(0.0) - lost_before;
    println!("{q} = {v:?} ({lost} events lost meanwhile)");
    if lost == 0.0 {
        assert_eq!(v, Some(N as f64), "{q}");
    } else {
        assert!(v.unwrap_or(0.0) <= N as f64, "{q} = {v:?}");
    }

    // The refused connects, by reason and destination: the destination is
    // new, so it has a series of its own (within --top).
    let q = selector(
        "tcpwatch_failed_connects_total",
        &[("reason", "refused"), ("destination", &refused.to_string())],
    );
    let v = p.wait_scalar(&q, ARRIVAL, |v| v == REFUSED as f64);
    println!("{q} = {v:?}");
    if lost == 0.0 {
        assert_eq!(v, Some(REFUSED as f64), "{q}");
    } else {
        assert!(v.unwrap_or(0.0) <= REFUSED as f64, "{q} = {v:?}");
    }

    // Host-wide counters grew by at least what the test did (less what the
    // daemon says it lost meanwhile).
    for (((name, labels), at_least), was) in COUNTERS.iter().zip(&before) {
        let q = selector(name, labels);
        let want = *at_least as f64 - lost;
        let v = p.wait_scalar(&q, ARRIVAL, |v| v - was >= want);
        let grew = v.unwrap_or(0.0) - was;
        println!("{q}: +{grew} (at least {want})");
        assert!(grew >= want, "{q} grew by {grew}, expected at least {want}");
    }

    // Gauges read from the kernel: the same figures as /proc.
    let range = read_sysctl("ip_local_port_range");
    let gauges = [
        (
            "tcpwatch_local_port_range_ports",
            (range[1] - range[0] + 1) as f64,
        ),
        (
            "tcpwatch_kernel_tw_max_buckets",
            read_sysctl("tcp_max_tw_buckets")[0] as f64,
        ),
        ("tcpwatch_build_info", 1.0),
    ];
    for (name, want) in gauges {
        let q = if name == "tcpwatch_build_info" {
            name.to_string()
        } else {
            selector(name, &[("netns", &ns)])
        };
        assert_eq!(p.scalar(&q), Some(want), "{q}");
    }
    let kernel_tw = p
        .scalar(&selector(
            "tcpwatch_kernel_timewait_sockets",
            &[("netns", &ns)],
        ))
        .unwrap();
    assert!(kernel_tw >= N as f64, "kernel timewait sockets {kernel_tw}");
    let tw = p
        .scalar(&selector(
            "tcpwatch_timewait_sockets",
            &[("netns", &ns), ("substate", "time_wait")],
        ))
        .unwrap();
    assert!(tw >= N as f64, "timewait sockets {tw}");
    for reason in ["ring_full", "kernel_skipped"] {
        let q = selector("tcpwatch_lost_events_total", &[("reason", reason)]);
        assert!(p.scalar(&q).is_some(), "{q} missing");
    }
    for name in ["tcpwatch_tracked_sockets", "tcpwatch_evictions_total"] {
        assert!(p.scalar(name).is_some(), "{name} missing");
    }
    println!(
        "kernel timewait {kernel_tw}, tcpwatch timewait {tw}, lost during the test {lost}, \
         tracked {:?}",
        p.scalar("tcpwatch_tracked_sockets")
    );

    // Every metric the shipped alerts use is one the daemon exports, and
    // every rule evaluates on the real series without error.
    let exported: BTreeSet<String> = daemon.metrics().into_iter().map(|s| s.name).collect();
    let alerts = read_deploy("prometheus/tcpwatch-alerts.yml");
    for word in alerts.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("tcpwatch_") && !word.ends_with('_') {
            assert!(
                exported.contains(word),
                "alert uses {word}, which the daemon does not export"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let rules = p.api("rules");
    let mut evaluated = 0;
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(
                rule["health"], "ok",
                "rule {}: {}",
                rule["name"], rule["lastError"]
            );
            evaluated += 1;
        }
    }
    assert_eq!(evaluated, 6, "rules loaded: {rules}");
    let firing = p.query("ALERTS{alertstate=\"firing\",alertname=\"TcpwatchDown\"}");
    assert!(firing.is_empty(), "{firing:?}");

    p.stop();
    daemon.stop();
}

/// Every query of the Grafana dashboard in deploy/grafana, with its
/// variables set to this daemon and a one-minute rate window, returns data
/// from a real Prometheus after known traffic; the TIME_WAIT panels show
/// the test's own destination with the figures the test made.
#[test]
fn grafana_dashboard_queries_return_data() {
    require_live!();
    let Some(prometheus) = prometheus_bin() else {
        return;
    };
    // BPF statistics on, so the cost panels have run times to show; the
    // churn window a minute and its rate low, so that the known traffic's
    // N connections in a moment are still pool churn when the panels are
    // queried, tens of seconds later.
    let daemon = Daemon::start(&[
        "--interval",
        "1",
        "--top",
        "50",
        "--bpf-stats",
        "--churn-window",
        "60",
        "--churn-rate",
        "0.5",
    ]);
    let p = Prometheus::start(&prometheus, &daemon.addr.to_string(), &[]);
    let up = p.wait_scalar("up{job=\"tcpwatch\"}", ARRIVAL, |v| v == 1.0);
    assert_eq!(up, Some(1.0), "Prometheus could not scrape the daemon");
    let Traffic {
        target,
        refused,
        client_comm,
    } = known_traffic();
    let destination = target.to_string();
    // The refused connects made resets for no socket (NO_SOCKET) before
    // the traffic; one more after it, so the resets panel's series has
    // grown between scrapes (a counter's first sample has no rate).
    refused_connect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&read_deploy(DASHBOARD)).expect("dashboard JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let instance = daemon.addr.to_string();
    // A failed connect's series appears once the daemon has finished it,
    // the TIME_WAIT and churn series at its next snapshot: wait until
    // every series the queries name is there (or the time is up).
    let named: BTreeSet<&str> = queries
        .iter()
        .flat_map(|q| {
            q.expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        })
        .filter(|w| w.starts_with("tcpwatch_"))
        .collect();
    let deadline = std::time::Instant::now() + ARRIVAL;
    let exported: BTreeSet<String> = loop {
        let names: BTreeSet<String> = daemon.metrics().into_iter().map(|s| s.name).collect();
        if named.iter().all(|n| names.contains(*n)) || std::time::Instant::now() > deadline {
            break names;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut results = Vec::new();
    for q in &queries {
        // Every series named is one the daemon exports (histograms by their
        // _bucket series).
        for word in q
            .expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        {
            if word.starts_with("tcpwatch_") {
                assert!(
                    exported.contains(word),
                    "{}: {word} is not exported",
                    q.panel
                );
            }
        }
        let expr = q
            .expr
            .replace("$instance", &instance)
            .replace("$__rate_interval", "1m");
        let deadline = std::time::Instant::now() + ARRIVAL;
        let got = loop {
            let r = p.query(&expr);
            if r.iter().any(|s| s.value.is_finite()) || std::time::Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let shown: Vec<String> = got
            .iter()
            .take(3)
            .map(|s| format!("{:?}={:.6}", s.labels.values().collect::<Vec<_>>(), s.value))
            .collect();
        println!(
            "{} [{}]: {} series {}",
            q.panel,
            q.ref_id,
            got.len(),
            shown.join(" ")
        );
        assert!(
            got.iter().any(|s| s.value.is_finite()),
            "{} [{}] returned no data: {expr}\n{got:?}",
            q.panel,
            q.ref_id
        );
        results.push((q, expr, got));
    }

    // The resets panel shows the ones the test caused, by their reason.
    let (_, expr, _) = results
        .iter()
        .find(|(q, _, _)| q.panel == "Resets, by direction and reason")
        .expect("no resets panel");
    let deadline = std::time::Instant::now() + ARRIVAL;
    let no_socket = loop {
        let got = p.query(expr);
        let rate = got
            .iter()
            .find(|s| {
                s.labels.get("direction").map(String::as_str) == Some("sent")
                    && s.labels.get("reason").map(String::as_str) == Some("NO_SOCKET")
            })
            .map(|s| s.value);
        if rate.is_some_and(|v| v > 0.0) || std::time::Instant::now() > deadline {
            break rate;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("Resets, by direction and reason: sent NO_SOCKET = {no_socket:?}/s");
    assert!(
        no_socket.is_some_and(|v| v > 0.0),
        "no NO_SOCKET resets sent: {no_socket:?}"
    );

    // The panels that name destinations show the test's own (once the
    // daemon's next snapshot has been scraped).
    let range = read_sysctl("ip_local_port_range");
    let ports = (range[1] - range[0] + 1) as f64;
    let refused = refused.to_string();
    for (title, destination, want) in [
        ("TIME_WAIT by destination", &destination, N as f64),
        (
            "Ports running out, by destination",
            &destination,
            N as f64 / ports,
        ),
        ("Failed connects, by destination", &refused, REFUSED as f64),
    ] {
        let (_, expr, _) = results
            .iter()
            .find(|(q, _, _)| q.panel == title)
            .unwrap_or_else(|| panic!("no panel {title}"));
        let deadline = std::time::Instant::now() + ARRIVAL;
        let matches = |v: f64| (v - want).abs() < 1e-9;
        let (ours, got) = loop {
            let got = p.query(expr);
            let ours = got
                .iter()
                .find(|s| s.labels.get("destination") == Some(destination))
                .map(|s| s.value);
            if ours.is_some_and(matches) || std::time::Instant::now() > deadline {
                break (ours, got);
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        println!("{title}: {destination} = {ours:?}, expected {want}");
        match ours {
            Some(v) => assert!(matches(v), "{title}: {v}, expected {want}"),
            // Those are top 10: the test's destination is left out only if
            // ten others (of other tests on this host) hold at least as many.
            None => assert!(
                got.len() == 10 && got.iter().all(|s| s.value >= want),
                "{title}: {destination} missing from {got:?}"
            ),
        }
    }
    // The churn panel names the test's client and destination, at a rate
    // of its N connections over at most the window.
    let (_, expr, _) = results
        .iter()
        .find(|(q, _, _)| q.panel == "Connection churn that should be a pool")
        .expect("no churn panel");
    let got = p.query(expr);
    let ours = got.iter().find(|s| {
        s.labels.get("destination") == Some(&destination)
            && s.labels.get("process") == Some(&client_comm)
    });
    println!("churn: {client_comm} -> {destination} = {ours:?}");
    let rate = ours
        .unwrap_or_else(|| panic!("churn: no {client_comm} -> {destination} in {got:?}"))
        .value;
    assert!(
        rate >= N as f64 / 60.0 && rate <= N as f64,
        "churn: {rate}/s for {N} connections in a 60 s window"
    );
    p.stop();
    daemon.stop();
}
