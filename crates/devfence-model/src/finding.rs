//! Findings: what the isolation rules report, each with its evidence and a hint.

use std::fmt;

/// How bad a finding is. `Error` findings make `devfence check` exit 1.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// A finding of an isolation rule.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    /// The rule id, e.g. `GRP-VIABLE`.
    pub rule: String,
    /// How bad it is.
    pub severity: Severity,
    /// What it is about: a BDF, group, GUID, APQN or UUID.
    pub subject: String,
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
