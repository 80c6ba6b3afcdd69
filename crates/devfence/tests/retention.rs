//! `devfence audit prune` end to end (issue 14 item 4): retention keeps the chain
//! verifiable, with the pruning anchor inside the head signed by the host key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use devfence_testsupport::{dv, ok, stderr, stdout};

/// A simulated `lab` host with a host key and three tenants.
fn lab(tmp: &Path) -> PathBuf {
    let root = tmp.join("h1");
    devfence_testsupport::generate("lab", &root, &[]);
    ok(&dv(&root, &["keys", "init", "--host-id", "h1"]));
    devfence_testsupport::add_tenants(&root, 3);
    root
}

/// issue 14 item 4: `audit prune --keep` on a host with a signing key leaves a
/// chain that `audit verify` accepts (the anchor is in the signed head), a
/// `--keep 0` is refused with a hint, and an external head from before the prune
/// is reported as pruned, not as intact.
#[test]
fn audit_prune_keeps_a_signed_chain_verifiable() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lab(tmp.path());
    ok(&dv(&root, &["audit", "verify"]));
    let all: serde_json::Value =
        serde_json::from_str(&ok(&dv(&root, &["audit", "show", "--json"]))).unwrap();
    let first = &all["items"][0];
    let old_head = format!("{}:{}", first["seq"], first["hash"].as_str().unwrap());
    let out = ok(&dv(&root, &["audit", "prune", "--keep", "2", "--json"]));
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(rep["pruned"].as_u64().unwrap() >= 1, "{rep}");
    assert_eq!(rep["kept"], 3, "{rep}");
    let v = ok(&dv(&root, &["audit", "verify"]));
    assert!(v.contains("intact: 3 records"), "{v}");
    let refused = dv(&root, &["audit", "prune", "--keep", "0"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("Hint:"), "{}", stderr(&refused));
    let stale = dv(&root, &["audit", "verify", "--head", &old_head]);
    assert_eq!(stale.status.code(), Some(1), "{}", stdout(&stale));
    assert!(stdout(&stale).contains("pruned"), "{}", stdout(&stale));
}
