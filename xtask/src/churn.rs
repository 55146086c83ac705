//! The connection-churn generator `cargo xtask bench` measures with: client
//! threads that each, in a loop, open a socket, bind it to a loopback
//! address `127.0.X.Y` (port 0), connect to the server, write 16 bytes and
//! close it, as fast as they can or paced to a fixed rate; and a
//! server in the same process whose accept threads read each accepted
//! connection to EOF and close it. The client closes first, so its side
//! goes through TIME_WAIT (or overflows `tcp_max_tw_buckets`, which is
//! fine and realistic). Cycling the source address over 65,024 addresses
//! means the ephemeral ports never run out.

use std::{
    io::{self, Read, Write},
    mem,
    net::{Ipv4Addr, TcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};

/// Source addresses cycle over 127.0.X.Y with X in 0..=255, Y in 1..=254.
const SOURCE_ADDRESSES: u32 = 256 * 254;
/// How long an accepted connection may stay silent before the server gives
/// up on it (it never should: the client closes at once).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Accept queue length; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 4096;
/// What each client writes before closing: a request's worth, so the
/// connection carries data both ways of the socket API (send, receive).
const PAYLOAD: &[u8; 16] = b"tcpwatch churn\r\n";
/// A paced client that falls further behind than this gives up on the
/// missed slots instead of bursting to catch up.
const MAX_LAG: Duration = Duration::from_millis(50);

/// What one churn run achieved.
#[derive(Clone, Debug, Default)]
pub struct ChurnResult {
    /// Connections that completed connect() and were closed.
    pub connections: u64,
    /// Failed socket/bind/connect calls.
    pub errors: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// Wall-clock length of the run.
    pub seconds: f64,
}

impl ChurnResult {
    pub fn per_second(&self) -> f64 {
        self.connections as f64 / self.seconds.max(1e-9)
    }
}

/// The accepting side: a loopback listener and its accept threads, which
/// run until the server is dropped.
pub struct Server {
    listener: Arc<TcpListener>,
    port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Listens on 127.0.0.1 (an ephemeral port) with `threads` accept loops.
    pub fn start(threads: u32) -> Result<Server> {
        let listener = Arc::new(listen_loopback().context("cannot start the churn server")?);
        let port = listener
            .local_addr()
            .context("cannot read the churn server's address")?
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for i in 0..threads {
            let listener = Arc::clone(&listener);
            let stop = Arc::clone(&stop);
            let handle = thread::Builder::new()
                .name(format!("churn-accept-{i}"))
                .spawn(move || accept_loop(&listener, &stop))
                .context("cannot start an accept thread")?;
            handles.push(handle);
        }
        Ok(Server {
            listener,
            port,
            stop,
            threads: handles,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `clients` client threads against this server for `duration`,
    /// or until `interrupted` is set: as fast as they can, or together at
    /// `rate` connections per second.
    pub fn churn(
        &self,
        clients: u32,
        duration: Duration,
        rate: Option<u32>,
        interrupted: &'static AtomicBool,
    ) -> Result<ChurnResult> {
        let start = Instant::now();
        let deadline = start + duration;
        let port = self.port;
        let mut handles = Vec::new();
        // Each client makes its share of the rate, one connection per slot.
        let slot = rate.map(|r| Duration::from_secs_f64(f64::from(clients) / f64::from(r.max(1))));
        for i in 0..clients {
            let pace = Pace {
                start,
                slot,
                deadline,
            };
            let handle = thread::Builder::new()
                .name(format!("churn-client-{i}"))
                .spawn(move || client_loop(i, clients, port, pace, interrupted))
                .context("cannot start a client thread")?;
            handles.push(handle);
        }
        let mut total = ChurnResult::default();
        for handle in handles {
            let r = handle
                .join()
                .map_err(|_| anyhow!("a churn client thread panicked"))?;
            total.connections += r.connections;
            total.errors += r.errors;
            if total.first_error.is_none() {
                total.first_error = r.first_error;
            }
        }
        total.seconds = start.elapsed().as_secs_f64();
        Ok(total)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Shutting a listening socket down wakes the threads blocked in
        // accept(2) (it then fails with EINVAL), and they see `stop`.
        // SAFETY: the descriptor belongs to `self.listener`, still open.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A TCP listener on 127.0.0.1 with SO_REUSEADDR and a long accept queue
/// (std's `TcpListener::bind` uses a backlog of 128).
fn listen_loopback() -> io::Result<TcpListener> {
    let fd = socket()?;
    set_reuseaddr(fd.as_raw_fd())?;
    bind(fd.as_raw_fd(), Ipv4Addr::LOCALHOST, 0)?;
    // SAFETY: listen(2) on a socket this function owns.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool) {
    let mut buf = [0u8; 256];
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
                // Read to EOF (the client's FIN), then close.
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
            }
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e) => {
                // Out of descriptors or memory for a moment: back off.
                if let Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) =
                    e.raw_os_error()
                {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

/// Per-thread result of [`client_loop`].
struct ClientResult {
    connections: u64,
    errors: u64,
    first_error: Option<String>,
}

/// The source address for the `n`th connection: 127.0.X.Y, Y never 0 or 255.
pub fn source_address(n: u32) -> Ipv4Addr {
    let n = n % SOURCE_ADDRESSES;
    Ipv4Addr::new(127, 0, (n / 254) as u8, (n % 254 + 1) as u8)
}

/// When one client thread runs: until `deadline`, one connection every
/// `slot` from `start` (or back to back when `slot` is `None`).
#[derive(Clone, Copy)]
struct Pace {
    start: Instant,
    slot: Option<Duration>,
    deadline: Instant,
}

impl Pace {
    /// Waits for the next slot; `false` once the deadline has passed.
    fn wait(&self, next: &mut Instant) -> bool {
        let Some(slot) = self.slot else {
            return Instant::now() < self.deadline;
        };
        let now = Instant::now();
        if *next > now {
            thread::sleep(*next - now);
        } else if now - *next > MAX_LAG {
            *next = now;
        }
        *next += slot;
        Instant::now() < self.deadline
    }
}

fn client_loop(
    index: u32,
    clients: u32,
    port: u16,
    pace: Pace,
    interrupted: &AtomicBool,
) -> ClientResult {
    let mut r = ClientResult {
        connections: 0,
        errors: 0,
        first_error: None,
    };
    // Each thread walks its own interleaved share of the addresses, and
    // paced threads start their slots staggered over one slot.
    let mut n = index;
    let mut next = pace.start
        + pace
            .slot
            .map_or(Duration::ZERO, |s| s * index / clients.max(1));
    while pace.wait(&mut next) && !interrupted.load(Ordering::Relaxed) {
        let source = source_address(n);
        n = n.wrapping_add(clients) % SOURCE_ADDRESSES;
        match connect_once(source, port) {
            Ok(()) => r.connections += 1,
            Err((step, e)) => {
                r.errors += 1;
                if r.first_error.is_none() {
                    r.first_error = Some(format!("{step} from {source}: {e}"));
                }
                if e.raw_os_error() == Some(libc::EMFILE) {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    r
}

/// socket, SO_REUSEADDR, bind to `source`:0, connect to 127.0.0.1:`port`,
/// write [`PAYLOAD`]; the socket closes when dropped, before the server's
/// side.
fn connect_once(source: Ipv4Addr, port: u16) -> Result<(), (&'static str, io::Error)> {
    let fd = socket().map_err(|e| ("socket", e))?;
    set_reuseaddr(fd.as_raw_fd()).map_err(|e| ("setsockopt", e))?;
    bind(fd.as_raw_fd(), source, 0).map_err(|e| ("bind", e))?;
    let addr = sockaddr(Ipv4Addr::LOCALHOST, port);
    loop {
        // SAFETY: `addr` is a valid sockaddr_in of the size passed.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_in).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            let mut stream = std::net::TcpStream::from(fd);
            return stream.write_all(PAYLOAD).map_err(|e| ("write", e));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(("connect", e));
        }
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_reuseaddr(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the option value is a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn bind(fd: RawFd, ip: Ipv4Addr, port: u16) -> io::Result<()> {
    let addr = sockaddr(ip, port);
    // SAFETY: `addr` is a valid sockaddr_in of the size passed.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_cycle_within_127_0() {
        assert_eq!(source_address(0), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_address(253), Ipv4Addr::new(127, 0, 0, 254));
        assert_eq!(source_address(254), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(
            source_address(SOURCE_ADDRESSES - 1),
            Ipv4Addr::new(127, 0, 255, 254)
        );
        assert_eq!(source_address(SOURCE_ADDRESSES), source_address(0));
    }

    #[test]
    fn churn_completes_connections() {
        static NEVER: AtomicBool = AtomicBool::new(false);
        let server = Server::start(1).unwrap();
        let r = server
            .churn(1, Duration::from_millis(200), None, &NEVER)
            .unwrap();
        assert!(r.connections > 10, "{r:?}");
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.per_second() > 0.0);
        drop(server);
    }

    #[test]
    fn paced_churn_keeps_its_rate() {
        static NEVER: AtomicBool = AtomicBool::new(false);
        let server = Server::start(1).unwrap();
        let r = server
            .churn(2, Duration::from_millis(500), Some(1000), &NEVER)
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        // 1000/s for 0.5 s: 500 slots, a few lost to sleep overshoot.
        assert!((400..=502).contains(&r.connections), "{r:?}");
        drop(server);
    }
}
