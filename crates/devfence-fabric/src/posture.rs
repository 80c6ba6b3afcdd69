//! Fabric posture: what `devfence check --fabric` finds by comparing the SM's
//! configuration and read-back with the ledger.
//!
//! | rule | severity | finds |
//! |---|---|---|
//! | `FAB-DEFAULT-FULL` | error | a port with *full* membership of the default partition (configured for all ports or for a tenant's GUID, or seen in a tenant port's table): it can talk to every port of the fabric |
//! | `FAB-UNKNOWN-MEMBER` | error | a member of a tenant's P_Key that the ledger does not give that tenant (a wildcard, a GUID of no device, another tenant's GUID), configured or seen in a port's table |
//! | `FAB-GUID-MISSING` | warning | a GUID the ledger issued to a device held by a tenant that the fabric does not know (the VM will have no IB; nothing leaks) |
//! | `FAB-FOREIGN-PARTITION` | error | a tenant port (a GUID the ledger issued to a device a tenant holds) is a member of a partition no tenant owns — an operator's `open=0x9003 : ALL=full ;`, or a P_Key in the port's table that nothing devfence knows put there |
//! | `FAB-SHARED-PARTITION` | error | one partition (any P_Key but the default one, either membership) has ports of two or more tenants, configured or in the ports' tables |
//! | `FAB-SWEEP-FAILED` | error | the SM's last sweep ended with errors (OpenSM's `PARSE ERROR`: it then runs its default configuration, every port a full member of the default partition) — reported whether or not a tenant port exists |
//! | `FAB-UNVERIFIED` | error | the SM could not be read, or is not master: nothing above could be checked |
//!
//! Where a configured statement is the cause, its source (for OpenSM the
//! partitions file and line, `file:line`) is in the evidence and named in the
//! hint: the operator's line is the thing to fix, not the SM.

use std::collections::{BTreeMap, BTreeSet};

use devfence_model::{Evidence, Finding, Guid, PKey, Severity};

use crate::{FabricError, Observation, Programmed, SmState, SweepOutcome};

/// One rule of `check --fabric`, for `devfence rules`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct FabricRule {
    /// The rule id findings carry.
    pub id: &'static str,
    /// The severity of its findings.
    pub severity: Severity,
    /// What it finds.
    pub summary: &'static str,
}

/// Every rule [`posture`] reports, in the order of the docs.
pub const RULES: &[FabricRule] = &[
    FabricRule {
        id: "FAB-DEFAULT-FULL",
        severity: Severity::Error,
        summary: "(check --fabric) A port is configured, or seen in a tenant port's table, as a \
                  full member of the default partition (0xffff): it can talk to every port.",
    },
    FabricRule {
        id: "FAB-UNKNOWN-MEMBER",
        severity: Severity::Error,
        summary: "(check --fabric) A tenant's partition has a member the ledger does not give \
                  that tenant: a wildcard, a GUID it never issued, another tenant's GUID.",
    },
    FabricRule {
        id: "FAB-FOREIGN-PARTITION",
        severity: Severity::Error,
        summary: "(check --fabric) A tenant port is a member of a partition no tenant owns (an \
                  operator's statement such as `open=0x9003 : ALL=full ;`, or a P_Key the SM \
                  put in its table); the finding names the statement (file:line) where one is \
                  the cause.",
    },
    FabricRule {
        id: "FAB-SHARED-PARTITION",
        severity: Severity::Error,
        summary: "(check --fabric) One partition (P_Key, either membership; not the default \
                  one) has ports of two or more tenants, configured or in the ports' tables.",
    },
    FabricRule {
        id: "FAB-SWEEP-FAILED",
        severity: Severity::Error,
        summary: "(check --fabric) The SM's last sweep ended with errors (OpenSM's PARSE ERROR \
                  makes every port a full member of the default partition), whether or not a \
                  tenant port exists.",
    },
    FabricRule {
        id: "FAB-GUID-MISSING",
        severity: Severity::Warning,
        summary: "(check --fabric) A GUID issued to a device a tenant holds is not on the \
                  fabric (the VM has no IB; nothing leaks).",
    },
    FabricRule {
        id: "FAB-UNVERIFIED",
        severity: Severity::Error,
        summary: "(check --fabric) The SM could not be read, or is not master: no fabric \
                  posture could be verified.",
    },
    FabricRule {
        id: "FAB-RESTORED",
        severity: Severity::Warning,
        summary: "(check --fabric) The OpenSM backend restored the partitions file after OpenSM \
                  could not parse it (an error while the re-verification after it has not \
                  passed); find who wrote the refused file, kept beside it as \
                  .devfence-rejected.",
    },
];

/// Who a configured entry names.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Member {
    /// One port GUID.
    Guid(Guid),
    /// A keyword naming many ports (`ALL`, `ALL_CAS`, …).
    Wildcard(String),
}

/// One membership as the SM's configuration states it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Configured {
    /// The P_Key with its membership bit (full: `0x8000` set).
    pub pkey: PKey,
    /// Who.
    pub member: Member,
    /// Where it is stated (e.g. `/etc/opensm/partitions.conf:12`).
    pub source: String,
}

/// One GUID the ledger issued, and to whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerGuid {
    /// The GUID.
    pub guid: Guid,
    /// The device it was issued to.
    pub device: String,
    /// The tenant holding the device (`None`: the device is not held).
    pub tenant: Option<String>,
}

/// What the ledger says about the fabric.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerView {
    /// P_Key base → the tenant owning it.
    pub tenant_pkeys: BTreeMap<u16, String>,
    /// The GUIDs issued and not retired.
    pub guids: Vec<LedgerGuid>,
}

fn finding(
    rule: &str,
    severity: Severity,
    subject: String,
    message: String,
    evidence: Vec<Evidence>,
    hint: &str,
) -> Finding {
    Finding {
        rule: rule.into(),
        severity,
        subject: subject.into(),
        message,
        evidence,
        hint: hint.into(),
    }
}

/// The posture findings for one SM.
///
/// `configured`: the SM's configured memberships, where the backend can list them
/// (`Ok(None)`: it cannot; `Err`: listing them failed, itself a finding);
/// `observed`: one observation of every ledger GUID (or why it failed).
#[must_use]
pub fn posture(
    backend: &str,
    configured: Result<Option<&[Configured]>, &FabricError>,
    observed: Result<&Observation, &FabricError>,
    ledger: &LedgerView,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let by_guid: BTreeMap<Guid, &LedgerGuid> = ledger.guids.iter().map(|g| (g.guid, g)).collect();
    let owner = |pkey: PKey| ledger.tenant_pkeys.get(&pkey.base());
    let configured = match configured {
        Ok(c) => c,
        Err(e) => {
            out.push(finding(
                "FAB-UNVERIFIED",
                Severity::Error,
                backend.into(),
                format!("the {backend} SM's configuration could not be read: {e}"),
                Vec::new(),
                "check the SM's configuration (for OpenSM its partitions file); no configured membership could be verified",
            ));
            None
        }
    };
    out.extend(sweep_and_role(backend, configured, observed));
    out.extend(tenant_memberships(backend, configured, observed, ledger));
    if let Some(entries) = configured {
        for e in entries {
            let ev = vec![Evidence::new(
                e.source.clone(),
                format!("{} {}", e.pkey, member_text(&e.member)),
            )];
            if e.pkey.base() == PKey::DEFAULT_BASE && e.pkey.0 & 0x8000 != 0 {
                let tenant_port = match &e.member {
                    Member::Wildcard(_) => true,
                    Member::Guid(g) => by_guid.contains_key(g),
                };
                if tenant_port {
                    out.push(finding(
                        "FAB-DEFAULT-FULL",
                        Severity::Error,
                        member_text(&e.member),
                        format!("{} is configured as a full member of the default partition at the {backend} SM", member_text(&e.member)),
                        ev.clone(),
                        "make non-SM ports limited members of the default partition (devfence renders `ALL=limited, SELF=full`)",
                    ));
                }
            }
            let Some(tenant) = owner(e.pkey) else {
                continue;
            };
            let known = match &e.member {
                Member::Guid(g) => by_guid
                    .get(g)
                    .is_some_and(|l| l.tenant.as_deref() == Some(tenant.as_str())),
                Member::Wildcard(_) => false,
            };
            if !known {
                let why = match &e.member {
                    Member::Wildcard(w) => format!("the wildcard {w}"),
                    Member::Guid(g) => match by_guid.get(g) {
                        Some(l) => match &l.tenant {
                            Some(t) => format!("{g}, issued to {} of tenant {t}", l.device),
                            None => format!("{g}, issued to {} which no tenant holds", l.device),
                        },
                        None => format!("{g}, which the ledger never issued"),
                    },
                };
                out.push(finding(
                    "FAB-UNKNOWN-MEMBER",
                    Severity::Error,
                    format!("{:#06x}", e.pkey.base()),
                    format!("tenant {tenant}'s partition {:#06x} has a member the ledger does not give it: {why}", e.pkey.base()),
                    ev,
                    "remove the entry at the SM (or let devfence render its block again); if the port is the tenant's, assign its device with `devfence assign`",
                ));
            }
        }
    }
    match observed {
        Err(e) => out.push(finding(
            "FAB-UNVERIFIED",
            Severity::Error,
            backend.into(),
            format!("the {backend} SM could not be read: {e}"),
            Vec::new(),
            "check the SM (`devfence status`); no fabric posture could be verified",
        )),
        Ok(o) => {
            for l in &ledger.guids {
                let Some(view) = o.ports.get(&l.guid) else {
                    out.push(finding(
                        "FAB-UNVERIFIED",
                        Severity::Error,
                        l.guid.to_string(),
                        format!(
                            "the {backend} SM reported nothing for {} (SM {})",
                            l.guid, o.status.state
                        ),
                        Vec::new(),
                        "check the SM (`devfence status`)",
                    ));
                    continue;
                };
                match &view.programmed {
                    Programmed::Absent => {
                        if l.tenant.is_some() {
                            out.push(finding(
                                "FAB-GUID-MISSING",
                                Severity::Warning,
                                l.guid.to_string(),
                                format!("{} (issued to {}) is not on the fabric", l.guid, l.device),
                                vec![Evidence::new(format!("{backend}:port {}", l.guid), "(absent)")],
                                "check the VF's link and its GUID (`devfence inventory`); the VM will have no IB until the port is up",
                            ));
                        }
                    }
                    Programmed::Present { lid, pkeys } => {
                        let table: Vec<String> = pkeys.iter().map(ToString::to_string).collect();
                        let ev = vec![Evidence::new(
                            format!(
                                "{backend}:port {} lid {}",
                                l.guid,
                                lid.map_or_else(|| "?".into(), |x| x.to_string())
                            ),
                            table.join(" "),
                        )];
                        if pkeys.contains(&PKey(0xffff)) {
                            out.push(finding(
                                "FAB-DEFAULT-FULL",
                                Severity::Error,
                                l.guid.to_string(),
                                format!("{} (issued to {}) holds full membership of the default partition (0xffff)", l.guid, l.device),
                                ev.clone(),
                                "OpenSM does this after a partitions parse error; check the SM's log, then `devfence check --fabric` again",
                            ));
                        }
                        for k in pkeys {
                            if let Some(t) = owner(*k)
                                && l.tenant.as_deref() != Some(t.as_str())
                            {
                                out.push(finding(
                                    "FAB-UNKNOWN-MEMBER",
                                    Severity::Error,
                                    format!("{:#06x}", k.base()),
                                    format!(
                                        "{} (issued to {}, tenant {}) holds tenant {t}'s P_Key {k}",
                                        l.guid,
                                        l.device,
                                        l.tenant.as_deref().unwrap_or("none")
                                    ),
                                    ev.clone(),
                                    "release the device (`devfence release`) so devfence scrubs its membership",
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// `FAB-SWEEP-FAILED` and a not-master `FAB-UNVERIFIED`: about the SM itself,
/// whatever the ledger holds.
fn sweep_and_role(
    backend: &str,
    configured: Option<&[Configured]>,
    observed: Result<&Observation, &FabricError>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let Ok(o) = observed else {
        return out;
    };
    if o.status.state != SmState::Master {
        out.push(finding(
            "FAB-UNVERIFIED",
            Severity::Error,
            backend.into(),
            format!(
                "the {backend} SM is {}, not master: it answers for no port, so no fabric posture could be verified",
                o.status.state
            ),
            vec![Evidence::new(
                format!("{backend}:state"),
                o.status.state.to_string(),
            )],
            "check the SM (`devfence status`)",
        ));
    }
    if let SweepOutcome::Errors(e) = &o.status.sweep {
        let parse = e.contains("PARSE ERROR") || e.contains("Partition configuration");
        let file = configured
            .and_then(|c| c.first())
            .and_then(|c| c.source.rsplit_once(':').map(|(f, _)| f.to_string()));
        let hint = match (backend, parse) {
            ("opensm", true) => format!(
                "OpenSM could not parse its partitions file{} and runs its default configuration, where every port is a full member of the default partition: fix the statement its log names, then SIGHUP OpenSM (devfence restores its last good file only when the refused one is its own)",
                file.map(|f| format!(" ({f})")).unwrap_or_default()
            ),
            ("ufm", _) => "UFM reports what it was asked, not what the ports took: give the UFM backend a port reader (the SA) so the ports' acknowledged tables are read, or set trust_configured_view = true knowingly; until then no gate opens".into(),
            _ => "check the SM's log; no gate opens on a failed sweep, and the ports' tables may not be what the SM's configuration says".into(),
        };
        out.push(finding(
            "FAB-SWEEP-FAILED",
            Severity::Error,
            backend.into(),
            format!(
                "the {backend} SM's last sweep ({}) ended with errors: {e}",
                o.status.generation
            ),
            vec![Evidence::new(format!("{backend}:sweep"), e.clone())],
            &hint,
        ));
    }
    out
}

/// Where a tenant port's membership of a partition is seen.
#[derive(Default)]
struct Seen {
    /// Configured statements (source, e.g. `file:line`).
    statements: BTreeSet<String>,
    evidence: Vec<Evidence>,
}

/// `FAB-FOREIGN-PARTITION` and `FAB-SHARED-PARTITION`: every partition but the
/// default one that holds a tenant port, from the SM's configuration (a wildcard
/// names every tenant port) and the ports' tables.
fn tenant_memberships(
    backend: &str,
    configured: Option<&[Configured]>,
    observed: Result<&Observation, &FabricError>,
    ledger: &LedgerView,
) -> Vec<Finding> {
    let tenant_ports: BTreeMap<Guid, &LedgerGuid> = ledger
        .guids
        .iter()
        .filter(|g| g.tenant.is_some())
        .map(|g| (g.guid, g))
        .collect();
    // base → port → where.
    let mut seen: BTreeMap<u16, BTreeMap<Guid, Seen>> = BTreeMap::new();
    for e in configured.unwrap_or_default() {
        let base = e.pkey.base();
        if base == PKey::DEFAULT_BASE {
            continue;
        }
        let ports: Vec<Guid> = match &e.member {
            Member::Guid(g) if tenant_ports.contains_key(g) => vec![*g],
            Member::Guid(_) => Vec::new(),
            Member::Wildcard(_) => tenant_ports.keys().copied().collect(),
        };
        for g in ports {
            let s = seen.entry(base).or_default().entry(g).or_default();
            s.statements.insert(e.source.clone());
            s.evidence.push(Evidence::new(
                e.source.clone(),
                format!("{} {}", e.pkey, member_text(&e.member)),
            ));
        }
    }
    if let Ok(o) = observed {
        for g in tenant_ports.keys() {
            if let Some(Programmed::Present { lid, pkeys }) = o.ports.get(g).map(|v| &v.programmed)
            {
                let table: Vec<String> = pkeys.iter().map(ToString::to_string).collect();
                for k in pkeys {
                    if k.base() == PKey::DEFAULT_BASE {
                        continue;
                    }
                    seen.entry(k.base())
                        .or_default()
                        .entry(*g)
                        .or_default()
                        .evidence
                        .push(Evidence::new(
                            format!(
                                "{backend}:port {g} lid {}",
                                lid.map_or_else(|| "?".into(), |x| x.to_string())
                            ),
                            table.join(" "),
                        ));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (base, ports) in &seen {
        let owned = ledger.tenant_pkeys.contains_key(base);
        let statements: BTreeSet<&String> = ports.values().flat_map(|s| &s.statements).collect();
        let fix = fix_hint(backend, &statements);
        if !owned {
            for (g, s) in ports {
                let l = tenant_ports[g];
                out.push(finding(
                    "FAB-FOREIGN-PARTITION",
                    Severity::Error,
                    g.to_string(),
                    format!(
                        "{g} (issued to {}, tenant {}) is a member of partition {base:#06x}, which no tenant owns{}",
                        l.device,
                        l.tenant.as_deref().unwrap_or("none"),
                        stated_at(&s.statements)
                    ),
                    s.evidence.clone(),
                    &fix,
                ));
            }
        }
        let tenants: BTreeSet<&str> = ports
            .keys()
            .filter_map(|g| tenant_ports[g].tenant.as_deref())
            .collect();
        if tenants.len() > 1 {
            let mut who: Vec<String> = Vec::new();
            for t in &tenants {
                let mine: Vec<String> = ports
                    .keys()
                    .filter(|g| tenant_ports[g].tenant.as_deref() == Some(*t))
                    .map(|g| format!("{g} ({})", tenant_ports[g].device))
                    .collect();
                who.push(format!("{t}: {}", mine.join(", ")));
            }
            out.push(finding(
                "FAB-SHARED-PARTITION",
                Severity::Error,
                format!("{base:#06x}"),
                format!(
                    "partition {base:#06x} holds ports of {} tenants ({}){}: their VMs share one isolation domain",
                    tenants.len(),
                    who.join("; "),
                    stated_at(&statements.iter().map(|s| (*s).clone()).collect())
                ),
                ports.values().flat_map(|s| s.evidence.clone()).collect(),
                &fix,
            ));
        }
    }
    out
}

/// The configured statements that make a granted port a member of a partition
/// it is not granted (the default one aside): where a failed "exactly" (question
/// 2) comes from when the SM's configuration, not the SM, is the cause. Their
/// sources (for OpenSM `file:line`), each once, in order.
#[must_use]
pub fn stray_statements(configured: &[Configured], grants: &[crate::Grant]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for g in grants {
        let granted: BTreeSet<u16> = g.partitions.keys().map(|p| p.base()).collect();
        for e in configured {
            let base = e.pkey.base();
            let names = match &e.member {
                Member::Guid(x) => *x == g.guid,
                Member::Wildcard(_) => true,
            };
            if names
                && base != PKey::DEFAULT_BASE
                && !granted.contains(&base)
                && !out.contains(&e.source)
            {
                out.push(e.source.clone());
            }
        }
    }
    out
}

fn stated_at(statements: &BTreeSet<String>) -> String {
    if statements.is_empty() {
        String::new()
    } else {
        format!(
            " (stated at {})",
            statements.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

/// The hint: the operator's statement where one is the cause, else the SM.
fn fix_hint(backend: &str, statements: &BTreeSet<&String>) -> String {
    if statements.is_empty() {
        return format!(
            "no configured statement names the port here: the {backend} SM's state holds the P_Key anyway (a stale table, another SM, or a port that set its own); check the SM, then release the device (`devfence release`) so devfence scrubs it"
        );
    }
    let at: Vec<&str> = statements.iter().map(|s| s.as_str()).collect();
    let whose = if backend == "opensm" {
        "an operator's statement in OpenSM's partitions file, outside devfence's block"
    } else {
        "the SM's partition configuration"
    };
    format!(
        "the cause is {whose} at {}: take tenant ports out of it (name the ports a wildcard such as ALL or ALL_CAS is meant for, or remove the statement); a partition belongs to one tenant, and only the default one is shared, as limited",
        at.join(", ")
    )
}

fn member_text(m: &Member) -> String {
    match m {
        Member::Guid(g) => g.to_string(),
        Member::Wildcard(w) => w.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{Generation, PortView, SmState, SmStatus, SweepOutcome};

    fn obs(ports: &[(Guid, Programmed)]) -> Observation {
        Observation {
            status: SmStatus {
                state: SmState::Master,
                generation: Generation(3),
                sweep: SweepOutcome::Clean,
            },
            ports: ports
                .iter()
                .map(|(g, p)| {
                    (
                        *g,
                        PortView {
                            guid: *g,
                            programmed: p.clone(),
                            configured: None,
                        },
                    )
                })
                .collect(),
        }
    }

    fn ledger() -> LedgerView {
        LedgerView {
            tenant_pkeys: BTreeMap::from([(1, "acme".into()), (2, "globex".into())]),
            guids: vec![
                LedgerGuid {
                    guid: Guid(10),
                    device: "0000:3b:00.1".into(),
                    tenant: Some("acme".into()),
                },
                LedgerGuid {
                    guid: Guid(11),
                    device: "0000:3b:00.2".into(),
                    tenant: Some("globex".into()),
                },
            ],
        }
    }

    fn present(keys: &[u16]) -> Programmed {
        Programmed::Present {
            lid: Some(4),
            pkeys: keys.iter().map(|k| PKey(*k)).collect::<BTreeSet<_>>(),
        }
    }

    #[test]
    fn a_clean_fabric_has_no_findings() {
        let cfg = vec![
            Configured {
                pkey: PKey(0x7fff),
                member: Member::Wildcard("ALL".into()),
                source: "f:2".into(),
            },
            Configured {
                pkey: PKey(0x8001),
                member: Member::Guid(Guid(10)),
                source: "f:3".into(),
            },
            Configured {
                pkey: PKey(0x8002),
                member: Member::Guid(Guid(11)),
                source: "f:4".into(),
            },
        ];
        let o = obs(&[
            (Guid(10), present(&[0x7fff, 0x8001])),
            (Guid(11), present(&[0x7fff, 0x8002])),
        ]);
        assert!(posture("opensm", Ok(Some(&cfg)), Ok(&o), &ledger()).is_empty());
    }

    #[test]
    fn each_rule_fires() {
        let cfg = vec![
            Configured {
                pkey: PKey(0xffff),
                member: Member::Wildcard("ALL".into()),
                source: "f:2".into(),
            },
            Configured {
                pkey: PKey(0x8001),
                member: Member::Guid(Guid(99)),
                source: "f:3".into(),
            },
            Configured {
                pkey: PKey(0x8001),
                member: Member::Guid(Guid(11)),
                source: "f:4".into(),
            },
        ];
        let o = obs(&[
            (Guid(10), present(&[0xffff, 0x8002])),
            (Guid(11), Programmed::Absent),
        ]);
        let f = posture("opensm", Ok(Some(&cfg)), Ok(&o), &ledger());
        let subjects: Vec<String> = f.iter().map(|x| x.subject.to_string()).collect();
        let rules: Vec<(&str, &str)> = f
            .iter()
            .zip(&subjects)
            .map(|(x, s)| (x.rule.as_str(), s.as_str()))
            .collect();
        assert!(rules.contains(&("FAB-DEFAULT-FULL", "ALL")), "{rules:?}");
        assert!(
            rules.contains(&("FAB-DEFAULT-FULL", "0x000000000000000a")),
            "{rules:?}"
        );
        assert_eq!(
            rules.iter().filter(|r| r.0 == "FAB-UNKNOWN-MEMBER").count(),
            3,
            "{rules:?}"
        );
        assert!(
            rules.contains(&("FAB-GUID-MISSING", "0x000000000000000b")),
            "{rules:?}"
        );
        assert!(f.iter().all(|x| !x.hint.is_empty()));
        let e = FabricError::Unreachable {
            backend: "opensm".into(),
            detail: "x".into(),
            hint: "y".into(),
        };
        let f = posture("opensm", Ok(None), Err(&e), &ledger());
        assert_eq!(f[0].rule, "FAB-UNVERIFIED");
    }

    fn rules_of(f: &[Finding]) -> Vec<(String, String)> {
        f.iter()
            .map(|x| (x.rule.clone(), x.subject.to_string()))
            .collect()
    }

    fn clean_ports() -> Observation {
        obs(&[
            (Guid(10), present(&[0x7fff, 0x8001])),
            (Guid(11), present(&[0x7fff, 0x8002])),
        ])
    }

    /// issue 17 item 7 / issue 18 item 7: an operator's wildcard in a partition
    /// no tenant owns puts every tenant port in it — each is an error finding,
    /// the partition is shared across tenants, and the hint names the line.
    #[test]
    fn an_operator_wildcard_partition_is_foreign_and_shared_and_names_its_line() {
        for (pkey, word) in [(0x9003, "ALL"), (0x8500, "ALL_CAS"), (0x0500, "ALL_CAS")] {
            let cfg = vec![Configured {
                pkey: PKey(pkey),
                member: Member::Wildcard(word.into()),
                source: "/etc/opensm/partitions.conf:7".into(),
            }];
            let f = posture("opensm", Ok(Some(&cfg)), Ok(&clean_ports()), &ledger());
            let r = rules_of(&f);
            let base = format!("{:#06x}", pkey & 0x7fff);
            assert!(
                r.contains(&("FAB-FOREIGN-PARTITION".into(), "0x000000000000000a".into())),
                "{r:?}"
            );
            assert!(
                r.contains(&("FAB-FOREIGN-PARTITION".into(), "0x000000000000000b".into())),
                "{r:?}"
            );
            assert!(
                r.contains(&("FAB-SHARED-PARTITION".into(), base.clone())),
                "{r:?}"
            );
            for x in f.iter().filter(|x| x.rule != "FAB-UNKNOWN-MEMBER") {
                assert_eq!(x.severity, Severity::Error);
                assert!(x.hint.contains("/etc/opensm/partitions.conf:7"), "{x:?}");
                assert!(x.hint.contains("operator's statement"), "{x:?}");
                assert!(
                    x.evidence
                        .iter()
                        .any(|e| e.path == "/etc/opensm/partitions.conf:7")
                );
            }
        }
    }

    /// A foreign P_Key in the SM's state (a port's table) with no statement
    /// behind it: an error finding whose hint says so.
    #[test]
    fn a_foreign_pkey_in_a_tenant_ports_table_is_an_error() {
        let o = obs(&[
            (Guid(10), present(&[0x7fff, 0x8001, 0x1004])),
            (Guid(11), present(&[0x7fff, 0x8002])),
        ]);
        let f = posture("sim", Ok(Some(&[])), Ok(&o), &ledger());
        assert_eq!(
            rules_of(&f),
            [(
                "FAB-FOREIGN-PARTITION".to_string(),
                "0x000000000000000a".to_string()
            )]
        );
        assert!(
            f[0].message.contains("0x1004") && f[0].message.contains("acme"),
            "{f:?}"
        );
        assert!(f[0].hint.contains("no configured statement"), "{f:?}");
        // A GUID no tenant holds is not a tenant port.
        let mut l = ledger();
        l.guids[0].tenant = None;
        let r = rules_of(&posture("sim", Ok(Some(&[])), Ok(&o), &l));
        assert!(r.iter().all(|x| x.0 != "FAB-FOREIGN-PARTITION"), "{r:?}");
    }

    /// issue 18 item 1 (fabric part): one P_Key with ports of two tenants, seen
    /// in the ports' tables, is a shared partition.
    #[test]
    fn one_pkey_with_ports_of_two_tenants_is_shared() {
        let o = obs(&[
            (Guid(10), present(&[0x7fff, 0x8001])),
            (Guid(11), present(&[0x7fff, 0x0001])),
        ]);
        let f = posture("sim", Ok(Some(&[])), Ok(&o), &ledger());
        let r = rules_of(&f);
        assert!(
            r.contains(&("FAB-SHARED-PARTITION".into(), "0x0001".into())),
            "{r:?}"
        );
        let shared = f
            .iter()
            .find(|x| x.rule == "FAB-SHARED-PARTITION")
            .expect("shared");
        assert!(
            shared.message.contains("acme") && shared.message.contains("globex"),
            "{shared:?}"
        );
        // The default partition is shared by design (as limited).
        let o = obs(&[
            (Guid(10), present(&[0x7fff, 0x8001])),
            (Guid(11), present(&[0x7fff, 0x8002])),
        ]);
        assert!(posture("sim", Ok(Some(&[])), Ok(&o), &ledger()).is_empty());
    }

    /// issue 17 item 5: a failed sweep is an error finding even when no tenant
    /// port exists; so is an SM that is not master.
    #[test]
    fn a_failed_sweep_is_an_error_without_any_tenant_port() {
        let mut o = obs(&[]);
        o.status.sweep = SweepOutcome::Errors("PARSE ERROR line 3: bad".into());
        let cfg = vec![Configured {
            pkey: PKey(0x7fff),
            member: Member::Wildcard("ALL".into()),
            source: "/etc/opensm/partitions.conf:1".into(),
        }];
        let f = posture("opensm", Ok(Some(&cfg)), Ok(&o), &LedgerView::default());
        assert_eq!(
            rules_of(&f),
            [("FAB-SWEEP-FAILED".to_string(), "opensm".to_string())]
        );
        assert!(f[0].message.contains("PARSE ERROR"), "{f:?}");
        assert!(f[0].hint.contains("/etc/opensm/partitions.conf"), "{f:?}");
        let mut o = obs(&[]);
        o.status.state = SmState::Standby;
        let f = posture("opensm", Ok(None), Ok(&o), &LedgerView::default());
        assert_eq!(
            rules_of(&f),
            [("FAB-UNVERIFIED".to_string(), "opensm".to_string())]
        );
        // The configuration failing to list is a finding too, and the
        // observation still counts.
        let e = FabricError::Refused {
            backend: "opensm".into(),
            detail: "cannot parse".into(),
            hint: "h".into(),
        };
        let mut o = obs(&[]);
        o.status.sweep = SweepOutcome::Errors("PARSE ERROR".into());
        let r = rules_of(&posture("opensm", Err(&e), Ok(&o), &LedgerView::default()));
        assert!(r.iter().any(|x| x.0 == "FAB-UNVERIFIED"), "{r:?}");
        assert!(r.iter().any(|x| x.0 == "FAB-SWEEP-FAILED"), "{r:?}");
    }

    #[test]
    fn every_rule_reported_is_listed() {
        let ids: BTreeSet<&str> = RULES.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), RULES.len());
        let src = include_str!("posture.rs");
        for word in src.split('"').filter(|w| {
            w.len() > 4
                && w.starts_with("FAB-")
                && w[4..].chars().all(|c| c.is_ascii_uppercase() || c == '-')
        }) {
            assert!(ids.contains(word), "{word:?} is not in RULES");
        }
    }
}
