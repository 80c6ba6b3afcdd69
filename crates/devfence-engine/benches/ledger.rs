//! The ledger at scale (issue 14 item 4): 10,000 devices and 1,000,000 audit
//! records, and what the CLI's ledger commands cost on it.
//!
//! `cargo bench -p devfence-engine --bench ledger`
//!
//! The ledger is generated once per run through the Store API (big transactions,
//! every record appended by the same `Tx::audit` the engine uses), in a temporary
//! directory (`/dev/shm` unless `TMPDIR` says otherwise). Each figure then opens
//! the ledger the way one CLI invocation does (`SqliteStore::open_existing`) and
//! calls what the command calls:
//!
//! - `status`: `devices()`, `open_operations()`, `guid_pool()` in one transaction;
//! - `check` (ledger side): `engine::tenancy_from_ledger`;
//! - `audit verify`: `SqliteStore::verify_with_head` (the chain and its head);
//! - `audit show --device`: `audit_show` with a device filter;
//! - `audit prune --keep`: on a copy, at the end (the records, the finished
//!   operations with their journals, the expired envelope nonces), then VACUUM.
//!
//! References measured in the same run, beside devfence: a bare scan of the same
//! audit columns through rusqlite (no hashing) and SHA-256 over the same bytes in
//! one tight loop; their sum is the floor of a verification.
//!
//! Knobs: `DEVFENCE_BENCH_RECORDS` (default 1,000,000), `DEVFENCE_BENCH_DEVICES`
//! (default 10,000), `DEVFENCE_BENCH_LEDGER=PATH` (reuse or keep a generated
//! ledger there instead of a temporary one), `DEVFENCE_BENCH_ONLY=verify`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devfence_engine::audit::{AuditEvent, AuditFilter, AuditKind};
use devfence_engine::{
    DeviceState, OpOutcome, SqliteStore, StateNonce, StepState, Store, StoreExt,
};
use devfence_model::{DeviceId, Membership, PKey, Partition, Tenant, TenantId};
use sha2::{Digest, Sha256};

const TENANTS: usize = 64;
const BATCH: usize = 50_000;
/// One finished operation per this many audit records (a verified IB VF
/// handover writes about 36).
const RECORDS_PER_OPERATION: usize = 36;
/// Journal rows per operation (an IB VF handover journals about 30).
const JOURNAL_ROWS: usize = 30;
/// Admitted device-state envelopes' nonces.
const NONCES: usize = 10_000;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(d)
}

fn device(i: usize) -> DeviceId {
    format!("0000:{:02x}:{:02x}.{}", i / 256, (i / 8) % 32, i % 8)
        .parse()
        .unwrap()
}

fn tenant_id(i: usize) -> TenantId {
    format!("tenant{i:02}").parse().unwrap()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0])
}

/// This process's user + system CPU time (ms), from /proc/self/stat.
fn cpu_ms() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() * 10.0 // USER_HZ = 100
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn build(path: &Path, devices: usize, records: usize) {
    let t0 = Instant::now();
    let mut store = SqliteStore::create(path).unwrap();
    store
        .atomically(|tx| {
            for t in 0..TENANTS {
                tx.add_tenant(&Tenant {
                    id: tenant_id(t),
                    launcher_uid: Some(1000 + t as u32),
                    launcher_gid: Some(1000 + t as u32),
                    security_label: None,
                    partitions: vec![Partition {
                        pkey: PKey(0x8000 + t as u16 + 1),
                        membership: Membership::Full,
                    }],
                })?;
            }
            for i in 0..devices {
                let d = device(i);
                tx.add_device(&d)?;
                if i % 2 == 0 {
                    let tenant = tenant_id(i % TENANTS);
                    let prep = DeviceState::Preparing {
                        tenant: tenant.clone(),
                        vm: None,
                    };
                    tx.set_device_state(&d, &DeviceState::Free, &prep)?;
                    let ready = DeviceState::Ready {
                        tenant: tenant.clone(),
                        vm: None,
                    };
                    tx.set_device_state(&d, &prep, &ready)?;
                    tx.set_device_state(
                        &d,
                        &ready,
                        &DeviceState::Active {
                            tenant,
                            vm: format!("vm{i}"),
                        },
                    )?;
                }
            }
            Ok(())
        })
        .unwrap();
    let ids: Vec<DeviceId> = (0..devices).map(device).collect();
    let mut done = 0;
    let mut ops = 0usize;
    while done < records {
        let n = BATCH.min(records - done);
        store
            .atomically(|tx| {
                // The operations these records tell of: one per
                // RECORDS_PER_OPERATION records, each with its journal,
                // finished (as a handover leaves them).
                for o in 0..n / RECORDS_PER_OPERATION {
                    let d = ids[(ops + o) % devices];
                    let op = tx.begin_operation(&d, "handover")?;
                    for j in 0..JOURNAL_ROWS {
                        tx.journal_step(
                            op,
                            ["scrub", "guid-set", "bind-vfio", "gate:sm-verified"][j % 4],
                            if j % 2 == 0 {
                                StepState::Planned
                            } else {
                                StepState::Done
                            },
                            &serde_json::json!({ "step": j, "device": d.to_string() }),
                        )?;
                    }
                    tx.finish_operation(op, OpOutcome::Succeeded)?;
                }
                for k in done..done + n {
                    let i = k % devices;
                    let gate = ["group-rules", "sm-verified", "port-pkeys", "node-owner"][k % 4];
                    tx.audit(&AuditEvent {
                        kind: if k % 3 == 0 {
                            AuditKind::Step
                        } else {
                            AuditKind::Gate
                        },
                        device: Some(ids[i]),
                        tenant: Some(tenant_id(i % TENANTS)),
                        detail: serde_json::json!({
                            "op": k / 8,
                            "gate": gate,
                            "passed": true,
                            "evidence": [{
                                "path": format!("/sys/bus/pci/devices/{}/driver", ids[i]),
                                "value": "vfio-pci",
                            }],
                        }),
                    })?;
                }
                Ok(())
            })
            .unwrap();
        ops += n / RECORDS_PER_OPERATION;
        done += n;
    }
    // Admitted device-state envelopes: half of them expired.
    let now = devfence_engine::store::now_ms();
    store
        .atomically(|tx| {
            for i in 0..NONCES {
                tx.record_state_nonce(&StateNonce {
                    nonce: format!("{i:032x}"),
                    envelope: format!("{:032x}", i + 1),
                    device: ids[i % devices],
                    tenant: tenant_id(i % TENANTS),
                    vm: format!("vm{i}"),
                    signer: "fedcba9876543210fedcba9876543210".into(),
                    admitted_at_ms: now - 7_200_000,
                    expires_at_ms: if i % 2 == 0 {
                        now - 3_600_000
                    } else {
                        now + 3_600_000
                    },
                })?;
            }
            Ok(())
        })
        .unwrap();
    drop(store); // writes the head beside the ledger
    println!(
        "built the ledger: {devices} devices, {records} audit records, {ops} finished operations \
         with {} journal rows, {NONCES} envelope nonces (half expired) in {:.1} s (load {})",
        ops * JOURNAL_ROWS,
        t0.elapsed().as_secs_f64(),
        uptime()
    );
}

fn size(path: &Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", path.display())).ok())
        .map(|m| m.len())
        .sum()
}

fn time<T>(rounds: usize, mut f: impl FnMut() -> T) -> (f64, f64, T) {
    let mut v = Vec::new();
    let mut last = None;
    for _ in 0..rounds {
        let t0 = Instant::now();
        last = Some(f());
        v.push(ms(t0.elapsed()));
    }
    let (med, min) = median(v);
    (med, min, last.unwrap())
}

/// The reference: the same columns scanned bare, then SHA-256 over the same bytes.
fn reference(path: &Path) -> (f64, f64, u64) {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut bytes: Vec<u8> = Vec::new();
    let (scan, _, n) = time(3, || {
        bytes.clear();
        let mut stmt = conn
            .prepare("SELECT seq, at_ms, kind, device, tenant, detail, prev_hash, hash FROM audit ORDER BY id")
            .unwrap();
        let mut rows = stmt.query([]).unwrap();
        let mut n = 0u64;
        let mut total = 0usize;
        while let Some(r) = rows.next().unwrap() {
            for c in 2..8 {
                if let Ok(t) = r.get_ref(c).unwrap().as_str() {
                    total += t.len();
                }
            }
            n += 1;
        }
        // Approximate the hashed stream: the text columns plus the fixed fields.
        bytes.resize(total, 0x5a);
        n
    });
    let (hash, _, _) = time(3, || {
        let mut h = Sha256::new();
        for c in bytes.chunks(200) {
            h.update(c);
        }
        h.finalize()
    });
    (scan, hash, n)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let devices = env_usize("DEVFENCE_BENCH_DEVICES", 10_000);
    let records = env_usize("DEVFENCE_BENCH_RECORDS", 1_000_000);
    let only = std::env::var("DEVFENCE_BENCH_ONLY").unwrap_or_default();
    let base = match std::env::var_os("TMPDIR") {
        Some(t) => PathBuf::from(t),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    let tmp = tempfile::Builder::new()
        .prefix("devfence-ledger-bench-")
        .tempdir_in(&base)
        .unwrap();
    let path = match std::env::var_os("DEVFENCE_BENCH_LEDGER") {
        Some(p) => PathBuf::from(p),
        None => tmp.path().join("ledger.db"),
    };
    if path.exists() {
        println!("reusing the ledger at {}", path.display());
    } else {
        build(&path, devices, records);
    }
    let ok_sig = |_: &devfence_engine::audit::StoredHead| Ok(());
    println!("load before measuring: {}", uptime());
    println!(
        "ledger size on disk: {:.1} MiB ({} bytes, with -wal/-shm)",
        size(&path) as f64 / 1048576.0,
        size(&path)
    );

    let (open, open_min, _) = time(5, || SqliteStore::open_existing(&path).unwrap());
    println!("open (what every command pays first): median {open:.1} ms (min {open_min:.1})");

    if only.is_empty() || only == "verify" {
        let (scan, hash, n) = reference(&path);
        let c0 = cpu_ms();
        let (v, vmin, rep) = time(3, || {
            let mut s = SqliteStore::open_existing(&path).unwrap();
            s.verify_with_head(None, &ok_sig).unwrap().0
        });
        let cpu = (cpu_ms() - c0) / 3.0;
        let rate = rep.records as f64 / (v / 1000.0);
        println!(
            "audit verify CPU time per run: {cpu:.0} ms = {:.2} M records per CPU-second",
            rep.records as f64 / (cpu / 1000.0) / 1e6
        );
        println!(
            "audit verify: {} records, median {v:.0} ms (min {vmin:.0}) = {:.2} M records/s (target >= 1.00)",
            rep.records,
            rate / 1e6
        );
        println!(
            "  reference, same run: bare scan of {n} rows {scan:.0} ms + SHA-256 of their bytes {hash:.0} ms = {:.0} ms; ratio {:.2}",
            scan + hash,
            v / (scan + hash)
        );
        println!("  load: {}", uptime());
    }
    if only.is_empty() {
        let (st, stmin, n) = time(5, || {
            let mut s = SqliteStore::open_existing(&path).unwrap();
            let (d, o, _p) = s
                .atomically(|tx| Ok((tx.devices()?, tx.open_operations()?, tx.guid_pool()?)))
                .unwrap();
            (d.len(), o.len())
        });
        println!(
            "status ({} devices): median {st:.1} ms (min {stmin:.1}), of which open {open:.1} ms",
            n.0
        );
        let (ck, ckmin, t) = time(5, || {
            let mut s = SqliteStore::open_existing(&path).unwrap();
            s.atomically(|tx| devfence_engine::engine::tenancy_from_ledger(tx))
                .unwrap()
        });
        println!(
            "check, the ledger's part ({} tenants, {} assignments): median {ck:.1} ms (min {ckmin:.1})",
            t.tenants.len(),
            t.assignments.len()
        );
        let d = device(devices / 2 + 1);
        let (sh, shmin, recs) = time(5, || {
            let mut s = SqliteStore::open_existing(&path).unwrap();
            s.audit_show(&AuditFilter {
                device: Some(d),
                tenant: None,
            })
            .unwrap()
            .len()
        });
        println!("audit show --device {d} ({recs} records): median {sh:.1} ms (min {shmin:.1})");
        println!("  load: {}", uptime());
    }
    if only.is_empty() || only == "prune" {
        // On a copy: keep the newest tenth.
        let copy = tmp.path().join("pruned.db");
        for side in ["", "-wal", ".audit-head"] {
            let from = PathBuf::from(format!("{}{side}", path.display()));
            if from.exists() {
                std::fs::copy(&from, format!("{}{side}", copy.display())).unwrap();
            }
        }
        let keep = (records / 10).max(1) as u64;
        let mut s = SqliteStore::open_existing(&copy).unwrap();
        let t0 = Instant::now();
        let rep = s
            .audit_prune(devfence_engine::audit::PruneCut::Keep(keep), &ok_sig)
            .unwrap();
        let pt = ms(t0.elapsed());
        drop(s);
        let mut s = SqliteStore::open_existing(&copy).unwrap();
        let t0 = Instant::now();
        let v = s.verify_with_head(None, &ok_sig).unwrap().0;
        let vt = ms(t0.elapsed());
        drop(s);
        println!(
            "audit prune --keep {keep}: {} records, {} finished operations with {} journal rows and {} expired \
             envelope nonces removed in {pt:.0} ms (verifies the whole chain first); \
             then audit verify of {} records {vt:.0} ms; file {:.1} MiB (freed pages are reused, not returned)",
            rep.pruned,
            rep.operations,
            rep.journal_rows,
            rep.nonces,
            v.records,
            size(&copy) as f64 / 1048576.0
        );
        // What VACUUM gives back to the file system afterwards.
        let t0 = Instant::now();
        rusqlite::Connection::open(&copy)
            .unwrap()
            .execute_batch("VACUUM")
            .unwrap();
        println!(
            "  then VACUUM: {:.0} ms; file {:.1} MiB",
            ms(t0.elapsed()),
            size(&copy) as f64 / 1048576.0
        );
        println!("  load: {}", uptime());
    }
}
