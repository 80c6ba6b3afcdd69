//! The running kernel: sysfs writes, rtnetlink, VFIO ioctls.
//!
//! Every path is a kernel path mapped under the [`HostRoot`] (`/` on a real host),
//! so that the same code can be pointed at a scratch tree in tests.

use std::fs::{self, Permissions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;

use devfence_model::{Bdf, Guid, IommuGroupId};

use super::{Errno, GuidKind, KernelIo, PfHandle, netlink, vfio};
use crate::root::{Access, HostRoot, MAX_ATTR_BYTES};

/// The running kernel, seen under `root`.
#[derive(Clone, Debug)]
pub struct RealKernel {
    root: HostRoot,
}

impl RealKernel {
    /// The kernel whose files are under `root` (`/` on a real host).
    #[must_use]
    pub fn new(root: HostRoot) -> Self {
        Self { root }
    }
}

fn errno(e: &io::Error) -> Errno {
    if e.kind() == io::ErrorKind::InvalidData && e.raw_os_error().is_none() {
        return Errno::EINVAL;
    }
    Errno::from_io(e)
}

impl KernelIo for RealKernel {
    fn root(&self) -> &HostRoot {
        &self.root
    }

    /// Opens the attribute for writing (no create, no truncate) and writes the
    /// value in one `write(2)`, as sysfs expects: a store sees the whole value
    /// once. A short write is an `EIO`.
    fn write(&self, path: &str, value: &[u8]) -> Result<(), Errno> {
        // In the root, not through a link, non-blocking, a regular file only.
        let mut f = self
            .root
            .open(path, Access::WriteNoFollow)
            .map_err(|e| errno(&e))?;
        let n = f.write(value).map_err(|e| errno(&e))?;
        if n == value.len() {
            Ok(())
        } else {
            Err(Errno::EIO)
        }
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, Errno> {
        self.root
            .read_attr(path, MAX_ATTR_BYTES)
            .map_err(|e| errno(&e.into_io()))
    }

    fn read_link(&self, path: &str) -> Result<String, Errno> {
        self.root.read_link(path).map_err(|e| errno(&e))
    }

    fn exists(&self, path: &str) -> bool {
        self.root.metadata(path, false).is_ok()
    }

    /// On the node found in the root (a link followed in the root only), through
    /// its handle.
    fn chown(&self, path: &str, uid: u32, gid: u32) -> Result<(), Errno> {
        let node = self.root.open(path, Access::Path).map_err(|e| errno(&e))?;
        rustix::fs::chownat(
            &node,
            c"",
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            rustix::fs::AtFlags::EMPTY_PATH,
        )
        .map_err(|e| Errno(e.raw_os_error()))
    }

    /// On the node found in the root, through `/proc/self/fd/<handle>` (there is
    /// no `fchmod` on an `O_PATH` handle before Linux 6.6).
    fn chmod(&self, path: &str, mode: u32) -> Result<(), Errno> {
        let node = self.root.open(path, Access::Path).map_err(|e| errno(&e))?;
        fs::set_permissions(
            format!("/proc/self/fd/{}", node.as_raw_fd()),
            Permissions::from_mode(mode),
        )
        .map_err(|e| errno(&e))
    }

    /// `RTM_SETLINK` on the netdev's index (`/sys/class/net/<netdev>/ifindex`).
    fn set_vf_guid(
        &self,
        pf_netdev: &str,
        vf: u32,
        kind: GuidKind,
        guid: Guid,
    ) -> Result<(), Errno> {
        if pf_netdev.is_empty() || pf_netdev.contains('/') || pf_netdev.starts_with('.') {
            return Err(Errno::EINVAL);
        }
        let raw = self.read(&format!("/sys/class/net/{pf_netdev}/ifindex"))?;
        let ifindex: i32 = std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.trim_end_matches('\n').parse().ok())
            .filter(|i| *i > 0)
            .ok_or(Errno::EINVAL)?;
        netlink::set_vf_guid(ifindex, vf, kind, guid)
    }

    fn open_pf(&self, pf: Bdf, group: IommuGroupId) -> Result<Box<dyn PfHandle>, Errno> {
        Ok(Box::new(vfio::open_pf(&self.root, pf, group)?))
    }

    fn open_migration(
        &self,
        target: &crate::migration::MigTarget,
    ) -> Result<Box<dyn crate::migration::MigrationDevice>, Errno> {
        Ok(Box::new(vfio::open_named(
            &self.root,
            &target.name,
            target.group,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_style_io_under_a_scratch_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let k = RealKernel::new(root.clone());
        fs::create_dir_all(dir.path().join("sys/dev")).unwrap();
        fs::write(dir.path().join("sys/dev/attr"), b"old value\n").unwrap();
        // One write at offset 0, no truncation (sysfs semantics).
        k.write("/sys/dev/attr", b"new").unwrap();
        assert_eq!(k.read("/sys/dev/attr").unwrap(), b"new value\n");
        // No create.
        assert_eq!(k.write("/sys/dev/nope", b"1"), Err(Errno::ENOENT));
        assert_eq!(k.read("/sys/dev/nope"), Err(Errno::ENOENT));
        std::os::unix::fs::symlink("../x/y", dir.path().join("sys/dev/link")).unwrap();
        assert_eq!(k.read_link("/sys/dev/link").unwrap(), "../x/y");
        assert!(k.exists("/sys/dev/link"), "a dangling link exists");
        assert!(!k.exists("/sys/dev/nope"));
        assert_eq!(k.read_link("/sys/dev/attr"), Err(Errno::EINVAL));
        k.chmod("/sys/dev/attr", 0o600).unwrap();
        assert_eq!(k.stat("/sys/dev/attr").unwrap().mode, 0o600);
        assert_eq!(k.list_dir("/sys/dev").unwrap(), vec!["attr", "link"]);
        assert_eq!(
            k.set_vf_guid("ib0", 0, GuidKind::Node, Guid(1)),
            Err(Errno::ENOENT),
            "no /sys/class/net/ib0/ifindex under the scratch root"
        );
        assert_eq!(
            k.set_vf_guid("../x", 0, GuidKind::Node, Guid(1)),
            Err(Errno::EINVAL)
        );
    }
}
