//! The pure core of tcpwatch: no I/O, no clock of its own (time comes from
//! the events), so every part can be driven by recorded or synthetic events.
//!
//! Nothing here imports `host`, `kernel` or `views`: what those read or
//! print reaches the model as the plain data types defined here.
//!
//! This file holds the vocabulary every stage shares: TCP states, socket
//! endpoints and the process that owns a socket. The submodules follow the
//! data: `decode` (records into events), `lost` (events the kernel could
//! not deliver), `filter`, `snapshot` (sockets that predate the trace),
//! `owner` (who owns each socket), `reset` (why a RST was sent), `correlate` (events into timelines),
//! `handoff` (what became of sockets handed to a FIN_WAIT2 timewait
//! socket), `timewait` (the TIME_WAIT book), `churn` (clients that
//! should have pooled their connections), `sweep` (which entries outlived their
//! socket), `table` (bounded maps and how full they got).

pub mod cgroup;
pub mod churn;
pub mod correlate;
pub mod decode;
pub mod filter;
pub mod handoff;
pub mod lost;
pub mod owner;
pub mod reset;
pub mod snapshot;
pub mod sweep;
pub mod table;
pub mod timewait;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A hash map for the keys the kernel hands out (socket addresses, group
/// ids), looked up once or more per event: foldhash instead of std's
/// SipHash, which guards against keys an attacker picks, and these keys
/// no one picks.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The set of [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// A TCP state as the kernel numbers it (include/net/tcp_states.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
}

impl TcpState {
    pub const ALL: [TcpState; 13] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
        TcpState::BoundInactive,
    ];

    /// The state for a kernel state number, `None` for a number the kernel
    /// does not define.
    pub fn from_kernel(n: u8) -> Option<TcpState> {
        n.checked_sub(1)
            .and_then(|i| TcpState::ALL.get(usize::from(i)))
            .copied()
    }

    pub fn kernel_number(self) -> u8 {
        TcpState::ALL.iter().position(|s| *s == self).unwrap_or(0) as u8 + 1
    }

    /// The name `ss` and bcc's tcpstates use.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
            TcpState::BoundInactive => "BOUND_INACTIVE",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// The process a socket belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
    /// cgroup v2 id (the cgroup directory's inode number); 0 when unknown.
    pub cgroup_id: u64,
}

/// One side of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

impl Endpoint {
    pub fn new(addr: IpAddr, port: u16) -> Self {
        Endpoint { addr, port }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(sa: SocketAddr) -> Self {
        Endpoint::new(sa.ip(), sa.port())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = SocketAddr::new(self.addr, self.port).to_string();
        f.pad(&text)
    }
}

/// Family of an address as the user filters it (`-4`, `-6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_numbers_round_trip() {
        assert_eq!(TcpState::from_kernel(1), Some(TcpState::Established));
        assert_eq!(TcpState::from_kernel(7), Some(TcpState::Close));
        assert_eq!(TcpState::from_kernel(10), Some(TcpState::Listen));
        assert_eq!(TcpState::from_kernel(0), None);
        assert_eq!(TcpState::from_kernel(14), None);
        for s in TcpState::ALL {
            assert_eq!(TcpState::from_kernel(s.kernel_number()), Some(s));
        }
    }

    #[test]
    fn endpoint_display_brackets_ipv6() {
        let v6 = Endpoint::new("::1".parse().unwrap(), 80);
        assert_eq!(v6.to_string(), "[::1]:80");
        let v4 = Endpoint::new("127.0.0.1".parse().unwrap(), 8080);
        assert_eq!(v4.to_string(), "127.0.0.1:8080");
    }
}
