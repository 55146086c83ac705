//! `tcpwatch trace`: one line per transition, with the socket's real owner
//! and the time since its previous transition.

use std::io::{self, Write};

use crate::host::clock::Clock;
use crate::model::decode::{interpret_all, Record, Rejects};
use crate::model::filter::Filter;
use crate::model::owner::OwnerTracker;
use crate::model::table::BoundedMap;
use crate::stream::session::Sink;
use crate::views::{trace_json, trace_text, Format, Summary, TraceLine, TRACE_HEADER};
use tcpwatch_common::Event;

/// Turns records into trace lines written to `out`.
pub struct TraceSink<W: Write> {
    out: W,
    format: Format,
    filter: Filter,
    clock: Clock,
    owners: OwnerTracker,
    last_ts: BoundedMap<u64, u64>,
    pub summary: Summary,
    /// Where lost-event and decode warnings go (stderr in the binary).
    warn: Box<dyn FnMut(&str) + Send>,
    /// Live only: checks the owner table against the kernel after losses.
    sweep: Option<crate::model::sweep::Sweeper>,
}

impl<W: Write> TraceSink<W> {
    pub fn new(
        out: W,
        format: Format,
        filter: Filter,
        clock: Clock,
        owners: OwnerTracker,
        max_sockets: usize,
        warn: Box<dyn FnMut(&str) + Send>,
    ) -> Self {
        TraceSink {
            out,
            format,
            filter,
            clock,
            owners,
            last_ts: BoundedMap::new(max_sockets),
            sweep: None,
            summary: Summary::default(),
            warn,
        }
    }

    /// After lost events, drops the sockets the kernel no longer has (see
    /// `sweep`): for live tracing, never for a replay.
    pub fn sweep_stale(&mut self) {
        self.sweep = Some(crate::model::sweep::Sweeper::default());
    }

    /// Swaps in an owner tracker (the binary builds one with the /proc
    /// snapshot once the probe is attached).
    pub fn replace_owners(&mut self, owners: OwnerTracker) {
        self.owners = owners;
    }

    pub fn header(&mut self) -> io::Result<()> {
        if self.format == Format::Text {
            writeln!(self.out, "{TRACE_HEADER}")?;
            self.out.flush()?;
        }
        Ok(())
    }

    fn record(&mut self, r: &Record) -> io::Result<()> {
        let Record::State(t) = r else {
            return Ok(());
        };
        self.summary.count(t);
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
        self.summary.shown += 1;
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

    /// Handles records directly (replay and tests).
    pub fn records(&mut self, records: &[Record]) -> io::Result<()> {
        for r in records {
            self.record(r)?;
        }
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Sink for TraceSink<W> {
    fn events(
        &mut self,
        events: &[Event],
        mut rejects: Rejects,
        settled_ns: u64,
    ) -> io::Result<()> {
        let records = interpret_all(events, &mut rejects);
        if let Some(w) = rejects.warning() {
            self.summary.decode_errors += rejects.count;
            (self.warn)(&w);
        }
        self.records(&records)?;
        self.summary.tracking = self.owners.tracking();
        if let Some(sweep) = &mut self.sweep {
            for skaddr in sweep.tick(settled_ns, &mut self.owners, &mut *self.warn) {
                self.last_ts.remove(&skaddr);
            }
            self.summary.tracking.at_exit = self.owners.tracked();
            self.summary.tracking.stale = sweep.dropped;
        }
        Ok(())
    }

    fn lost(&mut self, counts: crate::kernel::probe::LostCounts) {
        (self.warn)(&self.summary.lost.advance(counts));
        if let Some(sweep) = &mut self.sweep {
            sweep.lost(counts.total());
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decode::tests::state_event;
    use crate::model::decode::{decode, encode};
    use crate::model::TcpState::*;
    use std::sync::{Arc, Mutex};

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

    fn sink(filter: Filter, format: Format) -> (TraceSink<Vec<u8>>, Arc<Mutex<Vec<String>>>) {
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let w = warnings.clone();
        let s = TraceSink::new(
            Vec::new(),
            format,
            filter,
            Clock::with_offset_ns(0),
            OwnerTracker::new(100, None, None),
            100,
            Box::new(move |m| w.lock().unwrap().push(m.to_string())),
        );
        (s, warnings)
    }

    #[test]
    fn prints_owner_and_delta_per_socket() {
        let (mut s, _) = sink(Filter::default(), Format::Json);
        let events = vec![
            ev(1, Close, SynSent, 1_000_000, 10),
            ev(2, Close, SynSent, 1_500_000, 20),
            ev(1, SynSent, Established, 3_000_000, 0),
        ];
        s.events(&events, Rejects::default(), 0).unwrap();
        let out = String::from_utf8(s.into_inner()).unwrap();
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
        let (mut s, _) = sink(f, Format::Json);
        s.records(&[
            rec(1, Close, SynSent, 1, 10),
            rec(2, Close, SynSent, 2, 20),
            // current task is 20 here, but the socket is 10's
            rec(1, SynSent, Established, 3, 20),
            rec(2, SynSent, Established, 4, 10),
        ])
        .unwrap();
        assert_eq!(s.summary.seen, 4);
        assert_eq!(s.summary.shown, 2);
        let out = String::from_utf8(s.into_inner()).unwrap();
        assert_eq!(out.lines().count(), 2);
        assert!(out.lines().all(|l| l.contains("\"pid\":10")), "{out}");
    }

    #[test]
    fn lost_events_are_reported_as_they_happen() {
        let (mut s, warnings) = sink(Filter::default(), Format::Text);
        s.lost(crate::kernel::probe::LostCounts {
            ring_full: 5,
            skipped: 0,
        });
        s.lost(crate::kernel::probe::LostCounts {
            ring_full: 9,
            skipped: 3,
        });
        let w = warnings.lock().unwrap();
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("LOST 5 events"), "{}", w[0]);
        assert!(
            w[1].contains("LOST 7 events")
                && w[1].contains("12 in all")
                && w[1].contains("3 skipped by the kernel"),
            "{}",
            w[1]
        );
        assert_eq!(s.summary.lost.total(), 12);
    }
}
