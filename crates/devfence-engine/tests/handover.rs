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

// ----------------------------------------------------------------------
// Every kind, end to end

use devfence_engine::engine::{Done, PlannedStep};
use devfence_engine::{GuidState, StepState, StoreExt};
use devfence_host::actuator::KernelIo;
use devfence_model::Guid;

fn ready_for(tenant: &str, vm: Option<&str>) -> DeviceState {
    DeviceState::Ready {
        tenant: t(tenant),
        vm: vm.map(str::to_owned),
    }
}

fn state_of(fx: &mut Fx, d: &DeviceId) -> DeviceState {
    fx.store
        .atomically(|tx| tx.device(d))
        .unwrap()
        .unwrap()
        .state
}

fn issued(fx: &mut Fx, d: &DeviceId) -> Vec<Guid> {
    fx.store
        .atomically(|tx| tx.guids_of(d))
        .unwrap()
        .into_iter()
        .filter(|r| r.state == GuidState::Issued)
        .map(|r| r.guid)
        .collect()
}

/// Every kind: assign → VM start → VM stop → scrubbed and Free (an mdev is
/// removed and retired: its UUID is single-use).
#[test]
fn every_kind_goes_assign_active_drain_free() {
    for kind in ["ib-vf", "pci", "token-vf", "mdev"] {
        let mut fx = fixture();
        let d0 = match kind {
            "ib-vf" => dev(IB_VF),
            "pci" => dev(PCI_VF),
            "token-vf" => dev(TOKEN_VF),
            _ => fx.new_mdev(),
        };
        let a = fx.engine().assign(&d0, &t("acme"), Some("web1")).unwrap();
        assert_eq!(a.state, ready_for("acme", Some("web1")), "{kind}");
        let d = a.device;
        if kind == "mdev" {
            assert_ne!(d, d0, "an mdev is re-created with a fresh UUID");
        }
        let n = fx.node(&d).unwrap();
        assert_eq!(
            (n.uid, n.gid, n.mode),
            (ACME_UID, ACME_UID, 0o600),
            "{kind}"
        );
        // Only the VM it is reserved for, of its tenant, may start with it.
        assert!(fx.engine().vm_started(&d, &t("acme"), "web2").is_err());
        assert!(fx.engine().vm_started(&d, &t("globex"), "web1").is_err());
        fx.engine().vm_started(&d, &t("acme"), "web1").unwrap();
        assert_eq!(
            state_of(&mut fx, &d),
            DeviceState::Active {
                tenant: t("acme"),
                vm: "web1".into()
            }
        );
        let guids = issued(&mut fx, &d);
        if kind == "ib-vf" {
            assert_eq!(guids.len(), 1);
            assert_eq!(
                fx.programmed_bases(guids[0]),
                [ACME_BASE, 0x7fff].into(),
                "acme's GUID in acme's partition"
            );
        }
        let done = fx.engine().vm_stopped(&d).unwrap();
        match kind {
            "mdev" => {
                assert!(
                    matches!(&done.state, DeviceState::Quarantined { reason } if reason.contains("retired")),
                    "{:?}",
                    done.state
                );
                assert!(!fx.kernel.exists(&format!("/sys/bus/mdev/devices/{d}")));
            }
            _ => {
                assert_eq!(done.state, DeviceState::Free, "{kind}");
                let n = fx.node(&d).unwrap();
                assert_eq!((n.uid, n.gid), (0, 0), "{kind}: the launcher lost the node");
            }
        }
        // What the release did is journalled in order.
        let j = fx.store.atomically(|tx| tx.journal(done.op)).unwrap();
        assert_eq!(j.first().unwrap().step, "begin");
        assert_eq!(j.last().unwrap().step, "finish");
        for g in guids {
            let r = fx.store.atomically(|tx| tx.guid(g)).unwrap().unwrap();
            assert!(matches!(
                r.state,
                GuidState::Quarantined | GuidState::Cleared
            ));
            let p = fx.programmed_bases(g);
            assert!(p.iter().all(|b| *b == 0x7fff), "{g}: {p:x?}");
        }
        if kind == "token-vf" {
            assert!(!fx.token_path(TOKEN_VF).exists(), "the token is withdrawn");
        }
        let open = fx.store.atomically(|tx| tx.open_operations()).unwrap();
        assert!(open.is_empty());
        fx.store.verify().unwrap();
    }
}

/// A PCI VF handed over: acme's launcher loses the node, globex's gets it.
#[test]
fn pci_handover_moves_the_group_node() {
    let mut fx = fixture();
    let d = dev(PCI_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let b = fx.engine().handover(&d, &t("globex"), Some("db1")).unwrap();
    assert_eq!(b.state, ready_for("globex", Some("db1")));
    assert_eq!(b.device, d);
    assert_eq!(b.token_file, None);
    let n = fx.node(&d).unwrap();
    assert_eq!((n.uid, n.gid, n.mode), (GLOBEX_UID, GLOBEX_UID, 0o600));
    let driver = fx
        .kernel
        .read_link(&format!("/sys/bus/pci/devices/{PCI_VF}/driver"))
        .unwrap();
    assert!(driver.ends_with("/vfio-pci"), "{driver}");
    fx.store.verify().unwrap();
}

/// A VF of a user-space PF handed over: a fresh token, delivered to globex's
/// launcher only (0600, 108:108); acme's token no longer opens the VF.
#[test]
fn token_vf_handover_sets_and_delivers_a_fresh_token() {
    use std::os::unix::fs::MetadataExt;
    let mut fx = fixture();
    let d = dev(TOKEN_VF);
    let a = fx.engine().assign(&d, &t("acme"), None).unwrap();
    let path = fx.token_path(TOKEN_VF);
    assert_eq!(
        a.token_file.as_deref(),
        Some("/run/devfence/tokens/0000:af:10.0.token")
    );
    let acme_tok = fx.delivered_token(TOKEN_VF).unwrap();
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (ACME_UID, ACME_UID, 0o600)
    );
    {
        let open = fx
            .kernel
            .open_vf(bdf(TOKEN_VF), Some(&parse_token(&acme_tok)));
        assert!(open.is_ok(), "acme's token opens its VF: {open:?}");
    }
    let b = fx.engine().handover(&d, &t("globex"), None).unwrap();
    assert_eq!(b.state, ready_for("globex", None));
    assert_eq!(b.token_file, a.token_file);
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (GLOBEX_UID, GLOBEX_UID, 0o600)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1, "one line");
    assert!(text.ends_with('\n'));
    let globex_tok = text.trim_end().to_owned();
    assert_eq!(globex_tok.len(), 36);
    assert_ne!(globex_tok, acme_tok, "a fresh token");
    // The kernel takes globex's token, and no longer acme's, nor none.
    assert!(
        fx.kernel
            .open_vf(bdf(TOKEN_VF), Some(&parse_token(&acme_tok)))
            .is_err()
    );
    assert!(fx.kernel.open_vf(bdf(TOKEN_VF), None).is_err());
    assert!(
        fx.kernel
            .open_vf(bdf(TOKEN_VF), Some(&parse_token(&globex_tok)))
            .is_ok()
    );
    let n = fx.node(&d).unwrap();
    assert_eq!((n.uid, n.gid), (GLOBEX_UID, GLOBEX_UID));
    fx.store.verify().unwrap();
}

/// An mdev handed over is removed and re-created with a new UUID; the old UUID
/// is retired (Quarantined, never reused).
#[test]
fn mdev_handover_recreates_it_with_a_new_uuid() {
    let mut fx = fixture();
    let m0 = fx.new_mdev();
    let a = fx.engine().assign(&m0, &t("acme"), None).unwrap();
    let m1 = a.device;
    assert_ne!(m1, m0);
    let b: Done = fx.engine().handover(&m1, &t("globex"), None).unwrap();
    let m2 = b.device;
    assert_ne!(m2, m1, "a new UUID for the new tenant");
    assert_ne!(m2, m0);
    assert_eq!(b.state, ready_for("globex", None));
    assert_eq!(state_of(&mut fx, &m2), ready_for("globex", None));
    for old in [m0, m1] {
        assert!(
            matches!(state_of(&mut fx, &old), DeviceState::Quarantined { reason } if reason.contains("retired")),
            "{old}"
        );
        assert!(
            !fx.kernel.exists(&format!("/sys/bus/mdev/devices/{old}")),
            "{old} removed"
        );
    }
    assert!(fx.kernel.exists(&format!("/sys/bus/mdev/devices/{m2}")));
    let n = fx.node(&m2).unwrap();
    assert_eq!((n.uid, n.gid, n.mode), (GLOBEX_UID, GLOBEX_UID, 0o600));
    // The retired UUID cannot be handed out again.
    let e = fx.engine().assign(&m1, &t("acme"), None).unwrap_err();
    assert!(e.to_string().contains("no such mdev"), "{e}");
    fx.store.verify().unwrap();
}

/// An IB VF handed over: acme's GUID is retired and never reissued; the new
/// GUID is in exactly globex's partition at the SM; the gate read the VF's
/// port table back (journal evidence).
#[test]
fn ib_vf_handover_rotates_the_guid_and_verifies_the_port() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let acme = issued(&mut fx, &d);
    assert_eq!(acme.len(), 1);
    let b = fx.engine().handover(&d, &t("globex"), None).unwrap();
    let new = issued(&mut fx, &d);
    assert_eq!(new.len(), 1);
    let g = new[0];
    assert_ne!(g, acme[0], "never reissued");
    let old = fx.store.atomically(|tx| tx.guid(acme[0])).unwrap().unwrap();
    assert!(matches!(
        old.state,
        GuidState::Quarantined | GuidState::Cleared
    ));
    // At the SM: globex's partition (full) only, plus the default one.
    let prog = fx.sm.programmed();
    let keys = prog.get(&g).unwrap();
    assert!(keys.contains(&PKey(0x8002)), "{keys:x?}");
    assert!(
        keys.iter()
            .all(|k| k.base() == GLOBEX_BASE || k.base() == 0x7fff),
        "{keys:x?}"
    );
    assert_eq!(fx.configured_bases(g), [GLOBEX_BASE].into());
    assert!(fx.programmed_bases(acme[0]).iter().all(|b| *b == 0x7fff));
    assert!(fx.configured_bases(acme[0]).is_empty());
    // The port gate's evidence: the VF's table at the port held globex's key and
    // nobody else's.
    let j = fx.store.atomically(|tx| tx.journal(b.op)).unwrap();
    let gate = j
        .iter()
        .find(|s| s.step == "gate:port-pkeys" && s.state == StepState::Done)
        .expect("gate:port-pkeys passed");
    let ev = &gate.detail["evidence"];
    assert_eq!(gate.detail["passed"], true);
    assert_eq!(ev["guid"], serde_json::to_value(g).unwrap(), "{ev}");
    let table: Vec<&str> = ev["table"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(table.contains(&"0x8002"), "{table:?}");
    assert!(
        !table
            .iter()
            .any(|k| k.ends_with("8001") || k.ends_with("0001")),
        "{table:?}"
    );
    assert_eq!(ev["missing"], serde_json::json!([]));
    assert_eq!(ev["other-tenant"], serde_json::json!([]));
    assert!(
        ev["path"]
            .as_str()
            .unwrap()
            .starts_with(&format!("/sys/bus/pci/devices/{IB_VF}/infiniband/"))
    );
    // And the SM gate before it checked the same three questions.
    let sm = j
        .iter()
        .find(|s| s.step == "gate:sm-verified" && s.state == StepState::Done)
        .unwrap();
    assert_eq!(sm.detail["passed"], true);
    // Back on vfio-pci for the VM.
    let driver = fx
        .kernel
        .read_link(&format!("/sys/bus/pci/devices/{IB_VF}/driver"))
        .unwrap();
    assert!(driver.ends_with("/vfio-pci"), "{driver}");
    let n = fx.node(&d).unwrap();
    assert_eq!((n.uid, n.gid), (GLOBEX_UID, GLOBEX_UID));
    // A second handover back: yet another GUID.
    fx.engine().handover(&d, &t("acme"), None).unwrap();
    let third = issued(&mut fx, &d);
    assert_eq!(third.len(), 1);
    assert!(third[0] != g && third[0] != acme[0]);
}

/// The distinct step names of a journal, in order (a step appears Planned,
/// then Done; a state move once).
fn journal_steps(fx: &mut Fx, done: &Done) -> Vec<String> {
    let j = fx.store.atomically(|tx| tx.journal(done.op)).unwrap();
    let mut out: Vec<String> = Vec::new();
    for e in j {
        if out.last() != Some(&e.step) {
            out.push(e.step);
        }
    }
    out
}

fn names(p: &[PlannedStep]) -> Vec<String> {
    p.iter().map(|s| s.name.clone()).collect()
}

/// `plan` lists exactly the steps the operation then journals, for assign,
/// handover and release of every kind.
#[test]
fn plan_lists_the_steps_the_journal_then_shows() {
    for kind in ["ib-vf", "pci", "token-vf", "mdev"] {
        let mut fx = fixture();
        let d0 = match kind {
            "ib-vf" => dev(IB_VF),
            "pci" => dev(PCI_VF),
            "token-vf" => dev(TOKEN_VF),
            _ => fx.new_mdev(),
        };
        let p = fx.engine().plan(&d0, Some(&t("acme"))).unwrap();
        let a = fx.engine().assign(&d0, &t("acme"), None).unwrap();
        assert_eq!(names(&p), journal_steps(&mut fx, &a), "{kind} assign");
        let d = a.device;
        let p = fx.engine().plan(&d, Some(&t("globex"))).unwrap();
        let b = fx.engine().handover(&d, &t("globex"), None).unwrap();
        assert_eq!(names(&p), journal_steps(&mut fx, &b), "{kind} handover");
        let d = b.device;
        let p = fx.engine().plan(&d, None).unwrap();
        let c = fx.engine().release(&d).unwrap();
        assert_eq!(names(&p), journal_steps(&mut fx, &c), "{kind} release");
        for s in &p {
            assert!(!s.what.is_empty(), "{kind}: {} says what it does", s.name);
        }
    }
}

/// An IB VF without a GUID yet (its OFED port GUID reads zero): nothing to
/// retire at the fabric — and the plan says so too.
#[test]
fn plan_of_an_ib_vf_without_a_guid_matches_its_journal() {
    let mut fx = fixture();
    let port = fx
        .root
        .path("/sys/bus/pci/devices/0000:3b:00.0/sriov/1/port");
    std::fs::write(&port, "00:00:00:00:00:00:00:00\n").unwrap();
    let d = dev("0000:3b:00.2");
    let p = fx.engine().plan(&d, Some(&t("acme"))).unwrap();
    let a = fx.engine().assign(&d, &t("acme"), None).unwrap();
    assert_eq!(names(&p), journal_steps(&mut fx, &a));
}

/// A gate reads and changes nothing, so it is journalled once, with its result
/// (one transaction per gate); a step that acts is journalled `Planned` before
/// it acts and `Done` after (journal first). An IB VF handover has both.
#[test]
fn a_gate_is_one_journal_row_and_a_step_two() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let done = fx.engine().handover(&d, &t("globex"), None).unwrap();
    let j = fx.store.atomically(|tx| tx.journal(done.op)).unwrap();
    let rows = |name: &str| -> Vec<StepState> {
        j.iter()
            .filter(|r| r.step == name)
            .map(|r| r.state)
            .collect()
    };
    let gates: std::collections::BTreeSet<&str> = j
        .iter()
        .map(|r| r.step.as_str())
        .filter(|s| s.starts_with("gate:"))
        .collect();
    assert!(gates.contains("gate:sm-verified"), "{gates:?}");
    assert!(gates.contains("gate:group-rules"), "{gates:?}");
    for g in gates {
        assert_eq!(rows(g), vec![StepState::Done], "{g}");
    }
    for s in ["guid-set", "fabric-move", "bind-vfio"] {
        assert_eq!(rows(s), vec![StepState::Planned, StepState::Done], "{s}");
    }
}

// ----------------------------------------------------------------------
// issue 18 item 4: the pool never issues a GUID the SM knows

/// issue 18 item 4: the GUID pool never issues a GUID the SM knows: GUIDs of the
/// pool's range named in the SM's configuration are skipped (and remembered as
/// foreign), so the VF gets a GUID in no partition but its tenant's.
#[test]
fn the_pool_skips_guids_the_sm_knows() {
    use devfence_fabric::SubnetManager;
    let mut fx = fixture();
    let taken = [POOL_FIRST, Guid(POOL_FIRST.0 + 1)];
    for g in taken {
        fx.sm
            .stage_add(
                g,
                devfence_fabric::PartitionKey::new(0x0005).unwrap(),
                devfence_model::Membership::Full,
            )
            .unwrap();
    }
    fx.sm.apply().unwrap();
    fx.sm.settle();
    let vf: DeviceId = "0000:3b:00.1".parse().unwrap();
    fx.engine().assign(&vf, &t("acme"), None).unwrap();
    let issued: Vec<Guid> = fx
        .store
        .atomically(|tx| tx.guids_of(&vf))
        .unwrap()
        .into_iter()
        .filter(|r| r.state == GuidState::Issued)
        .map(|r| r.guid)
        .collect();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert!(
        !taken.contains(&issued[0]),
        "issued a GUID the SM knows: {issued:?}"
    );
    for g in taken {
        let rec = fx.store.atomically(|tx| tx.guid(g)).unwrap().unwrap();
        assert_eq!(rec.state, GuidState::Foreign, "{g}");
    }
}

// ----------------------------------------------------------------------
// issue 14 item 2: one verified IB handover in one sweep

/// The SM applies of `fx`'s history from `from` on.
fn applies_since(fx: &Fx, from: usize) -> Vec<Vec<devfence_fabric::Change>> {
    fx.sm.history()[from..]
        .iter()
        .filter_map(|h| match &h.event {
            devfence_fabric::sim::SimEvent::Applied { changes, .. } => Some(changes.clone()),
            _ => None,
        })
        .collect()
}

/// With a GUID pool, a handover of an IB VF takes the old GUID out of acme's
/// partition and puts the fresh GUID into globex's in ONE apply, then verifies
/// every question at the SM and the port's table before Ready; the device goes
/// from Scrubbing to Preparing without claiming Free on the way.
#[test]
fn ib_vf_handover_with_a_pool_revokes_and_grants_in_one_apply() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let acme = issued(&mut fx, &d)[0];
    let before = fx.sm.history().len();
    let b = fx.engine().handover(&d, &t("globex"), None).unwrap();
    assert_eq!(b.state, ready_for("globex", None));
    let g = issued(&mut fx, &d)[0];
    let applies = applies_since(&fx, before);
    assert_eq!(applies.len(), 1, "one apply: {applies:?}");
    let changes = &applies[0];
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, devfence_fabric::Change::RemoveAll { guid } if *guid == acme)),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, devfence_fabric::Change::Add { guid, .. } if *guid == g)),
        "the fresh GUID is granted in the same apply: {changes:?}"
    );
    let steps = journal_steps(&mut fx, &b);
    assert!(steps.contains(&"fabric-move".to_string()), "{steps:?}");
    for gone in [
        "fabric-revoke",
        "gate:fabric-revoked",
        "fabric-grant",
        "state:free",
    ] {
        assert!(!steps.contains(&gone.to_string()), "{gone} in {steps:?}");
    }
    // The one gate asked about the old GUID too (question 1), and the port's
    // table was read after it.
    let i_sm = steps.iter().position(|s| s == "gate:sm-verified").unwrap();
    let i_port = steps.iter().position(|s| s == "gate:port-pkeys").unwrap();
    let i_ready = steps.iter().position(|s| s == "state:ready").unwrap();
    assert!(i_sm < i_port && i_port < i_ready, "{steps:?}");
    let j = fx.store.atomically(|tx| tx.journal(b.op)).unwrap();
    let gate = j
        .iter()
        .find(|s| s.step == "gate:sm-verified" && s.state == StepState::Done)
        .unwrap();
    let proof = gate.detail["evidence"]["proof"].to_string();
    assert!(proof.contains(&acme.to_string()), "{proof}");
    assert!(fx.configured_bases(acme).is_empty());
    assert!(fx.programmed_bases(acme).iter().all(|b| *b == 0x7fff));
    assert_eq!(fx.configured_bases(g), [GLOBEX_BASE].into());
    let moved = j.iter().find(|s| s.step == "state:preparing").unwrap();
    assert_eq!(moved.detail["from"], "Scrubbing", "{}", moved.detail);
}

/// Without a GUID pool no fresh GUID can be had: the handover keeps the
/// two-sweep path, so acme's GUID is revoked and verified on its own before the
/// allocation fails (the device is quarantined with nothing of acme's left at
/// the SM), and the plan says so.
#[test]
fn ib_vf_handover_without_a_pool_keeps_the_revoke_sweep() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let acme = issued(&mut fx, &d)[0];
    drop_guid_pool(&fx);
    let p = names(&fx.engine().plan(&d, Some(&t("globex"))).unwrap());
    for s in [
        "fabric-revoke",
        "gate:fabric-revoked",
        "state:free",
        "fabric-grant",
    ] {
        assert!(p.contains(&s.to_string()), "{s} not in {p:?}");
    }
    assert!(!p.contains(&"fabric-move".to_string()), "{p:?}");
    let e = fx.engine().handover(&d, &t("globex"), None).unwrap_err();
    let devfence_engine::engine::EngineError::Failed { step, .. } = &e else {
        panic!("{e}");
    };
    assert_eq!(step, "guid-allocate", "{e}");
    assert!(fx.configured_bases(acme).is_empty());
    assert!(fx.programmed_bases(acme).iter().all(|b| *b == 0x7fff));
}

/// An exhausted pool is still a pool: the handover takes the one-sweep path,
/// fails at the allocation, and applies the deferred revocation on its own
/// before it reports the failure, so acme's GUID is in no partition.
#[test]
fn ib_vf_handover_that_fails_before_its_one_apply_still_revokes_the_old_guid() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let acme = issued(&mut fx, &d)[0];
    let last = fx
        .store
        .atomically(|tx| {
            tx.set_guid_pool(devfence_engine::GuidRange {
                first: acme,
                last: acme,
            })
            .map(|()| acme)
        })
        .unwrap();
    assert_eq!(last, acme);
    let e = fx.engine().handover(&d, &t("globex"), None).unwrap_err();
    let devfence_engine::engine::EngineError::Failed { step, .. } = &e else {
        panic!("{e}");
    };
    assert_eq!(step, "guid-allocate", "{e}");
    assert!(
        fx.configured_bases(acme).is_empty(),
        "acme's GUID still configured"
    );
    assert!(fx.programmed_bases(acme).iter().all(|b| *b == 0x7fff));
    assert!(matches!(
        state_of(&mut fx, &d),
        DeviceState::Quarantined { .. }
    ));
}

/// Removes the ledger's GUID pool (a ledger set up before pools existed).
fn drop_guid_pool(fx: &Fx) {
    let c = rusqlite::Connection::open(&fx.db).unwrap();
    c.execute("DELETE FROM guid_pool", []).unwrap();
}
