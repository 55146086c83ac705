//! The tcpwatch binary: parses arguments and wires the library's stages.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use tcpwatch::cli::{self, Command, TraceArgs};
use tcpwatch::clock::Clock;
use tcpwatch::owner::OwnerTracker;
use tcpwatch::probe::ProbeOptions;
use tcpwatch::procfs::SocketSnapshot;
use tcpwatch::session::{self, SessionOptions};
use tcpwatch::trace::TraceSink;

fn own_netns() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|m| m.ino() as u32)
}

fn probe_options(ring_size: u32, btf: &std::path::Path) -> ProbeOptions {
    ProbeOptions {
        ring_size,
        wakeup_bytes: u64::from(ring_size / 8),
        btf_path: btf.to_path_buf(),
    }
}

async fn trace(args: TraceArgs) -> Result<(), session::SessionError> {
    let stdout = io::stdout();
    let out = io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut sink = TraceSink::new(
        out,
        args.format,
        args.filter.to_filter(),
        Clock::system(),
        OwnerTracker::new(args.probe.max_sockets, None, own_netns()),
        args.probe.max_sockets,
        Box::new(|m| eprintln!("{m}")),
    );
    let opts = SessionOptions {
        probe: probe_options(args.probe.ring_size, &args.probe.btf),
        duration: args.duration,
        tick: Duration::from_millis(200),
    };
    let max_sockets = args.probe.max_sockets;
    let no_header = args.no_header;
    let mut header_err = None;
    let result = session::run(
        opts,
        |probe, sink| {
            for line in &probe.degraded {
                eprintln!("tcpwatch: degraded: {line}");
            }
            if probe.mounted_tracefs {
                eprintln!("tcpwatch: mounted tracefs at /sys/kernel/tracing");
            }
            // Taken after attaching, so no socket falls between the two.
            let snapshot = match SocketSnapshot::capture() {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("tcpwatch: owners of sockets older than this trace are unknown: {e}");
                    None
                }
            };
            sink.replace_owners(OwnerTracker::new(max_sockets, snapshot, own_netns()));
            if !no_header {
                header_err = sink.header().err();
            }
            // Always said, so scripts (and tests) know the probe is live.
            eprintln!("tcpwatch: tracing TCP state transitions; Ctrl-C to stop");
        },
        &mut sink,
    )
    .await;
    let _ = header_err;
    eprint!("{}", sink.summary.render());
    result
}

fn main() -> ExitCode {
    let cli = cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcpwatch: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Trace(args) => trace(args).await,
        }
    });
    let _ = io::stdout().flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpwatch: {e}");
            ExitCode::from(1)
        }
    }
}
