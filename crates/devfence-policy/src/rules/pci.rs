//! PCI function rules: PF custody, the VF-token cdev hole, reset.

use std::collections::{BTreeMap, HashMap};

use devfence_model::{Assignment, Bdf, Evidence, Finding, Severity, VfioNode, VfioNodeKind};

use super::{PF_TRUST, RESET_UNAVAILABLE, VF_TOKEN_KERNEL, finding, osrelease_evidence};
use crate::ctx::{Ctx, Held, Unit};
use crate::kernel::KernelVersion;
use crate::{LIST_CAP, capped_evidence, capped_list, paths};

/// First kernel with the per-device cdev (`/dev/vfio/devices/vfioX`).
const CDEV_SINCE: KernelVersion = KernelVersion::new(6, 6);
/// First kernel whose cdev `BIND_IOMMUFD` checks the VF token.
const CDEV_TOKEN_FIXED: KernelVersion = KernelVersion::new(6, 17);

/// The held PCI functions, each with the assignments holding it.
fn held_pci<'c, 'a>(ctx: &'c Ctx<'a>) -> BTreeMap<Bdf, Vec<&'c Held<'a>>> {
    let mut map: BTreeMap<Bdf, Vec<&Held<'_>>> = BTreeMap::new();
    for h in &ctx.held {
        for unit in &h.units {
            if let Unit::Pci(b) = unit {
                map.entry(*b).or_default().push(h);
            }
        }
    }
    map
}

/// `PF-TRUST`.
pub(crate) fn pf_trust(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let mut custody: HashMap<Bdf, (usize, &Assignment)> = HashMap::new();
    for (k, u) in ctx.ten.userspace_pfs.iter().enumerate() {
        if let devfence_model::DeviceId::Pci(b) = u.device {
            custody.entry(b).or_insert((k, u));
        }
    }
    let enable_sriov = ctx.inv.vfio_pci.as_ref().and_then(|p| p.enable_sriov);
    let mut undeclared: BTreeMap<Bdf, Vec<(&Held<'_>, Bdf)>> = BTreeMap::new();

    for (vf, holders) in held_pci(ctx) {
        let Some(pf) = ctx.pci(vf).and_then(|f| f.physfn) else {
            continue;
        };
        match custody.get(&pf) {
            Some(&(k, c)) => {
                let foreign: Vec<_> = holders.iter().filter(|h| h.tenant() != &c.tenant).collect();
                if foreign.is_empty() {
                    continue;
                }
                let mut ev = Vec::new();
                for h in &foreign {
                    ev.push(ctx.assignment_evidence(h, Unit::Pci(vf)));
                }
                ev.push(Evidence::new(paths::pci(vf, "physfn"), pf.to_string()));
                ev.push(Evidence::new(
                    format!("tenancy:userspace_pf[{k}]"),
                    format!("{}: {pf}", c.tenant),
                ));
                let holders = foreign
                    .iter()
                    .map(|h| h.tenant().as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                out.push(finding(
                    PF_TRUST,
                    Severity::Error,
                    vf.to_string(),
                    format!(
                        "VF {vf} is assigned to {holders}, but its PF {pf} is driven from user \
                         space on behalf of {}, which can reset and observe its VFs.",
                        c.tenant
                    ),
                    ev,
                    format!(
                        "Assign the VFs of a user-space PF only to its custodian ({}); give \
                         {holders} a VF of another PF.",
                        c.tenant
                    ),
                ));
            }
            None => {
                // devfence's own custody (its ledger): it set the VF token itself.
                if ctx
                    .ten
                    .host_custody
                    .contains(&devfence_model::DeviceId::Pci(pf))
                {
                    continue;
                }
                let Some(pf_fn) = ctx.pci(pf) else { continue };
                let on_vfio = pf_fn
                    .driver
                    .as_deref()
                    .is_some_and(|d| d.ends_with("vfio-pci") || d.ends_with("vfio_pci"));
                if on_vfio && enable_sriov != Some(false) {
                    let e = undeclared.entry(pf).or_default();
                    e.extend(holders.iter().map(|h| (*h, vf)));
                }
            }
        }
    }

    for (pf, vfs) in undeclared {
        let driver = ctx
            .pci(pf)
            .and_then(|f| f.driver.clone())
            .unwrap_or_default();
        let sriov = match enable_sriov {
            Some(true) => "Y",
            Some(false) => "N",
            None => "(unknown)",
        };
        let mut ev = vec![
            Evidence::new(paths::pci(pf, "driver"), driver.clone()),
            Evidence::new(paths::ENABLE_SRIOV, sriov),
        ];
        let mut names: Vec<Bdf> = vfs.iter().map(|(_, b)| *b).collect();
        names.dedup();
        for (h, vf) in &vfs {
            ev.push(ctx.assignment_evidence(h, Unit::Pci(*vf)));
        }
        out.push(finding(
            PF_TRUST,
            Severity::Error,
            pf.to_string(),
            format!(
                "PF {pf} is driven from user space ({driver}, enable_sriov {sriov}) and {} of \
                 its VFs {} assigned ({}), but no userspace_pf entry declares whose custody it \
                 is in.",
                names.len(),
                if names.len() == 1 { "is" } else { "are" },
                capped_list(&names)
            ),
            capped_evidence(ev, "tenancy:assignment"),
            format!(
                "Declare the PF's custodian ([[userspace_pf]] device = \"{pf}\", tenant = …) so \
                 its VF token is set for that tenant only, or bind the PF to its host driver."
            ),
        ));
    }
}

/// `VF-TOKEN-KERNEL`.
pub(crate) fn vf_token_kernel(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let nodes: Vec<_> = ctx
        .inv
        .vfio_nodes
        .iter()
        .filter(|n| matches!(n.kind, VfioNodeKind::Device(_)))
        .collect();
    if nodes.is_empty() {
        return;
    }
    let vulnerable = match ctx.kernel {
        Some(k) if (CDEV_SINCE..CDEV_TOKEN_FIXED).contains(&k) => Some(k),
        Some(_) => return,
        None => None,
    };
    let (open, closed): (Vec<&VfioNode>, Vec<&VfioNode>) = nodes
        .iter()
        .partition(|n| n.uid != 0 || n.mode & 0o077 != 0);
    let mut ev = vec![osrelease_evidence(ctx)];
    ev.extend(open.iter().chain(closed.iter()).take(LIST_CAP).map(|n| {
        Evidence::new(
            n.path.clone(),
            format!("uid {} gid {} mode {:04o}", n.uid, n.gid, n.mode & 0o7777),
        )
    }));
    if nodes.len() > LIST_CAP {
        ev.push(Evidence::new(
            "/dev/vfio/devices",
            format!("(and {} more)", nodes.len() - LIST_CAP),
        ));
    }
    let (severity, message) = match vulnerable {
        Some(k) if !open.is_empty() => (
            Severity::Error,
            format!(
                "Kernel {k} serves {} per-device VFIO nodes, and its cdev open path does not \
                 check VF tokens; {} of them can be opened by users other than root.",
                nodes.len(),
                open.len()
            ),
        ),
        Some(k) => (
            Severity::Warning,
            format!(
                "Kernel {k} serves {} per-device VFIO nodes, and its cdev open path does not \
                 check VF tokens; all are root-only, which contains it.",
                nodes.len()
            ),
        ),
        None => (
            Severity::Warning,
            format!(
                "The kernel release is unknown and {} per-device VFIO nodes exist; kernels 6.6 \
                 to 6.16 do not check VF tokens on them.",
                nodes.len()
            ),
        ),
    };
    out.push(finding(
        VF_TOKEN_KERNEL,
        severity,
        "/dev/vfio/devices",
        message,
        ev,
        "Keep /dev/vfio/devices/* owned by root with mode 0600 and hand VFs to VMs through the \
         group path with a vf-token, or upgrade to a kernel that checks the token on \
         BIND_IOMMUFD (6.17 or later; 6.18 for token pointers).",
    ));
}

/// `RESET-UNAVAILABLE`.
pub(crate) fn reset_unavailable(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    for (b, holders) in held_pci(ctx) {
        let Some(f) = ctx.pci(b) else { continue };
        if f.has_reset {
            continue;
        }
        let methods = if f.reset_methods.is_empty() {
            "(empty)".to_string()
        } else {
            f.reset_methods.join(" ")
        };
        let mut ev = vec![
            Evidence::new(paths::pci(b, "reset"), "(absent)"),
            Evidence::new(paths::pci(b, "reset_method"), methods),
        ];
        ev.extend(
            holders
                .iter()
                .map(|h| ctx.assignment_evidence(h, Unit::Pci(b))),
        );
        out.push(finding(
            RESET_UNAVAILABLE,
            Severity::Error,
            b.to_string(),
            format!(
                "{b} is assigned but has no reset method, so it cannot be scrubbed before the \
                 next tenant."
            ),
            ev,
            "Keep this function with one tenant for good, or power-cycle its slot \
             (/sys/bus/pci/slots/<n>/power) between tenants; if reset_method was emptied by a \
             write, write `default` to it.",
        ));
    }
}

#[cfg(test)]
mod tests {
    use devfence_model::Severity;

    use crate::check;
    use crate::rules::{PF_TRUST, RESET_UNAVAILABLE, VF_TOKEN_KERNEL};
    use crate::testsupport::*;

    fn upf_host(pf_driver: &str, enable_sriov: Option<bool>) -> devfence_model::Inventory {
        Host::deb12()
            .enable_sriov(enable_sriov)
            .pci(func("0000:3b:00.0").driver(pf_driver).group(40))
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
            .build()
    }

    #[test]
    fn pf_trust_fires_on_a_vf_given_to_another_tenant() {
        let ten = Ten::new()
            .tenant("acme", None)
            .tenant("globex", None)
            .upf("0000:3b:00.0", "acme")
            .assign("0000:3b:00.1", "acme")
            .assign("0000:3b:00.2", "globex")
            .build();
        let f = check(&upf_host("vfio-pci", Some(true)), &ten);
        let v = of(&f, PF_TRUST);
        assert_eq!(v.len(), 1, "{f:#?}");
        assert_eq!(v[0].subject, "0000:3b:00.2");
        assert!(has_ev(
            v[0],
            "/sys/bus/pci/devices/0000:3b:00.2/physfn",
            "0000:3b:00.0"
        ));
        assert!(has_ev(
            v[0],
            "tenancy:userspace_pf[0]",
            "acme: 0000:3b:00.0"
        ));
        assert!(has_ev(
            v[0],
            "tenancy:assignment[1]",
            "globex: 0000:3b:00.2"
        ));
    }

    #[test]
    fn pf_trust_quiet_when_vfs_stay_with_the_custodian() {
        let ten = Ten::new()
            .tenant("acme", None)
            .upf("0000:3b:00.0", "acme")
            .assign("0000:3b:00.1", "acme")
            .assign("0000:3b:00.2", "acme")
            .build();
        assert!(check(&upf_host("vfio-pci", Some(true)), &ten).is_empty());
    }

    #[test]
    fn pf_trust_fires_on_undeclared_custody() {
        let ten = Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:00.1", "acme")
            .assign("0000:3b:00.2", "acme")
            .build();
        let f = check(&upf_host("vfio-pci", Some(true)), &ten);
        let v = of(&f, PF_TRUST);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, "0000:3b:00.0");
        assert!(has_ev(
            v[0],
            "/sys/bus/pci/devices/0000:3b:00.0/driver",
            "vfio-pci"
        ));
        assert!(has_ev(
            v[0],
            "/sys/module/vfio_pci/parameters/enable_sriov",
            "Y"
        ));
        assert!(
            v[0].message
                .contains("2 of its VFs are assigned (0000:3b:00.1, 0000:3b:00.2)")
        );
        // Unknown enable_sriov fails closed; a variant driver counts as vfio-pci.
        assert_eq!(
            of(&check(&upf_host("vfio-pci", None), &ten), PF_TRUST).len(),
            1
        );
        assert_eq!(
            of(
                &check(&upf_host("mlx5_vfio_pci", Some(true)), &ten),
                PF_TRUST
            )
            .len(),
            1
        );
        // enable_sriov=N or a PF on its host driver: no user-space PF.
        assert!(check(&upf_host("vfio-pci", Some(false)), &ten).is_empty());
        assert!(check(&upf_host("mlx5_core", Some(true)), &ten).is_empty());
        // issue 18 item 12: devfence's own custody (its ledger says it set the VF
        // token of this PF) is custody declared.
        let mut own = ten.clone();
        own.host_custody = vec!["0000:3b:00.0".parse().unwrap()];
        assert!(of(&check(&upf_host("vfio-pci", Some(true)), &own), PF_TRUST).is_empty());
        let mut other = ten;
        other.host_custody = vec!["0000:5e:00.0".parse().unwrap()];
        assert_eq!(
            of(&check(&upf_host("vfio-pci", Some(true)), &other), PF_TRUST).len(),
            1
        );
    }

    fn token_host(kernel: Option<&str>, uid: u32, mode: u32) -> devfence_model::Inventory {
        Host::new(kernel)
            .pci(
                func("0000:3b:00.1")
                    .driver("vfio-pci")
                    .group(41)
                    .vfio_dev("vfio0"),
            )
            .dev_node("vfio0", uid, mode)
            .build()
    }

    #[test]
    fn vf_token_kernel_knows_the_6_6_to_6_16_window() {
        let ten = Ten::new().build();
        for (kernel, want) in [
            ("6.5.13", None),
            ("6.6.0", Some(Severity::Error)),
            ("6.12.9+deb13-amd64", Some(Severity::Error)),
            ("6.16.12", Some(Severity::Error)),
            ("6.17.0", None),
            ("6.18.1", None),
        ] {
            let f = check(&token_host(Some(kernel), 107, 0o600), &ten);
            let got = of(&f, VF_TOKEN_KERNEL).first().map(|x| x.severity);
            assert_eq!(got, want, "{kernel}");
        }
        let f = check(&token_host(Some("6.12.9"), 107, 0o600), &ten);
        let v = of(&f, VF_TOKEN_KERNEL)[0];
        assert_eq!(v.subject, "/dev/vfio/devices");
        assert!(has_ev(v, "/proc/sys/kernel/osrelease", "6.12.9"));
        assert!(has_ev(
            v,
            "/dev/vfio/devices/vfio0",
            "uid 107 gid 107 mode 0600"
        ));
        assert!(v.hint.contains("0600"));
    }

    #[test]
    fn vf_token_kernel_root_only_and_unknown_are_warnings() {
        let ten = Ten::new().build();
        let f = check(&token_host(Some("6.12.9"), 0, 0o600), &ten);
        assert_eq!(of(&f, VF_TOKEN_KERNEL)[0].severity, Severity::Warning);
        let f = check(&token_host(Some("6.12.9"), 0, 0o660), &ten);
        assert_eq!(of(&f, VF_TOKEN_KERNEL)[0].severity, Severity::Error);
        let f = check(&token_host(None, 107, 0o600), &ten);
        let v = of(&f, VF_TOKEN_KERNEL)[0];
        assert_eq!(v.severity, Severity::Warning);
        assert!(has_ev(v, "/proc/sys/kernel/osrelease", "(unknown)"));
        // No per-device nodes: nothing to say.
        let inv = Host::new(Some("6.12.9"))
            .pci(func("0000:3b:00.1").driver("vfio-pci").group(41))
            .group_node(41, 0, 0o600)
            .build();
        assert!(check(&inv, &ten).is_empty());
    }

    #[test]
    fn reset_unavailable() {
        let inv = Host::deb12()
            .pci(func("0000:3b:00.1").driver("vfio-pci").group(41).no_reset())
            .pci(func("0000:3b:00.2").driver("vfio-pci").group(42))
            .pci(func("0000:3b:00.3").driver("vfio-pci").group(43).no_reset())
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:00.1", "acme")
            .assign("0000:3b:00.2", "acme")
            .build();
        let f = check(&inv, &ten);
        let v = of(&f, RESET_UNAVAILABLE);
        assert_eq!(v.len(), 1, "only the assigned function without reset");
        assert_eq!(v[0].subject, "0000:3b:00.1");
        assert!(has_ev(
            v[0],
            "/sys/bus/pci/devices/0000:3b:00.1/reset",
            "(absent)"
        ));
        assert!(has_ev(
            v[0],
            "/sys/bus/pci/devices/0000:3b:00.1/reset_method",
            "(empty)"
        ));
        assert!(has_ev(v[0], "tenancy:assignment[0]", "acme: 0000:3b:00.1"));
    }
}
