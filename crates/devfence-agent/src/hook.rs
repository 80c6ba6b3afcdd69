//! `POST /v1/hook/qemu`: the libvirt hook's decision through the agent.
//!
//! It takes what libvirt gives the hook — the domain's name, the operation
//! and sub-operation in the query (`?domain=…&operation=prepare&subop=begin`)
//! and the domain's XML as the body — and answers the decision the hook
//! would make, with the same side effects (`prepare begin` re-verifies the
//! devices and marks them Active; `started begin` withdraws the VF tokens;
//! `release end` returns the devices). The XML is untrusted: at most
//! [`MAX_XML`] bytes (413 beyond), UTF-8, parsed by the engine's bounded
//! domain parser; a domain it does not name is 400.

use std::sync::Arc;

use devfence_app::hook::{Call, Verdict};
use http_body_util::{BodyExt, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use serde_json::Value;

use crate::api::{ApiError, State, app, blocking, percent_decode, to_json};
use crate::events::Event;

/// The largest domain XML the route takes (the CLI's hook reads as much).
pub const MAX_XML: usize = 4 << 20;

/// Reads a body of at most `max` bytes.
///
/// # Errors
/// 413 beyond `max`; 400 when the body cannot be read.
pub(crate) async fn read_body<B>(max: usize, req: Request<B>) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "The request body is larger than {max} bytes. Hint: see docs/agent.md for each route's cap"
            ),
        )
    };
    if let Some(n) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && n > max as u64
    {
        return Err(too_big());
    }
    match Limited::new(req.into_body(), max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Err(e) => Err(ApiError::bad_input(format!(
            "Cannot read the request body: {e}. Hint: send the whole body with its Content-Length"
        ))),
    }
}

/// What the query of `POST /v1/hook/qemu` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookQuery {
    /// The domain libvirt called the hook for.
    pub domain: String,
    /// The call, when devfence acts on it (`None`: libvirt's other calls,
    /// allowed without reading anything).
    pub call: Option<Call>,
}

/// Parses the query: `domain`, `operation` and `subop`, each once, %-escaped.
///
/// # Errors
/// 400 naming the parameter.
pub fn parse_query(query: &str) -> Result<HookQuery, ApiError> {
    let (mut domain, mut operation, mut subop) = (None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        let slot = match k {
            "domain" => &mut domain,
            "operation" => &mut operation,
            "subop" => &mut subop,
            other => {
                return Err(ApiError::bad_input(format!(
                    "Unknown query parameter {other:?}. Hint: the parameters are domain, operation and subop, as libvirt passes them to the hook"
                )));
            }
        };
        if slot.replace(v).is_some() {
            return Err(ApiError::bad_input(format!(
                "Query parameter {k:?} is given twice. Hint: give each of domain, operation and subop once"
            )));
        }
    }
    let need = |v: Option<String>, name: &str| {
        v.filter(|s| !s.is_empty()).ok_or_else(|| {
            ApiError::bad_input(format!(
                "Query parameter {name:?} is missing. Hint: give domain, operation and subop as libvirt passes them (e.g. ?domain=vm1&operation=prepare&subop=begin)"
            ))
        })
    };
    let domain = need(domain, "domain")?;
    let operation = need(operation, "operation")?;
    let subop = need(subop, "subop")?;
    if domain.len() > 256 || domain.chars().any(char::is_control) {
        return Err(ApiError::bad_input(
            "Query parameter \"domain\" is not a domain name (longer than 256 bytes, or control characters). Hint: give the name libvirt passes",
        ));
    }
    Ok(HookQuery {
        call: Call::of(&operation, &subop),
        domain,
    })
}

/// `POST /v1/hook/qemu`.
pub(crate) async fn route<B>(
    st: &Arc<State>,
    actor: devfence_app::Actor,
    query: &str,
    req: Request<B>,
) -> Result<Value, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let q = parse_query(query)?;
    let Some(call) = q.call else {
        // libvirt's other calls: nothing to decide, the body not read.
        return to_json(&Verdict {
            decision: "allowed".into(),
            reason: None,
            failures: Vec::new(),
            notices: Vec::new(),
        });
    };
    let xml = read_body(MAX_XML, req).await?.to_vec();
    let guard = st.recovery.hook()?;
    let st = Arc::clone(st);
    blocking(move || {
        let _guard = guard;
        // The devices, for the event stream (the use case parses again and
        // answers any error of the document).
        let devices = std::str::from_utf8(&xml)
            .ok()
            .and_then(|x| devfence_engine::libvirt::parse_domain(x).ok())
            .map(|d| d.hostdevs)
            .unwrap_or_default();
        let (decision, notices) = app(devfence_app::hook::run_as(
            &st.opts.root,
            st.opts.ledger.as_deref(),
            st.opts.config.as_deref(),
            &q.domain,
            call,
            xml,
            Some(&actor),
        ))?;
        let v = Verdict::of(&decision, notices);
        st.events.publish(Event::HookDecision {
            domain: q.domain.clone(),
            call: call.to_string(),
            decision: v.decision.clone(),
        });
        if v.allowed() && !devices.is_empty() {
            publish_states(&st, call, &devices);
        }
        to_json(&v)
    })
    .await
}

/// The devices' states after an allowed call: Active after `prepare
/// begin` (every device was moved, or none); as the ledger says after
/// `release end`; `started begin` changes no state.
fn publish_states(st: &State, call: Call, devices: &[devfence_model::DeviceId]) {
    match call {
        Call::PrepareBegin => {
            for d in devices {
                st.events.publish(Event::DeviceState {
                    device: d.to_string(),
                    state: "active".into(),
                });
            }
        }
        Call::StartedBegin => {}
        Call::ReleaseEnd => {
            use devfence_engine::StoreExt;
            let Ok(mut store) =
                devfence_app::env::open_store(&st.opts.root, st.opts.ledger.as_deref(), false)
            else {
                return;
            };
            for d in devices {
                if let Ok(Some(r)) = store.atomically(|tx| tx.device(d)) {
                    st.events.publish(Event::DeviceState {
                        device: d.to_string(),
                        state: r.state.name().to_owned(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_query_names_the_call() {
        let q = parse_query("domain=vm%201&operation=prepare&subop=begin").expect("query");
        assert_eq!(q.domain, "vm 1");
        assert_eq!(q.call, Some(Call::PrepareBegin));
        let q = parse_query("domain=vm1&operation=migrate&subop=begin").expect("query");
        assert_eq!(q.call, None);
        for bad in [
            "",
            "domain=vm1&operation=prepare",
            "domain=vm1&domain=vm2&operation=prepare&subop=begin",
            "domain=%0a&operation=prepare&subop=begin",
            "domain=vm1&operation=prepare&subop=begin&x=1",
        ] {
            let e = parse_query(bad).expect_err(bad);
            assert!(e.status == 400 && e.hint.is_some(), "{bad}: {e:?}");
        }
    }

    proptest! {
        /// Any query: a call, or a 400 with a hint; never a panic.
        #[test]
        fn any_hook_query_is_a_call_or_a_400(q in "[a-z=&%0-9A-F+]{0,60}") {
            match parse_query(&q) {
                Ok(h) => prop_assert!(!h.domain.is_empty()),
                Err(e) => {
                    prop_assert_eq!(e.status, 400);
                    prop_assert!(e.hint.is_some(), "{:?}", e);
                }
            }
        }

        /// Any bytes as the domain XML: the app's parser answers an error or
        /// a domain, never a panic (the route hands it the body as is).
        #[test]
        fn any_domain_xml_is_parsed_or_refused(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(s) = std::str::from_utf8(&b) {
                let _ = devfence_engine::libvirt::parse_domain(s);
            }
        }
    }
}
