//! The handover engine on a real OpenSM whose partitions file holds an
//! operator's statement over every port (issue 17 item 7): the grant fails
//! closed at `gate:sm-verified`, and the hint names the operator's line
//! (`file:line`) instead of blaming the SM.
#![allow(clippy::unwrap_used)]

#[path = "support/opensm_host.rs"]
mod support;

use std::time::Duration;

use devfence_engine::StoreExt;
use devfence_engine::engine::{Engine, EngineConfig, EngineError};
use devfence_engine::store::DeviceState;
use devfence_fabric_harness::in_fabric;
use devfence_model::DeviceId;
use support::{OnFabric, host, spec};

#[test]
fn a_grant_into_an_operator_partition_fails_closed_naming_the_line() {
    let mut s = spec();
    s.partitions = format!("open=0x9003 : ALL=full ;\n{}", s.partitions);
    in_fabric(
        "a_grant_into_an_operator_partition_fails_closed_naming_the_line",
        &s,
        |f| {
            let mut h = host(f);
            let io = OnFabric { k: &h.kernel, f };
            let vf: DeviceId = DeviceId::Pci("0000:3b:00.1".parse().unwrap());
            let cfg = EngineConfig {
                gate_deadline: Duration::from_secs(3),
                ..EngineConfig::default()
            };
            let r = Engine::new(&mut h.store, &io, &h.sm, cfg).assign(
                &vf,
                &"acme".parse().unwrap(),
                None,
            );
            let e = r.expect_err("the port is also in the operator's 0x9003");
            let text = e.to_string();
            assert!(matches!(e, EngineError::Failed { .. }), "{e:?}");
            let at = format!("{}:1", f.opensm_config().partitions_file.display());
            assert!(text.contains("sm-verified"), "{text}");
            assert!(text.contains(&at), "the hint names the line: {text}");
            assert!(!text.contains("has not (yet) applied"), "{text}");
            let st = h.store.atomically(|tx| tx.device(&vf)).unwrap().unwrap();
            assert!(
                matches!(st.state, DeviceState::Quarantined { .. }),
                "{:?}",
                st.state
            );
        },
    );
}
