//! The values that cross the [`SubnetManager`](crate::SubnetManager) seam: what is
//! asked of the SM ([`Change`], [`MembershipMap`]), what it promises ([`Ticket`]) and
//! what it is seen to have done ([`Observation`], [`Health`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use devfence_model::{Guid, Membership, PKey};

use crate::FabricError;

/// A partition devfence manages, named by its P_Key *base* (the low 15 bits;
/// membership is said separately).
///
/// Valid by construction: never the empty P_Key (base `0x0000`, an unused table
/// slot) and never the default partition (`0x7fff`), which every backend renders
/// itself (non-SM ports limited) and which no tenant owns.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionKey(u16);

impl PartitionKey {
    /// The partition named by `pkey` (the membership bit is ignored).
    ///
    /// # Errors
    /// [`FabricError::EmptyPKey`] for base `0x0000`, [`FabricError::DefaultPartition`]
    /// for base `0x7fff`.
    pub fn new(pkey: u16) -> Result<Self, FabricError> {
        let base = pkey & 0x7fff;
        if base == 0 {
            return Err(FabricError::EmptyPKey { pkey });
        }
        if base == PKey::DEFAULT_BASE {
            return Err(FabricError::DefaultPartition { pkey });
        }
        Ok(Self(base))
    }
    /// The P_Key base (membership bit clear).
    #[must_use]
    pub fn base(self) -> u16 {
        self.0
    }
    /// The 16-bit P_Key a port's table holds for this partition with `membership`.
    #[must_use]
    pub fn pkey(self, membership: Membership) -> PKey {
        PKey(self.0).with_membership(membership)
    }
    /// True when `pkey` names this partition, with either membership.
    #[must_use]
    pub fn matches(self, pkey: PKey) -> bool {
        pkey.base() == self.0
    }
}

impl TryFrom<PKey> for PartitionKey {
    type Error = FabricError;
    fn try_from(p: PKey) -> Result<Self, FabricError> {
        Self::new(p.0)
    }
}
impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:04x}", self.0)
    }
}
impl fmt::Debug for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartitionKey({self})")
    }
}
impl FromStr for PartitionKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let p: PKey = s.parse().map_err(|e| format!("{e}"))?;
        Self::try_from(p).map_err(|e| e.to_string())
    }
}
impl schemars::JsonSchema for PartitionKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PartitionKey".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "description": "A partition by its P_Key base, 0x and 4 hex digits (never 0x0000 nor the default 0x7fff)." })
    }
}

impl serde::Serialize for PartitionKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> serde::Deserialize<'de> for PartitionKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An SM sweep generation: how many partition-applying sweeps the SM has completed.
///
/// Monotonic per SM instance. What one step means is the backend's to define
/// (simulated SM: its own counter; OpenSM: `SUBNET UP` lines after devfence's log
/// offset; UFM: its change sequence); the seam only needs "≥".
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    schemars::JsonSchema,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "generation {}", self.0)
    }
}

/// Names one [`apply`](crate::SubnetManager::apply): a per-SM serial number.
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
#[serde(transparent)]
pub struct ChangeId(pub u64);

/// What [`apply`](crate::SubnetManager::apply) promises: the change it pushed, and
/// the sweep generation at which that change must be observed.
///
/// The generation is the first sweep that *starts after* the change reached the
/// SM: a sweep already running when the change arrived does not count (OpenSM's
/// "a heavy sweep already past P_Key setup" race).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Ticket {
    /// The apply this ticket names.
    pub change: ChangeId,
    /// The SM must be seen at this generation or later, with a clean sweep.
    pub generation: Generation,
}

/// One membership change to stage.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Change {
    /// Make `guid` a member of `partition` (replaces an existing membership of
    /// that partition: one port has one membership per partition).
    Add {
        /// The port GUID.
        guid: Guid,
        /// The partition.
        partition: PartitionKey,
        /// Full or limited.
        membership: Membership,
    },
    /// Take `guid` out of `partition` (a no-op if it is not a member).
    Remove {
        /// The port GUID.
        guid: Guid,
        /// The partition.
        partition: PartitionKey,
    },
    /// Take `guid` out of every partition devfence manages.
    RemoveAll {
        /// The port GUID.
        guid: Guid,
    },
    /// Replace the whole membership devfence manages with this map.
    Replace(MembershipMap),
}

impl Change {
    /// Refuses what no SM may be asked to do: a reserved GUID (zero or all ones).
    ///
    /// # Errors
    /// [`FabricError::ReservedGuid`].
    pub fn validate(&self) -> Result<(), FabricError> {
        match self {
            Change::Add { guid, .. } | Change::Remove { guid, .. } | Change::RemoveAll { guid } => {
                check_guid(*guid)
            }
            Change::Replace(_) => Ok(()), // valid by construction
        }
    }
}

pub(crate) fn check_guid(guid: Guid) -> Result<(), FabricError> {
    if guid.is_reserved() {
        Err(FabricError::ReservedGuid { guid })
    } else {
        Ok(())
    }
}

/// The partition membership devfence manages: per port GUID, its partitions and
/// membership. Never holds a reserved GUID.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(try_from = "BTreeMap<Guid, BTreeMap<PartitionKey, Membership>>")]
#[serde(into = "BTreeMap<Guid, BTreeMap<PartitionKey, Membership>>")]
pub struct MembershipMap(BTreeMap<Guid, BTreeMap<PartitionKey, Membership>>);

impl MembershipMap {
    /// An empty map.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds (or re-sets) `guid`'s membership of `partition`.
    ///
    /// # Errors
    /// [`FabricError::ReservedGuid`] for a zero or all-ones GUID.
    pub fn insert(
        &mut self,
        guid: Guid,
        partition: PartitionKey,
        membership: Membership,
    ) -> Result<(), FabricError> {
        check_guid(guid)?;
        self.0
            .entry(guid)
            .or_default()
            .insert(partition, membership);
        Ok(())
    }
    /// Takes `guid` out of `partition`; true if it was a member.
    pub fn remove(&mut self, guid: Guid, partition: PartitionKey) -> bool {
        let Some(parts) = self.0.get_mut(&guid) else {
            return false;
        };
        let was = parts.remove(&partition).is_some();
        if parts.is_empty() {
            self.0.remove(&guid);
        }
        was
    }
    /// Takes `guid` out of every partition; true if it was in any.
    pub fn remove_all(&mut self, guid: Guid) -> bool {
        self.0.remove(&guid).is_some()
    }
    /// `guid`'s partitions (empty if none).
    #[must_use]
    pub fn partitions_of(&self, guid: Guid) -> BTreeMap<PartitionKey, Membership> {
        self.0.get(&guid).cloned().unwrap_or_default()
    }
    /// `guid`'s partitions as the 16-bit P_Keys a port table would hold.
    #[must_use]
    pub fn pkeys_of(&self, guid: Guid) -> BTreeSet<PKey> {
        self.0
            .get(&guid)
            .map(|m| m.iter().map(|(p, mem)| p.pkey(*mem)).collect())
            .unwrap_or_default()
    }
    /// Every GUID with at least one partition.
    pub fn guids(&self) -> impl Iterator<Item = Guid> + '_ {
        self.0.keys().copied()
    }
    /// Every (GUID, partition, membership), in order.
    pub fn iter(&self) -> impl Iterator<Item = (Guid, PartitionKey, Membership)> + '_ {
        self.0
            .iter()
            .flat_map(|(g, m)| m.iter().map(move |(p, mem)| (*g, *p, *mem)))
    }
    /// The members of `partition` (the per-P_Key view OpenSM's partition file and
    /// UFM's API use).
    #[must_use]
    pub fn members_of(&self, partition: PartitionKey) -> BTreeMap<Guid, Membership> {
        self.0
            .iter()
            .filter_map(|(g, m)| m.get(&partition).map(|mem| (*g, *mem)))
            .collect()
    }
    /// True when no GUID is in any partition.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Applies one change to this map.
    ///
    /// # Errors
    /// [`FabricError::ReservedGuid`] (the map is left unchanged).
    pub fn apply(&mut self, change: &Change) -> Result<(), FabricError> {
        change.validate()?;
        match change {
            Change::Add {
                guid,
                partition,
                membership,
            } => self.insert(*guid, *partition, *membership)?,
            Change::Remove { guid, partition } => {
                self.remove(*guid, *partition);
            }
            Change::RemoveAll { guid } => {
                self.remove_all(*guid);
            }
            Change::Replace(map) => *self = map.clone(),
        }
        Ok(())
    }
}

impl TryFrom<BTreeMap<Guid, BTreeMap<PartitionKey, Membership>>> for MembershipMap {
    type Error = FabricError;
    fn try_from(
        raw: BTreeMap<Guid, BTreeMap<PartitionKey, Membership>>,
    ) -> Result<Self, Self::Error> {
        let mut m = Self::new();
        for (g, parts) in raw {
            check_guid(g)?;
            if !parts.is_empty() {
                m.0.insert(g, parts);
            }
        }
        Ok(m)
    }
}
impl From<MembershipMap> for BTreeMap<Guid, BTreeMap<PartitionKey, Membership>> {
    fn from(m: MembershipMap) -> Self {
        m.0
    }
}

/// The SM's role as it reports it (IB SMInfo states; UFM maps its own health here).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SmState {
    /// The master SM: in charge of the subnet. The only state in which a sweep
    /// counts as having applied anything.
    Master,
    /// A standby SM.
    Standby,
    /// Discovering (not yet master).
    Discovering,
    /// Not active (disabled, or shutting down).
    NotActive,
    /// The backend could not tell.
    Unknown,
}

impl fmt::Display for SmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SmState::Master => "master",
            SmState::Standby => "standby",
            SmState::Discovering => "discovering",
            SmState::NotActive => "not active",
            SmState::Unknown => "unknown",
        })
    }
}

/// How the last completed sweep ended.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum SweepOutcome {
    /// No sweep has completed (since the backend started watching).
    NoneYet,
    /// Completed without errors (OpenSM: `SUBNET UP`).
    Clean,
    /// Completed with errors (OpenSM: `Errors during initialization`, `PARSE ERROR`).
    Errors(String),
}

impl fmt::Display for SweepOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SweepOutcome::NoneYet => f.write_str("none completed yet"),
            SweepOutcome::Clean => f.write_str("clean"),
            SweepOutcome::Errors(e) => write!(f, "errors: {e}"),
        }
    }
}

/// The SM's progress as read back: role, last completed generation and its outcome.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct SmStatus {
    /// The SM's role.
    pub state: SmState,
    /// The generation of the last completed sweep.
    pub generation: Generation,
    /// How that sweep ended.
    pub sweep: SweepOutcome,
}

/// What the SM reports as programmed on one port.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
#[serde(rename_all = "snake_case", tag = "port")]
pub enum Programmed {
    /// The SM knows no port with this GUID (OpenSM: the GUID resolves to no LID).
    Absent,
    /// The port is on the fabric with this P_Key table.
    Present {
        /// The port's LID, where the backend has one.
        lid: Option<u16>,
        /// The table as a set (OpenSM keeps old slots; compare sets, not indexes),
        /// with the membership bit, empty slots left out.
        pkeys: BTreeSet<PKey>,
    },
}

/// The SM's view of one port GUID.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct PortView {
    /// The port GUID.
    pub guid: Guid,
    /// What the SM programmed on the port (OpenSM: SA PKeyTableRecord of its LID).
    pub programmed: Programmed,
    /// The SM's configured membership of this GUID in every partition, where the
    /// backend can read it back (UFM: `pkeys?guids_data=true`; OpenSM: the partition
    /// file as parsed); `None` when it cannot. It answers "not a member" even for a
    /// GUID that has left the fabric and would come back with its old partitions.
    pub configured: Option<BTreeSet<PKey>>,
}

/// One read-back of the SM: its status, then the views of the requested GUIDs.
///
/// Contract for backends: `status` is read **before** the port views, so the port
/// views are at least as new as the generation reported with them.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Observation {
    /// The SM's status when the read began.
    pub status: SmStatus,
    /// One view per requested GUID (a requested GUID missing here fails closed).
    pub ports: BTreeMap<Guid, PortView>,
}

/// The SM's health, for `devfence status` and the gates' preflight.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Health {
    /// Which backend answered ("sim", "opensm", "ufm").
    pub backend: String,
    /// The SM's version, where it says (UFM `ufm_version`, OpenSM's banner).
    pub version: Option<String>,
    /// The SM's status.
    pub status: SmStatus,
    /// Anything else an operator should know (e.g. "frozen: no sweeps").
    pub notes: Vec<String>,
}

impl Health {
    /// Master, at least one sweep, and the last one clean.
    #[must_use]
    pub fn is_healthy(&self) -> bool {
        self.status.state == SmState::Master && self.status.sweep == SweepOutcome::Clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_key_refuses_empty_and_default() {
        assert!(matches!(
            PartitionKey::new(0),
            Err(FabricError::EmptyPKey { pkey: 0 })
        ));
        assert!(matches!(
            PartitionKey::new(0x8000),
            Err(FabricError::EmptyPKey { .. })
        ));
        assert!(matches!(
            PartitionKey::new(0xffff),
            Err(FabricError::DefaultPartition { .. })
        ));
        let p = PartitionKey::new(0x8001).expect("valid");
        assert_eq!(p.base(), 1);
        assert_eq!(p.pkey(Membership::Full), PKey(0x8001));
        assert_eq!(p.pkey(Membership::Limited), PKey(0x0001));
        assert_eq!(p.to_string(), "0x0001");
    }

    #[test]
    fn membership_map_refuses_reserved_guids() {
        let p = PartitionKey::new(0x8001).expect("valid");
        let mut m = MembershipMap::new();
        for g in [Guid(0), Guid(u64::MAX)] {
            let e = m.insert(g, p, Membership::Full).expect_err("reserved");
            assert!(matches!(e, FabricError::ReservedGuid { .. }));
            assert!(e.to_string().contains("Hint:"), "{e}");
        }
        assert!(m.is_empty());
        let e = m
            .apply(&Change::RemoveAll { guid: Guid(0) })
            .expect_err("reserved");
        assert!(matches!(e, FabricError::ReservedGuid { .. }));
    }

    #[test]
    fn membership_map_edits_and_views() {
        let a = PartitionKey::new(0x8001).expect("valid");
        let b = PartitionKey::new(0x8002).expect("valid");
        let g = Guid(0x2c9_0000_2003);
        let mut m = MembershipMap::new();
        m.insert(g, a, Membership::Full).expect("ok");
        m.insert(g, b, Membership::Limited).expect("ok");
        assert_eq!(m.pkeys_of(g), BTreeSet::from([PKey(0x8001), PKey(0x0002)]));
        assert_eq!(m.members_of(b).get(&g), Some(&Membership::Limited));
        assert!(m.remove(g, a));
        assert!(!m.remove(g, a));
        assert!(m.remove(g, b));
        assert!(m.is_empty(), "an empty entry is dropped");
    }

    #[test]
    fn serde_validates_on_the_way_in() {
        let a = PartitionKey::new(0x8001).expect("valid");
        let mut m = MembershipMap::new();
        m.insert(Guid(5), a, Membership::Full).expect("ok");
        let json = serde_json::to_string(&m).expect("ser");
        let back: MembershipMap = serde_json::from_str(&json).expect("de");
        assert_eq!(back, m);
        let bad = json.replace("0x0000000000000005", "0x0000000000000000");
        assert!(serde_json::from_str::<MembershipMap>(&bad).is_err());
        assert!(serde_json::from_str::<PartitionKey>("\"0x7fff\"").is_err());
        assert!(serde_json::from_str::<PartitionKey>("\"0x0000\"").is_err());
    }
}
