//! The fleet's shared facts in etcd (DESIGN.md §8, docs/fleet.md).
//!
//! One host keeps the journal of its own operations in SQLite; what many hosts
//! on one InfiniBand fabric must agree on lives here, per fabric:
//!
//! * the **GUID pool**: a range configured once per fabric; GUIDs are claimed
//!   by transaction (`create_revision == 0` on the GUID's key), in batches of up
//!   to [`MAX_BATCH`] per transaction, from a block of the range each client
//!   reserves; a released GUID is **retired**, never issued again; a GUID
//!   belongs to one fabric (a global index refuses it on a second);
//! * **P_Key ownership**: a partition belongs to one tenant per fabric;
//! * **tenants** and their partitions;
//! * each host's **desired** memberships, written under the host's lease, and
//!   the **observed** memberships with the SM sweep generation that produced
//!   them (written by the fabric controller, behind a [`Guard`]).
//!
//! **Fail closed.** Every operation has a deadline
//! ([`FleetSettings::timeout`]); when no member with a leader answers in time it
//! fails with [`FleetError::Unavailable`] and a hint. Every change is one etcd
//! transaction: it is applied whole or not at all. A change whose answer was
//! lost may still have been applied; each one is safe to repeat (a repeated
//! claim finds its own record, a lost allocation leaves GUIDs held by this host,
//! never issued to another).
//!
//! **Untrusted replies.** Every value and key read back is parsed with bounds
//! ([`value`]); a bad one is [`FleetError::BadValue`] naming the key.
//!
//! The async [`FleetStore`] is for the daemon; [`Fleet`] is a blocking facade
//! with its own runtime for the synchronous core.

pub mod config;
pub mod controller;
pub mod sm;
pub mod status;
pub mod value;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devfence_model::{Guid, PKey, TenantId};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, WatchOptions, WatchStream,
};

pub use config::{FleetBackend, FleetConfig, FleetSettings, TlsFiles};
pub use controller::{Controller, ControllerConfig, ControllerError, ControllerStats};
use value::{
    CursorRecord, DesiredRecord, GuidIndexRecord, GuidRange, GuidRecord, GuidState, HostRecord,
    Name, ObservedRecord, PkeyRecord, Record, TenantRecord, ValueError, encode, parse,
};

/// The most GUIDs one allocation transaction claims: each needs two compares
/// and two puts, and etcd's default `--max-txn-ops` is 128.
pub const MAX_BATCH: usize = 63;
/// Allocation transactions one client keeps in flight.
pub const PIPELINE: usize = 8;
/// The largest block of the range one client reserves at a time.
pub const BLOCK: u64 = 4096;
/// The most keys one listing returns.
pub const MAX_LIST: usize = 1 << 20;
/// Keys per page of a listing.
const PAGE: i64 = 2000;
/// The largest TLS file (CA, certificate, key) read.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why an etcd operation did not complete.
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    /// No member answered within the deadline.
    #[error("No answer within {0:?}")]
    Timeout(Duration),
    /// The last member tried answered with an error.
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
}

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The configuration or a TLS file cannot be used.
    #[error("{0}")]
    Config(String),
    /// No quorum answered in time: nothing that needs a shared fact proceeds.
    #[error(
        "The fleet store (etcd at {endpoints}) did not answer {op} within {waited:?}: nothing that needs it proceeds (a change in flight is applied whole or not at all). Hint: check `etcdctl endpoint health --cluster`; a majority of members must be up and reachable, and [fleet] endpoints/ca/cert/key must match them"
    )]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// The endpoints tried.
        endpoints: String,
        /// How long it tried.
        waited: Duration,
        /// The last failure.
        #[source]
        source: Unreachable,
    },
    /// A member's certificate does not verify against `[fleet] ca`.
    #[error(
        "The etcd member at {endpoint} presented a certificate that [fleet] ca does not verify; devfence never talks to an unverified member. Hint: ca must be the CA that signed the members' certificates"
    )]
    TlsRefused {
        /// The member.
        endpoint: String,
        /// The TLS error.
        #[source]
        source: etcd_client::Error,
    },
    /// etcd refused the request (not a reachability problem).
    #[error("etcd refused {op}. Hint: check the member's log and the client's permissions")]
    Etcd {
        /// The operation.
        op: &'static str,
        /// etcd's answer.
        #[source]
        source: etcd_client::Error,
    },
    /// A value or key read from etcd is not one devfence writes.
    #[error(
        "The fleet store holds a value devfence cannot use at {key}. Hint: another writer or a damaged store; inspect it with `etcdctl get {key}`"
    )]
    BadValue {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: ValueError,
    },
    /// The fabric has no GUID range yet.
    #[error(
        "Fabric {fabric} has no GUID range. Hint: configure it once for the fleet (`configure_guid_range`)"
    )]
    NoRange {
        /// The fabric.
        fabric: Name,
    },
    /// The fabric's range was configured with other bounds; it is set once.
    #[error(
        "Fabric {fabric}'s GUID range is {configured}, not {asked}. Hint: a range is configured once per fabric and never changed (GUIDs issued from it are never reissued)"
    )]
    RangeMismatch {
        /// The fabric.
        fabric: Name,
        /// The range in etcd.
        configured: GuidRange,
        /// The range asked for.
        asked: GuidRange,
    },
    /// The range overlaps another fabric's.
    #[error(
        "The GUID range {asked} for fabric {fabric} overlaps fabric {other}'s {theirs}. Hint: a GUID belongs to one fabric; pick a disjoint range"
    )]
    RangeOverlap {
        /// The fabric.
        fabric: Name,
        /// The range asked for.
        asked: GuidRange,
        /// The other fabric.
        other: Name,
        /// Its range.
        theirs: GuidRange,
    },
    /// A bad argument (a reserved GUID, an empty P_Key, a bad range).
    #[error("{0}")]
    Invalid(String),
    /// Every GUID of the range has been issued.
    #[error(
        "Fabric {fabric}'s GUID pool {range} is used up (GUIDs are never reissued). Hint: GUIDs of released VFs are retired, not recycled; a new pool needs a new fabric range"
    )]
    PoolExhausted {
        /// The fabric.
        fabric: Name,
        /// The range.
        range: GuidRange,
    },
    /// The GUID belongs to another fabric.
    #[error(
        "GUID {guid} is on fabric {other}, not {fabric}. Hint: a GUID seen on two fabrics is an error: find which host uses it on {other}"
    )]
    GuidOnOtherFabric {
        /// The GUID.
        guid: Guid,
        /// This fabric.
        fabric: Name,
        /// The fabric it belongs to.
        other: Name,
    },
    /// The GUID is held by another host.
    #[error("GUID {guid} on fabric {fabric} is held by host {holder}, not {host}")]
    GuidHeldByOtherHost {
        /// The GUID.
        guid: Guid,
        /// The fabric.
        fabric: Name,
        /// The holder.
        holder: Name,
        /// The host that asked.
        host: Name,
    },
    /// The GUID was released; it is never issued again.
    #[error(
        "GUID {guid} on fabric {fabric} is retired (released by {host}); it is never issued again. Hint: allocate a fresh GUID"
    )]
    GuidRetired {
        /// The GUID.
        guid: Guid,
        /// The fabric.
        fabric: Name,
        /// The host that released it.
        host: Name,
    },
    /// The GUID is not allocated on this fabric.
    #[error("GUID {guid} is not allocated on fabric {fabric}. Hint: allocate or claim it first")]
    GuidNotAllocated {
        /// The GUID.
        guid: Guid,
        /// The fabric.
        fabric: Name,
    },
    /// The partition belongs to another tenant.
    #[error(
        "P_Key {pkey} on fabric {fabric} belongs to tenant {owner}, not {tenant}. Hint: a partition belongs to one tenant per fabric; choose another P_Key"
    )]
    PkeyOwned {
        /// The partition.
        pkey: PKey,
        /// The fabric.
        fabric: Name,
        /// Its owner.
        owner: TenantId,
        /// The tenant that asked.
        tenant: TenantId,
    },
    /// The partition is not the tenant's.
    #[error(
        "P_Key {pkey} on fabric {fabric} is not claimed by tenant {tenant}. Hint: claim it for the tenant first"
    )]
    PkeyNotOwned {
        /// The partition.
        pkey: PKey,
        /// The fabric.
        fabric: Name,
        /// The tenant.
        tenant: TenantId,
    },
    /// Another live session holds the host's name.
    #[error(
        "Host {host} is already registered on fabric {fabric} by a live session (lease {lease:x}). Hint: another devfence on this host or a host with the same name; it expires after the lease TTL if that process is gone"
    )]
    HostAlreadyRegistered {
        /// The host.
        host: Name,
        /// The fabric.
        fabric: Name,
        /// The other session's lease.
        lease: i64,
    },
    /// The host's lease expired: its desired memberships are gone.
    #[error(
        "Host {host}'s lease on fabric {fabric} is lost (expired or revoked). Hint: register the host again; its desired memberships must be written again"
    )]
    LeaseLost {
        /// The host.
        host: Name,
        /// The fabric.
        fabric: Name,
    },
    /// A guarded write whose guard no longer holds (a fenced-out writer).
    #[error("{op} was refused: its guard no longer holds (another writer took over)")]
    Fenced {
        /// The operation.
        op: &'static str,
    },
    /// Too many concurrent writers kept changing what the operation read.
    #[error(
        "{op} did not settle within {waited:?}: other writers kept changing the same keys. Hint: retry"
    )]
    Contended {
        /// The operation.
        op: &'static str,
        /// How long it tried.
        waited: Duration,
    },
    /// A multi-batch allocation stopped part-way: `done` are held by the host.
    #[error("Allocating GUIDs stopped after {} of them (those are held by this host and never reissued)", done.len())]
    AllocationCut {
        /// The GUIDs allocated before the failure.
        done: Vec<Guid>,
        /// Why it stopped.
        #[source]
        source: Box<FleetError>,
    },
    /// A listing is larger than [`MAX_LIST`].
    #[error("{what} holds more than {MAX_LIST} keys. Hint: a damaged or hostile store")]
    TooMany {
        /// The key prefix.
        what: String,
    },
}

type Result<T, E = FleetError> = std::result::Result<T, E>;

/// A precondition a guarded write (the fabric controller's) carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    /// `key` exists and is attached to `lease` (e.g. the leader key).
    LeaseHolds {
        /// The key.
        key: String,
        /// The lease.
        lease: i64,
    },
    /// `key`'s mod revision is `revision`.
    ModRevision {
        /// The key.
        key: String,
        /// The revision.
        revision: i64,
    },
    /// `key`'s create revision is `revision` (the fabric controller's fencing
    /// token: the leader key was not deleted and created again since).
    CreateRevision {
        /// The key.
        key: String,
        /// The revision.
        revision: i64,
    },
}

impl Guard {
    fn compare(&self) -> Compare {
        match self {
            Guard::LeaseHolds { key, lease } => {
                Compare::lease(key.as_str(), CompareOp::Equal, *lease)
            }
            Guard::ModRevision { key, revision } => {
                Compare::mod_revision(key.as_str(), CompareOp::Equal, *revision)
            }
            Guard::CreateRevision { key, revision } => {
                Compare::create_revision(key.as_str(), CompareOp::Equal, *revision)
            }
        }
    }
}

/// A desired membership read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredEntry {
    /// The host.
    pub host: Name,
    /// The port.
    pub guid: Guid,
    /// What it should hold.
    pub record: DesiredRecord,
    /// The key's mod revision (what observed ≥ desired compares).
    pub revision: i64,
}

/// An observed membership read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedEntry {
    /// The host.
    pub host: Name,
    /// The port.
    pub guid: Guid,
    /// What the SM reported.
    pub record: ObservedRecord,
    /// The key's mod revision.
    pub revision: i64,
}

/// The key layout (docs/fleet.md).
#[derive(Clone, Debug)]
struct Keys {
    root: String,
    fab: String,
}

impl Keys {
    fn new(prefix: &Name, fabric: &Name) -> Self {
        Self {
            root: format!("/{prefix}"),
            fab: format!("/{prefix}/{fabric}"),
        }
    }
    fn range(&self, fabric: &Name) -> String {
        format!("{}/_global/range/{fabric}", self.root)
    }
    fn ranges(&self) -> String {
        format!("{}/_global/range/", self.root)
    }
    fn global_guid(&self, g: Guid) -> String {
        format!("{}/_global/guid/{}", self.root, value::guid_segment(g))
    }
    fn cursor(&self) -> String {
        format!("{}/cursor", self.fab)
    }
    fn guids(&self) -> String {
        format!("{}/guid/", self.fab)
    }
    fn guid(&self, g: Guid) -> String {
        format!("{}/guid/{}", self.fab, value::guid_segment(g))
    }
    fn pkey(&self, p: PKey) -> String {
        format!("{}/pkey/{}", self.fab, value::pkey_segment(p))
    }
    fn tenants(&self) -> String {
        format!("{}/tenants/", self.fab)
    }
    fn tenant(&self, t: &TenantId) -> String {
        format!("{}/tenants/{t}", self.fab)
    }
    fn partitions(&self, t: &TenantId) -> String {
        format!("{}/partitions/{t}/", self.fab)
    }
    fn partition(&self, t: &TenantId, p: PKey) -> String {
        format!("{}/partitions/{t}/{}", self.fab, value::pkey_segment(p))
    }
    fn host(&self, h: &Name) -> String {
        format!("{}/host/{h}", self.fab)
    }
    fn desired_all(&self) -> String {
        format!("{}/desired/", self.fab)
    }
    fn desired_of(&self, h: &Name) -> String {
        format!("{}/desired/{h}/", self.fab)
    }
    fn desired(&self, h: &Name, g: Guid) -> String {
        format!("{}/desired/{h}/{}", self.fab, value::guid_segment(g))
    }
    fn observed_all(&self) -> String {
        format!("{}/observed/", self.fab)
    }
    fn observed_of(&self, h: &Name) -> String {
        format!("{}/observed/{h}/", self.fab)
    }
    fn observed(&self, h: &Name, g: Guid) -> String {
        format!("{}/observed/{h}/{}", self.fab, value::guid_segment(g))
    }
}

/// The key just after every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Whether the error is a member's certificate failing verification: not a
/// reachability problem, and not one another attempt cures.
fn untrusted_peer(e: &etcd_client::Error) -> bool {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(&s.to_string());
        src = s.source();
    }
    text.contains("invalid peer certificate")
}

/// Whether an etcd error means "try another member / try again".
fn retryable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) | E::LeaseKeepAliveError(_) => true,
        // gRPC codes: 1 Cancelled, 2 Unknown, 4 DeadlineExceeded, 14 Unavailable
        // (etcd's "no leader" and "request timed out" are Unavailable).
        E::GRpcStatus(s) => matches!(s.code() as i32, 1 | 2 | 4 | 14),
        _ => false,
    }
}

struct Inner {
    clients: Vec<(String, Client)>,
    current: AtomicUsize,
    settings: FleetSettings,
    keys: Keys,
    range: OnceLock<GuidRange>,
    /// This allocator's view of the cursor: (next, its mod revision).
    cursor: Mutex<Option<(Guid, i64)>>,
    /// The block of the range this client reserved and has not yet offered:
    /// `[next, end)`.
    block: Mutex<Option<(u64, u64)>>,
}

/// The fleet store (async): one per process and fabric; cheap to clone.
#[derive(Clone)]
pub struct FleetStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FleetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetStore")
            .field("endpoints", &self.endpoints())
            .field("fabric", &self.inner.settings.fabric)
            .finish_non_exhaustive()
    }
}

fn read_pem(what: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    devfence_model::bounded::read_file(path, MAX_PEM_BYTES).map_err(|e| {
        FleetError::Config(format!(
            "[fleet] {what} {}: {e}. Hint: a PEM file readable by devfence",
            path.display()
        ))
    })
}

impl FleetStore {
    /// Connects (lazily: no member need be up yet) to every endpoint.
    ///
    /// # Errors
    /// A TLS file that cannot be read or parsed, an endpoint etcd-client refuses.
    pub async fn connect(settings: FleetSettings) -> Result<Self> {
        let mut opts = ConnectOptions::new()
            .with_timeout(settings.timeout)
            .with_connect_timeout(settings.timeout.min(Duration::from_secs(2)))
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(t) = &settings.tls {
            let ca = read_pem("ca", &t.ca)?;
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca));
            if let Some((c, k)) = &t.identity {
                let cert = read_pem("cert", c)?;
                let key = read_pem("key", k)?;
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        let mut clients = Vec::with_capacity(settings.endpoints.len());
        for e in &settings.endpoints {
            let c = Client::connect([e.as_str()], Some(opts.clone()))
                .await
                .map_err(|err| {
                    FleetError::Config(format!(
                        "[fleet] endpoint {e:?} cannot be used: {err}. Hint: https://HOST:PORT with ca"
                    ))
                })?;
            clients.push((e.clone(), c));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                clients,
                current: AtomicUsize::new(0),
                keys: Keys::new(&settings.prefix, &settings.fabric),
                settings,
                range: OnceLock::new(),
                cursor: Mutex::new(None),
                block: Mutex::new(None),
            }),
        })
    }

    /// This store's fabric.
    #[must_use]
    pub fn fabric(&self) -> &Name {
        &self.inner.settings.fabric
    }

    /// The settings it was connected with.
    #[must_use]
    pub fn settings(&self) -> &FleetSettings {
        &self.inner.settings
    }

    fn endpoints(&self) -> String {
        self.inner.settings.endpoints.join(",")
    }

    /// Runs `f` against one member, moving to the next on a timeout or a
    /// reachability error, until it succeeds or the deadline passes. The
    /// member that answered is tried first next time (a paused member costs
    /// one attempt, not one per call).
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let timeout = self.inner.settings.timeout;
        let start = Instant::now();
        let deadline = start + timeout;
        let n = self.inner.clients.len();
        // Each attempt gets a sixth of the deadline with three members (two
        // rounds), but at least 300 ms: a healthy answer takes a few ms, while
        // a write sent to a follower during an election (1–2 s after the
        // leader stops) is lost and hangs until its attempt ends. A third of
        // the deadline per attempt left too little for the round after the
        // election: CI saw two followers hang 1.67 s each, then the paused
        // leader take the rest. A write that timed out but committed is safe
        // to send again: every shared write is a transaction guarded by a
        // compare, and a lease granted twice leaves one to expire unused.
        let rounds = u32::try_from(n.saturating_mul(2))
            .unwrap_or(u32::MAX)
            .max(1);
        let per_try = (timeout / rounds).max(Duration::from_millis(300));
        let first = self.inner.current.load(Ordering::Relaxed);
        let mut last = Unreachable::Timeout(timeout);
        let mut attempt = 0usize;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let i = (first + attempt) % n;
            attempt += 1;
            let t = per_try.min(deadline - now);
            match tokio::time::timeout(t, f(self.inner.clients[i].1.clone())).await {
                Ok(Ok(v)) => {
                    self.inner.current.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) if untrusted_peer(&e) => {
                    return Err(FleetError::TlsRefused {
                        endpoint: self.inner.clients[i].0.clone(),
                        source: e,
                    });
                }
                Ok(Err(e)) if retryable(&e) => {
                    last = Unreachable::Etcd(e);
                    if attempt.is_multiple_of(n) {
                        // Every member refused at once (no leader, connection
                        // refused): pace the next round.
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(Duration::from_millis(50).min(left)).await;
                    }
                }
                Ok(Err(e)) => return Err(FleetError::Etcd { op, source: e }),
                Err(_) => last = Unreachable::Timeout(t),
            }
        }
        Err(FleetError::Unavailable {
            op,
            endpoints: self.endpoints(),
            waited: start.elapsed(),
            source: last,
        })
    }

    async fn get_one(&self, op: &'static str, key: &str) -> Result<Option<KeyValue>> {
        let k = key.to_string();
        let mut r = self
            .call(op, |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        Ok(r.take_kvs().into_iter().next())
    }

    async fn get_record<T: Record>(&self, op: &'static str, key: &str) -> Result<Option<(T, i64)>> {
        match self.get_one(op, key).await? {
            None => Ok(None),
            Some(kv) => {
                let v = parse::<T>(kv.value()).map_err(|source| FleetError::BadValue {
                    key: key.to_string(),
                    source,
                })?;
                Ok(Some((v, kv.mod_revision())))
            }
        }
    }

    async fn txn(&self, op: &'static str, txn: Txn) -> Result<(bool, i64)> {
        let r = self
            .call(op, |mut c| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await?;
        Ok((r.succeeded(), r.header().map_or(0, |h| h.revision())))
    }

    /// Every key under `prefix`, in key order, at one revision (paged).
    async fn list(&self, op: &'static str, prefix: &str) -> Result<Vec<KeyValue>> {
        let end = prefix_end(prefix);
        let mut from = prefix.as_bytes().to_vec();
        let mut out = Vec::new();
        let mut rev = 0i64;
        loop {
            let (f, e) = (from.clone(), end.clone());
            let mut r = self
                .call(op, |mut c| {
                    let (f, e) = (f.clone(), e.clone());
                    async move {
                        let mut o = GetOptions::new().with_range(e).with_limit(PAGE);
                        if rev > 0 {
                            o = o.with_revision(rev);
                        }
                        c.get(f, Some(o)).await
                    }
                })
                .await?;
            if rev == 0 {
                rev = r.header().map_or(0, |h| h.revision());
            }
            let more = r.more();
            let kvs = r.take_kvs();
            let Some(last) = kvs.last() else { break };
            let mut next = last.key().to_vec();
            next.push(0);
            out.extend(kvs);
            if out.len() > MAX_LIST {
                return Err(FleetError::TooMany {
                    what: prefix.to_string(),
                });
            }
            if !more {
                break;
            }
            from = next;
        }
        Ok(out)
    }

    fn bad(key: &[u8], source: ValueError) -> FleetError {
        FleetError::BadValue {
            key: String::from_utf8_lossy(&key[..key.len().min(200)]).into_owned(),
            source,
        }
    }

    // ---------------------------------------------------------------- GUIDs

    /// Configures the fabric's GUID range, once: the same range again is
    /// accepted, another is refused, and so is one overlapping another
    /// fabric's (checked in the same transaction as the write).
    ///
    /// # Errors
    /// A bad range, a different configured range, an overlap, etcd unreachable.
    pub async fn configure_guid_range(&self, range: GuidRange) -> Result<()> {
        range
            .check()
            .map_err(|e| FleetError::Invalid(format!("GUID range {range}: {e}")))?;
        let fabric = self.fabric().clone();
        let key = self.inner.keys.range(&fabric);
        let prefix = self.inner.keys.ranges();
        let deadline = Instant::now() + self.inner.settings.timeout;
        loop {
            let all = self.list("read the fabrics' GUID ranges", &prefix).await?;
            let mut max_rev = 0;
            for kv in &all {
                max_rev = max_rev.max(kv.mod_revision());
                let theirs: GuidRange = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                let other: Name = value::last_segment(kv.key())
                    .map_err(|e| Self::bad(kv.key(), e))?
                    .parse()
                    .map_err(|e: value::NameError| {
                        Self::bad(
                            kv.key(),
                            ValueError::Bounds {
                                kind: "GUID range",
                                why: e.to_string(),
                            },
                        )
                    })?;
                if other == fabric {
                    if theirs == range {
                        let _ = self.inner.range.set(range);
                        return Ok(());
                    }
                    return Err(FleetError::RangeMismatch {
                        fabric,
                        configured: theirs,
                        asked: range,
                    });
                }
                if theirs.overlaps(&range) {
                    return Err(FleetError::RangeOverlap {
                        fabric,
                        asked: range,
                        other,
                        theirs,
                    });
                }
            }
            // No range under the prefix changed or appeared since the listing.
            let txn = Txn::new()
                .when(vec![
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                    Compare::mod_revision(prefix.as_str(), CompareOp::Less, max_rev + 1)
                        .with_range(prefix_end(&prefix)),
                ])
                .and_then(vec![TxnOp::put(key.as_str(), encode(&range), None)]);
            let (ok, _) = self.txn("configure the GUID range", txn).await?;
            if ok {
                let _ = self.inner.range.set(range);
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(FleetError::Contended {
                    op: "configure the GUID range",
                    waited: self.inner.settings.timeout,
                });
            }
        }
    }

    /// The fabric's GUID range, if configured.
    ///
    /// # Errors
    /// etcd unreachable, a bad value.
    pub async fn guid_range(&self) -> Result<Option<GuidRange>> {
        if let Some(r) = self.inner.range.get() {
            return Ok(Some(*r));
        }
        let key = self.inner.keys.range(self.fabric());
        let r = self
            .get_record::<GuidRange>("read the GUID range", &key)
            .await?
            .map(|(r, _)| r);
        if let Some(r) = r {
            let _ = self.inner.range.set(r);
        }
        Ok(r)
    }

    async fn range_required(&self) -> Result<GuidRange> {
        self.guid_range().await?.ok_or_else(|| FleetError::NoRange {
            fabric: self.fabric().clone(),
        })
    }

    async fn read_cursor(&self, range: &GuidRange) -> Result<(Guid, i64)> {
        let key = self.inner.keys.cursor();
        match self
            .get_record::<CursorRecord>("read the GUID cursor", &key)
            .await?
        {
            None => Ok((range.first, 0)),
            Some((c, rev)) => {
                if c.next < range.first || c.next.0 > range.last.0.saturating_add(1) {
                    return Err(FleetError::BadValue {
                        key,
                        source: ValueError::Bounds {
                            kind: CursorRecord::KIND,
                            why: format!("{} is outside the range {range}", c.next),
                        },
                    });
                }
                Ok((c.next, rev))
            }
        }
    }

    fn allocated(host: &Name) -> Vec<u8> {
        encode(&GuidRecord {
            state: GuidState::Allocated,
            host: host.clone(),
        })
    }

    /// Allocates `n` fresh GUIDs of the fabric's pool to `host`.
    ///
    /// Candidates come from a block of the range this client reserved by
    /// moving the shared cursor (one compare-and-swap per block, so allocators
    /// do not contend per GUID); each GUID is then claimed by a transaction
    /// that creates its key only if it never existed (`create_revision == 0`)
    /// on this fabric and in the global index — so no GUID is issued twice,
    /// nor one that was ever released. Up to [`MAX_BATCH`] GUIDs per
    /// transaction and [`PIPELINE`] transactions in flight.
    ///
    /// # Errors
    /// No range, the pool used up, etcd unreachable; when some GUIDs were
    /// already claimed, [`FleetError::AllocationCut`] with them.
    pub async fn allocate_guids(&self, host: &Name, n: usize) -> Result<Vec<Guid>> {
        let range = self.range_required().await?;
        let mut out: Vec<Guid> = Vec::with_capacity(n);
        let mut failed: Option<FleetError> = None;
        let mut tasks = tokio::task::JoinSet::new();
        let mut queued = 0usize; // GUIDs asked of chunks in flight
        loop {
            // Keep PIPELINE chunks in flight while GUIDs are still wanted.
            while failed.is_none() && tasks.len() < PIPELINE && out.len() + queued < n {
                let want = MAX_BATCH.min(n - out.len() - queued);
                match self.take_reserved(&range, want).await {
                    Ok(chunk) => {
                        queued += chunk.len();
                        let (store, host) = (self.clone(), host.clone());
                        tasks.spawn(async move {
                            let asked = chunk.len();
                            (asked, store.claim_chunk(&host, chunk).await)
                        });
                    }
                    Err(e) => failed = Some(e),
                }
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            match joined {
                Ok((asked, Ok(got))) => {
                    queued -= asked;
                    out.extend(got);
                }
                Ok((asked, Err(e))) => {
                    queued -= asked;
                    failed.get_or_insert(e);
                }
                Err(j) => {
                    failed.get_or_insert(FleetError::Invalid(format!(
                        "an allocation task failed: {j}"
                    )));
                }
            }
        }
        out.sort_unstable();
        match failed {
            None => Ok(out),
            Some(e) if out.is_empty() => Err(e),
            Some(e) => Err(FleetError::AllocationCut {
                done: out,
                source: Box::new(e),
            }),
        }
    }

    /// Up to `want` GUIDs from this client's reserved block, reserving a new
    /// block when it runs out.
    async fn take_reserved(&self, range: &GuidRange, want: usize) -> Result<Vec<Guid>> {
        loop {
            {
                let mut b = self
                    .inner
                    .block
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some((next, end)) = *b {
                    let k = (end - next).min(want as u64);
                    *b = (next + k < end).then_some((next + k, end));
                    if k > 0 {
                        return Ok((next..next + k).map(Guid).collect());
                    }
                }
            }
            let (first, end) = self.reserve_block(range, want).await?;
            let mut b = self
                .inner
                .block
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if b.is_none() {
                *b = Some((first, end));
            }
            // else another task of this client refilled it first; this block's
            // GUIDs stay unissued (never offered again: the cursor moved past).
        }
    }

    /// Moves the shared cursor past a block for this client: at least `need`
    /// GUIDs, up to [`BLOCK`] (a 64th of what is left, so a small pool is
    /// not taken by one client). Returns `[first, end)`.
    async fn reserve_block(&self, range: &GuidRange, need: usize) -> Result<(u64, u64)> {
        let cursor_key = self.inner.keys.cursor();
        let start = Instant::now();
        loop {
            let cached = *self
                .inner
                .cursor
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (next, rev) = match cached {
                Some(c) => c,
                None => self.read_cursor(range).await?,
            };
            let left = range.last.0.saturating_add(1).saturating_sub(next.0);
            if left == 0 {
                return Err(FleetError::PoolExhausted {
                    fabric: self.fabric().clone(),
                    range: *range,
                });
            }
            let size = (need as u64).max(BLOCK.min(left / 64)).clamp(1, left);
            let end = next.0 + size;
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    cursor_key.as_str(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then(vec![TxnOp::put(
                    cursor_key.as_str(),
                    encode(&CursorRecord { next: Guid(end) }),
                    None,
                )]);
            let (ok, at) = self.txn("reserve a block of GUIDs", txn).await?;
            let fresh = if ok {
                Some((Guid(end), at))
            } else {
                Some(self.read_cursor(range).await?)
            };
            *self
                .inner
                .cursor
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
            if ok {
                return Ok((next.0, end));
            }
            if start.elapsed() > self.inner.settings.timeout {
                return Err(FleetError::Contended {
                    op: "reserve a block of GUIDs",
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// Claims `chunk` for `host` in one transaction; a GUID that already
    /// exists (claimed by hand, or on another fabric) is dropped and the rest
    /// claimed again. Returns the GUIDs claimed.
    async fn claim_chunk(&self, host: &Name, mut chunk: Vec<Guid>) -> Result<Vec<Guid>> {
        const OP: &str = "allocate GUIDs";
        let keys = &self.inner.keys;
        let fabric = encode(&GuidIndexRecord {
            fabric: self.fabric().clone(),
        });
        let held = Self::allocated(host);
        let start = Instant::now();
        while let (Some(&first), Some(&last)) = (chunk.first(), chunk.last()) {
            let mut when = Vec::with_capacity(2 * chunk.len());
            let mut then = Vec::with_capacity(2 * chunk.len());
            for &c in &chunk {
                let (gk, ik) = (keys.guid(c), keys.global_guid(c));
                when.push(Compare::create_revision(gk.as_str(), CompareOp::Equal, 0));
                when.push(Compare::create_revision(ik.as_str(), CompareOp::Equal, 0));
                then.push(TxnOp::put(gk, held.clone(), None));
                then.push(TxnOp::put(ik, fabric.clone(), None));
            }
            if self.txn(OP, Txn::new().when(when).and_then(then)).await?.0 {
                return Ok(chunk);
            }
            let mut taken = BTreeSet::new();
            for (from, to) in [
                (keys.guid(first), keys.guid(last)),
                (keys.global_guid(first), keys.global_guid(last)),
            ] {
                let mut end = to.into_bytes();
                end.push(0);
                let r = self
                    .call("read claimed GUIDs", |mut c| {
                        let (f, e) = (from.clone(), end.clone());
                        async move {
                            c.get(f, Some(GetOptions::new().with_range(e).with_keys_only()))
                                .await
                        }
                    })
                    .await?;
                for kv in r.kvs() {
                    taken.insert(
                        value::guid_from_key(kv.key()).map_err(|e| Self::bad(kv.key(), e))?,
                    );
                }
            }
            chunk.retain(|g| !taken.contains(g));
            if taken.is_empty() && start.elapsed() > self.inner.settings.timeout {
                return Err(FleetError::Contended {
                    op: OP,
                    waited: start.elapsed(),
                });
            }
        }
        Ok(chunk)
    }

    /// Claims one given GUID for `host` (a GUID a port already has, outside
    /// the allocator's choice): the same checks as an allocation. Claiming a
    /// GUID the host already holds is accepted.
    ///
    /// # Errors
    /// A reserved GUID, one held by another host, retired, on another fabric;
    /// etcd unreachable.
    pub async fn claim_guid(&self, host: &Name, guid: Guid) -> Result<()> {
        if guid.is_reserved() {
            return Err(FleetError::Invalid(format!(
                "GUID {guid} is reserved and never names a port"
            )));
        }
        let keys = &self.inner.keys;
        let (gk, ik) = (keys.guid(guid), keys.global_guid(guid));
        let txn = Txn::new()
            .when(vec![
                Compare::create_revision(gk.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(ik.as_str(), CompareOp::Equal, 0),
            ])
            .and_then(vec![
                TxnOp::put(gk.as_str(), Self::allocated(host), None),
                TxnOp::put(
                    ik.as_str(),
                    encode(&GuidIndexRecord {
                        fabric: self.fabric().clone(),
                    }),
                    None,
                ),
            ]);
        if self.txn("claim a GUID", txn).await?.0 {
            return Ok(());
        }
        if let Some((idx, _)) = self
            .get_record::<GuidIndexRecord>("read a GUID's fabric", &ik)
            .await?
            && &idx.fabric != self.fabric()
        {
            return Err(FleetError::GuidOnOtherFabric {
                guid,
                fabric: self.fabric().clone(),
                other: idx.fabric,
            });
        }
        match self.guid(guid).await? {
            Some(r) if r.state == GuidState::Allocated && &r.host == host => Ok(()),
            Some(r) if r.state == GuidState::Allocated => Err(FleetError::GuidHeldByOtherHost {
                guid,
                fabric: self.fabric().clone(),
                holder: r.host,
                host: host.clone(),
            }),
            Some(r) => Err(FleetError::GuidRetired {
                guid,
                fabric: self.fabric().clone(),
                host: r.host,
            }),
            None => Err(FleetError::BadValue {
                key: ik,
                source: ValueError::Bounds {
                    kind: GuidIndexRecord::KIND,
                    why: "indexed on this fabric but has no pool record".into(),
                },
            }),
        }
    }

    /// Retires a GUID `host` holds: it stays in the pool's keys as retired and
    /// is never issued again. Releasing a retired GUID again is accepted.
    ///
    /// # Errors
    /// Not allocated, held by another host, etcd unreachable.
    pub async fn release_guid(&self, host: &Name, guid: Guid) -> Result<()> {
        let gk = self.inner.keys.guid(guid);
        let start = Instant::now();
        loop {
            let Some((r, rev)) = self.get_record::<GuidRecord>("read a GUID", &gk).await? else {
                return Err(FleetError::GuidNotAllocated {
                    guid,
                    fabric: self.fabric().clone(),
                });
            };
            match r.state {
                GuidState::Retired => return Ok(()),
                GuidState::Allocated if &r.host != host => {
                    return Err(FleetError::GuidHeldByOtherHost {
                        guid,
                        fabric: self.fabric().clone(),
                        holder: r.host,
                        host: host.clone(),
                    });
                }
                GuidState::Allocated => {}
            }
            let retired = encode(&GuidRecord {
                state: GuidState::Retired,
                host: host.clone(),
            });
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    gk.as_str(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then(vec![TxnOp::put(gk.as_str(), retired, None)]);
            if self.txn("retire a GUID", txn).await?.0 {
                return Ok(());
            }
            if start.elapsed() > self.inner.settings.timeout {
                return Err(FleetError::Contended {
                    op: "retire a GUID",
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// A GUID's pool record on this fabric.
    ///
    /// # Errors
    /// etcd unreachable, a bad value.
    pub async fn guid(&self, guid: Guid) -> Result<Option<GuidRecord>> {
        Ok(self
            .get_record::<GuidRecord>("read a GUID", &self.inner.keys.guid(guid))
            .await?
            .map(|(r, _)| r))
    }

    /// Every GUID of this fabric's pool ever issued, with its record.
    ///
    /// # Errors
    /// etcd unreachable, a bad key or value.
    pub async fn guids(&self) -> Result<Vec<(Guid, GuidRecord)>> {
        let kvs = self
            .list("list the GUID pool", &self.inner.keys.guids())
            .await?;
        kvs.iter()
            .map(|kv| {
                let g = value::guid_from_key(kv.key()).map_err(|e| Self::bad(kv.key(), e))?;
                let r = parse::<GuidRecord>(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                Ok((g, r))
            })
            .collect()
    }

    // ----------------------------------------------------- tenants, P_Keys

    /// Claims partition `pkey` for `tenant` on this fabric (and records the
    /// tenant): by transaction, so of two tenants claiming one P_Key exactly
    /// one wins. Claiming one's own P_Key again is accepted.
    ///
    /// # Errors
    /// An empty or default P_Key, another tenant's P_Key, etcd unreachable.
    pub async fn claim_pkey(&self, tenant: &TenantId, pkey: PKey) -> Result<()> {
        if pkey.is_empty_slot() || pkey.is_default() {
            return Err(FleetError::Invalid(format!(
                "P_Key {pkey} is {}: it cannot be owned. Hint: give a partition 0x0001-0x7ffe",
                if pkey.is_default() {
                    "the default partition"
                } else {
                    "an empty slot"
                }
            )));
        }
        let keys = &self.inner.keys;
        let pk = keys.pkey(pkey);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                pk.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![
                TxnOp::put(
                    pk.as_str(),
                    encode(&PkeyRecord {
                        tenant: tenant.clone(),
                    }),
                    None,
                ),
                TxnOp::put(
                    keys.tenant(tenant),
                    encode(&TenantRecord {
                        tenant: tenant.clone(),
                    }),
                    None,
                ),
                TxnOp::put(keys.partition(tenant, pkey), Vec::new(), None),
            ]);
        if self.txn("claim a P_Key", txn).await?.0 {
            return Ok(());
        }
        match self.pkey_owner(pkey).await? {
            Some(o) if &o == tenant => Ok(()),
            Some(owner) => Err(FleetError::PkeyOwned {
                pkey: PKey(pkey.base()),
                fabric: self.fabric().clone(),
                owner,
                tenant: tenant.clone(),
            }),
            None => Err(FleetError::Contended {
                op: "claim a P_Key",
                waited: Duration::ZERO,
            }),
        }
    }

    /// The tenant partition `pkey` belongs to on this fabric.
    ///
    /// # Errors
    /// etcd unreachable, a bad value.
    pub async fn pkey_owner(&self, pkey: PKey) -> Result<Option<TenantId>> {
        Ok(self
            .get_record::<PkeyRecord>("read a P_Key's owner", &self.inner.keys.pkey(pkey))
            .await?
            .map(|(r, _)| r.tenant))
    }

    /// The tenants known on this fabric.
    ///
    /// # Errors
    /// etcd unreachable, a bad value.
    pub async fn tenants(&self) -> Result<Vec<TenantId>> {
        let kvs = self
            .list("list tenants", &self.inner.keys.tenants())
            .await?;
        kvs.iter()
            .map(|kv| {
                parse::<TenantRecord>(kv.value())
                    .map(|r| r.tenant)
                    .map_err(|e| Self::bad(kv.key(), e))
            })
            .collect()
    }

    /// The partitions `tenant` owns on this fabric.
    ///
    /// # Errors
    /// etcd unreachable, a bad key.
    pub async fn tenant_partitions(&self, tenant: &TenantId) -> Result<Vec<PKey>> {
        let kvs = self
            .list(
                "list a tenant's partitions",
                &self.inner.keys.partitions(tenant),
            )
            .await?;
        kvs.iter()
            .map(|kv| value::pkey_from_key(kv.key()).map_err(|e| Self::bad(kv.key(), e)))
            .collect()
    }

    // -------------------------------------------------- hosts, desired, observed

    /// Registers `host` on the fabric under a fresh lease of the configured
    /// TTL, kept alive in the background until the session is closed or
    /// dropped. Refused while another live session holds the name.
    ///
    /// # Errors
    /// Another live session, etcd unreachable.
    pub async fn register_host(&self, host: &Name) -> Result<HostSession> {
        let ttl = i64::try_from(self.inner.settings.lease_ttl.as_secs()).unwrap_or(15);
        let grant = self
            .call("grant the host's lease", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        let lease = grant.id();
        let key = self.inner.keys.host(host);
        let rec = encode(&HostRecord {
            host: host.clone(),
            lease,
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
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let ok = self.txn("register the host", txn).await?.0;
        if !ok {
            let theirs = self
                .get_record::<HostRecord>("read the host's record", &key)
                .await?;
            match theirs {
                Some((r, _)) if r.lease == lease => {}
                other => {
                    let _ = self
                        .call("revoke an unused lease", |mut c| async move {
                            c.lease_revoke(lease).await
                        })
                        .await;
                    return Err(FleetError::HostAlreadyRegistered {
                        host: host.clone(),
                        fabric: self.fabric().clone(),
                        lease: other.map_or(0, |(r, _)| r.lease),
                    });
                }
            }
        }
        let lost = Arc::new(AtomicBool::new(false));
        let keeper = tokio::spawn(keep_alive(self.clone(), lease, Arc::clone(&lost)));
        Ok(HostSession {
            host: host.clone(),
            lease,
            lost,
            keeper,
        })
    }

    /// Writes the desired membership of port `guid` for the session's host,
    /// under its lease, in one transaction that also checks that the lease
    /// still holds the host's key, that the host holds the GUID, and that the
    /// tenant owns every P_Key named. Returns the revision written.
    ///
    /// # Errors
    /// A lost lease, a GUID not held by the host, a P_Key not the tenant's,
    /// etcd unreachable.
    pub async fn set_desired(
        &self,
        session: &HostSession,
        guid: Guid,
        record: &DesiredRecord,
    ) -> Result<i64> {
        let keys = &self.inner.keys;
        let host = &session.host;
        if session.is_lost() {
            return Err(self.lease_lost(host));
        }
        let hk = keys.host(host);
        let gk = keys.guid(guid);
        let owner = encode(&PkeyRecord {
            tenant: record.tenant.clone(),
        });
        let mut when = vec![
            Compare::lease(hk.as_str(), CompareOp::Equal, session.lease),
            Compare::value(gk.as_str(), CompareOp::Equal, Self::allocated(host)),
        ];
        for p in &record.pkeys {
            when.push(Compare::value(
                keys.pkey(*p),
                CompareOp::Equal,
                owner.clone(),
            ));
        }
        let txn = Txn::new().when(when).and_then(vec![TxnOp::put(
            keys.desired(host, guid),
            encode(record),
            Some(PutOptions::new().with_lease(session.lease)),
        )]);
        let (ok, rev) = self.txn("write a desired membership", txn).await?;
        if ok {
            return Ok(rev);
        }
        // Which check failed, for the error.
        match self
            .get_record::<HostRecord>("read the host's record", &hk)
            .await?
        {
            Some((r, _)) if r.lease == session.lease => {}
            _ => return Err(self.lease_lost(host)),
        }
        match self.guid(guid).await? {
            Some(r) if r.state == GuidState::Allocated && &r.host == host => {}
            Some(r) if r.state == GuidState::Retired => {
                return Err(FleetError::GuidRetired {
                    guid,
                    fabric: self.fabric().clone(),
                    host: r.host,
                });
            }
            Some(r) => {
                return Err(FleetError::GuidHeldByOtherHost {
                    guid,
                    fabric: self.fabric().clone(),
                    holder: r.host,
                    host: host.clone(),
                });
            }
            None => {
                return Err(FleetError::GuidNotAllocated {
                    guid,
                    fabric: self.fabric().clone(),
                });
            }
        }
        for p in &record.pkeys {
            match self.pkey_owner(*p).await? {
                Some(o) if o == record.tenant => {}
                Some(owner) => {
                    return Err(FleetError::PkeyOwned {
                        pkey: PKey(p.base()),
                        fabric: self.fabric().clone(),
                        owner,
                        tenant: record.tenant.clone(),
                    });
                }
                None => {
                    return Err(FleetError::PkeyNotOwned {
                        pkey: PKey(p.base()),
                        fabric: self.fabric().clone(),
                        tenant: record.tenant.clone(),
                    });
                }
            }
        }
        Err(FleetError::Contended {
            op: "write a desired membership",
            waited: Duration::ZERO,
        })
    }

    /// Removes the desired membership of port `guid` (while the lease holds).
    ///
    /// # Errors
    /// A lost lease, etcd unreachable.
    pub async fn clear_desired(&self, session: &HostSession, guid: Guid) -> Result<i64> {
        let keys = &self.inner.keys;
        let txn = Txn::new()
            .when(vec![Compare::lease(
                keys.host(&session.host),
                CompareOp::Equal,
                session.lease,
            )])
            .and_then(vec![TxnOp::delete(
                keys.desired(&session.host, guid),
                None::<DeleteOptions>,
            )]);
        let (ok, rev) = self.txn("clear a desired membership", txn).await?;
        if ok {
            Ok(rev)
        } else {
            Err(self.lease_lost(&session.host))
        }
    }

    fn lease_lost(&self, host: &Name) -> FleetError {
        FleetError::LeaseLost {
            host: host.clone(),
            fabric: self.fabric().clone(),
        }
    }

    /// A watch on every host's desired memberships of the fabric from
    /// revision `from` on: the stream answers when one is written or deleted
    /// (a host's lease expiring deletes its own), after a first answer that
    /// says the watch was created. The fabric controller wakes on it instead
    /// of waiting for its next poll; it still polls, so a watch that goes
    /// quiet (its member paused or cut off) costs latency, never a change.
    ///
    /// # Errors
    /// No member set the watch up within the timeout.
    pub async fn watch_desired(&self, from: i64) -> Result<WatchStream> {
        let prefix = self.inner.keys.desired_all();
        self.call("watch desired memberships", move |mut c| {
            let p = prefix.clone();
            async move {
                c.watch(
                    p,
                    Some(WatchOptions::new().with_prefix().with_start_revision(from)),
                )
                .await
            }
        })
        .await
    }

    /// The desired memberships of `host`, or of every host.
    ///
    /// # Errors
    /// etcd unreachable, a bad key or value.
    pub async fn desired(&self, host: Option<&Name>) -> Result<Vec<DesiredEntry>> {
        let prefix = host.map_or_else(
            || self.inner.keys.desired_all(),
            |h| self.inner.keys.desired_of(h),
        );
        let kvs = self.list("list desired memberships", &prefix).await?;
        kvs.iter()
            .map(|kv| {
                let (host, guid) = Self::host_guid(kv.key())?;
                let record = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                Ok(DesiredEntry {
                    host,
                    guid,
                    record,
                    revision: kv.mod_revision(),
                })
            })
            .collect()
    }

    fn host_guid(key: &[u8]) -> Result<(Name, Guid)> {
        let guid = value::guid_from_key(key).map_err(|e| Self::bad(key, e))?;
        let host: Name = value::parent_segment(key)
            .map_err(|e| Self::bad(key, e))?
            .parse()
            .map_err(|e: value::NameError| {
                Self::bad(
                    key,
                    ValueError::Bounds {
                        kind: "host",
                        why: e.to_string(),
                    },
                )
            })?;
        Ok((host, guid))
    }

    /// Writes what the SM reported for `host`'s port `guid`, if every guard
    /// holds (the fabric controller passes its leadership guard). Returns the
    /// revision written.
    ///
    /// # Errors
    /// A guard that does not hold ([`FleetError::Fenced`]), etcd unreachable.
    pub async fn put_observed(
        &self,
        guards: &[Guard],
        host: &Name,
        guid: Guid,
        record: &ObservedRecord,
    ) -> Result<i64> {
        let txn = Txn::new()
            .when(guards.iter().map(Guard::compare).collect::<Vec<_>>())
            .and_then(vec![TxnOp::put(
                self.inner.keys.observed(host, guid),
                encode(record),
                None,
            )]);
        let (ok, rev) = self.txn("write an observed membership", txn).await?;
        if ok {
            Ok(rev)
        } else {
            Err(FleetError::Fenced {
                op: "write an observed membership",
            })
        }
    }

    /// The observed memberships of `host`, or of every host.
    ///
    /// # Errors
    /// etcd unreachable, a bad key or value.
    pub async fn observed(&self, host: Option<&Name>) -> Result<Vec<ObservedEntry>> {
        let prefix = host.map_or_else(
            || self.inner.keys.observed_all(),
            |h| self.inner.keys.observed_of(h),
        );
        let kvs = self.list("list observed memberships", &prefix).await?;
        kvs.iter()
            .map(|kv| {
                let (host, guid) = Self::host_guid(kv.key())?;
                let record = parse(kv.value()).map_err(|e| Self::bad(kv.key(), e))?;
                Ok(ObservedEntry {
                    host,
                    guid,
                    record,
                    revision: kv.mod_revision(),
                })
            })
            .collect()
    }

    /// Revokes the session's lease: its host key and desired memberships go.
    ///
    /// # Errors
    /// etcd unreachable.
    pub async fn close_session(&self, session: HostSession) -> Result<()> {
        session.keeper.abort();
        let lease = session.lease;
        self.call("revoke the host's lease", |mut c| async move {
            c.lease_revoke(lease).await
        })
        .await
        .map(|_| ())
    }
}

/// Refreshes `lease` every third of its TTL; marks the session lost when the
/// lease is gone or no refresh succeeded for a whole TTL.
async fn keep_alive(store: FleetStore, lease: i64, lost: Arc<AtomicBool>) {
    let ttl = store.inner.settings.lease_ttl;
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        let r = store
            .call("keep the host's lease alive", |mut c| async move {
                controller::refresh(&mut c, lease).await
            })
            .await;
        match r {
            Ok(true) => last_ok = Instant::now(),
            Ok(false) => {
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(_) if last_ok.elapsed() >= ttl => {
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(_) => {}
        }
    }
}

/// A host's registration on the fabric: its lease, kept alive in the
/// background. Dropping it stops the keep-alive (the lease then expires after
/// its TTL); [`FleetStore::close_session`] revokes it at once.
#[derive(Debug)]
pub struct HostSession {
    host: Name,
    lease: i64,
    lost: Arc<AtomicBool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl HostSession {
    /// The host.
    #[must_use]
    pub fn host(&self) -> &Name {
        &self.host
    }
    /// The lease id.
    #[must_use]
    pub fn lease(&self) -> i64 {
        self.lease
    }
    /// Whether the keep-alive found the lease gone.
    #[must_use]
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for HostSession {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// The blocking facade: a [`FleetStore`] on its own runtime, for the
/// synchronous core and the CLI.
#[derive(Debug)]
pub struct Fleet {
    rt: tokio::runtime::Runtime,
    store: FleetStore,
}

impl Fleet {
    /// Starts a runtime (one worker thread) and connects.
    ///
    /// # Errors
    /// The runtime cannot start; as [`FleetStore::connect`].
    pub fn connect(settings: FleetSettings) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("devfence-fleet")
            .enable_all()
            .build()
            .map_err(|e| {
                FleetError::Config(format!("cannot start the fleet client's runtime: {e}"))
            })?;
        let store = rt.block_on(FleetStore::connect(settings))?;
        Ok(Self { rt, store })
    }

    /// The async store (for code already on a runtime).
    #[must_use]
    pub fn store(&self) -> &FleetStore {
        &self.store
    }

    /// Runs a future of the store on this facade's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// See [`FleetStore::configure_guid_range`].
    ///
    /// # Errors
    /// As there.
    pub fn configure_guid_range(&self, range: GuidRange) -> Result<()> {
        self.rt.block_on(self.store.configure_guid_range(range))
    }
    /// See [`FleetStore::guid_range`].
    ///
    /// # Errors
    /// As there.
    pub fn guid_range(&self) -> Result<Option<GuidRange>> {
        self.rt.block_on(self.store.guid_range())
    }
    /// See [`FleetStore::allocate_guids`].
    ///
    /// # Errors
    /// As there.
    pub fn allocate_guids(&self, host: &Name, n: usize) -> Result<Vec<Guid>> {
        self.rt.block_on(self.store.allocate_guids(host, n))
    }
    /// See [`FleetStore::claim_guid`].
    ///
    /// # Errors
    /// As there.
    pub fn claim_guid(&self, host: &Name, guid: Guid) -> Result<()> {
        self.rt.block_on(self.store.claim_guid(host, guid))
    }
    /// See [`FleetStore::release_guid`].
    ///
    /// # Errors
    /// As there.
    pub fn release_guid(&self, host: &Name, guid: Guid) -> Result<()> {
        self.rt.block_on(self.store.release_guid(host, guid))
    }
    /// See [`FleetStore::guid`].
    ///
    /// # Errors
    /// As there.
    pub fn guid(&self, guid: Guid) -> Result<Option<GuidRecord>> {
        self.rt.block_on(self.store.guid(guid))
    }
    /// See [`FleetStore::guids`].
    ///
    /// # Errors
    /// As there.
    pub fn guids(&self) -> Result<Vec<(Guid, GuidRecord)>> {
        self.rt.block_on(self.store.guids())
    }
    /// See [`FleetStore::claim_pkey`].
    ///
    /// # Errors
    /// As there.
    pub fn claim_pkey(&self, tenant: &TenantId, pkey: PKey) -> Result<()> {
        self.rt.block_on(self.store.claim_pkey(tenant, pkey))
    }
    /// See [`FleetStore::pkey_owner`].
    ///
    /// # Errors
    /// As there.
    pub fn pkey_owner(&self, pkey: PKey) -> Result<Option<TenantId>> {
        self.rt.block_on(self.store.pkey_owner(pkey))
    }
    /// See [`FleetStore::tenants`].
    ///
    /// # Errors
    /// As there.
    pub fn tenants(&self) -> Result<Vec<TenantId>> {
        self.rt.block_on(self.store.tenants())
    }
    /// See [`FleetStore::tenant_partitions`].
    ///
    /// # Errors
    /// As there.
    pub fn tenant_partitions(&self, tenant: &TenantId) -> Result<Vec<PKey>> {
        self.rt.block_on(self.store.tenant_partitions(tenant))
    }
    /// See [`FleetStore::register_host`].
    ///
    /// # Errors
    /// As there.
    pub fn register_host(&self, host: &Name) -> Result<HostSession> {
        self.rt.block_on(self.store.register_host(host))
    }
    /// See [`FleetStore::set_desired`].
    ///
    /// # Errors
    /// As there.
    pub fn set_desired(&self, s: &HostSession, guid: Guid, r: &DesiredRecord) -> Result<i64> {
        self.rt.block_on(self.store.set_desired(s, guid, r))
    }
    /// See [`FleetStore::clear_desired`].
    ///
    /// # Errors
    /// As there.
    pub fn clear_desired(&self, s: &HostSession, guid: Guid) -> Result<i64> {
        self.rt.block_on(self.store.clear_desired(s, guid))
    }
    /// See [`FleetStore::desired`].
    ///
    /// # Errors
    /// As there.
    pub fn desired(&self, host: Option<&Name>) -> Result<Vec<DesiredEntry>> {
        self.rt.block_on(self.store.desired(host))
    }
    /// See [`FleetStore::put_observed`].
    ///
    /// # Errors
    /// As there.
    pub fn put_observed(
        &self,
        guards: &[Guard],
        host: &Name,
        guid: Guid,
        r: &ObservedRecord,
    ) -> Result<i64> {
        self.rt
            .block_on(self.store.put_observed(guards, host, guid, r))
    }
    /// See [`FleetStore::observed`].
    ///
    /// # Errors
    /// As there.
    pub fn observed(&self, host: Option<&Name>) -> Result<Vec<ObservedEntry>> {
        self.rt.block_on(self.store.observed(host))
    }
    /// See [`FleetStore::close_session`].
    ///
    /// # Errors
    /// As there.
    pub fn close_session(&self, s: HostSession) -> Result<()> {
        self.rt.block_on(self.store.close_session(s))
    }
}
