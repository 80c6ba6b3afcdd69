//! A fleet host's IB VF operations through the engine, end to end on real
//! components: a real 3-member etcd cluster, a real OpenSM on ibsim, the
//! simulated `lab` host whose IB VFs are nodes of that fabric, the fleet
//! backend ([`FleetSm`]) and the fleet's GUID pool ([`FleetGuids`]).
//!
//! The fabric controller is the real one ([`controller`]: devfence-fleet's
//! `Controller` on a thread of this process, applying to OpenSM through the
//! OpenSM backend and publishing observed entries). With it, assign and
//! handover pass every gate; with it stopped, the gate holds and the device
//! stays quarantined.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use devfence_app::fleet::FleetGuids;
use devfence_engine::engine::{Engine, EngineConfig, EngineError};
use devfence_engine::store::{DeviceState, GuidState, Partition, Tenant};
use devfence_engine::{SqliteStore, StoreExt};
use devfence_etcd_harness::{EtcdCluster, Options};
use devfence_fabric::opensm::{OpenSmSm, SaClient, SaConfig, port_tables};
use devfence_fabric::{PortReader, Programmed, SubnetManager};
use devfence_fabric_harness::{Fabric, FabricSpec, in_fabric};
use devfence_fleet::sm::FleetSm;
use devfence_fleet::value::{GuidRange, GuidState as PoolState, Name};
use devfence_fleet::{Controller, ControllerConfig, Fleet, FleetSettings, FleetStore};
use devfence_host::HostRoot;
use devfence_host::actuator::{Errno, GuidKind, KernelIo, NodeMeta, PfHandle};
use devfence_host::sim::{GenerateOptions, Profile, generate};
use devfence_host::simkernel::SimKernel;
use devfence_model::{Bdf, DeviceId, Guid, IommuGroupId, Membership, PKey, TenantId};

const POOL_FIRST: u64 = 0x0002_c903_00f0_0000;
/// The lab's CX-6 VFs' factory port GUIDs (VF indexes 0–3).
const FACTORY: [u64; 4] = [
    0x0c42_a103_4000_0000,
    0x0c42_a103_4000_0001,
    0x0c42_a103_4000_0002,
    0x0c42_a103_4000_0003,
];

fn spec() -> FabricSpec {
    let mut s = FabricSpec::vfs(0, Guid(1));
    s.ports = FACTORY
        .iter()
        .enumerate()
        .map(|(i, g)| (format!("vf{i}"), Guid(*g)))
        .collect();
    s
}

fn t(s: &str) -> TenantId {
    s.parse().unwrap()
}
fn name(s: &str) -> Name {
    s.parse().unwrap()
}
fn tenant(id: &str, uid: u32, pkey: u16) -> Tenant {
    Tenant {
        id: t(id),
        launcher_uid: Some(uid),
        launcher_gid: Some(uid),
        security_label: None,
        partitions: vec![Partition {
            pkey: PKey(pkey),
            membership: Membership::Full,
        }],
    }
}

/// The simulated kernel, with a VF's port GUID change mirrored onto the
/// fabric (a VF reset with a fresh GUID), as in the engine's OpenSM tests.
struct OnFabric<'a> {
    k: &'a SimKernel,
    f: &'a Fabric,
}

impl KernelIo for OnFabric<'_> {
    fn root(&self) -> &HostRoot {
        self.k.root()
    }
    fn write(&self, path: &str, value: &[u8]) -> Result<(), Errno> {
        self.k.write(path, value)
    }
    fn read(&self, path: &str) -> Result<Vec<u8>, Errno> {
        self.k.read(path)
    }
    fn read_each(&self, dir: &str, names: &[String]) -> Vec<Result<Vec<u8>, Errno>> {
        self.k.read_each(dir, names)
    }
    fn read_link(&self, path: &str) -> Result<String, Errno> {
        self.k.read_link(path)
    }
    fn exists(&self, path: &str) -> bool {
        self.k.exists(path)
    }
    fn chown(&self, path: &str, uid: u32, gid: u32) -> Result<(), Errno> {
        self.k.chown(path, uid, gid)
    }
    fn chmod(&self, path: &str, mode: u32) -> Result<(), Errno> {
        self.k.chmod(path, mode)
    }
    fn set_vf_guid(&self, pf: &str, vf: u32, kind: GuidKind, guid: Guid) -> Result<(), Errno> {
        self.k.set_vf_guid(pf, vf, kind, guid)?;
        if kind == GuidKind::Port {
            self.f
                .rotate(&format!("vf{vf}"), guid)
                .map_err(|_| Errno(5))?;
        }
        Ok(())
    }
    fn open_pf(&self, pf: Bdf, group: IommuGroupId) -> Result<Box<dyn PfHandle>, Errno> {
        self.k.open_pf(pf, group)
    }
    fn list_dir(&self, path: &str) -> Result<Vec<String>, Errno> {
        self.k.list_dir(path)
    }
    fn stat(&self, path: &str) -> Result<NodeMeta, Errno> {
        self.k.stat(path)
    }
}

fn settings(c: &EtcdCluster) -> FleetSettings {
    let mut s = FleetSettings::plaintext(c.endpoints(), "dft", "ib0").unwrap();
    s.timeout = Duration::from_secs(3);
    // Long enough that a loaded 2-core machine does not lose the lease
    // mid-test (a lost lease fails closed: see tests/fleet_host.rs).
    s.lease_ttl = Duration::from_secs(15);
    s
}

/// The fabric controller — the real one ([`Controller`], issue 13 item 2) — in
/// this process on its own runtime, driving OpenSM through `opensm`, until
/// `stop`; then it resigns.
fn controller(etcd: &EtcdCluster, opensm: Arc<dyn SubnetManager>, stop: &AtomicBool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let s = settings(etcd);
    let store = rt.block_on(FleetStore::connect(s.clone())).unwrap();
    let mut cfg = ControllerConfig::new(name("ctl"), &s);
    cfg.poll_interval = Duration::from_millis(50);
    let ctl = Arc::new(Controller::new(store, opensm, cfg));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let c2 = Arc::clone(&ctl);
    let task = rt.spawn(async move { c2.run(rx).await });
    // Pace only: the stop flag is looked at, nothing is decided by time.
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = tx.send(true);
    rt.block_on(task).unwrap().unwrap();
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn issued(store: &mut SqliteStore, d: &DeviceId) -> Guid {
    let g: Vec<Guid> = store
        .atomically(|tx| tx.guids_of(d))
        .unwrap()
        .into_iter()
        .filter(|r| r.state == GuidState::Issued)
        .map(|r| r.guid)
        .collect();
    assert_eq!(g.len(), 1, "{g:?}");
    g[0]
}

fn table(sa: &SaClient, g: Guid) -> Option<BTreeSet<PKey>> {
    match sa.read_port(g).unwrap() {
        Programmed::Present { pkeys, .. } => Some(pkeys),
        Programmed::Absent => None,
    }
}

/// A fleet host's IB VF assigned to acme and handed over to globex through
/// the engine with the fleet backend: GUIDs from the fleet's pool, desired
/// in etcd, every gate verified against observed and the SA. With the
/// controller stopped, the next handover's gate holds and the VF stays
/// quarantined.
#[test]
fn a_fleet_hosts_handover_passes_its_gates_only_with_the_controller_and_the_sa() {
    in_fabric(
        "a_fleet_hosts_handover_passes_its_gates_only_with_the_controller_and_the_sa",
        &spec(),
        |f| {
            let etcd = EtcdCluster::start(&Options::default()).expect("etcd cluster starts");
            let admin = Fleet::connect(settings(&etcd)).unwrap();
            admin
                .configure_guid_range(GuidRange {
                    first: Guid(POOL_FIRST),
                    last: Guid(POOL_FIRST + 0xffff),
                })
                .unwrap();
            admin.claim_pkey(&t("acme"), PKey(0x8001)).unwrap();
            admin.claim_pkey(&t("globex"), PKey(0x8002)).unwrap();

            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("host");
            generate(&GenerateOptions {
                profile: Profile::Lab,
                out: root.clone(),
                vfs: None,
                host_id: 0,
            })
            .unwrap();
            let kernel = SimKernel::new(HostRoot::new(root)).unwrap();
            // One SA client per process (umad2sim).
            let sa = Arc::new(SaClient::new(SaConfig::default()));
            kernel.set_port_table_source(Arc::new(port_tables(
                Arc::clone(&sa) as Arc<dyn PortReader>,
                Some(f.opensm_config().log_file),
            )));
            let io = OnFabric { k: &kernel, f };
            let mut store = SqliteStore::open(dir.path().join("ledger.db")).unwrap();
            store
                .atomically(|tx| {
                    tx.add_tenant(&tenant("acme", 107, 0x8001))?;
                    tx.add_tenant(&tenant("globex", 108, 0x8002))
                })
                .unwrap();
            let fleet = Arc::new(Fleet::connect(settings(&etcd)).unwrap());
            let h1 = name("h1");
            let fsm = FleetSm::register(
                Arc::clone(&fleet),
                &h1,
                Box::new(Arc::clone(&sa)),
                Duration::from_secs(5),
            )
            .unwrap();
            let src = FleetGuids::of(&fsm);
            let opensm: Arc<dyn SubnetManager> = Arc::new(OpenSmSm::with_port_reader(
                f.opensm_config(),
                Box::new(Arc::clone(&sa)),
            ));
            let stop = AtomicBool::new(false);
            let vf = DeviceId::Pci("0000:3b:00.1".parse().unwrap());
            let cfg = |s| EngineConfig {
                gate_deadline: Duration::from_secs(s),
                ..EngineConfig::default()
            };

            std::thread::scope(|s| {
                let ctl = s.spawn(|| controller(&etcd, Arc::clone(&opensm), &stop));
                // The controller stops however this body ends (a failed
                // assertion must not leave the scope waiting for it).
                let _stop = StopOnDrop(&stop);
                let a = Engine::new(&mut store, &io, &fsm, cfg(20))
                    .with_guid_source(&src)
                    .assign(&vf, &t("acme"), None)
                    .unwrap();
                assert!(matches!(a.state, DeviceState::Ready { .. }), "{a:?}");
                let acme = issued(&mut store, &vf);
                assert_eq!(
                    table(&sa, acme).unwrap(),
                    BTreeSet::from([PKey(0x7fff), PKey(0x8001)])
                );
                let mut e = Engine::new(&mut store, &io, &fsm, cfg(20)).with_guid_source(&src);
                let h = e.handover(&vf, &t("globex"), None).unwrap();
                // The fleet's pool gives the fresh GUID, so the old GUID
                // leaves acme and the new one enters globex in one apply (one
                // sweep), as with the ledger's own pool.
                assert_eq!(e.sm_applies(), 1, "{h:?}");
                drop(e);
                assert!(matches!(h.state, DeviceState::Ready { .. }), "{h:?}");
                let globex = issued(&mut store, &vf);
                assert_ne!(globex, acme);
                assert_eq!(table(&sa, acme), None, "acme's GUID left the fabric");
                assert_eq!(
                    table(&sa, globex).unwrap(),
                    BTreeSet::from([PKey(0x7fff), PKey(0x8002)])
                );
                // The pool: both GUIDs this host's; acme's retired.
                let pool = admin.guids().unwrap();
                let state = |g: Guid| pool.iter().find(|(x, _)| *x == g).map(|(_, r)| r.clone());
                assert_eq!(state(acme).unwrap().state, PoolState::Retired);
                assert_eq!(state(globex).unwrap().state, PoolState::Allocated);
                assert_eq!(state(globex).unwrap().host, h1);
                // The controller stops: the next handover's gate holds.
                stop.store(true, Ordering::SeqCst);
                ctl.join().unwrap();
                let e = Engine::new(&mut store, &io, &fsm, cfg(2))
                    .with_guid_source(&src)
                    .handover(&vf, &t("acme"), None)
                    .expect_err("no controller, no verified membership");
                match &e {
                    EngineError::Failed { step, state, .. } => {
                        // The handover's one fabric gate (the old GUID out,
                        // the new one in, the sweep) holds: the controller
                        // never answered the host's desired writes.
                        assert_eq!(step, "gate:sm-verified", "{e}");
                        assert!(e.to_string().contains("Q3"), "{e}");
                        assert!(state.contains("quarantined"), "{e}");
                    }
                    other => panic!("{other:?}"),
                }
            });
        },
    );
}
