//! Hardening, live (issue 7): tcpwatch must never be what falls over,
//! leaks or lies.
//!
//! - Lifecycle: `trace`, `conns` and `record` stopped by SIGTERM, SIGINT
//!   or SIGKILL in the middle of a loopback churn leave no program, link or
//!   map behind (the objects are attributed to the child through its
//!   fdinfo, then looked for with bpftool), a recording is readable up to
//!   its last whole record, and a new tcpwatch starts at once.
//! - Privileges: an unprivileged user, root in a user namespace, root
//!   without capabilities: one line, exit status 1, nothing loaded; a
//!   recording is created 0600 whatever the umask.
//! - Hostile environment: tracefs unmounted (in a private mount namespace),
//!   bad BTF files, fields missing from BTF, IPv6 disabled in a network
//!   namespace: one clear line, or a degraded mode that names what is
//!   missing and shows `-` where it cannot know, never a wrong figure.
//!
//! Every test prints its figures (run with `--nocapture` to see them).

use std::collections::BTreeSet;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tcpwatch::model::timewait::Snapshot;

use crate::require_live;
use crate::support::conns::{Conn, RawRecording, RECORD_SIZE};
use crate::support::hardening::*;
use crate::support::netns::Netns;
use crate::support::summary::{exit_summary, main_count};
use crate::support::timewait::Snap;
use crate::support::trace::{
    lifetimes, transitions, Line, Tcpwatch, ACCEPTED_SEQ, CLIENT_SEQ, LISTENER_SEQ,
};
use crate::support::{
    have, is_ready, is_root, mode, set_mode, settle, skip, tcpwatch_bin, Proc, Scratch,
    START_TIMEOUT, STOP_TIMEOUT,
};

/// How long each command runs under churn before the signal.
const LOAD: Duration = Duration::from_millis(700);
/// How long the kernel may take to free a closed program (it is freed
/// after an RCU grace period, not synchronously).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// A refusal must come at once; a start must too.
const QUICK: Duration = Duration::from_secs(30);
/// "Restarts at once": a new tcpwatch must be tracing within this.
const RESTART_LIMIT: Duration = Duration::from_secs(5);
const NOBODY: u64 = 65534;

// ---------------------------------------------------------------------------
// Lifecycle

/// A recording left by a stopped recorder: every whole record is replayed,
/// and a partial last one is named. `recorded` is what a cleanly stopped
/// recorder said it wrote. A copy cut in the middle of its last record
/// must give one record fewer and a warning. Returns a figure line.
fn check_recording(file: &Path, recorded: Option<u64>) -> String {
    let shape = RawRecording::read(file);
    let whole = shape.records.len() as u64;
    let (events, undecodable, stderr) = replay_counts(file);
    let warned = stderr.iter().any(|l| l.contains("partial record"));
    assert_eq!(
        events + undecodable,
        whole,
        "replay read {events} events (+{undecodable} undecodable) of {whole} whole records \
         and {} partial bytes: {stderr:?}",
        shape.partial
    );
    assert_eq!(warned, shape.partial > 0, "{shape:?}: {stderr:?}");
    if let Some(n) = recorded {
        assert_eq!(
            (whole, shape.partial),
            (n, 0),
            "a cleanly stopped recorder said it wrote {n} events"
        );
    }
    let mut figure = format!(
        "recording {} bytes = {whole} whole records + {} partial bytes; replay read {events}",
        shape.len, shape.partial
    );
    if whole > 0 {
        let cut = file.with_extension("cut");
        let bytes = fs::read(file).unwrap();
        let keep = bytes.len() - shape.partial - RECORD_SIZE / 2;
        fs::write(&cut, &bytes[..keep]).unwrap();
        let (cut_events, cut_undecodable, cut_stderr) = replay_counts(&cut);
        let warning = cut_stderr
            .iter()
            .find(|l| l.contains("partial record"))
            .unwrap_or_else(|| panic!("no warning for a cut record: {cut_stderr:?}"));
        assert_eq!(cut_events + cut_undecodable, whole - 1, "{warning}");
        figure += &format!("; cut mid-record: {cut_events} read and \"{warning}\"");
        let _ = fs::remove_file(cut);
    }
    figure
}

/// Runs one command under the churn, stops it with `sig` and checks that
/// everything it loaded is gone. Returns the figures.
fn stop_under_load(sig: libc::c_int, sig_name: &str, args: &[&str], churn: &Churn) -> String {
    let name = format!("`tcpwatch {}` + {sig_name}", args.join(" "));
    let before = tcpwatch_named_programs();
    let mut cmd = Command::new(tcpwatch_bin());
    cmd.args(args);
    let proc = Proc::spawn_stdout_to(&name, cmd, Stdio::null());
    let start = Instant::now();
    proc.wait_stderr(is_ready, 1, START_TIMEOUT);
    let ready = start.elapsed();

    let held = BpfIds::held_by(proc.pid());
    // One program for each of the four tracepoints, a second one for
    // tcp_send_reset (the BTF program for full sockets beside the classic
    // one for the rest), and the two BTF tracepoint programs that name an
    // accepted socket's owner.
    assert_eq!(
        (held.progs.len(), held.links.len()),
        (7, 7),
        "{name}: expected its 7 programs, each with its link: {held:?}"
    );
    assert_eq!(
        held.still_in(&BpfIds::listed()),
        held,
        "{name}: bpftool does not list everything it holds"
    );
    let names: BTreeSet<String> = bpftool("prog")
        .iter()
        .filter(|p| p["id"].as_u64().is_some_and(|id| held.progs.contains(&id)))
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    assert!(
        names.iter().all(|n| PROGRAM_NAMES.contains(&n.as_str())),
        "{name}: programs {names:?}"
    );
    let running = tcpwatch_named_programs();

    let made_before = churn.count();
    std::thread::sleep(LOAD);
    let made = churn.count() - made_before;
    proc.signal(sig);
    let signalled = Instant::now();
    let f = proc.finish(STOP_TIMEOUT);
    let stopped = signalled.elapsed();
    assert!(
        !f.stderr.iter().any(|l| l.contains("panicked")),
        "{name}: {:?}",
        f.stderr
    );
    let summary = if sig == libc::SIGKILL {
        assert_eq!(f.status.signal(), Some(libc::SIGKILL), "{name}");
        None
    } else {
        assert!(
            f.status.success(),
            "{name}: exited with {}: {:?}",
            f.status,
            f.stderr
        );
        let summary = exit_summary(&f.stderr);
        assert!(
            main_count(&summary) > 0,
            "{name} saw nothing: {}",
            summary.json()
        );
        Some(summary)
    };
    let released = wait_released(&held, RELEASE_TIMEOUT).unwrap_or_else(|left| {
        panic!("{name}: still loaded {RELEASE_TIMEOUT:?} after it exited: {left:?}")
    });
    let after = tcpwatch_named_programs();

    let mut figures = format!(
        "{name}: tracing after {ready:.2?}, held {} (programs {:?}); {made} connections in {LOAD:?}; \
         exited {stopped:.2?} after the signal ({}); all of it gone from bpftool {released:.2?} after exit; \
         tcpwatch-named programs on the host before/running/after: {}/{}/{}",
        held.counts(),
        held.progs,
        f.status,
        before.len(),
        running.len(),
        after.len()
    );
    if let Some(s) = &summary {
        figures += &format!("\n    summary: {}", s.json());
    }
    if let Some(i) = args.iter().position(|a| *a == "-o") {
        let recorded = summary.as_ref().map(main_count);
        figures += &format!(
            "\n    {}",
            check_recording(Path::new(args[i + 1]), recorded)
        );
    }
    figures
}

/// Connects once to `listener`, accepts, closes both ends and the
/// listener, and waits until the kernel is done with them. Returns the
/// client's port.
fn one_connection(listener: TcpListener) -> u16 {
    let port = listener.local_addr().unwrap().port();
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let client = c.local_addr().unwrap().port();
    let (a, _) = listener.accept().unwrap();
    drop(c);
    drop(a);
    drop(listener);
    settle(&[port], Duration::from_secs(10));
    client
}

/// A new tcpwatch right after the last one: tracing within
/// [`RESTART_LIMIT`], and it sees a new connection.
fn restart_at_once(after: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let start = Instant::now();
    let tw = Tcpwatch::start("restart", &["--lport", &port.to_string()]);
    let ready = start.elapsed();
    let client = one_connection(listener);
    let run = tw.stop();
    let seen: Vec<String> = run
        .lines
        .iter()
        .filter(|l| l.sport == port && l.dport == client)
        .map(|l| format!("{}->{}", l.old, l.new))
        .collect();
    assert!(
        ready < RESTART_LIMIT,
        "restart after {after} took {ready:?} to attach"
    );
    assert!(
        seen.first().map(String::as_str) == Some("LISTEN->SYN_RECV"),
        "restart after {after} did not see the new connection: {seen:?} {}",
        run.dump("restart")
    );
    format!(
        "restart after {after}: tracing {ready:.2?} after start, saw the new connection: {}",
        seen.join(" ")
    )
}

fn lifecycle(sig: libc::c_int, sig_name: &str) {
    require_live!();
    if !have(&["bpftool"]) {
        return;
    }
    let dir = Scratch::new(&sig_name.to_lowercase());
    let file = dir.join("churn.rec");
    let commands: [&[&str]; 3] = [
        &["trace", "--format", "json"],
        &["conns", "--format", "json"],
        &["record", "--format", "json", "-o", file.to_str().unwrap()],
    ];
    let churn = Churn::start(2);
    let mut figures = Vec::new();
    for args in commands {
        figures.push(stop_under_load(sig, sig_name, args, &churn));
    }
    let (made, rate) = churn.stop();
    figures.push(format!("churn: {made} loopback connections, {rate:.0}/s"));
    figures.push(restart_at_once(sig_name));
    for f in figures {
        eprintln!("{f}");
    }
}

#[test]
fn sigterm_under_load_leaves_nothing_attached() {
    lifecycle(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_under_load_leaves_nothing_attached() {
    lifecycle(libc::SIGINT, "SIGINT");
}

#[test]
fn sigkill_under_load_leaves_nothing_attached() {
    lifecycle(libc::SIGKILL, "SIGKILL");
}

// ---------------------------------------------------------------------------
// Privileges

/// Runs `wrapper... BIN args...` and checks it is refused with one line
/// containing `needle`. Returns the line.
fn refused(wrapper: &[&str], bin: &Path, args: &[&str], needle: &str) -> String {
    let mut cmd = Command::new(wrapper[0]);
    cmd.args(&wrapper[1..]).arg(bin).args(args);
    let what = format!("{wrapper:?} tcpwatch {args:?}");
    let line = refusal(&run(&what, cmd, QUICK), &what);
    assert!(line.contains(needle), "{what}: {line}");
    line
}

const AS_NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

/// Every live command run as uid 65534, as root in a user namespace, and
/// as root stripped of its capabilities: one line and status 1, no program
/// loaded by that user, and no recording created.
#[test]
fn unprivileged_runs_say_one_line_and_load_nothing() {
    if !is_root() {
        skip("needs root to switch users and to list every loaded program");
        return;
    }
    if !have(&["bpftool", "setpriv", "unshare"]) {
        return;
    }
    let dir = Scratch::new("unpriv");
    let bin = dir.public_binary();
    let out = dir.join("out");
    fs::create_dir(&out).unwrap();
    // Writable by nobody: a missing recording then means tcpwatch refused.
    set_mode(&out, 0o777);
    let rec = out.join("unpriv.rec");
    let rec_arg = rec.to_str().unwrap();
    let before = programs_of_uid(NOBODY);

    let commands: [&[&str]; 5] = [
        &["trace"],
        &["conns"],
        &["ladder"],
        &["timewait"],
        &["record", "-o", rec_arg],
    ];
    for args in commands {
        let line = refused(&AS_NOBODY, &bin, args, "root");
        eprintln!("uid 65534, tcpwatch {}: exit 1: {line}", args.join(" "));
    }
    assert!(
        !rec.exists(),
        "a refused recorder created {}",
        rec.display()
    );

    // Root of a user namespace has every capability there, none that bpf()
    // honours.
    let line = refused(&["unshare", "-U", "-r"], &bin, &["trace"], "user namespace");
    eprintln!("root in a user namespace: exit 1: {line}");
    // Root whose capabilities were dropped (a container, setpriv, capsh).
    let line = refused(
        &["setpriv", "--inh-caps=-all", "--bounding-set=-all"],
        &bin,
        &["trace"],
        "CAP_BPF",
    );
    eprintln!("root without capabilities: exit 1: {line}");
    // Capabilities to load but not to read tracefs (0700 root): named,
    // rather than "tracefs is not mounted".
    let mut nobody_with_caps = AS_NOBODY.to_vec();
    nobody_with_caps.extend(["--inh-caps=+bpf,+perfmon", "--ambient-caps=+bpf,+perfmon"]);
    let line = refused(&nobody_with_caps, &bin, &["trace"], "CAP_DAC_READ_SEARCH");
    eprintln!("uid 65534 with CAP_BPF and CAP_PERFMON: exit 1: {line}");

    let after = programs_of_uid(NOBODY);
    assert_eq!(after, before, "programs appeared that uid 65534 loaded");
    eprintln!(
        "programs loaded by uid 65534 before/after: {}/{}",
        before.len(),
        after.len()
    );
}

/// The recording names processes and peers: it is created 0600 even under
/// umask 000.
#[test]
fn recording_is_created_0600_whatever_the_umask() {
    require_live!();
    let dir = Scratch::new("mode");
    let file = dir.join("mode.rec");
    let mut cmd = Command::new(tcpwatch_bin());
    cmd.args(["record", "--duration", "1", "-o"]).arg(&file);
    // SAFETY: umask is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let f = run("record under umask 000", cmd, QUICK);
    assert!(f.status.success(), "{:?}", f.stderr);
    let mode = mode(&file);
    eprintln!(
        "record under umask 000 created {} mode {mode:04o}",
        file.display()
    );
    assert_eq!(mode, 0o600);
}

// ---------------------------------------------------------------------------
// tracefs

/// A wrapper that unmounts tracefs (both places) in a private mount
/// namespace, then execs its arguments, through `through` if not empty.
fn without_tracefs(through: &str) -> Vec<String> {
    let script = format!(
        "for p in /sys/kernel/debug/tracing /sys/kernel/tracing; do \
           while mountpoint -q $p; do umount $p || exit 97; done; \
         done; \
         exec {through} \"$0\" \"$@\""
    );
    [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn host_has_tracefs() -> bool {
    Command::new("mountpoint")
        .args(["-q", "/sys/kernel/tracing"])
        .status()
        .is_ok_and(|s| s.success())
}

/// tracefs unmounted: tcpwatch mounts it (in its own mount namespace here)
/// and traces correctly; where it may not mount it, one line says so and
/// what to run.
#[test]
fn tracefs_unmounted_is_mounted_or_named() {
    require_live!();
    if !have(&["unshare", "mountpoint", "setpriv"]) {
        return;
    }
    let host_before = host_has_tracefs();
    let wrapper = without_tracefs("");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    // Listen first, so the port is known; the accepted socket is new.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let tw = Tcpwatch::spawn_wrapped("no-tracefs", &wrapper, &["--lport", &port.to_string()]);
    tw.wait_ready();
    assert!(
        tw.saw_on_stderr("mounted tracefs at /sys/kernel/tracing", Duration::ZERO),
        "tcpwatch did not say it mounted tracefs"
    );
    let client = one_connection(listener);
    let run = tw.stop();
    let lives = lifetimes(&run.with_ports(&[port]));
    let accepted = lives
        .iter()
        .find(|l| l[0].dport == client)
        .unwrap_or_else(|| panic!("connection not seen {}", run.dump("no-tracefs")));
    assert_eq!(transitions(accepted), ACCEPTED_SEQ, "{accepted:#?}");
    assert!(accepted
        .iter()
        .all(|l| l.pid == Some(std::process::id()) && l.sport == port));
    assert_eq!(
        host_has_tracefs(),
        host_before,
        "the host's tracefs changed"
    );
    eprintln!(
        "tracefs unmounted: {:?}; then {} transitions of the test's connection, all right",
        run.stderr
            .iter()
            .find(|l| l.contains("mounted tracefs"))
            .unwrap(),
        accepted.len()
    );

    // Without CAP_SYS_ADMIN it cannot mount: one line saying what to run.
    let wrapper = without_tracefs("setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let line = refused(
        &wrapper,
        Path::new(tcpwatch_bin()),
        &["trace"],
        "mount -t tracefs nodev /sys/kernel/tracing",
    );
    eprintln!("tracefs unmounted, no CAP_SYS_ADMIN: exit 1: {line}");
    assert_eq!(
        host_has_tracefs(),
        host_before,
        "the host's tracefs changed"
    );
}

// ---------------------------------------------------------------------------
// BTF

/// Sets the type section length in a raw BTF blob's header.
fn set_btf_type_len(blob: &mut [u8], len: u32) {
    blob[12..16].copy_from_slice(&len.to_le_bytes());
}

/// Bad `--btf` files, each refused with one line naming it: missing,
/// empty, random bytes, a truncated copy of the kernel's, a copy whose
/// header is intact but whose type section ends inside a type, a
/// directory, a FIFO (which once blocked the start forever, deaf to
/// SIGTERM), a device (which once filled memory) and a huge sparse file.
#[test]
fn bad_btf_files_are_refused_in_one_line() {
    require_live!();
    let dir = Scratch::new("btf");
    let vmlinux = fs::read(tcpwatch::kernel::btf::VMLINUX_BTF).unwrap();
    let mut cases: Vec<(&str, PathBuf)> = vec![("missing", dir.join("missing"))];
    let mut file = |name: &'static str, bytes: &[u8]| {
        let p = dir.join(name);
        fs::write(&p, bytes).unwrap();
        cases.push((name, p));
    };
    file("empty", &[]);
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    file("random", &random);
    file("header-only", &vmlinux[..24]);
    file("half", &vmlinux[..vmlinux.len() / 2]);
    let mut short_types = vmlinux.clone();
    set_btf_type_len(&mut short_types, 1_000_001);
    file("type-cut", &short_types);
    cases.push(("directory", dir.path.clone()));
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    cases.push(("fifo", fifo));
    cases.push(("device", PathBuf::from("/dev/zero")));
    let sparse = dir.join("sparse");
    fs::File::create(&sparse)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    cases.push(("sparse 64 GB", sparse));

    for (what, path) in cases {
        let p = path.to_str().unwrap();
        let mut cmd = Command::new(tcpwatch_bin());
        cmd.args(["conns", "--btf", p]);
        let start = Instant::now();
        let line = refusal(&run(what, cmd, QUICK), &format!("--btf {what}"));
        let took = start.elapsed();
        assert!(line.contains(p), "--btf {what} not named: {line}");
        eprintln!("--btf {what}: exit 1 in {took:.2?}: {line}");
    }
}

/// A copy of the kernel's BTF with members renamed (same length, so
/// nothing else moves): the field is then missing.
fn btf_without(fields: &[&str], to: &Path) {
    let mut blob = fs::read(tcpwatch::kernel::btf::VMLINUX_BTF).unwrap();
    for f in fields {
        let needle: Vec<u8> = [&[0u8][..], f.as_bytes(), &[0]].concat();
        let at = blob
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap_or_else(|| panic!("no string {f} in the kernel's BTF"));
        // Only the last letter changes: `srtt_us` becomes `srtt_uX`.
        blob[at + f.len()] = b'X';
    }
    fs::write(to, blob).unwrap();
}

/// The `conns --format json` record with these ports.
fn record_of(lines: &[String], sport: u16, dport: u16) -> Conn {
    lines
        .iter()
        .map(|l| Conn::parse(l))
        .find(|c| c.sport == sport && c.dport == dport)
        .unwrap_or_else(|| panic!("no record {sport}->{dport}"))
}

/// The text row whose LOCAL ends in `:port` and REMOTE in `:peer`, split
/// into columns (the comm is the test's thread name, without spaces; the
/// date and the time of day are two).
fn text_row(lines: &[String], port: u16, peer: u16) -> Vec<String> {
    let (l, r) = (format!(":{port}"), format!(":{peer}"));
    lines
        .iter()
        .map(|line| {
            line.split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .find(|cols| cols.len() > 7 && cols[5].ends_with(&l) && cols[6].ends_with(&r))
        .unwrap_or_else(|| panic!("no row {port}->{peer} in {lines:#?}"))
}

fn start_conns(name: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(tcpwatch_bin());
    cmd.arg("conns").args(args);
    let p = Proc::spawn(name, cmd, false);
    p.wait_stderr(is_ready, 1, START_TIMEOUT);
    p
}

/// BTF without `tcp_sock.bytes_acked` and `tcp_sock.srtt_us`: one degraded
/// line each, naming the field and the columns it costs; those columns are
/// `-` (null), and every other figure equals a run with the real BTF.
#[test]
fn btf_missing_fields_are_named_and_shown_as_unknown() {
    require_live!();
    let dir = Scratch::new("fields");
    let btf = dir.join("vmlinux-without");
    btf_without(&["bytes_acked", "srtt_us"], &btf);
    let btf_arg = btf.to_str().unwrap();
    let real = start_conns("conns real BTF", &["--format", "json"]);
    let json = start_conns(
        "conns degraded json",
        &["--format", "json", "--btf", btf_arg],
    );
    let text = start_conns("conns degraded text", &["--btf", btf_arg]);
    let (server, client) = std::thread::Builder::new()
        .name("hw-btf".into())
        .spawn(exchange)
        .unwrap()
        .join()
        .unwrap();
    settle(&[server], Duration::from_secs(10));
    let keys = [(client, server), (server, client)];
    let has_all = |l: &str| {
        keys.iter().any(|(a, b)| {
            l.contains(&format!("\"sport\":{a},")) && l.contains(&format!("\"dport\":{b},"))
        })
    };
    for p in [&real, &json] {
        p.wait_stdout(has_all, 2, Duration::from_secs(20));
    }
    text.wait_stdout(
        |l| l.contains(&format!(":{client} ")),
        2,
        Duration::from_secs(20),
    );
    let [real, json, text] = [real, json, text].map(|p| p.interrupt(STOP_TIMEOUT));

    let degraded: Vec<&String> = json
        .stderr
        .iter()
        .filter(|l| l.starts_with("tcpwatch: degraded: "))
        .collect();
    assert_eq!(degraded.len(), 2, "{:?}", json.stderr);
    assert!(degraded[0].contains("tcp_sock.bytes_acked") && degraded[0].contains("TX"));
    assert!(degraded[1].contains("tcp_sock.srtt_us") && degraded[1].contains("RTT_US"));
    assert!(
        !real.stderr.iter().any(|l| l.contains("degraded")),
        "{:?}",
        real.stderr
    );
    for l in &degraded {
        eprintln!("{l}");
    }

    let wrote = [(client, server, 300, 200), (server, client, 200, 300)];
    for (sport, dport, sent, received) in wrote {
        let r = record_of(&real.stdout, sport, dport);
        let d = record_of(&json.stdout, sport, dport);
        let role = r.role.clone().expect("role");
        assert_eq!(r.bytes_sent, Some(sent), "real BTF, {role}");
        assert_eq!(d.bytes_sent, None, "degraded {role}: {}", d.line);
        assert_eq!(d.srtt_us, None, "degraded {role}: {}", d.line);
        assert!(r.srtt_us.is_some(), "real BTF {role}: {}", r.line);
        assert_eq!(d.bytes_received, Some(received), "degraded {role}");
        if role == "server" {
            assert_eq!(d.handshake_ms, None, "degraded server: {}", d.line);
            assert!(r.handshake_ms.is_some(), "real server: {}", r.line);
        } else {
            assert!(d.handshake_ms.is_some(), "degraded client: {}", d.line);
        }
        // Everything else is the same figure.
        for k in [
            "role",
            "open",
            "close",
            "closed_by",
            "teardown_segments",
            "bytes_received",
            "retransmits",
            "total_retrans",
            "resets_sent",
            "resets_received",
            "pid",
            "comm",
            "netns",
        ] {
            assert_eq!(
                d.get(k),
                r.get(k),
                "{role}: {k} differs from the real BTF's"
            );
        }
        assert_eq!(d.comm.as_deref(), Some("hw-btf"));
        // The two probes stamp the same close microseconds apart.
        assert_eq!(d.timewait_left(), r.timewait_left(), "{role}: timewait");
        // Text: TX, RX, RTT_US, RETX, WHY, RST_REASON are the last six
        // columns; HS_MS is 8th.
        let row = text_row(&text.stdout, sport, dport);
        let n = row.len();
        assert_eq!(row[n - 6], "-", "TX: {row:?}");
        assert_eq!(row[n - 5], received.to_string(), "RX: {row:?}");
        assert_eq!(row[n - 4], "-", "RTT_US: {row:?}");
        if role == "server" {
            assert_eq!(row[8], "-", "server HS_MS: {row:?}");
        }
        eprintln!(
            "{role}: real BTF TX {} RTT_US {} HS_MS {}; degraded TX {} RTT_US {} HS_MS {}, RX {} both; text row: {}",
            r.get("bytes_sent"),
            r.get("srtt_us"),
            r.get("handshake_ms"),
            d.get("bytes_sent"),
            d.get("srtt_us"),
            d.get("handshake_ms"),
            d.get("bytes_received"),
            row.join(" ")
        );
    }
}

// ---------------------------------------------------------------------------
// IPv6 disabled

/// A network namespace with IPv6 disabled: `trace`, `conns` and
/// `timewait` run inside it, trace its IPv4 connection exactly, and count
/// its one TIME_WAIT socket as the kernel does. Only the test uses the
/// namespace, so its figures are exact (the tracepoint also shows the
/// other namespaces' sockets, which are told apart by `netns`).
#[test]
fn ipv6_disabled_namespace_traces_ipv4() {
    require_live!();
    if !have(&["ip"]) {
        return;
    }
    let ns = Netns::new();
    for key in ["all", "default", "lo"] {
        ns.sysctl(&format!("net.ipv6.conf.{key}.disable_ipv6"), "1");
    }
    let inode = ns.inode();
    let exec = ["ip", "netns", "exec", ns.name.as_str()];
    let trace = Tcpwatch::spawn_wrapped("v6off", &exec, &[]);
    let spawn_in_ns = |name: &str, args: &[&str]| {
        let mut cmd = ns.command(tcpwatch_bin());
        cmd.args(args);
        Proc::spawn(name, cmd, false)
    };
    let conns = spawn_in_ns("conns in v6off", &["conns", "--format", "json"]);
    let timewait = spawn_in_ns(
        "timewait in v6off",
        &["timewait", "--format", "json", "--interval", "1"],
    );
    trace.wait_ready();
    conns.wait_stderr(is_ready, 1, START_TIMEOUT);
    timewait.wait_stderr(is_ready, 1, START_TIMEOUT);

    let (v6, (server, client)) = ns.in_ns_as(Some("hw-v6off"), || {
        (TcpListener::bind("[::1]:0").err(), exchange())
    });
    let v6 = v6.expect("::1 could be bound: IPv6 is not disabled in the namespace");
    // The client closed first: one TIME_WAIT socket in the namespace.
    let own = |s: &Snapshot| s.total - s.other_netns;
    let want_tw = |l: &str| {
        serde_json::from_str::<Snapshot>(l)
            .is_ok_and(|s| own(&s) == 1 && s.kernel_listed == Some(1))
    };
    let snapshot = timewait.wait_stdout(want_tw, 1, Duration::from_secs(20));
    let snapshot = Snap::parse(&snapshot[0]);
    conns.wait_stdout(
        |l| l.contains(&format!("\"sport\":{client},")),
        1,
        Duration::from_secs(20),
    );

    let run = trace.stop();
    let conns = conns.interrupt(STOP_TIMEOUT);
    let timewait = timewait.interrupt(STOP_TIMEOUT);
    for (what, stderr) in [
        ("trace", &run.stderr),
        ("conns", &conns.stderr),
        ("timewait", &timewait.stderr),
    ] {
        let odd: Vec<&String> = stderr
            .iter()
            .filter(|l| l.contains("error") || l.contains("panicked") || l.contains("cannot"))
            .collect();
        assert!(odd.is_empty(), "{what} in v6off: {stderr:?}");
        eprintln!("{what} in v6off said: {stderr:?}");
    }

    // In the namespace, only the test made sockets.
    let ours: Vec<Line> = run
        .lines
        .iter()
        .filter(|l| l.netns == Some(inode))
        .cloned()
        .collect();
    let lives = lifetimes(&ours);
    let me = Some(std::process::id());
    let mut seqs: Vec<Vec<(&str, &str)>> = lives.iter().map(|l| transitions(l)).collect();
    seqs.sort();
    let mut want = vec![
        CLIENT_SEQ.to_vec(),
        ACCEPTED_SEQ.to_vec(),
        LISTENER_SEQ.to_vec(),
    ];
    want.sort();
    assert_eq!(seqs, want, "{}", run.dump("v6off"));
    for l in &ours {
        assert_eq!(
            (l.family.as_str(), l.pid, l.comm.as_deref()),
            ("ipv4", me, Some("hw-v6off"))
        );
        assert!(l.saddr == "127.0.0.1" && (l.daddr == "127.0.0.1" || l.daddr == "0.0.0.0"));
        assert!(l.sport == server || l.dport == server || l.sport == client);
    }
    let c = record_of(&conns.stdout, client, server);
    let s = record_of(&conns.stdout, server, client);
    for (r, role, open, by, sent) in [
        (&c, "client", "active", "local", 300),
        (&s, "server", "passive", "peer", 200),
    ] {
        assert_eq!(
            (
                r.role.as_deref(),
                r.open.as_str(),
                r.close.as_str(),
                r.closed_by.as_deref()
            ),
            (Some(role), open, "orderly", Some(by)),
            "{}",
            r.line
        );
        assert_eq!((r.bytes_sent, r.netns), (Some(sent), Some(inode)));
    }
    assert_eq!(snapshot.kernel.sockstat_tw, Some(1), "{snapshot:?}");
    let mine = snapshot
        .process(std::process::id())
        .unwrap_or_else(|| panic!("the test is not among the closers: {snapshot:?}"));
    assert_eq!(mine.count, 1, "{snapshot:?}");
    eprintln!(
        "v6off (netns {inode}): binding ::1 failed ({v6}); trace: {} transitions in {} sockets of the \
         namespace, all right ({} of other namespaces); conns: client {} / server {}; timewait: {} in \
         the namespace ({} counted in all, {} in others), kernel_listed {:?}, sockstat tw {:?}",
        ours.len(),
        lives.len(),
        run.lines.len() - ours.len(),
        c.close,
        s.close,
        own(&snapshot),
        snapshot.total,
        snapshot.other_netns,
        snapshot.kernel_listed,
        snapshot.kernel.sockstat_tw
    );
}
