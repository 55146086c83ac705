//! cgroup ids to paths. The events carry the cgroup v2 id of the task that
//! was current (`bpf_get_current_cgroup_id`), which is the inode number of
//! the cgroup's directory in the cgroup2 hierarchy; the path, and what it
//! shows (container, unit, pod: [`Cgroup::new`]), come from walking that
//! hierarchy once and mapping inode → path. The map is kept, and walked
//! again when an id is not in it (a cgroup made since), at most once per
//! [`MIN_WALK_GAP`]; an id still not found after a walk (a cgroup already
//! removed) is remembered as unknown until the next walk.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::host::procfs::cgroup2_mount;
use crate::model::cgroup::Cgroup;
use crate::model::FastMap;

/// Least time between two walks of the hierarchy.
pub const MIN_WALK_GAP: Duration = Duration::from_millis(100);

/// Most directories a walk maps (a host has a few hundred to a few
/// thousand cgroups); beyond it the rest stay unknown.
const MAX_CGROUPS: usize = 1 << 18;

/// The cgroup ids seen, with their paths.
#[derive(Default)]
pub struct Cgroups {
    /// Looked up for every event that names a cgroup: a fast hasher.
    known: FastMap<u64, Arc<Cgroup>>,
    /// Ids not found by the last walk.
    missing: HashSet<u64, foldhash::fast::RandomState>,
    last_walk: Option<Instant>,
}

impl Cgroups {
    pub fn new() -> Cgroups {
        Cgroups::default()
    }

    /// The cgroup with this id; `None` for 0 (no cgroup known). An id no
    /// directory has is a cgroup without a path.
    pub fn get(&mut self, id: u64) -> Option<Arc<Cgroup>> {
        if id == 0 {
            return None;
        }
        if let Some(c) = self.known.get(&id) {
            return Some(c.clone());
        }
        let may_walk = !self.missing.contains(&id)
            && self.last_walk.is_none_or(|t| t.elapsed() >= MIN_WALK_GAP);
        if may_walk {
            self.walk();
            if let Some(c) = self.known.get(&id) {
                return Some(c.clone());
            }
            self.missing.insert(id);
        }
        Some(Arc::new(Cgroup::new(id, None)))
    }

    /// The path of the cgroup with this id, if known.
    pub fn path(&mut self, id: u64) -> Option<String> {
        self.get(id).and_then(|c| c.path.clone())
    }

    /// Maps every directory of the cgroup2 hierarchy.
    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        self.missing.clear();
        let Some((root, mount)) = cgroup2_mount() else {
            return;
        };
        let root = root.to_string_lossy();
        let root = root.trim_end_matches('/');
        let mut found: HashMap<u64, String> = HashMap::new();
        let mut stack = vec![(mount.to_path_buf(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            if found.len() >= MAX_CGROUPS {
                break;
            }
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let path = if rel.is_empty() && root.is_empty() {
                "/".to_string()
            } else {
                format!("{root}{rel}")
            };
            found.insert(meta.ino(), path);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = e.file_name();
                    let rel = format!("{rel}/{}", name.to_string_lossy());
                    stack.push((Path::new(&dir).join(name), rel));
                }
            }
        }
        // Cgroups still known keep their entries (and the memory they share).
        self.known.retain(|id, _| found.contains_key(id));
        for (id, path) in found {
            self.known
                .entry(id)
                .or_insert_with(|| Arc::new(Cgroup::new(id, Some(&path))));
        }
    }
}

/// A `--cgroup` argument as a path of the hierarchy: a path under the
/// cgroup2 mount (`/sys/fs/cgroup/unified/a/b`) becomes `/a/b`; any other
/// path is taken as one already.
pub fn hierarchy_path(arg: &str) -> String {
    match cgroup2_mount() {
        Some((root, mount)) => below_mount(arg, &root.to_string_lossy(), mount),
        None => arg.to_string(),
    }
}

fn below_mount(arg: &str, root: &str, mount: &Path) -> String {
    match Path::new(arg).strip_prefix(mount) {
        Ok(rel) if mount != Path::new("/") => {
            let rel = rel.to_string_lossy();
            let path = format!("{}/{}", root.trim_end_matches('/'), rel);
            match path.trim_end_matches('/') {
                "" => "/".to_string(),
                p => p.to_string(),
            }
        }
        _ => arg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_the_mount_become_hierarchy_paths() {
        let m = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            below_mount("/sys/fs/cgroup/unified/a/b.scope", "/", m),
            "/a/b.scope"
        );
        assert_eq!(below_mount("/sys/fs/cgroup/unified/a/", "/", m), "/a");
        assert_eq!(below_mount("/sys/fs/cgroup/unified", "/", m), "/");
        assert_eq!(below_mount("/system.slice", "/", m), "/system.slice");
        assert_eq!(
            below_mount("/sys/fs/cgroup/x", "/", Path::new("/sys/fs/cgroup")),
            "/x"
        );
    }

    /// This process's own cgroup resolves to the path /proc/self/cgroup
    /// gives (where cgroup v2 is mounted).
    #[test]
    fn own_cgroup_resolves_to_its_path() {
        let Some(me) = crate::host::procfs::lookup_owner(std::process::id()) else {
            panic!("cannot read our own /proc entry");
        };
        if me.cgroup_id == 0 {
            eprintln!("skipped: no cgroup v2 here");
            return;
        }
        let text = fs::read_to_string("/proc/self/cgroup").unwrap();
        let want = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_string();
        let mut cgroups = Cgroups::new();
        let c = cgroups.get(me.cgroup_id).unwrap();
        assert_eq!(c.path.as_deref(), Some(want.as_str()));
        assert_eq!(cgroups.get(0), None);
        // An id no directory has: no path. Within MIN_WALK_GAP of the last
        // walk it is not looked for; after one that lacks it, it is not
        // looked for again until another id causes a walk.
        let gone = cgroups.get(u64::MAX).unwrap();
        assert_eq!(gone.path, None);
        assert!(!cgroups.missing.contains(&u64::MAX), "no walk yet");
        std::thread::sleep(MIN_WALK_GAP);
        assert_eq!(cgroups.get(u64::MAX).unwrap().path, None);
        assert!(cgroups.missing.contains(&u64::MAX));
    }
}
