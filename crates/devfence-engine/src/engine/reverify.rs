//! Re-verification of every `Ready` and `Active` device at any time: what the
//! hook does at VM start (`admit.rs`), without starting a domain.
//!
//! [`Engine::reverify`] re-reads, per device, what its gates established
//! (driver, IOMMU group viability, group node owner and mode, for an IB VF the
//! GUID its PF shows and its port's P_Key table at the SM, for an mdev that it
//! exists) and says per device: [`Check::Verified`], [`Check::Drifted`] or
//! [`Check::Unknown`]. What it does about a difference depends on who holds the
//! device:
//!
//! - a drifted **`Ready`** device is quarantined (compare and set against the
//!   state read, audited with what differed): no VM may start on it;
//! - a drifted **`Active`** device is reported (an audited finding) and left to
//!   its VM: devfence never yanks a device from a running guest;
//! - state that cannot be read (the SM does not answer) is [`Check::Unknown`]:
//!   reported and audited, nothing quarantined (as the hook refuses without
//!   quarantining).
//!
//! It runs on demand (`devfence verify`), after a restore of the SM's
//! configuration ([`Engine::record_fabric_restores`]), and is the one function
//! the host agent's continuous verification calls.

use std::collections::BTreeMap;
use std::time::Instant;

use devfence_model::{DeviceId, Membership, TenantId};
use serde_json::{Value, json};

use super::admit::{Drift, Expect, check_device, expectations};
use super::{Engine, EngineError};
use crate::audit::{AuditEvent, AuditKind};
use crate::store::{DeviceState, StoreError, StoreExt};

/// The outcome of re-verifying one device.
#[derive(Clone, Debug, PartialEq, serde::Serialize, schemars::JsonSchema)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Check {
    /// As its gates left it; `evidence` is what was read.
    Verified {
        /// What was read back.
        evidence: Value,
    },
    /// Not as its gates left it.
    Drifted {
        /// What differs (the values read and the ones expected).
        what: String,
        /// What the device was expected to show.
        evidence: Value,
        /// True when it was `Ready` and is now `Quarantined`; an `Active`
        /// device is reported and left to its VM.
        quarantined: bool,
    },
    /// Its state cannot be read now (the SM does not answer…): not verified,
    /// nothing changed.
    Unknown {
        /// Why.
        why: String,
    },
}

/// One device's re-verification.
#[derive(Clone, Debug, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct DeviceCheck {
    /// The device.
    pub device: DeviceId,
    /// The tenant that holds it.
    pub tenant: TenantId,
    /// Its state when it was read (`Ready…` or `Active…`).
    pub state: String,
    /// The outcome.
    #[serde(flatten)]
    pub check: Check,
}

/// The result of [`Engine::reverify`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct Reverification {
    /// Every `Ready` and `Active` device in scope, in ledger order.
    pub devices: Vec<DeviceCheck>,
    /// How long the re-verification took, in microseconds.
    pub verify_us: u64,
}

impl Reverification {
    /// True when every device in scope was verified.
    #[must_use]
    pub fn all_verified(&self) -> bool {
        self.devices
            .iter()
            .all(|d| matches!(d.check, Check::Verified { .. }))
    }

    /// The devices found drifted.
    pub fn drifted(&self) -> impl Iterator<Item = &DeviceCheck> {
        self.devices
            .iter()
            .filter(|d| matches!(d.check, Check::Drifted { .. }))
    }
}

/// A restore of the SM's configuration recorded in the ledger by
/// [`Engine::record_fabric_restores`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct RecordedRestore {
    /// The backend that restored.
    pub backend: String,
    /// The restore's stable id.
    pub id: String,
}

impl Engine<'_> {
    /// Re-verifies every `Ready` and `Active` device (or those of `devices`)
    /// against what its gates established (module docs): a drifted `Ready`
    /// device is quarantined, a drifted `Active` one reported, unreadable state
    /// reported; each of these is audited.
    ///
    /// # Errors
    /// A device of `devices` the ledger does not know or that is neither
    /// `Ready` nor `Active` (refused, nothing checked); the ledger cannot be
    /// read.
    pub fn reverify(
        &mut self,
        devices: Option<&[DeviceId]>,
    ) -> Result<Reverification, EngineError> {
        let t0 = Instant::now();
        let all = self.store.atomically(|tx| tx.devices())?;
        let mut held: Vec<(DeviceId, TenantId, DeviceState)> = Vec::new();
        if let Some(want) = devices {
            for d in want {
                let Some(r) = all.iter().find(|r| r.device == *d) else {
                    return Err(EngineError::refused(
                        Some(*d),
                        format!("{d} is not in the ledger"),
                        "`devfence status` lists the devices devfence manages",
                    ));
                };
                match &r.state {
                    DeviceState::Ready { tenant, .. } | DeviceState::Active { tenant, .. } => {
                        held.push((*d, tenant.clone(), r.state.clone()));
                    }
                    other => {
                        return Err(EngineError::refused(
                            Some(*d),
                            format!(
                                "{d} is {other}; only Ready and Active devices are re-verified"
                            ),
                            "a Free device was verified clean when it was scrubbed; release or recover a device in any other state",
                        ));
                    }
                }
            }
        } else {
            for r in &all {
                if let DeviceState::Ready { tenant, .. } | DeviceState::Active { tenant, .. } =
                    &r.state
                {
                    held.push((r.device, tenant.clone(), r.state.clone()));
                }
            }
        }
        // What each tenant's devices must show, one ledger read per tenant.
        let mut by_tenant: BTreeMap<TenantId, Vec<DeviceId>> = BTreeMap::new();
        for (d, t, _) in &held {
            by_tenant.entry(t.clone()).or_default().push(*d);
        }
        let mut out = Vec::with_capacity(held.len());
        let mut results: BTreeMap<DeviceId, Check> = BTreeMap::new();
        for (tenant, devs) in &by_tenant {
            let facts = match self.store.atomically(|tx| expectations(tx, tenant, devs)) {
                Ok(f) => f,
                Err(e) => {
                    for d in devs {
                        results.insert(
                            *d,
                            Check::Unknown {
                                why: format!("cannot read what {tenant}'s devices must show: {e}"),
                            },
                        );
                    }
                    continue;
                }
            };
            for (d, guid) in devs.iter().zip(&facts.guids) {
                let x = Expect {
                    tenant: &facts.tenant,
                    guid: *guid,
                    foreign: &facts.foreign,
                    others: &facts.others,
                    node_mode: self.cfg.node_mode,
                };
                let check = if matches!(d, DeviceId::Pci(_) | DeviceId::Mdev(_)) {
                    match check_device(self.host, self.sm, d, &x) {
                        Ok(evidence) => Check::Verified { evidence },
                        Err(Drift::Differs(what)) => Check::Drifted {
                            what,
                            evidence: expected(&x),
                            quarantined: false,
                        },
                        Err(Drift::Unknown(why)) => Check::Unknown { why },
                    }
                } else {
                    Check::Unknown {
                        why: format!("devfence cannot re-verify a device like {d} yet"),
                    }
                };
                results.insert(*d, check);
            }
        }
        for (d, tenant, from) in held {
            let mut check = results.remove(&d).unwrap_or(Check::Unknown {
                why: "not checked".into(),
            });
            self.act_on(&d, &tenant, &from, &mut check);
            out.push(DeviceCheck {
                device: d,
                tenant,
                state: from.to_string(),
                check,
            });
        }
        Ok(Reverification {
            devices: out,
            verify_us: u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
        })
    }

    /// Quarantines a drifted `Ready` device; audits every drift and unknown.
    fn act_on(&mut self, d: &DeviceId, tenant: &TenantId, from: &DeviceState, check: &mut Check) {
        let detail = match check {
            Check::Verified { .. } => return,
            Check::Unknown { why } => {
                json!({ "gate": "reverify", "result": "unknown", "state": from.to_string(), "why": why })
            }
            Check::Drifted {
                what, quarantined, ..
            } => {
                if matches!(from, DeviceState::Ready { .. }) {
                    let q = DeviceState::Quarantined {
                        reason: super::truncate(
                            &format!(
                                "changed since it was {from}, found by re-verification: {what}"
                            ),
                            300,
                        ),
                    };
                    let (dv, tn, w) = (*d, tenant.clone(), what.clone());
                    let moved = self.store.atomically(|tx| {
                        tx.set_device_state(&dv, from, &q)?;
                        tx.audit(&AuditEvent {
                            kind: AuditKind::Gate,
                            device: Some(dv),
                            tenant: Some(tn.clone()),
                            detail: json!({ "gate": "reverify", "result": "drifted", "what": w, "from": from.to_string(), "to": q.to_string() }),
                        })?;
                        Ok(())
                    });
                    match moved {
                        Ok(()) => {
                            *quarantined = true;
                            return;
                        }
                        Err(e) => {
                            what.push_str(&format!(
                                " (not quarantined: {e}; another devfence command changed it meanwhile)"
                            ));
                        }
                    }
                }
                json!({ "gate": "reverify", "result": "drifted", "action": "reported", "what": what, "state": from.to_string() })
            }
        };
        if let Err(e) = self.audit(&AuditEvent {
            kind: AuditKind::Gate,
            device: Some(*d),
            tenant: Some(tenant.clone()),
            detail,
        }) {
            let note = format!(" (and recording it failed: {e})");
            match check {
                Check::Unknown { why: s } | Check::Drifted { what: s, .. } => s.push_str(&note),
                Check::Verified { .. } => {}
            }
        }
    }

    /// Records in the ledger, once, every restore of the SM's configuration the
    /// backend persisted (one audit record each, in the same transaction as the
    /// ledger's note of it); and once the backend has seen a clean sweep after
    /// a restore (its own check at the SA is recorded with the restore),
    /// re-verifies every `Ready` and `Active` device ([`reverify`](Self::reverify)),
    /// once per restore, auditing a summary. A restore whose sweep is still to
    /// come is re-verified by a later call (`Env::open` of any process, `status`,
    /// `verify`). Returns the newly recorded restores and the re-verification,
    /// if one ran.
    ///
    /// # Errors
    /// The backend's record cannot be read; the ledger refuses.
    pub fn record_fabric_restores(
        &mut self,
    ) -> Result<(Vec<RecordedRestore>, Option<Reverification>), EngineError> {
        let backend = self.sm.backend().to_owned();
        let read = |sm: &dyn devfence_fabric::SubnetManager| {
            sm.persisted_restores().map_err(|e| EngineError::Host {
                root: backend.clone(),
                reason: format!("cannot read the restores the SM backend recorded: {e}"),
                hint: "check the SM backend's state files (docs/fabric-opensm.md)".into(),
            })
        };
        let mut restores = read(self.sm)?;
        let mut new = Vec::new();
        for r in &restores {
            let id = r.id();
            let b = backend.clone();
            let recorded = self.store.atomically(|tx| {
                if !tx.record_fabric_restore(&b, &id)? {
                    return Ok(false);
                }
                tx.audit(&AuditEvent {
                    kind: AuditKind::Recovery,
                    device: None,
                    tenant: None,
                    detail: json!({ "event": "fabric-restore", "backend": b, "restore": id, "generation": r.generation, "at_unix": r.at_unix, "reason": r.reason, "restored": r.restored }),
                })?;
                Ok::<bool, StoreError>(true)
            })?;
            if recorded {
                new.push(RecordedRestore { backend: b, id });
            }
        }
        // A restore the backend has not re-checked yet: its health drives the
        // check (at a clean sweep after the restore; nothing waits here).
        if restores.iter().any(|r| r.reverified.is_none()) {
            let _ = self.sm.health();
            restores = read(self.sm)?;
        }
        let mut due = Vec::new();
        for r in restores.iter().filter(|r| r.reverified.is_some()) {
            let key = format!("{}/reverify", r.id());
            let b = backend.clone();
            if self
                .store
                .atomically(|tx| tx.record_fabric_restore(&b, &key))?
            {
                due.push((r.id(), r.reverified.clone().unwrap_or_default()));
            }
        }
        if due.is_empty() {
            return Ok((new, None));
        }
        let rv = self.reverify(None)?;
        let count = |f: fn(&Check) -> bool| rv.devices.iter().filter(|d| f(&d.check)).count();
        self.audit(&AuditEvent {
            kind: AuditKind::Gate,
            device: None,
            tenant: None,
            detail: json!({
                "gate": "reverify",
                "after": "fabric-restore",
                "backend": backend,
                "restores": due.iter().map(|(id, _)| id).collect::<Vec<_>>(),
                "at_sa": due.iter().map(|(_, at)| at).collect::<Vec<_>>(),
                "verified": count(|c| matches!(c, Check::Verified { .. })),
                "drifted": count(|c| matches!(c, Check::Drifted { .. })),
                "unknown": count(|c| matches!(c, Check::Unknown { .. })),
                "devices": rv.devices.iter().map(|d| d.device.to_string()).collect::<Vec<_>>(),
            }),
        })?;
        Ok((new, Some(rv)))
    }
}

/// What a device was expected to show (the evidence of a drift).
fn expected(x: &Expect<'_>) -> Value {
    let mut v = json!({
        "tenant": x.tenant.id,
        "node": format!(
            "{}:{} {:04o}",
            x.tenant.launcher_uid.unwrap_or(0),
            x.tenant.launcher_gid.unwrap_or(0),
            x.node_mode
        ),
    });
    if let Some(g) = x.guid {
        v["guid"] = json!(g);
        v["pkeys"] = json!(
            x.tenant
                .partitions
                .iter()
                .map(|p| {
                    let full = if p.membership == Membership::Full {
                        0x8000
                    } else {
                        0
                    };
                    format!("{:#06x}", p.pkey.base() | full)
                })
                .collect::<Vec<_>>()
        );
    }
    v
}
