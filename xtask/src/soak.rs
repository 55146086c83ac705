//! `cargo xtask soak`: tcpwatch through a long run of connection churn.
//!
//! In a network namespace of its own, the churn generator of the bench
//! ([`crate::churn`]) runs at full rate for `--minutes`, while `tcpwatch
//! timewait --format json --interval 5` traces it from inside the
//! namespace. Every 5 s the soak reads tcpwatch's resident memory. At the
//! end it checks three things and says which held:
//!
//! - **memory**: RSS flat after the warm-up: the most it reached in the
//!   second half of the run is within [`RSS_FLAT_PERCENT`] of what it was
//!   just after the warm-up;
//! - **losses**: no event lost to a full ring buffer (events the kernel
//!   skipped, recursion misses, are counted apart: tcpwatch cannot prevent
//!   them);
//! - **agreement**: once the churn has stopped, tcpwatch's TIME_WAIT total
//!   is the kernel's: its own sock_diag count, and between the namespace's
//!   `/proc/net/sockstat` `tw` read just before and just after the snapshot
//!   (the count only falls once the churn has stopped).
//!
//! The figures are printed, written to target/soak/soak.json, and written
//! into the soak's section of docs/performance.md.

use std::{
    fmt::Write as _,
    fs,
    os::fd::AsRawFd,
    path::Path,
    process::Command,
    sync::{atomic::Ordering, mpsc},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub mod daemon;

use crate::{
    churn::{self, ChurnResult},
    process,
    report::{splice_section, thousands, utc_date, Machine},
    tracer::{self, Output, Ready, Tracer, INTERRUPTED},
    workspace::Workspace,
};

/// Limits of `--minutes` and `--threads` (inclusive).
/// How often RSS is sampled, and tcpwatch's snapshot interval.
const SAMPLE: Duration = Duration::from_secs(5);
/// The churn runs in chunks of this length, for a rate series.
const CHUNK: Duration = Duration::from_secs(30);
/// The warm-up left out of the flatness check: a TIME_WAIT lifetime (60 s,
/// after which timewait sockets are replaced rather than added) and the
/// tables' first growth, or a third of a short run.
const WARM_UP: Duration = Duration::from_secs(90);
/// How much RSS may grow after the warm-up and still be flat.
const RSS_FLAT_PERCENT: f64 = 10.0;
/// After the churn, before the snapshot that is compared with the kernel:
/// tcpwatch drains its ring buffer and lets its last closes settle.
const QUIET: Duration = Duration::from_secs(2);
/// tcpwatch's `--max-sockets` (its default, said in the report).
const MAX_SOCKETS: u32 = 262_144;

/// The part of docs/performance.md the soak writes.
const SOAK_SECTION: &str = "soak";

#[derive(Clone, Debug)]
pub struct Options {
    pub minutes: u32,
    pub threads: u32,
}

impl Options {
    fn duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.minutes) * 60)
    }

    fn warm_up(&self) -> Duration {
        WARM_UP.min(self.duration() / 3)
    }
}

// ---------------------------------------------------------------------------
// Entry point

/// Runs the soak; `Ok(false)` when it ran but a check failed.
pub fn run(ws: &Workspace, options: &Options) -> Result<bool> {
    let (out_dir, binary) = tracer::private_build(
        ws,
        "soak",
        "it loads eBPF programs and makes a network namespace",
    )?;

    tracer::catch_signals();
    let started = SystemTime::now();
    let machine = Machine::read();
    let load_before = tracer::loadavg();
    let ns = Netns::create()?;
    let snapshots_path = out_dir.join("timewait.jsonl");
    let snapshots = fs::File::create(&snapshots_path)
        .with_context(|| format!("cannot create {}", snapshots_path.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(&binary)
        .args(["timewait", "--format", "json", "--interval"])
        .arg(SAMPLE.as_secs().to_string())
        .arg("--max-sockets")
        .arg(MAX_SOCKETS.to_string());
    let mut tracer = Tracer::spawn(cmd, Output::File(snapshots))?;
    tracer.wait_ready(Ready::Tcpwatch)?;
    eprintln!(
        "soak: tcpwatch timewait (pid {}) in network namespace {}; churn for {} min at full \
         rate, RSS every {} s",
        tracer.pid,
        ns.name,
        options.minutes,
        SAMPLE.as_secs()
    );

    let run = soak(&ns, tracer.pid, &snapshots_path, options)?;
    tracer::pause(QUIET)?;
    let end = compare(&ns, &snapshots_path, tracer.pid)?;
    eprintln!("soak: churn over: {}", end.line());
    let cpu = tracer::cpu_split(tracer.pid).unwrap_or_default();
    let load_after = tracer::loadavg();
    let stopped = tracer.stop()?;
    if !stopped.status.success() {
        bail!(
            "tcpwatch exited with {}: {}",
            stopped.status,
            stopped.stderr.join(" | ")
        );
    }
    let (summary, counts) =
        tracer::exit_summary(&stopped.stderr).context("tcpwatch printed no exit summary")?;
    let report = Report {
        date: started,
        machine,
        options: options.clone(),
        run,
        end,
        counts,
        summary,
        cpu,
        load: (load_before, load_after),
    };
    let section = report.section();
    let json_path = out_dir.join("soak.json");
    fs::write(
        &json_path,
        serde_json::to_string_pretty(&report.json())? + "\n",
    )
    .with_context(|| format!("cannot write {}", json_path.display()))?;
    let doc_path = ws.root().join("docs").join("performance.md");
    let page = fs::read_to_string(&doc_path).unwrap_or_default();
    fs::write(&doc_path, splice_section(&page, SOAK_SECTION, &section))
        .with_context(|| format!("cannot write {}", doc_path.display()))?;
    println!("{section}");
    eprintln!(
        "soak: wrote {}, {} and the soak section of {}",
        snapshots_path.display(),
        json_path.display(),
        doc_path.display()
    );
    Ok(report.verdicts().iter().all(|v| v.met))
}

// ---------------------------------------------------------------------------
// The run

/// What the soak saw while the churn ran.
struct Run {
    /// (seconds since the churn started, VmRSS in KiB).
    rss: Vec<(f64, u64)>,
    /// RSS once tcpwatch was attached, before the churn.
    rss_attached_kib: u64,
    chunks: Vec<ChurnResult>,
    /// The comparison made while the churn paused before its last chunk.
    before_end: Comparison,
}

impl Run {
    fn connections(&self) -> u64 {
        self.chunks.iter().map(|c| c.connections).sum()
    }

    fn seconds(&self) -> f64 {
        self.chunks.iter().map(|c| c.seconds).sum()
    }

    fn errors(&self) -> u64 {
        self.chunks.iter().map(|c| c.errors).sum()
    }
}

/// Churns inside `ns` for the whole run, sampling `pid`'s RSS meanwhile.
/// Before the last chunk the churn pauses, and the next snapshot is
/// compared with the kernel's figures: at the very end, the timewait
/// sockets of the last minute may all be expiring at once (at
/// `tcp_max_tw_buckets` the kernel makes them in waves), which says less.
fn soak(ns: &Netns, pid: u32, snapshots: &Path, options: &Options) -> Result<Run> {
    let rss_attached_kib = vm_rss_kib(pid).context("cannot read tcpwatch's RSS")?;
    let path = ns.path();
    let (threads, total) = (options.threads, options.duration());
    let (paused_tx, paused_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let churner = thread::Builder::new()
        .name("soak-churn".into())
        .spawn(move || -> Result<Vec<ChurnResult>> {
            enter(&path)?;
            let server = churn::Server::start(threads)?;
            let pause_at = total.saturating_sub(CHUNK);
            let mut chunks: Vec<ChurnResult> = Vec::new();
            let mut paused = false;
            while !INTERRUPTED.load(Ordering::SeqCst) {
                // Churn time, pauses left out.
                let done = Duration::from_secs_f64(chunks.iter().map(|c| c.seconds).sum());
                if !paused && done >= pause_at {
                    paused = true;
                    if paused_tx.send(()).is_err() || go_rx.recv().is_err() {
                        break;
                    }
                }
                let until = if paused { total } else { pause_at };
                let left = until.saturating_sub(done);
                if paused && left.is_zero() {
                    break;
                }
                let chunk = left.min(CHUNK).max(Duration::from_millis(100));
                chunks.push(server.churn(threads, chunk, None, &INTERRUPTED)?);
            }
            Ok(chunks)
        })
        .context("cannot start the churn thread")?;
    let start = Instant::now();
    let mut rss = Vec::new();
    let mut next = start;
    let mut before_end = None;
    while !churner.is_finished() {
        if Instant::now() >= next {
            let Some(kib) = vm_rss_kib(pid) else {
                bail!("tcpwatch (pid {pid}) is gone in the middle of the soak");
            };
            let t = start.elapsed().as_secs_f64();
            rss.push((t, kib));
            if rss.len() % 12 == 1 {
                eprintln!("soak: {:>5.0} s: RSS {:.1} MiB", t, kib as f64 / 1024.0);
            }
            next += SAMPLE;
        }
        if paused_rx.try_recv().is_ok() {
            tracer::pause(QUIET)?;
            let c = compare(ns, snapshots, pid)?;
            eprintln!(
                "soak: churn paused {} s before the end: {}",
                CHUNK.as_secs(),
                c.line()
            );
            before_end = Some(c);
            let _ = go_tx.send(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    let chunks = churner
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
    tracer::check_interrupted()?;
    Ok(Run {
        rss,
        rss_attached_kib,
        chunks,
        before_end: before_end.context("the churn never paused before its last chunk")?,
    })
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    tracer::status_kib(&status, "VmRSS:")
}

/// A snapshot taken with the churn stopped, against the kernel's figures.
struct Comparison {
    snapshot: Value,
    /// sockstat `tw` in the namespace when the soak began waiting for the
    /// snapshot, and once it had it.
    sockstat_before: u64,
    sockstat_after: u64,
    /// `ss -tanH state time-wait` lines in the namespace right after.
    ss_time_wait: u64,
    /// Timewait sockets tcpwatch gave to this process (the churn).
    churn_attributed: u64,
    /// RSS at the end, with the churn stopped.
    rss_kib: u64,
}

/// Waits for the next snapshot, with the namespace's sockstat `tw` read
/// before and after it.
fn compare(ns: &Netns, snapshots: &Path, pid: u32) -> Result<Comparison> {
    let lines = |p: &Path| -> Vec<String> {
        fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    };
    let seen = lines(snapshots).len();
    let sockstat_before = ns.in_ns(sockstat_tw)?;
    let deadline = Instant::now() + 3 * SAMPLE;
    let line = loop {
        if let Some(l) = lines(snapshots).get(seen) {
            break l.clone();
        }
        if Instant::now() > deadline {
            bail!(
                "tcpwatch wrote no snapshot within {} s",
                (3 * SAMPLE).as_secs()
            );
        }
        tracer::check_interrupted()?;
        thread::sleep(Duration::from_millis(20));
    };
    let sockstat_after = ns.in_ns(sockstat_tw)?;
    let ss_time_wait = ns.in_ns(ss_time_wait)?;
    let snapshot: Value =
        serde_json::from_str(&line).with_context(|| format!("not a JSON snapshot: {line}"))?;
    let me = u64::from(std::process::id());
    let churn_attributed = snapshot["by_process"]
        .as_array()
        .map(|groups| {
            groups
                .iter()
                .filter(|g| g["pid"].as_u64() == Some(me))
                .filter_map(|g| g["count"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    Ok(Comparison {
        snapshot,
        sockstat_before,
        sockstat_after,
        ss_time_wait,
        churn_attributed,
        rss_kib: vm_rss_kib(pid).unwrap_or(0),
    })
}

/// `ss -tanH state time-wait` lines in this thread's namespace.
fn ss_time_wait() -> Result<u64> {
    let out = Command::new("ss")
        .args(["-tanH", "state", "time-wait"])
        .output()
        .context("cannot run ss")?;
    Ok(out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count() as u64)
}

impl Comparison {
    fn field(&self, name: &str) -> u64 {
        self.snapshot[name].as_u64().unwrap_or(0)
    }

    /// tcpwatch's total for this namespace: other namespaces' timewait
    /// sockets (the host's other traffic) are in its total, not in the
    /// namespace's lists.
    fn own_total(&self) -> u64 {
        self.field("total")
            .saturating_sub(self.field("other_netns"))
    }

    /// The total is what sock_diag listed to tcpwatch, and between the
    /// namespace's sockstat read before and after it (the count only falls
    /// with the churn stopped).
    fn agrees(&self) -> bool {
        let total = self.own_total();
        self.snapshot["kernel_listed"].as_u64() == Some(total)
            && self.sockstat_after <= total
            && total <= self.sockstat_before
    }

    fn brief(&self) -> String {
        format!(
            "tcpwatch {}, its sock_diag list {}, sockstat tw {} before and {} after",
            thousands(self.own_total() as f64),
            thousands(self.field("kernel_listed") as f64),
            thousands(self.sockstat_before as f64),
            thousands(self.sockstat_after as f64)
        )
    }

    /// What the snapshot and the kernel said, in words.
    fn line(&self) -> String {
        let n = |f| thousands(self.field(f) as f64);
        format!(
            "tcpwatch counted {} timewait sockets in the namespace (and {} of other \
             namespaces; TIME_WAIT {}, FIN_WAIT2 {} in all); {} made by the churn, {} not seen \
             made (lost events), {} closed in the last moment, {} from before tracing. The \
             kernel: sock_diag listed {} to tcpwatch; sockstat `tw` {} just before the snapshot \
             and {} just after; `ss -tan state time-wait` listed {} right after.",
            thousands(self.own_total() as f64),
            n("other_netns"),
            n("time_wait"),
            n("fin_wait2"),
            thousands(self.churn_attributed as f64),
            n("unattributed"),
            n("just_closed"),
            n("before_tracing"),
            n("kernel_listed"),
            thousands(self.sockstat_before as f64),
            thousands(self.sockstat_after as f64),
            thousands(self.ss_time_wait as f64)
        )
    }

    fn json(&self) -> Value {
        json!({
            "snapshot": self.snapshot,
            "sockstat_before": self.sockstat_before,
            "sockstat_after": self.sockstat_after,
            "ss_time_wait": self.ss_time_wait,
            "churn_attributed": self.churn_attributed,
            "agrees": self.agrees(),
        })
    }
}

// ---------------------------------------------------------------------------
// The namespace

/// A network namespace with loopback up, deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Result<Netns> {
        let name = format!("tcpwatch-soak-{}", std::process::id());
        // A leftover of a killed run with the same pid.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        process::run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        process::run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread inside the namespace.
    fn in_ns<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let path = self.path();
        thread::scope(|s| {
            s.spawn(|| {
                enter(&path)?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread in {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ok = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("soak: could not delete network namespace {}", self.name);
        }
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &str) -> Result<()> {
    let f = fs::File::open(path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: setns(2) on a descriptor we own; it moves only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `tw` of this thread's namespace's /proc/net/sockstat.
fn sockstat_tw() -> Result<u64> {
    let text = fs::read_to_string("/proc/thread-self/net/sockstat")
        .context("cannot read /proc/thread-self/net/sockstat")?;
    parse_sockstat_tw(&text).with_context(|| format!("no TCP tw in sockstat: {text}"))
}

fn parse_sockstat_tw(text: &str) -> Option<u64> {
    let mut words = text
        .lines()
        .find(|l| l.starts_with("TCP:"))?
        .split_whitespace();
    words.find(|w| *w == "tw")?;
    words.next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// Figures

/// RSS after the warm-up: the figures of the flatness check.
#[derive(Debug, PartialEq)]
struct RssFigures {
    /// The first sample after the warm-up.
    after_warm_up_kib: u64,
    /// The most in the second half of the run.
    last_half_max_kib: u64,
    min_kib: u64,
    max_kib: u64,
    /// Least-squares slope of the samples after the warm-up.
    slope_kib_per_min: f64,
}

impl RssFigures {
    fn of(samples: &[(f64, u64)], warm_up_s: f64) -> Option<RssFigures> {
        let total = samples.last()?.0;
        let after: Vec<(f64, u64)> = samples
            .iter()
            .copied()
            .filter(|(t, _)| *t >= warm_up_s)
            .collect();
        let first = after.first()?.1;
        let last_half_max_kib = samples
            .iter()
            .filter(|(t, _)| *t >= total / 2.0)
            .map(|(_, k)| *k)
            .max()?;
        let n = after.len() as f64;
        let mean_t = after.iter().map(|(t, _)| t).sum::<f64>() / n;
        let mean_k = after.iter().map(|(_, k)| *k as f64).sum::<f64>() / n;
        let var = after.iter().map(|(t, _)| (t - mean_t).powi(2)).sum::<f64>();
        let cov = after
            .iter()
            .map(|(t, k)| (t - mean_t) * (*k as f64 - mean_k))
            .sum::<f64>();
        Some(RssFigures {
            after_warm_up_kib: first,
            last_half_max_kib,
            min_kib: samples.iter().map(|(_, k)| *k).min()?,
            max_kib: samples.iter().map(|(_, k)| *k).max()?,
            slope_kib_per_min: if var > 0.0 { 60.0 * cov / var } else { 0.0 },
        })
    }

    /// How much the last half's peak exceeds the first sample after the
    /// warm-up, in percent of it.
    fn growth_percent(&self) -> f64 {
        100.0 * (self.last_half_max_kib as f64 - self.after_warm_up_kib as f64)
            / self.after_warm_up_kib.max(1) as f64
    }
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
    run: Run,
    end: Comparison,
    /// tcpwatch's exit summary (JSON), and its numbers by path.
    summary: String,
    counts: Vec<(String, u64)>,
    /// tcpwatch's user and system CPU seconds over its whole run.
    cpu: (f64, f64),
    /// The load average before and after.
    load: (String, String),
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl Report {
    fn count(&self, label: &str) -> u64 {
        self.counts
            .iter()
            .find(|(l, _)| l == label)
            .map_or(0, |(_, n)| *n)
    }

    fn rss(&self) -> Option<RssFigures> {
        RssFigures::of(&self.run.rss, self.options.warm_up().as_secs_f64())
    }

    fn verdicts(&self) -> Vec<Verdict> {
        let rss = self.rss();
        let ring_full = self.count("stream.lost.ring_full");
        let (paused, end) = (&self.run.before_end, &self.end);
        vec![
            Verdict {
                target: "RSS flat after the warm-up",
                met: rss
                    .as_ref()
                    .is_some_and(|r| r.growth_percent() <= RSS_FLAT_PERCENT),
                detail: match &rss {
                    Some(r) => format!(
                        "{:+.1}% (last half at most {} against {} just after the warm-up; \
                         target ≤ {RSS_FLAT_PERCENT}%)",
                        r.growth_percent(),
                        mib(r.last_half_max_kib),
                        mib(r.after_warm_up_kib)
                    ),
                    None => "not measured: no sample after the warm-up".into(),
                },
            },
            Verdict {
                target: "no event lost to a full ring buffer",
                met: ring_full == 0,
                detail: format!(
                    "{} with the ring buffer full; {} skipped by the kernel, counted apart",
                    thousands(ring_full as f64),
                    thousands(self.count("stream.lost.skipped") as f64)
                ),
            },
            Verdict {
                target: "TIME_WAIT total agrees with the kernel's with the churn stopped",
                met: paused.agrees() && end.agrees(),
                detail: format!(
                    "paused {} s before the end: {}; at the end: {}",
                    CHUNK.as_secs(),
                    paused.brief(),
                    end.brief()
                ),
            },
        ]
    }

    fn rates(&self) -> (f64, f64, f64) {
        let rates: Vec<f64> = self
            .run
            .chunks
            .iter()
            .map(ChurnResult::per_second)
            .collect();
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        let mean = self.run.connections() as f64 / self.run.seconds().max(1e-9);
        (mean, if min.is_finite() { min } else { 0.0 }, max)
    }

    /// The soak's section of docs/performance.md.
    fn section(&self) -> String {
        let o = &self.options;
        let mut d = String::new();
        d.push_str("## Soak\n\n");
        d.push_str(
            "This section is written by `cargo xtask soak` (as root); `cargo xtask bench` keeps \
             it. In a network namespace of its own, the bench's churn generator runs at full \
             rate while `tcpwatch timewait --format json --interval 5` traces it from inside the \
             namespace; tcpwatch's RSS (VmRSS) is read every 5 s. The figures, sample by \
             sample, are in `target/soak/soak.json`.\n\n",
        );
        let (mean, min, max) = self.rates();
        let _ = writeln!(d, "- Date: {}", utc_date(self.date));
        let _ = writeln!(
            d,
            "- Machine: {}; load average {} before, {} after.",
            self.machine.line(),
            self.load.0,
            self.load.1
        );
        let _ = writeln!(
            d,
            "- Run: {} min of churn, {} client and {} accept threads: {} connections, {} \
             connections/s on average ({}–{} over {} s chunks), {} failed calls.",
            o.minutes,
            o.threads,
            o.threads,
            thousands(self.run.connections() as f64),
            thousands(mean),
            thousands(min),
            thousands(max),
            CHUNK.as_secs(),
            thousands(self.run.errors() as f64)
        );
        if let Some(r) = self.rss() {
            let _ = writeln!(
                d,
                "- RSS: {} once attached, {} after the {} s warm-up, at most {} in the last \
                 half, {} at the end; {}–{} over {} samples; after the warm-up it moved by {:+.0} \
                 KiB per minute (least squares).",
                mib(self.run.rss_attached_kib),
                mib(r.after_warm_up_kib),
                o.warm_up().as_secs(),
                mib(r.last_half_max_kib),
                mib(self.end.rss_kib),
                mib(r.min_kib),
                mib(r.max_kib),
                self.run.rss.len(),
                r.slope_kib_per_min
            );
        }
        let events = self.count("stream.events");
        let lost = self.count("stream.lost.total");
        let (user, system) = self.cpu;
        let _ = writeln!(
            d,
            "- Events: {} taken by tcpwatch; {} lost ({} with the ring buffer full, {} skipped \
             by the kernel: {:.3}% of all). tcpwatch used {:.1} s of CPU ({:.0}% system), {:.2} \
             cores on average, {:.2} µs per event taken.",
            thousands(events as f64),
            thousands(lost as f64),
            thousands(self.count("stream.lost.ring_full") as f64),
            thousands(self.count("stream.lost.skipped") as f64),
            100.0 * lost as f64 / (events + lost).max(1) as f64,
            user + system,
            100.0 * system / (user + system).max(1e-9),
            (user + system) / (self.run.seconds() + QUIET.as_secs_f64()).max(1e-9),
            1e6 * (user + system) / events.max(1) as f64
        );
        let _ = writeln!(
            d,
            "- With the churn paused {} s before the end, {} s after it stopped: {}",
            CHUNK.as_secs(),
            QUIET.as_secs(),
            self.run.before_end.line()
        );
        let _ = writeln!(
            d,
            "- At the end, {} s after the churn: {}",
            QUIET.as_secs(),
            self.end.line()
        );
        let _ = writeln!(
            d,
            "- tcpwatch's socket table: {} tracked at peak (limit {}), {} evicted, {} dropped \
             as closed while their events were lost, {} tracked at exit.",
            thousands(self.count("tracking.peak") as f64),
            thousands(f64::from(MAX_SOCKETS)),
            thousands(self.count("tracking.evicted") as f64),
            thousands(self.count("tracking.stale") as f64),
            thousands(self.count("tracking.at_exit") as f64)
        );
        d.push_str("\n| target | verdict |\n|---|---|\n");
        for v in self.verdicts() {
            let mark = if v.met { "✅ met" } else { "❌ missed" };
            let _ = writeln!(d, "| {} | {mark}: {} |", v.target, v.detail);
        }
        d.push_str("\n| minute | RSS (last sample) | connections/s |\n|---:|---:|---:|\n");
        for minute in 1..=o.minutes {
            let t = f64::from(minute) * 60.0;
            let rss = self
                .run
                .rss
                .iter()
                .rev()
                .find(|(s, _)| *s <= t)
                .map_or("—".into(), |(_, k)| mib(*k));
            let (made, secs) = self.chunks_in(t - 60.0, t);
            let rate = if secs > 0.0 {
                thousands(made as f64 / secs)
            } else {
                "—".into()
            };
            let _ = writeln!(d, "| {minute} | {rss} | {rate} |");
        }
        let _ = writeln!(d, "\ntcpwatch's exit summary: `{}`", self.summary);
        d
    }

    /// Connections and seconds of the chunks that ended in (from, to].
    fn chunks_in(&self, from: f64, to: f64) -> (u64, f64) {
        let mut t = 0.0;
        let (mut made, mut secs) = (0, 0.0);
        for c in &self.run.chunks {
            t += c.seconds;
            if t > from && t <= to + 1.0 {
                made += c.connections;
                secs += c.seconds;
            }
        }
        (made, secs)
    }

    fn json(&self) -> Value {
        let rss = self.rss();
        json!({
            "date": utc_date(self.date),
            "machine": self.machine.line(),
            "minutes": self.options.minutes,
            "threads": self.options.threads,
            "warm_up_s": self.options.warm_up().as_secs(),
            "connections": self.run.connections(),
            "churn_seconds": self.run.seconds(),
            "errors": self.run.errors(),
            "chunks": self.run.chunks.iter().map(|c| json!({
                "connections": c.connections,
                "seconds": c.seconds,
                "errors": c.errors,
            })).collect::<Vec<_>>(),
            "rss_attached_kib": self.run.rss_attached_kib,
            "rss_kib": self.run.rss.iter().map(|(t, k)| json!([t, k])).collect::<Vec<_>>(),
            "rss_end_kib": self.end.rss_kib,
            "rss_growth_percent": rss.as_ref().map(RssFigures::growth_percent),
            "rss_slope_kib_per_min": rss.as_ref().map(|r| r.slope_kib_per_min),
            "cpu_user_s": self.cpu.0,
            "cpu_system_s": self.cpu.1,
            "loadavg_before": self.load.0,
            "loadavg_after": self.load.1,
            "summary": self.summary,
            "comparisons": {
                "paused": self.run.before_end.json(),
                "end": self.end.json(),
            },
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
    fn rss_figures_take_the_warm_up_out() {
        // Rising during the warm-up, then flat with a bump.
        let samples: Vec<(f64, u64)> = (0..20)
            .map(|i| {
                let t = 5.0 * f64::from(i);
                let k = if t < 30.0 {
                    1000 + 100 * i as u64
                } else {
                    2000
                };
                (t, if i == 15 { 2100 } else { k })
            })
            .collect();
        let r = RssFigures::of(&samples, 30.0).unwrap();
        assert_eq!(r.after_warm_up_kib, 2000);
        assert_eq!(r.last_half_max_kib, 2100);
        assert_eq!((r.min_kib, r.max_kib), (1000, 2100));
        assert!((r.growth_percent() - 5.0).abs() < 1e-9);
        assert!(r.slope_kib_per_min.abs() < 200.0, "{r:?}");
        assert!(RssFigures::of(&samples[..3], 30.0).is_none());
    }

    #[test]
    fn sockstat_tw_is_read() {
        let text = "sockets: used 5\nTCP: inuse 3 orphan 0 tw 131072 alloc 4 mem 1\nUDP: inuse 0\n";
        assert_eq!(parse_sockstat_tw(text), Some(131_072));
        assert_eq!(parse_sockstat_tw("TCP: inuse 3\n"), None);
    }
}
