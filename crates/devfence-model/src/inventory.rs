//! The inventory: what the kernel has, as read from one host root.
//!
//! This is the stable JSON schema of `devfence inventory --json` (schema version
//! [`INVENTORY_SCHEMA`]; see `docs/inventory-schema.md`). Paths are absolute as the
//! kernel names them (`/sys/...`, `/dev/...`), independent of the root they were read
//! under. A value that could not be read or parsed is `null` here and the reason is
//! in [`Inventory::problems`], so one bad attribute never hides the rest.

use crate::ids::{ApMask, Apqn, Bdf, Guid, IommuGroupId, MdevUuid, PKey};

/// The version of the inventory JSON schema. Bumped on any incompatible change.
pub const INVENTORY_SCHEMA: u32 = 1;

/// Everything devfence knows about a host's passthrough devices.
#[derive(
    Clone, Debug, Default, PartialEq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Inventory {
    /// [`INVENTORY_SCHEMA`].
    pub schema: u32,
    /// Kernel release from `/proc/sys/kernel/osrelease`, e.g. `6.1.0-26-amd64`.
    pub kernel_release: Option<String>,
    /// vfio-pci module parameters, if the module is loaded.
    pub vfio_pci: Option<VfioPciParams>,
    /// Every PCI function, sorted by BDF.
    pub pci: Vec<PciFunction>,
    /// Every IOMMU group, sorted by id.
    pub iommu_groups: Vec<IommuGroup>,
    /// VFIO device nodes under `/dev/vfio`.
    pub vfio_nodes: Vec<VfioNode>,
    /// mdev parents (`/sys/class/mdev_bus/*`) and their types.
    pub mdev_parents: Vec<MdevParent>,
    /// mdev instances (`/sys/bus/mdev/devices/*`).
    pub mdevs: Vec<Mdev>,
    /// The s390 AP bus, if present.
    pub ap: Option<ApBus>,
    /// InfiniBand devices (`/sys/class/infiniband/*`).
    pub ib: Vec<IbDevice>,
    /// Everything that could not be read or parsed.
    pub problems: Vec<ReadProblem>,
    /// Per VFIO device, its migration capability as the kernel answered when
    /// asked (`devfence inventory --probe-migration`); empty, and absent from
    /// the JSON, when not probed. Never assumed from ids or driver names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migration: Vec<DeviceMigration>,
}

/// One device's VFIO migration capability, read from the kernel
/// (`VFIO_DEVICE_FEATURE` GET `MIGRATION` on the device opened through its group).
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct DeviceMigration {
    /// The device: a BDF or an mdev UUID.
    pub device: String,
    /// Whether the driver implements VFIO migration v2; `None` when the device
    /// could not be asked (see `error`).
    pub supported: Option<bool>,
    /// The flags the kernel reported: `STOP_COPY`, `P2P`, `PRE_COPY`.
    #[serde(default)]
    pub flags: Vec<String>,
    /// The migration state when asked (`RUNNING` normally).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Why the device could not be asked (e.g. `EBUSY`: its group is held, by
    /// its running VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An attribute that could not be read or did not parse.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct ReadProblem {
    /// The device the attribute belongs to (BDF, UUID, APQN, ib device), if any.
    pub subject: Option<String>,
    /// The path as the kernel names it.
    pub path: String,
    /// The raw value (lossily decoded, cut short), if the file could be read.
    pub value: Option<String>,
    /// Why it was refused.
    pub error: String,
}

/// `/sys/module/vfio_pci/parameters/*`.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct VfioPciParams {
    /// `enable_sriov` (`Y`/`N`): a PF on vfio-pci may create VFs.
    pub enable_sriov: Option<bool>,
    /// `disable_idle_d3`.
    pub disable_idle_d3: Option<bool>,
}

/// One PCI function, `/sys/bus/pci/devices/<BDF>`.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct PciFunction {
    /// Its address.
    pub bdf: Bdf,
    /// Where the bus link points: `/sys/devices/pci0000:3a/.../<BDF>`.
    pub sysfs_path: String,
    /// `vendor`.
    pub vendor: Option<u16>,
    /// `device`.
    pub device: Option<u16>,
    /// `subsystem_vendor`.
    pub subsystem_vendor: Option<u16>,
    /// `subsystem_device`.
    pub subsystem_device: Option<u16>,
    /// `class` (base, sub, prog-if), e.g. `0x020700`.
    pub class: Option<u32>,
    /// Basename of the `driver` link; `None` when no driver is bound.
    pub driver: Option<String>,
    /// `driver_override`; `None` when unset (`(null)`) or unreadable.
    pub driver_override: Option<String>,
    /// Basename of the `iommu_group` link.
    pub iommu_group: Option<IommuGroupId>,
    /// `reset_method`, in priority order (empty when none or absent).
    pub reset_methods: Vec<String>,
    /// Whether the `reset` file exists (at least one reset method works).
    pub has_reset: bool,
    /// `numa_node` (`-1` when unknown).
    pub numa_node: Option<i32>,
    /// SR-IOV PF facts, when `sriov_totalvfs` exists.
    pub sriov: Option<SriovPf>,
    /// The PF of a VF (`physfn` link).
    pub physfn: Option<Bdf>,
    /// `vfio-dev/vfio<X>` entries while bound to a vfio driver.
    pub vfio_dev: Vec<VfioDevRef>,
}

impl PciFunction {
    /// A PCI-to-PCI bridge (class `0x0604xx`).
    #[must_use]
    pub fn is_bridge(&self) -> bool {
        self.class.is_some_and(|c| c >> 8 == 0x0604)
    }
}

/// The SR-IOV side of a PF.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct SriovPf {
    /// `sriov_totalvfs`.
    pub total_vfs: Option<u32>,
    /// `sriov_numvfs`.
    pub num_vfs: Option<u32>,
    /// `virtfn<N>` links, index N → VF.
    pub vfs: Vec<VirtFn>,
    /// OFED `sriov/<N>/{node,port,policy}` (mlx5 IB VF GUIDs), where present.
    pub vf_guids: Vec<VfGuids>,
}

/// One `virtfn<N>` link of a PF.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct VirtFn {
    /// The N in `virtfn<N>`.
    pub index: u32,
    /// The VF it points at.
    pub bdf: Bdf,
}

/// `sriov/<N>/` of an mlx5 PF under MLNX_OFED/DOCA-OFED.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct VfGuids {
    /// The VF index N.
    pub index: u32,
    /// `node`: the VF's node GUID.
    pub node_guid: Option<Guid>,
    /// `port`: the VF's operational port GUID.
    pub port_guid: Option<Guid>,
    /// `policy`: `Down`, `Up` or `Follow`.
    pub policy: Option<String>,
}

/// `vfio-dev/vfio<X>/` of a function bound to vfio.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct VfioDevRef {
    /// `vfio<X>`.
    pub name: String,
    /// `dev` (`major:minor`), present with cdev support.
    pub dev: Option<String>,
}

/// A member of an IOMMU group (`devices/<name>`): a PCI function, an mdev, or
/// a device of another bus, kept by its name (never dropped: a member devfence
/// cannot identify is one whose isolation it cannot vouch for). It reads and
/// serializes as the name, as it always did.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GroupMember {
    /// A PCI function.
    Pci(crate::Bdf),
    /// A mediated device.
    Mdev(crate::MdevUuid),
    /// A device of another bus (a platform device), by name.
    Other(String),
}

impl GroupMember {
    /// Whether this member is `device`.
    #[must_use]
    pub fn is(&self, device: &crate::DeviceId) -> bool {
        match (self, device) {
            (GroupMember::Pci(b), crate::DeviceId::Pci(d)) => b == d,
            (GroupMember::Mdev(u), crate::DeviceId::Mdev(d)) => u == d,
            _ => false,
        }
    }

    /// The member as a device, when it is one devfence manages.
    #[must_use]
    pub fn device(&self) -> Option<crate::DeviceId> {
        match self {
            GroupMember::Pci(b) => Some(crate::DeviceId::Pci(*b)),
            GroupMember::Mdev(u) => Some(crate::DeviceId::Mdev(*u)),
            GroupMember::Other(_) => None,
        }
    }
}

impl From<&str> for GroupMember {
    /// The member `devices/<name>` names: exactly a BDF or an mdev UUID as the
    /// kernel prints them, else another bus's device.
    fn from(name: &str) -> Self {
        if let Ok(b) = name.parse::<crate::Bdf>()
            && b.to_string() == name
        {
            return GroupMember::Pci(b);
        }
        if let Ok(u) = name.parse::<crate::MdevUuid>()
            && u.to_string() == name
        {
            return GroupMember::Mdev(u);
        }
        GroupMember::Other(name.to_owned())
    }
}

impl From<String> for GroupMember {
    fn from(name: String) -> Self {
        GroupMember::from(name.as_str())
    }
}

impl std::fmt::Display for GroupMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupMember::Pci(b) => b.fmt(f),
            GroupMember::Mdev(u) => u.fmt(f),
            GroupMember::Other(s) => f.write_str(s),
        }
    }
}

impl PartialEq<&str> for GroupMember {
    fn eq(&self, other: &&str) -> bool {
        crate::finding::displays_as(self, other)
    }
}

impl PartialEq<String> for GroupMember {
    fn eq(&self, other: &String) -> bool {
        crate::finding::displays_as(self, other)
    }
}

impl schemars::JsonSchema for GroupMember {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GroupMember".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "description": "A member of an IOMMU group by name: a PCI BDF, an mdev UUID, or another bus's device name." })
    }
}

impl serde::Serialize for GroupMember {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for GroupMember {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(GroupMember::from(String::deserialize(d)?))
    }
}

/// An IOMMU group, `/sys/kernel/iommu_groups/<N>`.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct IommuGroup {
    /// The group number.
    pub id: IommuGroupId,
    /// The members (`devices/*`): PCI functions, mdevs, or other devices by
    /// name; serialized as their names.
    pub members: Vec<GroupMember>,
    /// `type` (`DMA`, `identity`, …), where present.
    pub group_type: Option<String>,
    /// `name` (`vfio-noiommu` for groups VFIO made for emulated devices).
    pub name: Option<String>,
}

/// What kind of VFIO node a path is.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum VfioNodeKind {
    /// `/dev/vfio/vfio`, the container.
    Container,
    /// `/dev/vfio/<N>`, a group node.
    Group(IommuGroupId),
    /// `/dev/vfio/noiommu-<N>`.
    NoIommuGroup(IommuGroupId),
    /// `/dev/vfio/devices/vfio<X>`, a per-device cdev.
    Device(String),
}

/// A node under `/dev/vfio`, with its ownership.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct VfioNode {
    /// The path, e.g. `/dev/vfio/41`.
    pub path: String,
    /// What it is.
    pub kind: VfioNodeKind,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Permission bits (`0o600`).
    pub mode: u32,
    /// The `security.selinux` label, where set.
    pub selinux_label: Option<String>,
}

/// An mdev parent, `/sys/class/mdev_bus/<parent>`.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct MdevParent {
    /// The parent device name (a BDF, or `matrix` for vfio_ap).
    pub name: String,
    /// Where the class link points.
    pub sysfs_path: String,
    /// Its `mdev_supported_types/*`.
    pub types: Vec<MdevType>,
}

/// `mdev_supported_types/<type-id>`.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct MdevType {
    /// The directory name, e.g. `nvidia-63`.
    pub id: String,
    /// `name`.
    pub name: Option<String>,
    /// `device_api`, e.g. `vfio-pci`.
    pub device_api: Option<String>,
    /// `available_instances`.
    pub available_instances: Option<u32>,
}

/// An mdev instance, `/sys/bus/mdev/devices/<uuid>`.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Mdev {
    /// Its UUID.
    pub uuid: MdevUuid,
    /// The parent device name (the directory above the instance).
    pub parent: String,
    /// Where the bus link points.
    pub sysfs_path: String,
    /// Basename of the `mdev_type` link.
    pub type_id: Option<String>,
    /// Basename of the `iommu_group` link.
    pub iommu_group: Option<IommuGroupId>,
    /// Basename of the `driver` link.
    pub driver: Option<String>,
}

/// The s390 AP bus, `/sys/bus/ap`.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct ApBus {
    /// `apmask`: adapters reserved for the host.
    pub apmask: Option<ApMask>,
    /// `aqmask`: domains reserved for the host.
    pub aqmask: Option<ApMask>,
    /// `cardXX` devices.
    pub cards: Vec<ApCard>,
    /// `XX.YYYY` queue devices.
    pub queues: Vec<ApQueue>,
    /// vfio_ap matrix mdevs under `/sys/devices/vfio_ap/matrix`.
    pub matrix_mdevs: Vec<ApMatrixMdev>,
}

/// An AP card.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct ApCard {
    /// The adapter id (from `cardXX`).
    pub adapter: u8,
    /// `hwtype`.
    pub hwtype: Option<u32>,
    /// `type` under zcrypt, e.g. `CEX7C`.
    pub card_type: Option<String>,
    /// Basename of the `driver` link.
    pub driver: Option<String>,
}

/// An AP queue.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct ApQueue {
    /// Its APQN.
    pub apqn: Apqn,
    /// The driver it is bound to (`cex4queue`, `vfio_ap`), from the listings of
    /// `/sys/bus/ap/drivers/*/`. The per-queue `status` file is not read by the bulk
    /// inventory (it would cost one read per queue); the AP actuator reads it where
    /// it matters.
    pub driver: Option<String>,
}

/// A vfio_ap matrix mdev.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct ApMatrixMdev {
    /// Its UUID.
    pub uuid: MdevUuid,
    /// `matrix`: what is assigned.
    pub matrix: Option<ApMatrix>,
    /// `guest_matrix`: what the guest actually gets (v5.19+).
    pub guest_matrix: Option<ApMatrix>,
    /// `control_domains`.
    pub control_domains: Vec<u8>,
}

/// The contents of a `matrix`/`guest_matrix` file: the assigned adapters and
/// domains; the APQNs are their cross product.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct ApMatrix {
    /// Assigned adapters, ascending.
    pub adapters: Vec<u8>,
    /// Assigned domains, ascending.
    pub domains: Vec<u8>,
}

impl ApMatrix {
    /// Every APQN of the matrix (adapters × domains).
    pub fn apqns(&self) -> impl Iterator<Item = Apqn> + '_ {
        self.adapters.iter().flat_map(move |&a| {
            self.domains.iter().map(move |&d| Apqn {
                adapter: a,
                domain: d,
            })
        })
    }
    /// Whether an APQN is in the matrix.
    #[must_use]
    pub fn contains(&self, q: Apqn) -> bool {
        self.adapters.binary_search(&q.adapter).is_ok()
            && self.domains.binary_search(&q.domain).is_ok()
    }
}

/// An InfiniBand device, `/sys/class/infiniband/<name>`.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct IbDevice {
    /// e.g. `mlx5_0`.
    pub name: String,
    /// `node_guid`.
    pub node_guid: Option<Guid>,
    /// `node_type`, e.g. `1: CA`.
    pub node_type: Option<String>,
    /// The PCI function behind it (`device` link).
    pub pci: Option<Bdf>,
    /// `ports/*`.
    pub ports: Vec<IbPort>,
}

/// `ports/<p>/` of an IB device.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct IbPort {
    /// The port number.
    pub port: u32,
    /// `state`, e.g. `4: ACTIVE`.
    pub state: Option<String>,
    /// `lid`.
    pub lid: Option<u16>,
    /// `sm_lid`.
    pub sm_lid: Option<u16>,
    /// `link_layer`.
    pub link_layer: Option<String>,
    /// The port GUID: the low 64 bits of `gids/0`.
    pub port_guid: Option<Guid>,
    /// The non-empty slots of `pkeys/*`, by index.
    pub pkeys: Vec<PKeySlot>,
}

/// One non-empty P_Key table slot.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct PKeySlot {
    /// The slot index.
    pub index: u32,
    /// The P_Key it holds.
    pub pkey: PKey,
}

impl Inventory {
    /// The function at `bdf`.
    #[must_use]
    pub fn pci_function(&self, bdf: Bdf) -> Option<&PciFunction> {
        self.pci
            .binary_search_by(|p| p.bdf.cmp(&bdf))
            .ok()
            .map(|i| &self.pci[i])
    }
    /// The group with `id`.
    #[must_use]
    pub fn group(&self, id: IommuGroupId) -> Option<&IommuGroup> {
        self.iommu_groups
            .binary_search_by(|g| g.id.cmp(&id))
            .ok()
            .map(|i| &self.iommu_groups[i])
    }
    /// The mdev with `uuid`.
    #[must_use]
    pub fn mdev(&self, uuid: MdevUuid) -> Option<&Mdev> {
        self.mdevs.iter().find(|m| m.uuid == uuid)
    }
}

#[cfg(test)]
mod group_member_tests {
    use super::GroupMember;

    /// issue 11 item 3: an IOMMU group's members are typed (a PCI function, an
    /// mdev, or another bus's device kept by name) and serialize as the names
    /// they always were.
    #[test]
    fn members_are_typed_and_serialize_as_names() {
        let pci = GroupMember::from("0000:3b:00.1");
        assert!(matches!(pci, GroupMember::Pci(_)));
        let mdev = GroupMember::from("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
        assert!(matches!(mdev, GroupMember::Mdev(_)));
        for other in ["ACPI0007:00", "3b:00.1", "0000:3B:00.1"] {
            assert_eq!(GroupMember::from(other), GroupMember::Other(other.into()));
        }
        let j = serde_json::to_string(&vec![pci.clone(), mdev]).unwrap_or_default();
        assert_eq!(
            j,
            r#"["0000:3b:00.1","83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"]"#
        );
        assert!(pci == "0000:3b:00.1");
        let dev: crate::DeviceId = "0000:3b:00.1"
            .parse()
            .unwrap_or(crate::DeviceId::IbGuid(crate::Guid(0)));
        assert!(pci.is(&dev));
    }
}
