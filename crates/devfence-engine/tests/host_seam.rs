//! The engine touches the host only through `devfence-host` (docs/design.md §5,
//! issue 11 item 1): outside its store (the ledger file, its audit head), no
//! source file of the engine names a kernel path or opens a file itself. A
//! change to the host goes through an `Actuator`, a read-back through
//! `devfence_host::readback`.

use std::path::{Path, PathBuf};

/// The files of the engine that own files of their own: the SQLite ledger, the
/// store's trait, the audit chain's head file.
const STORE: &[&str] = &["sqlite.rs", "store.rs", "audit.rs"];

/// What names the host or the filesystem directly.
const FORBIDDEN: &[&str] = &[
    "\"/sys",
    "\"/dev",
    "\"/proc",
    "std::fs",
    "unix::fs",
    "rustix::",
    "libc::",
    "File::open",
    "File::create",
    "OpenOptions",
];

/// The actuator is built once (the default of `Engine::new`; another one is
/// handed in with `Engine::with_actuator`), never per procedure.
const ONCE: &str = "SysfsActuator::new";

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every line of the engine's code (comments left out) that names the host or
/// the filesystem, with where.
fn direct_uses(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    sources(src, &mut files);
    files.sort();
    let mut hits = Vec::new();
    let mut built = Vec::new();
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if STORE.contains(&name) {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("read source");
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            if line.contains(ONCE) {
                built.push(format!(
                    "{}:{}: {ONCE}: {}",
                    f.display(),
                    i + 1,
                    line.trim()
                ));
            }
            for pat in FORBIDDEN {
                if line.contains(pat) {
                    hits.push(format!("{}:{}: {pat}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    if built.len() > 1 {
        hits.extend(built);
    }
    hits
}

#[test]
fn the_engine_reads_and_writes_the_host_only_through_devfence_host() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let hits = direct_uses(&src);
    assert!(
        hits.is_empty(),
        "the engine touches the host itself (use devfence_host::readback or an Actuator operation):\n{}",
        hits.join("\n")
    );
}

/// The check sees what it must refuse (so an empty answer means something).
#[test]
fn the_check_sees_a_direct_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("procs.rs"),
        "fn f() { let p = format!(\"/sys/bus/pci/devices/{b}/driver\"); std::fs::remove_file(p); }\n// \"/sys in a comment\nfn g() { SysfsActuator::new(io); }\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("sqlite.rs"),
        "fn g() { std::fs::remove_file(x); }\n",
    )
    .expect("write");
    let hits = direct_uses(dir.path());
    assert_eq!(hits.len(), 2, "{hits:#?}");
    std::fs::write(
        dir.path().join("procs.rs"),
        "fn g() { SysfsActuator::new(io); }\nfn h() { SysfsActuator::new(io); }\n",
    )
    .expect("write");
    let hits = direct_uses(dir.path());
    assert_eq!(hits.len(), 2, "built twice: {hits:#?}");
}
