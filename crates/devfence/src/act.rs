//! The acting commands: parse into a `devfence_app::act::Action`, act, and
//! render what reads back (or, with `--dry-run`, the kernel writes that would
//! be made).

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use devfence_app::AppError;
use devfence_app::act::{ActOptions, Acted, Action};
use devfence_host::HostRoot;
use devfence_host::actuator::{ApMaskKind, ApResource, MaskEdit};
use devfence_model::{Bdf, MdevUuid};

use crate::Exit;
use crate::cli::{
    ActFlags, ApAssignArgs, ApCommand, ApMaskArgs, BindArgs, MdevCommand, ResetArgs, UnbindArgs,
    VfsArgs,
};

fn bdf(s: &str) -> Result<Bdf> {
    crate::args::bdf(s)
}

fn uuid(s: &str) -> Result<MdevUuid> {
    s.parse::<MdevUuid>()
        .map_err(|e| anyhow::anyhow!("{e}. Hint: `devfence inventory` lists the host's mdevs"))
}

/// Takes `action` and renders the result.
fn act(
    root: &HostRoot,
    ledger: Option<&Path>,
    flags: &ActFlags,
    action: &Action,
    out: &mut dyn Write,
) -> Result<Exit> {
    let opts = ActOptions {
        dry_run: flags.dry_run,
        force: flags.force,
    };
    let acted = devfence_app::act::act(root, ledger, action, opts)?;
    render(acted, flags.json, out)
}

fn render(a: Acted, json: bool, out: &mut dyn Write) -> Result<Exit> {
    for n in &a.notes {
        writeln!(out, "{n}")?;
    }
    let what = &a.what;
    if let Some(steps) = &a.steps {
        if json {
            let v = serde_json::json!({
                "operation": what,
                "kernel": a.kernel,
                "dry_run": true,
                "steps": steps,
                "refused": a.result.as_ref().err().map(ToString::to_string),
                "data": a.data,
            });
            crate::jsonout::emit(out, &v)?;
        } else {
            writeln!(
                out,
                "{what} ({}, dry run): {} write(s) would be made",
                a.kernel,
                steps.len()
            )?;
            for s in steps {
                writeln!(out, "  {s}")?;
            }
        }
        a.result.map_err(AppError::Act)?;
        return Ok(Exit::Ok);
    }
    let done = a.result.map_err(AppError::Act)?;
    if json {
        let v = serde_json::json!({
            "operation": what,
            "kernel": a.kernel,
            "dry_run": false,
            "result": done,
            "data": a.data,
        });
        crate::jsonout::emit(out, &v)?;
    } else {
        writeln!(out, "{what} ({}): {done}", a.kernel)?;
    }
    Ok(Exit::Ok)
}

/// `devfence bind`.
pub fn bind(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &BindArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let action = Action::Bind {
        device: bdf(&a.device)?,
        driver: a.driver.clone(),
        with_group: a.with_group,
    };
    act(root, ledger, &a.act, &action, out)
}

/// `devfence unbind`.
pub fn unbind(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &UnbindArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let action = Action::Unbind {
        device: bdf(&a.device)?,
        with_group: a.with_group,
    };
    act(root, ledger, &a.act, &action, out)
}

/// `devfence vfs`.
pub fn vfs(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &VfsArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let action = Action::SetVfs {
        pf: bdf(&a.pf)?,
        count: a.count,
    };
    act(root, ledger, &a.act, &action, out)
}

/// `devfence reset`.
pub fn reset(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &ResetArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let action = Action::Reset {
        device: bdf(&a.device)?,
    };
    act(root, ledger, &a.act, &action, out)
}

/// `devfence mdev …`.
pub fn mdev(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &MdevCommand,
    out: &mut dyn Write,
) -> Result<Exit> {
    match c {
        MdevCommand::Create {
            parent,
            type_id,
            uuid: u,
            act: flags,
        } => {
            let action = Action::MdevCreate {
                parent: parent.clone(),
                type_id: type_id.clone(),
                uuid: u.as_deref().map(uuid).transpose()?,
            };
            act(root, ledger, flags, &action, out)
        }
        MdevCommand::Remove {
            uuid: u,
            act: flags,
        } => {
            let action = Action::MdevRemove { uuid: uuid(u)? };
            act(root, ledger, flags, &action, out)
        }
    }
}

fn ap_resources(a: &ApAssignArgs) -> Vec<ApResource> {
    let mut v: Vec<ApResource> = a.adapter.iter().map(|n| ApResource::Adapter(*n)).collect();
    v.extend(a.domain.iter().map(|n| ApResource::Domain(*n)));
    v.extend(
        a.control_domain
            .iter()
            .map(|n| ApResource::ControlDomain(*n)),
    );
    v
}

/// `devfence ap …`.
pub fn ap(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &ApCommand,
    out: &mut dyn Write,
) -> Result<Exit> {
    match c {
        ApCommand::Assign(a) | ApCommand::Unassign(a) => {
            let action = Action::ApMatrix {
                mdev: uuid(&a.mdev)?,
                resources: ap_resources(a),
                assign: matches!(c, ApCommand::Assign(_)),
            };
            act(root, ledger, &a.act, &action, out)
        }
        ApCommand::Mask(a) => mask(root, ledger, a, out),
    }
}

fn mask(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &ApMaskArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let mut edits = Vec::new();
    if let Some(e) = &a.apmask {
        edits.push((
            ApMaskKind::Apmask,
            e.parse::<MaskEdit>()
                .map_err(|e| anyhow::anyhow!("--apmask: {e}"))?,
        ));
    }
    if let Some(e) = &a.aqmask {
        edits.push((
            ApMaskKind::Aqmask,
            e.parse::<MaskEdit>()
                .map_err(|e| anyhow::anyhow!("--aqmask: {e}"))?,
        ));
    }
    act(root, ledger, &a.act, &Action::ApMask { edits }, out)
}
