//! Rules about the input itself: assignments naming nothing, attributes the host
//! reader could not read.

use std::collections::HashSet;

use devfence_model::{DeviceId, Evidence, Finding, Severity};

use super::{
    INV_UNREADABLE, TENANCY_LAUNCHER_SHARED, TENANCY_PKEY_SHARED, TENANCY_UNKNOWN_DEVICE, finding,
};
use crate::ctx::{Ctx, Unit};

/// `TENANCY-UNKNOWN-DEVICE`: an assignment or PF custody naming a device the
/// inventory does not have.
pub(crate) fn unknown_device(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    for &i in &ctx.unresolved {
        let Some(a) = ctx.ten.assignments.get(i) else {
            continue;
        };
        let (what, hint) = match a.device {
            DeviceId::Pci(_) => (
                "PCI function",
                "Check the BDF against `devfence inventory`; if the function is gone (VFs \
                 re-created, device removed), fix or remove the assignment.",
            ),
            DeviceId::Mdev(_) => (
                "mdev",
                "The mdev may have been removed or re-created under a new UUID; fix or remove \
                 the assignment.",
            ),
            DeviceId::Apqn(_) => (
                "AP queue, nor a matrix mdev holding it",
                "Check `lszcrypt` and the matrix mdevs' `matrix`; assign the APQN to a matrix \
                 mdev, or fix the assignment.",
            ),
            DeviceId::IbGuid(_) => (
                "VF or IB port with this port GUID",
                "Check the PF's sriov/<N>/port and the VF's ports/1/gids/0; set the GUID on the \
                 VF before assigning it, or fix the assignment.",
            ),
        };
        out.push(finding(
            TENANCY_UNKNOWN_DEVICE,
            Severity::Error,
            a.device.to_string(),
            format!(
                "The tenancy assigns {} to {}, but the host has no such {what}.",
                a.device, a.tenant
            ),
            vec![Evidence::new(
                format!("tenancy:assignment[{i}]"),
                a.device.to_string(),
            )],
            hint,
        ));
    }
    for (k, u) in ctx.ten.userspace_pfs.iter().enumerate() {
        let known = match u.device {
            DeviceId::Pci(b) => ctx.pci(b).is_some(),
            _ => false,
        };
        if !known {
            out.push(finding(
                TENANCY_UNKNOWN_DEVICE,
                Severity::Error,
                u.device.to_string(),
                format!(
                    "The tenancy gives {} custody of PF {}, but the host has no such PCI function.",
                    u.tenant, u.device
                ),
                vec![Evidence::new(
                    format!("tenancy:userspace_pf[{k}]"),
                    u.device.to_string(),
                )],
                "Check the PF's BDF against `devfence inventory`; fix or remove the \
                 userspace_pf entry.",
            ));
        }
    }
}

/// `TENANCY-PKEY-SHARED`: one partition (the 15-bit P_Key, in any membership)
/// given to two or more tenants. The default partition is left to
/// `IB-DEFAULT-PKEY-FULL`: every port is in it, and devfence keeps tenant ports
/// limited members.
pub(crate) fn pkey_shared(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let mut by_base: std::collections::BTreeMap<u16, Vec<(usize, String, String)>> =
        std::collections::BTreeMap::new();
    for (i, t) in ctx.ten.tenants.iter().enumerate() {
        for p in &t.partitions {
            if p.pkey.is_default() || p.pkey.is_empty_slot() {
                continue;
            }
            let e = by_base.entry(p.pkey.base()).or_default();
            if !e.iter().any(|(_, id, _)| id == t.id.as_str()) {
                e.push((
                    i,
                    t.id.to_string(),
                    format!("{} {:?}", p.pkey, p.membership),
                ));
            }
        }
    }
    for (base, holders) in by_base {
        if holders.len() < 2 {
            continue;
        }
        let names: Vec<&str> = holders.iter().map(|(_, id, _)| id.as_str()).collect();
        out.push(finding(
            TENANCY_PKEY_SHARED,
            Severity::Error,
            format!("P_Key {base:#06x}"),
            format!(
                "Partition {base:#06x} is given to {} tenants ({}): their ports can reach each \
                 other in it, whatever the membership bit says of one of them.",
                names.len(),
                names.join(", ")
            ),
            holders
                .iter()
                .map(|(i, id, p)| {
                    Evidence::new(
                        format!("tenancy:tenant[{i}].partitions"),
                        format!("{id}: {p}"),
                    )
                })
                .collect(),
            "A partition belongs to one tenant: give each tenant P_Keys of its own and move \
             the others' ports out of it (`devfence handover`).",
        ));
    }
}

/// `TENANCY-LAUNCHER-SHARED`: one launcher uid given to two or more tenants, who
/// then own each other's `/dev/vfio` nodes.
pub(crate) fn launcher_shared(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let mut by_uid: std::collections::BTreeMap<u32, Vec<(usize, String)>> =
        std::collections::BTreeMap::new();
    for (i, t) in ctx.ten.tenants.iter().enumerate() {
        if let Some(uid) = t.launcher_uid {
            by_uid.entry(uid).or_default().push((i, t.id.to_string()));
        }
    }
    for (uid, holders) in by_uid {
        if holders.len() < 2 {
            continue;
        }
        let names: Vec<&str> = holders.iter().map(|(_, id)| id.as_str()).collect();
        out.push(finding(
            TENANCY_LAUNCHER_SHARED,
            Severity::Error,
            format!("launcher uid {uid}"),
            format!(
                "Launcher uid {uid} is given to {} tenants ({}): each owns the others' \
                 /dev/vfio nodes and can open their devices.",
                names.len(),
                names.join(", ")
            ),
            holders
                .iter()
                .map(|(i, id)| {
                    Evidence::new(
                        format!("tenancy:tenant[{i}].launcher_uid"),
                        format!("{id}: {uid}"),
                    )
                })
                .collect(),
            "Run each tenant's QEMU as a uid of its own and give every tenant that uid.",
        ));
    }
}

/// Names whose unreadable attributes block verification of an assignment: the
/// assigned devices, their group co-members, their PFs, mdev parents and IB
/// devices.
fn relevant_names(ctx: &Ctx<'_>) -> HashSet<String> {
    let mut names = HashSet::new();
    for h in &ctx.held {
        for &unit in &h.units {
            names.insert(unit.to_string());
            if let Some(group) = ctx.unit_group(unit).and_then(|g| ctx.group(g)) {
                names.extend(group.members.iter().map(ToString::to_string));
            }
            match unit {
                Unit::Pci(b) => {
                    if let Some(pf) = ctx.pci(b).and_then(|f| f.physfn) {
                        names.insert(pf.to_string());
                    }
                }
                Unit::Mdev(u) => {
                    if let Some(p) = ctx.mdev_parent(u) {
                        names.insert(p.to_string());
                    }
                }
                Unit::Apqn(_) => {}
            }
        }
    }
    for dev in &ctx.inv.ib {
        if dev.pci.is_some_and(|b| names.contains(&b.to_string())) {
            names.insert(dev.name.clone());
        }
    }
    names
}

/// `INV-UNREADABLE`: every problem the host reader recorded; an error when it
/// concerns an assigned device or its surroundings (fail closed), a warning
/// otherwise.
pub(crate) fn unreadable(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    if ctx.inv.problems.is_empty() {
        return;
    }
    let names = relevant_names(ctx);
    for p in &ctx.inv.problems {
        let relevant = p.subject.as_deref().is_some_and(|s| {
            names.contains(s)
                || s.split(|c: char| c.is_whitespace() || c == '/')
                    .next()
                    .is_some_and(|first| names.contains(first))
        });
        let subject = p.subject.clone().unwrap_or_else(|| p.path.clone());
        let value = p
            .value
            .clone()
            .unwrap_or_else(|| "(unreadable)".to_string());
        let evidence = vec![Evidence::new(p.path.clone(), value)];
        if relevant {
            out.push(finding(
                INV_UNREADABLE,
                Severity::Error,
                subject,
                format!(
                    "{} could not be read or parsed ({}), so the isolation of an assigned \
                     device cannot be verified.",
                    p.path, p.error
                ),
                evidence,
                "Fix the attribute (driver state, permissions, a dangling link) and run the \
                 check again; until it reads, keep the tenant's VM from starting.",
            ));
        } else {
            out.push(finding(
                INV_UNREADABLE,
                Severity::Warning,
                subject,
                format!("{} could not be read or parsed ({}).", p.path, p.error),
                evidence,
                "Check the attribute on the host; no assigned device depends on it yet, but it \
                 will block any assignment that does.",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use devfence_model::Severity;

    use crate::check;
    use crate::rules::{
        INV_UNREADABLE, RESET_UNAVAILABLE, TENANCY_LAUNCHER_SHARED, TENANCY_PKEY_SHARED,
        TENANCY_UNKNOWN_DEVICE,
    };
    use crate::testsupport::*;
    use devfence_model::Membership;

    /// issue 18 item 1: one P_Key (15 bits, any membership) given to two tenants
    /// is an error; distinct P_Keys and the default partition are not this rule's.
    #[test]
    fn pkey_shared_fires_across_memberships_only() {
        let inv = Host::deb12().build();
        let ten = Ten::new()
            .tenant("acme", Some(107))
            .partition(0x8001, Membership::Full)
            .partition(0xffff, Membership::Full)
            .tenant("mallory", Some(200))
            .partition(0x0001, Membership::Limited)
            .partition(0x7fff, Membership::Limited)
            .tenant("globex", Some(108))
            .partition(0x8002, Membership::Full)
            .build();
        let f = check(&inv, &ten);
        let v = of(&f, TENANCY_PKEY_SHARED);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].subject, "P_Key 0x0001");
        assert_eq!(v[0].severity, Severity::Error);
        assert!(v[0].message.contains("acme, mallory"), "{}", v[0].message);
        assert!(has_ev(
            v[0],
            "tenancy:tenant[1].partitions",
            "mallory: 0x0001 Limited"
        ));
        let ok = Ten::new()
            .tenant("acme", Some(107))
            .partition(0x8001, Membership::Full)
            .tenant("globex", Some(108))
            .partition(0x8002, Membership::Full)
            .build();
        assert!(of(&check(&inv, &ok), TENANCY_PKEY_SHARED).is_empty());
    }

    /// issue 18 item 2: one launcher uid given to two tenants is an error.
    #[test]
    fn launcher_shared_fires_on_one_uid_for_two_tenants() {
        let inv = Host::deb12().build();
        let ten = Ten::new()
            .tenant("acme", Some(107))
            .tenant("mallory", Some(107))
            .tenant("globex", Some(108))
            .tenant("initech", None)
            .tenant("umbrella", None)
            .build();
        let f = check(&inv, &ten);
        let v = of(&f, TENANCY_LAUNCHER_SHARED);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].subject, "launcher uid 107");
        assert!(has_ev(
            v[0],
            "tenancy:tenant[1].launcher_uid",
            "mallory: 107"
        ));
    }

    #[test]
    fn unknown_device_fires_for_each_kind() {
        let inv = Host::deb12()
            .pci(func("0000:3b:00.1").driver("vfio-pci").group(41))
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:00.1", "acme")
            .assign("0000:3b:00.7", "acme")
            .assign(&uuid(9).to_string(), "acme")
            .assign("05.0012", "acme")
            .assign("0x0002c90300a1b2c3", "acme")
            .upf("0000:3b:00.0", "acme")
            .build();
        let f = check(&inv, &ten);
        let v = of(&f, TENANCY_UNKNOWN_DEVICE);
        assert_eq!(v.len(), 5);
        let bdf = v.iter().find(|x| x.subject == "0000:3b:00.7").unwrap();
        assert_eq!(bdf.severity, Severity::Error);
        assert_eq!(bdf.evidence.len(), 1);
        assert!(has_ev(bdf, "tenancy:assignment[1]", "0000:3b:00.7"));
        assert_eq!(
            bdf.message,
            "The tenancy assigns 0000:3b:00.7 to acme, but the host has no such PCI function."
        );
        assert!(
            v.iter()
                .any(|x| has_ev(x, "tenancy:userspace_pf[0]", "0000:3b:00.0"))
        );
    }

    #[test]
    fn assignments_resolve_by_every_kind_of_name() {
        // Every assignment resolves: no TENANCY-UNKNOWN-DEVICE, and the VF named by
        // its GUID is seen (it has no reset, so RESET-UNAVAILABLE proves it).
        let inv = Host::deb12()
            .pci(
                func("0000:3b:00.0")
                    .driver("mlx5_core")
                    .group(40)
                    .vf_guids(&[(0, Some(0x42))]),
            )
            .pci(
                func("0000:3b:00.1")
                    .driver("vfio-pci")
                    .vf_of("0000:3b:00.0")
                    .group(41)
                    .no_reset(),
            )
            .pci(func("0000:af:00.0").driver("nvidia").group(50))
            .mdev(1, "0000:af:00.0", 100)
            .ap(
                Some(&[]),
                Some(&[]),
                &[("05.0012", "vfio_ap")],
                vec![matrix(2, &[6], &[0x12])],
            )
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .assign("0x0000000000000042", "acme")
            .assign(&uuid(1).to_string(), "acme")
            .assign("05.0012", "acme")
            .assign("06.0012", "acme")
            .assign(&uuid(2).to_string(), "acme")
            .build();
        let f = check(&inv, &ten);
        assert!(of(&f, TENANCY_UNKNOWN_DEVICE).is_empty(), "{f:#?}");
        let r = of(&f, RESET_UNAVAILABLE);
        assert_eq!(r.len(), 1);
        assert!(has_ev(
            r[0],
            "tenancy:assignment[0]",
            "acme: 0x0000000000000042 (0000:3b:00.1)"
        ));
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn unreadable_is_an_error_near_assigned_devices() {
        let inv = Host::deb12()
            .pci(func("0000:3b:00.0").driver("mlx5_core").group(40))
            .pci(
                func("0000:3b:00.1")
                    .driver("vfio-pci")
                    .vf_of("0000:3b:00.0")
                    .group(41),
            )
            .pci(func("0000:3b:00.2").driver("vfio-pci").group(41))
            .pci(func("0000:5e:00.0").group(60))
            .problem(
                Some("0000:3b:00.2"),
                "/sys/bus/pci/devices/0000:3b:00.2/class",
            )
            .problem(
                Some("0000:3b:00.0"),
                "/sys/bus/pci/devices/0000:3b:00.0/sriov_numvfs",
            )
            .problem(
                Some("0000:5e:00.0"),
                "/sys/bus/pci/devices/0000:5e:00.0/numa_node",
            )
            .problem(None, "/sys/module/vfio_pci/parameters/enable_sriov")
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:00.1", "acme")
            .build();
        let f = check(&inv, &ten);
        let v = of(&f, INV_UNREADABLE);
        let sev = |s: &str| v.iter().find(|x| x.subject == s).unwrap().severity;
        assert_eq!(sev("0000:3b:00.2"), Severity::Error, "group co-member");
        assert_eq!(sev("0000:3b:00.0"), Severity::Error, "the VF's PF");
        assert_eq!(sev("0000:5e:00.0"), Severity::Warning, "unrelated");
        assert_eq!(
            sev("/sys/module/vfio_pci/parameters/enable_sriov"),
            Severity::Warning
        );
        let co = v.iter().find(|x| x.subject == "0000:3b:00.2").unwrap();
        assert!(has_ev(
            co,
            "/sys/bus/pci/devices/0000:3b:00.2/class",
            "garbage"
        ));
        assert!(co.message.contains("(invalid digit found in string)"));
    }

    #[test]
    fn unreadable_quiet_without_problems() {
        let inv = Host::deb12()
            .pci(func("0000:3b:00.1").driver("vfio-pci").group(41))
            .build();
        assert!(check(&inv, &Ten::new().build()).is_empty());
    }
}
