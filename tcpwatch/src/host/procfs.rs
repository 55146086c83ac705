//! A one-shot snapshot of the TCP sockets that already exist when tracing
//! starts, with the process that owns each one.
//!
//! The tracepoint only tells us about state *transitions*, so a socket that
//! was opened before tcpwatch started has no known owner. Like `ss -p`, we
//! recover it once from procfs:
//!
//! 1. `/proc/net/tcp` and `/proc/net/tcp6` list every socket with its
//!    4-tuple, state and inode;
//! 2. the `socket:[INODE]` links in `/proc/PID/fd/` map inodes to processes;
//! 3. `/proc/PID/comm` and `/proc/PID/cgroup` name the process and its
//!    cgroup v2 id.
//!
//! Everything here is best effort: processes come and go while we scan, so a
//! process that vanishes or cannot be read simply leaves its sockets without
//! an owner. Only failing to read `/proc` itself is an error.
//!
//! Addresses are kept exactly as the kernel prints them. In particular, an
//! IPv4 peer of a dual-stack IPv6 socket appears in `/proc/net/tcp6` as an
//! IPv4-mapped address (`::ffff:a.b.c.d`) and is kept as that IPv6 address,
//! because the tracepoint also reports such sockets as `AF_INET6` with the
//! mapped address, so lookups by 4-tuple match.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::model::{Endpoint, Owner, TcpState};

const PROC_NET_TCP: &str = "/proc/net/tcp";
const PROC_NET_TCP6: &str = "/proc/net/tcp6";

/// Errors reading or parsing procfs.
#[derive(Debug, thiserror::Error)]
pub enum ProcfsError {
    /// A file that must be readable (e.g. `/proc/net/tcp`) could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory that must be listable (`/proc`) could not be listed.
    #[error("cannot list directory {path}: {source}")]
    ListDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A row of `/proc/net/tcp{,6}` did not have the expected format.
    #[error("{path} line {line}: {reason}")]
    Malformed {
        path: &'static str,
        line: usize,
        reason: String,
    },
}

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
    /// Reads the live system: `/proc/net/tcp{,6}`, then every process's fd
    /// table. A missing `/proc/net/tcp6` (IPv6 disabled) counts as empty.
    pub fn capture() -> Result<SocketSnapshot, ProcfsError> {
        let tcp = read_to_string(Path::new(PROC_NET_TCP))?;
        let tcp6 = match fs::read_to_string(PROC_NET_TCP6) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ProcfsError::Read {
                    path: PathBuf::from(PROC_NET_TCP6),
                    source,
                })
            }
        };
        let rows4 = parse_proc_net_tcp(&tcp, false)?;
        let rows6 = parse_proc_net_tcp(&tcp6, true)?;
        let wanted: HashSet<u64> = rows4.iter().chain(&rows6).map(|r| r.2).collect();

        let inode_pid = scan_socket_inodes(Path::new("/proc"), &wanted)?;
        // Look each process up once, however many sockets it holds.
        let mut pid_owner: HashMap<u32, Option<Owner>> = HashMap::new();
        let mut inode_owner = HashMap::new();
        for (inode, pid) in inode_pid {
            let owner = pid_owner.entry(pid).or_insert_with(|| lookup_owner(pid));
            if let Some(owner) = owner {
                inode_owner.insert(inode, owner.clone());
            }
        }
        Ok(Self::build(rows4.into_iter().chain(rows6), &inode_owner))
    }

    /// Builds a snapshot from the text of `/proc/net/tcp` and
    /// `/proc/net/tcp6` and an inode → owner map, without touching the
    /// system.
    pub fn from_parts(
        tcp: &str,
        tcp6: &str,
        inode_owner: HashMap<u64, Owner>,
    ) -> Result<SocketSnapshot, ProcfsError> {
        let rows4 = parse_proc_net_tcp(tcp, false)?;
        let rows6 = parse_proc_net_tcp(tcp6, true)?;
        Ok(Self::build(rows4.into_iter().chain(rows6), &inode_owner))
    }

    /// Builds a snapshot from entries read back from a recording.
    pub fn from_entries(entries: Vec<SnapshotEntry>) -> SocketSnapshot {
        let mut inode_owner = HashMap::new();
        let mut rows = Vec::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            // Recordings keep only entries with owners; key them uniquely.
            let id = i as u64 + 1;
            if let Some(o) = e.owner {
                inode_owner.insert(id, o);
            }
            rows.push((e.key, e.state, id));
        }
        Self::build(rows.into_iter(), &inode_owner)
    }

    fn build(
        rows: impl Iterator<Item = (SocketKey, TcpState, u64)>,
        inode_owner: &HashMap<u64, Owner>,
    ) -> SocketSnapshot {
        let mut snap = SocketSnapshot::default();
        for (key, state, inode) in rows {
            let owner = inode_owner.get(&inode).cloned();
            let index = snap.entries.len();
            let known = owner.is_some();
            snap.entries.push(SnapshotEntry {
                key,
                state,
                inode,
                owner,
            });
            match snap.by_key.get(&key) {
                Some(&prev) if !known || snap.entries[prev].owner.is_some() => {}
                _ => {
                    snap.by_key.insert(key, index);
                }
            }
        }
        snap
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

    /// Every socket, in `/proc/net/tcp` then `/proc/net/tcp6` order.
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

/// Parses the text of `/proc/net/tcp` (`v6 == false`) or `/proc/net/tcp6`
/// into (4-tuple, state, inode) rows, skipping the header, blank lines and
/// sockets with inode 0 (`TIME_WAIT`, not yet accepted, orphaned: no process
/// can hold them). A malformed row is an error naming its 1-based line.
pub fn parse_proc_net_tcp(
    text: &str,
    v6: bool,
) -> Result<Vec<(SocketKey, TcpState, u64)>, ProcfsError> {
    let path = if v6 { PROC_NET_TCP6 } else { PROC_NET_TCP };
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let malformed = |reason: String| ProcfsError::Malformed {
            path,
            line: i + 1,
            reason,
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.first() {
            None => continue,
            Some(&"sl") => continue,
            Some(_) => {}
        }
        if fields.len() < 10 {
            return Err(malformed(format!(
                "expected at least 10 fields, found {}",
                fields.len()
            )));
        }
        if !fields[0].ends_with(':') {
            return Err(malformed(format!("bad slot field {:?}", fields[0])));
        }
        let local = parse_endpoint(fields[1], v6).map_err(&malformed)?;
        let remote = parse_endpoint(fields[2], v6).map_err(&malformed)?;
        let st = fields[3];
        let number = parse_hex(st, 2)
            .and_then(|n| u8::try_from(n).ok())
            .ok_or_else(|| malformed(format!("bad state {st:?}")))?;
        let state = TcpState::from_kernel(number)
            .ok_or_else(|| malformed(format!("unknown kernel TCP state {st:?}")))?;
        let inode_text = fields[9];
        let inode = if inode_text.bytes().all(|b| b.is_ascii_digit()) {
            inode_text.parse::<u64>().ok()
        } else {
            None
        }
        .ok_or_else(|| malformed(format!("bad inode {inode_text:?}")))?;
        if inode != 0 {
            rows.push((SocketKey { local, remote }, state, inode));
        }
    }
    Ok(rows)
}

/// Parses `ADDR:PORT` as printed by the kernel. Each 8-digit group of ADDR
/// is a 32-bit word of the address as it lies in memory, printed as a native
/// integer, so converting back with native byte order restores network
/// order (and stays right on big-endian hosts, where the kernel does the
/// same). PORT is already in host order.
fn parse_endpoint(field: &str, v6: bool) -> Result<Endpoint, String> {
    let bad = || format!("bad address {field:?}");
    let (addr, port) = field.split_once(':').ok_or_else(bad)?;
    let port = parse_hex(port, 4)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(bad)?;
    let words = if v6 { 4 } else { 1 };
    if addr.len() != 8 * words {
        return Err(bad());
    }
    let mut bytes = [0u8; 16];
    for w in 0..words {
        let word = addr
            .get(8 * w..8 * (w + 1))
            .and_then(|s| parse_hex(s, 8))
            .ok_or_else(bad)?;
        bytes[4 * w..4 * (w + 1)].copy_from_slice(&word.to_ne_bytes());
    }
    let addr = if v6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    };
    Ok(Endpoint::new(addr, port))
}

/// Exactly `digits` hex digits (`from_str_radix` alone would accept a sign).
fn parse_hex(s: &str, digits: usize) -> Option<u32> {
    if s.len() != digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

fn read_to_string(path: &Path) -> Result<String, ProcfsError> {
    fs::read_to_string(path).map_err(|source| ProcfsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Maps each wanted socket inode to the process holding it, by reading the
/// `socket:[INODE]` links under `proc/PID/fd`. Listing `proc` only yields
/// thread-group leaders, so each process is seen once. When several
/// processes share a socket (fork, fd passing) the lowest pid is kept: it is
/// deterministic, and usually the parent that created it.
fn scan_socket_inodes(
    proc: &Path,
    wanted: &HashSet<u64>,
) -> Result<HashMap<u64, u32>, ProcfsError> {
    let mut found: HashMap<u64, u32> = HashMap::new();
    if wanted.is_empty() {
        return Ok(found);
    }
    let dir = fs::read_dir(proc).map_err(|source| ProcfsError::ListDir {
        path: proc.to_path_buf(),
        source,
    })?;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // The process may exit or deny access at any point: skip it.
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(inode) = socket_inode(target.as_os_str()) {
                if wanted.contains(&inode) {
                    found
                        .entry(inode)
                        .and_modify(|p| *p = (*p).min(pid))
                        .or_insert(pid);
                }
            }
        }
    }
    Ok(found)
}

/// The inode of a `socket:[INODE]` fd link target.
fn socket_inode(target: &OsStr) -> Option<u64> {
    let digits = target
        .as_bytes()
        .strip_prefix(b"socket:[")?
        .strip_suffix(b"]")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The command name and cgroup v2 id of a process; `None` if the process
/// does not exist (or its comm cannot be read). The cgroup id is 0 when it
/// cannot be determined (no cgroup v2, process gone meanwhile, ...).
pub fn lookup_owner(pid: u32) -> Option<Owner> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let comm = fs::read(dir.join("comm")).ok()?;
    // Only the newline procfs appends: a comm may itself end in spaces, and
    // it must match what `bpf_get_current_comm` reports.
    let comm = String::from_utf8_lossy(&comm)
        .trim_end_matches('\n')
        .to_string();
    let cgroup_id = fs::read(dir.join("cgroup"))
        .ok()
        .and_then(|text| cgroup_v2_id(&text))
        .unwrap_or(0);
    Some(Owner {
        pid,
        comm,
        cgroup_id,
    })
}

/// The cgroup v2 id for the contents of a `/proc/PID/cgroup` file: the inode
/// number of the cgroup's directory, which is what `bpf_get_current_cgroup_id`
/// returns (the kernfs node id).
fn cgroup_v2_id(proc_cgroup: &[u8]) -> Option<u64> {
    let rel = proc_cgroup
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"0::"))?;
    let (root, mount) = cgroup2_mount()?;
    let below = path_below(rel, root.as_os_str().as_bytes())?;
    fs::metadata(mount.join(OsStr::from_bytes(below)))
        .ok()
        .map(|m| m.ino())
}

/// The part of cgroup path `rel` below the mount's `root`, without leading
/// slashes (so it joins onto the mount point). Both are relative to our
/// cgroup namespace; usually `root` is `/`. `None` if `rel` lies outside
/// the mount.
fn path_below<'a>(rel: &'a [u8], root: &[u8]) -> Option<&'a [u8]> {
    let root = root.strip_suffix(b"/").unwrap_or(root);
    let below = rel.strip_prefix(root)?;
    if !below.is_empty() && !below.starts_with(b"/") {
        return None; // "/ab" is not below "/a"
    }
    let start = below.iter().position(|&b| b != b'/').unwrap_or(below.len());
    below.get(start..)
}

/// (root, mount point) of the cgroup2 hierarchy, found once. On a pure v2
/// system that is `/sys/fs/cgroup`, but on a hybrid v1/v2 system
/// `/sys/fs/cgroup` is a tmpfs and v2 lives at e.g. `/sys/fs/cgroup/unified`,
/// so `/proc/self/mountinfo` is consulted first.
fn cgroup2_mount() -> Option<&'static (PathBuf, PathBuf)> {
    static MOUNT: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            fs::read("/proc/self/mountinfo")
                .ok()
                .and_then(|text| cgroup2_from_mountinfo(&text))
                .or_else(|| {
                    // Only a cgroup2 root has `cgroup.controllers`.
                    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                        .iter()
                        .map(PathBuf::from)
                        .find(|p| p.join("cgroup.controllers").exists())
                        .map(|p| (PathBuf::from("/"), p))
                })
        })
        .as_ref()
}

/// (root, mount point) of the first `cgroup2` mount in mountinfo text:
/// `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SRC SUPEROPTS`.
fn cgroup2_from_mountinfo(text: &[u8]) -> Option<(PathBuf, PathBuf)> {
    text.split(|&b| b == b'\n').find_map(|line| {
        let fields: Vec<&[u8]> = line
            .split(|&b| b == b' ')
            .filter(|f| !f.is_empty())
            .collect();
        let sep = fields.iter().position(|f| *f == b"-")?;
        if fields.get(sep + 1) != Some(&&b"cgroup2"[..]) {
            return None;
        }
        let root = unescape_mount_path(fields.get(3)?);
        let mount = unescape_mount_path(fields.get(4)?);
        Some((root, mount))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::process::Command;

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
    const HEADER6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";

    fn ep(s: &str) -> Endpoint {
        Endpoint::from(s.parse::<SocketAddr>().unwrap())
    }

    fn owner(pid: u32, comm: &str) -> Owner {
        Owner {
            pid,
            comm: comm.to_string(),
            cgroup_id: 42,
        }
    }

    #[test]
    fn parses_ipv4_rows() {
        let text = format!(
            "{HEADER}\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n\
   1: 0202000A:C350 5071000A:01BB 01 00000000:00000000 02:00000B5C 00000000  1000        0 67890 2 0000000000000000 20 4 30 10 -1\n\
   2: 0100007F:1F90 0100007F:D431 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000\n"
        );
        let rows = parse_proc_net_tcp(&text, false).unwrap();
        assert_eq!(
            rows,
            vec![
                (
                    SocketKey {
                        local: ep("127.0.0.1:8080"),
                        remote: ep("0.0.0.0:0")
                    },
                    TcpState::Listen,
                    12345
                ),
                (
                    SocketKey {
                        local: ep("10.0.2.2:50000"),
                        remote: ep("10.0.113.80:443")
                    },
                    TcpState::Established,
                    67890
                ),
                // The TIME_WAIT row has inode 0 and is dropped.
            ]
        );
    }

    #[test]
    fn parses_ipv6_rows_and_keeps_mapped_v4() {
        let text = format!(
            "{HEADER6}\n\
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0\n\
   1: 0000000000000000FFFF00000100007F:0050 0000000000000000FFFF00000200007F:E0F1 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 20 4 30 10 -1\n\
   2: B80D0120000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 100 0 0 10 0\n"
        );
        let rows = parse_proc_net_tcp(&text, true).unwrap();
        assert_eq!(
            rows,
            vec![
                (
                    SocketKey {
                        local: ep("[::1]:8080"),
                        remote: ep("[::]:0")
                    },
                    TcpState::Listen,
                    111
                ),
                (
                    SocketKey {
                        local: ep("[::ffff:127.0.0.1]:80"),
                        remote: ep("[::ffff:127.0.0.2]:57585")
                    },
                    TcpState::Established,
                    222
                ),
                (
                    SocketKey {
                        local: ep("[2001:db8::1]:443"),
                        remote: ep("[::]:0")
                    },
                    TcpState::Listen,
                    333
                ),
            ]
        );
        // The mapped address stays IPv6, as the tracepoint reports it.
        assert!(rows[1].0.local.addr.is_ipv6());
    }

    #[test]
    fn maps_every_kernel_state() {
        for n in 1u8..=13 {
            let line = format!(
                "0: 0100007F:0001 0100007F:0002 {n:02X} 00000000:00000000 00:00000000 00000000 0 0 7 1"
            );
            let rows = parse_proc_net_tcp(&line, false).unwrap();
            assert_eq!(rows[0].1, TcpState::from_kernel(n).unwrap());
            assert_eq!(rows[0].1.kernel_number(), n);
        }
        let line = "0: 0100007F:0001 0100007F:0002 0A 0:0 0:0 0 0 0 7 1";
        assert_eq!(
            parse_proc_net_tcp(line, false).unwrap()[0].1,
            TcpState::Listen
        );
    }

    #[test]
    fn malformed_rows_are_errors_with_line_numbers() {
        let good = "0: 0100007F:0001 0100007F:0002 01 0:0 0:0 0 0 0 7";
        let bad = [
            "0: 0100007F:0001",                                   // too short
            "0 0100007F:0001 0100007F:0002 01 0:0 0:0 0 0 0 7",   // slot
            "0: 0100007F 0100007F:0002 01 0:0 0:0 0 0 0 7",       // no port
            "0: 0100007G:0001 0100007F:0002 01 0:0 0:0 0 0 0 7",  // not hex
            "0: +100007F:0001 0100007F:0002 01 0:0 0:0 0 0 0 7",  // sign
            "0: 0100007F:00001 0100007F:0002 01 0:0 0:0 0 0 0 7", // long port
            "0: 00000000000000000000000001000000:0001 0100007F:0002 01 0:0 0:0 0 0 0 7", // v6 in v4
            "0: 0100007F:0001 0100007F:0002 00 0:0 0:0 0 0 0 7",  // state 0
            "0: 0100007F:0001 0100007F:0002 0E 0:0 0:0 0 0 0 7",  // state 14
            "0: 0100007F:0001 0100007F:0002 FFF 0:0 0:0 0 0 0 7", // state width
            "0: 0100007F:0001 0100007F:0002 01 0:0 0:0 0 0 0 -7", // inode sign
            "0: 0100007F:0001 0100007F:0002 01 0:0 0:0 0 0 0 99999999999999999999999", // overflow
            "0: é100007F:0001 0100007F:0002 01 0:0 0:0 0 0 0 7",  // non-ASCII
        ];
        for b in bad {
            let text = format!("{HEADER}\n{good}\n\n{b}\n");
            match parse_proc_net_tcp(&text, false) {
                Err(ProcfsError::Malformed { line, path, .. }) => {
                    assert_eq!(line, 4, "{b}");
                    assert_eq!(path, "/proc/net/tcp");
                }
                other => panic!("{b:?} gave {other:?}"),
            }
        }
        let err = parse_proc_net_tcp("0: 0100007F:0001 0100007F:0002 01 0:0 0:0 0 0 0 7", true)
            .unwrap_err();
        assert!(
            err.to_string().starts_with("/proc/net/tcp6 line 1: "),
            "{err}"
        );
        // Garbage of any kind must not panic.
        for text in [
            "",
            "\n\n",
            "sl",
            ":",
            "0: :",
            "0: : : : : : : : : :",
            "\u{0}\u{ffff}",
        ] {
            let _ = parse_proc_net_tcp(text, false);
            let _ = parse_proc_net_tcp(text, true);
        }
    }

    #[test]
    fn snapshot_from_parts_indexes_owners() {
        let tcp = format!(
            "{HEADER}\n\
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 10 1\n\
   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 0 0 11 1\n\
   2: 0100007F:9C41 0100007F:0050 01 00000000:00000000 00:00000000 00000000 0 0 12 1\n"
        );
        let tcp6 = format!(
            "{HEADER6}\n\
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 20 1\n\
   1: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 21 1\n"
        );
        let owners = HashMap::from([
            (10, owner(100, "nginx")),
            (11, owner(101, "nginx")),
            (21, owner(7, "sshd")),
        ]);
        let snap = SocketSnapshot::from_parts(&tcp, &tcp6, owners).unwrap();
        assert_eq!(snap.len(), 5);
        assert!(!snap.is_empty());
        let key = |l: &str, r: &str| SocketKey {
            local: ep(l),
            remote: ep(r),
        };
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
        assert!(SocketSnapshot::from_parts("", "", HashMap::new())
            .unwrap()
            .is_empty());
        assert!(SocketSnapshot::from_parts("0: x", "", HashMap::new()).is_err());
    }

    #[test]
    fn helpers_parse_links_and_mountinfo() {
        assert_eq!(socket_inode(OsStr::new("socket:[12345]")), Some(12345));
        assert_eq!(socket_inode(OsStr::new("socket:[]")), None);
        assert_eq!(socket_inode(OsStr::new("pipe:[12345]")), None);
        assert_eq!(socket_inode(OsStr::new("socket:[+1]")), None);
        assert_eq!(socket_inode(OsStr::new("/dev/null")), None);
        let mi = b"31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n\
41 31 0:38 /a\\040b /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_from_mountinfo(mi),
            Some((
                PathBuf::from("/a b"),
                PathBuf::from("/sys/fs/cgroup/uni fied")
            ))
        );
        assert_eq!(cgroup2_from_mountinfo(b"garbage\n- cgroup2"), None);
        assert_eq!(unescape_mount_path(b"x\\"), PathBuf::from("x\\"));
        assert_eq!(unescape_mount_path(b"\\777"), PathBuf::from("\\777"));
        assert_eq!(path_below(b"/", b"/"), Some(&b""[..]));
        assert_eq!(
            path_below(b"/user.slice/a", b"/"),
            Some(&b"user.slice/a"[..])
        );
        assert_eq!(path_below(b"/ns/x", b"/ns"), Some(&b"x"[..]));
        assert_eq!(path_below(b"/ns", b"/ns/"), Some(&b""[..]));
        assert_eq!(path_below(b"/nsx", b"/ns"), None);
        assert_eq!(path_below(b"/other", b"/ns"), None);
        assert_eq!(cgroup_v2_id(b"1:cpu:/\n"), None);
    }

    /// The cgroup v2 directory of this process, computed independently of
    /// the code under test: `/sys/fs/cgroup` on a pure v2 system, or
    /// `/sys/fs/cgroup/unified` on a hybrid one.
    fn expected_cgroup_id() -> Option<u64> {
        let text = fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        let base = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .find(|b| Path::new(b).join("cgroup.controllers").exists())?;
        let path = format!("{base}{rel}");
        fs::metadata(path).ok().map(|m| m.ino())
    }

    /// pids that `ss -tanp` reports for sockets whose local address is
    /// `local`, or `None` when ss cannot be run.
    fn ss_pids(local: SocketAddr) -> Option<Vec<u32>> {
        let out = Command::new("ss").args(["-Htanp"]).output().ok()?;
        assert!(out.status.success(), "ss failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // Newer ss brackets IPv6 addresses, older versions do not.
        let forms = [
            local.to_string(),
            format!("{}:{}", local.ip(), local.port()),
        ];
        let mut pids = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields.get(3).is_some_and(|l| forms.iter().any(|f| f == l)) {
                continue;
            }
            let mut rest = line;
            let mut found = false;
            while let Some(at) = rest.find("pid=") {
                rest = &rest[at + 4..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                pids.push(digits.parse().unwrap());
                found = true;
            }
            assert!(found, "ss shows no process for {line:?}");
        }
        Some(pids)
    }

    fn check_live(loopback: &str) {
        let listener = match TcpListener::bind(format!("{loopback}:0")) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping {loopback}: {e}");
                return;
            }
        };
        let laddr = listener.local_addr().unwrap();
        let client = TcpStream::connect(laddr).unwrap();
        let (server, _) = listener.accept().unwrap();

        let snap = SocketSnapshot::capture().unwrap();
        let me = std::process::id();
        let comm = fs::read_to_string("/proc/self/comm").unwrap();
        let comm = comm.trim();
        let cgroup = expected_cgroup_id();

        let unspecified = Endpoint::new(
            if laddr.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        );
        let keys = [
            SocketKey {
                local: laddr.into(),
                remote: unspecified,
            },
            SocketKey {
                local: client.local_addr().unwrap().into(),
                remote: client.peer_addr().unwrap().into(),
            },
            SocketKey {
                local: server.local_addr().unwrap().into(),
                remote: server.peer_addr().unwrap().into(),
            },
        ];
        for key in &keys {
            let owner = snap
                .owner_of(key)
                .unwrap_or_else(|| panic!("{key:?} not in snapshot"));
            assert_eq!(owner.pid, me, "{key:?}");
            assert_eq!(owner.comm, comm, "{key:?}");
            if let Some(id) = cgroup {
                assert_eq!(owner.cgroup_id, id, "{key:?}");
            }
        }
        let states: Vec<_> = keys
            .iter()
            .map(|k| snap.entries().find(|e| e.key == *k).unwrap().state)
            .collect();
        assert_eq!(
            states,
            [
                TcpState::Listen,
                TcpState::Established,
                TcpState::Established
            ]
        );
        assert!(snap
            .listeners()
            .any(|(e, o)| *e == Endpoint::from(laddr) && o.pid == me));
        assert_eq!(lookup_owner(me).as_ref(), snap.owner_of(&keys[0]));

        match ss_pids(laddr) {
            // The listener and the accepted end both have this local port.
            Some(pids) => {
                assert!(pids.len() >= 2, "ss pids {pids:?}");
                assert!(pids.iter().all(|p| *p == me), "ss pids {pids:?} vs {me}");
            }
            None => eprintln!("ss not available, skipping cross-check"),
        }
        drop((client, server, listener));
    }

    #[test]
    fn live_snapshot_finds_own_sockets_ipv4() {
        check_live("127.0.0.1");
    }

    #[test]
    fn live_snapshot_finds_own_sockets_ipv6() {
        check_live("[::1]");
    }

    /// Moves a child process into a fresh cgroup and checks that its cgroup
    /// id is that directory's inode (not the root's, not a v1 directory).
    #[test]
    fn lookup_owner_finds_child_cgroup() {
        let Some(base) = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .find(|b| Path::new(b).join("cgroup.controllers").exists())
        else {
            eprintln!("no cgroup v2 hierarchy, skipping");
            return;
        };
        let dir = PathBuf::from(format!(
            "{base}/tcpwatch-procfs-test-{}",
            std::process::id()
        ));
        if let Err(e) = fs::create_dir(&dir) {
            eprintln!("cannot create {}: {e}, skipping", dir.display());
            return;
        }
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let moved = fs::write(dir.join("cgroup.procs"), child.id().to_string());
        let owner = lookup_owner(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let expected = fs::metadata(&dir).unwrap().ino();
        let _ = fs::remove_dir(&dir);
        moved.unwrap();
        let owner = owner.unwrap();
        assert_eq!(owner.pid, child.id());
        assert_eq!(owner.comm, "sleep");
        assert_eq!(owner.cgroup_id, expected);
        assert_ne!(expected, fs::metadata(base).unwrap().ino());
    }

    #[test]
    fn lookup_owner_of_missing_pid_is_none() {
        // Above the kernel's PID_MAX_LIMIT (4M), so it can never exist.
        assert_eq!(lookup_owner(u32::MAX), None);
    }
}
