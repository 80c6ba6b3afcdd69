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

use std::borrow::Cow;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoot {
    root: PathBuf,
}

impl Default for HostRoot {
    /// The running host: root `/`.
    fn default() -> Self {
        Self::new("/")
    }
}

impl HostRoot {
    /// A host whose `/` is the directory `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
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
        let target = fs::read_link(self.path(link_kernel_path))?;
        target.into_os_string().into_string().map_err(|t| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "link target {:?} is not valid UTF-8",
                    t.to_string_lossy().chars().take(80).collect::<String>()
                ),
            )
        })
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
}
