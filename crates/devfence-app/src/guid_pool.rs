//! `devfence guid-pool`: the range the ledger issues IB VF GUIDs from.

use std::collections::BTreeMap;

use devfence_engine::store::{GuidRange, Store, StoreError, StoreExt};
use devfence_engine::{AuditEvent, AuditKind};
use devfence_fabric::SubnetManager;
use devfence_model::{Guid, Inventory};

/// Every GUID live where devfence can see it — on a VF or IB port of the host
/// (`inv`), or named in the SM's configuration — with where.
#[must_use]
pub fn live_guids(inv: &Inventory, sm: &dyn SubnetManager) -> BTreeMap<Guid, String> {
    let mut out = BTreeMap::new();
    for f in &inv.pci {
        for v in f.sriov.iter().flat_map(|s| &s.vf_guids) {
            for g in [v.port_guid, v.node_guid].into_iter().flatten() {
                out.entry(g)
                    .or_insert_with(|| format!("on VF {} of {}", v.index, f.bdf));
            }
        }
    }
    for d in &inv.ib {
        for g in d
            .node_guid
            .into_iter()
            .chain(d.ports.iter().filter_map(|p| p.port_guid))
        {
            out.entry(g).or_insert_with(|| format!("on {}", d.name));
        }
    }
    if let Ok(Some(c)) = sm.configured_members() {
        for m in c {
            if let devfence_fabric::posture::Member::Guid(g) = m.member {
                out.entry(g)
                    .or_insert_with(|| format!("in the SM's configuration ({})", m.source));
            }
        }
    }
    out
}

/// Sets the pool to `range` in one transaction (audited). The GUIDs of the
/// range that are `live` are marked used, never issued (allocation checks
/// again, at the SM too); they are returned with where they are live.
///
/// # Errors
/// The ledger refuses or fails (nothing is changed).
pub fn set_pool(
    store: &mut dyn Store,
    range: GuidRange,
    live: &BTreeMap<Guid, String>,
) -> Result<Vec<(Guid, String)>, StoreError> {
    let marked: Vec<(Guid, String)> = live
        .iter()
        .filter(|(g, _)| (range.first..=range.last).contains(*g))
        .map(|(g, w)| (*g, w.clone()))
        .collect();
    store.atomically(|tx| {
        tx.set_guid_pool(range)?;
        for (g, w) in &marked {
            tx.record_foreign_guid(*g, &format!("live {w} when the pool was set"))?;
        }
        tx.audit(&AuditEvent {
            kind: AuditKind::Ledger,
            device: None,
            tenant: None,
            detail: serde_json::json!({ "action": "guid-pool-set", "first": range.first, "last": range.last }),
        })?;
        Ok(())
    })?;
    Ok(marked)
}

/// `guid-pool --set`: sets the pool to `range`, marking every GUID of it that
/// is live on this host or known to the SM as used (never issued); returns
/// those, with where each was seen.
///
/// # Errors
/// The host or the ledger cannot be read; the range is refused.
pub fn set_from_host(
    env: &mut crate::env::Env,
    range: GuidRange,
) -> crate::Result<Vec<(Guid, String)>> {
    let inv = crate::check::inventory(&env.root, false)?;
    let live = live_guids(&inv, &*env.sm);
    Ok(set_pool(&mut env.store, range, &live)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfence_engine::SqliteStore;
    use devfence_engine::store::GuidState;

    #[test]
    fn live_guids_in_the_range_are_marked_used_and_never_issued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("ledger.db")).expect("ledger");
        let live: BTreeMap<Guid, String> = [
            (Guid(0x12), "on mlx5_0".to_owned()),
            (Guid(0x99), "on mlx5_1".to_owned()),
        ]
        .into();
        let range = GuidRange {
            first: Guid(0x10),
            last: Guid(0x20),
        };
        let marked = set_pool(&mut store, range, &live).expect("set");
        assert_eq!(marked, vec![(Guid(0x12), "on mlx5_0".to_owned())]);
        let (pool, rec, other) = store
            .atomically(|tx| Ok((tx.guid_pool()?, tx.guid(Guid(0x12))?, tx.guid(Guid(0x99))?)))
            .expect("read");
        assert_eq!(pool, Some(range));
        assert!(rec.is_some_and(|r| r.state != GuidState::Issued));
        assert!(other.is_none(), "outside the range: not recorded");
    }
}
