//! Diagnostics on stderr. Everything tcpwatch has to say besides its
//! output goes through `tracing`; this module decides how it looks:
//! - the commands people run print one line per message, `tcpwatch: ...`
//!   (warnings such as lost events, and what the program is doing);
//! - the daemon writes a log: text with a time and level, or one JSON
//!   object a line (`--log-format json`) for a log collector.

use std::fmt;
use std::io::{self, IsTerminal};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// How the daemon's log is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The commands' format: `tcpwatch: ` and the message (then any fields as
/// `name=value`), one line each, at every level.
pub struct CliFormat;

impl<S, N> FormatEvent<S, N> for CliFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str("tcpwatch: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// The subscriber the commands use, writing to `writer`.
pub fn cli_subscriber<W>(writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .event_format(CliFormat)
        .finish()
}

/// Sends the commands' diagnostics to stderr as `tcpwatch: ...` lines.
pub fn init_cli() {
    let _ = tracing::subscriber::set_global_default(cli_subscriber(io::stderr));
}

/// Sends the daemon's log to stderr: text (coloured on a terminal) or one
/// JSON object a line.
pub fn init_daemon(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_target(false)
        .with_max_level(tracing::Level::INFO);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(io::stderr().is_terminal()).try_init(),
    };
}

/// An error and its causes on one line: `what failed: why: why`. A cause
/// the line already says is not said again (some errors, aya's among them,
/// print their source themselves as well as returning it).
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// Collects what is logged, for tests.
#[cfg(test)]
pub mod capture {
    use std::io;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Lines {
        pub fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` with the commands' log format collected into lines.
    pub fn cli<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = super::cli_subscriber(move || sink.clone());
        let out = tracing::subscriber::with_default(subscriber, f);
        (out, lines.lines())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_lines_are_prefixed_once_with_fields_after() {
        let ((), lines) = capture::cli(|| {
            tracing::warn!("LOST 5 events");
            tracing::info!(port = 80, "listening");
            tracing::debug!("not shown");
        });
        assert_eq!(
            lines,
            ["tcpwatch: LOST 5 events", "tcpwatch: listening port=80"]
        );
    }
}
