//! The handover story of `devfence demo`: the whole lifecycle on a simulated host
//! (the `lab` profile), the simulated kernel and a simulated SM, through the same
//! engine and ledger the commands use.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use devfence_engine::engine::{Crash, CrashMode, EngineConfig, Failpoints};
use devfence_engine::store::OperationId;
use devfence_engine::store::{Partition, Tenant};
use devfence_engine::{DeviceState, StoreExt};
use devfence_fabric::PersistentSimSm;
use devfence_host::{HostRoot, sim};
use devfence_model::{DeviceId, Membership, PKey, TenantId};

use devfence_app::hook::{Call, Decision};

use crate::ledger::{Env, Printer, SIM_SM_PATH};

fn tid(s: &str) -> Result<TenantId> {
    s.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

fn dev(s: &str) -> Result<DeviceId> {
    s.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

fn tenant(id: &str, uid: u32, pkey: u16) -> Result<Tenant> {
    Ok(Tenant {
        id: tid(id)?,
        launcher_uid: Some(uid),
        launcher_gid: Some(uid),
        security_label: None,
        partitions: vec![Partition {
            pkey: PKey(pkey),
            membership: Membership::Full,
        }],
    })
}

/// A domain that names its tenant in devfence's metadata (docs/libvirt-hook.md).
fn domain_xml(name: &str, tenant: &str, bdf: (u8, u8, u8)) -> String {
    format!(
        "<domain type='kvm'><name>{name}</name><metadata><devfence:tenant \
         xmlns:devfence='https://devfence.dev/xmlns/libvirt/1' id='{tenant}'/></metadata>\
         <devices><hostdev mode='subsystem' type='pci' managed='yes'>\
         <source><address domain='0x0000' bus='{:#04x}' slot='{:#04x}' function='{:#x}'/></source>\
         </hostdev></devices></domain>",
        bdf.0, bdf.1, bdf.2
    )
}

/// Calls the qemu hook's use case as libvirt's call would, for globex's domain
/// `name` using VF 0000:3b:00.1 (the caller closes its ledger first: the hook
/// is another process); what it decided, in words.
fn call_hook(root: &HostRoot, name: &str, call: Call) -> Result<String> {
    let xml = domain_xml(name, "globex", (0x3b, 0, 1));
    let (d, _) = devfence_app::hook::run(root, None, None, name, call, xml.into_bytes())?;
    Ok(match d {
        Decision::Allowed => "allowed".to_owned(),
        Decision::Refused(r) => format!("refused: {r}"),
        Decision::TeardownFailed(f) => format!("teardown failed: {}", f.join("; ")),
    })
}

fn cfg(timeout: Duration) -> EngineConfig {
    EngineConfig {
        gate_deadline: timeout,
        ..EngineConfig::default()
    }
}

fn state(env: &mut Env, d: &DeviceId) -> Result<String> {
    Ok(env
        .store
        .atomically(|tx| tx.device(d))?
        .map_or_else(|| "not in the ledger".to_owned(), |r| r.state.to_string()))
}

/// Runs the story in `dir` (absent or empty).
pub fn run(dir: &Path, out: &mut dyn Write) -> Result<()> {
    if dir.exists() {
        bail!(
            "{} already exists. Hint: give --keep an empty directory, or remove it",
            dir.display()
        );
    }
    sim::generate(&sim::GenerateOptions {
        profile: sim::Profile::Lab,
        out: dir.to_path_buf(),
        vfs: None,
        host_id: 0,
    })?;
    let root = HostRoot::new(dir.to_path_buf());
    writeln!(
        out,
        "== the handover story: a simulated host (lab), its simulated kernel and a simulated SM\n\
         Every gate below reads state back — from the kernel (sysfs) and from the SM — and only\n\
         then lets a VM start. Nothing waits a fixed time. An IB gate asks the SM three questions:\n\
         \x20 Q1  is the old GUID gone from every partition of the old tenant?\n\
         \x20 Q2  is the new GUID in exactly the new tenant's partitions?\n\
         \x20 Q3  has the SM finished a clean sweep since the change?\n\
         A gate that waits says which question is not answered yet.\n"
    )?;
    let mut env = crate::ledger::open_env_or_create(&root, None)?;
    let acme = tid("acme")?;
    let globex = tid("globex")?;
    writeln!(out, "-- 1. tenants: acme (P_Key 0x8001), globex (0x8002)")?;
    {
        let mut e = env.engine(cfg(Duration::from_secs(5)));
        e.add_tenant(&tenant("acme", 107, 0x8001)?)?;
        e.add_tenant(&tenant("globex", 108, 0x8002)?)?;
    }
    let vf1 = dev("0000:3b:00.1")?;
    let vf2 = dev("0000:3b:00.2")?;
    let vf3 = dev("0000:3b:00.3")?;

    let step = |env: &mut Env,
                out: &mut dyn Write,
                title: &str,
                timeout: Duration,
                f: &mut dyn FnMut(
        &mut devfence_engine::engine::Engine<'_>,
    ) -> Result<
        devfence_engine::engine::Done,
        devfence_engine::engine::EngineError,
    >|
     -> Result<bool> {
        writeln!(out, "\n-- {title}")?;
        let mut sink = Vec::new();
        let res = {
            let mut p = Printer::new(&mut sink, false);
            let mut e = env.engine(cfg(timeout)).with_progress(|x| p.event(x));
            f(&mut e)
        };
        out.write_all(&sink)?;
        match res {
            Ok(d) => {
                writeln!(out, "  => {} is {}", d.device, d.state)?;
                Ok(true)
            }
            Err(e) => {
                writeln!(out, "  => refused/failed, as it must: {e}")?;
                Ok(false)
            }
        }
    };

    step(
        &mut env,
        out,
        "2. assign IB VF 0000:3b:00.1 to acme: scrub, fresh GUID, SM and port verified",
        Duration::from_secs(5),
        &mut |e| e.assign(&vf1, &acme, None),
    )?;
    step(
        &mut env,
        out,
        "3. hand 0000:3b:00.1 over to globex: acme's GUID revoked and verified gone, a new GUID in 0x8002 only",
        Duration::from_secs(5),
        &mut |e| e.handover(&vf1, &globex, Some("db1")),
    )?;

    writeln!(
        out,
        "\n-- 4. libvirt starts domains (the qemu hook reads their XML)"
    )?;
    for name in ["intruder", "db1"] {
        drop(env);
        let r = call_hook(&root, name, Call::PrepareBegin)?;
        env = crate::ledger::open_env(&root, None)?;
        writeln!(
            out,
            "  hook qemu {name} prepare begin: {r}\n    0000:3b:00.1 is {}",
            state(&mut env, &vf1)?
        )?;
    }
    step(
        &mut env,
        out,
        "5. a handover while db1 runs is refused",
        Duration::from_secs(5),
        &mut |e| e.handover(&vf1, &acme, None),
    )?;
    {
        drop(env);
        let r = call_hook(&root, "db1", Call::ReleaseEnd)?;
        env = crate::ledger::open_env(&root, None)?;
        // The hook's own operation, numbered like the others.
        let mut last = 0;
        while env
            .store
            .atomically(|tx| tx.operation(OperationId(last + 1)))?
            .is_some()
        {
            last += 1;
        }
        writeln!(
            out,
            "\n-- 6. db1 stops: hook qemu db1 release end: {r}\n  op-{last} (run by the hook): release 0000:3b:00.1 — drained, scrubbed, verified\n  => 0000:3b:00.1 is {}",
            state(&mut env, &vf1)?
        )?;
    }

    step(
        &mut env,
        out,
        "7. assign 0000:3b:00.2 to globex",
        Duration::from_secs(5),
        &mut |e| e.assign(&vf2, &globex, None),
    )?;
    let sm_path = root.path(SIM_SM_PATH);
    let sm = PersistentSimSm::open(&sm_path, devfence_fabric::SimConfig::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    sm.with(|s| s.set_lag(Duration::from_secs(3600)))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    step(
        &mut env,
        out,
        "8. the SM lags (next sweep in an hour): handing 0000:3b:00.2 to acme fails closed at the gate (deadline 300 ms)",
        Duration::from_millis(300),
        &mut |e| e.handover(&vf2, &acme, None),
    )?;
    sm.with(|s| {
        s.set_lag(Duration::from_millis(10));
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    step(
        &mut env,
        out,
        "9. the SM is back: release re-scrubs the quarantined VF and verifies it",
        Duration::from_secs(5),
        &mut |e| e.release(&vf2),
    )?;

    step(
        &mut env,
        out,
        "10. assign 0000:3b:00.3 to acme",
        Duration::from_secs(5),
        &mut |e| e.assign(&vf3, &acme, None),
    )?;
    writeln!(
        out,
        "\n-- 11. devfence crashes while handing 0000:3b:00.3 to globex (failpoint handover:guid-set:acted: the new GUID is on the VF, the journal does not know)"
    )?;
    let crashed =
        {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut e = env.engine(cfg(Duration::from_secs(5))).with_failpoints(
                        Failpoints::crash_at("handover:guid-set:acted", CrashMode::Panic),
                    );
                    e.handover(&vf3, &globex, None)
                }));
            std::panic::set_hook(prev);
            matches!(r, Err(p) if p.downcast_ref::<Crash>().is_some())
        };
    if !crashed {
        bail!("the demo's failpoint did not fire. Hint: this is a bug in devfence");
    }
    drop(env);
    let mut env =
        crate::ledger::open_env(&root, None).context("Cannot reopen the ledger after the crash")?;
    let open = env.store.atomically(|tx| tx.open_operations())?;
    writeln!(
        out,
        "  after the crash: 0000:3b:00.3 is {}; {} unfinished operation(s)",
        state(&mut env, &vf3)?,
        open.len()
    )?;
    writeln!(out, "\n-- 12. devfence recover")?;
    let mut sink = Vec::new();
    let rec = {
        let mut p = Printer::new(&mut sink, false);
        let mut e = env
            .engine(cfg(Duration::from_secs(5)))
            .with_progress(|x| p.event(x));
        e.recover()?
    };
    out.write_all(&sink)?;
    for r in &rec {
        writeln!(
            out,
            "  => recovered {} ({}) on {}: now {}",
            r.op, r.kind, r.device, r.state
        )?;
    }
    let st = env.store.atomically(|tx| tx.device(&vf3))?.map(|r| r.state);
    if st != Some(DeviceState::Free) {
        bail!("recovery did not leave 0000:3b:00.3 Free ({st:?}). Hint: this is a bug");
    }

    writeln!(
        out,
        "\n-- 13. the ledger, the isolation check and the audit chain"
    )?;
    let devices = env.store.atomically(|tx| tx.devices())?;
    for d in &devices {
        writeln!(out, "  {} {}", d.device, d.state)?;
    }
    let (findings, _) = crate::commands::check_with_ledger(&root)?;
    writeln!(
        out,
        "  check (tenancy from the ledger): {} finding(s)",
        findings.len()
    )?;
    let rep = devfence_engine::StoreExt::verify(&mut env.store)?;
    writeln!(
        out,
        "  audit verify: chain intact, {} records (every step, gate with its evidence, refusal and recovery)",
        rep.records
    )?;
    drop(env);
    agent_act(&root, out)
}

/// The last act: the host agent (`devfence serve`) on this host's socket,
/// two operations over its API, a change behind devfence's back caught by the
/// agent's own re-verification, and the metric that shows it.
fn agent_act(root: &HostRoot, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "\n-- 14. the host agent: devfence serve on this host's socket (re-verifying every second)"
    )?;
    let cfg = root.path(devfence_app::config::CONFIG_PATH);
    if let Some(dir) = cfg.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    std::fs::write(&cfg, "[agent]\nverify_interval = 1\n")
        .with_context(|| format!("Cannot write {}", cfg.display()))?;
    let socket = root.path(devfence_agent::DEFAULT_SOCKET);
    let agent = devfence_agent::spawn(devfence_agent::Options {
        root: root.clone(),
        ledger: None,
        config: None,
        socket: Some(socket.clone()),
        limits: devfence_agent::Limits::default(),
        log_level: None,
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let res = agent_calls(root, &socket, out);
    let stopped = agent.stop().map_err(|e| anyhow::anyhow!("{e}"));
    res.and(stopped)
}

fn agent_calls(root: &HostRoot, socket: &Path, out: &mut dyn Write) -> Result<()> {
    use devfence_app::lifecycle::Request;
    use devfence_fabric::SubnetManager;
    let client = devfence_agent::client::Client::new(socket.to_path_buf())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let vf2 = dev("0000:3b:00.2")?;
    for (what, req) in [
        (
            "assign 0000:3b:00.2 to acme",
            Request::Assign {
                device: vf2,
                tenant: tid("acme")?,
                vm: None,
            },
        ),
        (
            "hand 0000:3b:00.2 over to globex",
            Request::Handover {
                device: vf2,
                to: tid("globex")?,
                vm: None,
            },
        ),
    ] {
        let done = client
            .run_operation(&req, &mut |_| {})
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        writeln!(
            out,
            "  POST /v1/operations: {what} (every gate as before, run by the agent) => {}",
            done.state
        )?;
    }
    // Behind devfence's back: the VF's port leaves globex's partition at the SM.
    let sm = PersistentSimSm::open(
        &root.path(SIM_SM_PATH),
        devfence_fabric::SimConfig::default(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let guids = sm
        .with(|s| {
            s.configured()
                .iter()
                .filter(|(_, k, _)| k.base() == 0x0002)
                .map(|(g, _, _)| g)
                .collect::<Vec<_>>()
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    sm.with(
        |s| -> std::result::Result<(), devfence_fabric::FabricError> {
            for g in &guids {
                s.stage_remove_all(*g)?;
            }
            s.apply()?;
            s.settle();
            Ok(())
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    writeln!(
        out,
        "  behind devfence's back, an operator's edit at the SM takes the VF's port out of globex's partition"
    )?;
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let finding = loop {
        let v: serde_json::Value = client
            .call("GET", "/v1/findings", None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(f) = v["findings"].as_array().and_then(|a| a.first()) {
            break f.clone();
        }
        if std::time::Instant::now() > until {
            bail!("the demo agent found no drift within 20 s. Hint: this is a bug in devfence");
        }
        // Bounded polling of the agent's answer; its own interval is 1 s.
        std::thread::sleep(Duration::from_millis(50));
    };
    writeln!(
        out,
        "  GET /v1/findings: {} ({}) {}: {}",
        finding["device"].as_str().unwrap_or("?"),
        finding["tenant"].as_str().unwrap_or("?"),
        finding["action"].as_str().unwrap_or("?"),
        finding["what"].as_str().unwrap_or("?")
    )?;
    let (_, metrics) = client
        .request("GET", "/metrics", "text/plain", Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let metrics = String::from_utf8_lossy(&metrics);
    for name in ["devfence_drift_findings ", "devfence_quarantines_total "] {
        if let Some(l) = metrics.lines().find(|l| l.starts_with(name)) {
            writeln!(out, "  GET /metrics: {l}")?;
        }
    }
    Ok(())
}
