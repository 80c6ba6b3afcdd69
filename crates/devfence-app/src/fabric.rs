//! The fabric as the ledger sees it: the view of what devfence holds on the
//! fabric, and the posture findings of the configured subnet manager against it.

use devfence_engine::GuidState;
use devfence_engine::store::{Store, StoreError, StoreExt};
use devfence_fabric::posture::{LedgerGuid, LedgerView, posture};
use devfence_fabric::{Change, FabricError, Health, Observation, SubnetManager, Ticket};
use devfence_model::{Finding, Guid, Severity};

/// The SM of a host with no SM configured: every call is a clear error.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSm;

impl NoSm {
    fn err() -> FabricError {
        FabricError::Refused {
            backend: "none".into(),
            detail: "no subnet manager is configured on this host".into(),
            hint: "select one in /etc/devfence/devfence.toml ([fabric] backend = \"opensm\" or \"ufm\"; \
                   see `man devfence`); devices other than IB VFs need none"
                .into(),
        }
    }
}

impl SubnetManager for NoSm {
    fn backend(&self) -> &str {
        "none"
    }
    fn stage(&self, _: Change) -> Result<(), FabricError> {
        Err(Self::err())
    }
    fn discard_staged(&self) -> usize {
        0
    }
    fn apply(&self) -> Result<Ticket, FabricError> {
        Err(Self::err())
    }
    fn observe(&self, _: &[Guid]) -> Result<Observation, FabricError> {
        Err(Self::err())
    }
    fn health(&self) -> Result<Health, FabricError> {
        Err(Self::err())
    }
}

/// What the ledger holds on the fabric: each tenant's P_Keys and every GUID
/// issued and not retired, with its device and tenant.
///
/// # Errors
/// The ledger cannot be read.
pub fn ledger_view(store: &mut dyn Store) -> Result<LedgerView, StoreError> {
    let mut view = LedgerView::default();
    let (tenants, devices) = store.atomically(|tx| Ok((tx.tenants()?, tx.devices()?)))?;
    for t in &tenants {
        for p in &t.partitions {
            view.tenant_pkeys.insert(p.pkey.base(), t.id.to_string());
        }
    }
    for d in &devices {
        let recs = store.atomically(|tx| tx.guids_of(&d.device))?;
        for r in recs {
            if r.state == GuidState::Issued {
                view.guids.push(LedgerGuid {
                    guid: r.guid,
                    device: d.device.to_string(),
                    tenant: d.state.tenant().map(ToString::to_string),
                });
            }
        }
    }
    Ok(view)
}

/// `check --fabric`: the posture of the fabric at `sm` against what the
/// ledger holds (`view`; empty without a ledger), and the restores the backend
/// made after the SM could not parse its configuration (issue 17 item 2).
#[must_use]
pub fn fabric_findings(sm: &dyn SubnetManager, view: &LedgerView) -> Vec<Finding> {
    let guids: Vec<Guid> = view.guids.iter().map(|g| g.guid).collect();
    let observed = sm.observe(&guids);
    let configured = sm.configured_members();
    let mut out = posture(
        sm.backend(),
        configured.as_ref().map(Option::as_deref),
        observed.as_ref(),
        view,
    );
    if let Ok(h) = sm.health() {
        for n in h
            .notes
            .iter()
            .filter(|n| n.starts_with(devfence_fabric::opensm::RESTORE_NOTE))
        {
            out.push(Finding {
                rule: "FAB-RESTORED".into(),
                severity: if h.is_healthy() {
                    Severity::Warning
                } else {
                    Severity::Error
                },
                subject: sm.backend().into(),
                message: n.clone(),
                evidence: Vec::new(),
                hint: "the SM could not parse its partitions file and devfence restored it; find who wrote the refused file (kept beside it as .devfence-rejected)".into(),
            });
        }
    }
    out
}

/// `check --fabric`: the fabric posture at the SM the configuration selects,
/// against the ledger; with the notices opening the environment produced.
///
/// Read-only: without a ledger devfence holds nothing on the fabric, and the
/// posture is the SM's own (a failed sweep, the default partition); `check`
/// never creates a ledger.
///
/// # Errors
/// The configuration, the ledger, the kernel or the SM cannot be opened.
pub fn check_fabric(
    root: &devfence_host::HostRoot,
    ledger: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
) -> crate::Result<(Vec<Finding>, Vec<String>)> {
    use crate::env::{Env, Kernel, ledger_path, open_sm};
    if ledger_path(root, ledger)?.symlink_metadata().is_ok() {
        let mut env = Env::open(root, ledger, config)?;
        let view = ledger_view(&mut env.store)?;
        let findings = fabric_findings(env.sm(), &view);
        Ok((findings, std::mem::take(&mut env.notices)))
    } else {
        let kernel = Kernel::for_root(root)?;
        let cfg = crate::config::Config::load(root, config)?;
        let sm = open_sm(root, &kernel, &cfg, || Ok(Vec::new()))?;
        Ok((fabric_findings(&*sm, &LedgerView::default()), Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_sm_refuses_everything_with_a_hint() {
        let sm = NoSm;
        let e = sm.observe(&[Guid(1)]).expect_err("refused");
        assert!(
            e.to_string().contains("no subnet manager is configured"),
            "{e}"
        );
        assert!(sm.apply().is_err());
        assert_eq!(sm.discard_staged(), 0);
        assert_eq!(sm.backend(), "none");
    }

    #[test]
    fn the_view_holds_the_tenants_pkeys_and_only_issued_guids() {
        use devfence_engine::SqliteStore;
        use devfence_engine::store::{DeviceState, GuidRange};
        use devfence_model::{Bdf, DeviceId, Membership, PKey, Partition, Tenant, TenantId};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("ledger.db")).expect("ledger");
        let acme: TenantId = "acme".parse().expect("tenant");
        let vf = DeviceId::Pci("0000:03:00.2".parse::<Bdf>().expect("bdf"));
        let (g1, g2) = store
            .atomically(|tx| {
                tx.add_tenant(&Tenant {
                    id: acme.clone(),
                    launcher_uid: Some(1000),
                    launcher_gid: Some(1000),
                    security_label: None,
                    partitions: vec![Partition {
                        pkey: PKey(0x8001),
                        membership: Membership::Full,
                    }],
                })?;
                tx.set_guid_pool(GuidRange {
                    first: Guid(0x10),
                    last: Guid(0x20),
                })?;
                tx.add_device(&vf)?;
                tx.set_device_state(
                    &vf,
                    &DeviceState::Free,
                    &DeviceState::Preparing {
                        tenant: acme.clone(),
                        vm: None,
                    },
                )?;
                let g1 = tx.allocate_guid(&vf, &acme)?;
                let g2 = tx.allocate_guid(&vf, &acme)?;
                tx.retire_guid(g1, "test")?;
                Ok((g1, g2))
            })
            .expect("ledger");
        let view = ledger_view(&mut store).expect("view");
        assert_eq!(
            view.tenant_pkeys.get(&0x0001).map(String::as_str),
            Some("acme")
        );
        let guids: Vec<Guid> = view.guids.iter().map(|g| g.guid).collect();
        assert_eq!(guids, vec![g2], "retired {g1} is not held");
        assert_eq!(view.guids[0].tenant.as_deref(), Some("acme"));
        assert_eq!(view.guids[0].device, vf.to_string());
    }
}
