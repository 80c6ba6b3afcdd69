//! Shared by the OpenSM engine tests and the OpenSM benchmark: the simulated
//! `lab` host whose IB VFs are nodes on a real OpenSM/ibsim fabric.
//!
//! The lab's four IB VFs are four one-port HCA nodes with the VFs' factory GUIDs.
//! When the engine sets a VF's port GUID (netlink on a real host), [`OnFabric`]
//! also rotates the node's GUID on ibsim, as a VF reset with a fresh GUID does on
//! a real fabric; and the kernel's VF P_Key tables are read from the SA, so the
//! port-pkeys gate reads the fabric too.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use devfence_engine::store::{Partition, Tenant};
use devfence_engine::{GuidRange, SqliteStore, StoreExt};
use devfence_fabric::PortReader;
use devfence_fabric::opensm::{OpenSmSm, SaClient, SaConfig, port_tables};
use devfence_fabric_harness::{Fabric, FabricSpec};
use devfence_host::HostRoot;
use devfence_host::actuator::{Errno, GuidKind, KernelIo, NodeMeta, PfHandle};
use devfence_host::sim::{GenerateOptions, Profile, generate};
use devfence_host::simkernel::SimKernel;
use devfence_model::{Bdf, Guid, IommuGroupId, Membership, PKey};

/// The ledger's GUID pool.
pub const POOL_FIRST: Guid = Guid(0x0002_c903_00f0_0000);
/// The pool's last GUID.
pub const POOL_LAST: Guid = Guid(0x0002_c903_00f0_ffff);

/// A tenant with one full-member partition.
pub fn tenant(id: &str, uid: u32, pkey: u16) -> Tenant {
    Tenant {
        id: id.parse().unwrap(),
        launcher_uid: Some(uid),
        launcher_gid: Some(uid),
        security_label: None,
        partitions: vec![Partition {
            pkey: PKey(pkey),
            membership: Membership::Full,
        }],
    }
}

/// The lab's CX-6 VFs: 0000:3b:00.1–.4, VF indexes 0–3, factory port GUIDs.
pub const FACTORY: [u64; 4] = [
    0x0c42_a103_4000_0000,
    0x0c42_a103_4000_0001,
    0x0c42_a103_4000_0002,
    0x0c42_a103_4000_0003,
];

/// The fabric: one node per lab VF, with its factory GUID.
pub fn spec() -> FabricSpec {
    let mut s = FabricSpec::vfs(0, Guid(1));
    s.ports = FACTORY
        .iter()
        .enumerate()
        .map(|(i, g)| (format!("vf{i}"), Guid(*g)))
        .collect();
    s
}

/// The simulated kernel, with VF GUID changes mirrored onto the fabric.
pub struct OnFabric<'a> {
    pub k: &'a SimKernel,
    pub f: &'a Fabric,
}

impl KernelIo for OnFabric<'_> {
    fn root(&self) -> &HostRoot {
        self.k.root()
    }
    fn write(&self, path: &str, value: &[u8]) -> Result<(), Errno> {
        self.k.write(path, value)
    }
    fn read(&self, path: &str) -> Result<Vec<u8>, Errno> {
        self.k.read(path)
    }
    fn read_each(&self, dir: &str, names: &[String]) -> Vec<Result<Vec<u8>, Errno>> {
        self.k.read_each(dir, names)
    }
    fn read_link(&self, path: &str) -> Result<String, Errno> {
        self.k.read_link(path)
    }
    fn exists(&self, path: &str) -> bool {
        self.k.exists(path)
    }
    fn chown(&self, path: &str, uid: u32, gid: u32) -> Result<(), Errno> {
        self.k.chown(path, uid, gid)
    }
    fn chmod(&self, path: &str, mode: u32) -> Result<(), Errno> {
        self.k.chmod(path, mode)
    }
    fn set_vf_guid(&self, pf: &str, vf: u32, kind: GuidKind, guid: Guid) -> Result<(), Errno> {
        self.k.set_vf_guid(pf, vf, kind, guid)?;
        if kind == GuidKind::Port {
            self.f
                .rotate(&format!("vf{vf}"), guid)
                .map_err(|_| Errno(5))?;
        }
        Ok(())
    }
    fn open_pf(&self, pf: Bdf, group: IommuGroupId) -> Result<Box<dyn PfHandle>, Errno> {
        self.k.open_pf(pf, group)
    }
    fn list_dir(&self, path: &str) -> Result<Vec<String>, Errno> {
        self.k.list_dir(path)
    }
    fn stat(&self, path: &str) -> Result<NodeMeta, Errno> {
        self.k.stat(path)
    }
}

pub struct Host {
    pub dir: tempfile::TempDir,
    /// The ledger's directory when not in `dir` (`DEVFENCE_BENCH_LEDGER_DIR`).
    pub ledger_dir: Option<tempfile::TempDir>,
    pub kernel: SimKernel,
    pub store: SqliteStore,
    pub sm: OpenSmSm,
    pub sa: Arc<SaClient>,
}

/// A fresh lab host (tenants acme 0x8001 and globex 0x8002) on the fabric `f`.
pub fn host(f: &Fabric) -> Host {
    // The host tree and the ledger on tmpfs, as in the other engine tests and
    // benchmarks (the ledger's fsyncs then cost what tmpfs makes them cost).
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let dir = tempfile::Builder::new()
        .prefix("devfence-opensm-")
        .tempdir_in(base)
        .unwrap();
    let root = dir.path().join("host");
    generate(&GenerateOptions {
        profile: Profile::Lab,
        out: root.clone(),
        vfs: None,
        host_id: 0,
    })
    .unwrap();
    let kernel = SimKernel::new(HostRoot::new(root)).unwrap();
    // One SA client per process: under umad2sim a second one would share the
    // process's single simulator connection and could take the other's replies.
    let sa = Arc::new(SaClient::new(SaConfig::default()));
    // The VF's own table, as the HCA would show it in sysfs, is the one the port
    // acknowledged, read from the SA (once per table while OpenSM's log is still).
    kernel.set_port_table_source(Arc::new(port_tables(
        Arc::clone(&sa) as Arc<dyn PortReader>,
        Some(f.opensm_config().log_file),
    )));
    // `DEVFENCE_BENCH_LEDGER_DIR` puts the ledger on another filesystem (a disk,
    // where each transaction's fsync costs what a host's ledger pays).
    let ledger_dir = std::env::var_os("DEVFENCE_BENCH_LEDGER_DIR").map(|d| {
        tempfile::Builder::new()
            .prefix("devfence-ledger-")
            .tempdir_in(d)
            .unwrap()
    });
    let ledger = ledger_dir
        .as_ref()
        .map_or(dir.path(), tempfile::TempDir::path)
        .join("ledger.db");
    let mut store = SqliteStore::open(&ledger).unwrap();
    store
        .atomically(|tx| {
            tx.add_tenant(&tenant("acme", 107, 0x8001))?;
            tx.add_tenant(&tenant("globex", 108, 0x8002))?;
            tx.set_guid_pool(GuidRange {
                first: POOL_FIRST,
                last: POOL_LAST,
            })
        })
        .unwrap();
    Host {
        dir,
        ledger_dir,
        kernel,
        store,
        sm: OpenSmSm::with_port_reader(f.opensm_config(), Box::new(Arc::clone(&sa))),
        sa,
    }
}
