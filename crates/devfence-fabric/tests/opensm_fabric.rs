//! The OpenSM backend against a real OpenSM on an ibsim fabric (one per test,
//! started by `devfence-fabric-harness`; each test re-runs itself under the umad2sim
//! preload so its SA queries reach the simulated fabric).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use devfence_fabric::opensm::{OpenSmSm, SaClient, SaConfig};
use devfence_fabric::{
    Expectation, FabricError, PartitionKey, PortReader, Programmed, Question, SmState,
    SubnetManager, Verdict, verify, wait_verified,
};
use devfence_fabric_harness::{Fabric, FabricSpec, in_fabric};
use devfence_model::{Guid, Membership, PKey};

const BASE: Guid = Guid(0x0002_c903_00f0_0001);
const A: u16 = 0x8001;
const B: u16 = 0x8002;

fn key(p: u16) -> PartitionKey {
    PartitionKey::new(p).expect("valid")
}
fn vf(i: u64) -> Guid {
    Guid(BASE.0 + 2 * i)
}
fn spec() -> FabricSpec {
    FabricSpec::vfs(4, BASE)
}
fn sm(f: &Fabric) -> OpenSmSm {
    OpenSmSm::new(f.opensm_config())
}
const DEADLINE: Duration = Duration::from_secs(10);

/// vf0 a full member of A: one apply, verified at the SA. The apply's ticket
/// and the expectation it was verified against.
fn grant_vf0_to_a(sm: &OpenSmSm) -> (devfence_fabric::Ticket, Expectation) {
    sm.stage_add(vf(0), key(A), Membership::Full)
        .expect("stage");
    let t = sm.apply().expect("apply");
    let exp = Expectation::after(t).grant(vf(0), [(key(A), Membership::Full)]);
    wait_verified(sm, &exp, Instant::now() + DEADLINE).expect("vf0's grant to A verified");
    (t, exp)
}

fn pkeys(sm: &OpenSmSm, g: Guid) -> Programmed {
    let o = sm.observe(&[g]).expect("observe");
    o.ports[&g].programmed.clone()
}

#[test]
fn handover_with_guid_rotation_verified_at_the_sa() {
    in_fabric(
        "handover_with_guid_rotation_verified_at_the_sa",
        &spec(),
        |f| {
            let sm = sm(f);
            let h = sm.health().expect("health");
            assert_eq!(h.status.state, SmState::Master, "{h:?}");
            assert!(
                h.version
                    .as_deref()
                    .is_some_and(|v| v.starts_with("OpenSM")),
                "{h:?}"
            );

            // Tenant A gets vf0; verified from the SA.
            grant_vf0_to_a(&sm);
            match pkeys(&sm, vf(0)) {
                Programmed::Present { pkeys, lid } => {
                    assert!(lid.is_some());
                    assert_eq!(pkeys, BTreeSet::from([PKey(0x7fff), PKey(A)]));
                }
                Programmed::Absent => panic!("vf0 absent"),
            }
            // The file holds devfence's block, one member per line.
            let text = std::fs::read_to_string(f.dir().join("partitions.conf")).expect("read");
            assert!(text.contains(&format!("    {}=full ;", vf(0))), "{text}");

            // Hand vf0 over to B: revoke, rotate the GUID (VF reset), grant.
            sm.stage_remove_all(vf(0)).expect("stage");
            let t = sm.apply().expect("apply revoke");
            let exp = Expectation::after(t).revoke(vf(0), [key(A)]);
            wait_verified(&sm, &exp, Instant::now() + DEADLINE).expect("revoked");
            let fresh = Guid(0x0002_c903_00f0_0101);
            f.rotate("vf0", fresh).expect("rotate");
            sm.stage_add(fresh, key(B), Membership::Full)
                .expect("stage");
            let t = sm.apply().expect("apply grant");
            let exp = Expectation::handover(
                t,
                Some((vf(0), &[key(A)])),
                Some((fresh, &[(key(B), Membership::Full)])),
            );
            let proof =
                wait_verified(&sm, &exp, Instant::now() + DEADLINE).expect("handover verified");
            let _ = proof;
            // The old GUID has left the fabric; the new one is exactly in B.
            assert_eq!(pkeys(&sm, vf(0)), Programmed::Absent);
            match pkeys(&sm, fresh) {
                Programmed::Present { pkeys, .. } => {
                    assert_eq!(pkeys, BTreeSet::from([PKey(0x7fff), PKey(B)]));
                }
                Programmed::Absent => panic!("fresh GUID absent"),
            }
        },
    );
}

#[test]
fn a_grant_for_a_guid_not_yet_on_the_fabric_holds_until_it_appears() {
    in_fabric(
        "a_grant_for_a_guid_not_yet_on_the_fabric_holds_until_it_appears",
        &spec(),
        |f| {
            let sm = sm(f);
            let fresh = Guid(0x0002_c903_00f0_0201);
            sm.stage_add(fresh, key(B), Membership::Full)
                .expect("stage");
            let t = sm.apply().expect("apply");
            let exp = Expectation::after(t).grant(fresh, [(key(B), Membership::Full)]);
            // The sweep runs, but no port has the GUID yet: not verified.
            f.wait_subnet_up(t.generation.0 - 1, DEADLINE)
                .expect("sweep");
            let nv = wait_verified(&sm, &exp, Instant::now() + Duration::from_millis(300))
                .expect_err("a GUID that is on no port is not granted");
            assert!(nv.failed().contains(&Question::NewExact), "{nv}");
            // The VF comes up with that GUID: the trap sweep programs it.
            f.rotate("vf1", fresh).expect("rotate");
            wait_verified(&sm, &exp, Instant::now() + DEADLINE)
                .expect("verified once on the fabric");
        },
    );
}

#[test]
fn a_frozen_sm_holds_the_gate_closed() {
    in_fabric("a_frozen_sm_holds_the_gate_closed", &spec(), |f| {
        let sm = sm(f);
        sm.stage_add(vf(2), key(A), Membership::Full)
            .expect("stage");
        let t = sm.apply().expect("apply");
        let exp = Expectation::after(t).grant(vf(2), [(key(A), Membership::Full)]);
        f.freeze().expect("SIGSTOP");
        // Whatever the SM managed before it froze, a stopped SM verifies nothing.
        let o = sm.observe(&[vf(2)]).expect("observe");
        assert_eq!(o.status.state, SmState::NotActive);
        let v = verify(&o, &exp);
        assert!(matches!(v, Verdict::NotVerified(_)), "{v:?}");
        let nv = wait_verified(&sm, &exp, Instant::now() + Duration::from_millis(200))
            .expect_err("held");
        assert!(nv.failed().contains(&Question::SweepDone), "{nv}");
        let h = sm.health().expect("health");
        assert!(h.notes.iter().any(|n| n.contains("stopped")), "{h:?}");
        // Nothing is written while it is stopped.
        sm.stage_add(vf(3), key(A), Membership::Full)
            .expect("stage");
        let e = sm.apply().expect_err("stopped");
        assert!(matches!(e, FabricError::Unreachable { .. }), "{e}");
        assert_eq!(sm.discard_staged(), 1, "the change stays staged");
        f.thaw().expect("SIGCONT");
        wait_verified(&sm, &exp, Instant::now() + DEADLINE).expect("verified after thaw");
    });
}

#[test]
fn a_broken_partitions_file_is_refused_and_a_misparse_restored() {
    in_fabric(
        "a_broken_partitions_file_is_refused_and_a_misparse_restored",
        &spec(),
        |f| {
            let sm = sm(f);
            let path = f.dir().join("partitions.conf");
            // A good apply first (it becomes the last good file once it sweeps clean).
            let (t, exp) = grant_vf0_to_a(&sm);
            let good = std::fs::read_to_string(&path).expect("read");
            assert_eq!(
                std::fs::read_to_string(sm.last_good_path()).expect("last good"),
                good
            );

            // 1. The operator's part has a line OpenSM would reject: devfence refuses
            //    to rewrite the file and signals nothing.
            let broken = format!("storage=0x8100 : 0xZZZZ=full ;\n{good}");
            std::fs::write(&path, &broken).expect("write");
            sm.stage_add(vf(1), key(A), Membership::Full)
                .expect("stage");
            let e = sm.apply().expect_err("refused");
            let s = e.to_string();
            assert!(s.contains("line 1") && s.contains("bad PortGUID"), "{s}");
            assert!(s.contains("default partition"), "{s}");
            assert_eq!(
                std::fs::read_to_string(&path).expect("read"),
                broken,
                "untouched"
            );
            sm.discard_staged();

            // 2. OpenSM reads it anyway (an operator's HUP): it falls back to the
            //    default configuration. devfence sees the parse error, fails closed,
            //    restores the last good file and keeps the refused one.
            let before = f.subnet_up_count();
            f.hup().expect("HUP");
            f.wait_subnet_up(before, DEADLINE)
                .expect("the fallback sweep");
            let o = sm.observe(&[vf(0)]).expect("observe");
            assert!(
                matches!(verify(&o, &exp), Verdict::NotVerified(_)),
                "a sweep with a parse error verifies nothing"
            );
            assert_eq!(
                std::fs::read_to_string(&path).expect("read"),
                good,
                "restored"
            );
            assert_eq!(
                std::fs::read_to_string(sm.rejected_path()).expect("rejected"),
                broken
            );
            let h = sm.health().expect("health");
            assert!(h.notes.iter().any(|n| n.contains("restored")), "{h:?}");
            // The restore signalled OpenSM: the next clean sweep verifies again.
            let exp2 = Expectation::after(devfence_fabric::Ticket {
                change: t.change,
                generation: devfence_fabric::Generation(o.status.generation.0 + 1),
            })
            .grant(vf(0), [(key(A), Membership::Full)]);
            wait_verified(&sm, &exp2, Instant::now() + DEADLINE).expect("verified after restore");
        },
    );
}

#[test]
fn the_sa_client_reads_ports_and_refuses_an_untrusted_key() {
    in_fabric(
        "the_sa_client_reads_ports_and_refuses_an_untrusted_key",
        &spec(),
        |_f| {
            let sa = SaClient::new(SaConfig::default());
            assert_eq!(
                sa.read_port(Guid(0x1234_5678)).expect("query"),
                Programmed::Absent
            );
            let n = sa.node_of(vf(1)).expect("query").expect("on the fabric");
            assert_eq!(n.port_guid, vf(1));
            assert_eq!(n.node_guid, Guid(vf(1).0 - 1));
            match sa.read_port(vf(1)).expect("read") {
                Programmed::Present { pkeys, .. } => {
                    assert_eq!(pkeys, BTreeSet::from([PKey(0x7fff)]))
                }
                Programmed::Absent => panic!("absent"),
            }
            let untrusted = SaClient::new(SaConfig {
                sm_key: 0,
                ..SaConfig::default()
            });
            let e = untrusted.read_port(vf(1)).expect_err("untrusted");
            assert!(matches!(e, FabricError::Refused { .. }), "{e}");
            assert!(e.to_string().contains("sm_key"), "{e}");
        },
    );
}

#[test]
fn an_sm_that_is_not_running_verifies_nothing() {
    in_fabric("an_sm_that_is_not_running_verifies_nothing", &spec(), |f| {
        let mut cfg = f.opensm_config();
        cfg.pid_file = Some(f.dir().join("no-such.pid"));
        let sm = OpenSmSm::new(cfg);
        let h = sm.health().expect("health");
        assert_eq!(h.status.state, SmState::NotActive);
        assert!(h.notes.iter().any(|n| n.contains("not running")), "{h:?}");
        sm.stage_add(vf(0), key(A), Membership::Full)
            .expect("stage");
        let before = std::fs::read_to_string(f.dir().join("partitions.conf")).expect("read");
        let e = sm.apply().expect_err("not running");
        assert!(matches!(e, FabricError::Unreachable { .. }), "{e}");
        assert_eq!(
            std::fs::read_to_string(f.dir().join("partitions.conf")).expect("read"),
            before,
            "nothing written"
        );
        let o = sm.observe(&[vf(0)]).expect("observe");
        assert!(o.ports.is_empty());
    });
}

/// issue 17 item 6: a fabric node's description is free text its host sets. A
/// node named `evil PARSE ERROR node` leaving the fabric makes OpenSM log its name;
/// devfence matches OpenSM's own message format (timestamp, thread, level, the
/// function prefix), so that line is not a parse error: nothing is restored, the
/// sweep is clean and the grant still verifies.
#[test]
fn a_node_description_saying_parse_error_is_not_a_parse_error() {
    let mut spec = spec();
    spec.ports
        .push(("evil PARSE ERROR node".into(), Guid(BASE.0 + 0x100)));
    in_fabric(
        "a_node_description_saying_parse_error_is_not_a_parse_error",
        &spec,
        |f| {
            let sm = sm(f);
            let (t, _) = grant_vf0_to_a(&sm);
            let before = f.subnet_up_count();
            f.console("Unlink \"evil PARSE ERROR node\"")
                .expect("unlink");
            f.wait_subnet_up(before, DEADLINE).expect("the trap sweep");
            let log = std::fs::read_to_string(f.dir().join("opensm.log")).expect("log");
            assert!(
                log.contains("evil PARSE ERROR node"),
                "OpenSM logged the node's name (else the test proves nothing):\n{log}"
            );
            let o = sm.observe(&[vf(0)]).expect("observe");
            assert_eq!(
                o.status.sweep,
                devfence_fabric::SweepOutcome::Clean,
                "{:?}",
                o.status
            );
            assert!(
                !sm.rejected_path().exists(),
                "nothing restored on a node's name"
            );
            let h = sm.health().expect("health");
            assert!(!h.notes.iter().any(|n| n.contains("restored")), "{h:?}");
            let exp2 = Expectation::after(devfence_fabric::Ticket {
                change: t.change,
                generation: o.status.generation,
            })
            .grant(vf(0), [(key(A), Membership::Full)]);
            assert!(
                matches!(verify(&o, &exp2), Verdict::Verified(_)),
                "{:?}",
                verify(&o, &exp2)
            );
        },
    );
}

/// Many ports read at once (the queries pipelined on one umad agent) give
/// exactly what reading them one by one gives: present ports with their own
/// tables, an unknown GUID absent, a GUID asked twice answered twice, in the
/// order asked.
#[test]
fn ports_read_together_are_read_as_one_by_one() {
    in_fabric("ports_read_together_are_read_as_one_by_one", &spec(), |f| {
        let sm = sm(f);
        sm.stage_add(vf(0), key(A), Membership::Full)
            .expect("stage");
        sm.stage_add(vf(1), key(B), Membership::Limited)
            .expect("stage");
        sm.stage_add(vf(2), key(A), Membership::Full)
            .expect("stage");
        sm.stage_add(vf(2), key(B), Membership::Full)
            .expect("stage");
        let t = sm.apply().expect("apply");
        let exp = Expectation::after(t)
            .grant(vf(0), [(key(A), Membership::Full)])
            .grant(vf(1), [(key(B), Membership::Limited)])
            .grant(
                vf(2),
                [(key(A), Membership::Full), (key(B), Membership::Full)],
            );
        wait_verified(&sm, &exp, Instant::now() + DEADLINE).expect("granted");

        let sa = SaClient::new(SaConfig::default());
        let asked = [vf(2), Guid(0x1234_5678), vf(0), vf(1), vf(3), vf(0)];
        let together = sa.read_ports(&asked).expect("read together");
        let one_by_one: Vec<Programmed> = asked
            .iter()
            .map(|g| sa.read_port(*g).expect("read one"))
            .collect();
        assert_eq!(together, one_by_one);
        assert_eq!(together[1], Programmed::Absent);
        match &together[0] {
            Programmed::Present { pkeys, .. } => {
                assert_eq!(*pkeys, BTreeSet::from([PKey(0x7fff), PKey(A), PKey(B)]))
            }
            Programmed::Absent => panic!("vf2 absent"),
        }
        match &together[3] {
            Programmed::Present { pkeys, .. } => {
                assert_eq!(*pkeys, BTreeSet::from([PKey(0x7fff), PKey(B & 0x7fff)]))
            }
            Programmed::Absent => panic!("vf1 absent"),
        }
        // More ports than the pipeline holds at once.
        let many: Vec<Guid> = (0..40).map(|i| vf(i % 4)).collect();
        let got = sa.read_ports(&many).expect("read many");
        assert_eq!(got.len(), many.len());
        for (g, p) in many.iter().zip(&got) {
            assert_eq!(
                *p,
                one_by_one[asked.iter().position(|a| a == g).expect("asked")]
            );
        }
    });
}

/// Several SA clients in one process, used from several threads at once and
/// opened and dropped as the agent's per-request environments do (one is
/// built per request, beside the re-verification's): every read answers, the
/// same as one client alone. The agent once died of a segfault in libc when
/// its periodic re-verification read the SA while a batch's gate did.
#[test]
fn sa_clients_on_several_threads_at_once_all_answer() {
    in_fabric(
        "sa_clients_on_several_threads_at_once_all_answer",
        &spec(),
        |f| {
            let sm = sm(f);
            grant_vf0_to_a(&sm);
            let want = SaClient::new(SaConfig::default())
                .read_ports(&[vf(0), vf(1)])
                .expect("one client");
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            for _ in 0..25 {
                                let sa = SaClient::new(SaConfig::default());
                                assert_eq!(sa.read_ports(&[vf(0), vf(1)]).expect("read"), want);
                                assert_eq!(sa.read_port(vf(0)).expect("read one"), want[0]);
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().expect("a reader thread");
                }
            });
        },
    );
}
