//! The routes: each parses its input, checks the peer's role, calls one
//! `devfence-app` use case on a blocking thread and renders the typed result
//! as JSON; every error is one typed body ([`ApiError`]).

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use devfence_app::{AppError, Env};
use devfence_engine::StoreError;
use devfence_engine::engine::{EngineConfig, EngineError, Progress};
use devfence_model::{DeviceId, TenantId};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::Value;

use crate::auth::{self, Access, Peer, Policy};
use crate::metrics::Metrics;
use crate::openapi::{
    AgentAnswer, AuditVerifyAnswer, OperationAccepted, OperationRequest, PlanAnswer, PlanRequest,
    SmAnswer, StatusAnswer,
};
use crate::ops::{self, OpState, OpView, Ops};
use crate::{Limits, Options};

/// Every route the agent serves: method and path template. The OpenAPI
/// document (docs/agent-openapi.json) has exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/inventory"),
    ("GET", "/v1/check"),
    ("GET", "/v1/status"),
    ("GET", "/v1/tenants"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/audit/verify"),
    ("POST", "/v1/operations"),
    ("GET", "/v1/operations/{id}"),
    ("POST", "/v1/plan"),
    ("GET", "/v1/findings"),
    ("GET", "/metrics"),
    ("POST", "/v1/recover"),
    ("POST", "/v1/hook/qemu"),
    ("GET", "/v1/events"),
    ("POST", "/v1/state/admit"),
    ("POST", "/v1/state/inspect"),
    ("GET", "/v1/fleet/status"),
    ("GET", "/v1/fleet/guid-pool"),
    ("POST", "/v1/fleet/revoke"),
];

/// What every request shares.
pub struct State {
    pub(crate) opts: Options,
    /// Who may do what; swapped whole by a reload (`SIGHUP`).
    policy: std::sync::RwLock<Policy>,
    /// The configuration requests open their environment with (the one read
    /// at start or at the last good reload); `None`: the file, read anew.
    config: std::sync::RwLock<Option<Arc<devfence_app::config::Config>>>,
    /// The operations.
    pub ops: Ops,
    /// The metrics.
    pub metrics: Metrics,
    /// Continuous verification and the live inventory.
    pub watch: crate::watch::Watch,
    /// Collects IB VF operations into batches (`[agent] batch_window`).
    pub batch: crate::batch::Batcher,
    /// The event stream's publisher.
    pub events: crate::events::Events,
    /// Fired when the agent stops: event streams end.
    pub stop: Arc<tokio::sync::Notify>,
    /// Recovery exclusive of the agent's operations and hook calls.
    pub recovery: Arc<crate::recover::Gate>,
}

impl State {
    /// The state of an agent started with `opts`.
    #[must_use]
    pub fn new(opts: Options, policy: Policy) -> Self {
        State {
            ops: Ops::new(opts.limits.kept_operations),
            watch: crate::watch::Watch::new(opts.clone()),
            opts,
            policy: std::sync::RwLock::new(policy),
            config: std::sync::RwLock::new(None),
            metrics: Metrics::default(),
            batch: crate::batch::Batcher::new(std::time::Duration::ZERO),
            events: crate::events::Events::default(),
            stop: Arc::new(tokio::sync::Notify::new()),
            recovery: Arc::default(),
        }
    }

    /// Replaces the configuration requests use (start, a reload).
    pub fn set_config(&self, c: devfence_app::config::Config) {
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(c));
    }

    pub(crate) fn config(&self) -> Option<Arc<devfence_app::config::Config>> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The authorization policy now.
    #[must_use]
    pub fn policy(&self) -> Policy {
        *self
            .policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the policy (a reload), at once for every later request.
    pub fn set_policy(&self, p: Policy) {
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = p;
    }

    /// What `devfence serve` was given.
    #[must_use]
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The host root the agent serves.
    pub(crate) fn root(&self) -> &devfence_host::HostRoot {
        &self.opts.root
    }

    pub(crate) fn limits(&self) -> Limits {
        self.opts.limits
    }
}

/// The typed error body of every refusal and failure.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct ApiError {
    /// The HTTP status it is answered with.
    pub status: u16,
    /// A stable machine-readable code (`invalid_input`, `forbidden`,
    /// `unknown_device`, `refused`, `busy`, `gate_failed`, …).
    #[schemars(schema_with = "crate::openapi::error_code_schema")]
    pub code: &'static str,
    /// What happened.
    pub message: String,
    /// What to do, if devfence knows.
    pub hint: Option<String>,
    /// The causes, outermost first (the message's own text not repeated).
    pub chain: Vec<String>,
    /// Whether a rule of the lifecycle said no (the CLI's exit status 1), as
    /// opposed to bad input, authorization or a fault.
    pub refusal: bool,
}

impl ApiError {
    /// An error with `status`, `code` and a message that may end in `Hint: …`.
    #[must_use]
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let (message, hint) = split_hint(&message.into());
        ApiError {
            status: status.as_u16(),
            code,
            message,
            hint,
            chain: Vec::new(),
            refusal: false,
        }
    }

    /// 400 naming what is wrong with the input.
    #[must_use]
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    /// From a use case's error: status and code from what failed, the chain kept.
    #[must_use]
    pub fn from_app(e: &AppError) -> Self {
        let (status, code) = classify(e);
        let mut out = Self::new(status, code, e.to_string());
        out.refusal = e.is_refusal();
        let mut seen = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(c) = src {
            let t = c.to_string();
            if !seen.contains(&t) {
                seen.push_str(&t);
                out.chain.push(t);
            }
            src = c.source();
        }
        out
    }
}

/// `msg` with `Hint: hint` appended unless it has a hint already.
fn with_hint(msg: String, hint: &str) -> String {
    if msg.contains("Hint: ") {
        msg
    } else {
        format!("{msg}. Hint: {hint}")
    }
}

fn split_hint(s: &str) -> (String, Option<String>) {
    match s.rfind("Hint: ") {
        Some(i) => (
            s[..i].trim_end().to_owned(),
            Some(s[i + 6..].trim().to_owned()),
        ),
        None => (s.to_owned(), None),
    }
}

fn classify_store(e: &StoreError) -> (StatusCode, &'static str) {
    match e {
        StoreError::UnknownTenant(_) => (StatusCode::NOT_FOUND, "unknown_tenant"),
        StoreError::UnknownDevice(_) => (StatusCode::NOT_FOUND, "unknown_device"),
        StoreError::UnknownOperation(_) => (StatusCode::NOT_FOUND, "unknown_operation"),
        StoreError::Busy(_) => (StatusCode::CONFLICT, "busy"),
        StoreError::Missing { .. } => (StatusCode::CONFLICT, "no_ledger"),
        StoreError::InvalidTenant { .. } | StoreError::InvalidName { .. } => {
            (StatusCode::BAD_REQUEST, "invalid_input")
        }
        StoreError::TenantExists(_)
        | StoreError::TenantInUse { .. }
        | StoreError::DeviceExists(_)
        | StoreError::StateConflict { .. }
        | StoreError::IllegalTransition { .. }
        | StoreError::OperationFinished(_)
        | StoreError::GuidPoolUnset
        | StoreError::GuidPoolExhausted { .. } => (StatusCode::CONFLICT, "refused"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "ledger"),
    }
}

/// The HTTP status and code of a use case's error.
#[must_use]
pub fn classify(e: &AppError) -> (StatusCode, &'static str) {
    match e {
        AppError::Engine(EngineError::Store(s)) | AppError::Store(s) => classify_store(s),
        AppError::Engine(EngineError::Refused { .. }) | AppError::Held(_) => {
            (StatusCode::CONFLICT, "refused")
        }
        AppError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_input"),
        AppError::Engine(EngineError::Failed { step, .. }) if step.starts_with("gate") => {
            (StatusCode::UNPROCESSABLE_ENTITY, "gate_failed")
        }
        AppError::Engine(EngineError::Failed { .. }) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "step_failed")
        }
        AppError::Engine(EngineError::Host { .. }) | AppError::Host(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "host_unreadable")
        }
        AppError::Config(_) => (StatusCode::INTERNAL_SERVER_ERROR, "configuration"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

/// A response: a whole body, or a stream (`GET /v1/events`).
pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;
pub(crate) type Resp = Response<Body>;

pub(crate) fn json_response(status: StatusCode, v: &impl Serialize) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_else(|e| {
        format!(r#"{{"status":500,"code":"internal","message":"Cannot render the answer: {e}","hint":null,"chain":[],"refusal":false}}"#)
            .into_bytes()
    });
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn error_response(e: &ApiError) -> Resp {
    json_response(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e,
    )
}

/// Runs `f` on a blocking thread; a panic is a 500, never the agent's end.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!(
                "The request's use case did not finish ({e}). Hint: this is a bug in devfence; the agent goes on serving"
            ),
        )),
    }
}

pub(crate) fn app<T>(r: Result<T, impl Into<AppError>>) -> Result<T, ApiError> {
    r.map_err(|e| ApiError::from_app(&e.into()))
}

/// Serves the socket until `shutdown` completes.
pub async fn serve(
    state: Arc<State>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(state.limits().max_connections));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                // EMFILE and the like: the connection is lost, the agent goes on.
                Err(_) => { tokio::task::yield_now().await; continue }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            state.metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let Ok(cred) = stream.peer_cred() else { return };
            let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
            let groups = tokio::task::spawn_blocking(move || auth::groups_of(uid, gid))
                .await
                .unwrap_or_default();
            let peer = Arc::new(Peer {
                uid,
                gid,
                pid,
                groups,
            });
            let st = Arc::clone(&state);
            let svc = hyper::service::service_fn(move |req| {
                let st = Arc::clone(&st);
                let peer = Arc::clone(&peer);
                // A request received is carried out in a task of its own: a
                // client that goes away drops only the wait for the answer.
                let task = tokio::spawn(handle(st, Some(peer), req));
                async move {
                    Ok::<_, Infallible>(task.await.unwrap_or_else(|_| {
                        error_response(&ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal",
                            "The request's handler did not finish. Hint: this is a bug in devfence; the agent goes on serving",
                        ))
                    }))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(state.limits().header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(permit);
        });
    }
}

/// Serves `GET /metrics` only, without authorization, on the loopback
/// address `[agent] metrics_tcp` names.
pub async fn serve_metrics_tcp(state: Arc<State>, listener: tokio::net::TcpListener) {
    let permits = Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::task::yield_now().await;
            continue;
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let st = Arc::clone(&state);
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let st = Arc::clone(&st);
                async move {
                    if req.method() == Method::GET && req.uri().path() == "/metrics" {
                        Ok::<_, Infallible>(metrics(st).await)
                    } else {
                        Ok(error_response(&ApiError::new(
                            StatusCode::NOT_FOUND,
                            "no_such_route",
                            "Only GET /metrics is served on the metrics address. Hint: use the agent's Unix socket for the API",
                        )))
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(state.limits().header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(permit);
        });
    }
}

/// What a peer needs for `method route`: POST acts, GET reads — except
/// inspecting an envelope, which reads only though its body needs a POST.
#[must_use]
pub fn access_of(method: &str, route: &str) -> Access {
    if method == "POST" && route != "/v1/state/inspect" {
        Access::Act
    } else {
        Access::Read
    }
}

/// The route template `method path` matches, if any.
#[must_use]
pub fn route_of(method: &str, path: &str) -> Option<&'static str> {
    ROUTES
        .iter()
        .find_map(|(m, t)| (*m == method && template_matches(t, path)).then_some(*t))
}

fn template_matches(t: &str, path: &str) -> bool {
    let (mut a, mut b) = (t.split('/'), path.split('/'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if x.starts_with('{') => {
                if y.is_empty() {
                    return false;
                }
            }
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

/// One request: route, authorize, answer; counted by route and status.
pub async fn handle<B>(state: Arc<State>, peer: Option<Arc<Peer>>, req: Request<B>) -> Resp
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let t0 = std::time::Instant::now();
    let uid = peer.as_deref().map(|p| p.uid);
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let route = route_of(&method, &path);
    let resp = match route {
        None => {
            let known = ROUTES.iter().any(|(_, t)| template_matches(t, &path));
            let e = if known {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "{method} is not served on {path}. Hint: see docs/agent.md for the routes"
                    ),
                )
            } else {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "no_such_route",
                    format!("There is no route {path}. Hint: see docs/agent.md for the routes"),
                )
            };
            error_response(&e)
        }
        Some(r) => {
            let access = access_of(&method, r);
            match peer
                .as_deref()
                .map(|p| auth::authorize(p, state.policy(), access))
            {
                Some(Err(d)) => error_response(&ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    d.to_string(),
                )),
                _ => dispatch(&state, peer, r, req).await,
            }
        }
    };
    state
        .metrics
        .request(route.unwrap_or("other"), resp.status().as_u16());
    crate::service::log_request(
        &method,
        route.unwrap_or("other"),
        resp.status().as_u16(),
        uid,
        t0.elapsed(),
    );
    resp
}

async fn dispatch<B>(
    state: &Arc<State>,
    peer: Option<Arc<Peer>>,
    route: &'static str,
    req: Request<B>,
) -> Resp
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let st = Arc::clone(state);
    let query = req.uri().query().unwrap_or("").to_owned();
    let path = req.uri().path().to_owned();
    let res: Result<(StatusCode, Value), ApiError> = match route {
        "/metrics" => return metrics(st).await,
        "/v1/inventory" => ok(crate::watch::inventory_route(st).await),
        "/v1/check" => ok(crate::watch::check_route(st).await),
        "/v1/findings" => ok(to_json(&st.watch.view())),
        "/v1/status" => ok(status(st).await),
        "/v1/tenants" => ok(tenants(st).await),
        "/v1/audit" => match audit_filter(&query) {
            Ok(f) => ok(audit_show(st, f).await),
            Err(e) => Err(e),
        },
        "/v1/audit/verify" => ok(audit_verify(st).await),
        "/v1/events" => return crate::events::route(&st, &query),
        "/v1/recover" => ok(crate::recover::route(&st, actor_of(peer.as_deref()), req).await),
        "/v1/hook/qemu" => {
            ok(crate::hook::route(&st, actor_of(peer.as_deref()), &query, req).await)
        }
        "/v1/state/admit" => {
            ok(crate::state::admit(&st, actor_of(peer.as_deref()), &query, req).await)
        }
        "/v1/state/inspect" => ok(crate::state::inspect(&st, &query, req).await),
        "/v1/fleet/status" => ok(crate::fleet::status_route(st).await),
        "/v1/fleet/guid-pool" => ok(crate::fleet::guid_pool_route(st).await),
        "/v1/fleet/revoke" => match crate::fleet::read_object(st.limits().max_body, req).await {
            Ok(b) => ok(crate::fleet::revoke_route(st, actor_of(peer.as_deref()), &b).await),
            Err(e) => Err(e),
        },
        "/v1/operations/{id}" => {
            let id = path.rsplit('/').next().unwrap_or("");
            match st.ops.get(id) {
                Some(v) => serde_json::to_value(&v)
                    .map(|v| (StatusCode::OK, v))
                    .map_err(|e| {
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                    }),
                None => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_operation",
                    format!(
                        "There is no operation {id:?} on this agent. Hint: ids are op-N as POST /v1/operations answered; the agent keeps the last {} finished ones and forgets all at restart (the audit log keeps every operation)",
                        st.limits().kept_operations
                    ),
                )),
            }
        }
        "/v1/operations" | "/v1/plan" => match read_json(st.limits().max_body, req).await {
            Err(e) => Err(e),
            Ok(body) if route == "/v1/plan" => ok(plan(&st, &body).await),
            Ok(body) => {
                let actor = peer.map_or(
                    devfence_app::Actor {
                        uid: 0,
                        gid: 0,
                        pid: None,
                        via: "agent",
                    },
                    |p| devfence_app::Actor {
                        uid: p.uid,
                        gid: p.gid,
                        pid: p.pid,
                        via: "agent",
                    },
                );
                start_operation(&st, &body, actor).map(|v| (StatusCode::ACCEPTED, v))
            }
        },
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_route",
            "No such route",
        )),
    };
    match res {
        Ok((s, v)) => json_response(s, &v),
        Err(e) => error_response(&e),
    }
}

fn ok(r: Result<Value, ApiError>) -> Result<(StatusCode, Value), ApiError> {
    r.map(|v| (StatusCode::OK, v))
}

/// Reads a JSON object body of at most `max` bytes.
async fn read_json<B>(
    max: usize,
    req: Request<B>,
) -> Result<serde_json::Map<String, Value>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let bytes = crate::hook::read_body(max, req).await?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::bad_input(format!(
            "The body is JSON {} but must be an object. Hint: send e.g. {{\"kind\": \"assign\", \"device\": \"0000:03:00.2\", \"tenant\": \"acme\"}}",
            type_name(&other)
        ))),
        Err(e) => Err(ApiError::bad_input(format!(
            "The body is not valid JSON: {e}. Hint: send one JSON object"
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields of a body: every key known, each of its type, named in errors.
struct Fields<'a> {
    map: &'a serde_json::Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn new(map: &'a serde_json::Map<String, Value>, known: &[&str]) -> Result<Self, ApiError> {
        if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ApiError::bad_input(format!(
                "Unknown field {k:?}. Hint: the fields are {}",
                known.join(", ")
            )));
        }
        Ok(Fields { map })
    }

    fn str(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::bad_input(format!(
                "Field {name:?} must be a string, not {}. Hint: see docs/agent.md for the body",
                type_name(v)
            ))),
        }
    }

    fn required(&self, name: &str, why: &str) -> Result<&'a str, ApiError> {
        self.str(name)?
            .ok_or_else(|| ApiError::bad_input(format!("Field {name:?} is missing. Hint: {why}")))
    }
}

fn device_field(f: &Fields<'_>) -> Result<DeviceId, ApiError> {
    let d = f.required("device", "name the device: a BDF, mdev UUID or APQN")?;
    d.parse::<DeviceId>().map_err(|e| {
        ApiError::bad_input(with_hint(
            format!("Field \"device\": {e}"),
            "name the device as GET /v1/status lists it",
        ))
    })
}

fn tenant_field(f: &Fields<'_>, name: &str) -> Result<Option<TenantId>, ApiError> {
    f.str(name)?
        .map(|t| {
            t.parse::<TenantId>().map_err(|e| {
                ApiError::bad_input(with_hint(
                    format!("Field {name:?}: {e}"),
                    "GET /v1/tenants lists the tenants",
                ))
            })
        })
        .transpose()
}

/// The lifecycle request a `POST /v1/operations` body asks for: every field
/// known and of its type, the tenant where the kind needs one.
///
/// # Errors
/// 400 naming the field and what it should be.
pub fn parse_operation(
    body: &serde_json::Map<String, Value>,
) -> Result<devfence_app::lifecycle::Request, ApiError> {
    use devfence_app::lifecycle::Request as Op;
    let f = Fields::new(body, OperationRequest::FIELDS)?;
    let kind = f.required("kind", "give \"assign\", \"handover\" or \"release\"")?;
    let device = device_field(&f)?;
    let tenant = tenant_field(&f, "tenant")?;
    let vm = f.str("vm")?.map(str::to_owned);
    let need_tenant = || {
        ApiError::bad_input(format!(
            "Field \"tenant\" is missing: {kind} gives the device to a tenant. Hint: name the tenant (GET /v1/tenants lists them)"
        ))
    };
    Ok(match kind {
        "assign" => Op::Assign {
            device,
            tenant: tenant.ok_or_else(need_tenant)?,
            vm,
        },
        "handover" => Op::Handover {
            device,
            to: tenant.ok_or_else(need_tenant)?,
            vm,
        },
        "release" => {
            if tenant.is_some() || vm.is_some() {
                return Err(ApiError::bad_input(
                    "A release takes no \"tenant\" or \"vm\". Hint: give only kind and device",
                ));
            }
            Op::Release { device }
        }
        other => {
            return Err(ApiError::bad_input(format!(
                "Field \"kind\" is {other:?}. Hint: give \"assign\", \"handover\" or \"release\""
            )));
        }
    })
}

fn start_operation(
    st: &Arc<State>,
    body: &serde_json::Map<String, Value>,
    actor: devfence_app::Actor,
) -> Result<Value, ApiError> {
    use devfence_app::lifecycle::Request as Op;
    let req = parse_operation(body)?;
    let (kind, device, tenant, vm) = match &req {
        Op::Assign { device, tenant, vm } => ("assign", device, Some(tenant), vm.clone()),
        Op::Handover { device, to, vm } => ("handover", device, Some(to), vm.clone()),
        Op::Release { device } => ("release", device, None, None),
    };
    let device = *device;
    let tenant = tenant.cloned();
    let kind = kind.to_owned();
    let view = st.recovery.start(|| {
        st.ops.start(|id| OpView {
            id,
            kind: kind.clone(),
            device: device.to_string(),
            tenant: tenant.as_ref().map(ToString::to_string),
            vm: vm.clone(),
            actor: actor.clone(),
            state: OpState::Running,
            started_at_ms: now_ms(),
            finished_at_ms: None,
            events: Vec::new(),
            waiting: None,
            result: None,
            error: None,
            notices: Vec::new(),
            batch: None,
        })
    })?;
    let id = ops::lock(&view).id.clone();
    st.events.publish(crate::events::Event::OperationStarted {
        operation: id.clone(),
        kind: kind.clone(),
        device: device.to_string(),
        tenant: tenant.as_ref().map(ToString::to_string),
    });
    let st2 = Arc::clone(st);
    let v2 = Arc::clone(&view);
    // Detached: the operation is the agent's, whatever its client does.
    tokio::task::spawn_blocking(move || {
        // An IB VF operation joins the next batch (one sweep for all of it).
        if st2.batch.collects(st2.root(), &req) {
            crate::batch::submit(&st2, v2, actor, req, kind);
            return;
        }
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_operation(&st2, &v2, &actor, &req)
        }))
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "The operation's thread panicked. Hint: this is a bug in devfence; run `devfence recover` to finish what it journalled",
            ))
        });
        complete(&st2, &v2, &kind, res);
    });
    to_json(&OperationAccepted {
        href: format!("/v1/operations/{id}"),
        id,
        state: OpState::Running,
    })
}

/// Ends an operation's view with its result, counts it, and marks it finished.
pub(crate) fn complete(
    st2: &State,
    v2: &std::sync::Mutex<OpView>,
    kind: &str,
    res: Result<devfence_engine::engine::Done, ApiError>,
) {
    {
        let outcome = {
            let mut v = ops::lock(v2);
            v.finished_at_ms = Some(now_ms());
            match res {
                Ok(done) => {
                    v.state = OpState::Succeeded;
                    v.result = Some(done);
                    "succeeded"
                }
                Err(e) => {
                    v.state = OpState::Failed;
                    let outcome = if e.status == 422 || e.code == "step_failed" {
                        "failed"
                    } else {
                        "refused"
                    };
                    v.error = Some(e);
                    outcome
                }
            }
        };
        st2.metrics.operation(kind, outcome);
        // The operation changed the host: the live inventory is read again.
        st2.watch.inventory.invalidate();
        crate::events::operation_finished(&st2.events, v2, outcome);
        st2.ops.finished();
    }
}

fn run_operation(
    st: &State,
    view: &std::sync::Mutex<OpView>,
    actor: &devfence_app::Actor,
    req: &devfence_app::lifecycle::Request,
) -> Result<devfence_engine::engine::Done, ApiError> {
    let mut env = open_env(st)?;
    ops::lock(view).notices = std::mem::take(&mut env.notices);
    env.act_as(actor);
    let mut last_ms = 0u64;
    let metrics = &st.metrics;
    let op_id = ops::lock(view).id.clone();
    let mut e = env.engine(engine_config(st)).with_progress(|p: &Progress| {
        match p {
            Progress::Gate {
                name, elapsed_ms, ..
            } => {
                let secs = elapsed_ms.saturating_sub(last_ms) as f64 / 1000.0;
                metrics
                    .gate_seconds
                    .get_or_create(&crate::metrics::GateLabel { gate: name.clone() })
                    .observe(secs);
                last_ms = *elapsed_ms;
            }
            Progress::Step { elapsed_ms, .. } => last_ms = *elapsed_ms,
            _ => {}
        }
        ops::lock(view).push(p);
        st.events.progress(Some(&op_id), p);
    });
    let r = devfence_app::lifecycle::run(&mut e, req);
    st.metrics.sm_sweeps_requested.inc_by(e.sm_applies());
    app(r)
}

/// Who asked, for the audit record (the agent itself without a peer).
pub(crate) fn actor_of(peer: Option<&Peer>) -> devfence_app::Actor {
    peer.map_or(
        devfence_app::Actor {
            uid: 0,
            gid: 0,
            pid: None,
            via: "agent",
        },
        |p| devfence_app::Actor {
            uid: p.uid,
            gid: p.gid,
            pid: p.pid,
            via: "agent",
        },
    )
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The engine's settings for an operation this agent runs: its gates wait
/// `[agent] gate_timeout` for the SM.
pub(crate) fn engine_config(st: &State) -> EngineConfig {
    match st.config() {
        Some(c) => EngineConfig {
            gate_deadline: c.agent.gate_timeout(),
            ..EngineConfig::default()
        },
        None => EngineConfig::default(),
    }
}

pub(crate) fn open_env(st: &State) -> Result<Env, ApiError> {
    if let Some(c) = st.config() {
        return app(Env::open_with(&st.opts.root, st.opts.ledger.as_deref(), &c));
    }
    app(Env::open(
        &st.opts.root,
        st.opts.ledger.as_deref(),
        st.opts.config.as_deref(),
    ))
}

pub(crate) fn ledger(st: &State) -> Option<PathBuf> {
    st.opts.ledger.clone()
}

pub(crate) fn to_json(v: &impl Serialize) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("Cannot render the answer: {e}"),
        )
    })
}

async fn status(st: Arc<State>) -> Result<Value, ApiError> {
    blocking(move || {
        let mut env = open_env(&st)?;
        let s = app(devfence_app::lifecycle::status(&mut env.store, &*env.sm))?;
        to_json(&StatusAnswer {
            ledger: env.ledger_path.display().to_string(),
            devices: s.devices,
            open_operations: s.open_operations,
            guid_pool: s.guid_pool,
            sm: match s.health {
                Ok(h) => SmAnswer::Read {
                    backend: s.sm_backend,
                    healthy: h.is_healthy(),
                    health: h,
                },
                Err(e) => SmAnswer::Unread {
                    backend: s.sm_backend,
                    error: e.to_string(),
                },
            },
            agent: AgentAnswer {
                operations_running: st.ops.running(),
            },
            notices: std::mem::take(&mut env.notices),
        })
    })
    .await
}

async fn tenants(st: Arc<State>) -> Result<Value, ApiError> {
    blocking(move || {
        let mut store = app(devfence_app::env::open_store(
            &st.opts.root,
            ledger(&st).as_deref(),
            false,
        ))?;
        to_json(&app(devfence_app::tenant::list(&mut store))?)
    })
    .await
}

pub(crate) fn percent_decode(s: &str) -> Result<String, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                let Some(x) = hex else {
                    return Err(ApiError::bad_input(format!(
                        "The query {s:?} has a bad %-escape. Hint: escape as %XX"
                    )));
                };
                out.push(x);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_input("The query is not UTF-8. Hint: send UTF-8, %-escaped"))
}

/// The filter of `GET /v1/audit`'s query string (`device=`, `tenant=`, %-escaped).
///
/// # Errors
/// 400 naming the parameter.
pub fn audit_filter(query: &str) -> Result<devfence_engine::AuditFilter, ApiError> {
    let mut f = devfence_engine::AuditFilter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "device" => {
                f.device = Some(v.parse::<DeviceId>().map_err(|e| {
                    ApiError::bad_input(with_hint(
                        format!("Query parameter \"device\": {e}"),
                        "give a BDF, mdev UUID or APQN, %-escaped",
                    ))
                })?);
            }
            "tenant" => {
                f.tenant = Some(v.parse::<TenantId>().map_err(|e| {
                    ApiError::bad_input(with_hint(
                        format!("Query parameter \"tenant\": {e}"),
                        "GET /v1/tenants lists the tenants",
                    ))
                })?);
            }
            other => {
                return Err(ApiError::bad_input(format!(
                    "Unknown query parameter {other:?}. Hint: the parameters are device and tenant"
                )));
            }
        }
    }
    Ok(f)
}

async fn audit_show(st: Arc<State>, f: devfence_engine::AuditFilter) -> Result<Value, ApiError> {
    blocking(move || {
        let mut store = app(devfence_app::env::open_store(
            &st.opts.root,
            ledger(&st).as_deref(),
            false,
        ))?;
        to_json(&app(devfence_app::audit::show(&mut store, &f))?)
    })
    .await
}

async fn audit_verify(st: Arc<State>) -> Result<Value, ApiError> {
    blocking(move || {
        let mut store = app(devfence_app::env::open_store(
            &st.opts.root,
            ledger(&st).as_deref(),
            false,
        ))?;
        match app(devfence_app::audit::verify(&st.opts.root, &mut store, None))? {
            devfence_app::audit::Verified::Intact { report, stored } => {
                to_json(&AuditVerifyAnswer::Intact {
                    intact: true,
                    report,
                    stored_head: stored,
                })
            }
            devfence_app::audit::Verified::Broken(e) => to_json(&AuditVerifyAnswer::Broken {
                intact: false,
                error: e.to_string(),
            }),
        }
    })
    .await
}

/// The plan a `POST /v1/plan` body asks for.
///
/// # Errors
/// 400 naming the field and what it should be.
pub fn parse_plan(
    body: &serde_json::Map<String, Value>,
) -> Result<devfence_app::lifecycle::PlanRequest, ApiError> {
    let f = Fields::new(body, PlanRequest::FIELDS)?;
    Ok(devfence_app::lifecycle::PlanRequest {
        device: device_field(&f)?,
        to: tenant_field(&f, "tenant")?,
    })
}

/// Parses the JSON body of `POST route` as its handler does, keeping only
/// whether it is accepted (the OpenAPI tests check the parsers against the
/// document with it).
///
/// # Errors
/// The handler's 400; a 404 for a route that takes no body.
pub fn parse_body(route: &str, body: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    match route {
        "/v1/operations" => parse_operation(body).map(drop),
        "/v1/plan" => parse_plan(body).map(drop),
        "/v1/fleet/revoke" => crate::fleet::parse_revoke(body).map(drop),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_route",
            format!("POST {route} takes no body"),
        )),
    }
}

async fn plan(st: &Arc<State>, body: &serde_json::Map<String, Value>) -> Result<Value, ApiError> {
    let st = Arc::clone(st);
    let req = parse_plan(body)?;
    blocking(move || {
        let mut env = open_env(&st)?;
        let mut e = env.engine(engine_config(&st));
        let steps = app(devfence_app::lifecycle::plan(&mut e, &req))?;
        to_json(&PlanAnswer {
            device: req.device.to_string(),
            steps,
        })
    })
    .await
}

async fn metrics(st: Arc<State>) -> Resp {
    let st2 = Arc::clone(&st);
    // The devices gauge is read from the ledger at each scrape; without a
    // ledger every state is 0.
    let _ = blocking(move || {
        let counts = match devfence_app::env::open_store(
            &st2.opts.root,
            st2.opts.ledger.as_deref(),
            false,
        ) {
            Ok(mut store) => {
                if let Ok(Some(h)) = store.last_record() {
                    st2.metrics
                        .audit_records
                        .set(i64::try_from(h.seq).unwrap_or(i64::MAX));
                }
                let s = app(devfence_app::lifecycle::status(
                    &mut store,
                    &devfence_app::fabric::NoSm,
                ))?;
                let mut c: Vec<(&str, i64)> = Vec::new();
                for d in &s.devices {
                    let n = d.state.name();
                    match c.iter_mut().find(|(k, _)| *k == n) {
                        Some((_, x)) => *x += 1,
                        None => c.push((n, 1)),
                    }
                }
                c
            }
            Err(_) => Vec::new(),
        };
        st2.metrics.set_devices(&counts);
        Ok(())
    })
    .await;
    let mut r = Response::new(Full::new(Bytes::from(st.metrics.encode())).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn state(policy: Policy) -> Arc<State> {
        Arc::new(State::new(
            Options {
                root: devfence_host::HostRoot::new("/nonexistent/devfence-agent-test"),
                ledger: None,
                config: None,
                socket: None,
                limits: Limits::default(),
                log_level: None,
            },
            policy,
        ))
    }

    fn req(method: &str, path: &str, body: &str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request")
    }

    async fn call(st: &Arc<State>, peer: Peer, r: Request<Full<Bytes>>) -> (u16, Value) {
        let resp = handle(Arc::clone(st), Some(Arc::new(peer)), r).await;
        let status = resp.status().as_u16();
        let b = resp.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
            groups: Vec::new(),
        }
    }

    /// The whole handler with synthetic credentials: an admin-group member
    /// gets past authorization to the use case, a reader and an outsider
    /// `[agent] gate_timeout` is the deadline of the gates of every operation
    /// the agent runs (the engine's default without a configuration).
    #[test]
    fn the_agents_gates_wait_the_configured_gate_timeout() {
        let st = state(Policy {
            admin_gid: None,
            reader_gid: None,
        });
        assert_eq!(
            engine_config(&st).gate_deadline,
            EngineConfig::default().gate_deadline
        );
        let c = devfence_app::config::Config::parse(
            "[agent]\ngate_timeout = 42\n",
            std::path::Path::new("t.toml"),
        )
        .expect("parses");
        st.set_config(c);
        assert_eq!(
            engine_config(&st).gate_deadline,
            std::time::Duration::from_secs(42)
        );
    }

    /// are refused with the typed body, counted by route and status.
    #[tokio::test]
    async fn the_handler_authorizes_before_anything_runs() {
        let st = state(Policy {
            admin_gid: Some(900),
            reader_gid: Some(901),
        });
        let plan = r#"{"device": "0000:5e:10.0"}"#;
        let (s, v) = call(&st, peer(1000, 900), req("POST", "/v1/plan", plan)).await;
        assert_ne!(s, 403, "an admin acts: {v}");
        let (s, v) = call(&st, peer(1000, 901), req("POST", "/v1/plan", plan)).await;
        assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
        let (s, v) = call(&st, peer(1000, 5), req("GET", "/v1/operations/op-1", "")).await;
        assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
        let (s, v) = call(&st, peer(1000, 901), req("GET", "/v1/operations/op-1", "")).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (404, Some("unknown_operation")),
            "{v}"
        );
        let m = st.metrics.encode();
        assert!(
            m.contains("devfence_requests_total{route=\"/v1/plan\",status=\"403\"} 1"),
            "{m}"
        );
    }

    /// The status of each kind of use-case error, and the hint split off.
    #[test]
    fn app_errors_map_to_their_status_and_code() {
        let dev: DeviceId = "0000:5e:10.0".parse().expect("device");
        let failed = |step: &str| {
            AppError::Engine(EngineError::Failed {
                kind: devfence_engine::engine::OpKind::Assign,
                device: dev,
                step: step.into(),
                reason: "the SM still shows the old GUID".into(),
                state: "quarantined".into(),
                hint: "run devfence verify".into(),
                source: None,
            })
        };
        let tenant: TenantId = "ghost".parse().expect("tenant");
        for (e, status, code) in [
            (failed("gate:sm-converged"), 422, "gate_failed"),
            (failed("bind-vfio"), 500, "step_failed"),
            (
                AppError::Engine(EngineError::Store(StoreError::UnknownTenant(tenant))),
                404,
                "unknown_tenant",
            ),
            (
                AppError::Store(StoreError::UnknownDevice(dev)),
                404,
                "unknown_device",
            ),
            (
                AppError::Engine(EngineError::Refused {
                    device: Some(dev),
                    reason: "the device is not free".into(),
                    hint: "release it first".into(),
                }),
                409,
                "refused",
            ),
            (AppError::Held("No. Hint: do this".into()), 409, "refused"),
            (AppError::invalid("Bad. Hint: fix it"), 400, "invalid_input"),
        ] {
            let a = ApiError::from_app(&e);
            assert_eq!((a.status, a.code), (status, code), "{e}");
            assert!(a.hint.is_some() && !a.message.contains("Hint:"), "{a:?}");
        }
        let a = ApiError::from_app(&failed("gate:driver"));
        assert_eq!(a.hint.as_deref(), Some("run devfence verify"));
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            prop_oneof![
                Just("assign".to_owned()),
                Just("handover".to_owned()),
                Just("release".to_owned()),
                Just("0000:5e:10.0".to_owned()),
                Just("acme".to_owned()),
                ".{0,40}",
            ]
            .prop_map(Value::String),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn body() -> impl Strategy<Value = serde_json::Map<String, Value>> {
        let key = prop_oneof![
            Just("kind".to_owned()),
            Just("device".to_owned()),
            Just("tenant".to_owned()),
            Just("vm".to_owned()),
            "[a-z]{1,6}",
        ];
        proptest::collection::btree_map(key, json_value(), 0..5)
            .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        /// Any body: a request, or a 400 with a hint; never a panic.
        #[test]
        fn any_operation_body_is_a_request_or_a_400_with_a_hint(b in body()) {
            match parse_operation(&b) {
                Ok(r) => {
                    let kind = b.get("kind").and_then(Value::as_str);
                    prop_assert!(matches!(kind, Some("assign" | "handover" | "release")), "{r:?}");
                }
                Err(e) => {
                    prop_assert_eq!(e.status, 400);
                    prop_assert_eq!(e.code, "invalid_input");
                    prop_assert!(e.hint.is_some(), "{:?}", e);
                }
            }
        }

        /// Any query string: a filter, or a 400 with a hint; never a panic.
        #[test]
        fn any_audit_query_is_a_filter_or_a_400(q in "[a-z=&%0-9A-F:.+]{0,40}") {
            if let Err(e) = audit_filter(&q) {
                prop_assert_eq!(e.status, 400);
                prop_assert!(e.hint.is_some(), "{:?}", e);
            }
        }
    }
}
