//! Connection churn that should have been a pool: a process that opens
//! many short-lived connections to one destination and closes each first,
//! so that every one leaves a TIME_WAIT socket on its own host. Reusing
//! connections (HTTP keep-alive, a database pool) removes the handshakes,
//! the teardowns and the TIME_WAIT sockets at once.
//!
//! Fed by finished connections (client side, opened by this host's
//! connect()), grouped by the process's command name and the destination,
//! one book per network namespace. A group is reported when, over the
//! last `window`, it opened at least `min_rate` connections a second,
//! their median lifetime was at most `max_median_life`, and at least
//! `min_timewait_share` of them were closed first by the client (each
//! leaving a timewait socket on the client's side).
//!
//! Memory is bounded: per group, one slot per second of the window, each
//! with two counters and a lifetime histogram (four buckets per octave,
//! so a median is within 9.1 % of the exact one); at most `max_groups`
//! groups, the rest counted as `groups_left_out`. Pure: time comes from
//! the caller.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::model::correlate::{OpenKind, Role, Timeline};
use crate::model::{Endpoint, FastMap};

/// When a group is reported.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChurnOptions {
    /// How far back rates, lifetimes and shares are counted.
    pub window_ns: u64,
    /// Fewest connections per second over the window.
    pub min_rate: f64,
    /// Longest median lifetime (connect to close).
    pub max_median_life_ns: u64,
    /// Smallest share of the connections closed first by the client, each
    /// leaving a timewait socket on the client's side.
    pub min_timewait_share: f64,
    /// Most (process, destination) groups followed at once.
    pub max_groups: usize,
}

impl Default for ChurnOptions {
    fn default() -> Self {
        ChurnOptions {
            window_ns: 10_000_000_000,
            min_rate: 20.0,
            max_median_life_ns: 1_000_000_000,
            min_timewait_share: 0.8,
            max_groups: 4096,
        }
    }
}

/// One group that churns: what the finding and the daemon's series say.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Churn {
    /// The command name of the process that opened the connections.
    pub process: String,
    /// Where they went: `ADDR:PORT`.
    pub destination: String,
    /// Connections closed within the window.
    pub connections: u64,
    /// The span counted (the window, or less when the stream began later).
    pub window_s: f64,
    pub rate_per_s: f64,
    pub median_life_ms: f64,
    /// Of the connections, the share closed first by the client (each left
    /// a timewait socket on the client's side).
    pub timewait_share: f64,
}

impl Churn {
    /// The finding in plain words.
    pub fn finding(&self) -> String {
        let life = if self.median_life_ms < 10.0 {
            format!("{:.1}", self.median_life_ms)
        } else {
            format!("{:.0}", self.median_life_ms)
        };
        let each = if self.timewait_share >= 0.995 {
            "each leaving TIME_WAIT".to_string()
        } else {
            format!(
                "{:.0}% of them leaving TIME_WAIT",
                self.timewait_share * 100.0
            )
        };
        format!(
            "{} opened {:.0} connections/s to {} (over the last {:.0} s), median life {life} ms, closed first by {}, {each}: reuse connections (keepalive or a pool)",
            self.process, self.rate_per_s, self.destination, self.window_s, self.process
        )
    }
}

/// Lifetime histogram: bucket 0 below 1 µs, then four per octave of µs up
/// to 2^30 µs (about 18 minutes), the last holding everything longer.
const PER_OCTAVE: f64 = 4.0;
const LIFE_BUCKETS: usize = 1 + 30 * 4 + 1;

fn life_bucket(life_ns: u64) -> usize {
    let us = life_ns as f64 / 1e3;
    if us < 1.0 {
        return 0;
    }
    (1 + (us.log2() * PER_OCTAVE) as usize).min(LIFE_BUCKETS - 1)
}

/// The middle of a bucket (geometric), in ns.
fn bucket_life_ns(i: usize) -> f64 {
    if i == 0 {
        return 500.0;
    }
    2f64.powf((i as f64 - 0.5) / PER_OCTAVE) * 1e3
}

/// The connections of one group that closed within one second.
#[derive(Clone, Debug)]
struct Second {
    sec: u64,
    connections: u32,
    left_timewait: u32,
    lives: Box<[u32; LIFE_BUCKETS]>,
}

impl Second {
    fn new(sec: u64) -> Second {
        Second {
            sec,
            connections: 0,
            left_timewait: 0,
            lives: Box::new([0; LIFE_BUCKETS]),
        }
    }
}

/// The seconds of one (process, destination), oldest first.
#[derive(Debug, Default)]
struct Flow {
    seconds: VecDeque<Second>,
}

impl Flow {
    fn second(&mut self, sec: u64) -> &mut Second {
        // Closes arrive about in order: the newest second, or one just
        // before it.
        let at = self.seconds.iter().rposition(|s| s.sec <= sec);
        let i = match at {
            Some(i) if self.seconds[i].sec == sec => i,
            Some(i) => {
                self.seconds.insert(i + 1, Second::new(sec));
                i + 1
            }
            None => {
                self.seconds.push_front(Second::new(sec));
                0
            }
        };
        &mut self.seconds[i]
    }

    /// Drops the seconds before `first`.
    fn forget_before(&mut self, first: u64) {
        while self.seconds.front().is_some_and(|s| s.sec < first) {
            self.seconds.pop_front();
        }
    }
}

/// One network namespace's connections by (process, destination).
#[derive(Debug)]
pub struct ChurnBook {
    opts: ChurnOptions,
    /// When counting began: a window reaching before it is shortened.
    epoch_ns: u64,
    flows: FastMap<String, FastMap<Endpoint, Flow>>,
    groups: usize,
    /// Connections of groups not followed because `max_groups` was reached.
    pub groups_left_out: u64,
}

fn window_secs(window_ns: u64) -> u64 {
    window_ns.div_ceil(1_000_000_000).max(1)
}

impl ChurnBook {
    pub fn new(opts: ChurnOptions, epoch_ns: u64) -> ChurnBook {
        ChurnBook {
            opts,
            epoch_ns,
            flows: FastMap::default(),
            groups: 0,
            groups_left_out: 0,
        }
    }

    /// A finished connection. Only those this host opened with connect()
    /// and that were established count, with a known owner and a lifetime
    /// seen whole.
    pub fn on_timeline(&mut self, t: &Timeline) {
        if t.role != Role::Client || t.open != OpenKind::Active {
            return;
        }
        let Some(owner) = &t.owner else { return };
        let comm = owner.owner.comm.as_str();
        let sec = t.closed_ns / 1_000_000_000;
        let known = self
            .flows
            .get(comm)
            .is_some_and(|m| m.contains_key(&t.remote));
        if !known {
            if self.groups >= self.opts.max_groups {
                self.groups_left_out += 1;
                return;
            }
            self.groups += 1;
        }
        let flow = match self.flows.get_mut(comm) {
            Some(m) => m.entry(t.remote).or_default(),
            None => self
                .flows
                .entry(comm.to_string())
                .or_default()
                .entry(t.remote)
                .or_default(),
        };
        flow.forget_before(sec.saturating_sub(window_secs(self.opts.window_ns)));
        let s = flow.second(sec);
        s.connections += 1;
        if t.timewait.is_some() {
            s.left_timewait += 1;
        }
        s.lives[life_bucket(t.lifetime_ns())] += 1;
    }

    /// The groups that churn over the window ending at `now_ns`, the
    /// `top` fastest first. Groups with nothing left in the window are
    /// forgotten.
    pub fn evaluate(&mut self, now_ns: u64, top: usize) -> Vec<Churn> {
        let now_sec = now_ns / 1_000_000_000;
        // Whole seconds back to the window's start: the span counted is
        // the window, up to a second less.
        let first_sec = now_ns
            .saturating_sub(self.opts.window_ns)
            .div_ceil(1_000_000_000);
        let start_ns = (first_sec * 1_000_000_000).max(self.epoch_ns);
        let span_s = now_ns.saturating_sub(start_ns) as f64 / 1e9;
        let mut out = Vec::new();
        let mut groups = 0;
        for (comm, by_dest) in self.flows.iter_mut() {
            by_dest.retain(|dest, flow| {
                flow.forget_before(first_sec);
                if flow.seconds.is_empty() {
                    return false;
                }
                groups += 1;
                // A second ago is at least a second of evidence.
                if span_s < 1.0 {
                    return true;
                }
                let mut n = 0u64;
                let mut tw = 0u64;
                let mut lives = [0u64; LIFE_BUCKETS];
                for s in flow.seconds.iter().filter(|s| s.sec <= now_sec) {
                    n += u64::from(s.connections);
                    tw += u64::from(s.left_timewait);
                    for (sum, c) in lives.iter_mut().zip(s.lives.iter()) {
                        *sum += u64::from(*c);
                    }
                }
                if n == 0 {
                    return true;
                }
                let c = Churn {
                    process: comm.clone(),
                    destination: dest.to_string(),
                    connections: n,
                    window_s: span_s,
                    rate_per_s: n as f64 / span_s,
                    median_life_ms: median_ns(&lives, n) / 1e6,
                    timewait_share: tw as f64 / n as f64,
                };
                if c.rate_per_s >= self.opts.min_rate
                    && c.median_life_ms * 1e6 <= self.opts.max_median_life_ns as f64
                    && c.timewait_share >= self.opts.min_timewait_share
                {
                    out.push(c);
                }
                true
            });
        }
        self.flows.retain(|_, m| !m.is_empty());
        self.groups = groups;
        out.sort_by(|a, b| {
            b.rate_per_s
                .total_cmp(&a.rate_per_s)
                .then_with(|| a.process.cmp(&b.process))
                .then_with(|| a.destination.cmp(&b.destination))
        });
        out.truncate(top);
        out
    }

    /// (process, destination) groups followed now.
    pub fn groups(&self) -> usize {
        self.groups
    }
}

/// The median of `n` lifetimes counted in `lives`, in ns: the middle of
/// the bucket that holds it.
fn median_ns(lives: &[u64; LIFE_BUCKETS], n: u64) -> f64 {
    let half = n.div_ceil(2);
    let mut seen = 0;
    for (i, c) in lives.iter().enumerate() {
        seen += c;
        if seen >= half {
            return bucket_life_ns(i);
        }
    }
    bucket_life_ns(LIFE_BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::correlate::{CloseKind, Closer, Timewait, TimewaitSubstate};
    use crate::model::owner::{Attribution, OwnerSource};
    use crate::model::Owner;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    /// Where the streams of these tests begin (CLOCK_MONOTONIC ns).
    const T0: u64 = 1_000 * S;

    fn ep(s: &str) -> Endpoint {
        Endpoint::from(s.parse::<std::net::SocketAddr>().unwrap())
    }

    /// A connection of `comm` to `to` opened at `opened_ns`, living
    /// `life_ns`, closed first by the client (which keeps TIME_WAIT) when
    /// `client_closes`, else by the server.
    fn conn(comm: &str, to: &str, opened_ns: u64, life_ns: u64, client_closes: bool) -> Timeline {
        let owner = Attribution {
            owner: Owner {
                pid: 42,
                comm: comm.into(),
                cgroup_id: 0,
            }
            .into(),
            source: OwnerSource::Observed,
        };
        let mut t = Timeline::sample(
            ep("10.0.0.1:40000"),
            ep(to),
            Some(owner),
            Role::Client,
            opened_ns + life_ns,
        );
        t.first_ns = opened_ns;
        t.open = OpenKind::Active;
        t.close = CloseKind::Orderly;
        if client_closes {
            t.closed_by = Some(Closer::Local);
            t.timewait = Some(Timewait {
                substate: TimewaitSubstate::TimeWait,
                hold_ns: 60 * S,
            });
        } else {
            t.closed_by = Some(Closer::Peer);
            t.timewait = None;
        }
        t
    }

    /// `rate` connections a second for `secs` seconds from T0, each
    /// living `life_ns`.
    fn feed(
        book: &mut ChurnBook,
        comm: &str,
        to: &str,
        rate: u64,
        secs: u64,
        life_ns: u64,
        client_closes: bool,
    ) {
        let gap = S / rate;
        for i in 0..rate * secs {
            book.on_timeline(&conn(comm, to, T0 + i * gap, life_ns, client_closes));
        }
    }

    #[test]
    fn a_pool_less_client_is_reported_with_its_rate_and_median_life() {
        let mut book = ChurnBook::new(ChurnOptions::default(), T0);
        feed(&mut book, "python3", "10.0.0.5:5432", 400, 12, 3 * MS, true);
        let got = book.evaluate(T0 + 12 * S, 10);
        assert_eq!(got.len(), 1, "{got:?}");
        let c = &got[0];
        assert_eq!(
            (c.process.as_str(), c.destination.as_str()),
            ("python3", "10.0.0.5:5432")
        );
        assert!((c.rate_per_s - 400.0).abs() < 400.0 * 0.02, "{c:?}");
        assert!((c.median_life_ms - 3.0).abs() < 3.0 * 0.09, "{c:?}");
        assert_eq!(c.timewait_share, 1.0);
        assert!((c.window_s - 10.0).abs() < 1e-9, "{c:?}");
        let f = c.finding();
        let head = format!(
            "python3 opened 400 connections/s to 10.0.0.5:5432 (over the last 10 s), median life {:.1} ms, closed first by python3, ",
            c.median_life_ms
        );
        assert!(f.starts_with(&head), "{f}");
        assert!(
            f.ends_with("each leaving TIME_WAIT: reuse connections (keepalive or a pool)"),
            "{f}"
        );
    }

    #[test]
    fn a_slow_rate_is_not_reported() {
        let mut book = ChurnBook::new(ChurnOptions::default(), T0);
        feed(&mut book, "cron", "10.0.0.5:80", 5, 12, 3 * MS, true);
        assert_eq!(book.evaluate(T0 + 12 * S, 10), Vec::new());
        assert_eq!(book.groups(), 1);
    }

    #[test]
    fn server_side_closes_are_not_reported() {
        let mut book = ChurnBook::new(ChurnOptions::default(), T0);
        feed(&mut book, "ab", "10.0.0.5:80", 400, 12, 2 * MS, false);
        assert_eq!(book.evaluate(T0 + 12 * S, 10), Vec::new());
        // Half and half: under the 80 % a client that closes first needs.
        let mut book = ChurnBook::new(ChurnOptions::default(), T0);
        for i in 0..4000 {
            book.on_timeline(&conn(
                "mixed",
                "10.0.0.5:80",
                T0 + i * S / 400,
                2 * MS,
                i % 2 == 0,
            ));
        }
        assert_eq!(book.evaluate(T0 + 10 * S, 10), Vec::new());
    }

    #[test]
    fn long_lived_connections_are_not_reported() {
        let mut book = ChurnBook::new(ChurnOptions::default(), T0);
        // 30 connections a second, each living 2 s: a pool that turns over.
        feed(&mut book, "java", "10.0.0.5:5432", 30, 12, 2 * S, true);
        assert_eq!(book.evaluate(T0 + 14 * S, 10), Vec::new());
    }

    #[test]
    fn server_side_and_unknown_or_failed_connections_do_not_count() {
        let mut book = ChurnBook::new(ChurnOptions::default(), T0);
        for i in 0..1000 {
            let mut t = conn("nginx", "10.0.0.9:50000", T0 + i * MS, MS, true);
            t.role = Role::Server;
            t.open = OpenKind::Passive;
            book.on_timeline(&t);
            let mut t = conn("curl", "10.0.0.9:80", T0 + i * MS, MS, true);
            t.open = OpenKind::Refused;
            book.on_timeline(&t);
            let mut t = conn("x", "10.0.0.9:80", T0 + i * MS, MS, true);
            t.owner = None;
            book.on_timeline(&t);
        }
        assert_eq!(book.groups(), 0);
        assert_eq!(book.evaluate(T0 + 2 * S, 10), Vec::new());
    }

    #[test]
    fn the_window_moves_on_and_a_stopped_client_is_forgotten() {
        let mut book = ChurnBook::new(ChurnOptions::default(), T0);
        feed(&mut book, "php-fpm", "10.0.0.5:3306", 100, 5, 4 * MS, true);
        // Five seconds in: the window is as long as the stream so far.
        let got = book.evaluate(T0 + 5 * S, 10);
        assert_eq!(got.len(), 1);
        assert!((got[0].rate_per_s - 100.0).abs() < 2.0, "{got:?}");
        assert!((got[0].window_s - 5.0).abs() < 1e-9);
        // 30 s later nothing is left of it.
        assert_eq!(book.evaluate(T0 + 35 * S, 10), Vec::new());
        assert_eq!(book.groups(), 0);
    }

    #[test]
    fn a_burst_in_the_first_second_is_not_enough_evidence() {
        let mut book = ChurnBook::new(ChurnOptions::default(), T0);
        for i in 0..50 {
            book.on_timeline(&conn("sh", "10.0.0.5:80", T0 + i * MS, MS, true));
        }
        assert_eq!(book.evaluate(T0 + S / 2, 10), Vec::new());
    }

    #[test]
    fn groups_are_by_process_and_destination_fastest_first_and_capped() {
        let opts = ChurnOptions {
            max_groups: 3,
            ..ChurnOptions::default()
        };
        let mut book = ChurnBook::new(opts, T0);
        feed(&mut book, "a", "10.0.0.5:80", 50, 10, MS, true);
        feed(&mut book, "a", "10.0.0.6:80", 200, 10, MS, true);
        feed(&mut book, "b", "10.0.0.5:80", 100, 10, MS, true);
        feed(&mut book, "c", "10.0.0.5:80", 100, 10, MS, true);
        assert_eq!(book.groups_left_out, 1000);
        let got = book.evaluate(T0 + 10 * S, 2);
        let keys: Vec<(&str, &str)> = got
            .iter()
            .map(|c| (c.process.as_str(), c.destination.as_str()))
            .collect();
        assert_eq!(keys, [("a", "10.0.0.6:80"), ("b", "10.0.0.5:80")]);
        assert_eq!(book.groups(), 3);
    }

    #[test]
    fn the_median_follows_the_middle_connection() {
        let mut book = ChurnBook::new(ChurnOptions::default(), T0);
        // 60 % live 2 ms, 40 % live 500 ms: the median is 2 ms.
        for i in 0..1000u64 {
            let life = if i % 5 < 3 { 2 * MS } else { 500 * MS };
            book.on_timeline(&conn("go", "[fd00::5]:443", T0 + i * 10 * MS, life, true));
        }
        let got = book.evaluate(T0 + 10 * S, 10);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].destination, "[fd00::5]:443");
        assert!((got[0].median_life_ms - 2.0).abs() < 0.18, "{got:?}");
    }

    #[test]
    fn thresholds_are_options() {
        let opts = ChurnOptions {
            min_rate: 2.0,
            max_median_life_ns: 10 * S,
            min_timewait_share: 0.5,
            window_ns: 3 * S,
            ..ChurnOptions::default()
        };
        let mut book = ChurnBook::new(opts, T0);
        feed(&mut book, "cron", "10.0.0.5:80", 5, 6, 2 * S, true);
        let got = book.evaluate(T0 + 8 * S, 10);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!((got[0].window_s - 3.0).abs() < 1e-9);
        // The last 3 s of a 5/s stream that ended at T0 + 8 s (the closes
        // of T0+3..T0+6 s openings).
        assert!((got[0].rate_per_s - 5.0).abs() < 0.5, "{got:?}");
    }

    #[test]
    fn histogram_buckets_stay_within_an_eighth_octave() {
        for life in [1_000u64, 3 * MS, 17 * MS, 999 * MS, 42 * S] {
            let mid = bucket_life_ns(life_bucket(life));
            // At most 2^(1/8) - 1 (9.05 %) from the middle of its bucket.
            assert!(
                (mid / life as f64 - 1.0).abs() <= 2f64.powf(0.125) - 1.0 + 1e-9,
                "{life}: {mid}"
            );
        }
    }
}
