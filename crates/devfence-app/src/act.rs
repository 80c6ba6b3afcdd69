//! The acting commands (`bind`, `unbind`, `vfs`, `reset`, `mdev`, `ap`): one
//! [`Action`] through the actuator of `devfence-host`, guarded by the ledger.
//!
//! An action that touches a device the ledger holds (the device itself, a VF
//! of a PF, a member of its IOMMU group, an mdev on a parent, an APQN a mask
//! edit would give the host) is refused unless forced; a forced action is an
//! audit record before it is taken. `--dry-run` runs the same action over a
//! recorder and reports the kernel writes it would make.

use std::path::Path;

use devfence_engine::store::DeviceRecord;
use devfence_engine::{AuditEvent, AuditKind, DeviceState, SqliteStore, StoreExt};
use devfence_host::actuator::ops::SysfsActuator;
use devfence_host::actuator::recording::RecordingIo;
use devfence_host::actuator::{ActError, Actuator, ApMaskKind, ApResource, MaskEdit};
use devfence_host::{HostRoot, read_inventory};
use devfence_model::{ApMask, Bdf, DeviceId, Inventory, MdevUuid, PciFunction};

use crate::env::Kernel;
use crate::error::{AppError, Result};

macro_rules! bail {
    ($($t:tt)*) => { return Err(AppError::invalid(format!($($t)*))) };
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Bind a function to a driver (and, `with_group`, its group's endpoints
    /// on host drivers).
    Bind {
        /// The function.
        device: Bdf,
        /// The driver.
        driver: String,
        /// Also bind the group's other endpoints.
        with_group: bool,
    },
    /// Unbind a function from its driver (and, `with_group`, its group's).
    Unbind {
        /// The function.
        device: Bdf,
        /// Also unbind the group's other endpoints.
        with_group: bool,
    },
    /// Set a PF's number of VFs.
    SetVfs {
        /// The PF.
        pf: Bdf,
        /// How many.
        count: u16,
    },
    /// Reset a function.
    Reset {
        /// The function.
        device: Bdf,
    },
    /// Create an mdev (`uuid`: a fresh one when `None`).
    MdevCreate {
        /// The parent device's name.
        parent: String,
        /// The mdev type.
        type_id: String,
        /// Its UUID.
        uuid: Option<MdevUuid>,
    },
    /// Remove an mdev.
    MdevRemove {
        /// Its UUID.
        uuid: MdevUuid,
    },
    /// Assign (or, `assign` false, unassign) AP resources on a matrix mdev.
    ApMatrix {
        /// The matrix mdev.
        mdev: MdevUuid,
        /// The adapters, domains and control domains.
        resources: Vec<ApResource>,
        /// Assign (else unassign).
        assign: bool,
    },
    /// Edit the AP bus masks.
    ApMask {
        /// The edits, each of `apmask` or `aqmask`.
        edits: Vec<(ApMaskKind, MaskEdit)>,
    },
}

/// How to act.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActOptions {
    /// Record the kernel writes that would be made, and make none.
    pub dry_run: bool,
    /// Act even on a device the ledger holds (audited).
    pub force: bool,
}

/// What an action did (or, in a dry run, would do).
#[derive(Debug)]
pub struct Acted {
    /// The action in words.
    pub what: String,
    /// "running kernel" or "simulated kernel".
    pub kernel: &'static str,
    /// Notes for the operator (an IOMMU group left behind).
    pub notes: Vec<String>,
    /// The kernel writes recorded (dry run only).
    pub steps: Option<Vec<String>>,
    /// What reads back after the action (in a dry run, what the recorder
    /// refused, if anything, as the error).
    pub result: std::result::Result<String, Box<ActError>>,
    /// What the action is about, for scripts: the devices, the new mdev's
    /// UUID, a PF's VFs as they read back afterwards.
    pub data: serde_json::Value,
}

/// One action's work: operations on the actuator, then a line saying what
/// reads back. The error is boxed: an `ActError` carries path, errno and hint.
type Step<'a> = dyn Fn(&dyn Actuator) -> std::result::Result<String, Box<ActError>> + 'a;

fn run(kernel: &Kernel, opts: ActOptions, f: &Step<'_>) -> Result<Ran> {
    if opts.dry_run {
        let rec = RecordingIo::dry_run(kernel.io());
        let result = f(&SysfsActuator::new(&rec));
        return Ok((Some(rec.op_lines()), result));
    }
    let done = f(&SysfsActuator::new(kernel.io())).map_err(AppError::Act)?;
    Ok((None, Ok(done)))
}

// ----------------------------------------------------------------------
// Held devices: an acting command does not change what the ledger holds.

/// The ledger, opened the one way every command opens it (its chain heads
/// signed with the host key), and every device it holds (any state but
/// `Free`); none without a ledger (an acting command never creates one). A
/// `-wal` left without its ledger is a damaged ledger: refused, never taken
/// for "nothing held".
fn holdings(
    root: &HostRoot,
    ledger: Option<&Path>,
) -> Result<Option<(SqliteStore, Vec<DeviceRecord>)>> {
    let path = crate::env::ledger_path(root, ledger)?;
    if !crate::env::ledger_present(&path) {
        return Ok(None);
    }
    let mut store = crate::env::open_store(root, ledger, false)?;
    let all = store.atomically(|tx| tx.devices())?;
    let held = all
        .into_iter()
        .filter(|d| d.state != DeviceState::Free)
        .collect();
    Ok(Some((store, held)))
}

/// How an action on the PCI function `t` touches the held device `held`: it is
/// `t`, a VF of `t`, in `t`'s IOMMU group (a host driver there breaks the group's
/// isolation) or an mdev on `t`.
fn touches_pci(inv: &Inventory, t: Bdf, held: &DeviceId) -> Option<String> {
    match held {
        DeviceId::Pci(b) if *b == t => Some(format!("{t} itself")),
        DeviceId::Pci(b) => {
            let f = inv.pci_function(*b)?;
            if f.physfn == Some(t) {
                return Some(format!("{b}, a VF of {t}"));
            }
            let g = f.iommu_group?;
            (inv.pci_function(t)?.iommu_group == Some(g))
                .then(|| format!("{b}, in IOMMU group {g} with {t}"))
        }
        DeviceId::Mdev(u) => inv
            .mdevs
            .iter()
            .find(|m| m.uuid == *u && m.parent == t.to_string())
            .map(|_| format!("mdev {u}, on {t}")),
        _ => None,
    }
}

/// Refuses `what` when it touches a device the ledger holds (`touches` says how,
/// per held device), unless `--force`; a forced action is recorded in the audit
/// chain — before it is taken — with every held device it touches.
fn guard(
    root: &HostRoot,
    ledger: Option<&Path>,
    flags: ActOptions,
    what: &str,
    touches: &dyn Fn(&Inventory, &DeviceRecord) -> Option<String>,
) -> Result<()> {
    let Some((mut store, held)) = holdings(root, ledger)? else {
        return Ok(());
    };
    if held.is_empty() {
        return Ok(());
    }
    let inv = read_inventory(root)?;
    let hit: Vec<(&DeviceRecord, String)> = held
        .iter()
        .filter_map(|r| touches(&inv, r).map(|how| (r, how)))
        .collect();
    if hit.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = hit
        .iter()
        .map(|(r, how)| format!("{how} is {}", r.state))
        .collect();
    if !flags.force {
        let first = hit[0].0.device;
        return Err(AppError::Held(format!(
            "Refused: {what} would change what the ledger holds: {}. Hint: release it first \
             (`devfence release {first}`; a running VM's device is released when the VM stops), \
             or give --force to act anyway — recorded in the audit chain, and the libvirt hook \
             re-verifies (and quarantines) a changed device before its VM starts",
            list.join("; ")
        )));
    }
    if flags.dry_run {
        return Ok(());
    }
    store.atomically(|tx| {
        for (r, how) in &hit {
            tx.audit(&AuditEvent {
                kind: AuditKind::Ledger,
                device: Some(r.device),
                tenant: r.state.tenant().cloned(),
                detail: serde_json::json!({
                    "action": "force", "command": what, "touches": how, "state": r.state.to_string(),
                }),
            })?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The APQNs the held device `r` stands for: a matrix mdev's, or an APQN's own.
fn held_apqns(inv: &Inventory, r: &DeviceRecord) -> Vec<devfence_model::Apqn> {
    match &r.device {
        DeviceId::Apqn(q) => vec![*q],
        DeviceId::Mdev(u) => inv
            .ap
            .iter()
            .flat_map(|ap| ap.matrix_mdevs.iter())
            .filter(|m| m.uuid == *u)
            .filter_map(|m| m.matrix.as_ref())
            .flat_map(|m| m.apqns().collect::<Vec<_>>())
            .collect(),
        _ => Vec::new(),
    }
}

/// The other endpoints of `dev`'s IOMMU group (bridges and ports left out: they
/// are `pcieport` and stay there).
fn group_companions(root: &HostRoot, dev: Bdf) -> Result<Vec<PciFunction>> {
    let inv = read_inventory(root)?;
    let Some(f) = inv.pci_function(dev) else {
        return Ok(Vec::new());
    };
    let Some(g) = f.iommu_group.and_then(|g| inv.group(g)) else {
        return Ok(Vec::new());
    };
    Ok(g.members
        .iter()
        .filter_map(|m| match m {
            devfence_model::GroupMember::Pci(b) => Some(*b),
            _ => None,
        })
        .filter(|b| *b != dev)
        .filter_map(|b| inv.pci_function(b).cloned())
        .filter(|p| !p.is_bridge())
        .collect())
}

fn dma_managed(driver: Option<&str>, wanted: &str) -> bool {
    match driver {
        None => true,
        Some(d) => {
            d == wanted || d == "pci-stub" || d.ends_with("vfio-pci") || d.ends_with("vfio_pci")
        }
    }
}

/// A fresh random (version 4) UUID for a new mdev.
fn fresh_uuid() -> Result<MdevUuid> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| AppError::invalid(format!("Cannot get random bytes for a UUID: {e}")))?;
    devfence_model::make_uuid_v4(&mut b);
    Ok(MdevUuid(b))
}

/// Takes `action` on the host's kernel (see the module docs).
///
/// # Errors
/// The root has no kernel to act on; the action touches a held device and
/// is not forced; the kernel refuses (not in a dry run: there the refusal is
/// [`Acted::result`]); the ledger cannot be read or written.
pub fn act(
    root: &HostRoot,
    ledger: Option<&Path>,
    action: &Action,
    opts: ActOptions,
) -> Result<Acted> {
    match action {
        Action::ApMatrix { resources, .. } if resources.is_empty() => bail!(
            "Nothing to assign. Hint: give --adapter, --domain or --control-domain (repeatable)"
        ),
        Action::ApMask { edits } if edits.is_empty() => {
            bail!("Nothing to edit. Hint: give --apmask EXPR and/or --aqmask EXPR")
        }
        _ => {}
    }
    let kernel = Kernel::for_root(root)?;
    let cx = Cx {
        root,
        ledger,
        kernel: &kernel,
        opts,
    };
    let mut notes = Vec::new();
    let mut created: Option<MdevUuid> = None;
    let (what, (steps, result)) = match action {
        Action::Bind {
            device,
            driver,
            with_group,
        } => bind_action(&cx, *device, driver, *with_group, &mut notes)?,
        Action::Unbind { device, with_group } => {
            unbind_action(&cx, *device, *with_group, &mut notes)?
        }
        Action::SetVfs { pf, count } => {
            let pf = *pf;
            guard(
                root,
                ledger,
                opts,
                &format!("vfs {pf} --count {count}"),
                &|inv, r| touches_pci(inv, pf, &r.device),
            )?;
            let r = run(&kernel, opts, &|x| {
                x.set_num_vfs(pf, *count)?;
                Ok(if *count == 0 {
                    "sriov_numvfs reads 0 and no VF is left".to_owned()
                } else {
                    format!("sriov_numvfs reads {count} and the {count} VF links are there")
                })
            })?;
            (format!("set {pf} to {count} VFs"), r)
        }
        Action::Reset { device: dev } => {
            let dev = *dev;
            let what = format!("reset {dev}");
            guard(root, ledger, opts, &what, &|inv, r| {
                touches_pci(inv, dev, &r.device)
            })?;
            let r = run(&kernel, opts, &|x| {
                x.reset(dev)?;
                Ok("the function answers (vendor id reads back)".to_string())
            })?;
            (what, r)
        }
        Action::MdevCreate {
            parent,
            type_id,
            uuid,
        } => {
            let id = match uuid {
                Some(u) => *u,
                None => fresh_uuid()?,
            };
            created = Some(id);
            let r = run(&kernel, opts, &|x| {
                x.mdev_create(parent, type_id, id)?;
                Ok(format!(
                    "/sys/bus/mdev/devices/{id} exists with type {type_id}"
                ))
            })?;
            (format!("create mdev {id} ({type_id} on {parent})"), r)
        }
        Action::MdevRemove { uuid: id } => {
            let id = *id;
            guard(root, ledger, opts, &format!("mdev remove {id}"), &|_, r| {
                (r.device == DeviceId::Mdev(id)).then(|| format!("mdev {id} itself"))
            })?;
            let r = run(&kernel, opts, &|x| {
                x.mdev_remove(id)?;
                Ok("gone".to_string())
            })?;
            (format!("remove mdev {id}"), r)
        }
        Action::ApMatrix {
            mdev: m,
            resources: res,
            assign,
        } => {
            let m = *m;
            let verb = if *assign { "assign" } else { "unassign" };
            guard(root, ledger, opts, &format!("ap {verb} on {m}"), &|_, r| {
                (r.device == DeviceId::Mdev(m)).then(|| format!("matrix mdev {m} itself"))
            })?;
            let r = run(&kernel, opts, &|x| {
                for r in res {
                    if *assign {
                        x.ap_assign(m, *r)?;
                    } else {
                        x.ap_unassign(m, *r)?;
                    }
                }
                Ok("matrix reads back as asked".to_string())
            })?;
            (format!("{verb} {res:?} on matrix mdev {m}"), r)
        }
        Action::ApMask { edits } => {
            let r = mask(root, ledger, &kernel, edits, opts)?;
            ("edit the AP masks".to_owned(), r)
        }
    };
    let data = data_of(root, action, created, steps.is_none() && result.is_ok());
    Ok(Acted {
        what,
        kernel: kernel.name(),
        notes,
        steps,
        result,
        data,
    })
}

/// What one action works with.
struct Cx<'a> {
    root: &'a HostRoot,
    ledger: Option<&'a Path>,
    kernel: &'a Kernel,
    opts: ActOptions,
}

/// `bind`: the function, and with `with_group` its group's endpoints on host
/// drivers; a note when they are left behind.
fn bind_action(
    cx: &Cx<'_>,
    dev: Bdf,
    driver: &str,
    with_group: bool,
    notes: &mut Vec<String>,
) -> Result<(String, Ran)> {
    let companions = group_companions(cx.root, dev)?;
    let stray: Vec<&PciFunction> = companions
        .iter()
        .filter(|p| !dma_managed(p.driver.as_deref(), driver))
        .collect();
    let mut targets: Vec<Bdf> = Vec::new();
    if with_group {
        targets.extend(stray.iter().map(|p| p.bdf));
    } else if !stray.is_empty() {
        let names: Vec<String> = stray
            .iter()
            .map(|p| format!("{} ({})", p.bdf, p.driver.as_deref().unwrap_or("no driver")))
            .collect();
        notes.push(format!(
            "note: {dev} shares its IOMMU group with {}; the group cannot be handed out while they stay on \
             host drivers. Rerun with --with-group to bind them to {driver} too.",
            names.join(", "),
        ));
    }
    targets.push(dev);
    let what = if targets.len() > 1 {
        format!("bind {dev} to {driver} (with its group)")
    } else {
        format!("bind {dev} to {driver}")
    };
    guard(cx.root, cx.ledger, cx.opts, &what, &|inv, r| {
        targets.iter().find_map(|t| touches_pci(inv, *t, &r.device))
    })?;
    let r = run(cx.kernel, cx.opts, &|x| {
        for t in &targets {
            x.bind(*t, driver)?;
        }
        let list: Vec<String> = targets.iter().map(ToString::to_string).collect();
        Ok(format!("driver link of {} reads {driver}", list.join(", ")))
    })?;
    Ok((what, r))
}

/// `unbind`: the function, and with `with_group` its group's bound endpoints;
/// a note when the group has others.
fn unbind_action(
    cx: &Cx<'_>,
    dev: Bdf,
    with_group: bool,
    notes: &mut Vec<String>,
) -> Result<(String, Ran)> {
    let mut targets: Vec<Bdf> = Vec::new();
    let companions = group_companions(cx.root, dev)?;
    if with_group {
        targets.extend(
            companions
                .iter()
                .filter(|p| p.driver.is_some())
                .map(|p| p.bdf),
        );
    } else if !companions.is_empty() {
        let names: Vec<String> = companions.iter().map(|p| p.bdf.to_string()).collect();
        notes.push(format!(
            "note: {dev} is in an IOMMU group with {}; --with-group unbinds them too.",
            names.join(", ")
        ));
    }
    targets.push(dev);
    let what = format!("unbind {dev}");
    guard(cx.root, cx.ledger, cx.opts, &what, &|inv, r| {
        targets.iter().find_map(|t| touches_pci(inv, *t, &r.device))
    })?;
    let r = run(cx.kernel, cx.opts, &|x| {
        for t in &targets {
            x.unbind(*t)?;
        }
        Ok("no driver bound".to_string())
    })?;
    Ok((what, r))
}

/// The structured part of an action's result (see [`Acted::data`]); `done`:
/// the action was taken (not a dry run, no refusal), so what it made reads back.
fn data_of(
    root: &HostRoot,
    action: &Action,
    created: Option<MdevUuid>,
    done: bool,
) -> serde_json::Value {
    use serde_json::json;
    match action {
        Action::Bind { device, driver, .. } => json!({ "device": device, "driver": driver }),
        Action::Unbind { device, .. } | Action::Reset { device } => json!({ "device": device }),
        Action::SetVfs { pf, count } => {
            let vfs: Vec<String> = if done {
                read_inventory(root)
                    .map(|inv| {
                        inv.pci
                            .iter()
                            .filter(|f| f.physfn == Some(*pf))
                            .map(|f| f.bdf.to_string())
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            json!({ "pf": pf, "count": count, "vfs": vfs })
        }
        Action::MdevCreate {
            parent, type_id, ..
        } => json!({ "uuid": created, "parent": parent, "type": type_id }),
        Action::MdevRemove { uuid } => json!({ "uuid": uuid }),
        Action::ApMatrix {
            mdev,
            resources,
            assign,
        } => json!({
            "mdev": mdev,
            "assign": assign,
            "resources": resources.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>(),
        }),
        Action::ApMask { edits } => json!({
            "edits": edits.iter().map(|(k, e)| format!("{k:?} {e:?}")).collect::<Vec<_>>(),
        }),
    }
}

type Ran = (
    Option<Vec<String>>,
    std::result::Result<String, Box<ActError>>,
);

fn mask(
    root: &HostRoot,
    ledger: Option<&Path>,
    kernel: &Kernel,
    edits: &[(ApMaskKind, MaskEdit)],
    opts: ActOptions,
) -> Result<Ran> {
    // An APQN is touched when the edit sets its adapter's apmask bit or its
    // domain's aqmask bit: the host may then take the guest's queue (docs/design.md
    // L5). Clearing a bit only takes queues from the host and stays allowed.
    let changed = |inv: &Inventory, which: ApMaskKind| -> Vec<u8> {
        let cur = inv.ap.as_ref().and_then(|ap| match which {
            ApMaskKind::Apmask => ap.apmask,
            ApMaskKind::Aqmask => ap.aqmask,
        });
        // An unreadable mask: every bit the edit sets counts (fail closed).
        let cur = cur.unwrap_or(ApMask::NONE);
        edits
            .iter()
            .filter(|(w, _)| *w == which)
            .flat_map(|(_, e)| {
                let new = e.apply(&cur);
                (0..=255u8)
                    .filter(|n| new.contains(*n) && !cur.contains(*n))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    guard(root, ledger, opts, "ap mask", &|inv, r| {
        let (ads, doms) = (
            changed(inv, ApMaskKind::Apmask),
            changed(inv, ApMaskKind::Aqmask),
        );
        let q: Vec<String> = held_apqns(inv, r)
            .into_iter()
            .filter(|q| ads.contains(&q.adapter) || doms.contains(&q.domain))
            .map(|q| q.to_string())
            .collect();
        (!q.is_empty()).then(|| format!("APQN(s) {} of {}", q.join(", "), r.device))
    })?;
    run(kernel, opts, &|x| {
        let mut done = Vec::new();
        for (which, e) in edits {
            let m = x.ap_set_mask(*which, e)?;
            let name = match which {
                ApMaskKind::Apmask => "apmask",
                ApMaskKind::Aqmask => "aqmask",
            };
            done.push(format!("{name} reads {m}"));
        }
        Ok(done.join("; "))
    })
}
