//! The rules. Each submodule holds the rules of one area; each rule is a function
//! `fn(&Ctx, &mut Vec<Finding>)`.

mod ap;
mod groups;
mod ib;
mod input;
mod pci;

use devfence_model::{Evidence, Finding, Severity};

use crate::ctx::Ctx;

/// Rule id: an assignment names a device the host does not have.
pub(crate) const TENANCY_UNKNOWN_DEVICE: &str = "TENANCY-UNKNOWN-DEVICE";
/// Rule id: one P_Key (any membership) given to two tenants.
pub(crate) const TENANCY_PKEY_SHARED: &str = "TENANCY-PKEY-SHARED";
/// Rule id: one launcher uid given to two tenants.
pub(crate) const TENANCY_LAUNCHER_SHARED: &str = "TENANCY-LAUNCHER-SHARED";
/// Rule id: the host reader recorded an unreadable attribute.
pub(crate) const INV_UNREADABLE: &str = "INV-UNREADABLE";
/// Rule id: group viability.
pub(crate) const GRP_VIABLE: &str = "GRP-VIABLE";
/// Rule id: one tenant per group.
pub(crate) const GRP_ONE_TENANT: &str = "GRP-ONE-TENANT";
/// Rule id: ownership of VFIO nodes.
pub(crate) const GRP_NODE_OWNER: &str = "GRP-NODE-OWNER";
/// Rule id: PF custody.
pub(crate) const PF_TRUST: &str = "PF-TRUST";
/// Rule id: cdev path without VF-token check.
pub(crate) const VF_TOKEN_KERNEL: &str = "VF-TOKEN-KERNEL";
/// Rule id: APQN usable by host and guest.
pub(crate) const AP_HOST_GUEST: &str = "AP-HOST-GUEST";
/// Rule id: APQN in two matrix mdevs.
pub(crate) const AP_OVERLAP: &str = "AP-OVERLAP";
/// Rule id: `matrix` differs from `guest_matrix`.
pub(crate) const AP_GUEST_DRIFT: &str = "AP-GUEST-DRIFT";
/// Rule id: zero/all-ones/unset GUID on an assigned IB VF.
pub(crate) const IB_GUID_INVALID: &str = "IB-GUID-INVALID";
/// Rule id: a GUID on two functions.
pub(crate) const IB_GUID_DUPLICATE: &str = "IB-GUID-DUPLICATE";
/// Rule id: full member of the default partition.
pub(crate) const IB_DEFAULT_PKEY_FULL: &str = "IB-DEFAULT-PKEY-FULL";
/// Rule id: no reset method.
pub(crate) const RESET_UNAVAILABLE: &str = "RESET-UNAVAILABLE";

/// Runs every rule.
pub(crate) fn run_all(ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    input::unknown_device(ctx, out);
    input::pkey_shared(ctx, out);
    input::launcher_shared(ctx, out);
    input::unreadable(ctx, out);
    groups::viable(ctx, out);
    groups::one_tenant(ctx, out);
    groups::node_owner(ctx, out);
    pci::pf_trust(ctx, out);
    pci::vf_token_kernel(ctx, out);
    pci::reset_unavailable(ctx, out);
    ap::host_guest(ctx, out);
    ap::overlap(ctx, out);
    ap::guest_drift(ctx, out);
    ib::guid_invalid(ctx, out);
    ib::guid_duplicate(ctx, out);
    ib::default_pkey_full(ctx, out);
}

/// Builds a finding.
pub(crate) fn finding(
    rule: &str,
    severity: Severity,
    subject: impl Into<devfence_model::Subject>,
    message: impl Into<String>,
    evidence: Vec<Evidence>,
    hint: impl Into<String>,
) -> Finding {
    Finding {
        rule: rule.to_string(),
        severity,
        subject: subject.into(),
        message: message.into(),
        evidence,
        hint: hint.into(),
    }
}

/// `/proc/sys/kernel/osrelease` as evidence.
pub(crate) fn osrelease_evidence(ctx: &Ctx<'_>) -> Evidence {
    Evidence::new(
        crate::paths::OSRELEASE,
        ctx.inv
            .kernel_release
            .as_deref()
            .map_or_else(|| "(unknown)".to_string(), |r| r.trim().to_string()),
    )
}
