//! Batches (issue 12 item 5): several IB VF operations on one host go to the
//! SM as **one** apply (one sweep), and every device still passes its own
//! gates.
//!
//! [`Engine::run_batch`] runs each member's operation as the single operation
//! would, as an operation of its own in the ledger (one per device, its own
//! journal, its own audit records), up to its fabric step: checks, `begin`,
//! scrub (the old GUIDs retired, their revocation deferred), a fresh GUID set
//! and read back. Then one shared fabric step: every member journals its own
//! `fabric-move` / `fabric-grant` / `fabric-revoke` step as planned (naming the
//! batch, its size and its members), the changes of all members are staged and
//! applied **once**, and every member journals the step done with the one
//! ticket. Then each member's gates run for that member alone: the SM's three
//! questions for its own GUIDs (old ones out, the new one in exactly its
//! tenant's partitions, the sweep after the ticket done), its port's P_Key
//! table, its driver, its group's rules, its node. Nothing is taken from the
//! batch: a gate reads back what it asks about.
//!
//! A member whose checks or steps fail before the shared step drops out (its
//! device quarantined, its deferred revocation applied on its own, as the
//! single operation does); the others go on. A gate that fails fails its member
//! only. A failure of the shared apply fails every member that was in it.
//!
//! **Crash safety** is the single operation's: every member's journal says, in
//! the same step names, how far it got, and `recover` scrubs each open
//! operation on its own (its GUIDs out of every partition, verified). The
//! shared step adds two failpoints: `batch:fabric-apply:planned` (every member
//! journalled the step as planned, nothing staged) and
//! `batch:fabric-apply:acted` (the SM took the apply, no member journalled it
//! done).
//!
//! Items that cannot share an apply (not an IB VF, no GUID pool, a device the
//! host does not show) run as single operations after the batch.

use serde_json::{Value, json};

use devfence_fabric::Ticket;
use devfence_model::{DeviceId, TenantId};

use super::procs::{self, Parked};
use super::{Done, Engine, EngineError, OpKind, OpenedTransfer, Run, StepFailure, classify};
use crate::audit::AuditKind;
use crate::store::{StepState, Tenant};

/// One operation of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchItem {
    /// Assign, handover or release.
    pub kind: OpKind,
    /// The device.
    pub device: DeviceId,
    /// The tenant it goes to (assign, handover).
    pub tenant: Option<TenantId>,
    /// The VM it is reserved for.
    pub vm: Option<String>,
    /// Who asked (the audit records of its operation name it); `None`: the
    /// engine's store keeps the actor it has.
    pub actor: Option<Value>,
}

impl BatchItem {
    /// An assignment of `device` to `tenant`.
    #[must_use]
    pub fn assign(device: DeviceId, tenant: TenantId, vm: Option<String>) -> Self {
        Self {
            kind: OpKind::Assign,
            device,
            tenant: Some(tenant),
            vm,
            actor: None,
        }
    }

    /// A handover of `device` to `to`.
    #[must_use]
    pub fn handover(device: DeviceId, to: TenantId, vm: Option<String>) -> Self {
        Self {
            kind: OpKind::Handover,
            device,
            tenant: Some(to),
            vm,
            actor: None,
        }
    }

    /// A release of `device`.
    #[must_use]
    pub fn release(device: DeviceId) -> Self {
        Self {
            kind: OpKind::Release,
            device,
            tenant: None,
            vm: None,
            actor: None,
        }
    }

    /// Asked by `actor`.
    #[must_use]
    pub fn by(mut self, actor: Option<Value>) -> Self {
        self.actor = actor;
        self
    }
}

/// What a batch did.
#[derive(Debug)]
pub struct BatchReport {
    /// The batch's id (in every member's journal).
    pub id: String,
    /// How many members went to the SM in the shared apply.
    pub size: usize,
    /// Every apply (each a sweep) the batch asked of the SM: the shared one,
    /// plus any a dropped-out member or a single operation needed.
    pub applies: u64,
    /// Per item, in order: whether it was a member of the shared apply.
    pub shared: Vec<bool>,
    /// Per item, in order: its result.
    pub results: Vec<Result<Done, EngineError>>,
}

/// One item's end, as [`Engine::run_batch_with`] hands it over.
#[derive(Debug)]
pub struct ItemResult<'b> {
    /// The item's index.
    pub slot: usize,
    /// The batch's id.
    pub id: &'b str,
    /// How many members went to the SM in the shared apply.
    pub size: usize,
    /// Whether this item was one of them.
    pub shared: bool,
    /// Its result.
    pub result: Result<Done, EngineError>,
}

/// What a batch did, besides its items' results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSummary {
    /// The batch's id.
    pub id: String,
    /// How many members went to the SM in the shared apply.
    pub size: usize,
    /// Every apply the batch asked of the SM (see [`BatchReport::applies`]).
    pub applies: u64,
}

/// A member waiting for the shared apply.
struct Member {
    slot: usize,
    actor: Option<Value>,
    run: Run,
    work: Work,
}

enum Work {
    Transfer {
        opened: Box<OpenedTransfer>,
        parked: Box<Parked>,
    },
    Release {
        old: Option<Tenant>,
        guids: Vec<devfence_model::Guid>,
    },
}

impl Member {
    /// The step the member journals for the shared apply, and its detail.
    fn step(&self) -> (super::Step, Value) {
        match &self.work {
            Work::Transfer { parked, .. } => parked.grant.step(&parked.pending.guids),
            Work::Release { guids, .. } => (super::Step::FabricRevoke, json!({ "guids": guids })),
        }
    }

    fn stage(&self, sm: &dyn devfence_fabric::SubnetManager) -> Result<(), StepFailure> {
        match &self.work {
            Work::Transfer { parked, .. } => parked.grant.stage(sm, &parked.pending.guids),
            Work::Release { guids, .. } => procs::stage_revoke(sm, guids),
        }
    }
}

fn batch_id() -> String {
    let mut b = [0u8; 6];
    if getrandom::fill(&mut b).is_err() {
        // An id names the batch in journals; it is no secret and needs no
        // randomness to be correct: the time is unique enough.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        return format!("batch-{t:x}");
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("batch-{hex}")
}

impl Engine<'_> {
    /// Acts for item `slot` from here on: its progress events carry the slot,
    /// its audit records its actor.
    fn enter(&mut self, slot: usize, actor: Option<&Value>) {
        self.slot = slot;
        if let Some(a) = actor {
            self.store.set_actor(Some(a.clone()));
        }
    }

    /// Runs `items` as one batch: IB VF operations share one apply (one sweep)
    /// at the SM, and each passes its own gates (see the module's docs); other
    /// items run as single operations after it. Progress events name the item
    /// they are about ([`with_batch_progress`](Self::with_batch_progress)).
    ///
    /// A device may appear once in a batch: a second item for it is refused
    /// (the first holds it).
    #[must_use]
    pub fn run_batch(&mut self, items: &[BatchItem]) -> BatchReport {
        let mut results: Vec<Option<Result<Done, EngineError>>> =
            items.iter().map(|_| None).collect();
        let mut shared = vec![false; items.len()];
        let s = self.run_batch_with(items, &mut |r| {
            if let Some(x) = shared.get_mut(r.slot) {
                *x = r.shared;
            }
            if let Some(x) = results.get_mut(r.slot) {
                *x = Some(r.result);
            }
        });
        BatchReport {
            id: s.id,
            size: s.size,
            applies: s.applies,
            shared,
            results: results
                .into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| {
                        Err(EngineError::refused(
                            None,
                            "the batch left this item unrun",
                            "this is a bug in devfence; run the operation again",
                        ))
                    })
                })
                .collect(),
        }
    }

    /// As [`run_batch`](Self::run_batch), handing each item's result to
    /// `on_result` as soon as the item is done (a member as soon as its own
    /// gates passed or failed), not when the whole batch is.
    pub fn run_batch_with(
        &mut self,
        items: &[BatchItem],
        on_result: &mut dyn FnMut(ItemResult<'_>),
    ) -> BatchSummary {
        let id = batch_id();
        let applies0 = self.applies.get();
        let mut early: Vec<(usize, Result<Done, EngineError>)> = Vec::new();
        let mut members: Vec<Member> = Vec::new();
        let mut singles: Vec<usize> = Vec::new();

        // ---- each member up to its fabric step ----
        for (slot, it) in items.iter().enumerate() {
            self.enter(slot, it.actor.as_ref());
            match self.park(it) {
                Ok(Some((run, work))) => members.push(Member {
                    slot,
                    actor: it.actor.clone(),
                    run,
                    work,
                }),
                Ok(None) => singles.push(slot),
                Err(r) => early.push((slot, r)),
            }
        }
        let size = members.len();
        for (slot, result) in early {
            on_result(ItemResult {
                slot,
                id: &id,
                size,
                shared: false,
                result,
            });
        }

        // ---- one apply for every member ----
        let mut tickets: Vec<Result<Ticket, StepFailure>> = Vec::new();
        if !members.is_empty() {
            tickets = self.shared_apply(&id, &mut members);
        }

        // ---- each member's own gates ----
        for (m, ticket) in members.into_iter().zip(tickets) {
            self.enter(m.slot, m.actor.as_ref());
            let Member {
                mut run,
                work,
                slot,
                ..
            } = m;
            let res = match work {
                Work::Transfer { opened, mut parked } => procs::ib_transfer_after_fabric(
                    self,
                    &mut run,
                    &opened.transfer(),
                    &mut parked,
                    ticket,
                ),
                Work::Release { old, guids } => procs::ib_release_after_fabric(
                    self,
                    &mut run,
                    &guids,
                    old.as_ref(),
                    Some(ticket),
                ),
            };
            let result = self.conclude(run, res);
            on_result(ItemResult {
                slot,
                id: &id,
                size,
                shared: true,
                result,
            });
        }

        // ---- the rest, one by one ----
        for slot in singles {
            let it = &items[slot];
            self.enter(slot, it.actor.as_ref());
            let result = match (it.kind, &it.tenant) {
                (OpKind::Release, _) => self.release(&it.device),
                (k @ (OpKind::Assign | OpKind::Handover), Some(t)) => {
                    self.transfer(k, &it.device, t, it.vm.as_deref())
                }
                (k, _) => Err(EngineError::refused(
                    Some(it.device),
                    format!("a batch item of kind {k} needs a tenant"),
                    "give the tenant the device goes to",
                )),
            };
            on_result(ItemResult {
                slot,
                id: &id,
                size,
                shared: false,
                result,
            });
        }
        self.slot = 0;
        BatchSummary {
            id,
            size,
            applies: self.applies.get() - applies0,
        }
    }

    /// Opens the item's operation and runs it up to its fabric step, if it can
    /// share the batch's apply: `Ok(None)` when it cannot (it runs alone later),
    /// `Err` with its result when it was refused or failed (the device is
    /// quarantined then, as a single operation leaves it).
    #[allow(clippy::type_complexity)]
    fn park(&mut self, it: &BatchItem) -> Result<Option<(Run, Work)>, Result<Done, EngineError>> {
        let pool = self.has_guid_pool().map_err(|e| Err(e.into()))?;
        let inv = self.inventory().map_err(Err)?;
        match classify(&inv, &it.device) {
            Ok(k) if procs::batchable(&k, pool) => {}
            _ => return Ok(None),
        }
        match (it.kind, &it.tenant) {
            (OpKind::Assign | OpKind::Handover, Some(to)) => {
                let (mut run, opened) = self
                    .open_transfer(it.kind, &it.device, to, it.vm.as_deref())
                    .map_err(Err)?;
                match procs::ib_transfer_until_fabric(self, &mut run, &opened.transfer()) {
                    Ok(parked) => Ok(Some((
                        run,
                        Work::Transfer {
                            opened: Box::new(opened),
                            parked: Box::new(parked),
                        },
                    ))),
                    Err(f) => Err(self.conclude(run, Err(f))),
                }
            }
            (OpKind::Release, _) => {
                let (mut run, facts, old) = self.open_release(&it.device).map_err(Err)?;
                let Some(kind) = facts else {
                    let f = procs::fail("the device left the host", "release it again");
                    return Err(self.conclude(run, Err(f)));
                };
                match procs::ib_release_until_fabric(self, &mut run, &kind, old.as_ref()) {
                    Ok(guids) if guids.is_empty() => {
                        // Nothing of it at the SM: done without the apply.
                        let res =
                            procs::ib_release_after_fabric(self, &mut run, &[], old.as_ref(), None);
                        Err(self.conclude(run, res))
                    }
                    Ok(guids) => Ok(Some((run, Work::Release { old, guids }))),
                    Err(f) => Err(self.conclude(run, Err(f))),
                }
            }
            _ => Ok(None),
        }
    }

    /// The shared fabric step: every member journals its step planned, the
    /// changes of all are staged and applied once, every member journals it
    /// done (or failed). One result per member, in order.
    fn shared_apply(
        &mut self,
        id: &str,
        members: &mut [Member],
    ) -> Vec<Result<Ticket, StepFailure>> {
        let size = members.len();
        let ops: Vec<String> = members.iter().map(|m| m.run.op.to_string()).collect();
        let batch = json!({ "id": id, "size": size, "operations": ops });
        // Journal first, for every member.
        let mut planned: Vec<Result<(), StepFailure>> = Vec::with_capacity(size);
        for m in members.iter_mut() {
            self.enter(m.slot, m.actor.as_ref());
            let (step, mut detail) = m.step();
            if let Some(o) = detail.as_object_mut() {
                o.insert("batch".into(), batch.clone());
            }
            let r = self
                .journal(
                    &m.run,
                    step.name(),
                    StepState::Planned,
                    &detail,
                    AuditKind::Step,
                    false,
                )
                .map_err(StepFailure::from);
            planned.push(r);
        }
        self.fp.hit("batch:fabric-apply:planned");
        let t0 = std::time::Instant::now();
        let sm = self.sm;
        // Stage the members that journalled; one apply.
        let applied: Result<Ticket, StepFailure> = (|| {
            for (m, p) in members.iter().zip(&planned) {
                if p.is_ok() {
                    m.stage(sm)?;
                }
            }
            self.sm_apply().map_err(|x| {
                sm.discard_staged();
                procs::fail(
                    format!("the SM did not take the batch's change: {x}"),
                    "check the SM's health (`devfence status`)",
                )
            })
        })();
        if applied.is_ok() {
            self.fp.hit("batch:fabric-apply:acted");
        }
        let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity(size);
        for (m, p) in members.iter_mut().zip(planned) {
            self.enter(m.slot, m.actor.as_ref());
            let (step, _) = m.step();
            let name = step.name();
            let r = match (p, &applied) {
                (Err(f), _) => Err(f),
                (Ok(()), Ok(t)) => {
                    let d = json!({
                        "backend": sm.backend(),
                        "ticket": { "change": t.change.0, "generation": t.generation.0 },
                        "batch": batch,
                    });
                    match self.journal(&m.run, name, StepState::Done, &d, AuditKind::Step, true) {
                        Ok(()) => {
                            m.run.timings.push((name.to_owned(), ms));
                            Ok(*t)
                        }
                        Err(e) => Err(StepFailure::from(e)),
                    }
                }
                (Ok(()), Err(f)) => {
                    let d = json!({ "reason": f.reason, "hint": f.hint, "batch": batch });
                    let _ =
                        self.journal(&m.run, name, StepState::Failed, &d, AuditKind::Step, true);
                    Err(procs::fail(f.reason.clone(), f.hint.clone()))
                }
            };
            out.push(r.map_err(|f| StepFailure {
                step: name.to_owned(),
                ..f
            }));
        }
        out
    }
}
