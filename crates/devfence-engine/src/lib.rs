//! The engine of devfence: the ledger and journal ([`Store`], [`SqliteStore`]),
//! the hash-chained audit log ([`audit`]), and the lifecycle ([`engine`]):
//! assign, handover, release, VM start and stop, recovery — steps and gates
//! typed once for plan and execution (docs/design.md §4, §5). It touches the host
//! only through `devfence-host` (an `Actuator` to change it, `readback` to
//! verify); [`libvirt`] reads libvirt domain XML for the hook.

pub mod audit;
pub mod engine;
pub mod libvirt;
pub mod sqlite;
pub mod store;

pub use audit::{
    AuditError, AuditEvent, AuditFilter, AuditKind, AuditRecord, ChainBreak, ChainHead,
    ChainProblem, Hash, VerifyReport,
};
pub use sqlite::{SCHEMA_VERSION, SqliteStore};
pub use store::{
    Assignment, Busy, DeviceRecord, DeviceState, GuidRange, GuidRecord, GuidState, JournalEntry,
    OpOutcome, Operation, OperationId, StateNonce, StepState, Store, StoreError, StoreExt, Tx,
};
