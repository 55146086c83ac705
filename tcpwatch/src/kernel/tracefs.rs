//! tracefs: making sure it is mounted (a fresh machine does not mount it) and
//! reading where a tracepoint's fields sit from its `format` file.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tcpwatch_common::{StateTpLayout, NO_FIELD, SOCKADDR_SIZE};

pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it failed; run: mount -t tracefs nodev /sys/kernel/tracing")]
    Mount(#[source] io::Error),
    #[error("cannot read tracefs at {} (tcpwatch needs root, or CAP_DAC_READ_SEARCH besides CAP_BPF and CAP_PERFMON)", path.display())]
    Denied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read tracepoint format {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tracepoint {tracepoint} has no field `{field}` on this kernel")]
    MissingField { tracepoint: String, field: String },
    #[error("tracepoint {tracepoint}: field `{field}` has offset {offset}, beyond what tcpwatch can address")]
    FieldTooFar {
        tracepoint: String,
        field: String,
        offset: u64,
    },
}

fn has_events(root: &Path) -> bool {
    fs::read_dir(root.join("events"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Returns the tracefs root, mounting tracefs at /sys/kernel/tracing first if
/// neither it nor the debugfs path has it. Returns whether it mounted.
pub fn ensure_mounted() -> Result<(PathBuf, bool), TracefsError> {
    let mut denied = None;
    for root in [TRACEFS, DEBUGFS_TRACING] {
        let events = Path::new(root).join("events");
        match fs::read_dir(&events).map(|mut d| d.next().is_some()) {
            Ok(true) => return Ok((PathBuf::from(root), false)),
            // Mounted, but this process may not look: mounting again
            // would fail and say the wrong thing.
            Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
                denied.get_or_insert(TracefsError::Denied {
                    path: events,
                    source,
                });
            }
            _ => {}
        }
    }
    if let Some(e) = denied {
        return Err(e);
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: all pointers are valid NUL-terminated strings; data is NULL.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount(io::Error::last_os_error()));
    }
    if !has_events(Path::new(TRACEFS)) {
        return Err(TracefsError::Mount(io::Error::other(
            "mounted, but it lists no events",
        )));
    }
    Ok((PathBuf::from(TRACEFS), true))
}

/// One tracepoint's fields: name → (offset, size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    pub tracepoint: String,
    pub fields: HashMap<String, (u64, u64)>,
}

impl Format {
    pub fn read(root: &Path, category: &str, name: &str) -> Result<Format, TracefsError> {
        let path = root.join("events").join(category).join(name).join("format");
        let text = fs::read_to_string(&path).map_err(|source| TracefsError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(Format::parse(&format!("{category}:{name}"), &text))
    }

    /// Parses lines like
    /// `field:const void * skaddr; offset:8; size:8; signed:0;`.
    /// Lines that do not have that shape are not fields and are skipped.
    pub fn parse(tracepoint: &str, text: &str) -> Format {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in line.split(';') {
                let part = part.trim();
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d);
                } else if let Some(o) = part.strip_prefix("offset:") {
                    offset = o.parse::<u64>().ok();
                } else if let Some(s) = part.strip_prefix("size:") {
                    size = s.parse::<u64>().ok();
                }
            }
            let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
                continue;
            };
            // The name is the last word of the declaration, without any
            // array suffix: `__u8 saddr_v6[16]` → `saddr_v6`.
            let last = decl.split_whitespace().last().unwrap_or("");
            let name = last.split('[').next().unwrap_or("").trim_start_matches('*');
            if !name.is_empty() {
                fields.insert(name.to_string(), (offset, size));
            }
        }
        Format {
            tracepoint: tracepoint.to_string(),
            fields,
        }
    }

    pub fn offset(&self, field: &str) -> Result<u16, TracefsError> {
        let &(offset, _) = self
            .fields
            .get(field)
            .ok_or_else(|| TracefsError::MissingField {
                tracepoint: self.tracepoint.clone(),
                field: field.to_string(),
            })?;
        u16::try_from(offset).map_err(|_| TracefsError::FieldTooFar {
            tracepoint: self.tracepoint.clone(),
            field: field.to_string(),
            offset,
        })
    }

    /// The offset of a field of `size` bytes this kernel's record may
    /// lack, or [`NO_FIELD`]; an error only when it is there but out of
    /// reach.
    fn optional(&self, field: &str, size: u64) -> Result<u16, TracefsError> {
        match self.fields.get(field) {
            Some(&(_, s)) if s == size => self.offset(field),
            _ => Ok(NO_FIELD),
        }
    }

    /// Where the `tcp:tcp_send_reset` record's fields sit. Only `skaddr`
    /// is required: `reason` came with 6.10, and the endpoints are read
    /// only as the `sockaddr_in6`-sized fields that came with it (older
    /// records' 4-byte `saddr` is not that).
    pub fn reset_layout(&self) -> Result<ResetLayout, TracefsError> {
        Ok(ResetLayout {
            skaddr: self.offset("skaddr")?,
            state: self.optional("state", 4)?,
            reason: self.optional("reason", 4)?,
            saddr: self.optional("saddr", SOCKADDR_SIZE as u64)?,
            daddr: self.optional("daddr", SOCKADDR_SIZE as u64)?,
        })
    }

    pub fn state_layout(&self) -> Result<StateTpLayout, TracefsError> {
        let mut layout = StateTpLayout {
            skaddr: self.offset("skaddr")?,
            oldstate: self.offset("oldstate")?,
            newstate: self.offset("newstate")?,
            sport: self.offset("sport")?,
            dport: self.offset("dport")?,
            family: self.offset("family")?,
            protocol: self.offset("protocol")?,
            saddr: self.offset("saddr")?,
            daddr: self.offset("daddr")?,
            saddr_v6: self.offset("saddr_v6")?,
            daddr_v6: self.offset("daddr_v6")?,
            standard: 0,
        };
        // Field sizes matter too: the one-read path copies whole fields.
        let sizes_standard = [
            ("skaddr", 8),
            ("oldstate", 4),
            ("newstate", 4),
            ("sport", 2),
            ("dport", 2),
            ("family", 2),
            ("protocol", 2),
            ("saddr", 4),
            ("daddr", 4),
            ("saddr_v6", 16),
            ("daddr_v6", 16),
        ]
        .iter()
        .all(|(f, size)| self.fields.get(*f).is_some_and(|(_, s)| s == size));
        let mut as_standard = layout;
        as_standard.standard = 1;
        if sizes_standard && as_standard == StateTpLayout::STANDARD {
            layout.standard = 1;
        }
        Ok(layout)
    }
}

/// Offsets in the `tcp:tcp_send_reset` record; [`NO_FIELD`] for a field
/// this kernel's record does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetLayout {
    pub skaddr: u16,
    pub state: u16,
    pub reason: u16,
    pub saddr: u16,
    pub daddr: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = "name: inet_sock_set_state
ID: 1487
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s\", REC->family
";

    #[test]
    fn parses_inet_sock_set_state_layout() {
        let f = Format::parse("sock:inet_sock_set_state", SET_STATE);
        let l = f.state_layout().unwrap();
        assert_eq!(l.skaddr, 8);
        assert_eq!(l.oldstate, 16);
        assert_eq!(l.newstate, 20);
        assert_eq!(l.protocol, 30);
        assert_eq!(l.saddr, 32);
        assert_eq!(l.daddr_v6, 56);
        assert_eq!(f.fields["saddr_v6"], (40, 16));
        assert_eq!(f.fields["common_pid"], (4, 4));
        assert_eq!(l.standard, 1, "this layout is the standard one");
        // Any other layout is read field by field.
        let moved = SET_STATE.replace("offset:56;", "offset:60;");
        let l = Format::parse("sock:inet_sock_set_state", &moved)
            .state_layout()
            .unwrap();
        assert_eq!((l.daddr_v6, l.standard), (60, 0));
    }

    /// Linux 6.18's record, and the one before 6.10 (no reason, and the
    /// endpoints as 4- and 16-byte fields).
    const SEND_RESET: &str = "name: tcp_send_reset
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;
\tfield:__u8 daddr[28];\toffset:60;\tsize:28;\tsigned:0;
";
    const SEND_RESET_5_15: &str = "name: tcp_send_reset
format:
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;
";

    #[test]
    fn send_reset_layout_with_and_without_the_reason() {
        let l = Format::parse("tcp:tcp_send_reset", SEND_RESET)
            .reset_layout()
            .unwrap();
        assert_eq!(
            l,
            ResetLayout {
                skaddr: 16,
                state: 24,
                reason: 28,
                saddr: 32,
                daddr: 60
            }
        );
        let old = Format::parse("tcp:tcp_send_reset", SEND_RESET_5_15)
            .reset_layout()
            .unwrap();
        assert_eq!((old.skaddr, old.state), (16, 24));
        assert_eq!(
            (old.reason, old.saddr, old.daddr),
            (NO_FIELD, NO_FIELD, NO_FIELD),
            "no reason, and 4-byte saddr is no sockaddr"
        );
        let no_sk = SEND_RESET.replace("skaddr;", "sk;");
        assert!(Format::parse("tcp:tcp_send_reset", &no_sk)
            .reset_layout()
            .is_err());
    }

    #[test]
    fn missing_field_is_named() {
        let f = Format::parse("tcp:x", "\tfield:int a;\toffset:8;\tsize:4;\tsigned:1;\n");
        let err = f.offset("skaddr").unwrap_err().to_string();
        assert!(err.contains("tcp:x") && err.contains("skaddr"), "{err}");
    }

    #[test]
    fn garbage_is_not_a_field() {
        let f = Format::parse(
            "x:y",
            "field:;offset:zz;\n\u{0}\u{ff}\nfield:int q;offset:1;",
        );
        assert!(f.fields.is_empty());
    }
}
