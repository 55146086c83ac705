//! The kernel's own TIME_WAIT figures, to set beside what tcpwatch sees.
//!
//! - `/proc/net/sockstat`: how many timewait sockets exist right now
//!   (`TCP: … tw N …`);
//! - `/proc/net/netstat`: `TcpExt: TCPTimeWaitOverflow`, how often a
//!   timewait socket was not created because `tcp_max_tw_buckets` was reached;
//! - the sysctls that bound and shape TIME_WAIT (`tcp_max_tw_buckets`,
//!   `ip_local_port_range`, `tcp_tw_reuse`, `tcp_fin_timeout`,
//!   `tcp_timestamps`).
//!
//! Each file has a pure parse function over its text, so the formats are
//! tested without a kernel, and a reader for the live system.
//!
//! All of these are per network namespace. The readers use
//! `/proc/thread-self/net/…` rather than `/proc/net/…`: `/proc/net` follows
//! the thread-group leader, so a thread that entered another namespace with
//! `setns` would otherwise read the leader's figures. `/proc/sys/net/…`
//! already follows the calling thread's namespace.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where the namespace-aware `net` directory lives, `/proc/net` on kernels
/// older than 3.17 (no `/proc/thread-self`).
fn proc_net(file: &str) -> PathBuf {
    let thread_self = Path::new("/proc/thread-self/net");
    if thread_self.is_dir() {
        thread_self.join(file)
    } else {
        Path::new("/proc/net").join(file)
    }
}

/// The directory of the `net.ipv4.*` sysctls.
pub const SYSCTL_IPV4_DIR: &str = "/proc/sys/net/ipv4";

/// Errors reading the kernel's figures.
#[derive(Debug, thiserror::Error)]
pub enum KernelStatError {
    /// A file could not be read (missing, or no permission).
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file was read but did not hold what it should.
    #[error("{path}: unexpected contents {text:?}")]
    Malformed { path: PathBuf, text: String },
}

fn read_file(path: &Path) -> Result<String, KernelStatError> {
    fs::read_to_string(path).map_err(|source| KernelStatError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The `tw` count from the text of `/proc/net/sockstat`:
/// `TCP: inuse N orphan N tw N alloc N mem N`. `None` if there is no
/// `TCP:` line, it has no `tw`, or its value is not a number.
pub fn sockstat_tw(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    // The line is name/value pairs; only a name position can match "tw".
    words
        .chunks(2)
        .find(|pair| pair.first() == Some(&"tw"))
        .and_then(|pair| pair.get(1))
        .and_then(|v| v.parse().ok())
}

/// A value from the text of `/proc/net/netstat` (or `/proc/net/snmp`), where
/// each section is a header line of names followed by a line of values,
/// both starting with `Section:`. `None` if the section or field is absent,
/// the value line is missing or has a different number of fields, or the
/// value is not an unsigned number.
pub fn netstat_value(text: &str, section: &str, field: &str) -> Option<u64> {
    let prefix = format!("{section}:");
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(names) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let values = lines.next()?.strip_prefix(prefix.as_str())?;
        let names: Vec<&str> = names.split_whitespace().collect();
        let values: Vec<&str> = values.split_whitespace().collect();
        if names.len() != values.len() {
            return None;
        }
        if let Some(i) = names.iter().position(|n| *n == field) {
            return values.get(i).and_then(|v| v.parse().ok());
        }
    }
    None
}

/// The timewait figures the kernel counts itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelFigures {
    /// Timewait sockets that exist now (`/proc/net/sockstat` `tw`).
    pub sockstat_tw: Option<u64>,
    /// Timewait sockets not created since boot because `tcp_max_tw_buckets`
    /// was reached (`TcpExt: TCPTimeWaitOverflow`).
    pub tw_overflow: Option<u64>,
}

impl KernelFigures {
    /// Reads both files for the calling thread's network namespace. A
    /// figure is `None` when its file cannot be read or does not hold it:
    /// these figures only add context, so their absence is not an error.
    pub fn read() -> KernelFigures {
        let read = |file: &str| fs::read_to_string(proc_net(file)).unwrap_or_default();
        KernelFigures::parse(&read("sockstat"), &read("netstat"))
    }

    /// The figures from the texts of `/proc/net/sockstat` and
    /// `/proc/net/netstat`.
    pub fn parse(sockstat: &str, netstat: &str) -> KernelFigures {
        KernelFigures {
            sockstat_tw: sockstat_tw(sockstat),
            tw_overflow: netstat_value(netstat, "TcpExt", "TCPTimeWaitOverflow"),
        }
    }
}

/// The sysctls that govern TIME_WAIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sysctls {
    /// `net.ipv4.tcp_max_tw_buckets`: at most this many timewait sockets.
    pub max_tw_buckets: u64,
    /// `net.ipv4.ip_local_port_range`: the ephemeral ports, inclusive.
    pub port_range: (u16, u16),
    /// `net.ipv4.tcp_tw_reuse`: 0 off, 1 on, 2 loopback only.
    pub tw_reuse: u8,
    /// `net.ipv4.tcp_fin_timeout`: how long an orphaned FIN_WAIT2 lasts.
    pub fin_timeout_s: u32,
    /// `net.ipv4.tcp_timestamps`: 0 off, 1 on, 2 on without random offsets.
    pub timestamps: u8,
}

impl Sysctls {
    /// Reads the sysctls of the calling thread's network namespace.
    pub fn read() -> Result<Sysctls, KernelStatError> {
        Sysctls::read_from(Path::new(SYSCTL_IPV4_DIR))
    }

    /// Reads the sysctls from `dir` (normally `/proc/sys/net/ipv4`). A
    /// missing file is an error naming it.
    pub fn read_from(dir: &Path) -> Result<Sysctls, KernelStatError> {
        let read = |name: &str| {
            let path = dir.join(name);
            read_file(&path).map(|text| (path, text))
        };
        let malformed = |path: PathBuf, text: &str| KernelStatError::Malformed {
            path,
            text: text.trim_end().to_string(),
        };

        let (path, text) = read("tcp_max_tw_buckets")?;
        let max_tw_buckets = parse_number(&text).ok_or_else(|| malformed(path, &text))?;
        let (path, text) = read("ip_local_port_range")?;
        let port_range = parse_port_range(&text).ok_or_else(|| malformed(path, &text))?;
        let (path, text) = read("tcp_tw_reuse")?;
        let tw_reuse = parse_number(&text).ok_or_else(|| malformed(path, &text))?;
        let (path, text) = read("tcp_fin_timeout")?;
        let fin_timeout_s = parse_number(&text).ok_or_else(|| malformed(path, &text))?;
        let (path, text) = read("tcp_timestamps")?;
        let timestamps = parse_number(&text).ok_or_else(|| malformed(path, &text))?;

        Ok(Sysctls {
            max_tw_buckets,
            port_range,
            tw_reuse,
            fin_timeout_s,
            timestamps,
        })
    }

    /// How many ephemeral ports there are: `hi - lo + 1`.
    pub fn port_range_size(&self) -> u32 {
        let (lo, hi) = self.port_range;
        u32::from(hi).saturating_sub(u32::from(lo)) + 1
    }
}

/// A sysctl holding one number (surrounding whitespace allowed).
pub fn parse_number<T: std::str::FromStr>(text: &str) -> Option<T> {
    text.trim().parse().ok()
}

/// `ip_local_port_range`'s text: two numbers, low then high (the kernel
/// separates them with a tab). `None` unless exactly two ports with
/// `lo <= hi`.
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut words = text.split_whitespace();
    let lo: u16 = words.next()?.parse().ok()?;
    let hi: u16 = words.next()?.parse().ok()?;
    if words.next().is_some() || lo > hi {
        return None;
    }
    Some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKSTAT: &str = "sockets: used 18\n\
        TCP: inuse 1 orphan 0 tw 30000 alloc 1 mem 25\n\
        UDP: inuse 0 mem 0\n\
        UDPLITE: inuse 0\n\
        RAW: inuse 0\n\
        FRAG: inuse 0 memory 0\n";

    const NETSTAT: &str =
        "TcpExt: SyncookiesSent SyncookiesRecv TW TCPTimeWaitOverflow TCPAbortOnData\n\
        TcpExt: 0 0 12345 7 3\n\
        IpExt: InNoRoutes InTruncatedPkts\n\
        IpExt: 0 0\n\
        MPTcpExt: MPCapableSYNRX\n\
        MPTcpExt: 0\n";

    #[test]
    fn sockstat_tw_finds_the_tcp_line() {
        assert_eq!(sockstat_tw(SOCKSTAT), Some(30000));
        assert_eq!(
            sockstat_tw("TCP: inuse 5 orphan 2 tw 0 alloc 9 mem 1\n"),
            Some(0)
        );
    }

    #[test]
    fn sockstat_tw_rejects_malformed_text() {
        assert_eq!(sockstat_tw(""), None);
        assert_eq!(sockstat_tw("sockets: used 3\nUDP: inuse 0 mem 0\n"), None);
        assert_eq!(sockstat_tw("TCP: inuse 1 orphan 0 alloc 1 mem 25\n"), None);
        assert_eq!(sockstat_tw("TCP: inuse 1 orphan 0 tw\n"), None);
        assert_eq!(sockstat_tw("TCP: inuse 1 orphan 0 tw -4\n"), None);
        assert_eq!(sockstat_tw("TCP: inuse 1 orphan 0 tw many\n"), None);
        // "tw" as a value, not a name, is not the tw count.
        assert_eq!(sockstat_tw("TCP: inuse tw orphan 3\n"), None);
        // UDP's line never answers for TCP.
        assert_eq!(sockstat_tw("UDP: tw 4\n"), None);
    }

    #[test]
    fn netstat_value_pairs_names_with_values() {
        assert_eq!(
            netstat_value(NETSTAT, "TcpExt", "TCPTimeWaitOverflow"),
            Some(7)
        );
        assert_eq!(netstat_value(NETSTAT, "TcpExt", "TW"), Some(12345));
        assert_eq!(netstat_value(NETSTAT, "TcpExt", "SyncookiesSent"), Some(0));
        assert_eq!(netstat_value(NETSTAT, "IpExt", "InTruncatedPkts"), Some(0));
        assert_eq!(
            netstat_value(NETSTAT, "MPTcpExt", "MPCapableSYNRX"),
            Some(0)
        );
        // "TcpExt:" must not match inside "MPTcpExt:".
        assert_eq!(netstat_value(NETSTAT, "TcpExt", "MPCapableSYNRX"), None);
    }

    #[test]
    fn netstat_value_rejects_malformed_text() {
        assert_eq!(netstat_value("", "TcpExt", "TW"), None);
        assert_eq!(netstat_value(NETSTAT, "TcpExt", "NoSuchField"), None);
        assert_eq!(netstat_value(NETSTAT, "NoSection", "TW"), None);
        // Header without a values line.
        assert_eq!(
            netstat_value("TcpExt: TW TCPTimeWaitOverflow\n", "TcpExt", "TW"),
            None
        );
        // Values line of another section.
        assert_eq!(
            netstat_value("TcpExt: TW\nIpExt: 3\n", "TcpExt", "TW"),
            None
        );
        // Counts differ.
        assert_eq!(
            netstat_value(
                "TcpExt: TW TCPTimeWaitOverflow\nTcpExt: 1\n",
                "TcpExt",
                "TW"
            ),
            None
        );
        // Not a number.
        assert_eq!(
            netstat_value(
                "TcpExt: TW TCPTimeWaitOverflow\nTcpExt: 1 x\n",
                "TcpExt",
                "TCPTimeWaitOverflow"
            ),
            None
        );
        assert_eq!(
            netstat_value("TcpExt: TW\nTcpExt: -1\n", "TcpExt", "TW"),
            None
        );
    }

    #[test]
    fn kernel_figures_parse_both_files() {
        let f = KernelFigures::parse(SOCKSTAT, NETSTAT);
        assert_eq!(
            f,
            KernelFigures {
                sockstat_tw: Some(30000),
                tw_overflow: Some(7)
            }
        );
        assert_eq!(
            KernelFigures::parse("", "garbage"),
            KernelFigures::default()
        );
    }

    #[test]
    fn port_range_parses_and_sizes() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range(" 1024 65535 "), Some((1024, 65535)));
        assert_eq!(parse_port_range("5000 5000"), Some((5000, 5000)));
        for bad in [
            "",
            "32768",
            "60999 32768",
            "1 2 3",
            "a b",
            "1 70000",
            "-1 5",
        ] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
        let mut s = Sysctls {
            max_tw_buckets: 0,
            port_range: (32768, 60999),
            tw_reuse: 2,
            fin_timeout_s: 60,
            timestamps: 1,
        };
        assert_eq!(s.port_range_size(), 28232);
        s.port_range = (0, 65535);
        assert_eq!(s.port_range_size(), 65536);
    }

    #[test]
    fn numbers_parse_with_whitespace_only() {
        assert_eq!(parse_number::<u64>("131072\n"), Some(131072));
        assert_eq!(parse_number::<u8>("2\n"), Some(2));
        assert_eq!(parse_number::<u8>(""), None);
        assert_eq!(parse_number::<u8>("300"), None);
        assert_eq!(parse_number::<u32>("1 2"), None);
        assert_eq!(parse_number::<u32>("-3"), None);
    }

    /// A scratch directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("tcpwatch-kernelstat-{}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn write_sysctls(dir: &Path, skip: &str) {
        let files = [
            ("tcp_max_tw_buckets", "131072\n"),
            ("ip_local_port_range", "32768\t60999\n"),
            ("tcp_tw_reuse", "2\n"),
            ("tcp_fin_timeout", "60\n"),
            ("tcp_timestamps", "1\n"),
        ];
        for (name, text) in files {
            if name != skip {
                fs::write(dir.join(name), text).unwrap();
            }
        }
    }

    #[test]
    fn sysctls_read_from_a_directory() {
        let dir = TempDir::new("ok");
        write_sysctls(&dir.0, "");
        let s = Sysctls::read_from(&dir.0).unwrap();
        assert_eq!(
            s,
            Sysctls {
                max_tw_buckets: 131072,
                port_range: (32768, 60999),
                tw_reuse: 2,
                fin_timeout_s: 60,
                timestamps: 1,
            }
        );
    }

    #[test]
    fn sysctls_missing_file_is_an_error_naming_it() {
        let dir = TempDir::new("missing");
        write_sysctls(&dir.0, "tcp_fin_timeout");
        let err = Sysctls::read_from(&dir.0).unwrap_err();
        assert!(matches!(err, KernelStatError::Read { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("tcp_fin_timeout"), "{text}");
    }

    #[test]
    fn sysctls_malformed_file_is_an_error_naming_it() {
        let dir = TempDir::new("malformed");
        write_sysctls(&dir.0, "");
        fs::write(dir.0.join("ip_local_port_range"), "60999 32768\n").unwrap();
        let err = Sysctls::read_from(&dir.0).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, KernelStatError::Malformed { .. }), "{err:?}");
        assert!(text.contains("ip_local_port_range"), "{text}");
        assert!(text.contains("60999 32768"), "{text}");
    }
}
