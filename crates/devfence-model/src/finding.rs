//! Findings: what the isolation rules report, each with its evidence and a hint.

use std::fmt;

/// How bad a finding is. `Error` findings make `devfence check` exit 1.
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
pub enum Severity {
    /// Worth knowing; isolation is not at stake.
    Info,
    /// Isolation may be at stake; an operator should look.
    Warning,
    /// Isolation is broken or cannot be verified: fail closed.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One item of evidence: a path that was read and the value found there.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Evidence {
    /// The path (under the host root, shown as the kernel names it) or a
    /// tenancy-file location such as `tenancy:assignment[2]`.
    pub path: String,
    /// The value read, trimmed, or a description such as `(absent)`.
    pub value: String,
}

impl Evidence {
    /// Builds an evidence item.
    pub fn new(path: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            value: value.into(),
        }
    }
}

/// What a finding is about, typed: a device (PCI function, mdev, APQN, IB
/// GUID), an IOMMU group, a pair of either, or something named otherwise (a
/// `/dev` node, a P_Key, a launcher uid). It is shown, and serialized in JSON,
/// as the text it always was (`0000:3b:00.1`, `iommu_group 13`, `A and B`), so
/// the JSON schema does not change; code matches on the variant, never on the
/// text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    /// A device.
    Device(crate::DeviceId),
    /// An IOMMU group.
    Group(crate::IommuGroupId),
    /// Two subjects a finding is about together (`A and B`).
    Pair(Box<Subject>, Box<Subject>),
    /// Anything else, as its text.
    Other(String),
}

impl Subject {
    /// Whether this is `device`, or a pair with it.
    #[must_use]
    pub fn is_device(&self, device: &crate::DeviceId) -> bool {
        match self {
            Subject::Device(d) => d == device,
            Subject::Pair(a, b) => a.is_device(device) || b.is_device(device),
            _ => false,
        }
    }

    /// Whether this is IOMMU group `group`.
    #[must_use]
    pub fn is_group(&self, group: crate::IommuGroupId) -> bool {
        matches!(self, Subject::Group(g) if *g == group)
    }

    fn parse_one(s: &str) -> Subject {
        if let Some(n) = s.strip_prefix("iommu_group ")
            && let Ok(g) = n.parse::<u32>()
            && g.to_string() == n
        {
            return Subject::Group(crate::IommuGroupId(g));
        }
        if let Ok(d) = s.parse::<crate::DeviceId>()
            && d.to_string() == s
        {
            return Subject::Device(d);
        }
        Subject::Other(s.to_owned())
    }
}

impl From<&str> for Subject {
    /// The subject a rule names in text; what is not a device, a group or a
    /// pair of them (exactly as they print) stays text.
    fn from(s: &str) -> Self {
        if let Some((a, b)) = s.split_once(" and ") {
            let (a, b) = (Subject::parse_one(a), Subject::parse_one(b));
            if !matches!(a, Subject::Other(_)) && !matches!(b, Subject::Other(_)) {
                return Subject::Pair(Box::new(a), Box::new(b));
            }
            return Subject::Other(s.to_owned());
        }
        Subject::parse_one(s)
    }
}

impl From<String> for Subject {
    fn from(s: String) -> Self {
        Subject::from(s.as_str())
    }
}

impl From<&String> for Subject {
    fn from(s: &String) -> Self {
        Subject::from(s.as_str())
    }
}

impl From<crate::DeviceId> for Subject {
    fn from(d: crate::DeviceId) -> Self {
        Subject::Device(d)
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Device(d) => d.fmt(f),
            Subject::Group(g) => write!(f, "iommu_group {g}"),
            Subject::Pair(a, b) => write!(f, "{a} and {b}"),
            Subject::Other(s) => f.write_str(s),
        }
    }
}

impl Subject {
    /// Whether the subject prints as `text`.
    #[must_use]
    pub fn reads(&self, text: &str) -> bool {
        displays_as(self, text)
    }
}

/// Whether `v` prints as `text` (compared as it is written, no allocation).
pub(crate) fn displays_as(v: &dyn fmt::Display, text: &str) -> bool {
    struct Cmp<'a> {
        rest: &'a str,
    }
    impl fmt::Write for Cmp<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            match self.rest.strip_prefix(s) {
                Some(r) => {
                    self.rest = r;
                    Ok(())
                }
                None => Err(fmt::Error),
            }
        }
    }
    let mut c = Cmp { rest: text };
    fmt::write(&mut c, format_args!("{v}")).is_ok() && c.rest.is_empty()
}

impl PartialEq<str> for Subject {
    fn eq(&self, other: &str) -> bool {
        self.reads(other)
    }
}

impl PartialEq<&str> for Subject {
    fn eq(&self, other: &&str) -> bool {
        self.reads(other)
    }
}

impl PartialEq<String> for Subject {
    fn eq(&self, other: &String) -> bool {
        self.reads(other)
    }
}

impl schemars::JsonSchema for Subject {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Subject".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "description": "What a finding is about, by name: a device (BDF, mdev UUID, APQN, GUID), an IOMMU group (group N), a pair of them, or another named thing." })
    }
}

impl serde::Serialize for Subject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Subject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Subject::from(s))
    }
}

/// A finding of an isolation rule.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Finding {
    /// The rule id, e.g. `GRP-VIABLE`.
    pub rule: String,
    /// How bad it is.
    pub severity: Severity,
    /// What it is about: a device (BDF, mdev UUID, APQN, GUID), an IOMMU
    /// group, a pair of them, or another named thing.
    pub subject: Subject,
    /// One sentence saying what is wrong.
    pub message: String,
    /// The paths and values that show it.
    pub evidence: Vec<Evidence>,
    /// What the operator can do about it.
    pub hint: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} [{}] {}: {}",
            self.severity, self.rule, self.subject, self.message
        )?;
        for e in &self.evidence {
            writeln!(f, "    {} = {}", e.path, e.value)?;
        }
        write!(f, "    hint: {}", self.hint)
    }
}

#[cfg(test)]
mod subject_tests {
    use super::*;

    /// issue 11 item 3: subjects are typed, and print (and serialize) as the
    /// text they always were.
    #[test]
    fn subjects_are_typed_and_print_as_before() {
        for (text, typed) in [
            ("0000:3b:00.1", true),
            ("iommu_group 13", true),
            ("0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01", true),
            ("05.0013", true),
            ("0x0c42a10340000001", true),
            (
                "0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01 and 0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0b02",
                true,
            ),
            ("/dev/vfio/29", false),
            ("P_Key 0x0001", false),
            ("iommu_group 013", false),
            ("launcher uid 107 and more", false),
        ] {
            let s = Subject::from(text);
            assert_eq!(s.to_string(), text);
            assert_eq!(!matches!(s, Subject::Other(_)), typed, "{text}: {s:?}");
            let j = serde_json::to_string(&s).unwrap_or_default();
            assert_eq!(j, format!("{text:?}"));
            let back: Subject = serde_json::from_str(&j).unwrap_or(Subject::Other(String::new()));
            assert_eq!(back, s);
        }
        let dev: crate::DeviceId =
            "0000:3b:00.1"
                .parse()
                .unwrap_or(crate::DeviceId::Apqn(crate::Apqn {
                    adapter: 0,
                    domain: 0,
                }));
        assert!(Subject::from("0000:3b:00.1").is_device(&dev));
        assert!(Subject::from("iommu_group 13").is_group(crate::IommuGroupId(13)));
        assert!(!Subject::from("iommu_group 13").is_device(&dev));
    }
}
