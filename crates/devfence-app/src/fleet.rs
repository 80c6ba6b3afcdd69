//! The host side of a fleet (issue 13 items 1 and 3): fresh IB port GUIDs
//! from the fabric's shared pool in etcd ([`FleetGuids`], the engine's
//! [`GuidSource`]) and the fleet backend of the subnet manager
//! ([`devfence_fleet::sm::FleetSm`]: desired memberships in etcd, gates that
//! need the controller's observed entries **and** the SA to agree).
//!
//! Fail closed: when etcd cannot be reached (or this host's lease is lost), an
//! IB VF's assign, handover or release is refused before its operation opens;
//! the host's read-only commands (status, inventory, check from the ledger,
//! audit) never touch the fleet.

use devfence_engine::engine::{GuidSource, GuidSourceError};
use devfence_fleet::sm::FleetSm;
use devfence_fleet::value::Name;
use devfence_fleet::{Fleet, FleetError};
use devfence_model::Guid;

/// The engine's [`GuidSource`] over the fleet's GUID pool: `allocate_guids`
/// (a block of the range reserved per client, each GUID claimed for this host
/// by transaction, never issued to another host) and `release_guid` (retired,
/// never reissued).
#[derive(Debug)]
pub struct FleetGuids<'a> {
    fleet: &'a Fleet,
    host: Name,
    sm: Option<&'a FleetSm>,
}

impl<'a> FleetGuids<'a> {
    /// GUIDs for `host` from `fleet`'s pool.
    #[must_use]
    pub fn new(fleet: &'a Fleet, host: Name) -> Self {
        Self {
            fleet,
            host,
            sm: None,
        }
    }

    /// GUIDs for the host of `sm` (its fleet backend): its preflight also
    /// refuses while the host's lease is lost.
    #[must_use]
    pub fn of(sm: &'a FleetSm) -> Self {
        Self {
            fleet: sm.fleet(),
            host: sm.host().clone(),
            sm: Some(sm),
        }
    }
}

/// The hint for a fleet error, beyond the fleet store's own.
fn hint_of(e: &FleetError) -> String {
    match e {
        FleetError::Unavailable { .. } | FleetError::TlsRefused { .. } => "the fleet's shared facts (the GUID pool, the desired memberships) cannot be reached: the operation fails closed: nothing that needs them proceeds; the host's read-only commands (status, inventory, check, audit) still work from the ledger. Retry when `etcdctl endpoint health --cluster` is healthy".into(),
        FleetError::LeaseLost { .. } => "the host agent registers the host again (restart `devfence serve`); until then operations that need the fleet are refused".into(),
        FleetError::PoolExhausted { .. } => "the fabric's GUID pool is used up; GUIDs are never reissued".into(),
        _ => "see docs/fleet.md (host side: failure modes)".into(),
    }
}

fn source_err(e: FleetError) -> GuidSourceError {
    GuidSourceError {
        message: e.to_string(),
        hint: hint_of(&e),
        source: Some(Box::new(e)),
    }
}

impl GuidSource for FleetGuids<'_> {
    fn describe(&self) -> String {
        format!(
            "the fleet's GUID pool of fabric {} (host {})",
            self.fleet.store().fabric(),
            self.host
        )
    }

    fn ready(&self) -> Result<(), GuidSourceError> {
        match self.sm {
            Some(sm) => sm.ready().map_err(source_err),
            None => self
                .fleet
                .block_on(self.fleet.store().revision())
                .map(|_| ())
                .map_err(source_err),
        }
    }

    fn fresh(&self) -> Result<Guid, GuidSourceError> {
        let got = self
            .fleet
            .allocate_guids(&self.host, 1)
            .map_err(source_err)?;
        got.first().copied().ok_or_else(|| GuidSourceError {
            message: format!("{} answered no GUID", self.describe()),
            hint: "retry; a GUID claimed but not answered stays this host's and is never reissued"
                .into(),
            source: None,
        })
    }

    fn retire(&self, guid: Guid) -> Result<(), GuidSourceError> {
        match self.fleet.release_guid(&self.host, guid) {
            Ok(()) | Err(FleetError::GuidNotAllocated { .. }) => Ok(()),
            Err(e) => Err(source_err(e)),
        }
    }
}
