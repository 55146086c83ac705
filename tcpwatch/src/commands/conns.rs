//! `tcpwatch conns` and `tcpwatch ladder`: events through the correlator,
//! finished connections out, as records or as ladder pictures.

use std::io::{self, Write};

use crate::commands::Selector;
use crate::host::clock::Clock;
use crate::host::clock::Zone;
use crate::model::correlate::{Correlator, Role, Timeline};
use crate::model::filter::Filter;
use crate::model::sweep::SweepTable;
use crate::stream::context::Context;
use crate::stream::pipeline::{Batch, Consumer, Totals};
use crate::views::conns::{conns_header, ConnsWriter};
use crate::views::ladder::{are_peers, ladder, ladder_json, ladder_text, LadderRecord};
use crate::views::summary::{ConnsSummary, ExitSummary};
use crate::views::Format;

/// How finished connections are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Records(Format),
    Ladder(Format),
}

/// What the user asked `conns` or `ladder` for.
#[derive(Clone, Debug)]
pub struct ConnsOptions {
    pub view: View,
    pub filter: Filter,
    pub max_sockets: usize,
    /// Print the column header first (text records).
    pub header: bool,
    /// The clock face of text output.
    pub zone: Zone,
}

pub struct ConnsSink<W: Write> {
    out: W,
    view: View,
    selector: Selector,
    clock: Clock,
    zone: Zone,
    /// Records: writes each line into `lines`, a batch's lines written out
    /// at once.
    writer: ConnsWriter,
    lines: Vec<u8>,
    correlator: Correlator,
    /// Ladder: finished connections waiting for their other end (if it is a
    /// socket on this host it closes soon after), with a deadline.
    waiting: Vec<(Timeline, u64)>,
    pair_wait_ns: u64,
    finished: Vec<Timeline>,
    connections: u64,
    shown: u64,
}

/// Most connections held waiting for their other end.
const MAX_WAITING: usize = 4096;

impl<W: Write> ConnsSink<W> {
    /// The sink for a stream described by `ctx`: its correlator knows the
    /// sockets from before tracing and the stream's `tcp_fin_timeout`.
    pub fn build(out: W, opts: ConnsOptions, ctx: &Context) -> Self {
        let correlator = ctx.correlator(opts.max_sockets);
        let mut sink = ConnsSink {
            out,
            view: opts.view,
            selector: Selector::new(opts.filter, ctx),
            clock: ctx.clock,
            zone: opts.zone,
            writer: ConnsWriter::new(ctx.clock, opts.zone),
            lines: Vec::new(),
            correlator,
            waiting: Vec::new(),
            pair_wait_ns: 2_000_000_000,
            finished: Vec::new(),
            connections: 0,
            shown: 0,
        };
        if opts.header && sink.view == View::Records(Format::Text) {
            // A closed pipe shows at the first line written.
            let _ =
                writeln!(sink.out, "{}", conns_header(opts.zone)).and_then(|()| sink.out.flush());
        }
        sink
    }

    fn wanted(&mut self, t: &Timeline) -> bool {
        self.selector.matches(
            t.family,
            &t.local,
            &t.remote,
            t.owner.as_ref().map(|a| &*a.owner),
        )
    }

    fn emit(&mut self, settled_ns: Option<u64>) -> io::Result<()> {
        // Drained and put back: its buffer serves every batch.
        let mut finished = std::mem::take(&mut self.finished);
        self.connections += finished.len() as u64;
        for t in finished.drain(..) {
            match self.view {
                View::Records(format) => {
                    if !self.wanted(&t) {
                        continue;
                    }
                    self.shown += 1;
                    match format {
                        Format::Text => self.writer.text(&mut self.lines, &t),
                        Format::Json => {
                            let owner = t.owner.as_ref().map(|a| &*a.owner);
                            let cgroup = self.selector.cgroup(owner);
                            self.writer.json(&mut self.lines, &t, cgroup.as_deref());
                        }
                    }
                    self.lines.push(b'\n');
                }
                View::Ladder(_) => {
                    if let Some(i) = self.waiting.iter().position(|(w, _)| are_peers(w, &t)) {
                        let (peer, _) = self.waiting.swap_remove(i);
                        self.draw_pair(t, peer)?;
                    } else {
                        let deadline = t.closed_ns.saturating_add(self.pair_wait_ns);
                        self.waiting.push((t, deadline));
                        if self.waiting.len() > MAX_WAITING {
                            let (oldest, _) = self.waiting.remove(0);
                            self.draw_single(oldest)?;
                        }
                    }
                }
            }
        }
        self.finished = finished;
        let written = self.out.write_all(&self.lines);
        self.lines.clear();
        written?;
        if matches!(self.view, View::Ladder(_)) {
            let now = settled_ns.unwrap_or(u64::MAX);
            let mut i = 0;
            while i < self.waiting.len() {
                if self.waiting[i].1 <= now {
                    let (t, _) = self.waiting.remove(i);
                    self.draw_single(t)?;
                } else {
                    i += 1;
                }
            }
        }
        Ok(())
    }

    fn draw_pair(&mut self, a: Timeline, b: Timeline) -> io::Result<()> {
        if !self.wanted(&a) && !self.wanted(&b) {
            return Ok(());
        }
        self.shown += 2;
        // The client (the end that connected) goes on the left.
        let (left, right) = if b.role == Role::Client && a.role != Role::Client {
            (b, a)
        } else {
            (a, b)
        };
        let picture = ladder(&left, Some(&right), &self.clock);
        self.write_ladder(&picture)
    }

    fn draw_single(&mut self, t: Timeline) -> io::Result<()> {
        if !self.wanted(&t) {
            return Ok(());
        }
        self.shown += 1;
        let picture = ladder(&t, None, &self.clock);
        self.write_ladder(&picture)
    }

    fn write_ladder(&mut self, picture: &LadderRecord) -> io::Result<()> {
        match self.view {
            View::Ladder(Format::Json) => writeln!(self.out, "{}", ladder_json(picture)),
            // A blank line between pictures.
            _ => writeln!(self.out, "{}", ladder_text(picture, self.zone)),
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Consumer for ConnsSink<W> {
    fn records(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        for r in batch.records {
            self.correlator.push(r, &mut self.finished);
        }
        self.correlator
            .advance(batch.settled_ns, &mut self.finished);
        self.emit(Some(batch.settled_ns))?;
        self.out.flush()
    }

    fn sweep_table(&mut self) -> Option<&mut dyn SweepTable> {
        Some(&mut self.correlator)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.correlator.flush(&mut self.finished);
        self.emit(None)?;
        self.out.flush()
    }

    fn summary(&self, totals: &Totals) -> ExitSummary {
        ExitSummary::Conns(ConnsSummary {
            connections_finished: self.connections,
            shown: self.shown,
            still_open: self.correlator.open_connections(),
            stream: totals.stream(),
            tracking: totals.tracking(self.correlator.tracking()),
        })
    }
}
