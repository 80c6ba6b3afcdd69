//! Device-state envelopes for migration (docs/state-envelopes.md): `seal` on
//! the source host, `admit` and `inspect` on the destination.
//!
//! `seal` binds a device's state to the device as inventoried, the device's
//! tenant in the ledger, the VM and a validity window, signs it with the host
//! key and stores it in the root-only state store. `admit` runs every check of
//! `devfence_seal::admit` in order, inside one ledger transaction that also
//! records the envelope's nonce (single use) and the audit record, and places
//! the payload in the root-only side-load directory under a one-time token for
//! the VM launcher (or, with a [`DeviceLoader`], loads it into the device after
//! the commit: `state load`). `inspect` shows what admit would decide, without
//! admitting.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use devfence_engine::{
    AuditEvent, AuditKind, DeviceRecord, DeviceState, StateNonce, StoreError, StoreExt,
};
use devfence_host::HostRoot;
use devfence_model::{DeviceId, TenantId};
use devfence_seal::format::hex;
use devfence_seal::{
    Binding, Check, CheckOutcome, Context as SealContext, Destination, EnvelopeId, Evaluation,
    Header, MAX_ENVELOPE, MAX_PAYLOAD, MAX_TTL_MS, Nonce, NonceUse, Refusal, Sha256Digest, VmUuid,
    describe, evaluate, seal,
};

use crate::error::{AppError, Result, StepContext};
use crate::keystore::{load_keyring, now_ms, private_dir, sync_dir, temp_beside};

macro_rules! bail {
    ($($t:tt)*) => { return Err(AppError::invalid(format!($($t)*))) };
}

/// The state store: envelopes sealed on this host, `<id>.dfseal`.
pub const STATE_STORE: &str = "/var/lib/devfence/state";
/// The side-load directory: admitted payloads, `<token>.state`, for the launcher.
pub const SIDE_LOAD: &str = "/run/devfence/state";
/// The default validity of an envelope.
pub const DEFAULT_TTL: &str = "1h";

/// Parses a validity: `90`, `90s`, `30m`, `6h`, `7d`; 1 s to 7 days. In ms.
pub fn parse_ttl(s: &str) -> std::result::Result<u64, String> {
    let (num, unit) = match s.trim().char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s.trim()[..i], c),
        _ => (s.trim(), 's'),
    };
    let mult: u64 = match unit {
        's' => 1000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: e.g. 90s, 30m, 6h, 2d"))?;
    let ms = n.saturating_mul(mult);
    if !(1000..=MAX_TTL_MS).contains(&ms) {
        return Err(format!("{s:?} is out of range: 1s to 7d"));
    }
    Ok(ms)
}

fn holder_of(rec: Option<&DeviceRecord>) -> Option<TenantId> {
    rec.and_then(|r| r.state.tenant().cloned())
}

/// Opens the ledger (creating it on first use), for the audit records.
fn open_ledger(root: &HostRoot, ledger: Option<&Path>) -> Result<devfence_engine::SqliteStore> {
    crate::env::open_store(root, ledger, true)
}

// ---------------------------------------------------------------- seal

/// What to seal, for `state seal` and `state save`.
#[derive(Clone, Debug)]
pub struct SealRequest {
    /// The device whose state it is.
    pub dev: DeviceId,
    /// The VM it is for.
    pub vm: VmUuid,
    /// How long it stays admissible, in ms.
    pub ttl: u64,
    /// The audit action: `state-seal` or `state-save`.
    pub action: &'static str,
}

/// What sealing did.
#[derive(Debug)]
pub enum Sealed {
    /// Sealed and stored.
    Done {
        /// The envelope's id.
        id: EnvelopeId,
        /// Where it is stored (0600).
        path: PathBuf,
        /// Its header.
        header: Box<Header>,
        /// The signing key's fingerprint.
        signer: String,
        /// This host's id, as the key names it.
        source_host: String,
        /// What the payload's source added (`Null` for none).
        source: serde_json::Value,
    },
    /// Refused (and audited): the reason and a hint.
    Refused {
        /// Why.
        reason: String,
        /// What to do.
        hint: String,
    },
}

/// The payload to seal, asked for once the device and its tenant passed:
/// the bytes and what to add to the audit record and the output under
/// `source` (`Null` for none), or a refusal (reason, hint).
pub type PayloadSource<'a> =
    dyn FnMut() -> Result<std::result::Result<(Vec<u8>, serde_json::Value), (String, String)>> + 'a;

/// `state seal`: seals the state in `input` (at most 256 MiB) for `r.dev`.
///
/// # Errors
/// No host key; the file, the host or the ledger cannot be read; the
/// envelope cannot be written.
pub fn seal_file(
    root: &HostRoot,
    ledger: Option<&Path>,
    r: &SealRequest,
    input: &Path,
) -> Result<Sealed> {
    let key = crate::keystore::load_host_key(root)?;
    // Non-blocking, a regular file only, at most the payload limit.
    let payload = devfence_model::bounded::read_file(input, MAX_PAYLOAD)
        .step(|| "Cannot read The device state".to_owned())?;
    let mut once = Some(payload);
    let mut source = || {
        Ok(Ok((
            once.take().unwrap_or_default(),
            serde_json::Value::Null,
        )))
    };
    seal_payload(root, ledger, r, &key, &mut source)
}

/// Seals `payload()` for `r.dev` (see `state seal`): refused when the device
/// cannot be described or no tenant holds it — before `payload` is called.
///
/// # Errors
/// The host or the ledger cannot be read; the envelope cannot be written.
pub fn seal_payload(
    root: &HostRoot,
    ledger: Option<&Path>,
    r: &SealRequest,
    key: &devfence_seal::HostKey,
    payload: &mut PayloadSource<'_>,
) -> Result<Sealed> {
    let (dev, vm) = (r.dev, r.vm);
    let inv = crate::check::inventory(root, false)?;
    let described = describe(&inv, &dev);
    let mut store = open_ledger(root, ledger)?;

    // Who holds the device decides the tenant; a device held by no one, or one
    // that cannot be described, is refused (and audited).
    let rec = store.atomically(|tx| tx.device(&dev))?;
    let holder = holder_of(rec.as_ref());
    let mut refused = match (&described, &holder) {
        (Err(e), _) => Some((format!("{}: {}", e.device, e.reason), e.hint.clone())),
        (Ok(_), None) => Some((
            format!(
                "{dev} is {}, held by no tenant: its state belongs to no one devfence knows",
                rec.as_ref()
                    .map_or("not managed by devfence".to_owned(), |r| r
                        .state
                        .to_string())
            ),
            format!(
                "assign it first (`devfence assign {dev} --tenant T`); devfence seals only a tenant's device"
            ),
        )),
        (Ok(_), Some(_)) => None,
    };
    let mut got = None;
    if refused.is_none() {
        match payload()? {
            Ok(p) => got = Some(p),
            Err(rh) => refused = Some(rh),
        }
    }
    if let Some((reason, hint)) = refused {
        store.atomically(|tx| {
            tx.audit(&AuditEvent {
                kind: AuditKind::Refusal,
                device: Some(dev),
                tenant: holder.clone(),
                detail: serde_json::json!({
                    "action": r.action, "vm": vm.to_string(), "reason": reason, "hint": hint,
                }),
            })
        })?;
        return Ok(Sealed::Refused { reason, hint });
    }
    let (Ok(descriptor), Some(tenant), Some((payload, source))) = (described, holder, got) else {
        bail!("Internal error: seal decided without a device or tenant. Hint: this is a bug");
    };

    let now = now_ms();
    let nonce = Nonce::random()
        .map_err(|e| AppError::invalid(format!("Cannot get randomness for the nonce: {e}")))?;
    let bytes = seal(
        key,
        Binding {
            device: descriptor,
            tenant: tenant.clone(),
            vm,
            created_ms: now,
            expires_ms: now + r.ttl,
            nonce,
        },
        &payload,
    )
    .map_err(|e| AppError::invalid(e.to_string()))?;
    let id = EnvelopeId::of(&bytes);
    let dir = root.path_in_root(STATE_STORE)?;
    private_dir(&dir)?;
    let path = dir.join(format!("{id}.dfseal"));
    // Write, then audit (re-reading the holder in the same transaction), then
    // the file is in place; a failed audit removes it.
    let tmp = temp_beside(&path)?;
    write_new(&tmp, &bytes)?;
    let header = devfence_seal::Frame::parse(&bytes)
        .ok()
        .and_then(|f| Header::decode(f.header()).ok())
        .ok_or_else(|| {
            AppError::invalid(
                "Internal error: a sealed envelope does not read back. Hint: this is a bug",
            )
        })?;
    let audited = store.atomically(|tx| {
        let now_holder = holder_of(tx.device(&dev)?.as_ref());
        if now_holder.as_ref() != Some(&tenant) {
            return Err(StoreError::Internal(
                "the device changed hands while it was sealed",
            ));
        }
        tx.audit(&AuditEvent {
            kind: AuditKind::Seal,
            device: Some(dev),
            tenant: Some(tenant.clone()),
            detail: serde_json::json!({
                "action": r.action,
                "source": source,
                "envelope": id,
                "nonce": header.nonce,
                "vm": vm.to_string(),
                "signer": key.public().fingerprint(),
                "source_host": key.host_id(),
                "device_kind": header.device.kind,
                "payload_len": header.payload_len,
                "payload_sha256": header.payload_sha256,
                "expires_ms": header.expires_ms,
            }),
        })
    });
    if let Err(e) = audited {
        let _ = std::fs::remove_file(&tmp);
        return Err(AppError::step(format!("{dev} was not sealed"), e));
    }
    std::fs::rename(&tmp, &path)
        .and_then(|()| sync_dir(&path))
        .step(|| format!("Cannot move the envelope into {}", path.display()))?;

    Ok(Sealed::Done {
        id,
        path,
        header: Box::new(header),
        signer: key.public().fingerprint().to_string(),
        source_host: key.host_id().to_owned(),
        source,
    })
}

/// Creates `path` (0600, must not exist) with `bytes`, synced.
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(AppError::step(
            format!(
                "Cannot write {}. Hint: check the disk and that devfence runs as root",
                path.display()
            ),
            e,
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- admit / inspect

/// An envelope argument: a file, or an id in the state store.
pub fn envelope_path(root: &HostRoot, arg: &str) -> PathBuf {
    if let Ok(id) = arg.parse::<EnvelopeId>() {
        let p = root.path(STATE_STORE).join(format!("{id}.dfseal"));
        if p.exists() && !Path::new(arg).exists() {
            return p;
        }
    }
    PathBuf::from(arg)
}

/// The envelope's bytes, or the frame refusal for one too large to read.
pub fn read_envelope(path: &Path) -> Result<std::result::Result<Vec<u8>, Refusal>> {
    let meta = std::fs::metadata(path).step(|| {
        format!(
            "Cannot read the envelope {}. Hint: give the file `devfence state seal` wrote, or its id",
            path.display()
        )
    })?;
    if !meta.is_file() {
        bail!("The envelope {} is not a regular file", path.display());
    }
    // The size limit before anything is read.
    if let Err(e) = devfence_seal::check_size(meta.len()) {
        let s = e.to_string();
        let (reason, hint) = s.split_once(". Hint: ").unwrap_or((&s, ""));
        return Ok(Err(Refusal {
            check: Check::Frame,
            reason: reason.to_owned(),
            hint: hint.trim_end_matches('.').to_owned(),
        }));
    }
    devfence_model::bounded::read_file(path, MAX_ENVELOPE)
        .step(|| "Cannot read The envelope".to_owned())
        .map(Ok)
}

/// An envelope received as bytes (the agent's request body): the frame
/// refusal for one over the size limit, as [`read_envelope`] gives for a file.
pub fn envelope_of_bytes(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, Refusal> {
    match devfence_seal::check_size(bytes.len() as u64) {
        Ok(()) => Ok(bytes),
        Err(e) => {
            let s = e.to_string();
            let (reason, hint) = s.split_once(". Hint: ").unwrap_or((&s, ""));
            Err(Refusal {
                check: Check::Frame,
                reason: reason.to_owned(),
                hint: hint.trim_end_matches('.').to_owned(),
            })
        }
    }
}

fn destination(
    dev: DeviceId,
    descriptor: std::result::Result<devfence_seal::DeviceDescriptor, devfence_seal::DescribeError>,
    rec: Option<&DeviceRecord>,
    vm: VmUuid,
) -> Destination {
    // Only a device whose gates all passed takes state: Ready or Active.
    let (holder, ready) = match rec.map(|r| &r.state) {
        Some(DeviceState::Ready { tenant, .. } | DeviceState::Active { tenant, .. }) => {
            (Some(tenant.clone()), true)
        }
        Some(s) => (s.tenant().cloned(), false),
        None => (None, false),
    };
    Destination {
        device: dev,
        descriptor,
        holder,
        ready,
        state: rec.map_or("not managed by devfence".to_owned(), |r| {
            r.state.to_string()
        }),
        reserved_vm: rec.and_then(|r| r.state.vm().map(str::to_owned)),
        vm,
    }
}

fn nonce_use(n: &StateNonce) -> NonceUse {
    NonceUse {
        admitted_ms: n.admitted_at_ms,
        device: n.device.to_string(),
        vm: n.vm.clone(),
    }
}

/// The ledger's record of an envelope admitted now for `dev` (single use).
fn admitted_nonce(h: &Header, r: &Report, dev: DeviceId) -> StateNonce {
    StateNonce {
        nonce: h.nonce.to_string(),
        envelope: r.id.to_string(),
        device: dev,
        tenant: h.tenant.clone(),
        vm: h.vm.to_string(),
        signer: r.signer.clone().unwrap_or_default(),
        admitted_at_ms: devfence_engine::store::now_ms(),
        expires_at_ms: i64::try_from(h.expires_ms).unwrap_or(i64::MAX),
    }
}

/// What an evaluation found, owned (it outlives the transaction).
#[derive(Clone, Debug)]
pub struct Report {
    /// The envelope's id (zeros when it was too large to read).
    pub id: EnvelopeId,
    /// Its size in bytes.
    pub size: u64,
    /// Its header, once the signature verified and it decoded.
    pub header: Option<Header>,
    /// The signer's fingerprint, once known.
    pub signer: Option<String>,
    /// Every check in order, with its outcome.
    pub checks: Vec<(Check, CheckOutcome)>,
    /// The first refusal, if any.
    pub refusal: Option<Refusal>,
}

impl Report {
    fn of(ev: &Evaluation<'_>) -> Report {
        Report {
            id: ev.id,
            size: ev.size,
            header: ev.header.clone(),
            signer: ev.signer.map(|s| s.fingerprint().to_string()),
            checks: ev.checks.clone(),
            refusal: ev.refusal().cloned(),
        }
    }

    fn too_large(r: Refusal, size: u64) -> Report {
        let mut checks = vec![(Check::Frame, CheckOutcome::Failed(r.clone()))];
        checks.extend(
            Check::ALL[1..]
                .iter()
                .map(|c| (*c, CheckOutcome::NotReached)),
        );
        Report {
            id: EnvelopeId([0; 16]),
            size,
            header: None,
            signer: None,
            checks,
            refusal: Some(r),
        }
    }

    /// The checks as JSON: each outcome with its check's name.
    #[must_use]
    pub fn checks_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.checks
                .iter()
                .map(|(c, o)| {
                    let mut v = serde_json::to_value(o).unwrap_or_default();
                    v["check"] = serde_json::json!(c.name());
                    v
                })
                .collect(),
        )
    }
}

/// What `state admit` (or `state load`) asks.
#[derive(Clone, Debug)]
pub struct AdmitRequest {
    /// The envelope: a file, or the id of an envelope in the state store.
    pub envelope: String,
    /// The destination device.
    pub device: DeviceId,
    /// The VM the state is for.
    pub vm: VmUuid,
}

/// What admission decided.
#[derive(Debug)]
pub enum Admission {
    /// Admitted: the nonce is spent, the payload is in the side-load directory.
    Admitted {
        /// The one-time token naming the payload.
        token: String,
        /// The payload's file.
        payload: PathBuf,
        /// The envelope's header.
        header: Box<Header>,
    },
    /// Admitted and loaded into the device (`state load`).
    Loaded {
        /// The envelope's header.
        header: Box<Header>,
        /// What the device said when it was opened.
        prepared: serde_json::Value,
        /// What the load did.
        loaded: serde_json::Value,
        /// The payload's size.
        bytes: usize,
    },
    /// Every envelope check passed, but the device cannot load it: not
    /// admitted, the envelope not spent.
    Unloadable {
        /// Why.
        reason: String,
        /// What to do.
        hint: String,
    },
    /// Refused at the report's first failed check (and audited).
    Refused(Refusal),
}

/// An admission's result: where the envelope was read, what each check said,
/// and the decision.
#[derive(Debug)]
pub struct Admitted {
    /// The envelope's file.
    pub path: PathBuf,
    /// `state-admit` or `state-load`.
    pub action: &'static str,
    /// Every check's outcome.
    pub report: Report,
    /// The decision.
    pub decision: Admission,
}

impl Admitted {
    /// The result as `state admit --json` prints it and the agent answers
    /// it (one rendering for both).
    #[must_use]
    pub fn to_json(&self, dev: DeviceId) -> serde_json::Value {
        let report = &self.report;
        match &self.decision {
            Admission::Admitted {
                token,
                payload,
                header,
            } => serde_json::json!({
                "admitted": true,
                "envelope": report.id,
                "device": dev,
                "tenant": header.tenant,
                "vm": header.vm,
                "source_host": header.source_host,
                "token": token,
                "payload": payload.display().to_string(),
                "checks": report.checks_json(),
            }),
            Admission::Loaded {
                header,
                prepared,
                loaded,
                ..
            } => serde_json::json!({
                "admitted": true,
                "loaded": true,
                "envelope": report.id,
                "device": dev,
                "tenant": header.tenant,
                "vm": header.vm,
                "source_host": header.source_host,
                "prepared": prepared,
                "migration": loaded,
                "checks": report.checks_json(),
            }),
            Admission::Unloadable { reason, hint } => serde_json::json!({
                "admitted": false,
                "envelope": report.id,
                "device": dev,
                "check": "migration",
                "reason": reason,
                "hint": hint,
                "checks": report.checks_json(),
            }),
            Admission::Refused(r) => serde_json::json!({
                "admitted": false,
                "envelope": (report.size > 0).then(|| report.id.to_string()),
                "device": dev,
                "check": r.check,
                "reason": r.reason,
                "hint": r.hint,
                "checks": report.checks_json(),
            }),
        }
    }
}

enum Decision {
    Admitted {
        token: String,
        path: PathBuf,
        header: Box<Header>,
    },
    Loading {
        payload: Vec<u8>,
        header: Box<Header>,
        prepared: serde_json::Value,
    },
    Unloadable {
        reason: String,
        hint: String,
    },
    Refused,
}

/// The device side of `state load`.
pub trait DeviceLoader {
    /// Inside the admission transaction, only once every check passed: opens
    /// the device's migration interface and checks that it can take state.
    /// `Err((reason, hint))` refuses the load (the envelope stays unspent).
    ///
    /// # Errors
    /// The refusal's reason and hint.
    fn prepare(&mut self) -> std::result::Result<serde_json::Value, (String, String)>;
    /// After the commit (the envelope is spent): loads `payload`; what it did.
    ///
    /// # Errors
    /// The load failed (its reason and hint in the message).
    fn load(&mut self, payload: &[u8]) -> Result<serde_json::Value>;
}

/// `state admit`, or with a `loader`, `state load`.
///
/// # Errors
/// The envelope, the keyring, the host or the ledger cannot be read; an
/// admitted payload cannot be placed (the envelope is then spent: seal again).
pub fn admit(
    root: &HostRoot,
    ledger: Option<&Path>,
    req: &AdmitRequest,
    loader: Option<&mut dyn DeviceLoader>,
) -> Result<Admitted> {
    let path = envelope_path(root, &req.envelope);
    let bytes = read_envelope(&path)?;
    admit_envelope(
        root,
        ledger,
        path,
        &bytes,
        (req.device, req.vm),
        loader,
        None,
    )
}

/// As [`admit`], on an envelope already read (`label` names where it came
/// from in the result), its audit record naming `actor` when given: the
/// agent's `POST /v1/state/admit`.
///
/// # Errors
/// As [`admit`].
pub fn admit_envelope(
    root: &HostRoot,
    ledger: Option<&Path>,
    label: PathBuf,
    bytes: &std::result::Result<Vec<u8>, Refusal>,
    (dev, vm): (DeviceId, VmUuid),
    mut loader: Option<&mut dyn DeviceLoader>,
    actor: Option<&crate::Actor>,
) -> Result<Admitted> {
    let path = label;
    let action = if loader.is_some() {
        "state-load"
    } else {
        "state-admit"
    };
    let ring = load_keyring(root)?;
    let inv = crate::check::inventory(root, false)?;
    let described = describe(&inv, &dev);
    let mut store = open_ledger(root, ledger)?;
    if let Some(a) = actor {
        store.set_actor(serde_json::to_value(a).ok());
    }
    let side = root.path_in_root(SIDE_LOAD)?;

    // The whole decision, the nonce and the audit record in one transaction: a
    // concurrent admission of the same envelope waits, then finds the nonce.
    let mut report = None;
    let mut io_failure: Option<AppError> = None;
    let mut placed: Option<PathBuf> = None;
    let result = store.atomically(|tx| {
        let rec = tx.device(&dev)?;
        let dest = destination(dev, described.clone(), rec.as_ref(), vm);
        let r = match &bytes {
            Err(refusal) => Report::too_large(refusal.clone(), 0),
            Ok(b) => {
                let horizon = tx.state_nonce_horizon()?;
                let mut lookup = |n: &Nonce| {
                    tx.state_nonce(&n.to_string())
                        .map(|o| o.as_ref().map(nonce_use))
                        .map_err(|e| e.to_string())
                };
                let ev = evaluate(
                    b,
                    &mut SealContext {
                        keyring: &ring,
                        now_ms: now_ms(),
                        destination: Some(&dest),
                        nonce_use: &mut lookup,
                        nonce_horizon_ms: horizon.and_then(|h| u64::try_from(h).ok()),
                    },
                );
                let r = Report::of(&ev);
                if let (Some(payload), Some(h), Some(l)) =
                    (ev.payload(), ev.header.clone(), loader.as_deref_mut())
                {
                    // Admitted for a load: only now is the device opened.
                    match l.prepare() {
                        Err((reason, hint)) => {
                            tx.audit(&AuditEvent {
                                kind: AuditKind::Refusal,
                                device: Some(dev),
                                tenant: Some(h.tenant.clone()),
                                detail: serde_json::json!({
                                    "action": action,
                                    "envelope": r.id,
                                    "vm": vm.to_string(),
                                    "signer": r.signer,
                                    "check": "migration",
                                    "reason": reason,
                                }),
                            })?;
                            report = Some(r);
                            return Ok(Decision::Unloadable { reason, hint });
                        }
                        Ok(prepared) => {
                            tx.record_state_nonce(&admitted_nonce(&h, &r, dev))?;
                            tx.audit(&AuditEvent {
                                kind: AuditKind::Admit,
                                device: Some(dev),
                                tenant: Some(h.tenant.clone()),
                                detail: admit_detail(action, &r, &h, "migration", &prepared),
                            })?;
                            report = Some(r);
                            return Ok(Decision::Loading {
                                payload: payload.to_vec(),
                                header: Box::new(h),
                                prepared,
                            });
                        }
                    }
                }
                if let (Some(payload), Some(h)) = (ev.payload(), ev.header.clone()) {
                    // Admitted: place the payload, record the nonce and the audit.
                    let mut t = [0u8; 32];
                    if let Err(e) = getrandom::fill(&mut t) {
                        io_failure = Some(AppError::invalid(format!(
                            "Cannot get randomness for the token: {e}"
                        )));
                        return Err(StoreError::Internal("no randomness for the token"));
                    }
                    let token = hex(&t);
                    let final_path = side.join(format!("{token}.state"));
                    let tmp = side.join(format!(".{token}.tmp"));
                    if let Err(e) = private_dir(&side).and_then(|()| write_new(&tmp, payload)) {
                        io_failure = Some(e);
                        return Err(StoreError::Internal("the payload could not be placed"));
                    }
                    placed = Some(tmp);
                    tx.record_state_nonce(&admitted_nonce(&h, &r, dev))?;
                    tx.audit(&AuditEvent {
                        kind: AuditKind::Admit,
                        device: Some(dev),
                        tenant: Some(h.tenant.clone()),
                        // The token names the payload; only its hash is kept.
                        detail: admit_detail(
                            "state-admit",
                            &r,
                            &h,
                            "token_sha256",
                            &serde_json::json!(Sha256Digest::of(token.as_bytes())),
                        ),
                    })?;
                    report = Some(r);
                    return Ok(Decision::Admitted {
                        token,
                        path: final_path,
                        header: Box::new(h),
                    });
                }
                r
            }
        };
        let refusal = r.refusal.clone().unwrap_or(Refusal {
            check: Check::Frame,
            reason: "no check failed, yet it was not admissible".into(),
            hint: "this is a bug in devfence; please report it".into(),
        });
        tx.audit(&AuditEvent {
            kind: AuditKind::Refusal,
            device: Some(dev),
            tenant: r
                .header
                .as_ref()
                .map(|h| h.tenant.clone())
                .or(dest.holder.clone()),
            detail: serde_json::json!({
                "action": action,
                "envelope": (r.size > 0).then(|| r.id.to_string()),
                "path": path.display().to_string(),
                "vm": vm.to_string(),
                "signer": r.signer,
                "check": refusal.check,
                "reason": refusal.reason,
            }),
        })?;
        report = Some(r);
        Ok(Decision::Refused)
    });
    let decision = match result {
        Ok(d) => d,
        Err(e) => {
            if let Some(p) = &placed {
                let _ = std::fs::remove_file(p);
            }
            return Err(match io_failure {
                Some(io) => AppError::step(format!("{dev}: the envelope was not admitted"), io),
                None => e.into(),
            });
        }
    };
    let report = report
        .ok_or_else(|| AppError::invalid("Internal error: no report. Hint: this is a bug"))?;
    let decision = match decision {
        Decision::Admitted {
            token,
            path: final_path,
            header,
        } => {
            // Committed: the nonce is spent. Put the payload in place; a crash
            // before this leaves the envelope spent and nothing to restore (fail
            // closed: seal again).
            if let Some(tmp) = &placed {
                put_in_place(dev, tmp, &final_path)?;
            }
            Admission::Admitted {
                token,
                payload: final_path,
                header,
            }
        }
        Decision::Loading {
            payload,
            header,
            prepared,
        } => {
            // Committed: the nonce is spent. Now, and only now, the device takes
            // the state; a failed load leaves the envelope spent (fail closed).
            let Some(l) = loader else {
                bail!("Internal error: a load without a loader. Hint: this is a bug");
            };
            let done = load_after_commit(&mut store, l, dev, &report, &header, &payload)?;
            Admission::Loaded {
                header,
                prepared,
                loaded: done,
                bytes: payload.len(),
            }
        }
        Decision::Unloadable { reason, hint } => Admission::Unloadable { reason, hint },
        Decision::Refused => Admission::Refused(report.refusal.clone().unwrap_or(Refusal {
            check: Check::Frame,
            reason: "refused".into(),
            hint: String::new(),
        })),
    };
    Ok(Admitted {
        path,
        action,
        report,
        decision,
    })
}

/// The audit detail of an admission: the envelope, its header and signer,
/// and one more field (`key`: the load's migration, or the token's hash).
fn admit_detail(
    action: &str,
    r: &Report,
    h: &Header,
    key: &str,
    value: &serde_json::Value,
) -> serde_json::Value {
    let mut d = serde_json::json!({
        "action": action,
        "envelope": r.id,
        "nonce": h.nonce,
        "vm": h.vm.to_string(),
        "signer": r.signer,
        "source_host": h.source_host,
        "device_kind": h.device.kind,
        "payload_len": h.payload_len,
        "payload_sha256": h.payload_sha256,
    });
    d[key] = value.clone();
    d
}

/// After the commit of an admission: the owner record beside the payload
/// (scrubbing the device voids it: the engine's `state-void` step), then the
/// payload renamed from `tmp` into place, the directory synced.
fn put_in_place(dev: DeviceId, tmp: &Path, final_path: &Path) -> Result<()> {
    write_new(
        &final_path.with_extension("owner"),
        format!("{dev}\n").as_bytes(),
    )
    .step(|| {
        format!(
            "The envelope was admitted (its nonce is spent) but its owner record could not be \
             written beside {}. Hint: seal the state again on the source host",
            final_path.display()
        )
    })?;
    std::fs::rename(tmp, final_path)
        .and_then(|()| sync_dir(final_path))
        .step(|| {
            format!(
                "The envelope was admitted (its nonce is spent) but its payload could not be \
                 moved to {}. Hint: seal the state again on the source host",
                final_path.display()
            )
        })
}

/// After the commit of a load's admission: the device takes the state; the
/// outcome is audited either way.
fn load_after_commit(
    store: &mut devfence_engine::SqliteStore,
    l: &mut dyn DeviceLoader,
    dev: DeviceId,
    report: &Report,
    header: &Header,
    payload: &[u8],
) -> Result<serde_json::Value> {
    let loaded = l.load(payload);
    let detail = match &loaded {
        Ok(v) => serde_json::json!({"action": "state-load", "step": "migration-load",
            "envelope": report.id, "result": "ok", "migration": v}),
        Err(e) => serde_json::json!({"action": "state-load", "step": "migration-load",
            "envelope": report.id, "result": "failed", "error": crate::error::chain(e)}),
    };
    store.atomically(|tx| {
        tx.audit(&AuditEvent {
            kind: AuditKind::Step,
            device: Some(dev),
            tenant: Some(header.tenant.clone()),
            detail,
        })
    })?;
    loaded.map_err(|e| {
        AppError::step(
            format!(
                "{dev}: envelope {} was admitted (its nonce is spent) but the load failed",
                report.id
            ),
            e,
        )
    })
}

/// What `state inspect` found.
#[derive(Debug)]
pub struct Inspection {
    /// The envelope's file.
    pub path: PathBuf,
    /// Whether its bytes could be read (false: too large, refused at the frame).
    pub read: bool,
    /// Every check's outcome.
    pub report: Report,
    /// Whether a destination was given (so every check ran).
    pub with_destination: bool,
}

impl Inspection {
    /// The result as `state inspect --json` prints it and the agent answers
    /// it (one rendering for both).
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        let report = &self.report;
        serde_json::json!({
            "envelope": (report.size > 0 && self.read).then(|| report.id.to_string()),
            "path": self.path.display().to_string(),
            "size": report.size,
            "signer": report.signer,
            "header": report.header,
            "checks": report.checks_json(),
            "would_admit": report.refusal.is_none() && self.with_destination,
            "refusal": report.refusal,
            "verdict": self.verdict(),
        })
    }

    /// What admit would do, in words.
    #[must_use]
    pub fn verdict(&self) -> String {
        match (&self.report.refusal, self.with_destination) {
            (Some(r), _) => format!("admit would refuse it at check {}", r.check),
            (None, true) => "admit would admit it".to_owned(),
            (None, false) => {
                "every check that needs no destination passes; give --device and --vm for the rest"
                    .to_owned()
            }
        }
    }
}

/// `state inspect`: every check admit would run on `envelope` (those needing a
/// destination only with `target`), without admitting; read only.
///
/// # Errors
/// The envelope, the keyring, the host or the ledger cannot be read.
pub fn inspect(
    root: &HostRoot,
    ledger: Option<&Path>,
    envelope: &str,
    target: Option<(DeviceId, VmUuid)>,
) -> Result<Inspection> {
    let path = envelope_path(root, envelope);
    let bytes = read_envelope(&path)?;
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    inspect_envelope(root, ledger, path, &bytes, size, target)
}

/// As [`inspect`], on an envelope already read (`label` names where it came
/// from, `size` its size): the agent's `POST /v1/state/inspect`.
///
/// # Errors
/// As [`inspect`].
pub fn inspect_envelope(
    root: &HostRoot,
    ledger: Option<&Path>,
    label: PathBuf,
    bytes: &std::result::Result<Vec<u8>, Refusal>,
    size: u64,
    target: Option<(DeviceId, VmUuid)>,
) -> Result<Inspection> {
    let path = label;
    let ring = load_keyring(root)?;
    let ledger_file = crate::env::ledger_path(root, ledger)?;
    // Read only: no ledger is made where there is none.
    let mut store = if ledger_file.exists() {
        Some(open_ledger(root, ledger)?)
    } else {
        None
    };
    let dest = match target {
        None => None,
        Some((dev, vm)) => {
            let inv = crate::check::inventory(root, false)?;
            let rec = match store.as_mut() {
                Some(s) => s.atomically(|tx| tx.device(&dev))?,
                None => None,
            };
            Some(destination(dev, describe(&inv, &dev), rec.as_ref(), vm))
        }
    };
    let report = match &bytes {
        Err(r) => Report::too_large(r.clone(), size),
        Ok(b) => {
            // Inspecting reports the horizon as admission would (a ledger that
            // cannot be read here leaves it out: the lookup below says so).
            let horizon = store
                .as_mut()
                .and_then(|s| s.atomically(|tx| tx.state_nonce_horizon()).ok())
                .flatten()
                .and_then(|h| u64::try_from(h).ok());
            let mut lookup = |n: &Nonce| -> std::result::Result<Option<NonceUse>, String> {
                match store.as_mut() {
                    None => Ok(None),
                    Some(s) => s
                        .atomically(|tx| tx.state_nonce(&n.to_string()))
                        .map(|o| o.as_ref().map(nonce_use))
                        .map_err(|e| e.to_string()),
                }
            };
            let ev = evaluate(
                b,
                &mut SealContext {
                    keyring: &ring,
                    now_ms: now_ms(),
                    destination: dest.as_ref(),
                    nonce_use: &mut lookup,
                    nonce_horizon_ms: horizon,
                },
            );
            Report::of(&ev)
        }
    };
    Ok(Inspection {
        path,
        read: bytes.is_ok(),
        report,
        with_destination: dest.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parses_units_and_bounds() {
        assert_eq!(parse_ttl("90"), Ok(90_000));
        assert_eq!(parse_ttl("90s"), Ok(90_000));
        assert_eq!(parse_ttl("30m"), Ok(1_800_000));
        assert_eq!(parse_ttl("6h"), Ok(21_600_000));
        assert_eq!(parse_ttl("7d"), Ok(MAX_TTL_MS));
        assert!(parse_ttl("8d").is_err());
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("5w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("-1h").is_err());
        assert!(parse_ttl("").is_err());
    }
}
