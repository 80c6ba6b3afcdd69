//! The fleet routes (issue 13 item 6): `GET /v1/fleet/status`, `GET
//! /v1/fleet/guid-pool` (readers) and `POST /v1/fleet/revoke` (admin), the
//! same use cases as `devfence fleet …` (`devfence_app::fleet`); and the
//! fleet gauges, refreshed after each re-verification and by each status
//! request — counts only, never a GUID or host name as a label value.
//!
//! One connection to the fleet store per `[fleet]` (kept while the section
//! stays the same; a reload with another section connects anew).

use std::sync::{Arc, Mutex};

use devfence_app::AppError;
use devfence_app::fleet::{Fleet, FleetError, FleetSettings, Name, RevokeTarget};
use devfence_model::Guid;
use hyper::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{ApiError, State, blocking, to_json};

/// The body of `POST /v1/fleet/revoke`: a lost host and one GUID, or `all`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(deny_unknown_fields)]
pub struct RevokeBody {
    /// The lost host, as `GET /v1/fleet/status` lists it.
    pub host: Name,
    /// One orphaned membership's port GUID (or `all`).
    #[serde(default)]
    pub guid: Option<Guid>,
    /// `true`: every orphaned membership of the host (or `guid`).
    #[serde(default)]
    pub all: Option<bool>,
}

impl RevokeBody {
    /// The fields the parser accepts (the schema's properties).
    pub const FIELDS: &'static [&'static str] = &["host", "guid", "all"];
}

/// `state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostStateLabel {
    /// `live` or `lost`.
    pub state: String,
}

/// The fleet's gauges (0 until `[fleet]` is configured and read).
#[derive(Default)]
pub struct FleetMetrics {
    /// Memberships of lost hosts the SM still holds.
    pub orphaned: Gauge,
    /// Memberships not in sync at the SM yet (pending, mismatch, releasing).
    pub pending: Gauge,
    /// Hosts by state (`live`; `lost` with memberships left at the SM).
    pub hosts: Family<HostStateLabel, Gauge>,
    /// 1 when the last read of the fleet store answered, else 0 (the
    /// gauges above then keep the last values read).
    pub store_up: Gauge,
}

impl FleetMetrics {
    /// Registers the gauges (`devfence_fleet_…`).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "fleet_orphaned_memberships",
            "Memberships of lost hosts (lease expired) the SM still holds; removed only by `devfence fleet revoke`",
            self.orphaned.clone(),
        );
        r.register(
            "fleet_pending_memberships",
            "Memberships not yet in sync at the SM: desired and not observed at their revision, observed with other P_Keys, or released and still held",
            self.pending.clone(),
        );
        r.register(
            "fleet_hosts",
            "Hosts of the fabric by state: live (lease holds), lost (lease gone, memberships left at the SM)",
            self.hosts.clone(),
        );
        r.register(
            "fleet_store_up",
            "1 when the agent's last read of the fleet store (etcd) answered, else 0",
            self.store_up.clone(),
        );
    }

    fn set(&self, s: &devfence_app::fleet::FleetStatus) {
        let c = &s.counts;
        let g = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.orphaned.set(g(c.orphaned));
        self.pending.set(g(c.not_in_sync()));
        for (state, n) in [("live", c.hosts_live), ("lost", c.hosts_lost)] {
            self.hosts
                .get_or_create(&HostStateLabel {
                    state: state.into(),
                })
                .set(g(n));
        }
        self.store_up.set(1);
    }
}

type Cached = Option<(FleetSettings, Arc<Fleet>)>;
static CONNECTION: Mutex<Cached> = Mutex::new(None);

/// The fleet store of the agent's configuration (blocking thread only: a
/// replaced connection's runtime is dropped here).
// AppError carries its evidence (as in devfence-app); it is not hot.
#[allow(clippy::result_large_err)]
fn fleet(st: &State, what: &str) -> Result<Arc<Fleet>, AppError> {
    let config = match st.config() {
        Some(c) => c,
        None => Arc::new(devfence_app::config::Config::load(
            &st.opts.root,
            st.opts.config.as_deref(),
        )?),
    };
    let settings = devfence_app::fleet::settings(&config, what)?;
    let mut c = CONNECTION
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((s, f)) = c.as_ref()
        && *s == settings
    {
        return Ok(Arc::clone(f));
    }
    let f = Arc::new(Fleet::connect(settings.clone())?);
    *c = Some((settings, Arc::clone(&f)));
    Ok(f)
}

/// A use case's error as the route answers it: the fleet store unreachable
/// is 503 `fleet_unavailable` (fail closed); the rest as every route.
fn api_error(e: &AppError) -> ApiError {
    let mut a = ApiError::from_app(e);
    if let AppError::Fleet(f) = e
        && matches!(
            **f,
            FleetError::Unavailable { .. } | FleetError::TlsRefused { .. }
        )
    {
        a.status = StatusCode::SERVICE_UNAVAILABLE.as_u16();
        a.code = "fleet_unavailable";
    }
    a
}

/// Refreshes the fleet gauges (blocking); nothing without `[fleet]`.
pub fn refresh_metrics(st: &State) {
    let Ok(f) = fleet(st, "the fleet gauges") else {
        return;
    };
    match devfence_app::fleet::status(&f) {
        Ok(s) => st.metrics.fleet.set(&s),
        Err(_) => {
            st.metrics.fleet.store_up.set(0);
        }
    }
}

/// `GET /v1/fleet/status`.
pub async fn status_route(st: Arc<State>) -> Result<Value, ApiError> {
    blocking(move || {
        let f = fleet(&st, "GET /v1/fleet/status").map_err(|e| api_error(&e))?;
        match devfence_app::fleet::status(&f) {
            Ok(s) => {
                st.metrics.fleet.set(&s);
                to_json(&s)
            }
            Err(e) => {
                let _ = st.metrics.fleet.store_up.set(0);
                Err(api_error(&e))
            }
        }
    })
    .await
}

/// `GET /v1/fleet/guid-pool`.
pub async fn guid_pool_route(st: Arc<State>) -> Result<Value, ApiError> {
    blocking(move || {
        let f = fleet(&st, "GET /v1/fleet/guid-pool").map_err(|e| api_error(&e))?;
        to_json(&devfence_app::fleet::guid_pool(&f).map_err(|e| api_error(&e))?)
    })
    .await
}

/// The request a `POST /v1/fleet/revoke` body asks for.
///
/// # Errors
/// 400 naming what is wrong, with a hint.
pub fn parse_revoke(
    body: &serde_json::Map<String, Value>,
) -> Result<(Name, RevokeTarget), ApiError> {
    const HINT: &str =
        "send {\"host\": \"HOST\", \"guid\": \"0x…\"} or {\"host\": \"HOST\", \"all\": true}";
    let b: RevokeBody = serde_json::from_value(Value::Object(body.clone())).map_err(|e| {
        ApiError::bad_input(format!(
            "The body is not a revoke request: {e}. Hint: {HINT}"
        ))
    })?;
    let target = match (b.guid, b.all) {
        (Some(_), Some(true)) => {
            return Err(ApiError::bad_input(format!(
                "Give \"guid\" or \"all\": true, not both. Hint: {HINT}"
            )));
        }
        (Some(g), _) if g.is_reserved() => {
            return Err(ApiError::bad_input(format!(
                "GUID {g} is reserved and never names a port. Hint: {HINT}"
            )));
        }
        (Some(g), _) => RevokeTarget::Guid(g),
        (None, Some(true)) => RevokeTarget::All,
        (None, _) => {
            return Err(ApiError::bad_input(format!(
                "Neither \"guid\" nor \"all\": true is given. Hint: {HINT}"
            )));
        }
    };
    Ok((b.host, target))
}

/// `POST /v1/fleet/revoke` (admin).
pub async fn revoke_route(
    st: Arc<State>,
    actor: devfence_app::Actor,
    body: &serde_json::Map<String, Value>,
) -> Result<Value, ApiError> {
    let (host, target) = parse_revoke(body)?;
    blocking(move || {
        // The ledger first: a request this agent cannot record is not sent.
        let mut store =
            devfence_app::env::open_store(&st.opts.root, crate::api::ledger(&st).as_deref(), true)
                .map_err(|e| api_error(&e))?;
        let f = fleet(&st, "POST /v1/fleet/revoke").map_err(|e| api_error(&e))?;
        to_json(
            &devfence_app::fleet::revoke(&mut store, &f, &host, target, &actor)
                .map_err(|e| api_error(&e))?,
        )
    })
    .await
}

/// Reads the JSON object body of a request (at most `max` bytes).
pub(crate) async fn read_object<B>(
    max: usize,
    req: hyper::Request<B>,
) -> Result<serde_json::Map<String, Value>, ApiError>
where
    B: hyper::body::Body<Data = hyper::body::Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let bytes = crate::hook::read_body(max, req).await?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_input(
            "The body must be a JSON object. Hint: send {\"host\": \"HOST\", \"all\": true}",
        )),
        Err(e) => Err(ApiError::bad_input(format!(
            "The body is not valid JSON: {e}. Hint: send one JSON object"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> serde_json::Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        }
    }

    #[test]
    fn a_revoke_body_is_a_request_or_a_400_with_a_hint() {
        let (h, t) = parse_revoke(&body(json!({"host": "hv07", "all": true}))).expect("all");
        assert_eq!((h.as_str(), t), ("hv07", RevokeTarget::All));
        let (_, t) = parse_revoke(&body(json!({"host": "hv07", "guid": "0x0002c90300000012"})))
            .expect("one");
        assert_eq!(t, RevokeTarget::Guid(Guid(0x0002_c903_0000_0012)));
        for (b, want) in [
            (json!({"host": "a/b", "all": true}), "not a valid name"),
            (json!({"host": "hv07", "guid": "zz"}), "GUID"),
            (json!({"host": "hv07"}), "Neither"),
            (json!({"host": "hv07", "all": false}), "Neither"),
            (
                json!({"host": "hv07", "all": true, "guid": "0x1"}),
                "not both",
            ),
            (json!({"host": "hv07", "guid": "0x0"}), "reserved"),
            (
                json!({"host": "hv07", "all": true, "x": 1}),
                "unknown field",
            ),
            (json!({"all": true}), "missing field"),
        ] {
            let e = parse_revoke(&body(b.clone())).expect_err("refused");
            assert_eq!(e.status, 400, "{b}");
            assert!(e.message.contains(want), "{b}: {e:?}");
            assert!(e.hint.is_some(), "{b}: {e:?}");
        }
    }
}
