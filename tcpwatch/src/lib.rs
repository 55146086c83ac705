//! tcpwatch: a TCP connection-lifecycle tracer.
//!
//! The modules follow the data as it flows:
//! - `tracefs`, `btf`: what the kernel program needs to know about this kernel;
//! - `probe`: loading and attaching it;
//! - `ringbuf`: draining the ring buffer;
//! - `decode`: records into typed events;
//! - `owner` (with `procfs` for sockets older than the trace): which process
//!   a socket belongs to;
//! - `filter`: what the user asked to see;
//! - `output`: text and JSON;
//! - `correlate`: per-socket events into connection timelines;
//! - `record`, `replay`: the raw stream to a file and back;
//! - `session`, `trace`, `conns`: the commands that tie them together.

pub mod btf;
pub mod cli;
pub mod clock;
pub mod conns;
pub mod correlate;
pub mod daemon;
pub mod decode;
pub mod filter;
pub mod host;
pub mod kernelstat;
pub mod model;
pub mod output;
pub mod owner;
pub mod probe;
pub mod procfs;
pub mod record;
pub mod replay;
pub mod report;
pub mod ringbuf;
pub mod selfbench;
pub mod session;
pub mod sockdiag;
pub mod sweep;
pub mod table;
pub mod timewait;
pub mod trace;
pub mod tracefs;
