//! `tcpwatch top` in a real terminal: tmux (a server of the test's own,
//! `tmux -L`) runs a shell in a window of a known size, the shell runs
//! `tcpwatch top` inside a network namespace of the test's own (as the
//! timewait tests do, with `--laddr` the test's own addresses), the test
//! makes known connections there, and reads the screen with `capture-pane`:
//! the destination rows with their TIME_WAIT counts, connections opened,
//! closed and failed (refused) with their totals and non-zero rates, the
//! lost events line; `s` and `r` reorder the destinations as the footer
//! says; `q` and SIGTERM end it with the terminal restored (the shell's
//! screen back, `#{alternate_on}` 0, the cursor shown, the tty modes as
//! they were before: `stty -g` before and after). A 120×40 window shows
//! every destination and the wide columns, and shrinking it to 80×24 hides
//! rows and says how many. `--from` reads a daemon. Without a terminal it
//! is one line and exit 1.
//!
//! Counts are exact only when no event was lost (on a shared host other
//! BPF programs can make the kernel skip tcpwatch's): a run that shows
//! lost events is tried again, up to three times.
//!
//! Run them with
//! `TCPWATCH_BPF_OBJECT=<object> cargo test -p tcpwatch --test live -- --test-threads=1 top::`.

use crate::support as common;
use crate::support::netns::Netns;
use crate::support::run_ok;
use crate::support::sockets::connect_from;
use crate::support::timewait::{client_ip, make_timewaits, our_net, server_ip};

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{tcpwatch_bin, STOP_TIMEOUT};
use tcpwatch::views::summary::ExitSummary;

/// What `top` says on stderr once the view is about to go up.
const READY: &str = "tcpwatch: tracing TCP connections for a live view; Ctrl-C to stop";
const WAIT: Duration = Duration::from_secs(30);

/// A tmux server of this test's own with one session running a shell in
/// a window of a known size. Dropping it kills the server and what runs
/// in it.
struct Tmux {
    socket: String,
    /// Files of this run: the stderr of `top`, `stty -g` before and after.
    dir: PathBuf,
}

impl Tmux {
    fn start(width: u16, height: u16) -> Tmux {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let socket = format!("tcpwatch-top-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&socket);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t = Tmux { socket, dir };
        t.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            "-e",
            "PS1=$ ",
            "bash --norc --noprofile",
        ]);
        t.wait("the shell's prompt", Duration::from_secs(10), |s| {
            s.iter().any(|l| !l.trim().is_empty())
        });
        t
    }

    fn run(&self, args: &[&str]) -> String {
        // -u: UTF-8 whatever the locale, for the view's arrows and ellipses.
        let mut all = vec!["-u", "-L", &self.socket];
        all.extend_from_slice(args);
        run_ok(std::process::Command::new("tmux").args(&all))
    }

    /// Types a line into the shell.
    fn line(&self, text: &str) {
        self.run(&["send-keys", "-t", "top", "-l", text]);
        self.run(&["send-keys", "-t", "top", "Enter"]);
    }

    fn key(&self, key: &str) {
        self.run(&["send-keys", "-t", "top", key]);
    }

    fn screen(&self) -> Vec<String> {
        // -J: a line the shell wrapped comes back whole.
        self.run(&["capture-pane", "-p", "-J", "-t", "top"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn display(&self, format: &str) -> String {
        self.run(&["display", "-p", "-t", "top", format])
            .trim()
            .to_string()
    }

    /// Captures the screen until `done` accepts it; panics with the last
    /// screen after `timeout`.
    fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if done(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "waited {timeout:?} for {what}; the screen:\n{}\n--- top's stderr ---\n{}",
                    s.join("\n"),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.file("top.err")).unwrap_or_default()
    }

    /// Starts `tcpwatch top ARGS` from the shell (in `ns` when given),
    /// after saving the tty's modes; waits until the view is up.
    fn start_top(&self, ns: Option<&Netns>, args: &str) {
        self.line(&format!("stty -g > {}", self.file("stty.before").display()));
        let prefix = ns.map_or(String::new(), |ns| format!("ip netns exec {} ", ns.name));
        self.line(&format!(
            "{prefix}{} top --format json {args} 2>{}; echo TOP-EXIT=$?",
            tcpwatch_bin(),
            self.file("top.err").display()
        ));
        let s = self.wait("the view", WAIT, |s| {
            s.first().is_some_and(|l| l.starts_with(" tcpwatch top · "))
                || s.iter().any(|l| l.starts_with("TOP-EXIT="))
        });
        assert!(
            s[0].starts_with(" tcpwatch top · "),
            "top did not start:\n{}\n{}",
            s.join("\n"),
            self.stderr()
        );
        assert_eq!(
            self.display("#{alternate_on}"),
            "1",
            "top draws on the alternate screen"
        );
    }

    /// The pid of the program the shell runs.
    fn top_pid(&self) -> u32 {
        let shell = self.display("#{pane_pid}");
        let children =
            std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
        let pid: u32 = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the shell {shell} runs nothing"));
        assert_eq!(common::proc_comm(pid), "tcpwatch");
        pid
    }

    /// After `top` ended: it exited 0 and the terminal is as it was; what
    /// it wrote on stderr.
    fn assert_restored(&self) -> String {
        let s = self.wait("top to exit", STOP_TIMEOUT, |s| {
            s.iter().any(|l| l.starts_with("TOP-EXIT="))
        });
        let all = s.join("\n");
        assert!(all.contains("TOP-EXIT=0"), "{all}\n{}", self.stderr());
        assert_eq!(
            self.display("#{alternate_on}"),
            "0",
            "left the alternate screen"
        );
        assert_eq!(self.display("#{cursor_flag}"), "1", "the cursor is shown");
        // The shell's own screen is back, with the command line that ran top.
        assert!(all.contains("; echo TOP-EXIT=$?"), "{all}");
        assert!(!all.contains("tcpwatch top ·"), "{all}");
        self.line(&format!("stty -g > {}", self.file("stty.after").display()));
        let read = |f: &str| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let t = std::fs::read_to_string(self.file(f)).unwrap_or_default();
                if !t.is_empty() || Instant::now() > deadline {
                    return t;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        assert_eq!(
            read("stty.before"),
            read("stty.after"),
            "tty modes restored"
        );
        let err = self.stderr();
        assert!(!err.contains("panicked"), "{err}");
        err
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Reading the screen

/// The exit summary `top --format json` printed last on stderr.
fn exit_summary(stderr: &str) -> Option<ExitSummary> {
    let lines: Vec<String> = stderr.lines().map(str::to_string).collect();
    ExitSummary::from_stderr(&lines)
}

/// The words of the first line whose text starts with `prefix`.
fn row(screen: &[String], prefix: &str) -> Option<Vec<String>> {
    screen
        .iter()
        .find(|l| l.trim_start().starts_with(prefix))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
}

/// The rate and total of a connections panel line (`opened 12.0 340 …`).
fn counter(screen: &[String], name: &str) -> Option<(f64, u64)> {
    let w = row(screen, &format!("{name} "))?;
    Some((w.get(1)?.parse().ok()?, w.get(2)?.parse().ok()?))
}

/// TIME_WAIT, PORTS and RATE/s of a destination row.
fn destination(screen: &[String], name: &str) -> Option<(u64, u64, f64)> {
    let w = row(screen, &format!("{name} "))?;
    Some((
        w.get(1)?.parse().ok()?,
        w.get(3)?.parse().ok()?,
        w.get(4)?.parse().ok()?,
    ))
}

/// Lost events as the screen says them: `N (ring full A, kernel skipped B)`.
fn lost(screen: &[String]) -> Option<(u64, u64, u64)> {
    let l = screen.iter().find(|l| l.contains("(ring full "))?;
    let at = l.find("(ring full ")?;
    let total = l[..at].split_whitespace().last()?.parse().ok()?;
    let rest = &l[at + "(ring full ".len()..];
    let (ring, rest) = rest.split_once(", kernel skipped ")?;
    let skipped = rest.split(')').next()?;
    Some((total, ring.parse().ok()?, skipped.parse().ok()?))
}

/// The sort key the footer names, and whether it is reversed.
fn sort_label(screen: &[String]) -> Option<(String, bool)> {
    let l = screen.iter().find(|l| l.contains(" sort: "))?;
    let rest = &l[l.find(" sort: ")? + " sort: ".len()..];
    let head = rest.split("  ").next()?;
    let label = head.trim_end_matches(['▼', '▲', ' ']);
    Some((label.to_string(), head.ends_with('▲')))
}

/// The order in which `names` appear on the screen.
fn order<'a>(screen: &[String], names: &[&'a str]) -> Vec<&'a str> {
    let mut at: Vec<(usize, &str)> = names
        .iter()
        .filter_map(|n| {
            screen
                .iter()
                .position(|l| l.starts_with(&format!("{n} ")))
                .map(|i| (i, *n))
        })
        .collect();
    at.sort();
    at.into_iter().map(|(_, n)| n).collect()
}

fn ready_or_skip() -> bool {
    if let Err(why) = common::live() {
        common::skip(&why);
        return false;
    }
    if Command::new("tmux").arg("-V").output().is_err() {
        common::skip("tmux is not installed (cargo xtask test installs it)");
        return false;
    }
    true
}

/// `n` connections refused: nothing listens on `port`.
fn refuse(ns: &Netns, port: u16, n: u16, base: u16) {
    ns.in_ns(|| {
        for i in 0..n {
            let src = SocketAddrV4::new(client_ip(), base + i);
            let e = connect_from(
                src.into(),
                SocketAddrV4::new(server_ip(), port).into(),
                false,
            )
            .expect_err("nothing listens there");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        }
    });
}

/// The comm the kernel gives sockets made by threads this one starts.
fn own_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .unwrap()
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------

/// Two destinations of 12 and 5 client-closed connections, made over
/// about two seconds, and 3 refused connections, seen at 80×24.
const N1: u16 = 12;
const N2: u16 = 5;
const REFUSED: u16 = 3;
/// The busier destination has the higher port, so that sorting by name
/// and by TIME_WAIT give different orders.
const P1: u16 = 9200;
const P2: u16 = 9100;
const P_CLOSED: u16 = 9300;

/// One run of the 80×24 scenario; `Err` when events were lost (the counts
/// cannot be exact then).
fn scenario_80x24() -> Result<(), String> {
    let ns = Netns::new();
    let tmux = Tmux::start(80, 24);
    tmux.start_top(Some(&ns), &format!("--laddr {}", our_net()));
    let comm = own_comm();

    // The traffic, a little at a time, so the rates show over several
    // refreshes. The screens while it runs and until all is counted: some
    // refresh must show each kind as a rate.
    let busiest = std::cell::Cell::new((0.0f64, 0.0f64, 0.0f64));
    let watch = |sc: &[String]| {
        let get = |name| counter(sc, name).map_or(0.0, |c| c.0);
        let (o, c, f) = busiest.get();
        busiest.set((
            o.max(get("opened")),
            c.max(get("closed")),
            f.max(get("failed")),
        ));
    };
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            for chunk in 0..4u16 {
                make_timewaits(&ns, P1, N1 / 4, 20_000 + chunk * 100);
                make_timewaits(&ns, P2, 1, 30_000 + chunk);
                std::thread::sleep(Duration::from_millis(500));
            }
            make_timewaits(&ns, P2, N2 - 4, 30_100);
            refuse(&ns, P_CLOSED, REFUSED, 40_000);
        });
        while !t.is_finished() {
            watch(&tmux.screen());
            std::thread::sleep(Duration::from_millis(100));
        }
        t.join().unwrap();
    });

    let d1 = format!("{}:{P1}", server_ip());
    let d2 = format!("{}:{P2}", server_ip());
    let conns = u64::from(N1 + N2);
    let screen = tmux.wait("every connection counted", WAIT, |s| {
        watch(s);
        let (o, c, f) = busiest.get();
        o > 0.0
            && c > 0.0
            && f > 0.0
            && counter(s, "opened").is_some_and(|c| c.1 >= 2 * conns)
            && counter(s, "closed").is_some_and(|c| c.1 >= 2 * conns)
            && counter(s, "failed").is_some_and(|c| c.1 >= u64::from(REFUSED))
            && destination(s, &d1).is_some_and(|d| d.0 >= u64::from(N1))
            && destination(s, &d2).is_some_and(|d| d.0 >= u64::from(N2))
    });
    let busiest = busiest.get();
    let all = screen.join("\n");
    println!("top at 80x24, after the traffic:\n{all}");
    let (lost_total, ring_full, skipped) =
        lost(&screen).unwrap_or_else(|| panic!("no lost events line:\n{all}"));
    assert_eq!(lost_total, ring_full + skipped, "{all}");
    if lost_total > 0 {
        return Err(format!("{lost_total} events lost:\n{all}"));
    }
    assert!(screen.iter().all(|l| l.chars().count() <= 80), "{all}");
    // Exactly what the test did: each connection opened at both ends and
    // closed at both ends; the refused ones failed, as refused.
    assert_eq!(counter(&screen, "opened").unwrap().1, 2 * conns, "{all}");
    assert_eq!(counter(&screen, "closed").unwrap().1, 2 * conns, "{all}");
    assert_eq!(
        counter(&screen, "failed").unwrap().1,
        u64::from(REFUSED),
        "{all}"
    );
    assert_eq!(
        counter(&screen, "refused").map(|c| c.1),
        Some(u64::from(REFUSED)),
        "{all}"
    );
    assert!(
        busiest.0 > 0.0 && busiest.1 > 0.0 && busiest.2 > 0.0,
        "rates seen while the traffic ran (opened, closed, failed): {busiest:?}\n{all}"
    );
    // TIME_WAIT by destination: every client-side socket, each holding a
    // port toward it.
    let (tw1, ports1, _) = destination(&screen, &d1).unwrap();
    let (tw2, ports2, _) = destination(&screen, &d2).unwrap();
    assert_eq!((tw1, ports1), (u64::from(N1), u64::from(N1)), "{all}");
    assert_eq!((tw2, ports2), (u64::from(N2), u64::from(N2)), "{all}");
    assert!(all.contains(&format!("held      {conns} ")), "{all}");
    // By process: this test's threads closed first, on all of them; the
    // row is the command, its one pid beside it.
    let p = row(&screen, &format!("{comm} "))
        .unwrap_or_else(|| panic!("no process row for {comm}:\n{all}"));
    assert_eq!(p[1], std::process::id().to_string(), "{p:?}\n{all}");
    assert!(
        p.ends_with(&[conns.to_string(), "100%".to_string()]),
        "{p:?}\n{all}"
    );

    // Sorting: every key in turn, each order as the footer says.
    let names = [d1.as_str(), d2.as_str()];
    let mut orders = Vec::new();
    for _ in 0..4 {
        let s = tmux.screen();
        let (label, reversed) = sort_label(&s).unwrap_or_else(|| panic!("{}", s.join("\n")));
        assert!(!reversed);
        let got = order(&s, &names);
        let rate = |d: &str| destination(&s, d).unwrap().2;
        let want = match label.as_str() {
            "TIME_WAIT" | "runs out" => vec![names[0], names[1]],
            "name" => vec![names[1], names[0]],
            "rate" if rate(names[1]) > rate(names[0]) => vec![names[1], names[0]],
            "rate" => vec![names[0], names[1]],
            other => panic!("unknown sort {other}"),
        };
        assert_eq!(got, want, "sorted by {label}:\n{}", s.join("\n"));
        orders.push((label.clone(), got));
        tmux.key("s");
        tmux.wait("the next sort key", WAIT, |s| {
            sort_label(s).is_some_and(|(l, _)| l != label)
        });
    }
    let labels: Vec<&str> = orders.iter().map(|o| o.0.as_str()).collect();
    assert_eq!(labels, ["TIME_WAIT", "rate", "runs out", "name"]);
    assert!(
        orders.iter().any(|o| o.1 != orders[0].1),
        "no key changed the order: {orders:?}"
    );
    // Back at TIME_WAIT; reversed, the quieter destination comes first.
    tmux.key("r");
    let s = tmux.wait("the reversed order", WAIT, |s| {
        sort_label(s).is_some_and(|(_, r)| r)
    });
    assert_eq!(order(&s, &names), [names[1], names[0]], "{}", s.join("\n"));

    tmux.key("q");
    let err = tmux.assert_restored();
    assert!(err.contains(READY), "{err}");
    // The exit summary, read as the library's data.
    let Some(ExitSummary::Top(summary)) = exit_summary(&err) else {
        panic!("no top summary:\n{err}");
    };
    assert!(summary.refreshes >= 2, "{summary:?}");
    assert!(summary.stream.events > 0, "{summary:?}");
    assert!(
        summary.stream.lost.total >= lost_total,
        "the summary counts at least the losses the screen showed: {summary:?}"
    );
    Ok(())
}

#[test]
fn top_shows_the_connections_the_test_made_and_q_restores_the_terminal() {
    if !ready_or_skip() {
        return;
    }
    for attempt in 1..=3 {
        match scenario_80x24() {
            Ok(()) => return,
            Err(why) if attempt < 3 => println!("attempt {attempt}: {why}; again"),
            Err(why) => panic!("events lost in all three attempts; the last: {why}"),
        }
    }
}

/// 120×40 shows every one of 16 destinations and the wide columns;
/// shrunk to 80×24 it shows fewer and says how many more; SIGTERM ends it
/// with the terminal restored.
#[test]
fn a_larger_terminal_shows_more_and_sigterm_restores_it() {
    if !ready_or_skip() {
        return;
    }
    const DESTS: u16 = 16;
    let ns = Netns::new();
    let tmux = Tmux::start(120, 40);
    tmux.start_top(Some(&ns), &format!("--laddr {}", our_net()));
    for d in 0..DESTS {
        make_timewaits(&ns, 9_000 + d, 1 + d % 3, 20_000 + d * 10);
    }
    let name = |d: u16| format!("{}:{}", server_ip(), 9_000 + d);
    let big = tmux.wait("all 16 destinations", WAIT, |s| {
        (0..DESTS).all(|d| destination(s, &name(d)).is_some_and(|r| r.0 == u64::from(1 + d % 3)))
    });
    let all = big.join("\n");
    println!("top at 120x40:\n{all}");
    assert!(all.contains("RANGE") && all.contains("STEADY"), "{all}");
    assert!(!all.contains("more destinations"), "{all}");
    assert!(
        big.iter().any(|l| l.chars().count() > 80),
        "uses the width:\n{all}"
    );

    tmux.run(&["resize-window", "-t", "top", "-x", "80", "-y", "24"]);
    let small = tmux.wait("the smaller view", WAIT, |s| {
        s.len() == 24 && s.iter().any(|l| l.contains("more destinations"))
    });
    let all = small.join("\n");
    println!("the same at 80x24:\n{all}");
    assert!(!all.contains("STEADY"), "{all}");
    let shown = (0..DESTS)
        .filter(|d| destination(&small, &name(*d)).is_some())
        .count();
    let hidden: usize = small
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("… ")?
                .strip_suffix(" more destinations")?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(shown > 0 && shown < usize::from(DESTS), "{all}");
    assert_eq!(shown + hidden, usize::from(DESTS), "{all}");

    let pid = tmux.top_pid();
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let err = tmux.assert_restored();
    assert!(err.contains(READY), "{err}");
    assert!(
        matches!(exit_summary(&err), Some(ExitSummary::Top(s)) if s.refreshes > 0),
        "{err}"
    );
}

/// `--from`: the daemon's figures, on the same screen.
#[test]
fn top_from_a_daemon_shows_its_figures() {
    if !ready_or_skip() {
        return;
    }
    // Kept long enough that other tests' churn on this host does not push
    // the test's failed connections out before they are read.
    let daemon = Daemon::start(&["--interval", "1", "--top", "100000", "--keep", "100000"]);
    let ns = Netns::new();
    let tmux = Tmux::start(100, 30);
    // The test's namespace, by the name the daemon labels it with.
    tmux.start_top(
        None,
        &format!("--from {} --netns {}", daemon.url(), ns.name),
    );
    make_timewaits(&ns, P1, N1, 20_000);
    refuse(&ns, P_CLOSED, REFUSED, 40_000);
    let d1 = format!("{}:{P1}", server_ip());
    let conns = u64::from(N1);
    let screen = tmux.wait("the daemon's figures", WAIT, |s| {
        destination(s, &d1).is_some_and(|d| d.0 == conns)
            && counter(s, "refused").is_some_and(|c| c.1 >= u64::from(REFUSED))
            && counter(s, "opened").is_some_and(|c| c.1 >= 2 * conns)
    });
    let all = screen.join("\n");
    println!("top --from:\n{all}");
    assert!(all.contains(&format!("from {}", daemon.url())), "{all}");
    assert!(lost(&screen).is_some(), "{all}");
    // The daemon counts every namespace: at least what the test did.
    assert!(counter(&screen, "closed").unwrap().1 >= 2 * conns, "{all}");
    tmux.key("q");
    let err = tmux.assert_restored();
    let Some(ExitSummary::TopFrom(s)) = exit_summary(&err) else {
        panic!("no top --from summary:\n{err}");
    };
    assert_eq!(s.daemon, daemon.url());
    assert!(s.refreshes > 0, "{s:?}");
    daemon.stop();
}

/// Piped, it says in one line that it needs a terminal, and exits 1
/// before loading anything (so no root is needed).
#[test]
fn without_a_terminal_it_is_one_line_and_exit_1() {
    let out = Command::new(tcpwatch_bin())
        .arg("top")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("tcpwatch: ") && err.contains("needs a terminal"),
        "{err}"
    );
}
