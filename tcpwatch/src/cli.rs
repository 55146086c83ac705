//! Command-line arguments. Bad input is one line on stderr and exit status 2.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::host::netns::NetnsSpec;
use crate::kernel::probe;
use crate::model::filter::{Cidr, CidrError, Filter};
use crate::model::Family;
pub use crate::views::log::LogFormat;
use crate::views::Format;

#[derive(Debug, Parser)]
#[command(
    name = "tcpwatch",
    version,
    about = "Trace the lifecycle of every TCP connection on this host",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every TCP state transition as it happens.
    Trace(TraceArgs),
    /// Print one record per finished connection: how it opened and closed.
    Conns(ConnsArgs),
    /// Draw each finished connection as a ladder of segments between its two ends.
    Ladder(LadderArgs),
    /// Show who makes the host's TIME_WAIT sockets, toward where, and when ports run out.
    Timewait(TimewaitArgs),
    /// A full-screen live view: connections per second, lost events, TIME_WAIT by destination and process.
    Top(TopArgs),
    /// Write the raw event stream to a file, for `replay`.
    Record(RecordArgs),
    /// Produce `trace`, `conns`, `ladder` or `timewait` output from a recording, offline.
    Replay(ReplayArgs),
    /// Run for good: serve metrics to Prometheus and connections and TIME_WAIT to `--from`.
    Daemon(DaemonArgs),
    /// Measurements for `cargo xtask bench` (not for everyday use).
    #[command(hide = true)]
    Bench(BenchArgs),
}

#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand, Clone)]
pub enum BenchWhat {
    /// Attach a program that does nothing to sock:inet_sock_set_state.
    Floor {
        #[command(flatten)]
        probe: ProbeArgs,
        #[arg(long, value_name = "SECS", value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// Events per second through the correlator on one core (JSON).
    Correlator {
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
    },
    /// Memory per tracked open connection (JSON).
    Memory {
        #[arg(long, default_value_t = 1_000_000)]
        connections: u64,
    },
    /// Memory per tracked timewait socket (JSON).
    TimewaitMemory {
        #[arg(long, default_value_t = 131_072)]
        sockets: u64,
    },
    /// The daemon's work (TIME_WAIT accounting, metrics, kept connections)
    /// over a recording, offline: prints what it would serve at the end
    /// (metrics, every namespace's snapshot, the newest connections), so
    /// its CPU can be measured on a fixed workload.
    Daemon {
        /// A file written by `tcpwatch record`.
        file: PathBuf,
        /// Seconds of the recording between TIME_WAIT snapshots.
        #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_duration)]
        interval: Duration,
    },
}

#[derive(Debug, Args, Clone)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub netns: NetnsArg,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Do not print the column header (text format).
    #[arg(long)]
    pub no_header: bool,
    /// Read a running `tcpwatch daemon` (http://HOST:PORT) instead of loading programs here.
    #[arg(long, value_name = "URL")]
    pub from: Option<String>,
    /// Text output in the host's local time (follows TZ) instead of UTC.
    #[arg(long)]
    pub local_time: bool,
}

#[derive(Debug, Args, Clone)]
pub struct LadderArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub netns: NetnsArg,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Pictures (text), or one JSON object per connection; the exit summary follows.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Text output in the host's local time (follows TZ) instead of UTC.
    #[arg(long)]
    pub local_time: bool,
}

#[derive(Debug, Args, Clone)]
pub struct TimewaitArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// The network namespace whose TIME_WAIT to show: NAME (in /run/netns),
    /// pid:PID, its inode number, or /PATH to a namespace file. Default:
    /// tcpwatch's own.
    #[arg(long, value_name = "NS", value_parser = parse_one_netns)]
    pub netns: Option<NetnsSpec>,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Seconds between snapshots.
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_duration)]
    pub interval: Duration,
    /// Seconds between checks of the TIME_WAIT counts against the kernel's
    /// list of timewait sockets (sock_diag), which are kept up to date from
    /// events in between. The list is also read at start, after lost
    /// events, after tcp_max_tw_buckets overflowed, and at every snapshot
    /// while the kernel holds at most 10,000.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_duration)]
    pub check_interval: Duration,
    /// How many groups to show in each table.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = parse_positive_usize)]
    pub top: usize,
    #[command(flatten)]
    pub churn: ChurnArgs,
    /// Output format: a table (redrawn in place on a terminal) or one JSON object per interval.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Read a running `tcpwatch daemon` (http://HOST:PORT) instead of loading programs here.
    #[arg(long, value_name = "URL")]
    pub from: Option<String>,
    /// Text output in the host's local time (follows TZ) instead of UTC.
    #[arg(long)]
    pub local_time: bool,
}

#[derive(Debug, Args, Clone)]
pub struct TopArgs {
    /// Which sockets to count (by address and port: `--pid` and `--comm`
    /// cannot apply, as a connection is counted when it opens, before its
    /// owner is known).
    #[command(flatten)]
    pub filter: FilterArgs,
    /// The network namespace to show: NAME (in /run/netns), pid:PID, its
    /// inode number, or /PATH to a namespace file. Default: tcpwatch's own.
    #[arg(long, value_name = "NS", value_parser = parse_one_netns)]
    pub netns: Option<NetnsSpec>,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Seconds between refreshes.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_duration)]
    pub interval: Duration,
    /// Destinations and processes kept for the tables (as many as fit are shown).
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = parse_positive_usize)]
    pub top: usize,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Read a running `tcpwatch daemon` (http://HOST:PORT) instead of loading programs here.
    #[arg(long, value_name = "URL")]
    pub from: Option<String>,
    /// Format of the exit summary on stderr (the view is a screen).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Args, Clone)]
pub struct DaemonArgs {
    /// Address to serve HTTP on (an IP address or a host name such as localhost). Loopback unless you ask otherwise.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9977", value_parser = parse_listen)]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// A network namespace to report (repeatable): NAME (in /run/netns),
    /// pid:PID, its inode number, /PATH to a namespace file, or all.
    /// Default: every namespace.
    #[arg(long = "netns", value_name = "NS", value_parser = parse_netns)]
    pub netns: Vec<NetnsSpec>,
    /// Seconds between TIME_WAIT snapshots.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_duration)]
    pub interval: Duration,
    /// Seconds between checks of the TIME_WAIT counts against the kernel's
    /// list of timewait sockets (sock_diag), which are kept up to date from
    /// events in between. The list is also read at start, after lost
    /// events, after tcp_max_tw_buckets overflowed, and at every snapshot
    /// while the kernel holds at most 10,000.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_duration)]
    pub check_interval: Duration,
    /// Namespaces, processes, containers and destinations given their own series; the rest are summed as `other`.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = parse_positive_usize)]
    pub top: usize,
    #[command(flatten)]
    pub churn: ChurnArgs,
    /// Finished connections kept for /api/conns.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = parse_positive_usize)]
    pub keep: usize,
    /// Turn on the kernel's BPF run-time statistics while the daemon runs, so
    /// tcpwatch_bpf_program_run_seconds_total counts (two clock reads per program run).
    #[arg(long)]
    pub bpf_stats: bool,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

#[derive(Debug, Args, Clone)]
pub struct RecordArgs {
    /// File to write (created with mode 0600).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Which sockets to keep (by address, port and family; `--pid` and
    /// `--comm` belong to `replay`, as a socket's owner is often known only
    /// after its first transitions).
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub netns: NetnsArg,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Format of the exit summary on stderr (the recording is binary).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Args, Clone)]
pub struct ReplayArgs {
    /// A file written by `tcpwatch record`.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    #[command(subcommand)]
    pub view: ReplayView,
}

#[derive(Debug, Subcommand, Clone)]
pub enum ReplayView {
    /// Transitions, as `tcpwatch trace` prints them.
    Trace(ReplayOutputArgs),
    /// Finished connections, as `tcpwatch conns` prints them.
    Conns(ReplayOutputArgs),
    /// Ladder pictures (or their JSON), as `tcpwatch ladder` draws them.
    Ladder(ReplayLadderArgs),
    /// TIME_WAIT snapshots in the events' time, as `tcpwatch timewait`
    /// shows them, as far as the events tell (no kernel is asked).
    Timewait(ReplayTimewaitArgs),
}

#[derive(Debug, Args, Clone)]
pub struct ReplayTimewaitArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Seconds of the recording between snapshots.
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_duration)]
    pub interval: Duration,
    /// How many groups to show in each table.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = parse_positive_usize)]
    pub top: usize,
    #[command(flatten)]
    pub churn: ChurnArgs,
    /// A table per snapshot, or one JSON object per snapshot.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Most sockets tracked at once.
    #[arg(long, value_name = "N", default_value_t = 262_144, value_parser = parse_positive_usize)]
    pub max_sockets: usize,
    /// Text output in the host's local time (follows TZ) instead of UTC.
    #[arg(long)]
    pub local_time: bool,
}

/// When a process's connections are reported as churn that should have
/// been a pool.
#[derive(Debug, Args, Clone)]
pub struct ChurnArgs {
    /// Pool churn: fewest new connections per second to one destination.
    #[arg(long, value_name = "PER_S", default_value = "20", value_parser = parse_positive_f64)]
    pub churn_rate: f64,
    /// Pool churn: longest median lifetime of those connections, in ms.
    #[arg(long, value_name = "MS", default_value = "1000", value_parser = parse_positive_f64)]
    pub churn_life: f64,
    /// Pool churn: smallest share of them closed first by the client (each leaving TIME_WAIT on its side), in percent.
    #[arg(long, value_name = "PERCENT", default_value = "80", value_parser = parse_percent)]
    pub churn_share: f64,
    /// Pool churn: seconds over which the rate, median and share are counted.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration)]
    pub churn_window: Duration,
}

impl ChurnArgs {
    pub fn options(&self) -> crate::model::churn::ChurnOptions {
        crate::model::churn::ChurnOptions {
            window_ns: self.churn_window.as_nanos().min(u128::from(u64::MAX)) as u64,
            min_rate: self.churn_rate,
            max_median_life_ns: (self.churn_life * 1e6) as u64,
            min_timewait_share: self.churn_share / 100.0,
            ..crate::model::churn::ChurnOptions::default()
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct ReplayOutputArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Do not print the column header (text format).
    #[arg(long)]
    pub no_header: bool,
    /// Most sockets tracked at once.
    #[arg(long, value_name = "N", default_value_t = 262_144, value_parser = parse_positive_usize)]
    pub max_sockets: usize,
    /// Text output in the host's local time (follows TZ) instead of UTC.
    #[arg(long)]
    pub local_time: bool,
}

impl ProbeArgs {
    pub fn options(&self) -> probe::ProbeOptions {
        probe::ProbeOptions {
            ring_size: self.ring_size,
            wakeup_bytes: u64::from(self.ring_size / 8),
            btf_path: self.btf.clone(),
            kernel_log: self.kernel_log,
            per_socket: true,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct ReplayLadderArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Pictures (text), or one JSON object per connection; the exit summary follows.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Most sockets tracked at once.
    #[arg(long, value_name = "N", default_value_t = 262_144, value_parser = parse_positive_usize)]
    pub max_sockets: usize,
    /// Text output in the host's local time (follows TZ) instead of UTC.
    #[arg(long)]
    pub local_time: bool,
}

/// Which sockets to show.
#[derive(Debug, Args, Clone, Default)]
pub struct FilterArgs {
    /// Only sockets owned by this process id (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only sockets owned by a process with this command name (repeatable; the kernel keeps 15 characters).
    #[arg(long = "comm", value_name = "NAME", value_parser = parse_comm)]
    pub comms: Vec<String>,
    /// Only sockets with this local port (repeatable).
    #[arg(long = "lport", value_name = "PORT", value_parser = parse_port)]
    pub lports: Vec<u16>,
    /// Only sockets with this remote port (repeatable).
    #[arg(long = "rport", value_name = "PORT", value_parser = parse_port)]
    pub rports: Vec<u16>,
    /// Only sockets with this port on either side, local or remote (repeatable).
    #[arg(long = "port", value_name = "PORT", value_parser = parse_port)]
    pub ports: Vec<u16>,
    /// Only sockets whose local address is in this address or CIDR network (repeatable).
    #[arg(long = "laddr", value_name = "ADDR[/LEN]", value_parser = parse_cidr)]
    pub laddrs: Vec<Cidr>,
    /// Only sockets whose remote address is in this address or CIDR network (repeatable).
    #[arg(long = "raddr", value_name = "ADDR[/LEN]", value_parser = parse_cidr)]
    pub raddrs: Vec<Cidr>,
    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6 sockets.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Only sockets owned by a process in this cgroup or below it
    /// (repeatable): a cgroup v2 path such as /system.slice/docker-ID.scope,
    /// or the same path under the cgroup2 mount (/sys/fs/cgroup/...).
    #[arg(long = "cgroup", value_name = "PATH", value_parser = parse_cgroup)]
    pub cgroups: Vec<String>,
}

/// Which network namespace a command watches.
#[derive(Debug, Args, Clone, Default)]
pub struct NetnsArg {
    /// The network namespace to watch: NAME (in /run/netns), pid:PID, its
    /// inode number, /PATH to a namespace file, or all. Default: tcpwatch's
    /// own.
    #[arg(long, value_name = "NS", value_parser = parse_netns)]
    pub netns: Option<NetnsSpec>,
}

impl NetnsArg {
    pub fn specs(&self) -> Vec<NetnsSpec> {
        self.netns.iter().cloned().collect()
    }
}

impl FilterArgs {
    pub fn to_filter(&self) -> Filter {
        Filter {
            pids: self.pids.clone(),
            comms: self.comms.clone(),
            lports: self.lports.clone(),
            rports: self.rports.clone(),
            ports: self.ports.clone(),
            laddrs: self.laddrs.clone(),
            raddrs: self.raddrs.clone(),
            family: if self.ipv4 {
                Some(Family::V4)
            } else if self.ipv6 {
                Some(Family::V6)
            } else {
                None
            },
            cgroups: self
                .cgroups
                .iter()
                .map(|c| crate::host::cgroup::hierarchy_path(c))
                .collect(),
        }
    }
}

/// How the kernel side is set up.
#[derive(Debug, Args, Clone)]
pub struct ProbeArgs {
    /// Ring buffer size: a power of two, e.g. 256K, 16M.
    #[arg(long, value_name = "BYTES", default_value = "16M", value_parser = parse_ring_size)]
    pub ring_size: u32,
    /// Kernel BTF to read socket field offsets from.
    #[arg(long, value_name = "PATH", default_value = probe::DEFAULT_BTF)]
    pub btf: PathBuf,
    /// Most sockets tracked at once; the oldest is evicted (and counted) beyond it.
    #[arg(long, value_name = "N", default_value_t = 262_144, value_parser = parse_positive_usize)]
    pub max_sockets: usize,
    /// Say the kernel program's own diagnostics (e.g. a socket field it could not read).
    #[arg(long)]
    pub kernel_log: bool,
}

#[derive(Debug, Args, Clone)]
pub struct TraceArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub netns: NetnsArg,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Do not print the column header (text format).
    #[arg(long)]
    pub no_header: bool,
    /// Text output in the host's local time (follows TZ) instead of UTC.
    #[arg(long)]
    pub local_time: bool,
}

/// A value on the command line that does not read.
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    #[error("port {0} is out of range (1-65535)")]
    PortRange(u64),
    #[error("'{0}' is not a port number")]
    NotAPort(String),
    #[error("'{0}' must be a whole number greater than 0")]
    NotPositive(String),
    #[error("'{0}' must be a number of seconds greater than 0")]
    NotSeconds(String),
    #[error("'{0}' must be a number greater than 0")]
    NotPositiveNumber(String),
    #[error("'{0}' must be a percentage from 0 to 100")]
    NotPercent(String),
    #[error("a process name cannot be empty")]
    EmptyComm,
    #[error("'{0}' is not ADDR:PORT or HOST:PORT with a host name that resolves")]
    NotListen(String),
    /// What the address parser says is wrong.
    #[error(transparent)]
    Cidr(CidrError),
    /// What the ring size check says is wrong.
    #[error(transparent)]
    RingSize(probe::SizeError),
    /// What the namespace parser says is wrong.
    #[error("{0}")]
    Netns(String),
    #[error("'{0}' is not a cgroup path: give it from the cgroup root, starting with /")]
    NotCgroup(String),
}

fn parse_port(s: &str) -> Result<u16, ArgError> {
    match s.parse::<u64>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(ArgError::PortRange(p)),
        Err(_) => Err(ArgError::NotAPort(s.to_string())),
    }
}

/// `ADDR:PORT` or `HOST:PORT`: a host name is resolved, and its first
/// address taken (IPv4 before IPv6, so `localhost` is 127.0.0.1).
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, ArgError> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    if s.rsplit_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    {
        return Err(ArgError::NotListen(s.to_string()));
    }
    let addrs: Vec<std::net::SocketAddr> = s
        .to_socket_addrs()
        .map_err(|_| ArgError::NotListen(s.to_string()))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| ArgError::NotListen(s.to_string()))
}

/// Characters the kernel keeps of a process name (TASK_COMM_LEN less the NUL).
const COMM_LEN: usize = 15;

/// A process name as the kernel has it: a longer one is cut to its first
/// 15 bytes, which is all a process's name can match, and said so.
fn parse_comm(s: &str) -> Result<String, ArgError> {
    if s.is_empty() {
        return Err(ArgError::EmptyComm);
    }
    if s.len() <= COMM_LEN {
        return Ok(s.to_string());
    }
    let mut end = COMM_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = &s[..end];
    tracing::warn!(
        "--comm {s:?} is longer than the {COMM_LEN} characters the kernel keeps of a process name: matching {cut:?}"
    );
    Ok(cut.to_string())
}

fn parse_cidr(s: &str) -> Result<Cidr, ArgError> {
    s.parse().map_err(ArgError::Cidr)
}

fn parse_netns(s: &str) -> Result<NetnsSpec, ArgError> {
    s.parse().map_err(ArgError::Netns)
}

/// One namespace: `all` is refused (timewait's figures are one namespace's).
fn parse_one_netns(s: &str) -> Result<NetnsSpec, ArgError> {
    match parse_netns(s)? {
        NetnsSpec::All => Err(ArgError::Netns(
            "timewait and top show one namespace's figures: give one namespace, not all (the daemon reports every namespace)".into(),
        )),
        spec => Ok(spec),
    }
}

fn parse_cgroup(s: &str) -> Result<String, ArgError> {
    if s.starts_with('/') {
        Ok(s.to_string())
    } else {
        Err(ArgError::NotCgroup(s.to_string()))
    }
}

fn parse_ring_size(s: &str) -> Result<u32, ArgError> {
    probe::parse_size(s)
        .and_then(probe::check_ring_size)
        .map_err(ArgError::RingSize)
}

pub fn parse_positive_usize(s: &str) -> Result<usize, ArgError> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ArgError::NotPositive(s.to_string())),
    }
}

/// A number greater than zero (not infinite).
pub fn parse_positive_f64(s: &str) -> Result<f64, ArgError> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(ArgError::NotPositiveNumber(s.to_string())),
    }
}

/// A percentage, 0 to 100.
pub fn parse_percent(s: &str) -> Result<f64, ArgError> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(ArgError::NotPercent(s.to_string())),
    }
}

/// Seconds, possibly fractional, greater than zero.
pub fn parse_duration(s: &str) -> Result<Duration, ArgError> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(ArgError::NotSeconds(s.to_string())),
    }
}

/// Parses arguments; on bad input logs one line (`tcpwatch: ...` with the
/// commands' log format) and exits 2 (help and version print normally and
/// exit 0).
pub fn parse() -> Cli {
    parse_from(std::env::args_os())
}

pub fn parse_from<I, T>(args: I) -> Cli
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
                _ => {
                    tracing::error!("{}", one_line(&e));
                    std::process::exit(2);
                }
            }
        }
    }
}

/// clap's message on one line, without its "error: " prefix and usage
/// lines: naming the arguments that are missing, and listing the values
/// that would have been valid.
pub fn one_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let message = e.render().to_string();
    let mut lines = message.lines();
    let mut line = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .trim()
        .to_string();
    // "the following required arguments were not provided:" and the
    // arguments on the lines below it.
    if line.ends_with(':') {
        let named: Vec<&str> = lines
            .take_while(|l| l.starts_with("  "))
            .map(str::trim)
            .collect();
        line = format!("{} {}", line, named.join(", "));
    }
    let words = |kind| match e.get(kind) {
        Some(ContextValue::Strings(v)) => v.clone(),
        Some(ContextValue::String(v)) => vec![v.clone()],
        _ => Vec::new(),
    };
    let valid = words(ContextKind::ValidValue);
    if !valid.is_empty() {
        line = format!("{line} (valid: {})", valid.join(", "));
    }
    let similar = words(ContextKind::SuggestedArg);
    if !similar.is_empty() {
        line = format!("{line} (did you mean {}?)", similar.join(" or "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tcpwatch").chain(args.iter().copied()))
    }

    #[test]
    fn trace_takes_repeatable_filters() {
        let cli = try_parse(&[
            "trace",
            "--pid",
            "1",
            "--pid",
            "2",
            "--lport",
            "80",
            "--rport",
            "443",
            "--comm",
            "nginx",
            "-4",
            "--format",
            "json",
            "--duration",
            "1.5",
            "--ring-size",
            "256K",
            "--raddr",
            "10.0.0.0/8",
        ])
        .unwrap();
        let Command::Trace(t) = cli.command else {
            panic!("not trace")
        };
        let f = t.filter.to_filter();
        assert_eq!(f.pids, vec![1, 2]);
        assert_eq!(f.lports, vec![80]);
        assert_eq!(f.rports, vec![443]);
        assert_eq!(f.comms, vec!["nginx".to_string()]);
        assert_eq!(f.family, Some(Family::V4));
        assert_eq!(f.raddrs.len(), 1);
        assert_eq!(t.format, Format::Json);
        assert_eq!(t.duration, Some(Duration::from_millis(1500)));
        assert_eq!(t.probe.ring_size, 256 * 1024);
    }

    #[test]
    fn bad_input_is_rejected_with_one_line() {
        for args in [
            &["trace", "--lport", "70000"][..],
            &["trace", "--lport", "0"],
            &["trace", "--rport", "http"],
            &["trace", "--raddr", "10.0.0.300"],
            &["trace", "--laddr", "::1/200"],
            &["trace", "--bogus"],
            &["trace", "--duration", "0"],
            &["trace", "--duration", "-3"],
            &["trace", "--ring-size", "1000"],
            &["trace", "--max-sockets", "0"],
            &["trace", "-4", "-6"],
            &["trace", "--format", "xml"],
            &["timewait", "--top", "0"],
            &["timewait", "--netns", "all"],
            &["trace", "--netns", "pid:x"],
            &["trace", "--netns", "a/b"],
            &["conns", "--cgroup", "system.slice"],
            &["timewait", "--interval", "0"],
            &["timewait", "--interval", "-1"],
            &["timewait", "--interval", "soon"],
            &["top", "--interval", "0"],
            &["top", "--top", "0"],
            &["top", "--bogus"],
            &["nosuchcommand"],
        ] {
            let err = try_parse(args).expect_err(&format!("{args:?} should fail"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
            let line = one_line(&err);
            assert!(!line.is_empty() && !line.contains('\n'), "{args:?}: {line}");
        }
    }

    /// The line names what is missing and lists what would be valid.
    #[test]
    fn bad_input_line_says_what_to_give() {
        let line = |args: &[&str]| one_line(&try_parse(args).expect_err("should fail"));
        assert_eq!(
            line(&["record"]),
            "the following required arguments were not provided: --output <FILE>"
        );
        assert_eq!(
            line(&["conns", "--format", "yaml"]),
            "invalid value 'yaml' for '--format <FORMAT>' (valid: text, json)"
        );
        let unknown = line(&["conns", "--formt", "json"]);
        assert!(
            unknown.starts_with("unexpected argument '--formt' found")
                && unknown.contains("--format"),
            "{unknown}"
        );
    }

    #[test]
    fn listen_takes_addresses_and_host_names() {
        let at = |s: &str| parse_listen(s).map(|a| a.to_string());
        assert_eq!(at("127.0.0.1:9977").unwrap(), "127.0.0.1:9977");
        assert_eq!(at("[::1]:9977").unwrap(), "[::1]:9977");
        assert_eq!(at("localhost:9977").unwrap(), "127.0.0.1:9977");
        for bad in [
            "localhost",
            "localhost:http",
            "localhost:70000",
            "no-such-host.invalid:1",
            "",
        ] {
            let e = at(bad).unwrap_err().to_string();
            assert!(e.contains("ADDR:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_long_comm_is_cut_to_what_the_kernel_keeps() {
        assert_eq!(parse_comm("nginx").unwrap(), "nginx");
        assert_eq!(parse_comm("exactly15chars!").unwrap(), "exactly15chars!");
        assert_eq!(
            parse_comm("twpeer-a-client-and-more").unwrap(),
            "twpeer-a-client"
        );
        // Not inside a character: 14 bytes, then a 2-byte one.
        assert_eq!(parse_comm("abcdefghijklmné-x").unwrap(), "abcdefghijklmn");
        assert!(parse_comm("").is_err());
        let cli = try_parse(&["trace", "--comm", "a-very-long-process-name"]).unwrap();
        let Command::Trace(t) = cli.command else {
            panic!("trace")
        };
        assert_eq!(t.filter.to_filter().comms, vec!["a-very-long-pro"]);
    }

    #[test]
    fn port_message_names_the_range() {
        assert_eq!(
            parse_port("70000").unwrap_err().to_string(),
            "port 70000 is out of range (1-65535)"
        );
    }
}
