//! Helpers for the hardening tests: a loopback churn generator, the BPF
//! objects one process holds (from its fdinfo) and what `bpftool` lists,
//! recordings replayed and checked against their own layout, and refusals.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::sockets;
use super::summary::conns_summary;
use super::{tcpwatch_bin, Finished, Proc};

/// The names of the programs in tcpwatch's eBPF object.
pub const PROGRAM_NAMES: [&str; 11] = [
    "inet_sock_set_state",
    "bench_floor",
    "tcp_retransmit_skb",
    "tcp_send_reset",
    "tcp_receive_reset",
    "sock_recv_length",
    "sock_send_length",
    "inet_sock_set_state_btf",
    "tcp_retransmit_skb_btf",
    "tcp_send_reset_btf",
    "tcp_receive_reset_btf",
];

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
                        sockets::linger_zero(&c).expect("SO_LINGER");
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

    /// "6 programs, 6 links, 4 maps".
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

/// What `tcpwatch replay FILE conns` read: (events, undecodable records,
/// stderr), from its exit summary. Its stdout is not kept: a recording of
/// a churn is large.
pub fn replay_counts(file: &Path) -> (u64, u64, Vec<String>) {
    let mut cmd = Command::new(tcpwatch_bin());
    cmd.arg("replay")
        .arg(file)
        .args(["conns", "--format", "json"]);
    let f = Proc::spawn_stdout_to("replay", cmd, Stdio::null()).finish(Duration::from_secs(60));
    assert!(
        f.status.success() && !f.stderr.iter().any(|l| l.contains("panicked")),
        "replay of {} failed ({}):\n{}",
        file.display(),
        f.status,
        f.stderr.join("\n")
    );
    let summary = conns_summary(&f.stderr);
    (summary.stream.events, summary.stream.undecodable, f.stderr)
}

// ---------------------------------------------------------------------------
// Processes

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
