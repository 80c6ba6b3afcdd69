//! libvirt's `prepare begin` through [`Engine::start_domain`]: re-verification at
//! the moment of use (issue 18 item 5) and all-or-nothing admission (item 9), on
//! the simulated host, kernel and SM.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use devfence_engine::DeviceState;
use devfence_engine::engine::Started;
use devfence_engine::libvirt::{DomainSpec, Unidentified};
use devfence_engine::{GuidState, StoreExt};
use devfence_fabric::{FabricError, SubnetManager};
use devfence_host::actuator::Actuator;
use devfence_host::actuator::ops::SysfsActuator;
use devfence_model::{DeviceId, Guid, IommuGroupId};

fn spec(tenant: Option<&str>, devices: &[DeviceId]) -> DomainSpec {
    DomainSpec {
        name: "web1".into(),
        uuid: Some("8f2c6a1e-4b7d-4e0a-9c3f-2d1b5e6a7c80".into()),
        tenant: tenant.map(t),
        hostdevs: devices.to_vec(),
        unsupported: vec![],
    }
}

fn state(fx: &mut Fx, d: &DeviceId) -> DeviceState {
    fx.store
        .atomically(|tx| tx.device(d))
        .unwrap()
        .unwrap()
        .state
}

fn start(fx: &mut Fx, s: &DomainSpec) -> Result<Started, devfence_engine::libvirt::Refusal> {
    fx.engine().start_domain(s, Unidentified::Refuse)
}

fn issued(fx: &mut Fx, d: &DeviceId) -> Guid {
    fx.store
        .atomically(|tx| tx.guids_of(d))
        .unwrap()
        .into_iter()
        .find(|r| r.state == GuidState::Issued)
        .unwrap()
        .guid
}

fn quarantined(st: &DeviceState, needle: &str) -> bool {
    matches!(st, DeviceState::Quarantined { reason } if reason.contains(needle))
}

/// issue 18 item 5: every kind that is as its gates left it starts, with the
/// evidence of what was re-read (an IB VF: its GUID and its port's P_Keys).
#[test]
fn every_kind_as_verified_starts() {
    for kind in ["ib-vf", "pci", "token-vf", "mdev"] {
        let mut fx = fixture();
        let d0 = match kind {
            "ib-vf" => dev(IB_VF),
            "pci" => dev(PCI_VF),
            "token-vf" => dev(TOKEN_VF),
            _ => fx.new_mdev(),
        };
        let d = fx.engine().assign(&d0, &t("acme"), None).unwrap().device;
        let s = start(&mut fx, &spec(Some("acme"), &[d])).unwrap();
        assert_eq!(s.tenant, Some(t("acme")), "{kind}");
        let ev = &s.devices[0].1;
        if kind == "ib-vf" {
            let g = issued(&mut fx, &d);
            assert_eq!(ev["guid"], serde_json::json!(g), "{kind}: {ev}");
            assert!(ev["pkeys"].to_string().contains("0x8001"), "{kind}: {ev}");
        }
        assert!(
            matches!(state(&mut fx, &d), DeviceState::Active { .. }),
            "{kind}"
        );
    }
}

/// issue 18 item 5: an IB VF whose GUID was changed under devfence (the PF
/// shows another one) is refused and quarantined, naming the GUIDs.
#[test]
fn ib_vf_with_another_guid_is_refused() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let g = issued(&mut fx, &d);
    let other = Guid(0x0002_c903_00aa_0001);
    let group = IommuGroupId(fx.group_of(&d).unwrap());
    let act = SysfsActuator::new(&fx.kernel);
    act.set_vf_guid(bdf(IB_PF), 0, other, other).unwrap();
    // Everything else put back as the gates left it: only the GUID differs.
    act.bind(bdf(IB_VF), "vfio-pci").unwrap();
    act.set_group_node_owner(group, ACME_UID, ACME_UID, 0o600)
        .unwrap();
    let r = start(&mut fx, &spec(Some("acme"), &[d])).unwrap_err();
    assert!(
        r.reason.contains(&format!("not {g}")) && r.reason.contains("Hint:"),
        "{r}"
    );
    assert!(
        quarantined(&state(&mut fx, &d), "GUID"),
        "{:?}",
        state(&mut fx, &d)
    );
}

/// issue 18 item 5: an IB VF whose port lost the tenant's partition at the SM
/// (an operator's edit, a foreign controller) is refused and quarantined.
#[test]
fn ib_vf_whose_port_lost_the_tenants_pkey_is_refused() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let g = issued(&mut fx, &d);
    fx.sm.stage_remove_all(g).unwrap();
    fx.sm.apply().unwrap();
    fx.sm.settle();
    let r = start(&mut fx, &spec(Some("acme"), &[d])).unwrap_err();
    assert!(r.reason.contains("lacks the tenant's P_Keys 0x8001"), "{r}");
    assert!(quarantined(&state(&mut fx, &d), "P_Key"));
}

/// issue 18 item 5: an SM that cannot answer is not a difference: the domain
/// is refused (fail closed) but the device stays Ready.
#[test]
fn ib_vf_with_the_sm_unreachable_is_refused_not_quarantined() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    fx.sm.error_next_call(FabricError::Refused {
        backend: "sim".into(),
        detail: "connection refused".into(),
        hint: "start it".into(),
    });
    let r = start(&mut fx, &spec(Some("acme"), &[d])).unwrap_err();
    assert!(r.reason.contains("the SM cannot show"), "{r}");
    assert!(matches!(state(&mut fx, &d), DeviceState::Ready { .. }));
}

/// issue 18 item 5: a group node given back to root (or to anyone else) after
/// Ready is refused; so is a removed mdev.
#[test]
fn node_owner_and_mdev_presence_are_reverified() {
    let mut fx = fixture();
    let d = dev(PCI_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let g = fx.group_of(&d).unwrap();
    SysfsActuator::new(&fx.kernel)
        .set_group_node_owner(IommuGroupId(g), GLOBEX_UID, GLOBEX_UID, 0o600)
        .unwrap();
    let r = start(&mut fx, &spec(Some("acme"), &[d])).unwrap_err();
    assert!(r.reason.contains("108:108 0600, not 107:107 0600"), "{r}");
    assert!(quarantined(&state(&mut fx, &d), "/dev/vfio/"));

    let mut fx = fixture();
    let m0 = fx.new_mdev();
    let m = fx.engine().assign(&m0, &t("acme"), None).unwrap().device;
    let DeviceId::Mdev(u) = m else { panic!() };
    SysfsActuator::new(&fx.kernel).mdev_remove(u).unwrap();
    let r = start(&mut fx, &spec(Some("acme"), &[m])).unwrap_err();
    assert!(r.reason.contains("is gone"), "{r}");
}

/// issue 18 item 9: when one device of a domain fails, no device of it becomes
/// Active; when all pass, all become Active in one transaction, a device
/// reserved for the domain's UUID under that UUID.
#[test]
fn all_or_nothing() {
    let mut fx = fixture();
    let (a, b) = (dev(PCI_VF), dev("0000:5e:10.2"));
    let uuid = "8f2c6a1e-4b7d-4e0a-9c3f-2d1b5e6a7c80";
    fx.engine().assign(&a, &t("acme"), None).unwrap();
    fx.engine().assign(&b, &t("acme"), Some(uuid)).unwrap();
    SysfsActuator::new(&fx.kernel)
        .unbind(bdf("0000:5e:10.2"))
        .unwrap();
    let r = start(&mut fx, &spec(Some("acme"), &[a, b])).unwrap_err();
    assert_eq!(r.device, Some(b));
    assert!(matches!(state(&mut fx, &a), DeviceState::Ready { .. }));
    assert!(quarantined(&state(&mut fx, &b), "driver is none"));

    let mut fx = fixture();
    fx.engine().assign(&a, &t("acme"), None).unwrap();
    fx.engine().assign(&b, &t("acme"), Some(uuid)).unwrap();
    start(&mut fx, &spec(None, &[a, b])).unwrap();
    assert_eq!(
        state(&mut fx, &a),
        DeviceState::Active {
            tenant: t("acme"),
            vm: "web1".into()
        }
    );
    assert_eq!(
        state(&mut fx, &b),
        DeviceState::Active {
            tenant: t("acme"),
            vm: uuid.into()
        }
    );
}
