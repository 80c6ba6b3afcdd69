//! Simulated host trees: fixture profiles written with the kernel's real layout.
//!
//! [`generate`] writes one [`Profile`] under an output directory: `/sys`, `/dev/vfio`,
//! `/proc/sys/kernel/osrelease` as a real host shows them (every `/sys/bus/*/devices`
//! entry a relative symlink into `/sys/devices/...`, driver and group links in both
//! directions), and the tenancy that goes with it at `etc/devfence/tenancy.toml`.
//! Each profile plants a fixed, documented set of isolation defects
//! (`docs/profiles.md`) and is otherwise clean, so `devfence check` on it has an
//! exact expected answer.
//!
//! [`TreeBuilder`] is the reusable part: it writes single files and links, or whole
//! kernel objects (PCI functions with SR-IOV, IOMMU groups, VFIO nodes, InfiniBand
//! devices, mdevs, the s390 AP bus and vfio_ap matrix mdevs), and is fast enough for
//! the `scale` profile's ~70,000 directories.

mod builder;
pub(crate) use builder::pci_uevent;
mod profiles;

use std::fmt;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;

pub use builder::{
    ApBusSpec, ApMatrixMdevSpec, GroupKind, IbSpec, MdevSpec, MdevTypeSpec, NodeOwner, OfedVf,
    PciSpec, SriovSpec, TreeBuilder, config_space, guid_bytes_colon, guid_groups, matrix_text,
    relative_link, vf_bdf, vf_config_space,
};

/// Where a profile's tenancy file lands, as a path under the output directory.
pub const TENANCY_PATH: &str = "/etc/devfence/tenancy.toml";

/// Marks a tree as a simulated host: the acting commands then drive the simulated
/// kernel over it (and refuse any other root than `/`).
pub const SIMULATED_MARKER: &str = "/etc/devfence/simulated-host";

/// A fixture profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// `cx6-ib`: two ConnectX-6 PFs with VFs on vfio-pci, OFED VF GUIDs, P_Keys.
    Cx6Ib,
    /// `no-acs`: a PCIe switch without ACS, and a multifunction device.
    NoAcs,
    /// `userspace-pf`: PFs on vfio-pci with `enable_sriov=Y` and their VFs.
    UserspacePf,
    /// `gpu-mdev`: two vGPU parents with types and instances.
    GpuMdev,
    /// `s390-ap`: AP cards × domains, masks and two vfio_ap matrix mdevs.
    S390Ap,
    /// `scale`: 4096 VFs, 1024 mdevs, 256 × 256 APQNs, no defects.
    Scale,
    /// `testbed`: the QEMU guest of the real-kernel testbed (igb and NVMe SR-IOV
    /// PFs on their host drivers), no tenancy.
    Testbed,
    /// `lab`: a clean host before devfence hands anything out (an mlx5 IB PF, an
    /// igb PF and a user-space PF with VFs on vfio-pci, a vGPU parent), two
    /// tenants, no assignments, no findings.
    Lab,
}

impl Profile {
    /// Every profile, in documentation order.
    pub const ALL: [Profile; 8] = [
        Profile::Cx6Ib,
        Profile::NoAcs,
        Profile::UserspacePf,
        Profile::GpuMdev,
        Profile::S390Ap,
        Profile::Scale,
        Profile::Testbed,
        Profile::Lab,
    ];

    /// The name used on the command line.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Profile::Cx6Ib => "cx6-ib",
            Profile::NoAcs => "no-acs",
            Profile::UserspacePf => "userspace-pf",
            Profile::GpuMdev => "gpu-mdev",
            Profile::S390Ap => "s390-ap",
            Profile::Scale => "scale",
            Profile::Testbed => "testbed",
            Profile::Lab => "lab",
        }
    }

    /// One line saying what the profile models.
    #[must_use]
    pub fn description(self) -> &'static str {
        match self {
            Profile::Cx6Ib => {
                "Two mlx5 ConnectX-6 IB PFs with VFs on vfio-pci, OFED VF GUIDs and P_Keys"
            }
            Profile::NoAcs => {
                "A PCIe switch without ACS (one group, two tenants), a GPU with its audio function on a host driver, a device without reset"
            }
            Profile::UserspacePf => {
                "igb PFs on vfio-pci with enable_sriov=Y, VFs with per-device cdevs on kernel 6.8"
            }
            Profile::GpuMdev => {
                "Two vGPU mdev parents with types and instances held by two tenants"
            }
            Profile::S390Ap => {
                "s390 AP: 4 cards x 16 domains, host masks and two overlapping vfio_ap matrix mdevs"
            }
            Profile::Scale => {
                "4096 mlx5 VFs, 1024 mdevs and 256 x 256 AP queues over 64 tenants, no defects"
            }
            Profile::Testbed => {
                "The QEMU testbed guest: two igb PFs and an NVMe PF with SR-IOV on host drivers, no tenancy"
            }
            Profile::Lab => {
                "A clean host before handover: mlx5 IB, igb and user-space PFs with VFs on vfio-pci, a vGPU parent; two tenants, no assignments, no findings"
            }
        }
    }

    /// The values `--vfs` may take for this profile (`None`: it takes no `--vfs`).
    #[must_use]
    pub fn vfs_range(self) -> Option<RangeInclusive<u32>> {
        match self {
            Profile::Cx6Ib => Some(5..=profiles::CX6_MAX_VFS),
            Profile::UserspacePf => Some(3..=profiles::IGB_TOTAL_VFS),
            Profile::Scale => Some(1..=profiles::SCALE_MAX_VFS),
            Profile::NoAcs
            | Profile::GpuMdev
            | Profile::S390Ap
            | Profile::Testbed
            | Profile::Lab => None,
        }
    }

    /// What `--vfs` means for this profile and its default, if it takes one.
    #[must_use]
    pub fn default_vfs(self) -> Option<u32> {
        match self {
            Profile::Cx6Ib => Some(8),
            Profile::UserspacePf => Some(4),
            Profile::Scale => Some(4096),
            Profile::NoAcs
            | Profile::GpuMdev
            | Profile::S390Ap
            | Profile::Testbed
            | Profile::Lab => None,
        }
    }

    /// Checks a `--vfs` value against this profile and fills in the default.
    fn vfs(self, given: Option<u32>) -> Result<u32, SimError> {
        match (self.vfs_range(), given) {
            (None, None) => Ok(0),
            (None, Some(_)) => Err(SimError::VfsNotTaken { profile: self }),
            (Some(r), Some(n)) if !r.contains(&n) => Err(SimError::VfsRange {
                profile: self,
                given: n,
                min: *r.start(),
                max: *r.end(),
            }),
            (Some(_), Some(n)) => Ok(n),
            (Some(_), None) => Ok(self.default_vfs().unwrap_or(0)),
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Profile {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, SimError> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| SimError::UnknownProfile {
                name: s.chars().take(80).collect(),
            })
    }
}

/// What to generate, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerateOptions {
    /// The profile.
    pub profile: Profile,
    /// The output directory: absent or empty.
    pub out: PathBuf,
    /// `--vfs`: VFs per PF (`cx6-ib`, `userspace-pf` for its first PF) or total VFs
    /// (`scale`); `None` for the profile's default.
    pub vfs: Option<u32>,
    /// `--host-id`: varies the InfiniBand GUIDs so that several generated hosts
    /// can be nodes of one fabric; 0 (the default) keeps the profile's GUIDs.
    pub host_id: u8,
}

/// What [`generate`] (or a [`TreeBuilder`]) wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// PCI functions (`/sys/bus/pci/devices/*`).
    pub pci_functions: u32,
    /// IOMMU groups (`/sys/kernel/iommu_groups/*`).
    pub iommu_groups: u32,
    /// mdev parents (`/sys/class/mdev_bus/*`).
    pub mdev_parents: u32,
    /// mdev instances (`/sys/bus/mdev/devices/*`), vfio_ap matrix mdevs included.
    pub mdevs: u32,
    /// AP cards.
    pub ap_cards: u32,
    /// AP queues.
    pub ap_queues: u32,
    /// vfio_ap matrix mdevs.
    pub ap_matrix_mdevs: u32,
    /// InfiniBand devices (`/sys/class/infiniband/*`).
    pub ib_devices: u32,
    /// Device nodes under `/dev` (group nodes, per-device cdevs, the container).
    pub dev_nodes: u32,
    /// Regular files, device nodes and the tenancy file included.
    pub files: u32,
    /// Symbolic links.
    pub links: u32,
    /// Directories created.
    pub dirs: u32,
    /// Tenants in the tenancy file.
    pub tenants: u32,
    /// Assignments in the tenancy file.
    pub assignments: u32,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} PCI functions, {} IOMMU groups, {} mdevs ({} vfio_ap), {} AP queues on {} cards, \
             {} IB devices, {} /dev nodes; {} tenants, {} assignments; \
             {} files, {} links, {} directories",
            self.pci_functions,
            self.iommu_groups,
            self.mdevs,
            self.ap_matrix_mdevs,
            self.ap_queues,
            self.ap_cards,
            self.ib_devices,
            self.dev_nodes,
            self.tenants,
            self.assignments,
            self.files,
            self.links,
            self.dirs
        )
    }
}

/// Why a tree could not be generated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The profile name is not one of [`Profile::ALL`].
    #[error(
        "Unknown profile {name:?}. Hint: use one of cx6-ib, no-acs, userspace-pf, gpu-mdev, s390-ap, scale, testbed, lab"
    )]
    UnknownProfile {
        /// The name given.
        name: String,
    },
    /// `--vfs` was given to a profile that has no VFs to count.
    #[error("Profile {profile} does not take --vfs. Hint: leave --vfs out for this profile")]
    VfsNotTaken {
        /// The profile.
        profile: Profile,
    },
    /// `--vfs` is outside what the profile can lay out.
    #[error("--vfs {given} is out of range for profile {profile}. Hint: use {min} to {max}")]
    VfsRange {
        /// The profile.
        profile: Profile,
        /// The value given.
        given: u32,
        /// The smallest allowed value.
        min: u32,
        /// The largest allowed value.
        max: u32,
    },
    /// The output path exists and is not a directory.
    #[error(
        "Output path {} is not a directory. Hint: give a new or empty directory", path.display()
    )]
    OutNotDirectory {
        /// The output path.
        path: PathBuf,
    },
    /// The output directory has entries.
    #[error(
        "Output directory {} is not empty. Hint: refusing to write into a non-empty directory; give a new or empty one", path.display()
    )]
    OutNotEmpty {
        /// The output directory.
        path: PathBuf,
    },
    /// The output directory could not be inspected.
    #[error("Cannot read output directory {}. Hint: check that it is readable", path.display())]
    OutUnreadable {
        /// The output directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file, link or directory could not be written.
    #[error("Cannot write {}. Hint: check free space and permissions of the output directory", path.display())]
    Write {
        /// The path under the output directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A device node's owner could not be set.
    #[error(
        "Cannot give {} to {uid}:{gid}. Hint: tenant-owned /dev/vfio nodes need root (CAP_CHOWN) to generate", path.display()
    )]
    Chown {
        /// The node under the output directory.
        path: PathBuf,
        /// The owner asked for.
        uid: u32,
        /// The group asked for.
        gid: u32,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A [`TreeBuilder`] path was not an absolute kernel path.
    #[error(
        "Kernel path {path:?} is not absolute or contains . or ... Hint: pass paths as the kernel names them, e.g. /sys/devices/..."
    )]
    BadKernelPath {
        /// The path given.
        path: String,
    },
    /// A [`TreeBuilder`] helper named a PCI function that was not written yet.
    #[error(
        "PCI function {bdf} has not been written. Hint: write it with TreeBuilder::pci_function first"
    )]
    UnknownPci {
        /// The BDF.
        bdf: devfence_model::Bdf,
    },
    /// The tenancy could not be serialized.
    #[error("Cannot serialize the tenancy of profile {profile}. Hint: this is a bug in devfence")]
    Tenancy {
        /// The profile.
        profile: Profile,
        /// The serializer's error.
        #[source]
        source: toml::ser::Error,
    },
    /// A profile built an invalid identifier.
    #[error("Profile {profile} built an invalid {what}. Hint: this is a bug in devfence")]
    Internal {
        /// The profile.
        profile: Profile,
        /// What was invalid.
        what: String,
    },
}

/// Writes `opts.profile` under `opts.out` (created if absent; refused if not empty),
/// with its tenancy at [`TENANCY_PATH`], and returns what was written.
///
/// # Errors
/// [`SimError::VfsNotTaken`]/[`SimError::VfsRange`] for a bad `--vfs`;
/// [`SimError::OutNotEmpty`]/[`SimError::OutNotDirectory`] for an unusable output
/// path; [`SimError::Write`]/[`SimError::Chown`] when writing fails (the partial
/// tree is left in place).
pub fn generate(opts: &GenerateOptions) -> Result<Summary, SimError> {
    let vfs = opts.profile.vfs(opts.vfs)?;
    check_out(&opts.out)?;
    let mut b = TreeBuilder::new(&opts.out)?;
    let tenancy = profiles::build(opts.profile, &mut b, vfs, opts.host_id)?;
    let text = toml::to_string(&tenancy).map_err(|source| SimError::Tenancy {
        profile: opts.profile,
        source,
    })?;
    let header = format!(
        "# Tenancy of the simulated host profile {} ({}).\n\
         # Written by devfence's fixture generator; the findings it plants are listed in docs/profiles.md.\n",
        opts.profile,
        opts.profile.description()
    );
    b.file(TENANCY_PATH, header + &text)?;
    b.file(
        SIMULATED_MARKER,
        format!(
            "This tree is a simulated host (profile {}) written by `devfence sim generate`.\n\
             devfence acts on it through its simulated kernel.\n",
            opts.profile
        ),
    )?;
    let mut summary = b.finish();
    summary.tenants = tenancy.tenants.len() as u32;
    summary.assignments = tenancy.assignments.len() as u32;
    Ok(summary)
}

fn check_out(out: &std::path::Path) -> Result<(), SimError> {
    match std::fs::metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SimError::OutUnreadable {
            path: out.to_path_buf(),
            source,
        }),
        Ok(m) if !m.is_dir() => Err(SimError::OutNotDirectory {
            path: out.to_path_buf(),
        }),
        Ok(_) => {
            let mut entries = std::fs::read_dir(out).map_err(|source| SimError::OutUnreadable {
                path: out.to_path_buf(),
                source,
            })?;
            if entries.next().is_some() {
                Err(SimError::OutNotEmpty {
                    path: out.to_path_buf(),
                })
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
