//! The load path of `devfence state load` through the VFIO migration interface:
//! the payload's size cap is checked before the device is touched, the data
//! fd is written and read back in any chunking, a refused stream leaves the
//! device RUNNING, the capped reader never returns more than its cap
//! (`devfence_host::migration::fuzz_load`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devfence_host::migration::fuzz_load(data);
});
