//! Driving a sink from a recording instead of the kernel.

use std::io;

use crate::model::decode::Rejects;
use crate::stream::record::{RecordError, Replay};
use crate::stream::session::Sink;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Record(#[from] RecordError),
    #[error("writing output failed: {0}")]
    Output(io::Error),
}

const BATCH: usize = 4096;

/// Feeds every valid record to the sink, then finishes it. A damaged file
/// still has its valid prefix processed and written before the error. A
/// file that ends partway through a record (its recorder was killed) is
/// read to its last whole record, with a warning on stderr.
pub fn run<R: io::Read, S: Sink>(replay: &mut Replay<R>, sink: &mut S) -> Result<u64, ReplayError> {
    let mut batch = Vec::with_capacity(BATCH);
    let mut count = 0u64;
    let mut failure = None;
    loop {
        match replay.next_record() {
            Ok(Some((event, _))) => {
                batch.push(event);
                if batch.len() == BATCH {
                    deliver(sink, &mut batch, &mut count)?;
                }
            }
            Ok(None) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    deliver(sink, &mut batch, &mut count)?;
    if let Some(warning) = replay.warning() {
        eprintln!("{warning}");
    }
    match sink.finish() {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(ReplayError::Output(e)),
        _ => {}
    }
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(count),
    }
}

fn deliver<S: Sink>(
    sink: &mut S,
    batch: &mut Vec<tcpwatch_common::Event>,
    count: &mut u64,
) -> Result<(), ReplayError> {
    // In a recording everything up to the last event is settled.
    let settled = batch.last().map_or(0, |e| e.ts_ns);
    *count += batch.len() as u64;
    sink.events(batch, Rejects::default(), settled)
        .map_err(ReplayError::Output)?;
    batch.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::probe::LostCounts;
    use crate::model::decode::tests::state_event;
    use crate::model::TcpState::*;
    use crate::stream::record::{Header, Recorder};
    use std::path::Path;
    use tcpwatch_common::Event;

    #[derive(Default)]
    struct Collect(Vec<Event>, bool);

    impl Sink for Collect {
        fn events(&mut self, events: &[Event], _: Rejects, _: u64) -> io::Result<()> {
            self.0.extend_from_slice(events);
            Ok(())
        }
        fn lost(&mut self, _: LostCounts) {}
        fn finish(&mut self) -> io::Result<()> {
            self.1 = true;
            Ok(())
        }
    }

    #[test]
    fn recording_cut_mid_record_replays_its_whole_records_without_failing() {
        let events = [
            state_event(1, Close, SynSent, 10),
            state_event(1, SynSent, Established, 20),
        ];
        let header = Header {
            clock_offset_ns: 0,
            netns: 0,
            fin_timeout_s: 60,
        };
        let mut r = Recorder::new(Vec::new(), header, None).unwrap();
        r.write(&events).unwrap();
        let bytes = r.into_inner();
        let cut = &bytes[..bytes.len() - Event::SIZE / 2];
        let mut replay = Replay::new(cut, Path::new("cut.rec")).unwrap();
        let mut sink = Collect::default();
        assert_eq!(run(&mut replay, &mut sink).unwrap(), 1);
        assert_eq!((sink.0.as_slice(), sink.1), (&events[..1], true));
        assert!(replay.warning().is_some());
    }
}
