//! The differential scenario of the real-kernel testbed.
//!
//! [`run_scenario`] runs one scripted sequence of kernel operations against any
//! [`KernelIo`]: operations go through devfence's [`SysfsActuator`], errno probes
//! are raw [`KernelIo::write`]s. It returns normalised [`Observation`]s: `ok`, an
//! errno name, or observed facts (`driver=vfio-pci group_node=yes`), never what
//! legitimately differs between a real kernel and the simulator (`vfio<X>`
//! indexes, numbers of groups made at run time, timing).
//!
//! `tests/guest.rs` runs it on the real kernel inside the QEMU guest (built only
//! with `--cfg devfence_testbed`) and prints the observations; `tests/testbed.rs`
//! boots the guest on each kernel, runs the same scenario on a [`SimKernel`] over
//! the `testbed` profile and asserts that both lists are equal.
//!
//! The scenario assumes the guest as `testbed/guest/run-tests.sh` leaves it
//! (drivers loaded, no VF, no mdev) and leaves it that way again.
//!
//! [`SimKernel`]: devfence_host::simkernel::SimKernel

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use devfence_host::HostRoot;
use devfence_host::actuator::ops::SysfsActuator;
use devfence_host::actuator::{Actuator, Errno, KernelIo};
use devfence_host::migration::{
    MAX_STATE, MigState, MigTarget, MigrationDevice, load_state, save_state,
};
use devfence_model::{Bdf, MdevUuid};

/// The testbed guest's fixed topology (`testbed/run.sh`, `docs/testbed.md`).
pub mod topo {
    /// igb PF (82576, 7 VFs), group 8.
    pub const IGB_PF: &str = "0000:01:00.0";
    /// Its first two VFs (offset 0x80, stride 2).
    pub const IGB_VF0: &str = "0000:01:10.0";
    /// The second VF.
    pub const IGB_VF1: &str = "0000:01:10.2";
    /// The third VF.
    pub const IGB_VF2: &str = "0000:01:10.4";
    /// The second igb PF, group 9 (the VF-token tests put it on vfio-pci).
    pub const IGB_PF2: &str = "0000:02:00.0";
    /// Its first VF.
    pub const IGB_PF2_VF0: &str = "0000:02:10.0";
    /// nvme PF (2 VFs), group 10.
    pub const NVME_PF: &str = "0000:03:00.0";
    /// Root port without ACS, group 4 with the igb PF behind it.
    pub const NOACS_PORT: &str = "0000:00:04.0";
    /// The igb PF behind the ACS-less port.
    pub const NOACS_PF: &str = "0000:04:00.0";
    /// e1000e function 0 of the multifunction pair, group 11.
    pub const MF_FN0: &str = "0000:05:00.0";
    /// e1000e function 1.
    pub const MF_FN1: &str = "0000:05:00.1";
    /// The multifunction pair's group.
    pub const MF_GROUP: u32 = 11;
    /// The mtty sample driver's mdev parent.
    pub const MTTY_PARENT: &str = "mtty";
    /// Its single-port type.
    pub const MTTY_TYPE: &str = "mtty-1";
    /// A BDF that does not exist in the guest.
    pub const MISSING: &str = "0000:09:00.0";
    /// The mdev the scenario creates and removes.
    pub const MDEV_UUID: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    /// The migration scenario's source mdev ("A").
    pub const MIG_A: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002";
    /// Its destination mdev ("B").
    pub const MIG_B: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1003";
}

/// One normalised result of a scenario step.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Observation {
    /// What was done or looked at.
    pub step: String,
    /// `ok`, an errno name (`EBUSY`), or observed facts.
    pub outcome: String,
}

/// The marker of the line the guest prints its observations on.
pub const OBSERVATIONS_MARKER: &str = "DEVFENCE-OBSERVATIONS ";

/// `/sys/bus/pci/devices/<bdf>`.
#[must_use]
pub fn dev(bdf: &str) -> String {
    format!("/sys/bus/pci/devices/{bdf}")
}

/// Parses a BDF of the fixed topology.
///
/// # Panics
/// If `s` is not a BDF (a bug in the scenario's constants).
#[must_use]
pub fn bdf(s: &str) -> Bdf {
    s.parse()
        .unwrap_or_else(|e| panic!("{s:?} is not a BDF: {e}"))
}

/// The last component of a link's target, `None` when there is no link.
#[must_use]
pub fn link_name(io: &dyn KernelIo, path: &str) -> Option<String> {
    io.read_link(path)
        .ok()
        .map(|t| t.rsplit('/').next().unwrap_or_default().to_string())
}

/// The driver a PCI function is bound to.
#[must_use]
pub fn driver(io: &dyn KernelIo, bdf: &str) -> Option<String> {
    link_name(io, &format!("{}/driver", dev(bdf)))
}

/// The IOMMU group of a PCI function.
#[must_use]
pub fn group(io: &dyn KernelIo, bdf: &str) -> Option<u32> {
    link_name(io, &format!("{}/iommu_group", dev(bdf))).and_then(|g| g.parse().ok())
}

/// The members of a group, from `/sys/kernel/iommu_groups/<N>/devices`, sorted.
#[must_use]
pub fn group_members(io: &dyn KernelIo, group: u32) -> Vec<String> {
    let mut m = io
        .list_dir(&format!("/sys/kernel/iommu_groups/{group}/devices"))
        .unwrap_or_default();
    m.sort();
    m
}

/// An attribute's text without the trailing newline; an errno name if it
/// cannot be read.
#[must_use]
pub fn read_text(io: &dyn KernelIo, path: &str) -> String {
    match io.read(path) {
        Ok(v) => String::from_utf8_lossy(&v)
            .trim_end_matches('\n')
            .to_string(),
        Err(e) => e.name(),
    }
}

/// Polls `cond` until it holds or `limit` passes; whether it held. The real
/// kernel does most things synchronously, but a driver's probe may be deferred.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn outcome(r: Result<(), Errno>) -> String {
    match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.name(),
    }
}

fn act_outcome(r: Result<(), devfence_host::actuator::ActError>) -> String {
    match r {
        Ok(()) => "ok".to_string(),
        Err(e) => match e.errno {
            Some(n) => format!("error {}: {e}", n.name()),
            None => format!("error: {e}"),
        },
    }
}

struct Run<'a> {
    io: &'a dyn KernelIo,
    act: SysfsActuator<&'a dyn KernelIo>,
    obs: Vec<Observation>,
}

impl Run<'_> {
    fn note(&mut self, step: impl Into<String>, outcome: impl Into<String>) {
        let o = Observation {
            step: step.into(),
            outcome: outcome.into(),
        };
        // `TESTBED_APPEND=testbed.trace=1`: each step on the console as it is
        // made, to see where a guest stopped.
        if std::env::var_os("TESTBED_TRACE").is_some() {
            eprintln!("TRACE {}: {}", o.step, o.outcome);
        }
        self.obs.push(o);
    }
    fn raw(&mut self, step: &str, path: &str, value: &str) {
        let o = outcome(self.io.write(path, value.as_bytes()));
        self.note(step, o);
    }
    /// Facts about one PCI function: its driver, whether it has a group of its
    /// own (a group with it alone), whether its `/dev/vfio/<N>` exists.
    fn facts(&self, bdf: &str) -> String {
        self.facts_of(bdf, true)
    }
    /// [`Run::facts`]; with `bound`, first waits (bounded) for a driver: a
    /// driver's probe may come a little later than the write that caused it.
    fn facts_of(&self, bdf: &str, bound: bool) -> String {
        let io = self.io;
        if bound {
            wait_until(Duration::from_secs(5), || driver(io, bdf).is_some());
        }
        let drv = driver(io, bdf).unwrap_or_else(|| "none".into());
        let Some(g) = group(io, bdf) else {
            return format!("driver={drv} group=none");
        };
        let own = group_members(io, g) == [bdf.to_string()];
        let node = io.exists(&format!("/dev/vfio/{g}"));
        format!(
            "driver={drv} own_group={} group_node={}",
            yes(own),
            yes(node)
        )
    }
    fn vfs(&self, pf: &str) -> String {
        let io = self.io;
        let n = read_text(io, &format!("{}/sriov_numvfs", dev(pf)));
        let mut s = format!("numvfs={n}");
        for i in 0..8 {
            if let Some(vf) = link_name(io, &format!("{}/virtfn{i}", dev(pf))) {
                let _ = write!(s, " virtfn{i}={vf}");
            }
        }
        s
    }
    fn inventory(&mut self, when: &str) {
        let inv = match devfence_host::read_inventory(self.io.root()) {
            Ok(inv) => inv,
            Err(e) => {
                self.note(format!("{when}: inventory"), format!("error: {e}"));
                return;
            }
        };
        for f in &inv.pci {
            let mut s = format!(
                "id={:04x}:{:04x} class={:06x} driver={} override={} group={}",
                f.vendor.unwrap_or(0xffff),
                f.device.unwrap_or(0xffff),
                f.class.unwrap_or(0),
                f.driver.as_deref().unwrap_or("none"),
                f.driver_override.as_deref().unwrap_or("(null)"),
                f.iommu_group
                    .map_or_else(|| "none".into(), |g| g.to_string()),
            );
            if let Some(sr) = &f.sriov {
                let _ = write!(s, " sriov={:?}/{:?}", sr.num_vfs, sr.total_vfs);
            }
            if let Some(pf) = f.physfn {
                let _ = write!(s, " physfn={pf}");
            }
            let _ = write!(s, " reset_method={}", f.reset_methods.join(","));
            self.note(format!("{when}: pci {}", f.bdf), s);
        }
        for g in &inv.iommu_groups {
            let mut m: Vec<String> = g.members.iter().map(ToString::to_string).collect();
            m.sort();
            self.note(format!("{when}: group {}", g.id), m.join(" "));
        }
        let nodes: Vec<String> = inv
            .vfio_nodes
            .iter()
            .map(|n| format!("{}:{:?}", n.path, n.kind))
            .collect();
        self.note(format!("{when}: vfio nodes"), nodes.join(" "));
        for p in &inv.mdev_parents {
            let types: Vec<String> = p
                .types
                .iter()
                .map(|t| format!("{}({})", t.id, t.available_instances.unwrap_or(0)))
                .collect();
            self.note(format!("{when}: mdev parent {}", p.name), types.join(" "));
        }
        let mdevs: Vec<String> = inv.mdevs.iter().map(|m| m.uuid.to_string()).collect();
        self.note(format!("{when}: mdevs"), mdevs.join(" "));
        let problems: Vec<String> = inv
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.path, p.error))
            .collect();
        self.note(format!("{when}: read problems"), problems.join("; "));
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Runs the scripted scenario against `io` and returns what it observed. See the
/// crate docs; the steps are listed in `docs/testbed.md`.
#[must_use]
pub fn run_scenario(io: &dyn KernelIo) -> Vec<Observation> {
    use topo::*;
    let mut r = Run {
        io,
        act: SysfsActuator::new(io),
        obs: Vec::new(),
    };
    let pf = bdf(IGB_PF);
    let numvfs = format!("{}/sriov_numvfs", dev(IGB_PF));

    r.inventory("start");

    // --- sriov_numvfs ----------------------------------------------------------
    r.raw("sriov_numvfs <- abc", &numvfs, "abc");
    r.raw("sriov_numvfs <- 8 (totalvfs 7)", &numvfs, "8");
    let o = act_outcome(r.act.set_num_vfs(pf, 2));
    r.note("actuator: set_num_vfs 2", o);
    let o = r.vfs(IGB_PF);
    r.note("VFs after 2", o);
    for vf in [IGB_VF0, IGB_VF1] {
        let o = r.facts(vf);
        r.note(format!("VF {vf}"), o);
        let o = link_name(io, &format!("{}/physfn", dev(vf))).unwrap_or_else(|| "none".into());
        r.note(format!("VF {vf} physfn"), o);
        let own = group(io, vf) != group(io, IGB_PF);
        r.note(format!("VF {vf} group differs from the PF's"), yes(own));
    }
    r.raw("sriov_numvfs <- 3 while 2", &numvfs, "3");
    let o = r.vfs(IGB_PF);
    r.note("VFs after the refused write", o);
    let o = act_outcome(r.act.set_num_vfs(pf, 3));
    r.note("actuator: set_num_vfs 3 (0 first)", o);
    let o = r.vfs(IGB_PF);
    r.note("VFs after 3", o);
    let o = r.facts(IGB_VF2);
    r.note(format!("VF {IGB_VF2}"), o);
    let o = act_outcome(r.act.set_num_vfs(pf, 2));
    r.note("actuator: set_num_vfs 2 (0 first)", o);
    let o = r.vfs(IGB_PF);
    r.note("VFs back at 2", o);
    r.note(
        format!("{IGB_VF2} exists after going back to 2"),
        yes(io.exists(&dev(IGB_VF2))),
    );

    // --- drivers_probe / bind ----------------------------------------------------
    r.raw(
        "drivers_probe <- missing BDF",
        "/sys/bus/pci/drivers_probe",
        MISSING,
    );
    let vf = bdf(IGB_VF0);
    let o = act_outcome(r.act.bind(vf, "vfio-pci"));
    r.note(format!("actuator: bind {IGB_VF0} vfio-pci"), o);
    let o = r.facts(IGB_VF0);
    r.note(format!("VF {IGB_VF0} after bind"), o);
    let o = read_text(io, &format!("{}/driver_override", dev(IGB_VF0)));
    r.note(format!("{IGB_VF0} driver_override"), o);
    r.raw(
        "igbvf/bind <- VF bound to vfio-pci, override vfio-pci",
        "/sys/bus/pci/drivers/igbvf/bind",
        IGB_VF0,
    );
    r.raw(
        "vfio-pci/bind <- VF already bound to vfio-pci",
        "/sys/bus/pci/drivers/vfio-pci/bind",
        IGB_VF0,
    );
    let o = act_outcome(r.act.reset(vf));
    r.note(format!("actuator: reset {IGB_VF0}"), o);
    let o = r.facts(IGB_VF0);
    r.note(format!("VF {IGB_VF0} after reset"), o);
    r.raw(
        "driver_override <- \\n (clear)",
        &format!("{}/driver_override", dev(IGB_VF0)),
        "\n",
    );
    let o = read_text(io, &format!("{}/driver_override", dev(IGB_VF0)));
    r.note(format!("{IGB_VF0} driver_override after clearing"), o);
    let o = act_outcome(r.act.unbind(vf));
    r.note(format!("actuator: unbind {IGB_VF0}"), o);
    let o = r.facts_of(IGB_VF0, false);
    r.note(format!("VF {IGB_VF0} after unbind"), o);
    r.raw(
        "igbvf/bind <- unbound VF, no override",
        "/sys/bus/pci/drivers/igbvf/bind",
        IGB_VF0,
    );
    let o = r.facts(IGB_VF0);
    r.note(format!("VF {IGB_VF0} after igbvf/bind"), o);
    let o = act_outcome(r.act.set_num_vfs(pf, 0));
    r.note("actuator: set_num_vfs 0", o);
    let o = r.vfs(IGB_PF);
    r.note("VFs after 0", o);

    // --- vfio-pci and a PF with SR-IOV enabled ------------------------------------
    // nvme's remove leaves SR-IOV enabled (igb's disables it), so its PF can be
    // unbound with a VF; vfio-pci's probe then refuses the PF (EBUSY, "Cannot
    // bind to PF with SR-IOV enabled"): `bind` passes the errno on,
    // `drivers_probe` does not.
    let nvme = dev(NVME_PF);
    r.raw(
        "nvme sriov_numvfs <- 1",
        &format!("{nvme}/sriov_numvfs"),
        "1",
    );
    r.raw(
        "nvme PF driver_override <- vfio-pci",
        &format!("{nvme}/driver_override"),
        "vfio-pci",
    );
    r.raw(
        "nvme/unbind <- PF with a VF",
        "/sys/bus/pci/drivers/nvme/unbind",
        NVME_PF,
    );
    let o = r.vfs(NVME_PF);
    r.note("nvme PF VFs after unbind", o);
    r.raw(
        "vfio-pci/bind <- PF with SR-IOV enabled",
        "/sys/bus/pci/drivers/vfio-pci/bind",
        NVME_PF,
    );
    let o = r.facts_of(NVME_PF, false);
    r.note("nvme PF after the refused bind", o);
    r.raw(
        "drivers_probe <- PF with SR-IOV enabled, override vfio-pci",
        "/sys/bus/pci/drivers_probe",
        NVME_PF,
    );
    let o = r.facts_of(NVME_PF, false);
    r.note("nvme PF after drivers_probe", o);
    r.raw(
        "nvme PF driver_override <- \\n (clear)",
        &format!("{nvme}/driver_override"),
        "\n",
    );
    r.raw("nvme/bind <- PF", "/sys/bus/pci/drivers/nvme/bind", NVME_PF);
    let o = r.facts(NVME_PF);
    r.note("nvme PF after nvme/bind", o);
    r.raw(
        "nvme sriov_numvfs <- 0",
        &format!("{nvme}/sriov_numvfs"),
        "0",
    );
    let o = r.vfs(NVME_PF);
    r.note("nvme PF VFs after 0", o);

    // --- mdev ------------------------------------------------------------------------
    let create =
        format!("/sys/class/mdev_bus/{MTTY_PARENT}/mdev_supported_types/{MTTY_TYPE}/create");
    r.raw("mdev create <- bad uuid", &create, "not-a-uuid");
    let uuid: MdevUuid = match MDEV_UUID.parse() {
        Ok(u) => u,
        Err(e) => panic!("{MDEV_UUID}: {e}"),
    };
    let o = act_outcome(r.act.mdev_create(MTTY_PARENT, MTTY_TYPE, uuid));
    r.note("actuator: mdev create", o);
    let mdev = format!("/sys/bus/mdev/devices/{MDEV_UUID}");
    let drv = link_name(io, &format!("{mdev}/driver")).unwrap_or_else(|| "none".into());
    let g = link_name(io, &format!("{mdev}/iommu_group"));
    let node = g
        .as_ref()
        .is_some_and(|g| io.exists(&format!("/dev/vfio/{g}")));
    r.note(
        "mdev after create",
        format!(
            "exists={} driver={drv} group={} group_node={}",
            yes(io.exists(&mdev)),
            yes(g.is_some()),
            yes(node)
        ),
    );
    let o = read_text(
        io,
        &format!(
            "/sys/class/mdev_bus/{MTTY_PARENT}/mdev_supported_types/{MTTY_TYPE}/available_instances"
        ),
    );
    r.note("mtty-1 available_instances with one mdev", o);
    r.raw("mdev create <- same uuid again", &create, MDEV_UUID);
    let o = act_outcome(r.act.mdev_remove(uuid));
    r.note("actuator: mdev remove", o);
    r.note("mdev exists after remove", yes(io.exists(&mdev)));

    // --- unbind a function of the multifunction pair, and bind it back ----------------
    let fn1 = bdf(MF_FN1);
    let o = act_outcome(r.act.unbind(fn1));
    r.note(format!("actuator: unbind {MF_FN1}"), o);
    let o = r.facts_of(MF_FN1, false);
    r.note(format!("{MF_FN1} after unbind"), o);
    let o = act_outcome(r.act.bind(fn1, "e1000e"));
    r.note(format!("actuator: bind {MF_FN1} e1000e"), o);
    r.raw(
        "driver_override <- \\n (clear)",
        &format!("{}/driver_override", dev(MF_FN1)),
        "\n",
    );
    let o = r.facts(MF_FN1);
    r.note(format!("{MF_FN1} after bind"), o);

    migration_scenario(&mut r);

    r.inventory("end");
    r.obs
}

/// The registers the migration scenario writes into mtty's port 0 (BAR0,
/// region 0 at offset 0), in order: (offset, value). DLAB on, divisor 0x000c
/// (9600 baud), DLAB off with 8N1, scratch 0x5a, FIFO on, two bytes into the
/// loop-back FIFO, MCR 0x0b, and IER 0x05 last: no write may raise an
/// interrupt, because 6.1's mtty then signals a NULL eventfd (no IRQ is set
/// up) and oopses — the testbed's first 6.1 run did, at the FIFO write with
/// IER's receive interrupt already enabled.
pub const MTTY_WRITES: &[(u64, u8)] = &[
    (3, 0x80),
    (0, 0x0c),
    (1, 0x00),
    (3, 0x03),
    (7, 0x5a),
    (2, 0x01),
    (0, 0x41),
    (0, 0x42),
    (4, 0x0b),
    (1, 0x05),
];

/// The registers read back: IER, LCR, MCR, LSR, SCR.
pub const MTTY_READS: &[u64] = &[1, 3, 4, 5, 7];

fn hexs(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn mig_target(io: &dyn KernelIo, uuid: &str) -> Option<MigTarget> {
    let g = link_name(io, &format!("/sys/bus/mdev/devices/{uuid}/iommu_group"))?;
    Some(MigTarget {
        name: uuid.to_owned(),
        group: devfence_model::IommuGroupId(g.parse().ok()?),
    })
}

fn mig_open(io: &dyn KernelIo, uuid: &str) -> Result<Box<dyn MigrationDevice>, Errno> {
    let t = mig_target(io, uuid).ok_or(Errno::ENODEV)?;
    io.open_migration(&t)
}

fn regs(d: &dyn MigrationDevice) -> String {
    let mut s = String::new();
    for off in MTTY_READS {
        match d.region_read(*off, 1) {
            Ok(b) => {
                let _ = write!(s, "r{off}={} ", hexs(&b));
            }
            Err(e) => {
                let _ = write!(s, "r{off}={} ", e.name());
            }
        }
    }
    s.trim_end().to_owned()
}

fn state_of(d: &dyn MigrationDevice) -> String {
    d.state().map_or_else(|e| e.name(), |s| s.name().to_owned())
}

fn set_outcome(d: &mut dyn MigrationDevice, s: MigState) -> String {
    match d.set_state(s) {
        Ok(Some(_)) => format!("ok data_fd -> {}", state_of(d)),
        Ok(None) => format!("ok -> {}", state_of(d)),
        Err(e) => format!("{} -> {}", e.name(), state_of(d)),
    }
}

fn write_outcome(d: &mut dyn MigrationDevice, bytes: &[u8]) -> String {
    match d.set_state(MigState::Resuming) {
        Ok(Some(mut f)) => match f.write(bytes) {
            Ok(n) => format!("wrote {n}"),
            Err(e) => Errno::from_io(&e).name(),
        },
        Ok(None) => "no data fd".into(),
        Err(e) => e.name(),
    }
}

/// VFIO migration (v2) of mtty mdevs: capability, the state machine's arcs and
/// errnos, save from A, load into B, what closing and reset do. On a kernel
/// whose mtty has no migration (6.1) every step answers `ENOTTY` and the
/// operations refuse with "no migration support".
fn migration_scenario(r: &mut Run<'_>) {
    use topo::*;
    let io = r.io;
    let (Ok(a), Ok(b)) = (MIG_A.parse::<MdevUuid>(), MIG_B.parse::<MdevUuid>()) else {
        r.note("migration: uuids", "unparsable");
        return;
    };
    let o = act_outcome(r.act.mdev_create(MTTY_PARENT, MTTY_TYPE, a));
    r.note("migration: create A", o);
    let o = act_outcome(r.act.mdev_create(MTTY_PARENT, MTTY_TYPE, b));
    r.note("migration: create B", o);

    let mut da = match mig_open(io, MIG_A) {
        Ok(d) => d,
        Err(e) => {
            r.note("migration: open A", e.name());
            let _ = r.act.mdev_remove(a);
            let _ = r.act.mdev_remove(b);
            return;
        }
    };
    r.note("migration: open A", "ok");
    let o = match da.flags() {
        Ok(f) => f.names().join(" "),
        Err(e) => e.name(),
    };
    r.note("migration: A flags", o);
    r.note("migration: A state at open", state_of(&*da));
    for (off, v) in MTTY_WRITES {
        if let Err(e) = da.region_write(*off, &[*v]) {
            r.note(format!("migration: A write r{off}"), e.name());
        }
    }
    r.note("migration: A registers", regs(&*da));
    let saved = save_state(&mut *da, MIG_A, MAX_STATE, MigState::Running);
    let stream = match saved {
        Ok(s) => {
            r.note(
                "migration: save A",
                format!("{} bytes {}", s.len(), hexs(&s)),
            );
            Some(s)
        }
        Err(e) => {
            r.note("migration: save A", e.to_string());
            None
        }
    };
    r.note("migration: A state after save", state_of(&*da));
    let Some(stream) = stream else {
        drop(da);
        let o = act_outcome(r.act.mdev_remove(a));
        r.note("migration: remove A", o);
        let o = act_outcome(r.act.mdev_remove(b));
        r.note("migration: remove B", o);
        return;
    };

    // The arcs and errnos.
    let o = set_outcome(&mut *da, MigState::Error);
    r.note("migration: A RUNNING -> ERROR", o);
    let o = set_outcome(&mut *da, MigState::StopCopy);
    r.note("migration: A RUNNING -> STOP_COPY", o);
    let o = set_outcome(&mut *da, MigState::PreCopy);
    r.note("migration: A STOP_COPY -> PRE_COPY", o);
    let o = set_outcome(&mut *da, MigState::Resuming);
    r.note("migration: A STOP_COPY -> RESUMING", o);
    let o = set_outcome(&mut *da, MigState::Running);
    r.note("migration: A RESUMING -> RUNNING (nothing written)", o);
    let o = match da.reset() {
        Ok(()) => format!("ok -> {}", state_of(&*da)),
        Err(e) => e.name(),
    };
    r.note("migration: A reset", o);
    let o = set_outcome(&mut *da, MigState::PreCopy);
    r.note("migration: A RUNNING -> PRE_COPY", o);
    let o = set_outcome(&mut *da, MigState::Running);
    r.note("migration: A PRE_COPY -> RUNNING", o);
    r.note("migration: A registers after the arcs", regs(&*da));
    drop(da);

    // B: malformed streams are the driver's to refuse.
    let mut db = match mig_open(io, MIG_B) {
        Ok(d) => d,
        Err(e) => {
            r.note("migration: open B", e.name());
            return;
        }
    };
    r.note("migration: B registers before", regs(&*db));
    let _ = db.set_state(MigState::Stop);
    // A stream with a wrong magic and another scratch register (0xee).
    let mut bad = stream.clone();
    bad[0] ^= 0xff;
    if let Some(scr) = bad.get_mut(24 + 7) {
        *scr = 0xee;
    }
    let o = write_outcome(&mut *db, &bad);
    r.note("migration: B RESUMING write, bad magic", o);
    let o = set_outcome(&mut *db, MigState::Stop);
    r.note("migration: B RESUMING -> STOP after bad magic", o);
    let mut long = stream.clone();
    long.push(0);
    let o = write_outcome(&mut *db, &long);
    r.note("migration: B RESUMING write, one byte too many", o);
    let o = set_outcome(&mut *db, MigState::Stop);
    r.note("migration: B RESUMING -> STOP after nothing written", o);
    let o = match db.reset() {
        Ok(()) => format!("ok -> {}", state_of(&*db)),
        Err(e) => e.name(),
    };
    r.note("migration: B reset", o);
    r.note(
        "migration: B registers after the streams mtty refused",
        regs(&*db),
    );

    // B: the load.
    let o = match load_state(&mut *db, MIG_B, &stream, MAX_STATE, MigState::Stop) {
        Ok(rep) => format!(
            "written={} readback_equal={} final={}",
            rep.written, rep.readback_equal, rep.final_state
        ),
        Err(e) => e.to_string(),
    };
    r.note("migration: load B", o);
    r.note("migration: B registers after load", regs(&*db));
    r.note("migration: B state after load", state_of(&*db));

    // What closing the device does to the loaded state.
    drop(db);
    match mig_open(io, MIG_B) {
        Ok(mut db) => {
            r.note("migration: B state after close and reopen", state_of(&*db));
            r.note("migration: B registers after close and reopen", regs(&*db));
            let o = match db.reset() {
                Ok(()) => format!("ok -> {}", state_of(&*db)),
                Err(e) => e.name(),
            };
            r.note("migration: B reset", o);
            r.note("migration: B registers after reset", regs(&*db));
        }
        Err(e) => r.note("migration: reopen B", e.name()),
    }
    let o = act_outcome(r.act.mdev_remove(a));
    r.note("migration: remove A", o);
    let o = act_outcome(r.act.mdev_remove(b));
    r.note("migration: remove B", o);
}

/// The observations as the one line the guest prints.
///
/// # Panics
/// Never: observations are plain strings.
#[must_use]
pub fn observations_line(obs: &[Observation]) -> String {
    format!(
        "{OBSERVATIONS_MARKER}{}",
        serde_json::to_string(obs).unwrap_or_default()
    )
}

/// Finds the observations line in a console log (the serial console may put
/// `\r` at line ends).
///
/// # Errors
/// When there is no such line or it does not parse.
pub fn parse_observations(log: &str) -> Result<Vec<Observation>, String> {
    let line = log
        .lines()
        .find_map(|l| {
            l.find(OBSERVATIONS_MARKER)
                .map(|i| &l[i + OBSERVATIONS_MARKER.len()..])
        })
        .ok_or_else(|| format!("no line with {OBSERVATIONS_MARKER:?} in the guest's console"))?;
    serde_json::from_str(line.trim_end_matches('\r').trim())
        .map_err(|e| format!("the observations line does not parse: {e}"))
}

/// A readable diff of two observation lists (empty when they are equal).
#[must_use]
pub fn diff(real: &[Observation], sim: &[Observation]) -> String {
    let mut out = String::new();
    let n = real.len().max(sim.len());
    for i in 0..n {
        match (real.get(i), sim.get(i)) {
            (Some(a), Some(b)) if a == b => {}
            (a, b) => {
                let show = |o: Option<&Observation>| {
                    o.map_or_else(
                        || "(none)".to_string(),
                        |o| format!("{}: {}", o.step, o.outcome),
                    )
                };
                let _ = writeln!(out, "#{i}\n  real: {}\n  sim:  {}", show(a), show(b));
            }
        }
    }
    out
}

/// The real kernel's root (`/`).
#[must_use]
pub fn real_root() -> HostRoot {
    HostRoot::new("/")
}
