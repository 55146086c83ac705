//! Helpers for the overload tests: tcpwatch in its three live modes run
//! inside a test namespace, their resident memory sampled while they run,
//! their exit summaries and LOST lines read back as numbers, and a flood
//! of half-open connections made with nonblocking connect() calls toward a
//! listener that never accepts.
//!
//! The namespace, addresses, listeners and the connection churn come from
//! `timewait`; the JSON line models from `trace` and `conns`.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::netns::Netns;
use super::sockets;
use super::summary::{exit_summary, lost_so_far, ExitSummary, Lost, Stream};
use super::timewait::{our_net, our_octet};
use super::{is_ready, tcpwatch_bin, Proc, START_TIMEOUT, STOP_TIMEOUT};
use tcpwatch::views::summary::Tracking;

// ---------------------------------------------------------------------------
// tcpwatch, inside the test namespace

/// The live modes the overload tests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Trace,
    Conns,
    Timewait,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Trace, Mode::Conns, Mode::Timewait];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Trace => "trace",
            Mode::Conns => "conns",
            Mode::Timewait => "timewait",
        }
    }

    /// Whether `s` is the exit summary this mode prints.
    fn is_its_summary(self, s: &ExitSummary) -> bool {
        matches!(
            (self, s),
            (Mode::Trace, ExitSummary::Trace(_))
                | (Mode::Conns, ExitSummary::Conns(_))
                | (Mode::Timewait, ExitSummary::Timewait(_))
        )
    }
}

/// A running `tcpwatch MODE --format json --laddr <our net> ...` inside a
/// namespace (killed if dropped). `--laddr` keeps other namespaces'
/// traffic out of its output, not out of its tables: tcpwatch traces the
/// whole host, and every socket it sees counts toward `--max-sockets`.
pub struct Watcher {
    pub mode: Mode,
    proc: Proc,
}

/// What a stopped tcpwatch printed, with its exit summary.
pub struct Stopped {
    pub mode: Mode,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub summary: ExitSummary,
    /// VmHWM just before it was stopped, in KiB.
    pub peak_rss_kib: u64,
}

impl Watcher {
    pub fn start(ns: &Netns, mode: Mode, extra: &[&str]) -> Watcher {
        let mut cmd = ns.command(tcpwatch_bin());
        cmd.args([mode.name(), "--format", "json", "--laddr", &our_net()])
            .args(extra);
        if mode == Mode::Timewait {
            // The batch check compares a snapshot with the kernel's list,
            // which the book reads only every check interval once the list
            // is long (the burst leaves tens of thousands).
            cmd.args(["--interval", "1", "--check-interval", "1"]);
        }
        let proc = Proc::spawn(&format!("tcpwatch {} {extra:?}", mode.name()), cmd, false);
        proc.wait_stderr(is_ready, 1, START_TIMEOUT);
        Watcher { mode, proc }
    }

    /// tcpwatch's own pid: `ip netns exec` execs it in place.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Lost events it has reported so far (its latest `LOST` line).
    pub fn lost_so_far(&self) -> Lost {
        lost_so_far(&self.proc.stderr_now())
    }

    /// Waits up to `t` for `n` stdout lines that satisfy `pred`; those
    /// seen by then (fewer on timeout).
    pub fn wait_stdout(&self, pred: impl Fn(&str) -> bool, n: usize, t: Duration) -> Vec<String> {
        let deadline = Instant::now() + t;
        loop {
            let hits = self.proc.wait_stdout(&pred, 0, Duration::ZERO);
            if hits.len() >= n || Instant::now() >= deadline {
                return hits;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT; checks a clean exit and an exit summary, and returns both.
    pub fn stop(self) -> Stopped {
        let peak_rss_kib = status_kib(self.pid(), "VmHWM:").unwrap_or(0);
        let name = self.proc.name.clone();
        let f = self.proc.interrupt(STOP_TIMEOUT);
        let summary = exit_summary(&f.stderr);
        assert!(
            self.mode.is_its_summary(&summary),
            "{name}: not its exit summary: {}",
            summary.json()
        );
        Stopped {
            mode: self.mode,
            summary,
            stdout: f.stdout,
            stderr: f.stderr,
            peak_rss_kib,
        }
    }
}

impl Stopped {
    /// What reached it from the kernel: events, lost events by cause.
    pub fn stream(&self) -> Stream {
        *self.summary.stream().expect("a summary of an event stream")
    }

    /// How full its socket table got.
    pub fn tracking(&self) -> Tracking {
        *self
            .summary
            .tracking()
            .expect("a summary of a socket table")
    }
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------
// Resident memory

/// Samples VmRSS of some processes every `period` on a thread of its own.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Vec<u64>>>>,
    handle: Option<JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pids: &[u32], period: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(vec![Vec::new(); pids.len()]));
        let (st, sa, pids) = (stop.clone(), samples.clone(), pids.to_vec());
        let handle = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                for (i, pid) in pids.iter().enumerate() {
                    if let Some(kib) = status_kib(*pid, "VmRSS:") {
                        sa.lock().unwrap()[i].push(kib);
                    }
                }
                std::thread::sleep(period);
            }
        });
        RssSampler {
            stop,
            samples,
            handle: Some(handle),
        }
    }

    /// The samples of each process so far, in KiB.
    pub fn series(&self) -> Vec<Vec<u64>> {
        self.samples.lock().unwrap().clone()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// A flood of half-open connections

/// What a flood did.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodResult {
    /// connect() calls that went out (EINPROGRESS).
    pub attempts: u64,
    /// Of those, sockets the kernel gave up on (SYN retries exhausted:
    /// ETIMEDOUT) before the flood closed them.
    pub timed_out: u64,
    /// Handshakes that completed (the listener's queue had room).
    pub connected: u64,
    /// Still connecting when closed by the flood.
    pub pending_at_close: u64,
    /// Most sockets open at once.
    pub peak_open: u64,
    /// socket/bind/connect failures.
    pub errors: u64,
    pub elapsed: Duration,
}

impl FloodResult {
    pub fn rate(&self) -> f64 {
        self.attempts as f64 / self.elapsed.as_secs_f64()
    }
}

/// A nonblocking socket bound to `src` (an ephemeral port), with a
/// connect() to `dst` in progress.
fn half_open(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<OwnedFd> {
    let fd = sockets::socket(dst.into(), libc::SOCK_NONBLOCK)?;
    sockets::bind(&fd, SocketAddrV4::new(src, 0).into())?;
    sockets::connect_fd(&fd, dst.into())?;
    Ok(fd)
}

/// SO_ERROR of a socket, and whether it is connected (writable, no error).
fn socket_outcome(fd: &OwnedFd) -> (i32, bool) {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err and len describe a writable c_int.
    unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    unsafe { libc::poll(&mut p, 1, 0) };
    (err, err == 0 && p.revents & libc::POLLOUT != 0)
}

/// Raises the soft limit on open files to the hard limit; returns it.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a valid rlimit struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur
    }
}

/// From a thread inside `ns`: `rate` nonblocking connects per second for
/// `duration` toward `dst`, from addresses 127.X.200.1-250 (X: this run's
/// octet), each socket held for `hold` and then closed. Returns once every
/// socket is closed.
pub fn flood(
    ns: &Netns,
    dst: SocketAddrV4,
    rate: f64,
    duration: Duration,
    hold: Duration,
) -> FloodResult {
    ns.in_ns(|| {
        let mut r = FloodResult::default();
        let mut open: VecDeque<(Instant, OwnedFd)> = VecDeque::new();
        let start = Instant::now();
        let close_old =
            |open: &mut VecDeque<(Instant, OwnedFd)>, r: &mut FloodResult, all: bool| {
                while let Some((t, _)) = open.front() {
                    if !all && t.elapsed() < hold {
                        break;
                    }
                    let (_, fd) = open.pop_front().unwrap();
                    match socket_outcome(&fd) {
                        (libc::ETIMEDOUT, _) => r.timed_out += 1,
                        (0, true) => r.connected += 1,
                        _ => r.pending_at_close += 1,
                    }
                }
            };
        let mut n: u32 = 0;
        while start.elapsed() < duration {
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            if r.attempts + r.errors >= due {
                close_old(&mut open, &mut r, false);
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let src = Ipv4Addr::new(127, our_octet(), 200, 1 + (n % 250) as u8);
            n = n.wrapping_add(1);
            match half_open(src, dst) {
                Ok(fd) => {
                    r.attempts += 1;
                    open.push_back((Instant::now(), fd));
                    r.peak_open = r.peak_open.max(open.len() as u64);
                }
                Err(_) => r.errors += 1,
            }
        }
        r.elapsed = start.elapsed();
        while !open.is_empty() {
            close_old(&mut open, &mut r, false);
            std::thread::sleep(Duration::from_millis(5));
        }
        r
    })
}
