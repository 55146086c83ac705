//! Draining the ring buffer. The kernel wakes the reader only once a batch
//! has built up (see the eBPF side), so the reader also drains on a short
//! timer; each drain empties the buffer and sends one owned batch on.
//! Lost-event totals travel in the same channel, so they are reported in
//! order with the events around them.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use tcpwatch_common::Event;

use crate::decode::{decode_raw, DecodeError};
use crate::probe::{LostCounter, LostCounts};

/// What the reader hands the stages after it.
#[derive(Debug)]
pub enum Feed {
    /// Records in ring-buffer order (length-checked copies; their meaning
    /// is for each stage to take with `decode::interpret`), and the number
    /// of records of the wrong size.
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
    /// Takes one record as the ring buffer gave it.
    pub fn add(&mut self, record: &[u8]) {
        match decode_raw(record) {
            Ok(e) => self.events.push(e),
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

/// Empties the ring. With `always`, an empty drain still reports its time.
fn drain(ring: &mut RingBuf<MapData>, always: bool) -> Option<Feed> {
    let drained_at_ns = crate::clock::monotonic_ns();
    let mut batch = Batch::default();
    while let Some(item) = ring.next() {
        batch.add(&item);
    }
    if batch.is_empty() && !always {
        None
    } else {
        Some(Feed::Records {
            events: batch.events,
            undecodable: batch.undecodable,
            first_error: batch.first_error,
            drained_at_ns,
        })
    }
}

/// Reads until `stop` turns true (then drains one last time, so nothing
/// already in the buffer is dropped) or the receiver goes away.
pub async fn run_reader(
    ring: RingBuf<MapData>,
    lost: LostCounter,
    tx: mpsc::Sender<Feed>,
    mut stop: watch::Receiver<bool>,
    opts: ReaderOptions,
) -> std::io::Result<()> {
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for
    // as long as the AsyncFd owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register(ring)? };
    let mut poll = tokio::time::interval(opts.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost_tick = tokio::time::interval(opts.lost_check);
    lost_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost_seen = LostCounts::default();
    loop {
        let stopping = tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                let feed = drain(guard.get_inner_mut(), false);
                guard.clear_ready();
                if let Some(feed) = feed {
                    if tx.send(feed).await.is_err() {
                        return Ok(());
                    }
                }
                false
            }
            _ = poll.tick() => {
                if let Some(feed) = drain(fd.get_mut(), true) {
                    if tx.send(feed).await.is_err() {
                        return Ok(());
                    }
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
            if let Some(feed) = drain(fd.get_mut(), true) {
                let _ = tx.send(feed).await;
            }
            let counts = lost.counts();
            if counts.total() > lost_seen.total() {
                let _ = tx.send(Feed::Lost(counts)).await;
            }
            return Ok(());
        }
    }
}
