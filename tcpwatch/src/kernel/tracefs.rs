//! tracefs: making sure it is mounted (a fresh machine does not mount it) and
//! reading where a tracepoint's fields sit from its `format` file.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tcpwatch_common::StateTpLayout;

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
