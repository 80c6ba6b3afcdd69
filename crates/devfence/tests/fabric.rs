//! The CLI with the OpenSM backend selected by the configuration file, against a
//! real OpenSM on an ibsim fabric: `status` reports it, `check --fabric` finds
//! posture problems in its partitions and reads ports at its SA; a restore of its
//! partitions file is reported (`restore`) and audited once, then re-verified
//! (`reverify`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use devfence_fabric::opensm::OpenSmConfig;
use devfence_fabric_harness::{Fabric, FabricSpec};
use devfence_model::Guid;

const VF0: u64 = 0x0c42_a103_4000_0000;

#[path = "fabric/restore.rs"]
mod restore;
#[path = "fabric/reverify.rs"]
mod reverify;

fn devfence(f: &Fabric, root: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devfence"))
        .env_remove("DEVFENCE_ROOT")
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

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// A simulated `lab` host whose devfence.toml selects the fabric's OpenSM (with
/// `extra` appended): (guard, root, the configuration file, OpenSM's files).
fn lab_host(f: &Fabric, extra: &str) -> (tempfile::TempDir, PathBuf, PathBuf, OpenSmConfig) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let st = Command::new(env!("CARGO_BIN_EXE_devfence"))
        .args(["sim", "generate", "--profile", "lab", "--out"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success());
    let o = f.opensm_config();
    let config = dir.path().join("devfence.toml");
    std::fs::write(
        &config,
        format!(
            "[fabric]\nbackend = \"opensm\"\n\n[fabric.opensm]\npartitions_file = \"{}\"\nlog_file = \"{}\"\npid_file = \"{}\"\n{extra}",
            o.partitions_file.display(),
            o.log_file.display(),
            o.pid_file.as_ref().unwrap().display()
        ),
    )
    .unwrap();
    (dir, root, config, o)
}

fn rules(report: &serde_json::Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["rule"].as_str().unwrap().starts_with("FAB-"))
        .map(|f| {
            (
                f["rule"].as_str().unwrap().to_owned(),
                f["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn check_fabric_reads_opensm_posture_through_the_config() {
    let f = Fabric::start(&FabricSpec::vfs(2, Guid(VF0))).unwrap();
    let (_dir, root, config, o) = lab_host(&f, "\n[fabric.opensm.sa]\nsm_key = \"0x1\"\n");
    for (t, uid, pkey) in [
        ("acme", "107:107", "0x8001"),
        ("globex", "108:108", "0x8002"),
    ] {
        let out = devfence(
            &f,
            &root,
            &config,
            &["tenant", "add", t, "--launcher", uid, "--partition", pkey],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // status names the backend and finds it healthy.
    let out = devfence(&f, &root, &config, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = json(&out);
    assert_eq!(s["sm"]["backend"], "opensm", "{s}");
    assert_eq!(s["sm"]["healthy"], true, "{s}");

    // A clean fabric: no fabric findings.
    let out = devfence(&f, &root, &config, &["check", "--fabric", "--json"]);
    let r = json(&out);
    assert_eq!(rules(&r), Vec::<(String, String)>::new(), "{r}");
    assert_eq!(out.status.code(), Some(0));

    // An operator adds a port to acme's partition behind devfence's back.
    let mut text = std::fs::read_to_string(&o.partitions_file).unwrap();
    text.insert_str(0, &format!("intruder=0x8001 : 0x{:016x}=full ;\n", VF0 + 2));
    std::fs::write(&o.partitions_file, text).unwrap();
    let out = devfence(&f, &root, &config, &["check", "--fabric", "--json"]);
    let found = rules(&json(&out));
    assert_eq!(out.status.code(), Some(1), "{found:?}");
    assert!(
        found.iter().any(|(r, m)| r == "FAB-UNKNOWN-MEMBER"
            && m.contains("acme")
            && m.contains("never issued")),
        "{found:?}"
    );

    // A configuration naming a backend that does not exist is a clear error.
    std::fs::write(&config, "[fabric]\nbackend = \"opnsm\"\n").unwrap();
    let out = devfence(&f, &root, &config, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("devfence.toml") && err.contains("opnsm"),
        "{err}"
    );
}
