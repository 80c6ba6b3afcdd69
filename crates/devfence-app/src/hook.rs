//! The libvirt hook's decisions (`devfence hook qemu <domain> <op> <sub-op>`):
//! admit a domain's devices at `prepare begin`, withdraw the VF tokens at
//! `started begin`, return the devices at `release end`.

use devfence_engine::domain::{DomainSpec, Refusal, Unidentified, reserved_for};
use devfence_engine::engine::Engine;
use devfence_engine::store::{DeviceState, StoreError, StoreExt};
use devfence_host::actuator::files::FileStepError;
use devfence_model::DeviceId;

/// The hook's phase of a domain's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `prepare begin`: the last word before the guest gets its devices.
    Prepare(Unidentified),
    /// `started begin`: the launcher has read its VF tokens.
    Started,
    /// `release end` (or `stopped end`): the guest is gone.
    Release,
}

/// What the hook decided.
#[derive(Debug)]
pub enum Decision {
    /// The domain may start (or the phase needed nothing more).
    Allowed,
    /// The domain is refused (`prepare`), with why.
    Refused(Refusal),
    /// Some devices could not be returned (`release`); each failure, one line.
    TeardownFailed(Vec<String>),
}

/// Why the hook could not decide.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The ledger failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A VF token file could not be withdrawn.
    #[error("Cannot withdraw the VF token: {}. Hint: {}", .0.reason(), .0.hint())]
    Token(#[source] FileStepError),
}

/// Runs the hook's `phase` for the domain `spec` on `engine`.
///
/// # Errors
/// The ledger fails, or a token file cannot be removed.
pub fn decide(
    engine: &mut Engine<'_>,
    spec: &DomainSpec,
    phase: Phase,
) -> Result<Decision, HookError> {
    match phase {
        Phase::Prepare(policy) => Ok(match engine.start_domain(spec, policy) {
            Ok(_) => Decision::Allowed,
            Err(r) => Decision::Refused(r),
        }),
        Phase::Started => {
            for d in &spec.hostdevs {
                if let DeviceId::Pci(b) = d {
                    engine.withdraw_token(*b).map_err(HookError::Token)?;
                }
            }
            Ok(Decision::Allowed)
        }
        Phase::Release => {
            let mut failures = Vec::new();
            for d in &spec.hostdevs {
                let st = engine
                    .store()
                    .atomically(|tx| tx.device(d))?
                    .map(|r| r.state);
                if matches!(&st, Some(DeviceState::Active { vm, .. }) if reserved_for(spec, vm))
                    && let Err(x) = engine.vm_stopped(d)
                {
                    failures.push(x.to_string().replace('\n', " "));
                }
            }
            Ok(if failures.is_empty() {
                Decision::Allowed
            } else {
                Decision::TeardownFailed(failures)
            })
        }
    }
}
