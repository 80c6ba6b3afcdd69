//! Shared by the fleet CLI and agent tests: a real 3-member etcd cluster on
//! loopback seeded with a fabric where one host is live (one membership in
//! sync, one pending) and one host is lost (one orphaned membership), and a
//! devfence.toml pointing at it.
//!
//! The fabric controller is another part of issue 13: the observed entries
//! are written here as it would write them ("controller stand-in").
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use devfence_etcd_harness::{EtcdCluster, Options};
use devfence_fleet::value::{DesiredRecord, GuidRange, Name, ObservedRecord};
use devfence_fleet::{Fleet, FleetSettings, HostSession};
use devfence_model::{Guid, PKey};

pub const FIRST: u64 = 0x0002_c903_0000_0000;

/// The seeded fabric: the cluster, the client holding h1's live session.
pub struct Seeded {
    pub cluster: EtcdCluster,
    pub fleet: Fleet,
    pub live: HostSession,
    /// h1's GUIDs: in sync, pending.
    pub h1: [Guid; 2],
    /// h2's orphaned GUID.
    pub h2: Guid,
}

pub fn name(s: &str) -> Name {
    s.parse().unwrap()
}

/// The `[fleet]` section for `endpoints` (loopback plaintext).
pub fn fleet_section(endpoints: &[String], timeout_ms: u64) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[fleet]\nbackend = \"etcd\"\nendpoints = [{}]\ninsecure_plaintext = true\nprefix = \"devfence\"\nfabric = \"ib0\"\ntimeout_ms = {timeout_ms}\nlease_ttl_s = 30\n",
        eps.join(", ")
    )
}

/// Writes `dir/devfence.toml` with `text`.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("devfence.toml");
    std::fs::write(&p, text).unwrap();
    p
}

pub fn seed() -> Seeded {
    let cluster = EtcdCluster::start(&Options::default()).expect("etcd cluster starts");
    let mut s = FleetSettings::plaintext(cluster.endpoints(), "devfence", "ib0").unwrap();
    s.timeout = Duration::from_secs(3);
    s.lease_ttl = Duration::from_secs(30);
    let f = Fleet::connect(s).unwrap();
    f.configure_guid_range(GuidRange {
        first: Guid(FIRST),
        last: Guid(FIRST + 999),
    })
    .unwrap();
    let red = "red".parse().unwrap();
    f.claim_pkey(&red, PKey(0x0010)).unwrap();
    let want = DesiredRecord::new(red, vec![PKey(0x8010)]).unwrap();
    let (h1, h2) = (name("h1"), name("h2"));
    let s1 = f.register_host(&h1).unwrap();
    let s2 = f.register_host(&h2).unwrap();
    let g1 = f.allocate_guids(&h1, 2).unwrap();
    let g2 = f.allocate_guids(&h2, 1).unwrap();
    let observe = |h: &Name, g: Guid, rev: i64| {
        let o = ObservedRecord::new(vec![PKey(0x8010)], 3, rev).unwrap();
        f.put_observed(&[], h, g, &o)
            .expect("controller stand-in writes observed");
    };
    let r = f.set_desired(&s1, g1[0], &want).unwrap();
    observe(&h1, g1[0], r);
    f.set_desired(&s1, g1[1], &want).unwrap();
    let r = f.set_desired(&s2, g2[0], &want).unwrap();
    observe(&h2, g2[0], r);
    // h2 is lost: its lease goes (revoked here; an expiry does the same).
    f.close_session(s2).unwrap();
    Seeded {
        cluster,
        fleet: f,
        live: s1,
        h1: [g1[0], g1[1]],
        h2: g2[0],
    }
}

/// The audit records of `fleet revoke` requests (`fleet`, action `revoke`)
/// and their refusals (`refusal`, action `fleet-revoke`), oldest first, among
/// `records` (`audit show`'s items or `GET /v1/audit`'s answer).
pub fn revoke_records(records: &serde_json::Value) -> Vec<&serde_json::Value> {
    records
        .as_array()
        .expect("a list of audit records")
        .iter()
        .filter(|r| {
            let a = r["detail"]["action"].as_str();
            a == Some("revoke") || a == Some("fleet-revoke")
        })
        .collect()
}
