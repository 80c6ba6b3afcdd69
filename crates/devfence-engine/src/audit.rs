//! The append-only, hash-chained audit log.
//!
//! Every decision — a journalled step, a gate result with its evidence, a refusal,
//! a recovery — becomes one [`AuditRecord`]. Record `n` carries `prev_hash`, the hash
//! of record `n - 1` (32 zero bytes for record 1), and its own `hash`:
//!
//! ```text
//! hash = SHA-256( "devfence-audit-v1"
//!                 ‖ u64be(seq) ‖ i64be(at_ms)
//!                 ‖ str(kind) ‖ opt(device) ‖ opt(tenant) ‖ str(detail) ‖ prev_hash[32] )
//! str(s) = u64be(len(s)) ‖ bytes(s)          opt(None) = 0x00, opt(Some(s)) = 0x01 ‖ str(s)
//! ```
//!
//! `detail` is hashed exactly as stored (compact JSON text), so verifying never
//! depends on re-serialising JSON. Records are stored in the ledger's own database
//! (table `audit`), in the same transaction as the ledger change they describe
//! ([`crate::Tx::audit`]).
//!
//! # What [`verify`](crate::Store::audit_verify) detects
//!
//! Reading the records in storage order, it reports the first one where:
//! the stored hash differs from the recomputed one (an **edited** record, or a
//! **swapped** one — seq is inside the hash); the seq skips ahead (a **deleted**
//! record: a gap); the seq does not increase (an **inserted** or **reordered**
//! record); or `prev_hash` is not the previous record's hash (an inserted record
//! with a forged hash, a splice). It says where: the seq and what is wrong.
//!
//! # What it cannot detect
//!
//! The hash is not keyed, so someone who can write the database can **truncate the
//! tail** (delete the newest records) or **rewrite the chain from some record on**
//! and recompute every later hash: the shorter or rewritten chain is internally
//! consistent. The defence is an anchor kept elsewhere: the [`ChainHead`] (seq and
//! hash of the newest record), which `audit_verify(Some(&anchor))` requires the
//! chain to reach with the anchor's hash. The SQLite store keeps one beside the
//! ledger ([`StoredHead`], `<ledger>.audit-head`, 0600, replaced atomically after
//! every commit that appended records, signed with the host key where there is one;
//! see `SqliteStore::verify_with_head`), and an operator can keep one anywhere the
//! database's writer cannot change (`devfence audit head` / `audit verify --head`).
//! Records appended after the head remain unprotected until the next head.
//!
//! # Secrets never enter
//!
//! No function here takes a token or credential, and none may be put into a
//! `detail`. A caller that must prove which token was used records a keyed hash
//! (e.g. HMAC-SHA-256 with a host key that never leaves memory) of it, never the
//! token itself (docs/design.md §2 principle 4).

use std::fmt;

use devfence_model::{DeviceId, TenantId};
use rusqlite::types::ValueRef;
use sha2::{Digest, Sha256};

use crate::store::StoreError;

/// Domain separation tag at the start of every hashed record.
const HASH_TAG: &str = "devfence-audit-v1";

/// A SHA-256 hash of a record.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The `prev_hash` of record 1.
    pub const GENESIS: Hash = Hash([0; 32]);

    /// Parses 64 lowercase or uppercase hex digits.
    #[must_use]
    pub fn from_hex(s: &str) -> Option<Hash> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = u8::try_from(hi * 16 + lo).ok()?;
        }
        Some(Hash(out))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl schemars::JsonSchema for Hash {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Hash".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "description": "A BLAKE3 digest, 64 hex digits." })
    }
}

impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        Hash::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("a hash is 64 hex digits (SHA-256)"))
    }
}

/// What a record is about.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AuditKind {
    /// A journalled step (planned, done or failed).
    Step,
    /// A gate's result, with the evidence read back.
    Gate,
    /// A refused request and why.
    Refusal,
    /// What recovery did after a crash.
    Recovery,
    /// A change of the ledger itself (tenant added, GUID retired, …).
    Ledger,
    /// A device's state sealed into an envelope (`devfence state seal`).
    Seal,
    /// A device-state envelope admitted to a device (`devfence state admit`).
    /// Its refusals are [`AuditKind::Refusal`] records.
    Admit,
    /// A change of the host key or the keyring of trusted source hosts.
    Keys,
    /// An operator's request to the fleet (a lost host's memberships revoked
    /// at the SM). Its refusals are [`AuditKind::Refusal`] records.
    Fleet,
}

impl AuditKind {
    /// The stored name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            AuditKind::Step => "step",
            AuditKind::Gate => "gate",
            AuditKind::Refusal => "refusal",
            AuditKind::Recovery => "recovery",
            AuditKind::Ledger => "ledger",
            AuditKind::Seal => "seal",
            AuditKind::Admit => "admit",
            AuditKind::Keys => "keys",
            AuditKind::Fleet => "fleet",
        }
    }

    /// The kind with the stored name `s`.
    #[must_use]
    pub fn from_name(s: &str) -> Option<AuditKind> {
        [
            AuditKind::Step,
            AuditKind::Gate,
            AuditKind::Refusal,
            AuditKind::Recovery,
            AuditKind::Ledger,
            AuditKind::Seal,
            AuditKind::Admit,
            AuditKind::Keys,
            AuditKind::Fleet,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }
}

/// What a caller asks to record. The store adds seq, time and the hashes.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    /// What kind of decision.
    pub kind: AuditKind,
    /// The device it concerns.
    pub device: Option<DeviceId>,
    /// The tenant it concerns.
    pub tenant: Option<TenantId>,
    /// Evidence and context (never a secret).
    pub detail: serde_json::Value,
}

/// One stored record.
#[derive(Clone, Debug, PartialEq, serde::Serialize, schemars::JsonSchema, serde::Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// When it was written (ms since the epoch).
    pub at_ms: i64,
    /// What kind of decision.
    pub kind: AuditKind,
    /// The device it concerns.
    pub device: Option<DeviceId>,
    /// The tenant it concerns.
    pub tenant: Option<TenantId>,
    /// Evidence and context.
    pub detail: serde_json::Value,
    /// The hash of record `seq - 1`.
    pub prev_hash: Hash,
    /// This record's hash.
    pub hash: Hash,
}

/// Which records [`show`](crate::Store::audit_show) returns: those matching every
/// field that is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only records about this device.
    pub device: Option<DeviceId>,
    /// Only records about this tenant.
    pub tenant: Option<TenantId>,
}

/// The newest record of a chain: what to keep elsewhere as an anchor.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct ChainHead {
    /// Its seq.
    pub seq: u64,
    /// Its hash.
    pub hash: Hash,
}

/// An intact chain.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct VerifyReport {
    /// How many records were checked.
    pub records: u64,
    /// The newest record, if any.
    pub head: Option<ChainHead>,
    /// Whether an anchor was checked too.
    pub anchored: bool,
}

/// What is wrong at the first bad record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum ChainProblem {
    /// The stored hash is not the hash of the record's contents (edited or swapped).
    HashMismatch {
        /// What is stored.
        stored: Hash,
        /// What the contents hash to.
        computed: Hash,
    },
    /// Records are missing before this one (deleted).
    Gap {
        /// The seq that should have come.
        expected: u64,
    },
    /// The seq does not increase (inserted or reordered).
    SeqOutOfOrder {
        /// The seq that should have come.
        expected: u64,
    },
    /// `prev_hash` is not the previous record's hash.
    PrevHashMismatch {
        /// The previous record's hash.
        expected: Hash,
        /// What this record says.
        found: Hash,
    },
    /// A column holds something devfence never writes.
    Malformed {
        /// The column.
        column: &'static str,
        /// Why.
        reason: String,
    },
    /// The chain ends before the anchored head (tail truncated).
    Truncated {
        /// The anchor's seq.
        anchor_seq: u64,
        /// The last seq present.
        last_seq: u64,
    },
    /// The record at the anchor's seq has another hash (rewritten).
    AnchorMismatch {
        /// The anchor's hash.
        anchor: Hash,
        /// The stored hash.
        found: Hash,
    },
    /// The anchor given lies in the pruned part of the chain: its record is gone,
    /// so the chain cannot be shown to reach it.
    AnchorPruned {
        /// The anchor's seq.
        anchor_seq: u64,
        /// The last pruned seq (the chain now starts after it).
        pruned_through: u64,
    },
    /// The chain has records but no head is kept beside the ledger (deleted).
    HeadMissing,
    /// The head kept beside the ledger cannot be trusted (unreadable, unsigned
    /// though the host has a key, or its signature does not verify).
    HeadInvalid {
        /// What is wrong.
        reason: String,
    },
}

/// The first bad record of a chain.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct ChainBreak {
    /// 1-based position of the record in storage order.
    pub position: u64,
    /// The seq the record carries (for a gap or truncation: the seq found there).
    pub seq: Option<u64>,
    /// What is wrong.
    pub problem: ChainProblem,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = match self.seq {
            Some(s) => format!("record seq {s} (position {})", self.position),
            None => format!("the record at position {}", self.position),
        };
        match &self.problem {
            ChainProblem::HashMismatch { stored, computed } => write!(
                f,
                "{at}: its contents hash to {computed}, but {stored} is stored (edited or swapped)"
            ),
            ChainProblem::Gap { expected } => {
                write!(f, "{at}: seq {expected} is missing before it (deleted)")
            }
            ChainProblem::SeqOutOfOrder { expected } => write!(
                f,
                "{at}: seq {expected} was expected (inserted or reordered)"
            ),
            ChainProblem::PrevHashMismatch { expected, found } => write!(
                f,
                "{at}: prev_hash is {found}, but the previous record's hash is {expected}"
            ),
            ChainProblem::Malformed { column, reason } => {
                write!(f, "{at}: column {column} is malformed: {reason}")
            }
            ChainProblem::Truncated {
                anchor_seq,
                last_seq,
            } => write!(
                f,
                "the chain ends at seq {last_seq}, before the anchored seq {anchor_seq} (tail truncated)"
            ),
            ChainProblem::AnchorMismatch { anchor, found } => write!(
                f,
                "{at}: hash {found} differs from the anchored {anchor} (rewritten)"
            ),
            ChainProblem::AnchorPruned {
                anchor_seq,
                pruned_through,
            } => write!(
                f,
                "the anchored seq {anchor_seq} was pruned (records up to seq {pruned_through} \
                 were removed by `devfence audit prune`), so the chain cannot be shown to reach \
                 it; give a head taken after the prune"
            ),
            ChainProblem::HeadMissing => f.write_str(
                "the chain head kept beside the ledger is missing (deleted?), so a cut or \
                 rewritten chain could not be told from an intact one",
            ),
            ChainProblem::HeadInvalid { reason } => {
                write!(f, "the chain head kept beside the ledger: {reason}")
            }
        }
    }
}

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The chain is broken.
    #[error(
        "The audit chain is broken at {0}. Hint: the database was changed outside devfence; \
         keep a copy for investigation and compare it with the last backup"
    )]
    ChainBroken(ChainBreak),
    /// A prune that would cut where the chain could not be kept verifiable.
    #[error(
        "Cannot prune the audit chain: {reason}. Hint: `devfence audit prune --keep N` \
         keeps the newest N records (N >= 1)"
    )]
    BadCut {
        /// Why.
        reason: String,
    },
    /// The ledger failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A record as stored, before any parsing: what the hash covers.
#[derive(Clone, Debug)]
pub(crate) struct RawRecord {
    pub seq: Result<u64, String>,
    pub at_ms: Result<i64, String>,
    pub kind: Result<String, String>,
    pub device: Result<Option<String>, String>,
    pub tenant: Result<Option<String>, String>,
    pub detail: Result<String, String>,
    pub prev_hash: Result<Hash, String>,
    pub hash: Result<Hash, String>,
}

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

fn put_opt(h: &mut Sha256, s: Option<&str>) {
    match s {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            put_str(h, s);
        }
    }
}

/// The hash of one record's contents (see the module docs for the encoding).
#[must_use]
pub fn record_hash(
    seq: u64,
    at_ms: i64,
    kind: &str,
    device: Option<&str>,
    tenant: Option<&str>,
    detail: &str,
    prev_hash: &Hash,
) -> Hash {
    let mut h = Sha256::new();
    put_str(&mut h, HASH_TAG);
    h.update(seq.to_be_bytes());
    h.update(at_ms.to_be_bytes());
    put_str(&mut h, kind);
    put_opt(&mut h, device);
    put_opt(&mut h, tenant);
    put_str(&mut h, detail);
    h.update(prev_hash.0);
    let out = h.finalize();
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(&out);
    Hash(bytes)
}

/// A record as stored, borrowed from the row being read: what the hash covers.
/// A column that is not what devfence writes is an `Err` naming why.
pub(crate) struct RawRef<'a> {
    pub seq: Result<u64, String>,
    pub at_ms: Result<i64, String>,
    pub kind: Result<&'a str, String>,
    pub device: Result<Option<&'a str>, String>,
    pub tenant: Result<Option<&'a str>, String>,
    pub detail: Result<&'a str, String>,
    pub prev_hash: Result<Hash, String>,
    pub hash: Result<Hash, String>,
}

/// Checks a chain one record at a time, in storage order, without keeping the
/// records: `start` is where it begins (the pruning anchor, or seq 0 and the
/// genesis hash); `anchor` additionally requires the anchored record to be
/// present with its hash.
pub(crate) struct ChainCheck {
    anchor: Option<ChainHead>,
    anchor_seen: bool,
    expected: u64,
    prev: Hash,
    position: u64,
    head: Option<ChainHead>,
}

impl ChainCheck {
    /// A check starting after `start` (seq 0 and [`Hash::GENESIS`] for a chain
    /// never pruned).
    pub(crate) fn new(start: ChainHead, anchor: Option<&ChainHead>) -> Result<Self, ChainBreak> {
        let mut anchor_seen = false;
        if let Some(a) = anchor {
            if a.seq < start.seq {
                return Err(ChainBreak {
                    position: 0,
                    seq: Some(a.seq),
                    problem: ChainProblem::AnchorPruned {
                        anchor_seq: a.seq,
                        pruned_through: start.seq,
                    },
                });
            }
            // The anchor is the chain's start (an empty chain's seq 0, or the
            // pruning anchor itself): its hash must be the start's.
            if a.seq == start.seq {
                if a.hash != start.hash {
                    return Err(ChainBreak {
                        position: 0,
                        seq: Some(a.seq),
                        problem: ChainProblem::AnchorMismatch {
                            anchor: a.hash,
                            found: start.hash,
                        },
                    });
                }
                anchor_seen = true;
            }
        }
        Ok(ChainCheck {
            anchor: anchor.copied(),
            anchor_seen,
            expected: start.seq + 1,
            prev: start.hash,
            position: 0,
            head: (start.seq > 0).then_some(start),
        })
    }

    /// Checks the next record; `present(seq)` says whether a record with that
    /// seq is stored anywhere (asked only when a seq skips ahead, to tell a
    /// reordering from a deletion).
    pub(crate) fn push(
        &mut self,
        r: RawRef<'_>,
        present: &mut dyn FnMut(u64) -> bool,
    ) -> Result<(), ChainBreak> {
        self.position += 1;
        let position = self.position;
        let expected_seq = self.expected;
        let malformed = |seq: Option<u64>, column: &'static str, reason: String| ChainBreak {
            position,
            seq,
            problem: ChainProblem::Malformed { column, reason },
        };
        let seq = r.seq.map_err(|e| malformed(None, "seq", e))?;
        let at = r.at_ms.map_err(|e| malformed(Some(seq), "at_ms", e))?;
        let kind = r.kind.map_err(|e| malformed(Some(seq), "kind", e))?;
        let device = r.device.map_err(|e| malformed(Some(seq), "device", e))?;
        let tenant = r.tenant.map_err(|e| malformed(Some(seq), "tenant", e))?;
        let detail = r.detail.map_err(|e| malformed(Some(seq), "detail", e))?;
        let prev_hash = r
            .prev_hash
            .map_err(|e| malformed(Some(seq), "prev_hash", e))?;
        let hash = r.hash.map_err(|e| malformed(Some(seq), "hash", e))?;
        let brk = |problem| ChainBreak {
            position,
            seq: Some(seq),
            problem,
        };
        let computed = record_hash(seq, at, kind, device, tenant, detail, &prev_hash);
        if computed != hash {
            return Err(brk(ChainProblem::HashMismatch {
                stored: hash,
                computed,
            }));
        }
        if seq > expected_seq {
            return Err(brk(if present(expected_seq) {
                ChainProblem::SeqOutOfOrder {
                    expected: expected_seq,
                }
            } else {
                ChainProblem::Gap {
                    expected: expected_seq,
                }
            }));
        }
        if seq < expected_seq {
            return Err(brk(ChainProblem::SeqOutOfOrder {
                expected: expected_seq,
            }));
        }
        if prev_hash != self.prev {
            return Err(brk(ChainProblem::PrevHashMismatch {
                expected: self.prev,
                found: prev_hash,
            }));
        }
        if let Some(a) = self.anchor
            && a.seq == seq
        {
            if a.hash != hash {
                return Err(brk(ChainProblem::AnchorMismatch {
                    anchor: a.hash,
                    found: hash,
                }));
            }
            self.anchor_seen = true;
        }
        self.prev = hash;
        self.expected = seq + 1;
        self.head = Some(ChainHead { seq, hash });
        Ok(())
    }

    /// The report, once every record was pushed.
    pub(crate) fn finish(self) -> Result<VerifyReport, ChainBreak> {
        if let Some(a) = self.anchor
            && !self.anchor_seen
        {
            return Err(ChainBreak {
                position: self.position + 1,
                seq: None,
                problem: ChainProblem::Truncated {
                    anchor_seq: a.seq,
                    last_seq: self.head.map_or(0, |h| h.seq),
                },
            });
        }
        Ok(VerifyReport {
            records: self.position,
            head: self.head,
            anchored: self.anchor.is_some(),
        })
    }
}

// ---------------------------------------------------------------------------
// The chain head kept outside the ledger
// ---------------------------------------------------------------------------

/// The head file's format version.
pub const HEAD_FORMAT: u32 = 1;
/// The largest head file read (bytes).
pub const MAX_HEAD_BYTES: u64 = 4096;

/// Signs a head message: returns the signer's fingerprint and the signature, both
/// lowercase hex. The engine never sees the key.
pub type HeadSigner = Box<dyn Fn(&[u8]) -> (String, String) + Send>;

/// The chain head as kept beside the ledger (`<ledger>.audit-head`, 0600, replaced
/// atomically after every append), signed with the host key when there is one.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct StoredHead {
    /// [`HEAD_FORMAT`].
    pub format: u32,
    /// The seq of the newest record.
    pub seq: u64,
    /// Its hash (64 lowercase hex digits).
    pub hash: String,
    /// The fingerprint of the key that signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The ed25519 signature of [`StoredHead::message`] (128 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Where the stored chain starts, if records were pruned: the last pruned
    /// record (written only by `devfence audit prune`, signed with the head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned: Option<PruneMark>,
}

/// The last record removed by a prune, as kept in the head file.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct PruneMark {
    /// Its seq.
    pub seq: u64,
    /// Its hash (64 lowercase hex digits).
    pub hash: String,
}

impl StoredHead {
    /// The head as a [`ChainHead`].
    ///
    /// # Errors
    /// The hash is not 64 hex digits.
    pub fn chain_head(&self) -> Result<ChainHead, String> {
        Ok(ChainHead {
            seq: self.seq,
            hash: Hash::from_hex(&self.hash)
                .ok_or_else(|| format!("its hash {:?} is not 64 hex digits", self.hash))?,
        })
    }

    /// What is signed: [`head_message`], followed by `pruned <seq> <hash>\n`
    /// when records were pruned.
    #[must_use]
    pub fn message(&self) -> Vec<u8> {
        let mut m = head_message(self.seq, &self.hash);
        if let Some(p) = &self.pruned {
            m.extend_from_slice(format!("pruned {} {}\n", p.seq, p.hash).as_bytes());
        }
        m
    }
}

/// The signed message of a head: `devfence-audit-head-v1\n<seq>\n<hash>\n`.
#[must_use]
pub fn head_message(seq: u64, hash: &str) -> Vec<u8> {
    format!("devfence-audit-head-v1\n{seq}\n{hash}\n").into_bytes()
}

/// Where the head of the ledger at `ledger` is kept.
#[must_use]
pub fn head_path(ledger: &std::path::Path) -> std::path::PathBuf {
    crate::sqlite::sidecar(ledger, ".audit-head")
}

/// Reads a head file: `Ok(None)` if there is none.
///
/// # Errors
/// What is wrong with it (not a regular file, too large, not a head).
pub fn read_head(path: &std::path::Path) -> Result<Option<StoredHead>, String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{} cannot be read ({e})", path.display())),
    };
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    // Opened non-blocking and checked again on the open file (a FIFO swapped in
    // after the look above does not hang), at most MAX_HEAD_BYTES.
    let b = devfence_model::bounded::read_file(path, MAX_HEAD_BYTES).map_err(|e| e.to_string())?;
    let h: StoredHead = serde_json::from_slice(&b)
        .map_err(|e| format!("{} is not a chain head ({e})", path.display()))?;
    if h.format != HEAD_FORMAT {
        return Err(format!(
            "{} has format {}, not {HEAD_FORMAT}",
            path.display(),
            h.format
        ));
    }
    h.chain_head()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(h))
}

/// Writes a head file atomically: a 0600 temporary file beside it, synced,
/// renamed into place, the directory synced.
pub(crate) fn write_head(path: &std::path::Path, head: &StoredHead) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tag: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{tag}.tmp"));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut text = serde_json::to_vec_pretty(head).map_err(std::io::Error::other)?;
        text.push(b'\n');
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        match path.parent() {
            Some(d) => std::fs::File::open(d)?.sync_all(),
            None => Ok(()),
        }
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

// ---------------------------------------------------------------------------
// SQLite side
// ---------------------------------------------------------------------------

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sql {
        context,
        source: Box::new(source),
    }
}

/// Appends `event` in the caller's transaction.
pub(crate) fn append(
    conn: &rusqlite::Connection,
    event: &AuditEvent,
) -> Result<AuditRecord, StoreError> {
    let last: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(sql("audit append"))?;
    let (seq, prev_hash) = match last {
        None => (1u64, Hash::GENESIS),
        Some((s, h)) => {
            let bad = |reason: String, column, value: String| StoreError::BadRow {
                table: "audit",
                row: format!("seq {s}"),
                column,
                value,
                reason,
            };
            let s = u64::try_from(s)
                .map_err(|_| bad("not a positive seq".into(), "seq", s.to_string()))?;
            let h = Hash::from_hex(&h).ok_or_else(|| bad("not 64 hex digits".into(), "hash", h))?;
            (s + 1, h)
        }
    };
    let at_ms = crate::store::now_ms();
    let kind = event.kind.name();
    let device = event.device.map(|d| d.to_string());
    let tenant = event.tenant.as_ref().map(|t| t.to_string());
    let detail = event.detail.to_string();
    let hash = record_hash(
        seq,
        at_ms,
        kind,
        device.as_deref(),
        tenant.as_deref(),
        &detail,
        &prev_hash,
    );
    let seq_i = i64::try_from(seq).map_err(|_| StoreError::Internal("audit seq overflow"))?;
    conn.execute(
        "INSERT INTO audit (seq, at_ms, kind, device, tenant, detail, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        rusqlite::params![
            seq_i,
            at_ms,
            kind,
            device,
            tenant,
            detail,
            prev_hash.to_string(),
            hash.to_string()
        ],
    )
    .map_err(sql("audit append"))?;
    Ok(AuditRecord {
        seq,
        at_ms,
        kind: event.kind,
        device: event.device,
        tenant: event.tenant.clone(),
        detail: event.detail.clone(),
        prev_hash,
        hash,
    })
}

fn text(v: ValueRef<'_>) -> Result<String, String> {
    match v {
        ValueRef::Text(t) => std::str::from_utf8(t)
            .map(str::to_string)
            .map_err(|_| "not UTF-8 text".to_string()),
        other => Err(format!("expected text, found {:?}", other.data_type())),
    }
}

fn opt_text(v: ValueRef<'_>) -> Result<Option<String>, String> {
    match v {
        ValueRef::Null => Ok(None),
        v => text(v).map(Some),
    }
}

fn int(v: ValueRef<'_>) -> Result<i64, String> {
    match v {
        ValueRef::Integer(i) => Ok(i),
        other => Err(format!(
            "expected an integer, found {:?}",
            other.data_type()
        )),
    }
}

fn hash_col(v: ValueRef<'_>) -> Result<Hash, String> {
    let t = text(v)?;
    Hash::from_hex(&t).ok_or_else(|| format!("{t:?} is not 64 hex digits"))
}

fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRecord> {
    Ok(RawRecord {
        seq: int(r.get_ref(0)?)
            .and_then(|i| u64::try_from(i).map_err(|_| format!("{i} is negative"))),
        at_ms: int(r.get_ref(1)?),
        kind: text(r.get_ref(2)?),
        device: opt_text(r.get_ref(3)?),
        tenant: opt_text(r.get_ref(4)?),
        detail: text(r.get_ref(5)?),
        prev_hash: hash_col(r.get_ref(6)?),
        hash: hash_col(r.get_ref(7)?),
    })
}

const COLUMNS: &str = "seq, at_ms, kind, device, tenant, detail, prev_hash, hash";

fn text_ref(v: ValueRef<'_>) -> Result<&str, String> {
    match v {
        ValueRef::Text(t) => std::str::from_utf8(t).map_err(|_| "not UTF-8 text".to_string()),
        other => Err(format!("expected text, found {:?}", other.data_type())),
    }
}

fn opt_text_ref(v: ValueRef<'_>) -> Result<Option<&str>, String> {
    match v {
        ValueRef::Null => Ok(None),
        v => text_ref(v).map(Some),
    }
}

fn hash_ref(v: ValueRef<'_>) -> Result<Hash, String> {
    let t = text_ref(v)?;
    Hash::from_hex(t).ok_or_else(|| format!("{t:?} is not 64 hex digits"))
}

fn raw_ref<'a>(r: &'a rusqlite::Row<'_>) -> rusqlite::Result<RawRef<'a>> {
    Ok(RawRef {
        seq: int(r.get_ref(0)?)
            .and_then(|i| u64::try_from(i).map_err(|_| format!("{i} is negative"))),
        at_ms: int(r.get_ref(1)?),
        kind: text_ref(r.get_ref(2)?),
        device: opt_text_ref(r.get_ref(3)?),
        tenant: opt_text_ref(r.get_ref(4)?),
        detail: text_ref(r.get_ref(5)?),
        prev_hash: hash_ref(r.get_ref(6)?),
        hash: hash_ref(r.get_ref(7)?),
    })
}

/// The pruning anchor: the seq and hash of the last record removed by
/// [`prune`], where the stored chain now starts. `None` if never pruned.
pub(crate) fn pruned_anchor(conn: &rusqlite::Connection) -> Result<Option<ChainHead>, AuditError> {
    let row: Option<(i64, String)> = conn
        .query_row("SELECT seq, hash FROM audit_pruned WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(sql("reading the pruning anchor"))?;
    let Some((s, h)) = row else {
        return Ok(None);
    };
    let malformed = |reason: String| {
        AuditError::ChainBroken(ChainBreak {
            position: 0,
            seq: None,
            problem: ChainProblem::Malformed {
                column: "audit_pruned",
                reason,
            },
        })
    };
    let seq = u64::try_from(s).map_err(|_| malformed(format!("seq {s} is negative")))?;
    let hash =
        Hash::from_hex(&h).ok_or_else(|| malformed(format!("{h:?} is not 64 hex digits")))?;
    Ok(Some(ChainHead { seq, hash }))
}

/// Verifies the chain stored in `conn` (one read transaction), from the pruning
/// anchor if records were pruned: one statement streaming the rows, each hashed
/// as it is read, nothing kept but the previous hash.
pub(crate) fn verify(
    conn: &rusqlite::Connection,
    anchor: Option<&ChainHead>,
) -> Result<VerifyReport, AuditError> {
    let start = pruned_anchor(conn)?.unwrap_or(ChainHead {
        seq: 0,
        hash: Hash::GENESIS,
    });
    let mut check = ChainCheck::new(start, anchor).map_err(AuditError::ChainBroken)?;
    let mut stmt = conn
        .prepare(&format!("SELECT {COLUMNS} FROM audit ORDER BY id"))
        .map_err(sql("audit verify"))?;
    let mut exists = conn
        .prepare("SELECT EXISTS (SELECT 1 FROM audit WHERE seq = ?1)")
        .map_err(sql("audit verify"))?;
    let mut present = |seq: u64| {
        i64::try_from(seq).is_ok_and(|s| {
            exists
                .query_row([s], |r| r.get::<_, bool>(0))
                .unwrap_or(false)
        })
    };
    let mut rows = stmt.query([]).map_err(sql("audit verify"))?;
    while let Some(row) = rows.next().map_err(sql("audit verify"))? {
        let raw = raw_ref(row).map_err(sql("audit verify"))?;
        check
            .push(raw, &mut present)
            .map_err(AuditError::ChainBroken)?;
    }
    check.finish().map_err(AuditError::ChainBroken)
}

/// What a prune did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct PruneReport {
    /// How many records were removed now.
    pub pruned: u64,
    /// The pruning anchor: the last removed record, where the chain now starts.
    pub anchor: Option<ChainHead>,
    /// How many records the ledger keeps (the prune's own record included).
    pub kept: u64,
    /// Finished operations removed with the records (those that finished by
    /// the time of the anchor record), with their journals. Unfinished
    /// operations, which recovery needs, are never removed.
    pub operations: u64,
    /// Journal rows removed with those operations.
    pub journal_rows: u64,
    /// Nonces of admitted device-state envelopes removed because their
    /// envelope has expired (at or before `nonce_horizon_ms`).
    pub nonces: u64,
    /// The nonce horizon after this prune (ms since the epoch): no envelope
    /// that expires at or before it is admitted again, whatever the clock says
    /// later. `None` until a prune sets it.
    pub nonce_horizon_ms: Option<i64>,
}

/// Where a prune cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneCut {
    /// Remove every record before this seq.
    Before(u64),
    /// Keep the newest `n` records (at least 1).
    Keep(u64),
}

/// Removes the records up to seq `through` in the caller's (immediate)
/// transaction, moving the pruning anchor to that record and recording the prune
/// as an audit record (with `operations`: the finished operations and journal
/// rows the caller removed with them). `through` must be a stored record past the current
/// anchor and before the newest record (the newest is never pruned). Returns
/// the new anchor and how many records went.
pub(crate) fn prune(
    conn: &rusqlite::Connection,
    through: u64,
    operations: (u64, u64),
) -> Result<(ChainHead, u64), StoreError> {
    let s = i64::try_from(through).map_err(|_| StoreError::Internal("audit seq overflow"))?;
    let hash: String = conn
        .query_row("SELECT hash FROM audit WHERE seq = ?1", [s], |r| r.get(0))
        .map_err(sql("audit prune"))?;
    let hash = Hash::from_hex(&hash).ok_or_else(|| StoreError::BadRow {
        table: "audit",
        row: format!("seq {through}"),
        column: "hash",
        value: hash.clone(),
        reason: "not 64 hex digits".into(),
    })?;
    let n: i64 = conn
        .query_row("SELECT count(*) FROM audit WHERE seq <= ?1", [s], |r| {
            r.get(0)
        })
        .map_err(sql("audit prune"))?;
    // The anchor first: the trigger lets a record go only at or below it.
    conn.execute(
        "INSERT INTO audit_pruned (id, seq, hash, records, at_ms) VALUES (1, ?1, ?2, ?3, ?4) \
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, \
         records = records + excluded.records, at_ms = excluded.at_ms",
        rusqlite::params![s, hash.to_string(), n, crate::store::now_ms()],
    )
    .map_err(sql("audit prune"))?;
    let deleted = conn
        .execute("DELETE FROM audit WHERE seq <= ?1", [s])
        .map_err(sql("audit prune"))?;
    let n = deleted as u64;
    let anchor = ChainHead { seq: through, hash };
    append(
        conn,
        &AuditEvent {
            kind: AuditKind::Ledger,
            device: None,
            tenant: None,
            detail: serde_json::json!({
                "event": "audit-pruned",
                "through_seq": through,
                "through_hash": hash.to_string(),
                "records": n,
                "operations": operations.0,
                "journal_rows": operations.1,
            }),
        },
    )?;
    Ok((anchor, n))
}

/// The records matching `filter`, in storage order, parsed.
pub(crate) fn show(
    conn: &rusqlite::Connection,
    filter: &AuditFilter,
) -> Result<Vec<AuditRecord>, AuditError> {
    let device = filter.device.map(|d| d.to_string());
    let tenant = filter.tenant.as_ref().map(|t| t.to_string());
    // One condition per filter given, so that SQLite uses the device or tenant
    // index (`?1 IS NULL OR device = ?1` would scan every record).
    let mut cond: Vec<&str> = Vec::new();
    let mut params: Vec<&dyn rusqlite::ToSql> = Vec::new();
    if let Some(d) = &device {
        cond.push("device = ?");
        params.push(d);
    }
    if let Some(t) = &tenant {
        cond.push("tenant = ?");
        params.push(t);
    }
    let filter = if cond.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", cond.join(" AND "))
    };
    let mut stmt = conn
        .prepare(&format!("SELECT {COLUMNS} FROM audit {filter} ORDER BY id"))
        .map_err(sql("audit show"))?;
    let rows = stmt
        .query_map(params.as_slice(), raw_row)
        .map_err(sql("audit show"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql("audit show"))?;
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| parse_record(i, r).map_err(AuditError::Store))
        .collect()
}

/// The records after seq `after`, oldest first, at most `limit` of them: what
/// an exporter reads to stream the chain (`devfence audit export`, the agent's
/// `[agent] audit_export`).
///
/// Cheap when nothing is new (one read of the newest row) and when the chain's
/// rows are contiguous (the row of seq `after` is found by its position, then
/// read from by primary key); otherwise a scan by seq. Either way only records
/// with a seq above `after` are returned, in storage order.
pub(crate) fn after(
    conn: &rusqlite::Connection,
    after: u64,
    limit: usize,
) -> Result<Vec<AuditRecord>, AuditError> {
    use rusqlite::OptionalExtension;
    let after_i = i64::try_from(after).unwrap_or(i64::MAX);
    let limit_i = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
    let newest: Option<(i64, i64)> = conn
        .query_row(
            "SELECT id, seq FROM audit ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(sql("audit export"))?;
    let Some((max_id, max_seq)) = newest else {
        return Ok(Vec::new());
    };
    if max_seq <= after_i {
        return Ok(Vec::new());
    }
    // Where the row of seq `after` would be if ids and seqs advance together.
    let guess = max_id - (max_seq - after_i);
    let at_guess: Option<i64> = conn
        .query_row("SELECT seq FROM audit WHERE id = ?1", [guess], |r| r.get(0))
        .optional()
        .map_err(sql("audit export"))?;
    // The guess verified, read on from it by primary key; else from the start.
    let first = if at_guess == Some(after_i) { guess } else { 0 };
    let query =
        format!("SELECT {COLUMNS} FROM audit WHERE id > ?1 AND seq > ?2 ORDER BY id LIMIT ?3");
    let mut stmt = conn.prepare(&query).map_err(sql("audit export"))?;
    let rows = stmt
        .query_map(rusqlite::params![first, after_i, limit_i], raw_row)
        .map_err(sql("audit export"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql("audit export"))?;
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| parse_record(i, r).map_err(AuditError::Store))
        .collect()
}

fn parse_record(index: usize, r: RawRecord) -> Result<AuditRecord, StoreError> {
    let row = match &r.seq {
        Ok(s) => format!("seq {s}"),
        Err(_) => format!("#{} of the result", index + 1),
    };
    let bad = |column: &'static str, value: String, reason: String| StoreError::BadRow {
        table: "audit",
        row: row.clone(),
        column,
        value: value.chars().take(80).collect(),
        reason,
    };
    let seq = r.seq.map_err(|e| bad("seq", String::new(), e))?;
    let at_ms = r.at_ms.map_err(|e| bad("at_ms", String::new(), e))?;
    let kind_s = r.kind.map_err(|e| bad("kind", String::new(), e))?;
    let kind = AuditKind::from_name(&kind_s)
        .ok_or_else(|| bad("kind", kind_s.clone(), "not a known audit kind".into()))?;
    let device = match r.device.map_err(|e| bad("device", String::new(), e))? {
        None => None,
        Some(d) => Some(
            d.parse::<DeviceId>()
                .map_err(|e| bad("device", d.clone(), e.to_string()))?,
        ),
    };
    let tenant = match r.tenant.map_err(|e| bad("tenant", String::new(), e))? {
        None => None,
        Some(t) => Some(
            t.parse::<TenantId>()
                .map_err(|e| bad("tenant", t.clone(), e.to_string()))?,
        ),
    };
    let detail_s = r.detail.map_err(|e| bad("detail", String::new(), e))?;
    let detail = serde_json::from_str(&detail_s)
        .map_err(|e| bad("detail", detail_s.clone(), e.to_string()))?;
    let prev_hash = r
        .prev_hash
        .map_err(|e| bad("prev_hash", String::new(), e))?;
    let hash = r.hash.map_err(|e| bad("hash", String::new(), e))?;
    Ok(AuditRecord {
        seq,
        at_ms,
        kind,
        device,
        tenant,
        detail,
        prev_hash,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::SqliteStore;
    use crate::store::{Store, StoreExt, Tenant};

    const N: u64 = 6;

    fn dev(s: &str) -> DeviceId {
        s.parse().expect("device")
    }

    fn tid(s: &str) -> TenantId {
        s.parse().expect("tenant")
    }

    /// A ledger with `N` chained records; records alternate between two devices.
    fn chain() -> (tempfile::TempDir, std::path::PathBuf, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.db");
        let mut store = SqliteStore::open(&path).expect("open");
        for i in 0..N {
            let device = if i % 2 == 0 {
                "0000:3b:00.2"
            } else {
                "0000:3b:00.3"
            };
            let tenant = if i < 3 { "acme" } else { "globex" };
            store
                .atomically(|tx| {
                    tx.audit(&AuditEvent {
                        kind: if i % 3 == 0 {
                            AuditKind::Step
                        } else {
                            AuditKind::Gate
                        },
                        device: Some(dev(device)),
                        tenant: Some(tid(tenant)),
                        detail: json!({"i": i, "evidence": [{"path": "/sys/x", "value": "1"}]}),
                    })
                })
                .expect("append");
        }
        (dir, path, store)
    }

    /// An attacker's connection: no triggers in the way.
    fn raw(path: &std::path::Path) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(path).expect("raw open");
        c.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
            .expect("drop triggers");
        c
    }

    fn broken(store: &mut SqliteStore) -> ChainBreak {
        match store.verify() {
            Err(AuditError::ChainBroken(b)) => b,
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn intact_chain_verifies() {
        let (_d, _p, mut store) = chain();
        let report = store.verify().expect("intact");
        assert_eq!(report.records, N);
        let head = report.head.expect("head");
        assert_eq!(head.seq, N);
        let all = store.audit_show(&AuditFilter::default()).expect("show");
        assert_eq!(all.len() as u64, N);
        assert_eq!(all[0].prev_hash, Hash::GENESIS);
        for w in all.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash);
            assert_eq!(w[1].seq, w[0].seq + 1);
        }
        assert_eq!(all.last().map(|r| r.hash), Some(head.hash));
        // With its own head as anchor it verifies too.
        assert!(store.audit_verify(Some(&head)).expect("anchored").anchored);
    }

    #[test]
    fn edited_detail_is_found() {
        let (_d, path, mut store) = chain();
        raw(&path)
            .execute("UPDATE audit SET detail = '{\"i\":99}' WHERE seq = 3", [])
            .expect("edit");
        let b = broken(&mut store);
        assert_eq!(b.seq, Some(3));
        assert!(
            matches!(b.problem, ChainProblem::HashMismatch { .. }),
            "{b:?}"
        );
        let msg = AuditError::ChainBroken(b).to_string();
        assert!(msg.contains("seq 3") && msg.contains("Hint:"), "{msg}");
    }

    #[test]
    fn deleted_middle_record_is_found() {
        let (_d, path, mut store) = chain();
        raw(&path)
            .execute("DELETE FROM audit WHERE seq = 3", [])
            .expect("delete");
        let b = broken(&mut store);
        assert_eq!(b.seq, Some(4));
        assert_eq!(b.problem, ChainProblem::Gap { expected: 3 });
    }

    #[test]
    fn inserted_record_is_found() {
        let (_d, path, mut store) = chain();
        let all = store.audit_show(&AuditFilter::default()).expect("show");
        let c = raw(&path);
        // Make room after seq 2 and insert a well-formed forgery linked to seq 2.
        c.execute("UPDATE audit SET id = id + 100 WHERE seq >= 3", [])
            .expect("shift");
        let prev = all[1].hash;
        let detail = r#"{"forged":true}"#;
        let h = record_hash(3, 0, "gate", None, None, detail, &prev);
        c.execute(
            "INSERT INTO audit (id, seq, at_ms, kind, device, tenant, detail, prev_hash, hash) \
             VALUES (3, 3, 0, 'gate', NULL, NULL, ?1, ?2, ?3)",
            rusqlite::params![detail, prev.to_string(), h.to_string()],
        )
        .expect("insert");
        let b = broken(&mut store);
        // The forgery itself is consistent; the original seq 3 right after it is not.
        assert_eq!(b.position, 4);
        assert_eq!(b.seq, Some(3));
        assert_eq!(b.problem, ChainProblem::SeqOutOfOrder { expected: 4 });
    }

    #[test]
    fn inserted_record_with_renumbered_tail_is_found() {
        let (_d, path, mut store) = chain();
        let all = store.audit_show(&AuditFilter::default()).expect("show");
        let c = raw(&path);
        c.execute(
            "UPDATE audit SET id = id + 100, seq = seq + 1 WHERE seq >= 3",
            [],
        )
        .expect("shift");
        let prev = all[1].hash;
        let detail = "{}";
        let h = record_hash(3, 0, "gate", None, None, detail, &prev);
        c.execute(
            "INSERT INTO audit (id, seq, at_ms, kind, device, tenant, detail, prev_hash, hash) \
             VALUES (3, 3, 0, 'gate', NULL, NULL, ?1, ?2, ?3)",
            rusqlite::params![detail, prev.to_string(), h.to_string()],
        )
        .expect("insert");
        let b = broken(&mut store);
        assert_eq!(b.seq, Some(4), "the renumbered old seq 3");
        assert!(
            matches!(b.problem, ChainProblem::HashMismatch { .. }),
            "{b:?}"
        );
    }

    #[test]
    fn swapped_records_are_found() {
        let (_d, path, mut store) = chain();
        let c = raw(&path);
        c.execute_batch(
            "UPDATE audit SET id = -1 WHERE seq = 3; \
             UPDATE audit SET id = 3 WHERE seq = 4; \
             UPDATE audit SET id = 4 WHERE id = -1;",
        )
        .expect("swap rows");
        let b = broken(&mut store);
        assert_eq!(b.position, 3);
        assert_eq!(b.seq, Some(4));
        assert_eq!(b.problem, ChainProblem::SeqOutOfOrder { expected: 3 });
    }

    #[test]
    fn swapped_contents_are_found() {
        let (_d, path, mut store) = chain();
        let c = raw(&path);
        // Swap everything but the position and seq.
        c.execute_batch(
            "CREATE TEMP TABLE t AS SELECT * FROM audit WHERE seq IN (2, 3); \
             UPDATE audit SET (at_ms, kind, device, tenant, detail, prev_hash, hash) = \
               (SELECT at_ms, kind, device, tenant, detail, prev_hash, hash FROM t WHERE t.seq = 5 - audit.seq) \
             WHERE seq IN (2, 3);",
        )
        .expect("swap contents");
        let b = broken(&mut store);
        assert_eq!(b.seq, Some(2));
        assert!(
            matches!(b.problem, ChainProblem::HashMismatch { .. }),
            "{b:?}"
        );
    }

    #[test]
    fn truncated_tail_needs_an_anchor() {
        let (_d, path, mut store) = chain();
        let anchor = store.verify().expect("intact").head.expect("head");
        raw(&path)
            .execute("DELETE FROM audit WHERE seq > ?1", [(N - 2).cast_signed()])
            .expect("truncate");
        // Documented limitation: without an anchor the shorter chain is consistent.
        let report = store
            .verify()
            .expect("a truncated chain is still consistent");
        assert_eq!(report.records, N - 2);
        // The anchor kept elsewhere catches it.
        match store.audit_verify(Some(&anchor)) {
            Err(AuditError::ChainBroken(b)) => assert_eq!(
                b.problem,
                ChainProblem::Truncated {
                    anchor_seq: N,
                    last_seq: N - 2
                }
            ),
            other => panic!("expected truncation, got {other:?}"),
        }
    }

    #[test]
    fn rewritten_chain_needs_an_anchor() {
        let (_d, path, mut store) = chain();
        let anchor = store.verify().expect("intact").head.expect("head");
        let all = store.audit_show(&AuditFilter::default()).expect("show");
        let c = raw(&path);
        // Rewrite from seq 2 on, recomputing every hash (an unkeyed chain allows it).
        let mut prev = all[0].hash;
        for r in &all[1..] {
            let detail = json!({"rewritten": r.seq}).to_string();
            let device = r.device.map(|d| d.to_string());
            let tenant = r.tenant.as_ref().map(ToString::to_string);
            let h = record_hash(
                r.seq,
                r.at_ms,
                r.kind.name(),
                device.as_deref(),
                tenant.as_deref(),
                &detail,
                &prev,
            );
            c.execute(
                "UPDATE audit SET detail = ?2, prev_hash = ?3, hash = ?4 WHERE seq = ?1",
                rusqlite::params![r.seq.cast_signed(), detail, prev.to_string(), h.to_string()],
            )
            .expect("rewrite");
            prev = h;
        }
        store
            .verify()
            .expect("a full rewrite is consistent without an anchor");
        match store.audit_verify(Some(&anchor)) {
            Err(AuditError::ChainBroken(b)) => {
                assert_eq!(b.seq, Some(N));
                assert!(
                    matches!(b.problem, ChainProblem::AnchorMismatch { .. }),
                    "{b:?}"
                );
            }
            other => panic!("expected an anchor mismatch, got {other:?}"),
        }
    }

    #[test]
    fn malformed_hash_column_is_reported_where() {
        let (_d, path, mut store) = chain();
        raw(&path)
            .execute("UPDATE audit SET hash = 'zz' WHERE seq = 2", [])
            .expect("edit");
        let b = broken(&mut store);
        assert_eq!(b.seq, Some(2));
        assert!(
            matches!(b.problem, ChainProblem::Malformed { column: "hash", .. }),
            "{b:?}"
        );
    }

    #[test]
    fn records_are_append_only_through_ordinary_sql() {
        let (_d, path, _store) = chain();
        let c = rusqlite::Connection::open(&path).expect("open");
        assert!(
            c.execute("UPDATE audit SET detail = '{}' WHERE seq = 1", [])
                .is_err()
        );
        assert!(c.execute("DELETE FROM audit WHERE seq = 1", []).is_err());
    }

    #[test]
    fn audit_commits_and_rolls_back_with_the_ledger_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("l.db")).expect("open");
        let t = Tenant {
            id: tid("acme"),
            launcher_uid: None,
            launcher_gid: None,
            security_label: None,
            partitions: vec![],
        };
        let event = AuditEvent {
            kind: AuditKind::Ledger,
            device: None,
            tenant: Some(tid("acme")),
            detail: json!({"action": "tenant add"}),
        };
        let err = store
            .atomically(|tx| {
                tx.add_tenant(&t)?;
                tx.audit(&event)?;
                tx.add_tenant(&t) // fails: the audit record must vanish too
            })
            .expect_err("duplicate");
        assert!(matches!(err, StoreError::TenantExists(_)));
        assert_eq!(store.verify().expect("empty").records, 0);
        store
            .atomically(|tx| {
                tx.add_tenant(&t)?;
                tx.audit(&event)
            })
            .expect("commit");
        assert_eq!(store.verify().expect("one").records, 1);
        assert_eq!(store.atomically(|tx| tx.tenants()).expect("list").len(), 1);
    }

    #[test]
    fn show_filters_by_device_and_tenant() {
        let (_d, _p, mut store) = chain();
        let by_dev = store
            .audit_show(&AuditFilter {
                device: Some(dev("0000:3b:00.2")),
                tenant: None,
            })
            .expect("show");
        assert_eq!(by_dev.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3, 5]);
        let both = store
            .audit_show(&AuditFilter {
                device: Some(dev("0000:3b:00.2")),
                tenant: Some(tid("globex")),
            })
            .expect("show");
        assert_eq!(both.iter().map(|r| r.seq).collect::<Vec<_>>(), [5]);
        assert_eq!(both[0].detail["i"], json!(4));
    }

    #[test]
    fn envelope_kinds_are_stored_read_back_and_chained() {
        let (_d, _p, mut store) = chain();
        for kind in [
            AuditKind::Seal,
            AuditKind::Admit,
            AuditKind::Keys,
            AuditKind::Fleet,
        ] {
            assert_eq!(AuditKind::from_name(kind.name()), Some(kind));
            store
                .atomically(|tx| {
                    tx.audit(&AuditEvent {
                        kind,
                        device: Some(dev("0000:3b:00.2")),
                        tenant: Some(tid("acme")),
                        detail: json!({ "envelope": "0123" }),
                    })
                })
                .expect("append");
        }
        let recs = store.audit_show(&AuditFilter::default()).expect("show");
        let kinds: Vec<AuditKind> = recs.iter().rev().take(4).map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                AuditKind::Fleet,
                AuditKind::Keys,
                AuditKind::Admit,
                AuditKind::Seal
            ]
        );
        assert_eq!(store.verify().expect("intact").records, N + 4);
        assert_eq!(AuditKind::from_name("sealed"), None);
    }

    #[test]
    fn encoding_is_length_prefixed_and_covers_every_field() {
        let p = Hash::GENESIS;
        let base = record_hash(1, 5, "gate", Some("a"), Some("t"), "{}", &p);
        assert_ne!(base, record_hash(1, 5, "gatea", None, Some("t"), "{}", &p));
        assert_ne!(
            base,
            record_hash(1, 5, "gate", Some(""), Some("t"), "{}", &p)
        );
        assert_ne!(
            record_hash(1, 5, "gate", None, Some("t"), "{}", &p),
            record_hash(1, 5, "gate", Some("t"), None, "{}", &p)
        );
        assert_ne!(
            base,
            record_hash(2, 5, "gate", Some("a"), Some("t"), "{}", &p)
        );
        assert_ne!(
            base,
            record_hash(1, 6, "gate", Some("a"), Some("t"), "{}", &p)
        );
        assert_ne!(
            base,
            record_hash(1, 5, "gate", Some("a"), Some("t"), "{ }", &p)
        );
        assert_ne!(
            base,
            record_hash(1, 5, "gate", Some("a"), Some("t"), "{}", &Hash([1; 32]))
        );
        assert_eq!(Hash::from_hex(&base.to_string()), Some(base));
    }

    const OK_SIG: fn(&StoredHead) -> Result<(), String> = |_| Ok(());

    /// A chain of `N` records pruned to its newest two (and the prune's record).
    fn pruned() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        SqliteStore,
        PruneReport,
    ) {
        let (d, path, mut store) = chain();
        let rep = store
            .audit_prune(PruneCut::Keep(2), &OK_SIG)
            .expect("prune");
        (d, path, store, rep)
    }

    /// issue 12 item 8: an exporter reads the records after a seq, in pages,
    /// on a whole chain, a pruned one (the fast path's guess misses: the
    /// rows it needs are gone), and one whose ids do not follow the seqs.
    #[test]
    fn records_after_a_seq_in_pages() {
        let (_d, path, mut store) = chain();
        let seqs = |v: Vec<AuditRecord>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(store.audit_after(0, 100).expect("all")),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(seqs(store.audit_after(2, 3).expect("page")), [3, 4, 5]);
        assert_eq!(seqs(store.audit_after(5, 3).expect("last")), [6]);
        assert!(store.audit_after(6, 3).expect("none").is_empty());
        assert!(store.audit_after(60, 3).expect("beyond").is_empty());
        let all = store.audit_show(&AuditFilter::default()).expect("show");
        assert_eq!(store.audit_after(3, 1).expect("one")[0], all[3]);
        // Ids shifted away from the seqs: the scan finds the same records.
        let c = raw(&path);
        c.execute("UPDATE audit SET id = id + 100 WHERE seq >= 3", [])
            .expect("shift");
        assert_eq!(seqs(store.audit_after(2, 3).expect("scan")), [3, 4, 5]);
        let (_d, _p, mut store, _) = pruned();
        assert_eq!(seqs(store.audit_after(0, 100).expect("pruned")), [5, 6, 7]);
        assert_eq!(seqs(store.audit_after(5, 100).expect("pruned")), [6, 7]);
    }

    /// issue 14 item 4: retention keeps the chain verifiable — from the pruning
    /// anchor, against the head beside the ledger, after a reopen.
    #[test]
    fn a_pruned_chain_verifies() {
        let (_d, path, mut store, rep) = pruned();
        assert_eq!(rep.pruned, N - 2);
        assert_eq!(rep.kept, 3, "the newest two and the prune's own record");
        let anchor = rep.anchor.expect("anchor");
        assert_eq!(anchor.seq, N - 2);
        let v = store.verify().expect("pruned chain verifies");
        assert_eq!(v.records, 3);
        assert_eq!(v.head.map(|h| h.seq), Some(N + 1));
        drop(store);
        let mut store = SqliteStore::open(&path).expect("reopen");
        let (v, head) = store.verify_with_head(None, &OK_SIG).expect("with head");
        assert_eq!(v.records, 3);
        let head = head.expect("stored head");
        assert_eq!(head.pruned.as_ref().map(|p| p.seq), Some(anchor.seq));
        assert!(
            String::from_utf8_lossy(&head.message()).contains("pruned 4 "),
            "the prune is in the signed message"
        );
        let shown = store.audit_show(&AuditFilter::default()).expect("show");
        assert_eq!(shown[0].prev_hash, anchor.hash);
        let last = shown.last().expect("prune record");
        assert_eq!(last.detail["event"], "audit-pruned");
        assert_eq!(last.detail["through_seq"], N - 2);
        // Appending and pruning again keeps it verifiable.
        store
            .atomically(|tx| {
                tx.audit(&AuditEvent {
                    kind: AuditKind::Step,
                    device: None,
                    tenant: None,
                    detail: json!({"after": "prune"}),
                })
                .map(|_| ())
            })
            .expect("append");
        let again = store
            .audit_prune(PruneCut::Before(N + 1), &OK_SIG)
            .expect("prune");
        assert_eq!(again.pruned, 2);
        store.verify_with_head(None, &OK_SIG).expect("twice pruned");
        // An external head taken before the prune cannot be reached any more.
        let old = ChainHead {
            seq: 2,
            hash: Hash::GENESIS,
        };
        match store.audit_verify(Some(&old)) {
            Err(AuditError::ChainBroken(b)) => {
                assert!(
                    matches!(b.problem, ChainProblem::AnchorPruned { .. }),
                    "{b:?}"
                );
            }
            other => panic!("expected AnchorPruned, got {other:?}"),
        }
    }

    /// issue 14 item 4: a pruned chain whose anchor is tampered with fails —
    /// its hash, its seq, or a forged prune (old records deleted and an anchor
    /// written by hand), which the signed head's pruning mark catches.
    #[test]
    fn a_pruned_chain_whose_anchor_is_tampered_fails() {
        let (_d, path, mut store, _) = pruned();
        let attacker = raw(&path);
        attacker
            .execute_batch("DROP TRIGGER audit_pruned_forward;")
            .expect("drop trigger");
        attacker
            .execute(
                "UPDATE audit_pruned SET hash = ?1",
                [Hash([7; 32]).to_string()],
            )
            .expect("edit anchor hash");
        let b = broken(&mut store);
        assert!(
            matches!(b.problem, ChainProblem::PrevHashMismatch { .. }),
            "{b:?}"
        );
        attacker
            .execute("UPDATE audit_pruned SET seq = 3", [])
            .expect("edit anchor seq");
        assert!(store.verify().is_err(), "anchor seq moved back");

        // A forged prune on an intact, never pruned chain: internally consistent,
        // so only the head tells.
        let (_d2, path2, mut store2) = chain();
        store2.refresh_head().expect("head");
        let a = raw(&path2);
        let h3: String = a
            .query_row("SELECT hash FROM audit WHERE seq = 3", [], |r| r.get(0))
            .expect("hash 3");
        a.execute_batch("DELETE FROM audit WHERE seq <= 3;")
            .expect("delete");
        a.execute(
            "INSERT INTO audit_pruned (id, seq, hash, records, at_ms) VALUES (1, 3, ?1, 3, 0)",
            [h3],
        )
        .expect("forge anchor");
        store2.verify().expect("consistent on its own");
        match store2.verify_with_head(None, &OK_SIG) {
            Err(AuditError::ChainBroken(b)) => {
                assert!(
                    matches!(b.problem, ChainProblem::HeadInvalid { .. }),
                    "{b:?}"
                );
                let msg = AuditError::ChainBroken(b).to_string();
                assert!(msg.contains("pruning anchor"), "{msg}");
            }
            other => panic!("expected the head to catch the forged prune, got {other:?}"),
        }
    }

    /// issue 14 item 4: pruning never removes records after the anchor — not
    /// through ordinary SQL (the trigger), not by a cut at or past the newest
    /// record, not on a broken chain.
    #[test]
    fn pruning_never_removes_records_after_the_anchor() {
        let (_d, path, mut store, rep) = pruned();
        let anchor = rep.anchor.expect("anchor").seq;
        let c = rusqlite::Connection::open(&path).expect("open");
        let e = c
            .execute("DELETE FROM audit WHERE seq = ?1", [anchor as i64 + 1])
            .expect_err("after the anchor");
        assert!(e.to_string().contains("append-only"), "{e}");
        assert!(c.execute("UPDATE audit_pruned SET seq = 1", []).is_err());
        assert!(c.execute("DELETE FROM audit_pruned", []).is_err());
        for cut in [PruneCut::Keep(0), PruneCut::Before(N + 2)] {
            match store.audit_prune(cut, &OK_SIG) {
                Err(e @ AuditError::BadCut { .. }) => {
                    assert!(e.to_string().contains("Hint:"), "{e}");
                }
                other => panic!("{cut:?}: expected BadCut, got {other:?}"),
            }
        }
        assert_eq!(store.verify().expect("intact").records, 3);
        // A broken chain is never pruned (nothing removed).
        let (_d2, path2, mut store2) = chain();
        let attacker = raw(&path2);
        attacker
            .execute("UPDATE audit SET detail = '{}' WHERE seq = 5", [])
            .expect("edit");
        assert!(store2.audit_prune(PruneCut::Keep(1), &OK_SIG).is_err());
        let n: i64 = attacker
            .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, N as i64);
    }
}
