//! Handover benchmark on the embedded default: the `lab` simulated host, its
//! simulated kernel, a simulated SM and a SQLite ledger on tmpfs.
//!
//! `cargo bench -p devfence-engine --bench handover` prints handovers per second
//! (IB VF back and forth between two tenants) and the latency of one handover
//! broken down by step, for an SM that sweeps at once (the engine's own cost) and
//! for an OpenSM-like SM (sweep 10 ms after the request, 5 ms long). Then the
//! cost of the libvirt hook's `prepare begin` (`Engine::start_domain`): the
//! re-verification at the moment of use and the whole admission, for an IB VF
//! and a plain VF. `DEVFENCE_BENCH_ONLY=hook` runs that part alone.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devfence_engine::engine::{Engine, EngineConfig};
use devfence_engine::libvirt::{DomainSpec, Unidentified};
use devfence_engine::store::{Partition, Tenant};
use devfence_engine::{GuidRange, SqliteStore, StoreExt};
use devfence_fabric::{SimConfig, SimSm};
use devfence_host::HostRoot;
use devfence_host::sim::{GenerateOptions, Profile, generate};
use devfence_host::simkernel::SimKernel;
use devfence_model::{DeviceId, Guid, Membership, PKey, TenantId};

fn tenant(id: &str, uid: u32, pkey: u16) -> Tenant {
    Tenant {
        id: id.parse().unwrap(),
        launcher_uid: Some(uid),
        launcher_gid: Some(uid),
        security_label: None,
        partitions: vec![Partition {
            pkey: PKey(pkey),
            membership: Membership::Full,
        }],
    }
}

/// A lab host, its kernel, an SM sweeping at once and a ledger with acme and
/// globex, in `dir`.
fn setup(dir: &std::path::Path, cfg: SimConfig) -> (SimKernel, Arc<SimSm>, SqliteStore) {
    let host = dir.join("host");
    generate(&GenerateOptions {
        profile: Profile::Lab,
        out: host.clone(),
        vfs: None,
        host_id: 0,
    })
    .unwrap();
    let kernel = SimKernel::new(HostRoot::new(host)).unwrap();
    let sm = Arc::new(SimSm::real_time(cfg));
    let s2 = Arc::clone(&sm);
    kernel.set_port_table_source(Arc::new(move |g: Guid| {
        s2.programmed()
            .get(&g)
            .map(|k| k.iter().map(|p| p.0).collect())
    }));
    let mut store = SqliteStore::open(dir.join("ledger.db")).unwrap();
    store
        .atomically(|tx| {
            tx.add_tenant(&tenant("acme", 107, 0x8001))?;
            tx.add_tenant(&tenant("globex", 108, 0x8002))?;
            tx.set_guid_pool(GuidRange {
                first: Guid(0x0002_c903_00f0_0000),
                last: Guid(0x0002_c903_00ff_ffff),
            })
        })
        .unwrap();
    (kernel, sm, store)
}

/// The hook's `prepare begin` for one device: re-verification alone, and the
/// whole `start_domain` (ledger read, decision, re-verification, one
/// transaction to Active). Each round assigns the device first and stops the
/// VM after (not timed).
fn hook(rounds: usize) {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    println!("## libvirt hook prepare begin: {rounds} VM starts per device kind");
    println!(
        "| device | re-verification, median (min–max) µs | whole prepare begin, median (min–max) µs |"
    );
    println!("|---|---|---|");
    for (label, dev) in [
        ("IB VF (mlx5)", "0000:3b:00.1"),
        ("VF (igb)", "0000:5e:10.0"),
    ] {
        let dir = tempfile::Builder::new()
            .prefix("devfence-bench-")
            .tempdir_in(base)
            .unwrap();
        let zero = SimConfig {
            lag: Duration::ZERO,
            sweep_time: Duration::ZERO,
            ..SimConfig::default()
        };
        let (kernel, sm, mut store) = setup(dir.path(), zero);
        let ecfg = EngineConfig::default();
        let d: DeviceId = dev.parse().unwrap();
        let acme: TenantId = "acme".parse().unwrap();
        let spec = DomainSpec {
            name: "web1".into(),
            uuid: None,
            tenant: Some(acme.clone()),
            hostdevs: vec![d],
            unsupported: vec![],
        };
        let (mut verify, mut whole) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            Engine::new(&mut store, &kernel, &*sm, ecfg.clone())
                .assign(&d, &acme, None)
                .unwrap();
            let s = Instant::now();
            let started = Engine::new(&mut store, &kernel, &*sm, ecfg.clone())
                .start_domain(&spec, Unidentified::Refuse)
                .unwrap();
            whole.push(u64::try_from(s.elapsed().as_micros()).unwrap());
            verify.push(started.verify_us);
            Engine::new(&mut store, &kernel, &*sm, ecfg.clone())
                .vm_stopped(&d)
                .unwrap();
        }
        verify.sort_unstable();
        whole.sort_unstable();
        let f = |v: &[u64]| format!("{} ({}–{})", v[v.len() / 2], v[0], v[v.len() - 1]);
        println!("| {label} | {} | {} |", f(&verify), f(&whole));
    }
    println!();
}

fn run(label: &str, cfg: SimConfig, rounds: usize) {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let dir = tempfile::Builder::new()
        .prefix("devfence-bench-")
        .tempdir_in(base)
        .unwrap();
    let (kernel, sm, mut store) = setup(dir.path(), cfg);
    let ecfg = EngineConfig {
        gate_deadline: Duration::from_secs(10),
        ..EngineConfig::default()
    };
    let vf: DeviceId = "0000:3b:00.1".parse().unwrap();
    let (a, b): (TenantId, TenantId) = ("acme".parse().unwrap(), "globex".parse().unwrap());
    Engine::new(&mut store, &kernel, &*sm, ecfg.clone())
        .assign(&vf, &a, None)
        .unwrap();
    let mut per_step: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut totals = Vec::with_capacity(rounds);
    let t0 = Instant::now();
    for i in 0..rounds {
        let to = if i % 2 == 0 { &b } else { &a };
        let s = Instant::now();
        let done = Engine::new(&mut store, &kernel, &*sm, ecfg.clone())
            .handover(&vf, to, None)
            .unwrap();
        totals.push(s.elapsed());
        for (name, ms) in done.timings {
            per_step.entry(name).or_default().push(ms);
        }
    }
    let wall = t0.elapsed();
    totals.sort();
    let med = totals[totals.len() / 2];
    println!("## {label}: {rounds} IB VF handovers");
    println!(
        "handovers/s: {:.1}; one handover: median {:.1} ms, min {:.1} ms, max {:.1} ms",
        rounds as f64 / wall.as_secs_f64(),
        med.as_secs_f64() * 1e3,
        totals[0].as_secs_f64() * 1e3,
        totals[totals.len() - 1].as_secs_f64() * 1e3
    );
    println!("| step | median ms | max ms |\n|---|---|---|");
    let mut rows: Vec<(String, u64, u64)> = per_step
        .into_iter()
        .map(|(n, mut v)| {
            v.sort_unstable();
            (n, v[v.len() / 2], v[v.len() - 1])
        })
        .collect();
    rows.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    for (n, m, x) in rows {
        println!("| {n} | {m} | {x} |");
    }
    println!();
}

fn main() {
    let rounds = std::env::var("DEVFENCE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    if std::env::var("DEVFENCE_BENCH_ONLY").as_deref() == Ok("hook") {
        hook(rounds);
        return;
    }
    run(
        "SM sweeping at once (engine cost)",
        SimConfig {
            lag: Duration::ZERO,
            sweep_time: Duration::ZERO,
            ..SimConfig::default()
        },
        rounds,
    );
    run(
        "OpenSM-like SM (lag 10 ms, sweep 5 ms)",
        SimConfig::default(),
        rounds,
    );
    hook(rounds);
}
