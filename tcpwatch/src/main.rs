//! The tcpwatch binary: parses arguments and wires the library's stages.

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use tcpwatch::cli::{
    self, Command, ConnsArgs, LadderArgs, RecordArgs, ReplayArgs, ReplayView, TimewaitArgs,
    TraceArgs,
};
use tcpwatch::commands::conns::{ConnsSink, View};
use tcpwatch::commands::trace::TraceSink;
use tcpwatch::daemon::client::{self, Daemon};
use tcpwatch::host::clock::Clock;
use tcpwatch::host::procfs::SocketSnapshot;
use tcpwatch::host::{self, correlator_options, fin_timeout_s, own_netns};
use tcpwatch::kernel::probe::Probe;
use tcpwatch::model::correlate::Correlator;
use tcpwatch::model::owner::OwnerTracker;
use tcpwatch::stream::record::{Header, Recorder, Replay};
use tcpwatch::stream::session::{self, SessionOptions};
use tcpwatch::views::Format;

/// Said once the probe is live: what is degraded, and that tracing began
/// (always, so scripts and tests know when to start).
fn announce(probe: &Probe, what: &str) {
    for line in &probe.degraded {
        eprintln!("tcpwatch: degraded: {line}");
    }
    if probe.mounted_tracefs {
        eprintln!("tcpwatch: mounted tracefs at /sys/kernel/tracing");
    }
    eprintln!("tcpwatch: tracing {what}; Ctrl-C to stop");
}

/// Owners of sockets that predate the trace (see `host::socket_snapshot`).
fn snapshot() -> Option<SocketSnapshot> {
    host::socket_snapshot(|m| eprintln!("{m}"))
}

fn stderr_warn() -> Box<dyn FnMut(&str) + Send> {
    Box::new(|m| eprintln!("{m}"))
}

async fn trace(args: TraceArgs) -> Result<(), session::SessionError> {
    let out = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let max = args.probe.max_sockets;
    let mut sink = TraceSink::new(
        out,
        args.format,
        args.filter.to_filter(),
        Clock::system(),
        OwnerTracker::new(max, None, own_netns()),
        max,
        stderr_warn(),
    );
    let opts = SessionOptions {
        probe: args.probe.options(),
        duration: args.duration,
    };
    let no_header = args.no_header;
    let mut started = false;
    let result = session::run(
        opts,
        |probe, sink| {
            started = true;
            // The snapshot first: once "tracing" is said, sockets may close.
            sink.replace_owners(OwnerTracker::new(max, snapshot(), own_netns()));
            sink.sweep_stale();
            announce(probe, "TCP state transitions");
            if !no_header {
                let _ = sink.header();
            }
        },
        &mut sink,
    )
    .await;
    if started {
        eprint!("{}", sink.summary.render());
    }
    result
}

async fn conns(
    view: View,
    filter: cli::FilterArgs,
    probe: cli::ProbeArgs,
    duration: Option<std::time::Duration>,
    no_header: bool,
) -> Result<(), session::SessionError> {
    let out = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let copts = correlator_options(probe.max_sockets, fin_timeout_s());
    let mut sink = ConnsSink::new(
        out,
        view,
        filter.to_filter(),
        Clock::system(),
        Correlator::new(copts, None, own_netns()),
        stderr_warn(),
    );
    let opts = SessionOptions {
        probe: probe.options(),
        duration,
    };
    let mut started = false;
    let result = session::run(
        opts,
        |probe, sink| {
            started = true;
            sink.replace_correlator(Correlator::new(copts, snapshot(), own_netns()));
            sink.sweep_stale();
            announce(probe, "TCP connections");
            if !no_header {
                let _ = sink.header();
            }
        },
        &mut sink,
    )
    .await;
    if started {
        eprint!("{}", sink.summary.render());
    }
    result
}

async fn timewait(args: TimewaitArgs) -> Result<(), String> {
    use std::io::IsTerminal;
    use tcpwatch::commands::timewait::{TimewaitSink, TimewaitTracker, TrackerOptions};
    let stdout = io::stdout();
    let redraw = stdout.is_terminal() && args.format == Format::Text;
    let mut out = io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    if let Some(url) = &args.from {
        if !args.filter.to_filter().is_empty() {
            return Err(
                "--from shows the daemon's snapshot as it is: filters cannot be applied to it"
                    .into(),
            );
        }
        let daemon = Daemon::parse(url)?;
        let shown = client::watch_timewait(
            &daemon,
            &mut out,
            args.format,
            redraw,
            args.interval,
            args.duration,
        )
        .await?;
        eprintln!("tcpwatch: {shown} snapshots from {}", daemon.url());
        return Ok(());
    }
    let interval_ns = args.interval.as_nanos().min(u128::from(u64::MAX)) as u64;
    let tracker = TimewaitTracker::for_host(
        TrackerOptions {
            filter: args.filter.to_filter(),
            interval_ns,
            top: args.top,
        },
        args.probe.max_sockets,
        stderr_warn(),
    );
    let mut sink = TimewaitSink::new(out, args.format, redraw, tracker);
    let opts = SessionOptions {
        probe: args.probe.options(),
        duration: args.duration,
    };
    let mut started = false;
    let result = session::run(
        opts,
        |probe, sink: &mut TimewaitSink<_>| {
            started = true;
            sink.tracker.start_on_host(snapshot());
            announce(probe, "TCP connections for TIME_WAIT accounting");
        },
        &mut sink,
    )
    .await;
    if started {
        let lost = sink.tracker.lost;
        eprintln!(
            "tcpwatch: {} snapshots, {} events, {} lost events ({} ring buffer full, {} skipped by the kernel), {}",
            sink.snapshots,
            sink.tracker.events,
            lost.total(),
            lost.ring_full,
            lost.skipped,
            sink.tracker.tracking()
        );
    }
    result.map_err(|e| e.to_string())
}

/// `conns --from`: what a daemon finishes, shown as `conns` shows it.
async fn conns_from(url: &str, args: &ConnsArgs) -> Result<(), String> {
    let daemon = Daemon::parse(url)?;
    let mut out = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let header = !args.no_header && args.format == Format::Text;
    let s = client::follow_conns(
        &daemon,
        &mut out,
        args.format,
        &args.filter.to_filter(),
        header,
        args.duration,
    )
    .await?;
    eprintln!(
        "tcpwatch: {} connections finished, {} shown, {} no longer held by the daemon when asked ({})",
        s.received,
        s.shown,
        s.missed,
        daemon.url()
    );
    Ok(())
}

async fn record(args: RecordArgs) -> Result<(), String> {
    let mut recorder = None;
    let opts = SessionOptions {
        probe: args.probe.options(),
        duration: args.duration,
    };
    // The file is created only once the probe loaded, so a failure to load
    // leaves no empty recording behind.
    let mut sink = LazyRecorder {
        inner: &mut recorder,
        path: &args.output,
        error: None,
    };
    let result = session::run(
        opts,
        |probe, sink: &mut LazyRecorder<'_>| {
            sink.open(&snapshot());
            announce(probe, "TCP events into a recording");
        },
        &mut sink,
    )
    .await;
    if let Some(e) = sink.error.take() {
        return Err(e);
    }
    result.map_err(|e| e.to_string())?;
    if let Some(r) = &recorder {
        eprintln!(
            "tcpwatch: recorded {} events to {}, {} lost events",
            r.events,
            args.output.display(),
            r.lost.total()
        );
    }
    Ok(())
}

/// A recorder that opens its file when the probe is ready.
struct LazyRecorder<'a> {
    inner: &'a mut Option<Recorder<io::BufWriter<std::fs::File>>>,
    path: &'a Path,
    error: Option<String>,
}

impl LazyRecorder<'_> {
    fn open(&mut self, snapshot: &Option<SocketSnapshot>) {
        let header = Header {
            clock_offset_ns: Clock::system().offset_ns() as i64,
            netns: own_netns().unwrap_or(0),
            fin_timeout_s: fin_timeout_s(),
        };
        match Recorder::create(self.path, header, snapshot.as_ref()) {
            Ok(r) => *self.inner = Some(r),
            Err(e) => self.error = Some(e.to_string()),
        }
    }
}

impl session::Sink for LazyRecorder<'_> {
    fn events(
        &mut self,
        events: &[tcpwatch_common::Event],
        rejects: tcpwatch::model::decode::Rejects,
        settled: u64,
    ) -> io::Result<()> {
        match self.inner.as_mut() {
            Some(r) => r.events(events, rejects, settled),
            None => Err(io::Error::other(self.error.clone().unwrap_or_default())),
        }
    }

    fn lost(&mut self, counts: tcpwatch::kernel::probe::LostCounts) {
        if let Some(r) = self.inner.as_mut() {
            r.lost(counts);
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        match self.inner.as_mut() {
            Some(r) => r.finish(),
            None => Ok(()),
        }
    }
}

fn replay(args: ReplayArgs) -> Result<(), String> {
    let mut replay = Replay::open(&args.file).map_err(|e| e.to_string())?;
    let clock = Clock::with_offset_ns(i128::from(replay.header.clock_offset_ns));
    let netns = Some(replay.header.netns).filter(|n| *n != 0);
    let snapshot = Some(replay.snapshot.clone());
    let out = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let fin = replay.header.fin_timeout_s;
    let result = match args.view {
        ReplayView::Trace(o) => {
            let mut sink = TraceSink::new(
                out,
                o.format,
                o.filter.to_filter(),
                clock,
                OwnerTracker::new(o.max_sockets, snapshot, netns),
                o.max_sockets,
                stderr_warn(),
            );
            if !o.no_header {
                let _ = sink.header();
            }
            let r = tcpwatch::stream::replay::run(&mut replay, &mut sink);
            eprint!("{}", sink.summary.render());
            r
        }
        ReplayView::Conns(o) => {
            let correlator =
                Correlator::new(correlator_options(o.max_sockets, fin), snapshot, netns);
            let mut sink = ConnsSink::new(
                out,
                View::Records(o.format),
                o.filter.to_filter(),
                clock,
                correlator,
                stderr_warn(),
            );
            if !o.no_header {
                let _ = sink.header();
            }
            let r = tcpwatch::stream::replay::run(&mut replay, &mut sink);
            eprint!("{}", sink.summary.render());
            r
        }
        ReplayView::Ladder(o) => {
            let correlator =
                Correlator::new(correlator_options(o.max_sockets, fin), snapshot, netns);
            let mut sink = ConnsSink::new(
                out,
                View::Ladder,
                o.filter.to_filter(),
                clock,
                correlator,
                stderr_warn(),
            );
            let r = tcpwatch::stream::replay::run(&mut replay, &mut sink);
            eprint!("{}", sink.summary.render());
            r
        }
    };
    result.map(|_| ()).map_err(|e| e.to_string())
}

async fn bench(args: cli::BenchArgs) -> Result<(), String> {
    use tcpwatch::commands::bench;
    match args.what {
        cli::BenchWhat::Correlator { events } => {
            let b = bench::correlator_throughput(events);
            println!("{}", serde_json::to_string(&b).map_err(|e| e.to_string())?);
            Ok(())
        }
        cli::BenchWhat::TimewaitMemory { sockets } => {
            let b = bench::timewait_memory(sockets);
            println!("{}", serde_json::to_string(&b).map_err(|e| e.to_string())?);
            Ok(())
        }
        cli::BenchWhat::Memory { connections } => {
            let b = bench::tracked_memory(connections);
            println!("{}", serde_json::to_string(&b).map_err(|e| e.to_string())?);
            Ok(())
        }
        cli::BenchWhat::Floor { probe, duration } => {
            let _probe = Probe::load_floor(&probe.options()).map_err(|e| e.to_string())?;
            eprintln!("tcpwatch: tracing nothing (empty program attached); Ctrl-C to stop");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .map_err(|e| e.to_string())?;
            let wait = async {
                match duration {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = wait => {}
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = cli::parse();
    // Worker threads run the ring-buffer reader, so it keeps draining while
    // the main thread is busy in a stage (a timewait snapshot lists every
    // timewait socket of the host).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // The daemon's own connections show under this name.
        .thread_name("tcpwatch")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcpwatch: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result: Result<(), String> = runtime.block_on(async {
        match cli.command {
            Command::Trace(args) => trace(args).await.map_err(|e| e.to_string()),
            Command::Conns(args) if args.from.is_some() => {
                conns_from(args.from.as_deref().unwrap_or_default(), &args).await
            }
            Command::Conns(ConnsArgs {
                filter,
                probe,
                format,
                duration,
                no_header,
                from: _,
            }) => conns(
                View::Records(format),
                filter,
                probe,
                duration,
                no_header || format == Format::Json,
            )
            .await
            .map_err(|e| e.to_string()),
            Command::Ladder(LadderArgs {
                filter,
                probe,
                duration,
            }) => conns(View::Ladder, filter, probe, duration, true)
                .await
                .map_err(|e| e.to_string()),
            Command::Timewait(args) => timewait(args).await,
            Command::Daemon(args) => tcpwatch::daemon::run(args).await,
            Command::Record(args) => record(args).await,
            Command::Replay(args) => replay(args),
            Command::Bench(args) => bench(args).await,
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
