//! Turning ring-buffer records into typed events: the length is checked and
//! the bytes are copied out unaligned, never reinterpreted in place. A
//! socket's record of several transitions ([`SockRecord`]) is expanded
//! here into the per-transition events the rest of tcpwatch takes.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tcpwatch_common::{
    kind, valid, Event, SockRecord, Step, AF_INET, AF_INET6, RCV_SHUTDOWN, RECORD_STEPS,
    SEND_SHUTDOWN,
};

use crate::model::reset::ResetReason;
use crate::model::{Endpoint, Family, TcpState};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("record of unknown kind {0}")]
    Kind(u8),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown TCP state number {0}")]
    State(u8),
    #[error(
        "socket record of {got} bytes claims {steps} transitions (a record holds 1 to {max})",
        max = RECORD_STEPS
    )]
    Steps { got: usize, steps: u8 },
}

/// Copies a record out of the ring buffer.
pub fn decode_raw(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() != Event::SIZE {
        return Err(DecodeError::Length {
            got: bytes.len(),
            expected: Event::SIZE,
        });
    }
    // SAFETY: the length was checked above; Event is plain integers, so any
    // bit pattern is a valid value, and read_unaligned needs no alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// Takes one ring-buffer record: an [`Event`], or a socket's
/// [`SockRecord`] expanded into one [`Event`] per transition, in order.
/// Nothing is added for a record that is neither.
pub fn decode_into(bytes: &[u8], out: &mut Vec<Event>) -> Result<(), DecodeError> {
    if bytes.len() == Event::SIZE {
        out.push(decode_raw(bytes)?);
        return Ok(());
    }
    let steps = bytes
        .len()
        .checked_sub(SockRecord::HEADER)
        .filter(|rest| rest.is_multiple_of(std::mem::size_of::<Step>()))
        .map(|rest| rest / std::mem::size_of::<Step>())
        .filter(|n| (1..=RECORD_STEPS).contains(n))
        .ok_or(DecodeError::Length {
            got: bytes.len(),
            expected: Event::SIZE,
        })?;
    let mut full = [0u8; SockRecord::SIZE];
    full[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `full` is SockRecord::SIZE bytes; SockRecord is plain
    // integers, so any bit pattern is a valid value.
    let r = unsafe { std::ptr::read_unaligned(full.as_ptr().cast::<SockRecord>()) };
    if r.kind != kind::SOCKET_RECORD {
        return Err(DecodeError::Kind(r.kind));
    }
    if usize::from(r.steps) != steps {
        return Err(DecodeError::Steps {
            got: bytes.len(),
            steps: r.steps,
        });
    }
    expand(&r, out);
    Ok(())
}

/// The events of a socket record's steps, each as the per-transition
/// program would have written it.
fn expand(r: &SockRecord, out: &mut Vec<Event>) {
    let steps = &r.step[..usize::from(r.steps).min(RECORD_STEPS)];
    for (i, s) in steps.iter().enumerate() {
        let mut e = Event::zeroed();
        e.kind = kind::STATE;
        e.ts_ns = s.ts_ns;
        e.skaddr = r.skaddr;
        e.saddr = r.saddr;
        e.daddr = r.daddr;
        e.sport = r.sport;
        e.dport = r.dport;
        e.family = r.family;
        e.pid = s.pid;
        e.tid = s.tid;
        e.cpu = s.cpu;
        e.oldstate = s.oldstate;
        e.newstate = s.newstate;
        if i == usize::from(r.owner_step) {
            e.cgroup_id = r.cgroup_id;
            e.comm = r.comm;
        }
        e.valid = r.valid & valid::NETNS;
        if e.valid != 0 {
            e.netns = r.netns;
        }
        if s.newstate == TcpState::Close.kernel_number() {
            e.valid |= r.valid & !valid::NETNS;
            e.bytes_acked = r.bytes_acked;
            e.bytes_received = r.bytes_received;
            e.srtt_us = r.srtt_us;
            e.total_retrans = r.total_retrans;
            e.segs_in = r.segs_in;
            e.segs_out = r.segs_out;
            e.sk_err = r.sk_err;
            e.rcv_nxt = r.rcv_nxt;
            e.sk_shutdown = r.sk_shutdown;
            e.ack_pending = r.ack_pending;
        } else {
            e.valid |= s.valid;
            let has = |bit: u16| s.valid & bit != 0;
            if has(valid::SEGS_IN) {
                e.segs_in = s.a;
            }
            if has(valid::SEGS_OUT) {
                e.segs_out = s.a;
            }
            if has(valid::SRTT) {
                e.srtt_us = s.a;
            }
            if has(valid::RCV_NXT) {
                e.rcv_nxt = s.b;
            }
            if has(valid::ACK_PENDING) {
                e.ack_pending = s.b as u8;
            }
        }
        out.push(e);
    }
}

/// A task's `comm`, kept as the kernel's 16 bytes (no allocation per event).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; 16]);

/// A process name as shown: control characters (a task may name itself
/// `"\n..."` or an escape sequence) become `?`, as `ps` shows them, so a
/// name can never break a line of output or drive the terminal.
pub fn printable_name(name: &str) -> Cow<'_, str> {
    if name.contains(char::is_control) {
        Cow::Owned(
            name.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(name)
    }
}

impl Comm {
    pub fn as_str(&self) -> Cow<'_, str> {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        match String::from_utf8_lossy(&self.0[..end]) {
            Cow::Borrowed(name) => printable_name(name),
            Cow::Owned(name) => Cow::Owned(printable_name(&name).into_owned()),
        }
    }

    pub fn from_str_lossy(s: &str) -> Comm {
        let mut out = [0u8; 16];
        let n = s.len().min(15);
        out[..n].copy_from_slice(&s.as_bytes()[..n]);
        Comm(out)
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.as_str())
    }
}

/// The task that was current when the event fired. It is the socket's user
/// only for transitions made in process context (see `owner`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
}

/// Socket fields read at the event, each `None` where the kernel's BTF did
/// not give its offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockFields {
    pub bytes_acked: Option<u64>,
    pub bytes_received: Option<u64>,
    pub srtt_us: Option<u32>,
    pub total_retrans: Option<u32>,
    pub segs_in: Option<u32>,
    pub segs_out: Option<u32>,
    /// `sk_err` as a positive errno; `Some(0)` for no error.
    pub sk_err: Option<i32>,
    /// `sk_shutdown`: whether a FIN was received (RCV) / sent (SEND).
    pub rcv_shutdown: Option<bool>,
    pub send_shutdown: Option<bool>,
    /// A delayed ACK is pending (`icsk_ack.pending & ICSK_ACK_TIMER`).
    pub ack_pending: Option<bool>,
    pub netns: Option<u32>,
    pub rcv_nxt: Option<u32>,
}

impl SockFields {
    fn from_event(e: &Event) -> SockFields {
        let has = |bit: u16| e.valid & bit != 0;
        SockFields {
            bytes_acked: has(valid::BYTES_ACKED).then_some(e.bytes_acked),
            bytes_received: has(valid::BYTES_RECEIVED).then_some(e.bytes_received),
            srtt_us: has(valid::SRTT).then_some(e.srtt_us),
            total_retrans: has(valid::TOTAL_RETRANS).then_some(e.total_retrans),
            segs_in: has(valid::SEGS_IN).then_some(e.segs_in),
            segs_out: has(valid::SEGS_OUT).then_some(e.segs_out),
            sk_err: has(valid::SK_ERR).then_some(e.sk_err),
            rcv_shutdown: has(valid::SHUTDOWN).then_some(e.sk_shutdown & RCV_SHUTDOWN != 0),
            send_shutdown: has(valid::SHUTDOWN).then_some(e.sk_shutdown & SEND_SHUTDOWN != 0),
            ack_pending: has(valid::ACK_PENDING)
                .then_some(e.ack_pending & tcpwatch_common::ICSK_ACK_TIMER != 0),
            netns: has(valid::NETNS).then_some(e.netns),
            rcv_nxt: has(valid::RCV_NXT).then_some(e.rcv_nxt),
        }
    }
}

/// A TCP state transition of one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub ts_ns: u64,
    pub skaddr: u64,
    pub family: Family,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub old: TcpState,
    pub new: TcpState,
    pub task: Task,
    pub cpu: u32,
    pub sock: SockFields,
}

impl Transition {
    /// A connection opened: `active` for a connect() that was answered
    /// (SYN_SENT → ESTABLISHED), `passive` for one accepted from a
    /// listener (SYN_RECV → ESTABLISHED); `None` for any other change.
    pub fn opened(&self) -> Option<&'static str> {
        match (self.old, self.new) {
            (TcpState::SynSent, TcpState::Established) => Some("active"),
            (TcpState::SynRecv, TcpState::Established) => Some("passive"),
            _ => None,
        }
    }
}

/// Something that happened to a socket besides a state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketEventKind {
    Retransmit,
    SendReset,
    ReceiveReset,
    /// The first send or receive on an accepted socket: the current task
    /// is its owner.
    FirstUse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketEvent {
    pub ts_ns: u64,
    /// 0 for a reset sent on behalf of no socket.
    pub skaddr: u64,
    pub kind: SocketEventKind,
    pub task: Task,
    pub cpu: u32,
    pub sock: SockFields,
    /// What the kernel said about a reset it sent ([`SocketEventKind::SendReset`]).
    pub reset: Option<SentReset>,
}

/// A RST sent, as `tcp:tcp_send_reset` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentReset {
    /// `None` on kernels before 6.10, which do not say.
    pub reason: Option<ResetReason>,
    /// The sender's state; `None` when no socket sent it.
    pub state: Option<TcpState>,
    /// The sender's end first, then the end the RST went to; `None` where
    /// the kernel's record has no endpoints (before 6.10).
    pub endpoints: Option<(Family, Endpoint, Endpoint)>,
}

impl SentReset {
    fn from_event(e: &Event) -> SentReset {
        let family = match e.family {
            AF_INET => Some(Family::V4),
            AF_INET6 => Some(Family::V6),
            _ => None,
        };
        SentReset {
            reason: (e.valid & valid::RESET_REASON != 0).then_some(ResetReason(e.reset_reason)),
            state: TcpState::from_kernel(e.newstate),
            endpoints: family.and_then(|f| {
                Some((
                    f,
                    Endpoint::new(addr(e.family, &e.saddr).ok()?, e.sport),
                    Endpoint::new(addr(e.family, &e.daddr).ok()?, e.dport),
                ))
            }),
        }
    }
}

/// A decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    State(Transition),
    Socket(SocketEvent),
}

impl Record {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Record::State(t) => t.ts_ns,
            Record::Socket(s) => s.ts_ns,
        }
    }

    pub fn skaddr(&self) -> u64 {
        match self {
            Record::State(t) => t.skaddr,
            Record::Socket(s) => s.skaddr,
        }
    }
}

fn task_of(e: &Event) -> Task {
    Task {
        pid: e.pid,
        tid: e.tid,
        comm: Comm(e.comm),
        cgroup_id: e.cgroup_id,
    }
}

fn addr(family: u16, bytes: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*bytes))),
        other => Err(DecodeError::Family(other)),
    }
}

fn state(n: u8) -> Result<TcpState, DecodeError> {
    TcpState::from_kernel(n).ok_or(DecodeError::State(n))
}

/// Gives a raw record its meaning.
pub fn interpret(e: &Event) -> Result<Record, DecodeError> {
    match e.kind {
        kind::STATE => {
            let family = match e.family {
                AF_INET => Family::V4,
                AF_INET6 => Family::V6,
                other => return Err(DecodeError::Family(other)),
            };
            Ok(Record::State(Transition {
                ts_ns: e.ts_ns,
                skaddr: e.skaddr,
                family,
                local: Endpoint::new(addr(e.family, &e.saddr)?, e.sport),
                remote: Endpoint::new(addr(e.family, &e.daddr)?, e.dport),
                old: state(e.oldstate)?,
                new: state(e.newstate)?,
                task: task_of(e),
                cpu: e.cpu,
                sock: SockFields::from_event(e),
            }))
        }
        kind::RETRANSMIT | kind::SEND_RESET | kind::RECEIVE_RESET | kind::FIRST_USE => {
            let kind = match e.kind {
                kind::RETRANSMIT => SocketEventKind::Retransmit,
                kind::SEND_RESET => SocketEventKind::SendReset,
                kind::RECEIVE_RESET => SocketEventKind::ReceiveReset,
                _ => SocketEventKind::FirstUse,
            };
            Ok(Record::Socket(SocketEvent {
                ts_ns: e.ts_ns,
                skaddr: e.skaddr,
                kind,
                task: task_of(e),
                cpu: e.cpu,
                sock: SockFields::from_event(e),
                reset: (kind == SocketEventKind::SendReset).then(|| SentReset::from_event(e)),
            }))
        }
        other => Err(DecodeError::Kind(other)),
    }
}

/// Records that did not make sense, counted, with the first reason kept.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rejects {
    pub count: u64,
    pub first: Option<DecodeError>,
}

impl Rejects {
    pub fn add(&mut self, e: DecodeError) {
        self.count += 1;
        self.first.get_or_insert(e);
    }

    /// The warning for these rejects, if there were any.
    pub fn warning(&self) -> Option<String> {
        (self.count > 0).then(|| {
            let why = self
                .first
                .as_ref()
                .map(|e| e.to_string())
                .unwrap_or_default();
            format!("{} undecodable records ({why})", self.count)
        })
    }
}

/// Interprets a batch, keeping the records that make sense.
pub fn interpret_all(events: &[Event], rejects: &mut Rejects) -> Vec<Record> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        match interpret(e) {
            Ok(r) => out.push(r),
            Err(err) => rejects.add(err),
        }
    }
    out
}

/// Length check, copy, and meaning, in one step.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    interpret(&decode_raw(bytes)?)
}

/// Raw bytes of an event, as the kernel would write them (for recordings
/// and tests).
pub fn encode(e: &Event) -> [u8; Event::SIZE] {
    let mut out = [0u8; Event::SIZE];
    // SAFETY: Event is Copy plain data of exactly Event::SIZE bytes.
    unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast::<Event>(), *e) };
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn state_event(skaddr: u64, old: TcpState, new: TcpState, ts_ns: u64) -> Event {
        let mut e = Event::zeroed();
        e.kind = kind::STATE;
        e.ts_ns = ts_ns;
        e.skaddr = skaddr;
        e.family = AF_INET;
        e.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        e.sport = 40000;
        e.dport = 8080;
        e.oldstate = old.kernel_number();
        e.newstate = new.kernel_number();
        e.pid = 42;
        e.tid = 43;
        e.comm = Comm::from_str_lossy("client").0;
        e
    }

    fn step(ts_ns: u64, old: TcpState, new: TcpState) -> Step {
        Step {
            ts_ns,
            pid: 7,
            tid: 8,
            cpu: 1,
            a: 0,
            b: 0,
            valid: 0,
            oldstate: old.kernel_number(),
            newstate: new.kernel_number(),
        }
    }

    /// The bytes of a record holding its first `r.steps` steps.
    fn record_bytes(r: &SockRecord) -> Vec<u8> {
        let mut full = [0u8; SockRecord::SIZE];
        // SAFETY: SockRecord is Copy plain data of exactly SIZE bytes.
        unsafe { std::ptr::write_unaligned(full.as_mut_ptr().cast::<SockRecord>(), *r) };
        full[..SockRecord::bytes_for(usize::from(r.steps))].to_vec()
    }

    /// A client's close as the per-socket program keeps it.
    fn client_close() -> SockRecord {
        use TcpState::*;
        let mut r: SockRecord = unsafe { std::mem::zeroed() };
        r.kind = kind::SOCKET_RECORD;
        r.skaddr = 0xffff_8880_1234_5678;
        r.family = AF_INET;
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        r.sport = 40000;
        r.dport = 8080;
        r.netns = 4026531840;
        r.comm = Comm::from_str_lossy("client").0;
        r.cgroup_id = 99;
        r.owner_step = 0;
        r.step[0] = step(10, Established, FinWait1);
        r.step[1] = Step {
            a: 5,
            b: 1000,
            valid: valid::SEGS_IN | valid::RCV_NXT,
            ..step(20, FinWait1, FinWait2)
        };
        r.step[2] = step(30, FinWait2, Close);
        r.steps = 3;
        r.valid = valid::NETNS | valid::BYTES_ACKED | valid::RCV_NXT | valid::SHUTDOWN;
        r.bytes_acked = 17;
        r.rcv_nxt = 1001;
        r.sk_shutdown = RCV_SHUTDOWN | SEND_SHUTDOWN;
        r.segs_out = 12; // not marked valid: must not show
        r
    }

    #[test]
    fn a_socket_record_expands_into_its_transitions() {
        use TcpState::*;
        let r = client_close();
        let mut events = Vec::new();
        decode_into(&record_bytes(&r), &mut events).unwrap();
        let records: Vec<Record> = events.iter().map(|e| interpret(e).unwrap()).collect();
        let transitions: Vec<&Transition> = records
            .iter()
            .map(|r| match r {
                Record::State(t) => t,
                other => panic!("not a transition: {other:?}"),
            })
            .collect();
        let steps: Vec<_> = transitions
            .iter()
            .map(|t| (t.ts_ns, t.old, t.new))
            .collect();
        assert_eq!(
            steps,
            [
                (10, Established, FinWait1),
                (20, FinWait1, FinWait2),
                (30, FinWait2, Close)
            ]
        );
        for t in &transitions {
            assert_eq!(t.skaddr, r.skaddr);
            assert_eq!(t.local.to_string(), "127.0.0.1:40000");
            assert_eq!(t.remote.to_string(), "127.0.0.2:8080");
            assert_eq!(t.sock.netns, Some(4026531840));
            assert_eq!((t.task.pid, t.task.tid, t.cpu), (7, 8, 1));
        }
        // Only the process-context step carries its task's name and cgroup.
        assert_eq!(transitions[0].task.comm.to_string(), "client");
        assert_eq!(transitions[0].task.cgroup_id, 99);
        assert_eq!(transitions[1].task.comm.to_string(), "");
        assert_eq!(transitions[2].task.cgroup_id, 0);
        // Each step's own fields, and the final ones at CLOSE only.
        assert_eq!(transitions[1].sock.segs_in, Some(5));
        assert_eq!(transitions[1].sock.rcv_nxt, Some(1000));
        assert_eq!(transitions[1].sock.bytes_acked, None);
        assert_eq!(transitions[2].sock.rcv_nxt, Some(1001));
        assert_eq!(transitions[2].sock.bytes_acked, Some(17));
        assert_eq!(transitions[2].sock.rcv_shutdown, Some(true));
        assert_eq!(transitions[2].sock.segs_out, None);
        assert_eq!(transitions[2].sock.segs_in, None);
        assert_eq!(transitions[0].sock.rcv_shutdown, None);
    }

    #[test]
    fn damaged_socket_records_are_errors_not_events() {
        let r = client_close();
        let bytes = record_bytes(&r);
        let mut events = Vec::new();
        for len in [SockRecord::HEADER, bytes.len() - 1, bytes.len() + 1] {
            let mut b = bytes.clone();
            b.resize(len, 0);
            assert!(matches!(
                decode_into(&b, &mut events),
                Err(DecodeError::Length { got, .. }) if got == len
            ));
        }
        let mut wrong_kind = r;
        wrong_kind.kind = kind::STATE;
        assert_eq!(
            decode_into(&record_bytes(&wrong_kind), &mut events),
            Err(DecodeError::Kind(kind::STATE))
        );
        // A header that claims more steps than were sent.
        let mut b = bytes.clone();
        b.truncate(SockRecord::bytes_for(2));
        let err = decode_into(&b, &mut events).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Steps {
                got: SockRecord::bytes_for(2),
                steps: 3
            }
        );
        assert!(err.to_string().contains("claims 3 transitions"), "{err}");
        assert!(events.is_empty(), "{events:?}");
    }

    /// A reset sent: its reason only where the kernel gave it, the
    /// sender's state, and the endpoints the record held.
    #[test]
    fn a_reset_sent_keeps_its_reason_state_and_endpoints() {
        let mut e = Event::zeroed();
        e.kind = kind::SEND_RESET;
        e.reset_reason = 11;
        e.newstate = TcpState::Close.kernel_number();
        let Record::Socket(s) = decode(&encode(&e)).unwrap() else {
            panic!("not a socket event")
        };
        let reset = s.reset.unwrap();
        assert_eq!(reset.reason, None, "not marked valid: an older kernel");
        assert_eq!(reset.state, Some(TcpState::Close));
        assert_eq!(reset.endpoints, None);
        e.valid = valid::RESET_REASON;
        e.newstate = 0;
        e.family = AF_INET6;
        e.saddr[15] = 1;
        e.daddr[15] = 1;
        e.sport = 80;
        e.dport = 5000;
        let Record::Socket(s) = decode(&encode(&e)).unwrap() else {
            panic!("not a socket event")
        };
        let reset = s.reset.unwrap();
        assert_eq!(reset.reason, Some(ResetReason::TCP_ABORT_ON_CLOSE));
        assert_eq!(reset.state, None, "no socket");
        let (family, local, remote) = reset.endpoints.unwrap();
        assert_eq!(family, Family::V6);
        assert_eq!(local.to_string(), "[::1]:80");
        assert_eq!(remote.to_string(), "[::1]:5000");
        // decode_into, which reads both per-socket records and single
        // events off the ring, keeps the reason too.
        let mut events = Vec::new();
        decode_into(&encode(&e), &mut events).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].reset_reason, 11);
        let Record::Socket(s) = interpret(&events[0]).unwrap() else {
            panic!("not a socket event")
        };
        assert_eq!(
            s.reset.unwrap().reason,
            Some(ResetReason::TCP_ABORT_ON_CLOSE)
        );
        // Other socket events carry none of it.
        e.kind = kind::RETRANSMIT;
        let Record::Socket(s) = decode(&encode(&e)).unwrap() else {
            panic!("not a socket event")
        };
        assert_eq!(s.reset, None);
    }

    #[test]
    fn round_trips_a_state_event() {
        let mut e = state_event(0xffff_8880_1234_5678, TcpState::Close, TcpState::SynSent, 7);
        e.valid = valid::SHUTDOWN | valid::SRTT;
        e.sk_shutdown = RCV_SHUTDOWN;
        e.srtt_us = 55;
        e.bytes_acked = 99; // not marked valid: must not show
        let r = decode(&encode(&e)).unwrap();
        let Record::State(t) = r else {
            panic!("not a state record: {r:?}")
        };
        assert_eq!(t.skaddr, 0xffff_8880_1234_5678);
        assert_eq!(t.old, TcpState::Close);
        assert_eq!(t.new, TcpState::SynSent);
        assert_eq!(t.local.to_string(), "127.0.0.1:40000");
        assert_eq!(t.remote.to_string(), "127.0.0.2:8080");
        assert_eq!(t.task.comm.to_string(), "client");
        assert_eq!(t.task.pid, 42);
        assert_eq!(t.sock.rcv_shutdown, Some(true));
        assert_eq!(t.sock.send_shutdown, Some(false));
        assert_eq!(t.sock.srtt_us, Some(55));
        assert_eq!(t.sock.bytes_acked, None);
        assert_eq!(t.sock.segs_in, None);
    }

    #[test]
    fn opened_is_an_answered_connect_or_an_accept() {
        use TcpState::*;
        let opened = |old, new| match interpret(&state_event(1, old, new, 1)) {
            Ok(Record::State(t)) => t.opened(),
            other => panic!("{other:?}"),
        };
        assert_eq!(opened(SynSent, Established), Some("active"));
        assert_eq!(opened(SynRecv, Established), Some("passive"));
        assert_eq!(opened(Close, SynSent), None);
        assert_eq!(opened(Established, FinWait1), None);
        assert_eq!(opened(SynSent, Close), None, "a refused connect");
    }

    #[test]
    fn decodes_ipv6() {
        let mut e = state_event(1, TcpState::Listen, TcpState::SynRecv, 1);
        e.family = AF_INET6;
        e.saddr = Ipv6Addr::LOCALHOST.octets();
        e.daddr = "fe80::1".parse::<Ipv6Addr>().unwrap().octets();
        let Record::State(t) = decode(&encode(&e)).unwrap() else {
            panic!()
        };
        assert_eq!(t.family, Family::V6);
        assert_eq!(t.local.to_string(), "[::1]:40000");
        assert_eq!(t.remote.to_string(), "[fe80::1]:8080");
    }

    #[test]
    fn short_and_long_records_are_rejected() {
        let bytes = encode(&state_event(1, TcpState::Close, TcpState::SynSent, 1));
        for len in [0, 1, Event::SIZE - 1] {
            assert_eq!(
                decode(&bytes[..len]),
                Err(DecodeError::Length {
                    got: len,
                    expected: Event::SIZE
                })
            );
        }
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(matches!(decode(&long), Err(DecodeError::Length { .. })));
    }

    #[test]
    fn corrupt_fields_are_errors_not_panics() {
        let mut e = state_event(1, TcpState::Close, TcpState::SynSent, 1);
        e.newstate = 200;
        assert_eq!(decode(&encode(&e)), Err(DecodeError::State(200)));
        let mut e = state_event(1, TcpState::Close, TcpState::SynSent, 1);
        e.family = 3;
        assert_eq!(decode(&encode(&e)), Err(DecodeError::Family(3)));
        let mut e = state_event(1, TcpState::Close, TcpState::SynSent, 1);
        e.kind = 99;
        assert_eq!(decode(&encode(&e)), Err(DecodeError::Kind(99)));
        // Every single-byte corruption of a valid record decodes or errors.
        let good = encode(&state_event(1, TcpState::Close, TcpState::SynSent, 1));
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = good;
                b[i] = v;
                let _ = decode(&b);
            }
        }
    }

    #[test]
    fn control_characters_in_a_process_name_are_not_printed() {
        // Found by the correlator fuzzer: a comm with a newline split a
        // `conns` text line in two.
        let name = Comm(*b"evil\nname\x1b[2J\0\0\0");
        assert_eq!(name.as_str(), "evil?name?[2J");
        assert_eq!(name.to_string(), "evil?name?[2J");
        let invalid = Comm(*b"a\xff\tb\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(invalid.as_str(), "a\u{fffd}?b");
        assert!(matches!(
            Comm::from_str_lossy("nginx").as_str(),
            Cow::Borrowed("nginx")
        ));
    }

    #[test]
    fn reset_event_decodes() {
        let mut e = Event::zeroed();
        e.kind = kind::RECEIVE_RESET;
        e.skaddr = 5;
        e.ts_ns = 9;
        let Record::Socket(s) = decode(&encode(&e)).unwrap() else {
            panic!()
        };
        assert_eq!(s.kind, SocketEventKind::ReceiveReset);
        assert_eq!(s.skaddr, 5);
    }
}
