//! `POST /v1/recover`: what `devfence recover` does, through the agent —
//! every operation a dead process left unfinished driven to a verified clean
//! state or left quarantined, saying why.
//!
//! Recovery takes every open operation of the ledger for a dead process's,
//! so it must not run beside an operation or hook call of the agent itself:
//! [`Gate`] makes the two exclusive (409 `busy` for whichever comes second).

use std::sync::{Arc, Mutex};

use devfence_engine::engine::{EngineConfig, Progress};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use serde_json::Value;

use crate::api::{ApiError, State, app, blocking, open_env, to_json};
use crate::events::Event;
use crate::ops::lock;

/// `POST /v1/recover`: what recovery finished or quarantined.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct RecoverAnswer {
    /// The ledger recovered.
    pub ledger: String,
    /// Whether it exists (none: nothing to recover).
    pub ledger_present: bool,
    /// Each unfinished operation and what recovery left its device as.
    pub recovered: Vec<devfence_engine::engine::Recovered>,
    /// Recovery's progress events.
    pub events: Vec<Progress>,
    /// What opening the environment noticed.
    pub notices: Vec<String>,
}

/// Makes recovery exclusive of the agent's own operations and hook calls.
#[derive(Default)]
pub struct Gate {
    inner: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    recovering: bool,
    hooks: usize,
}

fn busy(msg: &str) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "busy", msg)
}

impl Gate {
    /// Runs `start` (an operation's registration) unless recovery runs.
    ///
    /// # Errors
    /// 409 `busy` while recovery runs.
    pub fn start<T>(&self, start: impl FnOnce() -> T) -> Result<T, ApiError> {
        let g = lock(&self.inner);
        if g.recovering {
            return Err(busy(
                "The agent is recovering unfinished operations. Hint: retry when POST /v1/recover has answered",
            ));
        }
        Ok(start())
    }

    /// A hook call in flight, until the guard drops.
    ///
    /// # Errors
    /// 409 `busy` while recovery runs.
    pub fn hook(self: &Arc<Self>) -> Result<HookGuard, ApiError> {
        let mut g = lock(&self.inner);
        if g.recovering {
            return Err(busy(
                "The agent is recovering unfinished operations. Hint: retry when POST /v1/recover has answered",
            ));
        }
        g.hooks += 1;
        Ok(HookGuard(Arc::clone(self)))
    }

    /// Recovery, until the guard drops, if nothing else of the agent's runs.
    ///
    /// # Errors
    /// 409 `busy` while an operation, a hook call or another recovery runs.
    pub fn recover(self: &Arc<Self>, running_ops: usize) -> Result<RecoverGuard, ApiError> {
        let mut g = lock(&self.inner);
        if g.recovering || g.hooks > 0 || running_ops > 0 {
            return Err(busy(
                "The agent has operations in flight; recovery would take them for a dead process's. Hint: retry when GET /v1/status shows agent.operations_running 0",
            ));
        }
        g.recovering = true;
        Ok(RecoverGuard(Arc::clone(self)))
    }
}

/// A hook call in flight.
pub struct HookGuard(Arc<Gate>);

impl Drop for HookGuard {
    fn drop(&mut self) {
        let mut g = lock(&self.0.inner);
        g.hooks = g.hooks.saturating_sub(1);
    }
}

/// Recovery running.
pub struct RecoverGuard(Arc<Gate>);

impl Drop for RecoverGuard {
    fn drop(&mut self) {
        lock(&self.0.inner).recovering = false;
    }
}

/// The body of `POST /v1/recover`: empty or an empty JSON object.
///
/// # Errors
/// 400 naming what is wrong.
pub fn parse_body(body: &[u8]) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) if m.is_empty() => Ok(()),
        Ok(Value::Object(m)) => Err(ApiError::bad_input(format!(
            "Unknown field {:?}. Hint: POST /v1/recover takes no fields; send {{}} or nothing",
            m.keys().next().map_or("", String::as_str)
        ))),
        Ok(_) => Err(ApiError::bad_input(
            "The body must be an empty JSON object. Hint: send {} or nothing",
        )),
        Err(e) => Err(ApiError::bad_input(format!(
            "The body is not valid JSON: {e}. Hint: send {{}} or nothing"
        ))),
    }
}

/// `POST /v1/recover`.
pub(crate) async fn route<B>(
    st: &Arc<State>,
    actor: devfence_app::Actor,
    req: Request<B>,
) -> Result<Value, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let body = crate::hook::read_body(st.limits().max_body, req).await?;
    parse_body(&body)?;
    let guard = st.recovery.recover(st.ops.running())?;
    let st = Arc::clone(st);
    blocking(move || {
        let _guard = guard;
        let path = app(devfence_app::env::ledger_path(
            &st.opts.root,
            st.opts.ledger.as_deref(),
        ))?;
        if !devfence_app::env::ledger_present(&path) {
            return to_json(&RecoverAnswer {
                ledger: path.display().to_string(),
                ledger_present: false,
                recovered: Vec::new(),
                events: Vec::new(),
                notices: Vec::new(),
            });
        }
        let mut env = open_env(&st)?;
        let notices = std::mem::take(&mut env.notices);
        env.act_as(&actor);
        let mut events: Vec<Progress> = Vec::new();
        let rec = {
            let mut e = env
                .engine(EngineConfig::default())
                .with_progress(|p: &Progress| {
                    st.events.progress(None, p);
                    if !matches!(p, Progress::Waiting { .. })
                        && events.len() < crate::ops::MAX_EVENTS
                    {
                        events.push(p.clone());
                    }
                });
            app(devfence_app::lifecycle::recover(&mut e))?
        };
        for r in &rec {
            st.events.publish(Event::OperationFinished {
                operation: None,
                outcome: if r.problem.is_none() {
                    "recovered".into()
                } else {
                    "quarantined".into()
                },
                error: None,
            });
            st.events.publish(Event::DeviceState {
                device: r.device.to_string(),
                state: r.state.name().to_owned(),
            });
        }
        to_json(&RecoverAnswer {
            ledger: path.display().to_string(),
            ledger_present: true,
            recovered: rec,
            events,
            notices,
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn recovery_and_the_agents_own_work_exclude_each_other() {
        let g = Arc::new(Gate::default());
        let h = g.hook().expect("a hook call");
        assert_eq!(g.recover(0).err().map(|e| e.code), Some("busy"));
        drop(h);
        assert_eq!(g.recover(1).err().map(|e| e.code), Some("busy"));
        let r = g.recover(0).expect("recovery");
        assert_eq!(g.start(|| ()).err().map(|e| e.code), Some("busy"));
        assert!(g.hook().is_err());
        drop(r);
        assert!(g.start(|| ()).is_ok());
    }

    proptest! {
        /// Any body: accepted only when empty or `{}`, else a 400 with a hint.
        #[test]
        fn any_recover_body_is_empty_or_a_400(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            match parse_body(&b) {
                Ok(()) => {
                    let t = String::from_utf8_lossy(&b);
                    let t = t.trim();
                    prop_assert!(t.is_empty() || t.starts_with('{'), "{t:?}");
                }
                Err(e) => {
                    prop_assert_eq!(e.status, 400);
                    prop_assert!(e.hint.is_some());
                }
            }
        }

        #[test]
        fn json_objects_with_fields_are_refused(k in "[a-z]{1,8}") {
            let body = format!("{{\"{k}\": 1}}");
            prop_assert!(parse_body(body.as_bytes()).is_err());
        }
    }
}
