//! The VFIO ioctls devfence needs, and the only module with `unsafe` code.
//!
//! The group path, as QEMU uses it and as `recipes/testbed/src/vftoken.c` proves
//! it on a real kernel: open the container `/dev/vfio/vfio` (API version 0,
//! type1v2 supported), open the group `/dev/vfio/<N>` (it must be viable), attach
//! it to the container, select the type1v2 IOMMU, then ask the group for the
//! device by name (`<BDF>` or `<BDF> vf_token=<uuid>`). The PF custodian then sets
//! the VF token with `VFIO_DEVICE_FEATURE` (`SET | PCI_VF_TOKEN`, 16 raw bytes).
//!
//! Every handle owns its file descriptors ([`OwnedFd`]): they close on drop, the
//! device first, then the group, then the container.
//!
//! Numbers (checked against `linux/vfio.h` of linux-libc-dev 6.1 and
//! `reference/kernel-interfaces.md` §2.3): every VFIO ioctl is `_IO(';', 100 + n)`.

#![allow(unsafe_code)]

use std::ffi::{CString, c_int, c_void};
use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use devfence_model::{Bdf, IommuGroupId};
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, opcode};

use super::{Errno, PfHandle, VfToken};
use crate::root::HostRoot;

/// `VFIO_TYPE`, the ioctl group: `';'`.
pub const VFIO_TYPE: u8 = b';';
/// `VFIO_BASE`.
pub const VFIO_BASE: u8 = 100;
/// `VFIO_GET_API_VERSION` (container): returns `VFIO_API_VERSION`.
pub const VFIO_GET_API_VERSION: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE);
/// `VFIO_CHECK_EXTENSION` (container, integer argument): > 0 when supported.
pub const VFIO_CHECK_EXTENSION: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 1);
/// `VFIO_SET_IOMMU` (container, integer argument: the IOMMU type).
pub const VFIO_SET_IOMMU: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 2);
/// `VFIO_GROUP_GET_STATUS` (group, `struct vfio_group_status *`).
pub const VFIO_GROUP_GET_STATUS: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 3);
/// `VFIO_GROUP_SET_CONTAINER` (group, `int *` container fd).
pub const VFIO_GROUP_SET_CONTAINER: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 4);
/// `VFIO_GROUP_GET_DEVICE_FD` (group, `char *` device name): returns a new fd.
pub const VFIO_GROUP_GET_DEVICE_FD: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 6);
/// `VFIO_DEVICE_RESET` (device, no argument).
pub const VFIO_DEVICE_RESET: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 11);
/// `VFIO_DEVICE_FEATURE` (device, `struct vfio_device_feature *`).
pub const VFIO_DEVICE_FEATURE: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 17);

/// `VFIO_API_VERSION`.
pub const VFIO_API_VERSION: c_int = 0;
/// `VFIO_TYPE1v2_IOMMU`.
pub const VFIO_TYPE1V2_IOMMU: usize = 3;
/// `VFIO_GROUP_FLAGS_VIABLE`.
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
/// `VFIO_GROUP_FLAGS_CONTAINER_SET`.
pub const VFIO_GROUP_FLAGS_CONTAINER_SET: u32 = 2;
/// `VFIO_DEVICE_FEATURE_MASK`: the feature index bits of `flags`.
pub const VFIO_DEVICE_FEATURE_MASK: u32 = 0xffff;
/// `VFIO_DEVICE_FEATURE_GET`.
pub const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
/// `VFIO_DEVICE_FEATURE_SET`.
pub const VFIO_DEVICE_FEATURE_SET: u32 = 1 << 17;
/// `VFIO_DEVICE_FEATURE_PROBE`.
pub const VFIO_DEVICE_FEATURE_PROBE: u32 = 1 << 18;
/// `VFIO_DEVICE_FEATURE_PCI_VF_TOKEN`: feature index 0.
pub const VFIO_DEVICE_FEATURE_PCI_VF_TOKEN: u32 = 0;
/// `VFIO_DEVICE_FEATURE_MIGRATION`: feature index 1 (GET: the migration flags).
pub const VFIO_DEVICE_FEATURE_MIGRATION: u32 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`: feature index 2 (GET/SET the state).
pub const VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: u32 = 2;

/// `struct vfio_device_feature` followed by `struct vfio_device_feature_migration
/// { __aligned_u64 flags; }`: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioFeatureMigration {
    /// 8 (header) + 8 = 16.
    pub argsz: u32,
    /// `VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION`.
    pub flags: u32,
    /// `VFIO_MIGRATION_*`, filled in by the kernel.
    pub mig_flags: u64,
}

/// `struct vfio_device_feature` followed by `struct vfio_device_feature_mig_state
/// { __u32 device_state; __s32 data_fd; }`: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioFeatureMigState {
    /// 8 (header) + 8 = 16.
    pub argsz: u32,
    /// `VFIO_DEVICE_FEATURE_{GET,SET} | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
    pub flags: u32,
    /// `enum vfio_device_mig_state`.
    pub device_state: u32,
    /// The data fd the kernel returns for a transition that starts a data
    /// session (into STOP_COPY, RESUMING, PRE_COPY); -1 otherwise.
    pub data_fd: i32,
}

/// `struct vfio_group_status { __u32 argsz; __u32 flags; }`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioGroupStatus {
    /// `sizeof(struct vfio_group_status)` = 8.
    pub argsz: u32,
    /// `VFIO_GROUP_FLAGS_*`, filled in by the kernel.
    pub flags: u32,
}

/// `struct vfio_device_feature` followed by the 16-byte payload of
/// `VFIO_DEVICE_FEATURE_PCI_VF_TOKEN` (the token as raw UUID bytes).
#[repr(C)]
#[derive(Clone, PartialEq, Eq)]
pub struct VfioFeatureVfToken {
    /// 8 (header) + 16 (token) = 24.
    pub argsz: u32,
    /// `VFIO_DEVICE_FEATURE_{GET,SET,PROBE}` | feature index.
    pub flags: u32,
    /// The token bytes.
    pub data: [u8; 16],
}

impl VfioFeatureVfToken {
    /// The request for `flags` with a zeroed payload.
    #[must_use]
    pub fn new(flags: u32) -> Self {
        Self {
            argsz: u32::try_from(std::mem::size_of::<Self>()).unwrap_or(u32::MAX),
            flags,
            data: [0; 16],
        }
    }
    /// Zeroes the payload, so that no copy of a token outlives its use.
    pub fn wipe(&mut self) {
        self.data = [0; 16];
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}
impl fmt::Debug for VfioFeatureVfToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioFeatureVfToken")
            .field("argsz", &self.argsz)
            .field("flags", &format_args!("{:#x}", self.flags))
            .finish_non_exhaustive()
    }
}
impl Drop for VfioFeatureVfToken {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// One ioctl whose argument is a pointer (or an integer passed as one) and
/// whose result is the ioctl's return value.
struct RawIoctl {
    op: Opcode,
    arg: *mut c_void,
}

// SAFETY: `RawIoctl` only forwards an opcode and an argument pointer; every
// caller (the `ioctl` function below, used only in this module) passes an opcode
// from the VFIO table above together with the argument type that `linux/vfio.h`
// documents for it (null, an integer, or a pointer to a live, correctly sized
// `#[repr(C)]` value or NUL-terminated string). `IS_MUTATING` is true, so the
// kernel may write through the pointer. The output is the raw return value and
// reads nothing through the pointer.
unsafe impl Ioctl for RawIoctl {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;
    fn opcode(&self) -> Opcode {
        self.op
    }
    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }
    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _extract_output: *mut c_void,
    ) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Calls `ioctl(fd, op, arg)`.
///
/// # Safety
/// `arg` must be what the kernel expects for `op` (see [`RawIoctl`]): null, an
/// integer cast to a pointer, or a pointer valid for reads and writes of the
/// argument's full size for the duration of the call.
unsafe fn ioctl(fd: BorrowedFd<'_>, op: Opcode, arg: *mut c_void) -> Result<c_int, Errno> {
    // SAFETY: the caller guarantees `arg` matches `op` (this function's contract).
    unsafe { rustix::ioctl::ioctl(fd, RawIoctl { op, arg }) }.map_err(|e| Errno(e.raw_os_error()))
}

/// An integer ioctl argument passed in the pointer slot.
fn int_arg(v: usize) -> *mut c_void {
    std::ptr::without_provenance_mut(v)
}

fn open_rw(root: &HostRoot, kernel_path: &str) -> Result<OwnedFd, Errno> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.path(kernel_path))
        .map(OwnedFd::from)
        .map_err(|e| Errno::from_io(&e))
}

/// The group device name `VFIO_GROUP_GET_DEVICE_FD` takes: the BDF, and
/// ` vf_token=<uuid>` when a token is given.
#[must_use]
pub fn device_name(bdf: Bdf, vf_token: Option<&str>) -> String {
    match vf_token {
        Some(t) => format!("{bdf} vf_token={t}"),
        None => bdf.to_string(),
    }
}

/// An open VFIO container with the type1v2 IOMMU available.
pub struct Container {
    fd: OwnedFd,
}

impl Container {
    /// Opens `/dev/vfio/vfio` and checks `VFIO_GET_API_VERSION` == 0 and
    /// `VFIO_CHECK_EXTENSION(TYPE1v2)`.
    ///
    /// # Errors
    /// The errno of the open or ioctl; `EPROTO` for another API version,
    /// `EOPNOTSUPP` without type1v2.
    pub fn open(root: &HostRoot) -> Result<Self, Errno> {
        let fd = open_rw(root, "/dev/vfio/vfio")?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        let v = unsafe { ioctl(fd.as_fd(), VFIO_GET_API_VERSION, std::ptr::null_mut()) }?;
        if v != VFIO_API_VERSION {
            return Err(Errno::EPROTO);
        }
        // SAFETY: VFIO_CHECK_EXTENSION takes the extension number as an integer.
        let ext = unsafe {
            ioctl(
                fd.as_fd(),
                VFIO_CHECK_EXTENSION,
                int_arg(VFIO_TYPE1V2_IOMMU),
            )
        }?;
        if ext <= 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        Ok(Self { fd })
    }
}

/// An open VFIO group attached to its own container (type1v2).
pub struct Group {
    // Declared before the container so that it closes first.
    fd: OwnedFd,
    container: Container,
}

impl Group {
    /// Opens the container and `/dev/vfio/<group>`, checks the group is viable,
    /// attaches it (`VFIO_GROUP_SET_CONTAINER`) and selects type1v2
    /// (`VFIO_SET_IOMMU`).
    ///
    /// # Errors
    /// The errno of the failing open or ioctl (`EBUSY` when another process holds
    /// the group, `ENOENT` when there is no node); `EPERM` when the group is not
    /// viable (a member is on a host driver).
    pub fn open(root: &HostRoot, group: IommuGroupId) -> Result<Self, Errno> {
        let container = Container::open(root)?;
        let fd = open_rw(root, &format!("/dev/vfio/{group}"))?;
        let mut status = VfioGroupStatus {
            argsz: u32::try_from(std::mem::size_of::<VfioGroupStatus>()).unwrap_or(8),
            flags: 0,
        };
        // SAFETY: VFIO_GROUP_GET_STATUS takes a pointer to a live
        // `struct vfio_group_status` (8 bytes, #[repr(C)]) that it fills in.
        unsafe {
            ioctl(
                fd.as_fd(),
                VFIO_GROUP_GET_STATUS,
                (&raw mut status).cast::<c_void>(),
            )
        }?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Errno::EPERM);
        }
        let mut cfd: c_int = container.fd.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER takes a pointer to an int holding the
        // container fd, which stays open (owned by `container`).
        unsafe {
            ioctl(
                fd.as_fd(),
                VFIO_GROUP_SET_CONTAINER,
                (&raw mut cfd).cast::<c_void>(),
            )
        }?;
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type as an integer.
        unsafe {
            ioctl(
                container.fd.as_fd(),
                VFIO_SET_IOMMU,
                int_arg(VFIO_TYPE1V2_IOMMU),
            )
        }?;
        Ok(Self { fd, container })
    }

    /// `VFIO_GROUP_GET_DEVICE_FD` with `name` (`<BDF>` or `<BDF> vf_token=<uuid>`).
    ///
    /// # Errors
    /// The kernel's errno: `EACCES` for a VF opened without its PF's token or
    /// with a wrong one, `EINVAL` for a malformed name, `ENODEV` for a device
    /// not in the group; `EINVAL` for a name with a NUL byte.
    pub fn get_device_fd(&self, name: &str) -> Result<OwnedFd, Errno> {
        let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD takes a pointer to a NUL-terminated
        // string, which `name` keeps alive for the call; the kernel only reads it.
        let fd = unsafe {
            ioctl(
                self.fd.as_fd(),
                VFIO_GROUP_GET_DEVICE_FD,
                name.as_ptr().cast_mut().cast::<c_void>(),
            )
        }?;
        if fd < 0 {
            return Err(Errno::EIO);
        }
        // SAFETY: on success the ioctl returns a new file descriptor that nothing
        // else owns; `OwnedFd` takes sole ownership and closes it on drop.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The container's file descriptor.
    #[must_use]
    pub fn container_fd(&self) -> BorrowedFd<'_> {
        self.container.fd.as_fd()
    }
}

/// An open VFIO device with the group and container that hold it.
pub struct VfioDevice {
    // Drop order: device, then group (which drops its container).
    device: OwnedFd,
    group: Group,
}

impl VfioDevice {
    /// The device file descriptor.
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }
    /// The group the device was opened through.
    #[must_use]
    pub fn group(&self) -> &Group {
        &self.group
    }
}

impl VfioDevice {
    /// `VFIO_DEVICE_FEATURE` GET `MIGRATION`: the device's `VFIO_MIGRATION_*`
    /// flags.
    ///
    /// # Errors
    /// `ENOTTY` when the device's driver has no migration support (no
    /// `mig_ops`); otherwise the kernel's errno.
    pub fn migration_flags(&self) -> Result<u64, Errno> {
        let mut req = VfioFeatureMigration {
            argsz: 16,
            flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
            mig_flags: 0,
        };
        // SAFETY: VFIO_DEVICE_FEATURE takes a pointer to a `struct
        // vfio_device_feature` whose `argsz` (16) covers the 8-byte header and
        // the 8-byte `struct vfio_device_feature_migration`; `req` is a live
        // #[repr(C)] value of exactly 16 bytes (u64 at offset 8, checked by a
        // test), and the kernel writes only within `argsz`.
        unsafe {
            ioctl(
                self.device.as_fd(),
                VFIO_DEVICE_FEATURE,
                (&raw mut req).cast::<c_void>(),
            )
        }?;
        Ok(req.mig_flags)
    }

    fn mig_state_ioctl(&self, req: &mut VfioFeatureMigState) -> Result<(), Errno> {
        // SAFETY: VFIO_DEVICE_FEATURE takes a pointer to a `struct
        // vfio_device_feature` whose `argsz` (16) covers the 8-byte header and the
        // 8-byte `struct vfio_device_feature_mig_state`; `req` is a live
        // #[repr(C)] value of exactly 16 bytes, and the kernel reads and writes
        // only within `argsz`.
        unsafe {
            ioctl(
                self.device.as_fd(),
                VFIO_DEVICE_FEATURE,
                std::ptr::from_mut(req).cast::<c_void>(),
            )
        }
        .map(|_| ())
    }

    /// `VFIO_DEVICE_FEATURE` GET `MIG_DEVICE_STATE`: the device's current
    /// migration state (`enum vfio_device_mig_state`).
    ///
    /// # Errors
    /// `ENOTTY` without migration support; otherwise the kernel's errno.
    pub fn mig_state(&self) -> Result<u32, Errno> {
        let mut req = VfioFeatureMigState {
            argsz: 16,
            flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            device_state: 0,
            data_fd: -1,
        };
        self.mig_state_ioctl(&mut req)?;
        Ok(req.device_state)
    }

    /// `VFIO_DEVICE_FEATURE` SET `MIG_DEVICE_STATE`: asks the kernel to move the
    /// device to `state` (along the kernel's shortest path). Returns the data fd
    /// when the transition starts a data session (into STOP_COPY: read-only; into
    /// RESUMING: write-only).
    ///
    /// # Errors
    /// The kernel's errno (`EINVAL` for a state it cannot reach, `ENOTTY`
    /// without migration support, the driver's error for a rejected stream).
    pub fn set_mig_state(&self, state: u32) -> Result<Option<OwnedFd>, Errno> {
        let mut req = VfioFeatureMigState {
            argsz: 16,
            flags: VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            device_state: state,
            data_fd: -1,
        };
        self.mig_state_ioctl(&mut req)?;
        if req.data_fd < 0 {
            return Ok(None);
        }
        // SAFETY: on success with `data_fd >= 0` the kernel installed a new file
        // descriptor for this process that nothing else owns; `OwnedFd` takes sole
        // ownership and closes it on drop.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(req.data_fd) }))
    }

    /// `VFIO_DEVICE_RESET`: returns the device (and its migration state) to
    /// RUNNING, also out of ERROR.
    ///
    /// # Errors
    /// The kernel's errno.
    pub fn reset(&self) -> Result<(), Errno> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        unsafe { ioctl(self.device.as_fd(), VFIO_DEVICE_RESET, std::ptr::null_mut()) }.map(|_| ())
    }
}

impl VfioDevice {
    /// A duplicate of the device fd as a file, for `pread`/`pwrite` on its
    /// regions and for handing the device on (`SCM_RIGHTS`).
    ///
    /// # Errors
    /// The errno of `dup`.
    pub fn try_clone_file(&self) -> Result<std::fs::File, Errno> {
        self.device
            .try_clone()
            .map(std::fs::File::from)
            .map_err(|e| Errno::from_io(&e))
    }

    /// `pwrite` at `offset` of the device fd: a region access (region `i` of a
    /// vfio-pci style device is at the offset the driver reports; mtty puts
    /// `i << 40`).
    ///
    /// # Errors
    /// The errno of `pwrite` (a short write is `EIO`).
    pub fn region_write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        use std::os::unix::fs::FileExt;
        let f = self.try_clone_file()?;
        match f.write_at(data, offset) {
            Ok(n) if n == data.len() => Ok(()),
            Ok(_) => Err(Errno::EIO),
            Err(e) => Err(Errno::from_io(&e)),
        }
    }

    /// `pread` of `len` bytes at `offset` of the device fd.
    ///
    /// # Errors
    /// The errno of `pread` (a short read is `EIO`).
    pub fn region_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        use std::os::unix::fs::FileExt;
        let f = self.try_clone_file()?;
        let mut b = vec![0u8; len];
        match f.read_at(&mut b, offset) {
            Ok(n) if n == len => Ok(b),
            Ok(_) => Err(Errno::EIO),
            Err(e) => Err(Errno::from_io(&e)),
        }
    }
}

impl crate::migration::MigrationDevice for VfioDevice {
    fn flags(&self) -> Result<crate::migration::MigFlags, Errno> {
        self.migration_flags().map(crate::migration::MigFlags)
    }
    fn state(&self) -> Result<crate::migration::MigState, Errno> {
        crate::migration::MigState::from_raw(self.mig_state()?).ok_or(Errno::EPROTO)
    }
    fn set_state(
        &mut self,
        s: crate::migration::MigState,
    ) -> Result<Option<Box<dyn crate::migration::MigData>>, Errno> {
        // A blocked arc hangs the kernel (see `kernel_blocks`): refused here.
        let cur = crate::migration::MigrationDevice::state(self)?;
        if crate::migration::kernel_blocks(cur, s) {
            return Err(Errno::EINVAL);
        }
        Ok(self
            .set_mig_state(s.raw())?
            .map(|fd| Box::new(std::fs::File::from(fd)) as Box<dyn crate::migration::MigData>))
    }
    fn reset(&mut self) -> Result<(), Errno> {
        VfioDevice::reset(self)
    }
    fn region_write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        VfioDevice::region_write(self, offset, data)
    }
    fn region_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        VfioDevice::region_read(self, offset, len)
    }
}

/// Opens a device of `group` by its VFIO name: a BDF, or an mdev's UUID
/// (lowercase), as `VFIO_GROUP_GET_DEVICE_FD` takes it. The device is open
/// (and its group held) for as long as the handle lives.
///
/// # Errors
/// The errno of the failing open or ioctl (see [`Group::open`],
/// [`Group::get_device_fd`]).
pub fn open_named(root: &HostRoot, name: &str, group: IommuGroupId) -> Result<VfioDevice, Errno> {
    let group = Group::open(root, group)?;
    let device = group.get_device_fd(name)?;
    Ok(VfioDevice { device, group })
}

/// Opens a device through its group with an optional VF token, the way QEMU's
/// `vfio-pci,host=<bdf>,vf-token=<uuid>` does: the name is `"<bdf>"` or
/// `"<bdf> vf_token=<uuid>"`. For the real-kernel tests: a VF of a vfio-pci PF
/// fails with `EACCES` without a token or with a wrong one, and opens with the
/// token the custodian set.
///
/// # Errors
/// The errno of the failing open or ioctl (see [`Group::open`],
/// [`Group::get_device_fd`]).
pub fn open_device(
    root: &HostRoot,
    bdf: Bdf,
    group: IommuGroupId,
    vf_token: Option<&str>,
) -> Result<VfioDevice, Errno> {
    let group = Group::open(root, group)?;
    let device = group.get_device_fd(&device_name(bdf, vf_token))?;
    Ok(VfioDevice { device, group })
}

fn feature(dev: BorrowedFd<'_>, req: &mut VfioFeatureVfToken) -> Result<(), Errno> {
    // SAFETY: VFIO_DEVICE_FEATURE takes a pointer to a `struct
    // vfio_device_feature` whose `argsz` (24) covers the header and the 16-byte
    // payload; `req` is a live #[repr(C)] value of exactly that size, and the
    // kernel reads and writes only within `argsz`.
    unsafe {
        ioctl(
            dev,
            VFIO_DEVICE_FEATURE,
            std::ptr::from_mut(req).cast::<c_void>(),
        )
    }
    .map(|_| ())
}

/// A PF held open through VFIO: the custody handle. While it lives, the PF's
/// VF token can be set and the PF cannot be opened by anyone else through its
/// group.
pub struct VfioPf {
    pf: Bdf,
    dev: VfioDevice,
}

impl fmt::Debug for VfioPf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioPf")
            .field("pf", &self.pf)
            .finish_non_exhaustive()
    }
}

/// Opens a PF bound to vfio-pci through its group (no token) and keeps it open.
///
/// # Errors
/// As [`open_device`]; `EACCES` when a VF of this PF is open (the current token
/// would be required).
pub fn open_pf(root: &HostRoot, pf: Bdf, group: IommuGroupId) -> Result<VfioPf, Errno> {
    Ok(VfioPf {
        pf,
        dev: open_device(root, pf, group, None)?,
    })
}

impl VfioPf {
    /// The PF.
    #[must_use]
    pub fn pf(&self) -> Bdf {
        self.pf
    }
    /// The PF's device file descriptor.
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.dev.fd()
    }
    /// Opens another device of the PF's own group (a VF that shares the PF's
    /// group, where opening the group a second time would give `EBUSY`).
    ///
    /// # Errors
    /// As [`Group::get_device_fd`].
    pub fn open_device_in_group(&self, bdf: Bdf, vf_token: Option<&str>) -> Result<OwnedFd, Errno> {
        self.dev.group.get_device_fd(&device_name(bdf, vf_token))
    }
    /// `VFIO_DEVICE_FEATURE` with `PROBE | SET | PCI_VF_TOKEN`: whether the
    /// device supports setting a VF token (a PF on vfio-pci does; others give
    /// `ENOTTY`).
    ///
    /// # Errors
    /// The kernel's errno.
    pub fn probe_vf_token(&self) -> Result<(), Errno> {
        let mut req = VfioFeatureVfToken::new(
            VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PCI_VF_TOKEN,
        );
        feature(self.dev.fd(), &mut req)
    }
}

impl PfHandle for VfioPf {
    fn set_vf_token(&mut self, token: &VfToken) -> Result<(), Errno> {
        let mut req =
            VfioFeatureVfToken::new(VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PCI_VF_TOKEN);
        req.data = *token.as_bytes();
        let r = feature(self.dev.fd(), &mut req);
        req.wipe();
        r
    }

    fn try_get_vf_token(&self) -> Result<(), Errno> {
        let mut req =
            VfioFeatureVfToken::new(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_PCI_VF_TOKEN);
        let r = feature(self.dev.fd(), &mut req);
        // Whatever the kernel answered, no copy is kept or returned.
        req.wipe();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_vfio_h() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3b65);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3b68);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_FEATURE, 0x3b75);
        assert_eq!(VFIO_DEVICE_FEATURE_GET, 0x1_0000);
        assert_eq!(VFIO_DEVICE_FEATURE_SET, 0x2_0000);
        assert_eq!(VFIO_DEVICE_FEATURE_PROBE, 0x4_0000);
        assert_eq!(VFIO_TYPE1V2_IOMMU, 3);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_DEVICE_FEATURE_MIGRATION, 1);
        assert_eq!(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 2);
    }

    #[test]
    fn migration_struct_layouts() {
        assert_eq!(std::mem::size_of::<VfioFeatureMigration>(), 16);
        assert_eq!(std::mem::offset_of!(VfioFeatureMigration, mig_flags), 8);
        assert_eq!(std::mem::size_of::<VfioFeatureMigState>(), 16);
        assert_eq!(std::mem::offset_of!(VfioFeatureMigState, device_state), 8);
        assert_eq!(std::mem::offset_of!(VfioFeatureMigState, data_fd), 12);
    }

    #[test]
    fn struct_layouts() {
        assert_eq!(std::mem::size_of::<VfioGroupStatus>(), 8);
        assert_eq!(std::mem::size_of::<VfioFeatureVfToken>(), 24);
        assert_eq!(std::mem::align_of::<VfioFeatureVfToken>(), 4);
        assert_eq!(std::mem::offset_of!(VfioFeatureVfToken, data), 8);
        let r = VfioFeatureVfToken::new(VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PCI_VF_TOKEN);
        assert_eq!(r.argsz, 24);
        assert_eq!(r.flags, 0x2_0000);
        assert_eq!(
            r.flags & VFIO_DEVICE_FEATURE_MASK,
            VFIO_DEVICE_FEATURE_PCI_VF_TOKEN
        );
    }

    #[test]
    fn token_payload_is_wiped_and_not_in_debug() {
        let mut r = VfioFeatureVfToken::new(VFIO_DEVICE_FEATURE_SET);
        r.data = [0xab; 16];
        let d = format!("{r:?}");
        assert!(!d.contains("ab") && !d.contains("171"), "{d}");
        r.wipe();
        assert_eq!(r.data, [0; 16]);
    }

    #[test]
    fn device_names() {
        let b: Bdf = "0000:3b:00.2".parse().unwrap();
        assert_eq!(device_name(b, None), "0000:3b:00.2");
        assert_eq!(
            device_name(b, Some("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001")),
            "0000:3b:00.2 vf_token=83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
        );
    }

    #[test]
    fn missing_nodes_give_enoent() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let b: Bdf = "0000:3b:00.2".parse().unwrap();
        assert_eq!(
            open_device(&root, b, IommuGroupId(7), None).err(),
            Some(Errno::ENOENT)
        );
    }
}
