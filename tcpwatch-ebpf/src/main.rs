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
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_smp_processor_id, bpf_ktime_get_ns},
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
    EbpfContext, Global,
};
use aya_log_ebpf::warn;
use tcpwatch_common::{
    kind, valid, Config, EndpointOffsets, Event, InetSource, SetStateRecord, AF_INET, AF_INET6,
    IPPROTO_TCP, LOST_SLOT, NO_FIELD, OFFSET_UNKNOWN,
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
/// that created the listener). Bounded: the oldest is dropped first.
#[map]
static AWAITING_OWNER: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

/// Where the BTF set-state program finds a socket's endpoints.
#[unsafe(no_mangle)]
static ENDPOINTS: Global<EndpointOffsets> = Global::new(EndpointOffsets::UNKNOWN);

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

fn first_use(ctx: &BtfTracePointContext) {
    // The tracepoint's first argument: the socket.
    let sk: u64 = ctx.arg(0);
    if unsafe { AWAITING_OWNER.get(&sk) }.is_none() {
        return;
    }
    let _ = AWAITING_OWNER.remove(&sk);
    let cfg = CONFIG.load();
    let mut ev = Event::zeroed();
    ev.kind = kind::FIRST_USE;
    ev.skaddr = sk;
    fill_task(&mut ev, true);
    // Reads nothing from the socket, so no read can fail.
    let _ = fill_socket(&mut ev, &cfg, 0);
    emit(&ev, &cfg);
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let _ = try_set_state_btf(&ctx, sk, old, new);
    0
}

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
    let _ = try_socket_event(&ctx, &cfg, ctx.arg(0), kind::RETRANSMIT);
    0
}

/// `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb, ...)`.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset_btf(ctx: BtfTracePointContext) -> i32 {
    let cfg = CONFIG.load();
    let _ = try_socket_event(&ctx, &cfg, ctx.arg(0), kind::SEND_RESET);
    0
}

/// `tcp_receive_reset(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_btf(ctx: BtfTracePointContext) -> i32 {
    let cfg = CONFIG.load();
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

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let cfg = CONFIG.load();
    let _ = classic_socket_event(&ctx, &cfg, cfg.send_reset_skaddr, kind::SEND_RESET);
    0
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
/// the usual one.
fn try_set_state_btf<C: EbpfContext>(ctx: &C, sk: u64, old: i32, new: i32) -> Result<(), i32> {
    let off = &ENDPOINTS.load();
    let protocol: u16 = load_sk(sk, off.protocol)?;
    // The tracepoint also fires for SCTP (and, before 6.16, DCCP) sockets.
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let mut ev = Event::zeroed();
    ev.kind = kind::STATE;
    ev.skaddr = sk;
    ev.oldstate = old as u8;
    ev.newstate = new as u8;
    // inet_sock's fields lie past struct sock, where the verifier allows
    // no direct load: copied, in one go where they sit together.
    let (sport, saddr) = if off.standard == 1 {
        let source: InetSource = read_sk(sk, off.saddr)?;
        (source.sport, source.saddr)
    } else {
        (read_sk(sk, off.sport)?, read_sk(sk, off.saddr)?)
    };
    ev.sport = u16::from_be(sport);
    ev.dport = u16::from_be(load_sk(sk, off.dport)?);
    ev.family = load_sk(sk, off.family)?;
    if ev.family == AF_INET6 {
        if let (Ok(s), Ok(d)) = (
            load_sk::<[u32; 4]>(sk, off.v6_rcv_saddr),
            load_sk::<[u32; 4]>(sk, off.v6_daddr),
        ) {
            for i in 0..4 {
                ev.saddr[i * 4..i * 4 + 4].copy_from_slice(&s[i].to_ne_bytes());
                ev.daddr[i * 4..i * 4 + 4].copy_from_slice(&d[i].to_ne_bytes());
            }
        }
    } else {
        let daddr: u32 = load_sk(sk, off.daddr)?;
        ev.saddr[..4].copy_from_slice(&saddr);
        ev.daddr[..4].copy_from_slice(&daddr.to_ne_bytes());
    }
    set_state_common(ctx, &mut ev);
    Ok(())
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
    match (old, new) {
        // A new accepted socket: wait for the process that uses it.
        (LISTEN, SYN_RECV) => {
            let _ = AWAITING_OWNER.insert(&ev.skaddr, &1, 0);
        }
        // Gone before any process used it.
        (_, CLOSE) => {
            let _ = AWAITING_OWNER.remove(&ev.skaddr);
        }
        _ => {}
    }
    fill_task(ev, owner_transition(old, new));
    let failed = fill_socket(ev, &cfg, reads_for(old, new));
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
    pub const ALL: u16 = 0xffff;
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
        // A reset sent on behalf of no socket (e.g. for a closed port).
        return Ok(());
    }
    let mut ev = Event::zeroed();
    ev.kind = event_kind;
    ev.skaddr = skaddr;
    fill_task(&mut ev, false);
    let failed = fill_socket(&mut ev, cfg, 0);
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
    let sk = ev.skaddr;
    let mut failed = FailedRead {
        offset: OFFSET_UNKNOWN,
    };
    let off = &cfg.sock;
    if reads & read::FINAL != 0 {
        if let Some(v) = read_field::<u8>(sk, off.sk_shutdown, &mut failed) {
            ev.sk_shutdown = v;
            ev.valid |= valid::SHUTDOWN;
        }
        if let Some(v) = read_field::<i32>(sk, off.sk_err, &mut failed) {
            ev.sk_err = v;
            ev.valid |= valid::SK_ERR;
        }
        if let Some(v) = read_field::<u64>(sk, off.bytes_acked, &mut failed) {
            ev.bytes_acked = v;
            ev.valid |= valid::BYTES_ACKED;
        }
        if let Some(v) = read_field::<u64>(sk, off.bytes_received, &mut failed) {
            ev.bytes_received = v;
            ev.valid |= valid::BYTES_RECEIVED;
        }
        if let Some(v) = read_field::<u32>(sk, off.total_retrans, &mut failed) {
            ev.total_retrans = v;
            ev.valid |= valid::TOTAL_RETRANS;
        }
    }
    if reads & (read::FINAL | read::SRTT) != 0 {
        if let Some(v) = read_field::<u32>(sk, off.srtt_us, &mut failed) {
            ev.srtt_us = v >> 3;
            ev.valid |= valid::SRTT;
        }
    }
    if reads & read::SEGS_IN != 0 {
        if let Some(v) = read_field::<u32>(sk, off.segs_in, &mut failed) {
            ev.segs_in = v;
            ev.valid |= valid::SEGS_IN;
        }
    }
    if reads & read::SEGS_OUT != 0 {
        if let Some(v) = read_field::<u32>(sk, off.segs_out, &mut failed) {
            ev.segs_out = v;
            ev.valid |= valid::SEGS_OUT;
        }
    }
    if reads & read::RCV_NXT != 0 {
        if let Some(v) = read_field::<u32>(sk, off.rcv_nxt, &mut failed) {
            ev.rcv_nxt = v;
            ev.valid |= valid::RCV_NXT;
        }
    }
    if reads & read::ACK_PENDING != 0 {
        if let Some(v) = read_field::<u8>(sk, off.icsk_ack_pending, &mut failed) {
            ev.ack_pending = v;
            ev.valid |= valid::ACK_PENDING;
        }
    }
    // The namespace on every event: it tells sockets of different
    // namespaces apart, and matches sockets older than the trace.
    if off.net_ns_inum != OFFSET_UNKNOWN {
        if let Some(net) = read_field::<u64>(sk, off.skc_net, &mut failed) {
            if net != 0 {
                if let Some(inum) = read_field::<u32>(net, off.net_ns_inum, &mut failed) {
                    ev.netns = inum;
                    ev.valid |= valid::NETNS;
                }
            }
        }
    }
    failed
}

/// Writes the record, waking the reader only once a batch has built up:
/// wakeups, not the hook, are what a busy host would pay for.
fn emit(ev: &Event, cfg: &Config) {
    let flags = if cfg.wakeup_bytes == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA.into()) + (Event::SIZE as u64) >= cfg.wakeup_bytes {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    };
    if EVENTS.output::<Event>(ev, flags).is_err() {
        if let Some(lost) = LOST.get_ptr_mut(LOST_SLOT) {
            unsafe { *lost += 1 };
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
