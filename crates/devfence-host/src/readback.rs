//! The engine's read-back of the host: what its gates and the hook's
//! re-verification read to prove a step took effect — the driver of a
//! function, a group node's owner and mode, whether an mdev is there and its
//! IOMMU group, the GUID and P_Key table of an IB VF's port. Everything is read
//! through a [`KernelIo`] (the running or the simulated kernel), under its root;
//! the paths it reads are named here once, and returned so that evidence and
//! messages can name them.

use devfence_model::{Bdf, Guid, Inventory, IommuGroupId, MdevUuid, PKeySlot};

use crate::actuator::{Errno, KernelIo, NodeMeta};
use crate::root::{HostError, HostRoot};
use crate::{inventory, parse};

/// Why a read-back could not be made (the value is not there or not valid).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadBackError {
    /// No `iommu_group` link.
    #[error("it has no IOMMU group ({link}: {errno})")]
    NoGroup {
        /// The link.
        link: String,
        /// The errno.
        errno: Errno,
    },
    /// The `iommu_group` link does not name a group.
    #[error("{link} points to {target:?}, not an IOMMU group")]
    NotAGroup {
        /// The link.
        link: String,
        /// Its target.
        target: String,
    },
    /// The group's device list cannot be read.
    #[error("cannot list IOMMU group {group} ({dir}: {errno})")]
    GroupMembers {
        /// The group.
        group: IommuGroupId,
        /// Its `devices` directory.
        dir: String,
        /// The errno.
        errno: Errno,
    },
    /// A VF without a `physfn` link.
    #[error("it has no PF ({link}: {errno})")]
    NoPf {
        /// The link.
        link: String,
        /// The errno.
        errno: Errno,
    },
    /// The PF's directory cannot be listed.
    #[error("cannot list its PF {dir}: {errno}")]
    PfUnlisted {
        /// The PF's directory.
        dir: String,
        /// The errno.
        errno: Errno,
    },
    /// The PF has no `virtfnN` link to the VF.
    #[error("its PF {pf} does not list it among its VFs")]
    NotAVfOf {
        /// The PF's name.
        pf: String,
    },
    /// The function shows no InfiniBand device (its IB driver is not loaded).
    #[error("{bdf} has no InfiniBand device on its host driver ({dir}: {errno})")]
    NoIbDevice {
        /// The function.
        bdf: Bdf,
        /// Its `infiniband` directory.
        dir: String,
        /// The errno.
        errno: Errno,
    },
    /// The `infiniband` directory is empty.
    #[error("{dir} is empty")]
    EmptyIbDir {
        /// The directory.
        dir: String,
    },
    /// A directory cannot be listed.
    #[error("cannot list {dir}: {errno}")]
    List {
        /// The directory.
        dir: String,
        /// The errno.
        errno: Errno,
    },
    /// An attribute cannot be read.
    #[error("cannot read {path}: {errno}")]
    Read {
        /// The attribute.
        path: String,
        /// The errno.
        errno: Errno,
    },
    /// A P_Key slot holds something else.
    #[error("{path} holds {raw:?}, not a P_Key ({reason})")]
    NotAPKey {
        /// The slot.
        path: String,
        /// What it holds (lossy UTF-8).
        raw: String,
        /// Why it is not a P_Key.
        reason: String,
    },
}

/// Port 1 of the IB device an IB VF shows on its host driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfIbPort {
    /// The port's directory.
    pub dir: String,
    /// The `gids/0` attribute the port GUID is read from.
    pub gid0: String,
    /// The port GUID `gids/0` shows (`None` when unreadable).
    pub guid: Option<Guid>,
}

impl VfIbPort {
    /// The port's `pkeys` directory.
    #[must_use]
    pub fn pkeys_dir(&self) -> String {
        format!("{}/pkeys", self.dir)
    }
}

/// The kernel path of a PCI function's directory.
#[must_use]
pub fn pci_dir(bdf: Bdf) -> String {
    format!("/sys/bus/pci/devices/{bdf}")
}

/// The kernel path of an mdev's directory.
#[must_use]
pub fn mdev_dir(u: MdevUuid) -> String {
    format!("/sys/bus/mdev/devices/{u}")
}

/// The kernel path of an IOMMU group's VFIO node.
#[must_use]
pub fn group_node(g: IommuGroupId) -> String {
    format!("/dev/vfio/{g}")
}

/// The kernel path of a function's driver link.
#[must_use]
pub fn driver_link(bdf: Bdf) -> String {
    format!("{}/driver", pci_dir(bdf))
}

fn basename(link: &str) -> &str {
    link.rsplit('/').next().unwrap_or(link)
}

/// The read-back API over one kernel.
#[derive(Clone, Copy)]
pub struct ReadBack<'a> {
    io: &'a dyn KernelIo,
}

/// A vfio_ap matrix mdev's configuration (`matrix` and `control_domains`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ApMatrixConfig {
    /// The adapters of the matrix.
    pub adapters: Vec<u8>,
    /// The usage domains of the matrix.
    pub domains: Vec<u8>,
    /// The control domains.
    pub control_domains: Vec<u8>,
}

impl<'a> ReadBack<'a> {
    /// Reads through `io`.
    #[must_use]
    pub fn new(io: &'a dyn KernelIo) -> Self {
        Self { io }
    }

    /// The host root.
    #[must_use]
    pub fn root(&self) -> &'a HostRoot {
        self.io.root()
    }

    /// The whole inventory of the host.
    ///
    /// # Errors
    /// The root cannot be read.
    pub fn inventory(&self) -> Result<Inventory, HostError> {
        inventory::read_inventory(self.io.root())
    }

    /// Whether the PCI function is on the host.
    #[must_use]
    pub fn pci_present(&self, bdf: Bdf) -> bool {
        self.io.exists(&pci_dir(bdf))
    }

    /// Whether the mdev exists.
    #[must_use]
    pub fn mdev_present(&self, u: MdevUuid) -> bool {
        self.io.exists(&mdev_dir(u))
    }

    /// The raw target of the function's driver link.
    ///
    /// # Errors
    /// `ENOENT` when it has no driver.
    pub fn driver_target(&self, bdf: Bdf) -> Result<String, Errno> {
        self.io.read_link(&driver_link(bdf))
    }

    /// The name of the function's driver, if it has one.
    #[must_use]
    pub fn driver_of(&self, bdf: Bdf) -> Option<String> {
        self.driver_target(bdf)
            .ok()
            .map(|t| basename(&t).to_owned())
    }

    /// Whether the group's VFIO node exists.
    #[must_use]
    pub fn node_present(&self, g: IommuGroupId) -> bool {
        self.io.exists(&group_node(g))
    }

    /// Owner, group and mode of the group's VFIO node.
    ///
    /// # Errors
    /// The errno of `stat`.
    pub fn node_meta(&self, g: IommuGroupId) -> Result<NodeMeta, Errno> {
        self.io.stat(&group_node(g))
    }

    /// Owner, group and mode of a file under the root (a file devfence wrote,
    /// such as a VF token), following a link inside the root.
    ///
    /// # Errors
    /// The errno of `stat`.
    pub fn file_meta(&self, path: &str) -> Result<NodeMeta, Errno> {
        self.io.stat(path)
    }

    /// The IOMMU group of a PCI function.
    ///
    /// # Errors
    /// No group link, or one that names no group.
    pub fn pci_group(&self, bdf: Bdf) -> Result<IommuGroupId, ReadBackError> {
        self.group_of(&pci_dir(bdf))
    }

    /// The IOMMU group of an mdev.
    ///
    /// # Errors
    /// No group link, or one that names no group.
    pub fn mdev_group(&self, u: MdevUuid) -> Result<IommuGroupId, ReadBackError> {
        self.group_of(&mdev_dir(u))
    }

    fn group_of(&self, dir: &str) -> Result<IommuGroupId, ReadBackError> {
        let link = format!("{dir}/iommu_group");
        let t = self
            .io
            .read_link(&link)
            .map_err(|errno| ReadBackError::NoGroup {
                link: link.clone(),
                errno,
            })?;
        basename(&t)
            .parse::<u32>()
            .map(IommuGroupId)
            .map_err(|_| ReadBackError::NotAGroup { link, target: t })
    }

    /// The device names the kernel lists in an IOMMU group.
    ///
    /// # Errors
    /// The group's `devices` directory cannot be listed.
    pub fn group_members(&self, g: IommuGroupId) -> Result<Vec<String>, ReadBackError> {
        let dir = format!("/sys/kernel/iommu_groups/{g}/devices");
        self.io
            .list_dir(&dir)
            .map_err(|errno| ReadBackError::GroupMembers {
                group: g,
                dir,
                errno,
            })
    }

    /// The GUID a VF's PF shows for it (`sriov/<index>/port` on the PF), with
    /// the attribute read; the GUID is `None` when unreadable.
    ///
    /// # Errors
    /// The VF's PF or its index cannot be found.
    pub fn vf_guid_at_pf(&self, bdf: Bdf) -> Result<(Option<Guid>, String), ReadBackError> {
        let dir = pci_dir(bdf);
        let link = format!("{dir}/physfn");
        let pf = self
            .io
            .read_link(&link)
            .map_err(|errno| ReadBackError::NoPf {
                link: link.clone(),
                errno,
            })?;
        let pf = basename(&pf).to_owned();
        let pfdir = format!("/sys/bus/pci/devices/{pf}");
        let entries = self
            .io
            .list_dir(&pfdir)
            .map_err(|errno| ReadBackError::PfUnlisted {
                dir: pfdir.clone(),
                errno,
            })?;
        let index = entries
            .iter()
            .filter_map(|n| n.strip_prefix("virtfn").and_then(|i| i.parse::<u32>().ok()))
            .find(|i| {
                self.io
                    .read_link(&format!("{pfdir}/virtfn{i}"))
                    .is_ok_and(|t| basename(&t) == bdf.to_string())
            })
            .ok_or(ReadBackError::NotAVfOf { pf })?;
        let port = format!("{pfdir}/sriov/{index}/port");
        let seen = self
            .io
            .read(&port)
            .ok()
            .and_then(|b| parse::ofed_guid(&b).ok());
        Ok((seen, port))
    }

    /// Port 1 of the IB device the VF shows on its host driver, and the port
    /// GUID it shows (`gids/0`).
    ///
    /// # Errors
    /// No IB device under the function.
    pub fn vf_ib_port(&self, bdf: Bdf) -> Result<VfIbPort, ReadBackError> {
        let ibdir = format!("{}/infiniband", pci_dir(bdf));
        let devs = self
            .io
            .list_dir(&ibdir)
            .map_err(|errno| ReadBackError::NoIbDevice {
                bdf,
                dir: ibdir.clone(),
                errno,
            })?;
        let Some(dev) = devs.into_iter().next() else {
            return Err(ReadBackError::EmptyIbDir { dir: ibdir });
        };
        let dir = format!("{ibdir}/{dev}/ports/1");
        let gid0 = format!("{dir}/gids/0");
        let guid = self
            .io
            .read(&gid0)
            .ok()
            .and_then(|b| parse::gid_port_guid(&b).ok());
        Ok(VfIbPort { dir, gid0, guid })
    }

    /// The port's P_Key table: every slot that holds a P_Key, by index (the
    /// reading the inventory makes of `pkeys/`).
    ///
    /// # Errors
    /// A slot that cannot be read or holds no P_Key (devfence trusts no table it
    /// cannot read whole).
    pub fn pkey_table(&self, port: &VfIbPort) -> Result<Vec<PKeySlot>, ReadBackError> {
        let pdir = port.pkeys_dir();
        let names = self
            .io
            .list_dir(&pdir)
            .map_err(|errno| ReadBackError::List {
                dir: pdir.clone(),
                errno,
            })?;
        let slots = inventory::pkey_slot_names(names);
        let names: Vec<String> = slots.iter().map(|(_, n)| n.clone()).collect();
        // One pass over the directory (each slot still a bounded read of a
        // regular file): a consistent table, and no per-slot path walk.
        let raws = self.io.read_each(&pdir, &names);
        let mut table = Vec::new();
        for ((index, n), raw) in slots.into_iter().zip(raws) {
            let p = format!("{pdir}/{n}");
            let raw = raw.map_err(|errno| ReadBackError::Read {
                path: p.clone(),
                errno,
            })?;
            let pkey = parse::pkey(&raw).map_err(|x| ReadBackError::NotAPKey {
                path: p.clone(),
                raw: String::from_utf8_lossy(&raw).into_owned(),
                reason: x.to_string(),
            })?;
            if !pkey.is_empty_slot() {
                table.push(PKeySlot { index, pkey });
            }
        }
        Ok(table)
    }

    /// A vfio_ap matrix mdev's configuration: its matrix (adapters, domains)
    /// and control domains, as the vfio_ap driver shows them.
    ///
    /// # Errors
    /// A file that cannot be read or does not parse, named.
    pub fn ap_matrix(&self, u: MdevUuid) -> Result<ApMatrixConfig, String> {
        let dir = format!("/sys/devices/vfio_ap/matrix/{u}");
        let read = |name: &str| {
            let p = format!("{dir}/{name}");
            self.io
                .read(&p)
                .map_err(|x| format!("cannot read {p}: {x}"))
        };
        let m =
            crate::parse::ap_matrix(&read("matrix")?).map_err(|x| format!("{dir}/matrix: {x}"))?;
        let cd = crate::parse::control_domains(&read("control_domains")?)
            .map_err(|x| format!("{dir}/control_domains: {x}"))?;
        Ok(ApMatrixConfig {
            adapters: m.adapters,
            domains: m.domains,
            control_domains: cd,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actuator::recording::RecordingIo;
    use devfence_model::PKey;

    fn bdf(s: &str) -> Bdf {
        s.parse().expect("bdf")
    }

    #[test]
    fn reads_a_vfs_port_and_its_pkey_table_in_slot_order() {
        let port = "/sys/bus/pci/devices/0000:03:00.2/infiniband/mlx5_2/ports/1";
        let io = RecordingIo::new()
            .file(
                &format!("{port}/gids/0"),
                "fe80:0000:0000:0000:0002:c903:0000:1234\n",
            )
            .file(&format!("{port}/pkeys/10"), "0x8002\n")
            .file(&format!("{port}/pkeys/2"), "0x0000\n")
            .file(&format!("{port}/pkeys/1"), "0x8001\n")
            .file(&format!("{port}/pkeys/x"), "junk\n");
        let rb = ReadBack::new(&io);
        let p = rb.vf_ib_port(bdf("0000:03:00.2")).expect("port");
        assert_eq!(p.dir, port);
        assert_eq!(p.guid, Some(Guid(0x0002_c903_0000_1234)));
        let t = rb.pkey_table(&p).expect("table");
        assert_eq!(
            t,
            vec![
                PKeySlot {
                    index: 1,
                    pkey: PKey(0x8001)
                },
                PKeySlot {
                    index: 10,
                    pkey: PKey(0x8002)
                },
            ]
        );
        let io = RecordingIo::new().file(&format!("{port}/pkeys/3"), "zz\n");
        let e = ReadBack::new(&io).pkey_table(&p).expect_err("bad slot");
        assert!(matches!(e, ReadBackError::NotAPKey { .. }), "{e}");
    }

    #[test]
    fn group_driver_and_pf_guid() {
        let io = RecordingIo::new()
            .link(
                "/sys/bus/pci/devices/0000:03:00.2/iommu_group",
                "../../../kernel/iommu_groups/42",
            )
            .link(
                "/sys/bus/pci/devices/0000:03:00.2/driver",
                "../../../bus/pci/drivers/vfio-pci",
            )
            .link(
                "/sys/bus/pci/devices/0000:03:00.2/physfn",
                "../0000:03:00.0",
            )
            .link(
                "/sys/bus/pci/devices/0000:03:00.0/virtfn0",
                "../0000:03:00.1",
            )
            .link(
                "/sys/bus/pci/devices/0000:03:00.0/virtfn1",
                "../0000:03:00.2",
            )
            .file(
                "/sys/bus/pci/devices/0000:03:00.0/sriov/1/port",
                "00:02:c9:03:00:00:12:34\n",
            )
            .link(
                "/sys/bus/pci/devices/0000:03:00.3/iommu_group",
                "../../nope",
            );
        let rb = ReadBack::new(&io);
        let b = bdf("0000:03:00.2");
        assert_eq!(rb.pci_group(b), Ok(IommuGroupId(42)));
        assert_eq!(rb.driver_of(b).as_deref(), Some("vfio-pci"));
        let (g, port) = rb.vf_guid_at_pf(b).expect("pf");
        assert_eq!(port, "/sys/bus/pci/devices/0000:03:00.0/sriov/1/port");
        assert_eq!(g, Some(Guid(0x0002_c903_0000_1234)));
        assert!(matches!(
            rb.pci_group(bdf("0000:03:00.3")),
            Err(ReadBackError::NotAGroup { .. })
        ));
        assert!(matches!(
            rb.pci_group(bdf("0000:03:00.4")),
            Err(ReadBackError::NoGroup { .. })
        ));
    }
}
