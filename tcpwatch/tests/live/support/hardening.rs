//! Helpers for the hardening tests (hardening.rs): a loopback churn
//! generator, the BPF objects one process holds (from its fdinfo) and what
//! `bpftool` lists, recordings checked against their own length, scratch
//! directories, and a network namespace the test creates and deletes.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::{self as common, tcpwatch_bin, ExitSummary, Finished, Proc};

/// The names of the programs in tcpwatch's eBPF object.
pub const PROGRAM_NAMES: [&str; 5] = [
    "inet_sock_set_state",
    "bench_floor",
    "tcp_retransmit_skb",
    "tcp_send_reset",
    "tcp_receive_reset",
];

/// Whether an external program is installed; says why not (or fails
/// under CI) otherwise.
pub fn have(tool: &str) -> bool {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists());
    if !found {
        common::skip(&format!("{tool} is not installed"));
    }
    found
}

/// Whether a line is the one every live command prints once attached.
pub fn is_ready(line: &str) -> bool {
    line.starts_with("tcpwatch: tracing ") && line.ends_with("; Ctrl-C to stop")
}

// ---------------------------------------------------------------------------
// Churn

/// Threads that connect to their own loopback listener, accept and close
/// as fast as they can until stopped. The client closes with SO_LINGER 0
/// (a RST), so the churn leaves no TIME_WAIT sockets for other tests on
/// this host to count.
pub struct Churn {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a valid `linger` of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

impl Churn {
    pub fn start(threads: usize) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, count) = (stop.clone(), count.clone());
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                std::thread::spawn(move || {
                    let addr = listener.local_addr().unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        let c = TcpStream::connect(addr).unwrap();
                        let (a, _) = listener.accept().unwrap();
                        set_linger_zero(&c);
                        drop(c);
                        drop(a);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Churn {
            stop,
            count,
            threads,
            started: Instant::now(),
        }
    }

    /// Connections made so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Stops; returns the connections made and their rate per second.
    pub fn stop(mut self) -> (u64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("churn thread");
        }
        let n = self.count();
        (n, n as f64 / self.started.elapsed().as_secs_f64())
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// BPF objects

/// IDs of BPF programs, links and maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BpfIds {
    pub progs: BTreeSet<u64>,
    pub links: BTreeSet<u64>,
    pub maps: BTreeSet<u64>,
}

impl BpfIds {
    /// What process `pid` holds open, from its /proc fdinfo: a program fd
    /// says `prog_id:`, a link fd `link_id:` (and its program's id), a map
    /// fd `map_id:`. This attributes objects to one process exactly, where
    /// bpftool cannot (Debian's is built without its `pids` support).
    pub fn held_by(pid: u32) -> BpfIds {
        let mut ids = BpfIds::default();
        let dir = format!("/proc/{pid}/fdinfo");
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
            let Ok(text) = fs::read_to_string(entry.unwrap().path()) else {
                continue;
            };
            for line in text.lines() {
                let Some((key, value)) = line.split_once(':') else {
                    continue;
                };
                let Ok(id) = value.trim().parse::<u64>() else {
                    continue;
                };
                match key {
                    "prog_id" => ids.progs.insert(id),
                    "link_id" => ids.links.insert(id),
                    "map_id" => ids.maps.insert(id),
                    _ => false,
                };
            }
        }
        ids
    }

    /// Everything loaded in the kernel, per `bpftool -j {prog,link,map} show`.
    pub fn listed() -> BpfIds {
        let ids = |what: &str| {
            bpftool(what)
                .iter()
                .filter_map(|o| o["id"].as_u64())
                .collect()
        };
        BpfIds {
            progs: ids("prog"),
            links: ids("link"),
            maps: ids("map"),
        }
    }

    /// The objects of `self` that are also in `other`.
    pub fn still_in(&self, other: &BpfIds) -> BpfIds {
        let both = |a: &BTreeSet<u64>, b: &BTreeSet<u64>| a.intersection(b).copied().collect();
        BpfIds {
            progs: both(&self.progs, &other.progs),
            links: both(&self.links, &other.links),
            maps: both(&self.maps, &other.maps),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.progs.is_empty() && self.links.is_empty() && self.maps.is_empty()
    }

    /// "4 programs, 4 links, 3 maps".
    pub fn counts(&self) -> String {
        format!(
            "{} programs, {} links, {} maps",
            self.progs.len(),
            self.links.len(),
            self.maps.len()
        )
    }
}

/// `bpftool -j WHAT show` as JSON objects (`[]` when bpftool fails).
pub fn bpftool(what: &str) -> Vec<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(["-j", what, "show"])
        .stderr(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("bpftool: {e}"));
    assert!(out.status.success(), "bpftool {what} show: {}", out.status);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Loaded programs that carry one of tcpwatch's program names, by id.
pub fn tcpwatch_named_programs() -> BTreeSet<u64> {
    bpftool("prog")
        .iter()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| PROGRAM_NAMES.contains(&n))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Programs loaded by `uid`.
pub fn programs_of_uid(uid: u64) -> Vec<serde_json::Value> {
    bpftool("prog")
        .into_iter()
        .filter(|p| p["uid"].as_u64() == Some(uid))
        .collect()
}

/// Polls bpftool until none of `ids` is listed; returns how long that took,
/// or what is still listed after `timeout`.
pub fn wait_released(ids: &BpfIds, timeout: Duration) -> Result<Duration, BpfIds> {
    let start = Instant::now();
    loop {
        let left = ids.still_in(&BpfIds::listed());
        if left.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(left);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Recordings

/// A recording's layout, from its own bytes: whole records after the
/// header and snapshot, and the bytes of a last partial one.
#[derive(Debug)]
pub struct RecordingShape {
    pub len: usize,
    pub whole: u64,
    pub partial: usize,
}

pub fn recording_shape(file: &Path) -> RecordingShape {
    use tcpwatch::stream::record::{HEADER_LEN, MAGIC};
    let bytes = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(
        bytes.len() >= HEADER_LEN && bytes.starts_with(MAGIC),
        "{} has no header ({} bytes)",
        file.display(),
        bytes.len()
    );
    let snapshot = u32::from_le_bytes(bytes[28..32].try_into().unwrap()) as usize;
    let body = bytes.len() - HEADER_LEN - snapshot;
    let size = tcpwatch_common::Event::SIZE;
    RecordingShape {
        len: bytes.len(),
        whole: (body / size) as u64,
        partial: body % size,
    }
}

/// What `tcpwatch replay FILE conns` read: (events, undecodable records,
/// stderr), from its exit summary (`--format json`). Its stdout is not
/// kept: a recording of a churn is large.
pub fn replay_counts(file: &Path) -> (u64, u64, Vec<String>) {
    let mut cmd = Command::new(tcpwatch_bin());
    cmd.arg("replay")
        .arg(file)
        .args(["conns", "--format", "json"]);
    let f = Proc::spawn_stdout_to("replay", cmd, Stdio::null()).finish(Duration::from_secs(60));
    let stderr = f.stderr;
    assert!(
        f.status.success() && !stderr.iter().any(|l| l.contains("panicked")),
        "replay of {} failed ({}):\n{}",
        file.display(),
        f.status,
        stderr.join("\n")
    );
    let Some(ExitSummary::Conns(summary)) = ExitSummary::from_stderr(&stderr) else {
        panic!("no replay summary: {stderr:?}")
    };
    (summary.stream.events, summary.stream.undecodable, stderr)
}

// ---------------------------------------------------------------------------
// Processes, files, namespaces

/// Runs a command to its end; after `timeout` it is killed and the test
/// fails (a tcpwatch blocked on a FIFO must fail the test, not hang it).
pub fn run(name: &str, cmd: Command, timeout: Duration) -> Finished {
    Proc::spawn(name, cmd, false).finish(timeout)
}

/// Checks a run was refused: status 1, nothing on stdout, and on stderr
/// exactly one line, tcpwatch's own. Returns the line.
pub fn refusal(f: &Finished, what: &str) -> String {
    let err = f.stderr.join("\n");
    assert_eq!(f.status.code(), Some(1), "{what}: {err}");
    assert!(
        f.stderr.len() == 1 && f.stderr[0].starts_with("tcpwatch: ") && !err.contains("panicked"),
        "{what}: expected one line of tcpwatch's on stderr, got:\n{err}"
    );
    assert!(f.stdout.is_empty(), "{what}: stdout {:?}", f.stdout);
    f.stderr[0].clone()
}

/// A scratch directory that every user may enter, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        use std::os::unix::fs::PermissionsExt;
        let path =
            std::env::temp_dir().join(format!("tcpwatch-hardening-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A network namespace this test created, deleted when dropped.
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A namespace with loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("tcpwatch-hard-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        ip(&[
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]);
    }

    /// Its inode: what tcpwatch prints as `netns`.
    pub fn inode(&self) -> u32 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(self.path()).unwrap().ino() as u32
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread named `thread` (its comm) that lives in the
    /// namespace: the sockets it makes are the namespace's.
    pub fn run<T: Send>(&self, thread: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name(thread.into())
                .spawn_scoped(s, move || {
                    let ns = fs::File::open(&path).unwrap();
                    // SAFETY: setns on a namespace fd we hold; it moves only
                    // this thread.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .unwrap()
                .join()
                .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// One orderly loopback connection: the client writes 300 bytes, the
/// server answers 200, the client closes first. Returns (server port,
/// client port). The listener is made here too, so a tracer started
/// before sees all three sockets.
pub fn exchange() -> (u16, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let mut c = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
    let (mut a, _) = listener.accept().unwrap();
    let client_port = c.local_addr().unwrap().port();
    c.write_all(&[7; 300]).unwrap();
    let mut buf = [0u8; 300];
    a.read_exact(&mut buf).unwrap();
    a.write_all(&[9; 200]).unwrap();
    c.read_exact(&mut buf[..200]).unwrap();
    drop(c);
    assert_eq!(a.read(&mut buf).unwrap(), 0, "EOF expected");
    drop(a);
    drop(listener);
    (server_port, client_port)
}
