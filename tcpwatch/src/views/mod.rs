//! Writing what tcpwatch saw, for people (aligned text) and for programs
//! (one JSON object per line): transitions in `trace`, connections in `conns`,
//! the ladder picture in `ladder`, TIME_WAIT snapshots in `timewait`, the
//! full-screen live view of `tcpwatch top` in `top`, exit summaries in
//! `summary`, and diagnostics on stderr in `log`.

pub mod conns;
pub mod ladder;
pub mod log;
pub mod summary;
pub mod timewait;
pub mod top;
pub mod trace;

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::host::clock::Zone;
use crate::model::cgroup::Cgroup;

pub use summary::Tracking;
pub use trace::{
    trace_event_json, trace_event_text, trace_header, trace_json, trace_text, EventKind,
    TraceEventLine, TraceLine, TraceWriter, TRACE_COLUMNS,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
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
