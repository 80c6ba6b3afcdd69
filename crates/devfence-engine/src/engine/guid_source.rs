//! Where fresh IB port GUIDs come from when they are not the ledger's own
//! pool: the seam through which a host in a fleet takes its GUIDs from the
//! fabric's shared pool (issue 13 item 1; devfence-fleet's etcd pool behind
//! it in devfence-app). The ledger still records every GUID it hands out
//! (issued, retired, foreign), as the journal of this host's operations.
//!
//! Fail closed: [`ready`](GuidSource::ready) is asked before an IB VF's
//! assign or handover opens its operation, so an unreachable source refuses
//! the operation before anything changes.

use devfence_model::Guid;

use super::Cause;

/// A source of fresh port GUIDs shared beyond this host.
pub trait GuidSource {
    /// What it is, for evidence and errors (e.g. `fleet pool of fabric ib0`).
    fn describe(&self) -> String;

    /// Whether the source can be used now (reachable, this host's session
    /// live): asked before an operation that needs it opens.
    ///
    /// # Errors
    /// Why not, with a hint.
    fn ready(&self) -> Result<(), GuidSourceError>;

    /// A fresh GUID never issued to anyone before (on any host); from now on
    /// it is this host's, and never issued again.
    ///
    /// # Errors
    /// The source cannot be reached or is exhausted.
    fn fresh(&self) -> Result<Guid, GuidSourceError>;

    /// Retires a GUID this host was issued: it is never issued again. A GUID
    /// the source never issued (a factory GUID, a local-pool GUID from before)
    /// is not an error.
    ///
    /// # Errors
    /// The source cannot be reached.
    fn retire(&self, guid: Guid) -> Result<(), GuidSourceError>;
}

/// Why a [`GuidSource`] could not answer.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct GuidSourceError {
    /// What failed.
    pub message: String,
    /// What to do.
    pub hint: String,
    /// The error it stems from.
    #[source]
    pub source: Option<Cause>,
}
