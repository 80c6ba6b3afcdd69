//! `devfence inventory` and `devfence check`: what the host has, and the
//! findings of every rule against the tenancy (the ledger's, else the tenancy
//! file's) and, when asked, the fabric posture at the SM.

use std::path::{Path, PathBuf};

use devfence_engine::{SqliteStore, StoreExt, engine};
use devfence_host::{HostRoot, read_inventory};
use devfence_model::{Finding, Inventory, Severity, Tenancy};

use crate::error::{Result, StepContext};

/// Where the tenancy file lives under a host root.
pub const DEFAULT_TENANCY: &str = "/etc/devfence/tenancy.toml";

/// Reads the host's inventory; with `probe_migration`, asks each VFIO device
/// for its migration support.
///
/// # Errors
/// The root cannot be read (a root that is not a directory); with
/// `probe_migration`, a root with no kernel to ask.
pub fn inventory(root: &HostRoot, probe_migration: bool) -> Result<Inventory> {
    let mut inv = read(root)?;
    if probe_migration {
        let k = crate::Kernel::for_root(root)?;
        devfence_host::migration::probe_migration(k.io(), &mut inv);
    }
    Ok(inv)
}

fn read(root: &HostRoot) -> Result<Inventory> {
    read_inventory(root).step(|| format!("Cannot read the host under {}", root.root().display()))
}

/// What `devfence check` asks.
#[derive(Clone, Debug, Default)]
pub struct CheckRequest {
    /// A tenancy file to check against instead of the ledger's tenancy.
    pub tenancy: Option<PathBuf>,
    /// Also check the fabric posture at the SM (`--fabric`).
    pub fabric: bool,
}

/// Counts of findings by severity.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    schemars::JsonSchema,
    serde::Deserialize,
)]
pub struct Summary {
    /// Error-severity findings.
    pub errors: usize,
    /// Warnings.
    pub warnings: usize,
    /// Informational findings.
    pub infos: usize,
}

impl Summary {
    /// Counts `findings`.
    #[must_use]
    pub fn of(findings: &[Finding]) -> Summary {
        let mut s = Summary::default();
        for f in findings {
            match f.severity {
                Severity::Error => s.errors += 1,
                Severity::Warning => s.warnings += 1,
                Severity::Info => s.infos += 1,
            }
        }
        s
    }
}

/// What `devfence check` found.
#[derive(Debug)]
pub struct CheckReport {
    /// Every finding, host rules first, then the fabric's.
    pub findings: Vec<Finding>,
    /// Where the tenancy came from (`None`: nowhere; tenancy rules skipped).
    pub tenancy: Option<PathBuf>,
    /// Whether that is the ledger (else the tenancy file).
    pub tenancy_from_ledger: bool,
    /// The host's tenancy file, when it exists but the ledger was read instead
    /// (its tenants count only once imported: `devfence tenant import`).
    pub tenancy_file_unread: Option<PathBuf>,
    /// The findings by severity.
    pub summary: Summary,
    /// What opening the environment noticed (for the front end to show).
    pub notices: Vec<String>,
}

/// Reads the host and the tenancy and runs every rule (and, with
/// `req.fabric`, the fabric posture at the SM `config` selects).
///
/// # Errors
/// The host, the tenancy file or the ledger cannot be read; with
/// `req.fabric`, the SM cannot be opened.
pub fn check(
    root: &HostRoot,
    ledger: Option<&Path>,
    config: Option<&Path>,
    req: &CheckRequest,
) -> Result<CheckReport> {
    let inv = read(root)?;
    check_inventory(root, &inv, ledger, config, req)
}

/// [`check`] on an inventory already read (the host agent's live inventory,
/// kept current from kernel uevents, instead of a walk of sysfs per request).
///
/// # Errors
/// As [`check`], except that the host is not read.
pub fn check_inventory(
    root: &HostRoot,
    inv: &Inventory,
    ledger: Option<&Path>,
    config: Option<&Path>,
    req: &CheckRequest,
) -> Result<CheckReport> {
    let (t, tenancy) = tenancy_for(root, ledger, req.tenancy.as_deref())?;
    let ledger_file = crate::env::ledger_path(root, ledger)?;
    let tenancy_from_ledger = tenancy.as_deref() == Some(ledger_file.as_path());
    let default = root.path(&root.resolve_in_root(DEFAULT_TENANCY, true)?);
    let tenancy_file_unread = (tenancy_from_ledger && default.is_file()).then_some(default);
    let mut findings = devfence_policy::check(inv, &t);
    let mut notices = Vec::new();
    if req.fabric {
        let (f, n) = crate::fabric::check_fabric(root, ledger, config)?;
        findings.extend(f);
        notices = n;
    }
    Ok(CheckReport {
        summary: Summary::of(&findings),
        findings,
        tenancy,
        tenancy_from_ledger,
        tenancy_file_unread,
        notices,
    })
}

/// Where the tenancy comes from: the file given, else the ledger when devfence
/// manages devices here, else the host's tenancy file, else none.
fn tenancy_for(
    root: &HostRoot,
    ledger: Option<&Path>,
    given: Option<&Path>,
) -> Result<(Tenancy, Option<PathBuf>)> {
    if let Some(p) = given {
        let t = devfence_policy::load_tenancy_to_check(p)?;
        return Ok((t, Some(p.to_path_buf())));
    }
    let lp = crate::env::ledger_path(root, ledger)?;
    // A `-wal` without its ledger is a damaged ledger: opening it says so.
    if crate::env::ledger_present(&lp) {
        let t = ledger_tenancy(&lp)?;
        return Ok((t, Some(lp)));
    }
    // Found in the root: a link on the way is resolved under it, never out of it.
    let default = root.path(&root.resolve_in_root(DEFAULT_TENANCY, true)?);
    if default.exists() {
        let t = devfence_policy::load_tenancy_to_check(&default)?;
        return Ok((t, Some(default)));
    }
    Ok((Tenancy::default(), None))
}

/// The tenancy for `check`, from the ledger at `path`.
///
/// # Errors
/// The ledger cannot be opened or read.
pub fn ledger_tenancy(path: &Path) -> Result<Tenancy> {
    let mut store = SqliteStore::open_existing(path)?;
    Ok(store.atomically(|tx| engine::tenancy_from_ledger(tx))?)
}
