//! The agent's OpenAPI 3.1 document, generated from the types its handlers
//! take and answer with.
//!
//! Every route is described once, in [`ROUTE_DOCS`]: its method and path, who
//! may call it, its parameters, and the Rust types of its request body and of
//! its answer. [`document`] turns that table into the OpenAPI document, the
//! schemas derived (`schemars`) from the very types the handlers parse and
//! serialize, so the document cannot describe a field the agent does not send.
//! The checked-in copy is `docs/agent-openapi.json`; a test
//! (`crates/devfence-agent/tests/openapi.rs`) fails when it differs from what
//! this module generates, and when the table and the router
//! ([`crate::api::ROUTES`]) differ. `DEVFENCE_REGEN=1 cargo test -p
//! devfence-agent --test openapi` rewrites the copy.

use schemars::{JsonSchema, Schema, SchemaGenerator, generate::SchemaSettings};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::api::ApiError;

/// A body schema: the schema of one Rust type, registered in the document's
/// components.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// The schema of `T`, its definition kept in the components.
#[must_use]
pub fn schema_of<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The reader group, the admin group and root.
    Read,
    /// The admin group and root.
    Act,
}

/// Where a parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamIn {
    /// In the path (`{name}`).
    Path,
    /// In the query string.
    Query,
}

/// One parameter of a route.
#[derive(Clone, Copy, Debug)]
pub struct Param {
    /// Its name.
    pub name: &'static str,
    /// Where it is.
    pub at: ParamIn,
    /// What it means.
    pub description: &'static str,
    /// Its value's schema.
    pub schema: SchemaFn,
}

/// What a request body is.
#[derive(Clone, Copy, Debug)]
pub enum Request {
    /// JSON of this type (its parser refuses what the schema does not name).
    Json(SchemaFn),
    /// Bytes of this media type, described (domain XML, a state envelope).
    Raw(&'static str, &'static str),
}

/// What a successful answer carries.
#[derive(Clone, Copy, Debug)]
pub enum Body {
    /// JSON of this type.
    Json(SchemaFn),
    /// Text of this media type (the metrics).
    Text(&'static str),
    /// A stream of JSON lines (`application/x-ndjson`), each of this type.
    Lines(SchemaFn),
}

/// One route, as the document describes it.
#[derive(Clone, Copy, Debug)]
pub struct RouteDoc {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The path template.
    pub path: &'static str,
    /// A stable name (the OpenAPI operationId).
    pub id: &'static str,
    /// One line.
    pub summary: &'static str,
    /// Who may call it.
    pub role: Role,
    /// Its parameters.
    pub params: &'static [Param],
    /// Its request body, if it takes one.
    pub request: Option<Request>,
    /// The status of a success and what it carries.
    pub ok: (u16, &'static str, Body),
    /// The error statuses it can answer besides 403 and 500 (every route's).
    pub errors: &'static [u16],
}

/// Every code [`ApiError::code`] takes.
pub const ERROR_CODES: &[&str] = &[
    "invalid_input",
    "body_too_large",
    "forbidden",
    "no_such_route",
    "method_not_allowed",
    "unknown_operation",
    "unknown_tenant",
    "unknown_device",
    "busy",
    "refused",
    "no_ledger",
    "gate_failed",
    "step_failed",
    "host_unreadable",
    "configuration",
    "ledger",
    "internal",
    "fleet_unavailable",
];

/// The schema of [`ApiError::code`]: one of [`ERROR_CODES`].
#[must_use]
pub fn error_code_schema(_: &mut SchemaGenerator) -> Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ERROR_CODES,
        "description": "A stable machine-readable code",
    })
}

/// What each error status means, the same for every route.
fn status_meaning(status: u16) -> &'static str {
    match status {
        400 => "The input is malformed; the error names the field or parameter",
        403 => "The peer may not do this (GET needs the reader role, POST the admin role)",
        404 => "No such device, tenant or operation",
        409 => "Refused by a rule, the ledger is busy, or there is no ledger",
        413 => "The body is larger than the agent accepts",
        422 => "A gate failed: the device did not reach the state it must",
        503 => {
            "The fleet store (etcd) did not answer: nothing that needs it proceeds; the error lists the endpoints"
        }
        _ => "devfence failed; the error chain says where",
    }
}

/// The OpenAPI 3.1 document of [`ROUTE_DOCS`].
#[must_use]
pub fn document() -> Value {
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let error = g.subschema_for::<ApiError>();
    let mut paths: Map<String, Value> = Map::new();
    for r in ROUTE_DOCS {
        let mut op = Map::new();
        op.insert("operationId".into(), json!(r.id));
        op.insert("summary".into(), json!(r.summary));
        op.insert(
            "x-devfence-role".into(),
            json!(match r.role {
                Role::Read => "read",
                Role::Act => "act",
            }),
        );
        if !r.params.is_empty() {
            let ps: Vec<Value> = r
                .params
                .iter()
                .map(|p| {
                    json!({
                        "name": p.name,
                        "in": match p.at { ParamIn::Path => "path", ParamIn::Query => "query" },
                        "required": p.at == ParamIn::Path,
                        "description": p.description,
                        "schema": (p.schema)(&mut g),
                    })
                })
                .collect();
            op.insert("parameters".into(), Value::Array(ps));
        }
        match r.request {
            Some(Request::Json(req)) => {
                op.insert(
                    "requestBody".into(),
                    json!({
                        "required": true,
                        "content": { "application/json": { "schema": req(&mut g) } },
                    }),
                );
            }
            Some(Request::Raw(media, what)) => {
                op.insert(
                    "requestBody".into(),
                    json!({
                        "required": true,
                        "description": what,
                        "content": { media: { "schema": { "type": "string" } } },
                    }),
                );
            }
            None => {}
        }
        let mut responses = Map::new();
        let (status, what, body) = r.ok;
        let content = match body {
            Body::Json(f) => json!({ "application/json": { "schema": f(&mut g) } }),
            Body::Text(media) => json!({ media: { "schema": { "type": "string" } } }),
            Body::Lines(f) => json!({ "application/x-ndjson": { "schema": f(&mut g) } }),
        };
        responses.insert(
            status.to_string(),
            json!({ "description": what, "content": content }),
        );
        let mut errors: Vec<u16> = r.errors.to_vec();
        errors.extend([403, 500]);
        errors.sort_unstable();
        errors.dedup();
        for s in errors {
            responses.insert(
                s.to_string(),
                json!({
                    "description": status_meaning(s),
                    "content": { "application/json": { "schema": error.clone() } },
                }),
            );
        }
        op.insert("responses".into(), Value::Object(responses));
        let item = paths
            .entry(r.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = item {
            m.insert(r.method.to_lowercase(), Value::Object(op));
        }
    }
    let schemas: Map<String, Value> = g.take_definitions(true).into_iter().collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "devfence host agent",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "devfence serve: the application layer's use cases over HTTP/1.1 + JSON on a Unix socket (docs/agent.md). Generated from the handlers' types (crates/devfence-agent/src/openapi.rs). GET needs the reader role, POST the admin role (root or [agent] admin_group); x-devfence-role says which.",
        },
        "paths": paths,
        "components": { "schemas": schemas },
    })
}

/// The document as the checked-in file holds it: pretty JSON and a newline.
#[must_use]
pub fn document_text() -> String {
    let mut s = serde_json::to_string_pretty(&document()).unwrap_or_default();
    s.push('\n');
    s
}

/// The body of `POST /v1/operations`.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct OperationRequest {
    /// What to do.
    pub kind: OperationKind,
    /// The device.
    pub device: devfence_model::DeviceId,
    /// The tenant it goes to (assign, handover; not release).
    pub tenant: Option<devfence_model::TenantId>,
    /// The VM it is for (assign, handover; not release).
    pub vm: Option<String>,
}

impl OperationRequest {
    /// The fields the parser accepts (the schema's properties).
    pub const FIELDS: &'static [&'static str] = &["kind", "device", "tenant", "vm"];
}

/// The operations `POST /v1/operations` runs.
#[derive(Clone, Copy, Debug, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperationKind {
    /// A free device to a tenant.
    Assign,
    /// A device from its tenant to another, cleaned between.
    Handover,
    /// A device back to free.
    Release,
}

/// `202` to `POST /v1/operations`: where to poll.
#[derive(Debug, Serialize, JsonSchema)]
pub struct OperationAccepted {
    /// The operation's id.
    pub id: String,
    /// `running`.
    pub state: crate::ops::OpState,
    /// `GET` this to follow it.
    pub href: String,
}

/// The body of `POST /v1/plan`.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct PlanRequest {
    /// The device.
    pub device: devfence_model::DeviceId,
    /// The tenant it would go to (a handover); none for a release's plan.
    pub tenant: Option<devfence_model::TenantId>,
}

impl PlanRequest {
    /// The fields the parser accepts (the schema's properties).
    pub const FIELDS: &'static [&'static str] = &["device", "tenant"];
}

/// `GET /v1/check`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CheckAnswer {
    /// Every finding, host rules first, then the fabric's.
    pub findings: Vec<devfence_model::Finding>,
    /// The findings by severity.
    pub summary: devfence_app::check::Summary,
    /// Where the tenancy came from (none: nowhere; the tenancy rules were
    /// skipped).
    pub tenancy: Option<String>,
    /// Whether that is the ledger (else the tenancy file).
    pub tenancy_from_ledger: bool,
    /// The host's tenancy file, when it exists but the ledger was read
    /// instead (its tenants count only once imported).
    pub tenancy_file_unread: Option<String>,
    /// What opening the environment noticed.
    pub notices: Vec<String>,
    /// Where the inventory came from: the agent's live inventory, or a walk
    /// for this request.
    pub inventory: crate::watch::InventorySource,
}

/// `GET /v1/status`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct StatusAnswer {
    /// The ledger read.
    pub ledger: String,
    /// Every device of the ledger with its state.
    pub devices: Vec<devfence_engine::store::DeviceRecord>,
    /// Operations begun and not finished.
    pub open_operations: Vec<devfence_engine::store::Operation>,
    /// The GUID pool, if set.
    pub guid_pool: Option<devfence_engine::store::GuidRange>,
    /// The SM.
    pub sm: SmAnswer,
    /// The agent itself.
    pub agent: AgentAnswer,
    /// What opening the environment noticed.
    pub notices: Vec<String>,
}

/// The SM in `GET /v1/status`: its health, or why it cannot be read.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum SmAnswer {
    /// It answered.
    Read {
        /// The backend (`opensm`, `ufm`, `sim`, `none`).
        backend: String,
        /// Whether it is healthy.
        healthy: bool,
        /// What it said.
        health: devfence_fabric::Health,
    },
    /// It did not.
    Unread {
        /// The backend.
        backend: String,
        /// Why.
        error: String,
    },
}

/// The agent in `GET /v1/status`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AgentAnswer {
    /// Operations running now.
    pub operations_running: usize,
}

/// `GET /v1/audit/verify`.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum AuditVerifyAnswer {
    /// Every record links, and the chain reaches the stored head.
    Intact {
        /// `true`.
        intact: bool,
        /// The chain.
        report: devfence_engine::VerifyReport,
        /// The head stored beside the ledger, if any.
        stored_head: Option<devfence_engine::audit::StoredHead>,
    },
    /// It does not: the error says where.
    Broken {
        /// `false`.
        intact: bool,
        /// Where the chain breaks.
        error: String,
    },
}

/// `POST /v1/plan`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PlanAnswer {
    /// The device.
    pub device: String,
    /// The steps and gates it would run, in order.
    pub steps: Vec<devfence_engine::engine::PlannedStep>,
}

const DEVICE: Param = Param {
    name: "device",
    at: ParamIn::Query,
    description: "Only this device's records (BDF, mdev UUID, APQN or IB GUID, %-escaped)",
    schema: schema_of::<devfence_model::DeviceId>,
};

const TENANT: Param = Param {
    name: "tenant",
    at: ParamIn::Query,
    description: "Only this tenant's records",
    schema: schema_of::<devfence_model::TenantId>,
};

const OP_ID: Param = Param {
    name: "id",
    at: ParamIn::Path,
    description: "The id POST /v1/operations answered (op-N)",
    schema: schema_of::<String>,
};

const fn query(name: &'static str, description: &'static str) -> Param {
    Param {
        name,
        at: ParamIn::Query,
        description,
        schema: schema_of::<String>,
    }
}

/// Every route: the router serves exactly these (a test holds it).
pub const ROUTE_DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "GET",
        path: "/v1/inventory",
        id: "inventory",
        summary: "The host's inventory (devfence inventory --json)",
        role: Role::Read,
        params: &[],
        request: None,
        ok: (
            200,
            "The inventory",
            Body::Json(schema_of::<devfence_model::Inventory>),
        ),
        errors: &[],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/check",
        id: "check",
        summary: "Every isolation rule against the tenancy (devfence check --json)",
        role: Role::Read,
        params: &[],
        request: None,
        ok: (200, "The findings", Body::Json(schema_of::<CheckAnswer>)),
        errors: &[],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/status",
        id: "status",
        summary: "The ledger's devices, open operations, GUID pool and the SM's health (devfence status --json)",
        role: Role::Read,
        params: &[],
        request: None,
        ok: (200, "The status", Body::Json(schema_of::<StatusAnswer>)),
        errors: &[409],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/tenants",
        id: "tenants",
        summary: "The tenants of the ledger",
        role: Role::Read,
        params: &[],
        request: None,
        ok: (
            200,
            "The tenants",
            Body::Json(schema_of::<Vec<devfence_model::Tenant>>),
        ),
        errors: &[409],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/audit",
        id: "audit_show",
        summary: "Audit records, oldest first (devfence audit show --json)",
        role: Role::Read,
        params: &[DEVICE, TENANT],
        request: None,
        ok: (
            200,
            "The records",
            Body::Json(schema_of::<Vec<devfence_engine::audit::AuditRecord>>),
        ),
        errors: &[400, 409],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/audit/verify",
        id: "audit_verify",
        summary: "Verifies the audit chain and the signed head beside the ledger",
        role: Role::Read,
        params: &[],
        request: None,
        ok: (
            200,
            "Whether the chain is intact",
            Body::Json(schema_of::<AuditVerifyAnswer>),
        ),
        errors: &[409],
    },
    RouteDoc {
        method: "POST",
        path: "/v1/operations",
        id: "operation_start",
        summary: "Starts an assign, handover or release; it runs in the agent whatever the client does",
        role: Role::Act,
        params: &[],
        request: Some(Request::Json(schema_of::<OperationRequest>)),
        ok: (
            202,
            "Accepted: poll the operation",
            Body::Json(schema_of::<OperationAccepted>),
        ),
        errors: &[400, 413],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/operations/{id}",
        id: "operation",
        summary: "An operation: its steps and gates so far, then its result or typed error",
        role: Role::Read,
        params: &[OP_ID],
        request: None,
        ok: (
            200,
            "The operation",
            Body::Json(schema_of::<crate::ops::OpView>),
        ),
        errors: &[404],
    },
    RouteDoc {
        method: "POST",
        path: "/v1/plan",
        id: "plan",
        summary: "The steps and gates an operation would run; nothing is done",
        role: Role::Act,
        params: &[],
        request: Some(Request::Json(schema_of::<PlanRequest>)),
        ok: (200, "The plan", Body::Json(schema_of::<PlanAnswer>)),
        errors: &[400, 404, 409, 413],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/findings",
        id: "findings",
        summary: "Continuous verification: the drift findings now (a drifted Ready device quarantined, an Active one reported) and the last re-verification",
        role: Role::Read,
        params: &[],
        request: None,
        ok: (
            200,
            "The findings",
            Body::Json(schema_of::<crate::watch::FindingsAnswer>),
        ),
        errors: &[],
    },
    RouteDoc {
        method: "POST",
        path: "/v1/recover",
        id: "recover",
        summary: "What devfence recover does: finishes or undoes every operation a crash left unfinished (the body: empty or {}); 409 while the agent runs operations of its own",
        role: Role::Act,
        params: &[],
        request: None,
        ok: (
            200,
            "What was recovered",
            Body::Json(schema_of::<crate::recover::RecoverAnswer>),
        ),
        errors: &[400, 409, 413],
    },
    RouteDoc {
        method: "POST",
        path: "/v1/hook/qemu",
        id: "hook_qemu",
        summary: "The libvirt qemu hook's decision, with its side effects (prepare begin marks the devices Active, all or none)",
        role: Role::Act,
        params: &[
            query("domain", "The domain's name (as libvirt passes it)"),
            query(
                "operation",
                "The hook's operation: prepare, started, release, ...",
            ),
            query("subop", "The hook's sub-operation: begin or end"),
        ],
        request: Some(Request::Raw(
            "application/xml",
            "The domain XML libvirt gives the hook on its stdin (at most 4 MiB; untrusted)",
        )),
        ok: (
            200,
            "The decision",
            Body::Json(schema_of::<devfence_app::hook::Verdict>),
        ),
        errors: &[400, 409, 413],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/events",
        id: "events",
        summary: "Lifecycle changes as JSON lines, streamed; resume with since=ID within the backlog; a consumer that falls behind gets a lagged event and is dropped",
        role: Role::Read,
        params: &[query(
            "since",
            "The last event id seen: the stream starts after it",
        )],
        request: None,
        ok: (
            200,
            "The stream: one event per line",
            Body::Lines(schema_of::<crate::events::Stamped>),
        ),
        errors: &[400],
    },
    RouteDoc {
        method: "POST",
        path: "/v1/state/admit",
        id: "state_admit",
        summary: "Admits a device-state envelope for a device and VM (what devfence state admit --json prints)",
        role: Role::Act,
        params: &[
            query("device", "The device the state is for"),
            query("vm", "The VM it is for"),
        ],
        request: Some(Request::Raw(
            "application/octet-stream",
            "The envelope's bytes (at most 64 MiB; untrusted)",
        )),
        ok: (
            200,
            "The admission (the object state admit --json prints; not yet typed)",
            Body::Json(schema_of::<serde_json::Map<String, Value>>),
        ),
        errors: &[400, 404, 409, 413, 422],
    },
    RouteDoc {
        method: "POST",
        path: "/v1/state/inspect",
        id: "state_inspect",
        summary: "Every check admit would run on an envelope, without admitting (a reader's, though it is a POST)",
        role: Role::Read,
        params: &[
            query("device", "The device it would be admitted for (optional)"),
            query("vm", "The VM (optional, with device)"),
        ],
        request: Some(Request::Raw(
            "application/octet-stream",
            "The envelope's bytes (at most 64 MiB; untrusted)",
        )),
        ok: (
            200,
            "The inspection (the object state inspect --json prints; not yet typed)",
            Body::Json(schema_of::<serde_json::Map<String, Value>>),
        ),
        errors: &[400, 413],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/fleet/status",
        id: "fleet_status",
        summary: "The fabric as the fleet store holds it, read at one etcd revision: leader and fencing token, the controller's last batch, hosts and leases, desired vs observed per host (in sync, pending, mismatch, releasing, orphaned), revoke requests (devfence fleet status --json)",
        role: Role::Read,
        params: &[],
        request: None,
        ok: (
            200,
            "The fleet's status",
            Body::Json(schema_of::<devfence_app::fleet::FleetStatus>),
        ),
        errors: &[503],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/fleet/guid-pool",
        id: "fleet_guid_pool",
        summary: "The fabric's GUID pool in the fleet store: range, cursor, allocated and retired per host, the global index check (devfence fleet guid-pool --json)",
        role: Role::Read,
        params: &[],
        request: None,
        ok: (
            200,
            "The GUID pool",
            Body::Json(schema_of::<devfence_app::fleet::GuidPoolStatus>),
        ),
        errors: &[503],
    },
    RouteDoc {
        method: "POST",
        path: "/v1/fleet/revoke",
        id: "fleet_revoke",
        summary: "Asks the fabric controller to remove a lost host's orphaned membership(s) from the SM (devfence fleet revoke); 409 while the host's lease holds or for a GUID with nothing observed",
        role: Role::Act,
        params: &[],
        request: Some(Request::Json(schema_of::<crate::fleet::RevokeBody>)),
        ok: (
            200,
            "The revoke requests written",
            Body::Json(schema_of::<devfence_app::fleet::RevokeOutcome>),
        ),
        errors: &[400, 409, 413, 503],
    },
    RouteDoc {
        method: "GET",
        path: "/metrics",
        id: "metrics",
        summary: "Prometheus (OpenMetrics) text: devices by state, operations by kind and outcome, gate latency, requests",
        role: Role::Read,
        params: &[],
        request: None,
        ok: (
            200,
            "The metrics",
            Body::Text("application/openmetrics-text"),
        ),
        errors: &[],
    },
];

/// Whether `value` conforms to `schema` (a schema of [`document`], its
/// references resolved in `doc`'s components): the subset of JSON Schema
/// 2020-12 the generator writes (`$ref`, `type`, `properties`, `required`,
/// `additionalProperties`, `items`, `enum`, `const`, `anyOf`, `oneOf`,
/// `allOf`, `prefixItems`, `minItems`, `maxItems`, `uniqueItems`,
/// `propertyNames`, `minimum`, `maximum`). The agent's tests check every answer they
/// get against the document with it, so the document cannot drift from what
/// the handlers send.
///
/// # Errors
/// Where the value departs from the schema (a JSON pointer) and how; a keyword
/// outside the subset is an error too, so the check never passes by ignoring.
/// It is strict: an object may carry only the properties its schema names
/// (unless the schema says what others may be), so an answer cannot grow a
/// field the document does not describe.
pub fn validate(doc: &Value, schema: &Value, value: &Value) -> Result<(), String> {
    validate_at(doc, schema, value, "", 0)
}

fn validate_at(
    doc: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    depth: usize,
) -> Result<(), String> {
    if depth > 64 {
        return Err(format!("{at}: the schema nests deeper than 64"));
    }
    let s = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{at}: nothing is allowed here")),
        Value::Object(m) => m,
        _ => return Err(format!("{at}: the schema is not an object")),
    };
    for (k, v) in s {
        match k.as_str() {
            "$ref" => {
                let name = v
                    .as_str()
                    .and_then(|r| r.strip_prefix("#/components/schemas/"))
                    .ok_or_else(|| format!("{at}: $ref {v} does not point into the components"))?;
                let target = doc["components"]["schemas"]
                    .get(name)
                    .ok_or_else(|| format!("{at}: $ref {name} resolves to nothing"))?;
                validate_at(doc, target, value, at, depth + 1)?;
            }
            "type" => {
                let types: Vec<&str> = match v {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => return Err(format!("{at}: type {v} is not a name or a list")),
                };
                if !types.iter().any(|t| is_type(value, t)) {
                    return Err(format!("{at}: {value} is not of type {v}"));
                }
            }
            "properties" => {
                if let (Value::Object(props), Value::Object(obj)) = (v, value) {
                    for (name, sub) in props {
                        if let Some(x) = obj.get(name) {
                            validate_at(doc, sub, x, &format!("{at}/{name}"), depth + 1)?;
                        }
                    }
                    // Strict: a property the schema does not name is an
                    // error unless the schema says what others may be.
                    if !s.contains_key("additionalProperties")
                        && let Some(name) = obj.keys().find(|n| !props.contains_key(*n))
                    {
                        return Err(format!("{at}: property {name:?} is not documented"));
                    }
                }
            }
            "required" => {
                if let Value::Object(obj) = value {
                    for name in v.as_array().into_iter().flatten().filter_map(Value::as_str) {
                        if !obj.contains_key(name) {
                            return Err(format!("{at}: required {name:?} is missing"));
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Value::Object(obj) = value {
                    let known = s.get("properties").and_then(Value::as_object);
                    for (name, x) in obj {
                        if known.is_some_and(|p| p.contains_key(name)) {
                            continue;
                        }
                        validate_at(doc, v, x, &format!("{at}/{name}"), depth + 1)
                            .map_err(|e| format!("{e} (an undocumented property)"))?;
                    }
                }
            }
            "items" => {
                if let Value::Array(a) = value {
                    for (i, x) in a.iter().enumerate() {
                        validate_at(doc, v, x, &format!("{at}/{i}"), depth + 1)?;
                    }
                }
            }
            "prefixItems" => {
                if let Value::Array(a) = value {
                    for (i, (sub, x)) in v.as_array().into_iter().flatten().zip(a).enumerate() {
                        validate_at(doc, sub, x, &format!("{at}/{i}"), depth + 1)?;
                    }
                }
            }
            "minItems" | "maxItems" => {
                if let (Value::Array(a), Some(n)) = (value, v.as_u64()) {
                    let len = a.len() as u64;
                    if (k == "minItems" && len < n) || (k == "maxItems" && len > n) {
                        return Err(format!("{at}: {len} items is beyond the {k} {n}"));
                    }
                }
            }
            "uniqueItems" => {
                if let (Value::Array(a), Some(true)) = (value, v.as_bool()) {
                    for (i, x) in a.iter().enumerate() {
                        if a[..i].contains(x) {
                            return Err(format!("{at}/{i}: {x} repeats in a set"));
                        }
                    }
                }
            }
            "propertyNames" => {
                if let Value::Object(obj) = value {
                    for name in obj.keys() {
                        validate_at(
                            doc,
                            v,
                            &Value::String(name.clone()),
                            &format!("{at}/{name}"),
                            depth + 1,
                        )?;
                    }
                }
            }
            "enum" => {
                if !v.as_array().is_some_and(|a| a.contains(value)) {
                    return Err(format!("{at}: {value} is not one of {v}"));
                }
            }
            "const" => {
                if v != value {
                    return Err(format!("{at}: {value} is not {v}"));
                }
            }
            "anyOf" | "oneOf" => {
                let subs = v
                    .as_array()
                    .ok_or_else(|| format!("{at}: {k} is not a list"))?;
                let mut errs = Vec::new();
                let mut matched = 0;
                for sub in subs {
                    match validate_at(doc, sub, value, at, depth + 1) {
                        Ok(()) => matched += 1,
                        Err(e) => errs.push(e),
                    }
                }
                if matched == 0 {
                    return Err(format!("{at}: matches none of {k}: {}", errs.join("; ")));
                }
                if k == "oneOf" && matched > 1 {
                    return Err(format!("{at}: matches {matched} of oneOf"));
                }
            }
            "allOf" => {
                for sub in v.as_array().into_iter().flatten() {
                    validate_at(doc, sub, value, at, depth + 1)?;
                }
            }
            "minimum" | "maximum" => {
                if let (Some(n), Some(bound)) = (value.as_f64(), v.as_f64()) {
                    let ok = if k == "minimum" {
                        n >= bound
                    } else {
                        n <= bound
                    };
                    if !ok {
                        return Err(format!("{at}: {value} is beyond the {k} {v}"));
                    }
                }
            }
            "description" | "title" | "format" | "default" | "examples" | "$schema" => {}
            other => return Err(format!("{at}: keyword {other:?} is not checked")),
        }
    }
    Ok(())
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        _ => false,
    }
}

/// The schema `doc` gives the answer of `method route` with `status`: the
/// route's own for its success status, the typed error otherwise (and for a
/// path no route serves); any text for a text answer.
///
/// # Errors
/// The route does not document `status`.
pub fn answer_schema(
    doc: &Value,
    method: &str,
    route: Option<&str>,
    status: u16,
) -> Result<Value, String> {
    let Some(route) = route else {
        return Ok(json!({ "$ref": "#/components/schemas/ApiError" }));
    };
    let r = &doc["paths"][route][method.to_lowercase()]["responses"][status.to_string()];
    if r.is_null() {
        return Err(format!(
            "{method} {route} answered {status}, which it does not document"
        ));
    }
    Ok(match &r["content"]["application/json"]["schema"] {
        Value::Null => json!(true),
        s => s.clone(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn check_answer() -> Value {
        serde_json::to_value(CheckAnswer {
            findings: Vec::new(),
            summary: devfence_app::check::Summary::default(),
            tenancy: None,
            tenancy_from_ledger: false,
            tenancy_file_unread: None,
            notices: vec!["n".into()],
            inventory: crate::watch::InventorySource {
                source: "walk",
                generation: 1,
                age_ms: 0,
            },
        })
        .unwrap()
    }

    #[test]
    fn an_answer_conforms_and_each_departure_is_named() {
        let doc = document();
        let schema = answer_schema(&doc, "GET", Some("/v1/check"), 200).unwrap();
        let good = check_answer();
        validate(&doc, &schema, &good).unwrap();

        let mut extra = good.clone();
        extra["surprise"] = json!(1);
        let e = validate(&doc, &schema, &extra).unwrap_err();
        assert!(e.contains("\"surprise\" is not documented"), "{e}");

        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("summary");
        let e = validate(&doc, &schema, &missing).unwrap_err();
        assert!(e.contains("required \"summary\""), "{e}");

        let mut wrong = good.clone();
        wrong["notices"] = json!([7]);
        let e = validate(&doc, &schema, &wrong).unwrap_err();
        assert!(e.contains("/notices/0"), "{e}");

        let mut neg = good;
        neg["summary"]["errors"] = json!(-1);
        assert!(validate(&doc, &schema, &neg).is_err());
    }

    #[test]
    fn errors_enums_and_undocumented_statuses() {
        let doc = document();
        let err = answer_schema(&doc, "GET", None, 404).unwrap();
        let body = serde_json::to_value(ApiError::bad_input("Bad. Hint: fix it")).unwrap();
        validate(&doc, &err, &body).unwrap();
        let mut odd = body;
        odd["code"] = json!("made_up");
        assert!(
            validate(&doc, &err, &odd)
                .unwrap_err()
                .contains("not one of")
        );
        let e = answer_schema(&doc, "GET", Some("/v1/check"), 418).unwrap_err();
        assert!(e.contains("does not document"), "{e}");
        // A keyword the checker does not know is an error, not a pass.
        let e = validate(&doc, &json!({ "pattern": "^a" }), &json!("b")).unwrap_err();
        assert!(e.contains("not checked"), "{e}");
    }

    /// Every code the agent's sources pair with a status
    /// (`StatusCode::X, "code"`) is in [`ERROR_CODES`], so the document's
    /// enum names every code an answer can carry.
    #[test]
    fn every_error_code_the_agent_answers_is_documented() {
        let mut seen = 0;
        for src in [
            include_str!("api.rs"),
            include_str!("auth.rs"),
            include_str!("ops.rs"),
            include_str!("lib.rs"),
        ] {
            let mut rest = src;
            while let Some(i) = rest.find("StatusCode::") {
                rest = &rest[i + "StatusCode::".len()..];
                let after = rest.trim_start_matches(|c: char| c.is_ascii_uppercase() || c == '_');
                let Some(lit) = after.trim_start().strip_prefix(',') else {
                    continue;
                };
                let Some(lit) = lit.trim_start().strip_prefix('"') else {
                    continue;
                };
                let code = &lit[..lit.find('"').unwrap()];
                assert!(
                    ERROR_CODES.contains(&code),
                    "code {code:?} is not in ERROR_CODES"
                );
                seen += 1;
            }
        }
        assert!(seen >= 10, "only {seen} codes found: the scan is broken");
    }
}
