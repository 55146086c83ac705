//! Writing finished connections: aligned text columns or one JSON object per
//! connection.

use std::fmt::Write as _;

use serde::Serialize;

use crate::clock::Clock;
use crate::correlate::{CloseKind, Closer, OpenKind, Role, Timeline, TimewaitSubstate};
use crate::owner::OwnerSource;

pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        1 => "EPERM",
        11 => "EAGAIN",
        32 => "EPIPE",
        22 => "EINVAL",
        98 => "EADDRINUSE",
        99 => "EADDRNOTAVAIL",
        100 => "ENETDOWN",
        101 => "ENETUNREACH",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        112 => "EHOSTDOWN",
        113 => "EHOSTUNREACH",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

pub fn open_name(o: OpenKind) -> &'static str {
    match o {
        OpenKind::Active => "active",
        OpenKind::Passive => "passive",
        OpenKind::Refused => "refused",
        OpenKind::TimedOut => "timed_out",
        OpenKind::Failed => "failed",
        OpenKind::PassiveFailed => "passive_failed",
        OpenKind::BeforeTrace => "before_trace",
    }
}

pub fn close_name(c: CloseKind) -> &'static str {
    match c {
        CloseKind::Orderly => "orderly",
        CloseKind::Simultaneous => "simultaneous",
        CloseKind::ResetSent => "reset_sent",
        CloseKind::ResetReceived => "reset_received",
        CloseKind::Aborted => "aborted",
        CloseKind::FinWait2 => "fin_wait2",
        CloseKind::FinWait2Timeout => "fin_wait2_timeout",
        CloseKind::Error => "error",
        CloseKind::NeverOpened => "never_opened",
        CloseKind::Unknown => "unknown",
    }
}

pub fn closer_name(c: Closer) -> &'static str {
    match c {
        Closer::Local => "local",
        Closer::Peer => "peer",
        Closer::Both => "both",
    }
}

pub fn role_name(r: Role) -> Option<&'static str> {
    match r {
        Role::Client => Some("client"),
        Role::Server => Some("server"),
        Role::Unknown => None,
    }
}

pub fn substate_name(s: TimewaitSubstate) -> &'static str {
    match s {
        TimewaitSubstate::TimeWait => "TIME_WAIT",
        TimewaitSubstate::FinWait2 => "FIN_WAIT2",
    }
}

fn source_name(s: OwnerSource) -> &'static str {
    match s {
        OwnerSource::Observed => "observed",
        OwnerSource::Listener => "listener",
        OwnerSource::Procfs => "procfs",
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

pub const CONNS_HEADER: &str = concat!(
    "CLOSED(UTC)     PID     COMM             ROLE   LOCAL                        REMOTE                       ",
    "OPEN         HS_MS    LIFE_MS CLOSE              BY    SEGS TIMEWAIT         TX         RX  RTT_US RETX"
);

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub fn conns_text(t: &Timeline, clock: &Clock) -> String {
    let (pid, comm) = match &t.owner {
        Some(a) => (a.owner.pid.to_string(), a.owner.comm.as_str()),
        None => ("-".to_string(), "-"),
    };
    let close = match (t.close, t.error) {
        (CloseKind::Error | CloseKind::NeverOpened, Some(e)) => {
            format!("{}:{}", close_name(t.close), errno_name(e))
        }
        _ => close_name(t.close).to_string(),
    };
    let open = match (t.open, t.error) {
        (OpenKind::Failed, Some(e)) => format!("failed:{}", errno_name(e)),
        _ => open_name(t.open).to_string(),
    };
    let timewait = t.timewait.map_or_else(
        || "-".to_string(),
        |tw| {
            format!(
                "{} {}s",
                substate_name(tw.substate),
                tw.hold_ns / 1_000_000_000
            )
        },
    );
    let mut out = String::with_capacity(220);
    let _ = write!(
        out,
        "{} {:<7} {:<16} {:<6} {:<28} {:<28} {:<12} {:>6} {:>10} {:<18} {:<5} {:>4} {:<13} {:>10} {:>10} {:>7} {:>4}",
        clock.time_of_day(t.closed_ns),
        pid,
        comm,
        role_name(t.role).unwrap_or("-"),
        t.local,
        t.remote,
        open,
        t.handshake_ns.map_or_else(|| "-".to_string(), |h| format!("{:.3}", ms(h))),
        format!("{:.3}", ms(t.lifetime_ns())),
        close,
        t.closed_by.map_or("-", closer_name),
        opt(t.teardown_segments),
        timewait,
        opt(t.bytes_sent),
        opt(t.bytes_received),
        opt(t.srtt_us),
        t.retransmits,
    );
    out
}

#[derive(Serialize)]
struct TimewaitJson {
    state: &'static str,
    hold_s: f64,
    until: String,
}

#[derive(Serialize)]
struct StepJson {
    ts: String,
    t_ms: f64,
    old: &'static str,
    new: &'static str,
}

#[derive(Serialize)]
struct ConnJson<'a> {
    ts: String,
    start_ts: String,
    skaddr: String,
    pid: Option<u32>,
    comm: Option<&'a str>,
    cgroup: Option<u64>,
    owner_source: Option<&'static str>,
    family: &'static str,
    saddr: String,
    sport: u16,
    daddr: String,
    dport: u16,
    netns: Option<u32>,
    role: Option<&'static str>,
    open: &'static str,
    before_trace: bool,
    handshake_ms: Option<f64>,
    lifetime_ms: f64,
    close: &'static str,
    closed_by: Option<&'static str>,
    teardown_segments: Option<u8>,
    timewait: Option<TimewaitJson>,
    error: Option<String>,
    errno: Option<i32>,
    bytes_sent: Option<u64>,
    bytes_received: Option<u64>,
    srtt_us: Option<u32>,
    retransmits: u32,
    total_retrans: Option<u32>,
    resets_sent: u32,
    resets_received: u32,
    transitions: Vec<StepJson>,
}

pub fn conns_json(t: &Timeline, clock: &Clock) -> String {
    let owner = t.owner.as_ref().map(|a| &a.owner);
    let j = ConnJson {
        ts: clock.rfc3339(t.closed_ns),
        start_ts: clock.rfc3339(t.first_ns),
        skaddr: format!("{:#x}", t.skaddr),
        pid: owner.map(|o| o.pid),
        comm: owner.map(|o| o.comm.as_str()),
        cgroup: owner.map(|o| o.cgroup_id).filter(|c| *c != 0),
        owner_source: t.owner.as_ref().map(|a| source_name(a.source)),
        family: t.family.name(),
        saddr: t.local.addr.to_string(),
        sport: t.local.port,
        daddr: t.remote.addr.to_string(),
        dport: t.remote.port,
        netns: t.netns,
        role: role_name(t.role),
        open: open_name(t.open),
        before_trace: t.pre_existing(),
        handshake_ms: t.handshake_ns.map(ms),
        lifetime_ms: ms(t.lifetime_ns()),
        close: close_name(t.close),
        closed_by: t.closed_by.map(closer_name),
        teardown_segments: t.teardown_segments,
        timewait: t.timewait.map(|tw| TimewaitJson {
            state: substate_name(tw.substate),
            hold_s: tw.hold_ns as f64 / 1e9,
            until: clock.rfc3339(t.closed_ns.saturating_add(tw.hold_ns)),
        }),
        error: t.error.map(errno_name),
        errno: t.error,
        bytes_sent: t.bytes_sent,
        bytes_received: t.bytes_received,
        srtt_us: t.srtt_us,
        retransmits: t.retransmits,
        total_retrans: t.total_retrans,
        resets_sent: t.resets_sent,
        resets_received: t.resets_received,
        transitions: t
            .steps
            .iter()
            .map(|s| StepJson {
                ts: clock.rfc3339(s.ts_ns),
                t_ms: ms(s.ts_ns.saturating_sub(t.first_ns)),
                old: s.old.name(),
                new: s.new.name(),
            })
            .collect(),
    };
    serde_json::to_string(&j).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
