//! The contract between the kernel program and userspace: the record the
//! program writes into the ring buffer, the configuration userspace hands the
//! program before loading it, and the constants both sides name.
//!
//! Everything here is `#[repr(C)]`, `Copy`, made of plain integers, ordered
//! largest field first with explicit padding, and its size is checked at
//! compile time so a change on one side cannot silently skew the other.
#![no_std]

/// What produced an [`Event`].
pub mod kind {
    /// `sock:inet_sock_set_state`: a TCP state transition.
    pub const STATE: u8 = 1;
    /// `tcp:tcp_retransmit_skb`: a segment was retransmitted.
    pub const RETRANSMIT: u8 = 2;
    /// `tcp:tcp_send_reset`: a RST was sent, by a socket or (`skaddr` 0)
    /// on behalf of none, e.g. answering a SYN to a closed port. Carries
    /// the reason ([`super::Event::reset_reason`]), the sender's state in
    /// `newstate` (0: no socket) and, where the record has them, the
    /// endpoints (`family` 0 when it has not).
    pub const SEND_RESET: u8 = 3;
    /// `tcp:tcp_receive_reset`: this socket received a RST.
    pub const RECEIVE_RESET: u8 = 4;
    /// The first send or receive on an accepted socket
    /// (`sock_send_length`/`sock_recv_length`, in process context): the
    /// current task took it from the listener's queue and is its owner.
    pub const FIRST_USE: u8 = 5;
    /// A [`super::SockRecord`]: several transitions of one socket in one
    /// record. Only ever in a `SockRecord`'s `kind`, never in an `Event`'s.
    pub const SOCKET_RECORD: u8 = 0x10;
}

/// Bits of [`Event::valid`]: which socket fields were actually read. A field
/// whose offset is missing from the kernel's BTF is never read at a guess.
pub mod valid {
    pub const SHUTDOWN: u16 = 1 << 0;
    pub const SK_ERR: u16 = 1 << 1;
    pub const BYTES_ACKED: u16 = 1 << 2;
    pub const BYTES_RECEIVED: u16 = 1 << 3;
    pub const SRTT: u16 = 1 << 4;
    pub const TOTAL_RETRANS: u16 = 1 << 5;
    pub const SEGS_IN: u16 = 1 << 6;
    pub const SEGS_OUT: u16 = 1 << 7;
    pub const ACK_PENDING: u16 = 1 << 8;
    pub const NETNS: u16 = 1 << 9;
    pub const RCV_NXT: u16 = 1 << 10;
    /// [`super::Event::reset_reason`] holds the kernel's reason; unset on
    /// kernels before 6.10, whose `tcp_send_reset` record has none.
    pub const RESET_REASON: u16 = 1 << 11;
}

/// `sk->sk_shutdown` bits (include/net/sock.h).
pub const RCV_SHUTDOWN: u8 = 1;
pub const SEND_SHUTDOWN: u8 = 2;
/// `icsk->icsk_ack.pending` bit: a delayed ACK is scheduled.
pub const ICSK_ACK_TIMER: u8 = 2;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Index of the single slot of the per-CPU lost-event counter.
pub const LOST_SLOT: u32 = 0;

/// Marks a tracepoint field this kernel's record does not have.
pub const NO_FIELD: u16 = u16::MAX;

/// Marks a socket field whose offset the kernel's BTF did not give.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

/// One record in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the socket; the key that ties events together.
    pub skaddr: u64,
    /// cgroup id of the task current when the event fired.
    pub cgroup_id: u64,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Source and destination address: 4 bytes used for IPv4, 16 for IPv6.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// `comm` of the task current when the event fired.
    pub comm: [u8; 16],
    /// tgid and tid of the task current when the event fired.
    pub pid: u32,
    pub tid: u32,
    pub cpu: u32,
    /// Smoothed RTT in microseconds (already shifted out of the kernel's <<3).
    pub srtt_us: u32,
    pub total_retrans: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    /// `sk->sk_err` (a positive errno, 0 for none).
    pub sk_err: i32,
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    /// Next sequence number expected from the peer: a received FIN moves
    /// it by one, which is how a FIN's arrival is told from a bare ACK's.
    pub rcv_nxt: u32,
    /// Ports in host byte order.
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    /// [`valid`] bits.
    pub valid: u16,
    /// One of [`kind`].
    pub kind: u8,
    /// Kernel TCP state numbers (`TCP_ESTABLISHED` = 1 …).
    pub oldstate: u8,
    pub newstate: u8,
    pub sk_shutdown: u8,
    pub ack_pending: u8,
    /// [`kind::SEND_RESET`]: the kernel's `enum sk_rst_reason` (where
    /// [`valid::RESET_REASON`] says it was read).
    pub reset_reason: u8,
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<Event>() == 144);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

impl Event {
    pub const SIZE: usize = core::mem::size_of::<Event>();

    pub const fn zeroed() -> Self {
        Event {
            ts_ns: 0,
            skaddr: 0,
            cgroup_id: 0,
            bytes_acked: 0,
            bytes_received: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; 16],
            pid: 0,
            tid: 0,
            cpu: 0,
            srtt_us: 0,
            total_retrans: 0,
            segs_in: 0,
            segs_out: 0,
            sk_err: 0,
            netns: 0,
            rcv_nxt: 0,
            sport: 0,
            dport: 0,
            family: 0,
            valid: 0,
            kind: 0,
            oldstate: 0,
            newstate: 0,
            sk_shutdown: 0,
            ack_pending: 0,
            reset_reason: 0,
            _pad: [0; 2],
        }
    }
}

/// Transitions one [`SockRecord`] holds.
pub const RECORD_STEPS: usize = 6;

/// [`SockRecord::owner_step`] when no step of the record was made in
/// process context.
pub const NO_OWNER_STEP: u8 = u8::MAX;

/// One state transition in a [`SockRecord`]. `a` and `b` hold the socket
/// fields this transition read, by their [`valid`] bit: `a` is `segs_in`,
/// `segs_out` or `srtt_us` (a transition reads at most one of them), `b` is
/// `rcv_nxt` or `ack_pending`. A CLOSE step's fields are in the record's
/// header instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub ts_ns: u64,
    /// tgid and tid of the task current at the transition, and its CPU.
    pub pid: u32,
    pub tid: u32,
    pub cpu: u32,
    pub a: u32,
    pub b: u32,
    pub valid: u16,
    pub oldstate: u8,
    pub newstate: u8,
}

const _: () = assert!(core::mem::size_of::<Step>() == 32);

/// Per-socket record: what the set-state program keeps for one socket in
/// socket storage (`BPF_MAP_TYPE_SK_STORAGE`) and sends through the ring
/// buffer as one record, of [`SockRecord::HEADER`] bytes plus the used
/// steps, when the socket reaches ESTABLISHED, LISTEN or CLOSE (or its
/// steps are full, or a retransmit, reset or first use is about to be
/// sent for it). Userspace expands it into one [`Event`] per step.
/// Endpoints and namespace are read when it is sent; the counters an
/// [`Event`] carries at CLOSE are in the header (`valid` says which).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRecord {
    pub skaddr: u64,
    /// cgroup of the task of the step made in process context.
    pub cgroup_id: u64,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// `comm` of the task of the step made in process context.
    pub comm: [u8; 16],
    pub netns: u32,
    pub srtt_us: u32,
    pub total_retrans: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    pub sk_err: i32,
    pub rcv_nxt: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    /// [`valid`] bits of the CLOSE step's fields, and [`valid::NETNS`].
    pub valid: u16,
    /// [`kind::SOCKET_RECORD`].
    pub kind: u8,
    /// Steps used.
    pub steps: u8,
    /// Which step was made in process context (its task is the socket's
    /// user), or [`NO_OWNER_STEP`].
    pub owner_step: u8,
    pub sk_shutdown: u8,
    pub ack_pending: u8,
    /// Kernel-side state, not for userspace: 1 while an accepted socket
    /// waits for its first send or receive (its owner).
    pub awaiting_owner: u8,
    pub _pad: [u8; 6],
    pub step: [Step; RECORD_STEPS],
}

const _: () = assert!(core::mem::size_of::<SockRecord>() == 128 + 32 * RECORD_STEPS);
const _: () = assert!(core::mem::align_of::<SockRecord>() == 8);
// A record of any length can never be taken for an Event.
const _: () = assert!(!(Event::SIZE - SockRecord::HEADER).is_multiple_of(32));

impl SockRecord {
    /// Bytes before the steps.
    pub const HEADER: usize = core::mem::size_of::<SockRecord>() - 32 * RECORD_STEPS;
    pub const SIZE: usize = core::mem::size_of::<SockRecord>();

    /// The length of a record holding `steps` steps.
    pub const fn bytes_for(steps: usize) -> usize {
        Self::HEADER + 32 * steps
    }
}

/// Size of the `saddr`/`daddr` fields of the `tcp_send_reset` record: a
/// `struct sockaddr_in6`, holding a `sockaddr_in` for IPv4.
pub const SOCKADDR_SIZE: usize = 28;

/// One end as a `sockaddr_in`/`sockaddr_in6` holds it: the family, the
/// port in host byte order, the address (4 bytes used for IPv4). `None`
/// for any other family (an all-zero field: the record had no endpoint).
#[inline(always)]
pub fn sockaddr_endpoint(sa: &[u8; SOCKADDR_SIZE]) -> Option<(u16, u16, [u8; 16])> {
    let family = u16::from_ne_bytes([sa[0], sa[1]]);
    let port = u16::from_be_bytes([sa[2], sa[3]]);
    let mut addr = [0u8; 16];
    match family {
        // sockaddr_in: sin_addr right after the port.
        AF_INET => addr[..4].copy_from_slice(&sa[4..8]),
        // sockaddr_in6: sin6_flowinfo, then sin6_addr.
        AF_INET6 => addr.copy_from_slice(&sa[8..24]),
        _ => return None,
    }
    Some((family, port, addr))
}

/// Where the fields of one tracepoint's record sit, read from its tracefs
/// `format` file by userspace (the layout is the kernel's, not ours).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StateTpLayout {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// 1 when this layout is exactly [`SetStateRecord`]'s, so the program
    /// may copy the record in one read instead of field by field.
    pub standard: u16,
}

/// The `sock:inet_sock_set_state` record as Linux has laid it out since
/// 4.16. Used only when tracefs confirms the running kernel's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetStateRecord {
    pub common: u64,
    pub skaddr: u64,
    pub oldstate: i32,
    pub newstate: i32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub saddr_v6: [u8; 16],
    pub daddr_v6: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<SetStateRecord>() == 72);

impl StateTpLayout {
    /// The layout of [`SetStateRecord`].
    pub const STANDARD: StateTpLayout = StateTpLayout {
        skaddr: 8,
        oldstate: 16,
        newstate: 20,
        sport: 24,
        dport: 26,
        family: 28,
        protocol: 30,
        saddr: 32,
        daddr: 36,
        saddr_v6: 40,
        daddr_v6: 56,
        standard: 1,
    };
}

/// Byte offsets of socket fields, from the running kernel's BTF.
/// [`OFFSET_UNKNOWN`] where BTF did not have the field.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOffsets {
    /// `struct sock`: `sk_shutdown` (u8) and `sk_err` (int).
    pub sk_shutdown: u32,
    pub sk_err: u32,
    /// `struct tcp_sock`: u64 byte counters, u32 counters.
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub srtt_us: u32,
    pub total_retrans: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    /// `struct inet_connection_sock`: `icsk_ack.pending` (u8).
    pub icsk_ack_pending: u32,
    /// `struct sock`: `__sk_common.skc_net` (a `struct net *`), and
    /// `struct net`: `ns.inum` (u32).
    pub skc_net: u32,
    pub net_ns_inum: u32,
    /// `struct tcp_sock`: `rcv_nxt` (u32).
    pub rcv_nxt: u32,
}

impl SockOffsets {
    pub const UNKNOWN: SockOffsets = SockOffsets {
        sk_shutdown: OFFSET_UNKNOWN,
        sk_err: OFFSET_UNKNOWN,
        bytes_acked: OFFSET_UNKNOWN,
        bytes_received: OFFSET_UNKNOWN,
        srtt_us: OFFSET_UNKNOWN,
        total_retrans: OFFSET_UNKNOWN,
        segs_in: OFFSET_UNKNOWN,
        segs_out: OFFSET_UNKNOWN,
        icsk_ack_pending: OFFSET_UNKNOWN,
        skc_net: OFFSET_UNKNOWN,
        net_ns_inum: OFFSET_UNKNOWN,
        rcv_nxt: OFFSET_UNKNOWN,
    };
}

/// Byte offsets from a `struct sock *` of what the `sock:inet_sock_set_state`
/// record holds, for the BTF tracepoint program: it gets the socket pointer
/// itself, not a record the kernel built, and reads the same fields the
/// record is built from (`inet_sport`, not `skc_num`, which the kernel
/// clears at CLOSE before the tracepoint fires). From the running kernel's
/// BTF; when any of the IPv4 ones is missing ([`OFFSET_UNKNOWN`]) the
/// classic tracepoint is used instead. A global of its own, apart from [`Config`]: the programs copy
/// a global onto their 512-byte stack to read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointOffsets {
    /// `sock_common`: `skc_daddr` (__be32), `skc_dport` (__be16),
    /// `skc_family` (u16).
    pub daddr: u32,
    pub dport: u32,
    pub family: u32,
    /// `inet_sock`: `inet_saddr` (__be32), `inet_sport` (__be16).
    pub saddr: u32,
    pub sport: u32,
    /// `sock`: `sk_protocol` (u16).
    pub protocol: u32,
    /// `skc_v6_daddr`, `skc_v6_rcv_saddr` (16 bytes each); unknown on a
    /// kernel without IPv6.
    pub v6_daddr: u32,
    pub v6_rcv_saddr: u32,
    /// 1 when `inet_saddr` and `inet_sport` sit as in [`InetSource`], so
    /// the program copies them in one go.
    pub standard: u32,
    /// `sock_common`: `skc_state` (u8), which every socket has, full or
    /// not: it tells which program reports a reset (see the kernel
    /// program's `tcp_send_reset`).
    pub state: u32,
}

impl EndpointOffsets {
    pub const UNKNOWN: EndpointOffsets = EndpointOffsets {
        daddr: OFFSET_UNKNOWN,
        dport: OFFSET_UNKNOWN,
        family: OFFSET_UNKNOWN,
        saddr: OFFSET_UNKNOWN,
        sport: OFFSET_UNKNOWN,
        protocol: OFFSET_UNKNOWN,
        v6_daddr: OFFSET_UNKNOWN,
        v6_rcv_saddr: OFFSET_UNKNOWN,
        standard: 0,
        state: OFFSET_UNKNOWN,
    };

    /// Whether the BTF tracepoint program can read a socket's endpoints.
    pub fn usable(&self) -> bool {
        [
            self.daddr,
            self.dport,
            self.family,
            self.saddr,
            self.sport,
            self.protocol,
        ]
        .iter()
        .all(|&o| o != OFFSET_UNKNOWN)
    }

    /// Whether `inet_saddr` and `inet_sport` sit as in [`InetSource`].
    pub fn is_standard(&self) -> bool {
        self.saddr != OFFSET_UNKNOWN && self.sport == self.saddr.wrapping_add(6)
    }
}

/// `inet_saddr`, `uc_ttl` and `inet_sport` of `struct inet_sock`, as they
/// have sat together since 2.6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InetSource {
    pub saddr: [u8; 4],
    pub uc_ttl: i16,
    /// Network byte order.
    pub sport: u16,
}

const _: () = assert!(core::mem::size_of::<InetSource>() == 8);
const _: () = assert!(core::mem::size_of::<EndpointOffsets>() == 40);

/// Everything userspace tells the program before loading it, as one global.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Wake the reader only once this many bytes wait in the ring buffer
    /// (0: wake on every record). Userspace also polls on a timer, so a
    /// quiet stream is still delivered promptly.
    pub wakeup_bytes: u64,
    pub state_tp: StateTpLayout,
    /// Offset of `skaddr` in the tcp_retransmit_skb, tcp_send_reset and
    /// tcp_receive_reset records.
    pub retransmit_skaddr: u16,
    pub send_reset_skaddr: u16,
    pub receive_reset_skaddr: u16,
    /// Offset of `err` in the tcp_retransmit_skb record, or
    /// [`NO_FIELD`] on kernels whose record has none: a retransmission
    /// that failed (err != 0) put nothing on the wire and is not counted.
    pub retransmit_err: u16,
    /// Offsets in the tcp_send_reset record of `state`, `reason` (6.10
    /// and later) and the `saddr`/`daddr` sockaddrs (`struct
    /// sockaddr_in6`-sized, from the socket or, with none, from the
    /// segment answered); [`NO_FIELD`] where the record has none.
    pub send_reset_state: u16,
    pub send_reset_reason: u16,
    pub send_reset_saddr: u16,
    pub send_reset_daddr: u16,
    pub sock: SockOffsets,
}

const _: () = assert!(core::mem::size_of::<Config>() == 96);

impl Config {
    pub const DEFAULT: Config = Config {
        wakeup_bytes: 0,
        state_tp: StateTpLayout {
            skaddr: 0,
            oldstate: 0,
            newstate: 0,
            sport: 0,
            dport: 0,
            family: 0,
            protocol: 0,
            saddr: 0,
            daddr: 0,
            saddr_v6: 0,
            daddr_v6: 0,
            standard: 0,
        },
        retransmit_skaddr: 0,
        send_reset_skaddr: 0,
        receive_reset_skaddr: 0,
        retransmit_err: NO_FIELD,
        send_reset_state: NO_FIELD,
        send_reset_reason: NO_FIELD,
        send_reset_saddr: NO_FIELD,
        send_reset_daddr: NO_FIELD,
        sock: SockOffsets::UNKNOWN,
    };
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-integer #[repr(C)] structs with explicit padding: every
    // bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::EndpointOffsets {}
    unsafe impl aya::Pod for super::SockRecord {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddrs_as_the_reset_record_holds_them() {
        let mut v4 = [0u8; SOCKADDR_SIZE];
        v4[..2].copy_from_slice(&AF_INET.to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        let (family, port, addr) = sockaddr_endpoint(&v4).unwrap();
        assert_eq!((family, port), (AF_INET, 8080));
        assert_eq!(addr[..4], [127, 0, 0, 1]);
        assert_eq!(addr[4..], [0; 12]);

        let mut v6 = [0u8; SOCKADDR_SIZE];
        v6[..2].copy_from_slice(&AF_INET6.to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        v6[4..8].copy_from_slice(&[0xff; 4]); // flowinfo, not the address
        v6[23] = 1; // ::1
        let (family, port, addr) = sockaddr_endpoint(&v6).unwrap();
        assert_eq!((family, port), (AF_INET6, 443));
        assert_eq!(addr, core::net::Ipv6Addr::LOCALHOST.octets());

        assert_eq!(sockaddr_endpoint(&[0; SOCKADDR_SIZE]), None);
    }
}
