//! The command line: one definition from which help, the man page and the shell
//! completions are all generated.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// devfence makes tenant isolation of passthrough devices a verified property.
///
/// It inventories what the kernel really has (PCI functions and SR-IOV, IOMMU groups
/// and VFIO nodes, mediated devices, s390 AP queues, InfiniBand ports and VF GUIDs),
/// checks it against isolation rules, and reports every finding with the paths and
/// values that show it and a hint to act on.
///
/// Every path is read under one host root (`--root`, default `/`), so the same
/// commands run on the real host, on a saved copy of its `/sys`, or on a simulated
/// host made by `devfence sim generate`.
///
/// Exit status: 0 success (for `check`: no error-severity finding); 1 `check` found
/// at least one error-severity finding; 2 usage, configuration or I/O error.
#[derive(Debug, Parser)]
#[command(
    name = "devfence",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Read the host under DIR instead of `/` (a fixture tree or a copy of a host).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "DEVFENCE_ROOT",
        default_value = "/"
    )]
    pub root: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the host's passthrough devices as the kernel shows them.
    ///
    /// Reads PCI functions (ids, class, driver, driver_override, IOMMU group, reset
    /// methods, SR-IOV PF/VF links, vfio-dev), IOMMU groups, /dev/vfio nodes with their
    /// owner and mode, the vfio-pci module parameters, the kernel release, mdev parents,
    /// types and instances, the s390 AP bus (masks, cards, queues, vfio_ap matrix
    /// mdevs) and InfiniBand devices (ports, LIDs, GUIDs, P_Key tables, mlx5 VF GUIDs).
    /// Attributes that cannot be read are listed at the end as problems; the rest is
    /// still reported.
    Inventory(InventoryArgs),
    /// Check the host against the isolation rules and report findings.
    ///
    /// Who holds what comes from `--tenancy FILE`, or else from
    /// `<root>/etc/devfence/tenancy.toml` when it exists; without either, only the
    /// rules that need no tenancy run (AP ownership, GUID duplicates, VF-token kernel).
    /// See `devfence rules` for the rule list.
    Check(CheckArgs),
    /// List the isolation rules `check` applies.
    Rules(RulesArgs),
    /// Simulated hosts: generate fixture trees with the real sysfs layout.
    #[command(subcommand)]
    Sim(SimCommand),
    /// Run the main story on simulated hosts: generate each profile and check it.
    Demo(DemoArgs),
    /// Print the man page (roff) to standard output.
    #[command(hide = true)]
    Man,
    /// Print shell completions to standard output.
    Completions {
        /// The shell (bash, zsh, fish, elvish, powershell).
        shell: clap_complete::Shell,
    },
}

/// `devfence inventory`.
#[derive(Debug, Args)]
pub struct InventoryArgs {
    /// Print JSON (schema: docs/inventory-schema.md) instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `devfence check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The tenancy file (TOML) declaring tenants and their devices.
    #[arg(long, value_name = "FILE")]
    pub tenancy: Option<PathBuf>,
}

/// `devfence rules`.
#[derive(Debug, Args)]
pub struct RulesArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `devfence sim …`.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Write a simulated host tree (sysfs, /dev/vfio, /proc) for a profile.
    ///
    /// The tree uses the kernel's real symlink layout, and a tenancy file declaring
    /// who holds what is written to `<out>/etc/devfence/tenancy.toml`. Each profile
    /// plants known isolation defects (docs/profiles.md) so `check` has something to
    /// find; `scale` plants none.
    Generate(GenerateArgs),
    /// List the profiles.
    Profiles,
}

/// `devfence sim generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The profile: cx6-ib, no-acs, userspace-pf, gpu-mdev, s390-ap or scale.
    #[arg(long, value_name = "NAME")]
    pub profile: String,
    /// The directory to write (must be absent or empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number of VFs (per PF for cx6-ib and userspace-pf; in total for scale).
    #[arg(long, value_name = "N")]
    pub vfs: Option<u32>,
}

/// `devfence demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the generated hosts in DIR (one subdirectory per profile) instead of a
    /// temporary directory that is removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
}
