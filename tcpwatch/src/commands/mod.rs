//! The commands: each builds its consumer of the event stream from the
//! stream's context and says what it saw when the stream ends. [`run`] is
//! the one path every command that reads events takes, live or from a
//! recording.

pub mod bench;
pub mod conns;
pub mod record;
pub mod timewait;
pub mod top;
pub mod trace;

use std::path::PathBuf;

use crate::stream::context::Context;
use crate::stream::error::StreamError;
use crate::stream::pipeline::Consumer;
use crate::stream::session::{self, SessionOptions};
use crate::views::Format;

/// Where a command's events come from.
pub enum Source {
    /// The kernel, through a probe this process loads.
    Live(SessionOptions),
    /// A file written by `tcpwatch record`.
    Recording(PathBuf),
}

/// Builds the consumer once the stream's context is known, runs the stream
/// through it, prints its exit summary in `summary` format, and says how
/// the stream ended.
pub async fn run<C: Consumer>(
    source: Source,
    summary: Format,
    build: impl FnOnce(&Context) -> Result<C, StreamError>,
) -> Result<(), StreamError> {
    let ended = match source {
        Source::Live(opts) => session::run(opts, build).await?,
        Source::Recording(path) => crate::stream::replay::run_file(&path, build)?,
    };
    ended.summary().print(summary);
    ended.result()
}
