//! The lifecycle on the embedded default: a simulated host, kernel and SM.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use devfence_engine::DeviceState;
use devfence_model::{DeviceId, PKey};

#[test]
fn ib_vf_assign_then_handover_verifies_at_the_sm_and_the_port() {
    let mut fx = fixture();
    let vf: DeviceId = "0000:3b:00.1".parse().unwrap();
    let a = fx.engine().assign(&vf, &t("acme"), Some("web1")).unwrap();
    assert_eq!(
        a.state,
        DeviceState::Ready {
            tenant: t("acme"),
            vm: Some("web1".into())
        }
    );
    let prog = fx.sm.programmed();
    let acme_guid = *prog
        .iter()
        .find(|(_, k)| k.contains(&PKey(0x8001 | 0x8000)))
        .unwrap()
        .0;
    let b = fx.engine().handover(&vf, &t("globex"), None).unwrap();
    assert_eq!(
        b.state,
        DeviceState::Ready {
            tenant: t("globex"),
            vm: None
        }
    );
    let prog = fx.sm.programmed();
    let old = prog.get(&acme_guid).cloned().unwrap_or_default();
    assert!(
        !old.iter().any(|k| k.base() == 0x0001),
        "old GUID left acme: {old:?}"
    );
    eprintln!("{:?}", b.timings);
}
