//! Helpers shared by the adversarial modules: run the real binary on a simulated host.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The real `devfence` binary, with no root taken from the environment.
pub fn devfence() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_devfence"));
    c.env_remove("DEVFENCE_ROOT");
    c
}

/// Runs the binary with `args` and returns what it did.
pub fn run(args: &[&str]) -> Output {
    devfence().args(args).output().expect("run devfence")
}

/// Runs the binary on the simulated host at `root` (`--root root` first).
pub fn on(root: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--root", root.to_str().unwrap()];
    all.extend_from_slice(args);
    run(&all)
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A scratch directory on tmpfs where there is one (sysfs lives in memory too).
pub fn scratch() -> tempfile::TempDir {
    let base = match std::env::var_os("TMPDIR") {
        Some(t) => PathBuf::from(t),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    tempfile::Builder::new()
        .prefix("devfence-adv-")
        .tempdir_in(base)
        .unwrap()
}

/// Generates a simulated host of `profile` and returns (guard, root).
pub fn host(profile: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = scratch();
    let root = tmp.path().join("host");
    let o = run(&[
        "sim",
        "generate",
        "--profile",
        profile,
        "--out",
        root.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "generate {profile}: {}", stderr(&o));
    (tmp, root)
}
