//! The host root: the one place every path devfence reads comes from.
//!
//! devfence names files the way the kernel does (`/sys/bus/pci/devices/...`,
//! `/dev/vfio/41`): these *kernel paths* appear in the inventory, in evidence and
//! in errors. A [`HostRoot`] maps a kernel path to the file that holds it — under
//! `/` on a real host, under a fixture directory in tests — and back.
//!
//! Symlinks are resolved lexically ([`resolve_target`]), the way `realpath` would
//! on sysfs where only the last component of a path is a link: a relative target
//! is taken relative to the link's directory, an absolute one is taken as a kernel
//! path and re-rooted under the root, and `..` never climbs above the root. Nothing
//! here calls `canonicalize`, so a fixture tree can never make devfence read
//! outside it through a link.
//!
//! Every file, directory, link and node devfence opens under a root is opened
//! through [`HostRoot::open`] (and the helpers built on it: [`HostRoot::read_file`],
//! [`HostRoot::list_dir`], [`HostRoot::read_link`], [`HostRoot::metadata`]). It
//! resolves the path *in the root*: `openat2(2)` with `RESOLVE_IN_ROOT` on a
//! descriptor of the root, so that every link met on the way — in any component —
//! is resolved as if the root were `/` (an absolute target is re-rooted, `..` stops
//! at the root). On a real host (root `/`) that is ordinary resolution, and the
//! kernel's sysfs links work as always; on a fixture tree no link can lead out of
//! it. Where `openat2` is not available (kernels before 5.6, a seccomp filter), a
//! fixture root is resolved component by component with `readlink` in user space
//! under the same rules, and the final open refuses a link (`O_NOFOLLOW`).
//! Files are opened `O_NONBLOCK` and checked with `fstat` to be regular files
//! before they are read, so a FIFO planted where an attribute belongs never
//! blocks, and every read is bounded ([`devfence_model::bounded`]).

use std::borrow::Cow;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use devfence_model::bounded::{self, ReadFileError};
use rustix::fs::{Mode, OFlags, ResolveFlags};

/// How often [`HostRoot::open`] retries `openat2` after a rename raced its
/// resolution (`EAGAIN`) before it resolves the path with its own walk.
const OPENAT2_RACE_RETRIES: usize = 8;

/// The host root was not usable: nothing could be read under it.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The root directory does not exist.
    #[error(
        "Host root {} does not exist. Hint: pass --root with a directory that holds sys/, dev/ and proc/ (e.g. one written by `devfence sim generate`), or leave it out to read the running host at /",
        path.display()
    )]
    RootMissing {
        /// The root as given.
        path: PathBuf,
    },
    /// The root exists but is not a directory.
    #[error(
        "Host root {} is not a directory. Hint: --root takes the directory that holds sys/, dev/ and proc/, not a file inside it",
        path.display()
    )]
    RootNotDirectory {
        /// The root as given.
        path: PathBuf,
    },
    /// The simulated kernel's shared state beside the tree cannot be used.
    #[error(
        "Cannot use the simulated kernel's shared state {}. Hint: the simulated host's run/devfence-simkernel/ must be a writable directory inside the root (no symbolic links); regenerate the host with `devfence sim generate` if it was damaged",
        path.display()
    )]
    SimState {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The root could not be examined (permissions, I/O error).
    #[error(
        "Cannot examine host root {}. Hint: check that the user running devfence may read it",
        path.display()
    )]
    RootUnreadable {
        /// The root as given.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
}

/// Where the kernel's files are: `/` on a real host, a fixture tree in tests.
#[derive(Clone)]
pub struct HostRoot {
    root: PathBuf,
    /// A descriptor of the root directory, opened on first use and shared by the
    /// clones: the anchor of every contained open.
    fd: Arc<OnceLock<OwnedFd>>,
}

impl PartialEq for HostRoot {
    fn eq(&self, other: &Self) -> bool {
        self.root == other.root
    }
}
impl Eq for HostRoot {}

impl std::fmt::Debug for HostRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRoot")
            .field("root", &self.root)
            .finish()
    }
}

/// How [`HostRoot::open`] opens a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read a regular file; a link in the last component is followed (in the root).
    Read,
    /// Read a regular file that must not be a link itself (a sysfs attribute: the
    /// kernel never makes one a link); a link is refused with `ELOOP`.
    ReadNoFollow,
    /// Write a regular file that must not be a link itself (a sysfs attribute).
    WriteNoFollow,
    /// Open a directory for listing (links followed, in the root).
    Dir,
    /// A handle that only names the file (`O_PATH`), for `stat`, `readlink`,
    /// `chown`; the last component is not followed.
    PathNoFollow,
    /// As [`Access::PathNoFollow`], following a link in the last component.
    Path,
}

impl Access {
    fn flags(self) -> OFlags {
        let base = OFlags::CLOEXEC | OFlags::NOCTTY;
        match self {
            Access::Read => base | OFlags::RDONLY | OFlags::NONBLOCK,
            Access::ReadNoFollow => base | OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW,
            Access::WriteNoFollow => base | OFlags::WRONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW,
            Access::Dir => base | OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK,
            // openat2 takes only CLOEXEC, DIRECTORY and NOFOLLOW beside O_PATH.
            Access::PathNoFollow => OFlags::CLOEXEC | OFlags::PATH | OFlags::NOFOLLOW,
            Access::Path => OFlags::CLOEXEC | OFlags::PATH,
        }
    }
    fn follows_last(self) -> bool {
        matches!(self, Access::Read | Access::Dir | Access::Path)
    }
    fn wants_regular(self) -> bool {
        matches!(
            self,
            Access::Read | Access::ReadNoFollow | Access::WriteNoFollow
        )
    }
}

/// Largest sysfs attribute devfence reads through [`HostRoot::read_attr`]
/// (values are at most a page; binary attributes such as `config` a few KiB).
pub const MAX_ATTR_BYTES: u64 = 1 << 20;

impl Default for HostRoot {
    /// The running host: root `/`.
    fn default() -> Self {
        Self::new("/")
    }
}

impl HostRoot {
    /// A host whose `/` is the directory `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            fd: Arc::new(OnceLock::new()),
        }
    }

    fn root_fd(&self) -> io::Result<&OwnedFd> {
        if let Some(fd) = self.fd.get() {
            return Ok(fd);
        }
        let fd = rustix::fs::open(
            &self.root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        // Another thread may have set it first: either descriptor names the root.
        let _ = self.fd.set(fd);
        self.fd
            .get()
            .ok_or_else(|| io::Error::other("the root descriptor vanished"))
    }

    /// Opens `kernel_path` under the root, never leaving it (module docs): every
    /// link on the way is resolved in the root. Files are opened non-blocking and
    /// must be regular files for [`Access::Read`], [`Access::ReadNoFollow`] and
    /// [`Access::WriteNoFollow`].
    ///
    /// # Errors
    /// The open's error (`NotFound`, `ELOOP` for a refused link, …), or
    /// `InvalidInput` ("a FIFO, not a regular file") for something that is not a
    /// regular file where one is expected.
    pub fn open(&self, kernel_path: &str, access: Access) -> io::Result<fs::File> {
        let f = self.open_unchecked(kernel_path, access)?;
        if access.wants_regular() {
            let t = f.metadata()?.file_type();
            if !t.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a {}, not a regular file", bounded::kind_name(t)),
                ));
            }
        }
        Ok(f)
    }

    /// [`HostRoot::open`] without the regular-file check.
    fn open_unchecked(&self, kernel_path: &str, access: Access) -> io::Result<fs::File> {
        let clean: Cow<'_, str> = if needs_normalizing(kernel_path) {
            Cow::Owned(normalize(kernel_path))
        } else {
            Cow::Borrowed(kernel_path)
        };
        let rel = clean.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        let root = self.root_fd()?;
        // openat2 answers EAGAIN when a rename anywhere on the system raced a `..`
        // in the resolution (sysfs links are relative, full of `..`): it may be
        // retried. After a few races the user-space walk, under the same rules,
        // resolves it instead.
        for _ in 0..OPENAT2_RACE_RETRIES {
            match rustix::fs::openat2(
                root,
                rel,
                access.flags(),
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                Ok(fd) => return Ok(fs::File::from(fd)),
                Err(e) if e == rustix::io::Errno::AGAIN => {}
                Err(e) if e == rustix::io::Errno::NOSYS || e == rustix::io::Errno::PERM => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(fs::File::from(self.open_without_openat2(&clean, access)?))
    }

    /// The fallback of [`HostRoot::open`] without `openat2`: on `/` the kernel's
    /// own resolution (everything is inside `/`); under a fixture root, links are
    /// resolved in user space under the root ([`HostRoot::resolve_in_root`]) and
    /// the final open refuses a link.
    fn open_without_openat2(&self, clean: &str, access: Access) -> io::Result<OwnedFd> {
        let target = if self.root == Path::new("/") {
            clean.to_owned()
        } else {
            self.resolve_in_root(clean, access.follows_last())?
        };
        let mut flags = access.flags();
        if self.root != Path::new("/") {
            flags |= OFlags::NOFOLLOW;
        }
        Ok(rustix::fs::open(self.path(&target), flags, Mode::empty())?)
    }

    /// Resolves every link of `kernel_path` in user space, under the root (an
    /// absolute target is re-rooted, `..` stops at the root), the last component
    /// only with `follow_last`. More than 40 links is `ELOOP`.
    ///
    /// # Errors
    /// A link that cannot be read or is not UTF-8; too many links.
    pub fn resolve_in_root(&self, kernel_path: &str, follow_last: bool) -> io::Result<String> {
        let mut todo: Vec<String> = kernel_path.split('/').rev().map(str::to_owned).collect();
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
            let last = todo.iter().all(|c| c.is_empty() || c == ".");
            if last && !follow_last {
                break;
            }
            let kp = join(&cur.iter().map(String::as_str).collect::<Vec<_>>());
            match fs::read_link(self.path(&kp)) {
                Ok(t) => {
                    hops += 1;
                    if hops > 40 {
                        return Err(io::Error::from_raw_os_error(40));
                    }
                    let t = t.into_os_string().into_string().map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "link target is not UTF-8")
                    })?;
                    cur.pop();
                    if t.starts_with('/') {
                        cur.clear();
                    }
                    todo.extend(t.split('/').rev().map(str::to_owned));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(_) => {}
            }
        }
        // Components after a missing one are kept as they are.
        let rest = todo.into_iter().rev().collect::<Vec<String>>().join("/");
        let mut all: Vec<&str> = cur.iter().map(String::as_str).collect();
        push_components(&mut all, &rest);
        Ok(join(&all))
    }

    /// Reads the regular file at `kernel_path` under the root, at most `limit`
    /// bytes, following a link in the last component (in the root). For files
    /// devfence keeps under a root: its configuration, pid files, keys.
    ///
    /// # Errors
    /// [`ReadFileError`] naming the kernel path.
    pub fn read_file(&self, kernel_path: &str, limit: u64) -> Result<Vec<u8>, ReadFileError> {
        self.read_with(kernel_path, limit, Access::Read)
    }

    /// Reads a sysfs attribute: like [`HostRoot::read_file`], but a link in the
    /// last component is refused (the kernel never makes an attribute a link).
    ///
    /// # Errors
    /// [`ReadFileError`] naming the kernel path.
    pub fn read_attr(&self, kernel_path: &str, limit: u64) -> Result<Vec<u8>, ReadFileError> {
        self.read_with(kernel_path, limit, Access::ReadNoFollow)
    }

    fn read_with(
        &self,
        kernel_path: &str,
        limit: u64,
        access: Access,
    ) -> Result<Vec<u8>, ReadFileError> {
        let shown = self.shown(kernel_path);
        let f = self
            .open_unchecked(kernel_path, access)
            .map_err(|source| ReadFileError::Open {
                path: shown.clone(),
                source: explain_open(source),
            })?;
        bounded::read_opened(&f, &shown, limit)
    }

    /// How a kernel path is named in errors: itself on `/`, else with the root.
    fn shown(&self, kernel_path: &str) -> String {
        if self.root == Path::new("/") {
            normalize(kernel_path)
        } else {
            self.path(kernel_path).display().to_string()
        }
    }

    /// Creates the file at `kernel_path` afresh for writing — for files devfence
    /// hands out under a root, such as a VF token for a launcher. Every directory
    /// from the root down is created when absent (mode 0755) and must be a real
    /// directory: a symbolic link anywhere on the way is refused (`ELOOP` with a
    /// message naming it), on a real host as on a fixture. A previous file of that
    /// name is removed (a link there is removed, not followed) and the new one is
    /// created exclusively with `mode`, never through a link.
    ///
    /// # Errors
    /// A link or non-directory on the way; the create's error.
    pub fn create_fresh_file(&self, kernel_path: &str, mode: u32) -> io::Result<fs::File> {
        let (dir, name) = self
            .real_parent(kernel_path, true)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let name = name.as_str();
        match rustix::fs::unlinkat(&dir, name, rustix::fs::AtFlags::empty()) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::NOENT => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat(
            &dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        Ok(fs::File::from(fd))
    }

    /// Opens (creating it when absent, mode 0600) the lock file at
    /// `kernel_path`, reached through real directories only as
    /// [`HostRoot::create_fresh_file`] does; never truncated, never a link.
    ///
    /// # Errors
    /// A link or non-directory on the way; the open's error; not a regular file.
    pub fn open_lock_file(&self, kernel_path: &str) -> io::Result<fs::File> {
        let (dir, name) = self
            .real_parent(kernel_path, true)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let fd = rustix::fs::openat(
            &dir,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let f = fs::File::from(fd);
        let t = f.metadata()?.file_type();
        if !t.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {}, not a regular file", bounded::kind_name(t)),
            ));
        }
        Ok(f)
    }

    /// Replaces the file at `kernel_path` with `contents` atomically: a new file
    /// beside it (mode `mode`) renamed over it, through real directories only.
    /// Returns the new file's metadata.
    ///
    /// # Errors
    /// A link or non-directory on the way; the create, write or rename error.
    pub fn replace_file(
        &self,
        kernel_path: &str,
        contents: &[u8],
        mode: u32,
    ) -> io::Result<fs::Metadata> {
        use std::io::Write;
        let (dir, name) = self
            .real_parent(kernel_path, true)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let tmp = format!(".{name}.{}.tmp", std::process::id());
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        let mut f = fs::File::from(fd);
        let written = f.write_all(contents).and_then(|()| f.metadata());
        let m = match written {
            Ok(m) => m,
            Err(e) => {
                let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
                return Err(e);
            }
        };
        rustix::fs::renameat(&dir, tmp.as_str(), &dir, name.as_str())?;
        Ok(m)
    }

    /// Removes the file at `kernel_path` (a link there is removed, not followed),
    /// reaching it only through real directories as
    /// [`HostRoot::create_fresh_file`] does. Returns whether there was one.
    ///
    /// # Errors
    /// A link or non-directory on the way; the unlink's error.
    pub fn remove_file(&self, kernel_path: &str) -> io::Result<bool> {
        let Some((dir, name)) = self.real_parent(kernel_path, false)? else {
            return Ok(false);
        };
        match rustix::fs::unlinkat(&dir, name.as_str(), rustix::fs::AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The directory holding `kernel_path`, walked from the root one real
    /// directory at a time (`O_NOFOLLOW`: a link anywhere is refused), created
    /// when absent with `create`; `None` when absent without it. Also returns the
    /// last component.
    fn real_parent(
        &self,
        kernel_path: &str,
        create: bool,
    ) -> io::Result<Option<(OwnedFd, String)>> {
        let clean = normalize(kernel_path);
        let mut parts: Vec<&str> = clean.split('/').filter(|c| !c.is_empty()).collect();
        let name = parts
            .pop()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
            .to_owned();
        let mut dir = rustix::fs::openat(
            self.root_fd()?,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut walked = String::new();
        for c in parts {
            walked.push('/');
            walked.push_str(c);
            if create {
                match rustix::fs::mkdirat(&dir, c, Mode::from_raw_mode(0o755)) {
                    Ok(()) => {}
                    Err(e) if e == rustix::io::Errno::EXIST => {}
                    Err(e) => return Err(e.into()),
                }
            }
            dir = match rustix::fs::openat(
                &dir,
                c,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(d) => d,
                Err(e) if !create && e == rustix::io::Errno::NOENT => return Ok(None),
                Err(e) if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{walked} is a symbolic link or not a directory (devfence writes there only through real directories)"
                        ),
                    ));
                }
                Err(e) => return Err(e.into()),
            };
        }
        Ok(Some((dir, name)))
    }

    /// Lists the directory at `kernel_path` under the root: each name with its
    /// type as the directory reports it (`d_type`; `None` when unknown), `.` and
    /// `..` left out, in directory order.
    ///
    /// # Errors
    /// The open or read error (`NotFound`, `NotADirectory`, …).
    pub fn list_dir(&self, kernel_path: &str) -> io::Result<Vec<DirEntry>> {
        let f = self.open(kernel_path, Access::Dir)?;
        // getdents64 into an uninitialised buffer on the stack: no copy of the
        // descriptor, no zeroing (this runs for every directory the inventory
        // lists).
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16 * 1024];
        let mut dir = rustix::fs::RawDir::new(f.as_fd(), &mut buf);
        let mut out = Vec::new();
        while let Some(e) = dir.next() {
            let e = e?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let kind = match e.file_type() {
                rustix::fs::FileType::RegularFile => Some(EntryKind::File),
                rustix::fs::FileType::Directory => Some(EntryKind::Dir),
                rustix::fs::FileType::Symlink => Some(EntryKind::Link),
                rustix::fs::FileType::Unknown => None,
                _ => Some(EntryKind::Other),
            };
            out.push(DirEntry {
                name: {
                    use std::os::unix::ffi::OsStrExt;
                    std::ffi::OsStr::from_bytes(name).to_owned()
                },
                kind,
            });
        }
        Ok(out)
    }

    /// The metadata of `kernel_path` under the root, following a final link (in
    /// the root) when `follow` is set.
    ///
    /// # Errors
    /// The open's or `fstat`'s error.
    pub fn metadata(&self, kernel_path: &str, follow: bool) -> io::Result<fs::Metadata> {
        let access = if follow {
            Access::Path
        } else {
            Access::PathNoFollow
        };
        self.open(kernel_path, access)?.metadata()
    }

    /// The directory that stands for `/`.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds `kernel_path` under this root:
    /// `/sys/bus/pci/devices` → `<root>/sys/bus/pci/devices`.
    ///
    /// The kernel path is normalised lexically first (`.` dropped, `..` removes the
    /// previous component and stops at `/`), so the result never lies outside the
    /// root. A relative kernel path is taken from `/`.
    #[must_use]
    pub fn path(&self, kernel_path: &str) -> PathBuf {
        let mut out = PathBuf::new();
        self.path_into(kernel_path, &mut out);
        out
    }

    /// [`HostRoot::path`] into a caller's buffer, so that a reader can reuse one
    /// allocation for every file it opens.
    pub fn path_into(&self, kernel_path: &str, out: &mut PathBuf) {
        let clean: Cow<'_, str> = if needs_normalizing(kernel_path) {
            Cow::Owned(normalize(kernel_path))
        } else {
            Cow::Borrowed(kernel_path)
        };
        let rel = clean.trim_start_matches('/');
        let s = out.as_mut_os_string();
        s.clear();
        s.push(self.root.as_os_str());
        if !rel.is_empty() {
            if !self.root.as_os_str().as_encoded_bytes().ends_with(b"/") {
                s.push("/");
            }
            s.push(rel);
        }
    }

    /// The file that holds `kernel_path`, its links resolved *in* the root
    /// ([`HostRoot::resolve_in_root`]): for paths devfence hands to code that
    /// opens by path (SQLite, key and envelope files), so that a link in a fixture
    /// tree is re-rooted instead of followed out. On `/` it is [`HostRoot::path`].
    ///
    /// # Errors
    /// A link on the way cannot be read; too many links.
    pub fn path_in_root(&self, kernel_path: &str) -> io::Result<PathBuf> {
        if self.root == Path::new("/") {
            return Ok(self.path(kernel_path));
        }
        Ok(self.path(&self.resolve_in_root(kernel_path, true)?))
    }

    /// The kernel path of a file under this root, always starting with `/`:
    /// `<root>/sys/devices/x` → `/sys/devices/x`. A path outside the root is
    /// returned as it is (made absolute-looking), lossily decoded.
    #[must_use]
    pub fn kernel_path(&self, real: &Path) -> String {
        match real.strip_prefix(&self.root) {
            Ok(rel) => normalize(&rel.to_string_lossy()),
            Err(_) => {
                let s = real.to_string_lossy();
                if s.starts_with('/') {
                    s.into_owned()
                } else {
                    format!("/{s}")
                }
            }
        }
    }

    /// The text of the symlink at `link_kernel_path`, as stored in the link.
    ///
    /// # Errors
    /// The link cannot be read (absent, not a symlink) or its target is not UTF-8
    /// (`InvalidData`).
    pub fn read_link(&self, link_kernel_path: &str) -> io::Result<String> {
        let target = self.read_link_raw(link_kernel_path)?;
        target.into_string().map_err(|t| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "link target {:?} is not valid UTF-8",
                    t.to_string_lossy().chars().take(80).collect::<String>()
                ),
            )
        })
    }

    /// The text of the symlink at `link_kernel_path`, the directories on the way
    /// resolved in the root (`readlinkat` on an `O_PATH|O_NOFOLLOW` handle).
    ///
    /// # Errors
    /// The link cannot be read; `InvalidInput` when it is not a symlink.
    pub fn read_link_raw(&self, link_kernel_path: &str) -> io::Result<std::ffi::OsString> {
        let f = self.open(link_kernel_path, Access::PathNoFollow)?;
        match rustix::fs::readlinkat(f.as_fd(), c"", Vec::new()) {
            Ok(t) => {
                use std::os::unix::ffi::OsStringExt;
                Ok(std::ffi::OsString::from_vec(t.into_bytes()))
            }
            // readlinkat on a handle that is not a link says ENOENT; say what it is.
            Err(e) if e == rustix::io::Errno::NOENT => Err(io::Error::from_raw_os_error(22)),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the symlink at `link_kernel_path` and returns the kernel path it
    /// points at, resolved lexically ([`resolve_target`]). The target need not
    /// exist.
    ///
    /// # Errors
    /// As [`HostRoot::read_link`].
    pub fn resolve_link(&self, link_kernel_path: &str) -> io::Result<String> {
        let target = self.read_link(link_kernel_path)?;
        Ok(resolve_target(link_kernel_path, &target))
    }

    /// Checks that the root is an existing directory.
    ///
    /// # Errors
    /// [`HostError`] naming the root when it is missing, not a directory, or cannot
    /// be examined.
    pub fn check(&self) -> Result<(), HostError> {
        match fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(HostError::RootNotDirectory {
                path: self.root.clone(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(HostError::RootMissing {
                path: self.root.clone(),
            }),
            Err(source) => Err(HostError::RootUnreadable {
                path: self.root.clone(),
                source,
            }),
        }
    }
}

/// A directory under a [`HostRoot`], opened once (in the root, as
/// [`HostRoot::open`] with [`Access::Dir`]), whose files are then opened
/// relative to it: `openat2(dir, name, …, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
/// walks only `name` (usually one component) instead of the whole kernel path
/// from the root. The properties of [`HostRoot::open`] hold for every open: no
/// link is followed out of the directory (a link that would leave it, `EXDEV`,
/// is resolved in the root by [`HostRoot::open`] on the whole kernel path, the
/// same fallback as for a kernel without `openat2`), magic links are refused,
/// files are opened non-blocking and must be regular files where read, and a
/// link in the last component is refused for [`Access::ReadNoFollow`].
pub struct RootDir<'r> {
    root: &'r HostRoot,
    fd: OwnedFd,
    kernel_path: String,
    /// Whether the descriptor's offset has moved (a listing): the next listing
    /// seeks back to the start first.
    listed: bool,
}

impl std::fmt::Debug for RootDir<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootDir")
            .field("kernel_path", &self.kernel_path)
            .finish_non_exhaustive()
    }
}

impl HostRoot {
    /// Opens the directory at `kernel_path` (links followed, in the root) for
    /// listing and for opens relative to it.
    ///
    /// # Errors
    /// The open's error (`NotFound`, `NotADirectory`, …).
    pub fn open_dir(&self, kernel_path: &str) -> io::Result<RootDir<'_>> {
        let f = self.open_unchecked(kernel_path, Access::Dir)?;
        Ok(RootDir {
            root: self,
            fd: OwnedFd::from(f),
            kernel_path: normalize(kernel_path),
            listed: false,
        })
    }
}

/// How the kernel answered a relative open that [`RootDir`] hands to the root.
fn wants_root_fallback(e: rustix::io::Errno) -> bool {
    // EXDEV: a link (or `..`) that leaves the directory; EAGAIN: a rename raced
    // the resolution; ENOSYS/EPERM: no openat2 here (kernel, seccomp).
    e == rustix::io::Errno::XDEV
        || e == rustix::io::Errno::AGAIN
        || e == rustix::io::Errno::NOSYS
        || e == rustix::io::Errno::PERM
}

impl<'r> RootDir<'r> {
    /// The directory's kernel path (normalised).
    #[must_use]
    pub fn kernel_path(&self) -> &str {
        &self.kernel_path
    }

    /// The kernel path of `name` in this directory (for errors and problems).
    #[must_use]
    pub fn child_path(&self, name: &str) -> String {
        let mut p = String::with_capacity(self.kernel_path.len() + 1 + name.len());
        p.push_str(&self.kernel_path);
        if !self.kernel_path.ends_with('/') {
            p.push('/');
        }
        p.push_str(name);
        normalize(&p)
    }

    fn check_name(name: &str) -> io::Result<()> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a relative path"),
            ));
        }
        Ok(())
    }

    /// Opens `name` (relative to this directory) as [`HostRoot::open`] would
    /// open the whole kernel path, with the same checks.
    ///
    /// # Errors
    /// As [`HostRoot::open`].
    pub fn open(&self, name: &str, access: Access) -> io::Result<fs::File> {
        Self::check_name(name)?;
        let f = match rustix::fs::openat2(
            &self.fd,
            name,
            access.flags(),
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => fs::File::from(fd),
            Err(e) if wants_root_fallback(e) => {
                return self.root.open(&self.child_path(name), access);
            }
            Err(e) => return Err(e.into()),
        };
        if access.wants_regular() {
            let t = f.metadata()?.file_type();
            if !t.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a {}, not a regular file", bounded::kind_name(t)),
                ));
            }
        }
        Ok(f)
    }

    /// Opens the subdirectory `name` (links followed as [`RootDir::open`] does).
    ///
    /// # Errors
    /// As [`HostRoot::open_dir`].
    pub fn open_dir(&self, name: &str) -> io::Result<RootDir<'r>> {
        let f = self.open(name, Access::Dir)?;
        Ok(RootDir {
            root: self.root,
            fd: OwnedFd::from(f),
            kernel_path: self.child_path(name),
            listed: false,
        })
    }

    /// The text of the symlink `name` in this directory, into `out` (cleared
    /// first). A single component is read with `readlinkat(dir, name)`, which
    /// follows nothing; a longer relative path goes through a handle opened as
    /// [`RootDir::open`] does with [`Access::PathNoFollow`].
    ///
    /// # Errors
    /// As [`HostRoot::read_link_raw`]: `InvalidInput` when it is not a symlink.
    pub fn read_link_into(&self, name: &str, out: &mut Vec<u8>) -> io::Result<()> {
        Self::check_name(name)?;
        let single = !name.contains('/') && name != "." && name != "..";
        let handle;
        let (dirfd, at): (std::os::fd::BorrowedFd<'_>, &str) = if single {
            (self.fd.as_fd(), name)
        } else {
            handle = self.open(name, Access::PathNoFollow)?;
            (handle.as_fd(), "")
        };
        let taken = std::mem::take(out);
        match rustix::fs::readlinkat(dirfd, at, taken) {
            Ok(t) => {
                *out = t.into_bytes();
                Ok(())
            }
            // readlinkat of something that is not a link says EINVAL (by name) or
            // ENOENT (by an O_PATH handle); say what it is.
            Err(e) if e == rustix::io::Errno::NOENT && !single => {
                Err(io::Error::from_raw_os_error(22))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Calls `f` with the name and type (`d_type`; `None` when unknown) of
    /// every entry of this directory, `.` and `..` left out, in directory order,
    /// without allocating per entry. Lists from the start each time.
    ///
    /// # Errors
    /// The read error.
    pub fn for_each_entry(
        &mut self,
        mut f: impl FnMut(&[u8], Option<EntryKind>),
    ) -> io::Result<()> {
        if self.listed {
            rustix::fs::seek(&self.fd, rustix::fs::SeekFrom::Start(0))?;
        }
        self.listed = true;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 32 * 1024];
        let mut dir = rustix::fs::RawDir::new(&self.fd, &mut buf);
        while let Some(e) = dir.next() {
            let e = e?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            f(name, entry_kind(e.file_type()));
        }
        Ok(())
    }
}

fn entry_kind(t: rustix::fs::FileType) -> Option<EntryKind> {
    match t {
        rustix::fs::FileType::RegularFile => Some(EntryKind::File),
        rustix::fs::FileType::Directory => Some(EntryKind::Dir),
        rustix::fs::FileType::Symlink => Some(EntryKind::Link),
        rustix::fs::FileType::Unknown => None,
        _ => Some(EntryKind::Other),
    }
}

/// What a directory entry is, as its directory reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Link,
    /// Anything else (FIFO, socket, device node).
    Other,
}

/// One entry of [`HostRoot::list_dir`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name (not necessarily UTF-8).
    pub name: std::ffi::OsString,
    /// Its type (`None` when the file system does not say).
    pub kind: Option<EntryKind>,
}

/// A refused link (`ELOOP` from `O_NOFOLLOW`) explained.
fn explain_open(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(40) {
        io::Error::new(
            e.kind(),
            "a symbolic link where a file is expected (devfence does not follow it)",
        )
    } else {
        e
    }
}

/// Whether `p` has a `.` or `..` component. Runs for every path read, so the
/// common case (no component starts with a dot) is a single substring search.
fn needs_normalizing(p: &str) -> bool {
    (p.starts_with('.') || p.contains("/.")) && p.split('/').any(|c| c == "." || c == "..")
}

/// Appends the components of `path` to `parts`: empty and `.` components are
/// dropped, `..` removes the last component (and does nothing at `/`).
fn push_components<'a>(parts: &mut Vec<&'a str>, path: &'a str) {
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            _ => parts.push(c),
        }
    }
}

fn join(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum::<usize>().max(1));
    for p in parts {
        out.push('/');
        out.push_str(p);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// A kernel path in normal form: absolute, no `.`/`..`/empty components, no
/// trailing `/` (except `/` itself). `..` at `/` stays at `/`.
#[must_use]
pub fn normalize(kernel_path: &str) -> String {
    let mut parts = Vec::new();
    push_components(&mut parts, kernel_path);
    join(&parts)
}

/// Where a symlink at `link_kernel_path` with the stored text `target` points, as
/// a normalised kernel path: a relative target is taken from the link's directory,
/// an absolute target is a kernel path (re-rooted under the host root), and `..`
/// never climbs above `/`.
///
/// `resolve_target("/sys/bus/pci/devices/0000:3b:00.0",
/// "../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0")` is
/// `/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0`.
#[must_use]
pub fn resolve_target(link_kernel_path: &str, target: &str) -> String {
    let mut parts = Vec::new();
    if !target.starts_with('/') {
        push_components(&mut parts, link_kernel_path);
        parts.pop();
    }
    push_components(&mut parts, target);
    join(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn path_maps_under_the_root_and_back() {
        let r = HostRoot::new("/tmp/fix");
        assert_eq!(
            r.path("/sys/bus/pci/devices"),
            PathBuf::from("/tmp/fix/sys/bus/pci/devices")
        );
        assert_eq!(r.path("sys/bus"), PathBuf::from("/tmp/fix/sys/bus"));
        assert_eq!(r.path("/"), PathBuf::from("/tmp/fix"));
        assert_eq!(
            r.path("/../../etc/passwd"),
            PathBuf::from("/tmp/fix/etc/passwd")
        );
        assert_eq!(
            r.path("/sys/./bus/../class"),
            PathBuf::from("/tmp/fix/sys/class")
        );
        assert_eq!(r.path("../x"), PathBuf::from("/tmp/fix/x"));
        assert_eq!(
            r.path("/sys/.hidden/a.b"),
            PathBuf::from("/tmp/fix/sys/.hidden/a.b")
        );
        assert_eq!(
            HostRoot::new("/tmp/fix/").path("/sys"),
            PathBuf::from("/tmp/fix/sys")
        );
        let mut buf = PathBuf::from("/stale/contents/that/are/long");
        r.path_into("/dev/vfio/41", &mut buf);
        assert_eq!(buf, PathBuf::from("/tmp/fix/dev/vfio/41"));
        assert_eq!(
            r.kernel_path(Path::new("/tmp/fix/sys/devices/x")),
            "/sys/devices/x"
        );
        assert_eq!(r.kernel_path(Path::new("/tmp/fix")), "/");
        assert_eq!(r.kernel_path(Path::new("/elsewhere/x")), "/elsewhere/x");
        assert_eq!(r.kernel_path(Path::new("rel/x")), "/rel/x");

        let real = HostRoot::default();
        assert_eq!(real.root(), Path::new("/"));
        assert_eq!(real.path("/sys/bus"), PathBuf::from("/sys/bus"));
        assert_eq!(real.kernel_path(Path::new("/sys/bus")), "/sys/bus");
    }

    #[test]
    fn targets_resolve_lexically_and_never_escape() {
        assert_eq!(
            resolve_target(
                "/sys/bus/pci/devices/0000:3b:00.0",
                "../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0"
            ),
            "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0"
        );
        assert_eq!(
            resolve_target(
                "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/virtfn1",
                "../0000:3b:00.2"
            ),
            "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.2"
        );
        assert_eq!(
            resolve_target("/sys/a/link", "/sys/kernel/iommu_groups/4"),
            "/sys/kernel/iommu_groups/4"
        );
        assert_eq!(resolve_target("/sys/a/link", "../../../../../etc"), "/etc");
        assert_eq!(resolve_target("/sys/a/link", "./b//c/"), "/sys/a/b/c");
        assert_eq!(resolve_target("/link", ".."), "/");
        assert_eq!(normalize(""), "/");
        assert_eq!(normalize("//sys//bus/"), "/sys/bus");
    }

    #[test]
    fn resolve_link_reads_the_link_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let r = HostRoot::new(dir.path());
        fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
        symlink(
            "../../../devices/pci0000:3a/0000:3b:00.0",
            dir.path().join("sys/bus/pci/devices/0000:3b:00.0"),
        )
        .unwrap();
        symlink("/sys/devices/x", dir.path().join("sys/abs")).unwrap();
        symlink("../../../../../../../../../..", dir.path().join("sys/up")).unwrap();
        assert_eq!(
            r.resolve_link("/sys/bus/pci/devices/0000:3b:00.0").unwrap(),
            "/sys/devices/pci0000:3a/0000:3b:00.0"
        );
        assert_eq!(r.resolve_link("/sys/abs").unwrap(), "/sys/devices/x");
        assert_eq!(r.resolve_link("/sys/up").unwrap(), "/");
        assert_eq!(
            r.read_link("/sys/abs").unwrap(),
            "/sys/devices/x".to_string()
        );
        let e = r.resolve_link("/sys/missing").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn check_names_the_root() {
        let dir = tempfile::tempdir().unwrap();
        assert!(HostRoot::new(dir.path()).check().is_ok());
        let missing = dir.path().join("nope");
        let e = HostRoot::new(&missing).check().unwrap_err();
        assert!(matches!(e, HostError::RootMissing { .. }));
        let msg = e.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("Hint:"), "{msg}");
        let file = dir.path().join("f");
        fs::write(&file, "x").unwrap();
        let e = HostRoot::new(&file).check().unwrap_err();
        assert!(matches!(e, HostError::RootNotDirectory { .. }), "{e}");
    }
    /// issue 18 item 6: every open under a root stays in it — an absolute link is
    /// re-rooted, `..` stops at the root, a link in place of an attribute and a
    /// FIFO are refused — and the user-space fallback resolves the same way.
    /// openat2 with RESOLVE_IN_ROOT answers EAGAIN when a rename anywhere on the
    /// system races a `..` of the resolution (sysfs links are all `../..`): an
    /// open never fails for that — the crash suite's concurrent jobs, which rename
    /// their simulated kernels' state files, saw `EAGAIN` reading a VF's
    /// `infiniband` directory and quarantined it.
    #[test]
    fn a_racing_rename_never_fails_an_open() {
        let dir = tempfile::tempdir().unwrap();
        let r = HostRoot::new(dir.path());
        fs::create_dir_all(dir.path().join("sys/devices/pci/0000:3b:00.1")).unwrap();
        fs::write(
            dir.path().join("sys/devices/pci/0000:3b:00.1/vendor"),
            "0x15b3\n",
        )
        .unwrap();
        fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
        symlink(
            "../../../devices/pci/0000:3b:00.1",
            dir.path().join("sys/bus/pci/devices/0000:3b:00.1"),
        )
        .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renamer = {
            let stop = std::sync::Arc::clone(&stop);
            let d = dir.path().join("churn");
            fs::create_dir_all(&d).unwrap();
            std::thread::spawn(move || {
                let (a, b) = (d.join("a"), d.join("b"));
                fs::write(&a, "x").unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = fs::rename(&a, &b);
                    let _ = fs::rename(&b, &a);
                }
            })
        };
        let mut failures = Vec::new();
        for _ in 0..20_000 {
            if let Err(e) = r.read_file(
                "/sys/bus/pci/devices/0000:3b:00.1/../0000:3b:00.1/vendor",
                64,
            ) {
                failures.push(e.to_string());
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        renamer.join().unwrap();
        assert!(
            failures.is_empty(),
            "{} opens failed: {:?}",
            failures.len(),
            failures.first()
        );
    }

    #[test]
    fn opens_stay_in_the_root() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "outside").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let r = HostRoot::new(dir.path());
        fs::create_dir_all(dir.path().join("sys/a")).unwrap();
        fs::create_dir_all(dir.path().join(outside.path().strip_prefix("/").unwrap())).unwrap();
        fs::write(
            dir.path()
                .join(outside.path().strip_prefix("/").unwrap())
                .join("secret"),
            "inside",
        )
        .unwrap();
        let abs = outside.path().join("secret");
        symlink(&abs, dir.path().join("sys/a/abs")).unwrap();
        symlink(
            format!("{}{}", "../".repeat(30), abs.display()),
            dir.path().join("sys/a/up"),
        )
        .unwrap();
        symlink(outside.path(), dir.path().join("sys/d")).unwrap();
        // Followed in the root: the fixture's own copy, never the outside file.
        assert_eq!(r.read_file("/sys/a/abs", 100).unwrap(), b"inside");
        assert_eq!(r.read_file("/sys/a/up", 100).unwrap(), b"inside");
        assert_eq!(r.read_file("/sys/d/secret", 100).unwrap(), b"inside");
        // An attribute that is a link is refused.
        let e = r.read_attr("/sys/a/abs", 100).unwrap_err();
        assert!(e.to_string().contains("sys/a/abs"), "{e}");
        assert!(format!("{e:?}").contains("symbolic link"), "{e:?}");
        // The user-space resolution agrees.
        let inside = format!("{}/secret", outside.path().display());
        assert_eq!(r.resolve_in_root("/sys/a/abs", true).unwrap(), inside);
        assert_eq!(r.resolve_in_root("/sys/a/up", true).unwrap(), inside);
        assert_eq!(r.resolve_in_root("/sys/d/secret", true).unwrap(), inside);
        assert_eq!(
            r.resolve_in_root("/sys/a/abs", false).unwrap(),
            "/sys/a/abs"
        );
        // A FIFO never blocks.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("sys/a/fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let e = r.read_file("/sys/a/fifo", 100).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        // Opened for writing without a reader: ENXIO at once, never a wait.
        assert!(r.open("/sys/a/fifo", Access::WriteNoFollow).is_err());
        // Listing through an escaping directory link lists the fixture's copy.
        let names: Vec<_> = r
            .list_dir("/sys/d")
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
        // A size cap.
        let e = r.read_file("/sys/a/abs", 3).unwrap_err();
        assert!(matches!(e, ReadFileError::TooLarge { limit: 3, .. }), "{e}");
        // Without openat2 (old kernels, seccomp) the fallback keeps the same rules.
        for p in ["/sys/a/abs", "/sys/a/up", "/sys/d/secret"] {
            let fd = r.open_without_openat2(p, Access::Read).unwrap();
            let mut s = String::new();
            std::io::Read::read_to_string(&mut fs::File::from(fd), &mut s).unwrap();
            assert_eq!(s, "inside", "{p}");
        }
        let e = r
            .open_without_openat2("/sys/a/abs", Access::ReadNoFollow)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(40), "{e}");
    }
    /// issue 18 item 6: a file devfence hands out under a root is never written
    /// through a link: a linked directory on the way is refused, a link in the
    /// file's place is replaced, not followed.
    #[test]
    fn relative_opens_keep_the_rules_of_the_root() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "outside").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let r = HostRoot::new(dir.path());
        let copy = dir.path().join(outside.path().strip_prefix("/").unwrap());
        fs::create_dir_all(&copy).unwrap();
        fs::write(copy.join("secret"), "inside").unwrap();
        fs::create_dir_all(dir.path().join("sys/a/sub")).unwrap();
        fs::write(dir.path().join("sys/a/vendor"), "0x15b3\n").unwrap();
        fs::write(dir.path().join("sys/a/sub/dev"), "241:0\n").unwrap();
        let abs = outside.path().join("secret");
        symlink(&abs, dir.path().join("sys/a/abs")).unwrap();
        symlink(
            format!("{}{}", "../".repeat(30), abs.display()),
            dir.path().join("sys/a/up"),
        )
        .unwrap();
        symlink("vendor", dir.path().join("sys/a/near")).unwrap();
        symlink(outside.path(), dir.path().join("sys/a/d")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("sys/a/fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let read = |f: io::Result<fs::File>| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut f.unwrap(), &mut s).unwrap();
            s
        };
        let mut a = r.open_dir("/sys/a").unwrap();
        assert_eq!(a.kernel_path(), "/sys/a");
        assert_eq!(read(a.open("vendor", Access::ReadNoFollow)), "0x15b3\n");
        assert_eq!(read(a.open("sub/dev", Access::ReadNoFollow)), "241:0\n");
        // A link that leaves the directory is followed in the root, never out
        // of it: the fixture's own copy.
        assert_eq!(read(a.open("abs", Access::Read)), "inside");
        assert_eq!(read(a.open("up", Access::Read)), "inside");
        assert_eq!(read(a.open("near", Access::Read)), "0x15b3\n");
        assert_eq!(read(a.open("d/secret", Access::Read)), "inside");
        let d = a.open_dir("d").unwrap();
        assert_eq!(read(d.open("secret", Access::ReadNoFollow)), "inside");
        // An attribute that is a link is refused, wherever it points.
        for name in ["abs", "up", "near"] {
            let e = a.open(name, Access::ReadNoFollow).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(40), "{name}: {e}");
        }
        // A FIFO is not read, and never blocks.
        let e = a.open("fifo", Access::ReadNoFollow).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        // Nothing but relative paths.
        let e = a.open("/etc/passwd", Access::Read).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        // `..` stays in the root.
        assert_eq!(
            read(a.open("../a/vendor", Access::ReadNoFollow)),
            "0x15b3\n"
        );
        let top = r.open_dir("/").unwrap();
        assert!(top.open("../../../etc/passwd", Access::Read).is_err());
        // Links are read as they are, and only links.
        let mut t = Vec::new();
        a.read_link_into("near", &mut t).unwrap();
        assert_eq!(t, b"vendor");
        a.read_link_into("abs", &mut t).unwrap();
        assert_eq!(t, abs.as_os_str().as_encoded_bytes());
        let e = a.read_link_into("vendor", &mut t).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let e = a.read_link_into("absent", &mut t).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        // Listing, twice (the second from the start again).
        for _ in 0..2 {
            let mut names = Vec::new();
            a.for_each_entry(|n, k| names.push((n.to_vec(), k)))
                .unwrap();
            assert_eq!(names.len(), 7, "{names:?}");
            assert!(names.contains(&(b"sub".to_vec(), Some(EntryKind::Dir))));
            assert!(names.contains(&(b"abs".to_vec(), Some(EntryKind::Link))));
            assert!(names.contains(&(b"fifo".to_vec(), Some(EntryKind::Other))));
        }
        assert_eq!(a.child_path("sub/dev"), "/sys/a/sub/dev");
    }

    #[test]
    fn fresh_files_are_never_written_through_links() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let r = HostRoot::new(dir.path());
        let mut f = r
            .create_fresh_file("/run/devfence/tokens/a.token", 0o600)
            .unwrap();
        std::io::Write::write_all(&mut f, b"x").unwrap();
        assert_eq!(
            fs::read(dir.path().join("run/devfence/tokens/a.token")).unwrap(),
            b"x"
        );
        // A link in the file's place is removed, not written through.
        let target = outside.path().join("victim");
        fs::write(&target, "keep").unwrap();
        fs::remove_file(dir.path().join("run/devfence/tokens/a.token")).unwrap();
        symlink(&target, dir.path().join("run/devfence/tokens/a.token")).unwrap();
        r.create_fresh_file("/run/devfence/tokens/a.token", 0o600)
            .unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        // A linked directory is refused, whether it points out or in.
        fs::remove_dir_all(dir.path().join("run/devfence/tokens")).unwrap();
        symlink(outside.path(), dir.path().join("run/devfence/tokens")).unwrap();
        let e = r
            .create_fresh_file("/run/devfence/tokens/b.token", 0o600)
            .unwrap_err();
        assert!(e.to_string().contains("/run/devfence/tokens"), "{e}");
        assert!(!outside.path().join("b.token").exists());
    }
}
