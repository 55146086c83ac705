//! Driving a consumer from a recording instead of the kernel: the
//! recording's header gives the [`Context`], and its records go through
//! the same pipeline front as a live session's.

use std::io;
use std::path::Path;

use tcpwatch_common::Event;

use crate::model::decode::{Record, Rejects};
use crate::stream::context::Context;
use crate::stream::error::StreamError;
use crate::stream::pipeline::{Consumer, Ended, Pipeline};
use crate::stream::record::Replay;

const BATCH: usize = 4096;

/// Opens `path` and replays it (see [`run`]).
pub fn run_file<C: Consumer>(
    path: &Path,
    build: impl FnOnce(&Context) -> Result<C, StreamError>,
) -> Result<Ended<C>, StreamError> {
    let mut replay = Replay::open(path)?;
    run(&mut replay, build)
}

/// Builds the consumer from the recording's context and feeds it every
/// valid record, then finishes it. A damaged file still has its valid
/// prefix processed and written before the error. A file that ends partway
/// through a record (its recorder was killed) is read to its last whole
/// record, with a warning.
pub fn run<R: io::Read, C: Consumer>(
    replay: &mut Replay<R>,
    build: impl FnOnce(&Context) -> Result<C, StreamError>,
) -> Result<Ended<C>, StreamError> {
    let ctx = Context::recorded(&replay.header, replay.snapshot.clone());
    let mut pipeline = Pipeline::replay(build(&ctx)?);
    let mut events = Vec::with_capacity(BATCH);
    let mut records = Vec::with_capacity(BATCH);
    let mut error = None;
    loop {
        match replay.next_record() {
            Ok(Some((event, record))) => {
                events.push(event);
                records.push(record);
                if events.len() == BATCH {
                    if let Err(e) = deliver(&mut pipeline, &mut events, &mut records) {
                        error = Some(StreamError::Output(e));
                        break;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(e.into());
                break;
            }
        }
    }
    // The valid prefix of a damaged file is still shown.
    if let Err(e) = deliver(&mut pipeline, &mut events, &mut records) {
        error.get_or_insert(StreamError::Output(e));
    }
    if let Some(warning) = replay.warning() {
        tracing::warn!("{warning}");
    }
    Ok(pipeline.end(error))
}

fn deliver<C: Consumer>(
    pipeline: &mut Pipeline<C>,
    events: &mut Vec<Event>,
    records: &mut Vec<Record>,
) -> io::Result<()> {
    // In a recording everything up to the last event is settled.
    let settled = events.last().map_or(0, |e| e.ts_ns);
    let result = pipeline.decoded(events, records, Rejects::default(), settled);
    events.clear();
    records.clear();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decode::tests::state_event;
    use crate::model::TcpState::*;
    use crate::stream::pipeline::tests::Collect;
    use crate::stream::record::{Header, Recorder};
    use std::path::Path;

    fn recording(events: &[Event]) -> Vec<u8> {
        let header = Header {
            clock_offset_ns: 0,
            netns: 0,
            fin_timeout_s: 60,
        };
        let mut r = Recorder::new(Vec::new(), header, None).unwrap();
        r.write(events).unwrap();
        r.into_inner()
    }

    #[test]
    fn recording_cut_mid_record_replays_its_whole_records_without_failing() {
        let events = [
            state_event(1, Close, SynSent, 10),
            state_event(1, SynSent, Established, 20),
        ];
        let bytes = recording(&events);
        let cut = &bytes[..bytes.len() - Event::SIZE / 2];
        let mut replay = Replay::new(cut, Path::new("cut.rec")).unwrap();
        let ended = run(&mut replay, |_| Ok(Collect::default())).unwrap();
        assert!(ended.error.is_none());
        assert_eq!(ended.totals.events, 1);
        assert_eq!(
            (ended.consumer.events.as_slice(), ended.consumer.finished),
            (&events[..1], true)
        );
        assert!(replay.warning().is_some());
    }

    #[test]
    fn a_damaged_recording_gives_its_valid_prefix_then_the_error() {
        let events = [
            state_event(1, Close, SynSent, 10),
            state_event(1, SynSent, Established, 20),
        ];
        let mut bytes = recording(&events);
        let second = bytes.len() - crate::stream::record::RECORD_SIZE;
        bytes[second + std::mem::offset_of!(Event, kind)] = 0xee;
        let mut replay = Replay::new(&bytes[..], Path::new("bad.rec")).unwrap();
        let ended = run(&mut replay, |ctx| {
            assert_eq!(ctx.fin_timeout_s, 60);
            Ok(Collect::default())
        })
        .unwrap();
        assert_eq!(ended.consumer.events, events[..1]);
        assert!(ended.consumer.finished);
        let err = ended.result().unwrap_err().to_string();
        assert!(err.contains(&format!("byte offset {second}")), "{err}");
    }
}
