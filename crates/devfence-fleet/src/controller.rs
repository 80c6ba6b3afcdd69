//! The fabric controller (issue 13 item 2, docs/fleet.md): one active per
//! fabric, elected through an etcd lease, standbys ready.
//!
//! * **Election.** `/P/F/leader` is created in a transaction
//!   `create_revision(key) == 0 → put {controller, lease} under the lease`;
//!   the key's **create revision is the fencing token** (a newer leader always
//!   has a higher one). Standbys poll the key (a bounded interval) and take over
//!   when it is gone: its lease was revoked (a clean stop) or expired.
//! * **Losing it.** The lease is refreshed every third of its TTL; the
//!   controller stops applying at once when the lease is found gone, or when no
//!   refresh succeeded for half a TTL (etcd may expire it at a whole TTL).
//! * **One round** ([`Controller::round`]): read the desired memberships of
//!   every host, the live host keys, the observed memberships, the revoke
//!   requests and the leader key at **one** etcd revision R; [`plan`] what the
//!   SM must change; wait the batching window after the first change and read
//!   again (folding what came meanwhile); stage it all, **one** apply (one
//!   sweep); read back at the SA ([`devfence_fabric::wait_verified`]); check the
//!   fencing token at the SM; publish observed records (with the sweep's
//!   generation and `desired_revision = R`) through writes guarded by
//!   leadership (the leader key still held by the lease, with the token as its
//!   create revision); write `/P/F/controller/status`.
//! * **Fencing at the SM.** The token is handed to the backend
//!   ([`SubnetManager::set_fence_token`]): OpenSM writes it into devfence's
//!   block of the partitions file and refuses an apply over a higher one, so a
//!   controller that lost leadership while it was paused can never apply on
//!   stale data. UFM cannot carry a token (docs/fleet.md, limitations).
//! * **Orphaned** memberships (observed, pkeys non-empty, the host's key gone)
//!   stay at the SM and are reported; an operator's `/P/F/revoke/H/<guid>`
//!   takes one out, after which the revoke key and the observed entry are
//!   deleted. A desired entry deleted while its host is alive is a release:
//!   removed at the SM, published as an observed entry with no P_Keys.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use devfence_fabric::{Change, Expectation, FabricError, PartitionKey, SubnetManager};
use devfence_model::{Guid, Membership, PKey};
use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
};
use serde::{Deserialize, Serialize};

use crate::value::{self, Name, ObservedRecord, Record, ValueError, encode, parse};
use crate::{DesiredEntry, FleetError, FleetStore, Guard, ObservedEntry, PAGE, prefix_end};

/// `/P/F/leader`: who leads the fabric, under its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderRecord {
    /// The controller's name.
    pub controller: Name,
    /// Its lease.
    pub lease: i64,
}
impl Record for LeaderRecord {
    const KIND: &'static str = "fabric controller leader";
}

/// `/P/F/revoke/H/<guid>`: an operator asks the controller to take an
/// orphaned GUID out of the SM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRecord {
    /// Who asked.
    pub by: String,
}
impl Record for RevokeRecord {
    const KIND: &'static str = "revoke request";
    fn check(&self) -> Result<(), ValueError> {
        if self.by.is_empty() || self.by.len() > 256 || self.by.chars().any(char::is_control) {
            return Err(ValueError::Bounds {
                kind: Self::KIND,
                why: "by must be 1-256 printable characters".into(),
            });
        }
        Ok(())
    }
}

/// `/P/F/controller/status`: the leading controller's last batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerStatus {
    /// The controller.
    pub controller: Name,
    /// The SM generation of its last published batch (0: none yet).
    pub generation: u64,
    /// The etcd revision of the desired view it last applied.
    pub applied_revision: i64,
    /// Changes not applied yet (a failed batch, an entry it cannot apply).
    pub pending: u64,
    /// When it was written (RFC 3339, UTC).
    pub time: String,
}
impl Record for ControllerStatus {
    const KIND: &'static str = "fabric controller status";
    fn check(&self) -> Result<(), ValueError> {
        if self.applied_revision < 0 || self.time.len() > 64 {
            return Err(ValueError::Bounds {
                kind: Self::KIND,
                why: "a negative revision or an overlong time".into(),
            });
        }
        Ok(())
    }
}

/// What a controller is told.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Its name (in the leader key and the status).
    pub name: Name,
    /// The batching window (`[fleet] batch_window_ms`).
    pub batch_window: Duration,
    /// How often a standby looks at the leader key and the leader at the
    /// desired state when idle.
    pub poll_interval: Duration,
    /// How long one batch may take to verify at the SM.
    pub verify_timeout: Duration,
}

impl ControllerConfig {
    /// Defaults for `name` with `settings`' batching window.
    #[must_use]
    pub fn new(name: Name, settings: &crate::FleetSettings) -> Self {
        Self {
            name,
            batch_window: settings.batch_window,
            poll_interval: Duration::from_millis(200),
            verify_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a controller's round or election failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The fleet store failed (a failed guard is [`FleetError::Fenced`]).
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The SM refused or failed the batch (a newer leader's fence is
    /// [`FabricError::Refused`]).
    #[error("The batch could not be applied at the SM")]
    Fabric(#[source] FabricError),
    /// The batch did not verify at the SM: nothing was published.
    #[error("The batch did not verify at the SM; nothing was published (retried next round)")]
    NotVerified(#[source] devfence_fabric::NotVerified),
    /// The leader key is not this controller's any more.
    #[error(
        "This controller (token {token}) no longer holds the leader key of its fabric. Hint: another controller leads; this one stands by"
    )]
    NotLeader {
        /// Its token.
        token: i64,
    },
    /// The lease is gone or was not refreshed for half its TTL.
    #[error("This controller's lease is lost: it stops applying and stands by")]
    LeaseLost,
    /// The SM's configuration holds another fencing token than ours after the
    /// apply: another controller applied; nothing is published.
    #[error(
        "The SM holds fencing token {found:?}, not this controller's {ours}: another controller applied; nothing was published"
    )]
    FenceMismatch {
        /// Ours.
        ours: i64,
        /// What the SM holds.
        found: Option<u64>,
    },
    /// A blocking task failed.
    #[error("The controller's SM task ended abnormally: {0}")]
    Task(String),
}

impl ControllerError {
    /// True when this controller must stop leading (its writes are fenced).
    #[must_use]
    pub fn ends_leadership(&self) -> bool {
        matches!(
            self,
            ControllerError::Fleet(FleetError::Fenced { .. })
                | ControllerError::NotLeader { .. }
                | ControllerError::LeaseLost
                | ControllerError::FenceMismatch { .. }
        ) || matches!(self, ControllerError::Fabric(FabricError::Refused { detail, .. }) if detail.contains("fencing token"))
    }
}

type Result<T, E = ControllerError> = std::result::Result<T, E>;

/// A port's membership to set at the SM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetPort {
    /// The host that desires it.
    pub host: Name,
    /// The port.
    pub guid: Guid,
    /// The P_Keys (with the membership bit).
    pub pkeys: Vec<PKey>,
}

/// A port to take out of every managed partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovePort {
    /// The host of its observed entry.
    pub host: Name,
    /// The port.
    pub guid: Guid,
    /// What it was observed with.
    pub pkeys: Vec<PKey>,
}

/// What one round must do, from one view of etcd at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The revision the view was read at.
    pub revision: i64,
    /// Desired memberships not yet observed as they are now.
    pub set: Vec<SetPort>,
    /// Desired entries deleted while the host is alive (explicit release).
    pub release: Vec<RemovePort>,
    /// Orphaned entries an operator asked to revoke.
    pub revoke: Vec<RemovePort>,
    /// Revoke requests with nothing (left) to revoke: their keys are deleted.
    pub stale_revokes: Vec<(Name, Guid)>,
    /// Observed memberships of hosts without a live key: kept, reported.
    pub orphaned: Vec<RemovePort>,
    /// Entries that cannot be acted on, and why (reported, pending).
    pub refused: Vec<(Name, Guid, String)>,
}

impl Plan {
    /// True when the SM has nothing to change and etcd nothing to clean.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.set.is_empty()
            && self.release.is_empty()
            && self.revoke.is_empty()
            && self.stale_revokes.is_empty()
    }
    /// Changes this plan makes.
    #[must_use]
    pub fn changes(&self) -> usize {
        self.set.len() + self.release.len() + self.revoke.len() + self.stale_revokes.len()
    }
}

/// One consistent read of the fabric's state.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The revision of every list below.
    pub revision: i64,
    /// The leader key at that revision: its record and create revision.
    pub leader: Option<(LeaderRecord, i64, i64)>,
    /// Every host's desired memberships.
    pub desired: Vec<DesiredEntry>,
    /// Hosts with a live key.
    pub hosts: BTreeSet<Name>,
    /// Every observed membership.
    pub observed: Vec<ObservedEntry>,
    /// Revoke requests.
    pub revokes: BTreeSet<(Name, Guid)>,
}

fn partitions_of(pkeys: &[PKey]) -> std::result::Result<Vec<(PartitionKey, Membership)>, String> {
    pkeys
        .iter()
        .map(|p| {
            PartitionKey::new(p.0)
                .map(|k| (k, p.membership()))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// What the SM must change for `view` (a pure function; docs/fleet.md).
#[must_use]
pub fn plan(view: &View) -> Plan {
    let mut p = Plan {
        revision: view.revision,
        ..Plan::default()
    };
    let observed: BTreeMap<(&Name, Guid), &ObservedEntry> = view
        .observed
        .iter()
        .map(|o| ((&o.host, o.guid), o))
        .collect();
    let desired: BTreeSet<(&Name, Guid)> = view.desired.iter().map(|d| (&d.host, d.guid)).collect();
    for d in &view.desired {
        if let Err(why) = partitions_of(&d.record.pkeys) {
            p.refused.push((d.host.clone(), d.guid, why));
            continue;
        }
        if view.revokes.contains(&(d.host.clone(), d.guid)) {
            p.refused.push((
                d.host.clone(),
                d.guid,
                "a revoke request for a GUID its live host still desires: not acted on".into(),
            ));
        }
        let current = observed.get(&(&d.host, d.guid)).is_some_and(|o| {
            o.record.pkeys == d.record.pkeys && o.record.desired_revision >= d.revision
        });
        if !current {
            p.set.push(SetPort {
                host: d.host.clone(),
                guid: d.guid,
                pkeys: d.record.pkeys.clone(),
            });
        }
    }
    for o in &view.observed {
        if desired.contains(&(&o.host, o.guid)) || o.record.pkeys.is_empty() {
            continue;
        }
        let port = RemovePort {
            host: o.host.clone(),
            guid: o.guid,
            pkeys: o.record.pkeys.clone(),
        };
        if view.revokes.contains(&(o.host.clone(), o.guid)) {
            p.revoke.push(port);
        } else if view.hosts.contains(&o.host) {
            p.release.push(port);
        } else {
            p.orphaned.push(port);
        }
    }
    for (h, g) in &view.revokes {
        let live = observed
            .get(&(h, *g))
            .is_some_and(|o| !o.record.pkeys.is_empty());
        if !live && !desired.contains(&(h, *g)) {
            p.stale_revokes.push((h.clone(), *g));
        }
    }
    p
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// The revision it read.
    pub revision: i64,
    /// Whether it applied at the SM.
    pub applied: bool,
    /// The SM generation it verified at (0: none).
    pub generation: u64,
    /// Observed entries it wrote or deleted.
    pub published: usize,
    /// Orphaned memberships kept at the SM.
    pub orphaned: Vec<(Name, Guid)>,
    /// GUIDs revoked (removed at the SM, their keys deleted).
    pub revoked: Vec<(Name, Guid)>,
    /// GUIDs released.
    pub released: Vec<(Name, Guid)>,
    /// Entries it could not act on.
    pub refused: Vec<(Name, Guid, String)>,
}

/// Counters of one controller (for tests, metrics and the status route).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControllerStats {
    /// Rounds run while leading.
    pub rounds: u64,
    /// Applies at the SM (each one sweep).
    pub applies: u64,
    /// Batches whose verification failed.
    pub failed_batches: u64,
    /// Applies the SM refused because of a newer leader's fence.
    pub fenced_at_sm: u64,
    /// Times it became the leader.
    pub elected: u64,
    /// Rounds woken by the watch on desired memberships before the poll.
    pub woken: u64,
}

/// This controller's hold on the leader key.
#[derive(Debug)]
pub struct Leadership {
    key: String,
    lease: i64,
    token: i64,
    lease_ttl: Duration,
    lost: Arc<AtomicBool>,
    /// Milliseconds since `epoch` when the last refresh that succeeded was sent.
    last_ok: Arc<AtomicU64>,
    epoch: Instant,
    keeper: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// The lease.
    #[must_use]
    pub fn lease(&self) -> i64 {
        self.lease
    }
    /// The fencing token (the leader key's create revision).
    #[must_use]
    pub fn token(&self) -> i64 {
        self.token
    }
    /// True once the lease is gone or was not refreshed for half its TTL.
    #[must_use]
    pub fn is_lost(&self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return true;
        }
        let since = self
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ok.load(Ordering::SeqCst)));
        since >= self.lease_ttl / 2
    }
    /// The guards every write of this leader carries.
    #[must_use]
    pub fn guards(&self) -> Vec<Guard> {
        leader_guards(&self.key, self.lease, self.token)
    }
}

fn leader_guards(key: &str, lease: i64, token: i64) -> Vec<Guard> {
    vec![
        Guard::LeaseHolds {
            key: key.to_string(),
            lease,
        },
        Guard::CreateRevision {
            key: key.to_string(),
            revision: token,
        },
    ]
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Refreshes `lease` every third of `ttl`; records when the last good refresh
/// was sent; marks it lost when etcd says it is gone.
async fn keep_lease(
    store: FleetStore,
    lease: i64,
    ttl: Duration,
    lost: Arc<AtomicBool>,
    last_ok: Arc<AtomicU64>,
    epoch: Instant,
) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        let sent = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let r = store
            .call("keep the controller's lease alive", |mut c| async move {
                refresh(&mut c, lease).await
            })
            .await;
        match r {
            Ok(true) => last_ok.store(sent, Ordering::SeqCst),
            Ok(false) => {
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(_) => {}
        }
    }
}

/// One refresh of `lease`: `true` when etcd refreshed it, `false` when it is
/// gone. etcd-client's `lease_keep_alive` sends the first request of the
/// stream and reads its answer itself (a TTL of 0 or less is its
/// `LeaseKeepAliveError`); waiting for another message on the returned stream
/// would wait for an answer to a request never sent.
pub(crate) async fn refresh(
    c: &mut etcd_client::Client,
    lease: i64,
) -> std::result::Result<bool, etcd_client::Error> {
    match c.lease_keep_alive(lease).await {
        Ok(_) => Ok(true),
        Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

type Hook = Arc<dyn Fn() + Send + Sync>;

/// A standby's lease: id, lost flag, last good refresh, epoch, keeper.
type PendingLease = (
    i64,
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Instant,
    tokio::task::JoinHandle<()>,
);

/// A fabric controller: elect, batch, apply, verify, publish.
pub struct Controller {
    store: FleetStore,
    sm: Arc<dyn SubnetManager>,
    cfg: ControllerConfig,
    stats: Mutex<ControllerStats>,
    leading: AtomicBool,
    last: Mutex<Option<RoundReport>>,
    last_error: Mutex<Option<String>>,
    /// The last leadership held: (lease, token).
    held: Mutex<Option<(i64, i64)>>,
    generation: AtomicU64,
    sm_fenced: AtomicBool,
    before_apply: Mutex<Option<Hook>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.cfg.name)
            .field("fabric", self.store.fabric())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// RFC 3339 UTC, seconds.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut s = String::with_capacity(20);
    let _ = write!(
        s,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    s
}

impl FleetStore {
    fn leader_key(&self) -> String {
        format!("{}/leader", self.inner.keys.fab)
    }
    fn revoke_prefix(&self) -> String {
        format!("{}/revoke/", self.inner.keys.fab)
    }
    fn revoke_key(&self, h: &Name, g: Guid) -> String {
        format!(
            "{}/revoke/{h}/{}",
            self.inner.keys.fab,
            value::guid_segment(g)
        )
    }
    fn status_key(&self) -> String {
        format!("{}/controller/status", self.inner.keys.fab)
    }
    fn hosts_prefix(&self) -> String {
        format!("{}/host/", self.inner.keys.fab)
    }

    /// The fabric's leading controller: its record and fencing token (the
    /// leader key's create revision), or `None` when no controller leads.
    ///
    /// # Errors
    /// etcd unreachable, a bad value.
    pub async fn read_leader(&self) -> Result<Option<(LeaderRecord, i64)>, FleetError> {
        let key = self.leader_key();
        match self.get_one("read the fabric's leader", &key).await? {
            None => Ok(None),
            Some(kv) => {
                let r = parse::<LeaderRecord>(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                Ok(Some((r, kv.create_revision())))
            }
        }
    }

    /// The leading controller's last status, or `None`.
    ///
    /// # Errors
    /// etcd unreachable, a bad value.
    pub async fn read_controller_status(&self) -> Result<Option<ControllerStatus>, FleetError> {
        Ok(self
            .get_record::<ControllerStatus>("read the controller's status", &self.status_key())
            .await?
            .map(|(r, _)| r))
    }

    /// Every key under `prefix` at revision `rev` (paged).
    async fn list_at(
        &self,
        op: &'static str,
        prefix: &str,
        rev: i64,
    ) -> Result<Vec<KeyValue>, FleetError> {
        self.range_at(op, prefix.as_bytes().to_vec(), prefix_end(prefix), rev)
            .await
    }

    /// Every key in `[from, end)` at revision `rev`, paged; more than
    /// [`crate::MAX_LIST`] is refused.
    pub(crate) async fn range_at(
        &self,
        op: &'static str,
        from: Vec<u8>,
        end: Vec<u8>,
        rev: i64,
    ) -> Result<Vec<KeyValue>, FleetError> {
        let what = String::from_utf8_lossy(&from).into_owned();
        let mut from = from;
        let mut out = Vec::new();
        loop {
            let (f, e) = (from.clone(), end.clone());
            let mut r = self
                .call(op, |mut c| {
                    let (f, e) = (f.clone(), e.clone());
                    async move {
                        c.get(
                            f,
                            Some(
                                GetOptions::new()
                                    .with_range(e)
                                    .with_limit(PAGE)
                                    .with_revision(rev),
                            ),
                        )
                        .await
                    }
                })
                .await?;
            let more = r.more();
            let kvs = r.take_kvs();
            let Some(last) = kvs.last() else { break };
            let mut next = last.key().to_vec();
            next.push(0);
            out.extend(kvs);
            if out.len() > crate::MAX_LIST {
                return Err(FleetError::TooMany { what });
            }
            if !more {
                break;
            }
            from = next;
        }
        Ok(out)
    }

    /// The fabric's state at one revision (the controller's view).
    ///
    /// # Errors
    /// etcd unreachable, a bad key or value.
    pub async fn read_view(&self) -> Result<View, FleetError> {
        let lk = self.leader_key();
        let r = self
            .call("read the fabric's leader", |mut c| {
                let k = lk.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        let revision = r.header().map_or(0, |h| h.revision());
        let leader = match r.kvs().first() {
            None => None,
            Some(kv) => Some((
                parse::<LeaderRecord>(kv.value()).map_err(|e| Self::bad(kv.key(), e))?,
                kv.create_revision(),
                kv.lease(),
            )),
        };
        let keys = &self.inner.keys;
        let desired = self
            .list_at("list desired memberships", &keys.desired_all(), revision)
            .await?
            .iter()
            .map(|kv| {
                let (host, guid) = Self::host_guid(kv.key())?;
                Ok(DesiredEntry {
                    host,
                    guid,
                    record: parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?,
                    revision: kv.mod_revision(),
                })
            })
            .collect::<Result<Vec<_>, FleetError>>()?;
        let observed = self
            .list_at("list observed memberships", &keys.observed_all(), revision)
            .await?
            .iter()
            .map(|kv| {
                let (host, guid) = Self::host_guid(kv.key())?;
                Ok(ObservedEntry {
                    host,
                    guid,
                    record: parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?,
                    revision: kv.mod_revision(),
                })
            })
            .collect::<Result<Vec<_>, FleetError>>()?;
        let mut hosts = BTreeSet::new();
        for kv in self
            .list_at("list live hosts", &self.hosts_prefix(), revision)
            .await?
        {
            let h: value::HostRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
            hosts.insert(h.host);
        }
        let mut revokes = BTreeSet::new();
        for kv in self
            .list_at("list revoke requests", &self.revoke_prefix(), revision)
            .await?
        {
            let _: RevokeRecord = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
            revokes.insert(Self::host_guid(kv.key())?);
        }
        Ok(View {
            revision,
            leader,
            desired,
            hosts,
            observed,
            revokes,
        })
    }

    /// Deletes an observed entry and its revoke request, if `guards` hold.
    async fn finish_revoke(&self, guards: &[Guard], h: &Name, g: Guid) -> Result<(), FleetError> {
        let txn = Txn::new()
            .when(guards.iter().map(Guard::compare).collect::<Vec<_>>())
            .and_then(vec![
                TxnOp::delete(self.inner.keys.observed(h, g), None::<DeleteOptions>),
                TxnOp::delete(self.revoke_key(h, g), None::<DeleteOptions>),
            ]);
        if self.txn("finish a revoke", txn).await?.0 {
            Ok(())
        } else {
            Err(FleetError::Fenced {
                op: "finish a revoke",
            })
        }
    }

    async fn put_status(&self, guards: &[Guard], s: &ControllerStatus) -> Result<(), FleetError> {
        let txn = Txn::new()
            .when(guards.iter().map(Guard::compare).collect::<Vec<_>>())
            .and_then(vec![TxnOp::put(self.status_key(), encode(s), None)]);
        if self.txn("write the controller's status", txn).await?.0 {
            Ok(())
        } else {
            Err(FleetError::Fenced {
                op: "write the controller's status",
            })
        }
    }
}

impl crate::Fleet {
    /// See [`FleetStore::read_leader`].
    ///
    /// # Errors
    /// As there.
    pub fn read_leader(&self) -> Result<Option<(LeaderRecord, i64)>, FleetError> {
        self.rt.block_on(self.store.read_leader())
    }
    /// See [`FleetStore::read_controller_status`].
    ///
    /// # Errors
    /// As there.
    pub fn read_controller_status(&self) -> Result<Option<ControllerStatus>, FleetError> {
        self.rt.block_on(self.store.read_controller_status())
    }
}

impl Controller {
    /// A controller of `store`'s fabric driving `sm`.
    #[must_use]
    pub fn new(store: FleetStore, sm: Arc<dyn SubnetManager>, cfg: ControllerConfig) -> Self {
        Self {
            store,
            sm,
            cfg,
            stats: Mutex::new(ControllerStats::default()),
            leading: AtomicBool::new(false),
            last: Mutex::new(None),
            last_error: Mutex::new(None),
            held: Mutex::new(None),
            generation: AtomicU64::new(0),
            sm_fenced: AtomicBool::new(false),
            before_apply: Mutex::new(None),
        }
    }

    /// Its name.
    #[must_use]
    pub fn name(&self) -> &Name {
        &self.cfg.name
    }
    /// Its counters.
    #[must_use]
    pub fn stats(&self) -> ControllerStats {
        *lock(&self.stats)
    }
    /// True while it leads.
    #[must_use]
    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }
    /// The report of its last round that ran to its end.
    #[must_use]
    pub fn last_report(&self) -> Option<RoundReport> {
        lock(&self.last).clone()
    }
    /// The last error a round ended with (with its sources), if any.
    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }
    /// The guards of the last leadership it held (lease, token): what its
    /// writes carried, and what fails once another controller leads.
    #[must_use]
    pub fn last_guards(&self) -> Option<Vec<Guard>> {
        lock(&self.held).map(|(lease, token)| leader_guards(&self.store.leader_key(), lease, token))
    }
    /// Whether the SM backend carries the fencing token (false on UFM).
    #[must_use]
    pub fn fenced_at_sm(&self) -> bool {
        self.sm_fenced.load(Ordering::SeqCst)
    }

    /// Sets a function run on the SM's thread just before each apply (tests
    /// pause a leader there, as a SIGSTOP would).
    #[doc(hidden)]
    pub fn set_before_apply(&self, f: impl Fn() + Send + Sync + 'static) {
        *lock(&self.before_apply) = Some(Arc::new(f));
    }

    /// Campaigns until it leads; `None` when `stop` turned true first.
    ///
    /// # Errors
    /// etcd refused a request (not a reachability problem: that is retried).
    pub async fn campaign(
        &self,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Leadership>> {
        let ttl = self.store.settings().lease_ttl;
        let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(15);
        let key = self.store.leader_key();
        let mut lease: Option<PendingLease> = None;
        loop {
            if *stop.borrow() {
                if let Some((id, .., keeper)) = lease.take() {
                    keeper.abort();
                    self.revoke_lease(id).await;
                }
                return Ok(None);
            }
            let attempt: Result<Option<Leadership>, FleetError> = async {
                if lease.as_ref().is_some_and(|l| l.1.load(Ordering::SeqCst)) {
                    lease = None;
                }
                if lease.is_none() {
                    let epoch = Instant::now();
                    let g = self
                        .store
                        .call("grant the controller's lease", |mut c| async move {
                            c.lease_grant(ttl_s, None).await
                        })
                        .await?;
                    let lost = Arc::new(AtomicBool::new(false));
                    let last_ok = Arc::new(AtomicU64::new(0));
                    let keeper = tokio::spawn(keep_lease(
                        self.store.clone(),
                        g.id(),
                        ttl,
                        Arc::clone(&lost),
                        Arc::clone(&last_ok),
                        epoch,
                    ));
                    lease = Some((g.id(), lost, last_ok, epoch, keeper));
                }
                let Some((id, ..)) = lease.as_ref() else {
                    return Ok(None);
                };
                let id = *id;
                let rec = encode(&LeaderRecord {
                    controller: self.cfg.name.clone(),
                    lease: id,
                });
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![TxnOp::put(
                        key.as_str(),
                        rec,
                        Some(PutOptions::new().with_lease(id)),
                    )]);
                self.store
                    .txn("campaign for the fabric's leadership", txn)
                    .await?;
                // Won, or an earlier answer was lost: the key says whose it is.
                match self.store.get_one("read the fabric's leader", &key).await? {
                    Some(kv) if kv.lease() == id => {
                        let Some((_, lost, last_ok, epoch, keeper)) = lease.take() else {
                            return Ok(None);
                        };
                        Ok(Some(Leadership {
                            key: key.clone(),
                            lease: id,
                            token: kv.create_revision(),
                            lease_ttl: ttl,
                            lost,
                            last_ok,
                            epoch,
                            keeper,
                        }))
                    }
                    _ => Ok(None),
                }
            }
            .await;
            match attempt {
                Ok(Some(l)) => {
                    self.elected(&l)?;
                    return Ok(Some(l));
                }
                Ok(None) => {}
                Err(e @ (FleetError::Unavailable { .. } | FleetError::Fenced { .. })) => {
                    tracing::warn!(error = %chain(&e), "campaign: etcd did not answer; retrying");
                }
                Err(e) => return Err(e.into()),
            }
            tokio::select! {
                () = tokio::time::sleep(self.cfg.poll_interval) => {}
                _ = stop.changed() => {}
            }
        }
    }

    fn elected(&self, l: &Leadership) -> Result<()> {
        let token = u64::try_from(l.token).unwrap_or(0);
        let fenced = self
            .sm
            .set_fence_token(token)
            .map_err(ControllerError::Fabric)?;
        self.sm_fenced.store(fenced, Ordering::SeqCst);
        *lock(&self.held) = Some((l.lease, l.token));
        lock(&self.stats).elected += 1;
        self.leading.store(true, Ordering::SeqCst);
        if fenced {
            tracing::info!(controller = %self.cfg.name, fabric = %self.store.fabric(), token = l.token, "leading the fabric");
        } else {
            tracing::warn!(controller = %self.cfg.name, fabric = %self.store.fabric(), token = l.token, backend = self.sm.backend(),
                "leading the fabric; this SM backend cannot carry the fencing token (docs/fleet.md, limitations)");
        }
        Ok(())
    }

    async fn revoke_lease(&self, id: i64) {
        let _ = self
            .store
            .call("revoke the controller's lease", |mut c| async move {
                c.lease_revoke(id).await
            })
            .await;
    }

    /// Gives up leadership at once: the lease is revoked, the leader key goes
    /// with it, and a standby takes over.
    pub async fn resign(&self, l: Leadership) {
        self.leading.store(false, Ordering::SeqCst);
        l.keeper.abort();
        self.revoke_lease(l.lease).await;
        tracing::info!(controller = %self.cfg.name, token = l.token, "resigned: lease revoked");
    }

    /// One round of the leader (module docs). Returns what it did.
    ///
    /// # Errors
    /// [`ControllerError`]; after one that [`ends_leadership`]
    /// (ControllerError::ends_leadership), the caller stops leading.
    pub async fn round(&self, l: &Leadership) -> Result<RoundReport> {
        lock(&self.stats).rounds += 1;
        let mut view = self.store.read_view().await?;
        self.check_leader(l, &view)?;
        let mut p = plan(&view);
        if !p.is_idle() && !self.cfg.batch_window.is_zero() {
            // Fold whatever else arrives within the window into this batch.
            tokio::time::sleep(self.cfg.batch_window).await;
            view = self.store.read_view().await?;
            self.check_leader(l, &view)?;
            p = plan(&view);
        }
        let mut report = RoundReport {
            revision: p.revision,
            orphaned: p
                .orphaned
                .iter()
                .map(|o| (o.host.clone(), o.guid))
                .collect(),
            refused: p.refused.clone(),
            ..RoundReport::default()
        };
        for o in &p.orphaned {
            tracing::warn!(host = %o.host, guid = %o.guid, "orphaned: the host's lease is gone; its membership stays at the SM until an operator revokes it");
        }
        for (h, g, why) in &p.refused {
            tracing::warn!(host = %h, guid = %g, why = %why, "not applied");
        }
        let guards = l.guards();
        if p.is_idle() {
            *lock(&self.last) = Some(report.clone());
            return Ok(report);
        }
        let sm_changes = p.set.len() + p.release.len() + p.revoke.len();
        if sm_changes > 0 {
            if l.is_lost() {
                return Err(ControllerError::LeaseLost);
            }
            let generation = match self.apply_and_verify(&p).await {
                Ok(g) => g,
                Err(e) => {
                    {
                        let mut s = lock(&self.stats);
                        match &e {
                            ControllerError::NotVerified(_) => s.failed_batches += 1,
                            e if e.ends_leadership() => s.fenced_at_sm += 1,
                            _ => {}
                        }
                    }
                    let _ = self
                        .store
                        .put_status(
                            &guards,
                            &self.status(
                                p.revision,
                                u64::try_from(p.changes() + p.refused.len()).unwrap_or(u64::MAX),
                            ),
                        )
                        .await;
                    return Err(e);
                }
            };
            // The fence read back: the SM holds our token (none newer applied).
            if self.fenced_at_sm() {
                let found = self.sm_fence().await?;
                if found != u64::try_from(l.token).ok() {
                    lock(&self.stats).fenced_at_sm += 1;
                    return Err(ControllerError::FenceMismatch {
                        ours: l.token,
                        found,
                    });
                }
            }
            report.applied = true;
            report.generation = generation;
            self.generation.store(generation, Ordering::SeqCst);
            for s in &p.set {
                let rec = ObservedRecord::new(s.pkeys.clone(), generation, p.revision)
                    .map_err(|e| FleetError::Invalid(e.to_string()))?;
                self.store
                    .put_observed(&guards, &s.host, s.guid, &rec)
                    .await?;
                report.published += 1;
            }
            for r in &p.release {
                let rec = ObservedRecord::new(Vec::new(), generation, p.revision)
                    .map_err(|e| FleetError::Invalid(e.to_string()))?;
                self.store
                    .put_observed(&guards, &r.host, r.guid, &rec)
                    .await?;
                report.published += 1;
                report.released.push((r.host.clone(), r.guid));
                tracing::info!(host = %r.host, guid = %r.guid, generation, "released at the SM");
            }
            for r in &p.revoke {
                self.store.finish_revoke(&guards, &r.host, r.guid).await?;
                report.published += 1;
                report.revoked.push((r.host.clone(), r.guid));
                tracing::info!(host = %r.host, guid = %r.guid, generation, "revoked at the SM (operator's request)");
            }
        }
        for (h, g) in &p.stale_revokes {
            self.store.finish_revoke(&guards, h, *g).await?;
        }
        self.store
            .put_status(
                &guards,
                &self.status(
                    p.revision,
                    u64::try_from(p.refused.len()).unwrap_or(u64::MAX),
                ),
            )
            .await?;
        tracing::info!(
            revision = p.revision,
            generation = report.generation,
            published = report.published,
            "batch published"
        );
        *lock(&self.last) = Some(report.clone());
        Ok(report)
    }

    fn status(&self, revision: i64, pending: u64) -> ControllerStatus {
        ControllerStatus {
            controller: self.cfg.name.clone(),
            generation: self.generation.load(Ordering::SeqCst),
            applied_revision: revision,
            pending,
            time: now_rfc3339(),
        }
    }

    fn check_leader(&self, l: &Leadership, v: &View) -> Result<()> {
        match &v.leader {
            Some((_, create, lease)) if *create == l.token && *lease == l.lease => Ok(()),
            _ => Err(ControllerError::NotLeader { token: l.token }),
        }
    }

    async fn sm_fence(&self) -> Result<Option<u64>> {
        let sm = Arc::clone(&self.sm);
        tokio::task::spawn_blocking(move || sm.fence_token())
            .await
            .map_err(|e| ControllerError::Task(e.to_string()))?
            .map_err(ControllerError::Fabric)
    }

    /// Stages the plan's SM changes, applies them once, verifies at the SM;
    /// returns the generation seen.
    async fn apply_and_verify(&self, p: &Plan) -> Result<u64> {
        let mut changes = Vec::new();
        let mut exp_parts: Vec<(Guid, Vec<(PartitionKey, Membership)>)> = Vec::new();
        let mut revoke_parts: Vec<(Guid, Vec<PartitionKey>)> = Vec::new();
        for s in &p.set {
            let parts = partitions_of(&s.pkeys).map_err(|why| {
                FleetError::Invalid(format!(
                    "desired membership of {} on {}: {why}",
                    s.guid, s.host
                ))
            })?;
            changes.push(Change::RemoveAll { guid: s.guid });
            for (k, m) in &parts {
                changes.push(Change::Add {
                    guid: s.guid,
                    partition: *k,
                    membership: *m,
                });
            }
            exp_parts.push((s.guid, parts));
        }
        for r in p.release.iter().chain(&p.revoke) {
            changes.push(Change::RemoveAll { guid: r.guid });
            let parts = r
                .pkeys
                .iter()
                .filter_map(|k| PartitionKey::new(k.0).ok())
                .collect();
            revoke_parts.push((r.guid, parts));
        }
        let sm = Arc::clone(&self.sm);
        let hook = lock(&self.before_apply).clone();
        let deadline = self.cfg.verify_timeout;
        let applied = tokio::task::spawn_blocking(move || -> Result<u64> {
            sm.discard_staged();
            for c in changes {
                if let Err(e) = sm.stage(c) {
                    sm.discard_staged();
                    return Err(ControllerError::Fabric(e));
                }
            }
            if let Some(h) = hook {
                h();
            }
            let ticket = match sm.apply() {
                Ok(t) => t,
                Err(e) => {
                    sm.discard_staged();
                    return Err(ControllerError::Fabric(e));
                }
            };
            let mut exp = Expectation::after(ticket);
            for (g, parts) in exp_parts {
                exp = exp.grant(g, parts);
            }
            for (g, parts) in revoke_parts {
                exp = exp.revoke(g, parts);
            }
            let proof =
                devfence_fabric::wait_verified(sm.as_ref(), &exp, Instant::now() + deadline)
                    .map_err(ControllerError::NotVerified)?;
            Ok(proof.seen.0)
        })
        .await
        .map_err(|e| ControllerError::Task(e.to_string()))?;
        match &applied {
            Ok(_) => lock(&self.stats).applies += 1,
            Err(ControllerError::NotVerified(_)) => lock(&self.stats).applies += 1,
            Err(_) => {}
        }
        applied
    }

    /// Campaigns, leads, and stands by again after losing leadership, until
    /// `stop` turns true; then resigns (the lease revoked: a standby takes over
    /// at once).
    ///
    /// # Errors
    /// etcd refused a request (a configuration or permission problem).
    pub async fn run(&self, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<()> {
        loop {
            let Some(l) = self.campaign(&mut stop).await? else {
                return Ok(());
            };
            // Desired memberships watched: a host's change wakes the next
            // round at once; the poll stays as the net under it.
            let mut watch: Option<etcd_client::WatchStream> = None;
            // The newest revision a round has read: older changes are in it.
            let mut seen = 0i64;
            loop {
                if *stop.borrow() {
                    self.resign(l).await;
                    return Ok(());
                }
                if l.is_lost() {
                    tracing::warn!(controller = %self.cfg.name, token = l.token, "lease lost: standing by");
                    break;
                }
                let round = self.round(&l).await;
                if let Ok(r) = &round {
                    seen = seen.max(r.revision);
                    if watch.is_none() {
                        // From just after what the round read: nothing
                        // written since is missed. Never waits longer than
                        // one poll for a member to answer.
                        watch = tokio::time::timeout(
                            self.cfg.poll_interval,
                            self.store.watch_desired(r.revision.saturating_add(1)),
                        )
                        .await
                        .ok()
                        .and_then(std::result::Result::ok);
                    }
                }
                match round {
                    Ok(_) => *lock(&self.last_error) = None,
                    Err(e) => {
                        let text = chain(&e);
                        *lock(&self.last_error) = Some(text.clone());
                        if e.ends_leadership() {
                            tracing::warn!(controller = %self.cfg.name, token = l.token, error = %text, "no longer the leader: standing by");
                            break;
                        }
                        tracing::warn!(controller = %self.cfg.name, error = %text, "batch failed; retried next round");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(self.cfg.poll_interval) => {}
                    _ = stop.changed() => {}
                    alive = newer_than(&mut watch, seen) => {
                        if alive {
                            lock(&self.stats).woken += 1;
                        } else {
                            // Ended or failed: set up again after the next round.
                            watch = None;
                        }
                    }
                }
            }
            self.leading.store(false, Ordering::SeqCst);
            // Whatever is left of the lease is of no use now.
            l.keeper.abort();
            self.revoke_lease(l.lease).await;
        }
    }
}

/// An error with its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Waits on the watch for a change newer than revision `seen` (what the last
/// round read already covers is skipped, and so is the answer that says the
/// watch was created): true when one came, false when the watch ended or
/// failed. Without a watch it never answers (the poll wakes the round).
async fn newer_than(watch: &mut Option<etcd_client::WatchStream>, seen: i64) -> bool {
    let Some(w) = watch else {
        return std::future::pending().await;
    };
    loop {
        match w.message().await {
            Ok(Some(resp)) if resp.canceled() => return false,
            Ok(Some(resp)) => {
                let newest = resp
                    .events()
                    .iter()
                    .filter_map(|e| e.kv().map(etcd_client::KeyValue::mod_revision))
                    .max();
                if newest.is_some_and(|r| r > seen) {
                    return true;
                }
            }
            Ok(None) | Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::DesiredRecord;

    fn name(s: &str) -> Name {
        s.parse().expect("name")
    }
    fn desired(h: &str, g: u64, pkeys: &[u16], rev: i64) -> DesiredEntry {
        DesiredEntry {
            host: name(h),
            guid: Guid(g),
            record: DesiredRecord::new(
                "red".parse().expect("tenant"),
                pkeys.iter().map(|p| PKey(*p)).collect(),
            )
            .expect("record"),
            revision: rev,
        }
    }
    fn observed(h: &str, g: u64, pkeys: &[u16], rev: i64) -> ObservedEntry {
        ObservedEntry {
            host: name(h),
            guid: Guid(g),
            record: ObservedRecord::new(pkeys.iter().map(|p| PKey(*p)).collect(), 3, rev)
                .expect("record"),
            revision: rev,
        }
    }

    /// Desired → set; observed at an older desired revision → set again;
    /// released (host alive) → remove; orphaned (host gone) → kept and
    /// reported; revoked → remove; a stale revoke → its key deleted.
    #[test]
    fn the_plan_sorts_every_entry() {
        let view = View {
            revision: 50,
            leader: None,
            desired: vec![
                desired("h0", 0x10, &[0x8001], 10),
                desired("h0", 0x12, &[0x8001], 20),
                desired("h1", 0x14, &[0x8002], 11),
                desired("h1", 0x16, &[0xffff], 11),
            ],
            hosts: [name("h0"), name("h1")].into(),
            observed: vec![
                observed("h0", 0x10, &[0x8001], 10),
                observed("h0", 0x12, &[0x8001], 15),
                observed("h1", 0x18, &[0x8002], 9),
                observed("h2", 0x1a, &[0x8003], 9),
                observed("h2", 0x1c, &[0x8003], 9),
                observed("h1", 0x1e, &[], 9),
            ],
            revokes: [(name("h2"), Guid(0x1c)), (name("h2"), Guid(0x20))].into(),
        };
        let p = plan(&view);
        let set: Vec<u64> = p.set.iter().map(|s| s.guid.0).collect();
        assert_eq!(set, [0x12, 0x14]);
        assert_eq!(
            p.release.iter().map(|r| r.guid.0).collect::<Vec<_>>(),
            [0x18]
        );
        assert_eq!(
            p.orphaned.iter().map(|r| r.guid.0).collect::<Vec<_>>(),
            [0x1a]
        );
        assert_eq!(
            p.revoke.iter().map(|r| r.guid.0).collect::<Vec<_>>(),
            [0x1c]
        );
        assert_eq!(p.stale_revokes, [(name("h2"), Guid(0x20))]);
        assert_eq!(p.refused.len(), 1, "{:?}", p.refused);
        assert!(
            p.refused[0].2.contains("default partition"),
            "{:?}",
            p.refused
        );
        assert!(!p.is_idle());
    }

    #[test]
    fn a_current_view_is_idle_and_orphans_alone_change_nothing() {
        let view = View {
            revision: 9,
            leader: None,
            desired: vec![desired("h0", 0x10, &[0x8001], 5)],
            hosts: [name("h0")].into(),
            observed: vec![
                observed("h0", 0x10, &[0x8001], 7),
                observed("gone", 0x12, &[0x8001], 7),
            ],
            revokes: BTreeSet::new(),
        };
        let p = plan(&view);
        assert!(p.is_idle(), "{p:?}");
        assert_eq!(p.orphaned.len(), 1);
    }

    #[test]
    fn records_round_trip_with_bounds() {
        let s = ControllerStatus {
            controller: name("c1"),
            generation: 4,
            applied_revision: 10,
            pending: 0,
            time: now_rfc3339(),
        };
        assert_eq!(parse::<ControllerStatus>(&encode(&s)).expect("parses"), s);
        assert_eq!(s.time.len(), 20, "{}", s.time);
        assert!(s.time.ends_with('Z') && s.time.as_bytes()[10] == b'T');
        let l = LeaderRecord {
            controller: name("c1"),
            lease: 7,
        };
        assert_eq!(
            String::from_utf8(encode(&l)).expect("utf8"),
            r#"{"controller":"c1","lease":7}"#
        );
        assert!(parse::<RevokeRecord>(br#"{"by":""}"#).is_err());
        assert!(parse::<RevokeRecord>(br#"{"by":"ops","x":1}"#).is_err());
        assert!(parse::<RevokeRecord>(br#"{"by":"ops"}"#).is_ok());
    }
}
