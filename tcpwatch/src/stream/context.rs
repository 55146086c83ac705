//! What every consumer of the event stream is built from: the facts about
//! where the events come from. A live session reads them from the host
//! once the probe is live; a replay reads them from the recording's header,
//! which stores exactly these.

use crate::host::clock::{monotonic_ns, Clock};
use crate::host::netns::{NetnsError, Selection};
use crate::kernel::probe::Programs;
use crate::model::correlate::{Correlator, CorrelatorOptions};
use crate::model::snapshot::SocketSnapshot;
use crate::stream::record::Header;

/// Where the events come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The kernel, from CLOCK_MONOTONIC `started_ns` on (when the snapshot
    /// was taken, with the probe already live).
    Live { started_ns: u64 },
    /// A recording.
    Replay,
}

/// The facts a consumer is built from.
#[derive(Clone, Debug)]
pub struct Context {
    /// Turns the events' CLOCK_MONOTONIC stamps into wall-clock time.
    pub clock: Clock,
    /// The network namespace the stream is about (`--netns`, by default
    /// the one tcpwatch or the recorder ran in): the one whose sockets the
    /// snapshot lists and whose `tcp_fin_timeout` applies; `None` when
    /// unknown.
    pub netns: Option<u32>,
    /// `net.ipv4.tcp_fin_timeout` in seconds.
    pub fin_timeout_s: u32,
    /// Owners of the sockets that existed before tracing began, when
    /// /proc could be read.
    pub snapshot: Option<SocketSnapshot>,
    pub source: Source,
    /// Live only: the namespaces the run covers, to read their kernels.
    pub scope: Option<Selection>,
    /// The live probe's programs, for their kernel figures; `None` for a
    /// replay.
    pub programs: Option<Programs>,
}

impl Context {
    /// This host now, for the namespaces `scope` selects. Called once the
    /// probe is live, so that no socket falls between the snapshot and the
    /// first event. The snapshot and `tcp_fin_timeout` are the primary
    /// namespace's, read from inside it.
    pub fn live(scope: Selection, programs: Programs) -> Result<Context, NetnsError> {
        let ns = scope.primary();
        let (snapshot, fin_timeout_s) =
            ns.run_in(|| (crate::host::procfs::capture(), crate::host::fin_timeout_s()))?;
        let snapshot = match snapshot {
            Ok(s) => Some(s),
            Err(e) => {
                let e = anyhow::Error::from(e);
                tracing::warn!("owners of sockets older than this trace are unknown: {e:#}");
                None
            }
        };
        Ok(Context {
            clock: Clock::system(),
            netns: Some(ns.inode).filter(|n| *n != 0),
            fin_timeout_s,
            snapshot,
            source: Source::Live {
                started_ns: monotonic_ns(),
            },
            scope: Some(scope),
            programs: Some(programs),
        })
    }

    /// What a recording's header and snapshot section say.
    pub fn recorded(header: &Header, snapshot: SocketSnapshot) -> Context {
        Context {
            clock: Clock::with_offset_ns(i128::from(header.clock_offset_ns)),
            netns: Some(header.netns).filter(|n| *n != 0),
            fin_timeout_s: header.fin_timeout_s,
            snapshot: Some(snapshot),
            source: Source::Replay,
            scope: None,
            programs: None,
        }
    }

    /// The header a recording of this stream starts with.
    pub fn header(&self) -> Header {
        Header {
            clock_offset_ns: self.clock.offset_ns() as i64,
            netns: self.netns.unwrap_or(0),
            fin_timeout_s: self.fin_timeout_s,
        }
    }

    /// The correlator's options for at most `max_sockets` sockets.
    pub fn correlator_options(&self, max_sockets: usize) -> CorrelatorOptions {
        crate::host::correlator_options(max_sockets, self.fin_timeout_s)
    }

    /// The correlator for this stream, following at most `max_sockets`
    /// sockets: it knows the sockets from before tracing, and live, when
    /// tracing began and the kernel's list of timewait sockets, which tells
    /// what became of a socket handed to a FIN_WAIT2 timewait socket.
    pub fn correlator(&self, max_sockets: usize) -> Correlator {
        let mut c = Correlator::new(
            self.correlator_options(max_sockets),
            self.snapshot.clone(),
            self.netns,
        );
        if let Source::Live { started_ns } = self.source {
            // Every socket first seen in mid-life existed by then.
            c.set_traced_since(started_ns);
            let scope = self.scope.clone().unwrap_or_else(Selection::own);
            c.set_timewait_lookup(Box::new(crate::host::sockdiag::HandoffLookup::new(scope)));
        }
        c
    }

    /// When live tracing began; `None` for a replay.
    pub fn live_since_ns(&self) -> Option<u64> {
        match self.source {
            Source::Live { started_ns } => Some(started_ns),
            Source::Replay => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_header_round_trips_through_the_context() {
        let header = Header {
            clock_offset_ns: 1_795_392_000_000_000_000,
            netns: 4026531840,
            fin_timeout_s: 30,
        };
        let ctx = Context::recorded(&header, SocketSnapshot::from_entries(Vec::new()));
        assert_eq!(ctx.header(), header);
        assert_eq!(ctx.source, Source::Replay);
        assert_eq!(ctx.correlator_options(7).fin_timeout_ns, 30_000_000_000);
        let unknown = Context::recorded(
            &Header { netns: 0, ..header },
            SocketSnapshot::from_entries(Vec::new()),
        );
        assert_eq!(unknown.netns, None);
    }
}
