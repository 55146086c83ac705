//! The commands: each builds its consumer of the event stream and says what
//! it saw when the stream ends.

pub mod bench;
pub mod conns;
pub mod timewait;
pub mod trace;
