//! `tcpwatch trace`: one line per transition, with the socket's real owner
//! and the time since its previous transition.

use std::collections::BTreeMap;
use std::io::{self, Write};

use crate::host::clock::Clock;
use crate::model::decode::Record;
use crate::model::filter::Filter;
use crate::model::owner::OwnerTracker;
use crate::model::sweep::{KernelSockets, SweepTable};
use crate::model::table::BoundedMap;
use crate::stream::context::Context;
use crate::stream::pipeline::{Batch, Consumer, Totals};
use crate::views::summary::{ExitSummary, TraceSummary, TransitionCount};
use crate::views::{trace_json, trace_text, Format, TraceLine, TRACE_HEADER};

/// What the user asked `trace` for.
#[derive(Clone, Debug)]
pub struct TraceOptions {
    pub format: Format,
    pub filter: Filter,
    pub max_sockets: usize,
    /// Print the column header first (text format).
    pub header: bool,
}

/// Turns records into trace lines written to `out`.
pub struct TraceSink<W: Write> {
    out: W,
    format: Format,
    filter: Filter,
    clock: Clock,
    owners: OwnerTracker,
    last_ts: BoundedMap<u64, u64>,
    seen: u64,
    shown: u64,
    by_kind: BTreeMap<(&'static str, &'static str), u64>,
}

impl<W: Write> TraceSink<W> {
    /// The sink for a stream described by `ctx`; the owners of sockets
    /// from before tracing come from its snapshot.
    pub fn build(out: W, opts: TraceOptions, ctx: &Context) -> Self {
        let mut sink = TraceSink {
            out,
            format: opts.format,
            filter: opts.filter,
            clock: ctx.clock,
            owners: OwnerTracker::new(opts.max_sockets, ctx.snapshot.clone(), ctx.netns),
            last_ts: BoundedMap::new(opts.max_sockets),
            seen: 0,
            shown: 0,
            by_kind: BTreeMap::new(),
        };
        if opts.header && sink.format == Format::Text {
            // A closed pipe shows at the first line written.
            let _ = writeln!(sink.out, "{TRACE_HEADER}").and_then(|()| sink.out.flush());
        }
        sink
    }

    fn record(&mut self, r: &Record) -> io::Result<()> {
        let Record::State(t) = r else {
            return Ok(());
        };
        self.seen += 1;
        *self
            .by_kind
            .entry((t.old.name(), t.new.name()))
            .or_default() += 1;
        let owner = self.owners.observe(t);
        let delta_ns = self
            .last_ts
            .get(&t.skaddr)
            .map(|prev| t.ts_ns.saturating_sub(*prev));
        if t.new == crate::model::TcpState::Close {
            self.last_ts.remove(&t.skaddr);
        } else {
            self.last_ts.insert(t.skaddr, t.ts_ns);
        }
        if !self.filter.matches(
            t.family,
            &t.local,
            &t.remote,
            owner.as_ref().map(|a| &*a.owner),
        ) {
            return Ok(());
        }
        self.shown += 1;
        let line = TraceLine {
            t,
            owner: owner.as_ref(),
            delta_ns,
        };
        let text = match self.format {
            Format::Text => trace_text(&line, &self.clock),
            Format::Json => trace_json(&line, &self.clock),
        };
        writeln!(self.out, "{text}")
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Consumer for TraceSink<W> {
    fn records(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        for r in batch.records {
            self.record(r)?;
        }
        self.out.flush()
    }

    fn sweep_table(&mut self) -> Option<&mut dyn SweepTable> {
        Some(self)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn summary(&self, totals: &Totals) -> ExitSummary {
        let mut transitions: Vec<TransitionCount> = self
            .by_kind
            .iter()
            .map(|((old, new), count)| TransitionCount {
                old: old.to_string(),
                new: new.to_string(),
                count: *count,
            })
            .collect();
        // Most frequent first; ties in name order.
        transitions.sort_by_key(|t| std::cmp::Reverse(t.count));
        ExitSummary::Trace(TraceSummary {
            transitions_seen: self.seen,
            shown: self.shown,
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
