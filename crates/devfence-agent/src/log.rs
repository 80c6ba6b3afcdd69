//! The agent's log: `tracing` events, one line each on standard error,
//! readable by people and by journald.
//!
//! No colours ever. Under systemd (`JOURNAL_STREAM` set) a line starts with
//! its syslog priority (`<6>`: journald's `SyslogLevelPrefix` turns it into
//! the record's priority) and carries no timestamp (the journal has one);
//! elsewhere it starts with an RFC 3339 UTC time. The level is always
//! written. The level kept is `--log-level`, else `DEVFENCE_LOG`, else
//! `info`.
//!
//! What is logged: each request (method, route template, status, the peer's
//! uid, duration) and lifecycle events (start, recovery, ready, reload, stop,
//! export). Never a request or response body, a token, a key or a password.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The level `name` names (`error`, `warn`, `info`, `debug`, `trace`).
///
/// # Errors
/// Any other name, with a hint.
pub fn parse_level(name: &str) -> Result<Level, String> {
    match name.trim().to_ascii_lowercase().as_str() {
        "error" => Ok(Level::ERROR),
        "warn" | "warning" => Ok(Level::WARN),
        "info" => Ok(Level::INFO),
        "debug" => Ok(Level::DEBUG),
        "trace" => Ok(Level::TRACE),
        _ => Err(format!(
            "Unknown log level {name:?}. Hint: give error, warn, info, debug or trace"
        )),
    }
}

/// Installs the log for this process (once; a second call changes nothing).
///
/// # Errors
/// The level (`--log-level`, else `DEVFENCE_LOG`) is not one.
pub fn init(level: Option<&str>) -> Result<(), String> {
    let level = match level {
        Some(l) => parse_level(l).map_err(|e| format!("--log-level: {e}"))?,
        None => match std::env::var("DEVFENCE_LOG") {
            Ok(l) if !l.trim().is_empty() => {
                parse_level(&l).map_err(|e| format!("DEVFENCE_LOG: {e}"))?
            }
            _ => Level::INFO,
        },
    };
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(Line { journal })
        .try_init();
    Ok(())
}

/// One event as one line.
struct Line {
    journal: bool,
}

/// The syslog priority of a level (what journald reads from `<N>`).
fn priority(l: Level) -> u8 {
    match l {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = *event.metadata().level();
        if self.journal {
            write!(w, "<{}>", priority(level))?;
        } else {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            write!(w, "{} ", devfence_app::audit::rfc3339_ms(ms))?;
        }
        write!(w, "{level:>5} ")?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_a_bad_one_has_a_hint() {
        assert_eq!(parse_level("DEBUG"), Ok(Level::DEBUG));
        assert_eq!(parse_level("warning"), Ok(Level::WARN));
        let e = parse_level("loud").expect_err("bad");
        assert!(e.contains("Hint:"), "{e}");
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::INFO), 6);
    }
}
