//! The kernel side as userspace sees it: what the eBPF program needs to know
//! about this kernel (BTF offsets, tracefs), loading and attaching it,
//! draining its ring buffer, and its own diagnostics (aya-log).
//!
//! Why the BTF layer exists: the program reads socket fields (`tcp_sock`
//! counters, `sk_err`, the namespace) whose offsets change from kernel to
//! kernel. A C program would let libbpf relocate those reads (CO-RE); Rust
//! eBPF under aya has no CO-RE relocation of field reads yet, so userspace
//! reads the offsets from the running kernel's BTF and passes them to the
//! program in its config. When aya gains CO-RE for Rust programs, `btf`
//! and the offsets in `tcpwatch_common::SockOffsets` can go.

pub mod btf;
pub mod diagnostics;
pub mod probe;
pub mod ringbuf;
pub mod ringmap;
pub mod tracefs;
