//! Adversarial tests: re-verification (`devfence verify`). A device's state is
//! changed behind devfence's back after its gates passed — its port loses its
//! partition at the SM (played through the simulated SM's own state file) — and
//! `devfence verify` must find it, quarantine the Ready device, and say so.

#[allow(unused_imports)]
use super::support::*;

use std::path::Path;
use std::time::{Duration, Instant};

use devfence_fabric::{PersistentSimSm, SimConfig, SubnetManager};
use devfence_model::Guid;

fn sim_sm(root: &Path) -> PersistentSimSm {
    PersistentSimSm::open(
        &root.join("var/lib/devfence/sim-sm.json"),
        SimConfig::default(),
    )
    .unwrap()
}

fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}\n{}", stdout(o), stderr(o));
    stdout(o)
}

/// Takes `guid` out of every partition at the simulated SM behind devfence's
/// back, and waits (bounded) until the port's table shows it.
fn out_of_band_strip(root: &Path, guid: Guid) {
    let sm = sim_sm(root);
    sm.with(|s| {
        s.stage_remove_all(guid).unwrap();
        s.apply().unwrap();
        s.settle();
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = sm
            .with(|s| s.programmed().get(&guid).cloned())
            .unwrap()
            .unwrap_or_default();
        if t.iter().all(|k| k.base() != 0x0001) {
            return;
        }
        assert!(Instant::now() < deadline, "{guid} kept its P_Key: {t:?}");
        sm.with(|s| s.settle()).unwrap();
    }
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(o), stderr(o)))
}

/// issue 17 item 2 — rule: `devfence verify` re-verifies every Ready device
/// against what its gates established; a Ready IB VF whose port lost its
/// tenant's P_Key at the SM behind devfence's back is found (exit 1),
/// quarantined, and the finding is in the audit log; the other tenant's device
/// still verifies.
#[test]
fn verify_finds_and_quarantines_a_ready_vf_that_lost_its_pkey() {
    let (_tmp, root) = host("lab");
    for (t, uid, p) in [
        ("acme", "107:107", "0x8001"),
        ("globex", "108:108", "0x8002"),
    ] {
        ok(&on(
            &root,
            &["tenant", "add", t, "--launcher", uid, "--partition", p],
        ));
    }
    ok(&on(&root, &["assign", "0000:3b:00.1", "--tenant", "acme"]));
    ok(&on(
        &root,
        &["assign", "0000:3b:00.2", "--tenant", "globex"],
    ));
    let text = ok(&on(&root, &["verify"]));
    assert!(text.contains("2 of 2 device(s) verified"), "{text}");

    let configured = sim_sm(&root).with(|s| s.configured()).unwrap();
    let acme: Vec<Guid> = configured
        .iter()
        .filter(|(_, k, _)| k.base() == 0x0001)
        .map(|(g, _, _)| g)
        .collect();
    assert_eq!(acme.len(), 1, "{configured:?}");
    out_of_band_strip(&root, acme[0]);

    let o = on(&root, &["verify", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", stdout(&o), stderr(&o));
    let v = json(&o);
    assert_eq!(v["all_verified"], false);
    let of = |d: &str| {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["device"] == d)
            .unwrap()
            .clone()
    };
    let a = of("0000:3b:00.1");
    assert_eq!(a["result"], "drifted", "{a}");
    assert_eq!(a["quarantined"], true, "{a}");
    assert!(
        a["what"]
            .as_str()
            .unwrap()
            .contains("lacks the tenant's P_Keys 0x8001"),
        "{a}"
    );
    assert_eq!(of("0000:3b:00.2")["result"], "verified");

    let st = ok(&on(&root, &["status"]));
    assert!(
        st.contains("0000:3b:00.1 quarantined: changed since it was Ready"),
        "{st}"
    );
    let audit = ok(&on(&root, &["audit", "show", "--device", "0000:3b:00.1"]));
    assert!(audit.contains("reverify"), "{audit}");

    // Only the globex device is left to re-verify: all verified again.
    let text = ok(&on(&root, &["verify"]));
    assert!(text.contains("1 of 1 device(s) verified"), "{text}");
}

/// issue 17 item 2 — rule: `verify --device` names a Ready or Active device; a
/// Free device, one the ledger does not know or a malformed id is a usage error
/// (exit 2) with a hint, and nothing is changed.
#[test]
fn verify_refuses_devices_it_cannot_reverify() {
    let (_tmp, root) = host("lab");
    ok(&on(
        &root,
        &[
            "tenant",
            "add",
            "acme",
            "--launcher",
            "107:107",
            "--partition",
            "0x8001",
        ],
    ));
    ok(&on(&root, &["assign", "0000:5e:10.0", "--tenant", "acme"]));
    ok(&on(&root, &["release", "0000:5e:10.0"]));
    for (dev, needle) in [
        ("0000:5e:10.0", "is Free"),
        ("0000:5e:10.7", "not in the ledger"),
        ("bogus", "--device \"bogus\""),
    ] {
        let o = on(&root, &["verify", "--device", dev]);
        assert_eq!(o.status.code(), Some(2), "{dev}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(needle) && e.contains("Hint:"), "{dev}: {e}");
    }
    let text = ok(&on(&root, &["verify"]));
    assert!(text.contains("no Ready or Active device"), "{text}");
}
