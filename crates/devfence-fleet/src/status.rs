//! What the fleet looks like now (issue 13 items 5 and 6): the leader, the
//! controller's last batch, each host with its lease and its desired memberships
//! against what the controller observed, the orphaned memberships of lost hosts
//! and the operator's revoke requests; the GUID pool's counts; and the one
//! operator action on a lost host, [`FleetStore::request_revoke`].
//!
//! Everything of one answer is read at **one etcd revision** (the revision of
//! the first read; every later read asks for it), so a status never mixes a
//! host key from before a lease expired with desired keys from after. Lease
//! time-to-live is the one thing etcd cannot answer at a past revision: it is
//! asked right after, and says so (`ttl_left_s`).
//!
//! **Orphaned** (docs/fleet.md): an observed entry with P_Keys whose host has
//! no live host key — its lease expired, and its desired keys went with it.
//! Nothing removes it from the SM on its own (a partitioned host may still run
//! VMs on it); an operator asks for it with [`FleetStore::request_revoke`],
//! which writes `/P/F/revoke/H/<guid>` for the controller. Its GUIDs stay
//! allocated to the lost host in the pool either way: never reissued.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use devfence_model::{Guid, PKey, TenantId};
use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::value::{
    self, CursorRecord, DesiredRecord, GuidIndexRecord, GuidRange, GuidRecord, GuidState,
    HostRecord, Name, ObservedRecord, Record, ValueError, encode, parse,
};
use crate::{Fleet, FleetError, FleetStore, Keys, prefix_end};

/// The most problems of one kind a GUID pool report lists (it counts all).
pub const MAX_LISTED_PROBLEMS: usize = 16;
/// The most hosts whose lease time-to-live one status asks for.
pub const MAX_LEASE_QUERIES: usize = 1024;
/// The longest actor or controller name kept in a value.
pub const MAX_LABEL: usize = 256;

impl JsonSchema for Name {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "FleetName".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A fabric or host name: 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
        })
    }
}

// ------------------------------------------------------------------ keys

impl Keys {
    fn leader(&self) -> String {
        format!("{}/leader", self.fab)
    }
    fn controller_status(&self) -> String {
        format!("{}/controller/status", self.fab)
    }
    fn hosts(&self) -> String {
        format!("{}/host/", self.fab)
    }
    fn revokes(&self) -> String {
        format!("{}/revoke/", self.fab)
    }
    fn revokes_of(&self, h: &Name) -> String {
        format!("{}/revoke/{h}/", self.fab)
    }
    fn revoke(&self, h: &Name, g: Guid) -> String {
        format!("{}/revoke/{h}/{}", self.fab, value::guid_segment(g))
    }
    fn global_guids(&self) -> String {
        format!("{}/_global/guid/", self.root)
    }
}

// ---------------------------------------------------------------- values

fn check_label(kind: &'static str, field: &str, s: &str) -> Result<(), ValueError> {
    if s.is_empty() || s.len() > MAX_LABEL || s.chars().any(char::is_control) {
        return Err(ValueError::Bounds {
            kind,
            why: format!(
                "{field} is empty, longer than {MAX_LABEL} bytes or holds control characters"
            ),
        });
    }
    Ok(())
}

// The records of `/P/F/leader`, `/P/F/controller/status` and
// `/P/F/revoke/…` are the controller's own (one definition per key).
pub use crate::controller::{
    ControllerStatus as ControllerStatusRecord, LeaderRecord, RevokeRecord,
};

// ---------------------------------------------------------------- answers

/// `devfence fleet status`: the fabric as etcd holds it, at one revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FleetStatus {
    /// The fabric.
    pub fabric: Name,
    /// The etcd revision everything below was read at.
    pub revision: i64,
    /// The fabric controller holding leadership; none: no controller leads
    /// (nothing is applied to the SM until one does).
    pub leader: Option<Leader>,
    /// What the controller's last batch published; none: no batch yet.
    pub controller: Option<ControllerStatus>,
    /// Every live host, and every lost host that still has memberships at
    /// the SM (observed entries) or revoke requests.
    pub hosts: Vec<HostStatus>,
    /// The operator's revoke requests the controller has not finished.
    pub revokes: Vec<RevokeRequest>,
    /// The totals.
    pub counts: StatusCounts,
}

/// The leading controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Leader {
    /// Its name.
    pub controller: String,
    /// Its lease.
    pub lease: i64,
    /// The leader key's create revision: what it writes to the SM and checks
    /// on read-back (a later leader has a higher one).
    pub fencing_token: i64,
    /// Seconds its lease has left (asked right after the read); none: etcd
    /// no longer knows the lease.
    pub ttl_left_s: Option<i64>,
}

/// The controller's last batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ControllerStatus {
    /// The controller that wrote it.
    pub controller: String,
    /// The SM sweep generation of its last batch.
    pub generation: u64,
    /// The etcd revision of the desired view it applied.
    pub applied_revision: i64,
    /// Changes it had not applied yet when it wrote this.
    pub pending: u64,
    /// When it wrote this (RFC 3339, the controller's clock).
    pub time: String,
    /// The key's mod revision.
    pub revision: i64,
    /// Whether the controller that wrote it is the current leader.
    pub by_leader: bool,
}

/// One host of the fabric.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HostStatus {
    /// The host.
    pub host: Name,
    /// Whether its host key is there (its lease holds).
    pub live: bool,
    /// Its lease (live hosts).
    pub lease: Option<i64>,
    /// Seconds its lease has left (asked right after the read); none for a
    /// lost host, or when etcd no longer knows the lease.
    pub ttl_left_s: Option<i64>,
    /// The TTL its lease was granted with.
    pub granted_ttl_s: Option<i64>,
    /// Its memberships, by GUID.
    pub memberships: Vec<MembershipStatus>,
}

/// Where one port's membership stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MembershipState {
    /// The controller observed the desired revision (or a later one) and the
    /// SM holds exactly the desired P_Keys.
    InSync,
    /// Desired, and not yet observed at that revision (no observed entry, or
    /// its desired_revision is older than the desired key).
    Pending,
    /// Observed at the desired revision or later, but with other P_Keys than
    /// desired (the SM did not take the change; the host's gate fails).
    Mismatch,
    /// A live host released it (no desired key) and the SM still holds
    /// P_Keys for it: the controller removes them.
    Releasing,
    /// The host is lost (no host key) and the SM still holds P_Keys for the
    /// port: kept until an operator revokes it (`devfence fleet revoke`).
    Orphaned,
}

/// One port of a host: desired against observed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MembershipStatus {
    /// The port.
    pub guid: Guid,
    /// Where it stands.
    pub state: MembershipState,
    /// The tenant it is desired for.
    pub tenant: Option<TenantId>,
    /// The desired P_Keys; none: no desired entry.
    pub desired: Option<Vec<PKey>>,
    /// The desired key's mod revision.
    pub desired_revision: Option<i64>,
    /// The P_Keys the controller read back at the SM; none: not observed.
    pub observed: Option<Vec<PKey>>,
    /// The SM sweep generation of that read-back.
    pub observed_generation: Option<u64>,
    /// The desired revision that read-back answers.
    pub observed_desired_revision: Option<i64>,
    /// Whether an operator asked for its revocation.
    pub revoke_requested: bool,
}

/// A revoke request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RevokeRequest {
    /// The lost host.
    pub host: Name,
    /// The port.
    pub guid: Guid,
    /// Who asked.
    pub by: String,
    /// The revision it was written at.
    pub revision: i64,
}

/// The totals of a status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StatusCounts {
    /// Hosts whose lease holds.
    pub hosts_live: u64,
    /// Lost hosts listed (with orphaned memberships or revoke requests).
    pub hosts_lost: u64,
    /// Memberships in sync.
    pub in_sync: u64,
    /// Memberships pending.
    pub pending: u64,
    /// Memberships observed with other P_Keys than desired.
    pub mismatch: u64,
    /// Released memberships the SM still holds.
    pub releasing: u64,
    /// Orphaned memberships.
    pub orphaned: u64,
    /// Revoke requests pending.
    pub revokes: u64,
}

impl StatusCounts {
    /// Memberships not in sync at the SM yet: pending, mismatched or being
    /// released (the `devfence_fleet_pending_memberships` gauge).
    #[must_use]
    pub fn not_in_sync(&self) -> u64 {
        self.pending + self.mismatch + self.releasing
    }
}

/// `devfence fleet guid-pool`: the fabric's pool, at one revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GuidPoolStatus {
    /// The fabric.
    pub fabric: Name,
    /// The etcd revision everything below was read at.
    pub revision: i64,
    /// The range; none: not configured yet.
    pub range: Option<RangeView>,
    /// The next GUID of the range never yet offered (the cursor); none: no
    /// allocation yet.
    pub next: Option<Guid>,
    /// GUIDs of the range never yet offered (from the cursor on).
    pub never_offered: Option<u64>,
    /// GUIDs allocated (held by a host).
    pub allocated: u64,
    /// GUIDs retired (released; never issued again).
    pub retired: u64,
    /// Pool GUIDs outside the range (claimed by hand: a port that had them).
    pub outside_range: u64,
    /// Per host.
    pub hosts: Vec<HostGuids>,
    /// The global GUID index against the pool.
    pub index: IndexCheck,
}

/// A fabric's GUID range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RangeView {
    /// The first GUID.
    pub first: Guid,
    /// The last GUID.
    pub last: Guid,
    /// How many GUIDs it holds.
    pub size: u64,
}

/// One host's GUIDs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HostGuids {
    /// The host.
    pub host: Name,
    /// GUIDs it holds.
    pub allocated: u64,
    /// GUIDs it released.
    pub retired: u64,
}

/// Whether every pool GUID is indexed to this fabric in `/P/_global/guid/`,
/// and every index entry naming this fabric has its pool record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IndexCheck {
    /// No problem found.
    pub consistent: bool,
    /// Pool GUIDs checked.
    pub checked: u64,
    /// Problems found (all of them; the lists below hold the first few).
    pub problems: u64,
    /// Pool GUIDs with no index entry.
    pub missing: Vec<Guid>,
    /// Pool GUIDs the index gives to another fabric.
    pub on_other_fabric: Vec<GuidElsewhere>,
    /// Index entries naming this fabric without a pool record.
    pub without_pool_record: Vec<Guid>,
}

/// A GUID indexed to another fabric.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GuidElsewhere {
    /// The GUID.
    pub guid: Guid,
    /// The fabric the index names.
    pub fabric: Name,
}

/// What to revoke of a lost host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeTarget {
    /// One port.
    Guid(Guid),
    /// Every orphaned membership of the host.
    All,
}

/// `devfence fleet revoke`: the revoke keys written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RevokeOutcome {
    /// The fabric.
    pub fabric: Name,
    /// The lost host.
    pub host: Name,
    /// The GUIDs whose revoke key this request wrote.
    pub requested: Vec<Guid>,
    /// The GUIDs already requested before (left as they were).
    pub already_requested: Vec<Guid>,
    /// Who asked.
    pub by: String,
    /// The revision the keys were written at (0: nothing written).
    pub revision: i64,
}

/// Why a revoke request was not written.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// The host's lease holds: it may release its memberships itself.
    #[error(
        "Host {host} on fabric {fabric} is alive (its lease {lease:x} holds): a revoke is only for a lost host's orphaned memberships. Hint: a live host releases its memberships itself (`devfence release` on it); if it is really gone, wait for its lease to expire (`devfence fleet status` shows the TTL left)"
    )]
    HostAlive {
        /// The host.
        host: Name,
        /// The fabric.
        fabric: Name,
        /// Its lease.
        lease: i64,
    },
    /// The controller observed nothing of that port at the SM.
    #[error(
        "Host {host} has no membership of GUID {guid} at the SM on fabric {fabric} (no observed entry with P_Keys): nothing to revoke. Hint: `devfence fleet status` lists the orphaned memberships"
    )]
    NotObserved {
        /// The host.
        host: Name,
        /// The port.
        guid: Guid,
        /// The fabric.
        fabric: Name,
    },
    /// The host has no orphaned membership at all.
    #[error(
        "Host {host} has no orphaned membership on fabric {fabric}: nothing to revoke. Hint: `devfence fleet status` lists the hosts and their memberships"
    )]
    NothingOrphaned {
        /// The host.
        host: Name,
        /// The fabric.
        fabric: Name,
    },
    /// The actor cannot be written.
    #[error("{0}")]
    Invalid(String),
    /// The fleet store failed.
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

impl RevokeError {
    /// Whether a rule said no (the host is alive, nothing to revoke), as
    /// opposed to bad input or a fault.
    #[must_use]
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            RevokeError::HostAlive { .. }
                | RevokeError::NotObserved { .. }
                | RevokeError::NothingOrphaned { .. }
        )
    }
}

// ---------------------------------------------------------------- reads

/// Reads at one revision: the first read fixes it.
struct At<'a> {
    store: &'a FleetStore,
    rev: i64,
}

impl FleetStore {
    /// The revision now and the value of `key` at it.
    async fn first_read(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<(i64, Option<KeyValue>), FleetError> {
        let k = key.to_string();
        let mut r = self
            .call(op, |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        let rev = r.header().map_or(0, |h| h.revision());
        Ok((rev, r.take_kvs().into_iter().next()))
    }
}

impl At<'_> {
    async fn get(&self, op: &'static str, key: &str) -> Result<Option<KeyValue>, FleetError> {
        let (k, rev) = (key.to_string(), self.rev);
        let mut r = self
            .store
            .call(op, |mut c| {
                let k = k.clone();
                async move { c.get(k, Some(GetOptions::new().with_revision(rev))).await }
            })
            .await?;
        Ok(r.take_kvs().into_iter().next())
    }

    async fn record<T: Record>(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<Option<(T, KeyValue)>, FleetError> {
        match self.get(op, key).await? {
            None => Ok(None),
            Some(kv) => {
                let v = parse::<T>(kv.value()).map_err(|e| FleetStore::bad(kv.key(), e))?;
                Ok(Some((v, kv)))
            }
        }
    }

    /// Every key in `[from, end)` at the revision, paged.
    async fn range(
        &self,
        op: &'static str,
        from: Vec<u8>,
        end: Vec<u8>,
    ) -> Result<Vec<KeyValue>, FleetError> {
        self.store.range_at(op, from, end, self.rev).await
    }

    async fn list(&self, op: &'static str, prefix: &str) -> Result<Vec<KeyValue>, FleetError> {
        self.range(op, prefix.as_bytes().to_vec(), prefix_end(prefix))
            .await
    }
}

fn name_of(key: &[u8], seg: &str) -> Result<Name, FleetError> {
    seg.parse().map_err(|e: value::NameError| {
        FleetStore::bad(
            key,
            ValueError::Bounds {
                kind: "host",
                why: e.to_string(),
            },
        )
    })
}

/// The state of a port from its desired and observed entries.
fn state_of(
    live: bool,
    desired: Option<&(DesiredRecord, i64)>,
    observed: Option<&ObservedRecord>,
) -> Option<MembershipState> {
    let held = observed.is_some_and(|o| !o.pkeys.is_empty());
    Some(match (desired, observed) {
        (Some((d, rev)), Some(o)) if o.desired_revision >= *rev => {
            if o.pkeys == d.pkeys {
                MembershipState::InSync
            } else {
                MembershipState::Mismatch
            }
        }
        (Some(_), _) => MembershipState::Pending,
        (None, _) if !held => return None,
        (None, _) if live => MembershipState::Releasing,
        (None, _) => MembershipState::Orphaned,
    })
}

impl FleetStore {
    async fn ttl_of(&self, lease: i64) -> (Option<i64>, Option<i64>) {
        let r = self
            .call("read a lease's time to live", |mut c| async move {
                c.lease_time_to_live(lease, None).await
            })
            .await;
        match r {
            Ok(t) if t.ttl() >= 0 => (Some(t.ttl()), Some(t.granted_ttl())),
            _ => (None, None),
        }
    }

    /// The fabric now, read at one revision: the leader and its fencing
    /// token, the controller's last batch, every host with its lease and
    /// its memberships (in sync, pending, mismatched, releasing, orphaned),
    /// the revoke requests.
    ///
    /// # Errors
    /// etcd unreachable (fail closed: no partial answer), a bad key or value.
    pub async fn status(&self) -> Result<FleetStatus, FleetError> {
        let keys = &self.inner.keys;
        let (rev, leader_kv) = self
            .first_read("read the fleet's leader", &keys.leader())
            .await?;
        let at = At { store: self, rev };
        let leader = match leader_kv {
            None => None,
            Some(kv) => {
                let r: LeaderRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                Some((r, kv.create_revision()))
            }
        };
        let controller = at
            .record::<ControllerStatusRecord>(
                "read the controller's status",
                &keys.controller_status(),
            )
            .await?;
        let host_kvs = at.list("list the fleet's hosts", &keys.hosts()).await?;
        let desired_kvs = at
            .list("list desired memberships", &keys.desired_all())
            .await?;
        let observed_kvs = at
            .list("list observed memberships", &keys.observed_all())
            .await?;
        let revoke_kvs = at.list("list revoke requests", &keys.revokes()).await?;

        let mut live: BTreeMap<Name, i64> = BTreeMap::new();
        for kv in &host_kvs {
            let seg = value::last_segment(kv.key()).map_err(|e| Self::bad(kv.key(), e))?;
            let host = name_of(kv.key(), seg)?;
            let r: HostRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
            if r.host != host {
                return Err(Self::bad(
                    kv.key(),
                    ValueError::Bounds {
                        kind: HostRecord::KIND,
                        why: format!("the record names host {}, the key {host}", r.host),
                    },
                ));
            }
            live.insert(host, r.lease);
        }
        type PerHost = BTreeMap<Guid, (Option<(DesiredRecord, i64)>, Option<ObservedRecord>, bool)>;
        let mut ports: BTreeMap<Name, PerHost> = BTreeMap::new();
        for kv in &desired_kvs {
            let (h, g) = Self::host_guid(kv.key())?;
            let r: DesiredRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
            ports.entry(h).or_default().entry(g).or_default().0 = Some((r, kv.mod_revision()));
        }
        for kv in &observed_kvs {
            let (h, g) = Self::host_guid(kv.key())?;
            let r: ObservedRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
            ports.entry(h).or_default().entry(g).or_default().1 = Some(r);
        }
        let mut revokes = Vec::with_capacity(revoke_kvs.len());
        for kv in &revoke_kvs {
            let (h, g) = Self::host_guid(kv.key())?;
            let r: RevokeRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
            ports.entry(h.clone()).or_default().entry(g).or_default().2 = true;
            revokes.push(RevokeRequest {
                host: h,
                guid: g,
                by: r.by,
                revision: kv.mod_revision(),
            });
        }
        for h in live.keys() {
            ports.entry(h.clone()).or_default();
        }

        let mut counts = StatusCounts {
            revokes: revokes.len() as u64,
            ..StatusCounts::default()
        };
        let mut hosts = Vec::new();
        for (host, per) in ports {
            let lease = live.get(&host).copied();
            let is_live = lease.is_some();
            let mut memberships = Vec::new();
            for (guid, (d, o, revoke)) in per {
                let Some(state) = state_of(is_live, d.as_ref(), o.as_ref()) else {
                    continue;
                };
                match state {
                    MembershipState::InSync => counts.in_sync += 1,
                    MembershipState::Pending => counts.pending += 1,
                    MembershipState::Mismatch => counts.mismatch += 1,
                    MembershipState::Releasing => counts.releasing += 1,
                    MembershipState::Orphaned => counts.orphaned += 1,
                }
                memberships.push(MembershipStatus {
                    guid,
                    state,
                    tenant: d.as_ref().map(|(r, _)| r.tenant.clone()),
                    desired: d.as_ref().map(|(r, _)| r.pkeys.clone()),
                    desired_revision: d.as_ref().map(|(_, rev)| *rev),
                    observed: o.as_ref().map(|r| r.pkeys.clone()),
                    observed_generation: o.as_ref().map(|r| r.generation),
                    observed_desired_revision: o.as_ref().map(|r| r.desired_revision),
                    revoke_requested: revoke,
                });
            }
            if !is_live && memberships.is_empty() && !revokes.iter().any(|r| r.host == host) {
                // A lost host with nothing left at the SM: history, not status.
                continue;
            }
            if is_live {
                counts.hosts_live += 1;
            } else {
                counts.hosts_lost += 1;
            }
            hosts.push(HostStatus {
                host,
                live: is_live,
                lease,
                ttl_left_s: None,
                granted_ttl_s: None,
                memberships,
            });
        }
        // Lease time-to-live cannot be read at a revision: asked now.
        for h in hosts.iter_mut().filter(|h| h.live).take(MAX_LEASE_QUERIES) {
            if let Some(l) = h.lease {
                (h.ttl_left_s, h.granted_ttl_s) = self.ttl_of(l).await;
            }
        }
        let leader = match leader {
            None => None,
            Some((r, token)) => Some(Leader {
                ttl_left_s: self.ttl_of(r.lease).await.0,
                controller: r.controller.to_string(),
                lease: r.lease,
                fencing_token: token,
            }),
        };
        let controller = controller.map(|(r, kv)| ControllerStatus {
            by_leader: leader
                .as_ref()
                .is_some_and(|l| l.controller == r.controller.as_str()),
            controller: r.controller.to_string(),
            generation: r.generation,
            applied_revision: r.applied_revision,
            pending: r.pending,
            time: r.time,
            revision: kv.mod_revision(),
        });
        Ok(FleetStatus {
            fabric: self.fabric().clone(),
            revision: rev,
            leader,
            controller,
            hosts,
            revokes,
            counts,
        })
    }

    /// The fabric's GUID pool, read at one revision: the range, the cursor,
    /// allocated and retired GUIDs per host, and whether the global index
    /// agrees with the pool.
    ///
    /// # Errors
    /// etcd unreachable, a bad key or value.
    pub async fn guid_pool(&self) -> Result<GuidPoolStatus, FleetError> {
        let keys = &self.inner.keys;
        let (rev, range_kv) = self
            .first_read("read the GUID range", &keys.range(self.fabric()))
            .await?;
        let at = At { store: self, rev };
        let range: Option<GuidRange> = match range_kv {
            None => None,
            Some(kv) => Some(parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?),
        };
        let cursor = at
            .record::<CursorRecord>("read the GUID cursor", &keys.cursor())
            .await?
            .map(|(c, _)| c.next);
        let pool_kvs = at.list("list the GUID pool", &keys.guids()).await?;
        let mut pool: BTreeMap<Guid, GuidRecord> = BTreeMap::new();
        for kv in &pool_kvs {
            let g = value::guid_from_key(kv.key()).map_err(|e| Self::bad(kv.key(), e))?;
            let r: GuidRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
            pool.insert(g, r);
        }
        let (mut allocated, mut retired, mut outside) = (0u64, 0u64, 0u64);
        let mut per: BTreeMap<Name, (u64, u64)> = BTreeMap::new();
        for (g, r) in &pool {
            let e = per.entry(r.host.clone()).or_default();
            match r.state {
                GuidState::Allocated => {
                    allocated += 1;
                    e.0 += 1;
                }
                GuidState::Retired => {
                    retired += 1;
                    e.1 += 1;
                }
            }
            if range.is_some_and(|rg| !rg.contains(*g)) {
                outside += 1;
            }
        }
        // The global index over the span of this fabric's GUIDs (its range
        // and any GUID claimed outside it).
        let mut index = IndexCheck {
            checked: pool.len() as u64,
            ..IndexCheck::default()
        };
        let lo = [pool.keys().next().copied(), range.map(|r| r.first)]
            .into_iter()
            .flatten()
            .min();
        let hi = [pool.keys().next_back().copied(), range.map(|r| r.last)]
            .into_iter()
            .flatten()
            .max();
        if let (Some(lo), Some(hi)) = (lo, hi) {
            let mut end = keys.global_guid(hi).into_bytes();
            end.push(0);
            let idx_kvs = at
                .range(
                    "read the global GUID index",
                    keys.global_guid(lo).into_bytes(),
                    end,
                )
                .await?;
            let mut seen = BTreeSet::new();
            for kv in &idx_kvs {
                let g = value::guid_from_key(kv.key()).map_err(|e| Self::bad(kv.key(), e))?;
                let r: GuidIndexRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                let mine = &r.fabric == self.fabric();
                match (pool.contains_key(&g), mine) {
                    (true, true) => {
                        seen.insert(g);
                    }
                    (true, false) => {
                        seen.insert(g);
                        index.problems += 1;
                        if index.on_other_fabric.len() < MAX_LISTED_PROBLEMS {
                            index.on_other_fabric.push(GuidElsewhere {
                                guid: g,
                                fabric: r.fabric,
                            });
                        }
                    }
                    (false, true) => {
                        index.problems += 1;
                        if index.without_pool_record.len() < MAX_LISTED_PROBLEMS {
                            index.without_pool_record.push(g);
                        }
                    }
                    (false, false) => {}
                }
            }
            for g in pool.keys().filter(|g| !seen.contains(*g)) {
                index.problems += 1;
                if index.missing.len() < MAX_LISTED_PROBLEMS {
                    index.missing.push(*g);
                }
            }
        }
        // Entries outside the window cannot name this fabric's GUIDs, but an
        // index entry for this fabric there would be one without a record:
        // the window covers every pool GUID, so only those are missed; they
        // are counted by a keys-only listing of the whole index only when the
        // pool is empty (no window).
        if lo.is_none() {
            let all = at
                .list("read the global GUID index", &keys.global_guids())
                .await?;
            for kv in &all {
                let r: GuidIndexRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                if &r.fabric == self.fabric() {
                    let g = value::guid_from_key(kv.key()).map_err(|e| Self::bad(kv.key(), e))?;
                    index.problems += 1;
                    if index.without_pool_record.len() < MAX_LISTED_PROBLEMS {
                        index.without_pool_record.push(g);
                    }
                }
            }
        }
        index.consistent = index.problems == 0;
        let never_offered = match (range, cursor) {
            (Some(r), Some(n)) => Some((r.last.0.saturating_add(1)).saturating_sub(n.0)),
            (Some(r), None) => Some(u64::try_from(r.len()).unwrap_or(u64::MAX)),
            _ => None,
        };
        Ok(GuidPoolStatus {
            fabric: self.fabric().clone(),
            revision: rev,
            range: range.map(|r| RangeView {
                first: r.first,
                last: r.last,
                size: u64::try_from(r.len()).unwrap_or(u64::MAX),
            }),
            next: cursor,
            never_offered,
            allocated,
            retired,
            outside_range: outside,
            hosts: per
                .into_iter()
                .map(|(host, (allocated, retired))| HostGuids {
                    host,
                    allocated,
                    retired,
                })
                .collect(),
            index,
        })
    }

    /// Asks the fabric controller to take a lost host's orphaned
    /// membership(s) out of the SM: writes `/P/F/revoke/H/<guid>` =
    /// `{"by": actor}`, in transactions that also check that the host key is
    /// still absent and each observed entry unchanged since it was read.
    /// Refused for a live host (it releases its memberships itself) and for
    /// a GUID the controller observed nothing of. A GUID already requested is
    /// left as it is. The GUIDs stay allocated to the host in the pool: never
    /// reissued.
    ///
    /// # Errors
    /// [`RevokeError`]: a refusal, a bad actor, etcd unreachable.
    pub async fn request_revoke(
        &self,
        host: &Name,
        target: RevokeTarget,
        actor: &str,
    ) -> Result<RevokeOutcome, RevokeError> {
        check_label(RevokeRecord::KIND, "by", actor).map_err(|e| {
            RevokeError::Invalid(format!(
                "The actor cannot be recorded: {e}. Hint: a short name without control characters"
            ))
        })?;
        let keys = &self.inner.keys;
        let value = encode(&RevokeRecord {
            by: actor.to_string(),
        });
        let start = Instant::now();
        loop {
            let (rev, host_kv) = self
                .first_read("read the host's record", &keys.host(host))
                .await?;
            if let Some(kv) = host_kv {
                let lease = parse::<HostRecord>(kv.value())
                    .map(|r| r.lease)
                    .unwrap_or_else(|_| kv.lease());
                return Err(RevokeError::HostAlive {
                    host: host.clone(),
                    fabric: self.fabric().clone(),
                    lease,
                });
            }
            let at = At { store: self, rev };
            let observed = at
                .list(
                    "list the host's observed memberships",
                    &keys.observed_of(host),
                )
                .await?;
            let requested: BTreeSet<Guid> = at
                .list("list the host's revoke requests", &keys.revokes_of(host))
                .await?
                .iter()
                .map(|kv| value::guid_from_key(kv.key()).map_err(|e| Self::bad(kv.key(), e)))
                .collect::<Result<_, _>>()?;
            let mut held: Vec<(Guid, i64)> = Vec::new();
            for kv in &observed {
                let g = value::guid_from_key(kv.key()).map_err(|e| Self::bad(kv.key(), e))?;
                let r: ObservedRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                if !r.pkeys.is_empty() {
                    held.push((g, kv.mod_revision()));
                }
            }
            let chosen: Vec<(Guid, i64)> = match target {
                RevokeTarget::Guid(g) => match held.iter().find(|(x, _)| *x == g) {
                    Some(e) => vec![*e],
                    None => {
                        return Err(RevokeError::NotObserved {
                            host: host.clone(),
                            guid: g,
                            fabric: self.fabric().clone(),
                        });
                    }
                },
                RevokeTarget::All if held.is_empty() => {
                    return Err(RevokeError::NothingOrphaned {
                        host: host.clone(),
                        fabric: self.fabric().clone(),
                    });
                }
                RevokeTarget::All => held,
            };
            let (already, fresh): (Vec<_>, Vec<_>) =
                chosen.into_iter().partition(|(g, _)| requested.contains(g));
            let mut written = Vec::new();
            let mut last_rev = 0;
            let mut raced = false;
            for chunk in fresh.chunks(crate::MAX_BATCH) {
                let mut when = vec![Compare::create_revision(
                    keys.host(host),
                    CompareOp::Equal,
                    0,
                )];
                let mut then = Vec::with_capacity(chunk.len());
                for (g, orev) in chunk {
                    when.push(Compare::mod_revision(
                        keys.observed(host, *g),
                        CompareOp::Equal,
                        *orev,
                    ));
                    then.push(TxnOp::put(keys.revoke(host, *g), value.clone(), None));
                }
                let (ok, r) = self
                    .txn(
                        "write revoke requests",
                        Txn::new().when(when).and_then(then),
                    )
                    .await?;
                if !ok {
                    raced = true;
                    break;
                }
                last_rev = r;
                written.extend(chunk.iter().map(|(g, _)| *g));
            }
            if !raced {
                return Ok(RevokeOutcome {
                    fabric: self.fabric().clone(),
                    host: host.clone(),
                    requested: written,
                    already_requested: already.into_iter().map(|(g, _)| g).collect(),
                    by: actor.to_string(),
                    revision: last_rev,
                });
            }
            // The host came back or the controller changed an entry: read
            // again (what was written stays; it is found as requested).
            if start.elapsed() > self.inner.settings.timeout {
                return Err(FleetError::Contended {
                    op: "write revoke requests",
                    waited: start.elapsed(),
                }
                .into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Fleet {
    /// See [`FleetStore::status`].
    ///
    /// # Errors
    /// As there.
    pub fn status(&self) -> Result<FleetStatus, FleetError> {
        self.rt.block_on(self.store.status())
    }
    /// See [`FleetStore::guid_pool`].
    ///
    /// # Errors
    /// As there.
    pub fn guid_pool(&self) -> Result<GuidPoolStatus, FleetError> {
        self.rt.block_on(self.store.guid_pool())
    }
    /// See [`FleetStore::request_revoke`].
    ///
    /// # Errors
    /// As there.
    pub fn request_revoke(
        &self,
        host: &Name,
        target: RevokeTarget,
        actor: &str,
    ) -> Result<RevokeOutcome, RevokeError> {
        self.rt
            .block_on(self.store.request_revoke(host, target, actor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(pkeys: &[u16], rev: i64) -> (DesiredRecord, i64) {
        (
            DesiredRecord::new(
                "t".parse().expect("tenant"),
                pkeys.iter().map(|p| PKey(*p)).collect(),
            )
            .expect("desired"),
            rev,
        )
    }
    fn o(pkeys: &[u16], rev: i64) -> ObservedRecord {
        ObservedRecord::new(pkeys.iter().map(|p| PKey(*p)).collect(), 1, rev).expect("observed")
    }

    #[test]
    fn the_state_of_a_port() {
        use MembershipState as S;
        assert_eq!(
            state_of(true, Some(&d(&[0x8001], 10)), None),
            Some(S::Pending)
        );
        assert_eq!(
            state_of(true, Some(&d(&[0x8001], 10)), Some(&o(&[0x8001], 9))),
            Some(S::Pending)
        );
        assert_eq!(
            state_of(true, Some(&d(&[0x8001], 10)), Some(&o(&[0x8001], 10))),
            Some(S::InSync)
        );
        assert_eq!(
            state_of(true, Some(&d(&[0x8001], 10)), Some(&o(&[0x8002], 12))),
            Some(S::Mismatch)
        );
        assert_eq!(
            state_of(true, None, Some(&o(&[0x8001], 3))),
            Some(S::Releasing)
        );
        assert_eq!(
            state_of(false, None, Some(&o(&[0x8001], 3))),
            Some(S::Orphaned)
        );
        assert_eq!(state_of(false, None, Some(&o(&[], 3))), None);
        assert_eq!(state_of(true, None, None), None);
    }

    #[test]
    fn the_agreed_values_parse_strictly() {
        let l: LeaderRecord = parse(br#"{"controller":"ctl-a","lease":7}"#).expect("leader");
        assert_eq!(l.lease, 7);
        assert!(parse::<LeaderRecord>(br#"{"controller":"","lease":7}"#).is_err());
        assert!(parse::<LeaderRecord>(br#"{"controller":"a","lease":7,"x":1}"#).is_err());
        let s: ControllerStatusRecord = parse(
            br#"{"controller":"a","generation":3,"applied_revision":40,"pending":0,"time":"2026-12-05T03:00:00Z"}"#,
        )
        .expect("status");
        assert_eq!(s.generation, 3);
        assert!(parse::<RevokeRecord>(b"{\"by\":\"a\\u0007\"}").is_err());
        assert_eq!(
            encode(&RevokeRecord { by: "uid 0".into() }),
            br#"{"by":"uid 0"}"#
        );
    }
}
