//! Driving a sink from a recording instead of the kernel.

use std::io;

use crate::decode::Rejects;
use crate::record::{RecordError, Replay};
use crate::session::Sink;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Record(#[from] RecordError),
    #[error("writing output failed: {0}")]
    Output(io::Error),
}

const BATCH: usize = 4096;

/// Feeds every valid record to the sink, then finishes it. A damaged file
/// still has its valid prefix processed and written before the error.
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
