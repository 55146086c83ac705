//! What each command says when it stops: the exit summary, as data.
//!
//! Every summary is one [`ExitSummary`]: printed for people as a few short
//! lines on stderr, or with `--format json` as one JSON object, the last
//! line on stderr, that scripts and tests read back with serde.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::views::Format;

/// Lost kernel events by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    /// Both causes together.
    pub total: u64,
    /// The ring buffer had no room (a larger `--ring-size` helps).
    pub ring_full: u64,
    /// The kernel did not run the program while another BPF program ran
    /// on that CPU.
    pub skipped: u64,
}

/// What reached tcpwatch from the kernel (or a recording).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    /// Records taken and decoded.
    pub events: u64,
    pub lost: Lost,
    /// Records that made no sense and were dropped.
    pub undecodable: u64,
}

pub use crate::model::table::Tracking;

/// How often one transition was seen (`trace`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionCount {
    pub old: String,
    pub new: String,
    pub count: u64,
}

/// `trace` and `replay FILE trace`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSummary {
    pub transitions_seen: u64,
    /// Transition lines printed.
    pub shown: u64,
    /// Reset and retransmission lines printed.
    #[serde(default)]
    pub events_shown: u64,
    /// Resets and retransmissions not printed: their socket had no
    /// transition in the trace, so its endpoints were not known.
    #[serde(default)]
    pub events_unplaced: u64,
    pub stream: Stream,
    pub tracking: Tracking,
    /// Most frequent first.
    pub transitions: Vec<TransitionCount>,
}

/// `conns`, `ladder`, and their replays.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnsSummary {
    pub connections_finished: u64,
    pub shown: u64,
    pub still_open: usize,
    pub stream: Stream,
    pub tracking: Tracking,
}

/// `timewait`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimewaitSummary {
    pub snapshots: u64,
    pub stream: Stream,
    pub tracking: Tracking,
}

/// `record`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSummary {
    /// Records written to the file.
    pub recorded: u64,
    pub file: PathBuf,
    /// The filter the recording was made with, as its flags (none: every
    /// event decoded is in the file).
    pub filter: Option<String>,
    /// Events decoded but not written: their socket did not match the
    /// filter. `recorded + left_out` is `stream.events`.
    pub left_out: u64,
    pub stream: Stream,
}

/// `conns --from`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowSummary {
    /// Finished connections the daemon handed over.
    pub received: u64,
    pub shown: u64,
    /// Finished connections the daemon no longer held when asked.
    pub missed: u64,
    pub daemon: String,
}

/// `timewait --from`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchSummary {
    pub snapshots: u64,
    pub daemon: String,
}

/// `top`: each refresh is one TIME_WAIT snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopSummary {
    pub refreshes: u64,
    pub stream: Stream,
    pub tracking: Tracking,
}

/// `top --from`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopFromSummary {
    pub refreshes: u64,
    /// Finished connections the daemon no longer held when asked (their
    /// failure reasons are missing from the view).
    pub missed: u64,
    pub daemon: String,
}

/// `daemon` (logged as the fields of its last log line).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonSummary {
    pub connections: u64,
    pub snapshots: u64,
    pub stream: Stream,
    pub tracking: Tracking,
}

/// A command's exit summary; in JSON, `"summary"` names the kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "summary", rename_all = "snake_case")]
pub enum ExitSummary {
    Trace(TraceSummary),
    Conns(ConnsSummary),
    Timewait(TimewaitSummary),
    Record(RecordSummary),
    ConnsFrom(FollowSummary),
    TimewaitFrom(WatchSummary),
    Top(TopSummary),
    TopFrom(TopFromSummary),
    Daemon(DaemonSummary),
}

fn stream_line(out: &mut String, s: &Stream) {
    let _ = writeln!(
        out,
        "  {} events, {} lost events ({} ring buffer full, {} skipped by the kernel), {} \
         undecodable records",
        s.events, s.lost.total, s.lost.ring_full, s.lost.skipped, s.undecodable
    );
}

fn tracking_line(out: &mut String, t: &Tracking) {
    let _ = writeln!(
        out,
        "  sockets tracked: {} at peak (limit {}), {} at exit",
        t.peak, t.limit, t.at_exit
    );
    let _ = writeln!(
        out,
        "  sockets untracked: {} evicted, {} dropped as closed while their events were lost",
        t.evicted, t.stale
    );
}

impl ExitSummary {
    /// The figures of the event stream, for the commands that read one.
    pub fn stream(&self) -> Option<&Stream> {
        match self {
            ExitSummary::Trace(s) => Some(&s.stream),
            ExitSummary::Conns(s) => Some(&s.stream),
            ExitSummary::Timewait(s) => Some(&s.stream),
            ExitSummary::Record(s) => Some(&s.stream),
            ExitSummary::Daemon(s) => Some(&s.stream),
            ExitSummary::Top(s) => Some(&s.stream),
            ExitSummary::ConnsFrom(_) | ExitSummary::TimewaitFrom(_) | ExitSummary::TopFrom(_) => {
                None
            }
        }
    }

    /// The socket table's figures, for the commands that keep one.
    pub fn tracking(&self) -> Option<&Tracking> {
        match self {
            ExitSummary::Trace(s) => Some(&s.tracking),
            ExitSummary::Conns(s) => Some(&s.tracking),
            ExitSummary::Timewait(s) => Some(&s.tracking),
            ExitSummary::Daemon(s) => Some(&s.tracking),
            ExitSummary::Top(s) => Some(&s.tracking),
            _ => None,
        }
    }

    /// For people: a headline, then a few short indented lines.
    pub fn text(&self) -> String {
        let mut out = String::new();
        match self {
            ExitSummary::Trace(s) => {
                let _ = writeln!(
                    out,
                    "tcpwatch: {} transitions seen, {} shown",
                    s.transitions_seen, s.shown
                );
                if s.events_shown + s.events_unplaced > 0 {
                    let _ = writeln!(
                        out,
                        "  {} resets and retransmissions shown, {} not (their socket's \
                         endpoints were not known: no transition of it was traced)",
                        s.events_shown, s.events_unplaced
                    );
                }
                stream_line(&mut out, &s.stream);
                tracking_line(&mut out, &s.tracking);
                for c in &s.transitions {
                    let _ = writeln!(out, "  {:>10}  {} -> {}", c.count, c.old, c.new);
                }
            }
            ExitSummary::Conns(s) => {
                let _ = writeln!(
                    out,
                    "tcpwatch: {} connections finished, {} shown, {} still open at exit",
                    s.connections_finished, s.shown, s.still_open
                );
                stream_line(&mut out, &s.stream);
                tracking_line(&mut out, &s.tracking);
            }
            ExitSummary::Timewait(s) => {
                let _ = writeln!(out, "tcpwatch: {} snapshots", s.snapshots);
                stream_line(&mut out, &s.stream);
                tracking_line(&mut out, &s.tracking);
            }
            ExitSummary::Record(s) => {
                let filtered = match &s.filter {
                    Some(f) => format!(
                        " (filtered by {f}: {} events of other sockets left out)",
                        s.left_out
                    ),
                    None => String::new(),
                };
                let _ = writeln!(
                    out,
                    "tcpwatch: recorded {} events to {}{filtered}, {} lost events",
                    s.recorded,
                    s.file.display(),
                    s.stream.lost.total
                );
            }
            ExitSummary::ConnsFrom(s) => {
                let _ = writeln!(
                    out,
                    "tcpwatch: {} connections finished, {} shown, {} no longer held by the \
                     daemon when asked ({})",
                    s.received, s.shown, s.missed, s.daemon
                );
            }
            ExitSummary::TimewaitFrom(s) => {
                let _ = writeln!(out, "tcpwatch: {} snapshots from {}", s.snapshots, s.daemon);
            }
            ExitSummary::Top(s) => {
                let _ = writeln!(out, "tcpwatch: top: {} refreshes", s.refreshes);
                stream_line(&mut out, &s.stream);
                tracking_line(&mut out, &s.tracking);
            }
            ExitSummary::TopFrom(s) => {
                let _ = writeln!(
                    out,
                    "tcpwatch: top: {} refreshes from {}, {} finished connections no longer \
                     held by the daemon when asked",
                    s.refreshes, s.daemon, s.missed
                );
            }
            ExitSummary::Daemon(s) => {
                let _ = writeln!(
                    out,
                    "tcpwatch: {} connections finished, {} snapshots",
                    s.connections, s.snapshots
                );
                stream_line(&mut out, &s.stream);
                tracking_line(&mut out, &s.tracking);
            }
        }
        out
    }

    /// One line of JSON.
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Writes the summary to stderr in `format`.
    pub fn print(&self, format: Format) {
        match format {
            Format::Text => eprint!("{}", self.text()),
            Format::Json => eprintln!("{}", self.json()),
        }
    }

    /// The summary printed last on `stderr` with `--format json`.
    pub fn from_stderr(lines: &[String]) -> Option<ExitSummary> {
        serde_json::from_str(lines.iter().rev().find(|l| !l.trim().is_empty())?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace() -> ExitSummary {
        ExitSummary::Trace(TraceSummary {
            transitions_seen: 2,
            shown: 0,
            events_shown: 0,
            events_unplaced: 0,
            stream: Stream {
                events: 2,
                lost: Lost {
                    total: 3,
                    ring_full: 3,
                    skipped: 0,
                },
                undecodable: 0,
            },
            tracking: Tracking {
                peak: 2,
                limit: 262_144,
                ..Tracking::default()
            },
            transitions: vec![TransitionCount {
                old: "SYN_SENT".into(),
                new: "ESTABLISHED".into(),
                count: 2,
            }],
        })
    }

    #[test]
    fn text_is_short_lines_with_the_figures() {
        let r = trace().text();
        assert!(
            r.starts_with("tcpwatch: 2 transitions seen, 0 shown\n"),
            "{r}"
        );
        assert!(
            r.contains("3 lost events (3 ring buffer full, 0 skipped"),
            "{r}"
        );
        assert!(r.contains("2 at peak (limit 262144), 0 at exit"), "{r}");
        assert!(r.contains("2  SYN_SENT -> ESTABLISHED"), "{r}");
        assert!(r.lines().all(|l| l.len() <= 100), "{r}");
    }

    /// A filtered recording says so, and what it left out.
    #[test]
    fn record_says_its_filter() {
        let mut s = RecordSummary {
            recorded: 19,
            file: "x.rec".into(),
            left_out: 49,
            ..RecordSummary::default()
        };
        let plain = ExitSummary::Record(s.clone()).text();
        assert_eq!(
            plain,
            "tcpwatch: recorded 19 events to x.rec, 0 lost events\n"
        );
        s.filter = Some("--lport 80".into());
        let filtered = ExitSummary::Record(s).text();
        assert!(
            filtered.starts_with("tcpwatch: recorded 19 events to x.rec (filtered by --lport 80: 49 events of other sockets left out), 0 lost events"),
            "{filtered}"
        );
    }

    #[test]
    fn json_is_one_line_that_reads_back() {
        let s = trace();
        let j = s.json();
        assert!(!j.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["summary"], "trace");
        assert_eq!(v["stream"]["lost"]["ring_full"], 3);
        let lines = vec!["tcpwatch: tracing".to_string(), j, String::new()];
        assert_eq!(ExitSummary::from_stderr(&lines), Some(s));
    }
}
