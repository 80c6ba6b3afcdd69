//! [`TreeBuilder`]: writes a host tree with the kernel's real layout.
//!
//! Every path a caller passes is a *kernel path* (`/sys/devices/...`, `/dev/vfio/41`);
//! the builder maps it under its root. Links are written as relative symlinks computed
//! from the two kernel paths exactly as sysfs computes them
//! (`/sys/bus/pci/devices/0000:3b:00.0 -> ../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0`),
//! so a reader that follows them lands where it would on a real host.
//!
//! The builder is meant for large trees: each directory is created with one `mkdir`
//! (remembered, never re-checked), each file with one `open(O_CREAT|O_EXCL)` and one
//! `write`, each link with one `symlink`.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use devfence_model::{ApMask, Apqn, Bdf, Guid, MdevUuid};

use super::{SimError, Summary};

/// Owner and permission bits of a device node written under `/dev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeOwner {
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Permission bits, e.g. `0o600`.
    pub mode: u32,
}

impl NodeOwner {
    /// `root:root 0600`, what udev gives a VFIO node nobody claimed.
    pub const ROOT: NodeOwner = NodeOwner {
        uid: 0,
        gid: 0,
        mode: 0o600,
    };
    /// A node owned by `uid:gid` with mode `0600`.
    #[must_use]
    pub fn private(uid: u32, gid: u32) -> Self {
        Self {
            uid,
            gid,
            mode: 0o600,
        }
    }
}

/// What kind of IOMMU group to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// A group of the IOMMU driver: `type` `DMA`, an MSI reserved region.
    Dma,
    /// A group VFIO made for an emulated (mdev) device: `name` `vfio-noiommu`,
    /// `type` `unknown` (no default domain), no reserved regions.
    Emulated,
}

/// One PCI function for [`TreeBuilder::pci_function`].
#[derive(Clone, Debug)]
pub struct PciSpec<'a> {
    /// Its address.
    pub bdf: Bdf,
    /// The directory it sits in under `/sys/devices`: the upstream bridge, e.g.
    /// `/sys/devices/pci0000:3a/0000:3a:00.0` (or the host bridge
    /// `/sys/devices/pci0000:00` for a root port).
    pub parent: &'a str,
    /// `vendor`.
    pub vendor: u16,
    /// `device`.
    pub device: u16,
    /// `subsystem_vendor`.
    pub subsystem_vendor: u16,
    /// `subsystem_device`.
    pub subsystem_device: u16,
    /// `class`, e.g. `0x020700`.
    pub class: u32,
    /// `revision`.
    pub revision: u8,
    /// The bound driver (a `driver` link and a back-link in the driver directory).
    pub driver: Option<&'a str>,
    /// `driver_override`; `None` reads `(null)`.
    pub driver_override: Option<&'a str>,
    /// The IOMMU group, created as [`GroupKind::Dma`] on first use.
    pub iommu_group: Option<u32>,
    /// `reset_method`: `None` when the function supports no reset at all (neither
    /// `reset_method` nor `reset` exists); `Some(&[])` when every method was
    /// disabled (`reset_method` reads empty, no `reset`); otherwise the methods in
    /// priority order, and `reset` exists.
    pub reset_methods: Option<&'a [&'a str]>,
    /// `numa_node` (`-1` when unknown).
    pub numa_node: i32,
    /// For a bridge: `(secondary_bus_number, subordinate_bus_number)`.
    pub bridge_buses: Option<(u8, u8)>,
}

impl<'a> PciSpec<'a> {
    /// A function with the given ids and class, the subsystem ids equal to the ids,
    /// revision 0, no driver, no group, no reset, NUMA node 0.
    #[must_use]
    pub fn new(bdf: Bdf, parent: &'a str, vendor: u16, device: u16, class: u32) -> Self {
        Self {
            bdf,
            parent,
            vendor,
            device,
            subsystem_vendor: vendor,
            subsystem_device: device,
            class,
            revision: 0,
            driver: None,
            driver_override: None,
            iommu_group: None,
            reset_methods: None,
            numa_node: 0,
            bridge_buses: None,
        }
    }
}

/// The SR-IOV side of a PF for [`TreeBuilder::sriov`].
#[derive(Clone, Debug)]
pub struct SriovSpec<'a> {
    /// The PF (already written with [`TreeBuilder::pci_function`]).
    pub pf: Bdf,
    /// `sriov_totalvfs`.
    pub total_vfs: u32,
    /// `sriov_offset`: routing-ID distance from the PF to VF 0.
    pub offset: u16,
    /// `sriov_stride`: routing-ID distance between VFs.
    pub stride: u16,
    /// `sriov_vf_device`.
    pub vf_device: u16,
    /// `sriov_drivers_autoprobe`.
    pub drivers_autoprobe: bool,
    /// The VFs, index N → `virtfn<N>` (each already written); `sriov_numvfs` is
    /// their count.
    pub vfs: &'a [Bdf],
}

/// The routing-ID arithmetic of SR-IOV: the BDF of VF `index` of `pf`, or `None`
/// when it would leave the bus range. Like the kernel, a VF may land on a bus above
/// the PF's (`pci_iov_virtfn_bus`).
#[must_use]
pub fn vf_bdf(pf: Bdf, offset: u16, stride: u16, index: u32) -> Option<Bdf> {
    let rid = (u32::from(pf.bus()) << 8) | (u32::from(pf.device()) << 3) | u32::from(pf.function());
    let rid = rid + u32::from(offset) + index * u32::from(stride);
    let bus = u8::try_from(rid >> 8).ok()?;
    let devfn = (rid & 0xff) as u8;
    Bdf::new(pf.domain(), bus, devfn >> 3, devfn & 7)
}

/// The first 64 bytes of a function's configuration space (the `config` file):
/// vendor and device id (little-endian) at 0 and 2, revision at 8, class
/// (prog-if, sub-class, base) at 9..12, header type at 0x0e (1 for a bridge),
/// and the subsystem ids at 0x2c/0x2e (type 0) or the bus numbers at 0x18..0x1b
/// (type 1).
#[must_use]
pub fn config_space(spec: &PciSpec<'_>) -> [u8; 64] {
    let mut c = [0u8; 64];
    c[0..2].copy_from_slice(&spec.vendor.to_le_bytes());
    c[2..4].copy_from_slice(&spec.device.to_le_bytes());
    c[8] = spec.revision;
    c[9..12].copy_from_slice(&spec.class.to_le_bytes()[..3]);
    if spec.class >> 8 == 0x0604 {
        c[0x0e] = 1;
        c[0x18] = spec.bdf.bus();
        if let Some((secondary, subordinate)) = spec.bridge_buses {
            c[0x19] = secondary;
            c[0x1a] = subordinate;
        }
    } else {
        c[0x2c..0x2e].copy_from_slice(&spec.subsystem_vendor.to_le_bytes());
        c[0x2e..0x30].copy_from_slice(&spec.subsystem_device.to_le_bytes());
    }
    c
}

/// The config space of a VF: as [`config_space`], but the vendor and device id
/// registers read `0xffff`, as the SR-IOV specification (§3.4.1.1/§3.4.1.2)
/// requires and the real kernel shows (the ids live in the PF's SR-IOV
/// capability; sysfs `vendor`/`device` report them). Seen on the testbed's igb
/// VFs on 6.1 and 6.12.
#[must_use]
pub fn vf_config_space(spec: &PciSpec<'_>) -> [u8; 64] {
    let mut c = config_space(spec);
    c[0..4].copy_from_slice(&[0xff; 4]);
    c
}

/// The OFED `sriov/<N>/` entry of an mlx5 PF, for [`TreeBuilder::ofed_vf_guids`].
#[derive(Clone, Copy, Debug)]
pub struct OfedVf<'a> {
    /// The VF index N.
    pub index: u32,
    /// `node`.
    pub node_guid: Guid,
    /// `port`.
    pub port_guid: Guid,
    /// `policy`: `Down`, `Up` or `Follow`.
    pub policy: &'a str,
}

/// An InfiniBand device for [`TreeBuilder::ib_device`]: one CA with port 1 active.
#[derive(Clone, Debug)]
pub struct IbSpec<'a> {
    /// The device name, e.g. `mlx5_0`.
    pub name: &'a str,
    /// The PCI function behind it (already written).
    pub pci: Bdf,
    /// `node_guid`.
    pub node_guid: Guid,
    /// Port 1's GUID (the low 64 bits of `gids/0`).
    pub port_guid: Guid,
    /// Port 1's `lid`.
    pub lid: u16,
    /// Port 1's `sm_lid`.
    pub sm_lid: u16,
    /// The non-empty slots of port 1's P_Key table, from slot 0 on.
    pub pkeys: &'a [u16],
    /// The size of the P_Key table; slots past `pkeys` read `0x0000`.
    pub pkey_table_len: u32,
}

/// One `mdev_supported_types/<id>` of an mdev parent.
#[derive(Clone, Copy, Debug)]
pub struct MdevTypeSpec<'a> {
    /// The type id (directory name), e.g. `nvidia-63`.
    pub id: &'a str,
    /// `name`.
    pub name: &'a str,
    /// `device_api`, e.g. `vfio-pci`.
    pub device_api: &'a str,
    /// `available_instances`.
    pub available_instances: u32,
}

/// An mdev instance for [`TreeBuilder::mdev`].
#[derive(Clone, Copy, Debug)]
pub struct MdevSpec<'a> {
    /// The parent device directory, e.g. `/sys/devices/pci0000:64/0000:64:00.0/0000:65:00.0`.
    pub parent: &'a str,
    /// Its UUID (the directory is `<parent>/<uuid>`).
    pub uuid: MdevUuid,
    /// The type id under the parent's `mdev_supported_types`.
    pub type_id: &'a str,
    /// Its own IOMMU group, created as [`GroupKind::Emulated`].
    pub iommu_group: u32,
    /// The mdev driver it is bound to (`/sys/bus/mdev/drivers/<driver>`).
    pub driver: &'a str,
}

/// `/sys/bus/ap` for [`TreeBuilder::ap_bus`].
#[derive(Clone, Copy, Debug)]
pub struct ApBusSpec {
    /// `apmask`: adapters reserved for the host.
    pub apmask: ApMask,
    /// `aqmask`: domains reserved for the host.
    pub aqmask: ApMask,
    /// `ap_max_adapter_id`.
    pub max_adapter_id: u8,
    /// `ap_max_domain_id`.
    pub max_domain_id: u8,
    /// `bindings`: queues bound to a driver.
    pub bound_queues: u32,
    /// `bindings`: all queues.
    pub total_queues: u32,
}

/// A vfio_ap matrix mdev for [`TreeBuilder::ap_matrix_mdev`].
#[derive(Clone, Copy, Debug)]
pub struct ApMatrixMdevSpec<'a> {
    /// Its UUID.
    pub uuid: MdevUuid,
    /// Assigned adapters (`matrix`), ascending.
    pub adapters: &'a [u8],
    /// Assigned usage domains (`matrix`), ascending.
    pub domains: &'a [u8],
    /// Adapters the guest actually gets (`guest_matrix`), ascending.
    pub guest_adapters: &'a [u8],
    /// Domains the guest actually gets (`guest_matrix`), ascending.
    pub guest_domains: &'a [u8],
    /// `control_domains`, ascending.
    pub control_domains: &'a [u8],
    /// Its own IOMMU group.
    pub iommu_group: u32,
}

/// The text of a vfio_ap `matrix`/`guest_matrix` file: `%02x.%04x` per APQN (every
/// adapter × every domain), `%02x.` lines when only adapters are assigned, `.%04x`
/// lines when only domains are, empty when nothing is.
#[must_use]
pub fn matrix_text(adapters: &[u8], domains: &[u8]) -> String {
    let mut s = String::with_capacity(8 * adapters.len().max(1) * domains.len().max(1));
    match (adapters.is_empty(), domains.is_empty()) {
        (false, false) => {
            for &a in adapters {
                for &d in domains {
                    let _ = writeln!(s, "{a:02x}.{d:04x}");
                }
            }
        }
        (false, true) => adapters.iter().for_each(|a| {
            let _ = writeln!(s, "{a:02x}.");
        }),
        (true, false) => domains.iter().for_each(|d| {
            let _ = writeln!(s, ".{d:04x}");
        }),
        (true, true) => {}
    }
    s
}

/// The `xx:xx:xx:xx:xx:xx:xx:xx` form of a GUID (OFED `sriov/<N>/{node,port}`).
#[must_use]
pub fn guid_bytes_colon(g: Guid) -> String {
    let b = g.0.to_be_bytes();
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]
    )
}

/// The `%04x:%04x:%04x:%04x` form of a GUID (sysfs `node_guid`, the low half of a GID).
#[must_use]
pub fn guid_groups(g: Guid) -> String {
    let v = g.0;
    format!(
        "{:04x}:{:04x}:{:04x}:{:04x}",
        (v >> 48) & 0xffff,
        (v >> 32) & 0xffff,
        (v >> 16) & 0xffff,
        v & 0xffff
    )
}

/// The relative symlink text from a link at `link` to `target`, both absolute
/// kernel paths, computed like sysfs (`kernfs_get_target_path`): up to the nearest
/// directory that is a *strict* ancestor of the target, then down.
#[must_use]
pub fn relative_link(link: &str, target: &str) -> String {
    let l: Vec<&str> = link.split('/').filter(|c| !c.is_empty()).collect();
    let t: Vec<&str> = target.split('/').filter(|c| !c.is_empty()).collect();
    let dir = &l[..l.len().saturating_sub(1)];
    let mut common = dir.iter().zip(&t).take_while(|(a, b)| a == b).count();
    common = common.min(t.len().saturating_sub(1));
    let mut s = String::with_capacity(target.len() + 3 * (dir.len() - common));
    for _ in common..dir.len() {
        s.push_str("../");
    }
    s.push_str(&t[common..].join("/"));
    s
}

/// Writes a host tree under a root, keeping the real kernel layout.
///
/// Low-level: [`dir`](Self::dir), [`file`](Self::file),
/// [`write_only`](Self::write_only), [`link`](Self::link). High-level helpers write
/// whole kernel objects with their links in both directions: PCI functions, SR-IOV,
/// IOMMU groups, VFIO nodes, InfiniBand devices, mdevs, the s390 AP bus and vfio_ap.
/// Call [`finish`](Self::finish) for the counts.
#[derive(Debug)]
pub struct TreeBuilder {
    root: PathBuf,
    dirs: HashSet<String>,
    drivers: HashSet<String>,
    groups: HashSet<u32>,
    pci: HashMap<Bdf, String>,
    container_written: bool,
    next_vfio_dev: u32,
    summary: Summary,
}

impl TreeBuilder {
    /// A builder writing under `root`, which is created if absent.
    ///
    /// # Errors
    /// [`SimError::Write`] when `root` cannot be created.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, SimError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| SimError::Write {
            path: root.clone(),
            source,
        })?;
        let mut dirs = HashSet::new();
        dirs.insert(String::new());
        Ok(Self {
            root,
            dirs,
            drivers: HashSet::new(),
            groups: HashSet::new(),
            pci: HashMap::new(),
            container_written: false,
            next_vfio_dev: 0,
            summary: Summary::default(),
        })
    }

    /// The directory the tree is written under.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a kernel path lands under the root.
    #[must_use]
    pub fn host_path(&self, kpath: &str) -> PathBuf {
        self.root.join(kpath.trim_start_matches('/'))
    }

    /// The `/sys/devices/...` path of a PCI function written earlier.
    #[must_use]
    pub fn pci_path(&self, bdf: Bdf) -> Option<&str> {
        self.pci.get(&bdf).map(String::as_str)
    }

    /// The counts so far.
    #[must_use]
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Ends the build and returns what was written.
    #[must_use]
    pub fn finish(self) -> Summary {
        self.summary
    }

    fn key(kpath: &str) -> Result<&str, SimError> {
        let k = kpath.trim_end_matches('/');
        if !k.starts_with('/') || k.split('/').any(|c| c == "." || c == "..") {
            return Err(SimError::BadKernelPath {
                path: kpath.to_string(),
            });
        }
        Ok(k)
    }

    /// Creates the directory `kpath` and any missing parents (one `mkdir` each,
    /// remembered).
    ///
    /// # Errors
    /// [`SimError::BadKernelPath`] for a relative path or one with `.`/`..`;
    /// [`SimError::Write`] when `mkdir` fails.
    pub fn dir(&mut self, kpath: &str) -> Result<(), SimError> {
        let k = Self::key(kpath)?;
        self.ensure_dir(k)
    }

    fn ensure_dir(&mut self, k: &str) -> Result<(), SimError> {
        if self.dirs.contains(k) {
            return Ok(());
        }
        // Find the deepest known ancestor, then create downwards.
        let mut missing = vec![k];
        let mut cur = k;
        while let Some((parent, _)) = cur.rsplit_once('/') {
            if self.dirs.contains(parent) {
                break;
            }
            missing.push(parent);
            cur = parent;
        }
        for d in missing.into_iter().rev() {
            let p = self.root.join(&d[1..]);
            match fs::create_dir(&p) {
                Ok(()) => self.summary.dirs += 1,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {}
                Err(source) => return Err(SimError::Write { path: p, source }),
            }
            self.dirs.insert(d.to_string());
        }
        Ok(())
    }

    fn ensure_parent(&mut self, k: &str) -> Result<(), SimError> {
        match k.rsplit_once('/') {
            Some((parent, _)) => self.ensure_dir(parent),
            None => Ok(()),
        }
    }

    fn create(&mut self, kpath: &str, contents: &[u8], mode: u32) -> Result<fs::File, SimError> {
        let k = Self::key(kpath)?;
        self.ensure_parent(k)?;
        let p = self.root.join(&k[1..]);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .map_err(|source| SimError::Write {
                path: p.clone(),
                source,
            })?;
        if !contents.is_empty() {
            f.write_all(contents)
                .map_err(|source| SimError::Write { path: p, source })?;
        }
        self.summary.files += 1;
        Ok(f)
    }

    /// Writes a regular file (mode `0644`) with `contents`. Parents are created.
    /// Writing the same path twice is an error (it is always a bug in a profile).
    ///
    /// # Errors
    /// [`SimError::BadKernelPath`], or [`SimError::Write`] when the file exists or
    /// cannot be written.
    pub fn file(&mut self, kpath: &str, contents: impl AsRef<[u8]>) -> Result<(), SimError> {
        self.create(kpath, contents.as_ref(), 0o644).map(drop)
    }

    /// Writes an empty write-only attribute (mode `0200`), such as `bind`, `reset`
    /// or `remove`.
    ///
    /// # Errors
    /// As [`file`](Self::file).
    pub fn write_only(&mut self, kpath: &str) -> Result<(), SimError> {
        self.create(kpath, b"", 0o200).map(drop)
    }

    /// Writes the symlink `kpath` pointing at `ktarget`, as a relative link computed
    /// from the two kernel paths ([`relative_link`]). The target need not exist yet.
    ///
    /// # Errors
    /// [`SimError::BadKernelPath`], or [`SimError::Write`] when the link cannot be
    /// created.
    pub fn link(&mut self, kpath: &str, ktarget: &str) -> Result<(), SimError> {
        let k = Self::key(kpath)?;
        let t = Self::key(ktarget)?;
        self.ensure_parent(k)?;
        let p = self.root.join(&k[1..]);
        std::os::unix::fs::symlink(relative_link(k, t), &p)
            .map_err(|source| SimError::Write { path: p, source })?;
        self.summary.links += 1;
        Ok(())
    }

    /// `/proc/sys/kernel/osrelease`.
    ///
    /// # Errors
    /// As [`file`](Self::file).
    pub fn kernel_release(&mut self, release: &str) -> Result<(), SimError> {
        self.file("/proc/sys/kernel/osrelease", format!("{release}\n"))
    }

    /// `/sys/module/vfio_pci/parameters/{enable_sriov,disable_idle_d3}` (`Y`/`N`).
    ///
    /// # Errors
    /// As [`file`](Self::file).
    pub fn vfio_pci_module(
        &mut self,
        enable_sriov: bool,
        disable_idle_d3: bool,
    ) -> Result<(), SimError> {
        let yn = |b: bool| if b { "Y\n" } else { "N\n" };
        self.file(
            "/sys/module/vfio_pci/parameters/enable_sriov",
            yn(enable_sriov),
        )?;
        self.file(
            "/sys/module/vfio_pci/parameters/disable_idle_d3",
            yn(disable_idle_d3),
        )
    }

    /// Writes the directory of a loaded driver with no device bound
    /// (`/sys/bus/<bus>/drivers/<driver>/{bind,unbind,...}`), if not written yet.
    ///
    /// # Errors
    /// As [`file`](Self::file).
    pub fn load_driver(&mut self, bus: &str, driver: &str) -> Result<(), SimError> {
        let drv = format!("/sys/bus/{bus}/drivers/{driver}");
        if self.drivers.contains(&drv) {
            return Ok(());
        }
        self.write_only(&format!("{drv}/bind"))?;
        self.write_only(&format!("{drv}/unbind"))?;
        if bus == "pci" {
            self.write_only(&format!("{drv}/new_id"))?;
            self.write_only(&format!("{drv}/remove_id"))?;
        }
        self.drivers.insert(drv);
        Ok(())
    }

    /// Writes a network interface of a PCI function: `<pci>/net/<name>/{ifindex,type}`
    /// and `/sys/class/net/<name>` (e.g. an mlx5 PF's IPoIB `ib0`, type 32).
    ///
    /// # Errors
    /// [`SimError::UnknownPci`]; as [`file`](Self::file).
    pub fn netdev(
        &mut self,
        pci: Bdf,
        name: &str,
        ifindex: u32,
        arp_type: u32,
    ) -> Result<(), SimError> {
        let d = format!("{}/net/{name}", self.known_pci(pci)?);
        self.file(&format!("{d}/ifindex"), format!("{ifindex}\n"))?;
        self.file(&format!("{d}/type"), format!("{arp_type}\n"))?;
        self.link(&format!("/sys/class/net/{name}"), &d)
    }

    /// Binds the device `name` at `dev_path` to `driver` on `bus`: the device's
    /// `driver` link, and the driver directory's back-link. The driver directory
    /// gets its `bind`/`unbind` (and for PCI `new_id`/`remove_id`) files the first
    /// time it is used.
    ///
    /// # Errors
    /// As [`file`](Self::file) and [`link`](Self::link).
    pub fn bind_driver(
        &mut self,
        bus: &str,
        driver: &str,
        name: &str,
        dev_path: &str,
    ) -> Result<(), SimError> {
        self.load_driver(bus, driver)?;
        let drv = format!("/sys/bus/{bus}/drivers/{driver}");
        self.link(&format!("{dev_path}/driver"), &drv)?;
        self.link(&format!("{drv}/{name}"), dev_path)
    }

    /// Creates IOMMU group `n` if it does not exist yet: `devices/`, `type` and
    /// `reserved_regions` (and `name` for [`GroupKind::Emulated`]).
    ///
    /// # Errors
    /// As [`file`](Self::file).
    pub fn iommu_group(&mut self, n: u32, kind: GroupKind) -> Result<(), SimError> {
        if !self.groups.insert(n) {
            return Ok(());
        }
        let g = format!("/sys/kernel/iommu_groups/{n}");
        self.dir(&format!("{g}/devices"))?;
        match kind {
            GroupKind::Dma => {
                self.file(&format!("{g}/type"), "DMA\n")?;
                self.file(
                    &format!("{g}/reserved_regions"),
                    "0x00000000fee00000 0x00000000feefffff msi\n",
                )?;
            }
            GroupKind::Emulated => {
                self.file(&format!("{g}/type"), "unknown\n")?;
                self.file(&format!("{g}/reserved_regions"), "")?;
                self.file(&format!("{g}/name"), "vfio-noiommu\n")?;
            }
        }
        self.summary.iommu_groups += 1;
        Ok(())
    }

    /// Puts the device `name` at `dev_path` into group `n` (created if needed): the
    /// group's `devices/<name>` link and the device's `iommu_group` link.
    ///
    /// # Errors
    /// As [`link`](Self::link).
    pub fn group_member(
        &mut self,
        n: u32,
        kind: GroupKind,
        name: &str,
        dev_path: &str,
    ) -> Result<(), SimError> {
        self.iommu_group(n, kind)?;
        let g = format!("/sys/kernel/iommu_groups/{n}");
        self.link(&format!("{g}/devices/{name}"), dev_path)?;
        self.link(&format!("{dev_path}/iommu_group"), &g)
    }

    /// Writes a PCI function under `spec.parent` with its attributes, its driver
    /// binding, its IOMMU group membership and `/sys/bus/pci/devices/<BDF>`.
    /// Returns the function's `/sys/devices/...` path.
    ///
    /// # Errors
    /// As [`file`](Self::file) and [`link`](Self::link).
    pub fn pci_function(&mut self, spec: &PciSpec<'_>) -> Result<String, SimError> {
        let bdf = spec.bdf.to_string();
        let d = format!("{}/{bdf}", spec.parent.trim_end_matches('/'));
        self.dir(&d)?;
        let attrs: [(&str, String); 9] = [
            ("uevent", pci_uevent(spec)),
            ("vendor", format!("0x{:04x}\n", spec.vendor)),
            ("device", format!("0x{:04x}\n", spec.device)),
            (
                "subsystem_vendor",
                format!("0x{:04x}\n", spec.subsystem_vendor),
            ),
            (
                "subsystem_device",
                format!("0x{:04x}\n", spec.subsystem_device),
            ),
            ("class", format!("0x{:06x}\n", spec.class)),
            ("revision", format!("0x{:02x}\n", spec.revision)),
            ("numa_node", format!("{}\n", spec.numa_node)),
            (
                "driver_override",
                format!("{}\n", spec.driver_override.unwrap_or("(null)")),
            ),
        ];
        for (name, value) in attrs {
            self.file(&format!("{d}/{name}"), value)?;
        }
        if let Some(methods) = spec.reset_methods {
            let text = if methods.is_empty() {
                String::new()
            } else {
                format!("{}\n", methods.join(" "))
            };
            self.file(&format!("{d}/reset_method"), text)?;
            if !methods.is_empty() {
                self.write_only(&format!("{d}/reset"))?;
            }
        }
        self.write_only(&format!("{d}/remove"))?;
        self.file(&format!("{d}/config"), config_space(spec))?;
        if let Some((secondary, subordinate)) = spec.bridge_buses {
            self.file(
                &format!("{d}/secondary_bus_number"),
                format!("{secondary}\n"),
            )?;
            self.file(
                &format!("{d}/subordinate_bus_number"),
                format!("{subordinate}\n"),
            )?;
        }
        if let Some(drv) = spec.driver {
            self.bind_driver("pci", drv, &bdf, &d)?;
        }
        if let Some(n) = spec.iommu_group {
            self.group_member(n, GroupKind::Dma, &bdf, &d)?;
        }
        if self.pci.is_empty() {
            self.write_only("/sys/bus/pci/drivers_probe")?;
            self.write_only("/sys/bus/pci/rescan")?;
        }
        self.link(&format!("/sys/bus/pci/devices/{bdf}"), &d)?;
        self.pci.insert(spec.bdf, d.clone());
        self.summary.pci_functions += 1;
        Ok(d)
    }

    fn known_pci(&self, bdf: Bdf) -> Result<String, SimError> {
        self.pci
            .get(&bdf)
            .cloned()
            .ok_or(SimError::UnknownPci { bdf })
    }

    /// Writes the SR-IOV files of a PF (`sriov_totalvfs`, `sriov_numvfs`,
    /// `sriov_offset`, `sriov_stride`, `sriov_vf_device`, `sriov_drivers_autoprobe`)
    /// and the `virtfn<N>` ↔ `physfn` links. PF and VFs must be written already.
    ///
    /// # Errors
    /// [`SimError::UnknownPci`] for a function not written yet; as
    /// [`file`](Self::file) and [`link`](Self::link).
    pub fn sriov(&mut self, spec: &SriovSpec<'_>) -> Result<(), SimError> {
        let pf = self.known_pci(spec.pf)?;
        let num = spec.vfs.len();
        let files: [(&str, String); 6] = [
            ("sriov_totalvfs", format!("{}\n", spec.total_vfs)),
            ("sriov_numvfs", format!("{num}\n")),
            ("sriov_offset", format!("{}\n", spec.offset)),
            ("sriov_stride", format!("{}\n", spec.stride)),
            ("sriov_vf_device", format!("{:x}\n", spec.vf_device)),
            (
                "sriov_drivers_autoprobe",
                format!("{}\n", u8::from(spec.drivers_autoprobe)),
            ),
        ];
        for (name, value) in files {
            self.file(&format!("{pf}/{name}"), value)?;
        }
        for (i, vf) in spec.vfs.iter().enumerate() {
            let vp = self.known_pci(*vf)?;
            // A VF's vendor and device id registers read 0xffff (vf_config_space).
            let cfg = self.root.join(vp.trim_start_matches('/')).join("config");
            if let Ok(mut c) = std::fs::read(&cfg)
                && c.len() >= 4
            {
                c[0..4].copy_from_slice(&[0xff; 4]);
                std::fs::write(&cfg, &c).map_err(|source| SimError::Write {
                    path: cfg.clone(),
                    source,
                })?;
            }
            self.link(&format!("{pf}/virtfn{i}"), &vp)?;
            self.link(&format!("{vp}/physfn"), &pf)?;
        }
        Ok(())
    }

    /// Writes the VFIO group node `/dev/vfio/<n>` (an empty regular file) with the
    /// given owner and mode, and the container `/dev/vfio/vfio` (`root`, `0666`) the
    /// first time.
    ///
    /// # Errors
    /// As [`file`](Self::file); [`SimError::Chown`] when the owner cannot be set
    /// (setting another owner needs root).
    pub fn vfio_group_node(&mut self, n: u32, owner: NodeOwner) -> Result<(), SimError> {
        if !self.container_written {
            self.node(
                "/dev/vfio/vfio",
                NodeOwner {
                    uid: 0,
                    gid: 0,
                    mode: 0o666,
                },
            )?;
            self.container_written = true;
        }
        self.node(&format!("/dev/vfio/{n}"), owner)
    }

    /// An empty file standing for a device node, with owner and mode set.
    ///
    /// # Errors
    /// As [`vfio_group_node`](Self::vfio_group_node).
    pub fn node(&mut self, kpath: &str, owner: NodeOwner) -> Result<(), SimError> {
        let f = self.create(kpath, b"", 0o600)?;
        let p = self.host_path(kpath);
        set_owner(&f, &p, owner)?;
        self.summary.dev_nodes += 1;
        Ok(())
    }

    /// Writes `vfio-dev/vfio<X>/` under a function bound to vfio (X is the next free
    /// index) and `/sys/class/vfio-dev/vfio<X>`. With `cdev` (kernels with
    /// `CONFIG_VFIO_DEVICE_CDEV`, 6.6+) also `vfio<X>/dev` (`511:X`) and the node
    /// `/dev/vfio/devices/vfio<X>` with that owner. Returns X.
    ///
    /// # Errors
    /// As [`file`](Self::file) and [`node`](Self::node).
    pub fn vfio_dev(&mut self, dev_path: &str, cdev: Option<NodeOwner>) -> Result<u32, SimError> {
        let x = self.next_vfio_dev;
        self.next_vfio_dev += 1;
        let d = format!("{dev_path}/vfio-dev/vfio{x}");
        self.dir(&d)?;
        self.link(&format!("/sys/class/vfio-dev/vfio{x}"), &d)?;
        if let Some(owner) = cdev {
            self.file(&format!("{d}/dev"), format!("511:{x}\n"))?;
            self.node(&format!("/dev/vfio/devices/vfio{x}"), owner)?;
        }
        Ok(x)
    }

    /// Writes the MLNX_OFED `sriov/<N>/{node,port,policy}` of an mlx5 PF.
    ///
    /// # Errors
    /// [`SimError::UnknownPci`]; as [`file`](Self::file).
    pub fn ofed_vf_guids(&mut self, pf: Bdf, vf: &OfedVf<'_>) -> Result<(), SimError> {
        let d = format!("{}/sriov/{}", self.known_pci(pf)?, vf.index);
        self.file(
            &format!("{d}/node"),
            format!("{}\n", guid_bytes_colon(vf.node_guid)),
        )?;
        self.file(
            &format!("{d}/port"),
            format!("{}\n", guid_bytes_colon(vf.port_guid)),
        )?;
        self.file(&format!("{d}/policy"), format!("{}\n", vf.policy))
    }

    /// Writes an InfiniBand CA under its PCI function
    /// (`<pci>/infiniband/<name>/...`, port 1 active) and
    /// `/sys/class/infiniband/<name>`.
    ///
    /// # Errors
    /// [`SimError::UnknownPci`]; as [`file`](Self::file).
    pub fn ib_device(&mut self, spec: &IbSpec<'_>) -> Result<(), SimError> {
        let pci = self.known_pci(spec.pci)?;
        let d = format!("{pci}/infiniband/{}", spec.name);
        self.file(
            &format!("{d}/node_guid"),
            format!("{}\n", guid_groups(spec.node_guid)),
        )?;
        self.file(&format!("{d}/node_type"), "1: CA\n")?;
        self.file(&format!("{d}/fw_ver"), "20.39.1002\n")?;
        self.link(&format!("{d}/device"), &pci)?;
        let p = format!("{d}/ports/1");
        let attrs: [(&str, String); 8] = [
            ("state", "4: ACTIVE\n".to_string()),
            ("phys_state", "5: LinkUp\n".to_string()),
            ("rate", "200 Gb/sec (4X HDR)\n".to_string()),
            ("lid", format!("0x{:x}\n", spec.lid)),
            ("sm_lid", format!("0x{:x}\n", spec.sm_lid)),
            ("lid_mask_count", "0\n".to_string()),
            ("link_layer", "InfiniBand\n".to_string()),
            (
                "gids/0",
                format!("fe80:0000:0000:0000:{}\n", guid_groups(spec.port_guid)),
            ),
        ];
        for (name, value) in attrs {
            self.file(&format!("{p}/{name}"), value)?;
        }
        let len = spec.pkey_table_len.max(spec.pkeys.len() as u32);
        for i in 0..len {
            let v = spec.pkeys.get(i as usize).copied().unwrap_or(0);
            self.file(&format!("{p}/pkeys/{i}"), format!("0x{v:04x}\n"))?;
        }
        self.link(&format!("/sys/class/infiniband/{}", spec.name), &d)?;
        self.summary.ib_devices += 1;
        Ok(())
    }

    /// Makes the device at `parent` (named `name`, a BDF or `matrix`) an mdev
    /// parent: `mdev_supported_types/<id>/{name,device_api,available_instances,create,devices/}`
    /// and `/sys/class/mdev_bus/<name>`.
    ///
    /// # Errors
    /// As [`file`](Self::file).
    pub fn mdev_parent(
        &mut self,
        parent: &str,
        name: &str,
        types: &[MdevTypeSpec<'_>],
    ) -> Result<(), SimError> {
        for t in types {
            let d = format!("{parent}/mdev_supported_types/{}", t.id);
            self.file(&format!("{d}/name"), format!("{}\n", t.name))?;
            self.file(&format!("{d}/device_api"), format!("{}\n", t.device_api))?;
            self.file(
                &format!("{d}/available_instances"),
                format!("{}\n", t.available_instances),
            )?;
            self.write_only(&format!("{d}/create"))?;
            self.dir(&format!("{d}/devices"))?;
        }
        self.link(&format!("/sys/class/mdev_bus/{name}"), parent)?;
        self.summary.mdev_parents += 1;
        Ok(())
    }

    /// Writes an mdev instance `<parent>/<uuid>`: `mdev_type` link, `remove`, its
    /// own emulated IOMMU group, the driver binding, `/sys/bus/mdev/devices/<uuid>`
    /// and the type's `devices/<uuid>` link. Returns the instance's path.
    ///
    /// # Errors
    /// As [`file`](Self::file) and [`link`](Self::link).
    pub fn mdev(&mut self, spec: &MdevSpec<'_>) -> Result<String, SimError> {
        let uuid = spec.uuid.to_string();
        let d = format!("{}/{uuid}", spec.parent);
        let t = format!("{}/mdev_supported_types/{}", spec.parent, spec.type_id);
        self.link(&format!("{d}/mdev_type"), &t)?;
        self.write_only(&format!("{d}/remove"))?;
        self.group_member(spec.iommu_group, GroupKind::Emulated, &uuid, &d)?;
        self.bind_driver("mdev", spec.driver, &uuid, &d)?;
        self.link(&format!("/sys/bus/mdev/devices/{uuid}"), &d)?;
        self.link(&format!("{t}/devices/{uuid}"), &d)?;
        self.summary.mdevs += 1;
        Ok(d)
    }

    /// Writes `/sys/bus/ap/{apmask,aqmask,ap_max_adapter_id,ap_max_domain_id,bindings}`.
    ///
    /// # Errors
    /// As [`file`](Self::file).
    pub fn ap_bus(&mut self, spec: &ApBusSpec) -> Result<(), SimError> {
        self.file("/sys/bus/ap/apmask", format!("{}\n", spec.apmask))?;
        self.file("/sys/bus/ap/aqmask", format!("{}\n", spec.aqmask))?;
        self.file(
            "/sys/bus/ap/ap_max_adapter_id",
            format!("{}\n", spec.max_adapter_id),
        )?;
        self.file(
            "/sys/bus/ap/ap_max_domain_id",
            format!("{}\n", spec.max_domain_id),
        )?;
        let complete = if spec.bound_queues == spec.total_queues {
            " (complete)"
        } else {
            ""
        };
        self.file(
            "/sys/bus/ap/bindings",
            format!("{}/{}{complete}\n", spec.bound_queues, spec.total_queues),
        )
    }

    /// Writes the AP card `/sys/devices/ap/cardXX` on `cex4card` (`hwtype`,
    /// `raw_hwtype`, `type`, `online`) and `/sys/bus/ap/devices/cardXX`.
    ///
    /// # Errors
    /// As [`file`](Self::file).
    pub fn ap_card(&mut self, adapter: u8, hwtype: u32, card_type: &str) -> Result<(), SimError> {
        let name = format!("card{adapter:02x}");
        let d = format!("/sys/devices/ap/{name}");
        self.file(&format!("{d}/hwtype"), format!("{hwtype}\n"))?;
        self.file(&format!("{d}/raw_hwtype"), format!("{hwtype}\n"))?;
        self.file(&format!("{d}/type"), format!("{card_type}\n"))?;
        self.file(&format!("{d}/online"), "1\n")?;
        self.bind_driver("ap", "cex4card", &name, &d)?;
        self.link(&format!("/sys/bus/ap/devices/{name}"), &d)?;
        self.summary.ap_cards += 1;
        Ok(())
    }

    /// Writes the AP queue `/sys/devices/ap/cardXX/XX.YYYY` bound to `driver`
    /// (`cex4queue` or `vfio_ap`), its `status` (only under vfio_ap: `assigned`,
    /// `unassigned`, `in use`) and `/sys/bus/ap/devices/XX.YYYY`.
    ///
    /// # Errors
    /// As [`file`](Self::file).
    pub fn ap_queue(
        &mut self,
        apqn: Apqn,
        driver: &str,
        status: Option<&str>,
    ) -> Result<(), SimError> {
        let name = apqn.to_string();
        let d = format!("/sys/devices/ap/card{:02x}/{name}", apqn.adapter);
        self.dir(&d)?;
        if let Some(s) = status {
            self.file(&format!("{d}/status"), format!("{s}\n"))?;
        }
        self.bind_driver("ap", driver, &name, &d)?;
        self.link(&format!("/sys/bus/ap/devices/{name}"), &d)?;
        self.summary.ap_queues += 1;
        Ok(())
    }

    /// Writes the vfio_ap matrix device `/sys/devices/vfio_ap/matrix` (driver
    /// `vfio_ap` on bus `matrix`) as an mdev parent with type `vfio_ap-passthrough`.
    ///
    /// # Errors
    /// As [`file`](Self::file).
    pub fn vfio_ap_matrix(&mut self, available_instances: u32) -> Result<(), SimError> {
        let d = "/sys/devices/vfio_ap/matrix";
        self.bind_driver("matrix", "vfio_ap", "matrix", d)?;
        self.link("/sys/bus/matrix/devices/matrix", d)?;
        self.mdev_parent(
            d,
            "matrix",
            &[MdevTypeSpec {
                id: "vfio_ap-passthrough",
                name: "VFIO AP Passthrough Device",
                device_api: "vfio-ap",
                available_instances,
            }],
        )
    }

    /// Writes a vfio_ap matrix mdev under `/sys/devices/vfio_ap/matrix`: the mdev
    /// itself (driver `vfio_ap_mdev`), `matrix`, `guest_matrix`, `control_domains`
    /// and the `assign_*`/`unassign_*` attributes.
    ///
    /// # Errors
    /// As [`file`](Self::file) and [`link`](Self::link).
    pub fn ap_matrix_mdev(&mut self, spec: &ApMatrixMdevSpec<'_>) -> Result<(), SimError> {
        let d = self.mdev(&MdevSpec {
            parent: "/sys/devices/vfio_ap/matrix",
            uuid: spec.uuid,
            type_id: "vfio_ap-passthrough",
            iommu_group: spec.iommu_group,
            driver: "vfio_ap_mdev",
        })?;
        self.file(
            &format!("{d}/matrix"),
            matrix_text(spec.adapters, spec.domains),
        )?;
        self.file(
            &format!("{d}/guest_matrix"),
            matrix_text(spec.guest_adapters, spec.guest_domains),
        )?;
        let cd: String = spec
            .control_domains
            .iter()
            .map(|c| format!("{c:04x}\n"))
            .collect();
        self.file(&format!("{d}/control_domains"), cd)?;
        for what in ["adapter", "domain", "control_domain"] {
            self.write_only(&format!("{d}/assign_{what}"))?;
            self.write_only(&format!("{d}/unassign_{what}"))?;
        }
        self.summary.ap_matrix_mdevs += 1;
        Ok(())
    }
}

fn set_owner(f: &fs::File, p: &Path, owner: NodeOwner) -> Result<(), SimError> {
    let chown_err = |source| SimError::Chown {
        path: p.to_path_buf(),
        uid: owner.uid,
        gid: owner.gid,
        source,
    };
    std::os::unix::fs::fchown(f, Some(owner.uid), Some(owner.gid)).map_err(chown_err)?;
    f.set_permissions(fs::Permissions::from_mode(owner.mode))
        .map_err(|source| SimError::Write {
            path: p.to_path_buf(),
            source,
        })
}

/// A PCI function's `uevent` as the kernel shows it (`pci_uevent`,
/// `drivers/pci/pci-driver.c`): class, ids, slot name and module alias, in the
/// kernel's order and case. The simulated file has no `DRIVER=` line: the
/// driver core adds it from the live binding, which the simulator keeps in the
/// `driver` link, and devfence reads the driver from that link.
pub(crate) fn pci_uevent(spec: &PciSpec<'_>) -> String {
    let (bdf, class) = (spec.bdf, spec.class);
    let (v, d) = (spec.vendor, spec.device);
    let (sv, sd) = (spec.subsystem_vendor, spec.subsystem_device);
    format!(
        "PCI_CLASS={class:04X}\nPCI_ID={v:04X}:{d:04X}\nPCI_SUBSYS_ID={sv:04X}:{sd:04X}\nPCI_SLOT_NAME={bdf}\nMODALIAS=pci:v{v:08X}d{d:08X}sv{sv:08X}sd{sd:08X}bc{:02X}sc{:02X}i{:02X}\n",
        class >> 16,
        (class >> 8) & 0xff,
        class & 0xff,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_links_match_the_kernel() {
        assert_eq!(
            relative_link(
                "/sys/bus/pci/devices/0000:3b:00.0",
                "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0"
            ),
            "../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0"
        );
        assert_eq!(
            relative_link(
                "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/virtfn0",
                "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.1"
            ),
            "../0000:3b:00.1"
        );
        assert_eq!(
            relative_link(
                "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/iommu_group",
                "/sys/kernel/iommu_groups/40"
            ),
            "../../../../kernel/iommu_groups/40"
        );
        // A target that is an ancestor of the link: the kernel still names it.
        assert_eq!(
            relative_link(
                "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/infiniband/mlx5_0/device",
                "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0"
            ),
            "../../../0000:3b:00.0"
        );
    }

    #[test]
    fn vf_routing_ids_spill_over() {
        let pf: Bdf = "0000:3b:00.0".parse().unwrap();
        assert_eq!(vf_bdf(pf, 1, 1, 0).unwrap().to_string(), "0000:3b:00.1");
        assert_eq!(vf_bdf(pf, 1, 1, 7).unwrap().to_string(), "0000:3b:01.0");
        assert_eq!(vf_bdf(pf, 1, 1, 255).unwrap().to_string(), "0000:3c:00.0");
        let igb: Bdf = "0000:5e:00.0".parse().unwrap();
        assert_eq!(vf_bdf(igb, 128, 2, 3).unwrap().to_string(), "0000:5e:10.6");
        let last: Bdf = "0000:ff:00.0".parse().unwrap();
        assert!(vf_bdf(last, 1, 1, 255).is_none());
    }

    #[test]
    fn matrix_and_guid_text() {
        assert_eq!(matrix_text(&[5, 6], &[0x12]), "05.0012\n06.0012\n");
        assert_eq!(matrix_text(&[5], &[]), "05.\n");
        assert_eq!(matrix_text(&[], &[0x20]), ".0020\n");
        assert_eq!(matrix_text(&[], &[]), "");
        let g = Guid(0x0002_c903_00a1_b2c3);
        assert_eq!(guid_bytes_colon(g), "00:02:c9:03:00:a1:b2:c3");
        assert_eq!(guid_groups(g), "0002:c903:00a1:b2c3");
    }
}
