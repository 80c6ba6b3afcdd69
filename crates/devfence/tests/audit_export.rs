//! `devfence audit export` (issue 12 item 8): the audit records as JSON
//! lines, one per record, resumable by seq, `--follow` streaming new ones.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant};

use devfence_testsupport::{add_tenants, devfence, dv, generate, ok, scratch};
use serde_json::Value;

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn seqs(v: &[Value]) -> Vec<u64> {
    v.iter().map(|l| l["seq"].as_u64().unwrap()).collect()
}

fn records(root: &Path) -> Vec<Value> {
    let v = devfence_testsupport::json(&dv(root, &["audit", "show", "--json"]));
    v["items"].as_array().unwrap().clone()
}

/// One line per record with the checklist fields, its hash the chain's;
/// `--since` starts after a seq; `--output` appends and resumes after its
/// last line (nothing lost, nothing repeated), and ends a line a crash cut.
#[test]
fn export_lines_resume_by_seq() {
    let tmp = scratch("devfence-export-");
    let root = tmp.path().join("lab");
    generate("lab", &root, &[]);
    add_tenants(&root, 2);
    ok(&dv(&root, &["assign", "0000:5e:10.0", "--tenant", "acme"]));
    let recs = records(&root);
    let out = lines(&ok(&dv(&root, &["audit", "export"])));
    assert_eq!(out.len(), recs.len());
    for (l, r) in out.iter().zip(&recs) {
        for k in [
            "time",
            "actor",
            "action",
            "target",
            "outcome",
            "seq",
            "hash",
            "prev_hash",
        ] {
            assert!(l.get(k).is_some_and(|v| !v.is_null()), "{k}: {l}");
        }
        assert_eq!((&l["seq"], &l["hash"]), (&r["seq"], &r["hash"]), "{l}");
        assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
        let parsed: devfence_app::audit::ExportLine = parse_line(l);
        assert!(parsed.hash_matches(), "{l}");
    }
    assert!(
        out.iter()
            .any(|l| l["action"].as_str().unwrap().starts_with("gate:")),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|l| l["target"]["device"] == "0000:5e:10.0" && l["target"]["tenant"] == "acme")
    );
    let since = lines(&ok(&dv(&root, &["audit", "export", "--since", "3"])));
    assert_eq!(seqs(&since), seqs(&out)[3..]);

    let file = tmp.path().join("audit.jsonl");
    let f = file.to_str().unwrap();
    ok(&dv(&root, &["audit", "export", "--output", f]));
    let first = lines(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(seqs(&first), seqs(&out));
    ok(&dv(&root, &["release", "0000:5e:10.0"]));
    // A crash cut the last line: the next export starts a new line after it.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("{\"seq\": 999, \"cut");
    std::fs::write(&file, &text).unwrap();
    ok(&dv(&root, &["audit", "export", "--output", f]));
    let text = std::fs::read_to_string(&file).unwrap();
    let all: Vec<Value> = text
        .lines()
        .filter(|l| !l.contains("\"cut"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<u64> = (1..=records(&root).len() as u64).collect();
    assert_eq!(seqs(&all), want, "every record once, in order");
    assert_eq!(
        text.lines().count(),
        want.len() + 1,
        "the cut line stays, alone"
    );
}

fn parse_line(l: &Value) -> devfence_app::audit::ExportLine {
    devfence_app::audit::ExportLine {
        schema: 1,
        seq: l["seq"].as_u64().unwrap(),
        time: l["time"].as_str().unwrap().into(),
        at_ms: l["at_ms"].as_i64().unwrap(),
        actor: l["actor"].clone(),
        action: l["action"].as_str().unwrap().into(),
        target: devfence_app::audit::Target {
            device: l["target"]["device"].as_str().map(Into::into),
            tenant: l["target"]["tenant"].as_str().map(Into::into),
        },
        outcome: "succeeded",
        kind: devfence_engine::AuditKind::from_name(l["kind"].as_str().unwrap())
            .unwrap()
            .name(),
        detail: l["detail"].clone(),
        prev_hash: l["prev_hash"].as_str().unwrap().into(),
        hash: l["hash"].as_str().unwrap().into(),
    }
}

/// `--follow` appends the records a later command writes, as it writes them.
#[test]
fn follow_streams_new_records() {
    let tmp = scratch("devfence-export-");
    let root = tmp.path().join("lab");
    generate("lab", &root, &[]);
    add_tenants(&root, 2);
    let file = tmp.path().join("audit.jsonl");
    let mut child = devfence()
        .arg("--root")
        .arg(&root)
        .args(["audit", "export", "--follow", "--output"])
        .arg(&file)
        .spawn()
        .unwrap();
    ok(&dv(&root, &["assign", "0000:5e:10.0", "--tenant", "acme"]));
    let n = records(&root).len();
    let until = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let t = std::fs::read_to_string(&file).unwrap_or_default();
        if t.lines().count() >= n {
            break lines(&t);
        }
        assert!(child.try_wait().unwrap().is_none(), "--follow ended");
        assert!(Instant::now() < until, "only {t}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seqs(&got), (1..=n as u64).collect::<Vec<_>>());
    assert!(
        got.iter()
            .any(|l| l["action"] == "step:finish" || l["detail"]["outcome"] == "succeeded")
    );
}
