//! Whether a command goes through the host agent (`devfence serve`) or runs
//! in this process: decided once per process by `devfence_agent::client`,
//! from `--direct`, `--via-agent`, `DEVFENCE_DIRECT`, `DEVFENCE_AGENT` and
//! whether the agent's socket answers (docs/agent.md, "The CLI and the hook
//! through the agent"). The command renders the same value either way.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use devfence_agent::client::{Client, ClientError, Mode, Route};
use devfence_host::HostRoot;

static MODE: OnceLock<Mode> = OnceLock::new();

/// Records the mode the flags and the environment ask for.
///
/// # Errors
/// Contradictory or unknown values (a usage error).
pub fn set_mode(direct: bool, via_agent: bool) -> Result<()> {
    let m = Mode::of(direct, via_agent).map_err(|e| anyhow!(e))?;
    let _ = MODE.set(m);
    Ok(())
}

fn mode() -> Mode {
    MODE.get().copied().unwrap_or(Mode::Auto)
}

/// The agent to go through for a command on `root`, or `None` for the
/// direct path. An explicit `--ledger` is the direct path's (the agent
/// serves its own ledger), unless `--via-agent` insists.
///
/// # Errors
/// `--via-agent` and no agent; a dead agent whose lock is still held.
pub fn agent(root: &HostRoot, ledger: Option<&Path>) -> Result<Option<Client>> {
    let m = mode();
    if ledger.is_some() && m == Mode::Auto {
        return Ok(None);
    }
    match devfence_agent::client::route(root, crate::config::explicit(), m) {
        Ok(Route::Agent(c)) => Ok(Some(c)),
        Ok(Route::Direct { notice }) => {
            if let Some(n) = notice {
                eprintln!("devfence: {n}");
            }
            Ok(None)
        }
        Err(e) => Err(anyhow!(e)),
    }
}

/// Whether the agent must be used (`--via-agent`): a command it does not
/// serve is then an error rather than a silent direct run.
///
/// # Errors
/// `--via-agent` with a form of the command the agent does not serve.
pub fn direct_only(what: &str) -> Result<()> {
    if mode() == Mode::Required {
        return Err(anyhow!(
            "{what} is not served by the host agent. Hint: drop --via-agent (or DEVFENCE_AGENT=required) to run it in this process; docs/agent.md lists what the agent serves"
        ));
    }
    Ok(())
}

/// The agent's error as the CLI's: its message and hint, its causes as
/// `caused by` lines, a rule's refusal as a [`crate::Refusal`] (exit 1).
pub fn error(e: ClientError) -> anyhow::Error {
    let ClientError::Api(r) = e else {
        return anyhow!(e);
    };
    let mut err: Option<anyhow::Error> = None;
    for c in r.chain.iter().rev() {
        err = Some(match err {
            None => anyhow!("{c}"),
            Some(inner) => inner.context(c.clone()),
        });
    }
    let text = r.text();
    let err = match err {
        None => anyhow!("{text}"),
        Some(inner) => inner.context(text),
    };
    if r.is_refusal() {
        anyhow::Error::new(crate::Refusal(err))
    } else {
        err
    }
}
