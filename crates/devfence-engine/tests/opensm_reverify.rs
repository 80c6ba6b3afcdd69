//! issue 17 item 2 on a real OpenSM: after an operator's typo and HUP, and
//! devfence's restore of the partitions file, the restore enters the audit
//! chain exactly once (whichever process sees it, however often), and every
//! Ready device is re-verified once OpenSM has swept the restored file — not
//! before (the port tables of a failed sweep are no verified state, so nothing
//! is quarantined on them).
#![allow(clippy::unwrap_used)]

#[path = "support/opensm_host.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use devfence_engine::engine::{Check, Engine, EngineConfig, Reverification};
use devfence_engine::store::DeviceState;
use devfence_engine::{AuditFilter, Store, StoreExt};
use devfence_fabric::PortReader;
use devfence_fabric::opensm::OpenSmSm;
use devfence_fabric_harness::in_fabric;
use devfence_model::DeviceId;
use support::{OnFabric, host, spec};

fn cfg() -> EngineConfig {
    EngineConfig {
        gate_deadline: Duration::from_secs(10),
        ..EngineConfig::default()
    }
}

#[test]
fn a_restore_is_audited_once_and_the_ready_devices_are_reverified() {
    in_fabric(
        "a_restore_is_audited_once_and_the_ready_devices_are_reverified",
        &spec(),
        |f| {
            let mut h = host(f);
            let io = OnFabric { k: &h.kernel, f };
            let vf: DeviceId = DeviceId::Pci("0000:3b:00.1".parse().unwrap());
            let vf2: DeviceId = DeviceId::Pci("0000:3b:00.2".parse().unwrap());
            let mut e = Engine::new(&mut h.store, &io, &h.sm, cfg());
            e.assign(&vf, &"acme".parse().unwrap(), None).unwrap();
            e.assign(&vf2, &"globex".parse().unwrap(), None).unwrap();
            let rv = e.reverify(None).unwrap();
            assert!(rv.all_verified(), "{rv:?}");
            drop(e);

            // An operator's typo and HUP: OpenSM cannot parse the file.
            let o = f.opensm_config();
            let good = std::fs::read_to_string(&o.partitions_file).unwrap();
            std::fs::write(
                &o.partitions_file,
                format!("typo=0x8101 : 0xZZZZ ;\n{good}"),
            )
            .unwrap();
            let before = f.subnet_up_count();
            f.hup().unwrap();
            f.wait_subnet_up(before, Duration::from_secs(10)).unwrap();

            // A verification reads the SM: devfence restores. The tables read
            // from the failed sweep are unknown, never a drift.
            let rv = Engine::new(&mut h.store, &io, &h.sm, cfg())
                .reverify(None)
                .unwrap();
            for d in &rv.devices {
                assert!(
                    !matches!(d.check, Check::Drifted { .. }),
                    "a failed sweep's tables are not a drift: {rv:?}"
                );
            }
            assert_eq!(
                std::fs::read_to_string(&o.partitions_file).unwrap(),
                good,
                "devfence restored the operator's last good text"
            );

            // Each call is a new process (a new backend, the same SA client):
            // the restore is recorded once, the devices re-verified once OpenSM
            // swept the restored file (bounded; nothing waits for correctness).
            let mut recorded = Vec::new();
            let mut after: Option<Reverification> = None;
            let deadline = Instant::now() + Duration::from_secs(20);
            while after.is_none() {
                let sm = OpenSmSm::with_port_reader(
                    f.opensm_config(),
                    Box::new(Arc::clone(&h.sa) as Arc<dyn PortReader>),
                );
                let (new, rv) = Engine::new(&mut h.store, &io, &sm, cfg())
                    .record_fabric_restores()
                    .unwrap();
                recorded.extend(new);
                after = rv;
                if after.is_none() {
                    assert!(
                        Instant::now() < deadline,
                        "never re-verified after the restore"
                    );
                    let n = f.subnet_up_count();
                    let _ = f.wait_subnet_up(n, Duration::from_millis(500));
                }
            }
            assert_eq!(recorded.len(), 1, "{recorded:?}");
            let after = after.unwrap();
            assert_eq!(after.devices.len(), 2, "{after:?}");
            assert!(after.all_verified(), "{after:?}");
            for d in [&vf, &vf2] {
                let st = h.store.atomically(|tx| tx.device(d)).unwrap().unwrap();
                assert!(matches!(st.state, DeviceState::Ready { .. }), "{st:?}");
            }
            // Later processes add nothing.
            for _ in 0..2 {
                let sm = OpenSmSm::with_port_reader(
                    f.opensm_config(),
                    Box::new(Arc::clone(&h.sa) as Arc<dyn PortReader>),
                );
                let (new, rv) = Engine::new(&mut h.store, &io, &sm, cfg())
                    .record_fabric_restores()
                    .unwrap();
                assert!(new.is_empty() && rv.is_none());
            }
            let all = h.store.audit_show(&AuditFilter::default()).unwrap();
            let restores: Vec<_> = all
                .iter()
                .filter(|r| r.detail["event"] == "fabric-restore")
                .collect();
            assert_eq!(restores.len(), 1, "{restores:?}");
            assert!(
                restores[0].detail["reason"]
                    .as_str()
                    .unwrap()
                    .contains("PARSE ERROR"),
                "{restores:?}"
            );
            let summaries: Vec<_> = all
                .iter()
                .filter(|r| r.detail["after"] == "fabric-restore")
                .collect();
            assert_eq!(summaries.len(), 1, "{summaries:?}");
            assert_eq!(summaries[0].detail["verified"], 2, "{summaries:?}");
            assert!(h.store.verify().is_ok());
        },
    );
}
