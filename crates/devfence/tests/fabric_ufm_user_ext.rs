//! issue 13 item 4 through the CLI: devfence.toml's `[fabric.opensm]
//! partitions_mode` reaches the OpenSM backend, `devfence status` names the
//! mode in use and why, and a bad value is refused naming the key.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use devfence_fabric_harness::{Fabric, FabricSpec};
use devfence_model::Guid;

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

#[test]
fn status_names_the_partitions_mode_and_bad_values_are_refused() {
    let f = Fabric::start(&FabricSpec::vfs(1, Guid(0x0c42_a103_4000_0000))).unwrap();
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
    let write = |extra: &str| {
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
    };
    let text = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    // auto without UFM's extension file: direct, and status says why.
    write("partitions_mode = \"auto\"\nufm_merge_command = [\"/bin/true\"]\n");
    let out = devfence(&f, &root, &config, &["init"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = devfence(&f, &root, &config, &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("note: partitions_mode direct (auto: no "),
        "{}",
        text(&out)
    );
    // UFM's extension file appears: ufm-user-ext, in the JSON too.
    std::fs::write(f.dir().join("partitions.conf.user_ext"), "").unwrap();
    let out = devfence(&f, &root, &config, &["status"]);
    assert!(
        text(&out).contains("note: partitions_mode ufm-user-ext (auto: UFM's extension file"),
        "{}",
        text(&out)
    );
    let out = devfence(&f, &root, &config, &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        s["sm"]["health"]["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n
                .as_str()
                .unwrap()
                .starts_with("partitions_mode ufm-user-ext")),
        "{s}"
    );

    // Bad values: refused naming the file and the key, with a hint.
    for (extra, key) in [
        ("partitions_mode = \"ufm\"\n", "partitions_mode"),
        ("partitions_mode = \"ufm-user-ext\"\n", "ufm_merge_command"),
        (
            "partitions_mode = \"auto\"\nufm_merge_command = [\"/bin/true\"]\nufm_merge_timeout_ms = 0\n",
            "ufm_merge_timeout_ms",
        ),
    ] {
        write(extra);
        let out = devfence(&f, &root, &config, &["status"]);
        assert!(!out.status.success(), "{extra}: {}", text(&out));
        let t = text(&out);
        assert!(
            t.contains(key) && t.contains("devfence.toml") && t.contains("Hint"),
            "{extra}: {t}"
        );
    }
}
