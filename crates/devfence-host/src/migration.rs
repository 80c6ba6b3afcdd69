//! Device state through the kernel's VFIO migration interface (v2), the host side
//! of `devfence state save` / `state load` (docs/state-envelopes.md).
//!
//! The uAPI (`linux/vfio.h`, reference `kernel-interfaces.md` §6):
//! `VFIO_DEVICE_FEATURE` GET `MIGRATION` gives the device's flags (`STOP_COPY`
//! mandatory, `P2P`, `PRE_COPY`); `ENOTTY` means the driver has no migration
//! support. GET/SET `MIG_DEVICE_STATE` reads or moves the state (`RUNNING`,
//! `STOP`, `STOP_COPY`, `RESUMING`, …); entering `STOP_COPY` returns a read-only
//! data fd (read to EOF), entering `RESUMING` a write-only one; leaving
//! `RESUMING` for `STOP` asks the driver to validate and apply what was written.
//!
//! [`MigrationDevice`] is the primitive seam, implemented by the real kernel
//! ([`crate::actuator::vfio::VfioDevice`]) and the simulated one
//! ([`crate::simkernel`]). [`save_state`] and [`load_state`] are the operations,
//! written once over it: they check the flags and the current state first, cap
//! every read and write, and put the device back in a safe state when a step
//! fails.

use std::fmt;
use std::io::{self, Read, Write};

use devfence_model::IommuGroupId;
use serde::{Deserialize, Serialize};

use crate::actuator::Errno;

/// `enum vfio_device_mig_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MigState {
    /// 0: a failed transition left the device here; only a reset leaves it.
    Error,
    /// 1: stopped, no data session.
    Stop,
    /// 2: running (the state at open, and the state close returns to).
    Running,
    /// 3: stopped, saving: the data fd reads the device's state.
    StopCopy,
    /// 4: stopped, loading: the data fd takes the state to load.
    Resuming,
    /// 5: running, no peer-to-peer DMA (needs `P2P`).
    RunningP2p,
    /// 6: running, saving ahead (needs `PRE_COPY`).
    PreCopy,
    /// 7: `PRE_COPY` without peer-to-peer DMA (needs `PRE_COPY` and `P2P`).
    PreCopyP2p,
}

impl MigState {
    /// Every state, by its number.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The kernel's number.
    #[must_use]
    pub fn raw(self) -> u32 {
        match self {
            MigState::Error => 0,
            MigState::Stop => 1,
            MigState::Running => 2,
            MigState::StopCopy => 3,
            MigState::Resuming => 4,
            MigState::RunningP2p => 5,
            MigState::PreCopy => 6,
            MigState::PreCopyP2p => 7,
        }
    }

    /// The state with the kernel's number `n`.
    #[must_use]
    pub fn from_raw(n: u32) -> Option<MigState> {
        Self::ALL.get(usize::try_from(n).ok()?).copied()
    }

    /// The uAPI name without its prefix, e.g. `STOP_COPY`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `VFIO_MIGRATION_*` flags, as the kernel reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MigFlags(pub u64);

impl MigFlags {
    /// `VFIO_MIGRATION_STOP_COPY`.
    pub const STOP_COPY: u64 = 1;
    /// `VFIO_MIGRATION_P2P`.
    pub const P2P: u64 = 2;
    /// `VFIO_MIGRATION_PRE_COPY`.
    pub const PRE_COPY: u64 = 4;

    /// Whether every bit of `bit` is set.
    #[must_use]
    pub fn has(self, bit: u64) -> bool {
        self.0 & bit == bit
    }

    /// The flag names (`STOP_COPY`, `P2P`, `PRE_COPY`, and `0x…` for bits this
    /// devfence does not know).
    #[must_use]
    pub fn names(self) -> Vec<String> {
        let mut v = Vec::new();
        for (bit, n) in [
            (Self::STOP_COPY, "STOP_COPY"),
            (Self::P2P, "P2P"),
            (Self::PRE_COPY, "PRE_COPY"),
        ] {
            if self.has(bit) {
                v.push(n.to_owned());
            }
        }
        let rest = self.0 & !(Self::STOP_COPY | Self::P2P | Self::PRE_COPY);
        if rest != 0 {
            v.push(format!("{rest:#x}"));
        }
        v
    }

    /// Whether the device can be in `s` at all (the kernel refuses a SET to a
    /// state its flags do not give with `EINVAL`).
    #[must_use]
    pub fn supports(self, s: MigState) -> bool {
        match s {
            MigState::Error | MigState::Stop | MigState::Running => true,
            MigState::StopCopy | MigState::Resuming => self.has(Self::STOP_COPY),
            MigState::RunningP2p => self.has(Self::P2P),
            MigState::PreCopy => self.has(Self::PRE_COPY),
            MigState::PreCopyP2p => self.has(Self::PRE_COPY | Self::P2P),
        }
    }
}

/// Whether the kernel's state table blocks `cur` → `new` (STOP_COPY →
/// PRE_COPY or PRE_COPY_P2P: the table leads to ERROR).
///
/// devfence never asks the kernel for such a transition, and its seam refuses
/// it with `EINVAL` before the ioctl: on the testbed's Debian 6.12.95 kernel the
/// request did not fail, it spun (soft lockup of the CPU in the ioctl, the
/// guest never recovered) — `vfio_mig_get_next_state` skips "unsupported"
/// steps in a loop, and the ERROR entry it lands on is never "supported".
#[must_use]
pub fn kernel_blocks(cur: MigState, new: MigState) -> bool {
    cur == MigState::StopCopy && matches!(new, MigState::PreCopy | MigState::PreCopyP2p)
}

/// A device's migration capability as the inventory shows it: read from the
/// kernel (`VFIO_DEVICE_FEATURE` GET `MIGRATION` on an open device), never
/// assumed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCaps {
    /// Whether the driver implements VFIO migration v2.
    pub supported: bool,
    /// The flag names (`STOP_COPY`, `P2P`, `PRE_COPY`); empty when unsupported.
    pub flags: Vec<String>,
    /// The migration state when it was probed (`RUNNING` normally).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// A data session's file: reads (STOP_COPY) or writes (RESUMING) the stream.
pub trait MigData: Read + Write + Send {}
impl<T: Read + Write + Send> MigData for T {}

/// An open VFIO device's migration interface. Dropping it closes the device
/// (the kernel then returns its migration state to RUNNING).
pub trait MigrationDevice: Send {
    /// `VFIO_DEVICE_FEATURE` GET `MIGRATION`.
    ///
    /// # Errors
    /// `ENOTTY`: the driver has no migration support.
    fn flags(&self) -> Result<MigFlags, Errno>;
    /// `VFIO_DEVICE_FEATURE` GET `MIG_DEVICE_STATE`.
    ///
    /// # Errors
    /// The kernel's errno; `EPROTO` for a state number this devfence does not know.
    fn state(&self) -> Result<MigState, Errno>;
    /// `VFIO_DEVICE_FEATURE` SET `MIG_DEVICE_STATE`; the data session's file when
    /// the transition starts one.
    ///
    /// # Errors
    /// The kernel's errno.
    fn set_state(&mut self, s: MigState) -> Result<Option<Box<dyn MigData>>, Errno>;
    /// `VFIO_DEVICE_RESET` (also the way out of ERROR).
    ///
    /// # Errors
    /// The kernel's errno.
    fn reset(&mut self) -> Result<(), Errno>;
    /// `pwrite` on the device fd at `offset`: a region access (for tests that
    /// put recognisable state into a device, e.g. mtty's UART registers in
    /// BAR0, region 0 at offset 0).
    ///
    /// # Errors
    /// The kernel's errno.
    fn region_write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno>;
    /// `pread` of `len` bytes at `offset` of the device fd.
    ///
    /// # Errors
    /// The kernel's errno.
    fn region_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Errno>;
}

/// Which device to open for migration: its VFIO name (a BDF, or an mdev's
/// lowercase UUID) and its IOMMU group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigTarget {
    /// The name `VFIO_GROUP_GET_DEVICE_FD` takes.
    pub name: String,
    /// The device's IOMMU group (`/dev/vfio/<group>`).
    pub group: IommuGroupId,
}

/// The largest state devfence saves or loads: that of an envelope's payload
/// (256 MiB, `devfence_seal::MAX_PAYLOAD`).
pub const MAX_STATE: u64 = 256 * 1024 * 1024;

/// Why a save or load did not happen or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigError {
    /// The device could not be opened through VFIO.
    #[error("cannot open {device} through VFIO (group {group}): {errno}")]
    Open {
        /// The device.
        device: String,
        /// Its group.
        group: IommuGroupId,
        /// The errno.
        errno: Errno,
    },
    /// The driver has no VFIO migration support (`ENOTTY`).
    #[error("no migration support: the driver of {device} does not implement VFIO migration")]
    NoMigration {
        /// The device.
        device: String,
    },
    /// The driver lacks `STOP_COPY` (the kernel requires it; fail closed).
    #[error("{device} reports migration flags {flags:?} without STOP_COPY")]
    NoStopCopy {
        /// The device.
        device: String,
        /// The flag names.
        flags: Vec<String>,
    },
    /// The device is not in a state devfence starts from (RUNNING or STOP).
    #[error(
        "{device} is in migration state {state}, not RUNNING or STOP: another migration is under way"
    )]
    Busy {
        /// The device.
        device: String,
        /// Its state.
        state: MigState,
    },
    /// A state ioctl failed.
    #[error("{device}: moving to {to} failed: {errno}")]
    Transition {
        /// The device.
        device: String,
        /// The requested state.
        to: MigState,
        /// The errno.
        errno: Errno,
    },
    /// The kernel started no data session where one was due.
    #[error("{device}: entering {to} gave no data fd")]
    NoDataFd {
        /// The device.
        device: String,
        /// The state entered.
        to: MigState,
    },
    /// The state is larger than allowed.
    #[error("{what} is more than {max} bytes")]
    TooLarge {
        /// What was being read or written.
        what: String,
        /// The cap.
        max: u64,
    },
    /// Reading or writing the data fd failed (the driver's errno shown: it is
    /// how the driver refuses a stream, e.g. mtty's `EFAULT` for a header).
    #[error("{device}: {what} failed: {}", errno_of(source))]
    Data {
        /// The device.
        device: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The driver refused the loaded stream (RESUMING → STOP failed).
    #[error("{device}: the driver refused the loaded state (RESUMING -> STOP): {errno}")]
    Rejected {
        /// The device.
        device: String,
        /// The errno.
        errno: Errno,
    },
    /// A state read failed.
    #[error("{device}: reading the migration state failed: {errno}")]
    State {
        /// The device.
        device: String,
        /// The errno.
        errno: Errno,
    },
}

fn errno_of(e: &io::Error) -> String {
    e.raw_os_error()
        .map_or_else(|| e.to_string(), |n| Errno(n).name())
}

impl MigError {
    /// What to do about it.
    #[must_use]
    pub fn hint(&self) -> String {
        match self {
            MigError::Open { errno, .. } if *errno == Errno::EBUSY => {
                "the device is in use (its VM runs, or another process holds its group): stop the VM first".into()
            }
            MigError::Open { .. } => {
                "the device must be bound to a vfio driver (vfio-pci, a vfio variant driver, or an mdev) and its group node present".into()
            }
            MigError::NoMigration { .. } | MigError::NoStopCopy { .. } => {
                "move the state another way (or not at all); `devfence inventory --probe-migration` shows which devices support migration".into()
            }
            MigError::Busy { .. } => "wait for the other migration, or reset the device".into(),
            MigError::TooLarge { .. } => "the device state exceeds devfence's 256 MiB cap".into(),
            MigError::Rejected { .. } => {
                "the destination's driver refused the stream: the devices are not compatible (driver version, type, ports)".into()
            }
            _ => "the device was returned to RUNNING where possible; check `dmesg`".into(),
        }
    }
}

/// Reads `r` to its end, refusing more than `max` bytes (a short read of 0 ends
/// the stream; `EINTR` is retried). The buffer grows with what was read, never
/// ahead of it beyond one chunk.
///
/// # Errors
/// [`MigError::TooLarge`] past `max`; [`MigError::Data`] for a read error.
pub fn read_capped(r: &mut dyn Read, max: u64, device: &str) -> Result<Vec<u8>, MigError> {
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(MigError::Data {
                    device: device.to_owned(),
                    what: "reading the saved state",
                    source,
                });
            }
        };
        if n == 0 {
            return Ok(out);
        }
        let got = chunk.get(..n).unwrap_or(&chunk);
        if out.len() as u64 + got.len() as u64 > max {
            return Err(MigError::TooLarge {
                what: format!("the state {device} saves"),
                max,
            });
        }
        out.extend_from_slice(got);
    }
}

/// What a load did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// The device's migration flags.
    pub flags: Vec<String>,
    /// Bytes written through the RESUMING data fd.
    pub written: u64,
    /// The state the device saved right after the load (read back through
    /// STOP_COPY), compared with what was loaded.
    pub readback_equal: bool,
    /// Its length.
    pub readback_len: u64,
    /// The migration state the device was left in.
    pub final_state: MigState,
}

/// Checks the device's migration flags (STOP_COPY required) and that it is in
/// RUNNING or STOP.
fn preflight(dev: &dyn MigrationDevice, name: &str) -> Result<(MigFlags, MigState), MigError> {
    let flags = match dev.flags() {
        Ok(f) => f,
        Err(e) if e == Errno::ENOTTY => {
            return Err(MigError::NoMigration {
                device: name.to_owned(),
            });
        }
        Err(errno) => {
            return Err(MigError::State {
                device: name.to_owned(),
                errno,
            });
        }
    };
    if !flags.has(MigFlags::STOP_COPY) {
        return Err(MigError::NoStopCopy {
            device: name.to_owned(),
            flags: flags.names(),
        });
    }
    let state = dev.state().map_err(|errno| MigError::State {
        device: name.to_owned(),
        errno,
    })?;
    if !matches!(state, MigState::Running | MigState::Stop) {
        return Err(MigError::Busy {
            device: name.to_owned(),
            state,
        });
    }
    Ok((flags, state))
}

fn set(
    dev: &mut dyn MigrationDevice,
    name: &str,
    to: MigState,
) -> Result<Option<Box<dyn MigData>>, MigError> {
    dev.set_state(to).map_err(|errno| MigError::Transition {
        device: name.to_owned(),
        to,
        errno,
    })
}

/// After a failed step: back to RUNNING.
///
/// From RESUMING (or ERROR, or an unknown state) only through
/// `VFIO_DEVICE_RESET`: asking for RUNNING would pass through RESUMING → STOP,
/// which is the driver's "apply what was written" — the very stream that just
/// failed (mtty keeps the bytes of a write it answered `EFAULT`). If the reset
/// fails the device is left where it is (a later preflight refuses it).
/// Otherwise (STOP, STOP_COPY) by asking for RUNNING, with a reset as fallback.
fn recover(dev: &mut dyn MigrationDevice) {
    match dev.state() {
        Ok(MigState::Resuming | MigState::Error) | Err(_) => {
            let _ = dev.reset();
        }
        Ok(_) => {
            if dev.set_state(MigState::Running).is_err() {
                let _ = dev.reset();
            }
        }
    }
}

/// Saves the device's state: RUNNING → STOP → STOP_COPY, reads the data fd to
/// its end (at most `max` bytes), then STOP → `back` (RUNNING or STOP).
///
/// # Errors
/// See [`MigError`]; on a failure after the device left its state, it is
/// returned to RUNNING.
pub fn save_state(
    dev: &mut dyn MigrationDevice,
    name: &str,
    max: u64,
    back: MigState,
) -> Result<Vec<u8>, MigError> {
    preflight(dev, name)?;
    let r = (|| {
        set(dev, name, MigState::Stop)?;
        let mut fd = set(dev, name, MigState::StopCopy)?.ok_or_else(|| MigError::NoDataFd {
            device: name.to_owned(),
            to: MigState::StopCopy,
        })?;
        let bytes = read_capped(&mut fd, max, name)?;
        drop(fd);
        set(dev, name, MigState::Stop)?;
        if back != MigState::Stop {
            set(dev, name, back)?;
        }
        Ok(bytes)
    })();
    if r.is_err() {
        recover(dev);
    }
    r
}

/// Loads `payload` into the device: checks its size against `max` first, then
/// STOP → RESUMING, writes it through the data fd, closes the fd, → STOP (the
/// driver validates and applies it), reads the state back through STOP_COPY
/// and compares, → STOP, and finally → `end` (STOP to hand the device on
/// stopped, RUNNING otherwise — closing the device returns it to RUNNING anyway).
///
/// # Errors
/// See [`MigError`]; on a failure the device is returned to RUNNING (the
/// loaded state, if any, is then the device's, but not vouched for).
pub fn load_state(
    dev: &mut dyn MigrationDevice,
    name: &str,
    payload: &[u8],
    max: u64,
    end: MigState,
) -> Result<LoadReport, MigError> {
    if payload.len() as u64 > max {
        return Err(MigError::TooLarge {
            what: "the state to load".into(),
            max,
        });
    }
    let (flags, _) = preflight(dev, name)?;
    let r = (|| {
        set(dev, name, MigState::Stop)?;
        let mut fd = set(dev, name, MigState::Resuming)?.ok_or_else(|| MigError::NoDataFd {
            device: name.to_owned(),
            to: MigState::Resuming,
        })?;
        fd.write_all(payload)
            .and_then(|()| fd.flush())
            .map_err(|source| MigError::Data {
                device: name.to_owned(),
                what: "writing the state to load",
                source,
            })?;
        drop(fd);
        dev.set_state(MigState::Stop)
            .map_err(|errno| MigError::Rejected {
                device: name.to_owned(),
                errno,
            })?;
        let mut rb = set(dev, name, MigState::StopCopy)?.ok_or_else(|| MigError::NoDataFd {
            device: name.to_owned(),
            to: MigState::StopCopy,
        })?;
        let back = read_capped(&mut rb, max, name)?;
        drop(rb);
        set(dev, name, MigState::Stop)?;
        if end != MigState::Stop {
            set(dev, name, end)?;
        }
        Ok(LoadReport {
            flags: flags.names(),
            written: payload.len() as u64,
            readback_equal: back == payload,
            readback_len: back.len() as u64,
            final_state: end,
        })
    })();
    if r.is_err() {
        recover(dev);
    }
    r
}

/// The capability the inventory shows for an open device.
///
/// # Errors
/// The kernel's errno other than `ENOTTY` (which means: no migration).
pub fn caps_of(dev: &dyn MigrationDevice) -> Result<MigrationCaps, Errno> {
    match dev.flags() {
        Ok(f) => Ok(MigrationCaps {
            supported: true,
            flags: f.names(),
            state: dev.state().ok().map(|s| s.name().to_owned()),
        }),
        Err(e) if e == Errno::ENOTTY => Ok(MigrationCaps {
            supported: false,
            flags: Vec::new(),
            state: None,
        }),
        Err(e) => Err(e),
    }
}

/// Whether a PCI driver is a VFIO driver (vfio-pci or a variant such as
/// `mlx5_vfio_pci`): only those have a VFIO device to ask.
fn vfio_driver(d: &str) -> bool {
    d == "vfio-pci" || d.ends_with("_vfio_pci") || d.starts_with("vfio")
}

/// Asks the kernel, for every mdev and every PCI function on a VFIO driver,
/// whether its driver implements VFIO migration and with which flags, and
/// records the answers in `inv.migration`.
///
/// Each device is opened through its group and closed again. Opening a
/// vfio-pci function for the first time resets it, and a device whose group is
/// held (its VM runs) answers `EBUSY`, recorded as the entry's `error`: probe
/// only when that is acceptable (`devfence inventory --probe-migration`).
pub fn probe_migration(io: &dyn crate::actuator::KernelIo, inv: &mut devfence_model::Inventory) {
    let mut targets: Vec<MigTarget> = Vec::new();
    for f in &inv.pci {
        if let (Some(d), Some(g)) = (&f.driver, f.iommu_group)
            && vfio_driver(d)
        {
            targets.push(MigTarget {
                name: f.bdf.to_string(),
                group: g,
            });
        }
    }
    for m in &inv.mdevs {
        if let (Some(_), Some(g)) = (&m.driver, m.iommu_group) {
            targets.push(MigTarget {
                name: m.uuid.to_string(),
                group: g,
            });
        }
    }
    inv.migration = targets
        .into_iter()
        .map(|t| {
            let r = io.open_migration(&t).and_then(|d| caps_of(&*d));
            match r {
                Ok(c) => devfence_model::DeviceMigration {
                    device: t.name,
                    supported: Some(c.supported),
                    flags: c.flags,
                    state: c.state,
                    error: None,
                },
                Err(e) => devfence_model::DeviceMigration {
                    device: t.name,
                    supported: None,
                    flags: Vec::new(),
                    state: None,
                    error: Some(e.name()),
                },
            }
        })
        .collect();
}

/// An in-memory device for [`fuzz_load`]: an honest driver that takes at most
/// `capacity` bytes in RESUMING (`ENOMEM` beyond, as mtty does), answers a
/// first write starting with `0xfe` with `EFAULT` but keeps its bytes (as mtty
/// does with a header it rejects), refuses a stream whose first byte is `0xff`
/// at RESUMING → STOP (`EINVAL`), and saves back what it loaded. It counts
/// every migration call.
struct FuzzDevice {
    state: MigState,
    loaded: Vec<u8>,
    incoming: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    capacity: usize,
    calls: u32,
    chunk: usize,
}

struct FuzzFile {
    buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    read_pos: Option<usize>,
    capacity: usize,
    chunk: usize,
}

impl Read for FuzzFile {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let Some(pos) = self.read_pos.as_mut() else {
            return Err(io::Error::from_raw_os_error(9));
        };
        let b = self
            .buf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = out.len().min(b.len() - *pos).min(self.chunk.max(1));
        out[..n].copy_from_slice(&b[*pos..*pos + n]);
        *pos += n;
        Ok(n)
    }
}

impl Write for FuzzFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.read_pos.is_some() {
            return Err(io::Error::from_raw_os_error(9));
        }
        let mut b = self
            .buf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if b.len() + data.len() > self.capacity {
            return Err(io::Error::from_raw_os_error(12));
        }
        let n = data.len().min(self.chunk.max(1));
        let header_bad = b.is_empty() && data.first() == Some(&0xfe);
        b.extend_from_slice(&data[..n]);
        if header_bad {
            // As mtty does with a header it rejects: keeps the bytes, EFAULT.
            return Err(io::Error::from_raw_os_error(14));
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MigrationDevice for FuzzDevice {
    fn flags(&self) -> Result<MigFlags, Errno> {
        Ok(MigFlags(MigFlags::STOP_COPY))
    }
    fn state(&self) -> Result<MigState, Errno> {
        Ok(self.state)
    }
    fn set_state(&mut self, s: MigState) -> Result<Option<Box<dyn MigData>>, Errno> {
        self.calls += 1;
        // As the kernel's table: out of RESUMING every path goes through STOP,
        // which applies what was written.
        if self.state == MigState::Resuming && !matches!(s, MigState::Resuming | MigState::Stop) {
            self.set_state(MigState::Stop)?;
        }
        let file = |buf, read_pos, capacity, chunk| -> Box<dyn MigData> {
            Box::new(FuzzFile {
                buf,
                read_pos,
                capacity,
                chunk,
            })
        };
        let r = match (self.state, s) {
            (a, b) if a == b => None,
            (MigState::Running | MigState::Stop, MigState::Running | MigState::Stop) => None,
            (MigState::Stop, MigState::Resuming) => {
                self.incoming = std::sync::Arc::default();
                Some(file(
                    std::sync::Arc::clone(&self.incoming),
                    None,
                    self.capacity,
                    self.chunk,
                ))
            }
            (MigState::Resuming, MigState::Stop) => {
                let b = self
                    .incoming
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                if b.first() == Some(&0xff) {
                    return Err(Errno::EINVAL);
                }
                self.loaded = b;
                None
            }
            (MigState::Stop, MigState::StopCopy) => Some(file(
                std::sync::Arc::new(std::sync::Mutex::new(self.loaded.clone())),
                Some(0),
                0,
                self.chunk,
            )),
            (MigState::StopCopy, MigState::Stop) => None,
            _ => return Err(Errno::EINVAL),
        };
        self.state = s;
        Ok(r)
    }
    fn reset(&mut self) -> Result<(), Errno> {
        self.state = MigState::Running;
        Ok(())
    }
    fn region_write(&mut self, _: u64, _: &[u8]) -> Result<(), Errno> {
        Err(Errno::EINVAL)
    }
    fn region_read(&self, _: u64, _: usize) -> Result<Vec<u8>, Errno> {
        Err(Errno::EINVAL)
    }
}

/// The fuzz target of the load path (`fuzz/fuzz_targets/migration_load.rs`),
/// also run by unit tests: byte 0 is the cap (× 8 bytes), byte 1 the chunk size
/// of the data fd, byte 2 the device's capacity (× 8), the rest the payload.
///
/// Properties: a payload over the cap is refused before any migration call;
/// a payload within the cap and the device's capacity that the driver accepts
/// loads and reads back equal, leaving the device in the requested state; any
/// failure leaves the device RUNNING; [`read_capped`] never returns more than
/// its cap. Never a panic.
///
/// # Panics
/// When a property does not hold (that is the fuzzer's finding).
#[doc(hidden)]
pub fn fuzz_load(data: &[u8]) {
    let [cap, chunk, capacity, payload @ ..] = data else {
        return;
    };
    let cap = u64::from(*cap) * 8;
    let capacity = usize::from(*capacity) * 8;
    let mut d = FuzzDevice {
        state: MigState::Running,
        loaded: Vec::new(),
        incoming: std::sync::Arc::default(),
        capacity,
        calls: 0,
        chunk: usize::from(*chunk),
    };
    let r = load_state(&mut d, "fuzz", payload, cap, MigState::Stop);
    if payload.len() as u64 > cap {
        assert!(matches!(r, Err(MigError::TooLarge { .. })), "{r:?}");
        assert_eq!(d.calls, 0, "a payload over the cap reached the device");
        assert_eq!(d.state, MigState::Running);
    } else if payload.len() <= capacity && !matches!(payload.first(), Some(&(0xfe | 0xff))) {
        let rep = r.unwrap_or_else(|e| panic!("an acceptable payload failed: {e}"));
        assert!(rep.readback_equal);
        assert_eq!(rep.written, payload.len() as u64);
        assert_eq!(d.state, MigState::Stop);
        assert_eq!(d.loaded, payload);
    } else {
        assert!(
            r.is_err(),
            "a payload the driver refuses was reported loaded"
        );
        assert_eq!(
            d.state,
            MigState::Running,
            "a failed load left the device stopped"
        );
        assert!(
            d.loaded.is_empty(),
            "a failed load applied the stream (through RESUMING -> STOP)"
        );
    }
    let mut f = FuzzFile {
        buf: std::sync::Arc::new(std::sync::Mutex::new(payload.to_vec())),
        read_pos: Some(0),
        capacity: 0,
        chunk: usize::from(*chunk),
    };
    match read_capped(&mut f, cap, "fuzz") {
        Ok(b) => {
            assert!(b.len() as u64 <= cap);
            assert_eq!(b, payload);
        }
        Err(MigError::TooLarge { .. }) => assert!(payload.len() as u64 > cap),
        Err(e) => panic!("read_capped: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_load_holds_on_a_spread_of_inputs() {
        // cap, chunk, capacity, payload.
        let payload: Vec<u8> = (0..200u8).collect();
        for cap in [0u8, 1, 3, 25, 255] {
            for chunk in [0u8, 1, 7, 255] {
                for capacity in [0u8, 2, 25, 255] {
                    for len in [0usize, 1, 8, 24, 60, 199] {
                        let mut d = vec![cap, chunk, capacity];
                        d.extend_from_slice(&payload[..len]);
                        fuzz_load(&d);
                        if len > 0 {
                            for first in [0xfe, 0xff] {
                                let mut bad = d.clone();
                                bad[3] = first;
                                fuzz_load(&bad);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_payload_over_the_cap_is_refused_before_the_device_is_touched() {
        let mut d = FuzzDevice {
            state: MigState::Running,
            loaded: Vec::new(),
            incoming: std::sync::Arc::default(),
            capacity: 1 << 20,
            calls: 0,
            chunk: 4096,
        };
        let r = load_state(&mut d, "x", &[0; 100], 99, MigState::Stop);
        assert!(
            matches!(r, Err(MigError::TooLarge { max: 99, .. })),
            "{r:?}"
        );
        assert_eq!(d.calls, 0);
    }

    #[test]
    fn states_and_flags_name_like_the_uapi() {
        for (i, s) in MigState::ALL.iter().enumerate() {
            assert_eq!(MigState::from_raw(u32::try_from(i).unwrap()), Some(*s));
            assert_eq!(s.raw() as usize, i);
        }
        assert_eq!(MigState::from_raw(8), None);
        assert_eq!(MigFlags(7).names(), ["STOP_COPY", "P2P", "PRE_COPY"]);
        assert_eq!(MigFlags(9).names(), ["STOP_COPY", "0x8"]);
        assert!(!MigFlags(1).supports(MigState::PreCopy));
    }
}
