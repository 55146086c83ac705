//! Socket calls std does not offer, for sockets whose every step a test
//! decides: bind without listen (no state transition yet), a backlog of
//! its own, a chosen source address or a port chosen at connect time, a
//! connect that fails with a known local port, a nonblocking connect left
//! half-open, and socket options.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `addr` as a sockaddr: (family, storage, length).
pub fn sockaddr(addr: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            (
                libc::AF_INET,
                storage,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (
                libc::AF_INET6,
                storage,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A TCP socket of `addr`'s family; `flags` are added to SOCK_STREAM |
/// SOCK_CLOEXEC (e.g. SOCK_NONBLOCK).
pub fn socket(addr: SocketAddr, flags: libc::c_int) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd =
        check(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags, 0) })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn setsockopt<T>(fd: &impl AsRawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T of the given size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// SO_LINGER {on, 0}: close() then sends a RST.
pub fn linger_zero(fd: &impl AsRawFd) -> io::Result<()> {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &lg)
}

pub fn local_port(fd: &impl AsRawFd) -> io::Result<u16> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len describe a writable sockaddr_storage.
    check(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            &mut storage as *mut _ as *mut libc::sockaddr,
            &mut len,
        )
    })?;
    // The port sits at the same offset in sockaddr_in and sockaddr_in6.
    // SAFETY: getsockname filled at least the family and port.
    let sin = unsafe { &*(&storage as *const _ as *const libc::sockaddr_in) };
    Ok(u16::from_be(sin.sin_port))
}

pub fn bind(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    let (_, storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of len bytes.
    check(unsafe { libc::bind(fd.as_raw_fd(), &storage as *const _ as *const _, len) }).map(drop)
}

/// listen(2) on a bound socket.
pub fn listen_on(fd: OwnedFd, backlog: i32) -> io::Result<TcpListener> {
    // SAFETY: listen on a descriptor we own.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(TcpListener::from(fd))
}

/// A listener on `addr` with SO_REUSEADDR and a backlog of our choosing
/// (std's is fixed).
pub fn listen(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let fd = socket(addr, 0)?;
    setsockopt(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        &1 as &libc::c_int,
    )?;
    bind(&fd, addr)?;
    listen_on(fd, backlog)
}

/// The wildcard address of `addr`'s family, port 0.
pub fn any_of(addr: SocketAddr) -> SocketAddr {
    let ip = if addr.is_ipv4() {
        IpAddr::from(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::from(Ipv6Addr::UNSPECIFIED)
    };
    SocketAddr::new(ip, 0)
}

/// connect(2) of a bound socket; `Ok(false)` for a nonblocking connect
/// still in progress.
pub fn connect_fd(fd: &OwnedFd, to: SocketAddr) -> io::Result<bool> {
    let (_, storage, len) = sockaddr(to);
    // SAFETY: storage holds a valid sockaddr of len bytes.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), &storage as *const _ as *const _, len) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// connect() from `src`; with `port_at_connect` the port in `src` must be
/// 0 and is chosen at connect time by 4-tuple (IP_BIND_ADDRESS_NO_PORT),
/// so ports are shared across destinations rather than used up by bind.
pub fn connect_from(
    src: SocketAddr,
    dst: SocketAddr,
    port_at_connect: bool,
) -> io::Result<TcpStream> {
    let fd = socket(dst, 0)?;
    if port_at_connect {
        setsockopt(
            &fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &1 as &libc::c_int,
        )?;
    }
    bind(&fd, src)?;
    connect_fd(&fd, dst)?;
    Ok(TcpStream::from(fd))
}
