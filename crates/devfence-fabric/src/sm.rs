//! The [`SubnetManager`] seam.

use devfence_model::{Guid, Membership};

use crate::posture::Configured;
use crate::{Change, FabricError, Health, MembershipMap, Observation, PartitionKey, Ticket};

/// A subnet manager as devfence drives it: stage membership changes, push them in
/// one [`apply`](Self::apply), and **read back** what the SM programmed.
///
/// The seam is deliberately small so that every backend fits it unchanged:
///
/// | method | simulated SM | OpenSM | UFM |
/// |---|---|---|---|
/// | `stage` | kept in memory | kept in memory | kept in memory |
/// | `apply` | staged → configured, sweep requested | render the owned partitions, validate with the same grammar, atomic replace, SIGHUP; generation = `SUBNET UP` count after the log offset (+1, or +2 if a sweep was running) | `POST /resources/pkeys` (membership, index0), `POST /actions/remove_guids_from_pkey` |
/// | `observe` | snapshot (or a stale one, on request) | sminfo/log for status first, then per GUID: GUID→LID record, PKeyTableRecord of that LID | `GET /resources/pkeys?guids_data=true` (configured), port tables via SA |
/// | `health` | knobs | sminfo state, log markers | `GET /app/ufm_version` |
///
/// Nothing here sleeps or decides; deciding is [`verify`](crate::verify), a pure
/// function over an [`Observation`], and waiting is
/// [`wait_verified`](crate::wait_verified), whose polling pace is not part of
/// correctness.
///
/// Calls take `&self`: a backend is shared between the engine's workers (and, in a
/// fleet, by the fabric controller batching many hosts into one sweep). Staged
/// changes are the backend's one batch: whoever applies, applies them all.
pub trait SubnetManager: Send + Sync {
    /// Which backend this is ("sim", "opensm", "ufm"), for evidence and audit.
    fn backend(&self) -> &str;

    /// Stages one membership change; nothing reaches the SM until
    /// [`apply`](Self::apply).
    ///
    /// # Errors
    /// [`FabricError::ReservedGuid`] for a zero or all-ones GUID (nothing is staged);
    /// backend errors.
    fn stage(&self, change: Change) -> Result<(), FabricError>;

    /// Drops every staged change that was not applied; returns how many.
    fn discard_staged(&self) -> usize;

    /// Pushes every staged change to the SM in one batch and asks it to sweep.
    /// Applying with nothing staged still asks for a sweep (a re-sweep, e.g. after
    /// a GUID rotation) and returns a ticket for it.
    ///
    /// The returned [`Ticket`] is a promise to look for, not a proof: only an
    /// observation at its generation or later, passed through
    /// [`verify`](crate::verify), says the change took effect.
    ///
    /// # Errors
    /// Backend errors; on error the staged changes stay staged.
    fn apply(&self) -> Result<Ticket, FabricError>;

    /// Reads back the SM's current view: its status first, then, for each of
    /// `guids`, what it programmed on that port and (where it can tell) the
    /// configured membership.
    ///
    /// # Errors
    /// Backend errors (unreachable, timeout, malformed reply).
    fn observe(&self, guids: &[Guid]) -> Result<Observation, FabricError>;

    /// The SM's health: role, last sweep, version.
    ///
    /// # Errors
    /// Backend errors.
    fn health(&self) -> Result<Health, FabricError>;

    /// The memberships the SM's configuration states, for `check --fabric`
    /// ([`posture`](crate::posture::posture)); `None` when the backend cannot
    /// list them.
    ///
    /// # Errors
    /// Backend errors.
    fn configured_members(&self) -> Result<Option<Vec<Configured>>, FabricError> {
        Ok(None)
    }

    /// The restores of the SM's configuration this backend made and persisted
    /// (oldest first): devfence records each once in the ledger's audit chain and
    /// re-verifies its devices after it. A backend that never restores has none.
    ///
    /// # Errors
    /// The backend's persisted state cannot be read.
    fn persisted_restores(&self) -> Result<Vec<crate::opensm::RestoreNote>, FabricError> {
        Ok(Vec::new())
    }

    /// Sets the fencing token of a fabric controller (the create revision of
    /// its etcd leader key): from now on every apply writes it where the SM's
    /// configuration keeps it, and refuses when the SM already holds a higher
    /// one (a newer leader applied). Returns `false` when the backend cannot
    /// carry a token (UFM: docs/fleet.md, limitations).
    ///
    /// # Errors
    /// A token the backend refuses (0).
    fn set_fence_token(&self, token: u64) -> Result<bool, FabricError> {
        let _ = token;
        Ok(false)
    }

    /// The fencing token the SM's configuration holds now (`None`: none, or
    /// the backend cannot carry one). A controller reads it back before it
    /// publishes what it applied.
    ///
    /// # Errors
    /// Backend errors; a token that cannot be read.
    fn fence_token(&self) -> Result<Option<u64>, FabricError> {
        Ok(None)
    }

    /// Stages: make `guid` a member of `partition` with `membership`.
    ///
    /// # Errors
    /// As [`stage`](Self::stage).
    fn stage_add(
        &self,
        guid: Guid,
        partition: PartitionKey,
        membership: Membership,
    ) -> Result<(), FabricError> {
        self.stage(Change::Add {
            guid,
            partition,
            membership,
        })
    }

    /// Stages: take `guid` out of `partition`.
    ///
    /// # Errors
    /// As [`stage`](Self::stage).
    fn stage_remove(&self, guid: Guid, partition: PartitionKey) -> Result<(), FabricError> {
        self.stage(Change::Remove { guid, partition })
    }

    /// Stages: take `guid` out of every partition devfence manages.
    ///
    /// # Errors
    /// As [`stage`](Self::stage).
    fn stage_remove_all(&self, guid: Guid) -> Result<(), FabricError> {
        self.stage(Change::RemoveAll { guid })
    }

    /// Stages: replace the whole membership devfence manages.
    ///
    /// # Errors
    /// As [`stage`](Self::stage).
    fn stage_desired(&self, desired: MembershipMap) -> Result<(), FabricError> {
        self.stage(Change::Replace(desired))
    }
}
