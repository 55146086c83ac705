//! The kernel side of tcpwatch: tracepoint programs that copy TCP state
//! transitions (and the retransmits and resets that explain them) into one
//! ring buffer, counting every record the buffer had no room for.
//!
//! Each hook has two programs, of which userspace loads one: a BTF
//! tracepoint (`tp_btf`), called with the tracepoint's arguments directly
//! (no trace record is built first) and skipped by the kernel only when
//! that same program is already running on the CPU; and the classic
//! tracepoint, for kernels where the BTF one cannot load, which reads the
//! record the kernel built and is skipped whenever any tracing program runs
//! on the CPU. Both write the same [`Event`].
//!
//! Field offsets are not compiled in: userspace reads the tracepoint layouts
//! from tracefs and the socket layouts from the kernel's BTF and hands them
//! over in [`CONFIG`] before loading. (Rust eBPF under aya has no CO-RE
//! relocations yet; this layer can go when it does.)
//!
//! Diagnostics go through aya-log, only off the hot path (a socket field
//! that could not be read), and only with `--kernel-log`: userspace leaves
//! aya-log's level at 0 otherwise, a constant the verifier sees, so the
//! logging code is pruned at load.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SK_STORAGE_GET_F_CREATE,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_comm as bpf_get_current_comm_into,
            bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_sk_storage_get,
        },
    },
    macros::{btf_map, btf_tracepoint, map, tracepoint},
    maps::{Array, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
    EbpfContext, Global,
};
use aya_log_ebpf::warn;
use tcpwatch_common::{
    kind, sockaddr_endpoint, valid, Config, EndpointOffsets, Event, InetSource, SetStateRecord,
    SockOffsets, SockRecord, AF_INET, AF_INET6, IPPROTO_TCP, LOST_SLOT, NO_FIELD, NO_OWNER_STEP,
    OFFSET_UNKNOWN, RECORD_STEPS, SOCKADDR_SIZE,
};

/// Default ring size; userspace resizes it from `--ring-size` before loading.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Records the ring buffer had no room for, per CPU.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config::DEFAULT);

/// Accepted sockets no process has used yet: their owner is whoever first
/// sends or receives on them (a pre-fork server's worker, not the process
/// that created the listener). Per-socket records keep this in the
/// socket's record instead. Direct-mapped by a hash of the socket's
/// address ([`awaiting_slot`]), each slot holding one address (0: none):
/// an array lookup the verifier inlines, with no lock and nothing to
/// allocate, where a hash map took a bucket lock on every accept and close.
/// Set at LISTEN->SYN_RECV, emptied by the first use or by the socket's
/// CLOSE (every full socket passes CLOSE before it is freed). Two sockets
/// waiting at once in one slot lose one of them its attribution: the
/// newer overwrites the older, whose first use then makes no record (its
/// owner stays the listener's). A slot whose socket was never seen to
/// close could name a later socket at the same address; its first use
/// then still names the task sending or receiving on that very socket.
#[map]
static AWAITING_OWNER: Array<u64> = Array::with_max_entries(AWAITING_SLOTS, 0);

/// Slots of [`AWAITING_OWNER`]: a power of two.
const AWAITING_SLOTS: u32 = 1 << 16;

/// One scratch word per CPU: see [`sk_addr`].
#[map]
static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Records written on this CPU since the ring's fill was last asked (see
/// [`wake_flags`]).
#[map]
static WAKE_TICK: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Ask the ring how full it is only on every this many records per CPU
/// (1: on every record). Userspace sets it from the wakeup threshold, the
/// ring size and the CPU count, so that what the CPUs write between two
/// asks stays well under the threshold.
#[unsafe(no_mangle)]
static WAKE_EVERY: Global<u32> = Global::new(1);

/// Entry 0 is 1 once userspace has attached [`tcp_send_reset_btf`]: the
/// classic [`tcp_send_reset`] then leaves it the resets of full sockets
/// (see [`reset_by_btf`]). Set before the classic program is attached, so
/// no reset is reported by both.
#[map]
static SEND_RESET_BTF: Array<u32> = Array::with_max_entries(1, 0);

/// Each socket's [`SockRecord`], in the socket's own storage: freed with
/// the socket, so nothing here needs evicting. Used only by the BTF
/// programs, and only when userspace set [`PER_SOCKET`].
#[btf_map]
static SOCKETS: SkStorage<SockRecord> = SkStorage::new();

/// 1: the BTF set-state program keeps each socket's transitions in
/// [`SOCKETS`] and sends them as one [`SockRecord`] at ESTABLISHED, LISTEN
/// and CLOSE (asked for with `TCPWATCH_PER_SOCKET`, in any mode but
/// `trace`); 0: one [`Event`] per transition, reserved in place (the
/// default: it costs the kernel less than creating socket storage for
/// every socket). A constant the verifier sees, so the path not taken is
/// pruned at load (a kernel whose tracing programs may not use socket
/// storage never meets the helper when it is 0).
#[unsafe(no_mangle)]
static PER_SOCKET: Global<u32> = Global::new(0);

/// Where the BTF set-state program finds a socket's endpoints.
#[unsafe(no_mangle)]
static ENDPOINTS: Global<EndpointOffsets> = Global::new(EndpointOffsets::UNKNOWN);

/// One of [`CONFIG`]'s socket offsets, read in place (see
/// [`endpoint_offset!`]): for a direct load from a BTF tracepoint's socket.
macro_rules! sock_offset {
    ($f:ident) => {
        // SAFETY: as in endpoint_offset!.
        unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!(
                (*core::ptr::from_ref(&CONFIG).cast::<Config>()).sock.$f
            ))
        }
    };
}

/// One of [`ENDPOINTS`]' offsets, read in place where it is used: the
/// verifier sees the constant it is (in a copy spilled to the stack and
/// read back in a called function it sees an unknown number, and refuses
/// a direct load at that offset).
macro_rules! endpoint_offset {
    ($f:ident) => {
        // SAFETY: Global is a transparent wrapper of its value; a volatile
        // read so the compiler does not take the initial value for it.
        unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!(
                (*core::ptr::from_ref(&ENDPOINTS).cast::<EndpointOffsets>()).$f
            ))
        }
    };
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_set_state(&ctx);
    0
}

/// Does nothing: attached alone by `cargo xtask bench` to measure what the
/// hook itself costs, the floor every tracer on this tracepoint pays.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn bench_floor(_ctx: TracePointContext) -> u32 {
    0
}

/// `sock_recv_length` and `sock_send_length` fire in process context on
/// every receive and send of every socket; only a socket in
/// [`AWAITING_OWNER`] makes a record. BTF tracepoints: their recursion
/// check is per program, so running on every send and receive never makes
/// the kernel skip `inet_sock_set_state` in a softirq that lands meanwhile
/// (classic tracepoint programs share one per-CPU guard).
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    first_use(&ctx);
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> i32 {
    first_use(&ctx);
    0
}

/// Any socket not waiting for its owner (not TCP, not accepted while
/// traced, or already used) costs one look: with per-socket records, at
/// the socket's storage list (which its own record makes short); else at
/// one inlined array lookup (a socket with storage finds it faster than
/// the array's slot, which is seldom in cache).
#[inline(always)]
fn first_use(ctx: &BtfTracePointContext) {
    // The tracepoint's first argument: the socket.
    let sk: u64 = ctx.arg(0);
    if PER_SOCKET.load() != 0 {
        match socket_record(sk, false) {
            Some(r) if r.awaiting_owner != 0 => r.awaiting_owner = 0,
            _ => return,
        }
    } else {
        let Some(addr) = sk_addr(sk) else {
            return;
        };
        let Some(slot) = awaiting_slot(addr) else {
            return;
        };
        // SAFETY: a value of the array, alive while the program runs.
        unsafe {
            if *slot != addr {
                return;
            }
            *slot = 0;
        }
    }
    let mut fields = SockFields::default();
    if let Some(inum) = netns_btf(sk) {
        fields.put(valid::NETNS, inum.into());
    }
    let head = Head {
        kind: kind::FIRST_USE,
        sk,
        old: 0,
        new: 0,
        owner: true,
    };
    write_event(&head, None, &fields);
}

/// A BTF tracepoint's socket argument as a number: the verifier takes it
/// for a pointer, which may not be hashed or compared with numbers, and
/// a word of map memory it was stored in reads back as a number.
#[inline(always)]
fn sk_addr(sk: u64) -> Option<u64> {
    let p = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's value of the array, alive while the program runs
    // (which no other program on this CPU interrupts between the two).
    unsafe {
        core::ptr::write_volatile(p, sk);
        Some(core::ptr::read_volatile(p))
    }
}

/// The [`AWAITING_OWNER`] slot of the socket at `addr`.
#[inline(always)]
fn awaiting_slot(addr: u64) -> Option<*mut u64> {
    // Fibonacci hashing: sockets sit a slab object apart, and the high
    // bits of the product mix all of the address's.
    let i = (addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as u32 & (AWAITING_SLOTS - 1);
    AWAITING_OWNER.get_ptr_mut(i)
}

/// Marks an accepted socket as waiting for its owner, and forgets one
/// that closes.
#[inline(always)]
fn track_awaiting(addr: u64, old: u8, new: u8) {
    match (old, new) {
        // A new accepted socket: wait for the process that uses it.
        (LISTEN, SYN_RECV) => {
            if let Some(slot) = awaiting_slot(addr) {
                unsafe { *slot = addr };
            }
        }
        // Gone before any process used it (the slot is left alone if
        // another socket holds it).
        (_, CLOSE) => {
            if let Some(slot) = awaiting_slot(addr) {
                unsafe {
                    if *slot == addr {
                        *slot = 0;
                    }
                }
            }
        }
        _ => {}
    }
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let (old, new) = (ctx.arg::<i32>(1) as u8, ctx.arg::<i32>(2) as u8);
    if PER_SOCKET.load() == 0 {
        if matches!((old, new), (LISTEN, SYN_RECV) | (_, CLOSE)) {
            if let Some(addr) = sk_addr(sk) {
                track_awaiting(addr, old, new);
            }
        }
        let _ = try_set_state_btf(&ctx, sk, old, new);
    } else if try_set_state_record(&ctx, sk, old, new) == Err(NO_STORAGE) {
        // Without storage for the socket, this transition goes on its own
        // (none of its steps wait: its storage would have been found).
        let _ = try_set_state_btf(&ctx, sk, old, new);
    }
    0
}

/// [`try_set_state_record`] could not have the socket's storage.
const NO_STORAGE: i32 = -2;

/// `tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb
/// [, int err])`: `err` where the classic record has it.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_btf(ctx: BtfTracePointContext) -> i32 {
    let cfg = CONFIG.load();
    if cfg.retransmit_err != NO_FIELD {
        let err: i32 = ctx.arg(2);
        if err != 0 {
            return 0;
        }
    }
    send_pending(ctx.arg(0));
    let _ = try_socket_event(&ctx, &cfg, ctx.arg(0), kind::RETRANSMIT);
    0
}

/// `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb[,
/// const enum sk_rst_reason reason])`: the resets of full sockets, after
/// their pending record (so a per-socket record's steps reach userspace
/// before the reset that ends them). The reason is argument 2 where the
/// classic record has one (6.10); the sender's state and endpoints are
/// the socket's. Resets with no socket, or with a timewait or request
/// socket (no `inet_sock` fields to read), are the classic program's.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if reset_by_btf(sk) {
        send_pending(sk);
        let _ = try_send_reset_btf(&ctx, sk);
    }
    0
}

#[inline(never)]
fn try_send_reset_btf(ctx: &BtfTracePointContext, sk: u64) -> Result<(), i32> {
    let cfg = CONFIG.load();
    let mut ev = Event::zeroed();
    ev.kind = kind::SEND_RESET;
    ev.skaddr = sk;
    ev.newstate = read_sk(sk, endpoint_offset!(state))?;
    if cfg.send_reset_reason != NO_FIELD {
        let reason: u64 = ctx.arg(2);
        ev.reset_reason = reason.min(u64::from(u8::MAX)) as u8;
        ev.valid |= valid::RESET_REASON;
    }
    if let Ok(ends) = read_endpoints(sk) {
        ends.put(&mut ev);
    }
    fill_task(&mut ev, false);
    let failed = fill_socket(&mut ev, &cfg, read::NETNS);
    emit(&ev, &cfg);
    report_failed_read(ctx, sk, failed);
    Ok(())
}

/// Whether [`tcp_send_reset_btf`] reports the reset `sk` sends: a full
/// socket's (not one in TIME_WAIT or NEW_SYN_RECV, which are smaller
/// structures). Both programs ask, reading the same state, so each reset
/// is reported by exactly one of them while both are attached.
#[inline(always)]
fn reset_by_btf(sk: u64) -> bool {
    if sk == 0 {
        return false;
    }
    match read_sk::<u8>(sk, endpoint_offset!(state)) {
        Ok(state) => state != TIME_WAIT && state != NEW_SYN_RECV,
        Err(_) => false,
    }
}

/// `tcp_receive_reset(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_btf(ctx: BtfTracePointContext) -> i32 {
    let cfg = CONFIG.load();
    send_pending(ctx.arg(0));
    let _ = try_socket_event(&ctx, &cfg, ctx.arg(0), kind::RECEIVE_RESET);
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let cfg = CONFIG.load();
    // A retransmission that failed (no route, no memory) sent nothing.
    if cfg.retransmit_err != NO_FIELD {
        if let Ok(err) = unsafe { ctx.read_at::<i32>(cfg.retransmit_err.into()) } {
            if err != 0 {
                return 0;
            }
        }
    }
    let _ = classic_socket_event(&ctx, &cfg, cfg.retransmit_skaddr, kind::RETRANSMIT);
    0
}

/// Every reset sent where [`tcp_send_reset_btf`] is not attached; beside
/// it, those it leaves (no socket, or one that is not full). Its
/// record holds what the kernel worked out for the reset: the reason, the
/// sender's state, and the endpoints, from the socket, or from the segment
/// answered where there is no full socket (a SYN to a closed port has
/// none: `skaddr` is 0; a timewait or request socket has none of the full
/// socket's fields). A BTF program would have to redo that from the
/// `sk_buff`'s headers, with its offsets from BTF, to see the same.
#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = try_send_reset(&ctx);
    0
}

fn try_send_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = CONFIG.load();
    let mut ev = Event::zeroed();
    ev.kind = kind::SEND_RESET;
    ev.skaddr = unsafe { ctx.read_at::<u64>(cfg.send_reset_skaddr.into())? };
    if SEND_RESET_BTF.get(0).copied() == Some(1) && reset_by_btf(ev.skaddr) {
        return Ok(());
    }
    if cfg.send_reset_state != NO_FIELD {
        ev.newstate = unsafe { ctx.read_at::<i32>(cfg.send_reset_state.into())? } as u8;
    }
    if cfg.send_reset_reason != NO_FIELD {
        let reason = unsafe { ctx.read_at::<u32>(cfg.send_reset_reason.into())? };
        ev.reset_reason = reason.min(u32::from(u8::MAX)) as u8;
        ev.valid |= valid::RESET_REASON;
    }
    if cfg.send_reset_saddr != NO_FIELD && cfg.send_reset_daddr != NO_FIELD {
        let s: [u8; SOCKADDR_SIZE] = unsafe { ctx.read_at(cfg.send_reset_saddr.into())? };
        let d: [u8; SOCKADDR_SIZE] = unsafe { ctx.read_at(cfg.send_reset_daddr.into())? };
        if let (Some((family, sport, saddr)), Some((_, dport, daddr))) =
            (sockaddr_endpoint(&s), sockaddr_endpoint(&d))
        {
            ev.family = family;
            ev.sport = sport;
            ev.dport = dport;
            ev.saddr = saddr;
            ev.daddr = daddr;
        }
    }
    fill_task(&mut ev, false);
    let failed = match ev.skaddr {
        // No socket to read the namespace from.
        0 => FailedRead {
            offset: OFFSET_UNKNOWN,
        },
        _ => fill_socket(&mut ev, &cfg, 0),
    };
    emit(&ev, &cfg);
    report_failed_read(ctx, ev.skaddr, failed);
    Ok(())
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let cfg = CONFIG.load();
    let _ = classic_socket_event(&ctx, &cfg, cfg.receive_reset_skaddr, kind::RECEIVE_RESET);
    0
}

/// The classic tcp tracepoints give the socket as a field of their record.
fn classic_socket_event(
    ctx: &TracePointContext,
    cfg: &Config,
    skaddr_offset: u16,
    event_kind: u8,
) -> Result<(), i32> {
    let skaddr = unsafe { ctx.read_at::<u64>(skaddr_offset.into())? };
    try_socket_event(ctx, cfg, skaddr, event_kind)
}

/// The BTF program reads what the classic record holds from the socket:
/// endpoints from `struct sock_common`, in one copy where its layout is
/// the usual one. Everything is read first, then the record is reserved in
/// the ring and each of its fields written once (no zeroed copy on the
/// stack, no copy into the ring). A call of its own, as is the per-socket
/// path: each keeps its own frame within the 512-byte stack.
#[inline(never)]
fn try_set_state_btf<C: EbpfContext>(ctx: &C, sk: u64, old: u8, new: u8) -> Result<(), i32> {
    let protocol: u16 = load_sk(sk, endpoint_offset!(protocol))?;
    // The tracepoint also fires for SCTP (and, before 6.16, DCCP) sockets.
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let ends = read_endpoints(sk)?;
    let mut fields = SockFields::default();
    let reads = reads_for(old, new);
    let failed = if reads != 0 {
        read_socket(sk, &config_sock(), reads, &mut fields)
    } else {
        FailedRead {
            offset: OFFSET_UNKNOWN,
        }
    };
    if let Some(inum) = netns_btf(sk) {
        fields.put(valid::NETNS, inum.into());
    }
    let head = Head {
        kind: kind::STATE,
        sk,
        old,
        new,
        owner: owner_transition(old, new),
    };
    write_event(&head, Some(&ends), &fields);
    report_failed_read(ctx, sk, failed);
    Ok(())
}

/// The socket fields one record carries, as [`Event`] names them: read
/// before the record is reserved, written into it once.
#[derive(Default)]
struct SockFields {
    bytes_acked: u64,
    bytes_received: u64,
    srtt_us: u32,
    total_retrans: u32,
    segs_in: u32,
    segs_out: u32,
    sk_err: i32,
    netns: u32,
    rcv_nxt: u32,
    valid: u16,
    sk_shutdown: u8,
    ack_pending: u8,
}

/// What an in-place record says of itself.
struct Head {
    kind: u8,
    sk: u64,
    old: u8,
    new: u8,
    /// The current task is the socket's user: its comm and cgroup go in.
    owner: bool,
}

/// Reserves an [`Event`] in the ring and writes every byte of it once:
/// ring memory is not zeroed, so a byte left unwritten would show what an
/// older record held there. Volatile stores, one per field, so that the
/// compiler neither merges the zeroes into a `memset` call nor builds the
/// record on the stack first. A full ring counts the record as lost.
#[inline(always)]
fn write_event(head: &Head, ends: Option<&Endpoints>, f: &SockFields) {
    use core::ptr::{addr_of_mut, write_volatile as put};
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost(1);
        return;
    };
    let p = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `p` is the reserved record, Event::SIZE bytes; the arrays are
    // written as words, which their offsets (8-byte aligned in an 8-byte
    // aligned record) allow.
    unsafe {
        put(addr_of_mut!((*p).ts_ns), bpf_ktime_get_ns());
        put(addr_of_mut!((*p).skaddr), head.sk);
        put(addr_of_mut!((*p).bytes_acked), f.bytes_acked);
        put(addr_of_mut!((*p).bytes_received), f.bytes_received);
        let (saddr, daddr) = (
            addr_of_mut!((*p).saddr).cast::<u32>(),
            addr_of_mut!((*p).daddr).cast::<u32>(),
        );
        for i in 0..4 {
            let (s, d) = ends.map_or((0, 0), |e| (e.saddr[i], e.daddr[i]));
            put(saddr.add(i), s);
            put(daddr.add(i), d);
        }
        let comm = addr_of_mut!((*p).comm).cast::<u64>();
        if head.owner {
            put(addr_of_mut!((*p).cgroup_id), bpf_get_current_cgroup_id());
            if bpf_get_current_comm_into(comm.cast(), 16) != 0 {
                put(comm, 0);
                put(comm.add(1), 0);
            }
        } else {
            put(addr_of_mut!((*p).cgroup_id), 0);
            put(comm, 0);
            put(comm.add(1), 0);
        }
        put(addr_of_mut!((*p).pid), (pid_tgid >> 32) as u32);
        put(addr_of_mut!((*p).tid), pid_tgid as u32);
        put(addr_of_mut!((*p).cpu), bpf_get_smp_processor_id());
        put(addr_of_mut!((*p).srtt_us), f.srtt_us);
        put(addr_of_mut!((*p).total_retrans), f.total_retrans);
        put(addr_of_mut!((*p).segs_in), f.segs_in);
        put(addr_of_mut!((*p).segs_out), f.segs_out);
        put(addr_of_mut!((*p).sk_err), f.sk_err);
        put(addr_of_mut!((*p).netns), f.netns);
        put(addr_of_mut!((*p).rcv_nxt), f.rcv_nxt);
        let (sport, dport, family) = match ends {
            Some(e) => (e.sport, e.dport, e.family),
            None => (0, 0, 0),
        };
        put(addr_of_mut!((*p).sport), sport);
        put(addr_of_mut!((*p).dport), dport);
        put(addr_of_mut!((*p).family), family);
        put(addr_of_mut!((*p).valid), f.valid);
        put(addr_of_mut!((*p).kind), head.kind);
        put(addr_of_mut!((*p).oldstate), head.old);
        put(addr_of_mut!((*p).newstate), head.new);
        put(addr_of_mut!((*p).sk_shutdown), f.sk_shutdown);
        put(addr_of_mut!((*p).ack_pending), f.ack_pending);
        put(addr_of_mut!((*p).reset_reason), 0);
        put(addr_of_mut!((*p)._pad).cast::<u16>(), 0);
    }
    entry.submit(wake_flags(config_wakeup_bytes(), Event::SIZE));
}

/// The inode of the socket's network namespace, by two direct loads: a
/// BTF tracepoint's socket is a pointer the verifier knows the type of,
/// and so is `skc_net` read from it (the offsets are constants it reads
/// from the frozen [`CONFIG`]); each load is fault-tolerant, with no
/// helper call. Only for the BTF programs' own socket argument.
#[inline(always)]
fn netns_btf(sk: u64) -> Option<u32> {
    let inum = sock_offset!(net_ns_inum);
    if inum == OFFSET_UNKNOWN {
        return None;
    }
    let net: u64 = load_sk(sk, sock_offset!(skc_net)).ok()?;
    if net == 0 {
        return None;
    }
    // SAFETY: as in load_sk.
    Some(unsafe { core::ptr::read_volatile((net + u64::from(inum)) as *const u32) })
}

/// A socket's endpoints as the set-state record shows them (ports in host
/// byte order).
/// Addresses as 4-byte words in memory order (the bytes of the record's
/// `saddr`/`daddr`), so that they are written as words.
struct Endpoints {
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
    family: u16,
}

impl Endpoints {
    #[inline(always)]
    fn put(&self, ev: &mut Event) {
        ev.saddr = bytes16(&self.saddr);
        ev.daddr = bytes16(&self.daddr);
        ev.sport = self.sport;
        ev.dport = self.dport;
        ev.family = self.family;
    }
}

#[inline(always)]
fn bytes16(words: &[u32; 4]) -> [u8; 16] {
    let mut b = [0; 16];
    for i in 0..4 {
        b[i * 4..i * 4 + 4].copy_from_slice(&words[i].to_ne_bytes());
    }
    b
}

#[inline(always)]
fn read_endpoints(sk: u64) -> Result<Endpoints, i32> {
    let mut ends = Endpoints {
        saddr: [0; 4],
        daddr: [0; 4],
        sport: 0,
        dport: 0,
        family: 0,
    };
    // inet_sock's fields lie past struct sock, where the verifier allows
    // no direct load: copied, in one go where they sit together.
    let (sport, saddr) = if endpoint_offset!(standard) == 1 {
        let source: InetSource = read_sk(sk, endpoint_offset!(saddr))?;
        (source.sport, source.saddr)
    } else {
        (
            read_sk(sk, endpoint_offset!(sport))?,
            read_sk(sk, endpoint_offset!(saddr))?,
        )
    };
    ends.sport = u16::from_be(sport);
    ends.dport = u16::from_be(load_sk(sk, endpoint_offset!(dport))?);
    ends.family = load_sk(sk, endpoint_offset!(family))?;
    if ends.family == AF_INET6 {
        if let (Ok(s), Ok(d)) = (
            load_sk::<[u32; 4]>(sk, endpoint_offset!(v6_rcv_saddr)),
            load_sk::<[u32; 4]>(sk, endpoint_offset!(v6_daddr)),
        ) {
            ends.saddr = s;
            ends.daddr = d;
        }
    } else {
        ends.saddr[0] = u32::from_ne_bytes(saddr);
        ends.daddr[0] = load_sk(sk, endpoint_offset!(daddr))?;
    }
    Ok(ends)
}

/// The socket's [`SockRecord`]; with `create`, made (zeroed) if it has
/// none. `None` for a socket that is not a full one, when storage cannot
/// be had, or (without `create`) when it has none.
#[inline(always)]
fn socket_record(sk: u64, create: bool) -> Option<&'static mut SockRecord> {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: the helper checks the socket and the map; it returns a
    // pointer to this socket's value, or null.
    let p = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCKETS).cast_mut().cast(),
            sk as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            flags,
        )
    }
    .cast::<SockRecord>();
    // SAFETY: null or a valid value of the map, alive while the program runs.
    unsafe { p.as_mut() }
}

/// The per-socket set-state path: the transition becomes a step of the
/// socket's record, sent when the socket opens, listens or closes (or the
/// steps are full, or the task of a second process-context step would
/// overwrite the first's). Offsets are read from the globals field by
/// field: this path has no room for a copy of [`Config`] on its stack.
#[inline(never)]
fn try_set_state_record<C: EbpfContext>(ctx: &C, sk: u64, old: u8, new: u8) -> Result<(), i32> {
    let protocol: u16 = load_sk(sk, endpoint_offset!(protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let Some(r) = socket_record(sk, true) else {
        return Err(NO_STORAGE);
    };
    if r.kind != kind::SOCKET_RECORD {
        r.kind = kind::SOCKET_RECORD;
        r.skaddr = sk;
        r.owner_step = NO_OWNER_STEP;
    }
    let owner = owner_transition(old, new);
    if usize::from(r.steps) >= RECORD_STEPS || (owner && r.owner_step != NO_OWNER_STEP) {
        send_record(sk, r);
    }
    let i = usize::from(r.steps);
    let sock = config_sock();
    let reads = reads_for(old, new);
    let mut fields = StepFields {
        a: 0,
        b: 0,
        valid: 0,
    };
    let failed = if new == CLOSE {
        r.valid = 0;
        r.awaiting_owner = 0;
        read_socket(sk, &sock, reads, r)
    } else {
        if (old, new) == (LISTEN, SYN_RECV) {
            r.awaiting_owner = 1;
        }
        read_socket(sk, &sock, reads, &mut fields)
    };
    if owner {
        r.owner_step = i as u8;
        r.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        // Straight into the record: no copy through the stack.
        if unsafe { bpf_get_current_comm_into(r.comm.as_mut_ptr().cast(), 16) } != 0 {
            r.comm = [0; 16];
        }
    }
    let Some(step) = r.step.get_mut(i) else {
        return Ok(());
    };
    step.ts_ns = unsafe { bpf_ktime_get_ns() };
    step.cpu = unsafe { bpf_get_smp_processor_id() };
    let pid_tgid = bpf_get_current_pid_tgid();
    step.pid = (pid_tgid >> 32) as u32;
    step.tid = pid_tgid as u32;
    step.oldstate = old;
    step.newstate = new;
    step.a = fields.a;
    step.b = fields.b;
    step.valid = fields.valid;
    r.steps = i as u8 + 1;
    if matches!(new, ESTABLISHED | LISTEN | CLOSE) {
        send_record(sk, r);
    }
    report_failed_read(ctx, sk, failed);
    Ok(())
}

/// The socket offsets of [`CONFIG`], without copying the rest of it.
#[inline(always)]
fn config_sock() -> SockOffsets {
    // SAFETY: Global is a transparent wrapper of its value; a volatile read
    // so the compiler does not take the initial value for the loaded one.
    unsafe {
        core::ptr::read_volatile(core::ptr::addr_of!(
            (*core::ptr::from_ref(&CONFIG).cast::<Config>()).sock
        ))
    }
}

/// [`Config::wakeup_bytes`], read in place.
#[inline(always)]
fn config_wakeup_bytes() -> u64 {
    // SAFETY: as in config_sock.
    unsafe {
        core::ptr::read_volatile(core::ptr::addr_of!(
            (*core::ptr::from_ref(&CONFIG).cast::<Config>()).wakeup_bytes
        ))
    }
}

/// Sends the socket's waiting steps, if it has a record with any: before
/// a retransmit, reset or first use is sent for it, so that userspace
/// meets the socket's transitions first.
#[inline(always)]
fn send_pending(sk: u64) {
    if PER_SOCKET.load() == 0 || sk == 0 {
        return;
    }
    if let Some(r) = socket_record(sk, false) {
        if r.steps != 0 {
            send_record(sk, r);
        }
    }
}

/// Sends the record's steps as one ring-buffer record (endpoints and
/// namespace read now: a connecting socket's port is chosen only after
/// SYN_SENT), and empties it. A record the ring had no room for counts
/// each of its transitions as lost.
#[inline(never)]
fn send_record(sk: u64, r: &mut SockRecord) {
    let n = usize::from(r.steps);
    if n == 0 || n > RECORD_STEPS {
        r.steps = 0;
        return;
    }
    if let Ok(ends) = read_endpoints(sk) {
        r.saddr = bytes16(&ends.saddr);
        r.daddr = bytes16(&ends.daddr);
        r.sport = ends.sport;
        r.dport = ends.dport;
        r.family = ends.family;
    }
    if let Some(inum) = netns_btf(sk) {
        r.put(valid::NETNS, inum.into());
    }
    let len = SockRecord::bytes_for(n);
    // SAFETY: SockRecord is plain integers, SIZE bytes long.
    let bytes = unsafe { &*(core::ptr::from_ref(r).cast::<[u8; SockRecord::SIZE]>()) };
    if let Some(bytes) = bytes.get(..len) {
        if EVENTS
            .output::<[u8]>(bytes, wake_flags(config_wakeup_bytes(), len))
            .is_err()
        {
            count_lost(n as u64);
        }
    }
    r.steps = 0;
    r.owner_step = NO_OWNER_STEP;
    r.valid = 0;
}

/// One field of the tracepoint's socket at a BTF offset, loaded directly:
/// the socket argument of a BTF tracepoint is a pointer the verifier knows
/// the type of, so it checks each load against `struct sock`'s BTF (the
/// offset is a constant it reads from the frozen [`ENDPOINTS`]) and makes
/// it a fault-tolerant load, with no helper call. An error when the offset
/// is unknown.
#[inline(always)]
fn load_sk<T: Copy>(sk: u64, offset: u32) -> Result<T, i32> {
    if offset == OFFSET_UNKNOWN {
        return Err(-1);
    }
    // SAFETY: see above; the kernel turns a faulting load into zeroes.
    Ok(unsafe { core::ptr::read_volatile((sk + u64::from(offset)) as *const T) })
}

/// One socket field at a BTF offset; an error when the offset is unknown
/// or the read fails.
#[inline(always)]
fn read_sk<T>(sk: u64, offset: u32) -> Result<T, i32> {
    if offset == OFFSET_UNKNOWN {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel((sk + u64::from(offset)) as *const T) }.map_err(|e| e as i32)
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let tp = CONFIG.load().state_tp;
    let mut ev = Event::zeroed();
    ev.kind = kind::STATE;
    if tp.standard == 1 {
        // The layout tracefs gave is the standard one: one read.
        let rec: SetStateRecord = unsafe { ctx.read_at(0)? };
        // The tracepoint also fires for DCCP and SCTP sockets.
        if rec.protocol != IPPROTO_TCP {
            return Ok(());
        }
        ev.skaddr = rec.skaddr;
        ev.oldstate = rec.oldstate as u8;
        ev.newstate = rec.newstate as u8;
        ev.sport = rec.sport;
        ev.dport = rec.dport;
        ev.family = rec.family;
        if ev.family == AF_INET {
            ev.saddr[..4].copy_from_slice(&rec.saddr);
            ev.daddr[..4].copy_from_slice(&rec.daddr);
        } else {
            ev.saddr = rec.saddr_v6;
            ev.daddr = rec.daddr_v6;
        }
    } else {
        let protocol: u16 = unsafe { ctx.read_at(tp.protocol.into())? };
        if protocol != IPPROTO_TCP {
            return Ok(());
        }
        ev.skaddr = unsafe { ctx.read_at::<u64>(tp.skaddr.into())? };
        ev.oldstate = unsafe { ctx.read_at::<i32>(tp.oldstate.into())? } as u8;
        ev.newstate = unsafe { ctx.read_at::<i32>(tp.newstate.into())? } as u8;
        ev.sport = unsafe { ctx.read_at::<u16>(tp.sport.into())? };
        ev.dport = unsafe { ctx.read_at::<u16>(tp.dport.into())? };
        ev.family = unsafe { ctx.read_at::<u16>(tp.family.into())? };
        if ev.family == AF_INET {
            let s: [u8; 4] = unsafe { ctx.read_at(tp.saddr.into())? };
            let d: [u8; 4] = unsafe { ctx.read_at(tp.daddr.into())? };
            ev.saddr[..4].copy_from_slice(&s);
            ev.daddr[..4].copy_from_slice(&d);
        } else if ev.family == AF_INET6 {
            ev.saddr = unsafe { ctx.read_at(tp.saddr_v6.into())? };
            ev.daddr = unsafe { ctx.read_at(tp.daddr_v6.into())? };
        }
    }
    set_state_common(ctx, &mut ev);
    Ok(())
}

/// What both set-state programs do once the record's fields are in `ev`.
/// (The configuration is loaded only here: a copy of it on the stack
/// next to the tracepoint's record would not fit in 512 bytes.)
#[inline(always)]
fn set_state_common<C: EbpfContext>(ctx: &C, ev: &mut Event) {
    let cfg = CONFIG.load();
    let (old, new) = (ev.oldstate, ev.newstate);
    track_awaiting(ev.skaddr, old, new);
    fill_task(ev, owner_transition(old, new));
    let failed = fill_socket(ev, &cfg, reads_for(old, new) | read::NETNS);
    emit(ev, &cfg);
    report_failed_read(ctx, ev.skaddr, failed);
}

// Kernel TCP state numbers.
const ESTABLISHED: u8 = 1;
const SYN_SENT: u8 = 2;
const SYN_RECV: u8 = 3;
const FIN_WAIT1: u8 = 4;
const FIN_WAIT2: u8 = 5;
const CLOSE: u8 = 7;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const LISTEN: u8 = 10;
const TIME_WAIT: u8 = 6;
const NEW_SYN_RECV: u8 = 12;

/// Transitions made in process context, where the current task is the
/// socket's user: only there are its comm and cgroup worth reading.
fn owner_transition(old: u8, new: u8) -> bool {
    matches!(
        (old, new),
        (CLOSE, SYN_SENT) | (CLOSE, LISTEN) | (ESTABLISHED, FIN_WAIT1) | (CLOSE_WAIT, LAST_ACK)
    )
}

/// Which socket fields a transition needs: each read costs, and most
/// transitions need none.
mod read {
    pub const FINAL: u16 = 1; // counters and sk_err, at CLOSE
    pub const SEGS_IN: u16 = 2;
    pub const SEGS_OUT: u16 = 4;
    pub const RCV_NXT: u16 = 8;
    pub const ACK_PENDING: u16 = 16;
    pub const SRTT: u16 = 32;
    pub const NETNS: u16 = 64;
    /// Every field but the namespace (which a per-socket record reads once,
    /// when it is sent).
    pub const ALL: u16 = 0xffff & !NETNS;
}

fn reads_for(old: u8, new: u8) -> u16 {
    match (old, new) {
        (_, CLOSE) => read::ALL,
        (FIN_WAIT1, FIN_WAIT2) => read::SEGS_IN | read::RCV_NXT,
        (ESTABLISHED, CLOSE_WAIT) => read::SEGS_OUT,
        (CLOSE_WAIT, LAST_ACK) => read::SEGS_OUT | read::ACK_PENDING,
        (SYN_RECV, ESTABLISHED) => read::SRTT,
        _ => 0,
    }
}

/// Retransmits and resets: only the socket matters, userspace already knows
/// its endpoints from its state transitions.
fn try_socket_event<C: EbpfContext>(
    ctx: &C,
    cfg: &Config,
    skaddr: u64,
    event_kind: u8,
) -> Result<(), i32> {
    if skaddr == 0 {
        return Ok(());
    }
    let mut ev = Event::zeroed();
    ev.kind = event_kind;
    ev.skaddr = skaddr;
    fill_task(&mut ev, false);
    let failed = fill_socket(&mut ev, cfg, read::NETNS);
    emit(&ev, cfg);
    report_failed_read(ctx, skaddr, failed);
    Ok(())
}

/// Time, CPU and current task; comm and cgroup only where the task is the
/// socket's user (`owner`), since userspace ignores them elsewhere.
fn fill_task(ev: &mut Event, owner: bool) {
    unsafe {
        ev.ts_ns = bpf_ktime_get_ns();
        ev.cpu = bpf_get_smp_processor_id();
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    ev.pid = (pid_tgid >> 32) as u32;
    ev.tid = pid_tgid as u32;
    if owner {
        ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        if let Ok(comm) = bpf_get_current_comm() {
            ev.comm = comm;
        }
    }
}

/// The offset of the last socket read that failed in one event (said with
/// `--kernel-log`); [`OFFSET_UNKNOWN`] when none did.
#[derive(Clone, Copy)]
struct FailedRead {
    offset: u32,
}

/// Reads one field of the socket at an offset from BTF; `None` (and the
/// field left unread) when BTF had no such field, or the read failed
/// (counted in `failed`).
#[inline(always)]
fn read_field<T>(sk: u64, offset: u32, failed: &mut FailedRead) -> Option<T> {
    if offset == OFFSET_UNKNOWN {
        return None;
    }
    match unsafe { bpf_probe_read_kernel((sk + u64::from(offset)) as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            failed.offset = offset;
            None
        }
    }
}

/// Says that a socket read failed: a call of its own, made once the event
/// is written (so the verifier meets it in few states), whose code it
/// prunes unless `--kernel-log` set aya-log's level.
#[inline(never)]
fn report_failed_read<C: EbpfContext>(ctx: &C, sk: u64, failed: FailedRead) {
    if failed.offset != OFFSET_UNKNOWN {
        // A BTF tracepoint's socket argument is a pointer to the verifier,
        // which forbids formatting one: copied, it is a number.
        let addr: u64 = unsafe { bpf_probe_read_kernel(&sk as *const u64) }.unwrap_or(0);
        warn!(
            ctx,
            "socket {:x}: reading its field at offset {} failed", addr, failed.offset
        );
    }
}

fn fill_socket(ev: &mut Event, cfg: &Config, reads: u16) -> FailedRead {
    read_socket(ev.skaddr, &cfg.sock, reads, ev)
}

/// Where the socket fields read at a transition go: an [`Event`], or a
/// socket's record (see [`StepFields`]).
trait Fields {
    /// Sets the field of [`valid`] bit `bit` to `v` and marks it valid.
    fn put(&mut self, bit: u16, v: u64);
}

/// [`Fields`] for a struct with the [`Event`] field names: an [`Event`],
/// and a [`SockRecord`], whose header holds its CLOSE step's fields.
macro_rules! fields_by_name {
    ($t:ty) => {
        impl Fields for $t {
            #[inline(always)]
            fn put(&mut self, bit: u16, v: u64) {
                match bit {
                    valid::SHUTDOWN => self.sk_shutdown = v as u8,
                    valid::SK_ERR => self.sk_err = v as i32,
                    valid::BYTES_ACKED => self.bytes_acked = v,
                    valid::BYTES_RECEIVED => self.bytes_received = v,
                    valid::TOTAL_RETRANS => self.total_retrans = v as u32,
                    valid::SRTT => self.srtt_us = v as u32,
                    valid::SEGS_IN => self.segs_in = v as u32,
                    valid::SEGS_OUT => self.segs_out = v as u32,
                    valid::RCV_NXT => self.rcv_nxt = v as u32,
                    valid::ACK_PENDING => self.ack_pending = v as u8,
                    valid::NETNS => self.netns = v as u32,
                    _ => return,
                }
                self.valid |= bit;
            }
        }
    };
}

fields_by_name!(Event);
fields_by_name!(SockRecord);
fields_by_name!(SockFields);

/// The fields of any other step: `a` and `b` as [`tcpwatch_common::Step`]
/// says.
struct StepFields {
    a: u32,
    b: u32,
    valid: u16,
}

impl Fields for StepFields {
    #[inline(always)]
    fn put(&mut self, bit: u16, v: u64) {
        match bit {
            valid::SEGS_IN | valid::SEGS_OUT | valid::SRTT => self.a = v as u32,
            valid::RCV_NXT | valid::ACK_PENDING => self.b = v as u32,
            _ => return,
        }
        self.valid |= bit;
    }
}

/// Reads the socket fields `reads` names into `out`.
#[inline(always)]
fn read_socket<F: Fields>(sk: u64, off: &SockOffsets, reads: u16, out: &mut F) -> FailedRead {
    let mut failed = FailedRead {
        offset: OFFSET_UNKNOWN,
    };
    if reads & read::FINAL != 0 {
        if let Some(v) = read_field::<u8>(sk, off.sk_shutdown, &mut failed) {
            out.put(valid::SHUTDOWN, v.into());
        }
        if let Some(v) = read_field::<i32>(sk, off.sk_err, &mut failed) {
            out.put(valid::SK_ERR, u64::from(v as u32));
        }
        if let Some(v) = read_field::<u64>(sk, off.bytes_acked, &mut failed) {
            out.put(valid::BYTES_ACKED, v);
        }
        if let Some(v) = read_field::<u64>(sk, off.bytes_received, &mut failed) {
            out.put(valid::BYTES_RECEIVED, v);
        }
        if let Some(v) = read_field::<u32>(sk, off.total_retrans, &mut failed) {
            out.put(valid::TOTAL_RETRANS, v.into());
        }
    }
    if reads & (read::FINAL | read::SRTT) != 0 {
        if let Some(v) = read_field::<u32>(sk, off.srtt_us, &mut failed) {
            out.put(valid::SRTT, (v >> 3).into());
        }
    }
    if reads & read::SEGS_IN != 0 {
        if let Some(v) = read_field::<u32>(sk, off.segs_in, &mut failed) {
            out.put(valid::SEGS_IN, v.into());
        }
    }
    if reads & read::SEGS_OUT != 0 {
        if let Some(v) = read_field::<u32>(sk, off.segs_out, &mut failed) {
            out.put(valid::SEGS_OUT, v.into());
        }
    }
    if reads & read::RCV_NXT != 0 {
        if let Some(v) = read_field::<u32>(sk, off.rcv_nxt, &mut failed) {
            out.put(valid::RCV_NXT, v.into());
        }
    }
    if reads & read::ACK_PENDING != 0 {
        if let Some(v) = read_field::<u8>(sk, off.icsk_ack_pending, &mut failed) {
            out.put(valid::ACK_PENDING, v.into());
        }
    }
    // The namespace on every event: it tells sockets of different
    // namespaces apart, and matches sockets older than the trace.
    if reads & read::NETNS != 0 {
        if let Some(inum) = read_netns(sk, off, &mut failed) {
            out.put(valid::NETNS, inum.into());
        }
    }
    failed
}

/// The inode of the socket's network namespace.
#[inline(always)]
fn read_netns(sk: u64, off: &SockOffsets, failed: &mut FailedRead) -> Option<u32> {
    if off.net_ns_inum == OFFSET_UNKNOWN {
        return None;
    }
    let net = read_field::<u64>(sk, off.skc_net, failed)?;
    if net == 0 {
        return None;
    }
    read_field::<u32>(net, off.net_ns_inum, failed)
}

/// Writes the record, waking the reader only once a batch has built up:
/// wakeups, not the hook, are what a busy host would pay for.
fn emit(ev: &Event, cfg: &Config) {
    if EVENTS
        .output::<Event>(ev, wake_flags(cfg.wakeup_bytes, Event::SIZE))
        .is_err()
    {
        count_lost(1);
    }
}

/// Counts transitions the ring buffer had no room for.
#[inline(always)]
fn count_lost(n: u64) {
    if let Some(lost) = LOST.get_ptr_mut(LOST_SLOT) {
        unsafe { *lost += n };
    }
}

/// Whether writing `len` more bytes should wake the reader: once the
/// waiting bytes reach `wakeup_bytes`. The reader drains on a short timer
/// as well, so a wakeup is only what keeps a fast ring from filling
/// between two drains; asking the ring how full it is (a cache line the
/// reader writes) on only every [`WAKE_EVERY`]th record per CPU is enough
/// for that, and is the cost the others skip.
#[inline(always)]
fn wake_flags(wakeup_bytes: u64, len: usize) -> u64 {
    if wakeup_bytes == 0 {
        return 0;
    }
    let every = WAKE_EVERY.load();
    if every > 1 {
        if let Some(tick) = WAKE_TICK.get_ptr_mut(0) {
            // SAFETY: this CPU's value of the array.
            unsafe {
                *tick += 1;
                if *tick < every {
                    return BPF_RB_NO_WAKEUP.into();
                }
                *tick = 0;
            }
        }
    }
    if EVENTS.query(BPF_RB_AVAIL_DATA.into()) + (len as u64) >= wakeup_bytes {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
