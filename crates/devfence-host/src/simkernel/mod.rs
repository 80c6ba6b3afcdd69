//! The simulated kernel: [`SimKernel`] implements [`KernelIo`] over a fixture tree
//! (a root written by [`crate::sim::generate`] or a [`crate::sim::TreeBuilder`]).
//!
//! The files of the tree are the kernel's visible state. A write is interpreted
//! with the kernel's semantics (reference: `kernel-interfaces.md` §1–§5) and either
//! mutates the tree — so the ordinary inventory readers read the result back — or
//! answers the kernel's errno and changes nothing. Reads, `read_link` and `exists`
//! only read the tree. Paths may be given through any link the kernel offers
//! (`/sys/bus/pci/devices/<bdf>/…`, `/sys/class/mdev_bus/<parent>/…`, a device's
//! `driver/unbind`): they are resolved under the root first.
//!
//! What the kernel keeps outside sysfs is kept beside the tree, so that every
//! process simulating one host sees one kernel, as processes on a real host do:
//! the native driver of each function, the administrative GUIDs of mlx5 VFs, the
//! subtrees a host driver creates (`infiniband/`, `net/`, OFED `sriov/`) while the
//! device is unbound, and each function's default `reset_method` are persisted
//! in `<root>/run/devfence-simkernel/state.json`. Every operation is atomic across
//! processes: it takes an exclusive `flock` on `<root>/run/devfence-simkernel/lock`,
//! re-reads the persisted state when another process changed it, acts, and writes
//! the state back (atomically, by rename) before the lock is released.
//! What a process holds open (group-path opens, PF custody) and each vfio-pci PF's
//! VF token stay in the process's memory: opens die with their process as file
//! descriptors do, and a token is never written anywhere (never printed either).
//!
//! Modelled: `driver_override`, driver `bind`/`unbind`, `drivers_probe` (with the
//! DMA-ownership rule), `sriov_numvfs` (VFs with their own groups, the vfio-pci
//! bus notifier, `sriov_drivers_autoprobe`), `reset`, `reset_method`,
//! `vfio-dev/vfio<X>` and `/dev/vfio/<N>` life cycles, mdev `create`/`remove`,
//! vfio_ap `assign_*`/`unassign_*`, `apmask`/`aqmask` with queue rebinding and
//! `guest_matrix` filtering, the VF-token rules of the group path, mlx5 VF GUIDs
//! through rtnetlink, chown/chmod. Writes to attributes that are not modelled
//! answer `EACCES` for read-only attributes and `EOPNOTSUPP` otherwise.
//!
//! The subnet manager's side of an IB port — its P_Key table — comes from a
//! [`PortTableSource`] when one is set ([`SimKernel::set_port_table_source`]): a
//! read of a `pkeys/<i>` slot first writes the table the fabric programmed for the
//! port's GUID into the tree, so the slot read, and every later inventory read,
//! shows it.

mod ap;
mod ib;
mod mdev;
mod mig;
mod num;
mod pci;
mod tree;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use devfence_model::{Bdf, Guid, IommuGroupId, MdevUuid};

use crate::actuator::{Errno, GuidKind, KernelIo, PfHandle, VfToken};
use crate::migration::{MigTarget, MigrationDevice};

use crate::root::{HostError, HostRoot};
pub use mig::{MTTY_HEADER, MTTY_MAGIC, MTTY_PORT, SimMigDevice};

use tree::{Kind, Saved, Tree, split};

/// An in-process model of the kernel over a fixture tree. See the module docs.
///
/// Cheap to share: the handles it gives out ([`SimOpen`], [`SimPfHandle`]) keep
/// the simulator's state alive and update it when they are closed.
pub struct SimKernel {
    shared: Arc<Shared>,
}

struct Shared {
    tree: Tree,
    state: Mutex<State>,
    /// The lock file every process simulating this host locks around an operation.
    lock_file: std::fs::File,
    /// The generation of the state this process read or wrote last. The
    /// generation is a counter in the lock file's first 8 bytes, raised by every
    /// write of the state (a file's inode is no identity: tmpfs reuses them).
    seen: Mutex<Option<u64>>,
    /// The fabric's P_Key tables; kept apart from `state` so that the source is
    /// never called with the kernel's lock held.
    port_tables: Mutex<Option<PortTableSource>>,
}

/// Where the simulated kernel keeps what every process shares (module docs).
const SIM_LOCK: &str = "/run/devfence-simkernel/lock";
/// The persisted state (module docs).
const SIM_STATE: &str = "/run/devfence-simkernel/state.json";
/// The most the persisted state may hold.
const MAX_SIM_STATE: u64 = 256 << 20;

/// The cross-process lock, released when dropped.
struct CrossLock<'a>(&'a std::fs::File);

impl Drop for CrossLock<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.0, rustix::fs::FlockOperation::Unlock);
    }
}

/// A result that can say "the simulator's shared state could not be had".
trait SimFailure {
    fn sim_failure() -> Self;
}
impl<T> SimFailure for Result<T, Errno> {
    fn sim_failure() -> Self {
        Err(Errno::EIO)
    }
}
impl<T> SimFailure for Option<T> {
    fn sim_failure() -> Self {
        None
    }
}
impl SimFailure for () {
    fn sim_failure() -> Self {}
}
/// A count the simulator could not read is no count at all: the largest, so a
/// test asserting "no calls" fails closed.
impl SimFailure for u64 {
    fn sim_failure() -> Self {
        u64::MAX
    }
}
impl SimFailure for bool {
    fn sim_failure() -> Self {
        false
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one operation atomically across processes: the in-process lock, then
    /// the `flock`; the persisted state re-read if another process changed it;
    /// written back if the operation changed it. When the shared state cannot be
    /// read or written the operation fails closed (`EIO`, `None`) without acting.
    fn with<R: SimFailure>(&self, f: impl FnOnce(&mut K<'_>) -> R) -> R {
        let mut st = self.lock();
        let Ok(_cross) = self.cross_lock() else {
            return R::sim_failure();
        };
        if self.refresh(&mut st).is_err() {
            return R::sim_failure();
        }
        st.dirty = false;
        let r = f(&mut K {
            t: &self.tree,
            s: &mut st,
        });
        if std::mem::take(&mut st.dirty) && self.persist(&st.d).is_err() {
            // The change is in the tree but not in the shared state: take the
            // state as it was persisted at the next operation; say so now.
            *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = None;
            return R::sim_failure();
        }
        r
    }

    fn cross_lock(&self) -> std::io::Result<CrossLock<'_>> {
        loop {
            match rustix::fs::flock(&self.lock_file, rustix::fs::FlockOperation::LockExclusive) {
                Ok(()) => return Ok(CrossLock(&self.lock_file)),
                Err(e) if e == rustix::io::Errno::INTR => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The generation in the lock file (0: nothing persisted yet).
    fn generation(&self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        let n = rustix::io::pread(&self.lock_file, &mut b, 0)?;
        Ok(if n == 8 { u64::from_le_bytes(b) } else { 0 })
    }

    /// Re-reads the persisted state when another process wrote it since.
    fn refresh(&self, st: &mut State) -> std::io::Result<()> {
        let generation = self.generation()?;
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if generation == 0 || *seen == Some(generation) {
            // Nothing persisted yet (this process's state is the state), or
            // nothing changed since this process last read or wrote it.
            return Ok(());
        }
        let bytes = self
            .tree
            .root
            .read_file(SIM_STATE, MAX_SIM_STATE)
            .map_err(devfence_model::bounded::ReadFileError::into_io)?;
        let file: DurableFile = serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        st.d = Durable::from_file(file);
        *seen = Some(generation);
        Ok(())
    }

    /// Writes the state (a new file renamed over the old one) and notes its identity.
    fn persist(&self, d: &Durable) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&d.to_file())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        self.tree.root.replace_file(SIM_STATE, &bytes, 0o600)?;
        let next = self.generation()?.wrapping_add(1).max(1);
        let n = rustix::io::pwrite(&self.lock_file, &next.to_le_bytes(), 0)?;
        if n != 8 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(next);
        Ok(())
    }

    fn port_table_source(&self) -> Option<PortTableSource> {
        self.port_tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What the fabric programmed on a port: its P_Key table entries (with membership
/// bit), or None if the fabric does not know the port.
///
/// The argument is the port GUID (the low 64 bits of the port's `gids/0`). The
/// entries are the table in slot order, as the subnet manager wrote it: entry *i*
/// goes to slot *i*, a `0x0000` entry is an empty slot (OpenSM's
/// `keep_pkey_indexes` leaves such holes when a key moves), and the order is kept
/// as given — tables are to be compared as sets.
pub type PortTableSource = Arc<dyn Fn(Guid) -> Option<Vec<u16>> + Send + Sync>;

/// The mlx5 administrative GUIDs of one VF (what `ip link set … vf N node_guid`
/// stored), applied at the VF's next bind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct AdminGuids {
    node: Option<Guid>,
    port: Option<Guid>,
}

/// What the kernel knows beyond sysfs that every process shares (persisted).
#[derive(Clone, Default, PartialEq, Eq)]
struct Durable {
    /// The driver each function had when the simulator first saw it (never a vfio
    /// driver); functions not listed fall back to the id table.
    natives: HashMap<Bdf, String>,
    /// Per (PF, VF index): administrative GUIDs.
    admin_guids: HashMap<(Bdf, u32), AdminGuids>,
    /// Per (device path, driver): the subtrees the driver created, saved while the
    /// device is not bound to it.
    stash: HashMap<(String, String), Stashed>,
    /// Per function: `reset_method` as first seen (what `default` restores).
    reset_defaults: HashMap<Bdf, String>,
}

/// [`Durable`] as it is written: sorted lists (JSON keys are strings only).
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct DurableFile {
    natives: Vec<(Bdf, String)>,
    admin_guids: Vec<((Bdf, u32), AdminGuids)>,
    stash: Vec<((String, String), Stashed)>,
    reset_defaults: Vec<(Bdf, String)>,
}

impl Durable {
    fn to_file(&self) -> DurableFile {
        fn sorted<K: Clone + Ord, V: Clone>(m: &HashMap<K, V>) -> Vec<(K, V)> {
            let mut v: Vec<(K, V)> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        }
        DurableFile {
            natives: sorted(&self.natives),
            admin_guids: sorted(&self.admin_guids),
            stash: sorted(&self.stash),
            reset_defaults: sorted(&self.reset_defaults),
        }
    }
    fn from_file(f: DurableFile) -> Self {
        Self {
            natives: f.natives.into_iter().collect(),
            admin_guids: f.admin_guids.into_iter().collect(),
            stash: f.stash.into_iter().collect(),
            reset_defaults: f.reset_defaults.into_iter().collect(),
        }
    }
}

/// What the kernel knows beyond sysfs.
#[derive(Default)]
struct State {
    /// Shared by every process (persisted beside the tree). Read it here; change
    /// it through [`State::dm`], which marks it to be written back.
    d: Durable,
    /// `d` changed in this operation.
    dirty: bool,
    /// Open VFIO handles per PCI function (group-path opens and PF custody).
    opens: HashMap<Bdf, u32>,
    /// Open VFIO handles per mdev.
    mdev_opens: HashMap<MdevUuid, u32>,
    /// Per vfio-pci PF: how many of its VFs are open (`vf_token->users`).
    vf_users: HashMap<Bdf, u32>,
    /// Per vfio-pci PF: the VF token last set. Absent: the random token vfio-pci
    /// made at probe, which nobody knows.
    tokens: HashMap<Bdf, VfToken>,
    /// The memory of mtty mdevs whose driver implements migration (`mig.rs`; each
    /// persisted on its own beside the tree, so every process sees one device).
    mtty: HashMap<MdevUuid, mig::MttyDev>,
}

impl State {
    /// The shared state, to change: marks it to be written back.
    fn dm(&mut self) -> &mut Durable {
        self.dirty = true;
        &mut self.d
    }
}

/// Subtrees saved while a driver is unbound: (where, what) pairs.
type Stashed = Vec<(String, Vec<Saved>)>;

/// One operation's view of the kernel: the tree and the state, under the lock.
struct K<'a> {
    t: &'a Tree,
    s: &'a mut State,
}

/// What an open handle holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Pci(Bdf),
    Mdev(MdevUuid),
}

/// A device opened through the group path ([`SimKernel::open_vf`],
/// [`SimKernel::open_mdev`]). Closing it — [`SimOpen::close`] or dropping it —
/// gives the device back.
pub struct SimOpen {
    shared: Arc<Shared>,
    held: Held,
    /// The vfio-pci PF whose `vf_token->users` this open counts in.
    pf_user: Option<Bdf>,
    closed: bool,
}

impl SimOpen {
    /// The device's name as VFIO knows it: a BDF or an mdev UUID.
    #[must_use]
    pub fn device(&self) -> String {
        match self.held {
            Held::Pci(b) => b.to_string(),
            Held::Mdev(u) => u.to_string(),
        }
    }

    /// Closes the device.
    pub fn close(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let (held, pf_user) = (self.held, self.pf_user);
        self.shared.with(|k| k.release(held, pf_user));
    }
}

impl Drop for SimOpen {
    fn drop(&mut self) {
        self.release();
    }
}

impl fmt::Debug for SimOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimOpen")
            .field("device", &self.device())
            .field("closed", &self.closed)
            .finish()
    }
}

/// A PF held open through VFIO ([`SimKernel::open_pf_handle`], or boxed by
/// [`KernelIo::open_pf`]). Dropping it closes the PF.
pub struct SimPfHandle {
    shared: Arc<Shared>,
    pf: Bdf,
    is_pf: bool,
}

impl SimPfHandle {
    /// The PF.
    #[must_use]
    pub fn pf(&self) -> Bdf {
        self.pf
    }

    /// `VFIO_DEVICE_FEATURE` GET `PCI_VF_TOKEN`: refused, as the kernel refuses it
    /// (`EINVAL`; `ENOTTY` on a device that is not a PF). The token is write-only.
    ///
    /// # Errors
    /// Always.
    pub fn get_vf_token(&self) -> Result<VfToken, Errno> {
        Err(if self.is_pf {
            Errno::EINVAL
        } else {
            Errno::ENOTTY
        })
    }
}

impl PfHandle for SimPfHandle {
    fn set_vf_token(&mut self, token: &VfToken) -> Result<(), Errno> {
        if !self.is_pf {
            return Err(Errno::ENOTTY);
        }
        // In this process's memory only: a token is never written anywhere.
        self.shared.lock().tokens.insert(self.pf, token.clone());
        Ok(())
    }
}

impl Drop for SimPfHandle {
    fn drop(&mut self) {
        let pf = self.pf;
        self.shared.with(|k| k.release(Held::Pci(pf), None));
    }
}

impl fmt::Debug for SimPfHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimPfHandle")
            .field("pf", &self.pf)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for SimKernel {
    /// The root and what is open; never a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = self.shared.port_table_source().is_some();
        let st = self.shared.lock();
        f.debug_struct("SimKernel")
            .field("root", &self.shared.tree.root.root())
            .field("open_devices", &st.opens.values().sum::<u32>())
            .field("open_mdevs", &st.mdev_opens.values().sum::<u32>())
            .field("vf_tokens_set", &st.tokens.len())
            .field("port_table_source", &source)
            .finish_non_exhaustive()
    }
}

impl SimKernel {
    /// A simulated kernel over the tree at `root`. Notes the driver every PCI
    /// function is bound to now as its native driver (vfio drivers excepted).
    ///
    /// # Errors
    /// The root is missing or not a directory.
    pub fn new(root: HostRoot) -> Result<Self, HostError> {
        root.check()?;
        let lock_file = root
            .open_lock_file(SIM_LOCK)
            .map_err(|source| HostError::SimState {
                path: root.path(SIM_LOCK),
                source,
            })?;
        let tree = Tree { root };
        let shared = Shared {
            tree,
            state: Mutex::new(State::default()),
            lock_file,
            seen: Mutex::new(None),
            port_tables: Mutex::new(None),
        };
        // Under the lock: what other processes persisted, plus the native driver
        // of every function no process has seen yet.
        let ok: Result<(), Errno> = shared.with(|k| {
            for name in k.t.list("/sys/bus/pci/devices") {
                let Ok(bdf) = name.parse::<Bdf>() else {
                    continue;
                };
                if k.s.d.natives.contains_key(&bdf) {
                    continue;
                }
                if let Some(drv) =
                    k.t.link_name(&format!("/sys/bus/pci/devices/{name}/driver"))
                    && !pci::is_vfio(&drv)
                    && drv != "pci-stub"
                {
                    k.s.dm().natives.insert(bdf, drv);
                }
            }
            Ok(())
        });
        if ok.is_err() {
            let path = shared.tree.root.path(SIM_STATE);
            return Err(HostError::SimState {
                path,
                source: std::io::Error::other("cannot read or write the shared simulator state"),
            });
        }
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    fn with<R: SimFailure>(&self, f: impl FnOnce(&mut K<'_>) -> R) -> R {
        self.shared.with(f)
    }

    /// Opens a PCI function through its VFIO group the way QEMU does
    /// (`VFIO_GROUP_GET_DEVICE_FD` with `"<BDF>"` or `"<BDF> vf_token=<uuid>"`),
    /// with the kernel's rules (reference §2.4):
    /// * `ENODEV` unless the function is bound to a vfio driver;
    /// * `EPERM` when the group is not viable (a member on a host DMA driver);
    /// * a VF whose PF is on vfio-pci: `EACCES` without the PF's current token or
    ///   with another one; a VF whose PF is not on vfio-pci: `EINVAL` with a token;
    /// * a vfio-pci PF while some of its VFs are open: `EACCES` without the
    ///   current token or with another; with no VF open a given token becomes the
    ///   PF's token;
    /// * any other function: `EINVAL` with a token.
    ///
    /// Success marks the function open (a VF counts as a user of its PF's token)
    /// until the [`SimOpen`] is closed.
    ///
    /// # Errors
    /// As listed.
    pub fn open_vf(&self, bdf: Bdf, token: Option<&VfToken>) -> Result<SimOpen, Errno> {
        let pf_user = self.with(|k| k.open_pci(bdf, token))?;
        Ok(SimOpen {
            shared: Arc::clone(&self.shared),
            held: Held::Pci(bdf),
            pf_user,
            closed: false,
        })
    }

    /// Opens an mdev through its group (`ENODEV` if it does not exist). While a
    /// vfio_ap matrix mdev is open its queues read `status` `in use`.
    ///
    /// # Errors
    /// `ENODEV`.
    pub fn open_mdev(&self, uuid: MdevUuid) -> Result<SimOpen, Errno> {
        self.with(|k| k.open_mdev(uuid))?;
        Ok(SimOpen {
            shared: Arc::clone(&self.shared),
            held: Held::Mdev(uuid),
            pf_user: None,
            closed: false,
        })
    }

    /// [`KernelIo::open_migration`] with the concrete handle: opens the device
    /// named by `target` (an mdev UUID or a BDF) through its group, as the
    /// group path does: `ENODEV` when there is no such device or it is not in
    /// `target.group`, `EBUSY` while another opener holds the device's group.
    /// Its migration interface is modelled for mtty mdevs (`mig.rs`); every
    /// other device answers `ENOTTY`, as a driver without `mig_ops` does.
    ///
    /// # Errors
    /// As listed, and those of [`SimKernel::open_vf`].
    pub fn open_migration_device(&self, target: &MigTarget) -> Result<SimMigDevice, Errno> {
        let open = if let Ok(uuid) = target.name.parse::<MdevUuid>() {
            self.with(|k| {
                let d =
                    k.t.link(&format!("/sys/bus/mdev/devices/{uuid}"))
                        .ok_or(Errno::ENODEV)?;
                if k.group_of(&d) != Some(target.group.0) {
                    return Err(Errno::ENODEV);
                }
                if k.s.mdev_opens.get(&uuid).is_some_and(|n| *n > 0) {
                    return Err(Errno::EBUSY);
                }
                Ok(())
            })?;
            self.open_mdev(uuid)?
        } else {
            let bdf: Bdf = target.name.parse().map_err(|_| Errno::EINVAL)?;
            self.with(|k| {
                let d = k.pci_dir(bdf).ok_or(Errno::ENODEV)?;
                if k.group_of(&d) != Some(target.group.0) {
                    return Err(Errno::ENODEV);
                }
                if k.s.opens.get(&bdf).is_some_and(|n| *n > 0) {
                    return Err(Errno::EBUSY);
                }
                Ok(())
            })?;
            self.open_vf(bdf, None)?
        };
        Ok(SimMigDevice::new(Arc::clone(&self.shared), open))
    }

    /// How many migration calls (GET/SET `MIGRATION`, `MIG_DEVICE_STATE`) were
    /// made on an mtty mdev, over the life of the simulated host: a test's
    /// proof that a refused load never reached the device's migration interface.
    #[must_use]
    pub fn migration_calls(&self, uuid: MdevUuid) -> u64 {
        self.with(|k| k.mtty_calls(uuid))
    }

    /// [`KernelIo::open_pf`] with the concrete handle: `ENODEV` unless `pf` is
    /// bound to vfio-pci and in `group`; `EPERM` when the group is not viable;
    /// `EACCES` while VFs of the PF are open (the open carries no token).
    ///
    /// # Errors
    /// As listed.
    pub fn open_pf_handle(&self, pf: Bdf, group: IommuGroupId) -> Result<SimPfHandle, Errno> {
        let is_pf = self.with(|k| k.open_pf(pf, group))?;
        Ok(SimPfHandle {
            shared: Arc::clone(&self.shared),
            pf,
            is_pf,
        })
    }

    /// An attempt to read a PF's VF token back (`VFIO_DEVICE_FEATURE` GET): `ENODEV`
    /// unless `pf` is on vfio-pci, `ENOTTY` for a function that is not a PF, and
    /// otherwise `EINVAL` — the token is write-only.
    ///
    /// # Errors
    /// Always.
    pub fn get_vf_token(&self, pf: Bdf) -> Result<VfToken, Errno> {
        self.with(|k| {
            let dir = k.pci_dir(pf).ok_or(Errno::ENODEV)?;
            if k.driver_of(&dir).as_deref() != Some("vfio-pci") {
                return Err(Errno::ENODEV);
            }
            Err(if k.is_pf(&dir) {
                Errno::EINVAL
            } else {
                Errno::ENOTTY
            })
        })
    }

    /// Makes `source` the subnet manager whose P_Key tables the ports show
    /// (replacing any source set before).
    ///
    /// From then on a [`KernelIo::read`] of a P_Key slot
    /// (`…/infiniband/<dev>/ports/<p>/pkeys/<i>`, through `/sys/class/infiniband`
    /// or the device's PCI directory) looks the port's GUID up — the low 64 bits of
    /// its `gids/0` — and, when the source knows it, rewrites that slot in the tree
    /// before answering (reading every slot reads the whole table, in linear time): slot *i* gets entry *i*, slots past the
    /// entries `0x0000`. The table keeps its slot count: entries beyond the last
    /// slot are dropped (a real table holds what its capacity allows), and
    /// `list_dir` of `pkeys/` is unchanged. When the source answers `None` (the
    /// fabric does not know the port) the table is left as the tree has it — what
    /// the port showed last. A port whose GUID is zero (no GUID set yet) is never
    /// looked up. The source is called without the simulator's lock held.
    ///
    /// Because the table is written through to the tree, the inventory readers,
    /// which read the tree directly, see the table the kernel showed last.
    pub fn set_port_table_source(&self, source: PortTableSource) {
        *self
            .shared
            .port_tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(source);
    }

    /// The fabric's table for the port of the P_Key slot `path`, written into
    /// the tree (see [`SimKernel::set_port_table_source`]).
    /// [`Self::refresh_port_table`] for a whole `pkeys` directory: the source is
    /// asked once and the whole table programmed.
    fn refresh_port_table_dir(&self, dir: &str, names: &[String]) -> Result<(), Errno> {
        let Some(source) = self.shared.port_table_source() else {
            return Ok(());
        };
        let Some(first) = names.iter().find(|n| crate::actuator::is_one_component(n)) else {
            return Ok(());
        };
        let Some((port, guid)) = self.with(|k| k.pkey_slot_port(&format!("{dir}/{first}"))) else {
            return Ok(());
        };
        let Some(keys) = source(guid) else {
            return Ok(());
        };
        self.with(|k| k.program_pkey_table(&port, guid, &keys, None))
    }

    fn refresh_port_table(&self, path: &str) -> Result<(), Errno> {
        let Some(source) = self.shared.port_table_source() else {
            return Ok(());
        };
        let Some((port, guid)) = self.with(|k| k.pkey_slot_port(path)) else {
            return Ok(());
        };
        let Some(keys) = source(guid) else {
            return Ok(());
        };
        let slot = path
            .rsplit('/')
            .next()
            .and_then(|n| n.parse::<usize>().ok());
        self.with(|k| k.program_pkey_table(&port, guid, &keys, slot))
    }

    /// How many VFIO handles are open on a PCI function.
    #[must_use]
    pub fn open_count(&self, bdf: Bdf) -> u32 {
        self.shared.lock().opens.get(&bdf).copied().unwrap_or(0)
    }

    /// The native driver the simulator would bind `bdf` to without an override
    /// (`None`: none; vfio drivers are never native).
    #[must_use]
    pub fn native_driver(&self, bdf: Bdf) -> Option<String> {
        self.with(|k| k.native_of(bdf))
    }
}

impl KernelIo for SimKernel {
    fn root(&self) -> &HostRoot {
        &self.shared.tree.root
    }

    fn write(&self, path: &str, value: &[u8]) -> Result<(), Errno> {
        self.with(|k| k.write(path, value))
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, Errno> {
        self.refresh_port_table(path)?;
        self.with(|k| {
            let p = k.t.resolve(path, true)?;
            k.read_resolved(&p)
        })
    }

    /// One pass: a P_Key table's port is programmed from the fabric once for
    /// the whole directory (not once per slot), the directory is resolved once,
    /// and every file is read under one lock (a consistent table).
    fn read_each(&self, dir: &str, names: &[String]) -> Vec<Result<Vec<u8>, Errno>> {
        if let Err(e) = self.refresh_port_table_dir(dir, names) {
            return names.iter().map(|_| Err(e)).collect();
        }
        let all = self.with(|k| {
            let d = k.t.resolve(dir, true)?;
            Ok(names
                .iter()
                .map(|n| {
                    if !crate::actuator::is_one_component(n) {
                        return Err(Errno::EINVAL);
                    }
                    // The directory is resolved; a name is one component, read
                    // in place (a link there is followed, as `read` does).
                    k.read_resolved(&format!("{d}/{n}"))
                })
                .collect())
        });
        all.unwrap_or_else(|e| names.iter().map(|_| Err(e)).collect())
    }

    /// Under the lock like every operation: another process's change is seen
    /// whole or not at all.
    fn read_link(&self, path: &str) -> Result<String, Errno> {
        self.with(|k| {
            let p = k.t.resolve(path, false)?;
            match std::fs::read_link(k.t.host(&p)) {
                Ok(target) => target
                    .into_os_string()
                    .into_string()
                    .map_err(|_| Errno::EINVAL),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err(Errno::EINVAL),
                Err(e) => Err(Errno::from_io(&e)),
            }
        })
    }

    fn exists(&self, path: &str) -> bool {
        self.with(|k| k.t.resolve(path, false).is_ok_and(|p| k.t.lexists(&p)))
    }

    fn chown(&self, path: &str, uid: u32, gid: u32) -> Result<(), Errno> {
        self.with(|k| {
            let p = k.t.resolve(path, true)?;
            std::os::unix::fs::chown(k.t.host(&p), Some(uid), Some(gid))
                .map_err(|e| Errno::from_io(&e))
        })
    }

    fn chmod(&self, path: &str, mode: u32) -> Result<(), Errno> {
        use std::os::unix::fs::PermissionsExt;
        self.with(|k| {
            let p = k.t.resolve(path, true)?;
            std::fs::set_permissions(k.t.host(&p), std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| Errno::from_io(&e))
        })
    }

    fn set_vf_guid(
        &self,
        pf_netdev: &str,
        vf: u32,
        kind: GuidKind,
        guid: Guid,
    ) -> Result<(), Errno> {
        self.with(|k| k.set_vf_guid(pf_netdev, vf, kind, guid))
    }

    fn open_pf(&self, pf: Bdf, group: IommuGroupId) -> Result<Box<dyn PfHandle>, Errno> {
        Ok(Box::new(self.open_pf_handle(pf, group)?))
    }

    fn open_migration(&self, target: &MigTarget) -> Result<Box<dyn MigrationDevice>, Errno> {
        Ok(Box::new(self.open_migration_device(target)?))
    }
}

/// Attributes the kernel shows read-only (a write is refused with `EACCES`).
const READ_ONLY: &[&str] = &[
    "vendor",
    "device",
    "subsystem_vendor",
    "subsystem_device",
    "class",
    "revision",
    "modalias",
    "irq",
    "local_cpus",
    "local_cpulist",
    "sriov_totalvfs",
    "sriov_offset",
    "sriov_stride",
    "sriov_vf_device",
    "secondary_bus_number",
    "subordinate_bus_number",
    "reserved_regions",
    "name",
    "device_api",
    "available_instances",
    "description",
    "matrix",
    "guest_matrix",
    "control_domains",
    "status",
    "hwtype",
    "raw_hwtype",
    "ap_max_adapter_id",
    "ap_max_domain_id",
    "bindings",
    "node_guid",
    "node_type",
    "fw_ver",
    "state",
    "phys_state",
    "rate",
    "lid",
    "sm_lid",
    "lid_mask_count",
    "link_layer",
    "ifindex",
    "dev",
    "osrelease",
];

impl K<'_> {
    /// `read` of a resolved path: a file (not a directory), readable when under
    /// `/sys`, through the tree's bounded read.
    fn read_resolved(&self, p: &str) -> Result<Vec<u8>, Errno> {
        match self.t.kind_mode(p) {
            None => Err(Errno::ENOENT),
            Some((Kind::Dir, _)) => Err(tree::EISDIR),
            Some((_, m)) if p.starts_with("/sys/") && m & 0o444 == 0 => Err(Errno::EACCES),
            // A link left at the end (only in `read_each`, which does not resolve
            // the names): followed as `read` would.
            Some((Kind::Link, _)) => self.t.read(p),
            // Resolved already: no second walk of the path's links.
            Some((Kind::File, _)) => self.t.read_at(p),
        }
    }

    /// `write(2)` of `value` to `path`.
    fn write(&mut self, path: &str, value: &[u8]) -> Result<(), Errno> {
        let p = self.t.resolve(path, true)?;
        match self.t.kind(&p) {
            None => return Err(Errno::ENOENT),
            Some(Kind::Dir) => return Err(tree::EISDIR),
            _ => {}
        }
        let (dir, name) = split(&p);
        if !p.starts_with("/sys/") {
            return Err(Errno::EINVAL);
        }
        if READ_ONLY.contains(&name) || self.t.mode(&p).is_some_and(|m| m & 0o222 == 0) {
            return Err(Errno::EACCES);
        }
        // sysfs hands a zero-length write to no `store` method.
        if value.is_empty() {
            return Ok(());
        }
        if p == "/sys/bus/pci/drivers_probe" {
            return self.drivers_probe(value);
        }
        if let Some(drv) = dir.strip_prefix("/sys/bus/pci/drivers/")
            && !drv.contains('/')
        {
            match name {
                "bind" => return self.bind(drv, value),
                "unbind" => return self.unbind(drv, value),
                _ => {}
            }
        }
        if dir == "/sys/bus/ap" && (name == "apmask" || name == "aqmask") {
            return self.ap_mask(name == "apmask", value);
        }
        if let Some(bdf) = self.pci_at(dir) {
            match name {
                "driver_override" => return self.driver_override(dir, value),
                "sriov_numvfs" => return self.sriov_numvfs(bdf, dir, value),
                "sriov_drivers_autoprobe" => {
                    let on = num::kstrtobool(value)?;
                    return self.t.set(&p, if on { "1\n" } else { "0\n" });
                }
                "reset" => return self.reset(bdf, dir, value),
                "reset_method" => return self.reset_method(bdf, dir, value),
                "numa_node" => {
                    let n = num::kstrtoint(value)?;
                    return self.t.set(&p, format!("{n}\n"));
                }
                _ => {}
            }
        }
        if name == "create" && split(dir).0.ends_with("/mdev_supported_types") {
            return self.mdev_create(dir, value);
        }
        if name == "remove" && self.t.kind(&format!("{dir}/mdev_type")) == Some(Kind::Link) {
            return self.mdev_remove(dir, value);
        }
        if split(dir).0 == ap::MATRIX
            && let Some(op) = ap::AssignOp::from_name(name)
        {
            return self.ap_assign(dir, op, value);
        }
        if let Some(r) = self.ofed_write(dir, name, value) {
            return r;
        }
        if split(dir).1 == "parameters" && split(split(dir).0).0 == "/sys/module" {
            let cur = self.t.text(&p).unwrap_or_default();
            if cur == "Y" || cur == "N" {
                let on = num::kstrtobool(value)?;
                return self.t.set(&p, if on { "Y\n" } else { "N\n" });
            }
        }
        Err(Errno::EOPNOTSUPP)
    }

    /// Gives back what an open handle held.
    fn release(&mut self, held: Held, pf_user: Option<Bdf>) {
        match held {
            Held::Pci(b) => {
                dec(&mut self.s.opens, &b);
                if let Some(pf) = pf_user {
                    dec(&mut self.s.vf_users, &pf);
                }
            }
            Held::Mdev(u) => {
                dec(&mut self.s.mdev_opens, &u);
                // The queues of a vfio_ap mdev stop being "in use".
                let _ = self.ap_refresh_status_of(u);
            }
        }
    }
}

fn dec<T: std::hash::Hash + Eq>(m: &mut HashMap<T, u32>, k: &T) {
    if let Some(n) = m.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(k);
        }
    }
}
