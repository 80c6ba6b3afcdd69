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
/// Exit status, for every command: 0 success; 1 the answer is no — `check` found
/// an error-severity finding, `verify` a drift, `audit verify` a broken chain, or a
/// rule refused the request (assign, handover or release refused or quarantined
/// at a gate; an acting command on a device the ledger holds; a tenant that
/// still holds devices; the libvirt hook; `state seal/admit/inspect/load`); 2
/// usage, configuration or I/O error (a malformed argument, an unknown device or
/// tenant, a damaged ledger, a file that cannot be read).
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

    /// Run on a freshly generated simulated host of PROFILE (a temporary tree,
    /// driven by the simulated kernel) instead of `--root`. See `devfence sim profiles`.
    #[arg(long, global = true, value_name = "PROFILE")]
    pub sim: Option<String>,

    /// The ledger (SQLite). Default: `<root>/var/lib/devfence/ledger.db`.
    #[arg(long, global = true, value_name = "FILE", env = "DEVFENCE_LEDGER")]
    pub ledger: Option<PathBuf>,

    /// The configuration file (which subnet manager devfence drives; its keys are
    /// in devfence.toml(5), `devfence man --out DIR` writes it). Default:
    /// `<root>/etc/devfence/devfence.toml` when it exists.
    #[arg(long, global = true, value_name = "FILE", env = "DEVFENCE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Act in this process even when the host agent (`devfence serve`) runs
    /// (also `DEVFENCE_DIRECT=1`). Without it, the commands the agent serves
    /// (assign, handover, release, recover, check, plan, inventory, status,
    /// tenant list, audit show and verify, the libvirt hook) go through the
    /// agent when its socket answers; see docs/agent.md.
    #[arg(long, global = true, conflicts_with = "via_agent")]
    pub direct: bool,

    /// Go through the host agent; no agent is an error (also
    /// `DEVFENCE_AGENT=required`).
    #[arg(long, global = true)]
    pub via_agent: bool,

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
    /// Bind a PCI function to a driver (driver_override + drivers_probe, read back).
    ///
    /// Unbinds it from its current driver first. On failure the previous
    /// driver_override is restored and the old driver rebound, so nothing is left
    /// half-applied. Binding to vfio-pci while other members of the IOMMU group stay on
    /// host drivers leaves the group unusable; devfence says so, and `--with-group`
    /// binds those companions too.
    Bind(BindArgs),
    /// Unbind a PCI function from its driver and read back that it has none.
    Unbind(UnbindArgs),
    /// Set the number of SR-IOV VFs of a PF (writing 0 first when changing a
    /// non-zero count) and read back the VF links.
    Vfs(VfsArgs),
    /// Reset a PCI function through its `reset` file and confirm it answers
    /// (config space vendor id reads back).
    Reset(ResetArgs),
    /// Create or remove mediated devices.
    #[command(subcommand)]
    Mdev(MdevCommand),
    /// s390 AP: assign queues to vfio_ap matrix mdevs, edit the AP bus masks.
    #[command(subcommand)]
    Ap(ApCommand),
    /// Create the ledger (`<root>/var/lib/devfence/ledger.db`, or --ledger FILE).
    ///
    /// Refused when any file is there: devfence never makes a new ledger over an
    /// existing one, damaged or not (restore a damaged ledger from a backup). The
    /// first `tenant add`, `guid-pool --set` or `keys` command creates it too when
    /// no file exists; every other command needs it to exist.
    Init,
    /// Tenants in the ledger: add, list, remove.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Assign a free device to a tenant: scrub it, prepare it, verify every gate.
    ///
    /// The device ends `Ready` for the tenant (and VM, with `--vm`) only after every
    /// gate read back what it needs: driver vfio-pci, group rules, /dev/vfio node
    /// owned by the tenant's launcher, and for an IB VF a fresh GUID in exactly the
    /// tenant's partitions at the SM and at the port. A gate that does not verify
    /// before `--gate-timeout` leaves the device `Quarantined`. Exit 2 on refusal
    /// or failure.
    Assign(AssignArgs),
    /// Hand a device from its tenant to another: revoke and verify, then prepare
    /// and verify (see `assign`). Refused while a VM uses the device.
    Handover(HandoverArgs),
    /// Release a device (or re-scrub a quarantined one): revoke everything of its
    /// tenant, verify, and leave it `Free`.
    Release(ReleaseArgs),
    /// Show the ledger: devices and their lifecycle state, open operations, the
    /// GUID pool and the subnet manager's health.
    Status(StatusArgs),
    /// Re-verify every Ready and Active device (or one) against what its gates
    /// established: driver, IOMMU group, /dev/vfio node owner and mode, an IB
    /// VF's GUID and its port's P_Keys at the SM, an mdev's presence.
    ///
    /// A drifted Ready device is quarantined; a drifted Active device is
    /// reported and left to its VM; state that cannot be read (the SM does not
    /// answer) is reported, nothing quarantined. Each is audited. Exit 0 when
    /// every device verified, 1 when one drifted or could not be verified, 2 on
    /// usage or I/O errors.
    Verify(VerifyArgs),
    /// Print the steps and gates an assignment, handover or release would run,
    /// without acting.
    Plan(PlanArgs),
    /// Finish what a crash interrupted: every unfinished operation's device is
    /// quarantined, scrubbed and verified, and left `Free` (or `Quarantined`,
    /// saying why).
    Recover(RecoverArgs),
    /// The hash-chained audit log: verify it, show it.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Show or set the range fresh IB GUIDs come from (never reissued).
    GuidPool(GuidPoolArgs),
    /// The fleet on one fabric (`[fleet]`, etcd): status, the shared GUID
    /// pool, revoking a lost host's orphaned memberships (docs/fleet.md).
    #[command(subcommand)]
    Fleet(crate::fleet::FleetCommand),
    /// Keys for device-state envelopes: this host's signing key and the keyring
    /// of source hosts whose envelopes it admits (docs/state-envelopes.md).
    #[command(subcommand)]
    Keys(crate::keys::KeysCommand),
    /// Device-state envelopes for migration: seal on the source host, admit on
    /// the destination host, inspect (docs/state-envelopes.md).
    ///
    /// Migration state is never taken from the tenant: it enters a device only as
    /// an envelope devfence sealed on a trusted host, for the same kind of
    /// device, the same tenant and VM, once.
    #[command(subcommand)]
    State(crate::state::StateCommand),
    /// Hooks called by other programs (libvirt).
    #[command(subcommand)]
    Hook(HookCommand),
    /// Run the host agent: the API (HTTP/1.1 + JSON) on a Unix socket, one per host.
    ///
    /// Serves until SIGTERM or SIGINT on `/run/devfence/devfence.sock` under the
    /// root (or `[agent] socket` in devfence.toml, or --socket), mode 0660, group
    /// `[agent] reader_group`. Root and members of `[agent] admin_group` may act,
    /// members of the reader group may read. Routes, errors and metrics:
    /// docs/agent.md. With `--role fabric-controller --fabric NAME` it runs the
    /// fleet's fabric controller of that fabric instead (docs/fleet.md).
    Serve(ServeArgs),
    /// Print the man page devfence(1) (roff), or write every page to a directory.
    ///
    /// With --out DIR: devfence.1, one page per subcommand (devfence-check.1,
    /// devfence-tenant-add.1, …) and devfence.toml.5, the configuration file's
    /// keys. Install with `devfence man --out /usr/local/share/man/man1` (and
    /// move devfence.toml.5 to man5), or read one with `man -l FILE`.
    Man {
        /// Write every page into DIR instead of printing devfence(1).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
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
    /// Also ask the kernel which VFIO devices support migration, and with which
    /// flags (opens each through its group: a vfio-pci function is reset at
    /// its first open; a device of a running VM answers EBUSY).
    #[arg(long)]
    pub probe_migration: bool,
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
    /// Also check the fabric against the ledger at the configured subnet manager
    /// (`[fabric] backend` in the configuration): ports with full membership of the
    /// default partition (FAB-DEFAULT-FULL), tenant P_Keys with members the ledger
    /// does not give that tenant (FAB-UNKNOWN-MEMBER), tenant ports in a partition
    /// no tenant owns (FAB-FOREIGN-PARTITION), partitions with ports of two tenants
    /// (FAB-SHARED-PARTITION), a failed SM sweep (FAB-SWEEP-FAILED), GUIDs issued to
    /// held devices that the fabric does not know (FAB-GUID-MISSING), an SM that
    /// cannot be read or is not master (FAB-UNVERIFIED). `devfence rules` lists them.
    #[arg(long)]
    pub fabric: bool,
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
    Profiles {
        /// Print JSON: `{schema, profiles: [{name, description}]}`.
        #[arg(long)]
        json: bool,
    },
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
    /// Vary the InfiniBand GUIDs (0–255) so that several simulated hosts can be
    /// nodes of one fabric: byte 4 of every GUID becomes 0x03 XOR N. 0, the
    /// default, keeps the GUIDs the profiles document.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub host_id: u8,
}

/// `devfence demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the generated hosts in DIR (one subdirectory per profile) instead of a
    /// temporary directory that is removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
}

/// Flags every acting command takes.
#[derive(Debug, Args)]
pub struct ActFlags {
    /// Print the kernel writes that would be made, and make none.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Act even on a device the ledger holds (or a PF whose VFs, a parent whose
    /// mdevs, an IOMMU group whose member, an AP mask whose queues it holds).
    /// Recorded in the audit chain; the libvirt hook re-verifies the device
    /// before its VM starts.
    #[arg(long)]
    pub force: bool,
}

/// `devfence bind`.
#[derive(Debug, Args)]
pub struct BindArgs {
    /// The PCI function (BDF, e.g. 0000:3b:00.2).
    pub device: String,
    /// The driver to bind to, e.g. vfio-pci.
    #[arg(long)]
    pub driver: String,
    /// Also bind the other endpoints of the device's IOMMU group to the same driver.
    #[arg(long)]
    pub with_group: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub act: ActFlags,
}

/// `devfence unbind`.
#[derive(Debug, Args)]
pub struct UnbindArgs {
    /// The PCI function (BDF).
    pub device: String,
    /// Also unbind the other endpoints of the device's IOMMU group.
    #[arg(long)]
    pub with_group: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub act: ActFlags,
}

/// `devfence vfs`.
#[derive(Debug, Args)]
pub struct VfsArgs {
    /// The PF (BDF).
    pub pf: String,
    /// The number of VFs wanted (0 removes them).
    #[arg(long)]
    pub count: u16,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub act: ActFlags,
}

/// `devfence reset`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// The PCI function (BDF).
    pub device: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub act: ActFlags,
}

/// `devfence mdev …`.
#[derive(Debug, Subcommand)]
pub enum MdevCommand {
    /// Create an mdev of TYPE under PARENT (a fresh UUID unless --uuid is given).
    Create {
        /// The parent device (a BDF, or `matrix` for vfio_ap).
        parent: String,
        /// The type id, e.g. nvidia-63 or vfio_ap-passthrough.
        type_id: String,
        /// Use this UUID instead of a fresh one.
        #[arg(long)]
        uuid: Option<String>,
        #[command(flatten)]
        #[allow(missing_docs)]
        act: ActFlags,
    },
    /// Remove an mdev.
    Remove {
        /// The mdev UUID.
        uuid: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        act: ActFlags,
    },
}

/// `devfence ap …`.
#[derive(Debug, Subcommand)]
pub enum ApCommand {
    /// Assign adapters, domains or control domains to a vfio_ap matrix mdev.
    ///
    /// Refused before writing when a resulting APQN is reserved for the host
    /// (apmask/aqmask) or held by another matrix mdev. APQNs that do not exist yet
    /// may be assigned (over-provisioning); they stay out of guest_matrix.
    Assign(ApAssignArgs),
    /// Unassign adapters, domains or control domains from a vfio_ap matrix mdev.
    Unassign(ApAssignArgs),
    /// Edit the AP bus masks (apmask, aqmask).
    ///
    /// EXPR is the kernel's syntax: absolute (`0x41` fills from the left) or
    /// relative terms applied in order (`+1,-6,+0x47`, `-0-255,+1-16`). An edit that
    /// would hand the host an APQN held by a matrix mdev is refused before anything is
    /// written, naming the mdev.
    Mask(ApMaskArgs),
}

/// `devfence ap assign|unassign`.
#[derive(Debug, Args)]
pub struct ApAssignArgs {
    /// The matrix mdev UUID.
    pub mdev: String,
    /// Adapter ids (decimal or 0x hex), repeatable.
    #[arg(long, value_parser = parse_ap_id)]
    pub adapter: Vec<u8>,
    /// Usage domain ids, repeatable.
    #[arg(long, value_parser = parse_ap_id)]
    pub domain: Vec<u8>,
    /// Control domain ids, repeatable.
    #[arg(long = "control-domain", value_parser = parse_ap_id)]
    pub control_domain: Vec<u8>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub act: ActFlags,
}

/// `devfence ap mask`.
#[derive(Debug, Args)]
pub struct ApMaskArgs {
    /// The new apmask (adapters reserved for the host), absolute or relative.
    #[arg(long, value_name = "EXPR", allow_hyphen_values = true)]
    pub apmask: Option<String>,
    /// The new aqmask (usage domains reserved for the host), absolute or relative.
    #[arg(long, value_name = "EXPR", allow_hyphen_values = true)]
    pub aqmask: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub act: ActFlags,
}

/// An AP id: decimal or 0x hex, 0..=255.
fn parse_ap_id(s: &str) -> Result<u8, String> {
    let v = if let Some(h) = s.strip_prefix("0x") {
        u16::from_str_radix(h, 16)
    } else {
        s.parse::<u16>()
    };
    match v {
        Ok(n) if n <= 255 => Ok(n as u8),
        _ => Err(format!(
            "{s:?} is not an AP id: expected 0..255, decimal or 0x hex"
        )),
    }
}

/// Flags of the lifecycle operations.
#[derive(Debug, Args)]
pub struct OpFlags {
    /// Print the result as JSON (no progress lines).
    #[arg(long)]
    pub json: bool,
    /// Print the steps and gates the operation would run (as `devfence plan`
    /// does), and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long a gate may wait for the SM or the host to verify, in seconds,
    /// before the operation fails closed.
    /// Through the agent (docs/agent.md) only the default is served; another
    /// value needs `--direct`.
    #[arg(long, value_name = "SECS", default_value_t = OpFlags::DEFAULT_GATE_TIMEOUT)]
    pub gate_timeout: f64,
}

impl OpFlags {
    /// The default `--gate-timeout`, the engine's (and the agent's).
    pub const DEFAULT_GATE_TIMEOUT: f64 = 10.0;
}

/// `devfence tenant`.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Add a tenant.
    Add(TenantAddArgs),
    /// List the tenants.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a tenant that holds no device.
    Remove {
        /// The tenant id.
        id: String,
    },
    /// Seed the ledger with the tenants of a tenancy file (all or none).
    ///
    /// Once a ledger exists, `check` reads the tenants from it, not from
    /// `<root>/etc/devfence/tenancy.toml`: import the file once to carry its
    /// tenants over. A tenant the ledger has already with the same values is
    /// left as it is; one with other values refuses the whole import. The
    /// file's device assignments are not imported: a device enters the ledger
    /// only through `devfence assign`, which verifies it.
    Import {
        /// The tenancy file (default: `<root>/etc/devfence/tenancy.toml`).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `devfence tenant add`.
#[derive(Debug, Args)]
pub struct TenantAddArgs {
    /// The tenant id (letters, digits, `-`, `_`, `.`).
    pub id: String,
    /// The uid:gid its VM launcher runs as (owner of its /dev/vfio nodes).
    #[arg(long, value_name = "UID:GID")]
    pub launcher: String,
    /// An IB partition: P_Key with membership, e.g. `0x8001` (full) or
    /// `0x0001:limited`. Repeat for more.
    #[arg(long = "partition", value_name = "PKEY[:full|limited]")]
    pub partitions: Vec<String>,
    /// The SELinux label expected on its nodes.
    #[arg(long)]
    pub label: Option<String>,
}

/// `devfence assign`.
#[derive(Debug, Args)]
pub struct AssignArgs {
    /// The device: a PCI address or an mdev UUID.
    pub device: String,
    /// The tenant (also `--to`, as in handover and plan).
    #[arg(long, visible_alias = "to", value_name = "TENANT")]
    pub tenant: String,
    /// The one VM (libvirt domain) that may use it.
    #[arg(long)]
    pub vm: Option<String>,
    #[command(flatten)]
    pub op: OpFlags,
}

/// `devfence handover`.
#[derive(Debug, Args)]
pub struct HandoverArgs {
    /// The device: a PCI address or an mdev UUID.
    pub device: String,
    /// The new tenant (also `--tenant`, as in assign).
    #[arg(long, visible_alias = "tenant", value_name = "TENANT")]
    pub to: String,
    /// The one VM (libvirt domain) of the new tenant that may use it.
    #[arg(long)]
    pub vm: Option<String>,
    #[command(flatten)]
    pub op: OpFlags,
}

/// `devfence release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The device.
    pub device: String,
    #[command(flatten)]
    pub op: OpFlags,
}

/// `devfence status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `devfence verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this device (it must be Ready or Active).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `devfence plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The device.
    pub device: String,
    /// The tenant it would go to (omit for a release; also `--tenant`).
    #[arg(long, visible_alias = "tenant", value_name = "TENANT")]
    pub to: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `devfence recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `devfence audit`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every record's hash and link, and the chain against its head kept
    /// beside the ledger (`<ledger>.audit-head`, signed with the host key when
    /// there is one); name the first problem. A broken, cut or rewritten chain
    /// exits 1.
    Verify {
        /// Also verify against a head kept elsewhere (what `audit head` printed
        /// earlier): `SEQ:HASH`.
        #[arg(long, value_name = "SEQ:HASH")]
        head: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the chain head (`SEQ:HASH` of the newest record), to keep elsewhere
    /// and give to `audit verify --head` later.
    Head {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Retention: remove the oldest records, keeping the chain verifiable, and
    /// what went with them. The whole chain is verified first; the last removed
    /// record becomes the pruning anchor (kept in the ledger and in the signed
    /// head), where `audit verify` starts. The newest record is never removed.
    ///
    /// In the same transaction, the operations that finished by the anchor
    /// record's time go with their journals (unfinished ones, which `recover`
    /// needs, stay), and so do the nonces of device-state envelopes that have
    /// expired: the nonce horizon moves forward to now, and no envelope that
    /// expired by the horizon is admitted again, whatever the clock says later.
    /// Each removal is an audit record.
    Prune {
        /// Remove every record before this seq.
        #[arg(
            long,
            value_name = "SEQ",
            conflicts_with = "keep",
            required_unless_present = "keep"
        )]
        before: Option<u64>,
        /// Keep the newest N records (N >= 1).
        #[arg(long, value_name = "N")]
        keep: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export the records as JSON lines: one line per record with its time
    /// (RFC 3339 UTC), actor, action, target, outcome, seq and hash (format:
    /// docs/json.md, "Audit export"), to standard output or appended to a file.
    ///
    /// Resumable by seq: --since SEQ exports the records after SEQ; with
    /// --output FILE and no --since, it goes on after the last complete line
    /// already in FILE (nothing lost, nothing repeated). --follow keeps
    /// reading the ledger for new records until interrupted.
    Export {
        /// Export the records after this seq (default: from the first, or
        /// after the last line already in --output).
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
        /// Keep going: poll the ledger for new records (every 0.5 s) until
        /// SIGTERM or SIGINT.
        #[arg(long)]
        follow: bool,
        /// Append to FILE (created 0640) instead of standard output.
        #[arg(long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
    },
    /// Print audit records.
    Show {
        /// Only records about this device.
        #[arg(long)]
        device: Option<String>,
        /// Only records about this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `devfence guid-pool`.
#[derive(Debug, Args)]
pub struct GuidPoolArgs {
    /// Set the range: `FIRST..LAST` (inclusive, hex GUIDs).
    #[arg(long, value_name = "FIRST..LAST")]
    pub set: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `devfence hook`.
#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// The libvirt qemu hook: install as /etc/libvirt/hooks/qemu (see docs/libvirt-hook.md).
    ///
    /// Reads the domain XML on standard input. `prepare begin`: refuses (exit 1,
    /// one line on stderr) unless every <hostdev> (PCI address or mdev UUID) is
    /// Ready for the domain's tenant, then marks them Active. `started begin`:
    /// removes delivered VF token files. `release end`: drains, scrubs and
    /// verifies the domain's devices. Other operations: nothing.
    Qemu {
        /// The domain name.
        domain: String,
        /// The operation (prepare, start, started, stopped, release, …).
        operation: String,
        /// The sub-operation (begin, end, -).
        subop: String,
        /// Extra argument libvirt passes (ignored).
        extra: Option<String>,
    },
}

/// `devfence serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The socket to serve (overrides `[agent] socket` and the default).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Connections served at once; more are closed as they arrive.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a client may take to send a request's headers.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub header_timeout: f64,
    /// The log's level: error, warn, info, debug or trace (default: the
    /// DEVFENCE_LOG environment variable, else info). The log goes to
    /// standard error, one line per event, for journald under systemd.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// What to serve: `host`, the host agent (the default), or
    /// `fabric-controller`, the fabric controller of --fabric: elected through
    /// an etcd lease ([fleet] in devfence.toml), one active per fabric and
    /// standbys ready; it folds every host's desired memberships into one
    /// apply and one sweep at the SM ([fabric] backend opensm on the SM host,
    /// or ufm), reads them back and publishes them (docs/fleet.md). It serves
    /// no socket; SIGTERM resigns its leadership at once.
    #[arg(long, value_enum, default_value_t = ServeRole::Host)]
    pub role: ServeRole,
    /// The fabric the controller leads (required with --role
    /// fabric-controller; its keys are /PREFIX/NAME/… in etcd).
    #[arg(long, value_name = "NAME")]
    pub fabric: Option<String>,
}

/// What `devfence serve` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeRole {
    /// The host agent (docs/agent.md).
    Host,
    /// The fabric controller of one fabric (docs/fleet.md).
    FabricController,
}
