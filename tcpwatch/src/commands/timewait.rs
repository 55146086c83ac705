//! `tcpwatch timewait`: the correlator's finished connections feed the
//! TIME_WAIT book, which keeps its counts as they come and expire, and the
//! churn book (clients that should pool their connections); every
//! interval a snapshot is taken from those counts with the kernel's own
//! figures (sockstat, sysctls) and written (redrawn in place on a terminal,
//! appended when piped, one JSON object per interval). The kernel's list of
//! timewait sockets (a sock_diag dump, whose cost grows with the list) is
//! read to check the book at start, after lost events, every check
//! interval, after tcp_max_tw_buckets overflowed, and at every snapshot
//! while the list is short.
//!
//! From a recording (`replay FILE timewait`) no kernel is asked: the
//! snapshots follow the events' clock, timewait sockets are taken to last
//! their full time, and what only the kernel knows (sockets from before
//! the recording, its list and counts, its sysctls but `tcp_fin_timeout`)
//! is left unknown and said so.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Write};
use std::sync::Arc;

use crate::commands::Selector;
use crate::host::clock::Zone;
use crate::host::kernelstat::{KernelFigures, Sysctls};
use crate::host::netns::{Namespace, NetnsError, Selection};
use crate::host::sockdiag::{self, SockDiagError};
use crate::model::cgroup::Cgroup;
use crate::model::churn::{Churn, ChurnBook, ChurnOptions};
use crate::model::correlate::{Correlator, Timeline, TimewaitSubstate};
use crate::model::decode::Record;
use crate::model::filter::Filter;
use crate::model::lost::LostCounts;
use crate::model::sweep::SweepTable;
use crate::model::timewait::{
    named_group_of, rank, Group, KernelTimewait, KernelView, Snapshot, TimewaitBook,
    TimewaitOptions, NO_CONTAINER,
};
use crate::model::{Owner, TcpState};
use crate::stream::context::Context;
use crate::stream::pipeline::{Batch, Consumer, Totals};
use crate::views::summary::{ExitSummary, TimewaitSummary, Tracking};
use crate::views::timewait::{timewait_json, timewait_text};
use crate::views::Format;

/// The kernel's list of timewait sockets in the calling thread's
/// namespace, each handed to `each` as it is read (nothing of the list is
/// kept: it may hold tcp_max_tw_buckets sockets).
fn each_kernel_timewait(mut each: impl FnMut(&KernelTimewait)) -> Result<u64, SockDiagError> {
    sockdiag::each_timewait(|s| {
        each(&KernelTimewait {
            local: s.local,
            remote: s.remote,
            substate: if s.substate == TcpState::FinWait2 {
                TimewaitSubstate::FinWait2
            } else {
                TimewaitSubstate::TimeWait
            },
            expires_ms: s.expires_ms,
        })
    })
}

/// Whether the user's filters can match a socket of the kernel's list
/// without knowing its owner.
fn listable(filter: &Filter, k: &KernelTimewait) -> bool {
    let family = if k.local.addr.is_ipv4() {
        crate::model::Family::V4
    } else {
        crate::model::Family::V6
    };
    filter.matches_endpoints(family, &k.local, &k.remote)
}

/// When the book is checked against the kernel's list of timewait
/// sockets.
#[derive(Clone, Copy, Debug)]
pub struct CheckOptions {
    /// Longest time between two checks.
    pub interval_ns: u64,
    /// The list is read at every snapshot while the kernel holds at most
    /// this many timewait sockets (sockstat `tw`): reading it costs little.
    pub list_below: u64,
}

impl CheckOptions {
    /// Checks every `interval_ns`, and at every snapshot while the list is
    /// short.
    pub fn every(interval_ns: u64) -> Self {
        CheckOptions {
            interval_ns,
            ..CheckOptions::default()
        }
    }
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            interval_ns: 30_000_000_000,
            list_below: SHORT_LIST,
        }
    }
}

/// The longest list of timewait sockets read at every snapshot.
pub const SHORT_LIST: u64 = 10_000;

/// What one namespace's kernel says, read from inside it.
#[derive(Default)]
struct KernelRead {
    /// Whether its list of timewait sockets was read, into the book as it
    /// came (`None`: not read).
    list: Option<Result<(), SockDiagError>>,
    figures: KernelFigures,
    sysctls: Option<Sysctls>,
}

impl KernelRead {
    /// Reads the calling thread's namespace: its figures, and its list of
    /// timewait sockets when `list` reads it (which it does or not from
    /// the figures). With a list, the figures are read again after it:
    /// while sockets are made, the kernel's count read after the list is
    /// at least the list's length.
    fn here(list: impl FnOnce(&KernelFigures) -> Option<Result<(), SockDiagError>>) -> KernelRead {
        let figures = KernelFigures::read();
        let list = list(&figures);
        KernelRead {
            figures: if list.is_some() {
                KernelFigures::read()
            } else {
                figures
            },
            list,
            sysctls: Sysctls::read().ok(),
        }
    }
}

/// The kernel's figures; `overflow_base` is TCPTimeWaitOverflow at start,
/// `overflow_prev` at the previous snapshot.
fn kernel_view(
    figures: &KernelFigures,
    sysctls: Option<&Sysctls>,
    overflow_base: Option<u64>,
    overflow_prev: &mut Option<u64>,
) -> KernelView {
    let overflow_now = figures.tw_overflow;
    let last = match (overflow_now, *overflow_prev) {
        (Some(now), Some(prev)) => Some(now.saturating_sub(prev)),
        _ => None,
    };
    *overflow_prev = overflow_now;
    KernelView {
        sockstat_tw: figures.sockstat_tw,
        max_tw_buckets: sysctls.map(|s| s.max_tw_buckets),
        overflow_since_start: match (overflow_now, overflow_base) {
            (Some(now), Some(base)) => Some(now.saturating_sub(base)),
            _ => None,
        },
        overflow_last_interval: last,
        port_range: sysctls.map(|s| s.port_range_size()),
        tw_reuse: sysctls.map(|s| s.tw_reuse),
        fin_timeout_s: sysctls.map(|s| s.fin_timeout_s),
        timestamps: sysctls.map(|s| s.timestamps),
    }
}

/// One network namespace's TIME_WAIT book, checked against that
/// namespace's own kernel.
struct NsBook {
    /// How to enter it to read its kernel; `None` when it could not be
    /// found (its figures then come from events alone).
    ns: Option<Namespace>,
    book: TimewaitBook,
    churn: ChurnBook,
    overflow_base: Option<u64>,
    overflow_prev: Option<u64>,
    /// Its list of timewait sockets could not be read: not asked again.
    kernel_unreadable: bool,
    /// When its list is next read whatever its length.
    next_check_ns: u64,
    /// Lost events counted when its list was last read.
    lost_at_check: u64,
    /// TCPTimeWaitOverflow when its list was last read.
    overflow_at_check: Option<u64>,
}

/// The TIME_WAIT accounting that `timewait` prints and the daemon serves:
/// events through the correlator into one book per network namespace, and
/// every interval a snapshot of each, checked against that namespace's own
/// list and figures (read from inside it). Live only: it reads this host's
/// kernel.
pub struct TimewaitTracker {
    selector: Selector,
    clock: crate::host::clock::Clock,
    correlator: Correlator,
    books: BTreeMap<u32, NsBook>,
    /// Every namespace seen gets a book (the daemon without `--netns`).
    every: bool,
    /// Namespaces seen that could not be found (since the last snapshot).
    unfound: HashSet<u32>,
    /// The book of events whose namespace is not known (a kernel whose BTF
    /// lacks the field): the context's namespace.
    primary: u32,
    interval_ns: u64,
    top: usize,
    next_snapshot_ns: u64,
    finished: Vec<Timeline>,
    churn: ChurnOptions,
    /// Live: the host's kernel is there to ask. From a recording it is
    /// not, and only `fin_timeout_s` of its settings is known.
    live: bool,
    fin_timeout_s: u32,
    /// The newest settled time seen, and when the last snapshot was
    /// taken (a replay ends with a snapshot at its last event).
    settled_ns: u64,
    last_snapshot_ns: u64,
    check: CheckOptions,
    /// Kernel events lost so far.
    lost: u64,
}

pub struct TrackerOptions {
    pub filter: Filter,
    pub interval_ns: u64,
    pub top: usize,
    pub max_sockets: usize,
    pub churn: ChurnOptions,
    pub check: CheckOptions,
}

impl TimewaitTracker {
    /// Starts counting where `ctx` begins: owners of the sockets that
    /// already exist from its snapshot, the timewait sockets that already
    /// exist in each namespace from its kernel (counted as "before
    /// tracing"), and the first interval from then. From a recording,
    /// each namespace's book opens at its first event, and the first
    /// interval starts at the recording's first event.
    pub fn start(opts: TrackerOptions, ctx: &Context) -> Self {
        let live_since = ctx.live_since_ns();
        let now_ns = live_since.unwrap_or(0);
        let scope = ctx.scope.clone().unwrap_or_else(Selection::own);
        let primary = ctx.netns.unwrap_or(0);
        let mut tracker = TimewaitTracker {
            selector: Selector::new(opts.filter, ctx),
            clock: ctx.clock,
            correlator: ctx.correlator(opts.max_sockets),
            books: BTreeMap::new(),
            every: live_since.is_none() || scope == Selection::All,
            unfound: HashSet::new(),
            primary,
            interval_ns: opts.interval_ns,
            top: opts.top,
            next_snapshot_ns: live_since.map_or(0, |n| n + opts.interval_ns),
            finished: Vec::new(),
            churn: opts.churn,
            live: live_since.is_some(),
            fin_timeout_s: ctx.fin_timeout_s,
            settled_ns: now_ns,
            last_snapshot_ns: now_ns,
            check: opts.check,
            lost: 0,
        };
        if !tracker.live {
            return tracker;
        }
        let namespaces = match scope {
            Selection::All => vec![scope.primary()],
            Selection::Only(v) => v,
        };
        for ns in namespaces {
            tracker.open_book(ns.inode, Some(ns), now_ns);
        }
        tracker
    }

    /// A book for the namespace `inode`, its timewait sockets that exist
    /// now counted as from before tracing.
    fn open_book(&mut self, inode: u32, ns: Option<Namespace>, now_ns: u64) {
        let ns = ns.or_else(|| Namespace::find(inode).ok().filter(|_| self.live));
        let new_book = || {
            TimewaitBook::new(
                TimewaitOptions::default(),
                Some(inode).filter(|i| *i != 0),
                now_ns,
            )
        };
        let mut book = new_book();
        // Sockets from before tracing have no owner: a process filter
        // excludes them all.
        let filter = &self.selector.filter;
        let seed = !filter.has_owner_filters();
        let read = ns.as_ref().and_then(|ns| {
            ns.run_in(|| {
                KernelRead::here(|_| {
                    Some(
                        each_kernel_timewait(|k| {
                            if seed && listable(filter, k) {
                                book.count_before_tracing(k, now_ns);
                            }
                        })
                        .map(drop),
                    )
                })
            })
            .map_err(|e| tracing::warn!("network namespace {}: {e}", ns.label()))
            .ok()
        });
        let mut nb = NsBook {
            book,
            churn: ChurnBook::new(self.churn, now_ns),
            overflow_base: read.as_ref().and_then(|r| r.figures.tw_overflow),
            overflow_prev: read.as_ref().and_then(|r| r.figures.tw_overflow),
            kernel_unreadable: read.is_none() || !self.live,
            next_check_ns: now_ns.saturating_add(self.check.interval_ns),
            lost_at_check: self.lost,
            overflow_at_check: read.as_ref().and_then(|r| r.figures.tw_overflow),
            ns,
        };
        if let Some(Err(e)) = read.and_then(|r| r.list) {
            let e = anyhow::Error::from(e);
            tracing::warn!(
                "cannot list existing timewait sockets ({e:#}); counting only those made from now on"
            );
            // Not the part of the list read before the error either.
            nb.book = new_book();
            nb.kernel_unreadable = true;
        }
        let _ = nb
            .book
            .snapshot(now_ns, String::new(), self.top, KernelView::default());
        self.books.insert(inode, nb);
    }

    pub fn correlator(&self) -> &Correlator {
        &self.correlator
    }

    /// The book of namespace `netns` (the primary's when unknown); `None`
    /// when that namespace is not reported. A namespace seen for the
    /// first time gets a book when every namespace is reported.
    fn book_of(&mut self, netns: Option<u32>, now_ns: u64) -> Option<&mut NsBook> {
        let inode = netns.unwrap_or(self.primary);
        if !self.live && !self.books.contains_key(&inode) {
            // A recording's namespaces cannot be looked for: each gets a
            // book at its first event.
            self.open_book(inode, None, now_ns);
        }
        if self.every && !self.books.contains_key(&inode) && !self.unfound.contains(&inode) {
            // A namespace that no process or name holds any more (its
            // last events arriving) cannot be checked: not reported, and
            // not looked for again before the next snapshot.
            match Namespace::find(inode) {
                Ok(ns) => self.open_book(inode, Some(ns), now_ns),
                Err(_) => {
                    self.unfound.insert(inode);
                }
            }
        }
        self.books.get_mut(&inode)
    }

    /// The figures of each namespace for the interval ending at `now_ns`.
    pub fn snapshot(&mut self, now_ns: u64) -> Vec<Snapshot> {
        self.last_snapshot_ns = now_ns;
        // Sockets closed since the events last processed are not in the
        // book yet: allow for that lag, the correlator's grace, and a
        // second.
        let lag_ms = if self.live {
            crate::host::clock::monotonic_ns().saturating_sub(now_ns) / 1_000_000
        } else {
            0
        };
        let recent_ms = (lag_ms + 1_000).min(u64::from(u32::MAX)) as u32;
        let count_unmatched = !self.selector.filter.has_owner_filters();
        self.unfound.clear();
        let mut out = Vec::with_capacity(self.books.len());
        let mut gone = Vec::new();
        let inodes: Vec<u32> = self.books.keys().copied().collect();
        for inode in inodes {
            let Some(nb) = self.books.get_mut(&inode) else {
                continue;
            };
            // The list at start (read when the book opened), after lost
            // events, every check interval, and while it is short.
            // (Due within half an interval: snapshots come a little early
            // or late, and a check interval equal to the snapshots' own
            // must check every one.)
            let due = now_ns.saturating_add(self.interval_ns / 2) >= nb.next_check_ns
                || self.lost > nb.lost_at_check;
            let short = self.check.list_below;
            // And after tcp_max_tw_buckets overflowed: a close then made no
            // timewait socket, which its events do not show, so only the
            // list tells which entries were never made.
            let overflowed = nb.overflow_at_check;
            let readable = !nb.kernel_unreadable;
            let with_list = |f: &KernelFigures| {
                readable
                    && (due
                        || f.sockstat_tw.is_none_or(|n| n <= short)
                        || f.tw_overflow.is_some_and(|o| Some(o) != overflowed))
            };
            // The list goes into the book as it is read.
            let (book, filter) = (&mut nb.book, &self.selector.filter);
            let check = |f: &KernelFigures| {
                if !with_list(f) {
                    return None;
                }
                let mut check = book.reconciling(now_ns, recent_ms, count_unmatched);
                let read = each_kernel_timewait(|k| {
                    if listable(filter, k) {
                        check.listed(k);
                    }
                });
                Some(read.map(|_| check.finish()))
            };
            let read = match nb.ns.as_mut() {
                Some(ns) => match ns.run_in_refind(|| KernelRead::here(check)) {
                    Ok(r) => Some(r),
                    Err(NetnsError::NoInode { .. }) => {
                        // No process and no name holds it any more: its
                        // sockets went with it (a namespace that ends
                        // purges its timewait sockets), and it cannot be
                        // checked.
                        tracing::info!(
                            "network namespace {} is gone: no longer reported",
                            ns.label()
                        );
                        gone.push(inode);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("network namespace {}: {e}", ns.label());
                        None
                    }
                },
                None => None,
            };
            let KernelRead {
                list,
                figures,
                sysctls,
            } = read.unwrap_or_default();
            let Some(nb) = self.books.get_mut(&inode) else {
                continue;
            };
            if list.is_some() {
                nb.next_check_ns = now_ns.saturating_add(self.check.interval_ns);
                nb.lost_at_check = self.lost;
                nb.overflow_at_check = figures.tw_overflow;
            }
            match list {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    let e = anyhow::Error::from(e);
                    tracing::warn!("cannot list timewait sockets: {e:#}");
                    nb.kernel_unreadable = true;
                }
                None => {}
            }
            let mut view = kernel_view(
                &figures,
                sysctls.as_ref(),
                nb.overflow_base,
                &mut nb.overflow_prev,
            );
            if !self.live {
                // The one setting a recording keeps.
                view.fin_timeout_s = Some(self.fin_timeout_s);
            }
            let mut s = nb
                .book
                .snapshot(now_ns, self.clock.rfc3339(now_ns), self.top, view);
            s.netns = Some(inode).filter(|i| *i != 0);
            s.netns_name = nb.ns.as_ref().and_then(|n| n.name.clone());
            s.from_recording = !self.live;
            s.churn = nb.churn.evaluate(now_ns, self.top);
            s.findings.extend(s.churn.iter().map(Churn::finding));
            let by_cgroup = nb.book.by_cgroup();
            s.by_container = self.containers(by_cgroup, s.total);
            out.push(s);
        }
        for inode in gone {
            self.books.remove(&inode);
        }
        out
    }

    /// Timewait sockets by the container of their owner's cgroup: the
    /// top groups, the rest as other; sockets of no container (or no
    /// known owner) as `(none)`.
    fn containers(&mut self, by_cgroup: HashMap<u64, u64>, total: u64) -> Vec<Group> {
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut counted = 0;
        for (id, n) in by_cgroup {
            counted += n;
            let key = self
                .selector
                .cgroup_of_id(id)
                .and_then(|c| c.container.clone())
                .unwrap_or_else(|| NO_CONTAINER.to_string());
            *counts.entry(key).or_default() += n;
        }
        // Sockets only the kernel listed have no owner either.
        *counts.entry(NO_CONTAINER.to_string()).or_default() += total.saturating_sub(counted);
        counts.retain(|_, n| *n > 0);
        rank(
            counts
                .into_iter()
                .map(|(k, n)| named_group_of(&k, n))
                .collect(),
            total,
            self.top,
        )
    }

    /// Takes one batch of records settled up to `settled_ns`. Finished
    /// connections the filter matches are appended to `out`; the snapshots
    /// are returned when they fall due.
    pub fn absorb(
        &mut self,
        records: &[Record],
        settled_ns: u64,
        out: &mut Vec<Timeline>,
    ) -> Option<Vec<Snapshot>> {
        if !self.live {
            return self.absorb_recorded(records, settled_ns, out);
        }
        for r in records {
            self.observe(r);
        }
        self.correlator.advance(settled_ns, &mut self.finished);
        self.take_finished(out);
        if settled_ns >= self.next_snapshot_ns {
            let s = self.snapshot(settled_ns);
            // Keep to the schedule, but never bunch up after a stall.
            self.next_snapshot_ns =
                (self.next_snapshot_ns + self.interval_ns).max(settled_ns + self.interval_ns / 2);
            return Some(s);
        }
        None
    }

    /// [`TimewaitTracker::absorb`] for a recording: the first interval
    /// starts at its first event, and each snapshot is taken at its time
    /// on the events' clock, however the records were batched.
    fn absorb_recorded(
        &mut self,
        records: &[Record],
        settled_ns: u64,
        out: &mut Vec<Timeline>,
    ) -> Option<Vec<Snapshot>> {
        let mut due = Vec::new();
        for r in records {
            let ts = r.ts_ns();
            if self.next_snapshot_ns == 0 {
                self.next_snapshot_ns = ts + self.interval_ns;
                self.last_snapshot_ns = ts;
            }
            while ts >= self.next_snapshot_ns {
                let at = self.next_snapshot_ns;
                self.correlator.advance(at, &mut self.finished);
                self.take_finished(out);
                due.extend(self.snapshot(at));
                self.next_snapshot_ns += self.interval_ns;
            }
            self.observe(r);
        }
        self.settled_ns = self.settled_ns.max(settled_ns);
        self.correlator.advance(settled_ns, &mut self.finished);
        self.take_finished(out);
        (!due.is_empty()).then_some(due)
    }

    /// One record into the books (a new connection ends the timewait
    /// socket of its 4-tuple) and the correlator.
    fn observe(&mut self, r: &Record) {
        if let Record::State(t) = r {
            let established = t.new == TcpState::Established;
            if let Some(nb) = self.book_of(t.sock.netns, t.ts_ns) {
                if established {
                    nb.book.on_established(t.sock.netns, &t.local, &t.remote);
                }
            }
        }
        self.correlator.push(r, &mut self.finished);
    }

    /// The stream ended: every connection still held is finished.
    pub fn flush(&mut self, out: &mut Vec<Timeline>) {
        self.correlator.flush(&mut self.finished);
        self.take_finished(out);
    }

    /// A recording ended: the snapshots at its last event, unless one was
    /// just taken there. `None` live (the host's kernel goes on).
    pub fn last_snapshot(&mut self) -> Option<Vec<Snapshot>> {
        (!self.live && self.settled_ns > self.last_snapshot_ns && !self.books.is_empty())
            .then(|| self.snapshot(self.settled_ns))
    }

    fn take_finished(&mut self, out: &mut Vec<Timeline>) {
        // Drained and put back: its buffer serves every batch.
        let mut finished = std::mem::take(&mut self.finished);
        for t in finished.drain(..) {
            let owner = t.owner.as_ref().map(|a| &*a.owner);
            if self.selector.matches(t.family, &t.local, &t.remote, owner) {
                if let Some(nb) = self.book_of(t.netns, t.closed_ns) {
                    nb.book.on_timeline(&t);
                    nb.churn.on_timeline(&t);
                }
                out.push(t);
            }
        }
        self.finished = finished;
    }

    /// Kernel events lost so far: every book is checked against its
    /// kernel's list at the next snapshot.
    pub fn lost(&mut self, total: u64) {
        self.lost = total;
    }

    /// The table the session sweeps after lost events.
    pub fn sweep_table(&mut self) -> &mut dyn SweepTable {
        &mut self.correlator
    }

    /// The correlator's figures for an exit summary.
    pub fn tracking(&self) -> Tracking {
        self.correlator.tracking()
    }

    /// The owner's cgroup, with its path (for the daemon's records).
    pub fn cgroup(&mut self, owner: Option<&Owner>) -> Option<Arc<Cgroup>> {
        self.selector.cgroup(owner)
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
    zone: Zone,
}

impl<W: Write> TimewaitSink<W> {
    /// Text output's time in `zone` rather than UTC.
    pub fn with_zone(mut self, zone: Zone) -> Self {
        self.zone = zone;
        self
    }

    pub fn new(out: W, format: Format, redraw: bool, tracker: TimewaitTracker) -> Self {
        TimewaitSink {
            out,
            format,
            redraw,
            tracker,
            finished: Vec::new(),
            snapshots: 0,
            lost: LostCounts::default(),
            zone: Zone::Utc,
        }
    }

    pub fn write(&mut self, s: &Snapshot) -> io::Result<()> {
        write_snapshot(
            &mut self.out,
            s,
            self.format,
            self.zone,
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
    zone: Zone,
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
            write!(out, "{}", timewait_text(s, zone))?;
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
        if let Some(due) = due {
            for s in &due {
                self.write(s)?;
            }
            // The snapshot's scratch (a kernel list read, its tables) was
            // just freed: hand its pages back, as the daemon does.
            drop(due);
            crate::host::release_freed_memory();
        }
        Ok(())
    }

    fn sweep_table(&mut self) -> Option<&mut dyn SweepTable> {
        Some(self.tracker.sweep_table())
    }

    fn lost(&mut self, lost: LostCounts) {
        self.tracker.lost(lost.total());
        self.lost = lost;
    }

    fn finish(&mut self) -> io::Result<()> {
        self.tracker.flush(&mut self.finished);
        self.finished.clear();
        for s in self.tracker.last_snapshot().unwrap_or_default() {
            self.write(&s)?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decode::tests::state_event;
    use crate::model::TcpState::*;
    use crate::stream::record::{Header, Recorder, Replay};
    use tcpwatch_common::{valid, Event, RCV_SHUTDOWN, SEND_SHUTDOWN};

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    /// `n` connections of "client" from its own port each, one every
    /// `gap_ns` from `t0`, each living `life_ns` and closed first by the
    /// client (the peer's FIN arrives after its ACK: TIME_WAIT).
    fn client_loop(n: u64, t0: u64, gap_ns: u64, life_ns: u64) -> Vec<Event> {
        let mut out = Vec::new();
        for i in 0..n {
            let at = t0 + i * gap_ns;
            let steps = [
                (0, Close, SynSent, 0),
                (100_000, SynSent, Established, 0),
                (life_ns - 200_000, Established, FinWait1, 0),
                (life_ns - 100_000, FinWait1, FinWait2, 0),
                (life_ns, FinWait2, Close, 1),
            ];
            for (dt, old, new, fin) in steps {
                let mut e = state_event(0x1000 + i, old, new, at + dt);
                e.sport = 20_000 + i as u16;
                e.valid = valid::SHUTDOWN | valid::RCV_NXT;
                e.sk_shutdown = RCV_SHUTDOWN | SEND_SHUTDOWN;
                e.rcv_nxt = 1000 + fin;
                out.push(e);
            }
        }
        out.sort_by_key(|e| e.ts_ns);
        out
    }

    #[test]
    fn a_recording_gives_snapshots_in_its_own_time_with_the_churn_finding() {
        let t0 = 5_000 * S;
        // 100 connections a second for 12 s, each living 3 ms.
        let events = client_loop(1200, t0, 10 * MS, 3 * MS);
        let header = Header {
            clock_offset_ns: 0,
            netns: 0,
            fin_timeout_s: 60,
        };
        let mut w = Recorder::new(Vec::new(), header, None).unwrap();
        w.write(&events).unwrap();
        let bytes = w.into_inner();
        let mut replay = Replay::new(&bytes[..], std::path::Path::new("loop.rec")).unwrap();
        let ended = crate::stream::replay::run(&mut replay, |ctx| {
            let opts = TrackerOptions {
                filter: Filter::default(),
                interval_ns: 5 * S,
                top: 10,
                max_sockets: 1024,
                churn: ChurnOptions::default(),
                check: CheckOptions::default(),
            };
            Ok(TimewaitSink::new(
                Vec::new(),
                Format::Json,
                false,
                TimewaitTracker::start(opts, ctx),
            ))
        })
        .unwrap();
        assert!(ended.error.is_none());
        let text = String::from_utf8(ended.consumer.out).unwrap();
        let snaps: Vec<Snapshot> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // At 5 s and 10 s from the first event, then at the last event.
        let ts: Vec<u64> = snaps
            .iter()
            .map(|s| {
                let t = humantime::parse_rfc3339(&s.ts).unwrap();
                t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
            })
            .collect();
        let last = events.last().unwrap().ts_ns;
        assert_eq!(ts, [t0 + 5 * S, t0 + 10 * S, last], "{text}");
        let created: Vec<u64> = snaps.iter().map(|s| s.created_last_interval).collect();
        // Closed by 5 s: those opened before 4.997 s (500), less the two
        // closed within the correlator's 20 ms grace (finished in the
        // next interval, as live); the same at 10 s; the rest at the end.
        assert_eq!(created, [498, 500, 202]);
        assert!(snaps
            .iter()
            .all(|s| s.from_recording && s.kernel_listed.is_none()));
        let end = &snaps[2];
        assert_eq!((end.total, end.before_tracing), (1200, 0));
        assert_eq!(end.kernel.fin_timeout_s, Some(60));
        assert_eq!(end.kernel.port_range, None);
        let c = &end.churn[..];
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(
            (c[0].process.as_str(), c[0].destination.as_str()),
            ("client", "127.0.0.2:8080")
        );
        assert!((c[0].rate_per_s - 100.0).abs() < 2.0, "{c:?}");
        assert!((c[0].median_life_ms - 3.0).abs() < 0.3, "{c:?}");
        assert_eq!(c[0].timewait_share, 1.0);
        assert!(end.findings.contains(&c[0].finding()), "{:?}", end.findings);
        let text = timewait_text(end, Zone::Utc);
        assert!(
            text.contains("from a recording: only sockets made while it ran"),
            "{text}"
        );
    }
}
