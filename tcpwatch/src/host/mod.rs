//! Facts about the host every live command starts from: /proc (owners of
//! sockets older than the trace), sock_diag (the kernel's own socket
//! lists), the kernel's TIME_WAIT figures and sysctls, and the clock.
//! Each reader hands the pure `model` its plain data types.

pub mod cgroup;
pub mod clock;
pub mod kernelstat;
pub mod netns;
pub mod procfs;
pub mod sockdiag;

use crate::model::correlate::CorrelatorOptions;
use crate::model::sweep::{KernelSockets, ListError, Sweeper};

/// The inode of tcpwatch's own network namespace.
pub fn own_netns() -> Option<u32> {
    netns::own_inode()
}

/// Returns the heap's free pages to the kernel. glibc's malloc keeps
/// freed memory below the top of its heap resident, so the start-up's BTF
/// parse (tens of MB in small blocks) and each snapshot's scratch tables
/// (a sock_diag dump of every timewait socket) would otherwise stay in the
/// resident set for good, as holes between live blocks. Cheap next to what
/// it follows: a walk of the free lists and one `madvise` per free run.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases pages no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes glibc's malloc give large blocks (256 KiB and more: a sock_diag
/// dump of every timewait socket, a snapshot's tables) their own mapping,
/// returned to the kernel when freed. By default malloc raises that
/// threshold to the largest block freed so far (up to 32 MiB), after which
/// such blocks come from the heap and their pages stay resident: the
/// daemon's RSS would then follow its largest snapshot, not what it holds.
pub fn return_large_blocks_when_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's tunables.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

/// net.ipv4.tcp_fin_timeout of the calling thread's network namespace (60
/// when unreadable, the kernel's default).
pub fn fin_timeout_s() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(60)
}

pub fn correlator_options(max_sockets: usize, fin_timeout_s: u32) -> CorrelatorOptions {
    CorrelatorOptions {
        max_sockets,
        fin_timeout_ns: u64::from(fin_timeout_s) * 1_000_000_000,
        ..CorrelatorOptions::default()
    }
}

/// The full sockets the kernel has in the calling thread's network
/// namespace, for the sweep.
pub fn kernel_sockets() -> Result<KernelSockets, ListError> {
    let sockets = sockdiag::dump_full_sockets().map_err(|e| ListError(Box::new(e)))?;
    Ok(KernelSockets::from_endpoints(
        sockets.into_iter().map(|s| (s.local, s.remote)),
    ))
}

/// A sweeper of the network namespace `ns`: it lists the sockets there
/// through sock_diag (from inside it) and reads CLOCK_MONOTONIC, the
/// events' clock.
pub fn sweeper(ns: netns::Namespace) -> Sweeper {
    Sweeper::with(
        move || {
            ns.run_in(kernel_sockets)
                .map_err(|e| ListError(Box::new(e)))?
        },
        clock::monotonic_ns,
    )
}
