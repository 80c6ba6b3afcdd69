//! PCI: `driver_override`, driver `bind`/`unbind`, `drivers_probe`, SR-IOV,
//! `reset`, and the VFIO nodes that follow a function's driver.

use devfence_model::{Bdf, IommuGroupId};

use super::num::{kstrtou16, kstrtoull, strip_nl};
use super::tree::{Kind, base, split};
use super::{K, Saved, Stashed};
use crate::actuator::{Errno, VfToken};
use crate::sim::{PciSpec, vf_bdf, vf_config_space};

/// vfio-pci and its variant drivers (`mlx5_vfio_pci`, `hisi_acc_vfio_pci`, …).
pub(super) fn is_vfio(drv: &str) -> bool {
    drv == "vfio-pci" || drv.ends_with("_vfio_pci") || drv.ends_with("-vfio-pci")
}

/// Drivers with `driver_managed_dma` (6.1): binding them never claims the group.
fn manages_own_dma(drv: &str) -> bool {
    is_vfio(drv) || drv == "pci-stub" || drv == "pcieport"
}

/// Drivers with an `sriov_configure` callback.
fn has_sriov_configure(drv: &str) -> bool {
    matches!(
        drv,
        "vfio-pci" | "mlx5_core" | "igb" | "ixgbe" | "i40e" | "ice" | "nvme" | "bnxt_en"
    )
}

/// Drivers whose `remove` disables SR-IOV (the VFs go away with the PF's driver).
fn disables_sriov_on_remove(drv: &str) -> bool {
    matches!(drv, "vfio-pci" | "igb")
}

/// The driver the VFs of a PF on `pf_driver` bind to.
fn vf_driver_of(pf_driver: &str) -> Option<&'static str> {
    Some(match pf_driver {
        "mlx5_core" => "mlx5_core",
        "igb" => "igbvf",
        "ixgbe" => "ixgbevf",
        "i40e" | "ice" => "iavf",
        "nvme" => "nvme",
        "bnxt_en" => "bnxt_en",
        _ => return None,
    })
}

/// The driver whose id table matches a function (vfio-pci never: its table is
/// `override_only`).
fn id_native(vendor: u32, device: u32, class: u32) -> Option<&'static str> {
    Some(match (vendor, device) {
        (0x15b3, _) if class >> 16 == 0x02 => "mlx5_core",
        (0x8086, 0x10c9 | 0x10e6 | 0x10e7 | 0x10e8 | 0x1521 | 0x1533 | 0x1539) => "igb",
        (0x8086, 0x10ca | 0x152d | 0x1520) => "igbvf",
        (0x8086, 0x10d3) => "e1000e",
        (0x10de, _) if class >> 16 == 0x03 => "nvidia",
        (0x1af4, _) => "virtio-pci",
        _ if class >> 8 == 0x0604 => "pcieport",
        _ if class == 0x01_08_02 => "nvme",
        _ if class >> 8 == 0x0403 => "snd_hda_intel",
        _ => return None,
    })
}

/// The subtrees a host driver creates under its device (saved while unbound).
const DRIVER_SUBDIRS: [(&str, &str); 3] = [
    ("infiniband", "/sys/class/infiniband"),
    ("net", "/sys/class/net"),
    ("sriov", ""),
];

/// Why attaching a driver failed.
enum AttachError {
    /// `dma_configure` refused (a negative errno: `drivers_probe` passes it on).
    Dma(Errno),
    /// The driver's probe failed (`bind` passes it on, `drivers_probe` does not).
    Probe(Errno),
}

impl K<'_> {
    /// The `/sys/devices/...` directory of a PCI function.
    pub(super) fn pci_dir(&self, bdf: Bdf) -> Option<String> {
        let d = self
            .t
            .resolve(&format!("/sys/bus/pci/devices/{bdf}"), true)
            .ok()?;
        self.t.is_dir(&d).then_some(d)
    }

    /// The function whose directory is `dir`, if it is one.
    pub(super) fn pci_at(&self, dir: &str) -> Option<Bdf> {
        let name = base(dir);
        let bdf: Bdf = name.parse().ok()?;
        (bdf.to_string() == name && self.pci_dir(bdf).as_deref() == Some(dir)).then_some(bdf)
    }

    /// The basename of a device's `driver` link.
    pub(super) fn driver_of(&self, dir: &str) -> Option<String> {
        self.t.link_name(&format!("{dir}/driver"))
    }

    fn override_of(&self, dir: &str) -> Option<String> {
        self.t
            .text(&format!("{dir}/driver_override"))
            .filter(|o| o != "(null)")
    }

    pub(super) fn group_of(&self, dir: &str) -> Option<u32> {
        self.t
            .link_name(&format!("{dir}/iommu_group"))
            .and_then(|g| g.parse().ok())
    }

    /// An SR-IOV PF (`sriov_totalvfs` exists).
    pub(super) fn is_pf(&self, dir: &str) -> bool {
        self.t.lexists(&format!("{dir}/sriov_totalvfs"))
    }

    /// The PF of a VF and its directory.
    pub(super) fn physfn_of(&self, dir: &str) -> Option<(Bdf, String)> {
        let p = self.t.link(&format!("{dir}/physfn"))?;
        Some((base(&p).parse().ok()?, p))
    }

    /// `0x`-prefixed (or bare) hex attribute.
    fn hex_attr(&self, dir: &str, name: &str) -> Option<u32> {
        let s = self.t.text(&format!("{dir}/{name}"))?;
        u32::from_str_radix(s.strip_prefix("0x").unwrap_or(&s), 16).ok()
    }

    pub(super) fn dec_attr(&self, dir: &str, name: &str) -> Option<u32> {
        self.t.text(&format!("{dir}/{name}"))?.parse().ok()
    }

    /// The driver `bdf` binds to without an override: the one it had when the
    /// simulator started, the VF driver of its PF's driver, or the id table.
    pub(super) fn native_of(&self, bdf: Bdf) -> Option<String> {
        if let Some(n) = self.s.d.natives.get(&bdf) {
            return Some(n.clone());
        }
        let dir = self.pci_dir(bdf)?;
        if let Some((pf, _)) = self.physfn_of(&dir)
            && let Some(v) = self.native_of(pf).as_deref().and_then(vf_driver_of)
        {
            return Some(v.to_owned());
        }
        id_native(
            self.hex_attr(&dir, "vendor")?,
            self.hex_attr(&dir, "device")?,
            self.hex_attr(&dir, "class")?,
        )
        .map(str::to_owned)
    }

    /// The device a `bind`/`unbind`/`drivers_probe` write names (`sysfs_streq`
    /// against the device names): `ENODEV` when there is none.
    fn device_by_name(&self, value: &[u8]) -> Result<(Bdf, String), Errno> {
        let s = std::str::from_utf8(strip_nl(value)).map_err(|_| Errno::ENODEV)?;
        let bdf: Bdf = s.parse().map_err(|_| Errno::ENODEV)?;
        if bdf.to_string() != s {
            return Err(Errno::ENODEV);
        }
        Ok((bdf, self.pci_dir(bdf).ok_or(Errno::ENODEV)?))
    }

    fn driver_loaded(&self, drv: &str) -> bool {
        !drv.contains('/') && self.t.is_dir(&format!("/sys/bus/pci/drivers/{drv}"))
    }

    /// The members of group `g`: (name, directory).
    fn group_members(&self, g: u32) -> Vec<(String, String)> {
        let d = format!("/sys/kernel/iommu_groups/{g}/devices");
        self.t
            .list(&d)
            .into_iter()
            .filter_map(|n| {
                let dir = self.t.link(&format!("{d}/{n}"))?;
                Some((n, dir))
            })
            .collect()
    }

    /// Another member of `dir`'s group is open through VFIO.
    fn group_busy(&self, bdf: Bdf, dir: &str) -> bool {
        let Some(g) = self.group_of(dir) else {
            return false;
        };
        self.group_members(g).iter().any(|(n, _)| {
            n.parse::<Bdf>()
                .is_ok_and(|b| b != bdf && self.s.opens.get(&b).is_some_and(|c| *c > 0))
        })
    }

    /// No member of group `g` is on a driver that uses the kernel DMA API.
    fn group_viable(&self, g: u32) -> bool {
        self.group_members(g)
            .iter()
            .all(|(_, d)| self.driver_of(d).is_none_or(|drv| manages_own_dma(&drv)))
    }

    /// The lowest free IOMMU group number (`ida_alloc`).
    pub(super) fn lowest_free_group(&self) -> u32 {
        lowest_free(
            self.t
                .list("/sys/kernel/iommu_groups")
                .iter()
                .filter_map(|n| n.parse().ok()),
        )
    }

    /// The lowest free `vfio<X>` index.
    fn lowest_free_vfio_dev(&self) -> u32 {
        let mut used = self.t.list("/sys/class/vfio-dev");
        used.extend(self.t.list("/dev/vfio/devices"));
        lowest_free(
            used.iter()
                .filter_map(|n| n.strip_prefix("vfio").and_then(|x| x.parse().ok())),
        )
    }

    /// The kernel makes per-device VFIO cdevs (`CONFIG_VFIO_DEVICE_CDEV`, 6.6+; not
    /// set in Debian's kernels): as the tree shows it, `/dev/vfio/devices` exists
    /// or a vfio device has its `dev` number.
    fn cdev_kernel(&self) -> bool {
        self.t.is_dir("/dev/vfio/devices")
            || self
                .t
                .list("/sys/class/vfio-dev")
                .iter()
                .any(|x| self.t.lexists(&format!("/sys/class/vfio-dev/{x}/dev")))
    }

    /// `/dev/vfio/<g>` (and the container) appear when a group gets its first
    /// vfio device: `root:root 0600`.
    pub(super) fn ensure_group_node(&self, g: u32) -> Result<(), Errno> {
        if !self.t.lexists("/dev/vfio/vfio") {
            self.t.node("/dev/vfio/vfio", 0, 0, 0o666)?;
        }
        let n = format!("/dev/vfio/{g}");
        if !self.t.lexists(&n) {
            self.t.node(&n, 0, 0, 0o600)?;
        }
        Ok(())
    }

    /// Registers a vfio device under `dev_dir`: `vfio-dev/vfio<X>`, its class link
    /// and, on 6.6+, its cdev. Returns X.
    pub(super) fn add_vfio_dev(&self, dev_dir: &str) -> Result<u32, Errno> {
        let x = self.lowest_free_vfio_dev();
        let d = format!("{dev_dir}/vfio-dev/vfio{x}");
        self.t.mkdir(&d)?;
        self.t
            .symlink(&format!("/sys/class/vfio-dev/vfio{x}"), &d)?;
        if self.cdev_kernel() {
            self.t
                .put(&format!("{d}/dev"), format!("511:{x}\n").as_bytes(), 0o444)?;
            self.t
                .node(&format!("/dev/vfio/devices/vfio{x}"), 0, 0, 0o600)?;
        }
        Ok(x)
    }

    /// Unregisters the vfio device(s) under `dev_dir`.
    pub(super) fn remove_vfio_dev(&self, dev_dir: &str) -> Result<(), Errno> {
        let vd = format!("{dev_dir}/vfio-dev");
        for name in self.t.list(&vd) {
            self.t.unlink(&format!("/sys/class/vfio-dev/{name}"))?;
            self.t.unlink(&format!("/dev/vfio/devices/{name}"))?;
        }
        self.t.rmtree(&vd)
    }

    /// Removes `/dev/vfio/<g>` when no member of the group is on a vfio driver.
    fn drop_group_node_if_unused(&self, g: u32) -> Result<(), Errno> {
        let in_use = self
            .group_members(g)
            .iter()
            .any(|(_, d)| self.driver_of(d).is_some_and(|drv| is_vfio(&drv)));
        if in_use {
            Ok(())
        } else {
            self.t.unlink(&format!("/dev/vfio/{g}"))
        }
    }

    fn ensure_driver_dir(&self, drv: &str) -> Result<(), Errno> {
        let d = format!("/sys/bus/pci/drivers/{drv}");
        if !self.t.is_dir(&d) {
            for f in ["bind", "unbind", "new_id", "remove_id"] {
                self.t.put(&format!("{d}/{f}"), b"", 0o200)?;
            }
        }
        Ok(())
    }

    /// `driver_override` store: one name, cut at the first newline; empty clears.
    pub(super) fn driver_override(&mut self, dir: &str, value: &[u8]) -> Result<(), Errno> {
        if value.len() >= 4095 {
            return Err(Errno::EINVAL);
        }
        let name = value.split(|b| *b == b'\n').next().unwrap_or_default();
        let mut text = if name.is_empty() {
            b"(null)".to_vec()
        } else {
            name.to_vec()
        };
        text.push(b'\n');
        self.t.set(&format!("{dir}/driver_override"), text)
    }

    /// Whether `drv` matches the function: through `driver_override` when it is
    /// set, else through the id table (the native driver).
    fn matches(&self, bdf: Bdf, dir: &str, drv: &str) -> bool {
        match self.override_of(dir) {
            Some(o) => o == drv,
            None => self.native_of(bdf).as_deref() == Some(drv),
        }
    }

    /// `/sys/bus/pci/drivers/<drv>/bind`.
    pub(super) fn bind(&mut self, drv: &str, value: &[u8]) -> Result<(), Errno> {
        let (bdf, dir) = self.device_by_name(value)?;
        if !self.matches(bdf, &dir, drv) {
            return Err(Errno::ENODEV);
        }
        if self.driver_of(&dir).is_some() {
            return Err(Errno::EBUSY);
        }
        self.attach(bdf, &dir, drv).map_err(|e| match e {
            AttachError::Dma(e) | AttachError::Probe(e) => e,
        })
    }

    /// `/sys/bus/pci/drivers/<drv>/unbind`.
    pub(super) fn unbind(&mut self, drv: &str, value: &[u8]) -> Result<(), Errno> {
        let (bdf, dir) = self.device_by_name(value)?;
        if self.driver_of(&dir).as_deref() != Some(drv) {
            return Err(Errno::ENODEV);
        }
        // The kernel blocks until the user closes the device; the simulator
        // answers EBUSY instead of hanging.
        if self.s.opens.get(&bdf).is_some_and(|n| *n > 0) {
            return Err(Errno::EBUSY);
        }
        let with_vfs = disables_sriov_on_remove(drv)
            && self.is_pf(&dir)
            && self.dec_attr(&dir, "sriov_numvfs").unwrap_or(0) > 0;
        if with_vfs {
            if self.any_vf_open(&dir) {
                return Err(Errno::EBUSY);
            }
            self.disable_vfs(bdf, &dir)?;
        }
        self.detach(bdf, &dir, drv)
    }

    /// `/sys/bus/pci/drivers_probe`.
    pub(super) fn drivers_probe(&mut self, value: &[u8]) -> Result<(), Errno> {
        let (bdf, dir) = self.device_by_name(value)?;
        self.probe(bdf, &dir)
    }

    /// Driver matching for an unbound function: its override if that driver is
    /// loaded, else its native driver if loaded; a failing probe leaves it unbound
    /// (success), a refused DMA claim is an error.
    fn probe(&mut self, bdf: Bdf, dir: &str) -> Result<(), Errno> {
        if self.driver_of(dir).is_some() {
            return Ok(());
        }
        let drv = match self.override_of(dir) {
            Some(o) => o,
            None => match self.native_of(bdf) {
                Some(n) => n,
                None => return Ok(()),
            },
        };
        if !self.driver_loaded(&drv) {
            return Ok(());
        }
        match self.attach(bdf, dir, &drv) {
            Ok(()) | Err(AttachError::Probe(_)) => Ok(()),
            Err(AttachError::Dma(e)) => Err(e),
        }
    }

    /// Binds `dir` to `drv` (matching already checked).
    fn attach(&mut self, bdf: Bdf, dir: &str, drv: &str) -> Result<(), AttachError> {
        if !manages_own_dma(drv) && self.group_busy(bdf, dir) {
            return Err(AttachError::Dma(Errno::EBUSY));
        }
        // vfio-pci refuses functions without a type-0 header (bridges).
        if is_vfio(drv)
            && self
                .hex_attr(dir, "class")
                .is_some_and(|c| c >> 8 == 0x0604)
        {
            return Err(AttachError::Probe(Errno::EINVAL));
        }
        // vfio-pci refuses a PF whose SR-IOV is enabled ("Cannot bind to PF
        // with SR-IOV enabled"): it cannot take over VFs that already exist.
        if is_vfio(drv) && self.is_pf(dir) && self.dec_attr(dir, "sriov_numvfs").unwrap_or(0) > 0 {
            return Err(AttachError::Probe(Errno::EBUSY));
        }
        // QEMU's nvme VFs have no controller resources until nvme-cli's virt-mgmt
        // assigns them: nvme's probe returns, its reset work fails, and the
        // driver lets go of the function again (docs/testbed.md).
        if drv == "nvme"
            && self.hex_attr(dir, "vendor") == Some(0x1b36)
            && self.physfn_of(dir).is_some()
        {
            return Ok(());
        }
        self.attach_unchecked(bdf, dir, drv)
            .map_err(AttachError::Probe)
    }

    fn attach_unchecked(&mut self, bdf: Bdf, dir: &str, drv: &str) -> Result<(), Errno> {
        self.ensure_driver_dir(drv)?;
        let d = format!("/sys/bus/pci/drivers/{drv}");
        self.t.symlink(&format!("{dir}/driver"), &d)?;
        self.t.symlink(&format!("{d}/{bdf}"), dir)?;
        if is_vfio(drv) {
            self.add_vfio_dev(dir)?;
            if let Some(g) = self.group_of(dir) {
                self.ensure_group_node(g)?;
            }
            // A PF's token is a fresh random one at every probe.
            self.s.tokens.remove(&bdf);
        } else if let Some(saved) = self
            .s
            .d
            .stash
            .contains_key(&(dir.to_owned(), drv.to_owned()))
            .then(|| self.s.dm().stash.remove(&(dir.to_owned(), drv.to_owned())))
            .flatten()
        {
            let mut saved = saved;
            self.rename_taken_class_names(&mut saved);
            for (at, entries) in saved {
                self.t.restore(&at, &entries)?;
            }
        } else if drv == "mlx5_core" {
            self.fresh_ib_device(dir)?;
        }
        if self.physfn_of(dir).is_some() {
            self.apply_admin_guids(dir)?;
        }
        Ok(())
    }

    /// A driver's subtree comes back at its next probe under the names it had,
    /// unless another device took a name meanwhile (`mlx5_3`, `ib1`): the kernel
    /// names a device afresh at every probe, the lowest free number of its
    /// prefix, so a taken name is replaced by that, in the class link and in the
    /// device's own subtree.
    fn rename_taken_class_names(&self, saved: &mut Stashed) {
        let mut renames: Vec<(String, String, String)> = Vec::new();
        for (cl, entries) in saved.iter_mut() {
            let Some(rest) = cl.strip_prefix("/sys/class/") else {
                continue;
            };
            let Some((class, old)) = rest.split_once('/') else {
                continue;
            };
            if !self.t.lexists(cl) {
                continue;
            }
            let prefix = old
                .trim_end_matches(|c: char| c.is_ascii_digit())
                .to_owned();
            let class_dir = format!("/sys/class/{class}");
            let new = format!(
                "{prefix}{}",
                lowest_free(self.t.list(&class_dir).iter().filter_map(|n| {
                    n.strip_prefix(prefix.as_str()).and_then(|x| x.parse().ok())
                }))
            );
            for e in entries.iter_mut() {
                if let Saved::Link(_, t) = e
                    && let Some(parent) = t.parent()
                {
                    *t = parent.join(&new);
                }
            }
            renames.push((old.to_owned(), new.clone(), format!("{class_dir}/{new}")));
            *cl = format!("{class_dir}/{new}");
        }
        for (old, new, _) in &renames {
            for (at, entries) in saved.iter_mut() {
                if at.starts_with("/sys/class/") {
                    continue;
                }
                for e in entries.iter_mut() {
                    let r = match e {
                        Saved::Dir(r) | Saved::File(r, _, _) | Saved::Link(r, _) => r,
                    };
                    if r == old {
                        r.clone_from(new);
                    } else if let Some(tail) = r.strip_prefix(&format!("{old}/")) {
                        *r = format!("{new}/{tail}");
                    }
                }
            }
        }
    }

    /// Unbinds `dir` from `drv`.
    fn detach(&mut self, bdf: Bdf, dir: &str, drv: &str) -> Result<(), Errno> {
        self.t.unlink(&format!("{dir}/driver"))?;
        self.t
            .unlink(&format!("/sys/bus/pci/drivers/{drv}/{bdf}"))?;
        if is_vfio(drv) {
            self.remove_vfio_dev(dir)?;
            self.s.tokens.remove(&bdf);
            if let Some(g) = self.group_of(dir) {
                self.drop_group_node_if_unused(g)?;
            }
        } else {
            let mut saved = Vec::new();
            for (sub, class) in DRIVER_SUBDIRS {
                let sd = format!("{dir}/{sub}");
                if !self.t.is_dir(&sd) {
                    continue;
                }
                if !class.is_empty() {
                    for name in self.t.list(&sd) {
                        let cl = format!("{class}/{name}");
                        if let Ok(target) = std::fs::read_link(self.t.host(&cl)) {
                            saved.push((cl.clone(), vec![Saved::Link(String::new(), target)]));
                            self.t.unlink(&cl)?;
                        }
                    }
                }
                saved.push((sd.clone(), self.t.save(&sd)?));
                self.t.rmtree(&sd)?;
            }
            if !saved.is_empty() {
                // Directories first, class links after.
                saved.sort_by_key(|(p, _)| !p.starts_with(dir));
                self.s
                    .dm()
                    .stash
                    .insert((dir.to_owned(), drv.to_owned()), saved);
            }
        }
        Ok(())
    }

    /// The VFs of a PF: (index, BDF, directory), by index.
    pub(super) fn vfs_of(&self, pf_dir: &str) -> Vec<(u32, Bdf, String)> {
        let mut v: Vec<(u32, Bdf, String)> = self
            .t
            .list(pf_dir)
            .iter()
            .filter_map(|n| {
                let i: u32 = n.strip_prefix("virtfn")?.parse().ok()?;
                let d = self.t.link(&format!("{pf_dir}/{n}"))?;
                Some((i, base(&d).parse().ok()?, d))
            })
            .collect();
        v.sort_unstable_by_key(|(i, _, _)| *i);
        v
    }

    fn any_vf_open(&self, pf_dir: &str) -> bool {
        self.vfs_of(pf_dir)
            .iter()
            .any(|(_, b, _)| self.s.opens.get(b).is_some_and(|n| *n > 0))
    }

    /// `sriov_numvfs` store.
    pub(super) fn sriov_numvfs(&mut self, bdf: Bdf, dir: &str, value: &[u8]) -> Result<(), Errno> {
        let n = kstrtou16(value).map_err(|_| Errno::EINVAL)?;
        let total = self.dec_attr(dir, "sriov_totalvfs").unwrap_or(0);
        if u32::from(n) > total {
            return Err(Errno::ERANGE);
        }
        let cur = self.dec_attr(dir, "sriov_numvfs").unwrap_or(0);
        if u32::from(n) == cur {
            return Ok(());
        }
        let drv = self.driver_of(dir).ok_or(Errno::ENOENT)?;
        if !has_sriov_configure(&drv) {
            return Err(Errno::ENOENT);
        }
        if drv == "vfio-pci"
            && self
                .t
                .text("/sys/module/vfio_pci/parameters/enable_sriov")
                .as_deref()
                != Some("Y")
        {
            return Err(Errno::ENOENT);
        }
        if n == 0 {
            if self.any_vf_open(dir) {
                return Err(Errno::EBUSY);
            }
            return self.disable_vfs(bdf, dir);
        }
        if cur != 0 {
            return Err(Errno::EBUSY);
        }
        self.enable_vfs(bdf, dir, u32::from(n))
    }

    /// Creates `n` VFs of `pf` (as `pci_enable_sriov` + the bus notifiers do).
    fn enable_vfs(&mut self, pf: Bdf, pf_dir: &str, n: u32) -> Result<(), Errno> {
        let offset = self.dec_attr(pf_dir, "sriov_offset").unwrap_or(1) as u16;
        let stride = self.dec_attr(pf_dir, "sriov_stride").unwrap_or(1) as u16;
        let vfs: Vec<Bdf> = (0..n)
            .map(|i| vf_bdf(pf, offset, stride, i))
            .collect::<Option<_>>()
            .ok_or(Errno(12))?;
        let vendor = self.hex_attr(pf_dir, "vendor").unwrap_or(0xffff) as u16;
        let device = self.hex_attr(pf_dir, "sriov_vf_device").unwrap_or(0xffff) as u16;
        let class = self.hex_attr(pf_dir, "class").unwrap_or(0);
        let parent = split(pf_dir).0.to_owned();
        let pf_on_vfio = self.driver_of(pf_dir).as_deref() == Some("vfio-pci");
        let autoprobe = self.dec_attr(pf_dir, "sriov_drivers_autoprobe") != Some(0);
        let ofed = self.t.is_dir(&format!("{pf_dir}/sriov"));
        // A PF that shares its group with its upstream bridge sits below a port
        // without ACS: its VFs join that group (pci_device_group stops there).
        let shared_group = self
            .group_of(pf_dir)
            .filter(|g| self.pci_at(&parent).is_some() && self.group_of(&parent) == Some(*g));
        for (i, &vf) in (0u32..).zip(&vfs) {
            let mut spec = PciSpec::new(vf, &parent, vendor, device, class);
            spec.subsystem_vendor = self.hex_attr(pf_dir, "subsystem_vendor").unwrap_or(0) as u16;
            spec.subsystem_device = self.hex_attr(pf_dir, "subsystem_device").unwrap_or(0) as u16;
            spec.revision = self.hex_attr(pf_dir, "revision").unwrap_or(0) as u8;
            let numa = self
                .t
                .text(&format!("{pf_dir}/numa_node"))
                .unwrap_or_else(|| "-1".to_owned());
            let vd = format!("{parent}/{vf}");
            let attrs: [(&str, String); 10] = [
                ("uevent", crate::sim::pci_uevent(&spec)),
                ("vendor", format!("0x{vendor:04x}\n")),
                ("device", format!("0x{device:04x}\n")),
                (
                    "subsystem_vendor",
                    format!("0x{:04x}\n", spec.subsystem_vendor),
                ),
                (
                    "subsystem_device",
                    format!("0x{:04x}\n", spec.subsystem_device),
                ),
                ("class", format!("0x{class:06x}\n")),
                ("revision", format!("0x{:02x}\n", spec.revision)),
                ("numa_node", format!("{numa}\n")),
                (
                    "driver_override",
                    if pf_on_vfio { "vfio-pci\n" } else { "(null)\n" }.to_owned(),
                ),
                ("reset_method", "flr\n".to_owned()),
            ];
            for (name, v) in attrs {
                self.t.put(&format!("{vd}/{name}"), v.as_bytes(), 0o644)?;
            }
            self.t.put(&format!("{vd}/reset"), b"", 0o200)?;
            self.t.put(&format!("{vd}/remove"), b"", 0o200)?;
            self.t
                .put(&format!("{vd}/config"), &vf_config_space(&spec), 0o644)?;
            // Its own IOMMU group, unless no ACS isolates it.
            let g = shared_group.unwrap_or_else(|| self.lowest_free_group());
            let gd = format!("/sys/kernel/iommu_groups/{g}");
            if shared_group.is_none() {
                self.t.mkdir(&format!("{gd}/devices"))?;
                self.t.put(&format!("{gd}/type"), b"DMA\n", 0o644)?;
                self.t.put(
                    &format!("{gd}/reserved_regions"),
                    b"0x00000000fee00000 0x00000000feefffff msi\n",
                    0o444,
                )?;
            }
            self.t.symlink(&format!("{gd}/devices/{vf}"), &vd)?;
            self.t.symlink(&format!("{vd}/iommu_group"), &gd)?;
            self.t.symlink(&format!("/sys/bus/pci/devices/{vf}"), &vd)?;
            self.t.symlink(&format!("{vd}/physfn"), pf_dir)?;
            self.t.symlink(&format!("{pf_dir}/virtfn{i}"), &vd)?;
            if ofed {
                let s = format!("{pf_dir}/sriov/{i}");
                let zero = "00:00:00:00:00:00:00:00\n";
                self.t.put(&format!("{s}/node"), zero.as_bytes(), 0o644)?;
                self.t.put(&format!("{s}/port"), zero.as_bytes(), 0o644)?;
                self.t.put(&format!("{s}/policy"), b"Follow\n", 0o644)?;
            }
            if autoprobe {
                self.probe(vf, &vd)?;
            }
        }
        self.t
            .set(&format!("{pf_dir}/sriov_numvfs"), format!("{n}\n"))
    }

    /// Removes every VF of a PF (none may be open).
    fn disable_vfs(&mut self, pf: Bdf, pf_dir: &str) -> Result<(), Errno> {
        for (i, vf, vd) in self.vfs_of(pf_dir).into_iter().rev() {
            if let Some(drv) = self.driver_of(&vd) {
                self.detach(vf, &vd, &drv)?;
            }
            let d = self.s.dm();
            d.stash.retain(|(d, _), _| *d != vd);
            d.natives.remove(&vf);
            d.reset_defaults.remove(&vf);
            if let Some(g) = self.group_of(&vd) {
                let gd = format!("/sys/kernel/iommu_groups/{g}");
                self.t.unlink(&format!("{gd}/devices/{vf}"))?;
                if self.t.list(&format!("{gd}/devices")).is_empty() {
                    self.t.rmtree(&gd)?;
                    self.t.unlink(&format!("/dev/vfio/{g}"))?;
                }
            }
            self.t.unlink(&format!("/sys/bus/pci/devices/{vf}"))?;
            self.t.rmtree(&vd)?;
            self.t.unlink(&format!("{pf_dir}/virtfn{i}"))?;
            self.t.rmtree(&format!("{pf_dir}/sriov/{i}"))?;
        }
        self.s.dm().admin_guids.retain(|(p, _), _| *p != pf);
        self.t.set(&format!("{pf_dir}/sriov_numvfs"), "0\n")
    }

    /// `reset` store: `1` (kstrtoul base 0) resets; anything else is `EINVAL`;
    /// `ENOTTY` when every reset method was disabled.
    pub(super) fn reset(&mut self, _bdf: Bdf, dir: &str, value: &[u8]) -> Result<(), Errno> {
        if kstrtoull(value).map_err(|_| Errno::EINVAL)? != 1 {
            return Err(Errno::EINVAL);
        }
        if self
            .t
            .text(&format!("{dir}/reset_method"))
            .is_some_and(|m| m.trim().is_empty())
        {
            return Err(Errno::ENOTTY);
        }
        // An FLR reloads an mlx5 VF's vport context: its administrative GUIDs
        // take effect.
        if self.physfn_of(dir).is_some() {
            self.apply_admin_guids(dir)?;
        }
        Ok(())
    }

    /// `reset_method` store: a space-separated subset of the methods the function
    /// supports (those it had first), `default`, or empty (disable).
    pub(super) fn reset_method(&mut self, bdf: Bdf, dir: &str, value: &[u8]) -> Result<(), Errno> {
        if value.len() >= 4095 {
            return Err(Errno::EINVAL);
        }
        let f = format!("{dir}/reset_method");
        let cur = self.t.text(&f).unwrap_or_default();
        let supported = match self.s.d.reset_defaults.get(&bdf) {
            Some(s) => s.clone(),
            None => self.s.dm().reset_defaults.entry(bdf).or_insert(cur).clone(),
        };
        let v = std::str::from_utf8(strip_nl(value)).map_err(|_| Errno::EINVAL)?;
        let new = if v.is_empty() {
            String::new()
        } else if v == "default" {
            supported
        } else {
            let mut out: Vec<&str> = Vec::new();
            for m in v.split(' ').filter(|m| !m.is_empty()).map(str::trim) {
                if !supported.split(' ').any(|s| s == m) {
                    return Err(Errno::EINVAL);
                }
                if !out.contains(&m) {
                    out.push(m);
                }
            }
            out.join(" ")
        };
        self.t.set(
            &f,
            if new.is_empty() {
                String::new()
            } else {
                format!("{new}\n")
            },
        )
    }

    /// The group-path open of a PCI function (see [`super::SimKernel::open_vf`]).
    /// Returns the PF whose token users count this open.
    pub(super) fn open_pci(
        &mut self,
        bdf: Bdf,
        token: Option<&VfToken>,
    ) -> Result<Option<Bdf>, Errno> {
        let dir = self.pci_dir(bdf).ok_or(Errno::ENODEV)?;
        let drv = self.driver_of(&dir).ok_or(Errno::ENODEV)?;
        if !is_vfio(&drv) {
            return Err(Errno::ENODEV);
        }
        let g = self.group_of(&dir).ok_or(Errno::ENODEV)?;
        if !self.group_viable(g) {
            return Err(Errno::EPERM);
        }
        let mut pf_user = None;
        if let Some((pf, pf_dir)) = self.physfn_of(&dir) {
            if self.driver_of(&pf_dir).as_deref() == Some("vfio-pci") {
                let Some(t) = token else {
                    return Err(Errno::EACCES);
                };
                if self.s.tokens.get(&pf) != Some(t) {
                    return Err(Errno::EACCES);
                }
                pf_user = Some(pf);
            } else if token.is_some() {
                return Err(Errno::EINVAL);
            }
        } else if drv == "vfio-pci" && self.is_pf(&dir) {
            if self.s.vf_users.get(&bdf).is_some_and(|n| *n > 0) {
                match token {
                    Some(t) if self.s.tokens.get(&bdf) == Some(t) => {}
                    _ => return Err(Errno::EACCES),
                }
            } else if let Some(t) = token {
                self.s.tokens.insert(bdf, t.clone());
            }
        } else if token.is_some() {
            return Err(Errno::EINVAL);
        }
        *self.s.opens.entry(bdf).or_default() += 1;
        if let Some(pf) = pf_user {
            *self.s.vf_users.entry(pf).or_default() += 1;
        }
        Ok(pf_user)
    }

    /// The open behind [`crate::actuator::KernelIo::open_pf`]. Returns whether
    /// the function is a PF (has a VF token).
    pub(super) fn open_pf(&mut self, pf: Bdf, group: IommuGroupId) -> Result<bool, Errno> {
        let dir = self.pci_dir(pf).ok_or(Errno::ENODEV)?;
        if self.driver_of(&dir).as_deref() != Some("vfio-pci")
            || self.group_of(&dir) != Some(group.0)
        {
            return Err(Errno::ENODEV);
        }
        if !self.group_viable(group.0) {
            return Err(Errno::EPERM);
        }
        let is_pf = self.is_pf(&dir);
        if is_pf && self.s.vf_users.get(&pf).is_some_and(|n| *n > 0) {
            return Err(Errno::EACCES);
        }
        *self.s.opens.entry(pf).or_default() += 1;
        Ok(is_pf)
    }

    /// What a path is (re-exported for the other modules).
    pub(super) fn kind(&self, k: &str) -> Option<Kind> {
        self.t.kind(k)
    }
}

/// The smallest number not in `used`.
pub(super) fn lowest_free(used: impl Iterator<Item = u32>) -> u32 {
    let mut v: Vec<u32> = used.collect();
    v.sort_unstable();
    v.dedup();
    let mut n = 0;
    for u in v {
        if u == n {
            n += 1;
        } else if u > n {
            break;
        }
    }
    n
}
