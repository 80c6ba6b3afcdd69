//! `devfence state save` and `devfence state load`: parse, call
//! `devfence_app::migrate`, render as `state seal` and `state admit` do.

use std::io::Write;
use std::path::Path;

use anyhow::{Result, anyhow};
use clap::Args;
use devfence_app::state::{AdmitRequest, SealRequest};
use devfence_host::HostRoot;
use devfence_seal::VmUuid;

use crate::Exit;
use crate::state::{AdmitArgs, DEFAULT_TTL};

/// `devfence state save`.
#[derive(Debug, Args)]
pub struct SaveArgs {
    /// The stopped device whose state to save: a PCI address or an mdev UUID.
    #[arg(long, value_name = "DEVICE")]
    pub device: String,
    /// The VM's UUID (libvirt's <uuid>, the same on both hosts of a migration).
    #[arg(long, value_name = "UUID")]
    pub vm: String,
    /// How long the envelope stays admissible: seconds, or a number with s, m, h
    /// or d (at most 7d).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_TTL, value_parser = devfence_app::state::parse_ttl)]
    pub ttl: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `devfence state save`.
pub fn save_cmd(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &SaveArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let r = SealRequest {
        dev: crate::args::device(&a.device)?,
        vm: a.vm.parse::<VmUuid>().map_err(|e| anyhow!("--vm {e}"))?,
        ttl: a.ttl,
        action: "state-save",
    };
    let sealed = devfence_app::migrate::save(root, ledger, &r)?;
    crate::state::render_sealed(&r, &sealed, a.json, out)
}

/// Runs `devfence state load`.
pub fn load_cmd(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &AdmitArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let req = AdmitRequest {
        envelope: a.envelope.clone(),
        device: crate::args::device(&a.device)?,
        vm: a.vm.parse::<VmUuid>().map_err(|e| anyhow!("--vm {e}"))?,
    };
    let admitted = devfence_app::migrate::load(root, ledger, &req)?;
    crate::state::render_admitted(req.device, &admitted, a.json, out)
}
