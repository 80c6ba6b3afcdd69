//! Model checks of the IB handover: the read-back gate holds over all
//! interleavings; a fixed wait and the other weakened gates have counterexamples.
//!
//! `cargo test -p devfence-modelcheck -- --nocapture` prints the state counts and
//! the counterexamples.

use devfence_modelcheck::{
    Action, EngineStep, GateKind, GuidId, Handover, HandoverState, Keys, Protocol, SmReport,
    VM_NEVER_ON_A, VM_RUNS, render,
};
use std::collections::{HashMap, VecDeque};

use stateright::{Checker, Model, Path};

/// Fewer states than this means the model lost its interleavings.
const MIN_STATES: usize = 1_000;

/// The same for the one-sweep protocol, which has two engine steps fewer (719
/// unique states at the default bound).
const MIN_STATES_ONE_SWEEP: usize = 500;

/// Explores the whole state space of `model` (BFS) and returns the checker.
fn check(model: Handover) -> impl Checker<Handover> {
    model.checker().spawn_bfs().join()
}

/// Checks `model`, expects a counterexample of the safety property, prints it and
/// returns it.
fn counterexample(label: &str, model: Handover) -> Path<HandoverState, Action> {
    let checker = check(model);
    let path = checker
        .discovery(VM_NEVER_ON_A)
        .unwrap_or_else(|| panic!("{label}: no counterexample found"));
    println!(
        "{label}: counterexample after {} states ({} unique), {} steps:\n{}",
        checker.state_count(),
        checker.unique_state_count(),
        path.clone().into_actions().len(),
        render(&path)
    );
    println!("{label}: actions {:?}", path.clone().into_actions());
    let last = path.last_state();
    assert!(last.vm_b, "{label}: the path ends with B's VM running");
    assert!(last.b_on_a_membership());
    path
}

/// The shortest path from the initial state to a state where `goal` holds
/// (breadth-first over the model's own steps).
fn shortest_run_to(
    model: &Handover,
    goal: fn(&HandoverState) -> bool,
) -> Option<Path<HandoverState, Action>> {
    let init = model.init_states().into_iter().next()?;
    let mut parent: HashMap<HandoverState, Option<(HandoverState, Action)>> = HashMap::new();
    parent.insert(init.clone(), None);
    let mut queue = VecDeque::from([init.clone()]);
    while let Some(state) = queue.pop_front() {
        if goal(&state) {
            let mut actions = Vec::new();
            let mut at = &state;
            while let Some(Some((before, action))) = parent.get(at) {
                actions.push(*action);
                at = before;
            }
            actions.reverse();
            return Path::from_actions(model, init, &actions);
        }
        for (action, next) in model.next_steps(&state) {
            if !parent.contains_key(&next) {
                parent.insert(next.clone(), Some((state.clone(), action)));
                queue.push_back(next);
            }
        }
    }
    None
}

/// Checks `model`, expects the safety property to hold and B's VM to run; returns
/// the unique state count.
fn holds(label: &str, model: &Handover) -> usize {
    let checker = check(model.clone());
    checker.assert_properties();
    let states = checker.unique_state_count();
    assert!(
        checker.discovery(VM_RUNS).is_some(),
        "{label}: B's VM never starts"
    );
    // The checker keeps the last example it saw; print the shortest instead.
    let example = shortest_run_to(model, |s| s.vm_b)
        .unwrap_or_else(|| panic!("{label}: B's VM never starts"));
    println!(
        "{label}: property holds over {states} unique states ({} visited, max depth {}); \
         shortest run to B's VM ({} steps):\n{}",
        checker.state_count(),
        checker.max_depth(),
        example.clone().into_actions().len(),
        render(&example)
    );
    let min = if model.protocol.one_sweep() {
        MIN_STATES_ONE_SWEEP
    } else {
        MIN_STATES
    };
    assert!(
        states > min,
        "{label}: only {states} states: the model lost its interleavings"
    );
    states
}

#[test]
fn read_back_gate_keeps_b_off_a_membership_over_all_interleavings() {
    let states = holds("ReadBack", &Handover::new(GateKind::ReadBack));
    assert!(states < 100_000, "state space grew to {states}");
}

#[test]
fn read_back_gate_holds_whatever_the_sweep_bound() {
    // The generation cap only bounds the state space: with fewer or more sweeps
    // allowed the property still holds (and the space grows with the cap).
    let mut last = 0;
    for max_generation in 3..=8 {
        let model = Handover {
            max_generation,
            ..Handover::new(GateKind::ReadBack)
        };
        let checker = check(model);
        checker.assert_properties();
        let states = checker.unique_state_count();
        println!("ReadBack, sweeps up to g{max_generation}: {states} unique states");
        assert!(states > last);
        last = states;
    }
}

#[test]
fn fixed_wait_gate_lets_b_start_on_a_membership() {
    for ticks in [1, 2, 4] {
        let path = counterexample(
            &format!("FixedWait({ticks})"),
            Handover::new(GateKind::FixedWait(ticks)),
        );
        let last = path.last_state();
        // A's membership is still on the port B's VM uses: no sweep reprogrammed it.
        assert!(last.port_pkeys.meets(Keys::A), "{last}");
        assert_eq!(last.engine, EngineStep::Ready);
        let actions = path.into_actions();
        assert_eq!(
            actions.iter().filter(|a| **a == Action::Tick).count(),
            usize::from(ticks)
        );
        assert_eq!(actions.last(), Some(&Action::StartVm));
        assert!(!actions.contains(&Action::SweepFinish), "{actions:?}");
    }
}

#[test]
fn configured_only_gate_lets_b_start_before_the_sweep() {
    let path = counterexample("ConfiguredOnly", Handover::new(GateKind::ConfiguredOnly));
    let last = path.last_state();
    assert_eq!(last.configured_new, Keys::B);
    assert!(!last.configured_old.meets(Keys::A));
    assert!(last.port_pkeys.meets(Keys::A), "{last}");
}

#[test]
fn without_new_exact_a_sweep_that_missed_the_port_opens_the_gate() {
    // Q3 alone: a clean sweep at the ticket's generation ran while the port was
    // off the fabric after the GUID change, so it programmed nothing.
    let path = counterexample("WithoutNewExact", Handover::new(GateKind::WithoutNewExact));
    let last = path.last_state();
    assert!(last.port_pkeys.meets(Keys::A), "{last}");
    assert!(last.last_done >= last.ticket);
    assert_eq!(last.reported_for(GuidId::New), None);
}

#[test]
fn without_sweep_done_or_old_revoked_still_safe_when_the_sm_reports_acknowledged_tables() {
    // With an SM that reports only what the port acknowledged, Q2 on the programmed
    // view implies the property: Q1 and Q3 are implied in this model (see
    // docs/model-check.md for what they guard beyond it).
    holds(
        "WithoutSweepDone",
        &Handover::new(GateKind::WithoutSweepDone),
    );
    holds(
        "WithoutOldRevoked",
        &Handover::new(GateKind::WithoutOldRevoked),
    );
}

#[test]
fn without_sweep_done_a_table_reported_ahead_of_the_port_opens_the_gate() {
    let path = counterexample(
        "WithoutSweepDone, SM ahead of port",
        Handover::new(GateKind::WithoutSweepDone).with_report(SmReport::AheadOfPort),
    );
    let last = path.last_state();
    assert_eq!(last.reported_for(GuidId::New), Some(Keys::B));
    assert!(last.port_pkeys.meets(Keys::A), "{last}");
}

#[test]
fn read_back_gate_relies_on_an_sm_that_reports_acknowledged_tables() {
    // Finding: if the SM reported a sweep's tables before the port has them, a clean
    // sweep at the ticket's generation that missed the port (off the fabric) plus
    // the next sweep, still running, would satisfy all three questions.
    let path = counterexample(
        "ReadBack, SM ahead of port",
        Handover::new(GateKind::ReadBack).with_report(SmReport::AheadOfPort),
    );
    let last = path.last_state();
    assert!(last.port_pkeys.meets(Keys::A), "{last}");
    assert!(last.last_done >= last.ticket);
}

// ----------------------------------------------------------------------
// One sweep: the revoke and the grant in one apply.

fn one_sweep(gate: GateKind) -> Handover {
    Handover::new(gate).with_protocol(Protocol::OneSweep)
}

#[test]
fn one_sweep_read_back_gate_keeps_b_off_a_membership_over_all_interleavings() {
    holds_with_one_move("OneSweep, ReadBack", &one_sweep(GateKind::ReadBack));
}

/// The property holds for `model` (a one-sweep protocol under the read-back gate)
/// and its shortest run to B's VM applies once: one `Move`, no separate `Revoke`
/// or `Grant`. Returns that run's actions.
fn holds_with_one_move(label: &str, model: &Handover) -> Vec<Action> {
    let states = holds(label, model);
    assert!(states < 100_000, "state space grew to {states}");
    let run = shortest_run_to(model, |s| s.vm_b).expect("B's VM starts");
    let actions = run.into_actions();
    assert_eq!(
        actions.iter().filter(|a| **a == Action::Move).count(),
        1,
        "{actions:?}"
    );
    assert!(!actions.contains(&Action::Revoke), "{actions:?}");
    assert!(!actions.contains(&Action::Grant), "{actions:?}");
    actions
}

#[test]
fn one_sweep_read_back_gate_holds_whatever_the_sweep_bound() {
    for max_generation in 3..=8 {
        let model = Handover {
            max_generation,
            ..one_sweep(GateKind::ReadBack)
        };
        check(model).assert_properties();
    }
}

#[test]
fn one_sweep_moving_the_old_guid_to_b_is_caught() {
    // The unsafe variant: no fresh GUID, the old one moves from A to B in the one
    // apply. The gate's questions all pass for it; B's VM runs under A's identity.
    let path = counterexample(
        "OneSweepOldGuid, ReadBack",
        Handover::new(GateKind::ReadBack).with_protocol(Protocol::OneSweepOldGuid),
    );
    let last = path.last_state();
    assert_eq!(last.vf_guid, GuidId::Old, "{last}");
    assert_eq!(last.engine, EngineStep::Ready);
    let actions = path.into_actions();
    assert!(!actions.contains(&Action::SetGuid), "{actions:?}");
}

#[test]
fn one_sweep_vm_start_before_the_gate_is_caught() {
    // The unsafe variant: the launcher starts B's VM once the move is applied,
    // before the revoke (and the grant) is verified at the SM.
    let path = counterexample(
        "OneSweepEarlyStart, ReadBack",
        Handover::new(GateKind::ReadBack).with_protocol(Protocol::OneSweepEarlyStart),
    );
    let last = path.last_state();
    assert_ne!(last.engine, EngineStep::Ready, "{last}");
    assert!(last.port_pkeys.meets(Keys::A), "{last}");
}

#[test]
fn one_sweep_weakened_gates_are_still_caught() {
    // An SM that reports a table before the port has it defeats the gate here as
    // it does with two sweeps: the assumption stays load-bearing.
    weakened_gates_are_caught("OneSweep", one_sweep);
}

#[test]
fn one_sweep_that_drops_the_revoke_is_caught_by_the_revoke_question() {
    // A move that grants B but leaves the old GUID in A's configuration: the
    // engine's gate (Q1) never opens, and a gate without Q1 lets B's VM run while
    // the SM would still admit the old GUID to A.
    let model = Handover::new(GateKind::ReadBack).with_protocol(Protocol::OneSweepNoRevoke);
    let checker = check(model.clone());
    assert!(checker.discovery(VM_NEVER_ON_A).is_none());
    assert!(
        checker.discovery(VM_RUNS).is_none(),
        "the gate opened without the revoke"
    );
    let path = counterexample(
        "OneSweepNoRevoke, WithoutOldRevoked",
        Handover::new(GateKind::WithoutOldRevoked).with_protocol(Protocol::OneSweepNoRevoke),
    );
    let last = path.last_state();
    assert!(last.configured_old.meets(Keys::A), "{last}");
}

// ----------------------------------------------------------------------
// One sweep, applied before the fresh GUID is set on the VF.

fn apply_first(gate: GateKind) -> Handover {
    Handover::new(gate).with_protocol(Protocol::OneSweepApplyFirst)
}

#[test]
fn apply_first_read_back_gate_keeps_b_off_a_membership_over_all_interleavings() {
    let actions = holds_with_one_move(
        "OneSweepApplyFirst, ReadBack",
        &apply_first(GateKind::ReadBack),
    );
    // The one apply comes before the GUID is set.
    let at = |a: Action| actions.iter().position(|x| *x == a);
    assert!(at(Action::Move) < at(Action::SetGuid), "{actions:?}");
    for max_generation in 3..=8 {
        check(Handover {
            max_generation,
            ..apply_first(GateKind::ReadBack)
        })
        .assert_properties();
    }
}

#[test]
fn apply_first_still_needs_every_question_of_the_gate() {
    // With the apply first, the sweep that revokes may run while the old GUID is
    // still on the port, or while the port is off the fabric: without Q2 on the
    // programmed view, the gate opens on a clean sweep that never reprogrammed the
    // port, which still carries A's table.
    for last in weakened_gates_are_caught("OneSweepApplyFirst", apply_first) {
        assert_eq!(last.vf_guid, GuidId::New, "{last}");
    }
}

/// The fixed wait, the configured-only gate and the gate without Q2 each have a
/// counterexample under `protocol` (ending with the port on A's table), and so
/// has the read-back gate with an SM whose report runs ahead of the port.
/// Returns the weakened gates' last states.
fn weakened_gates_are_caught(
    label: &str,
    protocol: fn(GateKind) -> Handover,
) -> Vec<HandoverState> {
    let mut lasts = Vec::new();
    for gate in [
        GateKind::FixedWait(2),
        GateKind::ConfiguredOnly,
        GateKind::WithoutNewExact,
    ] {
        let path = counterexample(&format!("{label}, {gate:?}"), protocol(gate));
        let last = path.last_state().clone();
        assert!(last.port_pkeys.meets(Keys::A), "{last}");
        lasts.push(last);
    }
    counterexample(
        &format!("{label}, ReadBack, SM ahead of port"),
        protocol(GateKind::ReadBack).with_report(SmReport::AheadOfPort),
    );
    lasts
}
