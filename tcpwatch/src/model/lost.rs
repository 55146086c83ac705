//! Events lost between the kernel and tcpwatch, by cause. The kernel counts
//! them (`kernel::probe::LostCounter` reads the counts); every view shows
//! them, never silently.

/// Events lost since load, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LostCounts {
    /// The ring buffer had no room (a larger `--ring-size` helps).
    pub ring_full: u64,
    /// The kernel did not run the program: another BPF program was running
    /// on that CPU (`recursion_misses`).
    pub skipped: u64,
}

impl LostCounts {
    pub fn total(&self) -> u64 {
        self.ring_full + self.skipped
    }

    /// Takes the kernel's latest counts and returns the line to say about
    /// what they add.
    pub fn advance(&mut self, latest: LostCounts) -> String {
        let before = std::mem::replace(self, latest);
        latest.warning(&before)
    }

    /// The line said when the counts grow from `before`.
    pub fn warning(&self, before: &LostCounts) -> String {
        format!(
            "LOST {} events ({} in all: {} with the ring buffer full - raise --ring-size; {} skipped by the kernel while another BPF program ran on the CPU)",
            self.total().saturating_sub(before.total()),
            self.total(),
            self.ring_full,
            self.skipped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_says_what_was_added() {
        let before = LostCounts {
            ring_full: 5,
            skipped: 2,
        };
        let now = LostCounts {
            ring_full: 6,
            skipped: 4,
        };
        let mut seen = before;
        let line = seen.advance(now);
        assert_eq!(seen, now);
        assert!(
            line.starts_with("LOST 3 events (10 in all: 6 with the ring buffer full"),
            "{line}"
        );
        assert!(line.contains("; 4 skipped by the kernel"), "{line}");
        assert_eq!(now.total(), 10);
    }
}
