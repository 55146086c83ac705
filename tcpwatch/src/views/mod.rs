//! Writing what tcpwatch saw, for people (aligned text) and for programs
//! (one JSON object per line): transitions here, connections in `conns`,
//! the ladder picture in `ladder`, TIME_WAIT snapshots in `timewait`, the
//! full-screen live view of `tcpwatch top` in `top`, exit summaries in
//! `summary`, and diagnostics on stderr in `log`.

pub mod conns;
pub mod ladder;
pub mod log;
pub mod summary;
pub mod timewait;
pub mod top;

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Serialize;

use crate::host::clock::{Clock, Zone, STAMP_WIDTH};
use crate::model::cgroup::Cgroup;
use crate::model::decode::Transition;
use crate::model::owner::{Attribution, OwnerSource};
use crate::model::reset::{self, ResetReason};
use crate::model::{Endpoint, Family, TcpState};

pub use summary::Tracking;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// One `trace` line: a transition with the owner and the time since the
/// socket's previous transition.
pub struct TraceLine<'a> {
    pub t: &'a Transition,
    pub owner: Option<&'a Attribution>,
    /// The owner's cgroup with its path, when the caller looked it up.
    pub cgroup: Option<&'a Cgroup>,
    pub delta_ns: Option<u64>,
}

/// What a trace line that is not a transition reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    ResetSent,
    ResetReceived,
    Retransmit,
}

impl EventKind {
    /// The JSON `event` value.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::ResetSent => "reset_sent",
            EventKind::ResetReceived => "reset_received",
            EventKind::Retransmit => "retransmit",
        }
    }

    /// What the text's TRANSITION column says.
    fn text(self) -> &'static str {
        match self {
            EventKind::ResetSent => "RST sent",
            EventKind::ResetReceived => "RST received",
            EventKind::Retransmit => "retransmit",
        }
    }
}

/// One `trace` line for a reset or a retransmission: the socket's owner,
/// the time since its last transition and, for a reset sent, the
/// kernel's reason.
pub struct TraceEventLine<'a> {
    pub what: EventKind,
    pub ts_ns: u64,
    /// 0: a reset sent for no socket.
    pub skaddr: u64,
    pub family: Family,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub owner: Option<&'a Attribution>,
    pub cgroup: Option<&'a Cgroup>,
    pub delta_ns: Option<u64>,
    pub reason: Option<ResetReason>,
    /// The sender's state at a reset sent (`None`: no socket).
    pub state: Option<TcpState>,
    pub netns: Option<u32>,
    pub cpu: u32,
}

/// One column of a text table: its heading, how wide it is, and which
/// side its values keep to. Headers and rows are both drawn from one list
/// of these, so they cannot drift apart.
pub struct Column {
    pub heading: &'static str,
    pub width: usize,
    pub right: bool,
}

impl Column {
    pub const fn left(heading: &'static str, width: usize) -> Column {
        Column {
            heading,
            width,
            right: false,
        }
    }

    pub const fn right(heading: &'static str, width: usize) -> Column {
        Column {
            heading,
            width,
            right: true,
        }
    }
}

/// One line of a table: each cell padded to its column, one space between.
pub fn table_line<S: AsRef<str>>(columns: &[Column], cells: &[S]) -> String {
    let mut out = String::with_capacity(columns.iter().map(|c| c.width + 1).sum());
    for (i, (c, cell)) in columns.iter().zip(cells).enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let cell = cell.as_ref();
        let _ = if c.right {
            write!(out, "{cell:>w$}", w = c.width)
        } else {
            write!(out, "{cell:<w$}", w = c.width)
        };
    }
    out.truncate(out.trim_end().len());
    out
}

/// A table's header: the headings, the first (the time) naming the zone.
pub fn table_header(columns: &[Column], zone: Zone, time_heading: &str) -> String {
    let mut cells: Vec<String> = columns.iter().map(|c| c.heading.to_string()).collect();
    if let Some(first) = cells.first_mut() {
        *first = zone.heading().replacen("TIME", time_heading, 1);
    }
    table_line(columns, &cells)
}

/// The widest an endpoint is written: `[` 39 characters of IPv6 `]:65535`.
pub const ENDPOINT_WIDTH: usize = 47;

/// `trace`'s columns.
pub const TRACE_COLUMNS: [Column; 7] = [
    Column::left("TIME", STAMP_WIDTH),
    Column::left("PID", 7),
    Column::left("COMM", 15),
    Column::left("LOCAL", ENDPOINT_WIDTH),
    Column::left("REMOTE", ENDPOINT_WIDTH),
    Column::left("TRANSITION", 27),
    Column::left("MS", 9),
];

pub fn trace_header(zone: Zone) -> String {
    table_header(&TRACE_COLUMNS, zone, "TIME")
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

pub fn trace_text(line: &TraceLine<'_>, clock: &Clock, zone: Zone) -> String {
    let t = line.t;
    let (pid, comm) = match line.owner {
        Some(a) => (a.owner.pid.to_string(), a.owner.comm.as_str()),
        None => ("-".to_string(), "-"),
    };
    table_line(
        &TRACE_COLUMNS,
        &[
            clock.text(t.ts_ns, zone),
            pid,
            comm.to_string(),
            t.local.to_string(),
            t.remote.to_string(),
            format!("{} -> {}", t.old, t.new),
            line.delta_ns
                .map_or_else(|| "-".to_string(), |d| format!("{:.3}", ms(d))),
        ],
    )
}

/// A reset or retransmission in `trace`'s columns; a reset sent ends with
/// its reason in words.
pub fn trace_event_text(line: &TraceEventLine<'_>, clock: &Clock, zone: Zone) -> String {
    let (pid, comm) = match line.owner {
        Some(a) => (a.owner.pid.to_string(), a.owner.comm.as_str()),
        None => ("-".to_string(), "-"),
    };
    let mut text = table_line(
        &TRACE_COLUMNS,
        &[
            clock.text(line.ts_ns, zone),
            pid,
            comm.to_string(),
            line.local.to_string(),
            line.remote.to_string(),
            line.what.text().to_string(),
            line.delta_ns
                .map_or_else(|| "-".to_string(), |d| format!("{:.3}", ms(d))),
        ],
    );
    if line.what == EventKind::ResetSent {
        // Past the last column: the words do not fit one.
        let pad = TRACE_COLUMNS.iter().map(|c| c.width + 1).sum::<usize>();
        let _ = write!(
            text,
            "{:w$}{}",
            "",
            reset::explain(line.reason),
            w = pad.saturating_sub(text.len())
        );
    }
    text
}

#[derive(Serialize)]
struct TraceEventJson<'a> {
    ts: String,
    ts_mono_ns: u64,
    skaddr: String,
    pid: Option<u32>,
    comm: Option<&'a str>,
    cgroup: Option<Cow<'a, Cgroup>>,
    owner_source: Option<&'static str>,
    family: &'static str,
    saddr: String,
    sport: u16,
    daddr: String,
    dport: u16,
    /// `reset_sent`, `reset_received` or `retransmit`: transition lines
    /// have no `event`.
    event: &'static str,
    /// A reset sent: the sender's state (`null`: no socket), the kernel's
    /// reason by name (`null`: the kernel does not say) and in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<Option<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reset_reason: Option<Option<Cow<'static, str>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reset_words: Option<String>,
    delta_ms: Option<f64>,
    netns: Option<u32>,
    cpu: u32,
}

pub fn trace_event_json(line: &TraceEventLine<'_>, clock: &Clock) -> String {
    let owner = line.owner.map(|a| &a.owner);
    let sent = line.what == EventKind::ResetSent;
    let j = TraceEventJson {
        ts: clock.rfc3339(line.ts_ns),
        ts_mono_ns: line.ts_ns,
        skaddr: format!("{:#x}", line.skaddr),
        pid: owner.map(|o| o.pid),
        comm: owner.map(|o| o.comm.as_str()),
        cgroup: cgroup_of(owner.map(|o| &**o), line.cgroup),
        owner_source: line.owner.map(|a| source_name(a.source)),
        family: line.family.name(),
        saddr: line.local.addr.to_string(),
        sport: line.local.port,
        daddr: line.remote.addr.to_string(),
        dport: line.remote.port,
        event: line.what.name(),
        state: sent.then(|| line.state.map(|s| s.name())),
        reset_reason: sent.then(|| line.reason.map(|r| r.name())),
        reset_words: sent.then(|| {
            line.reason
                .map_or_else(|| reset::UNKNOWN_REASON.into(), |r| r.words().into_owned())
        }),
        delta_ms: line.delta_ns.map(ms),
        netns: line.netns,
        cpu: line.cpu,
    };
    serde_json::to_string(&j).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn source_name(s: OwnerSource) -> &'static str {
    match s {
        OwnerSource::Observed => "observed",
        OwnerSource::Listener => "listener",
        OwnerSource::Procfs => "procfs",
    }
}

#[derive(Serialize)]
struct TraceJson<'a> {
    ts: String,
    ts_mono_ns: u64,
    skaddr: String,
    pid: Option<u32>,
    comm: Option<&'a str>,
    cgroup: Option<Cow<'a, Cgroup>>,
    owner_source: Option<&'static str>,
    family: &'static str,
    saddr: String,
    sport: u16,
    daddr: String,
    dport: u16,
    old: &'static str,
    new: &'static str,
    delta_ms: Option<f64>,
    netns: Option<u32>,
    cpu: u32,
}

/// The owner's cgroup as the JSON shows it: what the caller looked up, or
/// the bare id.
pub fn cgroup_of<'a>(
    owner: Option<&crate::model::Owner>,
    looked_up: Option<&'a Cgroup>,
) -> Option<Cow<'a, Cgroup>> {
    match looked_up {
        Some(c) => Some(Cow::Borrowed(c)),
        None => owner
            .map(|o| o.cgroup_id)
            .filter(|c| *c != 0)
            .map(|id| Cow::Owned(Cgroup::new(id, None))),
    }
}

pub fn trace_json(line: &TraceLine<'_>, clock: &Clock) -> String {
    let t = line.t;
    let owner = line.owner.map(|a| &a.owner);
    let j = TraceJson {
        ts: clock.rfc3339(t.ts_ns),
        ts_mono_ns: t.ts_ns,
        skaddr: format!("{:#x}", t.skaddr),
        pid: owner.map(|o| o.pid),
        comm: owner.map(|o| o.comm.as_str()),
        cgroup: cgroup_of(owner.map(|o| &**o), line.cgroup),
        owner_source: line.owner.map(|a| source_name(a.source)),
        family: t.family.name(),
        saddr: t.local.addr.to_string(),
        sport: t.local.port,
        daddr: t.remote.addr.to_string(),
        dport: t.remote.port,
        old: t.old.name(),
        new: t.new.name(),
        delta_ms: line.delta_ns.map(ms),
        netns: t.sock.netns,
        cpu: t.cpu,
    };
    serde_json::to_string(&j).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decode::tests::state_event;
    use crate::model::decode::{decode, encode, Record};
    use crate::model::{Owner, TcpState};

    fn transition() -> Transition {
        let Record::State(t) = decode(&encode(&state_event(
            0xffff_8881_0000_0040,
            TcpState::SynSent,
            TcpState::Established,
            1_500_000_000,
        )))
        .unwrap() else {
            unreachable!()
        };
        t
    }

    fn clock() -> Clock {
        Clock::with_offset_ns(1_795_392_000 * 1_000_000_000)
    }

    #[test]
    fn text_line_has_all_columns() {
        let t = transition();
        let owner = Attribution {
            owner: Owner {
                pid: 4321,
                comm: "curl".into(),
                cgroup_id: 0,
            }
            .into(),
            source: OwnerSource::Observed,
        };
        let line = trace_text(
            &TraceLine {
                t: &t,
                owner: Some(&owner),
                cgroup: None,
                delta_ns: Some(250_000),
            },
            &clock(),
            Zone::Utc,
        );
        assert!(
            line.starts_with("2026-11-23 00:00:01.500000 4321    curl "),
            "{line}"
        );
        assert!(line.contains("127.0.0.1:40000"), "{line}");
        assert!(line.contains("127.0.0.2:8080"), "{line}");
        assert!(line.contains("SYN_SENT -> ESTABLISHED"), "{line}");
        assert!(line.ends_with(" 0.250"), "{line}");
        // Columns line up with the header.
        let header = trace_header(Zone::Utc);
        assert!(header.starts_with("TIME(UTC) "), "{header}");
        assert_eq!(line.find("127.0.0.1"), header.find("LOCAL"));
        assert_eq!(line.find("SYN_SENT"), header.find("TRANSITION"));
        // And with the widest endpoints there are.
        let mut wide = t;
        wide.local = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into();
        wide.remote = wide.local;
        let line = trace_text(
            &TraceLine {
                t: &wide,
                owner: Some(&owner),
                delta_ns: None,
                cgroup: None,
            },
            &clock(),
            Zone::Utc,
        );
        assert_eq!(line.rfind("[ffff:"), header.find("REMOTE"), "{line}");
        assert_eq!(line.find("SYN_SENT"), header.find("TRANSITION"), "{line}");
    }

    #[test]
    fn unknown_owner_prints_dashes_and_json_nulls() {
        let t = transition();
        let line = TraceLine {
            t: &t,
            owner: None,
            cgroup: None,
            delta_ns: None,
        };
        let text = trace_text(&line, &clock(), Zone::Utc);
        assert!(
            text.starts_with("2026-11-23 00:00:01.500000 -       -  "),
            "{text}"
        );
        assert!(text.ends_with(" -"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&trace_json(&line, &clock())).unwrap();
        assert!(v["pid"].is_null());
        assert!(v["comm"].is_null());
        assert!(v["delta_ms"].is_null());
    }

    #[test]
    fn json_has_the_documented_fields() {
        let t = transition();
        let owner = Attribution {
            owner: Owner {
                pid: 7,
                comm: "srv".into(),
                cgroup_id: 99,
            }
            .into(),
            source: OwnerSource::Listener,
        };
        let line = TraceLine {
            t: &t,
            owner: Some(&owner),
            cgroup: None,
            delta_ns: Some(1_234_567),
        };
        let v: serde_json::Value = serde_json::from_str(&trace_json(&line, &clock())).unwrap();
        assert_eq!(v["ts"], "2026-11-23T00:00:01.500000000Z");
        assert_eq!(v["skaddr"], "0xffff888100000040");
        assert_eq!(v["pid"], 7);
        assert_eq!(v["comm"], "srv");
        assert_eq!(v["cgroup"]["id"], 99);
        assert!(v["cgroup"]["path"].is_null());
        let c = Cgroup::new(99, Some("/system.slice/nginx.service"));
        let with_path = TraceLine {
            cgroup: Some(&c),
            ..line
        };
        let v: serde_json::Value = serde_json::from_str(&trace_json(&with_path, &clock())).unwrap();
        assert_eq!(v["cgroup"]["path"], "/system.slice/nginx.service");
        assert_eq!(v["cgroup"]["unit"], "nginx.service");
        assert!(v["cgroup"]["container"].is_null());
        assert_eq!(v["owner_source"], "listener");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["saddr"], "127.0.0.1");
        assert_eq!(v["sport"], 40000);
        assert_eq!(v["daddr"], "127.0.0.2");
        assert_eq!(v["dport"], 8080);
        assert_eq!(v["old"], "SYN_SENT");
        assert_eq!(v["new"], "ESTABLISHED");
        assert!((v["delta_ms"].as_f64().unwrap() - 1.234567).abs() < 1e-9);
    }
}
