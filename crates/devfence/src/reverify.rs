//! `devfence verify`: parses, calls `devfence_app::verify` and renders the
//! re-verification (docs/lifecycle.md).

use std::io::Write;
use std::path::Path;

use anyhow::{Result, anyhow};
use devfence_engine::engine::{Check, Reverification};
use devfence_host::HostRoot;

use crate::Exit;
use crate::cli::VerifyArgs;
use crate::table::Table;

/// `devfence verify`: exit 0 when every device verified, 1 when one drifted or
/// could not be verified, 2 on usage or I/O errors.
///
/// # Errors
/// Bad device, a device not Ready or Active, the ledger cannot be read.
pub fn verify(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &VerifyArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let device = match a.device.as_deref() {
        Some(s) => Some(crate::args::device(s).map_err(|e| {
            anyhow!("--device {s:?}: {e}. Hint: give a BDF (0000:3b:00.1) or an mdev UUID as `devfence status` lists it")
        })?),
        None => None,
    };
    let mut env = crate::ledger::open_env(root, ledger)?;
    let v = devfence_app::verify::verify(&mut env, device)?;
    for w in &v.warnings {
        eprintln!("devfence: {w}");
    }
    let (rv, ids, backend) = (v.reverification, v.restores_recorded, v.backend);
    if a.json {
        crate::jsonout::emit(
            out,
            &serde_json::json!({
                "all_verified": rv.all_verified(),
                "devices": rv.devices,
                "verify_us": rv.verify_us,
                "restores_recorded": ids,
                "sm": backend,
            }),
        )?;
    } else {
        render(&rv, out)?;
        for id in &ids {
            writeln!(
                out,
                "the {backend} backend restored the SM's configuration (restore {id}): recorded in the audit log"
            )?;
        }
    }
    Ok(if rv.all_verified() {
        Exit::Ok
    } else {
        Exit::Findings
    })
}

fn render(rv: &Reverification, out: &mut dyn Write) -> std::io::Result<()> {
    if rv.devices.is_empty() {
        return writeln!(out, "no Ready or Active device to re-verify");
    }
    let mut t = Table::new(&["DEVICE", "STATE", "TENANT", "RESULT"]);
    for d in &rv.devices {
        let result = match &d.check {
            Check::Verified { .. } => "verified",
            Check::Drifted {
                quarantined: true, ..
            } => "DRIFTED, quarantined",
            Check::Drifted { .. } => "DRIFTED, reported",
            Check::Unknown { .. } => "NOT verified",
        };
        t.row(vec![
            d.device.to_string(),
            d.state.clone(),
            d.tenant.to_string(),
            result.to_owned(),
        ]);
    }
    t.write(out)?;
    for d in &rv.devices {
        match &d.check {
            Check::Verified { .. } => {}
            Check::Drifted {
                what, quarantined, ..
            } => {
                let dev = d.device;
                writeln!(
                    out,
                    "  {dev}: {what}; {}",
                    if *quarantined {
                        format!(
                            "it was Ready and is now Quarantined. Hint: release it to scrub and verify it, then assign it again (`devfence audit show --device {dev}` lists forced actions)"
                        )
                    } else {
                        format!(
                            "it is Active and left to its VM (devfence never takes a device from a running guest). Hint: stop the VM and release the device; `devfence audit show --device {dev}` lists forced actions"
                        )
                    },
                )?;
            }
            Check::Unknown { why } => writeln!(
                out,
                "  {}: not verified: {why}. Hint: nothing was changed; run `devfence verify` again once it can be read (`devfence status` shows the SM)",
                d.device
            )?,
        }
    }
    let n = rv.devices.len();
    let ok = rv
        .devices
        .iter()
        .filter(|d| matches!(d.check, Check::Verified { .. }))
        .count();
    writeln!(
        out,
        "{ok} of {n} device(s) verified, {} drifted, {} not verified",
        rv.drifted().count(),
        n - ok - rv.drifted().count()
    )
}
