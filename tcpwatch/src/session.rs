//! A tracing session: loads the probe, starts the ring-buffer reader, and
//! hands records to a command until the user stops it (Ctrl-C, SIGTERM) or
//! `--duration` runs out. Shared by every command that traces live.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::probe::{Probe, ProbeError, ProbeOptions};
use crate::ringbuf::{run_reader, Feed, ReaderOptions};

/// What a command does with the feed.
pub trait Sink {
    /// Handles one message from the reader. Returning `false` ends the
    /// session (e.g. the output pipe was closed).
    fn feed(&mut self, feed: Feed) -> bool;
    /// Called about every `tick` with the monotonic time, for work that
    /// depends on time passing (flushes, timeouts).
    fn tick(&mut self, _now_mono_ns: u64) -> bool {
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Probe(#[from] ProbeError),
    #[error("ring buffer reader failed: {0}")]
    Reader(std::io::Error),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
}

pub struct SessionOptions {
    pub probe: ProbeOptions,
    pub duration: Option<Duration>,
    pub tick: Duration,
}

/// Loads and attaches, then calls `ready` once (the probe is live: anything
/// that happens from now on is seen), then runs until stopped.
pub async fn run<S: Sink>(
    opts: SessionOptions,
    ready: impl FnOnce(&Probe, &mut S),
    sink: &mut S,
) -> Result<(), SessionError> {
    let mut probe = Probe::load(&opts.probe)?;
    let ring = probe.take_ring()?;
    let lost = probe.take_lost_counter()?;
    ready(&probe, sink);

    let (tx, mut rx) = mpsc::channel::<Feed>(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader = tokio::spawn(run_reader(
        ring,
        lost,
        tx,
        stop_rx,
        ReaderOptions::default(),
    ));

    let mut sigint = signal(SignalKind::interrupt()).map_err(SessionError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(SessionError::Signal)?;
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(opts.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut stopping = false;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(feed) => {
                    if !sink.feed(feed) && !stopping {
                        stopping = true;
                        let _ = stop_tx.send(true);
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                if !sink.tick(crate::clock::monotonic_ns()) && !stopping {
                    stopping = true;
                    let _ = stop_tx.send(true);
                }
            }
            _ = sigint.recv(), if !stopping => { stopping = true; let _ = stop_tx.send(true); }
            _ = sigterm.recv(), if !stopping => { stopping = true; let _ = stop_tx.send(true); }
            _ = &mut deadline, if !stopping => { stopping = true; let _ = stop_tx.send(true); }
        }
    }
    let result = reader.await;
    // Keep the probe attached until the reader has drained the last records.
    drop(probe);
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SessionError::Reader(e)),
        Err(join) => Err(SessionError::Reader(std::io::Error::other(
            join.to_string(),
        ))),
    }
}
