//! The fabric controller on real components: a 3-member etcd cluster on
//! loopback (devfence-etcd-harness) and a real OpenSM on ibsim
//! (devfence-fabric-harness; the test re-runs itself under the umad2sim
//! preload so that its SA queries reach the simulated fabric). Two
//! controllers run in this process, each with its own etcd client and its own
//! OpenSM backend over the same SM host's files, as two controller processes
//! on the SM host would.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use devfence_etcd_harness::{EtcdCluster, Options};
use devfence_fabric::opensm::OpenSmSm;
use devfence_fabric::opensm::fence::FENCE_MARK;
use devfence_fabric::{Programmed, SubnetManager};
use devfence_fabric_harness::{Fabric, FabricSpec, in_fabric};
use devfence_fleet::value::{DesiredRecord, Name, ObservedRecord};
use devfence_fleet::{
    Controller, ControllerConfig, Fleet, FleetError, FleetSettings, FleetStore, Guard,
    ObservedEntry,
};
use devfence_model::{Guid, PKey, TenantId};

const BASE: Guid = Guid(0x0002_c903_00c0_0001);
const DEADLINE: Duration = Duration::from_secs(60);

fn vf(i: u64) -> Guid {
    Guid(BASE.0 + 2 * i)
}
fn name(s: &str) -> Name {
    s.parse().expect("name")
}
fn tenant(s: &str) -> TenantId {
    s.parse().expect("tenant")
}

fn settings(c: &EtcdCluster) -> FleetSettings {
    let mut s = FleetSettings::plaintext(c.endpoints(), "dft", "ib0").expect("settings");
    s.timeout = Duration::from_secs(3);
    // Generous: two controllers, etcd and OpenSM share two loaded cores.
    s.lease_ttl = Duration::from_secs(6);
    s.batch_window = Duration::from_millis(300);
    s
}

/// Polls `ok` until it holds or the deadline passes (pacing only; the
/// verdict is `ok`'s).
fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn observed(f: &Fleet, h: &str, g: Guid) -> Option<ObservedEntry> {
    f.observed(Some(&name(h)))
        .expect("lists observed")
        .into_iter()
        .find(|o| o.guid == g)
}

/// The port's P_Key table as the SA answers (read once the SM reports itself
/// master: a read mid-sweep answers the status alone).
fn table(sm: &OpenSmSm, g: Guid) -> BTreeSet<PKey> {
    let mut view = None;
    wait_until("the SM to answer as master", || {
        view = sm.observe(&[g]).ok().and_then(|mut o| o.ports.remove(&g));
        view.is_some()
    });
    match &view.expect("a view").programmed {
        Programmed::Present { pkeys, .. } => pkeys.clone(),
        Programmed::Absent => panic!("{g} is not on the fabric"),
    }
}

fn file_token(f: &Fabric) -> Option<u64> {
    let text = std::fs::read_to_string(f.dir().join("partitions.conf")).expect("read");
    devfence_fabric::opensm::fence::token_in(&text).expect("token")
}

struct Running {
    ctl: Arc<Controller>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), devfence_fleet::ControllerError>>,
}

fn start(rt: &tokio::runtime::Runtime, c: &EtcdCluster, f: &Fabric, who: &str) -> Running {
    start_with(rt, c, f, who, |_| {})
}

fn start_with(
    rt: &tokio::runtime::Runtime,
    c: &EtcdCluster,
    f: &Fabric,
    who: &str,
    adjust: impl FnOnce(&mut ControllerConfig),
) -> Running {
    let s = settings(c);
    let store = rt
        .block_on(FleetStore::connect(s.clone()))
        .expect("connects");
    let sm: Arc<dyn SubnetManager> = Arc::new(OpenSmSm::new(f.opensm_config()));
    let mut cfg = ControllerConfig::new(name(who), &s);
    cfg.poll_interval = Duration::from_millis(100);
    adjust(&mut cfg);
    let ctl = Arc::new(Controller::new(store, sm, cfg));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let c2 = Arc::clone(&ctl);
    let task = rt.spawn(async move { c2.run(rx).await });
    Running { ctl, stop, task }
}

/// A 3-member etcd cluster, a client of it, a runtime for controllers and a
/// probe of the fabric's SM.
fn setup(fab: &Fabric) -> (EtcdCluster, Fleet, tokio::runtime::Runtime, OpenSmSm) {
    let c = EtcdCluster::start(&Options::default()).expect("etcd cluster starts");
    let f = Fleet::connect(settings(&c)).expect("connects");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let probe = OpenSmSm::new(fab.opensm_config());
    (c, f, rt, probe)
}

/// Waits for a stopped controller's task: it must end cleanly in time.
fn joined(
    rt: &tokio::runtime::Runtime,
    task: tokio::task::JoinHandle<Result<(), devfence_fleet::ControllerError>>,
) {
    rt.block_on(async {
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("stops in time")
            .expect("task")
            .expect("clean stop");
    });
}

fn lease_of(guards: &[Guard]) -> i64 {
    guards
        .iter()
        .find_map(|g| match g {
            Guard::LeaseHolds { lease, .. } => Some(*lease),
            _ => None,
        })
        .expect("a lease guard")
}

/// Two controllers: exactly one leads; three hosts' desired memberships go to
/// the SM in ONE apply, each verified at the SA and published as observed with
/// the sweep's generation and the revision it answers; a release is removed;
/// an orphaned host's GUID stays at the SM and is reported until an operator's
/// revoke removes it; the leader's lease revoked while it is paused just before
/// an apply → the standby takes over and finishes, and the stale leader's
/// apply is refused by the fence in the partitions file, its etcd writes are
/// Fenced.
#[test]
fn two_controllers_batch_fence_and_fail_over_on_etcd_and_opensm() {
    in_fabric(
        "two_controllers_batch_fence_and_fail_over_on_etcd_and_opensm",
        &FabricSpec::vfs(5, BASE),
        |fab| {
            let (c, f, rt, probe) = setup(fab);

            // Three hosts, three tenants, one VF each, desired before any
            // controller runs.
            let hosts = ["h0", "h1", "h2"];
            let tenants = ["red", "blue", "green"];
            let pk = [0x10u16, 0x20, 0x30];
            let mut sessions = Vec::new();
            let mut revs = Vec::new();
            for i in 0..3 {
                f.claim_pkey(&tenant(tenants[i]), PKey(pk[i]))
                    .expect("P_Key");
                let h = name(hosts[i]);
                f.claim_guid(&h, vf(i as u64)).expect("GUID");
                let s = f.register_host(&h).expect("registers");
                let want = DesiredRecord::new(tenant(tenants[i]), vec![PKey(0x8000 | pk[i])])
                    .expect("record");
                revs.push(f.set_desired(&s, vf(i as u64), &want).expect("desired"));
                sessions.push(s);
            }

            let a = start(&rt, &c, fab, "ctl-a");
            let b = start(&rt, &c, fab, "ctl-b");

            for i in 0..3 {
                wait_until("the three memberships published", || {
                    observed(&f, hosts[i], vf(i as u64))
                        .is_some_and(|o| o.record.desired_revision >= revs[i])
                });
            }
            // Exactly one leads, and the leader key names it.
            let (leader, standby) = match (a.ctl.is_leading(), b.ctl.is_leading()) {
                (true, false) => (a, b),
                (false, true) => (b, a),
                other => panic!("not exactly one leader: {other:?}"),
            };
            let (rec, token) = f
                .block_on(f.store().read_leader())
                .expect("reads")
                .expect("a leader");
            assert_eq!(&rec.controller, leader.ctl.name());
            // Three hosts, one apply (one sweep); the standby applied nothing.
            assert_eq!(leader.ctl.stats().applies, 1, "{:?}", leader.ctl.stats());
            assert_eq!(standby.ctl.stats().applies, 0);
            // The generation the batch verified at, as published (the last
            // report may already be a later idle round's, with none).
            let gen1 = observed(&f, hosts[0], vf(0))
                .expect("observed")
                .record
                .generation;
            assert!(gen1 > 0);
            for i in 0..3 {
                let o = observed(&f, hosts[i], vf(i as u64)).expect("observed");
                assert_eq!(o.record.pkeys, [PKey(0x8000 | pk[i])]);
                assert_eq!(o.record.generation, gen1);
                // Verified at the SA ourselves too.
                assert!(
                    table(&probe, vf(i as u64)).contains(&PKey(0x8000 | pk[i])),
                    "vf{i} not in its partition at the SA"
                );
            }
            let st = f
                .block_on(f.store().read_controller_status())
                .expect("reads")
                .expect("a status");
            assert_eq!(&st.controller, leader.ctl.name());
            assert_eq!(st.generation, gen1);
            // The fencing token is in devfence's block of the partitions file.
            assert_eq!(file_token(fab), u64::try_from(token).ok());
            let text = std::fs::read_to_string(fab.dir().join("partitions.conf")).expect("read");
            assert!(text.contains(&format!("{FENCE_MARK} {token}\n")), "{text}");

            // h2 releases its VF: removed at the SM, published with no P_Key.
            f.clear_desired(&sessions[2], vf(2)).expect("clears");
            wait_until("the release published", || {
                observed(&f, "h2", vf(2)).is_some_and(|o| o.record.pkeys.is_empty())
            });
            assert!(!table(&probe, vf(2)).contains(&PKey(0x8030)));

            // h1's lease ends: its desired entry goes, its GUID is orphaned —
            // kept at the SM, reported.
            let s1 = sessions.remove(1);
            f.close_session(s1).expect("revokes h1's lease");
            let after = f.block_on(f.store().read_view()).expect("reads").revision;
            wait_until("the orphan reported", || {
                leader.ctl.last_report().is_some_and(|r| {
                    r.revision >= after && r.orphaned.contains(&(name("h1"), vf(1)))
                })
            });
            assert!(
                table(&probe, vf(1)).contains(&PKey(0x8020)),
                "orphan removed"
            );
            assert!(observed(&f, "h1", vf(1)).is_some_and(|o| !o.record.pkeys.is_empty()));

            // An operator revokes it: removed at the SM, the revoke key and the
            // observed entry deleted.
            let rk = format!("/dft/ib0/revoke/h1/{:016x}", vf(1).0);
            c.etcdctl(&c.endpoints(), &["put", &rk, r#"{"by":"test"}"#])
                .expect("etcdctl put");
            wait_until("the revoke finished", || {
                observed(&f, "h1", vf(1)).is_none()
                    && c.etcdctl(&c.endpoints(), &["get", &rk])
                        .is_ok_and(|t| t.trim().is_empty())
            });
            assert!(
                !table(&probe, vf(1)).contains(&PKey(0x8020)),
                "revoked at the SA"
            );
            let applies_before = leader.ctl.stats().applies;

            // The leader pauses just before its next apply (as a SIGSTOP
            // would), its lease is revoked: the standby takes over and applies.
            let entered = Arc::new(AtomicBool::new(false));
            let go = Arc::new(AtomicBool::new(false));
            {
                let (entered, go) = (Arc::clone(&entered), Arc::clone(&go));
                leader.ctl.set_before_apply(move || {
                    entered.store(true, Ordering::SeqCst);
                    let end = Instant::now() + DEADLINE;
                    while !go.load(Ordering::SeqCst) && Instant::now() < end {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                });
            }
            f.claim_guid(&name("h0"), vf(3)).expect("GUID");
            let want = DesiredRecord::new(tenant("red"), vec![PKey(0x8010)]).expect("record");
            let rev3 = f.set_desired(&sessions[0], vf(3), &want).expect("desired");
            wait_until("the leader paused before its apply", || {
                entered.load(Ordering::SeqCst)
            });
            let stale = leader.ctl.last_guards().expect("guards");
            c.etcdctl(
                &c.endpoints(),
                &["lease", "revoke", &format!("{:x}", lease_of(&stale))],
            )
            .expect("etcdctl lease revoke");
            wait_until("the standby applied and published", || {
                standby.ctl.is_leading()
                    && observed(&f, "h0", vf(3)).is_some_and(|o| o.record.desired_revision >= rev3)
            });
            let (rec, token2) = f
                .block_on(f.store().read_leader())
                .expect("reads")
                .expect("a leader");
            assert_eq!(&rec.controller, standby.ctl.name());
            assert!(token2 > token);
            assert_eq!(file_token(fab), u64::try_from(token2).ok());
            assert!(table(&probe, vf(3)).contains(&PKey(0x8010)));
            let gen2 = observed(&f, "h0", vf(3))
                .expect("observed")
                .record
                .generation;
            assert!(gen2 > gen1);

            // The stale leader resumes: the fence in the file refuses its
            // apply; nothing of it reaches the SM, and its etcd writes fail.
            go.store(true, Ordering::SeqCst);
            wait_until("the stale apply refused", || {
                leader.ctl.stats().fenced_at_sm >= 1
            });
            assert_eq!(
                leader.ctl.stats().applies,
                applies_before,
                "the stale leader applied"
            );
            let e = leader.ctl.last_error().expect("an error");
            assert!(e.contains("fencing token"), "{e}");
            assert_eq!(file_token(fab), u64::try_from(token2).ok());
            let rec = ObservedRecord::new(vec![PKey(0x8010)], 1, 1).expect("record");
            let e = f
                .put_observed(&stale, &name("h0"), vf(3), &rec)
                .expect_err("a stale leader's write");
            assert!(matches!(e, FleetError::Fenced { .. }), "{e}");
            assert_eq!(
                observed(&f, "h0", vf(3))
                    .expect("observed")
                    .record
                    .generation,
                gen2
            );

            // SIGTERM's path: both stop; the leader resigns (no leader key).
            for r in [&leader, &standby] {
                let _ = r.stop.send(true);
            }
            for r in [leader, standby] {
                joined(&rt, r.task);
            }
            assert!(
                f.block_on(f.store().read_leader())
                    .expect("reads")
                    .is_none()
            );
        },
    );
}

/// The batching window folds a change that arrives after the first into the
/// same apply; a batch that does not verify at the SA (a GUID on no port yet)
/// is not published and is reported pending, and is published once the port
/// appears and the read-back verifies.
#[test]
fn the_window_folds_late_changes_and_an_unverified_batch_is_not_published() {
    in_fabric(
        "the_window_folds_late_changes_and_an_unverified_batch_is_not_published",
        &FabricSpec::vfs(3, BASE),
        |fab| {
            let (c, f, rt, probe) = setup(fab);
            let ctl = start_with(&rt, &c, fab, "ctl-a", |cfg| {
                cfg.batch_window = Duration::from_secs(3);
                cfg.verify_timeout = Duration::from_secs(5);
            });
            wait_until("the controller to lead", || ctl.ctl.is_leading());
            f.claim_pkey(&tenant("red"), PKey(0x10)).expect("P_Key");
            let mut sessions = Vec::new();
            for h in ["h0", "h1", "h2"] {
                sessions.push(f.register_host(&name(h)).expect("registers"));
            }
            let want = DesiredRecord::new(tenant("red"), vec![PKey(0x8010)]).expect("record");

            // Two hosts' changes, one after the other: one apply.
            let mut revs = Vec::new();
            for (i, s) in sessions.iter().take(2).enumerate() {
                f.claim_guid(s.host(), vf(i as u64)).expect("GUID");
                revs.push(f.set_desired(s, vf(i as u64), &want).expect("desired"));
            }
            for i in 0..2 {
                wait_until("both published", || {
                    observed(&f, sessions[i].host().as_str(), vf(i as u64))
                        .is_some_and(|o| o.record.desired_revision >= revs[i])
                });
            }
            assert_eq!(ctl.ctl.stats().applies, 1, "{:?}", ctl.ctl.stats());

            // A GUID on no port: applied, not verified, not published.
            let fresh = Guid(BASE.0 + 0x1001);
            f.claim_guid(sessions[2].host(), fresh).expect("GUID");
            let rev = f.set_desired(&sessions[2], fresh, &want).expect("desired");
            wait_until("a failed batch", || ctl.ctl.stats().failed_batches >= 1);
            assert!(
                observed(&f, "h2", fresh).is_none(),
                "an unverified batch was published"
            );
            let st = f
                .block_on(f.store().read_controller_status())
                .expect("reads")
                .expect("a status");
            assert!(st.pending >= 1, "{st:?}");
            assert!(
                ctl.ctl
                    .last_error()
                    .is_some_and(|e| e.contains("did not verify"))
            );

            // The port comes up with that GUID: the next round verifies and
            // publishes it.
            fab.rotate("vf2", fresh).expect("rotate");
            wait_until("the fresh GUID published", || {
                observed(&f, "h2", fresh).is_some_and(|o| o.record.desired_revision >= rev)
            });
            assert!(table(&probe, fresh).contains(&PKey(0x8010)));
            // All along, well past the 6 s lease TTL, the keep-alives held:
            // the controller was elected once, the hosts' desired entries live.
            assert_eq!(ctl.ctl.stats().elected, 1, "{:?}", ctl.ctl.stats());
            assert_eq!(f.desired(None).expect("lists").len(), 3);
            assert!(sessions.iter().all(|s| !s.is_lost()));
            let _ = ctl.stop.send(true);
            joined(&rt, ctl.task);
        },
    );
}

/// A host's desired write wakes the leading controller through its etcd watch:
/// with the poll an hour apart, the membership still reaches the SM, is
/// verified at the SA and published, and the stats count the wake-up.
#[test]
fn a_hosts_change_wakes_the_leader_through_the_watch_not_the_poll() {
    in_fabric(
        "a_hosts_change_wakes_the_leader_through_the_watch_not_the_poll",
        &FabricSpec::vfs(1, BASE),
        |fab| {
            let (c, f, rt, probe) = setup(fab);
            let ctl = start_with(&rt, &c, fab, "ctl-w", |cfg| {
                cfg.poll_interval = Duration::from_secs(3600);
            });
            wait_until("the controller to lead", || ctl.ctl.is_leading());
            wait_until("its first round", || ctl.ctl.stats().rounds >= 1);
            f.claim_pkey(&tenant("red"), PKey(0x10)).expect("P_Key");
            let s = f.register_host(&name("h0")).expect("registers");
            f.claim_guid(s.host(), vf(0)).expect("GUID");
            let want = DesiredRecord::new(tenant("red"), vec![PKey(0x8010)]).expect("record");
            let rev = f.set_desired(&s, vf(0), &want).expect("desired");
            wait_until("the membership published", || {
                observed(&f, "h0", vf(0)).is_some_and(|o| o.record.desired_revision >= rev)
            });
            assert!(table(&probe, vf(0)).contains(&PKey(0x8010)));
            let st = ctl.ctl.stats();
            assert!(st.woken >= 1, "{st:?}");
            assert_eq!(st.applies, 1, "{st:?}");
            let _ = ctl.stop.send(true);
            joined(&rt, ctl.task);
        },
    );
}
