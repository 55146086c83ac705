//! Why a stream of events could not start or did not end cleanly.

use std::io;

use crate::host::netns::NetnsError;
use crate::kernel::probe::ProbeError;
use crate::stream::record::RecordError;

/// Each message says what failed; the cause follows it as the error's
/// source (the binary prints the chain as `message: cause`).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The probe could not be loaded or attached.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("ring buffer reader failed")]
    Reader(#[source] io::Error),
    #[error("ring buffer reader failed")]
    ReaderTask(#[source] tokio::task::JoinError),
    #[error("cannot install signal handler")]
    Signal(#[source] io::Error),
    #[error("writing output failed")]
    Output(#[source] io::Error),
    /// The network namespace to trace could not be read.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A recording could not be written or read.
    #[error(transparent)]
    Record(#[from] RecordError),
}
