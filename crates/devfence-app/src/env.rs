//! Opening the environment one use case works in: the host root, its kernel
//! (running or simulated), the ledger and the subnet manager the configuration
//! selects.
//!
//! Which kernel acts: the running one when the root is `/`; the simulated kernel
//! when the root is a simulated host (written by `devfence sim generate`, marked
//! by [`sim::SIMULATED_MARKER`]). Any other root is refused: writing sysfs
//! attributes into a copy of a host would change nothing and prove nothing.
//!
//! Which subnet manager: the one `[fabric] backend` selects (`opensm`, `ufm`);
//! with `auto`, on a simulated host the simulated SM whose state lives under the
//! host root (`/var/lib/devfence/sim-sm.json`), so that it outlives each command
//! as a real SM would, and on the real host none ([`NoSm`]: IB VF handovers are
//! refused with a clear error, every other kind works).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use devfence_engine::engine::{Engine, EngineConfig, Failpoints, RecordedRestore, Reverification};
use devfence_engine::{GuidRange, SqliteStore, StoreExt};
use devfence_fabric::opensm::{SaClient, port_tables};
use devfence_fabric::{OpenSmSm, PersistentSimSm, PortReader, SimConfig, SubnetManager, UfmSm};
use devfence_host::actuator::KernelIo;
use devfence_host::actuator::real::RealKernel;
use devfence_host::simkernel::SimKernel;
use devfence_host::{HostRoot, sim};
use devfence_model::Guid;

use crate::config::{Backend, CONFIG_PATH, Config};
use crate::error::{AppError, Result, StepContext};
use crate::fabric::NoSm;
use crate::keystore;

macro_rules! bail {
    ($($t:tt)*) => { return Err(AppError::invalid(format!($($t)*))) };
}

/// The kernel behind the actuator.
pub enum Kernel {
    /// The running kernel.
    Real(RealKernel),
    /// The simulated kernel over a simulated host tree.
    Sim(SimKernel),
}

impl Kernel {
    /// Picks the kernel for `root` (see the module docs).
    ///
    /// # Errors
    /// A root that is neither `/` nor a simulated host; a simulated kernel
    /// that cannot start.
    pub fn for_root(root: &HostRoot) -> Result<Kernel> {
        if root.root() == std::path::Path::new("/") {
            return Ok(Kernel::Real(RealKernel::new(root.clone())));
        }
        if root.path(sim::SIMULATED_MARKER).exists() {
            let k = SimKernel::new(root.clone()).step(|| {
                format!(
                    "Cannot start the simulated kernel on {}",
                    root.root().display()
                )
            })?;
            return Ok(Kernel::Sim(k));
        }
        bail!(
            "{} is neither the running host (/) nor a simulated host, so there is no kernel to act on. \
             Hint: act on the real host with --root / (the default), or on a simulated host made by \
             `devfence sim generate` (or --sim PROFILE)",
            root.root().display()
        )
    }

    /// The kernel's I/O, for an actuator or a reader.
    #[must_use]
    pub fn io(&self) -> &dyn KernelIo {
        match self {
            Kernel::Real(k) => k,
            Kernel::Sim(k) => k,
        }
    }

    /// "running kernel" or "simulated kernel".
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Kernel::Real(_) => "running kernel",
            Kernel::Sim(_) => "simulated kernel",
        }
    }
}

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
    /// The kernel that acts on it.
    pub kernel: Kernel,
    /// The subnet manager the configuration selects.
    pub sm: Arc<dyn SubnetManager>,
    /// The ledger.
    pub store: SqliteStore,
    /// The ledger's file.
    pub ledger_path: PathBuf,
    /// What opening found that the operator should hear (a restore of the
    /// SM's configuration recorded, a record that could not be read); the
    /// front end shows each as one line.
    pub notices: Vec<String>,
    /// The fleet's GUID pool, when this process registered the host in a
    /// fleet (the host agent): the engine's source of fresh IB GUIDs.
    pub fleet_guids: Option<crate::fleet::FleetGuids<'static>>,
}

/// The ledger path for `root` (or the one given).
///
/// The default is resolved inside the root: a link on the way in a fixture tree is
/// re-rooted, never followed out of it.
pub fn ledger_path(root: &HostRoot, given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => root.path_in_root(LEDGER_PATH).step(|| {
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
                .step(|| {
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
    if std::fs::symlink_metadata(root.path(keystore::HOST_KEY)).is_err() {
        return Ok(None);
    }
    let key = keystore::load_host_key(root)?;
    let fp = key.public().fingerprint().to_string();
    Ok(Some(Box::new(move |msg: &[u8]| {
        (fp.clone(), devfence_seal::format::hex(&key.sign(msg)))
    })))
}

/// Judges the signature of the chain head kept beside the ledger: by this
/// host's own key, current or retired (in its keyring under its own host id;
/// never another host's trusted key), required once the host has a key.
pub fn check_head_signature(
    root: &HostRoot,
) -> Result<impl Fn(&devfence_engine::audit::StoredHead) -> Result<(), String>> {
    let has_key = std::fs::symlink_metadata(root.path(keystore::HOST_KEY)).is_ok();
    let (own, own_id) = if has_key {
        let k = keystore::load_host_key(root)?;
        (Some(k.public()), Some(k.host_id().to_owned()))
    } else {
        (None, None)
    };
    let ring = keystore::load_keyring(root)?;
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

/// `devfence init`: creates the ledger; returns its path.
///
/// # Errors
/// A ledger is there already (or a damaged file); it cannot be created.
pub fn init(root: &HostRoot, ledger: Option<&Path>) -> Result<PathBuf> {
    let path = ledger_path(root, ledger)?;
    if std::fs::symlink_metadata(&path).is_ok() {
        // Opening says what is wrong with a damaged file; an intact one exists.
        SqliteStore::open_existing(&path)?;
        return Err(devfence_engine::StoreError::Exists { path }.into());
    }
    drop(open_store(root, ledger, true)?);
    Ok(path)
}

/// The subnet manager `cfg` selects for this host, wired to the simulated kernel's
/// port tables where the host is simulated. `tenants` is asked only by a UFM backend
/// with no explicit `managed_pkeys` (it manages the tenants' partitions).
pub fn open_sm(
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
                    .step(|| format!("Cannot create {}. Hint: check that the simulated host's root is writable", dir.display()))?;
            }
            let sm = Arc::new(PersistentSimSm::open(&p, SimConfig::default())?);
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
            let sm = UfmSm::new(u)?;
            Arc::new(sm.with_port_reader(sa))
        }
        (Backend::Fleet, _) => {
            // The host agent registered the host at start and holds its
            // session; a one-shot command has none (a lease per command would
            // drop the host's desired memberships when it exits).
            let registered = crate::fleet::registered();
            let sa = match &registered {
                Some(h) => Arc::clone(&h.sa),
                None => Arc::new(SaClient::new(cfg.sa())),
            };
            if let Kernel::Sim(k) = kernel {
                k.set_port_table_source(Arc::new(port_tables(
                    Arc::clone(&sa) as Arc<dyn PortReader>,
                    None,
                )));
            }
            match registered {
                Some(h) => Arc::clone(&h.sm) as Arc<dyn SubnetManager>,
                // A one-shot command: it reads (verify) through a read-only
                // view and changes nothing; the agent holds the session.
                None => Arc::new(crate::fleet::Unregistered::for_config(cfg, sa)),
            }
        }
        (Backend::None | Backend::Auto, _) => Arc::new(NoSm),
    })
}

/// Who asks for a use case when it is not the operator's own command: the
/// host agent's peer, from its socket credentials (`SO_PEERCRED`). Every audit
/// record written on its behalf names it (issue 12 item 1).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Actor {
    /// The peer's user id.
    pub uid: u32,
    /// The peer's group id.
    pub gid: u32,
    /// The peer's process id, if the kernel gave one.
    pub pid: Option<i32>,
    /// The front end it came through (`"agent"`).
    pub via: &'static str,
}

impl Env {
    /// Opens the existing ledger, the kernel and the SM.
    ///
    /// # Errors
    /// No ledger, or a damaged one; the configuration; the kernel; the SM.
    pub fn open(root: &HostRoot, ledger: Option<&Path>, config: Option<&Path>) -> Result<Env> {
        Self::open_mode(root, ledger, config, false)
    }

    /// Opens the ledger, creating it when no file is there (first use), the
    /// kernel and the SM.
    ///
    /// # Errors
    /// As [`Env::open`], and a ledger that cannot be created.
    pub fn open_or_create(
        root: &HostRoot,
        ledger: Option<&Path>,
        config: Option<&Path>,
    ) -> Result<Env> {
        Self::open_mode(root, ledger, config, true)
    }

    /// Opens the existing ledger, the kernel and the SM with a configuration
    /// already read (the host agent's: the one it read at start or at its
    /// last good reload, not the file as it is now).
    ///
    /// # Errors
    /// As [`Env::open`].
    pub fn open_with(root: &HostRoot, ledger: Option<&Path>, cfg: &Config) -> Result<Env> {
        Self::open_cfg(root, ledger, cfg, false)
    }

    fn open_mode(
        root: &HostRoot,
        ledger: Option<&Path>,
        config: Option<&Path>,
        create: bool,
    ) -> Result<Env> {
        let cfg = Config::load(root, config)?;
        Self::open_cfg(root, ledger, &cfg, create)
    }

    fn open_cfg(root: &HostRoot, ledger: Option<&Path>, cfg: &Config, create: bool) -> Result<Env> {
        let kernel = Kernel::for_root(root)?;
        let path = ledger_path(root, ledger)?;
        let mut store = open_store(root, ledger, create)?;
        let sm = open_sm(root, &kernel, cfg, || {
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
        let fleet_guids = crate::fleet::registered().map(|h| crate::fleet::FleetGuids::of(&h.sm));
        let mut env = Env {
            fleet_guids,
            root: root.clone(),
            kernel,
            sm,
            store,
            ledger_path: path,
            notices: Vec::new(),
        };
        // A restore of the SM's configuration that any process made enters the
        // audit chain once and re-verifies the devices (issue 17 item 2).
        record_restores(&mut env);
        Ok(env)
    }

    /// Acts on behalf of `actor` from now on: every audit record this
    /// environment's ledger appends (steps, gates, refusals) names it.
    pub fn act_as(&mut self, actor: &Actor) {
        self.store.set_actor(serde_json::to_value(actor).ok());
    }

    /// An engine over this environment.
    #[must_use]
    pub fn engine<'a>(&'a mut self, cfg: EngineConfig) -> Engine<'a> {
        let e = Engine::new(&mut self.store, self.kernel.io(), &*self.sm, cfg)
            .with_failpoints(Failpoints::from_env());
        // A host of a fleet takes its IB GUIDs from the fabric's pool.
        if self.sm.backend() != devfence_fleet::sm::BACKEND {
            return e;
        }
        match &self.fleet_guids {
            Some(g) => e.with_guid_source(g),
            // No session in this process: IB operations are refused before
            // they open (the source is never ready).
            None => e.with_guid_source(&crate::fleet::NO_SESSION),
        }
    }

    /// The SM.
    #[must_use]
    pub fn sm(&self) -> &dyn SubnetManager {
        &*self.sm
    }
}

/// Records, once, every restore the SM backend persisted and re-verifies the
/// devices after a new one (issue 17 item 2). Says so in the notices; a
/// backend whose record cannot be read is a warning (the restore stays in the
/// backend's record and is recorded by the next process that can read it).
fn record_restores(env: &mut Env) {
    let backend = env.sm().backend().to_owned();
    let notice = match env.engine(EngineConfig::default()).record_fabric_restores() {
        Ok((_, None)) => return,
        Ok((new, Some(rv))) => restored_line(&backend, &new, &rv),
        Err(e) => format!("warning: {e}"),
    };
    env.notices.push(notice);
}

fn restored_line(backend: &str, new: &[RecordedRestore], rv: &Reverification) -> String {
    let ids: Vec<&str> = new.iter().map(|r| r.id.as_str()).collect();
    let drifted: Vec<String> = rv
        .drifted()
        .map(|d| format!("{} ({})", d.device, d.state))
        .collect();
    format!(
        "the {backend} backend restored the SM's configuration (restore {}); recorded in the audit log; \
         re-verified {} Ready/Active device(s): {}. Hint: `devfence verify` re-runs it, `devfence audit show` has the records",
        ids.join(", "),
        rv.devices.len(),
        if rv.all_verified() {
            "all verified".to_owned()
        } else if drifted.is_empty() {
            "some could not be verified".to_owned()
        } else {
            format!("drifted: {}", drifted.join(", "))
        }
    )
}

/// Whether a ledger is at `path`: its file, or a `-wal` left of one (a
/// damaged ledger, which opening reports). Without either devfence never
/// acted on this host.
#[must_use]
pub fn ledger_present(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
        || std::fs::symlink_metadata(devfence_engine::sqlite::sidecar(path, "-wal")).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfence_engine::AuditFilter;
    use devfence_engine::store::Tenant;

    /// issue 12 item 1: what a use case does on an actor's behalf is audited
    /// with the actor (a tenant added, a refused assign), and nothing else is.
    #[test]
    fn records_written_for_an_actor_name_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("host");
        sim::generate(&sim::GenerateOptions {
            profile: sim::Profile::Lab,
            out: out.clone(),
            vfs: None,
            host_id: 0,
        })
        .expect("simulated host");
        let root = HostRoot::new(&out);
        let mut env = Env::open_or_create(&root, None, None).expect("env");
        let tenant = |id: &str, uid: u32| Tenant {
            id: id.parse().expect("id"),
            launcher_uid: Some(uid),
            launcher_gid: Some(uid),
            security_label: None,
            partitions: Vec::new(),
        };
        // Before any actor: the operator's own command.
        crate::tenant::add(
            &mut env.engine(EngineConfig::default()),
            &tenant("first", 107),
        )
        .expect("add");
        let actor = Actor {
            uid: 1000,
            gid: 1001,
            pid: Some(42),
            via: "agent",
        };
        env.act_as(&actor);
        crate::tenant::add(
            &mut env.engine(EngineConfig::default()),
            &tenant("acme", 108),
        )
        .expect("add");
        let dev: devfence_model::DeviceId = "0000:00:01.0".parse().expect("device");
        let ghost: devfence_model::TenantId = "nobody".parse().expect("id");
        let req = crate::lifecycle::Request::Assign {
            device: dev,
            tenant: ghost,
            vm: None,
        };
        crate::lifecycle::run(&mut env.engine(EngineConfig::default()), &req)
            .expect_err("an unknown tenant is refused");
        let recs = crate::audit::show(&mut env.store, &AuditFilter::default()).expect("show");
        let want = serde_json::json!({ "uid": 1000, "gid": 1001, "pid": 42, "via": "agent" });
        let named: Vec<_> = recs
            .iter()
            .filter(|r| r.detail.get("actor") == Some(&want))
            .map(|r| r.kind.name())
            .collect();
        assert_eq!(named, ["ledger", "refusal"], "{recs:#?}");
        let first = recs
            .iter()
            .find(|r| r.tenant.as_ref().is_some_and(|t| t.to_string() == "first"))
            .expect("the first tenant's record");
        assert!(first.detail.get("actor").is_none(), "{first:?}");
    }
}
