//! A live session: loads and attaches the probe, takes the snapshot of
//! the sockets that already exist once the probe is live, builds the
//! command's consumer from that [`Context`], says that tracing began, and
//! hands it every batch through the pipeline's front until the user stops
//! it (Ctrl-C, SIGTERM) or `--duration` runs out.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::host::netns::Selection;
use crate::kernel::probe::{Probe, ProbeOptions};
use crate::kernel::ringbuf::{run_reader, Feed, ReaderOptions};
use crate::model::decode::Rejects;
use crate::stream::context::Context;
use crate::stream::error::StreamError;
use crate::stream::pipeline::{Consumer, Ended, Pipeline};

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
    /// Said once the consumer is built (see [`Consumer::live`]): that
    /// tracing began (always, so scripts and tests know when to start).
    pub announce: String,
    /// Least time between two lost-event warnings (zero: every growth).
    pub lost_log_every: Duration,
    /// The network namespaces whose events are kept.
    pub netns: Selection,
}

impl SessionOptions {
    /// A command's session: `what` it traces in the namespaces `netns`
    /// selects, every loss said.
    pub fn command(
        probe: ProbeOptions,
        duration: Option<Duration>,
        what: &str,
        netns: Selection,
    ) -> Self {
        SessionOptions {
            probe,
            duration,
            announce: format!("tracing {what}; Ctrl-C to stop"),
            lost_log_every: Duration::ZERO,
            netns,
        }
    }
}

/// Hands one feed message to the pipeline.
fn deliver<C: Consumer>(pipeline: &mut Pipeline<C>, feed: Feed) -> std::io::Result<()> {
    match feed {
        Feed::Records {
            events,
            undecodable,
            first_error,
            drained_at_ns,
        } => pipeline.raw(
            events,
            Rejects {
                count: undecodable,
                first: first_error,
            },
            drained_at_ns,
        ),
        Feed::Lost(counts) => {
            pipeline.lost(counts);
            Ok(())
        }
    }
}

/// Runs a session. An error before the consumer is built (the probe does
/// not load, the consumer cannot be built) is `Err`; once it runs, the
/// session always ends with its consumer and figures, and how it stopped.
pub async fn run<C: Consumer>(
    opts: SessionOptions,
    build: impl FnOnce(&Context) -> Result<C, StreamError>,
) -> Result<Ended<C>, StreamError> {
    // Signals are caught from before the probe is live, so a Ctrl-C right
    // after "tracing" still ends the session cleanly.
    let mut sigint = signal(SignalKind::interrupt()).map_err(StreamError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(StreamError::Signal)?;
    let mut probe = Probe::load(&opts.probe)?;
    let ring = probe.take_ring()?;
    let lost = probe.take_lost_counter()?;
    // The probe is live: the snapshot first, as once "tracing" is said,
    // sockets may close.
    let keep = opts.netns.inodes();
    let sweeper = crate::host::sweeper(opts.netns.primary());
    let ctx = Context::live(opts.netns, probe.programs())?;
    let consumer = build(&ctx)?;
    for line in &probe.degraded {
        tracing::warn!("degraded: {line}");
    }
    for line in &probe.classic {
        tracing::warn!("{line}");
    }
    if let Some(line) = &probe.per_transition {
        tracing::warn!("{line}");
    }
    if let Some(line) = &probe.per_socket {
        tracing::info!("{line}");
    }
    if probe.mounted_tracefs {
        tracing::info!("mounted tracefs at /sys/kernel/tracing");
    }
    let mut pipeline = Pipeline::sweeping(consumer, sweeper, opts.lost_log_every).keeping(keep);
    pipeline.consumer_mut().live(&opts.announce);

    let (tx, mut rx) = mpsc::channel::<Feed>(channel_batches(opts.probe.ring_size));
    let (stop_tx, stop_rx) = watch::channel(false);
    let kernel_log = probe.take_kernel_log();
    let reader = tokio::spawn(run_reader(
        ring,
        lost,
        kernel_log,
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
                        if let Err(e) = deliver(&mut pipeline, feed) {
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
    let error = match (output_error, result) {
        (Some(e), _) => Some(StreamError::Output(e)),
        (None, Ok(Ok(()))) => None,
        (None, Ok(Err(e))) => Some(StreamError::Reader(e)),
        (None, Err(join)) => Some(StreamError::ReaderTask(join)),
    };
    Ok(pipeline.end(error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ringbuf::MAX_BATCH;
    use tcpwatch_common::Event;

    #[test]
    fn records_queued_for_the_stages_fit_in_the_ring_size() {
        for ring in [4096u32, 1 << 20, 16 << 20, 1 << 30] {
            let queued = channel_batches(ring) * MAX_BATCH * Event::SIZE;
            let floor = 4 * MAX_BATCH * Event::SIZE;
            assert!(queued <= (ring as usize).max(floor), "{ring}: {queued}");
        }
        assert_eq!(channel_batches(4096), 4);
        assert!(
            channel_batches(16 << 20) >= 64,
            "the default keeps 64 batches or more"
        );
    }
}
