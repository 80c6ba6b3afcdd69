//! Tests of the simulated SM together with the gate: every fault knob must make
//! `verify` fail closed, and a handover verifies only after the sweep that applied it.

use super::*;
use crate::{Evidence, Expectation, Question, Unverified, Verdict, verify, wait_verified};
use devfence_model::Membership::{Full, Limited};

const G1: Guid = Guid(0x0002_c900_0000_2003);
const G2: Guid = Guid(0x0002_c900_0000_e003);
const MS: Duration = Duration::from_millis(1);

fn pk(v: u16) -> crate::PartitionKey {
    crate::PartitionKey::new(v).expect("valid P_Key")
}
fn a() -> crate::PartitionKey {
    pk(0x8001)
}
fn b() -> crate::PartitionKey {
    pk(0x8002)
}

fn check(sm: &SimSm, exp: &Expectation) -> Verdict {
    let obs = sm.observe(&exp.guids()).expect("observe");
    verify(&obs, exp)
}

/// G1 in A, verified. Returns the SM (settled).
fn assigned_to_a(cfg: SimConfig) -> SimSm {
    let sm = SimSm::new(cfg);
    sm.settle();
    sm.stage_add(G1, a(), Full).expect("stage");
    let t = sm.apply().expect("apply");
    sm.settle();
    let exp = Expectation::handover(t, None, Some((G1, &[(a(), Full)])));
    assert!(check(&sm, &exp).is_verified());
    sm
}

/// Stages and applies the A→B handover of the VF: G1 out of A (and off the fabric:
/// the VF reset rotates its GUID), G2 into B.
fn hand_over(sm: &SimSm) -> (Ticket, Expectation) {
    sm.stage_remove(G1, a()).expect("stage");
    sm.detach(G1);
    sm.stage_add(G2, b(), Full).expect("stage");
    let t = sm.apply().expect("apply");
    let exp = Expectation::handover(t, Some((G1, &[a()])), Some((G2, &[(b(), Full)])));
    (t, exp)
}

#[test]
fn comes_up_like_opensm() {
    let sm = SimSm::default();
    let h = sm.health().expect("health");
    assert!(!h.is_healthy(), "no sweep yet: {h:?}");
    assert_eq!(h.status.sweep, SweepOutcome::NoneYet);
    assert_eq!(sm.settle(), Generation(1));
    assert!(sm.health().expect("health").is_healthy());
    assert_eq!(sm.now(), Duration::from_millis(15));
}

#[test]
fn handover_a_to_b_verifies_only_after_the_sweep_that_applied_it() {
    let sm = assigned_to_a(SimConfig::default());
    let (t, exp) = hand_over(&sm);
    let applied_at = sm.now();
    let mut saw_old_membership = false;
    let verified_at = loop {
        let v = check(&sm, &exp);
        if v.is_verified() {
            break sm.now();
        }
        assert!(v.failed().contains(&Question::SweepDone), "{v:?}");
        saw_old_membership |= v.failed().contains(&Question::OldRevoked);
        assert!(sm.generation() < t.generation);
        assert!(
            sm.now() - applied_at < Duration::from_secs(1),
            "never verified"
        );
        sm.advance(MS);
    };
    // The race is real: until the sweep, the old GUID still held A.
    assert!(saw_old_membership);
    // Verified exactly when the sweep that applied it completed: lag + sweep time.
    assert_eq!(verified_at - applied_at, Duration::from_millis(15));
    assert_eq!(sm.generation(), t.generation);
    let (outcome, programmed) = sm.programmed_at(t.generation).expect("sweep in history");
    assert_eq!(outcome, SweepOutcome::Clean);
    assert_eq!(programmed.get(&G1), None);
    assert_eq!(
        programmed.get(&G2),
        Some(&BTreeSet::from([PKey(0x7fff), PKey(0x8002)]))
    );
    // And before it, the SM still had G1 in A.
    let (_, before) = sm
        .programmed_at(Generation(t.generation.0 - 1))
        .expect("history");
    assert!(before[&G1].contains(&PKey(0x8001)));
    // The history says when: apply, sweep start (lag later), completion.
    let h = sm.history();
    let at = |pred: &dyn Fn(&SimEvent) -> bool| {
        h.iter()
            .find(|e| pred(&e.event))
            .map(|e| e.at)
            .expect("event")
    };
    let applied = at(&|e| matches!(e, SimEvent::Applied { ticket, .. } if *ticket == t));
    let started =
        at(&|e| matches!(e, SimEvent::SweepStarted { generation } if *generation == t.generation));
    let done = at(
        &|e| matches!(e, SimEvent::SweepCompleted { generation, .. } if *generation == t.generation),
    );
    assert_eq!(started - applied, Duration::from_millis(10));
    assert_eq!(done - started, Duration::from_millis(5));
}

#[test]
fn lag_holds_the_gate_until_the_late_sweep() {
    let sm = assigned_to_a(SimConfig::default());
    sm.set_lag(Duration::from_millis(500));
    let (_, exp) = hand_over(&sm);
    sm.advance(Duration::from_millis(400));
    let v = check(&sm, &exp);
    assert_eq!(
        v.failed(),
        BTreeSet::from([
            Question::OldRevoked,
            Question::NewExact,
            Question::SweepDone
        ]),
        "{v:?}"
    );
    sm.advance(Duration::from_millis(104));
    assert!(!check(&sm, &exp).is_verified());
    sm.advance(Duration::from_millis(1));
    assert!(check(&sm, &exp).is_verified());
}

#[test]
fn a_dropped_update_never_verifies_though_the_generation_advances() {
    for report_configured in [true, false] {
        let sm = assigned_to_a(SimConfig {
            report_configured,
            ..SimConfig::default()
        });
        sm.drop_next_update();
        sm.stage_remove(G1, a()).expect("stage");
        sm.stage_add(G2, b(), Full).expect("stage");
        let t = sm.apply().expect("a lost update still answers");
        sm.settle();
        sm.advance(Duration::from_secs(10));
        assert!(sm.generation() >= t.generation);
        let exp = Expectation::handover(t, Some((G1, &[a()])), Some((G2, &[(b(), Full)])));
        let v = check(&sm, &exp);
        // Question 3 alone would pass: only the read-back of membership catches it.
        assert_eq!(
            v.failed(),
            BTreeSet::from([Question::OldRevoked, Question::NewExact]),
            "{v:?}"
        );
        assert!(
            v.failures()
                .iter()
                .any(|f| matches!(f.evidence, Evidence::Absent { guid: G2, .. }))
        );
        assert!(matches!(
            sm.history().iter().rev().find_map(|h| match &h.event {
                SimEvent::Applied { fate, .. } => Some(fate.clone()),
                _ => None,
            }),
            Some(ApplyFate::Dropped)
        ));
        // Applying again gets it through.
        sm.stage_remove(G1, a()).expect("stage");
        sm.stage_add(G2, b(), Full).expect("stage");
        let t = sm.apply().expect("apply");
        sm.settle();
        let exp = Expectation::handover(t, Some((G1, &[a()])), Some((G2, &[(b(), Full)])));
        assert!(check(&sm, &exp).is_verified());
    }
}

#[test]
fn a_dropped_removal_leaves_an_extra_partition_that_exact_catches() {
    let sm = SimSm::default();
    sm.stage_add(G1, a(), Full).expect("stage");
    sm.stage_add(G1, b(), Full).expect("stage");
    sm.apply().expect("apply");
    sm.settle();
    sm.drop_next_update();
    sm.stage_remove(G1, b()).expect("stage");
    let t = sm.apply().expect("apply");
    sm.settle();
    let v = check(&sm, &Expectation::after(t).grant(G1, [(a(), Full)]));
    assert_eq!(v.failed(), BTreeSet::from([Question::NewExact]), "{v:?}");
    let Evidence::Mismatch {
        missing,
        unexpected,
        ..
    } = &v.failures()[0].evidence
    else {
        panic!("{v:?}")
    };
    assert!(missing.is_empty());
    assert_eq!(*unexpected, BTreeSet::from([PKey(0x8002)]));
}

#[test]
fn stale_reads_fail_closed_on_the_generation() {
    let sm = assigned_to_a(SimConfig::default());
    let (t, exp) = hand_over(&sm);
    sm.settle();
    sm.stale_reads(2);
    for _ in 0..2 {
        let v = check(&sm, &exp);
        assert!(v.failed().contains(&Question::SweepDone), "{v:?}");
        assert!(v.failures().iter().any(|f| f.evidence
            == Evidence::Sweep {
                state: SmState::Master,
                seen: Generation(t.generation.0 - 1),
                needed: t.generation,
                sweep: SweepOutcome::Clean,
            }));
    }
    assert!(check(&sm, &exp).is_verified());
    let stale: Vec<bool> = sm
        .history()
        .iter()
        .filter_map(|h| match h.event {
            SimEvent::Observed { stale, .. } => Some(stale),
            _ => None,
        })
        .collect();
    assert_eq!(&stale[stale.len() - 3..], &[true, true, false]);
}

#[test]
fn a_failed_sweep_fails_question_3_even_with_the_tables_right() {
    let sm = assigned_to_a(SimConfig::default());
    sm.fail_next_sweep();
    let (t, exp) = hand_over(&sm);
    sm.advance(Duration::from_millis(15));
    assert_eq!(sm.generation(), t.generation);
    let v = check(&sm, &exp);
    assert_eq!(v.failed(), BTreeSet::from([Question::SweepDone]), "{v:?}");
    assert!(matches!(
        &v.failures()[0].evidence,
        Evidence::Sweep {
            sweep: SweepOutcome::Errors(_),
            ..
        }
    ));
    // OpenSM sweeps again after errors; the clean retry verifies.
    assert_eq!(sm.settle(), Generation(t.generation.0 + 1));
    assert!(check(&sm, &exp).is_verified());
}

#[test]
fn injected_errors_fail_closed_and_leave_no_half_change() {
    let sm = assigned_to_a(SimConfig::default());
    let refused = || FabricError::Refused {
        backend: "sim".into(),
        detail: "injected".into(),
        hint: "none".into(),
    };
    sm.error_next_call(refused());
    assert!(sm.stage_add(G2, b(), Full).is_err());
    assert_eq!(sm.discard_staged(), 0, "a failed stage stages nothing");

    sm.stage_add(G2, b(), Full).expect("stage");
    sm.error_next_call(FabricError::Os {
        backend: "sim".into(),
        op: "apply".into(),
        errno: 16,
        hint: "retry".into(),
    });
    let g = sm.generation();
    assert!(sm.apply().is_err());
    sm.settle();
    assert_eq!(sm.generation(), g, "a failed apply requests no sweep");
    let t = sm.apply().expect("the staged change is still there");
    sm.settle();
    let exp = Expectation::handover(t, None, Some((G2, &[(b(), Full)])));

    // A failed read is never "verified": a non-retryable one ends the wait at once.
    sm.error_next_call(refused());
    let far = Instant::now() + Duration::from_secs(30);
    let e = wait_verified(&sm, &exp, far).expect_err("refused");
    assert_eq!(e.polls, 1);
    assert!(matches!(
        e.last,
        Unverified::Unreadable(FabricError::Refused { .. })
    ));
    assert!(e.to_string().contains("SM unreadable"), "{e}");
    // A retryable one is read through.
    sm.error_next_call(FabricError::Timeout {
        backend: "sim".into(),
        op: "observe".into(),
        after: Duration::from_secs(1),
        hint: "retry".into(),
    });
    let p = wait_verified(&sm, &exp, far).expect("verified on the second read");
    assert_eq!(p.seen, t.generation);
    sm.error_next_call(refused());
    assert!(sm.health().is_err());
    assert!(sm.health().is_ok());
}

#[test]
fn reordered_updates_fail_closed() {
    let sm = SimSm::default();
    sm.settle();
    sm.reorder_next_two_applies();
    sm.stage_add(G1, a(), Full).expect("stage");
    let t1 = sm.apply().expect("apply");
    sm.settle();
    let v = check(
        &sm,
        &Expectation::handover(t1, None, Some((G1, &[(a(), Full)]))),
    );
    assert!(v.failed().contains(&Question::NewExact), "held back: {v:?}");
    sm.stage_remove(G1, a()).expect("stage");
    let t2 = sm.apply().expect("apply");
    sm.settle();
    // The remove overtook the add: G1 ends up in A although A was revoked last.
    let exp = Expectation::handover(t2, Some((G1, &[a()])), None);
    let v = check(&sm, &exp);
    assert_eq!(v.failed(), BTreeSet::from([Question::OldRevoked]), "{v:?}");
    assert!(sm.programmed()[&G1].contains(&PKey(0x8001)));
}

#[test]
fn a_standby_sm_does_not_verify() {
    let sm = assigned_to_a(SimConfig::default());
    let (_, exp) = hand_over(&sm);
    sm.settle();
    sm.set_state(SmState::Standby);
    let v = check(&sm, &exp);
    assert_eq!(v.failed(), BTreeSet::from([Question::SweepDone]));
    sm.set_state(SmState::Master);
    assert!(check(&sm, &exp).is_verified());
}

#[test]
fn a_change_during_a_running_sweep_waits_for_the_next_sweep() {
    let sm = assigned_to_a(SimConfig::default());
    sm.set_sweep_time(Duration::from_millis(20));
    sm.attach(Guid(0x77)); // something else requests a sweep
    sm.advance(Duration::from_millis(12)); // ... which is now running
    assert!(sm.sweep_pending());
    let g = sm.generation();
    let (t, exp) = hand_over(&sm);
    assert_eq!(t.generation, Generation(g.0 + 2));
    sm.advance(Duration::from_millis(18)); // the running sweep completes
    assert_eq!(sm.generation(), Generation(g.0 + 1));
    let v = check(&sm, &exp);
    assert!(
        v.failed().contains(&Question::NewExact) && v.failed().contains(&Question::SweepDone),
        "that sweep did not carry the change: {v:?}"
    );
    sm.settle();
    assert!(check(&sm, &exp).is_verified());
}

#[test]
fn frozen_nothing_sweeps_and_wait_verified_returns_the_evidence() {
    // Virtual clock: time passes, nothing sweeps.
    let sm = assigned_to_a(SimConfig::default());
    sm.freeze();
    let (t, exp) = hand_over(&sm);
    sm.advance(Duration::from_secs(60));
    assert_eq!(sm.settle(), Generation(t.generation.0 - 1));
    assert!(sm.health().expect("reads answer").notes[0].contains("frozen"));
    sm.thaw();
    sm.advance(Duration::from_millis(15));
    assert!(check(&sm, &exp).is_verified());

    // Real time: the gate gives up at its deadline with what it saw.
    let sm = SimSm::real_time(SimConfig {
        lag: MS,
        sweep_time: MS,
        ..SimConfig::default()
    });
    sm.stage_add(G1, a(), Full).expect("stage");
    let t0 = sm.apply().expect("apply");
    let exp0 = Expectation::handover(t0, None, Some((G1, &[(a(), Full)])));
    wait_verified(&sm, &exp0, Instant::now() + Duration::from_secs(10)).expect("assigned");
    sm.freeze();
    let (t, exp) = hand_over(&sm);
    let wait = Duration::from_millis(150);
    let e = wait_verified(&sm, &exp, Instant::now() + wait).expect_err("frozen");
    assert!(e.waited >= wait);
    assert!(e.polls > 1);
    let Unverified::Failures(f) = &e.last else {
        panic!("{e}")
    };
    assert!(f.iter().any(|x| x.evidence
        == Evidence::Sweep {
            state: SmState::Master,
            seen: Generation(t.generation.0 - 1),
            needed: t.generation,
            sweep: SweepOutcome::Clean,
        }));
    assert!(e.failed().contains(&Question::OldRevoked));
    assert!(e.to_string().contains("Q3 SM finished the sweep"), "{e}");
    sm.thaw();
    let p = wait_verified(&sm, &exp, Instant::now() + Duration::from_secs(10)).expect("thawed");
    assert_eq!(p.seen, t.generation);
}

#[test]
fn reserved_guids_and_empty_pkeys_are_refused_before_staging() {
    let sm = SimSm::default();
    for g in [Guid(0), Guid(u64::MAX)] {
        let e = sm.stage_add(g, a(), Limited).expect_err("reserved");
        assert!(matches!(e, FabricError::ReservedGuid { .. }), "{e}");
        assert!(sm.stage_remove_all(g).is_err());
    }
    assert!(matches!(
        crate::PartitionKey::new(0x8000),
        Err(FabricError::EmptyPKey { .. })
    ));
    assert_eq!(sm.discard_staged(), 0);
}

#[test]
fn replace_sets_the_whole_map_and_limited_is_exact() {
    let sm = SimSm::default();
    let mut m = MembershipMap::new();
    m.insert(G1, a(), Limited).expect("ok");
    m.insert(G2, b(), Full).expect("ok");
    sm.stage_desired(m).expect("stage");
    let t = sm.apply().expect("apply");
    sm.settle();
    let exp = Expectation::after(t)
        .grant(G1, [(a(), Limited)])
        .grant(G2, [(b(), Full)]);
    assert!(check(&sm, &exp).is_verified());
    // Asking for full where the SM has limited is not "exact".
    let exp = Expectation::after(t).grant(G1, [(a(), Full)]);
    assert_eq!(
        check(&sm, &exp).failed(),
        BTreeSet::from([Question::NewExact])
    );
}

#[test]
fn the_trait_is_object_safe_and_shareable() {
    let sm: Arc<dyn SubnetManager> = Arc::new(SimSm::real_time(SimConfig {
        lag: MS,
        sweep_time: MS,
        ..SimConfig::default()
    }));
    let workers: Vec<_> = (0..4u64)
        .map(|n| {
            let sm = Arc::clone(&sm);
            std::thread::spawn(move || {
                let g = Guid(0x1000 + n);
                sm.stage_add(g, pk(0x8010 + n as u16), Full).expect("stage");
                let t = sm.apply().expect("apply");
                let exp = Expectation::after(t).grant(g, [(pk(0x8010 + n as u16), Full)]);
                wait_verified(&*sm, &exp, Instant::now() + Duration::from_secs(10)).is_ok()
            })
        })
        .collect();
    for w in workers {
        assert!(w.join().expect("join"));
    }
}

mod prop {
    use super::*;
    use crate::PartitionKey;
    use proptest::prelude::*;

    // Small universes make the interesting collisions (a dropped removal of a
    // port that keeps another partition, two applies on one port) frequent.
    const GUIDS: [Guid; 2] = [Guid(0x2c9_0000_2003), Guid(0x2c9_0000_2005)];

    fn part(i: u8) -> PartitionKey {
        PartitionKey::new(0x8001 + u16::from(i % 3)).expect("valid")
    }
    fn guid(i: u8) -> Guid {
        GUIDS[usize::from(i % 2)]
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add(u8, u8, bool),
        Remove(u8, u8),
        RemoveAll(u8),
        Apply,
        Advance(u16),
        Settle,
        Attach(u8),
        Detach(u8),
        DropNext,
        Stale(u8),
        FailSweep,
        ErrorNext,
        Reorder,
        Freeze,
        Thaw,
        Standby,
        Master,
        Lag(u8),
        SweepTime(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(g, p, f)| Op::Add(g, p, f)),
            2 => (any::<u8>(), any::<u8>()).prop_map(|(g, p)| Op::Remove(g, p)),
            1 => any::<u8>().prop_map(Op::RemoveAll),
            4 => Just(Op::Apply),
            4 => (0u16..40).prop_map(Op::Advance),
            4 => Just(Op::Settle),
            1 => any::<u8>().prop_map(Op::Attach),
            1 => any::<u8>().prop_map(Op::Detach),
            2 => Just(Op::DropNext),
            1 => (1u8..4).prop_map(Op::Stale),
            1 => Just(Op::FailSweep),
            1 => Just(Op::ErrorNext),
            1 => Just(Op::Reorder),
            1 => Just(Op::Freeze),
            1 => Just(Op::Thaw),
            1 => Just(Op::Standby),
            1 => Just(Op::Master),
            1 => (0u8..30).prop_map(Op::Lag),
            1 => (0u8..20).prop_map(Op::SweepTime),
        ]
    }

    /// Does this port table satisfy the expectation (ground truth, not via verify)?
    fn holds(programmed: &BTreeMap<Guid, BTreeSet<PKey>>, exp: &Expectation) -> bool {
        let revoked = exp.revoke.iter().all(|r| {
            programmed
                .get(&r.guid)
                .is_none_or(|t| !t.iter().any(|k| r.partitions.iter().any(|p| p.matches(*k))))
        });
        let granted = exp.grant.iter().all(|g| {
            programmed.get(&g.guid).is_some_and(|t| {
                let mut want = g.expected_pkeys();
                want.insert(PKey(PKey::DEFAULT_BASE));
                *t == want
            })
        });
        revoked && granted
    }

    /// What the client believes (its own applies, in order), asked three ways:
    /// all three questions for every port; question 2 for the ports that are in
    /// some partition; question 1 for every port.
    fn expectations(intended: &MembershipMap, t: Ticket) -> [Expectation; 3] {
        let mut full = Expectation::after(t);
        let mut grant_only = Expectation::after(t);
        let mut revoke_only = Expectation::after(t);
        for g in GUIDS {
            let mine = intended.partitions_of(g);
            let others: Vec<PartitionKey> =
                (0..3).map(part).filter(|p| !mine.contains_key(p)).collect();
            full = full
                .grant(g, mine.iter().map(|(p, m)| (*p, *m)))
                .revoke(g, others.clone());
            if !mine.is_empty() {
                grant_only = grant_only.grant(g, mine.iter().map(|(p, m)| (*p, *m)));
            }
            revoke_only = revoke_only.revoke(g, others);
        }
        [full, grant_only, revoke_only]
    }

    static VERIFIED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    fn check_sound(sm: &SimSm, intended: &MembershipMap, ticket: Option<Ticket>) {
        let Some(t) = ticket else { return };
        for exp in expectations(intended, t) {
            let Ok(obs) = sm.observe(&GUIDS) else {
                continue;
            };
            let stale = sm.history().iter().rev().find_map(|h| match h.event {
                SimEvent::Observed { stale, .. } => Some(stale),
                _ => None,
            });
            let Verdict::Verified(p) = verify(&obs, &exp) else {
                continue;
            };
            VERIFIED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // The SM really had that state, cleanly, at a generation ≥ the ticket…
            assert!(p.seen >= t.generation);
            let (outcome, at) = sm.programmed_at(p.seen).expect("seen sweep in history");
            assert_eq!(outcome, SweepOutcome::Clean);
            assert!(holds(&at, &exp), "verified but gen {} had {at:?}", p.seen.0);
            // …and on a fresh read, has it now.
            if stale == Some(false) {
                let now = sm.programmed();
                assert!(
                    holds(&now, &exp),
                    "verified but programmed {now:?} for {exp:?}"
                );
                assert!(sm.generation() >= t.generation);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// For any interleaving of stage/apply/sweep/fault operations, verify never
        /// says Verified while what the SM programmed differs from what was asked;
        /// and once the faults stop, the gate does open (it is not just always shut).
        #[test]
        fn verify_never_lies(
            ops in proptest::collection::vec(op(), 1..60),
            report_configured in any::<bool>(),
        ) {
            let sm = SimSm::new(SimConfig { report_configured, ..SimConfig::default() });
            let mut intended = MembershipMap::new();
            let mut staged: Vec<Change> = Vec::new();
            let mut ticket = None;
            for op in ops {
                let mut stage = |c: Change| {
                    if sm.stage(c.clone()).is_ok() {
                        staged.push(c);
                    }
                };
                match op {
                    Op::Add(g, p, f) => stage(Change::Add {
                        guid: guid(g),
                        partition: part(p),
                        membership: if f { Full } else { Limited },
                    }),
                    Op::Remove(g, p) => stage(Change::Remove { guid: guid(g), partition: part(p) }),
                    Op::RemoveAll(g) => stage(Change::RemoveAll { guid: guid(g) }),
                    Op::Apply => {
                        if let Ok(t) = sm.apply() {
                            for c in staged.drain(..) {
                                intended.apply(&c).expect("valid");
                            }
                            ticket = Some(t);
                        }
                    }
                    Op::Advance(ms) => sm.advance(Duration::from_millis(u64::from(ms))),
                    Op::Settle => { sm.settle(); }
                    Op::Attach(g) => sm.attach(guid(g)),
                    Op::Detach(g) => sm.detach(guid(g)),
                    Op::DropNext => sm.drop_next_update(),
                    Op::Stale(n) => sm.stale_reads(u32::from(n)),
                    Op::FailSweep => sm.fail_next_sweep(),
                    Op::ErrorNext => sm.error_next_call(FabricError::Os {
                        backend: "sim".into(), op: "any".into(), errno: 5, hint: "retry".into(),
                    }),
                    Op::Reorder => sm.reorder_next_two_applies(),
                    Op::Freeze => sm.freeze(),
                    Op::Thaw => sm.thaw(),
                    Op::Standby => sm.set_state(SmState::Standby),
                    Op::Master => sm.set_state(SmState::Master),
                    Op::Lag(ms) => sm.set_lag(Duration::from_millis(u64::from(ms))),
                    Op::SweepTime(ms) => sm.set_sweep_time(Duration::from_millis(u64::from(ms))),
                }
                check_sound(&sm, &intended, ticket);
            }
            // Liveness: faults off, every port present, the whole intent re-applied.
            sm.clear_faults();
            sm.discard_staged();
            for g in GUIDS {
                sm.attach(g);
            }
            sm.stage_desired(intended.clone()).expect("stage");
            let t = sm.apply().expect("apply");
            sm.settle();
            let obs = sm.observe(&GUIDS).expect("observe");
            for exp in expectations(&intended, t) {
                let v = verify(&obs, &exp);
                prop_assert!(v.is_verified(), "healthy SM must verify: {:?}", v);
            }
        }
    }
}
