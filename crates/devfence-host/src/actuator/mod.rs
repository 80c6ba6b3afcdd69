//! Acting on the host: the write side of the kernel seam.
//!
//! Two layers, so that the logic of every operation is written once and proven
//! against three kernels:
//!
//! * [`KernelIo`] is the primitive layer: write one sysfs attribute, read one back,
//!   read a link, chown/chmod a node, one rtnetlink request, open a PF through VFIO.
//!   Each call answers like the kernel does: success, or an [`Errno`]. Three
//!   implementations sit behind it:
//!   - [`real::RealKernel`]: the running kernel (sysfs writes, rtnetlink, VFIO ioctls);
//!   - [`recording::RecordingIo`]: records every write in order and answers reads
//!     from a script or from another `KernelIo` — for unit tests ("unbind, write
//!     vfio-pci to driver_override, probe") and for `--dry-run`;
//!   - [`crate::simkernel::SimKernel`]: an in-process model of the kernel over a
//!     fixture tree, with the kernel's semantics and errnos.
//! * [`Actuator`] is the operation layer: one method per operation an operator or
//!   the handover engine asks for (bind, set the VF count, reset, mdev create …).
//!   [`ops::SysfsActuator`] implements it over any `KernelIo`: it checks
//!   preconditions before writing, writes, reads the result back, and undoes what it
//!   did when a later step fails, so nothing is left half-applied.
//!
//! Secrets: a [`VfToken`] exists only in memory. It has no `Display`, its `Debug`
//! prints `VfToken(<redacted>)`, and it is zeroed on drop.

// `ActError` is 128 bytes (five strings and an errno). It is returned once per
// operation on a cold path and carries everything an operator needs; boxing it
// would only complicate the contract.
#![allow(clippy::result_large_err)]

pub mod files;
pub mod netlink;
pub mod ops;
pub mod real;
pub mod recording;
pub mod vfio;

use std::fmt;
use std::str::FromStr;

use devfence_model::{ApMask, Bdf, Guid, IommuGroupId, MdevUuid, ParseError};

use crate::root::HostRoot;

/// A kernel error number, as a failed write or syscall returns it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(1);
    /// No such file or directory.
    pub const ENOENT: Errno = Errno(2);
    /// I/O error.
    pub const EIO: Errno = Errno(5);
    /// Permission denied.
    pub const EACCES: Errno = Errno(13);
    /// Device or resource busy.
    pub const EBUSY: Errno = Errno(16);
    /// File exists.
    pub const EEXIST: Errno = Errno(17);
    /// No such device.
    pub const ENODEV: Errno = Errno(19);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(22);
    /// No space left on device.
    pub const ENOSPC: Errno = Errno(28);
    /// Numerical result out of range.
    pub const ERANGE: Errno = Errno(34);
    /// Inappropriate ioctl for device.
    pub const ENOTTY: Errno = Errno(25);
    /// Too many users.
    pub const EUSERS: Errno = Errno(87);
    /// Address already in use.
    pub const EADDRINUSE: Errno = Errno(98);
    /// Cannot assign requested address.
    pub const EADDRNOTAVAIL: Errno = Errno(99);
    /// Resource temporarily unavailable.
    pub const EAGAIN: Errno = Errno(11);
    /// Operation not supported.
    pub const EOPNOTSUPP: Errno = Errno(95);
    /// Interrupted system call.
    pub const EINTR: Errno = Errno(4);
    /// Is a directory.
    pub const EISDIR: Errno = Errno(21);
    /// Protocol error (a reply that does not follow the protocol).
    pub const EPROTO: Errno = Errno(71);

    /// The symbolic name, e.g. `EBUSY` (or `E<n>` for numbers not listed here).
    #[must_use]
    pub fn name(self) -> String {
        let s = match self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            4 => "EINTR",
            5 => "EIO",
            11 => "EAGAIN",
            12 => "ENOMEM",
            13 => "EACCES",
            14 => "EFAULT",
            16 => "EBUSY",
            17 => "EEXIST",
            19 => "ENODEV",
            21 => "EISDIR",
            22 => "EINVAL",
            25 => "ENOTTY",
            28 => "ENOSPC",
            34 => "ERANGE",
            71 => "EPROTO",
            87 => "EUSERS",
            95 => "EOPNOTSUPP",
            98 => "EADDRINUSE",
            99 => "EADDRNOTAVAIL",
            n => return format!("E{n}"),
        };
        s.to_string()
    }

    /// From an `io::Error` (its raw OS error; `EIO` when it has none).
    #[must_use]
    pub fn from_io(e: &std::io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(5))
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}
impl std::error::Error for Errno {}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({})", self.name())
    }
}

/// The sorted UTF-8 names in the directory at `path`, resolved in `root`.
pub(crate) fn list_dir_in_root(root: &HostRoot, path: &str) -> Result<Vec<String>, Errno> {
    let mut out: Vec<String> = root
        .list_dir(path)
        .map_err(|e| Errno::from_io(&e))?
        .into_iter()
        .filter_map(|e| e.name.into_string().ok())
        .collect();
    out.sort();
    Ok(out)
}

/// Owner, group and mode of the node at `path` (a link followed in `root`).
pub(crate) fn stat_in_root(root: &HostRoot, path: &str) -> Result<NodeMeta, Errno> {
    use std::os::unix::fs::MetadataExt;
    let m = root.metadata(path, true).map_err(|e| Errno::from_io(&e))?;
    Ok(NodeMeta {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode() & 0o7777,
    })
}

/// Which GUID of an IB VF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuidKind {
    /// The node GUID (`IFLA_VF_IB_NODE_GUID`).
    Node,
    /// The port GUID (`IFLA_VF_IB_PORT_GUID`).
    Port,
}

/// A VF token: 16 random bytes (a UUID) that the PF custodian sets on a
/// user-space-owned PF and that every opener of its VFs must present.
///
/// Write-only by design (docs/design.md principle 4): no `Display`, a redacting `Debug`,
/// zeroed on drop. The only way to see it is [`VfToken::reveal_for_launcher`], which
/// exists to hand it to the VM launcher.
#[derive(Clone, PartialEq, Eq)]
pub struct VfToken([u8; 16]);

impl VfToken {
    /// A fresh random token (version-4 UUID layout).
    ///
    /// # Errors
    /// The system's random source failed.
    pub fn fresh() -> Result<Self, Errno> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|_| Errno::EIO)?;
        devfence_model::make_uuid_v4(&mut b);
        Ok(Self(b))
    }
    /// Builds a token from known bytes (tests, and tokens handed back by a launcher).
    #[must_use]
    pub fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }
    /// The raw bytes, as `VFIO_DEVICE_FEATURE_PCI_VF_TOKEN` takes them.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
    /// The UUID text QEMU's `vf-token=` takes. Call it only to hand the token to the
    /// launcher; never log, print or store the result.
    #[must_use]
    pub fn reveal_for_launcher(&self) -> String {
        MdevUuid(self.0).to_string()
    }
}
impl fmt::Debug for VfToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VfToken(<redacted>)")
    }
}
impl Drop for VfToken {
    fn drop(&mut self) {
        // Zero the bytes; the fence keeps the compiler from eliding the stores.
        self.0 = [0; 16];
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// An open PF device held through VFIO, on which the VF token can be set.
pub trait PfHandle: Send {
    /// Sets the PF's VF token (`VFIO_DEVICE_FEATURE` SET `PCI_VF_TOKEN`).
    ///
    /// # Errors
    /// The kernel's errno (`ENOTTY` on a device that is not a PF, …).
    fn set_vf_token(&mut self, token: &VfToken) -> Result<(), Errno>;

    /// Asks the kernel to read the VF token back (`VFIO_DEVICE_FEATURE` GET
    /// `PCI_VF_TOKEN`). The kernel refuses (`EINVAL`): the token is write-only.
    /// This never returns the token; it exists so that tests can prove that nobody
    /// can read it back. `Ok(())` would mean the kernel accepted the read.
    ///
    /// # Errors
    /// The kernel's refusal (`EINVAL` expected).
    fn try_get_vf_token(&self) -> Result<(), Errno> {
        Err(Errno::EINVAL)
    }
}

/// Owner, group and permission bits of a node, as `stat(2)` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeMeta {
    /// Owner uid.
    pub uid: u32,
    /// Group gid.
    pub gid: u32,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
}

/// Whether `name` is one path component: not empty, no `/`, not `.` or `..`.
#[must_use]
pub fn is_one_component(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".."
}

/// The primitive kernel operations. Paths are kernel paths (`/sys/...`), mapped
/// under [`KernelIo::root`].
pub trait KernelIo {
    /// The host root the paths are read under.
    fn root(&self) -> &HostRoot;
    /// Writes `value` to an attribute in one `write(2)`, like `echo -n value > path`.
    ///
    /// # Errors
    /// The errno the kernel answered.
    fn write(&self, path: &str, value: &[u8]) -> Result<(), Errno>;
    /// Reads a whole attribute.
    ///
    /// # Errors
    /// The errno of the open or read.
    fn read(&self, path: &str) -> Result<Vec<u8>, Errno>;
    /// The raw target of a symlink.
    ///
    /// # Errors
    /// `ENOENT` when there is no link, or the errno of `readlink`.
    fn read_link(&self, path: &str) -> Result<String, Errno>;
    /// Whether the path exists (without following a final symlink's target).
    fn exists(&self, path: &str) -> bool;
    /// Sets owner and group of a node.
    ///
    /// # Errors
    /// The errno of `chown`.
    fn chown(&self, path: &str, uid: u32, gid: u32) -> Result<(), Errno>;
    /// Sets the permission bits of a node.
    ///
    /// # Errors
    /// The errno of `chmod`.
    fn chmod(&self, path: &str, mode: u32) -> Result<(), Errno>;
    /// Sets a VF's node or port GUID through rtnetlink on the PF's netdev
    /// (`ip link set <netdev> vf <vf> node_guid|port_guid <guid>`).
    ///
    /// # Errors
    /// The netlink error's errno.
    fn set_vf_guid(
        &self,
        pf_netdev: &str,
        vf: u32,
        kind: GuidKind,
        guid: Guid,
    ) -> Result<(), Errno>;
    /// Opens a PF bound to vfio-pci through its group (container with type1v2) and
    /// keeps it open for as long as the handle lives.
    ///
    /// # Errors
    /// The errno of the failing open or ioctl.
    fn open_pf(&self, pf: Bdf, group: IommuGroupId) -> Result<Box<dyn PfHandle>, Errno>;

    /// Opens a device through its VFIO group for its migration interface
    /// (`crate::migration`), and keeps it (and the group) open for as long as
    /// the handle lives. The default, for kernels that cannot open devices
    /// (recorders, dry runs), answers `ENODEV`.
    ///
    /// # Errors
    /// The errno of the failing open or ioctl (`EBUSY`: the group is held by
    /// another process, e.g. the VM's QEMU).
    fn open_migration(
        &self,
        target: &crate::migration::MigTarget,
    ) -> Result<Box<dyn crate::migration::MigrationDevice>, Errno> {
        let _ = target;
        Err(Errno::ENODEV)
    }

    /// Reads the files `names` of the directory `dir` in one pass: for each name,
    /// what [`KernelIo::read`] gives for `dir/name` (bounded, a regular file
    /// only), in order. A name that is not one path component (`/`, `.`, `..`,
    /// empty) is `EINVAL`. The default reads them one by one; a kernel that can
    /// resolve the directory once (the simulated one) overrides it.
    fn read_each(&self, dir: &str, names: &[String]) -> Vec<Result<Vec<u8>, Errno>> {
        names
            .iter()
            .map(|n| {
                if is_one_component(n) {
                    self.read(&format!("{dir}/{n}"))
                } else {
                    Err(Errno::EINVAL)
                }
            })
            .collect()
    }

    /// The names in a directory, sorted (`.` and `..` and non-UTF-8 names left
    /// out). The default reads the directory under [`KernelIo::root`].
    ///
    /// # Errors
    /// The errno of `opendir`/`readdir` (`ENOENT` when there is no directory).
    fn list_dir(&self, path: &str) -> Result<Vec<String>, Errno> {
        list_dir_in_root(self.root(), path)
    }

    /// Owner, group and permission bits of a node (following links). The default
    /// reads the metadata of the file under [`KernelIo::root`].
    ///
    /// # Errors
    /// The errno of `stat`.
    fn stat(&self, path: &str) -> Result<NodeMeta, Errno> {
        stat_in_root(self.root(), path)
    }

    /// Creates a fresh private file at `path` (mode 0600, owned by
    /// `uid:gid`) holding `contents`, synced. The default reaches it under
    /// [`KernelIo::root`] through real directories only, never a link
    /// ([`HostRoot::create_fresh_file`]).
    ///
    /// # Errors
    /// What failed, and the I/O error (a link on the way names the link).
    fn create_private_file(
        &self,
        path: &str,
        contents: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), files::FileStepError> {
        files::create_private_file(self.root(), path, contents, uid, gid)
    }

    /// Removes the file at `path` (a link there is removed, not followed),
    /// reached through real directories only; whether there was one.
    ///
    /// # Errors
    /// A link or non-directory on the way; the unlink's error.
    fn remove_file(&self, path: &str) -> std::io::Result<bool> {
        self.root().remove_file(path)
    }

    /// True when writes are only recorded, not performed (`--dry-run`): the
    /// actuator then skips the read-backs, which would see the host unchanged.
    fn is_dry_run(&self) -> bool {
        false
    }
}

impl<T: KernelIo + ?Sized> KernelIo for &T {
    fn root(&self) -> &HostRoot {
        (**self).root()
    }
    fn write(&self, path: &str, value: &[u8]) -> Result<(), Errno> {
        (**self).write(path, value)
    }
    fn read(&self, path: &str) -> Result<Vec<u8>, Errno> {
        (**self).read(path)
    }
    fn read_link(&self, path: &str) -> Result<String, Errno> {
        (**self).read_link(path)
    }
    fn exists(&self, path: &str) -> bool {
        (**self).exists(path)
    }
    fn chown(&self, path: &str, uid: u32, gid: u32) -> Result<(), Errno> {
        (**self).chown(path, uid, gid)
    }
    fn chmod(&self, path: &str, mode: u32) -> Result<(), Errno> {
        (**self).chmod(path, mode)
    }
    fn set_vf_guid(
        &self,
        pf_netdev: &str,
        vf: u32,
        kind: GuidKind,
        guid: Guid,
    ) -> Result<(), Errno> {
        (**self).set_vf_guid(pf_netdev, vf, kind, guid)
    }
    fn open_pf(&self, pf: Bdf, group: IommuGroupId) -> Result<Box<dyn PfHandle>, Errno> {
        (**self).open_pf(pf, group)
    }
    fn open_migration(
        &self,
        target: &crate::migration::MigTarget,
    ) -> Result<Box<dyn crate::migration::MigrationDevice>, Errno> {
        (**self).open_migration(target)
    }
    fn list_dir(&self, path: &str) -> Result<Vec<String>, Errno> {
        (**self).list_dir(path)
    }
    fn stat(&self, path: &str) -> Result<NodeMeta, Errno> {
        (**self).stat(path)
    }
    fn create_private_file(
        &self,
        path: &str,
        contents: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), files::FileStepError> {
        (**self).create_private_file(path, contents, uid, gid)
    }
    fn remove_file(&self, path: &str) -> std::io::Result<bool> {
        (**self).remove_file(path)
    }
    fn is_dry_run(&self) -> bool {
        (**self).is_dry_run()
    }
}

impl<T: KernelIo + ?Sized> KernelIo for Box<T> {
    fn root(&self) -> &HostRoot {
        (**self).root()
    }
    fn write(&self, path: &str, value: &[u8]) -> Result<(), Errno> {
        (**self).write(path, value)
    }
    fn read(&self, path: &str) -> Result<Vec<u8>, Errno> {
        (**self).read(path)
    }
    fn read_link(&self, path: &str) -> Result<String, Errno> {
        (**self).read_link(path)
    }
    fn exists(&self, path: &str) -> bool {
        (**self).exists(path)
    }
    fn chown(&self, path: &str, uid: u32, gid: u32) -> Result<(), Errno> {
        (**self).chown(path, uid, gid)
    }
    fn chmod(&self, path: &str, mode: u32) -> Result<(), Errno> {
        (**self).chmod(path, mode)
    }
    fn set_vf_guid(
        &self,
        pf_netdev: &str,
        vf: u32,
        kind: GuidKind,
        guid: Guid,
    ) -> Result<(), Errno> {
        (**self).set_vf_guid(pf_netdev, vf, kind, guid)
    }
    fn open_pf(&self, pf: Bdf, group: IommuGroupId) -> Result<Box<dyn PfHandle>, Errno> {
        (**self).open_pf(pf, group)
    }
    fn open_migration(
        &self,
        target: &crate::migration::MigTarget,
    ) -> Result<Box<dyn crate::migration::MigrationDevice>, Errno> {
        (**self).open_migration(target)
    }
    fn list_dir(&self, path: &str) -> Result<Vec<String>, Errno> {
        (**self).list_dir(path)
    }
    fn stat(&self, path: &str) -> Result<NodeMeta, Errno> {
        (**self).stat(path)
    }
    fn create_private_file(
        &self,
        path: &str,
        contents: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), files::FileStepError> {
        (**self).create_private_file(path, contents, uid, gid)
    }
    fn remove_file(&self, path: &str) -> std::io::Result<bool> {
        (**self).remove_file(path)
    }
    fn is_dry_run(&self) -> bool {
        (**self).is_dry_run()
    }
}

/// Which AP bus mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApMaskKind {
    /// `/sys/bus/ap/apmask` (adapters).
    Apmask,
    /// `/sys/bus/ap/aqmask` (usage domains).
    Aqmask,
}

/// What to assign to or unassign from a vfio_ap matrix mdev.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApResource {
    /// An adapter (APID).
    Adapter(u8),
    /// A usage domain (APQI).
    Domain(u8),
    /// A control domain.
    ControlDomain(u8),
}

/// An AP mask edit as an operator writes it: absolute (`0x41…`) or relative
/// (`+1,-6,+0x47,-0xf0`, `-0-255,+1-16`), the kernel's own syntax. Parsed once,
/// so that an expression that does not parse is refused before anything is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaskEdit {
    /// Replace the mask.
    Absolute(ApMask),
    /// Apply `+`/`-` terms in order: `(on, first, last)`.
    Relative(Vec<(bool, u8, u8)>),
}

impl MaskEdit {
    /// The mask this edit produces from `current`: the absolute mask, or
    /// `current` with the terms applied in order (the last one wins).
    #[must_use]
    pub fn apply(&self, current: &ApMask) -> ApMask {
        match self {
            MaskEdit::Absolute(m) => *m,
            MaskEdit::Relative(terms) => {
                let mut m = *current;
                for &(on, first, last) in terms {
                    for n in first..=last {
                        m.set(n, on);
                    }
                }
                m
            }
        }
    }

    /// The text written to `apmask`/`aqmask`: `0x` and 64 hex digits for an
    /// absolute edit, the `+`/`-` terms (decimal, comma-separated) for a relative one.
    #[must_use]
    pub fn kernel_form(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for MaskEdit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskEdit::Absolute(m) => m.fmt(f),
            MaskEdit::Relative(terms) => {
                for (i, &(on, first, last)) in terms.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    let sign = if on { '+' } else { '-' };
                    if first == last {
                        write!(f, "{sign}{first}")?;
                    } else {
                        write!(f, "{sign}{first}-{last}")?;
                    }
                }
                Ok(())
            }
        }
    }
}

const MASK_KIND: &str = "AP mask expression";
const MASK_FORMS: &str = "expected an absolute mask (0x or x optional, then up to 64 hex digits filled from the left, e.g. 0x41 = ids 1 and 7) or relative terms +N, -N, +A-B, -A-B separated by commas (N decimal, 0x hex or 0 octal, 0..255), e.g. +1,-6,+0x47 or -0-255,+1-16";

fn mask_error(input: &str, reason: String) -> ParseError {
    ParseError {
        kind: MASK_KIND,
        input: input.chars().take(80).collect(),
        reason,
    }
}

/// The term of `s` around byte offset `at`: the text between the separators
/// (`,`, `\n`) on either side.
fn term_at(s: &str, at: usize) -> &str {
    let b = s.as_bytes();
    let at = at.min(b.len());
    let start = b[..at]
        .iter()
        .rposition(|&c| c == b',' || c == b'\n')
        .map_or(0, |p| p + 1);
    let end = b[at..]
        .iter()
        .position(|&c| c == b',' || c == b'\n')
        .map_or(b.len(), |p| at + p);
    s.get(start..end).unwrap_or(s)
}

/// `simple_strtoul(s, &end, 0)` as the kernel does it: `0x`+hex digit → hex,
/// leading `0` → octal, else decimal; no sign, no whitespace. Returns the value
/// (saturated) and the offset after the digits, or `None` when no digit was read.
fn strtoul0(b: &[u8], i: usize) -> Option<(u64, usize)> {
    let (radix, mut j) = match (b.get(i), b.get(i + 1), b.get(i + 2)) {
        (Some(b'0'), Some(b'x' | b'X'), Some(c)) if c.is_ascii_hexdigit() => (16, i + 2),
        (Some(b'0'), _, _) => (8, i),
        _ => (10, i),
    };
    let start = j;
    let mut v: u64 = 0;
    while let Some(d) = b.get(j).and_then(|&c| char::from(c).to_digit(radix)) {
        v = v
            .saturating_mul(u64::from(radix))
            .saturating_add(u64::from(d));
        j += 1;
    }
    (j > start).then_some((v, j))
}

fn parse_relative(s: &str) -> Result<MaskEdit, ParseError> {
    let b = s.as_bytes();
    let mut terms = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let at = i;
        let bad =
            |why: String| mask_error(s, format!("term {:?}: {why}; {MASK_FORMS}", term_at(s, at)));
        let on = match b[i] {
            b'+' => true,
            b'-' => false,
            _ => return Err(bad("each term must start with + or -".into())),
        };
        i += 1;
        let (first, ni) =
            strtoul0(b, i).ok_or_else(|| bad("expected a number after the sign".into()))?;
        let first = u8::try_from(first)
            .map_err(|_| bad(format!("{first} is out of range: ids are 0..255")))?;
        i = ni;
        let mut last = first;
        if b.get(i) == Some(&b'-') {
            i += 1;
            let (l, ni) = strtoul0(b, i)
                .ok_or_else(|| bad("expected the end of the range after -".into()))?;
            last =
                u8::try_from(l).map_err(|_| bad(format!("{l} is out of range: ids are 0..255")))?;
            if last < first {
                return Err(bad(format!(
                    "the range end {last} is below its start {first}"
                )));
            }
            i = ni;
        }
        terms.push((on, first, last));
        while matches!(b.get(i), Some(b',' | b'\n')) {
            i += 1;
        }
    }
    Ok(MaskEdit::Relative(terms))
}

fn parse_absolute(s: &str) -> Result<MaskEdit, ParseError> {
    let b = s.as_bytes();
    let mut i = 0;
    if b.starts_with(b"0x") {
        i += 1;
    }
    if b.get(i) == Some(&b'x') {
        i += 1;
    }
    let mut mask = ApMask::NONE;
    let mut bit: u16 = 0;
    let digits_start = i;
    while let Some(d) = b.get(i).and_then(|&c| char::from(c).to_digit(16)) {
        if bit >= 256 {
            return Err(mask_error(
                s,
                format!(
                    "{:?} has more than 64 hex digits (the masks are 256 bits); {MASK_FORMS}",
                    term_at(s, i)
                ),
            ));
        }
        for k in 0..4u16 {
            if d & (0x8 >> k) != 0 {
                let n = u8::try_from(bit + k).unwrap_or(u8::MAX);
                mask.set(n, true);
            }
        }
        bit += 4;
        i += 1;
    }
    if i == digits_start {
        return Err(mask_error(
            s,
            match s.get(i..).and_then(|r| r.chars().next()) {
                None => format!("no hex digits; {MASK_FORMS}"),
                Some(c) => format!(
                    "{c:?} at offset {i} is not a hex digit (and the expression does not start with + or -); {MASK_FORMS}"
                ),
            },
        ));
    }
    if b.get(i) == Some(&b'\n') {
        i += 1;
    }
    if let Some(c) = s.get(i..).and_then(|r| r.chars().next()) {
        return Err(mask_error(
            s,
            format!("{c:?} at offset {i} is not a hex digit; {MASK_FORMS}"),
        ));
    }
    Ok(MaskEdit::Absolute(mask))
}

impl FromStr for MaskEdit {
    type Err = ParseError;

    /// Parses the kernel's `apmask`/`aqmask` write syntax (`ap_parse_mask_str`):
    /// an expression starting with `+` or `-` is relative (terms `+N`, `-N`,
    /// `+A-B`, `-A-B`, numbers as `strtoul` base 0, separated by `,` or `\n`);
    /// anything else is absolute (optional `0x` or `x`, up to 64 hex digits filled
    /// from the leftmost bit, one optional trailing `\n`). One deliberate
    /// difference: an expression with no hex digit at all (empty, `0x`), which the
    /// kernel takes as "clear every bit", is refused — write `0x0` for that.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s.as_bytes().first() {
            Some(b'+' | b'-') => parse_relative(s),
            _ => parse_absolute(s),
        }
    }
}

/// A PF in devfence's custody: the open VFIO handle that keeps the VF token in force.
pub struct PfCustody {
    /// The PF.
    pub pf: Bdf,
    /// The open handle; dropping the custody closes it.
    pub handle: Box<dyn PfHandle>,
}

impl fmt::Debug for PfCustody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PfCustody")
            .field("pf", &self.pf)
            .finish_non_exhaustive()
    }
}

/// Operations on the host. One method per operation; each checks, acts, reads
/// back, and on failure leaves the host as it found it.
pub trait Actuator {
    /// Binds a PCI function to `driver` through `driver_override` + `drivers_probe`
    /// (never `new_id`), unbinding it from its current driver first, and reads the
    /// `driver` link back. On failure the previous `driver_override` is restored.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn bind(&self, bdf: Bdf, driver: &str) -> Result<(), ActError>;
    /// Unbinds a PCI function from its driver and reads back that it has none.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn unbind(&self, bdf: Bdf) -> Result<(), ActError>;
    /// Sets `sriov_numvfs` (writing 0 first when changing a non-zero count) and
    /// reads back the VF links.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn set_num_vfs(&self, pf: Bdf, count: u16) -> Result<(), ActError>;
    /// Resets a function through `reset` and confirms it answers afterwards
    /// (config space vendor id is not 0xffff).
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn reset(&self, bdf: Bdf) -> Result<(), ActError>;
    /// Sets owner, group and mode of `/dev/vfio/<group>` and reads them back.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn set_group_node_owner(
        &self,
        group: IommuGroupId,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Result<(), ActError>;
    /// Creates an mdev of `type_id` under `parent` with `uuid`.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn mdev_create(&self, parent: &str, type_id: &str, uuid: MdevUuid) -> Result<(), ActError>;
    /// Removes an mdev.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn mdev_remove(&self, uuid: MdevUuid) -> Result<(), ActError>;
    /// Assigns an adapter, domain or control domain to a vfio_ap matrix mdev.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn ap_assign(&self, mdev: MdevUuid, what: ApResource) -> Result<(), ActError>;
    /// Unassigns an adapter, domain or control domain from a vfio_ap matrix mdev.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn ap_unassign(&self, mdev: MdevUuid, what: ApResource) -> Result<(), ActError>;
    /// Edits `apmask` or `aqmask`, refusing before writing an edit that would hand
    /// the host an APQN held by a matrix mdev (naming the mdev). Returns the mask
    /// read back.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn ap_set_mask(&self, which: ApMaskKind, edit: &MaskEdit) -> Result<ApMask, ActError>;
    /// Sets an mlx5 VF's node and port GUID, rebinds the VF so it takes effect, and
    /// reads the port GUID back.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn set_vf_guid(&self, pf: Bdf, vf_index: u32, node: Guid, port: Guid) -> Result<(), ActError>;
    /// Takes custody of a user-space-owned PF: opens it through VFIO and keeps it open.
    ///
    /// # Errors
    /// What failed, with path, errno and hint.
    fn custody_pf(&self, pf: Bdf) -> Result<PfCustody, ActError>;
    /// Sets a fresh random VF token on a custodied PF and returns it (to be handed
    /// to the launcher only).
    ///
    /// # Errors
    /// What failed, with errno and hint.
    fn rekey_vf_token(&self, custody: &mut PfCustody) -> Result<VfToken, ActError>;
    /// Hands `token` to a launcher: a fresh 0600 file at `path` (under the
    /// runtime directory), owned by `uid:gid`, reached through real
    /// directories only. The copy of the token in memory is wiped.
    ///
    /// # Errors
    /// What failed (a link on the way names the link) and a hint.
    fn deliver_token(
        &self,
        path: &str,
        token: &VfToken,
        uid: u32,
        gid: u32,
    ) -> Result<(), files::FileStepError>;
    /// Removes an undelivered token file at `path` (never through a link);
    /// whether there was one.
    ///
    /// # Errors
    /// What failed and a hint.
    fn withdraw_token(&self, path: &str) -> Result<bool, files::FileStepError>;
    /// Removes every device-state payload admitted for `device` from the
    /// side-load directory `dir` (`<token>.state` with its `<token>.owner`);
    /// how many were voided. An owner record that is not a small regular file
    /// is refused (it cannot be told whose it is).
    ///
    /// # Errors
    /// What failed and a hint.
    fn void_device_state(&self, dir: &str, device: &str) -> Result<u32, files::FileStepError>;
}

/// An operation that failed or was refused. The message names the operation and
/// its subject, the path and errno where there is one, and a hint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ActError {
    /// The operation, e.g. `bind 0000:03:00.0 to vfio-pci`.
    pub op: String,
    /// What went wrong, one sentence.
    pub reason: String,
    /// The kernel path involved, if any.
    pub path: Option<String>,
    /// The errno the kernel answered, if any (the error's source).
    #[source]
    pub errno: Option<Errno>,
    /// What the operator can do.
    pub hint: String,
    /// Whether a rollback was attempted and failed (the host may be half-changed).
    pub rollback_failed: Option<String>,
}

impl ActError {
    /// A refusal or failure of `op` with no path or errno yet.
    #[must_use]
    pub fn new(op: impl Into<String>, reason: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            op: op.into(),
            reason: reason.into(),
            path: None,
            errno: None,
            hint: hint.into(),
            rollback_failed: None,
        }
    }
    /// With the kernel path involved.
    #[must_use]
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }
    /// With the errno the kernel answered.
    #[must_use]
    pub fn with_errno(mut self, errno: Errno) -> Self {
        self.errno = Some(errno);
        self
    }

    fn render(&self) -> String {
        let mut s = format!("Cannot {}: {}", self.op, self.reason);
        if let Some(p) = &self.path {
            s.push_str(&format!(" ({p}"));
            if let Some(e) = self.errno {
                s.push_str(&format!(": {e}"));
            }
            s.push(')');
        } else if let Some(e) = self.errno {
            s.push_str(&format!(" ({e})"));
        }
        if let Some(r) = &self.rollback_failed {
            s.push_str(&format!(". Undoing it failed too: {r}"));
        }
        s.push_str(&format!(". Hint: {}", self.hint));
        s
    }
}
