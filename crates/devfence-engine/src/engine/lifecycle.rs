//! The lifecycle's vocabulary, defined once: every step and gate a procedure
//! runs, with the journal name it is recorded under and what it does. Both
//! [`super::Engine::plan`] and the procedures that act take their names and
//! descriptions from here, so a plan cannot drift from what runs.

use serde_json::Value;

/// A step that acts (journalled planned, then done or failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Remove the device-state payloads admitted for the device.
    StateVoid,
    /// Remove an mdev.
    MdevRemove,
    /// Give the group node back to root.
    NodeRevoke,
    /// Remove an undelivered VF token file.
    TokenWithdraw,
    /// Reset the function.
    Reset,
    /// Retire the device's GUIDs in the pool.
    GuidRetire,
    /// Remove the old GUIDs from every partition at the SM.
    FabricRevoke,
    /// Create an mdev with a fresh UUID.
    MdevCreate,
    /// Allocate a GUID never issued before.
    GuidAllocate,
    /// Bind an IB VF to its host driver.
    BindHostDriver,
    /// Set an IB VF's GUIDs.
    GuidSet,
    /// Add the new GUID to the tenant's partitions at the SM.
    FabricGrant,
    /// Remove the old GUIDs from every partition and add the new GUID to the
    /// tenant's partitions at the SM, in one apply (one sweep).
    FabricMove,
    /// Take custody of the PF and set a fresh VF token.
    TokenSet,
    /// Hand the token to the tenant's launcher.
    TokenDeliver,
    /// Bind the function to vfio-pci.
    BindVfio,
    /// Give the group node to the tenant's launcher.
    NodeGrant,
    /// Read (and journal) a vfio_ap matrix mdev's matrix before it is removed.
    ApMatrixRead,
    /// Give the old matrix to the new vfio_ap matrix mdev.
    ApMatrixAssign,
}

impl Step {
    /// Every step.
    pub const ALL: [Step; 19] = [
        Step::StateVoid,
        Step::MdevRemove,
        Step::NodeRevoke,
        Step::TokenWithdraw,
        Step::Reset,
        Step::GuidRetire,
        Step::FabricRevoke,
        Step::MdevCreate,
        Step::GuidAllocate,
        Step::BindHostDriver,
        Step::GuidSet,
        Step::FabricGrant,
        Step::FabricMove,
        Step::TokenSet,
        Step::TokenDeliver,
        Step::BindVfio,
        Step::NodeGrant,
        Step::ApMatrixRead,
        Step::ApMatrixAssign,
    ];

    /// The name the journal records.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Step::StateVoid => "state-void",
            Step::MdevRemove => "mdev-remove",
            Step::NodeRevoke => "node-revoke",
            Step::TokenWithdraw => "token-withdraw",
            Step::Reset => "reset",
            Step::GuidRetire => "guid-retire",
            Step::FabricRevoke => "fabric-revoke",
            Step::MdevCreate => "mdev-create",
            Step::GuidAllocate => "guid-allocate",
            Step::BindHostDriver => "bind-host-driver",
            Step::GuidSet => "guid-set",
            Step::FabricGrant => "fabric-grant",
            Step::FabricMove => "fabric-move",
            Step::TokenSet => "token-set",
            Step::TokenDeliver => "token-deliver",
            Step::BindVfio => "bind-vfio",
            Step::NodeGrant => "node-grant",
            Step::ApMatrixRead => "ap-matrix-read",
            Step::ApMatrixAssign => "ap-matrix-assign",
        }
    }

    /// What it does (the plan's line).
    #[must_use]
    pub const fn what(self) -> &'static str {
        match self {
            Step::StateVoid => {
                "remove the device-state payloads admitted for the device (never delivered to the next VM)"
            }
            Step::MdevRemove => "remove the mdev (its UUID is never used again)",
            Step::NodeRevoke => {
                "give /dev/vfio/<group> back to root:root 0600 (the old launcher loses access)"
            }
            Step::TokenWithdraw => "remove any undelivered VF token file",
            Step::Reset => "reset the function and read its config space back",
            Step::GuidRetire => "retire the old GUIDs in the pool (never reissued)",
            Step::FabricRevoke => "remove the old GUIDs from every partition at the SM and apply",
            Step::MdevCreate => "create an mdev of the same type with a fresh UUID",
            Step::GuidAllocate => "allocate a GUID never issued before",
            Step::BindHostDriver => {
                "bind the VF to its host driver (a new GUID takes effect there)"
            }
            Step::GuidSet => "set the VF's node and port GUID, rebind, read the port GUID back",
            Step::FabricGrant => "add the new GUID to the tenant's partitions at the SM and apply",
            Step::FabricMove => {
                "remove the old GUIDs from every partition and add the new GUID to the tenant's partitions at the SM, one apply (one sweep)"
            }
            Step::TokenSet => "take custody of the PF and set a fresh random VF token",
            Step::TokenDeliver => {
                "hand the token to the tenant's launcher only (0600 file in the runtime directory)"
            }
            Step::BindVfio => "bind the function to vfio-pci",
            Step::NodeGrant => "give /dev/vfio/<group> to the tenant's launcher",
            Step::ApMatrixRead => {
                "read the matrix mdev's adapters, domains and control domains (journalled before the remove)"
            }
            Step::ApMatrixAssign => {
                "assign the old matrix's adapters, domains and control domains to the new mdev"
            }
        }
    }
}

/// A gate: a read-back that must pass before the operation goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gate {
    /// The group node is root's again.
    NodeRevoked,
    /// The SM shows the old GUIDs in no partition.
    FabricRevoked,
    /// The new mdev exists.
    MdevPresent,
    /// The SM shows the grant and the revocations.
    SmVerified,
    /// The VF's port carries the tenant's P_Keys and nobody else's.
    PortPkeys,
    /// The token file is the launcher's, 0600.
    TokenDelivered,
    /// The function is bound to vfio-pci.
    Driver,
    /// The isolation rules pass for the device's group.
    GroupRules,
    /// The group node is the launcher's, with the configured mode.
    NodeOwner,
    /// The new matrix mdev holds exactly the old matrix.
    ApMatrix,
}

impl Gate {
    /// Every gate.
    pub const ALL: [Gate; 10] = [
        Gate::NodeRevoked,
        Gate::FabricRevoked,
        Gate::MdevPresent,
        Gate::SmVerified,
        Gate::PortPkeys,
        Gate::TokenDelivered,
        Gate::Driver,
        Gate::GroupRules,
        Gate::NodeOwner,
        Gate::ApMatrix,
    ];

    /// The gate's name (the journal records it as `gate:<name>`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Gate::NodeRevoked => "node-revoked",
            Gate::FabricRevoked => "fabric-revoked",
            Gate::MdevPresent => "mdev-present",
            Gate::SmVerified => "sm-verified",
            Gate::PortPkeys => "port-pkeys",
            Gate::TokenDelivered => "token-delivered",
            Gate::Driver => "driver",
            Gate::GroupRules => "group-rules",
            Gate::NodeOwner => "node-owner",
            Gate::ApMatrix => "ap-matrix",
        }
    }

    /// The name the journal records.
    #[must_use]
    pub fn journal_name(self) -> String {
        format!("gate:{}", self.name())
    }

    /// What it checks (the plan's line).
    #[must_use]
    pub const fn what(self) -> &'static str {
        match self {
            Gate::NodeRevoked => "stat the node: owned by root",
            Gate::FabricRevoked => {
                "read back from the SM: old GUIDs in no tenant's partition, the sweep after the change done"
            }
            Gate::MdevPresent => "read back /sys/bus/mdev/devices/<uuid>",
            Gate::SmVerified => {
                "read back from the SM: old GUIDs revoked, new GUID in exactly the tenant's partitions, sweep done"
            }
            Gate::PortPkeys => {
                "read the VF's P_Key table at the port: the tenant's P_Keys, nobody else's"
            }
            Gate::TokenDelivered => "stat the token file: owned by the launcher, mode 0600",
            Gate::Driver => "read the driver link back: vfio-pci",
            Gate::GroupRules => {
                "the isolation rules pass for the device's IOMMU group with the new tenant"
            }
            Gate::NodeOwner => "stat the node: owned by the launcher, mode 0600",
            Gate::ApMatrix => "read back matrix and control_domains: exactly the old ones",
        }
    }
}

/// Why a gate did not pass: the reason, the evidence read, what to do.
#[derive(Clone, Debug, PartialEq)]
pub struct GateFailure {
    /// Why, one sentence.
    pub reason: String,
    /// What was read back.
    pub evidence: Value,
    /// What the operator can do.
    pub hint: String,
}

impl GateFailure {
    /// A failure with its reason, evidence and hint.
    #[must_use]
    pub fn new(reason: String, evidence: Value, hint: String) -> Self {
        Self {
            reason,
            evidence,
            hint,
        }
    }
}

/// What an operation does to its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// A free device to a tenant.
    Assign,
    /// A device from one tenant to another.
    Handover,
    /// A device back to free.
    Release,
    /// An interrupted operation scrubbed.
    Recover,
}

impl OpKind {
    /// The name the ledger records.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::Assign => "assign",
            OpKind::Handover => "handover",
            OpKind::Release => "release",
            OpKind::Recover => "recover",
        }
    }
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The journal tells steps apart by name alone: every step and gate has its
    /// own, in the journal's form, and a description for the plan.
    #[test]
    fn every_step_and_gate_has_its_own_journal_name() {
        let mut names = BTreeSet::new();
        for s in Step::ALL {
            assert!(names.insert(s.name().to_owned()), "{s:?} repeats a name");
            assert!(!s.what().is_empty());
        }
        for g in Gate::ALL {
            assert!(names.insert(g.journal_name()), "{g:?} repeats a name");
            assert!(g.journal_name().starts_with("gate:"));
            assert!(!g.what().is_empty());
        }
        for n in &names {
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-' || b == b':'),
                "{n}"
            );
        }
        assert_eq!(names.len(), Step::ALL.len() + Gate::ALL.len());
    }
}
