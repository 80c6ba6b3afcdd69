//! The commands. Each takes its arguments and a `&mut dyn Write` for standard output.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::CommandFactory;
use devfence_host::{HostRoot, sim};
use devfence_model::{Finding, Inventory, Severity, VfioNodeKind};

use crate::Exit;
use crate::cli::{
    CheckArgs, Cli, Command, DemoArgs, GenerateArgs, InventoryArgs, RulesArgs, SimCommand,
};
use crate::table::Table;
use devfence_app::check::{CheckRequest, Summary};

/// Where a host tree keeps its tenancy file when none is given.
pub use devfence_app::check::DEFAULT_TENANCY;

/// Runs the command `cli` names.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<Exit> {
    crate::via::set_mode(cli.direct, cli.via_agent)?;
    // What the agent serves; with --via-agent anything else is an error, not
    // a silent direct run.
    let served = matches!(
        cli.command,
        Command::Assign(_)
            | Command::Handover(_)
            | Command::Release(_)
            | Command::Recover(_)
            | Command::Check(_)
            | Command::Plan(_)
            | Command::Inventory(_)
            | Command::Status(_)
            | Command::Fleet(_)
            | Command::Hook(_)
            | Command::Tenant(crate::cli::TenantCommand::List { .. })
            | Command::Audit(
                crate::cli::AuditCommand::Show { .. }
                    | crate::cli::AuditCommand::Verify { head: None, .. }
            )
            // The agent itself, whatever the environment says of clients.
            | Command::Serve(_)
    );
    if !served {
        crate::via::direct_only("This command")?;
    }
    // `--sim PROFILE`: a fresh simulated host in a temporary directory, removed at exit.
    let _sim_dir;
    let root = match &cli.sim {
        Some(name) => {
            let profile: sim::Profile = name.parse()?;
            let dir = tempfile::Builder::new()
                .prefix("devfence-sim-")
                .tempdir_in(scratch_base())
                .context("Cannot create a temporary directory for the simulated host")?;
            let host = dir.path().join(profile.to_string());
            sim::generate(&sim::GenerateOptions {
                profile,
                out: host.clone(),
                vfs: None,
                host_id: 0,
            })?;
            _sim_dir = dir;
            HostRoot::new(host)
        }
        None => HostRoot::new(cli.root.clone()),
    };
    // The acting and lifecycle commands: a refusal by a rule exits 1 (the
    // README's exit status table); every other command's errors exit 2.
    let acting = matches!(
        cli.command,
        Command::Bind(_)
            | Command::Unbind(_)
            | Command::Vfs(_)
            | Command::Reset(_)
            | Command::Mdev(_)
            | Command::Ap(_)
            | Command::Tenant(_)
            | Command::Assign(_)
            | Command::Handover(_)
            | Command::Release(_)
    );
    let r = dispatch(cli, &root, out).map_err(|e| match &cli.sim {
        Some(p) if missing_ledger(&e) => anyhow::anyhow!(
            "A --sim host is generated afresh for every command, so this one has no ledger: nothing is held on it. \
             Hint: to run commands one after another, generate a host once (`devfence sim generate --profile {p} --out DIR`) \
             and give `--root DIR`; `devfence demo` shows a whole lifecycle"
        ),
        _ => e,
    });
    if acting {
        r.map_err(crate::refusal_if_rule)
    } else {
        r
    }
}

/// Whether `e` says there is no ledger.
fn missing_ledger(e: &anyhow::Error) -> bool {
    use devfence_app::AppError;
    use devfence_engine::StoreError;
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StoreError>(),
            Some(StoreError::Missing { .. })
        ) || matches!(
            c.downcast_ref::<AppError>(),
            Some(AppError::Store(StoreError::Missing { .. }))
        )
    })
}

fn dispatch(cli: &Cli, root: &HostRoot, out: &mut dyn Write) -> Result<Exit> {
    let root = root.clone();
    match &cli.command {
        Command::Bind(a) => crate::act::bind(&root, cli.ledger.as_deref(), a, out),
        Command::Unbind(a) => crate::act::unbind(&root, cli.ledger.as_deref(), a, out),
        Command::Vfs(a) => crate::act::vfs(&root, cli.ledger.as_deref(), a, out),
        Command::Reset(a) => crate::act::reset(&root, cli.ledger.as_deref(), a, out),
        Command::Mdev(c) => crate::act::mdev(&root, cli.ledger.as_deref(), c, out),
        Command::Ap(c) => crate::act::ap(&root, cli.ledger.as_deref(), c, out),
        Command::Inventory(a) => inventory(&root, cli.ledger.as_deref(), a, out),
        Command::Check(a) => check(&root, cli.ledger.as_deref(), a, out),
        Command::Rules(a) => rules(a, out),
        Command::Sim(SimCommand::Generate(a)) => generate(a, out),
        Command::Sim(SimCommand::Profiles { json }) => profiles(*json, out),
        Command::Demo(a) => demo(a, out),
        Command::Init => crate::ledger::init(&root, cli.ledger.as_deref(), out),
        Command::Tenant(c) => crate::ledger::tenant(&root, cli.ledger.as_deref(), c, out),
        Command::Assign(a) => crate::ledger::assign(&root, cli.ledger.as_deref(), a, out),
        Command::Handover(a) => crate::ledger::handover(&root, cli.ledger.as_deref(), a, out),
        Command::Release(a) => crate::ledger::release(&root, cli.ledger.as_deref(), a, out),
        Command::Status(a) => crate::ledger::status(&root, cli.ledger.as_deref(), a, out),
        Command::Verify(a) => crate::reverify::verify(&root, cli.ledger.as_deref(), a, out),
        Command::Plan(a) => crate::ledger::plan(&root, cli.ledger.as_deref(), a, out),
        Command::Recover(a) => crate::ledger::recover(&root, cli.ledger.as_deref(), a, out),
        Command::Audit(c) => crate::ledger::audit(&root, cli.ledger.as_deref(), c, out),
        Command::GuidPool(a) => crate::ledger::guid_pool(&root, cli.ledger.as_deref(), a, out),
        Command::Fleet(c) => crate::fleet::run(&root, cli.ledger.as_deref(), c, out),
        Command::Keys(c) => crate::keys::run(&root, cli.ledger.as_deref(), c, out),
        Command::State(c) => crate::state::run(&root, cli.ledger.as_deref(), c, out),
        Command::Hook(c) => crate::ledger::hook(
            &root,
            cli.ledger.as_deref(),
            c,
            &mut std::io::stdin().lock(),
        ),
        Command::Serve(a) => serve(&root, cli, a),
        Command::Man { out: dir } => man(dir.as_deref(), out),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "devfence", out);
            Ok(Exit::Ok)
        }
    }
}

/// The sections devfence(1) adds to what clap generates.
const MAN_EXTRA: &str = ".SH EXIT STATUS\n\
.TP\n0\nSuccess.\n\
.TP\n1\nThe answer is no: \\fBcheck\\fR found an error\\-severity finding, \\fBverify\\fR a drift, \\fBaudit verify\\fR a broken chain; or a rule refused the request (an operation refused or quarantined at a gate, an acting command on a device the ledger holds, a tenant still holding devices, the libvirt hook, a device\\-state envelope).\n\
.TP\n2\nUsage, configuration or I/O error.\n\
.SH CONFIGURATION\n<root>/etc/devfence/devfence.toml, or \\fB\\-\\-config\\fR \\fIFILE\\fR: which subnet manager devfence drives and how the libvirt hook decides. Every key is in devfence.toml(5).\n\
.SH FILES\n.TP\n<root>/var/lib/devfence/ledger.db\nThe ledger (0600), with its chain head <ledger>.audit\\-head beside it.\n\
.TP\n<root>/etc/devfence/tenancy.toml\nWho holds what, for \\fBcheck\\fR before any ledger exists.\n\
.TP\n<root>/etc/devfence/keys/\nThe host key and the keyring of trusted source hosts (0700).\n\
.SH SEE ALSO\ndevfence.toml(5), and devfence\\-COMMAND(1) for each command (\\fBdevfence man \\-\\-out DIR\\fR writes them all).\n";

/// The command line as the man pages show it: without clap's `help`
/// subcommands (every page documents `--help`), so no page names a
/// devfence-…-help(1) that is not written.
fn man_command(cmd: clap::Command) -> clap::Command {
    cmd.disable_help_subcommand(true)
        .mut_subcommands(man_command)
}

/// `devfence man`: devfence(1) to `out`, or with `dir` every page into it.
fn man(dir: Option<&Path>, out: &mut dyn Write) -> Result<Exit> {
    let Some(dir) = dir else {
        clap_mangen::Man::new(man_command(Cli::command())).render(out)?;
        out.write_all(MAN_EXTRA.as_bytes())?;
        return Ok(Exit::Ok);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    let mut pages = 0usize;
    let mut write = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("Cannot write {}", p.display()))?;
        pages += 1;
        Ok(())
    };
    let mut top = Vec::new();
    clap_mangen::Man::new(man_command(Cli::command())).render(&mut top)?;
    top.extend_from_slice(MAN_EXTRA.as_bytes());
    write("devfence.1", &top)?;
    fn walk(
        cmd: &clap::Command,
        prefix: &str,
        write: &mut dyn FnMut(&str, &[u8]) -> Result<()>,
    ) -> Result<()> {
        for sub in cmd.get_subcommands() {
            let name = format!("{prefix}-{}", sub.get_name());
            let mut page = Vec::new();
            clap_mangen::Man::new(sub.clone().name(name.clone())).render(&mut page)?;
            page.extend_from_slice(b".SH SEE ALSO\ndevfence(1), devfence.toml(5)\n");
            write(&format!("{name}.1"), &page)?;
            walk(sub, &name, write)?;
        }
        Ok(())
    }
    let mut cmd = man_command(Cli::command());
    cmd.build();
    walk(&cmd, "devfence", &mut write)?;
    write(
        "devfence.toml.5",
        devfence_app::config::man_page().as_bytes(),
    )?;
    writeln!(out, "{pages} man pages written to {}", dir.display())?;
    Ok(Exit::Ok)
}

/// `devfence serve`: the host agent (crates/devfence-agent).
fn serve(root: &HostRoot, cli: &Cli, a: &crate::cli::ServeArgs) -> Result<Exit> {
    if a.role == crate::cli::ServeRole::FabricController {
        return serve_controller(root, cli, a);
    }
    if a.fabric.is_some() {
        bail!(
            "--fabric names the fabric a controller leads. Hint: give --role fabric-controller with it (the host agent's fabric is [fleet] fabric)"
        );
    }
    if !(a.header_timeout.is_finite() && a.header_timeout > 0.0 && a.header_timeout <= 3600.0) {
        bail!(
            "--header-timeout {} is out of range. Hint: give seconds more than 0 and at most 3600",
            a.header_timeout
        );
    }
    if a.max_connections == 0 {
        bail!("--max-connections 0 would serve nobody. Hint: give at least 1 (the default is 256)");
    }
    devfence_agent::serve(devfence_agent::Options {
        root: root.clone(),
        ledger: cli.ledger.clone(),
        config: cli.config.clone(),
        socket: a.socket.clone(),
        limits: devfence_agent::Limits {
            header_timeout: std::time::Duration::from_secs_f64(a.header_timeout),
            max_connections: a.max_connections,
            ..devfence_agent::Limits::default()
        },
        log_level: a.log_level.clone(),
    })?;
    Ok(Exit::Ok)
}

/// `devfence serve --role fabric-controller --fabric NAME` (docs/fleet.md).
fn serve_controller(root: &HostRoot, cli: &Cli, a: &crate::cli::ServeArgs) -> Result<Exit> {
    let Some(fabric) = a.fabric.clone() else {
        bail!(
            "--role fabric-controller needs --fabric NAME. Hint: the fabric it leads, as in [fleet] fabric on its hosts"
        );
    };
    if a.socket.is_some() {
        bail!(
            "--socket is for the host agent; the fabric controller serves no socket. Hint: drop --socket (its state is in etcd: `devfence fleet status`)"
        );
    }
    devfence_agent::controller::serve(&devfence_agent::controller::ControllerOptions {
        root: root.clone(),
        config: cli.config.clone(),
        fabric,
        log_level: a.log_level.clone(),
    })?;
    Ok(Exit::Ok)
}

/// Where temporary simulated hosts go: `$TMPDIR` if set, else `/dev/shm` (sysfs
/// lives in memory, and so should its simulation), else the system temp dir.
fn scratch_base() -> PathBuf {
    match std::env::var_os("TMPDIR") {
        Some(t) => PathBuf::from(t),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    }
}

fn inventory(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &InventoryArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    // The agent reads the host as it is; probing migration opens devices,
    // this process's to do.
    let agent = if a.probe_migration {
        crate::via::direct_only("inventory --probe-migration")?;
        None
    } else {
        crate::via::agent(root, ledger)?
    };
    let inv = match agent {
        Some(agent) => agent.inventory().map_err(crate::via::error)?,
        None => devfence_app::check::inventory(root, a.probe_migration)?,
    };
    if a.json {
        crate::jsonout::emit(out, &inv)?;
    } else {
        print_inventory(&inv, out)?;
        for m in &inv.migration {
            let what = match (m.supported, &m.error) {
                (Some(true), _) => format!("migration: {}", m.flags.join(" ")),
                (Some(false), _) => "no migration support".to_owned(),
                (None, e) => format!("not asked: {}", e.as_deref().unwrap_or("?")),
            };
            writeln!(out, "migration {}: {what}", m.device)?;
        }
    }
    Ok(Exit::Ok)
}

fn opt<T: ToString>(v: Option<&T>) -> String {
    v.map(ToString::to_string).unwrap_or_default()
}

/// Writes the inventory as tables, one section per kind of device.
fn print_inventory(inv: &Inventory, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "kernel {}   vfio-pci {}",
        inv.kernel_release.as_deref().unwrap_or("(unknown)"),
        match &inv.vfio_pci {
            None => "not loaded".to_string(),
            Some(p) => format!(
                "loaded, enable_sriov={}",
                p.enable_sriov.map_or("?", |b| if b { "Y" } else { "N" })
            ),
        }
    )?;
    if !inv.pci.is_empty() {
        writeln!(out, "\nPCI functions ({})", inv.pci.len())?;
        let mut t = Table::new(&[
            "BDF", "ID", "CLASS", "DRIVER", "OVERRIDE", "GROUP", "RESET", "SR-IOV",
        ]);
        for p in &inv.pci {
            let id = match (p.vendor, p.device) {
                (Some(v), Some(d)) => format!("{v:04x}:{d:04x}"),
                _ => "?".into(),
            };
            let sriov = if let Some(s) = &p.sriov {
                format!(
                    "PF {}/{} VFs",
                    opt(s.num_vfs.as_ref()),
                    opt(s.total_vfs.as_ref())
                )
            } else if let Some(pf) = p.physfn {
                format!("VF of {pf}")
            } else {
                String::new()
            };
            let reset = if p.has_reset {
                if p.reset_methods.is_empty() {
                    "yes".to_string()
                } else {
                    p.reset_methods.join(",")
                }
            } else {
                "none".into()
            };
            t.row(vec![
                p.bdf.to_string(),
                id,
                p.class.map(|c| format!("{c:06x}")).unwrap_or_default(),
                opt(p.driver.as_ref()),
                opt(p.driver_override.as_ref()),
                opt(p.iommu_group.as_ref()),
                reset,
                sriov,
            ]);
        }
        t.write(out)?;
    }
    if !inv.iommu_groups.is_empty() {
        writeln!(out, "\nIOMMU groups ({})", inv.iommu_groups.len())?;
        let mut t = Table::new(&["GROUP", "TYPE", "MEMBERS"]);
        for g in &inv.iommu_groups {
            t.row(vec![
                g.id.to_string(),
                opt(g.group_type.as_ref()),
                g.members
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            ]);
        }
        t.write(out)?;
    }
    if !inv.vfio_nodes.is_empty() {
        writeln!(out, "\nVFIO nodes ({})", inv.vfio_nodes.len())?;
        let mut t = Table::new(&["PATH", "KIND", "UID", "GID", "MODE", "LABEL"]);
        for n in &inv.vfio_nodes {
            let kind = match &n.kind {
                VfioNodeKind::Container => "container",
                VfioNodeKind::Group(_) => "group",
                VfioNodeKind::NoIommuGroup(_) => "noiommu group",
                VfioNodeKind::Device(_) => "device",
            };
            t.row(vec![
                n.path.clone(),
                kind.into(),
                n.uid.to_string(),
                n.gid.to_string(),
                format!("{:04o}", n.mode),
                opt(n.selinux_label.as_ref()),
            ]);
        }
        t.write(out)?;
    }
    if !inv.mdev_parents.is_empty() {
        writeln!(out, "\nmdev types")?;
        let mut t = Table::new(&["PARENT", "TYPE", "NAME", "API", "AVAILABLE"]);
        for p in &inv.mdev_parents {
            for ty in &p.types {
                t.row(vec![
                    p.name.clone(),
                    ty.id.clone(),
                    opt(ty.name.as_ref()),
                    opt(ty.device_api.as_ref()),
                    opt(ty.available_instances.as_ref()),
                ]);
            }
        }
        t.write(out)?;
    }
    if !inv.mdevs.is_empty() {
        writeln!(out, "\nmdevs ({})", inv.mdevs.len())?;
        let mut t = Table::new(&["UUID", "PARENT", "TYPE", "GROUP", "DRIVER"]);
        for m in &inv.mdevs {
            t.row(vec![
                m.uuid.to_string(),
                m.parent.clone(),
                opt(m.type_id.as_ref()),
                opt(m.iommu_group.as_ref()),
                opt(m.driver.as_ref()),
            ]);
        }
        t.write(out)?;
    }
    if let Some(ap) = &inv.ap {
        writeln!(out, "\ns390 AP bus")?;
        let ids = |m: Option<&devfence_model::ApMask>| match m {
            None => "(unreadable)".to_string(),
            Some(m) => ranges(m.iter()),
        };
        writeln!(out, "  apmask (host adapters): {}", ids(ap.apmask.as_ref()))?;
        writeln!(out, "  aqmask (host domains):  {}", ids(ap.aqmask.as_ref()))?;
        let mut by_driver = std::collections::BTreeMap::<String, usize>::new();
        for q in &ap.queues {
            *by_driver
                .entry(q.driver.clone().unwrap_or_else(|| "(none)".into()))
                .or_default() += 1;
        }
        let drivers: Vec<String> = by_driver
            .iter()
            .map(|(d, n)| format!("{n} on {d}"))
            .collect();
        writeln!(
            out,
            "  cards: {}   queues: {} ({})",
            ap.cards.len(),
            ap.queues.len(),
            drivers.join(", ")
        )?;
        if !ap.matrix_mdevs.is_empty() {
            let mut t = Table::new(&[
                "MATRIX MDEV",
                "ADAPTERS",
                "DOMAINS",
                "GUEST APQNS",
                "CONTROL",
            ]);
            for m in &ap.matrix_mdevs {
                let (a, d) = m
                    .matrix
                    .as_ref()
                    .map_or((String::new(), String::new()), |x| {
                        (
                            ranges(x.adapters.iter().copied()),
                            ranges(x.domains.iter().copied()),
                        )
                    });
                t.row(vec![
                    m.uuid.to_string(),
                    a,
                    d,
                    m.guest_matrix
                        .as_ref()
                        .map(|g| g.apqns().count().to_string())
                        .unwrap_or_default(),
                    ranges(m.control_domains.iter().copied()),
                ]);
            }
            t.write(out)?;
        }
    }
    if !inv.ib.is_empty() {
        writeln!(out, "\nInfiniBand ports")?;
        let mut t = Table::new(&[
            "DEVICE",
            "PCI",
            "PORT",
            "STATE",
            "LID",
            "SM LID",
            "PORT GUID",
            "P_KEYS",
        ]);
        for d in &inv.ib {
            for p in &d.ports {
                t.row(vec![
                    d.name.clone(),
                    opt(d.pci.as_ref()),
                    p.port.to_string(),
                    opt(p.state.as_ref()),
                    p.lid.map(|l| format!("{l:#x}")).unwrap_or_default(),
                    p.sm_lid.map(|l| format!("{l:#x}")).unwrap_or_default(),
                    opt(p.port_guid.as_ref()),
                    p.pkeys
                        .iter()
                        .map(|k| k.pkey.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                ]);
            }
        }
        t.write(out)?;
    }
    let vf_guids: Vec<_> = inv
        .pci
        .iter()
        .filter_map(|p| p.sriov.as_ref().map(|s| (p, s)))
        .filter(|(_, s)| !s.vf_guids.is_empty())
        .collect();
    if !vf_guids.is_empty() {
        writeln!(out, "\nmlx5 VF GUIDs")?;
        let mut t = Table::new(&["PF", "VF", "BDF", "NODE GUID", "PORT GUID", "POLICY"]);
        for (p, s) in vf_guids {
            for g in &s.vf_guids {
                let bdf = s
                    .vfs
                    .iter()
                    .find(|v| v.index == g.index)
                    .map(|v| v.bdf.to_string());
                t.row(vec![
                    p.bdf.to_string(),
                    g.index.to_string(),
                    bdf.unwrap_or_default(),
                    opt(g.node_guid.as_ref()),
                    opt(g.port_guid.as_ref()),
                    opt(g.policy.as_ref()),
                ]);
            }
        }
        t.write(out)?;
    }
    if !inv.problems.is_empty() {
        writeln!(out, "\nProblems reading the host ({})", inv.problems.len())?;
        for p in &inv.problems {
            let v = p
                .value
                .as_deref()
                .map(|v| format!(" = {v:?}"))
                .unwrap_or_default();
            writeln!(out, "  {}{v}: {}", p.path, p.error)?;
        }
    }
    Ok(())
}

/// `1-3,7` for a sorted run of ids (hex, as the AP tools print them).
fn ranges(ids: impl Iterator<Item = u8>) -> String {
    let v: Vec<u8> = ids.collect();
    if v.is_empty() {
        return "none".into();
    }
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j].wrapping_add(1) && v[j] != 255 {
            j += 1;
        }
        parts.push(if i == j {
            format!("{:02x}", v[i])
        } else {
            format!("{:02x}-{:02x}", v[i], v[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// `check` with the tenancy the ledger (or the tenancy file) gives, for the demo.
pub fn check_with_ledger(root: &HostRoot) -> Result<(Vec<Finding>, Option<PathBuf>)> {
    let r = devfence_app::check::check(root, None, None, &CheckRequest::default())?;
    Ok((r.findings, r.tenancy))
}

fn check(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &CheckArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let req = CheckRequest {
        tenancy: a.tenancy.clone(),
        fabric: a.fabric,
    };
    // The agent checks the host's own tenancy; a file of the caller's or the
    // fabric posture is this process's to read.
    let agent = if a.tenancy.is_some() || a.fabric {
        crate::via::direct_only("check with --tenancy or --fabric")?;
        None
    } else {
        crate::via::agent(root, ledger)?
    };
    let report = match agent {
        Some(agent) => {
            let r = agent.check().map_err(crate::via::error)?;
            devfence_app::check::CheckReport {
                findings: r.findings,
                tenancy: r.tenancy,
                tenancy_from_ledger: r.tenancy_from_ledger,
                tenancy_file_unread: r.tenancy_file_unread,
                summary: r.summary,
                notices: r.notices,
            }
        }
        None => devfence_app::check::check(root, ledger, crate::config::explicit(), &req)?,
    };
    for n in &report.notices {
        eprintln!("devfence: {n}");
    }
    let (findings, source, summary) = (report.findings, report.tenancy.clone(), report.summary);
    if a.json {
        #[derive(serde::Serialize)]
        struct Report<'a> {
            schema: u32,
            root: String,
            tenancy: Option<String>,
            tenancy_from_ledger: bool,
            summary: &'a Summary,
            findings: &'a [Finding],
        }
        let report = Report {
            schema: 1,
            root: root.root().display().to_string(),
            tenancy: source.map(|p| p.display().to_string()),
            tenancy_from_ledger: report.tenancy_from_ledger,
            summary: &summary,
            findings: &findings,
        };
        crate::jsonout::emit(out, &report)?;
    } else {
        match &source {
            Some(p) if report.tenancy_from_ledger => {
                writeln!(
                    out,
                    "tenancy: the ledger {} (devfence manages devices here)",
                    p.display()
                )?;
                if let Some(f) = &report.tenancy_file_unread {
                    writeln!(
                        out,
                        "  {} is not read while there is a ledger: `devfence tenant import` carries its tenants over",
                        f.display()
                    )?;
                }
            }
            Some(p) => writeln!(out, "tenancy: {}", p.display())?,
            None => writeln!(
                out,
                "tenancy: none (no --tenancy and no {DEFAULT_TENANCY} under the root): rules that need tenancy were skipped"
            )?,
        }
        for f in &findings {
            writeln!(out, "\n{f}")?;
        }
        writeln!(
            out,
            "\n{} error(s), {} warning(s), {} info",
            summary.errors, summary.warnings, summary.infos
        )?;
    }
    Ok(if summary.errors > 0 {
        Exit::Findings
    } else {
        Exit::Ok
    })
}

fn rules(a: &RulesArgs, out: &mut dyn Write) -> Result<Exit> {
    // The host rules, then the fabric rules of `check --fabric`.
    let all: Vec<(&str, Severity, &str)> = devfence_policy::RULES
        .iter()
        .map(|r| (r.id, r.severity, r.summary))
        .chain(
            devfence_fabric::posture::RULES
                .iter()
                .map(|r| (r.id, r.severity, r.summary)),
        )
        .collect();
    if a.json {
        let v: Vec<_> = all
            .iter()
            .map(|(id, severity, summary)| serde_json::json!({"id": id, "severity": severity, "summary": summary}))
            .collect();
        crate::jsonout::emit(out, &v)?;
    } else {
        let mut t = Table::new(&["RULE", "SEVERITY", "WHAT IT FINDS"]);
        for (id, severity, summary) in &all {
            t.row(vec![
                id.to_string(),
                severity.to_string(),
                summary.to_string(),
            ]);
        }
        t.write(out)?;
    }
    Ok(Exit::Ok)
}

fn generate(a: &GenerateArgs, out: &mut dyn Write) -> Result<Exit> {
    let profile: sim::Profile = a.profile.parse()?;
    let opts = sim::GenerateOptions {
        profile,
        out: a.out.clone(),
        vfs: a.vfs,
        host_id: a.host_id,
    };
    let summary = sim::generate(&opts)?;
    writeln!(
        out,
        "wrote profile {profile} to {}: {summary}",
        a.out.display()
    )?;
    writeln!(out, "next: devfence --root {} check", a.out.display())?;
    Ok(Exit::Ok)
}

fn profiles(json: bool, out: &mut dyn Write) -> Result<Exit> {
    if json {
        let v: Vec<_> = sim::Profile::ALL
            .iter()
            .map(|p| serde_json::json!({"name": p.to_string(), "description": p.description()}))
            .collect();
        crate::jsonout::emit(out, &serde_json::json!({"schema": 1, "profiles": v}))?;
        return Ok(Exit::Ok);
    }
    let mut t = Table::new(&["PROFILE", "WHAT IT MODELS"]);
    for p in sim::Profile::ALL {
        t.row(vec![p.to_string(), p.description().to_string()]);
    }
    t.write(out)?;
    Ok(Exit::Ok)
}

/// The profiles the demo walks through (all but `scale`, which is for benchmarks).
const DEMO_PROFILES: [sim::Profile; 5] = [
    sim::Profile::Cx6Ib,
    sim::Profile::NoAcs,
    sim::Profile::UserspacePf,
    sim::Profile::GpuMdev,
    sim::Profile::S390Ap,
];

fn demo(a: &DemoArgs, out: &mut dyn Write) -> Result<Exit> {
    let tmp;
    let base: PathBuf = match &a.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("Cannot create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("devfence-demo-")
                .tempdir_in(scratch_base())
                .context("Cannot create a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    writeln!(
        out,
        "devfence demo: each profile is a simulated host with known isolation defects planted;\n\
         devfence reads it back through sysfs and reports each defect with its evidence.\n"
    )?;
    let mut total = 0;
    for profile in DEMO_PROFILES {
        let dir = base.join(profile.to_string());
        if dir.exists() {
            bail!(
                "{} already exists. Hint: give --keep an empty directory, or remove it",
                dir.display()
            );
        }
        let summary = sim::generate(&sim::GenerateOptions {
            profile,
            out: dir.clone(),
            vfs: None,
            host_id: 0,
        })?;
        writeln!(out, "== {profile}: {}", profile.description())?;
        writeln!(out, "  generated: {summary}")?;
        let root = HostRoot::new(dir.clone());
        let inv = devfence_app::check::inventory(&root, false)?;
        writeln!(
            out,
            "  inventory: {} PCI functions, {} IOMMU groups, {} mdevs, {} AP queues, {} IB devices, {} problems",
            inv.pci.len(),
            inv.iommu_groups.len(),
            inv.mdevs.len(),
            inv.ap.as_ref().map_or(0, |a| a.queues.len()),
            inv.ib.len(),
            inv.problems.len()
        )?;
        let (findings, _) = check_with_ledger(&root)?;
        total += findings.len();
        for f in &findings {
            writeln!(
                out,
                "  {} [{}] {}: {}",
                f.severity, f.rule, f.subject, f.message
            )?;
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "{total} findings across {} simulated hosts.\n",
        DEMO_PROFILES.len()
    )?;
    demo_fix_group(&base, out)?;
    writeln!(out)?;
    crate::story::run(&base.join("handover"), out)?;
    writeln!(out)?;
    match &a.keep {
        Some(d) => writeln!(
            out,
            "The hosts are kept in {}; try: devfence --root {}/no-acs check",
            d.display(),
            d.display()
        )?,
        None => writeln!(
            out,
            "Keep the hosts with --keep DIR to explore them with inventory and check."
        )?,
    }
    Ok(Exit::Ok)
}

/// The second part of the demo: act on a host through the simulated kernel and
/// read the result back. On `no-acs`, group 13 is not viable because the GPU's audio
/// function stays on snd_hda_intel; binding the group to vfio-pci fixes it.
fn demo_fix_group(base: &Path, out: &mut dyn Write) -> Result<()> {
    let dir = base.join("no-acs-fixed");
    if dir.exists() {
        bail!(
            "{} already exists. Hint: give --keep an empty directory, or remove it",
            dir.display()
        );
    }
    sim::generate(&sim::GenerateOptions {
        profile: sim::Profile::NoAcs,
        out: dir.clone(),
        vfs: None,
        host_id: 0,
    })?;
    let root = HostRoot::new(dir);
    writeln!(
        out,
        "== acting: make iommu_group 13 of no-acs viable (through the simulated kernel)"
    )?;
    let viable = |root: &HostRoot| -> Result<usize> {
        let (f, _) = check_with_ledger(root)?;
        Ok(f.iter().filter(|f| f.rule == "GRP-VIABLE").count())
    };
    writeln!(out, "  before: {} GRP-VIABLE finding(s)", viable(&root)?)?;
    let args = |dry_run| crate::cli::BindArgs {
        device: "0000:05:00.0".into(),
        driver: "vfio-pci".into(),
        with_group: true,
        act: crate::cli::ActFlags {
            dry_run,
            json: false,
            force: false,
        },
    };
    writeln!(
        out,
        "  $ devfence bind 0000:05:00.0 --driver vfio-pci --with-group --dry-run"
    )?;
    indented(out, |o| crate::act::bind(&root, None, &args(true), o))?;
    writeln!(
        out,
        "  $ devfence bind 0000:05:00.0 --driver vfio-pci --with-group"
    )?;
    indented(out, |o| crate::act::bind(&root, None, &args(false), o))?;
    writeln!(
        out,
        "  after: {} GRP-VIABLE finding(s): every member of the group is on vfio-pci, read back from sysfs",
        viable(&root)?
    )?;
    Ok(())
}

/// Runs `f` and writes what it printed to `out`, each line indented by four
/// spaces (a command's output inside the demo's story).
pub fn indented<T>(out: &mut dyn Write, f: impl FnOnce(&mut dyn Write) -> Result<T>) -> Result<T> {
    let mut buf = Vec::new();
    let r = f(&mut buf);
    for line in String::from_utf8_lossy(&buf).lines() {
        writeln!(out, "    {line}")?;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_compact_runs() {
        assert_eq!(ranges([1u8, 2, 3, 7, 9, 10].into_iter()), "01-03,07,09-0a");
        assert_eq!(ranges(std::iter::empty()), "none");
        assert_eq!(ranges([254u8, 255].into_iter()), "fe-ff");
    }
}
