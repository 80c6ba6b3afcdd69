//! The libvirt domain XML reader of the qemu hook: never a panic, and whatever
//! parses is decidable (and the decision's refusal is one line) — with devices
//! Free, and Ready for one tenant under both policies for unidentified domains.
#![no_main]
use devfence_engine::DeviceState;
use devfence_engine::libvirt::{Unidentified, decide_prepare, decide_prepare_with, parse_domain};
use devfence_model::TenantId;
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
        let Ok(acme) = "acme".parse::<TenantId>() else {
            return;
        };
        let ready = DeviceState::Ready {
            tenant: acme,
            vm: None,
        };
        for policy in [
            Unidentified::Refuse,
            Unidentified::SingleTenant { tenants: 1 },
            Unidentified::SingleTenant { tenants: 2 },
        ] {
            if let Err(r) = decide_prepare_with(&spec, &mut |_| Ok(Some(ready.clone())), policy) {
                assert!(!r.to_string().contains('\n'));
            }
        }
    }
});
