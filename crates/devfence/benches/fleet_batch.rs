//! Issue 13's fleet benchmark: **3 hosts × 32 IB VFs handed over at once** on
//! a real OpenSM, through the fleet — a real 3-member etcd cluster on
//! loopback, one fabric controller (`devfence serve --role fabric-controller`)
//! owning the OpenSM backend, and three host agents (`devfence serve` with
//! `[fabric] backend = "fleet"`) on simulated `cx6-ib --vfs 32` hosts
//! (`--host-id 0..2`, so their GUIDs differ) whose VFs are ibsim nodes of the
//! one fabric.
//!
//! Setup (not measured): every VF of every host assigned to acme. Then
//! `DEVFENCE_BENCH_ROUNDS` rounds (default 3) of all 96 handovers posted at
//! once (one client thread per operation), alternating acme → globex → acme.
//! Per round: the applies the controller's OpenSM backend records (the serial
//! of its last apply, beside the partitions file), the `SUBNET UP` lines in
//! OpenSM's log (every sweep, including those the VFs' GUID changes trigger),
//! the wall time; per handover: its latency as its agent saw it
//! (`finished_at_ms - started_at_ms` of its operation), every gate passed and
//! the SM gate's evidence from the fleet backend (the controller's observed
//! entry at the host's desired revision **and** the host's own SA read).
//!
//! Then, in the same run, with the agents and the controller stopped, the SM's
//! own times on this fabric: SIGHUP → `SUBNET UP` with no change (20 runs),
//! and for the same change by hand (the 96 GUIDs the VFs have now moved
//! between acme's and globex's partitions in the partitions file; 5 runs).
//! The ratio printed is p50 per handover to that second figure. Last, what
//! playing the HCAs costs: one ibsim node GUID rotation (20 runs), which the
//! follower does once per handover, one at a time.
//!
//! Knobs: `DEVFENCE_BENCH_VFS` (per host, default 32), `DEVFENCE_BENCH_ROUNDS`,
//! `DEVFENCE_BENCH_WINDOW_MS` (the agents' `batch_window` and the
//! controller's `batch_window_ms`, default 200), `DEVFENCE_BENCH_DUMP=FILE`
//! (every operation of the last round as JSON lines: steps, gates, times).
//!
//! `cargo bench -p devfence --bench fleet_batch` (needs opensm, ibsim-utils,
//! etcd-server: `testbed/fabric/setup.sh`, `testbed/etcd/setup.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/fleet_fabric.rs"]
mod fleet_fabric;
#[path = "../tests/support/agent_fabric.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use devfence_etcd_harness::{EtcdCluster, Options};
use devfence_fabric::opensm::partitions::render_block;
use devfence_fabric::{MembershipMap, PartitionKey};
use devfence_fabric_harness::{Fabric, FabricSpec};
use devfence_fleet::value::GuidRange;
use devfence_fleet::{Fleet, FleetSettings};
use devfence_model::{Guid, Membership};
use fleet_fabric::{Ctl, check_op, controller_config, fleet_section, leader};
use serde_json::{Value, json};
use support::{Agent, Followed, applies_recorded, cli, env_num, follow_hosts, ok, pct, sriov_port};

const PF: &str = "0000:3b:00.0";
const HOSTS: u8 = 3;
const POOL: (u64, u64) = (0x0002_c903_00e0_0000, 0x0002_c903_00e0_ffff);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One simulated host: its tree, devfence.toml, socket, VFs and the GUIDs its
/// VFs' ibsim nodes start with.
struct Host {
    id: u8,
    root: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    vfs: Vec<String>,
    factory: Vec<Guid>,
}

impl Host {
    fn new(tmp: &Path, id: u8, n: usize) -> Host {
        let dir = tmp.join(format!("h{id}"));
        let root = dir.join("host");
        let st = Command::new(env!("CARGO_BIN_EXE_devfence"))
            .args(["sim", "generate", "--profile", "cx6-ib", "--vfs"])
            .arg(n.max(5).to_string())
            .arg("--host-id")
            .arg(id.to_string())
            .arg("--out")
            .arg(&root)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let vfs = (0..n)
            .map(|i| {
                let l = root.join(format!("sys/bus/pci/devices/{PF}/virtfn{i}"));
                std::fs::read_link(l)
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        // The host's factory port GUID, or a stand-in (distinct per host) where
        // the tree shows none.
        let factory = (0..n)
            .map(|i| {
                sriov_port(&root, PF, i)
                    .filter(|g| g.0 != 0)
                    .unwrap_or(Guid(
                        0x0002_c903_00d0_0001 + (u64::from(id) << 12) + 2 * i as u64,
                    ))
            })
            .collect();
        Host {
            id,
            config: dir.join("devfence.toml"),
            socket: dir.join("agent.sock"),
            root,
            vfs,
            factory,
        }
    }

    fn node(&self, i: usize) -> String {
        format!("h{}vf{i}", self.id)
    }

    /// The port GUID each VF has now.
    fn ports(&self) -> Vec<Guid> {
        (0..self.vfs.len())
            .map(|i| sriov_port(&self.root, PF, i).expect("a port GUID"))
            .collect()
    }
}

/// Posts `kind` for every VF of every host at once (one thread per
/// operation); the operations as they ended, per host.
fn round(agents: &[Agent], hosts: &[Host], kind: &str, tenant: &str) -> Vec<Vec<Value>> {
    let ids: Vec<Vec<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = agents
            .iter()
            .zip(hosts)
            .map(|(a, h)| {
                s.spawn(move || {
                    let bodies: Vec<Value> = h
                        .vfs
                        .iter()
                        .map(|d| json!({ "kind": kind, "device": d, "tenant": tenant }))
                        .collect();
                    a.post_all(&bodies)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    agents
        .iter()
        .zip(hosts)
        .zip(&ids)
        .map(|((a, h), ids)| {
            h.vfs
                .iter()
                .zip(ids)
                .map(|(d, id)| {
                    let op = a.wait_op(id);
                    check_op(&op, d, tenant);
                    op
                })
                .collect()
        })
        .collect()
}

/// SIGHUP → the next `SUBNET UP` line (the harness's wait polls every 100 µs),
/// after writing `text` (when given) as the partitions file.
fn hup(f: &Fabric, text: Option<&str>) -> f64 {
    if let Some(t) = text {
        std::fs::write(f.opensm_config().partitions_file, t).unwrap();
    }
    let n = f.subnet_up_count();
    let t0 = Instant::now();
    f.hup().unwrap();
    f.wait_subnet_up(n, Duration::from_secs(30)).unwrap();
    ms(t0.elapsed())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_num("DEVFENCE_BENCH_VFS", 32);
    let rounds = env_num("DEVFENCE_BENCH_ROUNDS", 3);
    let window = env_num("DEVFENCE_BENCH_WINDOW_MS", 200) as u64;
    let tmp = tempfile::Builder::new()
        .prefix("devfence-bench-fleet-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let hosts: Vec<Host> = (0..HOSTS).map(|id| Host::new(tmp.path(), id, n)).collect();
    let all: BTreeSet<Guid> = hosts.iter().flat_map(|h| h.factory.clone()).collect();
    assert_eq!(all.len(), n * hosts.len(), "the hosts' GUIDs overlap");

    let mut spec = FabricSpec::vfs(0, Guid(1));
    // Light sweeps every 1 s. A port's new GUID is found by the heavy sweep
    // the watcher asks for after rotating it (`follow_hosts`).
    spec.sweep_interval = 1;
    spec.ports = hosts
        .iter()
        .flat_map(|h| (0..n).map(move |i| (h.node(i), h.factory[i])))
        .collect();
    let t0 = Instant::now();
    let f = Fabric::start(&spec).unwrap();
    println!(
        "fabric: ibsim + OpenSM, {} HCA nodes, up in {:.0} ms",
        spec.ports.len() + 1,
        ms(t0.elapsed())
    );
    let t0 = Instant::now();
    let c = EtcdCluster::start(&Options::default()).expect("etcd cluster starts");
    println!(
        "etcd: 3 members on loopback, up in {:.0} ms",
        ms(t0.elapsed())
    );
    let fleet = Fleet::connect(FleetSettings::plaintext(c.endpoints(), "dfe", "ib0").unwrap())
        .expect("connects");
    fleet
        .configure_guid_range(GuidRange {
            first: Guid(POOL.0),
            last: Guid(POOL.1),
        })
        .expect("the fabric's GUID range");
    let ccfg = tmp.path().join("controller.toml");
    std::fs::write(&ccfg, controller_config(&f, &c, window)).unwrap();
    let ctl = Ctl::start(&f, &ccfg, tmp.path().join("ctl.log"));
    let until = Instant::now() + Duration::from_secs(60);
    while leader(&fleet).is_none() {
        assert!(Instant::now() < until, "no controller leads: {}", ctl.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    for h in &hosts {
        std::fs::write(
            &h.config,
            format!(
                "[fabric]\nbackend = \"fleet\"\n\n[agent]\nbatch_window = {window}\ngate_timeout = 120\n\n{}host = \"h{}\"\n",
                fleet_section(&c, window),
                h.id
            ),
        )
        .unwrap();
        for (t, uid, pkey) in [
            ("acme", "107:107", "0x8001"),
            ("globex", "108:108", "0x8002"),
        ] {
            ok(&cli(
                &f,
                &h.root,
                &h.config,
                &["tenant", "add", t, "--launcher", uid, "--partition", pkey],
            ));
        }
    }

    struct Round {
        applies: u64,
        ups: u64,
        wall_ms: f64,
    }
    let stop = AtomicBool::new(false);
    let (mut lat, rs) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut followed: Vec<Followed<'_>> = hosts
                .iter()
                .map(|h| Followed {
                    root: &h.root,
                    pf: PF,
                    nodes: (0..n).map(|i| (h.node(i), h.factory[i])).collect(),
                })
                .collect();
            follow_hosts(&f, &mut followed, &stop);
        });
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let agents: Vec<Agent> = hosts
                .iter()
                .map(|h| Agent::start(&f, &h.root, &h.config, &h.socket))
                .collect();
            let t0 = Instant::now();
            round(&agents, &hosts, "assign", "acme");
            println!(
                "setup: {} VFs assigned to acme in {:.0} ms (not measured below)",
                n * hosts.len(),
                ms(t0.elapsed())
            );
            let mut lat = Vec::new();
            let mut rs = Vec::new();
            let mut to = "globex";
            for _ in 0..rounds {
                let (a0, u0) = (applies_recorded(&f), f.subnet_up_count());
                let w0 = Instant::now();
                let ops = round(&agents, &hosts, "handover", to);
                let wall_ms = ms(w0.elapsed());
                if let Ok(p) = std::env::var("DEVFENCE_BENCH_DUMP") {
                    // Every operation of the round, a JSON line each (steps,
                    // gates and their times), for a look at where time goes.
                    let lines: Vec<String> = ops.iter().flatten().map(Value::to_string).collect();
                    std::fs::write(p, lines.join("\n")).unwrap();
                }
                for op in ops.iter().flatten() {
                    lat.push(
                        (op["finished_at_ms"].as_u64().unwrap()
                            - op["started_at_ms"].as_u64().unwrap()) as f64,
                    );
                }
                rs.push(Round {
                    applies: applies_recorded(&f) - a0,
                    ups: f.subnet_up_count() - u0,
                    wall_ms,
                });
                to = if to == "acme" { "globex" } else { "acme" };
            }
            // No GUID issued twice across the hosts.
            let mut seen = BTreeSet::new();
            for h in &hosts {
                for g in h.ports() {
                    assert!(seen.insert(g), "GUID {g} is on two VFs");
                }
            }
            (lat, rs)
        }));
        stop.store(true, Ordering::Relaxed);
        match out {
            Ok(v) => v,
            Err(p) => {
                eprintln!("controller log:\n{}", ctl.log());
                std::panic::resume_unwind(p)
            }
        }
    });
    drop(ctl);

    // The SM's own times on this fabric, in the same run.
    let mut idle: Vec<f64> = (0..20).map(|_| hup(&f, None)).collect();
    let ports: Vec<Guid> = hosts.iter().flat_map(Host::ports).collect();
    let file = |k: u16| {
        let mut m = MembershipMap::new();
        for g in &ports {
            m.insert(*g, PartitionKey::new(k).unwrap(), Membership::Full)
                .unwrap();
        }
        render_block(&m)
    };
    let (in_a, in_b) = (file(0x8001), file(0x8002));
    hup(&f, Some(&in_a));
    let mut by_hand: Vec<f64> = (1..=5)
        .map(|r| hup(&f, Some(if r % 2 == 1 { &in_b } else { &in_a })))
        .collect();

    // What playing the HCAs costs: one ibsim node's GUID rotation (the
    // follower does one per handover, one at a time), 20 runs.
    let node = hosts[0].node(0);
    let mut rot: Vec<f64> = (0..20u64)
        .map(|r| {
            let t0 = Instant::now();
            f.rotate(&node, Guid(0x0002_c903_00f0_0001 + r)).unwrap();
            ms(t0.elapsed())
        })
        .collect();
    let rot_med = pct(&mut rot, 0.5);

    let total = n * hosts.len();
    let applies: Vec<u64> = rs.iter().map(|r| r.applies).collect();
    let ups: Vec<u64> = rs.iter().map(|r| r.ups).collect();
    let walls: Vec<String> = rs.iter().map(|r| format!("{:.0}", r.wall_ms)).collect();
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    let idle_med = pct(&mut idle, 0.5);
    let hand_med = pct(&mut by_hand, 0.5);
    println!(
        "{HOSTS} hosts x {n} IB VFs = {total} handovers at once (batch_window {window} ms), {rounds} rounds: applies per round {applies:?}, SUBNET UP per round {ups:?}, wall ms per round {walls:?}; per handover p50 {p50:.0} ms, p99 {p99:.0} ms ({} handovers, every gate passed)",
        lat.len()
    );
    println!(
        "OpenSM's own: SIGHUP -> SUBNET UP, no change, 20 runs: median {idle_med:.1} ms; the same change by hand ({total} GUIDs moved acme <-> globex), 5 runs: median {hand_med:.1} ms"
    );
    println!(
        "playing the HCAs: one ibsim node GUID rotation, 20 runs: median {rot_med:.1} ms; x {total} one at a time = {:.0} ms of every round",
        rot_med * total as f64
    );
    println!(
        "ratio: p50 per handover / the SM's own time for the change = {:.0}; wall per round / it = {:.0}",
        p50 / hand_med,
        rs.iter().map(|r| r.wall_ms).sum::<f64>() / rs.len() as f64 / hand_med
    );
    println!(
        "load: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
