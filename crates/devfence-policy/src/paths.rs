//! Kernel paths as evidence names them (absolute, independent of the host root).

use devfence_model::{Apqn, Bdf, IommuGroupId, MdevUuid};

/// `/proc/sys/kernel/osrelease`.
pub(crate) const OSRELEASE: &str = "/proc/sys/kernel/osrelease";
/// vfio-pci's `enable_sriov` parameter.
pub(crate) const ENABLE_SRIOV: &str = "/sys/module/vfio_pci/parameters/enable_sriov";
/// The AP bus adapter mask.
pub(crate) const APMASK: &str = "/sys/bus/ap/apmask";
/// The AP bus domain mask.
pub(crate) const AQMASK: &str = "/sys/bus/ap/aqmask";

/// `/sys/bus/pci/devices/<bdf>/<attr>`.
pub(crate) fn pci(bdf: Bdf, attr: &str) -> String {
    format!("/sys/bus/pci/devices/{bdf}/{attr}")
}

/// `/sys/kernel/iommu_groups/<id>/devices/<member>`.
pub(crate) fn group_member(id: IommuGroupId, member: &str) -> String {
    format!("/sys/kernel/iommu_groups/{id}/devices/{member}")
}

/// `/sys/bus/mdev/devices/<uuid>/<attr>`.
pub(crate) fn mdev(uuid: MdevUuid, attr: &str) -> String {
    format!("/sys/bus/mdev/devices/{uuid}/{attr}")
}

/// `/sys/devices/vfio_ap/matrix/<uuid>/<attr>`.
pub(crate) fn ap_matrix(uuid: MdevUuid, attr: &str) -> String {
    format!("/sys/devices/vfio_ap/matrix/{uuid}/{attr}")
}

/// `/sys/bus/ap/devices/<apqn>` (with `/attr` when given).
pub(crate) fn ap_queue(q: Apqn, attr: Option<&str>) -> String {
    match attr {
        Some(a) => format!("/sys/bus/ap/devices/{q}/{a}"),
        None => format!("/sys/bus/ap/devices/{q}"),
    }
}

/// `/sys/class/infiniband/<dev>/ports/<port>/<attr>`.
pub(crate) fn ib_port(dev: &str, port: u32, attr: &str) -> String {
    format!("/sys/class/infiniband/{dev}/ports/{port}/{attr}")
}
