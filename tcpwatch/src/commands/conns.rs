//! `tcpwatch conns` and `tcpwatch ladder`: events through the correlator,
//! finished connections out, as records or as ladder pictures.

use std::io::{self, Write};

use tcpwatch_common::Event;

use crate::host::clock::Clock;
use crate::model::correlate::{Correlator, Role, Timeline};
use crate::model::decode::{interpret_all, Rejects};
use crate::model::filter::Filter;
use crate::stream::session::Sink;
use crate::views::conns::{conns_json, conns_text, CONNS_HEADER};
use crate::views::ladder::{are_peers, ladder};
use crate::views::Format;

/// How finished connections are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Records(Format),
    Ladder,
}

/// Counts for the summary printed on exit.
#[derive(Clone, Debug, Default)]
pub struct ConnsSummary {
    pub events: u64,
    pub connections: u64,
    pub shown: u64,
    pub lost: crate::kernel::probe::LostCounts,
    pub undecodable: u64,
    pub still_open: usize,
    pub tracking: crate::views::Tracking,
}

impl ConnsSummary {
    pub fn render(&self) -> String {
        format!(
            "tcpwatch: {} connections finished, {} shown, {} still open at exit, {} events, {} lost events ({} ring buffer full, {} skipped by the kernel), {} undecodable records, {}\n",
            self.connections,
            self.shown,
            self.still_open,
            self.events,
            self.lost.total(),
            self.lost.ring_full,
            self.lost.skipped,
            self.undecodable,
            self.tracking
        )
    }
}

pub struct ConnsSink<W: Write> {
    out: W,
    view: View,
    filter: Filter,
    clock: Clock,
    correlator: Correlator,
    /// Ladder: finished connections waiting for their other end (if it is a
    /// socket on this host it closes soon after), with a deadline.
    waiting: Vec<(Timeline, u64)>,
    pair_wait_ns: u64,
    finished: Vec<Timeline>,
    pub summary: ConnsSummary,
    warn: Box<dyn FnMut(&str) + Send>,
    /// Live only: checks the correlator against the kernel after losses.
    sweep: Option<crate::model::sweep::Sweeper>,
}

/// Most connections held waiting for their other end.
const MAX_WAITING: usize = 4096;

impl<W: Write> ConnsSink<W> {
    pub fn new(
        out: W,
        view: View,
        filter: Filter,
        clock: Clock,
        correlator: Correlator,
        warn: Box<dyn FnMut(&str) + Send>,
    ) -> Self {
        ConnsSink {
            out,
            view,
            filter,
            clock,
            correlator,
            waiting: Vec::new(),
            pair_wait_ns: 2_000_000_000,
            finished: Vec::new(),
            summary: ConnsSummary::default(),
            warn,
            sweep: None,
        }
    }

    /// After lost events, drops the sockets the kernel no longer has (see
    /// `sweep`): for live tracing, never for a replay.
    pub fn sweep_stale(&mut self) {
        self.sweep = Some(crate::model::sweep::Sweeper::default());
    }

    pub fn replace_correlator(&mut self, correlator: Correlator) {
        self.correlator = correlator;
    }

    pub fn header(&mut self) -> io::Result<()> {
        if self.view == View::Records(Format::Text) {
            writeln!(self.out, "{CONNS_HEADER}")?;
            self.out.flush()?;
        }
        Ok(())
    }

    fn wanted(&self, t: &Timeline) -> bool {
        self.filter.matches(
            t.family,
            &t.local,
            &t.remote,
            t.owner.as_ref().map(|a| &*a.owner),
        )
    }

    fn emit(&mut self, settled_ns: Option<u64>) -> io::Result<()> {
        let finished = std::mem::take(&mut self.finished);
        self.summary.connections += finished.len() as u64;
        for t in finished {
            match self.view {
                View::Records(format) => {
                    if !self.wanted(&t) {
                        continue;
                    }
                    self.summary.shown += 1;
                    let line = match format {
                        Format::Text => conns_text(&t, &self.clock),
                        Format::Json => conns_json(&t, &self.clock),
                    };
                    writeln!(self.out, "{line}")?;
                }
                View::Ladder => {
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
        if self.view == View::Ladder {
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
        self.summary.shown += 2;
        // The client (the end that connected) goes on the left.
        let (left, right) = if b.role == Role::Client && a.role != Role::Client {
            (b, a)
        } else {
            (a, b)
        };
        writeln!(self.out, "{}", ladder(&left, Some(&right), &self.clock))
    }

    fn draw_single(&mut self, t: Timeline) -> io::Result<()> {
        if !self.wanted(&t) {
            return Ok(());
        }
        self.summary.shown += 1;
        writeln!(self.out, "{}", ladder(&t, None, &self.clock))
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Sink for ConnsSink<W> {
    fn events(
        &mut self,
        events: &[Event],
        mut rejects: Rejects,
        settled_ns: u64,
    ) -> io::Result<()> {
        let records = interpret_all(events, &mut rejects);
        if let Some(w) = rejects.warning() {
            self.summary.undecodable += rejects.count;
            (self.warn)(&w);
        }
        self.summary.events += records.len() as u64;
        for r in &records {
            self.correlator.push(r, &mut self.finished);
        }
        self.correlator.advance(settled_ns, &mut self.finished);
        if let Some(sweep) = &mut self.sweep {
            sweep.tick(settled_ns, &mut self.correlator, &mut *self.warn);
        }
        self.emit(Some(settled_ns))?;
        self.out.flush()
    }

    fn lost(&mut self, counts: crate::kernel::probe::LostCounts) {
        (self.warn)(&self.summary.lost.advance(counts));
        if let Some(sweep) = &mut self.sweep {
            sweep.lost(counts.total());
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.correlator.flush(&mut self.finished);
        self.emit(None)?;
        self.summary.still_open = self.correlator.open_connections();
        self.summary.tracking = self.correlator.tracking();
        self.summary.tracking.stale = self.sweep.as_ref().map_or(0, |s| s.dropped);
        self.out.flush()
    }
}
