//! s390 AP rules: host/guest separation, overlapping matrix mdevs, matrix drift.

use devfence_model::{ApMask, ApMatrix, ApMatrixMdev, Apqn, Evidence, Finding, Severity};

use super::{AP_GUEST_DRIFT, AP_HOST_GUEST, AP_OVERLAP, finding};
use crate::ctx::Ctx;
use crate::{LIST_CAP, capped_evidence, capped_list, list_of_total, paths};

/// A set of 256 AP ids (adapters or domains).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Ids([u64; 4]);

impl Ids {
    fn from_ids(ids: &[u8]) -> Self {
        let mut s = Self::default();
        for &i in ids {
            s.0[usize::from(i / 64)] |= 1 << (i % 64);
        }
        s
    }
    fn from_mask(m: &ApMask) -> Self {
        let mut s = Self::default();
        for i in m.iter() {
            s.0[usize::from(i / 64)] |= 1 << (i % 64);
        }
        s
    }
    fn and(self, o: Self) -> Self {
        Self([
            self.0[0] & o.0[0],
            self.0[1] & o.0[1],
            self.0[2] & o.0[2],
            self.0[3] & o.0[3],
        ])
    }
    fn is_empty(self) -> bool {
        self.0 == [0; 4]
    }
    fn contains(self, i: u8) -> bool {
        self.0[usize::from(i / 64)] & (1 << (i % 64)) != 0
    }
    fn ids(self) -> impl Iterator<Item = u8> {
        (0..=255u8).filter(move |&i| self.contains(i))
    }
    fn len(self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// The APQNs of adapters × domains, in order.
fn cross(adapters: Ids, domains: Ids) -> Vec<Apqn> {
    cross_iter(adapters, domains).collect()
}

fn cross_iter(adapters: Ids, domains: Ids) -> impl Iterator<Item = Apqn> {
    adapters.ids().flat_map(move |a| {
        domains.ids().map(move |d| Apqn {
            adapter: a,
            domain: d,
        })
    })
}

/// The first [`LIST_CAP`] APQNs of adapters × domains, and how many there are.
fn cross_capped(adapters: Ids, domains: Ids) -> (Vec<Apqn>, usize) {
    (
        cross_iter(adapters, domains).take(LIST_CAP).collect(),
        adapters.len() * domains.len(),
    )
}

/// `adapters 05, 06; domains 0012 (2 APQNs)`.
fn summary(m: &ApMatrix) -> String {
    let a: Vec<String> = m.adapters.iter().map(|a| format!("{a:02x}")).collect();
    let d: Vec<String> = m.domains.iter().map(|d| format!("{d:04x}")).collect();
    let n = a.len() * d.len();
    format!(
        "adapters {}; domains {} ({n} APQN{})",
        if a.is_empty() {
            "(none)".into()
        } else {
            capped_list(&a)
        },
        if d.is_empty() {
            "(none)".into()
        } else {
            capped_list(&d)
        },
        if n == 1 { "" } else { "s" }
    )
}

fn mask_value(m: Option<&ApMask>) -> String {
    m.map_or_else(|| "(unreadable)".to_string(), ToString::to_string)
}

/// Matrix mdevs with at least one APQN in their matrix, by UUID.
fn populated(mdevs: &[ApMatrixMdev]) -> Vec<(&ApMatrixMdev, &ApMatrix)> {
    let mut v: Vec<_> = mdevs
        .iter()
        .filter_map(|m| m.matrix.as_ref().map(|x| (m, x)))
        .filter(|(_, x)| !x.adapters.is_empty() && !x.domains.is_empty())
        .collect();
    v.sort_by_key(|(m, _)| m.uuid);
    v
}

/// `AP-HOST-GUEST`.
pub(crate) fn host_guest(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let Some(ap) = &ctx.inv.ap else { return };
    let mdevs = populated(&ap.matrix_mdevs);
    if mdevs.is_empty() {
        return;
    }
    let masks = (
        Evidence::new(paths::APMASK, mask_value(ap.apmask.as_ref())),
        Evidence::new(paths::AQMASK, mask_value(ap.aqmask.as_ref())),
    );
    let (Some(apmask), Some(aqmask)) = (&ap.apmask, &ap.aqmask) else {
        let which = match (&ap.apmask, &ap.aqmask) {
            (None, None) => "apmask and aqmask",
            (None, _) => "apmask",
            _ => "aqmask",
        };
        for (m, matrix) in mdevs {
            out.push(finding(
                AP_HOST_GUEST,
                Severity::Error,
                m.uuid.to_string(),
                format!(
                    "Matrix mdev {} holds APQNs, but {which} could not be read, so whether the \
                     host can also use them is unknown.",
                    m.uuid
                ),
                vec![
                    masks.0.clone(),
                    masks.1.clone(),
                    Evidence::new(paths::ap_matrix(m.uuid, "matrix"), summary(matrix)),
                ],
                "Check /sys/bus/ap/apmask and aqmask (they read 0x and 64 hex digits); keep the \
                 guest stopped until they read.",
            ));
        }
        return;
    };
    let (host_a, host_d) = (Ids::from_mask(apmask), Ids::from_mask(aqmask));
    for (m, matrix) in mdevs {
        let a = Ids::from_ids(&matrix.adapters).and(host_a);
        let d = Ids::from_ids(&matrix.domains).and(host_d);
        if a.is_empty() || d.is_empty() {
            continue;
        }
        let (both, total) = cross_capped(a, d);
        let mut ev = vec![
            masks.0.clone(),
            masks.1.clone(),
            Evidence::new(paths::ap_matrix(m.uuid, "matrix"), summary(matrix)),
        ];
        ev.extend(both.iter().filter_map(|q| {
            let queue = ctx.queue(*q)?;
            Some(Evidence::new(
                paths::ap_queue(*q, Some("driver")),
                queue.driver.clone().unwrap_or_else(|| "(none)".into()),
            ))
        }));
        out.push(finding(
            AP_HOST_GUEST,
            Severity::Error,
            m.uuid.to_string(),
            format!(
                "Matrix mdev {} holds {} APQN{} the host can also use (adapter in apmask, \
                 domain in aqmask): {}.",
                m.uuid,
                total,
                if total == 1 { "" } else { "s" },
                list_of_total(&both, total)
            ),
            ev,
            "Take the queues from the host before giving them to a guest: clear their adapters \
             from apmask or their domains from aqmask (`devfence ap mask --apmask -N`), or \
             unassign them from the mdev.",
        ));
    }
}

/// `AP-OVERLAP`: one finding per pair of matrix mdevs sharing APQNs.
pub(crate) fn overlap(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let Some(ap) = &ctx.inv.ap else { return };
    let mdevs: Vec<_> = populated(&ap.matrix_mdevs)
        .into_iter()
        .map(|(m, x)| (m, x, Ids::from_ids(&x.adapters), Ids::from_ids(&x.domains)))
        .collect();
    for (i, (m1, x1, a1, d1)) in mdevs.iter().enumerate() {
        for (m2, x2, a2, d2) in mdevs.iter().skip(i + 1) {
            let (a, d) = (a1.and(*a2), d1.and(*d2));
            if a.is_empty() || d.is_empty() {
                continue;
            }
            let (shared, total) = cross_capped(a, d);
            out.push(finding(
                AP_OVERLAP,
                Severity::Error,
                format!("{} and {}", m1.uuid, m2.uuid),
                format!(
                    "Matrix mdevs {} and {} both hold {} APQN{}: {}.",
                    m1.uuid,
                    m2.uuid,
                    total,
                    if total == 1 { "" } else { "s" },
                    list_of_total(&shared, total)
                ),
                vec![
                    Evidence::new(paths::ap_matrix(m1.uuid, "matrix"), summary(x1)),
                    Evidence::new(paths::ap_matrix(m2.uuid, "matrix"), summary(x2)),
                ],
                "An APQN belongs to one matrix mdev: unassign the shared adapters or domains \
                 from one of them (`devfence ap unassign <mdev> --adapter/--domain`).",
            ));
        }
    }
}

/// Why an APQN of `matrix` is missing from `guest_matrix`.
enum Hidden {
    /// No such queue on the host: over-provisioned.
    Absent,
    /// The queue is on another driver; the kernel leaves its adapter out.
    Unbound(String),
    /// The queue is on vfio_ap, but another queue of its adapter is not.
    WithAdapter(Apqn),
    /// None of the above.
    Unknown,
}

/// `AP-GUEST-DRIFT`.
pub(crate) fn guest_drift(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    let Some(ap) = &ctx.inv.ap else { return };
    let mut mdevs: Vec<_> = ap.matrix_mdevs.iter().collect();
    mdevs.sort_by_key(|m| m.uuid);
    let on_vfio = |q: Apqn| -> Option<bool> {
        ctx.queue(q)
            .map(|queue| queue.driver.as_deref() == Some("vfio_ap"))
    };
    for m in mdevs {
        let (Some(matrix), Some(guest)) = (&m.matrix, &m.guest_matrix) else {
            continue;
        };
        let (ma, md) = (
            Ids::from_ids(&matrix.adapters),
            Ids::from_ids(&matrix.domains),
        );
        let (ga, gd) = (
            Ids::from_ids(&guest.adapters),
            Ids::from_ids(&guest.domains),
        );
        let hidden = cross(ma, md)
            .into_iter()
            .filter(|q| !(ga.contains(q.adapter) && gd.contains(q.domain)))
            .collect::<Vec<Apqn>>();
        let extra = cross(ga, gd)
            .into_iter()
            .filter(|q| !(ma.contains(q.adapter) && md.contains(q.domain)))
            .count();
        if hidden.is_empty() && extra == 0 {
            continue;
        }
        // Per adapter, the first queue of the matrix that is present but not on
        // vfio_ap: the kernel leaves the whole adapter out of the guest.
        let mut bad_adapter: [Option<Apqn>; 256] = [None; 256];
        for &a in &matrix.adapters {
            bad_adapter[usize::from(a)] = matrix
                .domains
                .iter()
                .map(|&d| Apqn {
                    adapter: a,
                    domain: d,
                })
                .find(|q| on_vfio(*q) == Some(false));
        }
        let classify = |q: Apqn| -> Hidden {
            match ctx.queue(q) {
                None => Hidden::Absent,
                Some(queue) if queue.driver.as_deref() != Some("vfio_ap") => {
                    Hidden::Unbound(queue.driver.clone().unwrap_or_else(|| "(none)".to_string()))
                }
                Some(_) => match bad_adapter[usize::from(q.adapter)] {
                    Some(b) => Hidden::WithAdapter(b),
                    None => Hidden::Unknown,
                },
            }
        };
        let (mut absent, mut unbound, mut with_adapter, mut unknown) = (0, 0, 0, 0);
        let mut items = Vec::new();
        for &q in &hidden {
            let e = match classify(q) {
                Hidden::Absent => {
                    absent += 1;
                    Evidence::new(
                        paths::ap_queue(q, None),
                        "(absent: not in the host configuration, over-provisioned)",
                    )
                }
                Hidden::Unbound(d) => {
                    unbound += 1;
                    Evidence::new(
                        paths::ap_queue(q, Some("driver")),
                        format!("{d} (not vfio_ap: adapter {:02x} left out)", q.adapter),
                    )
                }
                Hidden::WithAdapter(b) => {
                    with_adapter += 1;
                    Evidence::new(
                        paths::ap_queue(q, Some("driver")),
                        format!(
                            "vfio_ap (left out with adapter {:02x}: {b} is not on vfio_ap)",
                            q.adapter
                        ),
                    )
                }
                Hidden::Unknown => {
                    unknown += 1;
                    Evidence::new(
                        paths::ap_queue(q, Some("driver")),
                        "vfio_ap (hidden for an unknown reason)",
                    )
                }
            };
            items.push(e);
        }
        let mut parts = Vec::new();
        for (n, what) in [
            (absent, "not on the host (over-provisioned)"),
            (unbound, "not bound to vfio_ap"),
            (with_adapter, "left out with their adapter"),
            (unknown, "hidden for an unknown reason"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        let total = matrix.adapters.len() * matrix.domains.len();
        let mut message = if hidden.is_empty() {
            format!("The guest of matrix mdev {} ", m.uuid)
        } else {
            format!(
                "The guest of matrix mdev {} lacks {} of its {total} APQNs ({}: {})",
                m.uuid,
                hidden.len(),
                parts.join(", "),
                capped_list(&hidden)
            )
        };
        if extra > 0 {
            if !hidden.is_empty() {
                message.push_str(" and ");
            }
            message.push_str(&format!("gets {extra} APQNs its matrix does not assign"));
        }
        message.push('.');
        let mut ev = vec![
            Evidence::new(paths::ap_matrix(m.uuid, "matrix"), summary(matrix)),
            Evidence::new(paths::ap_matrix(m.uuid, "guest_matrix"), summary(guest)),
        ];
        ev.extend(capped_evidence(items, "/sys/bus/ap/devices"));
        let mut hint = Vec::new();
        if absent > 0 {
            hint.push(
                "over-provisioned queues join the guest once they are configured (HMC, or \
                 `config` set to 1)",
            );
        }
        if unbound + with_adapter > 0 {
            hint.push(
                "give the unbound queues to vfio_ap by clearing their adapter from apmask or \
                 their domain from aqmask, or unassign them from the mdev",
            );
        }
        if unknown > 0 || extra > 0 {
            hint.push("compare with `lszcrypt -V` and the vfio_ap messages in dmesg");
        }
        let mut hint = hint.join("; ");
        if let Some(first) = hint.get(..1) {
            hint = format!("{}{}.", first.to_uppercase(), &hint[1..]);
        }
        out.push(finding(
            AP_GUEST_DRIFT,
            Severity::Warning,
            m.uuid.to_string(),
            message,
            ev,
            hint,
        ));
    }
}

#[cfg(test)]
mod tests {
    use devfence_model::Severity;

    use crate::check;
    use crate::rules::{AP_GUEST_DRIFT, AP_HOST_GUEST, AP_OVERLAP};
    use crate::testsupport::*;

    const ALL_VFIO: &[(&str, &str)] = &[
        ("05.0012", "vfio_ap"),
        ("05.0013", "vfio_ap"),
        ("06.0012", "vfio_ap"),
        ("06.0013", "vfio_ap"),
    ];

    #[test]
    fn host_guest_fires_on_host_usable_apqns() {
        let inv = Host::deb12()
            .ap(
                Some(&[5, 7]),
                Some(&[0x12]),
                &[("05.0012", "cex4queue"), ("05.0013", "vfio_ap")],
                vec![matrix(1, &[5], &[0x12, 0x13])],
            )
            .build();
        let f = check(&inv, &Ten::new().build());
        let v = of(&f, AP_HOST_GUEST);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, uuid(1).to_string());
        assert_eq!(
            v[0].message,
            format!(
                "Matrix mdev {} holds 1 APQN the host can also use (adapter in apmask, domain \
                 in aqmask): 05.0012.",
                uuid(1)
            )
        );
        assert!(has_ev(
            v[0],
            "/sys/bus/ap/devices/05.0012/driver",
            "cex4queue"
        ));
        assert!(has_ev(
            v[0],
            &format!("/sys/devices/vfio_ap/matrix/{}/matrix", uuid(1)),
            "adapters 05; domains 0012, 0013 (2 APQNs)"
        ));
        assert!(v[0].evidence.iter().any(|e| e.path == "/sys/bus/ap/apmask"
            && e.value.starts_with("0x05")
            && e.value.len() == 66));
    }

    #[test]
    fn host_guest_quiet_when_masks_exclude_the_matrix() {
        // Adapter 5 is the host's, but domain 0x12 is not: no APQN is shared.
        let inv = Host::deb12()
            .ap(
                Some(&[5]),
                Some(&[0x20]),
                ALL_VFIO,
                vec![matrix(1, &[5, 6], &[0x12, 0x13])],
            )
            .build();
        assert!(check(&inv, &Ten::new().build()).is_empty());
    }

    #[test]
    fn host_guest_fails_closed_on_unreadable_masks() {
        let inv = Host::deb12()
            .ap(None, Some(&[]), ALL_VFIO, vec![matrix(1, &[5], &[0x12])])
            .build();
        let f = check(&inv, &Ten::new().build());
        let v = of(&f, AP_HOST_GUEST);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].severity, Severity::Error);
        assert!(v[0].message.contains("apmask could not be read"));
        assert!(has_ev(v[0], "/sys/bus/ap/apmask", "(unreadable)"));
        // Without matrix mdevs, unreadable masks put nothing at stake.
        let inv = Host::deb12().ap(None, None, ALL_VFIO, vec![]).build();
        assert!(check(&inv, &Ten::new().build()).is_empty());
    }

    #[test]
    fn overlap_one_finding_per_pair() {
        let inv = Host::deb12()
            .ap(
                Some(&[]),
                Some(&[]),
                ALL_VFIO,
                vec![
                    matrix(1, &[5], &[0x12, 0x13]),
                    matrix(2, &[5, 6], &[0x13]),
                    matrix(3, &[6], &[0x12]),
                ],
            )
            .build();
        let f = check(&inv, &Ten::new().build());
        let v = of(&f, AP_OVERLAP);
        assert_eq!(v.len(), 1, "{f:#?}");
        assert_eq!(v[0].subject, format!("{} and {}", uuid(1), uuid(2)));
        assert!(v[0].message.ends_with("both hold 1 APQN: 05.0013."));
    }

    #[test]
    fn overlap_quiet_for_disjoint_mdevs() {
        let inv = Host::deb12()
            .ap(
                Some(&[]),
                Some(&[]),
                ALL_VFIO,
                vec![
                    matrix(1, &[5], &[0x12, 0x13]),
                    matrix(2, &[6], &[0x12, 0x13]),
                ],
            )
            .build();
        assert!(check(&inv, &Ten::new().build()).is_empty());
    }

    #[test]
    fn guest_drift_says_why_apqns_are_hidden() {
        let mut m = matrix(1, &[5, 6], &[0x12, 0x13]);
        m.guest_matrix = Some(devfence_model::ApMatrix {
            adapters: vec![6],
            domains: vec![0x12],
        });
        let inv = Host::deb12()
            .ap(
                Some(&[]),
                Some(&[]),
                &[
                    ("05.0012", "vfio_ap"),
                    ("05.0013", "cex4queue"),
                    ("06.0012", "vfio_ap"),
                ],
                vec![m],
            )
            .build();
        let f = check(&inv, &Ten::new().build());
        let v = of(&f, AP_GUEST_DRIFT);
        assert_eq!(v.len(), 1);
        let v = v[0];
        assert_eq!(v.severity, Severity::Warning);
        assert_eq!(
            v.message,
            format!(
                "The guest of matrix mdev {} lacks 3 of its 4 APQNs (1 not on the host \
                 (over-provisioned), 1 not bound to vfio_ap, 1 left out with their adapter: \
                 05.0012, 05.0013, 06.0013).",
                uuid(1)
            )
        );
        assert!(has_ev(
            v,
            "/sys/bus/ap/devices/05.0012/driver",
            "vfio_ap (left out with adapter 05: 05.0013 is not on vfio_ap)"
        ));
        assert!(has_ev(
            v,
            "/sys/bus/ap/devices/05.0013/driver",
            "cex4queue (not vfio_ap: adapter 05 left out)"
        ));
        assert!(has_ev(
            v,
            "/sys/bus/ap/devices/06.0013",
            "(absent: not in the host configuration, over-provisioned)"
        ));
        assert!(v.hint.starts_with("Over-provisioned queues join"));
    }

    #[test]
    fn guest_drift_quiet_when_the_guest_gets_the_matrix() {
        let mut old_kernel = matrix(2, &[6], &[0x12]);
        old_kernel.guest_matrix = None;
        let inv = Host::deb12()
            .ap(
                Some(&[]),
                Some(&[]),
                ALL_VFIO,
                vec![matrix(1, &[5], &[0x12]), old_kernel],
            )
            .build();
        assert!(check(&inv, &Ten::new().build()).is_empty());
    }
}
