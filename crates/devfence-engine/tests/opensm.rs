//! The handover engine with the OpenSM backend on a real OpenSM (ibsim fabric):
//! IB VFs move between tenants and the gates pass only when the real SA says so.
//!
//! The host is the simulated `lab` host whose IB VFs are nodes on the fabric
//! (tests/support/opensm_host.rs).
#![allow(clippy::unwrap_used)]

#[path = "support/opensm_host.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use devfence_engine::engine::{Engine, EngineConfig, EngineError, Progress};
use devfence_engine::store::{DeviceState, GuidState, StepState};
use devfence_engine::{SqliteStore, StoreExt};
use devfence_fabric::{PortReader, Programmed};
use devfence_fabric_harness::in_fabric;
use devfence_model::{DeviceId, Guid, PKey, TenantId};
use support::{FACTORY, Host, OnFabric, host, spec};

fn t(s: &str) -> TenantId {
    s.parse().unwrap()
}

fn cfg(deadline: Duration) -> EngineConfig {
    EngineConfig {
        gate_deadline: deadline,
        ..EngineConfig::default()
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

fn table(h: &Host, g: Guid) -> Option<BTreeSet<PKey>> {
    match h.sa.read_port(g).unwrap() {
        Programmed::Present { pkeys, .. } => Some(pkeys),
        Programmed::Absent => None,
    }
}

#[test]
fn ib_vfs_move_between_tenants_on_a_real_opensm() {
    in_fabric(
        "ib_vfs_move_between_tenants_on_a_real_opensm",
        &spec(),
        |f| {
            let mut h = host(f);
            let io = OnFabric { k: &h.kernel, f };
            let vf: DeviceId = DeviceId::Pci("0000:3b:00.1".parse().unwrap());
            let vf2: DeviceId = DeviceId::Pci("0000:3b:00.2".parse().unwrap());
            let factory = Guid(FACTORY[0]);
            assert!(table(&h, factory).is_some(), "the VF is on the fabric");

            // acme gets two VFs.
            let mut e = Engine::new(&mut h.store, &io, &h.sm, cfg(Duration::from_secs(10)));
            let a = e.assign(&vf, &t("acme"), Some("web1")).unwrap();
            let b = e.assign(&vf2, &t("acme"), None).unwrap();
            drop(e);
            assert!(matches!(a.state, DeviceState::Ready { .. }), "{a:?}");
            assert!(matches!(b.state, DeviceState::Ready { .. }));
            let acme_guid = issued(&mut h.store, &vf);
            assert_eq!(table(&h, factory), None, "the factory GUID left the fabric");
            assert_eq!(
                table(&h, acme_guid).unwrap(),
                BTreeSet::from([PKey(0x7fff), PKey(0x8001)])
            );
            // The evidence of the SM gate came from OpenSM.
            assert!(
                a.timings.iter().any(|(s, _)| s.contains("sm-verified")),
                "{:?}",
                a.timings
            );

            // Hand the first VF to globex.
            let mut e = Engine::new(&mut h.store, &io, &h.sm, cfg(Duration::from_secs(10)));
            let done = e.handover(&vf, &t("globex"), Some("db1")).unwrap();
            drop(e);
            assert!(matches!(done.state, DeviceState::Ready { .. }), "{done:?}");
            let globex_guid = issued(&mut h.store, &vf);
            assert_ne!(globex_guid, acme_guid);
            assert_eq!(
                table(&h, acme_guid),
                None,
                "acme's GUID is gone from the fabric"
            );
            assert_eq!(
                table(&h, globex_guid).unwrap(),
                BTreeSet::from([PKey(0x7fff), PKey(0x8002)])
            );
            // acme's other VF kept its membership through globex's handover.
            let other = issued(&mut h.store, &vf2);
            assert_eq!(
                table(&h, other).unwrap(),
                BTreeSet::from([PKey(0x7fff), PKey(0x8001)])
            );
            // The partitions file names exactly the two live GUIDs.
            let file = h.sm.current().unwrap();
            let named: BTreeSet<Guid> = file.explicit_guids().into_keys().collect();
            assert_eq!(named, BTreeSet::from([globex_guid, other]));
        },
    );
}

#[test]
fn a_frozen_opensm_keeps_the_vf_quarantined() {
    in_fabric("a_frozen_opensm_keeps_the_vf_quarantined", &spec(), |f| {
        let mut h = host(f);
        let io = OnFabric { k: &h.kernel, f };
        let vf: DeviceId = DeviceId::Pci("0000:3b:00.3".parse().unwrap());
        Engine::new(&mut h.store, &io, &h.sm, cfg(Duration::from_secs(10)))
            .assign(&vf, &t("acme"), None)
            .unwrap();
        // OpenSM freezes right after devfence asked it to move the VF (acme's
        // GUID out, globex's fresh GUID in, one apply): the sm-verified gate must
        // hold and fail closed.
        let mut froze = false;
        let mut waits = 0u32;
        let r = Engine::new(&mut h.store, &io, &h.sm, cfg(Duration::from_millis(500)))
            .with_progress(|p| match p {
                Progress::Step { name, state, .. }
                    if name == "fabric-move" && *state == StepState::Done =>
                {
                    f.freeze().unwrap();
                    froze = true;
                }
                Progress::Waiting { .. } => waits += 1,
                _ => {}
            })
            .handover(&vf, &t("globex"), None);
        assert!(froze, "the grant was applied: {r:?}");
        let e = r.unwrap_err();
        match &e {
            EngineError::Failed { step, state, .. } => {
                assert_eq!(step, "gate:sm-verified", "{e}");
                assert!(state.to_lowercase().starts_with("quarantined"), "{e}");
            }
            other => panic!("{other}"),
        }
        assert!(waits > 0, "the gate polled the frozen SM");
        let st = h
            .store
            .atomically(|tx| tx.device(&vf))
            .unwrap()
            .unwrap()
            .state;
        assert!(matches!(st, DeviceState::Quarantined { .. }), "{st:?}");
        f.thaw().unwrap();
        // With the SM back, a release scrubs the device; it is Free again.
        let done = Engine::new(&mut h.store, &io, &h.sm, cfg(Duration::from_secs(10)))
            .release(&vf)
            .unwrap();
        assert_eq!(done.state, DeviceState::Free);
    });
}
