//! The event stream (`GET /v1/events`): lifecycle changes as JSON lines, for
//! orchestrators that would rather be told than poll.
//!
//! Anything in the agent that changes or learns something calls
//! [`Events::publish`] with an [`Event`]; the publisher stamps it with the
//! next id and the time, keeps the newest [`BACKLOG`] in memory (a client
//! that reconnects resumes after the last id it saw with `?since=ID`) and
//! hands it to every subscriber through a `tokio::sync::broadcast` channel.
//! Publishing never waits for a subscriber: a consumer that falls more than
//! [`CHANNEL`] events behind is dropped with a final `lagged` event (it
//! reconnects with `since` and is replayed what the backlog still holds).
//!
//! The stream's format: one JSON object per line (`application/x-ndjson`),
//! each with `id`, `at_ms` and `type`; see docs/agent.md.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use devfence_engine::engine::Progress;
use hyper::body::{Bytes, Frame};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::ops::lock;

/// Events kept in memory for `?since=` (the oldest go first).
pub const BACKLOG: usize = 1024;
/// Events a subscriber may fall behind before it is dropped.
pub const CHANNEL: usize = 256;

/// One lifecycle change.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// An operation was accepted (`POST /v1/operations`).
    OperationStarted {
        /// The agent's id (`op-N`).
        operation: String,
        /// assign, handover or release.
        kind: String,
        /// The device.
        device: String,
        /// The tenant (assign, handover).
        tenant: Option<String>,
    },
    /// A step of an operation was journalled (also the engine's `began`).
    OperationStep {
        /// The agent's id, if the agent started it (`null` for recovery).
        operation: Option<String>,
        /// The engine's progress event as is.
        progress: Progress,
    },
    /// A gate passed or failed.
    OperationGate {
        /// The agent's id, if the agent started it.
        operation: Option<String>,
        /// The engine's progress event as is.
        progress: Progress,
    },
    /// An operation ended.
    OperationFinished {
        /// The agent's id, if the agent started it.
        operation: Option<String>,
        /// succeeded, refused or failed.
        outcome: String,
        /// The typed error's code when it did not succeed.
        error: Option<String>,
    },
    /// A device's lifecycle state changed (as the engine or recovery left it).
    DeviceState {
        /// The device.
        device: String,
        /// Its state name (free, assigned, ready, active, quarantined, …).
        state: String,
    },
    /// The libvirt hook decided (`POST /v1/hook/qemu`).
    HookDecision {
        /// The domain.
        domain: String,
        /// `prepare begin`, `started begin` or `release end`.
        call: String,
        /// allowed, refused or teardown_failed.
        decision: String,
    },
    /// Continuous verification found a device changed since its gates
    /// passed (`GET /v1/findings` has the finding).
    Drift {
        /// The device.
        device: String,
        /// The tenant that holds it.
        tenant: String,
        /// `quarantined` (it was Ready) or `reported` (it is Active).
        action: String,
        /// What differed.
        what: String,
    },
    /// The last event of a stream whose consumer fell behind: it missed
    /// `missed` events; reconnect with `since` = the last id seen.
    Lagged {
        /// Events it missed.
        missed: u64,
    },
}

/// An event as sent: its id (increasing from 1, per agent run) and time.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct Stamped {
    /// Its id.
    pub id: u64,
    /// When it was published (ms since the epoch).
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

impl Stamped {
    /// The event as one line of the stream.
    #[must_use]
    pub fn line(&self) -> Bytes {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| {
            format!(r#"{{"id":{},"type":"unrenderable"}}"#, self.id).into_bytes()
        });
        v.push(b'\n');
        Bytes::from(v)
    }
}

/// The publisher: a bounded backlog and a broadcast channel.
pub struct Events {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Stamped>>,
    backlog: usize,
}

struct Inner {
    next: u64,
    kept: VecDeque<Arc<Stamped>>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new(BACKLOG, CHANNEL)
    }
}

/// What a subscriber starts with: the backlog after `since`, then the live
/// channel (no event lost or repeated between the two).
pub struct Subscription {
    /// Events from the backlog, in order; a `lagged` first when `since` is
    /// older than the backlog reaches.
    pub replay: Vec<Arc<Stamped>>,
    /// Live events after the replay.
    pub live: broadcast::Receiver<Arc<Stamped>>,
}

impl Events {
    /// A publisher keeping `backlog` events, letting a subscriber fall
    /// `channel` behind.
    #[must_use]
    pub fn new(backlog: usize, channel: usize) -> Self {
        let (tx, _) = broadcast::channel(channel.max(1));
        Events {
            inner: Mutex::new(Inner {
                next: 1,
                kept: VecDeque::new(),
            }),
            tx,
            backlog: backlog.max(1),
        }
    }

    /// Publishes `event` to every subscriber; never waits. Returns its id.
    pub fn publish(&self, event: Event) -> u64 {
        let mut g = lock(&self.inner);
        let id = g.next;
        g.next += 1;
        let s = Arc::new(Stamped {
            id,
            at_ms: crate::api::now_ms(),
            event,
        });
        g.kept.push_back(Arc::clone(&s));
        while g.kept.len() > self.backlog {
            g.kept.pop_front();
        }
        // Sent under the lock: a subscriber taking the backlog sees each
        // event either there or on the channel, once.
        let _ = self.tx.send(s);
        id
    }

    /// The id of the newest event (0 before any).
    #[must_use]
    pub fn last_id(&self) -> u64 {
        lock(&self.inner).next - 1
    }

    /// Subscribes: the events after `since` the backlog holds (all of it
    /// when `since` is `None`: none), then live ones.
    #[must_use]
    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        let g = lock(&self.inner);
        let live = self.tx.subscribe();
        let mut replay = Vec::new();
        if let Some(since) = since {
            let oldest = g.kept.front().map_or(g.next, |s| s.id);
            if since.saturating_add(1) < oldest {
                replay.push(Arc::new(Stamped {
                    id: since,
                    at_ms: crate::api::now_ms(),
                    event: Event::Lagged {
                        missed: oldest - since - 1,
                    },
                }));
            }
            replay.extend(g.kept.iter().filter(|s| s.id > since).cloned());
        }
        Subscription { replay, live }
    }

    /// Publishes what a progress event of an operation says.
    pub fn progress(&self, operation: Option<&str>, p: &Progress) {
        let operation = operation.map(str::to_owned);
        match p {
            // A gate's waiting reads are too many to stream (the
            // operation's resource shows the last one).
            Progress::Waiting { .. } => {}
            Progress::Gate { .. } => {
                self.publish(Event::OperationGate {
                    operation,
                    progress: p.clone(),
                });
            }
            // Began, Step and the engine's Finished (the caller publishes
            // OperationFinished and DeviceState when it has the result).
            _ => {
                self.publish(Event::OperationStep {
                    operation,
                    progress: p.clone(),
                });
            }
        }
    }
}

/// Publishes an agent operation's end: `operation_finished`, then the
/// device's state as the engine left it (its `finished` event's, or the
/// result's).
pub fn operation_finished(events: &Events, view: &Mutex<crate::ops::OpView>, outcome: &str) {
    let (id, device, error, state) = {
        let v = lock(view);
        let state = v
            .result
            .as_ref()
            .map(|d| d.state.name().to_owned())
            .or_else(|| {
                v.events.iter().rev().find_map(|p| match p {
                    Progress::Finished { state, .. } => Some(state.clone()),
                    _ => None,
                })
            });
        let device = v
            .result
            .as_ref()
            .map_or_else(|| v.device.clone(), |d| d.device.to_string());
        (
            v.id.clone(),
            device,
            v.error.as_ref().map(|e| e.code.to_owned()),
            state,
        )
    };
    events.publish(Event::OperationFinished {
        operation: Some(id),
        outcome: outcome.to_owned(),
        error,
    });
    if let Some(state) = state {
        events.publish(Event::DeviceState { device, state });
    }
}

/// `GET /v1/events`: the stream, or 400 for a bad query.
pub(crate) fn route(st: &Arc<crate::api::State>, query: &str) -> crate::api::Resp {
    let since = match parse_query(query) {
        Ok(s) => s,
        Err(e) => return crate::api::error_response(&e),
    };
    let body = stream(st.events.subscribe(since), Arc::clone(&st.stop));
    let mut r = hyper::Response::new(http_body_util::BodyExt::boxed(body));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

/// The `since` of `GET /v1/events`'s query.
///
/// # Errors
/// 400 naming the parameter.
pub fn parse_query(query: &str) -> Result<Option<u64>, crate::api::ApiError> {
    let mut since = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "since" => {
                since = Some(v.parse::<u64>().map_err(|_| {
                    crate::api::ApiError::bad_input(format!(
                        "Query parameter \"since\" is {v:?}, not an event id. Hint: give the id of the last event received (a number), or leave it out for new events only"
                    ))
                })?);
            }
            other => {
                return Err(crate::api::ApiError::bad_input(format!(
                    "Unknown query parameter {other:?}. Hint: the only parameter is since"
                )));
            }
        }
    }
    Ok(since)
}

/// A response body fed by a channel, one frame per event line.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// The body of one subscriber's stream: the replay, then live events until
/// the client goes away or falls behind (then a `lagged` line ends it), or
/// `stop` fires (the agent stops).
#[must_use]
pub fn stream(sub: Subscription, stop: Arc<tokio::sync::Notify>) -> ChannelBody {
    // A few lines of slack between the forwarder and the connection; a
    // consumer slower than that makes the forwarder wait, and the broadcast
    // channel (never the publisher) absorbs the difference until it lags.
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let Subscription { replay, mut live } = sub;
    tokio::spawn(async move {
        let mut last = 0u64;
        // A gap before the backlog is said once (a `lagged` line first);
        // the stream goes on with what the backlog holds.
        for s in replay {
            last = s.id;
            if tx.send(s.line()).await.is_err() {
                return;
            }
        }
        loop {
            let next = tokio::select! {
                r = live.recv() => r,
                () = stop.notified() => return,
                () = tx.closed() => return,
            };
            match next {
                Ok(s) => {
                    if s.id <= last {
                        continue;
                    }
                    last = s.id;
                    if tx.send(s.line()).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let end = Stamped {
                        id: last,
                        at_ms: crate::api::now_ms(),
                        event: Event::Lagged { missed: n },
                    };
                    let _ = tx.send(end.line()).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    ChannelBody(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use proptest::prelude::*;

    fn ev(n: u64) -> Event {
        Event::DeviceState {
            device: format!("dev{n}"),
            state: "free".into(),
        }
    }

    #[test]
    fn the_backlog_replays_after_since_and_says_what_it_no_longer_holds() {
        let e = Events::new(4, 8);
        for n in 0..10 {
            e.publish(ev(n));
        }
        assert_eq!(e.last_id(), 10);
        let ids = |s: &Subscription| s.replay.iter().map(|x| x.id).collect::<Vec<_>>();
        assert_eq!(ids(&e.subscribe(Some(8))), vec![9, 10]);
        assert_eq!(ids(&e.subscribe(None)), Vec::<u64>::new());
        let s = e.subscribe(Some(2));
        assert_eq!(ids(&s), vec![2, 7, 8, 9, 10]);
        assert_eq!(s.replay[0].event, Event::Lagged { missed: 4 });
        assert_eq!(ids(&e.subscribe(Some(6))), vec![7, 8, 9, 10]);
    }

    /// A subscriber that reads nothing while the agent publishes more than
    /// the channel holds gets what fit, then a final `lagged` line; the
    /// publisher never waited.
    #[tokio::test]
    async fn a_slow_consumer_is_dropped_with_a_lagged_event() {
        let e = Events::new(16, 4);
        let body = stream(e.subscribe(None), Arc::new(tokio::sync::Notify::new()));
        for n in 0..100 {
            e.publish(ev(n));
        }
        let bytes = tokio::time::timeout(std::time::Duration::from_secs(30), body.collect())
            .await
            .expect("the stream ends")
            .expect("body")
            .to_bytes();
        let lines: Vec<serde_json::Value> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("json line"))
            .collect();
        let last = lines.last().expect("a line");
        assert_eq!(last["type"], "lagged", "{lines:?}");
        assert!(lines.len() < 100, "{}", lines.len());
    }

    proptest! {
        /// Any query: a since, or a 400 with a hint; never a panic.
        #[test]
        fn any_events_query_is_a_since_or_a_400(q in "[a-z=&%0-9]{0,30}") {
            match parse_query(&q) {
                Ok(Some(_)) => prop_assert!(q.contains("since=")),
                Ok(None) => prop_assert!(!q.contains("since")),
                Err(e) => {
                    prop_assert_eq!(e.status, 400);
                    prop_assert!(e.hint.is_some());
                }
            }
        }
    }
}
