//! The CLI end to end: simulated hosts are generated with `devfence sim generate`,
//! then read and checked by the real binary. Golden files pin the exact findings each
//! profile was built to contain (`tests/golden/`); set `DEVFENCE_REGEN=1` to rewrite
//! them after a deliberate change (never under CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use devfence_testsupport::{run, stderr, stdout};

fn scratch() -> tempfile::TempDir {
    devfence_testsupport::scratch("devfence-test-")
}

/// Generates `profile` into a fresh temp dir and returns (guard, host root).
fn host(profile: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = scratch();
    let root = tmp.path().join("host");
    devfence_testsupport::generate(profile, &root, extra);
    (tmp, root)
}

fn check_json(root: &Path, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["--root", root.to_str().unwrap(), "check", "--json"];
    args.extend_from_slice(extra);
    let o = run(&args);
    let code = o.status.code().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json output is not JSON ({e}): {}\n{}",
            stdout(&o),
            stderr(&o)
        )
    });
    (code, v)
}

/// One line per finding: `severity rule subject`.
fn finding_lines(report: &serde_json::Value) -> String {
    let mut s = String::new();
    for f in report["findings"].as_array().unwrap() {
        s.push_str(&format!(
            "{} {} {}\n",
            f["severity"].as_str().unwrap(),
            f["rule"].as_str().unwrap(),
            f["subject"].as_str().unwrap()
        ));
    }
    s
}

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("DEVFENCE_REGEN").is_some() && std::env::var_os("CI").is_none() {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, actual).unwrap();
        return;
    }
    let want = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with DEVFENCE_REGEN=1 to create it)",
            path.display()
        )
    });
    assert_eq!(actual, want, "output differs from {}", path.display());
}

mod profiles {
    use super::*;

    fn profile_golden(profile: &str) {
        let (_t, root) = host(profile, &[]);
        let (code, report) = check_json(&root, &[]);
        let lines = finding_lines(&report);
        golden(&format!("{profile}.findings"), &lines);
        // Every finding carries evidence and a hint.
        for f in report["findings"].as_array().unwrap() {
            assert!(
                !f["evidence"].as_array().unwrap().is_empty(),
                "no evidence: {f}"
            );
            assert!(!f["hint"].as_str().unwrap().is_empty(), "no hint: {f}");
        }
        let errors = report["summary"]["errors"].as_u64().unwrap();
        assert_eq!(code, if errors > 0 { 1 } else { 0 });
    }

    #[test]
    fn cx6_ib() {
        profile_golden("cx6-ib");
    }
    #[test]
    fn no_acs() {
        profile_golden("no-acs");
    }
    #[test]
    fn userspace_pf() {
        profile_golden("userspace-pf");
    }
    #[test]
    fn gpu_mdev() {
        profile_golden("gpu-mdev");
    }
    #[test]
    fn s390_ap() {
        profile_golden("s390-ap");
    }

    #[test]
    fn scale_is_clean_and_complete() {
        let (_t, root) = host("scale", &[]);
        let (code, report) = check_json(&root, &[]);
        assert_eq!(
            finding_lines(&report),
            "",
            "the scale profile plants no defect"
        );
        assert_eq!(code, 0);
        let o = run(&["--root", root.to_str().unwrap(), "inventory", "--json"]);
        assert!(o.status.success());
        let inv: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let vfs = inv["pci"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| !p["physfn"].is_null())
            .count();
        assert_eq!(vfs, 4096);
        let gpu_mdevs = inv["mdevs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["parent"] != "matrix")
            .count();
        assert_eq!(gpu_mdevs, 1024);
        assert_eq!(inv["ap"]["matrix_mdevs"].as_array().unwrap().len(), 16);
        assert_eq!(inv["ap"]["queues"].as_array().unwrap().len(), 65536);
        assert!(inv["problems"].as_array().unwrap().is_empty());
    }

    #[test]
    fn check_text_output_is_stable() {
        let (_t, root) = host("no-acs", &[]);
        let o = run(&["--root", root.to_str().unwrap(), "check"]);
        assert_eq!(o.status.code(), Some(1));
        // The tenancy path is the only part that depends on where the tree is.
        let text = stdout(&o).replace(root.to_str().unwrap(), "<root>");
        golden("no-acs.check.txt", &text);
    }
}

mod inventory {
    use super::*;

    #[test]
    fn json_has_schema_and_follows_links() {
        let (_t, root) = host("cx6-ib", &["--vfs", "5"]);
        let o = run(&["--root", root.to_str().unwrap(), "inventory", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let inv: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(inv["schema"], 1);
        let pf = inv["pci"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["bdf"] == "0000:3b:00.0")
            .unwrap();
        assert_eq!(pf["driver"], "mlx5_core");
        assert_eq!(pf["sriov"]["num_vfs"], 5);
        assert!(
            pf["sysfs_path"]
                .as_str()
                .unwrap()
                .starts_with("/sys/devices/pci")
        );
        let vf = inv["pci"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["bdf"] == "0000:3b:00.1")
            .unwrap();
        assert_eq!(vf["physfn"], "0000:3b:00.0");
        assert_eq!(vf["driver"], "vfio-pci");
    }

    #[test]
    fn table_output_names_sections() {
        let (_t, root) = host("s390-ap", &[]);
        let o = run(&["--root", root.to_str().unwrap(), "inventory"]);
        assert!(o.status.success());
        let s = stdout(&o);
        assert!(s.contains("s390 AP bus"), "{s}");
        assert!(s.contains("apmask (host adapters): 04-05"), "{s}");
        assert!(s.contains("0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01"), "{s}");
    }

    #[test]
    fn malformed_attributes_are_reported_not_fatal() {
        let (_t, root) = host("no-acs", &[]);
        let dev = fs::canonicalize(root.join("sys/bus/pci/devices/0000:06:00.0")).unwrap();
        fs::write(dev.join("uevent"), b"PCI_CLASS=20000\nPCI_ID=0xzz:10CA\n").unwrap();
        fs::write(dev.join("numa_node"), [0xff, 0xfe, b'\n']).unwrap();
        let o = run(&["--root", root.to_str().unwrap(), "inventory", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let inv: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let problems = inv["problems"].as_array().unwrap();
        let ids = problems
            .iter()
            .find(|p| p["path"].as_str().unwrap().ends_with("0000:06:00.0/uevent"))
            .unwrap_or_else(|| panic!("no problem for the ids (uevent): {problems:?}"));
        assert!(ids["value"].as_str().unwrap().contains("0xzz"));
        assert!(ids["error"].as_str().unwrap().contains("PCI_ID"), "{ids}");
        assert!(problems.iter().any(|p| {
            p["path"]
                .as_str()
                .unwrap()
                .ends_with("0000:06:00.0/numa_node")
        }));
        // The rest of the inventory is still there.
        assert!(inv["pci"].as_array().unwrap().len() >= 9);

        // The device is assigned, so check fails closed on it and names the path.
        let (code, report) = check_json(&root, &[]);
        assert_eq!(code, 1);
        let unreadable: Vec<_> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["rule"] == "INV-UNREADABLE")
            .collect();
        assert!(!unreadable.is_empty(), "{report}");
        assert!(unreadable.iter().all(|f| f["severity"] == "error"));
        assert!(
            unreadable
                .iter()
                .any(|f| f["evidence"].to_string().contains("0xzz"))
        );
    }

    #[test]
    fn missing_root_is_an_io_error() {
        let o = run(&["--root", "/nonexistent/devfence-root", "inventory"]);
        assert_eq!(o.status.code(), Some(2));
        assert!(
            stderr(&o).contains("/nonexistent/devfence-root"),
            "{}",
            stderr(&o)
        );
    }
}

mod tenancy {
    use super::*;

    #[test]
    fn unknown_tenant_is_a_usage_error_naming_the_file() {
        let (t, root) = host("no-acs", &[]);
        let f = t.path().join("bad.toml");
        fs::write(
            &f,
            "[[tenant]]\nid = \"acme\"\n[[assignment]]\ndevice = \"0000:03:00.0\"\ntenant = \"nobody\"\n",
        )
        .unwrap();
        let o = run(&[
            "--root",
            root.to_str().unwrap(),
            "check",
            "--tenancy",
            f.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2));
        let e = stderr(&o);
        assert!(e.contains("bad.toml") && e.contains("nobody"), "{e}");
    }

    #[test]
    fn unknown_device_is_a_finding() {
        let (t, root) = host("no-acs", &[]);
        let f = t.path().join("t.toml");
        fs::write(
            &f,
            "[[tenant]]\nid = \"acme\"\n[[assignment]]\ndevice = \"0000:99:00.0\"\ntenant = \"acme\"\n",
        )
        .unwrap();
        let (code, report) = check_json(&root, &["--tenancy", f.to_str().unwrap()]);
        assert_eq!(code, 1);
        let lines = finding_lines(&report);
        assert!(
            lines.contains("TENANCY-UNKNOWN-DEVICE 0000:99:00.0"),
            "{lines}"
        );
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let (t, root) = host("no-acs", &[]);
        let f = t.path().join("broken.toml");
        fs::write(&f, "[[tenant]]\nid = acme\n").unwrap();
        let o = run(&[
            "--root",
            root.to_str().unwrap(),
            "check",
            "--tenancy",
            f.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2));
        let e = stderr(&o);
        assert!(e.contains("broken.toml") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn without_tenancy_the_tenancy_rules_are_skipped_and_said_so() {
        let (_t, root) = host("no-acs", &[]);
        fs::remove_file(root.join("etc/devfence/tenancy.toml")).unwrap();
        let o = run(&["--root", root.to_str().unwrap(), "check"]);
        assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
        assert!(stdout(&o).contains("tenancy: none"));
    }
}

mod commands {
    use super::*;

    #[test]
    fn generate_refuses_a_non_empty_directory() {
        let t = scratch();
        fs::write(t.path().join("keep.txt"), "precious").unwrap();
        let o = run(&[
            "sim",
            "generate",
            "--profile",
            "no-acs",
            "--out",
            t.path().to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2));
        assert_eq!(
            fs::read_to_string(t.path().join("keep.txt")).unwrap(),
            "precious"
        );
        assert!(
            stderr(&o).to_lowercase().contains("empty"),
            "{}",
            stderr(&o)
        );
    }

    #[test]
    fn unknown_profile_lists_the_known_ones() {
        let t = scratch();
        let o = run(&[
            "sim",
            "generate",
            "--profile",
            "nope",
            "--out",
            t.path().join("x").to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains("cx6-ib"), "{}", stderr(&o));
    }

    #[test]
    fn usage_error_exits_2() {
        let o = run(&["check", "--no-such-flag"]);
        assert_eq!(o.status.code(), Some(2));
    }

    #[test]
    fn rules_lists_every_rule_of_the_issue() {
        let o = run(&["rules", "--json"]);
        assert!(o.status.success());
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ids: Vec<&str> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        for want in [
            "GRP-VIABLE",
            "GRP-ONE-TENANT",
            "GRP-NODE-OWNER",
            "PF-TRUST",
            "VF-TOKEN-KERNEL",
            "AP-HOST-GUEST",
            "AP-OVERLAP",
            "AP-GUEST-DRIFT",
            "IB-GUID-INVALID",
            "IB-GUID-DUPLICATE",
            "IB-DEFAULT-PKEY-FULL",
            "RESET-UNAVAILABLE",
        ] {
            assert!(ids.contains(&want), "{want} missing from {ids:?}");
        }
    }

    #[test]
    fn demo_runs_every_profile_and_explains_itself() {
        let t = scratch();
        let keep = t.path().join("hosts");
        let o = run(&["demo", "--keep", keep.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s = stdout(&o);
        for p in ["cx6-ib", "no-acs", "userspace-pf", "gpu-mdev", "s390-ap"] {
            assert!(s.contains(&format!("== {p}")), "{s}");
            assert!(keep.join(p).join("sys").is_dir());
        }
        for rule in ["GRP-VIABLE", "PF-TRUST", "AP-OVERLAP", "IB-GUID-DUPLICATE"] {
            assert!(s.contains(rule), "{rule} not shown: {s}");
        }
        // The acting part: the group is fixed through the simulated kernel and read back.
        assert!(s.contains("before: 1 GRP-VIABLE finding(s)"), "{s}");
        assert!(s.contains("drivers/snd_hda_intel/unbind"), "{s}");
        assert!(s.contains("after: 0 GRP-VIABLE finding(s)"), "{s}");
    }

    #[test]
    fn man_page_and_completions() {
        let o = run(&["man"]);
        assert!(o.status.success());
        assert!(stdout(&o).contains(".TH devfence"));
        let o = run(&["completions", "bash"]);
        assert!(o.status.success());
        assert!(stdout(&o).contains("devfence"));
    }

    #[test]
    fn node_mode_change_is_detected() {
        // The same host, before and after a group node is opened to the world.
        let (_t, root) = host("cx6-ib", &["--vfs", "5"]);
        let (_, before) = check_json(&root, &[]);
        assert!(!finding_lines(&before).contains("GRP-NODE-OWNER"));
        let vf_group =
            fs::read_link(root.join("sys/bus/pci/devices/0000:3b:00.1/iommu_group")).unwrap();
        let n = vf_group.file_name().unwrap().to_str().unwrap().to_string();
        let node = root.join("dev/vfio").join(&n);
        fs::set_permissions(&node, fs::Permissions::from_mode(0o666)).unwrap();
        let (code, after) = check_json(&root, &[]);
        assert_eq!(code, 1);
        assert!(
            finding_lines(&after).contains("GRP-NODE-OWNER"),
            "{}",
            finding_lines(&after)
        );
    }
}

mod acting {
    use super::*;

    fn inventory(root: &Path) -> serde_json::Value {
        let o = run(&["--root", root.to_str().unwrap(), "inventory", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn pci<'a>(inv: &'a serde_json::Value, bdf: &str) -> &'a serde_json::Value {
        inv["pci"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["bdf"] == bdf)
            .unwrap()
    }

    #[test]
    fn bind_with_group_makes_the_group_viable() {
        let (_t, root) = host("no-acs", &[]);
        let r = root.to_str().unwrap();
        let (_, before) = check_json(&root, &[]);
        assert!(finding_lines(&before).contains("GRP-VIABLE iommu_group 13"));
        // Without --with-group devfence says what is left on a host driver.
        let o = run(&["--root", r, "bind", "0000:05:00.0", "--driver", "vfio-pci"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains("0000:05:00.1 (snd_hda_intel)"),
            "{}",
            stdout(&o)
        );
        let o = run(&[
            "--root",
            r,
            "bind",
            "0000:05:00.0",
            "--driver",
            "vfio-pci",
            "--with-group",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let inv = inventory(&root);
        assert_eq!(pci(&inv, "0000:05:00.1")["driver"], "vfio-pci");
        assert_eq!(pci(&inv, "0000:05:00.1")["driver_override"], "vfio-pci");
        let (_, after) = check_json(&root, &[]);
        assert!(
            !finding_lines(&after).contains("GRP-VIABLE"),
            "{}",
            finding_lines(&after)
        );
    }

    #[test]
    fn dry_run_lists_the_writes_and_changes_nothing() {
        let (_t, root) = host("no-acs", &[]);
        let r = root.to_str().unwrap();
        let before = inventory(&root);
        let o = run(&[
            "--root",
            r,
            "bind",
            "0000:05:00.1",
            "--driver",
            "vfio-pci",
            "--dry-run",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s = stdout(&o);
        let lines: Vec<&str> = s
            .lines()
            .filter(|l| l.trim_start().starts_with("write "))
            .collect();
        assert_eq!(lines.len(), 3, "{s}");
        assert!(
            lines[0].contains("0000:05:00.1/driver_override") && lines[0].contains("vfio-pci"),
            "{s}"
        );
        assert!(
            lines[1].contains("/sys/bus/pci/drivers/snd_hda_intel/unbind"),
            "{s}"
        );
        assert!(lines[2].contains("/sys/bus/pci/drivers_probe"), "{s}");
        assert_eq!(inventory(&root), before);
    }

    #[test]
    fn vfs_are_created_with_their_own_groups_and_json_reports_it() {
        let (_t, root) = host("userspace-pf", &[]);
        let r = root.to_str().unwrap();
        let o = run(&["--root", r, "vfs", "0000:af:00.0", "--count", "2", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["kernel"], "simulated kernel");
        assert_eq!(v["dry_run"], false);
        // Changing a non-zero count: written as 0 then N, and the groups are distinct.
        let o = run(&["--root", r, "vfs", "0000:af:00.0", "--count", "3"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let inv = inventory(&root);
        let pf = pci(&inv, "0000:af:00.0");
        assert_eq!(pf["sriov"]["num_vfs"], 3);
        let groups: std::collections::BTreeSet<u64> = pf["sriov"]["vfs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vf| {
                pci(&inv, vf["bdf"].as_str().unwrap())["iommu_group"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(groups.len(), 3);
    }

    #[test]
    fn acting_on_a_plain_directory_is_refused() {
        let t = scratch();
        let o = run(&[
            "--root",
            t.path().to_str().unwrap(),
            "reset",
            "0000:05:00.0",
        ]);
        assert_eq!(o.status.code(), Some(2));
        assert!(
            stderr(&o).contains("neither the running host"),
            "{}",
            stderr(&o)
        );
    }

    #[test]
    fn bad_input_is_refused_before_anything_is_written() {
        let (_t, root) = host("no-acs", &[]);
        let r = root.to_str().unwrap();
        let before = inventory(&root);
        for (args, needle) in [
            (
                vec!["bind", "0000:99:00.0", "--driver", "vfio-pci"],
                "0000:99:00.0",
            ),
            (
                vec!["bind", "0000:05:00.1", "--driver", "no_such_driver"],
                "no_such_driver",
            ),
            (
                vec!["bind", "not-a-bdf", "--driver", "vfio-pci"],
                "not-a-bdf",
            ),
            (vec!["reset", "0000:06:00.0"], "0000:06:00.0"),
        ] {
            let mut a = vec!["--root", r];
            a.extend(args);
            let o = run(&a);
            assert_eq!(o.status.code(), Some(2), "{a:?}: {}", stdout(&o));
            let e = stderr(&o);
            assert!(e.contains(needle) && e.contains("Hint:"), "{a:?}: {e}");
        }
        assert_eq!(inventory(&root), before);
    }

    #[test]
    fn ap_mask_edit_that_takes_a_guest_queue_names_the_mdev() {
        let (_t, root) = host("s390-ap", &[]);
        let r = root.to_str().unwrap();
        let before = inventory(&root);
        // Giving adapter 06 back to the host would take queues held by both mdevs.
        let o = run(&["--root", r, "ap", "mask", "--apmask", "+6"]);
        assert_eq!(o.status.code(), Some(2));
        let e = stderr(&o);
        assert!(e.contains("0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01"), "{e}");
        assert!(e.contains("06.0010"), "{e}");
        let o = run(&["--root", r, "ap", "mask", "--apmask", "+6,x"]);
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains("\"x\""), "{}", stderr(&o));
        assert_eq!(inventory(&root), before);
        // An edit that takes nothing in use goes through and reads back.
        let o = run(&["--root", r, "ap", "mask", "--apmask", "-4"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            inventory(&root)["ap"]["apmask"],
            format!("0x04{}", "0".repeat(62))
        );
    }

    #[test]
    fn ap_assign_refuses_a_queue_of_another_mdev() {
        let (_t, root) = host("s390-ap", &[]);
        let r = root.to_str().unwrap();
        // mdev A holds 06 x {10..13,20}; assigning adapter 07 to A would take 07.0013,
        // which B holds.
        let o = run(&[
            "--root",
            r,
            "ap",
            "assign",
            "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01",
            "--adapter",
            "7",
        ]);
        assert_eq!(o.status.code(), Some(2));
        let e = stderr(&o);
        assert!(e.contains("0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0b02"), "{e}");
        // A control domain is free to assign.
        let o = run(&[
            "--root",
            r,
            "ap",
            "assign",
            "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01",
            "--control-domain",
            "0x11",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let inv = inventory(&root);
        let a = inv["ap"]["matrix_mdevs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["uuid"] == "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01")
            .unwrap();
        assert_eq!(a["control_domains"], serde_json::json!([16, 17]));
    }

    #[test]
    fn mdev_create_and_remove() {
        let (_t, root) = host("gpu-mdev", &[]);
        let r = root.to_str().unwrap();
        let u = "5d1b7a3e-0000-4000-8000-000000000001";
        let o = run(&[
            "--root",
            r,
            "mdev",
            "create",
            "0000:65:00.0",
            "nvidia-63",
            "--uuid",
            u,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let inv = inventory(&root);
        assert!(
            inv["mdevs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["uuid"] == u)
        );
        let o = run(&[
            "--root",
            r,
            "mdev",
            "create",
            "0000:65:00.0",
            "nvidia-63",
            "--uuid",
            u,
        ]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "a second create of the same UUID must fail"
        );
        let o = run(&["--root", r, "mdev", "remove", u]);
        assert!(o.status.success(), "{}", stderr(&o));
        let inv = inventory(&root);
        assert!(
            !inv["mdevs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["uuid"] == u)
        );
    }
}
