//! Fabric posture (`check --fabric`'s findings) against a real OpenSM on an
//! ibsim fabric: the state comes from OpenSM — its partitions file as parsed,
//! its SA's P_Key tables, its log's sweep outcome.
//!
//! issue 17 item 7 / issue 18 item 7: an operator's statement that puts tenant
//! ports into a partition no tenant owns, or one partition across tenants, is an
//! error finding naming the statement (file:line). issue 17 item 5: a sweep that
//! ended in a PARSE ERROR is an error finding even when no tenant port exists.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use devfence_fabric::opensm::OpenSmSm;
use devfence_fabric::opensm::partitions::render_block;
use devfence_fabric::posture::{LedgerGuid, LedgerView, posture};
use devfence_fabric::{MembershipMap, PartitionKey, Programmed, SubnetManager};
use devfence_fabric_harness::{Fabric, FabricSpec, in_fabric};
use devfence_model::{Finding, Guid, Membership, PKey, Severity};

const BASE: Guid = Guid(0x0002_c903_00f1_0001);
const ACME: Guid = BASE;
const GLOBEX: Guid = Guid(BASE.0 + 2);
const DEADLINE: Duration = Duration::from_secs(10);

/// The operator's lines, above devfence's block (lines 1 and 2 of the file).
const OPERATOR: &str = "open=0x9003 : ALL=full ;\nshared=0x8500, ipoib : ALL_CAS=full ;\n";

fn tenants_block() -> String {
    let mut m = MembershipMap::new();
    m.insert(ACME, PartitionKey::new(0x0001).unwrap(), Membership::Full)
        .unwrap();
    m.insert(GLOBEX, PartitionKey::new(0x0002).unwrap(), Membership::Full)
        .unwrap();
    render_block(&m)
}

fn spec() -> FabricSpec {
    let mut s = FabricSpec::vfs(2, BASE);
    s.partitions = format!("{OPERATOR}{}", tenants_block());
    s
}

fn ledger() -> LedgerView {
    LedgerView {
        tenant_pkeys: [(1, "acme".to_string()), (2, "globex".to_string())]
            .into_iter()
            .collect(),
        guids: vec![
            LedgerGuid {
                guid: ACME,
                device: "0000:3b:00.1".into(),
                tenant: Some("acme".into()),
            },
            LedgerGuid {
                guid: GLOBEX,
                device: "0000:3b:00.2".into(),
                tenant: Some("globex".into()),
            },
        ],
    }
}

fn findings(sm: &OpenSmSm, ledger: &LedgerView) -> Vec<Finding> {
    let guids: Vec<Guid> = ledger.guids.iter().map(|g| g.guid).collect();
    let observed = sm.observe(&guids);
    let configured = sm.configured_members();
    posture(
        sm.backend(),
        configured.as_ref().map(Option::as_deref),
        observed.as_ref(),
        ledger,
    )
}

#[test]
fn operator_partitions_over_tenant_ports_are_found_and_name_the_line() {
    in_fabric(
        "operator_partitions_over_tenant_ports_are_found_and_name_the_line",
        &spec(),
        |f: &Fabric| {
            let sm = OpenSmSm::new(f.opensm_config());
            let file = f.opensm_config().partitions_file.display().to_string();
            // OpenSM really put both ports in both operator partitions.
            let o = sm.observe(&[ACME, GLOBEX]).expect("observe");
            for g in [ACME, GLOBEX] {
                let Programmed::Present { pkeys, .. } = &o.ports[&g].programmed else {
                    panic!("{g} absent: {o:?}");
                };
                assert!(
                    pkeys.contains(&PKey(0x9003)) && pkeys.contains(&PKey(0x8500)),
                    "{g}: {pkeys:?}"
                );
            }
            let f = findings(&sm, &ledger());
            let show: Vec<String> = f
                .iter()
                .map(|x| format!("{} {} | {} | {}", x.rule, x.subject, x.message, x.hint))
                .collect();
            for (base, line) in [("0x1003", 1), ("0x0500", 2)] {
                let at = format!("{file}:{line}");
                for g in [ACME, GLOBEX] {
                    let hit = f.iter().find(|x| {
                        x.rule == "FAB-FOREIGN-PARTITION"
                            && x.subject == g.to_string()
                            && x.message.contains(base)
                    });
                    let hit = hit.unwrap_or_else(|| panic!("{g} in {base}: {show:#?}"));
                    assert_eq!(hit.severity, Severity::Error);
                    assert!(hit.hint.contains(&at), "{hit:?}");
                    assert!(hit.hint.contains("operator's statement"), "{hit:?}");
                    assert!(hit.evidence.iter().any(|e| e.path == at), "{hit:?}");
                }
                let shared = f
                    .iter()
                    .find(|x| x.rule == "FAB-SHARED-PARTITION" && x.subject == base)
                    .unwrap_or_else(|| panic!("{base} shared: {show:#?}"));
                assert!(
                    shared.message.contains("acme") && shared.message.contains("globex"),
                    "{shared:?}"
                );
                assert!(shared.hint.contains(&at), "{shared:?}");
            }
            assert!(
                f.iter().all(|x| x.rule != "FAB-SWEEP-FAILED"),
                "the file is valid: {show:#?}"
            );
        },
    );
}

#[test]
fn a_parse_error_sweep_is_an_error_without_tenant_ports() {
    in_fabric(
        "a_parse_error_sweep_is_an_error_without_tenant_ports",
        &FabricSpec::vfs(2, BASE),
        |f: &Fabric| {
            let sm = OpenSmSm::new(f.opensm_config());
            let empty = LedgerView::default();
            let clean = findings(&sm, &empty);
            assert!(clean.is_empty(), "{clean:?}");
            // An operator's CRLF line, which OpenSM refuses with a PARSE ERROR.
            let cfg = f.opensm_config();
            let mut text = std::fs::read_to_string(&cfg.partitions_file).unwrap();
            text.insert_str(0, "odd=0x0042 : ALL=limited ;\r\n");
            std::fs::write(&cfg.partitions_file, text).unwrap();
            let before = f.subnet_up_count();
            f.hup().unwrap();
            f.wait_subnet_up(before, DEADLINE).unwrap();
            let log = std::fs::read_to_string(f.dir().join("opensm.log")).unwrap();
            assert!(log.contains("PARSE ERROR"), "OpenSM refused the file");
            let found = findings(&sm, &empty);
            let errors: Vec<&Finding> = found
                .iter()
                .filter(|x| x.severity == Severity::Error)
                .collect();
            assert!(
                errors
                    .iter()
                    .any(|x| x.rule == "FAB-SWEEP-FAILED" || x.rule == "FAB-UNVERIFIED"),
                "{found:?}"
            );
            // When devfence can read the SM at all, the failed sweep is named.
            if sm.observe(&[]).is_ok() {
                let sweep = errors
                    .iter()
                    .find(|x| x.rule == "FAB-SWEEP-FAILED")
                    .unwrap_or_else(|| panic!("{found:?}"));
                assert!(sweep.message.contains("PARSE ERROR"), "{sweep:?}");
                assert!(sweep.hint.contains("partitions file"), "{sweep:?}");
            }
        },
    );
}
