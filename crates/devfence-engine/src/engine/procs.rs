//! The handover procedures per device kind: scrub (revoke everything of the old
//! tenant, verified) and prepare (give the new tenant exactly what it needs,
//! verified), and recovery of an interrupted operation.
//!
//! Step order is the journal order; [`plan`] lists the same steps without
//! acting (a test keeps the two in step).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Instant;

use devfence_fabric::{Expectation, PartitionKey, Programmed, Unverified, wait_verified_with};
use devfence_host::actuator::ops::SysfsActuator;
use devfence_host::actuator::{ActError, Actuator, ApResource, KernelIo, VfToken};
use devfence_model::{
    Bdf, DeviceId, Guid, Inventory, IommuGroupId, MdevUuid, Membership, PKey, Severity, TenantId,
};
use serde_json::{Value, json};

use super::{DeviceKind, Engine, EngineError, Progress, Run, StepFailure};
use crate::audit::{AuditEvent, AuditKind};
use crate::store::{
    DeviceState, GuidRecord, GuidState, Operation, Outcome, StepState, StoreError, StoreExt, Tenant,
};

/// How a successful procedure ended.
pub(crate) struct Finish {
    pub(crate) device: DeviceId,
    pub(crate) state: DeviceState,
    pub(crate) token_file: Option<String>,
}

/// One step or gate of a plan.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PlannedStep {
    /// The journal name (`gate:` prefix for gates, `state:` for lifecycle moves).
    pub name: String,
    /// What it does or checks.
    pub what: String,
}

fn ps(name: &str, what: &str) -> PlannedStep {
    PlannedStep {
        name: name.to_owned(),
        what: what.to_owned(),
    }
}

fn act_fail(e: &ActError) -> StepFailure {
    StepFailure {
        step: String::new(),
        reason: e.to_string(),
        hint: e.hint.clone(),
    }
}

fn fail(reason: impl Into<String>, hint: impl Into<String>) -> StepFailure {
    StepFailure {
        step: String::new(),
        reason: reason.into(),
        hint: hint.into(),
    }
}

fn node_path(g: IommuGroupId) -> String {
    format!("/dev/vfio/{g}")
}

fn token_path(runtime: &str, bdf: Bdf) -> String {
    format!("{}/tokens/{bdf}.token", runtime.trim_end_matches('/'))
}

fn partitions(t: &Tenant) -> Vec<(PartitionKey, Membership)> {
    t.partitions
        .iter()
        .filter_map(|p| {
            PartitionKey::try_from(p.pkey)
                .ok()
                .map(|k| (k, p.membership))
        })
        .collect()
}

// ----------------------------------------------------------------------
// Plans

/// The steps of scrubbing a device of `kind`; `fabric`: it has GUIDs to revoke
/// at the SM (see `revoke_guids`).
fn plan_scrub(kind: &DeviceKind, fabric: bool) -> Vec<PlannedStep> {
    let mut v = vec![ps(
        "state-void",
        "remove the device-state payloads admitted for the device (never delivered to the next VM)",
    )];
    match kind {
        DeviceKind::Mdev { .. } => {
            v.push(ps(
                "mdev-remove",
                "remove the mdev (its UUID is never used again)",
            ));
        }
        _ => {
            v.push(ps(
                "node-revoke",
                "give /dev/vfio/<group> back to root:root 0600 (the old launcher loses access)",
            ));
            v.push(ps("gate:node-revoked", "stat the node: owned by root"));
            if matches!(kind, DeviceKind::TokenVf { .. }) {
                v.push(ps("token-withdraw", "remove any undelivered VF token file"));
            }
            v.push(ps(
                "reset",
                "reset the function and read its config space back",
            ));
            if matches!(kind, DeviceKind::IbVf { .. }) {
                v.push(ps(
                    "guid-retire",
                    "retire the old GUIDs in the pool (never reissued)",
                ));
            }
            if matches!(kind, DeviceKind::IbVf { .. }) && fabric {
                v.push(ps(
                    "fabric-revoke",
                    "remove the old GUIDs from every partition at the SM and apply",
                ));
                v.push(ps("gate:fabric-revoked", "read back from the SM: old GUIDs in no tenant's partition, the sweep after the change done"));
            }
        }
    }
    v
}

/// The steps of preparing a device of `kind` for a tenant.
fn plan_prepare(kind: &DeviceKind) -> Vec<PlannedStep> {
    let mut v = Vec::new();
    match kind {
        DeviceKind::Mdev { .. } => {
            v.push(ps(
                "mdev-create",
                "create an mdev of the same type with a fresh UUID",
            ));
            v.push(ps(
                "gate:mdev-present",
                "read back /sys/bus/mdev/devices/<uuid>",
            ));
            if is_ap_matrix(kind) {
                v.push(ps(
                    "ap-matrix-assign",
                    "assign the old matrix's adapters, domains and control domains to the new mdev",
                ));
                v.push(ps(
                    "gate:ap-matrix",
                    "read back matrix and control_domains: exactly the old ones",
                ));
            }
        }
        DeviceKind::IbVf { .. } => {
            v.push(ps("guid-allocate", "allocate a GUID never issued before"));
            v.push(ps(
                "bind-host-driver",
                "bind the VF to its host driver (a new GUID takes effect there)",
            ));
            v.push(ps(
                "guid-set",
                "set the VF's node and port GUID, rebind, read the port GUID back",
            ));
            v.push(ps(
                "fabric-grant",
                "add the new GUID to the tenant's partitions at the SM and apply",
            ));
            v.push(ps("gate:sm-verified", "read back from the SM: old GUIDs revoked, new GUID in exactly the tenant's partitions, sweep done"));
            v.push(ps(
                "gate:port-pkeys",
                "read the VF's P_Key table at the port: the tenant's P_Keys, nobody else's",
            ));
        }
        DeviceKind::TokenVf { .. } => {
            v.push(ps(
                "token-set",
                "take custody of the PF and set a fresh random VF token",
            ));
            v.push(ps(
                "token-deliver",
                "hand the token to the tenant's launcher only (0600 file in the runtime directory)",
            ));
            v.push(ps(
                "gate:token-delivered",
                "stat the token file: owned by the launcher, mode 0600",
            ));
        }
        DeviceKind::Pci { .. } => {}
    }
    if !matches!(kind, DeviceKind::Mdev { .. }) {
        v.push(ps("bind-vfio", "bind the function to vfio-pci"));
        v.push(ps("gate:driver", "read the driver link back: vfio-pci"));
    }
    v.push(ps(
        "gate:group-rules",
        "the isolation rules pass for the device's IOMMU group with the new tenant",
    ));
    v.push(ps(
        "node-grant",
        "give /dev/vfio/<group> to the tenant's launcher",
    ));
    v.push(ps(
        "gate:node-owner",
        "stat the node: owned by the launcher, mode 0600",
    ));
    v
}

/// The steps an operation on a device of `kind` in `state`, with `guids` in the
/// pool, runs.
pub(crate) fn plan(
    kind: &DeviceKind,
    state: &DeviceState,
    to_tenant: bool,
    guids: &[GuidRecord],
) -> Vec<PlannedStep> {
    let mut v = vec![ps(
        "begin",
        "open the operation (one per device) and take the first lifecycle step",
    )];
    let free = matches!(state, DeviceState::Free);
    // As `revoke_guids` decides: the SM is asked only when there is a GUID to revoke.
    let fabric = match kind {
        DeviceKind::IbVf { port_guid, .. } => {
            port_guid.is_some()
                || guids
                    .iter()
                    .any(|r| matches!(r.state, GuidState::Issued | GuidState::Quarantined))
        }
        _ => false,
    };
    if !to_tenant {
        v.extend(plan_scrub(kind, fabric));
        if matches!(kind, DeviceKind::Mdev { .. }) {
            v.push(ps("state:quarantined", "retire the removed mdev's UUID"));
        } else {
            v.push(ps("state:free", "verified clean: Free"));
        }
        v.push(ps("finish", "close the operation"));
        return v;
    }
    if is_ap_matrix(kind) {
        v.push(ps(
            "ap-matrix-read",
            "read the matrix mdev's adapters, domains and control domains (journalled before the remove)",
        ));
    }
    v.extend(plan_scrub(kind, fabric));
    if !free && !matches!(kind, DeviceKind::Mdev { .. }) {
        v.push(ps("state:free", "verified clean: Free"));
        v.push(ps("state:preparing", "Preparing for the new tenant"));
    }
    v.extend(plan_prepare(kind));
    if matches!(kind, DeviceKind::Mdev { .. }) {
        v.push(ps("state:quarantined", "retire the old mdev's UUID"));
    }
    v.push(ps(
        "state:ready",
        "every gate passed: Ready — the tenant's VM may start",
    ));
    v.push(ps("finish", "close the operation"));
    v
}

// ----------------------------------------------------------------------
// Operations

#[allow(clippy::too_many_arguments)]
pub(crate) fn transfer(
    e: &mut Engine<'_>,
    run: &mut Run,
    kind: &DeviceKind,
    from: &DeviceState,
    old: Option<&Tenant>,
    to: &Tenant,
    vm: Option<&str>,
) -> Result<Finish, StepFailure> {
    let device = run.device;
    // A vfio_ap matrix mdev's matrix is its configuration (the APQNs the tenant
    // gets): read and journalled before the remove, given to the new mdev.
    let matrix = if is_ap_matrix(kind) {
        Some(read_ap_matrix(e, run, kind)?)
    } else {
        None
    };
    scrub(e, run, kind, old)?;
    let preparing = DeviceState::Preparing {
        tenant: to.id.clone(),
        vm: vm.map(str::to_owned),
    };
    if let DeviceKind::Mdev { .. } = kind {
        // The old mdev is gone for good; the tenant gets a new one.
        let new = prepare_mdev(e, run, kind, to, vm, matrix.as_ref())?;
        let cur = current(e, &device)?;
        e.move_state(
            run,
            &device,
            &cur,
            &DeviceState::Quarantined {
                reason: format!(
                    "retired: mdev removed and replaced by {new} (mdev UUIDs are single-use)"
                ),
            },
        )?;
        let ready = DeviceState::Ready {
            tenant: to.id.clone(),
            vm: vm.map(str::to_owned),
        };
        e.move_state(run, &DeviceId::Mdev(new), &preparing, &ready)?;
        return Ok(Finish {
            device: DeviceId::Mdev(new),
            state: ready,
            token_file: None,
        });
    }
    if !matches!(from, DeviceState::Free) {
        e.move_state(run, &device, &DeviceState::Scrubbing, &DeviceState::Free)?;
        e.move_state(run, &device, &DeviceState::Free, &preparing)?;
    }
    let token_file = prepare_pci(e, run, kind, old, to)?;
    let ready = DeviceState::Ready {
        tenant: to.id.clone(),
        vm: vm.map(str::to_owned),
    };
    e.move_state(run, &device, &preparing, &ready)?;
    Ok(Finish {
        device,
        state: ready,
        token_file,
    })
}

pub(crate) fn release(
    e: &mut Engine<'_>,
    run: &mut Run,
    kind: Option<&DeviceKind>,
    old: Option<&Tenant>,
) -> Result<Finish, StepFailure> {
    let device = run.device;
    match kind {
        Some(k) => scrub(e, run, k, old)?,
        None => {
            // Gone from the host: its admitted state is void all the same.
            void_admitted_state(e, run)?;
            if let DeviceId::Mdev(_) = device {
                // Already gone from the host: nothing else of it is left to scrub.
            } else {
                return Err(fail(
                    format!("{device} is not on the host, so it cannot be scrubbed and verified"),
                    "it stays quarantined; bring it back (rescan the PCI bus, re-create its VFs) and release it again",
                ));
            }
        }
    }
    if let DeviceId::Mdev(u) = device {
        let q = DeviceState::Quarantined {
            reason: format!("retired: mdev {u} removed (mdev UUIDs are single-use)"),
        };
        e.move_state(run, &device, &DeviceState::Scrubbing, &q)?;
        return Ok(Finish {
            device,
            state: q,
            token_file: None,
        });
    }
    e.move_state(run, &device, &DeviceState::Scrubbing, &DeviceState::Free)?;
    Ok(Finish {
        device,
        state: DeviceState::Free,
        token_file: None,
    })
}

fn current(e: &mut Engine<'_>, device: &DeviceId) -> Result<DeviceState, StepFailure> {
    let d = *device;
    Ok(e.store
        .atomically(|tx| tx.device(&d))?
        .ok_or(StoreError::UnknownDevice(d))?
        .state)
}

// ----------------------------------------------------------------------
// Scrub

fn scrub(
    e: &mut Engine<'_>,
    run: &mut Run,
    kind: &DeviceKind,
    old: Option<&Tenant>,
) -> Result<(), StepFailure> {
    let io = e.io;
    let act = SysfsActuator::new(io);
    void_admitted_state(e, run)?;
    match kind {
        DeviceKind::Mdev { uuid, .. } => {
            let u = *uuid;
            e.step(run, "mdev-remove", json!({ "uuid": u }), |_| {
                let p = format!("/sys/bus/mdev/devices/{u}");
                if !io.exists(&p) {
                    return Ok(((), json!({ "uuid": u, "removed": false, "absent": true })));
                }
                act.mdev_remove(u).map_err(|x| act_fail(&x))?;
                if io.exists(&p) {
                    return Err(fail(
                        format!("{p} still exists after the remove"),
                        "check `dmesg`; the mdev may be in use by a VM",
                    ));
                }
                Ok(((), json!({ "uuid": u, "removed": true })))
            })?;
            Ok(())
        }
        DeviceKind::Pci { bdf, group }
        | DeviceKind::TokenVf { bdf, group, .. }
        | DeviceKind::IbVf { bdf, group, .. } => {
            let (bdf, group) = (*bdf, *group);
            revoke_node(e, run, &act, group)?;
            if let DeviceKind::TokenVf { .. } = kind {
                let root = io.root().clone();
                let p = token_path(&e.cfg.runtime_dir, bdf);
                e.step(run, "token-withdraw", json!({ "path": p }), |_| {
                    // Through real directories inside the root only, never a link.
                    let existed = root.remove_file(&p).map_err(|x| {
                        fail(
                            format!("cannot remove {}: {x}", root.path(&p).display()),
                            "remove it by hand; the token in it is void once a new one is set",
                        )
                    })?;
                    Ok(((), json!({ "path": p, "removed": existed })))
                })?;
            }
            e.step(run, "reset", json!({ "bdf": bdf }), |_| {
                act.reset(bdf).map_err(|x| act_fail(&x))?;
                Ok(((), json!({ "bdf": bdf, "answers": true })))
            })?;
            if let DeviceKind::IbVf { port_guid, .. } = kind {
                revoke_guids(e, run, *port_guid, old)?;
            }
            Ok(())
        }
    }
}

/// The side-load directory of admitted device state, under the runtime dir:
/// `<token>.state` payloads, each with `<token>.owner` naming its device
/// (written by `devfence state admit`).
fn state_dir(runtime: &str) -> String {
    format!("{runtime}/state")
}

/// Voids every device-state payload admitted for the device being scrubbed
/// (issue 18 item 10): its `<token>.state` and `<token>.owner` are removed, so
/// no later VM can be given the previous tenant's state. An owner record that is
/// not a small regular file fails the step (the device stays quarantined).
fn void_admitted_state(e: &mut Engine<'_>, run: &mut Run) -> Result<(), StepFailure> {
    const MAX_OWNER: u64 = 256;
    let root = e.io.root().clone();
    let dir = state_dir(&e.cfg.runtime_dir);
    let device = run.device.to_string();
    e.step(run, "state-void", json!({ "dir": dir }), |_| {
        let real = root.path(&dir);
        let entries = match std::fs::read_dir(&real) {
            Ok(r) => r,
            Err(x) if x.kind() == std::io::ErrorKind::NotFound => {
                return Ok(((), json!({ "dir": dir, "voided": 0 })));
            }
            Err(x) => {
                return Err(fail(
                    format!("cannot list {}: {x}", real.display()),
                    "check the side-load directory (root-owned, 0700); admitted state of this device may still be there",
                ));
            }
        };
        let mut voided = 0u32;
        for ent in entries.flatten() {
            let name = ent.file_name();
            let Some(token) = name.to_str().and_then(|n| n.strip_suffix(".owner")) else {
                continue;
            };
            let owner = ent.path();
            let bad = |why: String| {
                fail(
                    format!("{}: {why}", owner.display()),
                    "remove the file by hand after checking whose state it records; devfence cannot tell whether it is this device's",
                )
            };
            let meta = std::fs::symlink_metadata(&owner).map_err(|x| bad(x.to_string()))?;
            if !meta.is_file() || meta.len() > MAX_OWNER {
                return Err(bad("not a small regular file".into()));
            }
            let text = std::fs::read_to_string(&owner).map_err(|x| bad(x.to_string()))?;
            if text.trim_end_matches('\n') != device {
                continue;
            }
            let payload = real.join(format!("{token}.state"));
            for p in [&payload, &owner] {
                match std::fs::remove_file(p) {
                    Ok(()) => {}
                    Err(x) if x.kind() == std::io::ErrorKind::NotFound => {}
                    Err(x) => {
                        return Err(fail(
                            format!("cannot remove {}: {x}", p.display()),
                            "remove it by hand: it is the previous tenant's admitted device state",
                        ));
                    }
                }
            }
            voided += 1;
        }
        // The tokens name the payloads; only their number is journalled.
        Ok(((), json!({ "dir": dir, "voided": voided })))
    })
}

fn revoke_node(
    e: &mut Engine<'_>,
    run: &mut Run,
    act: &SysfsActuator<&dyn KernelIo>,
    group: IommuGroupId,
) -> Result<(), StepFailure> {
    let io = e.io;
    let node = node_path(group);
    e.step(run, "node-revoke", json!({ "node": node }), |_| {
        if !io.exists(&node) {
            return Ok(((), json!({ "node": node, "present": false })));
        }
        act.set_group_node_owner(group, 0, 0, 0o600)
            .map_err(|x| act_fail(&x))?;
        Ok(((), json!({ "node": node, "owner": "0:0", "mode": "0600" })))
    })?;
    e.gate(run, "node-revoked", |_, _| {
        if !io.exists(&node) {
            return Ok(json!({ "node": node, "present": false }));
        }
        match io.stat(&node) {
            Ok(m) if m.uid == 0 && m.gid == 0 => Ok(json!({ "node": node, "uid": m.uid, "gid": m.gid, "mode": format!("{:04o}", m.mode) })),
            Ok(m) => Err((
                format!("{node} is still owned by {}:{}", m.uid, m.gid),
                json!({ "node": node, "uid": m.uid, "gid": m.gid }),
                "something changed the owner back; find it (udev rules?) before handing the device over".into(),
            )),
            Err(x) => Err((format!("cannot stat {node}: {x}"), json!({ "node": node }), "check /dev/vfio".into())),
        }
    })
}

/// Retires every GUID this device was issued (and its factory GUID), removes them
/// from every partition at the SM, and verifies that.
fn revoke_guids(
    e: &mut Engine<'_>,
    run: &mut Run,
    port_guid: Option<Guid>,
    old: Option<&Tenant>,
) -> Result<(), StepFailure> {
    let device = run.device;
    let op = run.op;
    let guids: Vec<Guid> = e.step(run, "guid-retire", json!({ "port-guid": port_guid }), |e| {
        let r = e.store.atomically(|tx| {
            let mut out = BTreeSet::new();
            for rec in tx.guids_of(&device)? {
                if rec.state == GuidState::Issued {
                    tx.retire_guid(rec.guid, &format!("{op}: revoked from {device}"))?;
                }
                if matches!(rec.state, GuidState::Issued | GuidState::Quarantined) {
                    out.insert(rec.guid);
                }
            }
            if let Some(g) = port_guid {
                match tx.guid(g)? {
                    None => tx.record_foreign_guid(g, &format!("found on {device} by {op}"))?,
                    Some(r) if r.state == GuidState::Issued => {
                        tx.retire_guid(g, &format!("{op}: found on {device}"))?;
                    }
                    Some(_) => {}
                }
                out.insert(g);
            }
            Ok(out)
        })?;
        let list: Vec<Guid> = r.into_iter().collect();
        Ok((list.clone(), json!({ "retired": list })))
    })?;
    if guids.is_empty() {
        return Ok(());
    }
    let sm = e.sm;
    let all = every_partition(e)?;
    let ticket = e.step(run, "fabric-revoke", json!({ "guids": guids }), |_| {
        for g in &guids {
            sm.stage_remove_all(*g).map_err(|x| fail(format!("staging the removal of {g} failed: {x}"), "check the SM"))?;
        }
        let t = sm.apply().map_err(|x| {
            sm.discard_staged();
            fail(format!("the SM did not take the change: {x}"), "check the SM's health (`devfence status`); nothing was granted")
        })?;
        Ok((t, json!({ "backend": sm.backend(), "ticket": { "change": t.change.0, "generation": t.generation.0 } })))
    })?;
    let mut exp = Expectation::after(ticket);
    for g in &guids {
        let mut parts: BTreeSet<PartitionKey> = all.clone();
        if let Some(t) = old {
            parts.extend(partitions(t).into_iter().map(|(k, _)| k));
        }
        exp = exp.revoke(*g, parts);
    }
    sm_gate(e, run, "fabric-revoked", &exp)
}

/// Every partition of every tenant in the ledger.
fn every_partition(e: &mut Engine<'_>) -> Result<BTreeSet<PartitionKey>, StepFailure> {
    let tenants = e.store.atomically(|tx| tx.tenants())?;
    Ok(tenants
        .iter()
        .flat_map(|t| partitions(t).into_iter().map(|(k, _)| k))
        .collect())
}

fn sm_gate(
    e: &mut Engine<'_>,
    run: &mut Run,
    name: &str,
    exp: &Expectation,
) -> Result<(), StepFailure> {
    let sm = e.sm;
    let deadline = Instant::now() + e.cfg.gate_deadline;
    let pace = e.cfg.pace;
    let gname = name.to_owned();
    e.gate(run, name, |e, run| {
        let mut polls = 0u32;
        let started = run.started;
        let progress = &mut e.progress;
        let res = wait_verified_with(sm, exp, deadline, pace, &mut |u: &Unverified| {
            polls += 1;
            let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            progress(&Progress::Waiting { gate: gname.clone(), polls, elapsed_ms, last: u.to_string() });
        });
        match res {
            Ok(proof) => Ok(json!({ "backend": sm.backend(), "proof": proof })),
            Err(nv) => {
                // A port in more partitions than granted: name the SM
                // configuration's statements that put it there (the operator's
                // line), not the SM.
                let stray = if nv.failed().contains(&devfence_fabric::Question::NewExact) {
                    sm.configured_members()
                        .ok()
                        .flatten()
                        .map(|c| devfence_fabric::posture::stray_statements(&c, &exp.grant))
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                let hint = if stray.is_empty() {
                    "the SM has not (yet) applied the change or its sweep did not finish cleanly; check the SM, then release the device to scrub it again".to_string()
                } else {
                    format!(
                        "the SM's configuration makes the port a member of a partition the tenant is not given, at {}: a statement outside devfence's block (for OpenSM, an operator's line); take the port out of it (name the ports a wildcard is meant for), then release the device to scrub it again",
                        stray.join(", ")
                    )
                };
                Err((
                    format!("the SM did not verify: {nv}"),
                    json!({ "backend": sm.backend(), "polls": nv.polls, "waited_ms": nv.waited.as_millis() as u64, "failed": nv.failed(), "last": nv.last.to_string(), "statements": stray }),
                    hint,
                ))
            }
        }
    })
}

// ----------------------------------------------------------------------
// Prepare

fn prepare_pci(
    e: &mut Engine<'_>,
    run: &mut Run,
    kind: &DeviceKind,
    old: Option<&Tenant>,
    to: &Tenant,
) -> Result<Option<String>, StepFailure> {
    let io = e.io;
    let act = SysfsActuator::new(io);
    let (Some(bdf), Some(group)) = (kind.bdf(), kind.group()) else {
        return Err(fail("not a PCI function", "this is a bug in devfence"));
    };
    let (uid, gid) = launcher(to)?;
    let mut token_file = None;
    match kind {
        DeviceKind::IbVf {
            pf,
            index,
            port_guid,
            ..
        } => {
            prepare_ib(e, run, &act, bdf, *pf, *index, *port_guid, old, to)?;
        }
        DeviceKind::TokenVf { pf, .. } => {
            let pf = *pf;
            let device = run.device;
            let token: VfToken = e.step(run, "token-set", json!({ "pf": pf }), |e| {
                let mut custody = act.custody_pf(pf).map_err(|x| act_fail(&x))?;
                let token = act.rekey_vf_token(&mut custody).map_err(|x| act_fail(&x))?;
                // The ledger knows whose custody the PF is in: devfence's own
                // (`check` reads it back; PF-TRUST is for custody it does not hold).
                e.store
                    .atomically(|tx| tx.record_pf_custody(&device, &DeviceId::Pci(pf)))?;
                // The detail never carries the token.
                Ok((
                    token,
                    json!({ "pf": pf, "token": "set (write-only; not recorded)" }),
                ))
            })?;
            let p = token_path(&e.cfg.runtime_dir, bdf);
            let root = io.root().clone();
            e.step(
                run,
                "token-deliver",
                json!({ "path": p, "launcher": format!("{uid}:{gid}") }),
                |_| {
                    deliver_token(&root, &p, &token, uid, gid)?;
                    Ok((
                        (),
                        json!({ "path": p, "owner": format!("{uid}:{gid}"), "mode": "0600" }),
                    ))
                },
            )?;
            drop(token);
            e.gate(run, "token-delivered", |_, _| {
                use std::os::unix::fs::MetadataExt;
                let real = root.path(&p);
                match std::fs::metadata(&real) {
                    Ok(m) if m.uid() == uid && m.gid() == gid && m.mode() & 0o777 == 0o600 => {
                        Ok(json!({ "path": p, "uid": m.uid(), "gid": m.gid(), "mode": format!("{:04o}", m.mode() & 0o7777) }))
                    }
                    Ok(m) => Err((
                        format!("{p} is {}:{} mode {:04o}, not {uid}:{gid} 0600", m.uid(), m.gid(), m.mode() & 0o7777),
                        json!({ "path": p }),
                        "something changed the token file; it is void: hand the device over again".into(),
                    )),
                    Err(x) => Err((format!("cannot stat {p}: {x}"), json!({ "path": p }), "check the runtime directory".into())),
                }
            })?;
            token_file = Some(p);
        }
        _ => {}
    }
    e.step(
        run,
        "bind-vfio",
        json!({ "bdf": bdf, "driver": "vfio-pci" }),
        |_| {
            act.bind(bdf, "vfio-pci").map_err(|x| act_fail(&x))?;
            Ok(((), json!({ "bdf": bdf, "driver": "vfio-pci" })))
        },
    )?;
    e.gate(run, "driver", |_, _| {
        let link = format!("/sys/bus/pci/devices/{bdf}/driver");
        match io.read_link(&link) {
            Ok(t) if t.rsplit('/').next() == Some("vfio-pci") => {
                Ok(json!({ "path": link, "target": t }))
            }
            Ok(t) => Err((
                format!("{bdf} is bound to {t}, not vfio-pci"),
                json!({ "path": link, "target": t }),
                "bind it with `devfence bind --driver vfio-pci`".into(),
            )),
            Err(x) => Err((
                format!("{bdf} has no driver ({x})"),
                json!({ "path": link }),
                "bind it with `devfence bind --driver vfio-pci`".into(),
            )),
        }
    })?;
    group_rules(e, run, group, &DeviceId::Pci(bdf))?;
    grant_node(e, run, &act, group, uid, gid)?;
    Ok(token_file)
}

fn launcher(t: &Tenant) -> Result<(u32, u32), StepFailure> {
    match (t.launcher_uid, t.launcher_gid) {
        (Some(u), Some(g)) if u != 0 => Ok((u, g)),
        _ => Err(fail(
            format!("tenant {} has no launcher uid/gid (or uid 0)", t.id),
            "set the tenant's launcher (the uid:gid its VMs run as): a device node owned by root is no isolation",
        )),
    }
}

fn deliver_token(
    root: &devfence_host::HostRoot,
    kpath: &str,
    token: &VfToken,
    uid: u32,
    gid: u32,
) -> Result<(), StepFailure> {
    let path = root.path(kpath);
    let io_fail = |what: &str, x: std::io::Error| {
        fail(
            format!("cannot {what} {}: {x}", path.display()),
            "check the runtime directory (root-owned, on tmpfs, no symbolic links); the token was not delivered",
        )
    };
    // Inside the root, through real directories only, never through a link.
    let mut f = root
        .create_fresh_file(kpath, 0o600)
        .map_err(|x| io_fail("create", x))?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(|x| io_fail("chown", x))?;
    let mut text = token.reveal_for_launcher();
    text.push('\n');
    let r = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
    // Wipe the copy before anything else can fail.
    // Overwrite the String's bytes in place before it is freed.
    let wiped = "0".repeat(text.len());
    text.replace_range(.., &wiped);
    drop(text);
    r.map_err(|x| io_fail("write", x))
}

#[allow(clippy::too_many_arguments)]
fn prepare_ib(
    e: &mut Engine<'_>,
    run: &mut Run,
    act: &SysfsActuator<&dyn KernelIo>,
    bdf: Bdf,
    pf: Bdf,
    index: u32,
    old_port: Option<Guid>,
    old: Option<&Tenant>,
    to: &Tenant,
) -> Result<(), StepFailure> {
    let io = e.io;
    let sm = e.sm;
    let device = run.device;
    let tid: TenantId = to.id.clone();
    let new: Guid = e.step(run, "guid-allocate", json!({ "tenant": tid }), |e| {
        // Never a GUID that exists anywhere devfence can see: on any port or VF of
        // the host, or known to the SM (on the fabric or in its configuration).
        let on_host = host_guids(&e.inventory().map_err(|x| {
            fail(
                format!("the host cannot be read: {x}"),
                "devfence issues no GUID it cannot check against the host",
            )
        })?);
        // GUIDs the SM's configuration names (wildcards such as ALL name none).
        let configured: BTreeSet<Guid> = sm
            .configured_members()
            .map_err(|x| {
                fail(
                    format!("the SM's configuration cannot be read: {x}"),
                    "devfence issues no GUID it cannot check against the SM; check its health (`devfence status`)",
                )
            })?
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| match c.member {
                devfence_fabric::posture::Member::Guid(g) => Some(g),
                devfence_fabric::posture::Member::Wildcard(_) => None,
            })
            .collect();
        let mut skipped = Vec::new();
        let g = e.store.atomically(|tx| {
            tx.allocate_guid_avoiding(&device, &tid, &mut |g| {
                let live = |reason: String| StoreError::GuidLiveCheck { guid: g, reason };
                if skipped.len() >= MAX_LIVE_SKIPS {
                    return Err(live(format!(
                        "{MAX_LIVE_SKIPS} GUIDs of the pool in a row are in use elsewhere, so the \
                         pool overlaps live GUIDs; give it a range of its own \
                         (`devfence guid-pool --set FIRST..LAST`)"
                    )));
                }
                if let Some(w) = on_host.get(&g) {
                    skipped.push(g);
                    return Ok(Some(format!("live on {w}, skipped by the GUID pool")));
                }
                if configured.contains(&g) {
                    skipped.push(g);
                    return Ok(Some(format!(
                        "named in the SM's configuration ({}), skipped by the GUID pool",
                        sm.backend()
                    )));
                }
                let obs = sm.observe(&[g]).map_err(|x| live(x.to_string()))?;
                let view = obs
                    .ports
                    .get(&g)
                    .ok_or_else(|| live("the SM's answer left it out".into()))?;
                if !matches!(view.programmed, Programmed::Absent) {
                    skipped.push(g);
                    return Ok(Some(format!(
                        "a port on the fabric ({}), skipped by the GUID pool",
                        sm.backend()
                    )));
                }
                Ok(None)
            })
        })?;
        Ok((g, json!({ "guid": g, "skipped": skipped })))
    })?;
    let host_driver = e.cfg.ib_host_driver.clone();
    e.step(
        run,
        "bind-host-driver",
        json!({ "bdf": bdf, "driver": host_driver }),
        |_| {
            act.bind(bdf, &host_driver).map_err(|x| act_fail(&x))?;
            Ok(((), json!({ "bdf": bdf, "driver": host_driver })))
        },
    )?;
    e.step(
        run,
        "guid-set",
        json!({ "pf": pf, "vf": index, "guid": new }),
        |_| {
            act.set_vf_guid(pf, index, new, new)
                .map_err(|x| act_fail(&x))?;
            Ok((
                (),
                json!({ "pf": pf, "vf": index, "node": new, "port": new, "read-back": new }),
            ))
        },
    )?;
    let grant = partitions(to);
    if grant.is_empty() {
        return Err(fail(
            format!("tenant {} has no IB partitions", to.id),
            "give the tenant its partitions (P_Keys) before handing it an IB VF",
        ));
    }
    let g2 = grant.clone();
    let ticket = e.step(run, "fabric-grant", json!({ "guid": new, "partitions": g2.iter().map(|(k, m)| format!("{:#06x}:{m:?}", k.base())).collect::<Vec<_>>() }), |_| {
        for (k, m) in &g2 {
            sm.stage_add(new, *k, *m).map_err(|x| fail(format!("staging {new} into {:#06x} failed: {x}", k.base()), "check the SM"))?;
        }
        let t = sm.apply().map_err(|x| {
            sm.discard_staged();
            fail(format!("the SM did not take the change: {x}"), "check the SM's health")
        })?;
        Ok((t, json!({ "backend": sm.backend(), "ticket": { "change": t.change.0, "generation": t.generation.0 } })))
    })?;
    // The three questions in one read: old out, new exactly in, sweep done.
    let mut exp = Expectation::after(ticket);
    let old_parts: BTreeSet<PartitionKey> = match old {
        Some(t) => partitions(t).into_iter().map(|(k, _)| k).collect(),
        None => every_partition(e)?
            .into_iter()
            .filter(|k| !grant.iter().any(|(g, _)| g == k))
            .collect(),
    };
    let retired: Vec<Guid> = {
        let recs = e.store.atomically(|tx| tx.guids_of(&device))?;
        recs.into_iter()
            .filter(|r| {
                r.guid != new && matches!(r.state, GuidState::Quarantined | GuidState::Cleared)
            })
            .map(|r| r.guid)
            .chain(old_port.filter(|g| *g != new))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    for g in retired {
        exp = exp.revoke(g, old_parts.iter().copied());
    }
    exp = exp.grant(new, grant.iter().copied());
    sm_gate(e, run, "sm-verified", &exp)?;
    // Verification at the port: the VF's own P_Key table, read on the host.
    let want: BTreeSet<PKey> = grant.iter().map(|(k, m)| k.pkey(*m)).collect();
    let forbidden: BTreeSet<u16> = old_parts.iter().map(|k| k.base()).collect();
    e.gate(run, "port-pkeys", |_, _| {
        port_pkeys(io, bdf, new, &want, &forbidden)
    })
}

/// Reads the P_Key table of the VF's IB port and checks it against the grant.
fn port_pkeys(
    io: &dyn KernelIo,
    bdf: Bdf,
    guid: Guid,
    want: &BTreeSet<PKey>,
    forbidden: &BTreeSet<u16>,
) -> Result<Value, (String, Value, String)> {
    let hint = "the port does not (yet) carry what the SM shows: check the VF's link and the SM's log; the device stays quarantined until it does".to_string();
    let ibdir = format!("/sys/bus/pci/devices/{bdf}/infiniband");
    let devs = io.list_dir(&ibdir).map_err(|x| {
        (
            format!("{bdf} has no InfiniBand device on its host driver ({ibdir}: {x})"),
            json!({ "path": ibdir }),
            "load mlx5_ib so the VF's port can be read; devfence does not trust a table it cannot read".to_string(),
        )
    })?;
    let Some(dev) = devs.into_iter().next() else {
        return Err((format!("{ibdir} is empty"), json!({ "path": ibdir }), hint));
    };
    let port = format!("{ibdir}/{dev}/ports/1");
    let gid0 = format!("{port}/gids/0");
    let seen_guid = io
        .read(&gid0)
        .ok()
        .and_then(|b| devfence_host::parse::gid_port_guid(&b).ok());
    if seen_guid != Some(guid) {
        return Err((
            format!(
                "the port shows GUID {} in {gid0}, not {guid}",
                seen_guid.map_or_else(|| "none".to_owned(), |g| g.to_string())
            ),
            json!({ "path": gid0 }),
            hint,
        ));
    }
    let pdir = format!("{port}/pkeys");
    let mut slots: Vec<(u32, String)> = io
        .list_dir(&pdir)
        .map_err(|x| {
            (
                format!("cannot list {pdir}: {x}"),
                json!({ "path": pdir }),
                hint.clone(),
            )
        })?
        .into_iter()
        .filter_map(|n| n.parse::<u32>().ok().map(|i| (i, n)))
        .collect();
    slots.sort();
    let mut table: BTreeMap<u32, PKey> = BTreeMap::new();
    for (i, n) in slots {
        let p = format!("{pdir}/{n}");
        let raw = io.read(&p).map_err(|x| {
            (
                format!("cannot read {p}: {x}"),
                json!({ "path": p }),
                hint.clone(),
            )
        })?;
        let k = devfence_host::parse::pkey(&raw).map_err(|x| {
            (
                format!(
                    "{p} holds {:?}, not a P_Key ({x})",
                    String::from_utf8_lossy(&raw)
                ),
                json!({ "path": p }),
                hint.clone(),
            )
        })?;
        if !k.is_empty_slot() {
            table.insert(i, k);
        }
    }
    let keys: BTreeSet<PKey> = table.values().copied().collect();
    let shown: Vec<String> = keys.iter().map(|k| format!("{:#06x}", k.0)).collect();
    let missing: Vec<String> = want
        .difference(&keys)
        .map(|k| format!("{:#06x}", k.0))
        .collect();
    let leaked: Vec<String> = keys
        .iter()
        .filter(|k| forbidden.contains(&k.base()))
        .map(|k| format!("{:#06x}", k.0))
        .collect();
    let ev = json!({ "path": pdir, "guid": guid, "table": shown, "missing": missing, "other-tenant": leaked });
    if !leaked.is_empty() {
        return Err((
            format!(
                "the port still carries another tenant's P_Keys {}",
                leaked.join(", ")
            ),
            ev,
            hint,
        ));
    }
    if !missing.is_empty() {
        return Err((
            format!("the port lacks the tenant's P_Keys {}", missing.join(", ")),
            ev,
            hint,
        ));
    }
    Ok(ev)
}

fn group_rules(
    e: &mut Engine<'_>,
    run: &mut Run,
    group: IommuGroupId,
    device: &DeviceId,
) -> Result<(), StepFailure> {
    let dev = *device;
    e.gate(run, "group-rules", |e, _| {
        let inv = e
            .inventory()
            .map_err(|x| (x.to_string(), json!({}), "check the host".to_string()))?;
        let tenancy = e
            .store
            .atomically(|tx| super::tenancy_from_ledger(tx))
            .map_err(|x| (x.to_string(), json!({}), "check the ledger".to_string()))?;
        let members: BTreeSet<String> = inv
            .iommu_groups
            .iter()
            .filter(|g| g.id == group)
            .flat_map(|g| g.members.iter().cloned())
            .collect();
        let subject = format!("iommu_group {group}");
        let blocking: Vec<_> = devfence_policy::check(&inv, &tenancy)
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .filter(|f| {
                f.subject == subject || f.subject == dev.to_string() || members.contains(&f.subject)
            })
            .collect();
        if blocking.is_empty() {
            return Ok(json!({ "group": group, "members": members, "errors": 0 }));
        }
        let first = &blocking[0];
        Err((
            format!("{} ({}): {}", first.rule, first.subject, first.message),
            json!({ "group": group, "findings": blocking }),
            first.hint.clone(),
        ))
    })
}

fn grant_node(
    e: &mut Engine<'_>,
    run: &mut Run,
    act: &SysfsActuator<&dyn KernelIo>,
    group: IommuGroupId,
    uid: u32,
    gid: u32,
) -> Result<(), StepFailure> {
    let io = e.io;
    let mode = e.cfg.node_mode;
    let node = node_path(group);
    e.step(run, "node-grant", json!({ "node": node, "owner": format!("{uid}:{gid}") }), |_| {
        act.set_group_node_owner(group, uid, gid, mode).map_err(|x| act_fail(&x))?;
        Ok(((), json!({ "node": node, "owner": format!("{uid}:{gid}"), "mode": format!("{mode:04o}") })))
    })?;
    e.gate(run, "node-owner", |_, _| match io.stat(&node) {
        Ok(m) if m.uid == uid && m.gid == gid && m.mode == mode => Ok(
            json!({ "node": node, "uid": m.uid, "gid": m.gid, "mode": format!("{:04o}", m.mode) }),
        ),
        Ok(m) => Err((
            format!(
                "{node} is {}:{} {:04o}, not {uid}:{gid} {mode:04o}",
                m.uid, m.gid, m.mode
            ),
            json!({ "node": node, "uid": m.uid, "gid": m.gid, "mode": format!("{:04o}", m.mode) }),
            "something changed the node (udev rules?); fix that before assigning".into(),
        )),
        Err(x) => Err((
            format!("cannot stat {node}: {x}"),
            json!({ "node": node }),
            "is the device bound to vfio-pci?".into(),
        )),
    })
}

fn prepare_mdev(
    e: &mut Engine<'_>,
    run: &mut Run,
    kind: &DeviceKind,
    to: &Tenant,
    vm: Option<&str>,
    matrix: Option<&ApConfig>,
) -> Result<MdevUuid, StepFailure> {
    let DeviceKind::Mdev {
        parent, type_id, ..
    } = kind
    else {
        return Err(fail("not an mdev", "this is a bug in devfence"));
    };
    let io = e.io;
    let act = SysfsActuator::new(io);
    let (uid, gid) = launcher(to)?;
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|x| {
        fail(
            format!("no randomness for a UUID: {x}"),
            "check /dev/urandom",
        )
    })?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let new = MdevUuid(b);
    let newdev = DeviceId::Mdev(new);
    let preparing = DeviceState::Preparing {
        tenant: to.id.clone(),
        vm: vm.map(str::to_owned),
    };
    let (op, tenant) = (run.op, to.id.clone());
    // Journal first: the new UUID is in the plan (recovery removes it if the
    // crash comes after the create).
    e.step(
        run,
        "mdev-create",
        json!({ "uuid": new, "parent": parent, "type": type_id }),
        |e| {
            let p2 = preparing.clone();
            e.store.atomically(|tx| {
                tx.add_device(&newdev)?;
                tx.set_device_state(&newdev, &DeviceState::Free, &p2)?;
                tx.audit(&AuditEvent {
                    kind: AuditKind::Ledger,
                    device: Some(newdev),
                    tenant: Some(tenant.clone()),
                    detail: json!({ "action": "device-add", "kind": "mdev", "operation": op }),
                })?;
                Ok(())
            })?;
            act.mdev_create(parent, type_id, new)
                .map_err(|x| act_fail(&x))?;
            Ok((
                (),
                json!({ "uuid": new, "parent": parent, "type": type_id }),
            ))
        },
    )?;
    let mdir = format!("/sys/bus/mdev/devices/{new}");
    let group = e.gate(run, "mdev-present", |_, _| {
        if !io.exists(&mdir) {
            return Err((
                format!("{mdir} does not exist after the create"),
                json!({ "path": mdir }),
                "check `dmesg` for the parent driver's error".into(),
            ));
        }
        Ok(json!({ "path": mdir }))
    });
    group?;
    if let Some(m) = matrix {
        give_ap_matrix(e, run, &act, new, m)?;
    }
    let link = format!("{mdir}/iommu_group");
    let g = io
        .read_link(&link)
        .ok()
        .and_then(|t| t.rsplit('/').next().and_then(|n| n.parse::<u32>().ok()))
        .map(IommuGroupId);
    let Some(g) = g else {
        return Err(fail(
            format!("the new mdev has no IOMMU group ({link})"),
            "is the vendor driver's mdev bound to vfio_mdev?",
        ));
    };
    group_rules(e, run, g, &newdev)?;
    grant_node(e, run, &act, g, uid, gid)?;
    Ok(new)
}

/// A vfio_ap matrix mdev's configuration: what its `matrix` and
/// `control_domains` list.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ApConfig {
    adapters: Vec<u8>,
    domains: Vec<u8>,
    control_domains: Vec<u8>,
}

const AP_MATRIX_DIR: &str = "/sys/devices/vfio_ap/matrix";

fn is_ap_matrix(kind: &DeviceKind) -> bool {
    matches!(kind, DeviceKind::Mdev { type_id, .. } if type_id == "vfio_ap-passthrough")
}

fn ap_config(io: &dyn KernelIo, u: MdevUuid) -> Result<ApConfig, String> {
    let dir = format!("{AP_MATRIX_DIR}/{u}");
    let read = |name: &str| {
        let p = format!("{dir}/{name}");
        io.read(&p).map_err(|x| format!("cannot read {p}: {x}"))
    };
    let m = devfence_host::parse::ap_matrix(&read("matrix")?)
        .map_err(|x| format!("{dir}/matrix: {x}"))?;
    let cd = devfence_host::parse::control_domains(&read("control_domains")?)
        .map_err(|x| format!("{dir}/control_domains: {x}"))?;
    Ok(ApConfig {
        adapters: m.adapters,
        domains: m.domains,
        control_domains: cd,
    })
}

/// Reads (and journals) the matrix of the vfio_ap mdev about to be removed.
fn read_ap_matrix(
    e: &mut Engine<'_>,
    run: &mut Run,
    kind: &DeviceKind,
) -> Result<ApConfig, StepFailure> {
    let DeviceKind::Mdev { uuid, .. } = kind else {
        return Err(fail("not an mdev", "this is a bug in devfence"));
    };
    let (u, io) = (*uuid, e.io);
    e.step(run, "ap-matrix-read", json!({ "uuid": u }), |_| {
        let c = ap_config(io, u).map_err(|x| {
            fail(
                x,
                "devfence gives the new mdev the old one's matrix and cannot read it; check the vfio_ap driver (`devfence inventory`)",
            )
        })?;
        let ev = json!({ "uuid": u, "matrix": c });
        Ok((c, ev))
    })
}

/// Assigns `m` to the new matrix mdev `new` and reads it back: exactly `m`.
fn give_ap_matrix(
    e: &mut Engine<'_>,
    run: &mut Run,
    act: &SysfsActuator<&dyn KernelIo>,
    new: MdevUuid,
    m: &ApConfig,
) -> Result<(), StepFailure> {
    e.step(
        run,
        "ap-matrix-assign",
        json!({ "uuid": new, "matrix": m }),
        |_| {
            let what = m
                .adapters
                .iter()
                .map(|a| ApResource::Adapter(*a))
                .chain(m.domains.iter().map(|d| ApResource::Domain(*d)))
                .chain(
                    m.control_domains
                        .iter()
                        .map(|d| ApResource::ControlDomain(*d)),
                );
            for r in what {
                act.ap_assign(new, r).map_err(|x| act_fail(&x))?;
            }
            Ok(((), json!({ "uuid": new, "matrix": m })))
        },
    )?;
    let io = e.io;
    e.gate(run, "ap-matrix", |_, _| match ap_config(io, new) {
        Ok(seen) if seen == *m => Ok(json!({ "uuid": new, "matrix": seen })),
        Ok(seen) => Err((
            format!("the new mdev {new} holds {seen:?}, not the old matrix {m:?}"),
            json!({ "uuid": new, "matrix": seen, "expected": m }),
            "check `dmesg` for the vfio_ap driver; an APQN may have been taken by another mdev or the host meanwhile".into(),
        )),
        Err(x) => Err((
            x,
            json!({ "uuid": new }),
            "check the vfio_ap driver".into(),
        )),
    })?;
    Ok(())
}

// ----------------------------------------------------------------------
// Recovery

pub(crate) fn recover_one(
    e: &mut Engine<'_>,
    op: &Operation,
    inv: &Inventory,
) -> Result<super::Recovered, EngineError> {
    let device = op.device;
    let journal = e.store.atomically(|tx| tx.journal(op.id))?;
    let last_step = journal
        .last()
        .map(|j| format!("{} ({})", j.step, j.state.name()));
    // mdevs this operation created (named in a planned step before acting).
    let created: Vec<MdevUuid> = journal
        .iter()
        .filter(|j| j.step == "mdev-create")
        .filter_map(|j| {
            j.detail
                .get("uuid")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let reason = format!(
        "interrupted: {} {} stopped after {}; recovery scrubs it",
        op.kind,
        op.id,
        last_step.as_deref().unwrap_or("nothing")
    );
    let mut run = Run {
        op: op.id,
        kind: "recover".into(),
        device,
        tenant: None,
        started: Instant::now(),
        timings: Vec::new(),
    };
    e.emit(&Progress::Began {
        op: op.id,
        kind: "recover".into(),
        device,
    });
    // Fail closed first: the device (and any mdev the operation created) is
    // unusable from here on.
    let mut to_quarantine = vec![device];
    to_quarantine.extend(created.iter().map(|u| DeviceId::Mdev(*u)));
    let (opid, r2) = (op.id, reason.clone());
    e.store.atomically(|tx| {
        for d in &to_quarantine {
            let Some(rec) = tx.device(d)? else { continue };
            if !matches!(rec.state, DeviceState::Quarantined { .. }) {
                tx.set_device_state(
                    d,
                    &rec.state,
                    &DeviceState::Quarantined { reason: r2.clone() },
                )?;
            }
            let detail = json!({ "operation": opid, "from": rec.state.to_string(), "reason": r2 });
            tx.journal_step(opid, "recover:quarantine", StepState::Done, &detail)?;
            tx.audit(&AuditEvent {
                kind: AuditKind::Recovery,
                device: Some(*d),
                tenant: rec.state.tenant().cloned(),
                detail,
            })?;
        }
        Ok(())
    })?;
    e.fp.hit("recover:quarantine:acted");
    let result = recover_scrub(e, &mut run, device, &created, inv);
    let q = DeviceState::Quarantined {
        reason: reason.clone(),
    };
    let (state, problem) = match result {
        Ok(()) => {
            let s = if let DeviceId::Mdev(u) = device {
                let s = DeviceState::Quarantined {
                    reason: format!(
                        "retired: mdev {u} removed by recovery (mdev UUIDs are single-use)"
                    ),
                };
                move_or_problem(e, &mut run, &device, &q, &s).map(|()| s)
            } else {
                move_or_problem(e, &mut run, &device, &q, &DeviceState::Scrubbing)
                    .and_then(|()| {
                        move_or_problem(
                            e,
                            &mut run,
                            &device,
                            &DeviceState::Scrubbing,
                            &DeviceState::Free,
                        )
                    })
                    .map(|()| DeviceState::Free)
            };
            match s {
                Ok(s) => (s, None),
                Err(p) => (current(e, &device).unwrap_or(q.clone()), Some(p)),
            }
        }
        Err(f) => (
            current(e, &device).unwrap_or(q.clone()),
            Some(format!("{}: {}", f.step, f.reason)),
        ),
    };
    let detail = json!({ "operation": op.id, "state": state.to_string(), "problem": problem, "created-mdevs": created });
    e.store.atomically(|tx| {
        tx.journal_step(opid, "recover:finish", StepState::Done, &detail)?;
        tx.finish_operation(opid, Outcome::Recovered)?;
        tx.audit(&AuditEvent {
            kind: AuditKind::Recovery,
            device: Some(device),
            tenant: None,
            detail: detail.clone(),
        })?;
        Ok(())
    })?;
    e.emit(&Progress::Finished {
        op: op.id,
        outcome: Outcome::Recovered,
        state: state.to_string(),
        elapsed_ms: run.elapsed_ms(),
    });
    Ok(super::Recovered {
        op: op.id,
        kind: op.kind.clone(),
        device,
        last_step,
        state,
        problem,
    })
}

fn move_or_problem(
    e: &mut Engine<'_>,
    run: &mut Run,
    d: &DeviceId,
    from: &DeviceState,
    to: &DeviceState,
) -> Result<(), String> {
    e.move_state(run, d, from, to).map_err(|f| f.reason)
}

fn recover_scrub(
    e: &mut Engine<'_>,
    run: &mut Run,
    device: DeviceId,
    created: &[MdevUuid],
    inv: &Inventory,
) -> Result<(), StepFailure> {
    let io = e.io;
    let act = SysfsActuator::new(io);
    for u in created {
        let u = *u;
        e.step(
            run,
            "mdev-remove",
            json!({ "uuid": u, "created-by-interrupted-operation": true }),
            |_| {
                if !io.exists(&format!("/sys/bus/mdev/devices/{u}")) {
                    return Ok(((), json!({ "uuid": u, "absent": true })));
                }
                act.mdev_remove(u).map_err(|x| act_fail(&x))?;
                Ok(((), json!({ "uuid": u, "removed": true })))
            },
        )?;
    }
    match super::classify(inv, &device) {
        Ok(kind) => scrub(e, run, &kind, None),
        Err(k) => match device {
            DeviceId::Mdev(_) => Ok(()),
            _ => Err(fail(k.reason, k.hint)),
        },
    }
}

/// How many live GUIDs one allocation skips before it gives up (the pool then
/// overlaps GUIDs in use; checking each one at the SM would take long).
const MAX_LIVE_SKIPS: usize = 256;

/// Every GUID the host shows on a port or VF, with where.
fn host_guids(inv: &Inventory) -> BTreeMap<Guid, String> {
    let mut out = BTreeMap::new();
    for f in &inv.pci {
        if let Some(s) = &f.sriov {
            for v in &s.vf_guids {
                for g in [v.port_guid, v.node_guid].into_iter().flatten() {
                    out.entry(g)
                        .or_insert_with(|| format!("VF {} of {}", v.index, f.bdf));
                }
            }
        }
    }
    for d in &inv.ib {
        if let Some(g) = d.node_guid {
            out.entry(g)
                .or_insert_with(|| format!("IB device {}", d.name));
        }
        for p in &d.ports {
            if let Some(g) = p.port_guid {
                out.entry(g)
                    .or_insert_with(|| format!("port {} of {}", p.port, d.name));
            }
        }
    }
    out
}
