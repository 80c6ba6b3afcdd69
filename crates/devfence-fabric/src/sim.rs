//! [`SimSm`]: the embedded simulated subnet manager (docs/design.md §6).
//!
//! It behaves like OpenSM as seen through the [`SubnetManager`] seam:
//!
//! - [`apply`](SubnetManager::apply) puts the staged changes into the SM's
//!   configuration and requests a heavy sweep; the sweep **starts** `lag` later and
//!   **completes** `sweep_time` after that. At its start it snapshots the
//!   configuration and the ports on the fabric; at its end it programs every
//!   present port (its partitions, plus the default partition, limited) and bumps
//!   the generation. A change that arrives while a sweep is running is picked up by
//!   the next one, so its ticket names generation + 2.
//! - Ports join and leave the fabric with [`attach`](SimSm::attach) /
//!   [`detach`](SimSm::detach) (a VF reset with a GUID rotation is a detach of the
//!   old GUID and an attach of the new one); like a trap 128, each requests a sweep.
//!   With `auto_attach`, a GUID added to a partition is attached on apply.
//! - Time is a clock you control: [`SimSm::new`] runs on a virtual clock that only
//!   [`advance`](SimSm::advance) / [`settle`](SimSm::settle) move, so tests are
//!   deterministic. [`SimSm::real_time`] follows the wall clock for the demo: every
//!   call first runs the sweeps that fell due since the last call, at the times they
//!   fell due — nobody can observe the SM between calls, so this is the same as a
//!   sweeper thread, without the thread.
//!
//! Fault knobs, each of which the gate must survive by failing closed:
//! [`set_lag`](SimSm::set_lag), [`drop_next_update`](SimSm::drop_next_update),
//! [`stale_reads`](SimSm::stale_reads), [`fail_next_sweep`](SimSm::fail_next_sweep),
//! [`error_next_call`](SimSm::error_next_call),
//! [`reorder_next_two_applies`](SimSm::reorder_next_two_applies),
//! [`set_state`](SimSm::set_state), [`freeze`](SimSm::freeze) / [`thaw`](SimSm::thaw).
//! The full history of what the SM was asked, programmed and answered, and when, is
//! kept ([`history`](SimSm::history)).
//!
//! The SM it stands for outlives devfence, which runs one operation per process: a
//! [`PersistentSimSm`] keeps a `SimSm`'s state ([`SimSmState`]) in a file and takes
//! turns on it with other processes, with the wall-clock time between them passing
//! for the simulated SM too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use devfence_model::{Guid, PKey};

use crate::{
    Change, ChangeId, FabricError, Generation, Health, MembershipMap, Observation, PortView,
    Programmed, SmState, SmStatus, SubnetManager, SweepOutcome, Ticket,
};

mod persist;

pub use persist::{PersistentSimSm, SimSmState, SimStateError};

/// How the simulated SM behaves when no fault is injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// From a sweep request (apply, port change) to the sweep's start.
    pub lag: Duration,
    /// From a sweep's start to its completion.
    pub sweep_time: Duration,
    /// Every present port also holds the default partition, limited (`0x7fff`),
    /// as OpenSM's `Default=0x7fff : ALL=limited` gives it.
    pub default_partition: bool,
    /// Observations carry the configured membership of each GUID (as UFM's API
    /// does); when false, only the programmed port tables (as OpenSM's SA does).
    pub report_configured: bool,
    /// A GUID added to a partition joins the fabric on apply (no explicit
    /// [`attach`](SimSm::attach) needed).
    pub auto_attach: bool,
}

impl Default for SimConfig {
    /// OpenSM-like: a sweep starts 10 ms after the request and takes 5 ms.
    fn default() -> Self {
        Self {
            lag: Duration::from_millis(10),
            sweep_time: Duration::from_millis(5),
            default_partition: true,
            report_configured: true,
            auto_attach: true,
        }
    }
}

/// What became of one apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyFate {
    /// The changes reached the SM's configuration.
    Configured,
    /// Lost (fault): the SM never saw them, though a sweep still ran.
    Dropped,
    /// Held back (fault): they reach the configuration only after the next apply's.
    HeldBack,
    /// Configured, and then the held-back changes of an earlier apply on top.
    ConfiguredThenHeld {
        /// The earlier apply whose changes were applied last.
        held: ChangeId,
    },
}

/// One thing that happened in the simulated SM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    /// A change was staged.
    Staged(Change),
    /// Staged changes were applied.
    Applied {
        /// The ticket returned.
        ticket: Ticket,
        /// The changes of this apply.
        changes: Vec<Change>,
        /// What became of them.
        fate: ApplyFate,
    },
    /// A sweep started; it will complete as this generation.
    SweepStarted {
        /// The generation it will complete as.
        generation: Generation,
    },
    /// A sweep completed and programmed the ports.
    SweepCompleted {
        /// The new generation.
        generation: Generation,
        /// Clean or with errors.
        outcome: SweepOutcome,
        /// Every present port's table after the sweep.
        programmed: BTreeMap<Guid, BTreeSet<PKey>>,
    },
    /// Someone read the SM.
    Observed {
        /// The generation the answer carried.
        generation: Generation,
        /// True when a stale view was served (fault).
        stale: bool,
    },
    /// A port joined the fabric.
    Attached(Guid),
    /// A port left the fabric.
    Detached(Guid),
    /// An injected error was returned from this call.
    ErrorInjected {
        /// The call.
        op: &'static str,
    },
    /// A fault knob or setting was changed.
    Knob(String),
}

/// A [`SimEvent`] with the simulated time it happened at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Time since the SM was created (virtual or wall clock).
    pub at: Duration,
    /// What happened.
    pub event: SimEvent,
}

#[derive(Clone, Debug)]
struct Snapshot {
    status: SmStatus,
    /// Present ports: LID and table.
    programmed: BTreeMap<Guid, (u16, BTreeSet<PKey>)>,
    /// The configuration when this snapshot was taken (served on stale reads).
    configured: MembershipMap,
}

#[derive(Debug)]
struct Running {
    ends: Duration,
    config: MembershipMap,
    attached: BTreeSet<Guid>,
}

#[derive(Debug)]
enum Reorder {
    Off,
    Armed,
    Holding(ChangeId, Vec<Change>),
}

#[derive(Debug)]
enum Clock {
    Virtual,
    Real(Instant),
}

#[derive(Debug)]
struct Inner {
    cfg: SimConfig,
    clock: Clock,
    /// Virtual time, or the skew added to the wall clock.
    offset: Duration,
    /// The time up to which events have been run.
    now: Duration,
    staged: Vec<Change>,
    configured: MembershipMap,
    attached: BTreeSet<Guid>,
    lids: BTreeMap<Guid, u16>,
    next_lid: u16,
    state: SmState,
    current: Arc<Snapshot>,
    previous: Arc<Snapshot>,
    requested: Option<Duration>,
    running: Option<Running>,
    frozen: bool,
    resume_at: Duration,
    drop_next: bool,
    stale_left: u32,
    fail_next_sweep: bool,
    error_next: Option<FabricError>,
    reorder: Reorder,
    next_change: u64,
    history: Vec<HistoryEntry>,
}

impl Inner {
    fn clock_now(&self) -> Duration {
        match self.clock {
            Clock::Virtual => self.offset,
            Clock::Real(start) => start.elapsed() + self.offset,
        }
    }

    fn log(&mut self, event: SimEvent) {
        self.history.push(HistoryEntry {
            at: self.now,
            event,
        });
    }

    /// When the next sweep event (start or end) is due, if one is.
    fn next_due(&self) -> Option<Duration> {
        if self.frozen {
            return None;
        }
        let due = match (&self.running, self.requested) {
            (Some(r), _) => r.ends,
            (None, Some(req)) => req + self.cfg.lag,
            (None, None) => return None,
        };
        Some(due.max(self.resume_at).max(self.now))
    }

    /// Runs every sweep event due at or before `t`, then moves time to `t`.
    fn run_to(&mut self, t: Duration) {
        while let Some(at) = self.next_due().filter(|at| *at <= t) {
            self.now = at;
            if self.running.is_some() {
                self.end_sweep();
            } else {
                self.start_sweep();
            }
        }
        self.now = self.now.max(t);
    }

    fn sync(&mut self) {
        let t = self.clock_now();
        self.run_to(t);
    }

    fn start_sweep(&mut self) {
        self.requested = None;
        self.running = Some(Running {
            ends: self.now + self.cfg.sweep_time,
            config: self.configured.clone(),
            attached: self.attached.clone(),
        });
        let generation = Generation(self.current.status.generation.0 + 1);
        self.log(SimEvent::SweepStarted { generation });
    }

    fn end_sweep(&mut self) {
        let Some(run) = self.running.take() else {
            return;
        };
        let mut programmed = BTreeMap::new();
        for g in &run.attached {
            let lid = match self.lids.get(g) {
                Some(l) => *l,
                None => {
                    let l = self.next_lid;
                    self.next_lid = self.next_lid.wrapping_add(1).max(2);
                    self.lids.insert(*g, l);
                    l
                }
            };
            let mut pkeys = run.config.pkeys_of(*g);
            if self.cfg.default_partition {
                pkeys.insert(PKey(PKey::DEFAULT_BASE));
            }
            programmed.insert(*g, (lid, pkeys));
        }
        let generation = Generation(self.current.status.generation.0 + 1);
        let outcome = if std::mem::take(&mut self.fail_next_sweep) {
            // Like OpenSM's "Errors during initialization": the tables may well be
            // set, but the sweep is not clean, and the SM sweeps again.
            self.requested.get_or_insert(self.now);
            SweepOutcome::Errors("injected: errors during initialization".into())
        } else {
            SweepOutcome::Clean
        };
        let snap = Snapshot {
            status: SmStatus {
                state: self.state,
                generation,
                sweep: outcome.clone(),
            },
            programmed,
            configured: run.config,
        };
        let tables = snap
            .programmed
            .iter()
            .map(|(g, (_, k))| (*g, k.clone()))
            .collect();
        self.previous = std::mem::replace(&mut self.current, Arc::new(snap));
        self.log(SimEvent::SweepCompleted {
            generation,
            outcome,
            programmed: tables,
        });
    }

    fn request_sweep(&mut self) {
        self.requested.get_or_insert(self.now);
    }

    /// Returns the injected error for `op`, once.
    fn injected(&mut self, op: &'static str) -> Result<(), FabricError> {
        match self.error_next.take() {
            Some(e) => {
                self.log(SimEvent::ErrorInjected { op });
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn configure(&mut self, changes: &[Change]) {
        for c in changes {
            // Validated when staged; a refusal here cannot happen.
            if self.configured.apply(c).is_err() {
                continue;
            }
            if self.cfg.auto_attach
                && let Change::Add { guid, .. } = c
                && self.attached.insert(*guid)
            {
                self.log(SimEvent::Attached(*guid));
            }
            if self.cfg.auto_attach
                && let Change::Replace(map) = c
            {
                let new: Vec<Guid> = map.guids().filter(|g| !self.attached.contains(g)).collect();
                for g in new {
                    self.attached.insert(g);
                    self.log(SimEvent::Attached(g));
                }
            }
        }
    }

    fn knob(&mut self, what: String) {
        self.sync();
        self.log(SimEvent::Knob(what));
    }
}

/// The embedded simulated subnet manager. See the [module docs](self).
#[derive(Debug)]
pub struct SimSm {
    inner: Mutex<Inner>,
}

impl Default for SimSm {
    fn default() -> Self {
        Self::new(SimConfig::default())
    }
}

impl SimSm {
    /// A simulated SM on a virtual clock (time moves only by
    /// [`advance`](Self::advance) and [`settle`](Self::settle)). It comes up like
    /// OpenSM: its first sweep is due `lag` after time zero.
    #[must_use]
    pub fn new(cfg: SimConfig) -> Self {
        Self::with_clock(cfg, Clock::Virtual)
    }

    /// A simulated SM that follows the wall clock (for the demo): sweeps fall due
    /// `lag` after a request, without anyone advancing time.
    #[must_use]
    pub fn real_time(cfg: SimConfig) -> Self {
        Self::with_clock(cfg, Clock::Real(Instant::now()))
    }

    fn with_clock(cfg: SimConfig, clock: Clock) -> Self {
        let empty = Arc::new(Snapshot {
            status: SmStatus {
                state: SmState::Master,
                generation: Generation(0),
                sweep: SweepOutcome::NoneYet,
            },
            programmed: BTreeMap::new(),
            configured: MembershipMap::new(),
        });
        Self {
            inner: Mutex::new(Inner {
                cfg,
                clock,
                offset: Duration::ZERO,
                now: Duration::ZERO,
                staged: Vec::new(),
                configured: MembershipMap::new(),
                attached: BTreeSet::new(),
                lids: BTreeMap::new(),
                next_lid: 2, // LID 1 is the SM's own port
                state: SmState::Master,
                current: empty.clone(),
                previous: empty,
                requested: Some(Duration::ZERO),
                running: None,
                frozen: false,
                resume_at: Duration::ZERO,
                drop_next: false,
                stale_left: 0,
                fail_next_sweep: false,
                error_next: None,
                reorder: Reorder::Off,
                next_change: 1,
                history: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // ---- the clock ----

    /// Moves the clock forward by `d` and runs every sweep that falls due. On a
    /// real-time SM it skews the clock forward.
    pub fn advance(&self, d: Duration) {
        let mut i = self.lock();
        i.offset += d;
        i.sync();
    }

    /// Advances the clock until no sweep is requested or running, and returns the
    /// generation reached. A frozen SM does not move (nothing sweeps).
    pub fn settle(&self) -> Generation {
        let mut i = self.lock();
        i.sync();
        // Each loop runs at least one event; a failed sweep requests one retry,
        // so this ends unless faults are re-armed concurrently — bound it anyway.
        for _ in 0..1_000 {
            let Some(due) = i.next_due() else { break };
            let now = i.clock_now();
            if due > now {
                i.offset += due - now;
            }
            i.sync();
        }
        i.current.status.generation
    }

    /// The SM's time: since creation (virtual or wall clock plus skew).
    #[must_use]
    pub fn now(&self) -> Duration {
        let mut i = self.lock();
        i.sync();
        i.now
    }

    // ---- the fabric ----

    /// A port with `guid` joins the fabric (link up, or a VF comes back with this
    /// GUID). Requests a sweep, as OpenSM's trap 128 does.
    pub fn attach(&self, guid: Guid) {
        let mut i = self.lock();
        i.sync();
        if i.attached.insert(guid) {
            i.log(SimEvent::Attached(guid));
        }
        i.request_sweep();
    }

    /// The port with `guid` leaves the fabric (link down, or the VF's GUID is
    /// rotated away). Requests a sweep.
    pub fn detach(&self, guid: Guid) {
        let mut i = self.lock();
        i.sync();
        if i.attached.remove(&guid) {
            i.log(SimEvent::Detached(guid));
        }
        i.request_sweep();
    }

    // ---- fault knobs ----

    /// Sets the delay from a sweep request to the sweep's start (the SM lags).
    pub fn set_lag(&self, lag: Duration) {
        let mut i = self.lock();
        i.knob(format!("lag {lag:?}"));
        i.cfg.lag = lag;
    }

    /// Sets how long a sweep takes from start to completion.
    pub fn set_sweep_time(&self, d: Duration) {
        let mut i = self.lock();
        i.knob(format!("sweep time {d:?}"));
        i.cfg.sweep_time = d;
    }

    /// The next apply is silently lost: it returns a ticket and a sweep runs (the
    /// generation advances), but its changes never reach the configuration.
    pub fn drop_next_update(&self) {
        let mut i = self.lock();
        i.knob("drop next update".into());
        i.drop_next = true;
    }

    /// The next `n` observations answer with the view from before the last
    /// completed sweep (one sweep behind, as a lagging SA would).
    pub fn stale_reads(&self, n: u32) {
        let mut i = self.lock();
        i.knob(format!("stale reads {n}"));
        i.stale_left = n;
    }

    /// The next sweep to complete completes with errors (its tables are set, its
    /// outcome is not clean), and the SM sweeps again after `lag`.
    pub fn fail_next_sweep(&self) {
        let mut i = self.lock();
        i.knob("fail next sweep".into());
        i.fail_next_sweep = true;
    }

    /// The next call through the [`SubnetManager`] trait (stage, apply, observe,
    /// health) returns `error` and does nothing else.
    pub fn error_next_call(&self, error: FabricError) {
        let mut i = self.lock();
        i.knob(format!("error next call: {error}"));
        i.error_next = Some(error);
    }

    /// The next apply's changes are held back and reach the configuration only
    /// after the apply that follows it (the two arrive in the wrong order).
    pub fn reorder_next_two_applies(&self) {
        let mut i = self.lock();
        i.knob("reorder next two applies".into());
        i.reorder = Reorder::Armed;
    }

    /// Sets the role the SM reports (e.g. standby: its sweeps do not count).
    pub fn set_state(&self, state: SmState) {
        let mut i = self.lock();
        i.knob(format!("state {state}"));
        i.state = state;
    }

    /// Stops the SM (the SIGSTOP analogue): nothing sweeps until [`thaw`](Self::thaw).
    /// Reads still answer, with what was programmed before.
    pub fn freeze(&self) {
        let mut i = self.lock();
        i.knob("freeze".into());
        i.frozen = true;
    }

    /// Resumes a frozen SM: the sweeps it owes run from now on.
    pub fn thaw(&self) {
        let mut i = self.lock();
        i.knob("thaw".into());
        i.frozen = false;
        i.resume_at = i.now;
        i.sync();
    }

    /// Disarms every fault knob (lost, held-back and reordered updates, stale reads,
    /// failing sweeps, injected errors, freeze, non-master role). Changes already
    /// held back by a reorder are discarded. Lag and sweep time stay as set.
    pub fn clear_faults(&self) {
        let mut i = self.lock();
        i.knob("clear faults".into());
        i.drop_next = false;
        i.stale_left = 0;
        i.fail_next_sweep = false;
        i.error_next = None;
        i.reorder = Reorder::Off;
        i.state = SmState::Master;
        if i.frozen {
            i.frozen = false;
            i.resume_at = i.now;
            i.sync();
        }
    }

    // ---- ground truth, for tests (no fault applies) ----

    /// What the SM has programmed now, per present port.
    #[must_use]
    pub fn programmed(&self) -> BTreeMap<Guid, BTreeSet<PKey>> {
        let mut i = self.lock();
        i.sync();
        i.current
            .programmed
            .iter()
            .map(|(g, (_, k))| (*g, k.clone()))
            .collect()
    }

    /// The generation of the last completed sweep, now.
    #[must_use]
    pub fn generation(&self) -> Generation {
        let mut i = self.lock();
        i.sync();
        i.current.status.generation
    }

    /// The SM's configuration now (what the next sweep will program).
    #[must_use]
    pub fn configured(&self) -> MembershipMap {
        let mut i = self.lock();
        i.sync();
        i.configured.clone()
    }

    /// True while a sweep is requested or running.
    #[must_use]
    pub fn sweep_pending(&self) -> bool {
        let mut i = self.lock();
        i.sync();
        i.requested.is_some() || i.running.is_some()
    }

    /// Everything that happened, in order.
    #[must_use]
    pub fn history(&self) -> Vec<HistoryEntry> {
        let mut i = self.lock();
        i.sync();
        i.history.clone()
    }

    /// What the sweep that completed as `generation` programmed, and how it ended.
    #[must_use]
    pub fn programmed_at(
        &self,
        generation: Generation,
    ) -> Option<(SweepOutcome, BTreeMap<Guid, BTreeSet<PKey>>)> {
        let i = self.lock();
        i.history.iter().find_map(|h| match &h.event {
            SimEvent::SweepCompleted {
                generation: g,
                outcome,
                programmed,
            } if *g == generation => Some((outcome.clone(), programmed.clone())),
            _ => None,
        })
    }
}

impl SubnetManager for SimSm {
    fn configured_members(&self) -> Result<Option<Vec<crate::posture::Configured>>, FabricError> {
        Ok(Some(configured_entries(&self.configured(), "sim")))
    }

    fn backend(&self) -> &str {
        "sim"
    }

    fn stage(&self, change: Change) -> Result<(), FabricError> {
        let mut i = self.lock();
        i.sync();
        i.injected("stage")?;
        change.validate()?;
        i.log(SimEvent::Staged(change.clone()));
        i.staged.push(change);
        Ok(())
    }

    fn discard_staged(&self) -> usize {
        let mut i = self.lock();
        let n = i.staged.len();
        i.staged.clear();
        n
    }

    fn apply(&self) -> Result<Ticket, FabricError> {
        let mut i = self.lock();
        i.sync();
        i.injected("apply")?;
        let changes = std::mem::take(&mut i.staged);
        let change = ChangeId(i.next_change);
        i.next_change += 1;
        let fate = if std::mem::take(&mut i.drop_next) {
            ApplyFate::Dropped
        } else {
            match std::mem::replace(&mut i.reorder, Reorder::Off) {
                Reorder::Armed => {
                    i.reorder = Reorder::Holding(change, changes.clone());
                    ApplyFate::HeldBack
                }
                Reorder::Holding(held, held_changes) => {
                    i.configure(&changes);
                    i.configure(&held_changes);
                    ApplyFate::ConfiguredThenHeld { held }
                }
                Reorder::Off => {
                    i.configure(&changes);
                    ApplyFate::Configured
                }
            }
        };
        // A running sweep snapshotted the configuration before this change: the
        // change is in the sweep after it.
        let ahead = if i.running.is_some() { 2 } else { 1 };
        let ticket = Ticket {
            change,
            generation: Generation(i.current.status.generation.0 + ahead),
        };
        i.request_sweep();
        i.log(SimEvent::Applied {
            ticket,
            changes,
            fate,
        });
        Ok(ticket)
    }

    fn observe(&self, guids: &[Guid]) -> Result<Observation, FabricError> {
        let mut i = self.lock();
        i.sync();
        i.injected("observe")?;
        let stale = i.stale_left > 0;
        let (status, snap, configured) = if stale {
            i.stale_left -= 1;
            let s = i.previous.clone();
            (s.status.clone(), s.clone(), s.configured.clone())
        } else {
            let s = i.current.clone();
            let status = SmStatus {
                state: i.state,
                ..s.status.clone()
            };
            (status, s, i.configured.clone())
        };
        let report = i.cfg.report_configured;
        let ports = guids
            .iter()
            .map(|g| {
                let programmed = match snap.programmed.get(g) {
                    Some((lid, pkeys)) => Programmed::Present {
                        lid: Some(*lid),
                        pkeys: pkeys.clone(),
                    },
                    None => Programmed::Absent,
                };
                let view = PortView {
                    guid: *g,
                    programmed,
                    configured: report.then(|| configured.pkeys_of(*g)),
                };
                (*g, view)
            })
            .collect();
        i.log(SimEvent::Observed {
            generation: status.generation,
            stale,
        });
        Ok(Observation { status, ports })
    }

    fn health(&self) -> Result<Health, FabricError> {
        let mut i = self.lock();
        i.sync();
        i.injected("health")?;
        let mut notes = Vec::new();
        if i.frozen {
            notes.push("frozen: no sweeps until thawed".to_string());
        }
        if i.running.is_some() {
            notes.push("a sweep is running".to_string());
        } else if i.requested.is_some() {
            notes.push("a sweep is requested".to_string());
        }
        notes.push(format!("lag {:?}", i.cfg.lag));
        Ok(Health {
            backend: "sim".into(),
            version: Some(concat!("devfence-simsm ", env!("CARGO_PKG_VERSION")).into()),
            status: SmStatus {
                state: i.state,
                ..i.current.status.clone()
            },
            notes,
        })
    }
}

#[cfg(test)]
mod tests;

/// A membership map as configured entries (for posture checks).
pub(crate) fn configured_entries(
    map: &MembershipMap,
    source: &str,
) -> Vec<crate::posture::Configured> {
    map.iter()
        .map(|(g, k, m)| crate::posture::Configured {
            pkey: k.pkey(m),
            member: crate::posture::Member::Guid(g),
            source: source.to_owned(),
        })
        .collect()
}
