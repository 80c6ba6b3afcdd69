//! Batching on one host (issue 12 item 5): assign, handover and release
//! requests for IB VFs that arrive within `[agent] batch_window` of the first
//! one waiting are run as one batch — one apply and one sweep at the SM for
//! all of them ([`devfence_engine::engine::Engine::run_batch`]) — while each
//! stays its own operation: its own resource (`GET /v1/operations/{id}` shows
//! its own steps and gates, and the batch's id and size), its own journal in
//! the ledger, its own gates (nothing is taken from the batch).
//!
//! One batch runs at a time: requests that arrive while one runs wait for the
//! next, so a busy SM gets fewer, larger applies. Other operations (not an IB
//! VF) run as before, each on its own thread, without waiting.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devfence_app::Actor;
use devfence_app::lifecycle::Request;
use devfence_engine::engine::{ItemResult, Progress};
use devfence_host::HostRoot;
use hyper::StatusCode;

use crate::api::{ApiError, State, app, complete, engine_config, open_env};
use crate::ops::{self, BatchInfo, OpView};

/// Collects IB VF operations into batches.
pub struct Batcher {
    window: Duration,
    q: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Job>,
    /// A thread is running batches (and will take what is pending).
    worker: bool,
}

/// One operation waiting for its batch.
struct Job {
    view: Arc<Mutex<OpView>>,
    actor: Actor,
    req: Request,
    kind: String,
    arrived: Instant,
}

impl Batcher {
    /// Batches collected within `window` of their first request (zero: off).
    #[must_use]
    pub fn new(window: Duration) -> Self {
        Batcher {
            window,
            q: Mutex::new(Queue::default()),
        }
    }

    /// The window.
    #[must_use]
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether `req` goes into a batch: batching is on and it is about an IB
    /// VF (a hint read from the host; the engine classifies every member again).
    #[must_use]
    pub fn collects(&self, root: &HostRoot, req: &Request) -> bool {
        !self.window.is_zero() && devfence_app::lifecycle::may_share_an_apply(root, req)
    }
}

/// Queues an operation for the next batch. Called on a blocking thread: if no
/// thread runs batches, this one does, until nothing is pending.
pub(crate) fn submit(
    st: &Arc<State>,
    view: Arc<Mutex<OpView>>,
    actor: Actor,
    req: Request,
    kind: String,
) {
    let work = {
        let mut q = ops::lock(&st.batch.q);
        q.pending.push(Job {
            view,
            actor,
            req,
            kind,
            arrived: Instant::now(),
        });
        !std::mem::replace(&mut q.worker, true)
    };
    if work {
        run_batches(st);
    }
}

/// Runs batches while operations are pending.
fn run_batches(st: &State) {
    let window = st.batch.window;
    loop {
        let first = {
            let mut q = ops::lock(&st.batch.q);
            match q.pending.first() {
                Some(j) => j.arrived,
                None => {
                    q.worker = false;
                    return;
                }
            }
        };
        // The window: what arrives meanwhile joins this batch. A pause that
        // collects, never one any result depends on.
        let until = first + window;
        let now = Instant::now();
        if until > now {
            std::thread::sleep(until - now);
        }
        let jobs = std::mem::take(&mut ops::lock(&st.batch.q).pending);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_one(st, &jobs)));
        if r.is_err() {
            // Whatever the batch did not finish is answered; the ledger's
            // journal has every step it took.
            for j in &jobs {
                if ops::lock(&j.view).state == ops::OpState::Running {
                    complete(
                        st,
                        &j.view,
                        &j.kind,
                        Err(ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal",
                            "The batch's thread panicked. Hint: this is a bug in devfence; run `devfence recover` to finish what it journalled",
                        )),
                    );
                }
            }
        }
    }
}

/// Runs one batch and answers each of its operations.
fn run_one(st: &State, jobs: &[Job]) {
    let mut env = match open_env(st) {
        Ok(e) => e,
        Err(e) => {
            for j in jobs {
                complete(st, &j.view, &j.kind, Err(e.clone()));
            }
            return;
        }
    };
    let notices = std::mem::take(&mut env.notices);
    for j in jobs {
        ops::lock(&j.view).notices.clone_from(&notices);
    }
    let reqs: Vec<(Request, Option<Actor>)> = jobs
        .iter()
        .map(|j| (j.req.clone(), Some(j.actor.clone())))
        .collect();
    let metrics = &st.metrics;
    let mut last_ms = vec![0u64; jobs.len()];
    let mut e = env
        .engine(engine_config(st))
        .with_batch_progress(|slot, p: &Progress| {
            let (Some(j), Some(last)) = (jobs.get(slot), last_ms.get_mut(slot)) else {
                return;
            };
            match p {
                Progress::Gate {
                    name, elapsed_ms, ..
                } => {
                    let secs = elapsed_ms.saturating_sub(*last) as f64 / 1000.0;
                    metrics
                        .gate_seconds
                        .get_or_create(&crate::metrics::GateLabel { gate: name.clone() })
                        .observe(secs);
                    *last = *elapsed_ms;
                }
                Progress::Step { elapsed_ms, .. } => *last = *elapsed_ms,
                _ => {}
            }
            ops::lock(&j.view).push(p);
        });
    // Each operation is answered as soon as its own gates passed or failed.
    let collected = jobs.len();
    let summary =
        devfence_app::lifecycle::run_batch_with(&mut e, &reqs, &mut |r: ItemResult<'_>| {
            let Some(j) = jobs.get(r.slot) else { return };
            ops::lock(&j.view).batch = Some(BatchInfo {
                id: r.id.to_owned(),
                size: r.size,
                collected,
                shared: r.shared,
            });
            complete(st, &j.view, &j.kind, app(r.result));
        });
    metrics.sm_sweeps_requested.inc_by(e.sm_applies());
    drop(e);
    if summary.size > 0 {
        #[allow(clippy::cast_precision_loss)]
        metrics.batch_size.observe(summary.size as f64);
    }
}
