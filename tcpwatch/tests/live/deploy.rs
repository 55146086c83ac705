//! Checks of the deployment files in `deploy/`, each by the tool that owns
//! its format, and each with a broken copy that the same check must reject
//! (so a check that cannot fail would fail here):
//!
//! - the systemd unit: `systemd-analyze verify` and `security --offline`;
//! - the Kubernetes manifests: `kubernetes-validate --strict` (PyPI, in the
//!   virtualenv `cargo xtask test` makes under target/test-tools), plus what
//!   a schema cannot say (the same capabilities as the unit, probes on the
//!   port the daemon listens on, ...);
//! - the Prometheus config and alerts: `promtool check config`, `check
//!   rules`, and `test rules` with series that must and must not fire;
//! - the daemon's arguments in both: `tcpwatch daemon` accepts them;
//! - the Grafana dashboard: type-checked by `tsc` against Grafana's own
//!   published dashboard types (npm's @grafana/schema, under target/test-tools),
//!   plus a layout that fits the grid and one query or more in every panel
//!   (prometheus.rs runs every query against a real Prometheus).
//!
//! As root, two more run the daemon the way the unit does: as uid 65534 with
//! exactly the unit's ambient capabilities (loads, serves, attributes
//! connections; and each capability dropped in turn breaks what it is for),
//! and under strace, checking the unit's SystemCallFilter allows every
//! system call it made.
//!
//! A missing tool fails under CI (`cargo xtask test` installs them all) and
//! is skipped with a message otherwise.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tcpwatch::daemon::client::ConnsPage;
use tcpwatch::daemon::Health;

use crate::require_live;
use crate::support::daemon::{find_sample, Daemon};
use crate::support::deploy::*;
use crate::support::{free_port, skip, tcpwatch_bin, tool, Scratch, STOP_TIMEOUT};

const UNIT: &str = "systemd/tcpwatch.service";
const MANIFEST: &str = "kubernetes/daemonset.yaml";

/// `text` with `from` replaced by `to`, which must occur in it: a mutation
/// that silently changed nothing would make a negative check meaningless.
fn mutate(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "mutation target {from:?} not found");
    text.replacen(from, to, 1)
}

// ---------------------------------------------------------------------------
// systemd

/// The values of `key=` in the unit (each line one value; later lines add).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
        .collect()
}

fn unit_words(unit: &str, key: &str) -> BTreeSet<String> {
    unit_values(unit, key)
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// The capabilities the unit grants, as `CAP_…` names.
fn unit_capabilities(unit: &str) -> BTreeSet<String> {
    unit_words(unit, "AmbientCapabilities")
}

/// `systemd-analyze verify` of `unit` with the daemon binary at `binary`
/// (verify requires every ExecStart program to exist): `Err(output)` unless
/// it exits 0 and says nothing.
fn systemd_verify(analyze: &Path, unit: &str, binary: &Path) -> Result<(), String> {
    let dir = Scratch::new("unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/tcpwatch "));
    let text = unit.replace("/usr/local/bin/tcpwatch", &binary.display().to_string());
    let path = dir.write("tcpwatch.service", &text);
    let r = output_of(Command::new(analyze).arg("verify").arg(&path));
    if r.ok && r.output.trim().is_empty() {
        Ok(())
    } else {
        Err(r.output)
    }
}

#[test]
fn systemd_unit_passes_systemd_analyze() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let unit = read_deploy(UNIT);
    let bin = Path::new(tcpwatch_bin());
    if let Err(out) = systemd_verify(&analyze, &unit, bin) {
        panic!("systemd-analyze verify {UNIT}:\n{out}");
    }
    // A misspelt setting is only a warning to systemd, and an error here.
    for (from, to) in [
        ("NoNewPrivileges=", "NoNewPrivilege="),
        ("Restart=on-failure", "Restart=on-failures"),
        ("[Service]", "[Servise]"),
    ] {
        let broken = mutate(&unit, from, to);
        assert!(
            systemd_verify(&analyze, &broken, bin).is_err(),
            "systemd-analyze verify accepted the unit with {from:?} -> {to:?}"
        );
    }

    // The sandboxing, as systemd rates it (0 = locked down, 10 = none).
    let dir = Scratch::new("unit-security");
    let path = dir.write("tcpwatch.service", &unit);
    let r = output_of(
        Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path),
    );
    let verdict = r
        .output
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level:\n{}", r.output));
    println!("{verdict}");
    let level: f64 = verdict
        .split(": ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unreadable: {verdict}"));
    assert!(level <= 3.0, "the unit's sandboxing got weaker: {verdict}");
}

#[test]
fn unit_grants_only_what_the_daemon_needs() {
    let unit = read_deploy(UNIT);
    let expected: BTreeSet<String> = [
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_DAC_READ_SEARCH",
        "CAP_SYS_PTRACE",
    ]
    .map(String::from)
    .into();
    // Adding a capability must come with a reason (and a change here).
    assert_eq!(unit_capabilities(&unit), expected, "AmbientCapabilities");
    assert_eq!(
        unit_words(&unit, "CapabilityBoundingSet"),
        expected,
        "CapabilityBoundingSet must equal AmbientCapabilities"
    );
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("Restart", "on-failure"),
        ("LimitMEMLOCK", "infinity"),
        ("ProtectSystem", "strict"),
    ] {
        assert_eq!(unit_values(&unit, key), [value], "{key}=");
    }
    // Settings that would break the daemon (see the comments in the unit).
    for key in [
        "PrivateNetwork",
        "PrivateUsers",
        "ProtectProc",
        "ProcSubset",
        "User",
    ] {
        assert!(unit_values(&unit, key).is_empty(), "{key}= breaks tcpwatch");
    }
    let exec = unit_values(&unit, "ExecStart");
    assert_eq!(exec.len(), 1);
    assert!(
        exec[0].starts_with("/usr/local/bin/tcpwatch daemon --listen ${TCPWATCH_LISTEN}"),
        "{exec:?}"
    );
    assert_eq!(
        unit_values(&unit, "Environment")[0],
        "TCPWATCH_LISTEN=127.0.0.1:9977",
        "the default listen address is loopback only"
    );
}

// ---------------------------------------------------------------------------
// Kubernetes

fn kubernetes_validate() -> Option<PathBuf> {
    let bin = kubernetes_validate_venv().join("bin/kubernetes-validate");
    if bin.is_file() {
        Some(bin)
    } else {
        skip(&format!(
            "{} is missing (`cargo xtask setup --test-tools` or `cargo xtask test` installs \
             kubernetes-validate from PyPI there)",
            bin.display()
        ));
        None
    }
}

/// `kubernetes-validate --strict` on a copy of `manifest`. A warning counts
/// as a failure: a resource of an unknown kind or apiVersion is only warned
/// about (and not checked at all).
fn validate_manifest(validator: &Path, manifest: &str) -> Ran {
    let dir = Scratch::new("manifest");
    let path = dir.write("daemonset.yaml", manifest);
    let mut r = output_of(Command::new(validator).arg("--strict").arg(&path));
    r.ok &= !r.output.lines().any(|l| l.starts_with("WARN"));
    r
}

/// The documents of a YAML file, as JSON (through the validator's PyYAML).
fn yaml_documents(yaml: &str) -> Vec<Value> {
    let python = kubernetes_validate_venv().join("bin/python");
    let dir = Scratch::new("yaml");
    let path = dir.write("in.yaml", yaml);
    let r = output_of(Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(&path));
    assert!(r.ok, "PyYAML: {}", r.output);
    serde_json::from_str::<Vec<Value>>(&r.output)
        .unwrap_or_else(|e| panic!("{e}: {}", r.output))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

#[test]
fn kubernetes_manifests_match_the_schema() {
    let Some(validator) = kubernetes_validate() else {
        return;
    };
    let manifest = read_deploy(MANIFEST);
    let r = validate_manifest(&validator, &manifest);
    assert!(r.ok, "kubernetes-validate {MANIFEST}:\n{}", r.output);
    for kind in ["namespace", "serviceaccount", "service", "daemonset"] {
        assert!(
            r.output
                .contains(&format!("passed for resource {kind}/tcpwatch")),
            "{kind} not validated:\n{}",
            r.output
        );
    }
    for (from, to) in [
        // wrong type
        ("hostNetwork: true", "hostNetwork: \"yes\""),
        // unknown field (a typo)
        ("readOnlyRootFilesystem: true", "readOnlyRootFs: true"),
        // required field missing
        (
            "      containers:\n        - name: tcpwatch\n",
            "      containers:\n        - nam: tcpwatch\n",
        ),
        // not an apps/v1 kind: only a warning from the validator
        ("kind: DaemonSet", "kind: DaemonSett"),
        ("apiVersion: apps/v1", "apiVersion: apps/v1beta9"),
    ] {
        let r = validate_manifest(&validator, &mutate(&manifest, from, to));
        assert!(
            !r.ok,
            "kubernetes-validate accepted {from:?} -> {to:?}:\n{}",
            r.output
        );
    }
}

#[test]
fn daemonset_runs_the_daemon_like_the_unit() {
    if kubernetes_validate().is_none() {
        return;
    }
    let docs = yaml_documents(&read_deploy(MANIFEST));
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["hostNetwork"], true);
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let added: BTreeSet<String> = sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().unwrap()))
        .collect();
    assert_eq!(
        added,
        unit_capabilities(&read_deploy(UNIT)),
        "the DaemonSet and the systemd unit grant different capabilities"
    );

    // Listens on the node IP, on the port the probes, annotations and
    // Service use.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "daemon");
    assert!(args.contains(&"--listen=$(NODE_IP):9977"), "{args:?}");
    let env = &c["env"][0];
    assert_eq!(env["name"], "NODE_IP");
    assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");
    let port = &c["ports"][0];
    assert_eq!(port["containerPort"], 9977);
    assert_eq!(
        port["hostPort"], 9977,
        "hostNetwork: hostPort = containerPort"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], port["name"], "{probe}");
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9977");
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(service["spec"]["ports"][0]["port"], 9977);
    assert!(c["resources"]["limits"]["memory"].is_string());

    // tracefs and BTF from the host, read-only.
    let mounts: Vec<(&str, bool)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap(), m["readOnly"] == true))
        .collect();
    for path in ["/sys/kernel/tracing", "/sys/kernel/btf"] {
        assert!(
            mounts.contains(&(path, true)),
            "{path} not mounted read-only: {mounts:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Prometheus

/// deploy/prometheus copied to a scratch directory, with `file` mutated.
fn prometheus_copy(file: &str, from: &str, to: &str) -> Scratch {
    let dir = Scratch::new("prometheus-deploy");
    for entry in fs::read_dir(deploy_file("prometheus")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let mut text = fs::read_to_string(entry.path()).unwrap();
        if name == file {
            text = mutate(&text, from, to);
        }
        dir.write(&name, &text);
    }
    dir
}

fn promtool(promtool: &Path, dir: &Path, args: &[&str]) -> Ran {
    output_of(Command::new(promtool).current_dir(dir).args(args))
}

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    let Some(bin) = tool("promtool") else {
        return;
    };
    let dir = deploy_file("prometheus");
    // check config also loads the rule files it names.
    for (args, success) in [
        (
            &["check", "config", "prometheus.yml"],
            "SUCCESS: 1 rule files found",
        ),
        (
            &["check", "rules", "tcpwatch-alerts.yml"],
            "SUCCESS: 6 rules found",
        ),
    ] {
        let r = promtool(&bin, &dir, args);
        assert!(
            r.ok && r.output.contains(success),
            "promtool {args:?}:\n{}",
            r.output
        );
    }

    for (file, from, to, args) in [
        (
            "prometheus.yml",
            "scrape_timeout: 10s",
            "scrape_timeout: 20s",
            &["check", "config", "prometheus.yml"][..],
        ),
        (
            "prometheus.yml",
            "type: A",
            "type: AAAAA",
            &["check", "config", "prometheus.yml"],
        ),
        (
            "tcpwatch-alerts.yml",
            "/ tcpwatch_kernel_tw_max_buckets > 0.8",
            "/ tcpwatch_kernel_tw_max_buckets >> 0.8",
            &["check", "rules", "tcpwatch-alerts.yml"],
        ),
        (
            "tcpwatch-alerts.yml",
            "{{ $labels.instance }} is down",
            "{{ $labels.instance }} is down {{",
            &["check", "rules", "tcpwatch-alerts.yml"],
        ),
    ] {
        let broken = prometheus_copy(file, from, to);
        let r = promtool(&bin, &broken.path, args);
        assert!(
            !r.ok,
            "promtool {args:?} accepted {from:?} -> {to:?}:\n{}",
            r.output
        );
    }
}

#[test]
fn alert_rules_fire_only_when_they_should() {
    let Some(bin) = tool("promtool") else {
        return;
    };
    let test = ["test", "rules", "tcpwatch-alerts.test.yml"];
    let r = promtool(&bin, &deploy_file("prometheus"), &test);
    assert!(r.ok, "promtool test rules:\n{}", r.output);
    // Rules that would fire too late, too soon, for the wrong series or
    // never: each must fail a test case.
    for (from, to) in [
        (
            "tcpwatch_kernel_tw_max_buckets > 0.8",
            "tcpwatch_kernel_tw_max_buckets > 0.95",
        ),
        (
            "tcpwatch_kernel_tw_max_buckets > 0.8\n        for: 5m",
            "tcpwatch_kernel_tw_max_buckets > 0.8\n        for: 1m",
        ),
        (
            "tcpwatch_destination_ports_held{destination!=\"other\", local!=\"other\"}",
            "tcpwatch_destination_ports_held",
        ),
        ("> 0.5", "> 0.8"),
        // Ports summed over the local addresses instead of per address.
        (
            "tcpwatch_destination_ports_held{destination!=\"other\", local!=\"other\"}\n",
            "sum without (local) (tcpwatch_destination_ports_held{destination!=\"other\", local!=\"other\"})\n",
        ),
        // tcp_tw_reuse ignored (1, then 2 for loopback), or taken without
        // the timestamps it needs.
        (
            "tcpwatch_kernel_tcp_tw_reuse == 1 and",
            "tcpwatch_kernel_tcp_tw_reuse == 9 and",
        ),
        (
            "tcpwatch_kernel_tcp_tw_reuse == 2 and",
            "tcpwatch_kernel_tcp_tw_reuse == 9 and",
        ),
        ("destination=~\"127\\\\..*|", "destination=~\"127\\\\.9\\\\..*|"),
        (
            "(tcpwatch_kernel_tcp_tw_reuse == 1 and on (job, instance, netns) tcpwatch_kernel_tcp_timestamps != 0)",
            "(tcpwatch_kernel_tcp_tw_reuse == 1)",
        ),
        // Another namespace's port range or tcp_tw_reuse applied.
        (
            "/ on (job, instance, netns) group_left",
            "/ on (job, instance) group_left max without (netns)",
        ),
        (
            "unless on (job, instance, netns)\n            (tcpwatch_kernel_tcp_tw_reuse == 1",
            "unless on (job, instance)\n            (tcpwatch_kernel_tcp_tw_reuse == 1",
        ),
        ("sum by (job, instance, reason)", "sum by (job, instance)"),
        (
            "up{job=~\"tcpwatch|tcpwatch-kubernetes\"} == 0\n        for: 5m",
            "up{job=~\"tcpwatch|tcpwatch-kubernetes\"} == 0\n        for: 1m",
        ),
        (
            "increase(tcpwatch_evictions_total[10m]) > 0",
            "increase(tcpwatch_evictions_total[10m]) > 100",
        ),
        (
            "increase(tcpwatch_kernel_timewait_overflows_total[5m]) > 0",
            "rate(tcpwatch_kernel_timewait_overflows_total[5m]) > 1",
        ),
    ] {
        let broken = prometheus_copy("tcpwatch-alerts.yml", from, to);
        let r = promtool(&bin, &broken.path, &test);
        assert!(
            !r.ok,
            "promtool test rules passed with {from:?} -> {to:?}:\n{}",
            r.output
        );
    }
}

// ---------------------------------------------------------------------------
// The daemon's arguments

/// Runs `tcpwatch <args> --btf <missing>`: arguments the daemon accepts get
/// as far as the BTF check (or the root check) and exit 1; ones it refuses
/// exit 2 with clap's message.
fn accepts(args: &[String]) -> Result<(), String> {
    let out = Command::new(Path::new(tcpwatch_bin()))
        .args(args)
        .args(["--btf", "/nonexistent/tcpwatch-deploy-check"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        Some(1) => Ok(()),
        _ => Err(format!("{args:?}: {} {stderr}", out.status)),
    }
}

#[test]
fn daemon_accepts_the_deployed_arguments() {
    // systemd: ExecStart with the unit's default environment.
    let unit = read_deploy(UNIT);
    let exec = unit_values(&unit, "ExecStart").remove(0);
    let listen = format!("127.0.0.1:{}", free_port());
    let unit_args: Vec<String> = exec
        .replace("${TCPWATCH_LISTEN}", &listen)
        .replace("$TCPWATCH_ARGS", "--top 20 --interval 10")
        .split_whitespace()
        .skip(1)
        .map(String::from)
        .collect();
    accepts(&unit_args).unwrap();
    // Kubernetes: command + args with the downward-API variable set.
    let docs = yaml_documents_or_skip();
    if let Some(docs) = docs {
        let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
        let c = &ds["spec"]["template"]["spec"]["containers"][0];
        let k8s_args: Vec<String> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().replace("$(NODE_IP)", "127.0.0.1"))
            .map(|a| a.replace(":9977", &format!(":{}", free_port())))
            .collect();
        accepts(&k8s_args).unwrap();
    }
    // And the check can fail.
    let mut bad = unit_args.clone();
    bad.push("--no-such-option".into());
    assert!(accepts(&bad).is_err());
}

fn yaml_documents_or_skip() -> Option<Vec<Value>> {
    kubernetes_validate()?;
    Some(yaml_documents(&read_deploy(MANIFEST)))
}

// ---------------------------------------------------------------------------
// Live: the unit's capabilities and system call filter

/// setpriv arguments running a program as `uid` with exactly `caps`
/// (`CAP_…` names) as its inheritable, ambient and bounding sets, and
/// no_new_privs, as systemd does for the unit.
fn setpriv(setpriv: &Path, uid: u32, caps: &BTreeSet<String>) -> Vec<String> {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let set = format!("-all{list}");
    let mut words = vec![
        setpriv.display().to_string(),
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        format!("--inh-caps={set}"),
        format!("--bounding-set={set}"),
        "--no-new-privs".into(),
    ];
    if uid != 0 {
        words.push(format!("--ambient-caps={set}"));
    }
    words
}

/// What one run under a capability set showed.
#[derive(Debug)]
struct CapRun {
    /// The connection to the listener made after start: whether its client
    /// side's record arrived, and its owner pid.
    client: Option<Option<u32>>,
    /// The same for the server side of a connection opened before the
    /// daemon started (a listener is not a connection: it has no record).
    older: Option<Option<u32>>,
    /// Timewait sockets toward the listener, per /metrics.
    timewait: Option<f64>,
    /// Events the daemon lost, or records it dropped before the test read
    /// them, while the test ran: other tests on a busy host can cause both.
    disturbed: bool,
}

impl CapRun {
    fn complete(&self) -> bool {
        self.client.is_some() && self.older.is_some() && self.timewait.is_some()
    }
}

/// Lost events so far, per /healthz.
fn lost_events(daemon: &Daemon) -> u64 {
    let h: Health = daemon.get_as("/healthz");
    h.lost_ring_full + h.lost_kernel_skipped
}

/// Starts the daemon under `wrapper`; with a listener of this process and a
/// connection to it opened before it, one more connection (the client
/// closes first, leaving a TIME_WAIT socket), then the older connection
/// reset and the listener closed. `Err(output)` if the daemon did not
/// start.
fn run_with_caps_once(name: &str, wrapper: &[String], bin: &Path) -> Result<CapRun, String> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let older_client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let older_port = older_client.local_addr().unwrap().port();
    let (older_server, _) = listener.accept().unwrap();
    // Left unread, so closing the server side sends a RST: no transition of
    // it runs in its owner's context, and only /proc can name the owner.
    (&older_client).write_all(b"unread").unwrap();
    // Other tests may churn connections meanwhile (thousands a second): a
    // large --keep keeps this run's records until the test reads them, a
    // large --top gives its one timewait socket a series of its own.
    let extra = ["--interval", "1", "--top", "1000", "--keep", "100000"];
    let daemon = Daemon::try_start(name, wrapper, bin, &extra)?;
    assert!(
        find_sample(&daemon.metrics(), "tcpwatch_build_info", &[]) == Some(1.0),
        "{name}: no tcpwatch_build_info"
    );
    let lost_before = lost_events(&daemon);
    let page = |since: u64| -> ConnsPage {
        daemon.get_as(&format!("/api/conns?limit=10000&since={since}"))
    };
    let mut since = page(0).next;

    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let client_port = client.local_addr().unwrap().port();
    let (mut server, _) = listener.accept().unwrap();
    drop(client);
    std::io::copy(&mut server, &mut std::io::sink()).unwrap();
    drop(server);
    drop(older_server);
    drop(older_client);
    drop(listener);

    let destination = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut run = CapRun {
        client: None,
        older: None,
        timewait: None,
        disturbed: false,
    };
    // Read every record as it arrives: other tests' connections may push
    // ours out of the daemon's buffer (--keep) soon after.
    while !run.complete() && Instant::now() < deadline {
        let p = page(since);
        since = p.next;
        run.disturbed |= p.missed != 0;
        // By the client's own port: the older connection's client side
        // goes to the same listener port, and closes later (its record
        // comes after this one's, records being in close order).
        for c in &p.conns {
            if c.sport == client_port && c.dport == port && c.role.as_deref() == Some("client") {
                run.client = Some(c.pid);
            } else if c.sport == port && c.dport == older_port {
                run.older = Some(c.pid);
            }
        }
        run.timewait = find_sample(
            &daemon.metrics(),
            "tcpwatch_timewait_by_destination",
            &[("destination", &destination)],
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    run.disturbed |= lost_events(&daemon) > lost_before;
    daemon.stop();
    // The test process owns both ends.
    let me = std::process::id();
    for pid in [run.client, run.older].into_iter().flatten().flatten() {
        assert_eq!(pid, me, "{name}: attributed to another process");
    }
    Ok(run)
}

/// [`run_with_caps_once`], again (up to three runs in all) while a run
/// missed something and other tests disturbed it (a record or an event that
/// is absent then says nothing about capabilities).
fn run_with_caps(name: &str, wrapper: &[String], bin: &Path) -> Result<CapRun, String> {
    let mut attempt = 1;
    loop {
        let run = run_with_caps_once(name, wrapper, bin)?;
        if run.complete() || !run.disturbed || attempt == 3 {
            return Ok(run);
        }
        println!("{name}: run {attempt} incomplete and disturbed ({run:?}); again");
        attempt += 1;
    }
}

#[test]
fn unit_capabilities_are_enough_and_each_is_needed() {
    require_live!();
    let Some(setpriv_bin) = tool("setpriv") else {
        return;
    };
    let caps = unit_capabilities(&read_deploy(UNIT));
    let dir = Scratch::new("caps");
    // Where any user may run it, as /usr/local/bin would be.
    let bin = dir.public_binary();
    const NOBODY: u32 = 65534;

    // Exactly the unit's set, as an unprivileged user.
    let full = run_with_caps("unit caps", &setpriv(&setpriv_bin, NOBODY, &caps), &bin)
        .unwrap_or_else(|out| panic!("the daemon did not start with {caps:?}:\n{out}"));
    assert!(
        matches!(full.client, Some(Some(_))),
        "client connection not attributed: {full:?}"
    );
    assert!(
        matches!(full.older, Some(Some(_))),
        "connection opened before the start not attributed (/proc/PID/fd unreadable?): {full:?}"
    );
    assert_eq!(full.timewait, Some(1.0), "TIME_WAIT socket not counted");
    println!(
        "uid {NOBODY} with {caps:?}: starts, serves, attributes both sockets, counts timewait"
    );

    // The Kubernetes container: uid 0 with only these capabilities.
    let k8s = run_with_caps("uid 0, unit caps", &setpriv(&setpriv_bin, 0, &caps), &bin)
        .unwrap_or_else(|out| panic!("the daemon did not start as uid 0 with {caps:?}:\n{out}"));
    assert!(
        matches!((k8s.client, k8s.older), (Some(Some(_)), Some(Some(_)))),
        "{k8s:?}"
    );
    assert_eq!(k8s.timewait, Some(1.0));

    for cap in &caps {
        let mut fewer = caps.clone();
        fewer.remove(cap);
        let name = format!("without {cap}");
        let result = run_with_caps(&name, &setpriv(&setpriv_bin, NOBODY, &fewer), &bin);
        match cap.as_str() {
            // Loading, attaching, reading tracefs: it cannot start.
            "CAP_BPF" | "CAP_PERFMON" | "CAP_DAC_READ_SEARCH" => {
                let out = match result {
                    Ok(_) => panic!("the daemon started {name}"),
                    Err(out) => out,
                };
                assert!(out.starts_with("exit status: 1\n"), "{name}: {out}");
                println!("{name}: exit 1: {}", out.lines().last().unwrap_or(""));
            }
            // /proc/PID/fd of other users: owners of older sockets unknown.
            "CAP_SYS_PTRACE" => {
                let r = result.unwrap_or_else(|out| panic!("{name}: did not start: {out}"));
                assert!(matches!(r.client, Some(Some(_))), "{name}: {r:?}");
                assert_eq!(
                    r.older,
                    Some(None),
                    "{name}: older connection attributed anyway"
                );
                println!("{name}: starts, but the older connection has no owner");
            }
            other => panic!("no check for {other}: say what it is for"),
        }
    }
}

/// Every system call in the unit's SystemCallFilter, groups expanded.
fn allowed_syscalls(analyze: &Path, filter: &BTreeSet<String>) -> BTreeSet<String> {
    let mut allowed = BTreeSet::new();
    let mut todo: Vec<String> = filter.iter().cloned().collect();
    let mut seen = BTreeSet::new();
    while let Some(item) = todo.pop() {
        if !item.starts_with('@') {
            allowed.insert(item);
            continue;
        }
        if !seen.insert(item.clone()) {
            continue;
        }
        let r = output_of(Command::new(analyze).args(["syscall-filter", &item]));
        assert!(r.ok, "systemd-analyze syscall-filter {item}: {}", r.output);
        for line in r.output.lines().skip(1).map(str::trim) {
            if !line.is_empty() && !line.starts_with('#') {
                todo.push(line.to_string());
            }
        }
    }
    allowed
}

/// The system call names in an `strace -c` summary.
fn strace_summary_calls(summary: &str) -> BTreeSet<String> {
    summary
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.last()?;
            let numeric = f.len() >= 5 && f[0].parse::<f64>().is_ok();
            (numeric && name != "total").then(|| name.to_string())
        })
        .collect()
}

/// The pid of `parent`'s child (strace's tracee).
fn child_of(parent: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "strace started no child");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unit_syscall_filter_allows_every_call_the_daemon_makes() {
    require_live!();
    let (Some(analyze), Some(strace)) = (tool("systemd-analyze"), tool("strace")) else {
        return;
    };
    let unit = read_deploy(UNIT);
    let filter = unit_words(&unit, "SystemCallFilter");
    assert!(!filter.is_empty(), "the unit has no SystemCallFilter");
    let allowed = allowed_syscalls(&analyze, &filter);

    let dir = Scratch::new("strace");
    let summary = dir.path.join("strace.txt");
    let wrapper = vec![
        strace.display().to_string(),
        "-f".into(),
        "-c".into(),
        "-o".into(),
        summary.display().to_string(),
    ];
    let daemon = Daemon::start_as(
        "under strace",
        &wrapper,
        Path::new(tcpwatch_bin()),
        &["--interval", "1"],
    );
    // Every endpoint, a connection and a timewait snapshot, then SIGTERM to
    // the daemon itself (strace's own SIGTERM would kill it).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (s, _) = listener.accept().unwrap();
    drop((c, s, listener));
    std::thread::sleep(Duration::from_millis(1500));
    for path in [
        "/healthz",
        "/metrics",
        "/api/timewait",
        "/api/conns?limit=5",
    ] {
        let r = daemon.get(path);
        assert_eq!(r.status, 200, "GET {path} under strace: {}", r.body);
    }
    let tracee = child_of(daemon.proc.pid());
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(tracee as libc::pid_t, libc::SIGTERM) };
    let f = daemon.proc.finish(STOP_TIMEOUT);
    assert!(
        f.status.success(),
        "daemon under strace: {}\n{}",
        f.status,
        f.stderr.join("\n")
    );

    let used = strace_summary_calls(&fs::read_to_string(&summary).unwrap());
    assert!(
        used.contains("bpf") && used.contains("epoll_wait"),
        "strace summary: {used:?}"
    );
    let refused: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "SystemCallFilter={filter:?} refuses {refused:?}, which the daemon calls"
    );
    println!(
        "{} system calls used, all allowed by the unit's filter: {used:?}",
        used.len()
    );
    // The check can fail: without "bpf" the filter refuses the daemon.
    let mut without_bpf = filter.clone();
    without_bpf.remove("bpf");
    assert!(!used.is_subset(&allowed_syscalls(&analyze, &without_bpf)));
}

// ---------------------------------------------------------------------------
// Grafana

/// `tsc --strict` on `dashboard` as an object literal that must satisfy
/// @grafana/schema's `Dashboard`: unknown fields, wrong types and unknown
/// enum values are errors.
fn grafana_check(dir: &Path, dashboard: &str) -> Ran {
    // Inside the npm prefix, so that the import resolves to its node_modules.
    let scratch = dir.join(format!("check-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let file = scratch.join(format!("dashboard-{}.ts", free_port()));
    let source = format!(
        "import type {{ Dashboard }} from \"@grafana/schema\";\n\
         export const dashboard = ({}) satisfies Dashboard;\n",
        dashboard.trim_end()
    );
    fs::write(&file, source).unwrap();
    let r = output_of(
        Command::new(dir.join("node_modules/.bin/tsc"))
            .args(["--noEmit", "--strict", "--skipLibCheck"])
            .args(["--module", "nodenext", "--moduleResolution", "nodenext"])
            .arg(&file),
    );
    let _ = fs::remove_file(&file);
    let _ = fs::remove_dir(&scratch);
    r
}

#[test]
fn grafana_dashboard_matches_grafana_schema() {
    let text = read_deploy(DASHBOARD);
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    // What a schema cannot say: ids unique, panels inside the 24-column grid
    // and not on top of each other, each with a description and a query on
    // the dashboard's Prometheus variable.
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(ids.insert(p["id"].as_u64().unwrap()), "id of {title} twice");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{title} overlaps another panel at {cx},{cy}"
                );
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{title} has no query"
        );
    }
    let queries = dashboard_queries(&dashboard);
    for q in &queries {
        assert!(q.expr.contains("tcpwatch_"), "{q:?}");
        assert!(
            q.expr.contains("instance=~\"$instance\""),
            "not per host: {q:?}"
        );
    }
    println!("{} panels, {} queries", panels.len(), queries.len());

    let dir = grafana_schema_dir();
    if !dir.join("node_modules/.bin/tsc").is_file() {
        skip(&format!(
            "{} has no tsc (`cargo xtask setup --test-tools` or `cargo xtask test` installs \
             typescript and @grafana/schema from npm there)",
            dir.display()
        ));
        return;
    }
    let r = grafana_check(&dir, &text);
    assert!(r.ok, "tsc against @grafana/schema:\n{}", r.output);
    // The check rejects what Grafana's schema rejects.
    for (from, to, says) in [
        // unknown field (a typo)
        ("\"gridPos\"", "\"gridPosition\"", "does not exist in type"),
        // wrong type
        (
            "\"w\": 12",
            "\"w\": \"12\"",
            "not assignable to type 'number'",
        ),
        // not one of the enum's values
        (
            "\"graphTooltip\": 1",
            "\"graphTooltip\": 7",
            "DashboardCursorSync",
        ),
    ] {
        let bad = grafana_check(&dir, &mutate(&text, from, to));
        assert!(!bad.ok && bad.output.contains(says), "{to}: {}", bad.output);
    }
}
