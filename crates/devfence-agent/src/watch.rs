//! Continuous verification (issue 12 item 4): the agent re-verifies every
//! Ready and Active device — node owner and mode, driver, group viability, an
//! IB VF's GUID and its port's P_Key table at the SM — through the same
//! application function as `devfence verify` ([`devfence_app::verify::pass`]),
//! whose engine quarantines a drifted Ready device and reports a drifted
//! Active one, each audited once by the engine.
//!
//! Triggers: every `[agent] verify_interval` seconds, and on the real host
//! (`--root /`) soon after a relevant kernel uevent
//! ([`devfence_host::uevent`]: a PCI, mdev, AP, InfiniBand or VFIO device
//! added, removed, bound, unbound or changed). A burst of events — a PF
//! creating its VFs — is one re-verification: the watcher waits until the
//! events have been quiet for [`DEBOUNCE`] (at most [`MAX_BURST`]) and then
//! runs once; events during a run cause one more run after it. On a simulated
//! host root the kernel's uevents are not for it: the watcher says so and
//! relies on the interval.
//!
//! Re-verifications never overlap (one loop runs them, one at a time) and run
//! on a blocking thread: the API is never blocked by one.
//!
//! What they find is kept as [`DriftFinding`]s (`GET /v1/findings`): a device
//! that verifies again clears its finding; a quarantined device's finding
//! stays while it is Quarantined; a reported Active device's finding goes
//! when the device is no longer held (its VM stopped, it was scrubbed).
//!
//! The watcher also keeps the host's inventory live ([`LiveInventory`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devfence_engine::engine::Check;
use devfence_model::Inventory;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use serde_json::Value;

use crate::Options;
use crate::api::{self, ApiError, State};
use crate::ops::lock;

/// How long uevents must be quiet before a burst's re-verification runs.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// The longest a burst may delay its re-verification.
pub const MAX_BURST: Duration = Duration::from_secs(2);
/// How long the uevent thread waits in one receive (its stop is noticed then).
const RECV_TIMEOUT: Duration = Duration::from_millis(500);

/// `outcome`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// verified, drifted, unknown, skipped or error.
    pub outcome: String,
}

/// `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UeventLabel {
    /// relevant, other, skipped or overflow.
    pub kind: String,
}

/// The outcomes of one re-verification.
pub const OUTCOMES: [&str; 5] = ["verified", "drifted", "unknown", "skipped", "error"];

/// The metrics of continuous verification (registered by
/// [`crate::metrics::Metrics`]); no label value names a device or tenant.
#[derive(Clone)]
pub struct VerifyMetrics {
    /// Drift findings now.
    pub findings: Gauge,
    /// Drifts found (a new finding each).
    pub drifts: Counter,
    /// Ready devices quarantined by a re-verification.
    pub quarantines: Counter,
    /// Re-verifications by outcome.
    pub runs: Family<OutcomeLabel, Counter>,
    /// How long a re-verification took.
    pub duration: Histogram,
    /// When the last re-verification ended (seconds since the epoch).
    pub last_timestamp: Gauge<f64, AtomicU64>,
    /// The generation of the SM's last completed sweep, as the last
    /// re-verification read it (absent without an SM that reports one).
    pub sm_generation: Gauge,
    /// How the SM's last sweep ended, as the last re-verification read it:
    /// 1 for that outcome, 0 for the others.
    pub sm_last_sweep: Family<OutcomeLabel, Gauge>,
    /// Kernel uevents received, by kind.
    pub uevents: Family<UeventLabel, Counter>,
    /// Full walks of the host's sysfs for the inventory.
    pub inventory_walks: Counter,
    /// 1 while this host's lease in the fleet is lost (issue 13).
    pub fleet_lease_lost: Gauge,
}

impl Default for VerifyMetrics {
    fn default() -> Self {
        let m = VerifyMetrics {
            findings: Gauge::default(),
            drifts: Counter::default(),
            quarantines: Counter::default(),
            runs: Family::default(),
            // 1 ms to ~65 s.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            last_timestamp: Gauge::default(),
            sm_generation: Gauge::default(),
            sm_last_sweep: Family::default(),
            uevents: Family::default(),
            inventory_walks: Counter::default(),
            fleet_lease_lost: Gauge::default(),
        };
        for o in OUTCOMES {
            let _ = m.runs.get_or_create(&OutcomeLabel {
                outcome: o.to_owned(),
            });
        }
        m
    }
}

impl VerifyMetrics {
    /// Registers every metric in `r` (which carries the `devfence` prefix).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "drift_findings",
            "Devices whose re-verification found them changed since their gates passed, now (GET /v1/findings)",
            self.findings.clone(),
        );
        r.register(
            "drifts_detected",
            "Drift findings raised by continuous verification (each new finding once)",
            self.drifts.clone(),
        );
        r.register(
            "quarantines",
            "Ready devices quarantined by continuous verification because they drifted",
            self.quarantines.clone(),
        );
        r.register(
            "reverifications",
            "Re-verifications of every Ready and Active device, by outcome",
            self.runs.clone(),
        );
        r.register_with_unit(
            "reverification_duration",
            "Time one re-verification of every Ready and Active device took",
            Unit::Seconds,
            self.duration.clone(),
        );
        r.register_with_unit(
            "reverification_last_timestamp",
            "When the last re-verification ended (Unix time)",
            Unit::Seconds,
            self.last_timestamp.clone(),
        );
        r.register(
            "sm_sweep_generation",
            "The generation of the subnet manager's last completed sweep, as the last re-verification read it",
            self.sm_generation.clone(),
        );
        r.register(
            "sm_last_sweep",
            "How the subnet manager's last sweep ended (outcome none_yet, clean or errors: 1 for the one the last re-verification read)",
            self.sm_last_sweep.clone(),
        );
        r.register(
            "uevents",
            "Kernel uevents the agent received, by kind (relevant, other, skipped, overflow)",
            self.uevents.clone(),
        );
        r.register(
            "fleet_lease_lost",
            "1 while this host's lease in the fleet is lost: operations that need the fleet are refused until the agent is restarted and registers the host again (0 while it holds; 0 outside a fleet)",
            self.fleet_lease_lost.clone(),
        );
        r.register(
            "inventory_walks",
            "Full walks of the host's sysfs for the inventory (the live inventory saves the rest)",
            self.inventory_walks.clone(),
        );
    }

    fn uevent(&self, kind: &str) {
        self.uevents
            .get_or_create(&UeventLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }
}

/// One device found changed since its gates passed.
#[derive(Clone, Debug, Serialize, PartialEq, schemars::JsonSchema)]
pub struct DriftFinding {
    /// The device.
    pub device: String,
    /// The tenant that holds it.
    pub tenant: String,
    /// Its state when the drift was found (`Ready(acme)`, `Active(acme, vm1)`).
    pub state: String,
    /// Its state in the ledger now (`quarantined`, `active`).
    pub now: String,
    /// What differed (the values read and the ones expected).
    pub what: String,
    /// What the device was expected to show.
    pub expected: Value,
    /// `quarantined` (it was Ready) or `reported` (it is Active: never
    /// taken from its VM).
    pub action: &'static str,
    /// When it was first found (ms since the epoch).
    pub first_seen_ms: u64,
    /// When a re-verification last found it.
    pub last_seen_ms: u64,
    /// The re-verification that first found it.
    pub first_generation: u64,
    /// The re-verification that last found it.
    pub last_generation: u64,
}

/// A device whose state could not be read by the last re-verification (the SM
/// did not answer …): not verified, nothing changed.
#[derive(Clone, Debug, Serialize, PartialEq, schemars::JsonSchema)]
pub struct Unverified {
    /// The device.
    pub device: String,
    /// Why.
    pub why: String,
}

/// `GET /v1/findings`: the drift findings now, and the last re-verification.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct FindingsAnswer {
    /// Every device found changed since its gates passed (cleared when it
    /// verifies again).
    pub findings: Vec<DriftFinding>,
    /// The last re-verification, once one ran.
    pub last: Option<LastRun>,
    /// Seconds between two re-verifications.
    pub interval_seconds: f64,
    /// Whether the kernel's uevents reach the watcher.
    pub uevents: Uevents,
}

/// The last re-verification.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct LastRun {
    /// Its number (1 for the agent's first).
    pub generation: u64,
    /// What started it: `start`, `interval` or `uevent`.
    pub trigger: &'static str,
    /// When it began (ms since the epoch).
    pub started_at_ms: u64,
    /// When it ended.
    pub finished_at_ms: u64,
    /// verified, drifted, unknown, skipped (no ledger yet) or error.
    pub outcome: &'static str,
    /// Ready and Active devices re-verified.
    pub devices: usize,
    /// Of which verified.
    pub verified: usize,
    /// Of which drifted.
    pub drifted: usize,
    /// The devices that could not be verified.
    pub unverified: Vec<Unverified>,
    /// The SM's sweep generation, where the backend reports one.
    pub sm_generation: Option<u64>,
    /// Why it could not run (outcome `skipped` or `error`).
    pub error: Option<ApiError>,
    /// What opening the environment noticed.
    pub notices: Vec<String>,
}

/// Whether the kernel's uevents reach the watcher.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Uevents {
    /// The agent listens on the kernel's uevent socket.
    Kernel,
    /// It does not; `why` says why (a simulated root, a socket that cannot be
    /// opened). Re-verification runs at the interval only.
    None {
        /// Why.
        why: String,
    },
}

/// The continuous verification's state, shared by the watcher, the uevent
/// thread and the routes.
pub struct Watch {
    opts: Options,
    interval_ms: AtomicU64,
    kick: tokio::sync::Notify,
    findings: Mutex<BTreeMap<String, DriftFinding>>,
    last: Mutex<Option<LastRun>>,
    runs: AtomicU64,
    uevents: Mutex<Uevents>,
    /// The host's inventory, kept live.
    pub inventory: LiveInventory,
}

impl Watch {
    /// The watcher of an agent started with `opts` (the default interval
    /// until [`set_interval`](Self::set_interval)).
    #[must_use]
    pub fn new(opts: Options) -> Self {
        let interval = Duration::from_secs(devfence_app::config::DEFAULT_VERIFY_INTERVAL);
        Watch {
            opts,
            interval_ms: AtomicU64::new(ms(interval)),
            kick: tokio::sync::Notify::new(),
            findings: Mutex::new(BTreeMap::new()),
            last: Mutex::new(None),
            runs: AtomicU64::new(0),
            uevents: Mutex::new(Uevents::None {
                why: "the watcher has not started".into(),
            }),
            inventory: LiveInventory::new(interval),
        }
    }

    /// Sets the interval (`[agent] verify_interval`).
    pub fn set_interval(&self, d: Duration) {
        self.interval_ms.store(ms(d), Ordering::Relaxed);
        self.inventory.set_max_age(d);
    }

    /// The interval.
    #[must_use]
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.load(Ordering::Relaxed))
    }

    /// Asks for a re-verification soon (a relevant uevent): bursts coalesce.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Re-verifications run so far.
    #[must_use]
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// The current findings, by device.
    #[must_use]
    pub fn findings(&self) -> Vec<DriftFinding> {
        lock(&self.findings).values().cloned().collect()
    }

    /// `GET /v1/findings`.
    #[must_use]
    pub fn view(&self) -> FindingsAnswer {
        FindingsAnswer {
            findings: self.findings(),
            last: lock(&self.last).clone(),
            interval_seconds: self.interval().as_secs_f64(),
            uevents: lock(&self.uevents).clone(),
        }
    }

    /// One re-verification, on the calling (blocking) thread.
    fn pass(&self, metrics: &VerifyMetrics, trigger: &'static str) {
        let generation = self.runs.fetch_add(1, Ordering::Relaxed) + 1;
        let t0 = Instant::now();
        let started_at_ms = now_ms();
        let actor = devfence_app::Actor {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            pid: i32::try_from(std::process::id()).ok(),
            via: "agent-verify",
        };
        let res = devfence_app::verify::pass(
            &self.opts.root,
            self.opts.ledger.as_deref(),
            self.opts.config.as_deref(),
            &actor,
        );
        let mut run = LastRun {
            generation,
            trigger,
            started_at_ms,
            finished_at_ms: 0,
            outcome: "verified",
            devices: 0,
            verified: 0,
            drifted: 0,
            unverified: Vec::new(),
            sm_generation: None,
            error: None,
            notices: Vec::new(),
        };
        if let Some(h) = devfence_app::fleet::registered() {
            let lost = h.sm.lease_lost();
            metrics.fleet_lease_lost.set(i64::from(lost));
            if lost {
                tracing::error!(
                    "this host's lease in the fleet is lost: IB operations are refused until the agent is restarted and registers the host again"
                );
            }
        }
        match res {
            Ok(p) => {
                let now = now_ms();
                let (new, quarantined) = self.record(&p, generation, now);
                metrics.drifts.inc_by(new);
                metrics.quarantines.inc_by(quarantined);
                let devs = &p.verified.reverification.devices;
                run.devices = devs.len();
                for d in devs {
                    match &d.check {
                        Check::Verified { .. } => run.verified += 1,
                        Check::Drifted { .. } => run.drifted += 1,
                        Check::Unknown { why } => run.unverified.push(Unverified {
                            device: d.device.to_string(),
                            why: why.clone(),
                        }),
                    }
                }
                run.outcome = if run.drifted > 0 {
                    "drifted"
                } else if run.unverified.is_empty() {
                    "verified"
                } else {
                    "unknown"
                };
                run.sm_generation = p.sm_generation;
                if let Some(g) = p.sm_generation {
                    metrics
                        .sm_generation
                        .set(i64::try_from(g).unwrap_or(i64::MAX));
                }
                if let Some(now) = p.sm_sweep {
                    for o in ["none_yet", "clean", "errors"] {
                        metrics
                            .sm_last_sweep
                            .get_or_create(&OutcomeLabel {
                                outcome: o.to_owned(),
                            })
                            .set(i64::from(o == now));
                    }
                }
                run.notices = p.notices;
                run.notices.extend(p.verified.warnings);
            }
            Err(e) => {
                let e = ApiError::from_app(&e);
                run.outcome = if e.code == "no_ledger" {
                    "skipped"
                } else {
                    "error"
                };
                run.error = Some(e);
            }
        }
        metrics
            .findings
            .set(i64::try_from(lock(&self.findings).len()).unwrap_or(i64::MAX));
        metrics
            .runs
            .get_or_create(&OutcomeLabel {
                outcome: run.outcome.to_owned(),
            })
            .inc();
        metrics.duration.observe(t0.elapsed().as_secs_f64());
        run.finished_at_ms = now_ms();
        #[allow(clippy::cast_precision_loss)]
        metrics
            .last_timestamp
            .set(run.finished_at_ms as f64 / 1000.0);
        *lock(&self.last) = Some(run);
    }

    /// Folds a pass into the findings; returns the new drifts and the
    /// quarantines it made.
    fn record(&self, p: &devfence_app::verify::Pass, generation: u64, now: u64) -> (u64, u64) {
        let mut f = lock(&self.findings);
        let (mut new, mut quarantines) = (0, 0);
        let states: BTreeMap<String, &str> = p
            .states
            .iter()
            .map(|(d, s)| (d.to_string(), s.as_str()))
            .collect();
        let state_of = |d: &str| states.get(d).map(|s| (*s).to_owned());
        let mut seen = std::collections::BTreeSet::new();
        for d in &p.verified.reverification.devices {
            let key = d.device.to_string();
            seen.insert(key.clone());
            match &d.check {
                Check::Verified { .. } => {
                    f.remove(&key);
                }
                Check::Unknown { .. } => {}
                Check::Drifted {
                    what,
                    evidence,
                    quarantined,
                } => {
                    if *quarantined {
                        quarantines += 1;
                    }
                    let action = if *quarantined {
                        "quarantined"
                    } else {
                        "reported"
                    };
                    let now_state = state_of(&key).unwrap_or_else(|| "unknown".into());
                    match f.get_mut(&key) {
                        Some(x) => {
                            x.what.clone_from(what);
                            x.expected = evidence.clone();
                            x.now = now_state;
                            x.last_seen_ms = now;
                            x.last_generation = generation;
                            if *quarantined {
                                x.action = action;
                                x.state.clone_from(&d.state);
                            }
                        }
                        None => {
                            new += 1;
                            f.insert(
                                key.clone(),
                                DriftFinding {
                                    device: key,
                                    tenant: d.tenant.to_string(),
                                    state: d.state.clone(),
                                    now: now_state,
                                    what: what.clone(),
                                    expected: evidence.clone(),
                                    action,
                                    first_seen_ms: now,
                                    last_seen_ms: now,
                                    first_generation: generation,
                                    last_generation: generation,
                                },
                            );
                        }
                    }
                }
            }
        }
        // Findings of devices this pass did not re-verify: a quarantined one
        // stays while the device is Quarantined; any other is resolved (the
        // device was released, recovered or drained since).
        f.retain(|k, x| {
            if seen.contains(k) {
                return true;
            }
            let now_state = state_of(k);
            let keep = x.action == "quarantined" && now_state.as_deref() == Some("quarantined");
            if let Some(s) = now_state {
                x.now = s;
            }
            keep
        });
        (new, quarantines)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, ms)
}

/// Where the watcher's uevents come from.
pub enum Source {
    /// The kernel's uevent socket (the real host).
    Kernel,
    /// None, and why (a simulated root).
    None(String),
}

impl Source {
    /// The source for an agent on `root`: the kernel's uevents on `/`, none
    /// on a simulated host (the kernel's events are not about it).
    #[must_use]
    pub fn for_root(root: &devfence_host::HostRoot) -> Source {
        if root.root() == std::path::Path::new("/") {
            Source::Kernel
        } else {
            Source::None(format!(
                "the host root {} is not the running host: the kernel's uevents are not about it; re-verifying at the interval only",
                root.root().display()
            ))
        }
    }
}

/// A running watcher: stop it with [`Watcher::stop`].
pub struct Watcher {
    stop: tokio::sync::watch::Sender<bool>,
    listening: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Stops the loop after the re-verification in flight (if any) ends,
    /// and the uevent thread at its next receive timeout.
    pub async fn stop(self) {
        self.listening.store(false, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts the watcher: the uevent thread (for [`Source::Kernel`]) and the
/// loop, whose first re-verification runs at once.
#[must_use]
pub fn start(state: &Arc<State>, source: Source) -> Watcher {
    let w = &state.watch;
    let listening = Arc::new(AtomicBool::new(false));
    let uevents = match source {
        Source::Kernel => match devfence_host::uevent::UeventListener::open(RECV_TIMEOUT) {
            Ok(l) => {
                listening.store(true, Ordering::Relaxed);
                w.inventory.set_live(true);
                let st = Arc::clone(state);
                let flag = Arc::clone(&listening);
                let spawned = std::thread::Builder::new()
                    .name("devfence-uevents".into())
                    .spawn(move || listen(l, &st, &flag));
                match spawned {
                    Ok(_) => Uevents::Kernel,
                    Err(e) => {
                        w.inventory.set_live(false);
                        Uevents::None {
                            why: format!("cannot start the uevent thread: {e}"),
                        }
                    }
                }
            }
            Err(e) => Uevents::None { why: e.to_string() },
        },
        Source::None(why) => Uevents::None { why },
    };
    if let Uevents::None { why } = &uevents {
        tracing::info!(
            "devfence serve: no kernel uevents ({why}); re-verifying every {} s",
            w.interval().as_secs()
        );
    }
    *lock(&w.uevents) = uevents;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(run(Arc::clone(state), rx));
    Watcher {
        stop,
        listening,
        task,
    }
}

/// The uevent thread: a relevant event marks the inventory stale and asks
/// for a re-verification; an overflow (events lost) does both too.
fn listen(mut l: devfence_host::uevent::UeventListener, st: &State, on: &AtomicBool) {
    use devfence_host::uevent::Received;
    let (w, m) = (&st.watch, &st.metrics.verify);
    while on.load(Ordering::Relaxed) {
        match l.recv() {
            Ok(Received::Event(e)) if e.is_relevant() => {
                m.uevent("relevant");
                w.inventory.invalidate();
                w.kick();
            }
            Ok(Received::Event(_)) => m.uevent("other"),
            Ok(Received::Skipped(_)) => m.uevent("skipped"),
            Ok(Received::Overflow) => {
                m.uevent("overflow");
                w.inventory.invalidate();
                w.kick();
            }
            Ok(Received::Timeout) => {}
            Err(e) => {
                // Fail closed: without events the inventory cannot be
                // trusted between walks; re-verify at the interval only.
                w.inventory.set_live(false);
                *lock(&w.uevents) = Uevents::None {
                    why: format!("the uevent socket failed: {e}"),
                };
                tracing::warn!(
                    "devfence serve: the uevent socket failed ({e}); re-verifying at the interval only"
                );
                return;
            }
        }
    }
}

/// The loop: one re-verification at a time, at start, at each interval and
/// after each burst of relevant uevents.
async fn run(state: Arc<State>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut trigger = "start";
    loop {
        let st = Arc::clone(&state);
        let done = tokio::task::spawn_blocking(move || {
            let before: std::collections::BTreeSet<String> =
                st.watch.findings().into_iter().map(|f| f.device).collect();
            st.watch.pass(&st.metrics.verify, trigger);
            // Each new drift is an event for orchestrators too.
            for f in st.watch.findings() {
                if !before.contains(&f.device) {
                    st.events.publish(crate::events::Event::Drift {
                        device: f.device.clone(),
                        tenant: f.tenant.clone(),
                        action: f.action.to_owned(),
                        what: f.what.clone(),
                    });
                    st.events.publish(crate::events::Event::DeviceState {
                        device: f.device,
                        state: f.now,
                    });
                }
            }
            // The interval also refreshes the inventory; a burst made it stale.
            st.watch
                .inventory
                .refresh_if_stale(&st.watch.opts.root, &st.metrics.verify);
            // And the fleet gauges (nothing without [fleet]).
            crate::fleet::refresh_metrics(&st);
        })
        .await;
        if done.is_err() {
            // A panic in a pass: counted, and the loop goes on.
            state
                .metrics
                .verify
                .runs
                .get_or_create(&OutcomeLabel {
                    outcome: "error".into(),
                })
                .inc();
        }
        let next = tokio::time::Instant::now() + state.watch.interval();
        trigger = tokio::select! {
            () = tokio::time::sleep_until(next) => "interval",
            () = state.watch.kick.notified() => {
                tokio::select! {
                    () = debounce(&state.watch) => {},
                    _ = stop.changed() => return,
                }
                "uevent"
            }
            _ = stop.changed() => return,
        };
    }
}

/// Waits until the uevents have been quiet for [`DEBOUNCE`], or [`MAX_BURST`].
async fn debounce(w: &Watch) {
    let until = tokio::time::Instant::now() + MAX_BURST;
    loop {
        tokio::select! {
            () = tokio::time::sleep(DEBOUNCE) => return,
            () = tokio::time::sleep_until(until) => return,
            () = w.kick.notified() => {}
        }
    }
}

/// The inventory, read once and kept: marked stale by every relevant uevent,
/// by the agent's own operations and by age (the interval); read again by the
/// next re-verification or request that finds it stale. Only served when the
/// kernel's uevents reach the agent ([`Source::Kernel`]): on a simulated root
/// a request walks the tree (a change to it sends no event).
pub struct LiveInventory {
    live: AtomicBool,
    epoch: AtomicU64,
    max_age_ms: AtomicU64,
    snap: Mutex<Option<Snapshot>>,
    generations: AtomicU64,
}

struct Snapshot {
    inv: Arc<Inventory>,
    epoch: u64,
    generation: u64,
    read_at: Instant,
}

/// Where an answer's inventory came from.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct InventorySource {
    /// `live` (kept from uevents, not re-read) or `walk` (read for this request).
    pub source: &'static str,
    /// The number of the walk it came from.
    pub generation: u64,
    /// How old it is, in milliseconds.
    pub age_ms: u64,
}

impl LiveInventory {
    fn new(max_age: Duration) -> Self {
        LiveInventory {
            live: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            max_age_ms: AtomicU64::new(ms(max_age.saturating_mul(2))),
            snap: Mutex::new(None),
            generations: AtomicU64::new(0),
        }
    }

    /// Whether kept inventories are served (the kernel's uevents reach the agent).
    pub fn set_live(&self, on: bool) {
        self.live.store(on, Ordering::Relaxed);
    }

    fn set_max_age(&self, interval: Duration) {
        // A pass refreshes it every interval; twice that bounds a late pass.
        self.max_age_ms
            .store(ms(interval.saturating_mul(2)), Ordering::Relaxed);
    }

    /// Marks what is kept stale (a uevent, an operation of the agent).
    pub fn invalidate(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    fn current(&self) -> Option<(Arc<Inventory>, InventorySource)> {
        if !self.live.load(Ordering::Relaxed) {
            return None;
        }
        let g = lock(&self.snap);
        let s = g.as_ref()?;
        let age = ms(s.read_at.elapsed());
        (s.epoch == self.epoch.load(Ordering::Acquire)
            && age <= self.max_age_ms.load(Ordering::Relaxed))
        .then(|| {
            (
                Arc::clone(&s.inv),
                InventorySource {
                    source: "live",
                    generation: s.generation,
                    age_ms: age,
                },
            )
        })
    }

    /// The inventory: the kept one when current, else a walk (kept for the
    /// next request).
    ///
    /// # Errors
    /// The walk fails (the root cannot be read).
    pub fn get(
        &self,
        root: &devfence_host::HostRoot,
        metrics: &VerifyMetrics,
    ) -> Result<(Arc<Inventory>, InventorySource), ApiError> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        self.walk(root, metrics)
    }

    fn walk(
        &self,
        root: &devfence_host::HostRoot,
        metrics: &VerifyMetrics,
    ) -> Result<(Arc<Inventory>, InventorySource), ApiError> {
        // The epoch before the walk: an event during it leaves it stale.
        let epoch = self.epoch.load(Ordering::Acquire);
        let inv = Arc::new(api::app(devfence_app::check::inventory(root, false))?);
        metrics.inventory_walks.inc();
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let mut g = lock(&self.snap);
        if g.as_ref().is_none_or(|s| s.generation < generation) {
            *g = Some(Snapshot {
                inv: Arc::clone(&inv),
                epoch,
                generation,
                read_at: Instant::now(),
            });
        }
        Ok((
            inv,
            InventorySource {
                source: "walk",
                generation,
                age_ms: 0,
            },
        ))
    }

    /// Walks again when live and no longer current (after a re-verification).
    fn refresh_if_stale(&self, root: &devfence_host::HostRoot, metrics: &VerifyMetrics) {
        if self.live.load(Ordering::Relaxed) && self.current().is_none() {
            let _ = self.walk(root, metrics);
        }
    }
}

/// `GET /v1/inventory` through the live inventory.
pub async fn inventory_route(st: Arc<State>) -> Result<Value, ApiError> {
    api::blocking(move || {
        let (inv, _) = st
            .watch
            .inventory
            .get(&st.options().root, &st.metrics.verify)?;
        api::to_json(&*inv)
    })
    .await
}

/// `GET /v1/check` on the live inventory; says where the inventory came from.
pub async fn check_route(st: Arc<State>) -> Result<Value, ApiError> {
    api::blocking(move || {
        let o = st.options();
        let (inv, source) = st.watch.inventory.get(&o.root, &st.metrics.verify)?;
        let r = api::app(devfence_app::check::check_inventory(
            &o.root,
            &inv,
            o.ledger.as_deref(),
            o.config.as_deref(),
            &devfence_app::check::CheckRequest::default(),
        ))?;
        api::to_json(&crate::openapi::CheckAnswer {
            findings: r.findings,
            summary: r.summary,
            tenancy: r.tenancy.map(|p| p.display().to_string()),
            tenancy_from_ledger: r.tenancy_from_ledger,
            tenancy_file_unread: r.tenancy_file_unread.map(|p| p.display().to_string()),
            notices: r.notices,
            inventory: source,
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Policy;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;

    fn metric(state: &State, name: &str) -> f64 {
        let t = state.metrics.encode();
        t.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    async fn check(state: &Arc<State>) -> Value {
        let req = hyper::Request::builder()
            .method("GET")
            .uri("/v1/check")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = api::handle(Arc::clone(state), None, req).await;
        assert_eq!(resp.status(), 200);
        let b = resp.into_body().collect().await.expect("body").to_bytes();
        serde_json::from_slice(&b).expect("json")
    }

    async fn until(what: &str, mut pred: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !pred() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within the deadline"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The wake-up path with the real kernel: the watcher is given the
    /// kernel's uevents on a simulated root (only this test does that: the
    /// agent itself listens on `/` only), the interval is an hour, and a
    /// burst of real `change` events on one of this machine's PCI functions
    /// (`echo change > uevent`, as root) must cause a re-verification — one
    /// for the burst, not one per event — and a walk of the inventory, which
    /// `check` then serves without walking again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_real_uevents_is_one_reverification_and_one_walk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("lab");
        devfence_host::sim::generate(&devfence_host::sim::GenerateOptions {
            profile: devfence_host::sim::Profile::Lab,
            out: out.clone(),
            vfs: None,
            host_id: 0,
        })
        .expect("simulated host");
        let state = Arc::new(State::new(
            Options {
                root: devfence_host::HostRoot::new(&out),
                ledger: None,
                config: None,
                socket: None,
                limits: crate::Limits::default(),
                log_level: None,
            },
            Policy {
                admin_gid: None,
                reader_gid: None,
            },
        ));
        state.watch.set_interval(Duration::from_secs(3600));
        let w = start(&state, Source::Kernel);
        assert_eq!(*lock(&state.watch.uevents), Uevents::Kernel);
        // The first pass (no ledger yet: skipped) and the first walk.
        until("the first pass", || state.watch.runs() >= 1).await;
        until("the first walk", || {
            metric(&state, "devfence_inventory_walks_total") >= 1.0
        })
        .await;
        let walks = metric(&state, "devfence_inventory_walks_total");
        for _ in 0..3 {
            let v = check(&state).await;
            assert_eq!(v["inventory"]["source"], "live", "{v}");
        }
        assert_eq!(
            metric(&state, "devfence_inventory_walks_total"),
            walks,
            "check served the live inventory without walking"
        );

        let runs = state.watch.runs();
        let burst: u32 = 20;
        for _ in 0..burst {
            devfence_host::uevent::synthesize_pci_change()
                .expect("a PCI function's uevent file written (the test runs as root)");
        }
        until("the burst's events received", || {
            metric(&state, "devfence_uevents_total{kind=\"relevant\"}") >= f64::from(burst)
        })
        .await;
        until("a re-verification after the burst", || {
            lock(&state.watch.last)
                .as_ref()
                .is_some_and(|l| l.trigger == "uevent" && l.generation > runs)
        })
        .await;
        until("the inventory walked again", || {
            metric(&state, "devfence_inventory_walks_total") > walks
        })
        .await;
        let after = state.watch.runs() - runs;
        assert!(
            after < u64::from(burst),
            "{after} re-verifications for a burst of {burst} events"
        );
        let v = check(&state).await;
        assert_eq!(v["inventory"]["source"], "live", "{v}");
        w.stop().await;
    }

    /// Without uevents (a simulated root) nothing is served from memory: a
    /// change to the tree is seen by the next request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_uevents_check_walks_every_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("lab");
        devfence_host::sim::generate(&devfence_host::sim::GenerateOptions {
            profile: devfence_host::sim::Profile::Lab,
            out: out.clone(),
            vfs: None,
            host_id: 0,
        })
        .expect("simulated host");
        let root = devfence_host::HostRoot::new(&out);
        let state = Arc::new(State::new(
            Options {
                root: root.clone(),
                ledger: None,
                config: None,
                socket: None,
                limits: crate::Limits::default(),
                log_level: None,
            },
            Policy {
                admin_gid: None,
                reader_gid: None,
            },
        ));
        let w = start(&state, Source::for_root(&root));
        assert!(matches!(*lock(&state.watch.uevents), Uevents::None { .. }));
        for n in 1..=2 {
            let v = check(&state).await;
            assert_eq!(v["inventory"]["source"], "walk", "{v}");
            assert!(metric(&state, "devfence_inventory_walks_total") >= f64::from(n));
        }
        w.stop().await;
    }
}
