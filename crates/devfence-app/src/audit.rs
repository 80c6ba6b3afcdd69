//! `devfence audit`: the chain's head, its verification (against the head kept
//! beside the ledger, signed with this host's key, and a head the operator
//! kept elsewhere), retention, and the records of a device or tenant.

use devfence_engine::audit::{PruneCut, PruneReport, StoredHead};
use devfence_engine::{
    AuditError, AuditFilter, AuditRecord, ChainHead, SqliteStore, Store, VerifyReport,
};
use devfence_host::HostRoot;

use crate::error::{AppError, Result};

/// The chain's head as the ledger has it and as it is kept beside the ledger.
#[derive(Debug)]
pub struct Head {
    /// The newest record (`None`: no record yet).
    pub head: Option<ChainHead>,
    /// The head file beside the ledger, if any.
    pub stored: Option<StoredHead>,
}

/// `audit head`.
///
/// # Errors
/// The ledger or the head file cannot be read.
pub fn head(store: &SqliteStore) -> Result<Head> {
    let head = store.last_record()?;
    let stored = devfence_engine::audit::read_head(&store.head_path()).map_err(|e| {
        AppError::invalid(format!(
            "{e}. Hint: `devfence audit verify` says what is wrong"
        ))
    })?;
    Ok(Head { head, stored })
}

/// What `audit verify` found.
#[derive(Debug)]
pub enum Verified {
    /// Intact: every record links, and the chain reaches the stored head
    /// (and the head given).
    Intact {
        /// The chain.
        report: VerifyReport,
        /// The head kept beside the ledger.
        stored: Option<StoredHead>,
    },
    /// Broken: where and how.
    Broken(AuditError),
}

/// `audit verify`: the chain, the head beside the ledger (its signature by this
/// host's key) and, if given, a head kept elsewhere.
///
/// # Errors
/// The ledger or the keys cannot be read (a broken chain is
/// [`Verified::Broken`], not an error).
pub fn verify(
    root: &HostRoot,
    store: &mut SqliteStore,
    external: Option<&ChainHead>,
) -> Result<Verified> {
    let check = crate::env::check_head_signature(root)?;
    match store.verify_with_head(external, &check) {
        Ok((report, stored)) => Ok(Verified::Intact { report, stored }),
        Err(e @ AuditError::ChainBroken(_)) => Ok(Verified::Broken(e)),
        Err(e) => Err(e.into()),
    }
}

/// `audit prune`: drops the records before the cut, keeping the chain's
/// anchor (the head stays verifiable).
///
/// # Errors
/// The chain does not verify; the ledger cannot be written.
pub fn prune(root: &HostRoot, store: &mut SqliteStore, cut: PruneCut) -> Result<PruneReport> {
    let check = crate::env::check_head_signature(root)?;
    Ok(store.audit_prune(cut, &check)?)
}

/// `audit show`: the records `filter` selects, oldest first.
///
/// # Errors
/// The ledger cannot be read.
pub fn show(store: &mut dyn Store, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
    Ok(store.audit_show(filter)?)
}

/// One audit record as an exported JSON line (`devfence audit export`, the
/// agent's `[agent] audit_export`; docs/json.md "Audit export"): the fields
/// audit checklists ask for (time, actor, action, target, outcome) beside the
/// record itself (seq, kind, detail, prev_hash, hash), so a line can be
/// checked against the chain ([`ExportLine::hash_matches`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ExportLine {
    /// The line format's version.
    pub schema: u32,
    /// The record's position in the chain.
    pub seq: u64,
    /// When it was written, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The same instant, ms since the epoch (what the hash covers).
    pub at_ms: i64,
    /// Who: the agent's peer (`{uid, gid, pid, via: "agent"}`) or
    /// `{via: "local"}`, a devfence process on the host (the CLI, the libvirt
    /// hook, recovery), which needs root to write the ledger.
    pub actor: serde_json::Value,
    /// What: the record's kind and, after a colon, its step, gate, action or
    /// event (`step:bind-vfio`, `gate:sm-converged`, `ledger:tenant-add`,
    /// `refusal`, `recovery:recover:finish`).
    pub action: String,
    /// On what: the device and the tenant, each `null` when none.
    pub target: Target,
    /// How it ended: `succeeded`, `failed`, `refused` or `planned` (a step
    /// journalled before it acts).
    pub outcome: &'static str,
    /// The record's kind (`step`, `gate`, `refusal`, `recovery`, `ledger`, …).
    pub kind: &'static str,
    /// The record's evidence and context, as stored.
    pub detail: serde_json::Value,
    /// The hash of record `seq - 1`.
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
}

/// An exported record's target.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    /// The device (a BDF, mdev UUID or APQN).
    pub device: Option<String>,
    /// The tenant.
    pub tenant: Option<String>,
}

/// The line format's version ([`ExportLine::schema`]).
pub const EXPORT_SCHEMA: u32 = 1;

impl ExportLine {
    /// The line of `r`.
    #[must_use]
    pub fn of(r: &AuditRecord) -> ExportLine {
        let d = &r.detail;
        let s = |k: &str| d.get(k).and_then(serde_json::Value::as_str);
        let what = ["gate", "step", "action", "event"].into_iter().find_map(&s);
        let kind = r.kind.name();
        let action = match what {
            Some(w) if w == kind => kind.to_owned(),
            // A gate's journal name is `gate:<name>` already.
            Some(w) if w.strip_prefix(kind).is_some_and(|r| r.starts_with(':')) => w.to_owned(),
            Some(w) => format!("{kind}:{w}"),
            None => kind.to_owned(),
        };
        let passed = d
            .get("passed")
            .or_else(|| d.get("detail").and_then(|x| x.get("passed")))
            .and_then(serde_json::Value::as_bool);
        let outcome = match (r.kind, s("outcome"), passed, s("result"), s("state")) {
            (devfence_engine::AuditKind::Refusal, Some("failed"), ..) => "failed",
            (devfence_engine::AuditKind::Refusal, ..) => "refused",
            (_, Some("failed"), ..) | (_, _, Some(false), ..) => "failed",
            (_, Some(_), ..) | (_, _, Some(true), ..) => "succeeded",
            (_, _, _, Some("verified"), _) => "succeeded",
            (_, _, _, Some(_), _) => "failed",
            (_, _, _, _, Some("planned")) => "planned",
            (_, _, _, _, Some("failed")) => "failed",
            _ => "succeeded",
        };
        ExportLine {
            schema: EXPORT_SCHEMA,
            seq: r.seq,
            time: rfc3339_ms(r.at_ms),
            at_ms: r.at_ms,
            actor: d
                .get("actor")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({ "via": "local" })),
            action,
            target: Target {
                device: r.device.map(|x| x.to_string()),
                tenant: r.tenant.as_ref().map(ToString::to_string),
            },
            outcome,
            kind,
            detail: r.detail.clone(),
            prev_hash: r.prev_hash.to_string(),
            hash: r.hash.to_string(),
        }
    }

    /// The line as one line of JSON, without its newline.
    #[must_use]
    pub fn to_json(&self) -> String {
        // Plain data: rendering cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether `hash` is the hash of the record the line carries (its seq,
    /// time, kind, target, detail and prev_hash): an exported line checked
    /// without the ledger; `devfence audit show` has the same hash at the
    /// same seq while the chain holds it.
    #[must_use]
    pub fn hash_matches(&self) -> bool {
        let Some(prev) = devfence_engine::Hash::from_hex(&self.prev_hash) else {
            return false;
        };
        let detail = serde_json::to_string(&self.detail).unwrap_or_default();
        devfence_engine::audit::record_hash(
            self.seq,
            self.at_ms,
            self.kind,
            self.target.device.as_deref(),
            self.target.tenant.as_deref(),
            &detail,
            &prev,
        )
        .to_string()
            == self.hash
    }
}

/// `at_ms` (ms since the epoch) as RFC 3339 UTC: `2026-12-05T01:02:03.004Z`.
#[must_use]
pub fn rfc3339_ms(at_ms: i64) -> String {
    let secs = at_ms.div_euclid(1000);
    let ms = at_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// The most records one read of the chain returns to an exporter.
pub const EXPORT_PAGE: usize = 512;

/// `audit export`: the lines of the records after seq `after`, oldest first,
/// at most [`EXPORT_PAGE`] (call again from the last one's seq for more).
///
/// # Errors
/// The ledger cannot be read.
pub fn export_after(store: &mut SqliteStore, after: u64) -> Result<Vec<ExportLine>> {
    Ok(store
        .audit_after(after, EXPORT_PAGE)?
        .iter()
        .map(ExportLine::of)
        .collect())
}

/// The seq of the last complete line of an export file (`None`: no file,
/// or no complete line with a seq): where appending to it resumes. Reads at
/// most the file's last 1 MiB; the file must be a regular file.
///
/// # Errors
/// The file is not a regular file or cannot be read.
pub fn last_exported_seq(path: &std::path::Path) -> Result<Option<u64>> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(AppError::invalid(format!(
                "Cannot read the audit export {}: {e}. Hint: give a regular file devfence may read and append to",
                path.display()
            )));
        }
    };
    let meta = f
        .metadata()
        .map_err(|e| AppError::invalid(format!("Cannot inspect {}: {e}", path.display())))?;
    if !meta.file_type().is_file() {
        return Err(AppError::invalid(format!(
            "The audit export {} is not a regular file. Hint: give a regular file (or - for standard output)",
            path.display()
        )));
    }
    const TAIL: u64 = 1 << 20;
    let start = meta.len().saturating_sub(TAIL);
    let mut buf = Vec::new();
    f.seek(SeekFrom::Start(start))
        .and_then(|_| f.take(TAIL).read_to_end(&mut buf))
        .map_err(|e| AppError::invalid(format!("Cannot read {}: {e}", path.display())))?;
    // Only complete lines: a line cut by a crash is not a record exported.
    let complete = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => &buf[..i],
        None => return Ok(None),
    };
    Ok(complete.split(|&b| b == b'\n').rev().find_map(|l| {
        serde_json::from_slice::<serde_json::Value>(l)
            .ok()
            .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64))
    }))
}

/// Opens the export file `p` to append: created 0640 (with its directory,
/// 0750) when absent, a regular file only, and a last line a crash cut is
/// ended first so the next record starts a line of its own.
///
/// # Errors
/// The file or its directory cannot be made or opened, or is not a regular file.
pub fn open_export(p: &std::path::Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail = |what: &str, e: std::io::Error| {
        AppError::invalid(format!(
            "Cannot {what} the audit export {}: {e}. Hint: give a file devfence may create or append to",
            p.display()
        ))
    };
    if let Some(dir) = p.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| fail("create the directory of", e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(O_NONBLOCK)
        .open(p)
        .map_err(|e| fail("open", e))?;
    let m = f.metadata().map_err(|e| fail("inspect", e))?;
    if !m.file_type().is_file() {
        return Err(AppError::invalid(format!(
            "The audit export {} is not a regular file. Hint: give a regular file",
            p.display()
        )));
    }
    if m.len() > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::End(-1))
            .and_then(|_| f.read_exact(&mut last))
            .map_err(|e| fail("read", e))?;
        if last[0] != b'\n' {
            f.write_all(b"\n").map_err(|e| fail("append to", e))?;
        }
    }
    Ok(f)
}

/// `O_NONBLOCK` on Linux: a FIFO at an export's path must not hang the open.
const O_NONBLOCK: i32 = 0o4000;

#[cfg(test)]
mod export_tests {
    use super::*;
    use devfence_engine::{AuditEvent, AuditKind, StoreExt};

    #[test]
    fn rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_796_432_523_004), "2026-12-05T01:02:03.004Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    /// issue 12 item 8: every record's line has the checklist fields, its
    /// hash checks against the chain, and the outcome and actor are read
    /// from the detail; an edited line no longer checks.
    #[test]
    fn lines_carry_the_fields_and_check_against_the_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("ledger.db")).expect("ledger");
        let dev: devfence_model::DeviceId = "0000:5e:10.0".parse().expect("dev");
        let events = [
            (
                AuditKind::Step,
                serde_json::json!({"operation": 1, "step": "bind-vfio", "state": "planned", "detail": {}}),
            ),
            (
                AuditKind::Gate,
                serde_json::json!({"operation": 1, "step": "gate:driver", "state": "done", "detail": {"passed": true}}),
            ),
            (AuditKind::Refusal, serde_json::json!({"refused": "no"})),
            (
                AuditKind::Refusal,
                serde_json::json!({"outcome": "failed", "reason": "x"}),
            ),
            (
                AuditKind::Ledger,
                serde_json::json!({"action": "tenant-add"}),
            ),
        ];
        for (kind, detail) in &events {
            store
                .atomically(|tx| {
                    tx.audit(&AuditEvent {
                        kind: *kind,
                        device: Some(dev),
                        tenant: Some("acme".parse().expect("t")),
                        detail: detail.clone(),
                    })
                })
                .expect("append");
        }
        store.set_actor(Some(
            serde_json::json!({"uid": 1000, "gid": 1000, "pid": 7, "via": "agent"}),
        ));
        store
            .atomically(|tx| {
                tx.audit(&AuditEvent {
                    kind: AuditKind::Step,
                    device: None,
                    tenant: None,
                    detail: serde_json::json!({"step": "vm-start"}),
                })
            })
            .expect("append");
        let lines = export_after(&mut store, 0).expect("export");
        let got: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| (l.action.as_str(), l.outcome))
            .collect();
        assert_eq!(
            got,
            [
                ("step:bind-vfio", "planned"),
                ("gate:driver", "succeeded"),
                ("refusal", "refused"),
                ("refusal", "failed"),
                ("ledger:tenant-add", "succeeded"),
                ("step:vm-start", "succeeded"),
            ]
        );
        for l in &lines {
            assert!(l.hash_matches(), "{l:?}");
            let v: serde_json::Value = serde_json::from_str(&l.to_json()).expect("json");
            for k in [
                "time", "actor", "action", "target", "outcome", "seq", "hash",
            ] {
                assert!(v.get(k).is_some(), "{k} missing: {v}");
            }
            assert!(!l.to_json().contains('\n'));
        }
        assert_eq!(lines[0].actor, serde_json::json!({"via": "local"}));
        assert_eq!(lines[5].actor["uid"], 1000);
        assert_eq!(lines[0].target.device.as_deref(), Some("0000:5e:10.0"));
        let mut forged = lines[2].clone();
        forged.detail = serde_json::json!({"refused": "yes"});
        assert!(!forged.hash_matches());
        assert_eq!(
            export_after(&mut store, 4)
                .expect("after")
                .iter()
                .map(|l| l.seq)
                .collect::<Vec<_>>(),
            [5, 6]
        );
        // Resuming from a file: its last complete line's seq.
        let f = dir.path().join("audit.jsonl");
        assert_eq!(last_exported_seq(&f).expect("none"), None);
        let mut text: String = lines[..3].iter().map(|l| l.to_json() + "\n").collect();
        text.push_str("{\"seq\": 99, \"cut"); // a line a crash cut
        std::fs::write(&f, &text).expect("write");
        assert_eq!(last_exported_seq(&f).expect("tail"), Some(3));
        let e = last_exported_seq(dir.path()).expect_err("a directory");
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
