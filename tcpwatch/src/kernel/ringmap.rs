//! The ring buffer's memory, mapped once.
//!
//! The kernel lays a BPF ring buffer's data pages out twice in a row in its
//! own address space, so that a record running past the end reads on
//! contiguously, and lets a reader map them twice too; libbpf and aya's
//! `RingBuf` do. Each mapping of a page counts in the process's RSS, so a
//! 16 MiB ring showed as 32 MiB of tcpwatch's resident memory (the kernel
//! holds it once). Here the data pages are mapped once: a record that runs
//! past the end (rare: records are a few hundred bytes) is copied into a
//! buffer of its own. The protocol is the kernel's (`kernel/bpf/ringbuf.c`)
//! and libbpf's (`ringbuf_process_ring`): an 8-byte header per record whose
//! length has a busy bit (reserved, not yet committed) and a discard bit,
//! records 8-byte aligned, the consumer position published with a release
//! store once a record has been read.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use aya::maps::{MapData, MapError};

/// `BPF_RINGBUF_BUSY_BIT`, `BPF_RINGBUF_DISCARD_BIT`, `BPF_RINGBUF_HDR_SZ`.
const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HDR_SZ: usize = 8;

/// A shared mapping of part of the map's memory.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, prot: i32, offset: usize) -> Result<Self, MapError> {
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // the offset and length against the ring's memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "mmap",
                io_error: std::io::Error::last_os_error(),
            }));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "mmap",
                io_error: std::io::Error::other("mmap returned a null pointer"),
            })
        })?;
        Ok(Mapping { ptr, len })
    }

    /// The position word at the start of the mapping.
    fn pos(&self) -> &AtomicUsize {
        // SAFETY: the mapping is at least a page, page aligned, and the
        // kernel keeps an unsigned long position at its start.
        unsafe { self.ptr.cast::<AtomicUsize>().as_ref() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; nothing borrows it any
        // more (borrows are tied to the ring's lifetime).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

// SAFETY: the mappings are plain shared memory, read through atomics and
// raw slices only by the one owner of the ring.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

/// The EVENTS ring buffer, read record by record.
pub struct EventRing {
    map: MapData,
    view: RingView,
}

/// The ring's memory and where the reader is in it.
struct RingView {
    /// The consumer position page (read-write).
    consumer: Mapping,
    /// The producer position page followed by the data pages, once.
    producer: Mapping,
    /// Data bytes (a power of two).
    size: usize,
    /// Where the next record starts, and what the producer had reached.
    pos: usize,
    producer_pos: usize,
    /// A record that ran past the end of the data pages, put together.
    wrapped: Vec<u8>,
}

impl EventRing {
    /// Maps the ring buffer map `map` of `size` data bytes.
    pub fn new(map: MapData, size: u32) -> Result<Self, MapError> {
        let page = page_size();
        let size = size as usize;
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + size, libc::PROT_READ, page)?;
        Ok(EventRing {
            map,
            view: RingView::new(consumer, producer, size),
        })
    }

    /// The next committed record; `None` when the ring is empty or the
    /// next record is still being written. The record's space is handed
    /// back to the kernel when the item is dropped.
    pub fn next_record(&mut self) -> Option<RingItem<'_>> {
        self.view.next_record()
    }
}

impl RingView {
    fn new(consumer: Mapping, producer: Mapping, size: usize) -> Self {
        let pos = consumer.pos().load(Ordering::Acquire);
        let producer_pos = producer.pos().load(Ordering::Acquire);
        RingView {
            consumer,
            producer,
            size,
            pos,
            producer_pos,
            wrapped: Vec::new(),
        }
    }

    fn data(&self) -> &[u8] {
        // SAFETY: the data pages follow the producer page in the mapping,
        // `size` bytes; the kernel writes them only ahead of the consumer
        // position, which this reader alone moves.
        unsafe {
            std::slice::from_raw_parts(self.producer.ptr.as_ptr().add(page_size()), self.size)
        }
    }

    fn next_record(&mut self) -> Option<RingItem<'_>> {
        loop {
            if self.pos == self.producer_pos {
                // Our consumer position store must be seen before we read the
                // producer's: the kernel wakes a reader only when it finds
                // the reader caught up, and we go back to sleep on what we
                // read here.
                std::sync::atomic::fence(Ordering::SeqCst);
                self.producer_pos = self.producer.pos().load(Ordering::Acquire);
                if self.pos == self.producer_pos {
                    return None;
                }
            }
            let offset = self.pos & (self.size - 1);
            // SAFETY: records are 8-byte aligned and the header's 8 bytes
            // never run past the end (the size is a multiple of 8).
            let header = unsafe {
                (*self
                    .producer
                    .ptr
                    .as_ptr()
                    .add(page_size() + offset)
                    .cast::<AtomicU32>())
                .load(Ordering::Acquire)
            };
            if header & BUSY_BIT != 0 {
                return None;
            }
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            let next = self.pos + (HDR_SZ + len).next_multiple_of(8);
            if header & DISCARD_BIT != 0 || len > self.size {
                self.pos = next;
                self.consumer.pos().store(next, Ordering::Release);
                continue;
            }
            let start = offset + HDR_SZ;
            let contiguous = start + len <= self.size;
            if !contiguous {
                let mut wrapped = std::mem::take(&mut self.wrapped);
                let data = self.data();
                let (tail, head) = (&data[start.min(self.size)..], data);
                wrapped.clear();
                wrapped.extend_from_slice(tail);
                wrapped.extend_from_slice(&head[..len - tail.len()]);
                self.wrapped = wrapped;
            }
            let RingView {
                consumer,
                producer,
                pos,
                wrapped,
                ..
            } = self;
            let data = if contiguous {
                // SAFETY: within the data pages, as checked above.
                unsafe {
                    std::slice::from_raw_parts(producer.ptr.as_ptr().add(page_size() + start), len)
                }
            } else {
                &wrapped[..]
            };
            return Some(RingItem {
                data,
                consumer,
                pos,
                next,
            });
        }
    }
}

impl AsFd for EventRing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// One record, borrowed from the ring until dropped.
pub struct RingItem<'a> {
    data: &'a [u8],
    consumer: &'a Mapping,
    pos: &'a mut usize,
    next: usize,
}

impl std::ops::Deref for RingItem<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.data
    }
}

impl Drop for RingItem<'_> {
    fn drop(&mut self) {
        *self.pos = self.next;
        self.consumer.pos().store(self.next, Ordering::Release);
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring of `size` data bytes in anonymous memory, written as the
    /// kernel writes one.
    struct FakeKernel {
        view: RingView,
        producer_pos: usize,
    }

    fn anonymous(len: usize) -> Mapping {
        // SAFETY: a fresh anonymous shared mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Mapping {
            ptr: NonNull::new(ptr.cast()).unwrap(),
            len,
        }
    }

    impl FakeKernel {
        fn new(size: usize) -> Self {
            let view = RingView::new(anonymous(page_size()), anonymous(page_size() + size), size);
            FakeKernel {
                view,
                producer_pos: 0,
            }
        }

        fn byte(&self, at: usize) -> *mut u8 {
            let offset = at & (self.view.size - 1);
            // SAFETY: within the data pages.
            unsafe { self.view.producer.ptr.as_ptr().add(page_size() + offset) }
        }

        /// Reserves a record of `data`'s length (busy), writes it and
        /// publishes the producer position; `commit` clears the busy bit,
        /// with `discard` it is discarded instead.
        fn write(&mut self, data: &[u8], commit: bool, discard: bool) -> usize {
            let at = self.producer_pos;
            let header = data.len() as u32
                | if commit { 0 } else { BUSY_BIT }
                | if discard { DISCARD_BIT } else { 0 };
            for (i, b) in data.iter().enumerate() {
                // SAFETY: within the data pages (wrapping).
                unsafe { *self.byte(at + HDR_SZ + i) = *b };
            }
            // SAFETY: 8-byte aligned header within the data pages.
            unsafe { (*self.byte(at).cast::<AtomicU32>()).store(header, Ordering::Release) };
            self.producer_pos += (HDR_SZ + data.len()).next_multiple_of(8);
            self.view
                .producer
                .pos()
                .store(self.producer_pos, Ordering::Release);
            at
        }

        fn commit(&mut self, at: usize, len: usize) {
            // SAFETY: as in `write`.
            unsafe { (*self.byte(at).cast::<AtomicU32>()).store(len as u32, Ordering::Release) };
        }

        fn read_all(&mut self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            while let Some(item) = self.view.next_record() {
                out.push(item.to_vec());
            }
            out
        }
    }

    fn record(n: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| n.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn records_come_out_whole_across_the_end_of_the_data_pages() {
        let size = page_size();
        let mut k = FakeKernel::new(size);
        let mut want = Vec::new();
        // Records of odd lengths, many times around the ring: some wrap
        // in their data, some start right at the end.
        for n in 0..200u8 {
            let len = 1 + (usize::from(n) * 37) % 300;
            let r = record(n, len);
            k.write(&r, true, false);
            want.push(r);
            if n % 3 == 2 {
                assert_eq!(k.read_all(), std::mem::take(&mut want), "record {n}");
                assert_eq!(
                    k.view.consumer.pos().load(Ordering::Acquire),
                    k.producer_pos,
                    "the consumer position is handed back"
                );
            }
        }
        assert_eq!(k.read_all(), want);
        assert!(
            k.producer_pos > 5 * size,
            "went around {}",
            k.producer_pos / size
        );
    }

    #[test]
    fn a_busy_record_stops_the_reader_and_a_discarded_one_is_skipped() {
        let mut k = FakeKernel::new(page_size());
        k.write(&record(1, 10), true, false);
        let busy = k.write(&record(2, 20), false, false);
        k.write(&record(3, 30), true, false);
        assert_eq!(k.read_all(), vec![record(1, 10)]);
        let consumed = k.view.consumer.pos().load(Ordering::Acquire);
        assert_eq!(consumed, busy, "stopped at the busy record");
        k.commit(busy, 20);
        k.write(&record(4, 40), true, true);
        k.write(&record(5, 50), true, false);
        assert_eq!(
            k.read_all(),
            vec![record(2, 20), record(3, 30), record(5, 50)]
        );
        assert!(k.read_all().is_empty());
        assert_eq!(
            k.view.consumer.pos().load(Ordering::Acquire),
            k.producer_pos
        );
    }
}
