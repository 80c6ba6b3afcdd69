//! Concurrent IB handovers through the agent on a real OpenSM (issue 12 item
//! 5): N (default 32) IB VFs of a simulated `cx6-ib` host (`--vfs N`, its first
//! PF's VFs), each an ibsim node of the fabric; a real `devfence serve` with
//! the OpenSM backend.
//!
//! - batched: all N handovers posted at once (`[agent] batch_window`, default
//!   20 ms), alternating acme → globex → acme, `DEVFENCE_BENCH_ROUNDS` rounds
//!   (default 3);
//! - one at a time: the same N handovers, each posted after the previous one
//!   ended, with batching off (`batch_window = 0`), the same rounds.
//!
//! Per round: the applies the OpenSM backend records (the serial of its last
//! apply, in its memo beside the partitions file) and the `SUBNET UP` lines in
//! OpenSM's log (every sweep, including those the VFs' GUID changes trigger on
//! the fabric); per handover: its latency, from the agent's accepting it to its
//! end (`finished_at_ms - started_at_ms` of its operation). The VFs' new GUIDs
//! reach the fabric through a watcher that plays the HCA (ibsim node GUID
//! rotation, one console command at a time): that cost is in every latency.
//!
//! `cargo bench -p devfence --bench agent_batch` (needs opensm, ibsim-utils).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/agent_fabric.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use devfence_fabric_harness::{Fabric, FabricSpec};
use devfence_model::Guid;
use serde_json::{Value, json};
use support::{Agent, applies_recorded, cli, env_num, follow_guids, ok, pct, request, sriov_port};

const PF: &str = "0000:3b:00.0";

/// The PF's first `n` VFs (from its `virtfn<i>` links).
fn vfs_of(root: &Path, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let l = root.join(format!("sys/bus/pci/devices/{PF}/virtfn{i}"));
            std::fs::read_link(l)
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn write_config(f: &Fabric, config: &Path, window_ms: u64) {
    let o = f.opensm_config();
    std::fs::write(
        config,
        format!(
            "[fabric]\nbackend = \"opensm\"\n\n[fabric.opensm]\npartitions_file = \"{}\"\nlog_file = \"{}\"\npid_file = \"{}\"\n\n[agent]\nbatch_window = {window_ms}\n",
            o.partitions_file.display(),
            o.log_file.display(),
            o.pid_file.as_ref().unwrap().display()
        ),
    )
    .unwrap();
}

fn latency_ms(op: &Value) -> f64 {
    (op["finished_at_ms"].as_u64().unwrap() - op["started_at_ms"].as_u64().unwrap()) as f64
}

fn check_ready(op: &Value, tenant: &str) {
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(op["result"]["state"]["tenant"], tenant, "{op}");
}

struct Round {
    applies: u64,
    ups: u64,
    wall_ms: f64,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_num("DEVFENCE_BENCH_VFS", 32);
    let rounds = env_num("DEVFENCE_BENCH_ROUNDS", 3);
    let window = env_num("DEVFENCE_BENCH_WINDOW_MS", 20) as u64;
    let tmp = tempfile::Builder::new()
        .prefix("devfence-bench-agent-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let root = tmp.path().join("host");
    let vfs_arg = n.max(5).to_string();
    let st = Command::new(env!("CARGO_BIN_EXE_devfence"))
        .args([
            "sim",
            "generate",
            "--profile",
            "cx6-ib",
            "--vfs",
            &vfs_arg,
            "--out",
        ])
        .arg(&root)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let vfs = vfs_of(&root, n);
    // One ibsim node per VF; its GUID on the fabric is the host's factory one
    // (or a stand-in where the host shows none).
    let factory: Vec<Guid> = (0..n)
        .map(|i| {
            sriov_port(&root, PF, i)
                .filter(|g| g.0 != 0)
                .unwrap_or(Guid(0x0002_c903_00e0_0001 + 2 * i as u64))
        })
        .collect();
    let mut spec = FabricSpec::vfs(0, Guid(1));
    // Light sweeps every 1 s (not 10). A port's new GUID is found by the heavy
    // sweep the watcher asks for after rotating it (`follow_hosts`).
    spec.sweep_interval = 1;
    spec.ports = factory
        .iter()
        .enumerate()
        .map(|(i, g)| (format!("vf{i}"), *g))
        .collect();
    let t0 = Instant::now();
    let f = Fabric::start(&spec).unwrap();
    println!(
        "fabric: ibsim + OpenSM, {} HCA nodes, up in {:.0} ms",
        n + 1,
        t0.elapsed().as_secs_f64() * 1000.0
    );
    let config = tmp.path().join("devfence.toml");
    write_config(&f, &config, window);
    for (t, uid, pkey) in [
        ("acme", "107:107", "0x8001"),
        ("globex", "108:108", "0x8002"),
    ] {
        ok(&cli(
            &f,
            &root,
            &config,
            &["tenant", "add", t, "--launcher", uid, "--partition", pkey],
        ));
    }
    ok(&cli(
        &f,
        &root,
        &config,
        &[
            "guid-pool",
            "--set",
            "0x0002c90300f00000..0x0002c90300f0ffff",
        ],
    ));
    let stop = AtomicBool::new(false);
    let socket = tmp.path().join("agent.sock");
    let (batched, single) = std::thread::scope(|s| {
        s.spawn(|| follow_guids(&f, &root, PF, factory.clone(), &stop));
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let a = Agent::start(&f, &root, &config, &socket);
            // Setup (not measured): every VF to acme, in one batch.
            let bodies: Vec<Value> = vfs
                .iter()
                .map(|d| json!({ "kind": "assign", "device": d, "tenant": "acme" }))
                .collect();
            for id in a.post_all(&bodies) {
                check_ready(&a.wait_op(&id), "acme");
            }
            let mut holder = "acme";
            let measure = |a: &Agent, concurrent: bool, holder: &mut &'static str| {
                let mut lat = Vec::new();
                let mut rs = Vec::new();
                for _ in 0..rounds {
                    let to = if *holder == "acme" { "globex" } else { "acme" };
                    let bodies: Vec<Value> = vfs
                        .iter()
                        .map(|d| json!({ "kind": "handover", "device": d, "tenant": to }))
                        .collect();
                    let (a0, u0) = (applies_recorded(&f), f.subnet_up_count());
                    let w0 = Instant::now();
                    let ops: Vec<Value> = if concurrent {
                        let ids = a.post_all(&bodies);
                        ids.iter().map(|id| a.wait_op(id)).collect()
                    } else {
                        bodies
                            .iter()
                            .map(|b| {
                                let id = &a.post_all(std::slice::from_ref(b))[0];
                                a.wait_op(id)
                            })
                            .collect()
                    };
                    let wall_ms = w0.elapsed().as_secs_f64() * 1000.0;
                    for op in &ops {
                        check_ready(op, to);
                        lat.push(latency_ms(op));
                    }
                    rs.push(Round {
                        applies: applies_recorded(&f) - a0,
                        ups: f.subnet_up_count() - u0,
                        wall_ms,
                    });
                    *holder = to;
                }
                (lat, rs)
            };
            let batched = measure(&a, true, &mut holder);
            let (_, m) = request(&a.socket, "GET", "/metrics", None);
            for l in m.as_str().unwrap_or_default().lines() {
                if l.starts_with("devfence_sm_sweeps_requested_total")
                    || l.starts_with("devfence_batch_size_operations_sum")
                    || l.starts_with("devfence_batch_size_operations_count")
                {
                    println!("agent metric: {l}");
                }
            }
            drop(a);
            // The same handovers one at a time, batching off.
            write_config(&f, &config, 0);
            let a = Agent::start(&f, &root, &config, &socket);
            let single = measure(&a, false, &mut holder);
            drop(a);
            (batched, single)
        }));
        stop.store(true, Ordering::Relaxed);
        match out {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    });
    for (name, (mut lat, rs)) in [
        (
            format!("{n} concurrent (batch_window {window} ms)"),
            batched,
        ),
        (format!("{n} one at a time (batch_window 0)"), single),
    ] {
        let applies: Vec<u64> = rs.iter().map(|r| r.applies).collect();
        let ups: Vec<u64> = rs.iter().map(|r| r.ups).collect();
        let walls: Vec<String> = rs.iter().map(|r| format!("{:.0}", r.wall_ms)).collect();
        let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        println!(
            "{name}: applies per round {applies:?}, SUBNET UP per round {ups:?}, wall ms per round {walls:?}; per handover p50 {p50:.0} ms, p99 {p99:.0} ms ({} handovers)",
            lat.len()
        );
    }
    println!(
        "load: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
