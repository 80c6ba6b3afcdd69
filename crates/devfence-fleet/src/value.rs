//! The values devfence keeps in etcd, and their parsers.
//!
//! Every value read back from etcd is **untrusted** (another writer, an old
//! version, a damaged store, a hostile member): it is parsed with a size cap,
//! `deny_unknown_fields`, typed fields (GUIDs, P_Keys, tenant and host names
//! through their own parsers) and the bounds below, and a value that fails is
//! a [`ValueError`] naming the record kind and why — never a panic. Keys are
//! parsed the same way ([`guid_from_key`]).
//!
//! The writers serialize with `serde_json` into a fixed field order, so a
//! transaction can compare a value byte for byte (`Compare::value`) with what
//! this module writes.

use std::fmt;
use std::str::FromStr;

use devfence_model::{Guid, PKey, TenantId};
use serde::{Deserialize, Serialize};

/// The largest value devfence reads from etcd.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// The most P_Keys one port's desired or observed record may list.
pub const MAX_PKEYS_PER_PORT: usize = 128;

/// Why a value read from etcd is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Larger than [`MAX_VALUE_BYTES`].
    #[error("A {kind} record of {len} bytes is larger than {MAX_VALUE_BYTES}")]
    TooLarge {
        /// The record kind.
        kind: &'static str,
        /// Its length.
        len: usize,
    },
    /// Not the JSON devfence writes.
    #[error("A {kind} record is not valid: {why}")]
    Malformed {
        /// The record kind.
        kind: &'static str,
        /// The parser's reason (never the value itself).
        why: String,
    },
    /// Parsed, but out of bounds.
    #[error("A {kind} record is out of bounds: {why}")]
    Bounds {
        /// The record kind.
        kind: &'static str,
        /// Which bound.
        why: String,
    },
    /// A key that does not have devfence's shape.
    #[error("The key {key:?} is not one devfence writes: {why}")]
    Key {
        /// The key (keys hold no secrets), cut to 200 bytes.
        key: String,
        /// Why.
        why: &'static str,
    },
}

/// A fabric or host name: 1 to 63 characters of `[A-Za-z0-9._-]`, starting with
/// a letter or digit (it is a segment of an etcd key, so no `/`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// The name as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a valid name. Hint: 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
)]
pub struct NameError(pub String);

impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(NameError(s.chars().take(80).collect()))
        }
    }
}
impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Name({})", self.0)
    }
}
impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A GUID's state in a fabric's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuidState {
    /// Held by a host.
    Allocated,
    /// Released: never issued again.
    Retired,
}

/// `/<prefix>/<fabric>/guid/<guid>`: who holds a GUID of the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuidRecord {
    /// Allocated or retired.
    pub state: GuidState,
    /// The host it was issued to.
    pub host: Name,
}

/// `/<prefix>/_global/guid/<guid>`: the one fabric a GUID belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuidIndexRecord {
    /// The fabric.
    pub fabric: Name,
}

/// A fabric's GUID range, inclusive at both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuidRange {
    /// The first GUID of the pool.
    pub first: Guid,
    /// The last GUID of the pool.
    pub last: Guid,
}

impl GuidRange {
    /// Checks the bounds: `first <= last`, neither reserved (0, all ones).
    ///
    /// # Errors
    /// The bound that fails.
    pub fn check(&self) -> Result<(), String> {
        if self.first.is_reserved() || self.last.is_reserved() {
            return Err("a range may not include 0x0000000000000000 or 0xffffffffffffffff".into());
        }
        if self.first > self.last {
            return Err(format!("first {} is after last {}", self.first, self.last));
        }
        Ok(())
    }
    /// Whether two ranges share a GUID.
    #[must_use]
    pub fn overlaps(&self, o: &GuidRange) -> bool {
        self.first <= o.last && o.first <= self.last
    }
    /// Whether `g` is in the range.
    #[must_use]
    pub fn contains(&self, g: Guid) -> bool {
        self.first <= g && g <= self.last
    }
    /// How many GUIDs it holds.
    #[must_use]
    pub fn len(&self) -> u128 {
        u128::from(self.last.0) - u128::from(self.first.0) + 1
    }
    /// Never empty (a checked range has `first <= last`).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.first > self.last
    }
}
impl fmt::Display for GuidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.first, self.last)
    }
}

/// `/<prefix>/<fabric>/cursor`: the next GUID of the range never yet offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CursorRecord {
    /// The next candidate (the range's `last + 1` when the pool is used up).
    pub next: Guid,
}

/// `/<prefix>/<fabric>/pkey/<pkey>`: the tenant a partition belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkeyRecord {
    /// The owner.
    pub tenant: TenantId,
}

/// `/<prefix>/<fabric>/tenant/<tenant>`: a tenant known on the fabric.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRecord {
    /// The tenant (the same as the key's last segment).
    pub tenant: TenantId,
}

/// `/<prefix>/<fabric>/host/<host>`: a live host, under its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    /// The host.
    pub host: Name,
    /// Its lease (the key disappears when the lease expires).
    pub lease: i64,
}

/// `/<prefix>/<fabric>/desired/<host>/<guid>`: what a host wants a port's
/// P_Key table to hold, written under the host's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredRecord {
    /// The tenant the port is handed to.
    pub tenant: TenantId,
    /// The P_Keys (with the membership bit), sorted, no duplicates.
    pub pkeys: Vec<PKey>,
}

/// `/<prefix>/<fabric>/observed/<host>/<guid>`: what the fabric controller
/// read back at the SM for a port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservedRecord {
    /// The P_Keys the port's table holds, sorted, no duplicates.
    pub pkeys: Vec<PKey>,
    /// The SM sweep generation that produced them.
    pub generation: u64,
    /// The etcd revision of the desired state this observation answers
    /// (observed ≥ desired compares it with the desired key's revision).
    pub desired_revision: i64,
}

fn check_pkeys(kind: &'static str, pkeys: &[PKey]) -> Result<(), ValueError> {
    let bounds = |why: String| ValueError::Bounds { kind, why };
    if pkeys.len() > MAX_PKEYS_PER_PORT {
        return Err(bounds(format!(
            "{} P_Keys, more than {MAX_PKEYS_PER_PORT}",
            pkeys.len()
        )));
    }
    for w in pkeys.windows(2) {
        if w[0].base() >= w[1].base() {
            return Err(bounds(
                "the P_Keys are not sorted by partition or name one twice".into(),
            ));
        }
    }
    if let Some(p) = pkeys.iter().find(|p| p.is_empty_slot()) {
        return Err(bounds(format!("{p} is an empty slot, not a partition")));
    }
    Ok(())
}

impl DesiredRecord {
    /// A record with `pkeys` sorted by partition.
    ///
    /// # Errors
    /// Too many P_Keys, an empty slot, or one partition named twice.
    pub fn new(tenant: TenantId, mut pkeys: Vec<PKey>) -> Result<Self, ValueError> {
        pkeys.sort_by_key(|p| p.base());
        check_pkeys("desired membership", &pkeys)?;
        Ok(Self { tenant, pkeys })
    }
}

impl ObservedRecord {
    /// A record with `pkeys` sorted by partition.
    ///
    /// # Errors
    /// Too many P_Keys, an empty slot, or one partition named twice.
    pub fn new(
        mut pkeys: Vec<PKey>,
        generation: u64,
        desired_revision: i64,
    ) -> Result<Self, ValueError> {
        pkeys.sort_by_key(|p| p.base());
        check_pkeys("observed membership", &pkeys)?;
        let r = Self {
            pkeys,
            generation,
            desired_revision,
        };
        r.check()?;
        Ok(r)
    }
    fn check(&self) -> Result<(), ValueError> {
        if self.desired_revision < 0 {
            return Err(ValueError::Bounds {
                kind: "observed membership",
                why: "a negative desired_revision".into(),
            });
        }
        Ok(())
    }
}

/// A record kind devfence reads from etcd.
pub trait Record: Serialize + for<'de> Deserialize<'de> {
    /// Its name in errors.
    const KIND: &'static str;
    /// Bounds beyond the types.
    ///
    /// # Errors
    /// The bound that fails.
    fn check(&self) -> Result<(), ValueError> {
        Ok(())
    }
}

impl Record for GuidRecord {
    const KIND: &'static str = "GUID";
}
impl Record for GuidIndexRecord {
    const KIND: &'static str = "GUID index";
}
impl Record for GuidRange {
    const KIND: &'static str = "GUID range";
    fn check(&self) -> Result<(), ValueError> {
        GuidRange::check(self).map_err(|why| ValueError::Bounds {
            kind: Self::KIND,
            why,
        })
    }
}
impl Record for CursorRecord {
    const KIND: &'static str = "GUID cursor";
}
impl Record for PkeyRecord {
    const KIND: &'static str = "P_Key owner";
}
impl Record for TenantRecord {
    const KIND: &'static str = "tenant";
}
impl Record for HostRecord {
    const KIND: &'static str = "host";
}
impl Record for DesiredRecord {
    const KIND: &'static str = "desired membership";
    fn check(&self) -> Result<(), ValueError> {
        check_pkeys(Self::KIND, &self.pkeys)
    }
}
impl Record for ObservedRecord {
    const KIND: &'static str = "observed membership";
    fn check(&self) -> Result<(), ValueError> {
        check_pkeys(Self::KIND, &self.pkeys)?;
        ObservedRecord::check(self)
    }
}

/// Parses an untrusted value as a `T`, with the size cap and `T`'s bounds.
///
/// # Errors
/// Too large, not the JSON devfence writes, or out of bounds.
pub fn parse<T: Record>(bytes: &[u8]) -> Result<T, ValueError> {
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(ValueError::TooLarge {
            kind: T::KIND,
            len: bytes.len(),
        });
    }
    let v: T = serde_json::from_slice(bytes).map_err(|e| ValueError::Malformed {
        kind: T::KIND,
        // serde_json's message names the position and the expectation; it may
        // quote a fragment of the value, which holds no secret here.
        why: e.to_string().chars().take(200).collect(),
    })?;
    v.check()?;
    Ok(v)
}

/// The bytes devfence writes for `v` (the form [`parse`] reads back, and the
/// one a transaction compares byte for byte).
#[must_use]
pub fn encode<T: Record>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

/// A GUID as a key segment: 16 lower-case hex digits, so that key order is
/// numeric order.
#[must_use]
pub fn guid_segment(g: Guid) -> String {
    format!("{:016x}", g.0)
}

/// A P_Key's partition as a key segment: 4 lower-case hex digits of the base
/// (the membership bit is not part of ownership).
#[must_use]
pub fn pkey_segment(p: PKey) -> String {
    format!("{:04x}", p.base())
}

fn key_error(key: &[u8], why: &'static str) -> ValueError {
    ValueError::Key {
        key: String::from_utf8_lossy(&key[..key.len().min(200)]).into_owned(),
        why,
    }
}

/// The GUID a key ends with (`…/<16 hex digits>`), as [`guid_segment`] writes it.
///
/// # Errors
/// A key that does not end with exactly 16 lower-case hex digits after a `/`.
pub fn guid_from_key(key: &[u8]) -> Result<Guid, ValueError> {
    let seg = last_segment(key)?;
    if seg.len() != 16 || !seg.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(key_error(
            key,
            "it does not end with 16 lower-case hex digits",
        ));
    }
    u64::from_str_radix(seg, 16)
        .map(Guid)
        .map_err(|_| key_error(key, "it does not end with a GUID"))
}

/// The P_Key partition a key ends with (`…/<4 hex digits>`).
///
/// # Errors
/// A key that does not end with exactly 4 lower-case hex digits of a partition.
pub fn pkey_from_key(key: &[u8]) -> Result<PKey, ValueError> {
    let seg = last_segment(key)?;
    if seg.len() != 4 || !seg.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(key_error(
            key,
            "it does not end with 4 lower-case hex digits",
        ));
    }
    match u16::from_str_radix(seg, 16) {
        Ok(v) if v <= 0x7fff && v != 0 => Ok(PKey(v)),
        _ => Err(key_error(
            key,
            "it does not end with a partition (0x0001-0x7fff)",
        )),
    }
}

/// The key's last `/`-separated segment, as UTF-8.
///
/// # Errors
/// Longer than 1024 bytes, not UTF-8, or no `/`.
pub fn last_segment(key: &[u8]) -> Result<&str, ValueError> {
    if key.len() > 1024 {
        return Err(key_error(key, "it is longer than 1024 bytes"));
    }
    let s = std::str::from_utf8(key).map_err(|_| key_error(key, "it is not UTF-8"))?;
    s.rsplit_once('/')
        .map(|(_, t)| t)
        .ok_or_else(|| key_error(key, "it has no '/'"))
}

/// The segment before the last one (`…/<host>/<guid>` → host).
///
/// # Errors
/// As [`last_segment`], or fewer than two segments.
pub fn parent_segment(key: &[u8]) -> Result<&str, ValueError> {
    last_segment(key)?;
    let s = std::str::from_utf8(key).map_err(|_| key_error(key, "it is not UTF-8"))?;
    let (head, _) = s
        .rsplit_once('/')
        .ok_or_else(|| key_error(key, "it has no '/'"))?;
    head.rsplit_once('/')
        .map(|(_, t)| t)
        .ok_or_else(|| key_error(key, "it has too few segments"))
}

/// Every parser of this module on `bytes`, for the fuzz target: none may panic.
pub fn parse_all(bytes: &[u8]) {
    let _ = parse::<GuidRecord>(bytes);
    let _ = parse::<GuidIndexRecord>(bytes);
    let _ = parse::<GuidRange>(bytes);
    let _ = parse::<CursorRecord>(bytes);
    let _ = parse::<PkeyRecord>(bytes);
    let _ = parse::<TenantRecord>(bytes);
    let _ = parse::<HostRecord>(bytes);
    let _ = parse::<DesiredRecord>(bytes);
    let _ = parse::<ObservedRecord>(bytes);
    let _ = parse::<crate::controller::LeaderRecord>(bytes);
    let _ = parse::<crate::controller::RevokeRecord>(bytes);
    let _ = parse::<crate::controller::ControllerStatus>(bytes);
    let _ = guid_from_key(bytes);
    let _ = pkey_from_key(bytes);
    let _ = parent_segment(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_compare_byte_for_byte() {
        let r = GuidRecord {
            state: GuidState::Allocated,
            host: "h1".parse().expect("name"),
        };
        let b = encode(&r);
        assert_eq!(b, br#"{"state":"allocated","host":"h1"}"#);
        assert_eq!(parse::<GuidRecord>(&b).expect("parses"), r);
        let d = DesiredRecord::new(
            "t1".parse().expect("tenant"),
            vec![PKey(0x8002), PKey(0x0001)],
        )
        .expect("ok");
        assert_eq!(d.pkeys, vec![PKey(0x0001), PKey(0x8002)]);
        assert_eq!(parse::<DesiredRecord>(&encode(&d)).expect("parses"), d);
    }

    #[test]
    fn untrusted_values_are_refused_with_the_reason() {
        let e = parse::<GuidRecord>(br#"{"state":"allocated","host":"h1","x":1}"#)
            .expect_err("unknown field");
        assert!(e.to_string().contains("GUID record is not valid"), "{e}");
        let e =
            parse::<GuidRecord>(br#"{"state":"allocated","host":"../etc"}"#).expect_err("bad host");
        assert!(e.to_string().contains("not a valid name"), "{e}");
        let e = parse::<GuidRecord>(&vec![b' '; MAX_VALUE_BYTES + 1]).expect_err("big");
        assert!(matches!(e, ValueError::TooLarge { .. }), "{e}");
        let e = parse::<DesiredRecord>(br#"{"tenant":"t","pkeys":["0x8001","0x0001"]}"#)
            .expect_err("duplicate partition");
        assert!(e.to_string().contains("name one twice"), "{e}");
        let e = parse::<DesiredRecord>(br#"{"tenant":"t","pkeys":["0x8000"]}"#)
            .expect_err("empty slot");
        assert!(e.to_string().contains("empty slot"), "{e}");
        let e = parse::<GuidRange>(br#"{"first":"0x10","last":"0x1"}"#).expect_err("reversed");
        assert!(e.to_string().contains("after last"), "{e}");
        let many: Vec<String> = (1..=200).map(|i| format!("\"0x{i:04x}\"")).collect();
        let text = format!(r#"{{"tenant":"t","pkeys":[{}]}}"#, many.join(","));
        let e = parse::<DesiredRecord>(text.as_bytes()).expect_err("too many");
        assert!(e.to_string().contains("more than 128"), "{e}");
    }

    #[test]
    fn keys_are_parsed_strictly() {
        assert_eq!(
            guid_from_key(b"/d/f/guid/0002c90300000001").expect("guid"),
            Guid(0x0002_c903_0000_0001)
        );
        for bad in [
            &b"/d/f/guid/0002C90300000001"[..],
            b"/d/f/guid/2c90300000001",
            b"nokey",
            b"/d/f/guid/\xff\xff",
        ] {
            assert!(guid_from_key(bad).is_err(), "{bad:?}");
        }
        assert_eq!(pkey_from_key(b"/d/f/pkey/0001").expect("pkey"), PKey(1));
        assert!(pkey_from_key(b"/d/f/pkey/8001").is_err());
        assert!(pkey_from_key(b"/d/f/pkey/0000").is_err());
        assert_eq!(parent_segment(b"/d/f/desired/h1/00").expect("host"), "h1");
    }
}
