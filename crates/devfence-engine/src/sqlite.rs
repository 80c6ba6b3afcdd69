//! The local ledger: [`Store`] on SQLite (WAL, `synchronous=FULL`, foreign keys on).
//!
//! # Schema (version 6)
//!
//! | table | columns |
//! |---|---|
//! | `schema_version` | `version` (pk), `applied_at_ms` — one row per applied migration |
//! | `tenants` | `id` (pk), `launcher_uid`, `launcher_gid`, `security_label` |
//! | `tenant_partitions` | `tenant` → tenants, `pkey` (raw 16 bits), `base` (low 15 bits), `membership` (`full`/`limited`); pk (tenant, base) |
//! | `devices` | `id` (pk, text form of a `DeviceId`), `state`, `tenant` → tenants, `vm`, `reason`, `updated_at_ms` |
//! | `assignments` (view) | `device`, `tenant`, `vm`, `state` of the devices whose state names a tenant |
//! | `guid_pool` | one row: `first`, `last`, `next` (GUIDs as `0x%016x`) |
//! | `guids` | `guid` (pk), `state` (`issued`/`quarantined`/`cleared`/`foreign`), `device`, `tenant`, `issued_at_ms`, `retired_at_ms`, `note` — never deleted |
//! | `operations` | `id` (pk), `device` → devices, `kind`, `started_at_ms`, `finished_at_ms`, `outcome`; a partial unique index allows one unfinished operation per device |
//! | `journal` | `id` (pk), `operation` → operations, `step`, `state` (`planned`/`done`/`failed`), `at_ms`, `detail` (JSON) |
//! | `audit` | `id` (pk, storage order), `seq`, `at_ms`, `kind`, `device`, `tenant`, `detail`, `prev_hash`, `hash`; triggers refuse UPDATE and DELETE |
//! | `state_nonces` (v2) | `nonce` (pk, 32 hex), `envelope`, `device`, `tenant`, `vm`, `signer`, `admitted_at_ms`, `expires_at_ms`: the nonce of every admitted device-state envelope; triggers refuse UPDATE, and DELETE of a nonce whose envelope has not expired by the horizon (v6) |
//!
//! | `state_nonces_pruned` (v6) | one row: `through_ms`, `nonces`, `at_ms` — the nonce horizon: the nonces of envelopes that expired at or before `through_ms` were pruned (`audit prune`), and no such envelope is admitted again; only moves forward |
//!
//! | `pf_custody` (v3) | `device` (pk) → devices, `pf`, `since_ms`: user-space PFs whose custody devfence holds for a VF a tenant holds (deleted when no tenant holds it) |
//!
//! Every ledger carries `PRAGMA application_id` [`APPLICATION_ID`] and `user_version` =
//! its schema version; an existing file without them (and without the `schema_version`
//! table of older ledgers) is not a devfence ledger and is refused.
//!
//! Version 2 adds `state_nonces`, the single-use ledger of device-state envelopes
//! (`docs/state-envelopes.md`): a nonce is written in the same transaction as the
//! admission's audit record, so an envelope is admitted at most once.
//!
//! Every write transaction is `BEGIN IMMEDIATE`, so two processes on one file are
//! serialised (a waiting writer blocks up to [`BUSY_TIMEOUT`]) and never interleave
//! inside one transaction.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devfence_model::{DeviceId, Guid, Membership, PKey, TenantId};
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::audit::{
    self, AuditError, AuditEvent, AuditFilter, AuditRecord, ChainHead, Hash, VerifyReport,
};
use crate::store::{
    Assignment, Busy, DeviceRecord, DeviceState, GuidRange, GuidRecord, GuidState, JournalEntry,
    OpOutcome, Operation, OperationId, Partition, StateNonce, StepState, Store, StoreError, Tenant,
    Tx, check_hex, check_name, now_ms,
};

/// How long a writer waits for another process's transaction to end.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Ordered migrations; migration `i` (0-based) brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE tenants (
    id             TEXT PRIMARY KEY,
    launcher_uid   INTEGER,
    launcher_gid   INTEGER,
    security_label TEXT
);
CREATE TABLE tenant_partitions (
    tenant     TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    pkey       INTEGER NOT NULL,
    base       INTEGER NOT NULL,
    membership TEXT NOT NULL CHECK (membership IN ('full', 'limited')),
    PRIMARY KEY (tenant, base)
);
CREATE TABLE devices (
    id            TEXT PRIMARY KEY,
    state         TEXT NOT NULL CHECK (state IN ('free', 'preparing', 'ready', 'active',
                                                 'draining', 'scrubbing', 'quarantined')),
    tenant        TEXT REFERENCES tenants(id),
    vm            TEXT,
    reason        TEXT,
    updated_at_ms INTEGER NOT NULL
);
CREATE VIEW assignments AS
    SELECT id AS device, tenant, vm, state FROM devices WHERE tenant IS NOT NULL;
CREATE TABLE guid_pool (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    first TEXT NOT NULL,
    last  TEXT NOT NULL,
    next  TEXT NOT NULL
);
CREATE TABLE guids (
    guid          TEXT PRIMARY KEY,
    state         TEXT NOT NULL CHECK (state IN ('issued', 'quarantined', 'cleared', 'foreign')),
    device        TEXT,
    tenant        TEXT,
    issued_at_ms  INTEGER NOT NULL,
    retired_at_ms INTEGER,
    note          TEXT
);
CREATE TRIGGER guids_never_forgotten BEFORE DELETE ON guids
    BEGIN SELECT RAISE(ABORT, 'issued GUIDs are remembered forever'); END;
CREATE TABLE operations (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    device         TEXT NOT NULL REFERENCES devices(id),
    kind           TEXT NOT NULL,
    started_at_ms  INTEGER NOT NULL,
    finished_at_ms INTEGER,
    outcome        TEXT CHECK (outcome IN ('succeeded', 'failed', 'recovered'))
);
CREATE UNIQUE INDEX operations_one_open_per_device
    ON operations(device) WHERE finished_at_ms IS NULL;
CREATE TABLE journal (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    operation INTEGER NOT NULL REFERENCES operations(id),
    step      TEXT NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('planned', 'done', 'failed')),
    at_ms     INTEGER NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX journal_by_operation ON journal(operation, id);
CREATE TABLE audit (
    id        INTEGER PRIMARY KEY,
    seq       INTEGER NOT NULL,
    at_ms     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    device    TEXT,
    tenant    TEXT,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_by_device ON audit(device);
CREATE INDEX audit_by_tenant ON audit(tenant);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
",
    r"
CREATE TABLE state_nonces (
    nonce          TEXT PRIMARY KEY,
    envelope       TEXT NOT NULL,
    device         TEXT NOT NULL,
    tenant         TEXT NOT NULL,
    vm             TEXT NOT NULL,
    signer         TEXT NOT NULL,
    admitted_at_ms INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL
);
CREATE TRIGGER state_nonces_never_forgotten BEFORE DELETE ON state_nonces
    BEGIN SELECT RAISE(ABORT, 'admitted envelope nonces are remembered forever'); END;
CREATE TRIGGER state_nonces_never_changed BEFORE UPDATE ON state_nonces
    BEGIN SELECT RAISE(ABORT, 'admitted envelope nonces are remembered forever'); END;
",
    r"
CREATE TABLE pf_custody (
    device   TEXT PRIMARY KEY REFERENCES devices(id),
    pf       TEXT NOT NULL,
    since_ms INTEGER NOT NULL
);
",
    r"
CREATE TABLE fabric_restores (
    backend        TEXT NOT NULL,
    id             TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    PRIMARY KEY (backend, id)
);
CREATE TRIGGER fabric_restores_never_forgotten BEFORE DELETE ON fabric_restores
    BEGIN SELECT RAISE(ABORT, 'recorded fabric restores are remembered forever'); END;
",
    // Audit retention: the pruning anchor (the last removed record) and a
    // delete trigger that lets records go only at or below it.
    r"
CREATE TABLE audit_pruned (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    seq     INTEGER NOT NULL,
    hash    TEXT NOT NULL,
    records INTEGER NOT NULL,
    at_ms   INTEGER NOT NULL
);
CREATE TRIGGER audit_pruned_forward BEFORE UPDATE ON audit_pruned
    WHEN NEW.seq <= OLD.seq
    BEGIN SELECT RAISE(ABORT, 'the audit pruning anchor only moves forward'); END;
CREATE TRIGGER audit_pruned_kept BEFORE DELETE ON audit_pruned
    BEGIN SELECT RAISE(ABORT, 'the audit pruning anchor is kept'); END;
DROP TRIGGER audit_no_delete;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    WHEN OLD.seq > coalesce((SELECT seq FROM audit_pruned WHERE id = 1), 0)
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
",
    // Nonce retention: the horizon (every nonce of an envelope that expired at
    // or before `through_ms` may go, and no such envelope may be admitted
    // again), and delete and insert triggers that hold the ledger to it.
    r"
CREATE TABLE state_nonces_pruned (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    through_ms INTEGER NOT NULL,
    nonces     INTEGER NOT NULL,
    at_ms      INTEGER NOT NULL
);
CREATE TRIGGER state_nonces_pruned_forward BEFORE UPDATE ON state_nonces_pruned
    WHEN NEW.through_ms < OLD.through_ms
    BEGIN SELECT RAISE(ABORT, 'the envelope nonce horizon only moves forward'); END;
CREATE TRIGGER state_nonces_pruned_kept BEFORE DELETE ON state_nonces_pruned
    BEGIN SELECT RAISE(ABORT, 'the envelope nonce horizon is kept'); END;
DROP TRIGGER state_nonces_never_forgotten;
CREATE TRIGGER state_nonces_never_forgotten BEFORE DELETE ON state_nonces
    WHEN OLD.expires_at_ms > coalesce((SELECT through_ms FROM state_nonces_pruned WHERE id = 1), 0)
    BEGIN SELECT RAISE(ABORT, 'admitted envelope nonces are remembered until their envelope expires'); END;
CREATE TRIGGER state_nonces_not_behind_horizon BEFORE INSERT ON state_nonces
    WHEN NEW.expires_at_ms <= coalesce((SELECT through_ms FROM state_nonces_pruned WHERE id = 1), 0)
    BEGIN SELECT RAISE(ABORT, 'an envelope that expired before the nonce horizon is never admitted'); END;
CREATE INDEX state_nonces_by_expiry ON state_nonces(expires_at_ms);
",
];

/// The largest ledger file checked whole (`PRAGMA integrity_check`) at every
/// open (about 0.1 s on the standard machine); a larger one is checked table by
/// table except the audit log, which `audit verify` reads in full, and the
/// operations' journal.
const FULL_CHECK_BYTES: u64 = 8 << 20;

/// How much of the ledger file `audit verify` maps (address space, not memory;
/// SQLite caps it at its compile-time maximum).
const VERIFY_MMAP_BYTES: i64 = 1 << 32;

/// The newest schema version this build knows.
#[allow(clippy::cast_possible_wrap)]
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// The `application_id` of a devfence ledger (`PRAGMA application_id`), "DfLg".
pub const APPLICATION_ID: i32 = 0x4466_4c67;

/// `path` with `suffix` appended to its file name (`ledger.db` → `ledger.db-wal`).
#[must_use]
pub fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Checks a ledger file (or its `-wal`/`-shm`): a regular file, private, and for
/// the ledger itself a non-empty SQLite database.
fn check_file(path: &Path, meta: &std::fs::Metadata, main: bool) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    if !meta.is_file() {
        return Err(corrupt("it is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StoreError::LooseMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    if !main {
        return Ok(());
    }
    if meta.len() == 0 {
        return Err(corrupt(
            "it is empty (0 bytes): devfence never leaves a ledger empty, so it was truncated or \
             replaced, and taking it for a new one would forget every tenant, device and GUID \
             issued"
                .into(),
        ));
    }
    let mut head = [0u8; 16];
    let mut f =
        std::fs::File::open(path).map_err(|e| corrupt(format!("it cannot be read ({e})")))?;
    let mut n = 0;
    while n < head.len() {
        match std::io::Read::read(&mut f, &mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(corrupt(format!("it cannot be read ({e})"))),
        }
    }
    if n < 16 || &head != SQLITE_HEADER {
        return Err(corrupt("it is not an SQLite database (bad header)".into()));
    }
    Ok(())
}

/// The connection settings of every ledger: busy timeout, WAL, FULL sync,
/// foreign keys, and an integrity check.
fn setup(
    conn: &rusqlite::Connection,
    path: &Path,
    classify: impl Fn(rusqlite::Error) -> StoreError,
) -> Result<(), StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    conn.busy_timeout(BUSY_TIMEOUT).map_err(&classify)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(&classify)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(corrupt(format!(
            "SQLite refused WAL mode (journal_mode is {mode:?})"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(&classify)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(&classify)?;
    // A ledger up to FULL_CHECK_BYTES gets the whole-file check at every open. A
    // larger one gets every table and its indexes checked except the two logs,
    // whose check costs time in proportion to their size on every command:
    // - the audit log (seconds at a million records); its records are covered
    //   instead by `audit verify`, which reads and hashes every one (a damaged
    //   page there is an SQLite error, a damaged record a broken chain);
    // - the operations' journal (0.5 s at 830,000 rows, the journal of a million
    //   records' worth of handovers); only the rows of unfinished operations are
    //   ever read again, by recovery, where a damaged page is an SQLite error and
    //   a damaged row an error naming it. `audit prune` bounds both.
    let whole = std::fs::metadata(path).map_or(true, |m| m.len() <= FULL_CHECK_BYTES);
    let tables: Vec<String> = if whole {
        Vec::new()
    } else {
        let mut stmt = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite_%' AND name NOT IN ('audit', 'journal') ORDER BY name",
            )
            .map_err(&classify)?;
        stmt.query_map([], |r| r.get::<_, String>(0))
            .map_err(&classify)?
            .collect::<Result<_, _>>()
            .map_err(&classify)?
    };
    let mut problems: Vec<String> = Vec::new();
    for t in tables
        .iter()
        .map(String::as_str)
        .chain(tables.is_empty().then_some(""))
    {
        let q = if t.is_empty() {
            "PRAGMA integrity_check".to_string()
        } else {
            format!("PRAGMA integrity_check(\"{}\")", t.replace('"', "\"\""))
        };
        let mut stmt = conn.prepare(&q).map_err(&classify)?;
        let found: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(&classify)?
            .collect::<Result<_, _>>()
            .map_err(&classify)?;
        problems.extend(found.into_iter().filter(|p| p != "ok"));
    }
    if !problems.is_empty() {
        let shown: Vec<&str> = problems.iter().take(3).map(String::as_str).collect();
        return Err(corrupt(format!(
            "integrity check failed: {}",
            shown.join("; ")
        )));
    }
    Ok(())
}

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sql {
        context,
        source: Box::new(source),
    }
}

fn bad(
    table: &'static str,
    row: impl Into<String>,
    column: &'static str,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> StoreError {
    StoreError::BadRow {
        table,
        row: row.into(),
        column,
        value: value.into().chars().take(80).collect(),
        reason: reason.into(),
    }
}

/// The ledger in one SQLite file.
pub struct SqliteStore {
    conn: rusqlite::Connection,
    path: PathBuf,
    signer: Option<audit::HeadSigner>,
    /// Audit records were appended since the head was last written.
    dirty: bool,
    /// The pruning mark the next head carries (set by `audit_prune` only).
    pending_prune: Option<audit::PruneMark>,
    /// Who acts through this store (the host agent's caller): added to the
    /// detail of every audit record it appends.
    actor: Option<serde_json::Value>,
}

impl Drop for SqliteStore {
    /// Writes the chain head once, when the store is closed, if records were
    /// appended: one synced write per command rather than per commit (a head
    /// write costs about four commits on a disk). A crash before it leaves the
    /// head behind the chain, which `audit verify` accepts (the records after it
    /// are covered from the next head).
    fn drop(&mut self) {
        if self.dirty {
            let _ = self.refresh_head();
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the ledger at `path`, creating it only when no file is there (first
    /// use), checks it and brings its schema up to [`SCHEMA_VERSION`].
    ///
    /// An existing file must be a devfence ledger: a zero-length file, a file that
    /// is not SQLite, another program's database (even an empty one) or a ledger
    /// whose `-wal` survives without it is refused, never taken for a new ledger.
    /// The ledger, its `-wal` and `-shm` must be private (no group or other bits).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for a file that is not a devfence ledger or fails
    /// `PRAGMA integrity_check`; [`StoreError::LooseMode`] for a ledger others may
    /// read or write; [`StoreError::NewerSchema`] for a ledger of a newer
    /// devfence; [`StoreError::Open`] when SQLite cannot open or set it up.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_mode(path.as_ref(), true)
    }

    /// Opens an existing ledger; never creates one ([`StoreError::Missing`]).
    ///
    /// # Errors
    /// As [`open`](Self::open), and [`StoreError::Missing`].
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_mode(path.as_ref(), false)
    }

    /// Creates a new ledger at `path`; refused if any file is there
    /// ([`StoreError::Exists`]).
    ///
    /// # Errors
    /// [`StoreError::Exists`], and as [`open`](Self::open).
    pub fn create(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(StoreError::Exists {
                path: path.to_path_buf(),
            });
        }
        if !Self::create_new(path)? {
            return Err(StoreError::Exists {
                path: path.to_path_buf(),
            });
        }
        Self::open_mode(path, false)
    }

    fn open_mode(path: &Path, create: bool) -> Result<Self, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            detail,
        };
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                for side in ["-wal", "-shm", "-journal"] {
                    let p = sidecar(path, side);
                    if std::fs::symlink_metadata(&p).is_ok() {
                        return Err(corrupt(format!(
                            "the ledger file is missing but {} exists: the ledger was deleted or \
                             moved, and a new one would forget every GUID it issued",
                            p.display()
                        )));
                    }
                }
                if !create {
                    return Err(StoreError::Missing {
                        path: path.to_path_buf(),
                    });
                }
                // Lost a race with another process creating it: open theirs.
                let _ = Self::create_new(path)?;
                return Self::open_mode(path, false);
            }
            Err(e) => return Err(corrupt(format!("it cannot be read ({e})"))),
        };
        check_file(path, &meta, true)?;
        for side in ["-wal", "-shm"] {
            let p = sidecar(path, side);
            if let Ok(m) = std::fs::symlink_metadata(&p) {
                check_file(&p, &m, false)?;
            }
        }
        let classify = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                StoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                }
            }
            _ => StoreError::Open {
                path: path.to_path_buf(),
                source: Box::new(e),
            },
        };
        // Never SQLITE_OPEN_CREATE: the file was checked above, and SQLite must not
        // make a new one if it vanished in between.
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(classify)?;
        setup(&conn, path, classify)?;
        let app: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(classify)?;
        // A ledger of a devfence from before the marker: its own tables.
        let legacy: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
                 AND name IN ('schema_version', 'tenants', 'devices', 'guids', 'audit')",
                [],
                |r| r.get(0),
            )
            .map_err(classify)?;
        if app != i64::from(APPLICATION_ID) && !(app == 0 && legacy == 5) {
            return Err(corrupt(format!(
                "it is an SQLite database but not a devfence ledger (application_id {app:#x}, \
                 devfence's is {APPLICATION_ID:#x})"
            )));
        }
        let mut store = SqliteStore {
            conn,
            path: path.to_path_buf(),
            signer: None,
            dirty: false,
            pending_prune: None,
            actor: None,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Makes a new ledger at `path` when nothing is there: built complete (schema,
    /// marker, first audit record) in a private temporary file beside it, then
    /// linked into place, which never replaces an existing file. Returns `false`
    /// when another file got there first.
    fn create_new(path: &Path) -> Result<bool, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let open_err = |source: std::io::Error| StoreError::Create {
            path: path.to_path_buf(),
            source,
        };
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|_| StoreError::Internal("no randomness"))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tag: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = path.with_file_name(format!(".{name}.{tag}.new"));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(open_err)?;
        let built = (|| -> Result<(), StoreError> {
            let classify = |e: rusqlite::Error| StoreError::Open {
                path: path.to_path_buf(),
                source: Box::new(e),
            };
            let conn = rusqlite::Connection::open_with_flags(
                &tmp,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(classify)?;
            conn.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(classify)?;
            setup(&conn, path, classify)?;
            let mut store = SqliteStore {
                conn,
                path: tmp.clone(),
                signer: None,
                dirty: false,
                pending_prune: None,
                actor: None,
            };
            store.migrate()?;
            store
                .conn
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .map_err(sql("creating the ledger"))?;
            drop(store);
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(open_err)
        })();
        let linked = built.and_then(|()| match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(open_err(e)),
        });
        for side in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(sidecar(&tmp, side));
        }
        let linked = linked?;
        if linked {
            if let Some(dir) = path.parent() {
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
            }
            // The new chain's head, kept beside the ledger from the start.
            let mut store = Self::open_mode(path, false)?;
            store.refresh_head()?;
        }
        Ok(linked)
    }

    /// Signs every chain head this store writes with `signer` (the host key).
    #[must_use]
    pub fn with_head_signer(mut self, signer: audit::HeadSigner) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Names who acts through this store from now on (`None`: nobody named,
    /// as for a command run by the operator): every audit record it appends
    /// carries `actor` in its detail. The host agent sets the peer's
    /// credentials of the request here (issue 12 item 1).
    pub fn set_actor(&mut self, actor: Option<serde_json::Value>) {
        self.actor = actor;
    }

    /// Where this ledger's chain head is kept.
    #[must_use]
    pub fn head_path(&self) -> PathBuf {
        audit::head_path(&self.path)
    }

    /// The newest record of the chain as stored in the ledger.
    ///
    /// # Errors
    /// When SQLite fails or the row is malformed.
    pub fn last_record(&self) -> Result<Option<ChainHead>, StoreError> {
        let row: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("reading the chain head"))?;
        row.map(|(s, h)| {
            Ok(ChainHead {
                seq: u64::try_from(s)
                    .map_err(|_| bad("audit", s.to_string(), "seq", s.to_string(), "negative"))?,
                hash: Hash::from_hex(&h)
                    .ok_or_else(|| bad("audit", s.to_string(), "hash", h, "not 64 hex digits"))?,
            })
        })
        .transpose()
    }

    /// The audit records after seq `after`, oldest first, at most `limit`
    /// (one read transaction): what an exporter streams.
    ///
    /// # Errors
    /// When SQLite fails or a row is malformed.
    pub fn audit_after(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, AuditError> {
        let tx = self.conn.transaction().map_err(sql("audit export"))?;
        audit::after(&tx, after, limit)
    }

    /// Writes the chain head beside the ledger when the chain has grown past it
    /// (done when the store is closed; a long-lived user calls it after each
    /// operation). Never moves the head backwards, and never over a head the chain
    /// does not extend (a cut or rewritten chain keeps the evidence for `audit
    /// verify`).
    ///
    /// # Errors
    /// When the head cannot be written.
    pub fn refresh_head(&mut self) -> Result<(), StoreError> {
        self.dirty = false;
        let path = self.head_path();
        let io = |e: std::io::Error| StoreError::Corrupt {
            path: path.clone(),
            detail: format!("the chain head cannot be written ({e})"),
        };
        let lock_path = sidecar(&path, ".lock");
        if std::fs::symlink_metadata(&lock_path).is_ok_and(|m| !m.is_file()) {
            return Err(io(std::io::Error::other(format!(
                "{} is not a regular file",
                lock_path.display()
            ))));
        }
        let lock = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&lock_path)
                .map_err(io)?
        };
        lock.lock().map_err(io)?;
        let current = audit::read_head(&path);
        let Some(last) = self.last_record()? else {
            // A new, empty chain: its head is seq 0 (so that deleting every record
            // of a grown chain is told from a new ledger).
            if matches!(current, Ok(None)) {
                let empty = audit::StoredHead {
                    format: audit::HEAD_FORMAT,
                    seq: 0,
                    hash: Hash::GENESIS.to_string(),
                    signer: None,
                    signature: None,
                    pruned: None,
                };
                audit::write_head(&path, &self.signed(empty)).map_err(io)?;
            }
            return Ok(());
        };
        let carried = current
            .as_ref()
            .ok()
            .and_then(|c| c.as_ref())
            .and_then(|c| c.pruned.clone());
        match current {
            Err(_) => return Ok(()),
            Ok(Some(cur)) if cur.seq == 0 => {
                if cur.hash != Hash::GENESIS.to_string() {
                    return Ok(());
                }
            }
            Ok(Some(cur)) => {
                if cur.seq >= last.seq {
                    return Ok(());
                }
                let stored: Option<String> = self
                    .conn
                    .query_row(
                        "SELECT hash FROM audit WHERE id = ?1 AND seq = ?1",
                        [i64::try_from(cur.seq).unwrap_or(-1)],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sql("reading the chain head"))?;
                if stored.as_deref() != Some(cur.hash.as_str()) {
                    return Ok(());
                }
            }
            Ok(None) => {}
        }
        let head = audit::StoredHead {
            format: audit::HEAD_FORMAT,
            seq: last.seq,
            hash: last.hash.to_string(),
            signer: None,
            signature: None,
            // The pruning mark moves only with `audit_prune`; otherwise it is
            // carried over (a prune made outside devfence never enters a head).
            pruned: self.pending_prune.take().or(carried),
        };
        audit::write_head(&path, &self.signed(head)).map_err(io)
    }

    fn signed(&self, mut head: audit::StoredHead) -> audit::StoredHead {
        if let Some(sign) = &self.signer {
            let (f, s) = sign(&head.message());
            head.signer = Some(f);
            head.signature = Some(s);
        }
        head
    }

    /// Verifies the chain against the head kept beside the ledger and, if given,
    /// an externally kept head. `check_signature` judges the stored head's
    /// signature (the caller knows the host key); it returns why it is not good.
    ///
    /// # Errors
    /// [`AuditError::ChainBroken`] for a broken chain, a chain cut or rewritten
    /// below either head, an empty chain, or a missing or untrustworthy head;
    /// [`AuditError::Store`] when the ledger cannot be read.
    pub fn verify_with_head(
        &mut self,
        external: Option<&ChainHead>,
        check_signature: &dyn Fn(&audit::StoredHead) -> Result<(), String>,
    ) -> Result<(VerifyReport, Option<audit::StoredHead>), AuditError> {
        let broken = |problem| {
            AuditError::ChainBroken(audit::ChainBreak {
                position: 0,
                seq: None,
                problem,
            })
        };
        let stored = audit::read_head(&self.head_path())
            .map_err(|reason| broken(audit::ChainProblem::HeadInvalid { reason }))?;
        let anchor = match &stored {
            Some(h) => {
                check_signature(h)
                    .map_err(|reason| broken(audit::ChainProblem::HeadInvalid { reason }))?;
                Some(
                    h.chain_head()
                        .map_err(|reason| broken(audit::ChainProblem::HeadInvalid { reason }))?,
                )
            }
            None => None,
        };
        // The pruning anchor in the ledger must be the one the head carries: a
        // prune is signed into the head by `audit_prune`, so records deleted
        // below a forged anchor are told from a prune.
        if let Some(h) = &stored {
            let ledger = audit::pruned_anchor(&self.conn)?.map(|a| (a.seq, a.hash.to_string()));
            let head = h.pruned.as_ref().map(|p| (p.seq, p.hash.clone()));
            if ledger != head {
                let show = |x: &Option<(u64, String)>| {
                    x.as_ref()
                        .map_or("none".to_string(), |(s, h)| format!("seq {s} ({h})"))
                };
                return Err(broken(audit::ChainProblem::HeadInvalid {
                    reason: format!(
                        "the ledger's pruning anchor is {}, but the head says {}: records \
                         were removed outside `devfence audit prune`, or a prune was \
                         interrupted before its head was written",
                        show(&ledger),
                        show(&head)
                    ),
                }));
            }
        }
        let mut report = self.audit_verify(anchor.as_ref())?;
        if let Some(x) = external {
            report = self.audit_verify(Some(x))?;
            report.anchored = true;
        }
        if stored.is_none() && external.is_none() {
            return Err(broken(audit::ChainProblem::HeadMissing));
        }
        Ok((report, stored))
    }

    /// Retention: removes the oldest audit records while keeping the chain
    /// verifiable, the finished operations that went with them, and the nonces
    /// of device-state envelopes that have expired. The whole chain is verified
    /// first (against the head beside the ledger, judged by `check_signature`),
    /// so a damaged chain is never cut to look intact; then, in one
    /// transaction:
    /// - the record before the cut becomes the pruning anchor (seq and hash,
    ///   where `audit verify` starts) and the records up to it are deleted;
    /// - the operations that finished by the anchor record's time are deleted
    ///   with their journal rows (unfinished ones, which recovery reads, stay);
    /// - the nonce horizon moves forward to now, and the nonces of envelopes
    ///   that expired by then are deleted; no envelope expiring at or before
    ///   the horizon is admitted again (a trigger refuses its nonce), so a
    ///   clock set back cannot make a forgotten nonce admissible;
    /// - each removal is recorded in the chain.
    ///
    /// Finally the head is rewritten carrying the anchor (signed with it). The
    /// newest record is never pruned, nor anything after the anchor (a trigger
    /// refuses it).
    ///
    /// # Errors
    /// [`AuditError::ChainBroken`] if the chain does not verify (nothing is
    /// removed); [`AuditError::BadCut`] for a cut that would remove the newest
    /// record; [`AuditError::Store`] when the ledger fails.
    pub fn audit_prune(
        &mut self,
        cut: audit::PruneCut,
        check_signature: &dyn Fn(&audit::StoredHead) -> Result<(), String>,
    ) -> Result<audit::PruneReport, AuditError> {
        self.refresh_head()?;
        let (report, _) = self.verify_with_head(None, check_signature)?;
        let current = audit::pruned_anchor(&self.conn)?;
        let through = match report.head {
            None => None,
            Some(last) => {
                let through = match cut {
                    audit::PruneCut::Before(seq) => seq.saturating_sub(1),
                    audit::PruneCut::Keep(0) => {
                        return Err(AuditError::BadCut {
                            reason: "--keep 0 would remove the newest record".into(),
                        });
                    }
                    audit::PruneCut::Keep(n) => last.seq.saturating_sub(n),
                };
                if through >= last.seq {
                    return Err(AuditError::BadCut {
                        reason: format!(
                            "pruning before seq {} would remove the newest record (seq {})",
                            through + 1,
                            last.seq
                        ),
                    });
                }
                (through > current.map_or(0, |a| a.seq)).then_some(through)
            }
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("audit prune"))?;
        let (anchor, pruned, operations) = match through {
            Some(through) => {
                let s = i64::try_from(through)
                    .map_err(|_| StoreError::Internal("audit seq overflow"))?;
                let at_ms: i64 = tx
                    .query_row("SELECT at_ms FROM audit WHERE seq = ?1", [s], |r| r.get(0))
                    .map_err(sql("audit prune"))?;
                let operations = prune_operations(&tx, at_ms)?;
                let (anchor, n) = audit::prune(&tx, through, operations)?;
                (Some(anchor), n, operations)
            }
            None => (current, 0, (0, 0)),
        };
        let (nonces, horizon) = prune_nonces(&tx, now_ms())?;
        tx.commit().map_err(sql("audit prune"))?;
        if through.is_some() {
            self.pending_prune = anchor.as_ref().map(|a| audit::PruneMark {
                seq: a.seq,
                hash: a.hash.to_string(),
            });
        }
        self.refresh_head()?;
        let kept = self
            .conn
            .query_row("SELECT count(*) FROM audit", [], |r| r.get::<_, i64>(0))
            .map_err(sql("audit prune"))?;
        Ok(audit::PruneReport {
            pruned,
            anchor,
            kept: u64::try_from(kept).unwrap_or(0),
            operations: operations.0,
            journal_rows: operations.1,
            nonces,
            nonce_horizon_ms: horizon,
        })
    }

    /// The file this ledger lives in.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open ledger.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT max(version) FROM schema_version", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|v| v.unwrap_or(0))
            .map_err(sql("reading the schema version"))
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("migration"))?;
        let has_version: bool = tx
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(sql("migration"))?
            > 0;
        if !has_version {
            let others: i64 = tx
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql("migration"))?;
            if others > 0 {
                return Err(StoreError::Corrupt {
                    path,
                    detail: "it is an SQLite database but not a devfence ledger".into(),
                });
            }
            tx.execute_batch(
                "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at_ms INTEGER NOT NULL)",
            )
            .map_err(sql("migration"))?;
        }
        let current: i64 = tx
            .query_row("SELECT max(version) FROM schema_version", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map_err(sql("migration"))?
            .unwrap_or(0);
        if current > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path,
                found: current,
                known: SCHEMA_VERSION,
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate() {
            let version = i64::try_from(i + 1).map_err(|_| StoreError::Internal("migrations"))?;
            if version <= current {
                continue;
            }
            tx.execute_batch(m).map_err(sql("migration"))?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_at_ms) VALUES (?1, ?2)",
                params![version, now_ms()],
            )
            .map_err(sql("migration"))?;
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(sql("migration"))?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql("migration"))?;
        tx.commit().map_err(sql("migration"))
    }
}

/// Deletes the operations that finished at or before `at_ms`, with their
/// journal rows, in the caller's transaction; returns how many of each.
fn prune_operations(tx: &rusqlite::Connection, at_ms: i64) -> Result<(u64, u64), StoreError> {
    let rows = tx
        .execute(
            "DELETE FROM journal WHERE operation IN \
             (SELECT id FROM operations WHERE finished_at_ms IS NOT NULL AND finished_at_ms <= ?1)",
            [at_ms],
        )
        .map_err(sql("pruning finished operations"))?;
    let ops = tx
        .execute(
            "DELETE FROM operations WHERE finished_at_ms IS NOT NULL AND finished_at_ms <= ?1",
            [at_ms],
        )
        .map_err(sql("pruning finished operations"))?;
    Ok((ops as u64, rows as u64))
}

/// The nonce horizon (ms since the epoch), if a prune has set one.
fn nonce_horizon(tx: &rusqlite::Connection) -> Result<Option<i64>, StoreError> {
    tx.query_row(
        "SELECT through_ms FROM state_nonces_pruned WHERE id = 1",
        [],
        |r| r.get(0),
    )
    .optional()
    .map_err(sql("reading the nonce horizon"))
}

/// Moves the nonce horizon forward to `now` (never back: a clock set back
/// leaves it where it was), deletes the nonces of envelopes that expired by
/// then and records that in the chain; in the caller's transaction. Returns
/// how many nonces went and the horizon.
fn prune_nonces(tx: &rusqlite::Connection, now: i64) -> Result<(u64, Option<i64>), StoreError> {
    let old = nonce_horizon(tx)?;
    let through = old.map_or(now, |h| h.max(now));
    let expired: i64 = tx
        .query_row(
            "SELECT count(*) FROM state_nonces WHERE expires_at_ms <= ?1",
            [through],
            |r| r.get(0),
        )
        .map_err(sql("pruning envelope nonces"))?;
    if expired == 0 {
        return Ok((0, old));
    }
    // The horizon first: the delete trigger lets a nonce go only behind it.
    tx.execute(
        "INSERT INTO state_nonces_pruned (id, through_ms, nonces, at_ms) VALUES (1, ?1, ?2, ?3) \
         ON CONFLICT (id) DO UPDATE SET through_ms = excluded.through_ms, \
         nonces = nonces + excluded.nonces, at_ms = excluded.at_ms",
        params![through, expired, now],
    )
    .map_err(sql("pruning envelope nonces"))?;
    let n = tx
        .execute(
            "DELETE FROM state_nonces WHERE expires_at_ms <= ?1",
            [through],
        )
        .map_err(sql("pruning envelope nonces"))? as u64;
    audit::append(
        tx,
        &AuditEvent {
            kind: audit::AuditKind::Ledger,
            device: None,
            tenant: None,
            detail: serde_json::json!({
                "event": "nonces-pruned",
                "through_ms": through,
                "nonces": n,
            }),
        },
    )?;
    Ok((n, Some(through)))
}

impl Store for SqliteStore {
    fn set_actor(&mut self, actor: Option<serde_json::Value>) {
        self.actor = actor;
    }

    fn transaction(
        &mut self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin transaction"))?;
        let mut stx = SqliteTx {
            tx: &tx,
            appended: false,
            actor: self.actor.as_ref(),
        };
        f(&mut stx)?;
        let appended = stx.appended;
        tx.commit().map_err(sql("commit"))?;
        // The head follows after the commit, never before (a head ahead of the
        // chain would be a false alarm after a crash): when the store is closed,
        // or when a long-lived user calls `refresh_head`.
        self.dirty |= appended;
        Ok(())
    }

    fn audit_verify(&mut self, anchor: Option<&ChainHead>) -> Result<VerifyReport, AuditError> {
        // Pages mapped rather than copied through read(2) for this one scan (most
        // of a verification's cost), set back after.
        let _ = self
            .conn
            .pragma_update(None, "mmap_size", VERIFY_MMAP_BYTES);
        let res = (|| {
            let tx = self.conn.transaction().map_err(sql("audit verify"))?;
            audit::verify(&tx, anchor)
        })();
        let _ = self.conn.pragma_update(None, "mmap_size", 0);
        res
    }

    fn audit_show(&mut self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, AuditError> {
        let tx = self.conn.transaction().map_err(sql("audit show"))?;
        audit::show(&tx, filter)
    }
}

/// One SQLite transaction.
struct SqliteTx<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    /// Whether an audit record was appended (the head is refreshed after commit).
    appended: bool,
    /// Who acts: added to every audit record's detail (see [`SqliteStore::set_actor`]).
    actor: Option<&'a serde_json::Value>,
}

/// `event` with `actor` in its detail: an object's key `actor` (one already
/// there is kept: the record says what its writer said), anything else
/// wrapped as `{"detail": …, "actor": …}`.
fn with_actor(event: &AuditEvent, actor: &serde_json::Value) -> AuditEvent {
    let detail = match &event.detail {
        serde_json::Value::Object(m) => {
            let mut m = m.clone();
            m.entry("actor").or_insert_with(|| actor.clone());
            serde_json::Value::Object(m)
        }
        other => serde_json::json!({ "detail": other, "actor": actor }),
    };
    AuditEvent {
        kind: event.kind,
        device: event.device,
        tenant: event.tenant.clone(),
        detail,
    }
}

impl SqliteTx<'_> {
    /// The first column of every row of `query`, as text (ids, in order).
    fn ids(&self, query: &str, context: &'static str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.tx.prepare(query).map_err(sql(context))?;
        stmt.query_map([], |r| r.get(0))
            .map_err(sql(context))?
            .collect::<Result<_, _>>()
            .map_err(sql(context))
    }
}

fn parse_device(table: &'static str, row: &str, s: &str) -> Result<DeviceId, StoreError> {
    s.parse()
        .map_err(|e: devfence_model::ParseError| bad(table, row, "device", s, e.to_string()))
}

fn parse_tenant(
    table: &'static str,
    row: &str,
    column: &'static str,
    s: &str,
) -> Result<TenantId, StoreError> {
    s.parse()
        .map_err(|e: devfence_model::ParseError| bad(table, row, column, s, e.to_string()))
}

fn parse_guid(
    table: &'static str,
    row: &str,
    column: &'static str,
    s: &str,
) -> Result<Guid, StoreError> {
    s.parse()
        .map_err(|e: devfence_model::ParseError| bad(table, row, column, s, e.to_string()))
}

fn decode_state(
    row: &str,
    state: &str,
    tenant: Option<String>,
    vm: Option<String>,
    reason: Option<String>,
) -> Result<DeviceState, StoreError> {
    let need_tenant = |t: Option<String>| -> Result<TenantId, StoreError> {
        let t = t.ok_or_else(|| {
            bad(
                "devices",
                row,
                "tenant",
                "",
                format!("a {state} device names its tenant"),
            )
        })?;
        parse_tenant("devices", row, "tenant", &t)
    };
    let need_vm = |v: Option<String>| {
        v.ok_or_else(|| {
            bad(
                "devices",
                row,
                "vm",
                "",
                format!("a {state} device names its VM"),
            )
        })
    };
    let no_tenant = |t: &Option<String>| match t {
        Some(t) => Err(bad(
            "devices",
            row,
            "tenant",
            t.clone(),
            format!("a {state} device is held by no tenant"),
        )),
        None => Ok(()),
    };
    Ok(match state {
        "free" => {
            no_tenant(&tenant)?;
            DeviceState::Free
        }
        "preparing" => DeviceState::Preparing {
            tenant: need_tenant(tenant)?,
            vm,
        },
        "ready" => DeviceState::Ready {
            tenant: need_tenant(tenant)?,
            vm,
        },
        "active" => DeviceState::Active {
            tenant: need_tenant(tenant)?,
            vm: need_vm(vm)?,
        },
        "draining" => DeviceState::Draining {
            tenant: need_tenant(tenant)?,
            vm: need_vm(vm)?,
        },
        "scrubbing" => {
            no_tenant(&tenant)?;
            DeviceState::Scrubbing
        }
        "quarantined" => {
            no_tenant(&tenant)?;
            DeviceState::Quarantined {
                reason: reason.unwrap_or_default(),
            }
        }
        other => {
            return Err(bad(
                "devices",
                row,
                "state",
                other,
                "not a lifecycle state (free, preparing, ready, active, draining, scrubbing, quarantined)",
            ));
        }
    })
}

fn decode_guid_state(row: &str, s: &str) -> Result<GuidState, StoreError> {
    [
        GuidState::Issued,
        GuidState::Quarantined,
        GuidState::Cleared,
        GuidState::Foreign,
    ]
    .into_iter()
    .find(|g| g.name() == s)
    .ok_or_else(|| bad("guids", row, "state", s, "not a GUID state"))
}

fn decode_outcome(row: &str, s: &str) -> Result<OpOutcome, StoreError> {
    [
        OpOutcome::Succeeded,
        OpOutcome::Failed,
        OpOutcome::Recovered,
    ]
    .into_iter()
    .find(|o| o.name() == s)
    .ok_or_else(|| bad("operations", row, "outcome", s, "not an outcome"))
}

fn decode_step_state(row: &str, s: &str) -> Result<StepState, StoreError> {
    [StepState::Planned, StepState::Done, StepState::Failed]
        .into_iter()
        .find(|o| o.name() == s)
        .ok_or_else(|| bad("journal", row, "state", s, "not a step state"))
}

fn u32_col(
    table: &'static str,
    row: &str,
    column: &'static str,
    v: Option<i64>,
) -> Result<Option<u32>, StoreError> {
    v.map(|i| {
        u32::try_from(i).map_err(|_| {
            bad(
                table,
                row,
                column,
                i.to_string(),
                "out of range for a uid/gid",
            )
        })
    })
    .transpose()
}

type OpRow = (i64, String, String, i64, Option<i64>, Option<String>);

fn decode_operation(
    (id, device, kind, started, finished, outcome): OpRow,
) -> Result<Operation, StoreError> {
    let row = format!("op-{id}");
    let device = parse_device("operations", &row, &device)?;
    let finished = match (finished, outcome) {
        (None, None) => None,
        (Some(at), Some(o)) => Some((at, decode_outcome(&row, &o)?)),
        (at, o) => {
            return Err(bad(
                "operations",
                &row,
                "outcome",
                format!("{at:?}/{o:?}"),
                "finished_at_ms and outcome must be both set or both empty",
            ));
        }
    };
    Ok(Operation {
        id: OperationId(id),
        device,
        kind,
        started_at_ms: started,
        finished,
    })
}

const OP_COLUMNS: &str = "id, device, kind, started_at_ms, finished_at_ms, outcome";

fn op_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OpRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

impl SqliteTx<'_> {
    fn require_tenant(&self, id: &TenantId) -> Result<(), StoreError> {
        let n: i64 = self
            .tx
            .query_row(
                "SELECT count(*) FROM tenants WHERE id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .map_err(sql("reading a tenant"))?;
        if n == 0 {
            return Err(StoreError::UnknownTenant(id.clone()));
        }
        Ok(())
    }

    fn open_operation(&self, op: OperationId) -> Result<Operation, StoreError> {
        let o = Tx::operation(
            &mut SqliteTx {
                tx: self.tx,
                appended: false,
                actor: self.actor,
            },
            op,
        )?
        .ok_or(StoreError::UnknownOperation(op))?;
        if o.finished.is_some() {
            return Err(StoreError::OperationFinished(op));
        }
        Ok(o)
    }
}

impl Tx for SqliteTx<'_> {
    fn add_tenant(&mut self, tenant: &Tenant) -> Result<(), StoreError> {
        if self.tenant(&tenant.id)?.is_some() {
            return Err(StoreError::TenantExists(tenant.id.clone()));
        }
        let mut bases = std::collections::BTreeSet::new();
        for p in &tenant.partitions {
            if p.pkey.is_empty_slot() {
                return Err(StoreError::InvalidTenant {
                    tenant: tenant.id.clone(),
                    reason: "P_Key 0x0000 is an empty slot, not a partition".into(),
                    hint: "use the tenant's P_Key, e.g. 0x8001",
                });
            }
            if p.pkey.base() == PKey::DEFAULT_BASE {
                return Err(StoreError::InvalidTenant {
                    tenant: tenant.id.clone(),
                    reason: format!(
                        "P_Key {} is the default partition (0x7fff), which every port has",
                        p.pkey
                    ),
                    hint: "devfence keeps tenant ports limited members of the default partition \
                           itself; give the tenant a P_Key of its own, e.g. 0x8001",
                });
            }
            if !bases.insert(p.pkey.base()) {
                return Err(StoreError::InvalidTenant {
                    tenant: tenant.id.clone(),
                    reason: format!("partition {} is listed twice", p.pkey),
                    hint: "list each partition once, with its membership",
                });
            }
            let holder: Option<String> = self
                .tx
                .query_row(
                    "SELECT tenant FROM tenant_partitions WHERE base = ?1 ORDER BY tenant LIMIT 1",
                    [p.pkey.base()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("adding a tenant"))?;
            if let Some(h) = holder {
                return Err(StoreError::InvalidTenant {
                    tenant: tenant.id.clone(),
                    reason: format!(
                        "P_Key {:#06x} (in any membership) belongs to tenant {h}",
                        p.pkey.base()
                    ),
                    hint: "a partition belongs to one tenant: two tenants in one partition can \
                           reach each other's ports; give this tenant a P_Key of its own",
                });
            }
        }
        for (what, id) in [("uid", tenant.launcher_uid), ("gid", tenant.launcher_gid)] {
            if id == Some(u32::MAX) {
                return Err(StoreError::InvalidTenant {
                    tenant: tenant.id.clone(),
                    reason: format!(
                        "launcher {what} 4294967295 is (uid_t)-1, which the kernel cannot store \
                         (chown takes it for \"leave unchanged\")"
                    ),
                    hint: "give the uid and gid the tenant's QEMU really runs as",
                });
            }
        }
        if let Some(uid) = tenant.launcher_uid {
            let holder: Option<String> = self
                .tx
                .query_row(
                    "SELECT id FROM tenants WHERE launcher_uid = ?1 ORDER BY id LIMIT 1",
                    [uid],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("adding a tenant"))?;
            if let Some(h) = holder {
                return Err(StoreError::InvalidTenant {
                    tenant: tenant.id.clone(),
                    reason: format!("launcher uid {uid} belongs to tenant {h}"),
                    hint: "the launcher uid owns the tenant's /dev/vfio nodes: two tenants with \
                           one uid own each other's devices; run each tenant's QEMU as its own uid",
                });
            }
        }
        self.tx
            .execute(
                "INSERT INTO tenants (id, launcher_uid, launcher_gid, security_label) VALUES (?1, ?2, ?3, ?4)",
                params![
                    tenant.id.as_str(),
                    tenant.launcher_uid,
                    tenant.launcher_gid,
                    tenant.security_label
                ],
            )
            .map_err(sql("adding a tenant"))?;
        for p in &tenant.partitions {
            let m = match p.membership {
                Membership::Full => "full",
                Membership::Limited => "limited",
            };
            self.tx
                .execute(
                    "INSERT INTO tenant_partitions (tenant, pkey, base, membership) VALUES (?1, ?2, ?3, ?4)",
                    params![tenant.id.as_str(), p.pkey.0, p.pkey.base(), m],
                )
                .map_err(sql("adding a tenant"))?;
        }
        Ok(())
    }

    fn remove_tenant(&mut self, id: &TenantId) -> Result<(), StoreError> {
        self.require_tenant(id)?;
        let count: i64 = self
            .tx
            .query_row(
                "SELECT count(*) FROM devices WHERE tenant = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .map_err(sql("removing a tenant"))?;
        if count > 0 {
            return Err(StoreError::TenantInUse {
                tenant: id.clone(),
                count: count.unsigned_abs(),
            });
        }
        self.tx
            .execute("DELETE FROM tenants WHERE id = ?1", [id.as_str()])
            .map_err(sql("removing a tenant"))?;
        Ok(())
    }

    fn tenant(&mut self, id: &TenantId) -> Result<Option<Tenant>, StoreError> {
        let row = self
            .tx
            .query_row(
                "SELECT launcher_uid, launcher_gid, security_label FROM tenants WHERE id = ?1",
                [id.as_str()],
                |r| {
                    Ok((
                        r.get::<_, Option<i64>>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(sql("reading a tenant"))?;
        let Some((uid, gid, label)) = row else {
            return Ok(None);
        };
        let key = id.as_str();
        let mut stmt = self
            .tx
            .prepare(
                "SELECT pkey, membership FROM tenant_partitions WHERE tenant = ?1 ORDER BY base",
            )
            .map_err(sql("reading a tenant"))?;
        let rows = stmt
            .query_map([key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .map_err(sql("reading a tenant"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("reading a tenant"))?;
        let mut partitions = Vec::with_capacity(rows.len());
        for (pkey, m) in rows {
            let pkey = u16::try_from(pkey).map_err(|_| {
                bad(
                    "tenant_partitions",
                    key,
                    "pkey",
                    pkey.to_string(),
                    "not a 16-bit P_Key",
                )
            })?;
            let membership = match m.as_str() {
                "full" => Membership::Full,
                "limited" => Membership::Limited,
                other => {
                    return Err(bad(
                        "tenant_partitions",
                        key,
                        "membership",
                        other,
                        "expected full or limited",
                    ));
                }
            };
            partitions.push(Partition {
                pkey: PKey(pkey),
                membership,
            });
        }
        Ok(Some(Tenant {
            id: id.clone(),
            launcher_uid: u32_col("tenants", key, "launcher_uid", uid)?,
            launcher_gid: u32_col("tenants", key, "launcher_gid", gid)?,
            security_label: label,
            partitions,
        }))
    }

    fn tenants(&mut self) -> Result<Vec<Tenant>, StoreError> {
        let ids = self.ids("SELECT id FROM tenants ORDER BY id", "listing tenants")?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let tid = parse_tenant("tenants", &id, "id", &id)?;
            out.extend(self.tenant(&tid)?);
        }
        Ok(out)
    }

    fn add_device(&mut self, device: &DeviceId) -> Result<(), StoreError> {
        if self.device(device)?.is_some() {
            return Err(StoreError::DeviceExists(*device));
        }
        self.tx
            .execute(
                "INSERT INTO devices (id, state, updated_at_ms) VALUES (?1, 'free', ?2)",
                params![device.to_string(), now_ms()],
            )
            .map_err(sql("adding a device"))?;
        Ok(())
    }

    fn device(&mut self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let key = device.to_string();
        let row = self
            .tx
            .query_row(
                "SELECT state, tenant, vm, reason, updated_at_ms FROM devices WHERE id = ?1",
                [&key],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(sql("reading a device"))?;
        row.map(|(state, tenant, vm, reason, at)| {
            Ok(DeviceRecord {
                device: *device,
                state: decode_state(&key, &state, tenant, vm, reason)?,
                updated_at_ms: at,
            })
        })
        .transpose()
    }

    fn devices(&mut self) -> Result<Vec<DeviceRecord>, StoreError> {
        // One statement for all (a query per device cost ~10 µs each: 0.1 s at
        // 10,000 devices, paid by `status` and every `check`).
        let mut stmt = self
            .tx
            .prepare("SELECT id, state, tenant, vm, reason, updated_at_ms FROM devices ORDER BY id")
            .map_err(sql("listing devices"))?;
        let mut rows = stmt.query([]).map_err(sql("listing devices"))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(sql("listing devices"))? {
            let row = (|| {
                Ok::<_, rusqlite::Error>((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })()
            .map_err(sql("listing devices"))?;
            let (id, state, tenant, vm, reason, at) = row;
            out.push(DeviceRecord {
                device: parse_device("devices", &id, &id)?,
                state: decode_state(&id, &state, tenant, vm, reason)?,
                updated_at_ms: at,
            });
        }
        Ok(out)
    }

    fn set_device_state(
        &mut self,
        device: &DeviceId,
        expected: &DeviceState,
        next: &DeviceState,
    ) -> Result<(), StoreError> {
        let current = self
            .device(device)?
            .ok_or(StoreError::UnknownDevice(*device))?
            .state;
        if &current != expected {
            return Err(StoreError::StateConflict {
                device: *device,
                expected: Box::new(expected.clone()),
                actual: Box::new(current),
            });
        }
        if !current.may_become(next) {
            return Err(StoreError::IllegalTransition {
                device: *device,
                from: Box::new(current),
                to: Box::new(next.clone()),
            });
        }
        if let Some(t) = next.tenant() {
            self.require_tenant(t)?;
        }
        let reason = match next {
            DeviceState::Quarantined { reason } => Some(reason.as_str()),
            _ => None,
        };
        self.tx
            .execute(
                "UPDATE devices SET state = ?2, tenant = ?3, vm = ?4, reason = ?5, updated_at_ms = ?6 WHERE id = ?1",
                params![
                    device.to_string(),
                    next.name(),
                    next.tenant().map(TenantId::as_str),
                    next.vm(),
                    reason,
                    now_ms()
                ],
            )
            .map_err(sql("setting a device state"))?;
        if next.tenant().is_none() {
            self.tx
                .execute(
                    "DELETE FROM pf_custody WHERE device = ?1",
                    [device.to_string()],
                )
                .map_err(sql("setting a device state"))?;
        }
        Ok(())
    }

    fn assignments(&mut self) -> Result<Vec<Assignment>, StoreError> {
        Ok(self
            .devices()?
            .into_iter()
            .filter_map(|d| {
                let tenant = d.state.tenant()?.clone();
                Some(Assignment {
                    device: d.device,
                    tenant,
                    vm: d.state.vm().map(str::to_string),
                    state: d.state,
                })
            })
            .collect())
    }

    fn set_guid_pool(&mut self, range: GuidRange) -> Result<(), StoreError> {
        let invalid = |reason| StoreError::InvalidGuidRange {
            first: range.first,
            last: range.last,
            reason,
        };
        if range.first > range.last {
            return Err(invalid("first is after last"));
        }
        if range.first.is_reserved() || range.last.is_reserved() {
            return Err(invalid("0 and all ones never name a port"));
        }
        self.tx
            .execute(
                "INSERT OR REPLACE INTO guid_pool (id, first, last, next) VALUES (1, ?1, ?2, ?1)",
                params![range.first.to_string(), range.last.to_string()],
            )
            .map_err(sql("setting the GUID pool"))?;
        Ok(())
    }

    fn guid_pool(&mut self) -> Result<Option<GuidRange>, StoreError> {
        Ok(self
            .pool_row()?
            .map(|(first, last, _)| GuidRange { first, last }))
    }

    fn allocate_guid(&mut self, device: &DeviceId, tenant: &TenantId) -> Result<Guid, StoreError> {
        self.allocate_guid_avoiding(device, tenant, &mut |_| Ok(None))
    }

    fn allocate_guid_avoiding(
        &mut self,
        device: &DeviceId,
        tenant: &TenantId,
        live: &mut dyn FnMut(Guid) -> Result<Option<String>, StoreError>,
    ) -> Result<Guid, StoreError> {
        self.require_tenant(tenant)?;
        let (first, last, next) = self.pool_row()?.ok_or(StoreError::GuidPoolUnset)?;
        let mut candidate = next.0.max(first.0);
        let exhausted = || StoreError::GuidPoolExhausted { first, last };
        loop {
            if candidate > last.0 {
                return Err(exhausted());
            }
            let g = Guid(candidate);
            if !g.is_reserved() && self.guid(g)?.is_none() {
                match live(g)? {
                    None => break,
                    Some(note) => self.record_foreign_guid(g, &note)?,
                }
            }
            candidate = candidate.checked_add(1).ok_or_else(exhausted)?;
        }
        let guid = Guid(candidate);
        self.tx
            .execute(
                "INSERT INTO guids (guid, state, device, tenant, issued_at_ms) VALUES (?1, 'issued', ?2, ?3, ?4)",
                params![guid.to_string(), device.to_string(), tenant.as_str(), now_ms()],
            )
            .map_err(sql("allocating a GUID"))?;
        // `candidate <= last < u64::MAX` (all ones is reserved), so this cannot wrap.
        self.tx
            .execute(
                "UPDATE guid_pool SET next = ?1 WHERE id = 1",
                [Guid(candidate.saturating_add(1)).to_string()],
            )
            .map_err(sql("allocating a GUID"))?;
        Ok(guid)
    }

    fn record_issued_guid(
        &mut self,
        device: &DeviceId,
        tenant: &TenantId,
        guid: Guid,
    ) -> Result<(), StoreError> {
        self.require_tenant(tenant)?;
        if guid.is_reserved() {
            return Err(StoreError::GuidLiveCheck {
                guid,
                reason: "a reserved GUID (zero or all ones) is never issued".into(),
            });
        }
        if let Some(rec) = self.guid(guid)? {
            return Err(StoreError::GuidState {
                guid,
                state: rec.state,
                action: "issued",
            });
        }
        self.tx
            .execute(
                "INSERT INTO guids (guid, state, device, tenant, issued_at_ms) VALUES (?1, 'issued', ?2, ?3, ?4)",
                params![guid.to_string(), device.to_string(), tenant.as_str(), now_ms()],
            )
            .map_err(sql("recording an issued GUID"))?;
        Ok(())
    }

    fn retire_guid(&mut self, guid: Guid, reason: &str) -> Result<(), StoreError> {
        let rec = self.guid(guid)?.ok_or(StoreError::UnknownGuid(guid))?;
        if rec.state != GuidState::Issued {
            return Err(StoreError::GuidState {
                guid,
                state: rec.state,
                action: "retired",
            });
        }
        self.tx
            .execute(
                "UPDATE guids SET state = 'quarantined', retired_at_ms = ?2, note = ?3 WHERE guid = ?1",
                params![guid.to_string(), now_ms(), reason],
            )
            .map_err(sql("retiring a GUID"))?;
        Ok(())
    }

    fn clear_guid(&mut self, guid: Guid) -> Result<(), StoreError> {
        let rec = self.guid(guid)?.ok_or(StoreError::UnknownGuid(guid))?;
        if rec.state != GuidState::Quarantined {
            return Err(StoreError::GuidState {
                guid,
                state: rec.state,
                action: "cleared",
            });
        }
        self.tx
            .execute(
                "UPDATE guids SET state = 'cleared' WHERE guid = ?1",
                [guid.to_string()],
            )
            .map_err(sql("clearing a GUID"))?;
        Ok(())
    }

    fn record_foreign_guid(&mut self, guid: Guid, note: &str) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT OR IGNORE INTO guids (guid, state, issued_at_ms, note) VALUES (?1, 'foreign', ?2, ?3)",
                params![guid.to_string(), now_ms(), note],
            )
            .map_err(sql("recording a foreign GUID"))?;
        Ok(())
    }

    fn guid(&mut self, guid: Guid) -> Result<Option<GuidRecord>, StoreError> {
        let key = guid.to_string();
        let row = self
            .tx
            .query_row(
                "SELECT state, device, tenant, issued_at_ms, retired_at_ms, note FROM guids WHERE guid = ?1",
                [&key],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(sql("reading a GUID"))?;
        let Some((state, device, tenant, issued, retired, note)) = row else {
            return Ok(None);
        };
        Ok(Some(GuidRecord {
            guid,
            state: decode_guid_state(&key, &state)?,
            device: device
                .map(|d| parse_device("guids", &key, &d))
                .transpose()?,
            tenant: tenant
                .map(|t| parse_tenant("guids", &key, "tenant", &t))
                .transpose()?,
            issued_at_ms: issued,
            retired_at_ms: retired,
            note,
        }))
    }

    fn guids_of(&mut self, device: &DeviceId) -> Result<Vec<GuidRecord>, StoreError> {
        let keys = {
            let mut st = self
                .tx
                .prepare("SELECT guid FROM guids WHERE device = ?1 ORDER BY issued_at_ms, guid")
                .map_err(sql("listing the GUIDs of a device"))?;
            st.query_map([device.to_string()], |r| r.get::<_, String>(0))
                .map_err(sql("listing the GUIDs of a device"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("listing the GUIDs of a device"))?
        };
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let g: Guid = k.parse().map_err(|e: devfence_model::ParseError| {
                bad("guids", &k, "guid", k.clone(), e.to_string())
            })?;
            if let Some(r) = self.guid(g)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn begin_operation(
        &mut self,
        device: &DeviceId,
        kind: &str,
    ) -> Result<OperationId, StoreError> {
        check_name("operation kind", kind)?;
        if self.device(device)?.is_none() {
            return Err(StoreError::UnknownDevice(*device));
        }
        let key = device.to_string();
        let holder = self
            .tx
            .query_row(
                &format!("SELECT {OP_COLUMNS} FROM operations WHERE device = ?1 AND finished_at_ms IS NULL"),
                [&key],
                op_row,
            )
            .optional()
            .map_err(sql("beginning an operation"))?;
        if let Some(row) = holder {
            let o = decode_operation(row)?;
            return Err(StoreError::Busy(Busy {
                device: *device,
                holder: o.id,
                kind: o.kind,
                since_ms: o.started_at_ms,
            }));
        }
        self.tx
            .execute(
                "INSERT INTO operations (device, kind, started_at_ms) VALUES (?1, ?2, ?3)",
                params![key, kind, now_ms()],
            )
            .map_err(sql("beginning an operation"))?;
        Ok(OperationId(self.tx.last_insert_rowid()))
    }

    fn journal_step(
        &mut self,
        op: OperationId,
        step: &str,
        state: StepState,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError> {
        check_name("step", step)?;
        self.open_operation(op)?;
        self.tx
            .execute(
                "INSERT INTO journal (operation, step, state, at_ms, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![op.0, step, state.name(), now_ms(), detail.to_string()],
            )
            .map_err(sql("writing the journal"))?;
        Ok(())
    }

    fn finish_operation(&mut self, op: OperationId, outcome: OpOutcome) -> Result<(), StoreError> {
        self.open_operation(op)?;
        self.tx
            .execute(
                "UPDATE operations SET finished_at_ms = ?2, outcome = ?3 WHERE id = ?1",
                params![op.0, now_ms(), outcome.name()],
            )
            .map_err(sql("finishing an operation"))?;
        Ok(())
    }

    fn operation(&mut self, op: OperationId) -> Result<Option<Operation>, StoreError> {
        self.tx
            .query_row(
                &format!("SELECT {OP_COLUMNS} FROM operations WHERE id = ?1"),
                [op.0],
                op_row,
            )
            .optional()
            .map_err(sql("reading an operation"))?
            .map(decode_operation)
            .transpose()
    }

    fn open_operations(&mut self) -> Result<Vec<Operation>, StoreError> {
        let mut stmt = self
            .tx
            .prepare(&format!(
                "SELECT {OP_COLUMNS} FROM operations WHERE finished_at_ms IS NULL ORDER BY id"
            ))
            .map_err(sql("listing operations"))?;
        let rows = stmt
            .query_map([], op_row)
            .map_err(sql("listing operations"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("listing operations"))?;
        rows.into_iter().map(decode_operation).collect()
    }

    fn journal(&mut self, op: OperationId) -> Result<Vec<JournalEntry>, StoreError> {
        let mut stmt = self
            .tx
            .prepare("SELECT id, step, state, at_ms, detail FROM journal WHERE operation = ?1 ORDER BY id")
            .map_err(sql("reading the journal"))?;
        let rows = stmt
            .query_map([op.0], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(sql("reading the journal"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("reading the journal"))?;
        rows.into_iter()
            .map(|(id, step, state, at, detail)| {
                let row = id.to_string();
                Ok(JournalEntry {
                    id,
                    operation: op,
                    step,
                    state: decode_step_state(&row, &state)?,
                    at_ms: at,
                    detail: serde_json::from_str(&detail)
                        .map_err(|e| bad("journal", &row, "detail", &detail, e.to_string()))?,
                })
            })
            .collect()
    }

    fn audit(&mut self, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
        let r = match self.actor {
            Some(actor) => audit::append(self.tx, &with_actor(event, actor))?,
            None => audit::append(self.tx, event)?,
        };
        self.appended = true;
        Ok(r)
    }

    fn record_pf_custody(&mut self, device: &DeviceId, pf: &DeviceId) -> Result<(), StoreError> {
        if self.device(device)?.is_none() {
            return Err(StoreError::UnknownDevice(*device));
        }
        self.tx
            .execute(
                "INSERT OR REPLACE INTO pf_custody (device, pf, since_ms) VALUES (?1, ?2, ?3)",
                params![device.to_string(), pf.to_string(), now_ms()],
            )
            .map_err(sql("recording PF custody"))?;
        Ok(())
    }

    fn pf_custody(&mut self) -> Result<Vec<(DeviceId, DeviceId)>, StoreError> {
        let rows: Vec<(String, String)> = {
            let mut st = self
                .tx
                .prepare(
                    "SELECT c.device, c.pf FROM pf_custody c JOIN devices d ON d.id = c.device \
                     WHERE d.tenant IS NOT NULL ORDER BY c.pf, c.device",
                )
                .map_err(sql("reading PF custody"))?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sql("reading PF custody"))?
                .collect::<Result<_, _>>()
                .map_err(sql("reading PF custody"))?
        };
        rows.into_iter()
            .map(|(d, p)| {
                Ok((
                    parse_device("pf_custody", &d, &d)?,
                    parse_device("pf_custody", &d, &p)?,
                ))
            })
            .collect()
    }

    fn state_nonce(&mut self, nonce: &str) -> Result<Option<StateNonce>, StoreError> {
        check_hex("envelope nonce", nonce, 32)?;
        let row = self
            .tx
            .query_row(
                "SELECT envelope, device, tenant, vm, signer, admitted_at_ms, expires_at_ms \
                 FROM state_nonces WHERE nonce = ?1",
                [nonce],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                    ))
                },
            )
            .optional()
            .map_err(sql("reading the nonce ledger"))?;
        row.map(|(envelope, device, tenant, vm, signer, at, exp)| {
            Ok(StateNonce {
                nonce: nonce.to_owned(),
                envelope,
                device: parse_device("state_nonces", nonce, &device)?,
                tenant: parse_tenant("state_nonces", nonce, "tenant", &tenant)?,
                vm,
                signer,
                admitted_at_ms: at,
                expires_at_ms: exp,
            })
        })
        .transpose()
    }

    fn state_nonce_horizon(&mut self) -> Result<Option<i64>, StoreError> {
        nonce_horizon(self.tx)
    }

    fn record_state_nonce(&mut self, n: &StateNonce) -> Result<(), StoreError> {
        check_hex("envelope nonce", &n.nonce, 32)?;
        check_hex("envelope id", &n.envelope, 32)?;
        check_hex("signer fingerprint", &n.signer, 32)?;
        check_name("vm", &n.vm)?;
        if let Some(prev) = self.state_nonce(&n.nonce)? {
            return Err(StoreError::NonceUsed {
                nonce: prev.nonce,
                device: prev.device,
                admitted_at_ms: prev.admitted_at_ms,
            });
        }
        if let Some(horizon) = nonce_horizon(self.tx)?
            && n.expires_at_ms <= horizon
        {
            return Err(StoreError::NonceForgotten {
                nonce: n.nonce.clone(),
                expires_at_ms: n.expires_at_ms,
                horizon_ms: horizon,
            });
        }
        self.tx
            .execute(
                "INSERT INTO state_nonces (nonce, envelope, device, tenant, vm, signer, admitted_at_ms, expires_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    n.nonce,
                    n.envelope,
                    n.device.to_string(),
                    n.tenant.as_str(),
                    n.vm,
                    n.signer,
                    n.admitted_at_ms,
                    n.expires_at_ms
                ],
            )
            .map_err(sql("recording an envelope nonce"))?;
        Ok(())
    }

    fn record_fabric_restore(&mut self, backend: &str, id: &str) -> Result<bool, StoreError> {
        check_name("fabric backend", backend)?;
        check_name("fabric restore id", id)?;
        let n = self
            .tx
            .execute(
                "INSERT OR IGNORE INTO fabric_restores (backend, id, recorded_at_ms) VALUES (?1, ?2, ?3)",
                params![backend, id, now_ms()],
            )
            .map_err(sql("recording a fabric restore"))?;
        Ok(n == 1)
    }
}

impl SqliteTx<'_> {
    fn pool_row(&self) -> Result<Option<(Guid, Guid, Guid)>, StoreError> {
        let row = self
            .tx
            .query_row(
                "SELECT first, last, next FROM guid_pool WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(sql("reading the GUID pool"))?;
        row.map(|(f, l, n)| {
            Ok((
                parse_guid("guid_pool", "1", "first", &f)?,
                parse_guid("guid_pool", "1", "last", &l)?,
                parse_guid("guid_pool", "1", "next", &n)?,
            ))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::json;

    use super::*;
    use crate::store::StoreExt;

    /// issue 12: every record a store appends while an actor is set names it
    /// (an object detail gains `actor`, another is wrapped), the chain still
    /// verifies, and records after `set_actor(None)` name nobody.
    #[test]
    fn records_name_the_actor_set_on_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("l.db")).expect("open");
        let actor = json!({ "uid": 1000, "gid": 1000, "via": "agent" });
        store.set_actor(Some(actor.clone()));
        let ev = |detail| AuditEvent {
            kind: crate::audit::AuditKind::Ledger,
            device: None,
            tenant: None,
            detail,
        };
        store
            .atomically(|tx| {
                tx.audit(&ev(json!({ "action": "x" })))?;
                tx.audit(&ev(json!("plain")))?;
                tx.audit(&ev(json!({ "actor": "kept" })))
            })
            .expect("audit");
        store.set_actor(None);
        store
            .atomically(|tx| tx.audit(&ev(json!({ "action": "y" }))))
            .expect("audit");
        let recs = store.audit_show(&AuditFilter::default()).expect("show");
        let n = recs.len();
        assert!(n >= 4, "{recs:?}");
        assert_eq!(recs[n - 4].detail, json!({ "action": "x", "actor": actor }));
        assert_eq!(
            recs[n - 3].detail,
            json!({ "detail": "plain", "actor": actor })
        );
        assert_eq!(recs[n - 2].detail, json!({ "actor": "kept" }));
        assert_eq!(recs[n - 1].detail, json!({ "action": "y" }));
        store.verify().expect("the chain verifies");
    }

    fn tenant(id: &str) -> Tenant {
        Tenant {
            id: id.parse().expect("tenant id"),
            launcher_uid: Some(107),
            launcher_gid: Some(108),
            security_label: Some("system_u:object_r:svirt_image_t:s0:c1,c2".into()),
            partitions: vec![
                Partition {
                    pkey: PKey(0x8001),
                    membership: Membership::Full,
                },
                Partition {
                    pkey: PKey(0x0002),
                    membership: Membership::Limited,
                },
            ],
        }
    }

    fn tid(s: &str) -> TenantId {
        s.parse().expect("tenant id")
    }

    fn dev(s: &str) -> DeviceId {
        s.parse().expect("device id")
    }

    fn private(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    fn fresh() -> (tempfile::TempDir, PathBuf, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.db");
        let store = SqliteStore::open(&path).expect("open");
        (dir, path, store)
    }

    #[test]
    fn migrations_from_empty_set_up_schema_and_pragmas() {
        let (_d, _p, store) = fresh();
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        assert_eq!(SCHEMA_VERSION, 6);
        let app: i32 = store
            .conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .expect("application_id");
        assert_eq!(app, APPLICATION_ID);
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("sync");
        assert_eq!(sync, 2, "synchronous=FULL");
        let fk: i64 = store
            .conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .expect("fk");
        assert_eq!(fk, 1);
        for table in [
            "tenants",
            "tenant_partitions",
            "devices",
            "assignments",
            "guid_pool",
            "guids",
            "operations",
            "journal",
            "audit",
            "state_nonces",
        ] {
            let n: i64 = store
                .conn
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE name = ?1",
                    [table],
                    |r| r.get(0),
                )
                .expect("master");
            assert_eq!(n, 1, "{table} exists");
        }
    }

    #[test]
    fn reopening_keeps_data_and_does_not_migrate_twice() {
        let (_d, path, mut store) = fresh();
        let d = dev("0000:3b:00.2");
        store
            .atomically(|tx| {
                tx.add_tenant(&tenant("acme"))?;
                tx.add_device(&d)?;
                tx.set_device_state(
                    &d,
                    &DeviceState::Free,
                    &DeviceState::Preparing {
                        tenant: tid("acme"),
                        vm: None,
                    },
                )
            })
            .expect("write");
        drop(store);
        let mut store = SqliteStore::open(&path).expect("reopen");
        let rows: i64 = store
            .conn
            .query_row("SELECT count(*) FROM schema_version", [], |r| r.get(0))
            .expect("rows");
        assert_eq!(rows, SCHEMA_VERSION);
        let (t, rec, assigned) = store
            .atomically(|tx| Ok((tx.tenant(&tid("acme"))?, tx.device(&d)?, tx.assignments()?)))
            .expect("read");
        assert_eq!(t, Some(tenant("acme")));
        assert_eq!(
            rec.expect("device").state,
            DeviceState::Preparing {
                tenant: tid("acme"),
                vm: None,
            }
        );
        assert_eq!(assigned.len(), 1);
        assert_eq!(assigned[0].tenant, tid("acme"));
    }

    #[test]
    fn newer_schema_is_refused_with_hint() {
        let (_d, path, store) = fresh();
        store
            .conn
            .execute(
                "INSERT INTO schema_version (version, applied_at_ms) VALUES (?1, 0)",
                [SCHEMA_VERSION + 1],
            )
            .expect("bump");
        drop(store);
        let err = SqliteStore::open(&path).expect_err("newer schema");
        assert!(
            matches!(
                err,
                StoreError::NewerSchema {
                    found: 7,
                    known: 6,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("newer") && msg.contains("Hint:"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn garbage_file_is_refused_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("garbage.db");
        std::fs::write(
            &path,
            b"this is not a database, it is garbage bytes \x00\xff\x13".repeat(100),
        )
        .expect("write");
        private(&path);
        let err = SqliteStore::open(&path).expect_err("garbage");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("Hint:"), "{msg}");
        // The file was not touched.
        assert!(
            std::fs::read(&path)
                .expect("read")
                .starts_with(b"this is not")
        );
    }

    #[test]
    fn damaged_database_after_valid_header_is_refused() {
        let (_d, path, mut store) = fresh();
        store
            .atomically(|tx| {
                for i in 0..200 {
                    tx.add_device(&dev(&format!("0000:3b:{:02x}.{}", i / 8, i % 8)))?;
                }
                Ok(())
            })
            .expect("fill");
        // Fold the WAL into the main file so the damage below hits real pages.
        store
            .conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .expect("checkpoint");
        drop(store);
        let mut bytes = std::fs::read(&path).expect("read");
        assert!(bytes.len() > 8192, "several pages");
        for b in &mut bytes[4096..] {
            *b = 0xa5;
        }
        std::fs::write(&path, &bytes).expect("write");
        let err = SqliteStore::open(&path).expect_err("damaged");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn foreign_sqlite_database_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("other.db");
        rusqlite::Connection::open(&path)
            .expect("open")
            .execute_batch("CREATE TABLE photos (id INTEGER)")
            .expect("create");
        private(&path);
        let err = SqliteStore::open(&path).expect_err("foreign");
        assert!(
            matches!(&err, StoreError::Corrupt { detail, .. } if detail.contains("not a devfence ledger")),
            "{err:?}"
        );
    }

    #[test]
    fn guids_never_repeat_across_10000_allocations_reopen_and_retirement() {
        let (_d, path, mut store) = fresh();
        let first = Guid(0x0002_c903_0000_0001);
        let d = dev("0000:3b:00.2");
        store
            .atomically(|tx| {
                tx.add_tenant(&tenant("acme"))?;
                tx.set_guid_pool(GuidRange {
                    first,
                    last: Guid(first.0 + 1_000_000),
                })
            })
            .expect("setup");
        let mut seen = HashSet::new();
        // 100 commits of 100 allocations each.
        for _ in 0..100 {
            let batch = store
                .atomically(|tx| {
                    (0..100)
                        .map(|_| tx.allocate_guid(&d, &tid("acme")))
                        .collect::<Result<Vec<_>, _>>()
                })
                .expect("allocate");
            for g in batch {
                assert!(g.0 >= first.0 && g.0 <= first.0 + 1_000_000);
                assert!(seen.insert(g), "{g} issued twice");
            }
        }
        assert_eq!(seen.len(), 10_000);
        drop(store);

        let mut store = SqliteStore::open(&path).expect("reopen");
        let more = store
            .atomically(|tx| {
                (0..100)
                    .map(|_| tx.allocate_guid(&d, &tid("acme")))
                    .collect::<Result<Vec<_>, _>>()
            })
            .expect("allocate after reopen");
        for g in more {
            assert!(seen.insert(g), "{g} reissued after reopen");
        }

        // Retire one; even with the pool reset to its start, it never comes back.
        let retired = first;
        store
            .atomically(|tx| tx.retire_guid(retired, "handover from acme"))
            .expect("retire");
        let rec = store
            .atomically(|tx| tx.guid(retired))
            .expect("read")
            .expect("known");
        assert_eq!(rec.state, GuidState::Quarantined);
        assert_eq!(rec.tenant, Some(tid("acme")));
        let err = store
            .atomically(|tx| tx.retire_guid(retired, "again"))
            .expect_err("retire twice");
        assert!(matches!(err, StoreError::GuidState { .. }), "{err:?}");
        store
            .atomically(|tx| {
                tx.set_guid_pool(GuidRange {
                    first,
                    last: Guid(first.0 + 1_000_000),
                })
            })
            .expect("reset pool");
        let after = store
            .atomically(|tx| tx.allocate_guid(&d, &tid("acme")))
            .expect("allocate after reset");
        assert!(!seen.contains(&after), "{after} reissued after pool reset");
        // A pool holding only the retired GUID is exhausted.
        store
            .atomically(|tx| {
                tx.set_guid_pool(GuidRange {
                    first: retired,
                    last: retired,
                })
            })
            .expect("narrow pool");
        let err = store
            .atomically(|tx| tx.allocate_guid(&d, &tid("acme")))
            .expect_err("exhausted");
        assert!(
            matches!(err, StoreError::GuidPoolExhausted { .. }),
            "{err:?}"
        );
        // Cleared GUIDs are still not reissued.
        store
            .atomically(|tx| tx.clear_guid(retired))
            .expect("clear");
        let err = store
            .atomically(|tx| tx.allocate_guid(&d, &tid("acme")))
            .expect_err("still exhausted");
        assert!(
            matches!(err, StoreError::GuidPoolExhausted { .. }),
            "{err:?}"
        );
        // And the table refuses to forget.
        assert!(
            store
                .conn
                .execute("DELETE FROM guids WHERE guid = ?1", [retired.to_string()])
                .is_err()
        );
    }

    #[test]
    fn foreign_guids_are_skipped() {
        let (_d, _p, mut store) = fresh();
        let first = Guid(0x10);
        let got = store
            .atomically(|tx| {
                tx.add_tenant(&tenant("acme"))?;
                tx.set_guid_pool(GuidRange {
                    first,
                    last: Guid(0x20),
                })?;
                tx.record_foreign_guid(Guid(0x10), "factory GUID of VF 0")?;
                tx.record_foreign_guid(Guid(0x11), "factory GUID of VF 1")?;
                tx.allocate_guid(&dev("0000:3b:00.2"), &tid("acme"))
            })
            .expect("allocate");
        assert_eq!(got, Guid(0x12));
    }

    #[test]
    fn lifecycle_states_round_trip_and_moves_are_checked() {
        let (_d, path, mut store) = fresh();
        let d = dev("0000:3b:00.2");
        let a = tid("acme");
        let walk = [
            DeviceState::Free,
            DeviceState::Preparing {
                tenant: a.clone(),
                vm: None,
            },
            DeviceState::Ready {
                tenant: a.clone(),
                vm: None,
            },
            DeviceState::Active {
                tenant: a.clone(),
                vm: "vm-1".into(),
            },
            DeviceState::Draining {
                tenant: a.clone(),
                vm: "vm-1".into(),
            },
            DeviceState::Scrubbing,
            DeviceState::Quarantined {
                reason: "SM still shows the old GUID".into(),
            },
            DeviceState::Free,
        ];
        store
            .atomically(|tx| {
                tx.add_tenant(&tenant("acme"))?;
                tx.add_device(&d)
            })
            .expect("setup");
        for pair in walk.windows(2) {
            store
                .atomically(|tx| tx.set_device_state(&d, &pair[0], &pair[1]))
                .expect("move");
            drop(store);
            store = SqliteStore::open(&path).expect("reopen");
            let got = store
                .atomically(|tx| tx.device(&d))
                .expect("read")
                .expect("device");
            assert_eq!(got.state, pair[1]);
        }
        // Compare-and-set: a stale expectation is refused.
        let err = store
            .atomically(|tx| {
                tx.set_device_state(
                    &d,
                    &DeviceState::Scrubbing,
                    &DeviceState::Quarantined { reason: "x".into() },
                )
            })
            .expect_err("stale");
        assert!(matches!(err, StoreError::StateConflict { .. }), "{err:?}");
        // No skipping the gates.
        let err = store
            .atomically(|tx| {
                tx.set_device_state(
                    &d,
                    &DeviceState::Free,
                    &DeviceState::Ready {
                        tenant: a.clone(),
                        vm: None,
                    },
                )
            })
            .expect_err("illegal");
        assert!(
            matches!(err, StoreError::IllegalTransition { .. }),
            "{err:?}"
        );
        // Unknown tenant.
        let err = store
            .atomically(|tx| {
                tx.set_device_state(
                    &d,
                    &DeviceState::Free,
                    &DeviceState::Preparing {
                        tenant: tid("nobody"),
                        vm: None,
                    },
                )
            })
            .expect_err("unknown tenant");
        assert!(matches!(err, StoreError::UnknownTenant(_)), "{err:?}");
    }

    #[test]
    fn unknown_state_read_back_is_an_error_naming_the_row() {
        let (_d, _p, mut store) = fresh();
        let d = dev("0000:3b:00.2");
        store.atomically(|tx| tx.add_device(&d)).expect("add");
        store
            .conn
            .execute_batch(
                "PRAGMA ignore_check_constraints = ON; UPDATE devices SET state = 'borrowed'",
            )
            .expect("tamper");
        let err = store.atomically(|tx| tx.device(&d)).expect_err("bad row");
        let msg = err.to_string();
        assert!(matches!(err, StoreError::BadRow { .. }), "{err:?}");
        assert!(
            msg.contains("0000:3b:00.2") && msg.contains("borrowed"),
            "{msg}"
        );
        // A held state without its tenant is also refused, not defaulted.
        store
            .conn
            .execute_batch("UPDATE devices SET state = 'ready', tenant = NULL")
            .expect("tamper");
        let err = store.atomically(|tx| tx.devices()).expect_err("bad row");
        assert!(
            matches!(
                err,
                StoreError::BadRow {
                    column: "tenant",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_second_operation_on_a_busy_device_is_refused_also_from_another_connection() {
        let (_d, path, mut one) = fresh();
        let d = dev("0000:3b:00.2");
        let other = dev("0000:3b:00.3");
        one.atomically(|tx| {
            tx.add_device(&d)?;
            tx.add_device(&other)
        })
        .expect("setup");
        let op = one.begin_operation(&d, "handover").expect("first");
        let err = one.begin_operation(&d, "release").expect_err("second");
        let busy = err.as_busy().expect("busy");
        assert_eq!(busy.holder, op);
        assert_eq!(busy.kind, "handover");
        assert!(err.to_string().contains("Hint:"));
        one.begin_operation(&other, "handover")
            .expect("another device is free");

        let mut two = SqliteStore::open(&path).expect("second connection");
        let err = two
            .begin_operation(&d, "handover")
            .expect_err("busy there too");
        assert_eq!(err.as_busy().map(|b| b.holder), Some(op));

        one.atomically(|tx| tx.finish_operation(op, OpOutcome::Succeeded))
            .expect("finish");
        let op2 = two.begin_operation(&d, "release").expect("free again");
        assert_ne!(op2, op);
        let err = one
            .atomically(|tx| tx.journal_step(op, "reset", StepState::Planned, &json!({})))
            .expect_err("finished");
        assert!(matches!(err, StoreError::OperationFinished(_)), "{err:?}");
        // Even a raw second insert is stopped by the partial unique index.
        assert!(
            two.conn
                .execute(
                    "INSERT INTO operations (device, kind, started_at_ms) VALUES (?1, 'x', 0)",
                    [d.to_string()],
                )
                .is_err()
        );
    }

    #[test]
    fn journal_records_steps_in_order_and_open_operations_survive_reopen() {
        let (_d, path, mut store) = fresh();
        let d = dev("0000:3b:00.2");
        store.atomically(|tx| tx.add_device(&d)).expect("add");
        let op = store.begin_operation(&d, "handover").expect("begin");
        store
            .atomically(|tx| {
                tx.journal_step(op, "reset", StepState::Planned, &json!({"method": "flr"}))?;
                tx.journal_step(op, "reset", StepState::Done, &json!({"vendor": "0x15b3"}))?;
                tx.journal_step(op, "gate-sm", StepState::Planned, &json!(null))
            })
            .expect("journal");
        drop(store);
        let mut store = SqliteStore::open(&path).expect("reopen");
        let (open, journal) = store
            .atomically(|tx| Ok((tx.open_operations()?, tx.journal(op)?)))
            .expect("read");
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].id, op);
        assert_eq!(open[0].device, d);
        let steps: Vec<(&str, StepState)> =
            journal.iter().map(|j| (j.step.as_str(), j.state)).collect();
        assert_eq!(
            steps,
            [
                ("reset", StepState::Planned),
                ("reset", StepState::Done),
                ("gate-sm", StepState::Planned)
            ]
        );
        assert_eq!(journal[1].detail, json!({"vendor": "0x15b3"}));
        let err = store
            .atomically(|tx| tx.journal_step(OperationId(999), "x", StepState::Done, &json!({})))
            .expect_err("unknown op");
        assert!(matches!(err, StoreError::UnknownOperation(_)), "{err:?}");
    }

    #[test]
    fn a_failing_transaction_changes_nothing() {
        let (_d, _p, mut store) = fresh();
        let err = store
            .atomically(|tx| {
                tx.add_tenant(&tenant("acme"))?;
                tx.add_device(&dev("0000:3b:00.2"))?;
                tx.add_tenant(&tenant("acme")) // duplicate: fails
            })
            .expect_err("duplicate");
        assert!(matches!(err, StoreError::TenantExists(_)), "{err:?}");
        let (tenants, devices) = store
            .atomically(|tx| Ok((tx.tenants()?, tx.devices()?)))
            .expect("read");
        assert!(tenants.is_empty() && devices.is_empty());
    }

    #[test]
    fn tenants_holding_devices_cannot_be_removed() {
        let (_d, _p, mut store) = fresh();
        let d = dev("0000:3b:00.2");
        store
            .atomically(|tx| {
                tx.add_tenant(&tenant("acme"))?;
                tx.add_device(&d)?;
                tx.set_device_state(
                    &d,
                    &DeviceState::Free,
                    &DeviceState::Preparing {
                        tenant: tid("acme"),
                        vm: None,
                    },
                )
            })
            .expect("setup");
        let err = store
            .atomically(|tx| tx.remove_tenant(&tid("acme")))
            .expect_err("in use");
        assert!(
            matches!(err, StoreError::TenantInUse { count: 1, .. }),
            "{err:?}"
        );
        store
            .atomically(|tx| {
                tx.set_device_state(
                    &d,
                    &DeviceState::Preparing {
                        tenant: tid("acme"),
                        vm: None,
                    },
                    &DeviceState::Quarantined {
                        reason: "gate failed".into(),
                    },
                )?;
                tx.remove_tenant(&tid("acme"))
            })
            .expect("removed once released");
        assert!(
            store
                .atomically(|tx| tx.tenants())
                .expect("list")
                .is_empty()
        );
    }

    fn nonce(n: &str, device: &str) -> StateNonce {
        StateNonce {
            nonce: n.into(),
            envelope: "0123456789abcdef0123456789abcdef".into(),
            device: dev(device),
            tenant: tid("acme"),
            vm: "4b1c5c52-9d4e-4f43-a0d6-1e0f2f3a4b5c".into(),
            signer: "fedcba9876543210fedcba9876543210".into(),
            admitted_at_ms: 1000,
            expires_at_ms: 2000,
        }
    }

    const N1: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn an_envelope_nonce_is_admitted_once_and_remembered_forever() {
        let (_d, path, mut store) = fresh();
        assert_eq!(
            store.atomically(|tx| tx.state_nonce(N1)).expect("read"),
            None
        );
        let n = nonce(N1, "0000:3b:00.1");
        store
            .atomically(|tx| tx.record_state_nonce(&n))
            .expect("first admission");
        assert_eq!(
            store.atomically(|tx| tx.state_nonce(N1)).expect("read"),
            Some(n.clone())
        );
        // A replay, even to another device, is refused.
        let err = store
            .atomically(|tx| tx.record_state_nonce(&nonce(N1, "0000:5e:10.0")))
            .expect_err("replay");
        assert!(matches!(err, StoreError::NonceUsed { .. }), "{err:?}");
        assert!(err.to_string().contains("0000:3b:00.1"), "{err}");
        // Survives reopening; plain SQL cannot forget or change it.
        drop(store);
        let mut store = SqliteStore::open(&path).expect("reopen");
        assert!(
            store
                .atomically(|tx| tx.state_nonce(N1))
                .expect("read")
                .is_some()
        );
        for q in [
            "DELETE FROM state_nonces",
            "UPDATE state_nonces SET device = '0000:00:00.0'",
        ] {
            let e = store.conn.execute(q, []).expect_err(q);
            assert!(e.to_string().contains("remembered"), "{q}: {e}");
        }
    }

    /// issue 14 item 4: retention bounds what grew without bound. A prune
    /// removes the operations finished by the anchor record's time with their
    /// journals (never an unfinished one), and the nonces of envelopes that
    /// expired; the nonce horizon only moves forward, the ledger refuses to
    /// forget a live nonce or to take one behind the horizon, and both removals
    /// are in the chain, which still verifies.
    #[test]
    fn a_prune_bounds_operations_journals_and_expired_nonces() {
        const OK: fn(&crate::audit::StoredHead) -> Result<(), String> = |_| Ok(());
        let (_d, path, mut store) = fresh();
        let (a, b, c) = (
            dev("0000:3b:00.1"),
            dev("0000:3b:00.2"),
            dev("0000:3b:00.3"),
        );
        store
            .atomically(|tx| {
                tx.add_device(&a)?;
                tx.add_device(&b)?;
                tx.add_device(&c)
            })
            .expect("devices");
        let run = |store: &mut SqliteStore, d: &DeviceId, finish: bool| -> OperationId {
            let op = store.begin_operation(d, "handover").expect("begin");
            store
                .atomically(|tx| {
                    tx.journal_step(op, "reset", StepState::Planned, &json!({}))?;
                    tx.journal_step(op, "reset", StepState::Done, &json!({}))?;
                    tx.audit(&AuditEvent {
                        kind: crate::audit::AuditKind::Step,
                        device: Some(*d),
                        tenant: None,
                        detail: json!({ "op": op.0 }),
                    })?;
                    if finish {
                        tx.finish_operation(op, OpOutcome::Succeeded)?;
                    }
                    Ok(())
                })
                .expect("run");
            op
        };
        let old = run(&mut store, &a, true);
        let open = run(&mut store, &b, false);
        // Time the prune's cut cannot reach: the anchor record is older.
        store
            .conn
            .execute(
                "UPDATE operations SET finished_at_ms = 1 WHERE id = ?1",
                [old.0],
            )
            .expect("age the first operation");
        let later = run(&mut store, &c, true);
        let now = now_ms();
        // Finished after the anchor record's time: run in the same millisecond
        // as that record (a fast disk, or tmpfs), it would be inside the cut.
        store
            .conn
            .execute(
                "UPDATE operations SET finished_at_ms = ?2 WHERE id = ?1",
                rusqlite::params![later.0, now + 60_000],
            )
            .expect("finish the last operation after the cut");
        let expired = StateNonce {
            expires_at_ms: now - 1,
            ..nonce(N1, "0000:3b:00.1")
        };
        let live = StateNonce {
            expires_at_ms: now + 3_600_000,
            ..nonce("ffeeddccbbaa99887766554433221100", "0000:3b:00.2")
        };
        store
            .atomically(|tx| {
                tx.record_state_nonce(&expired)?;
                tx.record_state_nonce(&live)
            })
            .expect("nonces");
        // A live nonce cannot be deleted by hand before any prune, nor after.
        assert!(store.conn.execute("DELETE FROM state_nonces", []).is_err());

        // Keep the newest two records: the cut's anchor is the first
        // operation's step record.
        let rep = store
            .audit_prune(crate::audit::PruneCut::Keep(2), &OK)
            .expect("prune");
        assert_eq!(rep.pruned, 1, "{rep:?}");
        assert_eq!((rep.operations, rep.journal_rows), (1, 2), "{rep:?}");
        assert_eq!(rep.nonces, 1, "{rep:?}");
        let horizon = rep.nonce_horizon_ms.expect("horizon");
        assert!(horizon >= now && horizon < live.expires_at_ms, "{horizon}");
        store
            .atomically(|tx| {
                assert_eq!(tx.operation(old)?, None);
                assert!(tx.journal(old)?.is_empty());
                assert!(tx.operation(open)?.is_some());
                assert_eq!(tx.journal(open)?.len(), 2);
                assert_eq!(tx.open_operations()?.len(), 1);
                assert!(tx.operation(later)?.is_some());
                assert_eq!(tx.journal(later)?.len(), 2);
                assert_eq!(tx.state_nonce(N1)?, None);
                assert_eq!(tx.state_nonce(&live.nonce)?, Some(live.clone()));
                assert_eq!(tx.state_nonce_horizon()?, Some(horizon));
                Ok(())
            })
            .expect("read back");
        // Both removals are in the chain, and it verifies.
        let records = store
            .audit_show(&crate::audit::AuditFilter::default())
            .expect("show");
        let events: Vec<_> = records
            .iter()
            .filter_map(|r| r.detail["event"].as_str())
            .collect();
        assert_eq!(events, ["audit-pruned", "nonces-pruned"], "{records:?}");
        let pruned = records
            .iter()
            .find(|r| r.detail["event"] == "audit-pruned")
            .expect("rec");
        assert_eq!(pruned.detail["operations"], 1);
        assert_eq!(pruned.detail["journal_rows"], 2);
        store.verify().expect("intact");

        // No envelope that expired by the horizon is taken again, even if the
        // clock says otherwise: the store refuses it, and so does SQL.
        let err = store
            .atomically(|tx| tx.record_state_nonce(&expired))
            .expect_err("behind the horizon");
        assert!(matches!(err, StoreError::NonceForgotten { .. }), "{err:?}");
        assert!(err.to_string().contains("Hint:"), "{err}");
        let raw = store.conn.execute(
            "INSERT INTO state_nonces (nonce, envelope, device, tenant, vm, signer, admitted_at_ms, expires_at_ms) \
             SELECT ?1, envelope, device, tenant, vm, signer, admitted_at_ms, ?2 FROM state_nonces",
            params![N1, horizon],
        );
        assert!(raw.expect_err("trigger").to_string().contains("horizon"));
        // The horizon only moves forward; the live nonce is still not deletable.
        let back = store.conn.execute(
            "UPDATE state_nonces_pruned SET through_ms = through_ms - 1",
            [],
        );
        assert!(
            back.expect_err("forward only")
                .to_string()
                .contains("forward")
        );
        assert!(
            store
                .conn
                .execute("DELETE FROM state_nonces_pruned", [])
                .is_err()
        );
        assert!(store.conn.execute("DELETE FROM state_nonces", []).is_err());

        // A second prune with nothing to cut still reports, and survives reopen.
        drop(store);
        let mut store = SqliteStore::open(&path).expect("reopen");
        let rep = store
            .audit_prune(crate::audit::PruneCut::Keep(1_000), &OK)
            .expect("again");
        assert_eq!(
            (rep.pruned, rep.operations, rep.nonces),
            (0, 0, 0),
            "{rep:?}"
        );
        assert_eq!(rep.nonce_horizon_ms, Some(horizon));
    }

    #[test]
    fn a_nonce_commits_and_rolls_back_with_its_audit_record() {
        let (_d, _p, mut store) = fresh();
        let err = store
            .atomically(|tx| {
                tx.record_state_nonce(&nonce(N1, "0000:3b:00.1"))?;
                tx.audit(&AuditEvent {
                    kind: crate::audit::AuditKind::Admit,
                    device: Some(dev("0000:3b:00.1")),
                    tenant: Some(tid("acme")),
                    detail: json!({ "nonce": N1 }),
                })?;
                Err::<(), _>(StoreError::Internal("crash before commit"))
            })
            .expect_err("rolled back");
        assert!(matches!(err, StoreError::Internal(_)));
        assert_eq!(
            store.atomically(|tx| tx.state_nonce(N1)).expect("read"),
            None
        );
        assert_eq!(store.verify().expect("intact").records, 0);
    }

    #[test]
    fn nonce_fields_are_checked() {
        let (_d, _p, mut store) = fresh();
        for bad in [
            nonce("00112233", "0000:3b:00.1"),
            nonce(&N1.to_uppercase(), "0000:3b:00.1"),
            StateNonce {
                signer: "x".into(),
                ..nonce(N1, "0000:3b:00.1")
            },
            StateNonce {
                vm: String::new(),
                ..nonce(N1, "0000:3b:00.1")
            },
        ] {
            assert!(
                store.atomically(|tx| tx.record_state_nonce(&bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(store.atomically(|tx| tx.state_nonce("zz")).is_err());
    }

    #[test]
    fn a_version_5_ledger_keeps_its_nonces_through_the_migration_to_the_horizon() {
        let (_d, path, mut store) = fresh();
        let n = nonce(N1, "0000:3b:00.1");
        store
            .atomically(|tx| tx.record_state_nonce(&n))
            .expect("nonce");
        // Make it a version 5 ledger, as the previous devfence left it.
        store
            .conn
            .execute_batch(
                "DROP TRIGGER state_nonces_never_forgotten; DROP TRIGGER state_nonces_not_behind_horizon; \
                 DROP INDEX state_nonces_by_expiry; DROP TABLE state_nonces_pruned; \
                 CREATE TRIGGER state_nonces_never_forgotten BEFORE DELETE ON state_nonces \
                 BEGIN SELECT RAISE(ABORT, 'admitted envelope nonces are remembered forever'); END; \
                 DELETE FROM schema_version WHERE version >= 6;",
            )
            .expect("downgrade");
        drop(store);
        let mut store = SqliteStore::open(&path).expect("reopen migrates");
        assert_eq!(store.schema_version().expect("version"), 6);
        store
            .atomically(|tx| {
                assert_eq!(tx.state_nonce(N1)?, Some(n.clone()));
                assert_eq!(tx.state_nonce_horizon()?, None);
                Ok(())
            })
            .expect("read");
        // Without a horizon nothing may be forgotten, expired or not.
        assert!(store.conn.execute("DELETE FROM state_nonces", []).is_err());
    }

    #[test]
    fn a_version_1_ledger_is_migrated_to_version_2_keeping_its_data() {
        let (_d, path, mut store) = fresh();
        store
            .atomically(|tx| tx.add_tenant(&tenant("acme")))
            .expect("tenant");
        // Make it a version 1 ledger, as an older devfence left it.
        store
            .conn
            .execute_batch(
                "DROP TRIGGER state_nonces_never_forgotten; DROP TRIGGER state_nonces_never_changed; \
                 DROP TABLE state_nonces; DROP TABLE state_nonces_pruned; DROP TABLE pf_custody; \
                 DROP TRIGGER fabric_restores_never_forgotten; DROP TABLE fabric_restores; \
                 DROP TABLE audit_pruned; DROP TRIGGER audit_no_delete; \
                 CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit \
                 BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END; \
                 DELETE FROM schema_version WHERE version >= 2; PRAGMA application_id = 0;",
            )
            .expect("downgrade");
        drop(store);
        let mut store = SqliteStore::open(&path).expect("reopen migrates");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        assert!(
            store
                .atomically(|tx| tx.tenant(&tid("acme")))
                .expect("t")
                .is_some()
        );
        store
            .atomically(|tx| tx.record_state_nonce(&nonce(N1, "0000:3b:00.1")))
            .expect("the new table works");
    }

    /// issue 18 item 3: a zero-length file, an empty SQLite database and a `-wal`
    /// without its ledger are never taken for a new ledger.
    #[test]
    fn damaged_or_foreign_files_are_never_taken_for_a_new_ledger() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.db");
        std::fs::write(&path, b"").expect("write");
        private(&path);
        let err = SqliteStore::open(&path).expect_err("empty");
        assert!(
            matches!(&err, StoreError::Corrupt { detail, .. } if detail.contains("empty")),
            "{err:?}"
        );
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        std::fs::remove_file(&path).expect("rm");
        rusqlite::Connection::open(&path)
            .expect("open")
            .execute_batch("VACUUM")
            .expect("vacuum");
        private(&path);
        let err = SqliteStore::open(&path).expect_err("empty sqlite");
        assert!(err.to_string().contains("not a devfence ledger"), "{err}");
        std::fs::remove_file(&path).expect("rm");
        // Another program's database with a table named like devfence's marker.
        rusqlite::Connection::open(&path)
            .expect("open")
            .execute_batch("CREATE TABLE schema_version (v INTEGER)")
            .expect("create");
        private(&path);
        let err = SqliteStore::open(&path).expect_err("look-alike");
        assert!(err.to_string().contains("not a devfence ledger"), "{err}");
        std::fs::remove_file(&path).expect("rm");
        std::fs::write(sidecar(&path, "-wal"), b"x").expect("wal");
        let err = SqliteStore::open(&path).expect_err("wal without ledger");
        assert!(err.to_string().contains("-wal"), "{err}");
        assert!(!path.exists());
    }

    /// issue 18 item 3: creating is explicit and never over a file; the ledger and
    /// its -wal/-shm are 0600; a looser mode is refused.
    #[test]
    fn creation_is_explicit_private_and_never_over_a_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.db");
        assert!(matches!(
            SqliteStore::open_existing(&path),
            Err(StoreError::Missing { .. })
        ));
        assert!(!path.exists());
        let mut store = SqliteStore::create(&path).expect("create");
        store
            .atomically(|tx| tx.add_tenant(&tenant("acme")))
            .expect("write");
        for side in ["", "-wal", "-shm", ".audit-head"] {
            let p = sidecar(&path, side);
            let m = std::fs::metadata(&p).expect("exists");
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", p.display());
        }
        assert!(matches!(
            SqliteStore::create(&path),
            Err(StoreError::Exists { .. })
        ));
        drop(store);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = SqliteStore::open(&path).expect_err("loose");
        assert!(
            matches!(err, StoreError::LooseMode { mode: 0o640, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    /// issue 18 items 1 and 2: a P_Key (any membership) and a launcher uid belong to
    /// one tenant; the default partition and (uid_t)-1 are refused.
    #[test]
    fn pkeys_and_launcher_uids_belong_to_one_tenant() {
        let (_d, _p, mut store) = fresh();
        store
            .atomically(|tx| tx.add_tenant(&tenant("acme")))
            .expect("acme");
        let other = |uid: u32, pkey: u16, m: Membership| Tenant {
            id: tid("mallory"),
            launcher_uid: Some(uid),
            launcher_gid: Some(300),
            security_label: None,
            partitions: vec![Partition {
                pkey: PKey(pkey),
                membership: m,
            }],
        };
        for (t, what) in [
            (
                other(300, 0x0001, Membership::Limited),
                "belongs to tenant acme",
            ),
            (
                other(300, 0x8002, Membership::Full),
                "belongs to tenant acme",
            ),
            (
                other(107, 0x8003, Membership::Full),
                "uid 107 belongs to tenant acme",
            ),
            (other(300, 0x7fff, Membership::Limited), "default partition"),
            (other(u32::MAX, 0x8003, Membership::Full), "4294967295"),
        ] {
            let err = store
                .atomically(|tx| tx.add_tenant(&t))
                .expect_err("refused");
            assert!(err.to_string().contains(what), "{what}: {err}");
            assert!(err.to_string().contains("Hint:"), "{err}");
        }
        assert_eq!(store.atomically(|tx| tx.tenants()).expect("t").len(), 1);
        store
            .atomically(|tx| tx.add_tenant(&other(300, 0x8003, Membership::Full)))
            .expect("a tenant of its own");
    }

    /// issue 18 item 4: a candidate GUID that is live elsewhere is skipped and
    /// remembered as foreign.
    #[test]
    fn live_guids_are_skipped_and_remembered() {
        let (_d, _p, mut store) = fresh();
        let d = dev("0000:3b:00.2");
        let g = store
            .atomically(|tx| {
                tx.add_tenant(&tenant("acme"))?;
                tx.set_guid_pool(GuidRange {
                    first: Guid(0x10),
                    last: Guid(0x20),
                })?;
                tx.allocate_guid_avoiding(&d, &tid("acme"), &mut |g| {
                    Ok((g.0 < 0x13).then(|| format!("{g} is on a port")))
                })
            })
            .expect("allocate");
        assert_eq!(g, Guid(0x13));
        let rec = store.atomically(|tx| tx.guid(Guid(0x11))).expect("read");
        assert_eq!(rec.expect("known").state, GuidState::Foreign);
        let err = store
            .atomically(|tx| {
                tx.allocate_guid_avoiding(&d, &tid("acme"), &mut |g| {
                    Err(StoreError::GuidLiveCheck {
                        guid: g,
                        reason: "SM unreachable".into(),
                    })
                })
            })
            .expect_err("fail closed");
        assert!(err.to_string().contains("SM unreachable"), "{err}");
    }

    /// issue 18 item 8: the head kept beside the ledger catches a cut tail, an
    /// emptied chain, a rewritten chain and a deleted head.
    #[test]
    fn the_stored_head_catches_cuts_and_rewrites() {
        let ok_sig = |_: &audit::StoredHead| Ok(());
        let grow = |store: &mut SqliteStore| {
            for i in 0..3 {
                store
                    .atomically(|tx| {
                        tx.audit(&AuditEvent {
                            kind: audit::AuditKind::Ledger,
                            device: None,
                            tenant: None,
                            detail: serde_json::json!({ "i": i }),
                        })
                    })
                    .expect("append");
            }
        };
        // A new ledger verifies (head seq 0); a grown one too.
        let (_d, path, mut store) = fresh();
        store.verify_with_head(None, &ok_sig).expect("new ledger");
        grow(&mut store);
        store.refresh_head().expect("head");
        let (rep, head) = store.verify_with_head(None, &ok_sig).expect("intact");
        assert_eq!(rep.records, 3);
        assert_eq!(head.expect("head").seq, 3);
        let unlock = "DROP TRIGGER audit_no_delete; DROP TRIGGER audit_no_update;";
        // Tail cut.
        store
            .conn
            .execute_batch(&format!("{unlock} DELETE FROM audit WHERE seq = 3;"))
            .expect("cut");
        let e = store.verify_with_head(None, &ok_sig).expect_err("cut");
        assert!(e.to_string().contains("truncated"), "{e}");
        // A later append must not launder the cut: the head stays.
        grow(&mut store);
        store.refresh_head().expect("head");
        assert!(store.verify_with_head(None, &ok_sig).is_err());
        // Everything deleted.
        store
            .conn
            .execute_batch("DELETE FROM audit;")
            .expect("empty");
        assert!(store.verify_with_head(None, &ok_sig).is_err());
        // The head deleted.
        std::fs::remove_file(audit::head_path(&path)).expect("rm head");
        let e = store.verify_with_head(None, &ok_sig).expect_err("no head");
        assert!(e.to_string().contains("missing"), "{e}");
        // A bad signature.
        let (_d2, _p2, mut store) = fresh();
        grow(&mut store);
        store.refresh_head().expect("head");
        let e = store
            .verify_with_head(None, &|_| Err("bad signature".into()))
            .expect_err("sig");
        assert!(e.to_string().contains("bad signature"), "{e}");
    }
}
