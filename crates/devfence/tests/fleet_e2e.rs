//! issue 13, end to end on real components: a real 3-member etcd cluster on
//! loopback, a real OpenSM on ibsim, **three host agents** (`devfence serve`
//! with `[fabric] backend = "fleet"`) on simulated `lab` hosts whose IB VFs are
//! nodes of that fabric (`sim generate --host-id N` gives each host its own
//! GUIDs), and **two fabric controllers** (`devfence serve --role
//! fabric-controller`).
//!
//! - Every host's VFs handed over concurrently: each operation passes every gate
//!   (the SM gate's evidence from the fleet backend, which needs the controller's
//!   observed entries **and** the SA's own read of the port), and the controller
//!   used fewer applies at OpenSM than there were handovers.
//! - etcd's raft leader SIGSTOPped while a round of handovers is in flight: the
//!   other two members elect a leader, every client (agents, controllers) moves
//!   to them, and every handover finishes; resumed, the old leader rejoins.
//! - The leading controller SIGKILLed while a round of handovers is in flight:
//!   the standby takes over (after the lease TTL) and every handover finishes.
//! - A host agent SIGKILLed mid-handover: restarted, it recovers the operation
//!   before it serves, and the device ends Ready with its gates re-verified.
//! - After all of it: no GUID issued twice (each VF's port GUID on its host is
//!   allocated in the fleet's pool to that host, and all are distinct), and no
//!   device is Ready on a membership the SA does not show.
//!
//! What a real HCA does when a VF's GUID changes (the port leaves and comes back
//! with it), a watcher thread per host does for the simulated hosts: it rotates
//! the ibsim node's GUID when the PF's `sriov/<N>/port` changes. Waiting is
//! bounded polling with deadlines; nothing asserts a duration.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/fleet_fabric.rs"]
mod fleet_fabric;
#[path = "support/agent_fabric.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use devfence_etcd_harness::{EtcdCluster, Options};
use devfence_fabric_harness::{Fabric, FabricSpec, in_fabric};
use devfence_fleet::value::{GuidRange, GuidState};
use devfence_fleet::{Fleet, FleetSettings};
use devfence_model::Guid;
use fleet_fabric::{Ctl, check_op, controller_config, fleet_section, leader};
use serde_json::{Value, json};
use support::{Agent, Followed, applies_recorded, cli, follow_hosts, ok, request, sriov_port};

/// The lab's IB VFs (PF 0000:3b:00.0, VF indexes 0–3).
const VFS: [&str; 4] = [
    "0000:3b:00.1",
    "0000:3b:00.2",
    "0000:3b:00.3",
    "0000:3b:00.4",
];
const PF: &str = "0000:3b:00.0";
const HOSTS: u8 = 3;
const POOL: (u64, u64) = (0x0002_c903_00e0_0000, 0x0002_c903_00e0_ffff);
const DEADLINE: Duration = Duration::from_secs(240);

/// Host `h`'s VF `i` factory port GUID: the lab's, byte 4 = 0x03 ^ h.
fn factory(h: u8, i: usize) -> Guid {
    Guid(0x0c42_a100_4000_0000 | (u64::from(0x03 ^ h) << 32) | i as u64)
}

fn node(h: u8, i: usize) -> String {
    format!("h{h}vf{i}")
}

fn spec() -> FabricSpec {
    let mut s = FabricSpec::vfs(0, Guid(1));
    // Light sweeps every 1 s. A port's new GUID is found by the heavy sweep
    // the watcher asks for after rotating it (`follow_hosts`).
    s.sweep_interval = 1;
    s.ports = (0..HOSTS)
        .flat_map(|h| (0..VFS.len()).map(move |i| (node(h, i), factory(h, i))))
        .collect();
    s
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One simulated host of the fleet: its tree, its devfence.toml, its agent.
struct Host {
    id: u8,
    root: PathBuf,
    config: PathBuf,
    socket: PathBuf,
}

impl Host {
    fn new(c: &EtcdCluster, tmp: &Path, id: u8) -> Host {
        let dir = tmp.join(format!("h{id}"));
        let root = dir.join("host");
        let st = Command::new(env!("CARGO_BIN_EXE_devfence"))
            .args(["sim", "generate", "--profile", "lab", "--host-id"])
            .arg(id.to_string())
            .arg("--out")
            .arg(&root)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let config = dir.join("devfence.toml");
        std::fs::write(
            &config,
            format!(
                "[fabric]\nbackend = \"fleet\"\n\n[agent]\nbatch_window = 300\ngate_timeout = 60\n\n{}host = \"h{id}\"\n",
                fleet_section(c, 200)
            ),
        )
        .unwrap();
        Host {
            id,
            root,
            config,
            socket: dir.join("agent.sock"),
        }
    }

    fn start(&self, f: &Fabric) -> Agent {
        Agent::start(f, &self.root, &self.config, &self.socket)
    }

    /// The port GUID each VF has now on this host.
    fn ports(&self) -> Vec<Guid> {
        (0..VFS.len())
            .map(|i| sriov_port(&self.root, PF, i).expect("a port GUID"))
            .collect()
    }
}

/// Posts `kind` for every VF of every host at once (one thread per host); the
/// operation ids per host.
fn post_everywhere(agents: &[Agent], kind: &str, tenant: &str) -> Vec<Vec<String>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = agents
            .iter()
            .map(|a| {
                s.spawn(move || {
                    let bodies: Vec<Value> = VFS
                        .iter()
                        .map(|d| json!({ "kind": kind, "device": d, "tenant": tenant }))
                        .collect();
                    a.post_all(&bodies)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn wait_everywhere(agents: &[Agent], ids: &[Vec<String>], tenant: &str) {
    for (a, ids) in agents.iter().zip(ids) {
        for (d, id) in VFS.iter().zip(ids) {
            check_op(&a.wait_op(id), d, tenant);
        }
    }
}

/// No GUID issued twice: every VF's port GUID on its host is allocated in the
/// fleet's pool to that host, and the twelve are distinct.
fn guids_unique(fleet: &Fleet, hosts: &[Host]) {
    let pool: BTreeMap<Guid, (GuidState, String)> = fleet
        .guids()
        .expect("lists the pool")
        .into_iter()
        .map(|(g, r)| (g, (r.state, r.host.to_string())))
        .collect();
    let mut seen = BTreeSet::new();
    for h in hosts {
        for g in h.ports() {
            assert!(seen.insert(g), "GUID {g} is on two VFs");
            let (state, holder) = pool
                .get(&g)
                .unwrap_or_else(|| panic!("{g} not in the pool"));
            assert_eq!(*state, GuidState::Allocated, "{g}");
            assert_eq!(holder, &format!("h{}", h.id), "{g}");
        }
    }
}

#[test]
fn three_hosts_two_controllers_hand_over_through_the_fleet_and_survive_faults() {
    in_fabric(
        "three_hosts_two_controllers_hand_over_through_the_fleet_and_survive_faults",
        &spec(),
        |f| {
            let mut c = EtcdCluster::start(&Options::default()).expect("etcd cluster starts");
            let fleet =
                Fleet::connect(FleetSettings::plaintext(c.endpoints(), "dfe", "ib0").unwrap())
                    .expect("connects");
            fleet
                .configure_guid_range(GuidRange {
                    first: Guid(POOL.0),
                    last: Guid(POOL.1),
                })
                .expect("the fabric's GUID range");
            let tmp = devfence_testsupport::scratch("devfence-fleet-e2e-");
            let hosts: Vec<Host> = (0..HOSTS).map(|id| Host::new(&c, tmp.path(), id)).collect();
            let ccfg = tmp.path().join("controller.toml");
            std::fs::write(&ccfg, controller_config(f, &c, 200)).unwrap();
            let mut ctls = vec![
                Ctl::start(f, &ccfg, tmp.path().join("ctl-a.log")),
                Ctl::start(f, &ccfg, tmp.path().join("ctl-b.log")),
            ];
            wait_until("a controller to lead", || leader(&fleet).is_some());

            let etcd = &mut c;
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let mut followed: Vec<Followed<'_>> = hosts
                        .iter()
                        .map(|h| Followed {
                            root: &h.root,
                            pf: PF,
                            nodes: (0..VFS.len())
                                .map(|i| (node(h.id, i), factory(h.id, i)))
                                .collect(),
                        })
                        .collect();
                    follow_hosts(f, &mut followed, &stop);
                });
                let run = || {
                    // The tenants in each host's ledger; each agent claims their
                    // partitions on the fabric when it starts.
                    for h in &hosts {
                        for (t, uid, pkey) in [
                            ("acme", "107:107", "0x8001"),
                            ("globex", "108:108", "0x8002"),
                        ] {
                            ok(&cli(
                                f,
                                &h.root,
                                &h.config,
                                &["tenant", "add", t, "--launcher", uid, "--partition", pkey],
                            ));
                        }
                    }
                    let mut agents: Vec<Agent> = hosts.iter().map(|h| h.start(f)).collect();

                    // Every VF of every host to acme, then all twelve to globex at once.
                    let ids = post_everywhere(&agents, "assign", "acme");
                    wait_everywhere(&agents, &ids, "acme");
                    let before = applies_recorded(f);
                    let ids = post_everywhere(&agents, "handover", "globex");
                    wait_everywhere(&agents, &ids, "globex");
                    let applies = applies_recorded(f) - before;
                    let n = (VFS.len() * hosts.len()) as u64;
                    eprintln!("{n} concurrent handovers on 3 hosts: {applies} applies at OpenSM");
                    assert!(applies >= 1, "the handovers changed nothing at OpenSM");
                    assert!(
                        applies < n,
                        "{n} handovers took {applies} applies at OpenSM"
                    );
                    guids_unique(&fleet, &hosts);

                    // etcd's raft leader SIGSTOPped with the handovers in flight:
                    // the other two members elect a leader, the agents' and the
                    // controller's clients move to them (writes sent to the
                    // paused member, or forwarded to it, time out and go to the
                    // next), and every handover finishes with its gates passed.
                    // Resumed, the old leader rejoins; no GUID was issued twice.
                    let raft = etcd.leader().expect("an etcd leader");
                    let term = etcd.raft_term(raft).expect("the leader's raft term");
                    let ids = post_everywhere(&agents, "handover", "acme");
                    etcd.pause(raft).expect("SIGSTOP etcd's leader");
                    wait_everywhere(&agents, &ids, "acme");
                    // `leader()` asks only the running members: one of them
                    // leads, in a later term than the paused one's (an election
                    // happened while the handovers ran).
                    let now = etcd.leader().expect("the other two elected a leader");
                    let new_term = etcd.raft_term(now).expect("the new leader's raft term");
                    assert!(
                        new_term > term,
                        "raft term {term} -> {new_term}: no election"
                    );
                    etcd.resume(raft).expect("SIGCONT");
                    etcd.wait_healthy(&[0, 1, 2], devfence_etcd_harness::START_DEADLINE)
                        .expect("the old leader rejoins");
                    guids_unique(&fleet, &hosts);

                    // The leading controller SIGKILLed with a round in flight: the
                    // standby leads after the lease TTL and every handover finishes.
                    let who = leader(&fleet).expect("a leader");
                    let at = ctls
                        .iter()
                        .position(|c| who.ends_with(&format!("-{}", c.child.id())))
                        .expect("the leader is one of the two");
                    let ids = post_everywhere(&agents, "handover", "globex");
                    let mut lead = ctls.remove(at);
                    lead.child.kill().expect("SIGKILL");
                    let _ = lead.child.wait();
                    wait_everywhere(&agents, &ids, "globex");
                    let now = leader(&fleet).expect("a leader");
                    assert_ne!(now, who, "{}", ctls[0].log());
                    guids_unique(&fleet, &hosts);

                    // A host agent SIGKILLed mid-handover: restarted, it recovers
                    // before it serves; the device ends Ready for one of the two
                    // tenants with its gates passed, never half-way.
                    let h0 = &hosts[0];
                    let a0 = &mut agents[0];
                    let id = a0.post_all(&[json!({
                        "kind": "handover", "device": VFS[0], "tenant": "acme"
                    })]);
                    assert_eq!(id.len(), 1);
                    a0.child.kill().expect("SIGKILL the agent");
                    let _ = a0.child.wait();
                    drop(agents.remove(0));
                    let a0 = h0.start(f);
                    let (st, v) = request(&a0.socket, "GET", "/v1/status", None);
                    assert_eq!(st, 200, "{v}");
                    assert_eq!(
                        v["open_operations"],
                        json!([]),
                        "recovered before serving: {v}"
                    );
                    let dev = v["devices"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|d| d["device"] == VFS[0])
                        .unwrap_or_else(|| panic!("{v}"));
                    assert_eq!(dev["state"]["state"], "ready", "{dev}");
                    // Whichever side the recovery settled on, the device is
                    // usable: a handover back passes every gate again.
                    let back = if dev["state"]["tenant"] == "acme" {
                        "globex"
                    } else {
                        "acme"
                    };
                    let id = a0.post_all(&[json!({
                        "kind": "handover", "device": VFS[0], "tenant": back
                    })]);
                    check_op(&a0.wait_op(&id[0]), VFS[0], back);
                    guids_unique(&fleet, &hosts);

                    // A one-shot `devfence --direct verify` beside the agent
                    // holds no session of the host: it re-verifies every Ready
                    // IB VF through a read-only view (the controller's word in
                    // etcd and the SA, as the agent's gates do) and passes; a
                    // handover it would run is refused before anything changes.
                    let o = cli(f, &h0.root, &h0.config, &["--direct", "verify", "--json"]);
                    let text = format!(
                        "{}\n{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    assert_eq!(o.status.code(), Some(0), "{text}");
                    let v: Value = serde_json::from_slice(&o.stdout).expect(&text);
                    assert_eq!(v["all_verified"], true, "{v:#}");
                    let verified: BTreeSet<&str> = v["devices"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|d| d["device"].as_str())
                        .collect();
                    assert_eq!(verified, VFS.iter().copied().collect(), "{v:#}");
                    let before = request(&a0.socket, "GET", "/v1/status", None).1;
                    let o = cli(
                        f,
                        &h0.root,
                        &h0.config,
                        &["--direct", "handover", VFS[1], "--tenant", back],
                    );
                    let text = String::from_utf8_lossy(&o.stderr).into_owned();
                    assert!(!o.status.success(), "{text}");
                    assert!(text.contains("host agent"), "{text}");
                    let after = request(&a0.socket, "GET", "/v1/status", None).1;
                    assert_eq!(before["devices"], after["devices"], "nothing changed");
                    drop(a0);
                };
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
                stop.store(true, Ordering::Relaxed);
                if let Err(p) = r {
                    for c in &ctls {
                        eprintln!("controller log:\n{}", c.log());
                    }
                    std::panic::resume_unwind(p);
                }
            });
        },
    );
}
