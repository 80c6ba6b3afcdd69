//! libvirt's `prepare begin`: the last word before a guest gets its devices.
//!
//! [`Engine::start_domain`] decides in four steps, in this order:
//!
//! 1. read the ledger state of every device the domain names (one transaction);
//! 2. [`decide_prepare_with`]: every device `Ready` for one tenant, the tenant
//!    the domain says it is (metadata or reservation), reservations honoured;
//! 3. **re-verify at the moment of use** (`check_device`) what the gates
//!    established when the device became `Ready` — the device is there, bound to
//!    vfio-pci, its IOMMU group viable and held by no other tenant, the group node
//!    owned by the tenant's launcher with the gate's mode; for an IB VF the GUID
//!    the PF shows for it is the one issued and the port's P_Key table at the SM
//!    holds the tenant's keys and no other tenant's; for an mdev that it exists.
//!    A device that differs is quarantined and the domain refused, naming what
//!    differed;
//! 4. move **every** device `Ready → Active` in one transaction (compare and set
//!    against the states read in step 1), or none.
//!
//! The re-verification reads a handful of sysfs attributes per device (no
//! inventory of the host) and, for an IB VF, one SM observation; its cost is in
//! docs/benchmarks.md.

use std::collections::BTreeSet;
use std::time::Instant;

use devfence_fabric::{PartitionKey, Programmed, SmState, SweepOutcome};
use devfence_host::readback::{self, ReadBack};
use devfence_model::{Bdf, DeviceId, Guid, IommuGroupId, PKey, TenantId};
use serde_json::{Value, json};

use super::Engine;
use crate::audit::{AuditEvent, AuditKind};
use crate::libvirt::{Admission, DomainSpec, Refusal, Unidentified, decide_prepare_with};
use crate::store::{DeviceState, GuidState, StoreError, StoreExt, Tenant, Tx};

/// A domain admitted by [`Engine::start_domain`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct Started {
    /// The tenant; `None` when the domain has no device devfence manages.
    pub tenant: Option<TenantId>,
    /// Each device now `Active`, with the evidence its re-verification read.
    pub devices: Vec<(DeviceId, Value)>,
    /// How long the re-verification of all devices took, in microseconds.
    pub verify_us: u64,
}

/// Why a device fails its re-verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drift {
    /// The device is not as its gates left it: it is quarantined.
    Differs(String),
    /// Its state cannot be read (the SM does not answer…): the domain is refused,
    /// the device left as it is.
    Unknown(String),
}

impl Drift {
    pub(super) fn text(&self) -> &str {
        match self {
            Drift::Differs(s) | Drift::Unknown(s) => s,
        }
    }
}

/// Drivers that keep a group member's DMA under control (the group rules' list).
fn dma_managed(driver: Option<&str>) -> bool {
    match driver {
        None => true,
        Some(d) => {
            matches!(d, "vfio-pci" | "pci-stub" | "pcieport" | "vfio-platform")
                || d.ends_with("vfio-pci")
                || d.ends_with("vfio_pci")
        }
    }
}

/// What a device of the ledger must still show when its VM starts.
pub(super) struct Expect<'a> {
    pub(super) tenant: &'a Tenant,
    /// The GUID the ledger issued to the device (an IB VF), if any.
    pub(super) guid: Option<Guid>,
    /// P_Key bases other tenants hold.
    pub(super) foreign: &'a BTreeSet<u16>,
    /// Devices other tenants hold (for the group rule).
    pub(super) others: &'a [(DeviceId, TenantId)],
    pub(super) node_mode: u32,
}

/// Re-verifies one device against what its gates established (the hook's
/// check at VM start, and [`Engine::reverify`]'s at any time).
pub(super) fn check_device(
    host: ReadBack<'_>,
    sm: &dyn devfence_fabric::SubnetManager,
    device: &DeviceId,
    x: &Expect<'_>,
) -> Result<Value, Drift> {
    let differs = |s: String| Drift::Differs(s);
    let (group, mut ev) = match device {
        DeviceId::Pci(bdf) => {
            if !host.pci_present(*bdf) {
                return Err(differs(format!("{} is gone", readback::pci_dir(*bdf))));
            }
            let driver = host.driver_of(*bdf);
            if driver.as_deref() != Some("vfio-pci") {
                return Err(differs(format!(
                    "driver is {}, not vfio-pci",
                    driver.as_deref().unwrap_or("none")
                )));
            }
            let group = host.pci_group(*bdf).map_err(|e| differs(e.to_string()))?;
            (group, json!({ "driver": "vfio-pci" }))
        }
        DeviceId::Mdev(u) => {
            if !host.mdev_present(*u) {
                return Err(differs(format!("{} is gone", readback::mdev_dir(*u))));
            }
            let group = host.mdev_group(*u).map_err(|e| differs(e.to_string()))?;
            (group, json!({ "present": true }))
        }
        other => {
            return Err(differs(format!(
                "{other} is not a device the hook can verify"
            )));
        }
    };
    ev["group"] = json!(group.0);
    group_viable(host, group, device, x).map_err(differs)?;
    let node = readback::group_node(group);
    let (uid, gid) = (
        x.tenant.launcher_uid.unwrap_or(0),
        x.tenant.launcher_gid.unwrap_or(0),
    );
    match host.node_meta(group) {
        Ok(m) if m.uid == uid && m.gid == gid && m.mode == x.node_mode => {
            ev["node"] = json!(format!("{}:{} {:04o}", m.uid, m.gid, m.mode));
        }
        Ok(m) => {
            return Err(differs(format!(
                "{node} is {}:{} {:04o}, not {uid}:{gid} {:04o}",
                m.uid, m.gid, m.mode, x.node_mode
            )));
        }
        Err(e) => return Err(differs(format!("cannot stat {node}: {e}"))),
    }
    if let (DeviceId::Pci(bdf), Some(guid)) = (device, x.guid) {
        ev["guid"] = json!(guid);
        ev["pkeys"] = ib_port(host, sm, *bdf, guid, x)?;
    }
    Ok(ev)
}

/// Every member of the group is on a DMA-managed driver and held by no other
/// tenant.
fn group_viable(
    host: ReadBack<'_>,
    group: IommuGroupId,
    device: &DeviceId,
    x: &Expect<'_>,
) -> Result<(), String> {
    let members = host.group_members(group).map_err(|e| e.to_string())?;
    for m in &members {
        if let Some((d, t)) = x.others.iter().find(|(d, _)| d.to_string() == *m) {
            return Err(format!(
                "IOMMU group {group} holds {d}, which {t} holds (GRP-ONE-TENANT)"
            ));
        }
        if *m == device.to_string() {
            continue;
        }
        if let Ok(b) = m.parse::<Bdf>() {
            let driver = host.driver_of(b);
            if !dma_managed(driver.as_deref()) {
                return Err(format!(
                    "IOMMU group {group} member {b} is on {}, a host driver (GRP-VIABLE)",
                    driver.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    Ok(())
}

/// The IB VF's GUID as its PF shows it, and its port's P_Key table at the SM.
fn ib_port(
    host: ReadBack<'_>,
    sm: &dyn devfence_fabric::SubnetManager,
    bdf: Bdf,
    guid: Guid,
    x: &Expect<'_>,
) -> Result<Value, Drift> {
    let differs = |s: String| Drift::Differs(s);
    let (seen, port) = host
        .vf_guid_at_pf(bdf)
        .map_err(|e| differs(e.to_string()))?;
    if seen != Some(guid) {
        return Err(differs(format!(
            "its GUID is {} ({port}), not {guid}, the one devfence issued",
            seen.map_or_else(|| "unreadable".to_owned(), |g| g.to_string())
        )));
    }
    let obs = sm
        .observe(&[guid])
        .map_err(|e| Drift::Unknown(format!("the SM cannot show {guid}'s port: {e}")))?;
    // A port table read while the SM is not master, or after a sweep that failed
    // (an operator's unparseable file that devfence is restoring), is not a
    // state the SM stands behind: unknown, never a difference.
    if obs.status.state != SmState::Master {
        return Err(Drift::Unknown(format!(
            "the SM is {}, not master: its port tables are not verified state",
            obs.status.state
        )));
    }
    if let SweepOutcome::Errors(e) = &obs.status.sweep {
        return Err(Drift::Unknown(format!(
            "the SM's last sweep ({}) ended with errors ({e}); its port tables are not verified state until a clean sweep",
            obs.status.generation
        )));
    }
    let Some(view) = obs.ports.get(&guid) else {
        return Err(Drift::Unknown(format!("the SM did not answer for {guid}")));
    };
    let Programmed::Present { pkeys, .. } = &view.programmed else {
        return Err(differs(format!("the SM knows no port with GUID {guid}")));
    };
    let want: BTreeSet<PKey> = x
        .tenant
        .partitions
        .iter()
        .filter_map(|p| {
            PartitionKey::try_from(p.pkey)
                .ok()
                .map(|k| k.pkey(p.membership))
        })
        .collect();
    let hex = |k: &PKey| format!("{:#06x}", k.0);
    let missing: Vec<String> = want.difference(pkeys).map(hex).collect();
    let leaked: Vec<String> = pkeys
        .iter()
        .filter(|k| x.foreign.contains(&k.base()))
        .map(hex)
        .collect();
    if !leaked.is_empty() {
        return Err(differs(format!(
            "port {guid} carries another tenant's P_Keys {}",
            leaked.join(", ")
        )));
    }
    if !missing.is_empty() {
        return Err(differs(format!(
            "port {guid} lacks the tenant's P_Keys {}",
            missing.join(", ")
        )));
    }
    Ok(json!(pkeys.iter().map(hex).collect::<Vec<_>>()))
}

/// Everything the re-verification needs from the ledger, in one read.
pub(super) struct LedgerFacts {
    pub(super) tenant: Tenant,
    /// Per device (in order), the GUID the ledger issued to it, if any.
    pub(super) guids: Vec<Option<Guid>>,
    pub(super) foreign: BTreeSet<u16>,
    pub(super) others: Vec<(DeviceId, TenantId)>,
}

pub(super) fn expectations(
    tx: &mut dyn Tx,
    tenant: &TenantId,
    devices: &[DeviceId],
) -> Result<LedgerFacts, StoreError> {
    let t = tx
        .tenant(tenant)?
        .ok_or_else(|| StoreError::UnknownTenant(tenant.clone()))?;
    let mut guids = Vec::with_capacity(devices.len());
    for d in devices {
        let g = tx
            .guids_of(d)?
            .into_iter()
            .rev()
            .find(|r| r.state == GuidState::Issued)
            .map(|r| r.guid);
        guids.push(g);
    }
    let foreign = tx
        .tenants()?
        .iter()
        .filter(|o| o.id != *tenant)
        .flat_map(|o| o.partitions.iter().map(|p| p.pkey.base()))
        .collect();
    let others = tx
        .assignments()?
        .into_iter()
        .filter(|a| a.tenant != *tenant)
        .map(|a| (a.device, a.tenant))
        .collect();
    Ok(LedgerFacts {
        tenant: t,
        guids,
        foreign,
        others,
    })
}

impl Engine<'_> {
    fn hook_refusal(&mut self, r: Refusal, tenant: Option<TenantId>) -> Refusal {
        let detail = json!({ "hook": "prepare-begin", "domain": r.domain, "refused": r.reason });
        if let Err(e) = self.audit(&AuditEvent {
            kind: AuditKind::Refusal,
            device: r.device,
            tenant,
            detail,
        }) {
            return Refusal {
                reason: format!("{} (and recording the refusal failed: {e})", r.reason),
                ..r
            };
        }
        r
    }

    /// libvirt's `prepare begin` for `domain` (module docs): admits it and moves
    /// every device it names `Ready → Active` together, or refuses it and moves
    /// none (quarantining a device that differs from what its gates verified).
    /// A device reserved for the domain's UUID becomes `Active` under that UUID.
    /// For [`Unidentified::SingleTenant`] the tenant count is read from the ledger
    /// (whatever the caller passes).
    ///
    /// # Errors
    /// A [`Refusal`] (one line for libvirt) naming the device and why.
    pub fn start_domain(
        &mut self,
        domain: &DomainSpec,
        unidentified: Unidentified,
    ) -> Result<Started, Refusal> {
        let refusal = |device: Option<DeviceId>, reason: String| Refusal {
            domain: domain.name.clone(),
            device,
            reason,
        };
        let devs = domain.hostdevs.clone();
        // 1. Every state in one read.
        let read = self.store.atomically(|tx| {
            let mut v = Vec::with_capacity(devs.len());
            for d in &devs {
                v.push((*d, tx.device(d)?.map(|r| r.state)));
            }
            Ok((v, tx.tenants()?.len()))
        });
        let (states, tenants) = match read {
            Ok(x) => x,
            Err(e) => {
                let r = refusal(
                    devs.first().copied(),
                    format!(
                        "cannot read the ledger: {e}. Hint: devfence fails closed when it cannot \
                         verify a device; check the ledger with `devfence status`"
                    ),
                );
                return Err(self.hook_refusal(r, None));
            }
        };
        // 2. The decision on the ledger's states.
        let policy = match unidentified {
            Unidentified::Refuse => Unidentified::Refuse,
            Unidentified::SingleTenant { .. } => Unidentified::SingleTenant { tenants },
        };
        let adm: Admission = match decide_prepare_with(
            domain,
            &mut |d| {
                Ok(states
                    .iter()
                    .find(|(x, _)| x == d)
                    .and_then(|(_, s)| s.clone()))
            },
            policy,
        ) {
            Ok(a) => a,
            Err(r) => return Err(self.hook_refusal(r, domain.tenant.clone())),
        };
        let Some(tenant) = adm.tenant.clone() else {
            return Ok(Started {
                tenant: None,
                devices: Vec::new(),
                verify_us: 0,
            });
        };
        // 3. Re-verify at the moment of use.
        let t0 = Instant::now();
        let facts = match self
            .store
            .atomically(|tx| expectations(tx, &tenant, &adm.devices))
        {
            Ok(x) => x,
            Err(e) => {
                let r = refusal(
                    adm.devices.first().copied(),
                    format!("cannot read the ledger: {e}. Hint: check `devfence status`"),
                );
                return Err(self.hook_refusal(r, Some(tenant)));
            }
        };
        let mut evidence = Vec::with_capacity(adm.devices.len());
        let mut drifts: Vec<(DeviceId, Drift)> = Vec::new();
        for (d, guid) in adm.devices.iter().zip(&facts.guids) {
            let x = Expect {
                tenant: &facts.tenant,
                guid: *guid,
                foreign: &facts.foreign,
                others: &facts.others,
                node_mode: self.cfg.node_mode,
            };
            match check_device(self.host, self.sm, d, &x) {
                Ok(ev) => evidence.push((*d, ev)),
                Err(drift) => drifts.push((*d, drift)),
            }
        }
        let verify_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        if let Some((first, _)) = drifts.first() {
            let first = *first;
            let mut quarantined = Vec::new();
            for (d, drift) in &drifts {
                let Drift::Differs(what) = drift else {
                    continue;
                };
                let Some(from) = states
                    .iter()
                    .find(|(x, _)| x == d)
                    .and_then(|(_, s)| s.clone())
                else {
                    continue;
                };
                let q = DeviceState::Quarantined {
                    reason: super::truncate(
                        &format!("changed since it was {from}, found at VM start: {what}"),
                        300,
                    ),
                };
                let (dv, tn, dom, w) = (*d, tenant.clone(), domain.name.clone(), what.clone());
                let moved = self.store.atomically(|tx| {
                    tx.set_device_state(&dv, &from, &q)?;
                    tx.audit(&AuditEvent {
                        kind: AuditKind::Refusal,
                        device: Some(dv),
                        tenant: Some(tn.clone()),
                        detail: json!({ "hook": "prepare-begin", "domain": dom, "reverify": "differs", "what": w, "from": from.to_string(), "to": q.to_string() }),
                    })?;
                    Ok(())
                });
                if moved.is_ok() {
                    quarantined.push(*d);
                }
            }
            let what: Vec<String> = drifts
                .iter()
                .map(|(d, x)| format!("{d}: {}", x.text()))
                .collect();
            let fate = if quarantined.is_empty() {
                "nothing was changed".to_owned()
            } else {
                let q: Vec<String> = quarantined.iter().map(ToString::to_string).collect();
                format!("{} now Quarantined", q.join(", "))
            };
            let r = refusal(
                Some(first),
                format!(
                    "{} not as its gates left it when it became Ready for {tenant} ({}); {fate}, \
                     no device of the domain was started. Hint: something acted on the device \
                     outside devfence (`devfence audit show --device {first}` lists forced \
                     actions); release it to scrub and verify it, then assign it again",
                    if drifts.len() == 1 {
                        format!("{first} is")
                    } else {
                        format!("{} devices are", drifts.len())
                    },
                    what.join("; ")
                ),
            );
            // The quarantines above are audited; the refusal is too.
            return Err(self.hook_refusal(r, Some(tenant)));
        }
        // 4. Every device Active, in one transaction, or none.
        let (tn, name) = (tenant.clone(), domain.name.clone());
        let ev2 = evidence.clone();
        let res = self.store.atomically(|tx| {
            for (d, ev) in &ev2 {
                let Some((_, Some(from))) = states.iter().find(|(x, _)| x == d) else {
                    return Err(StoreError::UnknownDevice(*d));
                };
                let vm = match from {
                    DeviceState::Ready { vm: Some(v), .. } => v.clone(),
                    _ => name.clone(),
                };
                let next = DeviceState::Active {
                    tenant: tn.clone(),
                    vm,
                };
                tx.set_device_state(d, from, &next)?;
                tx.audit(&AuditEvent {
                    kind: AuditKind::Step,
                    device: Some(*d),
                    tenant: Some(tn.clone()),
                    detail: json!({ "step": "vm-start", "domain": name, "from": from.to_string(), "to": next.to_string(), "reverified": ev }),
                })?;
            }
            Ok(())
        });
        if let Err(e) = res {
            let r = refusal(
                adm.devices.first().copied(),
                format!(
                    "the devices could not all be marked Active ({e}); none was. Hint: another \
                     devfence command changed the ledger meanwhile; start the domain again"
                ),
            );
            return Err(self.hook_refusal(r, Some(tenant)));
        }
        Ok(Started {
            tenant: Some(tenant),
            devices: evidence,
            verify_us,
        })
    }
}
