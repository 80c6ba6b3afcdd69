//! The application layer's error: what a use case reports to its front end.
//!
//! Each lower layer's error stays itself (a variant with `#[from]`, shown as
//! it is, its chain intact); what the application adds is a sentence saying
//! what it was doing, with the cause kept as the source, never flattened into
//! the text. Every message ends in a `Hint: …` where the operator can act.

use devfence_engine::StoreError;
use devfence_engine::engine::EngineError;
use devfence_fabric::FabricError;

use crate::config::ConfigError;

/// Why a use case failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// `devfence.toml` cannot be read or is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The ledger failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The libvirt hook could not decide.
    #[error(transparent)]
    Hook(#[from] crate::hook::HookError),
    /// The audit chain cannot be read, verified or pruned.
    #[error(transparent)]
    Audit(#[from] devfence_engine::AuditError),
    /// The engine refused or failed an operation.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The subnet manager failed.
    #[error(transparent)]
    Fabric(#[from] FabricError),
    /// The host root cannot be read.
    #[error(transparent)]
    Host(#[from] devfence_host::HostError),
    /// A tenancy file is refused.
    #[error(transparent)]
    Tenancy(#[from] devfence_policy::TenancyError),
    /// The kernel refused an action (the error names the attribute, the
    /// errno and a hint).
    #[error(transparent)]
    Act(Box<devfence_host::actuator::ActError>),
    /// A host key cannot be made or read.
    #[error(transparent)]
    Key(#[from] devfence_seal::KeyError),
    /// The keyring refuses a change.
    #[error(transparent)]
    Keyring(#[from] devfence_seal::KeyringError),
    /// The simulated SM's state cannot be used.
    #[error(transparent)]
    SimSm(#[from] devfence_fabric::SimStateError),
    /// The UFM backend cannot be set up.
    #[error(transparent)]
    UfmSetup(#[from] devfence_fabric::ufm::UfmSetupError),
    /// A bounded read of a file failed (the error names the file).
    #[error(transparent)]
    Read(#[from] devfence_model::bounded::ReadFileError),
    /// A path under the host root cannot be resolved, or another I/O error the
    /// operating system names.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A step failed; `what` says which (and the hint), `source` why.
    #[error("{what}")]
    Step {
        /// What devfence was doing, with a hint.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// An input or a state devfence refuses; the message names the rule and
    /// gives a hint.
    #[error("{0}")]
    Refused(String),
}

impl AppError {
    /// A refusal with its message (naming the rule, with a hint).
    pub fn refused(msg: impl Into<String>) -> Self {
        AppError::Refused(msg.into())
    }

    /// A failed step: `what` (with a hint) caused by `source`.
    pub fn step(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        AppError::Step {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

/// Adds what devfence was doing to an error, keeping the error as the source.
pub trait StepContext<T> {
    /// On error, [`AppError::Step`] with `what` (computed only then).
    ///
    /// # Errors
    /// The original error, wrapped.
    fn step(self, what: impl FnOnce() -> String) -> Result<T, AppError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> StepContext<T> for Result<T, E> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, AppError> {
        self.map_err(|e| AppError::step(what(), e))
    }
}

/// The application layer's result.
pub type Result<T, E = AppError> = std::result::Result<T, E>;

/// An error and its causes on one line, `: `-separated (for an audit record).
#[must_use]
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
