//! Loading and attaching the kernel program: checks the host can run it,
//! fills in the offsets it needs (tracefs layouts, BTF socket fields),
//! sizes the ring buffer, and attaches every tracepoint: as a BTF
//! tracepoint where the kernel allows it, else as the classic one (said
//! once at start).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::maps::{MapData, MapError, PerCpuArray};
use aya::programs::{BtfTracePoint, ProgramError, TracePoint};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfError, EbpfLoader};
use tcpwatch_common::{Config, EndpointOffsets, LOST_SLOT};

use crate::kernel::btf::{self, Btf, BtfError};
use crate::kernel::diagnostics::{self, KernelLog};
use crate::kernel::ringmap::EventRing;
use crate::kernel::tracefs::{self, Format};
use crate::model::lost::LostCounts;

/// The object `cargo xtask build` compiled; empty when built without it.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpwatch.bpf.o"));

pub const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";
pub const DEFAULT_RING_SIZE: u32 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("must run as root (or with CAP_BPF and CAP_PERFMON): it loads eBPF programs and attaches them to kernel tracepoints")]
    NotRoot,
    #[error("kernel BTF is missing: {path} does not exist (tcpwatch needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)")]
    NoBtf { path: PathBuf },
    #[error("kernel BTF at {path} is unusable")]
    BadBtf {
        path: PathBuf,
        #[source]
        source: BtfError,
    },
    #[error("kernel {release} has no BPF ring buffer (tcpwatch needs Linux 5.8 or later)")]
    NoRingBuffer { release: KernelVersion },
    #[error("this binary was built without its eBPF object; build it with `cargo xtask build` or run it with `cargo xtask run -- ...`")]
    NoObject,
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error("running in a user namespace (uid_map `{uid_map}`): the capabilities it grants do not let it load eBPF programs; run tcpwatch in the host's user namespace")]
    UserNamespace { uid_map: String },
    #[error("loading the eBPF object failed")]
    Load(#[source] EbpfError),
    #[error("kernel BTF at {path} does not give aya the tracepoints' types")]
    TracepointBtf {
        path: PathBuf,
        #[source]
        source: aya::BtfError,
    },
    #[error("the eBPF object has no program `{program}`")]
    MissingProgram { program: &'static str },
    #[error("attaching to tracepoint {tracepoint} failed")]
    Attach {
        tracepoint: String,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no map `{name}` (or it was already taken)")]
    MissingMap { name: &'static str },
    #[error("cannot read the eBPF program's log (--kernel-log)")]
    KernelLog(#[source] aya_log::Error),
    #[error("the eBPF object's map `{name}` is not what tcpwatch reads")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// A ring size the user gave that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("'{text}' is not a size (e.g. 4096, 256K, 16M)")]
    NotASize { text: String },
    #[error("ring size {bytes} must be a power of two between 4096 and 1073741824 bytes")]
    BadRingSize { bytes: u64 },
}

/// What the user can tune.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Ring buffer size in bytes: a power of two, a multiple of the page size.
    pub ring_size: u32,
    /// Wake the reader once this many bytes are waiting (0: every record).
    pub wakeup_bytes: u64,
    pub btf_path: PathBuf,
    /// Say the program's own diagnostics (aya-log); off by default.
    pub kernel_log: bool,
    /// Whether this command may keep each socket's transitions in the
    /// kernel and send them as one record when it opens, listens or closes
    /// (every command but `trace`, which wants each transition as it
    /// happens). They are kept so only when [`PER_SOCKET_ENV`] asks for it
    /// and the kernel allows it: one record per transition, written in
    /// place in the ring, costs the kernel less (`docs/performance.md`).
    pub per_socket: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            ring_size: DEFAULT_RING_SIZE,
            wakeup_bytes: u64::from(DEFAULT_RING_SIZE / 8),
            btf_path: PathBuf::from(DEFAULT_BTF),
            kernel_log: false,
            per_socket: true,
        }
    }
}

/// Checks a ring size the user gave: a power of two of at least one page.
pub fn check_ring_size(bytes: u64) -> Result<u32, SizeError> {
    let page = 4096;
    if bytes < page || !bytes.is_power_of_two() || bytes > (1 << 30) {
        return Err(SizeError::BadRingSize { bytes });
    }
    Ok(bytes as u32)
}

/// Parses `16M`, `256K`, `1G` or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| SizeError::NotASize {
            text: text.to_string(),
        })
}

/// A loaded, attached probe. Dropping it detaches everything.
pub struct Probe {
    ebpf: Ebpf,
    /// One line per thing the kernel did not let tcpwatch see (missing BTF
    /// fields): said once at start.
    pub degraded: Vec<String>,
    /// One line per hook attached as a classic tracepoint because its BTF
    /// tracepoint could not be: said once at start.
    pub classic: Vec<String>,
    /// Why transitions are sent one record each when per-socket records
    /// were asked for: said once at start.
    pub per_transition: Option<String>,
    /// That per-socket records were asked for and are used: said once at
    /// start.
    pub per_socket: Option<String>,
    pub mounted_tracefs: bool,
    kernel_log: Option<KernelLog>,
    /// The ring buffer's data bytes (`--ring-size`).
    ring_size: u32,
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Whether this process may load and attach the programs: root, or (as
/// the systemd unit in deploy/ runs it) a user holding CAP_BPF and
/// CAP_PERFMON, or CAP_SYS_ADMIN on kernels older than 5.8.
fn may_load() -> bool {
    match std::fs::read_to_string("/proc/self/status") {
        Ok(status) => may_load_with(effective_caps(&status)),
        // SAFETY: geteuid has no preconditions.
        Err(_) => unsafe { libc::geteuid() == 0 },
    }
}

fn may_load_with(caps: u64) -> bool {
    let has = |cap: u32| caps & (1 << cap) != 0;
    (has(CAP_BPF) && has(CAP_PERFMON)) || has(CAP_SYS_ADMIN)
}

/// The `CapEff:` mask of a `/proc/PID/status` text (0 if absent).
fn effective_caps(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

/// The uid map of this process's user namespace when it is not the
/// initial one (`0 0 4294967295`): its capabilities do not reach bpf().
fn user_namespace() -> Option<String> {
    foreign_uid_map(&std::fs::read_to_string("/proc/self/uid_map").ok()?)
}

fn foreign_uid_map(text: &str) -> Option<String> {
    let map = text.split_whitespace().collect::<Vec<_>>().join(" ");
    (!map.is_empty() && map != "0 0 4294967295").then_some(map)
}

/// The first kernel with the BPF ring buffer.
const RING_BUFFER_SINCE: KernelVersion = KernelVersion::new(5, 8, 0);

fn has_ring_buffer(release: KernelVersion) -> bool {
    release >= RING_BUFFER_SINCE
}

/// Checks the host before touching anything, so each missing piece gets
/// one clear line.
pub fn preflight(opts: &ProbeOptions) -> Result<(), ProbeError> {
    if !may_load() {
        return Err(ProbeError::NotRoot);
    }
    if let Some(uid_map) = user_namespace() {
        return Err(ProbeError::UserNamespace { uid_map });
    }
    if BPF_OBJECT.is_empty() {
        return Err(ProbeError::NoObject);
    }
    if !opts.btf_path.exists() {
        return Err(ProbeError::NoBtf {
            path: opts.btf_path.clone(),
        });
    }
    // A release that cannot be read is let through: loading will say more.
    if let Ok(release) = KernelVersion::current() {
        if !has_ring_buffer(release) {
            return Err(ProbeError::NoRingBuffer { release });
        }
    }
    Ok(())
}

fn raise_memlock() {
    // Kernels since 5.11 charge BPF memory to the cgroup; RLIMIT_MEMLOCK
    // only matters before that, and may not be raisable (no
    // CAP_SYS_RESOURCE), which is fine.
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: rlim is a valid rlimit.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

/// The program's configuration, what it lacks, and the socket's endpoint
/// offsets (or why they are unknown).
type Offsets = (Config, Vec<String>, Result<EndpointOffsets, String>);

/// The program's configuration and the socket's endpoint offsets, from
/// tracefs and the kernel's BTF. The parsed BTF (tens of MB for a kernel's
/// ~140k types) is dropped before this returns, so it is never held
/// together with aya's own parse of the same file.
fn offsets(opts: &ProbeOptions, tracefs_root: &Path) -> Result<Offsets, ProbeError> {
    let btf = Btf::from_file(&opts.btf_path).map_err(|source| ProbeError::BadBtf {
        path: opts.btf_path.clone(),
        source,
    })?;
    let (config, degraded) = build_config(tracefs_root, &btf, opts.wakeup_bytes)?;
    Ok((config, degraded, btf::endpoint_offsets(&btf)))
}

/// Builds the program's configuration from tracefs and BTF.
pub fn build_config(
    tracefs_root: &Path,
    btf: &Btf,
    wakeup_bytes: u64,
) -> Result<(Config, Vec<String>), ProbeError> {
    let state = Format::read(tracefs_root, "sock", "inet_sock_set_state")?;
    let retransmit = Format::read(tracefs_root, "tcp", "tcp_retransmit_skb")?;
    let send_reset = Format::read(tracefs_root, "tcp", "tcp_send_reset")?.reset_layout()?;
    let receive_reset = Format::read(tracefs_root, "tcp", "tcp_receive_reset")?;
    let (sock, missing) = btf::sock_offsets(btf);
    let config = Config {
        wakeup_bytes,
        state_tp: state.state_layout()?,
        retransmit_skaddr: retransmit.offset("skaddr")?,
        send_reset_skaddr: send_reset.skaddr,
        receive_reset_skaddr: receive_reset.offset("skaddr")?,
        retransmit_err: retransmit
            .offset("err")
            .unwrap_or(tcpwatch_common::NO_FIELD),
        send_reset_state: send_reset.state,
        send_reset_reason: send_reset.reason,
        send_reset_saddr: send_reset.saddr,
        send_reset_daddr: send_reset.daddr,
        sock,
    };
    Ok((config, missing))
}

/// One tracepoint and the programs that can attach to it.
struct Hook {
    /// The classic tracepoint program.
    classic: &'static str,
    /// The BTF tracepoint program for the same hook, if there is one.
    btf: Option<&'static str>,
    /// For a BTF program that works beside the classic one rather than in
    /// its place: the map whose entry 0 is set to 1 once the BTF program
    /// is attached (before the classic one), so that the classic program
    /// leaves it what it reports.
    beside: Option<&'static str>,
    category: &'static str,
    name: &'static str,
}

/// The BTF set-state program, which keeps per-socket records when asked.
const SET_STATE_BTF: &str = "inet_sock_set_state_btf";

/// The tracepoints the object's programs attach to (the set-state hook
/// first).
const TRACEPOINTS: [Hook; 5] = [
    Hook {
        classic: "inet_sock_set_state",
        btf: Some(SET_STATE_BTF),
        beside: None,
        category: "sock",
        name: "inet_sock_set_state",
    },
    Hook {
        classic: "bench_floor",
        btf: None,
        beside: None,
        category: "sock",
        name: "inet_sock_set_state",
    },
    Hook {
        classic: "tcp_retransmit_skb",
        btf: Some("tcp_retransmit_skb_btf"),
        beside: None,
        category: "tcp",
        name: "tcp_retransmit_skb",
    },
    // Both: the BTF program sends a full socket's pending record before
    // its reset (and the reset); the classic one's record holds the
    // endpoints the kernel took from the segment answered when no full
    // socket sent the reset (see the kernel programs).
    Hook {
        classic: "tcp_send_reset",
        btf: Some("tcp_send_reset_btf"),
        beside: Some("SEND_RESET_BTF"),
        category: "tcp",
        name: "tcp_send_reset",
    },
    Hook {
        classic: "tcp_receive_reset",
        btf: Some("tcp_receive_reset_btf"),
        beside: None,
        category: "tcp",
        name: "tcp_receive_reset",
    },
];

/// On how many records per CPU the program asks the ring how full it is
/// (to wake the reader once `wakeup_bytes` wait): at most 64, and few
/// enough that all CPUs together write less than half the threshold
/// between two asks, in records of the largest size (a full per-socket
/// record and its header). 1, every record, for small thresholds.
fn wake_every(wakeup_bytes: u64, cpus: usize) -> u32 {
    let largest = (tcpwatch_common::SockRecord::SIZE + 8) as u64;
    let per_cpu = wakeup_bytes / 2 / (cpus.max(1) as u64 * largest);
    per_cpu.clamp(1, 64) as u32
}

/// Set (to anything) to attach the classic tracepoints even where the BTF
/// ones would load: how the fallback is tested on kernels that have both.
pub const CLASSIC_ENV: &str = "TCPWATCH_CLASSIC_TRACEPOINTS";

/// Set (to anything) to keep each socket's transitions in the kernel
/// (socket storage) and send them as one record per socket, where the
/// command and the kernel allow it: how both paths are compared.
pub const PER_SOCKET_ENV: &str = "TCPWATCH_PER_SOCKET";

/// The line said when per-socket records were asked for but not used.
fn per_transition_line(why: &str) -> String {
    format!(
        "one record per transition, not per socket ({why}): the same transitions reach \
         userspace, each as it happens"
    )
}

/// One line per reason hooks were attached as classic tracepoints, naming
/// them: `(hook, why)` in attach order.
fn classic_lines(fallbacks: &[(String, String)]) -> Vec<String> {
    let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
    for (hook, why) in fallbacks {
        match reasons.iter_mut().find(|(w, _)| w == why) {
            Some((_, hooks)) => hooks.push(hook),
            None => reasons.push((why, vec![hook])),
        }
    }
    reasons
        .into_iter()
        .map(|(why, hooks)| {
            format!(
                "{} attached as classic tracepoints, not BTF ones ({why}): they see the same, \
                 but the kernel builds a record before each call and skips them whenever \
                 another tracing program runs on the CPU",
                hooks.join(", ")
            )
        })
        .collect()
}

/// The kernel's BTF as aya reads it, to find BTF tracepoints by their id.
fn tracepoint_types(btf_path: &Path) -> Result<aya::Btf, ProbeError> {
    aya::Btf::parse_file(btf_path, aya::Endianness::default()).map_err(|source| {
        ProbeError::TracepointBtf {
            path: btf_path.to_path_buf(),
            source,
        }
    })
}

/// The types to load the BTF set-state and tcp programs with, or what keeps
/// them from being used.
fn btf_tracepoints<'a>(
    types: Option<&'a Result<aya::Btf, ProbeError>>,
    endpoints: &Result<EndpointOffsets, String>,
) -> Result<&'a aya::Btf, String> {
    let Some(types) = types else {
        return Err("no BTF tracepoint program was asked for".into());
    };
    if std::env::var_os(CLASSIC_ENV).is_some() {
        return Err(format!("{CLASSIC_ENV} is set"));
    }
    if let Err(why) = endpoints {
        return Err(format!(
            "the socket's endpoints are not in the kernel's BTF: {why}"
        ));
    }
    types.as_ref().map_err(|e| btf::with_causes(e))
}

/// Loads and attaches `program` as the BTF tracepoint `name`; on failure
/// it is left unloaded.
fn attach_btf(
    ebpf: &mut Ebpf,
    program: &'static str,
    name: &str,
    btf: &aya::Btf,
) -> Result<(), String> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("the eBPF object has no program `{program}`"))?
        .try_into()
        .map_err(|e: ProgramError| e.to_string())?;
    prog.load(name, btf)
        .map_err(|e| format!("loading it failed: {}", btf::with_causes(&e)))?;
    if let Err(e) = prog.attach() {
        let _ = prog.unload();
        return Err(format!("attaching it failed: {}", btf::with_causes(&e)));
    }
    Ok(())
}

/// Sets entry 0 of the array map `name` to 1.
fn set_flag(ebpf: &mut Ebpf, name: &'static str) -> Result<(), ProbeError> {
    let map = ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?;
    let mut flag: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(map).map_err(|source| ProbeError::Map { name, source })?;
    flag.set(0, 1, 0)
        .map_err(|source| ProbeError::Map { name, source })
}

/// Programs that `load` attaches: everything tcpwatch reads.
const TRACING: &[&str] = &[
    "inet_sock_set_state",
    "tcp_retransmit_skb",
    "tcp_send_reset",
    "tcp_receive_reset",
];

/// The program that does nothing, for measuring the hook's own cost.
const FLOOR: &[&str] = &["bench_floor"];

/// BTF tracepoints `load` also attaches, by program name: the first send or
/// receive on an accepted socket names its owner. They need the running
/// kernel's BTF (the tracepoint is found by its BTF id); without them an
/// accepted socket is its listener's until its process closes it.
const FIRST_USE: [(&str, &str); 2] = [
    ("sock_recv_length", "sock_recv_length"),
    ("sock_send_length", "sock_send_length"),
];

/// What is missing when the first-use programs cannot be attached.
const NO_FIRST_USE: &str = "accepted sockets: their owner is the listener's process until it \
     closes them (the first-use programs could not be attached";

/// Attaches the first-use programs, finding their tracepoints in `btf`.
fn attach_first_use(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<(), ProbeError> {
    for (program, tracepoint) in FIRST_USE {
        let attach_err = |source| ProbeError::Attach {
            tracepoint: format!("btf:{tracepoint}"),
            source,
        };
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(program)
            .ok_or(ProbeError::MissingProgram { program })?
            .try_into()
            .map_err(attach_err)?;
        prog.load(tracepoint, btf).map_err(attach_err)?;
        prog.attach().map_err(attach_err)?;
    }
    Ok(())
}

impl Probe {
    /// Loads the object and attaches tcpwatch's programs.
    pub fn load(opts: &ProbeOptions) -> Result<Probe, ProbeError> {
        Probe::load_programs(opts, TRACING)
    }

    /// Loads the object and attaches only a program that does nothing to
    /// `sock:inet_sock_set_state` (the benchmark's floor).
    pub fn load_floor(opts: &ProbeOptions) -> Result<Probe, ProbeError> {
        Probe::load_programs(opts, FLOOR)
    }

    fn load_programs(opts: &ProbeOptions, programs: &[&str]) -> Result<Probe, ProbeError> {
        preflight(opts)?;
        let (tracefs_root, mounted_tracefs) = tracefs::ensure_mounted()?;
        let (config, degraded, endpoints) = offsets(opts, &tracefs_root)?;
        raise_memlock();
        let wake_every = wake_every(opts.wakeup_bytes, aya::util::nr_cpus().unwrap_or(1024));
        let load = |per_socket: bool| {
            EbpfLoader::new()
                .override_global("CONFIG", &config, true)
                .override_global(
                    "ENDPOINTS",
                    endpoints.as_ref().unwrap_or(&EndpointOffsets::UNKNOWN),
                    true,
                )
                .override_global("PER_SOCKET", &u32::from(per_socket), true)
                .override_global("WAKE_EVERY", &wake_every, true)
                .override_global(aya_log::LEVEL, &diagnostics::level(opts.kernel_log), true)
                .map_max_entries("EVENTS", opts.ring_size)
                .load(BPF_OBJECT)
                .map_err(ProbeError::Load)
        };
        // Parsed once for every BTF tracepoint (it takes a while), and
        // only if one is wanted.
        let wants_btf = programs == TRACING
            || TRACEPOINTS
                .iter()
                .any(|h| h.btf.is_some() && programs.contains(&h.classic));
        let types = wants_btf.then(|| tracepoint_types(&opts.btf_path));
        let btf_types = btf_tracepoints(types.as_ref(), &endpoints);
        // Per-socket records, where asked for, need the BTF set-state
        // program and a kernel that lets it use socket storage (5.11):
        // tried first, and where it does not load, the object is loaded
        // again without them.
        let mut per_transition = None;
        let mut per_socket = None;
        let mut state_attached = None;
        let wants_per_socket =
            opts.per_socket && programs == TRACING && std::env::var_os(PER_SOCKET_ENV).is_some();
        let mut ebpf = match (&btf_types, wants_per_socket) {
            (_, false) => load(false)?,
            (Err(why), true) => {
                per_transition = Some(per_transition_line(&format!("no BTF tracepoints: {why}")));
                load(false)?
            }
            (Ok(types), true) => {
                let mut ebpf = load(true)?;
                let hook = &TRACEPOINTS[0];
                match attach_btf(&mut ebpf, SET_STATE_BTF, hook.name, types) {
                    Ok(()) => {
                        state_attached = Some(hook.classic);
                        per_socket = Some(format!(
                            "one record per socket, not per transition ({PER_SOCKET_ENV} is \
                             set): each socket's transitions wait in the kernel until it opens, \
                             listens or closes"
                        ));
                        ebpf
                    }
                    Err(why) => {
                        per_transition = Some(per_transition_line(&format!(
                            "the set-state program with socket storage did not load: {why}"
                        )));
                        drop(ebpf);
                        load(false)?
                    }
                }
            }
        };
        let mut fallbacks = Vec::new();
        for hook in &TRACEPOINTS {
            if !programs.contains(&hook.classic) || state_attached == Some(hook.classic) {
                continue;
            }
            if let Some(program) = hook.btf {
                let attached = match &btf_types {
                    Ok(types) => attach_btf(&mut ebpf, program, hook.name, types),
                    Err(why) => Err(why.clone()),
                };
                match (attached, hook.beside) {
                    (Ok(()), None) => continue,
                    (Ok(()), Some(flag)) => set_flag(&mut ebpf, flag)?,
                    (Err(why), _) => {
                        fallbacks.push((format!("{}:{}", hook.category, hook.name), why))
                    }
                }
            }
            let (category, name, program) = (hook.category, hook.name, hook.classic);
            let attach_err = |source| ProbeError::Attach {
                tracepoint: format!("{category}:{name}"),
                source,
            };
            let prog: &mut TracePoint = ebpf
                .program_mut(program)
                .ok_or(ProbeError::MissingProgram { program })?
                .try_into()
                .map_err(attach_err)?;
            prog.load().map_err(attach_err)?;
            prog.attach(category, name).map_err(attach_err)?;
        }
        let mut degraded = degraded;
        if let Some(types) = types.as_ref().filter(|_| programs == TRACING) {
            if let Err(e) = types
                .as_ref()
                .map_err(|e| btf::with_causes(e))
                .and_then(|t| attach_first_use(&mut ebpf, t).map_err(|e| btf::with_causes(&e)))
            {
                degraded.push(format!("{NO_FIRST_USE}: {e})"));
            }
        }
        let kernel_log = match opts.kernel_log {
            true => Some(KernelLog::take(&mut ebpf).map_err(ProbeError::KernelLog)?),
            false => None,
        };
        // The BTF tables parsed above are gone: give their pages back.
        drop(types);
        crate::host::release_freed_memory();
        Ok(Probe {
            ebpf,
            degraded,
            classic: classic_lines(&fallbacks),
            per_transition,
            per_socket,
            mounted_tracefs,
            kernel_log,
            ring_size: opts.ring_size,
        })
    }

    /// The program's log records when `--kernel-log` asked for them; can be
    /// taken once.
    pub fn take_kernel_log(&mut self) -> Option<KernelLog> {
        self.kernel_log.take()
    }

    /// The ring buffer of events; can be taken once.
    pub fn take_ring(&mut self) -> Result<EventRing, ProbeError> {
        let name = "EVENTS";
        let map = match self.ebpf.take_map(name) {
            Some(aya::maps::Map::RingBuf(map)) => map,
            Some(_) => {
                return Err(ProbeError::Map {
                    name,
                    source: MapError::InvalidMapType { map_type: 0 },
                })
            }
            None => return Err(ProbeError::MissingMap { name }),
        };
        EventRing::new(map, self.ring_size).map_err(|source| ProbeError::Map { name, source })
    }

    /// The per-CPU count of records the ring buffer had no room for.
    pub fn take_lost_counter(&mut self) -> Result<LostCounter, ProbeError> {
        let name = "LOST";
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(ProbeError::MissingMap { name })?;
        let array =
            PerCpuArray::try_from(map).map_err(|source| ProbeError::Map { name, source })?;
        // The kernel skips a tracepoint program that fires while another
        // BPF program runs on the same CPU (a softirq landing inside one)
        // and counts it per program: those events are lost too.
        Ok(LostCounter {
            array,
            programs: self.programs(),
        })
    }

    /// Handles on the loaded programs, for reading their kernel figures
    /// while the probe is live.
    pub fn programs(&self) -> Programs {
        let mut list = Vec::new();
        for (name, prog) in self.ebpf.programs() {
            if let Ok(fd) = prog.fd() {
                if let Ok(owned) = fd.as_fd().try_clone_to_owned() {
                    list.push((name.to_string(), owned));
                }
            }
        }
        Programs(Arc::new(list))
    }
}

pub struct LostCounter {
    array: PerCpuArray<MapData, u64>,
    programs: Programs,
}

/// The loaded programs, by name (shared: cloning shares the handles).
#[derive(Clone, Debug, Default)]
pub struct Programs(Arc<Vec<(String, OwnedFd)>>);

/// What the kernel counts for one program (`bpf_prog_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    /// Time spent running it, in ns: counted only while BPF statistics are
    /// on (`kernel.bpf_stats_enabled`).
    pub run_time_ns: u64,
    /// Times it ran: counted only while BPF statistics are on.
    pub run_count: u64,
    /// Times the kernel skipped it because another BPF program was running
    /// on that CPU: always counted.
    pub recursion_misses: u64,
}

impl Programs {
    /// Each program's figures now (those the kernel would not describe are
    /// left out).
    pub fn stats(&self) -> Vec<ProgramStats> {
        self.0
            .iter()
            .filter_map(|(name, fd)| {
                let info = prog_info(fd.as_fd())?;
                Some(ProgramStats {
                    name: name.clone(),
                    run_time_ns: info.run_time_ns,
                    run_count: info.run_cnt,
                    recursion_misses: info.recursion_misses,
                })
            })
            .collect()
    }
}

/// `kernel.bpf_stats_enabled`: whether the sysctl turns on the counting of
/// BPF programs' run time and runs. It does not show `BPF_ENABLE_STATS`
/// handles, which turn it on too. `None` when it cannot be read.
pub fn bpf_stats_enabled() -> Option<bool> {
    let text = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
    Some(text.trim() != "0")
}

/// Turns the kernel's BPF run-time statistics on for as long as the
/// returned handle is held (other holders and the sysctl are left alone).
pub fn enable_bpf_stats() -> Result<OwnedFd, aya::sys::SyscallError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
}

/// `bpf_prog_info` of one program, or `None` when the kernel does not say.
fn prog_info(fd: BorrowedFd<'_>) -> Option<aya_obj::generated::bpf_prog_info> {
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: std::ptr::addr_of_mut!(info) as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: attr points at a valid, writable bpf_prog_info of the size
    // given; the kernel writes at most info_len bytes into it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<InfoByFd>(),
        )
    };
    (rc == 0).then_some(info)
}

impl LostCounter {
    /// Events lost since load, over all CPUs and programs.
    pub fn counts(&self) -> LostCounts {
        let ring_full = self
            .array
            .get(&LOST_SLOT, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0);
        let skipped = self
            .programs
            .stats()
            .iter()
            .map(|p| p.recursion_misses)
            .sum();
        LostCounts { ring_full, skipped }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_checks_keep_within_half_the_threshold() {
        let largest = (tcpwatch_common::SockRecord::SIZE + 8) as u64;
        // The default: 1 MiB of an 8 MiB ring.
        for cpus in [1, 2, 8, 64, 1024] {
            let every = wake_every(1 << 20, cpus);
            assert!((1..=64).contains(&every));
            if every > 1 {
                assert!(
                    u64::from(every) * cpus as u64 * largest <= 1 << 19,
                    "{cpus} cpus"
                );
            }
        }
        assert_eq!(wake_every(1 << 20, 2), 64);
        assert_eq!(wake_every(1 << 20, 1024), 1);
        // A one-page ring wakes at 512 bytes: asked on every record.
        assert_eq!(wake_every(512, 1), 1);
        assert_eq!(wake_every(0, 0), 1);
    }

    #[test]
    fn capabilities_that_may_load() {
        let status = "Name:\tx\nCapPrm:\t0\nCapEff:\t000000c000000000\nCapBnd:\t0\n";
        assert_eq!(effective_caps(status), (1 << CAP_BPF) | (1 << CAP_PERFMON));
        assert!(may_load_with(effective_caps(status)));
        assert!(may_load_with(effective_caps("CapEff:\t000001ffffffffff\n")));
        assert!(may_load_with(1 << CAP_SYS_ADMIN));
        assert!(!may_load_with(1 << CAP_BPF));
        assert!(!may_load_with(1 << CAP_PERFMON));
        assert!(!may_load_with(effective_caps(
            "CapEff:\t0000000000000000\n"
        )));
        assert_eq!(effective_caps("no such line"), 0);
    }

    #[test]
    fn only_the_initial_user_namespace_may_load() {
        assert_eq!(foreign_uid_map("         0          0 4294967295\n"), None);
        assert_eq!(
            foreign_uid_map("         0          0          1\n"),
            Some("0 0 1".into())
        );
        assert_eq!(
            foreign_uid_map("0 100000 65536\n"),
            Some("0 100000 65536".into())
        );
        assert_eq!(foreign_uid_map(""), None);
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256K"), Ok(256 * 1024));
        assert_eq!(parse_size("16m"), Ok(16 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn ring_size_must_be_a_power_of_two_of_pages() {
        assert_eq!(check_ring_size(4096), Ok(4096));
        assert_eq!(check_ring_size(16 << 20), Ok(16 << 20));
        assert!(check_ring_size(4095).is_err());
        assert!(check_ring_size(12288).is_err());
        assert!(check_ring_size(2048).is_err());
        assert!(check_ring_size(1 << 31).is_err());
    }

    #[test]
    fn fallbacks_are_one_line_per_reason() {
        let f = |hook: &str, why: &str| (hook.to_string(), why.to_string());
        let lines = classic_lines(&[
            f("sock:inet_sock_set_state", "no endpoints"),
            f("tcp:tcp_send_reset", "loading it failed: EINVAL"),
            f("tcp:tcp_receive_reset", "no endpoints"),
        ]);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with(
                "sock:inet_sock_set_state, tcp:tcp_receive_reset attached as classic \
                 tracepoints, not BTF ones (no endpoints)"
            ),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with("tcp:tcp_send_reset attached"),
            "{lines:?}"
        );
        assert!(classic_lines(&[]).is_empty());
    }

    #[test]
    fn ring_buffer_since_5_8() {
        assert!(has_ring_buffer(KernelVersion::new(6, 18, 44)));
        assert!(has_ring_buffer(KernelVersion::new(5, 8, 0)));
        assert!(has_ring_buffer(KernelVersion::new(5, 10, 0)));
        assert!(!has_ring_buffer(KernelVersion::new(5, 7, 255)));
        assert!(!has_ring_buffer(KernelVersion::new(5, 4, 0)));
        assert!(!has_ring_buffer(KernelVersion::new(4, 19, 300)));
    }

    #[test]
    fn the_object_is_embedded_when_built_by_xtask() {
        if std::env::var_os("TCPWATCH_BPF_OBJECT").is_none() && BPF_OBJECT.is_empty() {
            eprintln!("skipped: built without TCPWATCH_BPF_OBJECT (plain cargo build)");
            return;
        }
        assert!(
            BPF_OBJECT.starts_with(b"\x7fELF"),
            "embedded object is not ELF"
        );
    }
}
