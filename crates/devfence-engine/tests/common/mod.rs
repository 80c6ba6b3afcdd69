//! A simulated host (the `lab` profile), its simulated kernel, a simulated SM
//! whose port tables the kernel shows, and a ledger — all real components of the
//! embedded default.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devfence_engine::engine::{Crash, Engine, EngineConfig, Failpoints};
use devfence_engine::store::Tenant;
use devfence_engine::{GuidRange, SqliteStore, StoreExt};
use devfence_fabric::{SimConfig, SimSm};
use devfence_host::HostRoot;
use devfence_host::actuator::ops::SysfsActuator;
use devfence_host::actuator::{Actuator, KernelIo, NodeMeta, VfToken};
use devfence_host::sim::{GenerateOptions, Profile, generate};
use devfence_host::simkernel::SimKernel;
use devfence_model::{Bdf, DeviceId, Guid, MdevUuid, Membership, PKey, Partition, TenantId};

pub struct Fx {
    pub dir: tempfile::TempDir,
    pub root: HostRoot,
    pub kernel: SimKernel,
    pub sm: Arc<SimSm>,
    pub store: SqliteStore,
    pub db: PathBuf,
}

pub fn t(s: &str) -> TenantId {
    s.parse().unwrap()
}

pub fn tenant(id: &str, uid: u32, pkey: u16) -> Tenant {
    Tenant {
        id: t(id),
        launcher_uid: Some(uid),
        launcher_gid: Some(uid),
        security_label: None,
        partitions: vec![Partition {
            pkey: PKey(pkey),
            membership: Membership::Full,
        }],
    }
}

pub const POOL_FIRST: Guid = Guid(0x0002_c903_00f0_0000);
pub const POOL_LAST: Guid = Guid(0x0002_c903_00f0_ffff);

/// acme's launcher (uid = gid) and partition base.
pub const ACME_UID: u32 = 107;
pub const ACME_BASE: u16 = 0x0001;
/// globex's launcher (uid = gid) and partition base.
pub const GLOBEX_UID: u32 = 108;
pub const GLOBEX_BASE: u16 = 0x0002;

/// The lab profile's devices, one of each kind (the mdev is created per test).
pub const IB_VF: &str = "0000:3b:00.1";
pub const IB_PF: &str = "0000:3b:00.0";
pub const PCI_VF: &str = "0000:5e:10.0";
pub const TOKEN_VF: &str = "0000:af:10.0";
pub const MDEV_PARENT: &str = "0000:65:00.0";
pub const MDEV_TYPE: &str = "nvidia-63";

/// A fresh lab host with tenants acme (0x8001) and globex (0x8002) in the ledger.
pub fn fixture() -> Fx {
    fixture_with(SimConfig {
        lag: Duration::ZERO,
        sweep_time: Duration::ZERO,
        ..SimConfig::default()
    })
}

pub fn fixture_with(cfg: SimConfig) -> Fx {
    fixture_full(Profile::Lab, cfg, None)
}

/// A fresh host of `profile` with a zero-lag SM and the two tenants.
pub fn fixture_profile(profile: Profile) -> Fx {
    fixture_full(
        profile,
        SimConfig {
            lag: Duration::ZERO,
            sweep_time: Duration::ZERO,
            ..SimConfig::default()
        },
        None,
    )
}

/// A fresh host of `profile`, the SM configured by `cfg`, and the ledger at `db`
/// (default: `ledger.db` in the fixture directory).
pub fn fixture_full(profile: Profile, cfg: SimConfig, db: Option<PathBuf>) -> Fx {
    let base = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let dir = tempfile::Builder::new()
        .prefix("devfence-engine-")
        .tempdir_in(base)
        .unwrap();
    let host = dir.path().join("host");
    generate(&GenerateOptions {
        profile,
        out: host.clone(),
        vfs: None,
        host_id: 0,
    })
    .unwrap();
    let root = HostRoot::new(host);
    let kernel = SimKernel::new(root.clone()).unwrap();
    let sm = Arc::new(SimSm::real_time(cfg));
    follow_sm(&kernel, &sm);
    let db = db.unwrap_or_else(|| dir.path().join("ledger.db"));
    let mut store = SqliteStore::open(&db).unwrap();
    store
        .atomically(|tx| {
            tx.add_tenant(&tenant("acme", ACME_UID, 0x8001))?;
            tx.add_tenant(&tenant("globex", GLOBEX_UID, 0x8002))?;
            tx.set_guid_pool(GuidRange {
                first: POOL_FIRST,
                last: POOL_LAST,
            })
        })
        .unwrap();
    Fx {
        dir,
        root,
        kernel,
        sm,
        store,
        db,
    }
}

/// Makes the kernel's VF P_Key tables those the SM programmed.
fn follow_sm(kernel: &SimKernel, sm: &Arc<SimSm>) {
    let s2 = Arc::clone(sm);
    kernel.set_port_table_source(Arc::new(move |g: Guid| {
        s2.programmed()
            .get(&g)
            .map(|k| k.iter().map(|p| p.0).collect())
    }));
}

/// The engine configuration the tests use: a 5 s gate deadline (a bound, never
/// waited for when the SM has no lag).
pub fn cfg() -> EngineConfig {
    EngineConfig {
        gate_deadline: Duration::from_secs(5),
        ..EngineConfig::default()
    }
}

impl Fx {
    pub fn engine(&mut self) -> Engine<'_> {
        self.engine_with(Failpoints::none(), cfg())
    }

    pub fn engine_with(&mut self, fp: Failpoints, cfg: EngineConfig) -> Engine<'_> {
        Engine::new(&mut self.store, &self.kernel, &*self.sm, cfg).with_failpoints(fp)
    }

    /// Re-opens the ledger and the kernel as a new process would.
    pub fn restart(&mut self) {
        self.store = SqliteStore::open(&self.db).unwrap();
        self.kernel = SimKernel::new(self.root.clone()).unwrap();
        follow_sm(&self.kernel, &self.sm);
    }

    /// Creates an mdev of the lab's vGPU type with a fresh UUID.
    pub fn new_mdev(&self) -> DeviceId {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).unwrap();
        devfence_model::make_uuid_v4(&mut b);
        let u = MdevUuid(b);
        SysfsActuator::new(&self.kernel)
            .mdev_create(MDEV_PARENT, MDEV_TYPE, u)
            .unwrap();
        DeviceId::Mdev(u)
    }

    /// The sysfs directory of a PCI function or an mdev.
    pub fn sysfs_dir(dev: &DeviceId) -> Option<String> {
        match dev {
            DeviceId::Pci(b) => Some(format!("/sys/bus/pci/devices/{b}")),
            DeviceId::Mdev(u) => Some(format!("/sys/bus/mdev/devices/{u}")),
            _ => None,
        }
    }

    /// The device's IOMMU group, read from its `iommu_group` link.
    pub fn group_of(&self, dev: &DeviceId) -> Option<u32> {
        let dir = Self::sysfs_dir(dev)?;
        let link = self.kernel.read_link(&format!("{dir}/iommu_group")).ok()?;
        link.rsplit('/').next()?.parse().ok()
    }

    /// Owner and mode of the device's `/dev/vfio/<group>` node, if it has one.
    pub fn node(&self, dev: &DeviceId) -> Option<NodeMeta> {
        let g = self.group_of(dev)?;
        let p = format!("/dev/vfio/{g}");
        if !self.kernel.exists(&p) {
            return None;
        }
        self.kernel.stat(&p).ok()
    }

    /// Where the engine hands `bdf`'s VF token to the launcher.
    pub fn token_path(&self, bdf: &str) -> PathBuf {
        self.root.path(&format!("/run/devfence/tokens/{bdf}.token"))
    }

    /// The token the engine delivered for `bdf` (the file's one line), if any.
    pub fn delivered_token(&self, bdf: &str) -> Option<String> {
        let s = std::fs::read_to_string(self.token_path(bdf)).ok()?;
        Some(s.trim_end_matches('\n').to_owned())
    }

    /// The ledger's files: the database, its WAL and shared-memory index.
    pub fn ledger_files(&self) -> Vec<PathBuf> {
        let name = self.db.file_name().unwrap().to_string_lossy().into_owned();
        let dir = self.db.parent().unwrap();
        vec![
            self.db.clone(),
            dir.join(format!("{name}-wal")),
            dir.join(format!("{name}-shm")),
        ]
    }

    /// The P_Key bases the SM programmed for `guid` (empty: not on the fabric).
    pub fn programmed_bases(&self, guid: Guid) -> BTreeSet<u16> {
        self.sm
            .programmed()
            .get(&guid)
            .map(|k| k.iter().map(|p| p.base()).collect())
            .unwrap_or_default()
    }

    /// The P_Key bases the SM is configured to give `guid`.
    pub fn configured_bases(&self, guid: Guid) -> BTreeSet<u16> {
        self.sm
            .configured()
            .pkeys_of(guid)
            .iter()
            .map(|p| p.base())
            .collect()
    }
}

/// The token text of a token file as the kernel takes it.
pub fn parse_token(s: &str) -> VfToken {
    let u: MdevUuid = s.trim().parse().unwrap();
    VfToken::from_bytes(u.0)
}

pub fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

pub fn dev(s: &str) -> DeviceId {
    s.parse().unwrap()
}

/// Where the secrets show up in `files`: each token's text (as given, lower and
/// upper case), its hex digits without dashes, and its 16 raw bytes. Missing
/// files are skipped.
pub fn secret_hits(files: &[PathBuf], tokens: &[String]) -> Vec<String> {
    // Bytes as Latin-1 characters, one for one, so that std's substring search
    // (fast even in a debug build) finds raw byte strings too.
    fn latin1(b: &[u8]) -> String {
        b.iter().map(|&c| char::from(c)).collect()
    }
    let mut needles: Vec<(String, &str, String)> = Vec::new();
    for tok in tokens {
        let text = tok.to_ascii_lowercase();
        let plain = text.replace('-', "");
        let raw = parse_token(tok);
        needles.push((tok.clone(), "text", latin1(text.as_bytes())));
        needles.push((
            tok.clone(),
            "TEXT",
            latin1(text.to_ascii_uppercase().as_bytes()),
        ));
        needles.push((tok.clone(), "hex", latin1(plain.as_bytes())));
        needles.push((
            tok.clone(),
            "HEX",
            latin1(plain.to_ascii_uppercase().as_bytes()),
        ));
        needles.push((tok.clone(), "raw", latin1(raw.as_bytes())));
    }
    let mut hits = Vec::new();
    for f in files {
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        let hay = latin1(&bytes);
        for (tok, what, n) in &needles {
            if hay.contains(n.as_str()) {
                hits.push(format!("{} holds the token {tok} ({what})", f.display()));
            }
        }
    }
    hits
}

/// Every regular file under `dir`, except those under `skip`.
pub fn files_under(dir: &Path, skip: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.starts_with(skip) {
                continue;
            }
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                todo.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// Silences the panic message of failpoint crashes (they are expected); every
/// other panic is reported as usual.
pub fn quiet_crashes() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Crash>().is_none() {
                prev(info);
            }
        }));
    });
}
