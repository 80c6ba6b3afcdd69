//! What a device is, as the host's inventory shows it: which handover procedure it
//! needs. The engine never reads sysfs itself; it asks the host crate.

use devfence_model::{Bdf, DeviceId, Guid, Inventory, IommuGroupId, MdevUuid};

/// The kind of handover a device needs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DeviceKind {
    /// A PCI function (PF or VF) handed to a VM through vfio-pci.
    Pci {
        /// The function.
        bdf: Bdf,
        /// Its IOMMU group.
        group: IommuGroupId,
    },
    /// A VF of a PF driven from user space (bound to vfio-pci): the VF opens only
    /// with the PF's VF token, which devfence sets fresh for every assignment.
    TokenVf {
        /// The VF.
        bdf: Bdf,
        /// Its IOMMU group.
        group: IommuGroupId,
        /// Its PF.
        pf: Bdf,
    },
    /// An InfiniBand VF of an mlx5 PF: its port GUID is the tenant's fabric identity.
    IbVf {
        /// The VF.
        bdf: Bdf,
        /// Its IOMMU group.
        group: IommuGroupId,
        /// Its PF.
        pf: Bdf,
        /// Its VF index under the PF.
        index: u32,
        /// The port GUID the host shows now (OFED `sriov/<N>/port` or the VF's IB
        /// device), if it can be read and is not zero.
        port_guid: Option<Guid>,
    },
    /// A mediated device: removed and re-created with a fresh UUID.
    Mdev {
        /// The mdev.
        uuid: MdevUuid,
        /// Its parent device.
        parent: String,
        /// Its type.
        type_id: String,
        /// Its IOMMU group, if it has one.
        group: Option<IommuGroupId>,
    },
}

impl DeviceKind {
    /// A short name for journals and plans.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Pci { .. } => "pci",
            DeviceKind::TokenVf { .. } => "token-vf",
            DeviceKind::IbVf { .. } => "ib-vf",
            DeviceKind::Mdev { .. } => "mdev",
        }
    }

    /// The PCI function, for kinds that are one.
    #[must_use]
    pub fn bdf(&self) -> Option<Bdf> {
        match self {
            DeviceKind::Pci { bdf, .. }
            | DeviceKind::TokenVf { bdf, .. }
            | DeviceKind::IbVf { bdf, .. } => Some(*bdf),
            DeviceKind::Mdev { .. } => None,
        }
    }

    /// The IOMMU group.
    #[must_use]
    pub fn group(&self) -> Option<IommuGroupId> {
        match self {
            DeviceKind::Pci { group, .. }
            | DeviceKind::TokenVf { group, .. }
            | DeviceKind::IbVf { group, .. } => Some(*group),
            DeviceKind::Mdev { group, .. } => *group,
        }
    }
}

/// Why a device cannot be handled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{device}: {reason}. Hint: {hint}")]
pub struct KindError {
    /// The device.
    pub device: DeviceId,
    /// What is wrong.
    pub reason: String,
    /// What to do.
    pub hint: String,
}

fn err(device: DeviceId, reason: impl Into<String>, hint: impl Into<String>) -> KindError {
    KindError {
        device,
        reason: reason.into(),
        hint: hint.into(),
    }
}

/// Classifies `device` from the inventory.
///
/// # Errors
/// The device is not on the host, has no IOMMU group, or is of a kind devfence
/// does not hand over (yet).
pub fn classify(inv: &Inventory, device: &DeviceId) -> Result<DeviceKind, KindError> {
    match device {
        DeviceId::Pci(bdf) => classify_pci(inv, *device, *bdf),
        DeviceId::Mdev(uuid) => {
            let m = inv.mdevs.iter().find(|m| m.uuid == *uuid).ok_or_else(|| {
                err(
                    *device,
                    "no such mdev on the host",
                    "`ls /sys/bus/mdev/devices` lists them; `devfence inventory` shows the host",
                )
            })?;
            let type_id = m.type_id.clone().ok_or_else(|| {
                err(
                    *device,
                    format!("its type cannot be read ({}/mdev_type)", m.sysfs_path),
                    "devfence re-creates an mdev with the same type on handover; check the mdev_type link",
                )
            })?;
            Ok(DeviceKind::Mdev {
                uuid: *uuid,
                parent: m.parent.clone(),
                type_id,
                group: m.iommu_group,
            })
        }
        DeviceId::Apqn(_) => Err(err(
            *device,
            "AP queues are handed over with their matrix mdev",
            "assign the vfio_ap matrix mdev (its UUID) instead; `devfence ap assign` moves single APQNs",
        )),
        DeviceId::IbGuid(_) => Err(err(
            *device,
            "a GUID is a port's identity, not a device",
            "name the VF by its PCI address; devfence gives it a fresh GUID on every assignment",
        )),
    }
}

fn classify_pci(inv: &Inventory, device: DeviceId, bdf: Bdf) -> Result<DeviceKind, KindError> {
    let f = inv.pci.iter().find(|f| f.bdf == bdf).ok_or_else(|| {
        err(
            device,
            "no such PCI function on the host",
            "`lspci -D` lists the functions; `devfence inventory` shows what devfence sees",
        )
    })?;
    let group = f.iommu_group.ok_or_else(|| {
        // A link that is there but malformed is not a missing IOMMU.
        let link = format!("{}/iommu_group", f.sysfs_path);
        if let Some(p) = inv.problems.iter().find(|p| p.path == link) {
            return err(
                device,
                format!(
                    "its IOMMU group is unknown: {link} ({}) — {}",
                    p.value.as_deref().unwrap_or("unreadable"),
                    p.error
                ),
                "the kernel links every device of an IOMMU to /sys/kernel/iommu_groups/<N>; something changed this link — check the host (`ls -l`) before trusting the device",
            );
        }
        err(
            device,
            format!("it has no IOMMU group ({link} is missing)"),
            "enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line); without one no device can be isolated",
        )
    })?;
    let Some(pf) = f.physfn else {
        return Ok(DeviceKind::Pci { bdf, group });
    };
    let pff = inv.pci.iter().find(|p| p.bdf == pf);
    let is_ib_pf = inv.ib.iter().any(|d| d.pci == Some(pf))
        || pff
            .and_then(|p| p.sriov.as_ref())
            .is_some_and(|s| !s.vf_guids.is_empty());
    if pff.and_then(|p| p.driver.as_deref()) == Some("vfio-pci") {
        return Ok(DeviceKind::TokenVf { bdf, group, pf });
    }
    if is_ib_pf {
        let sriov = pff.and_then(|p| p.sriov.as_ref());
        let index = sriov
            .and_then(|s| s.vfs.iter().find(|v| v.bdf == bdf))
            .map(|v| v.index)
            .ok_or_else(|| {
                err(
                    device,
                    format!("its PF {pf} does not list it among its virtfn links"),
                    "the SR-IOV links are inconsistent; re-create the VFs (`devfence vfs PF --count N`)",
                )
            })?;
        let ofed = sriov
            .and_then(|s| s.vf_guids.iter().find(|g| g.index == index))
            .and_then(|g| g.port_guid);
        let own = inv
            .ib
            .iter()
            .filter(|d| d.pci == Some(bdf))
            .flat_map(|d| d.ports.iter())
            .find_map(|p| p.port_guid);
        let port_guid = ofed.or(own).filter(|g| g.0 != 0);
        return Ok(DeviceKind::IbVf {
            bdf,
            group,
            pf,
            index,
            port_guid,
        });
    }
    Ok(DeviceKind::Pci { bdf, group })
}
