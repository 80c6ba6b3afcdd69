//! InfiniBand rules: VF GUIDs and the default partition.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use devfence_model::{Bdf, Evidence, Finding, Guid, Membership, PKey, Severity};

use super::{IB_DEFAULT_PKEY_FULL, IB_GUID_DUPLICATE, IB_GUID_INVALID, finding};
use crate::capped_list;
use crate::ctx::{Ctx, Held, IbFacts, IbPlace, Unit, is_ethernet};

/// The assigned IB VFs (a VF with an IB side), each with its holders and facts.
fn assigned_ib_vfs<'c, 'a>(
    ctx: &'c Ctx<'a>,
) -> BTreeMap<Bdf, (Vec<&'c Held<'a>>, &'c IbFacts<'a>)> {
    let mut map: BTreeMap<Bdf, (Vec<&Held<'_>>, &IbFacts<'_>)> = BTreeMap::new();
    for h in &ctx.held {
        for unit in &h.units {
            let Unit::Pci(b) = *unit else { continue };
            if ctx.pci(b).and_then(|f| f.physfn).is_none() {
                continue;
            }
            let Some(facts) = ctx.ib.get(&b) else {
                continue;
            };
            map.entry(b)
                .or_insert_with(|| (Vec::new(), facts))
                .0
                .push(h);
        }
    }
    map
}

fn describe(g: Option<Guid>) -> Option<&'static str> {
    match g {
        None => Some("unset"),
        Some(Guid(0)) => Some("zero"),
        Some(Guid(u64::MAX)) => Some("all ones"),
        Some(_) => None,
    }
}

/// `IB-GUID-INVALID`.
pub(crate) fn guid_invalid(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    for (vf, (holders, facts)) in assigned_ib_vfs(ctx) {
        let mut problems: BTreeSet<&str> = facts
            .sources
            .iter()
            .filter_map(|s| describe(s.guid))
            .collect();
        if facts.sources.is_empty() {
            problems.insert("not found");
        }
        if problems.is_empty() {
            continue;
        }
        let mut ev: Vec<Evidence> = facts
            .sources
            .iter()
            .map(|s| {
                Evidence::new(
                    s.place.path(),
                    s.guid
                        .map_or_else(|| "(unset)".to_string(), |g| g.to_string()),
                )
            })
            .collect();
        if facts.sources.is_empty() {
            ev.push(Evidence::new(
                format!("/sys/bus/pci/devices/{vf}/infiniband"),
                "(no port GUID)",
            ));
        }
        ev.extend(
            holders
                .iter()
                .map(|h| ctx.assignment_evidence(h, Unit::Pci(vf))),
        );
        out.push(finding(
            IB_GUID_INVALID,
            Severity::Error,
            vf.to_string(),
            format!(
                "IB VF {vf} is assigned, but its port GUID is {}, so the subnet manager cannot \
                 place it in its tenant's partitions.",
                problems.into_iter().collect::<Vec<_>>().join(" / ")
            ),
            ev,
            "Set a fresh GUID on the VF (`ip link set <pf> vf <N> port_guid …`, or the PF's \
             sriov/<N>/port) and rebind the VF so it takes effect, before handing it out.",
        ));
    }
}

/// What carries a GUID: a PCI function, or an OFED VF entry without a
/// `virtfn` link, or an IB device without a PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner<'a> {
    Func(Bdf),
    SriovEntry(Bdf, u32),
    Dev(&'a str),
}

impl fmt::Display for Owner<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Func(b) => b.fmt(f),
            Owner::SriovEntry(pf, i) => write!(f, "{pf} VF {i}"),
            Owner::Dev(d) => f.write_str(d),
        }
    }
}

/// `IB-GUID-DUPLICATE`.
pub(crate) fn guid_duplicate(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let mut seen: Vec<(Guid, Owner<'_>, IbPlace<'_>)> = Vec::new();
    for pf in &ctx.inv.pci {
        let Some(sriov) = &pf.sriov else { continue };
        if sriov.vf_guids.is_empty() {
            continue;
        }
        let vfs: HashMap<u32, Bdf> = sriov.vfs.iter().map(|v| (v.index, v.bdf)).collect();
        for g in &sriov.vf_guids {
            let Some(guid) = g.port_guid.filter(|x| !x.is_reserved()) else {
                continue;
            };
            let owner = vfs
                .get(&g.index)
                .map_or(Owner::SriovEntry(pf.bdf, g.index), |b| Owner::Func(*b));
            let place = IbPlace::Sriov {
                pf: pf.bdf,
                index: g.index,
            };
            seen.push((guid, owner, place));
        }
    }
    for dev in &ctx.inv.ib {
        for p in &dev.ports {
            if is_ethernet(p.link_layer.as_deref()) {
                continue;
            }
            let Some(guid) = p.port_guid.filter(|x| !x.is_reserved()) else {
                continue;
            };
            let owner = dev.pci.map_or(Owner::Dev(&dev.name), Owner::Func);
            let place = IbPlace::PortGuid {
                dev: &dev.name,
                port: p.port,
            };
            seen.push((guid, owner, place));
        }
    }
    seen.sort_unstable();
    seen.dedup();
    for same in seen.chunk_by(|a, b| a.0 == b.0) {
        let mut owners: Vec<Owner<'_>> = same.iter().map(|(_, o, _)| *o).collect();
        owners.dedup();
        if owners.len() < 2 {
            continue;
        }
        let Some(&(guid, _, _)) = same.first() else {
            continue;
        };
        let mut places: Vec<String> = same.iter().map(|(_, _, p)| p.path()).collect();
        places.sort();
        places.dedup();
        out.push(finding(
            IB_GUID_DUPLICATE,
            Severity::Error,
            guid.to_string(),
            format!(
                "GUID {guid} is on {} functions ({}); the subnet manager cannot tell them apart, \
                 so one can end up in the other's partitions.",
                owners.len(),
                capped_list(&owners)
            ),
            places
                .into_iter()
                .map(|path| Evidence::new(path, guid.to_string()))
                .collect(),
            "Give every VF a GUID of its own, never reused (devfence allocates them from its \
             pool); set it and rebind the VF.",
        ));
    }
}

/// `IB-DEFAULT-PKEY-FULL`.
pub(crate) fn default_pkey_full(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    for (vf, (holders, facts)) in assigned_ib_vfs(ctx) {
        let mut reasons = Vec::new();
        let mut ev = Vec::new();
        for h in &holders {
            let Some((k, tenant)) = ctx.tenant(h.tenant()) else {
                continue;
            };
            for (j, p) in tenant.partitions.iter().enumerate() {
                if p.pkey.is_default() && p.membership == Membership::Full {
                    reasons.push(format!(
                        "its tenant {} declares the default partition {} full",
                        tenant.id,
                        PKey(p.pkey.base())
                    ));
                    ev.push(Evidence::new(
                        format!("tenancy:tenant[{k}].partitions[{j}]"),
                        format!("{} full", PKey(p.pkey.base())),
                    ));
                }
            }
        }
        for (place, pkey) in &facts.pkeys {
            if pkey.is_default() && pkey.membership() == Membership::Full {
                reasons.push(format!("its port's P_Key table holds {pkey}"));
                ev.push(Evidence::new(place.path(), pkey.to_string()));
            }
        }
        if reasons.is_empty() {
            continue;
        }
        reasons.dedup();
        ev.extend(
            holders
                .iter()
                .map(|h| ctx.assignment_evidence(h, Unit::Pci(vf))),
        );
        out.push(finding(
            IB_DEFAULT_PKEY_FULL,
            Severity::Error,
            vf.to_string(),
            format!(
                "IB VF {vf} is a full member of the default partition ({}), so it can reach \
                 every port on the fabric.",
                reasons.join("; ")
            ),
            ev,
            "Make VF ports limited members of the default partition in the subnet manager \
             (OpenSM: `Default=0x7fff, ipoib : ALL=limited, SELF=full;`) and give the tenant a \
             P_Key of its own instead of 0x7fff full.",
        ));
    }
}

#[cfg(test)]
mod tests {
    use devfence_model::{Inventory, Membership};

    use crate::check;
    use crate::rules::{IB_DEFAULT_PKEY_FULL, IB_GUID_DUPLICATE, IB_GUID_INVALID};
    use crate::testsupport::*;

    const G1: u64 = 0x0002_c903_00a1_b201;
    const G2: u64 = 0x0002_c903_00a1_b202;

    /// PF 3b:00.0 with OFED GUIDs; VFs 3b:00.1 (index 0) and 3b:00.2 (index 1).
    fn ib_host(guids: &[(u32, Option<u64>)]) -> Host {
        Host::deb12()
            .pci(
                func("0000:3b:00.0")
                    .driver("mlx5_core")
                    .group(40)
                    .vf_guids(guids),
            )
            .pci(
                func("0000:3b:00.1")
                    .driver("vfio-pci")
                    .vf_of("0000:3b:00.0")
                    .group(41),
            )
            .pci(
                func("0000:3b:00.2")
                    .driver("vfio-pci")
                    .vf_of("0000:3b:00.0")
                    .group(42),
            )
    }

    fn both_to_acme() -> Ten {
        Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:00.1", "acme")
            .assign("0000:3b:00.2", "acme")
    }

    #[test]
    fn guid_invalid_fires_on_zero_all_ones_and_unset() {
        let inv = ib_host(&[(0, Some(0)), (1, Some(G2))]).build();
        let f = check(&inv, &both_to_acme().build());
        let v = of(&f, IB_GUID_INVALID);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, "0000:3b:00.1");
        assert!(v[0].message.contains("port GUID is zero"));
        assert!(has_ev(
            v[0],
            "/sys/bus/pci/devices/0000:3b:00.0/sriov/0/port",
            "0x0000000000000000"
        ));

        // The PF exposes GUIDs, but not for VF 1: unset.
        let inv = ib_host(&[(0, Some(G1))]).build();
        let f = check(&inv, &both_to_acme().build());
        let v = of(&f, IB_GUID_INVALID);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, "0000:3b:00.2");
        assert!(has_ev(
            v[0],
            "/sys/bus/pci/devices/0000:3b:00.0/sriov/1/port",
            "(unset)"
        ));

        // An upstream VF bound on the host: its own port GUID is all ones.
        let inv = ib_host(&[])
            .ib("mlx5_3", "0000:3b:00.1", Some(u64::MAX), &[0x8001])
            .build();
        let f = check(&inv, &both_to_acme().build());
        let v = of(&f, IB_GUID_INVALID);
        assert_eq!(v.len(), 1);
        assert!(v[0].message.contains("all ones"));
        assert!(has_ev(
            v[0],
            "/sys/class/infiniband/mlx5_3/ports/1/gids/0",
            "0xffffffffffffffff"
        ));
    }

    #[test]
    fn guid_invalid_quiet_for_good_guids_and_non_ib_vfs() {
        let inv = ib_host(&[(0, Some(G1)), (1, Some(G2))]).build();
        assert!(check(&inv, &both_to_acme().build()).is_empty());
        // No OFED GUIDs and no IB device: Ethernet VFs, not IB.
        let inv = ib_host(&[]).build();
        assert!(check(&inv, &both_to_acme().build()).is_empty());
        // Zero GUID, but not assigned.
        let inv = ib_host(&[(0, Some(0)), (1, Some(G2))]).build();
        assert!(check(&inv, &Ten::new().build()).is_empty());
    }

    #[test]
    fn guid_duplicate_fires_across_functions() {
        let inv = ib_host(&[(0, Some(G1)), (1, Some(G1))]).build();
        let f = check(&inv, &Ten::new().build());
        let v = of(&f, IB_GUID_DUPLICATE);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, "0x0002c90300a1b201");
        assert_eq!(v[0].evidence.len(), 2);
        assert!(has_ev(
            v[0],
            "/sys/bus/pci/devices/0000:3b:00.0/sriov/1/port",
            "0x0002c90300a1b201"
        ));
        assert!(
            v[0].message
                .contains("on 2 functions (0000:3b:00.1, 0000:3b:00.2)")
        );

        // A PF port with the GUID of a VF.
        let inv = ib_host(&[(0, Some(G1)), (1, Some(G2))])
            .ib("mlx5_0", "0000:3b:00.0", Some(G2), &[0xffff])
            .build();
        let f = check(&inv, &Ten::new().build());
        assert_eq!(of(&f, IB_GUID_DUPLICATE).len(), 1);
    }

    #[test]
    fn guid_duplicate_quiet_for_one_function_seen_twice() {
        // The VF's OFED entry and its own IB port show the same GUID: one function.
        let inv = ib_host(&[(0, Some(G1)), (1, Some(G2))])
            .ib("mlx5_3", "0000:3b:00.1", Some(G1), &[0x8001])
            .build();
        assert!(check(&inv, &both_to_acme().build()).is_empty());
        // Unset GUIDs are not duplicates of each other.
        let inv = ib_host(&[(0, Some(0)), (1, Some(0))]).build();
        assert!(of(&check(&inv, &Ten::new().build()), IB_GUID_DUPLICATE).is_empty());
    }

    fn pkey_host(pkeys: &[u16]) -> Inventory {
        ib_host(&[(0, Some(G1)), (1, Some(G2))])
            .ib("mlx5_3", "0000:3b:00.1", Some(G1), pkeys)
            .build()
    }

    #[test]
    fn default_pkey_full_fires_from_tenancy_and_port() {
        let ten = Ten::new()
            .tenant("acme", None)
            .partition(0x7fff, Membership::Full)
            .assign("0000:3b:00.1", "acme")
            .build();
        let f = check(&pkey_host(&[0x8001]), &ten);
        let v = of(&f, IB_DEFAULT_PKEY_FULL);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, "0000:3b:00.1");
        assert!(has_ev(
            v[0],
            "tenancy:tenant[0].partitions[0]",
            "0x7fff full"
        ));

        let ten = Ten::new()
            .tenant("acme", None)
            .partition(0x8001, Membership::Full)
            .assign("0x0002c90300a1b201", "acme")
            .build();
        let f = check(&pkey_host(&[0xffff, 0x8001]), &ten);
        let v = of(&f, IB_DEFAULT_PKEY_FULL);
        assert_eq!(v.len(), 1);
        assert!(has_ev(
            v[0],
            "/sys/class/infiniband/mlx5_3/ports/1/pkeys/0",
            "0xffff"
        ));
        assert!(has_ev(
            v[0],
            "tenancy:assignment[0]",
            "acme: 0x0002c90300a1b201 (0000:3b:00.1)"
        ));
    }

    #[test]
    fn default_pkey_full_quiet_for_limited_membership() {
        let ten = Ten::new()
            .tenant("acme", None)
            .partition(0x7fff, Membership::Limited)
            .partition(0x8001, Membership::Full)
            .assign("0000:3b:00.1", "acme")
            .build();
        assert!(check(&pkey_host(&[0x7fff, 0x8001]), &ten).is_empty());
    }
}
