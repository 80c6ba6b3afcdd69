//! `devfence fleet …`: the fleet as etcd holds it (issue 13 items 5 and 6) —
//! status, the GUID pool, and the operator's revoke of a lost host's
//! orphaned memberships. The CLI and the agent share these.
//!
//! Everything here needs the fleet store: without `[fleet]` it is a
//! configuration error naming the section; with etcd unreachable it fails
//! closed (the error lists the endpoints and a hint). Nothing here touches
//! the host's ledger.

use devfence_fleet::Fleet;
pub use devfence_fleet::FleetSettings;
use devfence_fleet::status::RevokeError;
pub use devfence_fleet::status::{
    FleetStatus, GuidPoolStatus, MembershipState, MembershipStatus, RevokeOutcome, RevokeTarget,
};
pub use devfence_fleet::value::Name;
use devfence_model::Guid;

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
/// # Errors
/// A refusal, a bad actor, the fleet store unreachable.
pub fn revoke(
    f: &Fleet,
    host: &Name,
    target: RevokeTarget,
    actor: &Actor,
) -> Result<RevokeOutcome> {
    f.request_revoke(host, target, &actor_label(actor))
        .map_err(|e| match e {
            RevokeError::Fleet(e) => AppError::from(e),
            RevokeError::Invalid(m) => AppError::Invalid(m),
            refused => AppError::Held(refused.to_string()),
        })
}
