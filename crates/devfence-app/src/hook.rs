//! The libvirt hook's decisions (`devfence hook qemu <domain> <op> <sub-op>`):
//! admit a domain's devices at `prepare begin`, withdraw the VF tokens at
//! `started begin`, return the devices at `release end`.

use devfence_engine::engine::Engine;
use devfence_engine::libvirt::{DomainSpec, Refusal, Unidentified, reserved_for};
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

/// The hook's decision as a value both front ends render: the CLI's hook
/// (exit status and stderr lines) and the agent's `POST /v1/hook/qemu`.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, serde::Deserialize,
)]
pub struct Verdict {
    /// `allowed`, `refused` or `teardown_failed`.
    pub decision: String,
    /// Why the domain is refused (`refused`): the line the hook prints.
    pub reason: Option<String>,
    /// Each device that could not be returned (`teardown_failed`).
    pub failures: Vec<String>,
    /// What opening the environment noticed.
    pub notices: Vec<String>,
}

impl Verdict {
    /// The verdict of `decision`, with what opening noticed.
    #[must_use]
    pub fn of(decision: &Decision, notices: Vec<String>) -> Verdict {
        let (d, reason, failures) = match decision {
            Decision::Allowed => ("allowed", None, Vec::new()),
            Decision::Refused(r) => ("refused", Some(r.to_string()), Vec::new()),
            Decision::TeardownFailed(f) => ("teardown_failed", None, f.clone()),
        };
        Verdict {
            decision: d.to_owned(),
            reason,
            failures,
            notices,
        }
    }

    /// Whether the domain may go on (libvirt's exit status 0).
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.decision == "allowed"
    }
}

/// The hook calls devfence acts on; libvirt's other calls need nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `prepare begin`.
    PrepareBegin,
    /// `started begin`.
    StartedBegin,
    /// `release end`.
    ReleaseEnd,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Call::PrepareBegin => "prepare begin",
            Call::StartedBegin => "started begin",
            Call::ReleaseEnd => "release end",
        })
    }
}

impl Call {
    /// The call libvirt's `operation` and `subop` name, if devfence acts on it.
    #[must_use]
    pub fn of(operation: &str, subop: &str) -> Option<Call> {
        match (operation, subop) {
            ("prepare", "begin") => Some(Call::PrepareBegin),
            ("started", "begin") => Some(Call::StartedBegin),
            ("release", "end") => Some(Call::ReleaseEnd),
            _ => None,
        }
    }
}

/// `devfence hook qemu DOMAIN OP SUBOP` with the domain's XML: parses it,
/// checks it is the domain libvirt named, and decides (a domain without host
/// devices is allowed without opening the ledger). Returns the decision and
/// what opening the environment noticed.
///
/// # Errors
/// The XML is not UTF-8, does not parse or names another domain; the
/// environment cannot be opened; the ledger fails.
pub fn run(
    root: &devfence_host::HostRoot,
    ledger: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
    domain: &str,
    call: Call,
    xml: Vec<u8>,
) -> crate::Result<(Decision, Vec<String>)> {
    run_as(root, ledger, config, domain, call, xml, None)
}

/// As [`run`], its audit records naming `actor` (the agent's peer).
///
/// # Errors
/// As [`run`].
pub fn run_as(
    root: &devfence_host::HostRoot,
    ledger: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
    domain: &str,
    call: Call,
    xml: Vec<u8>,
    actor: Option<&crate::Actor>,
) -> crate::Result<(Decision, Vec<String>)> {
    use crate::error::AppError;
    let xml = String::from_utf8(xml)
        .map_err(|_| AppError::invalid("the domain XML on standard input is not UTF-8 text"))?;
    let spec = devfence_engine::libvirt::parse_domain(&xml)
        .map_err(|e| AppError::invalid(format!("domain {domain}: {e}")))?;
    if spec.name != domain {
        return Err(AppError::invalid(format!(
            "the domain XML names {:?}, but libvirt called the hook for {domain:?}. Hint: libvirt passes the domain's own XML; check the hook's installation",
            spec.name
        )));
    }
    if spec.hostdevs.is_empty() {
        return Ok((Decision::Allowed, Vec::new()));
    }
    let mut env = crate::env::Env::open(root, ledger, config)?;
    let phase = match call {
        Call::PrepareBegin => {
            let cfg = crate::config::Config::load(root, config)?;
            Phase::Prepare(if cfg.hook.allow_unidentified_single_tenant {
                Unidentified::SingleTenant { tenants: 0 }
            } else {
                Unidentified::Refuse
            })
        }
        Call::StartedBegin => Phase::Started,
        Call::ReleaseEnd => Phase::Release,
    };
    let notices = std::mem::take(&mut env.notices);
    if let Some(a) = actor {
        env.act_as(a);
    }
    let mut e = env.engine(devfence_engine::engine::EngineConfig::default());
    let d = decide(&mut e, &spec, phase)?;
    Ok((d, notices))
}
