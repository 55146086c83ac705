//! `tcpwatch trace`: one line per transition, with the socket's real owner
//! and the time since its previous transition; and a line of its own for
//! each reset sent or received and each retransmitted segment, a sent
//! reset with the kernel's reason.
//!
//! An accepted socket's handshake happens before any process has it: it
//! waits in its listener's queue until one accepts it (with a pre-fork
//! server, any of the workers sharing the listener). So its lines are held
//! until its first send or receive names that process, and printed then,
//! as its owner's; a socket no process has used within [`HOLD_NS`] is
//! printed as its listener's.

use std::collections::VecDeque;
use std::io::{self, Write};

use crate::commands::Selector;
use crate::host::clock::Zone;
use crate::model::decode::{Record, SocketEvent, SocketEventKind, Transition};
use crate::model::filter::Filter;
use crate::model::owner::{Attribution, OwnerSource, OwnerTracker};
use crate::model::sweep::{KernelSockets, SweepTable};
use crate::model::table::BoundedMap;
use crate::model::{Endpoint, Family, FastMap, TcpState};
use crate::stream::context::Context;
use crate::stream::pipeline::{Batch, Consumer, Totals};
use crate::views::summary::{ExitSummary, TraceSummary, TransitionCount};
use crate::views::{trace_header, EventKind, Format, TraceEventLine, TraceLine, TraceWriter};

/// What the user asked `trace` for.
#[derive(Clone, Debug)]
pub struct TraceOptions {
    pub format: Format,
    pub filter: Filter,
    pub max_sockets: usize,
    /// Print the column header first (text format).
    pub header: bool,
    /// The clock face of text output.
    pub zone: Zone,
}

/// How long the lines of an accepted socket wait for a process to use it.
pub const HOLD_NS: u64 = 1_000_000_000;

/// What the lines of a socket's resets and retransmissions need from its
/// transitions: when the last was, its endpoints and its owner.
#[derive(Clone, Debug)]
struct Seen {
    ts_ns: u64,
    family: Family,
    local: Endpoint,
    remote: Endpoint,
    owner: Option<Attribution>,
}

/// Sockets just closed, kept for the reset the kernel sends right after an
/// abortive close (CLOSE comes first).
const RECENTLY_CLOSED: usize = 1024;

/// The lines of an accepted socket no process has used yet.
struct Held {
    since_ns: u64,
    lines: Vec<(Transition, Option<Attribution>, Option<u64>)>,
}

/// Lines pending in a sink's buffer past this many bytes are written out
/// before the batch ends.
const WRITE_AT: usize = 64 * 1024;

/// A state's place in [`TcpState::ALL`].
fn state_index(s: TcpState) -> usize {
    usize::from(s.kernel_number() - 1)
}

/// Turns records into trace lines written to `out`: a batch's lines are
/// gathered in one buffer and written together at its end (a long batch
/// every [`WRITE_AT`] bytes), so a quiet trace still shows each line at
/// once and a busy one makes few writes.
pub struct TraceSink<W: Write> {
    out: W,
    format: Format,
    selector: Selector,
    lines: TraceWriter,
    /// Lines not written to `out` yet.
    pending: Vec<u8>,
    owners: OwnerTracker,
    last_ts: BoundedMap<u64, Seen>,
    recently_closed: VecDeque<(u64, Seen)>,
    seen: u64,
    shown: u64,
    /// Reset and retransmission lines printed, and those whose socket's
    /// endpoints were not known (it had no transition in the trace).
    events_shown: u64,
    events_unplaced: u64,
    /// Transitions seen by (old, new) state, indexed by their place in
    /// [`TcpState::ALL`].
    by_kind: [[u64; TcpState::ALL.len()]; TcpState::ALL.len()],
    held: FastMap<u64, Held>,
    /// (socket, since) in the order held, for the deadline and the cap.
    held_order: VecDeque<(u64, u64)>,
    max_held: usize,
}

impl<W: Write> TraceSink<W> {
    /// The sink for a stream described by `ctx`; the owners of sockets
    /// from before tracing come from its snapshot.
    pub fn build(out: W, opts: TraceOptions, ctx: &Context) -> Self {
        let mut sink = TraceSink {
            out,
            format: opts.format,
            selector: Selector::new(opts.filter, ctx),
            lines: TraceWriter::new(ctx.clock, opts.zone),
            pending: Vec::with_capacity(WRITE_AT + 1024),
            owners: OwnerTracker::new(opts.max_sockets, ctx.snapshot.clone(), ctx.netns),
            last_ts: BoundedMap::new(opts.max_sockets),
            recently_closed: VecDeque::new(),
            seen: 0,
            shown: 0,
            events_shown: 0,
            events_unplaced: 0,
            by_kind: Default::default(),
            held: FastMap::default(),
            held_order: VecDeque::new(),
            max_held: opts.max_sockets.max(1),
        };
        if opts.header && sink.format == Format::Text {
            // A closed pipe shows at the first line written.
            let _ =
                writeln!(sink.out, "{}", trace_header(opts.zone)).and_then(|()| sink.out.flush());
        }
        sink
    }

    fn record(&mut self, r: &Record) -> io::Result<()> {
        let t = match r {
            Record::State(t) => t,
            Record::Socket(s) if s.kind == SocketEventKind::FirstUse => {
                let owner = self.owners.first_use(s);
                return self.release(s.skaddr, Some(&owner));
            }
            Record::Socket(s) => return self.socket_line(s),
        };
        self.seen += 1;
        self.by_kind[state_index(t.old)][state_index(t.new)] += 1;
        let owner = self.owners.observe(t);
        let delta_ns = self
            .last_ts
            .get(&t.skaddr)
            .map(|prev| t.ts_ns.saturating_sub(prev.ts_ns));
        let closed = t.new == TcpState::Close;
        let seen = Seen {
            ts_ns: t.ts_ns,
            family: t.family,
            local: t.local,
            remote: t.remote,
            owner: owner.clone(),
        };
        if closed {
            self.last_ts.remove(&t.skaddr);
            if self.recently_closed.len() >= RECENTLY_CLOSED {
                self.recently_closed.pop_front();
            }
            self.recently_closed.push_back((t.skaddr, seen));
        } else {
            self.last_ts.insert(t.skaddr, seen);
        }
        // Accepted and not used yet: named after its listener, or not at
        // all when the listener's owner is unknown.
        let from_listener = match &owner {
            Some(a) => a.source == OwnerSource::Listener,
            None => {
                (t.old, t.new) == (TcpState::Listen, TcpState::SynRecv)
                    || self.held.contains_key(&t.skaddr)
            }
        };
        if from_listener && !closed {
            return self.hold(*t, owner, delta_ns);
        }
        // Whoever owns it now owned it since it was accepted.
        self.release(t.skaddr, owner.as_ref().filter(|_| !from_listener))?;
        self.print(t, owner.as_ref(), delta_ns)
    }

    /// A reset or retransmission: a line of its own, placed by the
    /// endpoints the kernel gave with it (a reset sent) or those of the
    /// socket's transitions.
    fn socket_line(&mut self, s: &SocketEvent) -> io::Result<()> {
        let what = match s.kind {
            SocketEventKind::Retransmit => EventKind::Retransmit,
            SocketEventKind::SendReset => EventKind::ResetSent,
            SocketEventKind::ReceiveReset => EventKind::ResetReceived,
            SocketEventKind::FirstUse => return Ok(()),
        };
        // Lines held for an accepted socket's user come first, as their
        // listener's: a reset ends it before any process used it.
        if s.skaddr != 0 && self.held.contains_key(&s.skaddr) {
            self.release(s.skaddr, None)?;
        }
        let known = self.last_ts.get(&s.skaddr).or_else(|| {
            self.recently_closed
                .iter()
                .rev()
                .find(|(sk, _)| *sk == s.skaddr && s.skaddr != 0)
                .map(|(_, seen)| seen)
        });
        let reset = s.reset.as_ref();
        let ends = reset
            .and_then(|r| r.endpoints)
            .or_else(|| known.map(|k| (k.family, k.local, k.remote)));
        let Some((family, local, remote)) = ends else {
            self.events_unplaced += 1;
            return Ok(());
        };
        let owner = known.and_then(|k| k.owner.clone());
        let delta_ns = known.map(|k| s.ts_ns.saturating_sub(k.ts_ns));
        let o = owner.as_ref().map(|a| &*a.owner);
        if !self.selector.matches(family, &local, &remote, o) {
            return Ok(());
        }
        self.events_shown += 1;
        let cgroup = match self.format {
            Format::Json => self.selector.cgroup(o),
            Format::Text => None,
        };
        let line = TraceEventLine {
            what,
            ts_ns: s.ts_ns,
            skaddr: s.skaddr,
            family,
            local,
            remote,
            owner: owner.as_ref(),
            cgroup: cgroup.as_deref(),
            delta_ns,
            reason: reset.and_then(|r| r.reason),
            state: reset.and_then(|r| r.state),
            netns: s.sock.netns,
            cpu: s.cpu,
        };
        match self.format {
            Format::Text => self.lines.event_text(&mut self.pending, &line),
            Format::Json => self.lines.event_json(&mut self.pending, &line),
        }
        self.end_line()
    }

    fn print(
        &mut self,
        t: &Transition,
        owner: Option<&Attribution>,
        delta_ns: Option<u64>,
    ) -> io::Result<()> {
        let o = owner.map(|a| &*a.owner);
        if !self.selector.matches(t.family, &t.local, &t.remote, o) {
            return Ok(());
        }
        self.shown += 1;
        let cgroup = match self.format {
            Format::Json => self.selector.cgroup(o),
            Format::Text => None,
        };
        let line = TraceLine {
            t,
            owner,
            cgroup: cgroup.as_deref(),
            delta_ns,
        };
        match self.format {
            Format::Text => self.lines.text(&mut self.pending, &line),
            Format::Json => self.lines.json(&mut self.pending, &line),
        }
        self.end_line()
    }

    /// Ends the line just written; writes the pending lines out if they
    /// are many.
    fn end_line(&mut self) -> io::Result<()> {
        self.pending.push(b'\n');
        if self.pending.len() >= WRITE_AT {
            self.write_pending()?;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> io::Result<()> {
        let written = self.out.write_all(&self.pending);
        self.pending.clear();
        written
    }

    /// Writes the pending lines and flushes `out`: at the end of each
    /// batch, so lines show as soon as their batch is read.
    fn flush(&mut self) -> io::Result<()> {
        self.write_pending()?;
        self.out.flush()
    }

    /// Holds a line of an accepted socket no process has used yet.
    fn hold(
        &mut self,
        t: Transition,
        owner: Option<Attribution>,
        delta_ns: Option<u64>,
    ) -> io::Result<()> {
        if !self.held.contains_key(&t.skaddr) {
            while self.held.len() >= self.max_held {
                let Some((sk, _)) = self.held_order.pop_front() else {
                    break;
                };
                self.release(sk, None)?;
            }
            self.held_order.push_back((t.skaddr, t.ts_ns));
        }
        self.held
            .entry(t.skaddr)
            .or_insert_with(|| Held {
                since_ns: t.ts_ns,
                lines: Vec::new(),
            })
            .lines
            .push((t, owner, delta_ns));
        Ok(())
    }

    /// Prints the held lines of a socket: as `owner`'s when its owner is
    /// known now, else as they were (the listener's).
    fn release(&mut self, skaddr: u64, owner: Option<&Attribution>) -> io::Result<()> {
        let Some(held) = self.held.remove(&skaddr) else {
            return Ok(());
        };
        for (t, listener, delta_ns) in &held.lines {
            self.print(t, owner.or(listener.as_ref()), *delta_ns)?;
        }
        Ok(())
    }

    /// Prints, as their listener's, the lines of sockets no process used
    /// within [`HOLD_NS`] of `now_ns` (all of them with `u64::MAX`).
    fn release_unused(&mut self, now_ns: u64) -> io::Result<()> {
        while let Some(&(sk, since)) = self.held_order.front() {
            let current = self.held.get(&sk).is_some_and(|h| h.since_ns == since);
            if current && now_ns < since.saturating_add(HOLD_NS) {
                break;
            }
            self.held_order.pop_front();
            if current {
                self.release(sk, None)?;
            }
        }
        Ok(())
    }

    /// The writer, with every line of the batches given so far written to
    /// it (each batch's lines are written at its end).
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Consumer for TraceSink<W> {
    fn records(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        for r in batch.records {
            self.record(r)?;
        }
        self.release_unused(batch.settled_ns)?;
        self.flush()
    }

    fn sweep_table(&mut self) -> Option<&mut dyn SweepTable> {
        Some(self)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.release_unused(u64::MAX)?;
        self.flush()
    }

    fn summary(&self, totals: &Totals) -> ExitSummary {
        let mut transitions: Vec<TransitionCount> = TcpState::ALL
            .iter()
            .flat_map(|&old| TcpState::ALL.iter().map(move |&new| (old, new)))
            .filter_map(|(old, new)| {
                let count = self.by_kind[state_index(old)][state_index(new)];
                (count > 0).then(|| TransitionCount {
                    old: old.name().to_string(),
                    new: new.name().to_string(),
                    count,
                })
            })
            .collect();
        // Most frequent first; ties in name order.
        transitions.sort_by(|a, b| (&a.old, &a.new).cmp(&(&b.old, &b.new)));
        transitions.sort_by_key(|t| std::cmp::Reverse(t.count));
        ExitSummary::Trace(TraceSummary {
            transitions_seen: self.seen,
            shown: self.shown,
            events_shown: self.events_shown,
            events_unplaced: self.events_unplaced,
            stream: totals.stream(),
            tracking: totals.tracking(self.owners.tracking()),
            transitions,
        })
    }
}

/// The owner table, and with each socket dropped its last time stamp.
impl<W: Write> SweepTable for TraceSink<W> {
    fn unlisted(&self, kernel: &KernelSockets) -> Vec<(u64, u64)> {
        self.owners.unlisted(kernel)
    }

    fn drop_unchanged(&mut self, skaddr: u64, mark: u64) -> bool {
        let dropped = self.owners.drop_unchanged(skaddr, mark);
        if dropped {
            self.last_ts.remove(&skaddr);
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decode::tests::state_event;
    use crate::model::decode::{decode, encode};
    use crate::model::TcpState::*;
    use crate::stream::pipeline::Pipeline;

    fn ev(
        sk: u64,
        old: crate::model::TcpState,
        new: crate::model::TcpState,
        ts: u64,
        pid: u32,
    ) -> tcpwatch_common::Event {
        let mut e = state_event(sk, old, new, ts);
        e.pid = pid;
        e
    }

    fn rec(
        sk: u64,
        old: crate::model::TcpState,
        new: crate::model::TcpState,
        ts: u64,
        pid: u32,
    ) -> Record {
        decode(&encode(&ev(sk, old, new, ts, pid))).unwrap()
    }

    /// A context with no snapshot and no namespace, as tests build it.
    pub(crate) fn context() -> Context {
        let header = crate::stream::record::Header {
            clock_offset_ns: 0,
            netns: 0,
            fin_timeout_s: 60,
        };
        Context {
            snapshot: None,
            ..Context::recorded(
                &header,
                crate::model::snapshot::SocketSnapshot::from_entries(Vec::new()),
            )
        }
    }

    fn sink(filter: Filter, format: Format) -> TraceSink<Vec<u8>> {
        let opts = TraceOptions {
            format,
            filter,
            max_sockets: 100,
            header: false,
            zone: Zone::Utc,
        };
        TraceSink::build(Vec::new(), opts, &context())
    }

    fn feed(s: &mut TraceSink<Vec<u8>>, records: &[Record]) {
        s.records(&Batch {
            events: &[],
            records,
            undecodable: 0,
            settled_ns: 0,
        })
        .unwrap();
    }

    #[test]
    fn prints_owner_and_delta_per_socket() {
        let mut p = Pipeline::replay(sink(Filter::default(), Format::Json));
        let events = vec![
            ev(1, Close, SynSent, 1_000_000, 10),
            ev(2, Close, SynSent, 1_500_000, 20),
            ev(1, SynSent, Established, 3_000_000, 0),
        ];
        p.raw(events, Default::default(), 0).unwrap();
        let out = String::from_utf8(p.end(None).consumer.into_inner()).unwrap();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0]["delta_ms"].is_null());
        assert_eq!(
            lines[2]["pid"], 10,
            "softirq transition keeps connect()'s owner"
        );
        assert_eq!(lines[2]["delta_ms"], 2.0);
    }

    #[test]
    fn pid_filter_uses_the_owner_not_the_current_task() {
        let f = Filter {
            pids: vec![10],
            ..Filter::default()
        };
        let mut s = sink(f, Format::Json);
        feed(
            &mut s,
            &[
                rec(1, Close, SynSent, 1, 10),
                rec(2, Close, SynSent, 2, 20),
                // current task is 20 here, but the socket is 10's
                rec(1, SynSent, Established, 3, 20),
                rec(2, SynSent, Established, 4, 10),
            ],
        );
        let ExitSummary::Trace(summary) = s.summary(&Totals::default()) else {
            panic!("not a trace summary")
        };
        assert_eq!(summary.transitions_seen, 4);
        assert_eq!(summary.shown, 2);
        let out = String::from_utf8(s.into_inner()).unwrap();
        assert_eq!(out.lines().count(), 2);
        assert!(out.lines().all(|l| l.contains("\"pid\":10")), "{out}");
    }

    #[test]
    fn summary_lists_kinds_by_count_with_the_streams_figures() {
        let mut s = sink(Filter::default(), Format::Text);
        feed(
            &mut s,
            &[
                rec(1, Close, SynSent, 1, 10),
                rec(1, SynSent, Established, 2, 10),
                rec(2, SynSent, Established, 3, 10),
            ],
        );
        let totals = Totals {
            events: 3,
            stale: 1,
            lost: crate::model::lost::LostCounts {
                ring_full: 3,
                skipped: 0,
            },
            ..Totals::default()
        };
        let summary = s.summary(&totals);
        let ExitSummary::Trace(t) = &summary else {
            panic!("not a trace summary")
        };
        assert_eq!(
            (t.transitions[0].count, t.transitions[0].new.as_str()),
            (2, "ESTABLISHED")
        );
        assert_eq!(t.tracking.stale, 1);
        assert_eq!(t.tracking.limit, 100);
        let r = summary.text();
        assert!(
            r.starts_with("tcpwatch: 3 transitions seen, 3 shown\n"),
            "{r}"
        );
        assert!(r.contains("3 lost events (3 ring buffer full"), "{r}");
        assert!(r.contains("2  SYN_SENT -> ESTABLISHED"), "{r}");
    }

    /// nginx's master (pid 1) listens on port 8080; a worker (pid 7)
    /// takes the connection and reads from it; the client is pid 9.
    fn accepted(worker_reads: bool) -> Vec<Record> {
        let at = |mut e: tcpwatch_common::Event| {
            e.sport = 8080;
            e.dport = 5000;
            e
        };
        let mut listen = at(ev(1, Close, Listen, 1_000, 1));
        listen.comm = crate::model::decode::Comm::from_str_lossy("nginx").0;
        let mut events = vec![
            listen,
            at(ev(2, Listen, SynRecv, 2_000, 9)),
            at(ev(2, SynRecv, Established, 3_000, 9)),
        ];
        if worker_reads {
            let mut first_use = tcpwatch_common::Event::zeroed();
            first_use.kind = tcpwatch_common::kind::FIRST_USE;
            first_use.skaddr = 2;
            first_use.ts_ns = 4_000;
            first_use.pid = 7;
            first_use.comm = crate::model::decode::Comm::from_str_lossy("nginx").0;
            events.push(first_use);
        }
        events.iter().map(|e| decode(&encode(e)).unwrap()).collect()
    }

    fn feed_at(s: &mut TraceSink<Vec<u8>>, records: &[Record], settled_ns: u64) {
        s.records(&Batch {
            events: &[],
            records,
            undecodable: 0,
            settled_ns,
        })
        .unwrap();
    }

    fn json_lines(out: Vec<u8>) -> Vec<serde_json::Value> {
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn accepted_sockets_belong_to_the_process_that_takes_them() {
        let f = Filter {
            pids: vec![7],
            ..Filter::default()
        };
        let mut s = sink(f, Format::Json);
        let records = accepted(true);
        feed_at(&mut s, &records[..3], 3_500);
        assert_eq!(s.shown, 0, "held until a process takes it");
        feed_at(&mut s, &records[3..], 4_500);
        // Closed later by the worker, in softirq while pid 9 ran.
        feed_at(
            &mut s,
            &[
                rec(2, Established, FinWait1, 5_000, 7),
                rec(2, FinWait1, FinWait2, 6_000, 9),
                rec(2, FinWait2, Close, 7_000, 9),
            ],
            7_500,
        );
        s.finish().unwrap();
        let lines = json_lines(s.into_inner());
        let steps: Vec<(&str, &str, u64, &str)> = lines
            .iter()
            .map(|l| {
                (
                    l["old"].as_str().unwrap(),
                    l["new"].as_str().unwrap(),
                    l["pid"].as_u64().unwrap(),
                    l["owner_source"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            steps,
            [
                ("LISTEN", "SYN_RECV", 7, "observed"),
                ("SYN_RECV", "ESTABLISHED", 7, "observed"),
                ("ESTABLISHED", "FIN_WAIT1", 7, "observed"),
                ("FIN_WAIT1", "FIN_WAIT2", 7, "observed"),
                ("FIN_WAIT2", "CLOSE", 7, "observed"),
            ]
        );
        assert_eq!(lines[1]["delta_ms"], 0.001);
    }

    #[test]
    fn a_socket_nobody_takes_is_shown_as_its_listeners_after_a_while() {
        let mut s = sink(Filter::default(), Format::Json);
        feed_at(&mut s, &accepted(false), 3_500);
        assert_eq!(s.shown, 1, "the listener's own line");
        feed_at(&mut s, &[], 2_000 + HOLD_NS);
        let lines = json_lines(s.into_inner());
        assert_eq!(lines.len(), 3);
        for l in &lines[1..] {
            assert_eq!(
                (l["pid"].as_u64(), l["owner_source"].as_str()),
                (Some(1), Some("listener")),
                "{l}"
            );
        }
    }

    /// Resets and retransmissions are lines of their own: a reset sent
    /// with the kernel's reason, placed by the endpoints it came with (a
    /// reset for no socket) or by its socket's transitions (one sent right
    /// after the abortive close's CLOSE); one whose socket is unknown is
    /// counted, not printed.
    #[test]
    fn resets_and_retransmissions_are_lines_of_their_own() {
        use tcpwatch_common::{kind, valid, AF_INET};
        let socket_event = |sk: u64, k: u8, ts: u64| {
            let mut e = tcpwatch_common::Event::zeroed();
            e.kind = k;
            e.skaddr = sk;
            e.ts_ns = ts;
            e
        };
        let mut linger = socket_event(1, kind::SEND_RESET, 5_000_000);
        linger.reset_reason = crate::model::reset::ResetReason::TCP_STATE.0;
        linger.valid |= valid::RESET_REASON;
        linger.newstate = TcpState::Close.kernel_number();
        // A SYN to a closed port: no socket, endpoints from the segment.
        let mut refused = socket_event(0, kind::SEND_RESET, 6_000_000);
        refused.reset_reason = crate::model::reset::ResetReason::NO_SOCKET.0;
        refused.valid |= valid::RESET_REASON;
        refused.family = AF_INET;
        refused.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        refused.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        refused.sport = 9;
        refused.dport = 40001;
        let events = [
            ev(1, Close, SynSent, 1_000_000, 10),
            ev(1, SynSent, Established, 2_000_000, 10),
            socket_event(1, kind::RETRANSMIT, 3_000_000),
            ev(1, Established, Close, 4_000_000, 10),
            linger,
            refused,
            // A socket no transition was seen for.
            socket_event(77, kind::RETRANSMIT, 7_000_000),
        ];
        let records: Vec<Record> = events.iter().map(|e| decode(&encode(e)).unwrap()).collect();
        let mut s = sink(Filter::default(), Format::Json);
        feed(&mut s, &records);
        let ExitSummary::Trace(summary) = s.summary(&Totals::default()) else {
            panic!("not a trace summary")
        };
        assert_eq!(
            (summary.shown, summary.events_shown, summary.events_unplaced),
            (3, 3, 1)
        );
        let lines = json_lines(s.into_inner());
        let events: Vec<&serde_json::Value> =
            lines.iter().filter(|l| l.get("event").is_some()).collect();
        assert_eq!(events.len(), 3, "{lines:?}");
        assert_eq!(events[0]["event"], "retransmit");
        assert_eq!(events[0]["pid"], 10);
        assert_eq!(events[0]["delta_ms"], 1.0);
        assert!(events[0].get("reset_reason").is_none());
        assert_eq!(events[1]["event"], "reset_sent");
        assert_eq!(events[1]["reset_reason"], "TCP_STATE");
        assert_eq!(events[1]["state"], "CLOSE");
        assert_eq!(events[1]["pid"], 10, "the closed socket's owner");
        assert_eq!(
            (&events[1]["sport"], &events[1]["dport"]),
            (&40000.into(), &8080.into())
        );
        assert_eq!(events[2]["reset_reason"], "NO_SOCKET");
        assert_eq!(events[2]["reset_words"], "no socket (port closed)");
        assert!(events[2]["state"].is_null() && events[2]["pid"].is_null());
        assert_eq!(events[2]["skaddr"], "0x0");
        assert_eq!(
            (&events[2]["sport"], &events[2]["dport"]),
            (&9.into(), &40001.into())
        );

        // Text: the same lines, the reason in words at the end.
        let mut s = sink(Filter::default(), Format::Text);
        feed(&mut s, &records);
        let text = String::from_utf8(s.into_inner()).unwrap();
        let rst: Vec<&str> = text.lines().filter(|l| l.contains(" RST sent ")).collect();
        assert_eq!(rst.len(), 2, "{text}");
        assert!(
            rst[1].ends_with("no socket (port closed) (NO_SOCKET)"),
            "{text}"
        );
        assert!(text.contains(" retransmit "), "{text}");
        // A kernel that gives no reason says so.
        let mut old_kernel = events_of(&[linger]);
        if let Record::Socket(e) = &mut old_kernel[0] {
            e.reset.as_mut().unwrap().reason = None;
        }
        let mut s = sink(Filter::default(), Format::Text);
        feed(&mut s, &records[..4]);
        feed(&mut s, &old_kernel);
        let text = String::from_utf8(s.into_inner()).unwrap();
        assert!(
            text.contains("reason unknown (this kernel does not say)"),
            "{text}"
        );
    }

    fn events_of(events: &[tcpwatch_common::Event]) -> Vec<Record> {
        events.iter().map(|e| decode(&encode(e)).unwrap()).collect()
    }

    /// A socket dropped by the sweep loses its owner and its time stamp.
    #[test]
    fn sweeping_drops_the_owner_and_the_time_stamp() {
        let ctx = Context {
            netns: Some(5),
            ..context()
        };
        let opts = TraceOptions {
            format: Format::Json,
            filter: Filter::default(),
            max_sockets: 100,
            header: false,
            zone: Zone::Utc,
        };
        let mut s = TraceSink::build(Vec::new(), opts, &ctx);
        let ours = |old, new, ts| {
            let mut e = ev(1, old, new, ts, 10);
            e.netns = 5;
            e.valid |= tcpwatch_common::valid::NETNS;
            decode(&encode(&e)).unwrap()
        };
        feed(
            &mut s,
            &[ours(Close, SynSent, 1), ours(SynSent, Established, 2)],
        );
        let unlisted = s.unlisted(&KernelSockets::default());
        assert_eq!(unlisted.len(), 1, "{unlisted:?}");
        let (sk, mark) = unlisted[0];
        assert!(s.drop_unchanged(sk, mark));
        assert_eq!(s.owners.tracked(), 0);
        assert!(s.last_ts.get(&sk).is_none());
    }
}
