//! Root containment (issue 18 item 6): random host trees with links in and out
//! of the root, FIFOs, huge files and loops → the inventory never reads outside
//! the root, never hangs, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devfence_host::fuzzing::root_containment(data);
});
