//! `trace`'s lines, text and JSON. [`TraceWriter`] writes them into the
//! caller's byte buffer: `trace` prints each transition as it comes, so a
//! line is on the hot path, and nothing is allocated per line. A second's
//! date and time is worked out once for every line stamped within it, and
//! the JSON's fields are written in their documented order by hand (the
//! bytes are those `serde_json` gave for the same fields: its own writer
//! still writes the strings, floats and the cgroup).

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{cgroup_of, Column, ENDPOINT_WIDTH};
use crate::host::clock::{Clock, Zone, STAMP_WIDTH};
use crate::model::cgroup::Cgroup;
use crate::model::decode::Transition;
use crate::model::owner::{Attribution, OwnerSource};
use crate::model::reset::{self, ResetReason};
use crate::model::{Endpoint, Family, Owner, TcpState};

/// One `trace` line: a transition with the owner and the time since the
/// socket's previous transition.
pub struct TraceLine<'a> {
    pub t: &'a Transition,
    pub owner: Option<&'a Attribution>,
    /// The owner's cgroup with its path, when the caller looked it up.
    pub cgroup: Option<&'a Cgroup>,
    pub delta_ns: Option<u64>,
}

/// What a trace line that is not a transition reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    ResetSent,
    ResetReceived,
    Retransmit,
}

impl EventKind {
    /// The JSON `event` value.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::ResetSent => "reset_sent",
            EventKind::ResetReceived => "reset_received",
            EventKind::Retransmit => "retransmit",
        }
    }

    /// What the text's TRANSITION column says.
    fn text(self) -> &'static str {
        match self {
            EventKind::ResetSent => "RST sent",
            EventKind::ResetReceived => "RST received",
            EventKind::Retransmit => "retransmit",
        }
    }
}

/// One `trace` line for a reset or a retransmission: the socket's owner,
/// the time since its last transition and, for a reset sent, the
/// kernel's reason.
pub struct TraceEventLine<'a> {
    pub what: EventKind,
    pub ts_ns: u64,
    /// 0: a reset sent for no socket.
    pub skaddr: u64,
    pub family: Family,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub owner: Option<&'a Attribution>,
    pub cgroup: Option<&'a Cgroup>,
    pub delta_ns: Option<u64>,
    pub reason: Option<ResetReason>,
    /// The sender's state at a reset sent (`None`: no socket).
    pub state: Option<TcpState>,
    pub netns: Option<u32>,
    pub cpu: u32,
}

/// `trace`'s columns.
pub const TRACE_COLUMNS: [Column; 7] = [
    Column::left("TIME", STAMP_WIDTH),
    Column::left("PID", 7),
    Column::left("COMM", 15),
    Column::left("LOCAL", ENDPOINT_WIDTH),
    Column::left("REMOTE", ENDPOINT_WIDTH),
    Column::left("TRANSITION", 27),
    Column::left("MS", 9),
];

pub fn trace_header(zone: Zone) -> String {
    super::table_header(&TRACE_COLUMNS, zone, "TIME")
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn source_name(s: OwnerSource) -> &'static str {
    match s {
        OwnerSource::Observed => "observed",
        OwnerSource::Listener => "listener",
        OwnerSource::Procfs => "procfs",
    }
}

/// The text of the whole second last written, for the lines stamped
/// within it: everything before the fraction of a second.
#[derive(Default)]
struct SecondText {
    second: Option<u64>,
    text: String,
}

impl SecondText {
    /// The text before the fraction for `second`: `full` of that second
    /// with `fraction` (its zero fraction and what follows) cut off.
    /// `None` if `full` does not end so (then the caller writes the slow
    /// way).
    fn get(
        &mut self,
        second: u64,
        fraction: &str,
        full: impl FnOnce(SystemTime) -> String,
    ) -> Option<&str> {
        if self.second != Some(second) {
            self.second = None;
            let text = full(UNIX_EPOCH + Duration::from_secs(second));
            self.text.clear();
            self.text.push_str(text.strip_suffix(fraction)?);
            self.second = Some(second);
        }
        Some(&self.text)
    }
}

/// The socket fields of a line: what its socket's other lines repeat.
struct SocketPart<'a> {
    skaddr: u64,
    owner: Option<&'a Attribution>,
    cgroup: Option<&'a Cgroup>,
    family: Family,
    local: &'a Endpoint,
    remote: &'a Endpoint,
}

/// The socket fields one [`SocketText`] slot was written from.
struct SocketKey {
    skaddr: u64,
    /// Held, so no other owner can be at its address while it is here.
    owner: Option<(Arc<Owner>, OwnerSource)>,
    cgroup: Option<Cgroup>,
    family: Family,
    local: Endpoint,
    remote: Endpoint,
}

impl SocketKey {
    fn of(p: &SocketPart<'_>) -> SocketKey {
        SocketKey {
            skaddr: p.skaddr,
            owner: p.owner.map(|a| (a.owner.clone(), a.source)),
            cgroup: p.cgroup.cloned(),
            family: p.family,
            local: *p.local,
            remote: *p.remote,
        }
    }

    fn is(&self, p: &SocketPart<'_>) -> bool {
        self.skaddr == p.skaddr
            && self.family == p.family
            && self.local == *p.local
            && self.remote == *p.remote
            && match (&self.owner, p.owner) {
                (None, None) => true,
                (Some((owner, source)), Some(a)) => {
                    Arc::ptr_eq(owner, &a.owner) && *source == a.source
                }
                _ => false,
            }
            && self.cgroup.as_ref() == p.cgroup
    }
}

/// Slots of [`SocketText`]: a power of two.
const SOCKET_SLOTS: usize = 1024;

/// The socket part of recent lines as written, by socket: a socket's
/// lines (about ten for a short connection) write it once. One slot per
/// socket address hash, the newest socket taking it.
struct SocketText {
    slots: Vec<(Option<SocketKey>, Vec<u8>)>,
}

impl SocketText {
    fn new() -> SocketText {
        SocketText {
            slots: (0..SOCKET_SLOTS).map(|_| (None, Vec::new())).collect(),
        }
    }

    /// Appends `p`'s part to `buf`, written by `write` unless the slot
    /// already holds it.
    fn push(
        &mut self,
        buf: &mut Vec<u8>,
        p: &SocketPart<'_>,
        write: impl FnOnce(&mut Vec<u8>, &SocketPart<'_>),
    ) {
        // Sockets are at least 64-byte aligned: the bits above tell them apart.
        let at = (p.skaddr >> 6).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54;
        let (key, text) = &mut self.slots[at as usize % SOCKET_SLOTS];
        if !key.as_ref().is_some_and(|k| k.is(p)) {
            text.clear();
            write(text, p);
            *key = Some(SocketKey::of(p));
        }
        buf.extend_from_slice(text);
    }
}

/// Writes trace lines into a byte buffer, each without its newline.
pub struct TraceWriter {
    stamps: Stamps,
    json_sockets: SocketText,
    text_sockets: SocketText,
}

/// Lines stamped before this many seconds after the epoch are written the
/// slow way: a zone west of UTC would take them before the epoch, where
/// [`Zone::stamp`] writes the epoch itself.
const EARLIEST_FAST_S: u64 = 2 * 86_400;

impl TraceWriter {
    pub fn new(clock: Clock, zone: Zone) -> TraceWriter {
        TraceWriter {
            stamps: Stamps::new(clock, zone),
            json_sockets: SocketText::new(),
            text_sockets: SocketText::new(),
        }
    }

    /// A transition in `trace`'s columns.
    pub fn text(&mut self, buf: &mut Vec<u8>, line: &TraceLine<'_>) {
        let t = line.t;
        let part = SocketPart {
            skaddr: t.skaddr,
            owner: line.owner,
            cgroup: None,
            family: t.family,
            local: &t.local,
            remote: &t.remote,
        };
        let mut cells = self.text_up_to_transition(buf, t.ts_ns, &part);
        cells.buf.extend_from_slice(t.old.name().as_bytes());
        cells.buf.extend_from_slice(b" -> ");
        cells.buf.extend_from_slice(t.new.name().as_bytes());
        cells.next();
        cells.last(|buf| push_delta_text(buf, line.delta_ns));
    }

    /// A reset or retransmission in `trace`'s columns; a reset sent ends
    /// with its reason in words.
    pub fn event_text(&mut self, buf: &mut Vec<u8>, line: &TraceEventLine<'_>) {
        let start = buf.len();
        let part = SocketPart {
            skaddr: line.skaddr,
            owner: line.owner,
            cgroup: None,
            family: line.family,
            local: &line.local,
            remote: &line.remote,
        };
        let mut cells = self.text_up_to_transition(buf, line.ts_ns, &part);
        cells.buf.extend_from_slice(line.what.text().as_bytes());
        cells.next();
        cells.last(|buf| push_delta_text(buf, line.delta_ns));
        if line.what == EventKind::ResetSent {
            // Past the last column: the words do not fit one.
            let pad = TRACE_COLUMNS.iter().map(|c| c.width + 1).sum::<usize>();
            let len = buf.len() - start;
            buf.resize(buf.len() + pad.saturating_sub(len), b' ');
            let _ = write!(buf, "{}", reset::explain(line.reason));
        }
    }

    /// The columns every text line has, up to the TRANSITION column: the
    /// time, then the socket's (PID to REMOTE).
    fn text_up_to_transition<'b>(
        &mut self,
        buf: &'b mut Vec<u8>,
        ts_ns: u64,
        part: &SocketPart<'_>,
    ) -> Cells<'b> {
        let mut cells = Cells::start(buf, &TRACE_COLUMNS, 0);
        self.stamps.text(cells.buf, ts_ns);
        cells.next();
        self.text_sockets.push(cells.buf, part, |buf, p| {
            let mut cells = Cells::start(buf, &TRACE_COLUMNS, 1);
            match p.owner {
                Some(a) => push_u64(cells.buf, u64::from(a.owner.pid)),
                None => cells.buf.push(b'-'),
            }
            cells.next();
            match p.owner {
                Some(a) => cells.buf.extend_from_slice(a.owner.comm.as_bytes()),
                None => cells.buf.push(b'-'),
            }
            cells.next();
            push_endpoint(cells.buf, p.local);
            cells.next();
            push_endpoint(cells.buf, p.remote);
            cells.next();
        });
        Cells::start(buf, &TRACE_COLUMNS, 5)
    }

    /// A transition as one JSON object.
    pub fn json(&mut self, buf: &mut Vec<u8>, line: &TraceLine<'_>) {
        let t = line.t;
        self.json_socket(
            buf,
            t.ts_ns,
            &SocketPart {
                skaddr: t.skaddr,
                owner: line.owner,
                cgroup: line.cgroup,
                family: t.family,
                local: &t.local,
                remote: &t.remote,
            },
        );
        buf.extend_from_slice(b",\"old\":\"");
        buf.extend_from_slice(t.old.name().as_bytes());
        buf.extend_from_slice(b"\",\"new\":\"");
        buf.extend_from_slice(t.new.name().as_bytes());
        buf.push(b'"');
        json_tail(buf, line.delta_ns, t.sock.netns, t.cpu);
    }

    /// A reset or retransmission as one JSON object: the fields of a
    /// transition's, with `event` for `old` and `new` and, for a reset
    /// sent, `state`, `reset_reason` and `reset_words`.
    pub fn event_json(&mut self, buf: &mut Vec<u8>, line: &TraceEventLine<'_>) {
        self.json_socket(
            buf,
            line.ts_ns,
            &SocketPart {
                skaddr: line.skaddr,
                owner: line.owner,
                cgroup: line.cgroup,
                family: line.family,
                local: &line.local,
                remote: &line.remote,
            },
        );
        buf.extend_from_slice(b",\"event\":\"");
        buf.extend_from_slice(line.what.name().as_bytes());
        buf.push(b'"');
        if line.what == EventKind::ResetSent {
            // The sender's state (`null`: no socket), the kernel's reason
            // by name (`null`: the kernel does not say) and in words.
            buf.extend_from_slice(b",\"state\":");
            push_json(buf, &line.state.map(|s| s.name()));
            buf.extend_from_slice(b",\"reset_reason\":");
            push_json(buf, &line.reason.map(|r| r.name()));
            buf.extend_from_slice(b",\"reset_words\":");
            match line.reason {
                Some(r) => push_json(buf, &*r.words()),
                None => push_json(buf, reset::UNKNOWN_REASON),
            }
        }
        json_tail(buf, line.delta_ns, line.netns, line.cpu);
    }

    /// `{` and the fields every JSON line has, from `ts` to `dport`.
    fn json_socket(&mut self, buf: &mut Vec<u8>, ts_ns: u64, part: &SocketPart<'_>) {
        buf.extend_from_slice(b"{\"ts\":\"");
        self.stamps.rfc3339(buf, ts_ns);
        buf.extend_from_slice(b"\",\"ts_mono_ns\":");
        push_u64(buf, ts_ns);
        self.json_sockets.push(buf, part, json_socket_fields);
    }
}

/// Writes the date and time of lines: each second's text is worked out
/// once for every line stamped within it.
pub(super) struct Stamps {
    clock: Clock,
    zone: Zone,
    rfc3339: SecondText,
    stamp: SecondText,
}

impl Stamps {
    pub(super) fn new(clock: Clock, zone: Zone) -> Stamps {
        Stamps {
            clock,
            zone,
            rfc3339: SecondText::default(),
            stamp: SecondText::default(),
        }
    }

    /// `2026-11-23T23:41:07.123456789Z`, as [`Clock::rfc3339`] writes it.
    pub(super) fn rfc3339(&mut self, buf: &mut Vec<u8>, mono_ns: u64) {
        let (second, nanos) = since_epoch(self.clock.wall(mono_ns));
        let whole = self.rfc3339.get(second, ".000000000Z", |t| {
            humantime::format_rfc3339_nanos(t).to_string()
        });
        match whole {
            Some(whole) => {
                buf.extend_from_slice(whole.as_bytes());
                buf.push(b'.');
                push_digits(buf, nanos, 9);
                buf.push(b'Z');
            }
            None => buf.extend_from_slice(self.clock.rfc3339(mono_ns).as_bytes()),
        }
    }

    /// `2026-11-23 23:41:07.123456` in the zone, as [`Clock::text`]
    /// writes it.
    pub(super) fn text(&mut self, buf: &mut Vec<u8>, mono_ns: u64) {
        let (second, nanos) = since_epoch(self.clock.wall(mono_ns));
        let zone = self.zone;
        let whole = (second >= EARLIEST_FAST_S)
            .then(|| self.stamp.get(second, ".000000", |t| zone.stamp(t)))
            .flatten();
        match whole {
            Some(whole) => {
                buf.extend_from_slice(whole.as_bytes());
                buf.push(b'.');
                push_digits(buf, nanos / 1000, 6);
            }
            None => buf.extend_from_slice(self.clock.text(mono_ns, zone).as_bytes()),
        }
    }
}

/// The JSON fields of a line's socket, `skaddr` to `dport`, each after a
/// comma.
fn json_socket_fields(buf: &mut Vec<u8>, p: &SocketPart<'_>) {
    let owner = p.owner.map(|a| &a.owner);
    buf.extend_from_slice(b",\"skaddr\":\"0x");
    push_hex(buf, p.skaddr);
    buf.extend_from_slice(b"\",\"pid\":");
    match owner {
        Some(o) => push_u64(buf, u64::from(o.pid)),
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"comm\":");
    match owner {
        Some(o) => push_json(buf, o.comm.as_str()),
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"cgroup\":");
    push_json(buf, &cgroup_of(owner.map(|o| &**o), p.cgroup));
    buf.extend_from_slice(b",\"owner_source\":");
    match p.owner {
        Some(a) => {
            buf.push(b'"');
            buf.extend_from_slice(source_name(a.source).as_bytes());
            buf.push(b'"');
        }
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"family\":\"");
    buf.extend_from_slice(p.family.name().as_bytes());
    buf.extend_from_slice(b"\",\"saddr\":\"");
    push_ip(buf, p.local.addr);
    buf.extend_from_slice(b"\",\"sport\":");
    push_u64(buf, u64::from(p.local.port));
    buf.extend_from_slice(b",\"daddr\":\"");
    push_ip(buf, p.remote.addr);
    buf.extend_from_slice(b"\",\"dport\":");
    push_u64(buf, u64::from(p.remote.port));
}

/// The fields every JSON line ends with, and `}`.
fn json_tail(buf: &mut Vec<u8>, delta_ns: Option<u64>, netns: Option<u32>, cpu: u32) {
    buf.extend_from_slice(b",\"delta_ms\":");
    match delta_ns {
        Some(ns) => push_ms_json(buf, ns),
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"netns\":");
    match netns {
        Some(n) => push_u64(buf, u64::from(n)),
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"cpu\":");
    push_u64(buf, u64::from(cpu));
    buf.push(b'}');
}

/// Whole seconds and nanoseconds since the epoch (`wall` is never before
/// it).
fn since_epoch(wall: SystemTime) -> (u64, u32) {
    let d = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

/// One value as `serde_json` writes it. Writing to a `Vec` cannot fail,
/// and strings, numbers, options and cgroups always serialize.
pub(super) fn push_json<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(&mut *buf, value);
}

/// "00" to "99".
const DIGIT_PAIRS: [u8; 200] = {
    let mut pairs = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        pairs[2 * i] = b'0' + (i / 10) as u8;
        pairs[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    pairs
};

/// `n` in decimal, as `Display` writes it (two digits at a time).
pub(super) fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    while n >= 100 {
        let pair = 2 * (n % 100) as usize;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = 2 * n as usize;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    buf.extend_from_slice(&digits[at..]);
}

/// `n` in lower-case hex without leading zeros, as `{:x}` writes it.
pub(super) fn push_hex(buf: &mut Vec<u8>, n: u64) {
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        buf.push(b"0123456789abcdef"[((n >> (4 * i)) & 0xf) as usize]);
    }
}

/// `n` in `width` decimal digits with leading zeros (`n` fits them).
fn push_digits(buf: &mut Vec<u8>, mut n: u32, width: usize) {
    let start = buf.len();
    buf.resize(start + width, b'0');
    for d in buf[start..].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// An address as `Display` writes it: IPv4 by hand, IPv6 (with its
/// shortening rules) through `Display`.
pub(super) fn push_ip(buf: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                push_u64(buf, u64::from(octet));
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(buf, "{addr}");
        }
    }
}

/// An endpoint as `Display` writes it: `127.0.0.1:80`, `[::1]:80`.
pub(super) fn push_endpoint(buf: &mut Vec<u8>, e: &Endpoint) {
    match e.addr {
        IpAddr::V4(_) => {
            push_ip(buf, e.addr);
            buf.push(b':');
            push_u64(buf, u64::from(e.port));
        }
        IpAddr::V6(_) => {
            let _ = write!(buf, "{}", SocketAddr::new(e.addr, e.port));
        }
    }
}

/// The MS column: milliseconds to the microsecond, as `{:.3}` writes
/// them, or `-`.
fn push_delta_text(buf: &mut Vec<u8>, delta_ns: Option<u64>) {
    match delta_ns {
        Some(ns) => push_ms3(buf, ns),
        None => buf.push(b'-'),
    }
}

/// `ns` in milliseconds with three decimals, the bytes `{:.3}` writes for
/// `ns as f64 / 1e6`. Below 10^15 ns the float is within 1.2e-7 ms of
/// the exact quotient, less than the 1e-6 ms (1 ns) between it and the
/// nearest halfway point unless it is exactly on one: so away from those
/// (and past 10^15) the integer rounding gives the same digits; on them,
/// the float's own digits are written.
pub(super) fn push_ms3(buf: &mut Vec<u8>, ns: u64) {
    let rest = ns % 1000;
    if rest == 500 || ns >= 1_000_000_000_000_000 {
        let _ = write!(buf, "{:.3}", ms(ns));
        return;
    }
    let us = ns / 1000 + u64::from(rest > 500);
    push_u64(buf, us / 1000);
    buf.push(b'.');
    push_digits(buf, (us % 1000) as u32, 3);
}

/// `ns` in milliseconds as `serde_json` writes `ns as f64 / 1e6`: the
/// shortest digits that read back as the same float. From 1 µs to
/// 10^15 ns those are the quotient's own decimal digits (at most 15
/// significant ones, which any other decimal as short or shorter misses
/// by more than the float's spacing), written here; elsewhere
/// `serde_json` writes them.
pub(super) fn push_ms_json(buf: &mut Vec<u8>, ns: u64) {
    if !(1_000..1_000_000_000_000_000).contains(&ns) {
        push_json(buf, &ms(ns));
        return;
    }
    push_u64(buf, ns / 1_000_000);
    buf.push(b'.');
    let mut fraction = (ns % 1_000_000) as u32;
    if fraction == 0 {
        buf.push(b'0');
        return;
    }
    let mut width = 6;
    while fraction.is_multiple_of(10) {
        fraction /= 10;
        width -= 1;
    }
    push_digits(buf, fraction, width);
}

/// The cells of a text line being written: each cell is padded to its
/// column's width (in characters, as `{:<w$}` counts them) and one space
/// goes between cells.
pub(super) struct Cells<'a> {
    pub(super) buf: &'a mut Vec<u8>,
    columns: &'static [Column],
    column: usize,
    cell_start: usize,
}

impl<'a> Cells<'a> {
    /// Cells from `column` on, the first starting at the end of `buf`.
    pub(super) fn start(
        buf: &'a mut Vec<u8>,
        columns: &'static [Column],
        column: usize,
    ) -> Cells<'a> {
        let cell_start = buf.len();
        Cells {
            buf,
            columns,
            column,
            cell_start,
        }
    }

    /// Pads the cell just written and starts the next one.
    pub(super) fn next(&mut self) {
        self.pad();
        self.buf.push(b' ');
        self.column += 1;
        self.cell_start = self.buf.len();
    }

    /// Writes the last cell. It is never blank, so the padding a table
    /// line trims off its end is not written at all.
    pub(super) fn last(self, write: impl FnOnce(&mut Vec<u8>)) {
        debug_assert_eq!(self.column + 1, self.columns.len());
        write(self.buf);
    }

    fn pad(&mut self) {
        let Some(column) = self.columns.get(self.column) else {
            return;
        };
        let cell = &self.buf[self.cell_start..];
        // Characters: every byte but UTF-8's continuation bytes.
        let chars = cell.iter().filter(|&&b| b & 0xc0 != 0x80).count();
        let pad = column.width.saturating_sub(chars);
        self.buf.resize(self.buf.len() + pad, b' ');
        if column.right {
            self.buf[self.cell_start..].rotate_right(pad);
        }
    }
}

/// The bytes a writer wrote, as text (every part written is a `str`).
pub(super) fn into_string(buf: Vec<u8>) -> String {
    String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

pub fn trace_text(line: &TraceLine<'_>, clock: &Clock, zone: Zone) -> String {
    let mut buf = Vec::new();
    TraceWriter::new(*clock, zone).text(&mut buf, line);
    into_string(buf)
}

/// A reset or retransmission in `trace`'s columns; a reset sent ends with
/// its reason in words.
pub fn trace_event_text(line: &TraceEventLine<'_>, clock: &Clock, zone: Zone) -> String {
    let mut buf = Vec::new();
    TraceWriter::new(*clock, zone).event_text(&mut buf, line);
    into_string(buf)
}

pub fn trace_json(line: &TraceLine<'_>, clock: &Clock) -> String {
    let mut buf = Vec::new();
    TraceWriter::new(*clock, Zone::Utc).json(&mut buf, line);
    into_string(buf)
}

pub fn trace_event_json(line: &TraceEventLine<'_>, clock: &Clock) -> String {
    let mut buf = Vec::new();
    TraceWriter::new(*clock, Zone::Utc).event_json(&mut buf, line);
    into_string(buf)
}
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::decode::tests::state_event;
    use crate::model::decode::{decode, encode, Record};

    fn transition() -> Transition {
        let Record::State(t) = decode(&encode(&state_event(
            0xffff_8881_0000_0040,
            TcpState::SynSent,
            TcpState::Established,
            1_500_000_000,
        )))
        .unwrap() else {
            unreachable!()
        };
        t
    }

    fn clock() -> Clock {
        Clock::with_offset_ns(1_795_392_000 * 1_000_000_000)
    }

    #[test]
    fn text_line_has_all_columns() {
        let t = transition();
        let owner = Attribution {
            owner: Owner {
                pid: 4321,
                comm: "curl".into(),
                cgroup_id: 0,
            }
            .into(),
            source: OwnerSource::Observed,
        };
        let line = trace_text(
            &TraceLine {
                t: &t,
                owner: Some(&owner),
                cgroup: None,
                delta_ns: Some(250_000),
            },
            &clock(),
            Zone::Utc,
        );
        assert!(
            line.starts_with("2026-11-23 00:00:01.500000 4321    curl "),
            "{line}"
        );
        assert!(line.contains("127.0.0.1:40000"), "{line}");
        assert!(line.contains("127.0.0.2:8080"), "{line}");
        assert!(line.contains("SYN_SENT -> ESTABLISHED"), "{line}");
        assert!(line.ends_with(" 0.250"), "{line}");
        // Columns line up with the header.
        let header = trace_header(Zone::Utc);
        assert!(header.starts_with("TIME(UTC) "), "{header}");
        assert_eq!(line.find("127.0.0.1"), header.find("LOCAL"));
        assert_eq!(line.find("SYN_SENT"), header.find("TRANSITION"));
        // And with the widest endpoints there are.
        let mut wide = t;
        wide.local = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into();
        wide.remote = wide.local;
        let line = trace_text(
            &TraceLine {
                t: &wide,
                owner: Some(&owner),
                delta_ns: None,
                cgroup: None,
            },
            &clock(),
            Zone::Utc,
        );
        assert_eq!(line.rfind("[ffff:"), header.find("REMOTE"), "{line}");
        assert_eq!(line.find("SYN_SENT"), header.find("TRANSITION"), "{line}");
    }

    #[test]
    fn unknown_owner_prints_dashes_and_json_nulls() {
        let t = transition();
        let line = TraceLine {
            t: &t,
            owner: None,
            cgroup: None,
            delta_ns: None,
        };
        let text = trace_text(&line, &clock(), Zone::Utc);
        assert!(
            text.starts_with("2026-11-23 00:00:01.500000 -       -  "),
            "{text}"
        );
        assert!(text.ends_with(" -"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&trace_json(&line, &clock())).unwrap();
        assert!(v["pid"].is_null());
        assert!(v["comm"].is_null());
        assert!(v["delta_ms"].is_null());
    }

    #[test]
    fn json_has_the_documented_fields() {
        let t = transition();
        let owner = Attribution {
            owner: Owner {
                pid: 7,
                comm: "srv".into(),
                cgroup_id: 99,
            }
            .into(),
            source: OwnerSource::Listener,
        };
        let line = TraceLine {
            t: &t,
            owner: Some(&owner),
            cgroup: None,
            delta_ns: Some(1_234_567),
        };
        let v: serde_json::Value = serde_json::from_str(&trace_json(&line, &clock())).unwrap();
        assert_eq!(v["ts"], "2026-11-23T00:00:01.500000000Z");
        assert_eq!(v["skaddr"], "0xffff888100000040");
        assert_eq!(v["pid"], 7);
        assert_eq!(v["comm"], "srv");
        assert_eq!(v["cgroup"]["id"], 99);
        assert!(v["cgroup"]["path"].is_null());
        let c = Cgroup::new(99, Some("/system.slice/nginx.service"));
        let with_path = TraceLine {
            cgroup: Some(&c),
            ..line
        };
        let v: serde_json::Value = serde_json::from_str(&trace_json(&with_path, &clock())).unwrap();
        assert_eq!(v["cgroup"]["path"], "/system.slice/nginx.service");
        assert_eq!(v["cgroup"]["unit"], "nginx.service");
        assert!(v["cgroup"]["container"].is_null());
        assert_eq!(v["owner_source"], "listener");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["saddr"], "127.0.0.1");
        assert_eq!(v["sport"], 40000);
        assert_eq!(v["daddr"], "127.0.0.2");
        assert_eq!(v["dport"], 8080);
        assert_eq!(v["old"], "SYN_SENT");
        assert_eq!(v["new"], "ESTABLISHED");
        assert!((v["delta_ms"].as_f64().unwrap() - 1.234567).abs() < 1e-9);
    }

    /// What `trace` wrote before [`TraceWriter`]: each cell a `String` in
    /// a table line, and `serde_json` over these structs. The writer must
    /// give the same bytes.
    mod before {
        use std::borrow::Cow;

        use serde::Serialize;

        use super::super::*;
        use crate::views::table_line;

        fn cells(
            ts_ns: u64,
            owner: Option<&Attribution>,
            local: &Endpoint,
            remote: &Endpoint,
            what: String,
            delta_ns: Option<u64>,
            (clock, zone): (&Clock, Zone),
        ) -> String {
            let (pid, comm) = match owner {
                Some(a) => (a.owner.pid.to_string(), a.owner.comm.as_str()),
                None => ("-".to_string(), "-"),
            };
            table_line(
                &TRACE_COLUMNS,
                &[
                    clock.text(ts_ns, zone),
                    pid,
                    comm.to_string(),
                    local.to_string(),
                    remote.to_string(),
                    what,
                    delta_ns.map_or_else(|| "-".to_string(), |d| format!("{:.3}", ms(d))),
                ],
            )
        }

        pub fn text(line: &TraceLine<'_>, clock: &Clock, zone: Zone) -> String {
            let t = line.t;
            let what = format!("{} -> {}", t.old, t.new);
            cells(
                t.ts_ns,
                line.owner,
                &t.local,
                &t.remote,
                what,
                line.delta_ns,
                (clock, zone),
            )
        }

        pub fn event_text(line: &TraceEventLine<'_>, clock: &Clock, zone: Zone) -> String {
            let what = line.what.text().to_string();
            let mut text = cells(
                line.ts_ns,
                line.owner,
                &line.local,
                &line.remote,
                what,
                line.delta_ns,
                (clock, zone),
            );
            if line.what == EventKind::ResetSent {
                let pad = TRACE_COLUMNS.iter().map(|c| c.width + 1).sum::<usize>();
                let w = pad.saturating_sub(text.len());
                text = format!("{text}{:w$}{}", "", reset::explain(line.reason));
            }
            text
        }

        #[derive(Serialize)]
        struct TraceEventJson<'a> {
            ts: String,
            ts_mono_ns: u64,
            skaddr: String,
            pid: Option<u32>,
            comm: Option<&'a str>,
            cgroup: Option<Cow<'a, Cgroup>>,
            owner_source: Option<&'static str>,
            family: &'static str,
            saddr: String,
            sport: u16,
            daddr: String,
            dport: u16,
            event: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            state: Option<Option<&'static str>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reset_reason: Option<Option<Cow<'static, str>>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reset_words: Option<String>,
            delta_ms: Option<f64>,
            netns: Option<u32>,
            cpu: u32,
        }

        pub fn event_json(line: &TraceEventLine<'_>, clock: &Clock) -> String {
            let owner = line.owner.map(|a| &a.owner);
            let sent = line.what == EventKind::ResetSent;
            let j = TraceEventJson {
                ts: clock.rfc3339(line.ts_ns),
                ts_mono_ns: line.ts_ns,
                skaddr: format!("{:#x}", line.skaddr),
                pid: owner.map(|o| o.pid),
                comm: owner.map(|o| o.comm.as_str()),
                cgroup: cgroup_of(owner.map(|o| &**o), line.cgroup),
                owner_source: line.owner.map(|a| source_name(a.source)),
                family: line.family.name(),
                saddr: line.local.addr.to_string(),
                sport: line.local.port,
                daddr: line.remote.addr.to_string(),
                dport: line.remote.port,
                event: line.what.name(),
                state: sent.then(|| line.state.map(|s| s.name())),
                reset_reason: sent.then(|| line.reason.map(|r| r.name())),
                reset_words: sent.then(|| {
                    line.reason
                        .map_or_else(|| reset::UNKNOWN_REASON.into(), |r| r.words().into_owned())
                }),
                delta_ms: line.delta_ns.map(ms),
                netns: line.netns,
                cpu: line.cpu,
            };
            serde_json::to_string(&j).unwrap()
        }

        #[derive(Serialize)]
        struct TraceJson<'a> {
            ts: String,
            ts_mono_ns: u64,
            skaddr: String,
            pid: Option<u32>,
            comm: Option<&'a str>,
            cgroup: Option<Cow<'a, Cgroup>>,
            owner_source: Option<&'static str>,
            family: &'static str,
            saddr: String,
            sport: u16,
            daddr: String,
            dport: u16,
            old: &'static str,
            new: &'static str,
            delta_ms: Option<f64>,
            netns: Option<u32>,
            cpu: u32,
        }

        pub fn json(line: &TraceLine<'_>, clock: &Clock) -> String {
            let t = line.t;
            let owner = line.owner.map(|a| &a.owner);
            let j = TraceJson {
                ts: clock.rfc3339(t.ts_ns),
                ts_mono_ns: t.ts_ns,
                skaddr: format!("{:#x}", t.skaddr),
                pid: owner.map(|o| o.pid),
                comm: owner.map(|o| o.comm.as_str()),
                cgroup: cgroup_of(owner.map(|o| &**o), line.cgroup),
                owner_source: line.owner.map(|a| source_name(a.source)),
                family: t.family.name(),
                saddr: t.local.addr.to_string(),
                sport: t.local.port,
                daddr: t.remote.addr.to_string(),
                dport: t.remote.port,
                old: t.old.name(),
                new: t.new.name(),
                delta_ms: line.delta_ns.map(ms),
                netns: t.sock.netns,
                cpu: t.cpu,
            };
            serde_json::to_string(&j).unwrap()
        }
    }

    /// A small deterministic generator for the cases below.
    pub(in crate::views) struct Lcg(pub(in crate::views) u64);

    impl Lcg {
        pub(in crate::views) fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 11
        }

        pub(in crate::views) fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
            &from[self.next() as usize % from.len()]
        }
    }

    /// Every kind of line, with owners, cgroups, addresses, times and
    /// deltas of every shape, written by one writer (its second caches in
    /// play) gives the bytes the code before it gave.
    #[test]
    fn lines_are_the_bytes_serde_and_table_line_wrote() {
        let owner = |pid, comm: &str, cgroup_id, source| Attribution {
            owner: Owner {
                pid,
                comm: comm.into(),
                cgroup_id,
            }
            .into(),
            source,
        };
        let owners = [
            None,
            Some(owner(4321, "curl", 0, OwnerSource::Observed)),
            Some(owner(1, "nginx \"w\\1\"", 99, OwnerSource::Listener)),
            Some(owner(u32::MAX, "héllo wörld", 7, OwnerSource::Procfs)),
            Some(owner(
                77,
                "a-very-long-comm-name-past-15",
                1,
                OwnerSource::Observed,
            )),
        ];
        let c = Cgroup::new(99, Some("/system.slice/nginx.service"));
        let cgroups = [None, Some(&c)];
        let endpoints: Vec<Endpoint> = [
            "127.0.0.1:40000",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.1.20.3:8",
            "[::1]:80",
            "[::ffff:10.0.0.1]:443",
            "[fe80::1:0:0:2]:9",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        ]
        .iter()
        .map(|s| s.parse::<SocketAddr>().unwrap().into())
        .collect();
        let deltas = [
            None,
            Some(0),
            Some(1),
            Some(499),
            Some(500),
            Some(501),
            Some(1_500),
            Some(2_500),
            Some(999_999_500),
            Some(1_234_567),
            Some(3_902),
            Some(u64::MAX),
        ];
        let reasons = [None, Some(ResetReason::NO_SOCKET), Some(ResetReason(200))];
        let states = [None, Some(TcpState::Close)];
        let kinds = [
            EventKind::ResetSent,
            EventKind::ResetReceived,
            EventKind::Retransmit,
        ];
        let clocks = [clock(), Clock::with_offset_ns(-5_000_000_000)];
        let mut r = Lcg(13);
        for clock in clocks {
            for zone in [Zone::Utc, Zone::Local] {
                let mut w = TraceWriter::new(clock, zone);
                let mut ts = 0u64;
                let mut socket = (0, endpoints[0], endpoints[0], None, None);
                for i in 0..4000 {
                    // Mostly within one second, now and then past it.
                    ts += match r.next() % 8 {
                        0 => r.next() % 5_000_000_000,
                        7 if i % 500 == 0 => u64::MAX / 2,
                        _ => r.next() % 50_000,
                    };
                    ts %= u64::MAX / 2;
                    let mut t = transition();
                    t.ts_ns = ts;
                    // Half the lines are of the socket before (as a
                    // socket's lines follow each other), now and then
                    // with an owner of its own.
                    if r.next().is_multiple_of(2) {
                        socket = (
                            *r.pick(&[0, 1, 0xffff_8881_0000_0040, u64::MAX]),
                            *r.pick(&endpoints),
                            *r.pick(&endpoints),
                            r.pick(&owners).as_ref(),
                            *r.pick(&cgroups),
                        );
                    } else if r.next().is_multiple_of(8) {
                        socket.3 = r.pick(&owners).as_ref();
                    }
                    let (skaddr, local, remote, owner, cgroup) = socket;
                    t.skaddr = skaddr;
                    t.local = local;
                    t.remote = remote;
                    t.old = *r.pick(&TcpState::ALL);
                    t.new = *r.pick(&TcpState::ALL);
                    t.sock.netns = *r.pick(&[None, Some(4_026_531_833)]);
                    t.cpu = r.next() as u32 % 64;
                    let delta_ns = match r.next() % 3 {
                        0 => Some(r.next() % (1 << 40)),
                        _ => *r.pick(&deltas),
                    };
                    let line = TraceLine {
                        t: &t,
                        owner,
                        cgroup,
                        delta_ns,
                    };
                    let mut buf = Vec::new();
                    w.text(&mut buf, &line);
                    assert_eq!(into_string(buf), before::text(&line, &clock, zone));
                    let mut buf = Vec::new();
                    w.json(&mut buf, &line);
                    assert_eq!(into_string(buf), before::json(&line, &clock));
                    let event = TraceEventLine {
                        what: *r.pick(&kinds),
                        ts_ns: ts,
                        skaddr: t.skaddr,
                        family: *r.pick(&[Family::V4, Family::V6]),
                        local: t.local,
                        remote: t.remote,
                        owner,
                        cgroup: line.cgroup,
                        delta_ns: line.delta_ns,
                        reason: *r.pick(&reasons),
                        state: *r.pick(&states),
                        netns: t.sock.netns,
                        cpu: t.cpu,
                    };
                    let mut buf = Vec::new();
                    w.event_text(&mut buf, &event);
                    assert_eq!(into_string(buf), before::event_text(&event, &clock, zone));
                    let mut buf = Vec::new();
                    w.event_json(&mut buf, &event);
                    assert_eq!(into_string(buf), before::event_json(&event, &clock));
                }
            }
        }
    }

    #[test]
    fn milliseconds_are_the_digits_of_the_float() {
        let mut r = Lcg(7);
        let check = |ns: u64| {
            let mut buf = Vec::new();
            push_ms3(&mut buf, ns);
            assert_eq!(into_string(buf), format!("{:.3}", ms(ns)), "{ns}");
        };
        for ns in (0..5_000_000)
            .step_by(7)
            .chain([u64::MAX, 999_999_999_999_999])
        {
            check(ns);
        }
        for _ in 0..200_000 {
            let bits = r.next() % 60;
            check(r.next() % (1 << bits).max(1));
        }
    }

    #[test]
    fn json_milliseconds_are_serde_jsons() {
        let mut r = Lcg(11);
        let check = |ns: u64| {
            let mut buf = Vec::new();
            push_ms_json(&mut buf, ns);
            assert_eq!(
                into_string(buf),
                serde_json::to_string(&ms(ns)).unwrap(),
                "{ns}"
            );
        };
        let edges = [0, 1, 999, 1_000, 1_001, 1_000_000, 2_000_000, 10_000_000];
        let tops = (0..40).map(|i| 1_000_000_000_000_000 - i);
        for ns in (0..3_000_000).step_by(3).chain(edges).chain(tops) {
            check(ns);
        }
        for _ in 0..300_000 {
            let bits = r.next() % 64;
            check(r.next() % (1u64 << bits).max(1));
            // Round numbers, where trailing zeros are cut.
            check((r.next() % 1_000_000_000) * 10u64.pow((r.next() % 7) as u32));
        }
    }
}
