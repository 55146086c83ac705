//! Socket field offsets from the running kernel's BTF.
//!
//! aya cannot relocate field accesses (CO-RE) in a Rust eBPF program, so the
//! program is handed the byte offsets it needs as globals. This module reads
//! the kernel's raw BTF blob (`/sys/kernel/btf/vmlinux`), finds those fields
//! and fills a [`SockOffsets`]. An offset is never guessed: a field that BTF
//! does not describe, that is a bitfield, or whose size is not what the
//! program reads, stays [`OFFSET_UNKNOWN`] and is reported instead.
//!
//! [`OFFSET_UNKNOWN`]: tcpwatch_common::OFFSET_UNKNOWN
//!
//! The `btfparse` crate decodes the type section. The blob is untrusted, so
//! around it this module keeps what the crate does not do:
//! - only a regular file of at most [`MAX_FILE_LEN`] bytes is read (a FIFO
//!   would block the start forever, `/dev/zero` never ends);
//! - the header is checked (magic, version, sections inside the blob, a
//!   NUL-terminated string section) before the crate sees it, and the crate
//!   may read only inside the header and the two sections, and at most
//!   [`READ_BUDGET`] times the blob's length in all (it copies a name per
//!   type and member, so a blob of names shared by many members could
//!   otherwise make it allocate far more than the file holds);
//! - the walk to a member is depth-limited and checks every type id, so a
//!   cyclic or dangling type chain is an error, never a hang or a stack
//!   overflow (the crate's own `offset_of` and `size_of` follow chains
//!   without a bound).

use std::cell::Cell;
use std::ops::Range;
use std::path::{Path, PathBuf};

use btfparse::{Offset, Readable, TypeInformation, TypeVariant};
use tcpwatch_common::{EndpointOffsets, SockOffsets};

/// Where the running kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xEB9F;
const VERSION: u8 = 1;
/// Size of the fixed part of `struct btf_header`.
const HEADER_LEN: usize = 24;
/// The largest BTF file read: a kernel's is a few MB (5.5 MB here), so
/// anything far larger is not BTF, and reading it would only use memory.
const MAX_FILE_LEN: u64 = 256 << 20;
/// How many typedef/modifier/array hops or nested anonymous members we
/// follow before calling the blob corrupt (libbpf uses the same bound); it
/// also stops a self-referencing type from recursing forever.
const MAX_DEPTH: u32 = 32;
/// The crate may read at most this many times the blob's length (the
/// running kernel's BTF takes 1.1 times: each type and member once, each
/// name once per use).
const READ_BUDGET: u64 = 3;

/// Why BTF could not be read, or could not answer a field lookup.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read BTF from {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a regular file but {what}")]
    NotAFile { what: &'static str },
    #[error("the file is {len} bytes, more than the {MAX_FILE_LEN} bytes a BTF blob may be")]
    TooLarge { len: u64 },
    #[error("BTF blob is {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("not a BTF blob: magic is {magic:#06x}, expected {MAGIC:#06x}")]
    BadMagic { magic: u16 },
    #[error("unsupported BTF version {version} (only version {VERSION} is understood)")]
    UnsupportedVersion { version: u8 },
    #[error("BTF header length {hdr_len} is invalid for a {len}-byte blob")]
    BadHeaderLen { hdr_len: u32, len: usize },
    #[error("BTF {section} section (offset {off}, length {len}) runs past the end of the {blob}-byte blob: the file is truncated or corrupt")]
    SectionOutOfBounds {
        section: &'static str,
        off: u32,
        len: u32,
        blob: usize,
    },
    #[error("BTF string section is empty or does not start and end with a NUL byte")]
    BadStringSection,
    #[error("BTF names take more than {READ_BUDGET} times the blob's {blob} bytes to read: the blob is corrupt or crafted")]
    ReadBudget { blob: usize },
    #[error("BTF type section is corrupt: {message}")]
    Parse {
        kind: btfparse::ErrorKind,
        message: String,
    },
    #[error("BTF refers to type id {type_id}, which does not exist")]
    BadTypeId { type_id: u32 },
    #[error("BTF type chain at type {type_id} is deeper than {MAX_DEPTH} (corrupt or cyclic BTF)")]
    TooDeep { type_id: u32 },
    #[error("BTF type {type_id} ({kind}) has no size")]
    NoSize { type_id: u32, kind: &'static str },
    #[error("pointer size unknown: BTF has no `long int` or `long unsigned int`")]
    PointerSizeUnknown,
    #[error("size or offset of `{path}` overflows")]
    Overflow { path: String },
    #[error("no struct named `{name}` in BTF")]
    NoSuchStruct { name: String },
    #[error("`{owner}` has no member `{member}`")]
    NoSuchMember { owner: String, member: String },
    #[error("`{path}` is a {kind}, not a struct or union, so it has no members")]
    NotComposite { path: String, kind: &'static str },
    #[error(
        "`{path}` is a bitfield or not byte-aligned (bit offset {bit_offset}): no byte offset"
    )]
    Bitfield { path: String, bit_offset: u64 },
}

/// Where a member sits: byte offset from the start of the outer struct, and
/// the byte size of its type (typedefs and modifiers resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub size: u32,
}

/// A member found by name, possibly inside anonymous members.
struct Found {
    bits: u64,
    type_id: u32,
    bitfield: bool,
}

/// The blob as the crate may read it: inside the header or one of the two
/// sections, within the read budget.
struct Sections<'a> {
    bytes: &'a [u8],
    allowed: [Range<u64>; 3],
    budget: Cell<u64>,
    over_budget: Cell<bool>,
}

impl Readable for Sections<'_> {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        use btfparse::{Error, ErrorKind};
        let len = buffer.len() as u64;
        let Some(left) = self.budget.get().checked_sub(len) else {
            self.over_budget.set(true);
            return Err(Error::new(ErrorKind::InvalidOffset, "read budget spent"));
        };
        self.budget.set(left);
        let end = offset.saturating_add(len);
        let inside = self
            .allowed
            .iter()
            .any(|r| r.start <= offset && end <= r.end);
        let bytes = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| self.bytes.get(s..e))
            .filter(|_| inside)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOffset,
                    &format!(
                        "{len} bytes at byte {offset} lie outside the BTF header and sections"
                    ),
                )
            })?;
        buffer.copy_from_slice(bytes);
        Ok(())
    }
}

/// Parsed BTF: its types by id, and the pointer size.
pub struct Btf {
    info: TypeInformation,
    /// Pointer size, from the size of `long` (BTF's PTR carries no size).
    ptr_size: Option<u32>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.type_count())
            .field("ptr_size", &self.ptr_size)
            .finish()
    }
}

/// The kind of a type as BTF names it.
fn kind_name(t: &TypeVariant) -> &'static str {
    match t {
        TypeVariant::Void => "void",
        TypeVariant::Int(_) => "INT",
        TypeVariant::Ptr(_) => "PTR",
        TypeVariant::Array(_) => "ARRAY",
        TypeVariant::Struct(_) => "STRUCT",
        TypeVariant::Union(_) => "UNION",
        TypeVariant::Enum(_) => "ENUM",
        TypeVariant::Fwd(_) => "FWD",
        TypeVariant::Typedef(_) => "TYPEDEF",
        TypeVariant::Volatile(_) => "VOLATILE",
        TypeVariant::Const(_) => "CONST",
        TypeVariant::Restrict(_) => "RESTRICT",
        TypeVariant::Func(_) => "FUNC",
        TypeVariant::FuncProto(_) => "FUNC_PROTO",
        TypeVariant::Var(_) => "VAR",
        TypeVariant::DataSec(_) => "DATASEC",
        TypeVariant::Float(_) => "FLOAT",
        TypeVariant::DeclTag(_) => "DECL_TAG",
        TypeVariant::TypeTag(_) => "TYPE_TAG",
        TypeVariant::Enum64(_) => "ENUM64",
    }
}

/// A u32 of the header in the blob's byte order.
fn header_word(bytes: &[u8], pos: usize, big_endian: bool) -> u32 {
    let b = [bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]];
    if big_endian {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    }
}

impl Btf {
    /// Reads and parses a raw BTF file such as [`VMLINUX_BTF`].
    /// Only a regular file of at most [`MAX_FILE_LEN`] bytes is read: a
    /// FIFO would block the start forever, and `/dev/zero` never ends.
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        use std::io::Read;
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let io = |source| BtfError::Io {
            path: path.to_path_buf(),
            source,
        };
        // Non-blocking, so that opening a FIFO returns at once.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let ft = meta.file_type();
        if !ft.is_file() {
            let what = if ft.is_dir() {
                "a directory"
            } else if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_char_device() || ft.is_block_device() {
                "a device"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "not a file"
            };
            return Err(BtfError::NotAFile { what });
        }
        if meta.len() > MAX_FILE_LEN {
            return Err(BtfError::TooLarge { len: meta.len() });
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // A file growing while read is still cut at the limit.
        file.take(MAX_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_FILE_LEN {
            return Err(BtfError::TooLarge {
                len: bytes.len() as u64,
            });
        }
        Btf::parse(&bytes)
    }

    /// Parses a raw BTF blob (standalone, not split BTF).
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        if bytes.len() < HEADER_LEN {
            return Err(BtfError::TooShort { len: bytes.len() });
        }
        // The magic tells the blob's byte order.
        let big_endian = match u16::from_le_bytes([bytes[0], bytes[1]]) {
            MAGIC => false,
            m if m.swap_bytes() == MAGIC => true,
            magic => return Err(BtfError::BadMagic { magic }),
        };
        if bytes[2] != VERSION {
            return Err(BtfError::UnsupportedVersion { version: bytes[2] });
        }
        let word = |pos| header_word(bytes, pos, big_endian);
        let hdr_len = word(4);
        let (type_off, type_len) = (word(8), word(12));
        let (str_off, str_len) = (word(16), word(20));
        let base = usize::try_from(hdr_len)
            .ok()
            .filter(|&h| h >= HEADER_LEN && h <= bytes.len())
            .ok_or(BtfError::BadHeaderLen {
                hdr_len,
                len: bytes.len(),
            })?;
        let section = |name: &'static str, off: u32, len: u32| {
            let start = base.checked_add(off as usize);
            let end = start.and_then(|s| s.checked_add(len as usize));
            match (start, end) {
                (Some(s), Some(e)) if e <= bytes.len() => Ok(s..e),
                _ => Err(BtfError::SectionOutOfBounds {
                    section: name,
                    off,
                    len,
                    blob: bytes.len(),
                }),
            }
        };
        let types = section("type", type_off, type_len)?;
        let strings = section("string", str_off, str_len)?;
        // Offset 0 must be the empty name, and a final NUL ends every name.
        let string_bytes = &bytes[strings.clone()];
        if string_bytes.first() != Some(&0) || string_bytes.last() != Some(&0) {
            return Err(BtfError::BadStringSection);
        }
        let range = |r: Range<usize>| r.start as u64..r.end as u64;
        let readable = Sections {
            bytes,
            allowed: [0..base as u64, range(types), range(strings)],
            budget: Cell::new((bytes.len() as u64).saturating_mul(READ_BUDGET)),
            over_budget: Cell::new(false),
        };
        let info = TypeInformation::new(&readable).map_err(|e| {
            if readable.over_budget.get() {
                BtfError::ReadBudget { blob: bytes.len() }
            } else {
                BtfError::Parse {
                    kind: e.kind(),
                    message: e.message().to_string(),
                }
            }
        })?;
        // As libbpf does: a pointer is as wide as `long`.
        let ptr_size = info.get().values().find_map(|t| match t {
            TypeVariant::Int(i)
                if matches!(i.name().as_deref(), Some("long int" | "long unsigned int"))
                    && matches!(*i.size(), 4 | 8) =>
            {
                Some(*i.size() as u32)
            }
            _ => None,
        });
        Ok(Btf { info, ptr_size })
    }

    /// Number of types (ids 1..=len).
    pub fn type_count(&self) -> usize {
        self.info.get().len()
    }

    /// Byte offset and size of a (possibly nested) member of the first
    /// STRUCT named `struct_name`, e.g. `("inet_connection_sock",
    /// &["icsk_ack", "pending"])`. Members of anonymous struct/union members
    /// are found by name as C allows; typedefs and qualifiers are looked
    /// through. An empty path gives offset 0 and the struct's size.
    pub fn member(&self, struct_name: &str, path: &[&str]) -> Result<Member, BtfError> {
        let mut cur = self
            .find_struct(struct_name)
            .ok_or_else(|| BtfError::NoSuchStruct {
                name: struct_name.to_string(),
            })?;
        let mut walked = struct_name.to_string();
        let mut bits: u64 = 0;
        for step in path {
            let comp = self.skip_modifiers(cur)?;
            let ty = self.ty(comp)?;
            if !matches!(ty, TypeVariant::Struct(_) | TypeVariant::Union(_)) {
                return Err(BtfError::NotComposite {
                    path: walked,
                    kind: kind_name(ty),
                });
            }
            let found = self
                .find_member(comp, step, 0)?
                .ok_or_else(|| BtfError::NoSuchMember {
                    owner: walked.clone(),
                    member: step.to_string(),
                })?;
            walked.push('.');
            walked.push_str(step);
            if found.bitfield || found.bits % 8 != 0 {
                return Err(BtfError::Bitfield {
                    path: walked,
                    bit_offset: found.bits,
                });
            }
            bits = bits
                .checked_add(found.bits)
                .ok_or_else(|| BtfError::Overflow {
                    path: walked.clone(),
                })?;
            cur = found.type_id;
        }

        let size = self.type_size(cur, 0)?;
        // Older BTF encodes bitfields as INTs narrower than their storage.
        if let TypeVariant::Int(int) = self.ty(self.skip_modifiers(cur)?)? {
            let (int_bit_off, nr_bits) = (*int.offset() as u64, *int.bits() as u64);
            if int_bit_off != 0 || nr_bits != u64::from(size) * 8 {
                return Err(BtfError::Bitfield {
                    path: walked,
                    bit_offset: bits + int_bit_off,
                });
            }
        }
        let offset = u32::try_from(bits / 8).map_err(|_| BtfError::Overflow {
            path: walked.clone(),
        })?;
        Ok(Member { offset, size })
    }

    /// The first STRUCT of this name (a FWD or UNION of the same name is
    /// not it).
    fn find_struct(&self, name: &str) -> Option<u32> {
        self.info.get().iter().find_map(|(id, t)| match t {
            TypeVariant::Struct(s) if s.name().as_deref() == Some(name) => Some(*id),
            _ => None,
        })
    }

    /// The type of an id; void (0) has no entry of its own.
    fn ty(&self, type_id: u32) -> Result<&TypeVariant, BtfError> {
        static VOID: TypeVariant = TypeVariant::Void;
        if type_id == 0 {
            return Ok(&VOID);
        }
        self.info
            .get()
            .get(&type_id)
            .ok_or(BtfError::BadTypeId { type_id })
    }

    /// Follows typedef/const/volatile/restrict/type_tag to the real type.
    fn skip_modifiers(&self, mut type_id: u32) -> Result<u32, BtfError> {
        let start = type_id;
        for _ in 0..MAX_DEPTH {
            type_id = match self.ty(type_id)? {
                TypeVariant::Typedef(t) => *t.tid(),
                TypeVariant::Const(t) => *t.tid(),
                TypeVariant::Volatile(t) => *t.tid(),
                TypeVariant::Restrict(t) => *t.tid(),
                TypeVariant::TypeTag(t) => *t.tid(),
                _ => return Ok(type_id),
            };
        }
        Err(BtfError::TooDeep { type_id: start })
    }

    fn type_size(&self, type_id: u32, depth: u32) -> Result<u32, BtfError> {
        if depth >= MAX_DEPTH {
            return Err(BtfError::TooDeep { type_id });
        }
        let id = self.skip_modifiers(type_id)?;
        let overflow = || BtfError::Overflow {
            path: format!("type {id}"),
        };
        let size = match self.ty(id)? {
            TypeVariant::Int(t) => *t.size(),
            TypeVariant::Struct(t) => *t.size(),
            TypeVariant::Union(t) => *t.size(),
            TypeVariant::Enum(t) => *t.size(),
            TypeVariant::Enum64(t) => *t.size(),
            TypeVariant::Float(t) => *t.size(),
            TypeVariant::Ptr(_) => return self.ptr_size.ok_or(BtfError::PointerSizeUnknown),
            TypeVariant::Array(a) => {
                return self
                    .type_size(*a.element_tid(), depth + 1)?
                    .checked_mul(*a.element_count())
                    .ok_or_else(overflow)
            }
            TypeVariant::Void => {
                return Err(BtfError::NoSize {
                    type_id,
                    kind: "void",
                })
            }
            other => {
                return Err(BtfError::NoSize {
                    type_id: id,
                    kind: kind_name(other),
                })
            }
        };
        u32::try_from(size).map_err(|_| overflow())
    }

    /// Finds `name` among the members of struct/union `comp`, descending
    /// into anonymous struct/union members. The bit offset is relative to
    /// the start of `comp`.
    fn find_member(&self, comp: u32, name: &str, depth: u32) -> Result<Option<Found>, BtfError> {
        if depth >= MAX_DEPTH {
            return Err(BtfError::TooDeep { type_id: comp });
        }
        if name.is_empty() {
            return Ok(None);
        }
        let members = match self.ty(comp)? {
            TypeVariant::Struct(s) => s.member_list(),
            TypeVariant::Union(u) => u.member_list(),
            _ => return Ok(None),
        };
        for m in members {
            let (bits, bitfield) = match m.offset() {
                Offset::ByteOffset(bytes) => (u64::from(bytes) * 8, false),
                Offset::BitOffsetAndSize(bits, _) => (u64::from(bits), true),
            };
            let member_name = m.name();
            if member_name.as_deref() == Some(name) {
                return Ok(Some(Found {
                    bits,
                    type_id: m.tid(),
                    bitfield,
                }));
            }
            if member_name.as_deref().unwrap_or_default().is_empty() {
                let inner = self.skip_modifiers(m.tid())?;
                if !matches!(
                    self.ty(inner)?,
                    TypeVariant::Struct(_) | TypeVariant::Union(_)
                ) {
                    continue;
                }
                if let Some(found) = self.find_member(inner, name, depth + 1)? {
                    return Ok(Some(Found {
                        bits: found.bits + bits,
                        type_id: found.type_id,
                        bitfield: found.bitfield || bitfield,
                    }));
                }
            }
        }
        Ok(None)
    }
}

/// How a field's struct must sit at the start of `struct sock`, so that an
/// offset within it is also an offset from the socket pointer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Base {
    /// `struct sock` itself, or an unrelated struct (`struct net`).
    Direct,
    /// `inet_connection_sock`: needs icsk_inet and inet_sock.sk at 0.
    Icsk,
    /// `tcp_sock`: additionally needs inet_conn at 0.
    Tcp,
}

struct Field {
    strukt: &'static str,
    path: &'static [&'static str],
    size: u32,
    base: Base,
    slot: fn(&mut SockOffsets) -> &mut u32,
    /// What the views show differently without the field, said with the
    /// degraded line so that nobody reads a `-` as a fault of the network.
    without: &'static str,
}

const FIELDS: &[Field] = &[
    Field {
        strukt: "sock",
        path: &["sk_shutdown"],
        size: 1,
        base: Base::Direct,
        slot: |o| &mut o.sk_shutdown,
        without: "no view uses it; recordings keep it unset",
    },
    Field {
        strukt: "sock",
        path: &["sk_err"],
        size: 4,
        base: Base::Direct,
        slot: |o| &mut o.sk_err,
        without: "conns: error/errno are null, so a close by error shows unknown and a timed-out connect failed",
    },
    Field {
        strukt: "tcp_sock",
        path: &["bytes_acked"],
        size: 8,
        base: Base::Tcp,
        slot: |o| &mut o.bytes_acked,
        without: "conns: TX (bytes_sent) shows -",
    },
    Field {
        strukt: "tcp_sock",
        path: &["bytes_received"],
        size: 8,
        base: Base::Tcp,
        slot: |o| &mut o.bytes_received,
        without: "conns: RX (bytes_received) shows -",
    },
    Field {
        strukt: "tcp_sock",
        path: &["srtt_us"],
        size: 4,
        base: Base::Tcp,
        slot: |o| &mut o.srtt_us,
        without: "conns: RTT_US (srtt_us) and a server's HS_MS (handshake_ms) show -",
    },
    Field {
        strukt: "tcp_sock",
        path: &["total_retrans"],
        size: 4,
        base: Base::Tcp,
        slot: |o| &mut o.total_retrans,
        without: "conns --format json: total_retrans is null",
    },
    Field {
        strukt: "tcp_sock",
        path: &["segs_in"],
        size: 4,
        base: Base::Tcp,
        slot: |o| &mut o.segs_in,
        without: "conns: SEGS of the end that closed first shows -, and fin_wait2 is reported as fin_wait2_timeout",
    },
    Field {
        strukt: "tcp_sock",
        path: &["segs_out"],
        size: 4,
        base: Base::Tcp,
        slot: |o| &mut o.segs_out,
        without: "conns: SEGS of the end that closed second shows - where icsk_ack.pending is missing too",
    },
    Field {
        strukt: "tcp_sock",
        path: &["rcv_nxt"],
        size: 4,
        base: Base::Tcp,
        slot: |o| &mut o.rcv_nxt,
        without: "conns: CLOSE of the end that closed first shows unknown, with SEGS and TIMEWAIT -",
    },
    Field {
        strukt: "inet_connection_sock",
        path: &["icsk_ack", "pending"],
        size: 1,
        base: Base::Icsk,
        slot: |o| &mut o.icsk_ack_pending,
        without: "conns: SEGS of the end that closed second is counted from segs_out instead",
    },
    // possible_net_t wraps `struct net *`; 8 bytes unless the kernel lacks netns.
    Field {
        strukt: "sock",
        path: &["__sk_common", "skc_net"],
        size: 8,
        base: Base::Direct,
        slot: |o| &mut o.skc_net,
        without: "the network namespace is unknown (netns null), so sockets of other namespaces are not told apart",
    },
    Field {
        strukt: "net",
        path: &["ns", "inum"],
        size: 4,
        base: Base::Direct,
        slot: |o| &mut o.net_ns_inum,
        without: "the network namespace is unknown (netns null), so sockets of other namespaces are not told apart",
    },
];

/// Why the fields of a struct cannot be read from a `struct sock *`.
#[derive(Clone, Debug, thiserror::Error)]
enum Misplaced {
    #[error("{strukt}.{member} is at byte {offset}, not 0")]
    NotAtStart {
        strukt: &'static str,
        member: &'static str,
        offset: u32,
    },
    #[error("cannot check that {strukt} starts with {member}")]
    Unknown {
        strukt: &'static str,
        member: &'static str,
        #[source]
        source: std::rc::Rc<BtfError>,
    },
}

/// Checks that `strukt.member` sits at offset 0.
fn at_start(btf: &Btf, strukt: &'static str, member: &'static str) -> Result<(), Misplaced> {
    match btf.member(strukt, &[member]) {
        Ok(m) if m.offset == 0 => Ok(()),
        Ok(m) => Err(Misplaced::NotAtStart {
            strukt,
            member,
            offset: m.offset,
        }),
        Err(e) => Err(Misplaced::Unknown {
            strukt,
            member,
            source: std::rc::Rc::new(e),
        }),
    }
}

/// An error and its causes, for a line said to the user.
pub(crate) fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let causes: Vec<String> = anyhow::Chain::new(e).map(|c| c.to_string()).collect();
    causes.join(": ")
}

/// Fills the socket offsets the eBPF program reads, from `btf`. Fields that
/// cannot be located exactly stay [`tcpwatch_common::OFFSET_UNKNOWN`]; each
/// gets one human message in the returned list (empty when all were found).
pub fn sock_offsets(btf: &Btf) -> (SockOffsets, Vec<String>) {
    // The program holds a `struct sock *`; tcp_sock and inet_connection_sock
    // offsets are only offsets from it if each struct starts with the next.
    let sk_in_inet = at_start(btf, "inet_sock", "sk");
    let inet_in_icsk = at_start(btf, "inet_connection_sock", "icsk_inet");
    let icsk_in_tcp = at_start(btf, "tcp_sock", "inet_conn");
    let icsk_base = inet_in_icsk.clone().and(sk_in_inet.clone());
    let tcp_base = icsk_in_tcp.and(icsk_base.clone());

    let mut offsets = SockOffsets::UNKNOWN;
    let mut missing = Vec::new();
    for f in FIELDS {
        let label = format!("{}.{}", f.strukt, f.path.join("."));
        let base = match f.base {
            Base::Direct => Ok(()),
            Base::Icsk => icsk_base.clone(),
            Base::Tcp => tcp_base.clone(),
        };
        let why = match (base, btf.member(f.strukt, f.path)) {
            (Err(why), _) => format!("not usable from a socket pointer: {}", with_causes(&why)),
            (Ok(()), Ok(m)) if m.size != f.size => format!(
                "size differs: {} bytes in the kernel's BTF, expected {}",
                m.size, f.size
            ),
            (Ok(()), Ok(m)) => {
                *(f.slot)(&mut offsets) = m.offset;
                continue;
            }
            (Ok(()), Err(e @ (BtfError::NoSuchStruct { .. } | BtfError::NoSuchMember { .. }))) => {
                format!("not in the kernel's BTF ({e})")
            }
            (Ok(()), Err(e)) => with_causes(&e),
        };
        missing.push(format!("{label}: {why}; {}", f.without));
    }
    (offsets, missing)
}

/// Where the BTF set-state program reads a socket's endpoints (what the
/// classic tracepoint's record holds), or why it cannot: then the classic
/// tracepoint is used. IPv6 addresses are optional (a kernel built without
/// IPv6 has no such fields, and no IPv6 sockets).
pub fn endpoint_offsets(btf: &Btf) -> Result<EndpointOffsets, String> {
    at_start(btf, "inet_sock", "sk").map_err(|e| with_causes(&e))?;
    let member = |strukt: &str, path: &[&str], size: u32| -> Result<u32, String> {
        let label = format!("{strukt}.{}", path.join("."));
        match btf.member(strukt, path) {
            Ok(m) if m.size == size => Ok(m.offset),
            Ok(m) => Err(format!(
                "{label}: {} bytes in the kernel's BTF, expected {size}",
                m.size
            )),
            Err(e) => Err(format!("{label}: {}", with_causes(&e))),
        }
    };
    let field = |path: &[&str], size: u32| member("sock", path, size);
    let mut off = EndpointOffsets {
        daddr: field(&["__sk_common", "skc_daddr"], 4)?,
        dport: field(&["__sk_common", "skc_dport"], 2)?,
        family: field(&["__sk_common", "skc_family"], 2)?,
        state: field(&["__sk_common", "skc_state"], 1)?,
        saddr: member("inet_sock", &["inet_saddr"], 4)?,
        sport: member("inet_sock", &["inet_sport"], 2)?,
        protocol: field(&["sk_protocol"], 2)?,
        v6_daddr: field(&["__sk_common", "skc_v6_daddr"], 16)
            .unwrap_or(tcpwatch_common::OFFSET_UNKNOWN),
        v6_rcv_saddr: field(&["__sk_common", "skc_v6_rcv_saddr"], 16)
            .unwrap_or(tcpwatch_common::OFFSET_UNKNOWN),
        ..EndpointOffsets::UNKNOWN
    };
    off.standard = u32::from(off.is_standard());
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcpwatch_common::OFFSET_UNKNOWN;

    // BTF kinds (include/uapi/linux/btf.h), to write test blobs.
    const KIND_INT: u8 = 1;
    const KIND_PTR: u8 = 2;
    const KIND_ARRAY: u8 = 3;
    const KIND_STRUCT: u8 = 4;
    const KIND_UNION: u8 = 5;
    const KIND_ENUM: u8 = 6;
    const KIND_FWD: u8 = 7;
    const KIND_TYPEDEF: u8 = 8;
    const KIND_VOLATILE: u8 = 9;
    const KIND_CONST: u8 = 10;
    const KIND_RESTRICT: u8 = 11;
    const KIND_FUNC: u8 = 12;
    const KIND_FUNC_PROTO: u8 = 13;
    const KIND_VAR: u8 = 14;
    const KIND_DATASEC: u8 = 15;
    const KIND_FLOAT: u8 = 16;
    const KIND_DECL_TAG: u8 = 17;
    const KIND_TYPE_TAG: u8 = 18;
    const KIND_ENUM64: u8 = 19;

    /// Builds small BTF blobs: types are appended in id order.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn word(&mut self, w: u32) {
            self.types.extend_from_slice(&w.to_le_bytes());
        }

        fn head(
            &mut self,
            name: &str,
            kind: u8,
            vlen: u32,
            kind_flag: bool,
            size_or_type: u32,
        ) -> u32 {
            let name_off = self.str(name);
            self.word(name_off);
            self.word(u32::from(kind_flag) << 31 | u32::from(kind) << 24 | vlen);
            self.word(size_or_type);
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.int_bits(name, size, 0, size * 8)
        }

        fn int_bits(&mut self, name: &str, size: u32, bit_off: u32, nr_bits: u32) -> u32 {
            let id = self.head(name, KIND_INT, 0, false, size);
            self.word(bit_off << 16 | nr_bits);
            id
        }

        fn ptr(&mut self, to: u32) -> u32 {
            self.head("", KIND_PTR, 0, false, to)
        }

        fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.head(name, KIND_TYPEDEF, 0, false, to)
        }

        fn modifier(&mut self, kind: u8, to: u32) -> u32 {
            self.head("", kind, 0, false, to)
        }

        fn array(&mut self, elem: u32, index: u32, nelems: u32) -> u32 {
            let id = self.head("", KIND_ARRAY, 0, false, 0);
            self.word(elem);
            self.word(index);
            self.word(nelems);
            id
        }

        fn enumeration(&mut self, name: &str, values: &[(&str, u32)]) -> u32 {
            let id = self.head(name, KIND_ENUM, values.len() as u32, false, 4);
            for &(n, v) in values {
                let off = self.str(n);
                self.word(off);
                self.word(v);
            }
            id
        }

        /// Members are (name, type, bit offset [, bitfield size if kind_flag]).
        fn composite(
            &mut self,
            kind: u8,
            name: &str,
            size: u32,
            kind_flag: bool,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let id = self.head(name, kind, members.len() as u32, kind_flag, size);
            for &(n, ty, bits, bf) in members {
                let off = self.str(n);
                self.word(off);
                self.word(ty);
                self.word(if kind_flag { bf << 24 | bits } else { bits });
            }
            id
        }

        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let m: Vec<_> = members.iter().map(|&(n, t, b)| (n, t, b, 0)).collect();
            self.composite(KIND_STRUCT, name, size, false, &m)
        }

        fn union(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let m: Vec<_> = members.iter().map(|&(n, t, b)| (n, t, b, 0)).collect();
            self.composite(KIND_UNION, name, size, false, &m)
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.push(VERSION);
            out.push(0);
            let types_len = self.types.len() as u32;
            for w in [24, 0, types_len, types_len, self.strings.len() as u32] {
                out.extend_from_slice(&u32::to_le_bytes(w));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A miniature of the kernel's socket structs, laid out like the real
    /// ones where it matters (embedding at 0, anonymous members, typedefs,
    /// a kind_flag bitfield).
    fn kernel_like() -> Vec<u8> {
        let mut b = Builder::new();
        let u8_ = b.int("unsigned char", 1);
        let u8t = b.typedef("u8", u8_);
        let int = b.int("int", 4);
        let uint = b.int("unsigned int", 4);
        let u64_ = b.int("long long unsigned int", 8);
        let u64t = b.typedef("u64", u64_);
        let u32t = b.typedef("u32", uint);
        let _long = b.int("long int", 8);
        let ns_common = b.strukt("ns_common", 16, &[("stashed", u64t, 0), ("inum", uint, 64)]);
        let net = b.strukt("net", 64, &[("passive", int, 0), ("ns", ns_common, 64)]);
        let net_ptr = b.ptr(net);
        let possible_net = b.strukt("", 8, &[("net", net_ptr, 0)]);
        let possible_net_t = b.typedef("possible_net_t", possible_net);
        let anon_hash = b.union("", 4, &[("skc_hash", uint, 0), ("skc_u16hashes", uint, 0)]);
        let sock_common = b.composite(
            KIND_STRUCT,
            "sock_common",
            32,
            true,
            &[
                ("", anon_hash, 0, 0),
                ("skc_reuse", u8_, 36, 4),
                ("skc_bound_dev_if", int, 64, 0),
                ("skc_net", possible_net_t, 128, 0),
            ],
        );
        let sock = b.strukt(
            "sock",
            64,
            &[
                ("__sk_common", sock_common, 0),
                ("sk_err", int, 256),
                ("sk_shutdown", u8t, 296),
            ],
        );
        let inet_sock = b.strukt("inet_sock", 80, &[("sk", sock, 0), ("inet_id", uint, 512)]);
        let icsk_ack = b.strukt("", 4, &[("pending", u8t, 0), ("quick", u8t, 8)]);
        let icsk = b.strukt(
            "inet_connection_sock",
            96,
            &[("icsk_inet", inet_sock, 0), ("icsk_ack", icsk_ack, 640)],
        );
        // An anonymous struct in an anonymous union, as cacheline groups look.
        let c_u32 = b.modifier(KIND_CONST, u32t);
        let v_u32 = b.modifier(KIND_VOLATILE, c_u32);
        let inner = b.strukt(
            "",
            16,
            &[
                ("segs_in", u32t, 0),
                ("segs_out", v_u32, 32),
                ("bytes_received", u64t, 64),
            ],
        );
        let outer = b.union("", 16, &[("", inner, 0), ("raw", u64t, 0)]);
        let tcp_sock = b.strukt(
            "tcp_sock",
            160,
            &[
                ("inet_conn", icsk, 0),
                ("srtt_us", u32t, 768),
                ("total_retrans", u32t, 800),
                ("", outer, 832),
                ("bytes_acked", u64t, 960),
                ("rcv_nxt", u32t, 1024),
            ],
        );
        let _ = tcp_sock;
        b.build()
    }

    #[test]
    fn named_struct_member() {
        let btf = Btf::parse(&kernel_like()).expect("parse");
        assert_eq!(
            btf.member("sock", &["sk_err"]).expect("sk_err"),
            Member {
                offset: 32,
                size: 4
            }
        );
        assert_eq!(
            btf.member("sock", &["sk_shutdown"]).expect("sk_shutdown"),
            Member {
                offset: 37,
                size: 1
            }
        );
        assert_eq!(
            btf.member("tcp_sock", &["bytes_acked"])
                .expect("bytes_acked"),
            Member {
                offset: 120,
                size: 8
            }
        );
        assert_eq!(
            btf.member("tcp_sock", &[]).expect("whole"),
            Member {
                offset: 0,
                size: 160
            }
        );
    }

    #[test]
    fn nested_and_anonymous_members() {
        let btf = Btf::parse(&kernel_like()).expect("parse");
        assert_eq!(
            btf.member("inet_connection_sock", &["icsk_ack", "pending"])
                .expect("pending"),
            Member {
                offset: 80,
                size: 1
            }
        );
        assert_eq!(
            btf.member("sock", &["__sk_common", "skc_net"])
                .expect("skc_net"),
            Member {
                offset: 16,
                size: 8
            }
        );
        assert_eq!(
            btf.member("sock", &["__sk_common", "skc_hash"])
                .expect("skc_hash"),
            Member { offset: 0, size: 4 }
        );
        // Through an anonymous union holding an anonymous struct.
        assert_eq!(
            btf.member("tcp_sock", &["segs_in"]).expect("segs_in"),
            Member {
                offset: 104,
                size: 4
            }
        );
        assert_eq!(
            btf.member("tcp_sock", &["bytes_received"])
                .expect("bytes_received"),
            Member {
                offset: 112,
                size: 8
            }
        );
        // Into an embedded struct, then further.
        assert_eq!(
            btf.member("tcp_sock", &["inet_conn", "icsk_inet", "sk", "sk_err"])
                .expect("deep"),
            Member {
                offset: 32,
                size: 4
            }
        );
        assert_eq!(
            btf.member("net", &["ns", "inum"]).expect("inum"),
            Member {
                offset: 16,
                size: 4
            }
        );
    }

    #[test]
    fn typedef_and_modifier_chain() {
        let btf = Btf::parse(&kernel_like()).expect("parse");
        // segs_out is volatile const u32 (typedef of unsigned int).
        assert_eq!(
            btf.member("tcp_sock", &["segs_out"]).expect("segs_out"),
            Member {
                offset: 108,
                size: 4
            }
        );

        // A member whose struct type is reached through typedef + const.
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let inner = b.strukt("inner", 8, &[("a", int, 0), ("b", int, 32)]);
        let td = b.typedef("inner_t", inner);
        let td2 = b.typedef("inner2_t", td);
        let c = b.modifier(KIND_CONST, td2);
        let r = b.modifier(KIND_RESTRICT, c);
        let tt = b.head("tag", KIND_TYPE_TAG, 0, false, r);
        let arr = b.array(int, int, 3);
        b.strukt(
            "outer",
            24,
            &[("x", int, 0), ("in", tt, 32), ("arr", arr, 96)],
        );
        let btf = Btf::parse(&b.build()).expect("parse");
        assert_eq!(
            btf.member("outer", &["in", "b"]).expect("in.b"),
            Member { offset: 8, size: 4 }
        );
        assert_eq!(
            btf.member("outer", &["in"]).expect("in"),
            Member { offset: 4, size: 8 }
        );
        assert_eq!(
            btf.member("outer", &["arr"]).expect("arr"),
            Member {
                offset: 12,
                size: 12
            }
        );
    }

    #[test]
    fn bitfields_rejected() {
        let btf = Btf::parse(&kernel_like()).expect("parse");
        let err = btf
            .member("sock", &["__sk_common", "skc_reuse"])
            .expect_err("bitfield");
        assert!(matches!(err, BtfError::Bitfield { .. }), "{err}");
        assert!(err.to_string().contains("bitfield"), "{err}");

        let mut b = Builder::new();
        let uint = b.int("unsigned int", 4);
        let old_style = b.int_bits("unsigned int", 4, 0, 3);
        // kind_flag with bitfield size 0 is an ordinary member.
        b.composite(
            KIND_STRUCT,
            "kf",
            8,
            true,
            &[("plain", uint, 0, 0), ("bf", uint, 32, 1)],
        );
        // Without kind_flag: an old-style narrow INT.
        b.strukt("nf", 8, &[("narrow", old_style, 32)]);
        let blob = b.build();
        let btf = Btf::parse(&blob).expect("parse");
        assert_eq!(
            btf.member("kf", &["plain"]).expect("plain"),
            Member { offset: 0, size: 4 }
        );
        for (s, m) in [("kf", "bf"), ("nf", "narrow")] {
            let err = btf.member(s, &[m]).expect_err(m);
            assert!(matches!(err, BtfError::Bitfield { .. }), "{s}.{m}: {err}");
        }

        // Without kind_flag, a bit offset that is not a byte boundary: the
        // parser refuses the whole blob. Kernel BTF marks bitfields with
        // kind_flag instead (`running_kernel_vmlinux` meets one: skc_reuse).
        let mut b = Builder::new();
        let uint = b.int("unsigned int", 4);
        b.strukt("nf", 8, &[("odd", uint, 3)]);
        let err = Btf::parse(&b.build()).expect_err("unaligned member");
        assert!(
            matches!(
                err,
                BtfError::Parse {
                    kind: btfparse::ErrorKind::InvalidOffset,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_things() {
        let btf = Btf::parse(&kernel_like()).expect("parse");
        let err = btf.member("tcp_sock", &["nope"]).expect_err("missing");
        assert!(matches!(err, BtfError::NoSuchMember { .. }), "{err}");
        assert_eq!(err.to_string(), "`tcp_sock` has no member `nope`");
        let err = btf
            .member("inet_connection_sock", &["icsk_ack", "nope"])
            .expect_err("missing");
        assert_eq!(
            err.to_string(),
            "`inet_connection_sock.icsk_ack` has no member `nope`"
        );
        let err = btf.member("udp_sock", &["x"]).expect_err("no struct");
        assert!(matches!(err, BtfError::NoSuchStruct { .. }), "{err}");
        let err = btf
            .member("sock", &["sk_err", "x"])
            .expect_err("not composite");
        assert!(matches!(err, BtfError::NotComposite { .. }), "{err}");
        // Anonymous members are not addressable by the empty name.
        assert!(btf.member("tcp_sock", &[""]).is_err());
    }

    #[test]
    fn first_struct_wins_and_fwd_and_union_skipped() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.head("s", KIND_FWD, 0, false, 0);
        b.union("s", 4, &[("u", int, 0)]);
        b.strukt("s", 8, &[("a", int, 32)]);
        b.strukt("s", 8, &[("a", int, 0)]);
        let btf = Btf::parse(&b.build()).expect("parse");
        assert_eq!(btf.member("s", &["a"]).expect("a").offset, 4);
    }

    #[test]
    fn sock_offsets_from_synthetic_btf() {
        let btf = Btf::parse(&kernel_like()).expect("parse");
        let (o, missing) = sock_offsets(&btf);
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(o.sk_shutdown, 37);
        assert_eq!(o.sk_err, 32);
        assert_eq!(o.bytes_acked, 120);
        assert_eq!(o.bytes_received, 112);
        assert_eq!(o.srtt_us, 96);
        assert_eq!(o.total_retrans, 100);
        assert_eq!(o.segs_in, 104);
        assert_eq!(o.segs_out, 108);
        assert_eq!(o.rcv_nxt, 128);
        assert_eq!(o.icsk_ack_pending, 80);
        assert_eq!(o.skc_net, 16);
        assert_eq!(o.net_ns_inum, 16);
    }

    #[test]
    fn endpoint_offsets_need_every_ipv4_field() {
        // The synthetic kernel has no addresses in its sock_common.
        let btf = Btf::parse(&kernel_like()).expect("parse");
        let why = endpoint_offsets(&btf).expect_err("no skc_daddr");
        assert!(why.starts_with("sock.__sk_common.skc_daddr: "), "{why}");
    }

    #[test]
    fn endpoint_offsets_of_the_running_kernel() {
        let Ok(btf) = Btf::from_file(Path::new(VMLINUX_BTF)) else {
            eprintln!("skipped: no readable {VMLINUX_BTF}");
            return;
        };
        let o = endpoint_offsets(&btf).expect("a kernel with BTF has sock_common");
        // sock_common has started with addresses, hash, ports and family
        // since 2.6.
        assert!(o.is_standard(), "{o:?}");
        assert_eq!(o.standard, 1);
        assert!(o.usable());
        assert_ne!(o.protocol, tcpwatch_common::OFFSET_UNKNOWN);
    }

    #[test]
    fn sock_offsets_reports_missing_and_misplaced() {
        let mut b = Builder::new();
        let u8_ = b.int("unsigned char", 1);
        let int = b.int("int", 4);
        let u64_ = b.int("long long unsigned int", 8);
        // sk_shutdown has the wrong size, sk_err is missing, no skc_net.
        let sock = b.strukt("sock", 16, &[("sk_shutdown", int, 0)]);
        let inet_sock = b.strukt("inet_sock", 16, &[("sk", sock, 0)]);
        let icsk_ack = b.strukt("", 1, &[("pending", u8_, 0)]);
        let icsk = b.strukt(
            "inet_connection_sock",
            24,
            &[("icsk_inet", inet_sock, 0), ("icsk_ack", icsk_ack, 128)],
        );
        // inet_conn not at 0: every tcp_sock field must be refused.
        b.strukt(
            "tcp_sock",
            64,
            &[
                ("pad", u64_, 0),
                ("inet_conn", icsk, 64),
                ("bytes_acked", u64_, 256),
            ],
        );
        let btf = Btf::parse(&b.build()).expect("parse");
        let (o, missing) = sock_offsets(&btf);
        assert_eq!(o.icsk_ack_pending, 16);
        for v in [
            o.sk_shutdown,
            o.sk_err,
            o.bytes_acked,
            o.srtt_us,
            o.skc_net,
            o.net_ns_inum,
        ] {
            assert_eq!(v, OFFSET_UNKNOWN);
        }
        assert_eq!(missing.len(), 11, "{missing:#?}");
        let has = |prefix: &str, needle: &str| {
            missing
                .iter()
                .any(|m| m.starts_with(prefix) && m.contains(needle))
        };
        assert!(has("sock.sk_shutdown:", "size differs"), "{missing:#?}");
        assert!(
            has("sock.sk_err:", "not in the kernel's BTF"),
            "{missing:#?}"
        );
        assert!(
            has(
                "tcp_sock.bytes_acked:",
                "tcp_sock.inet_conn is at byte 8, not 0"
            ),
            "{missing:#?}"
        );
        assert!(has("net.ns.inum:", "no struct named `net`"), "{missing:#?}");
    }

    #[test]
    fn bad_magic_version_header() {
        let mut blob = kernel_like();
        blob[0] = 0x12;
        assert!(matches!(Btf::parse(&blob), Err(BtfError::BadMagic { .. })));
        let mut blob = kernel_like();
        blob[2] = 2;
        assert!(matches!(
            Btf::parse(&blob),
            Err(BtfError::UnsupportedVersion { version: 2 })
        ));
        let mut blob = kernel_like();
        blob[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Btf::parse(&blob),
            Err(BtfError::BadHeaderLen { .. })
        ));
        let mut blob = kernel_like();
        blob[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Btf::parse(&blob),
            Err(BtfError::SectionOutOfBounds {
                section: "type",
                ..
            })
        ));
        assert!(matches!(
            Btf::parse(b"nope"),
            Err(BtfError::TooShort { len: 4 })
        ));
    }

    #[test]
    fn big_endian_blob() {
        // Re-encode the little-endian test blob word by word.
        let le = kernel_like();
        let mut be = le.clone();
        be[0..2].copy_from_slice(&MAGIC.to_be_bytes());
        let types_end = 24 + u32::from_le_bytes([le[12], le[13], le[14], le[15]]) as usize;
        // Header words and the type section; strings are bytes.
        for pos in (4..types_end).step_by(4) {
            let w = u32::from_le_bytes([le[pos], le[pos + 1], le[pos + 2], le[pos + 3]]);
            be[pos..pos + 4].copy_from_slice(&w.to_be_bytes());
        }
        let btf = Btf::parse(&be).expect("parse big-endian");
        assert_eq!(
            btf.member("tcp_sock", &["bytes_acked"])
                .expect("bytes_acked"),
            Member {
                offset: 120,
                size: 8
            }
        );
    }

    #[test]
    fn truncated_at_every_length_is_an_error() {
        let blob = kernel_like();
        for len in 0..blob.len() {
            assert!(
                Btf::parse(&blob[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
        assert!(Btf::parse(&blob).is_ok());
    }

    #[test]
    fn truncated_type_section_is_an_error() {
        // The header claims a shorter type section than the types need.
        let blob = kernel_like();
        let type_len = u32::from_le_bytes([blob[12], blob[13], blob[14], blob[15]]);
        for cut in 1..=13 {
            let mut b = blob.clone();
            b[12..16].copy_from_slice(&(type_len - cut).to_le_bytes());
            assert!(Btf::parse(&b).is_err(), "type section cut by {cut}");
        }
    }

    #[test]
    fn cycles_and_bad_ids_do_not_hang() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        // A typedef naming itself, and an anonymous struct containing itself.
        let self_td = b.next_id;
        b.typedef("loop_t", self_td);
        let self_anon = b.next_id;
        b.strukt("", 4, &[("", self_anon, 0)]);
        let arr_self = b.next_id;
        b.array(arr_self, int, 2);
        // The looping anonymous member comes last so named lookups reach
        // the other members first.
        b.strukt(
            "s",
            8,
            &[
                ("l", self_td, 0),
                ("bad", 9999, 0),
                ("arr", arr_self, 0),
                ("v", 0, 0),
                ("", self_anon, 0),
            ],
        );
        let btf = Btf::parse(&b.build()).expect("parse");
        assert!(matches!(
            btf.member("s", &["l"]),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(matches!(
            btf.member("s", &["l", "x"]),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(matches!(
            btf.member("s", &["zzz"]),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(matches!(
            btf.member("s", &["bad"]),
            Err(BtfError::BadTypeId { type_id: 9999 })
        ));
        assert!(matches!(
            btf.member("s", &["arr"]),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(matches!(
            btf.member("s", &["v"]),
            Err(BtfError::NoSize { .. })
        ));
        let (_, missing) = sock_offsets(&btf);
        assert_eq!(missing.len(), FIELDS.len());
    }

    #[test]
    fn pointer_size_needs_long() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let p = b.ptr(int);
        b.strukt("s", 8, &[("p", p, 0)]);
        let btf = Btf::parse(&b.build()).expect("parse");
        assert!(matches!(
            btf.member("s", &["p"]),
            Err(BtfError::PointerSizeUnknown)
        ));
    }

    #[test]
    fn all_kinds_parse() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.enumeration("e", &[("A", 1), ("B", 2)]);
        b.head("f", KIND_FLOAT, 0, false, 8);
        let proto = b.head("", KIND_FUNC_PROTO, 2, false, int);
        for _ in 0..2 {
            b.word(0);
            b.word(int);
        }
        b.head("fn", KIND_FUNC, 0, false, proto);
        b.head("v", KIND_VAR, 0, false, int);
        b.word(1);
        b.head(".data", KIND_DATASEC, 1, false, 4);
        for w in [5, 0, 4] {
            b.word(w);
        }
        b.head("tag", KIND_DECL_TAG, 0, false, int);
        b.word(u32::MAX);
        b.head("e64", KIND_ENUM64, 1, false, 8);
        for w in [0, 1, 2] {
            b.word(w);
        }
        b.strukt("s", 4, &[("i", int, 0)]);
        let btf = Btf::parse(&b.build()).expect("parse");
        assert_eq!(btf.type_count(), 10);
        assert_eq!(
            btf.member("s", &["i"]).expect("i"),
            Member { offset: 0, size: 4 }
        );

        // Kind 20+ is unknown.
        let mut b = Builder::new();
        b.head("x", 25, 0, false, 0);
        assert!(matches!(
            Btf::parse(&b.build()),
            Err(BtfError::Parse {
                kind: btfparse::ErrorKind::InvalidBTFKind,
                ..
            })
        ));
    }

    /// Deterministic mutation fuzzing: no input may panic.
    #[test]
    fn mutated_blobs_never_panic() {
        let blob = kernel_like();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut b = blob.clone();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() % b.len() as u64) as usize;
                b[pos] = match next() % 4 {
                    0 => 0,
                    1 => 0xff,
                    _ => next() as u8,
                };
            }
            if let Ok(btf) = Btf::parse(&b) {
                let _ = sock_offsets(&btf);
                let _ = btf.member("tcp_sock", &["segs_in"]);
            }
        }
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = Btf::parse(&junk);
        }
    }

    #[test]
    fn io_error_names_the_path() {
        let err = Btf::from_file(Path::new("/nonexistent/btf/vmlinux")).expect_err("missing file");
        assert!(
            err.to_string().contains("/nonexistent/btf/vmlinux"),
            "{err}"
        );
    }

    #[test]
    fn only_regular_files_of_sane_size_are_read() {
        let dir = std::env::temp_dir().join(format!("tcpwatch-btf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A FIFO with no writer: reading it would block forever.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = Btf::from_file(&fifo).expect_err("fifo").to_string();
        assert!(err.contains("a FIFO"), "{err}");
        let err = Btf::from_file(&dir).expect_err("dir").to_string();
        assert!(err.contains("a directory"), "{err}");
        let err = Btf::from_file(Path::new("/dev/zero")).expect_err("device");
        assert!(err.to_string().contains("a device"), "{err}");
        // Sparse: takes no space, but would take 1 GB of memory to read.
        let big = dir.join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let err = Btf::from_file(&big).expect_err("too large").to_string();
        assert!(err.contains("1073741824 bytes"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
