//! The CLI's conventions, held for every command (issue 15 items 2 and 4): the
//! man pages the CLI names exist, no help text points at a section or document
//! that is not there, every command whose output is data has `--json`, and the
//! exit status follows the one table (0 success, 1 the answer is no, 2 usage,
//! configuration or I/O error).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

use devfence_testsupport::{dv, ok, run, scratch, stderr, stdout, text};

/// Commands whose output is a confirmation or a document of another format,
/// not data: no `--json` (why, beside each).
const NO_JSON: [&str; 11] = [
    "completions",   // a shell script
    "man",           // roff
    "demo",          // a story for people
    "hook-qemu",     // libvirt reads the exit status and stderr
    "init",          // one line: the ledger's path
    "tenant-add",    // one line; `tenant list --json` has the data
    "tenant-remove", // one line
    "sim-generate",  // one line; `inventory --json` has the data
    "serve",         // a server; its API speaks JSON
    "audit-export",  // JSON lines always (docs/json.md)
    "help",
];

/// Every command, as `a-b-c` (from the pages `man --out` writes: one per
/// command), and the pages themselves.
fn commands(dir: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    ok(&run(&["man", "--out", dir.to_str().unwrap()]));
    let pages: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let cmds = pages
        .iter()
        .filter_map(|p| p.strip_prefix("devfence-")?.strip_suffix(".1"))
        .map(str::to_owned)
        .collect();
    (cmds, pages)
}

/// The leaves: commands with no subcommand of their own.
fn leaves(cmds: &BTreeSet<String>) -> Vec<String> {
    cmds.iter()
        .filter(|c| !cmds.iter().any(|o| o.starts_with(&format!("{c}-"))))
        .cloned()
        .collect()
}

/// `a-b` as arguments; `guid-pool` is one command.
fn args(cmd: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut rest = cmd;
    while !rest.is_empty() {
        let word = if rest.starts_with("guid-pool") {
            "guid-pool"
        } else {
            rest.split('-').next().unwrap()
        };
        v.push(word.to_owned());
        rest = rest[word.len()..].trim_start_matches('-');
    }
    v
}

/// issue 15 item 2: every page a man page names (`devfence-x(1)`,
/// `devfence.toml(5)`) is one `devfence man --out` writes; `man` is listed in
/// `--help`.
#[test]
fn every_man_page_named_exists() {
    let tmp = scratch("devfence-conv-");
    let (_, pages) = commands(tmp.path());
    assert!(pages.contains("devfence.1") && pages.contains("devfence.toml.5"));
    for p in &pages {
        let roff = std::fs::read_to_string(tmp.path().join(p)).unwrap();
        let plain = roff.replace("\\-", "-");
        for (i, _) in plain.match_indices("devfence-") {
            let rest = &plain[i..];
            let Some(end) = rest.find("(1)") else {
                continue;
            };
            let name = &rest[..end];
            if name.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                assert!(
                    pages.contains(&format!("{name}.1")),
                    "{p} names {name}(1), which is not written"
                );
            }
        }
    }
    let help = ok(&run(&["--help"]));
    assert!(help.contains("\n  man "), "man is listed: {help}");
}

/// issue 15 items 2 and 6: no help text points at a section or a document that
/// is not there, and every command whose output is data has `--json`.
#[test]
fn help_has_no_dangling_references_and_data_has_json() {
    let tmp = scratch("devfence-conv-");
    let (cmds, _) = commands(tmp.path());
    let mut missing = Vec::new();
    for c in &cmds {
        let mut a = args(c);
        a.push("--help".into());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let h = ok(&run(&a));
        for bad in ["CONFIGURATION below", "DESIGN.md", "see below"] {
            assert!(!h.contains(bad), "{c} --help says {bad:?}:\n{h}");
        }
        let leaf = !cmds.iter().any(|o| o.starts_with(&format!("{c}-")));
        if leaf && !NO_JSON.contains(&c.as_str()) && !h.contains("--json") {
            missing.push(c.clone());
        }
    }
    assert!(missing.is_empty(), "data without --json: {missing:?}");
    assert!(leaves(&cmds).len() > 30, "{cmds:?}");
}

/// issue 15 item 4: one exit status table for every command — a malformed
/// argument is 2 everywhere, a refusal by a rule is 1, success is 0.
#[test]
fn exit_status_follows_the_one_table() {
    let tmp = scratch("devfence-conv-");
    let (cmds, _) = commands(tmp.path());
    // Usage: an unknown flag, for every command.
    for c in leaves(&cmds) {
        let mut a = args(&c);
        a.push("--no-such-flag".into());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = run(&a);
        assert_eq!(o.status.code(), Some(2), "{c}: {}", text(&o));
    }
    let root = tmp.path().join("lab");
    devfence_testsupport::generate("lab", &root, &[]);
    devfence_testsupport::add_tenants(&root, 2);
    // Success.
    ok(&dv(&root, &["assign", "0000:5e:10.0", "--tenant", "acme"]));
    // Refusals by a rule: 1.
    for a in [
        vec!["assign", "0000:5e:10.0", "--tenant", "globex"],
        vec!["reset", "0000:5e:10.0"],
        vec!["vfs", "0000:5e:00.0", "--count", "0"],
        vec!["tenant", "remove", "acme"],
    ] {
        let o = dv(&root, &a);
        assert_eq!(o.status.code(), Some(1), "{a:?} is a refusal: {}", text(&o));
        assert!(stderr(&o).contains("Hint:"), "{a:?}: {}", text(&o));
    }
    // Usage, unknown names, malformed values: 2.
    for a in [
        vec!["assign", "bogus", "--tenant", "acme"],
        vec!["verify", "--device", "0000:5e:10.7"],
        vec!["status", "--ledger", "/nonexistent/ledger.db"],
    ] {
        let o = dv(&root, &a);
        assert_eq!(o.status.code(), Some(2), "{a:?}: {}", text(&o));
    }
    assert!(stdout(&dv(&root, &["status"])).contains("0000:5e:10.0"));
}

/// issue 15 item 4: one verb per concern — `--tenant` and `--to` name the
/// tenant in assign, handover and plan alike; every operation has `--dry-run`
/// (the plan, nothing done); a PCI address without its domain means domain
/// 0000; a throw-away `--sim` host's missing ledger is explained as such.
#[test]
fn verbs_dry_runs_and_short_addresses_are_consistent() {
    let tmp = scratch("devfence-conv-");
    let root = tmp.path().join("lab");
    devfence_testsupport::generate("lab", &root, &[]);
    devfence_testsupport::add_tenants(&root, 2);
    // A dry run changes nothing and says what would run.
    for a in [
        vec!["assign", "5e:10.0", "--to", "acme", "--dry-run", "--json"],
        vec![
            "assign",
            "0000:5e:10.0",
            "--tenant",
            "acme",
            "--dry-run",
            "--json",
        ],
    ] {
        let v = devfence_testsupport::json(&dv(&root, &a));
        assert_eq!(v["dry_run"], true, "{a:?}: {v}");
        assert_eq!(v["device"], "0000:5e:10.0", "{a:?}: {v}");
        assert_eq!(v["tenant"], "acme", "{a:?}: {v}");
        assert!(v["steps"].as_array().is_some_and(|s| !s.is_empty()), "{v}");
    }
    let st = ok(&dv(&root, &["status", "--json"]));
    assert!(
        !st.contains("0000:5e:10.0"),
        "a dry run assigned nothing: {st}"
    );
    // The short form acts on the same device.
    ok(&dv(&root, &["assign", "5e:10.0", "--to", "acme"]));
    let st = ok(&dv(&root, &["status", "--json"]));
    assert!(st.contains("0000:5e:10.0"), "{st}");
    let plan = ok(&dv(
        &root,
        &["handover", "5e:10.0", "--tenant", "globex", "--dry-run"],
    ));
    assert!(plan.contains("nothing is done"), "{plan}");
    ok(&dv(&root, &["handover", "5e:10.0", "--tenant", "globex"]));
    let o = dv(&root, &["release", "5e:10.0", "--dry-run", "--json"]);
    assert_eq!(
        devfence_testsupport::json(&o)["tenant"],
        serde_json::Value::Null
    );
    // A --sim host has no ledger: said as such, not "restore it from a backup".
    let o = run(&["--sim", "lab", "status"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let e = stderr(&o);
    assert!(e.contains("--sim host") && e.contains("--root DIR"), "{e}");
    assert!(!e.contains("backup"), "{e}");
}

/// issue 15 item 3: where the tenancy comes from is said, and a tenancy file
/// seeds the ledger with `tenant import` (all or none; assignments are not
/// imported: a device enters only through a verified assign).
#[test]
fn tenancy_file_is_imported_and_the_source_is_said() {
    let tmp = scratch("devfence-conv-");
    let root = tmp.path().join("lab");
    devfence_testsupport::generate("lab", &root, &[]);
    let file = root.join("etc/devfence/tenancy.toml");
    assert!(file.is_file(), "the lab profile ships a tenancy file");
    let before = ok(&dv(&root, &["check"]));
    assert!(
        before.contains("tenancy: ") && before.contains("tenancy.toml"),
        "{before}"
    );
    let v = devfence_testsupport::json(&dv(&root, &["tenant", "import", "--json"]));
    let added: Vec<&str> = v["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(added.contains(&"acme") && added.contains(&"globex"), "{v}");
    let list = ok(&dv(&root, &["tenant", "list", "--json"]));
    assert!(list.contains("acme") && list.contains("globex"), "{list}");
    // Again: nothing new, nothing changed.
    let v = devfence_testsupport::json(&dv(&root, &["tenant", "import", "--json"]));
    assert_eq!(v["added"].as_array().unwrap().len(), 0, "{v}");
    // Now check reads the ledger, and says so, and that the file is not read.
    let after = ok(&dv(&root, &["check"]));
    assert!(after.contains("tenancy: the ledger"), "{after}");
    assert!(after.contains("tenant import"), "{after}");
    let j = devfence_testsupport::json(&dv(&root, &["check", "--json"]));
    assert_eq!(j["tenancy_from_ledger"], true, "{j}");
    // A file whose acme differs from the ledger's refuses the whole import.
    let other = tmp.path().join("other.toml");
    std::fs::write(
        &other,
        "[[tenant]]\nid = \"acme\"\nlauncher_uid = 200\nlauncher_gid = 200\n\n[[tenant]]\nid = \"newco\"\nlauncher_uid = 201\nlauncher_gid = 201\n",
    )
    .unwrap();
    let o = dv(&root, &["tenant", "import", other.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        stderr(&o).contains("acme") && stderr(&o).contains("Hint:"),
        "{}",
        text(&o)
    );
    let list = ok(&dv(&root, &["tenant", "list", "--json"]));
    assert!(
        !list.contains("newco"),
        "nothing of a refused import is applied: {list}"
    );
}

/// issue 15 item 5: text that says what is true — partitions as entered, a
/// zero VF count, the VF token's path under the root.
#[test]
fn text_says_what_is_true() {
    let tmp = scratch("devfence-conv-");
    let root = tmp.path().join("lab");
    devfence_testsupport::generate("lab", &root, &[]);
    ok(&dv(
        &root,
        &[
            "tenant",
            "add",
            "acme",
            "--launcher",
            "107:107",
            "--partition",
            "0x8001",
            "--partition",
            "0x0002:limited",
        ],
    ));
    let list = ok(&dv(&root, &["tenant", "list"]));
    assert!(
        list.contains("0x8001 (full)") && list.contains("0x0002 (limited)"),
        "{list}"
    );
    let vfs = ok(&dv(&root, &["vfs", "0000:5e:00.0", "--count", "0"]));
    assert!(
        vfs.contains("no VF is left") && !vfs.contains("links are there"),
        "{vfs}"
    );
    let a = ok(&dv(&root, &["assign", "0000:3b:00.1", "--tenant", "acme"]));
    if let Some(line) = a.lines().find(|l| l.contains("VF token")) {
        assert!(
            line.contains(root.to_str().unwrap()),
            "the path under --root: {line}"
        );
    }
}

/// issue 15 item 6: every `--json` document carries `"schema": 1` (a list is
/// `{schema, items}`), acting commands say what they made in `data` (the new
/// mdev's UUID, the PF's VFs), and an operation's timings are objects.
#[test]
fn every_json_document_has_a_schema_and_data() {
    let tmp = scratch("devfence-conv-");
    let root = tmp.path().join("lab");
    devfence_testsupport::generate("lab", &root, &[]);
    devfence_testsupport::add_tenants(&root, 2);
    let j = |a: &[&str]| devfence_testsupport::json(&dv(&root, a));
    let a = j(&["assign", "0000:5e:10.0", "--tenant", "acme", "--json"]);
    assert_eq!(a["schema"], 1, "{a}");
    assert!(
        a["timings"][0]["step"].is_string() && a["timings"][0]["ms"].is_u64(),
        "{a}"
    );
    for args in [
        vec!["inventory", "--json"],
        vec!["check", "--json"],
        vec!["rules", "--json"],
        vec!["status", "--json"],
        vec!["verify", "--json"],
        vec!["plan", "0000:5e:10.2", "--to", "acme", "--json"],
        vec!["recover", "--json"],
        vec!["audit", "head", "--json"],
        vec!["audit", "verify", "--json"],
        vec!["audit", "show", "--json"],
        vec!["tenant", "list", "--json"],
        vec!["guid-pool", "--json"],
        vec!["keys", "trust", "list", "--json"],
        vec!["sim", "profiles", "--json"],
    ] {
        let v = j(&args);
        assert_eq!(v["schema"], 1, "{args:?}: {v}");
    }
    ok(&dv(&root, &["release", "0000:5e:10.0"]));
    let v = j(&["vfs", "0000:5e:00.0", "--count", "2", "--json"]);
    assert_eq!(v["schema"], 1, "{v}");
    let vfs = v["data"]["vfs"].as_array().unwrap();
    assert_eq!(vfs.len(), 2, "the VFs as they read back: {v}");
    let v = j(&["mdev", "create", "0000:65:00.0", "nvidia-63", "--json"]);
    let uuid = v["data"]["uuid"].as_str().unwrap_or_default();
    assert_eq!(uuid.len(), 36, "the new mdev's UUID: {v}");
}
