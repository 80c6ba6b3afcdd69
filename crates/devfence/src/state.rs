//! `devfence state`: device-state envelopes for migration (docs/design.md L3,
//! docs/state-envelopes.md). Parses, calls `devfence_app::state` and renders.
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
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
pub use devfence_app::state::DEFAULT_TTL;
use devfence_app::state::{
    Admission, AdmitRequest, Admitted, DeviceLoader, Inspection, Report, SealRequest, Sealed,
};
use devfence_host::HostRoot;
use devfence_model::DeviceId;
use devfence_seal::{CheckOutcome, VmUuid, utc};

use crate::Exit;

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
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_TTL, value_parser = devfence_app::state::parse_ttl)]
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

fn parse_device(s: &str) -> Result<DeviceId> {
    crate::args::device(s)
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
) -> Result<Exit> {
    match c {
        StateCommand::Seal(a) => seal_cmd(root, ledger, a, out),
        StateCommand::Admit(a) => admit_with(root, ledger, a, out, None),
        StateCommand::Inspect(a) => inspect_cmd(root, ledger, a, out),
        StateCommand::Save(a) => crate::migrate::save_cmd(root, ledger, a, out),
        StateCommand::Load(a) => crate::migrate::load_cmd(root, ledger, a, out),
    }
}

// ---------------------------------------------------------------- seal

fn seal_cmd(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &SealArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let r = SealRequest {
        dev: parse_device(&a.device)?,
        vm: parse_vm(&a.vm)?,
        ttl: a.ttl,
        action: "state-seal",
    };
    let sealed = devfence_app::state::seal_file(root, ledger, &r, &a.input)?;
    render_sealed(&r, &sealed, a.json, out)
}

/// Shows what `state seal` or `state save` did.
pub(crate) fn render_sealed(
    r: &SealRequest,
    sealed: &Sealed,
    json: bool,
    out: &mut dyn Write,
) -> Result<Exit> {
    let (dev, vm) = (r.dev, r.vm);
    match sealed {
        Sealed::Refused { reason, hint } => {
            if json {
                crate::jsonout::emit(
                    out,
                    &serde_json::json!({ "sealed": false, "reason": reason, "hint": hint }),
                )?;
            } else {
                let verb = r.action.replace('-', " ");
                eprintln!("devfence: {verb} refused: {reason}. Hint: {hint}");
            }
            Ok(Exit::Refused)
        }
        Sealed::Done {
            id,
            path,
            header,
            signer,
            source_host,
            source,
        } => {
            if json {
                crate::jsonout::emit(
                    out,
                    &serde_json::json!({
                        "sealed": true,
                        "source": source,
                        "id": id,
                        "path": path.display().to_string(),
                        "header": header,
                        "signer": signer,
                    }),
                )?;
            } else {
                writeln!(out, "{id}")?;
                writeln!(
                    out,
                    "sealed the state of {dev} ({}) for tenant {}, VM {vm}\n  envelope: {} (0600)\n  \
                     valid until {}; signed by {} ({})\n  next: copy it to the destination host and run \
                     `devfence state {} FILE --device DEVICE --vm {vm}` there",
                    header.device.kind,
                    header.tenant,
                    path.display(),
                    utc(header.expires_ms),
                    source_host,
                    signer,
                    if r.action == "state-save" {
                        "load"
                    } else {
                        "admit"
                    },
                )?;
            }
            Ok(Exit::Ok)
        }
    }
}

// ---------------------------------------------------------------- admit / inspect

fn write_checks(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    for (c, o) in &report.checks {
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

/// `state admit`, or with a `loader`, `state load`.
pub(crate) fn admit_with(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &AdmitArgs,
    out: &mut dyn Write,
    loader: Option<&mut dyn DeviceLoader>,
) -> Result<Exit> {
    let req = AdmitRequest {
        envelope: a.envelope.clone(),
        device: parse_device(&a.device)?,
        vm: parse_vm(&a.vm)?,
    };
    let admitted = devfence_app::state::admit(root, ledger, &req, loader)?;
    render_admitted(req.device, &admitted, a.json, out)
}

pub(crate) fn render_admitted(
    dev: DeviceId,
    admitted: &Admitted,
    json: bool,
    out: &mut dyn Write,
) -> Result<Exit> {
    let Admitted {
        path,
        action,
        report,
        decision,
    } = admitted;
    match decision {
        Admission::Admitted {
            token,
            payload: final_path,
            header,
        } => {
            if json {
                crate::jsonout::emit(out, &admitted.to_json(dev))?;
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
            Ok(Exit::Ok)
        }
        Admission::Loaded {
            header,
            prepared: _,
            loaded: done,
            bytes,
        } => {
            if json {
                crate::jsonout::emit(out, &admitted.to_json(dev))?;
            } else {
                writeln!(
                    out,
                    "admitted envelope {} to {dev}: tenant {}, VM {}, sealed on {}",
                    report.id, header.tenant, header.vm, header.source_host
                )?;
                writeln!(
                    out,
                    "loaded {bytes} bytes into {dev} through its VFIO migration interface: {done}"
                )?;
            }
            Ok(Exit::Ok)
        }
        Admission::Unloadable { reason, hint } => {
            if json {
                crate::jsonout::emit(out, &admitted.to_json(dev))?;
            } else {
                eprintln!(
                    "devfence: state load {}: refused at check migration: {reason}. Hint: {hint}",
                    path.display()
                );
            }
            Ok(Exit::Refused)
        }
        Admission::Refused(r) => {
            if json {
                crate::jsonout::emit(out, &admitted.to_json(dev))?;
            } else {
                let verb = action.replace('-', " ");
                eprintln!("devfence: {verb} {}: {r}", path.display());
            }
            Ok(Exit::Refused)
        }
    }
}

fn inspect_cmd(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &InspectArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let target = match (&a.device, &a.vm) {
        (Some(d), Some(v)) => Some((parse_device(d)?, parse_vm(v)?)),
        _ => None,
    };
    let i = devfence_app::state::inspect(root, ledger, &a.envelope, target)?;
    render_inspection(&i, a.json, out)
}

fn render_inspection(i: &Inspection, json: bool, out: &mut dyn Write) -> Result<Exit> {
    let (path, report) = (&i.path, &i.report);
    let verdict = i.verdict();
    if json {
        crate::jsonout::emit(out, &i.to_json())?;
    } else {
        writeln!(out, "envelope {} ({} bytes)", path.display(), report.size)?;
        if i.read {
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
        write_checks(report, out)?;
        writeln!(out, "{verdict}")?;
    }
    Ok(if report.refusal.is_some() {
        Exit::Refused
    } else {
        Exit::Ok
    })
}
