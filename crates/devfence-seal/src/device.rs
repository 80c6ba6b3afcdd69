//! What a device is, for an envelope: its [`DeviceDescriptor`] read from the
//! host's inventory, on the source (to seal) and on the destination (to compare).
//!
//! # The migration-compatibility string
//!
//! Linux exposes no generic migration-compatibility attribute (VFIO migration v2
//! leaves compatibility to the vendor driver, which checks it inside its own
//! stream). devfence therefore composes one from what decides, beyond the
//! device's own ids, whether a vendor's state stream is meaningful on the
//! destination:
//!
//! - a VF (`pci-vf`, `ib-vf`): the PF's ids, `pf VVVV:DDDD` — the PF's firmware
//!   produces and consumes its VFs' state;
//! - an mdev: the parent's PCI ids and the type's name where the host shows
//!   them, `parent VVVV:DDDD; type NAME` (e.g. `parent 10de:1eb8; type GRID T4-1B`);
//! - any other PCI function: none.
//!
//! A vendor attribute, once the host crate reads one, belongs here too.

use devfence_model::{Bdf, DeviceId, Inventory, PciFunction};

use crate::format::{DeviceDescriptor, DeviceIdentity, DeviceKind, PciIds};

/// Why a device cannot be described.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{device}: {reason}. Hint: {hint}")]
pub struct DescribeError {
    /// The device.
    pub device: DeviceId,
    /// What is wrong.
    pub reason: String,
    /// What to do.
    pub hint: String,
}

fn err(device: DeviceId, reason: impl Into<String>, hint: impl Into<String>) -> DescribeError {
    DescribeError {
        device,
        reason: reason.into(),
        hint: hint.into(),
    }
}

fn pci_ids(device: DeviceId, f: &PciFunction) -> Result<PciIds, DescribeError> {
    match (f.vendor, f.device, f.subsystem_vendor, f.subsystem_device) {
        (Some(vendor), Some(dev), Some(subsystem_vendor), Some(subsystem_device)) => Ok(PciIds {
            vendor,
            device: dev,
            subsystem_vendor,
            subsystem_device,
        }),
        _ => Err(err(
            device,
            format!(
                "its vendor, device or subsystem ids cannot be read ({})",
                f.sysfs_path
            ),
            "`devfence inventory` lists what could not be read; state is bound to the device model",
        )),
    }
}

/// Describes `device` from the inventory.
///
/// # Errors
/// The device is not on the host, its ids, type or driver cannot be read, or it
/// is of a kind that carries no migratable state (AP queues, GUIDs).
pub fn describe(inv: &Inventory, device: &DeviceId) -> Result<DeviceDescriptor, DescribeError> {
    match device {
        DeviceId::Pci(bdf) => describe_pci(inv, *device, *bdf),
        DeviceId::Mdev(uuid) => {
            let m = inv.mdevs.iter().find(|m| m.uuid == *uuid).ok_or_else(|| {
                err(
                    *device,
                    "no such mdev on the host",
                    "`devfence inventory` lists the mdevs",
                )
            })?;
            let type_id = m.type_id.clone().ok_or_else(|| {
                err(
                    *device,
                    format!("its type cannot be read ({}/mdev_type)", m.sysfs_path),
                    "state is bound to the mdev type; check the mdev_type link",
                )
            })?;
            let parent = inv.mdev_parents.iter().find(|p| p.name == m.parent);
            let ty = parent.and_then(|p| p.types.iter().find(|t| t.id == type_id));
            let device_api = ty.and_then(|t| t.device_api.clone()).ok_or_else(|| {
                err(
                    *device,
                    format!(
                        "the device_api of type {type_id} under parent {} cannot be read",
                        m.parent
                    ),
                    "state is bound to the type's device_api; check mdev_supported_types/<type>/device_api",
                )
            })?;
            let driver = m.driver.clone().ok_or_else(|| {
                err(
                    *device,
                    "no driver is bound to it",
                    "state moves only between devices bound to their VFIO driver (vfio_mdev)",
                )
            })?;
            let mut parts = Vec::new();
            if let Ok(pbdf) = m.parent.parse::<Bdf>()
                && let Some(pf) = inv.pci.iter().find(|f| f.bdf == pbdf)
                && let (Some(v), Some(d)) = (pf.vendor, pf.device)
            {
                parts.push(format!("parent {v:04x}:{d:04x}"));
            }
            if let Some(name) = ty.and_then(|t| t.name.as_deref())
                && !name.trim().is_empty()
            {
                parts.push(format!("type {}", name.trim()));
            }
            Ok(DeviceDescriptor {
                kind: DeviceKind::Mdev,
                identity: DeviceIdentity::Mdev {
                    type_id,
                    device_api,
                },
                driver,
                compat: (!parts.is_empty()).then(|| parts.join("; ")),
            })
        }
        DeviceId::Apqn(_) => Err(err(
            *device,
            "an AP queue carries no migratable device state of its own",
            "AP queues move with their vfio_ap matrix mdev; name the mdev",
        )),
        DeviceId::IbGuid(_) => Err(err(
            *device,
            "a GUID is a port's identity, not a device",
            "name the VF by its PCI address",
        )),
    }
}

fn describe_pci(
    inv: &Inventory,
    device: DeviceId,
    bdf: Bdf,
) -> Result<DeviceDescriptor, DescribeError> {
    let f = inv.pci.iter().find(|f| f.bdf == bdf).ok_or_else(|| {
        err(
            device,
            "no such PCI function on the host",
            "`devfence inventory` shows what devfence sees",
        )
    })?;
    let ids = pci_ids(device, f)?;
    let driver = f.driver.clone().ok_or_else(|| {
        err(
            device,
            "no driver is bound to it",
            "state moves only between functions bound to their VFIO driver (vfio-pci or a vendor variant)",
        )
    })?;
    let (kind, compat) = match f.physfn {
        None => (DeviceKind::PciFunction, None),
        Some(pf) => {
            let pff = inv.pci.iter().find(|p| p.bdf == pf);
            let is_ib = inv.ib.iter().any(|d| d.pci == Some(pf))
                || pff
                    .and_then(|p| p.sriov.as_ref())
                    .is_some_and(|s| !s.vf_guids.is_empty());
            let compat = pff.and_then(|p| Some(format!("pf {:04x}:{:04x}", p.vendor?, p.device?)));
            let compat = compat.ok_or_else(|| {
                err(
                    device,
                    format!("the ids of its PF {pf} cannot be read"),
                    "a VF's state is bound to its PF's model; `devfence inventory` shows the PF",
                )
            })?;
            (
                if is_ib {
                    DeviceKind::IbVf
                } else {
                    DeviceKind::PciVf
                },
                Some(compat),
            )
        }
    };
    Ok(DeviceDescriptor {
        kind,
        identity: DeviceIdentity::Pci(ids),
        driver,
        compat,
    })
}

/// Compares the device an envelope is for with the destination device. `Ok` if
/// they are the same kind and model, on the same driver, with the same
/// compatibility string; otherwise the first difference.
///
/// # Errors
/// What differs, worded for an operator.
pub fn compare(sealed: &DeviceDescriptor, dest: &DeviceDescriptor) -> Result<(), String> {
    if sealed.kind != dest.kind {
        return Err(format!(
            "the envelope is for a device of kind {}, {}; the destination is of kind {}, {}",
            sealed.kind, sealed.identity, dest.kind, dest.identity
        ));
    }
    if sealed.identity != dest.identity {
        return Err(format!(
            "the envelope is for {}, but the destination is {}",
            sealed.identity, dest.identity
        ));
    }
    if sealed.driver != dest.driver {
        return Err(format!(
            "the envelope is for driver {}, but the destination is bound to {}",
            sealed.driver, dest.driver
        ));
    }
    if sealed.compat != dest.compat {
        let show =
            |c: &Option<String>| c.as_deref().map_or("none".to_owned(), |c| format!("{c:?}"));
        return Err(format!(
            "the envelope's compatibility string is {}, but the destination's is {}",
            show(&sealed.compat),
            show(&dest.compat)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use devfence_model::{
        IbDevice, IommuGroupId, Mdev, MdevParent, MdevType, MdevUuid, SriovPf, VirtFn,
    };

    use super::*;

    fn func(
        bdf: &str,
        vendor: u16,
        device: u16,
        physfn: Option<&str>,
        driver: Option<&str>,
    ) -> PciFunction {
        PciFunction {
            bdf: bdf.parse().expect("bdf"),
            sysfs_path: format!("/sys/devices/pci0000:00/{bdf}"),
            vendor: Some(vendor),
            device: Some(device),
            subsystem_vendor: Some(vendor),
            subsystem_device: Some(0x0061),
            class: None,
            driver: driver.map(str::to_owned),
            driver_override: None,
            iommu_group: Some(IommuGroupId(1)),
            reset_methods: vec![],
            has_reset: true,
            numa_node: None,
            sriov: None,
            physfn: physfn.map(|p| p.parse().expect("pf")),
            vfio_dev: vec![],
        }
    }

    fn inventory() -> Inventory {
        let mut ibpf = func("0000:3b:00.0", 0x15b3, 0x101b, None, Some("mlx5_core"));
        ibpf.sriov = Some(SriovPf {
            total_vfs: Some(4),
            num_vfs: Some(1),
            vfs: vec![VirtFn {
                index: 0,
                bdf: "0000:3b:00.1".parse().expect("bdf"),
            }],
            vf_guids: vec![],
        });
        let gpu = func("0000:65:00.0", 0x10de, 0x1eb8, None, Some("nvidia"));
        Inventory {
            pci: vec![
                ibpf,
                func(
                    "0000:3b:00.1",
                    0x15b3,
                    0x101c,
                    Some("0000:3b:00.0"),
                    Some("vfio-pci"),
                ),
                func("0000:5e:00.0", 0x8086, 0x10c9, None, Some("igb")),
                func(
                    "0000:5e:10.0",
                    0x8086,
                    0x10ca,
                    Some("0000:5e:00.0"),
                    Some("vfio-pci"),
                ),
                func("0000:5e:10.2", 0x8086, 0x10ca, Some("0000:5e:00.0"), None),
                gpu,
            ],
            ib: vec![IbDevice {
                name: "mlx5_0".into(),
                node_guid: None,
                node_type: None,
                pci: Some("0000:3b:00.0".parse().expect("bdf")),
                ports: vec![],
            }],
            mdev_parents: vec![MdevParent {
                name: "0000:65:00.0".into(),
                sysfs_path: String::new(),
                types: vec![MdevType {
                    id: "nvidia-63".into(),
                    name: Some("GRID T4-1B".into()),
                    device_api: Some("vfio-pci".into()),
                    available_instances: Some(1),
                }],
            }],
            mdevs: vec![Mdev {
                uuid: MdevUuid([1; 16]),
                parent: "0000:65:00.0".into(),
                sysfs_path: "/sys/devices/x".into(),
                type_id: Some("nvidia-63".into()),
                iommu_group: None,
                driver: Some("vfio_mdev".into()),
            }],
            ..Inventory::default()
        }
    }

    fn d(s: &str) -> DeviceId {
        s.parse().expect("device")
    }

    #[test]
    fn kinds_and_compat_come_from_the_inventory() {
        let inv = inventory();
        let ib = describe(&inv, &d("0000:3b:00.1")).expect("ib vf");
        assert_eq!(ib.kind, DeviceKind::IbVf);
        assert_eq!(ib.compat.as_deref(), Some("pf 15b3:101b"));
        assert_eq!(ib.driver, "vfio-pci");
        let vf = describe(&inv, &d("0000:5e:10.0")).expect("vf");
        assert_eq!(vf.kind, DeviceKind::PciVf);
        assert_eq!(vf.compat.as_deref(), Some("pf 8086:10c9"));
        let pf = describe(&inv, &d("0000:5e:00.0")).expect("pf");
        assert_eq!(pf.kind, DeviceKind::PciFunction);
        assert_eq!(pf.compat, None);
        let m = describe(&inv, &DeviceId::Mdev(MdevUuid([1; 16]))).expect("mdev");
        assert_eq!(m.kind, DeviceKind::Mdev);
        assert_eq!(
            m.identity,
            DeviceIdentity::Mdev {
                type_id: "nvidia-63".into(),
                device_api: "vfio-pci".into()
            }
        );
        assert_eq!(
            m.compat.as_deref(),
            Some("parent 10de:1eb8; type GRID T4-1B")
        );
    }

    #[test]
    fn undescribable_devices_say_why() {
        let inv = inventory();
        let e = describe(&inv, &d("0000:5e:10.2")).expect_err("no driver");
        assert!(e.reason.contains("no driver"), "{e}");
        let e = describe(&inv, &d("0000:99:00.0")).expect_err("absent");
        assert!(e.reason.contains("no such PCI function"), "{e}");
        let e = describe(&inv, &d("05.0012")).expect_err("apqn");
        assert!(e.hint.contains("matrix mdev"), "{e}");
        let e = describe(&inv, &DeviceId::Mdev(MdevUuid([2; 16]))).expect_err("no mdev");
        assert!(e.reason.contains("no such mdev"), "{e}");
        let mut inv = inventory();
        inv.pci[3].subsystem_device = None;
        let e = describe(&inv, &d("0000:5e:10.0")).expect_err("ids");
        assert!(e.reason.contains("ids cannot be read"), "{e}");
    }

    #[test]
    fn compare_names_the_first_difference() {
        let inv = inventory();
        let ib = describe(&inv, &d("0000:3b:00.1")).expect("ib");
        let vf = describe(&inv, &d("0000:5e:10.0")).expect("vf");
        assert!(compare(&ib, &ib).is_ok());
        let e = compare(&ib, &vf).expect_err("kind");
        assert!(
            e.contains("of kind ib-vf") && e.contains("destination is of kind pci-vf"),
            "{e}"
        );
        let mut other = vf.clone();
        other.identity = DeviceIdentity::Pci(PciIds {
            vendor: 0x8086,
            device: 0x1520,
            subsystem_vendor: 0x8086,
            subsystem_device: 0x0061,
        });
        assert!(compare(&vf, &other).expect_err("ids").contains("8086:1520"));
        let mut other = vf.clone();
        other.driver = "igbvf".into();
        assert!(
            compare(&vf, &other)
                .expect_err("driver")
                .contains("bound to igbvf")
        );
        let mut other = vf.clone();
        other.compat = Some("pf 8086:1521".into());
        assert!(
            compare(&vf, &other)
                .expect_err("compat")
                .contains("compatibility")
        );
    }
}
