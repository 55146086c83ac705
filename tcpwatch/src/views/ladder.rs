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

use crate::host::clock::Clock;
use crate::model::correlate::{CloseKind, OpenKind, Role, Step, Timeline};
use crate::model::TcpState;

use super::conns::{close_name, substate_name};

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

fn who(t: &Timeline) -> String {
    let role = match t.role {
        Role::Client => "client",
        Role::Server => "server",
        Role::Unknown => "socket",
    };
    match &t.owner {
        Some(a) => format!("{role} {} (pid {} {})", t.local, a.owner.pid, a.owner.comm),
        None => format!("{role} {} (owner unknown)", t.local),
    }
}

struct Row {
    ts_ns: u64,
    left: String,
    middle: String,
    right: String,
}

fn render_rows(out: &mut String, rows: &mut [Row], origin: u64) {
    rows.sort_by_key(|r| r.ts_ns);
    let mut prev: Option<u64> = None;
    for r in rows.iter() {
        let time = if prev == Some(r.ts_ns) {
            String::new()
        } else {
            format!("{:.3}", r.ts_ns.saturating_sub(origin) as f64 / 1e6)
        };
        prev = Some(r.ts_ns);
        let line = format!(
            "{:>10}  {:<STATE_W$} {:<ARROW_W$} {}",
            time, r.left, r.middle, r.right
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
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

/// Draws one connection; `peer` is the other end's timeline when it is a
/// socket on this host.
pub fn ladder(t: &Timeline, peer: Option<&Timeline>, clock: &Clock) -> String {
    let mut out = String::new();
    let origin = peer.map_or(t.first_ns, |p| p.first_ns.min(t.first_ns));
    match peer {
        Some(p) => {
            let _ = writeln!(
                out,
                "{} <-> {}   {}   [both ends on this host: exact]",
                t.local,
                t.remote,
                clock.rfc3339(origin)
            );
            let _ = writeln!(
                out,
                "{:>10}  {:<STATE_W$} {:<ARROW_W$} {}",
                "ms",
                who(t),
                "",
                who(p)
            );
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
                            middle: String::new(),
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
                                middle: arrow(g.label, rightwards),
                                right: r,
                            });
                        }
                    }
                }
            }
            render_rows(&mut out, &mut rows, origin);
            for line in close_story(t, Some(p)) {
                let _ = writeln!(out, "  {line}");
            }
        }
        None => {
            let _ = writeln!(
                out,
                "{} <-> {}   {}   [peer not on this host: its segments inferred]",
                t.local,
                t.remote,
                clock.rfc3339(origin)
            );
            let _ = writeln!(
                out,
                "{:>10}  {:<STATE_W$} {:<ARROW_W$} peer {} (inferred)",
                "ms",
                who(t),
                "",
                t.remote
            );
            let segs = segments(t);
            let mut rows = Vec::new();
            for (i, s) in t.steps.iter().enumerate() {
                let mine: Vec<&Segment> = segs.iter().filter(|g| g.step == i).collect();
                if mine.is_empty() {
                    rows.push(Row {
                        ts_ns: s.ts_ns,
                        left: step_text(s),
                        middle: String::new(),
                        right: String::new(),
                    });
                }
                for (k, g) in mine.iter().enumerate() {
                    rows.push(Row {
                        ts_ns: s.ts_ns,
                        left: if k == 0 { step_text(s) } else { String::new() },
                        middle: arrow(g.label, g.dir == Dir::Sent),
                        right: String::new(),
                    });
                }
            }
            render_rows(&mut out, &mut rows, origin);
            if t.open == OpenKind::BeforeTrace {
                let _ = writeln!(
                    out,
                    "  opened before tracing started: the handshake was not seen"
                );
            }
            if t.open == OpenKind::Passive {
                let _ = writeln!(
                    out,
                    "  the SYN and SYN/ACK came before: a request socket answers them, and it has no state transitions to time"
                );
            }
            for line in close_story(t, None) {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    out
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
