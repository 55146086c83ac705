//! A tracing session: loads the probe, starts the ring-buffer reader, and
//! hands records to a sink until the user stops it (Ctrl-C, SIGTERM) or
//! `--duration` runs out. Shared by every command that traces live; replay
//! drives the same sinks from a file.

use std::io;
use std::time::Duration;

use tcpwatch_common::Event;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::kernel::probe::{LostCounts, Probe, ProbeError, ProbeOptions};
use crate::kernel::ringbuf::{run_reader, Feed, ReaderOptions};
use crate::model::decode::Rejects;

/// What a command does with the event stream.
pub trait Sink {
    /// A batch of raw events in ring order. Every event stamped before
    /// `settled_ns` has been delivered by now.
    fn events(&mut self, events: &[Event], rejects: Rejects, settled_ns: u64) -> io::Result<()>;
    /// The kernel's lost-event counts have grown to `lost`.
    fn lost(&mut self, lost: LostCounts);
    /// The stream ended: write out whatever is still held.
    fn finish(&mut self) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Probe(#[from] ProbeError),
    #[error("ring buffer reader failed: {0}")]
    Reader(io::Error),
    #[error("cannot install signal handler: {0}")]
    Signal(io::Error),
    #[error("writing output failed: {0}")]
    Output(io::Error),
}

/// Record batches the reader may queue for the stages: as many records as
/// the ring buffer holds (at least 4 batches), so that what waits in
/// tcpwatch's memory is bounded by `--ring-size` too.
pub fn channel_batches(ring_size: u32) -> usize {
    let batch_bytes = crate::kernel::ringbuf::MAX_BATCH * (tcpwatch_common::Event::SIZE + 8);
    (ring_size as usize / batch_bytes).max(4)
}

pub struct SessionOptions {
    pub probe: ProbeOptions,
    pub duration: Option<Duration>,
}

/// Hands one feed message to the sink.
fn deliver<S: Sink>(sink: &mut S, feed: Feed) -> io::Result<()> {
    match feed {
        Feed::Records {
            events,
            undecodable,
            first_error,
            drained_at_ns,
        } => sink.events(
            &events,
            Rejects {
                count: undecodable,
                first: first_error,
            },
            drained_at_ns,
        ),
        Feed::Lost(counts) => {
            sink.lost(counts);
            Ok(())
        }
    }
}

/// A closed pipe (`tcpwatch trace | head`) ends the session quietly.
fn output_result(e: io::Error) -> Result<(), SessionError> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(SessionError::Output(e))
    }
}

/// Loads and attaches, then calls `ready` once (the probe is live: anything
/// that happens from now on is seen), then runs until stopped.
pub async fn run<S: Sink>(
    opts: SessionOptions,
    ready: impl FnOnce(&Probe, &mut S),
    sink: &mut S,
) -> Result<(), SessionError> {
    // Signals are caught from before the probe is live, so a Ctrl-C right
    // after "tracing" still ends the session cleanly.
    let mut sigint = signal(SignalKind::interrupt()).map_err(SessionError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(SessionError::Signal)?;
    let mut probe = Probe::load(&opts.probe)?;
    let ring = probe.take_ring()?;
    let lost = probe.take_lost_counter()?;
    ready(&probe, sink);

    let (tx, mut rx) = mpsc::channel::<Feed>(channel_batches(opts.probe.ring_size));
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader = tokio::spawn(run_reader(
        ring,
        lost,
        tx,
        stop_rx,
        ReaderOptions::default(),
    ));

    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);

    let mut stopping = false;
    let mut output_error = None;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(feed) => {
                    if output_error.is_none() {
                        if let Err(e) = deliver(sink, feed) {
                            output_error = Some(e);
                            stopping = true;
                            let _ = stop_tx.send(true);
                        }
                    }
                }
                None => break,
            },
            _ = sigint.recv(), if !stopping => { stopping = true; let _ = stop_tx.send(true); }
            _ = sigterm.recv(), if !stopping => { stopping = true; let _ = stop_tx.send(true); }
            _ = &mut deadline, if !stopping => { stopping = true; let _ = stop_tx.send(true); }
        }
    }
    let result = reader.await;
    // Detach only once the reader has drained the last records.
    drop(probe);
    if let Some(e) = output_error {
        return output_result(e);
    }
    if let Err(e) = sink.finish() {
        return output_result(e);
    }
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SessionError::Reader(e)),
        Err(join) => Err(SessionError::Reader(io::Error::other(join.to_string()))),
    }
}
