//! Network namespaces: which one a command looks at (`--netns`), and how
//! tcpwatch reads another namespace's kernel.
//!
//! Every figure tcpwatch sets beside its events belongs to one network
//! namespace: the sockets sock_diag lists, `/proc/net/sockstat` and
//! `/proc/net/netstat`, and the `net.*` sysctls. The kernel answers each of
//! these for the namespace of the *calling thread* (a sock_diag socket
//! keeps the namespace it was opened in; `/proc/thread-self/net` and
//! `/proc/sys/net` follow the thread). So [`Namespace::run_in`] runs the
//! reader on a short-lived thread that entered the namespace with
//! `setns(2)`; tcpwatch's own threads never change namespace.
//!
//! A [`Namespace`] holds no descriptor of its namespace between reads: it
//! re-opens a file of it (`/run/netns/NAME` or `/proc/PID/ns/net`) each
//! time and checks the inode, so watching a namespace never keeps it
//! alive after its last process and mount are gone.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where `ip netns add` names namespaces.
pub const RUN_NETNS: &str = "/run/netns";

/// What `--netns` names. The syntax:
/// - `NAME`: the namespace `ip netns` calls NAME (a file in /run/netns);
/// - `pid:PID`: the namespace of process PID;
/// - a number: the namespace with that inode (as `lsns -t net`, `ip netns
///   identify` and tcpwatch's `netns` fields print it);
/// - `/PATH`: a namespace file (`/proc/PID/ns/net`, a bind mount);
/// - `all`: every namespace (not for `timewait`, whose figures are one
///   namespace's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsSpec {
    All,
    Name(String),
    Pid(u32),
    Inode(u32),
    Path(PathBuf),
}

impl FromStr for NetnsSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            return Ok(NetnsSpec::All);
        }
        if let Some(pid) = s.strip_prefix("pid:") {
            return match pid.parse::<u32>() {
                Ok(p) if p > 0 => Ok(NetnsSpec::Pid(p)),
                _ => Err(format!("'{s}': pid: takes a process id")),
            };
        }
        if s.starts_with('/') {
            return Ok(NetnsSpec::Path(PathBuf::from(s)));
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse::<u32>()
                .map(NetnsSpec::Inode)
                .map_err(|_| format!("'{s}' is not a namespace inode number"));
        }
        if s.is_empty() || s.contains('/') || s == "." || s == ".." {
            return Err(format!(
                "'{s}' is not a namespace: give NAME (in {RUN_NETNS}), pid:PID, an inode number, /PATH or all"
            ));
        }
        Ok(NetnsSpec::Name(s.to_string()))
    }
}

/// Why a namespace could not be found or entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("no network namespace named {name} (none in {RUN_NETNS}/)")]
    NoName { name: String },
    #[error("no process {pid}")]
    NoPid { pid: u32 },
    #[error("no process and no name in {RUN_NETNS}/ holds network namespace {inode}")]
    NoInode { inode: u32 },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file now holds another namespace (its process exited and the
    /// pid was reused, or the name was deleted and made again).
    #[error("network namespace {inode} is gone")]
    Gone { inode: u32 },
    #[error("cannot enter network namespace {inode}: {source}")]
    Enter {
        inode: u32,
        #[source]
        source: io::Error,
    },
    #[error("the thread reading network namespace {inode} failed")]
    Thread { inode: u32 },
}

/// A network namespace tcpwatch reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Its inode: what the events' `netns` holds.
    pub inode: u32,
    /// Its name in /run/netns, when it has one.
    pub name: Option<String>,
    /// A file of it, opened at each entry; `None` for tcpwatch's own.
    path: Option<PathBuf>,
}

/// `ioctl(NS_GET_NSTYPE)` (linux/nsfs.h): the namespace type of a nsfs file.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// The inode of the namespace file at `path` (following `/proc/PID/ns/net`
/// links), checked to be a network namespace.
fn netns_inode(path: &Path) -> Result<u32, NetnsError> {
    let file = fs::File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: an ioctl without argument on a descriptor we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(NetnsError::NotNetns {
            path: path.to_path_buf(),
        });
    }
    file.metadata()
        .map(|m| m.ino() as u32)
        .map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// The inode of tcpwatch's own network namespace.
pub fn own_inode() -> Option<u32> {
    fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|m| m.ino() as u32)
}

/// Names in /run/netns with their inodes.
pub fn named() -> Vec<(String, u32)> {
    let Ok(dir) = fs::read_dir(RUN_NETNS) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u32)> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let ino = fs::metadata(e.path()).ok()?.ino() as u32;
            Some((name, ino))
        })
        .collect();
    out.sort();
    out
}

impl Namespace {
    /// tcpwatch's own namespace.
    pub fn own() -> Namespace {
        let inode = own_inode().unwrap_or(0);
        Namespace {
            inode,
            name: name_of(inode),
            path: None,
        }
    }

    /// Whether it is tcpwatch's own namespace.
    pub fn is_own(&self) -> bool {
        self.path.is_none() || own_inode() == Some(self.inode)
    }

    /// The namespace `spec` names (`None` for `all`).
    pub fn resolve(spec: &NetnsSpec) -> Result<Option<Namespace>, NetnsError> {
        let path = match spec {
            NetnsSpec::All => return Ok(None),
            NetnsSpec::Inode(inode) => return Namespace::find(*inode).map(Some),
            NetnsSpec::Name(name) => {
                let path = Path::new(RUN_NETNS).join(name);
                if !path.exists() {
                    return Err(NetnsError::NoName { name: name.clone() });
                }
                path
            }
            NetnsSpec::Pid(pid) => {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    return Err(NetnsError::NoPid { pid: *pid });
                }
                PathBuf::from(format!("/proc/{pid}/ns/net"))
            }
            NetnsSpec::Path(p) => p.clone(),
        };
        let inode = netns_inode(&path)?;
        Ok(Some(Namespace::at(inode, path)))
    }

    fn at(inode: u32, path: PathBuf) -> Namespace {
        if own_inode() == Some(inode) {
            return Namespace::own();
        }
        let name = path
            .strip_prefix(RUN_NETNS)
            .ok()
            .and_then(|n| n.to_str())
            .map(String::from)
            .or_else(|| name_of(inode));
        Namespace {
            inode,
            name,
            path: Some(path),
        }
    }

    /// The namespace with this inode: by its name in /run/netns, else
    /// through a process in it.
    pub fn find(inode: u32) -> Result<Namespace, NetnsError> {
        if own_inode() == Some(inode) {
            return Ok(Namespace::own());
        }
        if let Some((name, _)) = named().into_iter().find(|(_, i)| *i == inode) {
            return Ok(Namespace::at(inode, Path::new(RUN_NETNS).join(name)));
        }
        let procs = fs::read_dir("/proc").map_err(|source| NetnsError::Open {
            path: PathBuf::from("/proc"),
            source,
        })?;
        for entry in procs.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if fs::metadata(&path).is_ok_and(|m| m.ino() as u32 == inode) {
                return Ok(Namespace::at(inode, path));
            }
        }
        Err(NetnsError::NoInode { inode })
    }

    /// How series and headlines name it: its name, else its inode.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.inode.to_string())
    }

    /// Runs `f` in this namespace: directly for tcpwatch's own, else on a
    /// thread that entered it (and ends with `f`).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let Some(path) = self.path.as_deref().filter(|_| !self.is_own()) else {
            return Ok(f());
        };
        let inode = self.inode;
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("tcpwatch-netns".into())
                .spawn_scoped(s, move || {
                    enter(path, inode)?;
                    Ok(f())
                })
                .map_err(|_| NetnsError::Thread { inode })?
                .join()
                .map_err(|_| NetnsError::Thread { inode })?
        })
    }

    /// [`Namespace::run_in`]; when the file it was found by no longer holds
    /// it (a process that exited), it is looked for again once.
    pub fn run_in_refind<T: Send>(
        &mut self,
        f: impl FnOnce() -> T + Send,
    ) -> Result<T, NetnsError> {
        match self.run_in_checked() {
            Ok(()) => {}
            Err(NetnsError::Gone { .. } | NetnsError::Open { .. }) => {
                let found = Namespace::find(self.inode)?;
                self.path = found.path;
                self.name = found.name.or(self.name.take());
            }
            Err(e) => return Err(e),
        }
        self.run_in(f)
    }

    /// Whether the file still opens to this namespace.
    fn run_in_checked(&self) -> Result<(), NetnsError> {
        match self.path.as_deref().filter(|_| !self.is_own()) {
            None => Ok(()),
            Some(path) => match netns_inode(path) {
                Ok(i) if i == self.inode => Ok(()),
                Ok(_) => Err(NetnsError::Gone { inode: self.inode }),
                Err(e) => Err(e),
            },
        }
    }
}

/// The namespaces a run covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Every namespace on the host.
    All,
    /// These (never empty).
    Only(Vec<Namespace>),
}

impl Selection {
    /// What the `--netns` given select; none given: `default_all` says
    /// whether that is every namespace (the daemon) or tcpwatch's own.
    pub fn resolve(specs: &[NetnsSpec], default_all: bool) -> Result<Selection, NetnsError> {
        if specs.is_empty() {
            return Ok(if default_all {
                Selection::All
            } else {
                Selection::Only(vec![Namespace::own()])
            });
        }
        let mut only: Vec<Namespace> = Vec::new();
        for spec in specs {
            match Namespace::resolve(spec)? {
                None => return Ok(Selection::All),
                Some(ns) if !only.iter().any(|o| o.inode == ns.inode) => only.push(ns),
                Some(_) => {}
            }
        }
        Ok(Selection::Only(only))
    }

    /// tcpwatch's own namespace alone.
    pub fn own() -> Selection {
        Selection::Only(vec![Namespace::own()])
    }

    /// The namespace the stream's context is about (its sockets from before
    /// tracing, its `tcp_fin_timeout`, the sweep): the one selected, else
    /// tcpwatch's own.
    pub fn primary(&self) -> Namespace {
        match self {
            Selection::Only(v) if v.len() == 1 => v[0].clone(),
            _ => Namespace::own(),
        }
    }

    /// The inodes whose events are kept; `None`: every namespace's.
    pub fn inodes(&self) -> Option<Vec<u32>> {
        match self {
            Selection::All => None,
            Selection::Only(v) => Some(v.iter().map(|n| n.inode).collect()),
        }
    }
}

/// The name of the namespace with this inode in /run/netns, if any.
pub fn name_of(inode: u32) -> Option<String> {
    named()
        .into_iter()
        .find(|(_, i)| *i == inode)
        .map(|(n, _)| n)
}

/// Moves the calling thread into the namespace at `path`, checking that
/// it is still the one with `inode`.
fn enter(path: &Path, inode: u32) -> Result<(), NetnsError> {
    let file = fs::File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let ino = file.metadata().map(|m| m.ino() as u32).unwrap_or(0);
    if ino != inode {
        return Err(NetnsError::Gone { inode });
    }
    // SAFETY: setns on a descriptor we own; it changes only this thread,
    // which ends once the caller's reader has run.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Enter {
            inode,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_syntax_reads() {
        assert_eq!("all".parse(), Ok(NetnsSpec::All));
        assert_eq!("pid:42".parse(), Ok(NetnsSpec::Pid(42)));
        assert_eq!("4026531840".parse(), Ok(NetnsSpec::Inode(4026531840)));
        assert_eq!("blue".parse(), Ok(NetnsSpec::Name("blue".into())));
        assert_eq!(
            "/proc/1/ns/net".parse(),
            Ok(NetnsSpec::Path("/proc/1/ns/net".into()))
        );
        for bad in ["", "pid:", "pid:x", "pid:0", "a/b", "..", "99999999999"] {
            assert!(bad.parse::<NetnsSpec>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_namespace_runs_in_place() {
        let own = Namespace::own();
        assert!(own.is_own());
        assert_eq!(Some(own.inode), own_inode());
        let here = std::thread::current().id();
        assert_eq!(own.run_in(|| std::thread::current().id()).unwrap(), here);
        let found = Namespace::find(own.inode).unwrap();
        assert!(found.is_own());
    }

    #[test]
    fn what_is_not_a_namespace_is_said() {
        let e = Namespace::resolve(&NetnsSpec::Name("tcpwatch-no-such-ns".into())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no network namespace named tcpwatch-no-such-ns (none in /run/netns/)"
        );
        let e = Namespace::resolve(&NetnsSpec::Path("/proc/self/status".into())).unwrap_err();
        assert!(matches!(e, NetnsError::NotNetns { .. }), "{e}");
        let e = Namespace::resolve(&NetnsSpec::Inode(1)).unwrap_err();
        assert!(matches!(e, NetnsError::NoInode { inode: 1 }), "{e}");
        assert_eq!(Namespace::resolve(&NetnsSpec::All).unwrap(), None);
    }
}
