//! SA replies off the wire: the MAD decoders refuse what does not fit with an
//! error and never panic, whatever the lengths and offsets claim.
#![no_main]
use devfence_fabric::opensm::mad::{NODE_RECORD_LEN, NodeRecord, PKEY_RECORD_LEN, PKeyBlock, SaReply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for len in [NODE_RECORD_LEN, PKEY_RECORD_LEN] {
        if let Ok(r) = SaReply::decode(data, len) {
            for rec in &r.records {
                assert_eq!(rec.len(), len);
                let _ = NodeRecord::decode(rec);
                if let Ok(b) = PKeyBlock::decode(rec) {
                    assert!(b.pkeys().iter().all(|k| k.0 & 0x7fff != 0));
                }
            }
        }
    }
});
