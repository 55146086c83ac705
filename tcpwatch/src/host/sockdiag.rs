//! The host's TCP timewait sockets, listed by the kernel through sock_diag
//! netlink, as `ss -tan state time-wait` does.
//!
//! One `SOCK_DIAG_BY_FAMILY` dump request (`inet_diag_req_v2`) per address
//! family asks for TCP sockets in TIME_WAIT or FIN_WAIT2. The kernel reports
//! a timewait mini-socket with its *substate* as the state: TIME_WAIT, or
//! FIN_WAIT2 for an orphaned socket whose peer has not sent its FIN yet
//! (`tcp_fin_timeout`). Full FIN_WAIT2 sockets match the same request, so
//! only entries with the timewait timer (`idiag_timer == 3`) and no inode
//! are kept, the marks `inet_twsk_diag_fill` puts on a timewait socket.
//!
//! The request is built and the netlink framing and socket ids are parsed
//! with the rust-netlink crates. The `idiag_expires` field is read from the
//! raw message: `netlink-packet-sock-diag` 0.5 drops it for the timewait
//! timer.
//!
//! sock_diag reports the network namespace of the calling thread.
//!
//! Addresses are kept as the kernel gives them: a dual-stack IPv6 socket's
//! IPv4 peer stays an IPv4-mapped IPv6 address, as in [`crate::host::procfs`].

use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, TCP_FIN_WAIT2, TCP_TIME_WAIT,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags, Timer,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

use crate::model::{Endpoint, TcpState};

/// The user-space receive buffer. The kernel fills each dump message to at
/// most about 32 KiB, so this never truncates one.
const RECV_BUF_LEN: usize = 1 << 20;

/// How long one `recv` may wait for the kernel before we give up.
const RECV_TIMEOUT_S: libc::time_t = 10;

/// `sizeof(struct inet_diag_msg)`.
const INET_DIAG_MSG_LEN: usize = 72;

/// Offset of `idiag_expires` in `struct inet_diag_msg`: after family, state,
/// timer and retrans (4 bytes) and the 48-byte `inet_diag_sockid`.
const EXPIRES_OFFSET: usize = 52;

/// Netlink messages are padded to 4 bytes (`NLMSG_ALIGN`).
const NLMSG_ALIGNTO: usize = 4;

/// A timewait socket as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimewaitSocket {
    pub local: Endpoint,
    pub remote: Endpoint,
    /// [`TcpState::TimeWait`], or [`TcpState::FinWait2`] for an orphaned
    /// socket still waiting for its peer's FIN.
    pub substate: TcpState,
    /// Milliseconds until the kernel destroys it.
    pub expires_ms: u32,
}

/// Errors listing the timewait sockets.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// The NETLINK_SOCK_DIAG socket could not be opened or set up.
    #[error("cannot open a sock_diag netlink socket: {0}")]
    Open(#[source] io::Error),
    /// Sending the dump request failed.
    #[error("cannot send the sock_diag dump request for {family}: {source}")]
    Send {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    /// Receiving the reply failed.
    #[error("cannot receive the sock_diag reply for {family}: {source}")]
    Recv {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel did not answer in time.
    #[error("the kernel did not answer the sock_diag dump for {family} within {RECV_TIMEOUT_S} s")]
    Timeout { family: &'static str },
    /// The kernel answered with an error (`NLMSG_ERROR`, or a negative
    /// status in `NLMSG_DONE`).
    #[error("the kernel refused the sock_diag dump for {family}: {source}")]
    Kernel {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    /// The reply could not be parsed.
    #[error("malformed sock_diag reply for {family}: {reason}")]
    Malformed {
        family: &'static str,
        reason: String,
    },
}

/// What one dump asks the kernel for, and what it keeps of each socket
/// listed (`None`: not one of those wanted).
struct Dump<T> {
    states: StateFlags,
    keep: fn(&[u8]) -> Result<Option<T>, ReplyError>,
}

/// Timewait sockets: TIME_WAIT or FIN_WAIT2 (the kernel matches a timewait
/// socket by its substate).
fn timewait_dump() -> Dump<TimewaitSocket> {
    Dump {
        states: StateFlags::TIME_WAIT | StateFlags::FIN_WAIT2,
        keep: parse_inet_diag_msg,
    }
}

/// Lists the timewait sockets of both address families in the calling
/// thread's network namespace. When the kernel has no IPv6 sock_diag
/// support, only the IPv4 ones.
pub fn dump_timewait() -> Result<Vec<TimewaitSocket>, SockDiagError> {
    dump(&timewait_dump())
}

/// Lists the full TCP sockets (every state but the timewait sockets') of
/// both address families in the calling thread's network namespace, as
/// (local, remote) endpoints. The kernel leaves the TIME_WAIT ones out
/// itself, so this costs little however many of those there are.
pub fn dump_full_sockets() -> Result<Vec<(Endpoint, Endpoint)>, SockDiagError> {
    dump(&Dump {
        states: StateFlags::all() - StateFlags::TIME_WAIT,
        keep: parse_full_socket,
    })
}

fn dump<T>(what: &Dump<T>) -> Result<Vec<T>, SockDiagError> {
    let socket = open()?;
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let mut out = Vec::new();
    dump_family(&socket, &mut buf, AF_INET, 1, what, &mut out)?;
    match dump_family(&socket, &mut buf, AF_INET6, 2, what, &mut out) {
        Err(SockDiagError::Kernel { source, .. }) if ipv6_unavailable(&source) => {}
        other => other?,
    }
    Ok(out)
}

/// Errors that mean "no IPv6 here" rather than a failed dump.
fn ipv6_unavailable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::ENOENT | libc::EPROTONOSUPPORT | libc::EOPNOTSUPP)
    )
}

fn open() -> Result<Socket, SockDiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(SockDiagError::Open)?;
    socket.bind_auto().map_err(SockDiagError::Open)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(SockDiagError::Open)?;
    // A kernel that never answers must not hang the caller.
    let timeout = libc::timeval {
        tv_sec: RECV_TIMEOUT_S,
        tv_usec: 0,
    };
    // SAFETY: the fd is open for the socket's lifetime and the option value
    // is a timeval of the length given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(SockDiagError::Open(io::Error::last_os_error()));
    }
    Ok(socket)
}

fn family_name(family: u8) -> &'static str {
    if family == AF_INET6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// The `SOCK_DIAG_BY_FAMILY` dump request for TCP sockets in `states`.
fn request(family: u8, seq: u32, states: StateFlags) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let socket_id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    message.finalize();
    // serialize() panics only on a buffer shorter than buffer_len().
    let mut bytes = vec![0u8; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// Sends one dump request and collects its reply until `NLMSG_DONE`.
fn dump_family<T>(
    socket: &Socket,
    buf: &mut [u8],
    family: u8,
    seq: u32,
    what: &Dump<T>,
    out: &mut Vec<T>,
) -> Result<(), SockDiagError> {
    let name = family_name(family);
    socket
        .send(&request(family, seq, what.states.clone()), 0)
        .map_err(|source| SockDiagError::Send {
            family: name,
            source,
        })?;
    loop {
        let len = recv(socket, buf, name)?;
        let data = buf.get(..len).unwrap_or(buf);
        match parse_reply(data, seq, what.keep, out) {
            Ok(Reply::More) => {}
            Ok(Reply::Done) => return Ok(()),
            Err(ReplyError::Kernel(errno)) => {
                return Err(SockDiagError::Kernel {
                    family: name,
                    source: io::Error::from_raw_os_error(errno),
                })
            }
            Err(ReplyError::Malformed(reason)) => {
                return Err(SockDiagError::Malformed {
                    family: name,
                    reason,
                })
            }
        }
    }
}

/// One datagram from the kernel; returns its length.
fn recv(socket: &Socket, buf: &mut [u8], family: &'static str) -> Result<usize, SockDiagError> {
    loop {
        let mut space: &mut [u8] = &mut *buf;
        match socket.recv(&mut space, 0) {
            Ok(0) => {
                return Err(SockDiagError::Malformed {
                    family,
                    reason: "empty datagram".into(),
                })
            }
            Ok(n) if n > buf.len() => {
                return Err(SockDiagError::Malformed {
                    family,
                    reason: format!("datagram of {n} bytes truncated to {}", buf.len()),
                })
            }
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(SockDiagError::Timeout { family })
            }
            Err(source) => return Err(SockDiagError::Recv { family, source }),
        }
    }
}

/// Whether a dump goes on after one datagram.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    More,
    Done,
}

#[derive(Debug, PartialEq, Eq)]
enum ReplyError {
    /// A positive errno.
    Kernel(i32),
    Malformed(String),
}

/// Parses one datagram of a dump reply with sequence number `seq`, adding
/// what `keep` keeps of the sockets it lists to `out`. Messages of other
/// sequence numbers and of unknown types are skipped.
fn parse_reply<T>(
    mut data: &[u8],
    seq: u32,
    keep: fn(&[u8]) -> Result<Option<T>, ReplyError>,
    out: &mut Vec<T>,
) -> Result<Reply, ReplyError> {
    while !data.is_empty() {
        // new_checked guarantees 16 <= length <= data.len(), so the
        // accessors below cannot panic.
        let msg = NetlinkBuffer::new_checked(data)
            .map_err(|e| ReplyError::Malformed(format!("bad netlink header: {e}")))?;
        let len = msg.length() as usize;
        let payload = msg.payload();
        if msg.sequence_number() == seq {
            match msg.message_type() {
                NLMSG_NOOP => {}
                NLMSG_DONE => {
                    // A dump's NLMSG_DONE carries its status, negative on
                    // failure; an empty payload is allowed.
                    let status = payload
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map(i32::from_ne_bytes)
                        .unwrap_or(0);
                    if status < 0 {
                        return Err(ReplyError::Kernel(status.saturating_neg()));
                    }
                    return Ok(Reply::Done);
                }
                NLMSG_ERROR => {
                    let err = ErrorBuffer::new_checked(payload)
                        .map_err(|e| ReplyError::Malformed(format!("bad NLMSG_ERROR: {e}")))?;
                    // Code 0 is an acknowledgement, not an error.
                    if let Some(code) = err.code() {
                        return Err(ReplyError::Kernel(code.get().saturating_abs()));
                    }
                }
                NLMSG_OVERRUN => {
                    return Err(ReplyError::Malformed("NLMSG_OVERRUN: data lost".into()))
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(socket) = keep(payload)? {
                        out.push(socket);
                    }
                }
                _ => {}
            }
        }
        let step = len.next_multiple_of(NLMSG_ALIGNTO);
        data = data.get(step..).unwrap_or_default();
    }
    Ok(Reply::More)
}

/// The header of one `struct inet_diag_msg`; `None` for an address family
/// we do not know.
fn inet_header(payload: &[u8]) -> Result<Option<InetResponseHeader>, ReplyError> {
    if payload.len() < INET_DIAG_MSG_LEN {
        return Err(ReplyError::Malformed(format!(
            "inet_diag_msg of {} bytes, expected at least {INET_DIAG_MSG_LEN}",
            payload.len()
        )));
    }
    if !matches!(payload.first(), Some(&AF_INET | &AF_INET6)) {
        return Ok(None);
    }
    InetResponseHeader::parse(payload)
        .map(Some)
        .map_err(|e| ReplyError::Malformed(format!("bad inet_diag_msg: {e}")))
}

/// A full socket (even an orphaned one) has another timer; timewait
/// sockets have no inode.
fn is_timewait(header: &InetResponseHeader) -> bool {
    header.timer == Some(Timer::TimeWait) && header.inode == 0
}

/// One `struct inet_diag_msg` of a full socket: its (local, remote)
/// endpoints; `None` for a timewait socket.
fn parse_full_socket(payload: &[u8]) -> Result<Option<(Endpoint, Endpoint)>, ReplyError> {
    let Some(header) = inet_header(payload)? else {
        return Ok(None);
    };
    if is_timewait(&header) {
        return Ok(None);
    }
    let id = &header.socket_id;
    Ok(Some((
        Endpoint::new(id.source_address, id.source_port),
        Endpoint::new(id.destination_address, id.destination_port),
    )))
}

/// One `struct inet_diag_msg`: `Some` for a timewait socket, `None` for any
/// other socket or an address family we do not know.
fn parse_inet_diag_msg(payload: &[u8]) -> Result<Option<TimewaitSocket>, ReplyError> {
    let Some(header) = inet_header(payload)? else {
        return Ok(None);
    };
    if !is_timewait(&header) {
        return Ok(None);
    }
    let substate = match header.state {
        TCP_TIME_WAIT => TcpState::TimeWait,
        TCP_FIN_WAIT2 => TcpState::FinWait2,
        _ => return Ok(None),
    };
    let expires_ms = payload
        .get(EXPIRES_OFFSET..EXPIRES_OFFSET + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .unwrap_or(0);
    let id = &header.socket_id;
    Ok(Some(TimewaitSocket {
        local: Endpoint::new(id.source_address, id.source_port),
        remote: Endpoint::new(id.destination_address, id.destination_port),
        substate,
        expires_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::fs::{self, File};
    use std::io::Read;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, TcpListener, TcpStream};
    use std::os::fd::FromRawFd;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use crate::host::kernelstat::{KernelFigures, Sysctls};

    // -----------------------------------------------------------------
    // Parsing synthetic replies

    const SEQ: u32 = 7;

    fn nlmsg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut v = Vec::with_capacity(len + 3);
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&4242u32.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    struct Diag {
        family: u8,
        state: u8,
        timer: u8,
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
        expires: u32,
        inode: u32,
    }

    fn tw_v4(sport: u16, expires: u32) -> Diag {
        Diag {
            family: AF_INET,
            state: TCP_TIME_WAIT,
            timer: 3,
            src: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            dst: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            sport,
            dport: 8080,
            expires,
            inode: 0,
        }
    }

    fn diag_payload(d: &Diag) -> Vec<u8> {
        let mut v = vec![d.family, d.state, d.timer, 0];
        v.extend_from_slice(&d.sport.to_be_bytes());
        v.extend_from_slice(&d.dport.to_be_bytes());
        for a in [d.src, d.dst] {
            let mut raw = [0u8; 16];
            match a {
                IpAddr::V4(a) => raw[..4].copy_from_slice(&a.octets()),
                IpAddr::V6(a) => raw.copy_from_slice(&a.octets()),
            }
            v.extend_from_slice(&raw);
        }
        v.extend_from_slice(&0u32.to_ne_bytes()); // if
        v.extend_from_slice(&[0xab; 8]); // cookie
        v.extend_from_slice(&d.expires.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes()); // rqueue
        v.extend_from_slice(&0u32.to_ne_bytes()); // wqueue
        v.extend_from_slice(&0u32.to_ne_bytes()); // uid
        v.extend_from_slice(&d.inode.to_ne_bytes());
        assert_eq!(v.len(), INET_DIAG_MSG_LEN);
        v
    }

    fn diag(d: &Diag) -> Vec<u8> {
        let mut payload = diag_payload(d);
        // INET_DIAG_MARK, as a privileged caller gets for timewait sockets.
        payload.extend_from_slice(&8u16.to_ne_bytes());
        payload.extend_from_slice(&15u16.to_ne_bytes());
        payload.extend_from_slice(&0u32.to_ne_bytes());
        nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &payload)
    }

    fn done(status: i32) -> Vec<u8> {
        nlmsg(NLMSG_DONE, SEQ, &status.to_ne_bytes())
    }

    fn error(code: i32) -> Vec<u8> {
        let mut payload = code.to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0u8; 16]); // the request's header
        nlmsg(NLMSG_ERROR, SEQ, &payload)
    }

    fn parse(data: &[u8]) -> (Result<Reply, ReplyError>, Vec<TimewaitSocket>) {
        let mut out = Vec::new();
        let r = parse_reply(data, SEQ, parse_inet_diag_msg, &mut out);
        (r, out)
    }

    #[test]
    fn parses_timewait_sockets_and_done() {
        let mut data = diag(&tw_v4(40000, 59_000));
        let v6 = Diag {
            family: AF_INET6,
            src: IpAddr::V6(Ipv6Addr::LOCALHOST),
            dst: IpAddr::V6("::ffff:10.1.2.3".parse().unwrap()),
            state: TCP_FIN_WAIT2,
            ..tw_v4(40001, 2500)
        };
        data.extend(diag(&v6));
        let (r, out) = parse(&data);
        assert_eq!(r, Ok(Reply::More));
        assert_eq!(
            out,
            vec![
                TimewaitSocket {
                    local: Endpoint::new("127.0.0.2".parse().unwrap(), 40000),
                    remote: Endpoint::new("127.0.0.1".parse().unwrap(), 8080),
                    substate: TcpState::TimeWait,
                    expires_ms: 59_000,
                },
                TimewaitSocket {
                    local: Endpoint::new("::1".parse().unwrap(), 40001),
                    // A mapped peer stays as the kernel reports it.
                    remote: Endpoint::new("::ffff:10.1.2.3".parse().unwrap(), 8080),
                    substate: TcpState::FinWait2,
                    expires_ms: 2500,
                },
            ]
        );
        data.extend(done(0));
        let (r, out) = parse(&data);
        assert_eq!(r, Ok(Reply::Done));
        assert_eq!(out.len(), 2);
        // The kernel may also send an NLMSG_DONE with an empty payload.
        assert_eq!(parse(&nlmsg(NLMSG_DONE, SEQ, &[])).0, Ok(Reply::Done));
    }

    #[test]
    fn keeps_only_timewait_mini_sockets() {
        // A full FIN_WAIT2 socket: keepalive timer, an inode.
        let full = Diag {
            state: TCP_FIN_WAIT2,
            timer: 2,
            inode: 123456,
            ..tw_v4(1, 1000)
        };
        // An orphaned full FIN_WAIT2 socket: no inode, but not timer 3.
        let orphan = Diag {
            state: TCP_FIN_WAIT2,
            timer: 2,
            inode: 0,
            ..tw_v4(2, 1000)
        };
        // Never seen from the kernel, but not a timewait socket either.
        let odd = Diag {
            inode: 99,
            ..tw_v4(3, 1000)
        };
        let other_state = Diag {
            state: 1,
            ..tw_v4(4, 1000)
        };
        let unknown_family = Diag {
            family: 44, // AF_XDP
            ..tw_v4(5, 1000)
        };
        let mut data = Vec::new();
        for d in [full, orphan, odd, other_state, unknown_family] {
            data.extend(diag(&d));
        }
        data.extend(diag(&tw_v4(6, 1000)));
        let (r, out) = parse(&data);
        assert_eq!(r, Ok(Reply::More));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].local.port, 6);
    }

    #[test]
    fn kernel_errors_become_errnos() {
        let (r, _) = parse(&error(-libc::EAFNOSUPPORT));
        assert_eq!(r, Err(ReplyError::Kernel(libc::EAFNOSUPPORT)));
        let (r, _) = parse(&done(-libc::ENOMEM));
        assert_eq!(r, Err(ReplyError::Kernel(libc::ENOMEM)));
        // An acknowledgement is not an error.
        let mut data = error(0);
        data.extend(done(0));
        assert_eq!(parse(&data).0, Ok(Reply::Done));
        // Extreme codes do not overflow.
        assert_eq!(parse(&error(i32::MIN)).0, Err(ReplyError::Kernel(i32::MAX)));
        assert_eq!(parse(&done(i32::MIN)).0, Err(ReplyError::Kernel(i32::MAX)));
        assert!(matches!(
            parse(&nlmsg(NLMSG_OVERRUN, SEQ, &[])).0,
            Err(ReplyError::Malformed(_))
        ));
        assert!(ipv6_unavailable(&io::Error::from_raw_os_error(
            libc::EAFNOSUPPORT
        )));
        assert!(!ipv6_unavailable(&io::Error::from_raw_os_error(
            libc::ENOMEM
        )));
    }

    #[test]
    fn skips_unknown_types_and_other_sequences() {
        let mut data = nlmsg(0x1234, SEQ, &[1, 2, 3]); // padded to 4
        data.extend(nlmsg(NLMSG_NOOP, SEQ, &[]));
        let mut stray = diag(&tw_v4(9, 1));
        stray[8..12].copy_from_slice(&(SEQ + 1).to_ne_bytes());
        data.extend(stray);
        data.extend(nlmsg(NLMSG_DONE, SEQ + 1, &0i32.to_ne_bytes()));
        data.extend(diag(&tw_v4(10, 1)));
        let (r, out) = parse(&data);
        assert_eq!(r, Ok(Reply::More));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].local.port, 10);
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        // Length field shorter than a header, longer than the datagram.
        let mut short = done(0);
        short[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(matches!(parse(&short).0, Err(ReplyError::Malformed(_))));
        let mut long = done(0);
        long[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(parse(&long).0, Err(ReplyError::Malformed(_))));
        // A sock_diag message too short for an inet_diag_msg.
        let cut = nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &diag_payload(&tw_v4(1, 1))[..40]);
        assert!(matches!(parse(&cut).0, Err(ReplyError::Malformed(_))));
        // An NLMSG_ERROR too short for its code.
        let cut = nlmsg(NLMSG_ERROR, SEQ, &[0xff, 0xff]);
        assert!(matches!(parse(&cut).0, Err(ReplyError::Malformed(_))));
    }

    #[test]
    fn every_truncation_and_corruption_is_handled() {
        let mut data = diag(&tw_v4(1, 100));
        data.extend(error(0));
        data.extend(diag(&tw_v4(2, 200)));
        data.extend(nlmsg(77, SEQ, &[9; 5]));
        data.extend(done(0));
        for end in 0..=data.len() {
            let _ = parse(&data[..end]);
        }
        // Flip every byte through a few values, and feed pseudo-random noise.
        for i in 0..data.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut bad = data.clone();
                bad[i] = v;
                let _ = parse(&bad);
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let len = (x % 300) as usize;
            let noise: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = parse(&noise);
        }
    }

    #[test]
    fn full_sockets_leave_timewait_sockets_out() {
        // A timewait socket, an orphaned FIN_WAIT2 full socket (timer 1, no
        // inode) and an established one.
        let orphan = Diag {
            state: TCP_FIN_WAIT2,
            timer: 1,
            ..tw_v4(40001, 0)
        };
        let established = Diag {
            state: 1,
            timer: 0,
            inode: 77,
            ..tw_v4(40002, 0)
        };
        let mut data = diag(&tw_v4(40000, 59_000));
        data.extend(diag(&orphan));
        data.extend(diag(&established));
        data.extend(done(0));
        let mut out = Vec::new();
        assert_eq!(
            parse_reply(&data, SEQ, parse_full_socket, &mut out),
            Ok(Reply::Done)
        );
        let ports: Vec<(u16, u16)> = out.iter().map(|(l, r)| (l.port, r.port)).collect();
        assert_eq!(ports, [(40001, 8080), (40002, 8080)]);
    }

    #[test]
    fn request_is_an_inet_diag_req_v2_for_tcp_tw_and_fin_wait2() {
        let bytes = request(AF_INET6, 3, timewait_dump().states);
        // nlmsghdr (16) + inet_diag_req_v2 (56).
        assert_eq!(bytes.len(), 72);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 72);
        assert_eq!(
            u16::from_ne_bytes(bytes[4..6].try_into().unwrap()),
            SOCK_DIAG_BY_FAMILY
        );
        let flags = u16::from_ne_bytes(bytes[6..8].try_into().unwrap());
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 3);
        assert_eq!(&bytes[16..20], &[AF_INET6, IPPROTO_TCP, 0, 0]);
        let states = u32::from_ne_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!(states, (1 << 6) | (1 << 5));
    }

    // -----------------------------------------------------------------
    // Live tests in a network namespace of their own

    /// Under CI (or when asked) a test that cannot run must fail.
    fn strict() -> bool {
        std::env::var_os("CI").is_some()
            || std::env::var("TCPWATCH_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1")
    }

    fn skip(why: &str) {
        if strict() {
            panic!("cannot run (CI or TCPWATCH_REQUIRE_ROOT_TESTS=1 forbids skipping): {why}");
        }
        println!("skipped: {why}");
        eprintln!("skipped: {why}");
    }

    fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(cmd)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {cmd}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{cmd} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A network namespace, deleted on drop.
    struct Netns {
        name: String,
    }

    impl Netns {
        /// A fresh namespace with `lo` up, or `None` after saying why the
        /// test is skipped.
        fn create_or_skip(tag: &str) -> Option<Netns> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                skip("not root: creating a network namespace needs CAP_SYS_ADMIN");
                return None;
            }
            for tool in ["ip", "ss"] {
                if Command::new(tool).arg("-V").output().is_err() {
                    skip(&format!("`{tool}` (iproute2) is not on PATH"));
                    return None;
                }
            }
            let name = format!("tcpwatch-sd-{}-{tag}", std::process::id());
            if let Err(why) = run("ip", &["netns", "add", &name]) {
                skip(&why);
                return None;
            }
            let ns = Netns { name };
            if let Err(why) = run(
                "ip",
                &["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"],
            ) {
                skip(&why);
                return None;
            }
            Some(ns)
        }

        /// Runs `f` on a thread that has entered the namespace: its sockets,
        /// sock_diag dumps, `/proc/thread-self/net` and `/proc/sys/net` are
        /// the namespace's.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let path = format!("/var/run/netns/{}", self.name);
            let joined = std::thread::scope(|s| {
                s.spawn(|| {
                    let file = File::open(&path).unwrap();
                    // SAFETY: a valid namespace fd; only this thread moves.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
                    f()
                })
                .join()
            });
            match joined {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }

        /// Lines of `ss -tanH state STATE` run inside the namespace.
        fn ss(&self, state: &str) -> Vec<String> {
            run(
                "ip",
                &["netns", "exec", &self.name, "ss", "-tanH", "state", state],
            )
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn set_sysctl(name: &str, value: &str) {
        let path = format!("/proc/sys/net/ipv4/{name}");
        fs::write(&path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }

    /// Lines of `ss -tanH state …` (one state: no state column) whose peer
    /// is `peer`.
    fn ss_count(lines: &[String], peer: &str) -> usize {
        lines
            .iter()
            .filter(|l| l.split_whitespace().nth(3) == Some(peer))
            .count()
    }

    /// A TCP client bound to `src` (port chosen by the kernel) connected to
    /// `dst`.
    fn connect_from(src: Ipv4Addr, dst: std::net::SocketAddr) -> io::Result<TcpStream> {
        let std::net::SocketAddr::V4(dst) = dst else {
            panic!("IPv4 only");
        };
        let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket calls on an fd we own, with sockaddr_in
        // values of the length given.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let stream = TcpStream::from_raw_fd(fd);
            let local = sockaddr(src, 0);
            if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
                return Err(io::Error::last_os_error());
            }
            let remote = sockaddr(*dst.ip(), dst.port());
            if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(stream)
        }
    }

    /// Makes `k` client sockets to `listener` go to TIME_WAIT: the client
    /// closes first, the server reads EOF and closes. Clients are bound to
    /// `sources` in turn, `k / sources.len()` each. Returns their
    /// (local, remote) pairs.
    fn make_timewait(
        listener: &TcpListener,
        sources: &[Ipv4Addr],
        k: usize,
    ) -> Vec<(Endpoint, Endpoint)> {
        const BATCH: usize = 500; // well under RLIMIT_NOFILE
        let server = listener.local_addr().unwrap();
        let per_source = k.div_ceil(sources.len());
        let mut tuples = Vec::with_capacity(k);
        while tuples.len() < k {
            let batch = (k - tuples.len()).min(BATCH);
            let mut pairs = Vec::with_capacity(batch);
            for _ in 0..batch {
                let src = sources[tuples.len() / per_source];
                let client = connect_from(src, server)
                    .unwrap_or_else(|e| panic!("connect from {src} (#{}): {e}", tuples.len()));
                let (accepted, peer) = listener.accept().unwrap();
                let local = client.local_addr().unwrap();
                assert_eq!(peer, local);
                tuples.push((Endpoint::from(local), Endpoint::from(server)));
                pairs.push((client, accepted));
            }
            let servers: Vec<TcpStream> = pairs.into_iter().map(|(_client, s)| s).collect();
            for mut s in servers {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut byte = [0u8; 1];
                assert_eq!(s.read(&mut byte).unwrap(), 0, "expected EOF");
            }
        }
        tuples
    }

    fn timewait_round_trip(tag: &str, k: usize) {
        let Some(ns) = Netns::create_or_skip(tag) else {
            return;
        };
        ns.run(|| {
            // No reuse of a TIME_WAIT 4-tuple while the test runs, and room
            // for all of them.
            set_sysctl("tcp_tw_reuse", "0");
            // The server's delayed ACK of the client's FIN can race its own
            // FIN across the two CPUs' backlogs; the late ACK then fails
            // PAWS in the client's TIME_WAIT, which answers with an ACK, the
            // closed server answers that with a RST, and the RST kills the
            // timewait socket (RFC 1337 TIME-WAIT assassination). Observed
            // as a few missing sockets in about one run in two.
            set_sysctl("tcp_rfc1337", "1");
            let sysctls = Sysctls::read().unwrap();
            if sysctls.max_tw_buckets < 2 * k as u64 {
                set_sysctl("tcp_max_tw_buckets", &(2 * k).to_string());
            }
            // bind() takes ports from ip_local_port_range; keep each source
            // address well inside it.
            let per_source = (sysctls.port_range_size() as usize / 2).max(1);
            let n_sources = k.div_ceil(per_source);
            assert!(
                n_sources <= 250,
                "port range {:?} too small",
                sysctls.port_range
            );
            let sources: Vec<Ipv4Addr> = (0..n_sources)
                .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
                .collect();

            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let server = Endpoint::from(listener.local_addr().unwrap());
            let started = Instant::now();
            let tuples = make_timewait(&listener, &sources, k);
            println!(
                "created {k} TIME_WAIT sockets from {n_sources} source address(es) in {:?}",
                started.elapsed()
            );

            // The last FINs are processed as the server closes; allow for
            // a straggler all the same.
            let deadline = Instant::now() + Duration::from_secs(10);
            let (ours, took) = loop {
                let t = Instant::now();
                let dump = dump_timewait().unwrap();
                let took = t.elapsed();
                let ours: HashMap<(Endpoint, Endpoint), TimewaitSocket> = dump
                    .into_iter()
                    .filter(|s| s.remote == server)
                    .map(|s| ((s.local, s.remote), s))
                    .collect();
                let all_tw = tuples.iter().all(|t| {
                    ours.get(t)
                        .is_some_and(|s| s.substate == TcpState::TimeWait)
                });
                if all_tw || Instant::now() > deadline {
                    break (ours, took);
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            println!("dump_timewait: {} sockets in {took:?}", ours.len());
            let missing: Vec<_> = tuples.iter().filter(|t| !ours.contains_key(t)).collect();
            assert!(
                missing.is_empty(),
                "{} of {k} client sockets not in the dump (ss sees {} in TIME_WAIT), e.g. {:?}",
                missing.len(),
                ns.ss("time-wait").len(),
                &missing[..missing.len().min(5)]
            );
            for t in &tuples {
                let s = ours
                    .get(t)
                    .unwrap_or_else(|| panic!("{} -> {} not in the dump", t.0, t.1));
                assert_eq!(s.substate, TcpState::TimeWait, "{s:?}");
                assert!(s.expires_ms > 0 && s.expires_ms <= 60_000, "{s:?}");
            }
            assert_eq!(ours.len(), k, "extra timewait sockets to the server");

            // Time a few more dumps of the same set.
            let mut times: Vec<Duration> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    let n = dump_timewait().unwrap().len();
                    assert!(n >= k);
                    t.elapsed()
                })
                .collect();
            times.sort();
            println!(
                "dump_timewait of {k}: min {:?}, median {:?}, max {:?}",
                times[0], times[2], times[4]
            );

            // The independent tool agrees.
            let t = Instant::now();
            let lines = ns.ss("time-wait");
            println!(
                "ss -tanH state time-wait: {} lines in {:?}",
                lines.len(),
                t.elapsed()
            );
            assert_eq!(ss_count(&lines, &server.to_string()), ours.len());

            let figures = KernelFigures::read();
            let tw = figures.sockstat_tw.expect("sockstat has tw");
            assert!(tw >= k as u64, "sockstat tw {tw} < {k}");
            assert_eq!(figures.tw_overflow, Some(0), "{figures:?}");
        });
    }

    #[test]
    fn live_dump_finds_200_timewait_sockets() {
        timewait_round_trip("200", 200);
    }

    #[test]
    fn live_dump_finds_30000_timewait_sockets() {
        timewait_round_trip("30000", 30_000);
    }

    #[test]
    fn live_orphaned_fin_wait2_is_a_timewait_socket_until_fin_timeout() {
        let Some(ns) = Netns::create_or_skip("finwait2") else {
            return;
        };
        ns.run(|| {
            // Per-namespace: this thread's namespace only.
            set_sysctl("tcp_fin_timeout", "3");
            assert_eq!(Sysctls::read().unwrap().fin_timeout_s, 3);

            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let server_addr = listener.local_addr().unwrap();
            let server = Endpoint::from(server_addr);

            // Half-closed but still open: a full FIN_WAIT2 socket, which
            // the dump request matches and we must leave out.
            let half = TcpStream::connect(server_addr).unwrap();
            let (_half_server, _) = listener.accept().unwrap();
            half.shutdown(Shutdown::Write).unwrap();
            let half_local = Endpoint::from(half.local_addr().unwrap());

            // Closed by the client only: orphaned, the server's ACK turns
            // it into a FIN_WAIT2 timewait socket.
            let client = TcpStream::connect(server_addr).unwrap();
            let (_server_side, _) = listener.accept().unwrap();
            let local = Endpoint::from(client.local_addr().unwrap());
            drop(client);
            let closed = Instant::now();

            let find = |dump: &[TimewaitSocket], ep: Endpoint| {
                dump.iter()
                    .find(|s| s.local == ep && s.remote == server)
                    .copied()
            };
            let deadline = closed + Duration::from_secs(2);
            let tw = loop {
                let dump = dump_timewait().unwrap();
                assert!(find(&dump, half_local).is_none(), "full FIN_WAIT2 reported");
                if let Some(s) = find(&dump, local) {
                    break s;
                }
                assert!(Instant::now() < deadline, "{local} never appeared");
                std::thread::sleep(Duration::from_millis(20));
            };
            assert_eq!(tw.substate, TcpState::FinWait2, "{tw:?}");
            assert!(tw.expires_ms > 0 && tw.expires_ms <= 3000, "{tw:?}");

            // ss sees both in FIN-WAIT-2, so leaving `half` out was a
            // choice, not an accident.
            let lines = ns.ss("fin-wait-2");
            for ep in [half_local, local] {
                assert!(
                    lines
                        .iter()
                        .any(|l| l.split_whitespace().nth(2) == Some(&ep.to_string())),
                    "{ep} not in ss: {lines:?}"
                );
            }

            // Gone once tcp_fin_timeout has passed.
            std::thread::sleep(
                (closed + Duration::from_secs(4)).saturating_duration_since(Instant::now()),
            );
            let deadline = closed + Duration::from_secs(6);
            loop {
                let dump = dump_timewait().unwrap();
                if find(&dump, local).is_none() {
                    break;
                }
                assert!(Instant::now() < deadline, "{local} still there after 6 s");
                std::thread::sleep(Duration::from_millis(100));
            }
            println!(
                "FIN_WAIT2 timewait socket gone {:?} after close",
                closed.elapsed()
            );
            assert!(find(&dump_timewait().unwrap(), half_local).is_none());
        });
    }

    #[test]
    fn live_dump_outside_a_namespace_does_not_fail() {
        // The host's own sockets: any number, but the dump must work.
        if let Err(e) = dump_timewait() {
            panic!("{e}");
        }
    }
}
