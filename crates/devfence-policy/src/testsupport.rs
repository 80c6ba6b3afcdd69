//! Builders that keep the rule tests short: a host ([`Host`]) and a tenancy
//! ([`Ten`]) built in a few chained calls.

use devfence_model::{
    ApBus, ApMatrix, ApMatrixMdev, ApQueue, Apqn, Assignment, Bdf, DeviceId, Finding, Guid,
    IbDevice, IbPort, Inventory, IommuGroup, IommuGroupId, Mdev, MdevUuid, Membership,
    NonIsolatingParent, PKey, PKeySlot, Partition, PciFunction, ReadProblem, SriovPf, Tenancy,
    Tenant, VfGuids, VfioDevRef, VfioNode, VfioNodeKind, VfioPciParams, VirtFn,
};

pub(crate) fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// `00000000-0000-0000-0000-0000000000NN`.
pub(crate) fn uuid(n: u8) -> MdevUuid {
    format!("00000000-0000-0000-0000-0000000000{n:02x}")
        .parse()
        .unwrap()
}

pub(crate) fn apqn(s: &str) -> Apqn {
    s.parse().unwrap()
}

/// A network function with FLR, no driver, no group.
pub(crate) fn func(s: &str) -> PciFunction {
    let b = bdf(s);
    PciFunction {
        bdf: b,
        sysfs_path: format!("/sys/devices/pci0000:00/0000:00:01.0/{b}"),
        vendor: Some(0x15b3),
        device: Some(0x101e),
        subsystem_vendor: Some(0x15b3),
        subsystem_device: Some(0x0001),
        class: Some(0x020700),
        driver: None,
        driver_override: None,
        iommu_group: None,
        reset_methods: vec!["flr".into()],
        has_reset: true,
        numa_node: Some(0),
        sriov: None,
        physfn: None,
        vfio_dev: Vec::new(),
    }
}

/// Chained setters for a [`PciFunction`].
pub(crate) trait FnExt: Sized {
    fn driver(self, d: &str) -> Self;
    fn group(self, g: u32) -> Self;
    fn class(self, c: u32) -> Self;
    fn vf_of(self, pf: &str) -> Self;
    fn no_reset(self) -> Self;
    fn vfio_dev(self, name: &str) -> Self;
    /// Makes it an SR-IOV PF with OFED `sriov/<N>/port` GUIDs.
    fn vf_guids(self, guids: &[(u32, Option<u64>)]) -> Self;
}

impl FnExt for PciFunction {
    fn driver(mut self, d: &str) -> Self {
        self.driver = Some(d.into());
        self
    }
    fn group(mut self, g: u32) -> Self {
        self.iommu_group = Some(IommuGroupId(g));
        self
    }
    fn class(mut self, c: u32) -> Self {
        self.class = Some(c);
        self
    }
    fn vf_of(mut self, pf: &str) -> Self {
        self.physfn = Some(bdf(pf));
        self
    }
    fn no_reset(mut self) -> Self {
        self.has_reset = false;
        self.reset_methods.clear();
        self
    }
    fn vfio_dev(mut self, name: &str) -> Self {
        self.vfio_dev.push(VfioDevRef {
            name: name.into(),
            dev: Some("511:0".into()),
        });
        self
    }
    fn vf_guids(mut self, guids: &[(u32, Option<u64>)]) -> Self {
        let sriov = self.sriov.get_or_insert_with(empty_sriov);
        sriov.vf_guids = guids
            .iter()
            .map(|&(index, g)| VfGuids {
                index,
                node_guid: g.map(Guid),
                port_guid: g.map(Guid),
                policy: Some("Follow".into()),
            })
            .collect();
        self
    }
}

fn empty_sriov() -> SriovPf {
    SriovPf {
        total_vfs: Some(16),
        num_vfs: Some(0),
        vfs: Vec::new(),
        vf_guids: Vec::new(),
    }
}

/// A matrix mdev whose guest gets everything assigned.
pub(crate) fn matrix(u: u8, adapters: &[u8], domains: &[u8]) -> ApMatrixMdev {
    let m = ApMatrix {
        adapters: adapters.to_vec(),
        domains: domains.to_vec(),
    };
    ApMatrixMdev {
        uuid: uuid(u),
        matrix: Some(m.clone()),
        guest_matrix: Some(m),
        control_domains: Vec::new(),
    }
}

/// An inventory under construction.
pub(crate) struct Host {
    inv: Inventory,
    extra_members: Vec<(u32, String)>,
}

impl Host {
    /// A host running `kernel` (`None`: release unknown).
    pub(crate) fn new(kernel: Option<&str>) -> Self {
        Host {
            inv: Inventory {
                schema: devfence_model::INVENTORY_SCHEMA,
                kernel_release: kernel.map(String::from),
                ..Inventory::default()
            },
            extra_members: Vec::new(),
        }
    }
    /// A Debian 6.1 host.
    pub(crate) fn deb12() -> Self {
        Self::new(Some("6.1.0-26-amd64"))
    }
    pub(crate) fn pci(mut self, f: PciFunction) -> Self {
        self.inv.pci.push(f);
        self
    }
    /// A group member that is not a PCI function in the inventory.
    pub(crate) fn member(mut self, group: u32, name: &str) -> Self {
        self.extra_members.push((group, name.into()));
        self
    }
    pub(crate) fn enable_sriov(mut self, on: Option<bool>) -> Self {
        self.inv.vfio_pci = Some(VfioPciParams {
            enable_sriov: on,
            disable_idle_d3: Some(false),
        });
        self
    }
    pub(crate) fn node(mut self, kind: VfioNodeKind, uid: u32, mode: u32) -> Self {
        let path = match &kind {
            VfioNodeKind::Container => "/dev/vfio/vfio".to_string(),
            VfioNodeKind::Group(g) => format!("/dev/vfio/{g}"),
            VfioNodeKind::NoIommuGroup(g) => format!("/dev/vfio/noiommu-{g}"),
            VfioNodeKind::Device(n) => format!("/dev/vfio/devices/{n}"),
        };
        self.inv.vfio_nodes.push(VfioNode {
            path,
            kind,
            uid,
            gid: uid,
            mode,
            selinux_label: None,
        });
        self
    }
    pub(crate) fn group_node(self, g: u32, uid: u32, mode: u32) -> Self {
        self.node(VfioNodeKind::Group(IommuGroupId(g)), uid, mode)
    }
    pub(crate) fn dev_node(self, name: &str, uid: u32, mode: u32) -> Self {
        self.node(VfioNodeKind::Device(name.into()), uid, mode)
    }
    /// Labels the last node added.
    pub(crate) fn label(mut self, label: &str) -> Self {
        if let Some(n) = self.inv.vfio_nodes.last_mut() {
            n.selinux_label = Some(label.into());
        }
        self
    }
    pub(crate) fn mdev(mut self, u: u8, parent: &str, group: u32) -> Self {
        let uuid = uuid(u);
        self.inv.mdevs.push(Mdev {
            uuid,
            parent: parent.into(),
            sysfs_path: format!("/sys/devices/pci0000:00/{parent}/{uuid}"),
            type_id: Some("nvidia-63".into()),
            iommu_group: Some(IommuGroupId(group)),
            driver: Some("nvidia-vgpu-vfio".into()),
        });
        self
    }
    /// An IB device on `pci` with one InfiniBand port.
    pub(crate) fn ib(mut self, name: &str, pci: &str, guid: Option<u64>, pkeys: &[u16]) -> Self {
        self.inv.ib.push(IbDevice {
            name: name.into(),
            node_guid: guid.map(Guid),
            node_type: Some("1: CA".into()),
            pci: Some(bdf(pci)),
            ports: vec![IbPort {
                port: 1,
                state: Some("4: ACTIVE".into()),
                lid: Some(0x1a),
                sm_lid: Some(1),
                link_layer: Some("InfiniBand".into()),
                port_guid: guid.map(Guid),
                pkeys: pkeys
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| PKeySlot {
                        index: i as u32,
                        pkey: PKey(p),
                    })
                    .collect(),
            }],
        });
        self
    }
    /// The AP bus: masks as id lists (`None`: unreadable), queues as
    /// `(apqn, driver)`.
    pub(crate) fn ap(
        mut self,
        apmask: Option<&[u8]>,
        aqmask: Option<&[u8]>,
        queues: &[(&str, &str)],
        mdevs: Vec<ApMatrixMdev>,
    ) -> Self {
        let mask = |ids: &[u8]| {
            let mut m = devfence_model::ApMask::NONE;
            for &i in ids {
                m.set(i, true);
            }
            m
        };
        self.inv.ap = Some(ApBus {
            apmask: apmask.map(mask),
            aqmask: aqmask.map(mask),
            cards: Vec::new(),
            queues: queues
                .iter()
                .map(|(q, d)| ApQueue {
                    apqn: apqn(q),
                    driver: Some((*d).into()),
                })
                .collect(),
            matrix_mdevs: mdevs,
        });
        self
    }
    pub(crate) fn problem(mut self, subject: Option<&str>, path: &str) -> Self {
        self.inv.problems.push(ReadProblem {
            subject: subject.map(String::from),
            path: path.into(),
            value: Some("garbage".into()),
            error: "invalid digit found in string".into(),
        });
        self
    }
    /// Sorts, derives groups from the functions and mdevs, and links VFs to
    /// their PFs (`virtfn<N>` in BDF order).
    pub(crate) fn build(mut self) -> Inventory {
        let inv = &mut self.inv;
        inv.pci.sort_by_key(|f| f.bdf);
        let vfs: Vec<(Bdf, Bdf)> = inv
            .pci
            .iter()
            .filter_map(|f| f.physfn.map(|pf| (pf, f.bdf)))
            .collect();
        for (pf, vf) in vfs {
            if let Some(p) = inv.pci.iter_mut().find(|f| f.bdf == pf) {
                let s = p.sriov.get_or_insert_with(empty_sriov);
                let index = s.vfs.len() as u32;
                s.vfs.push(VirtFn { index, bdf: vf });
                s.num_vfs = Some(s.vfs.len() as u32);
            }
        }
        let mut members: Vec<(u32, String)> = inv
            .pci
            .iter()
            .filter_map(|f| f.iommu_group.map(|g| (g.0, f.bdf.to_string())))
            .chain(
                inv.mdevs
                    .iter()
                    .filter_map(|m| m.iommu_group.map(|g| (g.0, m.uuid.to_string()))),
            )
            .chain(self.extra_members.drain(..))
            .collect();
        members.sort();
        for (g, name) in members {
            let id = IommuGroupId(g);
            match inv.iommu_groups.iter_mut().find(|x| x.id == id) {
                Some(x) => x.members.push(name.into()),
                None => inv.iommu_groups.push(IommuGroup {
                    id,
                    members: vec![name.into()],
                    group_type: Some("DMA".into()),
                    name: None,
                }),
            }
        }
        inv.iommu_groups.sort_by_key(|g| g.id);
        self.inv
    }
}

/// A tenancy under construction.
#[derive(Default)]
pub(crate) struct Ten(pub(crate) Tenancy);

impl Ten {
    pub(crate) fn new() -> Self {
        Self::default()
    }
    /// A tenant with a launcher uid.
    pub(crate) fn tenant(mut self, id: &str, uid: Option<u32>) -> Self {
        self.0.tenants.push(Tenant {
            id: id.parse().unwrap(),
            launcher_uid: uid,
            launcher_gid: uid,
            security_label: None,
            partitions: Vec::new(),
        });
        self
    }
    /// Sets the security label of the last tenant.
    pub(crate) fn label(mut self, label: &str) -> Self {
        if let Some(t) = self.0.tenants.last_mut() {
            t.security_label = Some(label.into());
        }
        self
    }
    /// Adds a partition to the last tenant.
    pub(crate) fn partition(mut self, pkey: u16, m: Membership) -> Self {
        if let Some(t) = self.0.tenants.last_mut() {
            t.partitions.push(Partition {
                pkey: PKey(pkey),
                membership: m,
            });
        }
        self
    }
    fn entry(device: &str, tenant: &str) -> Assignment {
        Assignment {
            device: device.parse::<DeviceId>().unwrap(),
            tenant: tenant.parse().unwrap(),
        }
    }
    pub(crate) fn assign(mut self, device: &str, tenant: &str) -> Self {
        self.0.assignments.push(Self::entry(device, tenant));
        self
    }
    pub(crate) fn upf(mut self, device: &str, tenant: &str) -> Self {
        self.0.userspace_pfs.push(Self::entry(device, tenant));
        self
    }
    pub(crate) fn parent(mut self, name: &str) -> Self {
        self.0.non_isolating_parents.push(NonIsolatingParent {
            device: name.into(),
        });
        self
    }
    pub(crate) fn build(self) -> Tenancy {
        self.0
    }
}

/// The findings of one rule.
pub(crate) fn of<'f>(findings: &'f [Finding], rule: &str) -> Vec<&'f Finding> {
    findings.iter().filter(|f| f.rule == rule).collect()
}

/// Whether a finding has evidence `path` = `value`.
pub(crate) fn has_ev(f: &Finding, path: &str, value: &str) -> bool {
    f.evidence
        .iter()
        .any(|e| e.path == path && e.value == value)
}
