//! `devfence audit`: the chain's head, its verification (against the head kept
//! beside the ledger, signed with this host's key, and a head the operator
//! kept elsewhere), retention, and the records of a device or tenant.

use devfence_engine::audit::{PruneCut, PruneReport, StoredHead};
use devfence_engine::{
    AuditError, AuditFilter, AuditRecord, ChainHead, SqliteStore, Store, VerifyReport,
};
use devfence_host::HostRoot;

use crate::error::{AppError, Result};

/// The chain's head as the ledger has it and as it is kept beside the ledger.
#[derive(Debug)]
pub struct Head {
    /// The newest record (`None`: no record yet).
    pub head: Option<ChainHead>,
    /// The head file beside the ledger, if any.
    pub stored: Option<StoredHead>,
}

/// `audit head`.
///
/// # Errors
/// The ledger or the head file cannot be read.
pub fn head(store: &SqliteStore) -> Result<Head> {
    let head = store.last_record()?;
    let stored = devfence_engine::audit::read_head(&store.head_path()).map_err(|e| {
        AppError::invalid(format!(
            "{e}. Hint: `devfence audit verify` says what is wrong"
        ))
    })?;
    Ok(Head { head, stored })
}

/// What `audit verify` found.
#[derive(Debug)]
pub enum Verified {
    /// Intact: every record links, and the chain reaches the stored head
    /// (and the head given).
    Intact {
        /// The chain.
        report: VerifyReport,
        /// The head kept beside the ledger.
        stored: Option<StoredHead>,
    },
    /// Broken: where and how.
    Broken(AuditError),
}

/// `audit verify`: the chain, the head beside the ledger (its signature by this
/// host's key) and, if given, a head kept elsewhere.
///
/// # Errors
/// The ledger or the keys cannot be read (a broken chain is
/// [`Verified::Broken`], not an error).
pub fn verify(
    root: &HostRoot,
    store: &mut SqliteStore,
    external: Option<&ChainHead>,
) -> Result<Verified> {
    let check = crate::env::check_head_signature(root)?;
    match store.verify_with_head(external, &check) {
        Ok((report, stored)) => Ok(Verified::Intact { report, stored }),
        Err(e @ AuditError::ChainBroken(_)) => Ok(Verified::Broken(e)),
        Err(e) => Err(e.into()),
    }
}

/// `audit prune`: drops the records before the cut, keeping the chain's
/// anchor (the head stays verifiable).
///
/// # Errors
/// The chain does not verify; the ledger cannot be written.
pub fn prune(root: &HostRoot, store: &mut SqliteStore, cut: PruneCut) -> Result<PruneReport> {
    let check = crate::env::check_head_signature(root)?;
    Ok(store.audit_prune(cut, &check)?)
}

/// `audit show`: the records `filter` selects, oldest first.
///
/// # Errors
/// The ledger cannot be read.
pub fn show(store: &mut dyn Store, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
    Ok(store.audit_show(filter)?)
}
