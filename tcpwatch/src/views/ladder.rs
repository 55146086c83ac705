//! The ladder picture textbooks draw: this host's socket and its peer as
//! two columns, the segments between them as arrows in time order, each
//! side's state changes beside them.
//!
//! Segments are not captured: they follow from the state machine. A
//! transition caused by a received segment says that segment arrived (and,
//! with the segment counters read at it, whether one segment carried both
//! an ACK and a FIN). When both ends are sockets on this host, each side's
//! receipts are drawn from its own transitions, so the picture is exact;
//! otherwise the peer's segments are inferred from ours, and marked so.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::host::clock::{Clock, Zone};
use crate::model::correlate::{CloseKind, ConnectFailure, OpenKind, Role, Step, Timeline};
use crate::model::reset::explain;
use crate::model::TcpState;

use super::conns::{
    close_name, connect_failure_name, connect_failure_words, errno_name, substate_name,
};

/// Direction of a segment relative to the socket whose step implies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Sent,
    Received,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub step: usize,
    pub dir: Dir,
    pub label: &'static str,
    /// Whether the receiving end shows this segment's arrival as a
    /// transition of its own. A SYN is received by a request socket, which
    /// has none, so only its sender's transition shows it.
    pub arrival_visible: bool,
}

/// The segments each step of a timeline implies, in order.
pub fn segments(t: &Timeline) -> Vec<Segment> {
    use TcpState::*;
    let three = t.teardown_segments == Some(3);
    let last = t.steps.len().saturating_sub(1);
    let mut out = Vec::new();
    let mut push = |step: usize, dir: Dir, label: &'static str| {
        out.push(Segment {
            step,
            dir,
            label,
            arrival_visible: label != "SYN",
        })
    };
    for (i, s) in t.steps.iter().enumerate() {
        let closing_step = i == last && s.new == Close;
        if closing_step && t.resets_received > 0 {
            push(i, Dir::Received, "RST");
            continue;
        }
        match (s.old, s.new) {
            // No local port was free: CLOSE came before any SYN.
            (Close, SynSent) if t.connect_failure == Some(ConnectFailure::AddressNotAvailable) => {}
            (Close, SynSent) => push(i, Dir::Sent, "SYN"),
            (SynSent, Established) => {
                push(i, Dir::Received, "SYN/ACK");
                push(i, Dir::Sent, "ACK");
            }
            // The child socket appears when the handshake's final ACK
            // arrives; the SYN and SYN/ACK before it belong to a request
            // socket that has no transitions.
            (Listen, SynRecv) => push(i, Dir::Received, "ACK"),
            (Established, FinWait1) => push(i, Dir::Sent, "FIN"),
            (FinWait1, FinWait2) => push(i, Dir::Received, if three { "FIN/ACK" } else { "ACK" }),
            // Handed to a timewait socket: the peer's FIN and the last ACK
            // came later, to it.
            (FinWait2, Close) if t.handed_off => {}
            (FinWait2, Close) if t.close == CloseKind::Orderly => {
                if !three {
                    push(i, Dir::Received, "FIN");
                }
                push(i, Dir::Sent, "ACK");
            }
            (FinWait1, Closing) => {
                push(i, Dir::Received, "FIN");
                push(i, Dir::Sent, "ACK");
            }
            (Closing, Close) => push(i, Dir::Received, "ACK"),
            (Established, CloseWait) => {
                push(i, Dir::Received, "FIN");
                if t.teardown_segments == Some(4) {
                    push(i, Dir::Sent, "ACK");
                }
            }
            (CloseWait, LastAck) => push(i, Dir::Sent, if three { "FIN/ACK" } else { "FIN" }),
            (LastAck, Close) => push(i, Dir::Received, "ACK"),
            (_, Close) if closing_step && t.resets_sent > 0 => push(i, Dir::Sent, "RST"),
            _ => {}
        }
    }
    out
}

const STATE_W: usize = 30;
const ARROW_W: usize = 32;

fn arrow(label: &str, rightwards: bool) -> String {
    let body = format!(" {label} ");
    let dashes = ARROW_W.saturating_sub(body.len() + 1);
    let left = dashes / 2;
    let right = dashes - left;
    if rightwards {
        format!("{}{}{}>", "-".repeat(left), body, "-".repeat(right))
    } else {
        format!("<{}{}{}", "-".repeat(left), body, "-".repeat(right))
    }
}

fn step_text(s: &Step) -> String {
    format!("{} -> {}", s.old, s.new)
}

/// One end of a ladder: a socket on this host, or the peer inferred from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LadderEnd {
    /// `client`, `server`, `socket` (role not known) or `peer` (inferred).
    pub role: String,
    pub endpoint: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Not a socket on this host: its segments are inferred from ours.
    pub inferred: bool,
}

impl LadderEnd {
    fn of(t: &Timeline) -> LadderEnd {
        let role = match t.role {
            Role::Client => "client",
            Role::Server => "server",
            Role::Unknown => "socket",
        };
        LadderEnd {
            role: role.into(),
            endpoint: t.local.to_string(),
            pid: t.owner.as_ref().map(|a| a.owner.pid),
            comm: t.owner.as_ref().map(|a| a.owner.comm.clone()),
            inferred: false,
        }
    }

    fn inferred_peer(t: &Timeline) -> LadderEnd {
        LadderEnd {
            role: "peer".into(),
            endpoint: t.remote.to_string(),
            pid: None,
            comm: None,
            inferred: true,
        }
    }

    fn text(&self) -> String {
        if self.inferred {
            return format!("{} {} (inferred)", self.role, self.endpoint);
        }
        match (self.pid, &self.comm) {
            (Some(pid), Some(comm)) => {
                format!("{} {} (pid {pid} {comm})", self.role, self.endpoint)
            }
            _ => format!("{} {} (owner unknown)", self.role, self.endpoint),
        }
    }
}

/// One line of the picture: a state change on either side and a segment
/// between them, at a time since the first transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LadderRow {
    pub t_ms: f64,
    /// The left end's state change (`SYN_SENT -> ESTABLISHED`).
    pub left: Option<String>,
    /// The segment (`SYN`, `FIN/ACK`, `RST` ...).
    pub segment: Option<String>,
    /// Which end the segment travels to: `right` or `left`.
    pub towards: Option<String>,
    /// The right end's state change.
    pub right: Option<String>,
}

/// One connection's ladder: what `ladder` draws, and what `ladder --format
/// json` prints (one object per connection).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LadderRecord {
    /// The first transition of either end, RFC 3339 UTC.
    pub ts: String,
    /// Both ends are sockets on this host, each side's segments its own.
    pub exact: bool,
    pub left: LadderEnd,
    pub right: LadderEnd,
    pub rows: Vec<LadderRow>,
    /// What happened, in words (the lines under the picture).
    pub notes: Vec<String>,
}

struct Row {
    ts_ns: u64,
    left: String,
    /// A segment's label and whether it travels rightwards.
    segment: Option<(&'static str, bool)>,
    right: String,
}

fn into_rows(mut rows: Vec<Row>, origin: u64) -> Vec<LadderRow> {
    rows.sort_by_key(|r| r.ts_ns);
    let some = |s: String| Some(s).filter(|s| !s.is_empty());
    rows.into_iter()
        .map(|r| LadderRow {
            t_ms: r.ts_ns.saturating_sub(origin) as f64 / 1e6,
            left: some(r.left),
            towards: r
                .segment
                .map(|(_, right)| if right { "right" } else { "left" }.to_string()),
            segment: r.segment.map(|(label, _)| label.to_string()),
            right: some(r.right),
        })
        .collect()
}

/// A row for each SYN the side retransmitted, drawn at its time towards
/// the other end (`rightwards` when the side is on the left).
fn syn_retransmit_rows(side: &Timeline, rightwards: bool) -> Vec<Row> {
    side.syn_retransmits_ns
        .iter()
        .map(|&ts_ns| Row {
            ts_ns,
            left: String::new(),
            segment: Some(("SYN retransmitted", rightwards)),
            right: String::new(),
        })
        .collect()
}

/// Why a connect failed, in words, as `conns` says it.
fn connect_failure_story(t: &Timeline) -> Option<String> {
    let f = t.connect_failure?;
    let first = t.first_ns;
    let retx: Vec<f64> = t
        .syn_retransmits_ns
        .iter()
        .map(|ns| ns.saturating_sub(first) as f64 / 1e6)
        .collect();
    Some(format!(
        "{} {}",
        name(t),
        connect_failure_words(
            &connect_failure_name(f),
            f.errno().map(errno_name).as_deref(),
            &retx,
            t.lifetime_ns() as f64 / 1e6,
        )
    ))
}

fn name(t: &Timeline) -> String {
    format!("{} {}", peer_role(t), t.local)
}

/// What happened at the close, in words. `other` is the peer's timeline
/// when it is a socket on this host.
fn close_story(t: &Timeline, other: Option<&Timeline>) -> Vec<String> {
    use crate::model::correlate::Closer;
    let (closer, passive) = match (t.closed_by, other) {
        (Some(Closer::Peer), Some(o)) => (o, Some(t)),
        (_, o) => (t, o),
    };
    let peer_word = passive.map_or("peer".to_string(), name);
    let segments = closer
        .teardown_segments
        .or(passive.and_then(|p| p.teardown_segments));
    let mut lines = Vec::new();
    if let Some(story) = connect_failure_story(t) {
        lines.push(format!("connect failed: {story}"));
        return lines;
    }
    let first = match closer.closed_by {
        Some(Closer::Both) => "both ends closed at once (simultaneous close)".to_string(),
        Some(Closer::Local) => format!("{} closed first", name(closer)),
        Some(Closer::Peer) => format!("{peer_word} closed first"),
        None => String::new(),
    };
    let how = match (closer.close, segments) {
        (CloseKind::Orderly | CloseKind::FinWait2, Some(3)) => {
            format!(
                "teardown took 3 segments: the {}'s ACK rode on its FIN",
                if closer.closed_by == Some(Closer::Peer) {
                    name(closer)
                } else {
                    peer_word.clone()
                }
            )
        }
        (CloseKind::Orderly | CloseKind::FinWait2, Some(4)) => {
            "teardown took 4 segments: FIN, ACK, FIN, ACK each on its own".to_string()
        }
        (CloseKind::Orderly, None) => "orderly teardown; segment count not known".to_string(),
        (CloseKind::FinWait2, None) => "segment count not known".to_string(),
        (kind, _) => format!("close: {}", close_name(kind)),
    };
    lines.push(if first.is_empty() {
        how
    } else {
        format!("{first}; {how}")
    });
    if closer.handed_off {
        let rest = match closer.close {
            CloseKind::Orderly => "the peer's FIN reached it later, and it moved to TIME_WAIT",
            _ => "the peer's FIN had not reached it by the last check",
        };
        lines.push(format!(
            "{} was already closed by its application: on the bare ACK it became a FIN_WAIT2 timewait socket, which handled the rest of the teardown (no tracepoint sees it); {rest}",
            name(closer)
        ));
    }
    // Which end sent a RST, and why, as its kernel said.
    for side in std::iter::once(t).chain(other) {
        if side.resets_sent > 0 {
            lines.push(format!(
                "{} sent the RST: {}",
                name(side),
                explain(side.reset_reason)
            ));
        }
    }
    for side in std::iter::once(t).chain(other) {
        if let Some(tw) = side.timewait {
            lines.push(format!(
                "{} left a {} socket holding the 4-tuple for {}s",
                name(side),
                substate_name(tw.substate),
                tw.hold_ns / 1_000_000_000
            ));
        }
    }
    lines
}

/// One connection's ladder; `peer` is the other end's timeline when it is a
/// socket on this host.
pub fn ladder(t: &Timeline, peer: Option<&Timeline>, clock: &Clock) -> LadderRecord {
    let origin = peer.map_or(t.first_ns, |p| p.first_ns.min(t.first_ns));
    let mut notes = Vec::new();
    let (right, rows) = match peer {
        Some(p) => {
            let mut rows = Vec::new();
            // Each segment is drawn where it arrived: at the receiver's
            // transition. Sends are drawn where the receiver shows no
            // arrival: a SYN (a request socket takes it) or anything after
            // the peer's full socket is gone (its timewait socket answers).
            for (side, other_is_left) in [(t, false), (p, true)] {
                let segs = segments(side);
                let other = if other_is_left { t } else { p };
                for (i, s) in side.steps.iter().enumerate() {
                    let received: Vec<&Segment> = segs
                        .iter()
                        .filter(|g| {
                            g.step == i
                                && (g.dir == Dir::Received
                                    || !g.arrival_visible
                                    || s.ts_ns > other.closed_ns)
                        })
                        .collect();
                    let text = step_text(s);
                    let (left, right) = if other_is_left {
                        (String::new(), text)
                    } else {
                        (text, String::new())
                    };
                    if received.is_empty() {
                        rows.push(Row {
                            ts_ns: s.ts_ns,
                            left,
                            segment: None,
                            right,
                        });
                    } else {
                        for (k, g) in received.iter().enumerate() {
                            let (l, r) = if k == 0 {
                                (left.clone(), right.clone())
                            } else {
                                (String::new(), String::new())
                            };
                            // Arrows point at the receiver: a received
                            // segment towards this side, a sent one away.
                            let rightwards = (g.dir == Dir::Received) == other_is_left;
                            rows.push(Row {
                                ts_ns: s.ts_ns,
                                left: l,
                                segment: Some((g.label, rightwards)),
                                right: r,
                            });
                        }
                    }
                }
            }
            rows.extend(syn_retransmit_rows(t, true));
            rows.extend(syn_retransmit_rows(p, false));
            notes.extend(close_story(t, Some(p)));
            (LadderEnd::of(p), rows)
        }
        None => {
            let segs = segments(t);
            let mut rows = Vec::new();
            for (i, s) in t.steps.iter().enumerate() {
                let mine: Vec<&Segment> = segs.iter().filter(|g| g.step == i).collect();
                if mine.is_empty() {
                    rows.push(Row {
                        ts_ns: s.ts_ns,
                        left: step_text(s),
                        segment: None,
                        right: String::new(),
                    });
                }
                for (k, g) in mine.iter().enumerate() {
                    rows.push(Row {
                        ts_ns: s.ts_ns,
                        left: if k == 0 { step_text(s) } else { String::new() },
                        segment: Some((g.label, g.dir == Dir::Sent)),
                        right: String::new(),
                    });
                }
            }
            rows.extend(syn_retransmit_rows(t, true));
            if t.open == OpenKind::BeforeTrace {
                notes.push("opened before tracing started: the handshake was not seen".into());
            }
            if t.open == OpenKind::Passive {
                notes.push("the SYN and SYN/ACK came before: a request socket answers them, and it has no state transitions to time".into());
            }
            notes.extend(close_story(t, None));
            (LadderEnd::inferred_peer(t), rows)
        }
    };
    LadderRecord {
        ts: clock.rfc3339(origin),
        exact: peer.is_some(),
        left: LadderEnd::of(t),
        right,
        rows: into_rows(rows, origin),
        notes,
    }
}

/// The picture, with its time in `zone`.
pub fn ladder_text(r: &LadderRecord, zone: Zone) -> String {
    let mut out = String::new();
    let time =
        humantime::parse_rfc3339(&r.ts).map_or_else(|_| r.ts.clone(), |t| zone.stamp_with_zone(t));
    let how = if r.exact {
        "both ends on this host: exact"
    } else {
        "peer not on this host: its segments inferred"
    };
    let _ = writeln!(
        out,
        "{} <-> {}   {time}   [{how}]",
        r.left.endpoint, r.right.endpoint
    );
    let _ = writeln!(
        out,
        "{:>10}  {:<STATE_W$} {:<ARROW_W$} {}",
        "ms",
        r.left.text(),
        "",
        r.right.text()
    );
    let mut prev: Option<f64> = None;
    for row in &r.rows {
        let time = if prev == Some(row.t_ms) {
            String::new()
        } else {
            format!("{:.3}", row.t_ms)
        };
        prev = Some(row.t_ms);
        let middle = match &row.segment {
            Some(label) => arrow(label, row.towards.as_deref() == Some("right")),
            None => String::new(),
        };
        let line = format!(
            "{:>10}  {:<STATE_W$} {:<ARROW_W$} {}",
            time,
            row.left.as_deref().unwrap_or(""),
            middle,
            row.right.as_deref().unwrap_or("")
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    for line in &r.notes {
        let _ = writeln!(out, "  {line}");
    }
    out
}

pub fn ladder_json(r: &LadderRecord) -> String {
    serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn peer_role(t: &Timeline) -> String {
    match t.role {
        Role::Client => "client".into(),
        Role::Server => "server".into(),
        Role::Unknown => "peer".into(),
    }
}

/// Whether two timelines are the two ends of one connection.
pub fn are_peers(a: &Timeline, b: &Timeline) -> bool {
    a.local == b.remote && a.remote == b.local && a.skaddr != b.skaddr
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::correlate::Closer;
    use TcpState::*;

    fn side(
        local: &str,
        remote: &str,
        role: Role,
        steps: &[(u64, TcpState, TcpState)],
    ) -> Timeline {
        let ep = |s: &str| s.parse::<std::net::SocketAddr>().unwrap().into();
        let last = steps.last().map_or(0, |s| s.0);
        let mut t = Timeline::sample(ep(local), ep(remote), None, role, last);
        t.first_ns = steps.first().map_or(0, |s| s.0);
        t.teardown_segments = Some(3);
        t.steps = steps
            .iter()
            .map(|&(ts_ns, old, new)| Step { ts_ns, old, new })
            .collect();
        t
    }

    /// A connect that timed out: each retransmitted SYN drawn at its time,
    /// and why it failed in the closing words.
    #[test]
    fn failed_connect_draws_each_syn_and_says_why() {
        let ms = 1_000_000;
        let mut t = side(
            "10.0.0.1:40000",
            "10.0.0.2:80",
            Role::Client,
            &[(0, Close, SynSent), (7000 * ms, SynSent, Close)],
        );
        t.open = OpenKind::TimedOut;
        t.close = CloseKind::NeverOpened;
        t.closed_by = None;
        t.timewait = None;
        t.teardown_segments = None;
        t.connect_failure = Some(ConnectFailure::TimedOut);
        t.syn_retransmits_ns = vec![1000 * ms, 3000 * ms];
        let r = ladder(&t, None, &Clock::with_offset_ns(0));
        let syns: Vec<(f64, &str)> = r
            .rows
            .iter()
            .filter_map(|row| Some((row.t_ms, row.segment.as_deref()?)))
            .collect();
        assert_eq!(
            syns,
            [
                (0.0, "SYN"),
                (1000.0, "SYN retransmitted"),
                (3000.0, "SYN retransmitted")
            ]
        );
        assert_eq!(
            r.notes,
            ["connect failed: client 10.0.0.1:40000 timed out: 3 SYNs unanswered; SYN retransmitted at 1000, 3000 ms; ETIMEDOUT at 7000 ms"]
        );
        let text = ladder_text(&r, Zone::Utc);
        assert!(text.contains("1000.000"), "{text}");
        // No local port: the kernel sent nothing.
        t.connect_failure = Some(ConnectFailure::AddressNotAvailable);
        t.syn_retransmits_ns.clear();
        let r = ladder(&t, None, &Clock::with_offset_ns(0));
        assert!(
            r.rows.iter().all(|row| row.segment.is_none()),
            "{:?}",
            r.rows
        );
        assert!(r.notes[0].contains("no SYN sent"), "{:?}", r.notes);
    }

    /// The closing words say which end sent the RST, and why.
    #[test]
    fn the_notes_name_the_end_that_reset_and_why() {
        let clock = Clock::with_offset_ns(0);
        let mut client = side(
            "127.0.0.1:40000",
            "127.0.0.1:80",
            Role::Client,
            &[
                (1_000_000, Close, SynSent),
                (1_050_000, SynSent, Established),
                (2_000_000, Established, Close),
            ],
        );
        client.close = CloseKind::Aborted;
        client.timewait = None;
        client.resets_sent = 1;
        client.reset_reason = Some(crate::model::reset::ResetReason::TCP_STATE);
        let mut server = side(
            "127.0.0.1:80",
            "127.0.0.1:40000",
            Role::Server,
            &[
                (1_050_000, Listen, SynRecv),
                (1_050_000, SynRecv, Established),
                (2_000_000, Established, Close),
            ],
        );
        server.skaddr = 2;
        server.close = CloseKind::ResetReceived;
        server.closed_by = Some(Closer::Peer);
        server.timewait = None;
        server.resets_received = 1;
        let picture = ladder(&server, Some(&client), &clock);
        let want = "client 127.0.0.1:40000 sent the RST: aborted (closed with SO_LINGER 0, \
                    or disconnected) (TCP_STATE)";
        assert!(
            picture.notes.iter().any(|n| n == want),
            "{:?}",
            picture.notes
        );
        assert!(
            ladder_text(&picture, Zone::Utc).contains(want),
            "the text shows the notes"
        );
        // A kernel that does not say why.
        client.reset_reason = None;
        let alone = ladder(&client, None, &clock);
        assert!(
            alone.notes.iter().any(|n| {
                n
                == "client 127.0.0.1:40000 sent the RST: reason unknown (this kernel does not say)"
            }),
            "{:?}",
            alone.notes
        );
    }

    /// `ladder --format json` carries the picture: drawn back from its JSON,
    /// it is the same text, and its segments are the ones drawn.
    #[test]
    fn json_draws_the_same_picture() {
        let clock = Clock::with_offset_ns(1_795_392_000 * 1_000_000_000);
        let client = side(
            "127.0.0.1:40000",
            "127.0.0.1:80",
            Role::Client,
            &[
                (1_000_000, Close, SynSent),
                (1_050_000, SynSent, Established),
                (2_000_000, Established, FinWait1),
                (2_100_000, FinWait1, FinWait2),
                (2_100_000, FinWait2, Close),
            ],
        );
        let mut server = side(
            "127.0.0.1:80",
            "127.0.0.1:40000",
            Role::Server,
            &[
                (1_050_000, Listen, SynRecv),
                (1_050_000, SynRecv, Established),
                (2_000_000, Established, CloseWait),
                (2_050_000, CloseWait, LastAck),
                (2_100_000, LastAck, Close),
            ],
        );
        server.skaddr = 2;
        server.closed_by = Some(Closer::Peer);
        server.timewait = None;
        for (picture, exact) in [
            (ladder(&client, Some(&server), &clock), true),
            (ladder(&client, None, &clock), false),
        ] {
            let json = ladder_json(&picture);
            let back: LadderRecord = serde_json::from_str(&json).unwrap();
            assert_eq!(back, picture);
            let text = ladder_text(&back, Zone::Utc);
            assert_eq!(text, ladder_text(&picture, Zone::Utc));
            assert_eq!(picture.exact, exact);
            assert_eq!(picture.ts, "2026-11-23T00:00:00.001000000Z");
            assert!(
                text.starts_with(
                    "127.0.0.1:40000 <-> 127.0.0.1:80   2026-11-23 00:00:00.001000 UTC   ["
                ),
                "{text}"
            );
            let labels: Vec<&str> = picture
                .rows
                .iter()
                .filter_map(|r| r.segment.as_deref())
                .collect();
            assert_eq!(labels.first(), Some(&"SYN"), "{labels:?}");
            assert!(labels.contains(&"FIN/ACK"), "{labels:?}");
            // Every segment in the JSON is an arrow in the text, pointing
            // the way the JSON says.
            for r in picture.rows.iter().filter(|r| r.segment.is_some()) {
                let label = r.segment.as_deref().unwrap();
                let arrow = arrow(label, r.towards.as_deref() == Some("right"));
                assert!(text.contains(&arrow), "{arrow} not in\n{text}");
            }
            assert_eq!(
                text.lines().filter(|l| l.contains("--")).count(),
                labels.len(),
                "{text}"
            );
            assert_eq!(picture.left.role, "client");
            assert_eq!(picture.right.inferred, !exact);
        }
    }
}
