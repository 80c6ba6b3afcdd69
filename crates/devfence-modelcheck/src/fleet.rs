//! The fleet model: the same IB handover (tenant A → tenant B, fresh GUID, one apply)
//! run by a host agent and **two fabric controllers** that share one SM through an
//! etcd leader lease (DESIGN.md §8, docs/fleet.md, issue 13).
//!
//! `docs/model-check.md` ("Two controllers and a lease") explains it with the state
//! counts and the counterexamples.
//!
//! # What is modelled
//!
//! * **etcd** — the leader key `/P/F/leader`, held by at most one controller under
//!   its lease; its create revision is the controller's **fencing token** (here: the
//!   number of the election, so tokens only grow). The lease may expire at any time
//!   ([`Action::LeaseExpires`]) *without the holder noticing*: that is the
//!   SIGSTOP/SIGCONT case, a paused controller that resumes keeps acting on what it
//!   had in hand (its token, the desired view it read, the apply it was about to
//!   make). It notices only when a fenced step refuses it, or when its keepalive
//!   fails ([`Action::StepDown`], which it may also never do). The host's desired
//!   membership (one revision before the handover, one after the host wrote it) and
//!   the controllers' **observed** word (the desired revision of the view they
//!   read back) are etcd keys too.
//! * **Controllers C1, C2** — each loops: campaign when no lease is held
//!   ([`Action::Campaign`]: the txn `create_revision == 0` → put under a new lease);
//!   read the desired view ([`Action::ReadDesired`]; reads are never guarded); apply
//!   it to the SM ([`Action::Apply`]: the partitions file gets the view and the
//!   controller's token); wait for a sweep that started after the apply to finish and
//!   read the result back at the SA; publish observed ([`Action::Publish`]). At any
//!   point while it waits it may give up and read again ([`Action::Retry`]).
//! * **SM** — the partitions file (configured membership of the old and the new GUID,
//!   and the fence token written with it) and the port's programmed P_Key table,
//!   exactly as in the one-host model: a sweep may start at any time
//!   ([`Action::SweepStart`]: snapshot of the configuration of the GUID the port
//!   presents, nothing if the port is off the fabric) and finish
//!   ([`Action::SweepFinish`]: programs the snapshot if the port still presents that
//!   GUID). The SA reports what the port acknowledged. The port's table belongs to the
//!   port, not the GUID (leak L1).
//! * **Host** — sets the fresh GUID on the VF (its port leaves the fabric until
//!   [`Action::LinkUp`]), writes the handover into desired (old GUID released, new
//!   GUID into B's partitions), waits at its gate ([`Action::PassGate`]: observed ≥
//!   desired, and, with [`HostGate::ObservedAndSa`], its own read at the SA), and
//!   starts B's VM ([`Action::StartVm`]).
//!
//! # Fencing ([`Fencing`])
//!
//! [`Fencing::Full`] is the design: the SM apply re-reads the file's token and refuses
//! when it is higher than the controller's, in the same step as the replace; the
//! controller's read-back checks that the file still holds its token; every etcd write
//! (observed) is a txn guarded by the controller's lease. The other variants drop one
//! part each and must be caught.
//!
//! # When the view is read ([`ViewRead`])
//!
//! [`ViewRead::AfterElection`] is the design: a controller reads the desired view it
//! applies after it won the election. [`ViewRead::CachedBeforeElection`] lets a
//! standby keep a view warm and apply it as soon as it is elected: its token is the
//! newest, so no fence stops it, and the view may predate the host's write.
//!
//! # Properties
//!
//! [`crate::VM_NEVER_ON_A`] (`always`), the one-host property unchanged: never is B's
//! VM running while the VF's port carries any of A's P_Keys, the VF presents the old
//! GUID, or the SM reports the old GUID programmed in, or configures it into, any of
//! A's partitions. [`PORT_NEVER_ON_A`] (`always`): its port-level half alone (the
//! port's table and GUID), which is what the host's own read at the SA guards.
//! [`OBSERVED_STAYS_TRUE`] (`always`): once a controller published
//! observed for the handover, the SM's partitions file never says otherwise (the
//! controllers' word stays true; the host cannot read the file at the SA).
//! [`crate::VM_RUNS`] (`sometimes`): B's VM runs.
//! [`STALE_LEADER_BESIDE_VM`] (`sometimes`): B's VM runs while a deposed controller
//! still holds the pre-handover view — the dangerous schedule is reachable, so a pass
//! is not vacuous.
//!
//! # Bounds
//!
//! At most [`Fleet::max_elections`] elections (tokens 1 … n); everything else is
//! finite by construction (sweeps are tracked per controller as "none / started /
//! finished since my apply", not by generation).

use std::fmt;
use std::fmt::Write as _;

use stateright::{Model, Path, Property};

use crate::{GuidId, Keys, PortRecord, VM_NEVER_ON_A, VM_RUNS};

/// Name of the controllers' own invariant: once observed says the handover is done,
/// the SM's partitions file never says otherwise.
pub const OBSERVED_STAYS_TRUE: &str =
    "once observed says the handover is applied, the SM's file never contradicts it";

/// Name of the port-level half of [`VM_NEVER_ON_A`]: what the host's own read at the
/// SA guards, whatever the controllers do.
pub const PORT_NEVER_ON_A: &str =
    "B's VM never runs on a port that carries A's P_Keys or presents the old GUID";

/// Name of the non-vacuity witness: the dangerous schedule is reachable.
pub const STALE_LEADER_BESIDE_VM: &str =
    "B's VM runs while a deposed controller still holds the pre-handover view";

/// One of the two fabric controllers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ctl {
    /// The first controller.
    C1,
    /// The second controller.
    C2,
}

impl Ctl {
    /// Both controllers.
    pub const ALL: [Ctl; 2] = [Ctl::C1, Ctl::C2];

    /// Its index in [`FleetState::ctl`].
    #[must_use]
    pub fn idx(self) -> usize {
        match self {
            Ctl::C1 => 0,
            Ctl::C2 => 1,
        }
    }
}

/// A revision of the host's desired memberships in etcd (its content is fixed by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Desired {
    /// Before the handover: the old GUID in A's partitions, the new GUID nowhere.
    Before,
    /// The host wrote the handover: the old GUID released, the new GUID in B's.
    Handover,
}

impl Desired {
    /// The membership this revision gives the old GUID.
    #[must_use]
    pub fn old_keys(self) -> Keys {
        match self {
            Desired::Before => Keys::A,
            Desired::Handover => Keys::NONE,
        }
    }

    /// The membership this revision gives the new GUID.
    #[must_use]
    pub fn new_keys(self) -> Keys {
        match self {
            Desired::Before => Keys::NONE,
            Desired::Handover => Keys::B,
        }
    }
}

/// Sweeps seen by a controller since its apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Swept {
    /// No sweep has started since the apply.
    No,
    /// A sweep started after the apply and is running.
    Started,
    /// A sweep that started after the apply has finished.
    Done,
}

/// What a controller is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Knows it does not lead.
    Follower,
    /// [`ViewRead::CachedBeforeElection`] only: a follower that keeps this desired
    /// view warm, to apply it at once when elected.
    Standby(Desired),
    /// Believes it leads; no batch in hand.
    Leader,
    /// Believes it leads and has read this desired view.
    Viewed(Desired),
    /// [`Fencing::CheckThenReplace`] only: checked the file's token, not yet replaced
    /// the file.
    Checked(Desired),
    /// Applied this view to the SM; waits for a sweep and the read-back.
    Applied(Desired, Swept),
}

impl Phase {
    /// The desired view the controller acts on as a leader, if any (a standby's
    /// cache is not acted on until it is elected).
    #[must_use]
    pub fn view(self) -> Option<Desired> {
        match self {
            Phase::Viewed(v) | Phase::Checked(v) | Phase::Applied(v, _) => Some(v),
            Phase::Follower | Phase::Standby(_) | Phase::Leader => None,
        }
    }
}

/// One controller's local state: what it believes, which survives a pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtlState {
    /// Its step.
    pub phase: Phase,
    /// The fencing token of its last election (0: never elected).
    pub token: u8,
}

/// The host's last step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostStep {
    /// A's VM is stopped; the VF presents the old GUID.
    Start,
    /// The VF presents the fresh GUID (old one retired, new one allocated).
    GuidSet,
    /// The handover is in desired; the host waits at its gate.
    Written,
    /// The gate passed: `Ready(B)`.
    Ready,
}

/// One state of the fleet.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FleetState {
    /// The controllers' local states.
    pub ctl: [CtlState; 2],
    /// etcd: the live lease on `/P/F/leader` — its holder and token.
    pub leader: Option<(Ctl, u8)>,
    /// etcd: elections so far (the last token handed out).
    pub elections: u8,
    /// etcd: the host's desired memberships.
    pub desired: Desired,
    /// etcd: the desired revision of the last observed the controllers published.
    pub observed: Desired,
    /// Host: its last step.
    pub host: HostStep,
    /// Host: B's VM is running.
    pub vm_b: bool,
    /// VF: the GUID it presents.
    pub vf_guid: GuidId,
    /// VF: its port is on the fabric.
    pub port_up: bool,
    /// VF: the P_Key table its port really carries.
    pub port_pkeys: Keys,
    /// SM partitions file: the old GUID's configured membership.
    pub cfg_old: Keys,
    /// SM partitions file: the new GUID's configured membership.
    pub cfg_new: Keys,
    /// SM partitions file: the fence token written with it (0: none yet).
    pub file_token: u8,
    /// SA: what it reports as programmed on the port (`None`: it sees no port).
    pub reported: Option<PortRecord>,
    /// SM: the running sweep and its snapshot (`Some(None)`: port off the fabric).
    pub sweep: Option<Option<PortRecord>>,
}

impl FleetState {
    /// P_Keys the SA reports as programmed for `guid` (none when no port presents it).
    #[must_use]
    pub fn reported_for(&self, guid: GuidId) -> Option<Keys> {
        self.reported.filter(|r| r.guid == guid).map(|r| r.pkeys)
    }

    /// Whether the SA's programmed view shows `view` done for the handover's GUIDs:
    /// a GUID it grants is programmed with exactly that, a GUID it releases is
    /// programmed in none of A's partitions.
    #[must_use]
    pub fn sa_shows(&self, view: Desired) -> bool {
        let new_ok = view.new_keys() == Keys::NONE
            || self.reported_for(GuidId::New) == Some(view.new_keys());
        let old_ok = view.old_keys().meets(Keys::A)
            || !self
                .reported_for(GuidId::Old)
                .is_some_and(|k| k.meets(Keys::A));
        new_ok && old_ok
    }

    /// The safety property's violation (the one-host model's, unchanged).
    #[must_use]
    pub fn b_on_a_membership(&self) -> bool {
        self.vm_b
            && (self.port_pkeys.meets(Keys::A)
                || self.vf_guid == GuidId::Old
                || self.cfg_old.meets(Keys::A)
                || self
                    .reported_for(GuidId::Old)
                    .is_some_and(|k| k.meets(Keys::A)))
    }

    /// B's VM runs on a port that carries A's P_Keys or presents the old GUID.
    #[must_use]
    pub fn b_on_a_port(&self) -> bool {
        self.vm_b && (self.port_pkeys.meets(Keys::A) || self.vf_guid == GuidId::Old)
    }

    /// Observed says the handover is applied while the SM's file says otherwise.
    #[must_use]
    pub fn observed_contradicted(&self) -> bool {
        self.observed == Desired::Handover
            && (self.cfg_old != Desired::Handover.old_keys()
                || self.cfg_new != Desired::Handover.new_keys())
    }

    /// B's VM runs while a controller that no longer holds the lease still holds the
    /// view from before the handover.
    #[must_use]
    pub fn stale_leader_beside_vm(&self) -> bool {
        self.vm_b
            && Ctl::ALL.iter().any(|&c| {
                let me = self.ctl[c.idx()];
                me.phase.view() == Some(Desired::Before) && self.leader != Some((c, me.token))
            })
    }

    fn cfg(&self, guid: GuidId) -> Keys {
        match guid {
            GuidId::Old => self.cfg_old,
            GuidId::New => self.cfg_new,
        }
    }
}

impl fmt::Display for FleetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ctl = |c: Ctl| {
            let me = self.ctl[c.idx()];
            let phase = match me.phase {
                Phase::Follower => "follower".to_string(),
                Phase::Standby(v) => format!("standby {v:?}"),
                Phase::Leader => "leader".to_string(),
                Phase::Viewed(v) => format!("viewed {v:?}"),
                Phase::Checked(v) => format!("checked {v:?}"),
                Phase::Applied(v, s) => format!("applied {v:?} swept={s:?}"),
            };
            format!("{c:?}[t{} {phase}]", me.token)
        };
        let leader = match self.leader {
            Some((c, t)) => format!("{c:?}/t{t}"),
            None => "none".to_string(),
        };
        let sweep = match self.sweep {
            None => "idle".to_string(),
            Some(Some(t)) => format!("→ {:?}:{:?}", t.guid, t.pkeys),
            Some(None) => "→ (port off fabric)".to_string(),
        };
        let reported = match self.reported {
            Some(r) => format!("{:?}:{:?}", r.guid, r.pkeys),
            None => "no port".to_string(),
        };
        write!(
            f,
            "{} {} lease={leader} | desired={:?} observed={:?} | host={:?} vm_b={} | vf={:?} {} \
             port={:?} | file old={:?} new={:?} t{} | sa {reported} | sweep {sweep}",
            ctl(Ctl::C1),
            ctl(Ctl::C2),
            self.desired,
            self.observed,
            self.host,
            self.vm_b,
            self.vf_guid,
            if self.port_up { "up" } else { "down" },
            self.port_pkeys,
            self.cfg_old,
            self.cfg_new,
            self.file_token,
        )
    }
}

/// One step of one actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// etcd txn: no leader key → put it under a new lease; the token is the next
    /// election's number.
    Campaign(Ctl),
    /// The leader's lease expires (it is paused, or cut off); it does not notice.
    LeaseExpires,
    /// A controller whose lease is gone notices (keepalive failed) and follows.
    StepDown(Ctl),
    /// A controller that believes it leads reads the desired view (or, with
    /// [`ViewRead::CachedBeforeElection`], a follower warms its cache).
    ReadDesired(Ctl),
    /// Replace the SM's partitions file with the view (and the token), in one step
    /// with the token check when the fencing has one.
    Apply(Ctl),
    /// [`Fencing::CheckThenReplace`]: re-read the file and compare its token.
    CheckToken(Ctl),
    /// [`Fencing::CheckThenReplace`]: replace the file (checked one step earlier).
    ReplaceFile(Ctl),
    /// Publish observed (a txn guarded by the lease when the fencing says so).
    Publish(Ctl),
    /// Give up waiting for the read-back; read desired again.
    Retry(Ctl),
    /// Host: the VF presents the fresh GUID; its port re-initialises.
    SetGuid,
    /// Host: write the handover into desired (under the host's lease).
    WriteDesired,
    /// Host: the gate passes; `Ready(B)`.
    PassGate,
    /// Host: start B's VM.
    StartVm,
    /// SM: a sweep starts.
    SweepStart,
    /// SM: the running sweep finishes.
    SweepFinish,
    /// Link: the VF's port is back on the fabric.
    LinkUp,
}

/// How the controllers fence themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fencing {
    /// The design: the token checked at the SM in the step that replaces the file,
    /// checked again on read-back, and every etcd write guarded by the lease.
    Full,
    /// Broken: no token at the SM, no lease guard: a stale leader may apply on stale
    /// data and publish.
    None,
    /// Broken: etcd writes guarded by the lease, no token at the SM.
    LeaseOnly,
    /// Broken: the token at the SM, etcd writes not guarded by the lease.
    TokenOnly,
    /// Broken: the token and the lease guard, but the SM's token check and the file's
    /// replacement are two steps (a controller paused between them writes later).
    CheckThenReplace,
}

impl Fencing {
    /// Whether the SM's file carries the token and an apply checks it.
    #[must_use]
    pub fn token_at_sm(self) -> bool {
        matches!(
            self,
            Fencing::Full | Fencing::TokenOnly | Fencing::CheckThenReplace
        )
    }

    /// Whether every etcd write of a controller is guarded by its lease.
    #[must_use]
    pub fn lease_guard(self) -> bool {
        matches!(
            self,
            Fencing::Full | Fencing::LeaseOnly | Fencing::CheckThenReplace
        )
    }
}

/// What the host's gate reads before it marks the device `Ready(B)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostGate {
    /// The design: observed ≥ desired, and its own read at the SA (the new GUID
    /// programmed with exactly B's partitions, the old one in none of A's).
    ObservedAndSa,
    /// Broken: the controller's observed word alone.
    ObservedOnly,
}

/// When a controller publishes observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PublishWhen {
    /// The design: after a sweep that started after its apply finished, the SA shows
    /// the view, and (with a token at the SM) the file still holds its token.
    AfterReadBack,
    /// Broken: right after the apply, before the sweep.
    BeforeSweep,
}

/// When a controller reads the desired view it applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ViewRead {
    /// The design: after it won the election (a linearizable read, so at a
    /// revision at or after its token, the leader key's create revision).
    AfterElection,
    /// Broken: a standby keeps the view warm while it follows and applies it as
    /// soon as it is elected.
    CachedBeforeElection,
}

/// The fleet model with its variants.
#[derive(Clone, Debug)]
pub struct Fleet {
    /// The controllers' fencing.
    pub fencing: Fencing,
    /// The host's gate.
    pub gate: HostGate,
    /// When controllers publish observed.
    pub publish: PublishWhen,
    /// When controllers read the view they apply.
    pub view_read: ViewRead,
    /// At most this many elections (bounds the state space).
    pub max_elections: u8,
}

impl Fleet {
    /// The design's gate and publication with this fencing, up to three elections.
    #[must_use]
    pub fn new(fencing: Fencing) -> Self {
        Fleet {
            fencing,
            gate: HostGate::ObservedAndSa,
            publish: PublishWhen::AfterReadBack,
            view_read: ViewRead::AfterElection,
            max_elections: 3,
        }
    }

    /// The same model with another host gate.
    #[must_use]
    pub fn with_gate(mut self, gate: HostGate) -> Self {
        self.gate = gate;
        self
    }

    /// The same model with another publication rule.
    #[must_use]
    pub fn with_publish(mut self, publish: PublishWhen) -> Self {
        self.publish = publish;
        self
    }

    /// The same model with another rule for reading the view.
    #[must_use]
    pub fn with_view_read(mut self, view_read: ViewRead) -> Self {
        self.view_read = view_read;
        self
    }

    /// Whether the host's gate opens in `s`.
    #[must_use]
    pub fn gate_open(&self, s: &FleetState) -> bool {
        let observed = s.observed >= Desired::Handover;
        match self.gate {
            HostGate::ObservedAndSa => observed && s.sa_shows(Desired::Handover),
            HostGate::ObservedOnly => observed,
        }
    }

    /// Whether the SM refuses an apply with `token` (a higher token is in the file).
    fn refused(&self, s: &FleetState, token: u8) -> bool {
        self.fencing.token_at_sm() && s.file_token > token
    }

    /// Replaces the SM's partitions file with `view` (and the token, if any).
    fn replace_file(&self, s: &mut FleetState, c: Ctl, view: Desired) {
        s.cfg_old = view.old_keys();
        s.cfg_new = view.new_keys();
        if self.fencing.token_at_sm() {
            s.file_token = s.ctl[c.idx()].token;
        }
        s.ctl[c.idx()].phase = Phase::Applied(view, Swept::No);
    }

    /// Whether `c`'s read-back confirms its apply (so it may publish).
    fn read_back(&self, s: &FleetState, c: Ctl, view: Desired, swept: Swept) -> bool {
        match self.publish {
            PublishWhen::BeforeSweep => true,
            PublishWhen::AfterReadBack => {
                swept == Swept::Done
                    && s.sa_shows(view)
                    && (!self.fencing.token_at_sm() || s.file_token == s.ctl[c.idx()].token)
            }
        }
    }
}

impl Model for Fleet {
    type State = FleetState;
    type Action = Action;

    fn init_states(&self) -> Vec<Self::State> {
        // A's VM has stopped; the SM's file puts the old GUID into A's partitions
        // and the port carries A's table. No controller has been elected yet.
        let follower = CtlState {
            phase: Phase::Follower,
            token: 0,
        };
        vec![FleetState {
            ctl: [follower, follower],
            leader: None,
            elections: 0,
            desired: Desired::Before,
            observed: Desired::Before,
            host: HostStep::Start,
            vm_b: false,
            vf_guid: GuidId::Old,
            port_up: true,
            port_pkeys: Keys::A,
            cfg_old: Keys::A,
            cfg_new: Keys::NONE,
            file_token: 0,
            reported: Some(PortRecord {
                guid: GuidId::Old,
                pkeys: Keys::A,
            }),
            sweep: None,
        }]
    }

    fn actions(&self, s: &Self::State, actions: &mut Vec<Self::Action>) {
        // etcd.
        if s.leader.is_some() {
            actions.push(Action::LeaseExpires);
        }
        // Controllers.
        for c in Ctl::ALL {
            let me = s.ctl[c.idx()];
            let holds_lease = s.leader == Some((c, me.token));
            match me.phase {
                Phase::Follower | Phase::Standby(_) => {
                    if s.leader.is_none() && s.elections < self.max_elections {
                        actions.push(Action::Campaign(c));
                    }
                    if self.view_read == ViewRead::CachedBeforeElection {
                        actions.push(Action::ReadDesired(c));
                    }
                }
                Phase::Leader => actions.push(Action::ReadDesired(c)),
                Phase::Viewed(_) => {
                    if self.fencing == Fencing::CheckThenReplace {
                        actions.push(Action::CheckToken(c));
                    } else {
                        actions.push(Action::Apply(c));
                    }
                }
                Phase::Checked(_) => actions.push(Action::ReplaceFile(c)),
                Phase::Applied(view, swept) => {
                    if self.read_back(s, c, view, swept) {
                        actions.push(Action::Publish(c));
                    }
                    actions.push(Action::Retry(c));
                }
            }
            let follows = matches!(me.phase, Phase::Follower | Phase::Standby(_));
            if !follows && !holds_lease {
                actions.push(Action::StepDown(c));
            }
        }
        // Host.
        match s.host {
            HostStep::Start => actions.push(Action::SetGuid),
            HostStep::GuidSet => actions.push(Action::WriteDesired),
            HostStep::Written => {
                if self.gate_open(s) {
                    actions.push(Action::PassGate);
                }
            }
            HostStep::Ready => {
                if !s.vm_b {
                    actions.push(Action::StartVm);
                }
            }
        }
        // SM and link.
        match s.sweep {
            None => actions.push(Action::SweepStart),
            Some(_) => actions.push(Action::SweepFinish),
        }
        if !s.port_up {
            actions.push(Action::LinkUp);
        }
    }

    fn next_state(&self, last: &Self::State, action: Self::Action) -> Option<Self::State> {
        let mut s = last.clone();
        match action {
            Action::Campaign(c) => {
                s.elections += 1;
                s.leader = Some((c, s.elections));
                // A standby applies its cached view at once.
                let phase = match s.ctl[c.idx()].phase {
                    Phase::Standby(view) => Phase::Viewed(view),
                    _ => Phase::Leader,
                };
                s.ctl[c.idx()] = CtlState {
                    phase,
                    token: s.elections,
                };
            }
            Action::LeaseExpires => s.leader = None,
            Action::StepDown(c) => s.ctl[c.idx()].phase = Phase::Follower,
            Action::ReadDesired(c) => {
                s.ctl[c.idx()].phase = match s.ctl[c.idx()].phase {
                    Phase::Follower | Phase::Standby(_) => Phase::Standby(s.desired),
                    _ => Phase::Viewed(s.desired),
                };
            }
            Action::Apply(c) => {
                let me = s.ctl[c.idx()];
                let Phase::Viewed(view) = me.phase else {
                    return None;
                };
                if self.refused(&s, me.token) {
                    // A newer leader has applied: this one has lost and follows.
                    s.ctl[c.idx()].phase = Phase::Follower;
                } else {
                    self.replace_file(&mut s, c, view);
                }
            }
            Action::CheckToken(c) => {
                let me = s.ctl[c.idx()];
                let Phase::Viewed(view) = me.phase else {
                    return None;
                };
                s.ctl[c.idx()].phase = if self.refused(&s, me.token) {
                    Phase::Follower
                } else {
                    Phase::Checked(view)
                };
            }
            Action::ReplaceFile(c) => {
                let Phase::Checked(view) = s.ctl[c.idx()].phase else {
                    return None;
                };
                self.replace_file(&mut s, c, view);
            }
            Action::Publish(c) => {
                let me = s.ctl[c.idx()];
                let Phase::Applied(view, _) = me.phase else {
                    return None;
                };
                if self.fencing.lease_guard() && s.leader != Some((c, me.token)) {
                    // The txn's lease compare fails: nothing is written.
                    s.ctl[c.idx()].phase = Phase::Follower;
                } else {
                    s.observed = view;
                    s.ctl[c.idx()].phase = Phase::Leader;
                }
            }
            Action::Retry(c) => s.ctl[c.idx()].phase = Phase::Leader,
            Action::SetGuid => {
                // The port keeps its P_Key table; it leaves the fabric to re-initialise.
                s.vf_guid = GuidId::New;
                s.port_up = false;
                s.host = HostStep::GuidSet;
            }
            Action::WriteDesired => {
                s.desired = Desired::Handover;
                s.host = HostStep::Written;
            }
            Action::PassGate => s.host = HostStep::Ready,
            Action::StartVm => s.vm_b = true,
            Action::SweepStart => {
                let target = s.port_up.then(|| PortRecord {
                    guid: s.vf_guid,
                    pkeys: s.cfg(s.vf_guid),
                });
                s.sweep = Some(target);
                for me in &mut s.ctl {
                    if let Phase::Applied(view, Swept::No) = me.phase {
                        me.phase = Phase::Applied(view, Swept::Started);
                    }
                }
            }
            Action::SweepFinish => {
                let target = s.sweep?;
                s.sweep = None;
                match target {
                    // The port presents the GUID it was snapshotted with: programmed.
                    Some(t) if s.port_up && s.vf_guid == t.guid => {
                        s.port_pkeys = t.pkeys;
                        s.reported = Some(t);
                    }
                    // Off the fabric, or it changed its GUID during the sweep.
                    _ => s.reported = None,
                }
                for me in &mut s.ctl {
                    if let Phase::Applied(view, Swept::Started) = me.phase {
                        me.phase = Phase::Applied(view, Swept::Done);
                    }
                }
            }
            Action::LinkUp => s.port_up = true,
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(VM_NEVER_ON_A, |_, s: &FleetState| !s.b_on_a_membership()),
            Property::always(PORT_NEVER_ON_A, |_, s: &FleetState| !s.b_on_a_port()),
            Property::always(OBSERVED_STAYS_TRUE, |_, s: &FleetState| {
                !s.observed_contradicted()
            }),
            Property::sometimes(VM_RUNS, |_, s: &FleetState| s.vm_b),
            Property::sometimes(STALE_LEADER_BESIDE_VM, |_, s: &FleetState| {
                s.stale_leader_beside_vm()
            }),
        ]
    }
}

/// A path found by the checker, one numbered line per state, with the action that
/// led to it.
#[must_use]
pub fn render(path: &Path<FleetState, Action>) -> String {
    let mut out = String::new();
    let mut before: Option<Action> = None;
    for (i, (state, action)) in path.clone().into_vec().into_iter().enumerate() {
        let step = match before {
            Some(a) => format!("{a:?}"),
            None => "init".to_string(),
        };
        let _ = writeln!(out, "{i:>2}. {step:<17} {state}");
        before = action;
    }
    out
}
