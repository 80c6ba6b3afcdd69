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
    /// The fleet store (etcd) failed or cannot be reached (issue 13); boxed:
    /// it carries etcd's status.
    #[error(transparent)]
    Fleet(Box<devfence_fleet::FleetError>),
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
    /// An input devfence cannot use (a value out of range, a file that is not
    /// what it must be, nothing asked); the message names it and gives a hint.
    #[error("{0}")]
    Invalid(String),
    /// Refused by an isolation rule: the action would change a device the
    /// ledger holds (without `--force`); the message names the device, its
    /// state and a hint.
    #[error("{0}")]
    Held(String),
}

impl From<devfence_fleet::FleetError> for AppError {
    fn from(e: devfence_fleet::FleetError) -> Self {
        AppError::Fleet(Box::new(e))
    }
}

impl AppError {
    /// An input devfence cannot use, with its message (and a hint).
    pub fn invalid(msg: impl Into<String>) -> Self {
        AppError::Invalid(msg.into())
    }

    /// Whether this is a refusal by a rule (exit status 1: the request was
    /// understood and the answer is no) rather than an input, configuration
    /// or I/O error (exit status 2). The table is in the README ("Exit
    /// status").
    #[must_use]
    pub fn is_refusal(&self) -> bool {
        match self {
            AppError::Held(_) => true,
            AppError::Engine(e) => engine_refusal(e),
            AppError::Store(e) => store_refusal(e),
            _ => false,
        }
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

/// An engine error that is a refusal (exit 1): the operation was refused by a
/// rule or the lifecycle, or a step or gate failed and the device was
/// quarantined.
#[must_use]
pub fn engine_refusal(e: &EngineError) -> bool {
    match e {
        EngineError::Refused { .. } | EngineError::Failed { .. } => true,
        EngineError::Store(s) => store_refusal(s),
        EngineError::Host { .. } => false,
    }
}

/// A ledger error that is a refusal by a lifecycle rule (exit 1): a tenant
/// that still holds devices, a device in the wrong state or busy with another
/// operation, an exhausted GUID pool.
#[must_use]
pub fn store_refusal(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::TenantInUse { .. }
            | StoreError::StateConflict { .. }
            | StoreError::IllegalTransition { .. }
            | StoreError::Busy(_)
            | StoreError::GuidPoolExhausted { .. }
    )
}
