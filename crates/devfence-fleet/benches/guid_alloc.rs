//! GUID allocation through a real 3-member etcd cluster on loopback
//! (docs/benchmarks.md): three allocators (threads, each its own client and
//! runtime, as three hosts would be) allocate concurrently, batched
//! (`MAX_BATCH` per transaction) and then one GUID per transaction; every
//! GUID issued is checked for duplicates, and the pool in etcd is read back.
//!
//! `cargo bench -p devfence-fleet --bench guid_alloc` (needs testbed/etcd/setup.sh).
//! `GUIDS_PER_ALLOCATOR` (default 20000) and `SINGLE_PER_ALLOCATOR` (default 1000)
//! size the two runs.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use devfence_etcd_harness::{EtcdCluster, Options};
use devfence_fleet::value::{GuidRange, Name};
use devfence_fleet::{Fleet, FleetSettings, MAX_BATCH};
use devfence_model::Guid;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fleet(c: &EtcdCluster) -> Fleet {
    let mut s = FleetSettings::plaintext(c.endpoints(), "bench", "ib0").expect("settings");
    s.timeout = Duration::from_secs(10);
    Fleet::connect(s).expect("connects")
}

/// Three allocators, each asking `per` GUIDs `step` at a time; returns the
/// wall time and every GUID issued.
fn run(c: &EtcdCluster, per: usize, step: usize) -> (Duration, Vec<Guid>) {
    let clients: Vec<Fleet> = (0..3).map(|_| fleet(c)).collect();
    for f in &clients {
        f.guid_range().expect("warm");
    }
    let go = std::sync::Barrier::new(3);
    let t = Instant::now();
    let got: Vec<Vec<Guid>> = std::thread::scope(|s| {
        let hs: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let go = &go;
                s.spawn(move || {
                    let host: Name = format!("h{i}").parse().expect("name");
                    go.wait();
                    let mut mine = Vec::with_capacity(per);
                    while mine.len() < per {
                        let n = step.min(per - mine.len());
                        mine.extend(f.allocate_guids(&host, n).expect("allocates"));
                    }
                    mine
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    (t.elapsed(), got.into_iter().flatten().collect())
}

fn check(all: &[Guid]) -> usize {
    let set: BTreeSet<Guid> = all.iter().copied().collect();
    assert_eq!(set.len(), all.len(), "a GUID was issued twice");
    all.len() - set.len()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let per = env("GUIDS_PER_ALLOCATOR", 20_000);
    let single = env("SINGLE_PER_ALLOCATOR", 1_000);
    let c = EtcdCluster::start(&Options::default()).expect("etcd cluster starts");
    let f = fleet(&c);
    f.configure_guid_range(GuidRange {
        first: Guid(0x0002_c903_0000_0000),
        last: Guid(0x0002_c903_00ff_ffff),
    })
    .expect("range");

    let (t, all) = run(&c, per, per);
    let dups = check(&all);
    println!(
        "batched ({MAX_BATCH} per transaction), 3 allocators x {per}: {} GUIDs in {:.2} s = {:.0}/s, {dups} duplicates",
        all.len(),
        t.as_secs_f64(),
        all.len() as f64 / t.as_secs_f64()
    );
    let (t1, one) = run(&c, single, 1);
    let mut both = all.clone();
    both.extend(&one);
    let dups1 = check(&both);
    println!(
        "one GUID per transaction, 3 allocators x {single}: {} GUIDs in {:.2} s = {:.0}/s, {dups1} duplicates",
        one.len(),
        t1.as_secs_f64(),
        one.len() as f64 / t1.as_secs_f64()
    );
    let pool = f.guids().expect("lists the pool");
    assert_eq!(
        pool.len(),
        both.len(),
        "the pool in etcd holds every GUID issued, once"
    );
    println!("pool read back: {} GUIDs, all distinct", pool.len());
}
