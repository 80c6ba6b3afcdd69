//! UFM's answers, as bytes off the wire: the decoders of the UFM backend refuse
//! what they cannot read with an error and never panic; what they accept is
//! consistent (every partition a real one, every GUID's P_Keys found again in
//! its partitions).
#![no_main]
use devfence_fabric::ufm::{decode_last_updated, decode_pkeys, decode_version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_version(data);
    let _ = decode_last_updated(data);
    if let Ok(listing) = decode_pkeys(data) {
        for (pkey, members) in listing.partitions() {
            assert_eq!(pkey.0 & 0x8000, 0, "partitions are keyed by base");
            assert_ne!(pkey.base(), 0, "no empty P_Key");
            for (guid, m) in members {
                assert!(listing.pkeys_of(*guid).contains(&pkey.with_membership(*m)));
            }
        }
    }
});
