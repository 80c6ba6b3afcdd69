//! IOMMU group rules: viability, one tenant per group, ownership of the VFIO
//! nodes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use devfence_model::{
    Bdf, Evidence, Finding, GroupMember, IommuGroupId, MdevUuid, PciFunction, Severity, Tenant,
    TenantId, VfioNode, VfioNodeKind,
};

use super::{GRP_NODE_OWNER, GRP_ONE_TENANT, GRP_VIABLE, finding, osrelease_evidence};
use crate::ctx::{Ctx, Held, Unit};
use crate::kernel::KernelVersion;
use crate::paths;

/// The kernel release from which viability follows DMA ownership
/// (`driver_managed_dma`) instead of vfio's allow-list.
const DMA_OWNERSHIP_SINCE: KernelVersion = KernelVersion::new(5, 19);

/// Whether a driver name is vfio-pci or one of its variants, or another VFIO bus
/// driver.
pub(crate) fn is_vfio_driver(d: &str) -> bool {
    d.ends_with("vfio-pci")
        || d.ends_with("vfio_pci")
        || matches!(d, "vfio-platform" | "vfio-amba" | "vfio-fsl-mc")
}

/// Whether a group member with this function's driver leaves the group viable.
/// Unknown kernels get the 5.19+ rules.
fn member_allowed(f: &PciFunction, kernel: Option<KernelVersion>) -> bool {
    let Some(d) = f.driver.as_deref() else {
        return true;
    };
    if is_vfio_driver(d) || d == "pci-stub" {
        return true;
    }
    if kernel.is_none_or(|k| k >= DMA_OWNERSHIP_SINCE) {
        d == "pcieport"
    } else {
        f.is_bridge()
    }
}

fn group_subject(g: IommuGroupId) -> String {
    format!("iommu_group {g}")
}

/// The held PCI functions and mdevs, by the IOMMU group they are in.
fn held_by_group<'c, 'a>(
    ctx: &'c Ctx<'a>,
) -> impl Iterator<Item = (IommuGroupId, Vec<(&'c Held<'a>, Unit)>)> {
    ctx.by_group.iter().map(|(g, v)| {
        let holders = v
            .iter()
            .filter_map(|&(i, u)| ctx.held.get(i).map(|h| (h, u)))
            .collect();
        (*g, holders)
    })
}

fn holder_evidence(ctx: &Ctx<'_>, holders: &[(&Held<'_>, Unit)], out: &mut Vec<Evidence>) {
    for &(h, unit) in holders {
        out.push(ctx.assignment_evidence(h, unit));
        if let Some(e) = ctx.group_link_evidence(unit) {
            out.push(e);
        }
    }
}

/// `GRP-VIABLE`.
pub(crate) fn viable(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let mut no_group: BTreeMap<Bdf, Vec<&Held<'_>>> = BTreeMap::new();
    for h in &ctx.held {
        for &unit in &h.units {
            if let Unit::Pci(b) = unit
                && ctx.unit_group(unit).is_none()
            {
                no_group.entry(b).or_default().push(h);
            }
        }
    }
    for (b, holders) in no_group {
        let mut ev = vec![Evidence::new(paths::pci(b, "iommu_group"), "(absent)")];
        ev.extend(
            holders
                .iter()
                .map(|h| ctx.assignment_evidence(h, Unit::Pci(b))),
        );
        out.push(finding(
            GRP_VIABLE,
            Severity::Error,
            b.to_string(),
            format!("{b} is assigned but has no IOMMU group, so nothing confines its DMA."),
            ev,
            "Enable the IOMMU (VT-d/AMD-Vi in firmware, intel_iommu=on or amd_iommu=on) and \
             reboot; never hand out a function without a group (no-IOMMU mode gives no \
             isolation).",
        ));
    }

    let new_rules = ctx.kernel.is_none_or(|k| k >= DMA_OWNERSHIP_SINCE);
    for (g, holders) in held_by_group(ctx) {
        let mut ev = Vec::new();
        let mut offenders = Vec::new();
        match ctx.group(g) {
            None => {
                holder_evidence(ctx, &holders, &mut ev);
                ev.push(Evidence::new(
                    format!("/sys/kernel/iommu_groups/{g}"),
                    "(not in the inventory)",
                ));
                out.push(finding(
                    GRP_VIABLE,
                    Severity::Error,
                    group_subject(g),
                    format!(
                        "iommu_group {g} holds an assigned device but is not in the inventory, \
                         so its members cannot be verified."
                    ),
                    ev,
                    format!(
                        "Check /sys/kernel/iommu_groups/{g}/devices on the host and run the \
                         check again; keep the tenant's VM from starting until it reads."
                    ),
                ));
                continue;
            }
            Some(group) => {
                for member in &group.members {
                    let name = member.to_string();
                    if let GroupMember::Pci(b) = *member {
                        match ctx.pci(b) {
                            Some(f) if member_allowed(f, ctx.kernel) => {}
                            Some(f) => {
                                let d = f.driver.as_deref().unwrap_or("(none)");
                                offenders.push(format!("{b} ({d})"));
                                ev.push(Evidence::new(paths::pci(b, "driver"), d));
                                if d == "pcieport" || f.is_bridge() {
                                    let class = f.class.map_or_else(
                                        || "(unknown)".into(),
                                        |c| format!("0x{c:06x}"),
                                    );
                                    ev.push(Evidence::new(paths::pci(b, "class"), class));
                                }
                            }
                            None => {
                                offenders.push(format!("{b} (not inventoried)"));
                                ev.push(Evidence::new(
                                    paths::group_member(g, &name),
                                    "(not in the inventory; driver unknown)",
                                ));
                            }
                        }
                    } else if let GroupMember::Other(_) = member {
                        offenders.push(format!("{member} (not a PCI function)"));
                        ev.push(Evidence::new(
                            paths::group_member(g, &name),
                            "(not a PCI function; driver unknown)",
                        ));
                    }
                }
            }
        }
        if offenders.is_empty() {
            continue;
        }
        holder_evidence(ctx, &holders, &mut ev);
        ev.push(osrelease_evidence(ctx));
        let rules_note = if new_rules {
            ""
        } else {
            " (before 5.19 only vfio drivers, pci-stub and bridges are allowed)"
        };
        out.push(finding(
            GRP_VIABLE,
            Severity::Error,
            group_subject(g),
            format!(
                "iommu_group {g} holds an assigned device, but {} of its members {} on a driver \
                 that uses the kernel DMA API{rules_note}: {}.",
                offenders.len(),
                if offenders.len() == 1 { "is" } else { "are" },
                offenders.join(", ")
            ),
            ev,
            "Unbind the other members or bind them to vfio-pci and give them to the same \
             tenant (`devfence bind <BDF> --driver vfio-pci`), or move the assigned device to a \
             slot behind an ACS-capable port.",
        ));
    }
}

/// What a one-tenant unit is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    Group(IommuGroupId),
    /// A matrix mdev the mdev bus does not list (no group known).
    Mdev(MdevUuid),
    /// A non-isolating parent and its index in the tenancy.
    Parent(&'a str, usize),
}

/// `GRP-ONE-TENANT`.
pub(crate) fn one_tenant(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let parents: HashMap<&str, usize> = ctx
        .ten
        .non_isolating_parents
        .iter()
        .enumerate()
        .map(|(k, p)| (p.device.trim(), k))
        .rev()
        .collect();
    let mut map: BTreeMap<Key<'_>, Vec<(&Held<'_>, Unit)>> = BTreeMap::new();
    for h in &ctx.held {
        for &unit in &h.units {
            match (unit, ctx.unit_group(unit)) {
                (_, Some(g)) => map.entry(Key::Group(g)).or_default().push((h, unit)),
                (Unit::Mdev(u), None) => map.entry(Key::Mdev(u)).or_default().push((h, unit)),
                _ => {}
            }
            if let Unit::Mdev(u) = unit
                && let Some(p) = ctx.mdev_parent(u)
                && let Some(&k) = parents.get(p)
            {
                map.entry(Key::Parent(p, k)).or_default().push((h, unit));
            }
        }
    }
    for (key, holders) in map {
        let tenants: BTreeSet<&TenantId> = holders.iter().map(|(h, _)| h.tenant()).collect();
        if tenants.len() < 2 {
            continue;
        }
        let names = tenants
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let mut ev = Vec::new();
        let (subject, message, hint) = match key {
            Key::Group(g) => {
                holder_evidence(ctx, &holders, &mut ev);
                (
                    group_subject(g),
                    format!(
                        "iommu_group {g} holds devices of {} tenants ({names}), which can reach \
                         each other through DMA.",
                        tenants.len()
                    ),
                    "An IOMMU group is the unit of isolation: give all of its assigned members \
                     to one tenant, and give the other tenants devices from other groups."
                        .to_string(),
                )
            }
            Key::Mdev(u) => {
                holder_evidence(ctx, &holders, &mut ev);
                (
                    u.to_string(),
                    format!("mdev {u} is held by {} tenants ({names}).", tenants.len()),
                    "A matrix mdev goes to one VM of one tenant: split the APQNs into one \
                     matrix mdev per tenant."
                        .to_string(),
                )
            }
            Key::Parent(p, k) => {
                ev.push(Evidence::new(
                    format!("tenancy:non_isolating_parent[{k}]"),
                    p,
                ));
                for &(h, unit) in &holders {
                    ev.push(ctx.assignment_evidence(h, unit));
                    if let Unit::Mdev(u) = unit
                        && let Some(m) = ctx.mdev(u)
                    {
                        ev.push(Evidence::new(
                            format!("/sys/bus/mdev/devices/{u}"),
                            m.sysfs_path.clone(),
                        ));
                    }
                }
                (
                    p.to_string(),
                    format!(
                        "mdevs of {p}, a parent that does not isolate its instances, belong to \
                         {} tenants ({names}).",
                        tenants.len()
                    ),
                    format!(
                        "Give every mdev of {p} to one tenant, or remove the \
                         non_isolating_parent entry if the vendor documents isolation between \
                         instances."
                    ),
                )
            }
        };
        out.push(finding(
            GRP_ONE_TENANT,
            Severity::Error,
            subject,
            message,
            ev,
            hint,
        ));
    }
}

fn node_value(n: &VfioNode) -> String {
    format!("uid {} gid {} mode {:04o}", n.uid, n.gid, n.mode & 0o7777)
}

fn label_path(n: &VfioNode) -> String {
    format!("{} [security.selinux]", n.path)
}

/// `GRP-NODE-OWNER`.
pub(crate) fn node_owner(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let mut group_nodes: HashMap<IommuGroupId, Vec<&VfioNode>> = HashMap::new();
    let mut device_nodes: HashMap<&str, &VfioNode> = HashMap::new();
    for n in &ctx.inv.vfio_nodes {
        match &n.kind {
            VfioNodeKind::Group(g) | VfioNodeKind::NoIommuGroup(g) => {
                group_nodes.entry(*g).or_default().push(n);
            }
            VfioNodeKind::Device(name) => {
                device_nodes.insert(name.as_str(), n);
                if let Some(base) = n.path.rsplit('/').next() {
                    device_nodes.entry(base).or_insert(n);
                }
            }
            VfioNodeKind::Container => {}
        }
    }
    for (g, holders) in held_by_group(ctx) {
        // The group's nodes: its group node(s) and the per-device nodes of its
        // PCI members.
        let mut members: Vec<Bdf> = match ctx.group(g) {
            Some(group) => group
                .members
                .iter()
                .filter_map(|m| match m {
                    GroupMember::Pci(b) => Some(*b),
                    _ => None,
                })
                .collect(),
            None => Vec::new(),
        };
        members.extend(holders.iter().filter_map(|(_, u)| match u {
            Unit::Pci(b) => Some(*b),
            _ => None,
        }));
        let mut nodes: Vec<&VfioNode> = group_nodes.get(&g).cloned().unwrap_or_default();
        for b in members {
            for d in ctx
                .pci(b)
                .map(|f| f.vfio_dev.as_slice())
                .unwrap_or_default()
            {
                if let Some(n) = device_nodes.get(d.name.as_str()) {
                    nodes.push(n);
                }
            }
        }
        nodes.sort_by(|a, b| a.path.cmp(&b.path));
        nodes.dedup_by(|a, b| a.path == b.path);
        if nodes.is_empty() {
            continue;
        }

        let tenants: BTreeSet<&TenantId> = holders.iter().map(|(h, _)| h.tenant()).collect();
        let group_label = nodes
            .iter()
            .find(|n| {
                matches!(
                    n.kind,
                    VfioNodeKind::Group(_) | VfioNodeKind::NoIommuGroup(_)
                )
            })
            .and_then(|n| n.selinux_label.as_ref().map(|l| (l, &n.path)))
            .or_else(|| {
                nodes
                    .iter()
                    .find_map(|n| n.selinux_label.as_ref().map(|l| (l, &n.path)))
            });

        // A group held by several tenants has no right owner; GRP-ONE-TENANT
        // reports that defect once, so only mode and label consistency are checked.
        let declared: Vec<(usize, &Tenant, &TenantId)> = if tenants.len() > 1 {
            Vec::new()
        } else {
            tenants
                .iter()
                .filter_map(|t| ctx.tenant(t).map(|(k, x)| (k, x, *t)))
                .collect()
        };
        for node in &nodes {
            let clean = node.mode & 0o077 == 0
                && declared.iter().all(|(_, t, _)| {
                    t.launcher_uid.is_none_or(|u| u == node.uid)
                        && !matches!(
                            (&t.security_label, &node.selinux_label),
                            (Some(w), Some(h)) if w != h
                        )
                })
                && group_label.is_none_or(|(l, _)| node.selinux_label.as_ref() == Some(l));
            if clean {
                continue;
            }
            let mut reasons = Vec::new();
            let mut ev = vec![Evidence::new(node.path.clone(), node_value(node))];
            let mut hints = Vec::new();
            for &(k, tenant, t) in &declared {
                if let Some(uid) = tenant.launcher_uid
                    && node.uid != uid
                {
                    reasons.push(format!(
                        "it is owned by uid {}, not by {t}'s launcher uid {uid}",
                        node.uid
                    ));
                    ev.push(Evidence::new(
                        format!("tenancy:tenant[{k}].launcher_uid"),
                        uid.to_string(),
                    ));
                    hints.push(format!("chown {uid} {}", node.path));
                }
                if let (Some(want), Some(have)) = (&tenant.security_label, &node.selinux_label)
                    && want != have
                {
                    reasons.push(format!("it is labelled {have}, not {t}'s label {want}"));
                    ev.push(Evidence::new(label_path(node), have.clone()));
                    ev.push(Evidence::new(
                        format!("tenancy:tenant[{k}].security_label"),
                        want.clone(),
                    ));
                    hints.push(format!("chcon {want} {}", node.path));
                }
            }
            if node.mode & 0o077 != 0 {
                reasons.push(format!(
                    "mode {:04o} lets group or others open it",
                    node.mode & 0o7777
                ));
                hints.push(format!("chmod 0600 {}", node.path));
            }
            if let Some((label, from)) = group_label
                && node.selinux_label.as_ref() != Some(label)
            {
                let have = node.selinux_label.as_deref().unwrap_or("(none)");
                reasons.push(format!("it is labelled {have}, unlike {from} ({label})"));
                ev.push(Evidence::new(label_path(node), have));
                if &node.path != from {
                    ev.push(Evidence::new(
                        format!("{from} [security.selinux]"),
                        label.clone(),
                    ));
                }
                hints.push(format!("chcon {label} {}", node.path));
            }
            if reasons.is_empty() {
                continue;
            }
            holder_evidence(ctx, &holders, &mut ev);
            ev.dedup();
            hints.dedup();
            let names = tenants
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            out.push(finding(
                GRP_NODE_OWNER,
                Severity::Error,
                node.path.clone(),
                format!(
                    "{} (iommu_group {g}, held by {names}): {}.",
                    node.path,
                    reasons.join("; ")
                ),
                ev,
                format!(
                    "Give the node to the tenant's launcher only: `{}`, and make it stick with \
                     a udev rule or the launcher's own labelling (libvirt does this per VM).",
                    hints.join(" && ")
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use devfence_model::{Severity, VfioNodeKind};

    use crate::check;
    use crate::rules::{GRP_NODE_OWNER, GRP_ONE_TENANT, GRP_VIABLE};
    use crate::testsupport::*;

    /// Group 13: a PF on `pf_driver`, a VF on vfio-pci (assigned to acme).
    fn two_member_group(
        kernel: Option<&str>,
        pf_driver: &str,
        pf_class: u32,
    ) -> Vec<devfence_model::Finding> {
        let inv = Host::new(kernel)
            .pci(
                func("0000:3b:00.0")
                    .driver(pf_driver)
                    .class(pf_class)
                    .group(13),
            )
            .pci(func("0000:3b:00.1").driver("vfio-pci").group(13))
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:00.1", "acme")
            .build();
        check(&inv, &ten)
    }

    #[test]
    fn viable_fires_on_a_host_driver_in_the_group() {
        let f = two_member_group(Some("6.1.0-26-amd64"), "mlx5_core", 0x020700);
        let v = of(&f, GRP_VIABLE);
        assert_eq!(v.len(), 1);
        let v = v[0];
        assert_eq!(v.severity, Severity::Error);
        assert_eq!(v.subject, "iommu_group 13");
        assert!(has_ev(
            v,
            "/sys/bus/pci/devices/0000:3b:00.0/driver",
            "mlx5_core"
        ));
        assert!(has_ev(v, "tenancy:assignment[0]", "acme: 0000:3b:00.1"));
        assert!(has_ev(
            v,
            "/sys/bus/pci/devices/0000:3b:00.1/iommu_group",
            "13"
        ));
        assert!(has_ev(v, "/proc/sys/kernel/osrelease", "6.1.0-26-amd64"));
        assert_eq!(
            v.message,
            "iommu_group 13 holds an assigned device, but 1 of its members is on a driver that \
             uses the kernel DMA API: 0000:3b:00.0 (mlx5_core)."
        );
    }

    #[test]
    fn viable_accepts_dma_managing_drivers() {
        let inv = Host::deb12()
            .pci(
                func("0000:00:01.0")
                    .driver("pcieport")
                    .class(0x060400)
                    .group(13),
            )
            .pci(func("0000:3b:00.0").driver("mlx5_vfio_pci").group(13))
            .pci(func("0000:3b:00.1").driver("vfio-pci").group(13))
            .pci(func("0000:3b:00.2").driver("pci-stub").group(13))
            .pci(func("0000:3b:00.3").group(13))
            .pci(func("0000:3b:00.4").driver("hisi_acc_vfio_pci").group(13))
            // A host driver in a group nobody holds is fine.
            .pci(func("0000:5e:00.0").driver("mlx5_core").group(14))
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:00.1", "acme")
            .build();
        assert!(of(&check(&inv, &ten), GRP_VIABLE).is_empty());
    }

    #[test]
    fn viable_knows_the_5_19_boundary() {
        // pcieport on a non-bridge: only 5.19+ accepts it (driver_managed_dma).
        for (kernel, fires) in [
            (Some("5.18.19"), true),
            (Some("5.19.0"), false),
            (Some("6.12.9-amd64"), false),
            (None, false),
            (Some("garbage"), false),
        ] {
            let f = two_member_group(kernel, "pcieport", 0x088000);
            assert_eq!(of(&f, GRP_VIABLE).len(), usize::from(fires), "{kernel:?}");
        }
        // A bridge on some other driver: only before 5.19 is any bridge allowed.
        for (kernel, fires) in [
            (Some("5.18.0"), false),
            (Some("5.19.0"), true),
            (None, true),
        ] {
            let f = two_member_group(kernel, "shpchp", 0x060400);
            assert_eq!(of(&f, GRP_VIABLE).len(), usize::from(fires), "{kernel:?}");
        }
        let f = two_member_group(Some("5.10.0"), "pcieport", 0x088000);
        assert!(of(&f, GRP_VIABLE)[0].message.contains("before 5.19"));
    }

    #[test]
    fn viable_fails_closed_on_unknown_members_and_missing_groups() {
        let inv = Host::deb12()
            .pci(func("0000:3b:00.1").driver("vfio-pci").group(13))
            .member(13, "0000:3b:00.7")
            .member(13, "ff1a0000.iommu")
            .pci(func("0000:3c:00.0").driver("vfio-pci"))
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:00.1", "acme")
            .assign("0000:3c:00.0", "acme")
            .build();
        let f = check(&inv, &ten);
        let v = of(&f, GRP_VIABLE);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].subject, "0000:3c:00.0");
        assert!(has_ev(
            v[0],
            "/sys/bus/pci/devices/0000:3c:00.0/iommu_group",
            "(absent)"
        ));
        assert_eq!(v[1].subject, "iommu_group 13");
        assert!(has_ev(
            v[1],
            "/sys/kernel/iommu_groups/13/devices/ff1a0000.iommu",
            "(not a PCI function; driver unknown)"
        ));
        assert!(v[1].message.contains("2 of its members are"));

        let mut inv = inv;
        inv.iommu_groups.clear();
        let f = check(&inv, &ten);
        assert!(
            of(&f, GRP_VIABLE).iter().any(
                |x| x.subject == "iommu_group 13" && x.message.contains("not in the inventory")
            )
        );
    }

    #[test]
    fn viable_ignores_mediated_members() {
        let inv = Host::deb12()
            .pci(func("0000:af:00.0").driver("nvidia").group(40))
            .mdev(1, "0000:af:00.0", 100)
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .assign(&uuid(1).to_string(), "acme")
            .build();
        assert!(check(&inv, &ten).is_empty());
    }

    #[test]
    fn one_tenant_per_group() {
        let host = || {
            Host::deb12()
                .pci(func("0000:3b:00.1").driver("vfio-pci").group(13))
                .pci(func("0000:3b:00.2").driver("vfio-pci").group(13))
                .build()
        };
        let shared = Ten::new()
            .tenant("acme", None)
            .tenant("globex", None)
            .assign("0000:3b:00.1", "acme")
            .assign("0000:3b:00.2", "globex")
            .build();
        let f = check(&host(), &shared);
        let v = of(&f, GRP_ONE_TENANT);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, "iommu_group 13");
        assert!(v[0].message.contains("2 tenants (acme, globex)"));
        assert!(has_ev(
            v[0],
            "tenancy:assignment[1]",
            "globex: 0000:3b:00.2"
        ));

        let single = Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:00.1", "acme")
            .assign("0000:3b:00.2", "acme")
            .build();
        assert!(check(&host(), &single).is_empty());
    }

    #[test]
    fn one_tenant_per_non_isolating_parent() {
        let inv = Host::deb12()
            .pci(func("0000:af:00.0").driver("nvidia").group(40))
            .mdev(1, "0000:af:00.0", 100)
            .mdev(2, "0000:af:00.0", 101)
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .tenant("globex", None)
            .assign(&uuid(1).to_string(), "acme")
            .assign(&uuid(2).to_string(), "globex");
        // Separate groups, isolating parent: fine.
        assert!(check(&inv, &ten.0.clone()).is_empty());
        let f = check(&inv, &ten.parent("0000:af:00.0").build());
        let v = of(&f, GRP_ONE_TENANT);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, "0000:af:00.0");
        assert!(has_ev(
            v[0],
            "tenancy:non_isolating_parent[0]",
            "0000:af:00.0"
        ));
    }

    #[test]
    fn one_tenant_per_matrix_mdev() {
        let inv = Host::deb12()
            .ap(
                Some(&[]),
                Some(&[]),
                &[("05.0012", "vfio_ap")],
                vec![matrix(1, &[5], &[0x12])],
            )
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .tenant("globex", None)
            .assign("05.0012", "acme")
            .assign(&uuid(1).to_string(), "globex")
            .build();
        let f = check(&inv, &ten);
        let v = of(&f, GRP_ONE_TENANT);
        assert_eq!(v.len(), 1, "{f:#?}");
        assert_eq!(v[0].subject, uuid(1).to_string());
        assert!(has_ev(
            v[0],
            "tenancy:assignment[0]",
            &format!("acme: 05.0012 ({})", uuid(1))
        ));
    }

    fn node_host(group_uid: u32, group_mode: u32, dev_uid: u32) -> Host {
        Host::deb12()
            .pci(
                func("0000:3b:00.1")
                    .driver("vfio-pci")
                    .group(13)
                    .vfio_dev("vfio3"),
            )
            .group_node(13, group_uid, group_mode)
            .dev_node("vfio3", dev_uid, 0o600)
            .dev_node("vfio9", 0, 0o666)
    }

    fn acme_107() -> Ten {
        Ten::new()
            .tenant("acme", Some(107))
            .assign("0000:3b:00.1", "acme")
    }

    #[test]
    fn node_owner_fires_on_owner_and_mode() {
        let inv = node_host(0, 0o666, 107).build();
        let f = check(&inv, &acme_107().build());
        let v = of(&f, GRP_NODE_OWNER);
        assert_eq!(v.len(), 1, "{f:#?}");
        assert_eq!(v[0].subject, "/dev/vfio/13");
        assert!(has_ev(v[0], "/dev/vfio/13", "uid 0 gid 0 mode 0666"));
        assert!(has_ev(v[0], "tenancy:tenant[0].launcher_uid", "107"));
        assert_eq!(
            v[0].message,
            "/dev/vfio/13 (iommu_group 13, held by acme): it is owned by uid 0, not by acme's \
             launcher uid 107; mode 0666 lets group or others open it."
        );
        assert!(
            v[0].hint
                .contains("chown 107 /dev/vfio/13 && chmod 0600 /dev/vfio/13")
        );

        // The per-device node of the member is checked too; unrelated nodes are not.
        let inv = node_host(107, 0o600, 0).build();
        let v = check(&inv, &acme_107().build());
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, "/dev/vfio/devices/vfio3");
    }

    #[test]
    fn node_owner_quiet_when_owned_by_the_launcher() {
        let inv = node_host(107, 0o600, 107).build();
        assert!(check(&inv, &acme_107().build()).is_empty());
        // No launcher declared: only the mode matters.
        let inv = node_host(0, 0o600, 0).build();
        let ten = Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:00.1", "acme")
            .build();
        assert!(check(&inv, &ten).is_empty());
    }

    #[test]
    fn node_owner_leaves_a_shared_group_to_one_tenant_rule() {
        // Two tenants in one group: no owner can be right for both. The node is not
        // reported for its owner (GRP-ONE-TENANT says it), but a world-open mode is.
        let host = |mode| {
            Host::deb12()
                .pci(func("0000:03:00.0").driver("vfio-pci").group(12))
                .pci(func("0000:04:00.0").driver("vfio-pci").group(12))
                .group_node(12, 107, mode)
        };
        let ten = Ten::new()
            .tenant("acme", Some(107))
            .tenant("globex", Some(108))
            .assign("0000:03:00.0", "acme")
            .assign("0000:04:00.0", "globex")
            .build();
        let f = check(&host(0o600).build(), &ten);
        assert!(of(&f, GRP_NODE_OWNER).is_empty(), "{f:#?}");
        assert_eq!(of(&f, "GRP-ONE-TENANT").len(), 1);
        let f = check(&host(0o660).build(), &ten);
        let v = of(&f, GRP_NODE_OWNER);
        assert_eq!(v.len(), 1, "{f:#?}");
        assert!(v[0].message.contains("mode 0660"), "{}", v[0].message);
        assert!(!v[0].message.contains("launcher uid"), "{}", v[0].message);
    }

    #[test]
    fn node_owner_compares_selinux_labels() {
        let a = "system_u:object_r:vfio_device_t:s0:c1,c2";
        let b = "system_u:object_r:vfio_device_t:s0:c7,c9";
        let inv = Host::deb12()
            .pci(
                func("0000:3b:00.1")
                    .driver("vfio-pci")
                    .group(13)
                    .vfio_dev("vfio3"),
            )
            .group_node(13, 107, 0o600)
            .label(a)
            .dev_node("vfio3", 107, 0o600)
            .label(b)
            .build();
        let f = check(&inv, &acme_107().build());
        let v = of(&f, GRP_NODE_OWNER);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, "/dev/vfio/devices/vfio3");
        assert!(has_ev(
            v[0],
            "/dev/vfio/devices/vfio3 [security.selinux]",
            b
        ));
        assert!(has_ev(v[0], "/dev/vfio/13 [security.selinux]", a));

        // Consistent labels, but not the tenant's: both nodes.
        let inv = Host::deb12()
            .pci(
                func("0000:3b:00.1")
                    .driver("vfio-pci")
                    .group(13)
                    .vfio_dev("vfio3"),
            )
            .group_node(13, 107, 0o600)
            .label(a)
            .dev_node("vfio3", 107, 0o600)
            .label(a)
            .build();
        assert!(check(&inv, &acme_107().build()).is_empty());
        let f = check(&inv, &acme_107().label(b).build());
        assert_eq!(of(&f, GRP_NODE_OWNER).len(), 2);
        assert!(has_ev(
            of(&f, GRP_NODE_OWNER)[0],
            "tenancy:tenant[0].security_label",
            b
        ));
    }

    #[test]
    fn node_owner_ignores_unassigned_groups() {
        let inv = Host::deb12()
            .pci(func("0000:3b:00.1").driver("vfio-pci").group(13))
            .group_node(13, 0, 0o666)
            .node(VfioNodeKind::Container, 0, 0o666)
            .build();
        assert!(check(&inv, &Ten::new().tenant("acme", Some(1)).build()).is_empty());
    }
}
