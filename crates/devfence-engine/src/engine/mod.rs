//! The lifecycle driver: assign, hand over, release, VM start and stop, recovery
//! (docs/design.md §4).
//!
//! Every operation holds its device through an open operation in the ledger (a
//! second one on the same device is refused, not interleaved), writes each step to
//! the journal **before** acting, and passes gates that read the result back from
//! the host (through `devfence-host`) and from the subnet manager (through the
//! [`SubnetManager`] seam). A gate that cannot verify before its deadline leaves
//! the device `Quarantined`, never `Ready`. Every step result, gate result,
//! refusal and recovery is an audit record.
//!
//! The procedures per device kind are in `procs.rs`; [`Engine::plan`] lists them
//! without acting.

#![allow(clippy::result_large_err)]

mod admit;
mod batch;
mod facts;
pub mod failpoint;
mod guid_source;
mod lifecycle;
mod procs;
mod reverify;

use std::rc::Rc;
use std::time::{Duration, Instant};

use devfence_fabric::{Pace, SubnetManager};
use devfence_host::HostRoot;
use devfence_host::actuator::ops::SysfsActuator;
use devfence_host::actuator::{Actuator, KernelIo};
use devfence_host::readback::ReadBack;
use devfence_model::{DeviceId, Inventory, TenantId};
use serde_json::{Value, json};

pub use admit::{Drift, Started};
pub use batch::{BatchItem, BatchReport, BatchSummary, ItemResult};
pub use facts::{DeviceKind, KindError, classify};
pub use failpoint::{Crash, CrashMode, Failpoints};
pub use guid_source::{GuidSource, GuidSourceError};
pub use lifecycle::{Gate, GateFailure, OpKind, Step};
pub use procs::PlannedStep;
pub use reverify::{Check, DeviceCheck, RecordedRestore, Reverification};

use crate::audit::{AuditEvent, AuditKind};
use crate::store::{
    Busy, DeviceState, OpOutcome, OperationId, StepState, Store, StoreError, StoreExt, Tenant, Tx,
};

/// How the engine behaves.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long a gate may take to verify before the operation fails closed.
    pub gate_deadline: Duration,
    /// How fast gates poll the SM (pace only; never correctness).
    pub pace: Pace,
    /// Where VF tokens are handed to launchers (a kernel path under the host root).
    pub runtime_dir: String,
    /// The host driver an mlx5 VF passes through for a new GUID to take effect.
    pub ib_host_driver: String,
    /// Mode of a tenant's `/dev/vfio` group node.
    pub node_mode: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            gate_deadline: Duration::from_secs(10),
            pace: Pace::default(),
            runtime_dir: "/run/devfence".into(),
            ib_host_driver: "mlx5_core".into(),
            node_mode: 0o600,
        }
    }
}

/// What an operation is doing, for progress output.
#[derive(Clone, Debug, PartialEq, serde::Serialize, schemars::JsonSchema, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Progress {
    /// An operation began.
    Began {
        /// The operation.
        op: OperationId,
        /// What it does.
        kind: String,
        /// The device.
        device: DeviceId,
    },
    /// A step was journalled.
    Step {
        /// The step.
        name: String,
        /// Planned, done or failed.
        state: StepState,
        /// Time since the operation began.
        elapsed_ms: u64,
        /// What it did or found (never a secret).
        detail: Value,
    },
    /// A gate has not verified yet.
    Waiting {
        /// The gate.
        gate: String,
        /// Reads so far.
        polls: u32,
        /// Time since the operation began.
        elapsed_ms: u64,
        /// What the last read showed.
        last: String,
    },
    /// A gate passed or failed.
    Gate {
        /// The gate.
        name: String,
        /// Whether it passed.
        passed: bool,
        /// Time since the operation began.
        elapsed_ms: u64,
        /// The evidence read back.
        evidence: Value,
    },
    /// The operation ended.
    Finished {
        /// The operation.
        op: OperationId,
        /// How.
        outcome: OpOutcome,
        /// The device's state now.
        state: String,
        /// Time since the operation began.
        elapsed_ms: u64,
    },
}

/// Why an operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The ledger refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request was refused before anything changed.
    #[error("Refused: {reason}. Hint: {hint}")]
    Refused {
        /// The device, if the refusal is about one.
        device: Option<DeviceId>,
        /// Why.
        reason: String,
        /// What to do.
        hint: String,
    },
    /// A step or gate failed; the device was left quarantined.
    #[error(
        "{kind} of {device} failed at {step}: {reason}. {device} is {state} — no VM may use it. Hint: {hint}"
    )]
    Failed {
        /// The operation kind.
        kind: OpKind,
        /// The device.
        device: DeviceId,
        /// The step or gate that failed.
        step: String,
        /// What went wrong.
        reason: String,
        /// The device's state afterwards.
        state: String,
        /// What to do.
        hint: String,
        /// The error the step stems from, if any (a gate that did not pass has
        /// none: its evidence is in the journal). Its text is in `reason`.
        #[source]
        source: Option<Cause>,
    },
    /// The host could not be read.
    #[error("Cannot read the host under {root}: {reason}. Hint: {hint}")]
    Host {
        /// The host root.
        root: String,
        /// What failed.
        reason: String,
        /// What to do.
        hint: String,
    },
}

impl EngineError {
    fn refused(
        device: Option<DeviceId>,
        reason: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        EngineError::Refused {
            device,
            reason: reason.into(),
            hint: hint.into(),
        }
    }
}

/// The result of a successful operation.
#[derive(Clone, Debug, PartialEq, serde::Serialize, schemars::JsonSchema, serde::Deserialize)]
pub struct Done {
    /// The operation.
    pub op: OperationId,
    /// The device the tenant now holds (differs from the one asked for when an
    /// mdev was re-created with a fresh UUID).
    pub device: DeviceId,
    /// Its state.
    pub state: DeviceState,
    /// Where the VF token was handed to the launcher, if one was set.
    pub token_file: Option<String>,
    /// How long it took, in milliseconds.
    pub elapsed_ms: u64,
    /// Time per step and gate (name, ms), in order.
    pub timings: Vec<(String, u64)>,
}

/// What recovery did to one unfinished operation.
#[derive(Clone, Debug, PartialEq, serde::Serialize, schemars::JsonSchema, serde::Deserialize)]
pub struct Recovered {
    /// The operation that was interrupted.
    pub op: OperationId,
    /// Its kind.
    pub kind: String,
    /// The device.
    pub device: DeviceId,
    /// The last journalled step.
    pub last_step: Option<String>,
    /// The device's state after recovery (`Free` once verified clean, else
    /// `Quarantined`).
    pub state: DeviceState,
    /// Why it stayed quarantined, if it did.
    pub problem: Option<String>,
}

/// Drives devices through their lifecycle on one host and fabric.
pub struct Engine<'a> {
    store: &'a mut dyn Store,
    /// Every change to the host goes through it (one, built once).
    act: Rc<dyn Actuator + 'a>,
    /// Every read of the host that verifies a change.
    host: ReadBack<'a>,
    sm: &'a dyn SubnetManager,
    cfg: EngineConfig,
    fp: Failpoints,
    progress: ProgressFn<'a>,
    /// Which item of a batch the engine acts for (0 outside a batch): passed to
    /// the progress callback with every event.
    slot: usize,
    /// Applies asked of the SM so far.
    applies: std::cell::Cell<u64>,
    /// Fresh IB GUIDs from a shared pool instead of the ledger's (a fleet).
    pub(crate) guids: Option<&'a dyn GuidSource>,
}

/// The progress callback: the batch slot an event is about, and the event.
type ProgressFn<'a> = Box<dyn FnMut(usize, &Progress) + 'a>;

/// One running operation's bookkeeping.
pub(crate) struct Run {
    pub(crate) op: OperationId,
    pub(crate) kind: OpKind,
    pub(crate) device: DeviceId,
    pub(crate) tenant: Option<TenantId>,
    pub(crate) started: Instant,
    pub(crate) timings: Vec<(String, u64)>,
}

/// An assign or handover whose operation is open: what its procedure needs.
pub(crate) struct OpenedTransfer {
    pub(crate) facts: DeviceKind,
    pub(crate) from: DeviceState,
    pub(crate) old: Option<Tenant>,
    pub(crate) to: Tenant,
    pub(crate) vm: Option<String>,
}

impl OpenedTransfer {
    pub(crate) fn transfer(&self) -> procs::Transfer<'_> {
        procs::Transfer {
            kind: &self.facts,
            from: &self.from,
            old: self.old.as_ref(),
            to: &self.to,
            vm: self.vm.as_deref(),
        }
    }
}

impl Run {
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The error a failed step stems from (an [`devfence_host::actuator::ActError`],
/// a [`StoreError`], a file step's error), kept as the source of
/// [`EngineError::Failed`].
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A step failure inside a procedure: which step, why, what to do, and the
/// error it stems from (none for a gate: its evidence says why).
#[derive(Debug)]
pub(crate) struct StepFailure {
    pub(crate) step: String,
    pub(crate) reason: String,
    pub(crate) hint: String,
    pub(crate) source: Option<Cause>,
}

impl From<StoreError> for StepFailure {
    fn from(e: StoreError) -> Self {
        StepFailure {
            step: "ledger".into(),
            reason: e.to_string(),
            hint: "check the ledger file and disk space; run `devfence recover`".into(),
            source: Some(Box::new(e)),
        }
    }
}

impl<'a> Engine<'a> {
    /// An engine over a ledger, a kernel and a subnet manager.
    pub fn new(
        store: &'a mut dyn Store,
        io: &'a dyn KernelIo,
        sm: &'a dyn SubnetManager,
        cfg: EngineConfig,
    ) -> Self {
        Self {
            store,
            act: Rc::new(SysfsActuator::new(io)),
            host: ReadBack::new(io),
            sm,
            cfg,
            fp: Failpoints::none(),
            progress: Box::new(|_, _| {}),
            slot: 0,
            applies: std::cell::Cell::new(0),
            guids: None,
        }
    }

    /// Taking fresh IB port GUIDs from `source` (a fleet's shared pool) instead
    /// of the ledger's own pool; the ledger still records each one. An IB VF's
    /// assign or handover is refused before it opens when the source is not
    /// [`ready`](GuidSource::ready).
    #[must_use]
    pub fn with_guid_source(mut self, source: &'a dyn GuidSource) -> Self {
        self.guids = Some(source);
        self
    }

    /// Whether fresh IB GUIDs come from a pool — the fleet's shared one (a
    /// [`GuidSource`]) or the ledger's own — so that an IB VF's transfer can
    /// revoke the old GUIDs and grant the fresh one in one apply (one sweep)
    /// and share a batch's apply.
    pub(crate) fn has_guid_pool(&mut self) -> Result<bool, StoreError> {
        Ok(self.guids.is_some() || self.store.atomically(|tx| tx.guid_pool())?.is_some())
    }

    /// Acting through `act` instead of the actuator over the kernel it was
    /// built with (reads still go through that kernel).
    #[must_use]
    pub fn with_actuator(mut self, act: Rc<dyn Actuator + 'a>) -> Self {
        self.act = act;
        self
    }

    /// With failpoints.
    #[must_use]
    pub fn with_failpoints(mut self, fp: Failpoints) -> Self {
        self.fp = fp;
        self
    }

    /// With a progress callback.
    #[must_use]
    pub fn with_progress(mut self, mut f: impl FnMut(&Progress) + 'a) -> Self {
        self.progress = Box::new(move |_, p| f(p));
        self
    }

    /// With a progress callback that is also told which item of a batch
    /// ([`run_batch`](Self::run_batch)) each event is about (0 outside a batch).
    #[must_use]
    pub fn with_batch_progress(mut self, f: impl FnMut(usize, &Progress) + 'a) -> Self {
        self.progress = Box::new(f);
        self
    }

    /// The ledger.
    pub fn store(&mut self) -> &mut dyn Store {
        self.store
    }

    /// The host root.
    #[must_use]
    pub fn root(&self) -> &HostRoot {
        self.host.root()
    }

    /// Removes the VF token file handed to a launcher for `bdf` (libvirt's
    /// `started` hook: the launcher has read it), through the actuator, never
    /// through a link; whether there was one.
    ///
    /// # Errors
    /// The file cannot be removed (a link on the way names the link).
    pub fn withdraw_token(
        &self,
        bdf: devfence_model::Bdf,
    ) -> Result<bool, devfence_host::actuator::files::FileStepError> {
        self.act
            .withdraw_token(&procs::token_path(&self.cfg.runtime_dir, bdf))
    }

    /// The failpoints (to read which were passed).
    #[must_use]
    pub fn failpoints(&self) -> &Failpoints {
        &self.fp
    }

    /// Asks the SM to apply what is staged (and sweep), counted.
    fn sm_apply(&self) -> Result<devfence_fabric::Ticket, devfence_fabric::FabricError> {
        self.applies.set(self.applies.get() + 1);
        self.sm.apply()
    }

    /// How many applies (each a sweep) this engine asked of the SM so far.
    #[must_use]
    pub fn sm_applies(&self) -> u64 {
        self.applies.get()
    }

    fn emit(&mut self, p: &Progress) {
        (self.progress)(self.slot, p);
    }

    fn inventory(&self) -> Result<Inventory, EngineError> {
        self.host.inventory().map_err(|e| EngineError::Host {
            root: self.host.root().root().display().to_string(),
            reason: e.to_string(),
            hint: "devfence reads the host through sysfs; run it as root on the host (or on a simulated host)".into(),
        })
    }

    fn audit(&mut self, event: &AuditEvent) -> Result<(), StoreError> {
        self.store.atomically(|tx| tx.audit(event).map(|_| ()))
    }

    fn refuse(
        &mut self,
        device: Option<DeviceId>,
        tenant: Option<TenantId>,
        e: EngineError,
    ) -> EngineError {
        let detail = json!({ "refused": e.to_string() });
        // The refusal stands even if auditing it fails; say so in the error.
        if let Err(a) = self.audit(&AuditEvent {
            kind: AuditKind::Refusal,
            device,
            tenant,
            detail,
        }) {
            return EngineError::refused(
                device,
                format!("{e} (and recording the refusal failed: {a})"),
                "check the ledger",
            );
        }
        e
    }

    /// Refuses with [`StoreError::Busy`] when an unfinished operation holds
    /// `device`: a second operation is refused, never interleaved, and the
    /// refusal names the holder whatever state it has left the device in so far.
    fn refuse_if_busy(
        &mut self,
        device: &DeviceId,
        tenant: Option<TenantId>,
    ) -> Result<(), EngineError> {
        let open = self.store.atomically(|tx| tx.open_operations())?;
        let Some(op) = open.into_iter().find(|o| o.device == *device) else {
            return Ok(());
        };
        let e = EngineError::Store(StoreError::Busy(Busy {
            device: *device,
            holder: op.id,
            kind: op.kind,
            since_ms: op.started_at_ms,
        }));
        Err(self.refuse(Some(*device), tenant, e))
    }

    // ------------------------------------------------------------------
    // Tenants

    /// Adds a tenant to the ledger (audited).
    ///
    /// # Errors
    /// The ledger's refusal (exists, invalid).
    pub fn add_tenant(&mut self, tenant: &Tenant) -> Result<(), EngineError> {
        let t = tenant.clone();
        self.store.atomically(|tx| {
            tx.add_tenant(&t)?;
            tx.audit(&AuditEvent {
                kind: AuditKind::Ledger,
                device: None,
                tenant: Some(t.id.clone()),
                detail: json!({ "action": "tenant-add", "tenant": t }),
            })?;
            Ok(())
        })?;
        Ok(())
    }

    // ------------------------------------------------------------------
    // Operations

    /// Assigns a free (or never seen) device to `tenant`, optionally for one VM:
    /// scrubs it (nothing of its past owner is trusted), prepares it for the
    /// tenant and passes every gate, then marks it `Ready`.
    ///
    /// # Errors
    /// Refusals (unknown tenant or device, device not free, busy) and failures
    /// (the device is left quarantined).
    pub fn assign(
        &mut self,
        device: &DeviceId,
        tenant: &TenantId,
        vm: Option<&str>,
    ) -> Result<Done, EngineError> {
        self.transfer(OpKind::Assign, device, tenant, vm)
    }

    /// Hands a device held (Ready, Draining or Quarantined) for one tenant over to
    /// `to`: revoke everything of the old tenant and verify it, then prepare for
    /// the new one and verify that. A device in use by a running VM is refused.
    ///
    /// # Errors
    /// As [`assign`](Self::assign).
    pub fn handover(
        &mut self,
        device: &DeviceId,
        to: &TenantId,
        vm: Option<&str>,
    ) -> Result<Done, EngineError> {
        self.transfer(OpKind::Handover, device, to, vm)
    }

    fn transfer(
        &mut self,
        kind: OpKind,
        device: &DeviceId,
        to: &TenantId,
        vm: Option<&str>,
    ) -> Result<Done, EngineError> {
        let (mut run, o) = self.open_transfer(kind, device, to, vm)?;
        let res = procs::transfer(self, &mut run, &o.transfer());
        self.conclude(run, res)
    }

    /// Checks an assign or handover and opens its operation (the `begin` step):
    /// everything [`transfer`](Self::transfer) does before the procedure runs.
    fn open_transfer(
        &mut self,
        kind: OpKind,
        device: &DeviceId,
        to: &TenantId,
        vm: Option<&str>,
    ) -> Result<(Run, OpenedTransfer), EngineError> {
        let to_tenant = match self.store.atomically(|tx| tx.tenant(to)) {
            Ok(Some(t)) => t,
            Ok(None) => {
                let e = EngineError::Store(StoreError::UnknownTenant(to.clone()));
                return Err(self.refuse(Some(*device), Some(to.clone()), e));
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(v) = vm {
            check_vm_name(v).map_err(|e| {
                EngineError::refused(
                    Some(*device),
                    e,
                    "use the libvirt domain name (1-256 printable characters)",
                )
            })?;
        }
        let inv = self.inventory()?;
        let facts = match classify(&inv, device) {
            Ok(f) => f,
            Err(e) => {
                let e = EngineError::refused(Some(*device), e.reason, e.hint);
                return Err(self.refuse(Some(*device), Some(to.clone()), e));
            }
        };
        self.refuse_if_busy(device, Some(to.clone()))?;
        // A fleet's shared facts (the GUID pool, the desired memberships) are
        // needed by an IB VF's operation: fail closed before anything changes.
        if let (DeviceKind::IbVf { .. }, Some(src)) = (&facts, self.guids)
            && let Err(x) = src.ready()
        {
            let e = EngineError::refused(
                Some(*device),
                format!("{} cannot be used: {x}", src.describe()),
                x.hint,
            );
            return Err(self.refuse(Some(*device), Some(to.clone()), e));
        }
        // An IOMMU group is one tenant's (docs/design.md L4): refuse before anything of
        // the group changes (its /dev/vfio node is shared) when another tenant
        // holds one of its members.
        if let Some(g) = facts.group() {
            let held = self.store.atomically(|tx| tx.assignments())?;
            let in_group = |d: &DeviceId| {
                inv.iommu_groups
                    .iter()
                    .any(|x| x.id == g && x.members.iter().any(|m| m.is(d)))
            };
            if let Some(a) = held
                .iter()
                .find(|a| a.device != *device && a.tenant != *to && in_group(&a.device))
            {
                let e = EngineError::refused(
                    Some(*device),
                    format!(
                        "GRP-ONE-TENANT: {device} is in IOMMU group {g} with {}, which {} holds; the devices of one group can reach each other through DMA",
                        a.device, a.tenant
                    ),
                    format!(
                        "give {to} a device of another group, or release {} first",
                        a.device
                    ),
                );
                return Err(self.refuse(Some(*device), Some(to.clone()), e));
            }
        }
        // Register a device devfence has not seen yet (it starts Free).
        let record = self.store.atomically(|tx| {
            if tx.device(device)?.is_none() {
                tx.add_device(device)?;
                tx.audit(&AuditEvent {
                    kind: AuditKind::Ledger,
                    device: Some(*device),
                    tenant: None,
                    detail: json!({ "action": "device-add", "kind": facts.name() }),
                })?;
            }
            tx.device(device)
        })?;
        let Some(record) = record else {
            return Err(StoreError::UnknownDevice(*device).into());
        };
        let from = record.state.clone();
        let old_tenant = match &from {
            DeviceState::Free | DeviceState::Scrubbing => None,
            DeviceState::Quarantined { .. } => None,
            DeviceState::Ready { tenant, .. } | DeviceState::Draining { tenant, .. } => {
                if kind == OpKind::Assign {
                    let e = EngineError::refused(
                        Some(*device),
                        format!("{device} is {from}, not Free"),
                        format!(
                            "hand it over with `devfence handover {device} --to {to}`, or release it first"
                        ),
                    );
                    return Err(self.refuse(Some(*device), Some(to.clone()), e));
                }
                Some(tenant.clone())
            }
            DeviceState::Active { vm: running, .. } => {
                let e = EngineError::refused(
                    Some(*device),
                    format!("{device} is {from}: VM {running} is using it"),
                    format!(
                        "stop {running} first (libvirt's release hook drains the device), then hand it over"
                    ),
                );
                return Err(self.refuse(Some(*device), Some(to.clone()), e));
            }
            DeviceState::Preparing { .. } => {
                let e = EngineError::refused(
                    Some(*device),
                    format!("{device} is {from}: an earlier operation did not finish"),
                    "run `devfence recover`",
                );
                return Err(self.refuse(Some(*device), Some(to.clone()), e));
            }
        };
        if kind == OpKind::Handover
            && old_tenant.is_none()
            && !matches!(from, DeviceState::Quarantined { .. })
        {
            let e = EngineError::refused(
                Some(*device),
                format!("{device} is {from}: nobody holds it, so there is nothing to hand over"),
                format!("assign it with `devfence assign {device} --tenant {to}`"),
            );
            return Err(self.refuse(Some(*device), Some(to.clone()), e));
        }
        if old_tenant.as_ref() == Some(to) && kind == OpKind::Handover {
            let e = EngineError::refused(
                Some(*device),
                format!("{device} is already held by {to}"),
                "hand it to another tenant, or release it",
            );
            return Err(self.refuse(Some(*device), Some(to.clone()), e));
        }
        let old = match &old_tenant {
            Some(t) => self.store.atomically(|tx| tx.tenant(t))?,
            None => None,
        };
        // Open the operation and take the first lifecycle step in one transaction.
        let first = match &from {
            DeviceState::Free => DeviceState::Preparing {
                tenant: to.clone(),
                vm: vm.map(str::to_owned),
            },
            _ => DeviceState::Scrubbing,
        };
        let run = self.begin(
            kind,
            device,
            Some(to.clone()),
            &from,
            &first,
            json!({
                "from": from.to_string(), "to": to, "vm": vm, "device-kind": facts,
            }),
        )?;
        Ok((
            run,
            OpenedTransfer {
                facts,
                from,
                old,
                to: to_tenant,
                vm: vm.map(str::to_owned),
            },
        ))
    }

    /// Releases a device: revokes everything of its tenant, verifies, and leaves
    /// it `Free` (or `Quarantined` if verification fails). Also re-scrubs a
    /// quarantined device.
    ///
    /// # Errors
    /// Refusals (active device, busy) and failures.
    pub fn release(&mut self, device: &DeviceId) -> Result<Done, EngineError> {
        let (mut run, facts, old) = self.open_release(device)?;
        let res = procs::release(self, &mut run, facts.as_ref(), old.as_ref());
        self.conclude(run, res)
    }

    /// Checks a release and opens its operation (the `begin` step): the device's
    /// kind, if the host still shows it, and the tenant it is taken from.
    fn open_release(
        &mut self,
        device: &DeviceId,
    ) -> Result<(Run, Option<DeviceKind>, Option<Tenant>), EngineError> {
        let Some(record) = self.store.atomically(|tx| tx.device(device))? else {
            let e = EngineError::Store(StoreError::UnknownDevice(*device));
            return Err(self.refuse(Some(*device), None, e));
        };
        self.refuse_if_busy(device, None)?;
        let from = record.state.clone();
        match &from {
            DeviceState::Active { vm, .. } => {
                let e = EngineError::refused(
                    Some(*device),
                    format!("{device} is {from}: VM {vm} is using it"),
                    format!("stop {vm} first; libvirt's release hook drains and scrubs it"),
                );
                return Err(self.refuse(Some(*device), None, e));
            }
            DeviceState::Free => {
                let e = EngineError::refused(
                    Some(*device),
                    format!("{device} is Free already"),
                    "nothing to do",
                );
                return Err(self.refuse(Some(*device), None, e));
            }
            DeviceState::Preparing { .. } | DeviceState::Scrubbing => {
                let e = EngineError::refused(
                    Some(*device),
                    format!("{device} is {from}: an earlier operation did not finish"),
                    "run `devfence recover`",
                );
                return Err(self.refuse(Some(*device), None, e));
            }
            _ => {}
        }
        let inv = self.inventory()?;
        let facts = classify(&inv, device).ok();
        if let (Some(DeviceKind::IbVf { .. }), Some(src)) = (&facts, self.guids)
            && let Err(x) = src.ready()
        {
            let e = EngineError::refused(
                Some(*device),
                format!("{} cannot be used: {x}", src.describe()),
                x.hint,
            );
            return Err(self.refuse(Some(*device), from.tenant().cloned(), e));
        }
        let old = match from.tenant() {
            Some(t) => self.store.atomically(|tx| tx.tenant(t))?,
            None => None,
        };
        let tenant = from.tenant().cloned();
        let run = self.begin(
            OpKind::Release,
            device,
            tenant,
            &from,
            &DeviceState::Scrubbing,
            json!({
                "from": from.to_string(), "device-kind": facts,
            }),
        )?;
        Ok((run, facts, old))
    }

    /// The VM `vm` starts with `device`: `Ready(T)` → `Active(T, vm)`, refused
    /// unless the device is Ready for `tenant` (and for this VM, if it was
    /// reserved for one). A bare lifecycle move: libvirt's `prepare begin` goes
    /// through [`start_domain`](Self::start_domain), which re-verifies the device
    /// and moves all of a domain's devices together.
    ///
    /// # Errors
    /// Refused when the device is not Ready for that tenant and VM.
    pub fn vm_started(
        &mut self,
        device: &DeviceId,
        tenant: &TenantId,
        vm: &str,
    ) -> Result<(), EngineError> {
        let dev = *device;
        let t = tenant.clone();
        let v = vm.to_owned();
        let r = self.store.atomically(|tx| {
            let Some(rec) = tx.device(&dev)? else {
                return Err(StoreError::UnknownDevice(dev));
            };
            let next = DeviceState::Active { tenant: t.clone(), vm: v.clone() };
            tx.set_device_state(&dev, &rec.state, &next)?;
            tx.audit(&AuditEvent {
                kind: AuditKind::Step,
                device: Some(dev),
                tenant: Some(t.clone()),
                detail: json!({ "step": "vm-start", "from": rec.state.to_string(), "to": next.to_string() }),
            })?;
            Ok(())
        });
        r.map_err(|e| {
            let e = EngineError::refused(
                Some(dev),
                e.to_string(),
                "assign the device to the VM's tenant first (`devfence assign`)",
            );
            self.refuse(Some(dev), Some(tenant.clone()), e)
        })
    }

    /// The VM using `device` stopped (libvirt's `release end`): `Active` →
    /// `Draining`, then the device is released (scrubbed and verified).
    ///
    /// # Errors
    /// As [`release`](Self::release).
    pub fn vm_stopped(&mut self, device: &DeviceId) -> Result<Done, EngineError> {
        let dev = *device;
        self.store.atomically(|tx| {
            let Some(rec) = tx.device(&dev)? else {
                return Err(StoreError::UnknownDevice(dev));
            };
            if let DeviceState::Active { tenant, vm } = &rec.state {
                let next = DeviceState::Draining { tenant: tenant.clone(), vm: vm.clone() };
                tx.set_device_state(&dev, &rec.state, &next)?;
                tx.audit(&AuditEvent {
                    kind: AuditKind::Step,
                    device: Some(dev),
                    tenant: Some(tenant.clone()),
                    detail: json!({ "step": "vm-stop", "from": rec.state.to_string(), "to": next.to_string() }),
                })?;
            }
            Ok(())
        })?;
        self.release(device)
    }

    /// Lists the steps and gates an assignment or handover of `device` to `to`
    /// would run, without acting.
    ///
    /// # Errors
    /// The device or tenant is unknown or cannot be classified.
    pub fn plan(
        &mut self,
        device: &DeviceId,
        to: Option<&TenantId>,
    ) -> Result<Vec<PlannedStep>, EngineError> {
        if let Some(t) = to
            && self.store.atomically(|tx| tx.tenant(t))?.is_none()
        {
            return Err(StoreError::UnknownTenant(t.clone()).into());
        }
        let inv = self.inventory()?;
        let facts = classify(&inv, device)
            .map_err(|e| EngineError::refused(Some(*device), e.reason, e.hint))?;
        let (state, guids, pool) = self.store.atomically(|tx| {
            let state = tx.device(device)?.map_or(DeviceState::Free, |r| r.state);
            Ok((state, tx.guids_of(device)?, tx.guid_pool()?.is_some()))
        })?;
        let pool = pool || self.guids.is_some();
        Ok(procs::plan(&facts, &state, to.is_some(), &guids, pool))
    }

    /// Finds every operation a crash left unfinished and drives its device to a
    /// verified clean state (`Free`) or leaves it `Quarantined`, saying why.
    ///
    /// # Errors
    /// The ledger failed.
    pub fn recover(&mut self) -> Result<Vec<Recovered>, EngineError> {
        let open = self.store.atomically(|tx| tx.open_operations())?;
        let mut out = Vec::new();
        if open.is_empty() {
            return Ok(out);
        }
        let inv = self.inventory()?;
        for op in open {
            out.push(procs::recover_one(self, &op, &inv)?);
        }
        Ok(out)
    }

    // ------------------------------------------------------------------
    // Step machinery

    #[allow(clippy::needless_pass_by_value)]
    fn begin(
        &mut self,
        kind: OpKind,
        device: &DeviceId,
        tenant: Option<TenantId>,
        from: &DeviceState,
        first: &DeviceState,
        detail: Value,
    ) -> Result<Run, EngineError> {
        let k = kind.name();
        let dev = *device;
        let t = tenant.clone();
        let (f, n) = (from.clone(), first.clone());
        let res = self.store.atomically(|tx| {
            let op = tx.begin_operation(&dev, k)?;
            tx.set_device_state(&dev, &f, &n)?;
            let d = json!({ "step": "begin", "operation": op, "detail": detail, "state": n.to_string() });
            tx.journal_step(op, "begin", StepState::Done, &d)?;
            tx.audit(&AuditEvent { kind: AuditKind::Step, device: Some(dev), tenant: t.clone(), detail: d })?;
            Ok(op)
        });
        let op = match res {
            Ok(op) => op,
            Err(e) => return Err(self.refuse(Some(dev), tenant, e.into())),
        };
        let run = Run {
            op,
            kind,
            device: dev,
            tenant,
            started: Instant::now(),
            timings: Vec::new(),
        };
        self.emit(&Progress::Began {
            op,
            kind: kind.name().to_owned(),
            device: dev,
        });
        self.fp.hit(&format!("{kind}:begin:acted"));
        Ok(run)
    }

    /// Runs one journalled step: `Planned` first, then the action, then `Done`
    /// (or `Failed`), each audited; failpoints before and after the action.
    #[allow(clippy::needless_pass_by_value)]
    pub(crate) fn step<T>(
        &mut self,
        run: &mut Run,
        step: Step,
        plan: Value,
        act: impl FnOnce(&mut Self) -> Result<(T, Value), StepFailure>,
    ) -> Result<T, StepFailure> {
        let name = step.name();
        self.journal(run, name, StepState::Planned, &plan, AuditKind::Step, false)?;
        self.fp.hit(&format!("{}:{name}:planned", run.kind));
        let t0 = Instant::now();
        let res = act(self);
        let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        match res {
            Ok((v, detail)) => {
                self.fp.hit(&format!("{}:{name}:acted", run.kind));
                self.journal(run, name, StepState::Done, &detail, AuditKind::Step, true)?;
                run.timings.push((name.to_owned(), ms));
                Ok(v)
            }
            Err(f) => {
                let d = json!({ "reason": f.reason, "hint": f.hint });
                // A failure to journal the failure is secondary: the step failed.
                let _ = self.journal(run, name, StepState::Failed, &d, AuditKind::Step, true);
                Err(StepFailure {
                    step: name.to_owned(),
                    ..f
                })
            }
        }
    }

    /// Runs a gate: a read-back predicate. The result and its evidence are
    /// journalled and audited as a gate record, in one transaction: a gate
    /// reads and changes nothing, so there is nothing to record before it
    /// (journal first is for steps that act). A crash during the check leaves
    /// the step before it last in the journal; recovery scrubs from any point.
    pub(crate) fn gate(
        &mut self,
        run: &mut Run,
        gate: Gate,
        check: impl FnOnce(&mut Self, &Run) -> Result<Value, GateFailure>,
    ) -> Result<(), StepFailure> {
        let name = gate.name();
        let gname = gate.journal_name();
        self.fp.hit(&format!("{}:{gname}:planned", run.kind));
        let t0 = Instant::now();
        let res = check(self, run);
        let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        match res {
            Ok(evidence) => {
                self.emit(&Progress::Gate {
                    name: name.to_owned(),
                    passed: true,
                    elapsed_ms: run.elapsed_ms(),
                    evidence: evidence.clone(),
                });
                self.journal(
                    run,
                    &gname,
                    StepState::Done,
                    &json!({ "passed": true, "evidence": evidence }),
                    AuditKind::Gate,
                    true,
                )?;
                run.timings.push((gname, ms));
                Ok(())
            }
            Err(GateFailure {
                reason,
                evidence,
                hint,
            }) => {
                self.emit(&Progress::Gate {
                    name: name.to_owned(),
                    passed: false,
                    elapsed_ms: run.elapsed_ms(),
                    evidence: evidence.clone(),
                });
                let d = json!({ "passed": false, "reason": reason, "evidence": evidence, "hint": hint });
                let _ = self.journal(run, &gname, StepState::Failed, &d, AuditKind::Gate, true);
                Err(StepFailure {
                    step: gname,
                    reason,
                    hint,
                    source: None,
                })
            }
        }
    }

    fn journal(
        &mut self,
        run: &Run,
        step: &str,
        state: StepState,
        detail: &Value,
        kind: AuditKind,
        audit: bool,
    ) -> Result<(), StoreError> {
        let (op, dev, tenant) = (run.op, run.device, run.tenant.clone());
        let st = step.to_owned();
        self.store.atomically(|tx| {
            tx.journal_step(op, &st, state, detail)?;
            if audit {
                tx.audit(&AuditEvent {
                    kind,
                    device: Some(dev),
                    tenant: tenant.clone(),
                    detail: json!({ "operation": op, "step": st, "state": state, "detail": detail }),
                })?;
            }
            Ok(())
        })?;
        let elapsed_ms = run.elapsed_ms();
        if kind == AuditKind::Step {
            self.emit(&Progress::Step {
                name: step.to_owned(),
                state,
                elapsed_ms,
                detail: detail.clone(),
            });
        }
        Ok(())
    }

    /// Moves the device's state as a journalled step of `run`.
    pub(crate) fn move_state(
        &mut self,
        run: &mut Run,
        device: &DeviceId,
        from: &DeviceState,
        to: &DeviceState,
    ) -> Result<(), StepFailure> {
        let (op, dev, tenant) = (run.op, *device, run.tenant.clone());
        let (f, t) = (from.clone(), to.clone());
        let step = format!("state:{}", to.name());
        let d = json!({ "device": dev, "from": f.to_string(), "to": t.to_string() });
        self.fp.hit(&format!("{}:{step}:planned", run.kind));
        self.store.atomically(|tx| {
            tx.set_device_state(&dev, &f, &t)?;
            tx.journal_step(op, &step, StepState::Done, &d)?;
            tx.audit(&AuditEvent {
                kind: AuditKind::Step,
                device: Some(dev),
                tenant: tenant.clone(),
                detail: d.clone(),
            })?;
            Ok(())
        })?;
        self.emit(&Progress::Step {
            name: step,
            state: StepState::Done,
            elapsed_ms: run.elapsed_ms(),
            detail: json!({ "from": from.to_string(), "to": to.to_string() }),
        });
        Ok(())
    }

    /// Ends an operation: on success the device is already in its final state;
    /// on failure it is quarantined (fail closed).
    fn conclude(
        &mut self,
        run: Run,
        res: Result<procs::Finish, StepFailure>,
    ) -> Result<Done, EngineError> {
        match res {
            Ok(fin) => {
                let (op, dev, tenant) = (run.op, fin.device, run.tenant.clone());
                let d = json!({ "outcome": "succeeded", "device": dev, "state": fin.state.to_string(), "timings": run.timings });
                self.fp.hit(&format!("{}:finish:planned", run.kind));
                self.store.atomically(|tx| {
                    tx.journal_step(op, "finish", StepState::Done, &d)?;
                    tx.finish_operation(op, OpOutcome::Succeeded)?;
                    tx.audit(&AuditEvent {
                        kind: AuditKind::Step,
                        device: Some(dev),
                        tenant: tenant.clone(),
                        detail: d.clone(),
                    })?;
                    Ok(())
                })?;
                let elapsed_ms = run.elapsed_ms();
                self.emit(&Progress::Finished {
                    op,
                    outcome: OpOutcome::Succeeded,
                    state: fin.state.to_string(),
                    elapsed_ms,
                });
                Ok(Done {
                    op,
                    device: dev,
                    state: fin.state,
                    token_file: fin.token_file,
                    elapsed_ms,
                    timings: run.timings,
                })
            }
            Err(f) => {
                let reason = format!("{} failed: {}", f.step, f.reason);
                let state = self.quarantine(&run, &run.device, &reason)?;
                Err(EngineError::Failed {
                    kind: run.kind,
                    device: run.device,
                    step: f.step,
                    reason: f.reason,
                    state: state.name().to_owned(),
                    hint: f.hint,
                    source: f.source,
                })
            }
        }
    }

    /// Quarantines the device of a failed operation and closes the operation.
    fn quarantine(
        &mut self,
        run: &Run,
        device: &DeviceId,
        reason: &str,
    ) -> Result<DeviceState, EngineError> {
        let (op, dev, tenant) = (run.op, *device, run.tenant.clone());
        let reason = truncate(reason, 300);
        let st = self.store.atomically(|tx| {
            let cur = tx
                .device(&dev)?
                .ok_or(StoreError::UnknownDevice(dev))?
                .state;
            let q = DeviceState::Quarantined {
                reason: reason.clone(),
            };
            if !matches!(cur, DeviceState::Quarantined { .. }) {
                tx.set_device_state(&dev, &cur, &q)?;
            }
            let d = json!({ "outcome": "failed", "from": cur.to_string(), "reason": reason });
            tx.journal_step(op, "quarantine", StepState::Done, &d)?;
            tx.finish_operation(op, OpOutcome::Failed)?;
            tx.audit(&AuditEvent {
                kind: AuditKind::Refusal,
                device: Some(dev),
                tenant: tenant.clone(),
                detail: d,
            })?;
            tx.device(&dev)?
                .map(|r| r.state)
                .ok_or(StoreError::UnknownDevice(dev))
        })?;
        self.emit(&Progress::Finished {
            op,
            outcome: OpOutcome::Failed,
            state: st.to_string(),
            elapsed_ms: run.elapsed_ms(),
        });
        Ok(st)
    }
}

/// A libvirt domain name devfence accepts as a VM name.
fn check_vm_name(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
        return Err(format!("{v:?} is not a VM name"));
    }
    Ok(())
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The tenancy the ledger implies, for the isolation rules: its tenants and who
/// holds which device.
///
/// # Errors
/// The ledger failed.
pub fn tenancy_from_ledger(tx: &mut dyn Tx) -> Result<devfence_model::Tenancy, StoreError> {
    let tenants = tx.tenants()?;
    let assignments = tx
        .assignments()?
        .into_iter()
        .map(|a| devfence_model::tenancy::Assignment {
            device: a.device,
            tenant: a.tenant,
        })
        .collect();
    let mut host_custody: Vec<DeviceId> = tx.pf_custody()?.into_iter().map(|(_, pf)| pf).collect();
    host_custody.dedup();
    Ok(devfence_model::Tenancy {
        tenants,
        assignments,
        userspace_pfs: Vec::new(),
        non_isolating_parents: Vec::new(),
        host_custody,
    })
}
