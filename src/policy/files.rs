//! Who may write the policy (sshd's StrictModes for egret): a policy file, a
//! drop-in or a directory they sit in that someone other than root (or the
//! invoking user) can change is a way around the firewall for that someone.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A policy file or directory others could change, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeFile {
    pub path: PathBuf,
    pub problem: String,
    pub fix: String,
}

impl std::fmt::Display for UnsafeFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}; fix: {}",
            self.path.display(),
            self.problem,
            self.fix
        )
    }
}

/// The files `include` pattern `pattern` (relative to the main policy at
/// `main`) names; `Err` for an invalid glob. The loader and the mode check
/// share it, so no file is read that was not checked.
pub(super) fn include_matches(main: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let joined = main.parent().unwrap_or(Path::new(".")).join(pattern);
    if !is_glob(pattern) {
        return Ok(if joined.is_file() {
            vec![joined]
        } else {
            Vec::new()
        });
    }
    let paths = glob::glob(&joined.to_string_lossy()).map_err(|e| e.to_string())?;
    let mut files: Vec<PathBuf> = paths
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Every policy file (`main` and its drop-ins) and directory that someone
/// other than root and `uid` could change. Unreadable files are left to the
/// loader, which reports them.
pub fn unsafe_files(main: &Path, uid: u32) -> Vec<UnsafeFile> {
    let mut files = vec![main.to_path_buf()];
    // Directories a glob reads: anyone who can create a file there adds rules,
    // sticky bit or not.
    let mut glob_dirs = Vec::new();
    if let Some(patterns) = std::fs::read_to_string(main)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("include").and_then(|i| i.as_array()).cloned())
    {
        for pattern in patterns.iter().filter_map(|p| p.as_str()) {
            files.extend(include_matches(main, pattern).unwrap_or_default());
            if is_glob(pattern) {
                let joined = main.parent().unwrap_or(Path::new(".")).join(pattern);
                if let Some(dir) = joined.parent().filter(|d| !is_glob(&d.to_string_lossy())) {
                    glob_dirs.push(dir.to_path_buf());
                }
            }
        }
    }
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent())
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d.to_path_buf()
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    glob_dirs.sort();
    glob_dirs.dedup();

    let mut problems = Vec::new();
    for f in &files {
        if let Ok(meta) = std::fs::metadata(f) {
            problems.extend(check(f, &meta, uid, false));
        }
    }
    for d in &dirs {
        if let Ok(meta) = std::fs::metadata(d) {
            problems.extend(check(d, &meta, uid, glob_dirs.contains(d)));
        }
    }
    for d in glob_dirs.iter().filter(|d| !dirs.contains(d)) {
        if let Ok(meta) = std::fs::metadata(d) {
            problems.extend(check(d, &meta, uid, true));
        }
    }
    problems
}

fn check(path: &Path, meta: &std::fs::Metadata, uid: u32, globbed: bool) -> Vec<UnsafeFile> {
    let mut out = Vec::new();
    let shown = path.display();
    let owner = meta.uid();
    if owner != 0 && owner != uid {
        out.push(UnsafeFile {
            path: path.to_path_buf(),
            problem: format!("owned by uid {owner}, who is neither root nor the invoking user"),
            fix: format!("chown root {shown}"),
        });
    }
    let mode = meta.mode();
    let writable = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    let kind = if meta.is_dir() { "directory" } else { "file" };
    if writable && (!meta.is_dir() || !sticky || globbed) {
        let problem = if meta.is_dir() && sticky {
            format!("{kind} writable by group or others (mode {:04o}) that an include glob reads: anyone may add a drop-in", mode & 0o7777)
        } else {
            format!(
                "{kind} writable by group or others (mode {:04o})",
                mode & 0o7777
            )
        };
        out.push(UnsafeFile {
            path: path.to_path_buf(),
            problem,
            fix: format!("chmod go-w {shown}"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn writable_files_and_directories_are_named() {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let main = dir.path().join("policy.toml");
        std::fs::write(&main, "include = [\"policy.d/*.toml\"]\n").unwrap();
        chmod(&main, 0o644);
        std::fs::create_dir(dir.path().join("policy.d")).unwrap();
        chmod(&dir.path().join("policy.d"), 0o755);
        let drop_in = dir.path().join("policy.d/a.toml");
        std::fs::write(&drop_in, "").unwrap();
        chmod(&drop_in, 0o644);
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(unsafe_files(&main, uid), vec![]);

        chmod(&drop_in, 0o666);
        let found = unsafe_files(&main, uid);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, drop_in);
        assert!(found[0].fix.starts_with("chmod go-w"));
        chmod(&drop_in, 0o644);

        // A sticky world-writable directory is fine for a named file...
        chmod(dir.path(), 0o1777);
        assert_eq!(unsafe_files(&main, uid), vec![]);
        // ...but not for a directory a glob reads.
        chmod(&dir.path().join("policy.d"), 0o1777);
        let found = unsafe_files(&main, uid);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, dir.path().join("policy.d"));
        chmod(&dir.path().join("policy.d"), 0o755);

        chmod(dir.path(), 0o777);
        let found = unsafe_files(&main, uid);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, dir.path());

        // Owned by someone else (needs root to give the file away).
        chmod(dir.path(), 0o755);
        if uid == 0 {
            std::os::unix::fs::chown(&drop_in, Some(65534), None).unwrap();
            let found = unsafe_files(&main, 0);
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(found[0].fix.starts_with("chown root"));
            assert_eq!(unsafe_files(&main, 65534), vec![]);
        }
    }
}
