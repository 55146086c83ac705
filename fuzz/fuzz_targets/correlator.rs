//! The correlator fed arbitrary event sequences: any order, a handful of
//! socket addresses reused over and over, impossible transitions, time
//! jumping backwards and forwards, `advance` and `flush` at any point. It
//! must not panic, must never follow more sockets than its cap, must keep
//! its queue of closing sockets bounded, and every timeline it finishes must
//! hold together (and print).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tcpwatch::host::clock::{Clock, Zone};
use tcpwatch::model::correlate::{
    CloseKind, Correlator, CorrelatorOptions, OpenKind, Role, Timeline, TimewaitSubstate,
};
use tcpwatch::model::decode::{
    Comm, Record, SentReset, SockFields, SocketEvent, SocketEventKind, Task, Transition,
};
use tcpwatch::model::reset::ResetReason;
use tcpwatch::model::{Endpoint, Family, TcpState};
use tcpwatch::views::conns::{conns_json, conns_text};
use tcpwatch::views::ladder::{ladder, ladder_json, ladder_text};

/// Distinct socket addresses the input can name: few, so they are reused.
const SOCKETS: u64 = 12;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The cap on followed sockets, 1 to 8.
    max_sockets: u8,
    grace_ms: u8,
    fin_timeout_s: u32,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    State {
        sock: u8,
        old: u8,
        new: u8,
        /// Time step in µs; negative goes back.
        dt_us: i32,
        v6: bool,
        local_port: u8,
        remote_port: u8,
        pid: u8,
        comm: [u8; 4],
        fields: Fields,
    },
    Socket {
        sock: u8,
        kind: u8,
        dt_us: i32,
    },
    /// The clock moves with nothing arriving (the live reader's drains).
    Advance {
        dt_us: i32,
    },
    /// Time anywhere at all, e.g. a corrupt record's.
    Jump {
        ts_ns: u64,
    },
    Flush,
}

#[derive(Arbitrary, Debug)]
struct Fields {
    present: u16,
    bytes_acked: u64,
    bytes_received: u64,
    srtt_us: u32,
    total_retrans: u32,
    segs_in: u8,
    segs_out: u8,
    sk_err: i8,
    shutdown: u8,
    netns: u8,
    rcv_nxt: u8,
}

impl Fields {
    fn sock(&self) -> SockFields {
        let has = |bit: u16| self.present & (1 << bit) != 0;
        SockFields {
            bytes_acked: has(0).then_some(self.bytes_acked),
            bytes_received: has(1).then_some(self.bytes_received),
            srtt_us: has(2).then_some(self.srtt_us),
            total_retrans: has(3).then_some(self.total_retrans),
            segs_in: has(4).then_some(u32::from(self.segs_in)),
            segs_out: has(5).then_some(u32::from(self.segs_out)),
            sk_err: has(6).then_some(i32::from(self.sk_err)),
            rcv_shutdown: has(7).then_some(self.shutdown & 1 != 0),
            send_shutdown: has(7).then_some(self.shutdown & 2 != 0),
            ack_pending: has(8).then_some(self.shutdown & 4 != 0),
            netns: has(9).then_some(u32::from(self.netns)),
            rcv_nxt: has(10).then_some(u32::from(self.rcv_nxt)),
        }
    }
}

fn skaddr(sock: u8) -> u64 {
    0xffff_8880_0000_0000 + u64::from(sock) % SOCKETS * 0x100
}

/// Any kernel state number, and now and then one the kernel never uses.
fn state(n: u8) -> TcpState {
    TcpState::from_kernel(n % 14).unwrap_or(TcpState::Close)
}

fn step(now: u64, dt_us: i32) -> u64 {
    let dt = i64::from(dt_us) * 1000;
    now.saturating_add_signed(dt)
}

fn endpoint(v6: bool, host: u8, port: u8) -> Endpoint {
    let addr = if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, u16::from(host)))
    } else {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, host))
    };
    // Port 0 included: SYN_SENT before the ephemeral port is chosen.
    Endpoint::new(addr, u16::from(port % 4) * 1000)
}

/// Checks what must hold of every finished connection.
fn check(t: &Timeline, opts: &CorrelatorOptions, pushes: usize) {
    assert!(!t.steps.is_empty(), "a timeline with no steps");
    assert!(t.steps.len() <= pushes);
    if t.open == OpenKind::BeforeTrace {
        // Known to exist since tracing started: at or before its first step.
        assert!(t.first_ns <= t.steps[0].ts_ns);
    } else {
        assert_eq!(t.steps[0].ts_ns, t.first_ns);
    }
    let index = t.skaddr.wrapping_sub(skaddr(0));
    assert!(index.is_multiple_of(0x100) && index < SOCKETS * 0x100);
    let role = match t.open {
        OpenKind::Active | OpenKind::Refused | OpenKind::TimedOut | OpenKind::Failed => {
            Role::Client
        }
        OpenKind::Passive | OpenKind::PassiveFailed => Role::Server,
        OpenKind::BeforeTrace => Role::Unknown,
    };
    assert_eq!(t.role, role);
    if t.handshake_ns.is_some() {
        assert!(matches!(t.open, OpenKind::Active | OpenKind::Passive));
    }
    if let Some(n) = t.teardown_segments {
        assert!(n == 3 || n == 4);
        assert_eq!(t.close, CloseKind::Orderly);
    }
    if let Some(tw) = t.timewait {
        let hold = match tw.substate {
            TimewaitSubstate::TimeWait => opts.time_wait_ns,
            TimewaitSubstate::FinWait2 => opts.fin_timeout_ns,
        };
        assert_eq!(tw.hold_ns, hold);
    }
    if t.close == CloseKind::NeverOpened {
        assert!(t.closed_by.is_none() && t.established_ns.is_none());
    }
    assert_eq!(t.lifetime_ns(), t.closed_ns.saturating_sub(t.first_ns));
}

fuzz_target!(|input: Input| {
    let opts = CorrelatorOptions {
        max_sockets: usize::from(input.max_sockets % 8) + 1,
        grace_ns: u64::from(input.grace_ms) * 1_000_000,
        fin_timeout_ns: u64::from(input.fin_timeout_s) * 1_000_000_000,
        ..CorrelatorOptions::default()
    };
    let mut c = Correlator::new(opts, None, Some(1));
    let clock = Clock::with_offset_ns(0);
    let mut now = 1_000_000_000u64;
    let mut pushes = 0usize;
    let mut finished = 0usize;
    let mut out = Vec::new();
    for op in &input.ops {
        match op {
            Op::State {
                sock,
                old,
                new,
                dt_us,
                v6,
                local_port,
                remote_port,
                pid,
                comm,
                fields,
            } => {
                now = step(now, *dt_us);
                let mut name = [0u8; 16];
                name[..4].copy_from_slice(comm);
                let t = Transition {
                    ts_ns: now,
                    skaddr: skaddr(*sock),
                    family: if *v6 { Family::V6 } else { Family::V4 },
                    local: endpoint(*v6, 1, *local_port),
                    remote: endpoint(*v6, 2, *remote_port),
                    old: state(*old),
                    new: state(*new),
                    task: Task {
                        pid: u32::from(*pid),
                        tid: u32::from(*pid),
                        comm: Comm(name),
                        cgroup_id: 1,
                    },
                    cpu: 0,
                    sock: fields.sock(),
                };
                pushes += 1;
                c.push(&Record::State(t), &mut out);
            }
            Op::Socket { sock, kind, dt_us } => {
                now = step(now, *dt_us);
                let kind = match kind % 4 {
                    0 => SocketEventKind::Retransmit,
                    1 => SocketEventKind::SendReset,
                    2 => SocketEventKind::ReceiveReset,
                    _ => SocketEventKind::FirstUse,
                };
                let s = SocketEvent {
                    ts_ns: now,
                    skaddr: skaddr(*sock),
                    kind,
                    task: Task {
                        pid: 0,
                        tid: 0,
                        comm: Comm::default(),
                        cgroup_id: 0,
                    },
                    cpu: 0,
                    sock: SockFields::default(),
                    reset: (kind == SocketEventKind::SendReset).then_some(SentReset {
                        reason: Some(ResetReason(*sock)),
                        state: None,
                        endpoints: None,
                    }),
                };
                c.push(&Record::Socket(s), &mut out);
            }
            Op::Advance { dt_us } => {
                now = step(now, *dt_us);
                c.advance(now, &mut out);
            }
            Op::Jump { ts_ns } => now = *ts_ns,
            Op::Flush => c.flush(&mut out),
        }
        assert!(c.tracked() <= opts.max_sockets, "{} tracked", c.tracked());
        assert!(c.open_connections() <= c.tracked());
        assert!(c.held() <= opts.max_sockets, "{} held", c.held());
        assert!(
            c.closing() <= 2 * opts.max_sockets,
            "{} closing",
            c.closing()
        );
        for t in &out[finished..] {
            check(t, &opts, pushes);
        }
        finished = out.len();
    }
    c.flush(&mut out);
    assert_eq!(c.closing(), 0);
    for t in &out[finished..] {
        check(t, &opts, pushes);
    }
    let stats = c.stats();
    assert_eq!(stats.timelines, out.len() as u64);
    for (i, t) in out.iter().enumerate() {
        assert!(!conns_text(t, &clock, Zone::Utc).contains('\n'));
        let _ = conns_json(t, &clock, None);
        let picture = ladder(t, out.get(i + 1), &clock);
        let _ = ladder_text(&picture, Zone::Utc);
        assert!(!ladder_json(&picture).contains('\n'));
    }
});
