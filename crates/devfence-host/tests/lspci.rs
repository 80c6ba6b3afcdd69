//! devfence's PCI inventory against the reference reader, `lspci` (pciutils),
//! on the same simulated trees: the set of functions and, for every function,
//! its vendor:device ids, subsystem ids, class (with programming interface),
//! driver, IOMMU group and NUMA node must agree.
//!
//! `lspci -A linux-sysfs -O sysfs.path=<root>/sys/bus/pci -D -vmm -nnk` reads the
//! tree the way it reads `/sys` on a real host (ids and class from the sysfs
//! attribute files, the driver and group from their links). The test installs
//! pciutils when `lspci` is missing (as root, with apt-get; CI's
//! testbed/setup.sh installs it too) and fails — never skips — when it cannot.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use devfence_host::sim::{self, GenerateOptions, Profile};
use devfence_host::{HostRoot, read_inventory};

/// One function as either side reports it; `None` where it reports nothing.
#[derive(Debug, Default, PartialEq, Eq)]
struct Function {
    vendor: Option<u16>,
    device: Option<u16>,
    subsystem_vendor: Option<u16>,
    subsystem_device: Option<u16>,
    class: Option<u32>,
    driver: Option<String>,
    iommu_group: Option<u32>,
    numa_node: Option<i32>,
}

/// `lspci`, installed if it is missing.
fn lspci() -> &'static str {
    fn found() -> bool {
        Command::new("lspci")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }
    if !found() {
        // One attempt to install it: the test must run, not skip.
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "pciutils"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    assert!(
        found(),
        "lspci is not installed and could not be installed. Hint: apt-get install pciutils (testbed/setup.sh installs it for CI)"
    );
    "lspci"
}

/// The `[hex]` at the end of an `lspci -nn` value ("Mellanox … [ConnectX-6] [101b]").
fn last_hex(value: &str) -> u32 {
    let inner = value
        .strip_suffix(']')
        .and_then(|v| v.rsplit_once('['))
        .map(|(_, h)| h)
        .unwrap_or_else(|| panic!("no [id] at the end of the lspci value {value:?}"));
    u32::from_str_radix(inner, 16)
        .unwrap_or_else(|e| panic!("lspci value {value:?}: id {inner:?}: {e}"))
}

fn hex16(value: &str) -> u16 {
    u16::try_from(last_hex(value)).unwrap_or_else(|_| panic!("{value:?} is not a 16-bit id"))
}

/// Every function lspci lists under `root`, by BDF.
fn lspci_functions(root: &Path) -> BTreeMap<String, Function> {
    let out = Command::new(lspci())
        .arg("-A")
        .arg("linux-sysfs")
        .arg("-O")
        .arg(format!("sysfs.path={}", root.join("sys/bus/pci").display()))
        .args(["-D", "-vmm", "-nnk"])
        .output()
        .expect("run lspci");
    assert!(
        out.status.success(),
        "lspci failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("lspci output is UTF-8");
    let mut all = BTreeMap::new();
    for record in text.split("\n\n").filter(|r| !r.trim().is_empty()) {
        let mut slot = None;
        let mut f = Function::default();
        let mut class = None;
        let mut prog_if = 0u32;
        for line in record.lines() {
            let Some((key, value)) = line.split_once(":\t") else {
                continue;
            };
            match key {
                "Slot" => slot = Some(value.to_owned()),
                "Vendor" => f.vendor = Some(hex16(value)),
                "Device" => f.device = Some(hex16(value)),
                "SVendor" => f.subsystem_vendor = Some(hex16(value)),
                "SDevice" => f.subsystem_device = Some(hex16(value)),
                "Class" => class = Some(last_hex(value)),
                "ProgIf" => prog_if = u32::from_str_radix(value, 16).expect("ProgIf is hex"),
                "Driver" => f.driver = Some(value.to_owned()),
                "IOMMUGroup" => f.iommu_group = Some(value.parse().expect("IOMMUGroup")),
                "NUMANode" => f.numa_node = Some(value.parse().expect("NUMANode")),
                _ => {}
            }
        }
        f.class = class.map(|c| c << 8 | prog_if);
        let slot = slot.unwrap_or_else(|| panic!("an lspci record without a Slot: {record}"));
        assert!(
            all.insert(slot.clone(), f).is_none(),
            "lspci lists {slot} twice"
        );
    }
    all
}

/// Every function devfence's inventory has under `root`, by BDF.
fn devfence_functions(root: &Path) -> BTreeMap<String, Function> {
    let inv = read_inventory(&HostRoot::new(root)).expect("inventory");
    inv.pci
        .into_iter()
        .map(|p| {
            (
                p.bdf.to_string(),
                Function {
                    vendor: p.vendor,
                    device: p.device,
                    subsystem_vendor: p.subsystem_vendor,
                    subsystem_device: p.subsystem_device,
                    class: p.class,
                    driver: p.driver,
                    iommu_group: p.iommu_group.map(|g| g.0),
                    // lspci shows no node for "-1" (no NUMA affinity).
                    numa_node: p.numa_node.filter(|n| *n >= 0),
                },
            )
        })
        .collect()
}

fn agree_on(profile: Profile, vfs: Option<u32>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join(profile.name());
    sim::generate(&GenerateOptions {
        profile,
        out: out.clone(),
        vfs,
        host_id: 0,
    })
    .expect("generate");
    let ours = devfence_functions(&out);
    if !out.join("sys/bus/pci/devices").exists() {
        // A host without PCI (s390): lspci has nothing to open, devfence lists nothing.
        assert!(
            ours.is_empty(),
            "{}: functions without a PCI bus",
            profile.name()
        );
        return;
    }
    let theirs = lspci_functions(&out);
    assert!(
        !theirs.is_empty(),
        "{}: lspci listed no function",
        profile.name()
    );
    let their_bdfs: Vec<&String> = theirs.keys().collect();
    let our_bdfs: Vec<&String> = ours.keys().collect();
    assert_eq!(our_bdfs, their_bdfs, "{}: the set of BDFs", profile.name());
    for (bdf, t) in &theirs {
        assert_eq!(ours.get(bdf), Some(t), "{}: {bdf}", profile.name());
    }
    // The drivers and classes the comparison covered, so a profile that lost its
    // variety would show here.
    let drivers: std::collections::BTreeSet<_> = theirs.values().map(|f| &f.driver).collect();
    let classes: std::collections::BTreeSet<_> = theirs.values().map(|f| f.class).collect();
    eprintln!(
        "{}: {} functions agree ({} drivers, {} classes)",
        profile.name(),
        theirs.len(),
        drivers.len(),
        classes.len()
    );
}

#[test]
fn inventory_agrees_with_lspci_on_every_small_profile() {
    for profile in Profile::ALL {
        // `scale` (74 functions at the least, but 65,536 AP queues and 69k
        // directories to write) is compared by its bench, on the full tree.
        if profile != Profile::Scale {
            agree_on(profile, None);
        }
    }
}
