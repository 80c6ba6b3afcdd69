//! The libvirt domain XML reader of the qemu hook: never a panic, and whatever
//! parses is decidable (and the decision's refusal is one line).
#![no_main]
use devfence_engine::DeviceState;
use devfence_engine::domain::{decide_prepare, parse_domain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = parse_domain(s) {
        assert!(!spec.name.is_empty() && spec.name.len() <= 256);
        if let Err(r) = decide_prepare(&spec, &mut |_| Ok(Some(DeviceState::Free))) {
            assert!(!r.to_string().contains('\n'));
        }
    }
});
