//! The systemd unit in the repository (dist/systemd/devfence.service, issue
//! 12 item 7) is one systemd accepts: `systemd-analyze verify` with no
//! warning, and it has what the agent's service behaviour relies on. When
//! systemd-analyze is missing the test installs it (testbed/libvirt/setup.sh,
//! as the libvirt test does for libvirtd); it never skips.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;

fn unit() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/systemd/devfence.service");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Installs systemd-analyze through `testbed/libvirt/setup.sh` when it is
/// missing (a fresh machine running the README's test command), once.
fn ensure_installed() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let have = std::env::var_os("PATH").is_some_and(|p| {
            std::env::split_paths(&p).any(|d| d.join("systemd-analyze").is_file())
        });
        if have {
            return;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testbed/libvirt/setup.sh");
        let st = Command::new("bash")
            .arg(&script)
            .status()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        assert!(st.success(), "{} failed: {st}", script.display());
    });
}

/// Runs `systemd-analyze verify` on `text` (its ExecStart pointed at the
/// binary under test: verify checks that the command exists); the exit
/// status and what it printed.
fn verify(text: &str) -> (bool, String) {
    ensure_installed();
    let dir = tempfile::tempdir().unwrap();
    let bin = devfence_testsupport::bin();
    let text = text.replace("/usr/bin/devfence", bin.to_str().unwrap());
    let p = dir.path().join("devfence.service");
    std::fs::write(&p, text).unwrap();
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&p)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "systemd-analyze cannot run ({e}). Hint: install the Debian package systemd \
                 (testbed/libvirt/setup.sh does)"
            )
        });
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), out)
}

#[test]
fn the_unit_verifies_without_a_warning() {
    let u = unit();
    let (ok, out) = verify(&u);
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    // The test notices a unit systemd would only half read.
    let (ok, out) = verify(&u.replace("LockPersonality=yes", "LockPersonalty=yes"));
    assert!(
        !(ok && out.trim().is_empty()),
        "a misspelt key went unnoticed"
    );
}

#[test]
fn the_unit_has_what_the_agent_relies_on() {
    let u = unit();
    let keys: Vec<&str> = u
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for want in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "LockPersonality=yes",
        "StateDirectory=devfence",
        "RuntimeDirectoryPreserve=yes",
    ] {
        assert!(keys.contains(&want), "{want} missing");
    }
    assert!(keys.iter().any(|k| k.starts_with("WatchdogSec=")));
    let families = keys
        .iter()
        .find_map(|k| k.strip_prefix("RestrictAddressFamilies="))
        .expect("RestrictAddressFamilies");
    for f in ["AF_UNIX", "AF_NETLINK"] {
        assert!(families.split_whitespace().any(|x| x == f), "{f}");
    }
    // Options that would take sysfs writes, /dev/vfio or umad away.
    for never in [
        "ProtectKernelTunables=yes",
        "PrivateDevices=yes",
        "DevicePolicy=closed",
        "ProtectClock=yes",
    ] {
        assert!(!keys.contains(&never), "{never} breaks the agent");
    }
}
