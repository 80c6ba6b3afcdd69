//! A host agent joining a fleet at start (issue 13 item 3) on a real 3-member
//! etcd cluster: `join_fleet` registers the host — waiting for the lease a
//! previous agent process left behind to expire — claims its tenants'
//! partitions, and re-writes the desired memberships of its Ready IB VFs from
//! the ledger under the new lease.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use devfence_agent::{Limits, Options};
use devfence_app::fleet::FleetGuids;
use devfence_engine::engine::{Engine, EngineConfig};
use devfence_engine::store::{GuidState, Partition, Tenant};
use devfence_engine::{SqliteStore, StoreExt};
use devfence_etcd_harness::{EtcdCluster, Options as EtcdOptions};
use devfence_fabric::{SimConfig, SimSm};
use devfence_fleet::value::{GuidRange, Name};
use devfence_fleet::{Fleet, FleetSettings};
use devfence_host::HostRoot;
use devfence_host::sim::{GenerateOptions, Profile, generate};
use devfence_host::simkernel::SimKernel;
use devfence_model::{DeviceId, Guid, Membership, PKey};

const FIRST: u64 = 0x0002_c903_0b00_0000;

#[test]
fn a_restarted_agent_registers_again_and_rewrites_its_desired_memberships() {
    let etcd = EtcdCluster::start(&EtcdOptions::default()).expect("etcd cluster starts");
    let mut settings = FleetSettings::plaintext(etcd.endpoints(), "dft", "ib0").unwrap();
    settings.timeout = Duration::from_secs(3);
    settings.lease_ttl = Duration::from_secs(2);
    let admin = Fleet::connect(settings.clone()).unwrap();
    admin
        .configure_guid_range(GuidRange {
            first: Guid(FIRST),
            last: Guid(FIRST + 1000),
        })
        .unwrap();
    let h1: Name = "h1".parse().unwrap();

    // The host as the previous agent process left it: one IB VF Ready for
    // acme with a GUID from the fleet's pool.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    generate(&GenerateOptions {
        profile: Profile::Lab,
        out: root.clone(),
        vfs: None,
        host_id: 0,
    })
    .unwrap();
    let ledger = dir.path().join("ledger.db");
    let guid = {
        let kernel = SimKernel::new(HostRoot::new(&root)).unwrap();
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
        let mut store = SqliteStore::open(&ledger).unwrap();
        store
            .atomically(|tx| {
                tx.add_tenant(&Tenant {
                    id: "acme".parse().unwrap(),
                    launcher_uid: Some(107),
                    launcher_gid: Some(107),
                    security_label: None,
                    partitions: vec![Partition {
                        pkey: PKey(0x8001),
                        membership: Membership::Full,
                    }],
                })
            })
            .unwrap();
        let vf = DeviceId::Pci("0000:3b:00.1".parse().unwrap());
        let src = FleetGuids::new(&admin, h1.clone());
        Engine::new(&mut store, &kernel, &*sm, EngineConfig::default())
            .with_guid_source(&src)
            .assign(&vf, &"acme".parse().unwrap(), None)
            .unwrap();
        let recs = store.atomically(|tx| tx.guids_of(&vf)).unwrap();
        recs.into_iter()
            .find(|r| r.state == GuidState::Issued)
            .unwrap()
            .guid
    };
    // The previous agent's session: its lease is still alive when the new
    // agent starts (it was killed, not stopped).
    let old = {
        let f = Fleet::connect(settings.clone()).unwrap();
        let s = f.register_host(&h1).unwrap();
        let lease = s.lease();
        drop(s);
        drop(f);
        lease
    };

    let cfg = dir.path().join("devfence.toml");
    std::fs::write(
        &cfg,
        format!(
            "[fabric]\nbackend = \"fleet\"\n[fleet]\nbackend = \"etcd\"\nendpoints = [{}]\ninsecure_plaintext = true\nprefix = \"dft\"\nfabric = \"ib0\"\nhost = \"h1\"\ntimeout_ms = 3000\nlease_ttl_s = 2\n",
            etcd.endpoints()
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .unwrap();
    let opts = Options {
        root: HostRoot::new(&root),
        ledger: Some(ledger),
        config: Some(cfg),
        socket: None,
        limits: Limits::default(),
        log_level: None,
    };
    devfence_agent::service::join_fleet(&opts).unwrap();

    let h = devfence_app::fleet::registered().expect("registered");
    assert_eq!(h.sm.host(), &h1);
    let lease = admin
        .block_on(admin.store().host_lease(&h1))
        .unwrap()
        .expect("the host key");
    assert_ne!(lease, old, "a new session");
    assert_eq!(
        admin.pkey_owner(PKey(0x8001)).unwrap(),
        Some("acme".parse().unwrap()),
        "the tenant's partition is claimed"
    );
    let desired = admin.desired(Some(&h1)).unwrap();
    assert_eq!(desired.len(), 1, "{desired:?}");
    assert_eq!(desired[0].guid, guid);
    assert_eq!(desired[0].record.pkeys, vec![PKey(0x8001)]);
    assert!(!h.sm.lease_lost());

    // A tenant added on a host of the fleet has its partitions claimed first;
    // one naming another tenant's partition is refused, the ledger unchanged.
    let kernel = SimKernel::new(HostRoot::new(&root)).unwrap();
    let mut store = SqliteStore::open(dir.path().join("ledger.db")).unwrap();
    let tenant = |id: &str, pkey: u16| Tenant {
        id: id.parse().unwrap(),
        launcher_uid: Some(108),
        launcher_gid: Some(108),
        security_label: None,
        partitions: vec![Partition {
            pkey: PKey(pkey),
            membership: Membership::Full,
        }],
    };
    let no_sm = devfence_app::fabric::NoSm;
    let mut e = Engine::new(&mut store, &kernel, &no_sm, EngineConfig::default());
    devfence_app::tenant::add(&mut e, &tenant("globex", 0x8002)).unwrap();
    let err =
        devfence_app::tenant::add(&mut e, &tenant("evil", 0x8001)).expect_err("acme's partition");
    assert!(err.to_string().contains("belongs to tenant acme"), "{err}");
    drop(e);
    assert_eq!(
        admin.pkey_owner(PKey(0x8002)).unwrap(),
        Some("globex".parse().unwrap())
    );
    let ids: Vec<String> = store
        .atomically(|tx| tx.tenants())
        .unwrap()
        .into_iter()
        .map(|t| t.id.to_string())
        .collect();
    assert_eq!(ids, ["acme", "globex"]);
}
