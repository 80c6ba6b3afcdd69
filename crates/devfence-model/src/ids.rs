//! Identifiers of the things devfence hands out, parsed once at the edge.
//!
//! Every type here is valid by construction: the only way to get one is through
//! [`FromStr`] (or a constructor that cannot produce an invalid value), and its
//! [`Display`](fmt::Display) form parses back to the same value. Serde goes through
//! the same text forms, so JSON output and TOML input use exactly what an operator
//! sees in sysfs.

use std::fmt;
use std::str::FromStr;

/// A value that did not parse as the identifier it was meant to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid {kind} {input:?}: {reason}")]
pub struct ParseError {
    /// What was being parsed ("BDF", "GUID", …).
    pub kind: &'static str,
    /// The text that was given (cut to 80 characters).
    pub input: String,
    /// Why it was refused, and what form is expected.
    pub reason: String,
}

impl ParseError {
    pub(crate) fn new(kind: &'static str, input: &str, reason: impl Into<String>) -> Self {
        let input: String = input.chars().take(80).collect();
        Self {
            kind,
            input,
            reason: reason.into(),
        }
    }
}

/// Implements serde through `Display`/`FromStr`, and its JSON schema: a
/// string described by `$what`.
macro_rules! serde_via_str {
    ($t:ident, $what:literal) => {
        impl schemars::JsonSchema for $t {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($t).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "description": $what })
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

fn hex_u32(
    kind: &'static str,
    full: &str,
    part: &str,
    max_digits: usize,
) -> Result<u32, ParseError> {
    if part.is_empty() || part.len() > max_digits || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ParseError::new(
            kind,
            full,
            format!("{part:?} is not 1 to {max_digits} hex digits"),
        ));
    }
    u32::from_str_radix(part, 16).map_err(|e| ParseError::new(kind, full, e.to_string()))
}

/// A PCI function address, `DDDD:BB:DD.F` (domain, bus, device, function).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf(u32);

impl Bdf {
    /// Builds a BDF from its parts; `device` is 0..=31 and `function` 0..=7.
    #[must_use]
    pub fn new(domain: u16, bus: u8, device: u8, function: u8) -> Option<Self> {
        (device < 32 && function < 8).then(|| {
            Self(
                (u32::from(domain) << 16)
                    | (u32::from(bus) << 8)
                    | (u32::from(device) << 3)
                    | u32::from(function),
            )
        })
    }
    /// The PCI domain (segment).
    #[must_use]
    pub fn domain(self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// The bus number.
    #[must_use]
    pub fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// The device (slot) number.
    #[must_use]
    pub fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }
    /// The function number.
    #[must_use]
    pub fn function(self) -> u8 {
        (self.0 & 7) as u8
    }
}

impl FromStr for Bdf {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const K: &str = "BDF";
        let bad = || ParseError::new(K, s, "expected DDDD:BB:DD.F in hex, e.g. 0000:3b:00.1");
        let (head, func) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = head.split(':').collect();
        let (dom, bus, dev) = match parts.as_slice() {
            [d, b, v] if d.len() == 4 && b.len() == 2 && v.len() == 2 => (*d, *b, *v),
            _ => return Err(bad()),
        };
        if func.len() != 1 {
            return Err(bad());
        }
        let domain = hex_u32(K, s, dom, 4)? as u16;
        let bus = hex_u32(K, s, bus, 2)? as u8;
        let dev = hex_u32(K, s, dev, 2)?;
        let func = hex_u32(K, s, func, 1)?;
        if dev > 31 || func > 7 {
            return Err(ParseError::new(
                K,
                s,
                "device must be 00..1f and function 0..7",
            ));
        }
        Bdf::new(domain, bus, dev as u8, func as u8).ok_or_else(bad)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain(),
            self.bus(),
            self.device(),
            self.function()
        )
    }
}
impl fmt::Debug for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bdf({self})")
    }
}
serde_via_str!(
    Bdf,
    "A PCI function address, DDDD:BB:DD.F (domain, bus, device, function), lower-case hex."
);

/// A 64-bit InfiniBand GUID (node or port GUID).
///
/// Parses every form the kernel and tools print: `0x0002c90300a1b2c3`,
/// `0002:c903:00a1:b2c3` (sysfs `node_guid`), `00:02:c9:03:00:a1:b2:c3`
/// (`ip link`, OFED `sriov/<N>/port`) and 16 bare hex digits. Displays as `0x%016x`,
/// the form OpenSM's partition file uses.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Guid(pub u64);

impl Guid {
    /// True for the values that never name a real port: zero and all ones.
    #[must_use]
    pub fn is_reserved(self) -> bool {
        self.0 == 0 || self.0 == u64::MAX
    }
}

impl FromStr for Guid {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const K: &str = "GUID";
        let t = s.trim();
        let digits: String = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X"))
        {
            h.to_string()
        } else if t.contains(':') {
            let groups: Vec<&str> = t.split(':').collect();
            let ok = (groups.len() == 4 && groups.iter().all(|g| g.len() == 4))
                || (groups.len() == 8 && groups.iter().all(|g| g.len() == 2));
            if !ok {
                return Err(ParseError::new(
                    K,
                    s,
                    "expected 0x + 16 hex digits, xxxx:xxxx:xxxx:xxxx or xx:xx:xx:xx:xx:xx:xx:xx",
                ));
            }
            groups.concat()
        } else {
            t.to_string()
        };
        if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(ParseError::new(
                K,
                s,
                "expected 0x + 16 hex digits, xxxx:xxxx:xxxx:xxxx or xx:xx:xx:xx:xx:xx:xx:xx",
            ));
        }
        u64::from_str_radix(&digits, 16)
            .map(Guid)
            .map_err(|e| ParseError::new(K, s, e.to_string()))
    }
}
impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:016x}", self.0)
    }
}
impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}
serde_via_str!(
    Guid,
    "An InfiniBand port or node GUID; written 0x and 16 hex digits (also read as xxxx:xxxx:xxxx:xxxx, xx:..:xx or bare hex)."
);

/// Membership in an IB partition: bit 15 of a P_Key.
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
#[serde(rename_all = "lowercase")]
pub enum Membership {
    /// Full member: may talk to every member of the partition.
    Full,
    /// Limited member: may talk to full members only.
    Limited,
}

/// A 16-bit P_Key as the port's table holds it: bit 15 is full membership, the
/// low 15 bits name the partition. `0x0000` is an empty slot; the default
/// partition is `0x7fff` (`0xffff` when full).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PKey(pub u16);

impl PKey {
    /// The default partition's base value.
    pub const DEFAULT_BASE: u16 = 0x7fff;
    /// The partition this P_Key names, without the membership bit.
    #[must_use]
    pub fn base(self) -> u16 {
        self.0 & 0x7fff
    }
    /// Full or limited membership.
    #[must_use]
    pub fn membership(self) -> Membership {
        if self.0 & 0x8000 != 0 {
            Membership::Full
        } else {
            Membership::Limited
        }
    }
    /// An empty table slot (`0x0000` or `0x8000`).
    #[must_use]
    pub fn is_empty_slot(self) -> bool {
        self.base() == 0
    }
    /// The default partition (`0x7fff`/`0xffff`).
    #[must_use]
    pub fn is_default(self) -> bool {
        self.base() == Self::DEFAULT_BASE
    }
    /// The same partition with the given membership.
    #[must_use]
    pub fn with_membership(self, m: Membership) -> Self {
        match m {
            Membership::Full => Self(self.0 | 0x8000),
            Membership::Limited => Self(self.0 & 0x7fff),
        }
    }
}
impl FromStr for PKey {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let t = s.trim();
        let h = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .ok_or_else(|| {
                ParseError::new("P_Key", s, "expected 0x and 1 to 4 hex digits, e.g. 0x8001")
            })?;
        hex_u32("P_Key", s, h, 4).map(|v| PKey(v as u16))
    }
}
impl fmt::Display for PKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:04x}", self.0)
    }
}
impl fmt::Debug for PKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PKey({self})")
    }
}
serde_via_str!(
    PKey,
    "An InfiniBand partition key; written 0x and 4 hex digits (read as 0x and 1 to 4)."
);

/// An AP queue number: adapter (card, APID) and domain (APQI), written `AA.DDDD`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Apqn {
    /// The adapter id (APID), 0..=255.
    pub adapter: u8,
    /// The usage domain (APQI), 0..=255 (the AP masks are 256 bits wide).
    pub domain: u8,
}
impl FromStr for Apqn {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const K: &str = "APQN";
        let bad = || ParseError::new(K, s, "expected AA.DDDD in hex, e.g. 05.0012");
        let (a, d) = s.trim().split_once('.').ok_or_else(bad)?;
        if a.len() != 2 || d.len() != 4 {
            return Err(bad());
        }
        let adapter = hex_u32(K, s, a, 2)?;
        let domain = hex_u32(K, s, d, 4)?;
        if domain > 0xff {
            return Err(ParseError::new(K, s, "domain must be 0000..00ff"));
        }
        Ok(Apqn {
            adapter: adapter as u8,
            domain: domain as u8,
        })
    }
}
impl fmt::Display for Apqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}.{:04x}", self.adapter, self.domain)
    }
}
impl fmt::Debug for Apqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Apqn({self})")
    }
}
serde_via_str!(
    Apqn,
    "An s390 AP queue number, AA.DDDD (adapter and domain in hex)."
);

/// A 256-bit AP bus mask (`apmask`, `aqmask`). Bit 0 is the leftmost (most
/// significant) bit of the text form and stands for id 0; a set bit means the id
/// is reserved for the host's zcrypt drivers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApMask(pub [u8; 32]);

impl ApMask {
    /// All 256 bits set (the kernel default: everything for the host).
    pub const ALL: ApMask = ApMask([0xff; 32]);
    /// No bit set.
    pub const NONE: ApMask = ApMask([0; 32]);
    /// Whether id `n` is set.
    #[must_use]
    pub fn contains(&self, n: u8) -> bool {
        self.0[usize::from(n / 8)] & (0x80 >> (n % 8)) != 0
    }
    /// Sets or clears id `n`.
    pub fn set(&mut self, n: u8, on: bool) {
        let b = &mut self.0[usize::from(n / 8)];
        if on {
            *b |= 0x80 >> (n % 8);
        } else {
            *b &= !(0x80 >> (n % 8));
        }
    }
    /// The ids that are set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u8> + '_ {
        (0..=255u8).filter(|n| self.contains(*n))
    }
    /// How many ids are set.
    #[must_use]
    pub fn count(&self) -> u32 {
        self.0.iter().map(|b| b.count_ones()).sum()
    }
}

impl FromStr for ApMask {
    type Err = ParseError;
    /// Parses the sysfs read form: `0x` and exactly 64 hex digits.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const K: &str = "AP mask";
        let h = s.strip_prefix("0x").ok_or_else(|| {
            ParseError::new(K, s, "expected 0x followed by 64 hex digits (256 bits)")
        })?;
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseError::new(
                K,
                s,
                format!(
                    "expected 64 hex digits after 0x, found {} characters",
                    h.len()
                ),
            ));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16)
                .map_err(|e| ParseError::new(K, s, e.to_string()))?;
        }
        Ok(ApMask(out))
    }
}
impl fmt::Display for ApMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
impl fmt::Debug for ApMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApMask({self})")
    }
}
serde_via_str!(
    ApMask,
    "An AP bus mask, 0x followed by 64 hex digits (256 bits)."
);

/// A kernel IOMMU group number. Not stable across reboots: always map by device.
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
pub struct IommuGroupId(pub u32);
impl fmt::Display for IommuGroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl FromStr for IommuGroupId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        s.parse::<u32>()
            .map(IommuGroupId)
            .map_err(|_| ParseError::new("IOMMU group", s, "expected a decimal group number"))
    }
}

/// The UUID of a mediated device, lowercase and hyphenated as sysfs names it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MdevUuid(pub [u8; 16]);

impl FromStr for MdevUuid {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const K: &str = "mdev UUID";
        let bad = || {
            ParseError::new(
                K,
                s,
                "expected 8-4-4-4-12 hex digits, e.g. 83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
            )
        };
        let b = s.as_bytes();
        if b.len() != 36 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        let mut j = 0;
        let mut i = 0;
        while i < 36 {
            if matches!(i, 8 | 13 | 18 | 23) {
                if b[i] != b'-' {
                    return Err(bad());
                }
                i += 1;
                continue;
            }
            let hi = (b[i] as char).to_digit(16).ok_or_else(bad)?;
            let lo = (b[i + 1] as char).to_digit(16).ok_or_else(bad)?;
            out[j] = (hi * 16 + lo) as u8;
            j += 1;
            i += 2;
        }
        Ok(MdevUuid(out))
    }
}
impl fmt::Display for MdevUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
impl fmt::Debug for MdevUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MdevUuid({self})")
    }
}
serde_via_str!(MdevUuid, "A mediated device UUID.");

/// An opaque tenant id: 1 to 64 characters of `[A-Za-z0-9._-]`, starting with an
/// alphanumeric character.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantId(String);
impl TenantId {
    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl FromStr for TenantId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(TenantId(s.to_string()))
        } else {
            Err(ParseError::new(
                "tenant id",
                s,
                "expected 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
            ))
        }
    }
}
impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}
serde_via_str!(
    TenantId,
    "A tenant name: 1 to 64 characters of [A-Za-z0-9._-], starting with a letter or digit."
);

/// Anything devfence can hand to a tenant, named the way an operator names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceId {
    /// A PCI function (PF or VF).
    Pci(Bdf),
    /// A mediated device.
    Mdev(MdevUuid),
    /// An s390 AP queue.
    Apqn(Apqn),
    /// An InfiniBand port GUID (of a VF).
    IbGuid(Guid),
}
impl FromStr for DeviceId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let s = s.trim();
        if let Ok(b) = s.parse() {
            return Ok(DeviceId::Pci(b));
        }
        if let Ok(u) = s.parse() {
            return Ok(DeviceId::Mdev(u));
        }
        if let Ok(a) = s.parse() {
            return Ok(DeviceId::Apqn(a));
        }
        if (s.starts_with("0x") || s.contains(':'))
            && let Ok(g) = s.parse()
        {
            return Ok(DeviceId::IbGuid(g));
        }
        Err(ParseError::new(
            "device",
            s,
            "expected a BDF (0000:3b:00.2), an mdev UUID, an APQN (05.0012) or an IB GUID (0x0002c90300a1b2c3)",
        ))
    }
}
impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Pci(b) => b.fmt(f),
            DeviceId::Mdev(u) => u.fmt(f),
            DeviceId::Apqn(a) => a.fmt(f),
            DeviceId::IbGuid(g) => g.fmt(f),
        }
    }
}
serde_via_str!(
    DeviceId,
    "A device devfence hands out: a PCI BDF (0000:3b:00.2), an mdev UUID, an APQN (05.0012) or an IB VF's port GUID (0x0002c90300a1b2c3)."
);

/// Makes 16 random bytes a version-4 (random) UUID in place: the version
/// nibble 4 and the RFC 4122 variant bits. The one place devfence sets them
/// (a new mdev's UUID, a VF token); the caller supplies the randomness.
pub fn make_uuid_v4(b: &mut [u8; 16]) {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_round_trip_and_errors() {
        let b: Bdf = "0000:3b:00.1".parse().unwrap();
        assert_eq!(
            (b.domain(), b.bus(), b.device(), b.function()),
            (0, 0x3b, 0, 1)
        );
        assert_eq!(b.to_string(), "0000:3b:00.1");
        assert_eq!(
            "0000:3B:1F.7".parse::<Bdf>().unwrap().to_string(),
            "0000:3b:1f.7"
        );
        for bad in [
            "",
            "3b:00.1",
            "0000:3b:00",
            "0000:3b:20.0",
            "0000:3b:00.8",
            "0000:3g:00.0",
            "0000:3b:00.1 ",
        ] {
            let e = bad.parse::<Bdf>().unwrap_err();
            assert_eq!(e.kind, "BDF", "{bad}");
        }
    }

    #[test]
    fn guid_forms() {
        let want = Guid(0x0002_c903_00a1_b2c3);
        for s in [
            "0x0002c90300a1b2c3",
            "0002:c903:00a1:b2c3",
            "00:02:c9:03:00:a1:b2:c3",
            "0002c90300a1b2c3",
        ] {
            assert_eq!(s.parse::<Guid>().unwrap(), want, "{s}");
        }
        assert_eq!(want.to_string(), "0x0002c90300a1b2c3");
        assert!(Guid(0).is_reserved() && Guid(u64::MAX).is_reserved() && !want.is_reserved());
        for bad in ["", "0x", "0x12345678123456789", "00:02:c9", "zz"] {
            assert!(bad.parse::<Guid>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pkey_membership() {
        let p: PKey = "0x8001".parse().unwrap();
        assert_eq!(p.membership(), Membership::Full);
        assert_eq!(p.base(), 1);
        assert_eq!(p.with_membership(Membership::Limited).to_string(), "0x0001");
        assert!("0xffff".parse::<PKey>().unwrap().is_default());
        assert!("8001".parse::<PKey>().is_err());
        assert!("0x10000".parse::<PKey>().is_err());
    }

    #[test]
    fn apqn_and_mask() {
        let a: Apqn = "05.0012".parse().unwrap();
        assert_eq!((a.adapter, a.domain), (5, 0x12));
        assert_eq!(a.to_string(), "05.0012");
        assert!("05.0100".parse::<Apqn>().is_err());
        assert!("5.12".parse::<Apqn>().is_err());

        let text = format!("0x41{}", "0".repeat(62));
        let m: ApMask = text.parse().unwrap();
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![1, 7]);
        assert_eq!(m.to_string(), text);
        let short = format!("0x{}", "f".repeat(63));
        let e = short.parse::<ApMask>().unwrap_err();
        assert!(e.reason.contains("63"), "{e}");
        let mut n = ApMask::NONE;
        n.set(255, true);
        assert!(n.contains(255) && n.count() == 1);
    }

    #[test]
    fn uuid_and_device_ids() {
        let u: MdevUuid = "83B8F4F2-509F-382F-3C1E-E6BFE0FA1001".parse().unwrap();
        assert_eq!(u.to_string(), "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
        assert!(matches!(
            "0000:3b:00.2".parse::<DeviceId>().unwrap(),
            DeviceId::Pci(_)
        ));
        assert!(matches!(
            u.to_string().parse::<DeviceId>().unwrap(),
            DeviceId::Mdev(_)
        ));
        assert!(matches!(
            "05.0012".parse::<DeviceId>().unwrap(),
            DeviceId::Apqn(_)
        ));
        assert!(matches!(
            "0x0002c90300a1b2c3".parse::<DeviceId>().unwrap(),
            DeviceId::IbGuid(_)
        ));
        assert!("nonsense".parse::<DeviceId>().is_err());
        assert!("".parse::<TenantId>().is_err());
        assert!("acme".parse::<TenantId>().is_ok());
        assert!("-acme".parse::<TenantId>().is_err());
    }

    #[test]
    fn serde_uses_text_forms() {
        let b: Bdf = "0000:3b:00.1".parse().unwrap();
        assert_eq!(serde_json::to_string(&b).unwrap(), "\"0000:3b:00.1\"");
        let back: Bdf = serde_json::from_str("\"0000:3b:00.1\"").unwrap();
        assert_eq!(back, b);
        assert!(serde_json::from_str::<Bdf>("\"bogus\"").is_err());
    }

    #[test]
    fn a_v4_uuid_has_its_version_and_variant() {
        let mut b = [0xff; 16];
        make_uuid_v4(&mut b);
        let u = MdevUuid(b).to_string();
        assert_eq!(u.as_bytes()[14], b'4', "{u}");
        assert!(matches!(u.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{u}");
        let mut z = [0; 16];
        make_uuid_v4(&mut z);
        assert_eq!((z[6], z[8]), (0x40, 0x80));
    }
}
