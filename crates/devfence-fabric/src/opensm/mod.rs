//! The OpenSM backend: devfence drives OpenSM through its partitions file and
//! verifies through its SA.
//!
//! | step | what happens |
//! |---|---|
//! | `stage` | kept in memory |
//! | `apply` | under a lock: read the partitions file, parse it ([`partitions`]), refuse it if OpenSM could misread it, apply the staged changes to devfence's block, render, parse the result again, keep the last good file, replace atomically, `SIGHUP` OpenSM; ticket = the `SUBNET UP` count before the signal + 1 |
//! | `observe` | the log first ([`log`]: role, sweeps, errors; process alive and not stopped), then per GUID the SA ([`sa`]): NodeRecord by port GUID → LID, PKeyTableRecord(s) → the acknowledged table; the configured view from the file |
//! | `health` | process, role, last sweep, version, notes |
//!
//! **Why "`SUBNET UP` count + 1" is enough.** A heavy sweep that was already past
//! P_Key setup when the signal came can log its `SUBNET UP` after it, so question
//! 3 may pass one sweep early. Questions 1 and 2 cannot: they are read per port
//! from the SA, which holds what each port acknowledged. Such an early pass leaves
//! the gate waiting for the SA to show the new tables, which only the sweep the
//! signal forced can produce. OpenSM's log does not say when a sweep started, so
//! devfence does not pretend to know.
//!
//! **devfence's block comes from devfence, never from a file.** The membership
//! devfence manages is kept in its memo (`<file>.devfence.json`): every `apply`
//! renders the block from it plus the staged changes — not from the block found
//! in the file, which an operator's restore, an old backup or a hand edit may have
//! changed.
//!
//! **A parse error.** If OpenSM logs `PARSE ERROR` (it then falls back to the
//! default configuration: every port a full member of the default partition),
//! the sweep counts as failed — no gate opens on it — and `observe` restores: the
//! operator's **last parseable text** (`<file>.devfence-last-good`, refreshed
//! whenever devfence reads a file that parses) with devfence's **current** block
//! rendered into it, keeps the refused file as `<file>.devfence-rejected`, records
//! the restore in the memo (reported by `health`, so by `devfence status` in any
//! process), signals OpenSM and, at the next clean sweep, re-verifies at the SA
//! that every port devfence manages holds its partitions.

pub mod fence;
pub mod log;
pub mod mad;
pub mod partitions;
pub mod sa;
mod umad;
pub mod user_ext;

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use devfence_model::{Guid, PKey};
use sha2::{Digest as _, Sha256};

use crate::posture::{Configured, Member};
use crate::{
    Change, ChangeId, FabricError, Generation, Health, MembershipMap, Observation, PortReader,
    PortView, SmState, SmStatus, SubnetManager, SweepOutcome, Ticket,
};
pub use sa::{SaClient, SaConfig, port_tables};
pub use user_ext::{DEFAULT_MERGE_TIMEOUT_MS, ModeInUse, PartitionsMode};

const BACKEND: &str = "opensm";

/// How a `health` note about a restore begins (`check --fabric` reports them).
pub const RESTORE_NOTE: &str = "restore at generation";

/// Where OpenSM's files are and how to reach its SA.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenSmConfig {
    /// OpenSM's `partition_config_file`.
    pub partitions_file: PathBuf,
    /// OpenSM's `log_file` (OpenSM must run with `force_log_flush TRUE`).
    pub log_file: PathBuf,
    /// A file holding OpenSM's PID; without one, devfence looks for the one
    /// process named `opensm`.
    pub pid_file: Option<PathBuf>,
    /// How to reach the SA.
    pub sa: SaConfig,
    /// Where devfence writes its block: OpenSM's partitions file (`direct`),
    /// UFM's `partitions.conf.user_ext` merged by UFM (`ufm-user-ext`), or
    /// detected (`auto`); see [`user_ext`].
    pub partitions_mode: PartitionsMode,
    /// UFM's extension file (default: UFM's layout beside the partitions
    /// file's `opensm/` directory, else `<partitions_file>.user_ext`).
    pub ufm_user_ext_file: Option<PathBuf>,
    /// The command that has UFM merge the extension file into the partitions
    /// file (argv, run without a shell).
    pub ufm_merge_command: Option<Vec<String>>,
    /// How long the merge command may run, in milliseconds.
    pub ufm_merge_timeout_ms: u64,
}

impl Default for OpenSmConfig {
    fn default() -> Self {
        Self {
            partitions_file: PathBuf::from("/etc/opensm/partitions.conf"),
            log_file: PathBuf::from("/var/log/opensm.log"),
            pid_file: None,
            sa: SaConfig::default(),
            partitions_mode: PartitionsMode::default(),
            ufm_user_ext_file: None,
            ufm_merge_command: None,
            ufm_merge_timeout_ms: DEFAULT_MERGE_TIMEOUT_MS,
        }
    }
}

/// One read of OpenSM's process and log.
struct SmRead {
    status: SmStatus,
    notes: Vec<String>,
    version: Option<String>,
    /// OpenSM's PID, if it runs.
    pid: Option<i32>,
}

/// One restore devfence made after OpenSM could not parse the partitions file
/// (kept in the memo, reported by `health`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreNote {
    /// When (seconds since the epoch).
    pub at_unix: u64,
    /// The `SUBNET UP` count of the failed sweep.
    pub generation: u64,
    /// What OpenSM logged.
    pub reason: String,
    /// What the restored file is made of.
    pub restored: String,
    /// The outcome of the re-verification at the SA after the restore (`None`:
    /// pending).
    pub reverified: Option<String>,
    /// True when the re-verification found a port without its partitions.
    #[serde(default)]
    pub failed: bool,
}

impl RestoreNote {
    /// A stable id of this restore (the failed sweep's count and the time: the
    /// count alone restarts with OpenSM), for recording it once.
    #[must_use]
    pub fn id(&self) -> String {
        format!("{}@{}", self.generation, self.at_unix)
    }
}

/// What devfence remembers next to the partitions file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Memo {
    format: String,
    /// The last apply's serial.
    serial: u64,
    /// SHA-256 of the file devfence last wrote.
    written: String,
    /// SHA-256 of the file last seen parseable (saved as last-good).
    confirmed: String,
    /// The `SUBNET UP` count when devfence last signalled OpenSM: only a sweep
    /// after it can be blamed on (or credited to) the file devfence wrote.
    #[serde(default)]
    signalled_at: u64,
    /// The membership devfence manages, as it last applied it: the block is
    /// always rendered from this (plus staged changes), never from the file.
    /// `None` only in a memo written before devfence kept it (the file's block
    /// is then adopted once).
    #[serde(default)]
    desired: Option<MembershipMap>,
    /// The last restores (at most 16).
    #[serde(default)]
    restores: Vec<RestoreNote>,
    /// Re-verify devfence's ports at the first clean sweep after this count
    /// (kept while the re-verification fails: tried again at each new sweep).
    #[serde(default)]
    reverify_after: Option<u64>,
    /// The `SUBNET UP` count of the last re-verification tried.
    #[serde(default)]
    reverify_tried: u64,
    /// SHA-256 of a parseable file devfence signalled OpenSM to re-read after a
    /// parse error (once: if OpenSM refuses it again, devfence restores).
    #[serde(default)]
    resignalled: String,
}

const MEMO_FORMAT: &str = "devfence-opensm/2";
const MEMO_FORMATS: [&str; 2] = ["devfence-opensm/1", MEMO_FORMAT];
/// The largest state file (memo, log cursor) devfence reads.
const MAX_STATE: u64 = 4 << 20;
/// The largest PID file devfence reads.
const MAX_PID_FILE: u64 = 64;
/// The largest /proc/PID/stat devfence reads.
const MAX_PROC_STAT: u64 = 4096;
/// Linux `O_NONBLOCK` and `O_NOFOLLOW` (the latter differs on Arm).
const O_NONBLOCK: i32 = 0o4000;
#[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
const O_NOFOLLOW: i32 = 0o100000;
#[cfg(not(any(target_arch = "aarch64", target_arch = "arm")))]
const O_NOFOLLOW: i32 = 0o400000;
/// How often `apply` redoes its work when the file changes under it.
const APPLY_ATTEMPTS: usize = 3;

/// Reads a regular file of at most `cap` bytes without following a symlink at
/// its last component and without blocking on a FIFO. `Ok(None)`: no such file.
fn read_capped(path: &Path, cap: u64) -> std::io::Result<Option<(Vec<u8>, std::fs::Metadata)>> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK | O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(40) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "is a symbolic link (devfence does not follow it)",
            ));
        }
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is not a regular file",
        ));
    }
    if meta.len() > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("is {} bytes, over the {cap}-byte limit", meta.len()),
        ));
    }
    let mut buf = Vec::new();
    f.take(cap + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("grew over the {cap}-byte limit while read"),
        ));
    }
    Ok(Some((buf, meta)))
}

/// The partitions file as read: its text and what identifies this version of it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snapshot {
    text: String,
    /// Device, inode, mtime (ns), length; `None`: no file.
    id: Option<(u64, u64, i128, u64)>,
}

/// The OpenSM backend of [`SubnetManager`].
pub struct OpenSmSm {
    cfg: OpenSmConfig,
    staged: Mutex<Vec<Change>>,
    /// The log cursor (`None`: not loaded from its state file yet).
    log: Mutex<Option<log::LogCursor>>,
    reader: Box<dyn PortReader>,
    notes: Mutex<Vec<String>>,
    /// A memo devfence could not save after OpenSM took a change: used instead of
    /// the file's until it is saved.
    unsaved: Mutex<Option<Memo>>,
    /// Called just before the new partitions file replaces the old one (tests
    /// use it to edit the file concurrently).
    before_replace: Mutex<Option<ReplaceHook>>,
    /// The fabric controller's fencing token ([`fence`]; 0: none).
    fence: std::sync::atomic::AtomicU64,
}

type ReplaceHook = Box<dyn FnMut(&Path) + Send>;

impl std::fmt::Debug for OpenSmSm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenSmSm")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn sibling(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn sha(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn os(op: &str, path: &Path, e: &std::io::Error, hint: &str) -> FabricError {
    FabricError::Os {
        backend: BACKEND.into(),
        op: format!("{op} {}", path.display()),
        errno: e.raw_os_error().unwrap_or(0),
        hint: hint.into(),
    }
}

/// A temporary name beside `path`, unique to this process and call (two
/// processes must never write one temp file).
fn tmp_name(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    sibling(path, &format!(".devfence-tmp.{}.{n}", std::process::id()))
}

/// Writes `text` to `path` atomically: temp file, fsync, rename, fsync the directory.
fn write_atomic(path: &Path, text: &str) -> Result<(), FabricError> {
    let tmp = tmp_name(path);
    let hint = "check that devfence runs as root and the directory is writable and not full";
    let r = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(d) = path.parent() {
            File::open(if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            })?
            .sync_all()?;
        }
        Ok(())
    })();
    r.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        os("write", path, &e, hint)
    })
}

/// OpenSM's process as seen in /proc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Proc {
    pid: i32,
    /// The state letter of /proc/PID/stat (R, S, D, T, t, Z, …).
    state: char,
    /// Its start time (clock ticks since boot): a restart changes it.
    start: u64,
}

/// A process's name, state letter and start time (clock ticks since boot),
/// from a size-capped read of /proc/PID/stat.
fn proc_state(pid: i32) -> Option<(String, char, u64)> {
    let (bytes, _) = read_capped(Path::new(&format!("/proc/{pid}/stat")), MAX_PROC_STAT)
        .ok()
        .flatten()?;
    let stat = String::from_utf8_lossy(&bytes);
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let rest = stat.get(close + 1..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 22 of stat is the start time; `rest` starts at field 3.
    let start = fields.nth(18)?.parse().ok()?;
    Some((comm, state, start))
}

impl OpenSmSm {
    /// A backend over `cfg`, verifying through the SA over libibumad.
    #[must_use]
    pub fn new(cfg: OpenSmConfig) -> Self {
        let reader = Box::new(SaClient::new(cfg.sa.clone()));
        Self::with_port_reader(cfg, reader)
    }

    /// A backend that reads port tables through `reader`.
    #[must_use]
    pub fn with_port_reader(cfg: OpenSmConfig, reader: Box<dyn PortReader>) -> Self {
        Self {
            cfg,
            staged: Mutex::new(Vec::new()),
            log: Mutex::new(None),
            reader,
            notes: Mutex::new(Vec::new()),
            unsaved: Mutex::new(None),
            before_replace: Mutex::new(None),
            fence: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &OpenSmConfig {
        &self.cfg
    }

    fn memo_path(&self) -> PathBuf {
        sibling(&self.cfg.partitions_file, ".devfence.json")
    }
    /// Where the last file that swept cleanly is kept.
    #[must_use]
    pub fn last_good_path(&self) -> PathBuf {
        sibling(&self.cfg.partitions_file, ".devfence-last-good")
    }
    /// Where a file OpenSM refused is kept after devfence restored the last good one.
    #[must_use]
    pub fn rejected_path(&self) -> PathBuf {
        sibling(&self.cfg.partitions_file, ".devfence-rejected")
    }

    fn file_lock(&self) -> Result<File, FabricError> {
        let p = sibling(&self.cfg.partitions_file, ".devfence.lock");
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(|e| {
                os(
                    "open the lock file",
                    &p,
                    &e,
                    "run devfence as root; check the directory of the partitions file",
                )
            })?;
        f.lock()
            .map_err(|e| os("lock", &p, &e, "another devfence is applying; retry"))?;
        Ok(f)
    }

    /// Where the log cursor is kept.
    fn cursor_path(&self) -> PathBuf {
        sibling(&self.cfg.partitions_file, ".devfence-log.json")
    }

    /// Sets a function called just before the new partitions file replaces the
    /// old one (for tests of concurrent edits and failing writes).
    #[doc(hidden)]
    pub fn set_before_replace(&self, f: impl FnMut(&Path) + Send + 'static) {
        *lock(&self.before_replace) = Some(Box::new(f));
    }

    fn fence_token_set(&self) -> Option<u64> {
        match self.fence.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            t => Some(t),
        }
    }

    /// `text` with this backend's fencing token, if it has one.
    fn fenced(&self, text: String) -> String {
        match self.fence_token_set() {
            Some(t) => fence::with_token(&text, t),
            None => text,
        }
    }

    /// Refuses to replace `text` when it holds a newer token than ours.
    fn check_fence(&self, text: &str) -> Result<(), FabricError> {
        fence::check(fence::token_in(text)?, self.fence_token_set())
    }

    fn memo(&self) -> Result<Memo, FabricError> {
        if let Some(m) = lock(&self.unsaved).clone() {
            return Ok(m);
        }
        let p = self.memo_path();
        let bad = |detail: String, hint: &str| FabricError::Malformed {
            backend: BACKEND.into(),
            detail,
            hint: hint.into(),
        };
        match read_capped(&p, MAX_STATE) {
            Ok(Some((bytes, _))) => {
                let m: Memo = serde_json::from_slice(&bytes).map_err(|e| {
                    bad(format!("{}: {e}", p.display()), "the file is devfence's memo of its last apply; move it aside and retry (a fresh one is written)")
                })?;
                if !MEMO_FORMATS.contains(&m.format.as_str()) {
                    return Err(bad(
                        format!(
                            "{}: format {:?}, expected {MEMO_FORMAT:?}",
                            p.display(),
                            m.format
                        ),
                        "written by another devfence version; move it aside and retry",
                    ));
                }
                Ok(m)
            }
            Ok(None) => Ok(Memo {
                format: MEMO_FORMAT.into(),
                ..Memo::default()
            }),
            Err(e) => Err(os(
                "read",
                &p,
                &e,
                "run devfence as root; the memo must be a regular file",
            )),
        }
    }

    fn save_memo(&self, m: &Memo) -> Result<(), FabricError> {
        let mut m = m.clone();
        m.format = MEMO_FORMAT.into();
        let text = serde_json::to_string_pretty(&m).map_err(|e| FabricError::Malformed {
            backend: BACKEND.into(),
            detail: e.to_string(),
            hint: "bug".into(),
        })?;
        write_atomic(&self.memo_path(), &text)?;
        *lock(&self.unsaved) = None;
        Ok(())
    }

    /// The partitions file as it is now. A symlink is refused: devfence replaces
    /// the file by a rename, which would put a regular file in the link's place
    /// and leave the file it points to — the one OpenSM may read — stale.
    fn snapshot(&self) -> Result<Snapshot, FabricError> {
        let p = &self.cfg.partitions_file;
        if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(FabricError::Refused {
                backend: BACKEND.into(),
                detail: format!("{} is a symbolic link", p.display()),
                hint: "devfence replaces the partitions file atomically (write, rename), which would replace the link by a regular file and leave its target stale: point OpenSM's partition_config_file and [fabric.opensm] partitions_file at the real file".into(),
            });
        }
        let (bytes, meta) = match read_capped(p, partitions::MAX_FILE as u64) {
            Ok(Some(x)) => x,
            Ok(None) => {
                return Ok(Snapshot {
                    text: String::new(),
                    id: None,
                });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                ) =>
            {
                return Err(FabricError::Refused {
                    backend: BACKEND.into(),
                    detail: format!("{} {e}", p.display()),
                    hint: "that is not a partitions file devfence will rewrite; check partition_config_file".into(),
                });
            }
            Err(e) => return Err(os("read", p, &e, "run devfence as root")),
        };
        let text = String::from_utf8(bytes).map_err(|e| FabricError::Refused {
            backend: BACKEND.into(),
            detail: format!(
                "{} is not UTF-8 text (byte {})",
                p.display(),
                e.utf8_error().valid_up_to()
            ),
            hint: "fix the file by hand; devfence does not rewrite a file it cannot read".into(),
        })?;
        let mtime = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        Ok(Snapshot {
            text,
            id: Some((meta.dev(), meta.ino(), mtime, meta.len())),
        })
    }

    fn read_file(&self) -> Result<String, FabricError> {
        Ok(self.snapshot()?.text)
    }

    fn refused_file(&self, what: &str, e: &partitions::PartitionsError) -> FabricError {
        FabricError::Refused {
            backend: BACKEND.into(),
            detail: format!("{what} {}: {e}", self.cfg.partitions_file.display()),
            hint: "nothing was written and OpenSM was not signalled. A partitions file OpenSM cannot parse makes it fall back to the default configuration, where every port is a full member of the default partition; fix the line, then retry".into(),
        }
    }

    fn process(&self) -> Result<Option<Proc>, FabricError> {
        if let Some(pf) = &self.cfg.pid_file {
            let t = match read_capped(pf, MAX_PID_FILE) {
                Ok(Some((b, _))) => String::from_utf8_lossy(&b).into_owned(),
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(os(
                        "read",
                        pf,
                        &e,
                        "check [fabric.opensm] pid_file (a regular file of a few bytes)",
                    ));
                }
            };
            let pid: i32 = t.trim().parse().map_err(|_| FabricError::Malformed {
                backend: BACKEND.into(),
                detail: format!(
                    "{} holds {:?}, not a PID",
                    pf.display(),
                    t.trim().chars().take(20).collect::<String>()
                ),
                hint: "check [fabric.opensm] pid_file".into(),
            })?;
            return Ok(match proc_state(pid) {
                Some((comm, state, start)) if comm == "opensm" && state != 'Z' && state != 'X' => {
                    Some(Proc { pid, state, start })
                }
                _ => None,
            });
        }
        let mut found = Vec::new();
        let dir = std::fs::read_dir("/proc")
            .map_err(|e| os("list", Path::new("/proc"), &e, "is /proc mounted?"))?;
        for ent in dir.flatten() {
            let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some((comm, state, start)) = proc_state(pid)
                && comm == "opensm"
                && state != 'Z'
                && state != 'X'
            {
                found.push(Proc { pid, state, start });
            }
        }
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            many => Err(FabricError::Refused {
                backend: BACKEND.into(),
                detail: format!(
                    "{} processes are named opensm (PIDs {:?})",
                    many.len(),
                    many.iter().map(|p| p.pid).collect::<Vec<_>>()
                ),
                hint: "set [fabric.opensm] pid_file to the one that uses this partitions file"
                    .into(),
            }),
        }
    }

    /// Reads the log's news through the persistent cursor.
    fn read_log(&self, proc: Option<Proc>) -> Result<log::LogState, FabricError> {
        let mut guard = lock(&self.log);
        if guard.is_none() {
            let loaded = match read_capped(&self.cursor_path(), MAX_STATE) {
                Ok(Some((b, _))) => serde_json::from_slice::<log::LogCursor>(&b).ok(),
                _ => None,
            };
            // A lost cursor starts at the count devfence last signalled at, so
            // the memo's "signalled at" stays comparable.
            *guard = Some(loaded.unwrap_or_else(|| {
                log::LogCursor::based_at(self.memo().map_or(0, |m| m.signalled_at))
            }));
        }
        let Some(cursor) = guard.as_mut() else {
            return Err(FabricError::Malformed {
                backend: BACKEND.into(),
                detail: "no log cursor".into(),
                hint: "bug".into(),
            });
        };
        let before = cursor.clone();
        cursor
            .read(&self.cfg.log_file, proc.map(|p| (p.pid, p.start)))
            .map_err(|e| {
                os(
                    "read",
                    &self.cfg.log_file,
                    &e,
                    "check [fabric.opensm] log_file (OpenSM's log_file, a regular file, with force_log_flush TRUE)",
                )
            })?;
        if *cursor != before
            && let Ok(text) = serde_json::to_string(&*cursor)
        {
            // Losing the cursor costs a re-read of the log's tail, not
            // correctness: written without fsync.
            let tmp = tmp_name(&self.cursor_path());
            if std::fs::write(&tmp, text).is_ok()
                && std::fs::rename(&tmp, self.cursor_path()).is_err()
            {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        let mut st = cursor.state.clone();
        if let Some(reason) = &cursor.rebase_reason
            && before.rebase_reason.as_ref() != Some(reason)
            && before.file.is_some()
        {
            self.note(format!(
                "OpenSM's log: {reason}; sweeps are counted on from {}",
                st.subnet_up
            ));
        }
        st.pending_errors.truncate(8);
        Ok(st)
    }

    /// The SM's status from its process, the SM's own SMInfo and the log.
    fn status(&self) -> Result<SmRead, FabricError> {
        let proc = self.process()?;
        let st = self.read_log(proc)?;
        let mut notes = Vec::new();
        let state = match proc {
            None => {
                notes.push("OpenSM is not running".to_owned());
                SmState::NotActive
            }
            Some(p) if p.state == 'T' || p.state == 't' => {
                notes.push(format!(
                    "OpenSM (PID {}) is stopped: it answers nothing and sweeps nothing",
                    p.pid
                ));
                SmState::NotActive
            }
            // The role comes from the SM (its SMInfoRecord at the SA), not from a
            // log line it writes once: a rotated log forgets it.
            Some(_) => {
                match self.reader.local_sm_state() {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        notes.push("the SM's role is read from its log (this port reader cannot read SMInfo)".into());
                        st.role.unwrap_or(SmState::Unknown)
                    }
                    Err(e) => {
                        notes.push(format!("cannot read the SM's role at the SA: {e}"));
                        SmState::Unknown
                    }
                }
            }
        };
        let mut sweep = st.last.clone().unwrap_or(SweepOutcome::NoneYet);
        if let Some(d) = st.duplicate_guid() {
            // OpenSM loops on a duplicated GUID without ever logging SUBNET UP:
            // the last clean sweep is history, not the fabric's state.
            sweep = SweepOutcome::Errors(format!("OpenSM's sweeps fail and none completes: {d}"));
            notes.push(
                "a duplicated GUID stops OpenSM's sweeps: find the second port (`ibnetdiscover`)"
                    .into(),
            );
        }
        if !st.pending_errors.is_empty() {
            notes.push(format!(
                "errors since the last SUBNET UP: {}",
                st.pending_errors.join(" | ")
            ));
        }
        Ok(SmRead {
            status: SmStatus {
                state,
                generation: Generation(st.subnet_up),
                sweep,
            },
            notes,
            version: st.version,
            pid: proc.map(|p| p.pid),
        })
    }

    /// After a sweep: remember a parseable file as the operator's last good text,
    /// or restore after OpenSM could not parse what it read. Returns the file as
    /// it now is.
    fn settle_file(&self, status: &SmStatus, pid: Option<i32>) -> Result<String, FabricError> {
        if self.mode_in_use().is_user_ext() {
            return self.settle_user_ext(status, pid);
        }
        let _guard = self.file_lock()?;
        let mut memo = self.memo()?;
        let mut text = self.read_file()?;
        let now = sha(&text);
        let parse_error = matches!(&status.sweep, SweepOutcome::Errors(e)
            if e.contains("PARSE ERROR") || e.contains("Partition configuration"))
            && status.generation.0 > memo.signalled_at;
        if !parse_error && parses_to_something(&text) && memo.confirmed != now {
            write_atomic(&self.last_good_path(), &text)?;
            memo.confirmed = now.clone();
            self.save_memo(&memo)?;
        }
        match &status.sweep {
            SweepOutcome::Errors(e) if parse_error => {
                if parses_to_something(&text) && memo.resignalled != now {
                    // The file parses now (the operator fixed it, or wrote it
                    // after the sweep): have OpenSM read it once more.
                    memo.signalled_at = status.generation.0;
                    memo.resignalled = now;
                    self.save_memo(&memo)?;
                    self.note(format!(
                        "OpenSM could not parse {} ({e}); the file parses now, devfence asked OpenSM to read it again",
                        self.cfg.partitions_file.display()
                    ));
                    if let Some(pid) = pid {
                        hup(pid)?;
                    }
                    return Ok(text);
                }
                let restored = self.restore_text(&memo, &text);
                if sha(&restored.0) != now {
                    write_atomic(&self.rejected_path(), &text)?;
                    write_atomic(&self.cfg.partitions_file, &restored.0)?;
                    text.clone_from(&restored.0);
                    memo.written = sha(&restored.0);
                    memo.signalled_at = status.generation.0;
                    memo.reverify_after = Some(status.generation.0);
                    if memo.restores.len() >= 16 {
                        memo.restores.remove(0);
                    }
                    memo.restores.push(RestoreNote {
                        at_unix: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                        generation: status.generation.0,
                        reason: e.chars().take(300).collect(),
                        restored: restored.1,
                        reverified: None,
                        failed: false,
                    });
                    self.save_memo(&memo)?;
                    self.note(format!(
                        "OpenSM could not parse {} ({e}); devfence restored the operator's last parseable text with its current block and kept the refused file as {}",
                        self.cfg.partitions_file.display(),
                        self.rejected_path().display()
                    ));
                    if let Some(pid) = pid {
                        hup(pid)?;
                    }
                }
            }
            SweepOutcome::Errors(e)
                if status.generation.0 > memo.signalled_at && memo.serial > 0 =>
            {
                // A sweep after devfence's change failed part-way (OpenSM logs
                // "Errors during initialization", e.g. MADs that timed out): no gate
                // opens on it, and devfence asks for one more heavy sweep — once per
                // failed sweep, and only while someone is observing.
                memo.signalled_at = status.generation.0;
                self.save_memo(&memo)?;
                self.note(format!(
                    "the sweep at {} ended with errors ({e}); devfence asked OpenSM to sweep again",
                    status.generation
                ));
                if let Some(pid) = pid {
                    hup(pid)?;
                }
            }
            _ => {}
        }
        Ok(text)
    }

    /// What a restore writes: the operator's last parseable text with devfence's
    /// current block (rendered from its desired membership), or — when the two
    /// do not fit together or there is no parseable text — devfence's block alone.
    fn restore_text(&self, memo: &Memo, current: &str) -> (String, String) {
        let good = read_capped(&self.last_good_path(), partitions::MAX_FILE as u64)
            .ok()
            .flatten()
            .and_then(|(b, _)| String::from_utf8(b).ok())
            .filter(|t| parses_to_something(t));
        let desired = memo.desired.clone().or_else(|| {
            // A memo from before devfence kept its membership: the block of the
            // last parseable file, else of the current one.
            good.as_deref()
                .or(Some(current))
                .and_then(|t| partitions::parse(t).ok())
                .and_then(|p| p.managed().ok())
        });
        let block = partitions::render_block(&desired.unwrap_or_default());
        if let Some(g) = good
            && let Ok(p) = partitions::parse(&g)
        {
            let t = partitions::with_block(&g, &p, &block);
            if parses_to_something(&t) {
                return (
                    t,
                    format!(
                        "the operator's last parseable text (SHA-256 {}) with devfence's current block",
                        &sha(&g)[..16]
                    ),
                );
            }
        }
        (
            block,
            "devfence's current block alone (no parseable operator text fits with it)".into(),
        )
    }

    /// At the first clean sweep after a restore: every port devfence manages must
    /// hold exactly its partitions among those devfence manages. The outcome is
    /// recorded with the restore.
    fn reverify(&self, status: &SmStatus) -> Result<(), FabricError> {
        if status.state != SmState::Master || status.sweep != SweepOutcome::Clean {
            return Ok(());
        }
        let memo = self.memo()?;
        let Some(after) = memo.reverify_after else {
            return Ok(());
        };
        if status.generation.0 <= after.max(memo.reverify_tried) {
            return Ok(());
        }
        let desired = memo.desired.clone().unwrap_or_default();
        let managed: std::collections::BTreeSet<u16> =
            desired.iter().map(|(_, k, _)| k.base()).collect();
        let (mut ok, mut absent, mut bad) = (0usize, 0usize, Vec::new());
        for g in desired.guids().collect::<Vec<_>>() {
            let want = desired.pkeys_of(g);
            match self.reader.read_port(g)? {
                crate::Programmed::Absent => absent += 1,
                crate::Programmed::Present { pkeys, .. } => {
                    let have: std::collections::BTreeSet<PKey> = pkeys
                        .into_iter()
                        .filter(|p| managed.contains(&(p.0 & 0x7fff)))
                        .collect();
                    if have == want {
                        ok += 1;
                    } else {
                        bad.push(format!("{g} holds {have:?}, devfence manages {want:?}"));
                    }
                }
            }
        }
        let _guard = self.file_lock()?;
        let mut memo = self.memo()?;
        if memo.reverify_after != Some(after) {
            return Ok(());
        }
        memo.reverify_tried = status.generation.0;
        if bad.is_empty() {
            memo.reverify_after = None;
        }
        if let Some(last) = memo.restores.last_mut() {
            last.failed = !bad.is_empty();
            last.reverified = Some(if bad.is_empty() {
                format!(
                    "at {}: {ok} port(s) verified at the SA, {absent} not on the fabric",
                    status.generation
                )
            } else {
                format!("FAILED at {}: {}", status.generation, bad.join("; "))
            });
        }
        self.save_memo(&memo)
    }

    /// Saves a memo that could not be saved after an apply.
    fn flush_unsaved(&self) {
        let m = lock(&self.unsaved).clone();
        if let Some(m) = m {
            let _ = self.save_memo(&m);
        }
    }

    /// Keeps an operator note for `health()` (the last 16).
    fn note(&self, n: String) {
        let mut notes = lock(&self.notes);
        if notes.len() >= 16 {
            notes.remove(0);
        }
        notes.push(n);
    }

    /// The partitions file as OpenSM would read it now, parsed.
    ///
    /// # Errors
    /// Unreadable, or a parse error (with the line and a hint).
    pub fn current(&self) -> Result<partitions::PartitionsFile, FabricError> {
        let text = self.read_file()?;
        partitions::parse(&text).map_err(|e| self.refused_file("cannot parse", &e))
    }

    /// The restores devfence recorded (oldest first), for `status`.
    ///
    /// # Errors
    /// The memo cannot be read.
    pub fn restores(&self) -> Result<Vec<RestoreNote>, FabricError> {
        Ok(self.memo()?.restores)
    }
}

fn parses_to_something(text: &str) -> bool {
    partitions::parse(text).is_ok_and(|p| p.ensure_defines_something().is_ok())
}

fn hup(pid: i32) -> Result<(), FabricError> {
    let Some(p) = rustix::process::Pid::from_raw(pid) else {
        return Err(FabricError::Unreachable {
            backend: BACKEND.into(),
            detail: format!("PID {pid} is not a process"),
            hint: "check [fabric.opensm] pid_file".into(),
        });
    };
    rustix::process::kill_process(p, rustix::process::Signal::HUP).map_err(|e| FabricError::Os {
        backend: BACKEND.into(),
        op: format!("SIGHUP OpenSM (PID {pid})"),
        errno: e.raw_os_error(),
        hint: "run devfence as root, on the SM host".into(),
    })
}

impl SubnetManager for OpenSmSm {
    fn backend(&self) -> &str {
        BACKEND
    }

    fn stage(&self, change: Change) -> Result<(), FabricError> {
        change.validate()?;
        lock(&self.staged).push(change);
        Ok(())
    }

    fn discard_staged(&self) -> usize {
        std::mem::take(&mut *lock(&self.staged)).len()
    }

    fn apply(&self) -> Result<Ticket, FabricError> {
        if self.mode_in_use().is_user_ext() {
            return self.apply_user_ext();
        }
        let staged = lock(&self.staged).clone();
        let _guard = self.file_lock()?;
        let mut attempt = 0;
        let (snap, new_text, map, p, mut memo, before) = loop {
            attempt += 1;
            let snap = self.snapshot()?;
            let text = &snap.text;
            let parsed =
                partitions::parse(text).map_err(|e| self.refused_file("will not rewrite", &e))?;
            let mut memo = self.memo()?;
            // devfence's membership comes from its memo, never from the file's
            // block (which a restore, a backup or a hand edit may have changed);
            // a memo from before devfence kept it adopts the file's block once.
            let mut map: MembershipMap = match &memo.desired {
                Some(m) => m.clone(),
                None => parsed
                    .managed()
                    .map_err(|e| self.refused_file("will not rewrite", &e))?,
            };
            for c in &staged {
                map.apply(c)?;
            }
            let new_text = self.fenced(partitions::with_block(
                text,
                &parsed,
                &partitions::render_block(&map),
            ));
            let check = partitions::parse(&new_text)
                .map_err(|e| self.refused_file("would write an unparseable", &e))?;
            if check
                .managed()
                .map_err(|e| self.refused_file("would write", &e))?
                != map
            {
                return Err(FabricError::Refused {
                    backend: BACKEND.into(),
                    detail: "the rendered block does not read back as the membership asked for"
                        .into(),
                    hint: "a bug: nothing was written; report it with the partitions file".into(),
                });
            }
            let Some(p) = self.process()? else {
                return Err(FabricError::Unreachable {
                    backend: BACKEND.into(),
                    detail: "OpenSM is not running".into(),
                    hint: "start OpenSM (nothing was written; the change stays staged)".into(),
                });
            };
            if p.state == 'T' || p.state == 't' {
                return Err(FabricError::Unreachable {
                    backend: BACKEND.into(),
                    detail: format!("OpenSM (PID {}) is stopped", p.pid),
                    hint: "continue it (SIGCONT) — nothing was written; the change stays staged"
                        .into(),
                });
            }
            if parses_to_something(text) && memo.confirmed != sha(text) {
                write_atomic(&self.last_good_path(), text)?;
                memo.confirmed = sha(text);
            }
            let before = self.read_log(Some(p))?.subnet_up;
            if let Some(hook) = lock(&self.before_replace).as_mut() {
                hook(&self.cfg.partitions_file);
            }
            // The lock binds only devfence: an operator's editor may have written
            // the file since it was read. Redo the work on the new version.
            let again = self.snapshot()?;
            if again == snap {
                self.check_fence(&again.text)?;
                break (snap, new_text, map, p, memo, before);
            }
            if attempt >= APPLY_ATTEMPTS {
                return Err(FabricError::Refused {
                    backend: BACKEND.into(),
                    detail: format!(
                        "{} changed {attempt} times while devfence applied",
                        self.cfg.partitions_file.display()
                    ),
                    hint: "someone is editing the partitions file: nothing was written and OpenSM was not signalled (the change stays staged); retry when the edit is saved".into(),
                });
            }
        };
        write_atomic(&self.cfg.partitions_file, &new_text)?;
        if let Err(e) = hup(p.pid) {
            // Put the file back: nothing half-applied.
            write_atomic(&self.cfg.partitions_file, &snap.text)?;
            return Err(e);
        }
        memo.serial += 1;
        memo.signalled_at = before;
        memo.written = sha(&new_text);
        memo.desired = Some(map);
        memo.resignalled.clear();
        let ticket = Ticket {
            change: ChangeId(memo.serial),
            generation: Generation(before + 1),
        };
        {
            let mut s = lock(&self.staged);
            let n = staged.len().min(s.len());
            s.drain(..n);
        }
        // OpenSM has the change: failing to record it must not say otherwise.
        // The memo is kept in memory (used from there) and saved at the next
        // chance.
        if let Err(e) = self.save_memo(&memo) {
            *lock(&self.unsaved) = Some(memo);
            self.note(format!(
                "OpenSM took change {} but devfence could not record it in {}: {e}; it is kept in memory and saved at the next apply or observation",
                ticket.change.0,
                self.memo_path().display()
            ));
        }
        Ok(ticket)
    }

    fn observe(&self, guids: &[Guid]) -> Result<Observation, FabricError> {
        self.flush_unsaved();
        let SmRead { status, pid, .. } = self.status()?;
        let mut ports = std::collections::BTreeMap::new();
        if status.state != SmState::Master {
            // Nothing answers: report the status alone; every asked GUID is
            // unobserved, and every gate on it stays closed.
            return Ok(Observation { status, ports });
        }
        // One read of the file per observation: settled, then parsed once.
        let text = self.settle_file(&status, pid)?;
        // The re-verification after a restore is the backend's own check: a port
        // it cannot read now leaves it pending (retried at the next observation)
        // rather than failing this observation.
        if let Err(e) = self.reverify(&status) {
            self.note(format!(
                "the re-verification after the restore is pending: {e}"
            ));
        }
        let file = partitions::parse(&text).map_err(|e| self.refused_file("cannot parse", &e))?;
        let read = self.reader.read_ports(guids)?;
        for (g, programmed) in guids.iter().zip(read) {
            ports.insert(
                *g,
                PortView {
                    guid: *g,
                    programmed,
                    configured: Some(file.configured_for(*g)),
                },
            );
        }
        Ok(Observation { status, ports })
    }

    fn persisted_restores(&self) -> Result<Vec<RestoreNote>, FabricError> {
        self.restores()
    }

    fn set_fence_token(&self, token: u64) -> Result<bool, FabricError> {
        if token == 0 {
            return Err(FabricError::Refused {
                backend: BACKEND.into(),
                detail: "fencing token 0".into(),
                hint: "a fencing token is the leader key's create revision, never 0".into(),
            });
        }
        self.fence.store(token, std::sync::atomic::Ordering::SeqCst);
        Ok(true)
    }

    fn fence_token(&self) -> Result<Option<u64>, FabricError> {
        fence::token_in(&self.read_file()?)
    }

    fn configured_members(&self) -> Result<Option<Vec<Configured>>, FabricError> {
        let file = self.current()?;
        let path = self.cfg.partitions_file.display().to_string();
        let mut out = Vec::new();
        for st in &file.statements {
            for m in &st.members {
                let member = match m.who {
                    partitions::Who::Guid(g) => Member::Guid(g),
                    partitions::Who::All => Member::Wildcard("ALL".into()),
                    partitions::Who::AllCas => Member::Wildcard("ALL_CAS".into()),
                    partitions::Who::AllSwitches | partitions::Who::AllRouters => continue,
                    partitions::Who::SelfPort | partitions::Who::None => continue,
                };
                let full = st.membership_of(m) != partitions::PortMembership::Limited;
                out.push(Configured {
                    pkey: PKey(st.base() | if full { 0x8000 } else { 0 }),
                    member,
                    source: format!("{path}:{}", m.line),
                });
            }
        }
        Ok(Some(out))
    }

    fn health(&self) -> Result<Health, FabricError> {
        self.flush_unsaved();
        let SmRead {
            mut status,
            mut notes,
            version,
            ..
        } = self.status()?;
        let _ = self.reverify(&status);
        notes.push(self.mode_in_use().note());
        notes.extend(lock(&self.notes).iter().cloned());
        // Restores are persisted: any process's `status` reports them.
        if let Ok(memo) = self.memo() {
            for r in memo.restores.iter().rev().take(3) {
                notes.push(format!(
                    "{RESTORE_NOTE} {}: OpenSM could not parse the partitions file ({}); devfence wrote {}; re-verification: {}",
                    r.generation,
                    r.reason,
                    r.restored,
                    r.reverified.as_deref().unwrap_or("pending (at the next clean sweep)")
                ));
            }
            if let Some(r) = memo.restores.last()
                && r.failed
            {
                status.sweep = SweepOutcome::Errors(format!(
                    "after the restore at generation {}, a port devfence manages does not hold its partitions: {}",
                    r.generation,
                    r.reverified.as_deref().unwrap_or("")
                ));
            }
        }
        Ok(Health {
            backend: BACKEND.into(),
            version,
            status,
            notes,
        })
    }
}
