//! Rendering a TIME_WAIT snapshot: a table for people, one JSON object per
//! interval for programs.

use std::fmt::Write as _;

use crate::host::clock::Zone;
use crate::model::timewait::{Group, Snapshot};

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "?".to_string(), |v| v.to_string())
}

fn groups(out: &mut String, title: &str, groups: &[Group], processes: bool) {
    let _ = writeln!(
        out,
        "{title:<44} {:>8} {:>6}{}",
        "COUNT",
        "SHARE",
        if processes {
            "  PIDS           CGROUP"
        } else {
            ""
        }
    );
    if groups.is_empty() {
        let _ = writeln!(out, "  -");
    }
    for g in groups {
        // The pid of a one-process group, or how many processes.
        let pids = match (g.pid, g.processes) {
            (Some(pid), _) => pid.to_string(),
            (None, Some(n)) => format!("{n} processes"),
            (None, None) => String::new(),
        };
        let extra = if processes {
            format!(
                "  {pids:<14} {}",
                g.cgroup.map(|c| c.to_string()).unwrap_or_default()
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {:<42} {:>8} {:>5.1}%{}",
            g.key,
            g.count,
            g.share * 100.0,
            extra.trim_end()
        );
    }
}

pub fn timewait_text(s: &Snapshot, zone: Zone) -> String {
    let mut out = String::new();
    let k = &s.kernel;
    let netns = match (&s.netns_name, s.netns) {
        (Some(name), Some(inode)) => format!("   netns {name} ({inode})"),
        (None, Some(inode)) => format!("   netns {inode}"),
        _ => String::new(),
    };
    let ts =
        humantime::parse_rfc3339(&s.ts).map_or_else(|_| s.ts.clone(), |t| zone.stamp_with_zone(t));
    let _ = writeln!(out, "tcpwatch timewait   {ts}{netns}");
    let _ = writeln!(
        out,
        "timewait sockets: {}  (TIME_WAIT {}, FIN_WAIT2 {})",
        s.total, s.time_wait, s.fin_wait2
    );
    let _ = writeln!(
        out,
        "  kernel: sockstat tw {}, sock_diag lists {}, tcp_max_tw_buckets {}, overflows {} since start ({} in the last interval)",
        opt(k.sockstat_tw),
        opt(s.kernel_listed),
        opt(k.max_tw_buckets),
        opt(k.overflow_since_start),
        opt(k.overflow_last_interval)
    );
    if s.from_recording {
        let _ = writeln!(
            out,
            "  from a recording: only sockets made while it ran are counted (none from before it began), each for its full time (no kernel list to check against); the kernel's counts and sysctls other than tcp_fin_timeout are unknown (?)"
        );
    } else {
        if let Some(c) = &s.check {
            let _ = writeln!(
                out,
                "  checked against that list {:.0} s ago: {} entries it lacked dropped, {} not seen made added ({} checks; {} dropped and {} added since start)",
                c.age_s, c.dropped, c.not_seen, c.checks, c.dropped_since_start, c.not_seen_since_start
            );
        }
        let _ = writeln!(
            out,
            "  of these: {} from before tracing, {} closed in the last moment (not yet correlated), {} not seen made (lost events), {} not tracked one by one",
            s.before_tracing, s.just_closed, s.unattributed, s.untracked
        );
    }
    let _ = writeln!(
        out,
        "created: {:.1}/s over the last interval, {:.1}/s over the last minute",
        s.rate_last_interval, s.rate_last_minute
    );
    let _ = writeln!(
        out,
        "sysctls: ip_local_port_range {} ports, tcp_tw_reuse {}, tcp_fin_timeout {}s, tcp_timestamps {}, tcp_max_tw_buckets {}",
        opt(k.port_range),
        opt(k.tw_reuse),
        opt(k.fin_timeout_s),
        opt(k.timestamps),
        opt(k.max_tw_buckets)
    );
    out.push('\n');
    groups(&mut out, "BY PROCESS (closed first)", &s.by_process, true);
    out.push('\n');
    groups(&mut out, "BY REMOTE ENDPOINT", &s.by_remote, false);
    out.push('\n');
    groups(&mut out, "BY LOCAL ENDPOINT", &s.by_local, false);
    out.push('\n');
    if s.by_container
        .iter()
        .any(|g| g.key != crate::model::timewait::NO_CONTAINER)
    {
        groups(
            &mut out,
            "BY CONTAINER (closed first)",
            &s.by_container,
            false,
        );
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{:<44} {:>8} {:>8} {:>9} {:>9}  RUNS OUT IN",
        "CLIENT PORTS FROM -> TOWARD", "HELD", "RANGE", "RATE/s", "STEADY"
    );
    if s.destinations.is_empty() {
        let _ = writeln!(out, "  -");
    }
    for d in &s.destinations {
        let runs_out = match (d.exhaustion_s, d.tw_reuse_applies) {
            (Some(secs), _) => format!("{secs:.0} s"),
            // A recording does not say the port range.
            (None, _) if d.port_range.is_none() => "? (port range unknown)".to_string(),
            (None, true) => "never (tcp_tw_reuse)".to_string(),
            (None, false) if d.rate_per_s == 0.0 => "not being used up now".to_string(),
            (None, false) => "never at this rate".to_string(),
        };
        let _ = writeln!(
            out,
            "  {:<42} {:>8} {:>8} {:>9.1} {:>9.0}  {}",
            format!("{} -> {}", d.local, d.remote),
            d.ports_held,
            opt(d.port_range),
            d.rate_per_s,
            d.steady_state_ports,
            runs_out
        );
    }
    out.push('\n');
    let _ = writeln!(out, "findings:");
    for f in &s.findings {
        let _ = writeln!(out, "  - {f}");
    }
    out
}

pub fn timewait_json(s: &Snapshot) -> String {
    serde_json::to_string(s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
