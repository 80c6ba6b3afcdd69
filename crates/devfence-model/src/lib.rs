//! Plain domain types of devfence.
//!
//! devfence hands passthrough devices — PCI functions, mediated devices, s390 AP
//! queues and InfiniBand VFs — from one tenant to the next. This crate names those
//! things ([`Bdf`], [`Guid`], [`PKey`], [`Apqn`], [`MdevUuid`], [`TenantId`],
//! [`DeviceId`]), describes what a host has ([`Inventory`]), who holds what
//! ([`Tenancy`]) and what the isolation rules report ([`Finding`]). It does no I/O:
//! parsing happens once at the edge, and inside, a value of a type is valid by
//! construction. The one exception is [`bounded`], the bounded file read every crate
//! uses, so that no file devfence reads can block it or grow it without limit.

pub mod bounded;
pub mod finding;
pub mod ids;
pub mod inventory;
pub mod tenancy;

pub use finding::{Evidence, Finding, Severity, Subject};
pub use ids::{
    ApMask, Apqn, Bdf, DeviceId, Guid, IommuGroupId, MdevUuid, Membership, PKey, ParseError,
    TenantId, make_uuid_v4,
};
pub use inventory::*;
pub use tenancy::{Assignment, NonIsolatingParent, Partition, Tenancy, Tenant};
