//! The host side of a fleet through the engine (issue 13 item 1) on a real
//! 3-member etcd cluster (devfence-etcd-harness): simulated hosts (the `lab`
//! profile, their simulated kernel and SM) take their IB VFs' fresh GUIDs from
//! the fabric's shared pool in etcd ([`FleetGuids`]); the ledger records each.
//! With the cluster stopped, IB VF operations are refused before anything
//! changes, and the host's status still reads.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devfence_app::fleet::FleetGuids;
use devfence_engine::engine::{Engine, EngineConfig, EngineError};
use devfence_engine::store::{DeviceState, GuidState, Tenant};
use devfence_engine::{SqliteStore, StoreExt};
use devfence_etcd_harness::{EtcdCluster, Options};
use devfence_fabric::{SimConfig, SimSm};
use devfence_fleet::value::{GuidRange, GuidState as PoolState, Name};
use devfence_fleet::{Fleet, FleetSettings};
use devfence_host::HostRoot;
use devfence_host::sim::{GenerateOptions, Profile, generate};
use devfence_host::simkernel::SimKernel;
use devfence_model::{DeviceId, Guid, Membership, PKey, Partition, TenantId};

const FIRST: u64 = 0x0002_c903_0a00_0000;
/// The lab profile's IB VFs.
const IB_VFS: [&str; 4] = [
    "0000:3b:00.1",
    "0000:3b:00.2",
    "0000:3b:00.3",
    "0000:3b:00.4",
];

fn t(s: &str) -> TenantId {
    s.parse().unwrap()
}
fn dev(s: &str) -> DeviceId {
    DeviceId::Pci(s.parse().unwrap())
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

/// A simulated lab host with its own simulated SM and ledger. The ledger has
/// **no** GUID pool of its own: every GUID must come from the fleet.
struct SimHost {
    _dir: tempfile::TempDir,
    kernel: SimKernel,
    sm: Arc<SimSm>,
    store: SqliteStore,
}

fn sim_host() -> SimHost {
    let base = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let dir = tempfile::Builder::new()
        .prefix("devfence-fleet-host-")
        .tempdir_in(base)
        .unwrap();
    let host = dir.path().join("host");
    generate(&GenerateOptions {
        profile: Profile::Lab,
        out: host.clone(),
        vfs: None,
        host_id: 0,
    })
    .unwrap();
    let kernel = SimKernel::new(HostRoot::new(host)).unwrap();
    let sm = Arc::new(SimSm::real_time(SimConfig {
        lag: Duration::ZERO,
        sweep_time: Duration::ZERO,
        ..SimConfig::default()
    }));
    let s2 = Arc::clone(&sm);
    kernel.set_port_table_source(Arc::new(move |g: Guid| {
        s2.programmed()
            .get(&g)
            .map(|k| k.iter().map(|p| p.0).collect())
    }));
    let mut store = SqliteStore::open(dir.path().join("ledger.db")).unwrap();
    store
        .atomically(|tx| {
            tx.add_tenant(&tenant("acme", 107, 0x8001))?;
            tx.add_tenant(&tenant("globex", 108, 0x8002))
        })
        .unwrap();
    SimHost {
        _dir: dir,
        kernel,
        sm,
        store,
    }
}

fn cfg() -> EngineConfig {
    EngineConfig {
        gate_deadline: Duration::from_secs(5),
        ..EngineConfig::default()
    }
}

/// One cluster at a time: three etcd members per test on a 2-core machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn settings(c: &EtcdCluster) -> FleetSettings {
    let mut s = FleetSettings::plaintext(c.endpoints(), "dft", "ib0").unwrap();
    s.timeout = Duration::from_secs(2);
    s.lease_ttl = Duration::from_secs(3);
    s
}

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

/// Every GUID the host's ledger knows for its IB VFs, with its state.
fn ledger_guids(store: &mut SqliteStore) -> BTreeMap<Guid, GuidState> {
    let mut out = BTreeMap::new();
    for vf in IB_VFS {
        for r in store.atomically(|tx| tx.guids_of(&dev(vf))).unwrap() {
            out.insert(r.guid, r.state);
        }
    }
    out
}

/// Three hosts assign and hand over their four IB VFs at the same time, each
/// taking fresh GUIDs from the fleet's pool through the engine: no GUID is
/// issued twice across hosts, each is held in etcd by the host whose ledger
/// issued it, and the GUIDs a handover retired are retired in etcd.
#[test]
fn three_hosts_take_fresh_guids_from_the_fleet_through_the_engine_none_twice() {
    let _one = serial();
    let etcd = EtcdCluster::start(&Options::default()).expect("etcd cluster starts");
    Fleet::connect(settings(&etcd))
        .unwrap()
        .configure_guid_range(GuidRange {
            first: Guid(FIRST),
            last: Guid(FIRST + 100_000),
        })
        .unwrap();
    let per_host: Vec<(Name, BTreeMap<Guid, GuidState>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let etcd = &etcd;
                s.spawn(move || {
                    let mut h = sim_host();
                    let fleet = Fleet::connect(settings(etcd)).unwrap();
                    let host = name(&format!("h{i}"));
                    let src = FleetGuids::new(&fleet, host.clone());
                    for vf in IB_VFS {
                        let done = Engine::new(&mut h.store, &h.kernel, &*h.sm, cfg())
                            .with_guid_source(&src)
                            .assign(&dev(vf), &t("acme"), None)
                            .unwrap();
                        assert!(matches!(done.state, DeviceState::Ready { .. }), "{done:?}");
                    }
                    for vf in IB_VFS {
                        let done = Engine::new(&mut h.store, &h.kernel, &*h.sm, cfg())
                            .with_guid_source(&src)
                            .handover(&dev(vf), &t("globex"), None)
                            .unwrap();
                        assert!(matches!(done.state, DeviceState::Ready { .. }), "{done:?}");
                    }
                    (host, ledger_guids(&mut h.store))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut seen: BTreeMap<Guid, Name> = BTreeMap::new();
    for (host, guids) in &per_host {
        let issued: Vec<_> = guids
            .iter()
            .filter(|(_, s)| matches!(s, GuidState::Issued | GuidState::Quarantined))
            .collect();
        assert_eq!(
            issued.len(),
            8,
            "{host}: 4 assigns and 4 handovers: {guids:?}"
        );
        for (g, _) in issued {
            if let Some(other) = seen.insert(*g, host.clone()) {
                panic!("GUID {g} issued to {other} and to {host}");
            }
        }
    }
    assert_eq!(seen.len(), 24);
    // etcd agrees: each GUID is held by the host that issued it; the handed
    // over ones (quarantined in the ledger) are retired in the pool.
    let pool: BTreeMap<Guid, _> = Fleet::connect(settings(&etcd))
        .unwrap()
        .guids()
        .unwrap()
        .into_iter()
        .collect();
    for (host, guids) in &per_host {
        for (g, state) in guids {
            let rec = pool.get(g).unwrap_or_else(|| panic!("{g} not in the pool"));
            assert_eq!(&rec.host, host, "{g}");
            let want = if *state == GuidState::Issued {
                PoolState::Allocated
            } else {
                PoolState::Retired
            };
            assert_eq!(rec.state, want, "{g} is {state:?} in {host}'s ledger");
        }
    }
}

/// With the etcd cluster stopped, an IB VF's assign, handover and release are
/// refused with the fail-closed error before their operation opens: the
/// ledger is unchanged (states, GUIDs, no open operation), and the host's
/// status still reads from the ledger.
#[test]
fn with_etcd_stopped_ib_operations_fail_closed_and_status_still_works() {
    let _one = serial();
    let mut etcd = EtcdCluster::start(&Options::default()).expect("etcd cluster starts");
    let fleet = Fleet::connect(settings(&etcd)).unwrap();
    fleet
        .configure_guid_range(GuidRange {
            first: Guid(FIRST),
            last: Guid(FIRST + 1000),
        })
        .unwrap();
    let mut h = sim_host();
    let src = FleetGuids::new(&fleet, name("h1"));
    let held = dev(IB_VFS[0]);
    Engine::new(&mut h.store, &h.kernel, &*h.sm, cfg())
        .with_guid_source(&src)
        .assign(&held, &t("acme"), None)
        .unwrap();
    // What a restarted agent re-writes as desired comes from the ledger alone.
    let held_guid = ledger_guids(&mut h.store).into_keys().next().unwrap();
    let want = devfence_app::fleet::desired_of_ledger(&mut h.store).unwrap();
    assert_eq!(
        want.pkeys_of(held_guid),
        BTreeSet::from([PKey(0x8001)]),
        "{want:?}"
    );
    assert_eq!(want.guids().count(), 1);
    let before_devices = h.store.atomically(|tx| tx.devices()).unwrap();
    let before_guids = ledger_guids(&mut h.store);
    for i in 0..3 {
        etcd.kill(i).unwrap();
    }
    let refused = |r: Result<_, EngineError>, what: &str| {
        let e = r.expect_err(what);
        let text = e.to_string();
        assert!(matches!(e, EngineError::Refused { .. }), "{what}: {e:?}");
        assert!(
            text.contains("did not answer") && text.contains("Hint:"),
            "{what}: {text}"
        );
        assert!(text.contains("fails closed"), "{what}: {text}");
    };
    refused(
        Engine::new(&mut h.store, &h.kernel, &*h.sm, cfg())
            .with_guid_source(&src)
            .assign(&dev(IB_VFS[1]), &t("acme"), None),
        "assign",
    );
    refused(
        Engine::new(&mut h.store, &h.kernel, &*h.sm, cfg())
            .with_guid_source(&src)
            .handover(&held, &t("globex"), None),
        "handover",
    );
    refused(
        Engine::new(&mut h.store, &h.kernel, &*h.sm, cfg())
            .with_guid_source(&src)
            .release(&held),
        "release",
    );
    // Nothing half-applied.
    assert_eq!(
        h.store.atomically(|tx| tx.devices()).unwrap(),
        before_devices
    );
    assert_eq!(ledger_guids(&mut h.store), before_guids);
    assert!(
        h.store
            .atomically(|tx| tx.open_operations())
            .unwrap()
            .is_empty()
    );
    // A device that needs no shared fact is not held back by the fleet.
    let nic = dev("0000:5e:10.0");
    Engine::new(&mut h.store, &h.kernel, &*h.sm, cfg())
        .with_guid_source(&src)
        .assign(&nic, &t("acme"), None)
        .unwrap();
    // The host's status reads from the ledger (and its SM), not from etcd.
    let st = devfence_app::lifecycle::status(&mut h.store, &*h.sm).unwrap();
    let states: BTreeSet<String> = st
        .devices
        .iter()
        .filter(|d| d.device == held || d.device == nic)
        .map(|d| d.state.to_string())
        .collect();
    assert_eq!(states.len(), 1, "both Ready for acme: {states:?}");
}

/// A one-shot command on a host with `[fabric] backend = "fleet"` holds no
/// session of the host (the agent does): its IB VF operations are refused
/// before they open, pointing at the agent, and its status reads.
#[test]
fn a_command_without_the_agents_session_refuses_ib_operations_and_status_reads() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    generate(&GenerateOptions {
        profile: Profile::Lab,
        out: root.clone(),
        vfs: None,
        host_id: 0,
    })
    .unwrap();
    let cfg = dir.path().join("devfence.toml");
    std::fs::write(
        &cfg,
        "[fabric]\nbackend = \"fleet\"\n[fleet]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:9\"]\ninsecure_plaintext = true\nfabric = \"ib0\"\nhost = \"hv01\"\n",
    )
    .unwrap();
    let root = HostRoot::new(root);
    let mut env = devfence_app::Env::open_or_create(&root, None, Some(&cfg)).unwrap();
    assert_eq!(env.sm.backend(), "fleet");
    env.store
        .atomically(|tx| tx.add_tenant(&tenant("acme", 107, 0x8001)))
        .unwrap();
    let e = env
        .engine(cfg_engine())
        .assign(&dev(IB_VFS[0]), &t("acme"), None)
        .expect_err("no session, no IB operation");
    assert!(matches!(e, EngineError::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("host agent"), "{e}");
    assert!(
        env.store
            .atomically(|tx| tx.open_operations())
            .unwrap()
            .is_empty(),
        "refused before it opened"
    );
    let st = devfence_app::lifecycle::status(&mut env.store, &*env.sm).unwrap();
    assert_eq!(st.sm_backend, "fleet");
    assert!(
        st.health.is_err(),
        "the SM's part says why it cannot answer"
    );
}

fn cfg_engine() -> EngineConfig {
    cfg()
}
