//! The figures tcpwatch prints on stderr: the exit summary of each command
//! (run with `--format json`, it is one JSON object, the last line on
//! stderr, read here into the library's own `ExitSummary`) and the LOST
//! lines it prints while it runs.
//!
//! Every test reads an exit summary through [`exit_summary`] or the
//! per-command functions below, which also check that its lost events add
//! up.

pub use tcpwatch::views::summary::{
    ConnsSummary, ExitSummary, Lost, RecordSummary, Stream, TimewaitSummary, TraceSummary,
};

/// The exit summary a command printed last on `stderr` (it must have been
/// run with `--format json`); panics without one, or if its lost events
/// are not the ring buffer's plus the kernel's.
pub fn exit_summary(stderr: &[String]) -> ExitSummary {
    let s = ExitSummary::from_stderr(stderr)
        .unwrap_or_else(|| panic!("no exit summary on stderr:\n{}", stderr.join("\n")));
    if let Some(stream) = s.stream() {
        let l = stream.lost;
        assert_eq!(
            l.total,
            l.ring_full + l.skipped,
            "lost is not ring + skipped: {}",
            s.json()
        );
    }
    s
}

pub fn trace_summary(stderr: &[String]) -> TraceSummary {
    match exit_summary(stderr) {
        ExitSummary::Trace(s) => s,
        other => panic!("not a trace summary: {}", other.json()),
    }
}

/// `conns`, and `replay FILE conns`.
pub fn conns_summary(stderr: &[String]) -> ConnsSummary {
    match exit_summary(stderr) {
        ExitSummary::Conns(s) => s,
        other => panic!("not a conns summary: {}", other.json()),
    }
}

pub fn timewait_summary(stderr: &[String]) -> TimewaitSummary {
    match exit_summary(stderr) {
        ExitSummary::Timewait(s) => s,
        other => panic!("not a timewait summary: {}", other.json()),
    }
}

pub fn record_summary(stderr: &[String]) -> RecordSummary {
    match exit_summary(stderr) {
        ExitSummary::Record(s) => s,
        other => panic!("not a record summary: {}", other.json()),
    }
}

/// What a command counted first: transitions seen (`trace`), connections
/// finished (`conns`), snapshots (`timewait`), events written (`record`).
pub fn main_count(s: &ExitSummary) -> u64 {
    match s {
        ExitSummary::Trace(s) => s.transitions_seen,
        ExitSummary::Conns(s) => s.connections_finished,
        ExitSummary::Timewait(s) => s.snapshots,
        ExitSummary::Record(s) => s.recorded,
        other => panic!("not a summary these tests read: {}", other.json()),
    }
}

/// Lost events so far, from the last "tcpwatch: LOST N events (T in all:
/// R with the ring buffer full - ...; K skipped by the kernel ...)" line
/// printed while running (none: zero).
pub fn lost_so_far(stderr: &[String]) -> Lost {
    let Some(line) = stderr
        .iter()
        .rev()
        .find(|l| l.starts_with("tcpwatch: LOST "))
    else {
        return Lost::default();
    };
    // Each number is named by the words after it, up to a colon or
    // semicolon.
    let number_before = |words: &str| -> u64 {
        line.split([':', ';', '(', ')'])
            .find_map(|part| {
                let (n, label) = part.trim().split_once(' ')?;
                label.starts_with(words).then(|| n.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no '{words}' in: {line}"))
    };
    Lost {
        total: number_before("in all"),
        ring_full: number_before("with the ring buffer full"),
        skipped: number_before("skipped by the kernel"),
    }
}

/// Not live: a `--format json` summary after LOST lines, and the LOST lines,
/// read as the checks read them.
#[test]
fn summaries_and_lost_lines_are_read_as_numbers() {
    let stderr = [
        "tcpwatch: tracing TCP connections; Ctrl-C to stop".to_string(),
        "tcpwatch: LOST 8 events (102 in all: 2 with the ring buffer full - raise --ring-size; \
         100 skipped by the kernel while another BPF program ran on the CPU)"
            .to_string(),
        r#"{"summary":"conns","connections_finished":4,"shown":4,"still_open":0,"stream":{"events":22,"lost":{"total":102,"ring_full":2,"skipped":100},"undecodable":0},"tracking":{"evicted":7,"stale":3,"peak":2000,"limit":2000,"at_exit":1}}"#.to_string(),
    ];
    let c = conns_summary(&stderr);
    assert_eq!(
        (c.connections_finished, c.shown, c.stream.events),
        (4, 4, 22)
    );
    assert_eq!(
        c.stream.lost,
        Lost {
            total: 102,
            ring_full: 2,
            skipped: 100
        }
    );
    assert_eq!(
        (
            c.tracking.peak,
            c.tracking.limit,
            c.tracking.at_exit,
            c.tracking.stale
        ),
        (2000, 2000, 1, 3)
    );
    assert_eq!(main_count(&exit_summary(&stderr)), 4);
    assert_eq!(lost_so_far(&stderr), c.stream.lost);
    assert_eq!(lost_so_far(&[]), Lost::default());
    // A summary whose lost events do not add up is refused.
    let bad = [stderr[2].replace(r#""total":102"#, r#""total":103"#)];
    assert!(std::panic::catch_unwind(|| exit_summary(&bad)).is_err());
    // No summary, or a run that wrote on after it: none to read.
    assert!(ExitSummary::from_stderr(&stderr[..2]).is_none());
}
