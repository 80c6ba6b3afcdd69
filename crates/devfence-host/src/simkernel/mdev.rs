//! Mediated devices: `create` and `remove`, each instance in its own VFIO-made
//! group.

use devfence_model::MdevUuid;

use super::K;
use super::ap::MATRIX;
use super::num::kstrtoull;
use super::tree::{Kind, base, split};
use crate::actuator::Errno;

impl K<'_> {
    /// The mdev driver an instance under `parent` binds to: that of the parent's
    /// other instances, `vfio_ap_mdev` under the vfio_ap matrix, else the parent
    /// driver named in the type id (`mtty-1` → `mtty`).
    fn mdev_driver_for(&self, parent: &str, type_id: &str) -> String {
        for n in self.t.list(parent) {
            if n.parse::<MdevUuid>().is_ok()
                && let Some(d) = self.driver_of(&format!("{parent}/{n}"))
            {
                return d;
            }
        }
        if parent == MATRIX {
            return "vfio_ap_mdev".to_owned();
        }
        type_id.split('-').next().unwrap_or(type_id).to_owned()
    }

    /// `mdev_supported_types/<type>/create`.
    pub(super) fn mdev_create(&mut self, type_dir: &str, value: &[u8]) -> Result<(), Errno> {
        // Exactly a UUID string, or one more byte (the kernel parses the first 36).
        if value.len() < 36 || value.len() > 37 {
            return Err(Errno::EINVAL);
        }
        let uuid: MdevUuid = std::str::from_utf8(&value[..36])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(Errno::EINVAL)?;
        if self.t.lexists(&format!("/sys/bus/mdev/devices/{uuid}")) {
            return Err(Errno::EEXIST);
        }
        let avail = self.dec_attr(type_dir, "available_instances").unwrap_or(0);
        if avail == 0 {
            return Err(Errno::EUSERS);
        }
        // A new device: no memory of an earlier one with the same UUID.
        self.mtty_forget(uuid);
        let parent = split(split(type_dir).0).0.to_owned();
        let type_id = base(type_dir).to_owned();
        let drv = self.mdev_driver_for(&parent, &type_id);
        let d = format!("{parent}/{uuid}");
        self.t.put(&format!("{d}/remove"), b"", 0o200)?;
        self.t.symlink(&format!("{d}/mdev_type"), type_dir)?;
        let g = self.lowest_free_group();
        let gd = format!("/sys/kernel/iommu_groups/{g}");
        self.t.mkdir(&format!("{gd}/devices"))?;
        self.t.put(&format!("{gd}/type"), b"unknown\n", 0o644)?;
        self.t.put(&format!("{gd}/reserved_regions"), b"", 0o444)?;
        self.t
            .put(&format!("{gd}/name"), b"vfio-noiommu\n", 0o444)?;
        self.t.symlink(&format!("{gd}/devices/{uuid}"), &d)?;
        self.t.symlink(&format!("{d}/iommu_group"), &gd)?;
        let dd = format!("/sys/bus/mdev/drivers/{drv}");
        if !self.t.is_dir(&dd) {
            self.t.put(&format!("{dd}/bind"), b"", 0o200)?;
            self.t.put(&format!("{dd}/unbind"), b"", 0o200)?;
        }
        self.t.symlink(&format!("{d}/driver"), &dd)?;
        self.t.symlink(&format!("{dd}/{uuid}"), &d)?;
        self.t
            .symlink(&format!("/sys/bus/mdev/devices/{uuid}"), &d)?;
        self.t.symlink(&format!("{type_dir}/devices/{uuid}"), &d)?;
        self.add_vfio_dev(&d)?;
        self.ensure_group_node(g)?;
        if parent == MATRIX {
            for f in ["matrix", "guest_matrix", "control_domains"] {
                self.t.put(&format!("{d}/{f}"), b"", 0o444)?;
            }
            for what in ["adapter", "domain", "control_domain"] {
                self.t.put(&format!("{d}/assign_{what}"), b"", 0o200)?;
                self.t.put(&format!("{d}/unassign_{what}"), b"", 0o200)?;
            }
        }
        self.t.set(
            &format!("{type_dir}/available_instances"),
            format!("{}\n", avail - 1),
        )?;
        self.mtty_recount(&parent)
    }

    /// mtty's types share 24 ports: `mtty-N` takes N of them, and each type
    /// offers what is left divided by its N.
    fn mtty_recount(&self, parent: &str) -> Result<(), Errno> {
        if base(parent) != "mtty" {
            return Ok(());
        }
        let ports = |t: &str| -> u32 {
            t.strip_prefix("mtty-")
                .and_then(|n| n.parse().ok())
                .unwrap_or(1)
        };
        let mut used = 0;
        for n in self.t.list(parent) {
            if n.parse::<MdevUuid>().is_ok()
                && let Some(t) = self.t.link_name(&format!("{parent}/{n}/mdev_type"))
            {
                used += ports(&t);
            }
        }
        let types = format!("{parent}/mdev_supported_types");
        for t in self.t.list(&types) {
            let free = 24u32.saturating_sub(used) / ports(&t).max(1);
            self.t.set(
                &format!("{types}/{t}/available_instances"),
                format!("{free}\n"),
            )?;
        }
        Ok(())
    }

    /// `<mdev>/remove`: a nonzero number removes the instance (`EBUSY` while it
    /// is open — the kernel would block), zero does nothing.
    pub(super) fn mdev_remove(&mut self, d: &str, value: &[u8]) -> Result<(), Errno> {
        if kstrtoull(value).map_err(|_| Errno::EINVAL)? == 0 {
            return Ok(());
        }
        let uuid: MdevUuid = base(d).parse().map_err(|_| Errno::ENODEV)?;
        if self.s.mdev_opens.get(&uuid).is_some_and(|n| *n > 0) {
            return Err(Errno::EBUSY);
        }
        let ap_apqns = if split(d).0 == MATRIX {
            self.ap_mdev_apqns(d)
        } else {
            Vec::new()
        };
        let type_dir = self.t.link(&format!("{d}/mdev_type"));
        let g = self.group_of(d);
        self.mtty_forget(uuid);
        if let Some(drv) = self.driver_of(d) {
            self.t
                .unlink(&format!("/sys/bus/mdev/drivers/{drv}/{uuid}"))?;
        }
        self.remove_vfio_dev(d)?;
        self.t.unlink(&format!("/sys/bus/mdev/devices/{uuid}"))?;
        if let Some(td) = &type_dir {
            self.t.unlink(&format!("{td}/devices/{uuid}"))?;
        }
        if let Some(g) = g {
            self.t.rmtree(&format!("/sys/kernel/iommu_groups/{g}"))?;
            self.t.unlink(&format!("/dev/vfio/{g}"))?;
        }
        self.t.rmtree(d)?;
        if let Some(td) = &type_dir {
            let avail = self.dec_attr(td, "available_instances").unwrap_or(0);
            self.t.set(
                &format!("{td}/available_instances"),
                format!("{}\n", avail + 1),
            )?;
        }
        if !ap_apqns.is_empty() {
            self.ap_recompute(ap_apqns)?;
        }
        self.mtty_recount(split(d).0)
    }

    /// The group-path open of an mdev.
    pub(super) fn open_mdev(&mut self, uuid: MdevUuid) -> Result<(), Errno> {
        let link = format!("/sys/bus/mdev/devices/{uuid}");
        if self.kind(&link) != Some(Kind::Link) || self.t.link(&link).is_none() {
            return Err(Errno::ENODEV);
        }
        *self.s.mdev_opens.entry(uuid).or_default() += 1;
        self.ap_refresh_status_of(uuid)
    }
}
