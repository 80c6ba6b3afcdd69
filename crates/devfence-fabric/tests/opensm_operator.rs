//! issue 17: the OpenSM backend in an operator's world — logrotate, restarts,
//! concurrent edits, typos, a wrong key, a symlinked file, a duplicated GUID —
//! each against a real OpenSM 3.3.23 on ibsim (one per test, `devfence-fabric-harness`).

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use devfence_fabric::opensm::{OpenSmSm, SaClient, SaConfig};
use devfence_fabric::{
    Expectation, FabricError, Generation, PartitionKey, PortReader, Programmed, SmState,
    SubnetManager, SweepOutcome, Ticket, wait_verified,
};
use devfence_fabric_harness::{Fabric, FabricSpec, in_fabric};
use devfence_model::{Guid, Membership, PKey};

const BASE: Guid = Guid(0x0002_c903_00f0_0001);
const A: u16 = 0x8001;
const B: u16 = 0x8002;
const DEADLINE: Duration = Duration::from_secs(10);

fn key(p: u16) -> PartitionKey {
    PartitionKey::new(p).expect("valid")
}
fn vf(i: u64) -> Guid {
    Guid(BASE.0 + 2 * i)
}
fn spec() -> FabricSpec {
    FabricSpec::vfs(4, BASE)
}
/// One SA client per process: under the umad2sim preload a process has one
/// simulator connection (several clients crash it).
fn sa() -> Arc<SaClient> {
    static SA: OnceLock<Arc<SaClient>> = OnceLock::new();
    Arc::clone(SA.get_or_init(|| Arc::new(SaClient::new(SaConfig::default()))))
}
/// A backend with no memory of its own (as a new `devfence` process has).
fn sm(f: &Fabric) -> OpenSmSm {
    OpenSmSm::with_port_reader(f.opensm_config(), Box::new(sa()))
}
fn path(f: &Fabric) -> std::path::PathBuf {
    f.dir().join("partitions.conf")
}
fn read(f: &Fabric) -> String {
    std::fs::read_to_string(path(f)).expect("read the partitions file")
}
fn table(sa: &SaClient, g: Guid) -> BTreeSet<PKey> {
    match sa.read_port(g).expect("read the port") {
        Programmed::Present { pkeys, .. } => pkeys,
        Programmed::Absent => panic!("{g} is not on the fabric"),
    }
}
fn grant(sm: &OpenSmSm, g: Guid, k: u16) {
    sm.stage_add(g, key(k), Membership::Full).expect("stage");
    let t = sm.apply().expect("apply");
    let exp = Expectation::after(t).grant(g, [(key(k), Membership::Full)]);
    wait_verified(sm, &exp, Instant::now() + DEADLINE).expect("grant verified");
}
/// Waits (bounded) until `ok` holds for an observation.
fn until(sm: &OpenSmSm, what: &str, mut ok: impl FnMut(&OpenSmSm) -> bool) {
    let end = Instant::now() + DEADLINE;
    while !ok(sm) {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// issue 17 item 1: Debian's logrotate (`mv opensm.log opensm.log.1; kill -USR1`)
/// must not cost the SM's role: devfence reads it from the SM (SMInfoRecord), so
/// `status` stays healthy — in this process and in a new one — and grants still
/// verify after the rotation.
#[test]
fn a_rotated_log_keeps_the_sm_master_and_the_gates_working() {
    in_fabric(
        "a_rotated_log_keeps_the_sm_master_and_the_gates_working",
        &spec(),
        |f| {
            let sm = sm(f);
            grant(&sm, vf(0), A);
            let log = f.dir().join("opensm.log");
            std::fs::rename(&log, f.dir().join("opensm.log.1")).expect("mv");
            f.signal_usr1().expect("USR1");
            let end = Instant::now() + DEADLINE;
            while !log.exists() {
                assert!(Instant::now() < end, "OpenSM did not reopen its log");
                std::thread::sleep(Duration::from_millis(5));
            }
            for (who, s) in [("this process", &sm), ("a new process", &self::sm(f))] {
                let h = s.health().expect("health");
                assert_eq!(h.status.state, SmState::Master, "{who}: {h:?}");
                assert!(h.is_healthy(), "{who}: {h:?}");
            }
            // A new process assigns and verifies after the rotation.
            let sm2 = self::sm(f);
            grant(&sm2, vf(1), B);
            let o = sm2.observe(&[vf(0), vf(1)]).expect("observe");
            assert_eq!(o.ports.len(), 2, "{o:?}");
        },
    );
}

/// issue 17 item 2: a restore never rolls back devfence's verified changes nor
/// drops an operator's valid edit. After a release (vf0 out of A), an operator
/// appends a valid statement right after devfence's rename, then makes a typo and
/// HUPs: devfence restores the operator's last parseable text (with the valid
/// statement) and its *current* block (vf0 not in A, vf1 still in B), the retired
/// GUID does not hold A at the SA, the restore is persisted (a new process's
/// `status` reports it) and re-verified, and the next apply does not bring vf0 back.
#[test]
fn a_restore_keeps_the_operators_last_parseable_text_and_devfences_current_block() {
    in_fabric(
        "a_restore_keeps_the_operators_last_parseable_text_and_devfences_current_block",
        &spec(),
        |f| {
            let sm = sm(f);
            grant(&sm, vf(0), A);
            grant(&sm, vf(1), B);
            // Release vf0.
            sm.stage_remove_all(vf(0)).expect("stage");
            let t = sm.apply().expect("apply");
            // The operator appends a valid statement right after the rename.
            let operator = "storage=0x8100, ipoib : 0x0002c90300f00007=full ;\n";
            let mut text = read(f);
            text.push_str(operator);
            std::fs::write(path(f), &text).expect("operator edit");
            let exp = Expectation::after(t).revoke(vf(0), [key(A)]);
            wait_verified(&sm, &exp, Instant::now() + DEADLINE).expect("revoked");
            // Then a typo, and the operator's HUP: OpenSM falls back to everyone-full.
            let typo = format!("{text}broken=0x8101 : 0xZZZZ=full ;\n");
            std::fs::write(path(f), &typo).expect("typo");
            let before = f.subnet_up_count();
            f.hup().expect("HUP");
            f.wait_subnet_up(before, DEADLINE)
                .expect("the fallback sweep");
            until(&sm, "the restore", |s| {
                let _ = s.observe(&[vf(0)]);
                s.rejected_path().exists()
            });
            let restored = read(f);
            assert!(
                restored.contains(operator.trim_end()),
                "the operator's valid statement is kept:\n{restored}"
            );
            assert!(!restored.contains("0xZZZZ"), "{restored}");
            assert!(
                !restored.contains(&vf(0).to_string()),
                "the released GUID is not rendered back:\n{restored}"
            );
            assert!(
                restored.contains(&format!("{}=full", vf(1))),
                "vf1's grant is kept:\n{restored}"
            );
            assert_eq!(
                std::fs::read_to_string(sm.rejected_path()).expect("rejected"),
                typo
            );
            // At the SA, after the restore's sweep: vf0 not in A, vf1 in B.
            let sa = sa();
            let end = Instant::now() + DEADLINE;
            loop {
                let (t0, t1) = (table(&sa, vf(0)), table(&sa, vf(1)));
                if !t0.contains(&PKey(A)) && t1.contains(&PKey(B)) && !t0.contains(&PKey(0xffff)) {
                    break;
                }
                assert!(Instant::now() < end, "vf0 {t0:?}, vf1 {t1:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            // Persisted and re-verified: a new process reports it.
            until(&sm, "the re-verification", |s| {
                let _ = s.observe(&[]);
                s.health().is_ok_and(|h| {
                    h.notes
                        .iter()
                        .any(|n| n.contains("restore") && n.contains("port(s) verified"))
                })
            });
            let h = self::sm(f).health().expect("health");
            assert!(
                h.notes.iter().any(|n| n.contains("restore at generation")),
                "{h:?}"
            );
            assert!(h.is_healthy(), "{h:?}");
            // The next apply renders devfence's membership, not the file's past.
            grant(&sm, vf(2), A);
            let after = read(f);
            assert!(!after.contains(&vf(0).to_string()), "{after}");
            assert!(after.contains(operator.trim_end()), "{after}");
        },
    );
}

/// issue 17 item 3: an operator's edit saved while devfence applies (between its
/// read and its rename) is not lost: devfence notices the change and redoes its
/// work on the new text.
#[test]
fn an_operator_edit_during_apply_is_kept() {
    in_fabric("an_operator_edit_during_apply_is_kept", &spec(), |f| {
        let sm = sm(f);
        let operator = "storage=0x8100, ipoib : 0x0002c90300f00007=full ;\n";
        let mut done = false;
        sm.set_before_replace(move |p| {
            if !done {
                done = true;
                let mut t = std::fs::read_to_string(p).expect("read");
                t.push_str("storage=0x8100, ipoib : 0x0002c90300f00007=full ;\n");
                std::fs::write(p, t).expect("the operator's concurrent edit");
            }
        });
        grant(&sm, vf(0), A);
        let text = read(f);
        assert!(
            text.contains(operator.trim_end()),
            "the edit is kept:\n{text}"
        );
        assert!(text.contains(&format!("{}=full", vf(0))), "{text}");
        assert!(table(&sa(), vf(3)).contains(&PKey(0x8100)));
    });
}

/// issue 17 item 3: an editor that keeps changing the file makes apply give up
/// with a clear error after a bounded number of tries, writing nothing.
#[test]
fn a_file_that_keeps_changing_is_refused_after_bounded_retries() {
    in_fabric(
        "a_file_that_keeps_changing_is_refused_after_bounded_retries",
        &spec(),
        |f| {
            let sm = sm(f);
            let mut n = 0u32;
            sm.set_before_replace(move |p| {
                n += 1;
                let mut t = std::fs::read_to_string(p).expect("read");
                t.push_str(&format!("# edit {n}\n"));
                std::fs::write(p, t).expect("edit");
            });
            sm.stage_add(vf(0), key(A), Membership::Full)
                .expect("stage");
            let e = sm.apply().expect_err("refused");
            assert!(matches!(e, FabricError::Refused { .. }), "{e}");
            assert!(
                e.to_string().contains("changed") && e.to_string().contains("Hint"),
                "{e}"
            );
            assert!(!read(f).contains(&vf(0).to_string()));
            assert_eq!(sm.discard_staged(), 1, "the change stays staged");
        },
    );
}

/// issue 17 item 4: an OpenSM restart (its log rewritten, `accum_log_file
/// FALSE`) does not reset devfence's sweep count below what it signalled at: a
/// parse error after the restart is restored at once, not after as many HUPs as
/// sweeps were counted before.
#[test]
fn an_opensm_restart_rebases_the_sweep_count_and_restores_at_once() {
    in_fabric(
        "an_opensm_restart_rebases_the_sweep_count_and_restores_at_once",
        &spec(),
        |f| {
            let sm = sm(f);
            for i in 0..4 {
                grant(&sm, vf(i), A);
            }
            let g_before = sm.health().expect("health").status.generation;
            f.restart_opensm().expect("restart");
            // The count is rebased at once; the new process's SA may take a
            // moment past its first SUBNET UP to answer the role (a loaded CI
            // machine showed one 900 ms timeout): health says Unknown until
            // then, honestly, and Master once it answers.
            let h = sm.health().expect("health");
            assert!(h.status.generation >= g_before, "{h:?} vs {g_before}");
            until(&sm, "the restarted OpenSM to answer as master", |s| {
                s.health().is_ok_and(|h| {
                    h.status.state == SmState::Master && h.status.generation >= g_before
                })
            });
            // An operator typo + HUP on the restarted OpenSM: restored at once.
            let good = read(f);
            std::fs::write(path(f), format!("x=0x8101 : 0xZZZZ ;\n{good}")).expect("typo");
            let before = f.subnet_up_count();
            f.hup().expect("HUP");
            f.wait_subnet_up(before, DEADLINE).expect("sweep");
            // The sweep that read the typo is counted; the restore's own sweep is
            // the next one, however soon it comes (read before the restore).
            let typo_sweep = sm.health().expect("health").status.generation;
            until(&sm, "the restore", |s| {
                let _ = s.observe(&[vf(0)]);
                s.rejected_path().exists()
            });
            assert_eq!(read(f), good);
            let t = Ticket {
                change: devfence_fabric::ChangeId(0),
                generation: Generation(typo_sweep.0 + 1),
            };
            let exp = Expectation::after(t).grant(vf(0), [(key(A), Membership::Full)]);
            wait_verified(&sm, &exp, Instant::now() + DEADLINE)
                .expect("verified after the restore");
        },
    );
}

/// issue 17 item 8: a wrong non-zero sm_key makes OpenSM drop devfence's SA
/// queries (ERR 1A04): devfence says so, instead of "timed out … is OpenSM
/// running".
#[test]
fn a_wrong_sm_key_is_named_not_reported_as_a_timeout() {
    in_fabric(
        "a_wrong_sm_key_is_named_not_reported_as_a_timeout",
        &spec(),
        |_f| {
            let sa = SaClient::new(SaConfig {
                sm_key: 0x5,
                timeout_ms: 50,
                retries: 0,
                ..SaConfig::default()
            });
            let e = sa.read_port(vf(1)).expect_err("dropped");
            assert!(matches!(e, FabricError::Refused { .. }), "{e}");
            let s = e.to_string();
            assert!(s.contains("sm_key") && s.contains("1A04"), "{s}");
            assert!(!s.contains("is OpenSM running"), "{s}");
            // The role is still read (SMInfoRecord needs no key).
            assert_eq!(sa.sm_state().expect("role"), Some(SmState::Master));
        },
    );
}

/// issue 17 item 8: after OpenSM took a change, failing to write devfence's memo
/// must not report the change as not taken.
#[test]
fn a_memo_write_failing_after_the_signal_does_not_undo_the_apply() {
    in_fabric(
        "a_memo_write_failing_after_the_signal_does_not_undo_the_apply",
        &spec(),
        |f| {
            let sm = sm(f);
            // A directory in the memo's place: renaming the new memo onto it fails.
            let memo = f.dir().join("partitions.conf.devfence.json");
            let m2 = memo.clone();
            sm.set_before_replace(move |_| {
                let _ = std::fs::remove_file(&m2);
                let _ = std::fs::create_dir(&m2);
            });
            sm.stage_add(vf(0), key(A), Membership::Full)
                .expect("stage");
            let t = sm.apply().expect("OpenSM took the change: apply succeeds");
            let h = sm.health().expect("health");
            assert!(
                h.notes.iter().any(|n| n.contains("could not record")),
                "{h:?}"
            );
            let exp = Expectation::after(t).grant(vf(0), [(key(A), Membership::Full)]);
            std::fs::remove_dir(&memo).expect("rmdir");
            wait_verified(&sm, &exp, Instant::now() + DEADLINE).expect("verified");
            // Saved at the next chance.
            let text = std::fs::read_to_string(&memo).expect("memo");
            assert!(text.contains("\"serial\": 1"), "{text}");
        },
    );
}

/// issue 17 item 8: a symlinked partitions file is refused (devfence's atomic
/// rename would replace the link and leave its target — what OpenSM may read —
/// stale); nothing is written.
#[test]
fn a_symlinked_partitions_file_is_refused() {
    in_fabric("a_symlinked_partitions_file_is_refused", &spec(), |f| {
        let real = f.dir().join("partitions.real.conf");
        std::fs::rename(path(f), &real).expect("mv");
        std::os::unix::fs::symlink(&real, path(f)).expect("ln -s");
        let before = std::fs::read_to_string(&real).expect("read");
        let sm = sm(f);
        sm.stage_add(vf(0), key(A), Membership::Full)
            .expect("stage");
        let e = sm.apply().expect_err("refused");
        let s = e.to_string();
        assert!(s.contains("symbolic link") && s.contains("Hint"), "{s}");
        assert!(
            std::fs::symlink_metadata(path(f))
                .expect("stat")
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&real).expect("read"), before);
    });
}

/// issue 17 item 8: a duplicated GUID makes OpenSM loop on ERR 0D01 without
/// SUBNET UP; `status` must not say healthy.
#[test]
fn a_duplicated_guid_makes_the_sm_unhealthy() {
    in_fabric("a_duplicated_guid_makes_the_sm_unhealthy", &spec(), |f| {
        let sm = sm(f);
        assert!(sm.health().expect("health").is_healthy());
        // vf1 takes vf0's GUID: two ports, one GUID.
        f.console("Unlink \"vf1\"").expect("unlink");
        f.console(&format!("Guid \"vf1\" 0x{:016x}", vf(0).0 - 1))
            .expect("guid");
        f.console("ReLink \"vf1\"").expect("relink");
        let end = Instant::now() + DEADLINE;
        loop {
            let log = std::fs::read_to_string(f.dir().join("opensm.log")).unwrap_or_default();
            if log.contains("ERR 0D01") {
                break;
            }
            assert!(Instant::now() < end, "OpenSM logged no ERR 0D01:\n{log}");
            std::thread::sleep(Duration::from_millis(5));
        }
        let h = sm.health().expect("health");
        assert!(!h.is_healthy(), "{h:?}");
        assert!(
            matches!(h.status.sweep, SweepOutcome::Errors(ref e) if e.contains("0D01")),
            "{h:?}"
        );
    });
}

/// issue 18 item 7: an operator line naming a GUID devfence issued (`mine=0x8003 :
/// <devfence's GUID>=full ;`) is a conflict: the next apply refuses it naming both
/// lines, writes nothing and signals nothing.
#[test]
fn an_operator_line_naming_a_managed_guid_is_refused_at_apply() {
    in_fabric(
        "an_operator_line_naming_a_managed_guid_is_refused_at_apply",
        &spec(),
        |f| {
            let sm = sm(f);
            grant(&sm, vf(0), A);
            let text = format!("mine=0x8003 : {}=full ;\n{}", vf(0), read(f));
            std::fs::write(path(f), &text).expect("operator edit");
            let before = f.subnet_up_count();
            sm.stage_add(vf(1), key(A), Membership::Full)
                .expect("stage");
            let e = sm.apply().expect_err("conflict");
            let s = e.to_string();
            assert!(
                s.contains("line 1") && s.contains("devfence manages"),
                "{s}"
            );
            assert!(s.contains(&vf(0).to_string()) && s.contains("Hint"), "{s}");
            assert_eq!(read(f), text, "nothing written");
            assert_eq!(f.subnet_up_count(), before, "nothing signalled");
        },
    );
}

/// A port reader that reads the real SA but, while `lie` is set, reports `victim`
/// without any partition but the default one (a port that lost its grant).
struct Lying {
    victim: Guid,
    lie: Arc<std::sync::atomic::AtomicBool>,
}
impl PortReader for Lying {
    fn read_port(&self, g: Guid) -> Result<Programmed, FabricError> {
        let p = sa().read_port(g)?;
        if g == self.victim && self.lie.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(match p {
                Programmed::Present { lid, .. } => Programmed::Present {
                    lid,
                    pkeys: BTreeSet::from([PKey(0x7fff)]),
                },
                Programmed::Absent => Programmed::Absent,
            });
        }
        Ok(p)
    }
    fn local_sm_state(&self) -> Result<Option<SmState>, FabricError> {
        sa().local_sm_state()
    }
}

/// issue 17 item 2: when the re-verification after a restore finds a port devfence
/// manages without its partitions, the SM is not healthy (and `check --fabric`
/// turns FAB-RESTORED into an error) until a later sweep re-verifies it.
#[test]
fn a_failed_reverification_after_a_restore_makes_the_sm_unhealthy_until_it_passes() {
    in_fabric(
        "a_failed_reverification_after_a_restore_makes_the_sm_unhealthy_until_it_passes",
        &spec(),
        |f| {
            let lie = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sm = OpenSmSm::with_port_reader(
                f.opensm_config(),
                Box::new(Lying {
                    victim: vf(0),
                    lie: Arc::clone(&lie),
                }),
            );
            grant(&sm, vf(0), A);
            let good = read(f);
            std::fs::write(path(f), format!("x=0x8101 : 0xZZZZ ;\n{good}")).expect("typo");
            let before = f.subnet_up_count();
            f.hup().expect("HUP");
            f.wait_subnet_up(before, DEADLINE).expect("sweep");
            lie.store(true, std::sync::atomic::Ordering::SeqCst);
            until(&sm, "the failed re-verification", |s| {
                let _ = s.observe(&[]);
                s.health()
                    .is_ok_and(|h| h.notes.iter().any(|n| n.contains("FAILED")))
            });
            let h = sm.health().expect("health");
            assert!(!h.is_healthy(), "{h:?}");
            assert!(
                matches!(h.status.sweep, SweepOutcome::Errors(ref e) if e.contains(&vf(0).to_string())),
                "{h:?}"
            );
            // The port holds its grant again (here: the reader stops lying); the
            // next sweep re-verifies and the SM is healthy again.
            lie.store(false, std::sync::atomic::Ordering::SeqCst);
            let before = f.subnet_up_count();
            f.hup().expect("HUP");
            f.wait_subnet_up(before, DEADLINE).expect("sweep");
            until(&sm, "the passing re-verification", |s| {
                let _ = s.observe(&[]);
                s.health().is_ok_and(|h| h.is_healthy())
            });
        },
    );
}
