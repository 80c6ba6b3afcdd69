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
            let f = open_append(p)?;
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

/// Opens `p` to append (created 0640, a regular file only), ending a line a
/// crash cut first so the next record starts a line of its own.
fn open_append(p: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc_nonblock())
        .open(p)
        .with_context(|| {
            format!(
                "Cannot open {} to append the audit export. Hint: give a file devfence may create or append to",
                p.display()
            )
        })?;
    let m = f
        .metadata()
        .with_context(|| format!("Cannot inspect {}", p.display()))?;
    anyhow::ensure!(
        m.file_type().is_file(),
        "{} is not a regular file. Hint: give a regular file, or leave --output out for standard output",
        p.display()
    );
    if m.len() > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::End(-1))
            .and_then(|_| f.read_exact(&mut last))
            .with_context(|| format!("Cannot read {}", p.display()))?;
        if last[0] != b'\n' {
            f.write_all(b"\n")
                .with_context(|| format!("Cannot append to {}", p.display()))?;
        }
    }
    Ok(f)
}

/// `O_NONBLOCK` on Linux: a FIFO at the path must not hang the open.
const fn libc_nonblock() -> i32 {
    0o4000
}
