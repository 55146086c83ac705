//! The commands: each builds its consumer of the event stream from the
//! stream's context and says what it saw when the stream ends. [`run`] is
//! the one path every command that reads events takes, live or from a
//! recording.

pub mod bench;
pub mod conns;
pub mod record;
pub mod timewait;
pub mod top;
pub mod trace;

use std::path::PathBuf;
use std::sync::Arc;

use crate::host::cgroup::Cgroups;
use crate::model::cgroup::Cgroup;
use crate::model::filter::Filter;
use crate::model::{Endpoint, Family, Owner};
use crate::stream::context::Context;
use crate::stream::error::StreamError;
use crate::stream::pipeline::Consumer;
use crate::stream::session::{self, SessionOptions};
use crate::views::Format;

/// Where a command's events come from.
pub enum Source {
    /// The kernel, through a probe this process loads.
    Live(SessionOptions),
    /// A file written by `tcpwatch record`.
    Recording(PathBuf),
}

/// Builds the consumer once the stream's context is known, runs the stream
/// through it, prints its exit summary in `summary` format, and says how
/// the stream ended.
pub async fn run<C: Consumer>(
    source: Source,
    summary: Format,
    build: impl FnOnce(&Context) -> Result<C, StreamError>,
) -> Result<(), StreamError> {
    let ended = match source {
        Source::Live(opts) => session::run(opts, build).await?,
        Source::Recording(path) => crate::stream::replay::run_file(&path, build)?,
    };
    ended.summary().print(summary);
    ended.result()
}

/// The user's filter with what it needs from the host: the paths of the
/// owners' cgroups (for `--cgroup`, and for the JSON that shows them).
pub struct Selector {
    pub filter: Filter,
    /// `None` for a replay: its cgroup ids are another time's (perhaps
    /// another host's), so no path is looked up for them.
    cgroups: Option<Cgroups>,
}

impl Selector {
    /// The filter for a stream described by `ctx`.
    pub fn new(filter: Filter, ctx: &Context) -> Selector {
        Selector {
            filter,
            cgroups: ctx.live_since_ns().map(|_| Cgroups::new()),
        }
    }

    /// Whether a socket with these endpoints and owner is wanted.
    pub fn matches(
        &mut self,
        family: Family,
        local: &Endpoint,
        remote: &Endpoint,
        owner: Option<&Owner>,
    ) -> bool {
        self.filter.matches(family, local, remote, owner)
            && (self.filter.cgroups.is_empty() || {
                let path = owner.and_then(|o| self.cgroups.as_mut()?.path(o.cgroup_id));
                self.filter.matches_cgroup(path.as_deref())
            })
    }

    /// The owner's cgroup, with its path when there is one.
    pub fn cgroup(&mut self, owner: Option<&Owner>) -> Option<Arc<Cgroup>> {
        owner.and_then(|o| self.cgroup_of_id(o.cgroup_id))
    }

    /// The cgroup with this id (`None` for 0).
    pub fn cgroup_of_id(&mut self, id: u64) -> Option<Arc<Cgroup>> {
        self.cgroups.as_mut()?.get(id)
    }
}
