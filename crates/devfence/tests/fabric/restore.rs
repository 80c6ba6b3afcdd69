//! issue 17 item 2: a restore of OpenSM's partitions file is persisted and
//! reported — by `check --fabric` (FAB-RESTORED) and by `status` in a later
//! process — not kept in the memory of the process that restored.

use super::*;
use std::time::Duration;

#[test]
fn a_restore_is_reported_by_check_fabric_and_by_a_later_status() {
    let f = Fabric::start(&FabricSpec::vfs(2, Guid(VF0))).unwrap();
    let (_dir, root, config, o) = lab_host(&f, "");
    let out = devfence(
        &f,
        &root,
        &config,
        &[
            "tenant",
            "add",
            "acme",
            "--launcher",
            "107:107",
            "--partition",
            "0x8001",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An operator's typo and HUP: OpenSM falls back to everyone-full.
    let good = std::fs::read_to_string(&o.partitions_file).unwrap();
    std::fs::write(
        &o.partitions_file,
        format!("typo=0x8101 : 0xZZZZ ;\n{good}"),
    )
    .unwrap();
    let before = f.subnet_up_count();
    f.hup().unwrap();
    f.wait_subnet_up(before, Duration::from_secs(10)).unwrap();
    let out = devfence(&f, &root, &config, &["check", "--fabric", "--json"]);
    let r = json(&out);
    let restored: Vec<&serde_json::Value> = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["rule"] == "FAB-RESTORED")
        .collect();
    assert_eq!(restored.len(), 1, "{r}");
    assert!(
        restored[0]["message"]
            .as_str()
            .unwrap()
            .contains("PARSE ERROR"),
        "{r}"
    );
    assert_eq!(std::fs::read_to_string(&o.partitions_file).unwrap(), good);
    // A later process's status reports the restore.
    let out = devfence(&f, &root, &config, &["status", "--json"]);
    let s = json(&out);
    let notes = s["sm"]["health"]["notes"].to_string();
    assert!(notes.contains("restore at generation"), "{s}");
}
