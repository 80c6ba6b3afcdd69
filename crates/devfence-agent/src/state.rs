//! `POST /v1/state/admit` and `POST /v1/state/inspect`: device-state
//! envelopes (docs/state-envelopes.md) through the agent.
//!
//! The envelope is the request body (`application/octet-stream`), the
//! destination in the query (`?device=…&vm=…`). An envelope is untrusted and
//! may be large (a device's saved state), so these routes have their own cap,
//! [`MAX_ENVELOPE_BODY`] (64 MiB; 413 beyond, with a hint to admit a larger
//! one with the CLI from its file), not the 64 KiB of the JSON routes; the
//! seal crate's own checks (frame, size, signature, …) run on it in their
//! fixed order exactly as for a file. The answer is the JSON `devfence state
//! admit --json` / `state inspect --json` prints (one rendering, in the app).
//! A refusal by a check is a 200 with `admitted: false` / `refusal`: the
//! envelope's answer, not an error of the request.
//!
//! Inspect reads only: the reader role may call it though it is a POST.

use std::path::PathBuf;
use std::sync::Arc;

use devfence_model::DeviceId;
use devfence_seal::VmUuid;
use hyper::Request;
use hyper::body::Bytes;
use serde_json::Value;

use crate::api::{ApiError, State, app, blocking, percent_decode};

/// The largest envelope these routes take in a body.
pub const MAX_ENVELOPE_BODY: usize = 64 << 20;

/// What an envelope route's query names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The destination device and the VM, when given (required to admit).
    pub dest: Option<(DeviceId, VmUuid)>,
}

/// Parses `device=` and `vm=` (both or neither).
///
/// # Errors
/// 400 naming the parameter.
pub fn parse_query(query: &str) -> Result<Target, ApiError> {
    let (mut device, mut vm) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "device" => {
                device = Some(v.parse::<DeviceId>().map_err(|e| {
                    ApiError::bad_input(format!(
                        "Query parameter \"device\": {e}. Hint: give the destination device as GET /v1/status lists it"
                    ))
                })?);
            }
            "vm" => {
                vm = Some(v.parse::<VmUuid>().map_err(|e| {
                    ApiError::bad_input(format!(
                        "Query parameter \"vm\": {e}. Hint: give the destination VM's UUID"
                    ))
                })?);
            }
            other => {
                return Err(ApiError::bad_input(format!(
                    "Unknown query parameter {other:?}. Hint: the parameters are device and vm"
                )));
            }
        }
    }
    match (device, vm) {
        (Some(d), Some(v)) => Ok(Target { dest: Some((d, v)) }),
        (None, None) => Ok(Target { dest: None }),
        _ => Err(ApiError::bad_input(
            "Give both device and vm, or neither. Hint: the destination is a device and the VM it is for",
        )),
    }
}

fn label() -> PathBuf {
    PathBuf::from("(request body)")
}

/// `POST /v1/state/admit`.
pub(crate) async fn admit<B>(
    st: &Arc<State>,
    actor: devfence_app::Actor,
    query: &str,
    req: Request<B>,
) -> Result<Value, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let t = parse_query(query)?;
    let Some(dest) = t.dest else {
        return Err(ApiError::bad_input(
            "Admitting needs the destination. Hint: give ?device=…&vm=… (the device and the VM's UUID)",
        ));
    };
    let body = crate::hook::read_body(MAX_ENVELOPE_BODY, req)
        .await?
        .to_vec();
    let st = Arc::clone(st);
    blocking(move || {
        let bytes = devfence_app::state::envelope_of_bytes(body);
        let a = app(devfence_app::state::admit_envelope(
            &st.opts.root,
            st.opts.ledger.as_deref(),
            label(),
            &bytes,
            dest,
            None,
            Some(&actor),
        ))?;
        Ok(a.to_json(dest.0))
    })
    .await
}

/// `POST /v1/state/inspect`.
pub(crate) async fn inspect<B>(
    st: &Arc<State>,
    query: &str,
    req: Request<B>,
) -> Result<Value, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let t = parse_query(query)?;
    let body = crate::hook::read_body(MAX_ENVELOPE_BODY, req)
        .await?
        .to_vec();
    let st = Arc::clone(st);
    blocking(move || {
        let size = body.len() as u64;
        let bytes = devfence_app::state::envelope_of_bytes(body);
        let i = app(devfence_app::state::inspect_envelope(
            &st.opts.root,
            st.opts.ledger.as_deref(),
            label(),
            &bytes,
            size,
            t.dest,
        ))?;
        Ok(i.to_json())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_query_names_both_or_neither() {
        let uuid = "8f2c6a1e-4b7d-4e0a-9c3f-2d1b5e6a7c80";
        let t = parse_query(&format!("device=0000%3A5e%3A10.0&vm={uuid}")).expect("query");
        assert!(t.dest.is_some());
        assert_eq!(parse_query("").expect("none").dest, None);
        for bad in [
            "device=0000:5e:10.0",
            &format!("vm={uuid}"),
            "device=nonsense&vm=x",
            "colour=red",
        ] {
            let e = parse_query(bad).expect_err(bad);
            assert!(e.status == 400 && e.hint.is_some(), "{bad}: {e:?}");
        }
    }

    proptest! {
        /// Any query: a target, or a 400 with a hint; never a panic.
        #[test]
        fn any_state_query_is_a_target_or_a_400(q in "[a-z=&%0-9A-F:.-]{0,80}") {
            if let Err(e) = parse_query(&q) {
                prop_assert_eq!(e.status, 400);
                prop_assert!(e.hint.is_some(), "{:?}", e);
            }
        }

        /// Any bytes as an envelope: the seal crate's frame check answers
        /// (a refusal or bytes to evaluate), never a panic.
        #[test]
        fn any_envelope_body_is_evaluated_or_refused(b in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = devfence_app::state::envelope_of_bytes(b);
        }
    }
}
