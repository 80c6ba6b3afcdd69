//! `devfence audit export`: the audit records as JSON lines (the mapping is
//! `devfence_app::audit::ExportLine`, shared with the agent's export), to
//! standard output or appended to a file, resumable by seq, `--follow` to
//! keep going.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use devfence_engine::SqliteStore;

use crate::Exit;

/// How often `--follow` reads the ledger for new records (not a correctness
/// wait: each read exports everything after the last seq written).
const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// Runs `audit export`.
pub fn run(
    store: &mut SqliteStore,
    since: Option<u64>,
    follow: bool,
    output: Option<&Path>,
    out: &mut dyn Write,
) -> Result<Exit> {
    let (mut file, mut after) = match output {
        None => (None, since.unwrap_or(0)),
        Some(p) => {
            let last = devfence_app::audit::last_exported_seq(p)?;
            let f = devfence_app::audit::open_export(p)?;
            (Some(f), since.or(last).unwrap_or(0))
        }
    };
    loop {
        let lines = devfence_app::audit::export_after(store, after)?;
        if !lines.is_empty() {
            let mut text = String::new();
            for l in &lines {
                text.push_str(&l.to_json());
                text.push('\n');
            }
            match (&mut file, output) {
                (Some(f), Some(p)) => f
                    .write_all(text.as_bytes())
                    .and_then(|()| f.sync_data())
                    .with_context(|| format!("Cannot append to {}", p.display()))?,
                _ => {
                    out.write_all(text.as_bytes())?;
                    out.flush()?;
                }
            }
            after = lines.last().map_or(after, |l| l.seq);
            if lines.len() == devfence_app::audit::EXPORT_PAGE {
                continue;
            }
        }
        if !follow {
            return Ok(Exit::Ok);
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}
