//! A vfio_ap matrix mdev keeps its matrix when devfence re-creates it with a
//! fresh UUID for a tenant (the bug: the new mdev came up with an empty matrix,
//! so the tenant's APQNs were lost), on the simulated `s390-ap` host.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use devfence_engine::{DeviceState, StoreExt};
use devfence_host::actuator::ops::SysfsActuator;
use devfence_host::actuator::{Actuator, ApResource, KernelIo};
use devfence_host::parse;
use devfence_host::sim::Profile;
use devfence_model::{DeviceId, MdevUuid};

const A: &str = "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01";

fn matrix(fx: &Fx, u: MdevUuid) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let dir = format!("/sys/devices/vfio_ap/matrix/{u}");
    let m = parse::ap_matrix(&fx.kernel.read(&format!("{dir}/matrix")).unwrap()).unwrap();
    let cd = parse::control_domains(&fx.kernel.read(&format!("{dir}/control_domains")).unwrap())
        .unwrap();
    (m.adapters, m.domains, cd)
}

/// The new mdev a tenant gets holds the same adapters, domains and control
/// domains as the one it replaces (read back from sysfs), and the old UUID is
/// gone.
#[test]
fn a_reassigned_matrix_mdev_keeps_its_matrix() {
    let mut fx = fixture_profile(Profile::S390Ap);
    let old: MdevUuid = A.parse().unwrap();
    // The profile's A and B share 06.0013 (a defect the checks report): the
    // operator takes domain 0x13 out of A first.
    SysfsActuator::new(&fx.kernel)
        .ap_unassign(old, ApResource::Domain(0x13))
        .unwrap();
    let before = matrix(&fx, old);
    assert_eq!(
        before,
        (vec![0x06], vec![0x10, 0x11, 0x12, 0x20], vec![0x10])
    );
    let plan = fx
        .engine()
        .plan(&DeviceId::Mdev(old), Some(&t("acme")))
        .unwrap();
    let done = fx
        .engine()
        .assign(&DeviceId::Mdev(old), &t("acme"), None)
        .unwrap();
    // The plan lists exactly what the journal then shows.
    let mut journalled: Vec<String> = Vec::new();
    for j in fx.store.atomically(|tx| tx.journal(done.op)).unwrap() {
        if journalled.last() != Some(&j.step) {
            journalled.push(j.step);
        }
    }
    let planned: Vec<String> = plan.iter().map(|s| s.name.clone()).collect();
    assert_eq!(planned, journalled);
    let DeviceId::Mdev(new) = done.device else {
        panic!("{done:?}")
    };
    assert_ne!(new, old);
    assert!(
        !fx.kernel
            .exists(&format!("/sys/devices/vfio_ap/matrix/{old}"))
    );
    assert_eq!(matrix(&fx, new), before);
}

/// A matrix the new mdev cannot get (an APQN another mdev holds) fails closed:
/// the operation fails at `ap-matrix-assign`, naming the APQN and the other
/// mdev; nothing is Ready with a partial matrix.
#[test]
fn a_matrix_the_new_mdev_cannot_get_fails_closed() {
    let mut fx = fixture_profile(Profile::S390Ap);
    let old: MdevUuid = A.parse().unwrap();
    let e = fx
        .engine()
        .assign(&DeviceId::Mdev(old), &t("acme"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ap-matrix-assign") && e.contains("06.0013") && e.contains("Hint:"),
        "{e}"
    );
    let ready = fx
        .store
        .atomically(|tx| tx.devices())
        .unwrap()
        .into_iter()
        .filter(|d| matches!(d.state, DeviceState::Ready { .. }))
        .count();
    assert_eq!(ready, 0);
}
