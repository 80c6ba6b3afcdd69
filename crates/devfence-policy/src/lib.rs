//! devfence's isolation rules: an inventory and a tenancy in, findings out.
//!
//! A hypervisor host hands passthrough devices to the VMs of different tenants:
//! PCI functions (PFs, SR-IOV VFs), mediated devices, s390 AP queues and
//! InfiniBand VFs. Whether tenants are really isolated depends on kernel state —
//! which drivers sit in an IOMMU group, who owns `/dev/vfio/<N>`, which AP queues
//! the host can still use, which GUIDs and P_Keys a VF carries — and on who holds
//! what. [`check`] takes the host as read ([`Inventory`]) and the declaration of who
//! holds what ([`Tenancy`], loaded with [`load_tenancy`]) and reports every breach
//! as a [`Finding`] naming the rule, the subject, the paths and values that show
//! it, and a hint. [`RULES`] documents each rule.
//!
//! Principles: unknown or unreadable state fails closed (an error, not silence);
//! the same input always gives the same findings in the same order.

mod ctx;
mod kernel;
mod paths;
mod rules;
mod tenancy;
#[cfg(test)]
mod testsupport;

use devfence_model::{Evidence, Finding, Inventory, Severity, Tenancy};

pub use tenancy::{
    Entry, Invalid, MAX_TENANCY_BYTES, Problem, TenancyError, fuzz_tenancy, load_tenancy,
    load_tenancy_to_check, parse_tenancy, parse_tenancy_to_check,
};

/// Documentation of one rule, for `devfence rules` and the docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RuleInfo {
    /// The rule id findings carry, e.g. `GRP-VIABLE`.
    pub id: &'static str,
    /// The severity of its findings (the highest, for rules that also report
    /// a lower one; the summary says when).
    pub severity: Severity,
    /// What it checks, in one or two sentences.
    pub summary: &'static str,
}

/// Every rule [`check`] runs, in the order of the docs.
pub const RULES: &[RuleInfo] = &[
    RuleInfo {
        id: rules::TENANCY_UNKNOWN_DEVICE,
        severity: Severity::Error,
        summary: "The tenancy assigns (or gives PF custody of) a device the host does not have: \
                  a BDF, mdev UUID, APQN or IB GUID that resolves to nothing.",
    },
    RuleInfo {
        id: rules::TENANCY_PKEY_SHARED,
        severity: Severity::Error,
        summary: "Two or more tenants are given one partition (the same 15-bit P_Key, in any \
                  membership): their ports can reach each other. The default partition is \
                  IB-DEFAULT-PKEY-FULL's.",
    },
    RuleInfo {
        id: rules::TENANCY_LAUNCHER_SHARED,
        severity: Severity::Error,
        summary: "Two or more tenants are given one launcher uid: each owns the others' \
                  /dev/vfio nodes.",
    },
    RuleInfo {
        id: rules::INV_UNREADABLE,
        severity: Severity::Error,
        summary: "An attribute could not be read or parsed. Error when it belongs to an assigned \
                  device, a member of its IOMMU group, its PF or its IB device (fail closed); \
                  warning otherwise.",
    },
    RuleInfo {
        id: rules::GRP_VIABLE,
        severity: Severity::Error,
        summary: "An IOMMU group holding an assigned device has a member on a driver that does \
                  not manage its own DMA (allowed: no driver, vfio-pci and its variants, \
                  vfio-platform, pci-stub, pcieport; before 5.19 any bridge, and pcieport only \
                  on bridges), or the assigned device has no IOMMU group.",
    },
    RuleInfo {
        id: rules::GRP_ONE_TENANT,
        severity: Severity::Error,
        summary: "Assigned members of one IOMMU group, or mdevs of one non-isolating parent, \
                  belong to more than one tenant.",
    },
    RuleInfo {
        id: rules::GRP_NODE_OWNER,
        severity: Severity::Error,
        summary: "A tenant's /dev/vfio/<N> or /dev/vfio/devices/vfioX node is not owned by its \
                  launcher uid, is group- or world-accessible, or carries a SELinux label that \
                  differs from the group's other nodes or the tenant's label.",
    },
    RuleInfo {
        id: rules::PF_TRUST,
        severity: Severity::Error,
        summary: "A VF is assigned to a tenant other than the custodian of its user-space PF, \
                  or a PF on vfio-pci (enable_sriov not N) has VFs assigned while no \
                  userspace_pf entry declares its custody.",
    },
    RuleInfo {
        id: rules::VF_TOKEN_KERNEL,
        severity: Severity::Error,
        summary: "Per-device nodes /dev/vfio/devices/* exist on a kernel from 6.6 to 6.16, whose \
                  cdev path does not check VF tokens. Warning when every node is root-only \
                  (uid 0, no group/other bits) or the kernel release is unknown.",
    },
    RuleInfo {
        id: rules::AP_HOST_GUEST,
        severity: Severity::Error,
        summary: "An APQN in a matrix mdev is also usable by the host (adapter in apmask and \
                  domain in aqmask), or the masks are unreadable while matrix mdevs exist.",
    },
    RuleInfo {
        id: rules::AP_OVERLAP,
        severity: Severity::Error,
        summary: "Two matrix mdevs share APQNs (one finding per pair of mdevs).",
    },
    RuleInfo {
        id: rules::AP_GUEST_DRIFT,
        severity: Severity::Warning,
        summary: "A matrix mdev's guest_matrix lacks APQNs of its matrix: the queue is not on \
                  the host (over-provisioned), is not bound to vfio_ap, or its adapter was left \
                  out because another queue of it is not bound.",
    },
    RuleInfo {
        id: rules::IB_GUID_INVALID,
        severity: Severity::Error,
        summary: "An assigned IB VF has a zero, all-ones or unset port GUID.",
    },
    RuleInfo {
        id: rules::IB_GUID_DUPLICATE,
        severity: Severity::Error,
        summary: "The same port GUID is on two or more PCI functions (VFs or IB ports).",
    },
    RuleInfo {
        id: rules::IB_DEFAULT_PKEY_FULL,
        severity: Severity::Error,
        summary: "An assigned IB VF has full membership of the default partition: its tenant \
                  declares 0x7fff full, or its port's P_Key table holds 0xffff.",
    },
    RuleInfo {
        id: rules::RESET_UNAVAILABLE,
        severity: Severity::Error,
        summary: "An assigned PCI function has no reset method, so it cannot be scrubbed \
                  between tenants.",
    },
];

/// Runs every rule in [`RULES`] on `inv` for `tenancy` and returns the findings,
/// sorted by severity (errors first), then rule id, then subject (numbers inside
/// subjects compare as numbers: `iommu_group 2` before `iommu_group 13`), then
/// message and evidence.
#[must_use]
pub fn check(inv: &Inventory, tenancy: &Tenancy) -> Vec<Finding> {
    let ctx = ctx::Ctx::new(inv, tenancy);
    let mut out = Vec::new();
    rules::run_all(&ctx, &mut out);
    sort_findings(out)
}

/// The order of [`check`]'s output. Subject keys are computed once per finding.
fn sort_findings(findings: Vec<Finding>) -> Vec<Finding> {
    // The order is that of the subjects' text (as they print), as always.
    let texts: Vec<String> = findings.iter().map(|f| f.subject.to_string()).collect();
    let keys: Vec<SubjectKey<'_>> = texts.iter().map(|t| subject_key(t)).collect();
    let mut order: Vec<usize> = (0..findings.len()).collect();
    order.sort_by(|&i, &j| {
        let (a, b) = (&findings[i], &findings[j]);
        b.severity
            .cmp(&a.severity)
            .then_with(|| a.rule.cmp(&b.rule))
            .then_with(|| keys[i].cmp(&keys[j]))
            .then_with(|| a.message.cmp(&b.message))
            .then_with(|| {
                let ev = |f: &Finding| -> Vec<(String, String)> {
                    f.evidence
                        .iter()
                        .map(|e| (e.path.clone(), e.value.clone()))
                        .collect()
                };
                ev(a).cmp(&ev(b))
            })
            .then_with(|| a.hint.cmp(&b.hint))
    });
    let mut slots: Vec<Option<Finding>> = findings.into_iter().map(Some).collect();
    let mut out: Vec<Finding> = order.iter().filter_map(|&i| slots[i].take()).collect();
    out.dedup();
    out
}

/// How a subject sorts: device names (BDF, mdev UUID, APQN, GUID) first, in
/// their own order; then everything else in natural order, where digit runs
/// compare as numbers. Ties fall back to plain text order, so the order is total.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct SubjectKey<'a> {
    is_other: bool,
    device: Option<devfence_model::DeviceId>,
    tokens: Vec<Token<'a>>,
    text: &'a str,
}

fn subject_key(s: &str) -> SubjectKey<'_> {
    match s.parse::<devfence_model::DeviceId>() {
        Ok(d) => SubjectKey {
            is_other: false,
            device: Some(d),
            tokens: Vec::new(),
            text: s,
        },
        Err(_) => SubjectKey {
            is_other: true,
            device: None,
            tokens: tokens(s),
            text: s,
        },
    }
}

/// A token of a subject for natural ordering: a run of digits or of other
/// characters.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Token<'a> {
    /// Digits with leading zeros removed: shorter is smaller, then by text.
    Num(usize, &'a str),
    /// Anything else.
    Text(&'a str),
}

fn tokens(s: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        let digit = c.is_ascii_digit();
        let len = rest
            .char_indices()
            .find(|(_, ch)| ch.is_ascii_digit() != digit)
            .map_or(rest.len(), |(i, _)| i);
        let (tok, tail) = rest.split_at(len);
        if digit {
            let t = tok.trim_start_matches('0');
            out.push(Token::Num(t.len(), t));
        } else {
            out.push(Token::Text(tok));
        }
        rest = tail;
    }
    out
}

#[cfg(test)]
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    subject_key(a).cmp(&subject_key(b))
}

/// At most this many items are listed in one evidence value or one list of
/// evidence items; the rest are counted.
pub(crate) const LIST_CAP: usize = 32;

/// Joins up to [`LIST_CAP`] items with `, ` and counts the rest.
pub(crate) fn capped_list<T: std::fmt::Display>(items: &[T]) -> String {
    list_of_total(items, items.len())
}

/// Joins up to [`LIST_CAP`] of `shown` with `, ` and counts the rest of `total`
/// items (for lists too long to build in full).
pub(crate) fn list_of_total<T: std::fmt::Display>(shown: &[T], total: usize) -> String {
    let shown = shown.get(..LIST_CAP.min(shown.len())).unwrap_or_default();
    let mut s = shown
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if total > shown.len() {
        s.push_str(&format!(" and {} more", total - shown.len()));
    }
    s
}

/// Keeps at most [`LIST_CAP`] evidence items from `items`, adding one that counts
/// the rest under `what`.
pub(crate) fn capped_evidence(mut items: Vec<Evidence>, what: &str) -> Vec<Evidence> {
    if items.len() > LIST_CAP {
        let more = items.len() - LIST_CAP;
        items.truncate(LIST_CAP);
        items.push(Evidence::new(what, format!("(and {more} more)")));
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testsupport::*;

    #[test]
    fn findings_sorted_by_severity_rule_subject() {
        let inv = Host::new(Some("6.12.9"))
            .pci(func("0000:3b:00.0").driver("mlx5_core").group(13))
            .pci(func("0000:3b:00.2").driver("vfio-pci").group(13).no_reset())
            .pci(func("0000:3b:01.0").driver("vfio-pci").group(2).no_reset())
            .pci(
                func("0000:5e:00.0")
                    .driver("vfio-pci")
                    .group(3)
                    .vfio_dev("vfio0"),
            )
            .dev_node("vfio0", 0, 0o600)
            .problem(
                Some("0000:5e:00.0"),
                "/sys/bus/pci/devices/0000:5e:00.0/numa_node",
            )
            .build();
        let ten = Ten::new()
            .tenant("acme", None)
            .assign("0000:3b:01.0", "acme")
            .assign("0000:3b:00.2", "acme")
            .build();
        let f = check(&inv, &ten);
        let subjects: Vec<String> = f.iter().map(|x| x.subject.to_string()).collect();
        let got: Vec<(&str, Severity, &str)> = f
            .iter()
            .zip(&subjects)
            .map(|(x, s)| (x.rule.as_str(), x.severity, s.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("GRP-VIABLE", Severity::Error, "iommu_group 13"),
                ("RESET-UNAVAILABLE", Severity::Error, "0000:3b:00.2"),
                ("RESET-UNAVAILABLE", Severity::Error, "0000:3b:01.0"),
                ("INV-UNREADABLE", Severity::Warning, "0000:5e:00.0"),
                ("VF-TOKEN-KERNEL", Severity::Warning, "/dev/vfio/devices"),
            ]
        );
        // Same input, same output; the input order of the inventory does not matter.
        assert_eq!(check(&inv, &ten), f);
        let mut shuffled = inv.clone();
        shuffled.pci.reverse();
        shuffled.iommu_groups.reverse();
        assert_eq!(check(&shuffled, &ten), f);
        // Every rule that fired is documented.
        assert!(f.iter().all(|x| RULES.iter().any(|r| r.id == x.rule)));
    }

    #[test]
    fn odd_inventories_do_not_panic() {
        let mut inv = Host::new(Some("5.4.0"))
            .pci(
                func("0000:3b:00.1")
                    .driver("vfio-pci")
                    .group(13)
                    .vf_of("0000:3b:00.0"),
            )
            .pci(func("0000:3b:00.0").driver("vfio-pci").vf_guids(&[
                (0, None),
                (0, Some(1)),
                (7, Some(1)),
            ]))
            .ib("mlx5_9", "0000:3b:00.1", None, &[0xffff, 0x0000])
            .member(13, "")
            .ap(
                None,
                None,
                &[("ff.00ff", "vfio_ap")],
                vec![matrix(1, &[255, 255, 0], &[255]), matrix(1, &[], &[])],
            )
            .build();
        inv.iommu_groups.push(inv.iommu_groups[0].clone());
        let port = inv.ib[0].ports[0].clone();
        inv.ib[0].ports.push(port);
        if let Some(ap) = &mut inv.ap {
            ap.matrix_mdevs[1].guest_matrix = Some(devfence_model::ApMatrix {
                adapters: vec![255, 1, 1],
                domains: vec![255, 0],
            });
        }
        let ten = Ten::new()
            .tenant("acme", Some(0))
            .assign("0000:3b:00.1", "acme")
            .assign("ff.00ff", "acme")
            .assign("0x0000000000000001", "acme")
            .upf("05.0012", "acme")
            .parent("")
            .build();
        let f = check(&inv, &ten);
        assert!(!f.is_empty());
        let _ = check(&devfence_model::Inventory::default(), &ten);
    }

    #[test]
    fn tenancy_mutations_never_panic() {
        let seed = "[[tenant]]\nid = \"acme\"\nlauncher_uid = 107\npartitions = [{ pkey = \"0x8001\", membership = \"full\" }]\n[[assignment]]\ndevice = \"0000:3b:00.2\"\ntenant = \"acme\"\n[[userspace_pf]]\ndevice = \"0000:3b:00.0\"\ntenant = \"acme\"\n[[non_isolating_parent]]\ndevice = \"0000:af:00.0\"\n";
        let bytes = seed.as_bytes();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"[]{}=\",.\n 0123456789abcdefx:-#\\\xff";
        for _ in 0..3000 {
            let mut v = bytes.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() as usize) % (v.len() + 1);
                match next() % 3 {
                    0 if pos < v.len() => {
                        v.remove(pos);
                    }
                    1 if pos < v.len() => {
                        v[pos] = alphabet[(next() as usize) % alphabet.len()];
                    }
                    _ => v.insert(pos, alphabet[(next() as usize) % alphabet.len()]),
                }
            }
            fuzz_tenancy(&v);
        }
    }

    #[test]
    fn natural_order_is_total_and_numeric() {
        let mut v = vec![
            "iommu_group 13",
            "iommu_group 2",
            "0000:3b:00.1",
            "0000:3b:00.2",
            "iommu_group 02",
            "0000:2a:00.0",
            "0000:10:00.0",
            "",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "0000:10:00.0",
                "0000:2a:00.0",
                "0000:3b:00.1",
                "0000:3b:00.2",
                "",
                "iommu_group 02",
                "iommu_group 2",
                "iommu_group 13"
            ]
        );
    }

    #[test]
    fn rules_are_documented_once() {
        let mut ids: Vec<_> = RULES.iter().map(|r| r.id).collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n);
        assert!(RULES.iter().all(|r| !r.summary.is_empty()));
    }

    #[test]
    fn capped_lists() {
        let v: Vec<u32> = (0..40).collect();
        assert!(capped_list(&v).ends_with("31 and 8 more"));
        assert_eq!(capped_list(&[1, 2]), "1, 2");
        let ev = (0..40).map(|i| Evidence::new(i.to_string(), "x")).collect();
        let ev = capped_evidence(ev, "/dev/vfio/devices");
        assert_eq!(ev.len(), LIST_CAP + 1);
        assert_eq!(ev[LIST_CAP].value, "(and 8 more)");
    }
}
