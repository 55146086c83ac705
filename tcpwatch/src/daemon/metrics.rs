//! What the daemon exports to Prometheus. Counters follow the event stream;
//! the TIME_WAIT gauges are set from each snapshot, with the per-process and
//! per-destination series capped at `--top` (the rest summed as `other`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::model::correlate::{Role, Timeline};
use crate::model::decode::Record;
use crate::model::lost::LostCounts;
use crate::model::timewait::Snapshot;
use crate::views::conns::close_name;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubstateLabels {
    substate: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabels {
    destination: String,
}

/// A client's ports toward a destination: per local address, as the
/// kernel allocates them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortsLabels {
    local: String,
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    process: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

type Histograms = Family<DirectionLabels, Histogram, fn() -> Histogram>;

fn handshake_histogram() -> Histogram {
    // 50 µs to about 3.3 s: loopback to a SYN retransmitted twice.
    Histogram::new(exponential_buckets(50e-6, 2.0, 17))
}

fn lifetime_histogram() -> Histogram {
    // 1 ms to about 70 minutes.
    Histogram::new(exponential_buckets(1e-3, 4.0, 12))
}

fn direction(role: Role) -> &'static str {
    match role {
        Role::Client => "active",
        Role::Server => "passive",
        Role::Unknown => "unknown",
    }
}

pub struct Metrics {
    transitions: Family<TransitionLabels, Counter>,
    opened: Family<DirectionLabels, Counter>,
    closed: Family<KindLabels, Counter>,
    handshake: Histograms,
    lifetime: Histograms,
    timewait: Family<SubstateLabels, Gauge>,
    timewait_created: Counter,
    by_destination: Family<DestinationLabels, Gauge>,
    by_process: Family<ProcessLabels, Gauge>,
    ports_held: Family<PortsLabels, Gauge>,
    port_range: Gauge,
    tw_reuse: Gauge,
    timestamps: Gauge,
    kernel_timewait: Gauge,
    max_tw_buckets: Gauge,
    overflows: Counter,
    lost: Family<ReasonLabels, Counter>,
    events: Counter,
    undecodable: Counter,
    tracked: Gauge,
    evictions: Counter,
    /// What the counters set from absolute figures last saw.
    evicted_seen: u64,
    lost_seen: LostCounts,
}

impl Metrics {
    /// Registers every series in `registry` (prefix `tcpwatch_`).
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            transitions: Family::default(),
            opened: Family::default(),
            closed: Family::default(),
            handshake: Family::new_with_constructor(handshake_histogram),
            lifetime: Family::new_with_constructor(lifetime_histogram),
            timewait: Family::default(),
            timewait_created: Counter::default(),
            by_destination: Family::default(),
            by_process: Family::default(),
            ports_held: Family::default(),
            port_range: Gauge::default(),
            tw_reuse: Gauge::default(),
            timestamps: Gauge::default(),
            kernel_timewait: Gauge::default(),
            max_tw_buckets: Gauge::default(),
            overflows: Counter::default(),
            lost: Family::default(),
            events: Counter::default(),
            undecodable: Counter::default(),
            tracked: Gauge::default(),
            evictions: Counter::default(),
            evicted_seen: 0,
            lost_seen: LostCounts::default(),
        };
        let r = registry;
        r.register(
            "transitions",
            "TCP state transitions seen, by old and new state",
            m.transitions.clone(),
        );
        r.register(
            "connections_opened",
            "Connections established: active (connect) or passive (accept)",
            m.opened.clone(),
        );
        r.register(
            "connections_closed",
            "Connections finished, by how they closed",
            m.closed.clone(),
        );
        r.register_with_unit(
            "handshake",
            "Handshake time: SYN sent to ESTABLISHED (active), SYN/ACK sent to ACK received (passive)",
            Unit::Seconds,
            m.handshake.clone(),
        );
        r.register_with_unit(
            "connection_lifetime",
            "Lifetime of connections opened while tracing, first transition to close",
            Unit::Seconds,
            m.lifetime.clone(),
        );
        r.register(
            "timewait_sockets",
            "Timewait sockets tcpwatch counts now in every network namespace, by substate (TIME_WAIT, or FIN_WAIT2 held by the kernel's timewait code); tcpwatch_kernel_timewait_sockets is the kernel's count for the daemon's own namespace",
            m.timewait.clone(),
        );
        r.register(
            "timewait_created",
            "Connections that left a timewait socket behind",
            m.timewait_created.clone(),
        );
        r.register(
            "timewait_by_destination",
            "Timewait sockets by remote endpoint (top --top, the rest as other)",
            m.by_destination.clone(),
        );
        r.register(
            "timewait_by_process",
            "Timewait sockets by the command name of the process that closed first (top --top, the rest as other); no pid, so short-lived processes make no new series",
            m.by_process.clone(),
        );
        r.register(
            "destination_ports_held",
            "Ephemeral ports of a local address held in timewait toward a destination (client side); each local address has the whole port range toward each destination",
            m.ports_held.clone(),
        );
        r.register(
            "kernel_tcp_tw_reuse",
            "net.ipv4.tcp_tw_reuse: 1 lets connect() reuse ports in TIME_WAIT, 2 only for loopback (either end); both need tcp_timestamps",
            m.tw_reuse.clone(),
        );
        r.register(
            "kernel_tcp_timestamps",
            "net.ipv4.tcp_timestamps (tcp_tw_reuse needs it on)",
            m.timestamps.clone(),
        );
        r.register(
            "local_port_range_ports",
            "Size of net.ipv4.ip_local_port_range",
            m.port_range.clone(),
        );
        r.register(
            "kernel_timewait_sockets",
            "Timewait sockets the kernel counts in the daemon's network namespace (/proc/net/sockstat tw)",
            m.kernel_timewait.clone(),
        );
        r.register(
            "kernel_tw_max_buckets",
            "net.ipv4.tcp_max_tw_buckets",
            m.max_tw_buckets.clone(),
        );
        r.register(
            "kernel_timewait_overflows",
            "Timewait sockets the kernel could not make (TCPTimeWaitOverflow) since the daemon started",
            m.overflows.clone(),
        );
        r.register(
            "lost_events",
            "Kernel events lost: ring_full (ring buffer full) or kernel_skipped (program not run)",
            m.lost.clone(),
        );
        r.register(
            "events",
            "Kernel events taken from the ring buffer",
            m.events.clone(),
        );
        r.register(
            "undecodable_records",
            "Ring buffer records that did not decode",
            m.undecodable.clone(),
        );
        r.register(
            "tracked_sockets",
            "Sockets the correlator follows now",
            m.tracked.clone(),
        );
        r.register(
            "evictions",
            "Sockets dropped from tracking because --max-sockets was reached",
            m.evictions.clone(),
        );
        r.register(
            "build",
            "tcpwatch version",
            Info::new(VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        // Present from the first scrape, so rate() and alerts see zero.
        for reason in ["ring_full", "kernel_skipped"] {
            m.lost.get_or_create(&ReasonLabels { reason }).inc_by(0);
        }
        for direction in ["active", "passive"] {
            m.opened
                .get_or_create(&DirectionLabels { direction })
                .inc_by(0);
        }
        m
    }

    /// Counts a batch of records.
    pub fn records(&self, records: &[Record], undecodable: u64) {
        self.events.inc_by(records.len() as u64);
        self.undecodable.inc_by(undecodable);
        for r in records {
            let Record::State(t) = r else { continue };
            self.transitions
                .get_or_create(&TransitionLabels {
                    from: t.old.name(),
                    to: t.new.name(),
                })
                .inc();
            let Some(direction) = t.opened() else {
                continue;
            };
            self.opened
                .get_or_create(&DirectionLabels { direction })
                .inc();
        }
    }

    /// Counts a finished connection.
    pub fn connection(&self, t: &Timeline) {
        self.closed
            .get_or_create(&KindLabels {
                kind: close_name(t.close),
            })
            .inc();
        let labels = DirectionLabels {
            direction: direction(t.role),
        };
        if let Some(h) = t.handshake_ns {
            self.handshake
                .get_or_create(&labels)
                .observe(h as f64 / 1e9);
        }
        if !t.pre_existing() {
            self.lifetime
                .get_or_create(&labels)
                .observe(t.lifetime_ns() as f64 / 1e9);
        }
        if t.timewait.is_some() {
            self.timewait_created.inc();
        }
    }

    /// The kernel's lost counts have grown to `latest`.
    pub fn lost(&mut self, latest: LostCounts) {
        let before = std::mem::replace(&mut self.lost_seen, latest);
        for (reason, now, was) in [
            ("ring_full", latest.ring_full, before.ring_full),
            ("kernel_skipped", latest.skipped, before.skipped),
        ] {
            self.lost
                .get_or_create(&ReasonLabels { reason })
                .inc_by(now.saturating_sub(was));
        }
    }

    /// The correlator's figures now.
    pub fn tracking(&mut self, tracked: usize, evicted: u64) {
        self.tracked.set(tracked as i64);
        self.evictions
            .inc_by(evicted.saturating_sub(self.evicted_seen));
        self.evicted_seen = self.evicted_seen.max(evicted);
    }

    /// Sets the TIME_WAIT gauges from a snapshot.
    pub fn snapshot(&self, s: &Snapshot) {
        for (substate, n) in [("time_wait", s.time_wait), ("fin_wait2", s.fin_wait2)] {
            self.timewait
                .get_or_create(&SubstateLabels { substate })
                .set(n as i64);
        }
        self.by_destination.clear();
        for g in &s.by_remote {
            self.by_destination
                .get_or_create(&DestinationLabels {
                    destination: g.key.clone(),
                })
                .set(g.count as i64);
        }
        self.by_process.clear();
        for g in &s.by_process {
            self.by_process
                .get_or_create(&ProcessLabels {
                    process: g.key.clone(),
                })
                .set(g.count as i64);
        }
        self.ports_held.clear();
        for d in &s.destinations {
            self.ports_held
                .get_or_create(&PortsLabels {
                    local: d.local.clone(),
                    destination: d.remote.clone(),
                })
                .set(d.ports_held as i64);
        }
        let k = &s.kernel;
        if let Some(n) = k.port_range {
            self.port_range.set(i64::from(n));
        }
        if let Some(n) = k.tw_reuse {
            self.tw_reuse.set(i64::from(n));
        }
        if let Some(n) = k.timestamps {
            self.timestamps.set(i64::from(n));
        }
        if let Some(n) = k.sockstat_tw {
            self.kernel_timewait.set(n as i64);
        }
        if let Some(n) = k.max_tw_buckets {
            self.max_tw_buckets.set(n as i64);
        }
        if let Some(n) = k.overflow_last_interval {
            self.overflows.inc_by(n);
        }
    }
}
