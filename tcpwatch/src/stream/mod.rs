//! The event stream between the kernel and the views: a live session, a
//! recording of it, and its replay from a file.

pub mod record;
pub mod replay;
pub mod session;
