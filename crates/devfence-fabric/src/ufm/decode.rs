//! Pure decoders of UFM's answers: bytes in, typed value or
//! [`FabricError::Malformed`] out. No I/O, no panics, so they can be fuzzed
//! (`fuzz/fuzz_targets/ufm_response.rs`).
//!
//! What is refused, and why (docs/design.md §2: fail closed):
//!
//! - an answer larger than [`MAX_RESPONSE_BYTES`];
//! - an empty answer, or HTML (a login page or an error page of a proxy that sits
//!   in front of UFM): the first non-blank byte is `<`;
//! - anything that is not one JSON value of the expected shape, with nothing after
//!   it;
//! - an object that names the same key twice — the P_Key listing, a P_Key's
//!   entry, a GUID entry: a later entry silently replacing an earlier one could
//!   hide a membership, so it is an error, not "last one wins";
//! - a GUID that is not 1 to 16 hex digits, bare (UFM's own form,
//!   `0002C903000A1B2C`, either case) or after `0x`; a P_Key that is not `0x` and 1
//!   to 4 hex digits, or whose base is `0x0000`; a membership other than `full` or
//!   `limited` (either case), or none at all;
//! - one GUID listed twice in one partition with different memberships.
//!
//! Fields devfence does not read (`partition`, `ip_over_ib`, `index0`, QoS, …)
//! are skipped without being kept in memory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use devfence_model::{Guid, Membership, PKey};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::FabricError;

/// The largest answer devfence reads from UFM (16 MiB); the client stops reading
/// there, and the decoders refuse anything larger.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// UFM's configured P_Key membership, as `GET /ufmRest/resources/pkeys/?guids_data=true`
/// lists it: per partition (its P_Key *base*, bit 15 clear), the member GUIDs and
/// their membership. Includes every partition UFM lists, the default one
/// (`0x7fff`) and partitions devfence does not manage too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PkeyListing {
    partitions: BTreeMap<PKey, BTreeMap<Guid, Membership>>,
}

impl PkeyListing {
    /// An empty listing.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `guid` to the partition of `pkey` (its membership bit is ignored) with
    /// `membership`.
    ///
    /// # Errors
    /// [`FabricError::Malformed`] when `guid` is already listed there with the
    /// other membership (the listing is left unchanged).
    pub fn insert(
        &mut self,
        pkey: PKey,
        guid: Guid,
        membership: Membership,
    ) -> Result<(), FabricError> {
        let base = PKey(pkey.base());
        let members = self.partitions.entry(base).or_default();
        match members.get(&guid) {
            Some(m) if *m != membership => Err(malformed(
                format!(
                    "GUID {guid} is listed in P_Key {base} as both {} and {}",
                    word(*m),
                    word(membership)
                ),
                "UFM's partition configuration contradicts itself; fix it in UFM",
            )),
            _ => {
                members.insert(guid, membership);
                Ok(())
            }
        }
    }

    /// Every partition that lists `guid`, as the 16-bit P_Key a port table would
    /// hold (bit 15 set for full membership).
    #[must_use]
    pub fn pkeys_of(&self, guid: Guid) -> BTreeSet<PKey> {
        self.partitions
            .iter()
            .filter_map(|(base, members)| members.get(&guid).map(|m| base.with_membership(*m)))
            .collect()
    }

    /// The members of the partition of `pkey` (its membership bit is ignored);
    /// `None` when UFM does not list that partition.
    #[must_use]
    pub fn members_of(&self, pkey: PKey) -> Option<&BTreeMap<Guid, Membership>> {
        self.partitions.get(&PKey(pkey.base()))
    }

    /// Every listed partition (by base) with its members, in P_Key order.
    pub fn partitions(&self) -> impl Iterator<Item = (PKey, &BTreeMap<Guid, Membership>)> + '_ {
        self.partitions.iter().map(|(k, v)| (*k, v))
    }

    /// How many partitions are listed.
    #[must_use]
    pub fn len(&self) -> usize {
        self.partitions.len()
    }

    /// True when UFM lists no partition at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }
}

fn word(m: Membership) -> &'static str {
    match m {
        Membership::Full => "full",
        Membership::Limited => "limited",
    }
}

pub(crate) fn malformed(detail: impl Into<String>, hint: impl Into<String>) -> FabricError {
    FabricError::Malformed {
        backend: "ufm".into(),
        detail: detail.into(),
        hint: hint.into(),
    }
}

/// `msg` (a JSON parser's message) with every quoted part — `"…"` (escapes
/// included) and `` `…` `` — replaced by `"…"`: such parts are bytes of the
/// answer, which no error quotes (an answer may echo a secret in any encoding).
#[must_use]
pub fn unquoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut chars = msg.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut escaped = false;
                for d in chars.by_ref() {
                    match d {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
                out.push_str("\"…\"");
            }
            '`' => {
                for d in chars.by_ref() {
                    if d == '`' {
                        break;
                    }
                }
                out.push_str("`…`");
            }
            c => out.push(c),
        }
    }
    out
}

/// What an error says of a refused value: its length, never the value.
fn described(s: &str) -> String {
    format!("a value of {} characters", s.chars().count())
}

const HINT_JSON: &str = "check that `url` points at the UFM REST API itself (https://<ufm-host>) and that no proxy answers in its place";
const HINT_DATA: &str = "UFM's partition configuration holds a value devfence cannot read; check it in UFM (`GET /ufmRest/resources/pkeys/?guids_data=true`)";

/// Refuses what is no JSON answer at all: too large, empty, or HTML.
fn preflight<'a>(body: &'a [u8], what: &str) -> Result<&'a [u8], FabricError> {
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(malformed(
            format!(
                "the answer to {what} is {} bytes, more than the {MAX_RESPONSE_BYTES} devfence reads",
                body.len()
            ),
            HINT_JSON,
        ));
    }
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len());
    let trimmed = &body[start..];
    if trimmed.is_empty() {
        return Err(malformed(
            format!("the answer to {what} is empty"),
            HINT_JSON,
        ));
    }
    if trimmed[0] == b'<' {
        return Err(html(what, trimmed));
    }
    Ok(body)
}

/// The error for an HTML answer (also used by the client on `text/html`).
#[must_use]
pub fn html(what: &str, body: &[u8]) -> FabricError {
    malformed(
        format!(
            "UFM answered HTML (a login page or proxy error?) to {what} ({} bytes; the answer is not quoted)",
            body.len()
        ),
        HINT_JSON,
    )
}

fn json_error(what: &str, body: &[u8], e: &serde_json::Error) -> FabricError {
    malformed(
        format!(
            "the answer to {what} is not the expected JSON ({}; {} bytes; the answer is not quoted)",
            unquoted(&e.to_string()),
            body.len()
        ),
        HINT_JSON,
    )
}

/// Parses a GUID as UFM writes it: 1 to 16 hex digits, bare (`0002C903000A1B2C`,
/// either case) or after `0x`/`0X`. Nothing else: no separators, no blanks.
///
/// # Errors
/// [`FabricError::Malformed`] naming `field`.
pub fn parse_guid(field: &str, s: &str) -> Result<Guid, FabricError> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(malformed(
            format!(
                "{field}: {} is not a GUID (expected 16 hex digits, e.g. 0002C903000A1B2C)",
                described(s)
            ),
            HINT_DATA,
        ));
    }
    u64::from_str_radix(digits, 16).map(Guid).map_err(|e| {
        malformed(
            format!("{field}: {} is not a GUID ({e})", described(s)),
            HINT_DATA,
        )
    })
}

/// Parses a P_Key as UFM writes it (`0x0001`: `0x` and 1 to 4 hex digits), as
/// its base (membership bit clear); refuses base `0x0000`.
///
/// # Errors
/// [`FabricError::Malformed`] naming `field`.
pub fn parse_pkey(field: &str, s: &str) -> Result<PKey, FabricError> {
    let bad = |why: &str| {
        malformed(
            format!("{field}: {} is not a P_Key ({why})", described(s)),
            HINT_DATA,
        )
    };
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or_else(|| bad("expected 0x and 1 to 4 hex digits"))?;
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("expected 0x and 1 to 4 hex digits"));
    }
    let v = u16::from_str_radix(digits, 16).map_err(|_| bad("out of range"))?;
    let base = PKey(v).base();
    if base == 0 {
        return Err(bad("base 0x0000 names no partition"));
    }
    Ok(PKey(base))
}

/// Parses a membership as UFM writes it: `full` or `limited`, either case.
///
/// # Errors
/// [`FabricError::Malformed`] naming `field`.
pub fn parse_membership(field: &str, s: &str) -> Result<Membership, FabricError> {
    if s.eq_ignore_ascii_case("full") {
        Ok(Membership::Full)
    } else if s.eq_ignore_ascii_case("limited") {
        Ok(Membership::Limited)
    } else {
        Err(malformed(
            format!(
                "{field}: {} is not a membership (expected \"full\" or \"limited\")",
                described(s)
            ),
            HINT_DATA,
        ))
    }
}

// ---------------------------------------------------------------------------
// The P_Key listing: raw shape first (duplicate keys refused, unread fields
// skipped), then validation with field names.

struct RawListing(Vec<(String, RawPkey)>);

#[derive(Default)]
struct RawPkey {
    guids: Vec<RawGuid>,
}

#[derive(Default)]
struct RawGuid {
    guid: Option<String>,
    membership: Option<String>,
}

impl<'de> serde::Deserialize<'de> for RawListing {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawListing;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object keyed by P_Key (\"0x0001\": {\"guids\": [...]})")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawListing, A::Error> {
                let mut out: Vec<(String, RawPkey)> = Vec::new();
                let mut seen = BTreeSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    let n = out.len() + 1;
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format_args!(
                            "the P_Key key of entry {n} is listed twice"
                        )));
                    }
                    let v: RawPkey = map.next_value().map_err(|e| {
                        de::Error::custom(format_args!("under the P_Key of entry {n}: {e}"))
                    })?;
                    out.push((key, v));
                }
                Ok(RawListing(out))
            }
            // Some UFM versions answer `[]` when no partition exists.
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawListing, A::Error> {
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(
                        "expected an object keyed by P_Key, found a non-empty array",
                    ));
                }
                Ok(RawListing(Vec::new()))
            }
        }
        d.deserialize_any(V)
    }
}

/// "field X given twice", naming X only when it is a field devfence reads.
fn given_twice(key: &str) -> String {
    match key {
        "guids" | "guid" | "membership" => format!("field {key} given twice"),
        _ => "a field is given twice".into(),
    }
}

impl<'de> serde::Deserialize<'de> for RawPkey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawPkey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a partition object with a \"guids\" list")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawPkey, A::Error> {
                let mut guids: Option<Option<Vec<RawGuid>>> = None;
                let mut seen = BTreeSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(given_twice(&key)));
                    }
                    if key == "guids" {
                        guids = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(RawPkey {
                    guids: guids.flatten().unwrap_or_default(),
                })
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> serde::Deserialize<'de> for RawGuid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawGuid;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a GUID entry {\"guid\": \"…\", \"membership\": \"full\"}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawGuid, A::Error> {
                let mut out = RawGuid::default();
                let mut seen = BTreeSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(given_twice(&key)));
                    }
                    match key.as_str() {
                        "guid" => out.guid = Some(map.next_value()?),
                        "membership" => out.membership = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Decodes UFM's answer to `GET /ufmRest/resources/pkeys/?guids_data=true`:
/// an object keyed by P_Key (`"0x0001"`), each value an object whose `guids` list
/// holds `{"guid": "0002C903000A1B2C", "membership": "full", …}` entries. A missing
/// or `null` `guids` is an empty partition; an empty array (`[]`) instead of the
/// object is an empty listing.
///
/// # Errors
/// [`FabricError::Malformed`] for everything listed in the module docs, naming the
/// field and quoting the start of the answer.
pub fn decode_pkeys(body: &[u8]) -> Result<PkeyListing, FabricError> {
    const WHAT: &str = "the P_Key listing";
    let json = preflight(body, WHAT)?;
    let raw: RawListing = serde_json::from_slice(json).map_err(|e| json_error(WHAT, body, &e))?;
    let mut out = PkeyListing::new();
    for (n, (key, part)) in raw.0.into_iter().enumerate() {
        let pkey = parse_pkey(&format!("the P_Key key of entry {}", n + 1), &key)?;
        if part.guids.is_empty() {
            out.partitions.entry(pkey).or_default();
        }
        for (i, g) in part.guids.into_iter().enumerate() {
            let field = |f: &str| format!("P_Key {pkey} guids[{i}].{f}");
            let guid = g
                .guid
                .ok_or_else(|| malformed(format!("{} is missing", field("guid")), HINT_DATA))?;
            let guid = parse_guid(&field("guid"), &guid)?;
            let membership = g.membership.ok_or_else(|| {
                malformed(
                    format!(
                        "{} is missing (devfence lists P_Keys with guids_data=true, which names it)",
                        field("membership")
                    ),
                    HINT_DATA,
                )
            })?;
            let membership = parse_membership(&field("membership"), &membership)?;
            out.insert(pkey, guid, membership)?;
        }
    }
    Ok(out)
}

/// A string field of a one-object answer, checked against a character class:
/// what passes is shown in `status` (a version, a time stamp), so it must look
/// like one — not like anything an answer could smuggle in.
fn single_string_field(
    body: &[u8],
    what: &str,
    field: &str,
    max_len: usize,
    allowed: fn(u8) -> bool,
    allowed_desc: &str,
) -> Result<Option<String>, FabricError> {
    let json = preflight(body, what)?;
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| json_error(what, body, &e))?;
    let serde_json::Value::Object(map) = v else {
        return Err(malformed(
            format!(
                "the answer to {what} is not a JSON object ({} bytes; the answer is not quoted)",
                body.len()
            ),
            HINT_JSON,
        ));
    };
    match map.get(field) {
        None => Err(malformed(
            format!(
                "the answer to {what} has no {field:?} ({} bytes; the answer is not quoted)",
                body.len()
            ),
            HINT_JSON,
        )),
        Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => {
            if s.is_empty() || s.len() > max_len || !s.bytes().all(allowed) {
                return Err(malformed(
                    format!(
                        "{what}: {field} is {}, which is empty, longer than {max_len} or holds characters other than {allowed_desc} (not quoted)",
                        described(s)
                    ),
                    HINT_JSON,
                ));
            }
            Ok(Some(s.clone()))
        }
        Some(_) => Err(malformed(
            format!("{what}: {field} is not a string (the answer is not quoted)"),
            HINT_JSON,
        )),
    }
}

/// Decodes UFM's answer to `GET /ufmRest/app/ufm_version`:
/// `{"ufm_release_version": "6.19.0-7"}` (other fields ignored).
///
/// # Errors
/// [`FabricError::Malformed`]: not JSON, HTML, no or an empty version string.
pub fn decode_version(body: &[u8]) -> Result<String, FabricError> {
    const WHAT: &str = "the version query";
    single_string_field(
        body,
        WHAT,
        "ufm_release_version",
        64,
        |b| b.is_ascii_alphanumeric() || b" .-_+()".contains(&b),
        "letters, digits, blanks and . - _ + ( )",
    )?
    .ok_or_else(|| malformed(format!("{WHAT}: ufm_release_version is null"), HINT_JSON))
}

/// Decodes UFM's answer to `GET /ufmRest/resources/pkeys/last_updated`:
/// `{"last_updated": "<timestamp>"}`, or `null` when UFM has no record. The value
/// is kept as UFM wrote it (its format is not documented).
///
/// # Errors
/// [`FabricError::Malformed`]: not JSON, HTML, no such field.
pub fn decode_last_updated(body: &[u8]) -> Result<Option<String>, FabricError> {
    single_string_field(
        body,
        "the last_updated query",
        "last_updated",
        40,
        |b| b.is_ascii_digit() || b" -:.TZ+/".contains(&b),
        "digits and - : . T Z + / and blanks",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(json: &str) -> Result<PkeyListing, FabricError> {
        decode_pkeys(json.as_bytes())
    }
    fn detail(e: &FabricError) -> String {
        match e {
            FabricError::Malformed { detail, hint, .. } => {
                assert!(!hint.is_empty());
                detail.clone()
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    const REAL: &str = r#"{
      "0x7fff": {"partition": "management", "ip_over_ib": true,
                 "guids": [{"guid": "0002C903000A1B2C", "membership": "limited", "index0": true}]},
      "0x0001": {"partition": "tenantA", "ip_over_ib": true,
                 "guids": [{"guid": "0002c903000a1b2c", "membership": "full", "index0": true},
                           {"guid": "0x0002C903000AFFFF", "membership": "Limited"}]},
      "0x0002": {"partition": "empty", "guids": []},
      "0x0003": {"partition": "no guids field"}
    }"#;

    #[test]
    fn decodes_ufm_shape_in_every_guid_case_and_form() {
        let l = listing(REAL).expect("decodes");
        assert_eq!(l.len(), 4);
        let g = Guid(0x0002_c903_000a_1b2c);
        assert_eq!(l.pkeys_of(g), BTreeSet::from([PKey(0x8001), PKey(0x7fff)]));
        assert_eq!(
            l.pkeys_of(Guid(0x0002_c903_000a_ffff)),
            BTreeSet::from([PKey(0x0001)])
        );
        assert_eq!(l.members_of(PKey(0x8002)).map(BTreeMap::len), Some(0));
        assert_eq!(l.members_of(PKey(0x0003)).map(BTreeMap::len), Some(0));
        assert!(l.members_of(PKey(0x0004)).is_none());
    }

    #[test]
    fn empty_listings() {
        assert!(listing("{}").expect("ok").is_empty());
        assert!(listing(" [ ] ").expect("ok").is_empty());
        assert!(listing("\u{feff}{}").expect("bom ok").is_empty());
        assert!(listing(r#"{"0x0001": {"guids": null}}"#).expect("ok").len() == 1);
    }

    #[test]
    fn refuses_html_by_content() {
        for body in [
            "<html><body>Please log in</body></html>",
            "  \n<!DOCTYPE html><html>",
        ] {
            let e = listing(body).expect_err("html");
            let d = detail(&e);
            assert!(
                d.contains("UFM answered HTML (a login page or proxy error?)"),
                "{d}"
            );
            assert!(e.to_string().contains("Hint:"), "{e}");
        }
    }

    #[test]
    fn refuses_garbage_and_wrong_shapes_naming_what() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("   ", "empty"),
            ("{", "not the expected JSON"),
            ("null", "not the expected JSON"),
            ("42", "not the expected JSON"),
            ("[1]", "non-empty array"),
            (r#"{"0x0001": []}"#, "under the P_Key of entry 1"),
            (r#"{"0x0001": {"guids": {}}}"#, "not the expected JSON"),
            (
                r#"{"0x0001": {"guids": ["0002c903000a1b2c"]}}"#,
                "not the expected JSON",
            ),
            (
                r#"{"0x0001": {"guids": [{"guid": 5, "membership": "full"}]}}"#,
                "invalid type",
            ),
            (r#"{} trailing"#, "trailing"),
            (r#"{"0x0001": {}, "0x0001": {}}"#, "listed twice"),
            (r#"{"0x0001": {"guids": [], "guids": []}}"#, "given twice"),
            (
                r#"{"0x0001": {"guids": [{"guid": "01", "guid": "02", "membership": "full"}]}}"#,
                "given twice",
            ),
        ];
        for (body, want) in cases {
            let e = listing(body).expect_err(body);
            let d = detail(&e);
            assert!(d.contains(want), "{body}: {d}");
        }
    }

    #[test]
    fn refuses_bad_values_naming_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"1": {}}"#,
                "the P_Key key of entry 1: a value of 1 characters is not a P_Key",
            ),
            (r#"{"0x10000": {}}"#, "is not a P_Key"),
            (r#"{"0x0000": {}}"#, "base 0x0000"),
            (r#"{"0x8000": {}}"#, "base 0x0000"),
            (r#"{"0xzz": {}}"#, "is not a P_Key"),
            (
                r#"{"0x0001": {"guids": [{"membership": "full"}]}}"#,
                "P_Key 0x0001 guids[0].guid is missing",
            ),
            (
                r#"{"0x0001": {"guids": [{"guid": "0002c903000a1b2c"}]}}"#,
                "P_Key 0x0001 guids[0].membership is missing",
            ),
            (
                r#"{"0x0001": {"guids": [{"guid": "0002:c903:000a:1b2c", "membership": "full"}]}}"#,
                "P_Key 0x0001 guids[0].guid: a value of 19 characters is not a GUID",
            ),
            (
                r#"{"0x0001": {"guids": [{"guid": "00020002c903000a1b2c", "membership": "full"}]}}"#,
                "is not a GUID",
            ),
            (
                r#"{"0x0001": {"guids": [{"guid": "", "membership": "full"}]}}"#,
                "is not a GUID",
            ),
            (
                r#"{"0x0001": {"guids": [{"guid": "0x", "membership": "full"}]}}"#,
                "is not a GUID",
            ),
            (
                r#"{"0x0001": {"guids": [{"guid": " 01", "membership": "full"}]}}"#,
                "is not a GUID",
            ),
            (
                r#"{"0x0001": {"guids": [{"guid": "01", "membership": "both"}]}}"#,
                "guids[0].membership: a value of 4 characters is not a membership",
            ),
            (
                r#"{"0x0001": {"guids": [{"guid": "01", "membership": "full"},
                                          {"guid": "0x1", "membership": "limited"}]}}"#,
                "listed in P_Key 0x0001 as both full and limited",
            ),
            (
                r#"{"0x0001": {"guids": [{"guid": "01", "membership": "full"}]},
                    "0x8001": {"guids": [{"guid": "01", "membership": "limited"}]}}"#,
                "as both full and limited",
            ),
        ];
        for (body, want) in cases {
            let e = listing(body).expect_err(body);
            let d = detail(&e);
            assert!(d.contains(want), "{body}: {d}");
        }
    }

    #[test]
    fn same_partition_twice_with_same_membership_merges() {
        let l = listing(
            r#"{"0x0001": {"guids": [{"guid": "01", "membership": "full"}]},
                "0x8001": {"guids": [{"guid": "0x1", "membership": "FULL"},
                                     {"guid": "02", "membership": "full"}]}}"#,
        )
        .expect("merges");
        assert_eq!(l.len(), 1);
        assert_eq!(l.members_of(PKey(1)).map(BTreeMap::len), Some(2));
    }

    #[test]
    fn refuses_oversized() {
        let mut big = b"{\"0x0001\": {\"partition\": \"".to_vec();
        big.resize(MAX_RESPONSE_BYTES, b'a');
        big.extend_from_slice(b"\"}}");
        let d = detail(&decode_pkeys(&big).expect_err("too big"));
        assert!(d.contains("more than the 16777216"), "{d}");
    }

    #[test]
    fn version_and_last_updated() {
        assert_eq!(
            decode_version(br#"{"ufm_release_version": "6.19.0-7", "x": 1}"#).expect("ok"),
            "6.19.0-7"
        );
        for bad in [
            &b"{}"[..],
            b"[]",
            b"\"6.1\"",
            br#"{"ufm_release_version": 6}"#,
            br#"{"ufm_release_version": ""}"#,
            br#"{"ufm_release_version": null}"#,
            br#"{"ufm_release_version": "a\nb"}"#,
            b"<html>",
            b"",
        ] {
            detail(&decode_version(bad).expect_err("bad version"));
        }
        assert_eq!(
            decode_last_updated(br#"{"last_updated": "2024-01-02 03:04:05"}"#).expect("ok"),
            Some("2024-01-02 03:04:05".to_string())
        );
        assert_eq!(
            decode_last_updated(br#"{"last_updated": null}"#).expect("ok"),
            None
        );
        detail(&decode_last_updated(b"{}").expect_err("missing"));
    }

    #[test]
    fn quoted_parts_of_parser_messages_are_dropped() {
        assert_eq!(
            unquoted(r#"invalid type: string "pa\"ss", expected a map at line 1"#),
            r#"invalid type: string "…", expected a map at line 1"#
        );
        assert_eq!(
            unquoted("invalid value: integer `1234`, expected x"),
            "invalid value: integer `…`, expected x"
        );
        assert_eq!(unquoted(r#"open "never closed"#), r#"open "…""#);
        // Nothing of a value an answer gave survives any decoder's error.
        for body in [
            r#"{"0x0001": {"guids": [{"guid": "SECRETVALUE", "membership": "full"}]}}"#,
            r#"{"0x0001": {"guids": [{"guid": "01", "membership": "SECRETVALUE"}]}}"#,
            r#"{"SECRETVALUE": {}}"#,
            r#"{"0x0001": "SECRETVALUE"}"#,
            r#"{"0x0001": {"guids": "SECRETVALUE"}}"#,
            r#"{"0x0001": {"SECRETVALUE": 1, "SECRETVALUE": 2}}"#,
            r#"{"0x0001": {}, "0x0001": {}, "x": "SECRETVALUE"}"#,
            r#"["SECRETVALUE"]"#,
            r#"SECRETVALUE"#,
            r#"<html>SECRETVALUE</html>"#,
        ] {
            let e = decode_pkeys(body.as_bytes()).expect_err(body);
            assert!(!format!("{e}{e:?}").contains("SECRETVALUE"), "{body}: {e}");
        }
        for body in [
            r#"{"ufm_release_version": "SECRET\"VALUE"}"#,
            r#"{"ufm_release_version": "SECRET/VALUE="}"#,
            r#"{"ufm_release_version": 1, "x": "SECRETVALUE"}"#,
            r#"{"other": "SECRETVALUE"}"#,
            r#""SECRETVALUE""#,
        ] {
            let e = decode_version(body.as_bytes()).expect_err(body);
            assert!(!format!("{e}{e:?}").contains("SECRET"), "{body}: {e}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode_pkeys(&bytes);
                let _ = decode_version(&bytes);
                let _ = decode_last_updated(&bytes);
            }

            #[test]
            fn every_listed_membership_round_trips(
                entries in proptest::collection::vec((1u16..0x7fff, any::<u64>(), any::<bool>()), 0..20)
            ) {
                let mut json = serde_json::Map::new();
                let mut want = PkeyListing::new();
                for (p, g, full) in &entries {
                    let m = if *full { Membership::Full } else { Membership::Limited };
                    if want.insert(PKey(*p), Guid(*g), m).is_err() {
                        continue;
                    }
                    let key = format!("0x{p:04x}");
                    let part = json.entry(key).or_insert_with(|| serde_json::json!({"guids": []}));
                    if let Some(list) = part.get_mut("guids").and_then(|v| v.as_array_mut()) {
                        list.push(serde_json::json!({"guid": format!("{g:016X}"), "membership": word(m)}));
                    }
                }
                let bytes = serde_json::to_vec(&json).expect("ser");
                prop_assert_eq!(decode_pkeys(&bytes).expect("decodes"), want);
            }
        }
    }
}
