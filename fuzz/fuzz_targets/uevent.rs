//! The kernel uevent parser of devfence-host (the host agent's netlink
//! listener) on arbitrary datagrams: a typed event or a clear error, within
//! its bounds, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devfence_host::uevent::fuzz(data);
});
