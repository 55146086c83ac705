//! The event stream between the kernel and the commands, in the order the
//! data flows:
//! - `context`: what a consumer is built from (clock, network namespace,
//!   `tcp_fin_timeout`, the sockets from before tracing), read from the
//!   host once the probe is live, or from a recording's header;
//! - `pipeline`: the front every consumer sits behind: decoding, lost
//!   events, the sweep after losses, the stream's figures;
//! - `session`: a live run (probe, context, consumer, ring buffer);
//! - `record` and `replay`: the stream in a file, and a run from one;
//! - `error`: why a stream could not start or stopped early.

pub mod context;
pub mod error;
pub mod pipeline;
pub mod record;
pub mod replay;
pub mod session;
