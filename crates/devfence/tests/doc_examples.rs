//! The shell examples of README.md and docs/*.md run as written.
//!
//! Every ```sh block of those files is preceded by a marker comment:
//! `<!-- example -->` (run by this test) or `<!-- example: not run: WHY -->`
//! (a build command, or one that needs what a simulated host is not, said
//! why). An unmarked ```sh block fails the test, so a new example is either run
//! or explicitly excused.
//!
//! The runnable blocks of one file run in order in one bash session, as a
//! reader would type them: the built `devfence` first on `PATH`, the workspace
//! as the working directory (the examples name its fixtures), and a private
//! `/tmp` (a tmpfs in a private mount namespace), so the examples' `/tmp/lab`
//! is this run's own. Each command must exit 0, or the status its comment
//! states as `(exit N)`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

const RUN: &str = "<!-- example -->";
const NOT_RUN: &str = "<!-- example: not run:";

/// One ```sh block: its first line number (1-based) and its lines.
struct Block {
    line: usize,
    lines: Vec<String>,
    run: bool,
}

/// The ```sh blocks of a Markdown text; an unmarked one is an error.
fn blocks(name: &str, text: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim_start();
        if l.starts_with("```") {
            let info = l.trim_start_matches('`').trim();
            let start = i + 1;
            let mut end = start;
            while end < lines.len() && !lines[end].trim_start().starts_with("```") {
                end += 1;
            }
            if info == "sh" || info == "bash" || info == "shell" {
                let marker = (0..i)
                    .rev()
                    .map(|j| lines[j].trim())
                    .find(|l| !l.is_empty())
                    .unwrap_or_default();
                let run = if marker == RUN {
                    true
                } else if marker.starts_with(NOT_RUN) && marker.ends_with("-->") {
                    false
                } else {
                    return Err(format!(
                        "{name}:{}: a ```{info} block without a marker: put `{RUN}` (run by \
                         tests/doc_examples.rs) or `{NOT_RUN} WHY -->` on the line before it",
                        i + 1
                    ));
                };
                out.push(Block {
                    line: start + 1,
                    lines: lines[start..end].iter().map(|s| (*s).to_string()).collect(),
                    run,
                });
            }
            i = end + 1;
        } else {
            i += 1;
        }
    }
    Ok(out)
}

/// The status a command's comment states as `(exit N)`, else 0.
fn expected_exit(cmd: &str) -> u8 {
    cmd.split("(exit ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The bash script of a file's runnable blocks: each command followed by a
/// check of its status.
fn script(name: &str, blocks: &[Block]) -> String {
    let mut s = String::new();
    for b in blocks.iter().filter(|b| b.run) {
        let mut k = 0;
        while k < b.lines.len() {
            let at = b.line + k;
            let first = b.lines[k].clone();
            k += 1;
            let t = first.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let mut cmd = first.clone();
            // `\` continuations.
            while cmd.trim_end().ends_with('\\') && k < b.lines.len() {
                cmd.push('\n');
                cmd.push_str(&b.lines[k]);
                k += 1;
            }
            // A here-document: its body up to the terminator.
            if let Some(rest) = cmd.split("<<").nth(1) {
                let term = rest
                    .trim()
                    .trim_start_matches('-')
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .trim_matches(|c| c == '\'' || c == '"')
                    .to_string();
                while k < b.lines.len() {
                    cmd.push('\n');
                    cmd.push_str(&b.lines[k]);
                    k += 1;
                    if b.lines[k - 1].trim() == term {
                        break;
                    }
                }
            }
            let want = expected_exit(&cmd);
            let shown = first.trim().replace('\'', "'\\''");
            let _ = writeln!(
                s,
                "printf '%s\\n' '$ {shown}'\n{cmd}\n__rc=$?\nif [ $__rc -ne {want} ]; then \
                 echo \"{name}:{at}: exit $__rc, expected {want}\" >&2; exit 1; fi"
            );
        }
    }
    s
}

fn files() -> Vec<PathBuf> {
    let ws = workspace();
    let mut v = vec![ws.join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(ws.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    v.extend(docs);
    v.push(ws.join("testbed/fabric/README.md"));
    v
}

#[test]
fn every_shell_block_of_the_docs_is_marked() {
    let mut errors = Vec::new();
    let mut run = 0;
    for f in files() {
        let name = f.strip_prefix(workspace()).unwrap().display().to_string();
        match blocks(&name, &fs::read_to_string(&f).unwrap()) {
            Ok(b) => run += b.iter().filter(|b| b.run).count(),
            Err(e) => errors.push(e),
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(run > 0, "no runnable example found");
}

/// Runs the runnable examples of `file` (relative to the workspace).
fn run_examples(file: &str) {
    let ws = workspace();
    let text = fs::read_to_string(ws.join(file)).unwrap();
    let bl = blocks(file, &text).unwrap_or_else(|e| panic!("{e}"));
    assert!(bl.iter().any(|b| b.run), "{file} has no runnable example");
    let body = script(file, &bl);
    let tmp = tempfile::tempdir().unwrap();
    let script_file = tmp.path().join("examples.sh");
    fs::write(&script_file, &body).unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_devfence"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // A private /tmp; the script comes on stdin (the tmpfs hides the real
    // /tmp, where the temp dir is).
    let wrapper = format!(
        "set -e\nmount -t tmpfs tmpfs /tmp\ncat > /tmp/.examples.sh\ncd '{}'\nexec bash --noprofile --norc /tmp/.examples.sh </dev/null 2>&1\n",
        ws.display()
    );
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            &wrapper,
        ])
        .env("PATH", path)
        .env_remove("DEVFENCE_ROOT")
        .env_remove("DEVFENCE_LEDGER")
        .env_remove("DEVFENCE_CONFIG")
        .stdin(fs::File::open(&script_file).unwrap())
        .output()
        .expect("run unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "an example of {file} failed ({}):\n{text}",
        out.status
    );
}

#[test]
fn readme_examples_run_as_written() {
    run_examples("README.md");
}

#[test]
fn libvirt_hook_examples_run_as_written() {
    run_examples("docs/libvirt-hook.md");
}

#[test]
fn profiles_examples_run_as_written() {
    run_examples("docs/profiles.md");
}
