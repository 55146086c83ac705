//! Draining the ring buffer. The kernel wakes the reader only once a batch
//! has built up (see the eBPF side), so the reader also drains on a short
//! timer; each drain empties the buffer and sends one owned batch on.
//! Lost-event totals travel in the same channel, so they are reported in
//! order with the events around them. The program's own log records
//! (`--kernel-log`) are said on the same timer.

use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use tcpwatch_common::Event;

use crate::kernel::diagnostics::KernelLog;
use crate::kernel::probe::LostCounter;
use crate::kernel::ringmap::EventRing;
use crate::model::decode::{decode_into, DecodeError};
use crate::model::lost::LostCounts;

/// What the reader hands the stages after it.
#[derive(Debug)]
pub enum Feed {
    /// Records in ring-buffer order (length-checked copies; the pipeline's
    /// front gives them their meaning, once), and the number of records of
    /// the wrong size.
    Records {
        events: Vec<Event>,
        undecodable: u64,
        first_error: Option<DecodeError>,
        /// CLOCK_MONOTONIC when this drain began: every event stamped
        /// before it has been delivered, so time up to here is settled.
        drained_at_ns: u64,
    },
    /// The kernel's lost-event counts have grown to these.
    Lost(LostCounts),
}

#[derive(Clone, Copy, Debug)]
pub struct ReaderOptions {
    /// How often to drain when the kernel has not woken us.
    pub poll: Duration,
    /// How often to read the lost-event counter.
    pub lost_check: Duration,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            poll: Duration::from_millis(50),
            lost_check: Duration::from_millis(500),
        }
    }
}

/// One drain's records: the length-checked copies, and a count of the
/// records of the wrong size with the first one's error.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub undecodable: u64,
    pub first_error: Option<DecodeError>,
}

impl Batch {
    /// Takes one record as the ring buffer gave it (a socket's record
    /// becomes one event per transition).
    pub fn add(&mut self, record: &[u8]) {
        match decode_into(record, &mut self.events) {
            Ok(()) => {}
            Err(e) => {
                self.undecodable += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.undecodable == 0
    }
}

/// Most records in one batch. The channel to the stages holds at most
/// [`crate::stream::session::channel_batches`] batches, about a ring buffer's worth
/// of records, so what the reader has taken from the ring and the stages
/// have not yet seen stays within `--ring-size` bytes however far behind
/// they fall: past that, the reader waits, the ring buffer fills, and the
/// kernel counts what it drops ("ring buffer full").
pub const MAX_BATCH: usize = 1024;

/// Batches one drain takes at most: 512 × 1024 records of at least 128
/// bytes each is more than a 64 MiB ring holds.
const DRAIN_BATCHES: usize = 512;

/// Takes up to [`MAX_BATCH`] records; whether that emptied the ring.
/// `expect` is how many the last batch held: room for as many is made at
/// once, so a steady stream does not grow each batch from empty.
fn take(ring: &mut EventRing, expect: &mut usize) -> (Batch, bool) {
    let batch = Batch {
        events: Vec::with_capacity((*expect).clamp(16, MAX_BATCH)),
        ..Batch::default()
    };
    let (batch, emptied) = fill(ring, batch);
    *expect = batch.events.len();
    (batch, emptied)
}

/// Adds records to `batch` up to [`MAX_BATCH`]; whether that emptied the
/// ring.
fn fill(ring: &mut EventRing, mut batch: Batch) -> (Batch, bool) {
    while batch.events.len() + (batch.undecodable as usize) < MAX_BATCH {
        match ring.next_record() {
            Some(item) => batch.add(&item),
            None => return (batch, true),
        }
    }
    (batch, false)
}

/// How much older than the last record taken an event still in the ring
/// may be stamped: records are written in the order they were reserved,
/// and a program reads the clock only microseconds before it reserves.
const SKEW_NS: u64 = 10_000_000;

/// Empties the ring, sending batches of at most [`MAX_BATCH`] records as
/// they fill (waiting while the stages are behind). `settled` is the time
/// before which every event has been sent: for the last batch, the time
/// this drain began; for one sent before the ring is empty (which, when
/// the stages cannot keep up, is every batch for a while), [`SKEW_NS`]
/// before its last record. With `always`, an empty drain still reports its
/// time. Returns false once the receiver is gone.
async fn drain(
    ring: &mut EventRing,
    expect: &mut usize,
    settled: &mut u64,
    always: bool,
    tx: &mpsc::Sender<Feed>,
) -> bool {
    let began = crate::host::clock::monotonic_ns();
    // At most DRAIN_BATCHES takes (more records than a 64 MiB ring holds):
    // what was in the ring when the call began is read, but a ring the
    // kernel refills as fast as it is read never keeps the reader from
    // seeing a stop (tcpwatch went on draining under load after SIGTERM,
    // past 30 s).
    for _ in 0..DRAIN_BATCHES {
        let (batch, emptied) = take(ring, expect);
        if emptied {
            *settled = (*settled).max(began);
            if batch.is_empty() && !always {
                return true;
            }
        } else if let Some(last) = batch.events.last() {
            *settled = (*settled).max(last.ts_ns.saturating_sub(SKEW_NS));
        }
        let feed = Feed::Records {
            events: batch.events,
            undecodable: batch.undecodable,
            first_error: batch.first_error,
            drained_at_ns: *settled,
        };
        if tx.send(feed).await.is_err() {
            return false;
        }
        if emptied {
            return true;
        }
    }
    true
}

/// Reads until `stop` turns true (then drains one last time, so nothing
/// already in the buffer is dropped) or the receiver goes away.
pub async fn run_reader(
    ring: EventRing,
    lost: LostCounter,
    mut kernel_log: Option<KernelLog>,
    tx: mpsc::Sender<Feed>,
    mut stop: watch::Receiver<bool>,
    opts: ReaderOptions,
) -> std::io::Result<()> {
    // SAFETY: the EventRing owns its map fd and keeps it open, unchanged,
    // for as long as the AsyncFd owns the EventRing.
    let mut fd = unsafe { AsyncFd::register(ring)? };
    let mut poll = tokio::time::interval(opts.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost_tick = tokio::time::interval(opts.lost_check);
    lost_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost_seen = LostCounts::default();
    let mut settled = 0;
    let mut expect = 0;
    loop {
        let stopping = tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                let open = drain(guard.get_inner_mut(), &mut expect, &mut settled, false, &tx).await;
                guard.clear_ready();
                if !open {
                    return Ok(());
                }
                false
            }
            _ = poll.tick() => {
                if let Some(log) = &mut kernel_log {
                    log.flush();
                }
                if !drain(fd.get_mut(), &mut expect, &mut settled, true, &tx).await {
                    return Ok(());
                }
                false
            }
            _ = lost_tick.tick() => false,
            changed = stop.changed() => changed.is_err() || *stop.borrow(),
        };
        let counts = lost.counts();
        if counts.total() > lost_seen.total() {
            lost_seen = counts;
            if tx.send(Feed::Lost(counts)).await.is_err() {
                return Ok(());
            }
        }
        if stopping {
            if let Some(log) = &mut kernel_log {
                log.flush();
            }
            drain(fd.get_mut(), &mut expect, &mut settled, true, &tx).await;
            let counts = lost.counts();
            if counts.total() > lost_seen.total() {
                let _ = tx.send(Feed::Lost(counts)).await;
            }
            return Ok(());
        }
    }
}
