//! issue 17 item 2 through the CLI on a real OpenSM: a restore of OpenSM's
//! partitions file, made by one devfence process, enters the audit log exactly
//! once whichever processes open the ledger afterwards, and is followed by a
//! re-verification of the devices (audited once); `devfence verify` works on
//! the OpenSM backend.

use super::*;
use std::time::Duration;

fn records(f: &Fabric, root: &Path, config: &Path, key: &str, value: &str) -> usize {
    let out = devfence(f, root, config, &["audit", "show", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    let list = v["items"]
        .as_array()
        .or_else(|| v["records"].as_array())
        .cloned()
        .unwrap_or_default();
    list.iter().filter(|r| r["detail"][key] == value).count()
}

#[test]
fn a_restore_enters_the_audit_log_once_and_is_followed_by_a_reverification() {
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
    // Some process reads the SM and restores.
    let out = devfence(&f, &root, &config, &["check", "--fabric", "--json"]);
    assert!(json(&out)["findings"].to_string().contains("FAB-RESTORED"));
    // Later processes record it once, and re-verify once OpenSM swept the
    // restored file (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while records(&f, &root, &config, "after", "fabric-restore") == 0 {
        assert!(std::time::Instant::now() < deadline, "never re-verified");
        let n = f.subnet_up_count();
        let _ = f.wait_subnet_up(n, Duration::from_millis(500));
        let out = devfence(&f, &root, &config, &["status"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for _ in 0..2 {
        let out = devfence(&f, &root, &config, &["verify", "--json"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = json(&out);
        assert_eq!(v["sm"], "opensm", "{v}");
        assert_eq!(v["restores_recorded"], serde_json::json!([]), "{v}");
    }
    assert_eq!(records(&f, &root, &config, "event", "fabric-restore"), 1);
    assert_eq!(records(&f, &root, &config, "after", "fabric-restore"), 1);
}
