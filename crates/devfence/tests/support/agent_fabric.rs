//! Shared by the agent batch test and benchmark: a simulated host whose IB VFs
//! are nodes of a real OpenSM/ibsim fabric, a real `devfence serve` on it, and
//! an HTTP client over its socket.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use devfence_fabric_harness::Fabric;
use devfence_model::Guid;
use serde_json::Value;

pub const DEADLINE: Duration = Duration::from_secs(300);

pub fn cli(f: &Fabric, root: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devfence"))
        .env_remove("DEVFENCE_ROOT")
        .env_remove("DEVFENCE_LEDGER")
        .envs(f.env())
        .current_dir(f.dir())
        .arg("--root")
        .arg(root)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The VF's administrative port GUID as the PF shows it (OFED `sriov/<N>/port`).
pub fn sriov_port(root: &Path, pf: &str, index: usize) -> Option<Guid> {
    let p = root.join(format!("sys/bus/pci/devices/{pf}/sriov/{index}/port"));
    let s = std::fs::read_to_string(p).ok()?;
    let hex: String = s.trim().split(':').collect();
    u64::from_str_radix(&hex, 16).ok().map(Guid)
}

/// Plays the HCA: when a VF's GUID changes on the host, its port comes back on
/// the fabric with that GUID. Runs until `stop`.
/// `on_fabric[i]` is the GUID ibsim node `vf{i}` has now (VF index `i` of `pf`).
pub fn follow_guids(f: &Fabric, root: &Path, pf: &str, on_fabric: Vec<Guid>, stop: &AtomicBool) {
    let nodes = on_fabric
        .into_iter()
        .enumerate()
        .map(|(i, g)| (format!("vf{i}"), g))
        .collect();
    follow_hosts(f, &mut [Followed { root, pf, nodes }], stop);
}

/// One host whose VFs [`follow_hosts`] follows: `nodes[i]` is the ibsim node of
/// VF index `i` of `pf` and the GUID it has on the fabric now.
pub struct Followed<'a> {
    pub root: &'a Path,
    pub pf: &'a str,
    pub nodes: Vec<(String, Guid)>,
}

/// [`follow_guids`] for several hosts on one fabric. Runs until `stop`.
pub fn follow_hosts(f: &Fabric, hosts: &mut [Followed<'_>], stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        for h in hosts.iter_mut() {
            for (i, (node, cur)) in h.nodes.iter_mut().enumerate() {
                if let Some(g) = sriov_port(h.root, h.pf, i)
                    && g != *cur
                    && g.0 != 0
                {
                    // A console that did not answer in time is asked again at
                    // the next look (the gate waiting for the port has a deadline).
                    match f.rotate(node, g) {
                        Ok(()) => {
                            *cur = g;
                            // What the port's return makes a real SM do: a
                            // heavy sweep. OpenSM's light sweep does not see a
                            // GUID change, so a port rotated after the apply's
                            // sweep (the last of a batch, CI) stayed unknown.
                            if let Err(e) = f.hup() {
                                eprintln!("asking OpenSM to sweep after {node}: {e}");
                            }
                        }
                        Err(e) => eprintln!("rotating {node} to {g}: {e}; retrying"),
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The OpenSM backend's own record of its applies: the serial of its last one
/// (in the memo it keeps next to the partitions file).
pub fn applies_recorded(f: &Fabric) -> u64 {
    let p = f.opensm_config().partitions_file;
    let memo = p.with_file_name(format!(
        "{}.devfence.json",
        p.file_name().unwrap().to_string_lossy()
    ));
    match std::fs::read_to_string(&memo) {
        Ok(t) => serde_json::from_str::<Value>(&t).unwrap()["serial"]
            .as_u64()
            .unwrap(),
        Err(_) => 0,
    }
}

/// A running `devfence serve`, killed when dropped.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
}

impl Agent {
    pub fn start(f: &Fabric, root: &Path, config: &Path, socket: &Path) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_devfence"))
            .env_remove("DEVFENCE_ROOT")
            .env_remove("DEVFENCE_LEDGER")
            .envs(f.env())
            .current_dir(f.dir())
            .arg("--root")
            .arg(root)
            .arg("--config")
            .arg(config)
            .args(["serve", "--socket"])
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut a = Agent {
            child,
            socket: socket.to_path_buf(),
        };
        devfence_testsupport::wait_serving(&mut a.child, socket, DEADLINE);
        a
    }

    /// Posts every body at once (one thread each); the operation ids.
    pub fn post_all(&self, bodies: &[Value]) -> Vec<String> {
        std::thread::scope(|s| {
            let hs: Vec<_> = bodies
                .iter()
                .map(|b| {
                    s.spawn(move || {
                        let (st, v) = request(
                            &self.socket,
                            "POST",
                            "/v1/operations",
                            Some(&serde_json::to_vec(b).unwrap()),
                        );
                        assert_eq!(st, 202, "{v}");
                        v["id"].as_str().unwrap().to_owned()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    pub fn wait_op(&self, id: &str) -> Value {
        let until = Instant::now() + DEADLINE;
        loop {
            let (s, v) = request(&self.socket, "GET", &format!("/v1/operations/{id}"), None);
            assert_eq!(s, 200, "{v}");
            if v["state"] != "running" {
                return v;
            }
            assert!(Instant::now() < until, "{id} still running: {v}");
            std::thread::sleep(Duration::from_millis(20));
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
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
    devfence_testsupport::request(socket, method, path, body)
}

/// Every gate of an operation's events (as the agent answers it), with
/// whether it passed.
pub fn gates(op: &Value) -> Vec<(String, bool)> {
    op["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "gate")
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["passed"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// A bench knob: the environment variable `name` as a number, else `default`.
pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0..=1) of `v` (sorted in place).
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}
