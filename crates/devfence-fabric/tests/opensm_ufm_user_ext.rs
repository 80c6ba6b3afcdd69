//! issue 13 item 4: OpenSM managed by UFM. devfence writes its block into
//! `partitions.conf.user_ext` and has UFM merge it, on a real OpenSM 3.3.23 on
//! ibsim (`devfence-fabric-harness`).
//!
//! **UFM cannot run here.** A shell script written by [`play_ufm`] STANDS IN FOR
//! UFM: it does what NVIDIA documents UFM's `sync_partitions_conf.sh` (and UFM's
//! regeneration on every model change) to do — rewrite OpenSM's partitions file as
//! UFM's own content (`ufm-model.conf`, the emulated UFM model) followed by the
//! extension file, then start a heavy sweep (`SIGHUP`).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use devfence_fabric::opensm::{OpenSmSm, PartitionsMode, SaClient, SaConfig};
use devfence_fabric::{
    Expectation, FabricError, Generation, OpenSmConfig, PartitionKey, PortReader, Programmed,
    SubnetManager, Ticket, Verdict, verify, wait_verified,
};
use devfence_fabric_harness::{Fabric, FabricSpec, in_fabric};
use devfence_model::{Guid, Membership, PKey};

const BASE: Guid = Guid(0x0002_c903_00f0_0001);
const A: u16 = 0x8001;
const DEADLINE: Duration = Duration::from_secs(10);

fn key(p: u16) -> PartitionKey {
    PartitionKey::new(p).expect("valid")
}
fn vf(i: u64) -> Guid {
    Guid(BASE.0 + 2 * i)
}
/// One SA client per process (the umad2sim preload allows one connection).
fn sa() -> Arc<SaClient> {
    static SA: OnceLock<Arc<SaClient>> = OnceLock::new();
    Arc::clone(SA.get_or_init(|| Arc::new(SaClient::new(SaConfig::default()))))
}
fn table(g: Guid) -> BTreeSet<PKey> {
    match sa().read_port(g).expect("read the port") {
        Programmed::Present { pkeys, .. } => pkeys,
        Programmed::Absent => panic!("{g} is not on the fabric"),
    }
}
/// Waits (bounded) until `ok` holds.
fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// UFM's generated content in the emulation: its default partition (UFM owns
/// it) and a partition of UFM's own model.
fn ufm_model() -> String {
    format!(
        "# emulated UFM model (UFM cannot run here)\nmanagement=0x7fff, ipoib : ALL=limited, SELF=full ;\nufm_storage=0x8100, ipoib : {}=full ;\n",
        vf(3)
    )
}
fn spec(partitions: String) -> FabricSpec {
    FabricSpec {
        partitions,
        ..FabricSpec::vfs(4, BASE)
    }
}
fn ext(f: &Fabric) -> PathBuf {
    f.dir().join("partitions.conf.user_ext")
}
fn pf(f: &Fabric) -> PathBuf {
    f.dir().join("partitions.conf")
}

/// Writes the UFM stand-in: `ufm-model.conf` (UFM's own content) and
/// `ufm-sync.sh`, which regenerates the partitions file as UFM's content plus the
/// extension file and starts a heavy sweep. Returns the script.
fn play_ufm(f: &Fabric, model: &str) -> PathBuf {
    std::fs::write(f.dir().join("ufm-model.conf"), model).expect("model");
    let script = f.dir().join("ufm-sync.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         # STANDS IN FOR UFM (which cannot run here): UFM's sync_partitions_conf.sh and\n\
         # its regeneration on a model change write opensm/partitions.conf as UFM's own\n\
         # content followed by partitions.conf.user_ext, then start a heavy sweep.\n\
         set -eu\n\
         d=\"$(dirname \"$0\")\"\n\
         { cat \"$d/ufm-model.conf\"; if [ -f \"$d/partitions.conf.user_ext\" ]; then cat \"$d/partitions.conf.user_ext\"; fi; } > \"$d/partitions.conf.ufm-tmp\"\n\
         mv \"$d/partitions.conf.ufm-tmp\" \"$d/partitions.conf\"\n\
         kill -HUP \"$(cat \"$d/opensm.pid\")\"\n",
    )
    .expect("script");
    executable(&script);
    script
}
fn executable(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}
/// A UFM model change: UFM regenerates the partitions file (the stand-in runs
/// on its own, not through devfence) and OpenSM sweeps it.
fn ufm_regenerates(f: &Fabric, model: &str) {
    std::fs::write(f.dir().join("ufm-model.conf"), model).expect("model");
    let before = f.subnet_up_count();
    let st = std::process::Command::new(f.dir().join("ufm-sync.sh"))
        .status()
        .expect("run the UFM stand-in");
    assert!(st.success(), "the UFM stand-in failed: {st}");
    f.wait_subnet_up(before, DEADLINE).expect("the sweep");
}
fn ufm_cfg(f: &Fabric, mode: PartitionsMode, merge: &Path) -> OpenSmConfig {
    OpenSmConfig {
        partitions_mode: mode,
        ufm_merge_command: Some(vec![merge.display().to_string()]),
        ..f.opensm_config()
    }
}
fn backend(cfg: OpenSmConfig) -> OpenSmSm {
    OpenSmSm::with_port_reader(cfg, Box::new(sa()))
}
fn grant(sm: &OpenSmSm, g: Guid, k: u16) -> Ticket {
    sm.stage_add(g, key(k), Membership::Full).expect("stage");
    let t = sm.apply().expect("apply");
    let exp = Expectation::after(t).grant(g, [(key(k), Membership::Full)]);
    wait_verified(sm, &exp, Instant::now() + DEADLINE).expect("grant verified at the SA");
    t
}

/// A grant through the extension file reaches the port (verified at the SA);
/// `auto` finds UFM's extension file and `status` says so; the operator's line
/// in the extension file is kept; a UFM regeneration on a model change keeps
/// devfence's memberships; a release goes the same way.
#[test]
fn a_grant_through_user_ext_reaches_the_port_and_survives_ufms_regeneration() {
    in_fabric(
        "a_grant_through_user_ext_reaches_the_port_and_survives_ufms_regeneration",
        &spec(ufm_model()),
        |f| {
            let merge = play_ufm(f, &ufm_model());
            // The operator's own extension line (UFM's documented use of the file).
            let operator = format!("# operator\nop_limited=0x8200 : {}=limited ;\n", vf(2));
            std::fs::write(ext(f), &operator).expect("operator's extension");
            let sm = backend(ufm_cfg(f, PartitionsMode::Auto, &merge));
            let h = sm.health().expect("health");
            assert!(
                h.notes
                    .iter()
                    .any(|n| n.contains("partitions_mode ufm-user-ext (auto: UFM's extension file")),
                "{h:?}"
            );
            grant(&sm, vf(0), A);
            assert!(table(vf(0)).contains(&PKey(A)), "{:?}", table(vf(0)));
            let e = std::fs::read_to_string(ext(f)).expect("ext");
            assert!(
                e.starts_with(&operator),
                "the operator's lines stay first: {e}"
            );
            assert!(e.contains(&format!("{}=full ;", vf(0))), "{e}");
            assert!(!e.contains("0x7fff"), "UFM owns the default partition: {e}");
            let merged = std::fs::read_to_string(pf(f)).expect("merged");
            assert!(merged.starts_with(&ufm_model()), "{merged}");
            // The configured view comes from the merged file.
            let o = sm.observe(&[vf(0)]).expect("observe");
            let conf = o.ports[&vf(0)].configured.clone().expect("configured");
            assert!(conf.contains(&PKey(A)), "{conf:?}");
            // The operator's extension line reached its port too.
            until("the operator's partition at vf2", || {
                table(vf(2)).contains(&PKey(0x0200))
            });

            // A UFM model change: UFM regenerates the partitions file from its
            // model and the extension file. devfence's membership stays.
            let model2 = format!(
                "{}ufm_compute=0x8300, ipoib : {}=full ;\n",
                ufm_model(),
                vf(3)
            );
            ufm_regenerates(f, &model2);
            let merged = std::fs::read_to_string(pf(f)).expect("merged");
            assert!(merged.contains("ufm_compute"), "{merged}");
            assert!(table(vf(3)).contains(&PKey(0x8300)), "{:?}", table(vf(3)));
            assert!(table(vf(0)).contains(&PKey(A)), "lost: {:?}", table(vf(0)));
            // A new process verifies the grant after the regeneration.
            let sm2 = backend(ufm_cfg(f, PartitionsMode::Auto, &merge));
            let t = Ticket {
                change: devfence_fabric::ChangeId(0),
                generation: Generation(f.subnet_up_count()),
            };
            let exp = Expectation::after(t).grant(vf(0), [(key(A), Membership::Full)]);
            wait_verified(&sm2, &exp, Instant::now() + DEADLINE)
                .expect("still verified after the regeneration");

            // A release through the extension file.
            sm2.stage_remove_all(vf(0)).expect("stage");
            let t = sm2.apply().expect("apply");
            let exp = Expectation::after(t).revoke(vf(0), [key(A)]);
            wait_verified(&sm2, &exp, Instant::now() + DEADLINE).expect("revoked");
            let e = std::fs::read_to_string(ext(f)).expect("ext");
            assert!(
                e.starts_with(&operator) && !e.contains(&vf(0).to_string()),
                "{e}"
            );
            assert!(table(vf(2)).contains(&PKey(0x0200)));
        },
    );
}

/// Why the mode matters: in `direct` mode devfence writes OpenSM's partitions
/// file, which UFM owns — the next regeneration drops devfence's block and the
/// port loses its tenant's partition. (UFM's model here defines no default
/// partition: the `direct` block renders one, which would conflict with UFM's.)
/// Once UFM's extension file exists, `status` warns about the `direct` choice.
#[test]
fn in_direct_mode_a_ufm_regeneration_loses_devfences_memberships() {
    let model = format!("ufm_storage=0x8100, ipoib : {}=full ;\n", vf(3));
    in_fabric(
        "in_direct_mode_a_ufm_regeneration_loses_devfences_memberships",
        &spec(model.clone()),
        |f| {
            play_ufm(f, &model);
            let sm = backend(f.opensm_config());
            grant(&sm, vf(0), A);
            assert!(table(vf(0)).contains(&PKey(A)));
            ufm_regenerates(f, &model);
            until("the regeneration to drop vf0's partition", || {
                !table(vf(0)).contains(&PKey(A))
            });
            assert!(
                !std::fs::read_to_string(pf(f))
                    .expect("pf")
                    .contains(&vf(0).to_string())
            );
            std::fs::write(ext(f), "").expect("UFM's extension file");
            let h = sm.health().expect("health");
            assert!(
                h.notes.iter().any(|n| n
                    .contains("partitions_mode direct (configured or the default)")
                    && n.contains("WARNING")),
                "{h:?}"
            );
        },
    );
}

/// A failing merge command is a clear error naming the command, with a hint;
/// the extension file is put back byte for byte, the change stays staged, no
/// ticket is issued and the port does not hold the partition (nothing verifies
/// as applied). The same for a command that hangs (killed at the timeout), one
/// that exits 0 without merging, and one that merges and then fails (merged
/// again after the rollback, so the partitions file loses the change again). The
/// staged change applies once the merge works.
#[test]
fn a_failing_merge_is_a_clear_error_and_nothing_is_applied() {
    in_fabric(
        "a_failing_merge_is_a_clear_error_and_nothing_is_applied",
        &spec(ufm_model()),
        |f| {
            let good = play_ufm(f, &ufm_model());
            let operator = format!("op_limited=0x8200 : {}=limited ;\n", vf(2));
            std::fs::write(ext(f), &operator).expect("ext");
            let fails = f.dir().join("ufm-fails.sh");
            std::fs::write(
                &fails,
                "#!/bin/sh\necho 'UFM: partitions.conf.user_ext validation failed' >&2\nexit 3\n",
            )
            .expect("script");
            executable(&fails);
            let merges_then_fails = f.dir().join("ufm-merges-then-fails.sh");
            std::fs::write(
                &merges_then_fails,
                format!(
                    "#!/bin/sh\n{} || exit 9\necho 'UFM: sweep request failed' >&2\nexit 4\n",
                    good.display()
                ),
            )
            .expect("script");
            executable(&merges_then_fails);
            let hangs = vec!["/bin/sleep".to_owned(), "30".to_owned()];
            let no_merge = vec!["/bin/true".to_owned()];
            let pf_before = std::fs::read_to_string(pf(f)).expect("pf");
            for (argv, timeout_ms, want) in [
                (
                    vec![fails.display().to_string()],
                    60_000,
                    "validation failed",
                ),
                (hangs, 300, "timed out"),
                (no_merge, 60_000, "does not hold devfence's block"),
                (
                    vec![merges_then_fails.display().to_string()],
                    60_000,
                    "no longer holds the change",
                ),
            ] {
                let cfg = OpenSmConfig {
                    ufm_merge_command: Some(argv.clone()),
                    ufm_merge_timeout_ms: timeout_ms,
                    ..ufm_cfg(f, PartitionsMode::UfmUserExt, &good)
                };
                let sm = backend(cfg);
                sm.stage_add(vf(0), key(A), Membership::Full)
                    .expect("stage");
                let before = f.subnet_up_count();
                let e = sm.apply().expect_err("the merge fails");
                let s = e.to_string();
                assert!(s.contains(want) && s.contains("Hint:"), "{argv:?}: {s}");
                assert!(s.contains(&argv[0]), "names the command: {s}");
                if want == "timed out" {
                    assert!(matches!(e, FabricError::Timeout { .. }), "{s}");
                }
                assert!(s.contains("put back as it was"), "{s}");
                assert_eq!(
                    std::fs::read_to_string(ext(f)).expect("ext"),
                    operator,
                    "{argv:?}: the extension file is rolled back"
                );
                if want == "no longer holds the change" {
                    // The failed merge had signalled OpenSM with the change in
                    // the file; the re-merge took it out and signalled again:
                    // OpenSM ends on the file without it.
                    assert!(
                        !std::fs::read_to_string(pf(f))
                            .expect("pf")
                            .contains(&vf(0).to_string())
                    );
                    f.wait_subnet_up(before, DEADLINE).expect("sweep");
                    until("vf0 without A after the re-merge", || {
                        !table(vf(0)).contains(&PKey(A))
                    });
                    assert_eq!(sm.discard_staged(), 1, "the change stayed staged");
                    continue;
                }
                assert_eq!(std::fs::read_to_string(pf(f)).expect("pf"), pf_before);
                // Nothing verifies as applied: the port holds no A, and a gate
                // asking for it now does not pass.
                assert!(!table(vf(0)).contains(&PKey(A)), "{:?}", table(vf(0)));
                let o = sm.observe(&[vf(0)]).expect("observe");
                let t = Ticket {
                    change: devfence_fabric::ChangeId(1),
                    generation: Generation(before),
                };
                let exp = Expectation::after(t).grant(vf(0), [(key(A), Membership::Full)]);
                assert!(matches!(verify(&o, &exp), Verdict::NotVerified(_)));
                assert_eq!(sm.discard_staged(), 1, "the change stayed staged");
            }
            // With the working merge, the same change applies.
            let sm = backend(ufm_cfg(f, PartitionsMode::UfmUserExt, &good));
            grant(&sm, vf(0), A);
            let e = std::fs::read_to_string(ext(f)).expect("ext");
            assert!(e.starts_with(&operator), "{e}");
        },
    );
}

/// A UFM partition that takes a P_Key devfence would write is refused before
/// anything is written or merged: OpenSM must never be handed a merged file its
/// parser would refuse.
#[test]
fn a_p_key_ufm_uses_is_refused_before_the_merge() {
    in_fabric(
        "a_p_key_ufm_uses_is_refused_before_the_merge",
        &spec(ufm_model()),
        |f| {
            let merge = play_ufm(f, &ufm_model());
            let sm = backend(ufm_cfg(f, PartitionsMode::UfmUserExt, &merge));
            let before = std::fs::read_to_string(pf(f)).expect("pf");
            sm.stage_add(vf(0), key(0x8100), Membership::Full)
                .expect("stage");
            let e = sm.apply().expect_err("conflict with UFM's ufm_storage");
            let s = e.to_string();
            assert!(s.contains("would not parse") && s.contains("0x0100"), "{s}");
            assert!(s.contains("Hint:"), "{s}");
            assert!(!ext(f).exists(), "nothing written");
            assert_eq!(std::fs::read_to_string(pf(f)).expect("pf"), before);
        },
    );
}

/// The extension file gets the partitions file's safety: an operator's edit
/// saved while devfence applies is kept (compare-and-replace: the work is
/// redone on the new text), a symlink is refused, an operator's line OpenSM
/// would misread is refused before anything is written or merged.
#[test]
fn the_extension_file_gets_the_partitions_files_safety() {
    in_fabric(
        "the_extension_file_gets_the_partitions_files_safety",
        &spec(ufm_model()),
        |f| {
            let merge = play_ufm(f, &ufm_model());
            let sm = backend(ufm_cfg(f, PartitionsMode::UfmUserExt, &merge));
            // An operator saves a line while devfence applies (once).
            let edit = format!("op_late=0x8201 : {}=full ;\n", vf(2));
            let once = std::sync::Mutex::new(Some(edit.clone()));
            sm.set_before_replace(move |p| {
                if let Some(line) = once.lock().expect("lock").take() {
                    let mut t = std::fs::read_to_string(p).unwrap_or_default();
                    t.push_str(&line);
                    std::fs::write(p, t).expect("operator edit");
                }
            });
            grant(&sm, vf(0), A);
            let e = std::fs::read_to_string(ext(f)).expect("ext");
            assert!(e.starts_with(&edit), "the operator's edit is kept: {e}");
            assert!(e.contains(&vf(0).to_string()), "{e}");
            until("the operator's late partition at vf2", || {
                table(vf(2)).contains(&PKey(0x8201))
            });

            // An operator's line OpenSM would misread: refused, nothing merged.
            let typo = format!("{e}broken=0x8202 : 0x1\u{a0}=full ;\n");
            std::fs::write(ext(f), &typo).expect("typo");
            let merged = std::fs::read_to_string(pf(f)).expect("pf");
            let sm = backend(ufm_cfg(f, PartitionsMode::UfmUserExt, &merge));
            sm.stage_add(vf(1), key(A), Membership::Full)
                .expect("stage");
            let err = sm.apply().expect_err("typo").to_string();
            assert!(err.contains("U+00A0") && err.contains("Hint:"), "{err}");
            assert_eq!(std::fs::read_to_string(ext(f)).expect("ext"), typo);
            assert_eq!(std::fs::read_to_string(pf(f)).expect("pf"), merged);
            assert_eq!(sm.discard_staged(), 1);

            // A symlinked extension file: refused, the link left alone.
            let real = f.dir().join("ext-real");
            std::fs::write(&real, &e).expect("real");
            std::fs::remove_file(ext(f)).expect("rm");
            std::os::unix::fs::symlink(&real, ext(f)).expect("symlink");
            sm.stage_add(vf(1), key(A), Membership::Full)
                .expect("stage");
            let err = sm.apply().expect_err("symlink").to_string();
            assert!(
                err.contains("symbolic link") && err.contains("Hint:"),
                "{err}"
            );
            assert!(
                std::fs::symlink_metadata(ext(f))
                    .expect("meta")
                    .file_type()
                    .is_symlink()
            );
            assert_eq!(std::fs::read_to_string(&real).expect("real"), e);
        },
    );
}

/// issue 13 items 2 and 4 together: on a UFM-managed OpenSM the fabric
/// controller's fencing token goes into the extension file's block (and UFM's
/// merge carries it into partitions.conf); a deposed leader's apply meets the
/// newer token under the lock and is refused before anything is written or
/// merged.
#[test]
fn the_fencing_token_holds_through_the_extension_file() {
    in_fabric(
        "the_fencing_token_holds_through_the_extension_file",
        &spec(ufm_model()),
        |f| {
            let merge = play_ufm(f, &ufm_model());
            let old = backend(ufm_cfg(f, PartitionsMode::UfmUserExt, &merge));
            let new = backend(ufm_cfg(f, PartitionsMode::UfmUserExt, &merge));
            assert!(old.set_fence_token(5).expect("a token"));
            assert!(new.set_fence_token(7).expect("a token"));
            grant(&old, vf(0), A);
            let mark = devfence_fabric::opensm::fence::FENCE_MARK;
            let e = std::fs::read_to_string(ext(f)).expect("ext");
            assert!(e.contains(&format!("{mark} 5\n")), "{e}");
            assert_eq!(old.fence_token().expect("reads"), Some(5), "merged");
            grant(&new, vf(1), 0x8002);
            assert_eq!(new.fence_token().expect("reads"), Some(7));

            let (ext_before, pf_before) = (
                std::fs::read_to_string(ext(f)).expect("ext"),
                std::fs::read_to_string(pf(f)).expect("pf"),
            );
            old.stage_remove_all(vf(1)).expect("stage");
            let err = old.apply().expect_err("a deposed leader");
            assert!(
                matches!(&err, FabricError::Refused { detail, .. } if detail.contains("fencing token 7")),
                "{err}"
            );
            assert_eq!(std::fs::read_to_string(ext(f)).expect("ext"), ext_before);
            assert_eq!(std::fs::read_to_string(pf(f)).expect("pf"), pf_before);
            assert_eq!(old.discard_staged(), 1, "the change stays staged");
        },
    );
}
