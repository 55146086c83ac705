//! `tcpwatch record`: the raw event stream into a file, for `replay`.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use crate::stream::context::Context;
use crate::stream::pipeline::{Batch, Consumer, Totals};
use crate::stream::record::{RecordError, Recorder};
use crate::views::summary::{ExitSummary, RecordSummary};

/// Writes every record that decoded, exactly as the kernel wrote it.
pub struct RecordSink {
    recorder: Recorder<BufWriter<File>>,
    path: PathBuf,
}

impl RecordSink {
    /// Creates the file, its header and snapshot section from `ctx`. It is
    /// built only once the probe is live, so a probe that fails to load
    /// leaves no empty recording behind.
    pub fn build(path: &Path, ctx: &Context) -> Result<RecordSink, RecordError> {
        Ok(RecordSink {
            recorder: Recorder::create(path, ctx.header(), ctx.snapshot.as_ref())?,
            path: path.to_path_buf(),
        })
    }
}

fn io_error(e: RecordError) -> io::Error {
    io::Error::other(e)
}

impl Consumer for RecordSink {
    fn records(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        self.recorder.write(batch.events).map_err(io_error)?;
        // Whole batches reach the file promptly, so a killed recorder loses
        // at most the last moment.
        self.recorder.flush().map_err(io_error)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.recorder.flush().map_err(io_error)
    }

    fn summary(&self, totals: &Totals) -> ExitSummary {
        ExitSummary::Record(RecordSummary {
            recorded: self.recorder.events,
            file: self.path.clone(),
            stream: totals.stream(),
        })
    }
}
