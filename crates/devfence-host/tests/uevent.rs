//! The uevent listener against the running kernel (issue 12 item 4): as root,
//! writing `change UUID KEY=VALUE` to a device's `uevent` file in sysfs makes
//! the kernel emit a synthetic `change` event for it, tagged with our UUID
//! (`SYNTH_UUID`) and `SYNTH_ARG_KEY=VALUE`; the listener must receive it
//! from the kernel and parse it. The UUID tells our event from anyone
//! else's (other tests, udev) on the same machine. Waiting is bounded by a
//! deadline; nothing asserts a duration.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use devfence_host::uevent::{Received, UeventAction, UeventListener};

fn uuid() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Triggers a synthetic `change` on `sysfs_dir`/uevent and returns the event
/// the listener receives for it.
fn trigger_and_receive(sysfs_dir: &str) -> devfence_host::uevent::Uevent {
    let mut l = UeventListener::open(Duration::from_millis(200)).expect("listen");
    let id = uuid();
    std::fs::write(
        format!("{sysfs_dir}/uevent"),
        format!("change {id} DEVFENCE=listener"),
    )
    .expect("write the uevent file (the test runs as root)");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "no uevent for {sysfs_dir} with SYNTH_UUID {id} within the deadline"
        );
        match l.recv().expect("recv") {
            Received::Event(e) if e.var("SYNTH_UUID") == Some(id.as_str()) => return e,
            _ => {}
        }
    }
}

#[test]
fn a_real_kernel_uevent_is_received_and_parsed() {
    let e = trigger_and_receive("/sys/class/mem/null");
    assert_eq!(e.action, UeventAction::Change);
    assert_eq!(e.devpath, "/devices/virtual/mem/null");
    assert_eq!(e.subsystem.as_deref(), Some("mem"));
    assert_eq!(e.var("SYNTH_ARG_DEVFENCE"), Some("listener"));
    assert!(e.seqnum.is_some(), "{e:?}");
    assert!(!e.is_relevant(), "a memory device is not devfence's: {e:?}");
}

/// A PCI function's event, as the agent's watcher receives it: relevant,
/// with its driver and slot. (The machines the tests run on are VMs with
/// PCI functions; a machine without one fails here, never skips.)
#[test]
fn a_real_pci_uevent_is_relevant() {
    let dev = std::fs::read_dir("/sys/bus/pci/devices")
        .expect("/sys/bus/pci/devices")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .min()
        .expect("a PCI function on this machine");
    let e = trigger_and_receive(&format!("/sys/bus/pci/devices/{dev}"));
    assert_eq!(e.action, UeventAction::Change);
    assert_eq!(e.subsystem.as_deref(), Some("pci"));
    assert_eq!(e.var("PCI_SLOT_NAME"), Some(dev.as_str()));
    assert!(e.devpath.ends_with(&format!("/{dev}")), "{e:?}");
    let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{dev}/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    assert_eq!(e.driver, driver);
    assert!(e.is_relevant(), "{e:?}");
}
