//! Who owns the TCP sockets that already exist when tracing starts: a
//! one-shot [`SocketSnapshot`] of the live system.
//!
//! The tracepoint only tells us about state *transitions*, so a socket that
//! was opened before tcpwatch started has no known owner. Like `ss -p`, we
//! recover it once:
//!
//! 1. sock_diag lists every full socket with its 4-tuple, state and inode
//!    ([`crate::host::sockdiag::dump_full_sockets`]);
//! 2. the `socket:[INODE]` links in `/proc/PID/fd/` map inodes to processes;
//! 3. `/proc/PID/comm` and `/proc/PID/cgroup` name the process and its
//!    cgroup v2 id.
//!
//! Everything in /proc is best effort: processes come and go while we
//! scan, so a process that vanishes or cannot be read simply leaves its
//! sockets without an owner. Only failing to list the sockets or `/proc`
//! itself is an error.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::host::sockdiag::{self, SockDiagError};
use crate::model::decode::printable_name;
use crate::model::snapshot::{SocketKey, SocketSnapshot};
use crate::model::Owner;

/// Why the snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ProcfsError {
    /// The kernel's list of sockets could not be read.
    #[error("cannot list the TCP sockets")]
    Sockets(#[source] SockDiagError),
    /// A directory that must be listable (`/proc`) could not be listed.
    #[error("cannot list directory {}", path.display())]
    ListDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Reads the live system: the kernel's list of full TCP sockets (in the
/// calling thread's network namespace), then every process's fd table.
/// Sockets with inode 0 (not yet accepted, orphaned: no process can hold
/// them) are left out, as `/proc/net/tcp` readers always did.
pub fn capture() -> Result<SocketSnapshot, ProcfsError> {
    let sockets: Vec<_> = sockdiag::dump_full_sockets()
        .map_err(ProcfsError::Sockets)?
        .into_iter()
        .filter(|s| s.inode != 0)
        .map(|s| {
            let key = SocketKey {
                local: s.local,
                remote: s.remote,
            };
            (key, s.state, u64::from(s.inode))
        })
        .collect();
    let wanted: HashSet<u64> = sockets.iter().map(|s| s.2).collect();
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
    Ok(SocketSnapshot::from_sockets(sockets, &inode_owner))
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
    let comm = comm_text(&fs::read(dir.join("comm")).ok()?);
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

/// A process name from `/proc/PID/comm`: only the newline procfs appends
/// is cut (a comm may itself end in spaces, and it must match what
/// `bpf_get_current_comm` reports), and control characters become `?`, as
/// in names the kernel reports, so a name can never break a line.
fn comm_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    printable_name(text.strip_suffix('\n').unwrap_or(&text)).into_owned()
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
pub(crate) fn cgroup2_mount() -> Option<&'static (PathBuf, PathBuf)> {
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

    #[test]
    fn comm_loses_the_newline_and_control_characters() {
        assert_eq!(comm_text(b"nginx\n"), "nginx");
        assert_eq!(comm_text(b"ends in space \n"), "ends in space ");
        assert_eq!(comm_text(b"x\r\x1b[2Jy\n"), "x??[2Jy");
        assert_eq!(comm_text(b"two\n\n"), "two?");
        assert_eq!(comm_text(b"\xffbad\n"), "\u{fffd}bad");
    }
}
