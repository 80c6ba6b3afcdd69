//! The lifecycle commands: tenants, assign, handover, release, status, plan,
//! recover, audit, the GUID pool and the libvirt hook. Each parses its
//! arguments, calls its use case in `devfence-app` (or, for audit, the store)
//! and renders the result; the environment (`Env`: root, ledger, kernel, SM)
//! is opened by `devfence_app::env`.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use devfence_app::hook::Verdict;
use devfence_engine::engine::{Engine, EngineConfig, Progress};
use devfence_engine::store::{Partition, Tenant};
use devfence_engine::{AuditFilter, DeviceState, GuidRange, StepState, StoreExt, engine};
use devfence_host::HostRoot;
use devfence_model::{DeviceId, Guid, Membership, PKey, TenantId};

use crate::Exit;
use crate::cli::{
    AssignArgs, AuditCommand, GuidPoolArgs, HandoverArgs, HookCommand, OpFlags, PlanArgs,
    RecoverArgs, ReleaseArgs, StatusArgs, TenantAddArgs, TenantCommand,
};
use crate::config::{self};
use crate::table::Table;
pub use devfence_app::env::{Env, SIM_SM_PATH, ledger_path, open_store};

/// Opens the environment (the existing ledger, the kernel, the SM) with the
/// process's `--config`, and shows what opening noticed on stderr.
pub fn open_env(root: &HostRoot, ledger: Option<&Path>) -> Result<Env> {
    let env = Env::open(root, ledger, config::explicit())?;
    show_notices(&env);
    Ok(env)
}

/// As [`open_env`], creating the ledger on first use.
pub fn open_env_or_create(root: &HostRoot, ledger: Option<&Path>) -> Result<Env> {
    let env = Env::open_or_create(root, ledger, config::explicit())?;
    show_notices(&env);
    Ok(env)
}

fn show_notices(env: &Env) {
    for n in &env.notices {
        eprintln!("devfence: {n}");
    }
}

/// `devfence init`.
pub fn init(root: &HostRoot, ledger: Option<&Path>, out: &mut dyn Write) -> Result<Exit> {
    let path = devfence_app::env::init(root, ledger)?;
    writeln!(
        out,
        "ledger created: {} (0600; chain head {})",
        path.display(),
        devfence_engine::audit::head_path(&path).display()
    )?;
    Ok(Exit::Ok)
}

fn config(op: &OpFlags) -> Result<EngineConfig> {
    if !(op.gate_timeout.is_finite() && op.gate_timeout > 0.0 && op.gate_timeout <= 3600.0) {
        bail!(
            "--gate-timeout {} is out of range. Hint: give seconds more than 0 and at most 3600 (e.g. 0.5 or 10)",
            op.gate_timeout
        );
    }
    Ok(EngineConfig {
        gate_deadline: Duration::from_secs_f64(op.gate_timeout),
        ..EngineConfig::default()
    })
}

fn parse_device(s: &str) -> Result<DeviceId> {
    crate::args::device(s)
}

fn parse_tenant(s: &str) -> Result<TenantId> {
    s.parse::<TenantId>().map_err(|e| anyhow!("{e}"))
}

/// Writes progress lines: one per step and gate; on a terminal the waiting line
/// updates in place.
pub struct Printer<'w> {
    out: &'w mut dyn Write,
    tty: bool,
    waiting: bool,
}

impl<'w> Printer<'w> {
    /// A printer to `out` (a terminal if `tty`).
    pub fn new(out: &'w mut dyn Write, tty: bool) -> Self {
        Self {
            out,
            tty,
            waiting: false,
        }
    }

    /// Prints one event.
    pub fn event(&mut self, p: &Progress) {
        let _ = self.print(p);
    }

    fn print(&mut self, p: &Progress) -> std::io::Result<()> {
        if self.waiting && !matches!(p, Progress::Waiting { .. }) && self.tty {
            writeln!(self.out)?;
        }
        self.waiting = false;
        match p {
            Progress::Began { op, kind, device } => {
                writeln!(self.out, "  {op}: {kind} {device}")?;
            }
            Progress::Step {
                name,
                state,
                elapsed_ms,
                detail,
            } => {
                if *state != StepState::Planned {
                    writeln!(
                        self.out,
                        "  [{elapsed_ms:>5} ms] step {name:<18} {}{}",
                        state.name(),
                        brief(detail)
                    )?;
                }
            }
            Progress::Waiting {
                gate,
                polls,
                elapsed_ms,
                last,
            } => {
                let line = format!(
                    "  [{elapsed_ms:>5} ms] gate {gate:<18} waiting (read {polls}): {}",
                    waiting_for(last)
                );
                if self.tty {
                    // devfence's own control sequence goes to the terminal as is
                    // (everything through `out` is escaped); the line is escaped.
                    self.out.flush()?;
                    let mut tty = std::io::stdout();
                    write!(tty, "\r{}\x1b[K", crate::safeout::escape_controls(&line))?;
                    tty.flush()?;
                    self.waiting = true;
                } else if *polls == 1 || polls.is_power_of_two() {
                    writeln!(self.out, "{line}")?;
                }
            }
            Progress::Gate {
                name,
                passed,
                elapsed_ms,
                evidence,
            } => {
                writeln!(
                    self.out,
                    "  [{elapsed_ms:>5} ms] gate {name:<18} {}{}",
                    if *passed { "PASSED" } else { "FAILED" },
                    brief(evidence)
                )?;
            }
            Progress::Finished {
                op,
                outcome,
                state,
                elapsed_ms,
            } => {
                writeln!(
                    self.out,
                    "  [{elapsed_ms:>5} ms] {op} {}: device is {state}",
                    outcome.name()
                )?;
            }
        }
        self.out.flush()
    }
}

/// What a waiting gate still waits for: the SM's questions not answered yet
/// (`Q1 old GUID revoked`, …) when the evidence names them, else the evidence
/// cut short.
fn waiting_for(last: &str) -> String {
    let open: Vec<&str> = last
        .split("; ")
        .filter(|part| {
            part.starts_with('Q') && part.as_bytes().get(1).is_some_and(u8::is_ascii_digit)
        })
        .filter_map(|part| part.split_once(':').map(|(q, _)| q))
        .collect();
    if open.is_empty() {
        engine_truncate(last, 110)
    } else {
        format!("not yet {}", open.join(", "))
    }
}

/// `s` cut to about `n` characters at a word boundary, with `…` when cut.
fn engine_truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_owned();
    }
    let head: String = s.chars().take(n).collect();
    let cut = head.rfind(' ').filter(|&i| i > n / 2).unwrap_or(head.len());
    format!("{}…", head[..cut].trim_end_matches([',', ';', ':', '.']))
}

/// A short rendering of a step's detail: the few fields an operator wants.
fn brief(v: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    for key in [
        "guid", "retired", "driver", "owner", "node", "uuid", "path", "table", "errors",
    ] {
        if let Some(x) = v.get(key) {
            let s = match x {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            parts.push(format!("{key}={s}"));
        }
    }
    if let Some(g) = v.get("proof").and_then(|p| p.get("seen")) {
        parts.push(format!("sm-generation={g}"));
    }
    if let Some(r) = v.get("reason").and_then(|r| r.as_str()) {
        parts.push(engine_truncate(r, 140));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("  ({})", parts.join(", "))
    }
}

fn report(
    root: &HostRoot,
    res: Result<engine::Done, anyhow::Error>,
    json: bool,
    what: &str,
    out: &mut dyn Write,
) -> Result<Exit> {
    match res {
        Ok(done) => {
            if json {
                // Timings as objects, a script reads `.timings[].step`.
                let mut v = serde_json::to_value(&done)?;
                v["timings"] = done
                    .timings
                    .iter()
                    .map(|(step, ms)| serde_json::json!({ "step": step, "ms": ms }))
                    .collect();
                crate::jsonout::emit(out, &v)?;
            } else {
                writeln!(
                    out,
                    "{what} done: {} is {} ({} ms)",
                    done.device, done.state, done.elapsed_ms
                )?;
                if let Some(t) = &done.token_file {
                    writeln!(
                        out,
                        "VF token for the launcher: {} (0600, launcher-owned; pass it as vfio-pci,vf-token=… and remove it)",
                        root.path(t).display()
                    )?;
                }
            }
            Ok(Exit::Ok)
        }
        Err(e) => {
            if json {
                crate::jsonout::emit(out, &serde_json::json!({ "error": e.to_string() }))?;
            }
            Err(e)
        }
    }
}

fn run_op(
    root: &HostRoot,
    ledger: Option<&Path>,
    op: &OpFlags,
    what: &str,
    out: &mut dyn Write,
    req: &devfence_app::lifecycle::Request,
) -> Result<Exit> {
    let cfg = config(op)?;
    if op.dry_run {
        let (dev, to) = match req {
            devfence_app::lifecycle::Request::Assign { device, tenant, .. } => {
                (*device, Some(tenant.clone()))
            }
            devfence_app::lifecycle::Request::Handover { device, to, .. } => {
                (*device, Some(to.clone()))
            }
            devfence_app::lifecycle::Request::Release { device } => (*device, None),
        };
        return show_plan(root, ledger, dev, to, Some(what), op.json, out);
    }
    let tty = std::io::stdout().is_terminal();
    if let Some(agent) = crate::via::agent(root, ledger)? {
        #[allow(clippy::float_cmp)] // the flag's default, compared as given
        if op.gate_timeout != OpFlags::DEFAULT_GATE_TIMEOUT {
            bail!(
                "--gate-timeout is not passed to the host agent, which serves this host (its gates wait the default {} s). Hint: give --direct to run the operation in this process with your timeout, or drop --gate-timeout",
                OpFlags::DEFAULT_GATE_TIMEOUT
            );
        }
        {
            let mut sink = Vec::new();
            let res = {
                let mut printer = Printer::new(&mut sink, tty);
                let mut show = |p: &Progress| {
                    if !op.json {
                        printer.event(p);
                    }
                };
                agent
                    .run_operation(req, &mut show)
                    .map_err(crate::via::error)
            };
            out.write_all(&sink)?;
            return report(root, res, op.json, what, out);
        }
    }
    let f = |e: &mut Engine<'_>| devfence_app::lifecycle::run(e, req);
    let mut env = open_env(root, ledger)?;
    let res = if op.json {
        let mut e = env.engine(cfg);
        f(&mut e)
    } else {
        let mut sink = Vec::new();
        let res = {
            let mut printer = Printer::new(&mut sink, tty);
            let mut e = env.engine(cfg).with_progress(|p| printer.event(p));
            f(&mut e)
        };
        out.write_all(&sink)?;
        res
    };
    report(root, res.map_err(anyhow::Error::from), op.json, what, out)
}

/// `devfence assign`.
pub fn assign(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &AssignArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let dev = parse_device(&a.device)?;
    let t = parse_tenant(&a.tenant)?;
    let req = devfence_app::lifecycle::Request::Assign {
        device: dev,
        tenant: t,
        vm: a.vm.clone(),
    };
    run_op(root, ledger, &a.op, "assign", out, &req)
}

/// `devfence handover`.
pub fn handover(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &HandoverArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let dev = parse_device(&a.device)?;
    let t = parse_tenant(&a.to)?;
    let req = devfence_app::lifecycle::Request::Handover {
        device: dev,
        to: t,
        vm: a.vm.clone(),
    };
    run_op(root, ledger, &a.op, "handover", out, &req)
}

/// `devfence release`.
pub fn release(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &ReleaseArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let dev = parse_device(&a.device)?;
    let req = devfence_app::lifecycle::Request::Release { device: dev };
    run_op(root, ledger, &a.op, "release", out, &req)
}

fn parse_partition(s: &str) -> Result<Partition> {
    let (k, m) = match s.split_once(':') {
        Some((k, m)) => (k, Some(m)),
        None => (s, None),
    };
    let pkey: PKey = k
        .trim()
        .parse()
        .map_err(|e| anyhow!("{e}. Hint: give a P_Key like 0x8001 (full) or 0x0001:limited"))?;
    let membership = match m.map(str::trim) {
        None => pkey.membership(),
        Some("full") => Membership::Full,
        Some("limited") => Membership::Limited,
        Some(x) => bail!("Invalid membership {x:?} in --partition {s}. Hint: use full or limited"),
    };
    if pkey.base() == PKey::DEFAULT_BASE {
        bail!(
            "--partition {s} is the default partition, which every port has. Hint: give the tenant its own P_Keys"
        );
    }
    Ok(Partition {
        pkey: pkey.with_membership(membership),
        membership,
    })
}

/// `devfence tenant …`.
pub fn tenant(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &TenantCommand,
    out: &mut dyn Write,
) -> Result<Exit> {
    match c {
        TenantCommand::Add(a) => tenant_add(root, ledger, a, out),
        TenantCommand::List { json } => {
            let tenants = match crate::via::agent(root, ledger)? {
                Some(agent) => agent.tenants().map_err(crate::via::error)?,
                None => {
                    let mut store = open_store(root, ledger, false)?;
                    devfence_app::tenant::list(&mut store)?
                }
            };
            if *json {
                crate::jsonout::emit(out, &tenants)?;
            } else {
                let mut t = Table::new(&["TENANT", "LAUNCHER", "PARTITIONS"]);
                for x in &tenants {
                    t.row(vec![
                        x.id.to_string(),
                        format!(
                            "{}:{}",
                            x.launcher_uid.map_or("-".into(), |u| u.to_string()),
                            x.launcher_gid.map_or("-".into(), |g| g.to_string())
                        ),
                        x.partitions
                            .iter()
                            .map(|p| {
                                // As entered: the membership bit set for full.
                                let full = p.membership == Membership::Full;
                                let key = p.pkey.base() | if full { 0x8000 } else { 0 };
                                format!("{key:#06x} ({})", if full { "full" } else { "limited" })
                            })
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]);
                }
                t.write(out)?;
            }
            Ok(Exit::Ok)
        }
        TenantCommand::Import { file, json } => {
            let path = match file {
                Some(f) => f.clone(),
                None => root.path_in_root(crate::commands::DEFAULT_TENANCY)?,
            };
            let mut store = open_store(root, ledger, true)?;
            let r = devfence_app::tenant::import(&mut store, &path)?;
            if *json {
                crate::jsonout::emit(out, &r)?;
            } else {
                let ids = |v: &[devfence_model::TenantId]| {
                    v.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                writeln!(
                    out,
                    "imported {} tenant(s) from {}{}{}",
                    r.added.len(),
                    path.display(),
                    if r.added.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", ids(&r.added))
                    },
                    if r.unchanged.is_empty() {
                        String::new()
                    } else {
                        format!("; already in the ledger: {}", ids(&r.unchanged))
                    }
                )?;
                if r.assignments_not_imported > 0 {
                    writeln!(
                        out,
                        "{} device assignment(s) of the file not imported: `devfence assign DEVICE --tenant T` adds a device (and verifies it)",
                        r.assignments_not_imported
                    )?;
                }
            }
            Ok(Exit::Ok)
        }
        TenantCommand::Remove { id } => {
            let id = parse_tenant(id)?;
            let mut store = open_store(root, ledger, false)?;
            devfence_app::tenant::remove(&mut store, &id)?;
            writeln!(out, "tenant {id} removed")?;
            Ok(Exit::Ok)
        }
    }
}

fn tenant_add(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &TenantAddArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let id = parse_tenant(&a.id)?;
    let (u, g) = a.launcher.split_once(':').ok_or_else(|| {
        anyhow!(
            "--launcher {:?} is not UID:GID. Hint: e.g. --launcher 107:107",
            a.launcher
        )
    })?;
    let uid: u32 = u
        .trim()
        .parse()
        .map_err(|_| anyhow!("--launcher uid {u:?} is not a number. Hint: e.g. 107:107"))?;
    let gid: u32 = g
        .trim()
        .parse()
        .map_err(|_| anyhow!("--launcher gid {g:?} is not a number. Hint: e.g. 107:107"))?;
    if uid == 0 {
        bail!(
            "--launcher uid 0 gives the tenant's device nodes to root: no isolation. Hint: use the uid the tenant's QEMU runs as"
        );
    }
    let partitions = a
        .partitions
        .iter()
        .map(|p| parse_partition(p))
        .collect::<Result<Vec<_>>>()?;
    let t = Tenant {
        id: id.clone(),
        launcher_uid: Some(uid),
        launcher_gid: Some(gid),
        security_label: a.label.clone(),
        partitions,
    };
    let mut env = open_env_or_create(root, ledger)?;
    devfence_app::tenant::add(&mut env.engine(EngineConfig::default()), &t)?;
    writeln!(out, "tenant {id} added (launcher {uid}:{gid})")?;
    Ok(Exit::Ok)
}

/// `devfence status`.
pub fn status(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &StatusArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    // One value either way: the agent's answer or the use case's result.
    let (ledger_path, devices, ops, pool, sm_backend, health) =
        match crate::via::agent(root, ledger)? {
            Some(agent) => {
                let s = agent.status().map_err(crate::via::error)?;
                for n in &s.notices {
                    eprintln!("devfence: {n}");
                }
                let health = match (s.sm.health, s.sm.error) {
                    (Some(h), _) => Ok(h),
                    (None, e) => Err(e.unwrap_or_else(|| "no answer".into())),
                };
                (
                    s.ledger,
                    s.devices,
                    s.open_operations,
                    s.guid_pool,
                    s.sm.backend,
                    health,
                )
            }
            None => {
                let mut env = open_env(root, ledger)?;
                let devfence_app::lifecycle::Status {
                    devices,
                    open_operations,
                    guid_pool,
                    sm_backend,
                    health,
                } = devfence_app::lifecycle::status(&mut env.store, &*env.sm)?;
                (
                    env.ledger_path,
                    devices,
                    open_operations,
                    guid_pool,
                    sm_backend,
                    health.map_err(|e| e.to_string()),
                )
            }
        };
    if a.json {
        crate::jsonout::emit(
            out,
            &serde_json::json!({
                "ledger": ledger_path.display().to_string(),
                "devices": devices,
                "open_operations": ops,
                "guid_pool": pool,
                "sm": match &health {
                    Ok(h) => serde_json::json!({ "backend": sm_backend, "healthy": h.is_healthy(), "health": h }),
                    Err(e) => serde_json::json!({ "backend": sm_backend, "error": e.to_string() }),
                },
            }),
        )?;
        return Ok(Exit::Ok);
    }
    writeln!(out, "ledger: {}", ledger_path.display())?;
    let mut t = Table::new(&["DEVICE", "STATE", "TENANT", "VM"]);
    for d in &devices {
        t.row(vec![
            d.device.to_string(),
            d.state.name().to_string(),
            d.state.tenant().map_or("-".into(), ToString::to_string),
            d.state.vm().unwrap_or("-").to_string(),
        ]);
    }
    t.write(out)?;
    for d in &devices {
        if let DeviceState::Quarantined { reason } = &d.state {
            writeln!(out, "  {} quarantined: {reason}", d.device)?;
        }
    }
    if ops.is_empty() {
        writeln!(out, "open operations: none")?;
    } else {
        for o in &ops {
            writeln!(
                out,
                "open operation {} ({}) on {}: unfinished — run `devfence recover` if its process died",
                o.id, o.kind, o.device
            )?;
        }
    }
    match pool {
        Some(p) => writeln!(out, "GUID pool: {}..{}", p.first, p.last)?,
        None => writeln!(
            out,
            "GUID pool: not set (`devfence guid-pool --set FIRST..LAST`)"
        )?,
    }
    match health {
        Ok(h) => {
            writeln!(
                out,
                "SM: {} — {} ({}, {}, last sweep {}{})",
                sm_backend,
                if h.is_healthy() {
                    "healthy"
                } else {
                    "NOT healthy"
                },
                h.status.state,
                h.status.generation,
                h.status.sweep,
                h.version
                    .as_deref()
                    .map_or(String::new(), |v| format!(", {v}"))
            )?;
            for n in &h.notes {
                writeln!(out, "  note: {n}")?;
            }
        }
        Err(e) => writeln!(out, "SM: {sm_backend} — {e}")?,
    }
    Ok(Exit::Ok)
}

/// `devfence plan`.
pub fn plan(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &PlanArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let dev = parse_device(&a.device)?;
    let to = a.to.as_deref().map(parse_tenant).transpose()?;
    show_plan(root, ledger, dev, to, None, a.json, out)
}

/// Shows the steps and gates of the operation on `dev` (to `to`; a release
/// without), as `plan` and every operation's `--dry-run` do; nothing is done.
fn show_plan(
    root: &HostRoot,
    ledger: Option<&Path>,
    dev: DeviceId,
    to: Option<TenantId>,
    what: Option<&str>,
    json: bool,
    out: &mut dyn Write,
) -> Result<Exit> {
    let req = devfence_app::lifecycle::PlanRequest { device: dev, to };
    let steps = match crate::via::agent(root, ledger)? {
        Some(agent) => agent.plan(&req).map_err(crate::via::error)?,
        None => {
            let mut env = open_env(root, ledger)?;
            devfence_app::lifecycle::plan(&mut env.engine(EngineConfig::default()), &req)?
        }
    };
    let to = req.to;
    let what = what.unwrap_or(if to.is_some() {
        "assign/handover"
    } else {
        "release"
    });
    if json {
        crate::jsonout::emit(
            out,
            &serde_json::json!({
                "schema": 1,
                "operation": what,
                "device": dev,
                "tenant": to,
                "dry_run": true,
                "steps": steps,
            }),
        )?;
    } else {
        writeln!(
            out,
            "{what} of {dev}{} (nothing is done):",
            to.as_ref().map_or(String::new(), |t| format!(" to {t}"))
        )?;
        for (i, s) in steps.iter().enumerate() {
            writeln!(out, "  {:>2}. {:<20} {}", i + 1, s.name, s.what)?;
        }
    }
    Ok(Exit::Ok)
}

/// `devfence recover`.
pub fn recover(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &RecoverArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    if let Some(agent) = crate::via::agent(root, ledger)? {
        let a2 = agent.recover().map_err(crate::via::error)?;
        for n in &a2.notices {
            eprintln!("devfence: {n}");
        }
        if !a2.ledger_present {
            return render_no_ledger(&a2.ledger, a.json, out);
        }
        if !a.json {
            let tty = std::io::stdout().is_terminal();
            let mut sink = Vec::new();
            {
                let mut printer = Printer::new(&mut sink, tty);
                for p in &a2.events {
                    printer.event(p);
                }
            }
            out.write_all(&sink)?;
        }
        return render_recovered(&a2.recovered, a.json, out);
    }
    // No ledger at all (nor a -wal of one): devfence never acted here.
    let path = ledger_path(root, ledger)?;
    if !devfence_app::env::ledger_present(&path) {
        if a.json {
            writeln!(out, "[]")?;
        } else {
            writeln!(
                out,
                "nothing to recover: there is no ledger at {}",
                path.display()
            )?;
        }
        return Ok(Exit::Ok);
    }
    let mut env = open_env(root, ledger)?;
    let mut sink = Vec::new();
    let res = {
        let tty = std::io::stdout().is_terminal();
        let mut printer = Printer::new(&mut sink, tty);
        let mut e = env.engine(EngineConfig::default());
        if !a.json {
            e = e.with_progress(|p| printer.event(p));
        }
        devfence_app::lifecycle::recover(&mut e)
    };
    out.write_all(&sink)?;
    render_recovered(&res?, a.json, out)
}

fn render_no_ledger(path: &Path, json: bool, out: &mut dyn Write) -> Result<Exit> {
    if json {
        writeln!(out, "[]")?;
    } else {
        writeln!(
            out,
            "nothing to recover: there is no ledger at {}",
            path.display()
        )?;
    }
    Ok(Exit::Ok)
}

fn render_recovered(rec: &[engine::Recovered], json: bool, out: &mut dyn Write) -> Result<Exit> {
    if json {
        crate::jsonout::emit(out, &rec)?;
        return Ok(Exit::Ok);
    }
    if rec.is_empty() {
        writeln!(out, "nothing to recover: no unfinished operation")?;
    }
    for r in rec {
        writeln!(
            out,
            "recovered {} ({}) on {}: last step {}; device is now {}{}",
            r.op,
            r.kind,
            r.device,
            r.last_step.as_deref().unwrap_or("none"),
            r.state,
            r.problem
                .as_ref()
                .map_or(String::new(), |p| format!(" — {p}"))
        )?;
    }
    Ok(Exit::Ok)
}

/// `devfence audit …`.
pub fn audit(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &AuditCommand,
    out: &mut dyn Write,
) -> Result<Exit> {
    if let AuditCommand::Show {
        device,
        tenant,
        json,
    } = c
    {
        let filter = AuditFilter {
            device: device.as_deref().map(parse_device).transpose()?,
            tenant: tenant.as_deref().map(parse_tenant).transpose()?,
        };
        let recs = match crate::via::agent(root, ledger)? {
            Some(agent) => agent.audit_show(&filter).map_err(crate::via::error)?,
            None => devfence_app::audit::show(&mut open_store(root, ledger, false)?, &filter)?,
        };
        return render_audit(&recs, *json, out);
    }
    // `audit verify` without --head: through the agent when it runs.
    if let AuditCommand::Verify { head: None, json } = c
        && let Some(agent) = crate::via::agent(root, ledger)?
    {
        let v = agent.audit_verify().map_err(crate::via::error)?;
        let res = match (v.intact, v.report) {
            (true, Some(r)) => Ok((r, v.stored_head)),
            _ => Err(v.error.unwrap_or_else(|| "the agent gave no reason".into())),
        };
        return render_verify(res, *json, false, out);
    }
    let mut store = open_store(root, ledger, false)?;
    match c {
        AuditCommand::Head { json } => {
            let devfence_app::audit::Head { head, stored } = devfence_app::audit::head(&store)?;
            if *json {
                crate::jsonout::emit(out, &serde_json::json!({ "head": head, "stored": stored }))?;
            } else {
                match head {
                    Some(h) => writeln!(out, "{}:{}", h.seq, h.hash)?,
                    None => writeln!(out, "0:{}", devfence_engine::Hash::GENESIS)?,
                }
                if let Some(s) = &stored {
                    writeln!(
                        out,
                        "# stored beside the ledger: {}:{}{}",
                        s.seq,
                        s.hash,
                        s.signer
                            .as_deref()
                            .map_or(" (unsigned)".into(), |f| format!(" (signed by {f})"))
                    )?;
                }
                writeln!(
                    out,
                    "# keep this line elsewhere; `devfence audit verify --head SEQ:HASH` checks the chain still reaches it"
                )?;
            }
            Ok(Exit::Ok)
        }
        AuditCommand::Verify { json, head } => {
            let external = head.as_deref().map(parse_head).transpose()?;
            let res = match devfence_app::audit::verify(root, &mut store, external.as_ref())? {
                devfence_app::audit::Verified::Intact { report, stored } => Ok((report, stored)),
                devfence_app::audit::Verified::Broken(e) => Err(e.to_string()),
            };
            render_verify(res, *json, external.is_some(), out)
        }
        AuditCommand::Prune { before, keep, json } => {
            let cut = match (before, keep) {
                (Some(s), _) => devfence_engine::audit::PruneCut::Before(*s),
                (None, Some(n)) => devfence_engine::audit::PruneCut::Keep(*n),
                (None, None) => {
                    return Err(anyhow!(
                        "audit prune needs a cut. Hint: --before SEQ or --keep N"
                    ));
                }
            };
            let rep = devfence_app::audit::prune(root, &mut store, cut)?;
            if *json {
                crate::jsonout::emit(out, &rep)?;
            } else {
                match rep.anchor {
                    Some(a) if rep.pruned > 0 => writeln!(
                        out,
                        "pruned {} record(s) through seq {} ({}); {} kept; the chain now starts after it",
                        rep.pruned, a.seq, a.hash, rep.kept
                    )?,
                    _ => writeln!(out, "no audit record to prune; {} record(s) kept", rep.kept)?,
                }
                writeln!(
                    out,
                    "pruned {} finished operation(s) with {} journal row(s); unfinished operations are kept",
                    rep.operations, rep.journal_rows
                )?;
                match rep.nonce_horizon_ms {
                    Some(h) => writeln!(
                        out,
                        "pruned {} expired envelope nonce(s); horizon {}: no envelope that expired by then is admitted again",
                        rep.nonces,
                        devfence_seal::utc(u64::try_from(h).unwrap_or(0))
                    )?,
                    None => writeln!(out, "no envelope nonce has expired; none pruned")?,
                }
            }
            Ok(Exit::Ok)
        }
        AuditCommand::Export {
            since,
            follow,
            output,
        } => crate::export::run(&mut store, *since, *follow, output.as_deref(), out),
        AuditCommand::Show { .. } => unreachable_show(),
    }
}

/// `audit show` is answered before the store is opened (it may go through
/// the agent); this arm is never reached.
fn unreachable_show() -> Result<Exit> {
    Err(anyhow!(
        "internal: audit show reached the direct store. Hint: this is a bug in devfence"
    ))
}

fn render_audit(
    recs: &[devfence_engine::AuditRecord],
    json: bool,
    out: &mut dyn Write,
) -> Result<Exit> {
    if json {
        crate::jsonout::emit(out, &recs)?;
    } else {
        for r in recs {
            writeln!(
                out,
                "#{:<5} {:<8} {:<14} {:<8} {}",
                r.seq,
                r.kind.name(),
                r.device.map_or("-".into(), |d| d.to_string()),
                r.tenant.as_ref().map_or("-".into(), ToString::to_string),
                engine_truncate(&r.detail.to_string(), 160)
            )?;
        }
        writeln!(out, "{} record(s)", recs.len())?;
    }
    Ok(Exit::Ok)
}

/// `audit verify`'s answer, from the agent or the use case: the report and
/// the stored head, or why the chain is broken.
fn render_verify(
    res: std::result::Result<
        (
            devfence_engine::VerifyReport,
            Option<devfence_engine::audit::StoredHead>,
        ),
        String,
    >,
    json: bool,
    external_given: bool,
    out: &mut dyn Write,
) -> Result<Exit> {
    match res {
        Ok((rep, stored)) => {
            if json {
                crate::jsonout::emit(
                    out,
                    &serde_json::json!({ "intact": true, "report": rep, "stored_head": stored }),
                )?;
            } else {
                writeln!(
                    out,
                    "audit chain intact: {} records{}",
                    rep.records,
                    rep.head
                        .map_or(String::new(), |h| format!(", head #{} {}", h.seq, h.hash))
                )?;
                if let Some(s) = &stored {
                    writeln!(
                        out,
                        "reaches the head kept beside the ledger (#{}, {}){}",
                        s.seq,
                        s.signer
                            .as_deref()
                            .map_or("unsigned".into(), |f| format!("signed by {f}")),
                        if external_given {
                            " and the head given"
                        } else {
                            ""
                        }
                    )?;
                }
            }
            Ok(Exit::Ok)
        }
        Err(e) => {
            if json {
                crate::jsonout::emit(
                    out,
                    &serde_json::json!({ "intact": false, "error": e.to_string() }),
                )?;
            } else {
                writeln!(out, "audit chain NOT intact: {e}")?;
            }
            eprintln!("{e}");
            Ok(Exit::Findings)
        }
    }
}

fn parse_head(s: &str) -> Result<devfence_engine::ChainHead> {
    let hint = "Hint: give what `devfence audit head` printed, SEQ:HASH";
    let (q, h) = s
        .trim()
        .split_once(':')
        .ok_or_else(|| anyhow!("--head {s:?} is not SEQ:HASH. {hint}"))?;
    let seq: u64 = q
        .parse()
        .map_err(|_| anyhow!("--head {s:?}: {q:?} is not a sequence number. {hint}"))?;
    let hash = devfence_engine::Hash::from_hex(h)
        .ok_or_else(|| anyhow!("--head {s:?}: the hash is not 64 hex digits. {hint}"))?;
    Ok(devfence_engine::ChainHead { seq, hash })
}

/// `devfence guid-pool`.
pub fn guid_pool(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &GuidPoolArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let mut env = if a.set.is_some() {
        open_env_or_create(root, ledger)?
    } else {
        open_env(root, ledger)?
    };
    let mut marked = Vec::new();
    if let Some(s) = &a.set {
        let (f, l) = s.split_once("..").ok_or_else(|| {
            anyhow!(
                "--set {s:?} is not FIRST..LAST. Hint: e.g. 0x0002c90300f00000..0x0002c90300f0ffff"
            )
        })?;
        let first: Guid = f.trim().parse().map_err(|e| anyhow!("{e}"))?;
        let last: Guid = l.trim().parse().map_err(|e| anyhow!("{e}"))?;
        // GUIDs of the range that are live (on this host, or named by the SM) are
        // marked used, never issued; allocation checks again, at the SM too.
        marked = devfence_app::guid_pool::set_from_host(&mut env, GuidRange { first, last })?;
    }
    let pool = env.store.atomically(|tx| tx.guid_pool())?;
    if a.json {
        crate::jsonout::emit(out, &pool)?;
    } else {
        if !marked.is_empty() {
            writeln!(
                out,
                "{} GUID(s) of the range are live and were marked used (never issued): {}",
                marked.len(),
                marked
                    .iter()
                    .take(8)
                    .map(|(g, w)| format!("{g} ({w})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
        match pool {
            Some(p) => writeln!(out, "GUID pool: {}..{}", p.first, p.last)?,
            None => writeln!(out, "GUID pool: not set")?,
        }
    }
    Ok(Exit::Ok)
}

/// `devfence hook qemu`.
pub fn hook(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &HookCommand,
    stdin: &mut dyn Read,
) -> Result<Exit> {
    let HookCommand::Qemu {
        domain,
        operation,
        subop,
        ..
    } = c;
    let Some(call) = devfence_app::hook::Call::of(operation, subop) else {
        return Ok(Exit::Ok);
    };
    // At most 4 MiB: more is an error, never a silently cut document.
    let xml =
        devfence_model::bounded::read_stream(stdin, "the domain XML on standard input", 4 << 20)
            .context("Cannot read the domain XML on standard input")?;
    let verdict = match crate::via::agent(root, ledger)? {
        Some(agent) => agent
            .hook(domain, operation, subop, xml)
            .map_err(crate::via::error)?,
        None => {
            let (decision, notices) =
                devfence_app::hook::run(root, ledger, config::explicit(), domain, call, xml)?;
            Verdict::of(&decision, notices)
        }
    };
    for n in &verdict.notices {
        eprintln!("devfence: {n}");
    }
    match verdict.decision.as_str() {
        "allowed" => Ok(Exit::Ok),
        "refused" => {
            eprintln!("{}", verdict.reason.as_deref().unwrap_or("refused"));
            Ok(Exit::Refused)
        }
        _ => {
            eprintln!(
                "devfence: teardown of {domain}: {}",
                verdict.failures.join("; ")
            );
            Ok(Exit::Refused)
        }
    }
}
