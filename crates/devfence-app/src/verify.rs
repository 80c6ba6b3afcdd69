//! `devfence verify`: re-verifies Ready and Active devices against the host
//! and the SM, and records a restore of the SM's configuration that happened
//! meanwhile (docs/lifecycle.md).

use devfence_engine::engine::{EngineConfig, Reverification};
use devfence_model::DeviceId;

use crate::env::Env;
use crate::error::Result;

/// What `devfence verify` found.
#[derive(Debug)]
pub struct Verified {
    /// Every device's re-verification.
    pub reverification: Reverification,
    /// Restores of the SM's configuration recorded by this verification.
    pub restores_recorded: Vec<String>,
    /// The SM backend.
    pub backend: String,
    /// What could not be done and did not stop the verification.
    pub warnings: Vec<String>,
}

/// Re-verifies `device`, or every Ready and Active device.
///
/// # Errors
/// The device is not Ready or Active; the ledger cannot be read.
pub fn verify(env: &mut Env, device: Option<DeviceId>) -> Result<Verified> {
    let scope = device.map(|d| vec![d]);
    let backend = env.sm().backend().to_owned();
    let mut warnings = Vec::new();
    let mut engine = env.engine(EngineConfig::default());
    let rv = engine.reverify(scope.as_deref())?;
    // A restore the SM backend made while this verification read it is
    // recorded now, and its re-verification of every device is the newer word.
    let (reverification, restores_recorded) = match engine.record_fabric_restores() {
        Ok((new, after)) => {
            let ids: Vec<String> = new.into_iter().map(|r| r.id).collect();
            match after {
                Some(mut after) => {
                    after
                        .devices
                        .retain(|d| scope.as_ref().is_none_or(|s| s.contains(&d.device)));
                    (after, ids)
                }
                None => (rv, ids),
            }
        }
        Err(e) => {
            warnings.push(format!("warning: {e}"));
            (rv, Vec::new())
        }
    };
    Ok(Verified {
        reverification,
        restores_recorded,
        backend,
        warnings,
    })
}
