//! The kernel side as userspace sees it: what the eBPF program needs to know
//! about this kernel (BTF offsets, tracefs), loading and attaching it, and
//! draining its ring buffer.
//!
//! BTF offsets are passed to the program in a config map because Rust eBPF
//! under aya has no CO-RE relocation of field reads yet; when it does, the
//! `btf` layer can go.

pub mod btf;
pub mod probe;
pub mod ringbuf;
pub mod tracefs;
