//! The host side of the fleet (issue 13 item 3): a [`SubnetManager`] backend
//! through which a host agent asks the fabric controller for memberships, and
//! whose read-back never rests on the controller's word alone.
//!
//! - [`stage`](SubnetManager::stage) / [`apply`](SubnetManager::apply) write the
//!   host's **desired** memberships to etcd under its [`HostSession`]'s lease
//!   (`set_desired` / `clear_desired`: the transaction checks the lease, that the
//!   host holds the GUID and that the tenant owns every P_Key). The [`Ticket`]'s
//!   generation **is the etcd revision** of the last desired write of the apply.
//! - [`observe`](SubnetManager::observe) reads, in one etcd snapshot, this host's
//!   desired and **observed** entries (the controller's read-back), and then each
//!   port's P_Key table **at the SA itself** (the SA answers for any port of the
//!   fabric) through a [`PortReader`] — OpenSM's SA client.
//!
//! ## Generation = etcd revision
//!
//! For this backend a [`Generation`] is an etcd revision. An observation's
//! generation is the lowest, over the GUIDs asked, of:
//!
//! - the snapshot's revision when the controller has **caught up** with the
//!   GUID: its observed entry answers a desired view at or after the GUID's
//!   desired entry (`observed.desired_revision >= desired.mod_revision`), or, for
//!   a GUID with no desired entry, the controller shows no membership for it
//!   (no observed entry, empty P_Keys, or an answer at or after the revision at
//!   which this process cleared it);
//! - otherwise what the controller has answered: `observed.desired_revision`,
//!   or 0 when a desired GUID has no observed entry yet.
//!
//! A ticket names the revision of the host's own write, which is at most the
//! revision of any later snapshot, so the gate's "generation ≥ ticket" holds
//! exactly when **observed ≥ desired** for every GUID asked.
//!
//! ## Two views, one judge
//!
//! Each [`PortView`] carries the SA's table as `programmed` and the
//! controller's observed P_Keys as `configured`. [`verify`](crate) checks both:
//! the gate passes only when the controller says done (generation) **and** the
//! SA shows the membership (programmed) **and** the two agree. The controller's
//! word alone is never enough; neither is the SA's while the controller is
//! behind (the SM's configuration could still take the membership back).
//!
//! The SM's status: `Master` with a clean sweep when the SA answered every
//! port read (only a master SM runs the SA; the controller publishes observed
//! entries only from a verified, clean sweep). A lost lease, an unreachable
//! etcd or an unreachable SA is an error: the gate stays closed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use devfence_fabric::{
    Change, ChangeId, FabricError, Generation, Health, MembershipMap, Observation, PortReader,
    PortView, SmState, SmStatus, SubnetManager, SweepOutcome, Ticket,
};
use devfence_model::{Guid, PKey, TenantId};
use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};

use crate::value::{DesiredRecord, Name, ObservedRecord, parse};
use crate::{Fleet, FleetError, FleetStore, HostSession, prefix_end};

/// The backend's name in evidence and audit.
pub const BACKEND: &str = "fleet";

/// The most desired or observed entries one host may have (one snapshot).
pub const MAX_HOST_ENTRIES: i64 = 4096;

/// The host's view of the fleet in one etcd snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostView {
    /// The snapshot's revision.
    pub revision: i64,
    /// Desired entries: record and mod revision, per GUID.
    pub desired: BTreeMap<Guid, (DesiredRecord, i64)>,
    /// Observed entries (the controller's read-back), per GUID.
    pub observed: BTreeMap<Guid, ObservedRecord>,
}

impl FleetStore {
    /// This host's desired and observed entries, read in one transaction
    /// (one revision), for the host-side gate.
    ///
    /// # Errors
    /// etcd unreachable, a bad key or value, more than [`MAX_HOST_ENTRIES`].
    pub async fn host_view(&self, host: &Name) -> Result<HostView, FleetError> {
        let keys = &self.inner.keys;
        let (d, o) = (keys.desired_of(host), keys.observed_of(host));
        let get = |p: &str| {
            TxnOp::get(
                p,
                Some(
                    GetOptions::new()
                        .with_range(prefix_end(p))
                        .with_limit(MAX_HOST_ENTRIES + 1),
                ),
            )
        };
        let txn = Txn::new().and_then(vec![get(&d), get(&o)]);
        let r = self
            .call(
                "read the host's desired and observed memberships",
                |mut c| {
                    let t = txn.clone();
                    async move { c.txn(t).await }
                },
            )
            .await?;
        let mut view = HostView {
            revision: r.header().map_or(0, |h| h.revision()),
            ..HostView::default()
        };
        let mut ranges = r.op_responses().into_iter();
        for (i, what) in [(0, &d), (1, &o)] {
            let Some(TxnOpResponse::Get(g)) = ranges.next() else {
                return Err(FleetError::Invalid(format!(
                    "etcd answered the read of {what} with something else than a range"
                )));
            };
            if g.kvs().len() as i64 > MAX_HOST_ENTRIES {
                return Err(FleetError::TooMany { what: what.clone() });
            }
            for kv in g.kvs() {
                let (_, guid) = Self::host_guid(kv.key())?;
                if i == 0 {
                    let rec = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                    view.desired.insert(guid, (rec, kv.mod_revision()));
                } else {
                    let rec = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                    view.observed.insert(guid, rec);
                }
            }
        }
        Ok(view)
    }

    /// The lease of `host`'s live registration, if it has one.
    ///
    /// # Errors
    /// etcd unreachable, a bad value.
    pub async fn host_lease(&self, host: &Name) -> Result<Option<i64>, FleetError> {
        let key = self.inner.keys.host(host);
        Ok(self
            .get_record::<crate::value::HostRecord>("read the host's record", &key)
            .await?
            .map(|(r, _)| r.lease))
    }

    /// The store's current revision (a read of one key).
    ///
    /// # Errors
    /// etcd unreachable.
    pub async fn revision(&self) -> Result<i64, FleetError> {
        let key = self.inner.keys.cursor();
        let r = self
            .call("read the store's revision", |mut c| {
                let k = key.clone();
                async move { c.get(k, Some(GetOptions::new().with_count_only())).await }
            })
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }
}

/// What [`FleetSm`] keeps between calls.
#[derive(Debug, Default)]
struct State {
    /// Changes staged since the last apply.
    staged: Vec<Change>,
    /// The memberships this host wrote as desired (its last applied map).
    desired: MembershipMap,
    /// GUIDs whose desired entry this process deleted, and the revision of
    /// the delete.
    cleared: BTreeMap<Guid, i64>,
    /// P_Key owners read from the fleet (ownership never changes).
    owners: BTreeMap<u16, TenantId>,
}

/// The fleet backend of [`SubnetManager`] for a host agent: desired
/// memberships in etcd, read-back from the controller's observed entries
/// **and** the SA (module docs).
pub struct FleetSm {
    fleet: Arc<Fleet>,
    host: Name,
    session: Mutex<Option<HostSession>>,
    reader: Box<dyn PortReader>,
    state: Mutex<State>,
    serial: AtomicU64,
    /// A one-shot command's view: no session, observe and health only.
    read_only: bool,
}

impl std::fmt::Debug for FleetSm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSm")
            .field("fabric", self.fleet.store().fabric())
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

fn fleet_err(e: &FleetError) -> FabricError {
    let mut detail = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        src = s.source();
    }
    let hint = match e {
        FleetError::LeaseLost { .. } => {
            "the host agent registers the host again (`devfence serve` re-registers at start and re-writes the desired memberships of its Active/Ready IB devices); nothing was changed at the SM by this host"
        }
        FleetError::Unavailable { .. } | FleetError::TlsRefused { .. } => {
            "the fleet's shared facts are needed for this step and etcd did not answer: fail closed, nothing was changed; retry when `etcdctl endpoint health --cluster` is healthy"
        }
        _ => "see the fleet store's error above; docs/fleet.md lists the host side's failure modes",
    };
    FabricError::Unreachable {
        backend: BACKEND.into(),
        detail,
        hint: hint.into(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FleetSm {
    /// A backend for `host`, with its registered `session`, reading port
    /// tables through `reader` (OpenSM's SA client).
    #[must_use]
    pub fn new(fleet: Arc<Fleet>, session: HostSession, reader: Box<dyn PortReader>) -> Self {
        Self {
            host: session.host().clone(),
            fleet,
            session: Mutex::new(Some(session)),
            reader,
            state: Mutex::new(State::default()),
            serial: AtomicU64::new(0),
            read_only: false,
        }
    }

    /// A read-only view of `host`'s memberships, for a process that holds no
    /// session of it (a one-shot `devfence verify` beside the host agent):
    /// [`observe`](SubnetManager::observe) and
    /// [`health`](SubnetManager::health) answer from etcd and the SA exactly
    /// as for the agent, and [`stage`](SubnetManager::stage) and
    /// [`apply`](SubnetManager::apply) are refused — desired memberships are
    /// written under the host's lease, which only the agent holds.
    #[must_use]
    pub fn read_only(fleet: Arc<Fleet>, host: Name, reader: Box<dyn PortReader>) -> Self {
        Self {
            host,
            fleet,
            session: Mutex::new(None),
            reader,
            state: Mutex::new(State::default()),
            serial: AtomicU64::new(0),
            read_only: true,
        }
    }

    /// The refusal of a change through a read-only view.
    fn refuse_read_only(&self) -> FabricError {
        FabricError::Refused {
            backend: BACKEND.into(),
            detail: format!(
                "this process only reads host {}'s memberships on fabric {}: it holds no session of the host in the fleet",
                self.host,
                self.fleet.store().fabric()
            ),
            hint: "run the operation through the host agent (`devfence serve` registers the host at start and holds its lease)".into(),
        }
    }

    /// Registers `host` (waiting up to `wait` for a previous session of the
    /// same name — a restarted agent's — to expire) and builds the backend.
    ///
    /// # Errors
    /// etcd unreachable; the name still held by a live session after `wait`.
    pub fn register(
        fleet: Arc<Fleet>,
        host: &Name,
        reader: Box<dyn PortReader>,
        wait: Duration,
    ) -> Result<Self, FleetError> {
        let session = register_waiting(&fleet, host, wait)?;
        Ok(Self::new(fleet, session, reader))
    }

    /// The fleet client.
    #[must_use]
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// The host.
    #[must_use]
    pub fn host(&self) -> &Name {
        &self.host
    }

    /// Whether the host's session (lease) is lost: every operation that
    /// needs it is refused until [`reregister`](Self::reregister).
    #[must_use]
    pub fn lease_lost(&self) -> bool {
        lock(&self.session)
            .as_ref()
            .is_none_or(HostSession::is_lost)
    }

    /// Registers the host again after a lost lease (waiting up to `wait` for
    /// the old one to expire) and forgets what this process wrote as desired
    /// (a new lease holds none of it): re-write it with
    /// [`SubnetManager::stage_desired`] and [`apply`](SubnetManager::apply).
    ///
    /// # Errors
    /// As [`register`](Self::register).
    pub fn reregister(&self, wait: Duration) -> Result<(), FleetError> {
        let mut s = lock(&self.session);
        if let Some(old) = s.take() {
            // Best effort: a lost lease may already be gone.
            let _ = self.fleet.close_session(old);
        }
        *s = Some(register_waiting(&self.fleet, &self.host, wait)?);
        let mut st = lock(&self.state);
        st.desired = MembershipMap::new();
        st.cleared.clear();
        Ok(())
    }

    /// Checks that the fleet answers and the host's lease holds: the
    /// preflight of every operation that needs a shared fact.
    ///
    /// # Errors
    /// [`FleetError::LeaseLost`], etcd unreachable.
    pub fn ready(&self) -> Result<(), FleetError> {
        if self.lease_lost() {
            return Err(FleetError::LeaseLost {
                host: self.host.clone(),
                fabric: self.fleet.store().fabric().clone(),
            });
        }
        self.fleet.block_on(self.fleet.store().revision())?;
        Ok(())
    }

    fn owner(&self, st: &mut State, pkey: PKey) -> Result<TenantId, FabricError> {
        if let Some(t) = st.owners.get(&pkey.base()) {
            return Ok(t.clone());
        }
        match self.fleet.pkey_owner(pkey).map_err(|e| fleet_err(&e))? {
            Some(t) => {
                st.owners.insert(pkey.base(), t.clone());
                Ok(t)
            }
            None => Err(FabricError::Refused {
                backend: BACKEND.into(),
                detail: format!(
                    "P_Key 0x{:04x} has no owner on fabric {}",
                    pkey.base(),
                    self.fleet.store().fabric()
                ),
                hint: "a partition is claimed for its tenant in the fleet before a host asks for it (the host agent claims its tenants' partitions at start; or `claim_pkey`)".into(),
            }),
        }
    }

    fn record(&self, st: &mut State, pkeys: &BTreeSet<PKey>) -> Result<DesiredRecord, FabricError> {
        let mut tenant: Option<TenantId> = None;
        for p in pkeys {
            let t = self.owner(st, *p)?;
            match &tenant {
                Some(x) if *x != t => {
                    return Err(FabricError::Refused {
                        backend: BACKEND.into(),
                        detail: format!("one port asked into partitions of tenants {x} and {t}"),
                        hint:
                            "a port belongs to one tenant: its partitions must all be that tenant's"
                                .into(),
                    });
                }
                _ => tenant = Some(t),
            }
        }
        let tenant = tenant.ok_or_else(|| FabricError::Refused {
            backend: BACKEND.into(),
            detail: "a desired membership with no partition".into(),
            hint: "this is a bug in the caller".into(),
        })?;
        DesiredRecord::new(tenant, pkeys.iter().copied().collect()).map_err(|e| {
            FabricError::Refused {
                backend: BACKEND.into(),
                detail: e.to_string(),
                hint: "a port holds at most 128 partitions".into(),
            }
        })
    }
}

/// Registers `host`, retrying while a previous session of the same name is
/// still alive (bounded by `wait`: its lease expires within its TTL).
///
/// # Errors
/// etcd unreachable; the name still held after `wait`.
pub fn register_waiting(
    fleet: &Fleet,
    host: &Name,
    wait: Duration,
) -> Result<HostSession, FleetError> {
    let end = Instant::now() + wait;
    loop {
        match fleet.register_host(host) {
            Err(FleetError::HostAlreadyRegistered { .. }) if Instant::now() < end => {
                // Pace only: the old lease expires on etcd's clock.
                std::thread::sleep(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

impl SubnetManager for FleetSm {
    fn backend(&self) -> &str {
        BACKEND
    }

    fn stage(&self, change: Change) -> Result<(), FabricError> {
        if self.read_only {
            return Err(self.refuse_read_only());
        }
        change.validate()?;
        lock(&self.state).staged.push(change);
        Ok(())
    }

    fn discard_staged(&self) -> usize {
        std::mem::take(&mut lock(&self.state).staged).len()
    }

    fn apply(&self) -> Result<Ticket, FabricError> {
        if self.read_only {
            return Err(self.refuse_read_only());
        }
        let session = lock(&self.session);
        let Some(session) = session.as_ref().filter(|s| !s.is_lost()) else {
            return Err(fleet_err(&FleetError::LeaseLost {
                host: self.host.clone(),
                fabric: self.fleet.store().fabric().clone(),
            }));
        };
        let mut st = lock(&self.state);
        let mut next = st.desired.clone();
        for c in &st.staged {
            next.apply(c)?;
        }
        let guids: BTreeSet<Guid> = st.desired.guids().chain(next.guids()).collect();
        let mut written = 0i64;
        for g in guids {
            let want = next.pkeys_of(g);
            if want == st.desired.pkeys_of(g) {
                continue;
            }
            if want.is_empty() {
                let rev = self
                    .fleet
                    .clear_desired(session, g)
                    .map_err(|e| fleet_err(&e))?;
                st.desired.remove_all(g);
                st.cleared.insert(g, rev);
                written = written.max(rev);
            } else {
                let rec = self.record(&mut st, &want)?;
                let rev = self
                    .fleet
                    .set_desired(session, g, &rec)
                    .map_err(|e| fleet_err(&e))?;
                st.desired.remove_all(g);
                for (p, m) in next.partitions_of(g) {
                    st.desired.insert(g, p, m)?;
                }
                st.cleared.remove(&g);
                written = written.max(rev);
            }
        }
        if written == 0 {
            // Nothing changed: a re-sweep asks for nothing new; any snapshot
            // from now on answers it.
            written = self
                .fleet
                .block_on(self.fleet.store().revision())
                .map_err(|e| fleet_err(&e))?;
        }
        st.staged.clear();
        let change = ChangeId(self.serial.fetch_add(1, Ordering::SeqCst) + 1);
        Ok(Ticket {
            change,
            generation: Generation(u64::try_from(written).unwrap_or(0)),
        })
    }

    fn observe(&self, guids: &[Guid]) -> Result<Observation, FabricError> {
        if !self.read_only && self.lease_lost() {
            return Err(fleet_err(&FleetError::LeaseLost {
                host: self.host.clone(),
                fabric: self.fleet.store().fabric().clone(),
            }));
        }
        // The controller's word first (the status before the port views, as
        // the seam's contract asks), then the SA's.
        let view = self
            .fleet
            .block_on(self.fleet.store().host_view(&self.host))
            .map_err(|e| fleet_err(&e))?;
        let cleared = lock(&self.state).cleared.clone();
        let tables = self.reader.read_ports(guids)?;
        if tables.len() != guids.len() {
            return Err(FabricError::Malformed {
                backend: BACKEND.into(),
                detail: format!(
                    "the SA answered {} port reads for {} GUIDs",
                    tables.len(),
                    guids.len()
                ),
                hint: "the gate stays closed; check the SA with `saquery`".into(),
            });
        }
        let mut generation = view.revision;
        let mut ports = BTreeMap::new();
        for (g, programmed) in guids.iter().zip(tables) {
            let (gen_g, configured) = judge(&view, &cleared, *g);
            generation = generation.min(gen_g);
            ports.insert(
                *g,
                PortView {
                    guid: *g,
                    programmed,
                    configured,
                },
            );
        }
        Ok(Observation {
            status: SmStatus {
                state: SmState::Master,
                generation: Generation(u64::try_from(generation).unwrap_or(0)),
                sweep: SweepOutcome::Clean,
            },
            ports,
        })
    }

    fn health(&self) -> Result<Health, FabricError> {
        let mut notes = Vec::new();
        let lost = !self.read_only && self.lease_lost();
        if self.read_only {
            notes.push(format!(
                "a read-only view of host {}: changes go through the host agent, which holds its session",
                self.host
            ));
        }
        if lost {
            notes.push(format!(
                "host {}'s lease on fabric {} is lost: operations that need the fleet are refused until it registers again",
                self.host,
                self.fleet.store().fabric()
            ));
        }
        let rev = self
            .fleet
            .block_on(self.fleet.store().revision())
            .map_err(|e| fleet_err(&e))?;
        let sm = self.reader.local_sm_state()?;
        Ok(Health {
            backend: BACKEND.into(),
            version: None,
            status: SmStatus {
                state: if lost {
                    SmState::Unknown
                } else {
                    sm.unwrap_or(SmState::Master)
                },
                generation: Generation(u64::try_from(rev).unwrap_or(0)),
                sweep: SweepOutcome::Clean,
            },
            notes,
        })
    }
}

/// One GUID's generation (module docs) and the controller's configured view
/// of it (`None`: the controller says nothing of it; the SA alone judges).
fn judge(view: &HostView, cleared: &BTreeMap<Guid, i64>, g: Guid) -> (i64, Option<BTreeSet<PKey>>) {
    let observed = view.observed.get(&g);
    let configured = observed.map(|o| o.pkeys.iter().copied().collect::<BTreeSet<PKey>>());
    let generation = match (view.desired.get(&g), observed) {
        (Some((_, d)), Some(o)) if o.desired_revision >= *d => view.revision,
        (Some(_), Some(o)) => o.desired_revision,
        (Some(_), None) => 0,
        (None, None) => view.revision,
        (None, Some(o)) if o.pkeys.is_empty() => view.revision,
        (None, Some(o)) => match cleared.get(&g) {
            Some(c) if o.desired_revision >= *c => view.revision,
            _ => o.desired_revision,
        },
    };
    (generation, configured)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(pkeys: &[u16], rev: i64) -> ObservedRecord {
        ObservedRecord::new(pkeys.iter().map(|p| PKey(*p)).collect(), 1, rev).expect("record")
    }

    #[test]
    fn the_generation_is_observed_against_desired_per_guid() {
        let g = Guid(0x10);
        let mut v = HostView {
            revision: 50,
            ..HostView::default()
        };
        let d = DesiredRecord::new("acme".parse().expect("t"), vec![PKey(0x8001)]).expect("d");
        // Desired at 40, nothing observed: not yet.
        v.desired.insert(g, (d, 40));
        assert_eq!(judge(&v, &BTreeMap::new(), g).0, 0);
        // Observed an older view: behind, at what it answered.
        v.observed.insert(g, rec(&[0x8001], 39));
        assert_eq!(judge(&v, &BTreeMap::new(), g).0, 39);
        // Observed at or after the desired entry: caught up, at the snapshot.
        v.observed.insert(g, rec(&[0x8001], 40));
        let (gen_g, conf) = judge(&v, &BTreeMap::new(), g);
        assert_eq!(gen_g, 50);
        assert_eq!(conf, Some(BTreeSet::from([PKey(0x8001)])));
        // Cleared at 45: the old observation is behind until it answers 45.
        v.desired.clear();
        let cleared = BTreeMap::from([(g, 45)]);
        assert_eq!(judge(&v, &cleared, g).0, 40);
        v.observed.insert(g, rec(&[], 45));
        assert_eq!(judge(&v, &cleared, g).0, 50);
        // Never desired, never observed: the SA alone judges.
        assert_eq!(judge(&v, &cleared, Guid(0x20)), (50, None));
    }
}
