//! Adversarial tests: ledger (issue 18 items 1–4, 8 and the ledger/keys parts of 12).

#[allow(unused_imports)]
use super::support::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

/// The ledger of a simulated host.
fn ledger(root: &Path) -> PathBuf {
    root.join("var/lib/devfence/ledger.db")
}

/// Asserts success and returns standard output.
fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "expected success, got {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// Asserts a refusal (exit 2) and returns standard error.
fn refused(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2\nstdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    stderr(o)
}

fn tenant_add(root: &Path, id: &str, launcher: &str, partition: &str) -> Output {
    on(
        root,
        &[
            "tenant",
            "add",
            id,
            "--launcher",
            launcher,
            "--partition",
            partition,
        ],
    )
}

/// A `lab` host with tenant acme (107:107, 0x8001).
fn lab_with_acme() -> (tempfile::TempDir, PathBuf) {
    let (tmp, root) = host("lab");
    ok(&tenant_add(&root, "acme", "107:107", "0x8001"));
    (tmp, root)
}

/// The error findings of `check --json` with their rule ids.
fn check_rules(root: &Path, extra: &[&str]) -> (i32, Vec<String>) {
    let mut args = vec!["check", "--json"];
    args.extend_from_slice(extra);
    let o = on(root, &args);
    let code = o.status.code().unwrap_or(-1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("check --json: {e}\n{}\n{}", stdout(&o), stderr(&o)));
    let rules = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "error")
        .map(|f| f["rule"].as_str().unwrap().to_owned())
        .collect();
    (code, rules)
}

fn raw(root: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(ledger(root)).unwrap()
}

// ---------------------------------------------------------------------------
// item 1: a partition key belongs to one tenant
// ---------------------------------------------------------------------------

/// issue 18 item 1: a partition key belongs to one tenant — `tenant add` refuses a
/// second tenant with the same 15-bit P_Key, whatever its membership, and the
/// default partition.
#[test]
fn tenant_add_refuses_a_pkey_of_another_tenant() {
    let (_t, root) = lab_with_acme();
    for p in ["0x8001", "0x0001:limited", "0x0001", "0x8001:limited"] {
        let e = refused(&tenant_add(&root, "mallory", "200:200", p));
        assert!(e.contains("0x0001") || e.contains("0x8001"), "{p}: {e}");
        assert!(e.contains("acme"), "names the holder: {e}");
        assert!(e.contains("Hint:"), "{e}");
    }
    let e = refused(&tenant_add(&root, "mallory", "200:200", "0x7fff"));
    assert!(
        e.contains("default partition") && e.contains("Hint:"),
        "{e}"
    );
    let e = refused(&tenant_add(&root, "mallory", "200:200", "0xffff:limited"));
    assert!(e.contains("default partition"), "{e}");
    let list = ok(&on(&root, &["tenant", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        v["items"].as_array().unwrap().len(),
        1,
        "nothing half-added: {list}"
    );
    ok(&tenant_add(&root, "globex", "108:108", "0x8002"));
}

/// issue 18 item 1: a P_Key two tenants share in the ledger (written before this
/// rule, or by hand) is an error finding of `check` (TENANCY-PKEY-SHARED).
#[test]
fn check_reports_a_pkey_shared_in_the_ledger() {
    let (_t, root) = lab_with_acme();
    ok(&tenant_add(&root, "globex", "108:108", "0x8002"));
    let (code, rules) = check_rules(&root, &[]);
    assert!(
        !rules.iter().any(|r| r == "TENANCY-PKEY-SHARED"),
        "{rules:?}"
    );
    assert_eq!(code, 0, "{rules:?}");
    raw(&root)
        .execute(
            "INSERT INTO tenant_partitions (tenant, pkey, base, membership) VALUES ('globex', 1, 1, 'limited')",
            [],
        )
        .unwrap();
    let (code, rules) = check_rules(&root, &[]);
    assert_eq!(code, 1, "{rules:?}");
    assert!(
        rules.iter().any(|r| r == "TENANCY-PKEY-SHARED"),
        "{rules:?}"
    );
}

/// issue 18 item 1: a tenancy file giving one P_Key to two tenants is reported by
/// `check` (TENANCY-PKEY-SHARED, exit 1), and `devfence rules` lists the rule.
#[test]
fn check_reports_a_pkey_shared_in_a_tenancy_file() {
    let (tmp, root) = host("lab");
    let file = tmp.path().join("t.toml");
    std::fs::write(
        &file,
        "[[tenant]]\nid = \"acme\"\nlauncher_uid = 107\npartitions = [{ pkey = \"0x8001\", membership = \"full\" }]\n\
         [[tenant]]\nid = \"mallory\"\nlauncher_uid = 200\npartitions = [{ pkey = \"0x0001\", membership = \"limited\" }]\n",
    )
    .unwrap();
    let (code, rules) = check_rules(&root, &["--tenancy", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{rules:?}");
    assert!(
        rules.iter().any(|r| r == "TENANCY-PKEY-SHARED"),
        "{rules:?}"
    );
    let r = ok(&run(&["rules"]));
    assert!(r.contains("TENANCY-PKEY-SHARED"), "{r}");
    assert!(r.contains("TENANCY-LAUNCHER-SHARED"), "{r}");
}

// ---------------------------------------------------------------------------
// item 2: a launcher uid belongs to one tenant
// ---------------------------------------------------------------------------

/// issue 18 item 2: a launcher uid belongs to one tenant — `tenant add` refuses a
/// second tenant with acme's uid, and uids/gids the kernel cannot store.
#[test]
fn tenant_add_refuses_a_launcher_uid_of_another_tenant() {
    let (_t, root) = lab_with_acme();
    let e = refused(&tenant_add(&root, "mallory", "107:300", "0x8003"));
    assert!(
        e.contains("107") && e.contains("acme") && e.contains("Hint:"),
        "{e}"
    );
    for l in ["4294967295:300", "300:4294967295"] {
        let e = refused(&tenant_add(&root, "mallory", l, "0x8003"));
        assert!(e.contains("4294967295") && e.contains("Hint:"), "{l}: {e}");
    }
    ok(&tenant_add(&root, "mallory", "300:107", "0x8003"));
}

/// issue 18 item 2: a launcher uid two tenants share is an error finding of `check`
/// from the ledger and from a tenancy file (TENANCY-LAUNCHER-SHARED).
#[test]
fn check_reports_a_launcher_uid_shared_in_the_ledger_and_a_file() {
    let (tmp, root) = lab_with_acme();
    ok(&tenant_add(&root, "globex", "108:108", "0x8002"));
    raw(&root)
        .execute(
            "UPDATE tenants SET launcher_uid = 107 WHERE id = 'globex'",
            [],
        )
        .unwrap();
    let (code, rules) = check_rules(&root, &[]);
    assert_eq!(code, 1, "{rules:?}");
    assert!(
        rules.iter().any(|r| r == "TENANCY-LAUNCHER-SHARED"),
        "{rules:?}"
    );
    let file = tmp.path().join("t.toml");
    std::fs::write(
        &file,
        "[[tenant]]\nid = \"acme\"\nlauncher_uid = 107\n[[tenant]]\nid = \"mallory\"\nlauncher_uid = 107\n",
    )
    .unwrap();
    let (code, rules) = check_rules(&root, &["--tenancy", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{rules:?}");
    assert!(
        rules.iter().any(|r| r == "TENANCY-LAUNCHER-SHARED"),
        "{rules:?}"
    );
}

// ---------------------------------------------------------------------------
// item 3: a damaged ledger is never taken for a new one
// ---------------------------------------------------------------------------

/// issue 18 item 3: a zero-length `ledger.db` is a damaged ledger, never a fresh
/// one: every command refuses it with a hint and leaves it as it is.
#[test]
fn a_zero_length_ledger_is_refused_not_recreated() {
    let (_t, root) = lab_with_acme();
    let l = ledger(&root);
    std::fs::write(&l, b"").unwrap();
    let _ = std::fs::remove_file(l.with_extension("db-wal"));
    let _ = std::fs::remove_file(l.with_extension("db-shm"));
    for args in [
        &[
            "tenant",
            "add",
            "globex",
            "--launcher",
            "108:108",
            "--partition",
            "0x8002",
        ][..],
        &["tenant", "list"],
        &["status"],
        &["assign", "0000:3b:00.1", "--tenant", "acme"],
        &[
            "guid-pool",
            "--set",
            "0x0002c90300f00000..0x0002c90300f0ffff",
        ],
        &["audit", "verify"],
        &["init"],
    ] {
        let o = on(&root, args);
        assert_ne!(
            o.status.code(),
            Some(0),
            "{args:?} accepted an empty ledger"
        );
        let e = stderr(&o);
        assert!(e.contains(&l.display().to_string()), "{args:?}: {e}");
        assert!(e.contains("Hint:"), "{args:?}: {e}");
        assert_eq!(std::fs::metadata(&l).unwrap().len(), 0, "{args:?} wrote it");
    }
    // check, which reads the ledger's tenancy, refuses too (it does not fall back).
    let o = on(&root, &["check"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
}

/// issue 18 item 3: an existing file must be a devfence ledger: an empty SQLite
/// database (valid header, no devfence schema) is refused, not migrated.
#[test]
fn an_empty_sqlite_database_is_not_taken_for_a_ledger() {
    let (_t, root) = host("lab");
    let l = ledger(&root);
    std::fs::create_dir_all(l.parent().unwrap()).unwrap();
    {
        let c = rusqlite::Connection::open(&l).unwrap();
        c.execute_batch("PRAGMA user_version = 0; VACUUM;").unwrap();
    }
    std::fs::set_permissions(&l, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = refused(&tenant_add(&root, "acme", "107:107", "0x8001"));
    assert!(
        e.contains("not a devfence ledger") && e.contains("Hint:"),
        "{e}"
    );
}

/// issue 18 item 3: the ledger, its `-wal` and `-shm` are 0600 from creation, and a
/// ledger others may read or write is refused with a hint.
#[test]
fn the_ledger_is_private_and_a_loose_mode_is_refused() {
    let (_t, root) = lab_with_acme();
    let l = ledger(&root);
    ok(&on(&root, &["tenant", "list"]));
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", l.display()));
        if let Ok(m) = std::fs::metadata(&p) {
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", p.display());
        } else {
            assert!(!suffix.is_empty(), "no ledger");
        }
    }
    std::fs::set_permissions(&l, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = refused(&on(&root, &["tenant", "list"]));
    assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
}

/// issue 18 item 3: read-only commands never create a ledger; `devfence init`
/// creates one explicitly and never over an existing file.
#[test]
fn only_init_and_first_use_create_the_ledger() {
    let (_t, root) = host("lab");
    let l = ledger(&root);
    for args in [&["status"][..], &["tenant", "list"], &["audit", "verify"]] {
        let o = on(&root, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stdout(&o));
        assert!(stderr(&o).contains("devfence init"), "{}", stderr(&o));
        assert!(!l.exists(), "{args:?} created the ledger");
    }
    let out = ok(&on(&root, &["init"]));
    assert!(out.contains(&l.display().to_string()), "{out}");
    let e = refused(&on(&root, &["init"]));
    assert!(e.contains("exists") && e.contains("Hint:"), "{e}");
    ok(&on(&root, &["tenant", "list"]));
}

// ---------------------------------------------------------------------------
// item 4: the GUID pool never issues a GUID that exists anywhere it can see
// ---------------------------------------------------------------------------

fn port_guids(root: &Path) -> Vec<String> {
    let o = ok(&on(root, &["inventory", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    let mut out = Vec::new();
    for f in v["pci"].as_array().unwrap() {
        if let Some(s) = f.get("sriov").filter(|s| !s.is_null()) {
            for g in s["vf_guids"].as_array().into_iter().flatten() {
                if let Some(p) = g["port_guid"].as_str() {
                    out.push(p.to_owned());
                }
            }
        }
    }
    for d in v["ib"].as_array().into_iter().flatten() {
        for p in d["ports"].as_array().into_iter().flatten() {
            if let Some(g) = p["port_guid"].as_str() {
                out.push(g.to_owned());
            }
        }
    }
    out
}

/// issue 18 item 4: a pool range over GUIDs live on the host's VFs never hands
/// one of them out: the VF assigned gets a GUID no other port has.
#[test]
fn the_pool_skips_guids_live_on_the_host() {
    let (_t, root) = lab_with_acme();
    let before = port_guids(&root);
    assert!(
        before.iter().any(|g| g == "0x0c42a10340000001"),
        "{before:?}"
    );
    let out = ok(&on(
        &root,
        &[
            "guid-pool",
            "--set",
            "0x0c42a10340000000..0x0c42a1034000000f",
        ],
    ));
    assert!(out.contains("marked used"), "{out}");
    ok(&on(&root, &["assign", "0000:3b:00.1", "--tenant", "acme"]));
    let after = port_guids(&root);
    let mut seen = std::collections::HashSet::new();
    for g in &after {
        assert!(seen.insert(g), "GUID {g} is on two ports: {after:?}");
    }
    let (_, rules) = check_rules(&root, &[]);
    assert!(!rules.iter().any(|r| r == "IB-GUID-DUPLICATE"), "{rules:?}");
}

// ---------------------------------------------------------------------------
// item 8: the audit chain cannot be cut or rewritten unnoticed
// ---------------------------------------------------------------------------

/// A lab host with a host key and a few audit records.
fn audited() -> (tempfile::TempDir, PathBuf) {
    let (t, root) = lab_with_acme();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    ok(&on(&root, &["keys", "init", "--host-id", "lab1"]));
    ok(&tenant_add(&root, "globex", "108:108", "0x8002"));
    ok(&on(&root, &["assign", "0000:5e:10.0", "--tenant", "acme"]));
    (t, root)
}

fn head(root: &Path) -> (u64, String) {
    let o = ok(&on(root, &["audit", "head"]));
    let line = o.lines().next().unwrap().trim().to_owned();
    let (s, h) = line.split_once(':').unwrap_or_else(|| panic!("{o}"));
    (s.parse().unwrap(), h.to_owned())
}

fn verify(root: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["audit", "verify"];
    args.extend_from_slice(extra);
    on(root, &args)
}

fn unlock(c: &rusqlite::Connection) {
    c.execute_batch("DROP TRIGGER audit_no_delete; DROP TRIGGER audit_no_update;")
        .unwrap();
}

/// issue 18 item 8: `audit head` prints SEQ:HASH; an intact chain verifies against
/// the stored head and against the printed one.
#[test]
fn audit_head_is_printed_and_verifies() {
    let (_t, root) = audited();
    let (seq, hash) = head(&root);
    assert!(seq > 3 && hash.len() == 64, "{seq}:{hash}");
    let o = verify(&root, &[]);
    assert!(ok(&o).contains("intact"), "{}", stdout(&o));
    ok(&verify(&root, &["--head", &format!("{seq}:{hash}")]));
    let hp = PathBuf::from(format!("{}.audit-head", ledger(&root).display()));
    let m = std::fs::metadata(&hp).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
}

/// issue 18 item 8: deleting the tail of the chain is a finding (exit 1).
#[test]
fn a_cut_tail_is_found() {
    let (_t, root) = audited();
    let c = raw(&root);
    unlock(&c);
    c.execute(
        "DELETE FROM audit WHERE id = (SELECT max(id) FROM audit)",
        [],
    )
    .unwrap();
    drop(c);
    let o = verify(&root, &[]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(
        (stdout(&o) + &stderr(&o)).contains("truncated"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
}

/// issue 18 item 8: deleting every record is a finding (exit 1), not an empty chain.
#[test]
fn an_emptied_chain_is_found() {
    let (_t, root) = audited();
    let c = raw(&root);
    unlock(&c);
    c.execute("DELETE FROM audit", []).unwrap();
    drop(c);
    let o = verify(&root, &[]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
}

/// One audit row as stored: id, seq, at_ms, kind, device, tenant, detail.
type AuditRow = (
    i64,
    i64,
    i64,
    String,
    Option<String>,
    Option<String>,
    String,
);

/// Rewrites the whole chain with one record's detail changed and every hash
/// recomputed; returns the new head (seq, hash).
fn rewrite(root: &Path) -> (u64, String) {
    use devfence_engine::audit::{Hash, record_hash};
    let c = raw(root);
    unlock(&c);
    let rows: Vec<AuditRow> = {
        let mut st = c
            .prepare("SELECT id, seq, at_ms, kind, device, tenant, detail FROM audit ORDER BY id")
            .unwrap();
        st.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    };
    let mut prev = Hash::GENESIS;
    let mut last = (0, String::new());
    for (i, (id, seq, at, kind, dev, ten, detail)) in rows.into_iter().enumerate() {
        let detail = if i == 0 {
            r#"{"action":"rewritten"}"#.to_owned()
        } else {
            detail
        };
        let h = record_hash(
            u64::try_from(seq).unwrap(),
            at,
            &kind,
            dev.as_deref(),
            ten.as_deref(),
            &detail,
            &prev,
        );
        c.execute(
            "UPDATE audit SET detail = ?2, prev_hash = ?3, hash = ?4 WHERE id = ?1",
            rusqlite::params![id, detail, prev.to_string(), h.to_string()],
        )
        .unwrap();
        prev = h;
        last = (u64::try_from(seq).unwrap(), h.to_string());
    }
    last
}

/// issue 18 item 8: a chain rewritten with recomputed hashes is a finding (exit 1)
/// against the stored head and against an externally kept one.
#[test]
fn a_rewritten_chain_is_found() {
    let (_t, root) = audited();
    let (seq, hash) = head(&root);
    rewrite(&root);
    let o = verify(&root, &[]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let o = verify(&root, &["--head", &format!("{seq}:{hash}")]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
}

/// issue 18 item 8: a head file forged to match a rewritten chain fails its
/// signature by the host key (exit 1).
#[test]
fn a_forged_head_is_found() {
    let (_t, root) = audited();
    let (seq, hash) = rewrite(&root);
    let hp = PathBuf::from(format!("{}.audit-head", ledger(&root).display()));
    let text = std::fs::read_to_string(&hp).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["seq"] = serde_json::json!(seq);
    v["hash"] = serde_json::json!(hash);
    std::fs::write(&hp, serde_json::to_vec(&v).unwrap()).unwrap();
    let o = verify(&root, &[]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(
        (stdout(&o) + &stderr(&o)).contains("signature"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------
// item 12: keys directory mode, re-trusting a removed key, devfence's own custody
// ---------------------------------------------------------------------------

/// issue 18 item 12: a keys directory others may enter is refused, with a hint.
#[test]
fn a_loose_keys_directory_is_refused() {
    let (_t, root) = host("lab");
    ok(&on(&root, &["keys", "init", "--host-id", "lab1"]));
    let dir = root.join("etc/devfence/keys");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = refused(&on(&root, &["keys", "show"]));
    assert!(e.contains("0755") && e.contains("chmod 700"), "{e}");
}

/// issue 18 item 12: a key that was removed (compromised) is not trusted again
/// without --force, and then with a loud warning.
#[test]
fn a_removed_key_is_not_trusted_again_silently() {
    let (tmp, root) = host("lab");
    let (_t2, other) = host("lab");
    ok(&on(&other, &["keys", "init", "--host-id", "src1"]));
    let line = ok(&on(&other, &["keys", "show"]));
    let f = tmp.path().join("src1.pub");
    std::fs::write(&f, &line).unwrap();
    let fs = f.to_str().unwrap();
    ok(&on(&root, &["keys", "trust", "add", "--from", fs]));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&on(&root, &["keys", "trust", "list", "--json"]))).unwrap();
    let fp = v["items"][0]["fingerprint"].as_str().unwrap().to_owned();
    ok(&on(&root, &["keys", "trust", "remove", &fp]));
    let e = refused(&on(&root, &["keys", "trust", "add", "--from", fs]));
    assert!(e.contains("removed") && e.contains("--force"), "{e}");
    let o = on(&root, &["keys", "trust", "add", "--from", fs, "--force"]);
    ok(&o);
    assert!(stderr(&o).contains("WARNING"), "{}", stderr(&o));
}

/// issue 18 item 12: after devfence itself assigns a VF of a user-space PF (it
/// holds the PF's custody and sets the VF token), `check` does not report PF-TRUST.
#[test]
fn devfence_custody_of_a_userspace_pf_is_not_pf_trust() {
    let (_t, root) = lab_with_acme();
    ok(&on(&root, &["assign", "0000:af:10.0", "--tenant", "acme"]));
    let (code, rules) = check_rules(&root, &[]);
    assert!(!rules.iter().any(|r| r == "PF-TRUST"), "{rules:?}");
    assert_eq!(code, 0, "{rules:?}");
}

/// issue 18 item 8: a head forged and signed with another host's key — even one
/// this host trusts for envelopes — is refused: only this host's own keys sign
/// its chain head.
#[test]
fn a_head_signed_by_another_trusted_host_is_refused() {
    let (tmp, root) = audited();
    let (_t2, other) = host("lab");
    ok(&on(&other, &["keys", "init", "--host-id", "src1"]));
    let line = ok(&on(&other, &["keys", "show"]));
    let f = tmp.path().join("src1.pub");
    std::fs::write(&f, &line).unwrap();
    ok(&on(
        &root,
        &["keys", "trust", "add", "--from", f.to_str().unwrap()],
    ));
    let (seq, hash) = rewrite(&root);
    let text = std::fs::read_to_string(other.join("etc/devfence/keys/host.key")).unwrap();
    let key = devfence_seal::HostKey::from_file_text(&text).unwrap();
    let sig = key.sign(&devfence_engine::audit::head_message(seq, &hash));
    let head = serde_json::json!({
        "format": 1,
        "seq": seq,
        "hash": hash,
        "signer": key.public().fingerprint().to_string(),
        "signature": devfence_seal::format::hex(&sig),
    });
    let hp = PathBuf::from(format!("{}.audit-head", ledger(&root).display()));
    std::fs::write(&hp, serde_json::to_vec(&head).unwrap()).unwrap();
    let o = verify(&root, &[]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("not one of this host's own keys"),
        "{}",
        stderr(&o)
    );
}

/// issue 11 item 2 (one way to open the ledger): a forced acting command on a
/// host with a signing key writes its audit record through the same store as
/// every other command, so the chain head it leaves is signed and `audit
/// verify` still passes. Through a store opened without the head signer the
/// head was left unsigned and the chain reported as forged.
#[test]
fn a_forced_action_on_a_keyed_host_leaves_a_signed_head() {
    let (_t, root) = audited();
    ok(&on(&root, &["reset", "0000:5e:10.0", "--force"]));
    let o = verify(&root, &[]);
    assert!(ok(&o).contains("intact"), "{}", stdout(&o));
    let a = ok(&on(&root, &["audit", "show", "--device", "0000:5e:10.0"]));
    assert!(a.contains("force"), "the forced reset is audited: {a}");
}
