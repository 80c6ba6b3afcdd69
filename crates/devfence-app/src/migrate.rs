//! `state save` and `state load`: device state through the
//! kernel's VFIO migration interface (docs/state-envelopes.md, "Through the
//! kernel's migration interface").
//!
//! `save` opens the stopped device itself (its VM is not running, so no QEMU
//! holds its group), saves its state (`devfence_host::migration::save_state`)
//! and seals the bytes as `state seal` does. `load` runs every admission check
//! of `state admit` in its transaction; only an admitted envelope opens the
//! destination device, whose migration capability is checked before the
//! envelope is spent; after the commit the state is loaded, read back and
//! compared (`load_state`), and the result audited.

use std::path::Path;

use devfence_host::HostRoot;
use devfence_host::migration::{
    MigError, MigFlags, MigState, MigTarget, MigrationDevice, load_state, save_state,
};
use devfence_model::{DeviceId, Inventory};
use devfence_seal::MAX_PAYLOAD;

use crate::env::Kernel;
use crate::error::{AppError, Result};
use crate::keystore::load_host_key;
use crate::state::{
    AdmitRequest, Admitted, DeviceLoader, SealRequest, Sealed, admit, seal_payload,
};

/// The VFIO name and group of a device, from the inventory.
fn target(inv: &Inventory, dev: &DeviceId) -> std::result::Result<MigTarget, (String, String)> {
    let (name, group) = match dev {
        DeviceId::Pci(b) => (
            b.to_string(),
            inv.pci_function(*b).and_then(|f| f.iommu_group),
        ),
        DeviceId::Mdev(u) => (
            u.to_string(),
            inv.mdevs
                .iter()
                .find(|m| m.uuid == *u)
                .and_then(|m| m.iommu_group),
        ),
        other => {
            return Err((
                format!("{other} is not a VFIO device: it has no migration interface"),
                "give a PCI address or an mdev UUID".into(),
            ));
        }
    };
    let group = group.ok_or_else(|| {
        (
            format!("{dev} is not on this host, or has no IOMMU group"),
            "check `devfence inventory`; the device must be bound to a vfio driver".into(),
        )
    })?;
    Ok(MigTarget { name, group })
}

/// Who drives the device and on which kernel, for error messages.
fn whom(inv: &Inventory, dev: &DeviceId) -> String {
    let driver = match dev {
        DeviceId::Pci(b) => inv.pci_function(*b).and_then(|f| f.driver.clone()),
        DeviceId::Mdev(u) => inv
            .mdevs
            .iter()
            .find(|m| m.uuid == *u)
            .and_then(|m| m.driver.clone()),
        _ => None,
    };
    format!(
        "device {dev}, driver {}, kernel {}",
        driver.as_deref().unwrap_or("none"),
        inv.kernel_release.as_deref().unwrap_or("unknown")
    )
}

/// A refusal (reason, hint) for a migration error that is the device's or the
/// kernel's answer rather than devfence's failure.
fn refusal(e: &MigError, who: &str) -> (String, String) {
    let reason = match e {
        MigError::NoMigration { .. } => {
            format!("no migration support: the driver does not implement VFIO migration ({who})")
        }
        _ => format!("{e} ({who})"),
    };
    (reason, e.hint())
}

fn open(kernel: &Kernel, t: &MigTarget) -> std::result::Result<Box<dyn MigrationDevice>, MigError> {
    kernel
        .io()
        .open_migration(t)
        .map_err(|errno| MigError::Open {
            device: t.name.clone(),
            group: t.group,
            errno,
        })
}

/// `state save`: saves the stopped device's state through its VFIO migration
/// interface and seals it (`r.action` is `state-save`).
///
/// # Errors
/// No host key; the host or the ledger cannot be read; the save failed.
pub fn save(root: &HostRoot, ledger: Option<&Path>, r: &SealRequest) -> Result<Sealed> {
    let dev = r.dev;
    let key = load_host_key(root)?;
    let kernel = Kernel::for_root(root)?;
    let inv = crate::check::inventory(root, false)?;
    let who = whom(&inv, &dev);
    // Called only once the device and its tenant passed seal's checks.
    let mut source = || {
        let t = match target(&inv, &dev) {
            Ok(t) => t,
            Err(rh) => return Ok(Err(rh)),
        };
        let mut d = match open(&kernel, &t) {
            Ok(d) => d,
            Err(e) => return Ok(Err(refusal(&e, &who))),
        };
        let flags = d.flags().map(MigFlags::names).unwrap_or_default();
        match save_state(&mut *d, &t.name, MAX_PAYLOAD, MigState::Running) {
            Ok(bytes) => {
                let after = d.state().map(|s| s.name()).unwrap_or("unknown");
                let info = serde_json::json!({
                    "interface": "vfio-migration-v2",
                    "flags": flags,
                    "bytes": bytes.len(),
                    "device_state_after": after,
                });
                Ok(Ok((bytes, info)))
            }
            Err(
                e @ (MigError::NoMigration { .. }
                | MigError::NoStopCopy { .. }
                | MigError::Busy { .. }
                | MigError::TooLarge { .. }),
            ) => Ok(Err(refusal(&e, &who))),
            Err(e) => Err(AppError::step(
                format!("{dev}: saving its state failed ({who})"),
                AppError::invalid(format!("{e}. Hint: {}", e.hint())),
            )),
        }
    };
    seal_payload(root, ledger, r, &key, &mut source)
}

/// The device side of `state load`.
struct Loader<'k> {
    kernel: &'k Kernel,
    inv: Inventory,
    dev: DeviceId,
    who: String,
    open: Option<(MigTarget, Box<dyn MigrationDevice>)>,
}

impl DeviceLoader for Loader<'_> {
    fn prepare(&mut self) -> std::result::Result<serde_json::Value, (String, String)> {
        let t = target(&self.inv, &self.dev)?;
        let d = open(self.kernel, &t).map_err(|e| refusal(&e, &self.who))?;
        let flags = match d.flags() {
            Ok(f) if f.has(MigFlags::STOP_COPY) => f,
            Ok(f) => {
                return Err(refusal(
                    &MigError::NoStopCopy {
                        device: t.name,
                        flags: f.names(),
                    },
                    &self.who,
                ));
            }
            Err(e) if e.0 == 25 => {
                return Err(refusal(
                    &MigError::NoMigration { device: t.name },
                    &self.who,
                ));
            }
            Err(errno) => {
                return Err(refusal(
                    &MigError::State {
                        device: t.name,
                        errno,
                    },
                    &self.who,
                ));
            }
        };
        let state = d.state().map_err(|errno| {
            refusal(
                &MigError::State {
                    device: t.name.clone(),
                    errno,
                },
                &self.who,
            )
        })?;
        if !matches!(state, MigState::Running | MigState::Stop) {
            return Err(refusal(
                &MigError::Busy {
                    device: t.name,
                    state,
                },
                &self.who,
            ));
        }
        let v = serde_json::json!({"flags": flags.names(), "device_state": state.name()});
        self.open = Some((t, d));
        Ok(v)
    }

    fn load(&mut self, payload: &[u8]) -> Result<serde_json::Value> {
        let (t, mut d) = self.open.take().ok_or_else(|| {
            AppError::invalid("Internal error: load before prepare. Hint: this is a bug")
        })?;
        let rep = load_state(&mut *d, &t.name, payload, MAX_PAYLOAD, MigState::Running)
            .map_err(|e| AppError::invalid(format!("{e} ({}). Hint: {}", self.who, e.hint())))?;
        if !rep.readback_equal {
            return Err(AppError::invalid(format!(
                "{}: the device took the state, but saves back {} bytes that differ from the {} loaded ({}). \
                 Hint: the device's driver changed or dropped part of the state; do not start the VM on it",
                t.name, rep.readback_len, rep.written, self.who
            )));
        }
        serde_json::to_value(&rep)
            .map_err(|e| AppError::invalid(format!("Internal error: {e}. Hint: this is a bug")))
    }
}

/// `state load`: admits the envelope (every check of `state admit`) and loads
/// its state into the device through its VFIO migration interface.
///
/// # Errors
/// As [`crate::state::admit`]; the host cannot be read; the load failed
/// after the envelope was spent.
pub fn load(root: &HostRoot, ledger: Option<&Path>, req: &AdmitRequest) -> Result<Admitted> {
    let dev = req.device;
    let kernel = Kernel::for_root(root)?;
    let inv = crate::check::inventory(root, false)?;
    let who = whom(&inv, &dev);
    let mut l = Loader {
        kernel: &kernel,
        inv,
        dev,
        who,
        open: None,
    };
    admit(root, ledger, req, Some(&mut l))
}
