//! Recordings: the raw event stream in a file, so that every view can be
//! produced again offline, without root.
//!
//! Layout (little-endian), format version 2:
//! - header, 40 bytes: magic `TCPWATCH`, format version (u16), header
//!   length (u16), event size (u32), CLOCK_REALTIME − CLOCK_MONOTONIC at
//!   the start in ns (i64), the recorder's network namespace inode (u32, 0
//!   unknown), the length of the snapshot section (u32), the host's
//!   `tcp_fin_timeout` in seconds (u32) and the CRC-32 of the header's
//!   first 36 bytes and the snapshot section (u32);
//! - snapshot section: the owners of sockets that existed when recording
//!   began, one per line: `state\tlocal\tremote\tpid\tcgroup\tcomm`;
//! - records back to back: an `Event` exactly as the kernel wrote it, then
//!   the CRC-32 of its bytes (u32).
//!
//! Version 1 is the same without the checksums (the header's last u32 was
//! reserved, and a record was the event alone); it is still read.
//!
//! A reader processes the valid prefix of a damaged file and then reports
//! the byte offset where it stopped making sense: with checksums, the start
//! of the first record whose bytes changed, wherever in the record the
//! damage is. A file that ends partway through a record (a recorder killed
//! mid-write) is not damaged: every whole record is read, and the partial
//! tail is a warning.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tcpwatch_common::Event;

use crate::model::decode::{decode_raw, encode, interpret, DecodeError, Record};
use crate::model::snapshot::{SnapshotEntry, SocketKey, SocketSnapshot};
use crate::model::{Endpoint, Owner, TcpState};

pub const MAGIC: &[u8; 8] = b"TCPWATCH";
/// The format written; [`OLDEST_VERSION`] up to it are read.
pub const VERSION: u16 = 2;
pub const OLDEST_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 40;
/// Bytes of a record's checksum (version 2 on).
const CHECKSUM_LEN: usize = 4;
/// Bytes per record in the format written: the event and its checksum.
pub const RECORD_SIZE: usize = Event::SIZE + CHECKSUM_LEN;
/// Where the header keeps the checksum of itself and the snapshot.
const HEADER_CHECKSUM_AT: usize = 36;
/// Snapshot sections larger than this are refused as corrupt.
const MAX_SNAPSHOT: u32 = 64 << 20;

/// The cause of each follows its message as the error's source.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the recording failed")]
    Write(#[source] io::Error),
    #[error("{path}: {what} at byte offset {offset}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("{path}: read error at byte offset {offset}")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// What the header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub clock_offset_ns: i64,
    pub netns: u32,
    /// net.ipv4.tcp_fin_timeout when recording (seconds).
    pub fin_timeout_s: u32,
}

fn snapshot_text(snapshot: Option<&SocketSnapshot>) -> String {
    let mut text = String::new();
    for e in snapshot.into_iter().flat_map(|s| s.entries()) {
        let Some(o) = &e.owner else { continue };
        let comm: String = o
            .comm
            .chars()
            .filter(|c| *c != '\n' && *c != '\t')
            .collect();
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            e.state.name(),
            e.key.local,
            e.key.remote,
            o.pid,
            o.cgroup_id,
            comm
        ));
    }
    text
}

/// A line of the snapshot section that does not read (numbered from 1).
#[derive(Debug, thiserror::Error)]
#[error("snapshot line {0} is malformed")]
struct MalformedSnapshot(usize);

fn parse_snapshot(text: &str) -> Result<SocketSnapshot, MalformedSnapshot> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.splitn(6, '\t').collect();
        let bad = || MalformedSnapshot(i + 1);
        if f.len() != 6 {
            return Err(bad());
        }
        let state = TcpState::ALL
            .iter()
            .find(|s| s.name() == f[0])
            .copied()
            .ok_or_else(bad)?;
        let local: SocketAddr = f[1].parse().map_err(|_| bad())?;
        let remote: SocketAddr = f[2].parse().map_err(|_| bad())?;
        entries.push(SnapshotEntry {
            key: SocketKey {
                local: Endpoint::from(local),
                remote: Endpoint::from(remote),
            },
            state,
            inode: 0,
            owner: Some(Owner {
                pid: f[3].parse().map_err(|_| bad())?,
                cgroup_id: f[4].parse().map_err(|_| bad())?,
                comm: crate::model::decode::printable_name(f[5]).into_owned(),
            }),
        });
    }
    Ok(SocketSnapshot::from_entries(entries))
}

/// Writes a recording. The file is created 0600: it names processes and
/// peers.
pub struct Recorder<W: Write> {
    out: W,
    /// Records written.
    pub events: u64,
}

impl Recorder<BufWriter<File>> {
    pub fn create(
        path: &Path,
        header: Header,
        snapshot: Option<&SocketSnapshot>,
    ) -> Result<Self, RecordError> {
        let fail = |source| RecordError::Create {
            path: path.to_path_buf(),
            source,
        };
        // Never through a symlink (a planted one in /tmp would make root
        // overwrite its target), and 0600 even when the file existed.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(fail)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
        let mut recorder =
            Recorder::new(BufWriter::with_capacity(256 * 1024, file), header, snapshot)?;
        // The header reaches the file at once: a recorder killed before its
        // first batch still leaves a valid, empty recording.
        recorder.flush()?;
        Ok(recorder)
    }
}

impl<W: Write> Recorder<W> {
    pub fn new(
        mut out: W,
        header: Header,
        snapshot: Option<&SocketSnapshot>,
    ) -> Result<Self, RecordError> {
        let snap = snapshot_text(snapshot);
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&VERSION.to_le_bytes());
        h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        h[12..16].copy_from_slice(&(Event::SIZE as u32).to_le_bytes());
        h[16..24].copy_from_slice(&header.clock_offset_ns.to_le_bytes());
        h[24..28].copy_from_slice(&header.netns.to_le_bytes());
        h[28..32].copy_from_slice(&(snap.len() as u32).to_le_bytes());
        h[32..36].copy_from_slice(&header.fin_timeout_s.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[..HEADER_CHECKSUM_AT]);
        crc.update(snap.as_bytes());
        h[HEADER_CHECKSUM_AT..].copy_from_slice(&crc.finalize().to_le_bytes());
        out.write_all(&h).map_err(RecordError::Write)?;
        out.write_all(snap.as_bytes()).map_err(RecordError::Write)?;
        Ok(Recorder { out, events: 0 })
    }

    pub fn write(&mut self, events: &[Event]) -> Result<(), RecordError> {
        for e in events {
            let bytes = encode(e);
            self.out.write_all(&bytes).map_err(RecordError::Write)?;
            self.out
                .write_all(&crc32fast::hash(&bytes).to_le_bytes())
                .map_err(RecordError::Write)?;
        }
        self.events += events.len() as u64;
        Ok(())
    }

    /// Flushes what is buffered; whole records only ever reach the file
    /// in order, so a recording cut short keeps every record before the cut.
    pub fn flush(&mut self) -> Result<(), RecordError> {
        self.out.flush().map_err(RecordError::Write)
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Reads a recording back.
pub struct Replay<R: Read> {
    input: R,
    path: PathBuf,
    offset: u64,
    /// The file's format version: whether records carry checksums.
    version: u16,
    /// Bytes after the last whole record, once the end has been reached.
    partial_tail: usize,
    pub header: Header,
    pub snapshot: SocketSnapshot,
}

impl Replay<BufReader<File>> {
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        let file = File::open(path).map_err(|source| RecordError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Replay::new(BufReader::with_capacity(256 * 1024, file), path)
    }
}

/// Reads as many bytes as there are, up to `buf.len()`.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<R: Read> Replay<R> {
    pub fn new(mut input: R, path: &Path) -> Result<Self, RecordError> {
        let corrupt = |offset: u64, what: &str| RecordError::Corrupt {
            path: path.to_path_buf(),
            offset,
            what: what.to_string(),
        };
        let read_err = |offset: u64, source: io::Error| RecordError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        };
        let mut h = [0u8; HEADER_LEN];
        let got = read_full(&mut input, &mut h).map_err(|e| read_err(0, e))?;
        if got < 8 || &h[0..8] != MAGIC {
            return Err(corrupt(0, "not a tcpwatch recording (bad magic)"));
        }
        if got < HEADER_LEN {
            return Err(corrupt(got as u64, "header cut short"));
        }
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let version = u16_at(8);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(corrupt(
                8,
                &format!(
                    "format version {version} is not supported (this tcpwatch reads versions {OLDEST_VERSION} to {VERSION})"
                ),
            ));
        }
        if usize::from(u16_at(10)) != HEADER_LEN {
            return Err(corrupt(10, "unexpected header length"));
        }
        let event_size = u32_at(12);
        if event_size as usize != Event::SIZE {
            return Err(corrupt(
                12,
                &format!(
                    "event size {event_size}, this tcpwatch reads {}",
                    Event::SIZE
                ),
            ));
        }
        let mut off = [0u8; 8];
        off.copy_from_slice(&h[16..24]);
        let header = Header {
            clock_offset_ns: i64::from_le_bytes(off),
            netns: u32_at(24),
            fin_timeout_s: u32_at(32),
        };
        let snap_len = u32_at(28);
        if snap_len > MAX_SNAPSHOT {
            return Err(corrupt(28, "snapshot section too large"));
        }
        let mut snap = vec![0u8; snap_len as usize];
        let got = read_full(&mut input, &mut snap).map_err(|e| read_err(HEADER_LEN as u64, e))?;
        if got < snap.len() {
            return Err(corrupt(
                (HEADER_LEN + got) as u64,
                "snapshot section cut short",
            ));
        }
        if version >= 2 {
            let mut crc = crc32fast::Hasher::new();
            crc.update(&h[..HEADER_CHECKSUM_AT]);
            crc.update(&snap);
            if crc.finalize() != u32_at(HEADER_CHECKSUM_AT) {
                return Err(corrupt(
                    0,
                    &format!(
                        "damaged header or snapshot section (bytes 0 to {}, checksum mismatch)",
                        HEADER_LEN + snap.len()
                    ),
                ));
            }
        }
        let text = std::str::from_utf8(&snap).map_err(|e| {
            corrupt(
                HEADER_LEN as u64 + e.valid_up_to() as u64,
                "snapshot is not UTF-8",
            )
        })?;
        let snapshot =
            parse_snapshot(text).map_err(|e| corrupt(HEADER_LEN as u64, &e.to_string()))?;
        Ok(Replay {
            input,
            path: path.to_path_buf(),
            offset: (HEADER_LEN + snap.len()) as u64,
            version,
            partial_tail: 0,
            header,
            snapshot,
        })
    }

    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The file's format version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Bytes per record: the event, and its checksum from version 2 on.
    pub fn record_size(&self) -> usize {
        Event::SIZE + if self.version >= 2 { CHECKSUM_LEN } else { 0 }
    }

    /// The next raw event; `Ok(None)` at the end of the file, including an
    /// end partway through a record (see [`Replay::warning`]).
    pub fn next_event(&mut self) -> Result<Option<Event>, RecordError> {
        if self.partial_tail > 0 {
            return Ok(None);
        }
        let size = self.record_size();
        let mut buf = [0u8; Event::SIZE + CHECKSUM_LEN];
        let got =
            read_full(&mut self.input, &mut buf[..size]).map_err(|source| RecordError::Read {
                path: self.path.clone(),
                offset: self.offset,
                source,
            })?;
        if got < size {
            // A recorder killed mid-write leaves part of its last record.
            self.partial_tail = got;
            return Ok(None);
        }
        let (event, sum) = buf.split_at(Event::SIZE);
        if size > Event::SIZE && crc32fast::hash(event).to_le_bytes() != sum[..CHECKSUM_LEN] {
            return Err(RecordError::Corrupt {
                path: self.path.clone(),
                offset: self.offset,
                what: format!("damaged record of {size} bytes (checksum mismatch)"),
            });
        }
        let event = decode_raw(event).map_err(|e| self.bad_record(e))?;
        self.offset += size as u64;
        Ok(Some(event))
    }

    /// The next event with its meaning; a record that makes no sense is
    /// corruption.
    pub fn next_record(&mut self) -> Result<Option<(Event, Record)>, RecordError> {
        let start = self.offset;
        match self.next_event()? {
            None => Ok(None),
            Some(e) => match interpret(&e) {
                Ok(r) => Ok(Some((e, r))),
                Err(err) => {
                    self.offset = start;
                    Err(self.bad_record(err))
                }
            },
        }
    }

    /// Bytes after the last whole record (0 for a file that ends cleanly),
    /// known once the end has been reached.
    pub fn partial_tail(&self) -> usize {
        self.partial_tail
    }

    /// The warning for a file that ends partway through a record.
    pub fn warning(&self) -> Option<String> {
        (self.partial_tail > 0).then(|| {
            format!(
                "{}: ends with a partial record ({} of {} bytes at byte offset {}), \
                 ignored: the recorder was probably killed while writing",
                self.path.display(),
                self.partial_tail,
                self.record_size(),
                self.offset
            )
        })
    }

    fn bad_record(&self, e: DecodeError) -> RecordError {
        RecordError::Corrupt {
            path: self.path.clone(),
            offset: self.offset,
            what: format!("corrupt record ({e})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decode::tests::state_event;
    use std::collections::HashMap;
    use TcpState::*;

    fn sample_snapshot() -> SocketSnapshot {
        // A listener on 127.0.0.1:8080, inode 11.
        let sockets = [(
            crate::model::snapshot::tests::key("127.0.0.1:8080", "0.0.0.0:0"),
            Listen,
            11,
        )];
        let mut owners = HashMap::new();
        owners.insert(
            11,
            Owner {
                pid: 5,
                comm: "my server".into(),
                cgroup_id: 77,
            },
        );
        SocketSnapshot::from_sockets(sockets, &owners)
    }

    fn recording(events: &[Event]) -> Vec<u8> {
        let header = Header {
            clock_offset_ns: 1_795_392_000_000_000_000,
            netns: 4026531840,
            fin_timeout_s: 30,
        };
        let snap = sample_snapshot();
        let mut r = Recorder::new(Vec::new(), header, Some(&snap)).unwrap();
        r.write(events).unwrap();
        r.flush().unwrap();
        r.into_inner()
    }

    #[test]
    fn created_0600_even_over_an_existing_file_and_never_through_a_symlink() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("tcpwatch-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let header = Header {
            clock_offset_ns: 0,
            netns: 1,
            fin_timeout_s: 60,
        };
        let existing = dir.join("existing.rec");
        std::fs::write(&existing, b"old").unwrap();
        std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o644)).unwrap();
        Recorder::create(&existing, header, None).unwrap();
        let mode = std::fs::metadata(&existing).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");

        let target = dir.join("target");
        std::fs::write(&target, b"precious").unwrap();
        let link = dir.join("link.rec");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = Recorder::create(&link, header, None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("link.rec"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn events() -> Vec<Event> {
        vec![
            state_event(1, Close, SynSent, 10),
            state_event(1, SynSent, Established, 20),
            state_event(1, Established, FinWait1, 30),
        ]
    }

    fn read_all(bytes: &[u8]) -> (Vec<Event>, Option<RecordError>) {
        let mut out = Vec::new();
        let mut r = match Replay::new(bytes, Path::new("t.rec")) {
            Ok(r) => r,
            Err(e) => return (out, Some(e)),
        };
        loop {
            match r.next_record() {
                Ok(Some((e, _))) => out.push(e),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[test]
    fn round_trips_header_snapshot_and_events() {
        let bytes = recording(&events());
        let r = Replay::new(&bytes[..], Path::new("t.rec")).unwrap();
        assert_eq!(r.header.clock_offset_ns, 1_795_392_000_000_000_000);
        assert_eq!(r.header.netns, 4026531840);
        assert_eq!(r.header.fin_timeout_s, 30);
        let key = SocketKey {
            local: Endpoint::new("127.0.0.1".parse().unwrap(), 8080),
            remote: Endpoint::new("0.0.0.0".parse().unwrap(), 0),
        };
        let owner = r.snapshot.owner_of(&key).unwrap();
        assert_eq!(
            (owner.pid, owner.cgroup_id, owner.comm.as_str()),
            (5, 77, "my server")
        );
        let (got, err) = read_all(&bytes);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got, events());
    }

    #[test]
    fn file_cut_mid_record_gives_every_whole_record_and_a_warning() {
        let bytes = recording(&events());
        let start = bytes.len() - 3 * REC;
        // Every cut inside the last record, from its first byte to its last.
        for keep in 1..REC {
            let cut = &bytes[..start + 2 * REC + keep];
            let mut r = Replay::new(cut, Path::new("t.rec")).unwrap();
            let mut got = Vec::new();
            while let Some((e, _)) = r.next_record().unwrap() {
                got.push(e);
            }
            assert_eq!(got, events()[..2]);
            assert_eq!(r.partial_tail(), keep);
            // The end stays the end.
            assert!(r.next_record().unwrap().is_none());
            let msg = r.warning().unwrap();
            let expected = format!(
                "partial record ({keep} of {REC} bytes at byte offset {})",
                start + 2 * REC
            );
            assert!(msg.contains(&expected) && msg.contains("t.rec"), "{msg}");
        }
    }

    #[test]
    fn file_cut_between_records_or_in_the_first_has_no_warning_or_no_records() {
        let bytes = recording(&events());
        let start = bytes.len() - 3 * REC;
        let (got, err) = read_all(&bytes[..start + REC]);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got, events()[..1]);
        let mut r = Replay::new(&bytes[..start + REC], Path::new("t.rec")).unwrap();
        while r.next_record().unwrap().is_some() {}
        assert_eq!((r.partial_tail(), r.warning()), (0, None));
        // Killed during its first record: an empty recording with a warning.
        let mut r = Replay::new(&bytes[..start + 5], Path::new("t.rec")).unwrap();
        assert!(r.next_record().unwrap().is_none());
        assert_eq!(r.partial_tail(), 5);
        assert!(r.warning().is_some());
    }

    const REC: usize = RECORD_SIZE;

    #[test]
    fn corrupt_record_is_reported_at_its_offset() {
        let mut bytes = recording(&events());
        let second = bytes.len() - 2 * REC;
        // kind byte of the second record
        bytes[second + std::mem::offset_of!(Event, kind)] = 0xee;
        let (got, err) = read_all(&bytes);
        assert_eq!(got.len(), 1);
        let msg = err.unwrap().to_string();
        assert!(msg.contains(&format!("byte offset {second}")), "{msg}");
    }

    #[test]
    fn damage_anywhere_in_a_record_names_its_start() {
        let bytes = recording(&events());
        let first = bytes.len() - 3 * REC;
        // Bytes that still decode (an RTT, a counter, the checksum itself)
        // are caught as surely as a bad kind byte: every byte of every
        // record, and 16 bytes of 0xff across a record boundary.
        for at in first..bytes.len() {
            let mut b = bytes.clone();
            b[at] ^= 0x01;
            let (got, err) = read_all(&b);
            let record = (at - first) / REC;
            assert_eq!(got, events()[..record], "flip at {at}");
            let msg = err.expect("damage found").to_string();
            assert_eq!(
                msg,
                format!(
                    "t.rec: damaged record of {REC} bytes (checksum mismatch) at byte offset {}",
                    first + record * REC
                )
            );
        }
        let mut b = bytes.clone();
        let at = first + REC - 8;
        b[at..at + 16].fill(0xff);
        let (got, err) = read_all(&b);
        assert_eq!(got, events()[..0]);
        assert!(err
            .unwrap()
            .to_string()
            .ends_with(&format!("byte offset {first}")));
    }

    #[test]
    fn damage_in_the_header_or_snapshot_is_found() {
        let bytes = recording(&events());
        let first = bytes.len() - 3 * REC;
        // Header fields not checked otherwise (clock, netns, fin timeout,
        // the checksum) and the snapshot's text. (A damaged snapshot length
        // is found as a section cut short or too large.)
        for at in (16..28).chain(32..40).chain(HEADER_LEN..first) {
            let mut b = bytes.clone();
            b[at] ^= 0x20;
            let msg = Replay::new(&b[..], Path::new("t.rec"))
                .err()
                .unwrap_or_else(|| panic!("flip at {at} not found"))
                .to_string();
            assert!(
                msg.contains("damaged header or snapshot section")
                    && msg.ends_with("byte offset 0"),
                "{at}: {msg}"
            );
        }
    }

    /// A recording as tcpwatch wrote it in format version 1: no checksums.
    fn version1(events: &[Event]) -> Vec<u8> {
        let snap = "LISTEN\t127.0.0.1:8080\t0.0.0.0:0\t5\t77\tmy server\n";
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&1u16.to_le_bytes());
        h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        h[12..16].copy_from_slice(&(Event::SIZE as u32).to_le_bytes());
        h[24..28].copy_from_slice(&7u32.to_le_bytes());
        h[28..32].copy_from_slice(&(snap.len() as u32).to_le_bytes());
        h[32..36].copy_from_slice(&60u32.to_le_bytes());
        let mut v = h.to_vec();
        v.extend_from_slice(snap.as_bytes());
        for e in events {
            v.extend_from_slice(&encode(e));
        }
        v
    }

    #[test]
    fn version_1_recordings_are_still_read() {
        let bytes = version1(&events());
        let r = Replay::new(&bytes[..], Path::new("old.rec")).unwrap();
        assert_eq!((r.version(), r.record_size()), (1, Event::SIZE));
        assert_eq!((r.header.netns, r.header.fin_timeout_s), (7, 60));
        let (got, err) = read_all(&bytes);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got, events());
        // Cut mid-record: the whole ones, and a warning sized for version 1.
        let mut r = Replay::new(&bytes[..bytes.len() - 10], Path::new("old.rec")).unwrap();
        while r.next_record().unwrap().is_some() {}
        let w = r.warning().unwrap();
        assert!(w.contains(&format!("of {} bytes", Event::SIZE)), "{w}");
    }

    #[test]
    fn snapshot_names_lose_their_control_characters() {
        let snap = parse_snapshot("LISTEN\t127.0.0.1:80\t0.0.0.0:0\t7\t0\tx\r\x1b[2Jy\n").unwrap();
        let key = SocketKey {
            local: Endpoint::new("127.0.0.1".parse().unwrap(), 80),
            remote: Endpoint::new("0.0.0.0".parse().unwrap(), 0),
        };
        assert_eq!(snap.owner_of(&key).unwrap().comm, "x??[2Jy");
    }

    #[test]
    fn bad_headers_are_errors() {
        let (_, err) = read_all(b"NOTAFILE and more bytes beyond the header....");
        assert!(err.unwrap().to_string().contains("bad magic"));
        let bytes = recording(&[]);
        let (_, err) = read_all(&bytes[..30]);
        assert!(err.unwrap().to_string().contains("header cut short"));
        let mut v = recording(&[]);
        v[8] = 9;
        let (_, err) = read_all(&v);
        assert_eq!(
            err.unwrap().to_string(),
            "t.rec: format version 9 is not supported (this tcpwatch reads versions 1 to 2) at byte offset 8"
        );
        let mut v = recording(&[]);
        v[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        let (_, err) = read_all(&v);
        assert!(err.unwrap().to_string().contains("too large"));
    }

    #[test]
    fn every_truncation_and_byte_flip_is_handled() {
        let bytes = recording(&events());
        for len in 0..bytes.len() {
            let _ = read_all(&bytes[..len]);
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = read_all(&b);
        }
    }

    #[test]
    fn recording_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tcpwatch-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.rec");
        let mut r = Recorder::create(
            &path,
            Header {
                clock_offset_ns: 0,
                netns: 0,
                fin_timeout_s: 60,
            },
            None,
        )
        .unwrap();
        r.write(&events()).unwrap();
        r.flush().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode, 0o600);
    }
}
