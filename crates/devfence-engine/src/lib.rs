//! The engine of devfence: the ledger and journal ([`Store`], [`SqliteStore`]) and
//! the hash-chained audit log ([`audit`]).
//!
//! Lifecycle driving, handover steps and gates build on these (DESIGN.md §4, §5).

pub mod audit;
pub mod domain;
pub mod engine;
pub mod sqlite;
pub mod store;

pub use audit::{
    AuditError, AuditEvent, AuditFilter, AuditKind, AuditRecord, ChainBreak, ChainHead,
    ChainProblem, Hash, VerifyReport,
};
pub use sqlite::{SCHEMA_VERSION, SqliteStore};
pub use store::{
    Assignment, Busy, DeviceRecord, DeviceState, GuidRange, GuidRecord, GuidState, JournalEntry,
    Operation, OperationId, Outcome, StateNonce, StepState, Store, StoreError, StoreExt, Tx,
};
