//! What the daemon exports to Prometheus. Counters follow the event stream;
//! the TIME_WAIT gauges are set from each namespace's snapshot and carry a
//! `netns` label (the namespace's name in /run/netns, else its inode). The
//! namespaces, and within each the processes, containers and destinations,
//! are capped at `--top` series (the rest summed as `other`). The pool
//! churn series name only the groups that churn now, the `--top` fastest
//! of each namespace reported.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::model::correlate::{Role, Timeline};
use crate::model::decode::{Record, SocketEvent, SocketEventKind, Transition};
use crate::model::reset::ResetReason;
use crate::model::TcpState;

/// How many TCP states [`TcpState`] names.
const STATES: usize = TcpState::BoundInactive as usize + 1;
use crate::model::lost::LostCounts;
use crate::model::timewait::Snapshot;
use crate::views::conns::{close_name, connect_failure_name};

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
    netns: String,
    substate: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabels {
    netns: String,
    destination: String,
}

/// A client's ports toward a destination: per local address, as the
/// kernel allocates them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortsLabels {
    netns: String,
    local: String,
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    netns: String,
    process: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChurnLabels {
    netns: String,
    process: String,
    destination: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabels {
    netns: String,
    container: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NetnsLabels {
    netns: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// A reset's direction (`sent`, `received`) and the kernel's reason: its
/// name, `other` for a number newer than this build, `unknown` where the
/// kernel did not say (a reset received, or any before Linux 6.10).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResetLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailedConnectLabels {
    reason: String,
    destination: String,
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
    by_container: Family<ContainerLabels, Gauge>,
    ports_held: Family<PortsLabels, Gauge>,
    churn_rate: Family<ChurnLabels, FloatGauge>,
    churn_life: Family<ChurnLabels, FloatGauge>,
    port_range: Family<NetnsLabels, Gauge>,
    tw_reuse: Family<NetnsLabels, Gauge>,
    timestamps: Family<NetnsLabels, Gauge>,
    kernel_timewait: Family<NetnsLabels, Gauge>,
    max_tw_buckets: Family<NetnsLabels, Gauge>,
    overflows: Family<NetnsLabels, Counter>,
    lost: Family<ReasonLabels, Counter>,
    failed_connects: Family<FailedConnectLabels, Counter>,
    /// Destinations with a failed-connect series of their own: the first
    /// `--top` seen (a counter cannot move to `other` later), the rest
    /// summed as `other`.
    failed_destinations: std::collections::HashSet<String>,
    retransmits: Counter,
    resets: Family<ResetLabels, Counter>,
    events: Counter,
    undecodable: Counter,
    tracked: Gauge,
    evictions: Counter,
    /// What the counters set from absolute figures last saw.
    evicted_seen: u64,
    lost_seen: LostCounts,
    /// The series every finished connection updates, each looked up in
    /// its family once (a lookup hashes the labels and takes a lock):
    /// `closed` by close kind, the histograms by direction
    /// ([`role_index`]). These families are never cleared.
    closed_by_kind: Vec<(&'static str, Counter)>,
    handshake_by_role: [Option<Histogram>; 3],
    lifetime_by_role: [Option<Histogram>; 3],
}

fn role_index(role: Role) -> usize {
    match role {
        Role::Client => 0,
        Role::Server => 1,
        Role::Unknown => 2,
    }
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
            by_container: Family::default(),
            ports_held: Family::default(),
            churn_rate: Family::default(),
            churn_life: Family::default(),
            port_range: Family::default(),
            tw_reuse: Family::default(),
            timestamps: Family::default(),
            kernel_timewait: Family::default(),
            max_tw_buckets: Family::default(),
            overflows: Family::default(),
            lost: Family::default(),
            failed_connects: Family::default(),
            failed_destinations: Default::default(),
            retransmits: Counter::default(),
            resets: Family::default(),
            events: Counter::default(),
            undecodable: Counter::default(),
            tracked: Gauge::default(),
            evictions: Counter::default(),
            evicted_seen: 0,
            lost_seen: LostCounts::default(),
            closed_by_kind: Vec::new(),
            handshake_by_role: Default::default(),
            lifetime_by_role: Default::default(),
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
            "Timewait sockets tcpwatch counts now, by network namespace and substate (TIME_WAIT, or FIN_WAIT2 held by the kernel's timewait code); tcpwatch_kernel_timewait_sockets is the kernel's own count of each namespace",
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
            "timewait_by_container",
            "Timewait sockets by the container of the process that closed first, from its cgroup path; (none) for no container or no known owner (top --top, the rest as other)",
            m.by_container.clone(),
        );
        r.register(
            "destination_ports_held",
            "Ephemeral ports of a local address held in timewait toward a destination (client side); each local address has the whole port range toward each destination",
            m.ports_held.clone(),
        );
        r.register(
            "pool_churn_connections_per_second",
            "Connections a second that a process (command name) opens to one destination and closes first after a short life, each leaving TIME_WAIT: connections that a pool or keep-alive would reuse. Only groups over the thresholds (--churn-rate, --churn-life, --churn-share over --churn-window), the --top fastest per namespace",
            m.churn_rate.clone(),
        );
        r.register_with_unit(
            "pool_churn_median_lifetime",
            "Median lifetime of the connections of each group tcpwatch_pool_churn_connections_per_second names",
            Unit::Seconds,
            m.churn_life.clone(),
        );
        r.register(
            "kernel_tcp_tw_reuse",
            "net.ipv4.tcp_tw_reuse of each network namespace: 1 lets connect() reuse ports in TIME_WAIT, 2 only for loopback (either end); both need tcp_timestamps",
            m.tw_reuse.clone(),
        );
        r.register(
            "kernel_tcp_timestamps",
            "net.ipv4.tcp_timestamps of each network namespace (tcp_tw_reuse needs it on)",
            m.timestamps.clone(),
        );
        r.register(
            "local_port_range_ports",
            "Size of net.ipv4.ip_local_port_range of each network namespace",
            m.port_range.clone(),
        );
        r.register(
            "kernel_timewait_sockets",
            "Timewait sockets the kernel counts in each network namespace (its /proc/net/sockstat tw)",
            m.kernel_timewait.clone(),
        );
        r.register(
            "kernel_tw_max_buckets",
            "net.ipv4.tcp_max_tw_buckets of each network namespace",
            m.max_tw_buckets.clone(),
        );
        r.register(
            "kernel_timewait_overflows",
            "Timewait sockets the kernel could not make (TCPTimeWaitOverflow) since the daemon started, by network namespace",
            m.overflows.clone(),
        );
        r.register(
            "lost_events",
            "Kernel events lost: ring_full (ring buffer full) or kernel_skipped (program not run)",
            m.lost.clone(),
        );
        r.register(
            "failed_connects",
            "connect() calls that never reached ESTABLISHED, by reason (refused, timed_out, host_unreachable, net_unreachable, given_up by the application, address_not_available, failed:ERRNO) and destination (the first --top destinations, the rest as other)",
            m.failed_connects.clone(),
        );
        r.register(
            "retransmitted_segments",
            "Segments the kernel retransmitted (tcp:tcp_retransmit_skb), SYNs included",
            m.retransmits.clone(),
        );
        r.register(
            "resets",
            "TCP resets sent or received on this host (every network namespace), by the reason the kernel gave for a reset it sent (unknown for one received, or before Linux 6.10)",
            m.resets.clone(),
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
        m.retransmits.inc_by(0);
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
        // Counted here first, then one series update per kind of
        // transition in the batch: looking a series up hashes its labels.
        let mut counts = [[0u64; STATES]; STATES];
        let mut first: [[Option<&Transition>; STATES]; STATES] = [[None; STATES]; STATES];
        let mut retransmits = 0;
        for r in records {
            let t = match r {
                Record::State(t) => t,
                Record::Socket(s) => {
                    retransmits += u64::from(s.kind == SocketEventKind::Retransmit);
                    self.reset(s);
                    continue;
                }
            };
            let (o, n) = (t.old as usize, t.new as usize);
            counts[o][n] += 1;
            first[o][n].get_or_insert(t);
        }
        self.retransmits.inc_by(retransmits);
        for (o, row) in counts.iter().enumerate() {
            for (n, &count) in row.iter().enumerate() {
                let Some(t) = first[o][n].filter(|_| count > 0) else {
                    continue;
                };
                self.transitions
                    .get_or_create(&TransitionLabels {
                        from: t.old.name(),
                        to: t.new.name(),
                    })
                    .inc_by(count);
                if let Some(direction) = t.opened() {
                    self.opened
                        .get_or_create(&DirectionLabels { direction })
                        .inc_by(count);
                }
            }
        }
    }

    fn reset(&self, s: &SocketEvent) {
        let direction = match s.kind {
            SocketEventKind::SendReset => "sent",
            SocketEventKind::ReceiveReset => "received",
            _ => return,
        };
        let reason = s
            .reset
            .and_then(|r| r.reason)
            .map_or("unknown", ResetReason::label);
        self.resets
            .get_or_create(&ResetLabels { direction, reason })
            .inc();
    }

    /// Counts a finished connection; a failed connect by its reason and
    /// destination, `top` destinations at most.
    pub fn connection(&mut self, t: &Timeline, top: usize) {
        if let Some(f) = t.connect_failure {
            let mut destination = t.remote.to_string();
            if !self.failed_destinations.contains(&destination) {
                if self.failed_destinations.len() < top {
                    self.failed_destinations.insert(destination.clone());
                } else {
                    destination = "other".into();
                }
            }
            self.failed_connects
                .get_or_create(&FailedConnectLabels {
                    reason: connect_failure_name(f),
                    destination,
                })
                .inc();
        }
        let kind = close_name(t.close);
        match self.closed_by_kind.iter().find(|(k, _)| *k == kind) {
            Some((_, closed)) => {
                closed.inc();
            }
            None => {
                let closed = self.closed.get_or_create_owned(&KindLabels { kind });
                closed.inc();
                self.closed_by_kind.push((kind, closed));
            }
        };
        let labels = DirectionLabels {
            direction: direction(t.role),
        };
        let role = role_index(t.role);
        if let Some(h) = t.handshake_ns {
            self.handshake_by_role[role]
                .get_or_insert_with(|| self.handshake.get_or_create_owned(&labels))
                .observe(h as f64 / 1e9);
        }
        if !t.pre_existing() {
            self.lifetime_by_role[role]
                .get_or_insert_with(|| self.lifetime.get_or_create_owned(&labels))
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

    /// Sets the TIME_WAIT gauges from the snapshots of the namespaces
    /// reported: the `top` namespaces with the most timewait sockets by
    /// their own label, the others summed as `netns="other"` (their
    /// timewait and kernel counts only). The overflow counter of each is
    /// its total since tracing began: `other`'s drops (a counter reset to
    /// `rate()`) when a namespace moves out of it.
    pub fn snapshots(&self, snapshots: &[Snapshot], top: usize) {
        self.by_destination.clear();
        self.ports_held.clear();
        self.by_process.clear();
        self.by_container.clear();
        self.churn_rate.clear();
        self.churn_life.clear();
        self.timewait.clear();
        for family in [
            &self.port_range,
            &self.tw_reuse,
            &self.timestamps,
            &self.kernel_timewait,
            &self.max_tw_buckets,
        ] {
            family.clear();
        }
        // Rebuilt from each namespace's total since tracing began, so that
        // a namespace gone or summed into `other` leaves no series behind:
        // the labels stay bounded however many namespaces come and go.
        self.overflows.clear();
        let mut ranked: Vec<&Snapshot> = snapshots.iter().collect();
        ranked.sort_by(|a, b| b.total.cmp(&a.total).then(a.netns.cmp(&b.netns)));
        let folded = ranked.len() > top;
        let mut other = (0u64, 0u64, 0u64, 0u64);
        for (i, s) in ranked.into_iter().enumerate() {
            if i >= top {
                other.0 += s.time_wait;
                other.1 += s.fin_wait2;
                other.2 += s.kernel.sockstat_tw.unwrap_or(0);
                other.3 += s.kernel.overflow_since_start.unwrap_or(0);
                continue;
            }
            self.snapshot(&netns_label(s), s);
        }
        if folded {
            let netns = "other".to_string();
            self.substates(&netns, other.0, other.1);
            self.kernel_timewait
                .get_or_create(&NetnsLabels {
                    netns: netns.clone(),
                })
                .set(other.2 as i64);
            self.overflows
                .get_or_create(&NetnsLabels { netns })
                .inc_by(other.3);
        }
    }

    fn substates(&self, netns: &str, time_wait: u64, fin_wait2: u64) {
        for (substate, n) in [("time_wait", time_wait), ("fin_wait2", fin_wait2)] {
            self.timewait
                .get_or_create(&SubstateLabels {
                    netns: netns.to_string(),
                    substate,
                })
                .set(n as i64);
        }
    }

    /// One namespace's series, labelled `netns`.
    fn snapshot(&self, netns: &str, s: &Snapshot) {
        self.substates(netns, s.time_wait, s.fin_wait2);
        let ns = || netns.to_string();
        for g in &s.by_remote {
            self.by_destination
                .get_or_create(&DestinationLabels {
                    netns: ns(),
                    destination: g.key.clone(),
                })
                .set(g.count as i64);
        }
        for g in &s.by_process {
            self.by_process
                .get_or_create(&ProcessLabels {
                    netns: ns(),
                    process: g.key.clone(),
                })
                .set(g.count as i64);
        }
        for g in &s.by_container {
            self.by_container
                .get_or_create(&ContainerLabels {
                    netns: ns(),
                    container: g.key.clone(),
                })
                .set(g.count as i64);
        }
        for d in &s.destinations {
            self.ports_held
                .get_or_create(&PortsLabels {
                    netns: ns(),
                    local: d.local.clone(),
                    destination: d.remote.clone(),
                })
                .set(d.ports_held as i64);
        }
        for c in &s.churn {
            let labels = ChurnLabels {
                netns: ns(),
                process: c.process.clone(),
                destination: c.destination.clone(),
            };
            self.churn_rate.get_or_create(&labels).set(c.rate_per_s);
            self.churn_life
                .get_or_create(&labels)
                .set(c.median_life_ms / 1e3);
        }
        let k = &s.kernel;
        let labels = NetnsLabels { netns: ns() };
        if let Some(n) = k.port_range {
            self.port_range.get_or_create(&labels).set(i64::from(n));
        }
        if let Some(n) = k.tw_reuse {
            self.tw_reuse.get_or_create(&labels).set(i64::from(n));
        }
        if let Some(n) = k.timestamps {
            self.timestamps.get_or_create(&labels).set(i64::from(n));
        }
        if let Some(n) = k.sockstat_tw {
            self.kernel_timewait.get_or_create(&labels).set(n as i64);
        }
        if let Some(n) = k.max_tw_buckets {
            self.max_tw_buckets.get_or_create(&labels).set(n as i64);
        }
        // Present from the namespace's first snapshot, so increase() sees
        // its first overflow.
        self.overflows
            .get_or_create(&labels)
            .inc_by(k.overflow_since_start.unwrap_or(0));
    }
}

/// How a namespace is named in the `netns` label: its name in /run/netns,
/// else its inode (`unknown` where the kernel's BTF gave none).
pub fn netns_label(s: &Snapshot) -> String {
    match (&s.netns_name, s.netns) {
        (Some(name), _) => name.clone(),
        (None, Some(inode)) => inode.to_string(),
        (None, None) => "unknown".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decode::interpret;
    use tcpwatch_common::{kind, Event, AF_INET};

    fn state(old: u8, new: u8) -> Record {
        let mut e = Event::zeroed();
        e.kind = kind::STATE;
        e.family = AF_INET;
        e.skaddr = 1;
        e.oldstate = old;
        e.newstate = new;
        interpret(&e).expect("a valid transition")
    }

    #[test]
    fn transitions_are_counted_per_kind_across_batches() {
        let mut registry = Registry::with_prefix("tcpwatch");
        let metrics = Metrics::new(&mut registry);
        // SYN_SENT→ESTABLISHED three times, SYN_RECV→ESTABLISHED once,
        // ESTABLISHED→FIN_WAIT1 once; then one more active open.
        let batch = [
            state(2, 1),
            state(3, 1),
            state(2, 1),
            state(1, 4),
            state(2, 1),
        ];
        metrics.records(&batch, 0);
        metrics.records(&[state(2, 1)], 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"tcpwatch_transitions_total{from="SYN_SENT",to="ESTABLISHED"} 4"#,
            r#"tcpwatch_transitions_total{from="SYN_RECV",to="ESTABLISHED"} 1"#,
            r#"tcpwatch_transitions_total{from="ESTABLISHED",to="FIN_WAIT1"} 1"#,
            r#"tcpwatch_connections_opened_total{direction="active"} 4"#,
            r#"tcpwatch_connections_opened_total{direction="passive"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        assert!(!text.contains(r#"to="CLOSE""#), "{text}");
    }

    #[test]
    fn failed_connects_by_reason_and_at_most_top_destinations() {
        use crate::model::correlate::ConnectFailure;
        let mut registry = Registry::with_prefix("tcpwatch");
        let mut metrics = Metrics::new(&mut registry);
        let fail = |port: u16, f: ConnectFailure| {
            let mut t = Timeline::sample(
                "10.0.0.1:40000"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
                std::net::SocketAddr::from(([10, 0, 0, 5], port)).into(),
                None,
                Role::Client,
                1_000_000,
            );
            t.connect_failure = Some(f);
            t
        };
        metrics.connection(&fail(80, ConnectFailure::Refused), 2);
        metrics.connection(&fail(80, ConnectFailure::Refused), 2);
        metrics.connection(&fail(81, ConnectFailure::Unreachable(113)), 2);
        // A third destination is past --top 2.
        metrics.connection(&fail(82, ConnectFailure::GivenUp), 2);
        metrics.connection(&fail(83, ConnectFailure::GivenUp), 2);
        // An opened connection is no failure.
        metrics.connection(&fail(84, ConnectFailure::Refused), 2);
        let mut retransmit = Event::zeroed();
        retransmit.kind = kind::RETRANSMIT;
        retransmit.skaddr = 1;
        let retransmit = interpret(&retransmit).expect("a retransmit");
        metrics.records(&[retransmit, state(2, 1), retransmit], 0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"tcpwatch_failed_connects_total{reason="refused",destination="10.0.0.5:80"} 2"#,
            r#"tcpwatch_failed_connects_total{reason="host_unreachable",destination="10.0.0.5:81"} 1"#,
            r#"tcpwatch_failed_connects_total{reason="given_up",destination="other"} 2"#,
            r#"tcpwatch_failed_connects_total{reason="refused",destination="other"} 1"#,
            "tcpwatch_retransmitted_segments_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        assert!(!text.contains("10.0.0.5:82"), "{text}");
    }

    #[test]
    fn pool_churn_series_follow_each_snapshot() {
        use crate::model::churn::Churn;
        use crate::model::timewait::{KernelView, TimewaitBook, TimewaitOptions};
        let mut registry = Registry::with_prefix("tcpwatch");
        let metrics = Metrics::new(&mut registry);
        let mut book = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        let mut s = book.snapshot(1_000_000_000, String::new(), 10, KernelView::default());
        s.churn = vec![Churn {
            process: "python3".into(),
            destination: "10.0.0.5:5432".into(),
            connections: 4120,
            window_s: 10.0,
            rate_per_s: 412.0,
            median_life_ms: 3.0,
            timewait_share: 1.0,
        }];
        let text = |m: &Metrics, s: &Snapshot| {
            m.snapshots(std::slice::from_ref(s), 10);
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text
        };
        let labels = r#"{netns="7",process="python3",destination="10.0.0.5:5432"}"#;
        let got = text(&metrics, &s);
        for (name, value) in [
            ("tcpwatch_pool_churn_connections_per_second", 412.0),
            ("tcpwatch_pool_churn_median_lifetime_seconds", 0.003),
        ] {
            let line = got
                .lines()
                .find(|l| l.starts_with(&format!("{name}{labels} ")))
                .unwrap_or_else(|| panic!("no {name}{labels} in:\n{got}"));
            let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!((v - value).abs() < 1e-9, "{line}");
        }
        // The churn stopped: its series go with it.
        s.churn.clear();
        let got = text(&metrics, &s);
        assert!(!got.contains("pool_churn_connections_per_second{"), "{got}");
    }

    #[test]
    fn resets_are_counted_by_direction_and_reason() {
        let mut registry = Registry::with_prefix("tcpwatch");
        let metrics = Metrics::new(&mut registry);
        let reset = |k: u8, reason: Option<u8>| {
            let mut e = Event::zeroed();
            e.kind = k;
            if let Some(r) = reason {
                e.reset_reason = r;
                e.valid = tcpwatch_common::valid::RESET_REASON;
            }
            interpret(&e).expect("a valid reset")
        };
        metrics.records(
            &[
                reset(kind::SEND_RESET, Some(1)),
                reset(kind::SEND_RESET, Some(1)),
                reset(kind::SEND_RESET, Some(11)),
                reset(kind::SEND_RESET, Some(200)),
                reset(kind::SEND_RESET, None),
                reset(kind::RECEIVE_RESET, None),
                reset(kind::RETRANSMIT, None),
            ],
            0,
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"tcpwatch_resets_total{direction="sent",reason="NO_SOCKET"} 2"#,
            r#"tcpwatch_resets_total{direction="sent",reason="TCP_ABORT_ON_CLOSE"} 1"#,
            r#"tcpwatch_resets_total{direction="sent",reason="other"} 1"#,
            r#"tcpwatch_resets_total{direction="sent",reason="unknown"} 1"#,
            r#"tcpwatch_resets_total{direction="received",reason="unknown"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("tcpwatch_resets_total{"))
                .count(),
            5,
            "{text}"
        );
    }
}
