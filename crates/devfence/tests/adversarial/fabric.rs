//! Adversarial tests: fabric. The simulated SM of a simulated host is changed
//! out of band (by another tool, an operator or a hostile fabric node, played
//! here through the SM's own state file), and `check --fabric` must see it; the
//! UFM configuration is written the way a careless operator would.

#[allow(unused_imports)]
use super::support::*;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devfence_fabric::{PartitionKey, PersistentSimSm, SimConfig, SubnetManager};
use devfence_model::{Guid, Membership, PKey};

/// The simulated SM's state file under a simulated host's root.
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

/// A `lab` host with tenants acme (0x8001) and globex (0x8002), acme's VF
/// 0000:3b:00.1 and globex's VF 0000:3b:00.2 assigned; returns their GUIDs.
fn two_tenants() -> (tempfile::TempDir, PathBuf, Guid, Guid) {
    let (tmp, root) = host("lab");
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
    let configured = sim_sm(&root).with(|s| s.configured()).unwrap();
    let only = |base: u16| -> Guid {
        let p = PartitionKey::new(base).unwrap();
        let g: Vec<Guid> = configured
            .iter()
            .filter(|(_, k, _)| *k == p)
            .map(|(g, _, _)| g)
            .collect();
        assert_eq!(g.len(), 1, "{configured:?}");
        g[0]
    };
    let (acme, globex) = (only(1), only(2));
    (tmp, root, acme, globex)
}

/// Adds `guid` to `pkey` at the simulated SM behind devfence's back, and waits
/// (bounded) until the port's table shows it.
fn out_of_band_add(root: &Path, guid: Guid, pkey: u16, m: Membership) {
    let sm = sim_sm(root);
    sm.with(|s| {
        s.stage_add(guid, PartitionKey::new(pkey).unwrap(), m)
            .unwrap();
        s.apply().unwrap();
        s.settle();
    })
    .unwrap();
    let want = PKey(pkey).with_membership(m);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = sm
            .with(|s| s.programmed().get(&guid).cloned())
            .unwrap()
            .unwrap_or_default();
        if t.contains(&want) {
            return;
        }
        assert!(Instant::now() < deadline, "{guid} never took {want}: {t:?}");
        sm.with(|s| s.settle()).unwrap();
    }
}

/// `check --fabric --json`: exit code and (rule, subject, message, hint) of the
/// fabric findings.
/// One fabric finding: rule, subject, message, hint.
type FabFinding = (String, String, String, String);

fn fabric_check(root: &Path) -> (Option<i32>, Vec<FabFinding>) {
    let o = on(root, &["check", "--fabric", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(&o), stderr(&o)));
    let f = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["rule"].as_str().unwrap().starts_with("FAB-"))
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or_default().to_string();
            (s("rule"), s("subject"), s("message"), s("hint"))
        })
        .collect();
    (o.status.code(), f)
}

/// issue 18 item 7 / issue 17 item 7 — rule: a tenant port in a partition no
/// tenant owns is an error finding (FAB-FOREIGN-PARTITION), and a partition with
/// ports of two tenants is one (FAB-SHARED-PARTITION).
#[test]
fn a_foreign_partition_holding_both_tenants_ports_is_found() {
    let (_tmp, root, acme, globex) = two_tenants();
    let (code, f) = fabric_check(&root);
    assert_eq!(code, Some(0), "a clean fabric: {f:?}");
    assert!(f.is_empty(), "{f:?}");
    // Someone puts both tenants' VFs in 0x9003 at the SM.
    out_of_band_add(&root, acme, 0x1003, Membership::Full);
    out_of_band_add(&root, globex, 0x1003, Membership::Full);
    let (code, f) = fabric_check(&root);
    assert_eq!(code, Some(1), "{f:?}");
    for g in [acme, globex] {
        assert!(
            f.iter().any(|x| x.0 == "FAB-FOREIGN-PARTITION"
                && x.1 == g.to_string()
                && x.2.contains("0x1003")),
            "{g}: {f:?}"
        );
    }
    let shared: Vec<_> = f
        .iter()
        .filter(|x| x.0 == "FAB-SHARED-PARTITION" && x.1 == "0x1003")
        .collect();
    assert_eq!(shared.len(), 1, "{f:?}");
    assert!(
        shared[0].2.contains("acme") && shared[0].2.contains("globex"),
        "{shared:?}"
    );
}

/// issue 18 item 1 (its fabric part) — rule: a P_Key belongs to one tenant; a
/// tenant's P_Key on another tenant's port, in any membership, is a shared
/// partition (FAB-SHARED-PARTITION), not only an unknown member.
#[test]
fn one_pkey_on_ports_of_two_tenants_is_a_shared_partition() {
    let (_tmp, root, _acme, globex) = two_tenants();
    out_of_band_add(&root, globex, 0x0001, Membership::Limited);
    let (code, f) = fabric_check(&root);
    assert_eq!(code, Some(1), "{f:?}");
    assert!(
        f.iter()
            .any(|x| x.0 == "FAB-SHARED-PARTITION" && x.1 == "0x0001"),
        "{f:?}"
    );
}

/// issue 17 item 5 (check part) — rule: a failed sweep is an error finding even
/// when no tenant port exists (check --fabric said 0 errors).
#[test]
fn a_failed_sweep_is_an_error_without_any_tenant_port() {
    let (_tmp, root) = host("lab");
    let (code, f) = fabric_check(&root);
    assert_eq!(code, Some(0), "{f:?}");
    // The next sweep fails, and the SM stays there (as OpenSM does after a
    // PARSE ERROR until it is signalled again): it sweeps once, then is frozen.
    let sm = sim_sm(&root);
    sm.with(|s| {
        // The SM's first sweep (requested when the first check created it) ends
        // first: armed while it runs, the fault would fail that sweep instead,
        // and the retry it asks for would carry the change, cleanly.
        s.settle();
        // A long lag: the retry the failed sweep asks for is due a lag after it,
        // so it cannot run before the freeze however slowly this thread runs.
        let lag = Duration::from_secs(30);
        s.set_lag(lag);
        s.fail_next_sweep();
        s.stage_add(
            Guid(0x0002_c903_00ff_0001),
            PartitionKey::new(0x0042).unwrap(),
            Membership::Full,
        )
        .unwrap();
        let before = s.generation();
        s.apply().unwrap();
        s.advance(lag + SimConfig::default().sweep_time);
        assert!(s.generation() > before, "the failing sweep ran");
        s.freeze();
    })
    .unwrap();
    let (code, f) = fabric_check(&root);
    assert_eq!(code, Some(1), "{f:?}");
    assert!(f.iter().any(|x| x.0 == "FAB-SWEEP-FAILED"), "{f:?}");
}

/// issue 11 note — rule: every rule `check --fabric` reports is listed by
/// `devfence rules`.
#[test]
fn rules_lists_the_fabric_rules() {
    let o = run(&["rules", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&ok(&o).into_bytes()).unwrap();
    let ids: BTreeSet<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    for want in [
        "FAB-DEFAULT-FULL",
        "FAB-UNKNOWN-MEMBER",
        "FAB-FOREIGN-PARTITION",
        "FAB-SHARED-PARTITION",
        "FAB-SWEEP-FAILED",
        "FAB-GUID-MISSING",
        "FAB-UNVERIFIED",
        "GRP-VIABLE",
    ] {
        assert!(ids.contains(want), "{want} missing from {ids:?}");
    }
}

fn with_config(root: &Path, text: &str) {
    let p = root.join("etc/devfence/devfence.toml");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// issue 18 item 10 — rule: secrets stay secret. A UFM URL with
/// `user:password@` is refused when the configuration loads, and no output shows
/// the password (plain or percent-encoded).
#[test]
fn a_password_in_the_ufm_url_is_refused_and_never_printed() {
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
    for url in [
        "https://admin:Hunter2-secret@ufm.example",
        "https://admin:Hunter2%2Dsecret@ufm.example:8443/ufm",
    ] {
        with_config(
            &root,
            &format!("[fabric]\nbackend = \"ufm\"\n[fabric.ufm]\nurl = \"{url}\"\n"),
        );
        for args in [&["status"][..], &["check", "--fabric"]] {
            let o = on(&root, args);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stdout(&o));
            let all = format!("{}{}", stdout(&o), stderr(&o));
            assert!(!all.contains("Hunter2"), "{args:?}: {all}");
            assert!(
                all.contains("carries credentials") && all.contains("Hint:"),
                "{all}"
            );
        }
    }
}

/// issue 18 items 6 and 12 — rule: nothing unbounded. `ca_file = "/dev/zero"`
/// (devfence grew to 23 GB) and a FIFO are refused at once; `retries` and
/// `retry_backoff_ms` beyond their bounds are refused with the key named.
#[test]
fn unbounded_ufm_settings_are_refused_at_once() {
    let (tmp, root) = host("lab");
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
    let fifo = tmp.path().join("ca.fifo");
    mkfifo(&fifo);
    for (extra, want) in [
        (
            "ca_file = \"/dev/zero\"\n".to_string(),
            "not a regular file",
        ),
        (
            format!("ca_file = \"{}\"\n", fifo.display()),
            "not a regular file",
        ),
        (
            "retries = 100000\n".to_string(),
            "retries = 100000 is out of range",
        ),
        (
            "retry_backoff_ms = 86400000\n".to_string(),
            "retry_backoff_ms = 86400000 is out of range",
        ),
    ] {
        with_config(
            &root,
            &format!(
                "[fabric]\nbackend = \"ufm\"\n[fabric.ufm]\nurl = \"https://127.0.0.1:9\"\ncredentials = {{ source = \"env\" }}\n{extra}"
            ),
        );
        let o = devfence()
            .env("DEVFENCE_UFM_USER", "u")
            .env("DEVFENCE_UFM_PASSWORD", "p")
            .args(["--root", root.to_str().unwrap(), "status"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{extra}: {}", stdout(&o));
        let err = stderr(&o);
        assert!(
            err.contains(want) && err.contains("Hint:"),
            "{extra}: {err}"
        );
    }
}

fn mkfifo(p: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A `lab` host `id` under `tmp` with tenant acme, a host key, and the igb VF
/// assigned to acme.
fn state_host(tmp: &Path, id: &str) -> PathBuf {
    let root = tmp.join(id);
    ok(&run(&[
        "sim",
        "generate",
        "--profile",
        "lab",
        "--out",
        root.to_str().unwrap(),
    ]));
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
    ok(&on(&root, &["keys", "init", "--host-id", id]));
    ok(&on(&root, &["assign", STATE_VF, "--tenant", "acme"]));
    root
}

const STATE_VF: &str = "0000:5e:10.0";
const STATE_VM: &str = "4b1c5c52-9d4e-4f43-a0d6-1e0f2f3a4b5c";

/// issue 18 item 10 — rule: admitted device state is single-use and the
/// tenant's: when the device is scrubbed (released, handed over), the payloads
/// admitted for it are voided, so the next tenant's VM cannot be given them.
#[test]
fn admitted_state_is_voided_when_its_device_is_scrubbed() {
    let t = scratch();
    let h1 = state_host(t.path(), "host1");
    let h2 = state_host(t.path(), "host2");
    let key = t.path().join("host1.pub");
    std::fs::write(&key, ok(&on(&h1, &["keys", "show"]))).unwrap();
    ok(&on(
        &h2,
        &["keys", "trust", "add", "--from", key.to_str().unwrap()],
    ));
    let input = t.path().join("state.bin");
    std::fs::write(&input, b"device state of acme's VM").unwrap();
    let sealed: serde_json::Value = serde_json::from_str(&ok(&on(
        &h1,
        &[
            "state",
            "seal",
            "--device",
            STATE_VF,
            "--vm",
            STATE_VM,
            "--in",
            input.to_str().unwrap(),
            "--json",
        ],
    )))
    .unwrap();
    let envelope = sealed["path"].as_str().unwrap().to_string();
    let admitted: serde_json::Value = serde_json::from_str(&ok(&on(
        &h2,
        &[
            "state", "admit", &envelope, "--device", STATE_VF, "--vm", STATE_VM, "--json",
        ],
    )))
    .unwrap();
    let payload = PathBuf::from(admitted["payload"].as_str().unwrap());
    assert!(payload.is_file(), "admitted: {admitted}");
    let dir = payload.parent().unwrap().to_path_buf();

    ok(&on(&h2, &["release", STATE_VF]));
    assert!(
        !payload.exists(),
        "the scrubbed device's admitted state is still deliverable at {}",
        payload.display()
    );
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // The void is journalled with the scrub.
    let audit = ok(&on(&h2, &["audit", "show", "--json"]));
    assert!(audit.contains("state-void"), "{audit}");
}
