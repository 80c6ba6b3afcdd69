//! The fixture profiles. Each writes its tree through a [`TreeBuilder`] and returns
//! its tenancy. The planted defects are listed in `docs/profiles.md`; keep the two
//! in step.

use devfence_model::{
    ApMask, Apqn, Assignment, Bdf, DeviceId, Guid, MdevUuid, Membership, NonIsolatingParent, PKey,
    Partition, Tenancy, Tenant, TenantId,
};

use super::builder::{
    ApBusSpec, ApMatrixMdevSpec, IbSpec, MdevSpec, MdevTypeSpec, NodeOwner, OfedVf, PciSpec,
    SriovSpec, TreeBuilder, vf_bdf,
};
use super::{Profile, SimError};

/// Largest `--vfs` for `cx6-ib` (VFs per PF).
pub(super) const CX6_MAX_VFS: u32 = 256;
/// `sriov_totalvfs` of an 82576 (igb) port: the largest `--vfs` for `userspace-pf`.
pub(super) const IGB_TOTAL_VFS: u32 = 7;
/// Largest `--vfs` for `scale` (total VFs): 64 PFs of 256.
pub(super) const SCALE_MAX_VFS: u32 = 64 * SCALE_VFS_PER_PF;
const SCALE_VFS_PER_PF: u32 = 256;

const MLX: u16 = 0x15b3;
const CX6_PF: u16 = 0x101b;
const CX6_VF: u16 = 0x101c;
const CLASS_IB: u32 = 0x02_07_00;
const CLASS_ETH: u32 = 0x02_00_00;
const CLASS_BRIDGE: u32 = 0x06_04_00;
const CLASS_3D: u32 = 0x03_02_00;
const NVIDIA: u16 = 0x10de;
const T4: u16 = 0x1eb8;
const INTEL: u16 = 0x8086;
const FLR: &[&str] = &["flr"];
const KERNEL_DEBIAN: &str = "6.1.0-26-amd64";
const PKEY_TABLE: u32 = 128;

/// Builds `profile` with `vfs` (already checked) and returns its tenancy.
pub(super) fn build(
    profile: Profile,
    b: &mut TreeBuilder,
    vfs: u32,
    host_id: u8,
) -> Result<Tenancy, SimError> {
    let mut p = Ctx {
        profile,
        host_id,
        b,
        tenancy: Tenancy::default(),
    };
    match profile {
        Profile::Cx6Ib => cx6_ib(&mut p, vfs)?,
        Profile::NoAcs => no_acs(&mut p)?,
        Profile::UserspacePf => userspace_pf(&mut p, vfs)?,
        Profile::GpuMdev => gpu_mdev(&mut p)?,
        Profile::S390Ap => s390_ap(&mut p)?,
        Profile::Scale => scale(&mut p, vfs)?,
        Profile::Testbed => testbed(&mut p)?,
        Profile::Lab => lab(&mut p)?,
    }
    Ok(p.tenancy)
}

struct Ctx<'b> {
    profile: Profile,
    /// `--host-id`: varies byte 4 of every InfiniBand GUID (see [`Ctx::mlx_guid`]).
    host_id: u8,
    b: &'b mut TreeBuilder,
    tenancy: Tenancy,
}

impl Ctx<'_> {
    /// A Mellanox-OUI GUID, unique per (kind, PF, index): kind 1 PF node, 2 PF
    /// port, 3 VF node, 4 VF port. Byte 4 is `0x03 ^ host_id`, so hosts generated
    /// with different `--host-id`s can be nodes of one fabric (host 0 keeps the
    /// GUIDs every fixture and test names).
    fn mlx_guid(&self, kind: u64, pf: u32, index: u32) -> Guid {
        let byte = u64::from(0x03 ^ self.host_id);
        Guid(
            0x0c42_a100_0000_0000
                | (byte << 32)
                | (kind << 28)
                | (u64::from(pf) << 16)
                | u64::from(index),
        )
    }

    fn internal(&self, what: impl Into<String>) -> SimError {
        SimError::Internal {
            profile: self.profile,
            what: what.into(),
        }
    }

    fn bdf(&self, bus: u8, dev: u8, func: u8) -> Result<Bdf, SimError> {
        Bdf::new(0, bus, dev, func)
            .ok_or_else(|| self.internal(format!("BDF {bus:02x}:{dev:02x}.{func}")))
    }

    fn vf(&self, pf: Bdf, offset: u16, stride: u16, i: u32) -> Result<Bdf, SimError> {
        vf_bdf(pf, offset, stride, i).ok_or_else(|| self.internal(format!("VF {i} of {pf}")))
    }

    fn tenant_id(&self, id: &str) -> Result<TenantId, SimError> {
        id.parse()
            .map_err(|_| self.internal(format!("tenant id {id:?}")))
    }

    /// Adds a tenant whose launcher is `uid:uid`, full member of `pkeys`.
    fn tenant(&mut self, id: &str, uid: u32, pkeys: &[u16]) -> Result<(), SimError> {
        let id = self.tenant_id(id)?;
        self.tenancy.tenants.push(Tenant {
            id,
            launcher_uid: Some(uid),
            launcher_gid: Some(uid),
            security_label: None,
            partitions: pkeys
                .iter()
                .map(|&k| Partition {
                    pkey: PKey(k),
                    membership: Membership::Full,
                })
                .collect(),
        });
        Ok(())
    }

    /// The launcher owner of tenant `id` with mode `0600`.
    fn owner(&self, id: &str) -> Result<NodeOwner, SimError> {
        self.tenancy
            .tenants
            .iter()
            .find(|t| t.id.as_str() == id)
            .and_then(|t| Some(NodeOwner::private(t.launcher_uid?, t.launcher_gid?)))
            .ok_or_else(|| self.internal(format!("tenant {id:?}")))
    }

    fn assign(&mut self, device: DeviceId, tenant: &str) -> Result<(), SimError> {
        let tenant = self.tenant_id(tenant)?;
        self.tenancy.assignments.push(Assignment { device, tenant });
        Ok(())
    }

    fn userspace_pf(&mut self, pf: Bdf, tenant: &str) -> Result<(), SimError> {
        let tenant = self.tenant_id(tenant)?;
        self.tenancy.userspace_pfs.push(Assignment {
            device: DeviceId::Pci(pf),
            tenant,
        });
        Ok(())
    }

    /// A root port `0000:<bus>:<dev>.0` under host bridge `pci0000:<bus>` (pcieport,
    /// own group) for buses `secondary..=subordinate`. Returns its path.
    fn root_port(
        &mut self,
        bus: u8,
        dev: u8,
        device_id: u16,
        secondary: u8,
        subordinate: u8,
        group: u32,
    ) -> Result<String, SimError> {
        let host = format!("/sys/devices/pci0000:{bus:02x}");
        let bdf = self.bdf(bus, dev, 0)?;
        let mut s = PciSpec::new(bdf, &host, INTEL, device_id, CLASS_BRIDGE);
        s.driver = Some("pcieport");
        s.iommu_group = Some(group);
        s.bridge_buses = Some((secondary, subordinate));
        s.numa_node = i32::from(bus >= 0x80);
        self.b.pci_function(&s)
    }

    /// A function bound to vfio-pci through `driver_override`, with its group node
    /// (6.1 layout: `vfio-dev/vfio<X>` without a cdev unless `cdev`).
    fn vfio_function(
        &mut self,
        spec: &PciSpec<'_>,
        node: NodeOwner,
        cdev: bool,
    ) -> Result<String, SimError> {
        let mut s = spec.clone();
        s.driver = Some("vfio-pci");
        s.driver_override = Some("vfio-pci");
        let path = self.b.pci_function(&s)?;
        self.b.vfio_dev(&path, cdev.then_some(node))?;
        if let Some(g) = s.iommu_group {
            self.b.vfio_group_node(g, node)?;
        }
        Ok(path)
    }
}

fn uuid(v: u128) -> MdevUuid {
    MdevUuid(v.to_be_bytes())
}

const ACME: (&str, u32, &[u16]) = ("acme", 107, &[0x8001]);
const GLOBEX: (&str, u32, &[u16]) = ("globex", 108, &[0x8002]);
const INITECH: (&str, u32, &[u16]) = ("initech", 109, &[0xffff]);

fn tenants(p: &mut Ctx<'_>, list: &[(&str, u32, &[u16])]) -> Result<(), SimError> {
    for (id, uid, pkeys) in list {
        p.tenant(id, *uid, pkeys)?;
    }
    Ok(())
}

/// One mlx5 IB PF with `vfs` VFs (offset 1, stride 1) under a fresh root port.
struct Mlx5Pf {
    /// Index of the PF in the profile (for GUIDs and IB device names).
    index: u32,
    /// Bus of the root port; the PF is `<bus+1>:00.0`.
    rp_bus: u8,
    vfs: u32,
    total_vfs: u32,
    /// VFs (by index) bound to mlx5_core on the host instead of vfio-pci.
    host_vfs: Vec<u32>,
    /// The tenant of each VF index (`None`: unassigned).
    tenant_of: Vec<Option<String>>,
    /// VF index → port GUID override (planted defects).
    port_guid_override: Vec<(u32, Guid)>,
}

/// Writes an [`Mlx5Pf`] starting at IOMMU group `group`; returns the next free
/// group and the VF BDFs.
fn mlx5_pf(p: &mut Ctx<'_>, pf: &Mlx5Pf, mut group: u32) -> Result<(u32, Vec<Bdf>), SimError> {
    let bus = pf.rp_bus.wrapping_add(1);
    let pf_bdf = p.bdf(bus, 0, 0)?;
    let vf_bdfs: Vec<Bdf> = (0..pf.vfs)
        .map(|i| p.vf(pf_bdf, 1, 1, i))
        .collect::<Result<_, _>>()?;
    let subordinate = vf_bdfs.iter().map(|v| v.bus()).max().unwrap_or(bus);
    let numa = i32::from(pf.rp_bus >= 0x80);
    let rp = p.root_port(pf.rp_bus, 0, 0x347a, bus, subordinate, group)?;
    group += 1;

    let mut s = PciSpec::new(pf_bdf, &rp, MLX, CX6_PF, CLASS_IB);
    s.subsystem_device = 0x0007;
    s.driver = Some("mlx5_core");
    s.iommu_group = Some(group);
    s.reset_methods = Some(FLR);
    s.numa_node = numa;
    p.b.pci_function(&s)?;
    group += 1;

    for (i, &vf) in vf_bdfs.iter().enumerate() {
        let i = i as u32;
        let mut s = PciSpec::new(vf, &rp, MLX, CX6_VF, CLASS_IB);
        s.subsystem_device = 0x0061;
        s.iommu_group = Some(group);
        s.reset_methods = Some(FLR);
        s.numa_node = numa;
        if pf.host_vfs.contains(&i) {
            s.driver = Some("mlx5_core");
            p.b.pci_function(&s)?;
        } else {
            let owner = match pf.tenant_of.get(i as usize).and_then(Option::as_deref) {
                Some(t) => p.owner(t)?,
                None => NodeOwner::ROOT,
            };
            p.vfio_function(&s, owner, false)?;
        }
        group += 1;
    }
    p.b.sriov(&SriovSpec {
        pf: pf_bdf,
        total_vfs: pf.total_vfs,
        offset: 1,
        stride: 1,
        vf_device: CX6_VF,
        drivers_autoprobe: false,
        vfs: &vf_bdfs,
    })?;
    for i in 0..pf.vfs {
        let port = pf
            .port_guid_override
            .iter()
            .find(|(j, _)| *j == i)
            .map_or_else(|| p.mlx_guid(4, pf.index, i), |(_, g)| *g);
        p.b.ofed_vf_guids(
            pf_bdf,
            &OfedVf {
                index: i,
                node_guid: p.mlx_guid(3, pf.index, i),
                port_guid: port,
                policy: "Follow",
            },
        )?;
    }
    p.b.ib_device(&IbSpec {
        name: &format!("mlx5_{}", pf.index),
        pci: pf_bdf,
        node_guid: p.mlx_guid(1, pf.index, 0),
        port_guid: p.mlx_guid(2, pf.index, 0),
        lid: 0x1a + pf.index as u16,
        sm_lid: 1,
        pkeys: &[0xffff],
        pkey_table_len: PKEY_TABLE,
    })?;
    // The PF's IPoIB interface, which `ip link set ibN vf …` addresses.
    p.b.netdev(pf_bdf, &format!("ib{}", pf.index), 4 + pf.index, 32)?;
    for (i, t) in pf.tenant_of.iter().enumerate() {
        if let Some(t) = t {
            p.assign(DeviceId::Pci(vf_bdfs[i]), t)?;
        }
    }
    Ok((group, vf_bdfs))
}

/// `cx6-ib`: see `docs/profiles.md`.
fn cx6_ib(p: &mut Ctx<'_>, vfs: u32) -> Result<(), SimError> {
    p.b.kernel_release(KERNEL_DEBIAN)?;
    p.b.vfio_pci_module(false, false)?;
    tenants(p, &[ACME, GLOBEX, INITECH])?;
    let alternate = |i: u32| {
        Some(
            if i.is_multiple_of(2) {
                "acme"
            } else {
                "globex"
            }
            .to_string(),
        )
    };

    // PF 0000:3b:00.0; VF 2's port GUID is zero (IB-GUID-INVALID).
    let first = Mlx5Pf {
        index: 0,
        rp_bus: 0x3a,
        vfs,
        total_vfs: vfs.max(16),
        host_vfs: vec![],
        tenant_of: (0..vfs).map(alternate).collect(),
        port_guid_override: vec![(2, Guid(0))],
    };
    let (group, _) = mlx5_pf(p, &first, 30)?;

    // PF 0000:86:00.0; VF 1 reuses VF 1 of 3b's port GUID (IB-GUID-DUPLICATE), VF 3
    // (0000:86:00.4) is initech's, default partition full (IB-DEFAULT-PKEY-FULL),
    // the last VF is on mlx5_core on the host.
    let last = vfs - 1;
    let second = Mlx5Pf {
        index: 1,
        rp_bus: 0x85,
        vfs,
        total_vfs: vfs.max(16),
        host_vfs: vec![last],
        tenant_of: (0..vfs)
            .map(|i| match i {
                3 => Some("initech".to_string()),
                i if i == last => None,
                i => alternate(i),
            })
            .collect(),
        port_guid_override: vec![(1, p.mlx_guid(4, 0, 1))],
    };
    let (_, vfs86) = mlx5_pf(p, &second, group)?;

    // The host-bound VF has its own IB device, its table holding the default
    // partition and acme's.
    p.b.ib_device(&IbSpec {
        name: "mlx5_2",
        pci: vfs86[last as usize],
        node_guid: p.mlx_guid(3, 1, last),
        port_guid: p.mlx_guid(4, 1, last),
        lid: 0x1c,
        sm_lid: 1,
        pkeys: &[0xffff, 0x8001],
        pkey_table_len: PKEY_TABLE,
    })
}

/// A port of the PLX switch of `no-acs`, in group 12.
fn switch_port(
    p: &mut Ctx<'_>,
    bdf: Bdf,
    parent: &str,
    secondary: u8,
    subordinate: u8,
) -> Result<String, SimError> {
    let mut s = PciSpec::new(bdf, parent, 0x10b5, 0x8724, CLASS_BRIDGE);
    s.driver = Some("pcieport");
    s.iommu_group = Some(12);
    s.bridge_buses = Some((secondary, subordinate));
    p.b.pci_function(&s)
}

/// An I210 NIC of `no-acs`, in group 12.
fn i210<'a>(bdf: Bdf, parent: &'a str) -> PciSpec<'a> {
    let mut s = PciSpec::new(bdf, parent, INTEL, 0x1533, CLASS_ETH);
    s.subsystem_device = 0x0001;
    s.revision = 0x03;
    s.iommu_group = Some(12);
    s.reset_methods = Some(FLR);
    s
}

/// `no-acs`: see `docs/profiles.md`.
fn no_acs(p: &mut Ctx<'_>) -> Result<(), SimError> {
    p.b.kernel_release(KERNEL_DEBIAN)?;
    p.b.vfio_pci_module(false, false)?;
    tenants(p, &[ACME, GLOBEX])?;
    let acme = p.owner("acme")?;

    // Root port 00:1c.0 (group 11) → switch 01:00.0 → 02:00.0 / 02:01.0 → 03:00.0 /
    // 04:00.0, no ACS below the root port: all one group, 12.
    let rp = p.root_port(0x00, 0x1c, 0xa338, 1, 4, 11)?;
    let up_bdf = p.bdf(0x01, 0, 0)?;
    let up = switch_port(p, up_bdf, &rp, 2, 4)?;
    let down0_bdf = p.bdf(0x02, 0, 0)?;
    let down0 = switch_port(p, down0_bdf, &up, 3, 3)?;
    let down1_bdf = p.bdf(0x02, 1, 0)?;
    let down1 = switch_port(p, down1_bdf, &up, 4, 4)?;
    let nic0 = p.bdf(0x03, 0, 0)?;
    let nic1 = p.bdf(0x04, 0, 0)?;
    // One node for the group: it can only have one owner; acme holds the first NIC.
    p.vfio_function(&i210(nic0, &down0), acme, false)?;
    let mut s = i210(nic1, &down1);
    s.driver = Some("vfio-pci");
    s.driver_override = Some("vfio-pci");
    let path = p.b.pci_function(&s)?;
    p.b.vfio_dev(&path, None)?;
    p.assign(DeviceId::Pci(nic0), "acme")?;
    p.assign(DeviceId::Pci(nic1), "globex")?;

    // Root port 00:01.0 (group 1) → GPU 05:00.0 on vfio-pci and its audio function
    // 05:00.1 on snd_hda_intel, one group (13).
    let rp = p.root_port(0x00, 0x01, 0x1901, 5, 5, 1)?;
    let gpu = p.bdf(0x05, 0, 0)?;
    let mut s = PciSpec::new(gpu, &rp, NVIDIA, T4, CLASS_3D);
    s.subsystem_device = 0x12a2;
    s.revision = 0xa1;
    s.iommu_group = Some(13);
    s.reset_methods = Some(FLR);
    p.vfio_function(&s, acme, false)?;
    let mut s = PciSpec::new(p.bdf(0x05, 0, 1)?, &rp, NVIDIA, 0x10f8, 0x04_03_00);
    s.subsystem_device = 0x12a2;
    s.revision = 0xa1;
    s.driver = Some("snd_hda_intel");
    s.iommu_group = Some(13);
    s.reset_methods = Some(FLR);
    p.b.pci_function(&s)?;
    p.assign(DeviceId::Pci(gpu), "acme")?;

    // Root port 00:1d.0 (group 15) → NVMe 06:00.0 (group 14) with every reset
    // method disabled.
    let rp = p.root_port(0x00, 0x1d, 0xa330, 6, 6, 15)?;
    let nvme = p.bdf(0x06, 0, 0)?;
    let mut s = PciSpec::new(nvme, &rp, 0x1b36, 0x0010, 0x01_08_02);
    s.subsystem_vendor = 0x1af4;
    s.subsystem_device = 0x1100;
    s.revision = 0x02;
    s.iommu_group = Some(14);
    s.reset_methods = Some(&[]);
    p.vfio_function(&s, acme, false)?;
    p.assign(DeviceId::Pci(nvme), "acme")
}

/// `userspace-pf`: see `docs/profiles.md`.
fn userspace_pf(p: &mut Ctx<'_>, vfs: u32) -> Result<(), SimError> {
    p.b.kernel_release("6.8.0-45-generic")?;
    p.b.vfio_pci_module(true, false)?;
    tenants(p, &[ACME, GLOBEX])?;

    // (root port bus, VF count, custody tenant, tenant of each VF)
    let acme_but_1 = (0..vfs)
        .map(|i| Some(if i == 1 { "globex" } else { "acme" }))
        .collect::<Vec<_>>();
    type PfRow<'a> = (u8, u32, Option<&'a str>, Vec<Option<&'a str>>);
    let pfs: [PfRow<'_>; 2] = [
        (0x5d, vfs, Some("acme"), acme_but_1),
        (0xae, 2, None, vec![Some("acme"), None]),
    ];
    let mut group = 40;
    for (rp_bus, n, custody, tenant_of) in pfs {
        let bus = rp_bus + 1;
        let pf = p.bdf(bus, 0, 0)?;
        let vf_bdfs: Vec<Bdf> = (0..n)
            .map(|i| p.vf(pf, 128, 2, i))
            .collect::<Result<_, _>>()?;
        let rp = p.root_port(rp_bus, 0, 0x347a, bus, bus, group)?;
        group += 1;
        let pf_owner = match custody {
            Some(t) => p.owner(t)?,
            None => NodeOwner::ROOT,
        };
        let mut s = PciSpec::new(pf, &rp, INTEL, 0x10c9, CLASS_ETH);
        s.subsystem_device = 0xa03c;
        s.revision = 0x01;
        s.iommu_group = Some(group);
        s.reset_methods = Some(FLR);
        s.numa_node = i32::from(bus >= 0x80);
        p.vfio_function(&s, pf_owner, true)?;
        group += 1;
        for (i, &vf) in vf_bdfs.iter().enumerate() {
            let mut s = PciSpec::new(vf, &rp, INTEL, 0x10ca, CLASS_ETH);
            s.subsystem_device = 0xa03c;
            s.revision = 0x01;
            s.iommu_group = Some(group);
            s.reset_methods = Some(FLR);
            s.numa_node = i32::from(bus >= 0x80);
            let owner = match tenant_of[i] {
                Some(t) => p.owner(t)?,
                None => NodeOwner::ROOT,
            };
            p.vfio_function(&s, owner, true)?;
            group += 1;
        }
        p.b.sriov(&SriovSpec {
            pf,
            total_vfs: IGB_TOTAL_VFS,
            offset: 128,
            stride: 2,
            vf_device: 0x10ca,
            drivers_autoprobe: true,
            vfs: &vf_bdfs,
        })?;
        if let Some(t) = custody {
            p.userspace_pf(pf, t)?;
        }
        for (i, t) in tenant_of.iter().enumerate() {
            if let Some(t) = t {
                p.assign(DeviceId::Pci(vf_bdfs[i]), t)?;
            }
        }
    }
    Ok(())
}

/// The fixed UUID of instance `i` of the vGPU parent on `bus` (`gpu-mdev`).
pub(super) fn gpu_mdev_uuid(bus: u8, i: u32) -> MdevUuid {
    uuid(0xa1b2_c3d4_0000_4000_8000_0000_0000_0000 | (u128::from(bus) << 80) | u128::from(i + 1))
}

const T4_TYPES: [MdevTypeSpec<'static>; 2] = [
    MdevTypeSpec {
        id: "nvidia-63",
        name: "GRID T4-1Q",
        device_api: "vfio-pci",
        available_instances: 12,
    },
    MdevTypeSpec {
        id: "nvidia-64",
        name: "GRID T4-2Q",
        device_api: "vfio-pci",
        available_instances: 6,
    },
];

/// A T4 on `nvidia` under its own root port, as an mdev parent.
fn vgpu_parent(
    p: &mut Ctx<'_>,
    rp_bus: u8,
    rp_dev: u8,
    bus: u8,
    group: u32,
    types: &[MdevTypeSpec<'_>],
) -> Result<String, SimError> {
    let rp = p.root_port(rp_bus, rp_dev, 0x347a, bus, bus, group)?;
    let bdf = p.bdf(bus, 0, 0)?;
    let mut s = PciSpec::new(bdf, &rp, NVIDIA, T4, CLASS_3D);
    s.subsystem_device = 0x12a2;
    s.revision = 0xa1;
    s.driver = Some("nvidia");
    s.iommu_group = Some(group + 1);
    s.reset_methods = Some(FLR);
    s.numa_node = i32::from(bus >= 0x80);
    let path = p.b.pci_function(&s)?;
    p.b.mdev_parent(&path, &bdf.to_string(), types)?;
    Ok(path)
}

/// `gpu-mdev`: see `docs/profiles.md`.
fn gpu_mdev(p: &mut Ctx<'_>) -> Result<(), SimError> {
    p.b.kernel_release(KERNEL_DEBIAN)?;
    tenants(p, &[ACME, GLOBEX])?;
    let gpu65 = vgpu_parent(p, 0x64, 0x00, 0x65, 20, &T4_TYPES)?;
    let gpu66 = vgpu_parent(p, 0x64, 0x02, 0x66, 22, &T4_TYPES)?;
    // (parent path, parent bus, instance, type, tenant, node mode); groups from 24.
    type Row<'a> = (&'a str, u8, u32, &'a str, &'a str, u32);
    let instances: [Row<'_>; 6] = [
        (&gpu65, 0x65, 0, "nvidia-63", "acme", 0o600),
        (&gpu65, 0x65, 1, "nvidia-63", "acme", 0o600),
        (&gpu65, 0x65, 2, "nvidia-63", "globex", 0o600),
        (&gpu65, 0x65, 3, "nvidia-63", "globex", 0o600),
        (&gpu66, 0x66, 0, "nvidia-64", "acme", 0o600),
        (&gpu66, 0x66, 1, "nvidia-64", "globex", 0o666),
    ];
    for (group, (parent, bus, n, type_id, tenant, mode)) in (24..).zip(instances) {
        let id = gpu_mdev_uuid(bus, n);
        p.b.mdev(&MdevSpec {
            parent,
            uuid: id,
            type_id,
            iommu_group: group,
            driver: "vfio_mdev",
        })?;
        let mut owner = p.owner(tenant)?;
        owner.mode = mode;
        p.b.vfio_group_node(group, owner)?;
        p.assign(DeviceId::Mdev(id), tenant)?;
    }
    p.tenancy.non_isolating_parents.push(NonIsolatingParent {
        device: "0000:65:00.0".to_string(),
    });
    Ok(())
}

/// The UUIDs of the `s390-ap` matrix mdevs A and B.
pub(super) const AP_MDEV_A: u128 = 0x0f6c_1a7e_2b1d_4c3a_9a53_6a2f_1c3e_0a01;
/// See [`AP_MDEV_A`].
pub(super) const AP_MDEV_B: u128 = 0x0f6c_1a7e_2b1d_4c3a_9a53_6a2f_1c3e_0b02;

/// `s390-ap`: see `docs/profiles.md`.
fn s390_ap(p: &mut Ctx<'_>) -> Result<(), SimError> {
    p.b.kernel_release("6.1.0-26-s390x")?;
    tenants(p, &[ACME, GLOBEX])?;
    let cards = [0x04u8, 0x05, 0x06, 0x07];
    let domains: Vec<u8> = (0x10..=0x1f).collect();
    let mut apmask = ApMask::NONE;
    apmask.set(0x04, true);
    apmask.set(0x05, true);
    let aqmask = ApMask::ALL;

    // (uuid, adapters, domains, guest adapters, guest domains, control domains, group, tenant)
    type MdevRow<'a> = (
        u128,
        &'a [u8],
        &'a [u8],
        &'a [u8],
        &'a [u8],
        &'a [u8],
        u32,
        &'a str,
    );
    let mdevs: [MdevRow<'_>; 2] = [
        (
            AP_MDEV_A,
            &[0x06],
            &[0x10, 0x11, 0x12, 0x13, 0x20],
            &[0x06],
            &[0x10, 0x11, 0x12, 0x13],
            &[0x10],
            0,
            "acme",
        ),
        (
            AP_MDEV_B,
            &[0x05, 0x06, 0x07],
            &[0x13, 0x14],
            &[0x06, 0x07],
            &[0x13, 0x14],
            &[],
            1,
            "globex",
        ),
    ];
    let in_a_matrix = |q: Apqn| {
        mdevs
            .iter()
            .any(|m| m.1.contains(&q.adapter) && m.2.contains(&q.domain))
    };

    let total = (cards.len() * domains.len()) as u32;
    p.b.ap_bus(&ApBusSpec {
        apmask,
        aqmask,
        max_adapter_id: 255,
        max_domain_id: 255,
        bound_queues: total,
        total_queues: total,
    })?;
    for &card in &cards {
        p.b.ap_card(card, 13, "CEX7C")?;
        for &domain in &domains {
            let q = Apqn {
                adapter: card,
                domain,
            };
            if apmask.contains(card) && aqmask.contains(domain) {
                p.b.ap_queue(q, "cex4queue", None)?;
            } else {
                let status = if in_a_matrix(q) {
                    "assigned"
                } else {
                    "unassigned"
                };
                p.b.ap_queue(q, "vfio_ap", Some(status))?;
            }
        }
    }
    p.b.vfio_ap_matrix(65536 - mdevs.len() as u32)?;
    for (id, adapters, domains, ga, gd, cd, group, tenant) in mdevs {
        p.b.ap_matrix_mdev(&ApMatrixMdevSpec {
            uuid: uuid(id),
            adapters,
            domains,
            guest_adapters: ga,
            guest_domains: gd,
            control_domains: cd,
            iommu_group: group,
        })?;
        let owner = p.owner(tenant)?;
        p.b.vfio_group_node(group, owner)?;
        p.assign(DeviceId::Mdev(uuid(id)), tenant)?;
    }
    Ok(())
}

/// The tenant id `tNN` of round-robin slot `i` of `scale`.
fn scale_tenant(i: u32) -> String {
    format!("t{:02}", i % 64)
}

/// `scale`: see `docs/profiles.md`.
fn scale(p: &mut Ctx<'_>, vfs: u32) -> Result<(), SimError> {
    p.b.kernel_release(KERNEL_DEBIAN)?;
    p.b.vfio_pci_module(false, false)?;
    for i in 0..64u32 {
        let pkey = 0x8001 + i as u16;
        p.tenant(&scale_tenant(i), 2000 + i, &[pkey])?;
    }
    let owners: Vec<NodeOwner> = (0..64)
        .map(|i| NodeOwner::private(2000 + i, 2000 + i))
        .collect();

    // PFs: root port on bus 0x0f + 3k, PF on the next bus, VF 255 spills to the one
    // after (routing ID PF + 256).
    let n_pf = vfs.div_ceil(SCALE_VFS_PER_PF);
    let mut group = 1;
    let mut vf_seq = 0u32;
    for k in 0..n_pf {
        let n = (vfs - k * SCALE_VFS_PER_PF).min(SCALE_VFS_PER_PF);
        let tenant_of = (vf_seq..vf_seq + n)
            .map(|i| Some(scale_tenant(i)))
            .collect();
        vf_seq += n;
        let pf = Mlx5Pf {
            index: k,
            rp_bus: 0x0f + 3 * k as u8,
            vfs: n,
            total_vfs: SCALE_VFS_PER_PF,
            host_vfs: vec![],
            tenant_of,
            port_guid_override: vec![],
        };
        group = mlx5_pf(p, &pf, group)?.0;
    }

    // 4 vGPU parents × 256 instances, each instance its own group.
    let types = [MdevTypeSpec {
        id: "nvidia-63",
        name: "GRID T4-1Q",
        device_api: "vfio-pci",
        available_instances: 0,
    }];
    let mut mdev_seq = 0u32;
    for g in 0..4u8 {
        let bus = 0xe1 + 2 * g;
        let parent = vgpu_parent(p, bus - 1, 0, bus, group, &types)?;
        group += 2;
        for i in 0..256u32 {
            let id = uuid(
                0x5ca1_e000_0000_4000_8000_0000_0000_0000 | (u128::from(bus) << 80) | u128::from(i),
            );
            p.b.mdev(&MdevSpec {
                parent: &parent,
                uuid: id,
                type_id: "nvidia-63",
                iommu_group: group,
                driver: "vfio_mdev",
            })?;
            p.b.vfio_group_node(group, owners[(mdev_seq % 64) as usize])?;
            p.assign(DeviceId::Mdev(id), &scale_tenant(mdev_seq))?;
            group += 1;
            mdev_seq += 1;
        }
    }

    // AP: 256 cards × 256 domains, all on vfio_ap, 16 matrix mdevs of 16 adapters.
    p.b.ap_bus(&ApBusSpec {
        apmask: ApMask::NONE,
        aqmask: ApMask::NONE,
        max_adapter_id: 255,
        max_domain_id: 255,
        bound_queues: 65536,
        total_queues: 65536,
    })?;
    for card in 0..=255u8 {
        p.b.ap_card(card, 13, "CEX7C")?;
        for domain in 0..=255u8 {
            p.b.ap_queue(
                Apqn {
                    adapter: card,
                    domain,
                },
                "vfio_ap",
                Some("assigned"),
            )?;
        }
    }
    p.b.vfio_ap_matrix(65536 - 16)?;
    let all_domains: Vec<u8> = (0..=255).collect();
    for m in 0..16u8 {
        let adapters: Vec<u8> = (0..16).map(|a| 16 * m + a).collect();
        let id = uuid(0x5ca1_eaa0_0000_4000_8000_0000_0000_0000 | u128::from(m));
        p.b.ap_matrix_mdev(&ApMatrixMdevSpec {
            uuid: id,
            adapters: &adapters,
            domains: &all_domains,
            guest_adapters: &adapters,
            guest_domains: &all_domains,
            control_domains: &[],
            iommu_group: group,
        })?;
        p.b.vfio_group_node(group, owners[usize::from(m)])?;
        p.assign(DeviceId::Mdev(id), &scale_tenant(u32::from(m)))?;
        group += 1;
    }
    Ok(())
}

/// A function of the QEMU testbed guest: QEMU's subsystem ids, no NUMA node.
fn qemu(mut s: PciSpec<'_>) -> PciSpec<'_> {
    s.subsystem_vendor = 0x1af4;
    s.subsystem_device = 0x1100;
    s.numa_node = -1;
    s
}

/// `testbed`: see `docs/profiles.md`. Mirrors the guest that `testbed/run.sh`
/// boots (q35, virtual Intel IOMMU) as `docs/testbed.md` records it after
/// `testbed/guest/run-tests.sh` has loaded its drivers: the same functions, ids,
/// drivers and IOMMU groups, no VF enabled, vfio-pci loaded with
/// `enable_sriov=1`, igbvf loaded, mtty as an mdev parent; no tenancy.
fn testbed(p: &mut Ctx<'_>) -> Result<(), SimError> {
    p.b.kernel_release("6.1.0-testbed")?;
    p.b.vfio_pci_module(true, false)?;
    p.b.load_driver("pci", "vfio-pci")?;
    p.b.load_driver("pci", "igbvf")?;
    // vfio's container node exists from the moment the module is loaded.
    p.b.node(
        "/dev/vfio/vfio",
        NodeOwner {
            uid: 0,
            gid: 0,
            mode: 0o666,
        },
    )?;
    let host = "/sys/devices/pci0000:00";

    // Functions on the root bus: (device.function, vendor, device, class, driver,
    // group, reset methods). Root ports 1-5 (5 with secondary bus 5); port 4 has
    // no ACS, so it shares its group with what is behind it.
    type Row<'a> = (
        u8,
        u8,
        u16,
        u16,
        u32,
        Option<&'a str>,
        u32,
        Option<&'a [&'a str]>,
    );
    let root_bus: [Row<'_>; 10] = [
        (0x00, 0, INTEL, 0x29c0, 0x06_00_00, None, 0, None),
        (
            0x01,
            0,
            0x1b36,
            0x000c,
            CLASS_BRIDGE,
            Some("pcieport"),
            1,
            None,
        ),
        (
            0x02,
            0,
            0x1b36,
            0x000c,
            CLASS_BRIDGE,
            Some("pcieport"),
            2,
            None,
        ),
        (
            0x03,
            0,
            0x1b36,
            0x000c,
            CLASS_BRIDGE,
            Some("pcieport"),
            3,
            None,
        ),
        (
            0x04,
            0,
            0x1b36,
            0x000c,
            CLASS_BRIDGE,
            Some("pcieport"),
            4,
            None,
        ),
        (
            0x05,
            0,
            0x1b36,
            0x000c,
            CLASS_BRIDGE,
            Some("pcieport"),
            5,
            None,
        ),
        (
            0x10,
            0,
            0x1af4,
            0x1009,
            0x00_02_00,
            Some("virtio-pci"),
            6,
            None,
        ),
        (0x1f, 0, INTEL, 0x2918, 0x06_01_00, None, 7, None),
        (0x1f, 2, INTEL, 0x2922, 0x01_06_01, None, 7, None),
        (0x1f, 3, INTEL, 0x2930, 0x0c_05_00, None, 7, None),
    ];
    let mut ports = Vec::new();
    for (dev, func, vendor, device, class, driver, group, reset) in root_bus {
        let bdf = p.bdf(0, dev, func)?;
        let mut s = qemu(PciSpec::new(bdf, host, vendor, device, class));
        if vendor == 0x1b36 {
            s.subsystem_vendor = 0x1b36;
            s.subsystem_device = 0;
            s.bridge_buses = Some((dev, dev));
        }
        s.driver = driver;
        s.iommu_group = Some(group);
        s.reset_methods = reset;
        let path = p.b.pci_function(&s)?;
        if class == CLASS_BRIDGE {
            ports.push(path);
        }
    }
    // Behind the ports: (port index, function, vendor, device, class, driver, group).
    type Ep<'a> = (usize, u8, u16, u16, u32, &'a str, u32);
    let endpoints: [Ep<'_>; 6] = [
        (0, 0, INTEL, 0x10c9, CLASS_ETH, "igb", 8),
        (1, 0, INTEL, 0x10c9, CLASS_ETH, "igb", 9),
        (2, 0, 0x1b36, 0x0010, 0x01_08_02, "nvme", 10),
        (3, 0, INTEL, 0x10c9, CLASS_ETH, "igb", 4),
        (4, 0, INTEL, 0x10d3, CLASS_ETH, "e1000e", 11),
        (4, 1, INTEL, 0x10d3, CLASS_ETH, "e1000e", 11),
    ];
    for (port, func, vendor, device, class, driver, group) in endpoints {
        let bus = port as u8 + 1;
        let bdf = p.bdf(bus, 0, func)?;
        let mut s = qemu(PciSpec::new(bdf, &ports[port], vendor, device, class));
        s.driver = Some(driver);
        s.iommu_group = Some(group);
        // The real kernel (6.1 and 6.12, seen by the testbed's differential
        // test): function 0 of the e1000e pair also has a bus reset (it is the
        // function a secondary bus reset is offered on), function 1 only pm.
        s.reset_methods = Some(match (driver, func) {
            ("igb", _) => &["flr", "pm", "bus"],
            ("nvme", _) => &["flr", "bus"],
            (_, 0) => &["pm", "bus"],
            _ => &["pm"],
        });
        if vendor == INTEL {
            s.subsystem_vendor = INTEL;
            s.subsystem_device = 0;
        }
        p.b.pci_function(&s)?;
        let (total, offset, stride, vf_device) = match driver {
            "igb" => (IGB_TOTAL_VFS, 0x80, 2, 0x10ca),
            "nvme" => (2, 1, 1, 0x0010),
            _ => continue,
        };
        p.b.sriov(&SriovSpec {
            pf: bdf,
            total_vfs: total,
            offset,
            stride,
            vf_device,
            drivers_autoprobe: true,
            vfs: &[],
        })?;
    }
    // The mtty sample driver's mdev parent.
    p.b.load_driver("mdev", "mtty")?;
    p.b.mdev_parent(
        "/sys/devices/virtual/mtty/mtty",
        "mtty",
        &[
            MdevTypeSpec {
                id: "mtty-1",
                name: "Single port serial",
                device_api: "vfio-pci",
                available_instances: 24,
            },
            MdevTypeSpec {
                id: "mtty-2",
                name: "Dual port serial",
                device_api: "vfio-pci",
                available_instances: 12,
            },
        ],
    )
}

/// An 82576 (igb) PF `0000:<rp_bus+1>:00.0` below its own root port
/// `0000:<rp_bus>:00.0`, each in its own group, on igb — or, `on_vfio`, on vfio-pci
/// through `driver_override` (no custody: a `root:root 0600` node) — with `vfs`
/// VFs (offset 128, stride 2) on vfio-pci, each in its own group with a
/// `root:root 0600` node. Starts at group `group`; returns the next free group.
fn igb_pf(
    p: &mut Ctx<'_>,
    rp_bus: u8,
    on_vfio: bool,
    vfs: u32,
    mut group: u32,
) -> Result<u32, SimError> {
    let bus = rp_bus + 1;
    let pf = p.bdf(bus, 0, 0)?;
    let vf_bdfs: Vec<Bdf> = (0..vfs)
        .map(|i| p.vf(pf, 128, 2, i))
        .collect::<Result<_, _>>()?;
    let rp = p.root_port(rp_bus, 0, 0x347a, bus, bus, group)?;
    group += 1;
    let numa = i32::from(bus >= 0x80);
    let mut s = PciSpec::new(pf, &rp, INTEL, 0x10c9, CLASS_ETH);
    s.subsystem_device = 0xa03c;
    s.revision = 0x01;
    s.iommu_group = Some(group);
    s.reset_methods = Some(FLR);
    s.numa_node = numa;
    if on_vfio {
        p.vfio_function(&s, NodeOwner::ROOT, false)?;
    } else {
        s.driver = Some("igb");
        p.b.pci_function(&s)?;
    }
    group += 1;
    for &vf in &vf_bdfs {
        let mut s = PciSpec::new(vf, &rp, INTEL, 0x10ca, CLASS_ETH);
        s.subsystem_device = 0xa03c;
        s.revision = 0x01;
        s.iommu_group = Some(group);
        s.reset_methods = Some(FLR);
        s.numa_node = numa;
        p.vfio_function(&s, NodeOwner::ROOT, false)?;
        group += 1;
    }
    p.b.sriov(&SriovSpec {
        pf,
        total_vfs: IGB_TOTAL_VFS,
        offset: 128,
        stride: 2,
        vf_device: 0x10ca,
        drivers_autoprobe: true,
        vfs: &vf_bdfs,
    })?;
    Ok(group)
}

/// `lab`: see `docs/profiles.md`. The host an operator has before devfence hands
/// anything out: every VF on vfio-pci with a root-owned node, the tenants
/// declared, nothing assigned (the handover engine's ledger holds that), so
/// `check` finds nothing.
fn lab(p: &mut Ctx<'_>) -> Result<(), SimError> {
    p.b.kernel_release(KERNEL_DEBIAN)?;
    // enable_sriov=Y: the user-space PF below has VFs.
    p.b.vfio_pci_module(true, false)?;
    tenants(p, &[ACME, GLOBEX])?;

    // A vGPU parent 0000:65:00.0 (root port 20, GPU 21) with one type, no instance.
    vgpu_parent(p, 0x64, 0x00, 0x65, 20, &T4_TYPES[..1])?;

    // ConnectX-6 PF 0000:3b:00.0 (mlx5_0, ib0) below root port 0000:3a:00.0 (30),
    // PF 31, VFs 0000:3b:00.1–.4 32–35 on vfio-pci.
    let cx6 = Mlx5Pf {
        index: 0,
        rp_bus: 0x3a,
        vfs: 4,
        total_vfs: 16,
        host_vfs: vec![],
        tenant_of: vec![None; 4],
        port_guid_override: vec![],
    };
    mlx5_pf(p, &cx6, 30)?;

    // igb PF 0000:5e:00.0 on igb (root port 40, PF 41), VFs 0000:5e:10.0 and
    // 0000:5e:10.2 (42, 43) on vfio-pci.
    let group = igb_pf(p, 0x5d, false, 2, 40)?;
    // The user-space PF 0000:af:00.0 on vfio-pci (root port 44, PF 45), VFs
    // 0000:af:10.0 and 0000:af:10.2 (46, 47) on vfio-pci; no custody declared.
    igb_pf(p, 0xae, true, 2, group)?;
    Ok(())
}
