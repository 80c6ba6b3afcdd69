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
    // OpenSM trims only space, tab and newline: whatever is accepted holds no
    // other whitespace or non-ASCII outside a comment (issue 17 item 5).
    for line in text.split('\n') {
        let body = line.split('#').next().unwrap_or("");
        assert!(
            body.chars().all(|c| c == ' ' || c == '\t' || c.is_ascii_graphic()),
            "accepted a line OpenSM reads differently: {line:?}"
        );
        assert!(!line.contains('\r'), "accepted a CR: {line:?}");
    }
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
