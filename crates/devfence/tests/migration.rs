//! Device state through the kernel's VFIO migration interface, end to end on the
//! simulated kernel (issue 16): two simulated `testbed` hosts (mtty as an mdev
//! parent) are the two hosts of a migration. The simulated kernel answers as
//! the real one did in the testbed (docs/testbed.md, "Migration"): mtty has
//! migration on 6.12 and none on 6.1, so each host's kernel release is set
//! accordingly. Recognisable state goes into the source mdev through its UART
//! registers (BAR0), as a guest driver would write them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use devfence_testsupport::{dv, json, ok, refused, text, trust};
use std::fs;
use std::path::{Path, PathBuf};

use devfence_host::HostRoot;
use devfence_host::migration::{MigState, MigTarget, MigrationDevice};
use devfence_host::simkernel::SimKernel;
use devfence_model::IommuGroupId;

const VM: &str = "4b1c5c52-9d4e-4f43-a0d6-1e0f2f3a4b5c";
const K612: &str = "6.12.95+deb12-amd64";
const K61: &str = "6.1.0-57-amd64";
/// UART registers written into the source (offset, value): DLAB and divisor
/// 0x000c, 8N1, scratch 0x5a, FIFO on, "AB" in the FIFO, MCR 0x0b, IER 0x05
/// (the order of the testbed's scenario: no write raises an interrupt).
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

fn scratch() -> tempfile::TempDir {
    devfence_testsupport::scratch("devfence-mig-")
}

/// A simulated `testbed` host named `id` on kernel `release`, with tenants
/// acme and globex and a host key.
fn host(tmp: &Path, id: &str, release: &str) -> PathBuf {
    let root = tmp.join(id);
    devfence_testsupport::generate("testbed", &root, &[]);
    fs::write(
        root.join("proc/sys/kernel/osrelease"),
        format!("{release}\n"),
    )
    .unwrap();
    devfence_testsupport::add_tenants(&root, 2);
    ok(&dv(&root, &["keys", "init", "--host-id", id]));
    root
}

/// Creates an mdev of `ty` and assigns it to `tenant` for the VM; assignment
/// scrubs by re-creation, so the tenant's device is the UUID returned.
fn mdev_for(root: &Path, ty: &str, tenant: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let u = format!("83b8f4f2-509f-382f-3c1e-e6bfe0fa{n:04x}");
    ok(&dv(root, &["mdev", "create", "mtty", ty, "--uuid", &u]));
    let o = dv(
        root,
        &["assign", &u, "--tenant", tenant, "--vm", VM, "--json"],
    );
    let v = json(&o);
    let s = v.to_string();
    // The device the tenant holds now: the UUID in the result that is not `u`.
    let inv = json(&dv(root, &["inventory", "--json"]));
    let mdevs: Vec<String> = inv["mdevs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["uuid"].as_str().unwrap().to_owned())
        .collect();
    mdevs
        .into_iter()
        .find(|m| s.contains(m.as_str()))
        .unwrap_or_else(|| panic!("no assigned mdev in {s}"))
}

fn sim_device(root: &Path, uuid: &str) -> (SimKernel, devfence_host::simkernel::SimMigDevice) {
    let k = SimKernel::new(HostRoot::new(root)).unwrap();
    let g = fs::read_link(root.join(format!("sys/bus/mdev/devices/{uuid}/iommu_group")))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    let d = k
        .open_migration_device(&MigTarget {
            name: uuid.to_owned(),
            group: IommuGroupId(g),
        })
        .unwrap();
    (k, d)
}

/// The UART registers that read back stored state: IER, LCR, MCR, LSR, SCR.
fn registers(root: &Path, uuid: &str) -> Vec<u8> {
    let (_k, d) = sim_device(root, uuid);
    [1u64, 3, 4, 5, 7]
        .iter()
        .map(|o| d.region_read(*o, 1).unwrap()[0])
        .collect()
}

fn calls(root: &Path, uuid: &str) -> u64 {
    let k = SimKernel::new(HostRoot::new(root)).unwrap();
    k.migration_calls(uuid.parse().unwrap())
}

fn mig_state(root: &Path, uuid: &str) -> MigState {
    let (_k, d) = sim_device(root, uuid);
    d.state().unwrap()
}

fn save(root: &Path, uuid: &str) -> (String, PathBuf) {
    let v = json(&dv(
        root,
        &["state", "save", "--device", uuid, "--vm", VM, "--json"],
    ));
    assert_eq!(v["sealed"], true, "{v}");
    assert_eq!(v["source"]["interface"], "vfio-migration-v2", "{v}");
    (
        v["id"].as_str().unwrap().to_owned(),
        PathBuf::from(v["path"].as_str().unwrap()),
    )
}

/// issue 16 items 1, 2, 5: state written into mdev A's registers on host 1 is
/// saved through the migration interface, sealed, admitted on host 2 and
/// loaded into mdev B of the same tenant, which then reads the same registers
/// back; the load read the state back and audited it.
#[test]
fn save_on_one_host_load_on_another_reads_the_same_registers_back() {
    let tmp = scratch();
    let h1 = host(tmp.path(), "h1", K612);
    let h2 = host(tmp.path(), "h2", K612);
    trust(&h1, &h2, tmp.path());
    let a = mdev_for(&h1, "mtty-1", "acme");
    {
        let (_k, mut d) = sim_device(&h1, &a);
        for (off, v) in WRITES {
            d.region_write(*off, &[*v]).unwrap();
        }
    }
    let want = registers(&h1, &a);
    assert_eq!(want, [0x05, 0x03, 0x0b, 0x01, 0x5a]);
    let (_id, env) = save(&h1, &a);
    assert_eq!(
        mig_state(&h1, &a),
        MigState::Running,
        "save returns A to RUNNING"
    );

    let b = mdev_for(&h2, "mtty-1", "acme");
    assert_ne!(registers(&h2, &b), want);
    let o = dv(
        &h2,
        &[
            "state",
            "load",
            env.to_str().unwrap(),
            "--device",
            &b,
            "--vm",
            VM,
            "--json",
        ],
    );
    let v = json(&o);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(v["loaded"], true, "{v}");
    assert_eq!(v["migration"]["readback_equal"], true, "{v}");
    assert_eq!(v["migration"]["written"], 60, "{v}");
    assert_eq!(registers(&h2, &b), want);
    assert_eq!(mig_state(&h2, &b), MigState::Running);

    let audit = ok(&dv(&h2, &["audit", "show", "--device", &b, "--json"]));
    assert!(audit.contains("state-load"), "{audit}");
    assert!(audit.contains("migration-load"), "{audit}");
    ok(&dv(&h2, &["audit", "verify"]));
}

/// issue 16 item 3 (admitted first): tampered, replayed, wrong-type and
/// wrong-tenant envelopes are refused at their check, and the destination's
/// migration interface is never called (the simulator counts the calls) — its
/// state and registers are unchanged.
#[test]
fn refused_envelopes_never_reach_the_migration_interface() {
    let tmp = scratch();
    let h1 = host(tmp.path(), "h1", K612);
    let h2 = host(tmp.path(), "h2", K612);
    trust(&h1, &h2, tmp.path());
    let a = mdev_for(&h1, "mtty-1", "acme");
    {
        let (_k, mut d) = sim_device(&h1, &a);
        for (off, v) in WRITES {
            d.region_write(*off, &[*v]).unwrap();
        }
    }
    let (_id, env) = save(&h1, &a);
    let b = mdev_for(&h2, "mtty-1", "acme");
    let wide = mdev_for(&h2, "mtty-2", "acme");
    let other = mdev_for(&h2, "mtty-1", "globex");
    let before = registers(&h2, &b);

    let load = |file: &Path, dev: &str| {
        dv(
            &h2,
            &[
                "state",
                "load",
                file.to_str().unwrap(),
                "--device",
                dev,
                "--vm",
                VM,
                "--json",
            ],
        )
    };
    // Tampered: one payload byte changed.
    let mut bytes = fs::read(&env).unwrap();
    let n = bytes.len();
    bytes[n - 96 - 10] ^= 0x01;
    let bad = tmp.path().join("tampered.dfseal");
    fs::write(&bad, &bytes).unwrap();
    let o = load(&bad, &b);
    refused(&o);
    assert_eq!(json(&o)["check"], "signature");
    // Wrong type: an mtty-2 mdev of the same tenant.
    let o = load(&env, &wide);
    refused(&o);
    assert_eq!(json(&o)["check"], "device");
    // Wrong tenant.
    let o = load(&env, &other);
    refused(&o);
    assert_eq!(json(&o)["check"], "tenant");
    for d in [&b, &wide, &other] {
        assert_eq!(
            calls(&h2, d),
            0,
            "{d}: a refused envelope reached its migration interface"
        );
    }
    // Admitted once; the replay is refused and makes no call.
    ok(&load(&env, &b));
    let after_load = calls(&h2, &b);
    assert!(after_load > 0);
    let loaded = registers(&h2, &b);
    assert_ne!(loaded, before);
    let o = load(&env, &b);
    refused(&o);
    assert_eq!(json(&o)["check"], "single-use");
    assert_eq!(
        calls(&h2, &b),
        after_load,
        "the replay reached the migration interface"
    );
    assert_eq!(registers(&h2, &b), loaded);
    assert_eq!(mig_state(&h2, &b), MigState::Running);
}

/// issue 16 item 5 (6.1): on a kernel whose mtty has no migration, save and
/// load refuse with "no migration support" naming the kernel and the device,
/// and the envelope is not spent by the refused load.
#[test]
fn a_kernel_without_mtty_migration_refuses_save_and_load() {
    let tmp = scratch();
    let old = host(tmp.path(), "old", K61);
    let a = mdev_for(&old, "mtty-1", "acme");
    let o = dv(&old, &["state", "save", "--device", &a, "--vm", VM]);
    let t = refused(&o);
    assert!(t.contains("no migration support"), "{t}");
    assert!(
        t.contains(K61) && t.contains(&a) && t.contains("mtty"),
        "{t}"
    );

    // An envelope from a 6.12 host, loaded on the 6.1 host.
    let h1 = host(tmp.path(), "h1", K612);
    trust(&h1, &old, tmp.path());
    let src = mdev_for(&h1, "mtty-1", "acme");
    let (_id, env) = save(&h1, &src);
    let o = dv(
        &old,
        &[
            "state",
            "load",
            env.to_str().unwrap(),
            "--device",
            &a,
            "--vm",
            VM,
            "--json",
        ],
    );
    refused(&o);
    let v = json(&o);
    assert_eq!(v["check"], "migration", "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("no migration support"), "{reason}");
    assert!(reason.contains(K61) && reason.contains(&a), "{reason}");
    // Not spent: inspect still finds it admissible.
    ok(&dv(
        &old,
        &[
            "state",
            "inspect",
            env.to_str().unwrap(),
            "--device",
            &a,
            "--vm",
            VM,
        ],
    ));
}

/// issue 16 item 4: the inventory shows, per device, whether its driver
/// supports migration and with which flags, as the kernel answers — supported
/// with STOP_COPY P2P PRE_COPY on 6.12, unsupported on 6.1 — and nothing when
/// not asked to probe.
#[test]
fn inventory_probes_migration_capability_from_the_kernel() {
    let tmp = scratch();
    for (release, supported, flags) in [
        (K612, true, vec!["STOP_COPY", "P2P", "PRE_COPY"]),
        (K61, false, vec![]),
    ] {
        let h = host(tmp.path(), &format!("h{}", release.len()), release);
        let u = "83b8f4f2-509f-382f-3c1e-e6bfe0fa9999";
        ok(&dv(&h, &["mdev", "create", "mtty", "mtty-1", "--uuid", u]));
        let plain = json(&dv(&h, &["inventory", "--json"]));
        assert!(plain.get("migration").is_none(), "{plain}");
        let v = json(&dv(&h, &["inventory", "--probe-migration", "--json"]));
        let m = &v["migration"];
        assert_eq!(m.as_array().map(Vec::len), Some(1), "{m}");
        assert_eq!(m[0]["device"], u);
        assert_eq!(m[0]["supported"], supported, "{release}: {m}");
        assert_eq!(m[0]["flags"], serde_json::json!(flags), "{release}: {m}");
        // Probing is not a migration: the device is left as it was.
        if supported {
            assert_eq!(m[0]["state"], "RUNNING");
            assert_eq!(mig_state(&h, u), MigState::Running);
        }
    }
}

/// issue 16 item 2 (fail closed): an admitted envelope whose stream the
/// driver refuses (here: sealed from a file with a wrong mtty header, as a
/// compromised source could) spends the envelope before anything reaches the
/// device, stops at the driver's first refusal (mtty answers `EFAULT` for the
/// header, yet would take the bytes if the writer went on), returns the device
/// to RUNNING with its registers unchanged, exits 2 and audits the failed load.
#[test]
fn a_stream_the_driver_refuses_fails_closed_and_is_audited() {
    let tmp = scratch();
    let h = host(tmp.path(), "h", K612);
    let b = mdev_for(&h, "mtty-1", "acme");
    let before = registers(&h, &b);
    let f = tmp.path().join("bogus.bin");
    let mut bogus = vec![0u8; 60];
    bogus[24 + 7] = 0xee; // another scratch register, behind a wrong header
    fs::write(&f, &bogus).unwrap();
    let v = json(&dv(
        &h,
        &[
            "state",
            "seal",
            "--device",
            &b,
            "--vm",
            VM,
            "--in",
            f.to_str().unwrap(),
            "--json",
        ],
    ));
    let env = v["path"].as_str().unwrap().to_owned();
    let o = dv(&h, &["state", "load", &env, "--device", &b, "--vm", VM]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("nonce is spent") && t.contains("EFAULT"), "{t}");
    assert_eq!(
        registers(&h, &b),
        before,
        "the refused stream reached the ports"
    );
    assert_eq!(mig_state(&h, &b), MigState::Running);
    let audit = ok(&dv(&h, &["audit", "show", "--device", &b, "--json"]));
    assert!(audit.contains("\"failed\""), "{audit}");
    // Spent: a second attempt is a replay.
    let o = dv(
        &h,
        &["state", "load", &env, "--device", &b, "--vm", VM, "--json"],
    );
    refused(&o);
    assert_eq!(json(&o)["check"], "single-use");
}
