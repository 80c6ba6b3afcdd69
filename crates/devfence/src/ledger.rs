//! The lifecycle commands: tenants, assign, handover, release, status, plan,
//! recover, audit, the GUID pool and the libvirt hook. Each parses its
//! arguments, calls its use case in `devfence-app` (or, for audit, the store)
//! and renders the result; opening the environment (`Env`: root, ledger,
//! kernel, SM) is still here (issue 11: it moves to `devfence-app` next).
//!
//! Which subnet manager: the one `[fabric] backend` in the configuration
//! selects (`opensm`, `ufm`); with `auto`, on a simulated host the simulated SM
//! whose state lives under the host root (`/var/lib/devfence/sim-sm.json`), so
//! that it outlives each command as a real SM would, and on the real host none
//! (`NoSm`: IB VF handovers are refused with a clear error, every other kind
//! works).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use devfence_app::fabric::NoSm;
use devfence_app::hook::{Decision, Phase};
use devfence_engine::domain::{Unidentified, parse_domain};
use devfence_engine::engine::{Engine, EngineConfig, EngineError, Failpoints, Progress};
use devfence_engine::store::{Partition, Tenant};
use devfence_engine::{
    AuditFilter, DeviceState, GuidRange, SqliteStore, StepState, Store, StoreExt, engine,
};
use devfence_fabric::opensm::{SaClient, port_tables};
use devfence_fabric::{OpenSmSm, PersistentSimSm, PortReader, SimConfig, SubnetManager, UfmSm};
use devfence_host::HostRoot;
use devfence_model::{DeviceId, Guid, Membership, PKey, TenantId};

use crate::Outcome;
use crate::act::Kernel;
use crate::cli::{
    AssignArgs, AuditCommand, GuidPoolArgs, HandoverArgs, HookCommand, OpFlags, PlanArgs,
    RecoverArgs, ReleaseArgs, StatusArgs, TenantAddArgs, TenantCommand,
};
use crate::config::{self, Backend, CONFIG_PATH, Config};
use crate::table::Table;

/// Where the ledger lives under a host root.
pub const LEDGER_PATH: &str = "/var/lib/devfence/ledger.db";
/// Where the simulated SM keeps its state under a simulated host's root.
pub const SIM_SM_PATH: &str = "/var/lib/devfence/sim-sm.json";
/// The GUID range a simulated host's ledger starts with.
pub const SIM_POOL: (Guid, Guid) = (Guid(0x0002_c903_00f0_0000), Guid(0x0002_c903_00f0_ffff));

/// The host, kernel, SM and ledger one command works with.
pub struct Env {
    /// The host root.
    pub root: HostRoot,
    kernel: Kernel,
    sm: Arc<dyn SubnetManager>,
    /// The ledger.
    pub store: SqliteStore,
    /// The ledger's file.
    pub ledger_path: PathBuf,
}

/// The ledger path for `root` (or the one given).
///
/// The default is resolved inside the root: a link on the way in a fixture tree is
/// re-rooted, never followed out of it.
pub fn ledger_path(root: &HostRoot, given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => root.path_in_root(LEDGER_PATH).with_context(|| {
            format!(
                "Cannot resolve the ledger's path {LEDGER_PATH} under {}. Hint: a link on the way cannot be read or loops; give --ledger FILE",
                root.root().display()
            )
        }),
    }
}

/// Opens the ledger of `root` (or the one given), the one way every command does.
///
/// With `create`, a ledger is made when no file is there (first use: `tenant add`,
/// `guid-pool --set`, `keys`, `init`); otherwise a missing ledger is an error.
/// An existing file is used only if it is a private devfence ledger (see
/// [`SqliteStore::open`]). The chain heads it writes are signed with the host key
/// when this host has one.
pub fn open_store(root: &HostRoot, ledger: Option<&Path>, create: bool) -> Result<SqliteStore> {
    let path = ledger_path(root, ledger)?;
    let store = if create {
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| {
                    format!(
                        "Cannot create the ledger's directory {}. Hint: run devfence as root, or give --ledger FILE",
                        dir.display()
                    )
                })?;
        }
        SqliteStore::open(&path)?
    } else {
        SqliteStore::open_existing(&path)?
    };
    Ok(match head_signer(root)? {
        Some(s) => store.with_head_signer(s),
        None => store,
    })
}

/// Signs chain heads with this host's key, if it has one.
fn head_signer(root: &HostRoot) -> Result<Option<devfence_engine::audit::HeadSigner>> {
    if std::fs::symlink_metadata(root.path(crate::keys::HOST_KEY)).is_err() {
        return Ok(None);
    }
    let key = crate::keys::load_host_key(root)?;
    let fp = key.public().fingerprint().to_string();
    Ok(Some(Box::new(move |msg: &[u8]| {
        (fp.clone(), devfence_seal::format::hex(&key.sign(msg)))
    })))
}

/// Judges the signature of the chain head kept beside the ledger: by this
/// host's own key, current or retired (in its keyring under its own host id;
/// never another host's trusted key), required once the host has a key.
fn check_head_signature(
    root: &HostRoot,
) -> Result<impl Fn(&devfence_engine::audit::StoredHead) -> Result<(), String>> {
    let has_key = std::fs::symlink_metadata(root.path(crate::keys::HOST_KEY)).is_ok();
    let (own, own_id) = if has_key {
        let k = crate::keys::load_host_key(root)?;
        (Some(k.public()), Some(k.host_id().to_owned()))
    } else {
        (None, None)
    };
    let ring = crate::keys::load_keyring(root)?;
    Ok(move |h: &devfence_engine::audit::StoredHead| {
        let (Some(signer), Some(sig)) = (&h.signer, &h.signature) else {
            return if has_key {
                Err(
                    "it is not signed, though this host has a signing key (forged or \
                     replaced?)"
                        .into(),
                )
            } else {
                Ok(())
            };
        };
        let key = own
            .filter(|k| k.fingerprint().to_string() == *signer)
            .or_else(|| {
                ring.keys
                    .iter()
                    .find(|k| {
                        Some(&k.host) == own_id.as_ref() && k.fingerprint.to_string() == *signer
                    })
                    .map(|k| k.key)
            })
            .ok_or_else(|| {
                format!("it is signed by key {signer}, which is not one of this host's own keys")
            })?;
        let sig_bytes: [u8; 64] = devfence_seal::format::unhex(sig)
            .ok_or_else(|| "its signature is not 128 hex digits".to_string())?;
        key.verify(&h.message(), &sig_bytes)
            .map_err(|_| format!("its signature by key {signer} does not verify (forged)"))
    })
}

/// `devfence init`.
pub fn init(root: &HostRoot, ledger: Option<&Path>, out: &mut dyn Write) -> Result<Outcome> {
    let path = ledger_path(root, ledger)?;
    if std::fs::symlink_metadata(&path).is_ok() {
        // Opening says what is wrong with a damaged file; an intact one exists.
        SqliteStore::open_existing(&path)?;
        return Err(devfence_engine::StoreError::Exists { path }.into());
    }
    drop(open_store(root, ledger, true)?);
    writeln!(
        out,
        "ledger created: {} (0600; chain head {})",
        path.display(),
        devfence_engine::audit::head_path(&path).display()
    )?;
    Ok(Outcome::Ok)
}

/// The subnet manager `cfg` selects for this host, wired to the simulated kernel's
/// port tables where the host is simulated. `tenants` is asked only by a UFM backend
/// with no explicit `managed_pkeys` (it manages the tenants' partitions).
fn open_sm(
    root: &HostRoot,
    kernel: &Kernel,
    cfg: &Config,
    tenants: impl FnOnce() -> Result<Vec<devfence_model::Tenant>>,
) -> Result<Arc<dyn SubnetManager>> {
    let backend = match (cfg.fabric.backend, kernel) {
        (Backend::Auto, Kernel::Sim(_)) => Backend::Sim,
        (Backend::Auto, Kernel::Real(_)) => Backend::None,
        (b, _) => b,
    };
    Ok(match (backend, kernel) {
        (Backend::Sim, Kernel::Sim(k)) => {
            let p = root.path_in_root(SIM_SM_PATH)?;
            // The simulated SM is part of the simulated world, there before any
            // ledger: its state directory is made on first use.
            if let Some(dir) = p.parent()
                && !dir.exists()
            {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("Cannot create {}. Hint: check that the simulated host's root is writable", dir.display()))?;
            }
            let sm = Arc::new(
                PersistentSimSm::open(&p, SimConfig::default()).map_err(|e| anyhow!("{e}"))?,
            );
            let s2 = Arc::clone(&sm);
            k.set_port_table_source(Arc::new(move |g: Guid| {
                s2.with(|s| {
                    s.programmed()
                        .get(&g)
                        .map(|k| k.iter().map(|p| p.0).collect())
                })
                .ok()
                .flatten()
            }));
            sm
        }
        (Backend::Sim, Kernel::Real(_)) => bail!(
            "{}: [fabric] backend = \"sim\" needs a simulated host (--sim or a root made by `devfence sim generate`). Hint: select \"opensm\" or \"ufm\" on a real host",
            cfg.source
                .as_deref()
                .map_or_else(|| CONFIG_PATH.into(), |p| p.display().to_string())
        ),
        (Backend::Opensm, _) => {
            let o = cfg.opensm();
            let sa = Arc::new(SaClient::new(cfg.sa()));
            if let Kernel::Sim(k) = kernel {
                k.set_port_table_source(Arc::new(port_tables(
                    Arc::clone(&sa) as Arc<dyn PortReader>,
                    Some(o.log_file.clone()),
                )));
            }
            Arc::new(OpenSmSm::with_port_reader(o, Box::new(sa)))
        }
        (Backend::Ufm, _) => {
            let Some(mut u) = cfg.fabric.ufm.clone() else {
                bail!(
                    "[fabric] backend = \"ufm\" needs a [fabric.ufm] section. Hint: give at least its url"
                );
            };
            let sa = Arc::new(SaClient::new(cfg.sa()));
            if let Kernel::Sim(k) = kernel {
                k.set_port_table_source(Arc::new(port_tables(
                    Arc::clone(&sa) as Arc<dyn PortReader>,
                    None,
                )));
            }
            // Without an explicit list, devfence manages its tenants' partitions.
            if u.managed_pkeys.is_empty() {
                for t in tenants()? {
                    for p in &t.partitions {
                        if let Ok(k) = devfence_fabric::PartitionKey::new(p.pkey.0) {
                            u.managed_pkeys.push(k);
                        }
                    }
                }
            }
            let sm = UfmSm::new(u).map_err(|e| anyhow!("{e}"))?;
            Arc::new(sm.with_port_reader(sa))
        }
        (Backend::None | Backend::Auto, _) => Arc::new(NoSm),
    })
}

impl Env {
    /// Opens the existing ledger, the kernel and the SM.
    pub fn open(root: &HostRoot, ledger: Option<&Path>) -> Result<Env> {
        Self::open_mode(root, ledger, false)
    }

    /// Opens the ledger, creating it when no file is there (first use), the
    /// kernel and the SM.
    pub fn open_or_create(root: &HostRoot, ledger: Option<&Path>) -> Result<Env> {
        Self::open_mode(root, ledger, true)
    }

    fn open_mode(root: &HostRoot, ledger: Option<&Path>, create: bool) -> Result<Env> {
        let kernel = Kernel::for_root(root)?;
        let path = ledger_path(root, ledger)?;
        let mut store = open_store(root, ledger, create)?;
        let cfg = Config::load(root, config::explicit())?;
        let sm = open_sm(root, &kernel, &cfg, || {
            Ok(store.atomically(|tx| tx.tenants())?)
        })?;
        // A simulated host gets a GUID pool of its own on first use.
        if matches!(kernel, Kernel::Sim(_))
            && sm.backend() == "sim"
            && store.atomically(|tx| tx.guid_pool())?.is_none()
        {
            store.atomically(|tx| {
                tx.set_guid_pool(GuidRange {
                    first: SIM_POOL.0,
                    last: SIM_POOL.1,
                })
            })?;
        }
        let mut env = Env {
            root: root.clone(),
            kernel,
            sm,
            store,
            ledger_path: path,
        };
        // A restore of the SM's configuration that any process made enters the
        // audit chain once and re-verifies the devices (issue 17 item 2).
        crate::reverify::record_restores(&mut env);
        Ok(env)
    }

    /// An engine over this environment.
    pub fn engine<'a>(&'a mut self, cfg: EngineConfig) -> Engine<'a> {
        Engine::new(&mut self.store, self.kernel.io(), &*self.sm, cfg)
            .with_failpoints(Failpoints::from_env())
    }

    /// The SM.
    pub fn sm(&self) -> &dyn SubnetManager {
        &*self.sm
    }
}

fn config(op: &OpFlags) -> Result<EngineConfig> {
    if !(op.gate_timeout.is_finite() && op.gate_timeout > 0.0 && op.gate_timeout <= 3600.0) {
        bail!(
            "--gate-timeout {} is out of range. Hint: give seconds more than 0 and at most 3600 (e.g. 0.5 or 10)",
            op.gate_timeout
        );
    }
    Ok(EngineConfig {
        gate_deadline: Duration::from_secs_f64(op.gate_timeout),
        ..EngineConfig::default()
    })
}

fn parse_device(s: &str) -> Result<DeviceId> {
    s.parse::<DeviceId>().map_err(|e| anyhow!("{e}"))
}

fn parse_tenant(s: &str) -> Result<TenantId> {
    s.parse::<TenantId>().map_err(|e| anyhow!("{e}"))
}

/// Writes progress lines: one per step and gate; on a terminal the waiting line
/// updates in place.
pub struct Printer<'w> {
    out: &'w mut dyn Write,
    tty: bool,
    waiting: bool,
}

impl<'w> Printer<'w> {
    /// A printer to `out` (a terminal if `tty`).
    pub fn new(out: &'w mut dyn Write, tty: bool) -> Self {
        Self {
            out,
            tty,
            waiting: false,
        }
    }

    /// Prints one event.
    pub fn event(&mut self, p: &Progress) {
        let _ = self.print(p);
    }

    fn print(&mut self, p: &Progress) -> std::io::Result<()> {
        if self.waiting && !matches!(p, Progress::Waiting { .. }) && self.tty {
            writeln!(self.out)?;
        }
        self.waiting = false;
        match p {
            Progress::Began { op, kind, device } => {
                writeln!(self.out, "  {op}: {kind} {device}")?;
            }
            Progress::Step {
                name,
                state,
                elapsed_ms,
                detail,
            } => {
                if *state != StepState::Planned {
                    writeln!(
                        self.out,
                        "  [{elapsed_ms:>5} ms] step {name:<18} {}{}",
                        state.name(),
                        brief(detail)
                    )?;
                }
            }
            Progress::Waiting {
                gate,
                polls,
                elapsed_ms,
                last,
            } => {
                let line = format!(
                    "  [{elapsed_ms:>5} ms] gate {gate:<18} waiting (read {polls}): {}",
                    engine_truncate(last, 110)
                );
                if self.tty {
                    // devfence's own control sequence goes to the terminal as is
                    // (everything through `out` is escaped); the line is escaped.
                    self.out.flush()?;
                    let mut tty = std::io::stdout();
                    write!(tty, "\r{}\x1b[K", crate::safeout::escape_controls(&line))?;
                    tty.flush()?;
                    self.waiting = true;
                } else if *polls == 1 || polls.is_power_of_two() {
                    writeln!(self.out, "{line}")?;
                }
            }
            Progress::Gate {
                name,
                passed,
                elapsed_ms,
                evidence,
            } => {
                writeln!(
                    self.out,
                    "  [{elapsed_ms:>5} ms] gate {name:<18} {}{}",
                    if *passed { "PASSED" } else { "FAILED" },
                    brief(evidence)
                )?;
            }
            Progress::Finished {
                op,
                outcome,
                state,
                elapsed_ms,
            } => {
                writeln!(
                    self.out,
                    "  [{elapsed_ms:>5} ms] {op} {}: device is {state}",
                    outcome.name()
                )?;
            }
        }
        self.out.flush()
    }
}

fn engine_truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// A short rendering of a step's detail: the few fields an operator wants.
fn brief(v: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    for key in [
        "guid", "retired", "driver", "owner", "node", "uuid", "path", "table", "errors",
    ] {
        if let Some(x) = v.get(key) {
            let s = match x {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            parts.push(format!("{key}={s}"));
        }
    }
    if let Some(g) = v.get("proof").and_then(|p| p.get("seen")) {
        parts.push(format!("sm-generation={g}"));
    }
    if let Some(r) = v.get("reason").and_then(|r| r.as_str()) {
        parts.push(engine_truncate(r, 140));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("  ({})", parts.join(", "))
    }
}

fn report(
    res: Result<engine::Done, EngineError>,
    json: bool,
    what: &str,
    out: &mut dyn Write,
) -> Result<Outcome> {
    match res {
        Ok(done) => {
            if json {
                serde_json::to_writer_pretty(&mut *out, &done)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{what} done: {} is {} ({} ms)",
                    done.device, done.state, done.elapsed_ms
                )?;
                if let Some(t) = &done.token_file {
                    writeln!(
                        out,
                        "VF token for the launcher: {t} (0600, launcher-owned; pass it as vfio-pci,vf-token=… and remove it)"
                    )?;
                }
            }
            Ok(Outcome::Ok)
        }
        Err(e) => {
            if json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({ "error": e.to_string() }),
                )?;
                writeln!(out)?;
            }
            Err(anyhow!(e))
        }
    }
}

fn run_op(
    root: &HostRoot,
    ledger: Option<&Path>,
    op: &OpFlags,
    what: &str,
    out: &mut dyn Write,
    req: &devfence_app::lifecycle::Request,
) -> Result<Outcome> {
    let f = |e: &mut Engine<'_>| devfence_app::lifecycle::run(e, req);
    let cfg = config(op)?;
    let mut env = Env::open(root, ledger)?;
    let tty = std::io::stdout().is_terminal();
    let res = if op.json {
        let mut e = env.engine(cfg);
        f(&mut e)
    } else {
        let mut sink = Vec::new();
        let res = {
            let mut printer = Printer::new(&mut sink, tty);
            let mut e = env.engine(cfg).with_progress(|p| printer.event(p));
            f(&mut e)
        };
        out.write_all(&sink)?;
        res
    };
    report(res, op.json, what, out)
}

/// `devfence assign`.
pub fn assign(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &AssignArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let dev = parse_device(&a.device)?;
    let t = parse_tenant(&a.tenant)?;
    let req = devfence_app::lifecycle::Request::Assign {
        device: dev,
        tenant: t,
        vm: a.vm.clone(),
    };
    run_op(root, ledger, &a.op, "assign", out, &req)
}

/// `devfence handover`.
pub fn handover(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &HandoverArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let dev = parse_device(&a.device)?;
    let t = parse_tenant(&a.to)?;
    let req = devfence_app::lifecycle::Request::Handover {
        device: dev,
        to: t,
        vm: a.vm.clone(),
    };
    run_op(root, ledger, &a.op, "handover", out, &req)
}

/// `devfence release`.
pub fn release(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &ReleaseArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let dev = parse_device(&a.device)?;
    let req = devfence_app::lifecycle::Request::Release { device: dev };
    run_op(root, ledger, &a.op, "release", out, &req)
}

fn parse_partition(s: &str) -> Result<Partition> {
    let (k, m) = match s.split_once(':') {
        Some((k, m)) => (k, Some(m)),
        None => (s, None),
    };
    let pkey: PKey = k
        .trim()
        .parse()
        .map_err(|e| anyhow!("{e}. Hint: give a P_Key like 0x8001 (full) or 0x0001:limited"))?;
    let membership = match m.map(str::trim) {
        None => pkey.membership(),
        Some("full") => Membership::Full,
        Some("limited") => Membership::Limited,
        Some(x) => bail!("Invalid membership {x:?} in --partition {s}. Hint: use full or limited"),
    };
    if pkey.base() == PKey::DEFAULT_BASE {
        bail!(
            "--partition {s} is the default partition, which every port has. Hint: give the tenant its own P_Keys"
        );
    }
    Ok(Partition {
        pkey: pkey.with_membership(membership),
        membership,
    })
}

/// `devfence tenant …`.
pub fn tenant(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &TenantCommand,
    out: &mut dyn Write,
) -> Result<Outcome> {
    match c {
        TenantCommand::Add(a) => tenant_add(root, ledger, a, out),
        TenantCommand::List { json } => {
            let mut store = open_store(root, ledger, false)?;
            let tenants = devfence_app::tenant::list(&mut store)?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &tenants)?;
                writeln!(out)?;
            } else {
                let mut t = Table::new(&["TENANT", "LAUNCHER", "PARTITIONS"]);
                for x in &tenants {
                    t.row(vec![
                        x.id.to_string(),
                        format!(
                            "{}:{}",
                            x.launcher_uid.map_or("-".into(), |u| u.to_string()),
                            x.launcher_gid.map_or("-".into(), |g| g.to_string())
                        ),
                        x.partitions
                            .iter()
                            .map(|p| format!("{:#06x} {:?}", p.pkey.base(), p.membership))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]);
                }
                t.write(out)?;
            }
            Ok(Outcome::Ok)
        }
        TenantCommand::Remove { id } => {
            let id = parse_tenant(id)?;
            let mut store = open_store(root, ledger, false)?;
            devfence_app::tenant::remove(&mut store, &id)?;
            writeln!(out, "tenant {id} removed")?;
            Ok(Outcome::Ok)
        }
    }
}

fn tenant_add(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &TenantAddArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let id = parse_tenant(&a.id)?;
    let (u, g) = a.launcher.split_once(':').ok_or_else(|| {
        anyhow!(
            "--launcher {:?} is not UID:GID. Hint: e.g. --launcher 107:107",
            a.launcher
        )
    })?;
    let uid: u32 = u
        .trim()
        .parse()
        .map_err(|_| anyhow!("--launcher uid {u:?} is not a number. Hint: e.g. 107:107"))?;
    let gid: u32 = g
        .trim()
        .parse()
        .map_err(|_| anyhow!("--launcher gid {g:?} is not a number. Hint: e.g. 107:107"))?;
    if uid == 0 {
        bail!(
            "--launcher uid 0 gives the tenant's device nodes to root: no isolation. Hint: use the uid the tenant's QEMU runs as"
        );
    }
    let partitions = a
        .partitions
        .iter()
        .map(|p| parse_partition(p))
        .collect::<Result<Vec<_>>>()?;
    let t = Tenant {
        id: id.clone(),
        launcher_uid: Some(uid),
        launcher_gid: Some(gid),
        security_label: a.label.clone(),
        partitions,
    };
    let mut env = Env::open_or_create(root, ledger)?;
    devfence_app::tenant::add(&mut env.engine(EngineConfig::default()), &t)?;
    writeln!(out, "tenant {id} added (launcher {uid}:{gid})")?;
    Ok(Outcome::Ok)
}

/// `devfence status`.
pub fn status(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &StatusArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let mut env = Env::open(root, ledger)?;
    let devfence_app::lifecycle::Status {
        devices,
        open_operations: ops,
        guid_pool: pool,
        sm_backend,
        health,
    } = devfence_app::lifecycle::status(&mut env.store, &*env.sm)?;
    if a.json {
        serde_json::to_writer_pretty(
            &mut *out,
            &serde_json::json!({
                "ledger": env.ledger_path.display().to_string(),
                "devices": devices,
                "open_operations": ops,
                "guid_pool": pool,
                "sm": match &health {
                    Ok(h) => serde_json::json!({ "backend": sm_backend, "healthy": h.is_healthy(), "health": h }),
                    Err(e) => serde_json::json!({ "backend": sm_backend, "error": e.to_string() }),
                },
            }),
        )?;
        writeln!(out)?;
        return Ok(Outcome::Ok);
    }
    writeln!(out, "ledger: {}", env.ledger_path.display())?;
    let mut t = Table::new(&["DEVICE", "STATE", "TENANT", "VM"]);
    for d in &devices {
        t.row(vec![
            d.device.to_string(),
            d.state.name().to_string(),
            d.state.tenant().map_or("-".into(), ToString::to_string),
            d.state.vm().unwrap_or("-").to_string(),
        ]);
    }
    t.write(out)?;
    for d in &devices {
        if let DeviceState::Quarantined { reason } = &d.state {
            writeln!(out, "  {} quarantined: {reason}", d.device)?;
        }
    }
    if ops.is_empty() {
        writeln!(out, "open operations: none")?;
    } else {
        for o in &ops {
            writeln!(
                out,
                "open operation {} ({}) on {}: unfinished — run `devfence recover` if its process died",
                o.id, o.kind, o.device
            )?;
        }
    }
    match pool {
        Some(p) => writeln!(out, "GUID pool: {}..{}", p.first, p.last)?,
        None => writeln!(
            out,
            "GUID pool: not set (`devfence guid-pool --set FIRST..LAST`)"
        )?,
    }
    match health {
        Ok(h) => {
            writeln!(
                out,
                "SM: {} — {} ({}, {}, last sweep {}{})",
                sm_backend,
                if h.is_healthy() {
                    "healthy"
                } else {
                    "NOT healthy"
                },
                h.status.state,
                h.status.generation,
                h.status.sweep,
                h.version
                    .as_deref()
                    .map_or(String::new(), |v| format!(", {v}"))
            )?;
            for n in &h.notes {
                writeln!(out, "  note: {n}")?;
            }
        }
        Err(e) => writeln!(out, "SM: {sm_backend} — {e}")?,
    }
    Ok(Outcome::Ok)
}

/// `devfence plan`.
pub fn plan(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &PlanArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let dev = parse_device(&a.device)?;
    let to = a.to.as_deref().map(parse_tenant).transpose()?;
    let mut env = Env::open(root, ledger)?;
    let req = devfence_app::lifecycle::PlanRequest {
        device: dev,
        to: to.clone(),
    };
    let steps = devfence_app::lifecycle::plan(&mut env.engine(EngineConfig::default()), &req)?;
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &steps)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{} of {dev}{} (nothing is done):",
            if to.is_some() {
                "assign/handover"
            } else {
                "release"
            },
            to.as_ref().map_or(String::new(), |t| format!(" to {t}"))
        )?;
        for (i, s) in steps.iter().enumerate() {
            writeln!(out, "  {:>2}. {:<20} {}", i + 1, s.name, s.what)?;
        }
    }
    Ok(Outcome::Ok)
}

/// `devfence recover`.
pub fn recover(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &RecoverArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    // No ledger at all (nor a -wal of one): devfence never acted here.
    let path = ledger_path(root, ledger)?;
    if std::fs::symlink_metadata(&path).is_err()
        && std::fs::symlink_metadata(devfence_engine::sqlite::sidecar(&path, "-wal")).is_err()
    {
        if a.json {
            writeln!(out, "[]")?;
        } else {
            writeln!(
                out,
                "nothing to recover: there is no ledger at {}",
                path.display()
            )?;
        }
        return Ok(Outcome::Ok);
    }
    let mut env = Env::open(root, ledger)?;
    let mut sink = Vec::new();
    let res = {
        let tty = std::io::stdout().is_terminal();
        let mut printer = Printer::new(&mut sink, tty);
        let mut e = env.engine(EngineConfig::default());
        if !a.json {
            e = e.with_progress(|p| printer.event(p));
        }
        devfence_app::lifecycle::recover(&mut e)
    };
    out.write_all(&sink)?;
    let rec = res?;
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &rec)?;
        writeln!(out)?;
        return Ok(Outcome::Ok);
    }
    if rec.is_empty() {
        writeln!(out, "nothing to recover: no unfinished operation")?;
    }
    for r in &rec {
        writeln!(
            out,
            "recovered {} ({}) on {}: last step {}; device is now {}{}",
            r.op,
            r.kind,
            r.device,
            r.last_step.as_deref().unwrap_or("none"),
            r.state,
            r.problem
                .as_ref()
                .map_or(String::new(), |p| format!(" — {p}"))
        )?;
    }
    Ok(Outcome::Ok)
}

/// `devfence audit …`.
pub fn audit(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &AuditCommand,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let mut store = open_store(root, ledger, false)?;
    match c {
        AuditCommand::Head { json } => {
            let head = store.last_record()?;
            let stored = devfence_engine::audit::read_head(&store.head_path())
                .map_err(|e| anyhow!("{e}. Hint: `devfence audit verify` says what is wrong"))?;
            if *json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({ "head": head, "stored": stored }),
                )?;
                writeln!(out)?;
            } else {
                match head {
                    Some(h) => writeln!(out, "{}:{}", h.seq, h.hash)?,
                    None => writeln!(out, "0:{}", devfence_engine::Hash::GENESIS)?,
                }
                if let Some(s) = &stored {
                    writeln!(
                        out,
                        "# stored beside the ledger: {}:{}{}",
                        s.seq,
                        s.hash,
                        s.signer
                            .as_deref()
                            .map_or(" (unsigned)".into(), |f| format!(" (signed by {f})"))
                    )?;
                }
                writeln!(
                    out,
                    "# keep this line elsewhere; `devfence audit verify --head SEQ:HASH` checks the chain still reaches it"
                )?;
            }
            Ok(Outcome::Ok)
        }
        AuditCommand::Verify { json, head } => {
            let external = head.as_deref().map(parse_head).transpose()?;
            let check = check_head_signature(root)?;
            match store.verify_with_head(external.as_ref(), &check) {
                Ok((rep, stored)) => {
                    if *json {
                        serde_json::to_writer_pretty(
                            &mut *out,
                            &serde_json::json!({ "intact": true, "report": rep, "stored_head": stored }),
                        )?;
                        writeln!(out)?;
                    } else {
                        writeln!(
                            out,
                            "audit chain intact: {} records{}",
                            rep.records,
                            rep.head
                                .map_or(String::new(), |h| format!(", head #{} {}", h.seq, h.hash))
                        )?;
                        if let Some(s) = &stored {
                            writeln!(
                                out,
                                "reaches the head kept beside the ledger (#{}, {}){}",
                                s.seq,
                                s.signer
                                    .as_deref()
                                    .map_or("unsigned".into(), |f| format!("signed by {f}")),
                                if external.is_some() {
                                    " and the head given"
                                } else {
                                    ""
                                }
                            )?;
                        }
                    }
                    Ok(Outcome::Ok)
                }
                Err(devfence_engine::AuditError::ChainBroken(b)) => {
                    let e = devfence_engine::AuditError::ChainBroken(b);
                    if *json {
                        serde_json::to_writer_pretty(
                            &mut *out,
                            &serde_json::json!({ "intact": false, "error": e.to_string() }),
                        )?;
                        writeln!(out)?;
                    } else {
                        writeln!(out, "audit chain NOT intact: {e}")?;
                    }
                    eprintln!("{e}");
                    Ok(Outcome::Findings)
                }
                Err(e) => Err(anyhow!(e)),
            }
        }
        AuditCommand::Prune { before, keep, json } => {
            let cut = match (before, keep) {
                (Some(s), _) => devfence_engine::audit::PruneCut::Before(*s),
                (None, Some(n)) => devfence_engine::audit::PruneCut::Keep(*n),
                (None, None) => {
                    return Err(anyhow!(
                        "audit prune needs a cut. Hint: --before SEQ or --keep N"
                    ));
                }
            };
            let check = check_head_signature(root)?;
            let rep = store.audit_prune(cut, &check)?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &rep)?;
                writeln!(out)?;
            } else {
                match rep.anchor {
                    Some(a) if rep.pruned > 0 => writeln!(
                        out,
                        "pruned {} record(s) through seq {} ({}); {} kept; the chain now starts after it",
                        rep.pruned, a.seq, a.hash, rep.kept
                    )?,
                    _ => writeln!(out, "nothing to prune; {} record(s) kept", rep.kept)?,
                }
            }
            Ok(Outcome::Ok)
        }
        AuditCommand::Show {
            device,
            tenant,
            json,
        } => {
            let filter = AuditFilter {
                device: device.as_deref().map(parse_device).transpose()?,
                tenant: tenant.as_deref().map(parse_tenant).transpose()?,
            };
            let recs = store.audit_show(&filter)?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &recs)?;
                writeln!(out)?;
            } else {
                for r in &recs {
                    writeln!(
                        out,
                        "#{:<5} {:<8} {:<14} {:<8} {}",
                        r.seq,
                        r.kind.name(),
                        r.device.map_or("-".into(), |d| d.to_string()),
                        r.tenant.as_ref().map_or("-".into(), ToString::to_string),
                        engine_truncate(&r.detail.to_string(), 160)
                    )?;
                }
                writeln!(out, "{} record(s)", recs.len())?;
            }
            Ok(Outcome::Ok)
        }
    }
}

fn parse_head(s: &str) -> Result<devfence_engine::ChainHead> {
    let hint = "Hint: give what `devfence audit head` printed, SEQ:HASH";
    let (q, h) = s
        .trim()
        .split_once(':')
        .ok_or_else(|| anyhow!("--head {s:?} is not SEQ:HASH. {hint}"))?;
    let seq: u64 = q
        .parse()
        .map_err(|_| anyhow!("--head {s:?}: {q:?} is not a sequence number. {hint}"))?;
    let hash = devfence_engine::Hash::from_hex(h)
        .ok_or_else(|| anyhow!("--head {s:?}: the hash is not 64 hex digits. {hint}"))?;
    Ok(devfence_engine::ChainHead { seq, hash })
}

/// `devfence guid-pool`.
pub fn guid_pool(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &GuidPoolArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let mut env = if a.set.is_some() {
        Env::open_or_create(root, ledger)?
    } else {
        Env::open(root, ledger)?
    };
    let mut marked = Vec::new();
    if let Some(s) = &a.set {
        let (f, l) = s.split_once("..").ok_or_else(|| {
            anyhow!(
                "--set {s:?} is not FIRST..LAST. Hint: e.g. 0x0002c90300f00000..0x0002c90300f0ffff"
            )
        })?;
        let first: Guid = f.trim().parse().map_err(|e| anyhow!("{e}"))?;
        let last: Guid = l.trim().parse().map_err(|e| anyhow!("{e}"))?;
        // GUIDs of the range that are live (on this host, or named by the SM) are
        // marked used, never issued; allocation checks again, at the SM too.
        let inv = devfence_host::read_inventory(&env.root)
            .with_context(|| format!("Cannot read the host under {}", env.root.root().display()))?;
        let live = devfence_app::guid_pool::live_guids(&inv, env.sm());
        marked =
            devfence_app::guid_pool::set_pool(&mut env.store, GuidRange { first, last }, &live)?;
    }
    let pool = env.store.atomically(|tx| tx.guid_pool())?;
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &pool)?;
        writeln!(out)?;
    } else {
        if !marked.is_empty() {
            writeln!(
                out,
                "{} GUID(s) of the range are live and were marked used (never issued): {}",
                marked.len(),
                marked
                    .iter()
                    .take(8)
                    .map(|(g, w)| format!("{g} ({w})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
        match pool {
            Some(p) => writeln!(out, "GUID pool: {}..{}", p.first, p.last)?,
            None => writeln!(out, "GUID pool: not set")?,
        }
    }
    Ok(Outcome::Ok)
}

/// GUIDs live on the host (any port or VF) or named in the SM's configuration,
/// with where. An SM that cannot be read adds nothing here: allocation checks
/// every candidate at the SM again and fails closed.
/// `devfence hook qemu`.
pub fn hook(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &HookCommand,
    stdin: &mut dyn Read,
) -> Result<Outcome> {
    let HookCommand::Qemu {
        domain,
        operation,
        subop,
        ..
    } = c;
    let act = match (operation.as_str(), subop.as_str()) {
        ("prepare", "begin") => 0,
        ("started", "begin") => 1,
        ("release", "end") => 2,
        _ => return Ok(Outcome::Ok),
    };
    // At most 4 MiB: more is an error, never a silently cut document.
    let xml =
        devfence_model::bounded::read_stream(stdin, "the domain XML on standard input", 4 << 20)
            .context("Cannot read the domain XML on standard input")?;
    let xml = String::from_utf8(xml)
        .map_err(|_| anyhow!("the domain XML on standard input is not UTF-8 text"))?;
    let spec = parse_domain(&xml).map_err(|e| anyhow!("domain {domain}: {e}"))?;
    if spec.name != *domain {
        bail!(
            "the domain XML names {:?}, but libvirt called the hook for {domain:?}. Hint: libvirt passes the domain's own XML; check the hook's installation",
            spec.name
        );
    }
    if spec.hostdevs.is_empty() {
        return Ok(Outcome::Ok);
    }
    let mut env = Env::open(root, ledger)?;
    let phase = match act {
        0 => {
            let cfg = Config::load(root, config::explicit())?;
            Phase::Prepare(if cfg.hook.allow_unidentified_single_tenant {
                Unidentified::SingleTenant { tenants: 0 }
            } else {
                Unidentified::Refuse
            })
        }
        1 => Phase::Started,
        _ => Phase::Release,
    };
    let mut e = env.engine(EngineConfig::default());
    match devfence_app::hook::decide(&mut e, &spec, phase)? {
        Decision::Allowed => Ok(Outcome::Ok),
        Decision::Refused(r) => {
            eprintln!("{r}");
            Ok(Outcome::Refused)
        }
        Decision::TeardownFailed(failures) => {
            eprintln!("devfence: teardown of {domain}: {}", failures.join("; "));
            Ok(Outcome::Refused)
        }
    }
}

/// The tenancy for `check`, from the ledger at `path`.
pub fn ledger_tenancy(path: &Path) -> Result<devfence_model::Tenancy> {
    let mut store = SqliteStore::open_existing(path)?;
    Ok(store.atomically(|tx| engine::tenancy_from_ledger(tx))?)
}

/// `check --fabric`: the fabric posture at the configured SM against the ledger.
pub fn fabric_findings(
    root: &HostRoot,
    ledger: Option<&Path>,
) -> Result<Vec<devfence_model::Finding>> {
    // Read-only: without a ledger devfence holds nothing on the fabric, and the
    // posture is the SM's own (a failed sweep, the default partition); `check`
    // never creates a ledger.
    let (sm, view) = if ledger_path(root, ledger)?.symlink_metadata().is_ok() {
        let mut env = Env::open(root, ledger)?;
        let view = devfence_app::fabric::ledger_view(&mut env.store)?;
        (env.sm, view)
    } else {
        let kernel = Kernel::for_root(root)?;
        let cfg = Config::load(root, config::explicit())?;
        (
            open_sm(root, &kernel, &cfg, || Ok(Vec::new()))?,
            devfence_fabric::posture::LedgerView::default(),
        )
    };
    Ok(devfence_app::fabric::fabric_findings(&*sm, &view))
}
