//! `tcpwatch daemon`: the correlator and TIME_WAIT accounting run for good,
//! served over HTTP to Prometheus (`/metrics`) and to `tcpwatch ... --from`
//! (`/api/timewait`, `/api/conns`).
//!
//! The session builds the daemon's consumer once the probe is live; it
//! does the work on the runtime's main task and publishes into [`Shared`];
//! the HTTP tasks only read what was published. `/healthz` says "ok" (200)
//! only from the moment the probe is live and the first snapshot is served.

pub mod client;
pub mod cost;
pub mod http;
pub mod metrics;
pub mod query;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::cli::DaemonArgs;
use crate::commands::timewait::{CheckOptions, TimewaitTracker, TrackerOptions};
use crate::host::clock::{monotonic_ns, Clock};
use crate::host::netns::{NetnsError, Selection};
use crate::kernel::probe::enable_bpf_stats;
use crate::model::cgroup::Cgroup;
use crate::model::correlate::Timeline;
use crate::model::filter::Filter;
use crate::model::lost::LostCounts;
use crate::model::sweep::SweepTable;
use crate::model::timewait::Snapshot;
use crate::stream::context::Context;
use crate::stream::error::StreamError;
use crate::stream::pipeline::{Batch, Consumer, Totals};
use crate::stream::session::{self, SessionOptions};
use crate::views::conns::ConnRecord;
use crate::views::summary::{DaemonSummary, ExitSummary};
use crate::views::timewait::timewait_json;

use self::cost::OwnCost;
use self::metrics::Metrics;
use self::query::{ConnsQuery, NetnsKey, TimewaitQuery};

/// What the HTTP side serves: the registry, and the latest published
/// connections and snapshot.
pub struct Shared {
    registry: Registry,
    state: Mutex<State>,
    started: Instant,
}

struct State {
    /// Finished connections, numbered from 1, oldest first. They are
    /// turned into JSON only when asked for: most are dropped unread.
    conns: VecDeque<Kept>,
    last_seq: u64,
    keep: usize,
    /// The latest snapshot of each namespace reported, as JSON, the
    /// daemon's own (or the first reported) first: (inode, name, JSON).
    timewait: Vec<(Option<u32>, Option<String>, String)>,
    health: Health,
}

/// Whether the daemon serves what it traces yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Loading the probe, or taking the first snapshot: `/healthz` answers
    /// 503.
    #[default]
    Starting,
    /// The probe is live and the first snapshot is served.
    Ok,
}

/// `GET /healthz`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Health {
    pub status: Status,
    pub uptime_s: u64,
    pub events: u64,
    pub connections: u64,
    pub tracked_sockets: usize,
    pub lost_ring_full: u64,
    pub lost_kernel_skipped: u64,
    pub snapshots: u64,
}

/// A finished connection kept for `/api/conns`, with its number, the
/// clock that gives its wall-clock times and its owner's cgroup.
struct Kept {
    seq: u64,
    timeline: Timeline,
    clock: Clock,
    cgroup: Option<Arc<Cgroup>>,
}

/// `GET /api/conns`.
#[derive(Debug, Serialize)]
struct ConnsPage {
    /// Number of the last connection returned (or of the newest known, when
    /// none is): pass it back as `since` for the next page.
    next: u64,
    /// Connections after `since` that are no longer kept (without `since`:
    /// the older ones not returned).
    missed: u64,
    /// Connections after this page that are kept and not returned yet:
    /// ask again with `since=next` at once while it is not 0.
    remaining: u64,
    conns: Vec<ConnRecord>,
}

impl Shared {
    pub fn new(registry: Registry, keep: usize) -> Shared {
        Shared {
            registry,
            state: Mutex::new(State {
                conns: VecDeque::new(),
                last_seq: 0,
                keep,
                timewait: Vec::new(),
                health: Health::default(),
            }),
            started: Instant::now(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the endpoints down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Prometheus text exposition.
    pub fn metrics(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Held so a snapshot's gauges are never seen half replaced.
        let _state = self.state();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("cannot encode metrics: {e}");
        }
        out
    }

    /// `/api/timewait`: the snapshot the query asks for; `None` before
    /// the first, `Some(Err)` for a namespace not reported.
    pub fn timewait(&self, q: &TimewaitQuery) -> Option<Result<String, String>> {
        let st = self.state();
        let (_, _, first) = st.timewait.first()?;
        Some(match &q.netns {
            None => Ok(first.clone()),
            Some(NetnsKey::All) => {
                let all: Vec<&str> = st.timewait.iter().map(|(_, _, j)| j.as_str()).collect();
                Ok(format!("[{}]", all.join(",")))
            }
            Some(key) => st
                .timewait
                .iter()
                .find(|(inode, name, _)| match key {
                    NetnsKey::Inode(i) => *inode == Some(*i),
                    NetnsKey::Name(n) => name.as_deref() == Some(n.as_str()),
                    NetnsKey::All => false,
                })
                .map(|(_, _, j)| j.clone())
                .ok_or_else(|| match key {
                    NetnsKey::Inode(i) => format!("network namespace {i} is not reported"),
                    NetnsKey::Name(n) => format!("network namespace {n} is not reported"),
                    NetnsKey::All => String::new(),
                }),
        })
    }

    /// Whether the daemon is live, and `/healthz`'s body.
    pub fn health(&self) -> (bool, String) {
        let mut h = self.state().health.clone();
        h.uptime_s = self.started.elapsed().as_secs();
        (
            h.status == Status::Ok,
            serde_json::to_string(&h).unwrap_or_default(),
        )
    }

    /// Without `since`: the newest `limit` connections. With it: the next
    /// `limit` after `since`, oldest first, so a client can follow.
    pub fn conns(&self, q: ConnsQuery) -> String {
        let st = self.state();
        let after = q.since.unwrap_or(0);
        let newer = st.conns.iter().filter(|k| k.seq > after);
        let available = newer.clone().count();
        let first_kept = st.conns.front().map_or(st.last_seq + 1, |k| k.seq);
        // Numbered after `since` but already dropped from the buffer.
        let dropped = first_kept.saturating_sub(after.saturating_add(1));
        let (skip, missed) = match q.since {
            Some(_) => (0, dropped),
            None => {
                let skip = available.saturating_sub(q.limit);
                (skip, dropped + skip as u64)
            }
        };
        let page: Vec<_> = newer.skip(skip).take(q.limit).collect();
        let next = page.last().map_or(st.last_seq, |k| k.seq);
        let page = ConnsPage {
            next,
            missed,
            remaining: (available - skip - page.len()) as u64,
            conns: page
                .iter()
                .map(|k| ConnRecord::new(&k.timeline, &k.clock, true, k.cgroup.as_deref()))
                .collect(),
        };
        serde_json::to_string(&page).unwrap_or_default()
    }
}

/// The daemon's consumer of the stream: TIME_WAIT accounting, metrics,
/// and publishing.
pub struct DaemonSink {
    tracker: TimewaitTracker,
    metrics: Metrics,
    /// Series given their own labels; the rest summed as `other`.
    top: usize,
    /// The namespace whose snapshot `/api/timewait` serves by default.
    own_netns: u32,
    shared: Arc<Shared>,
    clock: Clock,
    finished: Vec<Timeline>,
    /// Scratch: the cgroups of the connections a batch keeps.
    cgroups: Vec<Option<Arc<Cgroup>>>,
    events: u64,
    connections: u64,
    snapshots: u64,
    lost: LostCounts,
    /// The session said tracing began: `/healthz` says "ok".
    live: bool,
}

/// Most often a growth of the lost counts is logged.
const LOST_LOG_EVERY: Duration = Duration::from_secs(10);

/// What the user asked the daemon for.
#[derive(Clone, Copy, Debug)]
pub struct DaemonOptions {
    pub interval_ns: u64,
    pub top: usize,
    pub max_sockets: usize,
    pub churn: crate::model::churn::ChurnOptions,
    pub check: CheckOptions,
}

impl DaemonSink {
    /// Starts the accounting where `ctx` begins and publishes its first
    /// snapshot at once: timewait sockets that already exist are served
    /// from the first answer.
    pub fn build(
        opts: DaemonOptions,
        metrics: Metrics,
        shared: Arc<Shared>,
        ctx: &Context,
    ) -> DaemonSink {
        let tracker = TimewaitTracker::start(
            TrackerOptions {
                filter: Filter::default(),
                interval_ns: opts.interval_ns,
                top: opts.top,
                max_sockets: opts.max_sockets,
                churn: opts.churn,
                check: opts.check,
            },
            ctx,
        );
        let mut sink = DaemonSink {
            tracker,
            metrics,
            top: opts.top,
            own_netns: crate::host::own_netns().unwrap_or(0),
            shared,
            clock: ctx.clock,
            finished: Vec::new(),
            cgroups: Vec::new(),
            events: 0,
            connections: 0,
            snapshots: 0,
            lost: LostCounts::default(),
            live: false,
        };
        let first = sink.tracker.snapshot(monotonic_ns());
        sink.publish(Some(first));
        sink
    }

    /// Hands what the last batch finished, and the snapshots when they
    /// were taken, to the metrics and the HTTP side.
    pub fn publish(&mut self, snapshots: Option<Vec<Snapshot>>) {
        self.publish_saying(snapshots, None);
    }

    /// [`DaemonSink::publish`], logging `line` while the HTTP side cannot
    /// read: what it answers next is what was published with the line.
    fn publish_saying(&mut self, snapshots: Option<Vec<Snapshot>>, line: Option<&str>) {
        for t in &self.finished {
            self.metrics.connection(t, self.top);
        }
        self.connections += self.finished.len() as u64;
        // Only the newest `keep` can stay: the rest are only numbered.
        let keep = self.shared.state().keep;
        let beyond = self.finished.len().saturating_sub(keep);
        // The kept ones' cgroups are looked up before the lock is taken;
        // the timelines go straight into the queue under it.
        let mut cgroups = std::mem::take(&mut self.cgroups);
        cgroups.extend(
            self.finished[beyond..]
                .iter()
                .map(|t| self.tracker.cgroup(t.owner.as_ref().map(|a| &*a.owner))),
        );
        let correlator = self.tracker.correlator();
        self.metrics
            .tracking(correlator.tracked(), correlator.stats().evicted);
        let timewait = snapshots.as_ref().map(|v| {
            let mut v: Vec<(Option<u32>, Option<String>, String)> = v
                .iter()
                .map(|s| (s.netns, s.netns_name.clone(), timewait_json(s)))
                .collect();
            // The daemon's own namespace first: /api/timewait's default.
            v.sort_by_key(|(inode, _, _)| *inode != Some(self.own_netns));
            v
        });
        let mut st = self.shared.state();
        st.last_seq += beyond as u64;
        // Room is made before the new ones go in, so the queue never holds
        // (nor grows its buffer for) more than `keep`.
        let held = st.conns.len();
        let excess = (held + cgroups.len()).saturating_sub(st.keep);
        st.conns.drain(..excess.min(held));
        reserve_capped(&mut st.conns, cgroups.len(), keep);
        let kept = self.finished.drain(..).skip(beyond).zip(cgroups.drain(..));
        for (timeline, cgroup) in kept {
            st.last_seq += 1;
            let seq = st.last_seq;
            st.conns.push_back(Kept {
                seq,
                timeline,
                clock: self.clock,
                cgroup,
            });
        }
        self.cgroups = cgroups;
        let snapshot_taken = snapshots.is_some();
        if let (Some(s), Some(j)) = (snapshots, timewait) {
            self.snapshots += 1;
            self.metrics.snapshots(&s, self.top);
            st.timewait = j;
        }
        if let Some(line) = line {
            tracing::info!("{line}");
        }
        st.health = Health {
            status: if self.live && !st.timewait.is_empty() {
                Status::Ok
            } else {
                Status::Starting
            },
            uptime_s: 0,
            events: self.events,
            connections: self.connections,
            tracked_sockets: correlator.tracked(),
            lost_ring_full: self.lost.ring_full,
            lost_kernel_skipped: self.lost.skipped,
            snapshots: self.snapshots,
        };
        drop(st);
        if snapshot_taken {
            // A snapshot's scratch (sock_diag dumps, the old tables) was
            // just freed: hand its pages back rather than keep them
            // resident between snapshots.
            crate::host::release_freed_memory();
        }
    }
}

/// Makes room in `queue` for `more` items, doubling as a `VecDeque` does
/// but never past `cap` items: the kept connections' buffer is at most
/// `--keep` long, not the next power of two.
fn reserve_capped<T>(queue: &mut VecDeque<T>, more: usize, cap: usize) {
    let want = (queue.len() + more).min(cap);
    if queue.capacity() < want {
        let grown = want.max(queue.capacity().saturating_mul(2)).min(cap);
        queue.reserve_exact(grown - queue.len());
    }
}

impl Consumer for DaemonSink {
    fn records(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        self.events += batch.records.len() as u64;
        self.metrics.records(batch.records, batch.undecodable);
        let due = self
            .tracker
            .absorb(batch.records, batch.settled_ns, &mut self.finished);
        self.publish(due);
        Ok(())
    }

    fn sweep_table(&mut self) -> Option<&mut dyn SweepTable> {
        Some(self.tracker.sweep_table())
    }

    fn lost(&mut self, lost: LostCounts) {
        self.metrics.lost(lost);
        self.tracker.lost(lost.total());
        self.lost = lost;
    }

    /// Says that tracing began and turns `/healthz` to "ok" as one step:
    /// no answer says "ok" before the line is written, none after it says
    /// "starting".
    fn live(&mut self, announce: &str) {
        self.live = true;
        self.publish_saying(None, Some(announce));
    }

    fn finish(&mut self) -> io::Result<()> {
        self.tracker.flush(&mut self.finished);
        self.publish(None);
        Ok(())
    }

    fn summary(&self, totals: &Totals) -> ExitSummary {
        ExitSummary::Daemon(DaemonSummary {
            connections: self.connections,
            snapshots: self.snapshots,
            stream: totals.stream(),
            tracking: totals.tracking(self.tracker.tracking()),
        })
    }
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Listen(#[from] http::ListenError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("--netns")]
    Netns(#[from] NetnsError),
    #[error("cannot turn on the kernel's BPF statistics (--bpf-stats)")]
    BpfStats(#[source] aya::sys::SyscallError),
}

/// Binds, loads, serves, and runs until SIGTERM, SIGINT or `--duration`.
pub async fn run(args: DaemonArgs) -> Result<(), DaemonError> {
    // Runs for good: its resident memory should follow what it holds.
    crate::host::return_large_blocks_when_freed();
    // Bound first: a port in use fails before anything is loaded.
    let listener = http::bind(args.listen)?;
    let listen: SocketAddr = listener.local_addr().map_err(|source| http::ListenError {
        addr: args.listen,
        source,
    })?;

    // Held for the daemon's life: the kernel counts BPF run time meanwhile.
    let _bpf_stats = match args.bpf_stats {
        true => Some(enable_bpf_stats().map_err(DaemonError::BpfStats)?),
        false => None,
    };
    let mut registry = Registry::with_prefix("tcpwatch");
    let metrics = Metrics::new(&mut registry);
    let cost = OwnCost::new(args.bpf_stats);
    registry.register_collector(Box::new(cost.clone()));
    let shared = Arc::new(Shared::new(registry, args.keep));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(http::serve(listener, shared.clone(), stop_rx));

    let netns = Selection::resolve(&args.netns, true)?;
    let opts = DaemonOptions {
        interval_ns: args.interval.as_nanos().min(u128::from(u64::MAX)) as u64,
        top: args.top,
        max_sockets: args.probe.max_sockets,
        churn: args.churn.options(),
        check: CheckOptions::every(args.check_interval.as_nanos().min(u128::from(u64::MAX)) as u64),
    };
    let session = SessionOptions {
        probe: args.probe.options(),
        duration: args.duration,
        announce: format!("listening on http://{listen}; tracing TCP connections"),
        lost_log_every: LOST_LOG_EVERY,
        netns,
    };
    let ended = session::run(session, |ctx| {
        if let Some(programs) = &ctx.programs {
            cost.set_programs(programs.clone());
        }
        Ok(DaemonSink::build(opts, metrics, shared, ctx))
    })
    .await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    let ended = ended?;
    if let ExitSummary::Daemon(s) = ended.summary() {
        tracing::info!(
            events = s.stream.events,
            connections = s.connections,
            lost_ring_full = s.stream.lost.ring_full,
            lost_kernel_skipped = s.stream.lost.skipped,
            evicted = s.tracking.evicted,
            stale = s.tracking.stale,
            "stopped: programs detached"
        );
    }
    Ok(ended.result()?)
}

#[cfg(test)]
mod tests {

    #[test]
    fn kept_queue_grows_by_doubling_but_never_past_keep() {
        let mut q: VecDeque<u32> = VecDeque::new();
        reserve_capped(&mut q, 3, 10_000);
        assert!(q.capacity() >= 3);
        q.extend(0..3);
        let mut caps = Vec::new();
        while q.len() < 10_000 {
            reserve_capped(&mut q, 1000, 10_000);
            let room = (10_000 - q.len()).min(1000) as u32;
            q.extend(0..room);
            caps.push(q.capacity());
        }
        // The last reservation stops at keep rather than the next power of two.
        assert_eq!(*caps.last().unwrap(), 10_000);
        // Amortized: far fewer reallocations than batches.
        caps.dedup();
        assert!(caps.len() <= 6, "{caps:?}");
    }

    use super::*;
    use crate::commands::timewait::write_snapshot;
    use crate::host::clock::Zone;
    use crate::model::correlate::Role;
    use crate::model::timewait::{KernelView, TimewaitBook, TimewaitOptions};
    use crate::model::Endpoint;
    use crate::views::Format;

    /// Connection `i` is the one from local port `i`.
    fn shared_with(n: u64, keep: usize) -> Shared {
        let shared = Shared::new(Registry::default(), keep);
        {
            let mut st = shared.state();
            for i in 1..=n {
                st.last_seq = i;
                let timeline = Timeline::sample(
                    Endpoint::new([127, 0, 0, 1].into(), i as u16),
                    Endpoint::new([127, 0, 0, 1].into(), 80),
                    None,
                    Role::Client,
                    1_000_000 * i,
                );
                st.conns.push_back(Kept {
                    seq: i,
                    timeline,
                    clock: Clock::with_offset_ns(0),
                    cgroup: None,
                });
            }
            let excess = st.conns.len().saturating_sub(keep);
            st.conns.drain(..excess);
        }
        shared
    }

    fn page(shared: &Shared, limit: usize, since: Option<u64>) -> serde_json::Value {
        serde_json::from_str(&shared.conns(ConnsQuery { limit, since })).unwrap()
    }

    fn numbers(v: &serde_json::Value) -> Vec<u64> {
        v["conns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["sport"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn without_since_a_page_is_the_newest() {
        let s = shared_with(10, 6);
        // Kept: 5..=10.
        let all = page(&s, 100, None);
        assert_eq!(numbers(&all), vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(all["next"], 10);
        assert_eq!(all["missed"], 4);
        assert_eq!(all["remaining"], 0);
        let newest = page(&s, 2, None);
        assert_eq!(numbers(&newest), vec![9, 10]);
        assert_eq!(newest["missed"], 8);
        assert_eq!(newest["next"], 10);
        let empty = shared_with(0, 6);
        assert_eq!(page(&empty, 5, None)["next"], 0);
        assert!(numbers(&page(&empty, 5, None)).is_empty());
    }

    #[test]
    fn since_pages_forward() {
        let s = shared_with(10, 6);
        // Kept: 5..=10. The next two after 6, then on from where it ended.
        let first = page(&s, 2, Some(6));
        assert_eq!(numbers(&first), vec![7, 8]);
        assert_eq!(first["next"], 8);
        assert_eq!(first["missed"], 0);
        assert_eq!(first["remaining"], 2);
        let second = page(&s, 2, Some(8));
        assert_eq!(numbers(&second), vec![9, 10]);
        assert_eq!(second["next"], 10);
        assert_eq!(second["remaining"], 0);
        let none = page(&s, 100, Some(10));
        assert!(numbers(&none).is_empty());
        assert_eq!(none["next"], 10);
        assert_eq!(none["missed"], 0);
        assert_eq!(none["remaining"], 0);
        // A client far behind learns how many it missed, and goes on from
        // the oldest kept.
        let behind = page(&s, 3, Some(2));
        assert_eq!(numbers(&behind), vec![5, 6, 7]);
        assert_eq!(behind["missed"], 2);
        assert_eq!(behind["next"], 7);
        assert_eq!(behind["remaining"], 3);
        // Following page by page gives every kept connection once, in order.
        let mut since = 0;
        let mut seen = Vec::new();
        loop {
            let p = page(&s, 4, Some(since));
            seen.extend(numbers(&p));
            since = p["next"].as_u64().unwrap();
            if p["remaining"] == 0 {
                break;
            }
        }
        assert_eq!(seen, vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(since, 10);
    }

    /// `timewait --from` renders the snapshot it gets back from JSON: the
    /// round trip must give the same output in both formats.
    #[test]
    fn snapshot_round_trip_gives_the_same_output() {
        let mut book = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        for port in 0..5u16 {
            let t = Timeline::sample(
                Endpoint::new([10, 0, 0, 1].into(), 40_000 + port),
                Endpoint::new([10, 0, 0, 2].into(), 80 + port % 2),
                None,
                Role::Client,
                1_000_000 + u64::from(port),
            );
            book.on_timeline(&t);
        }
        let kernel = KernelView {
            sockstat_tw: Some(5),
            max_tw_buckets: Some(131_072),
            port_range: Some(28_232),
            tw_reuse: Some(2),
            fin_timeout_s: Some(60),
            timestamps: Some(1),
            ..KernelView::default()
        };
        let s = book.snapshot(2_000_000_000, "2026-11-24T00:00:02Z".into(), 10, kernel);
        let json = timewait_json(&s);
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        for format in [Format::Text, Format::Json] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            write_snapshot(&mut a, &s, format, Zone::Utc, false, 1, 3).unwrap();
            write_snapshot(&mut b, &back, format, Zone::Utc, false, 1, 3).unwrap();
            assert_eq!(a, b);
        }
    }
}
