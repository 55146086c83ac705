//! The front of the pipeline, the same for a live session and a replay:
//! records are decoded once here, records that make no sense are said and
//! counted here, lost events are said and counted here, and after losses
//! the consumer's socket table is swept here (live only). What a command
//! does with the records is its [`Consumer`].

use std::io;
use std::time::{Duration, Instant};

use tcpwatch_common::Event;

use crate::model::decode::{interpret, Record, Rejects};
use crate::model::lost::LostCounts;
use crate::model::sweep::{SweepTable, Sweeper};
use crate::stream::error::StreamError;
use crate::views::summary::{ExitSummary, Lost, Stream, Tracking};

/// One batch of the stream, in ring order.
pub struct Batch<'a> {
    /// The records exactly as the kernel wrote them (for a recording),
    /// only those that decoded.
    pub events: &'a [Event],
    /// The same records, decoded.
    pub records: &'a [Record],
    /// Records of this batch that made no sense (already said and counted).
    pub undecodable: u64,
    /// Every event stamped before this has been delivered by now.
    pub settled_ns: u64,
}

/// What a command does with the stream. It is built from the stream's
/// [`Context`](crate::stream::context::Context) once that is known, and
/// gets every batch until the stream ends.
pub trait Consumer {
    /// A batch of decoded records.
    fn records(&mut self, batch: &Batch<'_>) -> io::Result<()>;

    /// The socket table whose entries can outlive their socket when events
    /// are lost; the session sweeps it after losses. `None`: nothing to
    /// sweep.
    fn sweep_table(&mut self) -> Option<&mut dyn SweepTable> {
        None
    }

    /// The kernel's lost-event counts have grown to `lost` (already said).
    fn lost(&mut self, _lost: LostCounts) {}

    /// The probe is live and the consumer built: from now on every event
    /// is seen. Says so with `announce` (a consumer that serves others
    /// says it and marks itself ready as one step).
    fn live(&mut self, announce: &str) {
        tracing::info!("{announce}");
    }

    /// The stream ended: write out whatever is still held.
    fn finish(&mut self) -> io::Result<()>;

    /// What it says when it stops, given the stream's figures.
    fn summary(&self, totals: &Totals) -> ExitSummary;
}

/// The stream's figures, kept by the pipeline for every consumer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records decoded and delivered.
    pub events: u64,
    pub undecodable: u64,
    pub lost: LostCounts,
    /// Entries the sweep dropped: sockets whose close was lost.
    pub stale: u64,
}

impl Totals {
    pub fn stream(&self) -> Stream {
        Stream {
            events: self.events,
            lost: Lost {
                total: self.lost.total(),
                ring_full: self.lost.ring_full,
                skipped: self.lost.skipped,
            },
            undecodable: self.undecodable,
        }
    }

    /// A table's figures with the sweep's count.
    pub fn tracking(&self, table: Tracking) -> Tracking {
        Tracking {
            stale: self.stale,
            ..table
        }
    }
}

/// A consumer behind the pipeline's front.
pub struct Pipeline<C> {
    consumer: C,
    /// Live only: checks the consumer's table against the kernel after
    /// losses.
    sweeper: Option<Sweeper>,
    totals: Totals,
    /// Least time between two lost-event warnings (zero: every growth).
    lost_log_every: Duration,
    lost_logged: Option<Instant>,
    /// Inodes of the network namespaces whose events are kept (`None`:
    /// every namespace's).
    keep_netns: Option<Vec<u32>>,
    /// The decoded records of the batch at hand, kept between batches so
    /// that decoding allocates nothing once it has grown.
    decoded: Vec<Record>,
}

impl<C: Consumer> Pipeline<C> {
    /// For events from tcpwatch's own namespace: losses are said (at most
    /// once per `lost_log_every`) and followed by a sweep of the consumer's
    /// table.
    pub fn live(consumer: C, lost_log_every: Duration) -> Self {
        let own = crate::host::netns::Namespace::own();
        Self::sweeping(consumer, crate::host::sweeper(own), lost_log_every)
    }

    /// [`Pipeline::live`] with the given sweeper (tests give one that
    /// lists a made-up kernel).
    pub fn sweeping(mut consumer: C, sweeper: Sweeper, lost_log_every: Duration) -> Self {
        let sweeper = consumer.sweep_table().is_some().then_some(sweeper);
        Pipeline {
            consumer,
            sweeper,
            totals: Totals::default(),
            lost_log_every,
            lost_logged: None,
            keep_netns: None,
            decoded: Vec::new(),
        }
    }

    /// Keeps only the events of these network namespaces (`None`: every
    /// namespace's). An event whose namespace the kernel's BTF could not
    /// give is kept.
    pub fn keeping(mut self, netns: Option<Vec<u32>>) -> Self {
        self.keep_netns = netns;
        self
    }

    /// For a recording: nothing is lost, nothing can be checked against a
    /// kernel.
    pub fn replay(consumer: C) -> Self {
        Pipeline {
            consumer,
            sweeper: None,
            totals: Totals::default(),
            lost_log_every: Duration::ZERO,
            lost_logged: None,
            keep_netns: None,
            decoded: Vec::new(),
        }
    }

    pub fn consumer_mut(&mut self) -> &mut C {
        &mut self.consumer
    }

    /// A batch as the ring buffer gave it: `rejects` are the records of
    /// the wrong size; the others are decoded here, and those that make no
    /// sense join them.
    pub fn raw(
        &mut self,
        mut events: Vec<Event>,
        mut rejects: Rejects,
        settled_ns: u64,
    ) -> io::Result<()> {
        let mut records = std::mem::take(&mut self.decoded);
        records.clear();
        if let Some(keep) = &self.keep_netns {
            events.retain(|e| {
                e.valid & tcpwatch_common::valid::NETNS == 0 || keep.contains(&e.netns)
            });
        }
        events.retain(|e| match interpret(e) {
            Ok(r) => {
                records.push(r);
                true
            }
            Err(err) => {
                rejects.add(err);
                false
            }
        });
        let result = self.decoded(&events, &records, rejects, settled_ns);
        self.decoded = records;
        result
    }

    /// A batch already decoded (`events[i]` is `records[i]` as written).
    pub fn decoded(
        &mut self,
        events: &[Event],
        records: &[Record],
        rejects: Rejects,
        settled_ns: u64,
    ) -> io::Result<()> {
        if let Some(w) = rejects.warning() {
            tracing::warn!("{w}");
        }
        self.totals.undecodable += rejects.count;
        self.totals.events += records.len() as u64;
        self.consumer.records(&Batch {
            events,
            records,
            undecodable: rejects.count,
            settled_ns,
        })?;
        if let (Some(sweeper), Some(table)) = (&mut self.sweeper, self.consumer.sweep_table()) {
            sweeper.tick(settled_ns, table, &mut |m| tracing::warn!("{m}"));
            self.totals.stale = sweeper.dropped;
        }
        Ok(())
    }

    /// The kernel's lost-event counts have grown to `counts`.
    pub fn lost(&mut self, counts: LostCounts) {
        let line = self.totals.lost.advance(counts);
        if self
            .lost_logged
            .is_none_or(|t| t.elapsed() >= self.lost_log_every)
        {
            self.lost_logged = Some(Instant::now());
            tracing::warn!("{line}");
        }
        if let Some(sweeper) = &mut self.sweeper {
            sweeper.lost(counts.total());
        }
        self.consumer.lost(counts);
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// The stream ended (`error`: how, when not cleanly); the consumer
    /// writes out what it still holds.
    pub fn end(mut self, mut error: Option<StreamError>) -> Ended<C> {
        if let Err(e) = self.consumer.finish() {
            error.get_or_insert(StreamError::Output(e));
        }
        Ended {
            consumer: self.consumer,
            totals: self.totals,
            error,
        }
    }
}

/// A stream that ran: its consumer, its figures, and how it ended.
pub struct Ended<C> {
    pub consumer: C,
    pub totals: Totals,
    /// Why it stopped early, if it did.
    pub error: Option<StreamError>,
}

impl<C: Consumer> Ended<C> {
    pub fn summary(&self) -> ExitSummary {
        self.consumer.summary(&self.totals)
    }

    /// How it ended: a closed pipe (`tcpwatch trace | head`) is a quiet end.
    pub fn result(self) -> Result<(), StreamError> {
        match self.error {
            Some(StreamError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::decode::tests::state_event;
    use crate::model::sweep::KernelSockets;
    use crate::model::TcpState::*;
    use crate::views::log::capture;
    use crate::views::summary::RecordSummary;

    /// Keeps what it is given.
    #[derive(Default)]
    pub(crate) struct Collect {
        pub events: Vec<Event>,
        pub records: Vec<Record>,
        pub lost: Vec<LostCounts>,
        pub finished: bool,
    }

    impl Consumer for Collect {
        fn records(&mut self, b: &Batch<'_>) -> io::Result<()> {
            assert_eq!(b.events.len(), b.records.len());
            self.events.extend_from_slice(b.events);
            self.records.extend_from_slice(b.records);
            Ok(())
        }
        fn lost(&mut self, lost: LostCounts) {
            self.lost.push(lost);
        }
        fn finish(&mut self) -> io::Result<()> {
            self.finished = true;
            Ok(())
        }
        fn summary(&self, totals: &Totals) -> ExitSummary {
            ExitSummary::Record(RecordSummary {
                recorded: self.events.len() as u64,
                stream: totals.stream(),
                ..RecordSummary::default()
            })
        }
    }

    #[test]
    fn records_are_decoded_once_and_nonsense_is_said_and_counted() {
        let good = state_event(1, Close, SynSent, 10);
        let mut bad = state_event(2, Close, SynSent, 20);
        bad.kind = 0xee;
        let (ended, said) = capture::cli(|| {
            let mut p = Pipeline::replay(Collect::default());
            p.raw(vec![good, bad, good], Rejects::default(), 30)
                .unwrap();
            p.end(None)
        });
        assert_eq!(ended.consumer.events, [good, good]);
        assert_eq!(ended.consumer.records.len(), 2);
        assert!(ended.consumer.finished);
        assert_eq!((ended.totals.events, ended.totals.undecodable), (2, 1));
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with("tcpwatch: 1 undecodable records ("),
            "{said:?}"
        );
    }

    #[test]
    fn lost_events_are_said_as_they_grow_and_reach_the_consumer() {
        let (ended, said) = capture::cli(|| {
            let mut p = Pipeline::live(Collect::default(), Duration::ZERO);
            p.lost(LostCounts {
                ring_full: 5,
                skipped: 0,
            });
            p.lost(LostCounts {
                ring_full: 9,
                skipped: 3,
            });
            p.end(None)
        });
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said[0].starts_with("tcpwatch: LOST 5 events"),
            "{}",
            said[0]
        );
        assert!(
            said[1].contains("LOST 7 events")
                && said[1].contains("12 in all")
                && said[1].contains("3 skipped by the kernel"),
            "{}",
            said[1]
        );
        assert_eq!(ended.totals.lost.total(), 12);
        assert_eq!(ended.consumer.lost.len(), 2);
        let s = ended.summary();
        assert_eq!(s.stream().unwrap().lost.total, 12);
    }

    #[test]
    fn a_rate_limited_log_still_counts_every_loss() {
        let (ended, said) = capture::cli(|| {
            let mut p = Pipeline::live(Collect::default(), Duration::from_secs(3600));
            for n in 1..=4 {
                p.lost(LostCounts {
                    ring_full: n,
                    skipped: 0,
                });
            }
            p.end(None)
        });
        assert_eq!(said.len(), 1, "{said:?}");
        assert_eq!(ended.totals.lost.ring_full, 4);
        assert_eq!(ended.consumer.lost.len(), 4);
    }

    /// A table of one socket the kernel does not have.
    struct Stale(Option<u64>);

    impl SweepTable for Stale {
        fn unlisted(&self, _: &KernelSockets) -> Vec<(u64, u64)> {
            self.0.map(|sk| (sk, 0)).into_iter().collect()
        }
        fn drop_unchanged(&mut self, skaddr: u64, _: u64) -> bool {
            self.0.take_if(|s| *s == skaddr).is_some()
        }
    }

    struct Sweepable(Stale);

    impl Consumer for Sweepable {
        fn records(&mut self, _: &Batch<'_>) -> io::Result<()> {
            Ok(())
        }
        fn sweep_table(&mut self) -> Option<&mut dyn SweepTable> {
            Some(&mut self.0)
        }
        fn finish(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn summary(&self, totals: &Totals) -> ExitSummary {
            Collect::default().summary(totals)
        }
    }

    /// The sweep runs for every consumer with a table (the daemon's too):
    /// a loss, then batches settled past the check, drop the stale entry.
    #[test]
    fn after_losses_the_consumers_table_is_swept() {
        fn kernel_without_it() -> Result<KernelSockets, crate::model::sweep::ListError> {
            Ok(KernelSockets::default())
        }
        let sweeper = Sweeper::with(kernel_without_it, || 0);
        let mut p = Pipeline::sweeping(Sweepable(Stale(Some(7))), sweeper, Duration::ZERO);
        p.lost(LostCounts {
            ring_full: 1,
            skipped: 0,
        });
        // Due a second after the loss, then finished once the events from
        // before the kernel's list was read have come.
        let far = u64::MAX / 2;
        p.raw(Vec::new(), Rejects::default(), far).unwrap();
        assert_eq!(p.consumer_mut().0 .0, Some(7), "candidates first");
        p.raw(Vec::new(), Rejects::default(), far).unwrap();
        assert_eq!(p.consumer_mut().0 .0, None);
        assert_eq!(p.totals().stale, 1);
        // A replay never sweeps.
        let mut r = Pipeline::replay(Sweepable(Stale(Some(7))));
        r.raw(Vec::new(), Rejects::default(), far).unwrap();
        r.raw(Vec::new(), Rejects::default(), far).unwrap();
        assert_eq!(r.consumer_mut().0 .0, Some(7));
    }

    #[test]
    fn a_closed_pipe_is_a_quiet_end() {
        let broken = Pipeline::replay(Collect::default()).end(Some(StreamError::Output(
            io::Error::from(io::ErrorKind::BrokenPipe),
        )));
        assert!(broken.result().is_ok());
        let full = Pipeline::replay(Collect::default())
            .end(Some(StreamError::Output(io::Error::other("disk full"))));
        assert!(full.result().is_err());
    }
}
