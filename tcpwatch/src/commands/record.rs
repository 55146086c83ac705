//! `tcpwatch record`: the raw event stream into a file, for `replay`.
//!
//! With filters, only the events of sockets that match are written. The
//! decision is per socket, from its transitions' addresses and ports (each
//! carries them; the socket's other events do not): a connecting socket's
//! first transition comes before its local port is chosen, so where the
//! filter looks at the local side that event waits for the socket's next
//! transition. Events of sockets with no transition seen yet (open before
//! recording began) are kept, as their addresses are not known. Owners
//! (`--pid`, `--comm`) are often known only after a socket's first
//! transitions, so they are not recording filters: give them to `replay`.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use tcpwatch_common::Event;

use crate::model::decode::Record;
use crate::model::filter::{Filter, Verdict};
use crate::model::table::BoundedMap;
use crate::model::TcpState;
use crate::stream::context::Context;
use crate::stream::pipeline::{Batch, Consumer, Totals};
use crate::stream::record::{RecordError, Recorder};
use crate::views::summary::{ExitSummary, RecordSummary};

/// A socket's place in a filtered recording.
enum Kept {
    Yes,
    No,
    /// Undecided: its events so far, written if it turns out to match.
    Waiting(Vec<Event>),
}

/// Writes every record that decoded (of the sockets the filter keeps),
/// exactly as the kernel wrote it.
pub struct RecordSink {
    recorder: Recorder<BufWriter<File>>,
    path: PathBuf,
    filter: Filter,
    sockets: BoundedMap<u64, Kept>,
    /// Decoded events not written: their socket did not match.
    left_out: u64,
    out: Vec<Event>,
}

impl RecordSink {
    /// Creates the file, its header and snapshot section from `ctx`. It is
    /// built only once the probe is live, so a probe that fails to load
    /// leaves no empty recording behind. `filter` must have no owner
    /// filters (see the module's doc).
    pub fn build(
        path: &Path,
        filter: Filter,
        max_sockets: usize,
        ctx: &Context,
    ) -> Result<RecordSink, RecordError> {
        Ok(RecordSink {
            recorder: Recorder::create(path, ctx.header(), ctx.snapshot.as_ref())?,
            path: path.to_path_buf(),
            filter,
            sockets: BoundedMap::new(max_sockets.max(1)),
            left_out: 0,
            out: Vec::new(),
        })
    }

    /// Sorts one event: written now, held, or left out.
    fn sort(&mut self, event: &Event, record: &Record) {
        let Record::State(t) = record else {
            // A reset sent carries its own endpoints: for no socket, or
            // just after its socket's CLOSE, they decide.
            let own = match record {
                Record::Socket(s) => s.reset.and_then(|r| r.endpoints),
                Record::State(_) => None,
            };
            match self.sockets.get_mut(&record.skaddr()) {
                Some(Kept::No) => self.left_out += 1,
                Some(Kept::Waiting(held)) => held.push(*event),
                None if own.is_some_and(|(family, local, remote)| {
                    self.filter.socket_verdict(family, &local, &remote) == Verdict::Drop
                }) =>
                {
                    self.left_out += 1
                }
                Some(Kept::Yes) | None => self.out.push(*event),
            }
            return;
        };
        let verdict = self.filter.socket_verdict(t.family, &t.local, &t.remote);
        let held = match self.sockets.remove(&t.skaddr) {
            Some(Kept::Waiting(held)) => held,
            _ => Vec::new(),
        };
        match verdict {
            Verdict::Keep => {
                self.out.extend(held);
                self.out.push(*event);
            }
            Verdict::Drop => self.left_out += held.len() as u64 + 1,
            Verdict::Undecided => {
                let mut held = held;
                held.push(*event);
                if t.new != TcpState::Close {
                    self.remember(t.skaddr, Kept::Waiting(held));
                } else {
                    // Closed before its local side was set: it never
                    // matched.
                    self.left_out += held.len() as u64;
                }
                return;
            }
        }
        if t.new != TcpState::Close {
            let kept = if verdict == Verdict::Keep {
                Kept::Yes
            } else {
                Kept::No
            };
            self.remember(t.skaddr, kept);
        }
    }

    fn remember(&mut self, skaddr: u64, kept: Kept) {
        // Pushed out of a full table, a waiting socket's events are kept
        // rather than lost unseen.
        if let Some((_, Kept::Waiting(held))) = self.sockets.insert(skaddr, kept) {
            self.out.extend(held);
        }
    }
}

fn io_error(e: RecordError) -> io::Error {
    io::Error::other(e)
}

impl Consumer for RecordSink {
    fn records(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        if self.filter.is_empty() {
            self.recorder.write(batch.events).map_err(io_error)?;
        } else {
            for (event, record) in batch.events.iter().zip(batch.records) {
                self.sort(event, record);
            }
            let out = std::mem::take(&mut self.out);
            self.recorder.write(&out).map_err(io_error)?;
            self.out = out;
            self.out.clear();
        }
        // Whole batches reach the file promptly, so a killed recorder loses
        // at most the last moment.
        self.recorder.flush().map_err(io_error)
    }

    fn finish(&mut self) -> io::Result<()> {
        // Sockets still undecided at the end never showed a matching side.
        for (_, kept) in self.sockets.iter() {
            if let Kept::Waiting(held) = kept {
                self.left_out += held.len() as u64;
            }
        }
        self.recorder.flush().map_err(io_error)
    }

    fn summary(&self, totals: &Totals) -> ExitSummary {
        ExitSummary::Record(RecordSummary {
            recorded: self.recorder.events,
            file: self.path.clone(),
            filter: (!self.filter.is_empty()).then(|| self.filter.describe()),
            left_out: self.left_out,
            stream: totals.stream(),
        })
    }
}
