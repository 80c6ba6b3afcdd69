//! devfence: verified isolation of passthrough devices between tenants.
//!
//! The binary is thin: it parses the command line ([`cli`]), reads the host through
//! `devfence-host`, applies the rules of `devfence-policy` and prints the result
//! ([`commands`]). Every command writes to a `&mut dyn Write` so tests capture it.

// Errors carry their evidence and hint (ActError, EngineError); they are not hot.
#![allow(clippy::result_large_err)]

mod act;
mod args;
mod cli;
mod commands;
mod config;
mod export;
mod fleet;
mod jsonout;
mod keys;
mod ledger;
mod migrate;
mod reverify;
mod safeout;
mod state;
mod story;
mod table;
mod via;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

/// What a command asks the process to exit with (the exit status table is in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exit 0.
    Ok,
    /// Exit 1: `check` found error-severity findings.
    Findings,
    /// Exit 1: the libvirt hook, or a device-state seal or admission, refuses
    /// (its one-line reason is on stderr, or in the JSON output).
    Refused,
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    config::set_explicit(cli.config.clone());
    let stdout = std::io::stdout();
    // Every byte to the terminal is escaped (safeout.rs), whatever the command.
    let mut out = safeout::SafeOut::new(stdout.lock());
    let result = commands::run(&cli, &mut out);
    let _ = out.flush();
    if out.pipe_closed() {
        // The reader went away (`devfence audit show | head`): what it wanted it
        // has; end quietly with 0 (README, exit status), whatever error the write
        // came back wrapped in.
        return ExitCode::SUCCESS;
    }
    match result {
        Ok(Exit::Ok) => ExitCode::SUCCESS,
        Ok(Exit::Findings | Exit::Refused) => ExitCode::from(1),
        Err(err) => {
            eprintln!("{}", safeout::escape_controls(&render_error(&err)));
            ExitCode::from(if err.is::<Refusal>() { 1 } else { 2 })
        }
    }
}

/// An acting or lifecycle command's error that is a refusal by a rule (exit
/// status 1; the README's exit status table): shown as the error it wraps.
#[derive(Debug)]
pub struct Refusal(anyhow::Error);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// `err` as a [`Refusal`] when a rule refused (the engine refused or
/// quarantined, a held device was guarded, the ledger's lifecycle said no);
/// else `err` itself.
pub fn refusal_if_rule(err: anyhow::Error) -> anyhow::Error {
    let rule = err.chain().any(|c| {
        c.downcast_ref::<devfence_app::AppError>()
            .is_some_and(devfence_app::AppError::is_refusal)
            || c.downcast_ref::<devfence_engine::engine::EngineError>()
                .is_some_and(devfence_app::error::engine_refusal)
            || c.downcast_ref::<devfence_engine::StoreError>()
                .is_some_and(devfence_app::error::store_refusal)
    });
    if rule {
        anyhow::Error::new(Refusal(err))
    } else {
        err
    }
}

/// The error as printed: the whole chain, each cause on its own line, the hint
/// last. A cause an error already quotes in its own message (a ledger error
/// names what SQLite said) is printed once.
fn render_error(err: &anyhow::Error) -> String {
    let mut msg = format!("devfence: error: {err}");
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::render_error;

    #[test]
    fn a_ledger_error_prints_the_backends_message_once() {
        let e = devfence_engine::StoreError::Sql {
            context: "commit",
            source: Box::new(std::io::Error::other("database or disk is full")),
        };
        let text = render_error(&anyhow::Error::from(e));
        assert_eq!(
            text.matches("database or disk is full").count(),
            1,
            "{text}"
        );
        assert!(text.contains("Hint:"), "{text}");
        // A cause the message does not quote is still printed.
        let e = anyhow::Error::from(std::io::Error::other("inner")).context("outer");
        assert_eq!(
            render_error(&e),
            "devfence: error: outer\n  caused by: inner"
        );
    }
}
