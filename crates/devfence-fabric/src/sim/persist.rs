//! The simulated SM's state outside a process: [`SimSmState`] and
//! [`PersistentSimSm`].
//!
//! The simulated SM stands for an external process (OpenSM) that keeps running
//! between devfence invocations and survives a devfence crash. `devfence assign`,
//! `devfence handover` and `devfence recover` are separate processes, so the SM's
//! state lives in a file, and each process picks up where the last one left it —
//! with the time that passed in between: a sweep that fell due while no devfence
//! ran has run by the time the next one looks.
//!
//! What is kept and what is not: [`SimSmState`]. How processes share the file:
//! [`PersistentSimSm`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devfence_model::{Guid, PKey};
use serde::{Deserialize, Serialize};

use super::{Clock, Inner, Reorder, Running, SimConfig, SimEvent, SimSm, Snapshot};
use crate::{
    Change, ChangeId, FabricError, Generation, Health, MembershipMap, Observation, SmState,
    SmStatus, SubnetManager, Ticket,
};

/// The `format` of a state file this version reads and writes.
const FORMAT: &str = "devfence-simsm/1";

/// A state file larger than this is refused before it is parsed.
const MAX_BYTES: u64 = 64 << 20;

/// The hint of every failed read, write or lock.
const IO_HINT: &str =
    "check that the directory exists, has free space, and that this user may read and write it";

/// The hint of every unusable state file.
const DELETE_HINT: &str =
    "it is the simulated SM's state; delete it to start a fresh simulated fabric";

/// Everything of a [`SimSm`] that outlives a process, serializable.
///
/// Take it with [`SimSm::snapshot_state`]; bring it back with
/// [`SimSm::from_state`]. The fields are private: a state is whatever a `SimSm`
/// was, never assembled by hand.
///
/// What it holds: the configuration ([`SimConfig`]), the configured membership,
/// the ports on the fabric with their LIDs and the next LID, the SM's role, the
/// current and the previous sweep's snapshot (status, programmed tables,
/// configuration — the previous one is what a stale read serves), a requested or
/// running sweep (in sim time), freeze, the persistent fault knobs (a dropped or
/// held-back update, stale reads left, a failing sweep), the apply counter, and the
/// sim time.
///
/// What it does not:
///
/// - **Staged changes.** A process's unapplied batch dies with the process, as it
///   would with a crashed devfence: the SM never saw it. [`PersistentSimSm`] keeps
///   them in memory and pushes them into the SM in [`apply`](SubnetManager::apply).
/// - **The history** ([`SimSm::history`], [`SimSm::programmed_at`]): a restored SM
///   starts with an empty one (a real SM's log is not devfence's state either).
/// - **An injected error** ([`SimSm::error_next_call`]): it is a one-shot
///   [`FabricError`], which does not serialize. Through a [`PersistentSimSm`] it
///   still fires on that handle's next call, as long as no other handle changed the
///   file in between (the handle reuses its in-memory SM while the file holds what
///   it wrote last).
///
/// In a file (see [`PersistentSimSm`]) it is the `state` of
/// `{"format": "devfence-simsm/1", "saved_at_unix_ms": …, "state": {…}}`; its
/// durations are sim time (since the simulated SM came up), written as serde
/// writes a [`Duration`] (`{"secs": …, "nanos": …}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimSmState {
    config: ConfigState,
    /// Sim time when the state was taken.
    now: Duration,
    configured: MembershipMap,
    attached: BTreeSet<Guid>,
    lids: BTreeMap<Guid, u16>,
    next_lid: u16,
    sm_state: SmState,
    current: SnapshotState,
    previous: SnapshotState,
    /// When a sweep was requested (sim time), if one is and none runs yet.
    requested: Option<Duration>,
    running: Option<RunningState>,
    frozen: bool,
    resume_at: Duration,
    faults: FaultState,
    next_change: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigState {
    lag: Duration,
    sweep_time: Duration,
    default_partition: bool,
    report_configured: bool,
    auto_attach: bool,
}

impl From<SimConfig> for ConfigState {
    fn from(c: SimConfig) -> Self {
        // Destructured so that a new SimConfig field does not compile until it
        // is persisted too.
        let SimConfig {
            lag,
            sweep_time,
            default_partition,
            report_configured,
            auto_attach,
        } = c;
        Self {
            lag,
            sweep_time,
            default_partition,
            report_configured,
            auto_attach,
        }
    }
}

impl From<ConfigState> for SimConfig {
    fn from(c: ConfigState) -> Self {
        let ConfigState {
            lag,
            sweep_time,
            default_partition,
            report_configured,
            auto_attach,
        } = c;
        Self {
            lag,
            sweep_time,
            default_partition,
            report_configured,
            auto_attach,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotState {
    status: SmStatus,
    ports: BTreeMap<Guid, PortState>,
    configured: MembershipMap,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortState {
    lid: u16,
    pkeys: BTreeSet<PKey>,
}

impl From<&Snapshot> for SnapshotState {
    fn from(s: &Snapshot) -> Self {
        Self {
            status: s.status.clone(),
            ports: s
                .programmed
                .iter()
                .map(|(g, (lid, pkeys))| {
                    (
                        *g,
                        PortState {
                            lid: *lid,
                            pkeys: pkeys.clone(),
                        },
                    )
                })
                .collect(),
            configured: s.configured.clone(),
        }
    }
}

impl From<SnapshotState> for Snapshot {
    fn from(s: SnapshotState) -> Self {
        Self {
            status: s.status,
            programmed: s
                .ports
                .into_iter()
                .map(|(g, p)| (g, (p.lid, p.pkeys)))
                .collect(),
            configured: s.configured,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunningState {
    /// When the running sweep completes (sim time).
    ends: Duration,
    config: MembershipMap,
    attached: BTreeSet<Guid>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultState {
    drop_next_update: bool,
    stale_reads_left: u32,
    fail_next_sweep: bool,
    reorder: ReorderState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
enum ReorderState {
    Off,
    Armed,
    Holding {
        change: ChangeId,
        changes: Vec<Change>,
    },
}

impl SimSmState {
    /// The sim time at which the state was taken.
    #[must_use]
    pub fn now(&self) -> Duration {
        self.now
    }

    /// The generation of the last sweep completed before the state was taken.
    #[must_use]
    pub fn generation(&self) -> Generation {
        self.current.status.generation
    }

    /// The SM's configuration (lag, sweep time, …) when the state was taken.
    #[must_use]
    pub fn config(&self) -> SimConfig {
        self.config.clone().into()
    }

    /// True when a sweep was requested or running when the state was taken.
    #[must_use]
    pub fn sweep_pending(&self) -> bool {
        self.requested.is_some() || self.running.is_some()
    }
}

impl SimSm {
    /// Everything of this SM that outlives a process, after running the sweeps
    /// that are due. Staged changes, the history and an injected error are not
    /// part of it (see [`SimSmState`]).
    #[must_use]
    pub fn snapshot_state(&self) -> SimSmState {
        let mut i = self.lock();
        i.sync();
        let reorder = match &i.reorder {
            Reorder::Off => ReorderState::Off,
            Reorder::Armed => ReorderState::Armed,
            Reorder::Holding(change, changes) => ReorderState::Holding {
                change: *change,
                changes: changes.clone(),
            },
        };
        SimSmState {
            config: i.cfg.clone().into(),
            now: i.now,
            configured: i.configured.clone(),
            attached: i.attached.clone(),
            lids: i.lids.clone(),
            next_lid: i.next_lid,
            sm_state: i.state,
            current: i.current.as_ref().into(),
            previous: i.previous.as_ref().into(),
            requested: i.requested,
            running: i.running.as_ref().map(|r| RunningState {
                ends: r.ends,
                config: r.config.clone(),
                attached: r.attached.clone(),
            }),
            frozen: i.frozen,
            resume_at: i.resume_at,
            faults: FaultState {
                drop_next_update: i.drop_next,
                stale_reads_left: i.stale_left,
                fail_next_sweep: i.fail_next_sweep,
                reorder,
            },
            next_change: i.next_change,
        }
    }

    /// A real-time SM that continues from `state` as if `elapsed` had passed since
    /// it was taken (the wall-clock time between save and restore): its clock starts
    /// at the saved sim time plus `elapsed`, and every sweep that fell due in that
    /// gap has run, at the time it fell due, before this returns.
    ///
    /// Staged changes and the injected error start empty; the history starts with
    /// the sweeps of the gap.
    #[must_use]
    pub fn from_state(state: SimSmState, elapsed: Duration) -> SimSm {
        let SimSmState {
            config,
            now,
            configured,
            attached,
            lids,
            next_lid,
            sm_state,
            current,
            previous,
            requested,
            running,
            frozen,
            resume_at,
            faults,
            next_change,
        } = state;
        let reorder = match faults.reorder {
            ReorderState::Off => Reorder::Off,
            ReorderState::Armed => Reorder::Armed,
            ReorderState::Holding { change, changes } => Reorder::Holding(change, changes),
        };
        let mut inner = Inner {
            cfg: config.into(),
            clock: Clock::Real(Instant::now()),
            offset: now.saturating_add(elapsed),
            now,
            staged: Vec::new(),
            configured,
            attached,
            lids,
            // LID 0 is reserved and LID 1 is the SM's own port.
            next_lid: next_lid.max(2),
            state: sm_state,
            current: Arc::new(current.into()),
            previous: Arc::new(previous.into()),
            requested,
            running: running.map(|r| Running {
                ends: r.ends,
                config: r.config,
                attached: r.attached,
            }),
            frozen,
            resume_at,
            drop_next: faults.drop_next_update,
            stale_left: faults.stale_reads_left,
            fail_next_sweep: faults.fail_next_sweep,
            error_next: None,
            reorder,
            next_change,
            history: Vec::new(),
        };
        inner.log(SimEvent::Knob(format!("restored, {elapsed:?} after save")));
        inner.sync();
        SimSm {
            inner: Mutex::new(inner),
        }
    }
}

/// Why the simulated SM's state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SimStateError {
    /// Reading, writing or locking a file failed.
    #[error("Cannot {op} {}. Hint: {}", path.display(), IO_HINT)]
    Io {
        /// The file (or directory) the operation was on.
        path: PathBuf,
        /// What was tried, e.g. "read the simulated SM's state file".
        op: &'static str,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The state file is there but cannot be used (corrupt, truncated, an unknown
    /// format, or deleted while in use). It is left as it is: the simulated SM is
    /// never silently reset.
    #[error("The simulated SM's state file {} {detail}. Hint: {hint}", path.display())]
    Invalid {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
        /// What to do.
        hint: String,
    },
}

impl SimStateError {
    /// What the operator can do about it.
    #[must_use]
    pub fn hint(&self) -> &str {
        match self {
            SimStateError::Io { .. } => IO_HINT,
            SimStateError::Invalid { hint, .. } => hint,
        }
    }

    fn io(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> Self + use<> {
        let path = path.to_path_buf();
        move |source| SimStateError::Io { path, op, source }
    }

    fn invalid(path: &Path, detail: String) -> Self {
        SimStateError::Invalid {
            path: path.to_path_buf(),
            detail,
            hint: DELETE_HINT.into(),
        }
    }
}

impl From<SimStateError> for FabricError {
    /// An I/O error becomes [`FabricError::Os`] (or [`FabricError::Unreachable`]
    /// without an errno); an unusable file [`FabricError::Malformed`]. Both name
    /// the path.
    fn from(e: SimStateError) -> Self {
        let backend = "sim".to_string();
        let hint = e.hint().to_string();
        match e {
            SimStateError::Io { path, op, source } => match source.raw_os_error() {
                Some(errno) => FabricError::Os {
                    backend,
                    op: format!("{op} {}", path.display()),
                    errno,
                    hint,
                },
                None => FabricError::Unreachable {
                    backend,
                    detail: format!("cannot {op} {}: {source}", path.display()),
                    hint,
                },
            },
            SimStateError::Invalid { path, detail, .. } => FabricError::Malformed {
                backend,
                detail: format!("its state file {} {detail}", path.display()),
                hint,
            },
        }
    }
}

/// What the state file holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: String,
    /// Wall-clock time of the save, in milliseconds since the Unix epoch.
    saved_at_unix_ms: u64,
    state: SimSmState,
}

/// Just enough of a state file to tell its format.
#[derive(Deserialize)]
struct Probe {
    format: Option<serde_json::Value>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `path` with `suffix` appended to its file name (`sm.json` → `sm.json.lock`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A [`SimSm`] whose state lives in a file, so that it outlives the process — as
/// the SM it stands for outlives devfence. Implements [`SubnetManager`] by
/// delegating to a `SimSm` (a real-time one).
///
/// Every call that reaches the SM (stage, apply, observe, health, [`with`]) takes
/// an exclusive advisory lock (`flock`) on the sibling `<path>.lock`, loads the
/// state — reusing the SM in memory when the file holds exactly what this handle
/// wrote last, restoring it with the wall-clock time since the save otherwise —
/// runs, and saves: to `<path>.tmp`, fsync, rename over `<path>`, fsync the
/// directory; mode 0600. So handles in several processes (or threads) take turns
/// and never lose each other's updates.
///
/// Staged changes stay in this handle's memory (a process's unapplied batch dies
/// with it) and reach the SM in one [`apply`](SubnetManager::apply).
///
/// [`with`]: PersistentSimSm::with
#[derive(Debug)]
pub struct PersistentSimSm {
    path: PathBuf,
    tmp: PathBuf,
    lock_path: PathBuf,
    dir: PathBuf,
    lock: File,
    cache: Mutex<Option<Cached>>,
    staged: Mutex<Vec<Change>>,
}

/// The SM as this handle last saved it, with the bytes it wrote.
#[derive(Debug)]
struct Cached {
    bytes: Vec<u8>,
    sim: SimSm,
}

/// Holds the advisory lock until dropped.
struct Held<'a>(&'a File);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Closing the lock file would release it too; an unlock error leaves
        // nothing to do.
        let _ = self.0.unlock();
    }
}

impl PersistentSimSm {
    /// The `"format"` of the state files this version reads and writes.
    pub const FORMAT: &'static str = FORMAT;

    /// Opens the simulated SM whose state is at `path`. Absent: a fresh SM with
    /// `default` (real-time clock, its first sweep due `lag` from now) is created
    /// and written. Present: it is loaded, with the wall-clock time since its save
    /// (none, if the clock went backwards) having passed; `default` is ignored.
    ///
    /// # Errors
    /// [`SimStateError::Invalid`] for a corrupt, truncated or unknown-format file
    /// (which is left as it is); [`SimStateError::Io`] when a file cannot be read,
    /// written or locked.
    pub fn open(path: &Path, default: SimConfig) -> Result<Self, SimStateError> {
        let path = path.to_path_buf();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = sibling(&path, ".tmp");
        let lock_path = sibling(&path, ".lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(SimStateError::io(
                &lock_path,
                "open the simulated SM's lock file",
            ))?;
        let this = Self {
            path,
            tmp,
            lock_path,
            dir,
            lock,
            cache: Mutex::new(None),
            staged: Mutex::new(Vec::new()),
        };
        {
            let mut cache = this.cache();
            let _held = this.hold()?;
            match this.read()? {
                Some(bytes) => {
                    let sim = this.decode(&bytes)?;
                    *cache = Some(Cached { bytes, sim });
                }
                None => this.save(&mut cache, SimSm::real_time(default))?,
            }
        }
        Ok(this)
    }

    /// The state file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the simulated SM under the lock, between a load and a save: the
    /// way to turn its knobs ([`set_lag`](SimSm::set_lag), [`freeze`](SimSm::freeze),
    /// [`attach`](SimSm::attach), [`settle`](SimSm::settle), …) or read its ground
    /// truth. `f` must not call back into this handle (it would deadlock).
    ///
    /// # Errors
    /// As [`open`](Self::open), and [`SimStateError::Invalid`] if the file was
    /// deleted since. When the save fails, whatever `f` did is lost.
    pub fn with<R>(&self, f: impl FnOnce(&SimSm) -> R) -> Result<R, SimStateError> {
        let mut cache = self.cache();
        let _held = self.hold()?;
        let Some(bytes) = self.read()? else {
            *cache = None;
            return Err(SimStateError::Invalid {
                path: self.path.clone(),
                detail: "is gone: it was deleted while devfence was using it".into(),
                hint: "run the command again; opening the simulated SM anew starts a fresh \
                       simulated fabric"
                    .into(),
            });
        };
        let sim = match cache.take() {
            Some(c) if c.bytes == bytes => c.sim,
            _ => self.decode(&bytes)?,
        };
        let r = f(&sim);
        self.save(&mut cache, sim)?;
        Ok(r)
    }

    fn cache(&self) -> MutexGuard<'_, Option<Cached>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn staged(&self) -> MutexGuard<'_, Vec<Change>> {
        self.staged.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn hold(&self) -> Result<Held<'_>, SimStateError> {
        self.lock.lock().map_err(SimStateError::io(
            &self.lock_path,
            "lock the simulated SM's lock file",
        ))?;
        Ok(Held(&self.lock))
    }

    /// The file's bytes, or `None` when there is no file.
    fn read(&self) -> Result<Option<Vec<u8>>, SimStateError> {
        const OP: &str = "read the simulated SM's state file";
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SimStateError::io(&self.path, OP)(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(SimStateError::io(&self.path, OP))?;
        if bytes.len() as u64 > MAX_BYTES {
            return Err(SimStateError::invalid(
                &self.path,
                format!("is larger than {MAX_BYTES} bytes, far more than any simulated SM state"),
            ));
        }
        Ok(Some(bytes))
    }

    /// Restores the SM from a file's bytes, with the time since it was saved.
    fn decode(&self, bytes: &[u8]) -> Result<SimSm, SimStateError> {
        let bad = |detail: String| SimStateError::invalid(&self.path, detail);
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(bad("is empty (truncated?)".into()));
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| {
            bad(format!(
                "is not a JSON object, so it is corrupt or truncated ({e})"
            ))
        })?;
        match probe.format {
            None => {
                return Err(bad(format!(
                    "has no \"format\" field: it is not a simulated SM state (expected \
                     \"format\": \"{FORMAT}\")"
                )));
            }
            Some(serde_json::Value::String(f)) if f == FORMAT => {}
            Some(other) => {
                return Err(SimStateError::Invalid {
                    path: self.path.clone(),
                    detail: format!(
                        "has format {other}, which this devfence does not read (it reads \
                         \"{FORMAT}\")"
                    ),
                    hint: format!("{DELETE_HINT}, or use the devfence version that wrote it"),
                });
            }
        }
        let file: StateFile = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("does not decode as {FORMAT}: {e}")))?;
        let elapsed = Duration::from_millis(unix_ms().saturating_sub(file.saved_at_unix_ms));
        Ok(SimSm::from_state(file.state, elapsed))
    }

    /// Writes `sim`'s state atomically and keeps `sim` as the cached SM. On error
    /// the cache is left empty, so the next call loads the file again.
    fn save(&self, cache: &mut Option<Cached>, sim: SimSm) -> Result<(), SimStateError> {
        *cache = None;
        let file = StateFile {
            format: FORMAT.into(),
            saved_at_unix_ms: unix_ms(),
            state: sim.snapshot_state(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| SimStateError::Io {
            path: self.path.clone(),
            op: "encode the simulated SM's state for",
            source: e.into(),
        })?;
        bytes.push(b'\n');
        self.write(&bytes)?;
        *cache = Some(Cached { bytes, sim });
        Ok(())
    }

    fn write(&self, bytes: &[u8]) -> Result<(), SimStateError> {
        const OP: &str = "write the simulated SM's new state file";
        // A leftover of a crashed save (or anything else there) goes; the new file
        // is created exclusively, so it is ours and not a link to elsewhere.
        match fs::remove_file(&self.tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SimStateError::io(&self.tmp, OP)(e)),
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.tmp)
            .map_err(SimStateError::io(&self.tmp, OP))?;
        f.set_permissions(Permissions::from_mode(0o600))
            .map_err(SimStateError::io(&self.tmp, OP))?;
        f.write_all(bytes)
            .map_err(SimStateError::io(&self.tmp, OP))?;
        f.sync_all().map_err(SimStateError::io(&self.tmp, OP))?;
        drop(f);
        fs::rename(&self.tmp, &self.path).map_err(SimStateError::io(
            &self.path,
            "move the new state into place as the simulated SM's state file",
        ))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(SimStateError::io(
                &self.dir,
                "sync the directory of the simulated SM's state",
            ))?;
        Ok(())
    }
}

impl SubnetManager for PersistentSimSm {
    fn backend(&self) -> &str {
        "sim"
    }

    fn configured_members(&self) -> Result<Option<Vec<crate::posture::Configured>>, FabricError> {
        self.with(SubnetManager::configured_members)
            .map_err(|e| FabricError::Unreachable {
                backend: "sim".into(),
                detail: e.to_string(),
                hint: e.hint().to_string(),
            })?
    }

    fn stage(&self, change: Change) -> Result<(), FabricError> {
        // Through the SM, for its validation, injected errors and history; the
        // change itself stays with this handle until apply.
        let c = change.clone();
        self.with(|sm| {
            sm.stage(c)?;
            sm.lock().staged.clear();
            Ok::<_, FabricError>(())
        })??;
        self.staged().push(change);
        Ok(())
    }

    fn discard_staged(&self) -> usize {
        let mut staged = self.staged();
        let n = staged.len();
        staged.clear();
        n
    }

    fn apply(&self) -> Result<Ticket, FabricError> {
        let mut staged = self.staged();
        let batch = staged.clone();
        let ticket = self.with(|sm| {
            sm.lock().staged = batch;
            let r = sm.apply();
            // Emptied by a successful apply; after an error the batch stays with
            // this handle, not in the SM.
            sm.lock().staged.clear();
            r
        })??;
        staged.clear();
        Ok(ticket)
    }

    fn observe(&self, guids: &[Guid]) -> Result<Observation, FabricError> {
        self.with(|sm| sm.observe(guids))?
    }

    fn health(&self) -> Result<Health, FabricError> {
        self.with(SubnetManager::health)?
    }
}

#[cfg(test)]
mod tests;
