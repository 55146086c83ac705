//! Writing up a measurement, for `cargo xtask bench` and `cargo xtask
//! soak`: the machine it ran on, numbers and dates as the reports print
//! them, and the parts of docs/performance.md that each task replaces.

use std::{fs, thread, time::SystemTime};

use crate::tracer::status_kib;

/// The part of docs/performance.md `cargo xtask bench` writes.
pub(crate) const BENCH_SECTION: &str = "bench";

/// The machine a measurement ran on.
#[derive(Clone, Debug, Default)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) model: String,
    pub(crate) kernel: String,
    pub(crate) memory_bytes: u64,
}

impl Machine {
    pub(crate) fn read() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpus: thread::available_parallelism().map_or(0, usize::from),
            model,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            memory_bytes: status_kib(&meminfo, "MemTotal:").unwrap_or(0) * 1024,
        }
    }

    /// "2 CPUs (AMD EPYC), Linux 6.18.44, 23.5 GiB memory".
    pub(crate) fn line(&self) -> String {
        format!(
            "{} CPUs ({}), Linux {}, {:.1} GiB memory",
            self.cpus,
            self.model,
            self.kernel,
            self.memory_bytes as f64 / (1u64 << 30) as f64
        )
    }
}

/// 27512.4 → "27,512".
pub(crate) fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// "2026-11-23 14:05 UTC".
pub(crate) fn utc_date(t: SystemTime) -> String {
    // "2026-11-23T14:05:09Z"
    let stamp = humantime::format_rfc3339_seconds(t).to_string();
    format!("{} {} UTC", &stamp[..10], &stamp[11..16])
}

// ---------------------------------------------------------------------------
// docs/performance.md, written by more than one task

/// Replaces the part of `page` between `<!-- NAME:begin -->` and
/// `<!-- NAME:end -->` with `body` (markers added), keeping every other
/// part. docs/performance.md is written by `cargo xtask bench` and
/// `cargo xtask soak`, and each replaces only its own part. Text outside
/// any part is the bench's page from before parts existed: the bench's
/// new part replaces it, at the top; any other new part goes at the end.
pub(crate) fn splice_section(page: &str, name: &str, body: &str) -> String {
    let bench = name == BENCH_SECTION;
    let block = format!(
        "<!-- {name}:begin -->\n{}\n<!-- {name}:end -->\n",
        body.trim_end()
    );
    let mut out = String::new();
    let mut placed = false;
    let mut rest = page;
    while !rest.is_empty() {
        let Some((before, part, part_name, after)) = next_section(rest) else {
            if !bench {
                out.push_str(rest);
            }
            break;
        };
        if !bench {
            out.push_str(before);
        }
        if part_name == name {
            if !placed {
                push_block(&mut out, &block);
                placed = true;
            }
        } else {
            push_block(&mut out, part);
        }
        rest = after;
    }
    if !placed {
        if bench {
            let others = std::mem::take(&mut out);
            push_block(&mut out, &block);
            push_block(&mut out, &others);
        } else {
            push_block(&mut out, &block);
        }
    }
    out
}

/// Appends `block`, a blank line apart from what comes before it.
fn push_block(out: &mut String, block: &str) {
    if block.trim().is_empty() {
        return;
    }
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push_str(if out.ends_with('\n') { "\n" } else { "\n\n" });
    }
    out.push_str(block.trim_start_matches('\n'));
    if !out.ends_with('\n') {
        out.push('\n');
    }
}

/// The first marked part of `text`: (text before it, the part with its
/// markers, its name, text after it).
fn next_section(text: &str) -> Option<(&str, &str, &str, &str)> {
    let start = text.find("<!-- ")?;
    let open_end = start + text[start..].find(" -->")? + " -->".len();
    let name = text[start + "<!-- ".len()..open_end - " -->".len()].strip_suffix(":begin")?;
    let close = format!("<!-- {name}:end -->");
    let end = open_end + text[open_end..].find(&close)? + close.len();
    let end = if text[end..].starts_with('\n') {
        end + 1
    } else {
        end
    };
    Some((&text[..start], &text[start..end], name, &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(thousands(27_512.4), "27,512");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
        let at = |secs: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        assert_eq!(utc_date(at(0)), "1970-01-01 00:00 UTC");
        assert_eq!(
            utc_date(at(20_415 * 86_400 + 14 * 3600 + 5 * 60 + 9)),
            "2025-11-23 14:05 UTC"
        );
        assert_eq!(
            utc_date(at(11_016 * 86_400 + 86_399)),
            "2000-02-29 23:59 UTC"
        );
    }

    const BENCH: &str = "# Performance\n\nbench figures\n";

    #[test]
    fn each_writer_replaces_only_its_own_section() {
        // The bench's page from before sections, then a first soak.
        let page = splice_section(BENCH, "soak", "## Soak\n\nfirst");
        assert_eq!(
            page,
            "# Performance\n\nbench figures\n\n<!-- soak:begin -->\n## Soak\n\nfirst\n<!-- soak:end -->\n"
        );
        // The bench again: its old text goes, the soak stays after it.
        let page = splice_section(&page, "bench", "# Performance\n\nnew bench");
        assert_eq!(
            page,
            "<!-- bench:begin -->\n# Performance\n\nnew bench\n<!-- bench:end -->\n\n\
             <!-- soak:begin -->\n## Soak\n\nfirst\n<!-- soak:end -->\n"
        );
        // Each replaces its own part in place.
        let page = splice_section(&page, "soak", "## Soak\n\nsecond");
        assert!(
            page.contains("new bench") && page.contains("second"),
            "{page}"
        );
        assert!(!page.contains("first"), "{page}");
        let again = splice_section(&page, "bench", "# Performance\n\nnewer bench");
        assert!(again.starts_with("<!-- bench:begin -->\n# Performance\n\nnewer bench\n"));
        assert!(
            again.contains("second") && !again.contains("new bench\n"),
            "{again}"
        );
        // Writing the same thing twice changes nothing.
        assert_eq!(splice_section(&again, "soak", "## Soak\n\nsecond"), again);
        assert_eq!(
            splice_section(&again, "bench", "# Performance\n\nnewer bench"),
            again
        );
    }

    #[test]
    fn an_empty_or_unclosed_page_still_gets_its_section() {
        assert_eq!(
            splice_section("", "soak", "x"),
            "<!-- soak:begin -->\nx\n<!-- soak:end -->\n"
        );
        // An unclosed marker is plain text (the bench's, which it replaces).
        let page = splice_section("<!-- soak:begin -->\nhalf", "bench", "b");
        assert_eq!(page, "<!-- bench:begin -->\nb\n<!-- bench:end -->\n");
    }
}
