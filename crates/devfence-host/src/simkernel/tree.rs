//! The fixture tree as the simulated kernel sees it: lexical link resolution
//! under the root, and the few file-system primitives every operation is built
//! from. Mutating helpers take *resolved* kernel paths (no link in any component
//! but the last).

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::actuator::Errno;
use crate::root::{HostRoot, resolve_target};
use crate::sim::relative_link;

/// Too many levels of symbolic links.
pub(super) const ELOOP: Errno = Errno(40);
/// Is a directory.
pub(super) const EISDIR: Errno = Errno(21);

/// What a path is, without following a final link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
    Link,
}

/// One entry of a subtree saved in memory (a driver's `infiniband/`, `net/`,
/// `sriov/` while the device is unbound), relative to the saved directory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Saved {
    Dir(String),
    File(String, Vec<u8>, u32),
    Link(String, PathBuf),
}

/// The fixture root.
#[derive(Clone, Debug)]
pub(super) struct Tree {
    pub(super) root: HostRoot,
}

fn io_errno(e: &io::Error) -> Errno {
    Errno::from_io(e)
}

/// Opens the file at `p` for writing without blocking and without following a
/// final link (`create`: create it if absent); anything but a regular file is
/// refused (`EINVAL`), so a FIFO in the tree never blocks the simulated kernel.
fn open_regular(p: &Path, create: bool) -> Result<fs::File, Errno> {
    let f = fs::OpenOptions::new()
        .write(true)
        .create(create)
        .custom_flags(
            (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOFOLLOW)
                .bits()
                .cast_signed(),
        )
        .open(p)
        .map_err(|e| io_errno(&e))?;
    match f.metadata() {
        Ok(m) if m.is_file() => Ok(f),
        Ok(_) => Err(Errno::EINVAL),
        Err(e) => Err(io_errno(&e)),
    }
}

/// Replaces the whole contents of `f` with `contents`.
fn write_all_at_start(mut f: &fs::File, contents: &[u8]) -> Result<(), Errno> {
    use std::io::Write;
    f.set_len(0).map_err(|e| io_errno(&e))?;
    f.write_all(contents).map_err(|e| io_errno(&e))
}

/// `/a/b/c` → (`/a/b`, `c`).
pub(super) fn split(k: &str) -> (&str, &str) {
    match k.rsplit_once('/') {
        Some(("", n)) => ("/", n),
        Some((d, n)) => (d, n),
        None => ("/", k),
    }
}

/// The last component of a kernel path.
pub(super) fn base(k: &str) -> &str {
    split(k).1
}

impl Tree {
    pub(super) fn host(&self, k: &str) -> PathBuf {
        self.root.path(k)
    }

    /// Resolves the symlinks of `k` the way path lookup does, lexically under the
    /// root: every component, the last one only with `follow_last`. A component
    /// that does not exist is kept as it is.
    pub(super) fn resolve(&self, k: &str, follow_last: bool) -> Result<String, Errno> {
        let mut todo: Vec<String> = k.split('/').rev().map(str::to_owned).collect();
        let mut cur: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            match c.as_str() {
                "" | "." => continue,
                ".." => {
                    cur.pop();
                    continue;
                }
                _ => {}
            }
            cur.push(c);
            if todo.iter().all(|c| c.is_empty() || c == ".") && !follow_last {
                break;
            }
            let kp = join(&cur);
            if let Ok(t) = fs::read_link(self.host(&kp)) {
                hops += 1;
                if hops > 40 {
                    return Err(ELOOP);
                }
                let t = t.to_str().ok_or(Errno::EINVAL)?.to_owned();
                cur.pop();
                if t.starts_with('/') {
                    cur.clear();
                }
                todo.extend(t.split('/').rev().map(str::to_owned));
            }
        }
        Ok(join(&cur))
    }

    /// What the resolved path `k` is (`None`: nothing there).
    pub(super) fn kind(&self, k: &str) -> Option<Kind> {
        let m = fs::symlink_metadata(self.host(k)).ok()?;
        Some(if m.file_type().is_symlink() {
            Kind::Link
        } else if m.is_dir() {
            Kind::Dir
        } else {
            Kind::File
        })
    }

    /// Whether anything (a link included) is at the resolved path `k`.
    pub(super) fn lexists(&self, k: &str) -> bool {
        self.kind(k).is_some()
    }

    /// Whether the resolved path `k` is a directory.
    pub(super) fn is_dir(&self, k: &str) -> bool {
        self.kind(k) == Some(Kind::Dir)
    }

    /// The permission bits of the resolved path `k`.
    pub(super) fn mode(&self, k: &str) -> Option<u32> {
        fs::symlink_metadata(self.host(k))
            .ok()
            .map(|m| m.mode() & 0o7777)
    }

    /// The bytes of a file (any path; links followed).
    pub(super) fn read(&self, k: &str) -> Result<Vec<u8>, Errno> {
        let p = self.resolve(k, true)?;
        // Bounded, non-blocking, a regular file only: a FIFO in the tree is an
        // error, never a hang.
        self.root
            .read_attr(&p, crate::root::MAX_ATTR_BYTES)
            .map_err(|e| io_errno(&e.into_io()))
    }

    /// The bytes of the file at `p`, a path [`Tree::resolve`]d already (no link
    /// on the way): the same bounded, non-blocking read of a regular file as
    /// [`Tree::read`], without walking the path's links again. A link as the
    /// last component is refused (`ELOOP`), never followed.
    pub(super) fn read_at(&self, p: &str) -> Result<Vec<u8>, Errno> {
        self.root
            .read_attr(p, crate::root::MAX_ATTR_BYTES)
            .map_err(|e| io_errno(&e.into_io()))
    }

    /// What is at the resolved path `k` and its permission bits, in one `lstat`.
    pub(super) fn kind_mode(&self, k: &str) -> Option<(Kind, u32)> {
        let m = fs::symlink_metadata(self.host(k)).ok()?;
        let kind = if m.file_type().is_symlink() {
            Kind::Link
        } else if m.is_dir() {
            Kind::Dir
        } else {
            Kind::File
        };
        Some((kind, m.mode() & 0o7777))
    }

    /// A file as text with one trailing newline removed.
    pub(super) fn text(&self, k: &str) -> Option<String> {
        let b = self.read(k).ok()?;
        let s = String::from_utf8(b).ok()?;
        Some(s.strip_suffix('\n').map(str::to_owned).unwrap_or(s))
    }

    /// Where the link at `k` points, as a resolved kernel path (`None`: no link).
    pub(super) fn link(&self, k: &str) -> Option<String> {
        let p = self.resolve(k, false).ok()?;
        let t = fs::read_link(self.host(&p)).ok()?;
        let t = resolve_target(&p, t.to_str()?);
        self.resolve(&t, true).ok()
    }

    /// The last component of where the link at `k` points.
    pub(super) fn link_name(&self, k: &str) -> Option<String> {
        let p = self.resolve(k, false).ok()?;
        let t = fs::read_link(self.host(&p)).ok()?;
        Some(base(&resolve_target(&p, t.to_str()?)).to_owned())
    }

    /// The names in a directory (any path; links followed), sorted.
    pub(super) fn list(&self, k: &str) -> Vec<String> {
        let Ok(p) = self.resolve(k, true) else {
            return Vec::new();
        };
        let mut v: Vec<String> = fs::read_dir(self.host(&p))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Creates (or truncates) the file `k` with `contents` and `mode`; parents are
    /// created.
    pub(super) fn put(&self, k: &str, contents: &[u8], mode: u32) -> Result<(), Errno> {
        let p = self.host(k);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).map_err(|e| io_errno(&e))?;
        }
        let f = open_regular(&p, true)?;
        write_all_at_start(&f, contents)?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io_errno(&e))
    }

    /// Replaces the contents of the existing file `k`, keeping its mode.
    pub(super) fn set(&self, k: &str, contents: impl AsRef<[u8]>) -> Result<(), Errno> {
        let f = open_regular(&self.host(k), false)?;
        write_all_at_start(&f, contents.as_ref())
    }

    /// Creates the directory `k` and its parents.
    pub(super) fn mkdir(&self, k: &str) -> Result<(), Errno> {
        fs::create_dir_all(self.host(k)).map_err(|e| io_errno(&e))
    }

    /// Writes the link `k` → `target` (both kernel paths) as sysfs does: relative.
    /// An existing link there is replaced.
    pub(super) fn symlink(&self, k: &str, target: &str) -> Result<(), Errno> {
        let p = self.host(k);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).map_err(|e| io_errno(&e))?;
        }
        if self.kind(k) == Some(Kind::Link) {
            fs::remove_file(&p).map_err(|e| io_errno(&e))?;
        }
        std::os::unix::fs::symlink(relative_link(k, target), &p).map_err(|e| io_errno(&e))
    }

    /// Removes the file or link `k` (absent is fine).
    pub(super) fn unlink(&self, k: &str) -> Result<(), Errno> {
        match fs::remove_file(self.host(k)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_errno(&e)),
            _ => Ok(()),
        }
    }

    /// Removes the directory `k` and everything below it (links are removed, not
    /// followed; absent is fine).
    pub(super) fn rmtree(&self, k: &str) -> Result<(), Errno> {
        match fs::remove_dir_all(self.host(k)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_errno(&e)),
            _ => Ok(()),
        }
    }

    /// Creates the device node stand-in `k` (an empty file) with owner and mode.
    pub(super) fn node(&self, k: &str, uid: u32, gid: u32, mode: u32) -> Result<(), Errno> {
        let p = self.host(k);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).map_err(|e| io_errno(&e))?;
        }
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&p)
            .map_err(|e| io_errno(&e))?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(|e| io_errno(&e))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io_errno(&e))
    }

    /// Saves the subtree at the resolved directory `k` in memory (to restore it
    /// with [`Tree::restore`]).
    pub(super) fn save(&self, k: &str) -> Result<Vec<Saved>, Errno> {
        fn walk(base: &Path, rel: &str, out: &mut Vec<Saved>) -> io::Result<()> {
            let dir = if rel.is_empty() {
                base.to_path_buf()
            } else {
                base.join(rel)
            };
            let mut entries: Vec<_> = fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
            entries.sort_by_key(fs::DirEntry::file_name);
            for e in entries {
                let name = e.file_name().to_string_lossy().into_owned();
                let r = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let m = fs::symlink_metadata(e.path())?;
                if m.file_type().is_symlink() {
                    out.push(Saved::Link(r, fs::read_link(e.path())?));
                } else if m.is_dir() {
                    out.push(Saved::Dir(r.clone()));
                    walk(base, &r, out)?;
                } else {
                    // Bounded and non-blocking: a FIFO or a huge file in the tree
                    // is an error, not a hang.
                    let b =
                        devfence_model::bounded::read_file(&e.path(), crate::root::MAX_ATTR_BYTES)
                            .map_err(devfence_model::bounded::ReadFileError::into_io)?;
                    out.push(Saved::File(r, b, m.mode() & 0o7777));
                }
            }
            Ok(())
        }
        let mut out = vec![Saved::Dir(String::new())];
        walk(&self.host(k), "", &mut out).map_err(|e| io_errno(&e))?;
        Ok(out)
    }

    /// Writes a subtree saved with [`Tree::save`] back at `k`.
    pub(super) fn restore(&self, k: &str, saved: &[Saved]) -> Result<(), Errno> {
        let at = |r: &str| {
            if r.is_empty() {
                self.host(k)
            } else {
                self.host(&format!("{k}/{r}"))
            }
        };
        for s in saved {
            match s {
                Saved::Dir(r) => fs::create_dir_all(at(r)).map_err(|e| io_errno(&e))?,
                Saved::File(r, b, mode) => {
                    let p = at(r);
                    fs::write(&p, b).map_err(|e| io_errno(&e))?;
                    fs::set_permissions(&p, fs::Permissions::from_mode(*mode))
                        .map_err(|e| io_errno(&e))?;
                }
                Saved::Link(r, t) => {
                    std::os::unix::fs::symlink(t, at(r)).map_err(|e| io_errno(&e))?;
                }
            }
        }
        Ok(())
    }
}

/// `/` + the components joined.
fn join(parts: &[String]) -> String {
    if parts.is_empty() {
        return "/".to_owned();
    }
    let mut s = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for p in parts {
        s.push('/');
        s.push_str(p);
    }
    s
}
