//! What the daemon itself costs, read at each scrape so the fleet sees it
//! next to what it traces: the process's CPU time (`getrusage`) and
//! resident memory (`/proc/self/statm`), and each of its BPF programs' run
//! time and run count as the kernel counts them (`bpf_prog_info`).
//!
//! The kernel counts program run time and runs only while BPF statistics
//! are on (`kernel.bpf_stats_enabled=1`, or a process holding a
//! `BPF_ENABLE_STATS` handle, as `daemon --bpf-stats` does): the series'
//! HELP says at each scrape whether they are counting.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use crate::kernel::probe::{bpf_stats_enabled, ProgramStats, Programs};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

/// The daemon's own cost; the programs are set once the probe is live.
#[derive(Clone, Debug, Default)]
pub struct OwnCost {
    programs: Arc<OnceLock<Programs>>,
    /// The daemon holds a `BPF_ENABLE_STATS` handle (`--bpf-stats`).
    holds_stats: bool,
}

/// One reading of the process's figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessCost {
    /// User and system CPU time, in seconds.
    pub cpu_s: f64,
    pub rss_bytes: Option<u64>,
}

impl OwnCost {
    /// `holds_stats`: the daemon keeps BPF statistics on itself.
    pub fn new(holds_stats: bool) -> OwnCost {
        OwnCost {
            programs: Arc::default(),
            holds_stats,
        }
    }

    /// Whether the kernel counts program runs now, as far as can be told:
    /// the sysctl does not show other processes' `BPF_ENABLE_STATS`
    /// handles, only its own setting.
    fn counting(&self) -> Option<bool> {
        match self.holds_stats {
            true => Some(true),
            false => bpf_stats_enabled(),
        }
    }

    /// The live probe's programs: their figures are served from now on.
    pub fn set_programs(&self, programs: Programs) {
        let _ = self.programs.set(programs);
    }
}

/// The process's CPU time and resident memory now.
pub fn process_cost() -> ProcessCost {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let cpu_s = if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(ru.ru_utime) + t(ru.ru_stime)
    } else {
        0.0
    };
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let rss_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| resident_pages(&s))
        .and_then(|pages| pages.checked_mul(u64::try_from(page).ok()?));
    ProcessCost { cpu_s, rss_bytes }
}

/// The second field of `/proc/self/statm`: resident pages.
fn resident_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// The HELP of the program series: whether the kernel counts them now.
fn stats_note(enabled: Option<bool>) -> &'static str {
    match enabled {
        Some(true) => {
            "counted while BPF statistics are on (kernel.bpf_stats_enabled=1 or daemon --bpf-stats), as they are now"
        }
        Some(false) => {
            "counted only while kernel.bpf_stats_enabled=1 (or daemon --bpf-stats): it is 0 now, so this does not grow unless another process holds BPF statistics on"
        }
        None => "counted only while kernel.bpf_stats_enabled=1, which cannot be read here",
    }
}

impl Collector for OwnCost {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = process_cost();
        let cpu = ConstCounter::new(p.cpu_s);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "CPU time the daemon used, user and system (getrusage)",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        if let Some(rss) = p.rss_bytes {
            let rss = ConstGauge::new(rss as i64);
            rss.encode(encoder.encode_descriptor(
                "process_resident_memory",
                "Resident memory of the daemon (/proc/self/statm)",
                Some(&Unit::Bytes),
                rss.metric_type(),
            )?)?;
        }
        let enabled = self.counting();
        let on = ConstGauge::new(i64::from(enabled.unwrap_or(false)));
        on.encode(encoder.encode_descriptor(
            "bpf_stats_enabled",
            "1 while the kernel counts BPF programs' run time and runs: kernel.bpf_stats_enabled=1, or the daemon holds them on (--bpf-stats)",
            None,
            on.metric_type(),
        )?)?;
        let Some(programs) = self.programs.get() else {
            return Ok(());
        };
        let stats = programs.stats();
        let note = stats_note(enabled);
        encode_programs(
            &mut encoder,
            "bpf_program_run",
            &format!("Time the kernel spent running each tcpwatch BPF program (bpf_prog_info run_time_ns); {note}"),
            Some(&Unit::Seconds),
            &stats,
            |s| ConstCounter::new(s.run_time_ns as f64 / 1e9),
        )?;
        encode_programs(
            &mut encoder,
            "bpf_program_runs",
            &format!("Times each tcpwatch BPF program ran (bpf_prog_info run_cnt); {note}"),
            None,
            &stats,
            |s| ConstCounter::new(s.run_count),
        )
    }
}

/// One counter family with a series per program.
fn encode_programs<N: prometheus_client::encoding::EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    stats: &[ProgramStats],
    value: impl Fn(&ProgramStats) -> ConstCounter<N>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        unit,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for s in stats {
        let labels = ProgramLabels {
            program: s.name.clone(),
        };
        value(s).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn statm_gives_resident_pages() {
        assert_eq!(resident_pages("2519 811 652 246 0 318 0\n"), Some(811));
        assert_eq!(resident_pages("2519"), None);
        assert_eq!(resident_pages("2519 x"), None);
    }

    #[test]
    fn cost_series_are_served_and_say_whether_bpf_stats_count() {
        let mut registry = Registry::with_prefix("tcpwatch");
        let cost = OwnCost::new(false);
        registry.register_collector(Box::new(cost.clone()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        let value = |name: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing in\n{out}"))
                .parse()
                .unwrap()
        };
        // This test process has used some CPU and holds some memory.
        let cpu = value("tcpwatch_process_cpu_seconds_total");
        assert!(cpu > 0.0 && cpu <= process_cost().cpu_s, "{cpu}");
        assert!(value("tcpwatch_process_resident_memory_bytes") >= 4096.0);
        let on = value("tcpwatch_bpf_stats_enabled");
        assert_eq!(on == 1.0, bpf_stats_enabled() == Some(true));
        // No probe yet: no program series.
        assert!(!out.contains("bpf_program_run"), "{out}");
        // With programs (none loaded here), the families and their HELP.
        cost.set_programs(Programs::default());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        let help = out
            .lines()
            .find(|l| l.starts_with("# HELP tcpwatch_bpf_program_run_seconds "))
            .unwrap_or_else(|| panic!("no HELP in\n{out}"));
        assert!(help.ends_with(stats_note(bpf_stats_enabled())), "{help}");
        assert!(
            out.contains("# TYPE tcpwatch_bpf_program_runs counter"),
            "{out}"
        );
    }

    #[test]
    fn holding_stats_on_means_counting() {
        assert_eq!(OwnCost::new(true).counting(), Some(true));
        assert_eq!(OwnCost::new(false).counting(), bpf_stats_enabled());
    }

    #[test]
    fn help_says_when_programs_are_not_counted() {
        assert!(stats_note(Some(false)).contains("it is 0 now"));
        assert!(stats_note(Some(true)).contains("as they are now"));
        assert!(stats_note(None).contains("cannot be read"));
    }
}
