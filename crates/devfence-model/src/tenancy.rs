//! Tenancy: who holds what. Until the ledger exists, a TOML file declares it
//! (`devfence check --tenancy FILE`); later the ledger produces the same value.

use crate::ids::{DeviceId, Membership, PKey, TenantId};

/// The whole declaration.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct Tenancy {
    /// The tenants.
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<Tenant>,
    /// Which tenant holds which device.
    #[serde(default, rename = "assignment")]
    pub assignments: Vec<Assignment>,
    /// PFs driven from user space on behalf of a tenant (PF custody).
    #[serde(default, rename = "userspace_pf")]
    pub userspace_pfs: Vec<Assignment>,
    /// mdev parents whose instances are not isolated from each other.
    #[serde(default, rename = "non_isolating_parent")]
    pub non_isolating_parents: Vec<NonIsolatingParent>,
    /// User-space PFs whose custody devfence itself holds (it set their VF token
    /// for the VFs it assigned), as its ledger records them. Never read from a
    /// tenancy file: only the ledger knows what devfence did.
    #[serde(skip)]
    pub host_custody: Vec<DeviceId>,
}

/// A tenant.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Its id.
    pub id: TenantId,
    /// Owner expected on the tenant's `/dev/vfio` nodes.
    pub launcher_uid: Option<u32>,
    /// Group of the tenant's launcher.
    pub launcher_gid: Option<u32>,
    /// The SELinux label expected on the tenant's nodes, if labels are used.
    pub security_label: Option<String>,
    /// The tenant's IB partitions.
    #[serde(default)]
    pub partitions: Vec<Partition>,
}

/// One IB partition of a tenant.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// The P_Key (membership bit ignored; `membership` says it).
    pub pkey: PKey,
    /// Full or limited.
    pub membership: Membership,
}

/// A device held by a tenant.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// A BDF, an mdev UUID, an APQN or an IB GUID.
    pub device: DeviceId,
    /// The tenant.
    pub tenant: TenantId,
}

/// An mdev parent that does not isolate its instances.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct NonIsolatingParent {
    /// The parent device name (a BDF).
    pub device: String,
}

impl Tenancy {
    /// The tenant with `id`.
    #[must_use]
    pub fn tenant(&self, id: &TenantId) -> Option<&Tenant> {
        self.tenants.iter().find(|t| &t.id == id)
    }
}
