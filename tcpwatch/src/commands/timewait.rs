//! `tcpwatch timewait`: the correlator's finished connections feed the
//! TIME_WAIT book; every interval the book is checked against the kernel's
//! own list and figures, and a snapshot is written (redrawn in place on a
//! terminal, appended when piped, one JSON object per interval).

use std::io::{self, Write};

use crate::host::kernelstat::{KernelFigures, Sysctls};
use crate::host::sockdiag::{self, SockDiagError};
use crate::model::correlate::{Correlator, Timeline, TimewaitSubstate};
use crate::model::decode::Record;
use crate::model::filter::Filter;
use crate::model::lost::LostCounts;
use crate::model::sweep::SweepTable;
use crate::model::timewait::{KernelTimewait, KernelView, Snapshot, TimewaitBook, TimewaitOptions};
use crate::model::TcpState;
use crate::stream::context::Context;
use crate::stream::pipeline::{Batch, Consumer, Totals};
use crate::views::summary::{ExitSummary, TimewaitSummary, Tracking};
use crate::views::timewait::{timewait_json, timewait_text};
use crate::views::Format;

/// The kernel's list of timewait sockets in tcpwatch's namespace.
pub fn kernel_timewait() -> Result<Vec<KernelTimewait>, SockDiagError> {
    let list = sockdiag::dump_timewait()?;
    Ok(list
        .into_iter()
        .map(|s| KernelTimewait {
            local: s.local,
            remote: s.remote,
            substate: if s.substate == TcpState::FinWait2 {
                TimewaitSubstate::FinWait2
            } else {
                TimewaitSubstate::TimeWait
            },
            expires_ms: s.expires_ms,
        })
        .collect())
}

/// Reads the kernel's figures; `overflow_base` is TCPTimeWaitOverflow at
/// start, `overflow_prev` at the previous snapshot.
fn kernel_view(overflow_base: Option<u64>, overflow_prev: &mut Option<u64>) -> KernelView {
    let figures = KernelFigures::read();
    let sysctls = Sysctls::read().ok();
    let overflow_now = figures.tw_overflow;
    let last = match (overflow_now, *overflow_prev) {
        (Some(now), Some(prev)) => Some(now.saturating_sub(prev)),
        _ => None,
    };
    *overflow_prev = overflow_now;
    KernelView {
        sockstat_tw: figures.sockstat_tw,
        max_tw_buckets: sysctls.as_ref().map(|s| s.max_tw_buckets),
        overflow_since_start: match (overflow_now, overflow_base) {
            (Some(now), Some(base)) => Some(now.saturating_sub(base)),
            _ => None,
        },
        overflow_last_interval: last,
        port_range: sysctls
            .as_ref()
            .map(|s| u32::from(s.port_range.1).saturating_sub(u32::from(s.port_range.0)) + 1),
        tw_reuse: sysctls.as_ref().map(|s| s.tw_reuse),
        fin_timeout_s: sysctls.as_ref().map(|s| s.fin_timeout_s),
        timestamps: sysctls.as_ref().map(|s| s.timestamps),
    }
}

/// The TIME_WAIT accounting that `timewait` prints and the daemon serves:
/// events through the correlator into the book, and every interval a
/// snapshot checked against the kernel's own list and figures. Live only:
/// it reads this host's kernel.
pub struct TimewaitTracker {
    filter: Filter,
    clock: crate::host::clock::Clock,
    correlator: Correlator,
    book: TimewaitBook,
    interval_ns: u64,
    top: usize,
    next_snapshot_ns: u64,
    overflow_base: Option<u64>,
    overflow_prev: Option<u64>,
    finished: Vec<Timeline>,
    /// The kernel's list could not be read: it is not asked again.
    kernel_unreadable: bool,
}

pub struct TrackerOptions {
    pub filter: Filter,
    pub interval_ns: u64,
    pub top: usize,
    pub max_sockets: usize,
}

impl TimewaitTracker {
    /// Starts counting where `ctx` begins: owners of the sockets that
    /// already exist from its snapshot, the timewait sockets that already
    /// exist from the kernel (counted as "before tracing"), and the first
    /// interval from then.
    pub fn start(opts: TrackerOptions, ctx: &Context) -> Self {
        let now_ns = ctx.live_since_ns().unwrap_or(0);
        let overflow = KernelFigures::read().tw_overflow;
        let mut tracker = TimewaitTracker {
            filter: opts.filter,
            clock: ctx.clock,
            correlator: ctx.correlator(opts.max_sockets),
            book: TimewaitBook::new(TimewaitOptions::default(), ctx.netns, now_ns),
            interval_ns: opts.interval_ns,
            top: opts.top,
            next_snapshot_ns: now_ns + opts.interval_ns,
            overflow_base: overflow,
            overflow_prev: overflow,
            finished: Vec::new(),
            kernel_unreadable: false,
        };
        match tracker.kernel_list() {
            // Sockets from before tracing have no owner: a process filter
            // excludes them all.
            Ok(list) if tracker.filter.has_owner_filters() => drop(list),
            Ok(list) => tracker.book.seed_before_tracing(&list, now_ns),
            Err(e) => {
                let e = anyhow::Error::from(e);
                tracing::warn!(
                    "cannot list existing timewait sockets ({e:#}); counting only those made from now on"
                );
                tracker.kernel_unreadable = true;
            }
        }
        let _ = tracker
            .book
            .snapshot(now_ns, String::new(), tracker.top, KernelView::default());
        tracker
    }

    pub fn correlator(&self) -> &Correlator {
        &self.correlator
    }

    /// The kernel's list, narrowed to what the user's filters can match
    /// without knowing an owner.
    fn kernel_list(&self) -> Result<Vec<KernelTimewait>, SockDiagError> {
        let mut list = kernel_timewait()?;
        list.retain(|k| {
            let family = if k.local.addr.is_ipv4() {
                crate::model::Family::V4
            } else {
                crate::model::Family::V6
            };
            self.filter.matches_endpoints(family, &k.local, &k.remote)
        });
        Ok(list)
    }

    /// The figures for the interval ending at `now_ns`.
    pub fn snapshot(&mut self, now_ns: u64) -> Snapshot {
        if !self.kernel_unreadable {
            // Sockets closed since the events last processed are not in the
            // book yet: allow for that lag, the correlator's grace, and a
            // second.
            let lag_ms = crate::host::clock::monotonic_ns().saturating_sub(now_ns) / 1_000_000;
            let recent_ms = (lag_ms + 1_000).min(u64::from(u32::MAX)) as u32;
            let count_unmatched = !self.filter.has_owner_filters();
            match self.kernel_list() {
                Ok(list) => self
                    .book
                    .reconcile(&list, now_ns, recent_ms, count_unmatched),
                Err(e) => {
                    let e = anyhow::Error::from(e);
                    tracing::warn!("cannot list timewait sockets: {e:#}");
                    self.kernel_unreadable = true;
                }
            }
        }
        let view = kernel_view(self.overflow_base, &mut self.overflow_prev);
        self.book
            .snapshot(now_ns, self.clock.rfc3339(now_ns), self.top, view)
    }

    /// Takes one batch of records settled up to `settled_ns`. Finished
    /// connections the filter matches are appended to `out`; the snapshot
    /// is returned when one falls due.
    pub fn absorb(
        &mut self,
        records: &[Record],
        settled_ns: u64,
        out: &mut Vec<Timeline>,
    ) -> Option<Snapshot> {
        for r in records {
            if let Record::State(t) = r {
                if t.new == TcpState::Established {
                    self.book.on_established(t.sock.netns, &t.local, &t.remote);
                }
            }
            self.correlator.push(r, &mut self.finished);
        }
        self.correlator.advance(settled_ns, &mut self.finished);
        self.take_finished(out);
        if self.next_snapshot_ns != 0 && settled_ns >= self.next_snapshot_ns {
            let s = self.snapshot(settled_ns);
            // Keep to the schedule, but never bunch up after a stall.
            self.next_snapshot_ns =
                (self.next_snapshot_ns + self.interval_ns).max(settled_ns + self.interval_ns / 2);
            return Some(s);
        }
        None
    }

    /// The stream ended: every connection still held is finished.
    pub fn flush(&mut self, out: &mut Vec<Timeline>) {
        self.correlator.flush(&mut self.finished);
        self.take_finished(out);
    }

    fn take_finished(&mut self, out: &mut Vec<Timeline>) {
        for t in self.finished.drain(..) {
            if self.filter.matches(
                t.family,
                &t.local,
                &t.remote,
                t.owner.as_ref().map(|a| &*a.owner),
            ) {
                self.book.on_timeline(&t);
                out.push(t);
            }
        }
    }

    /// The table the session sweeps after lost events.
    pub fn sweep_table(&mut self) -> &mut dyn SweepTable {
        &mut self.correlator
    }

    /// The correlator's figures for an exit summary.
    pub fn tracking(&self) -> Tracking {
        self.correlator.tracking()
    }
}

/// `tcpwatch timewait`: the tracker's snapshots written out.
pub struct TimewaitSink<W: Write> {
    out: W,
    format: Format,
    /// Redraw in place (a terminal) rather than append.
    redraw: bool,
    tracker: TimewaitTracker,
    finished: Vec<Timeline>,
    snapshots: u64,
    lost: LostCounts,
}

impl<W: Write> TimewaitSink<W> {
    pub fn new(out: W, format: Format, redraw: bool, tracker: TimewaitTracker) -> Self {
        TimewaitSink {
            out,
            format,
            redraw,
            tracker,
            finished: Vec::new(),
            snapshots: 0,
            lost: LostCounts::default(),
        }
    }

    pub fn write(&mut self, s: &Snapshot) -> io::Result<()> {
        write_snapshot(
            &mut self.out,
            s,
            self.format,
            self.redraw,
            self.snapshots,
            self.lost.total(),
        )?;
        self.snapshots += 1;
        Ok(())
    }
}

/// Writes one snapshot as `timewait` shows it; `written` snapshots came
/// before it, and `lost` kernel events are known lost.
pub fn write_snapshot<W: Write>(
    out: &mut W,
    s: &Snapshot,
    format: Format,
    redraw: bool,
    written: u64,
    lost: u64,
) -> io::Result<()> {
    match format {
        Format::Json => writeln!(out, "{}", timewait_json(s))?,
        Format::Text => {
            if redraw {
                // Home the cursor and clear the screen: a live table.
                write!(out, "\x1b[H\x1b[2J")?;
            } else if written > 0 {
                writeln!(out)?;
            }
            write!(out, "{}", timewait_text(s))?;
            if lost > 0 {
                writeln!(
                    out,
                    "  ! {lost} kernel events lost since start: counts may be low"
                )?;
            }
        }
    }
    out.flush()
}

impl<W: Write> Consumer for TimewaitSink<W> {
    fn records(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        let due = self
            .tracker
            .absorb(batch.records, batch.settled_ns, &mut self.finished);
        self.finished.clear();
        if let Some(s) = due {
            self.write(&s)?;
        }
        Ok(())
    }

    fn sweep_table(&mut self) -> Option<&mut dyn SweepTable> {
        Some(self.tracker.sweep_table())
    }

    fn lost(&mut self, lost: LostCounts) {
        self.lost = lost;
    }

    fn finish(&mut self) -> io::Result<()> {
        self.tracker.flush(&mut self.finished);
        self.finished.clear();
        self.out.flush()
    }

    fn summary(&self, totals: &Totals) -> ExitSummary {
        ExitSummary::Timewait(TimewaitSummary {
            snapshots: self.snapshots,
            stream: totals.stream(),
            tracking: totals.tracking(self.tracker.tracking()),
        })
    }
}
