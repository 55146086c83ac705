//! Which process a socket belongs to.
//!
//! The task current when `inet_sock_set_state` fires is the socket's user
//! only in process context: connect (CLOSE→SYN_SENT), listen (CLOSE→LISTEN)
//! and close/shutdown (ESTABLISHED→FIN_WAIT1, CLOSE_WAIT→LAST_ACK). Every
//! other transition is driven by a segment or a timer in softirq, where the
//! current task is whoever was interrupted. So the owner is learned from the
//! process-context transitions and remembered per socket; an accepted socket
//! inherits its listener's owner; a socket older than the trace is looked up
//! in a /proc snapshot taken at start. Anything else is unknown, never a
//! guess.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::model::decode::{SocketEvent, Task, Transition};
use crate::model::snapshot::{SocketKey, SocketSnapshot};
use crate::model::table::{BoundedMap, EvictedKeys};
use crate::model::FastMap;
use crate::model::{Endpoint, Owner, TcpState};

/// Whether the current task at this transition is the socket's user.
pub fn is_process_context(old: TcpState, new: TcpState) -> bool {
    use TcpState::*;
    matches!(
        (old, new),
        (Close, SynSent) | (Close, Listen) | (Established, FinWait1) | (CloseWait, LastAck)
    )
}

/// Whether this transition begins a socket's life as tcpwatch tracks it.
pub fn is_birth(old: TcpState, new: TcpState) -> bool {
    use TcpState::*;
    matches!(
        (old, new),
        (Close, SynSent) | (Close, Listen) | (Listen, SynRecv)
    )
}

/// Where an owner came from, for anyone who wants to know how sure it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerSource {
    /// Seen in process context on this socket (for an accepted socket, its
    /// first send or receive: the process that accepted it).
    Observed,
    /// An accepted socket no process has used yet: the process that made
    /// its listener (several may share the listener, as a pre-fork
    /// server's workers do; any of them may take it).
    Listener,
    /// Found through /proc at start (the socket predates the trace).
    Procfs,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribution {
    /// Shared: every socket of one process points at one `Owner`.
    pub owner: Arc<Owner>,
    pub source: OwnerSource,
}

/// A tracked socket: its owner, and its 4-tuple as a `sweep` key when it
/// is in our namespace (else 0), to check it against the kernel's list.
#[derive(Debug)]
struct Tracked {
    owner: Option<Attribution>,
    key: u64,
}

/// Most distinct owners kept for sharing before the cache starts over.
const OWNER_CACHE: usize = 16_384;

/// A listening socket: (bound address, owner, skaddr; 0 for one from the
/// snapshot).
type Listener = (IpAddr, Attribution, u64);

/// What a transition says of its socket's owner.
enum Said {
    Owner(Option<Attribution>),
    /// Nothing new: the owner known before stands.
    Known,
}

/// Remembers owners of sockets and listeners.
#[derive(Debug)]
pub struct OwnerTracker {
    sockets: BoundedMap<u64, Tracked>,
    /// Sockets evicted from `sockets` and not seen closed since. Their later
    /// transitions are of a socket whose owner was forgotten: unknown, not
    /// looked up as a socket older than the trace, and not tracked again
    /// (which would evict another in turn).
    evicted: EvictedKeys,
    /// Listening sockets by network namespace and local port: (bound
    /// address, owner, skaddr). Equal ports of different namespaces are
    /// different listeners.
    listeners: HashMap<(u32, u16), Vec<Listener>>,
    snapshot: Option<SocketSnapshot>,
    /// Our own network namespace: only sockets in it can be matched against
    /// the /proc snapshot (which shows only this namespace).
    own_netns: Option<u32>,
    /// Owners seen, shared between their sockets (no allocation per socket).
    cache: FastMap<(u32, [u8; 16], u64), Arc<Owner>>,
}

impl OwnerTracker {
    pub fn new(
        max_sockets: usize,
        snapshot: Option<SocketSnapshot>,
        own_netns: Option<u32>,
    ) -> Self {
        let mut listeners: HashMap<(u32, u16), Vec<Listener>> = HashMap::new();
        if let Some(snap) = &snapshot {
            // The snapshot lists the sockets of `own_netns`.
            let ns = own_netns.unwrap_or(0);
            for (ep, owner) in snap.listeners() {
                listeners.entry((ns, ep.port)).or_default().push((
                    ep.addr,
                    Attribution {
                        owner: Arc::new(owner.clone()),
                        source: OwnerSource::Procfs,
                    },
                    0,
                ));
            }
        }
        OwnerTracker {
            sockets: BoundedMap::new(max_sockets),
            evicted: EvictedKeys::new(max_sockets),
            listeners,
            snapshot,
            own_netns,
            cache: FastMap::default(),
        }
    }

    pub fn tracked(&self) -> usize {
        self.sockets.len()
    }

    pub fn evicted(&self) -> u64 {
        self.sockets.evicted()
    }

    /// Most sockets tracked at once.
    pub fn peak(&self) -> usize {
        self.sockets.peak()
    }

    /// Our own network namespace's inode, when known.
    pub fn own_netns(&self) -> Option<u32> {
        self.own_netns
    }

    /// The table's figures for an exit summary.
    pub fn tracking(&self) -> crate::model::table::Tracking {
        crate::model::table::Tracking {
            evicted: self.evicted(),
            peak: self.peak(),
            limit: self.sockets.capacity(),
            at_exit: self.tracked(),
            // Counted by whoever sweeps the table.
            stale: 0,
        }
    }

    /// The namespace a transition's socket is in (ours when unknown).
    fn netns_of(&self, t: &Transition) -> u32 {
        t.sock.netns.or(self.own_netns).unwrap_or(0)
    }

    fn listener_owner(&self, netns: u32, local: &Endpoint) -> Option<Attribution> {
        let candidates = self.listeners.get(&(netns, local.port))?;
        // An exact address beats a wildcard bind.
        let exact = candidates.iter().rev().find(|(a, _, _)| *a == local.addr);
        let wildcard = || {
            candidates
                .iter()
                .rev()
                .find(|(a, _, _)| a.is_unspecified() && (a.is_ipv6() || local.addr.is_ipv4()))
        };
        exact.or_else(wildcard).map(|(_, attr, _)| Attribution {
            owner: attr.owner.clone(),
            source: OwnerSource::Listener,
        })
    }

    fn snapshot_owner(&self, t: &Transition) -> Option<Attribution> {
        let snap = self.snapshot.as_ref()?;
        if let (Some(ours), Some(theirs)) = (self.own_netns, t.sock.netns) {
            if ours != theirs {
                return None;
            }
        }
        let key = SocketKey {
            local: t.local,
            remote: t.remote,
        };
        snap.owner_of(&key).map(|owner| Attribution {
            owner: Arc::new(owner.clone()),
            source: OwnerSource::Procfs,
        })
    }

    /// For a socket older than the trace: whether it was accepted (a
    /// socket listened on its local endpoint when tracing began), from the
    /// listener table of the snapshot. `None` where the snapshot cannot
    /// tell (none taken, or the socket is of another network namespace).
    pub fn listened_before_trace(&self, local: &Endpoint, netns: Option<u32>) -> Option<bool> {
        let snap = self.snapshot.as_ref()?;
        if let (Some(ours), Some(theirs)) = (self.own_netns, netns) {
            if ours != theirs {
                return None;
            }
        }
        Some(snap.listens_on(local))
    }

    fn task_owner(&mut self, task: &Task) -> Arc<Owner> {
        let key = (task.pid, task.comm.0, task.cgroup_id);
        if let Some(o) = self.cache.get(&key) {
            return o.clone();
        }
        if self.cache.len() >= OWNER_CACHE {
            self.cache.clear();
        }
        let owner = Arc::new(Owner {
            pid: task.pid,
            comm: task.comm.to_string(),
            cgroup_id: task.cgroup_id,
        });
        self.cache.insert(key, owner.clone());
        owner
    }

    /// The first send or receive on an accepted socket: the task that made
    /// it took the socket from its listener, and owns it from now on (a
    /// pre-fork server's worker, not the process that listened). Updates
    /// the socket's entry when this tracker keeps one.
    pub fn first_use(&mut self, s: &SocketEvent) -> Attribution {
        let attribution = Attribution {
            owner: self.task_owner(&s.task),
            source: OwnerSource::Observed,
        };
        if let Some(tracked) = self.sockets.get_mut(&s.skaddr) {
            tracked.owner = Some(attribution.clone());
        }
        attribution
    }

    /// The owner as of this transition, for a caller that keeps per-socket
    /// state itself: `known` is what it remembered for the socket, and
    /// `first_sight` whether this is the first event it has for it. Keeps
    /// the listener table current.
    pub fn attribute(
        &mut self,
        t: &Transition,
        known: Option<&Attribution>,
        first_sight: bool,
    ) -> Option<Attribution> {
        match self.said(t, known.is_some(), first_sight) {
            Said::Owner(attribution) => attribution,
            Said::Known => known.cloned(),
        }
    }

    /// [`OwnerTracker::attribute`] for a caller that keeps what it knew
    /// when the transition tells nothing new (`None` then): the known
    /// owner is not copied (an atomic count on an owner every socket of
    /// its process shares) only to be put back.
    pub fn attribute_new(
        &mut self,
        t: &Transition,
        has_known: bool,
        first_sight: bool,
    ) -> Option<Attribution> {
        match self.said(t, has_known, first_sight) {
            Said::Owner(attribution) => attribution,
            Said::Known => None,
        }
    }

    fn said(&mut self, t: &Transition, has_known: bool, first_sight: bool) -> Said {
        let attribution = if is_process_context(t.old, t.new) {
            Some(Attribution {
                owner: self.task_owner(&t.task),
                source: OwnerSource::Observed,
            })
        } else if (t.old, t.new) == (TcpState::Listen, TcpState::SynRecv) {
            self.listener_owner(self.netns_of(t), &t.local)
        } else if has_known {
            // CLOSE → LISTEN is in process context: the listener table
            // never needs the known owner.
            self.update_listeners(t, None);
            return Said::Known;
        } else if first_sight && !is_birth(t.old, t.new) {
            // First sight of a socket in mid-life: it predates the trace.
            self.snapshot_owner(t)
        } else {
            None
        };
        self.update_listeners(t, attribution.as_ref());
        Said::Owner(attribution)
    }

    fn update_listeners(&mut self, t: &Transition, attribution: Option<&Attribution>) {
        match (t.old, t.new) {
            (TcpState::Close, TcpState::Listen) => {
                if let Some(attr) = attribution {
                    let key = (self.netns_of(t), t.local.port);
                    let list = self.listeners.entry(key).or_default();
                    // SO_REUSEPORT allows several listeners on one address;
                    // the newest wins lookups.
                    list.retain(|(_, _, sk)| *sk != t.skaddr);
                    list.push((t.local.addr, attr.clone(), t.skaddr));
                }
            }
            (TcpState::Listen, TcpState::Close) => {
                let key = (self.netns_of(t), t.local.port);
                if let Some(list) = self.listeners.get_mut(&key) {
                    list.retain(|(a, _, sk)| *sk != t.skaddr && !(*sk == 0 && *a == t.local.addr));
                    if list.is_empty() {
                        self.listeners.remove(&key);
                    }
                }
            }
            _ => {}
        }
    }

    /// Updates what is known from one transition and returns the socket's
    /// owner as of this transition (remembering owners per socket itself).
    pub fn observe(&mut self, t: &Transition) -> Option<Attribution> {
        let known = self.sockets.get(&t.skaddr).map(|s| s.owner.clone());
        let birth = is_birth(t.old, t.new);
        let forgotten = known.is_none() && !birth && self.evicted.contains(t.skaddr);
        let first_sight = known.is_none() && !forgotten;
        let attribution = self.attribute(t, known.flatten().as_ref(), first_sight);
        if birth || t.new == TcpState::Close {
            self.evicted.remove(t.skaddr);
        }
        if t.new == TcpState::Close {
            self.sockets.remove(&t.skaddr);
        } else if !forgotten {
            let ours = self.own_netns.is_some() && t.sock.netns == self.own_netns;
            let tracked = Tracked {
                owner: attribution.clone(),
                key: if ours {
                    crate::model::sweep::endpoints_key(&t.local, &t.remote)
                } else {
                    0
                },
            };
            if let Some((evicted, _)) = self.sockets.insert(t.skaddr, tracked) {
                self.evicted.insert(evicted);
            }
        }
        attribution
    }
}

/// Sockets of our namespace whose close may have been lost (see `sweep`);
/// the mark changes with each of their transitions.
impl crate::model::sweep::SweepTable for OwnerTracker {
    fn unlisted(&self, kernel: &crate::model::sweep::KernelSockets) -> Vec<(u64, u64)> {
        self.sockets
            .iter_marked()
            .filter(|(_, s, _)| s.key != 0 && !kernel.lists(s.key))
            .map(|(skaddr, _, mark)| (*skaddr, mark))
            .collect()
    }

    fn drop_unchanged(&mut self, skaddr: u64, mark: u64) -> bool {
        self.sockets.remove_if_unchanged(&skaddr, mark).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decode::tests::state_event;
    use crate::model::decode::{decode, encode, Comm, Record};
    use std::collections::HashMap;

    fn tr(skaddr: u64, old: TcpState, new: TcpState, pid: u32, comm: &str) -> Transition {
        let mut e = state_event(skaddr, old, new, 1);
        e.pid = pid;
        e.comm = Comm::from_str_lossy(comm).0;
        let Record::State(t) = decode(&encode(&e)).unwrap() else {
            unreachable!()
        };
        t
    }

    fn with_ports(mut t: Transition, local: &str, remote: &str) -> Transition {
        t.local = Endpoint::from(local.parse::<std::net::SocketAddr>().unwrap());
        t.remote = Endpoint::from(remote.parse::<std::net::SocketAddr>().unwrap());
        t
    }

    use TcpState::*;

    #[test]
    fn softirq_transitions_keep_the_owner_seen_at_connect() {
        let mut o = OwnerTracker::new(100, None, None);
        let a = o.observe(&tr(1, Close, SynSent, 100, "curl")).unwrap();
        assert_eq!((a.owner.pid, a.source), (100, OwnerSource::Observed));
        // ESTABLISHED arrives in softirq while "swapper" (pid 0) is current.
        let a = o
            .observe(&tr(1, SynSent, Established, 0, "swapper/1"))
            .unwrap();
        assert_eq!(a.owner.pid, 100);
        assert_eq!(a.owner.comm, "curl");
        let a = o.observe(&tr(1, FinWait2, Close, 999, "other")).unwrap();
        assert_eq!(a.owner.pid, 100);
        assert_eq!(o.tracked(), 0, "closed sockets are forgotten");
    }

    #[test]
    fn unknown_socket_in_mid_life_is_unknown_not_current_task() {
        let mut o = OwnerTracker::new(100, None, None);
        assert!(o
            .observe(&tr(7, Established, CloseWait, 555, "ksoftirqd/0"))
            .is_none());
        assert!(o
            .observe(&tr(7, CloseWait, LastAck, 321, "server"))
            .is_some());
    }

    #[test]
    fn accepted_socket_inherits_the_listener_owner() {
        let mut o = OwnerTracker::new(100, None, None);
        o.observe(&with_ports(
            tr(10, Close, Listen, 200, "nginx"),
            "0.0.0.0:8080",
            "0.0.0.0:0",
        ));
        let child = with_ports(
            tr(11, Listen, SynRecv, 300, "curl"),
            "127.0.0.1:8080",
            "127.0.0.1:5555",
        );
        let a = o.observe(&child).unwrap();
        assert_eq!((a.owner.pid, a.source), (200, OwnerSource::Listener));
        let est = with_ports(
            tr(11, SynRecv, Established, 300, "curl"),
            "127.0.0.1:8080",
            "127.0.0.1:5555",
        );
        assert_eq!(o.observe(&est).unwrap().owner.pid, 200);
        // A different port has no listener: unknown.
        let other = with_ports(
            tr(12, Listen, SynRecv, 300, "curl"),
            "127.0.0.1:9090",
            "127.0.0.1:5556",
        );
        assert!(o.observe(&other).is_none());
        // After the listener closes, new children are unknown.
        o.observe(&with_ports(
            tr(10, Listen, Close, 200, "nginx"),
            "0.0.0.0:8080",
            "0.0.0.0:0",
        ));
        let late = with_ports(
            tr(13, Listen, SynRecv, 300, "curl"),
            "127.0.0.1:8080",
            "127.0.0.1:5557",
        );
        assert!(o.observe(&late).is_none());
    }

    /// Equal ports of two namespaces are two listeners: a connection
    /// accepted in one is never given the other's owner.
    #[test]
    fn listeners_of_other_namespaces_are_apart() {
        let mut o = OwnerTracker::new(100, None, Some(1));
        let in_ns = |mut t: Transition, ns: u32| {
            t.sock.netns = Some(ns);
            t
        };
        o.observe(&in_ns(
            with_ports(
                tr(10, Close, Listen, 200, "nginx"),
                "0.0.0.0:80",
                "0.0.0.0:0",
            ),
            2,
        ));
        let here = with_ports(
            tr(11, Listen, SynRecv, 9, "x"),
            "127.0.0.1:80",
            "127.0.0.1:5000",
        );
        assert!(
            o.observe(&in_ns(here, 1)).is_none(),
            "namespace 2's listener"
        );
        let there = with_ports(
            tr(12, Listen, SynRecv, 9, "x"),
            "127.0.0.1:80",
            "127.0.0.1:5001",
        );
        assert_eq!(o.observe(&in_ns(there, 2)).unwrap().owner.pid, 200);
    }

    #[test]
    fn exact_listener_address_beats_wildcard() {
        let mut o = OwnerTracker::new(100, None, None);
        o.observe(&with_ports(
            tr(1, Close, Listen, 1, "any"),
            "0.0.0.0:80",
            "0.0.0.0:0",
        ));
        o.observe(&with_ports(
            tr(2, Close, Listen, 2, "lo"),
            "127.0.0.1:80",
            "0.0.0.0:0",
        ));
        let c = with_ports(
            tr(3, Listen, SynRecv, 9, "x"),
            "127.0.0.1:80",
            "127.0.0.1:1000",
        );
        assert_eq!(o.observe(&c).unwrap().owner.pid, 2);
        let c = with_ports(
            tr(4, Listen, SynRecv, 9, "x"),
            "127.0.0.2:80",
            "127.0.0.1:1000",
        );
        assert_eq!(o.observe(&c).unwrap().owner.pid, 1);
    }

    #[test]
    fn pre_existing_socket_is_found_in_the_snapshot() {
        // 127.0.0.1:8080 <-> 127.0.0.1:54321, inode 4242.
        let sockets = [(
            crate::model::snapshot::tests::key("127.0.0.1:8080", "127.0.0.1:54321"),
            Established,
            4242,
        )];
        let mut owners = HashMap::new();
        owners.insert(
            4242,
            Owner {
                pid: 77,
                comm: "redis".into(),
                cgroup_id: 5,
            },
        );
        let snap = SocketSnapshot::from_sockets(sockets, &owners);
        let mut o = OwnerTracker::new(100, Some(snap), None);
        let t = with_ports(
            tr(50, Established, CloseWait, 1, "swapper/0"),
            "127.0.0.1:8080",
            "127.0.0.1:54321",
        );
        let a = o.observe(&t).unwrap();
        assert_eq!((a.owner.pid, a.source), (77, OwnerSource::Procfs));
        // A new socket that reuses the 4-tuple later is not matched by /proc.
        let mut o2 = OwnerTracker::new(100, o.snapshot.take(), None);
        let born = with_ports(
            tr(51, Close, SynSent, 9, "x"),
            "127.0.0.1:8080",
            "127.0.0.1:54321",
        );
        assert_eq!(o2.observe(&born).unwrap().owner.pid, 9);
    }

    #[test]
    fn tracked_sockets_are_bounded() {
        let mut o = OwnerTracker::new(3, None, None);
        for sk in 0..10 {
            o.observe(&tr(sk, Close, SynSent, 1, "x"));
        }
        assert_eq!(o.tracked(), 3);
        assert_eq!(o.evicted(), 7);
        assert_eq!(o.peak(), 3);
    }

    #[test]
    fn evicted_sockets_stay_forgotten_until_they_close() {
        let mut o = OwnerTracker::new(2, None, None);
        for sk in 0..4 {
            o.observe(&tr(sk, Close, SynSent, 100 + sk as u32, "flood"));
        }
        assert_eq!((o.tracked(), o.evicted()), (2, 2));
        // Socket 0 was evicted: its softirq transitions have no owner, and
        // it is not tracked again, which would evict socket 2 or 3.
        assert!(o
            .observe(&tr(0, SynSent, Established, 7, "ksoftirqd/0"))
            .is_none());
        assert_eq!((o.tracked(), o.evicted()), (2, 2));
        // In process context its owner is seen again, still untracked.
        let a = o
            .observe(&tr(0, Established, FinWait1, 100, "flood"))
            .unwrap();
        assert_eq!(a.owner.pid, 100);
        assert!(o
            .observe(&tr(0, FinWait1, FinWait2, 7, "swapper/1"))
            .is_none());
        o.observe(&tr(0, FinWait2, Close, 7, "swapper/1"));
        assert_eq!((o.tracked(), o.evicted()), (2, 2));
        // Closed: a new socket at the same address is tracked as usual.
        let a = o.observe(&tr(0, Close, SynSent, 200, "next")).unwrap();
        assert_eq!(a.owner.pid, 200);
        assert_eq!(
            o.observe(&tr(0, SynSent, Established, 7, "x"))
                .unwrap()
                .owner
                .pid,
            200
        );
        assert_eq!(o.peak(), 2);
    }
}
