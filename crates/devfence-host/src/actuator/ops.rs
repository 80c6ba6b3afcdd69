//! [`SysfsActuator`]: every [`Actuator`] operation written once over any
//! [`KernelIo`] — the running kernel, the recording fake, the simulated kernel.
//!
//! Each operation follows the same shape:
//!
//! 1. **Check** what can be checked without changing anything (the device
//!    exists, the driver is loaded, the count is in range, the APQNs are free …)
//!    and refuse with nothing written.
//! 2. **Act** with exactly the writes the kernel needs, in the documented order.
//! 3. **Read back** the result from the kernel (skipped in `--dry-run`).
//! 4. On a failed step or read-back, **undo** what was done, and say so in
//!    [`ActError::rollback_failed`] when undoing fails too.
//!
//! Errors name the operation, the path and errno, and give a hint. A VF token
//! never appears in one.

use std::fmt::Write as _;

use devfence_model::{ApMask, ApMatrix, Apqn, Bdf, Guid, IommuGroupId, MdevUuid};

use super::files::{self, FileStepError};
use super::{
    ActError, Actuator, ApMaskKind, ApResource, Errno, GuidKind, KernelIo, MaskEdit, NodeMeta,
    PfCustody, VfToken,
};
use crate::parse::{self, ParseResult};

#[cfg(test)]
mod tests;

const PROBE: &str = "/sys/bus/pci/drivers_probe";
const AP_MATRIX: &str = "/sys/devices/vfio_ap/matrix";
const BDF_HINT: &str = "check the address with `devfence inventory` or `ls /sys/bus/pci/devices` (DDDD:BB:DD.F in lowercase hex, e.g. 0000:3b:00.1); a VF exists only while its PF's sriov_numvfs covers it";
const ROOT_HINT: &str = "devfence must run as root to change the host (sysfs attributes and /dev/vfio nodes are root-only)";

/// The actuator over a [`KernelIo`].
#[derive(Debug)]
pub struct SysfsActuator<K: KernelIo> {
    io: K,
}

fn dev(bdf: Bdf) -> String {
    format!("/sys/bus/pci/devices/{bdf}")
}

fn basename(link_target: &str) -> &str {
    link_target
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(link_target)
}

/// The hint for an errno no step knows better: permissions, or the kernel log.
fn generic_hint(e: Errno) -> String {
    match e {
        Errno::EACCES | Errno::EPERM => ROOT_HINT.to_string(),
        _ => "the kernel logs its reason: check `dmesg | tail`".to_string(),
    }
}

fn unbind_hint(e: Errno) -> String {
    match e {
        Errno::EBUSY => "the device is in use (a VM or another process holds it open, e.g. through /dev/vfio/<group>): stop that user first".to_string(),
        Errno::ENODEV => "the device is no longer bound to that driver (another change raced with this one): re-read the host with `devfence inventory` and retry".to_string(),
        e => generic_hint(e),
    }
}

fn probe_hint(e: Errno) -> String {
    match e {
        Errno::EBUSY => "the device or its IOMMU group is in use (a group member is open through VFIO while a host driver tries to bind): stop the user of the group first".to_string(),
        Errno::ENODEV => "the kernel no longer sees the function, or the driver does not match it: check `devfence inventory`".to_string(),
        e => generic_hint(e),
    }
}

/// Lists up to 8 APQNs, then how many more.
fn apqn_list(q: &[Apqn]) -> String {
    let mut s = q
        .iter()
        .take(8)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if q.len() > 8 {
        let _ = write!(s, " and {} more", q.len() - 8);
    }
    s
}

/// Refuses a name that is not one plain path component (a driver, an mdev
/// parent or type, a netdev), so that no caller can make devfence write outside
/// the directory it means.
fn check_name(op: &str, what: &str, name: &str) -> Result<(), ActError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == '\0' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(ActError::new(
            op,
            format!("{name:?} is not a valid {what}"),
            format!(
                "a {what} is one name without '/', spaces or control characters, as listed in sysfs"
            ),
        ))
    }
}

fn resource(what: ApResource) -> (&'static str, &'static str, u8) {
    match what {
        ApResource::Adapter(a) => ("adapter", "adapter", a),
        ApResource::Domain(d) => ("domain", "domain", d),
        ApResource::ControlDomain(d) => ("control domain", "control_domain", d),
    }
}

fn insert_sorted(v: &mut Vec<u8>, x: u8) {
    if let Err(i) = v.binary_search(&x) {
        v.insert(i, x);
    }
}

impl<K: KernelIo> SysfsActuator<K> {
    /// The actuator acting through `io`.
    pub fn new(io: K) -> Self {
        Self { io }
    }
    /// The kernel seam it acts through.
    pub fn io(&self) -> &K {
        &self.io
    }
    /// Gives the seam back.
    pub fn into_inner(self) -> K {
        self.io
    }

    fn dry(&self) -> bool {
        self.io.is_dry_run()
    }

    /// One write; on failure an error with the path, errno and `hint(errno)`.
    fn w(
        &self,
        op: &str,
        path: &str,
        value: &[u8],
        hint: &dyn Fn(Errno) -> String,
    ) -> Result<(), ActError> {
        self.io.write(path, value).map_err(|e| {
            ActError::new(
                op,
                format!(
                    "the kernel refused the write of {:?}",
                    String::from_utf8_lossy(value)
                ),
                hint(e),
            )
            .with_path(path)
            .with_errno(e)
        })
    }

    fn read_raw(&self, op: &str, path: &str, what: &str) -> Result<Vec<u8>, ActError> {
        self.io.read(path).map_err(|e| {
            ActError::new(op, format!("cannot read {what}"), generic_hint(e))
                .with_path(path)
                .with_errno(e)
        })
    }

    fn read_parsed<T>(
        &self,
        op: &str,
        path: &str,
        what: &str,
        parser: fn(&[u8]) -> ParseResult<T>,
    ) -> Result<T, ActError> {
        let raw = self.read_raw(op, path, what)?;
        parser(&raw).map_err(|why| {
            let shown: String = String::from_utf8_lossy(&raw).chars().take(80).collect();
            ActError::new(
                op,
                format!("{what} reads {shown:?}, which devfence does not understand: {why}"),
                format!("nothing was changed; compare with `cat {path}` and the format in reference/kernel-interfaces.md"),
            )
            .with_path(path)
        })
    }

    /// The basename of a link's target; `None` when there is no link.
    fn link_name(&self, op: &str, path: &str) -> Result<Option<String>, ActError> {
        match self.io.read_link(path) {
            Ok(t) => Ok(Some(basename(&t).to_string())),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(ActError::new(op, "cannot read the link", generic_hint(e))
                .with_path(path)
                .with_errno(e)),
        }
    }

    fn driver_of(&self, op: &str, bdf: Bdf) -> Result<Option<String>, ActError> {
        self.link_name(op, &format!("{}/driver", dev(bdf)))
    }

    /// The directory listing; a missing directory is empty.
    fn list(&self, op: &str, path: &str) -> Result<Vec<String>, ActError> {
        match self.io.list_dir(path) {
            Ok(v) => Ok(v),
            Err(Errno::ENOENT) => Ok(Vec::new()),
            Err(e) => Err(
                ActError::new(op, "cannot list the directory", generic_hint(e))
                    .with_path(path)
                    .with_errno(e),
            ),
        }
    }

    fn require_pci(&self, op: &str, bdf: Bdf) -> Result<(), ActError> {
        let p = dev(bdf);
        if self.io.exists(&p) {
            Ok(())
        } else {
            Err(ActError::new(op, format!("no such PCI function {bdf}"), BDF_HINT).with_path(p))
        }
    }

    /// Undoes a bind: restores `driver_override`, and when the device was
    /// unbound from `unbound` by us, binds it to that driver again.
    fn undo_bind(
        &self,
        mut err: ActError,
        bdf: Bdf,
        old_override: Option<&str>,
        unbound: Option<&str>,
    ) -> ActError {
        let mut fails = Vec::new();
        let ov_path = format!("{}/driver_override", dev(bdf));
        let restore: &[u8] = match old_override {
            Some(v) => v.as_bytes(),
            None => b"\n",
        };
        if let Err(e) = self.io.write(&ov_path, restore) {
            fails.push(format!(
                "restoring {ov_path} to {} failed ({e})",
                old_override.unwrap_or("(null)")
            ));
        }
        if let Some(old) = unbound {
            let b = bdf.to_string();
            let now = self
                .io
                .read_link(&format!("{}/driver", dev(bdf)))
                .map(|t| basename(&t).to_string());
            if now.as_deref() != Ok(old) {
                if let Ok(other) = &now
                    && let Err(e) = self.io.write(
                        &format!("/sys/bus/pci/drivers/{other}/unbind"),
                        b.as_bytes(),
                    )
                {
                    fails.push(format!("unbinding it from {other} failed ({e})"));
                }
                let bind = format!("/sys/bus/pci/drivers/{old}/bind");
                if let Err(e) = self.io.write(&bind, b.as_bytes()) {
                    fails.push(format!(
                        "binding it back to {old} through {bind} failed ({e})"
                    ));
                } else if !self.dry() {
                    let back = self
                        .io
                        .read_link(&format!("{}/driver", dev(bdf)))
                        .map(|t| basename(&t).to_string());
                    if back.as_deref() != Ok(old) {
                        fails.push(format!("it is not bound to {old} again"));
                    }
                }
            }
        }
        if !fails.is_empty() {
            err.rollback_failed = Some(fails.join("; "));
        }
        err
    }

    /// Puts `sriov_numvfs` back to `count`; returns what failed.
    fn restore_numvfs(&self, pf: Bdf, count: u32) -> Vec<String> {
        let path = format!("{}/sriov_numvfs", dev(pf));
        let now = self
            .io
            .read(&path)
            .ok()
            .and_then(|b| parse::decimal_u32(&b).ok());
        if now == Some(count) {
            return Vec::new();
        }
        let mut fails = Vec::new();
        if now != Some(0)
            && let Err(e) = self.io.write(&path, b"0")
        {
            fails.push(format!("writing 0 to {path} failed ({e})"));
            return fails;
        }
        if count != 0
            && let Err(e) = self.io.write(&path, count.to_string().as_bytes())
        {
            fails.push(format!("writing {count} back to {path} failed ({e})"));
        }
        fails
    }

    fn ap_masks(&self, op: &str) -> Result<(ApMask, ApMask), ActError> {
        let hint = "this needs an s390 host with the AP bus (/sys/bus/ap)";
        let read = |p: &str, what: &str| {
            self.read_parsed(op, p, what, parse::ap_mask)
                .map_err(|mut e| {
                    if e.errno == Some(Errno::ENOENT) {
                        e.hint = hint.to_string();
                    }
                    e
                })
        };
        Ok((
            read("/sys/bus/ap/apmask", "apmask")?,
            read("/sys/bus/ap/aqmask", "aqmask")?,
        ))
    }

    /// Every vfio_ap matrix mdev with its `matrix`. A matrix that cannot be
    /// read fails the whole check (fail closed).
    fn matrix_mdevs(&self, op: &str) -> Result<Vec<(MdevUuid, ApMatrix)>, ActError> {
        let mut out = Vec::new();
        for name in self.list(op, AP_MATRIX)? {
            let Ok(uuid) = name.parse::<MdevUuid>() else {
                continue;
            };
            let m = self.read_parsed(
                op,
                &format!("{AP_MATRIX}/{uuid}/matrix"),
                "the matrix of an mdev",
                parse::ap_matrix,
            )?;
            out.push((uuid, m));
        }
        Ok(out)
    }

    /// Whether `what` is assigned to the mdev (read from `matrix` or
    /// `control_domains`), and the mdev's matrix.
    fn ap_assigned(
        &self,
        op: &str,
        mdir: &str,
        what: ApResource,
    ) -> Result<(bool, ApMatrix), ActError> {
        match what {
            ApResource::ControlDomain(d) => {
                let cds = self.read_parsed(
                    op,
                    &format!("{mdir}/control_domains"),
                    "control_domains",
                    parse::control_domains,
                )?;
                Ok((cds.contains(&d), ApMatrix::default()))
            }
            ApResource::Adapter(a) => {
                let m =
                    self.read_parsed(op, &format!("{mdir}/matrix"), "matrix", parse::ap_matrix)?;
                Ok((m.adapters.contains(&a), m))
            }
            ApResource::Domain(d) => {
                let m =
                    self.read_parsed(op, &format!("{mdir}/matrix"), "matrix", parse::ap_matrix)?;
                Ok((m.domains.contains(&d), m))
            }
        }
    }

    fn require_matrix_mdev(&self, op: &str, mdev: MdevUuid) -> Result<String, ActError> {
        let mdir = format!("{AP_MATRIX}/{mdev}");
        if self.io.exists(&mdir) {
            Ok(mdir)
        } else {
            Err(ActError::new(
                op,
                format!("{mdev} is not a vfio_ap matrix mdev"),
                "list the matrix mdevs with `devfence inventory`; create one with `devfence mdev create matrix vfio_ap-passthrough`",
            )
            .with_path(mdir))
        }
    }
}

fn ap_write_hint(e: Errno) -> String {
    match e {
        Errno::EADDRNOTAVAIL => "an APQN of the resulting matrix is still reserved for the host by apmask/aqmask: clear the adapter's bit in apmask or the domain's bit in aqmask first (`devfence ap mask --apmask -N`)".to_string(),
        Errno::EADDRINUSE => "an APQN of the resulting matrix is already assigned to another mdev (an APQN can be in one mdev only): unassign it there first".to_string(),
        Errno::EBUSY | Errno::EAGAIN => "the AP bus is busy (an apmask/aqmask edit or another assignment holds its lock): retry".to_string(),
        Errno::ENODEV => "the id is above the host's maximum (/sys/bus/ap/ap_max_adapter_id or ap_max_domain_id)".to_string(),
        e => generic_hint(e),
    }
}

impl<K: KernelIo> Actuator for SysfsActuator<K> {
    fn bind(&self, bdf: Bdf, driver: &str) -> Result<(), ActError> {
        let op = format!("bind {bdf} to {driver}");
        check_name(&op, "driver name", driver)?;
        self.require_pci(&op, bdf)?;
        let drv_dir = format!("/sys/bus/pci/drivers/{driver}");
        if !self.io.exists(&drv_dir) {
            return Err(ActError::new(
                &op,
                format!("driver {driver} is not loaded"),
                format!("load it with `modprobe {driver}` and retry"),
            )
            .with_path(drv_dir));
        }
        let cur = self.driver_of(&op, bdf)?;
        if cur.as_deref() == Some(driver) {
            return Ok(());
        }
        let ov_path = format!("{}/driver_override", dev(bdf));
        let old_ov = self
            .read_parsed(&op, &ov_path, "driver_override", parse::driver_override)
            .map_err(|mut e| {
                if e.errno == Some(Errno::ENOENT) {
                    e.hint = "this kernel has no driver_override (it needs Linux 3.16 or later); devfence does not fall back to new_id".to_string();
                }
                e
            })?;
        let b = bdf.to_string();
        // 1. driver_override: nothing changes on the host until a probe.
        self.w(&op, &ov_path, driver.as_bytes(), &generic_hint)?;
        // 2. unbind from the current driver.
        let mut unbound = None;
        if let Some(old) = cur.as_deref() {
            let p = format!("/sys/bus/pci/drivers/{old}/unbind");
            if let Err(e) = self.w(&op, &p, b.as_bytes(), &unbind_hint) {
                return Err(self.undo_bind(e, bdf, old_ov.as_deref(), None));
            }
            unbound = Some(old);
        }
        // 3. probe: only `driver` may match now.
        if let Err(e) = self.w(&op, PROBE, b.as_bytes(), &probe_hint) {
            return Err(self.undo_bind(e, bdf, old_ov.as_deref(), unbound));
        }
        if self.dry() {
            return Ok(());
        }
        // 4. read back.
        let link = format!("{}/driver", dev(bdf));
        let err = match self.driver_of(&op, bdf) {
            Ok(Some(d)) if d == driver => return Ok(()),
            Ok(now) => ActError::new(
                &op,
                match now {
                    Some(d) => format!("after drivers_probe the function is bound to {d}, not {driver}"),
                    None => format!("after drivers_probe the function has no driver: {driver} did not claim it"),
                },
                format!("`dmesg` has {driver}'s probe error (vfio-pci refuses bridges and denylisted devices)"),
            )
            .with_path(link),
            Err(e) => e,
        };
        Err(self.undo_bind(err, bdf, old_ov.as_deref(), unbound))
    }

    fn unbind(&self, bdf: Bdf) -> Result<(), ActError> {
        let op = format!("unbind {bdf}");
        self.require_pci(&op, bdf)?;
        let Some(cur) = self.driver_of(&op, bdf)? else {
            return Ok(());
        };
        let p = format!("/sys/bus/pci/drivers/{cur}/unbind");
        self.w(&op, &p, bdf.to_string().as_bytes(), &unbind_hint)?;
        if self.dry() {
            return Ok(());
        }
        match self.driver_of(&op, bdf)? {
            None => Ok(()),
            Some(d) => Err(ActError::new(
                &op,
                format!("the function is still bound to {d} after the unbind"),
                "another agent (udev rule, driverctl, a new_id/ids= match) may have re-bound it: check `dmesg` and the device's driver_override",
            )
            .with_path(format!("{}/driver", dev(bdf)))),
        }
    }

    fn set_num_vfs(&self, pf: Bdf, count: u16) -> Result<(), ActError> {
        let op = format!("set the VF count of {pf} to {count}");
        self.require_pci(&op, pf)?;
        let total_path = format!("{}/sriov_totalvfs", dev(pf));
        if !self.io.exists(&total_path) {
            return Err(ActError::new(
                &op,
                format!("{pf} is not an SR-IOV physical function (it has no sriov_totalvfs)"),
                "only PFs have VFs: use the PF's address (a VF's physfn link names it; `devfence inventory` lists PFs)",
            )
            .with_path(total_path));
        }
        let total = self.read_parsed(&op, &total_path, "sriov_totalvfs", parse::decimal_u32)?;
        let n = u32::from(count);
        if n > total {
            return Err(ActError::new(
                &op,
                format!("the PF supports at most {total} VFs (sriov_totalvfs); the kernel would answer ERANGE"),
                format!("ask for at most {total}"),
            )
            .with_path(total_path));
        }
        let path = format!("{}/sriov_numvfs", dev(pf));
        let cur = self.read_parsed(&op, &path, "sriov_numvfs", parse::decimal_u32)?;
        if cur == n {
            return Ok(());
        }
        let hint = |e: Errno| {
            match e {
            Errno::ENOENT => "the PF has no driver, or its driver cannot create VFs (a PF on vfio-pci needs `enable_sriov=1`: `echo 1 > /sys/module/vfio_pci/parameters/enable_sriov`)".to_string(),
            Errno::EBUSY => "the kernel refuses N→M with both non-zero (devfence writes 0 first), or VFs are in use: stop the VMs using this PF's VFs".to_string(),
            Errno::ERANGE => "more VFs than sriov_totalvfs".to_string(),
            Errno::EPERM => format!("{ROOT_HINT}; some drivers also refuse to remove VFs that are assigned to guests"),
            e => generic_hint(e),
        }
        };
        let zeroed = cur != 0 && n != 0;
        if zeroed {
            self.w(&op, &path, b"0", &hint)?;
        }
        if let Err(mut e) = self.w(&op, &path, n.to_string().as_bytes(), &hint) {
            if zeroed {
                let fails = self.restore_numvfs(pf, cur);
                if !fails.is_empty() {
                    e.rollback_failed = Some(fails.join("; "));
                }
            }
            return Err(e);
        }
        if self.dry() {
            return Ok(());
        }
        let now = self.read_parsed(&op, &path, "sriov_numvfs", parse::decimal_u32)?;
        let missing = (0..n).find(|i| !self.io.exists(&format!("{}/virtfn{i}", dev(pf))));
        let reason = if now != n {
            format!("sriov_numvfs reads {now} after writing {n}")
        } else if let Some(i) = missing {
            format!("sriov_numvfs reads {n} but virtfn{i} does not exist")
        } else {
            return Ok(());
        };
        let mut e = ActError::new(
            &op,
            reason,
            "the PF driver did not create the VFs it reported: check `dmesg`",
        )
        .with_path(path);
        let fails = self.restore_numvfs(pf, cur);
        if !fails.is_empty() {
            e.rollback_failed = Some(fails.join("; "));
        }
        Err(e)
    }

    fn reset(&self, bdf: Bdf) -> Result<(), ActError> {
        let op = format!("reset {bdf}");
        self.require_pci(&op, bdf)?;
        let d = dev(bdf);
        let reset_path = format!("{d}/reset");
        if !self.io.exists(&reset_path) {
            return Err(ActError::new(
                &op,
                "the function has no reset method (there is no reset file)",
                format!("its state cannot be scrubbed in software: `cat {d}/reset_method` lists none; power-cycle the slot through /sys/bus/pci/slots/<n>/power if it is hotplug-capable, or keep the device with one tenant"),
            )
            .with_path(reset_path));
        }
        let vendor = self.read_parsed(&op, &format!("{d}/vendor"), "vendor", parse::hex_u16)?;
        let hint = |e: Errno| {
            match e {
            Errno::ENOTTY => "no reset method worked for this function: check `reset_method` and `dmesg`".to_string(),
            Errno::EAGAIN | Errno::EBUSY => "the device is locked by another operation (another reset, or a bus reset of its slot): retry".to_string(),
            e => generic_hint(e),
        }
        };
        self.w(&op, &reset_path, b"1", &hint)?;
        if self.dry() {
            return Ok(());
        }
        let cfg_path = format!("{d}/config");
        let cfg = self.read_raw(&op, &cfg_path, "config space")?;
        let lost = "the function may be lost or still resetting: check `dmesg`; do not hand it out (a slot power cycle or a host reboot may be needed)";
        let Some(id) = cfg.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]])) else {
            return Err(ActError::new(
                &op,
                format!("config space returned {} bytes after the reset", cfg.len()),
                lost,
            )
            .with_path(cfg_path));
        };
        // A VF's vendor and device id registers read 0xffff by specification
        // (SR-IOV §3.4.1.1; the real kernel shows it on the testbed's igb VFs):
        // for a VF, the class code (which a VF implements) must answer instead.
        if self.io.exists(&format!("{d}/physfn")) {
            let class = self.read_parsed(&op, &format!("{d}/class"), "class", parse::hex_class)?;
            let got = cfg
                .get(9..12)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], 0]));
            return match got {
                Some(c) if c == class => Ok(()),
                Some(0x00ff_ffff) | None => Err(ActError::new(
                    &op,
                    "the VF does not answer after the reset: its config space reads all ones",
                    lost,
                )
                .with_path(cfg_path)),
                Some(c) => Err(ActError::new(
                    &op,
                    format!("after the reset the VF's config space reads class 0x{c:06x}, but its class is 0x{class:06x}"),
                    lost,
                )
                .with_path(cfg_path)),
            };
        }
        if id == 0xffff {
            return Err(ActError::new(
                &op,
                "the function does not answer after the reset: its config space reads vendor id 0xffff",
                lost,
            )
            .with_path(cfg_path));
        }
        if id != vendor {
            return Err(ActError::new(
                &op,
                format!("after the reset config space reads vendor id 0x{id:04x}, but the function's vendor is 0x{vendor:04x}"),
                lost,
            )
            .with_path(cfg_path));
        }
        Ok(())
    }

    fn set_group_node_owner(
        &self,
        group: IommuGroupId,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Result<(), ActError> {
        let node = format!("/dev/vfio/{group}");
        let op = format!("set owner {uid}:{gid} and mode {mode:04o} on {node}");
        if mode > 0o7777 {
            return Err(ActError::new(
                &op,
                format!("mode {mode:o} has bits beyond 7777"),
                "give permission bits only, e.g. 0600",
            ));
        }
        if !self.io.exists(&node) {
            return Err(ActError::new(
                &op,
                format!("there is no {node}"),
                format!("the node appears when a member of IOMMU group {group} is bound to vfio-pci (`devfence bind <bdf> --driver vfio-pci`)"),
            )
            .with_path(node));
        }
        let stat = |op: &str| {
            self.io.stat(&node).map_err(|e| {
                ActError::new(op, "cannot read the node's owner and mode", generic_hint(e))
                    .with_path(&node)
                    .with_errno(e)
            })
        };
        let old = stat(&op)?;
        let want = NodeMeta { uid, gid, mode };
        if old == want {
            return Ok(());
        }
        let undo = |mut e: ActError, chmodded: bool| {
            let mut fails = Vec::new();
            if let Err(x) = self.io.chown(&node, old.uid, old.gid) {
                fails.push(format!(
                    "restoring owner {}:{} failed ({x})",
                    old.uid, old.gid
                ));
            }
            if chmodded && let Err(x) = self.io.chmod(&node, old.mode) {
                fails.push(format!("restoring mode {:04o} failed ({x})", old.mode));
            }
            if !fails.is_empty() {
                e.rollback_failed = Some(fails.join("; "));
            }
            e
        };
        let fail = |what: &str, e: Errno| {
            ActError::new(&op, format!("{what} failed"), generic_hint(e))
                .with_path(&node)
                .with_errno(e)
        };
        self.io
            .chown(&node, uid, gid)
            .map_err(|e| fail("chown", e))?;
        if let Err(e) = self.io.chmod(&node, mode) {
            return Err(undo(fail("chmod", e), false));
        }
        if self.dry() {
            return Ok(());
        }
        let now = stat(&op)?;
        if now == want {
            return Ok(());
        }
        Err(undo(
            ActError::new(
                &op,
                format!(
                    "the node reads back as {}:{} mode {:04o}",
                    now.uid, now.gid, now.mode
                ),
                "another agent (udev rule, libvirt) may have changed it at the same time: check the udev rules for vfio",
            )
            .with_path(&node),
            true,
        ))
    }

    fn mdev_create(&self, parent: &str, type_id: &str, uuid: MdevUuid) -> Result<(), ActError> {
        let op = format!("create mdev {uuid} of type {type_id} on {parent}");
        check_name(&op, "mdev parent", parent)?;
        check_name(&op, "mdev type", type_id)?;
        let parent_path = format!("/sys/class/mdev_bus/{parent}");
        if !self.io.exists(&parent_path) {
            return Err(ActError::new(
                &op,
                format!("{parent} is not an mdev parent"),
                "mdev parents are listed in /sys/class/mdev_bus; the parent's driver must support mdev (e.g. `modprobe mtty` for the sample device, vfio_ap for `matrix`)",
            )
            .with_path(parent_path));
        }
        let types = format!("{parent_path}/mdev_supported_types");
        let type_dir = format!("{types}/{type_id}");
        if !self.io.exists(&type_dir) {
            let have = self.io.list_dir(&types).unwrap_or_default();
            return Err(ActError::new(
                &op,
                format!("{parent} has no mdev type {type_id}"),
                if have.is_empty() {
                    format!("{types} lists no types")
                } else {
                    format!("its types are: {}", have.join(", "))
                },
            )
            .with_path(type_dir));
        }
        let hint = |e: Errno| {
            match e {
            Errno::EEXIST => format!("an mdev with UUID {uuid} already exists: pick a fresh UUID, or remove the old one with `devfence mdev remove {uuid}`"),
            Errno::EUSERS => format!("type {type_id} has no instances left (available_instances is 0): remove an unused mdev of this type or choose another type"),
            Errno::EINVAL => "the kernel refused the UUID or the parent driver refused the request: check `dmesg`".to_string(),
            e => generic_hint(e),
        }
        };
        self.w(
            &op,
            &format!("{type_dir}/create"),
            uuid.to_string().as_bytes(),
            &hint,
        )?;
        if self.dry() {
            return Ok(());
        }
        let mdev = format!("/sys/bus/mdev/devices/{uuid}");
        if !self.io.exists(&mdev) {
            return Err(ActError::new(
                &op,
                "the mdev does not exist after create",
                "the parent driver accepted the request but created nothing: check `dmesg`",
            )
            .with_path(mdev));
        }
        let got = self.link_name(&op, &format!("{mdev}/mdev_type"));
        let err = match got {
            Ok(Some(t)) if t == type_id => return Ok(()),
            Ok(t) => ActError::new(
                &op,
                format!(
                    "the new mdev has type {}",
                    t.as_deref().unwrap_or("(none: no mdev_type link)")
                ),
                "another agent may have created an mdev with this UUID at the same time",
            )
            .with_path(format!("{mdev}/mdev_type")),
            Err(e) => e,
        };
        let mut err = err;
        if let Err(e) = self.io.write(&format!("{mdev}/remove"), b"1") {
            err.rollback_failed = Some(format!("removing it again failed ({e})"));
        }
        Err(err)
    }

    fn mdev_remove(&self, uuid: MdevUuid) -> Result<(), ActError> {
        let op = format!("remove mdev {uuid}");
        let mdev = format!("/sys/bus/mdev/devices/{uuid}");
        if !self.io.exists(&mdev) {
            return Err(ActError::new(
                &op,
                format!("no such mdev {uuid}"),
                "list the mdevs with `devfence inventory` or `ls /sys/bus/mdev/devices`",
            )
            .with_path(mdev));
        }
        let hint = |e: Errno| match e {
            Errno::ENODEV => "the mdev is already gone".to_string(),
            Errno::EAGAIN => {
                "a removal of this mdev is already in progress: wait for it".to_string()
            }
            Errno::EBUSY => {
                "the mdev is in use by a guest: stop the VM (or hot-unplug the device) first"
                    .to_string()
            }
            e => generic_hint(e),
        };
        self.w(&op, &format!("{mdev}/remove"), b"1", &hint)?;
        if self.dry() || !self.io.exists(&mdev) {
            return Ok(());
        }
        Err(ActError::new(
            &op,
            "the mdev still exists after remove",
            "a process still holds it open (the kernel waits for it): find the VM using it",
        )
        .with_path(mdev))
    }

    fn ap_assign(&self, mdev: MdevUuid, what: ApResource) -> Result<(), ActError> {
        let (desc, file, id) = resource(what);
        let op = format!("assign {desc} {id} (0x{id:02x}) to {mdev}");
        let mdir = self.require_matrix_mdev(&op, mdev)?;
        let (assigned, own) = self.ap_assigned(&op, &mdir, what)?;
        if assigned {
            return Ok(());
        }
        if !matches!(what, ApResource::ControlDomain(_)) {
            let mut new = own;
            match what {
                ApResource::Adapter(a) => insert_sorted(&mut new.adapters, a),
                ApResource::Domain(d) => insert_sorted(&mut new.domains, d),
                ApResource::ControlDomain(_) => {}
            }
            let apqns: Vec<Apqn> = new.apqns().collect();
            if !apqns.is_empty() {
                let (apm, aqm) = self.ap_masks(&op)?;
                let reserved: Vec<Apqn> = apqns
                    .iter()
                    .copied()
                    .filter(|q| apm.contains(q.adapter) && aqm.contains(q.domain))
                    .collect();
                if !reserved.is_empty() {
                    return Err(ActError::new(
                        &op,
                        format!(
                            "the matrix would include APQNs reserved for the host by apmask/aqmask: {}; the kernel would answer EADDRNOTAVAIL",
                            apqn_list(&reserved)
                        ),
                        "free them for passthrough first: clear the adapter's bit in apmask or the domain's bit in aqmask (`devfence ap mask --apmask -N` / `--aqmask -N`)",
                    ));
                }
                let mut clashes = Vec::new();
                for (other, m) in self.matrix_mdevs(&op)? {
                    if other == mdev {
                        continue;
                    }
                    let held: Vec<Apqn> =
                        apqns.iter().copied().filter(|q| m.contains(*q)).collect();
                    if !held.is_empty() {
                        clashes.push(format!("{} in mdev {other}", apqn_list(&held)));
                    }
                }
                if !clashes.is_empty() {
                    return Err(ActError::new(
                        &op,
                        format!(
                            "the matrix would include APQNs already assigned to another mdev: {}; the kernel would answer EADDRINUSE",
                            clashes.join("; ")
                        ),
                        "an APQN can be in one mdev only: unassign it there first (`devfence ap unassign <mdev> --adapter N` / `--domain N`), or assign other adapters or domains",
                    ));
                }
            }
        }
        let wpath = format!("{mdir}/assign_{file}");
        self.w(&op, &wpath, id.to_string().as_bytes(), &ap_write_hint)?;
        if self.dry() {
            return Ok(());
        }
        let err = match self.ap_assigned(&op, &mdir, what) {
            Ok((true, _)) => return Ok(()),
            Ok((false, _)) => ActError::new(
                &op,
                format!("the {desc} is not in the mdev after the assign"),
                "check `dmesg`",
            )
            .with_path(&mdir),
            Err(e) => e,
        };
        let mut err = err;
        let undo = format!("{mdir}/unassign_{file}");
        if let Err(e) = self.io.write(&undo, id.to_string().as_bytes()) {
            err.rollback_failed = Some(format!("unassigning it again through {undo} failed ({e})"));
        }
        Err(err)
    }

    fn ap_unassign(&self, mdev: MdevUuid, what: ApResource) -> Result<(), ActError> {
        let (desc, file, id) = resource(what);
        let op = format!("unassign {desc} {id} (0x{id:02x}) from {mdev}");
        let mdir = self.require_matrix_mdev(&op, mdev)?;
        if !self.ap_assigned(&op, &mdir, what)?.0 {
            return Ok(());
        }
        let wpath = format!("{mdir}/unassign_{file}");
        self.w(&op, &wpath, id.to_string().as_bytes(), &ap_write_hint)?;
        if self.dry() || !self.ap_assigned(&op, &mdir, what)?.0 {
            return Ok(());
        }
        Err(ActError::new(
            &op,
            format!("the {desc} is still in the mdev after the unassign"),
            "check `dmesg`",
        )
        .with_path(mdir))
    }

    fn ap_set_mask(&self, which: ApMaskKind, edit: &MaskEdit) -> Result<ApMask, ActError> {
        let (name, path) = match which {
            ApMaskKind::Apmask => ("apmask", "/sys/bus/ap/apmask"),
            ApMaskKind::Aqmask => ("aqmask", "/sys/bus/ap/aqmask"),
        };
        let op = format!("set {name} to {edit}");
        let (apm, aqm) = self.ap_masks(&op)?;
        let cur = match which {
            ApMaskKind::Apmask => apm,
            ApMaskKind::Aqmask => aqm,
        };
        let new = edit.apply(&cur);
        if new == cur {
            return Ok(cur);
        }
        let (napm, naqm) = match which {
            ApMaskKind::Apmask => (new, aqm),
            ApMaskKind::Aqmask => (apm, new),
        };
        // APQNs the edit hands to the host: usable after (adapter and domain bit
        // set), not before.
        let newly = |q: Apqn| {
            napm.contains(q.adapter)
                && naqm.contains(q.domain)
                && !(apm.contains(q.adapter) && aqm.contains(q.domain))
        };
        let mut clashes = Vec::new();
        for (mdev, m) in self.matrix_mdevs(&op)? {
            let held: Vec<Apqn> = m.apqns().filter(|q| newly(*q)).collect();
            if !held.is_empty() {
                clashes.push(format!("{} in mdev {mdev}", apqn_list(&held)));
            }
        }
        if !clashes.is_empty() {
            return Err(ActError::new(
                &op,
                format!("the edit would hand the host APQNs that matrix mdevs hold: {}; the kernel would answer EBUSY", clashes.join("; ")),
                "unassign them from the mdev first (`devfence ap unassign <mdev> --adapter N` / `--domain N`), or leave those bits clear",
            )
            .with_path(path));
        }
        let hint = |e: Errno| {
            match e {
            Errno::EBUSY => "an APQN that would return to the host is assigned to a matrix mdev (`dmesg` names it): unassign it first".to_string(),
            Errno::EINVAL => "the kernel did not accept the expression".to_string(),
            Errno::EINTR => "the edit was interrupted while waiting for the AP bus lock: retry".to_string(),
            e => generic_hint(e),
        }
        };
        self.w(&op, path, edit.kernel_form().as_bytes(), &hint)?;
        if self.dry() {
            return Ok(new);
        }
        let back = self.read_parsed(&op, path, name, parse::ap_mask)?;
        if back == new {
            return Ok(back);
        }
        Err(ActError::new(
            &op,
            format!("{name} reads back {back}, expected {new}"),
            "another process edited the mask at the same time: re-read the host with `devfence inventory` before retrying",
        )
        .with_path(path))
    }

    fn set_vf_guid(&self, pf: Bdf, vf_index: u32, node: Guid, port: Guid) -> Result<(), ActError> {
        let op = format!("set the GUIDs of VF {vf_index} of {pf}");
        for (what, g) in [("node", node), ("port", port)] {
            if g.is_reserved() {
                return Err(ActError::new(
                    &op,
                    format!(
                        "the {what} GUID {g} is reserved: zero and all-ones never name a real port"
                    ),
                    "use a GUID from devfence's pool (never zero, all-ones, or issued before)",
                ));
            }
        }
        self.require_pci(&op, pf)?;
        let d = dev(pf);
        let net = format!("{d}/net");
        let Some(netdev) = self.list(&op, &net)?.into_iter().next() else {
            return Err(ActError::new(
                &op,
                format!("{pf} has no network interface, so its VF GUIDs cannot be set"),
                "VF GUIDs are set through the PF's IPoIB interface: bind the PF to mlx5_core and load ib_ipoib (`modprobe ib_ipoib`)",
            )
            .with_path(net));
        };
        check_name(&op, "network interface name", &netdev)?;
        let vf_link = format!("{d}/virtfn{vf_index}");
        let Some(vf_name) = self.link_name(&op, &vf_link)? else {
            return Err(ActError::new(
                &op,
                format!("{pf} has no VF {vf_index}"),
                format!("create VFs first (`devfence vfs {pf} --count N`); VF indexes start at 0"),
            )
            .with_path(vf_link));
        };
        let vf: Bdf = vf_name.parse().map_err(|e| {
            ActError::new(
                &op,
                format!("virtfn{vf_index} points at {vf_name:?}, which is not a PCI address ({e})"),
                "check the link with `ls -l`",
            )
            .with_path(&vf_link)
        })?;
        let vf_driver = self.driver_of(&op, vf)?;
        let guid_hint = |e: Errno| match e {
            Errno::EOPNOTSUPP => format!(
                "{netdev} cannot set VF GUIDs: it must be the IPoIB interface of an mlx5 PF whose port is InfiniBand"
            ),
            Errno::EINVAL => {
                format!("the kernel refused VF {vf_index} (is it below sriov_numvfs?)")
            }
            e => generic_hint(e),
        };
        let set = |kind: GuidKind, g: Guid| {
            self.io
                .set_vf_guid(&netdev, vf_index, kind, g)
                .map_err(|e| {
                    ActError::new(
                    &op,
                    format!(
                        "the kernel refused to set the {} GUID {g} through {netdev} (rtnetlink)",
                        if kind == GuidKind::Node { "node" } else { "port" }
                    ),
                    guid_hint(e),
                )
                .with_path(format!("{net}/{netdev}"))
                .with_errno(e)
                })
        };
        set(GuidKind::Node, node)?;
        if let Err(mut e) = set(GuidKind::Port, port) {
            e.rollback_failed = Some(format!(
                "the node GUID {node} was already set (it takes effect at the VF's next bind); the kernel does not report the previous value, so it cannot be restored"
            ));
            return Err(e);
        }
        // Rebind the VF to its driver so that the new GUIDs take effect.
        let vb = vf.to_string();
        if let Some(drv) = vf_driver.as_deref() {
            self.w(
                &op,
                &format!("/sys/bus/pci/drivers/{drv}/unbind"),
                vb.as_bytes(),
                &unbind_hint,
            )?;
            if let Err(mut e) = self.w(&op, PROBE, vb.as_bytes(), &probe_hint) {
                let bind = format!("/sys/bus/pci/drivers/{drv}/bind");
                if let Err(x) = self.io.write(&bind, vb.as_bytes()) {
                    e.rollback_failed = Some(format!("binding {vf} back to {drv} failed ({x})"));
                }
                return Err(e);
            }
        }
        if self.dry() {
            return Ok(());
        }
        if let Some(drv) = vf_driver.as_deref() {
            let now = self.driver_of(&op, vf)?;
            if now.as_deref() != Some(drv) {
                return Err(ActError::new(
                    &op,
                    format!("VF {vf} is not bound to {drv} again after the rebind (now: {})", now.as_deref().unwrap_or("no driver")),
                    format!("`dmesg` has the probe error; bind it with `devfence bind {vf} --driver {drv}`"),
                )
                .with_path(format!("{}/driver", dev(vf))));
            }
        }
        // Read the port GUID back: OFED's sriov/<N>/port, else the VF's own IB port.
        let ofed = format!("{d}/sriov/{vf_index}/port");
        let (got, from) = if self.io.exists(&ofed) {
            (
                self.read_parsed(&op, &ofed, "the OFED VF port GUID", parse::ofed_guid)?,
                ofed,
            )
        } else {
            let ibdir = format!("{}/infiniband", dev(vf));
            let Some(ib) = self.list(&op, &ibdir)?.into_iter().next() else {
                return Err(ActError::new(
                    &op,
                    format!(
                        "the port GUID of VF {vf_index} ({vf}) cannot be read back: there is no {ofed} (OFED) and the VF has no InfiniBand device (driver: {})",
                        vf_driver.as_deref().unwrap_or("none")
                    ),
                    format!("devfence does not trust a GUID it cannot read back: bind the VF to mlx5_core with mlx5_ib loaded (`devfence bind {vf} --driver mlx5_core`) and set the GUIDs again"),
                )
                .with_path(ibdir));
            };
            let gid = format!("{ibdir}/{ib}/ports/1/gids/0");
            (
                self.read_parsed(&op, &gid, "the VF's GID 0", parse::gid_port_guid)?,
                gid,
            )
        };
        if got == port {
            return Ok(());
        }
        Err(ActError::new(
            &op,
            format!("the VF's port GUID reads back {got}, not {port}"),
            "the VF did not pick up the new GUID: check `dmesg`; the VF must pass through its host driver (unbind + probe) after the GUID is set",
        )
        .with_path(from))
    }

    fn custody_pf(&self, pf: Bdf) -> Result<PfCustody, ActError> {
        let op = format!("take custody of PF {pf}");
        self.require_pci(&op, pf)?;
        let d = dev(pf);
        let drv = self.driver_of(&op, pf)?;
        if drv.as_deref() != Some("vfio-pci") {
            return Err(ActError::new(
                &op,
                format!(
                    "{pf} is bound to {}, not vfio-pci",
                    drv.as_deref().unwrap_or("no driver")
                ),
                format!("only a PF driven from user space has a VF token: `devfence bind {pf} --driver vfio-pci`"),
            )
            .with_path(format!("{d}/driver")));
        }
        let total = format!("{d}/sriov_totalvfs");
        if !self.io.exists(&total) {
            return Err(ActError::new(
                &op,
                format!("{pf} is not an SR-IOV physical function"),
                "VF tokens exist only on SR-IOV PFs: give the PF's address",
            )
            .with_path(total));
        }
        let glink = format!("{d}/iommu_group");
        // A link that points outside /sys/kernel/iommu_groups is malformed, not
        // missing: say where it points instead of blaming the IOMMU setting.
        if let Ok(t) = self.io.read_link(&glink) {
            let resolved = crate::root::resolve_target(&glink, &t);
            let parent = resolved.rsplit_once('/').map_or("", |(p, _)| p);
            if parent != "/sys/kernel/iommu_groups" {
                return Err(ActError::new(
                    &op,
                    format!(
                        "the iommu_group link of {pf} is malformed: it points at {resolved} ({t:?}), not at /sys/kernel/iommu_groups/<N>"
                    ),
                    "the kernel links every device of an IOMMU to its group there; something rewrote this link — check the host (`ls -l`) before trusting the device",
                )
                .with_path(glink));
            }
        }
        let Some(gname) = self.link_name(&op, &glink)? else {
            return Err(ActError::new(
                &op,
                format!("{pf} has no IOMMU group"),
                "enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line); VFIO needs it",
            )
            .with_path(glink));
        };
        let group: IommuGroupId = gname.parse().map_err(|e| {
            ActError::new(
                &op,
                format!("the iommu_group link names {gname:?}, not a group number ({e})"),
                "check the link with `ls -l`",
            )
            .with_path(&glink)
        })?;
        let node = format!("/dev/vfio/{group}");
        let hint = |e: Errno| {
            match e {
            Errno::EACCES => "a VF of this PF is open (in use by a VM): the kernel then requires the current VF token to open the PF; stop those VMs first".to_string(),
            Errno::EBUSY => format!("another process (or an earlier custody) holds {node} open: only one process may hold a group"),
            Errno::ENOENT => format!("{node} or /dev/vfio/vfio is missing: is vfio-pci loaded and the PF bound to it?"),
            Errno::EPERM => format!("{ROOT_HINT}; or the group is not viable: every member must be on vfio-pci, pci-stub, pcieport or no driver (`devfence check`)"),
            Errno::EPROTO | Errno::EOPNOTSUPP => "the kernel's VFIO has another API version or no type1v2 IOMMU".to_string(),
            e => generic_hint(e),
        }
        };
        let handle = self.io.open_pf(pf, group).map_err(|e| {
            ActError::new(&op, "opening the PF through VFIO failed", hint(e))
                .with_path(&node)
                .with_errno(e)
        })?;
        Ok(PfCustody { pf, handle })
    }

    fn rekey_vf_token(&self, custody: &mut PfCustody) -> Result<VfToken, ActError> {
        let op = format!("set a new VF token on PF {}", custody.pf);
        let token = VfToken::fresh().map_err(|e| {
            ActError::new(
                &op,
                "the system's random source failed",
                "check the kernel's entropy source (getrandom)",
            )
            .with_errno(e)
        })?;
        custody.handle.set_vf_token(&token).map_err(|e| {
            ActError::new(
                &op,
                "VFIO_DEVICE_FEATURE (SET PCI_VF_TOKEN) failed",
                match e {
                    Errno::ENOTTY => {
                        "the device has no VF token: it must be an SR-IOV PF bound to vfio-pci"
                            .to_string()
                    }
                    e => generic_hint(e),
                },
            )
            .with_errno(e)
        })?;
        Ok(token)
    }

    fn deliver_token(
        &self,
        path: &str,
        token: &VfToken,
        uid: u32,
        gid: u32,
    ) -> Result<(), FileStepError> {
        files::deliver_token(&self.io, path, token, uid, gid)
    }

    fn withdraw_token(&self, path: &str) -> Result<bool, FileStepError> {
        files::withdraw_token(&self.io, path)
    }

    fn void_device_state(&self, dir: &str, device: &str) -> Result<u32, FileStepError> {
        files::void_device_state(&self.io, dir, device)
    }
}
