//! Correlation: the stream of per-socket events in, one timeline per
//! finished connection out, saying how it opened, how long each phase took,
//! who closed it and how, and whether it left a timewait socket.
//!
//! Pure: no I/O and no clock of its own. Time comes from the events, and
//! from `advance`, which the caller drives (live: the monotonic clock after
//! each drain; replay: the last event's time).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use crate::model::decode::{Record, SocketEvent, SocketEventKind, Transition};
use crate::model::handoff::{HandoffStats, Handoffs, TimewaitLookup};
use crate::model::owner::{Attribution, OwnerSource, OwnerTracker};
use crate::model::reset::ResetReason;
use crate::model::snapshot::SocketSnapshot;
use crate::model::FastMap;
use crate::model::Owner;
use crate::model::{Endpoint, Family, TcpState};
use std::sync::Arc;

const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;
const ECONNRESET: i32 = 104;
const EHOSTUNREACH: i32 = 113;
const ENETUNREACH: i32 = 101;
const EADDRNOTAVAIL: i32 = 99;

/// Why a connect() never reached ESTABLISHED, as the kernel shows it at
/// SYN_SENT → CLOSE (checked on Linux 6.18 with bpftrace):
/// - refused: a RST answered the SYN, `sk_err` ECONNREFUSED;
/// - timed out: every SYN went unanswered, `sk_err` ETIMEDOUT after the
///   last retransmission's timeout;
/// - unreachable: an ICMP destination unreachable answered the SYNs.
///   Host and network unreachable are soft errors in SYN_SENT (since
///   6.5): the SYNs go on (the ICMP reverts the backoff) until the kernel
///   gives up, and `sk_err` is the ICMP's errno instead of ETIMEDOUT;
/// - given up by the application: it closed the socket in SYN_SENT (its
///   own connect timeout); the kernel sets no errno, and the SYN was sent;
/// - address not available: `tcp_v4_connect` sets SYN_SENT before it
///   picks a local port; when none is free (`inet_hash_connect` fails) it
///   sets CLOSE at once, before any SYN: `segs_out` is 0, the local port
///   0, `sk_err` 0, and connect() returns EADDRNOTAVAIL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectFailure {
    Refused,
    TimedOut,
    /// EHOSTUNREACH or ENETUNREACH.
    Unreachable(i32),
    /// Closed by its application while in SYN_SENT.
    GivenUp,
    AddressNotAvailable,
    /// Any other errno (e.g. EACCES from an ICMP "administratively
    /// prohibited").
    Other(i32),
}

impl ConnectFailure {
    /// The errno the application's connect() saw; `None` for one given up
    /// by the application (it saw none: it stopped waiting).
    pub fn errno(self) -> Option<i32> {
        match self {
            ConnectFailure::Refused => Some(ECONNREFUSED),
            ConnectFailure::TimedOut => Some(ETIMEDOUT),
            ConnectFailure::Unreachable(e) | ConnectFailure::Other(e) => Some(e),
            ConnectFailure::GivenUp => None,
            ConnectFailure::AddressNotAvailable => Some(EADDRNOTAVAIL),
        }
    }

    /// Classifies an active open that never reached ESTABLISHED from what
    /// the kernel left on the socket at CLOSE.
    fn classify(
        error: Option<i32>,
        resets_received: u16,
        segs_out: Option<u32>,
        local_port: u16,
    ) -> ConnectFailure {
        match error {
            _ if resets_received > 0 => ConnectFailure::Refused,
            Some(ECONNREFUSED) => ConnectFailure::Refused,
            Some(ETIMEDOUT) => ConnectFailure::TimedOut,
            Some(e @ (EHOSTUNREACH | ENETUNREACH)) => ConnectFailure::Unreachable(e),
            Some(e) => ConnectFailure::Other(e),
            // No SYN left: the kernel found no local port.
            None if segs_out == Some(0) || (segs_out.is_none() && local_port == 0) => {
                ConnectFailure::AddressNotAvailable
            }
            None => ConnectFailure::GivenUp,
        }
    }
}

/// Which end this socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Server,
    /// Opened before the trace started and nothing since told which.
    Unknown,
}

/// How the connection opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpenKind {
    /// connect(): SYN_SENT → ESTABLISHED.
    Active,
    /// Accepted from a listener: SYN_RECV → ESTABLISHED.
    Passive,
    /// connect() answered by a RST.
    Refused,
    /// connect() got no answer.
    TimedOut,
    /// connect() failed otherwise (the errno is in `error`).
    Failed,
    /// A handshake that was received but never completed.
    PassiveFailed,
    /// Open before tracing started.
    BeforeTrace,
}

/// How the connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseKind {
    /// FIN in each direction, each acknowledged.
    Orderly,
    /// Both ends sent FIN before receiving the other's (FIN_WAIT1 → CLOSING).
    Simultaneous,
    /// This end sent a RST while closing (not an application abort).
    ResetSent,
    /// The peer sent a RST.
    ResetReceived,
    /// The local application aborted: closed with SO_LINGER 0 or unread
    /// data, and the kernel sent a RST.
    Aborted,
    /// We closed and the peer had not: the socket went to the FIN_WAIT2
    /// timewait state, and the peer's FIN had not come by the last check
    /// (see `handoff`): it stays there until the peer's FIN or
    /// `tcp_fin_timeout`.
    FinWait2,
    /// The socket sat in FIN_WAIT2 until the timer closed it.
    FinWait2Timeout,
    /// The kernel closed it with an error (e.g. retransmission timeout).
    Error,
    /// The handshake never completed.
    NeverOpened,
    /// Closed by a path tcpwatch does not recognise.
    Unknown,
}

/// Which end closed first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Closer {
    Local,
    Peer,
    Both,
}

/// The timewait socket left behind (its state is invisible to the
/// tracepoint: it is derived from how the full socket closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimewaitSubstate {
    TimeWait,
    FinWait2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timewait {
    pub substate: TimewaitSubstate,
    /// How long the kernel holds the 4-tuple from `closed_ns`.
    pub hold_ns: u64,
}

/// One state change as seen on this socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub ts_ns: u64,
    pub old: TcpState,
    pub new: TcpState,
}

/// Everything known about one finished connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    pub skaddr: u64,
    pub family: Family,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub netns: Option<u32>,
    pub owner: Option<Attribution>,
    pub role: Role,
    pub open: OpenKind,
    /// The first event seen (the open), or for `BeforeTrace` when tracing
    /// started: the connection is known to have existed since then, so the
    /// lifetime counted from it is a lower bound.
    pub first_ns: u64,
    pub established_ns: Option<u64>,
    pub closed_ns: u64,
    pub handshake_ns: Option<u64>,
    pub close: CloseKind,
    pub closed_by: Option<Closer>,
    /// 3 when one segment carried both an ACK and a FIN, 4 when each went
    /// alone; `None` when the teardown was not an orderly FIN exchange or
    /// was not seen whole.
    pub teardown_segments: Option<u8>,
    pub timewait: Option<Timewait>,
    /// Closed by its application, the socket was handed to a FIN_WAIT2
    /// timewait socket on the peer's bare ACK: the rest of its teardown
    /// (the peer's FIN, the last ACK) happened there, where no tracepoint
    /// sees it. How it ended was learned afterwards (see `handoff`).
    pub handed_off: bool,
    /// errno the kernel recorded on the socket when it closed.
    pub error: Option<i32>,
    /// For a connect() that never reached ESTABLISHED: why.
    pub connect_failure: Option<ConnectFailure>,
    /// When each SYN was retransmitted (`tcp:tcp_retransmit_skb` while in
    /// SYN_SENT), CLOCK_MONOTONIC ns.
    pub syn_retransmits_ns: Vec<u64>,
    /// Application bytes the peer acknowledged, and application bytes
    /// received (the kernel's counters less the SYN and FINs they count).
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    pub srtt_us: Option<u32>,
    /// Retransmitted segments seen by `tcp:tcp_retransmit_skb`.
    pub retransmits: u32,
    /// The kernel's own count of retransmissions at close.
    pub total_retrans: Option<u32>,
    pub resets_sent: u32,
    pub resets_received: u32,
    /// Why this end sent its first RST, where the kernel said (Linux 6.10
    /// and later); `None` when it sent none or the kernel did not say.
    pub reset_reason: Option<ResetReason>,
    pub steps: Vec<Step>,
}

impl Timeline {
    /// The lifetime; for a connection open before tracing, a lower bound
    /// (from when tracing started).
    pub fn lifetime_ns(&self) -> u64 {
        self.closed_ns.saturating_sub(self.first_ns)
    }

    pub fn pre_existing(&self) -> bool {
        self.open == OpenKind::BeforeTrace
    }

    /// An orderly connection closed first by this end, which left a
    /// TIME_WAIT socket: a fixture for tests and benchmarks.
    #[doc(hidden)]
    pub fn sample(
        local: Endpoint,
        remote: Endpoint,
        owner: Option<Attribution>,
        role: Role,
        closed_ns: u64,
    ) -> Timeline {
        Timeline {
            skaddr: 1,
            family: if local.addr.is_ipv4() {
                Family::V4
            } else {
                Family::V6
            },
            local,
            remote,
            netns: Some(7),
            owner,
            role,
            open: OpenKind::Active,
            first_ns: closed_ns.saturating_sub(1000),
            established_ns: None,
            closed_ns,
            handshake_ns: None,
            close: CloseKind::Orderly,
            closed_by: Some(Closer::Local),
            teardown_segments: Some(4),
            timewait: Some(Timewait {
                substate: TimewaitSubstate::TimeWait,
                hold_ns: 60_000_000_000,
            }),
            handed_off: false,
            error: None,
            connect_failure: None,
            syn_retransmits_ns: Vec::new(),
            bytes_sent: None,
            bytes_received: None,
            srtt_us: None,
            retransmits: 0,
            total_retrans: None,
            resets_sent: 0,
            resets_received: 0,
            reset_reason: None,
            steps: Vec::new(),
        }
    }
}

/// One transition kept while a socket is followed: 8 bytes, microseconds
/// from the socket's first event.
#[derive(Clone, Copy, Debug, Default)]
struct PackedStep {
    dt_us: u32,
    old: u8,
    new: u8,
}

/// A socket's steps: the first two inline (all an open connection has),
/// the rest on the heap.
#[derive(Clone, Debug, Default)]
struct StepList {
    inline: [PackedStep; 2],
    inline_len: u8,
    spill: Vec<PackedStep>,
}

impl StepList {
    fn push(&mut self, step: PackedStep) {
        match self.inline.get_mut(usize::from(self.inline_len)) {
            Some(slot) => {
                *slot = step;
                self.inline_len += 1;
            }
            None => self.spill.push(step),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &PackedStep> {
        self.inline[..usize::from(self.inline_len)]
            .iter()
            .chain(self.spill.iter())
    }

    fn len(&self) -> usize {
        usize::from(self.inline_len) + self.spill.len()
    }

    fn last(&self) -> Option<&PackedStep> {
        self.spill
            .last()
            .or_else(|| self.inline[..usize::from(self.inline_len)].last())
    }
}

/// Counters read at the transitions the close classification needs; bit
/// `HAVE_*` set when read. The first closer needs the FIN_WAIT2 pair, the
/// second closer the CLOSE_WAIT pair, never both: they share two slots.
#[derive(Clone, Copy, Debug, Default)]
struct Marks {
    /// segs_in at FIN_WAIT1 → FIN_WAIT2, or segs_out at ESTABLISHED →
    /// CLOSE_WAIT.
    a: u32,
    /// rcv_nxt at FIN_WAIT1 → FIN_WAIT2, or segs_out at CLOSE_WAIT →
    /// LAST_ACK.
    b: u32,
    /// At SYN_RECV → ESTABLISHED: the kernel's SYN/ACK round trip.
    est_srtt_us: u32,
    have: u8,
    /// At CLOSE_WAIT → LAST_ACK: a delayed ACK was pending.
    la_ack_pending: bool,
}

const HAVE_FW2_SEGS_IN: u8 = 1;
const HAVE_FW2_RCV_NXT: u8 = 2;
const HAVE_CW_SEGS_OUT: u8 = 4;
const HAVE_LA_SEGS_OUT: u8 = 8;
const HAVE_EST_SRTT: u8 = 16;
const HAVE_LA_ACK_PENDING: u8 = 32;

/// A socket being followed, kept small: it is what a million idle
/// connections cost.
#[derive(Clone, Debug)]
struct Track {
    skaddr: u64,
    local: Endpoint,
    remote: Endpoint,
    first_ns: u64,
    owner: Option<Arc<Owner>>,
    steps: StepList,
    marks: Marks,
    /// Network namespace inode; 0 when unknown.
    netns: u32,
    retransmits: u32,
    resets_sent: u16,
    resets_received: u16,
    /// The reason the kernel gave for the first RST this socket sent.
    reset_reason: Option<ResetReason>,
    /// Insertion generation, for oldest-first eviction and for telling a
    /// socket from a later one at the same address.
    gen: u32,
    family: Family,
    owner_source: OwnerSource,
    /// For a socket older than the trace: its role as the listener table
    /// of the start tells it.
    before_trace_role: Role,
    listener: bool,
    /// CLOSE was seen: the timeline waits a moment for the RST the kernel
    /// sends right after an abortive close.
    closed: bool,
}

impl Track {
    fn push_step(&mut self, ts_ns: u64, old: TcpState, new: TcpState) {
        let dt_us = (ts_ns.saturating_sub(self.first_ns) / 1000).min(u64::from(u32::MAX)) as u32;
        self.steps.push(PackedStep {
            dt_us,
            old: old.kernel_number(),
            new: new.kernel_number(),
        });
    }

    /// A SYN retransmitted in SYN_SENT, kept among the steps as a
    /// SYN_SENT → SYN_SENT mark (no real transition has old == new), so
    /// that the track grows by nothing.
    fn push_syn_retransmit(&mut self, ts_ns: u64) {
        let syn_sent = TcpState::SynSent.kernel_number();
        if self.steps.last().is_some_and(|p| p.new == syn_sent) {
            self.push_step(ts_ns, TcpState::SynSent, TcpState::SynSent);
        }
    }

    fn syn_retransmits_ns(&self) -> Vec<u64> {
        self.steps
            .iter()
            .filter(|p| p.old == p.new)
            .map(|p| self.first_ns + u64::from(p.dt_us) * 1000)
            .collect()
    }

    fn steps(&self) -> Vec<Step> {
        // Sized at once: collected through a filter, it would start at
        // four and grow (a second allocation for most connections).
        let mut steps = Vec::with_capacity(self.steps.len());
        let kept = self
            .steps
            .iter()
            .enumerate()
            .filter(|(_, p)| p.old != p.new)
            .map(|(i, p)| Step {
                // The first step's time is exact; later ones to the µs.
                ts_ns: if i == 0 {
                    self.first_ns
                } else {
                    self.first_ns + u64::from(p.dt_us) * 1000
                },
                old: TcpState::from_kernel(p.old).unwrap_or(TcpState::Close),
                new: TcpState::from_kernel(p.new).unwrap_or(TcpState::Close),
            });
        steps.extend(kept);
        steps
    }
}

/// What was read at the CLOSE transition, kept only while the socket waits
/// out its grace period.
#[derive(Clone, Copy, Debug)]
struct PendingClose {
    slot: u32,
    gen: u32,
    closed_ns: u64,
    last: crate::model::decode::SockFields,
}

#[derive(Clone, Copy, Debug)]
pub struct CorrelatorOptions {
    pub max_sockets: usize,
    /// How long after CLOSE to wait for late events of the same socket
    /// (the RST of an abortive close follows the CLOSE transition).
    pub grace_ns: u64,
    /// TIME_WAIT length (TCP_TIMEWAIT_LEN: 60 s in Linux).
    pub time_wait_ns: u64,
    /// net.ipv4.tcp_fin_timeout, the FIN_WAIT2 timewait length.
    pub fin_timeout_ns: u64,
}

impl Default for CorrelatorOptions {
    fn default() -> Self {
        CorrelatorOptions {
            max_sockets: 262_144,
            grace_ns: 20_000_000,
            time_wait_ns: 60_000_000_000,
            fin_timeout_ns: 60_000_000_000,
        }
    }
}

/// Counters about the correlation itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CorrelatorStats {
    pub events: u64,
    pub timelines: u64,
    pub evicted: u64,
    /// Socket events for sockets not being followed (e.g. a retransmit on a
    /// socket opened before the trace with no transition since).
    pub orphan_events: u64,
    /// Most sockets followed at once (at most `max_sockets`).
    pub peak_tracked: usize,
    /// Sockets handed to a FIN_WAIT2 timewait socket, by how each ended.
    pub handoffs: HandoffStats,
}

/// A finished timeline ordered by when its socket closed.
struct ByClose {
    seq: u64,
    timeline: Timeline,
}

impl ByClose {
    fn key(&self) -> (u64, u64) {
        (self.timeline.closed_ns, self.seq)
    }
}

impl PartialEq for ByClose {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for ByClose {}

impl PartialOrd for ByClose {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByClose {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

pub struct Correlator {
    opts: CorrelatorOptions,
    /// Tracks live in a slab, found by socket address through `index`: a
    /// hash table of small entries grows cheaply, the tracks do not move.
    slots: Vec<Option<Track>>,
    free: Vec<u32>,
    index: FastMap<u64, u32>,
    /// (slot, generation) in insertion order, for oldest-first eviction;
    /// stale pairs are skipped and compacted away.
    order: VecDeque<(u32, u32)>,
    next_gen: u32,
    /// Closed sockets waiting out the grace period, in close order.
    closing: VecDeque<PendingClose>,
    /// Finished timelines handed out in close order: a socket whose address
    /// is reused by a new one is finished at once (servers that close first
    /// free their sockets at once), and a hand-off settles up to a second
    /// after its close; the timelines that closed after them wait here.
    /// Bounded by `max_sockets`.
    in_order: BinaryHeap<Reverse<ByClose>>,
    /// Scratch space for timelines on their way into `in_order`.
    finished: Vec<Timeline>,
    /// Ties in `in_order` go by arrival.
    next_seq: u64,
    owners: OwnerTracker,
    stats: CorrelatorStats,
    /// Sockets evicted while open and not seen closed since: the rest of
    /// such a socket's life is skipped, as no timeline of it can be right
    /// (it would pass for a connection older than the trace).
    evicted: crate::model::table::EvictedKeys,
    /// Timelines of sockets handed to a FIN_WAIT2 timewait socket, held
    /// until their peer's FIN is known.
    handoffs: Handoffs,
    /// Live only: asks the kernel about timewait sockets.
    lookup: Option<Box<dyn TimewaitLookup>>,
    /// When tracing started (live), or the first event (replay): sockets
    /// first seen in mid-life existed by then.
    traced_since_ns: Option<u64>,
}

impl Correlator {
    pub fn new(
        opts: CorrelatorOptions,
        snapshot: Option<SocketSnapshot>,
        own_netns: Option<u32>,
    ) -> Self {
        Correlator {
            opts: CorrelatorOptions {
                max_sockets: opts.max_sockets.max(1),
                ..opts
            },
            slots: Vec::new(),
            free: Vec::new(),
            index: FastMap::default(),
            order: VecDeque::new(),
            next_gen: 0,
            closing: VecDeque::new(),
            in_order: BinaryHeap::new(),
            finished: Vec::new(),
            next_seq: 0,
            owners: OwnerTracker::new(1, snapshot, own_netns),
            stats: CorrelatorStats::default(),
            evicted: crate::model::table::EvictedKeys::new(opts.max_sockets),
            handoffs: Handoffs::new(opts.max_sockets, opts.time_wait_ns),
            lookup: None,
            traced_since_ns: None,
        }
    }

    /// Tracing started at `ts_ns` (CLOCK_MONOTONIC, the events' clock):
    /// connections first seen in mid-life were open by then. Without it,
    /// the first event's time stands in.
    pub fn set_traced_since(&mut self, ts_ns: u64) {
        self.traced_since_ns = Some(ts_ns);
    }

    /// Live tracing: the kernel's list tells what became of sockets handed
    /// to a FIN_WAIT2 timewait socket in the network namespaces `lookup`
    /// covers (elsewhere, only their peer's timeline can, or time).
    pub fn set_timewait_lookup(&mut self, lookup: Box<dyn TimewaitLookup>) {
        self.lookup = Some(lookup);
    }

    pub fn stats(&self) -> CorrelatorStats {
        CorrelatorStats {
            handoffs: self.handoffs.stats,
            ..self.stats
        }
    }

    /// Finished timelines held until their peer's FIN is known.
    pub fn held(&self) -> usize {
        self.handoffs.held()
    }

    /// The options it was made with (as adjusted by `new`).
    pub fn options(&self) -> CorrelatorOptions {
        self.opts
    }

    /// Sockets currently followed (listeners included).
    pub fn tracked(&self) -> usize {
        self.index.len()
    }

    /// The table's figures for an exit summary.
    pub fn tracking(&self) -> crate::model::table::Tracking {
        crate::model::table::Tracking {
            evicted: self.stats.evicted,
            peak: self.stats.peak_tracked,
            limit: self.opts.max_sockets,
            at_exit: self.tracked(),
            // Counted by whoever sweeps the table.
            stale: 0,
        }
    }

    /// Closed sockets waiting out their grace period.
    pub fn closing(&self) -> usize {
        self.closing.len()
    }

    /// Connections currently open (followed, not listening, not closed).
    pub fn open_connections(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|t| !t.listener && !t.closed)
            .count()
    }

    fn track_mut(&mut self, skaddr: u64) -> Option<&mut Track> {
        let slot = *self.index.get(&skaddr)?;
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    fn remove_slot(&mut self, slot: u32) -> Option<Track> {
        let track = self.slots.get_mut(slot as usize)?.take()?;
        self.index.remove(&track.skaddr);
        self.free.push(slot);
        Some(track)
    }

    fn insert(&mut self, mut track: Track) -> u32 {
        if let Some(&old) = self.index.get(&track.skaddr) {
            self.remove_slot(old);
        }
        while self.index.len() >= self.opts.max_sockets {
            if !self.evict_oldest() {
                break;
            }
        }
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        track.gen = gen;
        let skaddr = track.skaddr;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(track);
                slot
            }
            None => {
                self.slots.push(Some(track));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(skaddr, slot);
        self.stats.peak_tracked = self.stats.peak_tracked.max(self.index.len());
        self.order.push_back((slot, gen));
        // Stale pairs are compacted away once they outnumber the live
        // sockets (amortized O(1) a push), so the queue follows what is
        // tracked, not `max_sockets`: under churn almost every pair goes
        // stale within milliseconds.
        if self.order.len() > 2 * self.index.len() + 1024 {
            let slots = &self.slots;
            self.order.retain(|(s, g)| {
                slots
                    .get(*s as usize)
                    .and_then(|t| t.as_ref())
                    .is_some_and(|t| t.gen == *g)
            });
            if self.order.capacity() > 4 * self.order.len() + 4096 {
                self.order.shrink_to(2 * self.order.len() + 1024);
            }
        }
        slot
    }

    fn evict_oldest(&mut self) -> bool {
        while let Some((slot, gen)) = self.order.pop_front() {
            let live = self
                .slots
                .get(slot as usize)
                .and_then(|t| t.as_ref())
                .is_some_and(|t| t.gen == gen);
            if live {
                if let Some(track) = self.remove_slot(slot).filter(|t| !t.closed) {
                    self.evicted.insert(track.skaddr);
                }
                self.stats.evicted += 1;
                return true;
            }
        }
        false
    }

    /// Takes one event; finished timelines are appended to `out`, in the
    /// order their sockets closed.
    pub fn push(&mut self, r: &Record, out: &mut Vec<Timeline>) {
        self.stats.events += 1;
        self.traced_since_ns.get_or_insert(r.ts_ns());
        let mut done = std::mem::take(&mut self.finished);
        match r {
            Record::State(t) => self.transition(t, &mut done),
            Record::Socket(s) => self.socket_event(s),
        }
        self.finish_closed(r.ts_ns(), &mut done);
        self.release_in_order(r.ts_ns(), done, out);
    }

    /// Finishes the timelines whose grace period ended before `now_ns`, and
    /// the held ones that are settled by now (asking the kernel, live, about
    /// those whose check is due: one batch per call), in close order.
    pub fn advance(&mut self, now_ns: u64, out: &mut Vec<Timeline>) {
        let mut done = std::mem::take(&mut self.finished);
        self.finish_closed(now_ns, &mut done);
        self.handoffs
            .advance(now_ns, self.lookup.as_deref_mut(), &mut done);
        self.release_in_order(now_ns, done, out);
    }

    /// Moves finished timelines into `in_order`; past its bound the
    /// earliest go out at once.
    fn hold_in_order(&mut self, done: &mut Vec<Timeline>, out: &mut Vec<Timeline>) {
        for timeline in done.drain(..) {
            self.next_seq += 1;
            self.in_order.push(Reverse(ByClose {
                seq: self.next_seq,
                timeline,
            }));
            if self.in_order.len() > self.opts.max_sockets {
                if let Some(Reverse(t)) = self.in_order.pop() {
                    out.push(t.timeline);
                }
            }
        }
    }

    /// Hands out, in close order, the finished timelines that nothing still
    /// to be finished closed before: their grace period is over, and no
    /// held hand-off closed earlier.
    fn release_in_order(&mut self, now_ns: u64, mut done: Vec<Timeline>, out: &mut Vec<Timeline>) {
        let mut due = now_ns.saturating_sub(self.opts.grace_ns);
        if let Some(held) = self.handoffs.oldest_held_ns() {
            due = due.min(held);
        }
        // The usual case: the timelines just finished are due, already in
        // close order, and closed before anything waiting is due. Going
        // through the heap would give the same order, moving each timeline
        // (some 300 bytes) in and out of it.
        let in_order = done.last().is_some_and(|t| t.closed_ns <= due)
            && self
                .in_order
                .peek()
                .is_none_or(|Reverse(w)| w.timeline.closed_ns > due)
            && done.windows(2).all(|w| w[0].closed_ns <= w[1].closed_ns);
        if in_order {
            self.next_seq += done.len() as u64;
            out.append(&mut done);
        } else {
            self.hold_in_order(&mut done, out);
        }
        self.finished = done;
        while self
            .in_order
            .peek()
            .is_some_and(|Reverse(t)| t.timeline.closed_ns <= due)
        {
            if let Some(Reverse(t)) = self.in_order.pop() {
                out.push(t.timeline);
            }
        }
    }

    fn finish_closed(&mut self, now_ns: u64, out: &mut Vec<Timeline>) {
        while let Some(c) = self.closing.front() {
            if now_ns < c.closed_ns.saturating_add(self.opts.grace_ns) {
                break;
            }
            if let Some(c) = self.closing.pop_front() {
                self.finish(c, out);
            }
        }
    }

    /// Drops the entries of sockets evicted or reused since they closed.
    /// Each tracked socket has at most one entry, so this keeps the queue
    /// within twice the cap even when time stalls or runs backwards (a
    /// CLOSE stamped in the future holds up every entry behind it).
    fn compact_closing(&mut self) {
        if self.closing.len() <= 2 * self.opts.max_sockets {
            return;
        }
        let slots = &self.slots;
        self.closing.retain(|c| {
            slots
                .get(c.slot as usize)
                .and_then(|t| t.as_ref())
                .is_some_and(|t| t.gen == c.gen && t.closed)
        });
    }

    /// Finishes every closed socket now (end of input), in close order.
    pub fn flush(&mut self, out: &mut Vec<Timeline>) {
        let mut done = std::mem::take(&mut self.finished);
        while let Some(c) = self.closing.pop_front() {
            self.finish(c, &mut done);
        }
        self.handoffs.flush(self.lookup.as_deref_mut(), &mut done);
        self.hold_in_order(&mut done, out);
        self.finished = done;
        while let Some(Reverse(t)) = self.in_order.pop() {
            out.push(t.timeline);
        }
    }

    fn finish(&mut self, c: PendingClose, out: &mut Vec<Timeline>) {
        // The socket may have been reused (new open) or evicted since.
        let still_this = self
            .slots
            .get(c.slot as usize)
            .and_then(|t| t.as_ref())
            .is_some_and(|t| t.gen == c.gen && t.closed);
        if !still_this {
            return;
        }
        if let Some(track) = self.remove_slot(c.slot) {
            if !track.listener {
                self.stats.timelines += 1;
                let since = self.traced_since_ns.unwrap_or(track.first_ns);
                let t = build_timeline(track, &c, &self.opts, since);
                if t.handed_off && t.close == CloseKind::FinWait2 {
                    // Only the kernel of the socket's own namespace can be
                    // asked about it, where the lookup reaches that one.
                    let checkable = match (&self.lookup, t.netns) {
                        (Some(l), Some(n)) => l.covers(n),
                        _ => false,
                    };
                    self.handoffs.hold(t, checkable, out);
                } else {
                    out.push(t);
                }
            }
        }
    }

    fn transition(&mut self, t: &Transition, out: &mut Vec<Timeline>) {
        // A "transition" to the state the socket is already in (the kernel
        // can set CLOSE on a closed socket) changes nothing, and a track
        // keeps its SYN retransmissions as SYN_SENT → SYN_SENT marks: it is
        // not a step.
        if t.old == t.new {
            return;
        }
        self.note_handoff(t, out);
        let birth = crate::model::owner::is_birth(t.old, t.new);
        // One lookup serves the whole event.
        let mut existing = self.index.get(&t.skaddr).copied();
        // A new open on an address whose previous socket has closed but is
        // still in its grace period: finish the old one first.
        if let (true, Some(slot)) = (birth, existing) {
            let closed_gen = self
                .slots
                .get(slot as usize)
                .and_then(|tr| tr.as_ref())
                .filter(|tr| tr.closed)
                .map(|tr| tr.gen);
            if let Some(gen) = closed_gen {
                // Searched from the newest: an address is mostly reused
                // soon after its socket is freed.
                if let Some(pos) = self
                    .closing
                    .iter()
                    .rposition(|c| c.slot == slot && c.gen == gen)
                {
                    if let Some(c) = self.closing.remove(pos) {
                        self.finish(c, out);
                    }
                }
                existing = self.index.get(&t.skaddr).copied();
            }
        }
        let known = existing
            .and_then(|slot| self.slots.get(slot as usize))
            .and_then(|tr| tr.as_ref());
        let first_sight = known.is_none();
        let has_known = known.is_some_and(|tr| tr.owner.is_some());
        let forgotten = existing.is_none() && !birth && self.evicted.contains(t.skaddr);
        if birth || t.new == TcpState::Close {
            self.evicted.remove(t.skaddr);
        }
        // `None` also where the owner known so far stands.
        let owner = self
            .owners
            .attribute_new(t, has_known, first_sight && !forgotten);
        if forgotten {
            return;
        }
        // First sight in mid-life: a socket older than the trace, whose
        // role only the listener table of the start can tell.
        let before_trace_role = if first_sight && !birth {
            match self.owners.listened_before_trace(&t.local, t.sock.netns) {
                Some(true) => Role::Server,
                Some(false) => Role::Client,
                None => Role::Unknown,
            }
        } else {
            Role::Unknown
        };

        let slot = match existing {
            // A birth on an address still tracked means the kernel freed and
            // reused it without us seeing CLOSE: start over.
            Some(slot) if !birth => slot,
            _ => self.insert(Track {
                skaddr: t.skaddr,
                local: t.local,
                remote: t.remote,
                first_ns: t.ts_ns,
                owner: None,
                steps: StepList::default(),
                marks: Marks::default(),
                netns: t.sock.netns.unwrap_or(0),
                retransmits: 0,
                resets_sent: 0,
                resets_received: 0,
                reset_reason: None,
                gen: 0,
                family: t.family,
                owner_source: OwnerSource::Observed,
                before_trace_role,
                listener: false,
                closed: false,
            }),
        };
        let Some(track) = self.slots.get_mut(slot as usize).and_then(|t| t.as_mut()) else {
            return;
        };
        track.push_step(t.ts_ns, t.old, t.new);
        if let Some(a) = owner {
            track.owner = Some(a.owner);
            track.owner_source = a.source;
        }
        // The connected endpoints are final from ESTABLISHED on (SYN_SENT
        // may still show port 0 before the ephemeral port is chosen).
        if t.remote.port != 0 || track.remote.port == 0 {
            track.local = t.local;
            track.remote = t.remote;
        }
        use TcpState::*;
        let m = &mut track.marks;
        match (t.old, t.new) {
            (FinWait1, FinWait2) => {
                m.have &= !(HAVE_CW_SEGS_OUT | HAVE_LA_SEGS_OUT);
                if let Some(v) = t.sock.segs_in {
                    m.a = v;
                    m.have |= HAVE_FW2_SEGS_IN;
                }
                if let Some(v) = t.sock.rcv_nxt {
                    m.b = v;
                    m.have |= HAVE_FW2_RCV_NXT;
                }
            }
            (Established, CloseWait) => {
                m.have &= !(HAVE_FW2_SEGS_IN | HAVE_FW2_RCV_NXT);
                if let Some(v) = t.sock.segs_out {
                    m.a = v;
                    m.have |= HAVE_CW_SEGS_OUT;
                }
            }
            (CloseWait, LastAck) => {
                if let Some(v) = t.sock.segs_out {
                    m.b = v;
                    m.have |= HAVE_LA_SEGS_OUT;
                }
                if let Some(v) = t.sock.ack_pending {
                    m.la_ack_pending = v;
                    m.have |= HAVE_LA_ACK_PENDING;
                }
            }
            (SynRecv, Established) => {
                if let Some(v) = t.sock.srtt_us {
                    m.est_srtt_us = v;
                    m.have |= HAVE_EST_SRTT;
                }
            }
            _ => {}
        }
        // A listener from before the trace is first seen closing.
        if t.new == Listen || (t.old, t.new) == (Listen, Close) {
            track.listener = true;
        }
        // A second CLOSE of one socket changes nothing: the first one's
        // entry finishes it.
        if t.new == Close && !track.closed {
            track.closed = true;
            self.closing.push_back(PendingClose {
                slot,
                gen: track.gen,
                closed_ns: t.ts_ns,
                last: t.sock,
            });
            self.compact_closing();
        }
    }

    /// What the hand-off bookkeeping needs from a transition: a socket
    /// whose peer's FIN did not come before it closed from FIN_WAIT2 (a
    /// hand-off, if its timeline says so once finished), and a socket whose
    /// own FIN was acknowledged (LAST_ACK → CLOSE without a reset), which
    /// settles its peer's hand-off.
    fn note_handoff(&mut self, t: &Transition, out: &mut Vec<Timeline>) {
        match (t.old, t.new) {
            (TcpState::FinWait2, TcpState::Close) => {
                let fin_received = self.track_mut(t.skaddr).map(|tr| {
                    let m = &tr.marks;
                    m.have & HAVE_FW2_RCV_NXT != 0 && t.sock.rcv_nxt.is_some_and(|r| r != m.b)
                });
                if fin_received == Some(false) {
                    self.handoffs.handed_off(&t.local, &t.remote, t.ts_ns);
                }
            }
            (TcpState::LastAck, TcpState::Close) => {
                let reset = t.sock.sk_err == Some(ECONNRESET)
                    || self
                        .track_mut(t.skaddr)
                        .is_some_and(|tr| tr.resets_received > 0);
                if !reset {
                    self.handoffs
                        .peer_fin_acked(&t.local, &t.remote, t.ts_ns, out);
                }
            }
            _ => {}
        }
    }

    fn socket_event(&mut self, s: &SocketEvent) {
        if self.track_mut(s.skaddr).is_none() {
            // A reset sent for no socket (a SYN to a closed port) belongs
            // to no timeline, and was not missed.
            if s.skaddr != 0 {
                self.stats.orphan_events += 1;
            }
            return;
        }
        let first_use = (s.kind == SocketEventKind::FirstUse).then(|| self.owners.first_use(s));
        let Some(track) = self.track_mut(s.skaddr) else {
            return;
        };
        match s.kind {
            SocketEventKind::FirstUse => {
                if let Some(a) = first_use {
                    track.owner = Some(a.owner);
                    track.owner_source = a.source;
                }
            }
            SocketEventKind::Retransmit => {
                track.retransmits = track.retransmits.saturating_add(1);
                track.push_syn_retransmit(s.ts_ns);
            }
            SocketEventKind::SendReset => {
                track.resets_sent = track.resets_sent.saturating_add(1);
                if track.reset_reason.is_none() {
                    track.reset_reason = s.reset.and_then(|r| r.reason);
                }
            }
            SocketEventKind::ReceiveReset => {
                track.resets_received = track.resets_received.saturating_add(1)
            }
        }
    }
}

fn find(steps: &[Step], old: TcpState, new: TcpState) -> Option<&Step> {
    steps.iter().find(|s| s.old == old && s.new == new)
}

fn has(steps: &[Step], old: TcpState, new: TcpState) -> bool {
    find(steps, old, new).is_some()
}

fn build_timeline(
    tr: Track,
    c: &PendingClose,
    opts: &CorrelatorOptions,
    traced_since_ns: u64,
) -> Timeline {
    use TcpState::*;
    let closed_ns = c.closed_ns;
    let last_fields = c.last;
    let steps_owned = tr.steps();
    let steps = &steps_owned;
    let m = tr.marks;
    let first_ns = tr.first_ns;
    let error = last_fields.sk_err.filter(|e| *e != 0);

    let active = has(steps, Close, SynSent);
    let passive = has(steps, Listen, SynRecv);
    let established = steps.iter().find(|s| s.new == Established).map(|s| s.ts_ns);
    let open = if active {
        match established {
            Some(_) => OpenKind::Active,
            None if tr.resets_received > 0 || error == Some(ECONNREFUSED) => OpenKind::Refused,
            None if error == Some(ETIMEDOUT) => OpenKind::TimedOut,
            None => OpenKind::Failed,
        }
    } else if passive {
        match established {
            Some(_) => OpenKind::Passive,
            None => OpenKind::PassiveFailed,
        }
    } else {
        OpenKind::BeforeTrace
    };
    let role = match open {
        OpenKind::Active | OpenKind::Refused | OpenKind::TimedOut | OpenKind::Failed => {
            Role::Client
        }
        OpenKind::Passive | OpenKind::PassiveFailed => Role::Server,
        OpenKind::BeforeTrace => tr.before_trace_role,
    };
    let syn_retransmits_ns = tr.syn_retransmits_ns();
    let connect_failure = (active && established.is_none()).then(|| {
        ConnectFailure::classify(
            error,
            tr.resets_received,
            last_fields.segs_out,
            tr.local.port,
        )
    });
    let handshake_ns = match (open, established) {
        (OpenKind::Active, Some(e)) => {
            find(steps, Close, SynSent).map(|s| e.saturating_sub(s.ts_ns))
        }
        // A passive socket is created only when the final ACK arrives (the
        // SYN and SYN/ACK are handled by a request socket, which has no
        // transitions), so SYN_RECV → ESTABLISHED takes microseconds. The
        // kernel's first RTT sample, SYN/ACK sent to ACK received, is the
        // server's view of the handshake.
        (OpenKind::Passive, Some(_)) if m.have & HAVE_EST_SRTT != 0 && m.est_srtt_us > 0 => {
            Some(u64::from(m.est_srtt_us) * 1000)
        }
        _ => None,
    };

    let last = steps.last().copied();
    let before_close = last.map(|s| s.old);
    let fin_wait1 = steps.iter().any(|s| s.new == FinWait1);
    let close_wait = steps.iter().any(|s| s.new == CloseWait);
    let simultaneous = has(steps, FinWait1, Closing);

    let mut teardown_segments = None;
    let mut timewait = None;
    let mut handed_off = false;
    let (close, closed_by) = if established.is_none() && open != OpenKind::BeforeTrace {
        (CloseKind::NeverOpened, None)
    } else if simultaneous {
        if tr.resets_received > 0 {
            (CloseKind::ResetReceived, Some(Closer::Both))
        } else {
            timewait = Some(TimewaitSubstate::TimeWait);
            (CloseKind::Simultaneous, Some(Closer::Both))
        }
    } else if fin_wait1 {
        // We closed first.
        if tr.resets_received > 0 {
            (CloseKind::ResetReceived, Some(Closer::Local))
        } else if before_close == Some(FinWait2) {
            let fw2 = find(steps, FinWait1, FinWait2);
            // A FIN takes one sequence number: rcv_nxt moved between
            // FIN_WAIT2 and CLOSE iff the peer's FIN arrived. (sk_shutdown
            // cannot tell: close() sets RCV_SHUTDOWN on our own socket.)
            let fin_received = match (m.have & HAVE_FW2_RCV_NXT != 0, last_fields.rcv_nxt) {
                (true, Some(b)) => Some(m.b != b),
                _ => None,
            };
            let same_segment = match (m.have & HAVE_FW2_SEGS_IN != 0, last_fields.segs_in) {
                (true, Some(b)) => Some(m.a == b),
                _ => None,
            };
            match fin_received {
                Some(true) => {
                    // TIME_WAIT. One segment between the two transitions
                    // means the peer's ACK and FIN were one segment.
                    timewait = Some(TimewaitSubstate::TimeWait);
                    teardown_segments = same_segment.map(|same| if same { 3 } else { 4 });
                    (CloseKind::Orderly, Some(Closer::Local))
                }
                Some(false) if tr.resets_sent > 0 => {
                    (CloseKind::FinWait2Timeout, Some(Closer::Local))
                }
                Some(false) => {
                    let waited = match (fw2, last) {
                        (Some(f), Some(l)) => l.ts_ns.saturating_sub(f.ts_ns),
                        _ => 0,
                    };
                    // Orphaned socket, bare ACK: handed at once to a
                    // FIN_WAIT2 timewait socket, which waits for the peer's
                    // FIN. Otherwise it sat in FIN_WAIT2 until the timer.
                    timewait = Some(TimewaitSubstate::FinWait2);
                    if same_segment == Some(true) && waited < 1_000_000_000 {
                        handed_off = true;
                        (CloseKind::FinWait2, Some(Closer::Local))
                    } else {
                        (CloseKind::FinWait2Timeout, Some(Closer::Local))
                    }
                }
                None => (CloseKind::Unknown, Some(Closer::Local)),
            }
        } else if tr.resets_sent > 0 {
            (CloseKind::ResetSent, Some(Closer::Local))
        } else if error.is_some() {
            (CloseKind::Error, Some(Closer::Local))
        } else {
            (CloseKind::Unknown, Some(Closer::Local))
        }
    } else if close_wait {
        // The peer closed first.
        if tr.resets_received > 0 {
            (CloseKind::ResetReceived, Some(Closer::Peer))
        } else if before_close == Some(LastAck) {
            teardown_segments = if m.have & HAVE_LA_ACK_PENDING != 0 {
                Some(if m.la_ack_pending { 3 } else { 4 })
            } else if m.have & (HAVE_CW_SEGS_OUT | HAVE_LA_SEGS_OUT)
                == HAVE_CW_SEGS_OUT | HAVE_LA_SEGS_OUT
            {
                Some(if m.a == m.b { 3 } else { 4 })
            } else {
                None
            };
            (CloseKind::Orderly, Some(Closer::Peer))
        } else if tr.resets_sent > 0 {
            (CloseKind::Aborted, Some(Closer::Peer))
        } else if error.is_some() {
            (CloseKind::Error, Some(Closer::Peer))
        } else {
            (CloseKind::Unknown, Some(Closer::Peer))
        }
    } else if tr.resets_received > 0 {
        (CloseKind::ResetReceived, Some(Closer::Peer))
    } else if tr.resets_sent > 0 {
        (CloseKind::Aborted, Some(Closer::Local))
    } else if error.is_some() {
        let by = if error == Some(ECONNRESET) {
            Closer::Peer
        } else {
            Closer::Local
        };
        (CloseKind::Error, Some(by))
    } else {
        (CloseKind::Unknown, None)
    };

    // The kernel's byte counters count sequence space: an acknowledged SYN
    // (ours, when we connected) and FIN each take one, a received FIN one.
    // What the applications sent and read is the rest.
    let syn_acked = u64::from(role == Role::Client);
    let our_fin_acked = u64::from(
        has(steps, FinWait1, FinWait2) || has(steps, Closing, Close) || has(steps, LastAck, Close),
    );
    let peer_fin = u64::from(
        close_wait
            || simultaneous
            || (close == CloseKind::Orderly && closed_by == Some(Closer::Local)),
    );
    let bytes_sent = last_fields
        .bytes_acked
        .map(|b| b.saturating_sub(syn_acked + our_fin_acked));
    let bytes_received = last_fields
        .bytes_received
        .map(|b| b.saturating_sub(peer_fin));

    let timewait = timewait.map(|substate| Timewait {
        substate,
        hold_ns: match substate {
            TimewaitSubstate::TimeWait => opts.time_wait_ns,
            TimewaitSubstate::FinWait2 => opts.fin_timeout_ns,
        },
    });

    Timeline {
        skaddr: tr.skaddr,
        family: tr.family,
        local: tr.local,
        remote: tr.remote,
        netns: Some(tr.netns).filter(|n| *n != 0),
        owner: tr.owner.map(|owner| Attribution {
            owner,
            source: tr.owner_source,
        }),
        role,
        open,
        first_ns: if open == OpenKind::BeforeTrace {
            first_ns.min(traced_since_ns)
        } else {
            first_ns
        },
        established_ns: established,
        closed_ns,
        handshake_ns,
        close,
        closed_by,
        teardown_segments,
        timewait,
        handed_off,
        error,
        connect_failure,
        syn_retransmits_ns,
        bytes_sent,
        bytes_received,
        srtt_us: last_fields.srtt_us,
        retransmits: tr.retransmits,
        total_retrans: last_fields.total_retrans,
        resets_sent: u32::from(tr.resets_sent),
        resets_received: u32::from(tr.resets_received),
        reset_reason: tr.reset_reason,
        steps: steps_owned,
    }
}

/// Open sockets of tcpwatch's own namespace whose close may have been lost
/// (see `sweep`); the mark is the track's generation and step count.
impl crate::model::sweep::SweepTable for Correlator {
    fn unlisted(&self, kernel: &crate::model::sweep::KernelSockets) -> Vec<(u64, u64)> {
        let Some(own) = self.owners.own_netns() else {
            return Vec::new();
        };
        self.slots
            .iter()
            .flatten()
            .filter(|t| !t.closed && t.netns == own)
            .filter_map(|t| {
                let key = crate::model::sweep::endpoints_key(&t.local, &t.remote);
                (key != 0 && !kernel.lists(key)).then(|| (t.skaddr, track_mark(t)))
            })
            .collect()
    }

    fn drop_unchanged(&mut self, skaddr: u64, mark: u64) -> bool {
        let Some(&slot) = self.index.get(&skaddr) else {
            return false;
        };
        let unchanged = self
            .slots
            .get(slot as usize)
            .and_then(|t| t.as_ref())
            .is_some_and(|t| !t.closed && track_mark(t) == mark);
        if unchanged {
            self.remove_slot(slot);
        }
        unchanged
    }
}

fn track_mark(t: &Track) -> u64 {
    (u64::from(t.gen) << 32) | t.steps.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decode::tests::state_event;
    use crate::model::decode::{decode, encode};
    use std::collections::HashMap;
    use tcpwatch_common::{kind, valid, Event, RCV_SHUTDOWN};
    use TcpState::*;

    /// Builds event sequences for one socket the way the kernel would.
    struct Sock {
        sk: u64,
        pid: u32,
        rcv_nxt: u32,
        segs_in: u32,
        segs_out: u32,
        events: Vec<Event>,
    }

    impl Sock {
        fn new(sk: u64, pid: u32) -> Sock {
            Sock {
                sk,
                pid,
                rcv_nxt: 1000,
                segs_in: 0,
                segs_out: 0,
                events: Vec::new(),
            }
        }

        fn step(&mut self, ts_us: u64, old: TcpState, new: TcpState) -> &mut Event {
            let mut e = state_event(self.sk, old, new, ts_us * 1000);
            e.pid = self.pid;
            e.valid = valid::SEGS_IN
                | valid::SEGS_OUT
                | valid::SHUTDOWN
                | valid::ACK_PENDING
                | valid::SK_ERR
                | valid::RCV_NXT;
            e.segs_in = self.segs_in;
            e.segs_out = self.segs_out;
            e.rcv_nxt = self.rcv_nxt;
            // close() sets both shutdown bits on our own socket.
            e.sk_shutdown = RCV_SHUTDOWN | tcpwatch_common::SEND_SHUTDOWN;
            self.events.push(e);
            self.events.last_mut().unwrap()
        }

        fn reset(&mut self, ts_us: u64, k: u8) {
            let mut e = Event::zeroed();
            e.kind = k;
            e.skaddr = self.sk;
            e.ts_ns = ts_us * 1000;
            self.events.push(e);
        }

        fn run(&self) -> Vec<Timeline> {
            run_all(&[self])
        }
    }

    fn run_all(socks: &[&Sock]) -> Vec<Timeline> {
        let mut evs: Vec<Event> = socks.iter().flat_map(|s| s.events.clone()).collect();
        evs.sort_by_key(|e| e.ts_ns);
        let mut c = Correlator::new(CorrelatorOptions::default(), None, None);
        let mut out = Vec::new();
        for e in &evs {
            c.push(&decode(&encode(e)).unwrap(), &mut out);
        }
        c.flush(&mut out);
        out
    }

    fn active_open(s: &mut Sock) {
        s.step(0, Close, SynSent);
        s.segs_in += 1;
        s.segs_out += 2;
        s.step(100, SynSent, Established);
    }

    #[test]
    fn client_closes_first_four_segments() {
        let mut s = Sock::new(1, 10);
        active_open(&mut s);
        s.step(1000, Established, FinWait1);
        s.segs_in += 1; // bare ACK
        s.step(1050, FinWait1, FinWait2);
        s.segs_in += 1; // FIN, 40 ms later
        s.rcv_nxt += 1;
        s.step(41_000, FinWait2, Close);
        let t = &s.run()[0];
        assert_eq!(t.open, OpenKind::Active);
        assert_eq!(t.role, Role::Client);
        assert_eq!(t.handshake_ns, Some(100_000));
        assert_eq!(t.close, CloseKind::Orderly);
        assert_eq!(t.closed_by, Some(Closer::Local));
        assert_eq!(t.teardown_segments, Some(4));
        assert_eq!(t.timewait.unwrap().substate, TimewaitSubstate::TimeWait);
        assert_eq!(t.timewait.unwrap().hold_ns, 60_000_000_000);
        assert_eq!(t.owner.as_ref().unwrap().owner.pid, 10);
        assert_eq!(t.lifetime_ns(), 41_000_000);
    }

    #[test]
    fn peer_ack_riding_on_its_fin_is_three_segments() {
        let mut s = Sock::new(1, 10);
        active_open(&mut s);
        s.step(1000, Established, FinWait1);
        s.segs_in += 1; // one segment: ACK + FIN
        s.step(1100, FinWait1, FinWait2);
        s.rcv_nxt += 1;
        s.step(1101, FinWait2, Close);
        let t = &s.run()[0];
        assert_eq!(t.close, CloseKind::Orderly);
        assert_eq!(t.teardown_segments, Some(3));
        assert_eq!(t.timewait.unwrap().substate, TimewaitSubstate::TimeWait);
    }

    #[test]
    fn orphan_with_bare_ack_goes_to_fin_wait2_timewait() {
        let mut s = Sock::new(1, 10);
        active_open(&mut s);
        s.step(1000, Established, FinWait1);
        s.segs_in += 1;
        s.step(1100, FinWait1, FinWait2);
        s.step(1101, FinWait2, Close); // no FIN received: rcv_nxt unchanged
        let t = &s.run()[0];
        assert_eq!(t.close, CloseKind::FinWait2);
        assert_eq!(t.teardown_segments, None);
        assert_eq!(t.timewait.unwrap().substate, TimewaitSubstate::FinWait2);
    }

    /// A server socket (port 80) that closes first, orphaned, and gets the
    /// client's bare ACK: handed to a FIN_WAIT2 timewait socket at 1.101 ms.
    fn handed_off_server(sk: u64) -> Sock {
        let mut s = Sock::new(sk, 20);
        s.step(0, Listen, SynRecv);
        s.step(50, SynRecv, Established);
        s.step(1000, Established, FinWait1);
        s.segs_in += 1; // the bare ACK
        s.step(1100, FinWait1, FinWait2);
        s.step(1101, FinWait2, Close).bytes_received = 300;
        s.events.last_mut().unwrap().valid |= valid::BYTES_RECEIVED;
        s
    }

    /// Its client, which reads EOF, closes at `close_us` and has its FIN
    /// acknowledged by the timewait socket 10 µs later.
    fn client_of(sk: u64, close_us: u64) -> Sock {
        let mut c = Sock::new(sk, 30);
        active_open(&mut c);
        c.step(1050, Established, CloseWait);
        c.step(close_us, CloseWait, LastAck);
        c.step(close_us + 10, LastAck, Close);
        for e in &mut c.events {
            std::mem::swap(&mut e.sport, &mut e.dport);
            std::mem::swap(&mut e.saddr, &mut e.daddr);
        }
        c
    }

    fn assert_time_wait_four(t: &Timeline) {
        assert_eq!(
            (t.close, t.closed_by, t.teardown_segments),
            (CloseKind::Orderly, Some(Closer::Local), Some(4)),
            "{t:?}"
        );
        assert_eq!(t.timewait.unwrap().substate, TimewaitSubstate::TimeWait);
        assert!(t.handed_off);
        // The peer's FIN reached the timewait socket, not this one.
        assert_eq!(t.bytes_received, Some(300));
    }

    #[test]
    fn handed_off_socket_is_settled_by_its_peers_fin() {
        // The client closes after the server's grace period (its timeline
        // is held by then), and within it.
        for close_us in [50_000, 1_105] {
            let out = run_all(&[&handed_off_server(1), &client_of(2, close_us)]);
            let server = out.iter().find(|t| t.skaddr == 1).unwrap();
            assert_time_wait_four(server);
        }
    }

    #[test]
    fn dual_stack_server_is_settled_by_its_ipv4_peer() {
        // The server's socket is IPv6 and sees its client's address as
        // ::ffff:127.0.0.2; the client's own socket is IPv4.
        let mut server = handed_off_server(1);
        for e in &mut server.events {
            e.family = tcpwatch_common::AF_INET6;
            for a in [&mut e.saddr, &mut e.daddr] {
                let v4 = [a[0], a[1], a[2], a[3]];
                *a = std::net::Ipv4Addr::from(v4).to_ipv6_mapped().octets();
            }
        }
        let out = run_all(&[&server, &client_of(2, 50_000)]);
        assert_time_wait_four(out.iter().find(|t| t.skaddr == 1).unwrap());
    }

    #[test]
    fn peer_fin_seen_before_the_hand_off_still_counts() {
        // The client's LAST_ACK → CLOSE reached the ring first (two CPUs).
        let mut client = client_of(2, 1_090);
        client.events.last_mut().unwrap().ts_ns = 1_100_500;
        let out = run_all(&[&handed_off_server(1), &client]);
        assert_time_wait_four(out.iter().find(|t| t.skaddr == 1).unwrap());
    }

    #[test]
    fn peer_reset_is_not_a_fin() {
        let mut client = client_of(2, 6_000);
        client.events.last_mut().unwrap().sk_err = ECONNRESET;
        let out = run_all(&[&handed_off_server(1), &client]);
        let server = out.iter().find(|t| t.skaddr == 1).unwrap();
        assert_eq!(server.close, CloseKind::FinWait2);
        assert!(server.handed_off);
    }

    /// Answers lookups from a list (one answer per call, the last one
    /// repeated) and counts the sockets asked about.
    struct Kernel {
        answers: Vec<Option<TimewaitSubstate>>,
        asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl TimewaitLookup for Kernel {
        /// The namespace the test's events are in.
        fn covers(&self, netns: u32) -> bool {
            netns == 5
        }

        fn lookup(
            &mut self,
            _netns: u32,
            sockets: &[(Endpoint, Endpoint)],
        ) -> Result<Vec<Option<TimewaitSubstate>>, String> {
            let n = self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let a = self.answers[n.min(self.answers.len() - 1)];
            Ok(vec![a; sockets.len()])
        }
    }

    /// Feeds the handed-off server alone, with a kernel giving `answers`,
    /// advancing time to each `at_ms`: what came out by then.
    fn with_kernel(
        answers: &[Option<TimewaitSubstate>],
        at_ms: &[u64],
    ) -> (Vec<Vec<Timeline>>, usize) {
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut c = Correlator::new(CorrelatorOptions::default(), None, Some(5));
        c.set_timewait_lookup(Box::new(Kernel {
            answers: answers.to_vec(),
            asked: asked.clone(),
        }));
        let mut out = Vec::new();
        for e in &handed_off_server(1).events {
            let mut e = *e;
            e.valid |= valid::NETNS;
            e.netns = 5;
            c.push(&decode(&encode(&e)).unwrap(), &mut out);
        }
        let mut seen = Vec::new();
        for ms in at_ms {
            c.advance(1_101_000 + ms * 1_000_000, &mut out);
            seen.push(std::mem::take(&mut out));
        }
        (seen, asked.load(std::sync::atomic::Ordering::SeqCst))
    }

    #[test]
    fn timelines_come_out_in_close_order_when_an_address_is_reused() {
        // `a` closes first; `b` closes later and its address is reused at
        // once (a server that closes first frees its socket at once), which
        // finishes `b` before `a`'s grace period is over.
        let mut a = Sock::new(1, 1);
        active_open(&mut a);
        a.step(1000, Established, Close);
        let mut b = Sock::new(2, 1);
        active_open(&mut b);
        b.step(2000, Established, Close);
        let mut b2 = Sock::new(2, 1);
        b2.step(3000, Close, SynSent);
        let mut evs: Vec<Event> = [&a, &b, &b2]
            .iter()
            .flat_map(|s| s.events.clone())
            .collect();
        evs.sort_by_key(|e| e.ts_ns);
        let mut c = Correlator::new(CorrelatorOptions::default(), None, None);
        let mut out = Vec::new();
        for e in &evs {
            c.push(&decode(&encode(e)).unwrap(), &mut out);
        }
        assert!(out.is_empty(), "{} finished before their turn", out.len());
        c.advance(100_000_000, &mut out);
        let order: Vec<(u64, u64)> = out.iter().map(|t| (t.skaddr, t.closed_ns)).collect();
        assert_eq!(order, [(1, 1_000_000), (2, 2_000_000)]);
        // The same through flush.
        let flushed = run_all(&[&a, &b, &b2]);
        let order: Vec<u64> = flushed.iter().map(|t| t.closed_ns).collect();
        assert_eq!(order, [1_000_000, 2_000_000]);
    }

    #[test]
    fn eviction_queue_follows_the_live_sockets_not_the_limit() {
        // Short-lived sockets one after another under the default limit
        // (262,144): the queue of insertion order must not keep a pair per
        // socket ever seen until that limit.
        let mut c = Correlator::new(CorrelatorOptions::default(), None, None);
        let mut out = Vec::new();
        let mut peak = 0;
        for i in 0..20_000u64 {
            let mut s = Sock::new(0x1000 + i, 1);
            active_open(&mut s);
            s.step(1000, Established, Close);
            // One a millisecond: about 20 are live (the grace period).
            for ev in &mut s.events {
                ev.ts_ns += i * 1_000_000;
                c.push(&decode(&encode(ev)).unwrap(), &mut out);
            }
            peak = peak.max(c.index.len());
            assert!(
                c.order.len() <= 4 * peak + 1024,
                "{} pairs for at most {peak} live sockets",
                c.order.len()
            );
        }
        assert!(peak < 100, "{peak}");
        assert!(c.order.capacity() <= 8 * 1024, "{}", c.order.capacity());
        assert!(out.len() > 19_000, "{}", out.len());
    }

    #[test]
    fn timelines_held_for_order_stay_bounded() {
        // Time stands still while addresses are reused: past max_sockets
        // held, the earliest go out.
        let max = 4;
        let opts = CorrelatorOptions {
            max_sockets: max,
            ..CorrelatorOptions::default()
        };
        let mut c = Correlator::new(opts, None, None);
        let mut out = Vec::new();
        for i in 0..20u64 {
            let mut s = Sock::new(100, 1);
            active_open(&mut s);
            s.step(1000, Established, Close);
            let mut e = s.events.clone();
            for ev in &mut e {
                ev.ts_ns = 1000 + i;
            }
            for ev in &e {
                c.push(&decode(&encode(ev)).unwrap(), &mut out);
            }
            assert!(c.in_order.len() <= max, "{}", c.in_order.len());
        }
        c.flush(&mut out);
        assert_eq!(out.len(), 20);
        assert!(out.windows(2).all(|w| w[0].closed_ns <= w[1].closed_ns));
    }

    #[test]
    fn a_held_hand_off_keeps_its_place_in_close_order() {
        // The hand-off closes at 1.101 ms and waits for its peer's FIN (no
        // peer on this host, no kernel to ask: up to the last check); a
        // client of another 4-tuple closes at 2.1 ms and waits behind it.
        let mut other = Sock::new(3, 10);
        active_open(&mut other);
        other.step(2000, Established, FinWait1);
        other.segs_in += 1;
        other.step(2050, FinWait1, FinWait2);
        other.segs_in += 1;
        other.rcv_nxt += 1;
        other.step(2100, FinWait2, Close);
        for e in &mut other.events {
            e.sport = 41000;
        }
        let mut evs: Vec<Event> = [&handed_off_server(1), &other]
            .iter()
            .flat_map(|s| s.events.clone())
            .collect();
        evs.sort_by_key(|e| e.ts_ns);
        let mut c = Correlator::new(CorrelatorOptions::default(), None, None);
        let mut out = Vec::new();
        for e in &evs {
            c.push(&decode(&encode(e)).unwrap(), &mut out);
        }
        c.advance(500_000_000, &mut out);
        assert!(out.is_empty(), "came out before the hand-off: {out:?}");
        assert_eq!(c.held(), 1);
        c.advance(1_101_000 + 1_000_000_000, &mut out);
        let order: Vec<(u64, CloseKind)> = out.iter().map(|t| (t.skaddr, t.close)).collect();
        assert_eq!(
            order,
            [(1, CloseKind::FinWait2), (3, CloseKind::Orderly)],
            "in close order once the hand-off is settled"
        );
        // Settled by its peer's FIN, the same order.
        let out = run_all(&[&handed_off_server(1), &client_of(2, 50_000), &other]);
        let order: Vec<u64> = out.iter().map(|t| t.skaddr).collect();
        assert_eq!(order, [1, 3, 2], "{out:?}");
        assert_time_wait_four(&out[0]);
    }

    #[test]
    fn kernel_listing_time_wait_settles_a_hand_off() {
        let (seen, asked) = with_kernel(&[Some(TimewaitSubstate::TimeWait)], &[10, 60]);
        assert!(seen[0].is_empty(), "held until the first check");
        assert_eq!(seen[1].len(), 1);
        assert_time_wait_four(&seen[1][0]);
        assert_eq!(asked, 1);
    }

    #[test]
    fn socket_still_in_fin_wait2_at_the_last_check_is_fin_wait2() {
        let fw2 = Some(TimewaitSubstate::FinWait2);
        let (seen, asked) = with_kernel(&[fw2], &[60, 400, 900, 1_100]);
        assert!(seen[..3].iter().all(|s| s.is_empty()), "{seen:?}");
        let t = &seen[3][0];
        assert_eq!((t.close, t.teardown_segments), (CloseKind::FinWait2, None));
        assert_eq!(t.timewait.unwrap().substate, TimewaitSubstate::FinWait2);
        assert_eq!(asked, 3);
        // The peer's FIN came between two checks.
        let (seen, _) = with_kernel(&[fw2, Some(TimewaitSubstate::TimeWait)], &[60, 400]);
        assert_time_wait_four(&seen[1][0]);
    }

    #[test]
    fn timewait_socket_gone_means_no_timewait() {
        let (seen, _) = with_kernel(&[None], &[60]);
        let t = &seen[0][0];
        assert_eq!((t.close, t.timewait), (CloseKind::FinWait2, None));
    }

    #[test]
    fn without_a_kernel_or_a_peer_the_hand_off_waits_out_the_checks() {
        let mut c = Correlator::new(CorrelatorOptions::default(), None, None);
        let mut out = Vec::new();
        for e in &handed_off_server(1).events {
            c.push(&decode(&encode(e)).unwrap(), &mut out);
        }
        c.advance(1_101_000 + 999_000_000, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.held(), 1);
        c.advance(1_101_000 + 1_000_000_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].close, CloseKind::FinWait2);
        assert_eq!(c.held(), 0);
        assert_eq!(c.stats().handoffs.fin_wait2, 1);
    }

    #[test]
    fn held_hand_offs_are_bounded() {
        let mut c = Correlator::new(
            CorrelatorOptions {
                max_sockets: 4,
                ..CorrelatorOptions::default()
            },
            None,
            None,
        );
        let mut out = Vec::new();
        for sk in 0..10u64 {
            let mut s = handed_off_server(sk + 1);
            for e in &mut s.events {
                e.dport = 1000 + sk as u16;
                e.ts_ns += sk * 1_000;
            }
            for e in &s.events {
                c.push(&decode(&encode(e)).unwrap(), &mut out);
            }
            c.advance(s.events.last().unwrap().ts_ns + 30_000_000, &mut out);
            assert!(c.held() <= 4);
        }
        c.flush(&mut out);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn server_passive_close_with_and_without_piggybacked_ack() {
        for (pending, segments) in [(true, 3), (false, 4)] {
            let mut s = Sock::new(2, 20);
            s.step(0, Listen, SynRecv);
            s.segs_in += 1;
            // srtt_us is already shifted by the kernel program.
            s.step(50, SynRecv, Established).srtt_us = 50;
            s.events.last_mut().unwrap().valid |= valid::SRTT;
            s.segs_in += 1;
            s.step(500, Established, CloseWait);
            if !pending {
                s.segs_out += 1;
            }
            s.step(600, CloseWait, LastAck).ack_pending = u8::from(pending) * 2;
            s.segs_in += 1;
            s.step(700, LastAck, Close);
            let t = &s.run()[0];
            assert_eq!(t.open, OpenKind::Passive);
            assert_eq!(t.role, Role::Server);
            assert_eq!(t.handshake_ns, Some(50_000));
            assert_eq!(t.close, CloseKind::Orderly);
            assert_eq!(t.closed_by, Some(Closer::Peer));
            assert_eq!(t.teardown_segments, Some(segments), "ack pending {pending}");
            assert_eq!(t.timewait, None);
        }
    }

    #[test]
    fn simultaneous_close() {
        let mut s = Sock::new(3, 1);
        active_open(&mut s);
        s.step(1000, Established, FinWait1);
        s.step(1010, FinWait1, Closing);
        s.step(1020, Closing, Close);
        let t = &s.run()[0];
        assert_eq!(t.close, CloseKind::Simultaneous);
        assert_eq!(t.closed_by, Some(Closer::Both));
        assert_eq!(t.timewait.unwrap().substate, TimewaitSubstate::TimeWait);
    }

    #[test]
    fn abortive_close_and_reset_received() {
        // SO_LINGER 0: CLOSE first, then the RST.
        let mut a = Sock::new(4, 1);
        active_open(&mut a);
        a.step(1000, Established, Close);
        a.reset(1001, kind::SEND_RESET);
        let rst = a.events.last_mut().unwrap();
        rst.reset_reason = ResetReason::TCP_STATE.0;
        rst.valid |= valid::RESET_REASON;
        // Only the first reset's reason is kept.
        a.reset(1002, kind::SEND_RESET);
        let second = a.events.last_mut().unwrap();
        second.reset_reason = ResetReason::NO_SOCKET.0;
        second.valid |= valid::RESET_REASON;
        // The peer receives the RST.
        let mut b = Sock::new(5, 2);
        b.step(0, Listen, SynRecv);
        b.step(50, SynRecv, Established);
        b.reset(1100, kind::RECEIVE_RESET);
        b.step(1101, Established, Close).sk_err = ECONNRESET;
        let out = run_all(&[&a, &b]);
        let ta = out.iter().find(|t| t.skaddr == 4).unwrap();
        let tb = out.iter().find(|t| t.skaddr == 5).unwrap();
        assert_eq!(
            (ta.close, ta.closed_by),
            (CloseKind::Aborted, Some(Closer::Local))
        );
        assert_eq!(ta.resets_sent, 2);
        assert_eq!(ta.reset_reason, Some(ResetReason::TCP_STATE));
        assert_eq!(tb.reset_reason, None, "it sent none");
        assert_eq!(
            (tb.close, tb.closed_by),
            (CloseKind::ResetReceived, Some(Closer::Peer))
        );
        assert_eq!(tb.error, Some(ECONNRESET));
        assert!(ta.timewait.is_none() && tb.timewait.is_none());
    }

    #[test]
    fn failed_connects() {
        let mut refused = Sock::new(6, 1);
        refused.step(0, Close, SynSent);
        refused.reset(10, kind::RECEIVE_RESET);
        refused.step(11, SynSent, Close).sk_err = ECONNREFUSED;
        let mut timed_out = Sock::new(7, 1);
        timed_out.step(0, Close, SynSent);
        timed_out.step(3_000_000, SynSent, Close).sk_err = ETIMEDOUT;
        let out = run_all(&[&refused, &timed_out]);
        let r = out.iter().find(|t| t.skaddr == 6).unwrap();
        let to = out.iter().find(|t| t.skaddr == 7).unwrap();
        assert_eq!(
            (r.open, r.close, r.error),
            (
                OpenKind::Refused,
                CloseKind::NeverOpened,
                Some(ECONNREFUSED)
            )
        );
        assert_eq!((to.open, to.error), (OpenKind::TimedOut, Some(ETIMEDOUT)));
        assert_eq!(to.handshake_ns, None);
    }

    /// Each failure as the kernel shows it (see `ConnectFailure`).
    #[test]
    fn connect_failures_by_reason() {
        let mut socks = Vec::new();
        let mut sock = |sk: u64, f: &dyn Fn(&mut Sock)| {
            let mut s = Sock::new(sk, 1);
            s.step(0, Close, SynSent);
            f(&mut s);
            socks.push(s);
        };
        sock(1, &|s| {
            s.segs_out = 1;
            s.reset(10, kind::RECEIVE_RESET);
            s.step(11, SynSent, Close).sk_err = ECONNREFUSED;
        });
        sock(2, &|s| {
            s.segs_out = 3;
            s.reset(1_000_000, kind::RETRANSMIT);
            s.reset(3_000_000, kind::RETRANSMIT);
            s.step(7_000_000, SynSent, Close).sk_err = ETIMEDOUT;
        });
        sock(3, &|s| {
            s.segs_out = 2;
            s.reset(1_000_000, kind::RETRANSMIT);
            s.step(2_000_000, SynSent, Close).sk_err = EHOSTUNREACH;
        });
        sock(4, &|s| {
            s.segs_out = 1;
            s.step(300_000, SynSent, Close);
        });
        // No local port free: CLOSE at once, nothing sent.
        sock(5, &|s| {
            s.step(2, SynSent, Close);
        });
        sock(6, &|s| {
            s.segs_out = 1;
            s.step(500, SynSent, Close).sk_err = 13;
        });
        let out = run_all(&socks.iter().collect::<Vec<_>>());
        let get = |sk: u64| out.iter().find(|t| t.skaddr == sk).unwrap();
        let want = [
            (1, ConnectFailure::Refused, vec![]),
            (
                2,
                ConnectFailure::TimedOut,
                vec![1_000_000_000, 3_000_000_000],
            ),
            (
                3,
                ConnectFailure::Unreachable(EHOSTUNREACH),
                vec![1_000_000_000],
            ),
            (4, ConnectFailure::GivenUp, vec![]),
            (5, ConnectFailure::AddressNotAvailable, vec![]),
            (6, ConnectFailure::Other(13), vec![]),
        ];
        for (sk, failure, retx) in want {
            let t = get(sk);
            assert_eq!(t.connect_failure, Some(failure), "{t:?}");
            assert_eq!(t.syn_retransmits_ns, retx, "{t:?}");
            assert_eq!(t.close, CloseKind::NeverOpened);
            // The retransmissions are no steps.
            assert_eq!(t.steps.len(), 2, "{t:?}");
        }
        assert_eq!(ConnectFailure::GivenUp.errno(), None);
        assert_eq!(
            ConnectFailure::AddressNotAvailable.errno(),
            Some(EADDRNOTAVAIL)
        );
    }

    /// A retransmission once the connection is open is no SYN's.
    #[test]
    fn retransmits_after_the_handshake_are_not_syn_retransmits() {
        let mut s = Sock::new(9, 1);
        s.step(0, Close, SynSent);
        s.reset(1_000_000, kind::RETRANSMIT);
        s.step(1_000_100, SynSent, Established);
        s.reset(2_000_000, kind::RETRANSMIT);
        s.step(3_000_000, Established, Close).sk_err = ETIMEDOUT;
        let out = s.run();
        assert_eq!(out[0].syn_retransmits_ns, vec![1_000_000_000]);
        assert_eq!(out[0].retransmits, 2);
        assert_eq!(out[0].connect_failure, None);
        assert_eq!(out[0].steps.len(), 3);
    }

    /// A "transition" to the same state is no step: neither a SYN
    /// retransmission's mark nor a timeline of its own (found by the
    /// correlator fuzz target).
    #[test]
    fn same_state_transitions_are_no_steps() {
        let mut s = Sock::new(9, 1);
        s.step(0, Close, Close);
        assert!(s.run().is_empty());
        let mut s = Sock::new(9, 1);
        s.step(0, Close, SynSent);
        s.step(1_000, SynSent, SynSent);
        s.step(2_000, SynSent, Established);
        s.step(3_000, Established, Close);
        let out = s.run();
        assert_eq!(out.len(), 1);
        assert!(out[0].syn_retransmits_ns.is_empty(), "{:?}", out[0]);
        assert_eq!(out[0].steps.len(), 3);
    }

    #[test]
    fn reused_socket_address_starts_a_new_connection() {
        let mut s = Sock::new(8, 1);
        active_open(&mut s);
        s.step(1000, Established, Close);
        // Freed and reused within the grace period: a new connect.
        s.step(1001, Close, SynSent);
        s.step(1100, SynSent, Established);
        s.step(2000, Established, FinWait1);
        s.step(2100, FinWait1, FinWait2);
        s.rcv_nxt += 1;
        s.step(2200, FinWait2, Close);
        let out = s.run();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].steps.len(), 3);
        assert_eq!(out[1].steps.len(), 5);
        assert_eq!(out[1].first_ns, 1_001_000);
    }

    #[test]
    fn listeners_are_not_connections() {
        let mut l = Sock::new(9, 1);
        l.step(0, Close, Listen);
        l.step(10, Listen, Close);
        assert!(l.run().is_empty());
        // Nor one that listened before the trace, first seen closing.
        let mut old = Sock::new(10, 1);
        old.step(10, Listen, Close);
        assert!(old.run().is_empty());
    }

    #[test]
    fn connection_older_than_the_trace_is_marked() {
        let mut s = Sock::new(10, 1);
        s.step(0, Established, CloseWait);
        s.step(10, CloseWait, LastAck);
        s.step(20, LastAck, Close);
        let t = &s.run()[0];
        assert!(t.pre_existing());
        assert_eq!(t.role, Role::Unknown);
        assert_eq!(t.close, CloseKind::Orderly);
        assert_eq!(t.closed_by, Some(Closer::Peer));
        assert_eq!(t.handshake_ns, None);
    }

    #[test]
    fn connections_older_than_the_trace_take_their_role_from_the_listeners() {
        // When tracing began, 127.0.0.1:8080 listened, and one connection
        // to it was open (both ends on this host).
        let listener = (
            crate::model::snapshot::tests::key("127.0.0.1:8080", "0.0.0.0:0"),
            TcpState::Listen,
            100,
        );
        let snap = SocketSnapshot::from_sockets([listener], &HashMap::new());
        let mut c = Correlator::new(CorrelatorOptions::default(), Some(snap), None);
        c.set_traced_since(1_000);
        let ep = |s: &str| -> (std::net::Ipv4Addr, u16) {
            let a: std::net::SocketAddrV4 = s.parse().unwrap();
            (*a.ip(), a.port())
        };
        let mut out = Vec::new();
        let mut feed = |sk: u64,
                        local: &str,
                        remote: &str,
                        steps: &[(TcpState, TcpState, u64)],
                        acked: u64,
                        received: u64| {
            for (i, (old, new, ts)) in steps.iter().enumerate() {
                let mut e = state_event(sk, *old, *new, *ts);
                let ((la, lp), (ra, rp)) = (ep(local), ep(remote));
                e.saddr[..4].copy_from_slice(&la.octets());
                e.daddr[..4].copy_from_slice(&ra.octets());
                (e.sport, e.dport) = (lp, rp);
                // A segment, and for the first closer the peer's FIN,
                // between each two transitions.
                e.valid = valid::RCV_NXT | valid::SEGS_IN;
                (e.rcv_nxt, e.segs_in) = (1000 + i as u32, 10 + i as u32);
                if i == steps.len() - 1 {
                    e.valid |= valid::BYTES_ACKED | valid::BYTES_RECEIVED;
                    e.bytes_acked = acked;
                    e.bytes_received = received;
                }
                c.push(&decode(&encode(&e)).unwrap(), &mut out);
            }
        };
        // The client sent 1000 bytes and read 5, then closed first: its
        // counters hold its SYN and FIN, and the server's FIN.
        feed(
            1,
            "127.0.0.1:40000",
            "127.0.0.1:8080",
            &[
                (Established, FinWait1, 5_000_000_000),
                (FinWait1, FinWait2, 5_000_000_100),
                (FinWait2, Close, 5_000_000_200),
            ],
            1000 + 2,
            5 + 1,
        );
        // The server: its counters hold the client's FIN.
        feed(
            2,
            "127.0.0.1:8080",
            "127.0.0.1:40000",
            &[
                (Established, CloseWait, 5_000_000_050),
                (CloseWait, LastAck, 5_000_000_150),
                (LastAck, Close, 5_000_000_250),
            ],
            5 + 1,
            1000 + 1,
        );
        // The listener closes: not a connection.
        feed(
            3,
            "127.0.0.1:8080",
            "0.0.0.0:0",
            &[(Listen, Close, 5_000_000_300)],
            0,
            0,
        );
        c.flush(&mut out);
        assert_eq!(out.len(), 2, "{out:#?}");
        let client = out.iter().find(|t| t.skaddr == 1).unwrap();
        let server = out.iter().find(|t| t.skaddr == 2).unwrap();
        assert_eq!(
            (client.role, client.open),
            (Role::Client, OpenKind::BeforeTrace)
        );
        assert_eq!(
            (client.bytes_sent, client.bytes_received),
            (Some(1000), Some(5))
        );
        assert_eq!(
            (server.role, server.open),
            (Role::Server, OpenKind::BeforeTrace)
        );
        assert_eq!(
            (server.bytes_sent, server.bytes_received),
            (Some(5), Some(1000))
        );
        // Open since tracing began at least: a lower bound of 5 s, not the
        // 200 µs between its first and last transition.
        assert_eq!(client.first_ns, 1_000);
        assert_eq!(client.lifetime_ns(), 5_000_000_200 - 1_000);
        assert_eq!(client.steps[0].ts_ns, 5_000_000_000);
    }

    #[test]
    fn accepted_socket_belongs_to_the_process_that_used_it_first() {
        // The listener's process (1) made it; a worker (7) read from it;
        // the client reset it, so no transition ran in the worker.
        let mut l = Sock::new(1, 1);
        l.step(0, Close, Listen);
        let mut s = Sock::new(2, 9);
        s.step(10, Listen, SynRecv);
        s.step(20, SynRecv, Established);
        let mut first_use = Event::zeroed();
        (
            first_use.kind,
            first_use.skaddr,
            first_use.ts_ns,
            first_use.pid,
        ) = (kind::FIRST_USE, 2, 30_000, 7);
        s.events.push(first_use);
        s.reset(40, kind::RECEIVE_RESET);
        s.step(41, Established, Close).sk_err = ECONNRESET;
        let out = run_all(&[&l, &s]);
        let a = out[0].owner.as_ref().unwrap();
        assert_eq!((a.owner.pid, a.source), (7, OwnerSource::Observed));
    }

    #[test]
    fn grace_period_holds_the_timeline_for_the_late_reset() {
        let mut c = Correlator::new(CorrelatorOptions::default(), None, None);
        let mut out = Vec::new();
        let mut s = Sock::new(11, 1);
        active_open(&mut s);
        s.step(1000, Established, Close);
        for e in &s.events {
            c.push(&decode(&encode(e)).unwrap(), &mut out);
        }
        assert!(out.is_empty(), "still in grace");
        let mut rst = Event::zeroed();
        rst.kind = kind::SEND_RESET;
        rst.skaddr = 11;
        rst.ts_ns = 1_000_500;
        c.push(&decode(&encode(&rst)).unwrap(), &mut out);
        c.advance(1_000_000 + 19_000_000, &mut out);
        assert!(out.is_empty());
        c.advance(1_000_000 + 21_000_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].close, CloseKind::Aborted);
    }

    #[test]
    fn memory_is_bounded_and_evictions_counted() {
        let mut c = Correlator::new(
            CorrelatorOptions {
                max_sockets: 100,
                ..CorrelatorOptions::default()
            },
            None,
            None,
        );
        let mut out = Vec::new();
        for sk in 0..10_000u64 {
            let e = state_event(sk, Listen, SynRecv, sk);
            c.push(&decode(&encode(&e)).unwrap(), &mut out);
        }
        assert_eq!(c.tracked(), 100);
        assert_eq!(c.stats().evicted, 9_900);
        assert_eq!(c.stats().peak_tracked, 100);
    }

    #[test]
    fn sockets_evicted_while_open_give_no_timeline() {
        let mut c = Correlator::new(
            CorrelatorOptions {
                max_sockets: 2,
                ..CorrelatorOptions::default()
            },
            None,
            None,
        );
        let mut out = Vec::new();
        let steps = |sk: u64, list: &[(TcpState, TcpState, u64)]| -> Vec<Record> {
            list.iter()
                .map(|(old, new, ts)| decode(&encode(&state_event(sk, *old, *new, *ts))).unwrap())
                .collect()
        };
        // A flood: four half-open sockets, two tracked.
        for sk in 1..=4 {
            for r in steps(sk, &[(Close, SynSent, sk * 1000)]) {
                c.push(&r, &mut out);
            }
        }
        // Their SYNs time out. The evicted two are skipped, not taken for
        // connections older than the trace (nor tracked again, which
        // would evict the others in turn).
        for sk in 1..=4 {
            for r in steps(sk, &[(SynSent, Close, 3_000_000_000 + sk)]) {
                c.push(&r, &mut out);
            }
        }
        c.flush(&mut out);
        let opens: Vec<(u64, OpenKind)> = out.iter().map(|t| (t.skaddr, t.open)).collect();
        assert_eq!(opens, [(3, OpenKind::Failed), (4, OpenKind::Failed)]);
        assert_eq!((c.stats().evicted, c.tracked()), (2, 0));
        // The address of an evicted socket, reused, is followed as usual.
        out.clear();
        let reused = [
            (Close, SynSent, 4_000_000_000),
            (SynSent, Established, 4_000_100_000),
            (Established, Close, 4_000_200_000),
        ];
        for r in steps(1, &reused) {
            c.push(&r, &mut out);
        }
        c.flush(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].open, OpenKind::Active);
    }

    #[test]
    fn closing_queue_stays_bounded_when_time_jumps_back() {
        // Found while writing the correlator fuzzer: one CLOSE stamped far
        // in the future held up the grace-period queue, and every later
        // CLOSE (and a socket's repeated CLOSE) queued behind it for good,
        // long after the sockets themselves were evicted.
        let max = 8;
        let mut c = Correlator::new(
            CorrelatorOptions {
                max_sockets: max,
                ..CorrelatorOptions::default()
            },
            None,
            None,
        );
        let mut out = Vec::new();
        let push = |c: &mut Correlator, out: &mut Vec<Timeline>, e: Event| {
            c.push(&decode(&encode(&e)).unwrap(), out);
        };
        push(
            &mut c,
            &mut out,
            state_event(1, Established, Close, u64::MAX / 2),
        );
        for i in 0..10_000u64 {
            let sk = 2 + i % 100;
            push(&mut c, &mut out, state_event(sk, Close, SynSent, 1000 + i));
            push(&mut c, &mut out, state_event(sk, SynSent, Close, 1000 + i));
            push(&mut c, &mut out, state_event(sk, Close, Close, 1000 + i));
        }
        assert!(c.tracked() <= max);
        assert!(c.closing() <= 2 * max, "{} closing", c.closing());
        // Nothing still tracked was dropped from the queue.
        c.flush(&mut out);
        assert_eq!(c.tracked(), 0);
        assert_eq!(c.stats().timelines + c.stats().evicted, 10_000 + 1);
    }

    #[test]
    fn arbitrary_sequences_never_panic() {
        // Every pair of states, in any order, on few reused addresses,
        // with time going backwards.
        let mut c = Correlator::new(
            CorrelatorOptions {
                max_sockets: 8,
                ..CorrelatorOptions::default()
            },
            None,
            None,
        );
        let mut out = Vec::new();
        let mut ts = 1_000_000_000u64;
        for (i, old) in TcpState::ALL.iter().enumerate() {
            for (j, new) in TcpState::ALL.iter().enumerate() {
                ts = if (i + j) % 3 == 0 {
                    ts - 1000
                } else {
                    ts + 7_000_000
                };
                let e = state_event((i * j % 5) as u64, *old, *new, ts);
                c.push(&decode(&encode(&e)).unwrap(), &mut out);
            }
        }
        c.flush(&mut out);
        assert!(c.tracked() <= 8);
    }
}
