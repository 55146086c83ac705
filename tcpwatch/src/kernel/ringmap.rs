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
        let pos = consumer.pos().load(Ordering::Acquire);
        let producer_pos = producer.pos().load(Ordering::Acquire);
        Ok(EventRing {
            map,
            consumer,
            producer,
            size,
            pos,
            producer_pos,
            wrapped: Vec::new(),
        })
    }

    fn data(&self) -> &[u8] {
        // SAFETY: the data pages follow the producer page in the mapping,
        // `size` bytes; the kernel writes them only ahead of the consumer
        // position, which this reader alone moves.
        unsafe {
            std::slice::from_raw_parts(self.producer.ptr.as_ptr().add(page_size()), self.size)
        }
    }

    /// The next committed record; `None` when the ring is empty or the
    /// next record is still being written. The record's space is handed
    /// back to the kernel when the item is dropped.
    pub fn next(&mut self) -> Option<RingItem<'_>> {
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
            let EventRing {
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
