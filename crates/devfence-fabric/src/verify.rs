//! The handover gate at the SM, decided purely from read-back.
//!
//! Every IB handover asks three questions of the SM (docs/design.md §1 L1, §4):
//!
//! 1. **Old revoked** — the old GUID is in none of the old tenant's partitions
//!    (absent from the fabric counts as "in none"; a configured membership, where
//!    the backend can read one, must be gone too, or the port would get it back).
//! 2. **New exact** — the new GUID is on the fabric and in exactly the new
//!    tenant's partitions with the requested membership (tables compared as sets;
//!    only the explicitly tolerated P_Keys — by default the default partition,
//!    limited — may also be there).
//! 3. **Sweep done** — the SM is master, and its last completed sweep is at the
//!    ticket's generation or later and finished without errors.
//!
//! [`verify`] answers them from one [`Observation`]; it never waits and never
//! assumes. [`wait_verified`] polls until a deadline; how fast it polls is not part
//! of correctness, and on timeout it returns the last evidence it saw.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use devfence_model::{Guid, Membership, PKey};

use crate::{
    FabricError, Generation, Observation, PartitionKey, PortView, Programmed, SmState,
    SubnetManager, SweepOutcome, Ticket,
};

/// Question 1 for one GUID: it must be in none of these partitions.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Revocation {
    /// The old port GUID.
    pub guid: Guid,
    /// The old tenant's partitions (either membership counts).
    pub partitions: BTreeSet<PartitionKey>,
}

/// Question 2 for one GUID: it must be in exactly these partitions.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Grant {
    /// The new port GUID.
    pub guid: Guid,
    /// The new tenant's partitions with the requested membership.
    pub partitions: BTreeMap<PartitionKey, Membership>,
    /// P_Keys (with their membership bit) that may also be on the port without
    /// failing "exactly": by default only the default partition, limited (`0x7fff`).
    /// Full membership of the default partition is never tolerated by default.
    pub tolerated: BTreeSet<PKey>,
}

impl Grant {
    /// The P_Keys the port table must hold.
    #[must_use]
    pub fn expected_pkeys(&self) -> BTreeSet<PKey> {
        self.partitions.iter().map(|(p, m)| p.pkey(*m)).collect()
    }
}

/// What must be read back before a gate opens.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Expectation {
    /// Question 1, per old GUID.
    pub revoke: Vec<Revocation>,
    /// Question 2, per new GUID.
    pub grant: Vec<Grant>,
    /// Question 3: the generation the SM must have completed (cleanly).
    pub after: Generation,
}

impl Expectation {
    /// An expectation with only question 3: the SM completed `ticket`'s sweep.
    #[must_use]
    pub fn after(ticket: Ticket) -> Self {
        Self {
            revoke: Vec::new(),
            grant: Vec::new(),
            after: ticket.generation,
        }
    }

    /// Adds question 1 for `guid`.
    #[must_use]
    pub fn revoke(
        mut self,
        guid: Guid,
        partitions: impl IntoIterator<Item = PartitionKey>,
    ) -> Self {
        self.revoke.push(Revocation {
            guid,
            partitions: partitions.into_iter().collect(),
        });
        self
    }

    /// Adds question 2 for `guid`, tolerating only the default partition, limited.
    #[must_use]
    pub fn grant(
        self,
        guid: Guid,
        partitions: impl IntoIterator<Item = (PartitionKey, Membership)>,
    ) -> Self {
        self.grant_tolerating(guid, partitions, [PKey(PKey::DEFAULT_BASE)])
    }

    /// Adds question 2 for `guid` with an explicit set of tolerated extra P_Keys.
    #[must_use]
    pub fn grant_tolerating(
        mut self,
        guid: Guid,
        partitions: impl IntoIterator<Item = (PartitionKey, Membership)>,
        tolerated: impl IntoIterator<Item = PKey>,
    ) -> Self {
        self.grant.push(Grant {
            guid,
            partitions: partitions.into_iter().collect(),
            tolerated: tolerated.into_iter().collect(),
        });
        self
    }

    /// The whole handover of one port: `old` out of the old tenant's partitions,
    /// `new` in exactly the new tenant's, at `ticket`'s sweep or later.
    #[must_use]
    pub fn handover(
        ticket: Ticket,
        old: Option<(Guid, &[PartitionKey])>,
        new: Option<(Guid, &[(PartitionKey, Membership)])>,
    ) -> Self {
        let mut e = Self::after(ticket);
        if let Some((g, parts)) = old {
            e = e.revoke(g, parts.iter().copied());
        }
        if let Some((g, parts)) = new {
            e = e.grant(g, parts.iter().copied());
        }
        e
    }

    /// Every GUID an observation must cover (what to pass to
    /// [`SubnetManager::observe`]).
    #[must_use]
    pub fn guids(&self) -> Vec<Guid> {
        let set: BTreeSet<Guid> = self
            .revoke
            .iter()
            .map(|r| r.guid)
            .chain(self.grant.iter().map(|g| g.guid))
            .collect();
        set.into_iter().collect()
    }
}

/// The three questions of a handover.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    schemars::JsonSchema,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Question {
    /// 1: the old GUID is in none of the old tenant's partitions.
    OldRevoked,
    /// 2: the new GUID is in exactly the new tenant's partitions.
    NewExact,
    /// 3: the SM completed the sweep that applied the change, cleanly.
    SweepDone,
}

impl fmt::Display for Question {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Question::OldRevoked => "Q1 old GUID revoked",
            Question::NewExact => "Q2 new GUID in exactly the new partitions",
            Question::SweepDone => "Q3 SM finished the sweep",
        })
    }
}

/// Which of the SM's views a piece of evidence comes from.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// What the SM programmed on the port.
    Programmed,
    /// The SM's configured membership.
    Configured,
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            View::Programmed => "programmed",
            View::Configured => "configured",
        })
    }
}

/// What was seen that fails a question.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Evidence {
    /// The observation has no view of this GUID (fail closed).
    NotObserved {
        /// The GUID.
        guid: Guid,
    },
    /// Q1: the old GUID still holds some of the old partitions.
    StillMember {
        /// The old GUID.
        guid: Guid,
        /// Which view.
        view: View,
        /// Every P_Key seen in that view.
        seen: BTreeSet<PKey>,
        /// The old tenant's P_Keys among them.
        forbidden: BTreeSet<PKey>,
    },
    /// Q2: the new GUID is not on the fabric.
    Absent {
        /// The new GUID.
        guid: Guid,
        /// What it should hold.
        expected: BTreeSet<PKey>,
    },
    /// Q2: the new GUID's P_Keys differ from the new tenant's.
    Mismatch {
        /// The new GUID.
        guid: Guid,
        /// Which view.
        view: View,
        /// Every P_Key seen in that view.
        seen: BTreeSet<PKey>,
        /// What it should hold.
        expected: BTreeSet<PKey>,
        /// Expected but not seen.
        missing: BTreeSet<PKey>,
        /// Seen, neither expected nor tolerated.
        unexpected: BTreeSet<PKey>,
    },
    /// Q3: the SM has not (cleanly) completed the needed sweep.
    Sweep {
        /// The SM's role.
        state: SmState,
        /// The generation seen.
        seen: Generation,
        /// The generation needed.
        needed: Generation,
        /// How the last sweep ended.
        sweep: SweepOutcome,
    },
}

/// One failed question with its evidence.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Failure {
    /// Which question.
    pub question: Question,
    /// What was seen.
    pub evidence: Evidence,
}

impl Failure {
    /// What an operator can do about it.
    #[must_use]
    pub fn hint(&self) -> &'static str {
        match &self.evidence {
            Evidence::NotObserved { .. } => {
                "the backend returned no view of this GUID; check that the SM answers queries for it"
            }
            Evidence::StillMember { .. } => {
                "the removal has not reached the SM yet; if it persists, re-apply the removal and check the SM's partition configuration"
            }
            Evidence::Absent { .. } => {
                "the port with this GUID is not on the fabric: check that the VF carries the new GUID and its link is up"
            }
            Evidence::Mismatch { .. } => {
                "the SM has not programmed the requested membership; if it persists after a sweep the update was lost: re-apply"
            }
            Evidence::Sweep { state, .. } if *state != SmState::Master => {
                "the SM is not master: check which SM runs the subnet"
            }
            Evidence::Sweep { .. } => {
                "the SM has not finished a clean sweep since the change; check that it is running and its log for errors"
            }
        }
    }
}

fn set(s: &BTreeSet<PKey>) -> String {
    if s.is_empty() {
        return "none".to_string();
    }
    s.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.question)?;
        match &self.evidence {
            Evidence::NotObserved { guid } => write!(f, "GUID {guid} not in the observation")?,
            Evidence::StillMember {
                guid,
                view,
                seen,
                forbidden,
            } => write!(
                f,
                "GUID {guid} still holds {} ({view}: {})",
                set(forbidden),
                set(seen)
            )?,
            Evidence::Absent { guid, expected } => write!(
                f,
                "GUID {guid} is not on the fabric (expected {})",
                set(expected)
            )?,
            Evidence::Mismatch {
                guid,
                view,
                seen,
                expected,
                missing,
                unexpected,
            } => write!(
                f,
                "GUID {guid} {view} {} but expected {} (missing {}, unexpected {})",
                set(seen),
                set(expected),
                set(missing),
                set(unexpected)
            )?,
            Evidence::Sweep {
                state,
                seen,
                needed,
                sweep,
            } => write!(
                f,
                "SM {state}, {seen} seen, {needed} needed, last sweep {sweep}"
            )?,
        }
        write!(f, ". Hint: {}", self.hint())
    }
}

/// What read-back proved: kept as the gate's evidence for the audit record.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Proof {
    /// The generation the SM was seen at.
    pub seen: Generation,
    /// The generation that was needed.
    pub needed: Generation,
    /// The views of every GUID checked.
    pub ports: Vec<PortView>,
}

/// The answer of [`verify`].
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// All three questions answered yes.
    Verified(Proof),
    /// At least one question failed; every failure with its evidence, in question order.
    NotVerified(Vec<Failure>),
}

impl Verdict {
    /// True for [`Verdict::Verified`].
    #[must_use]
    pub fn is_verified(&self) -> bool {
        matches!(self, Verdict::Verified(_))
    }
    /// The failures (empty when verified).
    #[must_use]
    pub fn failures(&self) -> &[Failure] {
        match self {
            Verdict::Verified(_) => &[],
            Verdict::NotVerified(f) => f,
        }
    }
    /// The questions that failed.
    #[must_use]
    pub fn failed(&self) -> BTreeSet<Question> {
        self.failures().iter().map(|f| f.question).collect()
    }
}

fn port_sets(v: &PortView) -> Vec<(View, Option<&BTreeSet<PKey>>)> {
    let mut out = Vec::with_capacity(2);
    match &v.programmed {
        Programmed::Absent => out.push((View::Programmed, None)),
        Programmed::Present { pkeys, .. } => out.push((View::Programmed, Some(pkeys))),
    }
    if let Some(c) = &v.configured {
        out.push((View::Configured, Some(c)));
    }
    out
}

/// Answers the three questions of `expectation` from `observation` alone.
///
/// Fails closed: a GUID the observation does not cover, a port that is not on the
/// fabric (for a grant), a configured view that disagrees with the programmed one,
/// a non-master SM, a sweep with errors, or no sweep at all: each is a failure
/// with its evidence, never a pass.
#[must_use]
pub fn verify(observation: &Observation, expectation: &Expectation) -> Verdict {
    let mut failures = Vec::new();

    for r in &expectation.revoke {
        let Some(view) = observation.ports.get(&r.guid) else {
            failures.push(Failure {
                question: Question::OldRevoked,
                evidence: Evidence::NotObserved { guid: r.guid },
            });
            continue;
        };
        for (which, seen) in port_sets(view) {
            let Some(seen) = seen else { continue }; // absent: in no partition
            let forbidden: BTreeSet<PKey> = seen
                .iter()
                .copied()
                .filter(|k| r.partitions.iter().any(|p| p.matches(*k)))
                .collect();
            if !forbidden.is_empty() {
                failures.push(Failure {
                    question: Question::OldRevoked,
                    evidence: Evidence::StillMember {
                        guid: r.guid,
                        view: which,
                        seen: seen.clone(),
                        forbidden,
                    },
                });
            }
        }
    }

    for g in &expectation.grant {
        let expected = g.expected_pkeys();
        let Some(view) = observation.ports.get(&g.guid) else {
            failures.push(Failure {
                question: Question::NewExact,
                evidence: Evidence::NotObserved { guid: g.guid },
            });
            continue;
        };
        for (which, seen) in port_sets(view) {
            let Some(seen) = seen else {
                failures.push(Failure {
                    question: Question::NewExact,
                    evidence: Evidence::Absent {
                        guid: g.guid,
                        expected: expected.clone(),
                    },
                });
                continue;
            };
            let missing: BTreeSet<PKey> = expected.difference(seen).copied().collect();
            let unexpected: BTreeSet<PKey> = seen
                .iter()
                .copied()
                .filter(|k| !expected.contains(k) && !g.tolerated.contains(k))
                .collect();
            if !missing.is_empty() || !unexpected.is_empty() {
                failures.push(Failure {
                    question: Question::NewExact,
                    evidence: Evidence::Mismatch {
                        guid: g.guid,
                        view: which,
                        seen: seen.clone(),
                        expected: expected.clone(),
                        missing,
                        unexpected,
                    },
                });
            }
        }
    }

    let st = &observation.status;
    if st.state != SmState::Master
        || st.generation < expectation.after
        || st.sweep != SweepOutcome::Clean
    {
        failures.push(Failure {
            question: Question::SweepDone,
            evidence: Evidence::Sweep {
                state: st.state,
                seen: st.generation,
                needed: expectation.after,
                sweep: st.sweep.clone(),
            },
        });
    }

    if failures.is_empty() {
        Verdict::Verified(Proof {
            seen: st.generation,
            needed: expectation.after,
            ports: expectation
                .guids()
                .iter()
                .filter_map(|g| observation.ports.get(g).cloned())
                .collect(),
        })
    } else {
        Verdict::NotVerified(failures)
    }
}

/// How fast [`wait_verified`] polls. Pace only: a slow pace makes a gate slower,
/// never wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    /// The pause after the first unverified poll.
    pub first: Duration,
    /// The longest pause between polls (the pause doubles up to this).
    pub max: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(1),
            max: Duration::from_millis(50),
        }
    }
}

/// The last thing seen before [`wait_verified`] gave up.
#[derive(Debug)]
pub enum Unverified {
    /// The SM answered, and these questions failed.
    Failures(Vec<Failure>),
    /// The SM could not be read.
    Unreadable(FabricError),
}

impl fmt::Display for Unverified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unverified::Failures(fs) => {
                for (i, x) in fs.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{x}")?;
                }
                Ok(())
            }
            Unverified::Unreadable(e) => write!(f, "SM unreadable: {e}"),
        }
    }
}

/// [`wait_verified`] gave up: at the deadline, or at once on an error that asking
/// again cannot fix. Carries the last evidence.
#[derive(Debug, thiserror::Error)]
#[error("The SM did not verify the change after {polls} reads in {:.1} ms: {last}", .waited.as_secs_f64() * 1000.0)]
pub struct NotVerified {
    /// The last failures seen, or the last read error.
    pub last: Unverified,
    /// How many times the SM was read.
    pub polls: u32,
    /// How long it waited.
    pub waited: Duration,
}

impl NotVerified {
    /// The questions that failed at the last read (empty if it could not read).
    #[must_use]
    pub fn failed(&self) -> BTreeSet<Question> {
        match &self.last {
            Unverified::Failures(f) => f.iter().map(|x| x.question).collect(),
            Unverified::Unreadable(_) => BTreeSet::new(),
        }
    }
}

/// Reads the SM until `expectation` is verified or `deadline` passes, with the
/// default [`Pace`]. Always reads at least once.
///
/// # Errors
/// [`NotVerified`] with the last evidence.
pub fn wait_verified<S: SubnetManager + ?Sized>(
    sm: &S,
    expectation: &Expectation,
    deadline: Instant,
) -> Result<Proof, NotVerified> {
    wait_verified_with(sm, expectation, deadline, Pace::default(), &mut |_| {})
}

/// As [`wait_verified`], with a pace and a callback that sees every unverified
/// read (for progress output).
///
/// # Errors
/// [`NotVerified`] with the last evidence.
pub fn wait_verified_with<S: SubnetManager + ?Sized>(
    sm: &S,
    expectation: &Expectation,
    deadline: Instant,
    pace: Pace,
    progress: &mut dyn FnMut(&Unverified),
) -> Result<Proof, NotVerified> {
    let start = Instant::now();
    let guids = expectation.guids();
    let mut pause = pace.first;
    let mut polls = 0u32;
    loop {
        polls += 1;
        // The SM's status alone first: while the sweep the expectation needs has
        // not happened, reading every port (one SA query each) cannot verify and
        // only slows the SM down. The full observation below is judged whole.
        let first = sm.observe(&[]);
        let swept = first.as_ref().is_ok_and(|o| {
            o.status.state == SmState::Master
                && o.status.generation >= expectation.after
                && o.status.sweep == SweepOutcome::Clean
        });
        let observed = if swept { sm.observe(&guids) } else { first };
        let last = match observed {
            Ok(obs) => match verify(&obs, expectation) {
                Verdict::Verified(p) => return Ok(p),
                Verdict::NotVerified(f) => Unverified::Failures(f),
            },
            Err(e) => {
                let fatal = !e.is_retryable();
                let u = Unverified::Unreadable(e);
                if fatal {
                    return Err(NotVerified {
                        last: u,
                        polls,
                        waited: start.elapsed(),
                    });
                }
                u
            }
        };
        progress(&last);
        let now = Instant::now();
        if now >= deadline {
            return Err(NotVerified {
                last,
                polls,
                waited: now - start,
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(pace.max.max(pace.first));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChangeId, SmStatus};

    const OLD: Guid = Guid(0x0002_c900_0000_2003);
    const NEW: Guid = Guid(0x0002_c900_0000_e003);

    fn pk(v: u16) -> PartitionKey {
        PartitionKey::new(v).expect("valid")
    }
    fn ticket(g: u64) -> Ticket {
        Ticket {
            change: ChangeId(1),
            generation: Generation(g),
        }
    }
    fn status(g: u64) -> SmStatus {
        SmStatus {
            state: SmState::Master,
            generation: Generation(g),
            sweep: SweepOutcome::Clean,
        }
    }
    fn present(guid: Guid, keys: &[u16]) -> PortView {
        PortView {
            guid,
            programmed: Programmed::Present {
                lid: Some(3),
                pkeys: keys.iter().map(|k| PKey(*k)).collect(),
            },
            configured: None,
        }
    }
    fn obs(g: u64, ports: Vec<PortView>) -> Observation {
        Observation {
            status: status(g),
            ports: ports.into_iter().map(|p| (p.guid, p)).collect(),
        }
    }
    /// A → B handover of one port: OLD leaves 0x8001, NEW gets 0x8002 full.
    fn exp() -> Expectation {
        Expectation::handover(
            ticket(5),
            Some((OLD, &[pk(0x8001)])),
            Some((NEW, &[(pk(0x8002), Membership::Full)])),
        )
    }

    #[test]
    fn all_three_pass() {
        let o = obs(
            5,
            vec![present(OLD, &[0x7fff]), present(NEW, &[0x7fff, 0x8002])],
        );
        let v = verify(&o, &exp());
        let Verdict::Verified(p) = v else {
            panic!("expected verified: {v:?}")
        };
        assert_eq!(p.seen, Generation(5));
        assert_eq!(p.ports.len(), 2);
        // Absent old GUID is "in none"; a later generation is fine.
        let mut o2 = obs(9, vec![present(NEW, &[0x8002])]);
        o2.ports.insert(
            OLD,
            PortView {
                guid: OLD,
                programmed: Programmed::Absent,
                configured: Some(BTreeSet::new()),
            },
        );
        assert!(verify(&o2, &exp()).is_verified());
    }

    #[test]
    fn q1_fires_on_old_membership_either_bit_and_either_view() {
        for k in [0x8001u16, 0x0001] {
            let o = obs(5, vec![present(OLD, &[0x7fff, k]), present(NEW, &[0x8002])]);
            let v = verify(&o, &exp());
            assert_eq!(v.failed(), BTreeSet::from([Question::OldRevoked]), "{v:?}");
            let Evidence::StillMember {
                guid, forbidden, ..
            } = &v.failures()[0].evidence
            else {
                panic!("{v:?}")
            };
            assert_eq!(*guid, OLD);
            assert_eq!(*forbidden, BTreeSet::from([PKey(k)]));
            assert!(v.failures()[0].to_string().contains("Hint:"));
        }
        // Gone from the fabric but still configured: it would come back. Fails.
        let mut o = obs(5, vec![present(NEW, &[0x8002])]);
        o.ports.insert(
            OLD,
            PortView {
                guid: OLD,
                programmed: Programmed::Absent,
                configured: Some(BTreeSet::from([PKey(0x8001)])),
            },
        );
        let v = verify(&o, &exp());
        assert!(matches!(
            v.failures()[0].evidence,
            Evidence::StillMember {
                view: View::Configured,
                ..
            }
        ));
        // Not observed at all: fails closed.
        let o = obs(5, vec![present(NEW, &[0x8002])]);
        let v = verify(&o, &exp());
        assert_eq!(
            v.failures()[0].evidence,
            Evidence::NotObserved { guid: OLD }
        );
    }

    #[test]
    fn q2_fires_on_missing_extra_wrong_membership_absent() {
        let cases: &[(&[u16], &str)] = &[
            (&[0x7fff], "missing"),
            (&[0x8002, 0x8003], "extra partition"),
            (&[0x0002], "limited instead of full"),
            (&[0x8002, 0x0002], "both memberships"),
            (&[0x8002, 0xffff], "default full"),
        ];
        for (keys, why) in cases {
            let o = obs(5, vec![present(OLD, &[]), present(NEW, keys)]);
            let v = verify(&o, &exp());
            assert_eq!(
                v.failed(),
                BTreeSet::from([Question::NewExact]),
                "{why}: {v:?}"
            );
            assert!(
                matches!(v.failures()[0].evidence, Evidence::Mismatch { .. }),
                "{why}"
            );
        }
        let mut o = obs(5, vec![present(OLD, &[])]);
        o.ports.insert(
            NEW,
            PortView {
                guid: NEW,
                programmed: Programmed::Absent,
                configured: None,
            },
        );
        let v = verify(&o, &exp());
        assert!(matches!(
            v.failures()[0].evidence,
            Evidence::Absent { guid: NEW, .. }
        ));
        // Programmed right, configured wrong: fails.
        let mut p = present(NEW, &[0x8002]);
        p.configured = Some(BTreeSet::from([PKey(0x8002), PKey(0x8001)]));
        let o = obs(5, vec![present(OLD, &[]), p]);
        let v = verify(&o, &exp());
        assert!(matches!(
            v.failures()[0].evidence,
            Evidence::Mismatch {
                view: View::Configured,
                ..
            }
        ));
        let o = obs(5, vec![present(OLD, &[])]);
        assert_eq!(
            verify(&o, &exp()).failures()[0].evidence,
            Evidence::NotObserved { guid: NEW }
        );
    }

    #[test]
    fn q3_fires_on_generation_errors_none_and_role() {
        let good = || obs(5, vec![present(OLD, &[]), present(NEW, &[0x8002])]);
        let mut o = good();
        o.status.generation = Generation(4);
        let v = verify(&o, &exp());
        assert_eq!(v.failed(), BTreeSet::from([Question::SweepDone]));
        assert_eq!(
            v.failures()[0].evidence,
            Evidence::Sweep {
                state: SmState::Master,
                seen: Generation(4),
                needed: Generation(5),
                sweep: SweepOutcome::Clean
            }
        );
        assert!(v.failures()[0].to_string().contains("generation 4 seen"));
        for sweep in [SweepOutcome::NoneYet, SweepOutcome::Errors("x".into())] {
            let mut o = good();
            o.status.sweep = sweep;
            assert_eq!(
                verify(&o, &exp()).failed(),
                BTreeSet::from([Question::SweepDone])
            );
        }
        let mut o = good();
        o.status.state = SmState::Standby;
        let v = verify(&o, &exp());
        assert_eq!(v.failed(), BTreeSet::from([Question::SweepDone]));
        assert!(v.failures()[0].hint().contains("not master"));
    }

    #[test]
    fn every_failing_question_is_reported_in_order() {
        let mut o = obs(4, vec![present(OLD, &[0x8001]), present(NEW, &[])]);
        o.status.sweep = SweepOutcome::Errors("e".into());
        let v = verify(&o, &exp());
        let qs: Vec<Question> = v.failures().iter().map(|f| f.question).collect();
        assert_eq!(
            qs,
            vec![
                Question::OldRevoked,
                Question::NewExact,
                Question::SweepDone
            ]
        );
    }

    #[test]
    fn verdict_serializes_for_the_audit_record() {
        let o = obs(4, vec![present(OLD, &[0x8001]), present(NEW, &[])]);
        let v = verify(&o, &exp());
        let j = serde_json::to_string(&v).expect("ser");
        assert!(j.contains("still_member"), "{j}");
        let back: Verdict = serde_json::from_str(&j).expect("de");
        assert_eq!(back, v);
    }
}
