//! tcpwatch: a TCP connection-lifecycle tracer.
//!
//! The modules follow the data as it flows: `tracefs` and `btf` find what the
//! kernel program needs to know, `probe` loads and attaches it, `ringbuf`
//! drains the ring buffer, `decode` turns records into transitions, `owner`
//! attributes sockets to processes (with `procfs` for sockets older than the
//! trace), `filter` keeps what the user asked for, and `output` writes it.

pub mod btf;
pub mod model;
pub mod procfs;
