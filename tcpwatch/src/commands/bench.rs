//! Measurements of tcpwatch's own userspace stages, for `cargo xtask
//! bench`: how many events per second the correlator takes on one core,
//! and how much memory each tracked connection costs. Both run on synthetic
//! event streams shaped like the kernel's (client and accepted socket of
//! each connection, ten transitions, socket addresses reused).

use std::time::Instant;

use serde::Serialize;
use tcpwatch_common::{kind, valid, Event, AF_INET};

use crate::model::correlate::{Correlator, CorrelatorOptions};
use crate::model::decode::interpret;
use crate::model::TcpState;

/// Resident set size of this process, in bytes (VmRSS), and its peak (VmHWM).
pub fn rss_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn event(
    sk: u64,
    old: TcpState,
    new: TcpState,
    ts: u64,
    local: ([u8; 4], u16),
    remote: ([u8; 4], u16),
) -> Event {
    let mut e = Event::zeroed();
    e.kind = kind::STATE;
    e.ts_ns = ts;
    e.skaddr = sk;
    e.family = AF_INET;
    e.saddr[..4].copy_from_slice(&local.0);
    e.daddr[..4].copy_from_slice(&remote.0);
    e.sport = local.1;
    e.dport = remote.1;
    e.oldstate = old.kernel_number();
    e.newstate = new.kernel_number();
    e.pid = 1000 + (sk % 7) as u32;
    e.comm[..6].copy_from_slice(b"client");
    e.valid = valid::SEGS_IN | valid::SEGS_OUT | valid::RCV_NXT | valid::SRTT | valid::BYTES_ACKED;
    e
}

/// The ten transitions of connection `n` (client closes first), with
/// socket addresses drawn from a pool of `pool` so they are reused.
pub fn connection_events(n: u64, pool: u64, t0: u64, out: &mut Vec<Event>) {
    use TcpState::*;
    let client_sk = 0xffff_8880_0000_0000 + (n % pool) * 2 * 0x1000;
    let server_sk = client_sk + 0x1000;
    let caddr = [127, 0, ((n >> 8) & 0xff) as u8, (n & 0xff) as u8 | 1];
    let cport = 10_000 + (n % 50_000) as u16;
    let client = (caddr, cport);
    let server = ([127, 0, 0, 1], 8080);
    let mut step = |sk, old, new, dt: u64, local, remote, f: &dyn Fn(&mut Event)| {
        let mut e = event(sk, old, new, t0 + dt, local, remote);
        f(&mut e);
        out.push(e);
    };
    step(client_sk, Close, SynSent, 0, (caddr, 0), server, &|_| {});
    step(
        client_sk,
        SynSent,
        Established,
        20_000,
        client,
        server,
        &|e| e.segs_in = 1,
    );
    step(server_sk, Listen, SynRecv, 25_000, server, client, &|e| {
        e.segs_in = 1
    });
    step(
        server_sk,
        SynRecv,
        Established,
        26_000,
        server,
        client,
        &|e| e.srtt_us = 5,
    );
    step(
        client_sk,
        Established,
        FinWait1,
        100_000,
        client,
        server,
        &|e| e.segs_in = 1,
    );
    step(
        server_sk,
        Established,
        CloseWait,
        104_000,
        server,
        client,
        &|e| e.segs_out = 1,
    );
    step(
        server_sk,
        CloseWait,
        LastAck,
        110_000,
        server,
        client,
        &|e| e.segs_out = 1,
    );
    step(
        client_sk,
        FinWait1,
        FinWait2,
        115_000,
        client,
        server,
        &|e| {
            e.segs_in = 2;
            e.rcv_nxt = 1;
        },
    );
    step(client_sk, FinWait2, Close, 116_000, client, server, &|e| {
        e.segs_in = 2;
        e.rcv_nxt = 2;
    });
    step(server_sk, LastAck, Close, 120_000, server, client, &|e| {
        e.segs_in = 3
    });
}

#[derive(Debug, Serialize)]
pub struct CorrelatorBench {
    pub events: u64,
    pub timelines: u64,
    pub seconds: f64,
    pub events_per_second: f64,
}

/// Pushes `events` synthetic events (decode included) through one
/// correlator on this thread. The stream is generated in chunks outside
/// the timed part.
pub fn correlator_throughput(events: u64) -> CorrelatorBench {
    let mut correlator = Correlator::new(CorrelatorOptions::default(), None, None);
    let mut out = Vec::new();
    let per_chunk = 100_000u64;
    let mut chunk = Vec::with_capacity(per_chunk as usize + 10);
    let mut n = 0u64;
    let mut done = 0u64;
    let mut timelines = 0u64;
    let mut busy = std::time::Duration::ZERO;
    while done < events {
        chunk.clear();
        while (chunk.len() as u64) < per_chunk {
            // Connections overlap: each starts 50 µs after the previous.
            connection_events(n, 4096, 1_000_000_000 + n * 50_000, &mut chunk);
            n += 1;
        }
        let start = Instant::now();
        for e in &chunk {
            if let Ok(r) = interpret(e) {
                correlator.push(&r, &mut out);
            }
        }
        timelines += out.len() as u64;
        out.clear();
        busy += start.elapsed();
        done += chunk.len() as u64;
    }
    let seconds = busy.as_secs_f64();
    CorrelatorBench {
        events: done,
        timelines,
        seconds,
        events_per_second: done as f64 / seconds.max(1e-9),
    }
}

#[derive(Debug, Serialize)]
pub struct MemoryBench {
    pub connections: u64,
    pub tracked: u64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub bytes_per_connection: f64,
}

/// Opens `connections` synthetic connections (client side, ESTABLISHED,
/// never closed) in one correlator and measures the resident memory they
/// take.
pub fn tracked_memory(connections: u64) -> MemoryBench {
    use TcpState::*;
    let (rss_before, _) = rss_bytes();
    let mut correlator = Correlator::new(
        CorrelatorOptions {
            max_sockets: connections as usize + 1,
            ..CorrelatorOptions::default()
        },
        None,
        None,
    );
    let mut out = Vec::new();
    for n in 0..connections {
        let sk = 0xffff_8880_0000_0000 + n * 0x1000;
        let local = (
            [10, (n >> 16) as u8, (n >> 8) as u8, n as u8],
            40_000 + (n % 20_000) as u16,
        );
        let remote = ([10, 99, 0, 1], 443);
        for (old, new, dt) in [(Close, SynSent, 0), (SynSent, Established, 30_000)] {
            if let Ok(r) = interpret(&event(
                sk,
                old,
                new,
                1_000_000 + n * 1000 + dt,
                local,
                remote,
            )) {
                correlator.push(&r, &mut out);
            }
        }
    }
    let (rss_after, _) = rss_bytes();
    let tracked = correlator.tracked() as u64;
    drop(correlator);
    MemoryBench {
        connections,
        tracked,
        rss_before,
        rss_after,
        bytes_per_connection: rss_after.saturating_sub(rss_before) as f64
            / connections.max(1) as f64,
    }
}

#[derive(Debug, Serialize)]
pub struct TimewaitMemoryBench {
    pub sockets: u64,
    pub tracked: u64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub bytes_per_socket: f64,
}

/// Adds `sockets` timewait sockets (from as many client connections toward
/// a few destinations, by a few processes) to a TIME_WAIT book and measures
/// the resident memory they take.
pub fn timewait_memory(sockets: u64) -> TimewaitMemoryBench {
    use crate::model::correlate::{Role, Timeline};
    use crate::model::owner::{Attribution, OwnerSource};
    use crate::model::timewait::{TimewaitBook, TimewaitOptions};
    use crate::model::{Endpoint, Owner};
    let owners: Vec<Attribution> = (0..8)
        .map(|i| Attribution {
            owner: std::sync::Arc::new(Owner {
                pid: 1000 + i,
                comm: format!("worker{i}"),
                cgroup_id: 0,
            }),
            source: OwnerSource::Observed,
        })
        .collect();
    let (rss_before, _) = rss_bytes();
    let mut book = TimewaitBook::new(TimewaitOptions::default(), Some(1), 0);
    let mut t = Timeline::sample(
        Endpoint::new([10, 0, 0, 1].into(), 0),
        Endpoint::new([10, 0, 9, 1].into(), 443),
        None,
        Role::Client,
        1_000_000,
    );
    for n in 0..sockets {
        t.local = Endpoint::new(
            [10, 0, (n / 60_000) as u8, 1].into(),
            1024 + (n % 60_000) as u16,
        );
        t.remote = Endpoint::new([10, 0, 9, (n % 16) as u8].into(), 443);
        t.owner = Some(owners[(n % 8) as usize].clone());
        book.on_timeline(&t);
    }
    let (rss_after, _) = rss_bytes();
    let tracked = book.len() as u64;
    drop(book);
    TimewaitMemoryBench {
        sockets,
        tracked,
        rss_before,
        rss_after,
        bytes_per_socket: rss_after.saturating_sub(rss_before) as f64 / sockets.max(1) as f64,
    }
}

/// What the daemon serves once it has taken a whole recording:
/// `/metrics`, every namespace's last snapshot (`/api/timewait?netns=all`)
/// and the newest connections (`/api/conns`), in that order, with the
/// stream's exit summary. The daemon's own cost collector is left out: it
/// reads this process, not the events.
pub fn daemon_replay(
    path: &std::path::Path,
    interval: std::time::Duration,
) -> Result<(String, crate::views::summary::ExitSummary), crate::stream::error::StreamError> {
    use crate::commands::timewait::CheckOptions;
    use crate::daemon::metrics::Metrics;
    use crate::daemon::query::{ConnsQuery, NetnsKey, TimewaitQuery, DEFAULT_LIMIT};
    use crate::daemon::{DaemonOptions, DaemonSink, Shared};
    let mut registry = prometheus_client::registry::Registry::with_prefix("tcpwatch");
    let metrics = Metrics::new(&mut registry);
    let shared = std::sync::Arc::new(Shared::new(registry, 10_000));
    let opts = DaemonOptions {
        interval_ns: interval.as_nanos().min(u128::from(u64::MAX)) as u64,
        top: 10,
        max_sockets: CorrelatorOptions::default().max_sockets,
        churn: crate::model::churn::ChurnOptions::default(),
        check: CheckOptions::default(),
    };
    let ended = crate::stream::replay::run_file(path, |ctx| {
        Ok(DaemonSink::build(opts, metrics, shared.clone(), ctx))
    })?;
    let summary = ended.summary();
    ended.result()?;
    let mut out = shared.metrics();
    let all = TimewaitQuery {
        netns: Some(NetnsKey::All),
    };
    if let Some(Ok(json)) = shared.timewait(&all) {
        out.push_str(&json);
        out.push('\n');
    }
    out.push_str(&shared.conns(ConnsQuery {
        limit: DEFAULT_LIMIT,
        since: None,
    }));
    out.push('\n');
    Ok((out, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_connections_make_one_timeline_per_socket() {
        let mut events = Vec::new();
        for n in 0..100 {
            connection_events(n, 16, 1_000_000_000 + n * 1_000_000, &mut events);
        }
        let mut c = Correlator::new(CorrelatorOptions::default(), None, None);
        let mut out = Vec::new();
        for e in &events {
            c.push(&interpret(e).unwrap(), &mut out);
        }
        c.flush(&mut out);
        assert_eq!(out.len(), 200);
        let client = out
            .iter()
            .find(|t| t.role == crate::model::correlate::Role::Client)
            .unwrap();
        assert_eq!(client.close, crate::model::correlate::CloseKind::Orderly);
        assert_eq!(client.teardown_segments, Some(3));
    }

    #[test]
    fn throughput_and_memory_report_figures() {
        let b = correlator_throughput(20_000);
        assert!(b.events >= 20_000 && b.events_per_second > 0.0);
        assert!(b.timelines > 0);
        let m = tracked_memory(1000);
        assert_eq!(m.tracked, 1000);
    }
}
