//! `cargo xtask soak --daemon`: `tcpwatch daemon` through minutes of
//! churn that keeps the kernel's TIME_WAIT table full.
//!
//! In a network namespace of its own, with `net.ipv4.tcp_max_tw_buckets`
//! set to [`TW_BUCKETS`], the bench's churn generator runs paced at
//! `--rate` connections per second (by default enough to hold the table
//! full: a timewait socket lives 60 s), while `tcpwatch daemon` serves
//! from inside the namespace. Every 5 s the soak reads the daemon's
//! VmRSS and the namespace's sockstat `tw`. At the end it checks, and says
//! which held:
//!
//! - **load**: the table was full (sockstat `tw` reached
//!   `tcp_max_tw_buckets`);
//! - **memory**: RSS flat after the warm-up (the last half's peak within
//!   [`RSS_FLAT_PERCENT`] of the peak of the first minute after it), and
//!   at most [`RSS_TARGET_MB`] MB in the last half;
//! - **losses**: no event lost to a full ring buffer;
//! - **agreement**: once every timewait socket has expired, the daemon's
//!   TIME_WAIT count in `/metrics` is 0; and after a burst at full rate
//!   (nothing expires for the next minute), at its first snapshot checked
//!   against the kernel's list (read every check interval for a table this
//!   long), it equals `/api/timewait`, the daemon's sock_diag list, the
//!   namespace's sockstat `tw` read before and after the snapshot, and
//!   `ss`'s list, exactly. Just after the churn
//!   stops the same figures are printed, but the kernel's count then falls
//!   by the rate every second and the daemon's snapshot lists the sockets a
//!   moment before it publishes, so they bracket rather than match.
//!
//! The figures are printed and written to target/soak/soak-daemon.json.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{enter, mib, sockstat_tw, vm_rss_kib, Comparison, Netns, RssFigures, SAMPLE};
use crate::{
    churn::{self, ChurnResult},
    process,
    report::{thousands, utc_date, Machine},
    tracer::{self, Output, Ready, Tracer, INTERRUPTED},
    workspace::Workspace,
};

/// The namespace's `net.ipv4.tcp_max_tw_buckets`: the host default here,
/// and the figure.
pub const TW_BUCKETS: u64 = 131_072;
/// Where the daemon listens, inside the namespace.
const LISTEN: &str = "127.0.0.1:9977";
/// How much RSS may grow after the warm-up and still be flat.
const RSS_FLAT_PERCENT: f64 = 5.0;
/// The target for the daemon's steady RSS, in MB (10^6 bytes).
const RSS_TARGET_MB: f64 = 40.0;
/// The longest warm-up: the table fills in `TW_BUCKETS / rate` seconds
/// (about 44 s at the default rate), then its first expiries start.
const WARM_UP: Duration = Duration::from_secs(90);
/// After the churn, before the snapshot compared with the kernel.
const QUIET: Duration = Duration::from_secs(2);
/// The stretch after the warm-up whose peak RSS is the flatness baseline.
const FLAT_WINDOW: Duration = Duration::from_secs(60);
/// The full-rate burst that fills the table for the exact comparison.
const BURST: Duration = Duration::from_secs(6);
/// The longest wait after a burst for a snapshot with the kernel's list:
/// the daemon's check interval (30 s) and two snapshots, well within the
/// 54 s before the burst's first timewait sockets expire.
const LISTED_WITHIN: Duration = Duration::from_secs(40);
/// The longest wait for the last timewait socket to expire (60 s each).
const DRAIN: Duration = Duration::from_secs(75);
/// The churn runs in chunks of this length, for a rate series.
const CHUNK: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Options {
    pub minutes: u32,
    pub threads: u32,
    /// Connections per second.
    pub rate: u32,
    /// The daemon's `--ring-size`, when not its default.
    pub ring_size: Option<String>,
    /// A tcpwatch binary to soak instead of the workspace's own build.
    pub binary: Option<PathBuf>,
}

/// The default rate: the table filled with a fifth to spare within a
/// TIME_WAIT lifetime (60 s).
pub fn default_rate() -> u32 {
    (TW_BUCKETS * 6 / 5 / 60) as u32
}

impl Options {
    fn duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.minutes) * 60)
    }

    fn warm_up(&self) -> Duration {
        WARM_UP.min(self.duration() / 2)
    }
}

/// Runs the daemon soak; `Ok(false)` when it ran but a check failed.
pub fn run(ws: &Workspace, options: &Options) -> Result<bool> {
    let (out_dir, binary) = match &options.binary {
        Some(binary) => {
            if !process::is_root() {
                bail!("cargo xtask soak must run as root (it loads eBPF programs)");
            }
            let out_dir = ws.root().join("target").join("soak");
            fs::create_dir_all(&out_dir)
                .with_context(|| format!("cannot create {}", out_dir.display()))?;
            (out_dir, binary.clone())
        }
        None => tracer::private_build(
            ws,
            "soak",
            "it loads eBPF programs and makes a network namespace",
        )?,
    };
    tracer::catch_signals();
    let started = SystemTime::now();
    let machine = Machine::read();
    let load_before = tracer::loadavg();
    let ns = Netns::create()?;
    process::run(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "sysctl", "-qw"])
            .arg(format!("net.ipv4.tcp_max_tw_buckets={TW_BUCKETS}")),
    )?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).arg(&binary).args([
        "daemon",
        "--log-format",
        "json",
        "--listen",
        LISTEN,
        // Only the soak's namespace: the host's other traffic (other
        // namespaces' timewait sockets) would change what is measured.
        "--netns",
        &ns.name,
    ]);
    if let Some(size) = &options.ring_size {
        cmd.args(["--ring-size", size]);
    }
    let mut daemon = Tracer::spawn(cmd, Output::Discard)?;
    daemon.wait_ready(Ready::Daemon)?;
    let pid = daemon.pid;
    let status = |field| {
        fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| tracer::status_kib(&s, field))
    };
    let attached_kib = status("VmRSS:").context("cannot read the daemon's RSS")?;
    let start_up_peak_kib = status("VmHWM:").unwrap_or(0);
    eprintln!(
        "soak: tcpwatch daemon (pid {pid}) in network namespace {} (tcp_max_tw_buckets {}); \
         RSS {} once attached, {} at most while starting; churn for {} min at {}/s",
        ns.name,
        thousands(TW_BUCKETS as f64),
        mib(attached_kib),
        mib(start_up_peak_kib),
        options.minutes,
        thousands(f64::from(options.rate))
    );

    let (samples, chunks) = churn_and_sample(&ns, pid, options)?;
    tracer::pause(QUIET)?;
    // With the churn stopped the kernel's count falls by the rate every
    // second for a minute, and no reading of it is at one instant with the
    // daemon's: the comparison then only brackets the daemon's figure.
    let stopped_at = compare(&ns, pid)?;
    eprintln!("soak: churn stopped: {}", stopped_at.line());
    // Exact equality needs a count that holds still: once every timewait
    // socket has expired (the daemon must say 0 too), a burst at full rate
    // fills the table again within seconds, and nothing expires for the
    // next minute.
    let drained = drain(&ns, pid)?;
    eprintln!("soak: drained: {}", drained.line());
    let burst = ns.in_ns(|| {
        let server = churn::Server::start(options.threads)?;
        server.churn(options.threads, BURST, None, &INTERRUPTED)
    })?;
    tracer::pause(QUIET)?;
    let end = compare_listed(&ns, pid)?;
    eprintln!(
        "soak: {} connections in a {} s burst, then: {}",
        thousands(burst.connections as f64),
        BURST.as_secs(),
        end.line()
    );
    let cpu = tracer::cpu_split(pid).unwrap_or_default();
    let peak_kib = status("VmHWM:").unwrap_or(0);
    let load_after = tracer::loadavg();
    let stopped = daemon.stop()?;
    if !stopped.status.success() {
        bail!(
            "tcpwatch daemon exited with {}: {}",
            stopped.status,
            stopped.stderr.join(" | ")
        );
    }
    let (summary, counts) =
        tracer::exit_summary(&stopped.stderr).context("the daemon logged no stop line")?;
    let report = Report {
        date: started,
        machine,
        options: options.clone(),
        samples,
        chunks,
        attached_kib,
        start_up_peak_kib,
        peak_kib,
        stopped_at,
        drained,
        burst,
        end,
        summary,
        counts,
        cpu,
        load: (load_before, load_after),
    };
    let text = report.text();
    let json_path = out_dir.join("soak-daemon.json");
    fs::write(
        &json_path,
        serde_json::to_string_pretty(&report.json())? + "\n",
    )
    .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("{text}");
    eprintln!("soak: wrote {}", json_path.display());
    Ok(report.verdicts().iter().all(|v| v.met))
}

/// One sample: seconds since the churn began, the daemon's VmRSS (KiB),
/// the namespace's sockstat `tw`.
type Sample = (f64, u64, u64);

/// Churns inside `ns` at the options' rate for the whole run, sampling the
/// daemon's RSS and the namespace's timewait count meanwhile.
fn churn_and_sample(
    ns: &Netns,
    pid: u32,
    options: &Options,
) -> Result<(Vec<Sample>, Vec<ChurnResult>)> {
    let path = ns.path();
    let (threads, rate, total) = (options.threads, options.rate, options.duration());
    let churner = thread::Builder::new()
        .name("soak-churn".into())
        .spawn(move || -> Result<Vec<ChurnResult>> {
            enter(&path)?;
            let server = churn::Server::start(threads)?;
            let mut chunks: Vec<ChurnResult> = Vec::new();
            let mut done = Duration::ZERO;
            while done < total && !INTERRUPTED.load(Ordering::SeqCst) {
                let chunk = (total - done).min(CHUNK).max(Duration::from_millis(100));
                let r = server.churn(threads, chunk, Some(rate), &INTERRUPTED)?;
                done += Duration::from_secs_f64(r.seconds);
                chunks.push(r);
            }
            Ok(chunks)
        })
        .context("cannot start the churn thread")?;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next = start;
    while !churner.is_finished() {
        if Instant::now() >= next {
            let Some(kib) = vm_rss_kib(pid) else {
                bail!("the daemon (pid {pid}) is gone in the middle of the soak");
            };
            let tw = ns.in_ns(sockstat_tw)?;
            let t = start.elapsed().as_secs_f64();
            samples.push((t, kib, tw));
            if samples.len() % 6 == 1 {
                eprintln!(
                    "soak: {t:>5.0} s: RSS {}, {} timewait sockets",
                    mib(kib),
                    thousands(tw as f64)
                );
            }
            next += SAMPLE;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let chunks = churner
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
    tracer::check_interrupted()?;
    Ok((samples, chunks))
}

/// A GET to the daemon from inside its namespace: the body.
fn get(ns: &Netns, path: &str) -> Result<String> {
    let addr: SocketAddr = LISTEN.parse()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {LISTEN}\r\n\r\n");
    let reply = ns.in_ns(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("cannot connect to the daemon at {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        // The daemon has closed its side: a reset now frees both sockets,
        // where an orderly close would leave one in TIME_WAIT, counted
        // with the churn's by the kernel and the daemon alike.
        abort_on_close(&s)?;
        Ok(reply)
    })?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP reply to {path}: {reply:.200}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or(head));
    }
    Ok(body.to_string())
}

/// SO_LINGER with a zero timeout: closing sends a reset.
fn abort_on_close(s: &TcpStream) -> Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn snapshots_published(ns: &Netns) -> Result<u64> {
    let health: Value = serde_json::from_str(&get(ns, "/healthz")?)?;
    health["snapshots"]
        .as_u64()
        .context("/healthz has no snapshot count")
}

/// The sum of a metric's samples whose labels include every `labels` pair.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
        if metric != name
            || !labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        *found.get_or_insert(0) += v as u64;
    }
    found
}

/// The daemon's figures at its next snapshot, against the kernel's.
struct End {
    /// `/api/timewait` with the namespace's sockstat and `ss` around it.
    comparison: Comparison,
    /// `tcpwatch_timewait_sockets` of the namespace in `/metrics`.
    metrics_timewait: u64,
    /// `tcpwatch_kernel_timewait_sockets`: sockstat `tw` as the daemon read it.
    metrics_kernel: u64,
}

impl End {
    /// The daemon's figures are one count, its sock_diag list's too, and
    /// the kernel's count lies around it (see [`Comparison::agrees`]).
    fn agrees(&self) -> bool {
        self.comparison.agrees() && self.metrics_timewait == self.comparison.own_total()
    }

    /// Every figure is the same number: the daemon's, its sock_diag list,
    /// sockstat before and after, and `ss`.
    fn equal(&self) -> bool {
        let c = &self.comparison;
        let n = self.metrics_timewait;
        self.agrees()
            && [
                c.sockstat_before,
                c.sockstat_after,
                c.ss_time_wait,
                self.metrics_kernel,
            ]
            .iter()
            .all(|k| *k == n)
    }

    fn brief(&self) -> String {
        format!(
            "/metrics {}, {}, ss {}",
            thousands(self.metrics_timewait as f64),
            self.comparison.brief(),
            thousands(self.comparison.ss_time_wait as f64)
        )
    }

    fn json(&self) -> Value {
        json!({
            "metrics_timewait": self.metrics_timewait,
            "metrics_kernel_timewait": self.metrics_kernel,
            "comparison": self.comparison.json(),
        })
    }

    fn line(&self) -> String {
        format!(
            "/metrics: tcpwatch_timewait_sockets {}, tcpwatch_kernel_timewait_sockets {}. {}",
            thousands(self.metrics_timewait as f64),
            thousands(self.metrics_kernel as f64),
            self.comparison.line()
        )
    }
}

/// Waits for the daemon's next snapshot, with the namespace's sockstat
/// `tw` read before and after it, and reads `/metrics` and `/api/timewait`
/// from that one snapshot.
fn compare(ns: &Netns, pid: u32) -> Result<End> {
    for _ in 0..3 {
        let seen = snapshots_published(ns)?;
        let sockstat_before = ns.in_ns(sockstat_tw)?;
        let deadline = Instant::now() + 3 * SAMPLE;
        let published = loop {
            let n = snapshots_published(ns)?;
            if n > seen {
                break n;
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon published no snapshot within {} s",
                    (3 * SAMPLE).as_secs()
                );
            }
            tracer::check_interrupted()?;
            thread::sleep(Duration::from_millis(100));
        };
        let metrics = get(ns, "/metrics")?;
        let timewait = get(ns, "/api/timewait")?;
        if snapshots_published(ns)? != published {
            continue; // A newer snapshot came in between: read again.
        }
        let sockstat_after = ns.in_ns(sockstat_tw)?;
        let ss_time_wait = ns.in_ns(super::ss_time_wait)?;
        let netns = [("netns", ns.name.as_str())];
        return Ok(End {
            metrics_timewait: metric_sum(&metrics, "tcpwatch_timewait_sockets", &netns)
                .context("/metrics has no tcpwatch_timewait_sockets of the namespace")?,
            metrics_kernel: metric_sum(&metrics, "tcpwatch_kernel_timewait_sockets", &netns)
                .unwrap_or(0),
            comparison: Comparison {
                snapshot: serde_json::from_str(&timewait)
                    .with_context(|| format!("/api/timewait is not JSON: {timewait:.200}"))?,
                sockstat_before,
                sockstat_after,
                ss_time_wait,
                churn_attributed: 0,
                rss_kib: vm_rss_kib(pid).unwrap_or(0),
            },
        });
    }
    bail!("the daemon published a new snapshot during every read of /metrics")
}

/// See [`Report::flatness`]: `samples` are (seconds, KiB).
fn flatness(samples: &[(f64, u64)], warm_up_s: f64) -> Option<(u64, u64, f64)> {
    let total = samples.last()?.0;
    let window = FLAT_WINDOW.as_secs_f64().min((total - warm_up_s) / 2.0);
    let peak = |from: f64, to: f64| {
        samples
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, k)| *k)
            .max()
    };
    let first = peak(warm_up_s, warm_up_s + window)?;
    let last = peak(total / 2.0, total)?;
    Some((
        first,
        last,
        100.0 * (last as f64 - first as f64) / first.max(1) as f64,
    ))
}

/// The daemon's first snapshot from now whose figures were checked against
/// the kernel's list: the daemon reads the list of a table this long only
/// every check interval (30 s), and the comparison holds the list's length
/// to the same count as the rest. Within [`LISTED_WITHIN`] of a burst
/// nothing has expired yet; past it, the last snapshot read.
fn compare_listed(ns: &Netns, pid: u32) -> Result<End> {
    let deadline = Instant::now() + LISTED_WITHIN;
    loop {
        let end = compare(ns, pid)?;
        if end.comparison.snapshot["kernel_listed"].is_u64() || Instant::now() > deadline {
            return Ok(end);
        }
    }
}

/// Waits until the namespace has no timewait socket left, then for the
/// daemon's next snapshot.
fn drain(ns: &Netns, pid: u32) -> Result<End> {
    let deadline = Instant::now() + DRAIN;
    while ns.in_ns(sockstat_tw)? > 0 {
        if Instant::now() > deadline {
            bail!(
                "timewait sockets left {} s after the churn",
                DRAIN.as_secs()
            );
        }
        tracer::pause(Duration::from_millis(500))?;
    }
    compare(ns, pid)
}

struct Verdict {
    target: &'static str,
    met: bool,
    detail: String,
}

struct Report {
    date: SystemTime,
    machine: Machine,
    options: Options,
    samples: Vec<Sample>,
    chunks: Vec<ChurnResult>,
    attached_kib: u64,
    start_up_peak_kib: u64,
    /// VmHWM at the end.
    peak_kib: u64,
    /// Just after the paced churn stopped, with the count falling.
    stopped_at: End,
    /// Once every timewait socket had expired.
    drained: End,
    burst: ChurnResult,
    /// After the burst, with the count holding still.
    end: End,
    summary: String,
    counts: Vec<(String, u64)>,
    cpu: (f64, f64),
    load: (String, String),
}

impl Report {
    fn count(&self, label: &str) -> u64 {
        self.counts
            .iter()
            .find(|(l, _)| l.ends_with(label))
            .map_or(0, |(_, n)| *n)
    }

    fn rss(&self) -> Option<RssFigures> {
        let rss: Vec<(f64, u64)> = self.samples.iter().map(|&(t, k, _)| (t, k)).collect();
        RssFigures::of(&rss, self.options.warm_up().as_secs_f64())
    }

    /// Peak against peak: the most RSS in the [`FLAT_WINDOW`] after the
    /// warm-up, the most in the last half, and the growth in percent. A
    /// sample lands between or during the daemon's snapshots, which swing
    /// its RSS by a few MiB, so one sample is not a baseline.
    fn flatness(&self) -> Option<(u64, u64, f64)> {
        let rss: Vec<(f64, u64)> = self.samples.iter().map(|&(t, k, _)| (t, k)).collect();
        flatness(&rss, self.options.warm_up().as_secs_f64())
    }

    fn max_tw(&self) -> u64 {
        self.samples.iter().map(|s| s.2).max().unwrap_or(0)
    }

    fn connections(&self) -> u64 {
        self.chunks.iter().map(|c| c.connections).sum()
    }

    fn seconds(&self) -> f64 {
        self.chunks.iter().map(|c| c.seconds).sum()
    }

    fn verdicts(&self) -> Vec<Verdict> {
        let rss = self.rss();
        let ring_full = self.count("lost_ring_full");
        let target_kib = RSS_TARGET_MB * 1e6 / 1024.0;
        vec![
            Verdict {
                target: "TIME_WAIT table full during the churn",
                met: self.max_tw() >= TW_BUCKETS,
                detail: format!(
                    "sockstat tw at most {} (tcp_max_tw_buckets {})",
                    thousands(self.max_tw() as f64),
                    thousands(TW_BUCKETS as f64)
                ),
            },
            Verdict {
                target: "RSS flat after the warm-up",
                met: self
                    .flatness()
                    .is_some_and(|(_, _, growth)| growth <= RSS_FLAT_PERCENT),
                detail: match self.flatness() {
                    Some((first, last, growth)) => format!(
                        "{growth:+.1}% (last half at most {} against at most {} in the {} s after \
                         the {} s warm-up; target ≤ {RSS_FLAT_PERCENT}%)",
                        mib(last),
                        mib(first),
                        FLAT_WINDOW.as_secs(),
                        self.options.warm_up().as_secs()
                    ),
                    None => "not measured: no sample after the warm-up".into(),
                },
            },
            Verdict {
                target: "RSS at most 40 MB with the table full",
                met: rss
                    .as_ref()
                    .is_some_and(|r| r.last_half_max_kib as f64 <= target_kib),
                detail: match &rss {
                    Some(r) => format!(
                        "{:.1} MB at most in the last half",
                        r.last_half_max_kib as f64 * 1024.0 / 1e6
                    ),
                    None => "not measured".into(),
                },
            },
            Verdict {
                target: "no event lost to a full ring buffer",
                met: ring_full == 0,
                detail: format!(
                    "{} with the ring buffer full; {} skipped by the kernel, counted apart",
                    thousands(ring_full as f64),
                    thousands(self.count("lost_kernel_skipped") as f64)
                ),
            },
            Verdict {
                target: "the daemon's TIME_WAIT count is 0 once all expired",
                met: self.drained.equal() && self.drained.metrics_timewait == 0,
                detail: self.drained.brief(),
            },
            Verdict {
                target: "the daemon's TIME_WAIT count equals the kernel's after a burst",
                met: self.end.equal() && self.end.metrics_timewait > 0,
                detail: format!(
                    "{} connections in {} s; {}",
                    thousands(self.burst.connections as f64),
                    BURST.as_secs(),
                    self.end.brief()
                ),
            },
        ]
    }

    fn text(&self) -> String {
        use std::fmt::Write as _;
        let o = &self.options;
        let mut d = String::new();
        let _ = writeln!(d, "## Daemon soak ({})\n", utc_date(self.date));
        let _ = writeln!(
            d,
            "- Machine: {}; load average {} before, {} after.",
            self.machine.line(),
            self.load.0,
            self.load.1
        );
        let _ = writeln!(
            d,
            "- Run: `tcpwatch daemon --netns NS` (ring {}{}); {} min of churn paced at {}/s ({} client and \
             {} accept threads) in a namespace with tcp_max_tw_buckets {}: {} connections, {}/s \
             on average, {} failed calls; sockstat tw at most {}.",
            o.ring_size.as_deref().unwrap_or("the daemon's default"),
            o.binary
                .as_ref()
                .map(|b| format!("; binary {}", b.display()))
                .unwrap_or_default(),
            o.minutes,
            thousands(f64::from(o.rate)),
            o.threads,
            o.threads,
            thousands(TW_BUCKETS as f64),
            thousands(self.connections() as f64),
            thousands(self.connections() as f64 / self.seconds().max(1e-9)),
            thousands(self.chunks.iter().map(|c| c.errors).sum::<u64>() as f64),
            thousands(self.max_tw() as f64)
        );
        if let Some(r) = self.rss() {
            let _ = writeln!(
                d,
                "- RSS: {} once attached (at most {} while starting), {} after the {} s warm-up, \
                 at most {} in the last half, {} at the end; {}–{} over {} samples; after the \
                 warm-up it moved by {:+.0} KiB per minute (least squares). VmHWM at the end {}.",
                mib(self.attached_kib),
                mib(self.start_up_peak_kib),
                mib(r.after_warm_up_kib),
                o.warm_up().as_secs(),
                mib(r.last_half_max_kib),
                mib(self.stopped_at.comparison.rss_kib),
                mib(r.min_kib),
                mib(r.max_kib),
                self.samples.len(),
                r.slope_kib_per_min,
                mib(self.peak_kib)
            );
        }
        let (user, system) = self.cpu;
        let _ = writeln!(
            d,
            "- Daemon: {} events, {} connections; {:.1} s of CPU ({:.2} cores on average).",
            thousands(self.count("events") as f64),
            thousands(self.count("connections") as f64),
            user + system,
            (user + system) / (self.seconds() + QUIET.as_secs_f64()).max(1e-9)
        );
        let _ = writeln!(
            d,
            "- {} s after the churn stopped (the kernel's count falling by the rate each second, \
             so only a bracket, not a check: {}): {}",
            QUIET.as_secs(),
            if self.stopped_at.agrees() {
                "the daemon's figure lay between sockstat before and after"
            } else {
                "the daemon's figure lay outside sockstat before and after: its snapshot's \
                 sock_diag list was taken before the first sockstat read"
            },
            self.stopped_at.line()
        );
        let _ = writeln!(
            d,
            "- Once every timewait socket expired: {}",
            self.drained.line()
        );
        let _ = writeln!(
            d,
            "- At least {} s after a {} s burst at full rate ({} connections), the first \
             snapshot with the kernel's list: {}",
            QUIET.as_secs(),
            BURST.as_secs(),
            thousands(self.burst.connections as f64),
            self.end.line()
        );
        d.push_str("\n| check | verdict |\n|---|---|\n");
        for v in self.verdicts() {
            let mark = if v.met { "✅ met" } else { "❌ missed" };
            let _ = writeln!(d, "| {} | {mark}: {} |", v.target, v.detail);
        }
        d.push_str("\n| minute | RSS (last sample) | timewait sockets |\n|---:|---:|---:|\n");
        for minute in 1..=o.minutes {
            let t = f64::from(minute) * 60.0;
            if let Some((_, k, tw)) = self.samples.iter().rev().find(|(s, _, _)| *s <= t) {
                let _ = writeln!(d, "| {minute} | {} | {} |", mib(*k), thousands(*tw as f64));
            }
        }
        let _ = writeln!(d, "\nThe daemon's stop line: `{}`", self.summary);
        d
    }

    fn json(&self) -> Value {
        let rss = self.rss();
        json!({
            "date": utc_date(self.date),
            "machine": self.machine.line(),
            "minutes": self.options.minutes,
            "threads": self.options.threads,
            "rate": self.options.rate,
            "ring_size": self.options.ring_size,
            "binary": self.options.binary,
            "tcp_max_tw_buckets": TW_BUCKETS,
            "warm_up_s": self.options.warm_up().as_secs(),
            "connections": self.connections(),
            "churn_seconds": self.seconds(),
            "rss_attached_kib": self.attached_kib,
            "rss_start_up_peak_kib": self.start_up_peak_kib,
            "vm_hwm_end_kib": self.peak_kib,
            "samples": self.samples.iter().map(|(t, k, tw)| json!([t, k, tw])).collect::<Vec<_>>(),
            "rss_growth_percent": rss.as_ref().map(RssFigures::growth_percent),
            "rss_slope_kib_per_min": rss.as_ref().map(|r| r.slope_kib_per_min),
            "cpu_user_s": self.cpu.0,
            "cpu_system_s": self.cpu.1,
            "summary": self.summary,
            "stopped": self.stopped_at.json(),
            "drained": self.drained.json(),
            "burst_connections": self.burst.connections,
            "end": self.end.json(),
            "targets": self.verdicts().iter().map(|v| json!({
                "target": v.target,
                "met": v.met,
                "detail": v.detail,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_take_only_the_labels_asked_for() {
        let text = "# HELP tcpwatch_timewait_sockets x\n\
            tcpwatch_timewait_sockets{netns=\"a\",substate=\"time_wait\"} 131000\n\
            tcpwatch_timewait_sockets{netns=\"a\",substate=\"fin_wait2\"} 72\n\
            tcpwatch_timewait_sockets{netns=\"b\",substate=\"time_wait\"} 5\n\
            tcpwatch_timewait_sockets_total 9\n";
        let ns = [("netns", "a")];
        assert_eq!(
            metric_sum(text, "tcpwatch_timewait_sockets", &ns),
            Some(131_072)
        );
        assert_eq!(
            metric_sum(text, "tcpwatch_timewait_sockets", &[]),
            Some(131_077)
        );
        assert_eq!(
            metric_sum(text, "tcpwatch_kernel_timewait_sockets", &ns),
            None
        );
    }

    #[test]
    fn flatness_compares_peaks_after_the_warm_up() {
        // Swinging 60-66 after a 30 s warm-up, one step up late.
        let samples: Vec<(f64, u64)> = (0..=24)
            .map(|i| {
                let t = 5.0 * f64::from(i);
                let k = if t < 30.0 {
                    40
                } else if i % 2 == 0 {
                    60
                } else {
                    66
                };
                (t, if t >= 110.0 { 70 } else { k })
            })
            .collect();
        let (first, last, growth) = flatness(&samples, 30.0).unwrap();
        assert_eq!((first, last), (66, 70));
        assert!((growth - 100.0 * 4.0 / 66.0).abs() < 1e-9, "{growth}");
        assert!(flatness(&samples[..3], 30.0).is_none());
    }

    #[test]
    fn the_default_rate_fills_the_table_within_a_timewait_lifetime() {
        assert!(u64::from(default_rate()) * 60 >= TW_BUCKETS);
        let short = Options {
            minutes: 2,
            threads: 1,
            rate: default_rate(),
            ring_size: None,
            binary: None,
        };
        assert_eq!(short.warm_up(), Duration::from_secs(60));
    }
}
