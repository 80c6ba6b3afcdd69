//! The fleet routes of the host agent end to end (issue 13 item 6): a real
//! `devfence serve` on a simulated host whose `[fleet]` points at a real
//! 3-member etcd cluster on loopback, driven over its Unix socket; every
//! answer is checked against the agent's OpenAPI document. Also: the CLI
//! through the agent, the fleet gauges, and fail closed when etcd is gone.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use devfence_testsupport::{devfence, generate, scratch, stderr, text};
use serde_json::{Value, json};

#[path = "support/fleet.rs"]
mod support;

use support::{fleet_section, revoke_records, seed, write_config};

const DEADLINE: Duration = Duration::from_secs(60);

struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(root: &Path, config: &Path, socket: &Path) -> Agent {
    // Its log goes to a file: a pipe nobody reads would fill up and stop
    // the agent mid-request.
    let log = std::fs::File::create(root.join("agent.log")).unwrap();
    let mut child = devfence()
        .arg("--root")
        .arg(root)
        .arg("--config")
        .arg(config)
        .args(["serve", "--socket"])
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    devfence_testsupport::wait_serving(&mut child, socket, DEADLINE);
    Agent {
        child,
        socket: socket.to_path_buf(),
    }
}

/// Every answer is what the OpenAPI document says it is.
fn conforms(method: &str, path: &str, status: u16, v: &Value) {
    use devfence_agent::openapi;
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(openapi::document);
    let route = devfence_agent::api::route_of(method, path);
    let schema =
        openapi::answer_schema(doc, method, route, status).unwrap_or_else(|e| panic!("{e}: {v}"));
    if let Err(e) = openapi::validate(doc, &schema, v) {
        panic!("{method} {path} answered {status} off its documented schema: {e}\n{v}");
    }
}

fn request(a: &Agent, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let b = body.map(|b| b.to_string().into_bytes());
    let (s, v) = devfence_testsupport::request(&a.socket, method, path, b.as_deref());
    conforms(method, path, s, &v);
    (s, v)
}

fn via_agent(root: &Path, config: &Path, args: &[&str]) -> Output {
    devfence()
        .arg("--root")
        .arg(root)
        .arg("--config")
        .arg(config)
        .arg("--via-agent")
        .args(args)
        .output()
        .unwrap()
}

/// The metric's value in the exposition, if present.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn the_fleet_routes_answer_as_documented_and_the_gauges_follow() {
    let mut s = seed();
    let tmp = scratch("devfence-agent-fleet-");
    let root = tmp.path().join("lab");
    generate("lab", &root, &[]);
    let config = write_config(tmp.path(), &fleet_section(&s.cluster.endpoints(), 2000));
    // The socket under the host root: the CLI finds the agent there.
    let socket = root.join("run/devfence/devfence.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let a = start(&root, &config, &socket);

    // The gauges come from the agent's own re-verification (at start and
    // each interval), before any fleet route is asked.
    let until = Instant::now() + DEADLINE;
    let m = loop {
        let (_, m) = request(&a, "GET", "/metrics", None);
        let m = m.as_str().unwrap().to_owned();
        if metric(&m, "devfence_fleet_store_up") == Some(1.0) {
            break m;
        }
        assert!(
            Instant::now() < until,
            "the fleet gauges were not refreshed: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        metric(&m, "devfence_fleet_orphaned_memberships"),
        Some(1.0),
        "{m}"
    );

    let (st, v) = request(&a, "GET", "/v1/fleet/status", None);
    assert_eq!(st, 200, "{v}");
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
    let (st, p) = request(&a, "GET", "/v1/fleet/guid-pool", None);
    assert_eq!(st, 200, "{p}");
    assert_eq!(p["allocated"], 3, "{p}");

    // The gauges: counts only, no GUID or host as a label value.
    let (_, m) = request(&a, "GET", "/metrics", None);
    let m = m.as_str().unwrap().to_owned();
    assert_eq!(
        metric(&m, "devfence_fleet_orphaned_memberships"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "devfence_fleet_pending_memberships"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "devfence_fleet_hosts{state=\"live\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "devfence_fleet_hosts{state=\"lost\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "devfence_fleet_store_up"), Some(1.0), "{m}");
    for l in m.lines().filter(|l| l.starts_with("devfence_fleet")) {
        assert!(
            !l.contains("h1") && !l.contains("h2") && !l.contains("c903"),
            "a name or GUID as a label: {l}"
        );
    }

    // Bad input: 400 with a hint, naming what is wrong.
    for (b, want) in [
        (json!({"host": "no/such", "all": true}), "not a valid name"),
        (json!({"host": "h2", "guid": "0xZZ"}), "GUID"),
        (json!({"host": "h2"}), "Neither"),
        (
            json!({"host": "h2", "all": true, "pkey": 1}),
            "unknown field",
        ),
    ] {
        let (st, e) = request(&a, "POST", "/v1/fleet/revoke", Some(&b));
        assert_eq!(
            (st, e["code"].as_str()),
            (400, Some("invalid_input")),
            "{b}: {e}"
        );
        assert!(e["message"].as_str().unwrap().contains(want), "{b}: {e}");
        assert!(e["hint"].is_string(), "{b}: {e}");
    }
    // A live host: refused (409), a rule's refusal.
    let (st, e) = request(
        &a,
        "POST",
        "/v1/fleet/revoke",
        Some(&json!({"host": "h1", "all": true})),
    );
    assert_eq!((st, e["code"].as_str()), (409, Some("refused")), "{e}");
    assert_eq!(e["refusal"], true);
    // The CLI through the agent: the same refusal, exit 1.
    let o = via_agent(
        &root,
        &config,
        &["fleet", "revoke", "--host", "h1", "--all"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(stderr(&o).contains("is alive"), "{}", text(&o));
    // The lost host: the key is written, by the agent's peer.
    let (st, r) = request(
        &a,
        "POST",
        "/v1/fleet/revoke",
        Some(&json!({"host": "h2", "guid": s.h2.to_string()})),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["requested"][0], s.h2.to_string());
    assert!(r["by"].as_str().unwrap().ends_with("via agent"), "{r}");
    // Both decisions are in the agent host's audit chain, each naming the
    // peer that asked (the 400s never reached etcd and are not).
    let (st, recs) = request(&a, "GET", "/v1/audit", None);
    assert_eq!(st, 200, "{recs}");
    let mine = revoke_records(&recs);
    let kinds: Vec<(&str, &str)> = mine
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap(),
                r["detail"]["host"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("refusal", "h1"), ("refusal", "h1"), ("fleet", "h2")],
        "{mine:#?}"
    );
    let done = mine[2];
    assert_eq!(done["detail"]["target"], s.h2.to_string(), "{done}");
    assert_eq!(done["detail"]["actor"]["via"], "agent", "{done}");
    assert!(done["detail"]["actor"]["uid"].is_u64(), "{done}");
    // The CLI through the agent reads the same status.
    let o = via_agent(&root, &config, &["fleet", "status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["schema"].as_u64(), v["counts"]["revokes"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );

    // etcd gone: 503 fleet_unavailable naming the endpoints, within the
    // deadline; the store gauge says so.
    for i in 0..3 {
        s.cluster.kill(i).unwrap();
    }
    let t0 = Instant::now();
    let (st, e) = request(&a, "GET", "/v1/fleet/status", None);
    assert_eq!(
        (st, e["code"].as_str()),
        (503, Some("fleet_unavailable")),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains(&s.cluster.endpoint(0)),
        "{e}"
    );
    assert!(t0.elapsed() < DEADLINE);
    let (_, m) = request(&a, "GET", "/metrics", None);
    assert_eq!(
        metric(m.as_str().unwrap(), "devfence_fleet_store_up"),
        Some(0.0)
    );
    drop(s.live);
}
