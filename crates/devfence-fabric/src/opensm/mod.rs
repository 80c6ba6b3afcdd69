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
//! **A parse error after an apply.** If OpenSM logs `PARSE ERROR` (it then falls
//! back to the default configuration: every port a full member of the default
//! partition), the sweep counts as failed — no gate opens on it — and `observe`
//! restores the last file that swept cleanly (keeping the refused one beside it as
//! `<file>.devfence-rejected`) and signals OpenSM again.

pub mod harness;
pub mod log;
pub mod mad;
pub mod partitions;
pub mod sa;
mod umad;

use std::fs::{File, OpenOptions};
use std::io::Write as _;
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

const BACKEND: &str = "opensm";

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
}

impl Default for OpenSmConfig {
    fn default() -> Self {
        Self {
            partitions_file: PathBuf::from("/etc/opensm/partitions.conf"),
            log_file: PathBuf::from("/var/log/opensm.log"),
            pid_file: None,
            sa: SaConfig::default(),
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

/// What devfence remembers next to the partitions file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Memo {
    format: String,
    /// The last apply's serial.
    serial: u64,
    /// SHA-256 of the file devfence last wrote.
    written: String,
    /// SHA-256 of the file last seen sweeping cleanly (saved as last-good).
    confirmed: String,
    /// The `SUBNET UP` count when devfence last signalled OpenSM: only a sweep
    /// after it can be blamed on (or credited to) the file devfence wrote.
    #[serde(default)]
    signalled_at: u64,
}

const MEMO_FORMAT: &str = "devfence-opensm/1";

/// The OpenSM backend of [`SubnetManager`].
pub struct OpenSmSm {
    cfg: OpenSmConfig,
    staged: Mutex<Vec<Change>>,
    log: Mutex<log::LogCursor>,
    reader: Box<dyn PortReader>,
    notes: Mutex<Vec<String>>,
}

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

/// Writes `text` to `path` atomically: temp file, fsync, rename, fsync the directory.
fn write_atomic(path: &Path, text: &str) -> Result<(), FabricError> {
    let tmp = sibling(path, ".devfence-tmp");
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
}

fn proc_state(pid: i32) -> Option<(String, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let state = stat.get(close + 1..)?.trim_start().chars().next()?;
    Some((comm, state))
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
            log: Mutex::new(log::LogCursor::default()),
            reader,
            notes: Mutex::new(Vec::new()),
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

    fn memo(&self) -> Result<Memo, FabricError> {
        let p = self.memo_path();
        match std::fs::read_to_string(&p) {
            Ok(t) => {
                let m: Memo = serde_json::from_str(&t).map_err(|e| FabricError::Malformed {
                    backend: BACKEND.into(),
                    detail: format!("{}: {e}", p.display()),
                    hint: "the file is devfence's memo of its last apply; move it aside and retry (a fresh one is written)".into(),
                })?;
                if m.format != MEMO_FORMAT {
                    return Err(FabricError::Malformed {
                        backend: BACKEND.into(),
                        detail: format!(
                            "{}: format {:?}, expected {MEMO_FORMAT:?}",
                            p.display(),
                            m.format
                        ),
                        hint: "written by another devfence version; move it aside and retry".into(),
                    });
                }
                Ok(m)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Memo {
                format: MEMO_FORMAT.into(),
                ..Memo::default()
            }),
            Err(e) => Err(os("read", &p, &e, "run devfence as root")),
        }
    }

    fn save_memo(&self, m: &Memo) -> Result<(), FabricError> {
        let text = serde_json::to_string_pretty(m).map_err(|e| FabricError::Malformed {
            backend: BACKEND.into(),
            detail: e.to_string(),
            hint: "bug".into(),
        })?;
        write_atomic(&self.memo_path(), &text)
    }

    fn read_file(&self) -> Result<String, FabricError> {
        let p = &self.cfg.partitions_file;
        match std::fs::metadata(p) {
            Ok(m) if m.len() > partitions::MAX_FILE as u64 => {
                return Err(FabricError::Refused {
                    backend: BACKEND.into(),
                    detail: format!("{} is {} bytes", p.display(), m.len()),
                    hint: "that is not a partitions file devfence will rewrite; check partition_config_file".into(),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(os("stat", p, &e, "run devfence as root")),
        }
        let bytes = std::fs::read(p).map_err(|e| os("read", p, &e, "run devfence as root"))?;
        String::from_utf8(bytes).map_err(|e| FabricError::Refused {
            backend: BACKEND.into(),
            detail: format!(
                "{} is not UTF-8 text (byte {})",
                p.display(),
                e.utf8_error().valid_up_to()
            ),
            hint: "fix the file by hand; devfence does not rewrite a file it cannot read".into(),
        })
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
            let t = match std::fs::read_to_string(pf) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(os("read", pf, &e, "check [fabric.opensm] pid_file")),
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
                Some((comm, state)) if comm == "opensm" && state != 'Z' && state != 'X' => {
                    Some(Proc { pid, state })
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
            if let Some((comm, state)) = proc_state(pid)
                && comm == "opensm"
                && state != 'Z'
                && state != 'X'
            {
                found.push(Proc { pid, state });
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

    /// The SM's status from its process and log.
    fn status(&self) -> Result<SmRead, FabricError> {
        let proc = self.process()?;
        let mut cursor = lock(&self.log);
        let st = cursor
            .read(&self.cfg.log_file)
            .map_err(|e| {
                os(
                    "read",
                    &self.cfg.log_file,
                    &e,
                    "check [fabric.opensm] log_file (OpenSM's log_file, with force_log_flush TRUE)",
                )
            })?
            .clone();
        drop(cursor);
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
            Some(_) => st.role.unwrap_or(SmState::Unknown),
        };
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
                sweep: st.last.clone().unwrap_or(SweepOutcome::NoneYet),
            },
            notes,
            version: st.version,
            pid: proc.map(|p| p.pid),
        })
    }

    /// After a sweep: remember a clean file as last good, or restore the last good
    /// one if OpenSM could not parse what it read. Returns the file as it now is.
    fn settle_file(&self, status: &SmStatus, pid: Option<i32>) -> Result<String, FabricError> {
        let _guard = self.file_lock()?;
        let mut memo = self.memo()?;
        let mut text = self.read_file()?;
        let now = sha(&text);
        match &status.sweep {
            SweepOutcome::Clean
                if now == memo.written
                    && memo.confirmed != now
                    && status.generation.0 > memo.signalled_at
                    && parses_to_something(&text) =>
            {
                write_atomic(&self.last_good_path(), &text)?;
                memo.confirmed = now;
                self.save_memo(&memo)?;
            }
            SweepOutcome::Errors(e)
                if (e.contains("PARSE ERROR") || e.contains("Partition configuration"))
                    && status.generation.0 > memo.signalled_at =>
            {
                let ours = now == memo.written;
                let broken = !parses_to_something(&text);
                let good = std::fs::read_to_string(self.last_good_path()).ok();
                if let Some(good) = good
                    && (ours || broken)
                    && sha(&good) != now
                {
                    write_atomic(&self.rejected_path(), &text)?;
                    write_atomic(&self.cfg.partitions_file, &good)?;
                    text.clone_from(&good);
                    memo.written = sha(&good);
                    memo.signalled_at = status.generation.0;
                    self.save_memo(&memo)?;
                    self.note(format!(
                        "OpenSM could not parse {} ({e}); devfence restored the last good file and kept the refused one as {}",
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
        let staged = lock(&self.staged).clone();
        let _guard = self.file_lock()?;
        let text = self.read_file()?;
        let parsed =
            partitions::parse(&text).map_err(|e| self.refused_file("will not rewrite", &e))?;
        let mut map: MembershipMap = parsed
            .managed()
            .map_err(|e| self.refused_file("will not rewrite", &e))?;
        for c in &staged {
            map.apply(c)?;
        }
        let new_text = partitions::with_block(&text, &parsed, &partitions::render_block(&map));
        let check = partitions::parse(&new_text)
            .map_err(|e| self.refused_file("would write an unparseable", &e))?;
        if check
            .managed()
            .map_err(|e| self.refused_file("would write", &e))?
            != map
        {
            return Err(FabricError::Refused {
                backend: BACKEND.into(),
                detail: "the rendered block does not read back as the membership asked for".into(),
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
                hint: "continue it (SIGCONT) — nothing was written; the change stays staged".into(),
            });
        }
        let mut memo = self.memo()?;
        if !self.last_good_path().exists() && parses_to_something(&text) {
            write_atomic(&self.last_good_path(), &text)?;
            memo.confirmed = sha(&text);
        }
        let before = {
            let mut cursor = lock(&self.log);
            cursor
                .read(&self.cfg.log_file)
                .map_err(|e| {
                    os(
                        "read",
                        &self.cfg.log_file,
                        &e,
                        "check [fabric.opensm] log_file",
                    )
                })?
                .subnet_up
        };
        write_atomic(&self.cfg.partitions_file, &new_text)?;
        if let Err(e) = hup(p.pid) {
            // Put the file back: nothing half-applied.
            write_atomic(&self.cfg.partitions_file, &text)?;
            return Err(e);
        }
        memo.serial += 1;
        memo.signalled_at = before;
        memo.written = sha(&new_text);
        memo.format = MEMO_FORMAT.into();
        self.save_memo(&memo)?;
        {
            let mut s = lock(&self.staged);
            let n = staged.len().min(s.len());
            s.drain(..n);
        }
        Ok(Ticket {
            change: ChangeId(memo.serial),
            generation: Generation(before + 1),
        })
    }

    fn observe(&self, guids: &[Guid]) -> Result<Observation, FabricError> {
        let SmRead { status, pid, .. } = self.status()?;
        let mut ports = std::collections::BTreeMap::new();
        if status.state != SmState::Master {
            // Nothing answers: report the status alone; every asked GUID is
            // unobserved, and every gate on it stays closed.
            return Ok(Observation { status, ports });
        }
        // One read of the file per observation: settled, then parsed once.
        let text = self.settle_file(&status, pid)?;
        let file = partitions::parse(&text).map_err(|e| self.refused_file("cannot parse", &e))?;
        for g in guids {
            let programmed = self.reader.read_port(*g)?;
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
        let SmRead {
            status,
            mut notes,
            version,
            ..
        } = self.status()?;
        notes.extend(lock(&self.notes).iter().cloned());
        Ok(Health {
            backend: BACKEND.into(),
            version,
            status,
            notes,
        })
    }
}
