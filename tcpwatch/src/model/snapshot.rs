//! The TCP sockets that already existed when tracing started, with the
//! process that owns each one: the data only. `host::procfs` captures it
//! from the live system; a recording carries it in its header.
//!
//! The tracepoint only tells us about state *transitions*, so a socket
//! opened before tcpwatch started has no known owner unless it is looked up
//! here, by 4-tuple (or, for an accepted socket, through its listener).
//!
//! Addresses are kept exactly as the kernel gives them: an IPv4 peer of a
//! dual-stack IPv6 socket stays an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
//! as the tracepoint reports such sockets, so lookups by 4-tuple match.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{Endpoint, Owner, TcpState};

/// A socket's 4-tuple. A listening socket has the unspecified address and
/// port 0 as its remote end (`0.0.0.0:0` or `[::]:0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub local: Endpoint,
    pub remote: Endpoint,
}

/// One socket of the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub key: SocketKey,
    pub state: TcpState,
    pub inode: u64,
    /// `None` when no process could be found holding the socket (it may
    /// belong to another pid namespace, or the process exited meanwhile).
    pub owner: Option<Owner>,
}

/// The TCP sockets that existed at one moment, with their owners.
#[derive(Clone, Debug, Default)]
pub struct SocketSnapshot {
    entries: Vec<SnapshotEntry>,
    /// 4-tuple → index into `entries`. With `SO_REUSEPORT` several sockets
    /// share a 4-tuple; the first one with a known owner wins.
    by_key: HashMap<SocketKey, usize>,
}

impl SocketSnapshot {
    /// Builds a snapshot from the sockets the kernel listed, as
    /// (4-tuple, state, inode), and an inode → owner map.
    pub fn from_sockets(
        sockets: impl IntoIterator<Item = (SocketKey, TcpState, u64)>,
        inode_owner: &HashMap<u64, Owner>,
    ) -> SocketSnapshot {
        let mut snap = SocketSnapshot::default();
        for (key, state, inode) in sockets {
            snap.push(SnapshotEntry {
                key,
                state,
                inode,
                owner: inode_owner.get(&inode).cloned(),
            });
        }
        snap
    }

    /// Builds a snapshot from entries read back from a recording.
    pub fn from_entries(entries: Vec<SnapshotEntry>) -> SocketSnapshot {
        let mut snap = SocketSnapshot::default();
        for e in entries {
            snap.push(e);
        }
        snap
    }

    fn push(&mut self, entry: SnapshotEntry) {
        let index = self.entries.len();
        let (key, known) = (entry.key, entry.owner.is_some());
        self.entries.push(entry);
        match self.by_key.get(&key) {
            Some(&prev) if !known || self.entries[prev].owner.is_some() => {}
            _ => {
                self.by_key.insert(key, index);
            }
        }
    }

    /// The owner of the socket with exactly this 4-tuple (connected, or
    /// listening with the unspecified remote end), if known.
    pub fn owner_of(&self, key: &SocketKey) -> Option<&Owner> {
        self.by_key
            .get(key)
            .and_then(|&i| self.entries.get(i))
            .and_then(|e| e.owner.as_ref())
    }

    /// Listening sockets with a known owner. The local address may be the
    /// wildcard (`0.0.0.0` or `::`).
    pub fn listeners(&self) -> impl Iterator<Item = (&Endpoint, &Owner)> {
        self.entries
            .iter()
            .filter_map(|e| match (&e.state, &e.owner) {
                (TcpState::Listen, Some(owner)) => Some((&e.key.local, owner)),
                _ => None,
            })
    }

    /// Whether a socket listened on `local`: on its address, or on the
    /// wildcard address of its family (an IPv6 socket's, `[::]`, also
    /// takes IPv4 peers, whose accepted sockets have IPv4-mapped local
    /// addresses).
    pub fn listens_on(&self, local: &Endpoint) -> bool {
        let any = if local.addr.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        let remote = Endpoint::new(any, 0);
        [local.addr, any].into_iter().any(|addr| {
            let key = SocketKey {
                local: Endpoint::new(addr, local.port),
                remote,
            };
            self.by_key
                .get(&key)
                .and_then(|&i| self.entries.get(i))
                .is_some_and(|e| e.state == TcpState::Listen)
        })
    }

    /// Every socket, in the order listed.
    pub fn entries(&self) -> impl Iterator<Item = &SnapshotEntry> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::SocketAddr;

    pub(crate) fn ep(s: &str) -> Endpoint {
        Endpoint::from(s.parse::<SocketAddr>().unwrap())
    }

    pub(crate) fn key(local: &str, remote: &str) -> SocketKey {
        SocketKey {
            local: ep(local),
            remote: ep(remote),
        }
    }

    fn owner(pid: u32, comm: &str) -> Owner {
        Owner {
            pid,
            comm: comm.to_string(),
            cgroup_id: 42,
        }
    }

    #[test]
    fn snapshot_indexes_owners() {
        let sockets = [
            (key("0.0.0.0:80", "0.0.0.0:0"), TcpState::Listen, 10),
            (
                key("127.0.0.1:80", "127.0.0.1:40000"),
                TcpState::Established,
                11,
            ),
            (
                key("127.0.0.1:40001", "127.0.0.1:80"),
                TcpState::Established,
                12,
            ),
            (key("[::]:22", "[::]:0"), TcpState::Listen, 20),
            (key("[::]:22", "[::]:0"), TcpState::Listen, 21),
        ];
        let owners = HashMap::from([
            (10, owner(100, "nginx")),
            (11, owner(101, "nginx")),
            (21, owner(7, "sshd")),
        ]);
        let snap = SocketSnapshot::from_sockets(sockets, &owners);
        assert_eq!(snap.len(), 5);
        assert!(!snap.is_empty());
        assert_eq!(
            snap.owner_of(&key("0.0.0.0:80", "0.0.0.0:0")).unwrap().pid,
            100
        );
        assert_eq!(
            snap.owner_of(&key("127.0.0.1:80", "127.0.0.1:40000"))
                .unwrap()
                .pid,
            101
        );
        assert_eq!(snap.owner_of(&key("127.0.0.1:40001", "127.0.0.1:80")), None);
        assert_eq!(snap.owner_of(&key("127.0.0.1:80", "127.0.0.1:1")), None);
        // Two reuseport listeners share a key; the one with an owner wins.
        assert_eq!(
            snap.owner_of(&key("[::]:22", "[::]:0")).unwrap().comm,
            "sshd"
        );
        let listeners: Vec<_> = snap.listeners().map(|(e, o)| (*e, o.pid)).collect();
        assert_eq!(listeners, vec![(ep("0.0.0.0:80"), 100), (ep("[::]:22"), 7)]);
        let inodes: Vec<_> = snap.entries().map(|e| e.inode).collect();
        assert_eq!(inodes, vec![10, 11, 12, 20, 21]);
        assert!(SocketSnapshot::from_sockets([], &HashMap::new()).is_empty());
    }

    #[test]
    fn entries_from_a_recording_keep_their_owners() {
        let entries = vec![
            SnapshotEntry {
                key: key("[::]:22", "[::]:0"),
                state: TcpState::Listen,
                inode: 0,
                owner: None,
            },
            SnapshotEntry {
                key: key("[::]:22", "[::]:0"),
                state: TcpState::Listen,
                inode: 0,
                owner: Some(owner(7, "sshd")),
            },
        ];
        let snap = SocketSnapshot::from_entries(entries);
        assert_eq!(snap.owner_of(&key("[::]:22", "[::]:0")).unwrap().pid, 7);
        assert_eq!(snap.len(), 2);
    }
}
