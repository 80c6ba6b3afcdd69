//! What every rule needs: the tenancy's assignments resolved against the inventory,
//! and the lookups the rules share.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use devfence_model::{
    ApMatrixMdev, ApQueue, Apqn, Assignment, Bdf, DeviceId, Evidence, Guid, Inventory, IommuGroup,
    IommuGroupId, Mdev, MdevUuid, PKey, PciFunction, Tenancy, Tenant, TenantId,
};

use crate::kernel::KernelVersion;
use crate::paths;

/// One thing an assignment resolved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Unit {
    /// A PCI function.
    Pci(Bdf),
    /// An mdev instance or a vfio_ap matrix mdev.
    Mdev(MdevUuid),
    /// An AP queue that exists on the host.
    Apqn(Apqn),
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unit::Pci(b) => b.fmt(f),
            Unit::Mdev(u) => u.fmt(f),
            Unit::Apqn(q) => q.fmt(f),
        }
    }
}

/// An assignment that names a device the inventory has.
pub(crate) struct Held<'a> {
    /// Index in `Tenancy::assignments`.
    pub index: usize,
    /// The assignment.
    pub assignment: &'a Assignment,
    /// What it resolved to (never empty).
    pub units: Vec<Unit>,
}

impl Held<'_> {
    /// The tenant holding it.
    pub fn tenant(&self) -> &TenantId {
        &self.assignment.tenant
    }
}

/// Where an IB GUID or P_Key was read. Paths are only formatted for evidence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum IbPlace<'a> {
    /// The PF's OFED `sriov/<index>/port`.
    Sriov { pf: Bdf, index: u32 },
    /// `/sys/class/infiniband/<dev>/ports/<port>/gids/0`.
    PortGuid { dev: &'a str, port: u32 },
    /// `/sys/class/infiniband/<dev>/ports/<port>/pkeys/<index>`.
    PKey { dev: &'a str, port: u32, index: u32 },
}

impl IbPlace<'_> {
    /// The kernel path.
    pub fn path(&self) -> String {
        match *self {
            IbPlace::Sriov { pf, index } => paths::pci(pf, &format!("sriov/{index}/port")),
            IbPlace::PortGuid { dev, port } => paths::ib_port(dev, port, "gids/0"),
            IbPlace::PKey { dev, port, index } => {
                paths::ib_port(dev, port, &format!("pkeys/{index}"))
            }
        }
    }
}

/// Where an IB VF's GUID was read, and what was there.
pub(crate) struct GuidSource<'a> {
    /// Where it was read.
    pub place: IbPlace<'a>,
    /// The GUID, `None` when unset or unreadable.
    pub guid: Option<Guid>,
}

/// The InfiniBand side of a PCI function.
#[derive(Default)]
pub(crate) struct IbFacts<'a> {
    /// The VF's GUIDs: the PF's OFED `sriov/<N>/port` and its own IB ports.
    pub sources: Vec<GuidSource<'a>>,
    /// The non-empty P_Key slots of its own IB ports.
    pub pkeys: Vec<(IbPlace<'a>, PKey)>,
}

/// The inventory, the tenancy, and what was derived from them.
pub(crate) struct Ctx<'a> {
    pub inv: &'a Inventory,
    pub ten: &'a Tenancy,
    pub kernel: Option<KernelVersion>,
    /// Resolved assignments, in tenancy order.
    pub held: Vec<Held<'a>>,
    /// Indices of assignments naming a device the inventory does not have.
    pub unresolved: Vec<usize>,
    /// IB facts by PCI function (only functions with an IB side).
    pub ib: HashMap<Bdf, IbFacts<'a>>,
    /// The held PCI functions and mdevs by IOMMU group: (held index, unit).
    pub by_group: BTreeMap<IommuGroupId, Vec<(usize, Unit)>>,
    /// `inv.pci` indices sorted by BDF (whatever order the inventory has).
    pci_index: Vec<(Bdf, usize)>,
    /// `inv.iommu_groups` indices sorted by id.
    group_index: Vec<(IommuGroupId, usize)>,
    mdevs: HashMap<MdevUuid, &'a Mdev>,
    ap_mdevs: HashMap<MdevUuid, &'a ApMatrixMdev>,
    /// AP queues indexed by `adapter << 8 | domain` (empty without an AP bus).
    queues: Vec<Option<&'a ApQueue>>,
    tenants: HashMap<&'a TenantId, usize>,
}

impl<'a> Ctx<'a> {
    pub fn new(inv: &'a Inventory, ten: &'a Tenancy) -> Self {
        let mdevs = inv.mdevs.iter().map(|m| (m.uuid, m)).collect();
        let (ap_mdevs, queues) = match &inv.ap {
            Some(ap) => {
                let mut queues = vec![None; 1 << 16];
                for q in &ap.queues {
                    queues[apqn_index(q.apqn)] = Some(q);
                }
                (
                    ap.matrix_mdevs.iter().map(|m| (m.uuid, m)).collect(),
                    queues,
                )
            }
            None => (HashMap::new(), Vec::new()),
        };
        let tenants = ten
            .tenants
            .iter()
            .enumerate()
            .map(|(i, t)| (&t.id, i))
            .collect();
        let mut pci_index: Vec<(Bdf, usize)> = inv
            .pci
            .iter()
            .enumerate()
            .map(|(i, f)| (f.bdf, i))
            .collect();
        pci_index.sort_unstable();
        let mut group_index: Vec<(IommuGroupId, usize)> = inv
            .iommu_groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.id, i))
            .collect();
        group_index.sort_unstable();
        let mut ctx = Ctx {
            inv,
            ten,
            kernel: inv.kernel_release.as_deref().and_then(KernelVersion::parse),
            held: Vec::new(),
            unresolved: Vec::new(),
            ib: ib_facts(inv),
            by_group: BTreeMap::new(),
            pci_index,
            group_index,
            mdevs,
            ap_mdevs,
            queues,
            tenants,
        };
        ctx.resolve();
        let mut by_group: BTreeMap<IommuGroupId, Vec<(usize, Unit)>> = BTreeMap::new();
        for (i, h) in ctx.held.iter().enumerate() {
            for &unit in &h.units {
                if let Some(g) = ctx.unit_group(unit) {
                    by_group.entry(g).or_default().push((i, unit));
                }
            }
        }
        ctx.by_group = by_group;
        ctx
    }

    fn resolve(&mut self) {
        let mut by_guid: HashMap<Guid, Vec<Bdf>> = HashMap::new();
        for (bdf, facts) in &self.ib {
            for s in &facts.sources {
                if let Some(g) = s.guid {
                    let v = by_guid.entry(g).or_default();
                    if !v.contains(bdf) {
                        v.push(*bdf);
                    }
                }
            }
        }
        for (index, a) in self.ten.assignments.iter().enumerate() {
            let mut units = Vec::new();
            match a.device {
                DeviceId::Pci(b) => {
                    if self.pci(b).is_some() {
                        units.push(Unit::Pci(b));
                    }
                }
                DeviceId::Mdev(u) => {
                    if self.mdevs.contains_key(&u) || self.ap_mdevs.contains_key(&u) {
                        units.push(Unit::Mdev(u));
                    }
                }
                DeviceId::Apqn(q) => {
                    if self.queue(q).is_some() {
                        units.push(Unit::Apqn(q));
                    }
                    if let Some(ap) = &self.inv.ap {
                        for m in &ap.matrix_mdevs {
                            if m.matrix.as_ref().is_some_and(|x| x.contains(q)) {
                                units.push(Unit::Mdev(m.uuid));
                            }
                        }
                    }
                }
                DeviceId::IbGuid(g) => {
                    if let Some(v) = by_guid.get(&g) {
                        units.extend(v.iter().map(|b| Unit::Pci(*b)));
                    }
                }
            }
            units.sort();
            units.dedup();
            if units.is_empty() {
                self.unresolved.push(index);
            } else {
                self.held.push(Held {
                    index,
                    assignment: a,
                    units,
                });
            }
        }
    }

    /// The tenant with `id` and its index in the tenancy.
    pub fn tenant(&self, id: &TenantId) -> Option<(usize, &'a Tenant)> {
        let i = *self.tenants.get(id)?;
        self.ten.tenants.get(i).map(|t| (i, t))
    }

    /// The mdev instance with `uuid`.
    pub fn mdev(&self, uuid: MdevUuid) -> Option<&'a Mdev> {
        self.mdevs.get(&uuid).copied()
    }

    /// The AP queue `q`, if the host has it.
    pub fn queue(&self, q: Apqn) -> Option<&'a ApQueue> {
        self.queues.get(apqn_index(q)).copied().flatten()
    }

    /// The PCI function at `bdf`.
    pub fn pci(&self, bdf: Bdf) -> Option<&'a PciFunction> {
        let i = self.pci_index.binary_search_by(|(b, _)| b.cmp(&bdf)).ok()?;
        let (_, at) = self.pci_index.get(i)?;
        self.inv.pci.get(*at)
    }

    /// The IOMMU group `id`.
    pub fn group(&self, id: IommuGroupId) -> Option<&'a IommuGroup> {
        let i = self
            .group_index
            .binary_search_by(|(g, _)| g.cmp(&id))
            .ok()?;
        let (_, at) = self.group_index.get(i)?;
        self.inv.iommu_groups.get(*at)
    }

    /// The parent an mdev hangs off (`matrix` for vfio_ap mdevs the mdev bus lacks).
    pub fn mdev_parent(&self, uuid: MdevUuid) -> Option<&'a str> {
        match self.mdev(uuid) {
            Some(m) => Some(m.parent.as_str()),
            None => self.ap_mdevs.contains_key(&uuid).then_some("matrix"),
        }
    }

    /// The IOMMU group of a unit, where it has one.
    pub fn unit_group(&self, unit: Unit) -> Option<IommuGroupId> {
        match unit {
            Unit::Pci(b) => self.pci(b).and_then(|f| f.iommu_group),
            Unit::Mdev(u) => self.mdev(u).and_then(|m| m.iommu_group),
            Unit::Apqn(_) => None,
        }
    }

    /// Evidence naming an assignment: `tenancy:assignment[i]` = `tenant: device`,
    /// with what it resolved to when that is named differently.
    pub fn assignment_evidence(&self, held: &Held<'_>, unit: Unit) -> Evidence {
        let device = held.assignment.device.to_string();
        let unit_s = unit.to_string();
        let value = if device == unit_s {
            format!("{}: {device}", held.tenant())
        } else {
            format!("{}: {device} ({unit_s})", held.tenant())
        };
        Evidence::new(format!("tenancy:assignment[{}]", held.index), value)
    }

    /// Evidence of a unit's group link.
    pub fn group_link_evidence(&self, unit: Unit) -> Option<Evidence> {
        let g = self.unit_group(unit)?;
        Some(match unit {
            Unit::Pci(b) => Evidence::new(paths::pci(b, "iommu_group"), g.to_string()),
            Unit::Mdev(u) => Evidence::new(paths::mdev(u, "iommu_group"), g.to_string()),
            Unit::Apqn(_) => return None,
        })
    }
}

/// The index of an APQN in [`Ctx::queues`].
fn apqn_index(q: Apqn) -> usize {
    usize::from(q.adapter) << 8 | usize::from(q.domain)
}

/// Whether the IB port's link layer rules it out as InfiniBand (RoCE ports are
/// Ethernet and carry no IB GUID or P_Key semantics).
pub(crate) fn is_ethernet(link_layer: Option<&str>) -> bool {
    link_layer.is_some_and(|l| l.trim().eq_ignore_ascii_case("ethernet"))
}

fn ib_facts(inv: &Inventory) -> HashMap<Bdf, IbFacts<'_>> {
    let mut out: HashMap<Bdf, IbFacts<'_>> = HashMap::new();
    for pf in &inv.pci {
        let Some(sriov) = &pf.sriov else { continue };
        if sriov.vf_guids.is_empty() {
            continue;
        }
        let guids: HashMap<u32, Option<Guid>> = sriov
            .vf_guids
            .iter()
            .rev()
            .map(|g| (g.index, g.port_guid))
            .collect();
        for vf in &sriov.vfs {
            out.entry(vf.bdf).or_default().sources.push(GuidSource {
                place: IbPlace::Sriov {
                    pf: pf.bdf,
                    index: vf.index,
                },
                guid: guids.get(&vf.index).copied().flatten(),
            });
        }
    }
    for dev in &inv.ib {
        let Some(bdf) = dev.pci else { continue };
        let ib_ports: Vec<_> = dev
            .ports
            .iter()
            .filter(|p| !is_ethernet(p.link_layer.as_deref()))
            .collect();
        if ib_ports.is_empty() && !dev.ports.is_empty() {
            continue;
        }
        let facts = out.entry(bdf).or_default();
        for p in ib_ports {
            facts.sources.push(GuidSource {
                place: IbPlace::PortGuid {
                    dev: &dev.name,
                    port: p.port,
                },
                guid: p.port_guid,
            });
            for slot in &p.pkeys {
                facts.pkeys.push((
                    IbPlace::PKey {
                        dev: &dev.name,
                        port: p.port,
                        index: slot.index,
                    },
                    slot.pkey,
                ));
            }
        }
    }
    out
}
