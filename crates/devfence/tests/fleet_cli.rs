//! `devfence fleet status | guid-pool | revoke` end to end (issue 13 items 5
//! and 6): the real binary, a devfence.toml whose `[fleet]` points at a real
//! 3-member etcd cluster on loopback, human and `--json` output, and the exit
//! status table (0 answered, 1 refused by a rule, 2 bad input, no `[fleet]`,
//! etcd unreachable).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Output;

use devfence_testsupport::{devfence, scratch, stderr, stdout, text};

#[path = "support/fleet.rs"]
mod support;

use support::{fleet_section, revoke_records, seed, write_config};

fn cli(root: &Path, config: &Path, args: &[&str]) -> Output {
    devfence()
        .arg("--root")
        .arg(root)
        .arg("--config")
        .arg(config)
        .arg("--direct")
        .args(args)
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert_eq!(o.status.code(), Some(0), "{}", text(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

#[test]
fn fleet_status_guid_pool_and_revoke_through_the_cli() {
    let s = seed();
    let tmp = scratch("devfence-fleet-cli-");
    let root = tmp.path();
    let config = write_config(root, &fleet_section(&s.cluster.endpoints(), 3000));

    // status --json: one document, the seeded states.
    let v = json(&cli(root, &config, &["fleet", "status", "--json"]));
    assert_eq!(v["schema"], 1, "{v}");
    assert_eq!(v["fabric"], "ib0");
    assert!(v["leader"].is_null(), "no controller leads: {v}");
    let c = &v["counts"];
    assert_eq!(
        (
            c["in_sync"].as_u64(),
            c["pending"].as_u64(),
            c["orphaned"].as_u64()
        ),
        (Some(1), Some(1), Some(1)),
        "{v}"
    );
    assert_eq!(
        (c["hosts_live"].as_u64(), c["hosts_lost"].as_u64()),
        (Some(1), Some(1))
    );
    let hosts = v["hosts"].as_array().unwrap();
    let h1 = hosts.iter().find(|h| h["host"] == "h1").unwrap();
    assert_eq!(h1["live"], true);
    assert!(h1["ttl_left_s"].as_i64().unwrap() > 0, "{h1}");
    let h2 = hosts.iter().find(|h| h["host"] == "h2").unwrap();
    assert_eq!(h2["live"], false);
    assert_eq!(h2["memberships"][0]["state"], "orphaned");
    assert_eq!(h2["memberships"][0]["guid"], s.h2.to_string());

    // The human form says the same, and what to do about the orphan.
    let o = cli(root, &config, &["fleet", "status"]);
    let t = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(t.contains("Leader: none"), "{t}");
    assert!(
        t.contains(&s.h2.to_string()) && t.contains("orphaned"),
        "{t}"
    );
    assert!(t.contains("1 in sync, 1 pending"), "{t}");
    assert!(t.contains("devfence fleet revoke --host HOST --all"), "{t}");

    // guid-pool --json.
    let p = json(&cli(root, &config, &["fleet", "guid-pool", "--json"]));
    assert_eq!(p["schema"], 1);
    assert_eq!(
        (p["allocated"].as_u64(), p["retired"].as_u64()),
        (Some(3), Some(0)),
        "{p}"
    );
    assert_eq!(p["index"]["consistent"], true, "{p}");
    assert_eq!(p["range"]["size"], 1000);
    let t = stdout(&cli(root, &config, &["fleet", "guid-pool"]));
    assert!(t.contains("Allocated: 3; retired: 0"), "{t}");

    // revoke: a live host is a refusal (1), with a hint.
    let o = cli(root, &config, &["fleet", "revoke", "--host", "h1", "--all"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains("is alive") && stderr(&o).contains("Hint:"),
        "{}",
        text(&o)
    );
    // A GUID of the lost host it never had at the SM: refused (1).
    let o = cli(
        root,
        &config,
        &[
            "fleet",
            "revoke",
            "--host",
            "h2",
            "--guid",
            &s.h1[1].to_string(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // Bad input: 2 with a hint, before anything is asked of etcd.
    for args in [
        vec!["fleet", "revoke", "--host", "no/such", "--all"],
        vec!["fleet", "revoke", "--host", "h2", "--guid", "0xZZ"],
        vec!["fleet", "revoke", "--host", "h2", "--guid", "0x0"],
    ] {
        let o = cli(root, &config, &args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(stderr(&o).contains("Hint:"), "{args:?}: {}", text(&o));
    }
    // The lost host: the revoke key is written.
    let r = json(&cli(
        root,
        &config,
        &["fleet", "revoke", "--host", "h2", "--all", "--json"],
    ));
    assert_eq!(r["requested"][0], s.h2.to_string(), "{r}");
    assert!(r["by"].as_str().unwrap().ends_with("via cli"), "{r}");
    let key = format!("/devfence/ib0/revoke/h2/{:016x}", s.h2.0);
    let got = s
        .cluster
        .etcdctl(&s.cluster.endpoints(), &["get", &key])
        .unwrap();
    assert!(got.contains("\"by\""), "{got}");
    let v = json(&cli(root, &config, &["fleet", "status", "--json"]));
    assert_eq!(v["counts"]["revokes"], 1, "{v}");
    assert_eq!(v["revokes"][0]["host"], "h2");
    // Still allocated to h2 in the pool: never reissued.
    let p = json(&cli(root, &config, &["fleet", "guid-pool", "--json"]));
    let h2p = p["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "h2")
        .unwrap()
        .clone();
    assert_eq!(h2p["allocated"], 1, "{p}");

    // Every revoke this host asked for is in its audit chain with its actor:
    // the two refusals (bad input never reached etcd, and is not), then the
    // request written, with the GUIDs and the etcd revision; the chain holds.
    let recs = json(&cli(root, &config, &["audit", "show", "--json"]));
    let recs = revoke_records(&recs["items"]);
    let seen: Vec<(&str, &str, &str)> = recs
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap(),
                r["detail"]["host"].as_str().unwrap(),
                r["detail"]["outcome"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("refusal", "h1", "refused"),
            ("refusal", "h2", "refused"),
            ("fleet", "h2", "-")
        ],
        "{recs:#?}"
    );
    assert!(
        recs[0]["detail"]["error"]
            .as_str()
            .unwrap()
            .contains("is alive"),
        "{recs:#?}"
    );
    let done = recs[2];
    assert_eq!(done["detail"]["requested"][0], s.h2.to_string(), "{done}");
    assert_eq!(done["detail"]["target"], "all");
    assert!(done["detail"]["revision"].as_i64().unwrap() > 0, "{done}");
    assert_eq!(done["detail"]["actor"]["via"], "cli", "{done}");
    let o = cli(root, &config, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// No `[fleet]`: a configuration error naming the section (2); etcd not
/// answering: fail closed within the deadline, naming the endpoints (2).
#[test]
fn without_a_fleet_store_the_cli_fails_closed_naming_why() {
    let tmp = scratch("devfence-fleet-cli-");
    let root = tmp.path();
    let config = write_config(root, "[fabric]\nbackend = \"none\"\n");
    for args in [
        vec!["fleet", "status"],
        vec!["fleet", "guid-pool", "--json"],
        vec!["fleet", "revoke", "--host", "h2", "--all"],
    ] {
        let o = cli(root, &config, &args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        let e = stderr(&o);
        assert!(
            e.contains("no [fleet] section") && e.contains("Hint:"),
            "{args:?}: {e}"
        );
    }
    // Nothing listens on these loopback ports.
    let free: Vec<String> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        })
        .collect();
    let config = write_config(root, &fleet_section(&free, 500));
    let o = cli(root, &config, &["fleet", "status", "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&free[0]) && e.contains(&free[1]),
        "the endpoints: {e}"
    );
    assert!(e.contains("did not answer") && e.contains("Hint:"), "{e}");
    assert!(stdout(&o).is_empty(), "no partial answer: {}", text(&o));
}
