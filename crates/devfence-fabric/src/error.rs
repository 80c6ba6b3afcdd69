//! Typed errors of the fabric seam. Each message names the subject and ends with a
//! hint the operator can act on.

use std::time::Duration;

use devfence_model::Guid;

/// Why a fabric operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// A zero or all-ones GUID was named as a partition member.
    #[error(
        "GUID {guid} is reserved (zero or all ones) and cannot be a partition member. \
         Hint: give the port a fresh GUID from the pool and stage that one"
    )]
    ReservedGuid {
        /// The refused GUID.
        guid: Guid,
    },
    /// A P_Key whose base is `0x0000` (an empty table slot) was named as a partition.
    #[error(
        "P_Key 0x{pkey:04x} names no partition (its base is 0x0000, an empty table slot). \
         Hint: use the tenant's P_Key, e.g. 0x8001"
    )]
    EmptyPKey {
        /// The refused value.
        pkey: u16,
    },
    /// The default partition was named: devfence does not manage it.
    #[error(
        "P_Key 0x{pkey:04x} is the default partition, which devfence does not manage. \
         Hint: the backend renders the default partition itself (non-SM ports limited); \
         give the tenant a partition of its own"
    )]
    DefaultPartition {
        /// The refused value.
        pkey: u16,
    },
    /// The SM could not be reached or did not answer.
    #[error("The {backend} subnet manager is unreachable: {detail}. Hint: {hint}")]
    Unreachable {
        /// Which backend.
        backend: String,
        /// What was tried and what happened.
        detail: String,
        /// What to check.
        hint: String,
    },
    /// The SM (or devfence on its behalf) refused the change.
    #[error("The {backend} subnet manager refused the change: {detail}. Hint: {hint}")]
    Refused {
        /// Which backend.
        backend: String,
        /// What was refused and why.
        detail: String,
        /// What to do.
        hint: String,
    },
    /// The SM answered something that does not decode.
    #[error("The {backend} subnet manager answered something unreadable: {detail}. Hint: {hint}")]
    Malformed {
        /// Which backend.
        backend: String,
        /// What was read (cut short) and why it does not decode.
        detail: String,
        /// What to check.
        hint: String,
    },
    /// An operation did not finish in time.
    #[error("{op} on the {backend} subnet manager timed out after {after:?}. Hint: {hint}")]
    Timeout {
        /// Which backend.
        backend: String,
        /// The operation.
        op: String,
        /// How long it was given.
        after: Duration,
        /// What to check.
        hint: String,
    },
    /// A system call failed (errno-like).
    #[error("{op} on the {backend} subnet manager failed: {} (errno {errno}). Hint: {hint}",
        std::io::Error::from_raw_os_error(*errno))]
    Os {
        /// Which backend.
        backend: String,
        /// The operation.
        op: String,
        /// The errno.
        errno: i32,
        /// What to check.
        hint: String,
    },
}

impl FabricError {
    /// True when asking again may succeed (the SM was busy, slow, unreachable or
    /// answered garbage once); false for a request that will be refused every time.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            FabricError::ReservedGuid { .. }
            | FabricError::EmptyPKey { .. }
            | FabricError::DefaultPartition { .. }
            | FabricError::Refused { .. } => false,
            FabricError::Unreachable { .. }
            | FabricError::Malformed { .. }
            | FabricError::Timeout { .. }
            | FabricError::Os { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_subject_and_carry_a_hint() {
        let e = FabricError::Os {
            backend: "sim".into(),
            op: "observe".into(),
            errno: 110,
            hint: "check the SM host".into(),
        };
        let s = e.to_string();
        assert!(s.contains("errno 110"), "{s}");
        assert!(s.contains("Hint: check the SM host"), "{s}");
        assert!(e.is_retryable());
        let e = FabricError::EmptyPKey { pkey: 0x8000 };
        assert!(e.to_string().contains("0x8000"));
        assert!(!e.is_retryable());
    }
}
