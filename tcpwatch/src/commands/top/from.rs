//! `tcpwatch top --from URL`: the same screen, filled from a running
//! daemon every interval over one kept HTTP connection:
//! - `/metrics`: connections opened by direction and closed by kind, and
//!   the lost events, as counters (exact whatever the rate);
//! - `/api/conns`: the connections that never opened, for their reasons
//!   (the daemon counts them only as `never_opened`); connections the
//!   daemon no longer held when asked are counted and said;
//! - `/api/timewait`: the daemon's latest TIME_WAIT snapshot, as it is.
//!
//! Counts start when `top` starts; lost events are the daemon's since it
//! started.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::daemon::client::{ClientError, ConnsPage, Daemon};
use crate::daemon::query::MAX_LIMIT;
use crate::host::clock::{monotonic_ns, Clock};
use crate::model::lost::LostCounts;
use crate::model::timewait::Snapshot;
use crate::views::summary::TopFromSummary;
use crate::views::top::{Screen, ViewState};

use super::terminal::{check, Ui};
use super::{apply, time_of_day, Refresh, Tally, TopError};
use crate::views::log::one_line;

/// The value of each series of the counter `name` (as exposed, e.g.
/// `tcpwatch_connections_closed_total`) by its label `label`.
pub fn counter_by(text: &str, name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(v) = labels
            .split(',')
            .find_map(|l| l.strip_prefix(&key)?.strip_suffix('"'))
        else {
            continue;
        };
        if let Ok(n) = value.trim().parse::<f64>() {
            out.insert(v.to_string(), n as u64);
        }
    }
    out
}

/// What one reading of the daemon gave.
struct Reading {
    tally: Tally,
    lost: LostCounts,
    snapshot: Result<Snapshot, ClientError>,
}

/// The daemon's counters when `top` started, and the failed connections
/// read since.
pub struct DaemonReader {
    base_opened: BTreeMap<String, u64>,
    base_closed: BTreeMap<String, u64>,
    failed: BTreeMap<String, u64>,
    /// The last connection number read from `/api/conns`.
    since: u64,
    /// Finished connections the daemon no longer held when asked.
    pub missed: u64,
    /// Where the daemon's TIME_WAIT snapshot of the namespace shown is.
    timewait_path: String,
}

fn minus(now: BTreeMap<String, u64>, base: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    now.into_iter()
        .map(|(k, n)| {
            let b = base.get(&k).copied().unwrap_or(0);
            (k, n.saturating_sub(b))
        })
        .collect()
}

impl DaemonReader {
    /// Reads where the daemon is now: only what happens from here on is
    /// counted.
    /// The TIME_WAIT figures are those of the daemon's namespace `netns`
    /// (its name or inode; `None`: the daemon's own).
    pub async fn start(d: &Daemon, netns: Option<&str>) -> Result<DaemonReader, TopError> {
        let (opened, closed, _) = Self::counters(d).await?;
        let page: ConnsPage = d.get_json("/api/conns?limit=1").await?;
        Ok(DaemonReader {
            base_opened: opened,
            base_closed: closed,
            failed: BTreeMap::new(),
            since: page.next,
            missed: 0,
            timewait_path: crate::daemon::client::timewait_path(netns),
        })
    }

    #[allow(clippy::type_complexity)]
    async fn counters(
        d: &Daemon,
    ) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>, LostCounts), TopError> {
        let body = d.get("/metrics").await?;
        let text = String::from_utf8_lossy(&body);
        let opened = counter_by(&text, "tcpwatch_connections_opened_total", "direction");
        let mut closed = counter_by(&text, "tcpwatch_connections_closed_total", "kind");
        // Those are failures, read with their reasons from /api/conns.
        closed.remove("never_opened");
        let lost = counter_by(&text, "tcpwatch_lost_events_total", "reason");
        if !text.contains("tcpwatch_connections_opened_total") {
            return Err(TopError::NotMetrics { url: d.url() });
        }
        let lost = LostCounts {
            ring_full: lost.get("ring_full").copied().unwrap_or(0),
            skipped: lost.get("kernel_skipped").copied().unwrap_or(0),
        };
        Ok((opened, closed, lost))
    }

    async fn read(&mut self, d: &Daemon) -> Result<Reading, TopError> {
        let (opened, closed, lost) = Self::counters(d).await?;
        let mut failures = Tally::default();
        // Every page up to the newest: the daemon pages forward.
        loop {
            let page: ConnsPage = d
                .get_json(&format!(
                    "/api/conns?since={}&limit={MAX_LIMIT}",
                    self.since
                ))
                .await?;
            self.since = page.next.max(self.since);
            self.missed += page.missed;
            for r in page.conns.iter().filter(|r| r.close == "never_opened") {
                failures.finished(
                    &r.open,
                    &r.close,
                    r.connect_failure.as_deref(),
                    r.error.as_deref(),
                );
            }
            if page.remaining == 0 || page.conns.is_empty() {
                break;
            }
        }
        for (k, n) in failures.failed {
            *self.failed.entry(k).or_default() += n;
        }
        let snapshot = d.get_json::<Snapshot>(&self.timewait_path).await;
        Ok(Reading {
            tally: Tally {
                opened: minus(opened, &self.base_opened),
                closed: minus(closed, &self.base_closed),
                failed: self.failed.clone(),
            },
            lost,
            snapshot,
        })
    }
}

/// Runs the view on a daemon's figures until `q`, Ctrl-C, SIGINT, SIGTERM
/// or `duration`.
pub async fn run(
    d: &Daemon,
    netns: Option<&str>,
    interval: Duration,
    duration: Option<Duration>,
) -> Result<TopFromSummary, TopError> {
    use tokio::signal::unix::{signal, SignalKind};
    check()?;
    let mut term = signal(SignalKind::terminate()).map_err(TopError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(TopError::Signal)?;
    // An unreachable daemon is said before the screen changes.
    let mut reader = DaemonReader::start(d, netns).await?;
    tracing::info!("reading {} every {interval:?}; q to quit", d.url());
    let clock = Clock::system();
    let started = Instant::now();
    let mut last = Refresh::default();
    let mut screen = Screen {
        source: format!("from {}", d.url()),
        time: time_of_day(&clock, monotonic_ns()),
        ..Screen::default()
    };
    let mut view = ViewState::default();
    let mut ui = Ui::enter()?;
    let mut summary = TopFromSummary {
        daemon: d.url(),
        ..TopFromSummary::default()
    };
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                let problem = match reader.read(d).await {
                    Ok(r) => {
                        let (activity, lost) =
                            last.next(&r.tally, r.lost, started.elapsed().as_secs_f64());
                        screen.activity = activity;
                        screen.lost = lost;
                        summary.refreshes += 1;
                        match r.snapshot {
                            Ok(s) => {
                                screen.timewait = Some(s);
                                None
                            }
                            Err(e) => Some(one_line(&e)),
                        }
                    }
                    Err(e) => Some(one_line(&e)),
                };
                screen.time = time_of_day(&clock, monotonic_ns());
                screen.status = match (problem, reader.missed) {
                    (Some(e), _) => Some(e),
                    (None, 0) => ui.latest_message(),
                    (None, n) => Some(format!(
                        "{n} finished connections were gone from the daemon when asked: failure reasons undercounted"
                    )),
                };
                if let Err(e) = ui.draw(&screen, &view) {
                    break Err(TopError::Draw(e));
                }
            }
            key = ui.key() => {
                let Some(key) = key else { break Ok(()) };
                if apply(key, &mut view) {
                    break Ok(());
                }
                if let Err(e) = ui.draw(&screen, &view) {
                    break Err(TopError::Draw(e));
                }
            }
            _ = int.recv() => break Ok(()),
            _ = term.recv() => break Ok(()),
            _ = &mut deadline => break Ok(()),
        }
    };
    ui.close();
    summary.missed = reader.missed;
    result.map(|()| summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_by_their_label() {
        let text = "\
# HELP tcpwatch_connections_closed Connections finished, by how they closed.
# TYPE tcpwatch_connections_closed counter
tcpwatch_connections_closed_total{kind=\"orderly\"} 12
tcpwatch_connections_closed_total{kind=\"never_opened\"} 3
tcpwatch_connections_closed_totalx{kind=\"bogus\"} 9
tcpwatch_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\"} 4
tcpwatch_lost_events_total{reason=\"ring_full\"} 0
# EOF
";
        let closed = counter_by(text, "tcpwatch_connections_closed_total", "kind");
        assert_eq!(
            closed.into_iter().collect::<Vec<_>>(),
            [("never_opened".to_string(), 3), ("orderly".to_string(), 12)]
        );
        let to = counter_by(text, "tcpwatch_transitions_total", "to");
        assert_eq!(to.get("ESTABLISHED"), Some(&4));
        let lost = counter_by(text, "tcpwatch_lost_events_total", "reason");
        assert_eq!(lost.get("ring_full"), Some(&0));
        assert!(counter_by(text, "tcpwatch_nothing_total", "kind").is_empty());
    }

    #[test]
    fn counts_start_from_the_first_reading() {
        let base: BTreeMap<String, u64> = [("orderly".to_string(), 10)].into();
        let now: BTreeMap<String, u64> =
            [("orderly".to_string(), 14), ("aborted".to_string(), 2)].into();
        let got = minus(now, &base);
        assert_eq!(got.get("orderly"), Some(&4));
        assert_eq!(got.get("aborted"), Some(&2));
    }
}
