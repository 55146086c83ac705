//! The network namespaces a test makes for itself (the only addresses
//! besides loopback a test may use), deleted when dropped, also when the
//! test fails; and two of them joined by a veth pair.

use std::ffi::OsStr;
use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use super::run_ok;

/// A network namespace of the test's own, with loopback up.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `tcpwatch-test-<pid>-<n>`, loopback up.
    pub fn new() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tcpwatch-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        // A leftover of a killed run that had the same pid.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Its inode: what tcpwatch prints as `netns`.
    pub fn inode(&self) -> u32 {
        fs::metadata(self.path())
            .unwrap_or_else(|e| panic!("netns {}: {e}", self.name))
            .ino() as u32
    }

    /// `ip netns exec NAME program`, for the caller to add arguments.
    /// `ip netns exec` execs the program in place: the child's pid is the
    /// program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// `ip -n NAME ARGS`; its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Writes a sysctl of the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        run_ok(
            self.command("sysctl")
                .args(["-qw", &format!("{key}={value}")]),
        );
    }

    /// Runs `f` on a thread that entered the namespace: its sockets, its
    /// /proc/thread-self/net and the processes it starts are the
    /// namespace's. No process start-up in between, so it is quick.
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.in_ns_as(None, f)
    }

    /// [`Netns::in_ns`] on a thread named `name` (the comm of the sockets
    /// it makes), if given.
    pub fn in_ns_as<T: Send>(&self, name: Option<&str>, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        let mut builder = std::thread::Builder::new();
        if let Some(n) = name {
            builder = builder.name(n.into());
        }
        std::thread::scope(|s| {
            builder
                .spawn_scoped(s, || {
                    enter(&path);
                    f()
                })
                .unwrap()
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ok = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: could not delete network namespace {}", self.name);
        }
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &str) {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on a descriptor we own; only this thread changes.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

pub const VETH_A: &str = "tw-veth-a";
pub const VETH_B: &str = "tw-veth-b";
pub const MAC_A: &str = "02:74:77:00:00:0a";
pub const MAC_B: &str = "02:74:77:00:00:0b";

/// Two namespaces joined by a veth pair: `a` has 10.231.N.1/24 on
/// VETH_A, `b` has 10.231.N.2/24 on VETH_B.
pub struct VethPair {
    pub a: Netns,
    pub b: Netns,
    pub addr_a: Ipv4Addr,
    pub addr_b: Ipv4Addr,
}

impl VethPair {
    pub fn create() -> VethPair {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let subnet = (NEXT.fetch_add(1, Ordering::SeqCst) % 200 + 1) as u8;
        let (a, b) = (Netns::new(), Netns::new());
        // Both ends are created inside their namespaces: nothing appears in
        // the host's.
        run_ok(Command::new("ip").args([
            "link", "add", VETH_A, "address", MAC_A, "netns", &a.name, "type", "veth", "peer",
            "name", VETH_B, "address", MAC_B, "netns", &b.name,
        ]));
        let pair = VethPair {
            a,
            b,
            addr_a: Ipv4Addr::new(10, 231, subnet, 1),
            addr_b: Ipv4Addr::new(10, 231, subnet, 2),
        };
        for (ns, dev, addr) in [
            (&pair.a, VETH_A, pair.addr_a),
            (&pair.b, VETH_B, pair.addr_b),
        ] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        pair
    }
}
