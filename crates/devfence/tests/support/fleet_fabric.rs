//! Shared by the fleet end-to-end test and the fleet benchmark: the fabric
//! controller as a process beside a real OpenSM and a real etcd cluster, the
//! `[fleet]` section the controller and the host agents read, and the check of
//! one finished operation through a fleet host's agent. Included beside
//! `agent_fabric.rs` as `support`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use devfence_etcd_harness::EtcdCluster;
use devfence_fabric_harness::Fabric;
use devfence_fleet::Fleet;
use serde_json::Value;

use crate::support::gates;

/// The `[fleet]` section of fabric `ib0` under prefix `dfe` (loopback
/// plaintext), the controller's batching window `window_ms`.
pub fn fleet_section(c: &EtcdCluster, window_ms: u64) -> String {
    let endpoints: Vec<String> = c.endpoints().iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[fleet]\nbackend = \"etcd\"\nendpoints = [{}]\ninsecure_plaintext = true\nprefix = \"dfe\"\nfabric = \"ib0\"\nlease_ttl_s = 10\nbatch_window_ms = {window_ms}\ntimeout_ms = 5000\n",
        endpoints.join(", ")
    )
}

/// The controllers' devfence.toml: OpenSM on this (the SM) host, and the fleet.
pub fn controller_config(f: &Fabric, c: &EtcdCluster, window_ms: u64) -> String {
    let opensm = toml::to_string(&f.opensm_config())
        .expect("opensm section")
        .replace("[sa]", "[fabric.opensm.sa]");
    format!(
        "[fabric]\nbackend = \"opensm\"\n\n[fabric.opensm]\n{opensm}\n{}",
        fleet_section(c, window_ms)
    )
}

/// A fabric controller process (`devfence serve --role fabric-controller
/// --fabric ib0`), killed when dropped.
pub struct Ctl {
    pub child: Child,
    pub log: PathBuf,
}

impl Ctl {
    pub fn start(f: &Fabric, config: &Path, log: PathBuf) -> Ctl {
        let err = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_devfence"))
            .envs(f.env())
            .current_dir(f.dir())
            .arg("--config")
            .arg(config)
            .args(["serve", "--role", "fabric-controller", "--fabric", "ib0"])
            .env("DEVFENCE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start the controller");
        Ctl { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The leading controller's name, if one leads.
pub fn leader(f: &Fleet) -> Option<String> {
    f.block_on(f.store().read_leader())
        .expect("reads the leader")
        .map(|(r, _)| r.controller.to_string())
}

/// Checks one finished operation: succeeded, the device Ready for `tenant`,
/// every gate passed, the SM gate's evidence from the fleet backend.
pub fn check_op(op: &Value, device: &str, tenant: &str) {
    assert_eq!(op["state"], "succeeded", "{device}: {op}");
    assert_eq!(op["result"]["state"]["state"], "ready", "{device}: {op}");
    assert_eq!(op["result"]["state"]["tenant"], tenant, "{device}: {op}");
    let g = gates(op);
    for want in ["sm-verified", "port-pkeys", "driver", "group-rules"] {
        assert!(
            g.iter().any(|(n, p)| n == want && *p),
            "{device}: gate {want} did not pass: {g:?}"
        );
    }
    assert!(g.iter().all(|(_, p)| *p), "{device}: {g:?}");
    let ev = op["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "gate" && e["name"] == "sm-verified")
        .unwrap();
    assert_eq!(ev["evidence"]["backend"], "fleet", "{ev}");
}
