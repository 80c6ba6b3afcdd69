//! The lifecycle use cases: assign, hand over, release, plan, recover and the
//! host's status, each a typed request in and a typed result out. The caller
//! opens the environment (ledger, kernel, SM) and renders the result.

use devfence_engine::engine::{
    BatchItem, BatchReport, BatchSummary, Done, Engine, EngineError, ItemResult, PlannedStep,
    Recovered,
};
use devfence_host::HostRoot;
use devfence_host::readback::ReadBack;

use crate::{Actor, Kernel};
use devfence_engine::store::{DeviceRecord, GuidRange, Operation, Store, StoreError, StoreExt};
use devfence_fabric::{FabricError, Health, SubnetManager};
use devfence_model::{DeviceId, TenantId};

/// An operation that moves a device through its lifecycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// A free device to a tenant (`devfence assign`).
    Assign {
        /// The device.
        device: DeviceId,
        /// The tenant.
        tenant: TenantId,
        /// The VM it is reserved for, if any.
        vm: Option<String>,
    },
    /// A held device to another tenant (`devfence handover`).
    Handover {
        /// The device.
        device: DeviceId,
        /// The new tenant.
        to: TenantId,
        /// The VM it is reserved for, if any.
        vm: Option<String>,
    },
    /// A device back to free (`devfence release`).
    Release {
        /// The device.
        device: DeviceId,
    },
}

/// Runs the operation `req` asks for.
///
/// # Errors
/// The engine's refusal or failure (a failed device is left quarantined).
pub fn run(engine: &mut Engine<'_>, req: &Request) -> Result<Done, EngineError> {
    match req {
        Request::Assign { device, tenant, vm } => engine.assign(device, tenant, vm.as_deref()),
        Request::Handover { device, to, vm } => engine.handover(device, to, vm.as_deref()),
        Request::Release { device } => engine.release(device),
    }
}

impl Request {
    /// The device it acts on.
    #[must_use]
    pub fn device(&self) -> &DeviceId {
        match self {
            Request::Assign { device, .. }
            | Request::Handover { device, .. }
            | Request::Release { device } => device,
        }
    }

    fn batch_item(&self) -> BatchItem {
        match self {
            Request::Assign { device, tenant, vm } => {
                BatchItem::assign(*device, tenant.clone(), vm.clone())
            }
            Request::Handover { device, to, vm } => {
                BatchItem::handover(*device, to.clone(), vm.clone())
            }
            Request::Release { device } => BatchItem::release(*device),
        }
    }
}

/// Runs `reqs` as one batch (issue 12 item 5): the IB VF operations among them
/// go to the SM as one apply (one sweep), each passing its own gates; the others
/// run one by one after it. Each request's audit records name its actor.
pub fn run_batch(engine: &mut Engine<'_>, reqs: &[(Request, Option<Actor>)]) -> BatchReport {
    engine.run_batch(&batch_items(reqs))
}

/// As [`run_batch`], handing each request's result to `on_result` as soon as it
/// is done.
pub fn run_batch_with(
    engine: &mut Engine<'_>,
    reqs: &[(Request, Option<Actor>)],
    on_result: &mut dyn FnMut(ItemResult<'_>),
) -> BatchSummary {
    engine.run_batch_with(&batch_items(reqs), on_result)
}

fn batch_items(reqs: &[(Request, Option<Actor>)]) -> Vec<BatchItem> {
    reqs.iter()
        .map(|(r, a)| {
            r.batch_item()
                .by(a.as_ref().and_then(|a| serde_json::to_value(a).ok()))
        })
        .collect()
}

/// Whether `req` is about an InfiniBand VF (a VF whose PF shows OFED's
/// `sriov/<N>/port` or has an IB device): a cheap look for a front end that
/// collects such requests into batches. Only a hint: [`run_batch`] classifies
/// every device from the host's inventory again and runs anything that cannot
/// share an apply on its own.
#[must_use]
pub fn may_share_an_apply(root: &HostRoot, req: &Request) -> bool {
    let DeviceId::Pci(bdf) = req.device() else {
        return false;
    };
    let Ok(k) = Kernel::for_root(root) else {
        return false;
    };
    let io = k.io();
    match ReadBack::new(io).vf_guid_at_pf(*bdf) {
        Ok((_, port)) => {
            io.exists(&port)
                || port
                    .split_once("/sriov/")
                    .is_some_and(|(pf, _)| io.exists(&format!("{pf}/infiniband")))
        }
        Err(_) => false,
    }
}

/// What `devfence plan` asks: the steps an operation on `device` would run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanRequest {
    /// The device.
    pub device: DeviceId,
    /// The tenant it would go to (assign or handover); `None`: a release.
    pub to: Option<TenantId>,
}

/// The steps and gates the operation would run, in order; nothing is done.
///
/// # Errors
/// The device or tenant is unknown, or the host cannot be read.
pub fn plan(engine: &mut Engine<'_>, req: &PlanRequest) -> Result<Vec<PlannedStep>, EngineError> {
    engine.plan(&req.device, req.to.as_ref())
}

/// Scrubs every operation a dead process left unfinished.
///
/// # Errors
/// The ledger fails.
pub fn recover(engine: &mut Engine<'_>) -> Result<Vec<Recovered>, EngineError> {
    engine.recover()
}

/// The host's state as the ledger and the SM show it (`devfence status`).
#[derive(Debug)]
pub struct Status {
    /// Every device of the ledger with its state.
    pub devices: Vec<DeviceRecord>,
    /// Operations begun and not finished.
    pub open_operations: Vec<Operation>,
    /// The GUID pool, if set.
    pub guid_pool: Option<GuidRange>,
    /// The SM's backend.
    pub sm_backend: String,
    /// The SM's health, or why it cannot be read.
    pub health: Result<Health, FabricError>,
}

/// Reads the host's status from the ledger (one transaction) and the SM.
///
/// # Errors
/// The ledger cannot be read (an SM that does not answer is part of the status).
pub fn status(store: &mut dyn Store, sm: &dyn SubnetManager) -> Result<Status, StoreError> {
    let (devices, open_operations, guid_pool) =
        store.atomically(|tx| Ok((tx.devices()?, tx.open_operations()?, tx.guid_pool()?)))?;
    Ok(Status {
        devices,
        open_operations,
        guid_pool,
        sm_backend: sm.backend().to_owned(),
        health: sm.health(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::NoSm;
    use devfence_engine::SqliteStore;
    use devfence_engine::store::DeviceState;
    use devfence_model::Bdf;

    /// issue 12 item 5: the agent's cheap look picks the IB VFs of a host and
    /// nothing else.
    #[test]
    fn only_ib_vfs_may_share_an_apply() {
        use devfence_host::sim;
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("host");
        sim::generate(&sim::GenerateOptions {
            profile: sim::Profile::Lab,
            out: out.clone(),
            vfs: None,
            host_id: 0,
        })
        .expect("simulated host");
        let root = HostRoot::new(&out);
        let req = |d: &str| Request::Release {
            device: DeviceId::Pci(d.parse::<Bdf>().expect("bdf")),
        };
        for ib in ["0000:3b:00.1", "0000:3b:00.4"] {
            assert!(may_share_an_apply(&root, &req(ib)), "{ib}");
        }
        // An igb VF, the IB PF itself, a function that is not there.
        for other in ["0000:5e:10.0", "0000:3b:00.0", "0000:99:00.1"] {
            assert!(!may_share_an_apply(&root, &req(other)), "{other}");
        }
        // Not a host at all.
        let none = HostRoot::new(dir.path().join("nothing"));
        assert!(!may_share_an_apply(&none, &req("0000:3b:00.1")));
    }

    #[test]
    fn status_reads_the_ledger_and_says_why_the_sm_cannot_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("ledger.db")).expect("ledger");
        let d = DeviceId::Pci("0000:03:00.2".parse::<Bdf>().expect("bdf"));
        store
            .atomically(|tx| {
                tx.add_device(&d)?;
                tx.set_guid_pool(GuidRange {
                    first: devfence_model::Guid(1),
                    last: devfence_model::Guid(9),
                })
            })
            .expect("ledger");
        let s = status(&mut store, &NoSm).expect("status");
        assert_eq!(s.devices.len(), 1);
        assert_eq!(s.devices[0].device, d);
        assert_eq!(s.devices[0].state, DeviceState::Free);
        assert!(s.open_operations.is_empty());
        assert_eq!(s.guid_pool.map(|p| p.last), Some(devfence_model::Guid(9)));
        assert_eq!(s.sm_backend, "none");
        assert!(s.health.is_err());
    }
}
