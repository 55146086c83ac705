//! The host's TCP sockets, listed by the kernel through sock_diag netlink
//! as `ss -tan` does: the timewait sockets (`ss -tan state time-wait`), and
//! the full sockets with their state and inode (for the owners of sockets
//! older than the trace, and for the sweep of sockets whose close was lost).
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
//! [`ExactLookup`] asks about given 4-tuples instead, one request each (no
//! dump), sent in batches: what became of a socket handed to a FIN_WAIT2
//! timewait socket (see `model::handoff`).
//!
//! sock_diag reports the network namespace of the calling thread.
//!
//! Addresses are kept as the kernel gives them: a dual-stack IPv6 socket's
//! IPv4 peer stays an IPv4-mapped IPv6 address, as the tracepoint reports it.

use std::collections::hash_map::{Entry, HashMap};
use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use netlink_packet_core::{
    DecodeError, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable, NLMSG_DONE,
    NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, TCP_FIN_WAIT2, TCP_LISTEN, TCP_TIME_WAIT,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags, Timer,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

use crate::host::netns::{Namespace, NetnsError, Selection};
use crate::model::correlate::TimewaitSubstate;
use crate::model::handoff::TimewaitLookup;
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

/// Errors listing the sockets.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// The NETLINK_SOCK_DIAG socket could not be opened or set up.
    #[error("cannot open a sock_diag netlink socket")]
    Open(#[source] io::Error),
    /// Sending the dump request failed.
    #[error("cannot send the sock_diag dump request for {family}")]
    Send {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    /// Receiving the reply failed.
    #[error("cannot receive the sock_diag reply for {family}")]
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
    #[error("the kernel refused the sock_diag dump for {family}")]
    Kernel {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    /// The reply could not be parsed.
    #[error("malformed sock_diag reply for {family}")]
    Malformed {
        family: &'static str,
        #[source]
        source: Malformed,
    },
    /// The network namespace to ask could not be entered.
    #[error(transparent)]
    Netns(#[from] crate::host::netns::NetnsError),
}

/// What was wrong with a reply.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    #[error("empty datagram")]
    Empty,
    #[error("datagram of {len} bytes truncated to {buf}")]
    Truncated { len: usize, buf: usize },
    #[error("bad netlink header")]
    Header(#[source] DecodeError),
    #[error("bad NLMSG_ERROR")]
    ErrorMessage(#[source] DecodeError),
    #[error("NLMSG_OVERRUN: data lost")]
    Overrun,
    #[error("inet_diag_msg of {len} bytes, expected at least {INET_DIAG_MSG_LEN}")]
    ShortDiagMsg { len: usize },
    #[error("bad inet_diag_msg")]
    DiagMsg(#[source] DecodeError),
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
    let mut out = Vec::new();
    each_timewait(|s| out.push(s))?;
    Ok(out)
}

/// [`dump_timewait`] without the list: each socket is handed to `each` as
/// its reply datagram is parsed, so a list of 131,072 sockets costs one
/// datagram's buffer, not a vector of them all. Returns how many were
/// handed over. On an error the sockets handed over so far are only a part
/// of the list.
pub fn each_timewait(mut each: impl FnMut(TimewaitSocket)) -> Result<u64, SockDiagError> {
    let mut n = 0u64;
    dump(&timewait_dump(), &mut |s| {
        n += 1;
        each(s)
    })?;
    Ok(n)
}

/// A full TCP socket as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FullSocket {
    pub local: Endpoint,
    pub remote: Endpoint,
    pub state: TcpState,
    /// The socket's inode, what `/proc/PID/fd/N` links to as
    /// `socket:[INODE]`; 0 for a socket no file refers to (an orphan, or a
    /// connection not yet accepted).
    pub inode: u32,
}

/// Lists the full TCP sockets (every state but the timewait sockets') of
/// both address families in the calling thread's network namespace. The
/// kernel leaves the TIME_WAIT ones out itself, so this costs little
/// however many of those there are.
pub fn dump_full_sockets() -> Result<Vec<FullSocket>, SockDiagError> {
    let mut out = Vec::new();
    dump(
        &Dump {
            states: StateFlags::all() - StateFlags::TIME_WAIT,
            keep: parse_full_socket,
        },
        &mut |s| out.push(s),
    )?;
    Ok(out)
}

/// Both families' dumps, what `keep` keeps of each socket handed to `each` as it
/// is parsed.
fn dump<T>(what: &Dump<T>, each: &mut impl FnMut(T)) -> Result<(), SockDiagError> {
    let socket = open()?;
    // Only the pages the kernel writes become resident: a dump datagram is
    // at most 32 KiB (netlink's cap on a dump's message).
    let mut buf = vec![0u8; RECV_BUF_LEN];
    dump_family(&socket, &mut buf, AF_INET, 1, what, each)?;
    match dump_family(&socket, &mut buf, AF_INET6, 2, what, each) {
        Err(SockDiagError::Kernel { source, .. }) if ipv6_unavailable(&source) => Ok(()),
        other => other,
    }
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
    let socket_id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    encode_request(family, seq, NLM_F_REQUEST | NLM_F_DUMP, states, socket_id)
}

/// The request for the one TCP socket with this 4-tuple (in any state:
/// the kernel looks it up as an arriving segment would, timewait sockets
/// included).
fn exact_request(seq: u32, local: &Endpoint, remote: &Endpoint) -> Vec<u8> {
    let family = if local.addr.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    };
    let socket_id = SocketId {
        source_port: local.port,
        destination_port: remote.port,
        source_address: local.addr,
        destination_address: remote.addr,
        interface_id: 0,
        // INET_DIAG_NOCOOKIE: any socket with the 4-tuple.
        cookie: [0xff; 8],
    };
    encode_request(family, seq, NLM_F_REQUEST, StateFlags::all(), socket_id)
}

fn encode_request(
    family: u8,
    seq: u32,
    flags: u16,
    states: StateFlags,
    socket_id: SocketId,
) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
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
    each: &mut impl FnMut(T),
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
        match parse_reply(data, seq, what.keep, each) {
            Ok(Reply::More) => {}
            Ok(Reply::Done) => return Ok(()),
            Err(ReplyError::Kernel(errno)) => {
                return Err(SockDiagError::Kernel {
                    family: name,
                    source: io::Error::from_raw_os_error(errno),
                })
            }
            Err(ReplyError::Malformed(source)) => {
                return Err(SockDiagError::Malformed {
                    family: name,
                    source,
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
                    source: Malformed::Empty,
                })
            }
            Ok(n) if n > buf.len() => {
                return Err(SockDiagError::Malformed {
                    family,
                    source: Malformed::Truncated {
                        len: n,
                        buf: buf.len(),
                    },
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

#[derive(Debug)]
enum ReplyError {
    /// A positive errno.
    Kernel(i32),
    Malformed(Malformed),
}

/// Parses one datagram of a dump reply with sequence number `seq`, handing
/// what `keep` keeps of the sockets it lists to `each`. Messages of other
/// sequence numbers and of unknown types are skipped.
fn parse_reply<T>(
    mut data: &[u8],
    seq: u32,
    keep: fn(&[u8]) -> Result<Option<T>, ReplyError>,
    each: &mut impl FnMut(T),
) -> Result<Reply, ReplyError> {
    while !data.is_empty() {
        // new_checked guarantees 16 <= length <= data.len(), so the
        // accessors below cannot panic.
        let msg = NetlinkBuffer::new_checked(data)
            .map_err(|e| ReplyError::Malformed(Malformed::Header(e)))?;
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
                        .map_err(|e| ReplyError::Malformed(Malformed::ErrorMessage(e)))?;
                    // Code 0 is an acknowledgement, not an error.
                    if let Some(code) = err.code() {
                        return Err(ReplyError::Kernel(code.get().saturating_abs()));
                    }
                }
                NLMSG_OVERRUN => return Err(ReplyError::Malformed(Malformed::Overrun)),
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(socket) = keep(payload)? {
                        each(socket);
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

/// Requests sent at once: their replies (a few hundred bytes each) must fit
/// in the socket's receive buffer, or the kernel drops them.
const EXACT_BATCH: usize = 64;

/// Looks timewait sockets up by 4-tuple in the calling thread's network
/// namespace, on one netlink socket kept open.
pub struct ExactLookup {
    socket: Socket,
    buf: Vec<u8>,
    seq: u32,
}

impl ExactLookup {
    pub fn open() -> Result<ExactLookup, SockDiagError> {
        Ok(ExactLookup {
            socket: open()?,
            buf: vec![0u8; RECV_BUF_LEN],
            seq: 0,
        })
    }

    /// What the kernel has at each (local, remote) 4-tuple.
    pub fn lookup(
        &mut self,
        sockets: &[(Endpoint, Endpoint)],
    ) -> Result<Vec<Found>, SockDiagError> {
        let mut found = Vec::with_capacity(sockets.len());
        for chunk in sockets.chunks(EXACT_BATCH) {
            found.extend(self.lookup_batch(chunk)?);
        }
        Ok(found)
    }

    fn lookup_batch(
        &mut self,
        sockets: &[(Endpoint, Endpoint)],
    ) -> Result<Vec<Found>, SockDiagError> {
        const FAMILY: &str = "an exact lookup";
        // Sequence numbers base, base + 1, ...: each request gets exactly
        // one answer, the socket or an error (ENOENT: none).
        let base = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(sockets.len() as u32 + 1);
        let mut requests = Vec::new();
        for (i, (local, remote)) in sockets.iter().enumerate() {
            requests.extend(exact_request(base.wrapping_add(i as u32), local, remote));
        }
        self.socket
            .send(&requests, 0)
            .map_err(|source| SockDiagError::Send {
                family: FAMILY,
                source,
            })?;
        let mut answers: Vec<Option<Found>> = vec![None; sockets.len()];
        let mut missing = sockets.len();
        let kernel = |errno: i32| SockDiagError::Kernel {
            family: FAMILY,
            source: io::Error::from_raw_os_error(errno),
        };
        while missing > 0 {
            let len = recv(&self.socket, &mut self.buf, FAMILY)?;
            let data = self.buf.get(..len).unwrap_or(&self.buf);
            let replies = parse_exact_replies(data).map_err(|e| match e {
                ReplyError::Kernel(errno) => kernel(errno),
                ReplyError::Malformed(source) => SockDiagError::Malformed {
                    family: FAMILY,
                    source,
                },
            })?;
            for (seq, answer) in replies {
                let i = seq.wrapping_sub(base) as usize;
                let (Some(slot @ None), Some(asked)) = (answers.get_mut(i), sockets.get(i)) else {
                    continue;
                };
                *slot = Some(match answer.map_err(kernel)? {
                    Some(ExactReply::Timewait(tw)) => Found::Timewait(tw),
                    // The lookup falls back to a listener on the local
                    // endpoint, as for an arriving SYN: that is not this
                    // 4-tuple's socket.
                    Some(ExactReply::Full {
                        local,
                        remote,
                        state,
                    }) if state != TCP_LISTEN && (local, remote) == *asked => Found::Connected,
                    _ => Found::Nothing,
                });
                missing -= 1;
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or(Found::Nothing))
            .collect())
    }
}

/// What the kernel has at one 4-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// A timewait socket.
    Timewait(TimewaitSocket),
    /// A full socket (not listening): a new connection took the 4-tuple.
    Connected,
    Nothing,
}

/// One reply to an exact request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExactReply {
    Timewait(TimewaitSocket),
    Full {
        local: Endpoint,
        remote: Endpoint,
        state: u8,
    },
}

/// The answers in one datagram of replies to exact requests: (sequence
/// number, the socket or none, or an errno other than ENOENT).
#[allow(clippy::type_complexity)]
fn parse_exact_replies(
    mut data: &[u8],
) -> Result<Vec<(u32, Result<Option<ExactReply>, i32>)>, ReplyError> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let msg = NetlinkBuffer::new_checked(data)
            .map_err(|e| ReplyError::Malformed(Malformed::Header(e)))?;
        let len = msg.length() as usize;
        let seq = msg.sequence_number();
        let payload = msg.payload();
        match msg.message_type() {
            SOCK_DIAG_BY_FAMILY => {
                let reply = match parse_inet_diag_msg(payload)? {
                    Some(tw) => Some(ExactReply::Timewait(tw)),
                    None => inet_header(payload)?.map(|h| ExactReply::Full {
                        local: Endpoint::new(h.socket_id.source_address, h.socket_id.source_port),
                        remote: Endpoint::new(
                            h.socket_id.destination_address,
                            h.socket_id.destination_port,
                        ),
                        state: h.state,
                    }),
                };
                out.push((seq, Ok(reply)));
            }
            NLMSG_ERROR => {
                let err = ErrorBuffer::new_checked(payload)
                    .map_err(|e| ReplyError::Malformed(Malformed::ErrorMessage(e)))?;
                match err.code().map(|c| c.get().saturating_abs()) {
                    Some(libc::ENOENT) => out.push((seq, Ok(None))),
                    Some(errno) => out.push((seq, Err(errno))),
                    None => {}
                }
            }
            NLMSG_OVERRUN => return Err(ReplyError::Malformed(Malformed::Overrun)),
            _ => {}
        }
        let step = len.next_multiple_of(NLMSG_ALIGNTO);
        data = data.get(step..).unwrap_or_default();
    }
    Ok(out)
}

/// How long a namespace's lookup socket is kept after its last use. A
/// netlink socket holds its namespace alive: one with no hand-offs for
/// this long is closed.
const IDLE_LOOKUP: std::time::Duration = std::time::Duration::from_secs(10);

/// The kernel's lists as `model::handoff` asks them: the substate of the
/// timewait socket with each 4-tuple, in each network namespace `scope`
/// covers. A namespace's netlink socket is opened inside it on first use
/// (a socket keeps asking the namespace it was opened in) and closed when
/// idle; a warning is logged once when a kernel cannot be asked.
pub struct HandoffLookup {
    scope: Selection,
    asked: HashMap<u32, Asker>,
    warned: bool,
}

/// One namespace's lookup.
struct Asker {
    /// `None`: it could not be found.
    ns: Option<Namespace>,
    exact: Option<ExactLookup>,
    used: Instant,
}

impl HandoffLookup {
    /// Lookups in the namespaces `scope` selects (all of them: each one
    /// an event comes from).
    pub fn new(scope: Selection) -> HandoffLookup {
        HandoffLookup {
            scope,
            asked: HashMap::new(),
            warned: false,
        }
    }

    fn ask(
        &mut self,
        netns: u32,
        sockets: &[(Endpoint, Endpoint)],
    ) -> Result<Vec<Found>, SockDiagError> {
        let now = Instant::now();
        self.asked
            .retain(|_, a| now.duration_since(a.used) < IDLE_LOOKUP);
        let asker = match self.asked.entry(netns) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                // Looked for once: one not found is looked for again only
                // when its entry has gone idle.
                let ns = match &self.scope {
                    Selection::Only(v) => v.iter().find(|n| n.inode == netns).cloned(),
                    Selection::All => Namespace::find(netns).ok(),
                };
                e.insert(Asker {
                    ns,
                    exact: None,
                    used: now,
                })
            }
        };
        let Asker {
            ns: Some(ns),
            exact,
            used,
        } = asker
        else {
            return Err(NetnsError::NoInode { inode: netns }.into());
        };
        *used = now;
        let lookup = match exact {
            Some(e) => e,
            None => exact.insert(ns.run_in(ExactLookup::open)??),
        };
        let found = lookup.lookup(sockets);
        if found.is_err() {
            // Replies of a failed batch may still be on their way.
            *exact = None;
        }
        found
    }
}

impl TimewaitLookup for HandoffLookup {
    fn covers(&self, netns: u32) -> bool {
        match &self.scope {
            Selection::All => true,
            Selection::Only(v) => v.iter().any(|n| n.inode == netns),
        }
    }

    fn lookup(
        &mut self,
        netns: u32,
        sockets: &[(Endpoint, Endpoint)],
    ) -> Result<Vec<Option<TimewaitSubstate>>, String> {
        match self.ask(netns, sockets) {
            Ok(found) => Ok(found
                .into_iter()
                .map(|f| match f {
                    Found::Timewait(tw) if tw.substate == TcpState::FinWait2 => {
                        Some(TimewaitSubstate::FinWait2)
                    }
                    Found::Timewait(_) => Some(TimewaitSubstate::TimeWait),
                    // Only a timewait socket in TIME_WAIT lets a new
                    // connection take its 4-tuple (one in FIN_WAIT2 answers
                    // a SYN with a RST): the peer's FIN had come.
                    Found::Connected => Some(TimewaitSubstate::TimeWait),
                    Found::Nothing => None,
                })
                .collect()),
            Err(e) => {
                let e = anyhow::Error::from(e);
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(
                        "cannot look timewait sockets up in network namespace {netns} ({e:#}): \
                         connections closed first there, whose peer is not on this host, show \
                         as fin_wait2"
                    );
                }
                Err(format!("{e:#}"))
            }
        }
    }
}

/// The header of one `struct inet_diag_msg`; `None` for an address family
/// we do not know.
fn inet_header(payload: &[u8]) -> Result<Option<InetResponseHeader>, ReplyError> {
    if payload.len() < INET_DIAG_MSG_LEN {
        return Err(ReplyError::Malformed(Malformed::ShortDiagMsg {
            len: payload.len(),
        }));
    }
    if !matches!(payload.first(), Some(&AF_INET | &AF_INET6)) {
        return Ok(None);
    }
    InetResponseHeader::parse(payload)
        .map(Some)
        .map_err(|e| ReplyError::Malformed(Malformed::DiagMsg(e)))
}

/// A full socket (even an orphaned one) has another timer; timewait
/// sockets have no inode.
fn is_timewait(header: &InetResponseHeader) -> bool {
    header.timer == Some(Timer::TimeWait) && header.inode == 0
}

/// One `struct inet_diag_msg` of a full socket; `None` for a timewait
/// socket, or a state number the kernel does not define.
fn parse_full_socket(payload: &[u8]) -> Result<Option<FullSocket>, ReplyError> {
    let Some(header) = inet_header(payload)? else {
        return Ok(None);
    };
    if is_timewait(&header) {
        return Ok(None);
    }
    let Some(state) = TcpState::from_kernel(header.state) else {
        return Ok(None);
    };
    let id = &header.socket_id;
    Ok(Some(FullSocket {
        local: Endpoint::new(id.source_address, id.source_port),
        remote: Endpoint::new(id.destination_address, id.destination_port),
        state,
        inode: header.inode,
    }))
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
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
        let r = parse_reply(data, SEQ, parse_inet_diag_msg, &mut |s| out.push(s));
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
        assert!(matches!(r, Ok(Reply::More)));
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
        assert!(matches!(r, Ok(Reply::Done)));
        assert_eq!(out.len(), 2);
        // The kernel may also send an NLMSG_DONE with an empty payload.
        assert!(matches!(
            parse(&nlmsg(NLMSG_DONE, SEQ, &[])).0,
            Ok(Reply::Done)
        ));
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
        assert!(matches!(r, Ok(Reply::More)));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].local.port, 6);
    }

    #[test]
    fn kernel_errors_become_errnos() {
        let (r, _) = parse(&error(-libc::EAFNOSUPPORT));
        assert!(matches!(r, Err(ReplyError::Kernel(libc::EAFNOSUPPORT))));
        let (r, _) = parse(&done(-libc::ENOMEM));
        assert!(matches!(r, Err(ReplyError::Kernel(libc::ENOMEM))));
        // An acknowledgement is not an error.
        let mut data = error(0);
        data.extend(done(0));
        assert!(matches!(parse(&data).0, Ok(Reply::Done)));
        // Extreme codes do not overflow.
        assert!(matches!(
            parse(&error(i32::MIN)).0,
            Err(ReplyError::Kernel(i32::MAX))
        ));
        assert!(matches!(
            parse(&done(i32::MIN)).0,
            Err(ReplyError::Kernel(i32::MAX))
        ));
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
        assert!(matches!(r, Ok(Reply::More)));
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
        assert!(matches!(
            parse_reply(&data, SEQ, parse_full_socket, &mut |s| out.push(s)),
            Ok(Reply::Done)
        ));
        let got: Vec<(u16, u16, TcpState, u32)> = out
            .iter()
            .map(|s| (s.local.port, s.remote.port, s.state, s.inode))
            .collect();
        assert_eq!(
            got,
            [
                (40001, 8080, TcpState::FinWait2, 0),
                (40002, 8080, TcpState::Established, 77)
            ]
        );
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
}
