//! Batches of IB VF operations (issue 12 item 5): one apply (one sweep) at the
//! SM for every member, every member's own gates; a member that fails drops out
//! alone; a crash anywhere in a batch of two is recovered.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use devfence_engine::engine::{
    BatchItem, Crash, CrashMode, EngineConfig, EngineError, Failpoints, Progress,
};
use devfence_engine::{DeviceState, GuidState, StepState, StoreExt};
use devfence_model::{DeviceId, Guid, TenantId};

/// The lab's four IB VFs.
const VFS: [&str; 4] = [
    "0000:3b:00.1",
    "0000:3b:00.2",
    "0000:3b:00.3",
    "0000:3b:00.4",
];
const DEFAULT: u16 = 0x7fff;

fn vfs(n: usize) -> Vec<DeviceId> {
    VFS[..n].iter().map(|s| dev(s)).collect()
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

fn state(fx: &mut Fx, d: &DeviceId) -> DeviceState {
    fx.store
        .atomically(|tx| tx.device(d))
        .unwrap()
        .map_or(DeviceState::Free, |r| r.state)
}

/// `n` VFs assigned to acme one by one.
fn held_by_acme(fx: &mut Fx, n: usize) -> Vec<DeviceId> {
    let ds = vfs(n);
    for d in &ds {
        fx.engine().assign(d, &t("acme"), None).unwrap();
    }
    ds
}

fn handovers(ds: &[DeviceId], to: &str) -> Vec<BatchItem> {
    ds.iter()
        .map(|d| BatchItem::handover(*d, t(to), None))
        .collect()
}

/// The journal of the operation `op` as (step, state, detail).
fn journal(
    fx: &mut Fx,
    op: devfence_engine::OperationId,
) -> Vec<(String, StepState, serde_json::Value)> {
    fx.store
        .atomically(|tx| tx.journal(op))
        .unwrap()
        .into_iter()
        .map(|j| (j.step, j.state, j.detail))
        .collect()
}

#[test]
fn a_batch_of_handovers_is_one_apply_and_every_device_passes_its_own_gates() {
    let mut fx = fixture();
    let ds = held_by_acme(&mut fx, 4);
    let old: BTreeMap<DeviceId, Guid> = ds.iter().map(|d| (*d, issued(&mut fx, d)[0])).collect();
    let gen0 = fx.sm.generation();
    let mut events: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let report = fx
        .engine()
        .with_batch_progress(|slot, p| {
            if let Progress::Gate { name, passed, .. } = p {
                events
                    .entry(slot)
                    .or_default()
                    .push(format!("{name}:{passed}"));
            }
        })
        .run_batch(&handovers(&ds, "globex"));
    assert_eq!(report.size, 4);
    assert_eq!(report.applies, 1, "one apply for the four handovers");
    assert_eq!(fx.sm.generation().0 - gen0.0, 1, "one sweep at the SM");
    assert_eq!(report.shared, vec![true; 4]);
    for (i, (d, r)) in ds.iter().zip(&report.results).enumerate() {
        let done = r.as_ref().unwrap_or_else(|e| panic!("{d}: {e}"));
        assert!(
            matches!(&done.state, DeviceState::Ready { tenant, .. } if *tenant == t("globex")),
            "{d}: {}",
            done.state
        );
        // Its own gates, each passed, each reported for its own slot.
        let ev = &events[&i];
        for g in [
            "sm-verified:true",
            "port-pkeys:true",
            "driver:true",
            "node-owner:true",
        ] {
            assert!(ev.iter().any(|e| e == g), "{d}: {g} not in {ev:?}");
        }
        // Its own journal: the shared step, naming the batch, and its gates.
        let j = journal(&mut fx, done.op);
        let mv: Vec<_> = j.iter().filter(|(s, _, _)| s == "fabric-move").collect();
        assert_eq!(mv.len(), 2, "{d}: planned and done: {mv:?}");
        assert_eq!(mv[1].1, StepState::Done);
        assert_eq!(mv[0].2["batch"]["id"], report.id.as_str());
        assert_eq!(mv[0].2["batch"]["size"], 4);
        assert_eq!(mv[0].2["revoke"][0], old[d].to_string());
        let gate = j
            .iter()
            .find(|(s, _, _)| s == "gate:sm-verified")
            .unwrap_or_else(|| panic!("{d}: no sm-verified gate"));
        assert_eq!(gate.1, StepState::Done);
        assert_eq!(gate.2["passed"], true);
        // At the SM: the new GUID in exactly globex's partition, the old one in none.
        let new = issued(&mut fx, d);
        assert_eq!(new.len(), 1);
        assert_eq!(
            fx.programmed_bases(new[0]),
            BTreeSet::from([0x0002, DEFAULT])
        );
        assert!(fx.programmed_bases(old[d]).iter().all(|b| *b == DEFAULT));
        assert!(fx.configured_bases(old[d]).is_empty());
    }
    assert!(fx.store.verify().is_ok());
}

/// `run_batch_with` hands each member's result over as soon as its own gates
/// are done: the first member's end comes before the second member's gates.
#[test]
fn each_member_is_answered_when_its_own_gates_are_done() {
    let mut fx = fixture();
    let ds = held_by_acme(&mut fx, 2);
    let log = std::cell::RefCell::new(Vec::<String>::new());
    let summary = fx
        .engine()
        .with_batch_progress(|slot, p| {
            if let Progress::Gate { name, .. } = p {
                log.borrow_mut().push(format!("{slot}:{name}"));
            }
        })
        .run_batch_with(&handovers(&ds, "globex"), &mut |r| {
            assert!(r.result.is_ok(), "{:?}", r.result);
            assert!(r.shared);
            assert_eq!(r.size, 2);
            log.borrow_mut().push(format!("{}:done", r.slot));
        });
    assert_eq!(summary.applies, 1);
    let log = log.into_inner();
    let at = |s: &str| {
        log.iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("{s}: {log:?}"))
    };
    assert!(at("0:done") < at("1:sm-verified"), "{log:?}");
    assert!(at("1:done") > at("1:node-owner"), "{log:?}");
}

#[test]
fn one_at_a_time_the_same_handovers_take_one_apply_each() {
    // The reference the batch is measured against: four applies.
    let mut fx = fixture();
    let ds = held_by_acme(&mut fx, 4);
    let gen0 = fx.sm.generation();
    let mut e = fx.engine();
    for d in &ds {
        e.handover(d, &t("globex"), None).unwrap();
    }
    assert_eq!(e.sm_applies(), 4);
    drop(e);
    assert_eq!(fx.sm.generation().0 - gen0.0, 4);
}

#[test]
fn a_batch_of_releases_is_one_apply() {
    let mut fx = fixture();
    let ds = held_by_acme(&mut fx, 3);
    let old: Vec<Guid> = ds.iter().map(|d| issued(&mut fx, d)[0]).collect();
    let items: Vec<BatchItem> = ds.iter().map(|d| BatchItem::release(*d)).collect();
    let report = fx.engine().run_batch(&items);
    assert_eq!(report.applies, 1);
    for r in &report.results {
        assert_eq!(r.as_ref().unwrap().state, DeviceState::Free);
    }
    for g in old {
        assert!(fx.programmed_bases(g).iter().all(|b| *b == DEFAULT));
        assert!(fx.configured_bases(g).is_empty());
    }
}

#[test]
fn a_member_that_fails_before_the_apply_drops_out_alone() {
    let mut fx = fixture();
    let ds = held_by_acme(&mut fx, 4);
    // A tenant without IB partitions: the third handover fails at its prepare
    // (before the shared apply); the fourth is refused outright (acme holds it
    // already).
    let mut bare = tenant("initech", 109, 0x8003);
    bare.partitions.clear();
    fx.store.atomically(|tx| tx.add_tenant(&bare)).unwrap();
    let bad_old = issued(&mut fx, &ds[2])[0];
    let items = vec![
        BatchItem::handover(ds[0], t("globex"), None),
        BatchItem::handover(ds[1], t("globex"), None),
        BatchItem::handover(ds[2], t("initech"), None),
        BatchItem::handover(ds[3], t("acme"), None),
    ];
    let report = fx.engine().run_batch(&items);
    assert_eq!(report.size, 2, "the two good ones share the apply");
    assert_eq!(report.shared, vec![true, true, false, false]);
    for r in &report.results[..2] {
        assert!(matches!(
            r.as_ref().unwrap().state,
            DeviceState::Ready { .. }
        ));
    }
    match &report.results[2] {
        Err(EngineError::Failed { state, .. }) => {
            assert!(state.to_lowercase().starts_with("quarantined"), "{state}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        report.results[3],
        Err(EngineError::Refused { .. })
    ));
    assert!(matches!(
        state(&mut fx, &ds[2]),
        DeviceState::Quarantined { .. }
    ));
    // The dropped-out device's old GUID left the fabric all the same (its own
    // revoke, as a single handover that fails does).
    assert!(fx.programmed_bases(bad_old).iter().all(|b| *b == DEFAULT));
    assert!(fx.configured_bases(bad_old).is_empty());
    // acme still holds the refused one, untouched.
    assert!(matches!(
        state(&mut fx, &ds[3]),
        DeviceState::Ready { tenant, .. } if tenant == t("acme")
    ));
}

#[test]
fn a_gate_that_fails_for_one_member_fails_that_member_only() {
    let mut fx = fixture();
    let ds = held_by_acme(&mut fx, 3);
    let sm = Arc::clone(&fx.sm);
    // Right after the shared apply, the second member's new port leaves the
    // fabric: only its sm-verified gate can see it.
    let mut new_guid: Option<Guid> = None;
    let cfg = EngineConfig {
        gate_deadline: Duration::from_millis(300),
        ..cfg()
    };
    let report = fx
        .engine_with(Failpoints::none(), cfg)
        .with_batch_progress(|slot, p| {
            if slot != 1 {
                return;
            }
            if let Progress::Step {
                name,
                state,
                detail,
                ..
            } = p
                && name == "fabric-move"
            {
                match state {
                    StepState::Planned => {
                        new_guid = detail["guid"].as_str().and_then(|g| g.parse().ok());
                    }
                    StepState::Done => sm.detach(new_guid.unwrap()),
                    StepState::Failed => {}
                }
            }
        })
        .run_batch(&handovers(&ds, "globex"));
    assert_eq!(report.applies, 1);
    assert!(report.results[0].is_ok(), "{:?}", report.results[0]);
    assert!(report.results[2].is_ok(), "{:?}", report.results[2]);
    match &report.results[1] {
        Err(EngineError::Failed { step, .. }) => assert_eq!(step, "gate:sm-verified"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        state(&mut fx, &ds[1]),
        DeviceState::Quarantined { .. }
    ));
    assert!(matches!(state(&mut fx, &ds[0]), DeviceState::Ready { .. }));
    assert!(matches!(state(&mut fx, &ds[2]), DeviceState::Ready { .. }));
}

#[test]
fn items_that_cannot_share_the_apply_run_alone() {
    let mut fx = fixture();
    let ib = held_by_acme(&mut fx, 2);
    let pci = dev(PCI_VF);
    let mut items = handovers(&ib, "globex");
    items.push(BatchItem::assign(pci, t("globex"), None));
    let report = fx.engine().run_batch(&items);
    assert_eq!(report.size, 2);
    assert_eq!(report.shared, vec![true, true, false]);
    for r in &report.results {
        assert!(matches!(
            r.as_ref().unwrap().state,
            DeviceState::Ready { .. }
        ));
    }
    assert_eq!(report.applies, 1, "the PCI VF needs no apply");
}

// ---------------------------------------------------------------------------
// Crashes

fn is_held(state: &DeviceState) -> bool {
    matches!(
        state,
        DeviceState::Ready { .. } | DeviceState::Active { .. } | DeviceState::Draining { .. }
    )
}

/// Every failpoint a clean batch of two handovers (acme → globex) passes, with
/// its occurrence (a name both members pass appears twice).
fn batch_failpoints() -> Vec<(String, usize)> {
    let mut fx = fixture();
    let ds = held_by_acme(&mut fx, 2);
    let fp = Failpoints::none();
    let report = fx
        .engine_with(fp.clone(), cfg())
        .run_batch(&handovers(&ds, "globex"));
    assert!(
        report.results.iter().all(Result::is_ok),
        "{:?}",
        report.results
    );
    assert_eq!(report.applies, 1);
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    fp.seen()
        .into_iter()
        .map(|n| {
            let c = count.entry(n.clone()).or_default();
            *c += 1;
            (n, *c - 1)
        })
        .collect()
}

/// A batch of two handovers dies at `point` (its `nth` passing); a new process
/// recovers. Returns the problems found.
fn batch_crash_run(point: &str, nth: usize) -> Vec<String> {
    let mut fx = fixture();
    let ds = held_by_acme(&mut fx, 2);
    let before: BTreeMap<DeviceId, Guid> = ds.iter().map(|d| (*d, issued(&mut fx, d)[0])).collect();
    let mut problems = Vec::new();
    let ctx = format!("crash at {point} #{nth}");
    let mut ensure = |ok: bool, what: String| {
        if !ok {
            problems.push(format!("{ctx}: {what}"));
        }
    };
    let fp = Failpoints::crash_at_nth(point, nth, CrashMode::Panic);
    let res = catch_unwind(AssertUnwindSafe(|| {
        fx.engine_with(fp.clone(), cfg())
            .run_batch(&handovers(&ds, "globex"))
    }));
    match res {
        Ok(_) => {
            ensure(false, "the failpoint was not reached".into());
            return problems;
        }
        Err(p) => ensure(
            p.downcast_ref::<Crash>().is_some_and(|c| c.0 == point),
            "crashed elsewhere".into(),
        ),
    }
    fx.restart();
    let globex: TenantId = t("globex");
    // ---- at the crash: a device usable by globex is verified clean of acme ----
    let open = fx.store.atomically(|tx| tx.open_operations()).unwrap();
    let mut committed_ready = BTreeSet::new();
    for o in &open {
        let j = fx.store.atomically(|tx| tx.journal(o.id)).unwrap();
        if j.iter()
            .any(|x| x.step == "state:ready" && x.state == StepState::Done)
        {
            committed_ready.insert(o.device);
        }
    }
    let acme: TenantId = t("acme");
    // A member the batch had not begun yet is acme's, untouched.
    let untouched = |fx: &mut Fx, d: &DeviceId, st: &DeviceState| -> bool {
        matches!(st, DeviceState::Ready { tenant, .. } if *tenant == acme)
            && issued(fx, d) == vec![before[d]]
            && fx.programmed_bases(before[d]) == BTreeSet::from([0x0001, DEFAULT])
    };
    let touched: BTreeSet<DeviceId> = open.iter().map(|o| o.device).collect();
    for d in &ds {
        let st = state(&mut fx, d);
        if !touched.contains(d) && untouched(&mut fx, d, &st) {
            continue;
        }
        if let DeviceState::Ready { tenant, .. } = &st {
            ensure(*tenant == globex, format!("{d} is {st} at the crash"));
            let recs = fx.store.atomically(|tx| tx.guids_of(d)).unwrap();
            let cur = issued(&mut fx, d);
            ensure(cur.len() == 1, format!("{d} Ready with issued {cur:?}"));
            if let Some(g) = cur.first() {
                let got = fx.programmed_bases(*g);
                ensure(
                    got == BTreeSet::from([0x0002, DEFAULT]),
                    format!("{d} Ready but its GUID {g} is programmed {got:x?}"),
                );
            }
            for r in recs.iter().filter(|r| r.state != GuidState::Issued) {
                let p = fx.programmed_bases(r.guid);
                ensure(
                    p.iter().all(|b| *b == DEFAULT),
                    format!("{d} Ready but old GUID {} is in {p:x?}", r.guid),
                );
            }
        }
        if let Some(n) = fx.node(d) {
            ensure(
                [0, ACME_UID, GLOBEX_UID].contains(&n.uid),
                format!("{d}'s node is {}:{}", n.uid, n.gid),
            );
        }
    }
    // ---- recovery ----
    let rec = fx.engine().recover();
    let rec = match rec {
        Ok(r) => r,
        Err(e) => {
            ensure(false, format!("recover failed: {e}"));
            return problems;
        }
    };
    ensure(
        rec.len() == open.len(),
        format!("recovered {} of {} open operations", rec.len(), open.len()),
    );
    let open = fx.store.atomically(|tx| tx.open_operations()).unwrap();
    ensure(open.is_empty(), format!("still open: {open:?}"));
    let mut all: BTreeMap<Guid, DeviceId> = BTreeMap::new();
    for d in &ds {
        let st = state(&mut fx, d);
        match &st {
            DeviceState::Free => {}
            _ if !touched.contains(d) && untouched(&mut fx, d, &st) => {}
            DeviceState::Ready { tenant, .. } => ensure(
                *tenant == globex && !rec.iter().any(|r| r.device == *d)
                    || committed_ready.contains(d),
                format!("{d} is {st} after recovery"),
            ),
            other => ensure(false, format!("{d} is {other} after recovery")),
        }
        for r in fx.store.atomically(|tx| tx.guids_of(d)).unwrap() {
            if let Some(o) = all.insert(r.guid, *d) {
                ensure(false, format!("GUID {} issued to {o} and {d}", r.guid));
            }
            match r.state {
                GuidState::Issued => ensure(is_held(&st), format!("{d} {st} holds {}", r.guid)),
                GuidState::Quarantined | GuidState::Cleared => {
                    let p = fx.programmed_bases(r.guid);
                    ensure(
                        p.iter().all(|b| *b == DEFAULT),
                        format!("retired {} in {p:x?} at the SM", r.guid),
                    );
                    let c = fx.configured_bases(r.guid);
                    ensure(
                        c.is_empty(),
                        format!("retired {} configured {c:x?}", r.guid),
                    );
                }
                GuidState::Foreign => {}
            }
        }
    }
    ensure(fx.store.verify().is_ok(), "audit chain".into());
    // ---- usable again ----
    for d in &ds {
        if state(&mut fx, d) == DeviceState::Free {
            let r = fx.engine().assign(d, &globex, None);
            ensure(r.is_ok(), format!("re-assign of {d}: {r:?}"));
        }
    }
    problems
}

/// Crash at every failpoint of a batch of two handovers — each member's own
/// steps, gates and lifecycle moves (both passings of each name) and the two
/// of the shared apply — then recover: no open operation, every device Free
/// or Ready for globex only where its own journal committed Ready, every
/// retired GUID in no partition at the SM, no GUID issued twice, the audit
/// chain intact, every Free device assignable again.
#[test]
fn crash_anywhere_in_a_batch_of_two_then_recover() {
    quiet_crashes();
    let points = batch_failpoints();
    for p in ["batch:fabric-apply:planned", "batch:fabric-apply:acted"] {
        assert!(points.iter().any(|(n, _)| n == p), "{p} not in {points:?}");
    }
    // Both members pass their own steps (second passings exist).
    assert!(
        points
            .iter()
            .any(|(n, k)| n == "handover:reset:planned" && *k == 1)
    );
    let mut problems = Vec::new();
    for (name, nth) in &points {
        problems.extend(batch_crash_run(name, *nth));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
