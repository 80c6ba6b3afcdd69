//! Fabric posture: what `devfence check --fabric` finds by comparing the SM's
//! configuration and read-back with the ledger.
//!
//! | rule | severity | finds |
//! |---|---|---|
//! | `FAB-DEFAULT-FULL` | error | a port with *full* membership of the default partition (configured for all ports or for a tenant's GUID, or seen in a tenant port's table): it can talk to every port of the fabric |
//! | `FAB-UNKNOWN-MEMBER` | error | a member of a tenant's P_Key that the ledger does not give that tenant (a wildcard, a GUID of no device, another tenant's GUID), configured or seen in a port's table |
//! | `FAB-GUID-MISSING` | warning | a GUID the ledger issued to a device held by a tenant that the fabric does not know (the VM will have no IB; nothing leaks) |
//! | `FAB-UNVERIFIED` | error | the SM could not be read: nothing above could be checked |

use std::collections::BTreeMap;

use devfence_model::{Evidence, Finding, Guid, PKey, Severity};

use crate::{FabricError, Observation, Programmed};

/// Who a configured entry names.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Member {
    /// One port GUID.
    Guid(Guid),
    /// A keyword naming many ports (`ALL`, `ALL_CAS`, …).
    Wildcard(String),
}

/// One membership as the SM's configuration states it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
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
        subject,
        message,
        evidence,
        hint: hint.into(),
    }
}

/// The posture findings for one SM.
///
/// `configured`: the SM's configured memberships, where the backend can list them;
/// `observed`: one observation of every ledger GUID (or why it failed).
#[must_use]
pub fn posture(
    backend: &str,
    configured: Option<&[Configured]>,
    observed: Result<&Observation, &FabricError>,
    ledger: &LedgerView,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let by_guid: BTreeMap<Guid, &LedgerGuid> = ledger.guids.iter().map(|g| (g.guid, g)).collect();
    let owner = |pkey: PKey| ledger.tenant_pkeys.get(&pkey.base());
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
        assert!(posture("opensm", Some(&cfg), Ok(&o), &ledger()).is_empty());
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
        let f = posture("opensm", Some(&cfg), Ok(&o), &ledger());
        let rules: Vec<(&str, &str)> = f
            .iter()
            .map(|x| (x.rule.as_str(), x.subject.as_str()))
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
        let f = posture("opensm", None, Err(&e), &ledger());
        assert_eq!(f[0].rule, "FAB-UNVERIFIED");
    }
}
