//! OpenSM partitions files: the parser refuses what it cannot read with an error
//! naming the line and never panics; what it accepts, devfence's block rendered
//! into it reads back as the same membership, and the operator's part is kept.
#![no_main]
use devfence_fabric::opensm::partitions::{parse, render_block, with_block};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = parse(text) else {
        return;
    };
    let _ = file.explicit_guids();
    let Ok(map) = file.managed() else {
        return;
    };
    let out = with_block(text, &file, &render_block(&map));
    // Rewriting can only fail as a conflict with the operator's part (a P_Key
    // devfence also renders), never by misreading its own block.
    if let Ok(again) = parse(&out) {
        assert_eq!(again.managed().expect("devfence's own block reads back"), map);
        assert_eq!(again.operator_bases(), file.operator_bases());
    }
});
