//! [`Engine::reverify`]: every `Ready` and `Active` device re-verified at any
//! time (issue 17 item 2: after a restore of the SM's configuration, and on
//! demand), on the simulated host, kernel and SM; and
//! [`Engine::record_fabric_restores`]: a restore the backend persisted enters
//! the audit chain once.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use devfence_engine::engine::{Check, Engine, Reverification};
use devfence_engine::libvirt::{DomainSpec, Unidentified};
use devfence_engine::{AuditFilter, DeviceState, GuidState, Store, StoreExt};
use devfence_fabric::opensm::RestoreNote;
use devfence_fabric::{Change, FabricError, Health, Observation, SubnetManager, Ticket};
use devfence_host::actuator::Actuator;
use devfence_host::actuator::ops::SysfsActuator;
use devfence_model::{DeviceId, Guid, IommuGroupId};

fn state(fx: &mut Fx, d: &DeviceId) -> DeviceState {
    fx.store
        .atomically(|tx| tx.device(d))
        .unwrap()
        .unwrap()
        .state
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

fn check_of<'a>(rv: &'a Reverification, d: &DeviceId) -> &'a Check {
    &rv.devices.iter().find(|c| c.device == *d).unwrap().check
}

/// The port of `g` loses every partition at the SM behind devfence's back (an
/// operator's edit or a restore of an old file), as `out_of_band_add` does.
fn strip_at_sm(fx: &mut Fx, g: Guid) {
    fx.sm.stage_remove_all(g).unwrap();
    fx.sm.apply().unwrap();
    fx.sm.settle();
}

fn gate_records(fx: &mut Fx, d: &DeviceId) -> Vec<serde_json::Value> {
    fx.store
        .audit_show(&AuditFilter {
            device: Some(*d),
            tenant: None,
        })
        .unwrap()
        .into_iter()
        .filter(|r| r.detail["gate"] == "reverify")
        .map(|r| r.detail)
        .collect()
}

/// issue 17 item 2: devices as their gates left them are verified, with the
/// evidence read (an IB VF's GUID and P_Keys at the SM); nothing is audited.
#[test]
fn devices_as_verified_are_verified() {
    let mut fx = fixture();
    let (a, b) = (dev(IB_VF), dev(PCI_VF));
    fx.engine().assign(&a, &t("acme"), None).unwrap();
    fx.engine().assign(&b, &t("globex"), None).unwrap();
    let rv = fx.engine().reverify(None).unwrap();
    assert_eq!(rv.devices.len(), 2, "{rv:?}");
    assert!(rv.all_verified(), "{rv:?}");
    let Check::Verified { evidence } = check_of(&rv, &a) else {
        panic!()
    };
    assert!(
        evidence["pkeys"].to_string().contains("0x8001"),
        "{evidence}"
    );
    assert!(gate_records(&mut fx, &a).is_empty());
}

/// issue 17 item 2: a Ready IB VF whose port lost its P_Key at the SM behind
/// devfence's back is quarantined, audited with what differed.
#[test]
fn ready_ib_vf_that_lost_its_pkey_is_quarantined() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let g = issued(&mut fx, &d);
    strip_at_sm(&mut fx, g);
    let rv = fx.engine().reverify(None).unwrap();
    let Check::Drifted {
        what, quarantined, ..
    } = check_of(&rv, &d)
    else {
        panic!("{rv:?}")
    };
    assert!(what.contains("lacks the tenant's P_Keys 0x8001"), "{what}");
    assert!(*quarantined);
    assert!(
        matches!(state(&mut fx, &d), DeviceState::Quarantined { reason } if reason.contains("0x8001")),
        "{:?}",
        state(&mut fx, &d)
    );
    let recs = gate_records(&mut fx, &d);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["result"], "drifted");
    assert!(
        recs[0]["to"].as_str().unwrap().starts_with("Quarantined"),
        "{recs:?}"
    );
}

/// issue 17 item 2: an Active IB VF whose port lost its P_Key is reported (an
/// audited finding) and stays Active: devfence never yanks a running VM's
/// device.
#[test]
fn active_ib_vf_that_lost_its_pkey_is_reported_not_yanked() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let spec = DomainSpec {
        name: "web1".into(),
        uuid: None,
        tenant: Some(t("acme")),
        hostdevs: vec![d],
        unsupported: vec![],
    };
    fx.engine()
        .start_domain(&spec, Unidentified::Refuse)
        .unwrap();
    let g = issued(&mut fx, &d);
    strip_at_sm(&mut fx, g);
    let rv = fx.engine().reverify(Some(&[d])).unwrap();
    let Check::Drifted { quarantined, .. } = check_of(&rv, &d) else {
        panic!("{rv:?}")
    };
    assert!(!*quarantined);
    assert!(
        matches!(state(&mut fx, &d), DeviceState::Active { .. }),
        "{:?}",
        state(&mut fx, &d)
    );
    let recs = gate_records(&mut fx, &d);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["action"], "reported");
}

/// issue 17 item 2: a /dev/vfio group node re-chowned to another user is a
/// drift (the Ready device is quarantined, naming the owners).
#[test]
fn rechowned_group_node_is_a_drift() {
    let mut fx = fixture();
    let d = dev(PCI_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let g = fx.group_of(&d).unwrap();
    SysfsActuator::new(&fx.kernel)
        .set_group_node_owner(IommuGroupId(g), 0, 0, 0o666)
        .unwrap();
    let rv = fx.engine().reverify(None).unwrap();
    let Check::Drifted { what, .. } = check_of(&rv, &d) else {
        panic!("{rv:?}")
    };
    assert!(what.contains("0:0 0666, not 107:107 0600"), "{what}");
    assert!(matches!(
        state(&mut fx, &d),
        DeviceState::Quarantined { .. }
    ));
}

/// issue 17 item 2: an SM that does not answer is not a drift: reported as
/// unknown (audited), the Ready device stays Ready.
#[test]
fn unreachable_sm_is_unknown_not_quarantined() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    fx.sm.error_next_call(FabricError::Refused {
        backend: "sim".into(),
        detail: "connection refused".into(),
        hint: "start it".into(),
    });
    let rv = fx.engine().reverify(None).unwrap();
    assert!(
        matches!(check_of(&rv, &d), Check::Unknown { why } if why.contains("the SM cannot show")),
        "{rv:?}"
    );
    assert!(!rv.all_verified());
    assert!(matches!(state(&mut fx, &d), DeviceState::Ready { .. }));
    assert_eq!(gate_records(&mut fx, &d)[0]["result"], "unknown");
}

/// issue 17 item 2: a device named that is not Ready or Active is refused.
#[test]
fn free_device_named_is_refused() {
    let mut fx = fixture();
    let d = dev(PCI_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    fx.engine().release(&d).unwrap();
    let e = fx.engine().reverify(Some(&[d])).unwrap_err().to_string();
    assert!(e.contains("is Free") && e.contains("Hint:"), "{e}");
}

/// A simulated SM whose backend says it restored its configuration (the
/// OpenSM backend's memo, as `persisted_restores` reads it).
struct Restoring<'a> {
    sm: &'a dyn SubnetManager,
    restores: Vec<RestoreNote>,
}

impl SubnetManager for Restoring<'_> {
    fn backend(&self) -> &str {
        "opensm"
    }
    fn stage(&self, c: Change) -> Result<(), FabricError> {
        self.sm.stage(c)
    }
    fn discard_staged(&self) -> usize {
        self.sm.discard_staged()
    }
    fn apply(&self) -> Result<Ticket, FabricError> {
        self.sm.apply()
    }
    fn observe(&self, g: &[Guid]) -> Result<Observation, FabricError> {
        self.sm.observe(g)
    }
    fn health(&self) -> Result<Health, FabricError> {
        self.sm.health()
    }
    fn persisted_restores(&self) -> Result<Vec<RestoreNote>, FabricError> {
        Ok(self.restores.clone())
    }
}

/// A restore at `generation`; `swept`: the backend has seen a clean sweep
/// after it (its own check at the SA is recorded).
fn note(generation: u64, swept: bool) -> RestoreNote {
    RestoreNote {
        at_unix: 1_790_000_000 + generation,
        generation,
        reason: "PARSE ERROR line 3".into(),
        restored: "the operator's last parseable text with devfence's current block".into(),
        reverified: swept.then(|| format!("at {}: 1 port(s) verified at the SA", generation + 1)),
        failed: false,
    }
}

/// issue 17 item 2: a restore the backend persisted is appended to the audit
/// chain exactly once whichever process sees it (dedupe by its stable id),
/// and a newly recorded restore re-verifies every Ready device — quarantining
/// the one whose port the restore left without its partition.
#[test]
fn a_restore_is_audited_once_and_reverifies() {
    let mut fx = fixture();
    let (a, b) = (dev(IB_VF), dev(PCI_VF));
    fx.engine().assign(&a, &t("acme"), None).unwrap();
    fx.engine().assign(&b, &t("globex"), None).unwrap();
    let g = issued(&mut fx, &a);
    strip_at_sm(&mut fx, g);
    let sm = std::sync::Arc::clone(&fx.sm);
    let mut run = |restores: Vec<RestoreNote>| {
        let wrapped = Restoring { sm: &*sm, restores };
        Engine::new(&mut fx.store, &fx.kernel, &wrapped, cfg())
            .record_fabric_restores()
            .unwrap()
    };
    // Recorded at once; the devices are re-verified once the SM has swept
    // the restored file.
    let (new, rv) = run(vec![note(7, false)]);
    assert_eq!(new.len(), 1);
    assert!(rv.is_none());
    let (new, rv) = run(vec![note(7, true)]);
    assert!(new.is_empty());
    let rv = rv.unwrap();
    assert!(
        matches!(
            check_of(&rv, &a),
            Check::Drifted {
                quarantined: true,
                ..
            }
        ),
        "{rv:?}"
    );
    assert!(
        matches!(check_of(&rv, &b), Check::Verified { .. }),
        "{rv:?}"
    );
    // A second process sees the same restore: nothing new, nothing re-run.
    let (new, rv) = run(vec![note(7, true)]);
    assert!(new.is_empty() && rv.is_none());
    // A later restore is recorded in its turn.
    let (new, rv) = run(vec![note(7, true), note(9, true)]);
    assert_eq!(new.len(), 1);
    assert!(rv.is_some());
    let all = fx.store.audit_show(&AuditFilter::default()).unwrap();
    let restores: Vec<_> = all
        .iter()
        .filter(|r| r.detail["event"] == "fabric-restore")
        .collect();
    assert_eq!(restores.len(), 2, "{restores:?}");
    assert_eq!(restores[0].detail["restore"], "7@1790000007");
    let summaries = all
        .iter()
        .filter(|r| r.detail["after"] == "fabric-restore")
        .count();
    assert_eq!(summaries, 2);
    assert!(fx.store.verify().is_ok());
}

/// issue 17 item 2: port tables read after a sweep that failed (the state while
/// an operator's unparseable file is being restored) are unknown, never a
/// drift: nothing is quarantined on them — by `reverify` or at VM start.
#[test]
fn a_failed_sweep_is_unknown_not_a_drift() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let g = issued(&mut fx, &d);
    strip_at_sm(&mut fx, g);
    // The next sweep fails, and its retry is an hour away.
    fx.sm.set_lag(std::time::Duration::from_secs(3600));
    fx.sm.fail_next_sweep();
    fx.sm.apply().unwrap();
    fx.sm.advance(std::time::Duration::from_secs(3601));
    let rv = fx.engine().reverify(None).unwrap();
    assert!(
        matches!(check_of(&rv, &d), Check::Unknown { why } if why.contains("ended with errors")),
        "{rv:?}"
    );
    assert!(matches!(state(&mut fx, &d), DeviceState::Ready { .. }));
    let spec = DomainSpec {
        name: "web1".into(),
        uuid: None,
        tenant: Some(t("acme")),
        hostdevs: vec![d],
        unsupported: vec![],
    };
    let r = fx
        .engine()
        .start_domain(&spec, Unidentified::Refuse)
        .unwrap_err();
    assert!(r.reason.contains("ended with errors"), "{r}");
    assert!(matches!(state(&mut fx, &d), DeviceState::Ready { .. }));
}
