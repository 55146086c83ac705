//! What the live tests share: deciding whether a test can run (and failing
//! instead of skipping under CI), the tools it needs, clocks and host facts,
//! scratch directories, and one module per thing the tests drive:
//!
//! - `proc`: child processes collected line by line;
//! - `peer`: the one peer program (the test binary re-executed, on a
//!   command protocol), so every socket has a known owner;
//! - `netns`: the one network-namespace fixture (and a veth pair of two);
//! - `sockets`: socket calls std does not offer (bind before listen, a
//!   chosen source address, a backlog, nonblocking connect);
//! - `summary`: the exit summaries and LOST lines, read in one place;
//! - `trace`, `conns`, `timewait`, `daemon`: runners for each command and
//!   the library's own record types their output is read into;
//! - `real_servers`: nginx, redis and their clients from Debian, started
//!   in the test's namespaces, and `ss` read inside them;
//! - `hardening`, `overload`, `deploy`: helpers of those tests alone.

pub mod conns;
pub mod daemon;
pub mod deploy;
pub mod hardening;
pub mod netns;
pub mod overload;
pub mod peer;
pub mod proc;
pub mod real_servers;
pub mod sockets;
pub mod summary;
pub mod timewait;
pub mod trace;

use std::fs;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use proc::{Finished, Proc};

/// What a binary built without `TCPWATCH_BPF_OBJECT` says when asked to trace.
pub const NO_OBJECT: &str = "built without its eBPF object";

pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub fn tcpwatch_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tcpwatch")
}

/// Whether a stderr line is the one every live command prints once its
/// probe is attached ("tcpwatch: tracing …; Ctrl-C to stop").
pub fn is_ready(line: &str) -> bool {
    line.starts_with("tcpwatch: tracing ") && line.ends_with("; Ctrl-C to stop")
}

// ---------------------------------------------------------------------------
// Skipping

/// Under CI (or when asked) a test that cannot run must fail, so a missing
/// privilege or toolchain piece can't turn the suite silently green.
pub fn strict() -> bool {
    std::env::var_os("CI").is_some()
        || std::env::var("TCPWATCH_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1")
}

/// Says why a test (or part of one) does not run; panics instead under
/// [`strict`].
pub fn skip(why: &str) {
    if strict() {
        panic!("cannot run (CI or TCPWATCH_REQUIRE_ROOT_TESTS=1 forbids skipping): {why}");
    }
    println!("skipped: {why}");
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether live tracing can work here: root, kernel BTF, and a binary that
/// embeds its eBPF object. Checked once per test process.
pub fn live() -> Result<(), String> {
    static LIVE: OnceLock<Result<(), String>> = OnceLock::new();
    LIVE.get_or_init(|| {
        if !is_root() {
            return Err("not running as root (live tracing loads eBPF programs)".into());
        }
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err("no kernel BTF at /sys/kernel/btf/vmlinux".into());
        }
        // A binary without its object says so before touching the kernel;
        // a BTF path that does not exist makes a complete binary stop too.
        let out = Command::new(tcpwatch_bin())
            .args(["trace", "--btf", "/nonexistent/tcpwatch-probe-check"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", tcpwatch_bin()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains(NO_OBJECT) {
            return Err(format!(
                "tcpwatch was built without its eBPF object (build it with \
                 TCPWATCH_BPF_OBJECT=<path> or `cargo xtask test`): {}",
                stderr.trim()
            ));
        }
        Ok(())
    })
    .clone()
}

/// Returns from the test (after [`skip`]) when live tracing cannot work.
#[macro_export]
macro_rules! require_live {
    () => {
        if let Err(why) = $crate::support::live() {
            $crate::support::skip(&why);
            return;
        }
    };
}

/// The Debian package that provides a test tool, for the message that says
/// it is missing.
fn package_of(program: &str) -> &str {
    match program {
        "ip" | "ss" => "iproute2",
        "setpriv" | "unshare" | "mountpoint" => "util-linux",
        "systemd-analyze" => "systemd",
        "promtool" => "prometheus",
        other => other,
    }
}

/// `program` in PATH or the sbin directories, or why not (with the fix).
pub fn find_tool(program: &str) -> Result<PathBuf, String> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file());
    found.ok_or_else(|| {
        format!(
            "{program} is not installed (`cargo xtask test` installs it; or: apt-get \
                 install -y {})",
            package_of(program)
        )
    })
}

/// The tool, or `None` after saying why the test does not run ([`skip`]).
pub fn tool(program: &str) -> Option<PathBuf> {
    find_tool(program).map_err(|why| skip(&why)).ok()
}

/// Whether all these tools are installed; says why not ([`skip`]) otherwise.
pub fn have(tools: &[&str]) -> bool {
    tools.iter().all(|t| tool(t).is_some())
}

// ---------------------------------------------------------------------------
// JSON lines

/// A JSON object line with every field in `fields`, read as `T` (an absent
/// `Option` field would otherwise read as `None`); and the object itself.
pub fn read_json<T: DeserializeOwned>(text: &str, fields: &[&str]) -> (T, Map<String, Value>) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    let Value::Object(map) = &v else {
        panic!("not an object: {text}")
    };
    for f in fields {
        assert!(map.contains_key(*f), "field {f} missing: {text}");
    }
    let map = map.clone();
    let t = serde_json::from_value(v).unwrap_or_else(|e| panic!("bad field ({e}): {text}"));
    (t, map)
}

// ---------------------------------------------------------------------------
// Clocks and host facts

/// Checks `ts` is RFC 3339 UTC with exactly 9 fractional digits and returns
/// it as nanoseconds since the epoch.
pub fn parse_ts(ts: &str) -> i128 {
    let b = ts.as_bytes();
    let shape_ok = b.len() == 30
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            29 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(shape_ok, "ts is not YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ: {ts}");
    let t = humantime::parse_rfc3339(ts).unwrap_or_else(|e| panic!("ts {ts}: {e}"));
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC now.
pub fn wall_minus_mono_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// This process's network namespace inode (what tcpwatch prints as netns).
pub fn own_netns() -> u32 {
    fs::metadata("/proc/self/ns/net").unwrap().ino() as u32
}

pub fn proc_comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/comm: {e}"))
        .trim_end_matches('\n')
        .to_string()
}

/// 127.0.0.1, and ::1 when IPv6 loopback works here (it may be disabled).
pub fn loopbacks() -> Vec<IpAddr> {
    let mut v = vec![IpAddr::from(Ipv4Addr::LOCALHOST)];
    if TcpListener::bind("[::1]:0").is_ok() {
        v.push("::1".parse().unwrap());
    } else {
        println!("IPv6 part skipped: ::1 cannot be bound here");
    }
    v
}

pub fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn parse_proc_port(field: &str) -> Option<u16> {
    u16::from_str_radix(field.rsplit(':').next()?, 16).ok()
}

/// Waits until no socket on these ports is in a state other than TIME_WAIT
/// (every transition the test caused has happened), reading /proc/net/tcp*.
pub fn settle(ports: &[u16], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut busy = Vec::new();
        for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = fs::read_to_string(file) else {
                continue;
            };
            for row in text.lines().skip(1) {
                let f: Vec<&str> = row.split_whitespace().collect();
                if f.len() < 4 {
                    continue;
                }
                let (lp, rp) = (parse_proc_port(f[1]), parse_proc_port(f[2]));
                let ours = [lp, rp]
                    .iter()
                    .any(|p| p.is_some_and(|p| ports.contains(&p)));
                if ours && f[3] != "06" {
                    busy.push(row.to_string());
                }
            }
        }
        if busy.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sockets on ports {ports:?} still open after {timeout:?}:\n{}",
            busy.join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Running things

/// Runs a command that must succeed; its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tcpwatch ARGS` to its end: (exit code, stdout, stderr).
pub fn run_tcpwatch(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(tcpwatch_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tcpwatch");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Checks that a refusal printed exactly one line on stderr, tcpwatch's
/// own, and no panic.
pub fn assert_one_line(stderr: &str, what: &str) {
    assert!(!stderr.contains("panicked"), "{what}: panicked:\n{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{what}: expected exactly one line on stderr, got:\n{stderr}"
    );
    assert!(
        stderr.ends_with('\n') && stderr.starts_with("tcpwatch: "),
        "{what}: {stderr:?}"
    );
}

/// A scratch directory every user may enter (uid 65534 runs binaries and
/// replays copies from it), removed when dropped.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("tcpwatch-test-{}-{tag}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        set_mode(&path, 0o755);
        Scratch { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `text` to `name` in the directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.join(name);
        fs::write(&p, text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        p
    }

    /// A copy of the tcpwatch binary that every user can run (the build
    /// tree may not be reachable for uid 65534).
    pub fn public_binary(&self) -> PathBuf {
        let bin = self.join("tcpwatch");
        fs::copy(tcpwatch_bin(), &bin).unwrap();
        set_mode(&bin, 0o755);
        bin
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

pub fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o7777
}
