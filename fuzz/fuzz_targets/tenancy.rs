//! The tenancy file parser and its validation: never a panic on any input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devfence_policy::fuzz_tenancy(data);
});
