//! TIME_WAIT accounting: which process, toward which peer, from which local
//! endpoint, holds the host's timewait sockets, how fast they are made, and
//! when a destination's ephemeral ports run out. Ports are counted per
//! (local address, remote address:port), as the kernel allocates them: each
//! local address has the whole port range toward each destination.
//!
//! A timewait socket has no owner and no tracepoint; the connection that
//! left it does. So every finished timeline with a timewait socket adds an
//! entry, attributed to the process that closed first. The kernel stays the
//! authority on which timewait sockets exist: `reconcile` drops entries the
//! kernel no longer lists (expired, reused, or never made because
//! `tcp_max_tw_buckets` overflowed), gives the ones it lists that tcpwatch
//! did not see made an entry of their own, and counts both
//! ([`KernelCheck`]). Pure: time comes from the caller.
//!
//! Incremental: the counts a snapshot shows (by process, endpoint,
//! destination, substate) are kept as entries come and go, and entries
//! leave at their own expiry through a queue ordered by it, so neither a
//! snapshot nor an expiry walks the table. Only `reconcile`, which the
//! caller runs now and then, reads every entry.
//!
//! Memory is bounded per socket: an entry is a 64-bit key (a hash of the
//! namespace and 4-tuple) and 16 bytes of interned ids, plus a 16-byte item
//! in the expiry queue: under 80 bytes per socket with the hash table's
//! slack.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::correlate::{Role, Timeline, TimewaitSubstate};
use crate::model::{Endpoint, FastMap, Owner};

/// A timewait socket as the kernel lists it (sock_diag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelTimewait {
    pub local: Endpoint,
    pub remote: Endpoint,
    pub substate: TimewaitSubstate,
    pub expires_ms: u32,
}

#[derive(Clone, Copy, Debug)]
pub struct TimewaitOptions {
    /// Most entries kept; beyond it new timewait sockets are counted but
    /// not tracked one by one (and said so).
    pub max_entries: usize,
    /// Most distinct owners / endpoints interned; beyond it they fold into
    /// "other".
    pub max_groups: usize,
}

impl Default for TimewaitOptions {
    fn default() -> Self {
        TimewaitOptions {
            max_entries: 1 << 20,
            max_groups: 65_536,
        }
    }
}

/// Interned values with reference counts, so groups disappear with their
/// last socket.
#[derive(Debug)]
struct Interner<T: Eq + Hash + Clone> {
    ids: FastMap<T, u32>,
    slots: Vec<Option<(T, u32)>>,
    free: Vec<u32>,
    cap: usize,
}

/// Id of the "other" / "unknown" group in every interner.
const OTHER: u32 = u32::MAX;

impl<T: Eq + Hash + Clone> Interner<T> {
    fn new(cap: usize) -> Self {
        Interner {
            ids: FastMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            cap,
        }
    }

    fn acquire(&mut self, value: &T) -> u32 {
        if let Some(&id) = self.ids.get(value) {
            if let Some(Some((_, rc))) = self.slots.get_mut(id as usize) {
                *rc += 1;
            }
            return id;
        }
        if self.ids.len() >= self.cap {
            return OTHER;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some((value.clone(), 1));
                id
            }
            None => {
                self.slots.push(Some((value.clone(), 1)));
                (self.slots.len() - 1) as u32
            }
        };
        self.ids.insert(value.clone(), id);
        id
    }

    fn release(&mut self, id: u32) {
        let Some(slot) = self.slots.get_mut(id as usize) else {
            return;
        };
        let drop_it = match slot {
            Some((_, rc)) => {
                *rc = rc.saturating_sub(1);
                *rc == 0
            }
            None => false,
        };
        if drop_it {
            if let Some((value, _)) = slot.take() {
                self.ids.remove(&value);
                self.free.push(id);
            }
        }
    }

    fn get(&self, id: u32) -> Option<&T> {
        self.slots
            .get(id as usize)
            .and_then(|s| s.as_ref())
            .map(|(v, _)| v)
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Who an entry is attributed to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Attribution {
    Owner(std::sync::Arc<Owner>),
    /// The connection closed without tcpwatch knowing its owner.
    Unknown,
    /// The socket existed when tracing started.
    BeforeTracing,
    /// Known only from the kernel's list, made in the moment its events
    /// take to arrive: they are on their way.
    JustClosed,
    /// Known only from the kernel's list, older: not seen made (lost
    /// events).
    NotSeen,
}

const FLAG_FIN_WAIT2: u32 = 1 << 31;
const FLAG_CLIENT: u32 = 1 << 30;
const FLAG_OTHER_NETNS: u32 = 1 << 29;
/// Known only from the kernel's list (no connection seen).
const FLAG_UNMATCHED: u32 = 1 << 28;
const EXPIRES_MASK: u32 = (1 << 28) - 1;
/// TCP_TIMEWAIT_LEN: how long a TIME_WAIT socket lives, in ms.
const TIME_WAIT_MS: u32 = 60_000;

/// 16 bytes: interned ids, and the expiry in ms since the book's epoch with
/// flags in its top bits (2^28 ms is three days, far beyond any timewait).
#[derive(Clone, Copy, Debug)]
struct Entry {
    owner: u32,
    remote: u32,
    local: u32,
    expires_and_flags: u32,
}

impl Entry {
    fn expires_ms(&self) -> u32 {
        self.expires_and_flags & EXPIRES_MASK
    }
    fn has(&self, flag: u32) -> bool {
        self.expires_and_flags & flag != 0
    }
}

/// Per-destination counters for the rate and the port forecast, keyed by
/// the interned (local address, remote endpoint) of the client side.
#[derive(Clone, Copy, Debug, Default)]
struct DestRate {
    created_since_snapshot: u32,
    /// Creations per second over the last interval.
    rate: f64,
}

/// The entry key: a 64-bit hash of the namespace and 4-tuple, with a fixed
/// seed (foldhash's quality variant: fast, and well mixed in all 64 bits).
fn key(netns: u32, local: &Endpoint, remote: &Endpoint) -> u64 {
    foldhash::quality::FixedState::with_seed(0x7463_7077_6174_6368).hash_one((netns, local, remote))
}

/// What the kernel and its settings say, passed in with each snapshot.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KernelView {
    /// /proc/net/sockstat `tw`.
    pub sockstat_tw: Option<u64>,
    pub max_tw_buckets: Option<u64>,
    /// TCPTimeWaitOverflow since tcpwatch started, and in the last interval.
    pub overflow_since_start: Option<u64>,
    pub overflow_last_interval: Option<u64>,
    /// net.ipv4.ip_local_port_range size.
    pub port_range: Option<u32>,
    pub tw_reuse: Option<u8>,
    pub fin_timeout_s: Option<u32>,
    pub timestamps: Option<u8>,
}

/// A group of timewait sockets. Process groups are keyed by command name,
/// not pid: a loop of short-lived processes (`curl` run 150 times) is one
/// group, and the daemon's `process` label does not grow a series per
/// process. The pids stay here for whoever needs them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Group {
    pub key: String,
    /// The process, when the group is one process.
    pub pid: Option<u32>,
    /// Pids of the group's processes, those with the most sockets first
    /// (at most [`MAX_PIDS`]); empty for groups that are not processes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    /// How many processes the group holds (process groups only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    pub comm: Option<String>,
    /// The cgroup, when every process of the group is in the same one.
    pub cgroup: Option<u64>,
    pub count: u64,
    pub share: f64,
}

/// Most pids listed in a process group.
pub const MAX_PIDS: usize = 32;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Destination {
    /// The local address the ephemeral ports are taken from.
    pub local: String,
    pub remote: String,
    /// Client-side timewait sockets toward it: ephemeral ports it holds.
    pub ports_held: u64,
    pub port_range: Option<u32>,
    pub rate_per_s: f64,
    /// Seconds until the ports run out at the current rate; `None` when
    /// they do not (the steady state fits the range, or reuse applies).
    pub exhaustion_s: Option<f64>,
    pub steady_state_ports: f64,
    /// Whether connect() may reuse these ports while they are in TIME_WAIT
    /// (tcp_tw_reuse 1, or 2 with a loopback address at either end, with
    /// tcp_timestamps on), as the kernel decides in tcp_twsk_unique().
    pub tw_reuse_applies: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub ts: String,
    /// The network namespace whose figures these are (its inode), and its
    /// name in /run/netns when it has one: every figure here is of that
    /// namespace alone.
    #[serde(default)]
    pub netns: Option<u32>,
    #[serde(default)]
    pub netns_name: Option<String>,
    pub interval_s: f64,
    /// Timewait sockets tcpwatch counts now.
    pub total: u64,
    pub time_wait: u64,
    pub fin_wait2: u64,
    /// Of the total: made before tracing started; made while tracing but
    /// not seen (lost events); made in other network namespaces (not
    /// checked against the kernel).
    pub before_tracing: u64,
    pub unattributed: u64,
    pub just_closed: u64,
    pub other_netns: u64,
    /// The kernel's own list (sock_diag) for tcpwatch's namespace, when read
    /// for this snapshot (at start, after lost events, while the kernel
    /// holds few timewait sockets, and every check interval).
    pub kernel_listed: Option<u64>,
    /// The last check against that list, and what it corrected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<KernelCheck>,
    pub kernel: KernelView,
    pub created_last_interval: u64,
    pub rate_last_interval: f64,
    pub rate_last_minute: f64,
    pub by_process: Vec<Group>,
    pub by_remote: Vec<Group>,
    pub by_local: Vec<Group>,
    /// By the container of the process that closed first (from its
    /// cgroup path), where the path shows one.
    #[serde(default)]
    pub by_container: Vec<Group>,
    pub destinations: Vec<Destination>,
    /// Processes that open connections they should reuse (see `churn`).
    #[serde(default)]
    pub churn: Vec<crate::model::churn::Churn>,
    pub findings: Vec<String>,
    /// Made from a recording: no kernel was asked (see `replay`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_recording: bool,
    /// Entries not tracked one by one because `max_entries` was reached.
    pub untracked: u64,
}

/// The figures a snapshot shows, kept up to date as entries come and go:
/// a snapshot reads these (one count per group), never the entries.
#[derive(Debug, Default)]
struct Tally {
    by_owner: FastMap<u32, u64>,
    by_local: FastMap<u32, u64>,
    by_remote: FastMap<u32, u64>,
    /// Client-side sockets tcpwatch saw made (or found from before
    /// tracing) by (local address, destination): the ports each local
    /// address holds toward each destination.
    client_pairs: FastMap<(u32, u32), u64>,
    /// Server-side sockets by local endpoint.
    server_local: FastMap<u32, u64>,
    fin_wait2: u64,
    other_netns: u64,
}

fn count_up<K: Eq + Hash>(m: &mut FastMap<K, u64>, k: K) {
    *m.entry(k).or_default() += 1;
}

fn count_down<K: Eq + Hash>(m: &mut FastMap<K, u64>, k: K) {
    if let std::collections::hash_map::Entry::Occupied(mut o) = m.entry(k) {
        *o.get_mut() = o.get().saturating_sub(1);
        if *o.get() == 0 {
            o.remove();
        }
    }
}

impl Tally {
    fn add(&mut self, e: &Entry) {
        count_up(&mut self.by_owner, e.owner);
        count_up(&mut self.by_local, e.local);
        count_up(&mut self.by_remote, e.remote);
        if e.has(FLAG_UNMATCHED) {
            // Known only from the kernel's list: which side it is on is a
            // guess, so it holds no destination's ports and no server's.
        } else if e.has(FLAG_CLIENT) {
            count_up(&mut self.client_pairs, (e.local, e.remote));
        } else {
            count_up(&mut self.server_local, e.local);
        }
        self.fin_wait2 += u64::from(e.has(FLAG_FIN_WAIT2));
        self.other_netns += u64::from(e.has(FLAG_OTHER_NETNS));
    }

    fn remove(&mut self, e: &Entry) {
        count_down(&mut self.by_owner, e.owner);
        count_down(&mut self.by_local, e.local);
        count_down(&mut self.by_remote, e.remote);
        if e.has(FLAG_UNMATCHED) {
        } else if e.has(FLAG_CLIENT) {
            count_down(&mut self.client_pairs, (e.local, e.remote));
        } else {
            count_down(&mut self.server_local, e.local);
        }
        self.fin_wait2 -= u64::from(e.has(FLAG_FIN_WAIT2)).min(self.fin_wait2);
        self.other_netns -= u64::from(e.has(FLAG_OTHER_NETNS)).min(self.other_netns);
    }
}

/// What the last check against the kernel's list (sock_diag) corrected.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KernelCheck {
    /// Seconds from the check to the snapshot.
    pub age_s: f64,
    /// Entries the kernel did not list: expired early, reused, a close
    /// whose events were lost, or never made (tcp_max_tw_buckets full).
    pub dropped: u64,
    /// Listed sockets tcpwatch had no entry for, older than the moment
    /// events take to arrive: not seen made (lost events).
    pub not_seen: u64,
    /// Listed sockets tcpwatch had no entry for yet, made in that moment
    /// (their events on their way): not a correction.
    pub in_flight: u64,
    /// Checks so far, and what they corrected in all.
    pub checks: u64,
    pub dropped_since_start: u64,
    pub not_seen_since_start: u64,
}

pub struct TimewaitBook {
    opts: TimewaitOptions,
    entries: FastMap<u64, Entry>,
    /// Expiry times, soonest first, as (ms since the epoch, key). An entry
    /// removed or given another expiry leaves its item behind: an item
    /// counts only while its time is its entry's.
    queue: BinaryHeap<Reverse<(u32, u64)>>,
    tally: Tally,
    owners: Interner<Attribution>,
    endpoints: Interner<Endpoint>,
    dest_rates: FastMap<(u32, u32), DestRate>,
    own_netns: Option<u32>,
    epoch_ns: u64,
    created_since_snapshot: u64,
    /// Creations per past interval, newest last, about a minute's worth.
    history: std::collections::VecDeque<(u64, f64)>,
    untracked: u64,
    /// The kernel's list at the last check, until a snapshot shows it.
    kernel_listed: Option<u64>,
    check: Option<(u64, KernelCheck)>,
    last_snapshot_ns: Option<u64>,
}

impl TimewaitBook {
    pub fn new(opts: TimewaitOptions, own_netns: Option<u32>, epoch_ns: u64) -> Self {
        TimewaitBook {
            opts,
            entries: FastMap::default(),
            queue: BinaryHeap::new(),
            tally: Tally::default(),
            owners: Interner::new(opts.max_groups),
            endpoints: Interner::new(opts.max_groups),
            dest_rates: FastMap::default(),
            own_netns,
            epoch_ns,
            created_since_snapshot: 0,
            history: std::collections::VecDeque::new(),
            untracked: 0,
            kernel_listed: None,
            check: None,
            last_snapshot_ns: None,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn rel_ms(&self, mono_ns: u64) -> u32 {
        ((mono_ns.saturating_sub(self.epoch_ns)) / 1_000_000).min(u64::from(EXPIRES_MASK)) as u32
    }

    fn insert(
        &mut self,
        k: u64,
        attribution: &Attribution,
        local_group: Endpoint,
        remote: Endpoint,
        expires_ms: u32,
        flags: u32,
    ) {
        self.remove(k);
        if self.entries.len() >= self.opts.max_entries {
            self.untracked += 1;
            return;
        }
        let owner = self.owners.acquire(attribution);
        let local = self.endpoints.acquire(&local_group);
        let remote = self.endpoints.acquire(&remote);
        let entry = Entry {
            owner,
            remote,
            local,
            expires_and_flags: expires_ms.min(EXPIRES_MASK) | flags,
        };
        self.tally.add(&entry);
        self.enqueue(k, entry.expires_ms());
        self.entries.insert(k, entry);
    }

    /// Drops the entry under `k`, if any, from the counts and the groups.
    fn remove(&mut self, k: u64) -> Option<Entry> {
        let e = self.entries.remove(&k)?;
        self.tally.remove(&e);
        if e.owner != OTHER {
            self.owners.release(e.owner);
        }
        for id in [e.local, e.remote] {
            if id != OTHER {
                self.endpoints.release(id);
            }
        }
        Some(e)
    }

    /// Puts `e` in the place of the entry under `k` (same endpoints).
    fn replace(&mut self, k: u64, old: Entry, new: Entry) {
        self.tally.remove(&old);
        self.tally.add(&new);
        if new.expires_ms() != old.expires_ms() {
            self.enqueue(k, new.expires_ms());
        }
        self.entries.insert(k, new);
    }

    fn enqueue(&mut self, k: u64, expires_ms: u32) {
        self.queue.push(Reverse((expires_ms, k)));
        // Items of removed or re-timed entries wait for their time; when
        // they outnumber the entries, the queue is rebuilt from them.
        if self.queue.len() > 2 * self.entries.len() + 4096 {
            self.queue = self
                .entries
                .iter()
                .map(|(k, e)| Reverse((e.expires_ms(), *k)))
                .collect();
            self.queue.push(Reverse((expires_ms, k)));
        }
    }

    fn local_group(local: &Endpoint, client: bool) -> Endpoint {
        // A client's local port is ephemeral: group by address alone.
        if client {
            Endpoint::new(local.addr, 0)
        } else {
            *local
        }
    }

    /// A server's peers connect from ephemeral ports: group them by address.
    fn remote_group(remote: &Endpoint, client: bool) -> Endpoint {
        if client {
            *remote
        } else {
            Endpoint::new(remote.addr, 0)
        }
    }

    /// Counts sockets that existed when tracing started.
    pub fn seed_before_tracing(&mut self, sockets: &[KernelTimewait], now_ns: u64) {
        let netns = self.own_netns.unwrap_or(0);
        for s in sockets {
            let client = is_ephemeral_side(s);
            let flags = substate_flag(s.substate) | if client { FLAG_CLIENT } else { 0 };
            let expires = self.rel_ms(now_ns + u64::from(s.expires_ms) * 1_000_000);
            self.insert(
                key(netns, &s.local, &s.remote),
                &Attribution::BeforeTracing,
                Self::local_group(&s.local, client),
                Self::remote_group(&s.remote, client),
                expires,
                flags,
            );
        }
    }

    /// A finished connection; adds its timewait socket if it left one.
    pub fn on_timeline(&mut self, t: &Timeline) {
        let Some(tw) = t.timewait else { return };
        let netns = t.netns.or(self.own_netns).unwrap_or(0);
        let client =
            t.role == Role::Client || (t.role == Role::Unknown && t.local.port > t.remote.port);
        let mut flags = substate_flag(tw.substate) | if client { FLAG_CLIENT } else { 0 };
        if self.own_netns.is_some() && t.netns.is_some() && t.netns != self.own_netns {
            flags |= FLAG_OTHER_NETNS;
        }
        let attribution = match &t.owner {
            Some(a) => Attribution::Owner(a.owner.clone()),
            None => Attribution::Unknown,
        };
        let local_group = Self::local_group(&t.local, client);
        let expires = self.rel_ms(t.closed_ns.saturating_add(tw.hold_ns));
        self.insert(
            key(netns, &t.local, &t.remote),
            &attribution,
            local_group,
            Self::remote_group(&t.remote, client),
            expires,
            flags,
        );
        self.created_since_snapshot += 1;
        if client {
            let id = |ep: &Endpoint| self.endpoints.ids.get(ep).copied().unwrap_or(OTHER);
            let pair = (id(&local_group), id(&t.remote));
            if pair.0 != OTHER && pair.1 != OTHER {
                self.dest_rates
                    .entry(pair)
                    .or_default()
                    .created_since_snapshot += 1;
            }
        }
    }

    /// A new connection on a 4-tuple ends the timewait socket that held it
    /// (tcp_tw_reuse on the client, or a SYN accepted on a TIME_WAIT server).
    pub fn on_established(&mut self, netns: Option<u32>, local: &Endpoint, remote: &Endpoint) {
        let netns = netns.or(self.own_netns).unwrap_or(0);
        self.remove(key(netns, local, remote));
    }

    /// Drops the entries whose time is up, soonest first, from the queue:
    /// no pass over the others.
    pub fn expire(&mut self, now_ns: u64) {
        let now = self.rel_ms(now_ns);
        while let Some(&Reverse((at, k))) = self.queue.peek() {
            if at > now {
                break;
            }
            self.queue.pop();
            if self.entries.get(&k).is_some_and(|e| e.expires_ms() == at) {
                self.remove(k);
            }
        }
    }

    /// Brings the entries of tcpwatch's own namespace in line with the
    /// kernel's list: entries it no longer lists go, substates and expiry
    /// times follow the kernel's (a FIN_WAIT2 timewait socket that gets the
    /// peer's FIN becomes TIME_WAIT and starts over), and the sockets it
    /// lists that tcpwatch has no entry for get one, as "just closed" or
    /// "not seen made", until their connection's events (if any) arrive
    /// or they expire. What it changed is counted ([`KernelCheck`]).
    ///
    /// `recent_ms`: how old an unmatched socket may be and still count as
    /// "just closed" (its events not processed yet: a second plus however
    /// far the event stream lags). With `count_unmatched` false (the user
    /// filters by process, which unmatched sockets have none of) unmatched
    /// sockets are left out.
    pub fn reconcile(
        &mut self,
        kernel: &[KernelTimewait],
        now_ns: u64,
        recent_ms: u32,
        count_unmatched: bool,
    ) {
        let netns = self.own_netns.unwrap_or(0);
        let mut listed: FastMap<u64, &KernelTimewait> =
            FastMap::with_capacity_and_hasher(kernel.len(), Default::default());
        for k in kernel {
            listed.insert(key(netns, &k.local, &k.remote), k);
        }
        let gone: Vec<u64> = self
            .entries
            .iter()
            .filter(|(k, e)| !e.has(FLAG_OTHER_NETNS) && !listed.contains_key(k))
            .map(|(k, _)| *k)
            .collect();
        for k in &gone {
            self.remove(*k);
        }
        let now_ms = self.rel_ms(now_ns);
        let just_closed = self.owners.ids.get(&Attribution::JustClosed).copied();
        let (mut in_flight, mut not_seen) = (0u64, 0u64);
        for (k, kt) in &listed {
            // A socket past its expiry that the kernel has not reaped yet
            // (many expiring at once) says 0 ms: it still exists, and
            // counts until a list lacks it.
            let expires = now_ms
                .saturating_add(kt.expires_ms.max(1))
                .min(EXPIRES_MASK);
            let flags = substate_flag(kt.substate);
            // Unmatched sockets the kernel made within `recent_ms` are
            // connections whose events are still on their way (the
            // correlator holds a closed socket a moment for a late RST);
            // older ones were not seen made.
            let recent = match kt.substate {
                TimewaitSubstate::TimeWait => {
                    TIME_WAIT_MS.saturating_sub(kt.expires_ms) < recent_ms
                }
                TimewaitSubstate::FinWait2 => false,
            };
            if let Some(old) = self.entries.get(k).copied() {
                let mut new = old;
                new.expires_and_flags =
                    (old.expires_and_flags & !(EXPIRES_MASK | FLAG_FIN_WAIT2)) | flags | expires;
                if just_closed.is_some_and(|id| id == old.owner) && !recent {
                    // Its events never came: not seen made after all.
                    self.owners.release(old.owner);
                    new.owner = self.owners.acquire(&Attribution::NotSeen);
                    not_seen += 1;
                }
                self.replace(*k, old, new);
            } else if count_unmatched {
                let (attribution, n) = if recent {
                    (Attribution::JustClosed, &mut in_flight)
                } else {
                    (Attribution::NotSeen, &mut not_seen)
                };
                *n += 1;
                let client = is_ephemeral_side(kt);
                self.insert(
                    *k,
                    &attribution,
                    Self::local_group(&kt.local, client),
                    Self::remote_group(&kt.remote, client),
                    expires,
                    flags | FLAG_UNMATCHED,
                );
            }
        }
        let prev = self.check.map(|c| c.1).unwrap_or_default();
        self.check = Some((
            now_ns,
            KernelCheck {
                age_s: 0.0,
                dropped: gone.len() as u64,
                not_seen,
                in_flight,
                checks: prev.checks + 1,
                dropped_since_start: prev.dropped_since_start + gone.len() as u64,
                not_seen_since_start: prev.not_seen_since_start + not_seen,
            },
        ));
        self.kernel_listed = Some(kernel.len() as u64);
    }

    /// How many entries have the attribution `a`.
    fn count_of(&self, a: &Attribution) -> u64 {
        self.owners
            .ids
            .get(a)
            .and_then(|id| self.tally.by_owner.get(id))
            .copied()
            .unwrap_or(0)
    }

    /// Groups the counts of `counts` by name, and keeps the top `top`.
    fn groups(
        counts: &FastMap<u32, u64>,
        total: u64,
        top: usize,
        name: impl Fn(u32) -> Group,
    ) -> Vec<Group> {
        let mut named: FastMap<String, Group> = FastMap::default();
        for (&id, &n) in counts {
            let g = name(id);
            named.entry(g.key.clone()).or_insert(g).count += n;
        }
        rank(named.into_values().collect(), total, top)
    }

    /// Groups the entries by the process that closed first, as
    /// [`process_key`] names it, with the pids in each group; those the
    /// kernel listed without tcpwatch seeing them made come last.
    fn process_groups(&self, total: u64, top: usize) -> Vec<Group> {
        struct Acc {
            group: Group,
            pids: HashMap<u32, u64>,
            cgroups: Option<Option<u64>>,
        }
        let mut named: HashMap<String, Acc> = HashMap::new();
        for (&id, &n) in &self.tally.by_owner {
            let (key, owner) = match self.owners.get(id) {
                Some(Attribution::Owner(o)) => (process_key(o), Some(o)),
                Some(Attribution::BeforeTracing) => ("(before tracing)".to_string(), None),
                Some(Attribution::Unknown) => ("(owner unknown)".to_string(), None),
                Some(Attribution::JustClosed | Attribution::NotSeen) => continue,
                None => ("other".to_string(), None),
            };
            let acc = named.entry(key.clone()).or_insert_with(|| Acc {
                group: named_group(&key),
                pids: HashMap::new(),
                cgroups: None,
            });
            acc.group.count += n;
            if let Some(o) = owner {
                acc.group.comm = Some(o.comm.clone());
                *acc.pids.entry(o.pid).or_default() += n;
                let cgroup = Some(o.cgroup_id).filter(|c| *c != 0);
                acc.cgroups = match acc.cgroups {
                    None => Some(cgroup),
                    Some(c) if c == cgroup => Some(c),
                    Some(_) => Some(None),
                };
            }
        }
        let v: Vec<Group> = named
            .into_values()
            .map(|mut acc| {
                if !acc.pids.is_empty() {
                    let mut pids: Vec<(u32, u64)> = acc.pids.into_iter().collect();
                    pids.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                    let g = &mut acc.group;
                    g.processes = Some(pids.len() as u64);
                    g.pid = (pids.len() == 1).then(|| pids[0].0);
                    g.pids = pids.into_iter().take(MAX_PIDS).map(|p| p.0).collect();
                    g.cgroup = acc.cgroups.flatten();
                }
                acc.group
            })
            .collect();
        let mut out = rank(v, total, top);
        for (name, n) in [
            (
                "(closed in the last moment, not yet correlated)",
                self.count_of(&Attribution::JustClosed),
            ),
            (
                "(not seen made: lost events)",
                self.count_of(&Attribution::NotSeen),
            ),
        ] {
            if n > 0 {
                let mut g = named_group_of(name, n);
                g.share = share(n, total);
                out.push(g);
            }
        }
        out
    }

    /// The figures for one interval ending at `now_ns`, from the counts
    /// kept as entries came and went.
    pub fn snapshot(
        &mut self,
        now_ns: u64,
        wall: String,
        top: usize,
        kernel: KernelView,
    ) -> Snapshot {
        self.expire(now_ns);
        let interval_s = self
            .last_snapshot_ns
            .map_or(0.0, |prev| now_ns.saturating_sub(prev) as f64 / 1e9);
        self.last_snapshot_ns = Some(now_ns);
        let created = std::mem::take(&mut self.created_since_snapshot);
        let rate_last_interval = if interval_s > 0.0 {
            created as f64 / interval_s
        } else {
            0.0
        };
        self.history.push_back((created, interval_s));
        let mut span: f64 = self.history.iter().map(|h| h.1).sum();
        while span > 60.0 && self.history.len() > 1 {
            if let Some((_, s)) = self.history.pop_front() {
                span -= s;
            }
        }
        let minute_count: u64 = self.history.iter().map(|h| h.0).sum();
        let rate_last_minute = if span > 0.0 {
            minute_count as f64 / span
        } else {
            0.0
        };

        // Destination rates over the last interval: the current rate, so
        // the forecast ends with the traffic (a decaying average kept
        // warning for about a minute after it stopped).
        for d in self.dest_rates.values_mut() {
            d.rate = if interval_s > 0.0 {
                f64::from(d.created_since_snapshot) / interval_s
            } else {
                0.0
            };
            d.created_since_snapshot = 0;
        }
        self.dest_rates.retain(|_, d| d.rate > 0.0);

        let total = self.entries.len() as u64;
        let fin_wait2 = self.tally.fin_wait2;
        let time_wait = total.saturating_sub(fin_wait2);

        let by_process = self.process_groups(total, top);
        let endpoints = &self.endpoints;
        let endpoint_name = |id: u32| match endpoints.get(id) {
            Some(ep) => named_group(&group_name(ep)),
            None => named_group("other"),
        };
        let by_remote = Self::groups(&self.tally.by_remote, total, top, endpoint_name);
        let by_local = Self::groups(&self.tally.by_local, total, top, endpoint_name);

        let mut dests: Vec<((u32, u32), u64)> = self
            .tally
            .client_pairs
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        dests.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let reuse = kernel.tw_reuse.unwrap_or(0);
        let timestamps_on = kernel.timestamps.unwrap_or(1) != 0;
        let destinations: Vec<Destination> = dests
            .into_iter()
            .take(top)
            .map(|(pair, held)| {
                let local = endpoints.get(pair.0).copied();
                let ep = endpoints.get(pair.1).copied();
                let rate = self.dest_rates.get(&pair).map_or(0.0, |d| d.rate);
                // tcp_tw_reuse=2 is for loopback traffic: a loopback
                // address at either end (tcp_twsk_unique()).
                let loopback = [local, ep].iter().flatten().any(|e| is_loopback(&e.addr));
                let reuse_applies = timestamps_on
                    && match reuse {
                        1 => true,
                        2 => loopback,
                        _ => false,
                    };
                let steady = rate * 60.0;
                let exhaustion_s = match kernel.port_range {
                    Some(range) if !reuse_applies && rate > 0.0 && steady >= f64::from(range) => {
                        // Ports free up as the oldest expire (about
                        // held/60 per second): the net drain is the rest.
                        let net = rate - held as f64 / 60.0;
                        let free = f64::from(range).max(held as f64) - held as f64;
                        Some(if net > 0.0 { free / net } else { f64::INFINITY })
                            .filter(|s| s.is_finite())
                    }
                    _ => None,
                };
                Destination {
                    local: local.map_or("other".into(), |e| e.addr.to_string()),
                    remote: ep.map_or("other".into(), |e| e.to_string()),
                    ports_held: held,
                    port_range: kernel.port_range,
                    rate_per_s: rate,
                    exhaustion_s,
                    steady_state_ports: steady,
                    tw_reuse_applies: reuse_applies,
                }
            })
            .collect();

        let mut snap = Snapshot {
            ts: wall,
            netns: self.own_netns,
            netns_name: None,
            interval_s,
            total,
            time_wait,
            fin_wait2,
            before_tracing: self.count_of(&Attribution::BeforeTracing),
            unattributed: self.count_of(&Attribution::NotSeen),
            just_closed: self.count_of(&Attribution::JustClosed),
            other_netns: self.tally.other_netns,
            kernel_listed: self.kernel_listed.take(),
            check: self.check.map(|(at, c)| KernelCheck {
                age_s: now_ns.saturating_sub(at) as f64 / 1e9,
                ..c
            }),
            kernel,
            created_last_interval: created,
            rate_last_interval,
            rate_last_minute,
            by_process,
            by_remote,
            by_local,
            by_container: Vec::new(),
            destinations,
            churn: Vec::new(),
            findings: Vec::new(),
            from_recording: false,
            untracked: self.untracked,
        };
        snap.findings = findings(&snap, &self.server_side_share());
        snap
    }

    /// Timewait sockets held on the server side, by local endpoint.
    fn server_side_share(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .tally
            .server_local
            .iter()
            .map(|(&id, &n)| {
                (
                    self.endpoints
                        .get(id)
                        .map_or("other".into(), |e| e.to_string()),
                    n,
                )
            })
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Timewait sockets by the cgroup id of the process that closed first
    /// (0: owner unknown, made before tracing, or known only from the
    /// kernel's list).
    pub fn by_cgroup(&self) -> HashMap<u64, u64> {
        let mut out: HashMap<u64, u64> = HashMap::new();
        for (&id, &n) in &self.tally.by_owner {
            let cgroup = match self.owners.get(id) {
                Some(Attribution::Owner(o)) => o.cgroup_id,
                _ => 0,
            };
            *out.entry(cgroup).or_default() += n;
        }
        out
    }

    /// Interned groups, for the memory figure.
    pub fn groups_len(&self) -> (usize, usize) {
        (self.owners.len(), self.endpoints.len())
    }
}

/// How an endpoint group is shown: `ADDR:PORT`, or `ADDR:*` for a group of
/// ephemeral ports.
fn group_name(ep: &Endpoint) -> String {
    if ep.port == 0 {
        format!("{}:*", bracket(ep.addr))
    } else {
        ep.to_string()
    }
}

/// The process group a socket's owner falls in: its command name (the
/// container has a grouping of its own, [`NO_CONTAINER`] and
/// `Snapshot::by_container`).
fn process_key(o: &Owner) -> String {
    o.comm.clone()
}

/// The container group of sockets whose owner is in no container (or is
/// unknown).
pub const NO_CONTAINER: &str = "(none)";

/// The `top` largest groups, largest first (ties by key), with their
/// shares of `total`, and the rest summed as `other`.
/// Keys are distinct (every caller merges its groups by key), so the order
/// is total: the top are picked first, and only they are sorted.
pub fn rank(mut v: Vec<Group>, total: u64, top: usize) -> Vec<Group> {
    let order = |a: &Group, b: &Group| b.count.cmp(&a.count).then(a.key.cmp(&b.key));
    let mut rest = 0u64;
    if v.len() > top {
        v.select_nth_unstable_by(top, order);
        rest = v.drain(top..).map(|g| g.count).sum();
    }
    v.sort_unstable_by(order);
    let mut out: Vec<Group> = Vec::with_capacity(v.len() + 1);
    for mut g in v {
        g.share = share(g.count, total);
        out.push(g);
    }
    if rest > 0 {
        let mut g = named_group("other");
        g.count = rest;
        g.share = share(rest, total);
        out.push(g);
    }
    out
}

/// A group of `count` sockets with only a name.
pub fn named_group_of(name: &str, count: u64) -> Group {
    Group {
        count,
        ..named_group(name)
    }
}

fn named_group(name: &str) -> Group {
    Group {
        key: name.to_string(),
        pid: None,
        pids: Vec::new(),
        processes: None,
        comm: None,
        cgroup: None,
        count: 0,
        share: 0.0,
    }
}

fn bracket(addr: IpAddr) -> String {
    match addr {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

fn share(n: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        n as f64 / total as f64
    }
}

fn substate_flag(s: TimewaitSubstate) -> u32 {
    match s {
        TimewaitSubstate::FinWait2 => FLAG_FIN_WAIT2,
        TimewaitSubstate::TimeWait => 0,
    }
}

/// For a socket seen only in the kernel's list: the side with the higher
/// port is taken for the client (ephemeral ports sit high).
fn is_ephemeral_side(s: &KernelTimewait) -> bool {
    s.local.port > s.remote.port
}

fn is_loopback(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// Plain-words conclusions, each following from figures in the snapshot.
fn findings(s: &Snapshot, server_side: &[(String, u64)]) -> Vec<String> {
    let mut out = Vec::new();
    if s.total == 0 {
        out.push("no timewait sockets".to_string());
        return out;
    }
    if let Some(top) = s.by_process.first().filter(|g| g.processes.is_some()) {
        let from = match (top.pid, top.processes) {
            (Some(pid), _) => format!("pid {pid}"),
            (None, Some(n)) => format!("{n} processes"),
            (None, None) => "unknown processes".to_string(),
        };
        out.push(format!(
            "{} closed first on {} of {} timewait sockets ({}), from {from}",
            top.key,
            top.count,
            s.total,
            pct(top.share)
        ));
    }
    if let Some((local, n)) = server_side.first() {
        let n = *n;
        if n * 5 >= s.total {
            out.push(format!(
                "{n} timewait sockets ({}) are held by the server side at {local}: the server closes connections first; if its clients closed first (or kept connections alive), the TIME_WAIT would sit on their side instead",
                pct(share(n, s.total))
            ));
        }
    }
    if let Some(d) = s.destinations.first().filter(|d| d.rate_per_s >= 1.0) {
        out.push(format!(
            "connections from {} to {} are opened and closed at {:.0}/s; keep-alive or pooling toward it would remove about {:.0} timewait sockets per second",
            d.local, d.remote, d.rate_per_s, d.rate_per_s
        ));
    }
    for d in &s.destinations {
        match (d.exhaustion_s, d.port_range) {
            (Some(secs), Some(range)) => out.push(format!(
                "ephemeral ports of {} toward {} run out in about {:.0} s: {} of {} are held in TIME_WAIT and {:.0}/s more are made",
                d.local, d.remote, secs, d.ports_held, range, d.rate_per_s
            )),
            (None, Some(range)) if d.tw_reuse_applies && d.steady_state_ports >= f64::from(range) => out.push(format!(
                "from {} toward {} the TIME_WAIT ports would exceed the {} available, but tcp_tw_reuse lets new connections reuse them",
                d.local, d.remote, range
            )),
            _ => {}
        }
    }
    if let Some(n) = s.kernel.overflow_last_interval.filter(|n| *n > 0) {
        out.push(format!(
            "tcp_max_tw_buckets is overflowing now: {n} connections closed without a timewait socket in the last interval"
        ));
    }
    if let (Some(max), Some(tw)) = (s.kernel.max_tw_buckets, s.kernel.sockstat_tw) {
        if max > 0 && tw * 10 >= max * 8 {
            out.push(format!(
                "the kernel holds {tw} timewait sockets, {} of tcp_max_tw_buckets ({max})",
                pct(share(tw, max))
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::owner::{Attribution as OwnerAttribution, OwnerSource};

    fn ep(s: &str) -> Endpoint {
        Endpoint::from(s.parse::<std::net::SocketAddr>().unwrap())
    }

    fn timeline(local: &str, remote: &str, pid: u32, role: Role, closed_ns: u64) -> Timeline {
        let owner = OwnerAttribution {
            owner: Owner {
                pid,
                comm: format!("p{pid}"),
                cgroup_id: 0,
            }
            .into(),
            source: OwnerSource::Observed,
        };
        Timeline::sample(ep(local), ep(remote), Some(owner), role, closed_ns)
    }

    fn kview() -> KernelView {
        KernelView {
            port_range: Some(28232),
            tw_reuse: Some(0),
            timestamps: Some(1),
            ..KernelView::default()
        }
    }

    #[test]
    fn attributes_and_groups_add_up() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        for i in 0..30u16 {
            b.on_timeline(&timeline(
                &format!("10.0.0.1:{}", 40000 + i),
                "10.0.0.9:80",
                100,
                Role::Client,
                1_000_000_000,
            ));
        }
        for i in 0..10u16 {
            b.on_timeline(&timeline(
                "10.0.0.1:8080",
                &format!("10.0.0.5:{}", 50000 + i),
                200,
                Role::Server,
                1_000_000_000,
            ));
        }
        let s = b.snapshot(2_000_000_000, "t".into(), 5, kview());
        assert_eq!(s.total, 40);
        assert_eq!(s.time_wait, 40);
        let sum: u64 = s.by_process.iter().map(|g| g.count).sum();
        assert_eq!(sum, s.total, "process groups add up to the total");
        assert_eq!(s.by_process[0].pid, Some(100));
        assert_eq!(s.by_process[0].count, 30);
        assert!((s.by_process[0].share - 0.75).abs() < 1e-9);
        assert_eq!(s.by_remote[0].key, "10.0.0.9:80");
        assert_eq!(s.by_local[0].key, "10.0.0.1:*");
        assert_eq!(s.by_local[0].count, 30);
        assert_eq!(s.by_local[1].key, "10.0.0.1:8080");
        // A server's peers are grouped by address, not by ephemeral port.
        assert!(
            s.by_remote
                .iter()
                .any(|g| g.key == "10.0.0.5:*" && g.count == 10),
            "{:?}",
            s.by_remote
        );
        assert_eq!(s.destinations[0].remote, "10.0.0.9:80");
        assert_eq!(s.destinations[0].ports_held, 30);
        assert!(
            s.findings
                .iter()
                .any(|f| f == "p100 closed first on 30 of 40 timewait sockets (75%), from pid 100"),
            "{:?}",
            s.findings
        );
        assert!(
            s.findings
                .iter()
                .any(|f| f.contains("server side at 10.0.0.1:8080")),
            "{:?}",
            s.findings
        );
    }

    #[test]
    fn processes_are_grouped_by_command_name() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        // 150 runs of one command, one connection each, and one other
        // process with two.
        let curl = |pid: u32, port: u16| {
            let mut t = timeline(
                &format!("10.0.0.1:{port}"),
                "10.0.0.9:80",
                pid,
                Role::Client,
                1,
            );
            let a = t.owner.as_mut().unwrap();
            a.owner = Owner {
                pid,
                comm: "curl".into(),
                cgroup_id: 44,
            }
            .into();
            t
        };
        for i in 0..150u32 {
            b.on_timeline(&curl(8000 + i, 40000 + i as u16));
        }
        for port in [50000, 50001] {
            b.on_timeline(&timeline(
                &format!("10.0.0.1:{port}"),
                "10.0.0.9:80",
                9,
                Role::Client,
                1,
            ));
        }
        let s = b.snapshot(1_000_000_000, "t".into(), 5, kview());
        let g = &s.by_process[0];
        assert_eq!(
            (g.key.as_str(), g.count, g.comm.as_deref()),
            ("curl", 150, Some("curl"))
        );
        assert_eq!((g.pid, g.processes, g.cgroup), (None, Some(150), Some(44)));
        assert_eq!(g.pids.len(), MAX_PIDS);
        assert!(g.pids.iter().all(|p| (8000..8150).contains(p)), "{g:?}");
        let p9 = &s.by_process[1];
        assert_eq!(
            (p9.key.as_str(), p9.pid, p9.processes, p9.count),
            ("p9", Some(9), Some(1), 2)
        );
        assert_eq!(p9.pids, [9]);
        assert_eq!(s.by_process.len(), 2);
        assert!(
            s.findings.iter().any(|f| f
                == "curl closed first on 150 of 152 timewait sockets (99%), from 150 processes"),
            "{:?}",
            s.findings
        );
        // The text view: one row each, the pid or the number of processes.
        let text = crate::views::timewait::timewait_text(&s, crate::host::clock::Zone::Utc);
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("  curl") || l.starts_with("  p9"))
            .collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert!(
            rows[0].contains("150 processes") && rows[0].contains(" 44"),
            "{text}"
        );
        assert!(rows[1].ends_with("%  9"), "{text}");
        // Endpoint groups carry no process fields in the JSON.
        let json = crate::views::timewait::timewait_json(&s);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(v["by_remote"][0].get("pids").is_none(), "{json}");
        assert_eq!(v["by_process"][0]["processes"], 150);
    }

    #[test]
    fn top_n_folds_the_rest_into_other() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        for pid in 1..=5u32 {
            for i in 0..pid {
                b.on_timeline(&timeline(
                    &format!("10.0.0.1:{}", 40000 + pid * 100 + i),
                    "10.0.0.9:80",
                    pid,
                    Role::Client,
                    1,
                ));
            }
        }
        let s = b.snapshot(10, "t".into(), 2, kview());
        assert_eq!(s.by_process.len(), 3);
        assert_eq!(s.by_process[0].pid, Some(5));
        assert_eq!(s.by_process[1].pid, Some(4));
        assert_eq!(s.by_process[2].key, "other");
        assert_eq!(s.by_process[2].count, 1 + 2 + 3);
    }

    #[test]
    fn entries_expire_and_groups_are_released() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        b.on_timeline(&timeline(
            "10.0.0.1:40000",
            "10.0.0.9:80",
            1,
            Role::Client,
            1_000_000_000,
        ));
        let s = b.snapshot(30_000_000_000, "t".into(), 5, kview());
        assert_eq!(s.total, 1);
        let s = b.snapshot(61_500_000_000, "t".into(), 5, kview());
        assert_eq!(s.total, 0);
        assert_eq!(b.groups_len(), (0, 0));
    }

    #[test]
    fn sockets_the_kernel_lists_as_overdue_still_count() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        let a = timeline("10.0.0.1:40000", "10.0.0.9:80", 1, Role::Client, 1);
        b.on_timeline(&a);
        // Expiring en masse, the kernel lists it past its time (0 ms left).
        let kernel = [KernelTimewait {
            local: a.local,
            remote: a.remote,
            substate: TimewaitSubstate::TimeWait,
            expires_ms: 0,
        }];
        b.reconcile(&kernel, 61_000_000_000, 1000, true);
        let s = b.snapshot(61_000_000_000, "t".into(), 5, kview());
        assert_eq!((s.total, s.kernel_listed), (1, Some(1)));
        assert_eq!(s.unattributed, 0);
        // Once the kernel no longer lists it, it goes.
        b.reconcile(&[], 61_100_000_000, 1000, true);
        let s = b.snapshot(61_100_000_000, "t".into(), 5, kview());
        assert_eq!(s.total, 0);
    }

    #[test]
    fn reconcile_follows_the_kernel() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        b.seed_before_tracing(
            &[KernelTimewait {
                local: ep("10.0.0.1:41000"),
                remote: ep("10.0.0.9:80"),
                substate: TimewaitSubstate::TimeWait,
                expires_ms: 5000,
            }],
            0,
        );
        let a = timeline("10.0.0.1:40000", "10.0.0.9:80", 1, Role::Client, 1);
        let overflowed = timeline("10.0.0.1:40001", "10.0.0.9:80", 1, Role::Client, 1);
        b.on_timeline(&a);
        b.on_timeline(&overflowed);
        // The kernel lists the seeded one, `a`, and one tcpwatch never saw.
        let kernel = [
            KernelTimewait {
                local: ep("10.0.0.1:41000"),
                remote: ep("10.0.0.9:80"),
                substate: TimewaitSubstate::TimeWait,
                expires_ms: 4000,
            },
            KernelTimewait {
                local: a.local,
                remote: a.remote,
                substate: TimewaitSubstate::TimeWait,
                expires_ms: 59000,
            },
            KernelTimewait {
                local: ep("10.0.0.1:42000"),
                remote: ep("10.0.0.9:80"),
                substate: TimewaitSubstate::TimeWait,
                expires_ms: 50000,
            },
            KernelTimewait {
                local: ep("10.0.0.1:42001"),
                remote: ep("10.0.0.9:80"),
                substate: TimewaitSubstate::TimeWait,
                expires_ms: 59800,
            },
        ];
        b.reconcile(&kernel, 1_000_000_000, 1000, true);
        let s = b.snapshot(1_000_000_000, "t".into(), 5, kview());
        assert_eq!(s.total, 4);
        assert_eq!(s.kernel_listed, Some(4));
        assert_eq!(s.before_tracing, 1);
        assert_eq!(s.unattributed, 1, "made 10 s ago and never seen");
        assert_eq!(
            s.just_closed, 1,
            "made 200 ms ago: its events are on their way"
        );
        let sum: u64 = s.by_process.iter().map(|g| g.count).sum();
        assert_eq!(sum, 4);
        assert!(s
            .by_process
            .iter()
            .any(|g| g.key == "(before tracing)" && g.count == 1));
    }

    /// The kept counts, recounted from the entries.
    fn recount(b: &TimewaitBook) -> Tally {
        let mut t = Tally::default();
        for e in b.entries.values() {
            t.add(e);
        }
        t
    }

    fn assert_tally_is_recount(b: &TimewaitBook) {
        let (kept, fresh) = (&b.tally, recount(b));
        assert_eq!(kept.by_owner, fresh.by_owner);
        assert_eq!(kept.by_local, fresh.by_local);
        assert_eq!(kept.by_remote, fresh.by_remote);
        assert_eq!(kept.client_pairs, fresh.client_pairs);
        assert_eq!(kept.server_local, fresh.server_local);
        assert_eq!(
            (kept.fin_wait2, kept.other_netns),
            (fresh.fin_wait2, fresh.other_netns)
        );
    }

    #[test]
    fn kept_counts_follow_every_change_and_expiry_comes_from_the_queue() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        // Closes spread over 3 s, clients and servers, some FIN_WAIT2.
        let mut made = Vec::new();
        for i in 0..3000u64 {
            let closed = i * 1_000_000;
            let t = if i % 3 == 0 {
                timeline(
                    "10.0.0.1:8080",
                    &format!("10.0.0.{}:{}", 2 + i % 5, 30000 + i),
                    (i % 4) as u32,
                    Role::Server,
                    closed,
                )
            } else {
                timeline(
                    &format!("10.0.0.{}:{}", 1 + i % 2, 20000 + i),
                    &format!("10.0.0.9:{}", 80 + i % 3),
                    (i % 7) as u32,
                    Role::Client,
                    closed,
                )
            };
            b.on_timeline(&t);
            made.push(t);
            if i % 10 == 5 {
                // Reuse of an earlier 4-tuple.
                let r = &made[(i / 2) as usize];
                b.on_established(Some(7), &r.local, &r.remote);
            }
        }
        assert_tally_is_recount(&b);
        let n = b.len();
        // The kernel lists all but the first 100 kept, re-timed, some in
        // FIN_WAIT2, and 50 tcpwatch never saw (20 of them just made).
        let mut kernel: Vec<KernelTimewait> = made
            .iter()
            .skip(100)
            .filter(|t| b.entries.contains_key(&key(7, &t.local, &t.remote)))
            .enumerate()
            .map(|(i, t)| KernelTimewait {
                local: t.local,
                remote: t.remote,
                substate: if i % 11 == 0 {
                    TimewaitSubstate::FinWait2
                } else {
                    TimewaitSubstate::TimeWait
                },
                expires_ms: 50_000 + i as u32,
            })
            .collect();
        let listed_known = kernel.len();
        let dropped = n - listed_known;
        for i in 0..50u16 {
            kernel.push(KernelTimewait {
                local: ep(&format!("10.0.0.3:{}", 50000 + i)),
                remote: ep("10.0.0.9:443"),
                substate: TimewaitSubstate::TimeWait,
                expires_ms: if i < 20 { 59_900 } else { 40_000 },
            });
        }
        b.reconcile(&kernel, 4_000_000_000, 1000, true);
        assert_tally_is_recount(&b);
        let s = b.snapshot(4_000_000_000, "t".into(), 5, kview());
        assert_eq!(s.total, kernel.len() as u64);
        assert_eq!(s.kernel_listed, Some(kernel.len() as u64));
        assert_eq!((s.just_closed, s.unattributed), (20, 30));
        let c = s.check.unwrap();
        assert_eq!(
            (c.dropped, c.not_seen, c.in_flight, c.checks),
            (dropped as u64, 30, 20, 1)
        );
        // Unmatched sockets hold no destination's ports.
        assert!(s.destinations.iter().all(|d| d.remote != "10.0.0.9:443"));
        // The next snapshot, without a check: not listed, the check aged.
        let s = b.snapshot(5_000_000_000, "t".into(), 5, kview());
        assert_eq!(s.kernel_listed, None);
        assert_eq!(s.check.map(|c| c.age_s), Some(1.0));
        // One of the just-made ones is correlated: it is attributed now.
        let late = timeline(
            "10.0.0.3:50000",
            "10.0.0.9:443",
            99,
            Role::Client,
            3_990_000_000,
        );
        b.on_timeline(&late);
        let s = b.snapshot(6_000_000_000, "t".into(), 20, kview());
        assert_eq!((s.just_closed, s.total), (19, kernel.len() as u64));
        assert!(
            s.by_process
                .iter()
                .any(|g| g.pid == Some(99) && g.count == 1),
            "{:?}",
            s.by_process
        );
        // Each expires at its own time, from the queue: the ones the
        // kernel gave 40 s first, then the re-timed ones from 54 s on.
        let s = b.snapshot(44_000_000_001, "t".into(), 5, kview());
        assert_eq!(s.total, kernel.len() as u64 - 30);
        let s = b.snapshot(54_000_000_000 + 100_000_000, "t".into(), 5, kview());
        assert!(s.total < listed_known as u64, "{}", s.total);
        assert_tally_is_recount(&b);
        let s = b.snapshot(70_000_000_000, "t".into(), 5, kview());
        assert_eq!(s.total, 0);
        assert_eq!(b.groups_len(), (0, 0));
        assert!(b.tally.by_owner.is_empty() && b.tally.client_pairs.is_empty());
        // A later check finds the kernel agrees: nothing corrected.
        b.reconcile(&[], 70_000_000_000, 1000, true);
        let c = b
            .snapshot(70_000_000_000, "t".into(), 5, kview())
            .check
            .unwrap();
        assert_eq!((c.dropped, c.not_seen, c.checks), (0, 0, 2));
        assert_eq!(c.dropped_since_start, dropped as u64);
    }

    #[test]
    fn reuse_of_a_four_tuple_ends_its_timewait() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        let t = timeline("10.0.0.1:40000", "10.0.0.9:80", 1, Role::Client, 1);
        b.on_timeline(&t);
        assert_eq!(b.len(), 1);
        b.on_established(Some(7), &t.local, &t.remote);
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn exhaustion_forecast_follows_rate_and_reuse() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        let mut port = 10000u16;
        let _ = b.snapshot(0, "t".into(), 5, kview());
        // 1000/s for 2 s toward one destination.
        for _ in 0..2000 {
            b.on_timeline(&timeline(
                &format!("10.0.0.1:{port}"),
                "10.0.0.9:80",
                1,
                Role::Client,
                1,
            ));
            port += 1;
        }
        let s = b.snapshot(2_000_000_000, "t".into(), 5, kview());
        let d = &s.destinations[0];
        assert!((d.rate_per_s - 1000.0).abs() < 1e-6, "{}", d.rate_per_s);
        // 28232 ports, 2000 held, 1000/s in, ~33/s freed: about 27 s.
        let secs = d.exhaustion_s.unwrap();
        assert!(
            (secs - (26232.0 / (1000.0 - 2000.0 / 60.0))).abs() < 0.01,
            "{secs}"
        );
        assert!(
            s.findings
                .iter()
                .any(|f| f.contains("run out in about 27 s")),
            "{:?}",
            s.findings
        );
        // The traffic stops: the next snapshot forecasts nothing, though
        // the ports are still held.
        let s = b.snapshot(3_000_000_000, "t".into(), 5, kview());
        let d = &s.destinations[0];
        assert_eq!(
            (d.ports_held, d.rate_per_s, d.exhaustion_s),
            (2000, 0.0, None)
        );
        assert!(
            !s.findings
                .iter()
                .any(|f| f.contains("run out") || f.contains("opened and closed")),
            "{:?}",
            s.findings
        );
        assert!(
            crate::views::timewait::timewait_text(&s, crate::host::clock::Zone::Utc)
                .contains("not being used up now"),
            "{}",
            crate::views::timewait::timewait_text(&s, crate::host::clock::Zone::Utc)
        );
        // With tcp_tw_reuse=1 there is no exhaustion.
        let mut kv = kview();
        kv.tw_reuse = Some(1);
        for _ in 0..2000 {
            b.on_timeline(&timeline(
                &format!("10.0.0.1:{port}"),
                "10.0.0.9:80",
                1,
                Role::Client,
                1,
            ));
            port += 1;
        }
        let s = b.snapshot(4_000_000_000, "t".into(), 5, kv);
        assert!(s.destinations[0].tw_reuse_applies);
        assert_eq!(s.destinations[0].exhaustion_s, None);
    }

    #[test]
    fn ports_are_counted_per_local_address() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        let _ = b.snapshot(0, "t".into(), 10, kview());
        // Four local addresses, 1500 connections each to one destination,
        // in one second: each address has its own 28232 ports.
        for a in 2..=5u16 {
            for i in 0..1500u16 {
                b.on_timeline(&timeline(
                    &format!("10.0.0.{a}:{}", 30000 + i),
                    "10.0.0.9:80",
                    1,
                    Role::Client,
                    1,
                ));
            }
        }
        let s = b.snapshot(1_000_000_000, "t".into(), 10, kview());
        let groups: Vec<(&str, &str, u64)> = s
            .destinations
            .iter()
            .map(|d| (d.local.as_str(), d.remote.as_str(), d.ports_held))
            .collect();
        assert_eq!(
            groups,
            [
                ("10.0.0.2", "10.0.0.9:80", 1500),
                ("10.0.0.3", "10.0.0.9:80", 1500),
                ("10.0.0.4", "10.0.0.9:80", 1500),
                ("10.0.0.5", "10.0.0.9:80", 1500)
            ]
        );
        for d in &s.destinations {
            assert!((d.rate_per_s - 1500.0).abs() < 1e-6, "{d:?}");
            // 26732 free ports, 1500/s in and 25/s freed: about 18 s (the
            // sum over the addresses, 6000, would say 3.8 s).
            let secs = d.exhaustion_s.unwrap();
            assert!((secs - 26732.0 / (1500.0 - 25.0)).abs() < 0.01, "{secs}");
        }
        let text = crate::views::timewait::timewait_text(&s, crate::host::clock::Zone::Utc);
        assert!(
            text.contains("10.0.0.3 -> 10.0.0.9:80") && text.contains("FROM -> TOWARD"),
            "{text}"
        );
        assert!(
            s.findings
                .iter()
                .any(|f| f.contains("ephemeral ports of 10.0.0.2 toward 10.0.0.9:80 run out in about 18 s: 1500 of 28232")),
            "{:?}",
            s.findings
        );
    }

    #[test]
    fn loopback_reuse_follows_either_end() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        for (local, remote) in [("127.0.0.2", "10.0.0.9:80"), ("10.0.0.1", "10.0.0.9:80")] {
            b.on_timeline(&timeline(
                &format!("{local}:40000"),
                remote,
                1,
                Role::Client,
                1,
            ));
        }
        let mut kv = kview();
        kv.tw_reuse = Some(2);
        let s = b.snapshot(1_000_000, "t".into(), 5, kv);
        let applies: Vec<(&str, bool)> = s
            .destinations
            .iter()
            .map(|d| (d.local.as_str(), d.tw_reuse_applies))
            .collect();
        assert!(applies.contains(&("127.0.0.2", true)), "{applies:?}");
        assert!(applies.contains(&("10.0.0.1", false)), "{applies:?}");
        // Without timestamps tcp_tw_reuse does nothing.
        kv.timestamps = Some(0);
        let s = b.snapshot(2_000_000, "t".into(), 5, kv);
        assert!(s.destinations.iter().all(|d| !d.tw_reuse_applies));
    }

    #[test]
    fn overflow_is_a_finding() {
        let mut b = TimewaitBook::new(TimewaitOptions::default(), Some(7), 0);
        b.on_timeline(&timeline(
            "10.0.0.1:40000",
            "10.0.0.9:80",
            1,
            Role::Client,
            1,
        ));
        let mut kv = kview();
        kv.overflow_last_interval = Some(12);
        kv.max_tw_buckets = Some(100);
        kv.sockstat_tw = Some(95);
        let s = b.snapshot(1_000_000_000, "t".into(), 5, kv);
        assert!(
            s.findings.iter().any(|f| f.contains("overflowing now: 12")),
            "{:?}",
            s.findings
        );
        assert!(
            s.findings.iter().any(|f| f.contains("95%")),
            "{:?}",
            s.findings
        );
    }

    #[test]
    fn memory_per_entry_is_bounded() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
        assert_eq!(std::mem::size_of::<(u64, Entry)>(), 24);
        let mut b = TimewaitBook::new(
            TimewaitOptions {
                max_entries: 100,
                ..TimewaitOptions::default()
            },
            Some(7),
            0,
        );
        for i in 0..500u16 {
            b.on_timeline(&timeline(
                &format!("10.0.0.1:{}", 20000 + i),
                "10.0.0.9:80",
                1,
                Role::Client,
                1,
            ));
        }
        assert_eq!(b.len(), 100);
        let s = b.snapshot(1, "t".into(), 5, kview());
        assert_eq!(s.untracked, 400);
    }
}
