//! The fleet's status, its GUID pool report and the operator's revoke
//! request (issue 13 items 5 and 6) on a real 3-member etcd cluster on
//! loopback (devfence-etcd-harness).
//!
//! The fabric controller is another engineer's part: where a test needs what
//! it writes (an observed entry, the leader key, its status key) a small
//! stand-in writes exactly the agreed values (docs/fleet.md, key layout) —
//! each such write is marked "controller stand-in".

use std::collections::BTreeSet;
use std::time::Duration;

use devfence_etcd_harness::{EtcdCluster, Options};
use devfence_fleet::status::{MembershipState, RevokeError, RevokeTarget};
use devfence_fleet::value::{DesiredRecord, GuidRange, GuidState, Name, ObservedRecord};
use devfence_fleet::{Fleet, FleetSettings};
use devfence_model::{Guid, PKey, TenantId};

const FIRST: u64 = 0x0002_c903_0000_0000;
const PREFIX: &str = "dft";

/// One cluster at a time (three members per test on a 2-core machine).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn cluster() -> EtcdCluster {
    EtcdCluster::start(&Options::default()).expect("etcd cluster starts")
}

fn fleet(c: &EtcdCluster) -> Fleet {
    let mut s = FleetSettings::plaintext(c.endpoints(), PREFIX, "ib0").expect("settings");
    s.timeout = Duration::from_secs(3);
    s.lease_ttl = Duration::from_secs(30);
    Fleet::connect(s).expect("connects")
}

fn name(s: &str) -> Name {
    s.parse().expect("name")
}

fn tenant(s: &str) -> TenantId {
    s.parse().expect("tenant")
}

fn range(n: u64) -> GuidRange {
    GuidRange {
        first: Guid(FIRST),
        last: Guid(FIRST + n - 1),
    }
}

/// Controller stand-in: what the controller publishes after reading back
/// `pkeys` for `host`'s port `guid`, answering the desired view at `rev`.
fn observe(f: &Fleet, host: &Name, guid: Guid, pkeys: &[PKey], rev: i64) {
    let obs = ObservedRecord::new(pkeys.to_vec(), 7, rev).expect("observed");
    f.put_observed(&[], host, guid, &obs)
        .expect("controller stand-in writes observed");
}

/// Item 6 and the "observed ≥ desired" rule: a host's desired membership is
/// pending until an observed entry answers its revision, then in sync; the
/// host's lease shows its TTL; no leader is said as such, then the leader's
/// fencing token is the leader key's create revision.
#[test]
fn a_desired_membership_is_pending_until_observed_at_its_revision() {
    let _one = serial();
    let c = cluster();
    let f = fleet(&c);
    f.configure_guid_range(range(1000)).expect("range");
    f.claim_pkey(&tenant("red"), PKey(0x0010)).expect("pkey");
    let h1 = name("h1");
    let s1 = f.register_host(&h1).expect("registers");
    let g = f.allocate_guids(&h1, 1).expect("allocates")[0];
    let want = DesiredRecord::new(tenant("red"), vec![PKey(0x8010)]).expect("desired");
    let rev = f.set_desired(&s1, g, &want).expect("desired written");

    let st = f.status().expect("status");
    assert!(st.revision >= rev, "{st:?}");
    assert!(st.leader.is_none(), "no controller leads yet: {st:?}");
    assert!(st.controller.is_none());
    assert_eq!(st.hosts.len(), 1, "{st:?}");
    let h = &st.hosts[0];
    assert!(h.live && h.lease == Some(s1.lease()), "{h:?}");
    let ttl = h.ttl_left_s.expect("the lease's TTL is read");
    assert!((1..=30).contains(&ttl), "{h:?}");
    assert_eq!(h.memberships.len(), 1);
    assert_eq!(h.memberships[0].state, MembershipState::Pending);
    assert_eq!(h.memberships[0].desired_revision, Some(rev));
    assert_eq!(st.counts.pending, 1);

    // Observed at an older desired revision: still pending.
    observe(&f, &h1, g, &[PKey(0x8010)], rev - 1);
    let st = f.status().expect("status");
    assert_eq!(st.hosts[0].memberships[0].state, MembershipState::Pending);
    // Observed at the desired revision: in sync.
    observe(&f, &h1, g, &[PKey(0x8010)], rev);
    let st = f.status().expect("status");
    let m = &st.hosts[0].memberships[0];
    assert_eq!(m.state, MembershipState::InSync, "{m:?}");
    assert_eq!(m.observed_generation, Some(7));
    assert_eq!((st.counts.in_sync, st.counts.pending), (1, 0));
    // A newer desired entry makes it pending again until answered.
    let want2 = DesiredRecord::new(tenant("red"), vec![PKey(0x0010)]).expect("desired");
    let rev2 = f.set_desired(&s1, g, &want2).expect("desired written");
    let st = f.status().expect("status");
    assert_eq!(st.hosts[0].memberships[0].state, MembershipState::Pending);
    // Answered at that revision with other P_Keys: a mismatch, not in sync.
    observe(&f, &h1, g, &[PKey(0x8010)], rev2);
    let st = f.status().expect("status");
    assert_eq!(st.hosts[0].memberships[0].state, MembershipState::Mismatch);

    // Controller stand-in: the election's leader key (under a lease) and the
    // controller's status key.
    let eps = c.endpoints();
    let lease_out = c
        .etcdctl(&eps, &["lease", "grant", "60"])
        .expect("lease grant");
    let lease_hex = lease_out
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_owned();
    let lease = i64::from_str_radix(&lease_hex, 16).expect("hex lease");
    let leader = format!("{{\"controller\":\"ctl-a\",\"lease\":{lease}}}");
    c.etcdctl(
        &eps,
        &[
            "put",
            "/dft/ib0/leader",
            &leader,
            &format!("--lease={lease_hex}"),
        ],
    )
    .expect("controller stand-in: leader key");
    c.etcdctl(
        &eps,
        &[
            "put",
            "/dft/ib0/controller/status",
            &format!(
                "{{\"controller\":\"ctl-a\",\"generation\":7,\"applied_revision\":{rev2},\"pending\":0,\"time\":\"2026-12-05T03:00:00Z\"}}"
            ),
        ],
    )
    .expect("controller stand-in: status key");
    let st = f.status().expect("status");
    let l = st.leader.clone().expect("a leader");
    assert_eq!((l.controller.as_str(), l.lease), ("ctl-a", lease));
    let ttl = l.ttl_left_s.expect("the leader's TTL");
    assert!((1..=60).contains(&ttl), "{l:?}");
    let token = c
        .etcdctl(&eps, &["get", "/dft/ib0/leader", "-w", "json"])
        .expect("get");
    assert!(
        token.contains(&format!("\"create_revision\":{}", l.fencing_token)),
        "the fencing token is the leader key's create revision: {token} vs {l:?}"
    );
    let ctl = st.controller.expect("the controller's status");
    assert_eq!((ctl.generation, ctl.applied_revision), (7, rev2));
    assert!(ctl.by_leader);
    f.close_session(s1).expect("closes");
}

/// Item 5: a host whose lease is revoked (lost) has its observed entries
/// reported orphaned; its GUIDs stay allocated to it and a later allocation
/// on another host never gets them; a revoke on a live host is refused, on
/// the lost host it writes the revoke keys (all or one), and a GUID with no
/// observed entry is refused.
#[test]
fn a_lost_hosts_memberships_are_orphaned_and_revoked_only_on_request() {
    let _one = serial();
    let c = cluster();
    let f = fleet(&c);
    f.configure_guid_range(range(64)).expect("range");
    f.claim_pkey(&tenant("red"), PKey(0x0010)).expect("pkey");
    let (h1, h2) = (name("h1"), name("h2"));
    let s1 = f.register_host(&h1).expect("registers");
    let s2 = f.register_host(&h2).expect("registers");
    let mine = f.allocate_guids(&h1, 4).expect("allocates");
    let want = DesiredRecord::new(tenant("red"), vec![PKey(0x8010)]).expect("desired");
    // Three of h1's four GUIDs reach the SM; the fourth never did.
    for g in &mine[..3] {
        let rev = f.set_desired(&s1, *g, &want).expect("desired");
        observe(&f, &h1, *g, &[PKey(0x8010)], rev);
    }
    let st = f.status().expect("status");
    assert_eq!((st.counts.in_sync, st.counts.orphaned), (3, 0), "{st:?}");

    // The host is lost: its lease goes (revoked here; expiry does the same).
    f.close_session(s1).expect("lease revoked");
    let st = f.status().expect("status");
    let lost = st
        .hosts
        .iter()
        .find(|h| h.host == h1)
        .expect("the lost host is listed");
    assert!(!lost.live && lost.lease.is_none(), "{lost:?}");
    assert_eq!(lost.memberships.len(), 3, "{lost:?}");
    assert!(
        lost.memberships
            .iter()
            .all(|m| m.state == MembershipState::Orphaned && m.desired.is_none()),
        "{lost:?}"
    );
    assert_eq!((st.counts.orphaned, st.counts.hosts_lost), (3, 1));
    assert_eq!(st.counts.hosts_live, 1);

    // Its GUIDs stay allocated to it; another host's allocation never gets them.
    for g in &mine {
        let r = f.guid(*g).expect("reads").expect("in the pool");
        assert_eq!((r.state, &r.host), (GuidState::Allocated, &h1));
    }
    let theirs: BTreeSet<Guid> = f
        .allocate_guids(&h2, 60)
        .expect("the rest of the pool")
        .into_iter()
        .collect();
    assert!(theirs.is_disjoint(&mine.iter().copied().collect()));
    assert!(f.allocate_guids(&h2, 1).is_err(), "the pool is used up");

    // A live host: refused, saying why.
    let e = f
        .request_revoke(&h2, RevokeTarget::All, "uid 0")
        .expect_err("h2 is alive");
    assert!(matches!(e, RevokeError::HostAlive { .. }), "{e}");
    assert!(e.is_refusal() && e.to_string().contains("Hint:"), "{e}");
    // A GUID the controller observed nothing of: refused.
    let e = f
        .request_revoke(&h1, RevokeTarget::Guid(mine[3]), "uid 0")
        .expect_err("never observed");
    assert!(matches!(e, RevokeError::NotObserved { .. }), "{e}");
    // One, then all: the keys are written, the first one not twice.
    let one = f
        .request_revoke(&h1, RevokeTarget::Guid(mine[0]), "uid 0")
        .expect("revoke one");
    assert_eq!(one.requested, vec![mine[0]]);
    let key = format!("/dft/ib0/revoke/h1/{:016x}", mine[0].0);
    let got = c.etcdctl(&c.endpoints(), &["get", &key]).expect("get");
    assert!(got.contains(r#"{"by":"uid 0"}"#), "{got}");
    let all = f
        .request_revoke(&h1, RevokeTarget::All, "uid 1000")
        .expect("revoke all");
    assert_eq!(all.already_requested, vec![mine[0]]);
    assert_eq!(all.requested, mine[1..3].to_vec());
    let st = f.status().expect("status");
    assert_eq!(st.counts.revokes, 3);
    let lost = st.hosts.iter().find(|h| h.host == h1).expect("listed");
    assert!(lost.memberships.iter().all(|m| m.revoke_requested));
    // Still orphaned (the controller removes them; until then they are held),
    // and still allocated to h1 in the pool.
    assert_eq!(st.counts.orphaned, 3);
    let pool = f.guid_pool().expect("pool");
    let h1_pool = pool.hosts.iter().find(|h| h.host == h1).expect("h1");
    assert_eq!((h1_pool.allocated, h1_pool.retired), (4, 0));
    f.close_session(s2).expect("closes");
}

/// `guid_pool` agrees with what three concurrent allocators got (and what
/// they released), and the global index check finds a missing entry.
#[test]
fn the_guid_pool_counts_agree_with_three_concurrent_allocators() {
    let _one = serial();
    let c = cluster();
    fleet(&c)
        .configure_guid_range(range(10_000))
        .expect("range");
    let got: Vec<Vec<Guid>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let c = &c;
                s.spawn(move || {
                    let f = fleet(c);
                    let host = name(&format!("h{i}"));
                    let mut mine = Vec::new();
                    for round in 0..10 {
                        mine.extend(
                            f.allocate_guids(&host, if round % 2 == 0 { 30 } else { 1 })
                                .expect("allocates"),
                        );
                    }
                    // Each releases as many as its index.
                    for g in mine.iter().take(i) {
                        f.release_guid(&host, *g).expect("released");
                    }
                    mine
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let f = fleet(&c);
    let p = f.guid_pool().expect("pool");
    let all: BTreeSet<Guid> = got.iter().flatten().copied().collect();
    assert_eq!(all.len(), 3 * 155, "no duplicates");
    assert_eq!(p.allocated + p.retired, 3 * 155, "{p:?}");
    assert_eq!(p.retired, 3, "{p:?}");
    for (i, h) in p.hosts.iter().enumerate() {
        assert_eq!(h.host, name(&format!("h{i}")));
        assert_eq!(
            (h.allocated, h.retired),
            (155 - i as u64, i as u64),
            "{h:?}"
        );
    }
    let r = p.range.expect("range");
    assert_eq!(r.size, 10_000);
    assert_eq!(p.outside_range, 0);
    assert!(p.index.consistent, "{:?}", p.index);
    assert_eq!(p.index.checked, 3 * 155);
    let next = p.next.expect("cursor");
    assert_eq!(p.never_offered, Some(FIRST + 10_000 - next.0));
    assert!(
        all.iter().all(|g| *g < next),
        "every GUID issued is before the cursor"
    );

    // Damage the index behind devfence's back: the report names the GUID.
    let victim = *all.iter().next().expect("one");
    c.etcdctl(
        &c.endpoints(),
        &["del", &format!("/dft/_global/guid/{:016x}", victim.0)],
    )
    .expect("del");
    let p = f.guid_pool().expect("pool");
    assert!(!p.index.consistent);
    assert_eq!(
        (p.index.problems, p.index.missing.clone()),
        (1, vec![victim])
    );
}
