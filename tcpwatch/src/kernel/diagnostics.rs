//! The kernel program's own diagnostics, through aya-log: off unless asked
//! for (`--kernel-log`), and only ever said off the hot path (a socket
//! field that could not be read). Records are drained on the ring-buffer
//! reader's timer and said through `tracing`, target `tcpwatch::kernel`.

use aya::Ebpf;
use aya_log::EbpfLogger;

/// aya-log's level for the program: every level when asked for, none
/// otherwise (the verifier then prunes the logging code).
pub fn level(enabled: bool) -> u8 {
    if enabled {
        aya_log::Level::Trace.into()
    } else {
        0
    }
}

/// Hands aya-log's records to `tracing`, at their own level.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "tcpwatch::kernel", "{text}"),
            log::Level::Warn => tracing::warn!(target: "tcpwatch::kernel", "{text}"),
            log::Level::Info => tracing::info!(target: "tcpwatch::kernel", "{text}"),
            log::Level::Debug => tracing::debug!(target: "tcpwatch::kernel", "{text}"),
            log::Level::Trace => tracing::trace!(target: "tcpwatch::kernel", "{text}"),
        }
    }

    fn flush(&self) {}
}

/// The program's log records, waiting to be said.
pub struct KernelLog(EbpfLogger<ToTracing>);

impl KernelLog {
    /// Takes the program's log buffer.
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<KernelLog, aya_log::Error> {
        EbpfLogger::init_with_logger(ebpf, ToTracing).map(KernelLog)
    }

    /// Says every record waiting; never blocks.
    pub fn flush(&mut self) {
        self.0.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_means_level_zero() {
        assert_eq!(level(false), 0);
        // aya-log-ebpf enables a level when it is <= AYA_LOG_LEVEL.
        assert!(level(true) >= u8::from(aya_log::Level::Warn));
        assert!(level(true) > level(false));
    }
}
