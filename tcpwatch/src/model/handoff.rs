//! Sockets handed to a FIN_WAIT2 timewait socket, and what became of them.
//!
//! A server that closes first and does not linger (nginx, python's
//! http.server) closes its socket with the application already gone. When
//! the peer's ACK of its FIN arrives alone, the kernel hands the socket to
//! a timewait mini-socket in its FIN_WAIT2 substate and closes the full
//! socket: the tracepoint shows FIN_WAIT1 → FIN_WAIT2 → CLOSE and nothing
//! more. The peer's FIN, a moment later, reaches the mini-socket, which
//! moves to TIME_WAIT: no tracepoint sees that either. So the timeline of
//! such a socket is held here until one of these tells what happened:
//!
//! - **the peer's own timeline**, when the peer is a socket on this host (in
//!   any network namespace): its LAST_ACK → CLOSE means its FIN was sent and
//!   acknowledged, by our mini-socket. An orderly close in four segments,
//!   leaving TIME_WAIT;
//! - **the kernel's list**: an exact sock_diag lookup of the 4-tuple (done
//!   by the caller through [`TimewaitLookup`], batched), which gives the
//!   mini-socket's substate: TIME_WAIT (the FIN came), FIN_WAIT2 (not yet),
//!   or none at all (a RST ended it, or `tcp_max_tw_buckets` was full);
//! - **time**: after [`CHECKS_NS`]' last check, a socket still in FIN_WAIT2
//!   is reported as `fin_wait2`: its peer has not sent its FIN.
//!
//! Pure: the lookup is the caller's, and time comes from the events.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};

use crate::model::correlate::{CloseKind, Closer, Timeline, Timewait, TimewaitSubstate};
use crate::model::{Endpoint, FastMap};

/// When the kernel is asked, counted from the full socket's close: soon
/// (the FIN of a peer that closes on EOF is there within milliseconds),
/// then twice more; after the last check the socket is reported as it is.
pub const CHECKS_NS: [u64; 3] = [50_000_000, 300_000_000, 1_000_000_000];

/// How long a peer's acknowledged FIN is remembered when the hand-off it
/// answers has not been seen yet (their events raced on two CPUs).
const EARLY_FIN_NS: u64 = 100_000_000;

/// What the kernel's list says about a timewait socket.
pub trait TimewaitLookup: Send {
    /// Whether the kernel of network namespace `netns` can be asked.
    fn covers(&self, netns: u32) -> bool;

    /// The substate of the timewait socket with each (local, remote)
    /// 4-tuple in network namespace `netns`; `None` where the kernel lists
    /// none. `Err` when the kernel could not be asked.
    fn lookup(
        &mut self,
        netns: u32,
        sockets: &[(Endpoint, Endpoint)],
    ) -> Result<Vec<Option<TimewaitSubstate>>, String>;
}

/// The sockets of one namespace asked about at once: their places in the
/// due list, and their 4-tuples.
type Batch = (Vec<usize>, Vec<(Endpoint, Endpoint)>);

/// The 4-tuple as a number, the same for both ends: the peer's (remote,
/// local) is our (local, remote). An IPv4 address mapped into IPv6 (a
/// dual-stack socket's IPv4 peer) counts as the IPv4 address its peer
/// sees.
fn key(local: &Endpoint, remote: &Endpoint) -> u64 {
    // foldhash's quality variant with a fixed seed: fast, well mixed in
    // all 64 bits (SipHash costs more per server close than the rest).
    let mut h = foldhash::quality::FixedState::with_seed(0x6861_6e64_6f66_6673).build_hasher();
    for e in [local, remote] {
        e.addr.to_canonical().hash(&mut h);
        e.port.hash(&mut h);
    }
    h.finish()
}

/// Where a hand-off stands.
#[derive(Debug)]
enum Waiting {
    /// Seen at FIN_WAIT2 → CLOSE; its timeline is still being finished.
    Closing { since_ns: u64 },
    /// The peer's FIN was acknowledged before the timeline was finished.
    PeerFin { since_ns: u64 },
    /// The timeline, waiting for its peer's FIN. `gen` tells it from a
    /// later socket with the same 4-tuple in the check queue.
    Held {
        timeline: Box<Timeline>,
        gen: u64,
        /// Whether the kernel can be asked about it (the lookup covers its
        /// network namespace).
        checkable: bool,
    },
}

/// How a held timeline was settled, for the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandoffStats {
    /// Settled by the peer's timeline (its FIN acknowledged).
    pub by_peer: u64,
    /// Settled by the kernel's list (TIME_WAIT).
    pub by_kernel: u64,
    /// Reported as `fin_wait2` after the last check, the kernel listing
    /// the socket in FIN_WAIT2 or not asked.
    pub fin_wait2: u64,
    /// Reported as `fin_wait2` without a timewait socket: the kernel had
    /// none left.
    pub gone: u64,
    /// Lookups the kernel could not answer.
    pub lookup_errors: u64,
}

/// The hand-offs being followed. Bounded: at most `cap` timelines are held,
/// the oldest released first.
pub struct Handoffs {
    cap: usize,
    waiting: FastMap<u64, Waiting>,
    /// (key, close time) of hand-offs not yet held, for expiry.
    closing: VecDeque<(u64, u64)>,
    /// Peer FINs seen before their hand-off: key → time.
    early: FastMap<u64, u64>,
    early_order: VecDeque<(u64, u64)>,
    /// Held timelines by the check they wait for: (key, gen, due time).
    checks: [VecDeque<(u64, u64, u64)>; CHECKS_NS.len()],
    held: usize,
    /// (close time, gen, key) of held timelines, earliest first, for
    /// [`Handoffs::oldest_held_ns`]; entries of timelines no longer held
    /// are dropped when they come to the top, or in a compaction.
    by_close: BinaryHeap<Reverse<(u64, u64, u64)>>,
    next_gen: u64,
    time_wait_ns: u64,
    pub stats: HandoffStats,
}

impl Handoffs {
    pub fn new(cap: usize, time_wait_ns: u64) -> Handoffs {
        Handoffs {
            cap: cap.max(1),
            waiting: FastMap::default(),
            closing: VecDeque::new(),
            early: FastMap::default(),
            early_order: VecDeque::new(),
            checks: Default::default(),
            held: 0,
            by_close: BinaryHeap::new(),
            next_gen: 0,
            time_wait_ns,
            stats: HandoffStats::default(),
        }
    }

    /// Timelines held now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// When the socket of the earliest held timeline closed: the timelines
    /// that closed after it wait for it, to come out in close order.
    pub fn oldest_held_ns(&mut self) -> Option<u64> {
        while let Some(&Reverse((closed_ns, gen, k))) = self.by_close.peek() {
            if self.is_held(k, gen) {
                return Some(closed_ns);
            }
            self.by_close.pop();
        }
        None
    }

    /// A socket was handed off at FIN_WAIT2 → CLOSE (its timeline follows
    /// once finished, through [`Handoffs::hold`]).
    pub fn handed_off(&mut self, local: &Endpoint, remote: &Endpoint, ts_ns: u64) {
        let k = key(local, remote);
        // An earlier socket with this 4-tuple still held keeps its entry:
        // this one's timeline replaces it when it comes.
        if !matches!(self.waiting.get(&k), Some(Waiting::Held { .. })) {
            let state = if self.early.remove(&k).is_some() {
                Waiting::PeerFin { since_ns: ts_ns }
            } else {
                Waiting::Closing { since_ns: ts_ns }
            };
            self.waiting.insert(k, state);
        }
        self.closing.push_back((k, ts_ns));
        self.expire(ts_ns);
    }

    /// A socket on this host went LAST_ACK → CLOSE: its FIN was sent and
    /// acknowledged. If its peer is a held hand-off, that timeline is
    /// settled and appended to `out`.
    pub fn peer_fin_acked(
        &mut self,
        local: &Endpoint,
        remote: &Endpoint,
        ts_ns: u64,
        out: &mut Vec<Timeline>,
    ) {
        // Our (local, remote) is the peer's (remote, local).
        let k = key(remote, local);
        match self.waiting.get_mut(&k) {
            Some(w @ Waiting::Closing { .. }) => {
                if let Waiting::Closing { since_ns } = *w {
                    *w = Waiting::PeerFin { since_ns };
                }
            }
            Some(Waiting::Held { .. }) => {
                if let Some(Waiting::Held { timeline, .. }) = self.waiting.remove(&k) {
                    self.held -= 1;
                    self.stats.by_peer += 1;
                    out.push(self.settle_time_wait(*timeline));
                }
            }
            Some(Waiting::PeerFin { .. }) => {}
            None => {
                self.early.insert(k, ts_ns);
                self.early_order.push_back((k, ts_ns));
            }
        }
        self.expire(ts_ns);
    }

    /// A finished timeline whose socket was handed off: appended to `out`
    /// at once if its peer's FIN is known, held otherwise. `checkable`:
    /// whether the kernel can be asked about it.
    pub fn hold(&mut self, t: Timeline, checkable: bool, out: &mut Vec<Timeline>) {
        let k = key(&t.local, &t.remote);
        if let Some(Waiting::PeerFin { .. }) = self.waiting.get(&k) {
            self.waiting.remove(&k);
            self.stats.by_peer += 1;
            out.push(self.settle_time_wait(t));
            return;
        }
        if self.early.remove(&k).is_some() {
            self.stats.by_peer += 1;
            out.push(self.settle_time_wait(t));
            return;
        }
        while self.held >= self.cap {
            if !self.release_oldest(out) {
                break;
            }
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        let due = t.closed_ns.saturating_add(CHECKS_NS[0]);
        self.by_close.push(Reverse((t.closed_ns, gen, k)));
        if self.by_close.len() > 2 * self.cap {
            let waiting = &self.waiting;
            self.by_close.retain(|Reverse((_, gen, k))| {
                matches!(waiting.get(k), Some(Waiting::Held { gen: g, .. }) if g == gen)
            });
        }
        let previous = self.waiting.insert(
            k,
            Waiting::Held {
                timeline: Box::new(t),
                gen,
                checkable,
            },
        );
        if let Some(Waiting::Held { timeline, .. }) = previous {
            // An earlier socket with this 4-tuple: its peer's FIN can no
            // longer be told from this one's.
            self.stats.fin_wait2 += 1;
            out.push(*timeline);
        } else {
            self.held += 1;
        }
        self.checks[0].push_back((k, gen, due));
    }

    /// Settles what is due at `now_ns`: held timelines whose check came are
    /// looked up in one batch with `lookup` (when there is one), and those
    /// settled, or past their last check, are appended to `out`.
    pub fn advance(
        &mut self,
        now_ns: u64,
        mut lookup: Option<&mut (dyn TimewaitLookup + '_)>,
        out: &mut Vec<Timeline>,
    ) {
        self.expire(now_ns);
        let last = CHECKS_NS.len() - 1;
        for stage in 0..CHECKS_NS.len() {
            let mut due = Vec::new();
            while let Some(&(k, gen, at)) = self.checks[stage].front() {
                if at > now_ns {
                    break;
                }
                self.checks[stage].pop_front();
                if self.is_held(k, gen) {
                    due.push((k, gen));
                }
            }
            if due.is_empty() {
                continue;
            }
            let answers = self.ask(&due, lookup.as_deref_mut());
            for ((k, gen), answer) in due.into_iter().zip(answers) {
                match answer {
                    Answer::TimeWait => self.settle(k, out, Settled::TimeWait),
                    Answer::Gone => self.settle(k, out, Settled::Gone),
                    Answer::Waiting if stage == last => self.settle(k, out, Settled::FinWait2),
                    Answer::Waiting => {
                        let closed = match self.waiting.get(&k) {
                            Some(Waiting::Held { timeline, .. }) => timeline.closed_ns,
                            _ => continue,
                        };
                        let at = closed.saturating_add(CHECKS_NS[stage + 1]);
                        self.checks[stage + 1].push_back((k, gen, at));
                    }
                }
            }
        }
    }

    /// End of input: every held timeline is settled now, by one last
    /// lookup where there is one.
    pub fn flush(
        &mut self,
        lookup: Option<&mut (dyn TimewaitLookup + '_)>,
        out: &mut Vec<Timeline>,
    ) {
        let mut due: Vec<(u64, u64)> = self
            .checks
            .iter_mut()
            .flat_map(|q| q.drain(..))
            .map(|(k, gen, _)| (k, gen))
            .collect();
        due.retain(|&(k, gen)| self.is_held(k, gen));
        let answers = self.ask(&due, lookup);
        for ((k, _), answer) in due.into_iter().zip(answers) {
            let how = match answer {
                Answer::TimeWait => Settled::TimeWait,
                Answer::Gone => Settled::Gone,
                Answer::Waiting => Settled::FinWait2,
            };
            self.settle(k, out, how);
        }
        self.waiting.clear();
        self.by_close.clear();
        self.closing.clear();
        self.early.clear();
        self.early_order.clear();
        self.held = 0;
    }

    fn is_held(&self, k: u64, gen: u64) -> bool {
        matches!(self.waiting.get(&k), Some(Waiting::Held { gen: g, .. }) if *g == gen)
    }

    /// The kernel's answer for each of `due` (all `Waiting` where it cannot
    /// be asked).
    fn ask(
        &mut self,
        due: &[(u64, u64)],
        lookup: Option<&mut (dyn TimewaitLookup + '_)>,
    ) -> Vec<Answer> {
        let mut answers = vec![Answer::Waiting; due.len()];
        let Some(lookup) = lookup else {
            return answers;
        };
        // One batch per network namespace: each has its own kernel list.
        let mut by_netns: BTreeMap<u32, Batch> = BTreeMap::new();
        for (i, (k, _)) in due.iter().enumerate() {
            if let Some(Waiting::Held {
                timeline,
                checkable: true,
                ..
            }) = self.waiting.get(k)
            {
                let (asked, sockets) = by_netns.entry(timeline.netns.unwrap_or(0)).or_default();
                asked.push(i);
                sockets.push((timeline.local, timeline.remote));
            }
        }
        for (netns, (asked, sockets)) in by_netns {
            match lookup.lookup(netns, &sockets) {
                Ok(found) => {
                    for (i, substate) in asked.into_iter().zip(found) {
                        answers[i] = match substate {
                            Some(TimewaitSubstate::TimeWait) => Answer::TimeWait,
                            Some(TimewaitSubstate::FinWait2) => Answer::Waiting,
                            None => Answer::Gone,
                        };
                    }
                }
                Err(_) => self.stats.lookup_errors += 1,
            }
        }
        answers
    }

    fn settle(&mut self, k: u64, out: &mut Vec<Timeline>, how: Settled) {
        let Some(Waiting::Held { timeline, .. }) = self.waiting.remove(&k) else {
            return;
        };
        self.held -= 1;
        let t = *timeline;
        out.push(match how {
            Settled::TimeWait => {
                self.stats.by_kernel += 1;
                self.settle_time_wait(t)
            }
            Settled::FinWait2 => {
                self.stats.fin_wait2 += 1;
                t
            }
            Settled::Gone => {
                self.stats.gone += 1;
                Timeline {
                    timewait: None,
                    ..t
                }
            }
        });
    }

    /// The peer's FIN reached the timewait socket: an orderly close by
    /// this end in four segments (its FIN, the bare ACK, the peer's FIN,
    /// the last ACK), which left a TIME_WAIT socket.
    fn settle_time_wait(&self, t: Timeline) -> Timeline {
        Timeline {
            close: CloseKind::Orderly,
            closed_by: Some(Closer::Local),
            teardown_segments: Some(4),
            timewait: Some(Timewait {
                substate: TimewaitSubstate::TimeWait,
                hold_ns: self.time_wait_ns,
            }),
            ..t
        }
    }

    /// Releases the held timeline that waited longest, unsettled.
    fn release_oldest(&mut self, out: &mut Vec<Timeline>) -> bool {
        for stage in 0..self.checks.len() {
            while let Some((k, gen, _)) = self.checks[stage].pop_front() {
                if self.is_held(k, gen) {
                    self.settle(k, out, Settled::FinWait2);
                    return true;
                }
            }
        }
        false
    }

    /// Forgets hand-offs whose timeline never came (it was evicted, or it
    /// did not close as a hand-off after all) and peer FINs whose hand-off
    /// never came.
    fn expire(&mut self, now_ns: u64) {
        let life = CHECKS_NS[CHECKS_NS.len() - 1];
        while let Some(&(k, ts)) = self.closing.front() {
            if now_ns < ts.saturating_add(life) && self.closing.len() <= 2 * self.cap {
                break;
            }
            self.closing.pop_front();
            let stale = matches!(
                self.waiting.get(&k),
                Some(Waiting::Closing { since_ns } | Waiting::PeerFin { since_ns }) if *since_ns == ts
            );
            if stale {
                self.waiting.remove(&k);
            }
        }
        while let Some(&(k, ts)) = self.early_order.front() {
            if now_ns < ts.saturating_add(EARLY_FIN_NS) && self.early_order.len() <= 2 * self.cap {
                break;
            }
            self.early_order.pop_front();
            if self.early.get(&k) == Some(&ts) {
                self.early.remove(&k);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    TimeWait,
    Waiting,
    Gone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settled {
    TimeWait,
    FinWait2,
    Gone,
}
