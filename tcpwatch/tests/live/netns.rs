//! Network namespaces and cgroups (issue 12, items 4 and 6), against the
//! kernel of namespaces and cgroups the tests make themselves.
//!
//! - `timewait --netns NS` shows that namespace's figures alone: its
//!   timewait sockets exactly as `ip netns exec NS ss -tan state
//!   time-wait` lists them and as its /proc/net/sockstat counts them, its
//!   own sysctls, processes of that namespace only; tcpwatch's own
//!   namespace (the default) counts none of them.
//! - the daemon labels every TIME_WAIT series with its namespace, each
//!   with that namespace's own count, equal addresses of two namespaces
//!   apart, and bounds the namespaces given a label (`--top`).
//! - the owner's cgroup path, with the container id, unit and pod it
//!   shows, in the JSON of `trace` and `conns`; `--cgroup` keeps only that
//!   cgroup's sockets; the daemon's `container` label and `timewait`'s
//!   grouping by container.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tcpwatch::model::timewait::Snapshot;
use tcpwatch::views::conns::ConnRecord;

use crate::require_live;
use crate::support::daemon::{metric, parse_exposition, Daemon, Sample};
use crate::support::netns::Netns;
use crate::support::timewait::{our_net, server_addr, timewait_netns, Order, TwPeer};
use crate::support::{
    now_ns, own_netns, parse_ts, run_ok, skip, tcpwatch_bin, Proc, START_TIMEOUT, STOP_TIMEOUT,
};

/// Connections the test makes in namespace A and in namespace B.
const IN_A: usize = 612;
const IN_B: usize = 1000;

/// A's own sysctls, unlike the host's and B's.
const A_PORT_RANGE: (u32, u32) = (20000, 29999);
const A_FIN_TIMEOUT: u32 = 17;

/// `tcpwatch ARGS` in tcpwatch's (the test's) own namespace, once it
/// traces.
fn tcpwatch(name: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(tcpwatch_bin());
    cmd.args(args);
    let proc = Proc::spawn(name, cmd, false);
    proc.wait_stderr(|l| l.contains("; Ctrl-C to stop"), 1, START_TIMEOUT);
    proc
}

/// The first snapshot `proc` printed that was taken at least 200 ms after
/// `after_ns` (past the correlator's grace for the last close).
fn snapshot_after(proc: &Proc, after_ns: i128) -> Snapshot {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    loop {
        let lines = proc.wait_stdout(|l| l.starts_with('{'), seen + 1, Duration::from_secs(30));
        for l in &lines[seen..] {
            let s: Snapshot = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            if parse_ts(&s.ts) >= after_ns + 200_000_000 {
                return s;
            }
        }
        seen = lines.len();
        assert!(
            Instant::now() < deadline,
            "{}: no snapshot late enough",
            proc.name
        );
    }
}

/// `ip netns exec NS ss -tanH state time-wait`, line by line.
fn ss_time_wait(ns: &Netns) -> Vec<String> {
    run_ok(ns.command("ss").args(["-tanH", "state", "time-wait"]))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

/// The pids the process groups of a snapshot list.
fn pids_named(s: &Snapshot) -> Vec<u32> {
    s.by_process
        .iter()
        .flat_map(|g| g.pid.into_iter().chain(g.pids.iter().copied()))
        .collect()
}

/// Whether `text` names the number `n` as a whole word.
fn names_number(text: &str, n: u32) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|w| w == n.to_string())
}

/// Three namespaces of the test's own: A with [`IN_A`] timewait sockets
/// (and sysctls of its own), B with [`IN_B`] between the same addresses,
/// C with none; each made by a client process of that namespace.
struct Three {
    a: Netns,
    b: Netns,
    c: Netns,
    /// A process in B, so that B can be named by pid.
    holder: Proc,
}

impl Three {
    fn new() -> Three {
        // Made for exact counts: no reuse of a TIME_WAIT 4-tuple, and no
        // stray RST ending a timewait socket early (RFC 1337).
        let (a, b, c) = (timewait_netns(), timewait_netns(), timewait_netns());
        a.sysctl(
            "net.ipv4.ip_local_port_range",
            &format!("{} {}", A_PORT_RANGE.0, A_PORT_RANGE.1),
        );
        a.sysctl("net.ipv4.tcp_fin_timeout", &A_FIN_TIMEOUT.to_string());
        let mut sleeper = b.command("sleep");
        sleeper.arg("600");
        let holder = Proc::spawn("a process in B", sleeper, false);
        // `ip netns exec` enters B, then execs sleep: until then the pid is
        // still in the test's namespace.
        let in_b = format!("/proc/{}/ns/net", holder.pid());
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::metadata(&in_b).map(|m| m.ino() as u32).ok() != Some(b.inode()) {
            assert!(Instant::now() < deadline, "the holder never entered B");
            std::thread::sleep(Duration::from_millis(10));
        }
        Three { a, b, c, holder }
    }

    /// Runs the servers and clients; the client pids of A and B.
    fn make_timewaits(&self) -> (u32, u32) {
        let sa = TwPeer::server(&self.a, IN_A, Order::ClientFirst);
        let sb = TwPeer::server(&self.b, IN_B, Order::ClientFirst);
        let ca = TwPeer::client(&self.a, IN_A, Order::ClientFirst);
        let cb = TwPeer::client(&self.b, IN_B, Order::ClientFirst);
        let pids = (ca.pid(), cb.pid());
        for p in [ca, cb, sa, sb] {
            p.finish();
        }
        for ns in [&self.a, &self.b] {
            ns.settle(Duration::from_secs(15));
        }
        pids
    }
}

/// `timewait --netns A` (by name), `--netns pid:P` (a process in B) and
/// `--netns INODE` (C) each headline exactly what that namespace's kernel
/// lists and counts, with its sysctls and its processes only; the default,
/// tcpwatch's own namespace, counts none of the test's sockets.
#[test]
fn timewait_shows_one_namespace() {
    require_live!();
    let t = Three::new();
    let by_pid = format!("pid:{}", t.holder.pid());
    let c_inode = t.c.inode().to_string();
    let watch = |name: &str, extra: &[&str]| {
        let mut args = vec!["timewait", "--format", "json", "--interval", "1"];
        args.extend_from_slice(extra);
        tcpwatch(name, &args)
    };
    let wa = watch("timewait --netns A", &["--netns", &t.a.name]);
    let wb = watch("timewait --netns pid:B", &["--netns", &by_pid]);
    let wc = watch("timewait --netns C", &["--netns", &c_inode]);
    // The test's addresses only: tcpwatch's own namespace has other
    // programs' sockets, but none of these.
    let own = watch("timewait (own namespace)", &["--laddr", &our_net()]);

    let (pid_a, pid_b) = t.make_timewaits();
    let settled = now_ns();
    let cases = [
        (&wa, &t.a, IN_A, Some(pid_a), pid_b),
        (&wb, &t.b, IN_B, Some(pid_b), pid_a),
        (&wc, &t.c, 0, None, 0),
    ];
    let mut shown = Vec::new();
    for (w, ns, n, mine, theirs) in cases {
        let s = snapshot_after(w, settled);
        let ss = ss_time_wait(ns);
        let k = ns.kernel_now();
        println!(
            "{}: tcpwatch total {} (TIME_WAIT {}), sock_diag {:?}, sockstat {:?}; \
             ip netns exec ss lists {}, sockstat {}/{}; port range {:?}, fin_timeout {:?}; \
             processes {:?}",
            ns.name,
            s.total,
            s.time_wait,
            s.kernel_listed,
            s.kernel.sockstat_tw,
            ss.len(),
            k.sockstat_before,
            k.sockstat_after,
            s.kernel.port_range,
            s.kernel.fin_timeout_s,
            s.by_process
                .iter()
                .map(|g| (&g.key, g.count))
                .collect::<Vec<_>>()
        );
        assert_eq!(s.netns, Some(ns.inode()), "{}", ns.name);
        assert_eq!(s.netns_name.as_deref(), Some(ns.name.as_str()));
        assert_eq!(
            ss.len(),
            n,
            "{}: ss disagrees with what the test did",
            ns.name
        );
        assert_eq!((s.total, s.time_wait), (n as u64, n as u64), "{}", ns.name);
        assert_eq!(s.kernel_listed, Some(n as u64), "{}", ns.name);
        assert_eq!(s.kernel.sockstat_tw, Some(k.sockstat_before), "{}", ns.name);
        assert_eq!(k.sockstat_before, n as u64, "{}", ns.name);
        assert_eq!(s.other_netns, 0);
        // Its processes only: never the other namespace's client.
        let pids = pids_named(&s);
        assert!(!pids.contains(&theirs), "{}: {pids:?}", ns.name);
        if let Some(p) = mine {
            assert!(pids.iter().all(|x| *x == p), "{}: {pids:?}", ns.name);
            assert!(
                !s.findings.iter().any(|f| names_number(f, theirs)),
                "{}: {:?}",
                ns.name,
                s.findings
            );
        }
        shown.push(s);
    }
    // Its own sysctls: A's differ from B's.
    let range = A_PORT_RANGE.1 - A_PORT_RANGE.0 + 1;
    assert_eq!(shown[0].kernel.port_range, Some(range));
    assert_eq!(shown[0].kernel.fin_timeout_s, Some(A_FIN_TIMEOUT));
    assert_ne!(shown[1].kernel.port_range, Some(range));
    assert_ne!(shown[1].kernel.fin_timeout_s, Some(A_FIN_TIMEOUT));

    let s = snapshot_after(&own, settled);
    println!(
        "own namespace, test addresses only: total {}, other_netns {}",
        s.total, s.other_netns
    );
    assert_eq!(s.netns, Some(own_netns()));
    assert_eq!((s.total, s.other_netns), (0, 0), "{s:?}");

    for w in [wa, wb, wc, own] {
        w.signal(libc::SIGINT);
        let f = w.finish(STOP_TIMEOUT);
        assert!(f.status.success(), "{}", f.stderr.join("\n"));
    }
}

/// A namespace that does not exist, or `all` for `timewait`: one line,
/// non-zero exit.
#[test]
fn bad_netns_is_one_line() {
    require_live!();
    for (args, code, says) in [
        (
            &["timewait", "--netns", "tcpwatch-no-such-ns"][..],
            1,
            "no network namespace named tcpwatch-no-such-ns",
        ),
        (
            &["trace", "--netns", "pid:999999999"],
            1,
            "no process 999999999",
        ),
        (&["timewait", "--netns", "all"], 2, "give one namespace"),
        (&["conns", "--netns", "1"], 1, "network namespace 1"),
    ] {
        let out = Command::new(tcpwatch_bin())
            .args(args)
            .args(["--duration", "1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// The value of the series with exactly these labels.
fn series(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    metric(samples, &format!("{name}{{{}}}", labels.join(",")))
}

/// `/metrics` as text (for what the series names say) and parsed.
fn metrics(daemon: &Daemon) -> (String, Vec<Sample>) {
    let text = daemon.get("/metrics").body;
    let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("/metrics: {e}"));
    (text, samples)
}

/// How long after the last close a snapshot is sure to count every socket
/// as correlated: the grace period, and up to a second that a record waits
/// behind a held FIN_WAIT2 hand-off (records leave in close order).
const SETTLED_NS: i128 = 1_500_000_000;

/// The daemon labels each namespace's series with its name, each with
/// that namespace's own kernel count; equal addresses of A and B stay
/// apart; with `--top 2` the third namespace is summed as `other`; without
/// `--netns` it reports every namespace it sees.
#[test]
fn daemon_labels_series_by_namespace() {
    require_live!();
    let t = Three::new();
    let by_pid = format!("pid:{}", t.holder.pid());
    let c_inode = t.c.inode().to_string();
    let chosen = Daemon::start(&[
        "--interval",
        "1",
        "--top",
        "2",
        "--netns",
        &t.a.name,
        "--netns",
        &by_pid,
        "--netns",
        &c_inode,
    ]);
    let every = Daemon::start(&["--interval", "1", "--top", "1000"]);
    let (pid_a, pid_b) = t.make_timewaits();
    let settled = now_ns();
    let b_inode = t.b.inode();

    // Once a snapshot after the last close is served, late enough that
    // every record is out of the correlator: a record can wait up to a
    // second behind a held FIN_WAIT2 hand-off that closed before it.
    let late = |v: &Value| {
        v.as_array().is_some_and(|all| {
            all.iter()
                .all(|s| parse_ts(s["ts"].as_str().unwrap_or("")) >= settled + SETTLED_NS)
        })
    };
    let all: Value = chosen.wait_for("/api/timewait?netns=all", Duration::from_secs(20), late);
    let snaps: Vec<Snapshot> = serde_json::from_value(all).unwrap();
    let by_inode: HashMap<Option<u32>, &Snapshot> = snaps.iter().map(|s| (s.netns, s)).collect();
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    for (ns, n) in [(&t.a, IN_A), (&t.b, IN_B), (&t.c, 0)] {
        let s = by_inode[&Some(ns.inode())];
        assert_eq!((s.total, s.kernel_listed), (n as u64, Some(n as u64)));
    }
    let one: Snapshot = chosen.get_as(&format!("/api/timewait?netns={}", t.b.name));
    assert_eq!((one.netns, one.total), (Some(b_inode), IN_B as u64));
    assert_eq!(
        chosen.get("/api/timewait?netns=tcpwatch-no-such-ns").status,
        404
    );

    let (text, samples) = metrics(&chosen);
    let dest = server_addr().to_string();
    let (ka, kb, kc) = (t.a.kernel_now(), t.b.kernel_now(), t.c.kernel_now());
    let mut lines: Vec<&str> = text.lines().filter(|l| l.contains("netns=")).collect();
    lines.sort();
    println!("--netns A,B,C --top 2:\n{}", lines.join("\n"));
    println!(
        "kernel: A sockstat {} ss {}, B sockstat {} ss {}, C sockstat {}",
        ka.sockstat_before,
        ka.ss_time_wait,
        kb.sockstat_before,
        kb.ss_time_wait,
        kc.sockstat_before
    );
    for (ns, k, n) in [(&t.a, &ka, IN_A), (&t.b, &kb, IN_B)] {
        let l = ns.name.as_str();
        assert_eq!(k.ss_time_wait, n as u64);
        assert_eq!(
            series(
                &samples,
                "tcpwatch_kernel_timewait_sockets",
                &[("netns", l)]
            ),
            Some(k.sockstat_before as f64),
            "{l}"
        );
        assert_eq!(
            series(
                &samples,
                "tcpwatch_timewait_sockets",
                &[("netns", l), ("substate", "time_wait")]
            ),
            Some(k.ss_time_wait as f64),
            "{l}"
        );
        // The same destination in both namespaces: two series, never one.
        assert_eq!(
            series(
                &samples,
                "tcpwatch_timewait_by_destination",
                &[("netns", l), ("destination", &dest)]
            ),
            Some(n as f64),
            "{l}"
        );
    }
    let range = f64::from(A_PORT_RANGE.1 - A_PORT_RANGE.0 + 1);
    assert_eq!(
        series(
            &samples,
            "tcpwatch_local_port_range_ports",
            &[("netns", &t.a.name)]
        ),
        Some(range)
    );
    // C, third by count, is summed as other (with its zero).
    assert_eq!(
        series(
            &samples,
            "tcpwatch_kernel_timewait_sockets",
            &[("netns", "other")]
        ),
        Some(kc.sockstat_before as f64)
    );
    assert!(
        !text.contains(&format!("netns=\"{}\"", t.c.name)),
        "C has its own label"
    );
    // Processes of each namespace under its label only: each client's
    // command with that namespace's count (summed across namespaces it
    // would be IN_A + IN_B; a socket whose last events were still on their
    // way is in a group of its own), and no pid in any label.
    for (ns, n) in [(&t.a, IN_A), (&t.b, IN_B)] {
        let v = series(
            &samples,
            "tcpwatch_timewait_by_process",
            &[("netns", &ns.name), ("process", "tw-client")],
        )
        .unwrap_or(0.0);
        assert!(
            v <= n as f64 && v >= 0.99 * n as f64,
            "{}: tw-client {v} of {n}",
            ns.name
        );
    }
    for pid in [pid_a, pid_b] {
        assert!(
            !samples
                .iter()
                .filter(|x| x.name == "tcpwatch_timewait_by_process")
                .any(|x| x.labels.values().any(|v| names_number(v, pid))),
            "a label names pid {pid}"
        );
    }

    // Without --netns: every namespace seen, A and B among them, once its
    // own snapshot after the last close is served (its snapshots run on a
    // clock of their own, not the other daemon's).
    let _: Value = every.wait_for("/api/timewait?netns=all", Duration::from_secs(20), late);
    let (_, samples) = metrics(&every);
    for (ns, k) in [(&t.a, &ka), (&t.b, &kb)] {
        assert_eq!(
            series(
                &samples,
                "tcpwatch_kernel_timewait_sockets",
                &[("netns", &ns.name)]
            ),
            Some(k.sockstat_before as f64),
            "every namespace: {}",
            ns.name
        );
    }
    let own = own_netns().to_string();
    assert!(
        series(
            &samples,
            "tcpwatch_kernel_timewait_sockets",
            &[("netns", &own)]
        )
        .is_some(),
        "the daemon's own namespace has no series"
    );
    chosen.stop();
    every.stop();
}

// ---------------------------------------------------------------------------
// cgroups

/// The cgroup2 mount point (from mountinfo).
fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// A cgroup of the test's own, shaped as Docker names a container's
/// (`/tcpwatch-test-PID/docker-<64 hex>.scope`); removed when dropped.
struct TestCgroup {
    top: PathBuf,
    dir: PathBuf,
    /// Its path in the hierarchy.
    path: String,
    id: String,
}

impl TestCgroup {
    fn new(mount: &Path) -> TestCgroup {
        let pid = std::process::id();
        let id: String = (0..64)
            .map(|i| {
                char::from(b"0123456789abcdef"[((pid as usize).wrapping_mul(31) + i * 7) % 16])
            })
            .collect();
        let top = mount.join(format!("tcpwatch-test-{pid}"));
        let dir = top.join(format!("docker-{id}.scope"));
        let _ = fs::remove_dir(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let path = format!("/tcpwatch-test-{pid}/docker-{id}.scope");
        TestCgroup { top, dir, path, id }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its processes have exited; the kernel frees the cgroup a moment
        // later.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_dir(&self.top);
    }
}

/// `n` connections to the server peer from bash in `ns`, closing first;
/// in `cgroup` when given (joined before entering the namespace, whose
/// `ip netns exec` hides the cgroup mount). Returns bash's pid.
fn bash_client(ns: &Netns, n: usize, cgroup: Option<&Path>) -> u32 {
    let addr = server_addr();
    let join = cgroup.map_or(String::new(), |d| {
        format!("echo $$ > {}/cgroup.procs && ", d.display())
    });
    let inner = format!(
        "for i in $(seq {n}); do exec 3<>/dev/tcp/{}/{}; exec 3>&-; done; echo $$",
        addr.ip(),
        addr.port()
    );
    let out = Command::new("bash")
        .args([
            "-c",
            &format!("{join}exec ip netns exec {} bash -c '{inner}'", ns.name),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A client in a cgroup shaped as a Docker container's, another outside
/// it: `trace` and `conns` JSON give the cgroup path and container id,
/// `--cgroup` keeps the first's sockets only, the daemon's
/// `timewait_by_container` and `timewait`'s grouping count its timewait
/// sockets under the container id.
#[test]
fn cgroup_path_container_and_filter() {
    require_live!();
    let Some(mount) = cgroup2_mount() else {
        skip("no cgroup2 hierarchy mounted");
        return;
    };
    const IN_CG: usize = 5;
    const OUTSIDE: usize = 3;
    let cg = TestCgroup::new(&mount);
    let ns = timewait_netns();
    let server = TwPeer::server(&ns, IN_CG + OUTSIDE, Order::ClientFirst);
    let conns = tcpwatch(
        "conns --cgroup",
        &[
            "conns",
            "--format",
            "json",
            "--netns",
            &ns.name,
            "--cgroup",
            &format!("/tcpwatch-test-{}", std::process::id()),
        ],
    );
    // The same filter given as a path under the mount.
    let conns_mount = tcpwatch(
        "conns --cgroup (mount path)",
        &[
            "conns",
            "--format",
            "json",
            "--netns",
            &ns.name,
            "--cgroup",
            cg.dir.to_str().unwrap(),
        ],
    );
    let trace = tcpwatch("trace", &["trace", "--format", "json", "--netns", &ns.name]);
    let tw = tcpwatch(
        "timewait",
        &[
            "timewait",
            "--format",
            "json",
            "--interval",
            "1",
            "--netns",
            &ns.name,
        ],
    );
    let daemon = Daemon::start(&["--interval", "1", "--netns", &ns.name]);

    let inside = bash_client(&ns, IN_CG, Some(&cg.dir));
    let outside = bash_client(&ns, OUTSIDE, None);
    server.finish();
    ns.settle(Duration::from_secs(15));
    let settled = now_ns();
    let snap = snapshot_after(&tw, settled);
    let _: Snapshot = daemon.wait_for("/api/timewait", Duration::from_secs(20), |s: &Snapshot| {
        parse_ts(&s.ts) >= settled + SETTLED_NS
    });
    let (_, samples) = metrics(&daemon);

    let stop = |p: Proc| {
        p.signal(libc::SIGINT);
        let f = p.finish(STOP_TIMEOUT);
        assert!(f.status.success(), "{}", f.stderr.join("\n"));
        f.stdout
    };
    let records = |lines: Vec<String>| -> Vec<ConnRecord> {
        lines
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    std::thread::sleep(Duration::from_secs(1));
    let filtered = records(stop(conns));
    let filtered_mount = records(stop(conns_mount));
    let lines = stop(trace);
    let _ = stop(tw);
    daemon.stop();

    println!(
        "cgroup {}: conns --cgroup shows {} records (pids {:?}), first {:?}",
        cg.path,
        filtered.len(),
        filtered.iter().map(|r| r.pid).collect::<Vec<_>>(),
        filtered.first().map(|r| &r.cgroup)
    );
    assert_eq!(filtered.len(), IN_CG, "{filtered:?}");
    let key = |r: &ConnRecord| (r.skaddr.clone(), r.sport, r.pid, r.cgroup.clone());
    assert_eq!(
        filtered_mount.iter().map(key).collect::<Vec<_>>(),
        filtered.iter().map(key).collect::<Vec<_>>()
    );
    for r in &filtered {
        assert_eq!(r.pid, Some(inside), "{r:?}");
        let c = r
            .cgroup
            .as_ref()
            .unwrap_or_else(|| panic!("no cgroup: {r:?}"));
        assert_eq!(c.path.as_deref(), Some(cg.path.as_str()));
        assert_eq!(c.container.as_deref(), Some(cg.id.as_str()));
        assert_eq!(
            c.unit.as_deref(),
            Some(format!("docker-{}.scope", cg.id).as_str())
        );
        assert_eq!(c.pod, None);
    }
    // trace: both clients' connects, each with its own cgroup.
    let connects: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["old"] == "CLOSE" && v["new"] == "SYN_SENT")
        .collect();
    let of = |pid: u32| {
        connects
            .iter()
            .filter(|v| v["pid"] == pid)
            .collect::<Vec<_>>()
    };
    assert_eq!(of(inside).len(), IN_CG, "{connects:?}");
    assert_eq!(of(outside).len(), OUTSIDE, "{connects:?}");
    for v in of(inside) {
        assert_eq!(v["cgroup"]["path"], cg.path.as_str(), "{v}");
        assert_eq!(v["cgroup"]["container"], cg.id.as_str(), "{v}");
    }
    for v in of(outside) {
        assert_ne!(v["cgroup"]["path"], cg.path.as_str(), "{v}");
        assert!(v["cgroup"]["container"].is_null(), "{v}");
    }
    // The client closed first: its timewait sockets, by container.
    let count = |key: &str| {
        snap.by_container
            .iter()
            .find(|g| g.key == key)
            .map(|g| g.count)
    };
    println!(
        "timewait by container: {:?}",
        snap.by_container
            .iter()
            .map(|g| (&g.key, g.count))
            .collect::<Vec<_>>()
    );
    assert_eq!(count(&cg.id), Some(IN_CG as u64), "{:?}", snap.by_container);
    assert_eq!(
        count("(none)"),
        Some(OUTSIDE as u64),
        "{:?}",
        snap.by_container
    );
    let label = series(
        &samples,
        "tcpwatch_timewait_by_container",
        &[("netns", &ns.name), ("container", &cg.id)],
    );
    println!(
        "tcpwatch_timewait_by_container{{container={}}} = {label:?}",
        cg.id
    );
    assert_eq!(label, Some(IN_CG as f64));
    assert_eq!(
        series(
            &samples,
            "tcpwatch_timewait_by_container",
            &[("netns", &ns.name), ("container", "(none)")]
        ),
        Some(OUTSIDE as f64)
    );
}
