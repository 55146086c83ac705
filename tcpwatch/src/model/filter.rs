//! What the user asked to see: process, comm, cgroup, ports, addresses,
//! family. Process filters match the socket's attributed owner, never the
//! task that happened to be current in softirq.

use std::net::IpAddr;
use std::str::FromStr;

use crate::model::{Endpoint, Family, Owner};

/// An address or a network in CIDR notation (`10.0.0.0/8`, `::1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Text that is not an address or network.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("'{text}' is not an IP address or CIDR network")]
    NotAnAddress { text: String },
    #[error("'{text}': prefix length must be 0 to {max}")]
    BadPrefix { text: String, max: u8 },
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| CidrError::NotAnAddress { text: s.into() })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix =
            match prefix_text {
                None => max,
                Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                    CidrError::BadPrefix {
                        text: s.into(),
                        max,
                    }
                })?,
            };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(*ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(*ip) & mask
            }
            // An IPv4 filter also matches IPv4-mapped IPv6 sockets.
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(&IpAddr::V4(v4))),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

/// A conjunction of the user's filters; within one kind (`--pid 1 --pid 2`)
/// any value matches.
/// What [`Filter::socket_verdict`] says of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Drop,
    /// Its local side is not set yet; a later transition decides.
    Undecided,
}

#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub lports: Vec<u16>,
    pub rports: Vec<u16>,
    /// Either side's port.
    pub ports: Vec<u16>,
    pub laddrs: Vec<Cidr>,
    pub raddrs: Vec<Cidr>,
    pub family: Option<Family>,
    /// cgroup path prefixes (`/system.slice/docker-…scope`): the owner's
    /// cgroup must be one of them or below. Matched by the caller, who
    /// knows the paths ([`Filter::matches_cgroup`]).
    pub cgroups: Vec<String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
            && self.comms.is_empty()
            && self.lports.is_empty()
            && self.rports.is_empty()
            && self.ports.is_empty()
            && self.laddrs.is_empty()
            && self.raddrs.is_empty()
            && self.family.is_none()
            && self.cgroups.is_empty()
    }

    /// The filter as the flags that give it: `--lport 80 --raddr 10.0.0.0/8`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        parts.extend(self.pids.iter().map(|p| format!("--pid {p}")));
        parts.extend(self.comms.iter().map(|c| format!("--comm {c}")));
        parts.extend(self.cgroups.iter().map(|c| format!("--cgroup {c}")));
        parts.extend(self.lports.iter().map(|p| format!("--lport {p}")));
        parts.extend(self.rports.iter().map(|p| format!("--rport {p}")));
        parts.extend(self.ports.iter().map(|p| format!("--port {p}")));
        parts.extend(
            self.laddrs
                .iter()
                .map(|c| format!("--laddr {}/{}", c.addr, c.prefix)),
        );
        parts.extend(
            self.raddrs
                .iter()
                .map(|c| format!("--raddr {}/{}", c.addr, c.prefix)),
        );
        match self.family {
            Some(Family::V4) => parts.push("--ipv4".into()),
            Some(Family::V6) => parts.push("--ipv6".into()),
            None => {}
        }
        parts.join(" ")
    }

    /// Whether the user filters by process (`--pid`, `--comm`, `--cgroup`).
    pub fn has_owner_filters(&self) -> bool {
        !self.pids.is_empty() || !self.comms.is_empty() || !self.cgroups.is_empty()
    }

    /// Whether the cgroup filter accepts an owner whose cgroup has this
    /// path (`None`: unknown, which no `--cgroup` matches).
    pub fn matches_cgroup(&self, path: Option<&str>) -> bool {
        self.cgroups.is_empty()
            || path.is_some_and(|p| {
                self.cgroups
                    .iter()
                    .any(|prefix| crate::model::cgroup::path_has_prefix(p, prefix))
            })
    }

    /// Whether the endpoint filters (family, ports, addresses) accept a
    /// socket, whatever its owner.
    pub fn matches_endpoints(&self, family: Family, local: &Endpoint, remote: &Endpoint) -> bool {
        if self.family.is_some_and(|f| f != family) {
            return false;
        }
        if !self.lports.is_empty() && !self.lports.contains(&local.port) {
            return false;
        }
        if !self.rports.is_empty() && !self.rports.contains(&remote.port) {
            return false;
        }
        if !self.ports.is_empty()
            && !self.ports.contains(&local.port)
            && !self.ports.contains(&remote.port)
        {
            return false;
        }
        if !self.laddrs.is_empty() && !self.laddrs.iter().any(|c| c.contains(&local.addr)) {
            return false;
        }
        if !self.raddrs.is_empty() && !self.raddrs.iter().any(|c| c.contains(&remote.addr)) {
            return false;
        }
        true
    }

    /// Whether a socket with these endpoints and owner is wanted.
    /// Whether a socket's events belong in a filtered recording, from one
    /// of its transitions (owners are not considered).
    pub fn socket_verdict(&self, family: Family, local: &Endpoint, remote: &Endpoint) -> Verdict {
        if self.matches_endpoints(family, local, remote) {
            return Verdict::Keep;
        }
        // A connecting socket's first transition (CLOSE -> SYN_SENT) comes
        // before its local port, and perhaps its address, are chosen: the
        // local side can still turn out to match.
        let local_unset = local.port == 0 || local.addr.is_unspecified();
        if !local_unset {
            return Verdict::Drop;
        }
        let remote_only = Filter {
            lports: Vec::new(),
            laddrs: Vec::new(),
            ports: Vec::new(),
            ..self.clone()
        };
        if remote_only.matches_endpoints(family, local, remote) {
            Verdict::Undecided
        } else {
            Verdict::Drop
        }
    }

    pub fn matches(
        &self,
        family: Family,
        local: &Endpoint,
        remote: &Endpoint,
        owner: Option<&Owner>,
    ) -> bool {
        if !self.matches_endpoints(family, local, remote) {
            return false;
        }
        if !self.pids.is_empty() && !owner.is_some_and(|o| self.pids.contains(&o.pid)) {
            return false;
        }
        if !self.comms.is_empty() && !owner.is_some_and(|o| self.comms.contains(&o.comm)) {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recording filtered by local port keeps a client's first
    /// transition (no port yet) until a later one shows the port.
    #[test]
    fn socket_verdicts() {
        let ep = |s: &str| Endpoint::from(s.parse::<std::net::SocketAddr>().unwrap());
        let by_lport = Filter {
            lports: vec![80],
            ..Filter::default()
        };
        let v = |f: &Filter, l: &str, r: &str| f.socket_verdict(Family::V4, &ep(l), &ep(r));
        assert_eq!(
            v(&by_lport, "127.0.0.1:80", "127.0.0.1:5000"),
            Verdict::Keep
        );
        assert_eq!(
            v(&by_lport, "127.0.0.1:81", "127.0.0.1:5000"),
            Verdict::Drop
        );
        assert_eq!(
            v(&by_lport, "127.0.0.1:0", "127.0.0.1:5000"),
            Verdict::Undecided
        );
        let both = Filter {
            lports: vec![80],
            rports: vec![443],
            ..Filter::default()
        };
        // The remote side already fails: no local port can help.
        assert_eq!(v(&both, "0.0.0.0:0", "127.0.0.1:5000"), Verdict::Drop);
        assert_eq!(v(&both, "0.0.0.0:0", "127.0.0.1:443"), Verdict::Undecided);
        let either = Filter {
            ports: vec![443],
            ..Filter::default()
        };
        assert_eq!(v(&either, "0.0.0.0:0", "127.0.0.1:443"), Verdict::Keep);
        assert_eq!(v(&either, "0.0.0.0:0", "127.0.0.1:80"), Verdict::Undecided);
        assert_eq!(
            Filter {
                raddrs: vec!["10.0.0.0/8".parse().unwrap()],
                family: Some(Family::V4),
                ..both
            }
            .describe(),
            "--lport 80 --rport 443 --raddr 10.0.0.0/8 --ipv4"
        );
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint::from(s.parse::<std::net::SocketAddr>().unwrap())
    }

    fn owner(pid: u32, comm: &str) -> Owner {
        Owner {
            pid,
            comm: comm.into(),
            cgroup_id: 0,
        }
    }

    #[test]
    fn empty_filter_matches_everything() {
        let f = Filter::default();
        assert!(f.is_empty());
        assert!(f.matches(Family::V4, &ep("1.2.3.4:1"), &ep("5.6.7.8:2"), None));
    }

    #[test]
    fn ports_any_of_within_a_kind_and_all_kinds_must_match() {
        let f = Filter {
            lports: vec![80, 443],
            rports: vec![5000],
            ..Filter::default()
        };
        assert!(f.matches(Family::V4, &ep("10.0.0.1:443"), &ep("10.0.0.2:5000"), None));
        assert!(!f.matches(Family::V4, &ep("10.0.0.1:8080"), &ep("10.0.0.2:5000"), None));
        assert!(!f.matches(Family::V4, &ep("10.0.0.1:80"), &ep("10.0.0.2:5001"), None));
    }

    #[test]
    fn port_matches_either_side() {
        let f = Filter {
            ports: vec![5432],
            ..Filter::default()
        };
        assert!(!f.is_empty());
        assert!(f.matches(
            Family::V4,
            &ep("10.0.0.1:40000"),
            &ep("10.0.0.2:5432"),
            None
        ));
        assert!(f.matches(
            Family::V4,
            &ep("10.0.0.2:5432"),
            &ep("10.0.0.1:40000"),
            None
        ));
        assert!(!f.matches(
            Family::V4,
            &ep("10.0.0.1:40000"),
            &ep("10.0.0.2:5433"),
            None
        ));
        // With --lport too, both must hold.
        let both = Filter {
            lports: vec![40000],
            ..f
        };
        assert!(both.matches(
            Family::V4,
            &ep("10.0.0.1:40000"),
            &ep("10.0.0.2:5432"),
            None
        ));
        assert!(!both.matches(
            Family::V4,
            &ep("10.0.0.2:5432"),
            &ep("10.0.0.1:40000"),
            None
        ));
    }

    #[test]
    fn pid_and_comm_need_a_known_owner() {
        let f = Filter {
            pids: vec![42],
            ..Filter::default()
        };
        assert!(f.matches(
            Family::V4,
            &ep("1.1.1.1:1"),
            &ep("2.2.2.2:2"),
            Some(&owner(42, "a"))
        ));
        assert!(!f.matches(
            Family::V4,
            &ep("1.1.1.1:1"),
            &ep("2.2.2.2:2"),
            Some(&owner(43, "a"))
        ));
        assert!(!f.matches(Family::V4, &ep("1.1.1.1:1"), &ep("2.2.2.2:2"), None));
        let f = Filter {
            comms: vec!["nginx".into()],
            ..Filter::default()
        };
        assert!(f.matches(
            Family::V4,
            &ep("1.1.1.1:1"),
            &ep("2.2.2.2:2"),
            Some(&owner(1, "nginx"))
        ));
        assert!(!f.matches(
            Family::V4,
            &ep("1.1.1.1:1"),
            &ep("2.2.2.2:2"),
            Some(&owner(1, "nginx2"))
        ));
    }

    #[test]
    fn family_filter() {
        let f = Filter {
            family: Some(Family::V6),
            ..Filter::default()
        };
        assert!(f.matches(Family::V6, &ep("[::1]:1"), &ep("[::1]:2"), None));
        assert!(!f.matches(Family::V4, &ep("127.0.0.1:1"), &ep("127.0.0.1:2"), None));
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(&"10.200.3.4".parse().unwrap()));
        assert!(!c.contains(&"11.0.0.1".parse().unwrap()));
        assert!(c.contains(&"::ffff:10.1.1.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&"8.8.8.8".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert_eq!(one.prefix, 128);
        assert!(one.contains(&"::1".parse().unwrap()));
        assert!(!one.contains(&"::2".parse().unwrap()));
        let v6net: Cidr = "[fd00::]/8".parse().unwrap();
        assert!(v6net.contains(&"fdab::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "nope", "1.2.3", "1.2.3.4/x", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} should be rejected");
        }
    }
}
