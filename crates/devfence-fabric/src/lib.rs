//! The InfiniBand fabric seam of devfence.
//!
//! An IB VF's port GUID is part of a tenant's identity: the subnet manager (SM)
//! decides which partitions (P_Keys) it may use. When a VF moves from tenant A to
//! tenant B, B's VM may start only once the SM is *seen* to have taken the old GUID
//! out of A's partitions, put the fresh GUID into exactly B's, and finished the
//! sweep that did it (docs/design.md §1 L1). Until the SM has swept, a port can still
//! carry A's membership — a race that is rare, so tests "pass"; devfence closes it
//! by reading back, never by waiting.
//!
//! - [`SubnetManager`]: the seam every backend fits — stage changes, [`apply`]
//!   them for a [`Ticket`], [`observe`] what the SM programmed, [`health`].
//! - [`verify`]: the three questions of every handover answered from one
//!   [`Observation`], with a [`Verdict`] that names the failed question and its
//!   evidence; [`wait_verified`] polls it until a deadline.
//! - [`SimSm`]: the embedded simulated SM with a controllable clock and fault knobs
//!   (lag, lost updates, stale reads, failed sweeps, errors, reordering, freeze).
//! - [`PersistentSimSm`]: a `SimSm` whose state lives in a file, as the SM it stands
//!   for outlives each devfence process.
//!
//! This crate knows nothing of PCI: it speaks of port GUIDs and partitions only.
//!
//! [`apply`]: SubnetManager::apply
//! [`observe`]: SubnetManager::observe
//! [`health`]: SubnetManager::health

mod error;
pub mod opensm;
mod ports;
pub mod posture;
pub mod sim;
mod sm;
mod types;
pub mod ufm;
mod verify;

pub use error::FabricError;
pub use opensm::{OpenSmConfig, OpenSmSm};
pub use ports::PortReader;
pub use sim::{PersistentSimSm, SimConfig, SimSm, SimSmState, SimStateError};
pub use sm::SubnetManager;
pub use types::{
    Change, ChangeId, Generation, Health, MembershipMap, Observation, PartitionKey, PortView,
    Programmed, SmState, SmStatus, SweepOutcome, Ticket,
};
pub use ufm::{UfmConfig, UfmSm};
pub use verify::{
    Evidence, Expectation, Failure, Grant, NotVerified, Pace, Proof, Question, Revocation,
    Unverified, Verdict, View, verify, wait_verified, wait_verified_with,
};
