//! The rules on arbitrary (but well-typed) inventories and tenancies: whatever the
//! host looks like, `check` reports findings and never panics.
#![no_main]
use devfence_model::{Inventory, Tenancy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut it = serde_json::Deserializer::from_slice(data).into_iter::<serde_json::Value>();
    let (Some(Ok(inv)), Some(Ok(ten))) = (it.next(), it.next()) else { return };
    let (Ok(inv), Ok(ten)) = (
        serde_json::from_value::<Inventory>(inv),
        serde_json::from_value::<Tenancy>(ten),
    ) else {
        return;
    };
    let _ = devfence_policy::check(&inv, &ten);
});
