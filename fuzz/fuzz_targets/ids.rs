//! The identifier parsers (BDF, GUID, P_Key, APQN, AP mask, UUID, tenant, device):
//! never a panic, and whatever parses prints back to a form that parses to the same value.
#![no_main]
use devfence_model::{ApMask, Apqn, Bdf, DeviceId, Guid, MdevUuid, PKey, TenantId};
use libfuzzer_sys::fuzz_target;

fn round_trip<T: std::str::FromStr + std::fmt::Display + PartialEq + std::fmt::Debug>(s: &str) {
    if let Ok(v) = s.parse::<T>() {
        let again: T = match v.to_string().parse() {
            Ok(x) => x,
            Err(_) => panic!("{v:?} printed as {} which does not parse", v),
        };
        assert_eq!(again, v);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    round_trip::<Bdf>(s);
    round_trip::<Guid>(s);
    round_trip::<PKey>(s);
    round_trip::<Apqn>(s);
    round_trip::<ApMask>(s);
    round_trip::<MdevUuid>(s);
    round_trip::<TenantId>(s);
    round_trip::<DeviceId>(s);
});
