//! Writing finished connections: aligned text columns or one JSON object per
//! connection.

use std::io::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::trace::{
    push_endpoint, push_hex, push_ip, push_json, push_ms3, push_ms_json, push_u64, Cells, Stamps,
};
use super::{table_header, table_line, Column, ENDPOINT_WIDTH};
use crate::host::clock::{Clock, Zone, STAMP_WIDTH};
use crate::model::cgroup::Cgroup;
use crate::model::correlate::{
    CloseKind, Closer, ConnectFailure, OpenKind, Role, Timeline, TimewaitSubstate,
};
use crate::model::owner::OwnerSource;
use crate::model::{Endpoint, Family, Owner};

pub fn errno_name(errno: i32) -> String {
    match known_errno(errno) {
        Some(name) => name.to_string(),
        None => format!("errno {errno}"),
    }
}

/// The name of an errno `conns` knows by name.
fn known_errno(errno: i32) -> Option<&'static str> {
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
        _ => return None,
    };
    Some(name)
}

/// `errno_name` of `errno`, written into `buf`.
fn push_errno(buf: &mut Vec<u8>, errno: i32) {
    match known_errno(errno) {
        Some(name) => buf.extend_from_slice(name.as_bytes()),
        None => {
            buf.extend_from_slice(b"errno ");
            let _ = write!(buf, "{errno}");
        }
    }
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

/// Why a connect() failed, as `conns`, `top` and the daemon's counter name
/// it.
pub fn connect_failure_name(f: ConnectFailure) -> String {
    match f {
        ConnectFailure::Refused => "refused".into(),
        ConnectFailure::TimedOut => "timed_out".into(),
        ConnectFailure::Unreachable(113) => "host_unreachable".into(),
        ConnectFailure::Unreachable(101) => "net_unreachable".into(),
        ConnectFailure::Unreachable(e) => format!("unreachable:{}", errno_name(e)),
        ConnectFailure::GivenUp => "given_up".into(),
        ConnectFailure::AddressNotAvailable => "address_not_available".into(),
        ConnectFailure::Other(e) => format!("failed:{}", errno_name(e)),
    }
}

fn ms_list(times: &[f64]) -> String {
    let v: Vec<String> = times.iter().map(|t| format!("{t:.0}")).collect();
    format!("{} ms", v.join(", "))
}

/// Why a connect() failed, in words: the reason (`connect_failure_name`),
/// the errno its connect() saw, when each SYN was retransmitted and how
/// long it had waited when it failed (ms from the first SYN).
pub fn connect_failure_words(
    reason: &str,
    errno: Option<&str>,
    syn_retransmits_ms: &[f64],
    waited_ms: f64,
) -> String {
    let syns = syn_retransmits_ms.len() + 1;
    let retransmitted = if syn_retransmits_ms.is_empty() {
        String::new()
    } else {
        format!("; SYN retransmitted at {}", ms_list(syn_retransmits_ms))
    };
    let errno = errno.unwrap_or("no errno");
    match reason {
        "refused" => format!("refused: a RST answered the SYN ({errno} after {waited_ms:.0} ms){retransmitted}"),
        "timed_out" => format!(
            "timed out: {syns} SYNs unanswered{retransmitted}; {errno} at {waited_ms:.0} ms"
        ),
        "host_unreachable" | "net_unreachable" => format!(
            "{}: ICMP destination unreachable answered the SYNs{retransmitted}; {errno} at {waited_ms:.0} ms",
            reason.replace('_', " ")
        ),
        "given_up" => format!(
            "given up by the application after {waited_ms:.0} ms: it closed the socket in SYN_SENT (its own connect timeout), the kernel set no errno{retransmitted}"
        ),
        "address_not_available" => {
            format!("address not available: no free local port, no SYN sent ({errno})")
        }
        other => format!("{other} at {waited_ms:.0} ms{retransmitted}"),
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

/// `conns`'s columns, each as wide as the widest value it can hold (an
/// IPv6 endpoint, `never_opened:EADDRNOTAVAIL`) so that lines stay aligned;
/// the last, why a connect failed in words, as long as it needs.
pub const CONNS_COLUMNS: [Column; 19] = [
    Column::left("CLOSED", STAMP_WIDTH),
    Column::left("PID", 7),
    Column::left("COMM", 15),
    Column::left("ROLE", 6),
    Column::left("LOCAL", ENDPOINT_WIDTH),
    Column::left("REMOTE", ENDPOINT_WIDTH),
    Column::left("OPEN", 20),
    Column::right("HS_MS", 10),
    Column::right("LIFE_MS", 14),
    Column::left("CLOSE", 26),
    Column::left("BY", 5),
    Column::right("SEGS", 4),
    Column::left("TIMEWAIT", 13),
    Column::right("TX", 12),
    Column::right("RX", 12),
    Column::right("RTT_US", 7),
    Column::right("RETX", 4),
    // TCP_DISCONNECT_WITH_DATA
    Column::left("RST_REASON", 24),
    Column::left("WHY", 3),
];

pub fn conns_header(zone: Zone) -> String {
    table_header(&CONNS_COLUMNS, zone, "CLOSED")
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// One finished connection as written out: the JSON object `conns
/// --format json` prints and the daemon serves, and what the text columns
/// are drawn from, so that `conns --from` shows exactly what `conns` does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnRecord {
    pub ts: String,
    pub start_ts: String,
    pub skaddr: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// The owner's cgroup: its id, and its path with what the path shows
    /// (container, systemd unit, pod) where it was looked up.
    pub cgroup: Option<Cgroup>,
    pub owner_source: Option<String>,
    pub family: String,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub netns: Option<u32>,
    pub role: Option<String>,
    pub open: String,
    pub before_trace: bool,
    pub handshake_ms: Option<f64>,
    pub lifetime_ms: f64,
    pub close: String,
    pub closed_by: Option<String>,
    pub teardown_segments: Option<u8>,
    pub timewait: Option<TimewaitRecord>,
    pub error: Option<String>,
    pub errno: Option<i32>,
    /// For a connect() that never reached ESTABLISHED: why
    /// (`refused`, `timed_out`, `host_unreachable`, `net_unreachable`,
    /// `given_up`, `address_not_available`, `failed:ERRNO`).
    #[serde(default)]
    pub connect_failure: Option<String>,
    /// The errno that connect() saw (none when the application gave up).
    #[serde(default)]
    pub connect_errno: Option<String>,
    /// When each SYN was retransmitted, ms after the first SYN.
    #[serde(default)]
    pub syn_retransmits_ms: Vec<f64>,
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    pub srtt_us: Option<u32>,
    pub retransmits: u32,
    pub total_retrans: Option<u32>,
    pub resets_sent: u32,
    pub resets_received: u32,
    /// Why this end sent its first RST, by the kernel's name
    /// (`TCP_ABORT_ON_CLOSE`; `reason N` for a number newer than this
    /// build); `null` when it sent none or the kernel does not say (before
    /// Linux 6.10).
    pub reset_reason: Option<String>,
    /// Left out of the text columns; empty when built for them.
    pub transitions: Vec<StepRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimewaitRecord {
    pub state: String,
    pub hold_s: f64,
    pub until: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub ts: String,
    pub t_ms: f64,
    pub old: String,
    pub new: String,
}

impl ConnRecord {
    /// `steps`: include every transition (JSON) or not (text columns);
    /// `cgroup`: the owner's cgroup as looked up (else its bare id).
    pub fn new(t: &Timeline, clock: &Clock, steps: bool, cgroup: Option<&Cgroup>) -> ConnRecord {
        let owner = t.owner.as_ref().map(|a| &a.owner);
        ConnRecord {
            ts: clock.rfc3339(t.closed_ns),
            start_ts: clock.rfc3339(t.first_ns),
            skaddr: format!("{:#x}", t.skaddr),
            pid: owner.map(|o| o.pid),
            comm: owner.map(|o| o.comm.clone()),
            cgroup: super::cgroup_of(owner.map(|o| &**o), cgroup).map(|c| c.into_owned()),
            owner_source: t.owner.as_ref().map(|a| source_name(a.source).into()),
            family: t.family.name().into(),
            saddr: t.local.addr,
            sport: t.local.port,
            daddr: t.remote.addr,
            dport: t.remote.port,
            netns: t.netns,
            role: role_name(t.role).map(Into::into),
            open: open_name(t.open).into(),
            before_trace: t.pre_existing(),
            handshake_ms: t.handshake_ns.map(ms),
            lifetime_ms: ms(t.lifetime_ns()),
            close: close_name(t.close).into(),
            closed_by: t.closed_by.map(|c| closer_name(c).into()),
            teardown_segments: t.teardown_segments,
            timewait: t.timewait.map(|tw| TimewaitRecord {
                state: substate_name(tw.substate).into(),
                hold_s: tw.hold_ns as f64 / 1e9,
                until: clock.rfc3339(t.closed_ns.saturating_add(tw.hold_ns)),
            }),
            error: t.error.map(errno_name),
            errno: t.error,
            connect_failure: t.connect_failure.map(connect_failure_name),
            connect_errno: t.connect_failure.and_then(|f| f.errno()).map(errno_name),
            syn_retransmits_ms: t
                .syn_retransmits_ns
                .iter()
                .map(|ns| ms(ns.saturating_sub(t.first_ns)))
                .collect(),
            bytes_sent: t.bytes_sent,
            bytes_received: t.bytes_received,
            // The kernel's estimate of a connection that never opened is
            // its initial value, not a measurement.
            srtt_us: t.srtt_us.filter(|_| t.close != CloseKind::NeverOpened),
            retransmits: t.retransmits,
            total_retrans: t.total_retrans,
            resets_sent: t.resets_sent,
            resets_received: t.resets_received,
            reset_reason: t.reset_reason.map(|r| r.name().into_owned()),
            transitions: if steps {
                t.steps
                    .iter()
                    .map(|s| StepRecord {
                        ts: clock.rfc3339(s.ts_ns),
                        t_ms: ms(s.ts_ns.saturating_sub(t.first_ns)),
                        old: s.old.name().into(),
                        new: s.new.name().into(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    pub fn local(&self) -> Endpoint {
        Endpoint::new(self.saddr, self.sport)
    }

    pub fn remote(&self) -> Endpoint {
        Endpoint::new(self.daddr, self.dport)
    }

    pub fn family(&self) -> Family {
        if self.saddr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// The owner as a filter sees it.
    pub fn owner(&self) -> Option<Owner> {
        Some(Owner {
            pid: self.pid?,
            comm: self.comm.clone().unwrap_or_default(),
            cgroup_id: self.cgroup.as_ref().map_or(0, |c| c.id),
        })
    }
}

/// Writes `conns`'s lines into a byte buffer, each without its newline:
/// `conns` prints every finished connection, so a line is on the hot path.
/// Text is written from the timeline itself, the bytes `record_text` gives
/// for its record, with a second's date and time worked out once.
pub struct ConnsWriter {
    stamps: Stamps,
}

impl ConnsWriter {
    pub fn new(clock: Clock, zone: Zone) -> ConnsWriter {
        ConnsWriter {
            stamps: Stamps::new(clock, zone),
        }
    }

    /// One finished connection in `conns`'s columns.
    pub fn text(&mut self, buf: &mut Vec<u8>, t: &Timeline) {
        let owner = t.owner.as_ref().map(|a| &a.owner);
        let dash_or = |buf: &mut Vec<u8>, s: Option<&str>| {
            buf.extend_from_slice(s.unwrap_or("-").as_bytes());
        };
        let push_opt = |buf: &mut Vec<u8>, n: Option<u64>| match n {
            Some(n) => push_u64(buf, n),
            None => buf.push(b'-'),
        };
        // `kind`, and `:` with the errno's name if the socket saw one.
        let failed = |buf: &mut Vec<u8>, kind: &str| {
            buf.extend_from_slice(kind.as_bytes());
            if let Some(e) = t.error {
                buf.push(b':');
                push_errno(buf, e);
            }
        };
        let mut cells = Cells::start(buf, &CONNS_COLUMNS, 0);
        self.stamps.text(cells.buf, t.closed_ns);
        cells.next();
        push_opt(cells.buf, owner.map(|o| u64::from(o.pid)));
        cells.next();
        dash_or(cells.buf, owner.map(|o| o.comm.as_str()));
        cells.next();
        dash_or(cells.buf, role_name(t.role));
        cells.next();
        push_endpoint(cells.buf, &t.local);
        cells.next();
        push_endpoint(cells.buf, &t.remote);
        cells.next();
        match t.open {
            OpenKind::Failed => failed(cells.buf, "failed"),
            other => cells.buf.extend_from_slice(open_name(other).as_bytes()),
        }
        cells.next();
        match t.handshake_ns {
            Some(ns) => push_ms3(cells.buf, ns),
            None => cells.buf.push(b'-'),
        }
        cells.next();
        // Open before tracing: at least this long.
        if t.pre_existing() {
            cells.buf.push(b'>');
        }
        push_ms3(cells.buf, t.lifetime_ns());
        cells.next();
        let close = close_name(t.close);
        match t.close {
            // A connect that failed: the errno its connect() saw, else the
            // reason.
            CloseKind::NeverOpened => match t.connect_failure {
                Some(f) => {
                    cells.buf.extend_from_slice(close.as_bytes());
                    cells.buf.push(b':');
                    match f.errno() {
                        Some(e) => push_errno(cells.buf, e),
                        None => {
                            cells
                                .buf
                                .extend_from_slice(connect_failure_name(f).as_bytes());
                        }
                    }
                }
                None => failed(cells.buf, close),
            },
            CloseKind::Error => failed(cells.buf, close),
            _ => cells.buf.extend_from_slice(close.as_bytes()),
        }
        cells.next();
        dash_or(cells.buf, t.closed_by.map(closer_name));
        cells.next();
        push_opt(cells.buf, t.teardown_segments.map(u64::from));
        cells.next();
        match t.timewait {
            Some(tw) => {
                cells
                    .buf
                    .extend_from_slice(substate_name(tw.substate).as_bytes());
                cells.buf.push(b' ');
                // As the record's seconds, floored.
                push_u64(cells.buf, (tw.hold_ns as f64 / 1e9).floor() as u64);
                cells.buf.push(b's');
            }
            None => cells.buf.push(b'-'),
        }
        cells.next();
        push_opt(cells.buf, t.bytes_sent);
        cells.next();
        push_opt(cells.buf, t.bytes_received);
        cells.next();
        // The kernel's estimate of a connection that never opened is its
        // initial value, not a measurement.
        let srtt = t.srtt_us.filter(|_| t.close != CloseKind::NeverOpened);
        push_opt(cells.buf, srtt.map(u64::from));
        cells.next();
        push_u64(cells.buf, u64::from(t.retransmits));
        cells.next();
        match (t.reset_reason, t.resets_sent) {
            (Some(reason), _) => cells.buf.extend_from_slice(reason.name().as_bytes()),
            (None, 0) => cells.buf.push(b'-'),
            // Sent one, and the kernel did not say why.
            (None, _) => cells.buf.extend_from_slice(b"unknown"),
        }
        cells.next();
        cells.last(|buf| match t.connect_failure {
            None => buf.push(b'-'),
            // Rare: the words are written the slow way.
            Some(f) => {
                let syn_retransmits_ms: Vec<f64> = t
                    .syn_retransmits_ns
                    .iter()
                    .map(|ns| ms(ns.saturating_sub(t.first_ns)))
                    .collect();
                let words = connect_failure_words(
                    &connect_failure_name(f),
                    f.errno().map(errno_name).as_deref(),
                    &syn_retransmits_ms,
                    ms(t.lifetime_ns()),
                );
                buf.extend_from_slice(words.as_bytes());
            }
        });
    }

    /// One finished connection as a JSON object; `cgroup`: the owner's
    /// cgroup as looked up.
    /// The fields are written in `ConnRecord`'s order, the bytes
    /// `serde_json` gives for them (its own writer still writes the owner's
    /// name, the cgroup and the odd float).
    pub fn json(&mut self, buf: &mut Vec<u8>, t: &Timeline, cgroup: Option<&Cgroup>) {
        let owner = t.owner.as_ref().map(|a| &a.owner);
        // A field's name, then its value or null.
        let field = |buf: &mut Vec<u8>, name: &str| {
            buf.extend_from_slice(b",\"");
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(b"\":");
        };
        let quoted = |buf: &mut Vec<u8>, s: Option<&str>| match s {
            Some(s) => {
                buf.push(b'"');
                buf.extend_from_slice(s.as_bytes());
                buf.push(b'"');
            }
            None => buf.extend_from_slice(b"null"),
        };
        let number = |buf: &mut Vec<u8>, n: Option<u64>| match n {
            Some(n) => push_u64(buf, n),
            None => buf.extend_from_slice(b"null"),
        };
        let errno = |buf: &mut Vec<u8>, e: Option<i32>| match e {
            Some(e) => {
                buf.push(b'"');
                push_errno(buf, e);
                buf.push(b'"');
            }
            None => buf.extend_from_slice(b"null"),
        };
        buf.extend_from_slice(b"{\"ts\":\"");
        self.stamps.rfc3339(buf, t.closed_ns);
        buf.extend_from_slice(b"\",\"start_ts\":\"");
        self.stamps.rfc3339(buf, t.first_ns);
        buf.extend_from_slice(b"\",\"skaddr\":\"0x");
        push_hex(buf, t.skaddr);
        buf.push(b'"');
        field(buf, "pid");
        number(buf, owner.map(|o| u64::from(o.pid)));
        field(buf, "comm");
        push_json(buf, &owner.map(|o| o.comm.as_str()));
        field(buf, "cgroup");
        push_json(buf, &super::cgroup_of(owner.map(|o| &**o), cgroup));
        field(buf, "owner_source");
        quoted(buf, t.owner.as_ref().map(|a| source_name(a.source)));
        field(buf, "family");
        quoted(buf, Some(t.family.name()));
        field(buf, "saddr");
        buf.push(b'"');
        push_ip(buf, t.local.addr);
        buf.push(b'"');
        field(buf, "sport");
        push_u64(buf, u64::from(t.local.port));
        field(buf, "daddr");
        buf.push(b'"');
        push_ip(buf, t.remote.addr);
        buf.push(b'"');
        field(buf, "dport");
        push_u64(buf, u64::from(t.remote.port));
        field(buf, "netns");
        number(buf, t.netns.map(u64::from));
        field(buf, "role");
        quoted(buf, role_name(t.role));
        field(buf, "open");
        quoted(buf, Some(open_name(t.open)));
        field(buf, "before_trace");
        buf.extend_from_slice(if t.pre_existing() { b"true" } else { b"false" });
        field(buf, "handshake_ms");
        match t.handshake_ns {
            Some(ns) => push_ms_json(buf, ns),
            None => buf.extend_from_slice(b"null"),
        }
        field(buf, "lifetime_ms");
        push_ms_json(buf, t.lifetime_ns());
        field(buf, "close");
        quoted(buf, Some(close_name(t.close)));
        field(buf, "closed_by");
        quoted(buf, t.closed_by.map(closer_name));
        field(buf, "teardown_segments");
        number(buf, t.teardown_segments.map(u64::from));
        field(buf, "timewait");
        match t.timewait {
            Some(tw) => {
                buf.extend_from_slice(b"{\"state\":\"");
                buf.extend_from_slice(substate_name(tw.substate).as_bytes());
                buf.extend_from_slice(b"\",\"hold_s\":");
                push_json(buf, &(tw.hold_ns as f64 / 1e9));
                buf.extend_from_slice(b",\"until\":\"");
                self.stamps
                    .rfc3339(buf, t.closed_ns.saturating_add(tw.hold_ns));
                buf.extend_from_slice(b"\"}");
            }
            None => buf.extend_from_slice(b"null"),
        }
        field(buf, "error");
        errno(buf, t.error);
        field(buf, "errno");
        match t.error {
            Some(e) => {
                let _ = write!(buf, "{e}");
            }
            None => buf.extend_from_slice(b"null"),
        }
        field(buf, "connect_failure");
        match t.connect_failure {
            Some(f) => push_json(buf, &connect_failure_name(f)),
            None => buf.extend_from_slice(b"null"),
        }
        field(buf, "connect_errno");
        errno(buf, t.connect_failure.and_then(|f| f.errno()));
        field(buf, "syn_retransmits_ms");
        buf.push(b'[');
        for (i, ns) in t.syn_retransmits_ns.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            push_ms_json(buf, ns.saturating_sub(t.first_ns));
        }
        buf.push(b']');
        field(buf, "bytes_sent");
        number(buf, t.bytes_sent);
        field(buf, "bytes_received");
        number(buf, t.bytes_received);
        field(buf, "srtt_us");
        // As in the text: no estimate for a connection that never opened.
        let srtt = t.srtt_us.filter(|_| t.close != CloseKind::NeverOpened);
        number(buf, srtt.map(u64::from));
        field(buf, "retransmits");
        push_u64(buf, u64::from(t.retransmits));
        field(buf, "total_retrans");
        number(buf, t.total_retrans.map(u64::from));
        field(buf, "resets_sent");
        push_u64(buf, u64::from(t.resets_sent));
        field(buf, "resets_received");
        push_u64(buf, u64::from(t.resets_received));
        field(buf, "reset_reason");
        push_json(buf, &t.reset_reason.map(|r| r.name()));
        field(buf, "transitions");
        buf.push(b'[');
        for (i, s) in t.steps.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(b"{\"ts\":\"");
            self.stamps.rfc3339(buf, s.ts_ns);
            buf.extend_from_slice(b"\",\"t_ms\":");
            push_ms_json(buf, s.ts_ns.saturating_sub(t.first_ns));
            buf.extend_from_slice(b",\"old\":\"");
            buf.extend_from_slice(s.old.name().as_bytes());
            buf.extend_from_slice(b"\",\"new\":\"");
            buf.extend_from_slice(s.new.name().as_bytes());
            buf.extend_from_slice(b"\"}");
        }
        buf.extend_from_slice(b"]}");
    }
}

pub fn conns_text(t: &Timeline, clock: &Clock, zone: Zone) -> String {
    let mut buf = Vec::new();
    ConnsWriter::new(*clock, zone).text(&mut buf, t);
    super::trace::into_string(buf)
}

/// The text columns of one record (see `CONNS_COLUMNS`).
pub fn record_text(r: &ConnRecord, zone: Zone) -> String {
    let failed = |kind: &str| match &r.error {
        Some(e) => format!("{kind}:{e}"),
        None => kind.to_string(),
    };
    // A connect that failed: the errno its connect() saw, else the reason.
    let never_opened = || match (&r.connect_errno, &r.connect_failure) {
        (Some(e), _) | (None, Some(e)) => format!("{}:{e}", r.close),
        (None, None) => failed(&r.close),
    };
    let close = match r.close.as_str() {
        "never_opened" => never_opened(),
        "error" => failed(&r.close),
        other => other.to_string(),
    };
    let open = match r.open.as_str() {
        "failed" => failed("failed"),
        other => other.to_string(),
    };
    let timewait = r.timewait.as_ref().map_or_else(
        || "-".to_string(),
        |tw| format!("{} {}s", tw.state, tw.hold_s.floor() as u64),
    );
    table_line(
        &CONNS_COLUMNS,
        &[
            zone.restamp(&r.ts),
            opt(r.pid),
            r.comm.clone().unwrap_or_else(|| "-".into()),
            r.role.clone().unwrap_or_else(|| "-".into()),
            r.local().to_string(),
            r.remote().to_string(),
            open,
            r.handshake_ms
                .map_or_else(|| "-".to_string(), |h| format!("{h:.3}")),
            // Open before tracing: at least this long.
            if r.before_trace {
                format!(">{:.3}", r.lifetime_ms)
            } else {
                format!("{:.3}", r.lifetime_ms)
            },
            close,
            r.closed_by.clone().unwrap_or_else(|| "-".into()),
            opt(r.teardown_segments),
            timewait,
            opt(r.bytes_sent),
            opt(r.bytes_received),
            opt(r.srtt_us),
            r.retransmits.to_string(),
            match (&r.reset_reason, r.resets_sent) {
                (Some(reason), _) => reason.clone(),
                (None, 0) => "-".into(),
                // Sent one, and the kernel did not say why.
                (None, _) => "unknown".into(),
            },
            r.connect_failure.as_deref().map_or_else(
                || "-".to_string(),
                |reason| {
                    connect_failure_words(
                        reason,
                        r.connect_errno.as_deref(),
                        &r.syn_retransmits_ms,
                        r.lifetime_ms,
                    )
                },
            ),
        ],
    )
}

pub fn conns_json(t: &Timeline, clock: &Clock, cgroup: Option<&Cgroup>) -> String {
    record_json(&ConnRecord::new(t, clock, true, cgroup))
}

pub fn record_json(r: &ConnRecord) -> String {
    serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::correlate::Step;
    use crate::model::owner::Attribution;
    use crate::model::TcpState;

    fn timeline() -> Timeline {
        let owner = Attribution {
            owner: Owner {
                pid: 4242,
                comm: "curl".into(),
                cgroup_id: 99,
            }
            .into(),
            source: OwnerSource::Observed,
        };
        let mut t = Timeline::sample(
            "[fd00::1]:40000"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
            "[fd00::2]:443"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
            Some(owner),
            Role::Client,
            5_123_456_789,
        );
        t.handshake_ns = Some(123_457);
        t.bytes_sent = Some(100);
        t.bytes_received = Some(7);
        t.srtt_us = Some(31);
        t.steps = vec![Step {
            ts_ns: 5_123_456_000,
            old: TcpState::SynSent,
            new: TcpState::Established,
        }];
        t
    }

    /// A connection that never opened has no round-trip time to show.
    #[test]
    fn never_opened_has_no_rtt() {
        let clock = Clock::with_offset_ns(0);
        let mut refused = timeline();
        refused.open = OpenKind::Failed;
        refused.close = CloseKind::NeverOpened;
        refused.error = Some(111);
        refused.timewait = None;
        let r = ConnRecord::new(&refused, &clock, false, None);
        assert_eq!(r.srtt_us, None);
        let text = record_text(&r, Zone::Utc);
        let cols: Vec<&str> = text.split_whitespace().collect();
        // RTT_US, then RETX, RST_REASON and WHY.
        assert_eq!(cols[cols.len() - 4], "-", "{cols:?}");
        assert_eq!(
            ConnRecord::new(&timeline(), &clock, false, None).srtt_us,
            Some(31)
        );
    }

    /// A failed connect: its reason, the errno its connect() saw, when each
    /// SYN was retransmitted, and the words the text ends with.
    #[test]
    fn failed_connects_say_why() {
        let clock = Clock::with_offset_ns(0);
        let failed = |f: ConnectFailure, retx: &[u64], life_ms: u64| {
            let mut t = timeline();
            t.open = OpenKind::Failed;
            t.close = CloseKind::NeverOpened;
            t.error = f.errno().filter(|&e| e != 99);
            t.connect_failure = Some(f);
            t.timewait = None;
            t.closed_ns = t.first_ns + life_ms * 1_000_000;
            t.syn_retransmits_ns = retx.iter().map(|ms| t.first_ns + ms * 1_000_000).collect();
            let r = ConnRecord::new(&t, &clock, true, None);
            let text = record_text(&r, Zone::Utc);
            (r, text)
        };
        let (r, text) = failed(ConnectFailure::TimedOut, &[1000, 3000], 7000);
        assert_eq!(r.connect_failure.as_deref(), Some("timed_out"));
        assert_eq!(r.connect_errno.as_deref(), Some("ETIMEDOUT"));
        assert_eq!(r.syn_retransmits_ms, [1000.0, 3000.0]);
        assert!(text.contains("never_opened:ETIMEDOUT"), "{text}");
        assert!(
            text.ends_with(
                "timed out: 3 SYNs unanswered; SYN retransmitted at 1000, 3000 ms; ETIMEDOUT at 7000 ms"
            ),
            "{text}"
        );
        let (r, text) = failed(ConnectFailure::GivenUp, &[], 300);
        assert_eq!(r.connect_errno, None);
        assert!(text.contains("never_opened:given_up"), "{text}");
        assert!(
            text.contains("given up by the application after 300 ms"),
            "{text}"
        );
        let (r, text) = failed(ConnectFailure::AddressNotAvailable, &[], 0);
        assert_eq!(r.errno, None);
        assert_eq!(r.connect_failure.as_deref(), Some("address_not_available"));
        assert!(text.contains("never_opened:EADDRNOTAVAIL"), "{text}");
        assert!(text.contains("no SYN sent"), "{text}");
        let (r, text) = failed(ConnectFailure::Unreachable(113), &[1000], 3000);
        assert_eq!(r.connect_failure.as_deref(), Some("host_unreachable"));
        assert!(text.contains("EHOSTUNREACH at 3000 ms"), "{text}");
        // Read back from JSON (the daemon's answer) it says the same.
        let back: ConnRecord = serde_json::from_str(&record_json(&r)).unwrap();
        assert_eq!(record_text(&back, Zone::Utc), text);
    }

    /// `conns --from` prints what it gets back from the daemon's JSON:
    /// the round trip must give the same text and the same JSON.
    #[test]
    fn json_round_trip_gives_the_same_output() {
        let clock = Clock::with_offset_ns(1_795_392_000 * 1_000_000_000);
        let mut failed = timeline();
        failed.open = OpenKind::Failed;
        failed.close = CloseKind::Error;
        failed.error = Some(111);
        failed.timewait = None;
        for t in [timeline(), failed] {
            let id = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";
            let cgroup = Cgroup::new(99, Some(&format!("/system.slice/docker-{id}.scope")));
            let json = conns_json(&t, &clock, Some(&cgroup));
            let back: ConnRecord = serde_json::from_str(&json).unwrap();
            assert_eq!(back, ConnRecord::new(&t, &clock, true, Some(&cgroup)));
            assert_eq!(back.cgroup.as_ref().unwrap().container.as_deref(), Some(id));
            assert_eq!(back.owner().unwrap().cgroup_id, 99);
            assert_eq!(record_json(&back), json);
            assert_eq!(
                record_text(&back, Zone::Utc),
                conns_text(&t, &clock, Zone::Utc)
            );
        }
    }

    /// The reason of the RST this end sent, by name in JSON and text;
    /// `unknown` in text when the kernel did not say, `-` when it sent none.
    #[test]
    fn reset_reason_in_json_and_text() {
        let clock = Clock::with_offset_ns(0);
        let mut t = timeline();
        t.close = CloseKind::Aborted;
        t.resets_sent = 1;
        t.reset_reason = Some(crate::model::reset::ResetReason::TCP_ABORT_ON_CLOSE);
        let json: serde_json::Value = serde_json::from_str(&conns_json(&t, &clock, None)).unwrap();
        assert_eq!(json["reset_reason"], "TCP_ABORT_ON_CLOSE");
        let last = |t: &Timeline| {
            conns_text(t, &clock, Zone::Utc)
                .split_whitespace()
                // RST_REASON, then WHY ("-": no connect failure).
                .rev()
                .nth(1)
                .unwrap()
                .to_string()
        };
        assert_eq!(last(&t), "TCP_ABORT_ON_CLOSE");
        t.reset_reason = Some(crate::model::reset::ResetReason(99));
        assert_eq!(
            ConnRecord::new(&t, &clock, false, None)
                .reset_reason
                .as_deref(),
            Some("reason 99")
        );
        t.reset_reason = None;
        assert_eq!(last(&t), "unknown");
        let json: serde_json::Value = serde_json::from_str(&conns_json(&t, &clock, None)).unwrap();
        assert!(json["reset_reason"].is_null());
        t.resets_sent = 0;
        assert_eq!(last(&t), "-");
    }

    #[test]
    fn text_columns() {
        let clock = Clock::with_offset_ns(1_795_392_000 * 1_000_000_000);
        let line = conns_text(&timeline(), &clock, Zone::Utc);
        for part in [
            "2026-11-23 00:00:05.123456",
            "4242",
            "curl",
            "client",
            "[fd00::1]:40000",
            "[fd00::2]:443",
            "active",
            "0.123",
            "orderly",
            "TIME_WAIT 60s",
        ] {
            assert!(line.contains(part), "{part} missing from {line}");
        }
        // Open before tracing: the lifetime is a lower bound, and says so.
        let mut old = timeline();
        old.open = OpenKind::BeforeTrace;
        old.first_ns = 123_456_789;
        let line = conns_text(&old, &clock, Zone::Utc);
        assert!(line.contains(" >5000.000 "), "{line}");
        let r = ConnRecord::new(&old, &clock, true, None);
        assert!(r.before_trace && r.lifetime_ms == 5000.0, "{r:?}");
    }

    /// The widest values each column can hold still start where their
    /// heading does: full IPv6 endpoints, the longest close and open kinds.
    #[test]
    fn columns_stay_under_their_headings() {
        let clock = Clock::with_offset_ns(1_795_392_000 * 1_000_000_000);
        let wide: std::net::SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            .parse()
            .unwrap();
        let narrow: std::net::SocketAddr = "127.0.0.1:80".parse().unwrap();
        let header = conns_header(Zone::Utc);
        let starts = |line: &str| -> Vec<usize> {
            // Where each run of non-blanks starts, in a line with no blank
            // inside a cell (the sample values below have none).
            let b = line.as_bytes();
            (0..b.len())
                .filter(|&i| b[i] != b' ' && (i == 0 || b[i - 1] == b' '))
                .collect()
        };
        let mut lines = Vec::new();
        for (errno, close) in [(99, CloseKind::NeverOpened), (111, CloseKind::Error)] {
            let mut t = timeline();
            t.local = wide.into();
            t.remote = wide.into();
            t.close = close;
            t.error = Some(errno);
            t.timewait = None;
            // A SYN retried for 127 s; a connection up for ten days.
            t.handshake_ns = Some(127_000_000_000);
            t.open = OpenKind::BeforeTrace;
            t.first_ns = 0;
            t.closed_ns = 864_000_000_000_000;
            t.bytes_sent = Some(999_999_999_999);
            t.bytes_received = Some(999_999_999_999);
            // The longest reason name.
            t.reset_reason = Some(crate::model::reset::ResetReason(16));
            lines.push(conns_text(&t, &clock, Zone::Utc));
            let mut short = timeline();
            short.local = narrow.into();
            short.remote = narrow.into();
            short.timewait = None;
            lines.push(conns_text(&short, &clock, Zone::Utc));
        }
        assert!(
            lines[0].contains("never_opened:EADDRNOTAVAIL"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(">864000000.000"), "{}", lines[0]);
        assert!(
            lines[0].contains(" TCP_DISCONNECT_WITH_DATA "),
            "{}",
            lines[0]
        );
        let mut failed = timeline();
        failed.local = wide.into();
        failed.open = OpenKind::Failed;
        failed.close = CloseKind::NeverOpened;
        failed.error = Some(99);
        failed.timewait = None;
        lines.push(conns_text(&failed, &clock, Zone::Utc));
        assert!(lines[4].contains("failed:EADDRNOTAVAIL"), "{}", lines[4]);
        assert!(lines[0].contains(&wide.to_string()), "{}", lines[0]);
        // The date and the time are one column with a blank inside.
        let columns = |line: &str| {
            let mut s = starts(line);
            s.remove(1);
            s
        };
        let want: Vec<usize> = {
            // Headings have no blanks; right-aligned columns end with theirs.
            let mut at = 0;
            CONNS_COLUMNS
                .iter()
                .map(|c| {
                    let start = at;
                    at += c.width + 1;
                    start
                })
                .collect()
        };
        assert_eq!(starts(&header).first(), Some(&0));
        for line in &lines {
            let got = columns(line);
            assert_eq!(got.len(), CONNS_COLUMNS.len(), "{line}");
            for ((c, &start), &g) in CONNS_COLUMNS.iter().zip(&want).zip(&got) {
                if c.right {
                    // Right-aligned: the value ends where the column does.
                    let end = line[g..].find(' ').map_or(line.len(), |e| g + e);
                    assert_eq!(end, start + c.width, "{} in {line}", c.heading);
                } else {
                    assert_eq!(g, start, "{} in {line}", c.heading);
                }
            }
        }
        for (c, &start) in CONNS_COLUMNS.iter().zip(&want) {
            let at = if c.right {
                start + c.width - c.heading.len()
            } else {
                start
            };
            assert!(
                header[at..].starts_with(c.heading),
                "{}: {header}",
                c.heading
            );
        }
    }

    /// Connections of every shape (IPv4 and IPv6, odd and missing owners,
    /// failed connects, errors, resets, TIME_WAIT and FIN_WAIT2, opened
    /// before tracing), closed at times in and across seconds, written by
    /// one writer (its second caches in play), give the bytes the record
    /// and `table_line` give, in text and in JSON.
    #[test]
    fn writer_gives_the_records_bytes() {
        use super::super::trace::tests::Lcg;
        use crate::model::correlate::Timewait;
        use crate::model::reset::ResetReason;
        let owner = |pid, comm: &str, cgroup_id, source| Attribution {
            owner: Owner {
                pid,
                comm: comm.into(),
                cgroup_id,
            }
            .into(),
            source,
        };
        let owners = [
            None,
            Some(owner(4321, "curl", 0, OwnerSource::Observed)),
            Some(owner(1, "nginx \"w\\1\"", 99, OwnerSource::Listener)),
            Some(owner(u32::MAX, "héllo wörld", 7, OwnerSource::Procfs)),
            Some(owner(77, "", 0, OwnerSource::Observed)),
            Some(owner(
                8,
                "a-very-long-comm-name-past-15",
                1,
                OwnerSource::Observed,
            )),
        ];
        let endpoints: Vec<Endpoint> = [
            "127.0.0.1:40000",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:80",
            "[::ffff:10.0.0.1]:443",
            "[fe80::1:0:0:2]:9",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        ]
        .iter()
        .map(|s| s.parse::<std::net::SocketAddr>().unwrap().into())
        .collect();
        let failures = [
            None,
            Some(ConnectFailure::Refused),
            Some(ConnectFailure::TimedOut),
            Some(ConnectFailure::Unreachable(113)),
            Some(ConnectFailure::Unreachable(101)),
            Some(ConnectFailure::Unreachable(12)),
            Some(ConnectFailure::GivenUp),
            Some(ConnectFailure::AddressNotAvailable),
            Some(ConnectFailure::Other(13)),
        ];
        let opens = [
            OpenKind::Active,
            OpenKind::Passive,
            OpenKind::Refused,
            OpenKind::TimedOut,
            OpenKind::Failed,
            OpenKind::PassiveFailed,
            OpenKind::BeforeTrace,
        ];
        let closes = [
            CloseKind::Orderly,
            CloseKind::Simultaneous,
            CloseKind::ResetSent,
            CloseKind::ResetReceived,
            CloseKind::Aborted,
            CloseKind::FinWait2,
            CloseKind::FinWait2Timeout,
            CloseKind::Error,
            CloseKind::NeverOpened,
            CloseKind::Unknown,
        ];
        let errors = [None, Some(104), Some(111), Some(99), Some(5), Some(-3)];
        let timewaits = [
            None,
            Some(Timewait {
                substate: TimewaitSubstate::TimeWait,
                hold_ns: 60_000_000_000,
            }),
            Some(Timewait {
                substate: TimewaitSubstate::FinWait2,
                hold_ns: 59_999_999_999,
            }),
            Some(Timewait {
                substate: TimewaitSubstate::TimeWait,
                hold_ns: 0,
            }),
        ];
        let durations = [
            0,
            1,
            499,
            500,
            501,
            2_500,
            999_999_500,
            1_234_567,
            127_000_000_000,
            864_000_000_000_000,
            u64::MAX / 4,
        ];
        let counts = [
            None,
            Some(0),
            Some(1),
            Some(999_999_999_999),
            Some(u64::MAX),
        ];
        let reasons = [
            None,
            Some(ResetReason::TCP_ABORT_ON_CLOSE),
            Some(ResetReason(200)),
        ];
        let roles = [Role::Client, Role::Server, Role::Unknown];
        let closers = [
            None,
            Some(Closer::Local),
            Some(Closer::Peer),
            Some(Closer::Both),
        ];
        let c = Cgroup::new(99, Some("/system.slice/nginx.service"));
        let cgroups = [None, Some(&c)];
        for (offset_s, zone) in [
            (1_795_392_000u64, Zone::Utc),
            (1_795_392_000, Zone::Local),
            (0, Zone::Utc),
        ] {
            let clock = Clock::with_offset_ns(i128::from(offset_s) * 1_000_000_000);
            let mut writer = ConnsWriter::new(clock, zone);
            let mut rng = Lcg(offset_s ^ 0x5eed);
            let mut closed_ns = 3_999_999_000u64;
            let mut buf = Vec::new();
            for _ in 0..5000 {
                // Mostly within the same second, now and then the next ones.
                closed_ns += *rng.pick(&[0, 1, 999, 1_000, 400_000_000, 2_000_000_000]);
                let mut t = Timeline::sample(
                    *rng.pick(&endpoints),
                    *rng.pick(&endpoints),
                    rng.pick(&owners).clone(),
                    *rng.pick(&roles),
                    closed_ns,
                );
                t.first_ns = closed_ns.saturating_sub(*rng.pick(&durations));
                t.open = *rng.pick(&opens);
                t.close = *rng.pick(&closes);
                t.closed_by = *rng.pick(&closers);
                t.teardown_segments = *rng.pick(&[None, Some(0), Some(3), Some(u8::MAX)]);
                t.timewait = *rng.pick(&timewaits);
                t.error = *rng.pick(&errors);
                t.connect_failure = *rng.pick(&failures);
                let retx = rng.next() % 4;
                t.syn_retransmits_ns = (0..retx)
                    .map(|i| t.first_ns + (1 << i) * 1_000_000_007)
                    .collect();
                t.handshake_ns = *rng.pick(&[None, Some(0), Some(123_457), Some(500)]);
                t.bytes_sent = *rng.pick(&counts);
                t.bytes_received = *rng.pick(&counts);
                t.srtt_us = *rng.pick(&[None, Some(0), Some(31), Some(u32::MAX)]);
                t.retransmits = *rng.pick(&[0, 1, u32::MAX]);
                t.resets_sent = *rng.pick(&[0, 1, 2]);
                t.reset_reason = *rng.pick(&reasons);
                t.resets_received = *rng.pick(&[0, 3]);
                t.total_retrans = *rng.pick(&[None, Some(0), Some(17)]);
                t.netns = *rng.pick(&[None, Some(4_026_531_840)]);
                let states = [TcpState::SynSent, TcpState::Established, TcpState::Close];
                t.steps = (0..rng.next() % 4)
                    .map(|i| Step {
                        ts_ns: t.first_ns + i * *rng.pick(&durations) / 3,
                        old: *rng.pick(&states),
                        new: *rng.pick(&states),
                    })
                    .collect();
                let want = record_text(&ConnRecord::new(&t, &clock, false, None), zone);
                buf.clear();
                writer.text(&mut buf, &t);
                assert_eq!(std::str::from_utf8(&buf).unwrap(), want, "{t:?}");
                let cgroup = *rng.pick(&cgroups);
                let want = record_json(&ConnRecord::new(&t, &clock, true, cgroup));
                buf.clear();
                writer.json(&mut buf, &t, cgroup);
                assert_eq!(std::str::from_utf8(&buf).unwrap(), want, "{t:?}");
            }
        }
    }
}
