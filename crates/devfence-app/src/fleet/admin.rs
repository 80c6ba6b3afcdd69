//! `devfence fleet …`: the fleet as etcd holds it (issue 13 items 5 and 6) —
//! status, the GUID pool, and the operator's revoke of a lost host's
//! orphaned memberships. The CLI and the agent share these.
//!
//! Everything here needs the fleet store: without `[fleet]` it is a
//! configuration error naming the section; with etcd unreachable it fails
//! closed (the error lists the endpoints and a hint). The host's ledger is
//! touched only by a revoke, which is recorded in its audit chain.

use devfence_fleet::Fleet;
pub use devfence_fleet::FleetSettings;
use devfence_fleet::status::RevokeError;
pub use devfence_fleet::status::{
    FleetStatus, GuidPoolStatus, MembershipState, MembershipStatus, RevokeOutcome, RevokeTarget,
};
pub use devfence_fleet::value::Name;
use devfence_model::Guid;

use devfence_engine::{AuditEvent, AuditKind, SqliteStore, StoreExt as _};

use crate::config::{Config, ConfigError};
use crate::{Actor, AppError, Result};

/// The checked `[fleet]` of `config`.
///
/// # Errors
/// No `[fleet]` section (naming the file and the section, with a hint).
pub fn settings(config: &Config, what: &str) -> Result<FleetSettings> {
    let file = config.source.as_ref().map_or_else(
        || "the configuration (no devfence.toml was found)".to_owned(),
        |p| p.display().to_string(),
    );
    let Some(f) = &config.fleet else {
        return Err(AppError::Config(ConfigError::Invalid(format!(
            "{what} needs the fleet store, but {file} has no [fleet] section. Hint: add [fleet] with backend = \"etcd\", endpoints, ca and fabric (docs/fleet.md, devfence.toml(5)), or give --config FILE"
        ))));
    };
    // Checked when the file was read; checked again for a Config built in code.
    f.check()
        .map_err(|e| AppError::Config(ConfigError::Invalid(format!("{file}: [fleet] {e}"))))
}

/// Connects to the fleet store `config` names (lazily: no member need answer
/// yet; the first read fails closed if none does).
///
/// # Errors
/// As [`settings`]; a TLS file that cannot be read.
pub fn connect(config: &Config, what: &str) -> Result<Fleet> {
    Ok(Fleet::connect(settings(config, what)?)?)
}

/// A host name as the fleet writes it.
///
/// # Errors
/// Not a name (the error says what a name is).
pub fn parse_host(s: &str) -> Result<Name> {
    s.parse::<Name>()
        .map_err(|e| AppError::invalid(format!("Host {e}")))
}

/// A port GUID.
///
/// # Errors
/// Not a GUID, or a reserved one (with a hint).
pub fn parse_guid(s: &str) -> Result<Guid> {
    let g: Guid = s.parse().map_err(|e| {
        AppError::invalid(format!(
            "{e}. Hint: give the port GUID as `devfence fleet status` lists it, e.g. 0x0002c90300000001"
        ))
    })?;
    if g.is_reserved() {
        return Err(AppError::invalid(format!(
            "GUID {g} is reserved and never names a port. Hint: give the port GUID as `devfence fleet status` lists it"
        )));
    }
    Ok(g)
}

/// The fabric now: leader, controller, hosts and leases, desired against
/// observed per host, orphaned memberships, revoke requests.
///
/// # Errors
/// The fleet store is unreachable (fail closed) or holds a bad value.
pub fn status(f: &Fleet) -> Result<FleetStatus> {
    Ok(f.status()?)
}

/// The fabric's GUID pool: range, cursor, counts per host, index check.
///
/// # Errors
/// As [`status`].
pub fn guid_pool(f: &Fleet) -> Result<GuidPoolStatus> {
    Ok(f.guid_pool()?)
}

/// How an actor is recorded in a revoke request.
#[must_use]
pub fn actor_label(a: &Actor) -> String {
    format!("uid {} via {}", a.uid, a.via)
}

/// Asks the fabric controller to take a lost host's orphaned membership(s)
/// out of the SM (docs/fleet.md, "Host loss"). A refusal (the host is alive,
/// nothing observed to revoke) is a rule's refusal ([`AppError::Held`]).
///
/// Every request is in this host's audit chain (`store`) with its actor: a
/// written request as a `fleet` record (`fleet:revoke`, the GUIDs requested
/// and the etcd revision), a refusal or a failure as a `refusal` record. The
/// ledger is opened by the caller before etcd is asked, so a request is never
/// written to etcd by a process that cannot record it.
///
/// # Errors
/// A refusal, a bad actor, the fleet store unreachable, the audit record not
/// written (the message says whether the request was).
pub fn revoke(
    store: &mut SqliteStore,
    f: &Fleet,
    host: &Name,
    target: RevokeTarget,
    actor: &Actor,
) -> Result<RevokeOutcome> {
    let asked = match target {
        RevokeTarget::Guid(g) => serde_json::json!(g.to_string()),
        RevokeTarget::All => serde_json::json!("all"),
    };
    let who = serde_json::to_value(actor).unwrap_or(serde_json::Value::Null);
    let result = f
        .request_revoke(host, target, &actor_label(actor))
        .map_err(|e| match e {
            RevokeError::Fleet(e) => AppError::from(e),
            RevokeError::Invalid(m) => AppError::Invalid(m),
            refused => AppError::Held(refused.to_string()),
        });
    let event = match &result {
        Ok(r) => AuditEvent {
            kind: AuditKind::Fleet,
            device: None,
            tenant: None,
            detail: serde_json::json!({
                "action": "revoke", "fabric": r.fabric, "host": host, "target": asked,
                "requested": r.requested, "already_requested": r.already_requested,
                "revision": r.revision, "actor": who,
            }),
        },
        Err(e) => AuditEvent {
            kind: AuditKind::Refusal,
            device: None,
            tenant: None,
            detail: serde_json::json!({
                "action": "fleet-revoke", "fabric": f.store().fabric(), "host": host,
                "target": asked, "outcome": if matches!(e, AppError::Held(_)) { "refused" } else { "failed" },
                "error": e.to_string(), "actor": who,
            }),
        },
    };
    let recorded = store.atomically(|tx| tx.audit(&event));
    match (result, recorded) {
        (result, Ok(_)) => result,
        (Ok(r), Err(e)) => Err(AppError::invalid(format!(
            "The revoke request for host {host} was written to etcd (revision {}, GUIDs {:?}) but its audit record was not: {e}. Hint: `devfence audit verify`; the request itself stands (`devfence fleet status` lists it)",
            r.revision,
            r.requested
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        ))),
        (Err(e), Err(_)) => Err(e),
    }
}
