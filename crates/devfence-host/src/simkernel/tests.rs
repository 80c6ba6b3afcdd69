//! Tests of the simulated kernel: each semantic with its errno, and that a refused
//! write changes nothing (the whole tree is compared before and after); then
//! scenarios read back through the ordinary inventory.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use devfence_model::{ApMatrix, Apqn, Bdf, Guid, Inventory, IommuGroupId, MdevUuid};

use super::*;
use crate::sim::{GenerateOptions, Profile, generate};

use crate::sim::tests::scratch;

/// A generated profile and a simulated kernel over it.
struct Host {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    k: SimKernel,
}

fn host(profile: Profile) -> Host {
    let tmp = scratch();
    let root = tmp.path().join("host");
    generate(&GenerateOptions {
        profile,
        out: root.clone(),
        vfs: None,
        host_id: 0,
    })
    .unwrap();
    let k = SimKernel::new(HostRoot::new(&root)).unwrap();
    Host { _tmp: tmp, root, k }
}

impl Host {
    fn w(&self, path: &str, value: &str) -> Result<(), Errno> {
        self.k.write(path, value.as_bytes())
    }
    fn r(&self, path: &str) -> String {
        String::from_utf8(self.k.read(path).unwrap()).unwrap()
    }
    fn inv(&self) -> Inventory {
        let inv = crate::read_inventory(&HostRoot::new(&self.root)).unwrap();
        assert!(inv.problems.is_empty(), "{:#?}", inv.problems);
        inv
    }
    fn snap(&self) -> BTreeMap<PathBuf, Snap> {
        snapshot(&self.root)
    }
    /// `f` fails with `errno` and leaves the tree as it was.
    fn refused(&self, errno: Errno, f: impl FnOnce() -> Result<(), Errno>) {
        let before = self.snap();
        assert_eq!(f(), Err(errno));
        assert_snap_eq(&before, &self.snap());
    }
    /// Writing `value` to `path` fails with `errno` and changes nothing.
    fn refuses(&self, path: &str, value: &str, errno: Errno) {
        let before = self.snap();
        assert_eq!(self.w(path, value), Err(errno), "{path} <- {value:?}");
        assert_snap_eq(&before, &self.snap());
    }
    fn exists(&self, path: &str) -> bool {
        self.k.exists(path)
    }
    fn driver(&self, bdf: &str) -> Option<String> {
        self.k
            .read_link(&format!("/sys/bus/pci/devices/{bdf}/driver"))
            .ok()
            .map(|t| t.rsplit('/').next().unwrap().to_owned())
    }
    /// Binds a function to `drv` the way devfence does: override, unbind, probe.
    fn rebind(&self, bdf: &str, drv: &str) {
        let d = format!("/sys/bus/pci/devices/{bdf}");
        self.w(&format!("{d}/driver_override"), &format!("{drv}\n"))
            .unwrap();
        if self.exists(&format!("{d}/driver")) {
            self.w(&format!("{d}/driver/unbind"), bdf).unwrap();
        }
        self.w("/sys/bus/pci/drivers_probe", bdf).unwrap();
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Snap {
    File(Vec<u8>, u32, u32, u32),
    Dir(u32),
    Link(PathBuf),
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Snap> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Snap>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            // The simulator's own state beside the tree is not what the kernel shows.
            if rel.starts_with("run/devfence-simkernel") {
                continue;
            }
            if m.file_type().is_symlink() {
                out.insert(rel, Snap::Link(fs::read_link(&p).unwrap()));
            } else if m.is_dir() {
                out.insert(rel, Snap::Dir(m.mode()));
                walk(root, &p, out);
            } else {
                out.insert(
                    rel,
                    Snap::File(fs::read(&p).unwrap(), m.mode(), m.uid(), m.gid()),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_snap_eq(a: &BTreeMap<PathBuf, Snap>, b: &BTreeMap<PathBuf, Snap>) {
    let diff: Vec<_> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, _)| format!("changed/removed {}", k.display()))
        .chain(
            b.keys()
                .filter(|k| !a.contains_key(*k))
                .map(|k| format!("added {}", k.display())),
        )
        .take(20)
        .collect();
    assert!(diff.is_empty(), "tree changed: {diff:#?}");
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

fn uuid(s: &str) -> MdevUuid {
    s.parse().unwrap()
}

fn group_of(inv: &Inventory, b: &str) -> u32 {
    inv.pci_function(bdf(b)).unwrap().iommu_group.unwrap().0
}

fn node_exists(inv: &Inventory, g: u32) -> bool {
    inv.vfio_nodes
        .iter()
        .any(|n| n.path == format!("/dev/vfio/{g}"))
}

const PF1: &str = "0000:01:00.0";
const PF1_DEV: &str = "/sys/bus/pci/devices/0000:01:00.0";

// ---------------------------------------------------------------------------
// driver_override

#[test]
fn driver_override_sets_clears_and_binds_nothing() {
    let h = host(Profile::Testbed);
    let f = format!("{PF1_DEV}/driver_override");
    assert_eq!(h.r(&f), "(null)\n");
    h.w(&f, "vfio-pci\n").unwrap();
    assert_eq!(h.r(&f), "vfio-pci\n");
    assert_eq!(h.driver(PF1).as_deref(), Some("igb"));
    // The device path reaches the same attribute.
    let dev =
        h.k.root()
            .kernel_path(&fs::canonicalize(h.root.join(&f[1..])).unwrap());
    assert!(
        dev.starts_with("/sys/devices/pci0000:00/0000:00:01.0/"),
        "{dev}"
    );
    h.w(&dev, "pci-stub").unwrap();
    assert_eq!(h.r(&f), "pci-stub\n");
    // Cut at the first newline.
    h.w(&f, "vfio-pci\nrest").unwrap();
    assert_eq!(h.r(&f), "vfio-pci\n");
    // A zero-length write reaches no store method: nothing changes.
    h.w(&f, "").unwrap();
    assert_eq!(h.r(&f), "vfio-pci\n");
    h.w(&f, "\n").unwrap();
    assert_eq!(h.r(&f), "(null)\n");
    assert_eq!(
        h.inv().pci_function(bdf(PF1)).unwrap().driver_override,
        None
    );
    h.refuses(&f, &"x".repeat(4095), Errno::EINVAL);
}

// ---------------------------------------------------------------------------
// unbind, bind, drivers_probe

#[test]
fn unbind_needs_the_bound_driver() {
    let h = host(Profile::Testbed);
    h.refuses("/sys/bus/pci/drivers/vfio-pci/unbind", PF1, Errno::ENODEV);
    h.refuses(
        "/sys/bus/pci/drivers/igb/unbind",
        "0000:09:00.0",
        Errno::ENODEV,
    );
    h.refuses(
        "/sys/bus/pci/drivers/igb/unbind",
        "0000:01:00.0 ",
        Errno::ENODEV,
    );
    h.refuses(
        "/sys/bus/pci/drivers/igb/unbind",
        "0000:02:00.0\n\n",
        Errno::ENODEV,
    );
    h.w("/sys/bus/pci/drivers/igb/unbind", "0000:01:00.0\n")
        .unwrap();
    assert_eq!(h.driver(PF1), None);
    assert!(!h.exists("/sys/bus/pci/drivers/igb/0000:01:00.0"));
    assert!(h.exists("/sys/bus/pci/drivers/igb/0000:02:00.0"));
    h.refuses("/sys/bus/pci/drivers/igb/unbind", PF1, Errno::ENODEV);
    assert_eq!(h.inv().pci_function(bdf(PF1)).unwrap().driver, None);
}

#[test]
fn unbinding_vfio_removes_the_vfio_device_and_the_last_node() {
    let h = host(Profile::NoAcs);
    // Group 12 has two NICs on vfio-pci and one node.
    assert!(h.exists("/dev/vfio/12"));
    h.w(
        "/sys/bus/pci/devices/0000:03:00.0/driver/unbind",
        "0000:03:00.0",
    )
    .unwrap();
    let inv = h.inv();
    let nic = inv.pci_function(bdf("0000:03:00.0")).unwrap();
    assert_eq!((nic.driver.as_deref(), nic.vfio_dev.len()), (None, 0));
    assert!(node_exists(&inv, 12), "04:00.0 is still on vfio-pci");
    h.w("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:04:00.0")
        .unwrap();
    let inv = h.inv();
    assert!(!node_exists(&inv, 12));
    assert!(node_exists(&inv, 13));
    assert!(!h.exists("/sys/class/vfio-dev/vfio0"));
}

#[test]
fn bind_matches_through_override_or_id_table() {
    let h = host(Profile::Testbed);
    let bind = "/sys/bus/pci/drivers/vfio-pci/bind";
    h.refuses(bind, "0000:09:00.0", Errno::ENODEV);
    h.refuses(bind, "garbage", Errno::ENODEV);
    h.w("/sys/bus/pci/drivers/igb/unbind", PF1).unwrap();
    // vfio-pci matches only through driver_override.
    h.refuses(bind, PF1, Errno::ENODEV);
    h.w(&format!("{PF1_DEV}/driver_override"), "nvme").unwrap();
    h.refuses(bind, PF1, Errno::ENODEV);
    h.refuses("/sys/bus/pci/drivers/igb/bind", PF1, Errno::ENODEV);
    h.w(&format!("{PF1_DEV}/driver_override"), "vfio-pci")
        .unwrap();
    // Already bound: EBUSY (0000:02:00.0 is on igb, and matches igb).
    h.refuses(
        "/sys/bus/pci/drivers/igb/bind",
        "0000:02:00.0",
        Errno::EBUSY,
    );
    h.w(bind, PF1).unwrap();
    h.refuses(bind, PF1, Errno::EBUSY);
    let inv = h.inv();
    let pf = inv.pci_function(bdf(PF1)).unwrap();
    assert_eq!(pf.driver.as_deref(), Some("vfio-pci"));
    assert_eq!(pf.vfio_dev[0].name, "vfio0");
    assert_eq!(pf.vfio_dev[0].dev, None, "no cdev on 6.1");
    let node = inv
        .vfio_nodes
        .iter()
        .find(|n| n.path == "/dev/vfio/8")
        .unwrap();
    assert_eq!((node.uid, node.gid, node.mode), (0, 0, 0o600));
    assert!(inv.vfio_nodes.iter().any(|n| n.path == "/dev/vfio/vfio"));
    // Back to the native driver: clear the override, unbind, bind igb.
    h.w(&format!("{PF1_DEV}/driver_override"), "\n").unwrap();
    h.w("/sys/bus/pci/drivers/vfio-pci/unbind", PF1).unwrap();
    assert!(!h.exists("/dev/vfio/8"));
    h.w("/sys/bus/pci/drivers/igb/bind", PF1).unwrap();
    assert_eq!(h.driver(PF1).as_deref(), Some("igb"));
    // vfio-pci's probe refuses a bridge: the error passes through bind.
    let rp = "/sys/bus/pci/devices/0000:00:03.0";
    h.w(&format!("{rp}/driver_override"), "vfio-pci").unwrap();
    h.w(&format!("{rp}/driver/unbind"), "0000:00:03.0").unwrap();
    h.refuses(bind, "0000:00:03.0", Errno::EINVAL);
    // drivers_probe swallows probe errors: it stays unbound.
    let before = h.snap();
    h.w("/sys/bus/pci/drivers_probe", "0000:00:03.0").unwrap();
    assert_snap_eq(&before, &h.snap());
}

#[test]
fn drivers_probe_binds_override_or_native() {
    let h = host(Profile::Testbed);
    h.refuses("/sys/bus/pci/drivers_probe", "0000:09:00.0", Errno::ENODEV);
    // Bound: nothing to do.
    let before = h.snap();
    h.w("/sys/bus/pci/drivers_probe", PF1).unwrap();
    assert_snap_eq(&before, &h.snap());
    // Override naming a driver that is not loaded: stays unbound.
    h.w(&format!("{PF1_DEV}/driver_override"), "mlx5_core")
        .unwrap();
    h.w("/sys/bus/pci/drivers/igb/unbind", PF1).unwrap();
    let before = h.snap();
    h.w("/sys/bus/pci/drivers_probe", PF1).unwrap();
    assert_snap_eq(&before, &h.snap());
    // No override: the native driver.
    h.w(&format!("{PF1_DEV}/driver_override"), "\n").unwrap();
    h.w("/sys/bus/pci/drivers_probe", PF1).unwrap();
    assert_eq!(h.driver(PF1).as_deref(), Some("igb"));
    // The standard sequence to vfio-pci, twice over two functions: fresh indexes.
    h.rebind(PF1, "vfio-pci");
    h.rebind("0000:03:00.0", "vfio-pci");
    let inv = h.inv();
    assert_eq!(
        inv.pci_function(bdf(PF1)).unwrap().vfio_dev[0].name,
        "vfio0"
    );
    let nvme = inv.pci_function(bdf("0000:03:00.0")).unwrap();
    assert_eq!(nvme.vfio_dev[0].name, "vfio1");
    assert!(node_exists(&inv, 8) && node_exists(&inv, 10) && !node_exists(&inv, 9));
    assert_eq!(h.k.native_driver(bdf(PF1)).as_deref(), Some("igb"));
}

#[test]
fn binding_a_dma_driver_next_to_an_open_device_is_ebusy() {
    let h = host(Profile::NoAcs);
    let open = h.k.open_vf(bdf("0000:03:00.0"), None).unwrap();
    let nic = "/sys/bus/pci/devices/0000:04:00.0";
    h.w(&format!("{nic}/driver/unbind"), "0000:04:00.0")
        .unwrap();
    h.w(&format!("{nic}/driver_override"), "\n").unwrap();
    assert_eq!(
        h.k.native_driver(bdf("0000:04:00.0")).as_deref(),
        Some("igb")
    );
    // igb is loaded (its driver directory exists).
    fs::create_dir_all(h.root.join("sys/bus/pci/drivers/igb")).unwrap();
    fs::write(h.root.join("sys/bus/pci/drivers/igb/bind"), "").unwrap();
    h.refuses("/sys/bus/pci/drivers_probe", "0000:04:00.0", Errno::EBUSY);
    h.refuses(
        "/sys/bus/pci/drivers/igb/bind",
        "0000:04:00.0",
        Errno::EBUSY,
    );
    // vfio-pci manages its own DMA: allowed.
    h.w(&format!("{nic}/driver_override"), "vfio-pci").unwrap();
    h.w("/sys/bus/pci/drivers_probe", "0000:04:00.0").unwrap();
    assert_eq!(h.driver("0000:04:00.0").as_deref(), Some("vfio-pci"));
    // An open device cannot be unbound (the kernel would block).
    h.refuses(
        "/sys/bus/pci/drivers/vfio-pci/unbind",
        "0000:03:00.0",
        Errno::EBUSY,
    );
    assert_eq!(h.k.open_count(bdf("0000:03:00.0")), 1);
    open.close();
    assert_eq!(h.k.open_count(bdf("0000:03:00.0")), 0);
    h.w("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:04:00.0")
        .unwrap();
    h.w(&format!("{nic}/driver_override"), "\n").unwrap();
    h.w("/sys/bus/pci/drivers_probe", "0000:04:00.0").unwrap();
    assert_eq!(h.driver("0000:04:00.0").as_deref(), Some("igb"));
    // Now the group is not viable: opening the other NIC is refused.
    assert_eq!(
        h.k.open_vf(bdf("0000:03:00.0"), None).unwrap_err(),
        Errno::EPERM
    );
}

// ---------------------------------------------------------------------------
// sriov_numvfs

#[test]
fn sriov_numvfs_errnos() {
    let h = host(Profile::Testbed);
    let f = format!("{PF1_DEV}/sriov_numvfs");
    for bad in ["abc", "-1", "", "2x", "0x", "65536"] {
        if bad.is_empty() {
            continue; // a zero-length write is not a store
        }
        h.refuses(&f, bad, Errno::EINVAL);
    }
    h.refuses(&f, "8", Errno::ERANGE);
    h.refuses(&f, "0x8", Errno::ERANGE);
    let before = h.snap();
    h.w(&f, "0\n").unwrap();
    assert_snap_eq(&before, &h.snap());
    // No driver: ENOENT.
    h.w("/sys/bus/pci/drivers/igb/unbind", PF1).unwrap();
    h.refuses(&f, "2", Errno::ENOENT);
    // vfio-pci without enable_sriov: ENOENT.
    h.w("/sys/module/vfio_pci/parameters/enable_sriov", "N\n")
        .unwrap();
    h.refuses(
        "/sys/module/vfio_pci/parameters/enable_sriov",
        "x",
        Errno::EINVAL,
    );
    h.rebind(PF1, "vfio-pci");
    h.refuses(&f, "2", Errno::ENOENT);
    // A driver without sriov_configure: ENOENT.
    h.rebind(PF1, "igbvf");
    assert_eq!(h.driver(PF1).as_deref(), Some("igbvf"));
    h.refuses(&f, "2", Errno::ENOENT);
    // Not a PF: no such attribute.
    h.refuses(
        "/sys/bus/pci/devices/0000:00:01.0/sriov_numvfs",
        "1",
        Errno::ENOENT,
    );
}

#[test]
fn vfs_get_their_own_groups_and_the_native_vf_driver() {
    let h = host(Profile::Testbed);
    let f = format!("{PF1_DEV}/sriov_numvfs");
    h.w(&f, "2\n").unwrap();
    assert_eq!(h.r(&f), "2\n");
    let inv = h.inv();
    let pf = inv.pci_function(bdf(PF1)).unwrap();
    let vfs: Vec<String> = pf
        .sriov
        .as_ref()
        .unwrap()
        .vfs
        .iter()
        .map(|v| v.bdf.to_string())
        .collect();
    assert_eq!(vfs, ["0000:01:10.0", "0000:01:10.2"]);
    // Groups: the next free numbers (as docs/testbed.md observed).
    assert_eq!(group_of(&inv, "0000:01:10.0"), 12);
    assert_eq!(group_of(&inv, "0000:01:10.2"), 13);
    for v in &vfs {
        let vf = inv.pci_function(bdf(v)).unwrap();
        assert_eq!(vf.physfn, Some(bdf(PF1)));
        assert_eq!(
            (vf.vendor, vf.device, vf.class),
            (Some(0x8086), Some(0x10ca), Some(0x020000))
        );
        assert_eq!(vf.driver.as_deref(), Some("igbvf"));
        assert_eq!(vf.driver_override, None);
        assert!(vf.has_reset);
        let g = inv.group(vf.iommu_group.unwrap()).unwrap();
        assert_eq!(g.members, vec![v.clone()]);
        assert_eq!(g.group_type.as_deref(), Some("DMA"));
        let config =
            h.k.read(&format!("/sys/bus/pci/devices/{v}/config"))
                .unwrap();
        // A VF's vendor/device id registers read 0xffff (as on the real kernel).
        assert_eq!(&config[..4], &[0xff; 4]);
        assert_eq!(&config[9..12], &[0x00, 0x00, 0x02]);
    }
    assert_eq!(inv.vfio_nodes.len(), 1);
    // N → M: EBUSY; write 0 first.
    h.refuses(&f, "3", Errno::EBUSY);
    h.w(&f, "0").unwrap();
    let inv = h.inv();
    assert_eq!(inv.pci.len(), 16);
    assert_eq!(inv.iommu_groups.len(), 12);
    assert!(!h.exists(&format!("{PF1_DEV}/virtfn0")));
    // With autoprobe off the VFs stay unbound.
    h.w(&format!("{PF1_DEV}/sriov_drivers_autoprobe"), "0")
        .unwrap();
    h.refuses(
        &format!("{PF1_DEV}/sriov_drivers_autoprobe"),
        "x",
        Errno::EINVAL,
    );
    h.w(&f, "1").unwrap();
    assert_eq!(h.driver("0000:01:10.0"), None);
}

#[test]
fn vfs_of_a_vfio_pf_go_to_vfio_pci() {
    let h = host(Profile::Testbed);
    h.w("/sys/module/vfio_pci/parameters/enable_sriov", "1")
        .unwrap();
    assert_eq!(h.r("/sys/module/vfio_pci/parameters/enable_sriov"), "Y\n");
    h.rebind(PF1, "vfio-pci");
    let f = format!("{PF1_DEV}/sriov_numvfs");
    h.w(&f, "3").unwrap();
    let inv = h.inv();
    for (v, g) in [
        ("0000:01:10.0", 12),
        ("0000:01:10.2", 13),
        ("0000:01:10.4", 14),
    ] {
        let vf = inv.pci_function(bdf(v)).unwrap();
        assert_eq!(vf.driver_override.as_deref(), Some("vfio-pci"));
        assert_eq!(vf.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(vf.iommu_group, Some(IommuGroupId(g)));
        assert!(node_exists(&inv, g));
    }
    // An open VF blocks disabling SR-IOV, and unbinding the PF.
    let pf_h = h.k.open_pf_handle(bdf(PF1), IommuGroupId(8)).unwrap();
    let mut pf_h: Box<dyn PfHandle> = Box::new(pf_h);
    let t = VfToken::from_bytes([7; 16]);
    pf_h.set_vf_token(&t).unwrap();
    drop(pf_h);
    let vf = h.k.open_vf(bdf("0000:01:10.2"), Some(&t)).unwrap();
    h.refuses(&f, "0", Errno::EBUSY);
    h.refuses("/sys/bus/pci/drivers/vfio-pci/unbind", PF1, Errno::EBUSY);
    drop(vf);
    // Unbinding vfio-pci from the PF disables SR-IOV.
    h.w("/sys/bus/pci/drivers/vfio-pci/unbind", PF1).unwrap();
    let inv = h.inv();
    assert_eq!(inv.pci.len(), 16);
    assert!(inv.vfio_nodes.iter().all(|n| n.path == "/dev/vfio/vfio"));
    assert_eq!(h.r(&f), "0\n");
}

// ---------------------------------------------------------------------------
// reset

#[test]
fn reset_takes_one() {
    let h = host(Profile::Testbed);
    let f = format!("{PF1_DEV}/reset");
    h.refuses(&f, "0", Errno::EINVAL);
    h.refuses(&f, "2", Errno::EINVAL);
    h.refuses(&f, "yes", Errno::EINVAL);
    let before = h.snap();
    h.w(&f, "1\n").unwrap();
    h.w(&f, "0x1").unwrap();
    assert_snap_eq(&before, &h.snap());
    // The config space answers.
    let c = h.k.read(&format!("{PF1_DEV}/config")).unwrap();
    assert!(c.len() >= 64 && c[..2] == [0x86, 0x80]);
    assert_eq!(c[9..12], [0x00, 0x00, 0x02]);
    // A function without a reset method has no reset file.
    let h = host(Profile::NoAcs);
    h.refuses(
        "/sys/bus/pci/devices/0000:06:00.0/reset",
        "1",
        Errno::ENOENT,
    );
}

#[test]
fn reset_method_subsets_default_and_disable() {
    let h = host(Profile::Testbed);
    let m = format!("{PF1_DEV}/reset_method");
    h.refuses(&m, "bogus", Errno::EINVAL);
    h.refuses(&m, "flr af_flr", Errno::EINVAL);
    h.w(&m, "bus flr\n").unwrap();
    assert_eq!(h.r(&m), "bus flr\n");
    h.w(&m, "\n").unwrap();
    assert_eq!(h.r(&m), "");
    h.refuses(&format!("{PF1_DEV}/reset"), "1", Errno::ENOTTY);
    h.w(&m, "default").unwrap();
    assert_eq!(h.r(&m), "flr pm bus\n");
    h.w(&format!("{PF1_DEV}/reset"), "1").unwrap();
}

/// Every function the generator writes has a config space matching its ids.
#[test]
fn config_space_of_generated_functions() {
    for profile in [Profile::Cx6Ib, Profile::NoAcs, Profile::Testbed] {
        let h = host(profile);
        for f in h.inv().pci {
            let c =
                h.k.read(&format!("/sys/bus/pci/devices/{}/config", f.bdf))
                    .unwrap();
            assert_eq!(c.len(), 64);
            let (vendor, device) = if f.physfn.is_some() {
                // A VF's id registers read 0xffff (SR-IOV; as on the real kernel).
                (0xffff, 0xffff)
            } else {
                (f.vendor.unwrap(), f.device.unwrap())
            };
            assert_eq!(u16::from_le_bytes([c[0], c[1]]), vendor);
            assert_eq!(u16::from_le_bytes([c[2], c[3]]), device);
            let class = u32::from_le_bytes([c[9], c[10], c[11], 0]);
            assert_eq!(class, f.class.unwrap());
            assert_eq!(c[0x0e] == 1, f.is_bridge(), "{}", f.bdf);
        }
    }
}

// ---------------------------------------------------------------------------
// Reads, unmodelled writes, chown/chmod

#[test]
fn reads_and_unmodelled_writes() {
    let h = host(Profile::Testbed);
    assert_eq!(h.r(&format!("{PF1_DEV}/vendor")), "0x8086\n");
    assert_eq!(h.k.read(&format!("{PF1_DEV}/nope")), Err(Errno::ENOENT));
    assert_eq!(h.k.read(&format!("{PF1_DEV}/reset")), Err(Errno::EACCES));
    assert_eq!(h.k.read(PF1_DEV), Err(tree::EISDIR));
    assert_eq!(
        h.k.read_link(&format!("{PF1_DEV}/driver")).unwrap(),
        "../../../../bus/pci/drivers/igb"
    );
    assert_eq!(
        h.k.read_link("/sys/bus/pci/devices/0000:01:00.0").unwrap(),
        "../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0"
    );
    assert_eq!(
        h.k.read_link(&format!("{PF1_DEV}/vendor")),
        Err(Errno::EINVAL)
    );
    assert!(h.exists(&format!("{PF1_DEV}/driver")));
    assert!(!h.exists(&format!("{PF1_DEV}/physfn")));
    h.refuses(&format!("{PF1_DEV}/vendor"), "0x1234", Errno::EACCES);
    h.refuses(&format!("{PF1_DEV}/sriov_totalvfs"), "8", Errno::EACCES);
    h.refuses(&format!("{PF1_DEV}/config"), "x", Errno::EOPNOTSUPP);
    h.refuses(&format!("{PF1_DEV}/nope"), "1", Errno::ENOENT);
    h.refuses(PF1_DEV, "1", tree::EISDIR);
    h.refuses("/dev/vfio/vfio", "1", Errno::EINVAL);
    h.refuses("/dev/vfio/9", "1", Errno::ENOENT);
    h.refuses("/proc/sys/kernel/osrelease", "x", Errno::EINVAL);
    h.w(&format!("{PF1_DEV}/numa_node"), "1").unwrap();
    assert_eq!(h.r(&format!("{PF1_DEV}/numa_node")), "1\n");
}

#[test]
fn chown_and_chmod_apply_to_the_node() {
    let h = host(Profile::Testbed);
    h.rebind(PF1, "vfio-pci");
    h.k.chown("/dev/vfio/8", 107, 108).unwrap();
    h.k.chmod("/dev/vfio/8", 0o660).unwrap();
    let inv = h.inv();
    let n = inv
        .vfio_nodes
        .iter()
        .find(|n| n.path == "/dev/vfio/8")
        .unwrap();
    assert_eq!((n.uid, n.gid, n.mode), (107, 108, 0o660));
    assert_eq!(h.k.chown("/dev/vfio/99", 1, 1), Err(Errno::ENOENT));
    assert_eq!(h.k.chmod("/dev/vfio/99", 0o600), Err(Errno::ENOENT));
}

// ---------------------------------------------------------------------------
// mdev

const T64: &str = "/sys/class/mdev_bus/0000:66:00.0/mdev_supported_types/nvidia-64";
const NEW: &str = "5e3f6a10-1111-4222-8333-444455556666";

#[test]
fn mdev_create_errnos() {
    let h = host(Profile::GpuMdev);
    let create = format!("{T64}/create");
    h.refuses(&create, "not-a-uuid", Errno::EINVAL);
    h.refuses(&create, &NEW[..35], Errno::EINVAL);
    h.refuses(&create, &format!("{NEW}\n\n"), Errno::EINVAL);
    h.refuses(
        &create,
        "5e3f6a10-1111-4222-8333-44445555666g",
        Errno::EINVAL,
    );
    h.refuses(
        &create,
        "a1b2c3d4-0065-4000-8000-000000000001",
        Errno::EEXIST,
    );
    // The first 36 bytes are parsed; any 37th byte is accepted.
    h.w(&create, &format!("{}x", NEW.to_uppercase())).unwrap();
    assert!(h.exists(&format!("/sys/bus/mdev/devices/{NEW}")));
    // No instances left: EUSERS.
    fs::write(
        h.root
            .join("sys/devices/pci0000:64/0000:64:02.0/0000:66:00.0/mdev_supported_types/nvidia-64/available_instances"),
        "0\n",
    )
    .unwrap();
    h.refuses(
        &create,
        "5e3f6a10-1111-4222-8333-444455556667\n",
        Errno::EUSERS,
    );
}

#[test]
fn mdev_create_and_remove_round_trip() {
    let h = host(Profile::GpuMdev);
    // The vfio-dev class exists once vfio is loaded.
    fs::create_dir_all(h.root.join("sys/class/vfio-dev")).unwrap();
    let before = h.snap();
    h.w(&format!("{T64}/create"), &format!("{NEW}\n")).unwrap();
    let inv = h.inv();
    assert_eq!(inv.mdevs.len(), 7);
    let m = inv.mdev(uuid(NEW)).unwrap();
    assert_eq!(m.parent, "0000:66:00.0");
    assert_eq!(m.type_id.as_deref(), Some("nvidia-64"));
    assert_eq!(m.driver.as_deref(), Some("vfio_mdev"));
    // Its own VFIO-made group: the lowest free number.
    let g = m.iommu_group.unwrap();
    assert_eq!(g, IommuGroupId(0));
    let grp = inv.group(g).unwrap();
    assert_eq!(grp.members, vec![NEW.to_owned()]);
    assert_eq!(grp.name.as_deref(), Some("vfio-noiommu"));
    let node = inv
        .vfio_nodes
        .iter()
        .find(|n| n.path == "/dev/vfio/0")
        .unwrap();
    assert_eq!((node.uid, node.gid, node.mode), (0, 0, 0o600));
    let t = inv
        .mdev_parents
        .iter()
        .find(|p| p.name == "0000:66:00.0")
        .unwrap();
    let t = t.types.iter().find(|t| t.id == "nvidia-64").unwrap();
    assert_eq!(t.available_instances, Some(5));
    assert!(h.exists(&format!("{T64}/devices/{NEW}")));

    let rm = format!("/sys/bus/mdev/devices/{NEW}/remove");
    h.refuses(&rm, "x", Errno::EINVAL);
    let mid = h.snap();
    h.w(&rm, "0").unwrap();
    assert_snap_eq(&mid, &h.snap());
    let open = h.k.open_mdev(uuid(NEW)).unwrap();
    h.refuses(&rm, "1", Errno::EBUSY);
    drop(open);
    h.w(&rm, "1\n").unwrap();
    assert_snap_eq(&before, &h.snap());
    assert_eq!(h.k.open_mdev(uuid(NEW)).unwrap_err(), Errno::ENODEV);
}

// ---------------------------------------------------------------------------
// AP

const MATRIX: &str = "/sys/devices/vfio_ap/matrix";
const MDEV_A: &str = "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01";
const MDEV_B: &str = "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0b02";
const MDEV_C: &str = "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0c03";

fn ap_host() -> Host {
    let h = host(Profile::S390Ap);
    h.w(
        &format!("{MATRIX}/mdev_supported_types/vfio_ap-passthrough/create"),
        MDEV_C,
    )
    .unwrap();
    h
}

fn matrix_of(inv: &Inventory, id: &str) -> (ApMatrix, ApMatrix, Vec<u8>) {
    let m = inv
        .ap
        .as_ref()
        .unwrap()
        .matrix_mdevs
        .iter()
        .find(|m| m.uuid == uuid(id))
        .unwrap();
    (
        m.matrix.clone().unwrap(),
        m.guest_matrix.clone().unwrap(),
        m.control_domains.clone(),
    )
}

fn mx(a: &[u8], d: &[u8]) -> ApMatrix {
    ApMatrix {
        adapters: a.to_vec(),
        domains: d.to_vec(),
    }
}

fn queue_driver(inv: &Inventory, q: &str) -> Option<String> {
    let q: Apqn = q.parse().unwrap();
    inv.ap
        .as_ref()
        .unwrap()
        .queues
        .iter()
        .find(|x| x.apqn == q)
        .unwrap()
        .driver
        .clone()
}

#[test]
fn ap_assign_errnos() {
    let h = ap_host();
    let c = format!("{MATRIX}/{MDEV_C}");
    let inv = h.inv();
    assert_eq!(
        matrix_of(&inv, MDEV_C),
        (mx(&[], &[]), mx(&[], &[]), vec![])
    );
    assert_eq!(
        inv.mdev(uuid(MDEV_C)).unwrap().iommu_group,
        Some(IommuGroupId(2))
    );
    for f in ["assign_adapter", "assign_domain", "assign_control_domain"] {
        h.refuses(&format!("{c}/{f}"), "x", Errno::EINVAL);
        h.refuses(&format!("{c}/{f}"), "-1", Errno::EINVAL);
        h.refuses(&format!("{c}/{f}"), "256", Errno::ENODEV);
        h.refuses(&format!("{c}/{f}"), "0x1000", Errno::ENODEV);
        h.refuses(
            &format!("{c}/{f}"),
            "99999999999999999999999",
            Errno::ERANGE,
        );
    }
    // Adapter 4 alone holds no APQN: fine. With a domain it is host-reserved.
    h.w(&format!("{c}/assign_adapter"), "4").unwrap();
    assert_eq!(h.r(&format!("{c}/matrix")), "04.\n");
    h.refuses(&format!("{c}/assign_domain"), "0x10", Errno::EADDRNOTAVAIL);
    h.w(&format!("{c}/unassign_adapter"), "4\n").unwrap();
    // Adapter 7 × domain 0x14 is B's.
    h.w(&format!("{c}/assign_adapter"), "0x07").unwrap();
    h.refuses(&format!("{c}/assign_domain"), "0x14", Errno::EADDRINUSE);
    h.w(&format!("{c}/assign_domain"), "0x15").unwrap();
    h.w(&format!("{c}/assign_domain"), "0x20").unwrap();
    assert_eq!(h.r(&format!("{c}/matrix")), "07.0015\n07.0020\n");
    // Already assigned: success, nothing changes.
    let before = h.snap();
    h.w(&format!("{c}/assign_domain"), "21").unwrap();
    h.w(&format!("{c}/unassign_domain"), "0x30").unwrap();
    assert_snap_eq(&before, &h.snap());
    h.w(&format!("{c}/assign_control_domain"), "0x11").unwrap();
    h.w(&format!("{c}/assign_control_domain"), "2").unwrap();
    assert_eq!(h.r(&format!("{c}/control_domains")), "0002\n0011\n");
    let inv = h.inv();
    // 0x20 has no queue (over-provisioned): filtered from the guest.
    assert_eq!(
        matrix_of(&inv, MDEV_C),
        (mx(&[7], &[0x15, 0x20]), mx(&[7], &[0x15]), vec![2, 0x11])
    );
    assert_eq!(h.r("/sys/bus/ap/devices/07.0015/status"), "assigned\n");
    // A overlaps B already (planted): the 6.1 kernel validates the whole matrix,
    // so any new APQN for A is refused.
    h.refuses(
        &format!("{MATRIX}/{MDEV_A}/assign_domain"),
        "0x1e",
        Errno::EADDRINUSE,
    );
    // B holds host-usable 05.0013/05.0014 (planted): EADDRNOTAVAIL first.
    h.refuses(
        &format!("{MATRIX}/{MDEV_B}/assign_domain"),
        "0x1e",
        Errno::EADDRNOTAVAIL,
    );
    // Unassigning shrinks the guest too.
    h.w(&format!("{c}/unassign_domain"), "0x15").unwrap();
    assert_eq!(
        matrix_of(&h.inv(), MDEV_C).1,
        mx(&[7], &[]),
        "only adapters left in the guest view: domain 0x20 is not configured"
    );
    assert_eq!(h.r("/sys/bus/ap/devices/07.0015/status"), "unassigned\n");
}

#[test]
fn ap_mask_errnos() {
    let h = ap_host();
    let ap = "/sys/bus/ap/apmask";
    let aq = "/sys/bus/ap/aqmask";
    for bad in ["0xzz", "+", "+1,2", "+256", "+5-3", "5,+1", &"f".repeat(65)] {
        h.refuses(ap, bad, Errno::EINVAL);
    }
    // Adapter 6 is in A and B: giving it to the host is EBUSY.
    h.refuses(ap, "+6", Errno::EBUSY);
    h.refuses(ap, "0x0e", Errno::EBUSY);
    // Taking domain 0x13 from the host is fine; giving it back would make
    // 05.0013 (in B's matrix, adapter 05 in apmask) host-usable: EBUSY.
    h.w(aq, "-0x13").unwrap();
    h.refuses(aq, "+0x13", Errno::EBUSY);
    h.refuses(aq, "0xzz", Errno::EINVAL);
}

#[test]
fn ap_mask_edits_move_queues() {
    let h = ap_host();
    let ap = "/sys/bus/ap/apmask";
    let aq = "/sys/bus/ap/aqmask";
    // Same value: no change.
    let before = h.snap();
    h.w(ap, "0x0c").unwrap();
    h.w(aq, "-0x10,+0x10").unwrap();
    assert_snap_eq(&before, &h.snap());
    // Take adapter 5 from the host: its queues go to vfio_ap, B's guest gets 05.
    h.w(ap, "-5").unwrap();
    assert_eq!(h.r(ap), format!("0x08{}\n", "0".repeat(62)));
    let inv = h.inv();
    assert_eq!(queue_driver(&inv, "05.0013").as_deref(), Some("vfio_ap"));
    assert_eq!(queue_driver(&inv, "04.0013").as_deref(), Some("cex4queue"));
    assert_eq!(h.r("/sys/bus/ap/devices/05.0013/status"), "assigned\n");
    assert_eq!(h.r("/sys/bus/ap/devices/05.0010/status"), "unassigned\n");
    assert_eq!(matrix_of(&inv, MDEV_B).1, mx(&[5, 6, 7], &[0x13, 0x14]));
    // Giving 5 back would make B's APQNs host-usable.
    h.refuses(ap, "+5", Errno::EBUSY);
    h.refuses(ap, "0x0c", Errno::EBUSY);
    // Domain 0x10 away from the host: 04.0010 moves to vfio_ap.
    h.w(aq, "-0x10").unwrap();
    let inv = h.inv();
    assert_eq!(queue_driver(&inv, "04.0010").as_deref(), Some("vfio_ap"));
    assert_eq!(
        inv.ap.as_ref().unwrap().aqmask.unwrap().iter().next(),
        Some(0)
    );
    assert!(!inv.ap.as_ref().unwrap().aqmask.unwrap().contains(0x10));
    // Absolute form: everything to vfio_ap.
    h.w(ap, "0x").unwrap();
    let inv = h.inv();
    assert!(
        inv.ap
            .as_ref()
            .unwrap()
            .queues
            .iter()
            .all(|q| q.driver.as_deref() == Some("vfio_ap"))
    );
    assert!(!h.exists("/sys/bus/ap/drivers/cex4queue/04.0011"));
    assert!(h.exists("/sys/bus/ap/drivers/vfio_ap/04.0011"));
    // And back (no matrix mdev holds adapter 4).
    h.w(ap, "+4").unwrap();
    let inv = h.inv();
    assert_eq!(queue_driver(&inv, "04.0011").as_deref(), Some("cex4queue"));
    assert!(!h.exists("/sys/bus/ap/devices/04.0011/status"));
    // A matrix mdev open: its queues are "in use".
    let open = h.k.open_mdev(uuid(MDEV_A)).unwrap();
    assert_eq!(h.r("/sys/bus/ap/devices/06.0011/status"), "in use\n");
    drop(open);
    assert_eq!(h.r("/sys/bus/ap/devices/06.0011/status"), "assigned\n");
}

// ---------------------------------------------------------------------------
// VF tokens

#[test]
fn vf_tokens_follow_the_group_path_rules() {
    let h = host(Profile::UserspacePf);
    let pf = bdf("0000:5e:00.0");
    let vf = bdf("0000:5e:10.0");
    let t = VfToken::from_bytes(*b"0123456789abcdef");
    let wrong = VfToken::from_bytes([0x5a; 16]);
    // vfio-pci made a random token nobody knows.
    assert_eq!(h.k.open_vf(vf, None).unwrap_err(), Errno::EACCES);
    assert_eq!(h.k.open_vf(vf, Some(&t)).unwrap_err(), Errno::EACCES);
    // Custody: open the PF, set the token.
    assert_eq!(
        h.k.open_pf_handle(pf, IommuGroupId(40)).unwrap_err(),
        Errno::ENODEV
    );
    let mut custody = h.k.open_pf(pf, IommuGroupId(41)).unwrap();
    let before = h.snap();
    custody.set_vf_token(&t).unwrap();
    assert_snap_eq(&before, &h.snap());
    assert_eq!(h.k.get_vf_token(pf).unwrap_err(), Errno::EINVAL);
    assert_eq!(h.k.get_vf_token(vf).unwrap_err(), Errno::ENOTTY);
    assert_eq!(h.k.open_vf(vf, None).unwrap_err(), Errno::EACCES);
    assert_eq!(h.k.open_vf(vf, Some(&wrong)).unwrap_err(), Errno::EACCES);
    let open = h.k.open_vf(vf, Some(&t)).unwrap();
    assert_eq!(open.device(), "0000:5e:10.0");
    // With a VF open, the PF needs the token; the custody open has none.
    assert_eq!(
        h.k.open_pf_handle(pf, IommuGroupId(41)).unwrap_err(),
        Errno::EACCES
    );
    assert_eq!(h.k.open_vf(pf, None).unwrap_err(), Errno::EACCES);
    assert_eq!(h.k.open_vf(pf, Some(&wrong)).unwrap_err(), Errno::EACCES);
    drop(h.k.open_vf(pf, Some(&t)).unwrap());
    open.close();
    // With no VF open a token given at PF open replaces it.
    drop(h.k.open_vf(pf, Some(&wrong)).unwrap());
    assert_eq!(h.k.open_vf(vf, Some(&t)).unwrap_err(), Errno::EACCES);
    drop(h.k.open_vf(vf, Some(&wrong)).unwrap());
    // The custody handle can set it again; it cannot read it.
    custody.set_vf_token(&t).unwrap();
    drop(h.k.open_vf(vf, Some(&t)).unwrap());
    drop(custody);
    // A VF's handle has no token: ENOTTY.
    let mut vf_h = h.k.open_pf_handle(vf, IommuGroupId(42)).unwrap();
    assert_eq!(vf_h.set_vf_token(&t), Err(Errno::ENOTTY));
    assert_eq!(vf_h.get_vf_token().unwrap_err(), Errno::ENOTTY);
    drop(vf_h);
    let pf_h = h.k.open_pf_handle(pf, IommuGroupId(41)).unwrap();
    assert_eq!(pf_h.get_vf_token().unwrap_err(), Errno::EINVAL);
    drop(pf_h);
    // Rebinding the PF gives it a fresh random token.
    h.w("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:5e:00.0")
        .unwrap();
    assert_eq!(
        h.inv()
            .pci_function(pf)
            .unwrap()
            .sriov
            .as_ref()
            .unwrap()
            .num_vfs,
        Some(0)
    );
    h.w("/sys/bus/pci/drivers_probe", "0000:5e:00.0").unwrap();
    h.w("/sys/bus/pci/devices/0000:5e:00.0/sriov_numvfs", "1")
        .unwrap();
    assert_eq!(h.k.open_vf(vf, Some(&t)).unwrap_err(), Errno::EACCES);
    // The secret is nowhere in the tree nor in Debug output.
    let hex: String = t.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let text = t.reveal_for_launcher();
    for (p, s) in snapshot(&h.root) {
        if let Snap::File(b, ..) = s {
            let b = String::from_utf8_lossy(&b);
            assert!(
                !b.contains(&text) && !b.contains(&hex) && !b.contains("0123456789abcdef"),
                "{}",
                p.display()
            );
        }
    }
    let dbg = format!("{:?}", h.k);
    assert!(
        !dbg.contains(&text) && !dbg.contains("0123456789abcdef"),
        "{dbg}"
    );
}

#[test]
fn tokens_are_refused_where_there_is_none() {
    // A VF whose PF is on a host driver: no token needed, giving one is EINVAL.
    let h = host(Profile::Cx6Ib);
    let vf = bdf("0000:3b:00.1");
    let t = VfToken::from_bytes([1; 16]);
    assert_eq!(h.k.open_vf(vf, Some(&t)).unwrap_err(), Errno::EINVAL);
    drop(h.k.open_vf(vf, None).unwrap());
    // A VF on a host driver cannot be opened through VFIO.
    assert_eq!(
        h.k.open_vf(bdf("0000:86:01.0"), None).unwrap_err(),
        Errno::ENODEV
    );
    assert_eq!(
        h.k.open_pf_handle(bdf("0000:3b:00.0"), IommuGroupId(31))
            .unwrap_err(),
        Errno::ENODEV
    );
    assert_eq!(
        h.k.get_vf_token(bdf("0000:3b:00.0")).unwrap_err(),
        Errno::ENODEV
    );
    // Neither PF nor VF: EINVAL with a token.
    let h = host(Profile::NoAcs);
    assert_eq!(
        h.k.open_vf(bdf("0000:06:00.0"), Some(&t)).unwrap_err(),
        Errno::EINVAL
    );
    drop(h.k.open_vf(bdf("0000:06:00.0"), None).unwrap());
    // Group 13 holds a function on snd_hda_intel: not viable (checked before the
    // device name and its token, as VFIO_GROUP_SET_CONTAINER comes first).
    assert_eq!(
        h.k.open_vf(bdf("0000:05:00.0"), None).unwrap_err(),
        Errno::EPERM
    );
    assert_eq!(
        h.k.open_vf(bdf("0000:05:00.0"), Some(&t)).unwrap_err(),
        Errno::EPERM
    );
    assert_eq!(
        h.k.open_vf(bdf("0000:09:00.0"), None).unwrap_err(),
        Errno::ENODEV
    );
}

// ---------------------------------------------------------------------------
// mlx5 VF GUIDs

#[test]
fn vf_guid_takes_effect_at_the_next_bind() {
    let h = host(Profile::Cx6Ib);
    // The generator wrote the PFs' IPoIB interfaces.
    assert_eq!(h.r("/sys/class/net/ib0/ifindex"), "4\n");
    assert!(h.exists("/sys/bus/pci/devices/0000:86:00.0/net/ib1"));
    let node = Guid(0x0c42_a103_0000_aaaa);
    let port = Guid(0x0c42_a103_0000_bbbb);
    h.refused(Errno::ENODEV, || {
        h.k.set_vf_guid("ib9", 0, GuidKind::Port, port)
    });
    h.refused(Errno::ENODEV, || {
        h.k.set_vf_guid("ib0", 8, GuidKind::Port, port)
    });
    h.refused(Errno::ENODEV, || {
        h.k.set_vf_guid("", 0, GuidKind::Port, port)
    });
    // Stored, not yet in effect.
    h.refused(Errno::EINVAL, || {
        h.k.set_vf_guid("ib0", 0, GuidKind::Node, node)?;
        h.k.set_vf_guid("ib0", 0, GuidKind::Port, port)?;
        Err(Errno::EINVAL)
    });
    // Rebind VF 0 of PF 3b (on vfio-pci): the OFED files show the new GUIDs.
    let vf0 = "0000:3b:00.1";
    h.w(&format!("/sys/bus/pci/devices/{vf0}/driver/unbind"), vf0)
        .unwrap();
    h.w("/sys/bus/pci/drivers_probe", vf0).unwrap();
    let inv = h.inv();
    let g = &inv
        .pci_function(bdf("0000:3b:00.0"))
        .unwrap()
        .sriov
        .as_ref()
        .unwrap()
        .vf_guids[0];
    assert_eq!((g.node_guid, g.port_guid), (Some(node), Some(port)));
    assert_eq!(h.driver(vf0).as_deref(), Some("vfio-pci"));
    // The host-bound VF 7 of PF 86 (mlx5_2): its IB device goes with its driver
    // and comes back with the new port GUID.
    let vf7 = "0000:86:01.0";
    h.k.set_vf_guid("ib1", 7, GuidKind::Port, port).unwrap();
    h.w("/sys/bus/pci/drivers/mlx5_core/unbind", vf7).unwrap();
    let inv = h.inv();
    assert!(inv.ib.iter().all(|d| d.name != "mlx5_2"));
    h.w("/sys/bus/pci/drivers_probe", vf7).unwrap();
    let inv = h.inv();
    let dev = inv.ib.iter().find(|d| d.name == "mlx5_2").unwrap();
    assert_eq!(dev.pci, Some(bdf(vf7)));
    assert_eq!(dev.ports[0].port_guid, Some(port));
    assert_eq!(dev.ports[0].pkeys.len(), 2, "its P_Key table is kept");
    // OFED sriov/ files take a GUID too.
    let f = "/sys/bus/pci/devices/0000:3b:00.0/sriov/1/node";
    h.refuses(f, "zz", Errno::EINVAL);
    h.w(f, "11:22:33:44:55:66:77:88\n").unwrap();
    assert_ne!(h.r(f), "11:22:33:44:55:66:77:88\n");
    h.rebind("0000:3b:00.2", "vfio-pci");
    assert_eq!(h.r(f), "11:22:33:44:55:66:77:88\n");
    h.refuses(
        "/sys/bus/pci/devices/0000:3b:00.0/sriov/1/policy",
        "Maybe",
        Errno::EINVAL,
    );
    h.w("/sys/bus/pci/devices/0000:3b:00.0/sriov/1/policy", "Down\n")
        .unwrap();
    assert_eq!(
        h.r("/sys/bus/pci/devices/0000:3b:00.0/sriov/1/policy"),
        "Down\n"
    );
}

#[test]
fn a_vf_moved_to_mlx5_core_gets_an_ib_device() {
    let h = host(Profile::Cx6Ib);
    let port = Guid(0x0c42_a103_0000_cccc);
    h.k.set_vf_guid("ib0", 3, GuidKind::Port, port).unwrap();
    let vf = "0000:3b:00.4";
    h.w(&format!("/sys/bus/pci/devices/{vf}/driver_override"), "\n")
        .unwrap();
    h.w(&format!("/sys/bus/pci/devices/{vf}/driver/unbind"), vf)
        .unwrap();
    h.w("/sys/bus/pci/drivers_probe", vf).unwrap();
    let inv = h.inv();
    assert_eq!(h.driver(vf).as_deref(), Some("mlx5_core"));
    let dev = inv.ib.iter().find(|d| d.pci == Some(bdf(vf))).unwrap();
    assert_eq!(dev.name, "mlx5_3");
    assert_eq!(dev.ports[0].port_guid, Some(port));
    assert_eq!(dev.ports[0].pkeys.len(), 1);
    assert!(!node_exists(&inv, group_of(&inv, vf)));
}

// ---------------------------------------------------------------------------
// P_Key tables programmed by the fabric

/// A fabric stand-in: port GUID → table, changeable while the kernel uses it, and
/// the GUIDs it was asked about.
#[derive(Clone, Default)]
struct Fabric {
    tables: Arc<Mutex<HashMap<Guid, Vec<u16>>>>,
    asked: Arc<Mutex<Vec<Guid>>>,
}

impl Fabric {
    fn program(&self, guid: Guid, keys: &[u16]) {
        self.tables.lock().unwrap().insert(guid, keys.to_vec());
    }
    fn forget(&self, guid: Guid) {
        self.tables.lock().unwrap().remove(&guid);
    }
    fn asked(&self) -> Vec<Guid> {
        self.asked.lock().unwrap().clone()
    }
    fn source(&self) -> PortTableSource {
        let f = self.clone();
        Arc::new(move |g| {
            f.asked.lock().unwrap().push(g);
            f.tables.lock().unwrap().get(&g).cloned()
        })
    }
}

/// The lab profile with VF 0 of the ConnectX-6 PF (`0000:3b:00.1`) carrying
/// `port` and bound to mlx5_core on the host: its IB device is `mlx5_1`.
fn lab_with_host_vf(port: Option<Guid>) -> Host {
    let h = host(Profile::Lab);
    if let Some(g) = port {
        h.k.set_vf_guid("ib0", 0, GuidKind::Port, g).unwrap();
    }
    h.rebind("0000:3b:00.1", "mlx5_core");
    assert_eq!(h.driver("0000:3b:00.1").as_deref(), Some("mlx5_core"));
    assert!(h.exists("/sys/class/infiniband/mlx5_1"));
    h
}

const VF_PKEYS: &str = "/sys/class/infiniband/mlx5_1/ports/1/pkeys";
const VF_PKEYS_PCI: &str = "/sys/bus/pci/devices/0000:3b:00.1/infiniband/mlx5_1/ports/1/pkeys";

/// The non-empty slots of the VF's table, as the inventory reads it from the tree.
fn inv_pkeys(h: &Host) -> Vec<u16> {
    let inv = h.inv();
    let dev = inv.ib.iter().find(|d| d.name == "mlx5_1").unwrap();
    dev.ports[0]
        .pkeys
        .iter()
        .map(|s| s.pkey.0)
        .filter(|&k| k != 0)
        .collect()
}

#[test]
fn pkey_tables_follow_the_port_table_source() {
    let port = Guid(0x0c42_a103_00ab_0001);
    let h = lab_with_host_vf(Some(port));
    let fabric = Fabric::default();
    fabric.program(port, &[0x7fff, 0x8002]);
    h.k.set_port_table_source(fabric.source());
    assert_eq!(h.r(&format!("{VF_PKEYS}/0")), "0x7fff\n");
    assert_eq!(h.r(&format!("{VF_PKEYS}/1")), "0x8002\n");
    assert_eq!(h.r(&format!("{VF_PKEYS}/2")), "0x0000\n");
    assert_eq!(h.r(&format!("{VF_PKEYS}/127")), "0x0000\n");
    // Written through: the inventory, reading the tree, sees the same table.
    assert_eq!(inv_pkeys(&h), [0x7fff, 0x8002]);
    // The slot count is the table's, whatever the fabric programmed.
    assert_eq!(h.k.list_dir(VF_PKEYS).unwrap().len(), 128);

    // The SM moves the port to acme's partition, keeping indexes: a hole at 1.
    fabric.program(port, &[0x7fff, 0x0000, 0x8001]);
    assert_eq!(h.r(&format!("{VF_PKEYS_PCI}/1")), "0x0000\n");
    assert_eq!(h.r(&format!("{VF_PKEYS_PCI}/2")), "0x8001\n");
    assert_eq!(inv_pkeys(&h), [0x7fff, 0x8001]);

    // More keys than slots: what fits, the slot count kept.
    let many: Vec<u16> = (0..200).map(|i| 0x8000 | (i + 1)).collect();
    fabric.program(port, &many);
    assert_eq!(h.r(&format!("{VF_PKEYS}/127")), "0x8080\n");
    assert_eq!(h.k.list_dir(VF_PKEYS).unwrap().len(), 128);
    // A read refreshes the slot it reads: once every slot was read, the tree
    // (and the inventory) holds the whole table.
    for i in 0..128 {
        h.r(&format!("{VF_PKEYS}/{i}"));
    }
    assert_eq!(inv_pkeys(&h).len(), 128);

    // The fabric forgets the port: the table stays what it showed last.
    fabric.program(port, &[0x7fff, 0x8002]);
    for i in 0..128 {
        h.r(&format!("{VF_PKEYS}/{i}"));
    }
    assert_eq!(h.r(&format!("{VF_PKEYS}/1")), "0x8002\n");
    fabric.forget(port);
    assert_eq!(h.r(&format!("{VF_PKEYS}/0")), "0x7fff\n");
    assert_eq!(h.r(&format!("{VF_PKEYS}/1")), "0x8002\n");
    assert_eq!(inv_pkeys(&h), [0x7fff, 0x8002]);

    // A new GUID on the VF (set, rebound): looked up by the new GUID; the old
    // one's table is not the VF's any more.
    let fresh = Guid(0x0c42_a103_00ab_0002);
    fabric.program(port, &[0x7fff, 0x8002]);
    fabric.program(fresh, &[0x7fff, 0x8001]);
    h.k.set_vf_guid("ib0", 0, GuidKind::Port, fresh).unwrap();
    h.w("/sys/bus/pci/drivers/mlx5_core/unbind", "0000:3b:00.1")
        .unwrap();
    h.w("/sys/bus/pci/drivers_probe", "0000:3b:00.1").unwrap();
    assert_eq!(h.r(&format!("{VF_PKEYS}/1")), "0x8001\n");
    assert_eq!(fabric.asked().last(), Some(&fresh));

    // Other reads under the port do not consult the fabric.
    let n = fabric.asked().len();
    h.r("/sys/class/infiniband/mlx5_1/ports/1/gids/0");
    h.r("/sys/class/infiniband/mlx5_1/ports/1/state");
    assert_eq!(fabric.asked().len(), n);
}

#[test]
fn unknown_ports_and_zero_guids_keep_their_table() {
    // A GUID the fabric does not know: the table the driver made stays.
    let port = Guid(0x0c42_a103_00ab_0003);
    let h = lab_with_host_vf(Some(port));
    let fabric = Fabric::default();
    fabric.program(Guid(0x0c42_a103_00ab_0004), &[0x7fff, 0x8002]);
    h.k.set_port_table_source(fabric.source());
    let before = h.snap();
    assert_eq!(h.r(&format!("{VF_PKEYS}/0")), "0xffff\n");
    assert_eq!(h.r(&format!("{VF_PKEYS}/1")), "0x0000\n");
    assert_snap_eq(&before, &h.snap());
    // Asked at each slot read: the kernel shows the fabric's table as it is now.
    assert_eq!(fabric.asked(), [port, port]);
    // The PF's port is looked up like any other, and kept when unknown.
    assert_eq!(
        h.r("/sys/class/infiniband/mlx5_0/ports/1/pkeys/0"),
        "0xffff\n"
    );
    assert_eq!(fabric.asked()[2], Guid(0x0c42_a103_2000_0000));
    // A source answering for the PF rewrites its table too.
    fabric.program(Guid(0x0c42_a103_2000_0000), &[0xffff, 0x8001, 0x8002]);
    assert_eq!(
        h.r("/sys/class/infiniband/mlx5_0/ports/1/pkeys/2"),
        "0x8002\n"
    );

    // A VF port without a GUID (all-zero interface ID) is never looked up.
    let h = lab_with_host_vf(None);
    assert_eq!(
        h.r("/sys/class/infiniband/mlx5_1/ports/1/gids/0"),
        "fe80:0000:0000:0000:0000:0000:0000:0000\n"
    );
    let fabric = Fabric::default();
    fabric.program(Guid(0), &[0x7fff, 0x8002]);
    h.k.set_port_table_source(fabric.source());
    assert_eq!(h.r(&format!("{VF_PKEYS}/0")), "0xffff\n");
    assert_eq!(h.r(&format!("{VF_PKEYS}/1")), "0x0000\n");
    assert!(fabric.asked().is_empty());
    // Reads that are not slots answer as before.
    assert_eq!(h.k.read(VF_PKEYS), Err(tree::EISDIR));
    assert_eq!(h.k.read(&format!("{VF_PKEYS}/128")), Err(Errno::ENOENT));
    assert!(fabric.asked().is_empty());
}

#[test]
fn without_a_source_the_table_is_static() {
    let port = Guid(0x0c42_a103_00ab_0005);
    let h = lab_with_host_vf(Some(port));
    let before = h.snap();
    assert_eq!(h.r(&format!("{VF_PKEYS}/0")), "0xffff\n");
    assert_eq!(h.r(&format!("{VF_PKEYS_PCI}/1")), "0x0000\n");
    assert_snap_eq(&before, &h.snap());
    assert_eq!(inv_pkeys(&h), [0xffff]);
    assert!(format!("{:?}", h.k).contains("port_table_source: false"));
    h.k.set_port_table_source(Arc::new(|_| Some(vec![0x7fff])));
    assert!(format!("{:?}", h.k).contains("port_table_source: true"));
}

// ---------------------------------------------------------------------------
// Scenarios, read back through the inventory

/// The differential scenario's shape on the testbed profile: what
/// `docs/testbed.md` observed on the real guest, then everything put back.
#[test]
fn scenario_testbed() {
    let h = host(Profile::Testbed);
    let initial = h.inv();
    let noacs = "/sys/bus/pci/devices/0000:04:00.0";
    let nvme = "/sys/bus/pci/devices/0000:03:00.0";
    h.w(&format!("{PF1_DEV}/sriov_numvfs"), "2").unwrap();
    h.w(&format!("{noacs}/sriov_numvfs"), "3").unwrap();
    h.w(&format!("{nvme}/sriov_numvfs"), "1").unwrap();
    let inv = h.inv();
    let rows: Vec<(&str, u32, Option<&str>)> = [
        "0000:01:10.0",
        "0000:01:10.2",
        "0000:04:10.0",
        "0000:04:10.2",
        "0000:04:10.4",
        "0000:03:00.1",
    ]
    .iter()
    .map(|b| {
        let f = inv.pci_function(bdf(b)).unwrap();
        (*b, f.iommu_group.unwrap().0, f.driver.as_deref())
    })
    .collect();
    assert_eq!(
        rows,
        [
            ("0000:01:10.0", 12, Some("igbvf")),
            ("0000:01:10.2", 13, Some("igbvf")),
            // No ACS above 04:00.0: its VFs join the port's group.
            ("0000:04:10.0", 4, Some("igbvf")),
            ("0000:04:10.2", 4, Some("igbvf")),
            ("0000:04:10.4", 4, Some("igbvf")),
            // QEMU's nvme VFs stay without a driver.
            ("0000:03:00.1", 14, None),
        ]
    );
    assert_eq!(inv.group(IommuGroupId(4)).unwrap().members.len(), 5);
    // A VF to vfio-pci: a node for its group; no cdev on this kernel.
    h.rebind("0000:01:10.0", "vfio-pci");
    let inv = h.inv();
    assert_eq!(
        inv.vfio_nodes
            .iter()
            .map(|n| (n.path.as_str(), n.mode))
            .collect::<Vec<_>>(),
        [("/dev/vfio/vfio", 0o666), ("/dev/vfio/12", 0o600)]
    );
    assert!(!h.exists("/dev/vfio/devices"));
    // vfio-pci binds the nvme VF.
    h.rebind("0000:03:00.1", "vfio-pci");
    assert_eq!(h.driver("0000:03:00.1").as_deref(), Some("vfio-pci"));
    // An mtty mdev: the next group, driver mtty; the ports are shared.
    let t = "/sys/class/mdev_bus/mtty/mdev_supported_types";
    h.w(&format!("{t}/mtty-1/create"), NEW).unwrap();
    let inv = h.inv();
    let m = inv.mdev(uuid(NEW)).unwrap();
    assert_eq!(
        (m.iommu_group, m.driver.as_deref()),
        (Some(IommuGroupId(15)), Some("mtty"))
    );
    assert_eq!(m.parent, "mtty");
    let avail: Vec<Option<u32>> = inv.mdev_parents[0]
        .types
        .iter()
        .map(|t| t.available_instances)
        .collect();
    assert_eq!(avail, [Some(23), Some(11)]);
    // Reset the VF; an impossible count; an open VF blocks disabling.
    h.w("/sys/bus/pci/devices/0000:01:10.0/reset", "1").unwrap();
    h.refuses(&format!("{PF1_DEV}/sriov_numvfs"), "4", Errno::EBUSY);
    let open = h.k.open_vf(bdf("0000:01:10.0"), None).unwrap();
    h.refuses(&format!("{PF1_DEV}/sriov_numvfs"), "0", Errno::EBUSY);
    drop(open);
    // Group 4 holds igb and igbvf functions: a VF of it on vfio-pci cannot be
    // opened (the group is not viable).
    h.rebind("0000:04:10.2", "vfio-pci");
    assert_eq!(
        h.k.open_vf(bdf("0000:04:10.2"), None).unwrap_err(),
        Errno::EPERM
    );
    // Put everything back.
    h.rebind("0000:04:10.2", "");
    h.rebind("0000:03:00.1", "");
    h.w(&format!("/sys/bus/mdev/devices/{NEW}/remove"), "1")
        .unwrap();
    h.rebind("0000:01:10.0", "");
    assert_eq!(h.driver("0000:01:10.0").as_deref(), Some("igbvf"));
    for pf in [PF1_DEV, noacs, nvme] {
        h.w(&format!("{pf}/sriov_numvfs"), "0").unwrap();
    }
    assert_eq!(h.inv(), initial);
}

#[test]
fn scenario_s390_ap() {
    let h = ap_host();
    let c = format!("{MATRIX}/{MDEV_C}");
    h.w(&format!("{c}/assign_adapter"), "7").unwrap();
    h.w(&format!("{c}/assign_domain"), "0x1a").unwrap();
    h.w(&format!("{c}/assign_domain"), "0x1b").unwrap();
    h.w("/sys/bus/ap/apmask", "-4").unwrap();
    h.w(&format!("{c}/assign_adapter"), "4").unwrap();
    h.w(&format!("{c}/assign_control_domain"), "0x1a").unwrap();
    let inv = h.inv();
    assert_eq!(
        matrix_of(&inv, MDEV_C),
        (
            mx(&[4, 7], &[0x1a, 0x1b]),
            mx(&[4, 7], &[0x1a, 0x1b]),
            vec![0x1a]
        )
    );
    assert_eq!(queue_driver(&inv, "04.001a").as_deref(), Some("vfio_ap"));
    let ap = inv.ap.as_ref().unwrap();
    assert_eq!(ap.apmask.unwrap().iter().collect::<Vec<_>>(), vec![5]);
    assert_eq!(ap.matrix_mdevs.len(), 3);
    // A and B are as planted.
    assert_eq!(
        matrix_of(&inv, MDEV_A).1,
        mx(&[6], &[0x10, 0x11, 0x12, 0x13])
    );
    assert_eq!(matrix_of(&inv, MDEV_B).1, mx(&[6, 7], &[0x13, 0x14]));
    // Removing C frees its queues.
    h.w(&format!("/sys/bus/mdev/devices/{MDEV_C}/remove"), "1")
        .unwrap();
    assert_eq!(h.r("/sys/bus/ap/devices/04.001a/status"), "unassigned\n");
    let inv = h.inv();
    assert_eq!(inv.ap.as_ref().unwrap().matrix_mdevs.len(), 2);
    assert!(inv.group(IommuGroupId(2)).is_none());
    h.w("/sys/bus/ap/apmask", "+4").unwrap();
    assert_eq!(
        queue_driver(&h.inv(), "04.001a").as_deref(),
        Some("cex4queue")
    );
}

#[test]
fn scenario_gpu_mdev() {
    let h = host(Profile::GpuMdev);
    let t63 = "/sys/class/mdev_bus/0000:65:00.0/mdev_supported_types/nvidia-63";
    let ids: Vec<String> = (0..3)
        .map(|i| format!("00000000-0000-4000-8000-00000000000{i}"))
        .collect();
    for id in &ids {
        h.w(&format!("{t63}/create"), id).unwrap();
    }
    let inv = h.inv();
    assert_eq!(inv.mdevs.len(), 9);
    let groups: Vec<u32> = ids
        .iter()
        .map(|i| inv.mdev(uuid(i)).unwrap().iommu_group.unwrap().0)
        .collect();
    assert_eq!(groups, [0, 1, 2]);
    assert!(groups.iter().all(|g| node_exists(&inv, *g)));
    h.w(&format!("/sys/bus/mdev/devices/{}/remove", ids[1]), "1")
        .unwrap();
    h.w(
        &format!("{t63}/create"),
        "00000000-0000-4000-8000-000000000009",
    )
    .unwrap();
    let inv = h.inv();
    assert_eq!(
        inv.mdev(uuid("00000000-0000-4000-8000-000000000009"))
            .unwrap()
            .iommu_group,
        Some(IommuGroupId(1)),
        "the freed group number is reused"
    );
    let t = &inv
        .mdev_parents
        .iter()
        .find(|p| p.name == "0000:65:00.0")
        .unwrap()
        .types;
    assert_eq!(
        t.iter()
            .find(|t| t.id == "nvidia-63")
            .unwrap()
            .available_instances,
        Some(9)
    );
}

#[test]
fn scenario_cx6_ib() {
    let h = host(Profile::Cx6Ib);
    let pf = "/sys/bus/pci/devices/0000:3b:00.0";
    // mlx5_core has sriov_configure; changing 8 → 4 needs 0 first.
    h.refuses(&format!("{pf}/sriov_numvfs"), "4", Errno::EBUSY);
    h.refuses(&format!("{pf}/sriov_numvfs"), "17", Errno::ERANGE);
    h.w(&format!("{pf}/sriov_numvfs"), "0").unwrap();
    let inv = h.inv();
    assert_eq!(inv.pci.len(), 2 + 2 + 8);
    let p = inv.pci_function(bdf("0000:3b:00.0")).unwrap();
    assert!(p.sriov.as_ref().unwrap().vf_guids.is_empty());
    assert!((32..40).all(|g| inv.group(IommuGroupId(g)).is_none() && !node_exists(&inv, g)));
    h.w(&format!("{pf}/sriov_numvfs"), "2").unwrap();
    let inv = h.inv();
    // autoprobe is 0 on this profile: the new VFs wait unbound.
    let vf = inv.pci_function(bdf("0000:3b:00.1")).unwrap();
    assert_eq!(
        (vf.driver.as_deref(), vf.iommu_group),
        (None, Some(IommuGroupId(0)))
    );
    assert_eq!(group_of(&inv, "0000:3b:00.2"), 1);
    let guids = &inv
        .pci_function(bdf("0000:3b:00.0"))
        .unwrap()
        .sriov
        .as_ref()
        .unwrap()
        .vf_guids;
    assert_eq!(guids.len(), 2);
    assert_eq!(guids[0].port_guid, Some(Guid(0)));
    h.rebind("0000:3b:00.1", "vfio-pci");
    assert!(node_exists(&h.inv(), 0));
}

/// issue 18 item 14: two simulated kernels over one tree — two processes on one
/// simulated host — are one kernel: a VF GUID stored through one takes effect at
/// a bind done through the other, and a driver's subtree saved at an unbind in
/// one comes back at a bind in the other. Each kernel was made before the other
/// acted, so only the shared state can carry it.
#[test]
fn two_kernels_over_one_tree_are_one_kernel() {
    let h = host(Profile::Cx6Ib);
    let other = SimKernel::new(HostRoot::new(&h.root)).unwrap();
    let port = Guid(0x0c42_a103_0000_cccc);
    h.k.set_vf_guid("ib0", 0, GuidKind::Port, port).unwrap();
    let vf0 = "0000:3b:00.1";
    other
        .write(
            &format!("/sys/bus/pci/devices/{vf0}/driver/unbind"),
            vf0.as_bytes(),
        )
        .unwrap();
    other
        .write("/sys/bus/pci/drivers_probe", vf0.as_bytes())
        .unwrap();
    let inv = h.inv();
    let g = &inv
        .pci_function(bdf("0000:3b:00.0"))
        .unwrap()
        .sriov
        .as_ref()
        .unwrap()
        .vf_guids[0];
    assert_eq!(
        g.port_guid,
        Some(port),
        "the GUID set through the other kernel"
    );
    // The host-bound VF 7 of PF 86: its IB device leaves with mlx5_core through
    // one kernel and comes back with it through the other.
    let vf7 = "0000:86:01.0";
    h.w("/sys/bus/pci/drivers/mlx5_core/unbind", vf7).unwrap();
    assert!(h.inv().ib.iter().all(|d| d.name != "mlx5_2"));
    other
        .write("/sys/bus/pci/drivers_probe", vf7.as_bytes())
        .unwrap();
    assert!(h.inv().ib.iter().any(|d| d.name == "mlx5_2"));
}

/// issue 14 item 2: a port's P_Key table read in one pass (`read_each`): the
/// fabric is asked once for the whole table, not once per slot; every slot reads
/// what `read` reads; names that are not one component, directories and missing
/// slots fail the way `read` fails.
#[test]
fn read_each_reads_a_pkey_table_in_one_pass() {
    let port = Guid(0x0c42_a103_00ab_0001);
    let h = lab_with_host_vf(Some(port));
    let fabric = Fabric::default();
    fabric.program(port, &[0x7fff, 0x8002]);
    h.k.set_port_table_source(fabric.source());
    let names: Vec<String> = (0..128).map(|i| i.to_string()).collect();
    let all = h.k.read_each(VF_PKEYS, &names);
    assert_eq!(all.len(), 128);
    assert_eq!(fabric.asked(), [port], "one question for the whole table");
    assert_eq!(all[0].as_deref(), Ok(&b"0x7fff\n"[..]));
    assert_eq!(all[1].as_deref(), Ok(&b"0x8002\n"[..]));
    assert!(
        all[2..]
            .iter()
            .all(|r| r.as_deref() == Ok(&b"0x0000\n"[..]))
    );
    // Through the PCI path (links resolved once) the same table.
    fabric.program(port, &[0x7fff, 0x0000, 0x8001]);
    let again = h.k.read_each(VF_PKEYS_PCI, &names);
    assert_eq!(again[1].as_deref(), Ok(&b"0x0000\n"[..]));
    assert_eq!(again[2].as_deref(), Ok(&b"0x8001\n"[..]));
    for (i, r) in again.iter().enumerate() {
        assert_eq!(r.clone(), h.k.read(&format!("{VF_PKEYS}/{i}")), "slot {i}");
    }
    // Bounded as `read`: one component only, no directory, no missing file.
    let odd: Vec<String> = ["../gids/0", "..", ".", "", "128", "0/x"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let r = h.k.read_each(VF_PKEYS, &odd);
    assert_eq!(r[0], Err(Errno::EINVAL));
    assert_eq!(r[1], Err(Errno::EINVAL));
    assert_eq!(r[2], Err(Errno::EINVAL));
    assert_eq!(r[3], Err(Errno::EINVAL));
    assert_eq!(r[4], Err(Errno::ENOENT));
    assert_eq!(r[5], Err(Errno::EINVAL));
    let r = h.k.read_each(
        "/sys/class/infiniband/mlx5_1/ports/1",
        &["pkeys".to_owned()],
    );
    assert_eq!(r[0], Err(tree::EISDIR));
    // A directory that is not there: every name fails.
    let r = h.k.read_each("/sys/class/infiniband/nope", &names[..2]);
    assert!(r.iter().all(|x| *x == Err(Errno::ENOENT)), "{r:?}");
}

/// vfio-pci's probe refuses a PF whose SR-IOV is enabled ("Cannot bind to PF
/// with SR-IOV enabled", EBUSY): `bind` passes the errno on, `drivers_probe`
/// does not (a failing probe is not its error), and the PF stays unbound.
/// nvme's `remove` leaves SR-IOV enabled, so its PF can be unbound with a VF.
#[test]
fn vfio_pci_refuses_a_pf_with_sriov_enabled() {
    let h = host(Profile::Testbed);
    let pf = "0000:03:00.0";
    let d = format!("/sys/bus/pci/devices/{pf}");
    h.w(&format!("{d}/sriov_numvfs"), "1").unwrap();
    h.w(&format!("{d}/driver_override"), "vfio-pci").unwrap();
    h.w("/sys/bus/pci/drivers/nvme/unbind", pf).unwrap();
    assert_eq!(h.r(&format!("{d}/sriov_numvfs")), "1\n");
    assert_eq!(h.driver(pf), None);
    h.refuses("/sys/bus/pci/drivers/vfio-pci/bind", pf, Errno::EBUSY);
    let before = h.snap();
    h.w("/sys/bus/pci/drivers_probe", pf).unwrap();
    assert_snap_eq(&before, &h.snap());
    assert_eq!(h.driver(pf), None);
    // Back on nvme, SR-IOV off: vfio-pci takes it.
    h.w(&format!("{d}/driver_override"), "\n").unwrap();
    h.w("/sys/bus/pci/drivers/nvme/bind", pf).unwrap();
    h.w(&format!("{d}/sriov_numvfs"), "0").unwrap();
    h.rebind(pf, "vfio-pci");
    assert_eq!(h.driver(pf).as_deref(), Some("vfio-pci"));
}
