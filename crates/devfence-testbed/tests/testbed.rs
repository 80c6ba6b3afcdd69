//! The real-kernel testbed, run from the ordinary test suite (`cargo test
//! --workspace`): for each guest kernel, boot the QEMU guest with the static
//! guest tests (`tests/guest.rs`), require that they all pass, and compare the
//! differential scenario's observations on the real kernel with those of the
//! simulated kernel over the `testbed` profile.
//!
//! Not skipped when QEMU is missing: `testbed/setup.sh` installs it (CI runs it
//! before the tests, so the call here is a quick no-op) and its error is this
//! test's failure.
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use devfence_host::HostRoot;
use devfence_host::sim::{GenerateOptions, Profile, generate};
use devfence_host::simkernel::SimKernel;
use devfence_testbed::{Observation, diff, parse_observations, run_scenario};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Runs a command in the workspace; its output goes to the test's output.
fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    let t = Instant::now();
    let out = cmd
        .current_dir(workspace())
        .output()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "--- {what} ({:.1}s, {})\n{text}",
        t.elapsed().as_secs_f64(),
        out.status
    );
    if out.status.success() {
        Ok(())
    } else {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.join("\n")
        ))
    }
}

/// setup.sh and the static guest tests, once for both kernels: the share directory.
fn prepared() -> &'static Result<PathBuf, String> {
    static ONCE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Quiet: one line per action it takes ("devfence testbed: installing
        // …") straight to the terminal on stderr, the details to stdout,
        // shown when it fails.
        run(
            "testbed/setup.sh",
            Command::new("bash")
                .arg("testbed/setup.sh")
                .env("TESTBED_QUIET", "1")
                .stderr(std::process::Stdio::inherit()),
        )?;
        let ws = workspace();
        let share = ws.join("target/testbed-share");
        // Its own target directory: the static, --cfg'd build must not
        // invalidate the normal one.
        let target = ws.join("target/testbed-build");
        run(
            "testbed/build-tests.sh",
            Command::new("bash")
                .arg("testbed/build-tests.sh")
                .arg(&share)
                // `guest` of both packages: the differential scenario and the
                // real-kernel tests of devfence-testbed, and devfence's own
                // (the `devfence` binary, built with them, goes to bin/).
                .args([
                    "-p",
                    "devfence-testbed",
                    "-p",
                    "devfence",
                    "--test",
                    "guest",
                ])
                .env("CARGO_TARGET_DIR", &target)
                .env("RUSTFLAGS", "--cfg devfence_testbed")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .env_remove("CARGO_BUILD_RUSTFLAGS"),
        )?;
        Ok(share)
    })
}

/// The simulated host for kernel `series`: the `testbed` profile, with the
/// series' kernel release (mtty implements migration from 6.7, so the
/// simulator answers as that kernel's mtty does).
fn simulated(series: &str) -> Vec<Observation> {
    let shm = Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let root = tmp.path().join("host");
    generate(&GenerateOptions {
        profile: Profile::Testbed,
        out: root.clone(),
        vfs: None,
        host_id: 0,
    })
    .unwrap();
    let release = match series {
        "6.12" => "6.12.95+deb12-amd64\n",
        _ => "6.1.0-57-amd64\n",
    };
    std::fs::write(root.join("proc/sys/kernel/osrelease"), release).unwrap();
    let k = SimKernel::new(HostRoot::new(&root)).unwrap();
    run_scenario(&k)
}

fn testbed(series: &str) {
    let share = match prepared() {
        Ok(s) => s.clone(),
        Err(e) => panic!("{e}"),
    };
    let logs = workspace().join("target/testbed-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join(format!("guest-{series}.log"));
    let _ = std::fs::remove_file(&log);
    let t = Instant::now();
    let booted = run(
        &format!("testbed/run.sh -k {series}"),
        Command::new("bash")
            .arg("testbed/run.sh")
            .args(["-k", series, "-t", "900", "-s"])
            .arg(&share)
            .arg("-o")
            .arg(&log)
            .arg("testbed/guest/run-tests.sh"),
    );
    println!(
        "kernel {series}: boot and guest tests took {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    if let Err(e) = booted {
        panic!(
            "the guest tests failed on kernel {series} (serial log {}):\n{e}",
            log.display()
        );
    }
    let real = parse_observations(&console).unwrap_or_else(|e| panic!("kernel {series}: {e}"));
    let sim = simulated(series);
    let d = diff(&real, &sim);
    assert!(
        d.is_empty(),
        "kernel {series}: the simulated kernel differs from the real one ({} vs {} observations):\n{d}",
        real.len(),
        sim.len()
    );
    println!(
        "kernel {series}: {} observations, real == simulated",
        real.len()
    );
}

#[test]
fn differential_and_guest_tests_on_kernel_6_1() {
    testbed("6.1");
}

#[test]
fn differential_and_guest_tests_on_kernel_6_12() {
    testbed("6.12");
}

/// The scenario on the simulator alone (fast; shows the observations).
#[test]
fn scenario_runs_on_the_simulator() {
    let obs = simulated("6.12");
    for o in &obs {
        println!("{}: {}", o.step, o.outcome);
    }
    println!("{}", devfence_testbed::observations_line(&obs));
    assert!(
        obs.iter()
            .any(|o| o.step == "actuator: mdev create" && o.outcome == "ok")
    );
}
