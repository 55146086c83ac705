//! `cargo xtask bench`: what tracing costs a host that opens and closes TCP
//! connections as fast as it can.
//!
//! The in-process churn generator ([`crate::churn`]) runs once per variant
//! per round: no tracer (the baseline), the empty program on the same
//! tracepoint (`tcpwatch bench floor`, the floor), tcpwatch's `trace`,
//! `conns` and `timewait`, and bpftrace printing every transition as bcc's
//! tcpstates does. The variants are interleaved, each round in a rotated
//! order, so machine noise hits them alike, and each is compared with the
//! baseline of its own round. For each tracer the bench reads its own
//! figures (transitions seen, events lost) from its exit summary, its CPU
//! time from /proc/PID/stat, its peak RSS from /proc/PID/status, and the
//! kernel time of each of its programs (`run_time_ns / run_cnt`, with
//! `kernel.bpf_stats_enabled` set to 1 for the duration). Two offline
//! figures come from the binary itself (`tcpwatch bench correlator`,
//! `tcpwatch bench memory`). The results go to target/bench/bench.json,
//! target/bench/bench.md and docs/performance.md.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    os::fd::{FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::Ordering,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::{
    churn::{self, ChurnResult},
    process,
    report::{splice_section, thousands, utc_date, Machine, BENCH_SECTION},
    setup,
    tracer::{
        catch_signals, check_interrupted, cpu_seconds, cpu_split, describe_status, exit_summary,
        loadavg, lost_in, pause, private_build, status_kib, Output, Ready, Tracer, INTERRUPTED,
    },
    workspace::Workspace,
};

/// Churn before the first round, unreported: fills the TIME_WAIT table so
/// that the first variant measured does not run on an empty one.
const WARM_UP: Duration = Duration::from_secs(2);
/// After a tracer says it is attached, before the churn: its start-up work
/// (socket snapshots) finishes outside the measured window.
const SETTLE: Duration = Duration::from_millis(500);
/// After the churn, before the tracer stops: it drains its ring buffer.
const DRAIN: Duration = Duration::from_millis(500);

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// bpftrace doing what bcc's tcpstates does: one line per transition with
/// time, socket, pid, comm, addresses, ports and both states. (IPv4
/// addresses only: the churn is IPv4.)
const BPFTRACE_SCRIPT: &str = r#"
BEGIN
{
    @state[1] = "ESTABLISHED"; @state[2] = "SYN_SENT"; @state[3] = "SYN_RECV";
    @state[4] = "FIN_WAIT1"; @state[5] = "FIN_WAIT2"; @state[6] = "TIME_WAIT";
    @state[7] = "CLOSE"; @state[8] = "CLOSE_WAIT"; @state[9] = "LAST_ACK";
    @state[10] = "LISTEN"; @state[11] = "CLOSING"; @state[12] = "NEW_SYN_RECV";
    printf("READY\n");
}

tracepoint:sock:inet_sock_set_state
/args->protocol == 6/
{
    printf("%lu %llx %d %s %s %d %s %d %s -> %s\n", nsecs / 1000, args->skaddr, pid, comm,
        ntop(args->saddr), args->sport, ntop(args->daddr), args->dport,
        @state[args->oldstate], @state[args->newstate]);
}

END
{
    clear(@state);
}
"#;

/// Options of `cargo xtask bench`.
#[derive(Clone, Debug)]
pub struct Options {
    pub rounds: u32,
    pub seconds: u32,
    pub threads: u32,
    pub server_threads: Option<u32>,
    pub bpftrace: bool,
    /// Connections per second of the paced (unsaturated) phase.
    pub rate: u32,
}

impl Options {
    fn server_threads(&self) -> u32 {
        self.server_threads.unwrap_or(self.threads)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.seconds))
    }
}

/// What is measured in each round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Variant {
    Baseline,
    Floor,
    Trace,
    Conns,
    Timewait,
    Daemon,
    /// The daemon with one record per socket (`TCPWATCH_PER_SOCKET`), to
    /// compare with the one record per transition it sends by default.
    DaemonPerSocket,
    Bpftrace,
}

impl Variant {
    const ALL: [Variant; 8] = [
        Variant::Baseline,
        Variant::Floor,
        Variant::Trace,
        Variant::Conns,
        Variant::Timewait,
        Variant::Daemon,
        Variant::DaemonPerSocket,
        Variant::Bpftrace,
    ];

    fn key(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Floor => "floor",
            Variant::Trace => "trace",
            Variant::Conns => "conns",
            Variant::Timewait => "timewait",
            Variant::Daemon => "daemon",
            Variant::DaemonPerSocket => "daemon_per_socket",
            Variant::Bpftrace => "bpftrace",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Baseline => "no tracer (baseline)",
            Variant::Floor => "empty program (`tcpwatch bench floor`)",
            Variant::Trace => "`tcpwatch trace --format json`",
            Variant::Conns => "`tcpwatch conns`",
            Variant::Timewait => "`tcpwatch timewait`",
            Variant::Daemon => "`tcpwatch daemon`",
            Variant::DaemonPerSocket => {
                "`tcpwatch daemon`, one record per socket (`TCPWATCH_PER_SOCKET=1`)"
            }
            Variant::Bpftrace => "bpftrace, tcpstates-like printf",
        }
    }

    /// tcpwatch's real modes, which the targets are about.
    fn is_mode(self) -> bool {
        matches!(
            self,
            Variant::Trace | Variant::Conns | Variant::Timewait | Variant::Daemon
        )
    }

    /// The modes meant to run all the time, with the tightest targets
    /// (`trace` prints every transition and has looser ones).
    fn is_always_on(self) -> bool {
        matches!(self, Variant::Conns | Variant::Timewait | Variant::Daemon)
    }

    /// The arguments for tcpwatch, if this variant runs it (the daemon's
    /// listening address is added by [`Bench::tracer_command`]).
    fn tcpwatch_args(self) -> Option<&'static [&'static str]> {
        match self {
            Variant::Floor => Some(&["bench", "floor"]),
            Variant::Trace => Some(&["trace", "--format", "json"]),
            Variant::Conns => Some(&["conns", "--format", "json"]),
            Variant::Timewait => Some(&["timewait", "--format", "json"]),
            Variant::Daemon | Variant::DaemonPerSocket => Some(&["daemon", "--log-format", "json"]),
            Variant::Baseline | Variant::Bpftrace => None,
        }
    }

    /// The start of the name (15 characters at most, as the kernel keeps
    /// it) of the program attached to sock:inet_sock_set_state.
    fn state_program(self) -> &'static str {
        match self {
            Variant::Floor => "bench_floor",
            _ => "inet_sock_set_s",
        }
    }
}

/// The two loads every variant is measured under, one after the other
/// with the same tracer process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Phase {
    /// A fixed rate the machine keeps up with (`--rate`): what tracing
    /// costs in CPU per connection.
    Paced,
    /// As fast as the generator goes: how much throughput tracing takes.
    Saturated,
}

impl Phase {
    const ALL: [Phase; 2] = [Phase::Paced, Phase::Saturated];

    fn key(self) -> &'static str {
        match self {
            Phase::Paced => "paced",
            Phase::Saturated => "saturated",
        }
    }
}

// ---------------------------------------------------------------------------
// Entry point

/// Runs the whole benchmark and writes its reports.
pub fn run(ws: &Workspace, options: &Options) -> Result<()> {
    let (out_dir, binary) = private_build(
        ws,
        "bench",
        "it loads eBPF programs and sets kernel.bpf_stats_enabled",
    )?;

    let bpftool = match setup::ensure_tool(ws, "bpftool", "bpftool") {
        Ok(path) => Some(path),
        Err(e) => {
            eprintln!(
                "bench: no bpftool ({e:#}); programs are named by id, the figures come from \
                 /proc/PID/fdinfo"
            );
            None
        }
    };
    let mut skipped: Vec<(Variant, String)> = Vec::new();
    let bpftrace = if options.bpftrace {
        match setup::ensure_tool(ws, "bpftrace", "bpftrace") {
            Ok(path) => Some(path),
            Err(e) => {
                skipped.push((Variant::Bpftrace, format!("bpftrace unavailable: {e:#}")));
                None
            }
        }
    } else {
        skipped.push((Variant::Bpftrace, "left out with --no-bpftrace".into()));
        None
    };

    catch_signals();
    let started = SystemTime::now();
    let machine = Machine::read();
    let mut bench = Bench {
        options: options.clone(),
        binary,
        bpftrace,
        bpftool,
        server: None,
    };
    let mut variants: Vec<Variant> = Variant::ALL.to_vec();
    if bench.bpftrace.is_none() {
        variants.retain(|&v| v != Variant::Bpftrace);
    }

    let mut samples: Vec<Sample> = Vec::new();
    let mut conditions = Conditions {
        load_before: loadavg(),
        ..Conditions::default()
    };
    {
        let stats = BpfStats::enable()?;
        eprintln!(
            "bench: kernel.bpf_stats_enabled=1 for the run (was {}; restored at the end)",
            stats.previous
        );
        bench.server = Some(churn::Server::start(options.server_threads())?);
        eprintln!(
            "bench: churn server on 127.0.0.1:{} ({} accept threads); warming up for {} s",
            bench.server().port(),
            options.server_threads(),
            WARM_UP.as_secs()
        );
        let warm = bench.churn(WARM_UP, Phase::Saturated)?;
        eprintln!(
            "bench: warm-up {:.0} connections/s",
            warm.per_second().round()
        );
        for round in 0..options.rounds as usize {
            let order: Vec<Variant> = (0..variants.len())
                .map(|k| variants[(k + round) % variants.len()])
                .collect();
            for variant in order {
                if !variants.contains(&variant) {
                    continue;
                }
                check_interrupted()?;
                match bench.measure(variant, round) {
                    Ok(measured) => {
                        for sample in measured {
                            eprintln!("bench: {}", sample.one_line());
                            samples.push(sample);
                        }
                    }
                    Err(e)
                        if variant == Variant::Bpftrace && !INTERRUPTED.load(Ordering::SeqCst) =>
                    {
                        eprintln!("bench: leaving bpftrace out: {e:#}");
                        skipped.push((variant, format!("{e:#}")));
                        variants.retain(|&v| v != Variant::Bpftrace);
                        samples.retain(|s| s.variant != Variant::Bpftrace);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        bench.server = None;
        drop(stats);
    }
    conditions.load_after = loadavg();

    eprintln!("bench: offline figures (correlator, memory)");
    let correlator = bench.offline(&["bench", "correlator", "--events", "10000000"]);
    let memory = bench.offline(&["bench", "memory", "--connections", "1000000"]);

    let report = Report {
        date: started,
        machine,
        options: options.clone(),
        conditions,
        rows: Phase::ALL
            .iter()
            .flat_map(|&p| variants.iter().map(move |&v| (v, p)))
            .map(|(v, p)| Row::of(v, p, &samples))
            .collect(),
        samples,
        correlator,
        memory,
        skipped,
    };
    let markdown = report.table();
    let json = report.json();
    let json_path = out_dir.join("bench.json");
    let md_path = out_dir.join("bench.md");
    fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    fs::write(&md_path, &markdown)
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    let docs = ws.root().join("docs");
    fs::create_dir_all(&docs).with_context(|| format!("cannot create {}", docs.display()))?;
    let doc_path = docs.join("performance.md");
    // Other tasks' sections of the page (the soak's) are kept.
    let page = fs::read_to_string(&doc_path).unwrap_or_default();
    let page = splice_section(&page, BENCH_SECTION, &report.document());
    fs::write(&doc_path, page).with_context(|| format!("cannot write {}", doc_path.display()))?;
    println!("{markdown}");
    println!("{}", report.targets_markdown());
    for caveat in report.caveats() {
        println!("caution: {caveat}");
    }
    eprintln!(
        "bench: wrote {}, {} and {}",
        json_path.display(),
        md_path.display(),
        doc_path.display()
    );
    Ok(())
}

struct Bench {
    options: Options,
    binary: PathBuf,
    bpftrace: Option<PathBuf>,
    bpftool: Option<PathBuf>,
    server: Option<churn::Server>,
}

impl Bench {
    fn server(&self) -> &churn::Server {
        self.server.as_ref().expect("the churn server runs")
    }

    fn churn(&self, duration: Duration, phase: Phase) -> Result<ChurnResult> {
        let rate = (phase == Phase::Paced).then_some(self.options.rate);
        let r = self
            .server()
            .churn(self.options.threads, duration, rate, &INTERRUPTED)?;
        check_interrupted()?;
        Ok(r)
    }

    fn tracer_command(&self, variant: Variant) -> Result<Option<(Command, Output)>> {
        if let Some(args) = variant.tcpwatch_args() {
            let mut cmd = Command::new(&self.binary);
            cmd.args(args);
            if matches!(variant, Variant::Daemon | Variant::DaemonPerSocket) {
                cmd.args(["--listen", &free_loopback_address()?]);
            }
            if variant == Variant::DaemonPerSocket {
                cmd.env("TCPWATCH_PER_SOCKET", "1");
            }
            return Ok(Some((cmd, Output::Discard)));
        }
        if variant == Variant::Bpftrace {
            let Some(bpftrace) = &self.bpftrace else {
                return Ok(None);
            };
            let mut cmd = Command::new(bpftrace);
            cmd.args(["-e", BPFTRACE_SCRIPT]);
            return Ok(Some((cmd, Output::Count)));
        }
        Ok(None)
    }

    /// One variant of one round: start the tracer and wait until it is
    /// attached, then for each [`Phase`] churn and read its figures; stop
    /// it and wait for it.
    fn measure(&self, variant: Variant, round: usize) -> Result<Vec<Sample>> {
        let mut tracer = match self.tracer_command(variant)? {
            Some((cmd, output)) => {
                let mut t = Tracer::spawn(cmd, output)?;
                t.wait_ready(match variant {
                    Variant::Bpftrace => Ready::BpftraceBegin,
                    Variant::Daemon | Variant::DaemonPerSocket => Ready::Daemon,
                    _ => Ready::Tcpwatch,
                })?;
                Some(t)
            }
            None => None,
        };
        pause(SETTLE)?;
        let tracer_pid = tracer.as_ref().map(|t| t.pid);
        let names = if tracer.is_some() {
            self.program_names()
        } else {
            HashMap::new()
        };
        let mut samples = Vec::new();
        for phase in Phase::ALL {
            let before = tracer.as_ref().map(reading);
            let foreign_before = foreign_tracers(tracer_pid);
            let cpu_before = CpuTimes::now(tracer_pid);
            let churn = self.churn(self.options.duration(), phase)?;
            let cpu_after = CpuTimes::now(tracer_pid);
            let foreign: Vec<Foreign> = foreign_before
                .into_iter()
                .map(|mut f| {
                    let now = cpu_seconds(f.pid).unwrap_or(f.cores);
                    f.cores = (now - f.cores).max(0.0) / churn.seconds.max(1e-9);
                    f
                })
                .collect();
            pause(DRAIN)?;
            let mut sample = Sample {
                variant,
                phase,
                round,
                load: cpu_after.since(&cpu_before),
                foreign,
                churn,
                ..Sample::default()
            };
            if let (Some(t), Some(before)) = (&tracer, before) {
                sample.window(&before, &reading(t), &names);
                sample.peak_rss = vm_hwm(t.pid);
            }
            samples.push(sample);
        }
        let Some(t) = tracer.take() else {
            return Ok(samples);
        };
        let stopped = t.stop()?;
        // What the tracer says of its whole run goes with the saturated
        // phase, where losses happen.
        let run_connections = samples.iter().map(|s| s.churn.connections).sum();
        let sample = samples.last_mut().expect("one sample per phase");
        sample.run_connections = run_connections;
        sample.exit = Some(describe_status(stopped.status));
        if !stopped.status.success() {
            sample
                .notes
                .push(format!("exited with {}", describe_status(stopped.status)));
        }
        match variant {
            Variant::Bpftrace => {
                let lost = stopped.stdout_lost + lost_in(&stopped.stderr);
                sample.seen = Some(stopped.stdout_events);
                sample.lost = Some(lost);
                sample.buffer_full = Some(lost);
            }
            Variant::Floor => {}
            _ => {
                let summary = exit_summary(&stopped.stderr);
                if let Some((_, counts)) = &summary {
                    let get =
                        |label: &str| counts.iter().find(|(l, _)| l == label).map(|&(_, n)| n);
                    sample.seen = get("transitions_seen")
                        .or_else(|| get("stream.events"))
                        .or_else(|| get("events"));
                    sample.buffer_full =
                        get("stream.lost.ring_full").or_else(|| get("lost_ring_full"));
                    sample.skipped =
                        get("stream.lost.skipped").or_else(|| get("lost_kernel_skipped"));
                    sample.lost = get("stream.lost.total")
                        .or_else(|| Some(sample.buffer_full? + sample.skipped?));
                } else {
                    sample.notes.push(format!(
                        "no exit summary on stderr: {}",
                        stopped.stderr.join(" | ")
                    ));
                }
                sample.summary = summary.map(|(line, _)| line);
            }
        }
        for line in &stopped.stderr {
            let notable = ["degraded", "warning", "error", "ERROR", "WARN"]
                .iter()
                .any(|w| line.contains(w));
            // bpftrace cannot raise RLIMIT_MEMLOCK here (no CAP_SYS_RESOURCE),
            // which this kernel does not need: not worth a note.
            if notable && !line.contains("RLIMIT_MEMLOCK") {
                sample.notes.push(line.clone());
            }
        }
        Ok(samples)
    }

    /// Program names by id, from `bpftool prog show --json`.
    fn program_names(&self) -> HashMap<u64, String> {
        self.bpftool_programs()
            .into_iter()
            .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
            .collect()
    }

    fn bpftool_programs(&self) -> Vec<Value> {
        let Some(bpftool) = &self.bpftool else {
            return Vec::new();
        };
        process::probe(Command::new(bpftool).args(["prog", "show", "--json"]))
            .and_then(|out| serde_json::from_str::<Value>(&out).ok())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Runs `tcpwatch args` and parses the JSON it prints.
    fn offline(&self, args: &[&str]) -> std::result::Result<Value, String> {
        check_interrupted().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(args);
        let output = cmd
            .output()
            .map_err(|e| format!("cannot run `{}`: {e}", process::display(&cmd)))?;
        if !output.status.success() {
            return Err(format!(
                "`{}` failed ({}): {}",
                process::display(&cmd),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let value = serde_json::from_str::<Value>(text.trim())
            .map_err(|e| format!("`{}` printed no JSON ({e}): {text}", process::display(&cmd)))?;
        eprintln!("bench: {}: {value}", process::display(&cmd));
        Ok(value)
    }
}

// ---------------------------------------------------------------------------
// kernel.bpf_stats_enabled

/// Sets kernel.bpf_stats_enabled to 1 and restores the previous value when
/// dropped. It also holds a `BPF_ENABLE_STATS` descriptor, which keeps the
/// statistics on even if someone else writes 0 to the sysctl meanwhile, and
/// which the kernel releases by itself should xtask be killed.
struct BpfStats {
    previous: String,
    _held: Option<OwnedFd>,
}

/// bpf(2) command and statistics type (include/uapi/linux/bpf.h).
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let previous = fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("cannot read {BPF_STATS_SYSCTL}"))?
            .trim()
            .to_string();
        fs::write(BPF_STATS_SYSCTL, "1")
            .with_context(|| format!("cannot enable BPF statistics ({BPF_STATS_SYSCTL})"))?;
        Ok(BpfStats {
            previous,
            _held: enable_stats_fd(),
        })
    }
}

/// A descriptor that keeps BPF run-time statistics enabled while open.
fn enable_stats_fd() -> Option<OwnedFd> {
    // union bpf_attr's enable_stats member is one u32; the kernel wants the
    // rest of the size it is told about zeroed.
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_STATS_RUN_TIME);
    // SAFETY: `attr` is a zeroed buffer of the size passed, valid for the
    // call; the kernel only reads it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    // SAFETY: a non-negative return is a new descriptor owned by no one else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS_SYSCTL, &self.previous) {
            eprintln!(
                "bench: cannot restore kernel.bpf_stats_enabled={}: {e}; run: sysctl -w \
                 kernel.bpf_stats_enabled={}",
                self.previous, self.previous
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Tracer processes

/// One kernel program's counters, from /proc/PID/fdinfo.
#[derive(Clone, Copy, Debug, Default)]
struct ProgramCounters {
    run_time_ns: u64,
    run_cnt: u64,
    recursion_misses: u64,
}

/// A tracer's CPU time and its programs' counters at one moment.
struct Reading {
    /// User and system CPU seconds (tick-sampled).
    cpu: (f64, f64),
    /// Scheduler run time of its threads, nanoseconds.
    sched_ns: Option<u64>,
    programs: BTreeMap<u64, ProgramCounters>,
}

fn reading(tracer: &Tracer) -> Reading {
    Reading {
        cpu: cpu_split(tracer.pid).unwrap_or_default(),
        sched_ns: sched_runtime_ns(tracer.pid),
        programs: bpf_programs_of(tracer.pid),
    }
}

// ---------------------------------------------------------------------------
// /proc readings

/// Another process holding BPF tracing programs.
#[derive(Clone, Debug)]
struct Foreign {
    pid: u32,
    command: String,
    programs: usize,
    /// Its CPU seconds when found; cores over the churn once measured.
    cores: f64,
}

/// BPF program types that run on kernel events: kprobe, tracepoint,
/// perf_event, raw_tracepoint, raw_tracepoint_writable, tracing.
const TRACING_PROG_TYPES: &[u64] = &[2, 5, 7, 17, 24, 26];

/// Processes, other than xtask and `tracer`, that hold descriptors of BPF
/// tracing programs: they see the churn's transitions too.
fn foreign_tracers(tracer: Option<u32>) -> Vec<Foreign> {
    let me = std::process::id();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || Some(pid) == tracer {
            continue;
        }
        let programs = bpf_program_types_of(pid)
            .iter()
            .filter(|t| TRACING_PROG_TYPES.contains(t))
            .count();
        if programs == 0 {
            continue;
        }
        let command = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                let words: Vec<String> = raw
                    .split(|&b| b == 0)
                    .filter(|w| !w.is_empty())
                    .map(|w| String::from_utf8_lossy(w).into_owned())
                    .collect();
                words.join(" ")
            })
            .unwrap_or_default();
        let command: String = command.chars().take(80).collect();
        out.push(Foreign {
            pid,
            command,
            programs,
            cores: cpu_seconds(pid).unwrap_or(0.0),
        });
    }
    out
}

/// The types of the distinct BPF programs a process holds descriptors of.
fn bpf_program_types_of(pid: u32) -> Vec<u64> {
    let mut seen = BTreeMap::new();
    for info in bpf_program_fdinfo(pid) {
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(id), Some(kind)) = (field("prog_id:"), field("prog_type:")) {
            seen.insert(id, kind);
        }
    }
    seen.into_values().collect()
}

/// The /proc/PID/fdinfo text of each BPF program descriptor `pid` holds.
fn bpf_program_fdinfo(pid: u32) -> Vec<String> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter(|fd| {
            fs::read_link(fd.path())
                .map(|target| target.as_os_str() == "anon_inode:bpf-prog")
                .unwrap_or(false)
        })
        .filter_map(|fd| {
            let info_path = Path::new("/proc")
                .join(pid.to_string())
                .join("fdinfo")
                .join(fd.file_name());
            fs::read_to_string(info_path).ok()
        })
        .collect()
}

/// A loopback address with a port free at the moment, for the daemon's
/// HTTP listener.
fn free_loopback_address() -> Result<String> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free loopback port for the daemon")?;
    Ok(probe
        .local_addr()
        .context("cannot read the probe listener's address")?
        .to_string())
}

/// The run time of all a process's threads on the CPU, in nanoseconds
/// (/proc/PID/schedstat's first field, summed over /proc/PID/task). Exact,
/// but on a kernel without CONFIG_IRQ_TIME_ACCOUNTING it also holds the
/// softirq work that ran while one of its threads was current.
fn sched_runtime_ns(pid: u32) -> Option<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let stat = fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Peak resident set size (VmHWM) in bytes.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&status, "VmHWM:").map(|kib| kib * 1024)
}

/// The BPF programs a process holds descriptors of, by id, with their
/// counters (from /proc/PID/fdinfo: the kernel's own run_time_ns, run_cnt
/// and recursion_misses, as bpftool shows them).
fn bpf_programs_of(pid: u32) -> BTreeMap<u64, ProgramCounters> {
    bpf_program_fdinfo(pid)
        .iter()
        .filter_map(|info| parse_fdinfo(info))
        .collect()
}

fn parse_fdinfo(info: &str) -> Option<(u64, ProgramCounters)> {
    let field = |name: &str| -> Option<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some((
        field("prog_id:")?,
        ProgramCounters {
            run_time_ns: field("run_time_ns:").unwrap_or(0),
            run_cnt: field("run_cnt:").unwrap_or(0),
            recursion_misses: field("recursion_misses:").unwrap_or(0),
        },
    ))
}

/// CPU time of the whole machine, of xtask and of the tracer, in seconds.
struct CpuTimes {
    at: Instant,
    busy: f64,
    steal: f64,
    xtask: f64,
    tracer: f64,
}

impl CpuTimes {
    fn now(tracer: Option<u32>) -> CpuTimes {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let (busy, steal) = machine_cpu(&stat).unwrap_or_default();
        CpuTimes {
            at: Instant::now(),
            busy,
            steal,
            xtask: cpu_seconds(std::process::id()).unwrap_or(0.0),
            tracer: tracer.and_then(cpu_seconds).unwrap_or(0.0),
        }
    }

    fn since(&self, before: &CpuTimes) -> Load {
        let secs = (self.at - before.at).as_secs_f64().max(1e-9);
        Load {
            busy: (self.busy - before.busy) / secs,
            steal: (self.steal - before.steal) / secs,
            xtask: (self.xtask - before.xtask) / secs,
            tracer: (self.tracer - before.tracer) / secs,
        }
    }
}

/// Cores busy on average over an interval.
#[derive(Clone, Copy, Debug, Default)]
struct Load {
    /// The machine: user, nice, system, irq and softirq time.
    busy: f64,
    /// Time the hypervisor gave to others.
    steal: f64,
    /// xtask (the churn's clients and server).
    xtask: f64,
    /// The tracer.
    tracer: f64,
}

impl Load {
    /// Everything else: softirq and kernel threads working for the churn,
    /// and other processes on the machine.
    fn rest(&self) -> f64 {
        (self.busy - self.xtask - self.tracer).max(0.0)
    }
}

/// Busy and steal seconds of all CPUs from /proc/stat's first line.
fn machine_cpu(stat: &str) -> Option<(f64, f64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    let steal = v.get(7).copied().unwrap_or(0);
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((busy as f64 / hz, steal as f64 / hz))
}

// ---------------------------------------------------------------------------
// Samples and their summary

#[derive(Clone, Debug, Default)]
struct ProgramDelta {
    id: u64,
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
    recursion_misses: u64,
}

/// One variant in one phase of one round.
#[derive(Clone, Debug)]
struct Sample {
    variant: Variant,
    phase: Phase,
    round: usize,
    churn: ChurnResult,
    /// Connections/s over the baseline's in the same round and phase.
    ratio: Option<f64>,
    /// Connections/s over the empty program's in the same round and phase.
    ratio_to_floor: Option<f64>,
    /// Transitions the tracer reported seeing (whole run: both phases).
    seen: Option<u64>,
    /// Connections the churn made over the tracer's whole run.
    run_connections: u64,
    /// Events the tracer says it lost (tcpwatch: buffer full + skipped).
    lost: Option<u64>,
    /// Of those, records the ring (perf) buffer had no room for.
    buffer_full: Option<u64>,
    /// Of those, transitions the kernel skipped its program for.
    skipped: Option<u64>,
    /// Where the CPUs' time went during the churn.
    load: Load,
    /// Other processes' tracers running during the churn.
    foreign: Vec<Foreign>,
    /// Remarks for bench.json only.
    notes_quiet: Vec<String>,
    /// The tracer's user and system CPU time over the measured window.
    cpu_user_seconds: Option<f64>,
    cpu_system_seconds: Option<f64>,
    /// The tracer's CPU time over the measured window.
    cpu_seconds: Option<f64>,
    /// Its threads' scheduler run time over the window (includes softirq
    /// work that ran while they were current).
    sched_ns: Option<u64>,
    /// Its programs' counters over the measured window.
    programs: Vec<ProgramDelta>,
    peak_rss: Option<u64>,
    summary: Option<String>,
    exit: Option<String>,
    notes: Vec<String>,
}

impl Default for Sample {
    fn default() -> Self {
        Sample {
            variant: Variant::Baseline,
            phase: Phase::Saturated,
            round: 0,
            churn: ChurnResult::default(),
            ratio: None,
            ratio_to_floor: None,
            seen: None,
            run_connections: 0,
            lost: None,
            buffer_full: None,
            skipped: None,
            load: Load::default(),
            foreign: Vec::new(),
            notes_quiet: Vec::new(),
            cpu_user_seconds: None,
            cpu_system_seconds: None,
            cpu_seconds: None,
            sched_ns: None,
            programs: Vec::new(),
            peak_rss: None,
            summary: None,
            exit: None,
            notes: Vec::new(),
        }
    }
}

impl Sample {
    /// The tracer's CPU and its programs' counters between two readings.
    fn window(&mut self, before: &Reading, after: &Reading, names: &HashMap<u64, String>) {
        let user = (after.cpu.0 - before.cpu.0).max(0.0);
        let system = (after.cpu.1 - before.cpu.1).max(0.0);
        self.cpu_seconds = Some(user + system);
        self.cpu_user_seconds = Some(user);
        self.cpu_system_seconds = Some(system);
        self.sched_ns = after
            .sched_ns
            .zip(before.sched_ns)
            .map(|(a, b)| a.saturating_sub(b));
        self.programs = after
            .programs
            .iter()
            .map(|(id, a)| {
                let b = before.programs.get(id).copied().unwrap_or_default();
                ProgramDelta {
                    id: *id,
                    name: names
                        .get(id)
                        .cloned()
                        .unwrap_or_else(|| format!("prog#{id}")),
                    run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
                    run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
                    recursion_misses: a.recursion_misses.saturating_sub(b.recursion_misses),
                }
            })
            .collect();
    }

    /// Kernel time of all the tracer's programs per connection made, µs
    /// (`run_time_ns`).
    fn kernel_us_per_connection(&self) -> Option<f64> {
        let ns: u64 = self.programs.iter().map(|p| p.run_time_ns).sum();
        (!self.programs.is_empty() && self.churn.connections > 0)
            .then(|| ns as f64 / 1e3 / self.churn.connections as f64)
    }

    /// The tracer process's utime+stime per connection made, µs.
    fn process_us_per_connection(&self) -> Option<f64> {
        let cpu = self.cpu_seconds?;
        (self.churn.connections > 0).then(|| cpu * 1e6 / self.churn.connections as f64)
    }

    /// Both: what the tracer costs per connection all told, µs.
    fn total_us_per_connection(&self) -> Option<f64> {
        Some(self.kernel_us_per_connection()? + self.process_us_per_connection()?)
    }

    /// The same with the process's scheduler run time instead of
    /// utime+stime, µs.
    fn sched_total_us_per_connection(&self) -> Option<f64> {
        let sched = self.sched_ns? as f64 / 1e3 / self.churn.connections.max(1) as f64;
        Some(self.kernel_us_per_connection()? + sched)
    }

    /// The program on sock:inet_sock_set_state: by name, else the busiest.
    fn state_program(&self) -> Option<&ProgramDelta> {
        let prefix = self.variant.state_program();
        self.programs
            .iter()
            .find(|p| p.name.starts_with(prefix))
            .or_else(|| self.programs.iter().max_by_key(|p| p.run_cnt))
    }

    /// Program runs over the measured window (all the tracer's programs).
    fn window_events(&self) -> Option<u64> {
        (!self.programs.is_empty()).then(|| self.programs.iter().map(|p| p.run_cnt).sum())
    }

    fn kernel_ns_per_event(&self) -> Option<f64> {
        let p = self.state_program()?;
        (p.run_cnt > 0).then(|| p.run_time_ns as f64 / p.run_cnt as f64)
    }

    fn misses(&self) -> Option<u64> {
        (!self.programs.is_empty()).then(|| self.programs.iter().map(|p| p.recursion_misses).sum())
    }

    fn cpu_us_per_event(&self) -> Option<f64> {
        let events = self.window_events()?;
        let cpu = self.cpu_seconds?;
        (events > 0).then(|| cpu * 1e6 / events as f64)
    }

    fn one_line(&self) -> String {
        let mut s = format!(
            "round {} {:<9} {:<9} {:>7.0} conn/s",
            self.round + 1,
            self.phase.key(),
            self.variant.key(),
            self.churn.per_second()
        );
        if self.churn.errors > 0 {
            let _ = write!(s, ", {} errors", self.churn.errors);
        }
        if let Some(seen) = self.seen {
            let _ = write!(s, ", {seen} seen");
        }
        if let Some(lost) = self.lost {
            let _ = write!(s, ", {lost} lost");
        }
        if let Some(ns) = self.kernel_ns_per_event() {
            let _ = write!(s, ", {ns:.0} ns/event kernel");
        }
        if let (Some(k), Some(p)) = (
            self.kernel_us_per_connection(),
            self.process_us_per_connection(),
        ) {
            let _ = write!(s, ", {:.2} µs/conn ({k:.2} kernel + {p:.2} process)", k + p);
        }
        if let Some(m) = self.misses().filter(|&m| m > 0) {
            let _ = write!(s, ", {m} recursion misses");
        }
        for f in &self.foreign {
            let _ = write!(
                s,
                "; other tracer pid {} ({}) used {:.2} cores",
                f.pid, f.command, f.cores
            );
        }
        for note in &self.notes {
            let _ = write!(s, "; {note}");
        }
        s
    }

    fn json(&self) -> Value {
        json!({
            "variant": self.variant.key(),
            "phase": self.phase.key(),
            "round": self.round + 1,
            "connections": self.churn.connections,
            "seconds": self.churn.seconds,
            "connections_per_second": self.churn.per_second(),
            "errors": self.churn.errors,
            "first_error": self.churn.first_error,
            "ratio_to_baseline": self.ratio,
            "ratio_to_floor": self.ratio_to_floor,
            "transitions_seen": self.seen,
            "lost_events": self.lost,
            "lost_buffer_full": self.buffer_full,
            "lost_skipped_by_kernel": self.skipped,
            "load_cores": {
                "busy": self.load.busy,
                "steal": self.load.steal,
                "xtask": self.load.xtask,
                "tracer": self.load.tracer,
                "rest": self.load.rest(),
            },
            "cpu_seconds": self.cpu_seconds,
            "cpu_user_seconds": self.cpu_user_seconds,
            "cpu_system_seconds": self.cpu_system_seconds,
            "sched_runtime_ns": self.sched_ns,
            "kernel_us_per_connection": self.kernel_us_per_connection(),
            "process_us_per_connection": self.process_us_per_connection(),
            "total_us_per_connection": self.total_us_per_connection(),
            "total_us_per_connection_schedstat": self.sched_total_us_per_connection(),
            "foreign_tracers": self.foreign.iter().map(|f| json!({
                "pid": f.pid,
                "command": f.command,
                "programs": f.programs,
                "cores": f.cores,
            })).collect::<Vec<_>>(),
            "window_program_runs": self.window_events(),
            "cpu_us_per_event": self.cpu_us_per_event(),
            "kernel_ns_per_event": self.kernel_ns_per_event(),
            "recursion_misses": self.misses(),
            "programs": self.programs.iter().map(|p| json!({
                "id": p.id,
                "name": p.name,
                "run_time_ns": p.run_time_ns,
                "run_cnt": p.run_cnt,
                "recursion_misses": p.recursion_misses,
            })).collect::<Vec<_>>(),
            "peak_rss_bytes": self.peak_rss,
            "summary": self.summary,
            "exit": self.exit,
            "notes": self.notes,
            "remarks": self.notes_quiet,
        })
    }
}

/// Median and range of a set of figures.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

/// One variant in one phase over all rounds.
#[derive(Clone, Debug)]
struct Row {
    variant: Variant,
    phase: Phase,
    rounds: usize,
    rate: Option<Spread>,
    ratio: Option<Spread>,
    ratio_to_floor: Option<Spread>,
    seen: Option<Spread>,
    seen_per_connection: Option<Spread>,
    /// The tracer's own count of lost events (tcpwatch: ring buffer full
    /// plus skipped by the kernel; bpftrace: its "Lost N events").
    lost_total: Option<u64>,
    /// Of those, ring (perf) buffer full.
    buffer_full_total: Option<u64>,
    /// Runs the kernel skipped (recursion_misses, over the measured windows).
    misses_total: Option<u64>,
    /// Cores busy with neither xtask nor the tracer during the churn.
    rest_cores: Option<Spread>,
    /// Runs of the tracer's programs over the measured windows.
    program_runs_total: u64,
    kernel_ns: Option<Spread>,
    cpu_us: Option<Spread>,
    kernel_us_per_connection: Option<Spread>,
    process_us_per_connection: Option<Spread>,
    total_us_per_connection: Option<Spread>,
    sched_total_us_per_connection: Option<Spread>,
    peak_rss: Option<u64>,
    errors: u64,
}

impl Row {
    fn of(variant: Variant, phase: Phase, samples: &[Sample]) -> Row {
        let mine: Vec<Sample> = samples
            .iter()
            .filter(|s| s.variant == variant && s.phase == phase)
            .map(|s| with_ratios(s, samples))
            .collect();
        let spread = |f: &dyn Fn(&Sample) -> Option<f64>| {
            Spread::of(&mine.iter().filter_map(f).collect::<Vec<_>>())
        };
        let total = |f: &dyn Fn(&Sample) -> Option<u64>| {
            let v: Vec<u64> = mine.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum())
        };
        Row {
            variant,
            phase,
            rounds: mine.len(),
            rate: spread(&|s| Some(s.churn.per_second())),
            ratio: spread(&|s| s.ratio),
            ratio_to_floor: spread(&|s| s.ratio_to_floor),
            seen: spread(&|s| s.seen.map(|n| n as f64)),
            seen_per_connection: spread(&|s| {
                let seen = s.seen?;
                (s.run_connections > 0).then(|| seen as f64 / s.run_connections as f64)
            }),
            lost_total: total(&|s| s.lost),
            buffer_full_total: total(&|s| s.buffer_full),
            misses_total: total(&|s| s.misses()),
            rest_cores: spread(&|s| Some(s.load.rest())),
            program_runs_total: mine.iter().filter_map(Sample::window_events).sum(),
            kernel_ns: spread(&|s| s.kernel_ns_per_event()),
            cpu_us: spread(&|s| s.cpu_us_per_event()),
            kernel_us_per_connection: spread(&Sample::kernel_us_per_connection),
            process_us_per_connection: spread(&Sample::process_us_per_connection),
            total_us_per_connection: spread(&Sample::total_us_per_connection),
            sched_total_us_per_connection: spread(&Sample::sched_total_us_per_connection),
            peak_rss: mine.iter().filter_map(|s| s.peak_rss).max(),
            errors: mine.iter().map(|s| s.churn.errors).sum(),
        }
    }

    fn json(&self) -> Value {
        let spread = |s: &Option<Spread>| s.as_ref().map(Spread::json);
        json!({
            "variant": self.variant.key(),
            "phase": self.phase.key(),
            "label": self.variant.label(),
            "rounds": self.rounds,
            "connections_per_second": spread(&self.rate),
            "ratio_to_baseline": spread(&self.ratio),
            "ratio_to_floor": spread(&self.ratio_to_floor),
            "transitions_seen": spread(&self.seen),
            "transitions_seen_per_connection": spread(&self.seen_per_connection),
            "lost_events_total": self.lost_total,
            "lost_buffer_full_total": self.buffer_full_total,
            "recursion_misses_total": self.misses_total,
            "rest_of_machine_cores": spread(&self.rest_cores),
            "kernel_ns_per_event": spread(&self.kernel_ns),
            "cpu_us_per_event": spread(&self.cpu_us),
            "kernel_us_per_connection": spread(&self.kernel_us_per_connection),
            "process_us_per_connection": spread(&self.process_us_per_connection),
            "total_us_per_connection": spread(&self.total_us_per_connection),
            "total_us_per_connection_schedstat": spread(&self.sched_total_us_per_connection),
            "peak_rss_bytes": self.peak_rss,
            "churn_errors": self.errors,
        })
    }
}

/// A sample with its rates over the baseline's and the floor's of the
/// same round and phase.
fn with_ratios(sample: &Sample, samples: &[Sample]) -> Sample {
    let mut s = sample.clone();
    s.ratio = ratio_in_round(&s, Variant::Baseline, samples);
    s.ratio_to_floor = ratio_in_round(&s, Variant::Floor, samples);
    s
}

/// `sample`'s rate over `reference`'s in its round and phase.
fn ratio_in_round(sample: &Sample, reference: Variant, samples: &[Sample]) -> Option<f64> {
    let base = samples
        .iter()
        .find(|s| s.round == sample.round && s.phase == sample.phase && s.variant == reference)?
        .churn
        .per_second();
    (base > 0.0).then(|| sample.churn.per_second() / base)
}

// ---------------------------------------------------------------------------
// The report

/// What else was going on.
#[derive(Clone, Debug, Default)]
struct Conditions {
    load_before: String,
    load_after: String,
}

struct Report {
    date: SystemTime,
    machine: Machine,
    options: Options,
    conditions: Conditions,
    rows: Vec<Row>,
    samples: Vec<Sample>,
    correlator: std::result::Result<Value, String>,
    memory: std::result::Result<Value, String>,
    skipped: Vec<(Variant, String)>,
}

/// A target's verdict.
struct Verdict {
    target: &'static str,
    met: Option<bool>,
    detail: String,
}

impl Verdict {
    fn unmeasured(target: &'static str) -> Verdict {
        Verdict {
            target,
            met: None,
            detail: "not measured".into(),
        }
    }
}

impl Report {
    fn row(&self, variant: Variant, phase: Phase) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.variant == variant && r.phase == phase)
    }

    fn modes(&self, phase: Phase) -> impl Iterator<Item = &Row> {
        self.rows
            .iter()
            .filter(move |r| r.variant.is_mode() && r.phase == phase)
    }

    /// Both tables: the paced phase's CPU, the saturated phase's throughput.
    fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "**At a steady {} connections/s** (paced; CPU per connection made):\n",
            thousands(f64::from(self.options.rate))
        );
        t.push_str(
            "| variant | connections/s, median (min–max) | kernel µs/conn (all programs' \
             `run_time_ns`) | process µs/conn (utime+stime) | **all told µs/conn** | all told \
             with schedstat µs/conn | set-state ns/run | skipped by the kernel | peak RSS |\n",
        );
        t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let us = |s: Option<Spread>| {
            s.map_or("—".into(), |s| {
                format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max)
            })
        };
        let rate = |s: Option<Spread>| {
            s.map_or("—".into(), |s| {
                format!(
                    "{} ({}–{})",
                    thousands(s.median),
                    thousands(s.min),
                    thousands(s.max)
                )
            })
        };
        let count = |n: Option<u64>| n.map_or("—".into(), |n| thousands(n as f64));
        let kernel = |r: &Row| {
            r.kernel_ns
                .map_or("—".into(), |s| format!("{:.0}", s.median))
        };
        for r in self.rows.iter().filter(|r| r.phase == Phase::Paced) {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.variant.label(),
                rate(r.rate),
                us(r.kernel_us_per_connection),
                us(r.process_us_per_connection),
                us(r.total_us_per_connection),
                us(r.sched_total_us_per_connection),
                kernel(r),
                count(r.misses_total),
                r.peak_rss.map_or("—".into(), mebibytes),
            );
        }
        t.push_str("\n**Saturated** (as fast as the generator goes):\n\n");
        t.push_str(
            "| variant | connections/s, median (min–max) | vs. baseline | vs. empty program | \
             transitions seen per round² | lost: buffer full² | lost: skipped by the kernel | \
             set-state ns/run | all told µs/conn | peak RSS |\n",
        );
        t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let pct = |s: Option<Spread>| {
            s.map_or("—".into(), |s| {
                format!(
                    "{:.1}% ({:.1}–{:.1}%)",
                    s.median * 100.0,
                    s.min * 100.0,
                    s.max * 100.0
                )
            })
        };
        for r in self.rows.iter().filter(|r| r.phase == Phase::Saturated) {
            let ratio = match r.variant {
                Variant::Baseline => "100%".into(),
                _ => pct(r.ratio),
            };
            let to_floor = match r.variant {
                Variant::Floor => "100%".into(),
                _ => pct(r.ratio_to_floor),
            };
            let seen = r.seen.map_or("—".into(), |s| thousands(s.median));
            let _ = writeln!(
                t,
                "| {} | {} | {ratio} | {to_floor} | {seen} | {} | {} | {} | {} | {} |",
                r.variant.label(),
                rate(r.rate),
                count(r.buffer_full_total),
                count(r.misses_total),
                kernel(r),
                r.total_us_per_connection
                    .map_or("—".into(), |s| format!("{:.2}", s.median)),
                r.peak_rss.map_or("—".into(), mebibytes),
            );
        }
        t
    }

    fn verdicts(&self) -> Vec<Verdict> {
        let mut v = Vec::new();
        let missing = |target: &'static str, why: &str| Verdict {
            target,
            met: None,
            detail: format!("not measured ({why})"),
        };
        let paced: Vec<&Row> = self.modes(Phase::Paced).collect();
        let saturated: Vec<&Row> = self.modes(Phase::Saturated).collect();

        // CPU per connection all told at the paced rate.
        {
            let parts = |always_on| medians(&paced, always_on, |r| r.total_us_per_connection);
            v.push(threshold(
                "daemon, timewait, conns: ≤ 1.5 µs of CPU per connection all told (kernel \
                 programs' run_time_ns + process utime+stime) at the paced rate",
                &parts(true),
                1.5,
                "µs",
                2,
            ));
            v.push(threshold(
                "trace --format json: ≤ 4 µs of CPU per connection all told at the paced rate",
                &parts(false),
                4.0,
                "µs",
                2,
            ));
        }

        // Saturated throughput over the empty program's.
        {
            let floor_ratio = |always_on| medians(&saturated, always_on, |r| r.ratio_to_floor);
            v.push(at_least(
                "daemon, timewait, conns: saturated throughput ≥ 97% of the empty program's",
                &floor_ratio(true),
                0.97,
            ));
            v.push(at_least(
                "trace: saturated throughput ≥ 90% of the empty program's",
                &floor_ratio(false),
                0.90,
            ));
        }

        // Kernel time per transition.
        {
            let parts: Vec<(Variant, f64)> = saturated
                .iter()
                .filter_map(|r| Some((r.variant, r.kernel_ns?.median)))
                .collect();
            v.push(threshold(
                "set-state program ≤ 150 ns per transition in the kernel (saturated)",
                &parts,
                150.0,
                "ns",
                0,
            ));
        }

        // Losses.
        {
            let target = "zero ring-full losses at the generator's full rate";
            let full: Vec<String> = saturated
                .iter()
                .map(|r| match r.buffer_full_total {
                    Some(n) => format!("{} {}", r.variant.key(), thousands(n as f64)),
                    None => format!("{} unknown", r.variant.key()),
                })
                .collect();
            let total: Option<u64> = saturated.iter().map(|r| r.buffer_full_total).sum();
            v.push(match total {
                _ if saturated.is_empty() => missing(target, "no tcpwatch mode ran"),
                None => missing(target, "a mode printed no summary"),
                Some(n) => Verdict {
                    target,
                    met: Some(n == 0),
                    detail: format!(
                        "{} ({} over all rounds)",
                        if n == 0 { "met" } else { "missed" },
                        full.join(", ")
                    ),
                },
            });
            let target = "the kernel skips tcpwatch's programs at most once per 100,000 \
                          transitions (recursion_misses, both phases)";
            let parts: Vec<(Variant, f64)> = saturated
                .iter()
                .filter_map(|r| {
                    let p = self.row(r.variant, Phase::Paced);
                    let misses = r.misses_total? + p.and_then(|p| p.misses_total).unwrap_or(0);
                    let runs =
                        r.program_runs_total + p.map_or(0, |p| p.program_runs_total) + misses;
                    (runs > 0).then(|| (r.variant, misses as f64 * 1e5 / runs as f64))
                })
                .collect();
            v.push(threshold(target, &parts, 1.0, "per 100k", 2));
        }

        // Daemon memory.
        {
            let target = "daemon: ≤ 40 MB peak RSS at full churn with the TIME_WAIT table full";
            v.push(
                match self
                    .row(Variant::Daemon, Phase::Saturated)
                    .and_then(|r| r.peak_rss)
                {
                    Some(rss) => threshold(
                        target,
                        &[(Variant::Daemon, rss as f64 / 1e6)],
                        40.0,
                        "MB",
                        1,
                    ),
                    None => missing(target, "the daemon did not run"),
                },
            );
        }

        // Correlator offline.
        {
            let target = "correlator offline ≥ 5 million events/s on one core";
            v.push(match &self.correlator {
                Ok(c) => match c["events_per_second"].as_f64() {
                    Some(eps) => Verdict {
                        target,
                        met: Some(eps >= 5e6),
                        detail: if eps >= 5e6 {
                            format!(
                                "met: {:.2} M events/s ({:.0}% above)",
                                eps / 1e6,
                                (eps / 5e6 - 1.0) * 100.0
                            )
                        } else {
                            format!(
                                "missed: {:.2} M events/s ({:.0}% short)",
                                eps / 1e6,
                                (1.0 - eps / 5e6) * 100.0
                            )
                        },
                    },
                    None => missing(target, "no events_per_second in its output"),
                },
                Err(e) => missing(target, e),
            });
        }
        // Memory.
        {
            let target = "memory ≤ 200 bytes per tracked open connection";
            let target_rss = "RSS < 300 MB with one million tracked connections";
            match &self.memory {
                Ok(m) => {
                    let per = m["bytes_per_connection"].as_f64();
                    let rss = m["rss_after"].as_f64();
                    let tracked = m["tracked"].as_u64().unwrap_or(0);
                    let connections = m["connections"].as_u64().unwrap_or(0);
                    let tracked_note = if tracked == connections {
                        String::new()
                    } else {
                        format!(
                            " (only {} of {} tracked)",
                            thousands(tracked as f64),
                            thousands(connections as f64)
                        )
                    };
                    v.push(match per {
                        Some(b) => Verdict {
                            target,
                            met: Some(b <= 200.0 && tracked == connections),
                            detail: if b <= 200.0 {
                                format!("met: {b:.0} bytes ({:.0} under){tracked_note}", 200.0 - b)
                            } else {
                                format!(
                                    "missed: {b:.0} bytes ({:.0} over){tracked_note}",
                                    b - 200.0
                                )
                            },
                        },
                        None => missing(target, "no bytes_per_connection in its output"),
                    });
                    v.push(match rss {
                        Some(r) => {
                            let mb = r / 1e6;
                            Verdict {
                                target: target_rss,
                                met: Some(mb < 300.0),
                                detail: if mb < 300.0 {
                                    format!("met: {mb:.0} MB ({:.0} MB under)", 300.0 - mb)
                                } else {
                                    format!("missed: {mb:.0} MB ({:.0} MB over)", mb - 300.0)
                                },
                            }
                        }
                        None => missing(target_rss, "no rss_after in its output"),
                    });
                }
                Err(e) => {
                    v.push(missing(target, e));
                    v.push(missing(target_rss, e));
                }
            }
        }
        v
    }

    fn targets_markdown(&self) -> String {
        let mut t = String::from("| target | verdict |\n|---|---|\n");
        for v in self.verdicts() {
            let mark = match v.met {
                Some(true) => "✅",
                Some(false) => "❌",
                None => "❔",
            };
            let _ = writeln!(t, "| {} | {mark} {} |", v.target, v.detail);
        }
        t
    }

    /// Observations worth a sentence: anything odd in the samples, and
    /// where the cost goes.
    fn observations(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let base = self
            .row(Variant::Baseline, Phase::Saturated)
            .and_then(|r| r.rate);
        if let Some(b) = base {
            notes.push(format!(
                "Baseline, saturated: {} connections/s (median; {}–{} over the rounds, a spread \
                 of {:.1}%).",
                thousands(b.median),
                thousands(b.min),
                thousands(b.max),
                (b.max - b.min) / b.median * 100.0
            ));
        }
        if let Some(f) = self.row(Variant::Floor, Phase::Saturated) {
            if let (Some(ratio), Some(k)) = (f.ratio, f.kernel_ns) {
                notes.push(format!(
                    "The hook alone (empty program, BPF statistics on) costs {:.1}% of the \
                     throughput, though the program runs for only {:.0} ns per call: the rest of \
                     the floor is the classic tracepoint's own work outside the program (its perf \
                     handler builds the event record before calling BPF), the statistics' clock \
                     reads, and noise. Every tracer on this tracepoint pays it.",
                    (1.0 - ratio.median) * 100.0,
                    k.median
                ));
            }
        }
        for r in self.modes(Phase::Saturated) {
            let (Some(ratio), Some(k), Some(cpu)) = (r.ratio, r.kernel_ns, r.cpu_us) else {
                continue;
            };
            let floor = self
                .row(Variant::Floor, Phase::Saturated)
                .and_then(|f| Some((f.ratio?.median, f.kernel_ns?.median)));
            let mut s = format!(
                "`{}`, saturated: {:.1}% of the baseline; its program takes {:.0} ns per event \
                 in the kernel",
                r.variant.key(),
                ratio.median * 100.0,
                k.median
            );
            if let Some((fr, fk)) = floor {
                let _ = write!(
                    s,
                    " ({:.0} ns more than the empty program) and costs {:.1} points beyond the floor",
                    k.median - fk,
                    (fr - ratio.median) * 100.0
                );
            }
            let _ = write!(
                s,
                "; the tcpwatch process spends {cpu:.2} µs of CPU per event",
                cpu = cpu.median
            );
            let system_share: Vec<f64> = self
                .samples
                .iter()
                .filter(|x| x.variant == r.variant && x.phase == r.phase)
                .filter_map(|x| {
                    let (u, sys) = (x.cpu_user_seconds?, x.cpu_system_seconds?);
                    (u + sys > 0.0).then(|| sys / (u + sys))
                })
                .collect();
            if let Some(share) = Spread::of(&system_share) {
                let _ = write!(s, ", {:.0}% of it system time", share.median * 100.0);
            }
            let cores: Vec<f64> = self
                .samples
                .iter()
                .filter(|x| x.variant == r.variant && x.phase == r.phase)
                .map(|x| x.load.tracer)
                .collect();
            if let Some(cores) = Spread::of(&cores) {
                let _ = write!(s, " ({:.2} cores during the churn, median)", cores.median);
            }
            if let Some(p) = self.row(r.variant, Phase::Paced) {
                if let (Some(k), Some(u)) =
                    (p.kernel_us_per_connection, p.process_us_per_connection)
                {
                    let _ = write!(
                        s,
                        "; at the paced rate it costs {:.2} µs per connection in its programs \
                         and {:.2} µs in its process",
                        k.median, u.median
                    );
                }
            }
            s.push('.');
            notes.push(s);
        }
        for r in &self.rows {
            if let Some(spc) = r.seen_per_connection {
                if r.variant != Variant::Bpftrace && !(8.0..=12.0).contains(&spc.median) {
                    notes.push(format!(
                        "`{}` saw {:.1} transitions per connection (about 10 expected).",
                        r.variant.key(),
                        spc.median
                    ));
                }
            }
            if r.variant == Variant::Bpftrace {
                if let (Some(lost), Some(seen)) = (r.lost_total, r.seen) {
                    if lost > 0 {
                        notes.push(format!(
                            "bpftrace lost {} events over {} rounds (it printed {} per round, median).",
                            thousands(lost as f64),
                            r.rounds,
                            thousands(seen.median)
                        ));
                    }
                }
            }
            if r.errors > 0 {
                let first = self
                    .samples
                    .iter()
                    .filter(|s| s.variant == r.variant)
                    .find_map(|s| s.churn.first_error.clone())
                    .unwrap_or_default();
                notes.push(format!(
                    "{}: {} failed connection attempts in the churn (first: {first}).",
                    r.variant.label(),
                    thousands(r.errors as f64)
                ));
            }
        }
        let skips: Vec<String> = self
            .rows
            .iter()
            .filter_map(|r| {
                let m = r.misses_total.filter(|&m| m > 0)?;
                Some(format!("{} {}", r.variant.key(), thousands(m as f64)))
            })
            .collect();
        if !skips.is_empty() {
            notes.push(format!(
                "The kernel skipped the tracers' programs (recursion_misses, over all rounds: {}): \
                 the tracepoint fired while a BPF program was already running on that CPU, \
                 typically a softirq interrupting one (also another process's program on the \
                 same tracepoint). Those transitions never reach the tracer; tcpwatch counts \
                 them among its lost events (\"skipped by the kernel\"), bpftrace cannot know of \
                 them.",
                skips.join(", ")
            ));
        }
        let rest: Vec<f64> = self.samples.iter().map(|s| s.load.rest()).collect();
        let steal: Vec<f64> = self.samples.iter().map(|s| s.load.steal).collect();
        if let (Some(rest), Some(steal)) = (Spread::of(&rest), Spread::of(&steal)) {
            notes.push(format!(
                "During the churn windows the CPUs were busy with something other than xtask and \
                 the tracer (softirq and kernel threads serving the churn, plus other processes) \
                 for {:.2} cores (median; {:.2}–{:.2}); hypervisor steal {:.2} cores (median; max \
                 {:.2}). Per sample in bench.json under `load_cores`.",
                rest.median, rest.min, rest.max, steal.median, steal.max
            ));
        }
        for s in &self.samples {
            for note in &s.notes {
                notes.push(format!(
                    "Round {}, {}: {note}",
                    s.round + 1,
                    s.variant.key()
                ));
            }
        }
        for (variant, why) in &self.skipped {
            notes.push(format!("{} not measured: {why}", variant.label()));
        }
        notes
    }

    fn machine_line(&self) -> String {
        self.machine.line()
    }

    /// Other processes' tracers seen during the churn windows.
    fn foreign_line(&self) -> String {
        let with: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| !s.foreign.is_empty())
            .collect();
        if with.is_empty() {
            return "no other process held BPF tracing programs during the churn windows".into();
        }
        let mut commands: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        for f in with.iter().flat_map(|s| &s.foreign) {
            let e = commands.entry(f.command.clone()).or_default();
            e.0 += 1;
            e.1 = e.1.max(f.cores);
        }
        format!(
            "other processes held BPF tracing programs (which see the churn's transitions too) \
             during {} of {} churn windows: {}",
            with.len(),
            self.samples.len(),
            commands
                .iter()
                .map(|(c, (n, cores))| format!("`{c}` ({n} windows, up to {cores:.2} cores)"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// Why the figures of this run may not be trusted, if they may not.
    fn caveats(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(b) = self
            .row(Variant::Baseline, Phase::Saturated)
            .and_then(|r| r.rate)
        {
            let spread = (b.max - b.min) / b.median.max(1e-9);
            if spread > 0.10 {
                out.push(format!(
                    "the baseline varied by {:.0}% between rounds ({}–{} connections/s), so \
                     differences of that order between variants are noise",
                    spread * 100.0,
                    thousands(b.min),
                    thousands(b.max)
                ));
            }
        }
        let with_foreign = self
            .samples
            .iter()
            .filter(|s| !s.foreign.is_empty())
            .count();
        if with_foreign > 0 {
            out.push(format!(
                "other processes' tracers were attached during {with_foreign} of {} churn \
                 windows; they process the churn's events too and slow every variant, \
                 unevenly",
                self.samples.len()
            ));
        }
        out
    }

    fn document(&self) -> String {
        let o = &self.options;
        let mut d = String::new();
        d.push_str("# Performance\n\n");
        d.push_str(
            "This page is written by `cargo xtask bench` (as root); rerun it to refresh it. The \
             same figures, round by round, are in `target/bench/bench.json`.\n\n",
        );
        let _ = writeln!(d, "- Date: {}", utc_date(self.date));
        let _ = writeln!(d, "- Machine: {}", self.machine_line());
        let _ = writeln!(
            d,
            "- Run: {} rounds × {} s per variant and phase (paced at {} connections/s, then \
             saturated), {} client threads, {} accept threads; load average {} before, {} after; \
             {}.",
            o.rounds,
            o.seconds,
            thousands(f64::from(o.rate)),
            o.threads,
            o.server_threads(),
            self.conditions.load_before,
            self.conditions.load_after,
            self.foreign_line()
        );
        if o.rounds < 5 {
            d.push_str(
                "- Fewer than 5 rounds: the spreads below say little; the defaults run 5.\n",
            );
        }
        let caveats = self.caveats();
        if !caveats.is_empty() {
            let _ = writeln!(
                d,
                "\n> **Caution:** this run was noisy: {}. Rerun on a quiet machine before \
                 drawing conclusions from the ratios.",
                caveats.join("; ")
            );
        }
        d.push_str("\n## How it is measured\n\n");
        d.push_str(
            "The churn generator (`xtask/src/churn.rs`, in the xtask process) runs client \
             threads that each loop over socket, bind to 127.0.X.Y:0 (cycling through 65,024 \
             loopback addresses, so ephemeral ports never run out), connect to a server on \
             127.0.0.1, write 16 bytes and close; the server's accept threads read each \
             connection to EOF and close it. The client closes first, so about 10 state \
             transitions happen per connection and TIME_WAIT sockets pile up to \
             `tcp_max_tw_buckets` (the overflow is realistic for such a host). In the *paced* \
             phase the clients share a fixed rate (`--rate`, one connection per time slot; a \
             client more than 50 ms behind drops the missed slots); in the *saturated* phase \
             they go as fast as they can.\n\n",
        );
        d.push_str(
            "Each round runs every variant once, in an order rotated from round to round, so \
             noise on the machine hits the variants alike; ratios compare a variant with the \
             baseline and with the empty program of the same round and phase. A tracer is \
             started and waited for until it says it is attached (tcpwatch's `tcpwatch: \
             tracing ...` line, the daemon's `tracing TCP connections` log line, bpftrace's \
             BEGIN output) and given 0.5 s to settle; then the paced phase runs, 0.5 s to \
             drain, the saturated phase, 0.5 s to drain, and the tracer is stopped with SIGINT \
             and waited for before the next variant starts. Each phase's window runs from the \
             start of its churn to the end of its drain.\n\n",
        );
        d.push_str(
            "Clocks:\n\n\
             - *kernel µs/conn*: the sum of `run_time_ns` over **all** of the tracer's BPF \
             programs (read from /proc/PID/fdinfo of its program descriptors) over the window, \
             divided by the connections the churn made in it. `run_time_ns` is exact \
             (`kernel.bpf_stats_enabled=1` for the whole bench, restored afterwards; the \
             statistics add two clock reads per call to every variant but the baseline).\n\
             - *process µs/conn*: utime+stime of the tracer process (/proc/PID/stat, all \
             threads) over the window per connection. These are sampled per tick (HZ=250 \
             here), so short windows are noisy; the bench's windows hold thousands of ticks.\n\
             - *all told*: the two added. The *schedstat* column adds instead the scheduler \
             run time of the tracer's threads (/proc/PID/task/*/schedstat, ns); this kernel \
             has no IRQ_TIME_ACCOUNTING, so that clock also counts softirq work (the churn's \
             own packets) that ran while a tracer thread was current, and overstates the \
             tracer.\n\
             - *set-state ns/run*: `run_time_ns / run_cnt` of the program on \
             `sock:inet_sock_set_state` alone.\n\
             - *skipped by the kernel*: `recursion_misses` of the tracer's programs over the \
             windows, transitions a program was never run for; tcpwatch counts them among its \
             lost events.\n\
             - *transitions seen* and *lost: buffer full* (²): the tracer's own exit summary, \
             which covers its whole run (both phases); for bpftrace, the lines it printed and \
             its `Lost N events` lines.\n\
             - *peak RSS*: VmHWM of the tracer just before it is stopped, largest over rounds.\n\n",
        );
        d.push_str("## Results\n\n");
        d.push_str(&self.table());
        d.push('\n');
        d.push_str("## Offline\n\n");
        match &self.correlator {
            Ok(c) => {
                let _ = writeln!(
                    d,
                    "- `tcpwatch bench correlator --events 10000000`: {} events in {:.2} s on one \
                     core, **{:.2} M events/s** ({} timelines).",
                    thousands(c["events"].as_f64().unwrap_or(0.0)),
                    c["seconds"].as_f64().unwrap_or(0.0),
                    c["events_per_second"].as_f64().unwrap_or(0.0) / 1e6,
                    thousands(c["timelines"].as_f64().unwrap_or(0.0))
                );
            }
            Err(e) => {
                let _ = writeln!(d, "- correlator: not measured ({e})");
            }
        }
        match &self.memory {
            Ok(m) => {
                let _ = writeln!(
                    d,
                    "- `tcpwatch bench memory --connections 1000000`: {} connections tracked, RSS \
                     {} before and {} after, **{:.0} bytes per connection**.",
                    thousands(m["tracked"].as_f64().unwrap_or(0.0)),
                    megabytes(m["rss_before"].as_f64().unwrap_or(0.0)),
                    megabytes(m["rss_after"].as_f64().unwrap_or(0.0)),
                    m["bytes_per_connection"].as_f64().unwrap_or(0.0)
                );
            }
            Err(e) => {
                let _ = writeln!(d, "- memory: not measured ({e})");
            }
        }
        d.push_str("\n## Targets\n\n");
        d.push_str(&self.targets_markdown());
        d.push_str("\n## Observations\n\n");
        for note in self.observations() {
            let _ = writeln!(d, "- {note}");
        }
        d.push_str(
            "\nFigures on shared machines vary from run to run; compare ratios taken in one run, \
             not absolute rates across runs.\n",
        );
        d
    }

    fn json(&self) -> Value {
        let mut samples = Vec::new();
        for s in &self.samples {
            samples.push(with_ratios(s, &self.samples).json());
        }
        json!({
            "date": utc_date(self.date),
            "machine": {
                "cpus": self.machine.cpus,
                "model": self.machine.model,
                "kernel": self.machine.kernel,
                "memory_bytes": self.machine.memory_bytes,
            },
            "options": {
                "rounds": self.options.rounds,
                "seconds": self.options.seconds,
                "threads": self.options.threads,
                "server_threads": self.options.server_threads(),
            },
            "conditions": {
                "loadavg_before": self.conditions.load_before,
                "loadavg_after": self.conditions.load_after,
            },
            "summary": self.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "samples": samples,
            "offline": {
                "correlator": self.correlator.clone().unwrap_or_else(|e| json!({"error": e})),
                "memory": self.memory.clone().unwrap_or_else(|e| json!({"error": e})),
            },
            "targets": self.verdicts().iter().map(|v| json!({
                "target": v.target,
                "met": v.met,
                "detail": v.detail,
            })).collect::<Vec<_>>(),
            "caveats": self.caveats(),
            "skipped": self.skipped.iter().map(|(v, why)| json!({
                "variant": v.key(),
                "reason": why,
            })).collect::<Vec<_>>(),
        })
    }
}

/// A "≤ limit" verdict over per-mode medians.
fn threshold(
    target: &'static str,
    parts: &[(Variant, f64)],
    limit: f64,
    unit: &str,
    decimals: usize,
) -> Verdict {
    if parts.is_empty() {
        return Verdict::unmeasured(target);
    }
    let worst = parts
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("not empty");
    let list = parts
        .iter()
        .map(|(v, x)| format!("{} {x:.decimals$} {unit}", v.key()))
        .collect::<Vec<_>>()
        .join(", ");
    let met = worst.1 <= limit;
    let detail = if met {
        format!(
            "met with {:.decimals$} {unit} to spare at worst ({list}; medians)",
            limit - worst.1
        )
    } else {
        format!(
            "missed by {:.decimals$} {unit} ({} at {:.decimals$} {unit}; {list}; medians)",
            worst.1 - limit,
            worst.0.key(),
            worst.1
        )
    };
    Verdict {
        target,
        met: Some(met),
        detail,
    }
}

/// The median of `figure` for each of `rows` that is (or is not) an
/// always-on mode.
fn medians(
    rows: &[&Row],
    always_on: bool,
    figure: impl Fn(&Row) -> Option<Spread>,
) -> Vec<(Variant, f64)> {
    rows.iter()
        .filter(|r| r.variant.is_always_on() == always_on)
        .filter_map(|r| Some((r.variant, figure(r)?.median)))
        .collect()
}

/// A "≥ limit" verdict over per-mode median ratios.
fn at_least(target: &'static str, parts: &[(Variant, f64)], limit: f64) -> Verdict {
    let Some(worst) = parts.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)) else {
        return Verdict::unmeasured(target);
    };
    let list = parts
        .iter()
        .map(|(v, x)| format!("{} {:.1}%", v.key(), x * 100.0))
        .collect::<Vec<_>>()
        .join(", ");
    let margin = (worst.1 - limit) * 100.0;
    let met = worst.1 >= limit;
    Verdict {
        target,
        met: Some(met),
        detail: if met {
            format!("met by {margin:.1} points at worst ({list}; medians)")
        } else {
            format!(
                "missed by {:.1} points ({} at {:.1}%; {list}; medians)",
                -margin,
                worst.0.key(),
                worst.1 * 100.0
            )
        },
    }
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn megabytes(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_of_a_program() {
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t5\nprog_id:\t2885\nrun_time_ns:\t900\n\
                    run_cnt:\t10\nrecursion_misses:\t3\n";
        let (id, c) = parse_fdinfo(info).unwrap();
        assert_eq!(id, 2885);
        assert_eq!((c.run_time_ns, c.run_cnt, c.recursion_misses), (900, 10, 3));
        assert!(parse_fdinfo("pos:\t0\n").is_none());
    }

    #[test]
    fn spreads() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn ratios_are_within_the_round() {
        let sample = |variant, round, connections| Sample {
            variant,
            round,
            churn: ChurnResult {
                connections,
                seconds: 1.0,
                ..ChurnResult::default()
            },
            ..Sample::default()
        };
        let samples = vec![
            sample(Variant::Baseline, 0, 100),
            sample(Variant::Trace, 0, 90),
            sample(Variant::Baseline, 1, 200),
            sample(Variant::Trace, 1, 190),
        ];
        let row = Row::of(Variant::Trace, Phase::Saturated, &samples);
        let ratio = row.ratio.unwrap();
        assert!((ratio.min - 0.9).abs() < 1e-9);
        assert!((ratio.max - 0.95).abs() < 1e-9);
        // Another phase's baseline is not this phase's.
        assert!(Row::of(Variant::Trace, Phase::Paced, &samples)
            .ratio
            .is_none());
    }

    #[test]
    fn cpu_per_connection_adds_every_program_and_the_process() {
        let mut sample = Sample {
            variant: Variant::Daemon,
            phase: Phase::Paced,
            churn: ChurnResult {
                connections: 1000,
                seconds: 1.0,
                ..ChurnResult::default()
            },
            cpu_seconds: Some(0.002),
            sched_ns: Some(3_000_000),
            ..Sample::default()
        };
        assert_eq!(sample.kernel_us_per_connection(), None);
        sample.programs = vec![
            ProgramDelta {
                name: "inet_sock_set_s".into(),
                run_time_ns: 1_000_000,
                run_cnt: 10_000,
                ..ProgramDelta::default()
            },
            ProgramDelta {
                name: "sock_send_lengt".into(),
                run_time_ns: 500_000,
                run_cnt: 5_000,
                ..ProgramDelta::default()
            },
        ];
        let near = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-9;
        assert!(near(sample.kernel_us_per_connection(), 1.5));
        assert!(near(sample.process_us_per_connection(), 2.0));
        assert!(near(sample.total_us_per_connection(), 3.5));
        assert!(near(sample.sched_total_us_per_connection(), 4.5));
        assert!(near(sample.kernel_ns_per_event(), 100.0));
    }

    #[test]
    fn verdicts_at_least() {
        let v = at_least(
            "t",
            &[(Variant::Conns, 0.98), (Variant::Daemon, 0.95)],
            0.97,
        );
        assert_eq!(v.met, Some(false));
        assert!(
            v.detail.contains("missed by 2.0 points (daemon"),
            "{}",
            v.detail
        );
        let v = at_least("t", &[(Variant::Conns, 0.98)], 0.97);
        assert_eq!(v.met, Some(true));
        assert_eq!(at_least("t", &[], 0.97).met, None);
    }
}
