//! [`UfmSm`]: the NVIDIA UFM backend of the [`SubnetManager`] seam.
//!
//! UFM manages an InfiniBand fabric's partitions through a REST API (basic auth
//! over HTTPS). devfence uses these calls of it:
//!
//! | call | UFM | used by |
//! |---|---|---|
//! | `GET /ufmRest/app/ufm_version` | all | [`health`](SubnetManager::health), first in every [`observe`](SubnetManager::observe) and `apply` (which calls a release serves) |
//! | `GET /ufmRest/resources/pkeys/?guids_data=true` | all | `observe` (configured membership), `apply` (what to change) |
//! | `POST /ufmRest/resources/pkeys` `{"pkey","index0","ip_over_ib","membership","guids"}` | all | `apply`: add GUIDs |
//! | `DELETE /ufmRest/resources/pkeys/{pkey}/guids/{guid,…}` | 6.9 on | `apply`: remove GUIDs |
//! | `POST /ufmRest/resources/pkeys/add` `{"pkey","index0","ip_over_ib"}` | 6.15 on | `apply`: create a managed partition UFM does not list, empty |
//! | `POST /ufmRest/actions/remove_guids_from_pkey` `{"pkey","guids"}` | before 6.9 | `apply`: remove GUIDs (deprecated by UFM; used only where the `DELETE` is missing) |
//!
//! plus `GET /ufmRest/resources/pkeys/last_updated`, shown in `health` only. The
//! release comes from `ufm_version` ([`UfmApi::for_version`]); a version devfence
//! cannot read gets the current API.
//!
//! **Apply.** Staged changes stay in memory (as in every backend) until
//! [`apply`](SubnetManager::apply), which reads UFM's listing, plays the staged
//! changes on the part of it devfence manages, and sends the difference: first
//! one removal per partition, then one addition per (partition, membership,
//! index0). A membership change is a removal and an addition. Every call is
//! idempotent, so an apply that failed half-way (the staged changes stay staged)
//! is simply applied again: the difference is recomputed from a fresh listing.
//! `index0` is set for a GUID's lowest-numbered partition (the P_Key a VF uses at
//! table index 0); it does not affect verification, which compares sets.
//!
//! **Managed partitions.** `RemoveAll` and `Replace` touch only the partitions in
//! [`UfmConfig::managed_pkeys`] and those named by the changes being applied;
//! never the default partition (`0x7fff`, which no [`PartitionKey`] can name) nor
//! the partitions other tools manage on a shared UFM.
//!
//! **Generation.** UFM's REST API has no sweep counter and no "sweep done"
//! signal. A UFM generation is a point on devfence's clock: milliseconds of the
//! host's wall clock, kept strictly monotone per backend instance. A ticket's
//! generation is taken after UFM answered every call of the apply, one past
//! anything handed out before; an observation's generation is taken before its
//! first read. So an observation at or past a ticket began after UFM acknowledged
//! the apply — in this process and in the next one on this host (the journal
//! keeps tickets across processes, which a counter starting at 0 would break). A
//! wall clock stepping back delays verification (fail closed); it never makes an
//! early read pass in this process. `last_updated` is a timestamp of UFM's last
//! P_Key change that says nothing about the ports, so it does not feed the
//! generation.
//!
//! **Acknowledged view.** UFM reports what it was *asked*, not what the ports
//! took: its listing is the `configured` view. The three handover questions are
//! only sound over tables the ports acknowledged (a finding of the model check,
//! `docs/model-check.md`), so the `programmed` view comes from a
//! [`PortReader`] ([`UfmSm::with_port_reader`]; the OpenSM SA client is one). With
//! none, `programmed` is filled from UFM's configured view and the status says
//! `SweepOutcome::Errors` with the reason, so [`verify`](crate::verify) can never
//! pass — unless [`UfmConfig::trust_configured_view`] says otherwise; `health`
//! notes which case holds. UFM answering `ufm_version` counts as
//! [`SmState::Master`]: UFM runs its SM itself, and its role is not part of this
//! API.
//!
//! **Faults.** Each request has a timeout (`connect_timeout_ms`, `timeout_ms`)
//! and is repeated at most `retries` times, with a doubling pause, and only for
//! what may pass on its own: HTTP 5xx, 408, 429, timeouts, failed connections.
//! 4xx answers (401/403: "check the credentials file"), redirects and TLS
//! failures are final. Garbage JSON, HTML and wrong shapes are refused by the
//! pure decoders in [`decode`]. Every such failure is an error of `observe`, so
//! the gate stays closed.
//!
//! **Secrets.** The password is read once from its [`Credentials`] source into a
//! [`Secret`]; it never appears in `Debug`, errors or logs.

mod client;
pub mod config;
pub mod decode;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use devfence_model::{Guid, Membership};

pub use config::{Credentials, Login, Secret, UfmConfig, UfmSetupError};
pub use decode::{
    MAX_RESPONSE_BYTES, PkeyListing, decode_last_updated, decode_pkeys, decode_version,
};

use crate::{
    Change, ChangeId, FabricError, Generation, Health, MembershipMap, Observation, PartitionKey,
    PortReader, PortView, Programmed, SmState, SmStatus, SubnetManager, SweepOutcome, Ticket,
};
use client::Client;

/// `GET`: UFM's version (health).
pub const PATH_VERSION: &str = "/ufmRest/app/ufm_version";
/// `GET`: every P_Key with its GUIDs and their membership.
pub const PATH_PKEYS: &str = "/ufmRest/resources/pkeys/?guids_data=true";
/// `POST`: add GUIDs to a P_Key (created if missing).
pub const PATH_ADD: &str = "/ufmRest/resources/pkeys";
/// `POST`: remove GUIDs from a P_Key — deprecated by UFM, used only for a UFM
/// release without [`PATH_PKEY_RESOURCE`]`{pkey}/guids/{guids}`.
pub const PATH_REMOVE: &str = "/ufmRest/actions/remove_guids_from_pkey";
/// `DELETE {this}{pkey}/guids/{guid,guid,…}`: remove GUIDs from a P_Key (UFM 6.9 on).
pub const PATH_PKEY_RESOURCE: &str = "/ufmRest/resources/pkeys/";
/// `POST`: create a P_Key without GUIDs (UFM 6.15 on).
pub const PATH_CREATE_EMPTY: &str = "/ufmRest/resources/pkeys/add";
/// `GET`: when UFM's P_Key configuration last changed.
pub const PATH_LAST_UPDATED: &str = "/ufmRest/resources/pkeys/last_updated";
/// At most this many GUIDs go in one `DELETE` URL (17 bytes each).
const GUIDS_PER_DELETE: usize = 64;

/// Which P_Key calls a UFM release serves (from UFM's REST API guides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UfmApi {
    /// `DELETE /ufmRest/resources/pkeys/{pkey}/guids/{guids}` (6.9 on); without
    /// it, the deprecated `POST /ufmRest/actions/remove_guids_from_pkey`.
    pub delete_guids: bool,
    /// `POST /ufmRest/resources/pkeys/add` (6.15 on).
    pub create_empty: bool,
}

impl UfmApi {
    /// The calls of the release `version` (`ufm_release_version`, e.g.
    /// `6.19.0-7`): its first two numbers. A version with no readable numbers
    /// gets the current API (a UFM that lacks it answers 404, a clear error; the
    /// change stays staged).
    #[must_use]
    pub fn for_version(version: &str) -> Self {
        let mut nums = version
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<u32>().unwrap_or(u32::MAX));
        let Some(major) = nums.next() else {
            return Self::CURRENT;
        };
        let v = (major, nums.next().unwrap_or(0));
        Self {
            delete_guids: v >= (6, 9),
            create_empty: v >= (6, 15),
        }
    }

    /// The current API.
    pub const CURRENT: Self = Self {
        delete_guids: true,
        create_empty: true,
    };
}

const NOTE_INSECURE: &str = "TLS certificate verification is OFF (insecure_skip_verify = true): anyone on the network path can read the UFM password and forge UFM's answers; set ca_file instead";
const NOTE_UNACKNOWLEDGED: &str = "no port reader: P_Key tables are UFM's configured view, which no port has been seen to acknowledge, so no handover can verify; give the UFM backend a port reader (SA), or set trust_configured_view = true";
const NOTE_TRUSTED: &str = "trust_configured_view = true and no port reader: gates pass on UFM's configured view without the ports' acknowledgement";
const NOTE_READER: &str = "port tables are read by a port reader (acknowledged view)";

static INSECURE_WARNING: Once = Once::new();

/// The UFM backend. Shared between workers (`&self` everywhere).
pub struct UfmSm {
    cfg: UfmConfig,
    client: Client,
    reader: Option<Box<dyn PortReader>>,
    staged: Mutex<Vec<Change>>,
    applying: Mutex<()>,
    /// The last generation handed out (ms since the epoch, monotone).
    clock: Mutex<u64>,
}

impl std::fmt::Debug for UfmSm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UfmSm")
            .field("cfg", &self.cfg)
            .field("client", &self.client)
            .field("port_reader", &self.reader.is_some())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl UfmSm {
    /// A backend for `cfg`, with the login read from `cfg.credentials`.
    ///
    /// # Errors
    /// [`UfmSetupError`]: bad URL, unreadable CA file or credentials.
    pub fn new(cfg: UfmConfig) -> Result<Self, UfmSetupError> {
        let login = cfg.credentials.load()?;
        Self::with_login(cfg, login)
    }

    /// A backend for `cfg` with an already read `login` (`cfg.credentials` is
    /// not consulted).
    ///
    /// # Errors
    /// [`UfmSetupError`]: bad URL, unreadable CA file.
    pub fn with_login(cfg: UfmConfig, login: Login) -> Result<Self, UfmSetupError> {
        let client = Client::new(&cfg, login)?;
        if cfg.insecure_skip_verify {
            INSECURE_WARNING.call_once(|| {
                eprintln!("devfence: WARNING: {} ({})", NOTE_INSECURE, client.base());
            });
        }
        Ok(Self {
            cfg,
            client,
            reader: None,
            staged: Mutex::new(Vec::new()),
            applying: Mutex::new(()),
            clock: Mutex::new(0),
        })
    }

    /// Reads the ports' acknowledged P_Key tables with `reader` (the `programmed`
    /// view); without one, nothing verifies unless `trust_configured_view`.
    #[must_use]
    pub fn with_port_reader(mut self, reader: impl PortReader + 'static) -> Self {
        self.reader = Some(Box::new(reader));
        self
    }

    /// The configuration this backend was built from.
    #[must_use]
    pub fn config(&self) -> &UfmConfig {
        &self.cfg
    }

    /// UFM's P_Key listing as it is now.
    ///
    /// # Errors
    /// Transport and decoding errors.
    pub fn pkeys(&self) -> Result<PkeyListing, FabricError> {
        let body = self.client.get(PATH_PKEYS)?;
        decode_pkeys(&body).map_err(|e| self.client.scrub(e))
    }

    fn version(&self) -> Result<String, FabricError> {
        let body = self.client.get(PATH_VERSION)?;
        decode_version(&body).map_err(|e| self.client.scrub(e))
    }

    fn acknowledged(&self) -> bool {
        self.reader.is_some() || self.cfg.trust_configured_view
    }

    fn sweep(&self) -> SweepOutcome {
        if self.acknowledged() {
            SweepOutcome::Clean
        } else {
            SweepOutcome::Errors(NOTE_UNACKNOWLEDGED.into())
        }
    }

    /// The generation of a read that begins now.
    fn observed_generation(&self) -> Generation {
        let mut last = lock(&self.clock);
        *last = now_ms().max(*last);
        Generation(*last)
    }

    /// The generation of an apply UFM has just acknowledged: past every
    /// generation handed out before.
    fn ticket_generation(&self) -> Generation {
        let mut last = lock(&self.clock);
        *last = now_ms().max(*last).saturating_add(1);
        Generation(*last)
    }

    /// Removes `guids` from `p` with the call `api` offers.
    fn remove_guids(
        &self,
        api: UfmApi,
        p: PartitionKey,
        guids: &BTreeSet<Guid>,
    ) -> Result<(), FabricError> {
        let guids: Vec<String> = guids.iter().map(|g| ufm_guid(*g)).collect();
        if api.delete_guids {
            for chunk in guids.chunks(GUIDS_PER_DELETE) {
                let path = format!("{PATH_PKEY_RESOURCE}{p}/guids/{}", chunk.join(","));
                self.client.delete(&path)?;
            }
            Ok(())
        } else {
            self.post_json(
                PATH_REMOVE,
                &serde_json::json!({ "pkey": p.to_string(), "guids": guids }),
            )
        }
    }

    fn post_json(&self, path: &str, value: &serde_json::Value) -> Result<(), FabricError> {
        let body = serde_json::to_vec(value).map_err(|e| FabricError::Refused {
            backend: "ufm".into(),
            detail: format!("the request body did not encode: {e}"),
            hint: "this is a bug in devfence; report it".into(),
        })?;
        self.client.post(path, &body).map(|_| ())
    }
}

/// The calls one apply makes: removals per partition, then additions per
/// (partition, membership, index0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) removes: BTreeMap<PartitionKey, BTreeSet<Guid>>,
    pub(crate) adds: BTreeMap<(PartitionKey, Membership, bool), BTreeSet<Guid>>,
    /// Configured managed partitions UFM does not list and no addition fills:
    /// created empty where UFM can ([`PATH_CREATE_EMPTY`]).
    pub(crate) creates: BTreeSet<PartitionKey>,
}

/// Plays `changes` on the managed part of `listing` and returns the difference.
pub(crate) fn plan(
    listing: &PkeyListing,
    managed: &[PartitionKey],
    changes: &[Change],
) -> Result<Plan, FabricError> {
    let configured_managed = managed;
    let mut managed: BTreeSet<PartitionKey> = managed.iter().copied().collect();
    for c in changes {
        match c {
            Change::Add { partition, .. } | Change::Remove { partition, .. } => {
                managed.insert(*partition);
            }
            Change::Replace(map) => managed.extend(map.iter().map(|(_, p, _)| p)),
            Change::RemoveAll { .. } => {}
        }
    }
    let mut current = MembershipMap::new();
    for (pkey, members) in listing.partitions() {
        // The default partition has no PartitionKey: never managed.
        let Ok(p) = PartitionKey::try_from(pkey) else {
            continue;
        };
        if !managed.contains(&p) {
            continue;
        }
        for (g, m) in members {
            if !g.is_reserved() {
                current.insert(*g, p, *m)?;
            }
        }
    }
    let mut desired = current.clone();
    for c in changes {
        desired.apply(c)?;
    }
    let mut out = Plan::default();
    for (g, p, m) in current.iter() {
        if desired.partitions_of(g).get(&p) != Some(&m) {
            out.removes.entry(p).or_default().insert(g);
        }
    }
    for (g, p, m) in desired.iter() {
        if current.partitions_of(g).get(&p) != Some(&m) {
            let index0 = desired.partitions_of(g).keys().next() == Some(&p);
            out.adds.entry((p, m, index0)).or_default().insert(g);
        }
    }
    let filled: BTreeSet<PartitionKey> = out.adds.keys().map(|(p, _, _)| *p).collect();
    out.creates = configured_managed
        .iter()
        .copied()
        .filter(|p| listing.members_of(p.pkey(Membership::Limited)).is_none())
        .filter(|p| !filled.contains(p))
        .collect();
    Ok(out)
}

fn ufm_guid(g: Guid) -> String {
    format!("{:016x}", g.0)
}

fn membership_word(m: Membership) -> &'static str {
    match m {
        Membership::Full => "full",
        Membership::Limited => "limited",
    }
}

impl SubnetManager for UfmSm {
    fn backend(&self) -> &str {
        "ufm"
    }

    fn configured_members(&self) -> Result<Option<Vec<crate::posture::Configured>>, FabricError> {
        let listing = self.pkeys()?;
        let mut out = Vec::new();
        for (pkey, members) in listing.partitions() {
            for (g, m) in members {
                let full = *m == devfence_model::Membership::Full;
                out.push(crate::posture::Configured {
                    pkey: devfence_model::PKey(pkey.base() | if full { 0x8000 } else { 0 }),
                    member: crate::posture::Member::Guid(*g),
                    source: "ufm:/ufmRest/resources/pkeys".into(),
                });
            }
        }
        Ok(Some(out))
    }

    fn stage(&self, change: Change) -> Result<(), FabricError> {
        change.validate()?;
        lock(&self.staged).push(change);
        Ok(())
    }

    fn discard_staged(&self) -> usize {
        let mut s = lock(&self.staged);
        let n = s.len();
        s.clear();
        n
    }

    fn apply(&self) -> Result<Ticket, FabricError> {
        let _one_at_a_time = lock(&self.applying);
        let changes: Vec<Change> = lock(&self.staged).clone();
        if !changes.is_empty() {
            let sweeping = changes
                .iter()
                .any(|c| matches!(c, Change::RemoveAll { .. } | Change::Replace(_)));
            if sweeping && self.cfg.managed_pkeys.is_empty() {
                return Err(FabricError::Refused {
                    backend: "ufm".into(),
                    detail: "a remove-all or replace was staged, but managed_pkeys is empty, so devfence cannot tell which UFM partitions are its own".into(),
                    hint: "list every tenant's partitions in managed_pkeys under [fabric.ufm]".into(),
                });
            }
            let api = UfmApi::for_version(&self.version()?);
            let listing = self.pkeys()?;
            let plan = plan(&listing, &self.cfg.managed_pkeys, &changes)?;
            for (p, guids) in &plan.removes {
                self.remove_guids(api, *p, guids)?;
            }
            if api.create_empty {
                for p in &plan.creates {
                    self.post_json(
                        PATH_CREATE_EMPTY,
                        &serde_json::json!({
                            "pkey": p.to_string(),
                            "index0": false,
                            "ip_over_ib": self.cfg.ip_over_ib,
                        }),
                    )?;
                }
            }
            for ((p, m, index0), guids) in &plan.adds {
                let guids: Vec<String> = guids.iter().map(|g| ufm_guid(*g)).collect();
                self.post_json(
                    PATH_ADD,
                    &serde_json::json!({
                        "pkey": p.to_string(),
                        "index0": index0,
                        "ip_over_ib": self.cfg.ip_over_ib,
                        "membership": membership_word(*m),
                        "guids": guids,
                    }),
                )?;
            }
        }
        // Drop what was applied, unless someone discarded it meanwhile.
        let mut s = lock(&self.staged);
        if s.len() >= changes.len() && s[..changes.len()] == changes[..] {
            s.drain(..changes.len());
        }
        drop(s);
        let generation = self.ticket_generation();
        Ok(Ticket {
            change: ChangeId(generation.0),
            generation,
        })
    }

    fn observe(&self, guids: &[Guid]) -> Result<Observation, FabricError> {
        let generation = self.observed_generation();
        self.version()?;
        let listing = self.pkeys()?;
        let mut ports = BTreeMap::new();
        for g in guids {
            let configured = listing.pkeys_of(*g);
            let programmed = match &self.reader {
                Some(r) => r.read_port(*g)?,
                None if configured.is_empty() => Programmed::Absent,
                None => Programmed::Present {
                    lid: None,
                    pkeys: configured.clone(),
                },
            };
            ports.insert(
                *g,
                PortView {
                    guid: *g,
                    programmed,
                    configured: Some(configured),
                },
            );
        }
        Ok(Observation {
            status: SmStatus {
                state: SmState::Master,
                generation,
                sweep: self.sweep(),
            },
            ports,
        })
    }

    fn health(&self) -> Result<Health, FabricError> {
        let generation = self.observed_generation();
        let version = self.version()?;
        let mut notes = Vec::new();
        if self.cfg.insecure_skip_verify {
            notes.push(NOTE_INSECURE.to_string());
        }
        notes.push(
            if self.reader.is_some() {
                NOTE_READER
            } else if self.cfg.trust_configured_view {
                NOTE_TRUSTED
            } else {
                NOTE_UNACKNOWLEDGED
            }
            .to_string(),
        );
        match self
            .client
            .get(PATH_LAST_UPDATED)
            .and_then(|b| decode_last_updated(&b))
        {
            Ok(Some(t)) => notes.push(format!("P_Key configuration last updated at UFM: {t}")),
            Ok(None) => {}
            Err(FabricError::Refused { .. }) => {
                notes.push("this UFM offers no pkeys/last_updated".to_string());
            }
            Err(e) => notes.push(format!(
                "pkeys/last_updated unreadable: {}",
                self.client.scrub(e)
            )),
        }
        let managed: Vec<String> = self
            .cfg
            .managed_pkeys
            .iter()
            .map(ToString::to_string)
            .collect();
        notes.push(if managed.is_empty() {
            "managed P_Keys: only those named by each apply (managed_pkeys is empty)".to_string()
        } else {
            format!("managed P_Keys: {}", managed.join(","))
        });
        Ok(Health {
            backend: "ufm".into(),
            version: Some(version),
            status: SmStatus {
                state: SmState::Master,
                generation,
                sweep: self.sweep(),
            },
            notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfence_model::PKey;

    const A: u16 = 0x0001;
    const B: u16 = 0x0002;
    const OTHER: u16 = 0x0ff0;

    fn pk(v: u16) -> PartitionKey {
        PartitionKey::new(v).expect("valid")
    }
    fn g(v: u64) -> Guid {
        Guid(v)
    }
    fn listing(entries: &[(u16, u64, Membership)]) -> PkeyListing {
        let mut l = PkeyListing::new();
        for (p, guid, m) in entries {
            l.insert(PKey(*p), Guid(*guid), *m).expect("insert");
        }
        l
    }

    #[test]
    fn each_release_gets_the_calls_it_serves() {
        for (v, delete, create) in [
            ("6.19.0-7", true, true),
            ("6.15.1-4", true, true),
            ("6.14.2", true, false),
            ("6.9.0-3", true, false),
            ("6.8.1-2", false, false),
            ("5.9", false, false),
            ("7", true, true),
            ("v6.10.0", true, false),
            ("unknown", true, true),
            ("", true, true),
        ] {
            assert_eq!(
                UfmApi::for_version(v),
                UfmApi {
                    delete_guids: delete,
                    create_empty: create
                },
                "{v}"
            );
        }
    }

    #[test]
    fn handover_plan_removes_then_adds_and_sets_index0_on_the_lowest() {
        let l = listing(&[(A, 1, Membership::Full), (0x7fff, 1, Membership::Limited)]);
        let p = plan(
            &l,
            &[],
            &[
                Change::RemoveAll { guid: g(1) },
                Change::Add {
                    guid: g(2),
                    partition: pk(B),
                    membership: Membership::Full,
                },
                Change::Add {
                    guid: g(2),
                    partition: pk(0x0003),
                    membership: Membership::Limited,
                },
            ],
        )
        .expect("plan");
        // RemoveAll only sees managed partitions: here A is not managed (not in
        // config, not named by the batch), so nothing is removed.
        assert!(p.removes.is_empty(), "{p:?}");
        let p = plan(&l, &[pk(A)], &[Change::RemoveAll { guid: g(1) }]).expect("plan");
        assert_eq!(p.removes, BTreeMap::from([(pk(A), BTreeSet::from([g(1)]))]));
        assert!(p.adds.is_empty());
        let p = plan(
            &l,
            &[pk(A)],
            &[
                Change::Add {
                    guid: g(2),
                    partition: pk(B),
                    membership: Membership::Full,
                },
                Change::Add {
                    guid: g(2),
                    partition: pk(0x0003),
                    membership: Membership::Limited,
                },
            ],
        )
        .expect("plan");
        assert_eq!(
            p.adds,
            BTreeMap::from([
                ((pk(B), Membership::Full, true), BTreeSet::from([g(2)])),
                (
                    (pk(0x0003), Membership::Limited, false),
                    BTreeSet::from([g(2)])
                ),
            ])
        );
    }

    #[test]
    fn replace_touches_only_managed_never_default_or_foreign() {
        let l = listing(&[
            (A, 1, Membership::Full),
            (A, 5, Membership::Full),
            (OTHER, 1, Membership::Full),
            (0x7fff, 1, Membership::Full),
        ]);
        let mut want = MembershipMap::new();
        want.insert(g(5), pk(A), Membership::Full).expect("ok");
        want.insert(g(6), pk(B), Membership::Limited).expect("ok");
        let p = plan(&l, &[pk(A)], &[Change::Replace(want)]).expect("plan");
        assert_eq!(p.removes, BTreeMap::from([(pk(A), BTreeSet::from([g(1)]))]));
        assert_eq!(
            p.adds,
            BTreeMap::from([((pk(B), Membership::Limited, true), BTreeSet::from([g(6)]))])
        );
    }

    #[test]
    fn membership_change_is_remove_then_add_and_noops_send_nothing() {
        let l = listing(&[(A, 1, Membership::Full)]);
        let add = |m| Change::Add {
            guid: g(1),
            partition: pk(A),
            membership: m,
        };
        let p = plan(&l, &[], &[add(Membership::Limited)]).expect("plan");
        assert_eq!(p.removes, BTreeMap::from([(pk(A), BTreeSet::from([g(1)]))]));
        assert_eq!(
            p.adds,
            BTreeMap::from([((pk(A), Membership::Limited, true), BTreeSet::from([g(1)]))])
        );
        assert_eq!(
            plan(&l, &[], &[add(Membership::Full)]).expect("plan"),
            Plan::default()
        );
        let p = plan(
            &l,
            &[],
            &[
                Change::Remove {
                    guid: g(9),
                    partition: pk(B),
                },
                add(Membership::Full),
            ],
        )
        .expect("plan");
        assert_eq!(p, Plan::default(), "removing a non-member sends nothing");
        // Later changes win over earlier ones in the same batch.
        let p = plan(
            &l,
            &[],
            &[Change::RemoveAll { guid: g(1) }, add(Membership::Full)],
        )
        .expect("plan");
        assert_eq!(p, Plan::default());
    }
}
