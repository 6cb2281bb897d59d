//! Who may write the policy (sshd's StrictModes for egret): a policy file, a
//! drop-in or a directory they sit in that someone other than root (or the
//! invoking user) can change is a way around the firewall for that someone.
//! So is every directory above them up to `/` (whoever can rename one can
//! put another tree in its place) and every symlink on the way (whoever
//! owns it can point it elsewhere). Files are opened component by component
//! and read from the descriptor that was checked.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{fstat, openat, readlinkat, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::{Accounts, Diagnostic, Policy, PolicyErrors};

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

/// Why a policy was not loaded: files others could change, or errors in it.
#[derive(Debug)]
pub enum LoadError {
    Unsafe(Vec<UnsafeFile>),
    Invalid(PolicyErrors),
}

/// Loads the policy at `main` like [`super::load`], reading every file
/// (main and drop-ins) through [`Checked`]: each is opened once, checked by
/// its open descriptor along with every directory and symlink on the way
/// to it, and read from that descriptor, so what was checked is what is
/// loaded (no window to swap a file between the check and the read).
pub fn load_strict(main: &Path, uid: u32, accounts: &dyn Accounts) -> Result<Policy, LoadError> {
    let mut c = Checked::new(uid);
    let source = match c.read(main) {
        Ok(s) => s,
        Err(e) => {
            if !c.problems.is_empty() {
                return Err(LoadError::Unsafe(c.into_problems()));
            }
            return Err(LoadError::Invalid(PolicyErrors(vec![Diagnostic::at(
                main,
                "",
                None,
                format!("cannot read policy file: {e}"),
            )
            .with_hint(
                "pass the path of an existing policy file, e.g. /etc/egret/policy.toml",
            )])));
        }
    };
    for dir in glob_dirs(main, &source) {
        c.check_glob_dir(&dir);
    }
    let parsed = super::parse::parse_with(&source, main, accounts, &mut |p| c.read(p));
    if !c.problems.is_empty() {
        return Err(LoadError::Unsafe(c.into_problems()));
    }
    parsed.map_err(LoadError::Invalid)
}

/// Every policy file (`main` and its drop-ins), directory on the way to them
/// (up to `/`, through symlinks) and symlink that someone other than root
/// and `uid` could change. Unreadable files are left to the loader, which
/// reports them.
pub fn unsafe_files(main: &Path, uid: u32) -> Vec<UnsafeFile> {
    let mut c = Checked::new(uid);
    if let Ok(source) = c.read(main) {
        for dir in glob_dirs(main, &source) {
            c.check_glob_dir(&dir);
        }
        for pattern in include_patterns(&source) {
            for f in include_matches(main, &pattern).unwrap_or_default() {
                let _ = c.read(&f);
            }
        }
    }
    c.into_problems()
}

fn include_patterns(source: &str) -> Vec<String> {
    source
        .parse::<toml::Table>()
        .ok()
        .and_then(|t| t.get("include").and_then(|i| i.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect()
}

/// Directories an include glob reads: anyone who can create a file there
/// adds rules, sticky bit or not.
fn glob_dirs(main: &Path, source: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = include_patterns(source)
        .iter()
        .filter(|p| is_glob(p))
        .filter_map(|pattern| {
            let joined = main.parent().unwrap_or(Path::new(".")).join(pattern);
            joined
                .parent()
                .filter(|d| !is_glob(&d.to_string_lossy()))
                .map(Path::to_path_buf)
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Symlinks followed while opening one path before giving up (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// Opens policy files the way the kernel resolves a path, one component at
/// a time from `/` without following anything implicitly, and notes every
/// directory, symlink and file on the way that someone other than root and
/// `uid` could change: each directory is checked by the descriptor the next
/// step is opened from, so no component can be swapped after its check.
struct Checked {
    uid: u32,
    problems: Vec<UnsafeFile>,
}

enum Want {
    File,
    /// A directory an include glob reads (not even sticky is enough).
    GlobDir,
}

impl Checked {
    fn new(uid: u32) -> Checked {
        Checked {
            uid,
            problems: Vec::new(),
        }
    }

    fn into_problems(mut self) -> Vec<UnsafeFile> {
        let mut seen = std::collections::HashSet::new();
        self.problems
            .retain(|p| seen.insert((p.path.clone(), p.fix.clone())));
        self.problems
    }

    /// The text of the file at `path`, read from the descriptor that was checked.
    fn read(&mut self, path: &Path) -> io::Result<String> {
        let fd = self.open(path, Want::File)?;
        let mut text = String::new();
        std::fs::File::from(fd).read_to_string(&mut text)?;
        Ok(text)
    }

    fn check_glob_dir(&mut self, dir: &Path) {
        let _ = self.open(dir, Want::GlobDir);
    }

    fn open(&mut self, given: &Path, want: Want) -> io::Result<OwnedFd> {
        let absolute = if given.is_absolute() {
            given.to_path_buf()
        } else {
            // getcwd(3) gives the physical path: its ancestors are walked too.
            std::env::current_dir()?.join(given)
        };
        let root = Path::new("/");
        let mut stack: Vec<(OwnedFd, PathBuf)> = vec![(self.open_root()?, root.to_path_buf())];
        let mut todo: VecDeque<OsString> = components(&absolute);
        let mut links = 0;
        while let Some(name) = todo.pop_front() {
            if name == ".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let last = todo.is_empty();
            let Some((dir, dir_path)) = stack.last() else {
                return Err(io::Error::other("path walk lost its root"));
            };
            let path = dir_path.join(&name);
            // The file itself is opened for reading right away (the descriptor
            // checked is the one read); anything else as a path only.
            let flags = if last && matches!(want, Want::File) {
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC
            } else {
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC
            };
            let fd = match openat(dir, name.as_os_str(), flags, Mode::empty()) {
                Ok(fd) => fd,
                // O_NOFOLLOW on a symlink: open it as a path to read it.
                Err(Errno::LOOP) if flags.contains(OFlags::RDONLY) => openat(
                    dir,
                    name.as_os_str(),
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?,
                Err(e) => return Err(e.into()),
            };
            let st = fstat(&fd)?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Symlink => {
                    self.note(&path, st.st_uid, None, "symlink", given);
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!(
                                "more than {MAX_SYMLINKS} symlinks on the way to {}",
                                given.display()
                            ),
                        ));
                    }
                    let target = readlinkat(&fd, "", Vec::new())?;
                    let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                    let mut next = components(&target);
                    next.extend(todo);
                    todo = next;
                    if target.is_absolute() {
                        stack.truncate(1);
                    }
                }
                FileType::Directory => {
                    let globbed = last && matches!(want, Want::GlobDir);
                    self.note(
                        &path,
                        st.st_uid,
                        Some((st.st_mode, globbed)),
                        "directory",
                        given,
                    );
                    if last && matches!(want, Want::File) {
                        return Err(io::Error::from(Errno::ISDIR));
                    }
                    stack.push((fd, path));
                }
                FileType::RegularFile if last => {
                    self.note(&path, st.st_uid, Some((st.st_mode, false)), "file", given);
                    return Ok(fd);
                }
                _ if !last => return Err(io::Error::from(Errno::NOTDIR)),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} is not a regular file", path.display()),
                    ))
                }
            }
        }
        // The path ended in a directory (or was `/`).
        match want {
            Want::GlobDir => stack
                .pop()
                .map(|(fd, _)| fd)
                .ok_or_else(|| io::Error::other("path walk lost its root")),
            Want::File => Err(io::Error::from(Errno::ISDIR)),
        }
    }

    fn open_root(&mut self) -> io::Result<OwnedFd> {
        let fd = openat(
            rustix::fs::CWD,
            "/",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = fstat(&fd)?;
        self.note(
            Path::new("/"),
            st.st_uid,
            Some((st.st_mode, false)),
            "directory",
            Path::new("/"),
        );
        Ok(fd)
    }

    /// Notes what is wrong with `path` (owner `owner`; `mode` and whether an
    /// include glob reads it, except for symlinks, whose mode means nothing).
    fn note(
        &mut self,
        path: &Path,
        owner: u32,
        mode: Option<(u32, bool)>,
        kind: &str,
        given: &Path,
    ) {
        let reached = if path == given {
            String::new()
        } else {
            format!(" (on the way to {})", given.display())
        };
        let shown = path.display();
        if owner != 0 && owner != self.uid {
            self.problems.push(UnsafeFile {
                path: path.to_path_buf(),
                problem: format!(
                    "{kind} owned by uid {owner}, who is neither root nor the invoking user{reached}"
                ),
                fix: if kind == "symlink" {
                    format!("replace the symlink with one owned by root (ln -sfn TARGET {shown} as root), or name the real path")
                } else {
                    format!("chown root {shown}")
                },
            });
        }
        let Some((mode, globbed)) = mode else {
            return;
        };
        let writable = mode & 0o022 != 0;
        let is_dir = kind == "directory";
        let sticky = mode & 0o1000 != 0;
        if writable && (!is_dir || !sticky || globbed) {
            let problem = if is_dir && sticky {
                format!("{kind} writable by group or others (mode {:04o}) that an include glob reads: anyone may add a drop-in{reached}", mode & 0o7777)
            } else {
                format!(
                    "{kind} writable by group or others (mode {:04o}){reached}",
                    mode & 0o7777
                )
            };
            self.problems.push(UnsafeFile {
                path: path.to_path_buf(),
                problem,
                fix: format!("chmod go-w {shown}"),
            });
        }
    }
}

/// The names of a path's components, `..` kept (resolved against the
/// directories actually walked, like the kernel does), `.` and `/` dropped.
fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    const MAIN: &str = "mode = \"enforce\"\ninclude = [\"policy.d/*.toml\"]\n";
    const DROP_IN: &str = "[[allow]]\nname = \"x\"\ncidrs = [\"192.0.2.1\"]\n";

    fn strict(main: &Path) -> Result<Policy, LoadError> {
        load_strict(main, 0, &super::super::SystemAccounts)
    }

    /// sshd's StrictModes checks every directory up to `/`; so must egret, and
    /// a symlink must not lead it into a place someone else controls. (Needs
    /// root: files are given away to nobody.)
    #[test]
    fn every_ancestor_and_every_symlink_on_the_way_is_checked() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let top = tempfile::tempdir().unwrap();
        chmod(top.path(), 0o755);
        // top/gp/etc/policy.toml, top/gp/etc/policy.d/a.toml
        let gp = top.path().join("gp");
        let etc = gp.join("etc");
        let d = etc.join("policy.d");
        std::fs::create_dir_all(&d).unwrap();
        for dir in [&gp, &etc, &d] {
            chmod(dir, 0o755);
        }
        let main = etc.join("policy.toml");
        std::fs::write(&main, MAIN).unwrap();
        let drop_in = d.join("a.toml");
        std::fs::write(&drop_in, DROP_IN).unwrap();
        for f in [&main, &drop_in] {
            chmod(f, 0o644);
        }
        assert_eq!(unsafe_files(&main, 0), vec![]);
        assert_eq!(strict(&main).unwrap().rules.len(), 1);

        // A world-writable grandparent: anyone may rename etc/ away and put
        // a tree of their own in its place.
        chmod(&gp, 0o777);
        let found = unsafe_files(&main, 0);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, gp);
        assert!(found[0].fix.starts_with("chmod go-w"), "{found:?}");
        assert!(matches!(strict(&main), Err(LoadError::Unsafe(_))));
        chmod(&gp, 0o755);

        // A drop-in that is a symlink into a directory nobody owns (in /tmp,
        // sticky and world-writable: fine by itself).
        let evil = top.path().join("evil");
        std::fs::create_dir(&evil).unwrap();
        chmod(&evil, 0o755);
        let target = evil.join("x.toml");
        std::fs::write(&target, DROP_IN.replace("192.0.2.1", "0.0.0.0/0")).unwrap();
        chmod(&target, 0o644);
        std::os::unix::fs::chown(&evil, Some(65534), None).unwrap();
        std::os::unix::fs::chown(&target, Some(65534), None).unwrap();
        std::fs::remove_file(&drop_in).unwrap();
        std::os::unix::fs::symlink(&target, &drop_in).unwrap();
        let found = unsafe_files(&main, 0);
        let paths: Vec<_> = found.iter().map(|f| f.path.clone()).collect();
        assert_eq!(paths, vec![evil.clone(), target.clone()], "{found:?}");
        assert!(found[0].problem.contains("on the way to"), "{found:?}");
        assert!(matches!(strict(&main), Err(LoadError::Unsafe(_))));

        // The same, relative and through `..`: still the real tree.
        std::fs::remove_file(&drop_in).unwrap();
        std::os::unix::fs::symlink("../../../evil/x.toml", &drop_in).unwrap();
        let found = unsafe_files(&main, 0);
        assert_eq!(found.len(), 2, "{found:?}");

        // A root-owned target reached through a symlink nobody owns: whoever
        // owns the link can point it elsewhere.
        let good = etc.join("good.toml");
        std::fs::write(&good, DROP_IN).unwrap();
        chmod(&good, 0o644);
        std::fs::remove_file(&drop_in).unwrap();
        std::os::unix::fs::symlink(&good, &drop_in).unwrap();
        assert_eq!(unsafe_files(&main, 0), vec![]);
        assert_eq!(strict(&main).unwrap().rules.len(), 1);
        std::os::unix::fs::lchown(&drop_in, Some(65534), None).unwrap();
        let found = unsafe_files(&main, 0);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, drop_in);
        assert!(
            found[0].problem.starts_with("symlink owned by uid 65534"),
            "{found:?}"
        );

        // The main file itself a symlink into nobody's directory.
        std::fs::remove_file(&drop_in).unwrap();
        std::fs::write(&drop_in, DROP_IN).unwrap();
        chmod(&drop_in, 0o644);
        let evil_main = evil.join("policy.toml");
        std::fs::write(&evil_main, "mode = \"audit\"\n").unwrap();
        chmod(&evil_main, 0o644);
        let linked = etc.join("linked.toml");
        std::os::unix::fs::symlink(&evil_main, &linked).unwrap();
        let found = unsafe_files(&linked, 0);
        assert!(found.iter().any(|f| f.path == evil), "{found:?}");
        assert!(matches!(strict(&linked), Err(LoadError::Unsafe(_))));
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
