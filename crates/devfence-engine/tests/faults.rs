//! Faults: each gets a clear error, nothing is lost, and no device becomes
//! usable by the wrong tenant.
//!
//! Unknown tenant or device, a device held by another tenant, a device in
//! another tenant's IOMMU group, a handover of an Active device, a concurrent
//! second operation on the same device, a corrupted ledger file, a full disk
//! during a journal write; and the fabric's faults: a lagging SM, a lost update,
//! stale reads, an erroring SM, a sweep with errors, a port whose P_Key table
//! does not follow the SM.
#![allow(clippy::unwrap_used, clippy::too_many_lines, clippy::result_large_err)]

mod common;

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use devfence_engine::engine::{CrashMode, Engine, EngineConfig, EngineError, Failpoints, Progress};
use devfence_engine::{
    AuditFilter, AuditKind, DeviceState, GuidState, SqliteStore, StepState, Store, StoreError,
    StoreExt,
};
use devfence_fabric::sim::SimEvent;
use devfence_fabric::{FabricError, Generation, SimConfig, SweepOutcome};
use devfence_host::sim::Profile;
use devfence_model::{DeviceId, Guid};

// ----------------------------------------------------------------------
// Helpers

fn short(deadline_ms: u64) -> EngineConfig {
    EngineConfig {
        gate_deadline: Duration::from_millis(deadline_ms),
        ..EngineConfig::default()
    }
}

fn state(fx: &mut Fx, d: &DeviceId) -> Option<DeviceState> {
    fx.store
        .atomically(|tx| tx.device(d))
        .unwrap()
        .map(|r| r.state)
}

fn is_quarantined(s: &Option<DeviceState>) -> bool {
    matches!(s, Some(DeviceState::Quarantined { .. }))
}

/// The ledger is whole: no operation left open, the audit chain verifies.
fn ledger_whole(fx: &mut Fx) {
    let open = fx.store.atomically(|tx| tx.open_operations()).unwrap();
    assert!(open.is_empty(), "open operations: {open:?}");
    fx.store.verify().unwrap();
}

/// Refusal records in the audit log about `d`.
fn refusals(fx: &mut Fx, d: &DeviceId) -> Vec<String> {
    fx.store
        .audit_show(&AuditFilter {
            device: Some(*d),
            tenant: None,
        })
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == AuditKind::Refusal)
        .map(|r| r.detail.to_string())
        .collect()
}

fn issued(fx: &mut Fx, d: &DeviceId) -> Vec<Guid> {
    fx.store
        .atomically(|tx| tx.guids_of(d))
        .unwrap()
        .into_iter()
        .filter(|r| r.state == GuidState::Issued)
        .map(|r| r.guid)
        .collect()
}

fn all_guids(fx: &mut Fx, d: &DeviceId) -> Vec<Guid> {
    fx.store
        .atomically(|tx| tx.guids_of(d))
        .unwrap()
        .into_iter()
        .map(|r| r.guid)
        .collect()
}

/// The GUID is in no tenant partition at the SM (programmed and configured).
fn in_no_partition(fx: &Fx, g: Guid) {
    let p = fx.programmed_bases(g);
    assert!(p.iter().all(|b| *b == 0x7fff), "{g} programmed {p:x?}");
    let c = fx.configured_bases(g);
    assert!(c.is_empty(), "{g} configured {c:x?}");
}

/// `d` is not usable by `tenant`: not Ready/Active for it, and its node is not the
/// tenant's launcher's.
fn not_handed_to(fx: &mut Fx, d: &DeviceId, tenant: &str, uid: u32) {
    let st = state(fx, d);
    assert!(
        !matches!(&st, Some(DeviceState::Ready { tenant: t, .. } | DeviceState::Active { tenant: t, .. }) if t.to_string() == tenant),
        "{d} is {st:?}"
    );
    if let Some(n) = fx.node(d) {
        assert_ne!(n.uid, uid, "{d}'s node belongs to {tenant}'s launcher");
    }
}

/// Nothing of `d` reaches `tenant`: not Ready/Active for it, its node is not the
/// tenant's launcher's, and (IB) no GUID of the device is in its partition.
fn not_usable_by(fx: &mut Fx, d: &DeviceId, tenant: &str, uid: u32, base: u16) {
    not_handed_to(fx, d, tenant, uid);
    for g in all_guids(fx, d) {
        let p = fx.programmed_bases(g);
        assert!(
            !p.contains(&base),
            "{g} of {d} is in {tenant}'s partition: {p:x?}"
        );
    }
}

/// A fixture with `dev` assigned to acme.
fn assigned(kind_dev: &str) -> (Fx, DeviceId) {
    let mut fx = fixture();
    let d = dev(kind_dev);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    (fx, d)
}

/// The state an `EngineError::Failed` reports is quarantined.
fn says_quarantined(st: &str) -> bool {
    st.to_ascii_lowercase().starts_with("quarantined")
}

fn failed_at(e: &EngineError) -> (&str, &str, &str) {
    match e {
        EngineError::Failed {
            step,
            reason,
            state,
            ..
        } => (step.as_str(), reason.as_str(), state.as_str()),
        other => panic!("not a step failure: {other}"),
    }
}

// ----------------------------------------------------------------------
// Requests that are refused before anything changes

#[test]
fn unknown_tenant_is_refused_and_audited() {
    let mut fx = fixture();
    let d = dev(PCI_VF);
    let e = fx.engine().assign(&d, &t("initech"), None).unwrap_err();
    assert!(
        matches!(&e, EngineError::Store(StoreError::UnknownTenant(x)) if x.to_string() == "initech"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("Unknown tenant initech") && msg.contains("Hint:"),
        "{msg}"
    );
    assert_eq!(state(&mut fx, &d), None, "nothing registered");
    assert!(fx.node(&d).is_some_and(|n| n.uid == 0), "node untouched");
    let r = refusals(&mut fx, &d);
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].contains("initech"), "{r:?}");
    // The same for a handover to an unknown tenant of a held device.
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let e = fx.engine().handover(&d, &t("initech"), None).unwrap_err();
    assert!(
        matches!(e, EngineError::Store(StoreError::UnknownTenant(_))),
        "{e:?}"
    );
    assert!(
        matches!(state(&mut fx, &d), Some(DeviceState::Ready { tenant, .. }) if tenant == t("acme"))
    );
    assert!(
        fx.node(&d).is_some_and(|n| n.uid == ACME_UID),
        "acme keeps it"
    );
    assert_eq!(refusals(&mut fx, &d).len(), 2);
    ledger_whole(&mut fx);
}

#[test]
fn unknown_device_is_refused_and_audited() {
    let mut fx = fixture();
    // A PCI function the host does not have.
    let d = dev("0000:99:00.0");
    let e = fx.engine().assign(&d, &t("acme"), None).unwrap_err();
    let EngineError::Refused {
        reason,
        hint,
        device,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(*device, Some(d));
    assert!(reason.contains("no such PCI function"), "{reason}");
    assert!(!hint.is_empty());
    assert!(e.to_string().contains("Hint:"));
    assert_eq!(state(&mut fx, &d), None);
    assert_eq!(refusals(&mut fx, &d).len(), 1);
    // An mdev that does not exist.
    let m = dev("4b2b1f0e-7a55-4d6f-9c4e-0123456789ab");
    let e = fx.engine().assign(&m, &t("acme"), None).unwrap_err();
    assert!(
        matches!(&e, EngineError::Refused { reason, .. } if reason.contains("no such mdev")),
        "{e:?}"
    );
    assert_eq!(refusals(&mut fx, &m).len(), 1);
    // Release / VM start of a device the ledger does not know.
    let e = fx.engine().release(&d).unwrap_err();
    assert!(
        matches!(e, EngineError::Store(StoreError::UnknownDevice(x)) if x == d),
        "{e:?}"
    );
    let e = fx.engine().vm_started(&d, &t("acme"), "web1").unwrap_err();
    assert!(matches!(e, EngineError::Refused { .. }), "{e:?}");
    assert_eq!(refusals(&mut fx, &d).len(), 3);
    // A GUID is not a device.
    let g = dev("0x0002c90300f00001");
    let e = fx.engine().assign(&g, &t("acme"), None).unwrap_err();
    assert!(matches!(e, EngineError::Refused { .. }), "{e:?}");
    let devices = fx.store.atomically(|tx| tx.devices()).unwrap();
    assert!(devices.is_empty(), "{devices:?}");
    ledger_whole(&mut fx);
}

#[test]
fn a_device_held_by_another_tenant_is_refused() {
    for kind in [IB_VF, PCI_VF, TOKEN_VF] {
        let (mut fx, d) = assigned(kind);
        let before = issued(&mut fx, &d);
        let tok = fx.delivered_token(TOKEN_VF);
        let e = fx.engine().assign(&d, &t("globex"), None).unwrap_err();
        let EngineError::Refused { reason, hint, .. } = &e else {
            panic!("{kind}: {e:?}")
        };
        assert!(
            reason.contains("Ready(acme)") && reason.contains("not Free"),
            "{reason}"
        );
        assert!(hint.contains("handover"), "{hint}");
        // Nothing changed: still acme's, its node, its GUID at the SM, its token.
        assert!(
            matches!(state(&mut fx, &d), Some(DeviceState::Ready { tenant, .. }) if tenant == t("acme"))
        );
        assert!(fx.node(&d).is_some_and(|n| n.uid == ACME_UID));
        assert_eq!(issued(&mut fx, &d), before);
        for g in &before {
            assert!(fx.programmed_bases(*g).contains(&ACME_BASE));
        }
        assert_eq!(fx.delivered_token(TOKEN_VF), tok);
        not_usable_by(&mut fx, &d, "globex", GLOBEX_UID, GLOBEX_BASE);
        // A VM of globex may not start on it either.
        let e = fx
            .engine()
            .vm_started(&d, &t("globex"), "evil")
            .unwrap_err();
        assert!(matches!(e, EngineError::Refused { .. }), "{e:?}");
        assert!(
            matches!(state(&mut fx, &d), Some(DeviceState::Ready { tenant, .. }) if tenant == t("acme"))
        );
        assert_eq!(refusals(&mut fx, &d).len(), 2, "{kind}");
        ledger_whole(&mut fx);
    }
}

#[test]
fn a_handover_of_an_active_device_is_refused() {
    for kind in [IB_VF, PCI_VF, TOKEN_VF] {
        let mut fx = fixture();
        let d = dev(kind);
        fx.engine().assign(&d, &t("acme"), Some("web1")).unwrap();
        fx.engine().vm_started(&d, &t("acme"), "web1").unwrap();
        let guids = issued(&mut fx, &d);
        let e = fx.engine().handover(&d, &t("globex"), None).unwrap_err();
        let EngineError::Refused { reason, hint, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(reason.contains("web1 is using it"), "{reason}");
        assert!(hint.contains("stop web1"), "{hint}");
        // The running VM keeps its device, untouched.
        let active = DeviceState::Active {
            tenant: t("acme"),
            vm: "web1".into(),
        };
        assert_eq!(state(&mut fx, &d), Some(active.clone()));
        assert!(fx.node(&d).is_some_and(|n| n.uid == ACME_UID));
        assert_eq!(issued(&mut fx, &d), guids);
        for g in &guids {
            assert!(fx.programmed_bases(*g).contains(&ACME_BASE));
        }
        not_usable_by(&mut fx, &d, "globex", GLOBEX_UID, GLOBEX_BASE);
        // Release is refused too, while the VM runs.
        let e = fx.engine().release(&d).unwrap_err();
        assert!(matches!(e, EngineError::Refused { .. }), "{e:?}");
        assert_eq!(state(&mut fx, &d), Some(active));
        assert_eq!(
            refusals(&mut fx, &d).len(),
            2,
            "{:?}",
            refusals(&mut fx, &d)
        );
        ledger_whole(&mut fx);
        // Once the VM stops, the handover goes through.
        let done = fx.engine().vm_stopped(&d).unwrap();
        assert_eq!(done.state, DeviceState::Free);
        fx.engine().assign(&d, &t("globex"), None).unwrap();
        for g in &guids {
            in_no_partition(&fx, *g);
        }
    }
}

#[test]
fn a_device_in_another_tenants_group_is_refused() {
    // no-acs: 0000:03:00.0 and 0000:04:00.0 share IOMMU group 12 (a switch
    // without ACS): they can reach each other through DMA, and one /dev/vfio/12
    // node serves both.
    let mut fx = fixture_profile(Profile::NoAcs);
    let a = dev("0000:03:00.0");
    let b = dev("0000:04:00.0");
    let done = fx.engine().assign(&a, &t("acme"), None).unwrap();
    assert!(matches!(done.state, DeviceState::Ready { .. }));
    assert_eq!(fx.group_of(&a), Some(12));
    assert_eq!(fx.group_of(&b), Some(12));
    assert!(fx.node(&a).is_some_and(|n| n.uid == ACME_UID));
    let e = fx.engine().assign(&b, &t("globex"), None).unwrap_err();
    let msg = e.to_string();
    let EngineError::Refused { reason, hint, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(
        reason.contains("GRP-ONE-TENANT")
            && reason.contains("0000:03:00.0")
            && reason.contains("acme"),
        "{reason}"
    );
    assert!(hint.contains("another group"), "{hint}");
    assert!(msg.contains("Hint:"), "{msg}");
    assert_eq!(refusals(&mut fx, &b).len(), 1);
    // globex got nothing: not Ready, the group node is not its launcher's.
    assert!(!matches!(
        state(&mut fx, &b),
        Some(DeviceState::Ready { .. })
    ));
    not_usable_by(&mut fx, &b, "globex", GLOBEX_UID, GLOBEX_BASE);
    not_usable_by(&mut fx, &a, "globex", GLOBEX_UID, GLOBEX_BASE);
    // Nothing of acme's was touched: its device is Ready and the shared group
    // node still its launcher's.
    assert!(
        matches!(state(&mut fx, &a), Some(DeviceState::Ready { tenant, .. }) if tenant == t("acme"))
    );
    let n = fx.node(&a);
    assert!(
        n.is_some_and(|n| n.uid == ACME_UID && n.gid == ACME_UID),
        "acme's device lost its group node: {n:?}"
    );
    ledger_whole(&mut fx);
    // The group's own tenant may have the other member too.
    let done = fx.engine().assign(&b, &t("acme"), None).unwrap();
    assert!(matches!(done.state, DeviceState::Ready { .. }));
    assert!(fx.node(&a).is_some_and(|n| n.uid == ACME_UID));
    // But handing one of them to globex is refused the same way, and changes nothing.
    let e = fx.engine().handover(&b, &t("globex"), None).unwrap_err();
    assert!(
        matches!(&e, EngineError::Refused { reason, .. } if reason.contains("GRP-ONE-TENANT")),
        "{e:?}"
    );
    assert!(
        matches!(state(&mut fx, &b), Some(DeviceState::Ready { tenant, .. }) if tenant == t("acme"))
    );
    assert!(fx.node(&b).is_some_and(|n| n.uid == ACME_UID));
    ledger_whole(&mut fx);
}

// ----------------------------------------------------------------------
// A second operation on the same device

#[test]
fn a_second_operation_on_a_busy_device_is_refused_not_interleaved() {
    let (mut fx, d) = assigned(IB_VF);
    let acme_guid = issued(&mut fx, &d);
    // Another process (another connection to the same ledger file) holds the
    // device with an open operation.
    let mut other = SqliteStore::open(&fx.db).unwrap();
    let holder = other.begin_operation(&d, "handover").unwrap();
    let e = fx.engine().handover(&d, &t("globex"), None).unwrap_err();
    let EngineError::Store(se) = &e else {
        panic!("{e:?}")
    };
    let busy = se.as_busy().unwrap_or_else(|| panic!("{se:?}"));
    assert_eq!(busy.holder, holder);
    assert_eq!(busy.device, d);
    assert!(e.to_string().contains("is busy") && e.to_string().contains("Hint:"));
    // Nothing happened: acme still holds it, node and GUID unchanged, the other
    // operation's journal has nothing of ours.
    assert!(
        matches!(state(&mut fx, &d), Some(DeviceState::Ready { tenant, .. }) if tenant == t("acme"))
    );
    assert!(fx.node(&d).is_some_and(|n| n.uid == ACME_UID));
    assert_eq!(issued(&mut fx, &d), acme_guid);
    assert!(fx.programmed_bases(acme_guid[0]).contains(&ACME_BASE));
    assert!(
        other
            .atomically(|tx| tx.journal(holder))
            .unwrap()
            .is_empty()
    );
    let open = fx.store.atomically(|tx| tx.open_operations()).unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].id, holder);
    assert!(!refusals(&mut fx, &d).is_empty());
    // The other process finishes; now the handover runs.
    other
        .atomically(|tx| tx.finish_operation(holder, devfence_engine::OpOutcome::Failed))
        .unwrap();
    let done = fx.engine().handover(&d, &t("globex"), None).unwrap();
    assert!(matches!(done.state, DeviceState::Ready { tenant, .. } if tenant == t("globex")));
    ledger_whole(&mut fx);
}

#[test]
fn a_concurrent_operation_midway_through_a_handover_is_refused() {
    // While a handover acme → globex runs (at its reset), a second process
    // asks for the same handover, a release and an assignment of the device:
    // each is refused with Busy naming the running operation, and the first
    // completes with a journal of its own steps only.
    let mut fx = fixture();
    let d = dev(PCI_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let mut second: Vec<(&str, Result<_, EngineError>)> = Vec::new();
    let db = fx.db.clone();
    let (kernel, sm) = (&fx.kernel, &*fx.sm);
    let done = {
        let second = &mut second;
        let mut e = Engine::new(&mut fx.store, kernel, sm, cfg()).with_progress(move |p| {
            if let Progress::Step { name, state, .. } = p
                && name == "reset"
                && *state == StepState::Planned
                && second.is_empty()
            {
                let mut st = SqliteStore::open(&db).unwrap();
                let mut e2 = Engine::new(&mut st, kernel, sm, cfg());
                second.push(("handover", e2.handover(&d, &t("globex"), None)));
                second.push(("release", e2.release(&d)));
                second.push(("assign", e2.assign(&d, &t("globex"), None)));
            }
        });
        e.handover(&d, &t("globex"), None)
    };
    let done = done.unwrap();
    assert_eq!(second.len(), 3);
    for (what, r) in second {
        let e = r.unwrap_err();
        let busy = match &e {
            EngineError::Store(se) => se.as_busy(),
            _ => None,
        };
        let busy = busy.unwrap_or_else(|| panic!("{what}: {e:?}"));
        assert_eq!(busy.holder, done.op, "{what}");
        assert_eq!(busy.kind, "handover");
        let msg = e.to_string();
        assert!(msg.contains("is busy") && msg.contains("Hint:"), "{msg}");
    }
    assert!(matches!(done.state, DeviceState::Ready { ref tenant, .. } if *tenant == t("globex")));
    // The first one's journal: each of its steps once (planned, then done).
    let j = fx.store.atomically(|tx| tx.journal(done.op)).unwrap();
    assert_eq!(j.iter().filter(|s| s.step == "begin").count(), 1);
    assert_eq!(j.iter().filter(|s| s.step == "reset").count(), 2);
    assert_eq!(j.iter().filter(|s| s.step == "finish").count(), 1);
    assert!(fx.node(&d).is_some_and(|n| n.uid == GLOBEX_UID));
    // The three refusals are audited.
    assert!(refusals(&mut fx, &d).len() >= 3);
    ledger_whole(&mut fx);
}

// ----------------------------------------------------------------------
// The ledger file

/// Overwrites `len` bytes at `at` with a pattern.
fn scribble(path: &Path, at: u64, len: usize) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&vec![0xA5; len]).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_corrupted_ledger_is_refused_and_nothing_becomes_usable() {
    // A page in the middle of the file.
    let (mut fx, d) = assigned(PCI_VF);
    let m = fx.new_mdev();
    let done = fx.engine().assign(&m, &t("acme"), None).unwrap();
    let m = done.device;
    let node_before = fx.node(&d);
    // Close the ledger (the WAL is checkpointed into the file) and damage it.
    fx.store = SqliteStore::open(fx.dir.path().join("scratch.db")).unwrap();
    let len = std::fs::metadata(&fx.db).unwrap().len();
    assert!(len >= 8 * 4096, "{len}");
    let pages = len / 4096;
    scribble(&fx.db, (pages / 2) * 4096, 4096);
    let e = SqliteStore::open(&fx.db).unwrap_err();
    assert!(
        matches!(e, StoreError::Corrupt { ref path, .. } if *path == fx.db),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&fx.db.display().to_string()) && msg.contains("corrupted"),
        "{msg}"
    );
    assert!(msg.contains("Hint:"), "{msg}");
    // With no ledger there is no engine, so nothing moves: the host is as it was.
    assert_eq!(fx.node(&d), node_before);
    assert!(fx.node(&m).is_some_and(|n| n.uid == ACME_UID));

    // The header: not an SQLite file any more.
    let (mut fx, _d) = assigned(PCI_VF);
    fx.store = SqliteStore::open(fx.dir.path().join("scratch.db")).unwrap();
    scribble(&fx.db, 0, 16);
    let e = SqliteStore::open(&fx.db).unwrap_err();
    assert!(
        matches!(e, StoreError::Corrupt { ref path, ref detail } if *path == fx.db && detail.contains("not an SQLite database")),
        "{e:?}"
    );

    // A crash mid-handover, then the file is damaged before recovery: recovery
    // cannot open it, and the half-handed-over device stays unusable.
    quiet_crashes();
    let (mut fx, d) = assigned(IB_VF);
    let acme = issued(&mut fx, &d)[0];
    let fp = Failpoints::crash_at("handover:bind-vfio:acted", CrashMode::Panic);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fx.engine_with(fp, cfg()).handover(&d, &t("globex"), None)
    }));
    assert!(r.is_err(), "crashed");
    fx.store = SqliteStore::open(fx.dir.path().join("scratch.db")).unwrap();
    let len = std::fs::metadata(&fx.db).unwrap().len();
    scribble(&fx.db, (len / 4096 / 2) * 4096, 4096);
    let e = SqliteStore::open(&fx.db).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    assert!(fx.node(&d).is_none_or(|n| n.uid == 0), "{:?}", fx.node(&d));
    // acme's GUID was revoked (verified) before the crash; globex's launcher
    // does not own the node, so neither tenant can use the VF.
    in_no_partition(&fx, acme);
}

/// A small tmpfs, unmounted when dropped (also when the test fails).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("devfence-full-")
            .tempdir()
            .unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs (the test runs as root)");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with `fill` until ENOSPC.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.dir.path().join("fill")).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("{e}"),
            }
        }
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.dir.path().join("fill")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let st = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
        if !st.is_ok_and(|s| s.success()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

#[test]
fn a_full_disk_during_a_journal_write_fails_closed_and_recovers() {
    for kind in [PCI_VF, IB_VF, TOKEN_VF] {
        let disk = SmallDisk::mount("16m");
        let db = disk.path().join("ledger.db");
        let mut fx = fixture_full(
            Profile::Lab,
            SimConfig {
                lag: Duration::ZERO,
                sweep_time: Duration::ZERO,
                ..SimConfig::default()
            },
            Some(db.clone()),
        );
        let d = dev(kind);
        fx.engine().assign(&d, &t("acme"), None).unwrap();
        let acme_guids = issued(&mut fx, &d);
        // The disk fills up right after the reset of a handover to globex: the
        // next journal write fails.
        let r = {
            let disk = &disk;
            let (kernel, sm) = (&fx.kernel, &*fx.sm);
            Engine::new(&mut fx.store, kernel, sm, cfg())
                .with_progress(move |p| {
                    if let Progress::Step { name, state, .. } = p
                        && name == "reset"
                        && *state == StepState::Done
                    {
                        disk.fill();
                    }
                })
                .handover(&d, &t("globex"), None)
        };
        let e = r.unwrap_err();
        let msg = e.to_string();
        eprintln!("{kind}: {msg}");
        assert!(
            msg.contains("disk is full") || msg.contains("disk space"),
            "{kind}: {msg}"
        );
        assert!(msg.contains("Hint:"), "{msg}");
        // Not usable by anyone: not Ready, the node is root's.
        let st = state(&mut fx, &d);
        assert!(
            !matches!(
                st,
                Some(DeviceState::Ready { .. } | DeviceState::Active { .. })
            ),
            "{st:?}"
        );
        not_usable_by(&mut fx, &d, "globex", GLOBEX_UID, GLOBEX_BASE);
        assert!(fx.node(&d).is_none_or(|n| n.uid == 0), "{:?}", fx.node(&d));
        // Space comes back; a new process recovers the device.
        disk.free();
        fx.restart();
        let rec = fx.engine().recover().unwrap();
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert_eq!(rec[0].state, DeviceState::Free, "{rec:?}");
        ledger_whole(&mut fx);
        for g in &acme_guids {
            in_no_partition(&fx, *g);
        }
        // Nothing was lost: the tenants, the GUID history, the audit chain.
        let tenants = fx.store.atomically(|tx| tx.tenants()).unwrap();
        assert_eq!(tenants.len(), 2);
        let all: BTreeSet<Guid> = all_guids(&mut fx, &d).into_iter().collect();
        assert!(acme_guids.iter().all(|g| all.contains(g)));
        let done = fx.engine().assign(&d, &t("globex"), None).unwrap();
        assert!(matches!(done.state, DeviceState::Ready { tenant, .. } if tenant == t("globex")));
        for g in issued(&mut fx, &d) {
            assert!(!acme_guids.contains(&g), "GUID reissued");
        }
        drop(fx);
        drop(disk);
    }
}

#[test]
fn a_full_disk_before_an_operation_changes_nothing() {
    let disk = SmallDisk::mount("16m");
    let db = disk.path().join("ledger.db");
    let mut fx = fixture_full(
        Profile::Lab,
        SimConfig {
            lag: Duration::ZERO,
            sweep_time: Duration::ZERO,
            ..SimConfig::default()
        },
        Some(db),
    );
    let d = dev(PCI_VF);
    disk.fill();
    let e = fx.engine().assign(&d, &t("acme"), None).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, EngineError::Store(StoreError::Sql { .. })),
        "{e:?}"
    );
    assert!(
        msg.contains("disk is full") && msg.contains("Hint:"),
        "{msg}"
    );
    assert!(fx.node(&d).is_some_and(|n| n.uid == 0));
    disk.free();
    assert_eq!(state(&mut fx, &d), None);
    ledger_whole(&mut fx);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    drop(fx);
    drop(disk);
}

// ----------------------------------------------------------------------
// The fabric

fn lagging() -> SimConfig {
    SimConfig {
        lag: Duration::from_secs(3600),
        sweep_time: Duration::ZERO,
        ..SimConfig::default()
    }
}

#[test]
fn a_lagging_sm_fails_the_handover_closed_at_sm_verified() {
    let mut fx = fixture();
    let d = dev(IB_VF);
    fx.engine().assign(&d, &t("acme"), None).unwrap();
    let acme = issued(&mut fx, &d)[0];
    // The SM starts lagging (1 h) as the one apply (acme's GUID out, the fresh
    // GUID into globex's partition) is about to be made, so it is never swept
    // within the gate's 200 ms.
    let sm = Arc::clone(&fx.sm);
    let mut waits = 0u32;
    let r = fx
        .engine_with(Default::default(), short(200))
        .with_progress(|p| match p {
            Progress::Step { name, state, .. }
                if name == "guid-set" && *state == StepState::Done =>
            {
                sm.set_lag(Duration::from_secs(3600));
            }
            Progress::Waiting { .. } => waits += 1,
            _ => {}
        })
        .handover(&d, &t("globex"), None);
    let e = r.unwrap_err();
    let msg = e.to_string();
    let (step, reason, st) = failed_at(&e);
    assert_eq!(step, "gate:sm-verified", "{msg}");
    assert!(
        reason.contains("The SM did not verify the change"),
        "{reason}"
    );
    assert!(says_quarantined(st), "{st}");
    assert!(msg.contains("Hint:"));
    assert!(waits > 0, "the gate polled");
    assert!(is_quarantined(&state(&mut fx, &d)));
    // Never Ready, and the gate's failure is in the journal with its evidence.
    let ops: Vec<_> = fx
        .store
        .audit_show(&AuditFilter {
            device: Some(d),
            tenant: None,
        })
        .unwrap();
    assert!(
        !ops.iter()
            .any(|r| r.detail.to_string().contains("Ready(globex"))
    );
    assert!(fx.node(&d).is_none_or(|n| n.uid == 0));
    // The apply was made (configured), the sweep never came.
    assert!(fx.configured_bases(acme).is_empty());
    ledger_whole(&mut fx);
    // The SM catches up; release scrubs the device and verifies it clean.
    fx.sm.set_lag(Duration::ZERO);
    let done = fx.engine().release(&d).unwrap();
    assert_eq!(done.state, DeviceState::Free);
    for g in all_guids(&mut fx, &d) {
        in_no_partition(&fx, g);
    }
    assert!(issued(&mut fx, &d).is_empty());
    ledger_whole(&mut fx);
}

#[test]
fn an_sm_lagging_from_the_start_fails_closed_and_release_scrubs_it_later() {
    let mut fx = fixture_with(lagging());
    let d = dev(IB_VF);
    // Even the revocation of the factory GUID (in the one apply with the grant)
    // cannot be verified.
    let e = fx
        .engine_with(Default::default(), short(200))
        .assign(&d, &t("acme"), None)
        .unwrap_err();
    let (step, _, st) = failed_at(&e);
    assert_eq!(step, "gate:sm-verified", "{e}");
    assert!(says_quarantined(st));
    not_usable_by(&mut fx, &d, "acme", ACME_UID, ACME_BASE);
    ledger_whole(&mut fx);
    // A handover of a quarantined device under the lag fails the same way.
    let e = fx
        .engine_with(Default::default(), short(200))
        .handover(&d, &t("globex"), None)
        .unwrap_err();
    assert!(failed_at(&e).0.starts_with("gate:"), "{e}");
    not_usable_by(&mut fx, &d, "globex", GLOBEX_UID, GLOBEX_BASE);
    fx.sm.set_lag(Duration::ZERO);
    let done = fx.engine().release(&d).unwrap();
    assert_eq!(done.state, DeviceState::Free);
    let done = fx.engine().assign(&d, &t("globex"), None).unwrap();
    assert!(matches!(done.state, DeviceState::Ready { .. }));
    ledger_whole(&mut fx);
}

#[test]
fn a_lost_sm_update_fails_closed() {
    // The one apply (acme's GUID out, the fresh GUID into globex's partition) is
    // lost: acme's GUID stays in acme's partition and the fresh one is in none,
    // so the handover must not go on.
    let (mut fx, d) = assigned(IB_VF);
    let acme = issued(&mut fx, &d)[0];
    fx.sm.drop_next_update();
    let e = fx
        .engine_with(Default::default(), short(200))
        .handover(&d, &t("globex"), None)
        .unwrap_err();
    let (step, reason, st) = failed_at(&e);
    assert_eq!(step, "gate:sm-verified", "{e}");
    assert!(reason.contains("did not verify"), "{reason}");
    assert!(says_quarantined(st));
    assert!(
        fx.configured_bases(acme).contains(&ACME_BASE),
        "the update was lost"
    );
    not_usable_by(&mut fx, &d, "globex", GLOBEX_UID, GLOBEX_BASE);
    assert!(fx.node(&d).is_none_or(|n| n.uid == 0));
    // Re-scrubbing with a healthy SM removes it.
    let done = fx.engine().release(&d).unwrap();
    assert_eq!(done.state, DeviceState::Free);
    for g in all_guids(&mut fx, &d) {
        in_no_partition(&fx, g);
    }
    ledger_whole(&mut fx);
}

#[test]
fn stale_sm_reads_are_never_taken_for_verification() {
    // A few stale reads: the gate keeps polling and passes once the reads are fresh.
    let (mut fx, d) = assigned(IB_VF);
    let acme = issued(&mut fx, &d)[0];
    let before = fx.sm.history().len();
    fx.sm.stale_reads(3);
    let mut waits = 0u32;
    let done = fx
        .engine()
        .with_progress(|p| {
            if let Progress::Waiting { .. } = p {
                waits += 1;
            }
        })
        .handover(&d, &t("globex"), None)
        .unwrap();
    assert!(matches!(done.state, DeviceState::Ready { ref tenant, .. } if *tenant == t("globex")));
    let stale = fx.sm.history()[before..]
        .iter()
        .filter(|h| matches!(h.event, SimEvent::Observed { stale: true, .. }))
        .count();
    assert_eq!(stale, 3, "three stale views were served");
    assert!(waits >= 1, "a stale view was not taken as verification");
    in_no_partition(&fx, acme);
    let g = issued(&mut fx, &d)[0];
    assert_eq!(fx.programmed_bases(g), [GLOBEX_BASE, 0x7fff].into());

    // Stale reads forever: fails closed.
    let (mut fx, d) = assigned(IB_VF);
    fx.sm.stale_reads(u32::MAX);
    let e = fx
        .engine_with(Default::default(), short(200))
        .handover(&d, &t("globex"), None)
        .unwrap_err();
    let (step, _, st) = failed_at(&e);
    assert_eq!(step, "gate:sm-verified", "{e}");
    assert!(says_quarantined(st));
    // The one apply did put the fresh GUID into globex's partition, but the
    // device is quarantined and its node root's: globex's VM cannot open it.
    not_handed_to(&mut fx, &d, "globex", GLOBEX_UID);
    assert!(fx.node(&d).is_none_or(|n| n.uid == 0));
    fx.sm.clear_faults();
    assert_eq!(fx.engine().release(&d).unwrap().state, DeviceState::Free);
    for g in all_guids(&mut fx, &d) {
        in_no_partition(&fx, g);
    }
    ledger_whole(&mut fx);
}

#[test]
fn an_sm_error_is_a_clear_failure() {
    // The SM refuses the first call of the handover (reading its configuration
    // to allocate the fresh GUID against it).
    let (mut fx, d) = assigned(IB_VF);
    let acme = issued(&mut fx, &d)[0];
    fx.sm.error_next_call(FabricError::Unreachable {
        backend: "sim".into(),
        detail: "connection refused".into(),
        hint: "start the SM".into(),
    });
    let e = fx.engine().handover(&d, &t("globex"), None).unwrap_err();
    let msg = e.to_string();
    let (step, reason, st) = failed_at(&e);
    assert_eq!(step, "guid-allocate", "{msg}");
    assert!(reason.contains("connection refused"), "{reason}");
    assert!(says_quarantined(st));
    not_usable_by(&mut fx, &d, "globex", GLOBEX_UID, GLOBEX_BASE);
    assert!(fx.node(&d).is_none_or(|n| n.uid == 0));
    // The one-sweep handover failed before its apply: the revocation it deferred
    // was applied and verified on its own, so the quarantined device leaves
    // acme's GUID in no partition (as a two-sweep handover would).
    in_no_partition(&fx, acme);
    ledger_whole(&mut fx);
    let done = fx.engine().release(&d).unwrap();
    assert_eq!(done.state, DeviceState::Free);
    in_no_partition(&fx, acme);

    // A transient error while the gate reads the SM: the gate reads again.
    let (mut fx, d) = assigned(IB_VF);
    let sm = Arc::clone(&fx.sm);
    let done = fx
        .engine()
        .with_progress(|p| {
            if let Progress::Step { name, state, .. } = p
                && name == "fabric-move"
                && *state == StepState::Done
            {
                sm.error_next_call(FabricError::Unreachable {
                    backend: "sim".into(),
                    detail: "timed out".into(),
                    hint: "retry".into(),
                });
            }
        })
        .handover(&d, &t("globex"), None)
        .unwrap();
    assert!(matches!(done.state, DeviceState::Ready { .. }));
    assert!(
        fx.sm
            .history()
            .iter()
            .any(|h| matches!(h.event, SimEvent::ErrorInjected { op } if op == "observe"))
    );
    ledger_whole(&mut fx);
}

#[test]
fn a_sweep_with_errors_is_not_taken_as_verification() {
    let (mut fx, d) = assigned(IB_VF);
    let before = fx.sm.history().len();
    fx.sm.fail_next_sweep();
    let done = fx.engine().handover(&d, &t("globex"), None).unwrap();
    assert!(matches!(done.state, DeviceState::Ready { .. }));
    // The gates' proofs name a clean sweep after the failed one.
    let failed_gen = fx.sm.history()[before..]
        .iter()
        .find_map(|h| match &h.event {
            SimEvent::SweepCompleted {
                generation,
                outcome: SweepOutcome::Errors(_),
                ..
            } => Some(generation.0),
            _ => None,
        })
        .expect("a sweep failed");
    let j = fx.store.atomically(|tx| tx.journal(done.op)).unwrap();
    // One sweep: the handover's only SM gate.
    assert!(!j.iter().any(|s| s.step == "gate:fabric-revoked"));
    {
        let gate = "gate:sm-verified";
        let e = j
            .iter()
            .find(|s| s.step == gate && s.state == StepState::Done)
            .unwrap();
        let proof = &e.detail["evidence"]["proof"];
        let seen = proof["seen"].as_u64().unwrap_or_else(|| panic!("{proof}"));
        assert_ne!(seen, failed_gen, "{gate} verified on the failed sweep");
        let (outcome, _) = fx.sm.programmed_at(Generation(seen)).unwrap();
        assert_eq!(outcome, SweepOutcome::Clean, "{gate} verified on {seen}");
    }
    ledger_whole(&mut fx);
}

#[test]
fn a_port_table_that_does_not_follow_the_sm_fails_port_pkeys() {
    let (mut fx, d) = assigned(IB_VF);
    // The VF's port keeps showing acme's table, whatever the SM did.
    fx.kernel
        .set_port_table_source(Arc::new(|_| Some(vec![0x7fff, 0x8001])));
    let e = fx.engine().handover(&d, &t("globex"), None).unwrap_err();
    let msg = e.to_string();
    let (step, reason, st) = failed_at(&e);
    assert_eq!(step, "gate:port-pkeys", "{msg}");
    assert!(reason.contains("0x8001"), "{reason}");
    assert!(says_quarantined(st));
    assert!(is_quarantined(&state(&mut fx, &d)));
    assert!(fx.node(&d).is_none_or(|n| n.uid != GLOBEX_UID));
    // The journal has the evidence: the table read at the port.
    let op = fx
        .store
        .audit_show(&AuditFilter {
            device: Some(d),
            tenant: None,
        })
        .unwrap()
        .into_iter()
        .rev()
        .find(|r| r.kind == AuditKind::Gate && r.detail["step"] == "gate:port-pkeys")
        .unwrap();
    assert_eq!(op.detail["state"], "failed");
    assert!(op.detail.to_string().contains("0x8001"), "{}", op.detail);
    ledger_whole(&mut fx);
    // The port follows the SM again: release scrubs it clean.
    fx.restart();
    let done = fx.engine().release(&d).unwrap();
    assert_eq!(done.state, DeviceState::Free);
    for g in all_guids(&mut fx, &d) {
        in_no_partition(&fx, g);
    }
}

/// issue 11 item 4: a step that fails keeps the error it stems from as the
/// source of `EngineError::Failed` (here the file step's error, naming the
/// planted link), and the device is quarantined.
#[test]
fn a_failed_step_keeps_its_cause_as_the_source() {
    let mut fx = fixture();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(fx.root.path("/run/devfence")).unwrap();
    std::os::unix::fs::symlink(outside.path(), fx.root.path("/run/devfence/tokens")).unwrap();
    let d = dev(TOKEN_VF);
    let e = fx.engine().assign(&d, &t("acme"), None).unwrap_err();
    let (step, reason, st) = failed_at(&e);
    // The scrub before the grant withdraws any old token: through the link, never.
    assert_eq!(step, "token-withdraw");
    assert!(reason.contains("is a symbolic link"), "{reason}");
    assert!(says_quarantined(st), "{st}");
    let src = std::error::Error::source(&e).expect("a source");
    let file = src
        .downcast_ref::<devfence_host::actuator::files::FileStepError>()
        .expect("the file step's error");
    assert!(
        std::error::Error::source(file).is_some_and(|io| io.to_string().contains("symbolic link")),
        "{file:?}"
    );
    assert!(is_quarantined(&state(&mut fx, &d)));
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
}
