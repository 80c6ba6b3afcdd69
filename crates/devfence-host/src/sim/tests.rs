//! Tests of the fixture generator: the trees are walked directly on disk.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use devfence_model::{DeviceId, Tenancy};

use super::*;

/// A scratch directory: `$TMPDIR` when set, else `/dev/shm` when it is usable (the
/// `scale` tree is ~475,000 entries, and a tmpfs writes them many times faster than
/// a disk), else the system temp dir.
pub(crate) fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if std::env::var_os("TMPDIR").is_none()
        && shm.is_dir()
        && let Ok(t) = tempfile::tempdir_in(shm)
    {
        return t;
    }
    tempfile::tempdir().unwrap()
}

fn gen_into(profile: Profile, vfs: Option<u32>) -> (tempfile::TempDir, PathBuf, Summary) {
    let tmp = scratch();
    let out = tmp.path().join("host");
    let summary = generate(&GenerateOptions {
        profile,
        out: out.clone(),
        vfs,
        host_id: 0,
    })
    .unwrap();
    (tmp, out, summary)
}

fn read(root: &Path, kpath: &str) -> String {
    let p = root.join(kpath.trim_start_matches('/'));
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn exists(root: &Path, kpath: &str) -> bool {
    root.join(kpath.trim_start_matches('/'))
        .symlink_metadata()
        .is_ok()
}

fn link_text(root: &Path, kpath: &str) -> String {
    let p = root.join(kpath.trim_start_matches('/'));
    fs::read_link(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_string_lossy()
        .into_owned()
}

/// The basename of where a link points.
fn link_base(root: &Path, kpath: &str) -> String {
    let t = link_text(root, kpath);
    t.rsplit('/').next().unwrap().to_string()
}

fn names(root: &Path, kpath: &str) -> Vec<String> {
    let p = root.join(kpath.trim_start_matches('/'));
    let mut v: Vec<String> = fs::read_dir(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn node_meta(root: &Path, kpath: &str) -> (u32, u32, u32) {
    let m = fs::metadata(root.join(kpath.trim_start_matches('/'))).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn tenancy(root: &Path) -> Tenancy {
    toml::from_str(&read(root, TENANCY_PATH)).unwrap()
}

fn tenant_of(t: &Tenancy, dev: &str) -> Option<String> {
    let d: DeviceId = dev.parse().unwrap();
    t.assignments
        .iter()
        .find(|a| a.device == d)
        .map(|a| a.tenant.to_string())
}

/// Every link in the tree resolves (no dangling link), and every regular file under
/// `/sys` that is readable ends in exactly one newline or is empty — except the
/// binary `config` space, which must be 64 bytes.
fn check_tree(root: &Path) {
    fn walk(root: &Path, dir: &Path, links: &mut u32) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                *links += 1;
                let t = fs::read_link(&p).unwrap();
                assert!(t.is_relative(), "{} -> {}", p.display(), t.display());
                assert!(fs::metadata(&p).is_ok(), "dangling {}", p.display());
            } else if ft.is_dir() {
                walk(root, &p, links);
            } else if p.file_name().is_some_and(|n| n == "config") {
                assert_eq!(fs::read(&p).unwrap().len(), 64, "{}", p.display());
            } else if p.starts_with(root.join("sys")) && e.metadata().unwrap().mode() & 0o400 != 0 {
                let s = fs::read_to_string(&p).unwrap();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let may_be_empty = [
                    "reserved_regions",
                    "reset_method",
                    "control_domains",
                    "matrix",
                    "guest_matrix",
                ];
                if s.is_empty() {
                    assert!(may_be_empty.contains(&name.as_str()), "{}", p.display());
                } else {
                    assert!(
                        s.ends_with('\n') && !s.ends_with("\n\n"),
                        "{}: {s:?}",
                        p.display()
                    );
                    if name == "uevent" {
                        // The one multi-line PCI attribute: it must agree with
                        // the single-value files beside it.
                        let id = crate::parse::pci_uevent(s.as_bytes()).unwrap();
                        let dir = p.parent().unwrap();
                        let hex = |f: &str| {
                            let v = fs::read_to_string(dir.join(f)).unwrap();
                            u32::from_str_radix(v.trim_end().trim_start_matches("0x"), 16).unwrap()
                        };
                        assert_eq!(
                            (
                                u32::from(id.vendor),
                                u32::from(id.device),
                                id.class,
                                id.subsystem.map(|(v, d)| (u32::from(v), u32::from(d)))
                            ),
                            (
                                hex("vendor"),
                                hex("device"),
                                hex("class"),
                                Some((hex("subsystem_vendor"), hex("subsystem_device")))
                            ),
                            "{}",
                            p.display()
                        );
                        let slot = format!(
                            "PCI_SLOT_NAME={}\n",
                            dir.file_name().unwrap().to_string_lossy()
                        );
                        assert!(s.contains(&slot), "{}: {s:?}", p.display());
                    } else if !matches!(
                        name.as_str(),
                        "matrix" | "guest_matrix" | "control_domains" | "reserved_regions"
                    ) {
                        assert_eq!(s.matches('\n').count(), 1, "{}: {s:?}", p.display());
                    }
                }
            }
        }
    }
    let mut links = 0;
    walk(root, root, &mut links);
    assert!(links > 0);
}

#[test]
fn profile_names_round_trip() {
    for p in Profile::ALL {
        assert_eq!(p.to_string().parse::<Profile>().unwrap(), p);
        assert!(!p.description().is_empty() && !p.description().contains('\n'));
    }
    let e = "cx7".parse::<Profile>().unwrap_err();
    assert!(e.to_string().starts_with("Unknown profile \"cx7\""), "{e}");
    assert!(e.to_string().contains("Hint: "), "{e}");
}

#[test]
fn non_empty_out_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("keep.txt"), "x").unwrap();
    let e = generate(&GenerateOptions {
        profile: Profile::NoAcs,
        out: tmp.path().to_path_buf(),
        vfs: None,
        host_id: 0,
    })
    .unwrap_err();
    assert!(matches!(e, SimError::OutNotEmpty { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    assert!(msg.contains("Hint: refusing to write into a non-empty directory"));
    assert_eq!(names(tmp.path(), "/"), vec!["keep.txt"]);

    let file = tmp.path().join("keep.txt");
    let e = generate(&GenerateOptions {
        profile: Profile::NoAcs,
        out: file,
        vfs: None,
        host_id: 0,
    })
    .unwrap_err();
    assert!(matches!(e, SimError::OutNotDirectory { .. }), "{e}");

    // An existing empty directory is fine.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    generate(&GenerateOptions {
        profile: Profile::NoAcs,
        out: empty,
        vfs: None,
        host_id: 0,
    })
    .unwrap();
}

#[test]
fn vfs_bounds_are_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (Profile::Cx6Ib, 4, 5, 256),
        (Profile::Cx6Ib, 257, 5, 256),
        (Profile::UserspacePf, 2, 3, 7),
        (Profile::UserspacePf, 8, 3, 7),
        (Profile::Scale, 0, 1, 16384),
        (Profile::Scale, 16385, 1, 16384),
    ];
    for (profile, given, lo, hi) in cases {
        let out = tmp.path().join(format!("{profile}-{given}"));
        let e = generate(&GenerateOptions {
            profile,
            out: out.clone(),
            vfs: Some(given),
            host_id: 0,
        })
        .unwrap_err();
        match e {
            SimError::VfsRange { min, max, .. } => assert_eq!((min, max), (lo, hi)),
            e => panic!("{e}"),
        }
        assert!(!out.exists(), "nothing written for a refused --vfs");
    }
    let e = generate(&GenerateOptions {
        profile: Profile::S390Ap,
        out: tmp.path().join("s"),
        vfs: Some(4),
        host_id: 0,
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Profile s390-ap does not take --vfs. Hint: leave --vfs out for this profile"
    );
    let e = generate(&GenerateOptions {
        profile: Profile::Cx6Ib,
        out: tmp.path().join("c"),
        vfs: Some(4),
        host_id: 0,
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--vfs 4 is out of range for profile cx6-ib. Hint: use 5 to 256"
    );
}

#[test]
fn cx6_ib_layout() {
    let (_tmp, root, s) = gen_into(Profile::Cx6Ib, None);
    check_tree(&root);
    // 2 root ports, 2 PFs, 16 VFs; IB devices of the PFs and of the host VF.
    assert_eq!(s.pci_functions, 20);
    assert_eq!(s.iommu_groups, 20);
    assert_eq!(s.ib_devices, 3);
    assert_eq!(s.tenants, 3);
    assert_eq!(s.assignments, 15);
    assert_eq!(
        read(&root, "/proc/sys/kernel/osrelease"),
        "6.1.0-26-amd64\n"
    );
    assert_eq!(
        read(&root, "/sys/module/vfio_pci/parameters/enable_sriov"),
        "N\n"
    );

    // The bus link is relative and lands on the device directory.
    assert_eq!(
        link_text(&root, "/sys/bus/pci/devices/0000:3b:00.0"),
        "../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0"
    );
    let pf = "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0";
    assert_eq!(read(&root, &format!("{pf}/vendor")), "0x15b3\n");
    assert_eq!(read(&root, &format!("{pf}/class")), "0x020700\n");
    assert_eq!(read(&root, &format!("{pf}/driver_override")), "(null)\n");
    assert_eq!(read(&root, &format!("{pf}/sriov_numvfs")), "8\n");
    assert_eq!(read(&root, &format!("{pf}/sriov_totalvfs")), "16\n");
    assert_eq!(read(&root, &format!("{pf}/sriov_vf_device")), "101c\n");
    assert_eq!(link_base(&root, &format!("{pf}/driver")), "mlx5_core");
    assert_eq!(
        link_text(&root, &format!("{pf}/virtfn0")),
        "../0000:3b:00.1"
    );
    // VF 7 spills over to the next device number.
    assert_eq!(
        link_text(&root, &format!("{pf}/virtfn7")),
        "../0000:3b:01.0"
    );
    let vf = root.join("sys/bus/pci/devices/0000:3b:01.0");
    assert!(vf.join("physfn").is_dir(), "bus link → dir with physfn");
    assert_eq!(
        fs::canonicalize(vf.join("physfn")).unwrap(),
        fs::canonicalize(root.join(&pf[1..])).unwrap()
    );
    assert_eq!(
        read(&root, "/sys/bus/pci/devices/0000:3b:01.0/driver_override"),
        "vfio-pci\n"
    );
    assert_eq!(
        link_base(&root, "/sys/bus/pci/devices/0000:3b:01.0/driver"),
        "vfio-pci"
    );
    assert!(exists(&root, "/sys/bus/pci/drivers/vfio-pci/0000:3b:01.0"));
    assert!(exists(&root, "/sys/bus/pci/drivers/vfio-pci/new_id"));
    assert!(exists(&root, "/sys/bus/pci/devices/0000:3b:01.0/reset"));
    assert_eq!(
        read(&root, "/sys/bus/pci/devices/0000:3b:01.0/reset_method"),
        "flr\n"
    );

    // Every VF in its own group, with a node owned by its tenant.
    let t = tenancy(&root);
    let mut groups = std::collections::BTreeSet::new();
    for pf in ["0000:3b:00.0", "0000:86:00.0"] {
        for i in 0..8 {
            let vf = link_base(&root, &format!("/sys/bus/pci/devices/{pf}/virtfn{i}"));
            let g = link_base(&root, &format!("/sys/bus/pci/devices/{vf}/iommu_group"));
            assert_eq!(
                names(&root, &format!("/sys/kernel/iommu_groups/{g}/devices")),
                vec![vf.clone()]
            );
            assert!(groups.insert(g.clone()));
            match tenant_of(&t, &vf) {
                Some(tenant) => {
                    let uid = match tenant.as_str() {
                        "acme" => 107,
                        "globex" => 108,
                        "initech" => 109,
                        _ => unreachable!(),
                    };
                    assert_eq!(
                        node_meta(&root, &format!("/dev/vfio/{g}")),
                        (uid, uid, 0o600)
                    );
                }
                None => {
                    assert_eq!(vf, "0000:86:01.0", "only the host VF is unassigned");
                    assert!(!exists(&root, &format!("/dev/vfio/{g}")));
                }
            }
        }
    }
    assert_eq!(tenant_of(&t, "0000:3b:00.1").as_deref(), Some("acme"));
    assert_eq!(tenant_of(&t, "0000:3b:00.2").as_deref(), Some("globex"));
    assert_eq!(tenant_of(&t, "0000:86:00.4").as_deref(), Some("initech"));
    let initech = t
        .tenants
        .iter()
        .find(|x| x.id.as_str() == "initech")
        .unwrap();
    assert_eq!(initech.partitions[0].pkey.0, 0xffff);

    // OFED VF GUIDs: distinct and non-zero except the two planted defects.
    let mut ports = std::collections::HashMap::<String, String>::new();
    let mut nodes = std::collections::HashSet::new();
    for (pf, path) in [
        ("0000:3b:00.0", pf.to_string()),
        (
            "0000:86:00.0",
            "/sys/devices/pci0000:85/0000:85:00.0/0000:86:00.0".to_string(),
        ),
    ] {
        for i in 0..8 {
            let d = format!("{path}/sriov/{i}");
            assert_eq!(read(&root, &format!("{d}/policy")), "Follow\n");
            let port = read(&root, &format!("{d}/port"));
            assert_eq!(port.len(), 24, "{port:?}");
            let node = read(&root, &format!("{d}/node"));
            assert!(nodes.insert(node.clone()) && node != "00:00:00:00:00:00:00:00\n");
            if let Some(other) = ports.insert(port.clone(), format!("{pf}/{i}")) {
                assert_eq!(
                    (other.as_str(), pf, i),
                    ("0000:3b:00.0/1", "0000:86:00.0", 1)
                );
            }
        }
    }
    assert_eq!(
        read(&root, &format!("{pf}/sriov/2/port")),
        "00:00:00:00:00:00:00:00\n"
    );
    assert_eq!(ports.len(), 15);

    // IB devices.
    let ib = "/sys/class/infiniband";
    assert_eq!(names(&root, ib), vec!["mlx5_0", "mlx5_1", "mlx5_2"]);
    assert_eq!(read(&root, &format!("{ib}/mlx5_0/node_type")), "1: CA\n");
    assert_eq!(
        read(&root, &format!("{ib}/mlx5_0/node_guid")),
        "0c42:a103:1000:0000\n"
    );
    assert_eq!(
        read(&root, &format!("{ib}/mlx5_0/ports/1/gids/0")),
        "fe80:0000:0000:0000:0c42:a103:2000:0000\n"
    );
    assert_eq!(read(&root, &format!("{ib}/mlx5_0/ports/1/lid")), "0x1a\n");
    assert_eq!(
        read(&root, &format!("{ib}/mlx5_0/ports/1/state")),
        "4: ACTIVE\n"
    );
    assert_eq!(
        read(&root, &format!("{ib}/mlx5_0/ports/1/pkeys/0")),
        "0xffff\n"
    );
    assert_eq!(
        read(&root, &format!("{ib}/mlx5_0/ports/1/pkeys/1")),
        "0x0000\n"
    );
    assert_eq!(
        link_base(&root, &format!("{ib}/mlx5_2/device")),
        "0000:86:01.0"
    );
    assert_eq!(
        read(&root, &format!("{ib}/mlx5_2/ports/1/pkeys/1")),
        "0x8001\n"
    );
    assert_eq!(
        link_base(&root, "/sys/bus/pci/devices/0000:86:01.0/driver"),
        "mlx5_core"
    );
}

#[test]
fn cx6_ib_vfs_option() {
    let (_tmp, root, s) = gen_into(Profile::Cx6Ib, Some(20));
    assert_eq!(s.pci_functions, 2 + 2 + 40);
    assert_eq!(
        read(&root, "/sys/bus/pci/devices/0000:3b:00.0/sriov_totalvfs"),
        "20\n"
    );
    // VF 19 = devfn 20 = 02.4; the host-bound VF is the last of PF 86.
    assert_eq!(
        link_base(&root, "/sys/bus/pci/devices/0000:86:02.4/driver"),
        "mlx5_core"
    );
}

#[test]
fn no_acs_layout() {
    let (_tmp, root, s) = gen_into(Profile::NoAcs, None);
    check_tree(&root);
    assert_eq!(s.pci_functions, 11);
    assert_eq!(
        names(&root, "/sys/kernel/iommu_groups/12/devices"),
        vec![
            "0000:01:00.0",
            "0000:02:00.0",
            "0000:02:01.0",
            "0000:03:00.0",
            "0000:04:00.0"
        ]
    );
    assert_eq!(
        names(&root, "/sys/kernel/iommu_groups/11/devices"),
        vec!["0000:00:1c.0"]
    );
    assert_eq!(
        link_text(&root, "/sys/bus/pci/devices/0000:03:00.0"),
        "../../../devices/pci0000:00/0000:00:1c.0/0000:01:00.0/0000:02:00.0/0000:03:00.0"
    );
    assert_eq!(
        link_text(
            &root,
            "/sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0/0000:02:00.0/0000:03:00.0/iommu_group"
        ),
        "../../../../../../kernel/iommu_groups/12"
    );
    assert_eq!(
        read(&root, "/sys/bus/pci/devices/0000:01:00.0/class"),
        "0x060400\n"
    );
    assert_eq!(
        read(
            &root,
            "/sys/bus/pci/devices/0000:01:00.0/secondary_bus_number"
        ),
        "2\n"
    );
    assert_eq!(
        names(&root, "/sys/kernel/iommu_groups/13/devices"),
        vec!["0000:05:00.0", "0000:05:00.1"]
    );
    assert_eq!(
        link_base(&root, "/sys/bus/pci/devices/0000:05:00.1/driver"),
        "snd_hda_intel"
    );
    // No reset for 06:00.0.
    assert!(!exists(&root, "/sys/bus/pci/devices/0000:06:00.0/reset"));
    assert_eq!(
        read(&root, "/sys/bus/pci/devices/0000:06:00.0/reset_method"),
        ""
    );
    assert_eq!(node_meta(&root, "/dev/vfio/12"), (107, 107, 0o600));
    assert_eq!(node_meta(&root, "/dev/vfio/vfio"), (0, 0, 0o666));
    assert_eq!(names(&root, "/dev/vfio"), vec!["12", "13", "14", "vfio"]);
    let t = tenancy(&root);
    assert_eq!(tenant_of(&t, "0000:03:00.0").as_deref(), Some("acme"));
    assert_eq!(tenant_of(&t, "0000:04:00.0").as_deref(), Some("globex"));
    // 6.1: vfio-dev without a cdev.
    assert!(exists(
        &root,
        "/sys/bus/pci/devices/0000:03:00.0/vfio-dev/vfio0"
    ));
    assert!(!exists(
        &root,
        "/sys/bus/pci/devices/0000:03:00.0/vfio-dev/vfio0/dev"
    ));
    assert!(!exists(&root, "/dev/vfio/devices"));
}

#[test]
fn userspace_pf_layout() {
    let (_tmp, root, s) = gen_into(Profile::UserspacePf, None);
    check_tree(&root);
    assert_eq!(s.pci_functions, 2 + 2 + 4 + 2);
    assert_eq!(
        read(&root, "/proc/sys/kernel/osrelease"),
        "6.8.0-45-generic\n"
    );
    assert_eq!(
        read(&root, "/sys/module/vfio_pci/parameters/enable_sriov"),
        "Y\n"
    );
    let pf = "/sys/bus/pci/devices/0000:5e:00.0";
    assert_eq!(link_base(&root, &format!("{pf}/driver")), "vfio-pci");
    assert_eq!(read(&root, &format!("{pf}/sriov_offset")), "128\n");
    assert_eq!(read(&root, &format!("{pf}/sriov_stride")), "2\n");
    let vfs: Vec<String> = (0..4)
        .map(|i| link_base(&root, &format!("{pf}/virtfn{i}")))
        .collect();
    assert_eq!(
        vfs,
        [
            "0000:5e:10.0",
            "0000:5e:10.2",
            "0000:5e:10.4",
            "0000:5e:10.6"
        ]
    );
    let t = tenancy(&root);
    assert_eq!(t.userspace_pfs.len(), 1);
    assert_eq!(t.userspace_pfs[0].device.to_string(), "0000:5e:00.0");
    assert_eq!(tenant_of(&t, "0000:5e:10.2").as_deref(), Some("globex"));
    assert_eq!(tenant_of(&t, "0000:af:10.0").as_deref(), Some("acme"));
    assert_eq!(tenant_of(&t, "0000:af:10.2"), None);
    assert_eq!(tenant_of(&t, "0000:5e:00.0"), None);
    // Per-device cdevs, owned like the group nodes.
    for vf in &vfs {
        let d = format!("/sys/bus/pci/devices/{vf}/vfio-dev");
        let x = names(&root, &d).pop().unwrap();
        let dev = read(&root, &format!("{d}/{x}/dev"));
        assert_eq!(dev, format!("511:{}\n", &x[4..]));
        let uid = if vf == "0000:5e:10.2" { 108 } else { 107 };
        assert_eq!(
            node_meta(&root, &format!("/dev/vfio/devices/{x}")),
            (uid, uid, 0o600)
        );
        let g = link_base(&root, &format!("/sys/bus/pci/devices/{vf}/iommu_group"));
        assert_eq!(
            node_meta(&root, &format!("/dev/vfio/{g}")),
            (uid, uid, 0o600)
        );
    }
    assert_eq!(names(&root, "/dev/vfio/devices").len(), 8);
}

#[test]
fn gpu_mdev_layout() {
    let (_tmp, root, s) = gen_into(Profile::GpuMdev, None);
    check_tree(&root);
    assert_eq!(s.mdevs, 6);
    assert_eq!(s.mdev_parents, 2);
    let parent = "/sys/class/mdev_bus/0000:65:00.0";
    let ty = format!("{parent}/mdev_supported_types/nvidia-63");
    assert_eq!(read(&root, &format!("{ty}/name")), "GRID T4-1Q\n");
    assert_eq!(read(&root, &format!("{ty}/device_api")), "vfio-pci\n");
    assert_eq!(read(&root, &format!("{ty}/available_instances")), "12\n");
    assert_eq!(names(&root, &format!("{ty}/devices")).len(), 4);
    assert!(
        names(
            &root,
            "/sys/class/mdev_bus/0000:66:00.0/mdev_supported_types/nvidia-63/devices"
        )
        .is_empty()
    );
    let u = "a1b2c3d4-0065-4000-8000-000000000001";
    let m = format!("/sys/bus/mdev/devices/{u}");
    assert_eq!(
        link_text(&root, &format!("{m}/mdev_type")),
        "../mdev_supported_types/nvidia-63"
    );
    assert_eq!(link_base(&root, &format!("{m}/driver")), "vfio_mdev");
    let g = link_base(&root, &format!("{m}/iommu_group"));
    assert_eq!(g, "24");
    assert_eq!(
        read(&root, &format!("/sys/kernel/iommu_groups/{g}/name")),
        "vfio-noiommu\n"
    );
    assert_eq!(
        names(&root, &format!("/sys/kernel/iommu_groups/{g}/devices")),
        vec![u]
    );
    let t = tenancy(&root);
    assert_eq!(t.non_isolating_parents[0].device, "0000:65:00.0");
    assert_eq!(tenant_of(&t, u).as_deref(), Some("acme"));
    assert_eq!(
        tenant_of(&t, "a1b2c3d4-0065-4000-8000-000000000003").as_deref(),
        Some("globex")
    );
    let bad = "a1b2c3d4-0066-4000-8000-000000000002";
    assert_eq!(tenant_of(&t, bad).as_deref(), Some("globex"));
    let g = link_base(&root, &format!("/sys/bus/mdev/devices/{bad}/iommu_group"));
    assert_eq!(g, "29");
    assert_eq!(node_meta(&root, "/dev/vfio/29"), (108, 108, 0o666));
    assert_eq!(node_meta(&root, "/dev/vfio/28"), (107, 107, 0o600));
}

#[test]
fn s390_ap_layout() {
    let (_tmp, root, s) = gen_into(Profile::S390Ap, None);
    check_tree(&root);
    assert_eq!((s.ap_cards, s.ap_queues, s.ap_matrix_mdevs), (4, 64, 2));
    assert_eq!(s.pci_functions, 0);
    assert_eq!(
        read(&root, "/sys/bus/ap/apmask"),
        format!("0x0c{}\n", "0".repeat(62))
    );
    assert_eq!(
        read(&root, "/sys/bus/ap/aqmask"),
        format!("0x{}\n", "f".repeat(64))
    );
    assert_eq!(read(&root, "/sys/bus/ap/bindings"), "64/64 (complete)\n");
    assert_eq!(
        link_text(&root, "/sys/bus/ap/devices/05.0013"),
        "../../../devices/ap/card05/05.0013"
    );
    assert_eq!(
        link_base(&root, "/sys/bus/ap/devices/05.0013/driver"),
        "cex4queue"
    );
    assert!(!exists(&root, "/sys/bus/ap/devices/05.0013/status"));
    assert_eq!(read(&root, "/sys/bus/ap/devices/card06/hwtype"), "13\n");
    assert_eq!(read(&root, "/sys/bus/ap/devices/card06/type"), "CEX7C\n");
    assert_eq!(
        link_base(&root, "/sys/bus/ap/devices/card06/driver"),
        "cex4card"
    );
    assert_eq!(
        read(&root, "/sys/bus/ap/devices/06.0013/status"),
        "assigned\n"
    );
    assert_eq!(
        read(&root, "/sys/bus/ap/devices/07.0013/status"),
        "assigned\n"
    );
    assert_eq!(
        read(&root, "/sys/bus/ap/devices/07.0010/status"),
        "unassigned\n"
    );
    assert_eq!(names(&root, "/sys/bus/ap/drivers/vfio_ap").len(), 2 + 32);
    assert_eq!(names(&root, "/sys/bus/ap/drivers/cex4queue").len(), 2 + 32);
    assert_eq!(names(&root, "/sys/bus/ap/drivers/cex4card").len(), 2 + 4);

    let ty = "/sys/devices/vfio_ap/matrix/mdev_supported_types/vfio_ap-passthrough";
    assert_eq!(
        read(&root, &format!("{ty}/name")),
        "VFIO AP Passthrough Device\n"
    );
    assert_eq!(read(&root, &format!("{ty}/device_api")), "vfio-ap\n");
    assert_eq!(
        link_text(&root, "/sys/class/mdev_bus/matrix"),
        "../../devices/vfio_ap/matrix"
    );
    let a = "/sys/devices/vfio_ap/matrix/0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01";
    assert_eq!(
        read(&root, &format!("{a}/matrix")),
        "06.0010\n06.0011\n06.0012\n06.0013\n06.0020\n"
    );
    assert_eq!(
        read(&root, &format!("{a}/guest_matrix")),
        "06.0010\n06.0011\n06.0012\n06.0013\n"
    );
    assert_eq!(read(&root, &format!("{a}/control_domains")), "0010\n");
    assert!(exists(&root, &format!("{a}/assign_adapter")));
    let b = "/sys/bus/mdev/devices/0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0b02";
    assert_eq!(
        read(&root, &format!("{b}/matrix")),
        "05.0013\n05.0014\n06.0013\n06.0014\n07.0013\n07.0014\n"
    );
    assert_eq!(
        read(&root, &format!("{b}/guest_matrix")),
        "06.0013\n06.0014\n07.0013\n07.0014\n"
    );
    assert_eq!(read(&root, &format!("{b}/control_domains")), "");
    assert_eq!(link_base(&root, &format!("{b}/driver")), "vfio_ap_mdev");
    assert_eq!(link_base(&root, &format!("{b}/iommu_group")), "1");
    assert_eq!(node_meta(&root, "/dev/vfio/0"), (107, 107, 0o600));
    assert_eq!(node_meta(&root, "/dev/vfio/1"), (108, 108, 0o600));
    let t = tenancy(&root);
    assert_eq!(
        tenant_of(&t, "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0b02").as_deref(),
        Some("globex")
    );
}

#[test]
fn scale_layout_and_speed() {
    let start = Instant::now();
    let (_tmp, root, s) = gen_into(Profile::Scale, None);
    let took = start.elapsed();
    eprintln!("scale: generated in {took:?}: {s}");
    assert_eq!(s.pci_functions, 16 + 16 + 4096 + 4 + 4);
    assert_eq!(s.mdevs, 1024 + 16);
    assert_eq!(s.ap_queues, 65536);
    assert_eq!(s.ap_matrix_mdevs, 16);
    assert_eq!(s.tenants, 64);
    assert_eq!(s.assignments, 4096 + 1024 + 16);
    assert_eq!(names(&root, "/sys/bus/pci/devices").len(), 4136);
    assert_eq!(names(&root, "/sys/bus/mdev/devices").len(), 1040);
    assert_eq!(names(&root, "/sys/bus/ap/drivers/vfio_ap").len(), 65536 + 2);
    assert_eq!(
        read(&root, "/sys/bus/ap/apmask"),
        format!("0x{}\n", "0".repeat(64))
    );
    // VF 255 of the first PF spills onto the next bus.
    assert_eq!(
        link_base(&root, "/sys/bus/pci/devices/0000:10:00.0/virtfn255"),
        "0000:11:00.0"
    );
    let m = "/sys/devices/vfio_ap/matrix/5ca1eaa0-0000-4000-8000-00000000000f";
    let text = read(&root, &format!("{m}/matrix"));
    assert_eq!(text.lines().count(), 16 * 256);
    assert!(text.starts_with("f0.0000\n"));
    assert_eq!(read(&root, &format!("{m}/guest_matrix")), text);
    let t = tenancy(&root);
    assert_eq!(tenant_of(&t, "0000:10:00.1").as_deref(), Some("t00"));
    assert_eq!(tenant_of(&t, "0000:11:00.0").as_deref(), Some("t63"));
}

#[test]
fn lab_layout() {
    let (_tmp, root, s) = gen_into(Profile::Lab, None);
    check_tree(&root);
    // Root ports and functions: GPU 1+1, mlx5 1+1+4, igb 1+1+2, user-space PF 1+1+2.
    assert_eq!(s.pci_functions, 16);
    assert_eq!(s.iommu_groups, 16);
    assert_eq!((s.mdev_parents, s.mdevs, s.ib_devices), (1, 0, 1));
    assert_eq!((s.tenants, s.assignments), (2, 0));
    assert_eq!(
        read(&root, "/proc/sys/kernel/osrelease"),
        "6.1.0-26-amd64\n"
    );
    assert_eq!(
        read(&root, "/sys/module/vfio_pci/parameters/enable_sriov"),
        "Y\n"
    );
    let t = tenancy(&root);
    assert!(t.assignments.is_empty() && t.userspace_pfs.is_empty());
    assert!(t.non_isolating_parents.is_empty());
    let ids: Vec<String> = t.tenants.iter().map(|t| t.id.to_string()).collect();
    assert_eq!(ids, ["acme", "globex"]);

    // (function, driver, group); every vfio function has a root:root 0600 node.
    let functions = [
        ("0000:3b:00.0", "mlx5_core", 31),
        ("0000:3b:00.1", "vfio-pci", 32),
        ("0000:3b:00.2", "vfio-pci", 33),
        ("0000:3b:00.3", "vfio-pci", 34),
        ("0000:3b:00.4", "vfio-pci", 35),
        ("0000:5e:00.0", "igb", 41),
        ("0000:5e:10.0", "vfio-pci", 42),
        ("0000:5e:10.2", "vfio-pci", 43),
        ("0000:65:00.0", "nvidia", 21),
        ("0000:af:00.0", "vfio-pci", 45),
        ("0000:af:10.0", "vfio-pci", 46),
        ("0000:af:10.2", "vfio-pci", 47),
    ];
    for (f, drv, g) in functions {
        let d = format!("/sys/bus/pci/devices/{f}");
        assert_eq!(link_base(&root, &format!("{d}/driver")), drv, "{f}");
        assert_eq!(
            link_base(&root, &format!("{d}/iommu_group")),
            g.to_string(),
            "{f}"
        );
        assert_eq!(read(&root, &format!("{d}/reset_method")), "flr\n", "{f}");
        if drv == "vfio-pci" {
            assert_eq!(node_meta(&root, &format!("/dev/vfio/{g}")), (0, 0, 0o600));
            assert_eq!(read(&root, &format!("{d}/driver_override")), "vfio-pci\n");
        } else {
            assert!(!exists(&root, &format!("/dev/vfio/{g}")), "{f}");
        }
    }
    assert!(!exists(&root, "/dev/vfio/devices"));
    for (pf, vfs) in [
        ("0000:5e:00.0", ["0000:5e:10.0", "0000:5e:10.2"]),
        ("0000:af:00.0", ["0000:af:10.0", "0000:af:10.2"]),
    ] {
        let d = format!("/sys/bus/pci/devices/{pf}");
        assert_eq!(read(&root, &format!("{d}/sriov_numvfs")), "2\n");
        assert_eq!(read(&root, &format!("{d}/sriov_stride")), "2\n");
        for (i, vf) in vfs.iter().enumerate() {
            assert_eq!(link_base(&root, &format!("{d}/virtfn{i}")), *vf);
        }
    }

    // The ConnectX-6 PF: IB device, IPoIB netdev, distinct non-zero VF GUIDs.
    let pf = "/sys/bus/pci/devices/0000:3b:00.0";
    assert_eq!(read(&root, &format!("{pf}/sriov_numvfs")), "4\n");
    assert_eq!(link_base(&root, "/sys/class/net/ib0"), "ib0");
    assert!(exists(&root, &format!("{pf}/net/ib0/ifindex")));
    assert_eq!(names(&root, &format!("{pf}/infiniband")), ["mlx5_0"]);
    assert_eq!(
        read(&root, "/sys/class/infiniband/mlx5_0/ports/1/gids/0"),
        "fe80:0000:0000:0000:0c42:a103:2000:0000\n"
    );
    let ports: Vec<String> = (0..4)
        .map(|i| read(&root, &format!("{pf}/sriov/{i}/port")))
        .collect();
    assert_eq!(
        ports,
        [
            "0c:42:a1:03:40:00:00:00\n",
            "0c:42:a1:03:40:00:00:01\n",
            "0c:42:a1:03:40:00:00:02\n",
            "0c:42:a1:03:40:00:00:03\n",
        ]
    );

    // The vGPU parent: one type, instances available, none created.
    let parent = "/sys/class/mdev_bus/0000:65:00.0/mdev_supported_types";
    assert_eq!(names(&root, parent), ["nvidia-63"]);
    assert_eq!(
        read(&root, &format!("{parent}/nvidia-63/available_instances")),
        "12\n"
    );
    assert!(names(&root, &format!("{parent}/nvidia-63/devices")).is_empty());
    assert!(!exists(&root, "/sys/bus/mdev/devices"));
}

/// The inventory reader finds everything and has no problems on each profile.
#[test]
fn inventory_of_each_profile() {
    for profile in Profile::ALL {
        let vfs = (profile == Profile::Scale).then_some(300);
        let (_tmp, root, s) = gen_into(profile, vfs);
        let inv = crate::read_inventory(&crate::HostRoot::new(&root)).unwrap();
        assert!(
            inv.problems.is_empty(),
            "{profile}: {:#?}",
            &inv.problems[..inv.problems.len().min(10)]
        );
        assert_eq!(inv.pci.len() as u32, s.pci_functions, "{profile}");
        assert_eq!(inv.iommu_groups.len() as u32, s.iommu_groups, "{profile}");
        assert_eq!(inv.mdevs.len() as u32, s.mdevs, "{profile}");
        assert_eq!(inv.ib.len() as u32, s.ib_devices, "{profile}");
        assert_eq!(inv.mdev_parents.len() as u32, s.mdev_parents, "{profile}");
        let groups_with_nodes = inv
            .vfio_nodes
            .iter()
            .filter(|n| matches!(n.kind, devfence_model::VfioNodeKind::Group(_)))
            .count();
        // The testbed has nothing on vfio yet.
        assert_eq!(
            groups_with_nodes > 0,
            profile != Profile::Testbed,
            "{profile}"
        );
        match &inv.ap {
            Some(ap) => {
                assert_eq!(ap.queues.len() as u32, s.ap_queues, "{profile}");
                assert_eq!(ap.cards.len() as u32, s.ap_cards, "{profile}");
                assert_eq!(ap.matrix_mdevs.len() as u32, s.ap_matrix_mdevs, "{profile}");
            }
            None => assert_eq!(s.ap_queues, 0, "{profile}"),
        }
        match profile {
            Profile::Cx6Ib => {
                assert_eq!(inv.kernel_release.as_deref(), Some("6.1.0-26-amd64"));
                let pf = inv.pci_function("0000:3b:00.0".parse().unwrap()).unwrap();
                let sriov = pf.sriov.as_ref().unwrap();
                assert_eq!(sriov.vfs.len(), 8);
                assert_eq!(sriov.vf_guids.len(), 8);
                assert_eq!(sriov.vf_guids[2].port_guid, Some(devfence_model::Guid(0)));
                let vf = inv.pci_function("0000:3b:01.0".parse().unwrap()).unwrap();
                assert_eq!(vf.physfn, Some("0000:3b:00.0".parse().unwrap()));
                assert_eq!(vf.driver.as_deref(), Some("vfio-pci"));
                assert_eq!(vf.driver_override.as_deref(), Some("vfio-pci"));
                assert!(vf.has_reset);
                let host = inv.ib.iter().find(|d| d.name == "mlx5_2").unwrap();
                assert_eq!(host.pci, Some("0000:86:01.0".parse().unwrap()));
                assert_eq!(host.ports[0].pkeys.len(), 2);
            }
            Profile::NoAcs => {
                let g = inv.group(devfence_model::IommuGroupId(12)).unwrap();
                assert_eq!(g.members.len(), 5);
                let nvme = inv.pci_function("0000:06:00.0".parse().unwrap()).unwrap();
                assert!(!nvme.has_reset && nvme.reset_methods.is_empty());
            }
            Profile::UserspacePf => {
                assert_eq!(inv.vfio_pci.as_ref().unwrap().enable_sriov, Some(true));
                let cdevs = inv
                    .vfio_nodes
                    .iter()
                    .filter(|n| matches!(n.kind, devfence_model::VfioNodeKind::Device(_)))
                    .count();
                assert_eq!(cdevs, 8);
            }
            Profile::S390Ap => {
                let ap = inv.ap.as_ref().unwrap();
                assert_eq!(ap.apmask.unwrap().iter().collect::<Vec<_>>(), vec![4, 5]);
                assert_eq!(ap.matrix_mdevs.len(), 2);
            }
            Profile::Scale => {
                // 300 VFs: one PF of 256, one of 44.
                let pf = inv.pci_function("0000:13:00.0".parse().unwrap()).unwrap();
                assert_eq!(pf.sriov.as_ref().unwrap().num_vfs, Some(44));
                assert_eq!(s.pci_functions, 2 + 2 + 300 + 8);
                assert_eq!(inv.vfio_nodes.len(), 1 + 300 + 1024 + 16);
            }
            Profile::GpuMdev => {
                assert_eq!(inv.mdev_parents[0].types.len(), 2);
            }
            Profile::Testbed => {
                assert_eq!(inv.kernel_release.as_deref(), Some("6.1.0-testbed"));
                assert_eq!(inv.vfio_pci.as_ref().unwrap().enable_sriov, Some(true));
                // The groups docs/testbed.md records for the real guest.
                let names: Vec<(u32, Vec<String>)> = inv
                    .iommu_groups
                    .iter()
                    .map(|g| (g.id.0, g.members.iter().map(ToString::to_string).collect()))
                    .collect();
                let groups: Vec<(u32, Vec<&str>)> = names
                    .iter()
                    .map(|(i, m)| (*i, m.iter().map(String::as_str).collect()))
                    .collect();
                assert_eq!(
                    groups,
                    vec![
                        (0, vec!["0000:00:00.0"]),
                        (1, vec!["0000:00:01.0"]),
                        (2, vec!["0000:00:02.0"]),
                        (3, vec!["0000:00:03.0"]),
                        (4, vec!["0000:00:04.0", "0000:04:00.0"]),
                        (5, vec!["0000:00:05.0"]),
                        (6, vec!["0000:00:10.0"]),
                        (7, vec!["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"]),
                        (8, vec!["0000:01:00.0"]),
                        (9, vec!["0000:02:00.0"]),
                        (10, vec!["0000:03:00.0"]),
                        (11, vec!["0000:05:00.0", "0000:05:00.1"]),
                    ]
                );
                for (pf, drv, total) in [
                    ("0000:01:00.0", "igb", 7),
                    ("0000:02:00.0", "igb", 7),
                    ("0000:04:00.0", "igb", 7),
                    ("0000:03:00.0", "nvme", 2),
                ] {
                    let f = inv.pci_function(pf.parse().unwrap()).unwrap();
                    assert_eq!(f.driver.as_deref(), Some(drv), "{pf}");
                    let sriov = f.sriov.as_ref().unwrap();
                    assert_eq!((sriov.total_vfs, sriov.num_vfs), (Some(total), Some(0)));
                }
                assert_eq!(inv.vfio_nodes.len(), 1, "the container only");
                assert_eq!(inv.mdev_parents[0].name, "mtty");
                assert_eq!(inv.mdev_parents[0].types.len(), 2);
            }
            Profile::Lab => {
                assert_eq!(inv.kernel_release.as_deref(), Some("6.1.0-26-amd64"));
                assert_eq!(inv.vfio_pci.as_ref().unwrap().enable_sriov, Some(true));
                // Every node root's, no per-device node.
                assert!(inv.vfio_nodes.iter().all(|n| n.uid == 0 && n.gid == 0));
                assert!(
                    !inv.vfio_nodes
                        .iter()
                        .any(|n| matches!(n.kind, devfence_model::VfioNodeKind::Device(_)))
                );
                assert!(inv.mdevs.is_empty());
                assert_eq!(inv.mdev_parents[0].types.len(), 1);
            }
        }
    }
}

#[test]
fn builder_rejects_bad_paths_and_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = TreeBuilder::new(tmp.path()).unwrap();
    assert!(matches!(
        b.file("sys/x", "1\n"),
        Err(SimError::BadKernelPath { .. })
    ));
    assert!(matches!(
        b.link("/sys/a/../b", "/sys/c"),
        Err(SimError::BadKernelPath { .. })
    ));
    b.file("/sys/x", "1\n").unwrap();
    assert!(matches!(
        b.file("/sys/x", "2\n"),
        Err(SimError::Write { .. })
    ));
    assert_eq!(fs::read_to_string(tmp.path().join("sys/x")).unwrap(), "1\n");
    let e = b
        .sriov(&SriovSpec {
            pf: "0000:3b:00.0".parse().unwrap(),
            total_vfs: 1,
            offset: 1,
            stride: 1,
            vf_device: 1,
            drivers_autoprobe: true,
            vfs: &[],
        })
        .unwrap_err();
    assert!(e.to_string().contains("0000:3b:00.0"), "{e}");
    let s = b.finish();
    assert_eq!((s.files, s.dirs), (1, 1));
}

/// Every InfiniBand GUID a generated tree holds: the IB devices' node and port
/// GUIDs and the VFs' OFED `sriov/<N>/{node,port}` attributes (zero, "not
/// set", left out).
fn ib_guids(root: &Path) -> std::collections::BTreeSet<String> {
    fn walk(dir: &Path, out: &mut std::collections::BTreeSet<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if ft.is_dir() {
                walk(&p, out);
            } else if ft.is_file()
                && (name == "node_guid"
                    || name == "sys_image_guid"
                    || ((name == "node" || name == "port")
                        && p.parent()
                            .and_then(Path::parent)
                            .is_some_and(|g| g.ends_with("sriov"))))
            {
                let v = fs::read_to_string(&p).unwrap().trim().replace(':', "");
                // An unassigned VF GUID reads as zero on every host.
                if v.bytes().any(|b| b != b'0') {
                    out.insert(v);
                }
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(&root.join("sys/devices"), &mut out);
    out
}

/// `--host-id` gives a host's InfiniBand GUIDs their own byte, so several
/// simulated hosts can be nodes of one fabric; host 0 keeps the documented ones.
#[test]
fn host_ids_give_disjoint_ib_guids_and_zero_keeps_the_profiles_own() {
    let gen_host = |id: u8| {
        let tmp = scratch();
        let out = tmp.path().join("host");
        generate(&GenerateOptions {
            profile: Profile::Cx6Ib,
            out: out.clone(),
            vfs: Some(8),
            host_id: id,
        })
        .unwrap();
        let g = ib_guids(&out);
        drop(tmp);
        g
    };
    let (h0, h1, h2) = (gen_host(0), gen_host(1), gen_host(2));
    assert!(h0.len() >= 16, "{h0:?}");
    assert_eq!(h0.len(), h1.len());
    assert!(h0.contains("0c42a10340000000"), "{h0:?}");
    let shared: Vec<_> = h0.intersection(&h1).collect();
    assert!(shared.is_empty(), "{shared:?}");
    assert!(h0.is_disjoint(&h2) && h1.is_disjoint(&h2));
    assert!(h1.contains("0c42a10240000000"), "{h1:?}");
}
