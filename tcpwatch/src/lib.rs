//! tcpwatch: a TCP connection-lifecycle tracer.
//!
//! The folders follow the data as it flows:
//! - `kernel`: BTF offsets and tracefs for the eBPF program, loading and
//!   attaching it, draining its ring buffer;
//! - `host`: facts read from the running host (/proc, sock_diag, kernel
//!   counters, the clock);
//! - `model`: the pure core, no I/O: events and their decoding, filters,
//!   socket owners, the correlator that builds timelines, TIME_WAIT
//!   accounting, sweep decisions, bounded tables;
//! - `stream`: the live session, recording and replay;
//! - `views`: text, JSON and ladder output;
//! - `commands`: trace, conns/ladder, timewait, bench;
//! - `daemon`: the always-on HTTP service and its client.

pub mod cli;
pub mod commands;
pub mod daemon;
pub mod host;
pub mod kernel;
pub mod model;
pub mod stream;
pub mod views;
