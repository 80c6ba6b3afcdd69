//! Batching on one host (issue 12 item 5), end to end on a real OpenSM: a real
//! `devfence serve` on the simulated `lab` host, its devfence.toml selecting the
//! OpenSM backend of an ibsim fabric whose nodes are the lab's four IB VFs.
//! Four handovers posted at once all end Ready, each with its own gates passed
//! (the SM's questions read back from OpenSM's SA, its own port's P_Key
//! table), and OpenSM was asked for fewer applies than there were handovers —
//! counted from what the OpenSM backend records next to the partitions file
//! (the serial of its last apply), not from devfence's own view.
//!
//! The lab's VFs are ibsim nodes `vf0`–`vf3`. What a real HCA does when a VF's
//! GUID changes (the port leaves and comes back with the new GUID), the test
//! does for the simulated host: a thread watches the PF's `sriov/<N>/port`
//! attributes under the host root and rotates the node's GUID on ibsim
//! (`Fabric::rotate`). Waiting is bounded polling with deadlines; nothing
//! asserts a duration.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/agent_fabric.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use devfence_fabric_harness::{Fabric, FabricSpec};
use devfence_model::Guid;
use serde_json::{Value, json};
use support::{Agent, applies_recorded, cli, follow_guids, gates, ok, request};

/// The lab's IB VFs (PF 0000:3b:00.0, VF indexes 0–3) and their factory GUIDs.
const VFS: [&str; 4] = [
    "0000:3b:00.1",
    "0000:3b:00.2",
    "0000:3b:00.3",
    "0000:3b:00.4",
];
const FACTORY: [u64; 4] = [
    0x0c42_a103_4000_0000,
    0x0c42_a103_4000_0001,
    0x0c42_a103_4000_0002,
    0x0c42_a103_4000_0003,
];
const PF: &str = "0000:3b:00.0";
/// Long enough that requests posted together land in one batch on a loaded
/// machine; the assertion is "fewer applies than handovers", not "one".
const WINDOW_MS: u64 = 1500;

fn spec() -> FabricSpec {
    let mut s = FabricSpec::vfs(0, Guid(1));
    // Light sweeps every 1 s (not 10). A port's new GUID is found by the heavy
    // sweep the watcher asks for after rotating it (`follow_hosts`).
    s.sweep_interval = 1;
    s.ports = FACTORY
        .iter()
        .enumerate()
        .map(|(i, g)| (format!("vf{i}"), Guid(*g)))
        .collect();
    s
}

/// The simulated lab host, its devfence.toml (OpenSM backend of `f`, the batch
/// window) and its tenants and GUID pool.
fn lab_host(f: &Fabric, tmp: &Path) -> (PathBuf, PathBuf) {
    let root = tmp.join("host");
    let st = Command::new(env!("CARGO_BIN_EXE_devfence"))
        .args(["sim", "generate", "--profile", "lab", "--out"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success());
    let o = f.opensm_config();
    let config = tmp.join("devfence.toml");
    std::fs::write(
        &config,
        format!(
            "[fabric]\nbackend = \"opensm\"\n\n[fabric.opensm]\npartitions_file = \"{}\"\nlog_file = \"{}\"\npid_file = \"{}\"\n\n[agent]\nbatch_window = {WINDOW_MS}\n# A loaded machine: the watcher that plays the HCA may take a while.\ngate_timeout = 60\n",
            o.partitions_file.display(),
            o.log_file.display(),
            o.pid_file.as_ref().unwrap().display()
        ),
    )
    .unwrap();
    for (t, uid, pkey) in [
        ("acme", "107:107", "0x8001"),
        ("globex", "108:108", "0x8002"),
    ] {
        ok(&cli(
            f,
            &root,
            &config,
            &["tenant", "add", t, "--launcher", uid, "--partition", pkey],
        ));
    }
    ok(&cli(
        f,
        &root,
        &config,
        &[
            "guid-pool",
            "--set",
            "0x0002c90300f00000..0x0002c90300f0ffff",
        ],
    ));
    (root, config)
}

/// Every gate of the operation's events, with whether it passed.
/// Posts `kind` for every VF to `tenant` at once; waits for all; checks each
/// ended Ready for `tenant` with its own gates passed and its own batch info.
fn batch_of(a: &Agent, kind: &str, tenant: &str) -> Vec<Value> {
    let bodies: Vec<Value> = VFS
        .iter()
        .map(|d| json!({ "kind": kind, "device": d, "tenant": tenant }))
        .collect();
    let ids = a.post_all(&bodies);
    let ops: Vec<Value> = ids.iter().map(|id| a.wait_op(id)).collect();
    for (d, op) in VFS.iter().zip(&ops) {
        assert_eq!(op["state"], "succeeded", "{d}: {op}");
        assert_eq!(op["device"], *d);
        assert_eq!(op["result"]["state"]["state"], "ready", "{d}: {op}");
        assert_eq!(op["result"]["state"]["tenant"], tenant, "{d}: {op}");
        // Its own gates, each passed: the SM's questions for its GUIDs, its
        // port's table, its driver, its group, its node.
        let g = gates(op);
        for want in [
            "sm-verified",
            "port-pkeys",
            "driver",
            "group-rules",
            "node-owner",
        ] {
            assert!(
                g.iter().any(|(n, p)| n == want && *p),
                "{d}: gate {want} did not pass: {g:?}"
            );
        }
        assert!(g.iter().all(|(_, p)| *p), "{d}: {g:?}");
        // The SM gate's evidence came from OpenSM.
        let ev = op["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event"] == "gate" && e["name"] == "sm-verified")
            .unwrap();
        assert_eq!(ev["evidence"]["backend"], "opensm", "{ev}");
        // Its batch.
        let b = &op["batch"];
        assert!(b["id"].as_str().unwrap().starts_with("batch-"), "{op}");
        assert_eq!(b["shared"], true, "{op}");
    }
    ops
}

#[test]
fn concurrent_ib_handovers_through_the_agent_share_applies_at_a_real_opensm() {
    let f = Fabric::start(&spec()).unwrap();
    let tmp = devfence_testsupport::scratch("devfence-agent-batch-");
    let (root, config) = lab_host(&f, tmp.path());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let factory = FACTORY.iter().map(|g| Guid(*g)).collect();
        s.spawn(|| follow_guids(&f, &root, PF, factory, &stop));
        let run = || {
            let a = Agent::start(&f, &root, &config, &tmp.path().join("agent.sock"));
            // The four VFs to acme, then all four to globex at once.
            batch_of(&a, "assign", "acme");
            let before = applies_recorded(&f);
            let ups = f.subnet_up_count();
            let ops = batch_of(&a, "handover", "globex");
            let applies = applies_recorded(&f) - before;
            let n = VFS.len() as u64;
            eprintln!(
                "{n} concurrent handovers: {applies} applies recorded by the OpenSM backend, {} SUBNET UP lines in OpenSM's log (GUID rotations sweep too)",
                f.subnet_up_count() - ups
            );
            assert!(applies >= 1, "the handovers changed nothing at OpenSM");
            assert!(
                applies < n,
                "{n} concurrent handovers took {applies} applies at OpenSM"
            );
            // The batches the operations report add up to the applies.
            let batches: std::collections::BTreeSet<&str> = ops
                .iter()
                .map(|o| o["batch"]["id"].as_str().unwrap())
                .collect();
            assert_eq!(batches.len() as u64, applies, "{ops:?}");
            // The metrics say it without a GUID or BDF.
            let (st, m) = request(&a.socket, "GET", "/metrics", None);
            assert_eq!(st, 200);
            let m = m.as_str().unwrap().to_owned();
            let sweeps: f64 = m
                .lines()
                .find_map(|l| l.strip_prefix("devfence_sm_sweeps_requested_total "))
                .unwrap_or_else(|| panic!("{m}"))
                .parse()
                .unwrap();
            assert!(sweeps >= 1.0 && sweeps < 2.0 * n as f64, "{m}");
            assert!(m.contains("devfence_batch_size_operations_count"), "{m}");
            for d in VFS {
                assert!(!m.contains(d), "a BDF in the metrics: {m}");
            }
            assert!(!m.contains("0x0c42"), "{m}");
            // Every device's GUID at OpenSM: `devfence verify` reads back
            // every Ready device (from the ledger, at the SA) and passes.
            let out = cli(&f, &root, &config, &["verify", "--json"]);
            ok(&out);
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
        stop.store(true, Ordering::Relaxed);
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    });
}
