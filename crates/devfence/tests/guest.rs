//! `devfence state save` / `state load` on the REAL kernel (issue 16): runs
//! inside the QEMU testbed guest as root, on the stock Debian kernel, with the
//! static `devfence` binary the testbed build puts on the guest's PATH
//! (`/mnt/host/bin`). Built only with `--cfg devfence_testbed` (see
//! `crates/devfence-testbed/tests/testbed.rs`, which builds `--test guest` of
//! this package and of devfence-testbed together).
//!
//! One host is both ends of the migration: it trusts its own key. On 6.12 the
//! mtty mdevs migrate; on 6.1 they do not, and the commands must refuse with
//! "no migration support" naming the kernel and the device.
#![cfg(devfence_testbed)]
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use devfence_host::HostRoot;
use devfence_host::actuator::KernelIo;
use devfence_host::actuator::real::RealKernel;
use devfence_host::migration::{MigState, MigTarget, MigrationDevice};
use devfence_model::IommuGroupId;

const VM: &str = "4b1c5c52-9d4e-4f43-a0d6-1e0f2f3a4b5c";
const WRITES: &[(u64, u8)] = &[
    (3, 0x80),
    (0, 0x0c),
    (1, 0x00),
    (3, 0x03),
    (7, 0x5a),
    (2, 0x01),
    (0, 0x41),
    (0, 0x42),
    (4, 0x0b),
    (1, 0x05),
];

fn dv(args: &[&str]) -> Output {
    let o = Command::new("devfence")
        .env_remove("DEVFENCE_ROOT")
        .env_remove("DEVFENCE_LEDGER")
        .arg("--root")
        .arg("/")
        .args(args)
        .output()
        .expect("run devfence (on PATH from /mnt/host/bin)");
    eprintln!(
        "$ devfence {}\n  exit {:?}\n  {}\n  {}",
        args.join(" "),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    );
    o
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

fn kernel() -> RealKernel {
    RealKernel::new(HostRoot::new("/"))
}

fn mdevs() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/bus/mdev/devices")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Creates an mdev of `ty`, assigns it to `tenant` for VM; assignment scrubs by
/// re-creation, so the tenant's device is the new UUID.
fn mdev_for(n: u32, ty: &str, tenant: &str) -> String {
    let u = format!("83b8f4f2-509f-382f-3c1e-e6bfe0fa{n:04x}");
    ok(&dv(&["mdev", "create", "mtty", ty, "--uuid", &u]));
    let before = mdevs();
    ok(&dv(&["assign", &u, "--tenant", tenant, "--vm", VM]));
    mdevs()
        .into_iter()
        .find(|m| !before.contains(m))
        .unwrap_or(u)
}

/// Releases every mdev devfence holds and removes every mdev, so that the
/// guest is left as run-tests.sh set it up (no mdev) for the other binaries.
fn cleanup(held: &[&String]) {
    for m in held {
        let _ = dv(&["release", m]);
    }
    for m in mdevs() {
        let _ = kernel().write(&format!("/sys/bus/mdev/devices/{m}/remove"), b"1");
    }
    assert_eq!(mdevs(), Vec::<String>::new(), "mdevs left behind");
}

fn open(uuid: &str) -> Box<dyn MigrationDevice> {
    let g: u32 = std::fs::read_link(format!("/sys/bus/mdev/devices/{uuid}/iommu_group"))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    kernel()
        .open_migration(&MigTarget {
            name: uuid.to_owned(),
            group: IommuGroupId(g),
        })
        .unwrap_or_else(|e| panic!("open {uuid}: {e}"))
}

fn registers(uuid: &str) -> Vec<u8> {
    let d = open(uuid);
    [1u64, 3, 4, 5, 7]
        .iter()
        .map(|o| d.region_read(*o, 1).unwrap()[0])
        .collect()
}

/// The kernel-visible migration state (GET `MIG_DEVICE_STATE`), or the errno.
fn mig_state(uuid: &str) -> String {
    open(uuid)
        .state()
        .map_or_else(|e| e.name(), |s| s.name().to_owned())
}

#[test]
fn t01_state_save_and_load_through_the_kernel() {
    let series = std::env::var("TESTBED_SERIES").unwrap_or_default();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_owned();
    for (t, uid, pk) in [
        ("acme", "107:107", "0x8001"),
        ("globex", "108:108", "0x8002"),
    ] {
        ok(&dv(&[
            "tenant",
            "add",
            t,
            "--launcher",
            uid,
            "--partition",
            pk,
        ]));
    }
    ok(&dv(&["keys", "init", "--host-id", "testbed"]));
    let a = mdev_for(1, "mtty-1", "acme");
    {
        let mut d = open(&a);
        for (off, v) in WRITES {
            d.region_write(*off, &[*v]).unwrap();
        }
    }
    let want = registers(&a);
    assert_eq!(want, [0x05, 0x03, 0x0b, 0x01, 0x5a]);
    let inv = json(&dv(&["inventory", "--probe-migration", "--json"]));
    eprintln!("inventory migration: {}", inv["migration"]);

    if series == "6.1" {
        assert_eq!(inv["migration"][0]["supported"], false, "{inv}");
        let o = dv(&["state", "save", "--device", &a, "--vm", VM]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let t = text(&o);
        assert!(t.contains("no migration support"), "{t}");
        assert!(
            t.contains(&release) && t.contains(&a) && t.contains("mtty"),
            "{t}"
        );
        // load: an envelope sealed from a file (what a 6.12 host would have
        // saved) is refused at check `migration`, and not spent.
        let f = "/tmp/mtty-state.bin";
        std::fs::write(f, [0u8; 60]).unwrap();
        let v = json(&dv(&[
            "state", "seal", "--device", &a, "--vm", VM, "--in", f, "--json",
        ]));
        let env = v["path"].as_str().unwrap().to_owned();
        let o = dv(&["state", "load", &env, "--device", &a, "--vm", VM, "--json"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let v = json(&o);
        assert_eq!(v["check"], "migration", "{v}");
        let reason = v["reason"].as_str().unwrap();
        assert!(reason.contains("no migration support"), "{reason}");
        assert!(reason.contains(&release) && reason.contains(&a), "{reason}");
        ok(&dv(&["state", "inspect", &env, "--device", &a, "--vm", VM]));
        cleanup(&[&a]);
        return;
    }
    assert_eq!(
        inv["migration"][0]["flags"],
        serde_json::json!(["STOP_COPY", "P2P", "PRE_COPY"]),
        "{inv}"
    );

    // Save A, seal it.
    let v = json(&dv(&[
        "state", "save", "--device", &a, "--vm", VM, "--json",
    ]));
    assert_eq!(v["sealed"], true, "{v}");
    assert_eq!(v["source"]["bytes"], 60, "{v}");
    let env = v["path"].as_str().unwrap().to_owned();
    assert_eq!(mig_state(&a), "RUNNING");

    // Destinations: B (acme, mtty-1), C (acme, mtty-2), D (globex, mtty-1).
    let b = mdev_for(2, "mtty-1", "acme");
    let c = mdev_for(3, "mtty-2", "acme");
    let d = mdev_for(4, "mtty-1", "globex");
    let b_before = registers(&b);
    assert_ne!(b_before, want);
    let load =
        |file: &str, dev: &str| dv(&["state", "load", file, "--device", dev, "--vm", VM, "--json"]);
    let mut bytes = std::fs::read(&env).unwrap();
    let n = bytes.len();
    bytes[n - 96 - 10] ^= 0x01;
    let tampered = "/tmp/tampered.dfseal";
    std::fs::write(tampered, &bytes).unwrap();
    for (file, dev, check) in [
        (tampered, &b, "signature"),
        (env.as_str(), &c, "device"),
        (env.as_str(), &d, "tenant"),
    ] {
        let o = load(file, dev);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert_eq!(json(&o)["check"], check, "{}", text(&o));
        assert_eq!(mig_state(dev), "RUNNING", "{dev}");
    }
    assert_eq!(registers(&b), b_before, "a refused envelope changed B");

    // Admitted: B takes A's state.
    let o = load(&env, &b);
    let v = json(&o);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(v["migration"]["readback_equal"], true, "{v}");
    assert_eq!(registers(&b), want, "B does not read A's registers back");
    assert_eq!(mig_state(&b), "RUNNING");

    // Replay refused; B unchanged.
    {
        let mut db = open(&b);
        db.region_write(7, &[0x77]).unwrap();
    }
    let o = load(&env, &b);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(json(&o)["check"], "single-use");
    assert_eq!(registers(&b)[4], 0x77, "the replay reached B");
    assert_eq!(mig_state(&b), "RUNNING");

    // An admitted stream the driver refuses (wrong mtty header, another
    // scratch value): mtty answers the write EFAULT but keeps the bytes; devfence
    // stops, recovers by reset (never through RESUMING -> STOP, which would
    // apply them) and exits 2 with the envelope spent.
    let f = "/tmp/bogus-state.bin";
    let mut bogus = [0u8; 60];
    bogus[24 + 7] = 0xee;
    std::fs::write(f, bogus).unwrap();
    let v = json(&dv(&[
        "state", "seal", "--device", &b, "--vm", VM, "--in", f, "--json",
    ]));
    let bogus_env = v["path"].as_str().unwrap().to_owned();
    let o = dv(&["state", "load", &bogus_env, "--device", &b, "--vm", VM]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("EFAULT"), "{}", text(&o));
    assert_eq!(
        registers(&b)[4],
        0x77,
        "the refused stream was applied to B"
    );
    assert_eq!(mig_state(&b), "RUNNING");

    // A device in use (its VM would hold the group; here this process does):
    // save refuses, and load refuses at check `migration` without spending the
    // envelope, which then loads once the device is free.
    let v = json(&dv(&[
        "state", "save", "--device", &a, "--vm", VM, "--json",
    ]));
    let env2 = v["path"].as_str().unwrap().to_owned();
    {
        let _held = open(&b);
        let o = dv(&["state", "save", "--device", &b, "--vm", VM]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("EBUSY"), "{}", text(&o));
        let o = load(&env2, &b);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let v = json(&o);
        assert_eq!(v["check"], "migration", "{v}");
        assert!(v["reason"].as_str().unwrap().contains("EBUSY"), "{v}");
    }
    let o = load(&env2, &b);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(registers(&b), want);

    // Closing keeps what was loaded (see docs/state-envelopes.md): the state
    // survives devfence's close, so the launcher's later open sees it.
    let db = open(&b);
    assert_eq!(db.state().unwrap(), MigState::Running);
    drop(db);
    ok(&dv(&["audit", "verify"]));
    cleanup(&[&a, &b, &c, &d]);
}
