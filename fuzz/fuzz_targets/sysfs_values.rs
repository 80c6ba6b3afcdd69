//! Every sysfs value parser of devfence-host on arbitrary bytes: never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devfence_host::parse::fuzz_all(data);
});
