//! A [stateright] model of the IB handover of one device from tenant A to tenant B
//! (docs/design.md §1 L1, §4), checked over every interleaving of the engine, the
//! subnet manager (SM), the VF's link and B's VM launcher.
//!
//! This file is the specification of the engine's IB handover; `docs/model-check.md`
//! explains it with the state counts and a counterexample.
//!
//! The same handover in a fleet — two fabric controllers elected through an etcd
//! lease, one of which may resume on a stale view — is the [`fleet`] module.
//!
//! # What is modelled
//!
//! One VF whose port GUID is its IB identity. Tenant A holds two partitions
//! (`A1`, `A2`), tenant B one (`B1`). Four actors take steps in any order:
//!
//! * **Engine** — the journal order of the real engine, one step at a time:
//!   [`Action::Revoke`] (stage + apply "old GUID out of A's partitions": the SM's
//!   configured membership changes at once, a sweep is requested, the engine keeps
//!   the ticket = the generation of the next sweep), [`Action::RetireOld`] (ledger:
//!   old GUID quarantined), [`Action::AllocateNew`] (ledger: fresh GUID),
//!   [`Action::SetGuid`] (the VF presents the new GUID; its port re-initialises, so
//!   it is off the fabric until [`Action::LinkUp`]), [`Action::Grant`] (stage + apply
//!   "new GUID into B's partitions": configured at once, sweep requested, new
//!   ticket), then the **gate** ([`Action::PassGate`], only when [`GateKind`] says
//!   so), which marks the device `Ready(B)`. While it waits at the gate the engine
//!   may re-request a sweep that it sees none coming for ([`Action::RequestSweep`]),
//!   or, with a fixed wait, let time pass ([`Action::Tick`]).
//! * **SM** — a *configured* membership per GUID (changes instantly on apply) and
//!   the port's *programmed* P_Key table, which changes only when a sweep programs
//!   it. An apply or a port coming up requests a sweep; the SM may also sweep on
//!   its own (periodic sweeps), so a sweep may start at any time, or never
//!   ([`Action::SweepStart`]: it gets the next generation and takes a snapshot of
//!   the configured membership of the GUID the port presents, or of nothing if the
//!   port is off the fabric). A running sweep may finish ([`Action::SweepFinish`]:
//!   programs the snapshot on the port if the port still presents that GUID; a
//!   port that was off the fabric is simply not programmed; one that left or
//!   changed its GUID during the sweep ends it with errors) or fail ([`Action::SweepFail`]: programs nothing,
//!   outcome "errors"). A request may be lost ([`Action::LoseRequest`]). The SM
//!   reports what it programmed on the port, under the GUID the port presented
//!   then (so another GUID reads as absent), and the generation and outcome of its
//!   last completed sweep. By default ([`SmReport::Acknowledged`]) the report
//!   changes when the port has the table; [`SmReport::AheadOfPort`] is an SM whose
//!   report runs ahead of the port.
//! * **Link** — the VF's port comes back on the fabric after the GUID change
//!   ([`Action::LinkUp`]), which requests a sweep (a port-state trap).
//! * **Launcher** — starts B's VM once the device is `Ready(B)` ([`Action::StartVm`]).
//!
//! The port's P_Key table is a property of the *port*, not of the GUID: setting a
//! new GUID does not clear it. That is leak L1: until a sweep reprograms the port,
//! B's VM could use A's partitions.
//!
//! # One sweep ([`Protocol`])
//!
//! With [`Protocol::OneSweep`] the engine does not apply the revoke on its own:
//! it retires the old GUID in the ledger, allocates the fresh GUID, sets it on the
//! VF, and then [`Action::Move`] stages "old GUID out of A's partitions" and "new
//! GUID into B's partitions" and applies them once (one sweep requested, one
//! ticket). The gate is the same three questions. Two broken variants must be
//! caught: [`Protocol::OneSweepOldGuid`] moves the *old* GUID from A to B (no fresh
//! identity), and [`Protocol::OneSweepEarlyStart`] lets the launcher start B's VM
//! once the move is applied, before the gate verified it. [`Protocol::OneSweepNoRevoke`]
//! drops the revoke from the apply: the gate's Q1 then never opens.
//! [`Protocol::OneSweepApplyFirst`] applies the same move *before* the fresh GUID is
//! set on the VF, so that the sweep the port's re-initialisation causes programs the
//! change; the gate is unchanged and must hold for it too.
//!
//! # Property
//!
//! [`VM_NEVER_ON_A`] (`always`): never is B's VM running while the VF's port carries
//! any of A's P_Keys, or the VF presents the old GUID, or the SM still reports the
//! old GUID programmed in any of A's partitions, or the SM's configuration still
//! puts the old GUID into any of them (the revoke must be applied before B runs,
//! whatever the protocol). [`VM_RUNS`] (`sometimes`): B's VM
//! does run, so the model is not vacuous.
//!
//! # Gates
//!
//! [`GateKind::ReadBack`] is the engine's gate (the three questions of
//! `devfence_fabric::verify`): Q1 the old GUID is in none of A's partitions
//! (programmed and configured), Q2 the new GUID holds exactly B's partitions
//! (programmed and configured), Q3 the last completed sweep is at the ticket's
//! generation or later and was clean. The other kinds are broken on purpose.
//!
//! # What the checks show (tests/handover.rs)
//!
//! * `ReadBack` holds over every interleaving, and B's VM does start.
//! * `FixedWait(n)`, `ConfiguredOnly` and `WithoutNewExact` have counterexamples:
//!   B's VM starts while the port still carries A's P_Keys.
//! * With an SM that reports acknowledged tables, Q2 on the programmed view is what
//!   carries the proof: `WithoutOldRevoked` and `WithoutSweepDone` also hold here.
//!   With an SM whose report runs ahead of the port, `WithoutSweepDone` fails, and
//!   so does `ReadBack`: a clean sweep at the ticket's generation that missed the
//!   port (off the fabric), then a running sweep whose table is already reported,
//!   answers all three questions while the port still carries A's table. The gate
//!   is sound only for backends whose programmed view is what the port holds.
//!
//! The gate reads the SM in one atomic step; the real read-back reads the status
//! before the port views.
//!
//! # Bounds
//!
//! Sweep generations are capped at [`Handover::max_generation`] (the SM starts no
//! sweep past it) so the state space is finite; every other value is finite by
//! construction.

use std::fmt;
use std::fmt::Write as _;

use stateright::{Model, Path, Property};

pub mod fleet;

/// Name of the safety property: B's VM never runs on A's membership.
pub const VM_NEVER_ON_A: &str =
    "B's VM never runs while the port, the VF or the old GUID carries A's membership";

/// Name of the liveness witness: B's VM does start in some run.
pub const VM_RUNS: &str = "B's VM runs";

/// A set of P_Keys (bits: `A1`, `A2`, `B1`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Keys(u8);

impl Keys {
    /// No P_Key.
    pub const NONE: Keys = Keys(0);
    /// Tenant A's first partition.
    pub const A1: Keys = Keys(1);
    /// Tenant A's second partition.
    pub const A2: Keys = Keys(2);
    /// Tenant B's partition.
    pub const B1: Keys = Keys(4);
    /// All of tenant A's partitions.
    pub const A: Keys = Keys(1 | 2);
    /// All of tenant B's partitions.
    pub const B: Keys = Keys(4);

    /// Whether the two sets share a P_Key.
    #[must_use]
    pub fn meets(self, other: Keys) -> bool {
        self.0 & other.0 != 0
    }

    /// This set without the P_Keys of `other`.
    #[must_use]
    pub fn without(self, other: Keys) -> Keys {
        Keys(self.0 & !other.0)
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [(Keys::A1, "A1"), (Keys::A2, "A2"), (Keys::B1, "B1")];
        let set: Vec<&str> = names
            .iter()
            .filter(|(k, _)| self.meets(*k))
            .map(|(_, n)| *n)
            .collect();
        write!(f, "{{{}}}", set.join(","))
    }
}

/// The two port GUIDs of the handover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuidId {
    /// A's GUID, retired by the handover.
    Old,
    /// The fresh GUID allocated for B.
    New,
}

/// The last journal step the engine has done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EngineStep {
    /// Nothing yet: A's VM is stopped, the device is draining towards B.
    Start,
    /// The old GUID is out of A's partitions in the SM's configuration.
    Revoked,
    /// The old GUID is quarantined in the ledger.
    Retired,
    /// A fresh GUID is allocated.
    Allocated,
    /// The VF presents the fresh GUID.
    GuidSet,
    /// [`Protocol::OneSweepApplyFirst`]: the move is applied at the SM; the VF
    /// still presents the old GUID.
    Moved,
    /// The fresh GUID is in B's partitions in the SM's configuration; the engine
    /// waits at the gate.
    Granted,
    /// The gate passed: `Ready(B)`.
    Ready,
}

/// How the last completed sweep ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SweepEnd {
    /// Without errors.
    Clean,
    /// With errors: its result must not be trusted.
    Errors,
}

/// What the SM has programmed on the VF's port: the GUID the port presented and the
/// P_Key table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRecord {
    /// The GUID the port presented when it was programmed.
    pub guid: GuidId,
    /// The P_Keys.
    pub pkeys: Keys,
}

/// The SM's sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sweep {
    /// No sweep running.
    Idle,
    /// A sweep is running.
    Running {
        /// Its generation.
        generation: u8,
        /// What it will program on the port: the configuration of the GUID the port
        /// presented when the sweep started, or nothing if the port was off the fabric.
        target: Option<PortRecord>,
    },
}

/// One state of the handover.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HandoverState {
    /// Engine: last journal step done.
    pub engine: EngineStep,
    /// Engine: the generation the SM must have completed (from the last apply).
    pub ticket: u8,
    /// Engine: ticks waited at a fixed-wait gate.
    pub ticks: u8,
    /// Launcher: B's VM is running.
    pub vm_b: bool,
    /// VF: the GUID it presents.
    pub vf_guid: GuidId,
    /// VF: its port is on the fabric.
    pub port_up: bool,
    /// VF: the P_Key table its port really carries.
    pub port_pkeys: Keys,
    /// SM: configured membership of the old GUID.
    pub configured_old: Keys,
    /// SM: configured membership of the new GUID.
    pub configured_new: Keys,
    /// SM: what it reports as programmed on the port (`None`: it sees no port).
    pub reported: Option<PortRecord>,
    /// SM: a sweep is requested and has not started.
    pub sweep_requested: bool,
    /// SM: the running sweep, if any.
    pub sweep: Sweep,
    /// SM: generations handed out so far (the last started sweep's).
    pub generation: u8,
    /// SM: generation of the last completed sweep.
    pub last_done: u8,
    /// SM: how the last completed sweep ended.
    pub last_outcome: SweepEnd,
}

impl HandoverState {
    /// P_Keys the SM reports as programmed for `guid` (none when no port presents it).
    #[must_use]
    pub fn reported_for(&self, guid: GuidId) -> Option<Keys> {
        self.reported.filter(|r| r.guid == guid).map(|r| r.pkeys)
    }

    /// The safety property's violation: B's VM runs while the port carries any of
    /// A's P_Keys, the VF presents the old GUID, or the SM reports the old GUID
    /// programmed in (or its configuration still puts it into) any of A's
    /// partitions.
    #[must_use]
    pub fn b_on_a_membership(&self) -> bool {
        self.vm_b
            && (self.port_pkeys.meets(Keys::A)
                || self.vf_guid == GuidId::Old
                || self.configured_old.meets(Keys::A)
                || self
                    .reported_for(GuidId::Old)
                    .is_some_and(|k| k.meets(Keys::A)))
    }
}

impl fmt::Display for HandoverState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sweep = match self.sweep {
            Sweep::Idle => "idle".to_string(),
            Sweep::Running {
                generation,
                target: Some(t),
            } => format!("g{generation} → {:?}:{:?}", t.guid, t.pkeys),
            Sweep::Running {
                generation,
                target: None,
            } => format!("g{generation} → (port off fabric)"),
        };
        let reported = match self.reported {
            Some(r) => format!("{:?}:{:?}", r.guid, r.pkeys),
            None => "no port".to_string(),
        };
        write!(
            f,
            "engine={:?} ticket=g{} vm_b={} | vf={:?} {} port={:?} | cfg old={:?} new={:?} | \
             sm reports {} | sweep {}{} | last g{} {:?}",
            self.engine,
            self.ticket,
            self.vm_b,
            self.vf_guid,
            if self.port_up { "up" } else { "down" },
            self.port_pkeys,
            self.configured_old,
            self.configured_new,
            reported,
            sweep,
            if self.sweep_requested {
                " +requested"
            } else {
                ""
            },
            self.last_done,
            self.last_outcome,
        )
    }
}

/// One step of one actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Engine: stage + apply "old GUID out of A's partitions".
    Revoke,
    /// Engine: quarantine the old GUID in the ledger.
    RetireOld,
    /// Engine: allocate a fresh GUID.
    AllocateNew,
    /// Engine: set the fresh GUID on the VF (its port re-initialises).
    SetGuid,
    /// Engine: stage + apply "new GUID into B's partitions".
    Grant,
    /// Engine (one-sweep protocols): stage "old GUID out of A's partitions" and
    /// "new GUID into B's partitions", apply once.
    Move,
    /// Engine: one tick of a fixed wait.
    Tick,
    /// Engine: re-request a sweep (it sees none coming and the gate is shut).
    RequestSweep,
    /// Engine: the gate passes; the device is `Ready(B)`.
    PassGate,
    /// Launcher: start B's VM.
    StartVm,
    /// SM: a sweep starts (requested or periodic).
    SweepStart,
    /// SM: the running sweep completes.
    SweepFinish,
    /// SM: the running sweep fails.
    SweepFail,
    /// SM: a requested sweep is lost (e.g. the SM restarted).
    LoseRequest,
    /// Link: the VF's port is back on the fabric (and a sweep is requested).
    LinkUp,
}

/// What decides that the engine may mark the device `Ready(B)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GateKind {
    /// The engine's gate, read back from the SM: Q1 old GUID in none of A's
    /// partitions (programmed and configured), Q2 new GUID in exactly B's
    /// (programmed and configured), Q3 last completed sweep ≥ ticket and clean.
    ReadBack,
    /// Broken: wait this many ticks, whatever the SM does.
    FixedWait(u8),
    /// Broken: Q1 and Q2 on the configured view only, no sweep check.
    ConfiguredOnly,
    /// `ReadBack` without Q1 (old GUID revoked).
    WithoutOldRevoked,
    /// `ReadBack` without Q2 (new GUID exactly in B's partitions).
    WithoutNewExact,
    /// `ReadBack` without Q3 (sweep done).
    WithoutSweepDone,
}

/// When the SM's report of a port's P_Key table changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SmReport {
    /// When the port has the table (OpenSM's SA answers from the blocks the port
    /// acknowledged). The engine's gate assumes this.
    Acknowledged,
    /// As soon as a sweep has computed it, before the port has it. A weaker SM than
    /// the gate assumes: used to show that the assumption is load-bearing.
    AheadOfPort,
}

/// The engine's order of steps at the SM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Two applies, two sweeps: revoke the old GUID (and wait for that sweep in the
    /// real engine), then set the fresh GUID and grant it.
    TwoSweep,
    /// One apply, one sweep: retire the old GUID in the ledger, allocate and set
    /// the fresh GUID, then [`Action::Move`] takes the old GUID out of A's
    /// partitions and puts the new one into B's in the same apply; the gate asks
    /// the same three questions.
    OneSweep,
    /// Broken: one sweep that moves the *old* GUID from A to B (no fresh GUID is
    /// set on the VF): B's VM runs under A's identity.
    OneSweepOldGuid,
    /// Broken: one sweep, but the launcher starts B's VM as soon as the move is
    /// applied, before the gate has verified the revoke and the grant.
    OneSweepEarlyStart,
    /// Broken: one sweep whose apply grants B but leaves the old GUID in A's
    /// partitions (the revoke is dropped).
    OneSweepNoRevoke,
    /// One apply, one sweep, the apply *before* the GUID is set: retire, allocate,
    /// [`Action::Move`], then [`Action::SetGuid`]. The VF's port re-initialises
    /// after the move is configured, so the sweep its coming back causes is one
    /// that programs the new GUID into B's partitions (on a fabric, the VF resets'
    /// own sweeps can then carry the change). The gate is the same. Safe in the
    /// model, but measured slower on OpenSM (docs/model-check.md): not the
    /// engine's order.
    OneSweepApplyFirst,
}

impl Protocol {
    /// Whether the revoke and the grant go to the SM in one apply.
    #[must_use]
    pub fn one_sweep(self) -> bool {
        self != Protocol::TwoSweep
    }
}

/// The handover model, with the gate under test.
#[derive(Clone, Debug)]
pub struct Handover {
    /// The engine's protocol.
    pub protocol: Protocol,
    /// The gate.
    pub gate: GateKind,
    /// What the SM's read-back reports.
    pub report: SmReport,
    /// The SM starts no sweep past this generation (bounds the state space).
    pub max_generation: u8,
}

impl Handover {
    /// The model with this gate, an SM that reports acknowledged tables, and room
    /// for four sweeps after the initial one.
    #[must_use]
    pub fn new(gate: GateKind) -> Self {
        Handover {
            protocol: Protocol::TwoSweep,
            gate,
            report: SmReport::Acknowledged,
            max_generation: 5,
        }
    }

    /// The same model with another kind of SM report.
    #[must_use]
    pub fn with_report(mut self, report: SmReport) -> Self {
        self.report = report;
        self
    }

    /// The same model with another protocol.
    #[must_use]
    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// The GUID the engine grants B's partitions to (the fresh one, except in the
    /// broken [`Protocol::OneSweepOldGuid`]).
    #[must_use]
    pub fn granted(&self) -> GuidId {
        match self.protocol {
            Protocol::OneSweepOldGuid => GuidId::Old,
            _ => GuidId::New,
        }
    }

    /// Whether the gate lets the engine mark the device `Ready(B)` in `s`.
    #[must_use]
    pub fn gate_open(&self, s: &HandoverState) -> bool {
        let granted = self.granted();
        let configured_granted = match granted {
            GuidId::Old => s.configured_old,
            GuidId::New => s.configured_new,
        };
        let old_configured_clear = !s.configured_old.meets(Keys::A);
        let new_configured_exact = configured_granted == Keys::B;
        let old_programmed_clear = !s
            .reported_for(GuidId::Old)
            .is_some_and(|k| k.meets(Keys::A));
        let new_programmed_exact = s.reported_for(granted) == Some(Keys::B);
        let q1 = old_configured_clear && old_programmed_clear;
        let q2 = new_configured_exact && new_programmed_exact;
        let q3 = s.last_done >= s.ticket && s.last_outcome == SweepEnd::Clean;
        match self.gate {
            GateKind::ReadBack => q1 && q2 && q3,
            GateKind::FixedWait(n) => s.ticks >= n,
            GateKind::ConfiguredOnly => old_configured_clear && new_configured_exact,
            GateKind::WithoutOldRevoked => q2 && q3,
            GateKind::WithoutNewExact => q1 && q3,
            GateKind::WithoutSweepDone => q1 && q2,
        }
    }

    /// Applies a change at the SM: a sweep is requested and the engine's ticket is
    /// the generation of the next sweep to start.
    fn request_after_change(s: &mut HandoverState) {
        s.sweep_requested = true;
        s.ticket = s.generation + 1;
    }
}

impl Model for Handover {
    type State = HandoverState;
    type Action = Action;

    fn init_states(&self) -> Vec<Self::State> {
        // A's VM has stopped; the SM swept once (g1) and the port carries A's table.
        vec![HandoverState {
            engine: EngineStep::Start,
            ticket: 0,
            ticks: 0,
            vm_b: false,
            vf_guid: GuidId::Old,
            port_up: true,
            port_pkeys: Keys::A,
            configured_old: Keys::A,
            configured_new: Keys::NONE,
            reported: Some(PortRecord {
                guid: GuidId::Old,
                pkeys: Keys::A,
            }),
            sweep_requested: false,
            sweep: Sweep::Idle,
            generation: 1,
            last_done: 1,
            last_outcome: SweepEnd::Clean,
        }]
    }

    fn actions(&self, s: &Self::State, actions: &mut Vec<Self::Action>) {
        // Engine: the journal, in order.
        let one = self.protocol.one_sweep();
        match s.engine {
            EngineStep::Start if one => actions.push(Action::RetireOld),
            EngineStep::Start => actions.push(Action::Revoke),
            EngineStep::Revoked => actions.push(Action::RetireOld),
            EngineStep::Retired => actions.push(Action::AllocateNew),
            // The broken variant keeps the old GUID on the VF.
            EngineStep::Allocated if self.protocol == Protocol::OneSweepOldGuid => {
                actions.push(Action::Move);
            }
            EngineStep::Allocated if self.protocol == Protocol::OneSweepApplyFirst => {
                actions.push(Action::Move);
            }
            EngineStep::Allocated | EngineStep::Moved => actions.push(Action::SetGuid),
            EngineStep::GuidSet if one => actions.push(Action::Move),
            EngineStep::GuidSet => actions.push(Action::Grant),
            EngineStep::Granted => {
                if self.gate_open(s) {
                    actions.push(Action::PassGate);
                } else if let GateKind::FixedWait(_) = self.gate {
                    actions.push(Action::Tick);
                } else if !s.sweep_requested && s.sweep == Sweep::Idle {
                    actions.push(Action::RequestSweep);
                }
            }
            EngineStep::Ready => {}
        }
        // Launcher (the broken early start does not wait for the gate).
        let may_start = s.engine == EngineStep::Ready
            || (self.protocol == Protocol::OneSweepEarlyStart && s.engine == EngineStep::Granted);
        if may_start && !s.vm_b {
            actions.push(Action::StartVm);
        }
        // SM.
        match s.sweep {
            Sweep::Idle => {
                // Requested, or periodic: the SM may sweep on its own at any time.
                if s.generation < self.max_generation {
                    actions.push(Action::SweepStart);
                }
            }
            Sweep::Running { .. } => {
                actions.push(Action::SweepFinish);
                actions.push(Action::SweepFail);
            }
        }
        if s.sweep_requested {
            actions.push(Action::LoseRequest);
        }
        // Link.
        if !s.port_up {
            actions.push(Action::LinkUp);
        }
    }

    fn next_state(&self, last: &Self::State, action: Self::Action) -> Option<Self::State> {
        let mut s = last.clone();
        match action {
            Action::Revoke => {
                s.configured_old = s.configured_old.without(Keys::A);
                Self::request_after_change(&mut s);
                s.engine = EngineStep::Revoked;
            }
            Action::RetireOld => s.engine = EngineStep::Retired,
            Action::AllocateNew => s.engine = EngineStep::Allocated,
            Action::SetGuid => {
                // The port keeps its P_Key table; it leaves the fabric to re-initialise.
                s.vf_guid = GuidId::New;
                s.port_up = false;
                s.engine = if s.engine == EngineStep::Moved {
                    EngineStep::Granted
                } else {
                    EngineStep::GuidSet
                };
            }
            Action::Grant => {
                s.configured_new = Keys::B;
                Self::request_after_change(&mut s);
                s.engine = EngineStep::Granted;
            }
            Action::Move => {
                // One apply: the old GUID out of A's partitions and the granted
                // GUID into B's, one sweep requested, one ticket.
                if self.protocol != Protocol::OneSweepNoRevoke {
                    s.configured_old = s.configured_old.without(Keys::A);
                }
                match self.granted() {
                    GuidId::Old => s.configured_old = Keys::B,
                    GuidId::New => s.configured_new = Keys::B,
                }
                Self::request_after_change(&mut s);
                s.engine = if self.protocol == Protocol::OneSweepApplyFirst {
                    EngineStep::Moved
                } else {
                    EngineStep::Granted
                };
            }
            Action::Tick => s.ticks += 1,
            Action::RequestSweep => s.sweep_requested = true,
            Action::PassGate => s.engine = EngineStep::Ready,
            Action::StartVm => s.vm_b = true,
            Action::SweepStart => {
                s.generation += 1;
                s.sweep_requested = false;
                let target = s.port_up.then_some(PortRecord {
                    guid: s.vf_guid,
                    pkeys: match s.vf_guid {
                        GuidId::Old => s.configured_old,
                        GuidId::New => s.configured_new,
                    },
                });
                s.sweep = Sweep::Running {
                    generation: s.generation,
                    target,
                };
                if self.report == SmReport::AheadOfPort {
                    s.reported = target;
                }
            }
            Action::SweepFinish => {
                let Sweep::Running { generation, target } = s.sweep else {
                    return None;
                };
                s.sweep = Sweep::Idle;
                s.last_done = generation;
                match target {
                    // The port was off the fabric: the SM sees no port.
                    None => {
                        s.last_outcome = SweepEnd::Clean;
                        if self.report == SmReport::Acknowledged {
                            s.reported = None;
                        }
                    }
                    Some(t) if s.port_up && s.vf_guid == t.guid => {
                        s.port_pkeys = t.pkeys;
                        s.last_outcome = SweepEnd::Clean;
                        if self.report == SmReport::Acknowledged {
                            s.reported = Some(t);
                        }
                    }
                    // The port vanished or changed its GUID during the sweep.
                    Some(_) => {
                        s.last_outcome = SweepEnd::Errors;
                        if self.report == SmReport::Acknowledged {
                            s.reported = None;
                        }
                    }
                }
            }
            Action::SweepFail => {
                let Sweep::Running { generation, .. } = s.sweep else {
                    return None;
                };
                s.sweep = Sweep::Idle;
                s.last_done = generation;
                s.last_outcome = SweepEnd::Errors;
            }
            Action::LoseRequest => s.sweep_requested = false,
            Action::LinkUp => {
                s.port_up = true;
                s.sweep_requested = true;
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(VM_NEVER_ON_A, |_, s: &HandoverState| !s.b_on_a_membership()),
            Property::sometimes(VM_RUNS, |_, s: &HandoverState| s.vm_b),
        ]
    }
}

/// A path found by the checker, one numbered line per state, with the action that
/// led to it.
#[must_use]
pub fn render(path: &Path<HandoverState, Action>) -> String {
    let mut out = String::new();
    let mut before: Option<Action> = None;
    for (i, (state, action)) in path.clone().into_vec().into_iter().enumerate() {
        let step = match before {
            Some(a) => format!("{a:?}"),
            None => "init".to_string(),
        };
        let _ = writeln!(out, "{i:>2}. {step:<12} {state}");
        before = action;
    }
    out
}
