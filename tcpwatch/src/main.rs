//! The tcpwatch binary: parses arguments, sets up logging, and runs the
//! command. Every command that reads events takes one path
//! (`commands::run`): the stream, live or from a recording, builds the
//! command's consumer from its context. Errors end here, printed with
//! their causes as one line.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tcpwatch::cli::{
    self, BenchArgs, BenchWhat, Command, ProbeArgs, ReplayView, TimewaitArgs, TopArgs,
};
use tcpwatch::commands::conns::{ConnsOptions, ConnsSink, View};
use tcpwatch::commands::record::RecordSink;
use tcpwatch::commands::timewait::{CheckOptions, TimewaitSink, TimewaitTracker, TrackerOptions};
use tcpwatch::commands::trace::{TraceOptions, TraceSink};
use tcpwatch::commands::{self, Source};
use tcpwatch::daemon::client::{self, Daemon};
use tcpwatch::host::clock::Zone;
use tcpwatch::host::netns::{NetnsSpec, Selection};
use tcpwatch::kernel::probe::Probe;
use tcpwatch::stream::error::StreamError;
use tcpwatch::stream::session::SessionOptions;
use tcpwatch::views::log;
use tcpwatch::views::summary::ExitSummary;
use tcpwatch::views::Format;

/// Events from the kernel of the namespaces `--netns` selects (none:
/// tcpwatch's own), `what` said once tracing began.
fn live(
    probe: &ProbeArgs,
    duration: Option<Duration>,
    what: &str,
    netns: &[NetnsSpec],
) -> anyhow::Result<Source> {
    let netns = Selection::resolve(netns, false).context("--netns")?;
    Ok(Source::Live(SessionOptions::command(
        probe.options(),
        duration,
        what,
        netns,
    )))
}

/// How `--netns` names one of a daemon's namespaces for `--from`: its name
/// or its inode, as the daemon labels it.
fn daemon_netns(spec: Option<&NetnsSpec>) -> anyhow::Result<Option<String>> {
    Ok(match spec {
        None => None,
        Some(NetnsSpec::Name(n)) => Some(n.clone()),
        Some(NetnsSpec::Inode(i)) => Some(i.to_string()),
        Some(_) => bail!("--from: name the daemon's namespace by its name or its inode"),
    })
}

/// Standard output, buffered: the consumers flush after each batch.
fn stdout() -> io::BufWriter<io::StdoutLock<'static>> {
    io::BufWriter::with_capacity(64 * 1024, io::stdout().lock())
}

async fn trace(source: Source, opts: TraceOptions) -> Result<(), StreamError> {
    let format = opts.format;
    commands::run(source, format, |ctx| {
        Ok(TraceSink::build(stdout(), opts, ctx))
    })
    .await
}

async fn conns(source: Source, opts: ConnsOptions, summary: Format) -> Result<(), StreamError> {
    commands::run(source, summary, |ctx| {
        Ok(ConnsSink::build(stdout(), opts, ctx))
    })
    .await
}

async fn timewait(args: TimewaitArgs) -> anyhow::Result<()> {
    // Snapshots read long kernel lists: their blocks go back when freed.
    tcpwatch::host::return_large_blocks_when_freed();
    let redraw = io::stdout().is_terminal() && args.format == Format::Text;
    if let Some(url) = &args.from {
        if !args.filter.to_filter().is_empty() {
            bail!("--from shows the daemon's snapshot as it is: filters cannot be applied to it");
        }
        let daemon = Daemon::parse(url)?;
        let netns = daemon_netns(args.netns.as_ref())?;
        let s = client::watch_timewait(
            &daemon,
            netns.as_deref(),
            &mut stdout(),
            (args.format, Zone::from_flag(args.local_time)),
            redraw,
            args.interval,
            args.duration,
        )
        .await?;
        ExitSummary::TimewaitFrom(s).print(args.format);
        return Ok(());
    }
    let opts = TrackerOptions {
        filter: args.filter.to_filter(),
        interval_ns: nanos(args.interval),
        top: args.top,
        max_sockets: args.probe.max_sockets,
        churn: args.churn.options(),
        check: CheckOptions::every(nanos(args.check_interval)),
    };
    let source = live(
        &args.probe,
        args.duration,
        "TCP connections for TIME_WAIT accounting",
        &args.netns.iter().cloned().collect::<Vec<_>>(),
    )?;
    timewait_from(source, opts, args.format, redraw, args.local_time).await
}

/// The TIME_WAIT snapshots of `source`, written to standard output.
async fn timewait_from(
    source: Source,
    opts: TrackerOptions,
    format: Format,
    redraw: bool,
    local_time: bool,
) -> anyhow::Result<()> {
    commands::run(source, format, |ctx| {
        let tracker = TimewaitTracker::start(opts, ctx);
        Ok(TimewaitSink::new(stdout(), format, redraw, tracker)
            .with_zone(Zone::from_flag(local_time)))
    })
    .await?;
    Ok(())
}

/// `tcpwatch top`: the live view, tracing here or reading a daemon.
async fn top(args: TopArgs) -> anyhow::Result<()> {
    use tcpwatch::commands::top::{self, TopSink};
    // Before anything is loaded: the view needs a terminal.
    top::terminal::check()?;
    let filter = args.filter.to_filter();
    if filter.has_owner_filters() {
        bail!("top filters by address and port only: a connection is counted when it opens, before its owner is known, so --pid and --comm cannot apply");
    }
    if let Some(url) = &args.from {
        if !filter.is_empty() {
            bail!(
                "--from shows the daemon's figures as they are: filters cannot be applied to them"
            );
        }
        let daemon = Daemon::parse(url)?;
        let netns = daemon_netns(args.netns.as_ref())?;
        let s = top::from::run(&daemon, netns.as_deref(), args.interval, args.duration).await?;
        ExitSummary::TopFrom(s).print(args.format);
        return Ok(());
    }
    let opts = TrackerOptions {
        filter,
        interval_ns: nanos(args.interval),
        top: args.top,
        max_sockets: args.probe.max_sockets,
        churn: tcpwatch::model::churn::ChurnOptions::default(),
        check: CheckOptions::default(),
    };
    let source = live(
        &args.probe,
        args.duration,
        "TCP connections for a live view",
        &args.netns.iter().cloned().collect::<Vec<_>>(),
    )?;
    commands::run(source, args.format, |ctx| Ok(TopSink::build(opts, ctx))).await?;
    Ok(())
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use tcpwatch::commands::bench;
    let json = match args.what {
        BenchWhat::Correlator { events } => {
            serde_json::to_string(&bench::correlator_throughput(events))
        }
        BenchWhat::TimewaitMemory { sockets } => {
            serde_json::to_string(&bench::timewait_memory(sockets))
        }
        BenchWhat::Daemon { file, interval } => {
            let (served, summary) = bench::daemon_replay(&file, interval)?;
            print!("{served}");
            summary.print(Format::Json);
            return Ok(());
        }
        BenchWhat::Memory { connections } => {
            serde_json::to_string(&bench::tracked_memory(connections))
        }
        BenchWhat::Floor { probe, duration } => {
            let _probe = Probe::load_floor(&probe.options())?;
            tracing::info!("tracing nothing (empty program attached); Ctrl-C to stop");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("cannot install signal handler")?;
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
            return Ok(());
        }
    };
    println!("{}", json.context("cannot write the measurement as JSON")?);
    Ok(())
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Trace(a) => {
            let mut source = live(
                &a.probe,
                a.duration,
                "TCP state transitions",
                &a.netns.specs(),
            )?;
            // One record per transition: trace's point is a line as each
            // happens, not once its socket opens or closes.
            if let Source::Live(session) = &mut source {
                session.probe.per_socket = false;
            }
            let opts = TraceOptions {
                format: a.format,
                filter: a.filter.to_filter(),
                max_sockets: a.probe.max_sockets,
                header: !a.no_header,
                zone: Zone::from_flag(a.local_time),
            };
            trace(source, opts).await?;
        }
        Command::Conns(a) => {
            if let Some(url) = &a.from {
                // What a daemon finishes, shown as `conns` shows it.
                let daemon = Daemon::parse(url)?;
                let header = !a.no_header && a.format == Format::Text;
                let (s, stopped) = client::follow_conns(
                    &daemon,
                    &mut stdout(),
                    a.format,
                    &a.filter.to_filter(),
                    Zone::from_flag(a.local_time),
                    header,
                    a.duration,
                )
                .await?;
                // The summary of what was shown, then why it stopped early.
                ExitSummary::ConnsFrom(s).print(a.format);
                return stopped.map_or(Ok(()), |e| Err(e.into()));
            }
            let source = live(&a.probe, a.duration, "TCP connections", &a.netns.specs())?;
            let opts = ConnsOptions {
                view: View::Records(a.format),
                filter: a.filter.to_filter(),
                max_sockets: a.probe.max_sockets,
                header: !a.no_header,
                zone: Zone::from_flag(a.local_time),
            };
            conns(source, opts, a.format).await?;
        }
        Command::Ladder(a) => {
            let source = live(&a.probe, a.duration, "TCP connections", &a.netns.specs())?;
            let opts = ConnsOptions {
                view: View::Ladder(a.format),
                filter: a.filter.to_filter(),
                max_sockets: a.probe.max_sockets,
                header: false,
                zone: Zone::from_flag(a.local_time),
            };
            conns(source, opts, a.format).await?;
        }
        Command::Timewait(a) => timewait(a).await?,
        Command::Top(a) => top(a).await?,
        Command::Daemon(a) => tcpwatch::daemon::run(a).await?,
        Command::Record(a) => {
            let filter = a.filter.to_filter();
            if filter.has_owner_filters() {
                bail!("record keeps sockets by address, port and family: a socket's owner is often known only after its first transitions, so give --pid, --comm and --cgroup to replay");
            }
            let source = live(
                &a.probe,
                a.duration,
                "TCP events into a recording",
                &a.netns.specs(),
            )?;
            commands::run(source, a.format, |ctx| {
                Ok(RecordSink::build(
                    &a.output,
                    filter,
                    a.probe.max_sockets,
                    ctx,
                )?)
            })
            .await?;
        }
        Command::Replay(a) => {
            let filter = match &a.view {
                ReplayView::Trace(o) | ReplayView::Conns(o) => &o.filter,
                ReplayView::Ladder(o) => &o.filter,
                ReplayView::Timewait(o) => &o.filter,
            };
            if !filter.cgroups.is_empty() {
                bail!("--cgroup matches the paths of this host's cgroups now: it does not apply to a recording");
            }
            let source = Source::Recording(a.file);
            match a.view {
                ReplayView::Trace(o) => {
                    let opts = TraceOptions {
                        format: o.format,
                        filter: o.filter.to_filter(),
                        max_sockets: o.max_sockets,
                        header: !o.no_header,
                        zone: Zone::from_flag(o.local_time),
                    };
                    trace(source, opts).await?;
                }
                ReplayView::Conns(o) => {
                    let opts = ConnsOptions {
                        view: View::Records(o.format),
                        filter: o.filter.to_filter(),
                        max_sockets: o.max_sockets,
                        header: !o.no_header,
                        zone: Zone::from_flag(o.local_time),
                    };
                    conns(source, opts, o.format).await?;
                }
                ReplayView::Ladder(o) => {
                    let opts = ConnsOptions {
                        view: View::Ladder(o.format),
                        filter: o.filter.to_filter(),
                        max_sockets: o.max_sockets,
                        header: false,
                        zone: Zone::from_flag(o.local_time),
                    };
                    conns(source, opts, o.format).await?;
                }
                ReplayView::Timewait(o) => {
                    let opts = TrackerOptions {
                        filter: o.filter.to_filter(),
                        interval_ns: nanos(o.interval),
                        top: o.top,
                        max_sockets: o.max_sockets,
                        churn: o.churn.options(),
                        // No kernel to check against in a replay.
                        check: CheckOptions::default(),
                    };
                    // Appended, never redrawn: a replay is read back.
                    timewait_from(source, opts, o.format, false, o.local_time).await?;
                }
            }
        }
        Command::Bench(a) => bench(a).await?,
    }
    Ok(())
}

fn main() -> ExitCode {
    // Bad arguments are said in the commands' format before anything else.
    let cli = tracing::subscriber::with_default(log::cli_subscriber(io::stderr), cli::parse);
    match &cli.command {
        Command::Daemon(a) => log::init_daemon(a.log_format),
        _ => log::init_cli(),
    }
    // Worker threads run the ring-buffer reader, so it keeps draining while
    // the main thread is busy in a stage (a timewait snapshot lists every
    // timewait socket of the host).
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // The daemon's own connections show under this name.
        .thread_name("tcpwatch")
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli.command)));
    let _ = io::stdout().flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line: `what failed: why: why`.
/// A duration in nanoseconds, saturating.
fn nanos(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

fn one_line(e: &anyhow::Error) -> String {
    log::one_line(e.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}: {source}; run as root")]
    struct SaysItsSource {
        path: &'static str,
        source: io::Error,
    }

    #[test]
    fn causes_follow_once() {
        let e = anyhow::Error::new(io::Error::from(io::ErrorKind::NotFound))
            .context("cannot open x.rec");
        assert_eq!(one_line(&e), "cannot open x.rec: entity not found");
        let e = anyhow::Error::new(SaysItsSource {
            path: "/sys/kernel/tracing",
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        });
        assert_eq!(
            one_line(&e),
            "cannot read /sys/kernel/tracing: permission denied; run as root"
        );
    }
}
