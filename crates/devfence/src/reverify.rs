//! `devfence verify`, and the re-verification after a restore of the SM's
//! configuration: thin over `Engine::reverify` and
//! `Engine::record_fabric_restores` (docs/lifecycle.md).

use std::io::Write;
use std::path::Path;

use anyhow::{Result, anyhow};
use devfence_engine::engine::{Check, EngineConfig, Reverification};
use devfence_host::HostRoot;
use devfence_model::DeviceId;

use crate::Outcome;
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
) -> Result<Outcome> {
    let device = match a.device.as_deref() {
        Some(s) => Some(s.parse::<DeviceId>().map_err(|e| {
            anyhow!("--device {s:?}: {e}. Hint: give a BDF (0000:3b:00.1) or an mdev UUID as `devfence status` lists it")
        })?),
        None => None,
    };
    let mut env = crate::ledger::open_env(root, ledger)?;
    let scope = device.map(|d| vec![d]);
    let backend = env.sm().backend().to_owned();
    let (rv, ids) = {
        let mut engine = env.engine(EngineConfig::default());
        let rv = engine.reverify(scope.as_deref())?;
        // A restore the SM backend made while this verification read it is
        // recorded now, and its re-verification of every device is the newer
        // word.
        match engine.record_fabric_restores() {
            Ok((new, after)) => {
                let ids: Vec<String> = new.into_iter().map(|r| r.id).collect();
                match after {
                    Some(mut after) => {
                        after
                            .devices
                            .retain(|d| scope.as_ref().is_none_or(|s| s.contains(&d.device)));
                        (after, ids)
                    }
                    None => (rv, ids),
                }
            }
            Err(e) => {
                eprintln!("devfence: warning: {e}");
                (rv, Vec::new())
            }
        }
    };
    if a.json {
        serde_json::to_writer_pretty(
            &mut *out,
            &serde_json::json!({
                "all_verified": rv.all_verified(),
                "devices": rv.devices,
                "verify_us": rv.verify_us,
                "restores_recorded": ids,
                "sm": backend,
            }),
        )?;
        writeln!(out)?;
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
        Outcome::Ok
    } else {
        Outcome::Findings
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
