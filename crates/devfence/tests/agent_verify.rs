//! Continuous verification end to end (issue 12 item 4, the drift scenario
//! of "How to show it"): a real `devfence serve` on a simulated `lab` host
//! with `[agent] verify_interval = 1`, driven over its Unix socket by a real
//! HTTP client. Two IB VFs are made Ready (through the agent) and Active
//! (through the libvirt hook); then, behind devfence's back, the Ready VF's
//! port loses its tenant's partition at the simulated SM (its own state file)
//! and the Active VF's group node is chowned away from its tenant's launcher.
//! The agent must find both by itself: findings, metrics, the Ready VF
//! quarantined, the Active VF reported but left Active, the audit records.
//! Waiting is bounded polling with deadlines; nothing asserts a duration.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use devfence_fabric::{PersistentSimSm, SimConfig, SubnetManager};
use devfence_model::Guid;
use devfence_testsupport::{add_tenants, devfence, dv, generate, text};
use serde_json::{Value, json};

const VF_READY: &str = "0000:3b:00.1";
const VF_ACTIVE: &str = "0000:3b:00.2";
const DEADLINE: Duration = Duration::from_secs(60);

struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(root: &Path, socket: &Path) -> Agent {
        let child = devfence()
            .arg("--root")
            .arg(root)
            .args(["serve", "--socket"])
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start devfence serve");
        let mut a = Agent {
            child,
            socket: socket.to_path_buf(),
        };
        devfence_testsupport::wait_serving(&mut a.child, socket, DEADLINE);
        a
    }

    fn get(&self, path: &str) -> (u16, Value) {
        request(&self.socket, "GET", path, None)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        request(
            &self.socket,
            "POST",
            path,
            Some(body.to_string().as_bytes()),
        )
    }

    fn assign(&self, device: &str, tenant: &str) {
        let (s, v) = self.post(
            "/v1/operations",
            &json!({ "kind": "assign", "device": device, "tenant": tenant }),
        );
        assert_eq!(s, 202, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let until = Instant::now() + DEADLINE;
        loop {
            let (_, v) = self.get(&format!("/v1/operations/{id}"));
            if v["state"] != "running" {
                assert_eq!(v["state"], "succeeded", "{v}");
                return;
            }
            assert!(Instant::now() < until, "{id} still running: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `GET /v1/findings` until `pred` holds for a re-verification
    /// that began after `after_ms`.
    fn findings_until(&self, after_ms: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let until = Instant::now() + DEADLINE;
        loop {
            let (s, v) = self.get("/v1/findings");
            assert_eq!(s, 200, "{v}");
            let fresh = v["last"]["started_at_ms"].as_u64().unwrap_or(0) > after_ms;
            if fresh && pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < until,
                "{what}: not within the deadline: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request over the agent's socket (devfence-testsupport).
fn request(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
    devfence_testsupport::request(socket, method, path, body)
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn sim_sm(root: &Path) -> PersistentSimSm {
    PersistentSimSm::open(
        &root.join("var/lib/devfence/sim-sm.json"),
        SimConfig::default(),
    )
    .unwrap()
}

/// Takes `guid` out of every partition at the simulated SM behind devfence's
/// back (its own state file), and waits (bounded) until its port shows it.
fn strip_at_the_sm(root: &Path, guid: Guid, pkey_base: u16) {
    let sm = sim_sm(root);
    sm.with(|s| {
        s.stage_remove_all(guid).unwrap();
        s.apply().unwrap();
        s.settle();
    })
    .unwrap();
    let until = Instant::now() + DEADLINE;
    loop {
        let t = sm
            .with(|s| s.programmed().get(&guid).cloned())
            .unwrap()
            .unwrap_or_default();
        if t.iter().all(|k| k.base() != pkey_base) {
            return;
        }
        assert!(Instant::now() < until, "{guid} kept its P_Key: {t:?}");
        sm.with(|s| s.settle()).unwrap();
    }
}

/// The VF's group node in the simulated tree (`/dev/vfio/<group>`).
fn group_node(root: &Path, bdf: &str) -> PathBuf {
    let link = std::fs::read_link(root.join(format!("sys/bus/pci/devices/{bdf}/iommu_group")))
        .or_else(|_| {
            let dev = std::fs::read_link(root.join(format!("sys/bus/pci/devices/{bdf}")))?;
            let dir = root.join("sys/bus/pci/devices").join(dev);
            std::fs::read_link(dir.join("iommu_group"))
        })
        .unwrap();
    let group = link.file_name().unwrap().to_string_lossy().into_owned();
    root.join("dev/vfio").join(group)
}

/// A domain of `tenant` holding `bdf` (what libvirt hands the qemu hook).
fn domain(name: &str, tenant: &str, bdf: &str) -> String {
    let (bus, rest) = bdf[5..].split_once(':').unwrap();
    let (slot, func) = rest.split_once('.').unwrap();
    format!(
        "<domain type='kvm'><name>{name}</name><uuid>5b8f2c1e-9d4a-4e7b-8c3f-2a1d0e9b7c6f</uuid>\
         <metadata><fence:tenant xmlns:fence=\"https://devfence.dev/xmlns/libvirt/1\" id=\"{tenant}\"/></metadata>\
         <devices><hostdev mode='subsystem' type='pci' managed='yes'><source>\
         <address domain='0x0000' bus='0x{bus}' slot='0x{slot}' function='0x{func}'/>\
         </source></hostdev></devices></domain>"
    )
}

fn hook(root: &Path, vm: &str, op: &str, sub: &str, xml: &str) -> std::process::Output {
    let mut c = devfence()
        .arg("--root")
        .arg(root)
        .args(["hook", "qemu", vm, op, sub, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A hook that decides without the XML may exit before reading it (libvirt
    // ignores the closed pipe too).
    match c.stdin.take().unwrap().write_all(xml.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.unwrap(),
    }
    c.wait_with_output().unwrap()
}

fn finding<'a>(v: &'a Value, device: &str) -> Option<&'a Value> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["device"] == device)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
        .parse()
        .unwrap()
}

fn state_of(root: &Path, device: &str) -> String {
    let st = devfence_testsupport::json(&dv(root, &["status", "--json"]));
    let d = st["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == device)
        .unwrap_or_else(|| panic!("{device} not in {st}"))
        .clone();
    d["state"]["state"].as_str().unwrap().to_owned()
}

/// issue 12 item 4: drift behind devfence's back is found by the agent on its
/// own — a finding, an audit record and a metric; the drifted Ready device
/// is quarantined, the drifted Active one reported and left to its VM; a
/// device that verifies again clears its finding.
#[test]
fn the_agent_finds_drift_quarantines_ready_and_reports_active() {
    let tmp = devfence_testsupport::scratch("devfence-agent-verify-");
    let root = tmp.path().join("lab");
    generate("lab", &root, &[]);
    add_tenants(&root, 2);
    std::fs::write(
        root.join("etc/devfence/devfence.toml"),
        "[agent]\nverify_interval = 1\n",
    )
    .unwrap();
    let a = Agent::start(&root, &tmp.path().join("agent.sock"));

    a.assign(VF_READY, "acme");
    a.assign(VF_ACTIVE, "globex");
    let xml = domain("web1", "globex", VF_ACTIVE);
    let o = hook(&root, "web1", "prepare", "begin", &xml);
    assert!(o.status.success(), "the hook admits web1: {}", text(&o));
    assert_eq!(state_of(&root, VF_ACTIVE), "active");

    // Both verify: no findings, a pass that saw both.
    let t0 = now_ms();
    let v = a.findings_until(t0, "a clean pass", |v| {
        v["last"]["verified"] == 2 && v["last"]["outcome"] == "verified"
    });
    assert_eq!(v["findings"], json!([]), "{v}");
    assert_eq!(v["uevents"]["source"], "none", "a simulated root: {v}");
    assert_eq!(v["interval_seconds"], 1.0, "{v}");

    // Behind devfence's back: the Ready VF's port leaves acme's partition at
    // the SM; the Active VF's group node is chowned to root.
    let acme_guid: Vec<Guid> = sim_sm(&root)
        .with(|s| s.configured())
        .unwrap()
        .iter()
        .filter(|(_, k, _)| k.base() == 0x0001)
        .map(|(g, _, _)| g)
        .collect();
    assert_eq!(acme_guid.len(), 1, "acme's one GUID at the SM");
    strip_at_the_sm(&root, acme_guid[0], 0x0001);
    let node = group_node(&root, VF_ACTIVE);
    let meta = std::fs::metadata(&node).unwrap();
    let owner = (
        std::os::unix::fs::MetadataExt::uid(&meta),
        std::os::unix::fs::MetadataExt::gid(&meta),
    );
    assert_eq!(
        owner,
        (108, 108),
        "globex's launcher owns {}",
        node.display()
    );
    std::os::unix::fs::chown(&node, Some(0), Some(0)).unwrap();

    let t1 = now_ms();
    let v = a.findings_until(t1, "both drifts found", |v| {
        finding(v, VF_READY).is_some() && finding(v, VF_ACTIVE).is_some()
    });
    let r = finding(&v, VF_READY).unwrap();
    assert_eq!(r["action"], "quarantined", "{r}");
    assert_eq!(r["tenant"], "acme", "{r}");
    assert_eq!(r["now"], "quarantined", "{r}");
    assert!(r["state"].as_str().unwrap().starts_with("Ready"), "{r}");
    assert!(
        r["what"].as_str().unwrap().contains("0x8001"),
        "names the P_Key it lacks: {r}"
    );
    let x = finding(&v, VF_ACTIVE).unwrap();
    assert_eq!(x["action"], "reported", "{x}");
    assert_eq!(x["now"], "active", "{x}");
    assert!(x["first_seen_ms"].as_u64().unwrap() >= t1, "{x}");
    assert!(x["last_generation"].as_u64().unwrap() >= x["first_generation"].as_u64().unwrap());

    // Orchestrators hear of it on the event stream: one drift event each,
    // and the Ready VF's new state.
    let (status, ev) = devfence_testsupport::events(&a.socket, "?since=0", DEADLINE, |ev| {
        ev.iter().filter(|e| e["type"] == "drift").count() >= 2
    });
    assert_eq!(status, 200);
    let drift = |d: &str| {
        ev.iter()
            .find(|e| e["type"] == "drift" && e["device"] == d)
            .unwrap_or_else(|| panic!("no drift event for {d}: {ev:?}"))
            .clone()
    };
    assert_eq!(drift(VF_READY)["action"], "quarantined");
    assert_eq!(drift(VF_ACTIVE)["action"], "reported");
    assert!(
        ev.iter().any(|e| e["type"] == "device_state"
            && e["device"] == VF_READY
            && e["state"] == "quarantined"),
        "{ev:?}"
    );

    // The ledger: the Ready VF quarantined, the Active VF still with its VM.
    assert_eq!(state_of(&root, VF_READY), "quarantined");
    assert_eq!(state_of(&root, VF_ACTIVE), "active");

    // The audit trail: the engine's records of the drift, by the agent.
    for (dev, want) in [(VF_READY, "drifted"), (VF_ACTIVE, "reported")] {
        let (s, recs) = a.get(&format!("/v1/audit?device={}", dev.replace(':', "%3A")));
        assert_eq!(s, 200, "{recs}");
        let rec = recs
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["detail"]["gate"] == "reverify"
                    && (r["detail"]["result"] == want || r["detail"]["action"] == want)
            })
            .unwrap_or_else(|| panic!("no reverify record for {dev}: {recs}"));
        assert_eq!(rec["detail"]["actor"]["via"], "agent-verify", "{rec}");
    }

    // The metrics: the findings now, the drifts and the quarantine counted,
    // and no device or tenant as a label value.
    let (s, m) = a.get("/metrics");
    assert_eq!(s, 200);
    let m = m.as_str().unwrap();
    assert_eq!(metric(m, "devfence_drift_findings"), 2.0, "{m}");
    assert_eq!(metric(m, "devfence_drifts_detected_total"), 2.0, "{m}");
    assert_eq!(metric(m, "devfence_quarantines_total"), 1.0, "{m}");
    assert!(
        metric(m, "devfence_reverifications_total{outcome=\"drifted\"}") >= 1.0,
        "{m}"
    );
    assert!(metric(m, "devfence_reverification_duration_seconds_count") >= 2.0);
    assert!(metric(m, "devfence_reverification_last_timestamp_seconds") > 0.0);
    assert!(metric(m, "devfence_sm_sweep_generation") >= 1.0, "{m}");
    assert_eq!(
        metric(m, "devfence_sm_last_sweep{outcome=\"clean\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(m, "devfence_sm_last_sweep{outcome=\"errors\"}"),
        0.0,
        "{m}"
    );
    for secret in [VF_READY, VF_ACTIVE, "acme", "globex"] {
        assert!(!m.contains(secret), "{secret} in the metrics:\n{m}");
    }

    // The Active VF's node is given back: it verifies again and its finding
    // clears; the quarantined VF's finding stays while it is Quarantined.
    std::os::unix::fs::chown(&node, Some(108), Some(108)).unwrap();
    let t2 = now_ms();
    let v = a.findings_until(t2, "the Active VF's finding cleared", |v| {
        finding(v, VF_ACTIVE).is_none()
    });
    assert_eq!(v["last"]["verified"], 1, "{v}");
    assert!(finding(&v, VF_READY).is_some(), "{v}");
    let (_, m) = a.get("/metrics");
    let m = m.as_str().unwrap();
    assert_eq!(metric(m, "devfence_drift_findings"), 1.0, "{m}");
    assert_eq!(metric(m, "devfence_drifts_detected_total"), 2.0, "{m}");
}
