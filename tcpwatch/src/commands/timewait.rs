//! `tcpwatch timewait`: the correlator's finished connections feed the
//! TIME_WAIT book; every interval the book is checked against the kernel's
//! own list and figures, and a snapshot is written (redrawn in place on a
//! terminal, appended when piped, one JSON object per interval).

use std::io::{self, Write};

use tcpwatch_common::Event;

use crate::host::clock::Clock;
use crate::host::kernelstat::{KernelFigures, Sysctls};
use crate::host::sockdiag;
use crate::model::correlate::{Correlator, Timeline};
use crate::model::decode::{interpret_all, Record, Rejects};
use crate::model::filter::Filter;
use crate::model::timewait::{KernelTimewait, KernelView, Snapshot, TimewaitBook};
use crate::model::TcpState;
use crate::stream::session::Sink;
use crate::views::timewait::{timewait_json, timewait_text};
use crate::views::Format;

/// The kernel's list of timewait sockets in tcpwatch's namespace, or why
/// it could not be read.
pub fn kernel_timewait() -> Result<Vec<KernelTimewait>, String> {
    let list = sockdiag::dump_timewait().map_err(|e| e.to_string())?;
    Ok(list
        .into_iter()
        .map(|s| KernelTimewait {
            local: s.local,
            remote: s.remote,
            substate: if s.substate == TcpState::FinWait2 {
                crate::model::correlate::TimewaitSubstate::FinWait2
            } else {
                crate::model::correlate::TimewaitSubstate::TimeWait
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
/// snapshot checked against the kernel's own list and figures.
pub struct TimewaitTracker {
    filter: Filter,
    clock: Clock,
    correlator: Correlator,
    book: TimewaitBook,
    interval_ns: u64,
    top: usize,
    next_snapshot_ns: u64,
    overflow_base: Option<u64>,
    overflow_prev: Option<u64>,
    finished: Vec<Timeline>,
    pub lost: crate::kernel::probe::LostCounts,
    /// Records taken from the ring buffer.
    pub events: u64,
    kernel_error: Option<String>,
    warn: Box<dyn FnMut(&str) + Send>,
    /// Live only: checks the correlator against the kernel after losses.
    sweep: Option<crate::model::sweep::Sweeper>,
}

pub struct TrackerOptions {
    pub filter: Filter,
    pub interval_ns: u64,
    pub top: usize,
}

impl TimewaitTracker {
    pub fn new(
        opts: TrackerOptions,
        clock: Clock,
        correlator: Correlator,
        book: TimewaitBook,
        warn: Box<dyn FnMut(&str) + Send>,
    ) -> Self {
        let overflow = KernelFigures::read().tw_overflow;
        TimewaitTracker {
            filter: opts.filter,
            clock,
            correlator,
            book,
            interval_ns: opts.interval_ns,
            top: opts.top,
            next_snapshot_ns: 0,
            overflow_base: overflow,
            overflow_prev: overflow,
            finished: Vec::new(),
            lost: crate::kernel::probe::LostCounts::default(),
            events: 0,
            kernel_error: None,
            warn,
            sweep: None,
        }
    }

    /// A tracker for live tracing on this host: its own network namespace
    /// and `tcp_fin_timeout`, at most `max_sockets` tracked. It counts from
    /// [`TimewaitTracker::start_on_host`], called once the probe is live.
    pub fn for_host(
        opts: TrackerOptions,
        max_sockets: usize,
        warn: Box<dyn FnMut(&str) + Send>,
    ) -> Self {
        let netns = crate::host::own_netns();
        let copts = crate::host::correlator_options(max_sockets, crate::host::fin_timeout_s());
        TimewaitTracker::new(
            opts,
            Clock::system(),
            Correlator::new(copts, None, netns),
            TimewaitBook::new(crate::model::timewait::TimewaitOptions::default(), netns, 0),
            warn,
        )
    }

    /// Starts live tracing now: `owners` of the sockets that already exist
    /// (from /proc), the timewait sockets that already exist (from the
    /// kernel), and the check for sockets whose close was lost.
    pub fn start_on_host(&mut self, owners: Option<crate::host::procfs::SocketSnapshot>) {
        let netns = crate::host::own_netns();
        let now = crate::host::clock::monotonic_ns();
        let copts = self.correlator.options();
        self.sweep_stale();
        self.start(
            Correlator::new(copts, owners, netns),
            TimewaitBook::new(
                crate::model::timewait::TimewaitOptions::default(),
                netns,
                now,
            ),
            now,
        );
    }

    /// Starts the first interval at `now_ns` and seeds the sockets that
    /// already exist (counted as "before tracing").
    pub fn start(&mut self, correlator: Correlator, book: TimewaitBook, now_ns: u64) {
        self.correlator = correlator;
        self.book = book;
        match self.kernel_list() {
            // Sockets from before tracing have no owner: a process filter
            // excludes them all.
            Ok(list) if self.filter.has_owner_filters() => drop(list),
            Ok(list) => self.book.seed_before_tracing(&list, now_ns),
            Err(e) => {
                (self.warn)(&format!(
                    "tcpwatch: cannot list existing timewait sockets ({e}); counting only those made from now on"
                ));
                self.kernel_error = Some(e);
            }
        }
        let _ = self
            .book
            .snapshot(now_ns, String::new(), self.top, KernelView::default());
        self.next_snapshot_ns = now_ns + self.interval_ns;
    }

    pub fn correlator(&self) -> &Correlator {
        &self.correlator
    }

    /// The kernel's list, narrowed to what the user's filters can match
    /// without knowing an owner.
    fn kernel_list(&self) -> Result<Vec<KernelTimewait>, String> {
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
        if self.kernel_error.is_none() {
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
                    (self.warn)(&format!("tcpwatch: cannot list timewait sockets: {e}"));
                    self.kernel_error = Some(e);
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
        self.events += records.len() as u64;
        for r in records {
            if let Record::State(t) = r {
                if t.new == TcpState::Established {
                    self.book.on_established(t.sock.netns, &t.local, &t.remote);
                }
            }
            self.correlator.push(r, &mut self.finished);
        }
        self.correlator.advance(settled_ns, &mut self.finished);
        if let Some(sweep) = &mut self.sweep {
            sweep.tick(settled_ns, &mut self.correlator, &mut *self.warn);
        }
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

    /// Warns once per growth of the lost counts.
    pub fn lost(&mut self, counts: crate::kernel::probe::LostCounts) {
        (self.warn)(&self.lost.advance(counts));
        if let Some(sweep) = &mut self.sweep {
            sweep.lost(counts.total());
        }
    }

    /// After lost events, drops the sockets the kernel no longer has (see
    /// `sweep`): for live tracing, never for a replay.
    pub fn sweep_stale(&mut self) {
        self.sweep = Some(crate::model::sweep::Sweeper::default());
    }

    /// The correlator's figures for an exit summary.
    pub fn tracking(&self) -> crate::views::Tracking {
        crate::views::Tracking {
            stale: self.sweep.as_ref().map_or(0, |s| s.dropped),
            ..self.correlator.tracking()
        }
    }

    /// Interprets a raw batch, warning about records that do not decode.
    pub fn interpret(&mut self, events: &[Event], mut rejects: Rejects) -> Vec<Record> {
        let records = interpret_all(events, &mut rejects);
        if let Some(w) = rejects.warning() {
            (self.warn)(&w);
        }
        records
    }
}

/// `tcpwatch timewait`: the tracker's snapshots written out.
pub struct TimewaitSink<W: Write> {
    out: W,
    format: Format,
    /// Redraw in place (a terminal) rather than append.
    redraw: bool,
    pub tracker: TimewaitTracker,
    finished: Vec<Timeline>,
    pub snapshots: u64,
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
        }
    }

    pub fn write(&mut self, s: &Snapshot) -> io::Result<()> {
        let lost = self.tracker.lost.total();
        write_snapshot(
            &mut self.out,
            s,
            self.format,
            self.redraw,
            self.snapshots,
            lost,
        )?;
        self.snapshots += 1;
        Ok(())
    }

    /// Takes the snapshot due at `now_ns` (for tests and replays).
    pub fn snapshot_now(&mut self, now_ns: u64) -> io::Result<Snapshot> {
        let s = self.tracker.snapshot(now_ns);
        self.write(&s)?;
        Ok(s)
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

impl<W: Write> Sink for TimewaitSink<W> {
    fn events(&mut self, events: &[Event], rejects: Rejects, settled_ns: u64) -> io::Result<()> {
        let records = self.tracker.interpret(events, rejects);
        let due = self
            .tracker
            .absorb(&records, settled_ns, &mut self.finished);
        self.finished.clear();
        if let Some(s) = due {
            self.write(&s)?;
        }
        Ok(())
    }

    fn lost(&mut self, counts: crate::kernel::probe::LostCounts) {
        self.tracker.lost(counts);
    }

    fn finish(&mut self) -> io::Result<()> {
        self.tracker.flush(&mut self.finished);
        self.finished.clear();
        self.out.flush()
    }
}
