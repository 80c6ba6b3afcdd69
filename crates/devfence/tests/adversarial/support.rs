//! Helpers shared by the adversarial modules: run the real binary on a simulated host.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

pub use devfence_testsupport::{devfence, run, stderr, stdout};

/// A scratch directory on tmpfs where there is one (sysfs lives in memory too).
pub fn scratch() -> tempfile::TempDir {
    devfence_testsupport::scratch("devfence-adv-")
}

/// Generates a simulated host of `profile` and returns (guard, root).
pub fn host(profile: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = scratch();
    let root = tmp.path().join("host");
    devfence_testsupport::generate(profile, &root, &[]);
    (tmp, root)
}

/// Runs the binary on the simulated host at `root` (`--root root` first).
pub fn on(root: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--root", root.to_str().unwrap()];
    all.extend_from_slice(args);
    run(&all)
}
