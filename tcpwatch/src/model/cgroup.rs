//! What a cgroup path says about the process in it: the container, the
//! systemd unit, the Kubernetes pod. Pure: the path comes from the host
//! (`host::cgroup` maps the events' cgroup ids to paths).
//!
//! The shapes recognised (cgroup v2 paths, relative to the hierarchy's
//! root):
//! - a container, by its 64-hex id: systemd's `docker-ID.scope`,
//!   `cri-containerd-ID.scope`, `crio-ID.scope`, `libpod-ID.scope`, and the
//!   cgroupfs drivers' bare `ID` directory (`/docker/ID`,
//!   `/kubepods/burstable/podUID/ID`);
//! - a systemd unit: the innermost `*.service` or `*.scope`;
//! - a Kubernetes pod uid: `kubepods…-pod<UID>.slice` (systemd driver,
//!   `_` for `-`) or `/kubepods/…/pod<UID>` (cgroupfs driver).

use serde::{Deserialize, Serialize};

/// A cgroup as tcpwatch shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cgroup {
    /// The cgroup v2 id (the directory's inode number), as the kernel
    /// gives it.
    pub id: u64,
    /// Its path below the cgroup2 root (`/system.slice/nginx.service`);
    /// `None` when no directory has that id any more (the cgroup was
    /// removed) or cgroup v2 is not mounted.
    pub path: Option<String>,
    /// The container id the path shows.
    pub container: Option<String>,
    /// The systemd unit (`*.service`, `*.scope`) the path shows.
    pub unit: Option<String>,
    /// The Kubernetes pod uid the path shows.
    pub pod: Option<String>,
}

impl Cgroup {
    /// What `path` shows for the cgroup `id` (`None`: path unknown).
    pub fn new(id: u64, path: Option<&str>) -> Cgroup {
        let Some(path) = path else {
            return Cgroup {
                id,
                ..Cgroup::default()
            };
        };
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let container = parts.iter().rev().find_map(|p| container_id(p));
        let unit = parts
            .iter()
            .rev()
            .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
            .map(|p| p.to_string());
        let pod = path
            .contains("kubepods")
            .then(|| parts.iter().rev().find_map(|p| pod_uid(p)))
            .flatten();
        Cgroup {
            id,
            path: Some(path.to_string()),
            container,
            unit,
            pod,
        }
    }

    /// The container id, else `None`: what the `container` label and the
    /// timewait grouping use.
    pub fn container_key(&self) -> Option<&str> {
        self.container.as_deref()
    }
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id of one path component, if it names a container.
fn container_id(part: &str) -> Option<String> {
    if is_hex_id(part) {
        return Some(part.to_string());
    }
    let stem = part.strip_suffix(".scope")?;
    ["docker-", "cri-containerd-", "crio-", "libpod-"]
        .iter()
        .find_map(|p| stem.strip_prefix(p))
        .filter(|id| is_hex_id(id))
        .map(String::from)
}

/// The pod uid of one path component (`…pod<UID>[.slice]`), if it has one.
fn pod_uid(part: &str) -> Option<String> {
    let stem = part.strip_suffix(".slice").unwrap_or(part);
    let at = stem.rfind("pod")?;
    // `pod` starts the component or follows a `-` (kubepods-burstable-pod…).
    if at != 0 && !stem[..at].ends_with('-') {
        return None;
    }
    let uid = stem[at + 3..].replace('_', "-");
    let shape = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    shape.then_some(uid)
}

/// Whether `path` is `prefix` or below it, a whole component at a time
/// (`/a/b` is below `/a` but `/ab` is not). Both are cgroup paths from the
/// hierarchy's root; a trailing `/` on `prefix` is ignored.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";

    #[test]
    fn container_runtimes_are_recognised() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/system.slice/cri-containerd-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e3d4c_5b6a_7980_a1b2_c3d4e5f60718.slice/crio-{ID}.scope"),
            format!("/docker/{ID}"),
        ] {
            let c = Cgroup::new(7, Some(&path));
            assert_eq!(c.container.as_deref(), Some(ID), "{path}");
            assert_eq!(c.path.as_deref(), Some(path.as_str()));
        }
    }

    #[test]
    fn units_and_pods_are_recognised() {
        let c = Cgroup::new(1, Some("/system.slice/nginx.service"));
        assert_eq!(c.unit.as_deref(), Some("nginx.service"));
        assert_eq!((c.container, c.pod), (None, None));
        let c = Cgroup::new(
            2,
            Some("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_5b6a_7980_a1b2_c3d4e5f60718.slice"),
        );
        assert_eq!(
            c.pod.as_deref(),
            Some("1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718")
        );
        assert_eq!(c.unit, None);
        let c = Cgroup::new(
            3,
            Some(&format!(
                "/kubepods/burstable/pod1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718/{ID}"
            )),
        );
        assert_eq!(
            c.pod.as_deref(),
            Some("1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718")
        );
        assert_eq!(c.container.as_deref(), Some(ID));
        // Not a pod outside kubepods, nor a word merely containing "pod".
        assert_eq!(Cgroup::new(4, Some("/user.slice/ipod.scope")).pod, None);
        let root = Cgroup::new(5, Some("/"));
        assert_eq!((root.container, root.unit, root.pod), (None, None, None));
        assert_eq!(Cgroup::new(6, None).path, None);
    }

    #[test]
    fn short_or_odd_ids_are_not_containers() {
        assert_eq!(container_id("docker-abc.scope"), None);
        assert_eq!(container_id(&format!("docker-{ID}.service")), None);
        assert_eq!(container_id(&format!("docker-{}x.scope", &ID[1..])), None);
    }

    #[test]
    fn prefixes_match_whole_components() {
        assert!(path_has_prefix("/a/b", "/a"));
        assert!(path_has_prefix("/a/b", "/a/b"));
        assert!(path_has_prefix("/a/b", "/a/b/"));
        assert!(path_has_prefix("/a/b", "/"));
        assert!(!path_has_prefix("/ab", "/a"));
        assert!(!path_has_prefix("/a", "/a/b"));
    }
}
