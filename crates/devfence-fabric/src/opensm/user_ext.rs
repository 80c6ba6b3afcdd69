//! OpenSM under NVIDIA UFM: devfence's block goes into UFM's
//! `partitions.conf.user_ext`, and UFM merges it into the partitions file.
//!
//! **What NVIDIA documents** (UFM Enterprise User Manual, "Appendix –
//! Partitioning", v6.11 to v6.22): UFM generates OpenSM's partitions file
//! (`/opt/ufm/files/conf/opensm/partitions.conf`), which "cannot be removed or
//! manually modified"; lines an operator needs go into
//! `/opt/ufm/files/conf/partitions.conf.user_ext` (the same format), whose content
//! UFM adds to the partitions file "on every logical model change"; the merge can
//! be triggered by `/opt/ufm/scripts/sync_partitions_conf.sh`, which "validates and
//! merges" the extension file into the partitions file "and starts the heavy sweep"
//! (UFM-SDN appliances: `ib sm partition-config-merge`). A direct edit of the
//! partitions file is lost at UFM's next regeneration.
//!
//! **What devfence assumes** (UFM cannot run here; the tests play UFM with a
//! script): the merged file is UFM's own content followed by the extension file's
//! text, so devfence's block arrives in it unchanged (its markers included); UFM
//! owns the default partition (its generated file defines `0x7fff`), so the block
//! devfence writes here holds only the tenants' partitions; no header of UFM's
//! generated file is documented, so the file's content is not used to detect UFM.
//!
//! | mode | devfence writes | then |
//! |---|---|---|
//! | `direct` (default) | its block into the partitions file | `SIGHUP` OpenSM |
//! | `ufm-user-ext` | its block (tenant partitions only) into the extension file | runs `ufm_merge_command`, checks the merged partitions file holds the block, `SIGHUP`s OpenSM |
//! | `auto` | `ufm-user-ext` when the extension file exists or the partitions file is under `/opt/ufm/`; else `direct` | |
//!
//! **A failed merge is rolled back**: the extension file is put back as it was
//! (if nobody changed it since devfence wrote it), the change stays staged and no
//! ticket is issued, so no gate can open on it. When the failed merge had already
//! carried devfence's new block into the partitions file, devfence runs the merge
//! once more so the partitions file follows the restored extension file, and says
//! so in the error.

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::fmt::Write as _;

use devfence_model::Membership;

use super::{
    APPLY_ATTEMPTS, BACKEND, OpenSmConfig, OpenSmSm, Snapshot, hup, lock, partitions, read_capped,
    sha, sibling, write_atomic,
};
use crate::{
    ChangeId, FabricError, Generation, MembershipMap, PartitionKey, SmStatus, SweepOutcome, Ticket,
};

/// Where devfence writes its block (`[fabric.opensm] partitions_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum PartitionsMode {
    /// Into OpenSM's partitions file, then `SIGHUP` (devfence owns a block of it).
    #[default]
    Direct,
    /// Into UFM's `partitions.conf.user_ext`, then UFM's merge.
    UfmUserExt,
    /// `ufm-user-ext` when UFM's management is detected, else `direct`.
    Auto,
}

impl PartitionsMode {
    /// The name as written in devfence.toml.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::UfmUserExt => "ufm-user-ext",
            Self::Auto => "auto",
        }
    }
}

impl TryFrom<String> for PartitionsMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "direct" => Ok(Self::Direct),
            "ufm-user-ext" => Ok(Self::UfmUserExt),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "partitions_mode `{}` is not a mode. Hint: give \"direct\" (devfence edits OpenSM's partitions file), \"ufm-user-ext\" (UFM manages OpenSM: devfence writes partitions.conf.user_ext and runs ufm_merge_command) or \"auto\"",
                other.chars().take(40).collect::<String>()
            )),
        }
    }
}

/// `ufm_merge_timeout_ms` unless configured.
pub const DEFAULT_MERGE_TIMEOUT_MS: u64 = 60_000;
/// The longest `ufm_merge_timeout_ms` accepted.
pub const MAX_MERGE_TIMEOUT_MS: u64 = 600_000;
/// The most arguments `ufm_merge_command` may have.
const MAX_ARGS: usize = 32;
/// The longest argument.
const MAX_ARG: usize = 1024;
/// How much of the merge command's output devfence keeps (per stream).
const MAX_OUTPUT: u64 = 64 << 10;
/// Where UFM keeps its files (the `auto` mode's second signal).
pub const UFM_DIR: &str = "/opt/ufm/";
/// The extension file's name.
pub const USER_EXT_NAME: &str = "partitions.conf.user_ext";

/// The mode an `OpenSmSm` uses now, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModeInUse {
    /// `Direct` or `UfmUserExt` (never `Auto`).
    pub mode: PartitionsMode,
    /// Why (configured, or what `auto` found).
    pub why: String,
    /// The partitions file (OpenSM's, merged by UFM in `ufm-user-ext` mode).
    pub partitions_file: PathBuf,
    /// The extension file.
    pub user_ext: PathBuf,
    /// In `direct` mode: a sign of UFM that makes the choice look wrong.
    pub warning: Option<String>,
}

impl ModeInUse {
    /// True in `ufm-user-ext` mode.
    #[must_use]
    pub fn is_user_ext(&self) -> bool {
        self.mode == PartitionsMode::UfmUserExt
    }

    /// The `health` note (so `devfence status` says which mode is in use).
    #[must_use]
    pub fn note(&self) -> String {
        match self.mode {
            PartitionsMode::UfmUserExt => format!(
                "partitions_mode ufm-user-ext ({}): devfence writes its block into {} and has UFM merge it into {}",
                self.why,
                self.user_ext.display(),
                self.partitions_file.display()
            ),
            _ => {
                let mut s = format!(
                    "partitions_mode direct ({}): devfence writes its block into {}",
                    self.why,
                    self.partitions_file.display()
                );
                if let Some(w) = &self.warning {
                    let _ = write!(s, "; WARNING: {w}");
                }
                s
            }
        }
    }
}

impl OpenSmConfig {
    /// The extension file: configured, else UFM's layout (`conf/opensm/partitions.conf`
    /// → `conf/partitions.conf.user_ext`), else `<partitions_file>.user_ext`.
    #[must_use]
    pub fn user_ext_path(&self) -> PathBuf {
        if let Some(p) = &self.ufm_user_ext_file {
            return p.clone();
        }
        let pf = &self.partitions_file;
        if let Some(dir) = pf.parent()
            && dir.file_name().is_some_and(|n| n == "opensm")
            && let Some(conf) = dir.parent()
        {
            return conf.join(USER_EXT_NAME);
        }
        sibling(pf, ".user_ext")
    }

    /// The mode to use now: `auto` looks for the extension file and for UFM's
    /// directory (never at the partitions file's content: NVIDIA documents no
    /// header of UFM's generated file).
    #[must_use]
    pub fn mode_in_use(&self) -> ModeInUse {
        let user_ext = self.user_ext_path();
        let exists = std::fs::symlink_metadata(&user_ext).is_ok();
        let under_ufm = self.partitions_file.starts_with(UFM_DIR);
        let (mode, why) = match self.partitions_mode {
            PartitionsMode::Direct => (
                PartitionsMode::Direct,
                "configured or the default".to_owned(),
            ),
            PartitionsMode::UfmUserExt => (PartitionsMode::UfmUserExt, "configured".to_owned()),
            PartitionsMode::Auto if exists => (
                PartitionsMode::UfmUserExt,
                format!("auto: UFM's extension file {} exists", user_ext.display()),
            ),
            PartitionsMode::Auto if under_ufm => (
                PartitionsMode::UfmUserExt,
                format!(
                    "auto: {} is in UFM's directory {UFM_DIR}",
                    self.partitions_file.display()
                ),
            ),
            PartitionsMode::Auto => (
                PartitionsMode::Direct,
                format!(
                    "auto: no {} and the partitions file is not under {UFM_DIR}",
                    user_ext.display()
                ),
            ),
        };
        let warning = (mode == PartitionsMode::Direct && (exists || under_ufm)).then(|| {
            format!(
                "{} suggests UFM manages this OpenSM: UFM's next regeneration of the partitions file drops devfence's block; set [fabric.opensm] partitions_mode = \"ufm-user-ext\" (or \"auto\")",
                if exists {
                    format!("{} exists", user_ext.display())
                } else {
                    format!("the partitions file is under {UFM_DIR}")
                }
            )
        });
        ModeInUse {
            mode,
            why,
            partitions_file: self.partitions_file.clone(),
            user_ext,
            warning,
        }
    }

    /// Checks the UFM keys: each message names the key and carries a hint.
    ///
    /// # Errors
    /// A value out of range, a command that cannot be run as given, a key
    /// that the mode never uses.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.ufm_merge_timeout_ms;
        if t == 0 || t > MAX_MERGE_TIMEOUT_MS {
            return Err(format!(
                "ufm_merge_timeout_ms = {t} is out of range. Hint: give 1 to {MAX_MERGE_TIMEOUT_MS} milliseconds (default {DEFAULT_MERGE_TIMEOUT_MS}); UFM's merge validates, merges and starts a heavy sweep"
            ));
        }
        if let Some(p) = &self.ufm_user_ext_file {
            if !p.is_absolute() {
                return Err(format!(
                    "ufm_user_ext_file = {} is not an absolute path. Hint: give UFM's extension file, e.g. /opt/ufm/files/conf/{USER_EXT_NAME}",
                    p.display()
                ));
            }
            if *p == self.partitions_file {
                return Err(
                    "ufm_user_ext_file is the partitions file itself. Hint: UFM regenerates the partitions file; the extension file is the one it merges in (e.g. /opt/ufm/files/conf/partitions.conf.user_ext)".into(),
                );
            }
        }
        if let Some(argv) = &self.ufm_merge_command {
            let Some(prog) = argv.first() else {
                return Err("ufm_merge_command is empty. Hint: give the program and its arguments, e.g. [\"/opt/ufm/scripts/sync_partitions_conf.sh\"]".into());
            };
            if !Path::new(prog).is_absolute() {
                return Err(format!(
                    "ufm_merge_command's program `{}` is not an absolute path. Hint: devfence runs it without a shell and without searching PATH; give e.g. \"/opt/ufm/scripts/sync_partitions_conf.sh\"",
                    prog.chars().take(80).collect::<String>()
                ));
            }
            if argv.len() > MAX_ARGS {
                return Err(format!(
                    "ufm_merge_command has {} arguments. Hint: at most {MAX_ARGS}; put a longer invocation into a script",
                    argv.len()
                ));
            }
            if argv.iter().any(|a| a.len() > MAX_ARG || a.contains('\0')) {
                return Err(format!(
                    "ufm_merge_command has an argument over {MAX_ARG} bytes or with a NUL byte. Hint: put a longer invocation into a script"
                ));
            }
        }
        match self.partitions_mode {
            PartitionsMode::UfmUserExt if self.ufm_merge_command.is_none() => Err(
                "partitions_mode = \"ufm-user-ext\" needs ufm_merge_command. Hint: give the command that has UFM merge the extension file, e.g. ufm_merge_command = [\"/opt/ufm/scripts/sync_partitions_conf.sh\"] (NVIDIA's documented script)".into(),
            ),
            PartitionsMode::Direct
                if self.ufm_merge_command.is_some() || self.ufm_user_ext_file.is_some() =>
            {
                Err("ufm_merge_command or ufm_user_ext_file is set, but partitions_mode is \"direct\" (the default), which never uses them. Hint: set partitions_mode = \"ufm-user-ext\" (UFM manages this OpenSM) or \"auto\", or remove the key".into())
            }
            _ => Ok(()),
        }
    }
}

/// The block devfence writes into the extension file: the tenants' partitions
/// only (UFM owns the default partition), between the same markers as in the
/// partitions file, one member per line.
#[must_use]
pub fn render_user_ext_block(map: &MembershipMap) -> String {
    let mut by_key: std::collections::BTreeMap<
        PartitionKey,
        Vec<(devfence_model::Guid, Membership)>,
    > = std::collections::BTreeMap::new();
    for (g, k, m) in map.iter() {
        by_key.entry(k).or_default().push((g, m));
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} (written by devfence for UFM to merge: edits inside are overwritten; UFM owns the default partition)",
        partitions::BEGIN_MARK
    );
    for (k, members) in by_key {
        let _ = writeln!(s, "devfence_{:04x}=0x{:04x} :", k.base(), k.base() | 0x8000);
        let n = members.len();
        for (i, (g, m)) in members.into_iter().enumerate() {
            let mem = match m {
                Membership::Full => "full",
                Membership::Limited => "limited",
            };
            let _ = writeln!(s, "    {g}={mem}{}", if i + 1 == n { " ;" } else { "," });
        }
    }
    let _ = writeln!(s, "{}", partitions::END_MARK);
    s
}

/// A regular file at `path` as text (absent: empty, `id` `None`): a symlink, a
/// non-regular file, a file over the cap or not UTF-8 is refused.
fn snapshot_at(path: &Path) -> Result<Snapshot, FabricError> {
    let refused = |detail: String, hint: &str| FabricError::Refused {
        backend: BACKEND.into(),
        detail,
        hint: hint.into(),
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(refused(
            format!("{} is a symbolic link", path.display()),
            "devfence replaces the file atomically (write, rename), which would replace the link by a regular file and leave its target stale: point [fabric.opensm] ufm_user_ext_file at the real file",
        ));
    }
    let (bytes, meta) = match read_capped(path, partitions::MAX_FILE as u64) {
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
            return Err(refused(
                format!("{} {e}", path.display()),
                "that is not a partitions file devfence will rewrite; check [fabric.opensm] ufm_user_ext_file",
            ));
        }
        Err(e) => {
            return Err(super::os("read", path, &e, "run devfence as root"));
        }
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        refused(
            format!(
                "{} is not UTF-8 text (byte {})",
                path.display(),
                e.utf8_error().valid_up_to()
            ),
            "fix the file by hand; devfence does not rewrite a file it cannot read",
        )
    })?;
    let mtime = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    Ok(Snapshot {
        text,
        id: Some((meta.dev(), meta.ino(), mtime, meta.len())),
    })
}

fn refused(detail: String, hint: &str) -> FabricError {
    FabricError::Refused {
        backend: BACKEND.into(),
        detail,
        hint: hint.into(),
    }
}

/// The last `n` characters of `s`, on one line.
fn tail(s: &str, n: usize) -> String {
    let s = s.trim();
    let skip = s.chars().count().saturating_sub(n);
    let t: String = s.chars().skip(skip).collect();
    t.replace('\n', " | ")
}

/// Reads a stream into a shared buffer, keeping the first `MAX_OUTPUT` bytes
/// and draining the rest (a chatty command never blocks on a full pipe).
fn drain(mut r: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut v = lock(&b);
                    let room = usize::try_from(MAX_OUTPUT)
                        .unwrap_or(usize::MAX)
                        .saturating_sub(v.len());
                    v.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
    });
    buf
}

impl OpenSmSm {
    /// The mode this backend uses now, and why (see [`OpenSmConfig::mode_in_use`]).
    #[must_use]
    pub fn mode_in_use(&self) -> ModeInUse {
        self.cfg.mode_in_use()
    }

    /// Runs `ufm_merge_command` (no shell, bounded time, output kept short):
    /// `Ok` when it exits 0.
    fn run_merge(&self, argv: &[String]) -> Result<(), FabricError> {
        let Some(prog) = argv.first() else {
            return Err(refused(
                "ufm_merge_command is empty".into(),
                "give [fabric.opensm] ufm_merge_command",
            ));
        };
        let after = Duration::from_millis(self.cfg.ufm_merge_timeout_ms.max(1));
        let ext = self.cfg.user_ext_path();
        let mut child = Command::new(prog)
            .args(&argv[1..])
            .env("DEVFENCE_UFM_USER_EXT", &ext)
            .env("DEVFENCE_PARTITIONS_FILE", &self.cfg.partitions_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                super::os(
                    "run the UFM merge command",
                    Path::new(prog),
                    &e,
                    "check [fabric.opensm] ufm_merge_command: its program must exist and be executable by devfence (it runs without a shell)",
                )
            })?;
        let out = child.stdout.take().map(drain);
        let err = child.stderr.take().map(drain);
        let end = Instant::now() + after;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => {}
                Err(e) => {
                    return Err(super::os(
                        "wait for the UFM merge command",
                        Path::new(prog),
                        &e,
                        "retry",
                    ));
                }
            }
            if Instant::now() >= end {
                // The command runs in its own process group: end it and its children.
                if let Some(pg) =
                    rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
                {
                    let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::KILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(FabricError::Timeout {
                    backend: BACKEND.into(),
                    op: format!("the UFM merge command {prog}"),
                    after,
                    hint: "it was killed; devfence rolled back partitions.conf.user_ext and the change stays staged. Run the command by hand to see why it hangs (is UFM running?), or raise [fabric.opensm] ufm_merge_timeout_ms".into(),
                });
            }
            // Bounded polling of the child's exit, up to the deadline.
            std::thread::sleep(Duration::from_millis(2));
        };
        if status.success() {
            return Ok(());
        }
        // The streams' readers finish when the pipes close; a grandchild may keep
        // them open: take what they read by now (bounded).
        let text = |b: Option<Arc<Mutex<Vec<u8>>>>| {
            b.map(|b| String::from_utf8_lossy(&lock(&b)).into_owned())
                .unwrap_or_default()
        };
        let wait_end = Instant::now() + Duration::from_millis(200);
        let (mut e, mut o) = (text(err.clone()), text(out.clone()));
        while e.is_empty() && o.is_empty() && Instant::now() < wait_end {
            std::thread::sleep(Duration::from_millis(2));
            (e, o) = (text(err.clone()), text(out.clone()));
        }
        let said = if e.trim().is_empty() { o } else { e };
        Err(refused(
            format!(
                "the UFM merge command {prog} failed ({status}){}",
                if said.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", tail(&said, 400))
                }
            ),
            "devfence rolled back partitions.conf.user_ext and the change stays staged (no ticket: no gate opens on it). Run the command by hand to see why UFM did not merge (UFM validates the extension file; is UFM running?)",
        ))
    }

    /// `apply` in `ufm-user-ext` mode: devfence's block into the extension file
    /// (compare-and-replace, the operator's lines kept), UFM's merge, the merged
    /// partitions file checked, `SIGHUP`. Rolled back when the merge fails.
    pub(super) fn apply_user_ext(&self) -> Result<Ticket, FabricError> {
        let Some(argv) = self.cfg.ufm_merge_command.clone() else {
            return Err(refused(
                format!(
                    "UFM manages this OpenSM ({}) but no ufm_merge_command is configured",
                    self.mode_in_use().why
                ),
                "nothing was written. Set [fabric.opensm] ufm_merge_command to the command that has UFM merge partitions.conf.user_ext, e.g. [\"/opt/ufm/scripts/sync_partitions_conf.sh\"] (NVIDIA's documented script), or partitions_mode = \"direct\" if UFM does not manage it",
            ));
        };
        let ext = self.cfg.user_ext_path();
        let pf = self.cfg.partitions_file.clone();
        let staged = lock(&self.staged).clone();
        let _guard = self.file_lock()?;
        let refused_ext = |what: &str, e: &partitions::PartitionsError| {
            refused(
                format!("{what} {}: {e}", ext.display()),
                "nothing was written and UFM was not asked to merge. UFM merges this file into OpenSM's partitions file, and a file OpenSM cannot parse makes it fall back to every port a full member of the default partition; fix the line, then retry",
            )
        };
        let mut attempt = 0;
        let (old, new_text, map, old_map, proc_, before, mut memo) = loop {
            attempt += 1;
            let old = snapshot_at(&ext)?;
            let parsed =
                partitions::parse(&old.text).map_err(|e| refused_ext("will not rewrite", &e))?;
            let memo = self.memo()?;
            let old_map: MembershipMap = match &memo.desired {
                Some(m) => m.clone(),
                None => parsed
                    .managed()
                    .map_err(|e| refused_ext("will not rewrite", &e))?,
            };
            let mut map = old_map.clone();
            for c in &staged {
                map.apply(c)?;
            }
            let block = render_user_ext_block(&map);
            // The fabric controller's fencing token goes into the block here as
            // in `direct` mode (UFM's merge carries it into partitions.conf).
            let new_text = self.fenced(partitions::with_block(&old.text, &parsed, &block));
            let check = partitions::parse(&new_text)
                .map_err(|e| refused_ext("would write an unparseable", &e))?;
            if check
                .managed()
                .map_err(|e| refused_ext("would write", &e))?
                != map
            {
                return Err(refused(
                    "the rendered block does not read back as the membership asked for".into(),
                    "a bug: nothing was written; report it with the extension file",
                ));
            }
            // The merge to expect: UFM's current file with devfence's block in it.
            // OpenSM must be able to parse it (UFM's own partitions must not take
            // devfence's P_Keys or GUIDs).
            let current = self.snapshot()?;
            let cur = partitions::parse(&current.text).map_err(|e| {
                refused(
                    format!("cannot parse {} (UFM's file): {e}", pf.display()),
                    "nothing was written and UFM was not asked to merge; devfence does not merge into a partitions file it cannot read",
                )
            })?;
            let predicted = partitions::with_block(&current.text, &cur, &block);
            partitions::parse(&predicted)
                .and_then(|p| p.ensure_defines_something())
                .map_err(|e| {
                    refused(
                        format!(
                            "UFM's merge of devfence's block into {} would not parse: {e}",
                            pf.display()
                        ),
                        "nothing was written and UFM was not asked to merge. A partition UFM defines takes a P_Key or GUID devfence manages: give the tenant another P_Key, or remove the port from UFM's partition",
                    )
                })?;
            let Some(p) = self.process()? else {
                return Err(FabricError::Unreachable {
                    backend: BACKEND.into(),
                    detail: "OpenSM is not running".into(),
                    hint:
                        "start OpenSM (through UFM); nothing was written, the change stays staged"
                            .into(),
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
            let before = self.read_log(Some(p))?.subnet_up;
            if let Some(hook) = lock(&self.before_replace).as_mut() {
                hook(&ext);
            }
            let again = snapshot_at(&ext)?;
            if again == old {
                // Under the lock, just before the replace: a newer leader's token
                // in the extension file or in UFM's merged file refuses this apply.
                self.check_fence(&again.text)?;
                self.check_fence(&current.text)?;
                break (old, new_text, map, old_map, p, before, memo);
            }
            if attempt >= APPLY_ATTEMPTS {
                return Err(refused(
                    format!(
                        "{} changed {attempt} times while devfence applied",
                        ext.display()
                    ),
                    "someone is editing the extension file: nothing was written and UFM was not asked to merge (the change stays staged); retry when the edit is saved",
                ));
            }
        };
        write_atomic(&ext, &new_text)?;
        let merged = self
            .run_merge(&argv)
            .and_then(|()| self.check_merged(&argv[0], &map));
        if let Err(e) = merged {
            return Err(self.roll_back(&ext, &old, &new_text, &map, &old_map, &argv, e));
        }
        // UFM's script starts a heavy sweep itself; devfence signals OpenSM as
        // well, so a merge command that only merges is enough. OpenSM has the
        // change either way: a failed signal is a note, not an error.
        if let Err(e) = hup(proc_.pid) {
            self.note(format!(
                "UFM merged devfence's block but devfence could not signal OpenSM ({e}); the gates wait for the sweep UFM's merge starts"
            ));
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
        if let Err(e) = self.save_memo(&memo) {
            *lock(&self.unsaved) = Some(memo);
            self.note(format!(
                "UFM merged change {} but devfence could not record it in {}: {e}; it is kept in memory and saved at the next apply or observation",
                ticket.change.0,
                self.memo_path().display()
            ));
        }
        Ok(ticket)
    }

    /// The merged partitions file must parse and hold devfence's block as
    /// written (UFM really merged it).
    fn check_merged(&self, prog: &str, map: &MembershipMap) -> Result<(), FabricError> {
        let pf = &self.cfg.partitions_file;
        let text = self.snapshot()?.text;
        let hint = "devfence rolled back partitions.conf.user_ext and the change stays staged. Check that ufm_merge_command merges the extension file into [fabric.opensm] partitions_file (UFM's opensm/partitions.conf)";
        let parsed = partitions::parse(&text).map_err(|e| {
            refused(
                format!(
                    "after the UFM merge command {prog}, {} does not parse: {e}",
                    pf.display()
                ),
                hint,
            )
        })?;
        let got = parsed.managed().map_err(|e| {
            refused(
                format!(
                    "after the UFM merge command {prog}, devfence's block in {} is not its own: {e}",
                    pf.display()
                ),
                hint,
            )
        })?;
        if parsed.managed_lines.is_none() || got != *map {
            return Err(refused(
                format!(
                    "the UFM merge command {prog} exited 0 but {} does not hold devfence's block as written ({})",
                    pf.display(),
                    if parsed.managed_lines.is_none() {
                        "no devfence block".to_owned()
                    } else {
                        format!(
                            "{} membership(s) instead of {}",
                            got.iter().count(),
                            map.iter().count()
                        )
                    }
                ),
                hint,
            ));
        }
        Ok(())
    }

    /// After a failed merge: the extension file back as it was (if it is still
    /// what devfence wrote), and — when the failed merge had carried the new
    /// block into the partitions file — one more merge so that file follows.
    #[allow(clippy::too_many_arguments)]
    fn roll_back(
        &self,
        ext: &Path,
        old: &Snapshot,
        written: &str,
        map: &MembershipMap,
        old_map: &MembershipMap,
        argv: &[String],
        cause: FabricError,
    ) -> FabricError {
        let mut said = Vec::new();
        match snapshot_at(ext) {
            Ok(now) if now.text == written => {
                let r = if old.id.is_none() {
                    std::fs::remove_file(ext)
                        .map_err(|e| super::os("remove", ext, &e, "remove it by hand"))
                } else {
                    write_atomic(ext, &old.text)
                };
                match r {
                    Ok(()) => said.push(format!("{} was put back as it was", ext.display())),
                    Err(e) => said.push(format!(
                        "ROLLBACK FAILED: {} still holds devfence's new block ({e}); UFM's next regeneration would merge it — restore the file by hand",
                        ext.display()
                    )),
                }
            }
            Ok(_) => said.push(format!(
                "{} changed since devfence wrote it; devfence left it as it is — check it before UFM's next regeneration",
                ext.display()
            )),
            Err(e) => said.push(format!("cannot re-read {}: {e}", ext.display())),
        }
        let carries = || {
            self.snapshot()
                .ok()
                .and_then(|s| partitions::parse(&s.text).ok())
                .and_then(|p| p.managed().ok())
                .is_some_and(|m| m == *map)
        };
        if map != old_map && carries() {
            let pf = self.cfg.partitions_file.display();
            let again = self.run_merge(argv);
            let still = carries();
            if !still {
                // Have OpenSM read the file without the change (UFM's merge
                // sweeps too; this covers a command that only merges).
                if let Ok(Some(p)) = self.process() {
                    let _ = hup(p.pid);
                }
            }
            said.push(match (again, still) {
                (Ok(()), false) => format!(
                    "the failed merge had carried the change into {pf}; devfence merged again so it follows the restored extension file"
                ),
                (Err(e), false) => format!(
                    "the failed merge had carried the change into {pf}; merging again reported an error ({e}) but {pf} no longer holds the change"
                ),
                (Ok(()) | Err(_), true) => format!(
                    "the failed merge had carried the change into {pf} and merging again did not take it out: {pf} holds it until UFM's next regeneration (no gate opens on it: no ticket was issued)"
                ),
            });
        }
        let note = said.join("; ");
        self.note(format!("a UFM merge failed: {note}"));
        match cause {
            FabricError::Refused {
                backend,
                detail,
                hint,
            } => FabricError::Refused {
                backend,
                detail: format!("{detail} ({note})"),
                hint,
            },
            FabricError::Timeout {
                backend,
                op,
                after,
                hint,
            } => FabricError::Timeout {
                backend,
                op,
                after,
                hint: format!("{hint} ({note})"),
            },
            other => {
                self.note(format!("the failed merge's cause: {other}"));
                refused(
                    format!("the UFM merge failed: {other} ({note})"),
                    "the change stays staged (no ticket: no gate opens on it); retry once the cause is fixed",
                )
            }
        }
    }

    /// `observe`'s settling in `ufm-user-ext` mode: the merged partitions file
    /// is read (never rewritten: UFM owns it). A parse error is reported, not
    /// restored — the sweep counts as failed, so no gate opens; a sweep that
    /// failed part-way after devfence's merge is repeated once, as in `direct`.
    pub(super) fn settle_user_ext(
        &self,
        status: &SmStatus,
        pid: Option<i32>,
    ) -> Result<String, FabricError> {
        let _guard = self.file_lock()?;
        let mut memo = self.memo()?;
        let text = self.read_file()?;
        if let SweepOutcome::Errors(e) = &status.sweep
            && status.generation.0 > memo.signalled_at
            && memo.serial > 0
        {
            let parse_error = e.contains("PARSE ERROR") || e.contains("Partition configuration");
            memo.signalled_at = status.generation.0;
            self.save_memo(&memo)?;
            if parse_error {
                self.note(format!(
                    "OpenSM could not parse {} ({e}): UFM owns that file, so devfence does not restore it; no gate opens until a clean sweep. Fix UFM's model or {} and run the merge",
                    self.cfg.partitions_file.display(),
                    self.cfg.user_ext_path().display()
                ));
            } else {
                self.note(format!(
                    "the sweep at {} ended with errors ({e}); devfence asked OpenSM to sweep again",
                    status.generation
                ));
                if let Some(pid) = pid {
                    hup(pid)?;
                }
            }
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfence_model::Guid;

    fn cfg(pf: &str) -> OpenSmConfig {
        OpenSmConfig {
            partitions_file: PathBuf::from(pf),
            ..OpenSmConfig::default()
        }
    }

    #[test]
    fn the_extension_file_follows_ufms_layout() {
        let c = cfg("/opt/ufm/files/conf/opensm/partitions.conf");
        assert_eq!(
            c.user_ext_path(),
            PathBuf::from("/opt/ufm/files/conf/partitions.conf.user_ext")
        );
        let c = cfg("/x/partitions.conf");
        assert_eq!(
            c.user_ext_path(),
            PathBuf::from("/x/partitions.conf.user_ext")
        );
        let mut c = cfg("/x/partitions.conf");
        c.ufm_user_ext_file = Some(PathBuf::from("/y/ext"));
        assert_eq!(c.user_ext_path(), PathBuf::from("/y/ext"));
    }

    /// `auto` picks `ufm-user-ext` on UFM's signals only, says why, and a
    /// `direct` configuration on a UFM host is warned about.
    #[test]
    fn auto_detects_ufm_and_says_why() {
        let dir = tempfile::tempdir().expect("tmp");
        let pf = dir.path().join("partitions.conf");
        let mut c = cfg(&pf.display().to_string());
        c.partitions_mode = PartitionsMode::Auto;
        let m = c.mode_in_use();
        assert_eq!(m.mode, PartitionsMode::Direct, "{m:?}");
        assert!(m.note().contains("direct (auto: no "), "{}", m.note());
        assert!(m.warning.is_none());
        std::fs::write(dir.path().join(USER_EXT_NAME), "").expect("ext");
        let m = c.mode_in_use();
        assert!(m.is_user_ext(), "{m:?}");
        assert!(
            m.note()
                .contains("ufm-user-ext (auto: UFM's extension file"),
            "{}",
            m.note()
        );
        c.partitions_mode = PartitionsMode::Direct;
        let m = c.mode_in_use();
        assert_eq!(m.mode, PartitionsMode::Direct);
        assert!(m.note().contains("WARNING"), "{}", m.note());
        // UFM's directory alone is a signal too.
        let mut c = cfg("/opt/ufm/files/conf/opensm/partitions.conf");
        c.partitions_mode = PartitionsMode::Auto;
        assert!(c.mode_in_use().why.contains("UFM's directory"));
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let mut c = cfg("/x/p.conf");
        c.partitions_mode = PartitionsMode::UfmUserExt;
        let e = c.validate().expect_err("no command");
        assert!(
            e.contains("ufm_merge_command") && e.contains("Hint:"),
            "{e}"
        );
        for (argv, key) in [
            (vec![], "is empty"),
            (vec!["sync.sh".to_owned()], "not an absolute path"),
            (vec!["/bin/x".to_owned(); 40], "arguments"),
            (vec!["/bin/x".to_owned(), "a\0b".into()], "NUL"),
        ] {
            c.ufm_merge_command = Some(argv);
            let e = c.validate().expect_err(key);
            assert!(e.contains("ufm_merge_command") && e.contains(key), "{e}");
            assert!(e.contains("Hint:"), "{e}");
        }
        c.ufm_merge_command = Some(vec!["/opt/ufm/scripts/sync_partitions_conf.sh".into()]);
        c.validate().expect("ok");
        for t in [0, MAX_MERGE_TIMEOUT_MS + 1] {
            c.ufm_merge_timeout_ms = t;
            let e = c.validate().expect_err("timeout");
            assert!(
                e.contains("ufm_merge_timeout_ms") && e.contains("Hint:"),
                "{e}"
            );
        }
        c.ufm_merge_timeout_ms = DEFAULT_MERGE_TIMEOUT_MS;
        c.ufm_user_ext_file = Some(PathBuf::from("ext"));
        assert!(
            c.validate()
                .expect_err("relative")
                .contains("ufm_user_ext_file")
        );
        c.ufm_user_ext_file = Some(PathBuf::from("/x/p.conf"));
        assert!(
            c.validate()
                .expect_err("same")
                .contains("ufm_user_ext_file")
        );
        c.ufm_user_ext_file = None;
        c.partitions_mode = PartitionsMode::Direct;
        let e = c.validate().expect_err("unused");
        assert!(e.contains("partitions_mode") && e.contains("Hint:"), "{e}");
        let e = PartitionsMode::try_from("ufm".to_owned()).expect_err("bad");
        assert!(e.contains("partitions_mode") && e.contains("Hint:"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// For any membership and any operator extension text and UFM content
        /// (statements over a few P_Keys and GUIDs): when devfence's extension
        /// file and UFM's merge of it parse, the merged file reads back as
        /// exactly devfence's membership, configures every member's P_Keys,
        /// keeps UFM's and the operator's partitions, and the block never
        /// defines the default partition.
        #[test]
        fn the_merge_of_the_extension_file_keeps_devfences_membership(
            members in proptest::collection::vec((0u64..6, 1u16..5, proptest::prelude::any::<bool>()), 0..12),
            operator in proptest::collection::vec((1u16..8, 0u64..6, proptest::prelude::any::<bool>()), 0..4),
            ufm in proptest::collection::vec((1u16..8, 0u64..6), 0..4),
        ) {
            let g = |i: u64| Guid(0x0002_c903_00f0_0001 + 2 * i);
            let mut map = MembershipMap::new();
            for (i, k, full) in members {
                let k = PartitionKey::new(0x8000 | k).expect("key");
                let m = if full { Membership::Full } else { Membership::Limited };
                let _ = map.insert(g(i), k, m);
            }
            let stmt = |who: &str, n: usize, k: u16, i: u64, full: bool| {
                format!("{who}{n}=0x{:04x} : {}={} ;\n", 0x8000 | k, g(i), if full { "full" } else { "limited" })
            };
            let op: String = operator.iter().enumerate().map(|(n, (k, i, f))| stmt("op", n, *k, *i, *f)).collect();
            let model: String = std::iter::once("management=0x7fff, ipoib : ALL=limited, SELF=full ;\n".to_owned())
                .chain(ufm.iter().enumerate().map(|(n, (k, i))| stmt("ufm", n, 0x40 + k, *i, true)))
                .collect();
            let Ok(parsed) = partitions::parse(&op) else { return Ok(()); };
            let block = render_user_ext_block(&map);
            let ext = partitions::with_block(&op, &parsed, &block);
            let Ok(ext_parsed) = partitions::parse(&ext) else { return Ok(()); };
            proptest::prop_assert!(ext.starts_with(&op));
            proptest::prop_assert_eq!(ext_parsed.managed().expect("own block"), map.clone());
            proptest::prop_assert!(ext_parsed.statements.iter().all(|s| !s.managed || s.base() != 0x7fff));
            let merged = format!("{model}{ext}");
            let Ok(m) = partitions::parse(&merged) else { return Ok(()); };
            proptest::prop_assert_eq!(m.managed().expect("own block"), map.clone());
            let model_bases = partitions::parse(&model).expect("model").operator_bases();
            proptest::prop_assert!(model_bases.is_subset(&m.operator_bases()));
            proptest::prop_assert!(parsed.operator_bases().is_subset(&m.operator_bases()));
            for (guid, k, mem) in map.iter() {
                let want = match mem {
                    Membership::Full => devfence_model::PKey(k.base() | 0x8000),
                    Membership::Limited => devfence_model::PKey(k.base()),
                };
                proptest::prop_assert!(m.configured_for(guid).contains(&want));
            }
        }
    }

    /// The extension block reads back as the membership, holds no default
    /// partition, and fits after a UFM file that defines `0x7fff` — where the
    /// `direct` block (which renders the default partition) would conflict.
    #[test]
    fn the_user_ext_block_leaves_the_default_partition_to_ufm() {
        let mut map = MembershipMap::new();
        let k = PartitionKey::new(0x8001).expect("key");
        map.insert(Guid(0x0002_c903_00f0_0001), k, Membership::Full)
            .expect("ok");
        map.insert(Guid(0x0002_c903_00f0_0003), k, Membership::Limited)
            .expect("ok");
        let block = render_user_ext_block(&map);
        let p = partitions::parse(&block).expect("parses");
        assert_eq!(p.managed().expect("managed"), map);
        assert!(p.statements.iter().all(|s| s.base() != 0x7fff), "{block}");
        let ufm = "management=0x7fff, ipoib, defmember=full : ALL=limited, SELF=full ;\n";
        let merged = format!("{ufm}{block}");
        let m = partitions::parse(&merged).expect("merged parses");
        assert_eq!(m.managed().expect("managed"), map);
        let direct = format!("{ufm}{}", partitions::render_block(&map));
        assert!(partitions::parse(&direct).is_err());
        // An empty membership is an empty block: still parseable.
        let empty = render_user_ext_block(&MembershipMap::new());
        assert!(partitions::parse(&empty).expect("ok").statements.is_empty());
    }
}
