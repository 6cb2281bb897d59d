//! Resolves the units a policy names to cgroup v2 ids (what `socket cgroupv2`
//! compares against). Reads the host's cgroup2 hierarchy.

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::ruleset::UnitCgroups;

/// How deep a bare unit name is searched for (slices nest: a.slice/a-b.slice/x.service).
const SEARCH_DEPTH: usize = 5;

/// The cgroup2 mount as this process sees it. `ip netns exec` remounts /sys, which
/// hides it; then the host's view through /proc/1/root is used.
pub fn cgroup2_root() -> Option<PathBuf> {
    if let Some(p) = mount_point("/proc/self/mountinfo", Path::new("/")) {
        return Some(p);
    }
    mount_point("/proc/1/mountinfo", Path::new("/proc/1/root"))
}

fn mount_point(mountinfo: &str, prefix: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(mountinfo).ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount = left.split_whitespace().nth(4)?;
        let path = prefix.join(mount.trim_start_matches('/'));
        path.is_dir().then_some(path)
    })
}

/// Every cgroup the units have now, as (level, id). Units not running are absent.
pub fn resolve_units<'a>(units: impl IntoIterator<Item = &'a String>) -> UnitCgroups {
    let mut out = UnitCgroups::new();
    let Some(root) = cgroup2_root() else {
        return out;
    };
    for unit in units {
        let found = if unit.contains('/') {
            vec![root.join(unit)]
                .into_iter()
                .filter(|p| p.is_dir())
                .collect()
        } else {
            find_named(&root, unit)
        };
        let ids: Vec<(u32, u64)> = found
            .iter()
            .filter_map(|p| {
                let level = p.strip_prefix(&root).ok()?.components().count() as u32;
                Some((level, std::fs::metadata(p).ok()?.ino()))
            })
            .collect();
        if !ids.is_empty() {
            out.insert(unit.clone(), ids);
        }
    }
    out
}

fn find_named(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut queue = VecDeque::from([(root.to_path_buf(), 0usize)]);
    while let Some((dir, depth)) = queue.pop_front() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let path = entry.path();
            if entry.file_name() == name {
                found.push(path);
            } else if depth + 1 < SEARCH_DEPTH {
                queue.push_back((path, depth + 1));
            }
        }
    }
    found
}
