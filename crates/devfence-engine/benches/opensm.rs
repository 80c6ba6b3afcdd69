//! The OpenSM benchmark, measured in one run on a real OpenSM (ibsim fabric):
//!
//! - (a) one verified IB VF handover end to end: the engine on the simulated
//!   `lab` host, OpenSM backend, SA verification, VF GUID rotation on the fabric;
//! - (b) 100 VFs handed over in one batch: 100 old GUIDs out of tenant A, 100
//!   fresh GUIDs into tenant B, one partitions apply, one sweep, all 200 questions
//!   verified at the SA;
//! - (c) OpenSM's own SIGHUP → `SUBNET UP` time (no change, a heavy sweep);
//! - (d1) on the lab fabric, OpenSM's own SIGHUP → `SUBNET UP` for (a)'s change
//!   written by hand: one GUID (a lab VF's, not the one (a) hands over) moved
//!   between the two tenants' partitions in the partitions file, before
//!   devfence's SM is created — the reference (a) is measured against
//!   (issue 14 item 2: (a)/(d1) ≤ 2);
//! - (d) on the batch fabric, OpenSM's own SIGHUP → `SUBNET UP` for the same
//!   change as (b) written by hand (the batch's GUIDs moved between the two
//!   partitions in the partitions file), before devfence's SM is created.
//!
//! `cargo bench -p devfence-engine --bench opensm` (needs opensm and ibsim-utils).
//! `DEVFENCE_BENCH_PACE_US=N` sets (a)'s gate polling (first N µs, doubling up
//! to 4N; default 1–5 ms).
//! `DEVFENCE_BENCH_BATCH=N` (default 100) sets the batch and the batch fabric's
//! VF nodes (N + 4); above 128 nodes the fabric is a two-level switch tree.
//! `DEVFENCE_BENCH_BATCH_PACE_MS=N` caps (b)'s polling pause at N ms.
//! `DEVFENCE_BENCH_LEDGER_DIR=DIR` puts the ledger in DIR (default: tmpfs).
//! `DEVFENCE_BENCH_BATCH_SETTLE=1` lets OpenSM sweep once after the VF resets
//! and before each (b) (not timed).
//! `DEVFENCE_BENCH_APPLY_FIRST=1` is an experiment, not the engine's order: each
//! (b) stages and applies the move *before* the VF resets, then resets, then waits
//! for the same verification — so (b) includes the resets in this variant, and
//! what it answers is whether the sweeps the resets cause program the fresh GUIDs
//! without another apply, and how long the whole takes (docs/model-check.md,
//! `OneSweepApplyFirst`).
//! The process re-runs itself under the umad2sim preload, like the tests.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/support/opensm_host.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use devfence_engine::engine::{Engine, EngineConfig};
use devfence_fabric::opensm::OpenSmSm;
use devfence_fabric::{
    Expectation, Pace, PartitionKey, SubnetManager, wait_verified, wait_verified_with,
};
use devfence_fabric_harness::{FABRIC_DIR_ENV, Fabric, FabricSpec};
use devfence_model::{DeviceId, Guid, Membership, TenantId};
use support::{OnFabric, host};

fn batch_size() -> usize {
    std::env::var("DEVFENCE_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

const BATCH_BASE: u64 = 0x0002_c903_00a0_0001;

fn batch_guid(i: usize, round: u64) -> Guid {
    // Port GUIDs two apart (node GUID = port GUID - 1), a fresh range per round.
    Guid(BATCH_BASE + round * 0x1_0000 + 2 * i as u64)
}

fn spec() -> FabricSpec {
    let mut s = support::spec();
    for i in 0..batch_size() {
        s.ports.push((format!("b{i}"), batch_guid(i, 0)));
    }
    s
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let med = v[v.len() / 2];
    let p90 = v[(v.len() * 9 / 10).min(v.len() - 1)];
    (med, p90, v[0])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench --list
    }
    if let Some(dir) = std::env::var_os(FABRIC_DIR_ENV) {
        let f = Fabric::attach(Path::new(&dir)).unwrap();
        let phase = std::env::var("DEVFENCE_BENCH_PHASE").unwrap_or_default();
        let c = sighup_to_subnet_up(&f);
        println!("RESULT c_{phase} {c}");
        if phase == "lab" {
            println!("RESULT d1 {}", one_guid_moved_by_hand(&f));
            println!("RESULT a {}", one_handover(&f));
        } else {
            println!("RESULT d {}", same_change_by_hand(&f));
            println!("RESULT b {}", batch(&f));
        }
        return;
    }
    // Two fabrics in one run: the lab host's own (its 4 VFs: (a) and its (c)), and
    // one with 100 more VF nodes ((b) and its (c): every sweep walks every node).
    let mut results = BTreeMap::new();
    for (phase, spec) in [("lab", support::spec()), ("batch", spec())] {
        let t0 = Instant::now();
        let f = Fabric::start(&spec).unwrap();
        println!(
            "fabric {phase}: ibsim + OpenSM, {} HCA nodes, up in {:.0} ms",
            spec.ports.len() + 1,
            ms(t0.elapsed())
        );
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(std::env::args().skip(1))
            .envs(f.env())
            .env("DEVFENCE_BENCH_PHASE", phase)
            .current_dir(f.dir())
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        drop(f);
        let text = String::from_utf8_lossy(&out.stdout);
        for l in text.lines() {
            match l.strip_prefix("RESULT ") {
                Some(r) => {
                    let (k, v) = r.split_once(' ').unwrap();
                    results.insert(k.to_owned(), v.parse::<f64>().unwrap());
                }
                None => println!("{l}"),
            }
        }
        assert!(out.status.success(), "phase {phase} failed");
    }
    let (a, b) = (results["a"], results["b"]);
    let (cl, cb, d) = (results["c_lab"], results["c_batch"], results["d"]);
    let d1 = results["d1"];
    let nodes = batch_size() + 5;
    println!();
    println!(
        "summary (medians): (a) {a:.1} ms, (b) {b:.1} ms, (c) {cl:.1} ms on the lab fabric, {cb:.1} ms on the {nodes}-node fabric, (d1) {d1:.1} ms, (d) {d:.1} ms"
    );
    println!(
        "ratios: (a)/(d1) = {:.2}, (a)/(c) = {:.1}, (b)/(c) = {:.1}, (b)/(d) = {:.1} (each against its own fabric's sweep)",
        a / d1,
        a / cl,
        b / cb,
        b / d
    );
    println!(
        "load: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}

/// (c): HUP → a new `SUBNET UP` line in the log, polled every 100 µs.
fn sighup_to_subnet_up(f: &Fabric) -> f64 {
    let mut v = Vec::new();
    for _ in 0..20 {
        let n = f.subnet_up_count();
        let t0 = Instant::now();
        f.hup().unwrap();
        while f.subnet_up_count() <= n {
            assert!(t0.elapsed() < Duration::from_secs(10), "no SUBNET UP");
            std::thread::sleep(Duration::from_micros(100));
        }
        v.push(ms(t0.elapsed()));
    }
    let (med, p90, min) = stats(&mut v);
    println!(
        "(c) OpenSM SIGHUP -> SUBNET UP (heavy sweep, no change), 20 runs: median {med:.1} ms, p90 {p90:.1} ms, min {min:.1} ms"
    );
    med
}

/// Writes `text` as the partitions file, HUPs OpenSM and returns the time to the
/// next `SUBNET UP` line (polled every 100 µs).
fn hup_with(f: &Fabric, path: &Path, text: &str) -> f64 {
    std::fs::write(path, text).unwrap();
    let n = f.subnet_up_count();
    let t0 = Instant::now();
    f.hup().unwrap();
    while f.subnet_up_count() <= n {
        assert!(t0.elapsed() < Duration::from_secs(30), "no SUBNET UP");
        std::thread::sleep(Duration::from_micros(100));
    }
    ms(t0.elapsed())
}

/// (d1): the SM's own reconfiguration for (a)'s change: one present port's GUID
/// (lab VF 1; (a) hands over VF 0) moved between acme's and globex's partitions
/// in the partitions file by hand, SIGHUP → `SUBNET UP`; 20 runs. The file is put
/// back as it was (and swept) afterwards.
fn one_guid_moved_by_hand(f: &Fabric) -> f64 {
    let a = PartitionKey::new(0x8001).unwrap();
    let b = PartitionKey::new(0x8002).unwrap();
    let path = f.opensm_config().partitions_file;
    let original = std::fs::read_to_string(&path).unwrap();
    let guid = Guid(support::FACTORY[1]);
    let file = |k: PartitionKey| {
        let mut m = devfence_fabric::MembershipMap::new();
        m.insert(guid, k, Membership::Full).unwrap();
        devfence_fabric::opensm::partitions::render_block(&m)
    };
    let (in_a, in_b) = (file(a), file(b));
    hup_with(f, &path, &in_a);
    let mut v = Vec::new();
    for round in 1..=20 {
        v.push(hup_with(
            f,
            &path,
            if round % 2 == 1 { &in_b } else { &in_a },
        ));
    }
    hup_with(f, &path, &original);
    let (med, p90, min) = stats(&mut v);
    println!(
        "(d1) OpenSM's own reconfiguration for (a)'s change (one GUID moved A <-> B in the partitions file by hand), SIGHUP -> SUBNET UP, 20 runs: median {med:.1} ms, p90 {p90:.1} ms, min {min:.1} ms"
    );
    med
}

/// (a): the engine's IB VF handover, acme <-> globex, 20 rounds.
fn one_handover(f: &Fabric) -> f64 {
    let mut h = host(f);
    let io = OnFabric { k: &h.kernel, f };
    let vf = DeviceId::Pci("0000:3b:00.1".parse().unwrap());
    // Polls every 1-5 ms: an SA read costs ~0.3 ms, a sweep 5-25 ms. A poll reads
    // the SM's status alone until the sweep is seen; DEVFENCE_BENCH_PACE_US=N
    // polls every N µs (doubling up to 4N) instead.
    let pace = match std::env::var("DEVFENCE_BENCH_PACE_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(us) => Pace {
            first: Duration::from_micros(us),
            max: Duration::from_micros(4 * us),
        },
        None => Pace {
            first: Duration::from_millis(1),
            max: Duration::from_millis(5),
        },
    };
    println!("(a) gate pace: first {:?}, max {:?}", pace.first, pace.max);
    let cfg = EngineConfig {
        gate_deadline: Duration::from_secs(10),
        pace,
        ..EngineConfig::default()
    };
    Engine::new(&mut h.store, &io, &h.sm, cfg.clone())
        .assign(&vf, &"acme".parse::<TenantId>().unwrap(), None)
        .unwrap();
    let tenants: [TenantId; 2] = ["globex".parse().unwrap(), "acme".parse().unwrap()];
    let mut total = Vec::new();
    let mut steps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in 0..20 {
        let to = &tenants[round % 2];
        let t0 = Instant::now();
        let done = Engine::new(&mut h.store, &io, &h.sm, cfg.clone())
            .handover(&vf, to, None)
            .unwrap();
        total.push(ms(t0.elapsed()));
        for (s, t) in done.timings {
            steps.entry(s).or_default().push(t as f64);
        }
    }
    let (med, p90, min) = stats(&mut total);
    println!(
        "(a) one verified IB VF handover (engine, OpenSM, SA), 20 runs: median {med:.1} ms, p90 {p90:.1} ms, min {min:.1} ms"
    );
    let mut by: Vec<(String, f64)> = steps
        .into_iter()
        .map(|(s, mut v)| (s, stats(&mut v).0))
        .filter(|(_, m)| *m >= 1.0)
        .collect();
    by.sort_by(|x, y| y.1.total_cmp(&x.1));
    for (s, m) in by {
        println!("      {s:<28} median {m:>6.1} ms");
    }
    med
}

/// (d): the SM's own reconfiguration for (b)'s change: the partitions file with
/// the batch's GUIDs in A, then in B (written by hand), SIGHUP → `SUBNET UP`;
/// 5 runs. The file is put back as it was before (and swept) afterwards.
fn same_change_by_hand(f: &Fabric) -> f64 {
    let a = PartitionKey::new(0x8001).unwrap();
    let b = PartitionKey::new(0x8002).unwrap();
    let path = f.opensm_config().partitions_file;
    let original = std::fs::read_to_string(&path).unwrap();
    let file = |k: PartitionKey| {
        let mut m = devfence_fabric::MembershipMap::new();
        for i in 0..batch_size() {
            m.insert(batch_guid(i, 0), k, Membership::Full).unwrap();
        }
        devfence_fabric::opensm::partitions::render_block(&m)
    };
    let (in_a, in_b) = (file(a), file(b));
    let sweep = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let n = f.subnet_up_count();
        let t0 = Instant::now();
        f.hup().unwrap();
        while f.subnet_up_count() <= n {
            assert!(t0.elapsed() < Duration::from_secs(30), "no SUBNET UP");
            std::thread::sleep(Duration::from_micros(100));
        }
        ms(t0.elapsed())
    };
    sweep(&in_a);
    let mut v = Vec::new();
    for round in 1..=5 {
        v.push(sweep(if round % 2 == 1 { &in_b } else { &in_a }));
    }
    sweep(&original);
    let (med, p90, min) = stats(&mut v);
    let n = batch_size();
    println!(
        "(d) OpenSM's own reconfiguration for the same change ({n} GUIDs moved A <-> B in the partitions file by hand), SIGHUP -> SUBNET UP, 5 runs: median {med:.1} ms, p90 {p90:.1} ms, min {min:.1} ms"
    );
    med
}

/// (b)'s polling: `DEVFENCE_BENCH_BATCH_PACE_MS=N` caps the pause between polls
/// at N ms (first 1 ms, doubling); the default is the engine's (`Pace::default`).
fn batch_pace() -> Pace {
    match std::env::var("DEVFENCE_BENCH_BATCH_PACE_MS") {
        Ok(v) => Pace {
            first: Duration::from_millis(1),
            max: Duration::from_millis(v.parse().unwrap()),
        },
        Err(_) => Pace::default(),
    }
}

/// (b): the batch's VFs from A to B in one apply and one sweep, verified at the SA.
fn batch(f: &Fabric) -> f64 {
    let n = batch_size();
    let sm = OpenSmSm::new(f.opensm_config());
    let a = PartitionKey::new(0x8001).unwrap();
    let b = PartitionKey::new(0x8002).unwrap();
    // Setup: the 100 VFs are tenant A's (one apply), verified.
    for i in 0..n {
        sm.stage_add(batch_guid(i, 0), a, Membership::Full).unwrap();
    }
    let t = sm.apply().unwrap();
    let mut exp = Expectation::after(t);
    for i in 0..n {
        exp = exp.grant(batch_guid(i, 0), [(a, Membership::Full)]);
    }
    wait_verified(&sm, &exp, Instant::now() + Duration::from_secs(30)).unwrap();
    let mut v = Vec::new();
    let mut resets = Vec::new();
    let (mut applies, mut passes) = (Vec::new(), Vec::new());
    let apply_first = std::env::var_os("DEVFENCE_BENCH_APPLY_FIRST").is_some();
    for round in 1..=5u64 {
        let (from, to) = if round % 2 == 1 { (a, b) } else { (b, a) };
        let stage_and_apply = || {
            for i in 0..n {
                sm.stage_remove_all(batch_guid(i, round - 1)).unwrap();
                sm.stage_add(batch_guid(i, round), to, Membership::Full)
                    .unwrap();
            }
            let t = sm.apply().unwrap();
            let mut exp = Expectation::after(t);
            for i in 0..n {
                exp = exp
                    .revoke(batch_guid(i, round - 1), [from])
                    .grant(batch_guid(i, round), [(to, Membership::Full)]);
            }
            exp
        };
        if apply_first {
            // The experiment: the move applied first, then the resets, then the
            // same verification; timed as one.
            let t0 = Instant::now();
            let exp = stage_and_apply();
            applies.push(ms(t0.elapsed()));
            let t1 = Instant::now();
            for i in 0..n {
                f.rotate(&format!("b{i}"), batch_guid(i, round)).unwrap();
            }
            resets.push(ms(t1.elapsed()));
            let deadline = Instant::now() + Duration::from_secs(30);
            if let Err(e) = wait_verified_with(&sm, &exp, deadline, batch_pace(), &mut |_| {}) {
                println!("(b) apply first: not verified within 30 s after the resets: {e}");
                std::process::exit(1);
            }
            v.push(ms(t0.elapsed()));
            continue;
        }
        // The VF resets (each VF comes back with a fresh GUID) happen on the hosts.
        let t0 = Instant::now();
        for i in 0..n {
            f.rotate(&format!("b{i}"), batch_guid(i, round)).unwrap();
        }
        resets.push(ms(t0.elapsed()));
        if std::env::var_os("DEVFENCE_BENCH_BATCH_SETTLE").is_some() {
            // A variant, not the default: one heavy sweep (SIGHUP, no change) after
            // the resets and before (b), so that (b) starts on a settled SM.
            let n = f.subnet_up_count();
            f.hup().unwrap();
            while f.subnet_up_count() <= n {
                assert!(t0.elapsed() < Duration::from_secs(30), "no SUBNET UP");
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        // devfence's part: one apply for all, then all questions at the SA.
        let t0 = Instant::now();
        let exp = stage_and_apply();
        applies.push(ms(t0.elapsed()));
        let deadline = Instant::now() + Duration::from_secs(30);
        wait_verified_with(&sm, &exp, deadline, batch_pace(), &mut |_| {}).unwrap();
        v.push(ms(t0.elapsed()));
        // Not in (b): one more SA pass over the same ports, the sweep done — what
        // the pass after the sweep costs alone.
        let guids: Vec<Guid> = (0..n)
            .flat_map(|i| [batch_guid(i, round - 1), batch_guid(i, round)])
            .collect();
        let t0 = Instant::now();
        sm.observe(&guids).unwrap();
        passes.push(ms(t0.elapsed()));
    }
    let (med, p90, min) = stats(&mut v);
    let (rmed, _, _) = stats(&mut resets);
    let (amed, _, _) = stats(&mut applies);
    if apply_first {
        println!(
            "(b) EXPERIMENT apply first: {n} VFs, the move applied, then the {n} VF resets, then verified (resets included), 5 runs: median {med:.1} ms, p90 {p90:.1} ms, min {min:.1} ms"
        );
        println!("      of it: stage + apply median {amed:.1} ms; the resets median {rmed:.0} ms");
        return med;
    }
    let (pmed, _, _) = stats(&mut passes);
    println!(
        "(b) {n} VFs handed over in one batch (one apply, one sweep, {} questions at the SA), 5 runs: median {med:.1} ms, p90 {p90:.1} ms, min {min:.1} ms",
        2 * n
    );
    println!(
        "      (not in (b): the {n} VF resets on ibsim before it, 3 console commands each: median {rmed:.0} ms)"
    );
    println!(
        "      of (b): stage + apply (file written, SIGHUP) median {amed:.1} ms; one SA pass over the {} ports alone (after (b), sweep done) median {pmed:.1} ms",
        2 * n
    );
    med
}
