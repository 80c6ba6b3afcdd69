//! The handover procedures per device kind: scrub (revoke everything of the old
//! tenant, verified) and prepare (give the new tenant exactly what it needs,
//! verified), and recovery of an interrupted operation.
//!
//! Step order is the journal order; [`plan`] lists the same steps without
//! acting. Names and descriptions of steps and gates are defined once, in
//! `lifecycle.rs` ([`Step`], [`Gate`]), for both; a test keeps the order in step.
//!
//! The host is changed only through the engine's [`Actuator`] (token delivery
//! and withdrawal included) and read back only through
//! [`devfence_host::readback`]; no path is built here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use devfence_fabric::{Expectation, PartitionKey, Programmed, Unverified, wait_verified_with};
use devfence_host::actuator::files::FileStepError;
use devfence_host::actuator::{ActError, Actuator, ApResource, VfToken};
use devfence_host::readback::{self, ApMatrixConfig, ReadBack, ReadBackError};
use devfence_model::{
    Bdf, DeviceId, GroupMember, Guid, Inventory, IommuGroupId, MdevUuid, Membership, PKey,
    Severity, Subject, TenantId,
};
use serde_json::{Value, json};

use super::{
    DeviceKind, Engine, EngineError, Gate, GateFailure, GuidSourceError, OpKind, Progress, Run,
    Step, StepFailure,
};
use crate::audit::{AuditEvent, AuditKind};
use crate::store::{
    DeviceState, GuidRecord, GuidState, OpOutcome, Operation, StepState, StoreError, StoreExt,
    Tenant,
};

/// How a successful procedure ended.
pub(crate) struct Finish {
    pub(crate) device: DeviceId,
    pub(crate) state: DeviceState,
    pub(crate) token_file: Option<String>,
}

/// One step or gate of a plan.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct PlannedStep {
    /// The journal name (`gate:` prefix for gates, `state:` for lifecycle moves).
    pub name: String,
    /// What it does or checks.
    pub what: String,
}

fn st(s: Step) -> PlannedStep {
    ps(s.name(), s.what())
}

fn gt(g: Gate) -> PlannedStep {
    PlannedStep {
        name: g.journal_name(),
        what: g.what().to_owned(),
    }
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
        source: Some(Box::new(e.clone())),
    }
}

pub(crate) fn fail(reason: impl Into<String>, hint: impl Into<String>) -> StepFailure {
    StepFailure {
        step: String::new(),
        reason: reason.into(),
        hint: hint.into(),
        source: None,
    }
}

fn file_fail(e: FileStepError) -> StepFailure {
    StepFailure {
        step: String::new(),
        reason: e.reason(),
        hint: e.hint().to_owned(),
        source: Some(Box::new(e)),
    }
}

fn node_path(g: IommuGroupId) -> String {
    readback::group_node(g)
}

pub(crate) fn token_path(runtime: &str, bdf: Bdf) -> String {
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
/// at the SM (see `retire_guids`); `defer`: their revocation goes to the SM in
/// the prepare's one apply (see [`one_sweep`]).
fn plan_scrub(kind: &DeviceKind, fabric: bool, defer: bool) -> Vec<PlannedStep> {
    let mut v = vec![st(Step::StateVoid)];
    match kind {
        DeviceKind::Mdev { .. } => {
            v.push(st(Step::MdevRemove));
        }
        _ => {
            v.push(st(Step::NodeRevoke));
            v.push(gt(Gate::NodeRevoked));
            if matches!(kind, DeviceKind::TokenVf { .. }) {
                v.push(st(Step::TokenWithdraw));
            }
            v.push(st(Step::Reset));
            if matches!(kind, DeviceKind::IbVf { .. }) {
                v.push(st(Step::GuidRetire));
            }
            if matches!(kind, DeviceKind::IbVf { .. }) && fabric && !defer {
                v.push(st(Step::FabricRevoke));
                v.push(gt(Gate::FabricRevoked));
            }
        }
    }
    v
}

/// The steps of preparing a device of `kind` for a tenant; `moved`: the old GUIDs'
/// revocation is deferred to this prepare's apply.
fn plan_prepare(kind: &DeviceKind, moved: bool) -> Vec<PlannedStep> {
    let mut v = Vec::new();
    match kind {
        DeviceKind::Mdev { .. } => {
            v.push(st(Step::MdevCreate));
            v.push(gt(Gate::MdevPresent));
            if is_ap_matrix(kind) {
                v.push(st(Step::ApMatrixAssign));
                v.push(gt(Gate::ApMatrix));
            }
        }
        DeviceKind::IbVf { .. } => {
            v.push(st(Step::GuidAllocate));
            v.push(st(Step::BindHostDriver));
            v.push(st(Step::GuidSet));
            v.push(st(if moved {
                Step::FabricMove
            } else {
                Step::FabricGrant
            }));
            v.push(gt(Gate::SmVerified));
            v.push(gt(Gate::PortPkeys));
        }
        DeviceKind::TokenVf { .. } => {
            v.push(st(Step::TokenSet));
            v.push(st(Step::TokenDeliver));
            v.push(gt(Gate::TokenDelivered));
        }
        DeviceKind::Pci { .. } => {}
    }
    if !matches!(kind, DeviceKind::Mdev { .. }) {
        v.push(st(Step::BindVfio));
        v.push(gt(Gate::Driver));
    }
    v.push(gt(Gate::GroupRules));
    v.push(st(Step::NodeGrant));
    v.push(gt(Gate::NodeOwner));
    v
}

/// Whether giving a device of `kind` to a tenant revokes its old GUIDs and grants
/// the fresh one in one apply at the SM (one sweep, issue 14 item 2): an IB VF,
/// when there is a GUID pool to take the fresh GUID from (the ledger's, or a
/// fleet's shared one through the engine's GUID source). Without a pool
/// the revoke is applied and verified on its own first (two sweeps), so a
/// handover that then cannot get a GUID leaves the old one revoked.
///
/// The protocol is `Protocol::OneSweep` of `devfence-modelcheck`: the old GUID
/// leaves A and the new one enters B in the same apply, and the device is never
/// `Ready` before the SM verified both and the port's table.
fn one_sweep(kind: &DeviceKind, pool: bool) -> bool {
    pool && matches!(kind, DeviceKind::IbVf { .. })
}

/// The steps an operation on a device of `kind` in `state`, with `guids` in the
/// pool, runs; `pool`: there is a GUID pool (the ledger's or a fleet's).
pub(crate) fn plan(
    kind: &DeviceKind,
    state: &DeviceState,
    to_tenant: bool,
    guids: &[GuidRecord],
    pool: bool,
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
        v.extend(plan_scrub(kind, fabric, false));
        if matches!(kind, DeviceKind::Mdev { .. }) {
            v.push(ps("state:quarantined", "retire the removed mdev's UUID"));
        } else {
            v.push(ps("state:free", "verified clean: Free"));
        }
        v.push(ps("finish", "close the operation"));
        return v;
    }
    if is_ap_matrix(kind) {
        v.push(st(Step::ApMatrixRead));
    }
    // As `transfer` decides: the revoke waits for the prepare's apply.
    let moved = fabric && one_sweep(kind, pool);
    v.extend(plan_scrub(kind, fabric, moved));
    if !free && !matches!(kind, DeviceKind::Mdev { .. }) {
        if moved {
            v.push(ps(
                "state:preparing",
                "Preparing for the new tenant (not Free: the old GUIDs leave the fabric in the grant's apply, verified before Ready)",
            ));
        } else {
            v.push(ps("state:free", "verified clean: Free"));
            v.push(ps("state:preparing", "Preparing for the new tenant"));
        }
    }
    v.extend(plan_prepare(kind, moved));
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

/// What an assign or handover moves: the device, from which state and tenant,
/// to which tenant and VM.
pub(crate) struct Transfer<'t> {
    /// The device as the host shows it.
    pub(crate) kind: &'t DeviceKind,
    /// Its state before the operation.
    pub(crate) from: &'t DeviceState,
    /// The tenant it is taken from, if any.
    pub(crate) old: Option<&'t Tenant>,
    /// The tenant it is given to.
    pub(crate) to: &'t Tenant,
    /// The VM it is reserved for, if any.
    pub(crate) vm: Option<&'t str>,
}

pub(crate) fn transfer(
    e: &mut Engine<'_>,
    run: &mut Run,
    t: &Transfer<'_>,
) -> Result<Finish, StepFailure> {
    let Transfer {
        kind,
        from,
        old,
        to,
        vm,
    } = *t;
    let device = run.device;
    // A vfio_ap matrix mdev's matrix is its configuration (the APQNs the tenant
    // gets): read and journalled before the remove, given to the new mdev.
    let matrix = if is_ap_matrix(kind) {
        Some(read_ap_matrix(e, run, kind)?)
    } else {
        None
    };
    let pool = one_sweep(kind, e.has_guid_pool()?);
    let deferred = scrub(e, run, kind, old, pool)?;
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
    let mut pending = Pending {
        guids: deferred,
        applied: false,
    };
    let res = (|| -> Result<Option<String>, StepFailure> {
        if !matches!(from, DeviceState::Free) {
            if pending.guids.is_empty() {
                e.move_state(run, &device, &DeviceState::Scrubbing, &DeviceState::Free)?;
                e.move_state(run, &device, &DeviceState::Free, &preparing)?;
            } else {
                // Not Free: the old GUIDs are still in their partitions until the
                // grant's apply, which the prepare's gate verifies before Ready.
                e.move_state(run, &device, &DeviceState::Scrubbing, &preparing)?;
            }
        }
        prepare_pci(e, run, kind, old, to, &mut pending)
    })();
    let token_file = match res {
        Ok(t) => t,
        Err(f) => {
            // The one-sweep path failed before its apply: the old GUIDs are still
            // in their partitions at the SM. Revoke them now (journalled and
            // verified, as a two-sweep handover would have) so the quarantined
            // device leaves nothing of the old tenant on the fabric; the
            // failure reported stays the first one.
            if !pending.applied && !pending.guids.is_empty() {
                let _ = revoke_at_sm(e, run, &pending.guids, old);
            }
            return Err(f);
        }
    };
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

/// The old GUIDs whose revocation a one-sweep transfer deferred to the grant's
/// apply, and whether that apply went through.
pub(crate) struct Pending {
    pub(crate) guids: Vec<Guid>,
    pub(crate) applied: bool,
}

/// Whether an operation on a device of `kind` can join a batch (one apply at
/// the SM for all its members): an IB VF whose transfer is one-sweep (when
/// there is a GUID pool, the ledger's or a fleet's); a release of one too.
pub(crate) fn batchable(kind: &DeviceKind, pool: bool) -> bool {
    one_sweep(kind, pool)
}

/// A one-sweep IB VF transfer stopped at its fabric step, waiting for the
/// batch's shared apply.
pub(crate) struct Parked {
    pub(crate) pending: Pending,
    pub(crate) grant: IbGrant,
    vf: IbVf,
    group: IommuGroupId,
    launcher: (u32, u32),
}

/// An IB VF transfer (one-sweep) up to its fabric step: scrubbed (the old
/// GUIDs retired, their revocation deferred), Preparing, a fresh GUID set and
/// read back. On failure the deferred revocation is applied on its own (as the
/// single transfer does) and the failure returned.
pub(crate) fn ib_transfer_until_fabric(
    e: &mut Engine<'_>,
    run: &mut Run,
    t: &Transfer<'_>,
) -> Result<Parked, StepFailure> {
    let Transfer {
        kind,
        from,
        old,
        to,
        vm,
    } = *t;
    let DeviceKind::IbVf {
        bdf,
        group,
        pf,
        index,
        port_guid,
    } = kind
    else {
        return Err(fail("not an IB VF", "this is a bug in devfence"));
    };
    let device = run.device;
    let act = e.act.clone();
    let guids = scrub(e, run, kind, old, true)?;
    let pending = Pending {
        guids,
        applied: false,
    };
    let preparing = DeviceState::Preparing {
        tenant: to.id.clone(),
        vm: vm.map(str::to_owned),
    };
    let vf = IbVf {
        bdf: *bdf,
        pf: *pf,
        index: *index,
        old_port: *port_guid,
    };
    let res = (|| -> Result<(IbGrant, (u32, u32)), StepFailure> {
        if !matches!(from, DeviceState::Free) {
            if pending.guids.is_empty() {
                e.move_state(run, &device, &DeviceState::Scrubbing, &DeviceState::Free)?;
                e.move_state(run, &device, &DeviceState::Free, &preparing)?;
            } else {
                e.move_state(run, &device, &DeviceState::Scrubbing, &preparing)?;
            }
        }
        let l = launcher(to)?;
        let g = ib_pre(e, run, act.as_ref(), &vf, to)?;
        Ok((g, l))
    })();
    match res {
        Ok((grant, launcher)) => Ok(Parked {
            pending,
            grant,
            vf,
            group: *group,
            launcher,
        }),
        Err(f) => {
            if !pending.guids.is_empty() {
                let _ = revoke_at_sm(e, run, &pending.guids, old);
            }
            Err(f)
        }
    }
}

/// An IB VF transfer after the batch's shared apply: `ticket` is the apply's
/// (or the failure of the shared fabric step). Every gate of the single
/// transfer runs for this device alone: the SM's three questions for its GUIDs,
/// its port's P_Key table, its driver, its group's rules, its node.
pub(crate) fn ib_transfer_after_fabric(
    e: &mut Engine<'_>,
    run: &mut Run,
    t: &Transfer<'_>,
    parked: &mut Parked,
    ticket: Result<devfence_fabric::Ticket, StepFailure>,
) -> Result<Finish, StepFailure> {
    let ticket = match ticket {
        Ok(tk) => {
            parked.pending.applied = true;
            tk
        }
        Err(f) => {
            if !parked.pending.guids.is_empty() {
                let _ = revoke_at_sm(e, run, &parked.pending.guids, t.old);
            }
            return Err(f);
        }
    };
    let device = run.device;
    let (act, host) = (e.act.clone(), e.host);
    ib_post(
        e,
        run,
        &parked.vf,
        t.old,
        &parked.grant,
        &parked.pending.guids,
        ticket,
    )?;
    pci_tail(
        e,
        run,
        act.as_ref(),
        host,
        parked.vf.bdf,
        parked.group,
        parked.launcher,
    )?;
    let preparing = DeviceState::Preparing {
        tenant: t.to.id.clone(),
        vm: t.vm.map(str::to_owned),
    };
    let ready = DeviceState::Ready {
        tenant: t.to.id.clone(),
        vm: t.vm.map(str::to_owned),
    };
    e.move_state(run, &device, &preparing, &ready)?;
    Ok(Finish {
        device,
        state: ready,
        token_file: None,
    })
}

/// An IB VF release up to its fabric step: scrubbed, its GUIDs retired; the
/// GUIDs whose revocation at the SM waits for the batch's apply are returned.
pub(crate) fn ib_release_until_fabric(
    e: &mut Engine<'_>,
    run: &mut Run,
    kind: &DeviceKind,
    old: Option<&Tenant>,
) -> Result<Vec<Guid>, StepFailure> {
    scrub(e, run, kind, old, true)
}

/// An IB VF release after the batch's shared apply (`None`: it had no GUID to
/// revoke): the SM shows its GUIDs in no partition (verified for this device
/// alone), then `Free`.
pub(crate) fn ib_release_after_fabric(
    e: &mut Engine<'_>,
    run: &mut Run,
    guids: &[Guid],
    old: Option<&Tenant>,
    ticket: Option<Result<devfence_fabric::Ticket, StepFailure>>,
) -> Result<Finish, StepFailure> {
    let device = run.device;
    if let Some(ticket) = ticket {
        let ticket = ticket?;
        let parts = revoked_from(e, old)?;
        let mut exp = Expectation::after(ticket);
        for g in guids {
            exp = exp.revoke(*g, parts.iter().copied());
        }
        sm_gate(e, run, Gate::FabricRevoked, &exp)?;
    }
    e.move_state(run, &device, &DeviceState::Scrubbing, &DeviceState::Free)?;
    Ok(Finish {
        device,
        state: DeviceState::Free,
        token_file: None,
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
        Some(k) => {
            scrub(e, run, k, old, false)?;
        }
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

/// Scrubs the device. With `defer` (a one-sweep transfer) the old GUIDs are
/// retired but not revoked at the SM: they are returned, for the prepare's one
/// apply. Otherwise the returned list is empty.
fn scrub(
    e: &mut Engine<'_>,
    run: &mut Run,
    kind: &DeviceKind,
    old: Option<&Tenant>,
    defer: bool,
) -> Result<Vec<Guid>, StepFailure> {
    let (act, host) = (e.act.clone(), e.host);
    void_admitted_state(e, run)?;
    match kind {
        DeviceKind::Mdev { uuid, .. } => {
            let u = *uuid;
            e.step(run, Step::MdevRemove, json!({ "uuid": u }), |_| {
                let p = readback::mdev_dir(u);
                if !host.mdev_present(u) {
                    return Ok(((), json!({ "uuid": u, "removed": false, "absent": true })));
                }
                act.mdev_remove(u).map_err(|x| act_fail(&x))?;
                if host.mdev_present(u) {
                    return Err(fail(
                        format!("{p} still exists after the remove"),
                        "check `dmesg`; the mdev may be in use by a VM",
                    ));
                }
                Ok(((), json!({ "uuid": u, "removed": true })))
            })?;
            Ok(Vec::new())
        }
        DeviceKind::Pci { bdf, group }
        | DeviceKind::TokenVf { bdf, group, .. }
        | DeviceKind::IbVf { bdf, group, .. } => {
            let (bdf, group) = (*bdf, *group);
            revoke_node(e, run, act.as_ref(), host, group)?;
            if let DeviceKind::TokenVf { .. } = kind {
                let p = token_path(&e.cfg.runtime_dir, bdf);
                e.step(run, Step::TokenWithdraw, json!({ "path": p }), |_| {
                    // Through real directories inside the root only, never a link.
                    let existed = act.withdraw_token(&p).map_err(file_fail)?;
                    Ok(((), json!({ "path": p, "removed": existed })))
                })?;
            }
            e.step(run, Step::Reset, json!({ "bdf": bdf }), |_| {
                act.reset(bdf).map_err(|x| act_fail(&x))?;
                Ok(((), json!({ "bdf": bdf, "answers": true })))
            })?;
            if let DeviceKind::IbVf { port_guid, .. } = kind {
                let guids = retire_guids(e, run, *port_guid)?;
                if defer {
                    return Ok(guids);
                }
                revoke_at_sm(e, run, &guids, old)?;
            }
            Ok(Vec::new())
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
    let act = e.act.clone();
    let dir = state_dir(&e.cfg.runtime_dir);
    let device = run.device.to_string();
    e.step(run, Step::StateVoid, json!({ "dir": dir }), |_| {
        let voided = act.void_device_state(&dir, &device).map_err(file_fail)?;
        // The tokens name the payloads; only their number is journalled.
        Ok(((), json!({ "dir": dir, "voided": voided })))
    })
}

fn revoke_node(
    e: &mut Engine<'_>,
    run: &mut Run,
    act: &dyn Actuator,
    host: ReadBack<'_>,
    group: IommuGroupId,
) -> Result<(), StepFailure> {
    let node = node_path(group);
    e.step(run, Step::NodeRevoke, json!({ "node": node }), |_| {
        if !host.node_present(group) {
            return Ok(((), json!({ "node": node, "present": false })));
        }
        act.set_group_node_owner(group, 0, 0, 0o600)
            .map_err(|x| act_fail(&x))?;
        Ok(((), json!({ "node": node, "owner": "0:0", "mode": "0600" })))
    })?;
    e.gate(run, Gate::NodeRevoked, |_, _| {
        if !host.node_present(group) {
            return Ok(json!({ "node": node, "present": false }));
        }
        match host.node_meta(group) {
            Ok(m) if m.uid == 0 && m.gid == 0 => Ok(json!({ "node": node, "uid": m.uid, "gid": m.gid, "mode": format!("{:04o}", m.mode) })),
            Ok(m) => Err(GateFailure::new(
                format!("{node} is still owned by {}:{}", m.uid, m.gid),
                json!({ "node": node, "uid": m.uid, "gid": m.gid }),
                "something changed the owner back; find it (udev rules?) before handing the device over".into(),
            )),
            Err(x) => Err(GateFailure::new(format!("cannot stat {node}: {x}"), json!({ "node": node }), "check /dev/vfio".into())),
        }
    })
}

/// Retires every GUID this device was issued (and its factory GUID) in the pool;
/// returns them (what the SM must then see in no partition).
fn retire_guids(
    e: &mut Engine<'_>,
    run: &mut Run,
    port_guid: Option<Guid>,
) -> Result<Vec<Guid>, StepFailure> {
    let device = run.device;
    let op = run.op;
    let guids: Vec<Guid> = e.step(
        run,
        Step::GuidRetire,
        json!({ "port-guid": port_guid }),
        |e| {
            if let Some(src) = e.guids {
                // The shared pool first: a GUID retired there is never issued
                // again; the ledger records it after.
                for rec in e.store.atomically(|tx| tx.guids_of(&device))? {
                    if rec.state == GuidState::Issued {
                        src.retire(rec.guid).map_err(|x| StepFailure {
                            step: String::new(),
                            reason: format!("{} did not retire {}: {x}", src.describe(), rec.guid),
                            hint: x.hint.clone(),
                            source: Some(Box::new(x)),
                        })?;
                    }
                }
            }
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
        },
    )?;
    Ok(guids)
}

/// The partitions a retired GUID must be in none of: every tenant's, and the
/// old tenant's.
fn revoked_from(
    e: &mut Engine<'_>,
    old: Option<&Tenant>,
) -> Result<BTreeSet<PartitionKey>, StepFailure> {
    let mut parts = every_partition(e)?;
    if let Some(t) = old {
        parts.extend(partitions(t).into_iter().map(|(k, _)| k));
    }
    Ok(parts)
}

/// Removes `guids` from every partition at the SM (one apply), and verifies that.
fn revoke_at_sm(
    e: &mut Engine<'_>,
    run: &mut Run,
    guids: &[Guid],
    old: Option<&Tenant>,
) -> Result<(), StepFailure> {
    if guids.is_empty() {
        return Ok(());
    }
    let sm = e.sm;
    let parts = revoked_from(e, old)?;
    let ticket = e.step(run, Step::FabricRevoke, json!({ "guids": guids }), |e| {
        stage_revoke(sm, guids)?;
        let t = e.sm_apply().map_err(|x| {
            sm.discard_staged();
            fail(format!("the SM did not take the change: {x}"), "check the SM's health (`devfence status`); nothing was granted")
        })?;
        Ok((t, json!({ "backend": sm.backend(), "ticket": { "change": t.change.0, "generation": t.generation.0 } })))
    })?;
    let mut exp = Expectation::after(ticket);
    for g in guids {
        exp = exp.revoke(*g, parts.iter().copied());
    }
    sm_gate(e, run, Gate::FabricRevoked, &exp)
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
    gate: Gate,
    exp: &Expectation,
) -> Result<(), StepFailure> {
    let sm = e.sm;
    let deadline = Instant::now() + e.cfg.gate_deadline;
    let pace = e.cfg.pace;
    let gname = gate.name().to_owned();
    e.gate(run, gate, |e, run| {
        let mut polls = 0u32;
        let started = run.started;
        let slot = e.slot;
        let progress = &mut e.progress;
        let res = wait_verified_with(sm, exp, deadline, pace, &mut |u: &Unverified| {
            polls += 1;
            let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            progress(slot, &Progress::Waiting { gate: gname.clone(), polls, elapsed_ms, last: u.to_string() });
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
                Err(GateFailure::new(
                    nv.to_string(),
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
    pending: &mut Pending,
) -> Result<Option<String>, StepFailure> {
    let (act, host) = (e.act.clone(), e.host);
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
            let vf = IbVf {
                bdf,
                pf: *pf,
                index: *index,
                old_port: *port_guid,
            };
            prepare_ib(e, run, act.as_ref(), &vf, old, to, pending)?;
        }
        DeviceKind::TokenVf { pf, .. } => {
            let pf = *pf;
            let device = run.device;
            let token: VfToken = e.step(run, Step::TokenSet, json!({ "pf": pf }), |e| {
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
            e.step(
                run,
                Step::TokenDeliver,
                json!({ "path": p, "launcher": format!("{uid}:{gid}") }),
                |_| {
                    act.deliver_token(&p, &token, uid, gid).map_err(file_fail)?;
                    Ok((
                        (),
                        json!({ "path": p, "owner": format!("{uid}:{gid}"), "mode": "0600" }),
                    ))
                },
            )?;
            drop(token);
            e.gate(run, Gate::TokenDelivered, |_, _| {
                match host.file_meta(&p) {
                    Ok(m) if m.uid == uid && m.gid == gid && m.mode & 0o777 == 0o600 => {
                        Ok(json!({ "path": p, "uid": m.uid, "gid": m.gid, "mode": format!("{:04o}", m.mode) }))
                    }
                    Ok(m) => Err(GateFailure::new(
                        format!("{p} is {}:{} mode {:04o}, not {uid}:{gid} 0600", m.uid, m.gid, m.mode),
                        json!({ "path": p }),
                        "something changed the token file; it is void: hand the device over again".into(),
                    )),
                    Err(x) => Err(GateFailure::new(format!("cannot stat {p}: {x}"), json!({ "path": p }), "check the runtime directory".into())),
                }
            })?;
            token_file = Some(p);
        }
        _ => {}
    }
    pci_tail(e, run, act.as_ref(), host, bdf, group, (uid, gid))?;
    Ok(token_file)
}

/// The end of every PCI function's prepare: bound to vfio-pci, the group's
/// rules pass, the group node given to the tenant's launcher — each verified.
fn pci_tail(
    e: &mut Engine<'_>,
    run: &mut Run,
    act: &dyn Actuator,
    host: ReadBack<'_>,
    bdf: Bdf,
    group: IommuGroupId,
    (uid, gid): (u32, u32),
) -> Result<(), StepFailure> {
    e.step(
        run,
        Step::BindVfio,
        json!({ "bdf": bdf, "driver": "vfio-pci" }),
        |_| {
            act.bind(bdf, "vfio-pci").map_err(|x| act_fail(&x))?;
            Ok(((), json!({ "bdf": bdf, "driver": "vfio-pci" })))
        },
    )?;
    e.gate(run, Gate::Driver, |_, _| {
        let link = readback::driver_link(bdf);
        match host.driver_target(bdf) {
            Ok(t) if t.rsplit('/').next() == Some("vfio-pci") => {
                Ok(json!({ "path": link, "target": t }))
            }
            Ok(t) => Err(GateFailure::new(
                format!("{bdf} is bound to {t}, not vfio-pci"),
                json!({ "path": link, "target": t }),
                "bind it with `devfence bind --driver vfio-pci`".into(),
            )),
            Err(x) => Err(GateFailure::new(
                format!("{bdf} has no driver ({x})"),
                json!({ "path": link }),
                "bind it with `devfence bind --driver vfio-pci`".into(),
            )),
        }
    })?;
    group_rules(e, run, group, &DeviceId::Pci(bdf))?;
    grant_node(e, run, act, host, group, uid, gid)
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

/// An IB VF being prepared: where it is, and the GUID its port had.
struct IbVf {
    bdf: Bdf,
    pf: Bdf,
    index: u32,
    old_port: Option<Guid>,
}

fn prepare_ib(
    e: &mut Engine<'_>,
    run: &mut Run,
    act: &dyn Actuator,
    vf: &IbVf,
    old: Option<&Tenant>,
    to: &Tenant,
    pending: &mut Pending,
) -> Result<(), StepFailure> {
    let g = ib_pre(e, run, act, vf, to)?;
    let ticket = ib_fabric_step(e, run, &g, pending)?;
    ib_post(e, run, vf, old, &g, &pending.guids, ticket)
}

/// What an IB VF's prepare grants at the SM: its fresh GUID into the tenant's
/// partitions.
pub(crate) struct IbGrant {
    pub(crate) new: Guid,
    pub(crate) grant: Vec<(PartitionKey, Membership)>,
}

impl IbGrant {
    /// The fabric step that applies this grant (with `moved`, the deferred
    /// revocation of the old GUIDs, in the same apply) and its journal detail.
    pub(crate) fn step(&self, moved: &[Guid]) -> (Step, Value) {
        let shown: Vec<String> = self
            .grant
            .iter()
            .map(|(k, m)| format!("{:#06x}:{m:?}", k.base()))
            .collect();
        if moved.is_empty() {
            (
                Step::FabricGrant,
                json!({ "guid": self.new, "partitions": shown }),
            )
        } else {
            (
                Step::FabricMove,
                json!({ "revoke": moved, "guid": self.new, "partitions": shown }),
            )
        }
    }

    /// Stages the grant (and the removal of `moved` from every partition) at
    /// the SM; on error everything staged is discarded.
    pub(crate) fn stage(
        &self,
        sm: &dyn devfence_fabric::SubnetManager,
        moved: &[Guid],
    ) -> Result<(), StepFailure> {
        stage_revoke(sm, moved)?;
        let new = self.new;
        for (k, m) in &self.grant {
            sm.stage_add(new, *k, *m).map_err(|x| {
                sm.discard_staged();
                fail(
                    format!("staging {new} into {:#06x} failed: {x}", k.base()),
                    "check the SM",
                )
            })?;
        }
        Ok(())
    }
}

/// Stages the removal of `guids` from every partition; on error everything
/// staged is discarded.
pub(crate) fn stage_revoke(
    sm: &dyn devfence_fabric::SubnetManager,
    guids: &[Guid],
) -> Result<(), StepFailure> {
    for g in guids {
        sm.stage_remove_all(*g).map_err(|x| {
            sm.discard_staged();
            fail(
                format!("staging the removal of {g} failed: {x}"),
                "check the SM",
            )
        })?;
    }
    Ok(())
}

/// An IB VF's prepare up to the SM: a fresh GUID allocated, the VF on its host
/// driver with that GUID set and read back; the tenant has partitions.
fn ib_pre(
    e: &mut Engine<'_>,
    run: &mut Run,
    act: &dyn Actuator,
    vf: &IbVf,
    to: &Tenant,
) -> Result<IbGrant, StepFailure> {
    let IbVf { bdf, pf, index, .. } = *vf;
    let sm = e.sm;
    let device = run.device;
    let tid: TenantId = to.id.clone();
    let new: Guid = e.step(run, Step::GuidAllocate, json!({ "tenant": tid }), |e| {
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
        if let Some(src) = e.guids {
            // A fleet: the fabric's shared pool issues it (never issued to any
            // other host); the same live checks, then the ledger records it.
            let source_fail = |x: GuidSourceError| StepFailure {
                step: String::new(),
                reason: format!("{} gave no fresh GUID: {x}", src.describe()),
                hint: x.hint.clone(),
                source: Some(Box::new(x)),
            };
            loop {
                let g = src.fresh().map_err(source_fail)?;
                let live: Option<String> = if let Some(w) = on_host.get(&g) {
                    Some(format!("live on {w}, skipped by the GUID pool"))
                } else if configured.contains(&g) {
                    Some(format!(
                        "named in the SM's configuration ({}), skipped by the GUID pool",
                        sm.backend()
                    ))
                } else {
                    let obs = sm.observe(&[g]).map_err(|x| {
                        fail(
                            format!("GUID {g} cannot be checked at the SM: {x}"),
                            "devfence issues no GUID it cannot check against the SM",
                        )
                    })?;
                    match obs.ports.get(&g).map(|v| &v.programmed) {
                        Some(Programmed::Absent) => None,
                        Some(_) => Some(format!(
                            "a port on the fabric ({}), skipped by the GUID pool",
                            sm.backend()
                        )),
                        None => {
                            return Err(fail(
                                format!("GUID {g}: the SM's answer left it out"),
                                "devfence issues no GUID it cannot check against the SM",
                            ));
                        }
                    }
                };
                match live {
                    None => {
                        e.store
                            .atomically(|tx| tx.record_issued_guid(&device, &tid, g))?;
                        return Ok((
                            g,
                            json!({ "guid": g, "skipped": skipped, "source": src.describe() }),
                        ));
                    }
                    Some(note) => {
                        // Held by this host in the shared pool, never issued.
                        let _ = src.retire(g);
                        e.store.atomically(|tx| tx.record_foreign_guid(g, &note))?;
                        skipped.push(g);
                        if skipped.len() >= MAX_LIVE_SKIPS {
                            return Err(fail(
                                format!(
                                    "{MAX_LIVE_SKIPS} GUIDs of {} in a row are in use elsewhere",
                                    src.describe()
                                ),
                                "the shared pool overlaps live GUIDs: give the fabric a range of its own",
                            ));
                        }
                    }
                }
            }
        }
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
        Step::BindHostDriver,
        json!({ "bdf": bdf, "driver": host_driver }),
        |_| {
            act.bind(bdf, &host_driver).map_err(|x| act_fail(&x))?;
            Ok(((), json!({ "bdf": bdf, "driver": host_driver })))
        },
    )?;
    e.step(
        run,
        Step::GuidSet,
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
    Ok(IbGrant { new, grant })
}

/// The fabric step of one IB VF's prepare on its own: the grant (and the
/// deferred revocation of the old GUIDs: one sweep) staged and applied.
fn ib_fabric_step(
    e: &mut Engine<'_>,
    run: &mut Run,
    g: &IbGrant,
    pending: &mut Pending,
) -> Result<devfence_fabric::Ticket, StepFailure> {
    let sm = e.sm;
    let moved = pending.guids.clone();
    let (step, detail) = g.step(&moved);
    let applied = &mut pending.applied;
    e.step(run, step, detail, |e| {
        g.stage(sm, &moved)?;
        let t = e.sm_apply().map_err(|x| {
            sm.discard_staged();
            fail(format!("the SM did not take the change: {x}"), "check the SM's health")
        })?;
        *applied = true;
        Ok((t, json!({ "backend": sm.backend(), "ticket": { "change": t.change.0, "generation": t.generation.0 } })))
    })
}

/// An IB VF's prepare after the SM took the grant (`ticket`): the SM's three
/// questions for this VF's GUIDs, then the VF's own P_Key table at its port.
fn ib_post(
    e: &mut Engine<'_>,
    run: &mut Run,
    vf: &IbVf,
    old: Option<&Tenant>,
    g: &IbGrant,
    moved: &[Guid],
    ticket: devfence_fabric::Ticket,
) -> Result<(), StepFailure> {
    let IbVf { bdf, old_port, .. } = *vf;
    let host = e.host;
    let device = run.device;
    let (new, grant) = (g.new, &g.grant);
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
    for g in retired.into_iter().filter(|g| !moved.contains(g)) {
        exp = exp.revoke(g, old_parts.iter().copied());
    }
    if !moved.is_empty() {
        // As the two-sweep revoke's gate asks: in no partition of any tenant.
        let parts = revoked_from(e, old)?;
        for g in moved {
            exp = exp.revoke(*g, parts.iter().copied());
        }
    }
    exp = exp.grant(new, grant.iter().copied());
    sm_gate(e, run, Gate::SmVerified, &exp)?;
    // Verification at the port: the VF's own P_Key table, read on the host.
    let want: BTreeSet<PKey> = grant.iter().map(|(k, m)| k.pkey(*m)).collect();
    let forbidden: BTreeSet<u16> = old_parts.iter().map(|k| k.base()).collect();
    e.gate(run, Gate::PortPkeys, |_, _| {
        port_pkeys(host, bdf, new, &want, &forbidden)
    })
}

/// Reads the P_Key table of the VF's IB port and checks it against the grant.
fn port_pkeys(
    host: ReadBack<'_>,
    bdf: Bdf,
    guid: Guid,
    want: &BTreeSet<PKey>,
    forbidden: &BTreeSet<u16>,
) -> Result<Value, GateFailure> {
    let hint = "the port does not (yet) carry what the SM shows: check the VF's link and the SM's log; the device stays quarantined until it does".to_string();
    let port = host.vf_ib_port(bdf).map_err(|x| match &x {
        ReadBackError::NoIbDevice { dir, .. } => GateFailure::new(
            x.to_string(),
            json!({ "path": dir }),
            "load mlx5_ib so the VF's port can be read; devfence does not trust a table it cannot read".to_string(),
        ),
        ReadBackError::EmptyIbDir { dir } => {
            GateFailure::new(x.to_string(), json!({ "path": dir }), hint.clone())
        }
        _ => GateFailure::new(x.to_string(), json!({}), hint.clone()),
    })?;
    let gid0 = &port.gid0;
    if port.guid != Some(guid) {
        return Err(GateFailure::new(
            format!(
                "the port shows GUID {} in {gid0}, not {guid}",
                port.guid
                    .map_or_else(|| "none".to_owned(), |g| g.to_string())
            ),
            json!({ "path": gid0 }),
            hint,
        ));
    }
    let pdir = port.pkeys_dir();
    let table = host.pkey_table(&port).map_err(|x| {
        let path = match &x {
            ReadBackError::Read { path, .. } | ReadBackError::NotAPKey { path, .. } => path.clone(),
            _ => pdir.clone(),
        };
        GateFailure::new(x.to_string(), json!({ "path": path }), hint.clone())
    })?;
    let keys: BTreeSet<PKey> = table.iter().map(|s| s.pkey).collect();
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
        return Err(GateFailure::new(
            format!(
                "the port still carries another tenant's P_Keys {}",
                leaked.join(", ")
            ),
            ev,
            hint,
        ));
    }
    if !missing.is_empty() {
        return Err(GateFailure::new(
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
    e.gate(run, Gate::GroupRules, |e, _| {
        let inv = e.inventory().map_err(|x| {
            GateFailure::new(x.to_string(), json!({}), "check the host".to_string())
        })?;
        let tenancy = e
            .store
            .atomically(|tx| super::tenancy_from_ledger(tx))
            .map_err(|x| {
                GateFailure::new(x.to_string(), json!({}), "check the ledger".to_string())
            })?;
        let members: BTreeSet<GroupMember> = inv
            .iommu_groups
            .iter()
            .filter(|g| g.id == group)
            .flat_map(|g| g.members.iter().cloned())
            .collect();
        // A finding about the group, the device or another member of its group
        // blocks (matched on the typed subject, never on its text).
        let blocking: Vec<_> = devfence_policy::check(&inv, &tenancy)
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .filter(|f| {
                f.subject.is_group(group)
                    || f.subject.is_device(&dev)
                    || matches!(&f.subject, Subject::Device(d) if members.iter().any(|m| m.is(d)))
            })
            .collect();
        if blocking.is_empty() {
            return Ok(json!({ "group": group, "members": members, "errors": 0 }));
        }
        let first = &blocking[0];
        Err(GateFailure::new(
            format!("{} ({}): {}", first.rule, first.subject, first.message),
            json!({ "group": group, "findings": blocking }),
            first.hint.clone(),
        ))
    })
}

fn grant_node(
    e: &mut Engine<'_>,
    run: &mut Run,
    act: &dyn Actuator,
    host: ReadBack<'_>,
    group: IommuGroupId,
    uid: u32,
    gid: u32,
) -> Result<(), StepFailure> {
    let mode = e.cfg.node_mode;
    let node = node_path(group);
    e.step(run, Step::NodeGrant, json!({ "node": node, "owner": format!("{uid}:{gid}") }), |_| {
        act.set_group_node_owner(group, uid, gid, mode).map_err(|x| act_fail(&x))?;
        Ok(((), json!({ "node": node, "owner": format!("{uid}:{gid}"), "mode": format!("{mode:04o}") })))
    })?;
    e.gate(run, Gate::NodeOwner, |_, _| match host.node_meta(group) {
        Ok(m) if m.uid == uid && m.gid == gid && m.mode == mode => Ok(
            json!({ "node": node, "uid": m.uid, "gid": m.gid, "mode": format!("{:04o}", m.mode) }),
        ),
        Ok(m) => Err(GateFailure::new(
            format!(
                "{node} is {}:{} {:04o}, not {uid}:{gid} {mode:04o}",
                m.uid, m.gid, m.mode
            ),
            json!({ "node": node, "uid": m.uid, "gid": m.gid, "mode": format!("{:04o}", m.mode) }),
            "something changed the node (udev rules?); fix that before assigning".into(),
        )),
        Err(x) => Err(GateFailure::new(
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
    matrix: Option<&ApMatrixConfig>,
) -> Result<MdevUuid, StepFailure> {
    let DeviceKind::Mdev {
        parent, type_id, ..
    } = kind
    else {
        return Err(fail("not an mdev", "this is a bug in devfence"));
    };
    let (act, host) = (e.act.clone(), e.host);
    let (uid, gid) = launcher(to)?;
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|x| {
        fail(
            format!("no randomness for a UUID: {x}"),
            "check /dev/urandom",
        )
    })?;
    devfence_model::make_uuid_v4(&mut b);
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
        Step::MdevCreate,
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
    let mdir = readback::mdev_dir(new);
    let group = e.gate(run, Gate::MdevPresent, |_, _| {
        if !host.mdev_present(new) {
            return Err(GateFailure::new(
                format!("{mdir} does not exist after the create"),
                json!({ "path": mdir }),
                "check `dmesg` for the parent driver's error".into(),
            ));
        }
        Ok(json!({ "path": mdir }))
    });
    group?;
    if let Some(m) = matrix {
        give_ap_matrix(e, run, act.as_ref(), new, m)?;
    }
    let link = format!("{mdir}/iommu_group");
    let Ok(g) = host.mdev_group(new) else {
        return Err(fail(
            format!("the new mdev has no IOMMU group ({link})"),
            "is the vendor driver's mdev bound to vfio_mdev?",
        ));
    };
    group_rules(e, run, g, &newdev)?;
    grant_node(e, run, act.as_ref(), host, g, uid, gid)?;
    Ok(new)
}

fn is_ap_matrix(kind: &DeviceKind) -> bool {
    matches!(kind, DeviceKind::Mdev { type_id, .. } if type_id == "vfio_ap-passthrough")
}

/// Reads (and journals) the matrix of the vfio_ap mdev about to be removed.
fn read_ap_matrix(
    e: &mut Engine<'_>,
    run: &mut Run,
    kind: &DeviceKind,
) -> Result<ApMatrixConfig, StepFailure> {
    let DeviceKind::Mdev { uuid, .. } = kind else {
        return Err(fail("not an mdev", "this is a bug in devfence"));
    };
    let (u, host) = (*uuid, e.host);
    e.step(run, Step::ApMatrixRead, json!({ "uuid": u }), |_| {
        let c = host.ap_matrix(u).map_err(|x| {
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
    act: &dyn Actuator,
    new: MdevUuid,
    m: &ApMatrixConfig,
) -> Result<(), StepFailure> {
    e.step(
        run,
        Step::ApMatrixAssign,
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
    let host = e.host;
    e.gate(run, Gate::ApMatrix, |_, _| match host.ap_matrix(new) {
        Ok(seen) if seen == *m => Ok(json!({ "uuid": new, "matrix": seen })),
        Ok(seen) => Err(GateFailure::new(
            format!("the new mdev {new} holds {seen:?}, not the old matrix {m:?}"),
            json!({ "uuid": new, "matrix": seen, "expected": m }),
            "check `dmesg` for the vfio_ap driver; an APQN may have been taken by another mdev or the host meanwhile".into(),
        )),
        Err(x) => Err(GateFailure::new(
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
        kind: OpKind::Recover,
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
        tx.finish_operation(opid, OpOutcome::Recovered)?;
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
        outcome: OpOutcome::Recovered,
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
    let (act, host) = (e.act.clone(), e.host);
    for u in created {
        let u = *u;
        e.step(
            run,
            Step::MdevRemove,
            json!({ "uuid": u, "created-by-interrupted-operation": true }),
            |_| {
                if !host.mdev_present(u) {
                    return Ok(((), json!({ "uuid": u, "absent": true })));
                }
                act.mdev_remove(u).map_err(|x| act_fail(&x))?;
                Ok(((), json!({ "uuid": u, "removed": true })))
            },
        )?;
    }
    match super::classify(inv, &device) {
        Ok(kind) => scrub(e, run, &kind, None, false).map(drop),
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
