//! The ledger and the journal behind one [`Store`] trait.
//!
//! The ledger says who the tenants are, which devices devfence manages and in which
//! lifecycle state each one is (docs/design.md §4), which GUIDs were ever issued, and what
//! every operation did, step by step. The journal is written **before** acting
//! (docs/design.md §2 principle 5): a step is recorded `Planned`, then the host or fabric
//! is changed, then the step is recorded `Done` or `Failed`. After a crash, the
//! operations that are still open name the devices recovery must drive forward or
//! back to quarantine.
//!
//! Everything happens inside a transaction: [`Store::transaction`] runs a closure
//! against a [`Tx`] and commits all of its changes — ledger, journal and audit
//! records — or none of them. [`StoreExt::atomically`] is the convenient form.
//! SQLite ([`crate::SqliteStore`]) is the local backend; a fleet backend (etcd) can
//! implement the same two traits.
//!
//! Secrets (VF tokens, credentials) never enter the store: no method takes one. A
//! caller that must correlate a secret records a keyed hash of it in a JSON detail.

use std::fmt;
use std::path::PathBuf;

use devfence_model::{DeviceId, Guid, TenantId};
pub use devfence_model::{Partition, Tenant};

use crate::audit::{AuditError, AuditEvent, AuditFilter, AuditRecord, ChainHead, VerifyReport};

/// Milliseconds since the Unix epoch (UTC); 0 if the clock is before 1970.
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The lifecycle state of one device, exactly as docs/design.md §4 draws it.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum DeviceState {
    /// Nobody holds it; it was verified clean.
    Free,
    /// Being prepared for `tenant`; its gates have not all passed.
    Preparing {
        /// The tenant it is being prepared for.
        tenant: TenantId,
        /// The one VM it is reserved for, if the assignment named one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// Every gate passed for `tenant`; its VM may start.
    Ready {
        /// The tenant it is ready for.
        tenant: TenantId,
        /// The one VM that may use it, if the assignment named one; any VM of
        /// `tenant` otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// In use by `tenant`'s VM `vm`.
    Active {
        /// The tenant.
        tenant: TenantId,
        /// The VM (libvirt domain name).
        vm: String,
    },
    /// `tenant`'s VM `vm` is stopping.
    Draining {
        /// The tenant.
        tenant: TenantId,
        /// The VM (libvirt domain name).
        vm: String,
    },
    /// Being reset and cleaned; held by nobody.
    Scrubbing,
    /// Unusable until verified clean; held by nobody.
    Quarantined {
        /// Why it is quarantined.
        reason: String,
    },
}

impl DeviceState {
    /// The name stored in the ledger's `state` column.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            DeviceState::Free => "free",
            DeviceState::Preparing { .. } => "preparing",
            DeviceState::Ready { .. } => "ready",
            DeviceState::Active { .. } => "active",
            DeviceState::Draining { .. } => "draining",
            DeviceState::Scrubbing => "scrubbing",
            DeviceState::Quarantined { .. } => "quarantined",
        }
    }

    /// The tenant this state gives the device to, if any.
    #[must_use]
    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            DeviceState::Preparing { tenant, .. }
            | DeviceState::Ready { tenant, .. }
            | DeviceState::Active { tenant, .. }
            | DeviceState::Draining { tenant, .. } => Some(tenant),
            _ => None,
        }
    }

    /// The VM: the one using it (`Active`, `Draining`) or the one it is reserved
    /// for (`Preparing`, `Ready`, when the assignment named one).
    #[must_use]
    pub fn vm(&self) -> Option<&str> {
        match self {
            DeviceState::Active { vm, .. } | DeviceState::Draining { vm, .. } => Some(vm),
            DeviceState::Preparing { vm, .. } | DeviceState::Ready { vm, .. } => vm.as_deref(),
            _ => None,
        }
    }

    /// Whether the ledger accepts the move `self → next` (docs/design.md §4).
    ///
    /// Any state may fall to `Quarantined` (fail closed). Otherwise:
    /// `Free → Preparing`; `Preparing(T) → Ready(T)`; `Ready(T) → Active(T, vm)`;
    /// `Active(T, vm) → Draining(T, vm)`; `Preparing | Ready | Draining → Scrubbing`;
    /// `Quarantined → Scrubbing`; `Scrubbing | Quarantined → Free` (after
    /// verification, which the caller vouches for). Nothing reaches `Ready` or
    /// `Active` except from the step before it, for the same tenant.
    #[must_use]
    pub fn may_become(&self, next: &DeviceState) -> bool {
        use DeviceState as S;
        match (self, next) {
            (_, S::Quarantined { .. }) => true,
            (S::Free, S::Preparing { .. }) => true,
            // A one-sweep IB handover: the old GUIDs leave the fabric in the
            // grant's apply, verified before Ready (never through Free, which
            // says verified clean).
            (S::Scrubbing, S::Preparing { .. }) => true,
            (S::Preparing { tenant: a, vm: v }, S::Ready { tenant: b, vm: w }) => a == b && v == w,
            (S::Ready { tenant: a, vm: v }, S::Active { tenant: b, vm: w }) => {
                a == b && v.as_ref().is_none_or(|v| v == w)
            }
            (S::Active { tenant: a, vm: v }, S::Draining { tenant: b, vm: w }) => a == b && v == w,
            (S::Preparing { .. } | S::Ready { .. } | S::Draining { .. }, S::Scrubbing) => true,
            (S::Quarantined { .. }, S::Scrubbing) => true,
            (S::Scrubbing | S::Quarantined { .. }, S::Free) => true,
            _ => false,
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceState::Free => f.write_str("Free"),
            DeviceState::Preparing { tenant, vm: None } => write!(f, "Preparing({tenant})"),
            DeviceState::Preparing {
                tenant,
                vm: Some(vm),
            } => write!(f, "Preparing({tenant}, {vm})"),
            DeviceState::Ready { tenant, vm: None } => write!(f, "Ready({tenant})"),
            DeviceState::Ready {
                tenant,
                vm: Some(vm),
            } => write!(f, "Ready({tenant}, {vm})"),
            DeviceState::Active { tenant, vm } => write!(f, "Active({tenant}, {vm})"),
            DeviceState::Draining { tenant, vm } => write!(f, "Draining({tenant}, {vm})"),
            DeviceState::Scrubbing => f.write_str("Scrubbing"),
            DeviceState::Quarantined { reason } => write!(f, "Quarantined({reason})"),
        }
    }
}

/// One device in the ledger.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct DeviceRecord {
    /// The device.
    pub device: DeviceId,
    /// Its lifecycle state.
    pub state: DeviceState,
    /// When the state was last set (ms since the epoch).
    pub updated_at_ms: i64,
}

/// A device held by a tenant: the devices whose state names a tenant.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Assignment {
    /// The device.
    pub device: DeviceId,
    /// The tenant.
    pub tenant: TenantId,
    /// The VM, once one uses it.
    pub vm: Option<String>,
    /// The full state.
    pub state: DeviceState,
}

/// An inclusive range of GUIDs the pool may hand out.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct GuidRange {
    /// The first GUID of the range.
    pub first: Guid,
    /// The last GUID of the range (inclusive).
    pub last: Guid,
}

/// What became of a GUID the pool knows. No state ever returns to the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GuidState {
    /// Issued to a device for a tenant and in use.
    Issued,
    /// Retired: may still be in the fabric; must not be used by anyone.
    Quarantined,
    /// Retired and seen absent from the SM; still never reissued.
    Cleared,
    /// Not issued by devfence but known to exist (factory or foreign GUID):
    /// never handed out.
    Foreign,
}

impl GuidState {
    /// The name stored in the ledger.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            GuidState::Issued => "issued",
            GuidState::Quarantined => "quarantined",
            GuidState::Cleared => "cleared",
            GuidState::Foreign => "foreign",
        }
    }
}

/// One GUID the pool remembers (forever).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct GuidRecord {
    /// The GUID.
    pub guid: Guid,
    /// Its state.
    pub state: GuidState,
    /// The device it was issued for.
    pub device: Option<DeviceId>,
    /// The tenant it was issued for.
    pub tenant: Option<TenantId>,
    /// When it was issued or recorded (ms since the epoch).
    pub issued_at_ms: i64,
    /// When it was retired.
    pub retired_at_ms: Option<i64>,
    /// Why it was retired or recorded.
    pub note: Option<String>,
}

/// The id of one operation (a handover, an assignment, a release, a recovery…).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    schemars::JsonSchema,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct OperationId(pub i64);

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op-{}", self.0)
    }
}

/// How an operation ended.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OpOutcome {
    /// Every step done and every gate passed.
    Succeeded,
    /// A step or gate failed; the device was left quarantined or where it was.
    Failed,
    /// Recovery closed it after a crash.
    Recovered,
}

impl OpOutcome {
    /// The name stored in the ledger.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            OpOutcome::Succeeded => "succeeded",
            OpOutcome::Failed => "failed",
            OpOutcome::Recovered => "recovered",
        }
    }
}

/// One operation on one device.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Operation {
    /// Its id.
    pub id: OperationId,
    /// The device it holds while open.
    pub device: DeviceId,
    /// What it does (`handover`, `assign`, `release`, …).
    pub kind: String,
    /// When it began.
    pub started_at_ms: i64,
    /// When and how it ended; `None` while open.
    pub finished: Option<(i64, OpOutcome)>,
}

/// The state of a journalled step.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Recorded before acting.
    Planned,
    /// The action was taken (and, for a gate, passed).
    Done,
    /// The action or gate failed.
    Failed,
}

impl StepState {
    /// The name stored in the ledger.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            StepState::Planned => "planned",
            StepState::Done => "done",
            StepState::Failed => "failed",
        }
    }
}

/// One journal row. The journal is append-only: a step that is planned and then
/// done has two rows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct JournalEntry {
    /// Row id (increasing).
    pub id: i64,
    /// The operation.
    pub operation: OperationId,
    /// The step name.
    pub step: String,
    /// Its state.
    pub state: StepState,
    /// When it was written.
    pub at_ms: i64,
    /// Free-form evidence (never a secret).
    pub detail: serde_json::Value,
}

/// One admitted device-state envelope, remembered forever by its nonce so that it
/// is never admitted again (`docs/state-envelopes.md`). Holds no secret: the
/// side-load token is recorded only as a hash, in the audit record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct StateNonce {
    /// The envelope's nonce (32 lowercase hex digits).
    pub nonce: String,
    /// The envelope's id (32 lowercase hex digits).
    pub envelope: String,
    /// The device it was admitted to.
    pub device: DeviceId,
    /// The tenant it was bound to.
    pub tenant: TenantId,
    /// The VM it was bound to (its UUID).
    pub vm: String,
    /// The fingerprint of the key that signed it (32 lowercase hex digits).
    pub signer: String,
    /// When it was admitted (ms since the epoch).
    pub admitted_at_ms: i64,
    /// When it expired or expires (ms since the epoch).
    pub expires_at_ms: i64,
}

/// A second operation was refused because an unfinished one holds the device.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "Device {device} is busy: operation {holder} ({kind}) has not finished. \
     Hint: wait for it, or run `devfence recover` if the process that ran it died"
)]
pub struct Busy {
    /// The device.
    pub device: DeviceId,
    /// The unfinished operation.
    pub holder: OperationId,
    /// Its kind.
    pub kind: String,
    /// When it began.
    pub since_ms: i64,
}

/// The error of a store's backend (SQLite today, etcd for the fleet), kept as
/// the source of a [`StoreError`] so that no backend's type is part of the
/// [`Store`] trait.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong with the ledger.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or set up.
    #[error(
        "Cannot open the ledger {path}: {source}. Hint: check the directory exists and is writable by devfence"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// What the backend said (for SQLite, its error).
        #[source]
        source: BackendError,
    },
    /// The file is not a database, or fails SQLite's integrity check.
    #[error(
        "The ledger {path} is corrupted: {detail}. Hint: move it aside and restore the last \
         backup; devfence never uses a damaged ledger"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// There is no ledger where one was expected (devfence never creates one
    /// implicitly from a read).
    #[error(
        "There is no ledger at {path}. Hint: `devfence init` creates one (so does the first \
         `devfence tenant add`); if devfence managed devices here before, the ledger was moved \
         or deleted: restore it from a backup before anything else"
    )]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// A new ledger could not be made.
    #[error(
        "Cannot create the ledger {path}. Hint: check the directory exists and is writable by \
         devfence (run it as root, or give --ledger FILE)"
    )]
    Create {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A ledger was to be created where a file exists already.
    #[error(
        "The ledger {path} exists already. Hint: devfence never creates a ledger over an \
         existing file; use it as it is, or move it aside first if you really mean to start anew"
    )]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The ledger file (or its `-wal`/`-shm`) may be read or written by others.
    #[error(
        "The ledger file {path} has mode {mode:04o}: other users may read or change it. \
         Hint: devfence keeps its ledger 0600; check nobody else changed it, then \
         `chmod 600 {path}`"
    )]
    LooseMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The database was written by a newer devfence.
    #[error(
        "The ledger {path} has schema version {found}, newer than this devfence knows ({known}). \
         Hint: run the devfence that wrote it (or a newer one); never downgrade a ledger"
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// SQLite failed during an operation.
    #[error(
        "Ledger {context} failed: {source}. Hint: check disk space and permissions of the ledger file"
    )]
    Sql {
        /// What was being done.
        context: &'static str,
        /// What the backend said (for SQLite, its error).
        #[source]
        source: BackendError,
    },
    /// A row read back holds a value devfence cannot have written.
    #[error(
        "The ledger row {table} {row} has an invalid {column} {value:?}: {reason}. \
         Hint: the database was edited outside devfence; inspect it with sqlite3 and restore a backup"
    )]
    BadRow {
        /// The table.
        table: &'static str,
        /// The row's key.
        row: String,
        /// The column.
        column: &'static str,
        /// The value found (cut to 80 characters).
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No such tenant.
    #[error(
        "Unknown tenant {0}. Hint: `devfence tenant list` shows the tenants; add it with `devfence tenant add`"
    )]
    UnknownTenant(TenantId),
    /// The tenant exists already.
    #[error("Tenant {0} exists already. Hint: pick another id, or remove it first")]
    TenantExists(TenantId),
    /// The tenant still holds devices.
    #[error("Tenant {tenant} still holds {count} device(s). Hint: release them first")]
    TenantInUse {
        /// The tenant.
        tenant: TenantId,
        /// How many devices it holds.
        count: u64,
    },
    /// A tenant field is out of range.
    #[error("Tenant {tenant} is invalid: {reason}. Hint: {hint}")]
    InvalidTenant {
        /// The tenant.
        tenant: TenantId,
        /// What is wrong.
        reason: String,
        /// What to do.
        hint: &'static str,
    },
    /// No such device in the ledger.
    #[error("Unknown device {0}. Hint: `devfence status` lists the devices devfence manages")]
    UnknownDevice(DeviceId),
    /// The device is in the ledger already.
    #[error("Device {0} is in the ledger already. Hint: `devfence status` shows its state")]
    DeviceExists(DeviceId),
    /// The device is not in the state the caller expected.
    #[error(
        "Device {device} is {actual}, not {expected}. Hint: another operation changed it; \
         re-read its state with `devfence status`"
    )]
    StateConflict {
        /// The device.
        device: DeviceId,
        /// The state the caller expected.
        expected: Box<DeviceState>,
        /// The state it is in.
        actual: Box<DeviceState>,
    },
    /// The lifecycle does not allow the move.
    #[error(
        "Device {device} may not go from {from} to {to}. Hint: follow the lifecycle \
         Free → Preparing → Ready → Active → Draining → Scrubbing → Free (any state may be quarantined)"
    )]
    IllegalTransition {
        /// The device.
        device: DeviceId,
        /// Its state.
        from: Box<DeviceState>,
        /// The refused state.
        to: Box<DeviceState>,
    },
    /// A second operation on a busy device.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// No such operation.
    #[error("Unknown operation {0}. Hint: `devfence status` lists the open operations")]
    UnknownOperation(OperationId),
    /// The operation has finished already.
    #[error("Operation {0} has finished already. Hint: begin a new operation")]
    OperationFinished(OperationId),
    /// A name (operation kind, step) is empty or too long.
    #[error("Invalid {what} {value:?}: {reason}. Hint: use 1-64 printable ASCII characters")]
    InvalidName {
        /// What it names.
        what: &'static str,
        /// The value (cut to 80 characters).
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// No GUID range was configured.
    #[error("No GUID pool is configured. Hint: set one with the site's GUID range (first..last)")]
    GuidPoolUnset,
    /// The GUID range is invalid.
    #[error(
        "Invalid GUID range {first}..{last}: {reason}. Hint: give first <= last, both neither 0 nor all ones"
    )]
    InvalidGuidRange {
        /// First GUID.
        first: Guid,
        /// Last GUID.
        last: Guid,
        /// Why.
        reason: &'static str,
    },
    /// Every GUID of the range was issued.
    #[error(
        "The GUID pool {first}..{last} is exhausted. Hint: configure a new, never used range; issued GUIDs are never reissued"
    )]
    GuidPoolExhausted {
        /// First GUID.
        first: Guid,
        /// Last GUID.
        last: Guid,
    },
    /// The pool does not know the GUID.
    #[error("GUID {0} was never issued by this pool. Hint: `devfence status` lists issued GUIDs")]
    UnknownGuid(Guid),
    /// The GUID is not in the state the operation needs.
    #[error(
        "GUID {guid} is {state:?}, so it cannot be {action}. Hint: retired GUIDs stay quarantined and are never reissued"
    )]
    GuidState {
        /// The GUID.
        guid: Guid,
        /// Its state.
        state: GuidState,
        /// What was asked.
        action: &'static str,
    },
    /// A value that must be lowercase hex is not.
    #[error(
        "Invalid {what} {value:?}: expected {len} lowercase hex digits. \
         Hint: devfence writes these itself; this is a bug in the caller"
    )]
    InvalidHex {
        /// What it names.
        what: &'static str,
        /// The value (cut to 80 characters).
        value: String,
        /// The number of digits expected.
        len: usize,
    },
    /// A device-state envelope's nonce was admitted before (a replay).
    #[error(
        "Envelope nonce {nonce} was admitted already, to {device} at {admitted_at_ms} ms. \
         Hint: an envelope is admitted once; seal the state again on the source host"
    )]
    NonceUsed {
        /// The nonce.
        nonce: String,
        /// The device it was admitted to.
        device: DeviceId,
        /// When.
        admitted_at_ms: i64,
    },
    /// A device-state envelope expired at or before the nonce horizon: its
    /// nonce may have been pruned, so devfence cannot prove it unused.
    #[error(
        "Envelope nonce {nonce} belongs to an envelope that expired at {expires_at_ms} ms, \
         at or before the ledger's nonce horizon ({horizon_ms} ms): the nonces of such \
         envelopes are pruned, so it cannot be proven unused. Hint: seal the state again on \
         the source host"
    )]
    NonceForgotten {
        /// The nonce.
        nonce: String,
        /// When its envelope expired.
        expires_at_ms: i64,
        /// The horizon.
        horizon_ms: i64,
    },
    /// Whether a GUID is live elsewhere could not be told, so none is issued.
    #[error(
        "Cannot tell whether GUID {guid} is in use: {reason}. Hint: check the subnet manager \
         (`devfence status`); devfence issues no GUID it cannot check"
    )]
    GuidLiveCheck {
        /// The candidate GUID.
        guid: Guid,
        /// What failed.
        reason: String,
    },
    /// An internal invariant of the store was broken (a bug).
    #[error("Internal ledger error: {0}. Hint: this is a bug in devfence; please report it")]
    Internal(&'static str),
}

impl StoreError {
    /// The [`Busy`] refusal, if this is one.
    #[must_use]
    pub fn as_busy(&self) -> Option<&Busy> {
        match self {
            StoreError::Busy(b) => Some(b),
            _ => None,
        }
    }
}

/// The operations inside one transaction. Each call sees the effects of the calls
/// before it; nothing is visible to others until the transaction commits, and an
/// error anywhere rolls back everything.
pub trait Tx {
    // ---- tenants ----
    /// Adds a tenant; refused if the id exists.
    fn add_tenant(&mut self, tenant: &Tenant) -> Result<(), StoreError>;
    /// Removes a tenant; refused while it holds a device.
    fn remove_tenant(&mut self, id: &TenantId) -> Result<(), StoreError>;
    /// The tenant with `id`.
    fn tenant(&mut self, id: &TenantId) -> Result<Option<Tenant>, StoreError>;
    /// All tenants, ordered by id.
    fn tenants(&mut self) -> Result<Vec<Tenant>, StoreError>;

    // ---- devices and lifecycle ----
    /// Puts a device under devfence's management, in state `Free`.
    fn add_device(&mut self, device: &DeviceId) -> Result<(), StoreError>;
    /// The device's record.
    fn device(&mut self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;
    /// All devices, ordered by id.
    fn devices(&mut self) -> Result<Vec<DeviceRecord>, StoreError>;
    /// Moves a device from `expected` to `next` (compare and set). Refused if the
    /// device is in another state ([`StoreError::StateConflict`]), if the lifecycle
    /// forbids the move ([`StoreError::IllegalTransition`]) or if `next` names an
    /// unknown tenant.
    fn set_device_state(
        &mut self,
        device: &DeviceId,
        expected: &DeviceState,
        next: &DeviceState,
    ) -> Result<(), StoreError>;
    /// Devices held by a tenant (their state names one), ordered by device.
    fn assignments(&mut self) -> Result<Vec<Assignment>, StoreError>;

    // ---- GUID pool ----
    /// Sets the range new GUIDs come from. GUIDs issued before stay remembered and
    /// are skipped even if the new range covers them.
    fn set_guid_pool(&mut self, range: GuidRange) -> Result<(), StoreError>;
    /// The configured range.
    fn guid_pool(&mut self) -> Result<Option<GuidRange>, StoreError>;
    /// Issues a GUID never issued (or recorded) before, to `device` for `tenant`.
    fn allocate_guid(&mut self, device: &DeviceId, tenant: &TenantId) -> Result<Guid, StoreError>;
    /// Issues a GUID like [`allocate_guid`](Self::allocate_guid), and also skips
    /// every candidate `live` says exists elsewhere (on a host port, at the SM):
    /// `live(g)` returns why (`Some(note)`) and the GUID is then recorded as
    /// [`GuidState::Foreign`], never to be issued.
    fn allocate_guid_avoiding(
        &mut self,
        device: &DeviceId,
        tenant: &TenantId,
        live: &mut dyn FnMut(Guid) -> Result<Option<String>, StoreError>,
    ) -> Result<Guid, StoreError>;
    /// Records `guid`, issued by a shared pool beyond this host (a fleet's),
    /// as issued to `device` for `tenant`. Refused when the ledger knows the
    /// GUID already (it is never issued twice).
    fn record_issued_guid(
        &mut self,
        device: &DeviceId,
        tenant: &TenantId,
        guid: Guid,
    ) -> Result<(), StoreError>;
    /// Retires an issued GUID: it becomes `Quarantined` and is never reissued.
    fn retire_guid(&mut self, guid: Guid, reason: &str) -> Result<(), StoreError>;
    /// Marks a quarantined GUID as seen absent from the SM (`Cleared`). It is
    /// still never reissued.
    fn clear_guid(&mut self, guid: Guid) -> Result<(), StoreError>;
    /// Records a GUID devfence did not issue (a factory or foreign GUID) so the
    /// pool never hands it out. No-op if the GUID is known already.
    fn record_foreign_guid(&mut self, guid: Guid, note: &str) -> Result<(), StoreError>;
    /// What the pool knows about `guid`.
    fn guid(&mut self, guid: Guid) -> Result<Option<GuidRecord>, StoreError>;

    /// Every GUID ever issued to `device` (any state), oldest first.
    fn guids_of(&mut self, device: &DeviceId) -> Result<Vec<GuidRecord>, StoreError>;

    // ---- PF custody ----
    /// Records that devfence itself holds the custody of user-space PF `pf` for
    /// `device` (a VF of it whose VF token devfence set). The record goes when the
    /// device is held by no tenant any more.
    fn record_pf_custody(&mut self, device: &DeviceId, pf: &DeviceId) -> Result<(), StoreError>;
    /// The PFs devfence holds the custody of for a device a tenant holds, with
    /// that device, ordered by PF.
    fn pf_custody(&mut self) -> Result<Vec<(DeviceId, DeviceId)>, StoreError>;

    // ---- operations and journal ----
    /// Opens an operation on `device`. Refused with [`StoreError::Busy`] while an
    /// unfinished operation holds the device — also one of another process.
    fn begin_operation(&mut self, device: &DeviceId, kind: &str)
    -> Result<OperationId, StoreError>;
    /// Appends a journal row for `step` of an open operation. Write `Planned`
    /// before acting, `Done`/`Failed` after.
    fn journal_step(
        &mut self,
        op: OperationId,
        step: &str,
        state: StepState,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError>;
    /// Closes an operation and frees its device for the next one.
    fn finish_operation(&mut self, op: OperationId, outcome: OpOutcome) -> Result<(), StoreError>;
    /// The operation.
    fn operation(&mut self, op: OperationId) -> Result<Option<Operation>, StoreError>;
    /// Unfinished operations (what recovery must look at), oldest first.
    fn open_operations(&mut self) -> Result<Vec<Operation>, StoreError>;
    /// The journal of one operation, in order.
    fn journal(&mut self, op: OperationId) -> Result<Vec<JournalEntry>, StoreError>;

    // ---- audit ----
    /// Appends an audit record in this transaction, chained to the previous one.
    fn audit(&mut self, event: &AuditEvent) -> Result<AuditRecord, StoreError>;

    // ---- device-state envelopes (single use) ----
    /// The admission of the envelope with `nonce` (32 lowercase hex digits), if
    /// it was ever admitted.
    fn state_nonce(&mut self, nonce: &str) -> Result<Option<StateNonce>, StoreError>;
    /// The nonce horizon (ms since the epoch), once `audit prune` has set it:
    /// the nonces of envelopes that expired at or before it may be gone, and no
    /// such envelope is admitted again.
    fn state_nonce_horizon(&mut self) -> Result<Option<i64>, StoreError>;
    /// Records an admission: refused with [`StoreError::NonceUsed`] if the nonce
    /// was admitted before, and with [`StoreError::NonceForgotten`] if its
    /// envelope expired at or before the nonce horizon. Write it in the same
    /// transaction as the admission's audit record.
    fn record_state_nonce(&mut self, admission: &StateNonce) -> Result<(), StoreError>;

    // ---- fabric restores (recorded once) ----
    /// Records that the SM backend `backend` restored its configuration (the
    /// restore `id`, stable across processes); false when it was recorded
    /// before. Write it in the same transaction as the restore's audit record.
    fn record_fabric_restore(&mut self, backend: &str, id: &str) -> Result<bool, StoreError>;
}

/// A ledger backend.
pub trait Store {
    /// Runs `f` in one transaction: commits if it returns `Ok`, rolls back
    /// otherwise. `f` is called exactly once.
    fn transaction(
        &mut self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;

    /// Verifies the whole audit chain; with `anchor`, also that the chain still
    /// reaches the anchored head (detects tail truncation and rewrites up to it).
    fn audit_verify(&mut self, anchor: Option<&ChainHead>) -> Result<VerifyReport, AuditError>;

    /// The audit records matching `filter`, in order.
    fn audit_show(&mut self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, AuditError>;

    /// Names who acts from now on (every audit record appended carries it);
    /// a batch switches it per member. A store that records no actor ignores it.
    fn set_actor(&mut self, _actor: Option<serde_json::Value>) {}
}

/// Conveniences over any [`Store`].
pub trait StoreExt: Store {
    /// Runs `f` in one transaction and returns its value.
    fn atomically<T>(
        &mut self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut f = Some(f);
        let mut out = None;
        self.transaction(&mut |tx| {
            let f = f
                .take()
                .ok_or(StoreError::Internal("transaction closure called twice"))?;
            out = Some(f(tx)?);
            Ok(())
        })?;
        out.ok_or(StoreError::Internal("transaction closure not called"))
    }

    /// Opens an operation on `device` in its own transaction (see
    /// [`Tx::begin_operation`]); [`StoreError::as_busy`] tells a refusal apart.
    fn begin_operation(
        &mut self,
        device: &DeviceId,
        kind: &str,
    ) -> Result<OperationId, StoreError> {
        self.atomically(|tx| tx.begin_operation(device, kind))
    }

    /// Verifies the audit chain without an anchor.
    fn verify(&mut self) -> Result<VerifyReport, AuditError> {
        self.audit_verify(None)
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// Checks an operation kind or step name: 1-64 printable ASCII characters.
pub(crate) fn check_name(what: &'static str, value: &str) -> Result<(), StoreError> {
    let reason = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > 64 {
        Some("it is longer than 64 characters")
    } else if !value.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        Some("it has characters other than printable ASCII")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidName {
            what,
            value: value.chars().take(80).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks `len` lowercase hex digits.
pub(crate) fn check_hex(what: &'static str, value: &str, len: usize) -> Result<(), StoreError> {
    if value.len() == len
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Ok(());
    }
    Err(StoreError::InvalidHex {
        what,
        value: value.chars().take(80).collect(),
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        s.parse().expect("tenant id")
    }

    #[test]
    fn lifecycle_edges_follow_design() {
        let a = t("a");
        let b = t("b");
        let free = DeviceState::Free;
        let prep_a = DeviceState::Preparing {
            tenant: a.clone(),
            vm: None,
        };
        let ready_a = DeviceState::Ready {
            tenant: a.clone(),
            vm: None,
        };
        let ready_b = DeviceState::Ready {
            tenant: b.clone(),
            vm: None,
        };
        let ready_a_vm2 = DeviceState::Ready {
            tenant: a.clone(),
            vm: Some("vm2".into()),
        };
        let active_a = DeviceState::Active {
            tenant: a.clone(),
            vm: "vm1".into(),
        };
        let q = DeviceState::Quarantined { reason: "x".into() };
        assert!(free.may_become(&prep_a));
        assert!(prep_a.may_become(&ready_a));
        assert!(
            !prep_a.may_become(&ready_b),
            "Ready only for the prepared tenant"
        );
        assert!(!free.may_become(&ready_a), "no skipping the gates");
        assert!(!free.may_become(&active_a));
        assert!(ready_a.may_become(&active_a));
        assert!(
            !ready_a_vm2.may_become(&active_a),
            "a device reserved for vm2 is not for vm1"
        );
        assert!(!q.may_become(&ready_a), "quarantine never leads to Ready");
        assert!(active_a.may_become(&q));
        assert!(!active_a.may_become(&DeviceState::Free));
        assert!(DeviceState::Scrubbing.may_become(&free));
        // A one-sweep IB handover prepares straight from Scrubbing; Ready still
        // only after Preparing's gates.
        assert!(DeviceState::Scrubbing.may_become(&prep_a));
        assert!(!DeviceState::Scrubbing.may_become(&ready_a));
        assert!(!DeviceState::Scrubbing.may_become(&active_a));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("step", "reset").is_ok());
        assert!(check_name("step", "").is_err());
        assert!(check_name("step", &"x".repeat(65)).is_err());
        assert!(check_name("step", "a\nb").is_err());
        assert!(check_hex("nonce", "0123456789abcdef", 16).is_ok());
        assert!(check_hex("nonce", "0123456789ABCDEF", 16).is_err());
        assert!(check_hex("nonce", "0123", 16).is_err());
    }
}
