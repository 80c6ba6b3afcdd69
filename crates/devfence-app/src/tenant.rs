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
    // A host of a fleet: a partition belongs to one tenant per fabric, so the
    // tenant's partitions are claimed for it first (fail closed: another
    // tenant's partition, or etcd unreachable, refuses the add).
    if let Some(h) = crate::fleet::registered() {
        for p in &tenant.partitions {
            if devfence_fabric::PartitionKey::new(p.pkey.0).is_err() {
                continue;
            }
            h.fleet
                .claim_pkey(&tenant.id, p.pkey)
                .map_err(|e| EngineError::Refused {
                    device: None,
                    reason: e.to_string(),
                    hint: "a partition belongs to one tenant per fabric: give this tenant partitions of its own; if etcd did not answer, retry when it is healthy".into(),
                })?;
        }
    }
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

/// What [`import`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Imported {
    /// Tenants added to the ledger.
    pub added: Vec<TenantId>,
    /// Tenants the ledger had already, exactly as in the file.
    pub unchanged: Vec<TenantId>,
    /// Device assignments of the file, not imported: a device enters the ledger
    /// only through `devfence assign`, which verifies it.
    pub assignments_not_imported: usize,
}

/// `tenant import FILE`: seeds the ledger with the tenants of a tenancy file,
/// all or none, in one transaction (each added tenant audited). A tenant the
/// ledger has with other values is refused: nothing is changed.
///
/// # Errors
/// The file is refused; a tenant of it differs from the ledger's; the ledger
/// refuses one (a P_Key or launcher uid another tenant holds).
pub fn import(store: &mut dyn Store, path: &std::path::Path) -> crate::Result<Imported> {
    let tenancy = devfence_policy::load_tenancy(path)?;
    let out = store.atomically(|tx| {
        let mut out = Imported {
            assignments_not_imported: tenancy.assignments.len(),
            ..Imported::default()
        };
        let have = tx.tenants()?;
        for t in &tenancy.tenants {
            match have.iter().find(|h| h.id == t.id) {
                Some(h) if h == t => out.unchanged.push(t.id.clone()),
                Some(_) => {
                    return Err(StoreError::InvalidTenant {
                        tenant: t.id.clone(),
                        reason: "the ledger has this tenant with other values (launcher, label or partitions)".into(),
                        hint: "compare `devfence tenant list` with the file; remove the tenant from the ledger first (it must hold no device) or fix the file",
                    });
                }
                None => {
                    tx.add_tenant(t)?;
                    tx.audit(&AuditEvent {
                        kind: AuditKind::Ledger,
                        device: None,
                        tenant: Some(t.id.clone()),
                        detail: serde_json::json!({ "action": "tenant-import", "tenant": t, "file": path.display().to_string() }),
                    })?;
                    out.added.push(t.id.clone());
                }
            }
        }
        Ok(out)
    })?;
    Ok(out)
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
