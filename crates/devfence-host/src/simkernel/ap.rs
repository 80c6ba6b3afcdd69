//! s390 AP: vfio_ap matrix mdev assignments, the bus masks, queue rebinding, and
//! the filtered `guest_matrix` (v5.19 rules).

use std::collections::{BTreeSet, HashMap};

use devfence_model::{ApMask, Apqn, MdevUuid};

use super::K;
use super::num::{kstrtoull, simple_strtoul};
use super::tree::base;
use crate::actuator::Errno;
use crate::sim::matrix_text;

/// The vfio_ap matrix device.
pub(super) const MATRIX: &str = "/sys/devices/vfio_ap/matrix";
const AP: &str = "/sys/bus/ap";
const DEFAULT_QUEUE_DRIVER: &str = "cex4queue";
const VFIO_AP: &str = "vfio_ap";

/// What an `assign_*`/`unassign_*` attribute acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Res {
    Adapter,
    Domain,
    Control,
}

/// One of the six assignment attributes of a matrix mdev.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AssignOp {
    assign: bool,
    res: Res,
}

impl AssignOp {
    pub(super) fn from_name(name: &str) -> Option<Self> {
        let (assign, rest) = match name.strip_prefix("assign_") {
            Some(r) => (true, r),
            None => (false, name.strip_prefix("unassign_")?),
        };
        let res = match rest {
            "adapter" => Res::Adapter,
            "domain" => Res::Domain,
            "control_domain" => Res::Control,
            _ => return None,
        };
        Some(Self { assign, res })
    }
}

/// A matrix mdev as its files show it.
#[derive(Clone, Debug)]
struct ApMdev {
    uuid: MdevUuid,
    dir: String,
    apm: ApMask,
    aqm: ApMask,
    adm: ApMask,
}

impl ApMdev {
    fn contains(&self, q: Apqn) -> bool {
        self.apm.contains(q.adapter) && self.aqm.contains(q.domain)
    }
    fn apqns(&self) -> Vec<Apqn> {
        self.apm
            .iter()
            .flat_map(|a| {
                self.aqm.iter().map(move |d| Apqn {
                    adapter: a,
                    domain: d,
                })
            })
            .collect()
    }
}

fn mask_of(ids: &[u8]) -> ApMask {
    let mut m = ApMask::NONE;
    for &i in ids {
        m.set(i, true);
    }
    m
}

fn and(a: &ApMask, b: &ApMask) -> ApMask {
    let mut m = *a;
    for (x, y) in m.0.iter_mut().zip(b.0) {
        *x &= y;
    }
    m
}

fn and_not(a: &ApMask, b: &ApMask) -> ApMask {
    let mut m = *a;
    for (x, y) in m.0.iter_mut().zip(b.0) {
        *x &= !y;
    }
    m
}

fn empty(m: &ApMask) -> bool {
    m.0.iter().all(|b| *b == 0)
}

/// `hex2bitmap`: `0x`/`x` optional, up to 64 hex digits filled from bit 0 (the
/// left), one optional newline, nothing else.
fn parse_absolute(s: &[u8]) -> Result<ApMask, Errno> {
    let mut s = s;
    if s.starts_with(b"0x") {
        s = &s[1..];
    }
    if s.first() == Some(&b'x') {
        s = &s[1..];
    }
    let mut m = ApMask::NONE;
    let mut i = 0usize;
    while i < 256 {
        let Some(d) = s.first().and_then(|c| char::from(*c).to_digit(16)) else {
            break;
        };
        for n in 0..4 {
            if d & (0x8 >> n) != 0 {
                m.set((i + n) as u8, true);
            }
        }
        i += 4;
        s = &s[1..];
    }
    if s.first() == Some(&b'\n') {
        s = &s[1..];
    }
    if s.is_empty() {
        Ok(m)
    } else {
        Err(Errno::EINVAL)
    }
}

/// `modify_bitmap`: comma-separated `+n`, `-n`, `+a-b`, `-a-b` (numbers base 0,
/// 0..255), applied in order to `old`.
fn parse_relative(s: &[u8], old: ApMask) -> Result<ApMask, Errno> {
    let mut m = old;
    let mut s = s;
    while let Some((&sign, rest)) = s.split_first() {
        if sign != b'+' && sign != b'-' {
            return Err(Errno::EINVAL);
        }
        s = rest;
        let (a, n) = simple_strtoul(s).ok_or(Errno::EINVAL)?;
        if a >= 256 {
            return Err(Errno::EINVAL);
        }
        s = &s[n..];
        let mut z = a;
        if s.first() == Some(&b'-') {
            s = &s[1..];
            let (b, n) = simple_strtoul(s).ok_or(Errno::EINVAL)?;
            if a > b || b >= 256 {
                return Err(Errno::EINVAL);
            }
            z = b;
            s = &s[n..];
        }
        for i in a..=z {
            m.set(i as u8, sign == b'+');
        }
        while matches!(s.first(), Some(b',' | b'\n')) {
            s = &s[1..];
        }
    }
    Ok(m)
}

/// An `apmask`/`aqmask` write (`ap_parse_bitmap_str`), the C string cut at a NUL.
pub(super) fn parse_mask(value: &[u8], old: ApMask) -> Result<ApMask, Errno> {
    let v = value.split(|b| *b == 0).next().unwrap_or_default();
    match v.first() {
        Some(b'+' | b'-') => parse_relative(v, old),
        _ => parse_absolute(v),
    }
}

impl K<'_> {
    fn ap_masks(&self) -> (ApMask, ApMask) {
        let m = |f: &str| {
            self.t
                .text(&format!("{AP}/{f}"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(ApMask::ALL)
        };
        (m("apmask"), m("aqmask"))
    }

    fn ap_mdev(&self, dir: &str) -> Option<ApMdev> {
        let uuid: MdevUuid = base(dir).parse().ok()?;
        let matrix = self
            .t
            .read(&format!("{dir}/matrix"))
            .ok()
            .and_then(|b| crate::parse::ap_matrix(&b).ok())
            .unwrap_or_default();
        let cds = self
            .t
            .read(&format!("{dir}/control_domains"))
            .ok()
            .and_then(|b| crate::parse::control_domains(&b).ok())
            .unwrap_or_default();
        Some(ApMdev {
            uuid,
            dir: dir.to_owned(),
            apm: mask_of(&matrix.adapters),
            aqm: mask_of(&matrix.domains),
            adm: mask_of(&cds),
        })
    }

    /// Every matrix mdev, by UUID.
    fn ap_mdevs(&self) -> Vec<ApMdev> {
        self.t
            .list(MATRIX)
            .iter()
            .filter(|n| n.parse::<MdevUuid>().is_ok() && self.t.is_dir(&format!("{MATRIX}/{n}")))
            .filter_map(|n| self.ap_mdev(&format!("{MATRIX}/{n}")))
            .collect()
    }

    /// The APQNs of the matrix mdev at `dir`.
    pub(super) fn ap_mdev_apqns(&self, dir: &str) -> Vec<Apqn> {
        self.ap_mdev(dir).map(|m| m.apqns()).unwrap_or_default()
    }

    /// Each bound queue's driver, from the drivers' directories.
    fn ap_queue_drivers(&self) -> HashMap<Apqn, String> {
        let mut out = HashMap::new();
        for drv in self.t.list(&format!("{AP}/drivers")) {
            for n in self.t.list(&format!("{AP}/drivers/{drv}")) {
                if let Some(q) = queue_id(&n) {
                    out.insert(q, drv.clone());
                }
            }
        }
        out
    }

    /// Every queue device.
    fn ap_queues(&self) -> Vec<Apqn> {
        self.t
            .list(&format!("{AP}/devices"))
            .iter()
            .filter_map(|n| queue_id(n))
            .collect()
    }

    fn max_id(&self, f: &str) -> u64 {
        self.t
            .text(&format!("{AP}/{f}"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(255)
    }

    /// `assign_*`/`unassign_*` on the matrix mdev at `dir`.
    pub(super) fn ap_assign(&mut self, dir: &str, op: AssignOp, value: &[u8]) -> Result<(), Errno> {
        let n = kstrtoull(value)?;
        let max = match op.res {
            Res::Adapter => self.max_id("ap_max_adapter_id"),
            Res::Domain | Res::Control => self.max_id("ap_max_domain_id"),
        };
        if n > max || n > 255 {
            return Err(Errno::ENODEV);
        }
        let n = n as u8;
        let me = self.ap_mdev(dir).ok_or(Errno::ENODEV)?;
        let mut new = me.clone();
        let set = match op.res {
            Res::Adapter => &mut new.apm,
            Res::Domain => &mut new.aqm,
            Res::Control => &mut new.adm,
        };
        if set.contains(n) == op.assign {
            return Ok(());
        }
        set.set(n, op.assign);
        if op.assign && op.res != Res::Control {
            let (apmask, aqmask) = self.ap_masks();
            if !empty(&and(&new.apm, &apmask)) && !empty(&and(&new.aqm, &aqmask)) {
                return Err(Errno::EADDRNOTAVAIL);
            }
            for o in self.ap_mdevs() {
                if o.uuid != me.uuid
                    && !empty(&and(&new.apm, &o.apm))
                    && !empty(&and(&new.aqm, &o.aqm))
                {
                    return Err(Errno::EADDRINUSE);
                }
            }
        }
        if op.res == Res::Control {
            let text: String = new.adm.iter().map(|d| format!("{d:04x}\n")).collect();
            return self.t.set(&format!("{dir}/control_domains"), text);
        }
        let adapters: Vec<u8> = new.apm.iter().collect();
        let domains: Vec<u8> = new.aqm.iter().collect();
        self.t
            .set(&format!("{dir}/matrix"), matrix_text(&adapters, &domains))?;
        let mut touched = me.apqns();
        touched.extend(new.apqns());
        self.ap_recompute(touched)
    }

    /// An `apmask` (`is_apmask`) or `aqmask` write.
    pub(super) fn ap_mask(&mut self, is_apmask: bool, value: &[u8]) -> Result<(), Errno> {
        let (apmask, aqmask) = self.ap_masks();
        let old = if is_apmask { apmask } else { aqmask };
        let new = parse_mask(value, old)?;
        if new == old {
            return Ok(());
        }
        // Bits newly given to the host: no APQN they make host-usable may be in
        // a matrix mdev (vfio_ap's in_use, EBUSY from the bus).
        let newly = and_not(&new, &old);
        if !empty(&newly) {
            for m in self.ap_mdevs() {
                let hit = if is_apmask {
                    !empty(&and(&m.apm, &newly)) && !empty(&and(&m.aqm, &aqmask))
                } else {
                    !empty(&and(&m.aqm, &newly)) && !empty(&and(&m.apm, &apmask))
                };
                if hit {
                    return Err(Errno::EBUSY);
                }
            }
        }
        let (apmask, aqmask) = if is_apmask {
            (new, aqmask)
        } else {
            (apmask, new)
        };
        let f = if is_apmask { "apmask" } else { "aqmask" };
        self.t.set(&format!("{AP}/{f}"), format!("{new}\n"))?;
        // ap_bus_revise_bindings: every queue to the kind of driver the masks say.
        let drivers = self.ap_queue_drivers();
        let mut moved = Vec::new();
        for q in self.ap_queues() {
            let host = apmask.contains(q.adapter) && aqmask.contains(q.domain);
            let want = if host { DEFAULT_QUEUE_DRIVER } else { VFIO_AP };
            let cur = drivers.get(&q).map(String::as_str);
            if cur == Some(want) {
                continue;
            }
            let name = q.to_string();
            let qdir = self.t.resolve(&format!("{AP}/devices/{name}"), true)?;
            if let Some(c) = cur {
                self.t.unlink(&format!("{qdir}/driver"))?;
                self.t.unlink(&format!("{AP}/drivers/{c}/{name}"))?;
            }
            let wd = format!("{AP}/drivers/{want}");
            if self.t.is_dir(&wd) {
                self.t.symlink(&format!("{qdir}/driver"), &wd)?;
                self.t.symlink(&format!("{wd}/{name}"), &qdir)?;
            }
            moved.push(q);
        }
        self.ap_recompute(moved)
    }

    /// Recomputes every matrix mdev's `guest_matrix` and the `status` of the
    /// `touched` queues.
    pub(super) fn ap_recompute(&mut self, touched: Vec<Apqn>) -> Result<(), Errno> {
        let mdevs = self.ap_mdevs();
        let drivers = self.ap_queue_drivers();
        // The host's AP configuration: the cards present and the domains that
        // have a queue.
        let mut cfg_a = ApMask::NONE;
        let mut cfg_d = ApMask::NONE;
        for n in self.t.list(&format!("{AP}/devices")) {
            if let Some(a) = card_id(&n) {
                cfg_a.set(a, true);
            } else if let Some(q) = queue_id(&n) {
                cfg_d.set(q.domain, true);
            }
        }
        for m in &mdevs {
            let mut ga = and(&m.apm, &cfg_a);
            let gd = and(&m.aqm, &cfg_d);
            for a in ga.iter().collect::<Vec<_>>() {
                let all_vfio = gd.iter().all(|d| {
                    drivers
                        .get(&Apqn {
                            adapter: a,
                            domain: d,
                        })
                        .map(String::as_str)
                        == Some(VFIO_AP)
                });
                if !all_vfio {
                    ga.set(a, false);
                }
            }
            let text = matrix_text(
                &ga.iter().collect::<Vec<_>>(),
                &gd.iter().collect::<Vec<_>>(),
            );
            let f = format!("{}/guest_matrix", m.dir);
            if self.t.read(&f).ok().as_deref() != Some(text.as_bytes()) {
                self.t.set(&f, text)?;
            }
        }
        let uniq: BTreeSet<Apqn> = touched.into_iter().collect();
        for q in uniq {
            let name = q.to_string();
            let Ok(qdir) = self.t.resolve(&format!("{AP}/devices/{name}"), true) else {
                continue;
            };
            if !self.t.is_dir(&qdir) {
                continue;
            }
            let f = format!("{qdir}/status");
            if drivers.get(&q).map(String::as_str) != Some(VFIO_AP) {
                self.t.unlink(&f)?;
                continue;
            }
            let owners: Vec<&ApMdev> = mdevs.iter().filter(|m| m.contains(q)).collect();
            let status = if owners.is_empty() {
                "unassigned\n"
            } else if owners
                .iter()
                .any(|m| self.s.mdev_opens.get(&m.uuid).is_some_and(|n| *n > 0))
            {
                "in use\n"
            } else {
                "assigned\n"
            };
            if self.t.read(&f).ok().as_deref() != Some(status.as_bytes()) {
                self.t.put(&f, status.as_bytes(), 0o444)?;
            }
        }
        Ok(())
    }

    /// Refreshes the queue status of a matrix mdev's APQNs (after an open or a
    /// close); nothing for other mdevs.
    pub(super) fn ap_refresh_status_of(&mut self, uuid: MdevUuid) -> Result<(), Errno> {
        let dir = format!("{MATRIX}/{uuid}");
        if !self.t.is_dir(&dir) {
            return Ok(());
        }
        let apqns = self.ap_mdev_apqns(&dir);
        self.ap_recompute(apqns)
    }
}

/// `XX.YYYY`, lowercase, as the kernel names queues.
fn queue_id(n: &str) -> Option<Apqn> {
    let q: Apqn = n.parse().ok()?;
    (q.to_string() == n).then_some(q)
}

/// `cardXX`.
fn card_id(n: &str) -> Option<u8> {
    let h = n.strip_prefix("card")?;
    (h.len() == 2
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| u8::from_str_radix(h, 16).ok())
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(ids: &[u8]) -> ApMask {
        mask_of(ids)
    }

    #[test]
    fn masks_parse_like_the_kernel() {
        let old = m(&[4, 5]);
        assert_eq!(parse_mask(b"0x41", old), Ok(m(&[1, 7])));
        assert_eq!(parse_mask(b"x41\n", old), Ok(m(&[1, 7])));
        assert_eq!(parse_mask(b"41", old), Ok(m(&[1, 7])));
        assert_eq!(parse_mask(b"", old), Ok(ApMask::NONE));
        assert_eq!(parse_mask(&[b'f'; 64], old), Ok(ApMask::ALL));
        assert_eq!(parse_mask(&[b'f'; 65], old), Err(Errno::EINVAL));
        assert_eq!(parse_mask(b"0x4g", old), Err(Errno::EINVAL));
        assert_eq!(parse_mask(b"0x41\n\n", old), Err(Errno::EINVAL));
        assert_eq!(parse_mask(b"+0,-5,+0x47,-0xf0", old), Ok(m(&[0, 4, 0x47])));
        assert_eq!(
            parse_mask(b"-0-255,+1-16\n", old),
            Ok(m(&(1..=16).collect::<Vec<_>>()))
        );
        assert_eq!(parse_mask(b"+010", old), Ok(m(&[4, 5, 8])));
        assert_eq!(parse_mask(b"+256", old), Err(Errno::EINVAL));
        assert_eq!(parse_mask(b"+5-3", old), Err(Errno::EINVAL));
        assert_eq!(parse_mask(b"+1,2", old), Err(Errno::EINVAL));
        assert_eq!(parse_mask(b"+", old), Err(Errno::EINVAL));
        assert_eq!(parse_mask(b"+1-", old), Err(Errno::EINVAL));
        assert_eq!(parse_mask(b"+1,,+2", old), Ok(m(&[1, 2, 4, 5])));
    }
}
