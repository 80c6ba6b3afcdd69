//! Adversarial tests: hook.
//!
//! The libvirt hook is the last word before a guest gets a device: it must see
//! the device as the gates left it (issue 18 item 5), admit a domain's devices
//! all together or not at all and honour reservations by VM UUID (item 9), and
//! know whose domain it is (item 13). The acting commands must not change a
//! device devfence holds behind its back (item 5a).

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};

#[allow(unused_imports)]
use super::support::*;

const UUID: &str = "8f2c6a1e-4b7d-4e0a-9c3f-2d1b5e6a7c80";

/// A lab host with tenants acme (launcher 107, P_Key 0x8001) and globex (108, 0x8002).
fn lab() -> (tempfile::TempDir, std::path::PathBuf) {
    let (g, root) = host("lab");
    for (t, uid, p) in [
        ("acme", "107:107", "0x8001"),
        ("globex", "108:108", "0x8002"),
    ] {
        let o = on(
            &root,
            &["tenant", "add", t, "--launcher", uid, "--partition", p],
        );
        assert!(o.status.success(), "tenant add {t}: {}", stderr(&o));
    }
    (g, root)
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

fn assign(root: &Path, dev: &str, tenant: &str, vm: Option<&str>) {
    let mut args = vec!["assign", dev, "--tenant", tenant, "--gate-timeout", "5"];
    if let Some(v) = vm {
        args.extend(["--vm", v]);
    }
    ok(&on(root, &args), &format!("assign {dev}"));
}

/// The ledger state of `dev` as `status --json` names it ("ready", "active", …),
/// with its tenant and VM.
fn state(root: &Path, dev: &str) -> (String, Option<String>, Option<String>) {
    let o = on(root, &["status", "--json"]);
    ok(&o, "status");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let d = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == dev)
        .unwrap_or_else(|| panic!("{dev} not in the ledger: {v}"));
    let s = &d["state"];
    let text = |k: &str| s[k].as_str().map(str::to_owned);
    (text("state").unwrap(), text("tenant"), text("vm"))
}

/// `<hostdev>` of a PCI function, by BDF text `0000:bb:ss.f`.
fn hostdev(bdf: &str) -> String {
    let (dom, rest) = bdf.split_at(4);
    let bus = &rest[1..3];
    let slot = &rest[4..6];
    let func = &rest[7..8];
    format!(
        "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x{dom}' \
         bus='0x{bus}' slot='0x{slot}' function='0x{func}'/></source></hostdev>"
    )
}

/// A domain document: name, optional uuid, optional devfence tenant, devices.
fn domain(name: &str, uuid: Option<&str>, tenant: Option<&str>, devices: &str) -> String {
    let uuid = uuid.map_or(String::new(), |u| format!("<uuid>{u}</uuid>"));
    let meta = tenant.map_or(String::new(), |t| {
        format!(
            "<metadata><devfence:tenant xmlns:devfence='https://devfence.dev/xmlns/libvirt/1' \
             id='{t}'/></metadata>"
        )
    });
    format!(
        "<domain type='kvm'><name>{name}</name>{uuid}{meta}<devices>{devices}</devices></domain>"
    )
}

/// Calls the hook as libvirt does, with the domain XML on stdin.
fn hook(root: &Path, name: &str, op: &str, subop: &str, xml: &str) -> Output {
    hook_with(root, &[], name, op, subop, xml)
}

fn hook_with(root: &Path, pre: &[&str], name: &str, op: &str, subop: &str, xml: &str) -> Output {
    let mut c = devfence();
    c.arg("--root").arg(root).args(pre);
    c.args(["hook", "qemu", name, op, subop, "-"]);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A hook that decides without the XML may exit before reading it
    // (libvirt ignores the closed pipe too).
    match child.stdin.take().unwrap().write_all(xml.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.unwrap(),
    }
    child.wait_with_output().unwrap()
}

fn refused(o: &Output, what: &str) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: expected a refusal (exit 1)\nstdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    let e = stderr(o);
    assert_eq!(e.trim_end().lines().count(), 1, "one line for libvirt: {e}");
    e
}

// ---------------------------------------------------------------------------
// Item 5a: acting commands refuse a device the ledger holds.

/// issue 18 item 5: `vfs`, `bind`, `unbind` and `reset` refuse a device the ledger
/// holds (or a PF whose VFs it holds), name the holder and hint at `--force`; the
/// device is untouched.
#[test]
fn acting_commands_refuse_a_held_device() {
    let (_g, root) = lab();
    assign(&root, "0000:3b:00.1", "acme", Some("web1"));
    let cases: [&[&str]; 5] = [
        &["vfs", "0000:3b:00.0", "--count", "0"],
        &["bind", "0000:3b:00.1", "--driver", "mlx5_core"],
        &["unbind", "0000:3b:00.1"],
        &["reset", "0000:3b:00.1"],
        &["vfs", "0000:3b:00.0", "--count", "2"],
    ];
    for args in cases {
        let o = on(&root, args);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{args:?} must be refused (exit 1, a refusal): {}",
            stdout(&o)
        );
        let e = stderr(&o);
        assert!(
            e.contains("0000:3b:00.1"),
            "{args:?} names the held device: {e}"
        );
        assert!(e.contains("acme"), "{args:?} names the holder: {e}");
        assert!(
            e.contains("Hint:") && e.contains("--force"),
            "{args:?} hints: {e}"
        );
    }
    let inv = stdout(&on(&root, &["inventory", "--json"]));
    assert!(inv.contains("0000:3b:00.4"), "the VFs are still there");
    assert_eq!(state(&root, "0000:3b:00.1").0, "ready");
    // A device nobody holds is not affected.
    ok(&on(&root, &["reset", "0000:3b:00.2"]), "reset a free VF");
    // A dry run shows what would be done and is refused the same way.
    let o = on(&root, &["unbind", "0000:3b:00.1", "--dry-run"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
}

/// issue 18 item 5: `--force` acts on a held device, and the audit chain records
/// who forced what on whose device.
#[test]
fn force_acts_and_is_audited() {
    let (_g, root) = lab();
    assign(&root, "0000:3b:00.1", "acme", Some("web1"));
    ok(
        &on(&root, &["vfs", "0000:3b:00.0", "--count", "0", "--force"]),
        "vfs --force",
    );
    let a = stdout(&on(&root, &["audit", "show", "--device", "0000:3b:00.1"]));
    assert!(
        a.contains("force") && a.contains("vfs"),
        "the forced action is in the audit chain: {a}"
    );
    ok(&on(&root, &["audit", "verify"]), "chain intact");
}

/// issue 18 item 5: `mdev remove`, `ap assign/unassign` of a held matrix mdev and
/// an AP mask edit that would give the host a held APQN are refused unless
/// `--force`.
#[test]
fn mdev_and_ap_commands_refuse_held_matrix() {
    let (_g, root) = host("s390-ap");
    ok(
        &on(&root, &["tenant", "add", "acme", "--launcher", "107:107"]),
        "tenant add",
    );
    // The profile plants APQN 06.0013 in two mdevs (an AP-OVERLAP finding); the
    // assignment re-creates mdev A with A's matrix, which the kernel refuses while
    // B holds 06.0013: free it in B first (B is not held).
    ok(
        &on(
            &root,
            &[
                "ap",
                "unassign",
                "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0b02",
                "--domain",
                "0x13",
            ],
        ),
        "ap unassign the shared domain from B",
    );
    let o = on(
        &root,
        &[
            "assign",
            "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01",
            "--tenant",
            "acme",
            "--gate-timeout",
            "5",
        ],
    );
    ok(&o, "assign matrix mdev");
    // The tenant got a fresh mdev: find it.
    let st: serde_json::Value =
        serde_json::from_slice(&on(&root, &["status", "--json"]).stdout).unwrap();
    let held = st["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["state"]["state"] == "ready")
        .expect("a ready mdev")["device"]
        .as_str()
        .unwrap()
        .to_owned();
    // Give the held mdev an APQN (06.0011), forced and audited.
    ok(
        &on(
            &root,
            &[
                "ap",
                "assign",
                &held,
                "--adapter",
                "6",
                "--domain",
                "17",
                "--force",
            ],
        ),
        "ap assign --force",
    );
    let cases: Vec<Vec<&str>> = vec![
        vec!["mdev", "remove", &held],
        vec!["ap", "unassign", &held, "--adapter", "6"],
        vec!["ap", "assign", &held, "--domain", "0x40"],
        vec!["ap", "mask", "--apmask", "+6"],
    ];
    for args in &cases {
        let o = on(&root, args);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{args:?} must be refused (exit 1, a refusal): {}",
            stdout(&o)
        );
        let e = stderr(&o);
        assert!(e.contains("acme") && e.contains("--force"), "{args:?}: {e}");
    }
    // A mask edit that gives the host no held APQN is not refused: another
    // adapter, or taking the held domain from the host (clearing its bit).
    ok(&on(&root, &["ap", "mask", "--apmask", "+9"]), "apmask +9");
    ok(&on(&root, &["ap", "mask", "--aqmask", "-17"]), "aqmask -17");
    let o = on(&root, &["ap", "mask", "--aqmask", "+17"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "aqmask +17 gives 06.0011 back to the host"
    );
    let a = stdout(&on(&root, &["audit", "show", "--tenant", "acme"]));
    assert!(a.contains("force"), "{a}");
}

// ---------------------------------------------------------------------------
// Item 5b: the hook re-verifies at prepare begin.

/// issue 18 item 5: a VF destroyed and re-created under devfence (`vfs --force`
/// 0 then 4: no driver, no group, GUID 0) is refused by the hook, which names
/// what differs and quarantines the device.
#[test]
fn hook_refuses_a_device_changed_since_ready_and_quarantines_it() {
    let (_g, root) = lab();
    assign(&root, "0000:3b:00.1", "acme", Some("web1"));
    ok(
        &on(&root, &["vfs", "0000:3b:00.0", "--count", "0", "--force"]),
        "vfs 0",
    );
    ok(
        &on(&root, &["vfs", "0000:3b:00.0", "--count", "4", "--force"]),
        "vfs 4",
    );
    let xml = domain("web1", None, Some("acme"), &hostdev("0000:3b:00.1"));
    let e = refused(&hook(&root, "web1", "prepare", "begin", &xml), "hook");
    assert!(e.contains("0000:3b:00.1") && e.contains("driver"), "{e}");
    assert!(e.contains("Hint:"), "{e}");
    assert_eq!(state(&root, "0000:3b:00.1").0, "quarantined");
}

/// issue 18 item 5: a driver change alone (bound back to the host driver with
/// `--force`) is caught too.
#[test]
fn hook_refuses_a_device_rebound_since_ready() {
    let (_g, root) = lab();
    assign(&root, "0000:5e:10.0", "acme", None);
    ok(
        &on(
            &root,
            &["bind", "0000:5e:10.0", "--driver", "igb", "--force"],
        ),
        "bind --force",
    );
    let xml = domain("web1", None, Some("acme"), &hostdev("0000:5e:10.0"));
    let e = refused(&hook(&root, "web1", "prepare", "begin", &xml), "hook");
    assert!(e.contains("driver is igb, not vfio-pci"), "{e}");
    assert_eq!(state(&root, "0000:5e:10.0").0, "quarantined");
}

// ---------------------------------------------------------------------------
// Item 9: all or nothing, VM UUIDs, network interfaces.

/// issue 18 item 9: a device reserved with `--vm <uuid>` admits the domain whose
/// `<uuid>` that is, and its release end drains it.
#[test]
fn hook_admits_the_domain_whose_uuid_holds_the_reservation() {
    let (_g, root) = lab();
    assign(&root, "0000:5e:10.0", "acme", Some(UUID));
    let xml = domain("web1", Some(UUID), None, &hostdev("0000:5e:10.0"));
    ok(
        &hook(&root, "web1", "prepare", "begin", &xml),
        "prepare begin",
    );
    assert_eq!(state(&root, "0000:5e:10.0").0, "active");
    ok(&hook(&root, "web1", "release", "end", &xml), "release end");
    assert_eq!(state(&root, "0000:5e:10.0").0, "free");
}

/// issue 18 item 9: a domain with two devices either gets both or neither; the
/// first is not left Active when the second is refused.
#[test]
fn hook_is_all_or_nothing() {
    let (_g, root) = lab();
    assign(&root, "0000:5e:10.0", "acme", None);
    assign(&root, "0000:5e:10.2", "acme", Some(UUID));
    // Both Ready for acme, the second reserved for this domain's UUID: both move.
    let devs = format!("{}{}", hostdev("0000:5e:10.0"), hostdev("0000:5e:10.2"));
    let xml = domain("web1", Some(UUID), Some("acme"), &devs);
    ok(
        &hook(&root, "web1", "prepare", "begin", &xml),
        "prepare begin",
    );
    assert_eq!(state(&root, "0000:5e:10.0").0, "active");
    assert_eq!(state(&root, "0000:5e:10.2").0, "active");
    ok(&hook(&root, "web1", "release", "end", &xml), "release end");

    // The second changed under devfence: neither moves.
    assign(&root, "0000:5e:10.0", "acme", None);
    assign(&root, "0000:5e:10.2", "acme", None);
    ok(
        &on(&root, &["unbind", "0000:5e:10.2", "--force"]),
        "unbind --force",
    );
    let xml = domain("web1", None, Some("acme"), &devs);
    let e = refused(&hook(&root, "web1", "prepare", "begin", &xml), "hook");
    assert!(e.contains("0000:5e:10.2"), "{e}");
    assert_eq!(
        state(&root, "0000:5e:10.0").0,
        "ready",
        "first not left Active"
    );
    assert_eq!(state(&root, "0000:5e:10.2").0, "quarantined");
}

/// issue 18 item 9: a network-pool interface whose `<actual type='hostdev'>`
/// names a VF is judged like a `<hostdev>`: another tenant's VF is refused.
#[test]
fn hook_judges_network_pool_interfaces_like_hostdevs() {
    let (_g, root) = lab();
    assign(&root, "0000:5e:10.0", "globex", None);
    let iface = "<interface type='network'><mac address='52:54:00:6d:90:02'/>\
         <source network='vf-pool'/><actual type='hostdev' managed='yes'>\
         <driver name='vfio'/><source><address type='pci' domain='0x0000' bus='0x5e' \
         slot='0x10' function='0x0'/></source></actual><model type='virtio'/></interface>";
    let xml = domain("web1", None, Some("acme"), iface);
    let e = refused(&hook(&root, "web1", "prepare", "begin", &xml), "hook");
    assert!(e.contains("0000:5e:10.0") && e.contains("globex"), "{e}");
    assert_eq!(state(&root, "0000:5e:10.0").0, "ready");
    // An unmanaged VF behind a network pool is refused too.
    let iface2 = iface.replace("function='0x0'", "function='0x2'");
    let xml = domain("web1", None, Some("acme"), &iface2);
    let e = refused(&hook(&root, "web1", "prepare", "begin", &xml), "hook");
    assert!(e.contains("0000:5e:10.2"), "{e}");
}

// ---------------------------------------------------------------------------
// Item 13: the hook knows whose domain it is.

/// issue 18 item 13: a domain that names no tenant and is not the VM a device is
/// reserved for is refused, with a hint to name its tenant; naming it admits.
#[test]
fn hook_refuses_an_unidentified_domain() {
    let (_g, root) = lab();
    assign(&root, "0000:5e:10.0", "globex", None);
    let xml = domain("acme-web", None, None, &hostdev("0000:5e:10.0"));
    let e = refused(&hook(&root, "acme-web", "prepare", "begin", &xml), "hook");
    assert!(e.contains("devfence:tenant") && e.contains("Hint:"), "{e}");
    assert_eq!(state(&root, "0000:5e:10.0").0, "ready");
    let xml = domain("acme-web", None, Some("globex"), &hostdev("0000:5e:10.0"));
    ok(
        &hook(&root, "acme-web", "prepare", "begin", &xml),
        "named tenant",
    );
    assert_eq!(state(&root, "0000:5e:10.0").0, "active");
}

/// issue 18 item 13: the VM a device is reserved for identifies its domain.
#[test]
fn hook_admits_the_reserved_vm_without_metadata() {
    let (_g, root) = lab();
    assign(&root, "0000:5e:10.0", "globex", Some("db1"));
    let xml = domain("db1", None, None, &hostdev("0000:5e:10.0"));
    ok(&hook(&root, "db1", "prepare", "begin", &xml), "reserved vm");
}

/// issue 18 item 13: `[hook] allow_unidentified_single_tenant = true` restores
/// the old behaviour on a host with one tenant — and only there.
#[test]
fn single_tenant_switch_admits_unidentified_domains_only_with_one_tenant() {
    let (_g, root) = host("lab");
    ok(
        &on(
            &root,
            &[
                "tenant",
                "add",
                "acme",
                "--launcher",
                "107:107",
                "--partition",
                "0x8001",
            ],
        ),
        "tenant add",
    );
    assign(&root, "0000:5e:10.0", "acme", None);
    let cfg = root.join("etc/devfence/devfence.toml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(&cfg, "[hook]\nallow_unidentified_single_tenant = true\n").unwrap();
    let xml = domain("web1", None, None, &hostdev("0000:5e:10.0"));
    ok(
        &hook(&root, "web1", "prepare", "begin", &xml),
        "single tenant",
    );
    ok(&hook(&root, "web1", "release", "end", &xml), "release");
    // A second tenant: the switch no longer applies.
    ok(
        &on(
            &root,
            &[
                "tenant",
                "add",
                "globex",
                "--launcher",
                "108:108",
                "--partition",
                "0x8002",
            ],
        ),
        "tenant add",
    );
    assign(&root, "0000:5e:10.0", "acme", None);
    let e = refused(
        &hook(&root, "web1", "prepare", "begin", &xml),
        "two tenants",
    );
    assert!(
        e.contains("single-tenant") || e.contains("one tenant"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Item 12 (part): --gate-timeout.

/// issue 18 item 12: `--gate-timeout 0` is refused with a hint whose range does
/// not include 0.
#[test]
fn gate_timeout_zero_hint_excludes_zero() {
    let (_g, root) = lab();
    for t in ["0", "-1", "3601", "NaN"] {
        let flag = format!("--gate-timeout={t}");
        let o = on(
            &root,
            &["assign", "0000:5e:10.0", "--tenant", "acme", &flag],
        );
        assert_eq!(o.status.code(), Some(2), "{t}");
        let e = stderr(&o);
        assert!(e.contains("Hint:"), "{e}");
        assert!(
            !e.contains("between 0 and"),
            "the hint must not offer 0: {e}"
        );
        assert!(
            e.contains("more than 0") || e.contains("greater than 0"),
            "{e}"
        );
    }
    ok(
        &on(
            &root,
            &[
                "assign",
                "0000:5e:10.0",
                "--tenant",
                "acme",
                "--gate-timeout",
                "0.5",
            ],
        ),
        "0.5 s",
    );
}

/// issue 18 item 5: binding a companion of a held device's IOMMU group to a host
/// driver is refused (the group's isolation is the held device's); forced, the
/// hook finds the group no longer viable and quarantines the device.
#[test]
fn group_companion_is_guarded_and_reverified() {
    let (_g, root) = host("no-acs");
    ok(
        &on(&root, &["tenant", "add", "acme", "--launcher", "107:107"]),
        "tenant add",
    );
    assign(&root, "0000:03:00.0", "acme", Some("web1"));
    let o = on(
        &root,
        &["bind", "0000:04:00.0", "--driver", "snd_hda_intel"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("in IOMMU group 12 with 0000:04:00.0"),
        "{}",
        stderr(&o)
    );
    ok(
        &on(
            &root,
            &[
                "bind",
                "0000:04:00.0",
                "--driver",
                "snd_hda_intel",
                "--force",
            ],
        ),
        "bind --force",
    );
    let xml = domain("web1", None, Some("acme"), &hostdev("0000:03:00.0"));
    let e = refused(&hook(&root, "web1", "prepare", "begin", &xml), "hook");
    assert!(
        e.contains("0000:04:00.0 is on snd_hda_intel") && e.contains("GRP-VIABLE"),
        "{e}"
    );
    assert_eq!(state(&root, "0000:03:00.0").0, "quarantined");
}
