//! The acting commands: thin over the actuator of `devfence-host`.
//!
//! Which kernel acts: the running one when the root is `/`; the simulated kernel
//! when the root is a simulated host (written by `devfence sim generate`, marked by
//! [`sim::SIMULATED_MARKER`]). Any other root is refused: writing sysfs attributes
//! into a copy of a host would change nothing and prove nothing.

use std::io::Write;
use std::path::Path;

use anyhow::{Result, bail};
use devfence_engine::store::DeviceRecord;
use devfence_engine::{AuditEvent, AuditKind, DeviceState, SqliteStore, StoreExt};
use devfence_host::actuator::ops::SysfsActuator;
use devfence_host::actuator::recording::RecordingIo;
use devfence_host::actuator::{ActError, Actuator, ApMaskKind, ApResource, MaskEdit};
use devfence_host::{HostRoot, read_inventory};
use devfence_model::{ApMask, Bdf, DeviceId, Inventory, MdevUuid, PciFunction};

use crate::Outcome;
use crate::cli::{
    ActFlags, ApAssignArgs, ApCommand, ApMaskArgs, BindArgs, MdevCommand, ResetArgs, UnbindArgs,
    VfsArgs,
};
use devfence_app::Kernel;

/// One acting command's work: operations on the actuator, then a line saying what
/// reads back. The error is boxed: an `ActError` carries path, errno and hint.
type Step<'a> = dyn Fn(&dyn Actuator) -> Result<String, Box<ActError>> + 'a;

/// Runs `f` on the actuator over `kernel`, or over a recorder for `--dry-run`, and
/// reports what happened.
fn act(
    kernel: &Kernel,
    flags: &ActFlags,
    what: &str,
    out: &mut dyn Write,
    f: &Step<'_>,
) -> Result<Outcome> {
    if flags.dry_run {
        let rec = RecordingIo::dry_run(kernel.io());
        let result = f(&SysfsActuator::new(&rec));
        let steps = rec.op_lines();
        if flags.json {
            let v = serde_json::json!({
                "operation": what,
                "kernel": kernel.name(),
                "dry_run": true,
                "steps": steps,
                "refused": result.as_ref().err().map(ToString::to_string),
            });
            serde_json::to_writer_pretty(&mut *out, &v)?;
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "{what} ({}, dry run): {} write(s) would be made",
                kernel.name(),
                steps.len()
            )?;
            for s in &steps {
                writeln!(out, "  {s}")?;
            }
        }
        result?;
        return Ok(Outcome::Ok);
    }
    let done = f(&SysfsActuator::new(kernel.io()))?;
    if flags.json {
        let v = serde_json::json!({
            "operation": what,
            "kernel": kernel.name(),
            "dry_run": false,
            "result": done,
        });
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{what} ({}): {done}", kernel.name())?;
    }
    Ok(Outcome::Ok)
}

// ----------------------------------------------------------------------
// Held devices: an acting command does not change what the ledger holds.

/// Every device the ledger holds (any state but `Free`); none without a ledger
/// (an acting command never creates one).
fn holdings(root: &HostRoot, ledger: Option<&Path>) -> Result<Vec<DeviceRecord>> {
    let path = crate::ledger::ledger_path(root, ledger)?;
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut store = SqliteStore::open(&path)?;
    let all = store.atomically(|tx| tx.devices())?;
    Ok(all
        .into_iter()
        .filter(|d| d.state != DeviceState::Free)
        .collect())
}

/// How an action on the PCI function `t` touches the held device `held`: it is
/// `t`, a VF of `t`, in `t`'s IOMMU group (a host driver there breaks the group's
/// isolation) or an mdev on `t`.
fn touches_pci(inv: &Inventory, t: Bdf, held: &DeviceId) -> Option<String> {
    match held {
        DeviceId::Pci(b) if *b == t => Some(format!("{t} itself")),
        DeviceId::Pci(b) => {
            let f = inv.pci_function(*b)?;
            if f.physfn == Some(t) {
                return Some(format!("{b}, a VF of {t}"));
            }
            let g = f.iommu_group?;
            (inv.pci_function(t)?.iommu_group == Some(g))
                .then(|| format!("{b}, in IOMMU group {g} with {t}"))
        }
        DeviceId::Mdev(u) => inv
            .mdevs
            .iter()
            .find(|m| m.uuid == *u && m.parent == t.to_string())
            .map(|_| format!("mdev {u}, on {t}")),
        _ => None,
    }
}

/// Refuses `what` when it touches a device the ledger holds (`touches` says how,
/// per held device), unless `--force`; a forced action is recorded in the audit
/// chain — before it is taken — with every held device it touches.
fn guard(
    root: &HostRoot,
    ledger: Option<&Path>,
    flags: &ActFlags,
    what: &str,
    touches: &dyn Fn(&Inventory, &DeviceRecord) -> Option<String>,
) -> Result<()> {
    let held = holdings(root, ledger)?;
    if held.is_empty() {
        return Ok(());
    }
    let inv = read_inventory(root)?;
    let hit: Vec<(&DeviceRecord, String)> = held
        .iter()
        .filter_map(|r| touches(&inv, r).map(|how| (r, how)))
        .collect();
    if hit.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = hit
        .iter()
        .map(|(r, how)| format!("{how} is {}", r.state))
        .collect();
    if !flags.force {
        let first = hit[0].0.device;
        bail!(
            "Refused: {what} would change what the ledger holds: {}. Hint: release it first \
             (`devfence release {first}`; a running VM's device is released when the VM stops), \
             or give --force to act anyway — recorded in the audit chain, and the libvirt hook \
             re-verifies (and quarantines) a changed device before its VM starts",
            list.join("; ")
        );
    }
    if flags.dry_run {
        return Ok(());
    }
    let path = crate::ledger::ledger_path(root, ledger)?;
    let mut store = SqliteStore::open(&path)?;
    store.atomically(|tx| {
        for (r, how) in &hit {
            tx.audit(&AuditEvent {
                kind: AuditKind::Ledger,
                device: Some(r.device),
                tenant: r.state.tenant().cloned(),
                detail: serde_json::json!({
                    "action": "force", "command": what, "touches": how, "state": r.state.to_string(),
                }),
            })?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The APQNs the held device `r` stands for: a matrix mdev's, or an APQN's own.
fn held_apqns(inv: &Inventory, r: &DeviceRecord) -> Vec<devfence_model::Apqn> {
    match &r.device {
        DeviceId::Apqn(q) => vec![*q],
        DeviceId::Mdev(u) => inv
            .ap
            .iter()
            .flat_map(|ap| ap.matrix_mdevs.iter())
            .filter(|m| m.uuid == *u)
            .filter_map(|m| m.matrix.as_ref())
            .flat_map(|m| m.apqns().collect::<Vec<_>>())
            .collect(),
        _ => Vec::new(),
    }
}

fn bdf(s: &str) -> Result<Bdf> {
    s.parse::<Bdf>().map_err(|e| {
        anyhow::anyhow!("{e}. Hint: `devfence inventory` lists the host's PCI functions")
    })
}

fn uuid(s: &str) -> Result<MdevUuid> {
    s.parse::<MdevUuid>()
        .map_err(|e| anyhow::anyhow!("{e}. Hint: `devfence inventory` lists the host's mdevs"))
}

/// The other endpoints of `dev`'s IOMMU group (bridges and ports left out: they
/// are `pcieport` and stay there).
fn group_companions(root: &HostRoot, dev: Bdf) -> Result<Vec<PciFunction>> {
    let inv = read_inventory(root)?;
    let Some(f) = inv.pci_function(dev) else {
        return Ok(Vec::new());
    };
    let Some(g) = f.iommu_group.and_then(|g| inv.group(g)) else {
        return Ok(Vec::new());
    };
    Ok(g.members
        .iter()
        .filter_map(|m| m.parse::<Bdf>().ok())
        .filter(|b| *b != dev)
        .filter_map(|b| inv.pci_function(b).cloned())
        .filter(|p| !p.is_bridge())
        .collect())
}

fn dma_managed(driver: Option<&str>, wanted: &str) -> bool {
    match driver {
        None => true,
        Some(d) => {
            d == wanted || d == "pci-stub" || d.ends_with("vfio-pci") || d.ends_with("vfio_pci")
        }
    }
}

/// `devfence bind`.
pub fn bind(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &BindArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let dev = bdf(&a.device)?;
    let kernel = Kernel::for_root(root)?;
    let companions = group_companions(root, dev)?;
    let stray: Vec<&PciFunction> = companions
        .iter()
        .filter(|p| !dma_managed(p.driver.as_deref(), &a.driver))
        .collect();
    let mut targets: Vec<Bdf> = Vec::new();
    if a.with_group {
        targets.extend(stray.iter().map(|p| p.bdf));
    } else if !stray.is_empty() {
        let names: Vec<String> = stray
            .iter()
            .map(|p| format!("{} ({})", p.bdf, p.driver.as_deref().unwrap_or("no driver")))
            .collect();
        writeln!(
            out,
            "note: {dev} shares its IOMMU group with {}; the group cannot be handed out while they stay on \
             host drivers. Rerun with --with-group to bind them to {} too.",
            names.join(", "),
            a.driver
        )?;
    }
    targets.push(dev);
    let what = if targets.len() > 1 {
        format!("bind {} to {} (with its group)", dev, a.driver)
    } else {
        format!("bind {dev} to {}", a.driver)
    };
    guard(root, ledger, &a.act, &what, &|inv, r| {
        targets.iter().find_map(|t| touches_pci(inv, *t, &r.device))
    })?;
    act(&kernel, &a.act, &what, out, &|x| {
        for t in &targets {
            x.bind(*t, &a.driver)?;
        }
        let list: Vec<String> = targets.iter().map(ToString::to_string).collect();
        Ok(format!(
            "driver link of {} reads {}",
            list.join(", "),
            a.driver
        ))
    })
}

/// `devfence unbind`.
pub fn unbind(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &UnbindArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let dev = bdf(&a.device)?;
    let kernel = Kernel::for_root(root)?;
    let mut targets: Vec<Bdf> = Vec::new();
    let companions = group_companions(root, dev)?;
    if a.with_group {
        targets.extend(
            companions
                .iter()
                .filter(|p| p.driver.is_some())
                .map(|p| p.bdf),
        );
    } else if !companions.is_empty() {
        let names: Vec<String> = companions.iter().map(|p| p.bdf.to_string()).collect();
        writeln!(
            out,
            "note: {dev} is in an IOMMU group with {}; --with-group unbinds them too.",
            names.join(", ")
        )?;
    }
    targets.push(dev);
    guard(root, ledger, &a.act, &format!("unbind {dev}"), &|inv, r| {
        targets.iter().find_map(|t| touches_pci(inv, *t, &r.device))
    })?;
    act(&kernel, &a.act, &format!("unbind {dev}"), out, &|x| {
        for t in &targets {
            x.unbind(*t)?;
        }
        Ok("no driver bound".to_string())
    })
}

/// `devfence vfs`.
pub fn vfs(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &VfsArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let pf = bdf(&a.pf)?;
    let kernel = Kernel::for_root(root)?;
    guard(
        root,
        ledger,
        &a.act,
        &format!("vfs {pf} --count {}", a.count),
        &|inv, r| touches_pci(inv, pf, &r.device),
    )?;
    act(
        &kernel,
        &a.act,
        &format!("set {pf} to {} VFs", a.count),
        out,
        &|x| {
            x.set_num_vfs(pf, a.count)?;
            Ok(format!(
                "sriov_numvfs reads {} and the VF links are there",
                a.count
            ))
        },
    )
}

/// `devfence reset`.
pub fn reset(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &ResetArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let dev = bdf(&a.device)?;
    let kernel = Kernel::for_root(root)?;
    guard(root, ledger, &a.act, &format!("reset {dev}"), &|inv, r| {
        touches_pci(inv, dev, &r.device)
    })?;
    act(&kernel, &a.act, &format!("reset {dev}"), out, &|x| {
        x.reset(dev)?;
        Ok("the function answers (vendor id reads back)".to_string())
    })
}

/// A fresh random (version 4) UUID for a new mdev.
fn fresh_uuid() -> Result<MdevUuid> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| anyhow::anyhow!("Cannot get random bytes for a UUID: {e}"))?;
    devfence_model::make_uuid_v4(&mut b);
    Ok(MdevUuid(b))
}

/// `devfence mdev …`.
pub fn mdev(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &MdevCommand,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let kernel = Kernel::for_root(root)?;
    match c {
        MdevCommand::Create {
            parent,
            type_id,
            uuid: u,
            act: flags,
        } => {
            let id = match u {
                Some(s) => uuid(s)?,
                None => fresh_uuid()?,
            };
            act(
                &kernel,
                flags,
                &format!("create mdev {id} ({type_id} on {parent})"),
                out,
                &|x| {
                    x.mdev_create(parent, type_id, id)?;
                    Ok(format!(
                        "/sys/bus/mdev/devices/{id} exists with type {type_id}"
                    ))
                },
            )
        }
        MdevCommand::Remove {
            uuid: u,
            act: flags,
        } => {
            let id = uuid(u)?;
            guard(
                root,
                ledger,
                flags,
                &format!("mdev remove {id}"),
                &|_, r| (r.device == DeviceId::Mdev(id)).then(|| format!("mdev {id} itself")),
            )?;
            act(&kernel, flags, &format!("remove mdev {id}"), out, &|x| {
                x.mdev_remove(id)?;
                Ok("gone".to_string())
            })
        }
    }
}

fn ap_resources(a: &ApAssignArgs) -> Result<Vec<ApResource>> {
    let mut v: Vec<ApResource> = a.adapter.iter().map(|n| ApResource::Adapter(*n)).collect();
    v.extend(a.domain.iter().map(|n| ApResource::Domain(*n)));
    v.extend(
        a.control_domain
            .iter()
            .map(|n| ApResource::ControlDomain(*n)),
    );
    if v.is_empty() {
        bail!("Nothing to assign. Hint: give --adapter, --domain or --control-domain (repeatable)");
    }
    Ok(v)
}

/// `devfence ap …`.
pub fn ap(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &ApCommand,
    out: &mut dyn Write,
) -> Result<Outcome> {
    match c {
        ApCommand::Assign(a) | ApCommand::Unassign(a) => {
            let assign = matches!(c, ApCommand::Assign(_));
            let m = uuid(&a.mdev)?;
            let res = ap_resources(a)?;
            let kernel = Kernel::for_root(root)?;
            let verb = if assign { "assign" } else { "unassign" };
            guard(
                root,
                ledger,
                &a.act,
                &format!("ap {verb} on {m}"),
                &|_, r| (r.device == DeviceId::Mdev(m)).then(|| format!("matrix mdev {m} itself")),
            )?;
            act(
                &kernel,
                &a.act,
                &format!("{verb} {res:?} on matrix mdev {m}"),
                out,
                &|x| {
                    for r in &res {
                        if assign {
                            x.ap_assign(m, *r)?;
                        } else {
                            x.ap_unassign(m, *r)?;
                        }
                    }
                    Ok("matrix reads back as asked".to_string())
                },
            )
        }
        ApCommand::Mask(a) => mask(root, ledger, a, out),
    }
}

fn mask(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &ApMaskArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let mut edits = Vec::new();
    if let Some(e) = &a.apmask {
        edits.push((
            ApMaskKind::Apmask,
            e.parse::<MaskEdit>()
                .map_err(|e| anyhow::anyhow!("--apmask: {e}"))?,
        ));
    }
    if let Some(e) = &a.aqmask {
        edits.push((
            ApMaskKind::Aqmask,
            e.parse::<MaskEdit>()
                .map_err(|e| anyhow::anyhow!("--aqmask: {e}"))?,
        ));
    }
    if edits.is_empty() {
        bail!("Nothing to edit. Hint: give --apmask EXPR and/or --aqmask EXPR");
    }
    let kernel = Kernel::for_root(root)?;
    // An APQN is touched when the edit sets its adapter's apmask bit or its
    // domain's aqmask bit: the host may then take the guest's queue (DESIGN.md
    // L5). Clearing a bit only takes queues from the host and stays allowed.
    let changed = |inv: &Inventory, which: ApMaskKind| -> Vec<u8> {
        let cur = inv.ap.as_ref().and_then(|ap| match which {
            ApMaskKind::Apmask => ap.apmask,
            ApMaskKind::Aqmask => ap.aqmask,
        });
        // An unreadable mask: every bit the edit sets counts (fail closed).
        let cur = cur.unwrap_or(ApMask::NONE);
        edits
            .iter()
            .filter(|(w, _)| *w == which)
            .flat_map(|(_, e)| {
                let new = e.apply(&cur);
                (0..=255u8)
                    .filter(|n| new.contains(*n) && !cur.contains(*n))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    guard(root, ledger, &a.act, "ap mask", &|inv, r| {
        let (ads, doms) = (
            changed(inv, ApMaskKind::Apmask),
            changed(inv, ApMaskKind::Aqmask),
        );
        let q: Vec<String> = held_apqns(inv, r)
            .into_iter()
            .filter(|q| ads.contains(&q.adapter) || doms.contains(&q.domain))
            .map(|q| q.to_string())
            .collect();
        (!q.is_empty()).then(|| format!("APQN(s) {} of {}", q.join(", "), r.device))
    })?;
    act(&kernel, &a.act, "edit the AP masks", out, &|x| {
        let mut done = Vec::new();
        for (which, e) in &edits {
            let m = x.ap_set_mask(*which, e)?;
            let name = match which {
                ApMaskKind::Apmask => "apmask",
                ApMaskKind::Aqmask => "aqmask",
            };
            done.push(format!("{name} reads {m}"));
        }
        Ok(done.join("; "))
    })
}
