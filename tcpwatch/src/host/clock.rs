//! Kernel timestamps are CLOCK_MONOTONIC nanoseconds; people want wall-clock
//! time. The offset between the two is taken once at start.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, in nanoseconds.
    offset_ns: i128,
}

fn read(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// CLOCK_MONOTONIC now, in the units of kernel event timestamps.
pub fn monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC).max(0) as u64
}

impl Clock {
    pub fn system() -> Clock {
        let mono = read(libc::CLOCK_MONOTONIC);
        let real = read(libc::CLOCK_REALTIME);
        Clock {
            offset_ns: real - mono,
        }
    }

    /// A clock whose monotonic zero is the given wall-clock time (replays and
    /// tests).
    pub fn with_offset_ns(offset_ns: i128) -> Clock {
        Clock { offset_ns }
    }

    pub fn offset_ns(&self) -> i128 {
        self.offset_ns
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (i128::from(mono_ns) + self.offset_ns).max(0);
        let secs = (ns / 1_000_000_000) as u64;
        let nanos = (ns % 1_000_000_000) as u32;
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    /// RFC 3339 in UTC with nanoseconds: `2026-11-23T23:41:07.123456789Z`.
    pub fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_nanos(self.wall(mono_ns)).to_string()
    }

    /// `HH:MM:SS.micros` in UTC, for aligned text columns.
    pub fn time_of_day(&self, mono_ns: u64) -> String {
        let full = self.rfc3339(mono_ns);
        // 2026-11-23T23:41:07.123456789Z → 23:41:07.123456
        full.get(11..26).unwrap_or(&full).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_nanoseconds() {
        // 2026-11-23T00:00:00Z = 1795392000 s since the epoch.
        let c = Clock::with_offset_ns(1_795_392_000 * 1_000_000_000);
        assert_eq!(c.rfc3339(1_000_000_123), "2026-11-23T00:00:01.000000123Z");
        assert_eq!(c.time_of_day(3_723_000_456_789), "01:02:03.000456");
    }

    #[test]
    fn system_clock_is_close_to_now() {
        let c = Clock::system();
        let wall = c.wall(monotonic_ns());
        let now = SystemTime::now();
        let diff = now.duration_since(wall).unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_secs(1), "{diff:?}");
    }
}
