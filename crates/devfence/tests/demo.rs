//! The whole `devfence demo` output against a golden file (issue 15 item 7),
//! with what varies from run to run masked: times, the number of SM reads a
//! waiting gate made (and the lines that report each wait), the simulated SM's
//! generation numbers. Set `DEVFENCE_REGEN=1` to rewrite the golden file after a
//! deliberate change (never under CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use devfence_testsupport::{ok, run};

/// `s` with every run of ASCII digits after `prefix` replaced by `…`.
fn mask_after(s: &str, prefix: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(prefix) {
        let (head, tail) = rest.split_at(i + prefix.len());
        out.push_str(head);
        let n = tail
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(tail.len());
        if n > 0 {
            out.push('…');
        }
        rest = &tail[n..];
    }
    out.push_str(rest);
    out
}

fn normalize(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.contains("waiting (read ") {
            continue;
        }
        let mut l = line.to_owned();
        // The quarantine reason is cut at a length, which moves with the
        // digits masked below: keep only that it is quarantined at the gate.
        if let Some(i) = l.find("Quarantined(gate:") {
            let gate_end = l[i..].find(" failed").map_or(l.len(), |j| i + j);
            l.replace_range(gate_end.., " failed: …)");
        }
        if let (Some(a), Some(b)) = (l.find('['), l.find(" ms]"))
            && a < b
            && l[a + 1..b].trim().chars().all(|c| c.is_ascii_digit())
        {
            l.replace_range(a..b + 4, "[… ms]");
        }
        for p in ["after ", "reads in ", "sm-generation=", "generation "] {
            l = mask_after(&l, p);
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

#[test]
fn the_demo_reads_as_its_golden_story() {
    let o = run(&["demo"]);
    let text = ok(&o);
    assert!(
        o.stderr.is_empty(),
        "the demo writes nothing to stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let actual = normalize(&text);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/demo.txt");
    if std::env::var_os("DEVFENCE_REGEN").is_some() && std::env::var_os("CI").is_none() {
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}. Hint: DEVFENCE_REGEN=1 writes it", path.display()));
    if actual != want {
        let first = actual
            .lines()
            .zip(want.lines())
            .position(|(a, w)| a != w)
            .unwrap_or(0);
        panic!(
            "the demo differs from {} at line {}:\n  got:  {}\n  want: {}\n(DEVFENCE_REGEN=1 rewrites it after a deliberate change)",
            path.display(),
            first + 1,
            actual.lines().nth(first).unwrap_or(""),
            want.lines().nth(first).unwrap_or("")
        );
    }
    // Operations are numbered without gaps.
    let mut ops: Vec<u32> = text
        .lines()
        .filter_map(|l| {
            let t = l.trim_start();
            let rest = t.strip_prefix("op-")?;
            let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
            (rest[n.len()..].starts_with(':') || rest[n.len()..].starts_with(" (run by"))
                .then(|| n.parse().ok())
                .flatten()
        })
        .collect();
    ops.dedup();
    assert!(
        ops.windows(2).all(|w| w[1] == w[0] + 1),
        "operations numbered without gaps: {ops:?}"
    );
}
