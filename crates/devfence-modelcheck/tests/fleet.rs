//! Model checks of the fleet (issue 13): two fabric controllers elected through an
//! etcd lease, a lease that may expire under a paused controller, the SM's partitions
//! file with its fence token, and the host's gate. With the design's fencing B's VM
//! never starts on A's membership; each part of the fencing left out gives a
//! counterexample.
//!
//! `cargo test -p devfence-modelcheck --test fleet -- --nocapture` prints the state
//! counts and the shortest counterexamples.

use std::collections::{HashMap, VecDeque};

use devfence_modelcheck::fleet::{
    Action, Ctl, Desired, Fencing, Fleet, FleetState, HostGate, OBSERVED_STAYS_TRUE,
    PORT_NEVER_ON_A, Phase, PublishWhen, STALE_LEADER_BESIDE_VM, ViewRead, render,
};
use devfence_modelcheck::{GuidId, Keys, VM_NEVER_ON_A, VM_RUNS};
use stateright::{Checker, Model, Path};

/// Fewer states than this means the model lost its interleavings (the design's
/// model has 54 124 unique states at three elections).
const MIN_STATES: usize = 20_000;

/// More than this and the check no longer runs in a few seconds in debug.
const MAX_STATES: usize = 300_000;

/// Explores the whole state space of `model` (BFS) and returns the checker.
fn check(model: Fleet) -> impl Checker<Fleet> {
    model.checker().spawn_bfs().join()
}

/// The shortest path from the initial state to a state where `goal` holds
/// (breadth-first over the model's own steps).
fn shortest_run_to(
    model: &Fleet,
    goal: fn(&FleetState) -> bool,
) -> Option<Path<FleetState, Action>> {
    let init = model.init_states().into_iter().next()?;
    let mut parent: HashMap<FleetState, Option<(FleetState, Action)>> = HashMap::new();
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

/// Checks `model`, expects both safety properties to hold and both witnesses to
/// be found; returns the unique state count.
fn holds(label: &str, model: &Fleet) -> usize {
    let checker = check(model.clone());
    checker.assert_properties();
    let states = checker.unique_state_count();
    assert!(
        checker.discovery(VM_RUNS).is_some(),
        "{label}: B's VM never starts"
    );
    assert!(
        checker.discovery(STALE_LEADER_BESIDE_VM).is_some(),
        "{label}: no schedule leaves a deposed controller with a stale view beside B's VM"
    );
    let example = shortest_run_to(model, |s| s.vm_b)
        .unwrap_or_else(|| panic!("{label}: B's VM never starts"));
    println!(
        "{label}: properties hold over {states} unique states ({} visited, max depth {}); \
         shortest run to B's VM ({} steps):\n{}",
        checker.state_count(),
        checker.max_depth(),
        example.clone().into_actions().len(),
        render(&example)
    );
    assert!(
        states > MIN_STATES,
        "{label}: only {states} states: the model lost its interleavings"
    );
    assert!(states < MAX_STATES, "{label}: state space grew to {states}");
    states
}

/// Checks `model`, expects the checker to discover a counterexample of `property`,
/// and returns the shortest one (printed).
fn counterexample(
    label: &str,
    model: &Fleet,
    property: &'static str,
    violated: fn(&FleetState) -> bool,
) -> Path<FleetState, Action> {
    let checker = check(model.clone());
    let found = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("{label}: no counterexample of {property:?} found"));
    assert!(
        violated(found.last_state()),
        "{label}: {}",
        found.last_state()
    );
    let path = shortest_run_to(model, violated)
        .unwrap_or_else(|| panic!("{label}: the discovery is not reachable"));
    println!(
        "{label}: counterexample of {property:?} after {} states ({} unique); \
         shortest ({} steps):\n{}",
        checker.state_count(),
        checker.unique_state_count(),
        path.clone().into_actions().len(),
        render(&path)
    );
    path
}

/// Where in `actions` the controller `c` took `step` (the last time).
fn last_index(actions: &[Action], step: Action) -> Option<usize> {
    actions.iter().rposition(|a| *a == step)
}

/// The controller other than `c`.
fn other(c: Ctl) -> Ctl {
    match c {
        Ctl::C1 => Ctl::C2,
        Ctl::C2 => Ctl::C1,
    }
}

/// The controller holding the pre-handover view in `s`, if one does.
fn stale_holder(s: &FleetState) -> Option<Ctl> {
    Ctl::ALL
        .into_iter()
        .find(|&c| s.ctl[c.idx()].phase.view() == Some(Desired::Before))
}

#[test]
fn fenced_controllers_keep_b_off_a_membership_over_all_interleavings() {
    let model = Fleet::new(Fencing::Full);
    holds("Full fencing", &model);
    // The fence does the work: B's VM runs while a deposed controller, about to
    // apply the pre-handover view, holds an older token than the file's; its
    // apply is refused and leaves the file as it was.
    let path = shortest_run_to(&model, |s| {
        s.vm_b
            && Ctl::ALL.into_iter().any(|c| {
                let me = s.ctl[c.idx()];
                me.phase == Phase::Viewed(Desired::Before) && me.token < s.file_token
            })
    })
    .expect("a deposed controller with the old view beside B's VM is reachable");
    let at = path.last_state().clone();
    println!(
        "Full fencing: a stale apply about to be refused:\n{}",
        render(&path)
    );
    let stale = stale_holder(&at).expect("a controller holds the old view");
    let after = model
        .next_state(&at, Action::Apply(stale))
        .expect("the apply is a step");
    assert_eq!(after.ctl[stale.idx()].phase, Phase::Follower, "{after}");
    assert_eq!(
        (after.cfg_old, after.cfg_new, after.file_token),
        (at.cfg_old, at.cfg_new, at.file_token),
        "the refused apply changed the file: {after}"
    );
    assert!(!after.b_on_a_membership(), "{after}");
}

#[test]
fn fenced_controllers_hold_whatever_the_election_bound() {
    // The election cap only bounds the state space: with two, three or four
    // elections the properties hold, and the space grows with the cap.
    let mut last = 0;
    for max_elections in 2..=4 {
        let model = Fleet {
            max_elections,
            ..Fleet::new(Fencing::Full)
        };
        let checker = check(model);
        checker.assert_properties();
        let states = checker.unique_state_count();
        println!("Full fencing, up to {max_elections} elections: {states} unique states");
        assert!(states > last);
        last = states;
    }
}

#[test]
fn unfenced_a_paused_leader_applies_its_stale_view_under_b() {
    let path = counterexample(
        "Unfenced",
        &Fleet::new(Fencing::None),
        VM_NEVER_ON_A,
        FleetState::b_on_a_membership,
    );
    let last = path.last_state().clone();
    // B's VM runs; the port is B's, but the SM's file puts the old GUID back into
    // A's partitions: the deposed leader's apply of the view it read before it
    // was paused.
    assert!(last.vm_b && last.cfg_old.meets(Keys::A), "{last}");
    let stale = stale_holder(&last).expect("a controller holds the old view");
    let fresh = other(stale);
    let actions = path.into_actions();
    assert!(actions.contains(&Action::LeaseExpires), "{actions:?}");
    let stale_apply = last_index(&actions, Action::Apply(stale)).expect("stale apply");
    let fresh_apply = last_index(&actions, Action::Apply(fresh)).expect("fresh apply");
    assert!(fresh_apply < stale_apply, "{actions:?}");
    assert!(
        last.ctl[stale.idx()].token < last.ctl[fresh.idx()].token,
        "the stale apply came from the older token: {last}"
    );
    // And the controllers' word is contradicted by the SM.
    counterexample(
        "Unfenced",
        &Fleet::new(Fencing::None),
        OBSERVED_STAYS_TRUE,
        FleetState::observed_contradicted,
    );
}

#[test]
fn lease_guarded_writes_alone_do_not_stop_a_stale_apply_at_the_sm() {
    let path = counterexample(
        "LeaseOnly",
        &Fleet::new(Fencing::LeaseOnly),
        VM_NEVER_ON_A,
        FleetState::b_on_a_membership,
    );
    let last = path.last_state().clone();
    assert!(last.cfg_old.meets(Keys::A), "{last}");
    let stale = stale_holder(&last).expect("a controller holds the old view");
    assert!(
        matches!(
            last.ctl[stale.idx()].phase,
            Phase::Applied(Desired::Before, _)
        ),
        "{last}"
    );
}

#[test]
fn token_alone_lets_a_deposed_leader_publish_and_a_newer_one_apply_stale_data() {
    // Without the lease guard, a deposed controller (older token) that read the
    // handover applies and publishes it; the newer leader, which read desired
    // before the host wrote, then applies its older view with the higher token.
    let path = counterexample(
        "TokenOnly",
        &Fleet::new(Fencing::TokenOnly),
        VM_NEVER_ON_A,
        FleetState::b_on_a_membership,
    );
    let last = path.last_state().clone();
    assert!(last.cfg_old.meets(Keys::A), "{last}");
    let stale = stale_holder(&last).expect("a controller holds the old view");
    let publisher = other(stale);
    assert!(
        last.ctl[publisher.idx()].token < last.ctl[stale.idx()].token,
        "the publisher is the deposed one: {last}"
    );
    let actions = path.clone().into_actions();
    let publish = last_index(&actions, Action::Publish(publisher)).expect("publish");
    // It published without the lease.
    let before_publish = path.clone().into_vec()[publish].0.clone();
    assert_ne!(
        before_publish.leader,
        Some((publisher, before_publish.ctl[publisher.idx()].token)),
        "{before_publish}"
    );
}

#[test]
fn token_check_and_file_replace_must_be_one_step() {
    // A controller paused between re-reading the file's token and replacing the
    // file writes its stale view over the newer leader's, token check passed.
    let path = counterexample(
        "CheckThenReplace",
        &Fleet::new(Fencing::CheckThenReplace),
        VM_NEVER_ON_A,
        FleetState::b_on_a_membership,
    );
    let last = path.last_state().clone();
    let stale = stale_holder(&last).expect("a controller holds the old view");
    let fresh = other(stale);
    let actions = path.into_actions();
    let check = last_index(&actions, Action::CheckToken(stale)).expect("stale check");
    let fresh_replace = last_index(&actions, Action::ReplaceFile(fresh)).expect("fresh write");
    let stale_replace = last_index(&actions, Action::ReplaceFile(stale)).expect("stale write");
    assert!(
        check < fresh_replace && fresh_replace < stale_replace,
        "{actions:?}"
    );
    assert!(last.cfg_old.meets(Keys::A), "{last}");
}

#[test]
fn a_host_that_trusts_observed_alone_starts_b_on_a_port_table() {
    // A controller that publishes observed before the sweep, and a host gate that
    // takes its word: B's VM starts on a port that still carries A's P_Keys.
    let model = Fleet::new(Fencing::Full)
        .with_gate(HostGate::ObservedOnly)
        .with_publish(PublishWhen::BeforeSweep);
    let path = counterexample(
        "ObservedOnly, publish before sweep",
        &model,
        VM_NEVER_ON_A,
        FleetState::b_on_a_membership,
    );
    let last = path.last_state().clone();
    assert!(last.port_pkeys.meets(Keys::A), "{last}");
    assert_eq!(last.vf_guid, GuidId::New);
    // No stale controller is needed: the fencing is not the issue here.
    assert!(!path.into_actions().contains(&Action::LeaseExpires));
}

#[test]
fn the_hosts_own_sa_read_catches_a_controller_that_publishes_early() {
    holds(
        "Full fencing, publish before sweep, host reads the SA",
        &Fleet::new(Fencing::Full).with_publish(PublishWhen::BeforeSweep),
    );
    // And a correct controller is enough for a host that trusts it: the SA read is
    // defence in depth against a controller's bug, not load-bearing for a correct
    // one.
    holds(
        "Full fencing, host trusts observed",
        &Fleet::new(Fencing::Full).with_gate(HostGate::ObservedOnly),
    );
}

#[test]
fn the_hosts_sa_read_keeps_the_port_table_off_a_even_unfenced() {
    // Finding: what fencing protects is the SM's configuration (and so the truth of
    // observed), which the host cannot read at the SA. The port's table is kept
    // off A's partitions by the host's own SA read whatever the controllers do,
    // because the GUID is fresh: no view, however stale, puts it into A.
    for fencing in [
        Fencing::None,
        Fencing::LeaseOnly,
        Fencing::TokenOnly,
        Fencing::CheckThenReplace,
    ] {
        let checker = check(Fleet::new(fencing));
        assert!(
            checker.discovery(VM_NEVER_ON_A).is_some(),
            "{fencing:?}: the variant is not broken"
        );
        assert!(
            checker.discovery(PORT_NEVER_ON_A).is_none(),
            "{fencing:?}: B's VM ran on A's port table or under the old GUID"
        );
        println!(
            "{fencing:?}: port-level property holds over {} unique states",
            checker.unique_state_count()
        );
    }
}

#[test]
fn a_standby_that_applies_a_view_read_before_its_election_is_not_fenced() {
    // A standby that kept the pre-handover view warm, elected after the handover
    // was applied and B's VM started, applies it with the newest token: no fence
    // refuses it. The view must be read after the election (at a revision at or
    // after the token).
    let model = Fleet::new(Fencing::Full).with_view_read(ViewRead::CachedBeforeElection);
    let path = counterexample(
        "Full fencing, view cached before the election",
        &model,
        VM_NEVER_ON_A,
        FleetState::b_on_a_membership,
    );
    let last = path.last_state().clone();
    assert!(last.cfg_old.meets(Keys::A), "{last}");
    let stale = stale_holder(&last).expect("a controller holds the old view");
    let me = last.ctl[stale.idx()];
    assert!(me.token > last.ctl[other(stale).idx()].token, "{last}");
    assert_eq!(last.file_token, me.token, "{last}");
    assert_eq!(last.leader, Some((stale, me.token)), "it leads: {last}");
}
