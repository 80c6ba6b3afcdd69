//! `devfence tenant`: the tenants of the ledger.

use devfence_engine::engine::{Engine, EngineError};
use devfence_engine::store::{Store, StoreError, StoreExt, Tenant};
use devfence_engine::{AuditEvent, AuditKind};
use devfence_model::TenantId;

/// Adds a tenant (validated and audited by the engine).
///
/// # Errors
/// The engine refuses it (a duplicate, a P_Key another tenant holds…).
pub fn add(engine: &mut Engine<'_>, tenant: &Tenant) -> Result<(), EngineError> {
    engine.add_tenant(tenant)
}

/// Every tenant of the ledger.
///
/// # Errors
/// The ledger cannot be read.
pub fn list(store: &mut dyn Store) -> Result<Vec<Tenant>, StoreError> {
    store.atomically(|tx| tx.tenants())
}

/// Removes a tenant, audited, in one transaction.
///
/// # Errors
/// The ledger refuses (unknown tenant, devices still held) or fails.
pub fn remove(store: &mut dyn Store, id: &TenantId) -> Result<(), StoreError> {
    store.atomically(|tx| {
        tx.remove_tenant(id)?;
        tx.audit(&AuditEvent {
            kind: AuditKind::Ledger,
            device: None,
            tenant: Some(id.clone()),
            detail: serde_json::json!({ "action": "tenant-remove" }),
        })?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfence_engine::SqliteStore;

    #[test]
    fn a_removed_tenant_is_gone_and_the_removal_audited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("ledger.db")).expect("ledger");
        let id: TenantId = "acme".parse().expect("id");
        store
            .atomically(|tx| {
                tx.add_tenant(&Tenant {
                    id: id.clone(),
                    launcher_uid: Some(107),
                    launcher_gid: Some(107),
                    security_label: None,
                    partitions: Vec::new(),
                })
            })
            .expect("add");
        assert_eq!(list(&mut store).expect("list").len(), 1);
        remove(&mut store, &id).expect("remove");
        assert!(list(&mut store).expect("list").is_empty());
        assert!(
            remove(&mut store, &id).is_err(),
            "an unknown tenant is refused"
        );
        store.verify().expect("the audit chain verifies");
    }
}
