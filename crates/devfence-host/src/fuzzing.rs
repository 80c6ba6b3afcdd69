//! The body of the `root_containment` fuzz target (`fuzz/`): a random host tree
//! with links (into the tree, out of it — absolute, climbing with `..`, to a
//! directory outside), FIFOs, huge sparse files, loops and garbage values, read
//! with [`crate::read_inventory`]. The inventory must come back (a FIFO never
//! blocks, a huge file is cut at the cap), never panic, and never contain
//! anything from outside the root: every file outside holds a marker and the
//! outside directory lists an entry named by it, which must appear nowhere in the
//! inventory's JSON. (The outside paths themselves are unmarked: the text of a
//! link inside the root may name them, and reporting it reads nothing outside.)
//!
//! Kept in the library so that an ordinary test runs it on stable too.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::HostRoot;

/// What every file outside the root holds, and an entry outside is named.
pub const MARKER: &str = "OUTSIDEthe0ROOT";

/// Kernel paths a generated tree puts things at: what the inventory reads.
const PATHS: &[&str] = &[
    "/sys/bus/pci/devices/0000:3b:00.0",
    "/sys/bus/pci/devices/0000:3b:00.1",
    "/sys/devices/pci0000:3a/0000:3b:00.0",
    "/sys/devices/pci0000:3a/0000:3b:00.0/uevent",
    "/sys/devices/pci0000:3a/0000:3b:00.0/vendor",
    "/sys/devices/pci0000:3a/0000:3b:00.0/device",
    "/sys/devices/pci0000:3a/0000:3b:00.0/class",
    "/sys/devices/pci0000:3a/0000:3b:00.0/driver_override",
    "/sys/devices/pci0000:3a/0000:3b:00.0/driver",
    "/sys/devices/pci0000:3a/0000:3b:00.0/iommu_group",
    "/sys/devices/pci0000:3a/0000:3b:00.0/sriov_totalvfs",
    "/sys/devices/pci0000:3a/0000:3b:00.0/sriov_numvfs",
    "/sys/devices/pci0000:3a/0000:3b:00.0/virtfn0",
    "/sys/devices/pci0000:3a/0000:3b:00.0/reset",
    "/sys/devices/pci0000:3a/0000:3b:00.0/infiniband",
    "/sys/devices/pci0000:3a/0000:3b:00.1",
    "/sys/devices/pci0000:3a/0000:3b:00.1/uevent",
    "/sys/devices/pci0000:3a/0000:3b:00.1/vendor",
    "/sys/devices/pci0000:3a/0000:3b:00.1/physfn",
    "/sys/devices/pci0000:3a/0000:3b:00.1/iommu_group",
    "/sys/kernel/iommu_groups",
    "/sys/kernel/iommu_groups/7",
    "/sys/kernel/iommu_groups/7/devices",
    "/sys/kernel/iommu_groups/7/devices/0000:3b:00.0",
    "/sys/kernel/iommu_groups/7/type",
    "/sys/bus/pci/drivers/vfio-pci",
    "/sys/module/vfio_pci/parameters/enable_sriov",
    "/dev/vfio",
    "/dev/vfio/7",
    "/dev/vfio/vfio",
    "/sys/class/mdev_bus",
    "/sys/class/mdev_bus/0000:3b:00.0",
    "/sys/bus/mdev/devices",
    "/sys/class/infiniband",
    "/sys/class/infiniband/mlx5_0",
    "/sys/bus/ap",
    "/sys/bus/ap/apmask",
    "/sys/bus/ap/devices",
    "/proc/sys/kernel/osrelease",
];

/// Values a generated file may hold.
const VALUES: &[&[u8]] = &[
    b"0x15b3\n",
    b"0x101c\n",
    b"0x020700\n",
    b"PCI_CLASS=20700\nPCI_ID=15B3:101D\nPCI_SUBSYS_ID=15B3:0016\n",
    b"vfio-pci\n",
    b"(null)\n",
    b"4\n",
    b"0\n",
    b"\xff\xfe\n",
    b"",
    b"6.1.0-26-amd64\n",
    b"0xffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff\n",
];

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A scratch directory on tmpfs where there is one.
fn scratch() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!(
        "devfence-fuzz-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Builds a tree from `data`, reads its inventory, checks containment; panics
/// on a violation (that is what the fuzzer reports).
///
/// # Panics
/// When the inventory contains anything from outside the root, or cannot be read.
pub fn root_containment(data: &[u8]) {
    let dir = scratch();
    let root = dir.join("root");
    let outside = dir.join("outside");
    // Outside: a file and a device-like directory, their contents marked.
    let _ = fs::create_dir_all(outside.join("devs/0000:3b:00.7"));
    let _ = fs::create_dir_all(outside.join(format!("devs/{MARKER}")));
    let _ = fs::write(outside.join("secret"), format!("{MARKER}\n"));
    for f in ["uevent", "vendor", "device", "class", "type"] {
        let _ = fs::write(
            outside.join(format!("devs/0000:3b:00.7/{f}")),
            format!("{MARKER}\n"),
        );
    }
    let _ = fs::create_dir_all(&root);
    build(&root, &outside, data);
    let inv = crate::read_inventory(&HostRoot::new(&root));
    let _ = fs::remove_dir_all(&dir);
    let inv = inv.unwrap_or_else(|e| panic!("the root is there: {e}"));
    let json = serde_json::to_string(&inv).unwrap_or_default();
    assert!(
        !json.contains(MARKER),
        "the inventory read outside the root: {json}"
    );
}

fn build(root: &Path, outside: &Path, data: &[u8]) {
    let at = |k: &str| root.join(k.trim_start_matches('/'));
    for op in data.chunks(3) {
        let (kind, p, arg) = match op {
            [a, b, c] => (*a, usize::from(*b), *c),
            _ => return,
        };
        let Some(k) = PATHS.get(p % PATHS.len()) else {
            return;
        };
        let path = at(k);
        // Parents are made without following links out of the scratch area: a
        // parent that is a link is left as it is (creating through it could only
        // write into the marked outside directory, which the root must not see).
        if let Some(parent) = path.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let _ = fs::remove_file(&path);
        let _ = match kind % 10 {
            0 | 1 => fs::write(&path, VALUES[usize::from(arg) % VALUES.len()]),
            2 => {
                let c =
                    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default();
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    c.as_c_str(),
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o644),
                    0,
                )
                .map_err(std::io::Error::from)
            }
            3 => symlink(outside.join("secret"), &path),
            4 => symlink(
                format!(
                    "{}{}",
                    "../".repeat(usize::from(arg % 24) + 1),
                    outside
                        .join("secret")
                        .display()
                        .to_string()
                        .trim_start_matches('/')
                ),
                &path,
            ),
            5 => symlink(outside.join("devs"), &path),
            6 => fs::File::create(&path).and_then(|f| f.set_len(64 << 20)),
            7 => {
                let to = PATHS[usize::from(arg) % PATHS.len()];
                symlink(
                    format!("{}{}", "../".repeat(8), to.trim_start_matches('/')),
                    &path,
                )
            }
            8 => symlink(&path, &path),
            _ => fs::create_dir_all(&path),
        };
    }
}

#[cfg(test)]
mod tests {
    /// issue 18 item 6: the fuzz body on a few hundred generated trees (a small
    /// xorshift stream, fixed seed), so that stable CI runs it too.
    #[test]
    fn root_containment_holds_on_generated_trees() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..300 {
            let n = (x % 60) as usize + 3;
            let data: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            super::root_containment(&data);
        }
    }
}
