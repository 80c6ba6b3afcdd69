//! Long operations as resources: `POST /v1/operations` starts one on a
//! blocking thread and answers 202 with its id at once; `GET
//! /v1/operations/{id}` shows its steps and gates as they happen, then its
//! result or typed error. The operation belongs to the agent, not to the
//! connection: a client that goes away cancels nothing (the engine journals
//! every step; it runs to its end).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use devfence_engine::engine::Progress;
use serde::Serialize;

use crate::api::ApiError;

/// Where an operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OpState {
    /// Running.
    Running,
    /// Done: the device is in the state its result says.
    Succeeded,
    /// Refused or failed: the error says why (a failed device is quarantined).
    Failed,
}

/// The most progress events kept per operation (a gate's waiting reads are
/// kept as the last one only).
pub const MAX_EVENTS: usize = 1024;

/// One operation as `GET /v1/operations/{id}` shows it.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct OpView {
    /// The agent's id for it (`op-N`).
    pub id: String,
    /// assign, handover or release.
    pub kind: String,
    /// The device asked for.
    pub device: String,
    /// The tenant (assign, handover).
    pub tenant: Option<String>,
    /// The VM (assign, handover).
    pub vm: Option<String>,
    /// Who asked (uid, gid, pid).
    pub actor: devfence_app::Actor,
    /// Where it is.
    pub state: OpState,
    /// When it was accepted (ms since the epoch).
    pub started_at_ms: u64,
    /// When it ended.
    pub finished_at_ms: Option<u64>,
    /// The engine's progress events in order: began, steps, gates, finished.
    pub events: Vec<Progress>,
    /// The last read of a gate still waiting, while it waits.
    pub waiting: Option<Progress>,
    /// The engine's result, when it succeeded.
    pub result: Option<devfence_engine::engine::Done>,
    /// The typed error, when it failed.
    pub error: Option<ApiError>,
    /// What opening the environment noticed.
    pub notices: Vec<String>,
    /// The batch it ran in (IB VF operations collected within `[agent]
    /// batch_window`), once it ran; `None` for an operation run alone.
    pub batch: Option<BatchInfo>,
}

/// An operation's batch (issue 12 item 5).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct BatchInfo {
    /// The batch's id (every member's journal names it).
    pub id: String,
    /// Operations of the batch that went to the SM in its one apply.
    pub size: usize,
    /// Operations collected into the batch.
    pub collected: usize,
    /// Whether this one's SM change was in that apply (an operation that
    /// cannot share it — refused, failed before it, not an IB VF — ran alone).
    pub shared: bool,
}

impl OpView {
    /// Adds one progress event.
    pub fn push(&mut self, p: &Progress) {
        if matches!(p, Progress::Waiting { .. }) {
            self.waiting = Some(p.clone());
            return;
        }
        self.waiting = None;
        if self.events.len() < MAX_EVENTS {
            self.events.push(p.clone());
        }
    }
}

/// Every operation the agent runs or ran (the newest `kept` finished ones).
pub struct Ops {
    inner: Mutex<Inner>,
    idle: tokio::sync::Notify,
    kept: usize,
}

struct Inner {
    next: u64,
    map: BTreeMap<u64, Arc<Mutex<OpView>>>,
    running: usize,
}

/// Locks, whatever a panicking holder left (views are plain data).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Ops {
    /// No operations; keeps `kept` finished ones.
    #[must_use]
    pub fn new(kept: usize) -> Self {
        Ops {
            inner: Mutex::new(Inner {
                next: 1,
                map: BTreeMap::new(),
                running: 0,
            }),
            idle: tokio::sync::Notify::new(),
            kept: kept.max(1),
        }
    }

    /// Registers a new running operation built by `view` from its id.
    pub fn start(&self, view: impl FnOnce(String) -> OpView) -> Arc<Mutex<OpView>> {
        let mut g = lock(&self.inner);
        let n = g.next;
        g.next += 1;
        let v = Arc::new(Mutex::new(view(format!("op-{n}"))));
        g.map.insert(n, Arc::clone(&v));
        g.running += 1;
        // Forget the oldest finished operations beyond the cap.
        let finished: Vec<u64> = g
            .map
            .iter()
            .filter(|(_, v)| lock(v).state != OpState::Running)
            .map(|(k, _)| *k)
            .collect();
        if finished.len() > self.kept {
            for k in &finished[..finished.len() - self.kept] {
                g.map.remove(k);
            }
        }
        v
    }

    /// Marks one operation ended (its view already says how).
    pub fn finished(&self) {
        let mut g = lock(&self.inner);
        g.running = g.running.saturating_sub(1);
        if g.running == 0 {
            self.idle.notify_waiters();
        }
    }

    /// The operation `id` (`op-N`).
    #[must_use]
    pub fn get(&self, id: &str) -> Option<OpView> {
        let n: u64 = id.strip_prefix("op-")?.parse().ok()?;
        let g = lock(&self.inner);
        g.map.get(&n).map(|v| lock(v).clone())
    }

    /// Operations running now.
    #[must_use]
    pub fn running(&self) -> usize {
        lock(&self.inner).running
    }

    /// Waits until no operation runs.
    pub async fn wait_idle(&self) {
        loop {
            let n = self.idle.notified();
            if self.running() == 0 {
                return;
            }
            n.await;
        }
    }
}
