//! `tcpwatch top`: a full-screen view to leave open, refreshed every
//! interval, of the connections opened, closed by kind and failed by
//! reason per second, the lost events, and the TIME_WAIT sockets by
//! destination (with the port forecast) and by process.
//!
//! Tracing here, [`TopSink`] is the session's consumer, built from the
//! stream's context: the TIME_WAIT figures are the [`TimewaitTracker`]'s
//! snapshots, taken every interval, and the counts come from the same
//! records and finished connections. With
//! `--from` ([`from`]) the same screen is filled from a daemon's
//! `/metrics`, `/api/conns` and `/api/timewait`. [`terminal`] owns the
//! terminal while the view is up; `views::top` draws it.

pub mod from;
pub mod terminal;

use std::collections::BTreeMap;
use std::io;

use crate::commands::timewait::{TimewaitTracker, TrackerOptions};
use crate::host::clock::Clock;
use crate::model::correlate::Timeline;
use crate::model::decode::Record;
use crate::model::filter::Filter;
use crate::model::lost::LostCounts;
use crate::model::sweep::SweepTable;
use crate::model::timewait::Snapshot;
use crate::stream::context::Context;
use crate::stream::pipeline::{Batch, Consumer, Totals};
use crate::views::conns::{close_name, connect_failure_name, errno_name, open_name};
use crate::views::log::one_line;
use crate::views::summary::{ExitSummary, TopSummary};
use crate::views::top::{Activity, LostView, Rate, Screen, ViewState};

use self::terminal::{Key, Ui};

/// Why `top` could not run.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Terminal(#[from] terminal::TerminalError),
    #[error(transparent)]
    Daemon(#[from] crate::daemon::client::ClientError),
    #[error("{url}/metrics: not what a tcpwatch daemon answers")]
    NotMetrics { url: String },
    #[error("cannot draw the view")]
    Draw(#[source] io::Error),
    #[error("cannot install signal handler")]
    Signal(#[source] io::Error),
}

/// Connections counted since `top` started, by what happened to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// By direction: `active`, `passive`.
    pub opened: BTreeMap<String, u64>,
    /// Connections that opened, by how they closed.
    pub closed: BTreeMap<String, u64>,
    /// Connections that never opened, by why.
    pub failed: BTreeMap<String, u64>,
}

/// Why a connection that never opened failed: a connect's reason
/// (`refused`, `timed_out`, `host_unreachable`, `given_up`,
/// `address_not_available` ...: `connect_failure_name`), else how it tried
/// to open (`passive_failed`), with the errno where the kernel gave one
/// and the kind alone does not say it.
pub fn failure_reason(open: &str, connect_failure: Option<&str>, error: Option<&str>) -> String {
    match (connect_failure, open, error) {
        (Some(reason), _, _) => reason.to_string(),
        (None, "failed", Some(e)) => format!("failed:{e}"),
        (None, open, _) => open.to_string(),
    }
}

impl Tally {
    /// A connection opened (`Transition::opened`).
    pub fn opened(&mut self, direction: &str) {
        *self.opened.entry(direction.to_string()).or_default() += 1;
    }

    /// A finished connection, as the correlator (or a daemon's record)
    /// names how it opened and closed: one that never opened is a failure.
    pub fn finished(
        &mut self,
        open: &str,
        close: &str,
        connect_failure: Option<&str>,
        error: Option<&str>,
    ) {
        let (map, key) = if close == "never_opened" {
            (
                &mut self.failed,
                failure_reason(open, connect_failure, error),
            )
        } else {
            (&mut self.closed, close.to_string())
        };
        *map.entry(key).or_default() += 1;
    }

    pub fn timeline(&mut self, t: &Timeline) {
        let error = t.error.map(errno_name);
        let failure = t.connect_failure.map(connect_failure_name);
        self.finished(
            open_name(t.open),
            close_name(t.close),
            failure.as_deref(),
            error.as_deref(),
        );
    }

    /// What happened since `before`, `secs` ago, per second, and in all.
    pub fn rates(&self, before: &Tally, secs: f64) -> Activity {
        fn list(now: &BTreeMap<String, u64>, then: &BTreeMap<String, u64>, secs: f64) -> Vec<Rate> {
            let mut v: Vec<Rate> = now
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(name, n)| {
                    let grew = n.saturating_sub(then.get(name).copied().unwrap_or(0));
                    Rate {
                        name: name.clone(),
                        per_s: if secs > 0.0 { grew as f64 / secs } else { 0.0 },
                        total: *n,
                    }
                })
                .collect();
            v.sort_by(|a, b| {
                b.per_s
                    .total_cmp(&a.per_s)
                    .then(b.total.cmp(&a.total))
                    .then(a.name.cmp(&b.name))
            });
            v
        }
        Activity {
            opened: list(&self.opened, &before.opened, secs),
            closed: list(&self.closed, &before.closed, secs),
            failed: list(&self.failed, &before.failed, secs),
        }
    }
}

/// The figures of the last refresh, to take the next one's rates from.
#[derive(Clone, Debug, Default)]
pub struct Refresh {
    pub tally: Tally,
    pub lost: LostCounts,
    /// When it was taken, in seconds on any steady clock.
    pub at_s: f64,
}

impl Refresh {
    /// The screen's counts now, and this refresh moved on to now.
    pub fn next(&mut self, tally: &Tally, lost: LostCounts, at_s: f64) -> (Activity, LostView) {
        let activity = tally.rates(&self.tally, at_s - self.at_s);
        let view = LostView {
            ring_full: lost.ring_full,
            skipped: lost.skipped,
            last: lost.total().saturating_sub(self.lost.total()),
        };
        *self = Refresh {
            tally: tally.clone(),
            lost,
            at_s,
        };
        (activity, view)
    }
}

/// The wall-clock time of day of a refresh (`HH:MM:SS UTC`).
fn time_of_day(clock: &Clock, mono_ns: u64) -> String {
    let t = clock.time_of_day(mono_ns);
    format!("{} UTC", t.get(..8).unwrap_or(&t))
}

/// Asks the session to stop, as Ctrl-C would: `q` and Ctrl-C (a key in
/// raw mode) end the view the way a signal does, through one path.
fn stop_session() {
    // SAFETY: raise has no preconditions; SIGINT is caught by the session.
    unsafe { libc::raise(libc::SIGINT) };
}

/// Applies a key to the view; whether it asks to quit.
pub fn apply(key: Key, view: &mut ViewState) -> bool {
    match key {
        Key::Quit => return true,
        Key::Sort => view.sort = view.sort.next(),
        Key::Reverse => view.reverse = !view.reverse,
        Key::Redraw => {}
    }
    false
}

/// `tcpwatch top` tracing here: the TIME_WAIT tracker's records and
/// snapshots, counted and drawn every interval.
pub struct TopSink {
    tracker: TimewaitTracker,
    /// The tracker's filter, for the connections counted as they open.
    filter: Filter,
    tally: Tally,
    finished: Vec<Timeline>,
    lost: LostCounts,
    last: Refresh,
    clock: Clock,
    screen: Screen,
    view: ViewState,
    ui: Option<Ui>,
    /// Why the view could not go up (the session then stops).
    broken: Option<String>,
    quitting: bool,
    refreshes: u64,
}

impl TopSink {
    /// Counting starts where `ctx` begins; the view goes up once the
    /// session says tracing began ([`Consumer::live`]).
    pub fn build(opts: TrackerOptions, ctx: &Context) -> TopSink {
        let filter = opts.filter.clone();
        let started_ns = ctx.live_since_ns().unwrap_or(0);
        TopSink {
            tracker: TimewaitTracker::start(opts, ctx),
            filter,
            tally: Tally::default(),
            finished: Vec::new(),
            lost: LostCounts::default(),
            last: Refresh {
                at_s: started_ns as f64 / 1e9,
                ..Refresh::default()
            },
            clock: ctx.clock,
            screen: Screen {
                source: "tracing this host".into(),
                time: time_of_day(&ctx.clock, started_ns),
                ..Screen::default()
            },
            view: ViewState::default(),
            ui: None,
            broken: None,
            quitting: false,
            refreshes: 0,
        }
    }

    fn draw(&mut self) -> io::Result<()> {
        let Some(ui) = &mut self.ui else {
            return Ok(());
        };
        if let Some(m) = ui.latest_message() {
            self.screen.status = Some(m);
        }
        ui.draw(&self.screen, &self.view)
    }

    fn refresh(&mut self, now_ns: u64, snapshot: Snapshot) -> io::Result<()> {
        let (activity, lost) = self.last.next(&self.tally, self.lost, now_ns as f64 / 1e9);
        self.screen.activity = activity;
        self.screen.lost = lost;
        self.screen.time = time_of_day(&self.clock, now_ns);
        self.screen.timewait = Some(snapshot);
        self.refreshes += 1;
        self.draw()
    }

    fn keys(&mut self) -> io::Result<()> {
        let mut changed = false;
        while let Some(k) = self.ui.as_mut().and_then(Ui::try_key) {
            if apply(k, &mut self.view) {
                if !self.quitting {
                    self.quitting = true;
                    stop_session();
                }
            } else {
                changed = true;
            }
        }
        if changed {
            self.draw()?;
        }
        Ok(())
    }

    /// Restores the terminal and writes out what stderr held meanwhile.
    fn close(&mut self) {
        if let Some(mut ui) = self.ui.take() {
            ui.close();
        }
    }
}

impl Consumer for TopSink {
    fn records(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        if let Some(why) = &self.broken {
            return Err(io::Error::other(why.clone()));
        }
        for r in batch.records {
            if let Record::State(t) = r {
                match t.opened() {
                    Some(d) if self.filter.matches_endpoints(t.family, &t.local, &t.remote) => {
                        self.tally.opened(d)
                    }
                    _ => {}
                }
            }
        }
        let due = self
            .tracker
            .absorb(batch.records, batch.settled_ns, &mut self.finished);
        for t in self.finished.drain(..) {
            self.tally.timeline(&t);
        }
        // One namespace is shown: the tracker keeps its book alone.
        if let Some(s) = due.and_then(|v| v.into_iter().next()) {
            self.refresh(batch.settled_ns, s)?;
        }
        self.keys()
    }

    fn sweep_table(&mut self) -> Option<&mut dyn SweepTable> {
        Some(self.tracker.sweep_table())
    }

    fn lost(&mut self, lost: LostCounts) {
        self.lost = lost;
    }

    /// Tracing began: that is said (before the screen changes, so it stays
    /// on the shell's screen), and the view goes up with what is known so
    /// far. If it cannot, the next batch ends the session with the reason.
    fn live(&mut self, announce: &str) {
        tracing::info!("{announce}");
        match Ui::enter() {
            Ok(ui) => self.ui = Some(ui),
            Err(e) => self.broken = Some(one_line(&e)),
        }
        if let Err(e) = self.draw() {
            self.broken = Some(format!("cannot draw: {e}"));
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.tracker.flush(&mut self.finished);
        self.finished.clear();
        self.close();
        Ok(())
    }

    fn summary(&self, totals: &Totals) -> ExitSummary {
        ExitSummary::Top(TopSummary {
            refreshes: self.refreshes,
            stream: totals.stream(),
            tracking: totals.tracking(self.tracker.tracking()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_connections_are_closed_by_kind_or_failed_by_reason() {
        let mut t = Tally::default();
        t.finished("active", "orderly", None, None);
        t.finished("passive", "orderly", None, None);
        t.finished("active", "reset_received", None, Some("ECONNRESET"));
        t.finished("refused", "never_opened", None, Some("ECONNREFUSED"));
        t.finished("failed", "never_opened", None, Some("EHOSTUNREACH"));
        t.finished("failed", "never_opened", None, None);
        t.finished(
            "failed",
            "never_opened",
            Some("host_unreachable"),
            Some("EHOSTUNREACH"),
        );
        t.finished("failed", "never_opened", Some("given_up"), None);
        t.opened("active");
        let count = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        assert_eq!(count(&t.closed, "orderly"), 2);
        assert_eq!(count(&t.closed, "reset_received"), 1);
        assert!(!t.closed.contains_key("never_opened"));
        assert_eq!(count(&t.failed, "refused"), 1);
        assert_eq!(count(&t.failed, "failed:EHOSTUNREACH"), 1);
        assert_eq!(count(&t.failed, "failed"), 1);
        assert_eq!(count(&t.failed, "host_unreachable"), 1);
        assert_eq!(count(&t.failed, "given_up"), 1);
        assert_eq!(count(&t.opened, "active"), 1);
    }

    #[test]
    fn rates_are_the_growth_over_the_interval() {
        let mut before = Tally::default();
        before.finished("active", "orderly", None, None);
        let mut now = before.clone();
        for _ in 0..5 {
            now.finished("active", "orderly", None, None);
        }
        for _ in 0..3 {
            now.finished("active", "aborted", None, None);
        }
        let a = now.rates(&before, 2.0);
        let got: Vec<(&str, f64, u64)> = a
            .closed
            .iter()
            .map(|r| (r.name.as_str(), r.per_s, r.total))
            .collect();
        assert_eq!(got, [("orderly", 2.5, 6), ("aborted", 1.5, 3)]);
        assert!(a.failed.is_empty() && a.opened.is_empty());
        // No time passed: no rate, the totals still shown.
        assert_eq!(now.rates(&now, 0.0).closed[0].per_s, 0.0);
    }

    #[test]
    fn a_refresh_counts_the_losses_since_the_last() {
        let mut r = Refresh::default();
        let lost = LostCounts {
            ring_full: 4,
            skipped: 1,
        };
        let (_, v) = r.next(&Tally::default(), lost, 1.0);
        assert_eq!((v.ring_full, v.skipped, v.last), (4, 1, 5));
        let (_, v) = r.next(&Tally::default(), lost, 2.0);
        assert_eq!((v.total(), v.last), (5, 0));
    }

    #[test]
    fn keys_change_the_view_or_quit() {
        let mut v = ViewState::default();
        assert!(!apply(Key::Sort, &mut v));
        assert_ne!(v.sort, ViewState::default().sort);
        assert!(!apply(Key::Reverse, &mut v));
        assert!(v.reverse);
        assert!(apply(Key::Quit, &mut v));
    }
}
