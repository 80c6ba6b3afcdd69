//! The actuator over the recording fake: for every operation, the exact ordered
//! writes, the read-back, the rollback writes on failure, and the refusals that
//! write nothing.

use super::*;
use crate::actuator::recording::{IoOp, RecordingIo, ScriptState};

const DEV: &str = "0000:3b:00.2";
const PF: &str = "0000:3b:00.0";

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

fn d(b: &str) -> String {
    format!("/sys/bus/pci/devices/{b}")
}

fn w(path: impl Into<String>, v: &str) -> IoOp {
    IoOp::write(path, v)
}

/// A tiny model of the PCI core for one function: `driver_override` echoes,
/// `drivers/<d>/unbind` drops the driver link, `drivers_probe` binds the
/// override (if loaded) or the native driver when there is no override,
/// `drivers/<d>/bind` binds `d`.
fn pci_host(bdf_s: &str, driver: Option<&str>, native: &'static str) -> RecordingIo<'static> {
    let dv = d(bdf_s);
    let mut io = RecordingIo::new()
        .file(&format!("{dv}/driver_override"), "(null)\n")
        .file(&format!("{dv}/vendor"), "0x15b3\n")
        .echo(&format!("{dv}/driver_override"));
    for drv in ["vfio-pci", "mlx5_core", "pci-stub"] {
        io = io.dir(&format!("/sys/bus/pci/drivers/{drv}"));
        let link = format!("{dv}/driver");
        io = io.on_write(&format!("/sys/bus/pci/drivers/{drv}/unbind"), {
            let link = link.clone();
            move |st: &mut ScriptState, _| {
                st.remove(&link);
                Ok(())
            }
        });
        io = io.on_write(&format!("/sys/bus/pci/drivers/{drv}/bind"), {
            move |st: &mut ScriptState, _| {
                st.set_link(&link, &format!("../../../../bus/pci/drivers/{drv}"));
                Ok(())
            }
        });
    }
    if let Some(drv) = driver {
        io = io.link(
            &format!("{dv}/driver"),
            &format!("../../../../bus/pci/drivers/{drv}"),
        );
    }
    let ov = format!("{dv}/driver_override");
    let link = format!("{dv}/driver");
    io.on_write(PROBE, move |st, _| {
        let o = String::from_utf8_lossy(st.file(&ov).unwrap_or(b"(null)\n")).into_owned();
        let o = o.trim_end();
        let target = if o == "(null)" || o.is_empty() {
            native
        } else {
            o
        };
        if ["vfio-pci", "mlx5_core", "pci-stub"].contains(&target) {
            st.set_link(&link, &format!("../../../../bus/pci/drivers/{target}"));
        }
        Ok(())
    })
}

fn driver(io: &RecordingIo<'_>, b: &str) -> Option<String> {
    io.read_link(&format!("{}/driver", d(b)))
        .ok()
        .map(|t| basename(&t).to_string())
}

// ---------------------------------------------------------------- bind

#[test]
fn bind_writes_override_unbind_probe_in_order_and_reads_back() {
    let a = SysfsActuator::new(pci_host(DEV, Some("mlx5_core"), "mlx5_core"));
    a.bind(bdf(DEV), "vfio-pci").unwrap();
    assert_eq!(
        a.io().ops(),
        vec![
            w(format!("{}/driver_override", d(DEV)), "vfio-pci"),
            w("/sys/bus/pci/drivers/mlx5_core/unbind", DEV),
            w(PROBE, DEV),
        ]
    );
    assert_eq!(driver(a.io(), DEV).as_deref(), Some("vfio-pci"));
    assert_eq!(
        a.io().op_lines()[0],
        r#"write /sys/bus/pci/devices/0000:3b:00.2/driver_override "vfio-pci""#
    );
}

#[test]
fn bind_of_an_unbound_function_skips_the_unbind() {
    let a = SysfsActuator::new(pci_host(DEV, None, "mlx5_core"));
    a.bind(bdf(DEV), "vfio-pci").unwrap();
    assert_eq!(
        a.io().ops(),
        vec![
            w(format!("{}/driver_override", d(DEV)), "vfio-pci"),
            w(PROBE, DEV),
        ]
    );
}

#[test]
fn bind_to_the_current_driver_writes_nothing() {
    let a = SysfsActuator::new(pci_host(DEV, Some("vfio-pci"), "mlx5_core"));
    a.bind(bdf(DEV), "vfio-pci").unwrap();
    assert!(a.io().ops().is_empty());
}

#[test]
fn bind_refuses_a_bdf_that_does_not_exist() {
    let a = SysfsActuator::new(pci_host(DEV, Some("mlx5_core"), "mlx5_core"));
    let e = a.bind(bdf("0000:99:00.0"), "vfio-pci").unwrap_err();
    assert!(a.io().ops().is_empty());
    assert!(
        e.reason.contains("no such PCI function 0000:99:00.0"),
        "{e}"
    );
    assert_eq!(e.path.as_deref(), Some("/sys/bus/pci/devices/0000:99:00.0"));
    assert!(e.hint.contains("devfence inventory"), "{e}");
    assert!(
        e.to_string()
            .starts_with("Cannot bind 0000:99:00.0 to vfio-pci: ")
    );
}

#[test]
fn bind_refuses_a_driver_that_is_not_loaded() {
    let a = SysfsActuator::new(pci_host(DEV, Some("mlx5_core"), "mlx5_core"));
    let e = a.bind(bdf(DEV), "nvme").unwrap_err();
    assert!(a.io().ops().is_empty());
    assert!(e.reason.contains("driver nvme is not loaded"), "{e}");
    assert_eq!(e.path.as_deref(), Some("/sys/bus/pci/drivers/nvme"));
    assert!(e.hint.contains("modprobe nvme"), "{e}");
}

#[test]
fn bind_refuses_a_driver_name_with_a_path_in_it() {
    let a = SysfsActuator::new(pci_host(DEV, Some("mlx5_core"), "mlx5_core"));
    for bad in ["../vfio-pci", "", "vfio pci", ".."] {
        let e = a.bind(bdf(DEV), bad).unwrap_err();
        assert!(e.reason.contains("not a valid driver name"), "{e}");
    }
    assert!(a.io().ops().is_empty());
}

#[test]
fn bind_of_a_device_in_use_restores_the_override() {
    // EBUSY on unbind: nothing was unbound, only the override is restored.
    let io = pci_host(DEV, Some("mlx5_core"), "mlx5_core")
        .fail_write("/sys/bus/pci/drivers/mlx5_core/unbind", Errno::EBUSY);
    let a = SysfsActuator::new(io);
    let e = a.bind(bdf(DEV), "vfio-pci").unwrap_err();
    assert_eq!(e.errno, Some(Errno::EBUSY));
    assert_eq!(
        e.path.as_deref(),
        Some("/sys/bus/pci/drivers/mlx5_core/unbind")
    );
    assert!(e.hint.contains("in use"), "{e}");
    assert_eq!(e.rollback_failed, None);
    let ov = format!("{}/driver_override", d(DEV));
    assert_eq!(
        a.io().ops(),
        vec![
            w(&ov, "vfio-pci"),
            w("/sys/bus/pci/drivers/mlx5_core/unbind", DEV),
            w(&ov, "\n"),
        ]
    );
    assert_eq!(a.io().read(&ov).unwrap(), b"\n");
    assert_eq!(driver(a.io(), DEV).as_deref(), Some("mlx5_core"));
}

#[test]
fn bind_with_a_failing_probe_rebinds_the_old_driver() {
    let io = pci_host(DEV, Some("mlx5_core"), "mlx5_core").fail_write(PROBE, Errno::EBUSY);
    let a = SysfsActuator::new(io);
    let e = a.bind(bdf(DEV), "vfio-pci").unwrap_err();
    assert_eq!(e.errno, Some(Errno::EBUSY));
    assert_eq!(e.path.as_deref(), Some(PROBE));
    assert_eq!(e.rollback_failed, None, "{e}");
    let ov = format!("{}/driver_override", d(DEV));
    assert_eq!(
        a.io().ops(),
        vec![
            w(&ov, "vfio-pci"),
            w("/sys/bus/pci/drivers/mlx5_core/unbind", DEV),
            w(PROBE, DEV),
            w(&ov, "\n"),
            w("/sys/bus/pci/drivers/mlx5_core/bind", DEV),
        ]
    );
    assert_eq!(driver(a.io(), DEV).as_deref(), Some("mlx5_core"));
}

#[test]
fn bind_read_back_failure_rolls_back() {
    // The probe "succeeds" but nothing claims the function.
    let io = pci_host(DEV, Some("mlx5_core"), "mlx5_core");
    let io = io.dir("/sys/bus/pci/drivers/vfio-pci-nomatch");
    let a = SysfsActuator::new(io);
    let e = a.bind(bdf(DEV), "vfio-pci-nomatch").unwrap_err();
    assert!(e.reason.contains("did not claim it"), "{e}");
    assert_eq!(e.path, Some(format!("{}/driver", d(DEV))));
    let ov = format!("{}/driver_override", d(DEV));
    assert_eq!(
        a.io().ops(),
        vec![
            w(&ov, "vfio-pci-nomatch"),
            w("/sys/bus/pci/drivers/mlx5_core/unbind", DEV),
            w(PROBE, DEV),
            w(&ov, "\n"),
            w("/sys/bus/pci/drivers/mlx5_core/bind", DEV),
        ]
    );
    assert_eq!(driver(a.io(), DEV).as_deref(), Some("mlx5_core"));
}

#[test]
fn bind_restores_a_previous_override_value() {
    let io = pci_host(DEV, Some("pci-stub"), "mlx5_core")
        .file(&format!("{}/driver_override", d(DEV)), "pci-stub\n")
        .fail_write(PROBE, Errno::ENODEV);
    let a = SysfsActuator::new(io);
    let e = a.bind(bdf(DEV), "vfio-pci").unwrap_err();
    assert_eq!(e.errno, Some(Errno::ENODEV));
    let ops = a.io().ops();
    assert_eq!(ops[3], w(format!("{}/driver_override", d(DEV)), "pci-stub"));
    assert_eq!(ops[4], w("/sys/bus/pci/drivers/pci-stub/bind", DEV));
}

#[test]
fn bind_reports_a_failed_rollback() {
    let ov = format!("{}/driver_override", d(DEV));
    let mut n = 0;
    let io = pci_host(DEV, Some("mlx5_core"), "mlx5_core")
        .fail_write(PROBE, Errno::EBUSY)
        .fail_write("/sys/bus/pci/drivers/mlx5_core/bind", Errno::ENODEV)
        .on_write(&ov, move |_, _| {
            n += 1;
            if n > 1 { Err(Errno::EIO) } else { Ok(()) }
        });
    let a = SysfsActuator::new(io);
    let e = a.bind(bdf(DEV), "vfio-pci").unwrap_err();
    let r = e.rollback_failed.clone().unwrap();
    assert!(r.contains("driver_override") && r.contains("EIO"), "{r}");
    assert!(
        r.contains("binding it back to mlx5_core") && r.contains("ENODEV"),
        "{r}"
    );
    assert!(e.to_string().contains("Undoing it failed too"), "{e}");
}

// ---------------------------------------------------------------- unbind

#[test]
fn unbind_writes_the_driver_unbind_and_reads_back() {
    let a = SysfsActuator::new(pci_host(DEV, Some("vfio-pci"), "mlx5_core"));
    a.unbind(bdf(DEV)).unwrap();
    assert_eq!(
        a.io().ops(),
        vec![w("/sys/bus/pci/drivers/vfio-pci/unbind", DEV)]
    );
    assert_eq!(driver(a.io(), DEV), None);
}

#[test]
fn unbind_of_an_unbound_function_writes_nothing() {
    let a = SysfsActuator::new(pci_host(DEV, None, "mlx5_core"));
    a.unbind(bdf(DEV)).unwrap();
    assert!(a.io().ops().is_empty());
    let e = a.unbind(bdf("0000:99:00.0")).unwrap_err();
    assert!(e.reason.contains("no such PCI function"), "{e}");
    assert!(a.io().ops().is_empty());
}

#[test]
fn unbind_of_a_device_in_use_fails_with_its_errno() {
    let io = pci_host(DEV, Some("vfio-pci"), "mlx5_core")
        .fail_write("/sys/bus/pci/drivers/vfio-pci/unbind", Errno::EBUSY);
    let a = SysfsActuator::new(io);
    let e = a.unbind(bdf(DEV)).unwrap_err();
    assert_eq!(e.errno, Some(Errno::EBUSY));
    assert!(e.hint.contains("in use"));
    assert_eq!(driver(a.io(), DEV).as_deref(), Some("vfio-pci"));
}

#[test]
fn unbind_read_back_sees_a_rebind() {
    let io = pci_host(DEV, Some("vfio-pci"), "mlx5_core")
        // Something re-binds it at once.
        .on_write("/sys/bus/pci/drivers/vfio-pci/unbind", |st, _| {
            st.set_link(
                &format!("{}/driver", d(DEV)),
                "../../../../bus/pci/drivers/mlx5_core",
            );
            Ok(())
        });
    let a = SysfsActuator::new(io);
    let e = a.unbind(bdf(DEV)).unwrap_err();
    assert!(e.reason.contains("still bound to mlx5_core"), "{e}");
}

// ---------------------------------------------------------------- sriov_numvfs

fn pf_host(total: u32, cur: u32) -> RecordingIo<'static> {
    pf_host_failing(total, cur, None)
}

/// A PF whose `sriov_numvfs` behaves like the kernel's (EBUSY for N→M), and
/// fails with ENOMEM for the count `fail_on`.
fn pf_host_failing(total: u32, cur: u32, fail_on: Option<u32>) -> RecordingIo<'static> {
    let dv = d(PF);
    let mut io = RecordingIo::new()
        .file(&format!("{dv}/sriov_totalvfs"), format!("{total}\n"))
        .file(&format!("{dv}/sriov_numvfs"), format!("{cur}\n"));
    for i in 0..cur {
        io = io.link(
            &format!("{dv}/virtfn{i}"),
            &format!("../0000:3b:00.{}", i + 1),
        );
    }
    let p = format!("{dv}/sriov_numvfs");
    io.on_write(&p.clone(), move |st, v| {
        let n: u32 = String::from_utf8_lossy(v)
            .trim()
            .parse()
            .map_err(|_| Errno::EINVAL)?;
        if Some(n) == fail_on {
            return Err(Errno(12));
        }
        let cur: u32 = String::from_utf8_lossy(st.file(&p).unwrap_or(b"0"))
            .trim()
            .parse()
            .unwrap_or(0);
        if cur != 0 && n != 0 && cur != n {
            return Err(Errno::EBUSY);
        }
        for i in 0..256 {
            st.remove(&format!("{dv}/virtfn{i}"));
        }
        for i in 0..n {
            st.set_link(
                &format!("{dv}/virtfn{i}"),
                &format!("../0000:3b:01.{}", i % 8),
            );
        }
        st.set_file(&p, format!("{n}\n"));
        Ok(())
    })
}

#[test]
fn set_num_vfs_writes_zero_first_when_changing_a_nonzero_count() {
    let a = SysfsActuator::new(pf_host(8, 2));
    a.set_num_vfs(bdf(PF), 4).unwrap();
    let p = format!("{}/sriov_numvfs", d(PF));
    assert_eq!(a.io().ops(), vec![w(&p, "0"), w(&p, "4")]);
    assert!(a.io().exists(&format!("{}/virtfn3", d(PF))));
}

#[test]
fn set_num_vfs_from_zero_and_to_zero_is_one_write() {
    let p = format!("{}/sriov_numvfs", d(PF));
    let a = SysfsActuator::new(pf_host(8, 0));
    a.set_num_vfs(bdf(PF), 3).unwrap();
    assert_eq!(a.io().ops(), vec![w(&p, "3")]);
    let a = SysfsActuator::new(pf_host(8, 3));
    a.set_num_vfs(bdf(PF), 0).unwrap();
    assert_eq!(a.io().ops(), vec![w(&p, "0")]);
    let a = SysfsActuator::new(pf_host(8, 3));
    a.set_num_vfs(bdf(PF), 3).unwrap();
    assert!(a.io().ops().is_empty());
}

#[test]
fn set_num_vfs_refuses_before_writing() {
    let a = SysfsActuator::new(pf_host(8, 0));
    let e = a.set_num_vfs(bdf(PF), 9).unwrap_err();
    assert!(e.reason.contains("at most 8"), "{e}");
    assert!(e.reason.contains("ERANGE"), "{e}");
    let e = a.set_num_vfs(bdf(DEV), 1).unwrap_err();
    assert!(e.reason.contains("no such PCI function"), "{e}");
    let io = RecordingIo::new().file(&format!("{}/vendor", d(DEV)), "0x15b3\n");
    let b = SysfsActuator::new(io);
    let e = b.set_num_vfs(bdf(DEV), 1).unwrap_err();
    assert!(e.reason.contains("not an SR-IOV physical function"), "{e}");
    assert!(a.io().ops().is_empty() && b.io().ops().is_empty());
}

#[test]
fn set_num_vfs_enoent_explains_the_pf_driver() {
    let p = format!("{}/sriov_numvfs", d(PF));
    let a = SysfsActuator::new(pf_host(8, 0).fail_write(&p, Errno::ENOENT));
    let e = a.set_num_vfs(bdf(PF), 2).unwrap_err();
    assert_eq!(e.errno, Some(Errno::ENOENT));
    assert_eq!(e.path.as_deref(), Some(p.as_str()));
    assert!(e.hint.contains("enable_sriov"), "{e}");
}

#[test]
fn set_num_vfs_restores_the_old_count_when_the_new_one_fails() {
    let p = format!("{}/sriov_numvfs", d(PF));
    let a = SysfsActuator::new(pf_host_failing(8, 2, Some(4)));
    let e = a.set_num_vfs(bdf(PF), 4).unwrap_err();
    assert_eq!(e.errno, Some(Errno(12)));
    assert_eq!(e.rollback_failed, None, "{e}");
    assert_eq!(a.io().ops(), vec![w(&p, "0"), w(&p, "4"), w(&p, "2")]);
    assert_eq!(a.io().read(&p).unwrap(), b"2\n");
}

#[test]
fn set_num_vfs_read_back_checks_the_vf_links() {
    let p = format!("{}/sriov_numvfs", d(PF));
    // The count changes but no virtfn link appears.
    let io = RecordingIo::new()
        .file(&format!("{}/sriov_totalvfs", d(PF)), "8\n")
        .file(&p, "0\n")
        .echo(&p);
    let a = SysfsActuator::new(io);
    let e = a.set_num_vfs(bdf(PF), 2).unwrap_err();
    assert!(e.reason.contains("virtfn0 does not exist"), "{e}");
    assert_eq!(a.io().ops(), vec![w(&p, "2"), w(&p, "0")]);
}

// ---------------------------------------------------------------- reset

fn reset_host() -> RecordingIo<'static> {
    let dv = d(DEV);
    RecordingIo::new()
        .file(&format!("{dv}/vendor"), "0x15b3\n")
        .file(&format!("{dv}/reset"), "")
        .file(
            &format!("{dv}/config"),
            [0xb3u8, 0x15, 0x1e, 0x10, 0, 0, 0x10, 0],
        )
}

#[test]
fn reset_writes_one_and_checks_the_vendor_id() {
    let a = SysfsActuator::new(reset_host());
    a.reset(bdf(DEV)).unwrap();
    assert_eq!(a.io().ops(), vec![w(format!("{}/reset", d(DEV)), "1")]);
}

#[test]
fn reset_refuses_without_a_reset_method() {
    let io = RecordingIo::new().file(&format!("{}/vendor", d(DEV)), "0x15b3\n");
    let a = SysfsActuator::new(io);
    let e = a.reset(bdf(DEV)).unwrap_err();
    assert!(e.reason.contains("no reset method"), "{e}");
    assert!(
        e.hint.contains("reset_method") && e.hint.contains("power"),
        "{e}"
    );
    assert!(a.io().ops().is_empty());
}

#[test]
fn reset_fails_when_the_function_does_not_answer() {
    let cfg = format!("{}/config", d(DEV));
    let io = reset_host().after_write(&format!("{}/reset", d(DEV)), &cfg, [0xffu8; 64]);
    let a = SysfsActuator::new(io);
    let e = a.reset(bdf(DEV)).unwrap_err();
    assert!(e.reason.contains("0xffff"), "{e}");
    assert_eq!(e.path.as_deref(), Some(cfg.as_str()));
    let io = reset_host().after_write(&format!("{}/reset", d(DEV)), &cfg, [0x86u8, 0x80]);
    let e = SysfsActuator::new(io).reset(bdf(DEV)).unwrap_err();
    assert!(
        e.reason.contains("0x8086") && e.reason.contains("0x15b3"),
        "{e}"
    );
}

#[test]
fn reset_passes_the_kernel_errno_on() {
    let io = reset_host().fail_write(&format!("{}/reset", d(DEV)), Errno::ENOTTY);
    let e = SysfsActuator::new(io).reset(bdf(DEV)).unwrap_err();
    assert_eq!(e.errno, Some(Errno::ENOTTY));
    assert!(e.hint.contains("no reset method worked"), "{e}");
}

// ---------------------------------------------------------------- /dev/vfio/N

#[test]
fn group_node_owner_chown_chmod_read_back() {
    let a = SysfsActuator::new(RecordingIo::new().node("/dev/vfio/41", 0, 0, 0o600));
    a.set_group_node_owner(IommuGroupId(41), 107, 107, 0o600)
        .unwrap();
    assert_eq!(
        a.io().op_lines(),
        vec!["chown 107:107 /dev/vfio/41", "chmod 0600 /dev/vfio/41"]
    );
    a.io().clear_ops();
    a.set_group_node_owner(IommuGroupId(41), 107, 107, 0o600)
        .unwrap();
    assert!(a.io().ops().is_empty(), "already so: nothing to do");
}

#[test]
fn group_node_owner_refusals_and_rollback() {
    let a = SysfsActuator::new(RecordingIo::new());
    let e = a
        .set_group_node_owner(IommuGroupId(7), 107, 107, 0o600)
        .unwrap_err();
    assert!(e.reason.contains("no /dev/vfio/7"), "{e}");
    assert!(e.hint.contains("vfio-pci"), "{e}");
    let e = a
        .set_group_node_owner(IommuGroupId(7), 1, 1, 0o17777)
        .unwrap_err();
    assert!(e.reason.contains("beyond 7777"), "{e}");
    assert!(a.io().ops().is_empty());

    let io = RecordingIo::new()
        .node("/dev/vfio/41", 0, 0, 0o600)
        .fail_chmod("/dev/vfio/41", Errno::EPERM);
    let a = SysfsActuator::new(io);
    let e = a
        .set_group_node_owner(IommuGroupId(41), 107, 107, 0o660)
        .unwrap_err();
    assert_eq!(e.errno, Some(Errno::EPERM));
    assert!(e.hint.contains("root"), "{e}");
    assert_eq!(
        a.io().op_lines(),
        vec![
            "chown 107:107 /dev/vfio/41",
            "chmod 0660 /dev/vfio/41",
            "chown 0:0 /dev/vfio/41"
        ]
    );
    assert_eq!(a.io().stat("/dev/vfio/41").unwrap().uid, 0);
}

// ---------------------------------------------------------------- mdev

const UUID: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";

fn mdev_host() -> RecordingIo<'static> {
    let types = "/sys/class/mdev_bus/mtty/mdev_supported_types";
    RecordingIo::new()
        .dir(&format!("{types}/mtty-1"))
        .dir(&format!("{types}/mtty-2"))
        .on_write(&format!("{types}/mtty-2/create"), |st, v| {
            let u = String::from_utf8_lossy(v).into_owned();
            let m = format!("/sys/bus/mdev/devices/{u}");
            if st.file(&format!("{m}/remove")).is_some() {
                return Err(Errno::EEXIST);
            }
            st.set_link(&format!("{m}/mdev_type"), "../mdev_supported_types/mtty-2");
            st.set_file(&format!("{m}/remove"), "");
            Ok(())
        })
        .on_write(&format!("/sys/bus/mdev/devices/{UUID}/remove"), |st, _| {
            st.remove(&format!("/sys/bus/mdev/devices/{UUID}"));
            Ok(())
        })
}

#[test]
fn mdev_create_and_remove() {
    let u: MdevUuid = UUID.parse().unwrap();
    let a = SysfsActuator::new(mdev_host());
    a.mdev_create("mtty", "mtty-2", u).unwrap();
    assert_eq!(
        a.io().ops(),
        vec![w(
            "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create",
            UUID
        )]
    );
    let e = a.mdev_create("mtty", "mtty-2", u).unwrap_err();
    assert_eq!(e.errno, Some(Errno::EEXIST));
    assert!(e.hint.contains("already exists"), "{e}");
    a.io().clear_ops();
    a.mdev_remove(u).unwrap();
    assert_eq!(
        a.io().ops(),
        vec![w(format!("/sys/bus/mdev/devices/{UUID}/remove"), "1")]
    );
    a.io().clear_ops();
    let e = a.mdev_remove(u).unwrap_err();
    assert!(e.reason.contains("no such mdev"), "{e}");
    assert!(a.io().ops().is_empty());
}

#[test]
fn mdev_create_refusals_and_errnos() {
    let u: MdevUuid = UUID.parse().unwrap();
    let a = SysfsActuator::new(mdev_host().fail_write(
        "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1/create",
        Errno::EUSERS,
    ));
    let e = a.mdev_create("gpu0", "mtty-2", u).unwrap_err();
    assert!(e.reason.contains("not an mdev parent"), "{e}");
    let e = a.mdev_create("mtty", "mtty-9", u).unwrap_err();
    assert!(e.hint.contains("mtty-1, mtty-2"), "{e}");
    let e = a.mdev_create("mtty", "../x", u).unwrap_err();
    assert!(e.reason.contains("not a valid mdev type"), "{e}");
    assert!(a.io().ops().is_empty());
    let e = a.mdev_create("mtty", "mtty-1", u).unwrap_err();
    assert_eq!(e.errno, Some(Errno::EUSERS));
    assert!(e.hint.contains("no instances left"), "{e}");
}

#[test]
fn mdev_create_read_back_failure_removes_it_again() {
    let u: MdevUuid = UUID.parse().unwrap();
    let io = mdev_host().on_write(
        "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1/create",
        |st, v| {
            let m = format!("/sys/bus/mdev/devices/{}", String::from_utf8_lossy(v));
            st.set_link(&format!("{m}/mdev_type"), "../mdev_supported_types/mtty-2");
            Ok(())
        },
    );
    let a = SysfsActuator::new(io);
    let e = a.mdev_create("mtty", "mtty-1", u).unwrap_err();
    assert!(e.reason.contains("has type mtty-2"), "{e}");
    assert_eq!(
        a.io().ops()[1],
        w(format!("/sys/bus/mdev/devices/{UUID}/remove"), "1")
    );
}

// ---------------------------------------------------------------- AP

const MA: &str = "11111111-0000-4000-8000-000000000001";
const MB: &str = "22222222-0000-4000-8000-000000000002";
const MC: &str = "33333333-0000-4000-8000-000000000003";

fn mask_of(ids: &[u8]) -> String {
    let mut m = ApMask::NONE;
    for i in ids {
        m.set(*i, true);
    }
    format!("{m}\n")
}

/// apmask = adapters 0..3, aqmask = domains 0..3 (reserved for the host);
/// mdev A: 05 × {04,05}; mdev B: 06 × {04}; mdev C: 09 × {02}.
fn ap_host() -> RecordingIo<'static> {
    let mut io = RecordingIo::new()
        .file("/sys/bus/ap/apmask", mask_of(&[0, 1, 2, 3]))
        .file("/sys/bus/ap/aqmask", mask_of(&[0, 1, 2, 3]))
        .dir("/sys/devices/vfio_ap/matrix/mdev_supported_types");
    for (u, m) in [
        (MA, "05.0004\n05.0005\n"),
        (MB, "06.0004\n"),
        (MC, "09.0002\n"),
    ] {
        io = io
            .file(&format!("{AP_MATRIX}/{u}/matrix"), m)
            .file(&format!("{AP_MATRIX}/{u}/control_domains"), "");
    }
    io
}

fn uuid(s: &str) -> MdevUuid {
    s.parse().unwrap()
}

#[test]
fn ap_assign_writes_the_id_and_reads_the_matrix_back() {
    let mat = format!("{AP_MATRIX}/{MA}/matrix");
    let io = ap_host().after_write(
        &format!("{AP_MATRIX}/{MA}/assign_adapter"),
        &mat,
        "05.0004\n05.0005\n07.0004\n07.0005\n",
    );
    let a = SysfsActuator::new(io);
    a.ap_assign(uuid(MA), ApResource::Adapter(7)).unwrap();
    assert_eq!(
        a.io().ops(),
        vec![w(format!("{AP_MATRIX}/{MA}/assign_adapter"), "7")]
    );
    a.io().clear_ops();
    a.ap_assign(uuid(MA), ApResource::Adapter(7)).unwrap();
    assert!(a.io().ops().is_empty(), "already assigned");
}

#[test]
fn ap_assign_allows_over_provisioning_and_control_domains() {
    // Adapter 0x20 has no queue on this host: allowed.
    let io = ap_host()
        .after_write(
            &format!("{AP_MATRIX}/{MB}/assign_adapter"),
            &format!("{AP_MATRIX}/{MB}/matrix"),
            "06.0004\n20.0004\n",
        )
        .after_write(
            &format!("{AP_MATRIX}/{MB}/assign_control_domain"),
            &format!("{AP_MATRIX}/{MB}/control_domains"),
            "0001\n",
        );
    let a = SysfsActuator::new(io);
    a.ap_assign(uuid(MB), ApResource::Adapter(0x20)).unwrap();
    // A control domain is not checked against the masks (it makes no APQN).
    a.ap_assign(uuid(MB), ApResource::ControlDomain(1)).unwrap();
    assert_eq!(
        a.io().op_lines(),
        vec![
            format!("write {AP_MATRIX}/{MB}/assign_adapter \"32\""),
            format!("write {AP_MATRIX}/{MB}/assign_control_domain \"1\""),
        ]
    );
}

#[test]
fn ap_assign_refuses_an_apqn_of_another_mdev() {
    let a = SysfsActuator::new(ap_host());
    let e = a.ap_assign(uuid(MA), ApResource::Adapter(6)).unwrap_err();
    assert!(
        e.reason
            .contains("06.0004 in mdev 22222222-0000-4000-8000-000000000002"),
        "{e}"
    );
    assert!(e.reason.contains("EADDRINUSE"), "{e}");
    assert!(
        !e.reason.contains("06.0005"),
        "06.0005 is in no other mdev: {e}"
    );
    assert!(a.io().ops().is_empty());
}

#[test]
fn ap_assign_refuses_a_host_reserved_apqn() {
    let a = SysfsActuator::new(ap_host());
    let e = a.ap_assign(uuid(MC), ApResource::Adapter(1)).unwrap_err();
    assert!(e.reason.contains("01.0002"), "{e}");
    assert!(e.reason.contains("EADDRNOTAVAIL"), "{e}");
    assert!(e.hint.contains("apmask"), "{e}");
    assert!(a.io().ops().is_empty());
    let e = a
        .ap_assign(
            uuid("44444444-0000-4000-8000-000000000004"),
            ApResource::Domain(1),
        )
        .unwrap_err();
    assert!(e.reason.contains("not a vfio_ap matrix mdev"), "{e}");
    assert!(a.io().ops().is_empty());
}

#[test]
fn ap_assign_kernel_errnos_have_hints_and_read_back_failure_undoes() {
    let io = ap_host().fail_write(
        &format!("{AP_MATRIX}/{MA}/assign_domain"),
        Errno::EADDRINUSE,
    );
    let e = SysfsActuator::new(io)
        .ap_assign(uuid(MA), ApResource::Domain(9))
        .unwrap_err();
    assert_eq!(e.errno, Some(Errno::EADDRINUSE));
    assert!(e.hint.contains("another mdev"), "{e}");
    let io = ap_host().fail_write(&format!("{AP_MATRIX}/{MA}/assign_domain"), Errno::ENODEV);
    let e = SysfsActuator::new(io)
        .ap_assign(uuid(MA), ApResource::Domain(9))
        .unwrap_err();
    assert!(e.hint.contains("ap_max"), "{e}");
    // The write succeeds but the matrix does not show the domain.
    let a = SysfsActuator::new(ap_host());
    let e = a.ap_assign(uuid(MA), ApResource::Domain(9)).unwrap_err();
    assert!(e.reason.contains("not in the mdev"), "{e}");
    assert_eq!(
        a.io().ops(),
        vec![
            w(format!("{AP_MATRIX}/{MA}/assign_domain"), "9"),
            w(format!("{AP_MATRIX}/{MA}/unassign_domain"), "9"),
        ]
    );
}

#[test]
fn ap_unassign_writes_and_reads_back() {
    let io = ap_host().after_write(
        &format!("{AP_MATRIX}/{MA}/unassign_domain"),
        &format!("{AP_MATRIX}/{MA}/matrix"),
        "05.0004\n",
    );
    let a = SysfsActuator::new(io);
    a.ap_unassign(uuid(MA), ApResource::Domain(5)).unwrap();
    assert_eq!(
        a.io().ops(),
        vec![w(format!("{AP_MATRIX}/{MA}/unassign_domain"), "5")]
    );
    a.io().clear_ops();
    a.ap_unassign(uuid(MA), ApResource::Domain(5)).unwrap();
    assert!(a.io().ops().is_empty(), "not assigned any more");
}

#[test]
fn ap_mask_edit_refuses_to_hand_the_host_an_apqn_an_mdev_holds() {
    let a = SysfsActuator::new(ap_host());
    let edit: MaskEdit = "+9".parse().unwrap();
    let e = a.ap_set_mask(ApMaskKind::Apmask, &edit).unwrap_err();
    assert!(
        e.reason
            .contains("09.0002 in mdev 33333333-0000-4000-8000-000000000003"),
        "{e}"
    );
    assert!(e.reason.contains("EBUSY"), "{e}");
    assert!(a.io().ops().is_empty());
    // Domains 4 and 5 to the host: 05.0004/5 (A) and 06.0004 (B) stay out,
    // because adapters 5 and 6 are not in apmask.
    let edit: MaskEdit = "+4-5".parse().unwrap();
    let io = ap_host().after_write(
        "/sys/bus/ap/aqmask",
        "/sys/bus/ap/aqmask",
        mask_of(&[0, 1, 2, 3, 4, 5]),
    );
    let a = SysfsActuator::new(io);
    let got = a.ap_set_mask(ApMaskKind::Aqmask, &edit).unwrap();
    assert_eq!(format!("{got}\n"), mask_of(&[0, 1, 2, 3, 4, 5]));
    assert_eq!(a.io().ops(), vec![w("/sys/bus/ap/aqmask", "+4-5")]);
}

#[test]
fn ap_mask_edit_absolute_form_and_read_back() {
    let edit: MaskEdit = "0x0f".parse().unwrap();
    let want = mask_of(&[4, 5, 6, 7]);
    let io = ap_host().after_write("/sys/bus/ap/apmask", "/sys/bus/ap/apmask", &want);
    let a = SysfsActuator::new(io);
    // Adapters 4..7 to the host with domains 0..3: no mdev holds any of them.
    let got = a.ap_set_mask(ApMaskKind::Apmask, &edit).unwrap();
    assert_eq!(format!("{got}\n"), want);
    assert_eq!(a.io().ops(), vec![w("/sys/bus/ap/apmask", want.trim_end())]);
    // A concurrent edit shows in the read-back.
    let a = SysfsActuator::new(ap_host());
    let e = a.ap_set_mask(ApMaskKind::Apmask, &edit).unwrap_err();
    assert!(e.reason.contains("reads back"), "{e}");
    // An edit that changes nothing writes nothing.
    let a = SysfsActuator::new(ap_host());
    a.ap_set_mask(ApMaskKind::Apmask, &"+0-3".parse().unwrap())
        .unwrap();
    assert!(a.io().ops().is_empty());
}

#[test]
fn ap_mask_edit_fails_closed_on_an_unreadable_matrix() {
    let io = ap_host().fail_read(&format!("{AP_MATRIX}/{MB}/matrix"), Errno::EIO);
    let a = SysfsActuator::new(io);
    let e = a
        .ap_set_mask(ApMaskKind::Apmask, &"+40".parse().unwrap())
        .unwrap_err();
    assert_eq!(e.errno, Some(Errno::EIO));
    assert!(a.io().ops().is_empty());
}

#[test]
fn mask_expressions_that_do_not_parse_name_the_bad_term() {
    for (expr, term) in [
        ("+1,x5", "\"x5\""),
        ("+1,+300", "\"+300\""),
        ("+5-3", "\"+5-3\""),
        ("+", "\"+\""),
        ("+1,-", "\"-\""),
        ("+0xg", "\"+0xg\""),
        ("+08", "\"+08\""),
        ("0xzz", "'z'"),
        ("0X41", "'X'"),
        ("", "no hex digits"),
        ("0x", "no hex digits"),
    ] {
        let e = expr.parse::<MaskEdit>().unwrap_err();
        assert_eq!(e.kind, "AP mask expression");
        assert!(e.reason.contains(term), "{expr}: {e}");
    }
    let long = format!("0x{}", "f".repeat(65));
    let e = long.parse::<MaskEdit>().unwrap_err();
    assert!(e.reason.contains("more than 64 hex digits"), "{e}");
}

#[test]
fn mask_expressions_follow_the_kernel_syntax() {
    let m = |s: &str| s.parse::<MaskEdit>().unwrap();
    let ids = |e: &MaskEdit, from: &ApMask| e.apply(from).iter().collect::<Vec<_>>();
    assert_eq!(ids(&m("0x41"), &ApMask::ALL), vec![1, 7]);
    assert_eq!(ids(&m("x41"), &ApMask::ALL), vec![1, 7]);
    assert_eq!(ids(&m("41"), &ApMask::ALL), vec![1, 7]);
    assert_eq!(ids(&m("0x41\n"), &ApMask::ALL), vec![1, 7]);
    assert_eq!(
        m(&format!("0x{}", "f".repeat(64))).apply(&ApMask::NONE),
        ApMask::ALL
    );
    assert_eq!(ids(&m("+0,-6,+0x47,-0xf0"), &ApMask::NONE), vec![0, 0x47]);
    assert_eq!(ids(&m("-0-255,+1-3"), &ApMask::ALL), vec![1, 2, 3]);
    // strtoul base 0: octal, hex; terms may follow each other without a comma.
    assert_eq!(ids(&m("+010,+0X10+2"), &ApMask::NONE), vec![2, 8, 16]);
    assert_eq!(ids(&m("+1,,+2,\n"), &ApMask::NONE), vec![1, 2]);
    // The last term wins.
    assert_eq!(ids(&m("+5,-5"), &ApMask::NONE), Vec::<u8>::new());
    assert_eq!(m("+1,-6-8").to_string(), "+1,-6-8");
    assert_eq!(m("0x8").to_string(), format!("0x8{}", "0".repeat(63)));
}

// ---------------------------------------------------------------- VF GUIDs

const VF3: &str = "0000:3b:00.4";

fn guid_host(vf_driver: &str) -> RecordingIo<'static> {
    let pf = d(PF);
    let vf = d(VF3);
    let gid = format!("{vf}/infiniband/mlx5_5/ports/1/gids/0");
    RecordingIo::new()
        .dir(&format!("{pf}/net/ibp59s0"))
        .link(&format!("{pf}/virtfn3"), "../0000:3b:00.4")
        .link(
            &format!("{vf}/driver"),
            &format!("../../../../bus/pci/drivers/{vf_driver}"),
        )
        .file(&gid, "fe80:0000:0000:0000:0000:0000:0000:0000\n")
        .on_write(&format!("/sys/bus/pci/drivers/{vf_driver}/unbind"), {
            let vf = vf.clone();
            move |st, _| {
                st.remove(&format!("{vf}/driver"));
                Ok(())
            }
        })
        .on_write(PROBE, {
            let vf_driver = vf_driver.to_string();
            move |st, _| {
                st.set_link(
                    &format!("{vf}/driver"),
                    &format!("../../../../bus/pci/drivers/{vf_driver}"),
                );
                Ok(())
            }
        })
}

const NODE: Guid = Guid(0x0002_c903_00a1_b200);
const PORT: Guid = Guid(0x0002_c903_00a1_b2c3);

#[test]
fn set_vf_guid_sets_node_then_port_rebinds_and_reads_the_gid() {
    let gid = format!("{}/infiniband/mlx5_5/ports/1/gids/0", d(VF3));
    let io = guid_host("mlx5_core").after_write(
        PROBE,
        &gid,
        "fe80:0000:0000:0000:0002:c903:00a1:b2c3\n",
    );
    let a = SysfsActuator::new(io);
    a.set_vf_guid(bdf(PF), 3, NODE, PORT).unwrap();
    assert_eq!(
        a.io().op_lines(),
        vec![
            "netlink: ip link set ibp59s0 vf 3 node_guid 00:02:c9:03:00:a1:b2:00",
            "netlink: ip link set ibp59s0 vf 3 port_guid 00:02:c9:03:00:a1:b2:c3",
            "write /sys/bus/pci/drivers/mlx5_core/unbind \"0000:3b:00.4\"",
            "write /sys/bus/pci/drivers_probe \"0000:3b:00.4\"",
        ]
    );
}

#[test]
fn set_vf_guid_reads_ofed_port_when_present() {
    let port = format!("{}/sriov/3/port", d(PF));
    let io = guid_host("mlx5_core")
        .file(&port, "00:00:00:00:00:00:00:00\n")
        .after_write(PROBE, &port, "00:02:c9:03:00:a1:b2:c3\n");
    SysfsActuator::new(io)
        .set_vf_guid(bdf(PF), 3, NODE, PORT)
        .unwrap();
    // Not picked up: the read-back names the file and both values.
    let io = guid_host("mlx5_core").file(&port, "00:00:00:00:00:00:00:01\n");
    let e = SysfsActuator::new(io)
        .set_vf_guid(bdf(PF), 3, NODE, PORT)
        .unwrap_err();
    assert!(
        e.reason.contains("0x0000000000000001") && e.reason.contains("0x0002c90300a1b2c3"),
        "{e}"
    );
    assert_eq!(e.path.as_deref(), Some(port.as_str()));
}

#[test]
fn set_vf_guid_refuses_reserved_guids_before_anything() {
    let a = SysfsActuator::new(guid_host("mlx5_core"));
    let e = a.set_vf_guid(bdf(PF), 3, Guid(0), PORT).unwrap_err();
    assert!(
        e.reason
            .contains("node GUID 0x0000000000000000 is reserved"),
        "{e}"
    );
    let e = a.set_vf_guid(bdf(PF), 3, NODE, Guid(u64::MAX)).unwrap_err();
    assert!(
        e.reason
            .contains("port GUID 0xffffffffffffffff is reserved"),
        "{e}"
    );
    assert!(a.io().ops().is_empty());
}

#[test]
fn set_vf_guid_refusals_without_netdev_or_vf() {
    let io = RecordingIo::new().file(&format!("{}/vendor", d(PF)), "0x15b3\n");
    let a = SysfsActuator::new(io);
    let e = a.set_vf_guid(bdf(PF), 3, NODE, PORT).unwrap_err();
    assert!(e.reason.contains("no network interface"), "{e}");
    assert!(e.hint.contains("ib_ipoib"), "{e}");
    let a = SysfsActuator::new(guid_host("mlx5_core"));
    let e = a.set_vf_guid(bdf(PF), 4, NODE, PORT).unwrap_err();
    assert!(e.reason.contains("no VF 4"), "{e}");
    assert!(a.io().ops().is_empty());
}

#[test]
fn set_vf_guid_fails_closed_when_it_cannot_read_back() {
    // On vfio-pci the VF has no IB device and there is no OFED sysfs.
    let io = guid_host("vfio-pci");
    io.with_state(|st| st.remove(&format!("{}/infiniband", d(VF3))));
    let a = SysfsActuator::new(io);
    let e = a.set_vf_guid(bdf(PF), 3, NODE, PORT).unwrap_err();
    assert!(e.reason.contains("cannot be read back"), "{e}");
    assert!(e.hint.contains("mlx5_core"), "{e}");
    assert_eq!(
        a.io().ops().len(),
        4,
        "the GUIDs were set and the VF rebound"
    );
}

#[test]
fn set_vf_guid_kernel_refusal() {
    let io = guid_host("mlx5_core").fail_set_vf_guid(GuidKind::Port, Errno::EOPNOTSUPP);
    let a = SysfsActuator::new(io);
    let e = a.set_vf_guid(bdf(PF), 3, NODE, PORT).unwrap_err();
    assert_eq!(e.errno, Some(Errno::EOPNOTSUPP));
    assert!(e.hint.contains("IPoIB"), "{e}");
    assert!(
        e.rollback_failed
            .as_deref()
            .unwrap_or("")
            .contains("node GUID"),
        "{e}"
    );
    assert_eq!(a.io().ops().len(), 2, "no rebind after a failed set");
}

// ---------------------------------------------------------------- PF custody

fn custody_host(drv: &str) -> RecordingIo<'static> {
    let pf = d(PF);
    RecordingIo::new()
        .link(
            &format!("{pf}/driver"),
            &format!("../../../../bus/pci/drivers/{drv}"),
        )
        .file(&format!("{pf}/sriov_totalvfs"), "8\n")
        .link(
            &format!("{pf}/iommu_group"),
            "../../../../kernel/iommu_groups/40",
        )
}

#[test]
fn custody_opens_the_pf_and_rekey_sets_a_fresh_token() {
    let a = SysfsActuator::new(custody_host("vfio-pci"));
    let mut c = a.custody_pf(bdf(PF)).unwrap();
    let t1 = a.rekey_vf_token(&mut c).unwrap();
    let t2 = a.rekey_vf_token(&mut c).unwrap();
    assert_ne!(t1, t2);
    assert_eq!(t1.as_bytes()[6] >> 4, 4, "version-4 UUID layout");
    assert_eq!(
        a.io().ops(),
        vec![
            IoOp::OpenPf {
                pf: bdf(PF),
                group: IommuGroupId(40)
            },
            IoOp::SetVfToken { pf: bdf(PF) },
            IoOp::SetVfToken { pf: bdf(PF) },
        ]
    );
    let everything = format!("{:?}{:?}{:?}{c:?}", a.io().op_lines(), a.io(), t1);
    assert!(!everything.contains(&t1.reveal_for_launcher()));
    assert!(!everything.contains(&t2.reveal_for_launcher()));
    assert_eq!(format!("{t1:?}"), "VfToken(<redacted>)");
}

#[test]
fn custody_refusals_and_errors() {
    let a = SysfsActuator::new(custody_host("mlx5_core"));
    let e = a.custody_pf(bdf(PF)).unwrap_err();
    assert!(e.reason.contains("bound to mlx5_core, not vfio-pci"), "{e}");
    assert!(
        e.hint
            .contains("devfence bind 0000:3b:00.0 --driver vfio-pci"),
        "{e}"
    );
    assert!(a.io().ops().is_empty());

    let io = custody_host("vfio-pci");
    io.with_state(|st| st.remove(&format!("{}/iommu_group", d(PF))));
    let e = SysfsActuator::new(io).custody_pf(bdf(PF)).unwrap_err();
    assert!(e.reason.contains("no IOMMU group"), "{e}");

    let a = SysfsActuator::new(custody_host("vfio-pci").fail_open_pf(Errno::EACCES));
    let e = a.custody_pf(bdf(PF)).unwrap_err();
    assert_eq!(e.errno, Some(Errno::EACCES));
    assert!(e.hint.contains("VF of this PF is open"), "{e}");
    assert_eq!(e.path.as_deref(), Some("/dev/vfio/40"));

    let a = SysfsActuator::new(custody_host("vfio-pci").fail_set_vf_token(Errno::ENOTTY));
    let mut c = a.custody_pf(bdf(PF)).unwrap();
    let e = a.rekey_vf_token(&mut c).unwrap_err();
    assert_eq!(e.errno, Some(Errno::ENOTTY));
    assert!(e.hint.contains("SR-IOV PF"), "{e}");
}

// ---------------------------------------------------------------- dry run

#[test]
fn dry_run_records_the_steps_and_changes_nothing() {
    let kernel = pci_host(DEV, Some("mlx5_core"), "mlx5_core");
    let dry = RecordingIo::dry_run(&kernel);
    let a = SysfsActuator::new(&dry);
    a.bind(bdf(DEV), "vfio-pci").unwrap();
    assert_eq!(
        dry.op_lines(),
        vec![
            "write /sys/bus/pci/devices/0000:3b:00.2/driver_override \"vfio-pci\"",
            "write /sys/bus/pci/drivers/mlx5_core/unbind \"0000:3b:00.2\"",
            "write /sys/bus/pci/drivers_probe \"0000:3b:00.2\"",
        ]
    );
    assert!(kernel.ops().is_empty(), "nothing reached the kernel");
    assert_eq!(driver(&kernel, DEV).as_deref(), Some("mlx5_core"));
    // Refusals are still refusals in a dry run.
    assert!(a.bind(bdf(DEV), "nvme").is_err());
}

/// issue 11 item 4: the errno an operation failed with is the source of its
/// error (and its text is in the message once).
#[test]
fn the_errno_is_the_source_of_an_act_error() {
    let e = ActError::new(
        "bind 0000:03:00.0 to vfio-pci",
        "the kernel refused",
        "check dmesg",
    )
    .with_path("/sys/bus/pci/drivers/vfio-pci/bind")
    .with_errno(Errno::EBUSY);
    let src = std::error::Error::source(&e).expect("a source");
    assert_eq!(src.downcast_ref::<Errno>(), Some(&Errno::EBUSY));
    assert_eq!(e.to_string().matches(&src.to_string()).count(), 1, "{e}");
    let bare = ActError::new("reset 0000:03:00.0", "no reset method", "none");
    assert!(std::error::Error::source(&bare).is_none());
}
