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

    /// The date and time for text output, in `zone`.
    pub fn text(&self, mono_ns: u64, zone: Zone) -> String {
        zone.stamp(self.wall(mono_ns))
    }

    /// `HH:MM:SS.micros` in UTC, for aligned text columns.
    pub fn time_of_day(&self, mono_ns: u64) -> String {
        let full = self.rfc3339(mono_ns);
        // 2026-11-23T23:41:07.123456789Z → 23:41:07.123456
        full.get(11..26).unwrap_or(&full).to_string()
    }
}

/// Which clock face text output reads: UTC (the default, as in JSON) or
/// the host's local time (`--local-time`, which follows `TZ`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Zone {
    #[default]
    Utc,
    Local,
}

/// Width of [`Zone::stamp`]: `2026-11-23 23:41:07.123456`.
pub const STAMP_WIDTH: usize = 26;

/// Seconds east of UTC that local time is at `t`, as the C library says
/// (it reads `TZ`, or /etc/localtime).
fn local_offset_s(t: SystemTime) -> i64 {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as libc::time_t);
    // SAFETY: all-zero is a valid `tm`; both pointers are valid for the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
    if ok {
        tm.tm_gmtoff
    } else {
        0
    }
}

impl Zone {
    pub fn from_flag(local_time: bool) -> Zone {
        if local_time {
            Zone::Local
        } else {
            Zone::Utc
        }
    }

    fn offset_s(self, t: SystemTime) -> i64 {
        match self {
            Zone::Utc => 0,
            Zone::Local => local_offset_s(t),
        }
    }

    /// Date and time to the microsecond for aligned text columns:
    /// `2026-11-23 23:41:07.123456` (always [`STAMP_WIDTH`] characters).
    pub fn stamp(self, t: SystemTime) -> String {
        let off = self.offset_s(t);
        let shifted = if off >= 0 {
            t + Duration::from_secs(off as u64)
        } else {
            t.checked_sub(Duration::from_secs(off.unsigned_abs()))
                .unwrap_or(UNIX_EPOCH)
        };
        // 2026-11-23T23:41:07.123456Z → 2026-11-23 23:41:07.123456
        let full = humantime::format_rfc3339_micros(shifted).to_string();
        full.get(..STAMP_WIDTH)
            .unwrap_or(&full)
            .replacen('T', " ", 1)
    }

    /// [`Zone::stamp`] followed by the zone: `UTC` or the offset (`+05:30`).
    pub fn stamp_with_zone(self, t: SystemTime) -> String {
        format!("{} {}", self.stamp(t), self.name(t))
    }

    /// `UTC`, or local time's offset from it at `t` (`+05:30`).
    pub fn name(self, t: SystemTime) -> String {
        match self {
            Zone::Utc => "UTC".into(),
            Zone::Local => {
                let off = self.offset_s(t);
                let sign = if off < 0 { '-' } else { '+' };
                let m = off.unsigned_abs() / 60;
                format!("{sign}{:02}:{:02}", m / 60, m % 60)
            }
        }
    }

    /// The time column's heading in text tables.
    pub fn heading(self) -> &'static str {
        match self {
            Zone::Utc => "TIME(UTC)",
            Zone::Local => "TIME(LOCAL)",
        }
    }

    /// An RFC 3339 time (as in JSON records) for text output; as it is if
    /// it does not read.
    pub fn restamp(self, rfc3339: &str) -> String {
        humantime::parse_rfc3339(rfc3339).map_or_else(|_| rfc3339.to_string(), |t| self.stamp(t))
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
        assert_eq!(
            c.text(3_723_000_456_789, Zone::Utc),
            "2026-11-23 01:02:03.000456"
        );
        assert_eq!(
            Zone::Utc.restamp("2026-11-23T01:02:03.000456789Z"),
            "2026-11-23 01:02:03.000456"
        );
        assert_eq!(
            Zone::Utc.stamp_with_zone(c.wall(0)),
            "2026-11-23 00:00:00.000000 UTC"
        );
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
