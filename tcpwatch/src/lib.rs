//! tcpwatch: a TCP connection-lifecycle tracer.
//!
//! The folders follow the data as it flows:
//! - `kernel`: BTF offsets and tracefs for the eBPF program, loading and
//!   attaching it, draining its ring buffer;
//! - `host`: facts read from the running host (/proc, sock_diag, kernel
//!   counters, the clock);
//! - `model`: the pure core, no I/O: events and their decoding, reset
//!   reasons, filters,
//!   socket owners, the correlator that builds timelines, TIME_WAIT
//!   accounting, sweep decisions, bounded tables;
//! - `stream`: the event stream: the context every consumer is built from
//!   (live or from a recording), the pipeline's front (decoding, lost
//!   events, the sweep after losses), the live session, recording and
//!   replay;
//! - `views`: text, JSON and ladder output, the screen of `top`, exit
//!   summaries, and how diagnostics look on stderr;
//! - `commands`: the consumers (trace, conns/ladder, timewait, top, record)
//!   and the one path that runs them; bench;
//! - `daemon`: the always-on HTTP service (another consumer) and its
//!   client.

pub mod cli;
pub mod commands;
pub mod daemon;
pub mod host;
pub mod kernel;
pub mod model;
pub mod stream;
pub mod views;
