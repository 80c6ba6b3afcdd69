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

/// One pass of the host agent's continuous verification (issue 12 item 4):
/// what [`verify`] found, and what the agent reports beside it.
#[derive(Debug)]
pub struct Pass {
    /// The re-verification of every Ready and Active device.
    pub verified: Verified,
    /// Every device of the ledger with its state after the pass (a drifted
    /// Ready device is Quarantined here).
    pub states: Vec<(DeviceId, String)>,
    /// The generation of the SM's last completed sweep, when the backend
    /// reports one (the simulated SM, OpenSM; none without an SM).
    pub sm_generation: Option<u64>,
    /// How the SM's last sweep ended (`none_yet`, `clean`, `errors`), when
    /// the backend answers.
    pub sm_sweep: Option<&'static str>,
    /// What opening the environment noticed.
    pub notices: Vec<String>,
}

/// Opens the environment of `root` and re-verifies every Ready and Active
/// device on behalf of `actor` ([`verify`]: a drifted Ready device is
/// quarantined, a drifted Active one reported, both audited by the engine),
/// then reads the devices' states and the SM's sweep generation.
///
/// # Errors
/// The environment cannot be opened (no ledger yet, the configuration, the
/// kernel, the SM); the ledger cannot be read.
pub fn pass(
    root: &devfence_host::HostRoot,
    ledger: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
    actor: &crate::Actor,
) -> Result<Pass> {
    use devfence_engine::StoreExt;
    let mut env = Env::open(root, ledger, config)?;
    env.act_as(actor);
    let verified = verify(&mut env, None)?;
    let states = env
        .store
        .atomically(|tx| tx.devices())?
        .into_iter()
        .map(|r| (r.device, r.state.name().to_owned()))
        .collect();
    let health = env.sm().health().ok();
    let sm_generation = health
        .as_ref()
        .filter(|h| h.status.sweep != devfence_fabric::SweepOutcome::NoneYet)
        .map(|h| h.status.generation.0);
    let sm_sweep = health.map(|h| match h.status.sweep {
        devfence_fabric::SweepOutcome::NoneYet => "none_yet",
        devfence_fabric::SweepOutcome::Clean => "clean",
        devfence_fabric::SweepOutcome::Errors(_) => "errors",
    });
    Ok(Pass {
        verified,
        states,
        sm_generation,
        sm_sweep,
        notices: std::mem::take(&mut env.notices),
    })
}
