//! The device-state envelope parser and admission decision: never a panic on any
//! input; a header that decodes re-encodes to the same bytes; a valid envelope
//! with any byte changed is refused (`devfence_seal::fuzz_envelope`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devfence_seal::fuzz_envelope(data);
});
