//! `devfence state`: device-state envelopes for migration (DESIGN.md L3,
//! docs/state-envelopes.md).
//!
//! `seal` (on the source host) reads a device's state from a file the host made,
//! binds it to the device as inventoried, the device's tenant in the ledger, the
//! VM and a validity window, signs it with the host key and stores it in the
//! root-only state store. `admit` (on the destination host) runs every check of
//! `devfence_seal::admit` in order, inside one ledger transaction that also
//! records the envelope's nonce (single use) and the audit record, and places the
//! payload in the root-only side-load directory under a one-time token for the VM
//! launcher. `inspect` shows what admit would decide, without admitting.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use devfence_engine::{
    AuditEvent, AuditKind, DeviceRecord, DeviceState, StateNonce, StoreError, StoreExt,
};
use devfence_host::{HostRoot, read_inventory};
use devfence_model::{DeviceId, TenantId};
use devfence_seal::format::hex;
use devfence_seal::{
    Binding, Check, Context as SealContext, Destination, EnvelopeId, Evaluation, Header,
    MAX_ENVELOPE, MAX_PAYLOAD, MAX_TTL_MS, Nonce, NonceUse, Outcome as CheckOutcome, Refusal,
    Sha256Digest, VmUuid, describe, evaluate, seal, utc,
};

use crate::Outcome;
use crate::keys::{
    load_host_key, load_keyring, now_ms, open_ledger, private_dir, sync_dir, temp_beside,
};

/// The state store: envelopes sealed on this host, `<id>.dfseal`.
pub const STATE_STORE: &str = "/var/lib/devfence/state";
/// The side-load directory: admitted payloads, `<token>.state`, for the launcher.
pub const SIDE_LOAD: &str = "/run/devfence/state";
/// The default validity of an envelope.
pub const DEFAULT_TTL: &str = "1h";

/// `devfence state …`.
#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Seal a device's state into an envelope (on the source host).
    ///
    /// FILE is the state the host saved from the device (the migration driver's
    /// output). The envelope binds it to the device as inventoried here (kind,
    /// ids or mdev type and device_api, driver, compatibility string), to the
    /// device's current tenant in the ledger, to the VM, to a validity window and
    /// to a fresh random nonce, and is signed with this host's key (`keys init`).
    /// It is written to `<root>/var/lib/devfence/state/<id>.dfseal` (0600) and its
    /// id printed. Refused (exit 1) when the ledger gives the device to no tenant.
    Seal(SealArgs),
    /// Admit an envelope's state to a device (on the destination host).
    ///
    /// Checks, in order, and refuses (exit 1) with the first failing reason:
    /// frame, signature, trusted source key, format, device compatibility with
    /// the destination device as inventoried, tenant (the device is Ready or
    /// Active for the envelope's tenant), VM, single use (a replay is refused),
    /// expiry. On success the payload is placed in the root-only side-load
    /// directory `<root>/run/devfence/state/<token>.state` and a one-time token
    /// naming it is printed for the VM launcher. Every admission and refusal is
    /// an audit record.
    Admit(AdmitArgs),
    /// Show an envelope's header and what `admit` would decide, without admitting.
    ///
    /// Without --device and --vm, the checks that need a destination (device,
    /// tenant, VM) are skipped. Exit 1 if admit would refuse it.
    Inspect(InspectArgs),
    /// Save a stopped device's state through the kernel's VFIO migration
    /// interface and seal it (on the source host).
    ///
    /// The device's VM must not be running: devfence opens the device through
    /// its VFIO group itself (a running QEMU holds the group: EBUSY). It moves the
    /// device RUNNING -> STOP -> STOP_COPY, reads the state to its end (at most
    /// 256 MiB), returns the device to RUNNING, and seals the bytes as `state
    /// seal` does. Refused (exit 1) for a device held by no tenant, and for a
    /// device or kernel without VFIO migration support.
    Save(crate::migrate::SaveArgs),
    /// Admit an envelope, then load its state into the device through the
    /// kernel's VFIO migration interface (on the destination host).
    ///
    /// Every check of `state admit`, in the same transaction; only an admitted
    /// envelope opens the device: STOP -> RESUMING, the payload written, -> STOP
    /// (the driver validates it), the state read back and compared, -> RUNNING.
    /// Refused (exit 1) as `admit` refuses, and for a device or kernel without
    /// VFIO migration support (then the envelope is not spent).
    Load(AdmitArgs),
}

/// `devfence state seal`.
#[derive(Debug, Args)]
pub struct SealArgs {
    /// The device whose state this is: a PCI address or an mdev UUID.
    #[arg(long, value_name = "DEVICE")]
    pub device: String,
    /// The VM's UUID (libvirt's <uuid>, the same on both hosts of a migration).
    #[arg(long, value_name = "UUID")]
    pub vm: String,
    /// The device state to seal (at most 256 MiB).
    #[arg(long = "in", value_name = "FILE")]
    pub input: PathBuf,
    /// How long the envelope stays admissible: seconds, or a number with s, m, h
    /// or d (at most 7d).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_TTL, value_parser = parse_ttl)]
    pub ttl: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `devfence state admit`.
#[derive(Debug, Args)]
pub struct AdmitArgs {
    /// The envelope: a file, or the id of an envelope in this host's state store.
    #[arg(value_name = "ENVELOPE")]
    pub envelope: String,
    /// The destination device: a PCI address or an mdev UUID.
    #[arg(long, value_name = "DEVICE")]
    pub device: String,
    /// The VM the state is for: its UUID.
    #[arg(long, value_name = "UUID")]
    pub vm: String,
    /// Print JSON (also for a refusal).
    #[arg(long)]
    pub json: bool,
}

/// `devfence state inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The envelope: a file, or the id of an envelope in this host's state store.
    #[arg(value_name = "ENVELOPE")]
    pub envelope: String,
    /// Also check against this destination device (with --vm).
    #[arg(long, value_name = "DEVICE", requires = "vm")]
    pub device: Option<String>,
    /// Also check against this VM (with --device).
    #[arg(long, value_name = "UUID", requires = "device")]
    pub vm: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses a validity: `90`, `90s`, `30m`, `6h`, `7d`; 1 s to 7 days. In ms.
pub(crate) fn parse_ttl(s: &str) -> Result<u64, String> {
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

fn parse_device(s: &str) -> Result<DeviceId> {
    s.parse::<DeviceId>().map_err(|e| anyhow!("{e}"))
}

fn parse_vm(s: &str) -> Result<VmUuid> {
    s.parse::<VmUuid>().map_err(|e| anyhow!("--vm {e}"))
}

/// Runs `devfence state …`.
pub fn run(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &StateCommand,
    out: &mut dyn Write,
) -> Result<Outcome> {
    match c {
        StateCommand::Seal(a) => seal_cmd(root, ledger, a, out),
        StateCommand::Admit(a) => admit_cmd(root, ledger, a, out),
        StateCommand::Inspect(a) => inspect_cmd(root, ledger, a, out),
        StateCommand::Save(a) => crate::migrate::save_cmd(root, ledger, a, out),
        StateCommand::Load(a) => crate::migrate::load_cmd(root, ledger, a, out),
    }
}

/// Reads at most `max` bytes of `path`, refusing a larger file before reading.
fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    // Non-blocking, a regular file only, at most `max` bytes.
    devfence_model::bounded::read_file(path, max).with_context(|| format!("Cannot read {what}"))
}

fn holder_of(rec: Option<&DeviceRecord>) -> Option<TenantId> {
    rec.and_then(|r| r.state.tenant().cloned())
}

// ---------------------------------------------------------------- seal

fn seal_cmd(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &SealArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let dev = parse_device(&a.device)?;
    let vm = parse_vm(&a.vm)?;
    let key = load_host_key(root)?;
    let payload = read_bounded(&a.input, MAX_PAYLOAD, "The device state")?;
    let mut once = Some(payload);
    let mut source = || {
        Ok(Ok((
            once.take().unwrap_or_default(),
            serde_json::Value::Null,
        )))
    };
    seal_payload(
        root,
        ledger,
        &SealRequest {
            dev,
            vm,
            ttl: a.ttl,
            json: a.json,
            action: "state-seal",
        },
        &key,
        &mut source,
        out,
    )
}

/// What to seal, for `state seal` and `state save`.
pub(crate) struct SealRequest {
    pub dev: DeviceId,
    pub vm: VmUuid,
    pub ttl: u64,
    pub json: bool,
    /// The audit action: `state-seal` or `state-save`.
    pub action: &'static str,
}

/// The payload to seal, asked for once the device and its tenant passed:
/// the bytes and what to add to the audit record and the output under
/// `source` (`Null` for none), or a refusal (reason, hint).
pub(crate) type PayloadSource<'a> =
    dyn FnMut() -> Result<std::result::Result<(Vec<u8>, serde_json::Value), (String, String)>> + 'a;

/// Seals `payload()` for `r.dev` (see `state seal`): refused when the device
/// cannot be described or no tenant holds it — before `payload` is called.
pub(crate) fn seal_payload(
    root: &HostRoot,
    ledger: Option<&Path>,
    r: &SealRequest,
    key: &devfence_seal::HostKey,
    payload: &mut PayloadSource<'_>,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let (dev, vm) = (r.dev, r.vm);
    let inv = read_inventory(root)
        .with_context(|| format!("Cannot read the host under {}", root.root().display()))?;
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
        if r.json {
            serde_json::to_writer_pretty(
                &mut *out,
                &serde_json::json!({ "sealed": false, "reason": reason, "hint": hint }),
            )?;
            writeln!(out)?;
        } else {
            let verb = r.action.replace('-', " ");
            eprintln!("devfence: {verb} refused: {reason}. Hint: {hint}");
        }
        return Ok(Outcome::Refused);
    }
    let (Ok(descriptor), Some(tenant), Some((payload, source))) = (described, holder, got) else {
        bail!("Internal error: seal decided without a device or tenant. Hint: this is a bug");
    };

    let now = now_ms();
    let nonce = Nonce::random().map_err(|e| anyhow!("Cannot get randomness for the nonce: {e}"))?;
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
    )?;
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
            anyhow!("Internal error: a sealed envelope does not read back. Hint: this is a bug")
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
        return Err(anyhow!(e).context(format!("{dev} was not sealed")));
    }
    std::fs::rename(&tmp, &path)
        .and_then(|()| sync_dir(&path))
        .with_context(|| format!("Cannot move the envelope into {}", path.display()))?;

    if r.json {
        serde_json::to_writer_pretty(
            &mut *out,
            &serde_json::json!({
                "sealed": true,
                "source": source,
                "id": id,
                "path": path.display().to_string(),
                "header": header,
                "signer": key.public().fingerprint(),
            }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(out, "{id}")?;
        writeln!(
            out,
            "sealed the state of {dev} ({}) for tenant {tenant}, VM {vm}\n  envelope: {} (0600)\n  \
             valid until {}; signed by {} ({})\n  next: copy it to the destination host and run \
             `devfence state {} FILE --device DEVICE --vm {vm}` there",
            header.device.kind,
            path.display(),
            utc(header.expires_ms),
            key.host_id(),
            key.public().fingerprint(),
            if r.action == "state-save" {
                "load"
            } else {
                "admit"
            },
        )?;
    }
    Ok(Outcome::Ok)
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
        return Err(anyhow!(e).context(format!(
            "Cannot write {}. Hint: check the disk and that devfence runs as root",
            path.display()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------- admit / inspect

/// An envelope argument: a file, or an id in the state store.
fn envelope_path(root: &HostRoot, arg: &str) -> PathBuf {
    if let Ok(id) = arg.parse::<EnvelopeId>() {
        let p = root.path(STATE_STORE).join(format!("{id}.dfseal"));
        if p.exists() && !Path::new(arg).exists() {
            return p;
        }
    }
    PathBuf::from(arg)
}

/// The envelope's bytes, or the frame refusal for one too large to read.
fn read_envelope(path: &Path) -> Result<std::result::Result<Vec<u8>, Refusal>> {
    let meta = std::fs::metadata(path).with_context(|| {
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
    read_bounded(path, MAX_ENVELOPE, "The envelope").map(Ok)
}

fn destination(
    dev: DeviceId,
    descriptor: Result<devfence_seal::DeviceDescriptor, devfence_seal::DescribeError>,
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
struct Report {
    id: EnvelopeId,
    size: u64,
    header: Option<Header>,
    signer: Option<String>,
    checks: Vec<(Check, CheckOutcome)>,
    refusal: Option<Refusal>,
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

    fn checks_json(&self) -> serde_json::Value {
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

    fn write_checks(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for (c, o) in &self.checks {
            let (word, text) = match o {
                CheckOutcome::Passed { detail } => ("passed", detail.clone()),
                CheckOutcome::Failed(r) => ("FAILED", format!("{}. Hint: {}", r.reason, r.hint)),
                CheckOutcome::NotReached => ("-", "not reached".to_owned()),
                CheckOutcome::NotChecked { detail } => ("skipped", detail.clone()),
            };
            writeln!(out, "  {:<12} {:<8} {text}", c.name(), word)?;
        }
        Ok(())
    }
}

enum Decision {
    Admitted {
        token: String,
        path: PathBuf,
        header: Box<Header>,
    },
    /// Admitted for `state load`: the payload goes to the device, not to a file.
    Loading {
        payload: Vec<u8>,
        header: Box<Header>,
        prepared: serde_json::Value,
    },
    /// Every envelope check passed, but the device cannot load it (no
    /// migration support, in use): not admitted, the envelope not spent.
    Unloadable {
        reason: String,
        hint: String,
    },
    Refused,
}

/// The device side of `state load` (`crate::migrate`).
pub(crate) trait DeviceLoader {
    /// Inside the admission transaction, only once every check passed: opens
    /// the device's migration interface and checks that it can take state.
    /// `Err((reason, hint))` refuses the load (the envelope stays unspent).
    fn prepare(&mut self) -> std::result::Result<serde_json::Value, (String, String)>;
    /// After the commit (the envelope is spent): loads `payload`; what it did.
    ///
    /// # Errors
    /// The load failed (its reason and hint in the message).
    fn load(&mut self, payload: &[u8]) -> Result<serde_json::Value>;
}

fn admit_cmd(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &AdmitArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    admit_with(root, ledger, a, out, None)
}

/// `state admit`, or with a `loader`, `state load`.
pub(crate) fn admit_with(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &AdmitArgs,
    out: &mut dyn Write,
    mut loader: Option<&mut dyn DeviceLoader>,
) -> Result<Outcome> {
    let action = if loader.is_some() {
        "state-load"
    } else {
        "state-admit"
    };
    let dev = parse_device(&a.device)?;
    let vm = parse_vm(&a.vm)?;
    let path = envelope_path(root, &a.envelope);
    let bytes = read_envelope(&path)?;
    let ring = load_keyring(root)?;
    let inv = read_inventory(root)
        .with_context(|| format!("Cannot read the host under {}", root.root().display()))?;
    let described = describe(&inv, &dev);
    let mut store = open_ledger(root, ledger)?;
    let side = root.path_in_root(SIDE_LOAD)?;

    // The whole decision, the nonce and the audit record in one transaction: a
    // concurrent admission of the same envelope waits, then finds the nonce.
    let mut report = None;
    let mut io_failure: Option<anyhow::Error> = None;
    let mut placed: Option<PathBuf> = None;
    let result = store.atomically(|tx| {
        let rec = tx.device(&dev)?;
        let dest = destination(dev, described.clone(), rec.as_ref(), vm);
        let r = match &bytes {
            Err(refusal) => Report::too_large(refusal.clone(), 0),
            Ok(b) => {
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
                                detail: serde_json::json!({
                                    "action": action,
                                    "envelope": r.id,
                                    "nonce": h.nonce,
                                    "vm": h.vm.to_string(),
                                    "signer": r.signer,
                                    "source_host": h.source_host,
                                    "device_kind": h.device.kind,
                                    "payload_len": h.payload_len,
                                    "payload_sha256": h.payload_sha256,
                                    "migration": prepared,
                                }),
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
                        io_failure = Some(anyhow!("Cannot get randomness for the token: {e}"));
                        return Err(StoreError::Internal("no randomness for the token"));
                    }
                    let token = hex(&t);
                    let final_path = side.join(format!("{token}.state"));
                    let tmp = side.join(format!(".{token}.tmp"));
                    if let Err(e) = private_dir(&side)
                        .map_err(anyhow::Error::from)
                        .and_then(|()| write_new(&tmp, payload))
                    {
                        io_failure = Some(e);
                        return Err(StoreError::Internal("the payload could not be placed"));
                    }
                    placed = Some(tmp);
                    tx.record_state_nonce(&admitted_nonce(&h, &r, dev))?;
                    tx.audit(&AuditEvent {
                        kind: AuditKind::Admit,
                        device: Some(dev),
                        tenant: Some(h.tenant.clone()),
                        detail: serde_json::json!({
                            "action": "state-admit",
                            "envelope": r.id,
                            "nonce": h.nonce,
                            "vm": h.vm.to_string(),
                            "signer": r.signer,
                            "source_host": h.source_host,
                            "device_kind": h.device.kind,
                            "payload_len": h.payload_len,
                            "payload_sha256": h.payload_sha256,
                            // The token names the payload; only its hash is kept.
                            "token_sha256": Sha256Digest::of(token.as_bytes()),
                        }),
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
                Some(io) => io.context(format!("{dev}: the envelope was not admitted")),
                None => anyhow!(e),
            });
        }
    };
    let report = report.ok_or_else(|| anyhow!("Internal error: no report. Hint: this is a bug"))?;
    match decision {
        Decision::Admitted {
            token,
            path: final_path,
            header,
        } => {
            // Committed: the nonce is spent. Put the payload in place; a crash
            // before this leaves the envelope spent and nothing to restore (fail
            // closed: seal again).
            if let Some(tmp) = &placed {
                // Whose it is, beside it: scrubbing the device voids it
                // (devfence-engine's `state-void` step).
                write_new(&final_path.with_extension("owner"), format!("{dev}\n").as_bytes())
                    .with_context(|| {
                        format!(
                            "The envelope was admitted (its nonce is spent) but its owner record could not be \
                             written beside {}. Hint: seal the state again on the source host",
                            final_path.display()
                        )
                    })?;
                std::fs::rename(tmp, &final_path)
                    .and_then(|()| sync_dir(&final_path))
                    .with_context(|| {
                        format!(
                            "The envelope was admitted (its nonce is spent) but its payload could not be \
                             moved to {}. Hint: seal the state again on the source host",
                            final_path.display()
                        )
                    })?;
            }
            if a.json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({
                        "admitted": true,
                        "envelope": report.id,
                        "device": dev,
                        "tenant": header.tenant,
                        "vm": header.vm,
                        "source_host": header.source_host,
                        "token": token,
                        "payload": final_path.display().to_string(),
                        "checks": report.checks_json(),
                    }),
                )?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "admitted envelope {} to {dev}: tenant {}, VM {}, sealed on {}",
                    report.id, header.tenant, header.vm, header.source_host
                )?;
                writeln!(out, "token: {token}")?;
                writeln!(
                    out,
                    "payload: {} (root-only; the launcher opens it once, removes it, and restores from it)",
                    final_path.display()
                )?;
            }
            Ok(Outcome::Ok)
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
            let loaded = l.load(&payload);
            let detail = match &loaded {
                Ok(v) => serde_json::json!({"action": "state-load", "step": "migration-load",
                    "envelope": report.id, "result": "ok", "migration": v}),
                Err(e) => serde_json::json!({"action": "state-load", "step": "migration-load",
                    "envelope": report.id, "result": "failed", "error": format!("{e:#}")}),
            };
            store.atomically(|tx| {
                tx.audit(&AuditEvent {
                    kind: AuditKind::Step,
                    device: Some(dev),
                    tenant: Some(header.tenant.clone()),
                    detail,
                })
            })?;
            let done = loaded.context(format!(
                "{dev}: envelope {} was admitted (its nonce is spent) but the load failed",
                report.id
            ))?;
            if a.json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({
                        "admitted": true,
                        "loaded": true,
                        "envelope": report.id,
                        "device": dev,
                        "tenant": header.tenant,
                        "vm": header.vm,
                        "source_host": header.source_host,
                        "prepared": prepared,
                        "migration": done,
                        "checks": report.checks_json(),
                    }),
                )?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "admitted envelope {} to {dev}: tenant {}, VM {}, sealed on {}",
                    report.id, header.tenant, header.vm, header.source_host
                )?;
                writeln!(
                    out,
                    "loaded {} bytes into {dev} through its VFIO migration interface: {done}",
                    payload.len()
                )?;
            }
            Ok(Outcome::Ok)
        }
        Decision::Unloadable { reason, hint } => {
            if a.json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({
                        "admitted": false,
                        "envelope": report.id,
                        "device": dev,
                        "check": "migration",
                        "reason": reason,
                        "hint": hint,
                        "checks": report.checks_json(),
                    }),
                )?;
                writeln!(out)?;
            } else {
                eprintln!(
                    "devfence: state load {}: refused at check migration: {reason}. Hint: {hint}",
                    path.display()
                );
            }
            Ok(Outcome::Refused)
        }
        Decision::Refused => {
            let r = report.refusal.clone().unwrap_or(Refusal {
                check: Check::Frame,
                reason: "refused".into(),
                hint: String::new(),
            });
            if a.json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({
                        "admitted": false,
                        "envelope": (report.size > 0).then(|| report.id.to_string()),
                        "device": dev,
                        "check": r.check,
                        "reason": r.reason,
                        "hint": r.hint,
                        "checks": report.checks_json(),
                    }),
                )?;
                writeln!(out)?;
            } else {
                let verb = action.replace('-', " ");
                eprintln!("devfence: {verb} {}: {r}", path.display());
            }
            Ok(Outcome::Refused)
        }
    }
}

fn inspect_cmd(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &InspectArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let target = match (&a.device, &a.vm) {
        (Some(d), Some(v)) => Some((parse_device(d)?, parse_vm(v)?)),
        _ => None,
    };
    let path = envelope_path(root, &a.envelope);
    let bytes = read_envelope(&path)?;
    let ring = load_keyring(root)?;
    let ledger_file = crate::ledger::ledger_path(root, ledger)?;
    // Read only: no ledger is made where there is none.
    let mut store = if ledger_file.exists() {
        Some(open_ledger(root, ledger)?)
    } else {
        None
    };
    let dest = match target {
        None => None,
        Some((dev, vm)) => {
            let inv = read_inventory(root)
                .with_context(|| format!("Cannot read the host under {}", root.root().display()))?;
            let rec = match store.as_mut() {
                Some(s) => s.atomically(|tx| tx.device(&dev))?,
                None => None,
            };
            Some(destination(dev, describe(&inv, &dev), rec.as_ref(), vm))
        }
    };
    let report = match &bytes {
        Err(r) => Report::too_large(r.clone(), std::fs::metadata(&path).map_or(0, |m| m.len())),
        Ok(b) => {
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
                },
            );
            Report::of(&ev)
        }
    };
    let verdict = match (&report.refusal, dest.is_some()) {
        (Some(r), _) => format!("admit would refuse it at check {}", r.check),
        (None, true) => "admit would admit it".to_owned(),
        (None, false) => {
            "every check that needs no destination passes; give --device and --vm for the rest"
                .to_owned()
        }
    };
    if a.json {
        serde_json::to_writer_pretty(
            &mut *out,
            &serde_json::json!({
                "envelope": (report.size > 0 && bytes.is_ok()).then(|| report.id.to_string()),
                "path": path.display().to_string(),
                "size": report.size,
                "signer": report.signer,
                "header": report.header,
                "checks": report.checks_json(),
                "would_admit": report.refusal.is_none() && dest.is_some(),
                "refusal": report.refusal,
                "verdict": verdict,
            }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(out, "envelope {} ({} bytes)", path.display(), report.size)?;
        if bytes.is_ok() {
            writeln!(out, "  id           {}", report.id)?;
        }
        if let Some(s) = &report.signer {
            writeln!(out, "  signer key   {s}")?;
        }
        if let Some(h) = &report.header {
            writeln!(out, "  device       {}", h.device)?;
            writeln!(out, "  source host  {}", h.source_host)?;
            writeln!(out, "  tenant       {}", h.tenant)?;
            writeln!(out, "  vm           {}", h.vm)?;
            writeln!(out, "  created      {}", utc(h.created_ms))?;
            writeln!(out, "  expires      {}", utc(h.expires_ms))?;
            writeln!(out, "  nonce        {}", h.nonce)?;
            writeln!(
                out,
                "  payload      {} bytes, SHA-256 {}",
                h.payload_len, h.payload_sha256
            )?;
        } else {
            writeln!(
                out,
                "  (the header is shown only once the signature verifies and it decodes)"
            )?;
        }
        writeln!(out, "checks:")?;
        report.write_checks(out)?;
        writeln!(out, "{verdict}")?;
    }
    Ok(if report.refusal.is_some() {
        Outcome::Refused
    } else {
        Outcome::Ok
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
