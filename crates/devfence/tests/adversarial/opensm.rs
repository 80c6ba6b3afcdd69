//! Adversarial tests: the OpenSM backend's partitions file (issue 18 item 7).
//! The fabric tests of issue 17 are in `crates/devfence-fabric/tests/opensm_*.rs`.

use std::time::{Duration, Instant};

use devfence_fabric::opensm::partitions;
use devfence_fabric::ufm::decode::decode_pkeys;
use devfence_fabric::{Expectation, OpenSmSm, PartitionKey, SubnetManager, wait_verified};
use devfence_fabric_harness::{FabricSpec, in_fabric};
use devfence_model::{Guid, Membership};

const BASE: Guid = Guid(0x0002_c903_00f0_0001);

/// issue 18 item 7: one GUID listed as both full and limited in one partition is
/// refused by the OpenSM partitions parser exactly as by the UFM decoder — one
/// rule for both backends (a reader cannot tell which membership the SM applies).
#[test]
fn a_guid_full_and_limited_in_one_partition_is_refused_by_both_backends() {
    let e = partitions::parse("p=0x8001 : 0x0002c90300f00001=full, 0x0002c90300f00001=limited ;")
        .expect_err("the partitions parser refuses it");
    assert!(e.to_string().contains("both full and limited"), "{e}");
    assert!(e.to_string().contains("Hint:"), "{e}");
    let u = decode_pkeys(
        br#"{"0x0001": {"guids": [{"guid": "0002c90300f00001", "membership": "full"},
                                   {"guid": "0002c90300f00001", "membership": "limited"}]}}"#,
    )
    .expect_err("the UFM decoder refuses it");
    assert!(u.to_string().contains("both full and limited"), "{u}");
    // The same membership twice merges in both.
    partitions::parse("p=0x8001 : 0x0002c90300f00001=full, 0x0002c90300f00001=full ;")
        .expect("merges");
}

/// issue 18 item 7: an operator's line naming a GUID devfence issued
/// (`mine=0x8003 : <devfence's GUID>=full ;`) is a conflict, as
/// docs/fabric-opensm.md says: on the real OpenSM the next apply refuses it naming
/// the line, writes nothing and signals nothing.
#[test]
fn an_operator_line_naming_a_guid_devfence_issued_is_refused() {
    in_fabric(
        "opensm::an_operator_line_naming_a_guid_devfence_issued_is_refused",
        &FabricSpec::vfs(2, BASE),
        |f| {
            let sm = OpenSmSm::new(f.opensm_config());
            let a = PartitionKey::new(0x8001).expect("key");
            sm.stage_add(BASE, a, Membership::Full).expect("stage");
            let t = sm.apply().expect("apply");
            let exp = Expectation::after(t).grant(BASE, [(a, Membership::Full)]);
            wait_verified(&sm, &exp, Instant::now() + Duration::from_secs(10)).expect("granted");
            let path = f.dir().join("partitions.conf");
            let text = format!(
                "mine=0x8003 : {BASE}=full ;\n{}",
                std::fs::read_to_string(&path).expect("read")
            );
            std::fs::write(&path, &text).expect("operator edit");
            sm.stage_add(Guid(BASE.0 + 2), a, Membership::Full)
                .expect("stage");
            let e = sm.apply().expect_err("a conflict");
            let s = e.to_string();
            assert!(
                s.contains("line 1") && s.contains("devfence manages") && s.contains("Hint"),
                "{s}"
            );
            assert_eq!(
                std::fs::read_to_string(&path).expect("read"),
                text,
                "nothing written"
            );
        },
    );
}
