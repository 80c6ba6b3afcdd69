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
    /// Reading or writing the data fd failed.
    #[error("{device}: {what} failed")]
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

/// After a failed step: back to RUNNING (through a reset when the device went
/// to ERROR). Best effort: closing the device does the same in the kernel.
fn recover(dev: &mut dyn MigrationDevice) {
    if dev.set_state(MigState::Running).is_err() {
        let _ = dev.reset();
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
