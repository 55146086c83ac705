//! Sockets whose close was lost.
//!
//! A lost CLOSE event would leave its socket in tcpwatch's tables, counted
//! as open, until evicted. So once events have been lost, the tables are
//! checked against the kernel's own list of the full sockets in tcpwatch's
//! network namespace (sock_diag, as `ss` lists them; not `/proc/net/tcp`,
//! whose reading slows to seconds under churn), and the entries of sockets
//! the kernel no longer has are dropped and counted.
//!
//! The check takes two steps, so that a socket closed just before the list
//! was read, its CLOSE still on the way, is not taken for one whose CLOSE
//! was lost: the entries the list lacks become candidates, and each is
//! dropped only if no event came for it by the time every event stamped
//! before the list was read has been delivered. An entry whose local port
//! is not known yet (a connect() seen only at CLOSE → SYN_SENT) is stale
//! only if the kernel has no socket at all from its local address to its
//! peer. Sockets of other network namespaces (whose lists cannot be read
//! from here) are left alone: eviction bounds them.
//!
//! Only the decisions live here: the [`Sweeper`] is handed the function
//! that lists the kernel's sockets and the clock (`host::sweeper` gives it
//! sock_diag and CLOCK_MONOTONIC), so it runs on synthetic lists in tests.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use crate::model::{Endpoint, FastSet};

/// A 4-tuple as a number, to look up in [`KernelSockets`]; 0 for one that
/// cannot be checked (neither local address nor port known yet). With
/// local port 0 it stands for every socket from that address to `remote`.
pub fn endpoints_key(local: &Endpoint, remote: &Endpoint) -> u64 {
    if local.port == 0 && local.addr.is_unspecified() {
        return 0;
    }
    let mut h = DefaultHasher::new();
    local.hash(&mut h);
    remote.hash(&mut h);
    h.finish().max(1)
}

/// The full sockets the kernel has in tcpwatch's network namespace.
#[derive(Debug, Default)]
pub struct KernelSockets {
    keys: FastSet<u64>,
}

impl KernelSockets {
    pub fn from_endpoints(sockets: impl IntoIterator<Item = (Endpoint, Endpoint)>) -> Self {
        let mut keys = FastSet::default();
        for (l, r) in sockets {
            keys.insert(endpoints_key(&l, &r));
            keys.insert(endpoints_key(&Endpoint::new(l.addr, 0), &r));
        }
        KernelSockets { keys }
    }

    /// Whether the kernel lists the socket with this [`endpoints_key`].
    pub fn lists(&self, key: u64) -> bool {
        self.keys.contains(&key)
    }
}

/// Why the kernel's list of sockets could not be read: the lister's own
/// error, kept whole as the source (the model does not name host errors).
#[derive(Debug, thiserror::Error)]
#[error("cannot list this namespace's sockets")]
pub struct ListError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// Lists the kernel's full sockets in one network namespace.
pub type ListSockets = Box<dyn FnMut() -> Result<KernelSockets, ListError> + Send>;

/// A table whose entries can outlive their socket when events are lost.
pub trait SweepTable {
    /// (socket address, mark) of each entry that can be checked and that
    /// `kernel` does not list. The mark changes with each event of the
    /// socket.
    fn unlisted(&self, kernel: &KernelSockets) -> Vec<(u64, u64)>;
    /// Drops the entry of `skaddr` if its mark is still `mark`; whether it
    /// did.
    fn drop_unchanged(&mut self, skaddr: u64, mark: u64) -> bool;
}

/// How long after a loss is reported the check runs (a burst is often
/// over by then), and the least time between two checks. Each lists the
/// namespace's full sockets (the kernel still walks past its timewait
/// sockets: about 30 ms for 131,072 of them), so checks are also kept
/// [`COST_SHARE`] times their own cost apart: at most 5% of a core.
pub const DELAY_NS: u64 = 1_000_000_000;
pub const MIN_GAP_NS: u64 = 2_000_000_000;
const COST_SHARE: u64 = 20;

/// Candidates found at `listed_ns`, waiting for the events before it.
#[derive(Debug)]
struct Pending {
    listed_ns: u64,
    candidates: Vec<(u64, u64)>,
}

/// Runs the check on a table after lost events.
pub struct Sweeper {
    lost_seen: u64,
    due_ns: Option<u64>,
    /// When the last check may be followed by the next.
    next_ok_ns: Option<u64>,
    pending: Option<Pending>,
    /// Entries dropped since the start.
    pub dropped: u64,
    list: ListSockets,
    now: fn() -> u64,
    warned: bool,
}

impl Sweeper {
    /// A sweeper that lists sockets with `list` and reads the time with
    /// `now` (CLOCK_MONOTONIC, the events' clock).
    pub fn with(
        list: impl FnMut() -> Result<KernelSockets, ListError> + Send + 'static,
        now: fn() -> u64,
    ) -> Sweeper {
        Sweeper {
            lost_seen: 0,
            due_ns: None,
            next_ok_ns: None,
            pending: None,
            dropped: 0,
            list: Box::new(list),
            now,
            warned: false,
        }
    }

    /// The kernel's lost-event total has grown to `total`.
    pub fn lost(&mut self, total: u64) {
        if total <= self.lost_seen {
            return;
        }
        self.lost_seen = total;
        let mut at = (self.now)() + DELAY_NS;
        if let Some(ok) = self.next_ok_ns {
            at = at.max(ok);
        }
        self.due_ns = Some(self.due_ns.map_or(at, |d| d.min(at)));
    }

    /// Called after each batch, when every event stamped before
    /// `settled_ns` has been taken: finishes a check whose list is that
    /// old, or starts one that is due. Returns the socket addresses whose
    /// entries were dropped; `warn` hears once if the list cannot be read.
    pub fn tick(
        &mut self,
        settled_ns: u64,
        table: &mut (impl SweepTable + ?Sized),
        warn: &mut dyn FnMut(&str),
    ) -> Vec<u64> {
        let mut dropped = Vec::new();
        if let Some(p) = self.pending.take_if(|p| settled_ns >= p.listed_ns) {
            for (skaddr, mark) in p.candidates {
                if table.drop_unchanged(skaddr, mark) {
                    dropped.push(skaddr);
                }
            }
            self.dropped += dropped.len() as u64;
        }
        let due = self.due_ns.is_some_and(|d| settled_ns >= d);
        if due && self.pending.is_none() {
            self.due_ns = None;
            let began = (self.now)();
            match (self.list)() {
                Ok(kernel) => {
                    let listed_ns = (self.now)();
                    let candidates = table.unlisted(&kernel);
                    let cost = (self.now)().saturating_sub(began);
                    self.next_ok_ns = Some(listed_ns + MIN_GAP_NS.max(COST_SHARE * cost));
                    self.pending = Some(Pending {
                        listed_ns,
                        candidates,
                    });
                }
                Err(e) if !self.warned => {
                    self.warned = true;
                    let causes: Vec<String> =
                        anyhow::Chain::new(&*e.0).map(|c| c.to_string()).collect();
                    warn(&format!(
                        "{e} ({}): sockets whose close \
                         was lost stay tracked until evicted",
                        causes.join(": ")
                    ));
                }
                Err(_) => {}
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ep(s: &str) -> Endpoint {
        Endpoint::from(s.parse::<std::net::SocketAddr>().unwrap())
    }

    /// skaddr → (local, remote, mark).
    #[derive(Default)]
    struct Table(HashMap<u64, (Endpoint, Endpoint, u64)>);

    impl SweepTable for Table {
        fn unlisted(&self, kernel: &KernelSockets) -> Vec<(u64, u64)> {
            self.0
                .iter()
                .filter(|(_, (l, r, _))| {
                    let key = endpoints_key(l, r);
                    key != 0 && !kernel.lists(key)
                })
                .map(|(sk, (_, _, mark))| (*sk, *mark))
                .collect()
        }

        fn drop_unchanged(&mut self, skaddr: u64, mark: u64) -> bool {
            if self.0.get(&skaddr).is_some_and(|e| e.2 == mark) {
                self.0.remove(&skaddr);
                true
            } else {
                false
            }
        }
    }

    thread_local! {
        static NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    fn now() -> u64 {
        NOW.get()
    }

    fn set_now(ns: u64) {
        NOW.set(ns);
    }

    /// The kernel has only the socket 10.0.0.1:1000 ↔ 10.0.0.2:80.
    fn kernel() -> Result<KernelSockets, ListError> {
        Ok(KernelSockets::from_endpoints([(
            ep("10.0.0.1:1000"),
            ep("10.0.0.2:80"),
        )]))
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn drops_only_entries_the_kernel_lacks_and_that_saw_no_event_since() {
        let mut t = Table::default();
        t.0.insert(1, (ep("10.0.0.1:1000"), ep("10.0.0.2:80"), 0)); // alive
        t.0.insert(2, (ep("10.0.0.1:1001"), ep("10.0.0.2:80"), 0)); // close lost
        t.0.insert(3, (ep("10.0.0.1:1002"), ep("10.0.0.2:80"), 0)); // closing now
        t.0.insert(4, (ep("0.0.0.0:0"), ep("10.0.0.2:80"), 0)); // nothing known yet
        t.0.insert(5, (ep("10.0.0.1:0"), ep("10.0.0.2:80"), 0)); // like socket 1
        t.0.insert(6, (ep("10.0.0.3:0"), ep("10.0.0.2:80"), 0)); // close lost
        let mut warn = |m: &str| panic!("{m}");
        let mut s = Sweeper::with(kernel, now);
        set_now(10 * S);
        assert!(
            s.tick(10 * S, &mut t, &mut warn).is_empty(),
            "nothing lost yet"
        );
        s.lost(5);
        assert!(
            s.tick(10 * S + S / 2, &mut t, &mut warn).is_empty(),
            "not due"
        );
        set_now(11 * S + 1);
        assert!(s.tick(11 * S, &mut t, &mut warn).is_empty(), "list read");
        // Socket 3's CLOSE, stamped before the list was read, arrives.
        t.0.get_mut(&3).unwrap().2 = 1;
        assert!(
            s.tick(11 * S, &mut t, &mut warn).is_empty(),
            "events before the list still on the way"
        );
        let mut dropped = s.tick(11 * S + 2, &mut t, &mut warn);
        dropped.sort();
        assert_eq!(dropped, [2, 6]);
        assert_eq!(s.dropped, 2);
        let mut left: Vec<u64> = t.0.keys().copied().collect();
        left.sort();
        assert_eq!(left, [1, 3, 4, 5]);
    }

    #[test]
    fn checks_again_after_later_losses_but_not_too_often() {
        let mut t = Table::default();
        let mut warn = |m: &str| panic!("{m}");
        let mut s = Sweeper::with(kernel, now);
        set_now(100 * S);
        s.lost(1);
        s.lost(1);
        set_now(101 * S);
        s.tick(101 * S, &mut t, &mut warn);
        s.tick(101 * S, &mut t, &mut warn);
        assert_eq!(s.next_ok_ns, Some(103 * S));
        s.lost(2);
        assert_eq!(s.due_ns, Some(103 * S), "at least MIN_GAP_NS apart");
        t.0.insert(9, (ep("10.0.0.1:2000"), ep("10.0.0.2:80"), 7));
        set_now(103 * S);
        s.tick(103 * S, &mut t, &mut warn);
        assert_eq!(s.tick(103 * S, &mut t, &mut warn), [9]);
    }

    /// A socket's transitions as decoded records, in namespace `netns`,
    /// from 127.0.0.1:`sport` to 127.0.0.2:8080.
    fn records(
        sk: u64,
        sport: u16,
        netns: u32,
        steps: &[(crate::model::TcpState, crate::model::TcpState)],
    ) -> Vec<crate::model::decode::Record> {
        use crate::model::decode::{decode, encode, tests::state_event};
        steps
            .iter()
            .enumerate()
            .map(|(i, (old, new))| {
                let mut e = state_event(sk, *old, *new, 1000 * (i as u64 + 1));
                e.sport = sport;
                e.netns = netns;
                e.valid |= tcpwatch_common::valid::NETNS;
                decode(&encode(&e)).unwrap()
            })
            .collect()
    }

    /// The correlator and the owner table: entries of our namespace that the
    /// kernel lacks go, sockets alive, unknown or elsewhere stay.
    #[test]
    fn correlator_and_owner_table_drop_what_the_kernel_lacks() {
        use crate::model::correlate::{Correlator, CorrelatorOptions};
        use crate::model::owner::OwnerTracker;
        use crate::model::TcpState::*;
        fn kernel() -> Result<KernelSockets, ListError> {
            Ok(KernelSockets::from_endpoints([(
                ep("127.0.0.1:1000"),
                ep("127.0.0.2:8080"),
            )]))
        }
        let open = [(Close, SynSent), (SynSent, Established)];
        let mut all = Vec::new();
        all.extend(records(1, 1000, 5, &open)); // alive
        all.extend(records(2, 1001, 5, &open)); // its CLOSE was lost
        all.extend(records(3, 1002, 6, &open)); // another namespace
                                                // No port yet, from the address of socket 1, which the kernel has:
                                                // it may be one of them, so it stays.
        all.extend(records(4, 0, 5, &open[..1]));
        let mut c = Correlator::new(CorrelatorOptions::default(), None, Some(5));
        let mut o = OwnerTracker::new(100, None, Some(5));
        let mut out = Vec::new();
        for r in &all {
            c.push(r, &mut out);
            if let crate::model::decode::Record::State(t) = r {
                o.observe(t);
            }
        }
        let mut warn = |m: &str| panic!("{m}");
        for table in [&mut c as &mut dyn SweepTableDyn, &mut o] {
            set_now(S);
            let mut s = Sweeper::with(kernel, now);
            s.lost(1);
            set_now(2 * S);
            assert!(table.tick(&mut s, 2 * S, &mut warn).is_empty());
            assert_eq!(table.tick(&mut s, 2 * S, &mut warn), [2]);
        }
        assert_eq!((c.tracked(), o.tracked()), (3, 3));
    }

    /// `tick` for either table in one loop.
    trait SweepTableDyn {
        fn tick(&mut self, s: &mut Sweeper, settled: u64, warn: &mut dyn FnMut(&str)) -> Vec<u64>;
    }

    impl<T: SweepTable> SweepTableDyn for T {
        fn tick(&mut self, s: &mut Sweeper, settled: u64, warn: &mut dyn FnMut(&str)) -> Vec<u64> {
            s.tick(settled, self, warn)
        }
    }

    #[test]
    fn an_unreadable_list_is_said_once() {
        fn broken() -> Result<KernelSockets, ListError> {
            Err(ListError("no /proc".into()))
        }
        let mut t = Table::default();
        let mut said = Vec::new();
        let mut s = Sweeper::with(broken, || 0);
        for lost in 1..4 {
            s.lost(lost);
            s.tick(u64::MAX, &mut t, &mut |m: &str| said.push(m.to_string()));
        }
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].contains("no /proc"), "{said:?}");
    }
}
