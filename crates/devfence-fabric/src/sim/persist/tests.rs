//! Tests of the simulated SM's persistence: the state survives a process, time
//! passes in between, handles on one file take turns, and a bad file is an error,
//! never a silent reset.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Instant;

use devfence_model::Membership::Full;

use super::*;
use crate::{Expectation, Question, SweepOutcome, verify, wait_verified};

const G1: Guid = Guid(0x0002_c900_0000_2003);
const G2: Guid = Guid(0x0002_c900_0000_e003);
const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

fn pk(v: u16) -> crate::PartitionKey {
    crate::PartitionKey::new(v).expect("valid P_Key")
}
fn a() -> crate::PartitionKey {
    pk(0x8001)
}
fn b() -> crate::PartitionKey {
    pk(0x8002)
}

/// Sweeps run as soon as anyone looks: no wall-clock waiting in tests.
fn instant() -> SimConfig {
    SimConfig {
        lag: Duration::ZERO,
        sweep_time: Duration::ZERO,
        ..SimConfig::default()
    }
}

/// A sweep starts an hour after its request and takes a minute: nothing sweeps
/// while a test runs unless the test says that time passed.
fn slow() -> SimConfig {
    SimConfig {
        lag: HOUR,
        sweep_time: MINUTE,
        ..SimConfig::default()
    }
}

/// `guid` in exactly `partition`, full, at `t`'s sweep or later.
fn grant(t: Ticket, guid: Guid, partition: crate::PartitionKey) -> Expectation {
    Expectation::handover(t, None, Some((guid, &[(partition, Full)])))
}

fn state_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("simsm.json");
    (dir, path)
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn state_round_trip_preserves_membership_tables_and_generation() {
    let sm = SimSm::new(SimConfig::default());
    sm.settle();
    sm.stage_add(G1, a(), Full).expect("stage");
    sm.stage_add(G2, b(), Full).expect("stage");
    sm.apply().expect("apply");
    sm.settle();
    sm.stage_remove(G2, b()).expect("stage");
    let t = sm.apply().expect("apply");
    sm.settle();
    sm.stale_reads(2);
    sm.fail_next_sweep();
    sm.reorder_next_two_applies();
    assert_eq!(sm.generation(), t.generation);

    let state = sm.snapshot_state();
    let json = serde_json::to_string(&state).expect("serialize");
    let back: SimSmState = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, state);
    assert_eq!(back.generation(), t.generation);
    assert_eq!(back.config(), SimConfig::default());
    assert!(!back.sweep_pending());

    let restored = SimSm::from_state(back, Duration::ZERO);
    assert_eq!(restored.generation(), sm.generation());
    assert_eq!(restored.programmed(), sm.programmed());
    assert_eq!(restored.configured(), sm.configured());
    assert!(restored.now() >= state.now());
    // The fault knobs came along: the first two reads are stale, as they are on
    // the original.
    for _ in 0..3 {
        assert_eq!(
            restored.observe(&[G1, G2]).expect("observe"),
            sm.observe(&[G1, G2]).expect("observe")
        );
    }
    // The next apply is held back on both, and the next sweep fails on both.
    for s in [&sm, &restored] {
        s.stage_add(G2, a(), Full).expect("stage");
        let t = s.apply().expect("apply");
        s.settle();
        assert_eq!(s.configured().pkeys_of(G2), BTreeSet::new(), "held back");
        let (outcome, _) = s.programmed_at(t.generation).expect("swept");
        assert!(matches!(outcome, SweepOutcome::Errors(_)), "{outcome:?}");
    }
    // Ticket numbering continues where it was.
    let next = |s: &SimSm| s.apply().expect("apply").change;
    assert_eq!(next(&restored), next(&sm));
}

#[test]
fn a_sweep_pending_at_save_completes_after_restore_only_when_due() {
    let sm = SimSm::new(slow());
    sm.settle();
    sm.stage_add(G1, a(), Full).expect("stage");
    let t = sm.apply().expect("apply");
    let saved = sm.snapshot_state();
    assert!(saved.sweep_pending());
    let exp = grant(t, G1, a());
    let check = |s: &SimSm| verify(&s.observe(&[G1]).expect("observe"), &exp);

    // Not yet due: nothing swept.
    let early = SimSm::from_state(saved.clone(), HOUR - MINUTE);
    assert!(early.sweep_pending());
    assert!(early.generation() < t.generation);
    assert!(check(&early).failed().contains(&Question::SweepDone));

    // Started during the gap, still running.
    let running = SimSm::from_state(saved.clone(), HOUR + MINUTE / 2);
    assert!(running.sweep_pending());
    assert!(running.generation() < t.generation);
    assert!(!check(&running).is_verified());

    // Due and done during the gap, at the time it fell due.
    let late = SimSm::from_state(saved, HOUR + MINUTE);
    assert!(!late.sweep_pending());
    assert_eq!(late.generation(), t.generation);
    assert!(check(&late).is_verified());
    let completed = late
        .history()
        .into_iter()
        .find(|h| matches!(h.event, SimEvent::SweepCompleted { .. }))
        .expect("the sweep ran on restore");
    assert_eq!(completed.at, sm.now() + HOUR + MINUTE);
}

#[test]
fn a_frozen_sm_stays_frozen_across_a_restore() {
    let sm = SimSm::new(SimConfig::default());
    sm.settle();
    sm.freeze();
    sm.stage_add(G1, a(), Full).expect("stage");
    let t = sm.apply().expect("apply");
    let restored = SimSm::from_state(sm.snapshot_state(), HOUR);
    assert!(
        restored.generation() < t.generation,
        "frozen: nothing swept"
    );
    restored.thaw();
    assert_eq!(restored.settle(), t.generation);
}

#[test]
fn open_writes_a_fresh_state_file_with_its_format_and_save_time() {
    let (_dir, path) = state_file();
    let sm = PersistentSimSm::open(&path, instant()).expect("open");
    assert_eq!(sm.path(), path);
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).expect("written")).expect("JSON");
    assert_eq!(json["format"], PersistentSimSm::FORMAT);
    assert!(json["saved_at_unix_ms"].as_u64().expect("a number") > 0);
    assert!(json["state"].is_object());
    // The first sweep (due at once with zero lag) has run: the SM is up.
    assert!(sm.health().expect("health").is_healthy());
}

#[test]
fn two_handles_on_one_file_see_each_others_applies() {
    let (_dir, path) = state_file();
    let one = PersistentSimSm::open(&path, instant()).expect("open");
    let two = PersistentSimSm::open(&path, SimConfig::default()).expect("open");
    // The second open loaded the first one's SM; its own default is ignored.
    let config = two.with(|sm| sm.snapshot_state().config()).expect("with");
    assert_eq!(config, instant());

    one.stage_add(G1, a(), Full).expect("stage");
    let t1 = one.apply().expect("apply");
    let obs = two.observe(&[G1]).expect("observe");
    assert!(verify(&obs, &grant(t1, G1, a())).is_verified());

    two.stage_add(G2, b(), Full).expect("stage");
    let t2 = two.apply().expect("apply");
    assert!(t2.change > t1.change, "one apply counter: {t1:?} {t2:?}");
    assert!(t2.generation > t1.generation);
    let obs = one.observe(&[G1, G2]).expect("observe");
    assert!(verify(&obs, &grant(t2, G2, b())).is_verified());
    assert!(verify(&obs, &grant(t1, G1, a())).is_verified());

    // A third handle, as a later process, sees both.
    let three = PersistentSimSm::open(&path, instant()).expect("open");
    let configured = three.with(SimSm::configured).expect("with");
    assert_eq!(configured.pkeys_of(G1), BTreeSet::from([PKey(0x8001)]));
    assert_eq!(configured.pkeys_of(G2), BTreeSet::from([PKey(0x8002)]));
}

#[test]
fn a_pending_sweep_and_knobs_carry_over_between_handles() {
    let (_dir, path) = state_file();
    let one = PersistentSimSm::open(&path, slow()).expect("open");
    one.with(|sm| sm.settle()).expect("with");
    one.stage_add(G1, a(), Full).expect("stage");
    let t = one.apply().expect("apply");
    let exp = grant(t, G1, a());

    let two = PersistentSimSm::open(&path, slow()).expect("open");
    let v = verify(&two.observe(&[G1]).expect("observe"), &exp);
    assert!(v.failed().contains(&Question::SweepDone), "{v:?}");
    assert!(two.with(SimSm::sweep_pending).expect("with"));

    // Freeze on one handle: time passing on the other sweeps nothing.
    one.with(SimSm::freeze).expect("with");
    two.with(|sm| sm.advance(2 * HOUR)).expect("with");
    assert!(!verify(&one.observe(&[G1]).expect("observe"), &exp).is_verified());

    two.with(SimSm::thaw).expect("with");
    one.with(|sm| sm.advance(2 * HOUR)).expect("with");
    assert!(verify(&two.observe(&[G1]).expect("observe"), &exp).is_verified());
}

#[test]
fn a_handover_verifies_through_another_handle_with_wait_verified() {
    let (_dir, path) = state_file();
    // `devfence assign`: G1 into A.
    let assign = PersistentSimSm::open(&path, instant()).expect("open");
    assign.stage_add(G1, a(), Full).expect("stage");
    let t = assign.apply().expect("apply");
    let exp = grant(t, G1, a());
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_verified(&assign, &exp, deadline).expect("assigned");
    drop(assign);

    // `devfence handover`: G1 out of A (its VF's GUID rotated away), G2 into B...
    let handover = PersistentSimSm::open(&path, instant()).expect("open");
    handover.stage_remove(G1, a()).expect("stage");
    handover.with(|sm| sm.detach(G1)).expect("with");
    handover.stage_add(G2, b(), Full).expect("stage");
    let t = handover.apply().expect("apply");
    drop(handover);

    // ... and the gate, in another process, sees it from read-back alone.
    let gate = PersistentSimSm::open(&path, instant()).expect("open");
    let exp = Expectation::handover(t, Some((G1, &[a()])), Some((G2, &[(b(), Full)])));
    let deadline = Instant::now() + Duration::from_secs(30);
    let proof = wait_verified(&gate, &exp, deadline).expect("handover verified");
    assert!(proof.seen >= t.generation);
    let programmed = gate.with(SimSm::programmed).expect("with");
    assert_eq!(programmed.get(&G1), None);
    assert_eq!(
        programmed.get(&G2),
        Some(&BTreeSet::from([PKey(0x7fff), PKey(0x8002)]))
    );
}

#[test]
fn staged_changes_stay_with_their_handle_until_applied() {
    let (_dir, path) = state_file();
    let one = PersistentSimSm::open(&path, instant()).expect("open");
    let two = PersistentSimSm::open(&path, instant()).expect("open");
    one.stage_add(G1, a(), Full).expect("stage");
    // The other handle's apply does not carry this handle's batch.
    two.apply().expect("apply");
    assert!(one.with(SimSm::configured).expect("with").is_empty());
    // Nor does a later process see it: it never reached the SM.
    let later = PersistentSimSm::open(&path, instant()).expect("open");
    assert_eq!(later.discard_staged(), 0);
    assert!(later.with(SimSm::configured).expect("with").is_empty());

    // A failed apply leaves the batch staged; the next apply carries it.
    one.with(|sm| {
        sm.error_next_call(FabricError::Timeout {
            backend: "sim".into(),
            op: "apply".into(),
            after: Duration::from_secs(1),
            hint: "injected".into(),
        });
    })
    .expect("with");
    let e = one.apply().expect_err("injected");
    assert!(matches!(e, FabricError::Timeout { .. }), "{e}");
    let t = one.apply().expect("apply");
    let obs = two.observe(&[G1]).expect("observe");
    assert!(verify(&obs, &grant(t, G1, a())).is_verified());

    one.stage_add(G2, b(), Full).expect("stage");
    assert_eq!(one.discard_staged(), 1);
    one.apply().expect("apply");
    assert_eq!(
        one.with(SimSm::configured).expect("with").pkeys_of(G2),
        BTreeSet::new()
    );
}

#[test]
fn reserved_guids_are_refused_at_stage() {
    let (_dir, path) = state_file();
    let sm = PersistentSimSm::open(&path, instant()).expect("open");
    let e = sm.stage_add(Guid(0), a(), Full).expect_err("reserved");
    assert!(matches!(e, FabricError::ReservedGuid { .. }), "{e}");
    assert_eq!(sm.discard_staged(), 0);
}

#[test]
fn concurrent_handles_lose_no_update() {
    let (_dir, path) = state_file();
    PersistentSimSm::open(&path, instant()).expect("open");
    const N: u64 = 12;
    std::thread::scope(|s| {
        for base in [0x1000_u64, 0x2000] {
            let path = &path;
            s.spawn(move || {
                let sm = PersistentSimSm::open(path, instant()).expect("open");
                for k in 0..N {
                    sm.stage_add(Guid(base + k), a(), Full).expect("stage");
                    sm.apply().expect("apply");
                }
            });
        }
    });
    let sm = PersistentSimSm::open(&path, instant()).expect("open");
    let members = sm.with(SimSm::configured).expect("with").members_of(a());
    assert_eq!(members.len() as u64, 2 * N, "{members:?}");
    // 2N applies were numbered 1..=2N, none twice.
    let t = sm.apply().expect("apply");
    assert_eq!(t.change, ChangeId(2 * N + 1));
}

#[test]
fn state_and_lock_files_are_private() {
    let (_dir, path) = state_file();
    let sm = PersistentSimSm::open(&path, instant()).expect("open");
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&sibling(&path, ".lock")), 0o600);
    sm.stage_add(G1, a(), Full).expect("stage");
    sm.apply().expect("apply");
    assert_eq!(mode(&path), 0o600, "still private after a save");
    assert!(!sibling(&path, ".tmp").exists(), "no leftover");
}

#[test]
fn bad_state_files_are_errors_naming_the_path_and_are_left_alone() {
    let (_dir, path) = state_file();
    PersistentSimSm::open(&path, instant()).expect("open");
    let good = fs::read(&path).expect("read");
    let truncated = good[..good.len() / 2].to_vec();
    let future = String::from_utf8(good.clone())
        .expect("UTF-8")
        .replace(FORMAT, "devfence-simsm/99");
    let cases: [(&str, Vec<u8>, &str); 6] = [
        (
            "corrupt",
            b"{\"format\": \"devfence-simsm/1\", \x00garbage".to_vec(),
            "corrupt or truncated",
        ),
        ("truncated", truncated, "corrupt or truncated"),
        ("empty", Vec::new(), "empty"),
        ("unknown format", future.into_bytes(), "devfence-simsm/99"),
        (
            "no format",
            b"{\"state\": {}}".to_vec(),
            "no \"format\" field",
        ),
        (
            "bad state",
            br#"{"format": "devfence-simsm/1", "saved_at_unix_ms": 1, "state": {"now": 5}}"#
                .to_vec(),
            "does not decode",
        ),
    ];
    for (what, bytes, says) in cases {
        fs::write(&path, &bytes).expect("write");
        let e = PersistentSimSm::open(&path, instant()).expect_err(what);
        let msg = e.to_string();
        assert!(matches!(e, SimStateError::Invalid { .. }), "{what}: {msg}");
        assert!(msg.contains(&path.display().to_string()), "{what}: {msg}");
        assert!(msg.contains(says), "{what}: {msg}");
        assert!(
            msg.contains("delete it to start a fresh simulated fabric"),
            "{what}: {msg}"
        );
        assert_eq!(fs::read(&path).expect("read"), bytes, "{what}: untouched");
    }
}

#[test]
fn a_file_corrupted_under_an_open_handle_fails_closed() {
    let (_dir, path) = state_file();
    let sm = PersistentSimSm::open(&path, instant()).expect("open");
    sm.stage_add(G1, a(), Full).expect("stage");
    fs::write(&path, b"{\"format\"").expect("write");
    let e = sm.apply().expect_err("corrupt");
    let msg = e.to_string();
    assert!(matches!(e, FabricError::Malformed { .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(
        msg.contains("Hint: it is the simulated SM's state"),
        "{msg}"
    );
    let e = sm.observe(&[G1]).expect_err("corrupt");
    assert!(matches!(e, FabricError::Malformed { .. }), "{e}");
    assert_eq!(fs::read(&path).expect("read"), b"{\"format\"");
    assert_eq!(sm.discard_staged(), 1, "the batch is still staged");

    fs::remove_file(&path).expect("remove");
    let e = sm.health().expect_err("gone");
    assert!(e.to_string().contains("is gone"), "{e}");
    assert!(!path.exists(), "not silently re-created");
}

#[test]
fn a_save_time_in_the_future_counts_as_no_time_passed() {
    let (_dir, path) = state_file();
    let sm = PersistentSimSm::open(&path, slow()).expect("open");
    let saved = sm.with(SimSm::snapshot_state).expect("with");
    let mut json: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).expect("read")).expect("JSON");
    json["saved_at_unix_ms"] = serde_json::Value::from(u64::MAX);
    fs::write(&path, serde_json::to_vec(&json).expect("JSON")).expect("write");
    let later = PersistentSimSm::open(&path, slow()).expect("open");
    let state = later.with(SimSm::snapshot_state).expect("with");
    assert!(state.now() >= saved.now());
    assert!(state.now() < saved.now() + MINUTE, "no hour passed");
    assert!(state.sweep_pending(), "the first sweep is not due yet");
}

#[test]
fn errors_convert_to_fabric_errors_that_name_the_path() {
    let path = PathBuf::from("/nonexistent/simsm.json");
    let e = PersistentSimSm::open(&path, instant()).expect_err("no such directory");
    assert!(matches!(e, SimStateError::Io { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/simsm.json"), "{e}");
    let f = FabricError::from(e);
    assert!(matches!(f, FabricError::Os { errno: 2, .. }), "{f}");
    assert!(f.to_string().contains("/nonexistent/simsm.json"), "{f}");
    assert!(
        f.to_string()
            .contains("Hint: check that the directory exists"),
        "{f}"
    );
}
