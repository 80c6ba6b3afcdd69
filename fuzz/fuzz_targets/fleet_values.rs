//! Values and keys read back from etcd, as bytes: the fleet store's parsers
//! refuse what they cannot read with an error and never panic; what they
//! accept is within bounds and re-encodes to bytes that parse to the same
//! record (the form a transaction compares byte for byte).
#![no_main]
use devfence_fleet::value::{
    self, CursorRecord, DesiredRecord, GuidIndexRecord, GuidRange, GuidRecord, HostRecord,
    ObservedRecord, PkeyRecord, Record, TenantRecord, MAX_PKEYS_PER_PORT, MAX_VALUE_BYTES,
};
use libfuzzer_sys::fuzz_target;

fn round_trip<T: Record + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<T> {
    let v = value::parse::<T>(data).ok()?;
    assert!(data.len() <= MAX_VALUE_BYTES);
    let again = value::parse::<T>(&value::encode(&v)).expect("what devfence writes parses");
    assert_eq!(again, v);
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    value::parse_all(data);
    round_trip::<GuidRecord>(data);
    round_trip::<GuidIndexRecord>(data);
    if let Some(r) = round_trip::<GuidRange>(data) {
        assert!(r.first <= r.last && !r.first.is_reserved() && !r.last.is_reserved());
    }
    round_trip::<CursorRecord>(data);
    round_trip::<PkeyRecord>(data);
    round_trip::<TenantRecord>(data);
    round_trip::<HostRecord>(data);
    if let Some(d) = round_trip::<DesiredRecord>(data) {
        assert!(d.pkeys.len() <= MAX_PKEYS_PER_PORT);
        assert!(d.pkeys.iter().all(|p| !p.is_empty_slot()));
    }
    if let Some(o) = round_trip::<ObservedRecord>(data) {
        assert!(o.pkeys.len() <= MAX_PKEYS_PER_PORT && o.desired_revision >= 0);
    }
    if let Ok(g) = value::guid_from_key(data) {
        assert!(data.ends_with(value::guid_segment(g).as_bytes()));
    }
    if let Ok(p) = value::pkey_from_key(data) {
        assert!(p.base() != 0 && p.0 <= 0x7fff);
    }
});
