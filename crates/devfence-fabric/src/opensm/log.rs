//! Reading OpenSM's log for its progress: completed heavy sweeps (`SUBNET UP`),
//! how each ended, and the SM's role.
//!
//! OpenSM must run with `force_log_flush TRUE` (lines reach the file as they
//! happen) and the default `log_flags` (0x03: errors and info). The generation
//! devfence speaks of is the number of `SUBNET UP` lines in the log; a sweep whose
//! run logged `PARSE ERROR`, `Partition configuration in error` or `Errors during
//! initialization` before its `SUBNET UP` ended with errors — after a partitions
//! parse error OpenSM has fallen back to the default configuration, where every
//! port is a full member of the default partition.
//!
//! The scan is incremental (a cursor remembers the offset), and restarts from the
//! top when the file shrank (OpenSM restarted with `accum_log_file FALSE`, or the
//! log was rotated): generations then count from zero again, and tickets from
//! before can no longer be met — gates fail closed rather than trust an old count.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::{SmState, SweepOutcome};

/// Markers of a sweep that did not apply the configuration as written.
pub const ERROR_MARKERS: [&str; 3] = [
    "PARSE ERROR",
    "Partition configuration in error",
    "Errors during initialization",
];

/// What the log says so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogState {
    /// Bytes consumed (whole lines only).
    pub offset: u64,
    /// `SUBNET UP` lines seen.
    pub subnet_up: u64,
    /// How the last completed sweep ended.
    pub last: Option<SweepOutcome>,
    /// Error lines since the last `SUBNET UP` (a sweep in progress or failed).
    pub pending_errors: Vec<String>,
    /// The last role the SM announced.
    pub role: Option<SmState>,
    /// The version banner (`OpenSM 3.3.23`).
    pub version: Option<String>,
}

impl LogState {
    /// Consumes one log line.
    pub fn line(&mut self, l: &str) {
        let msg = l.split_once(" -> ").map_or(l, |(_, m)| m).trim_end();
        if msg == "SUBNET UP" {
            self.subnet_up += 1;
            self.last = Some(if self.pending_errors.is_empty() {
                SweepOutcome::Clean
            } else {
                SweepOutcome::Errors(self.pending_errors.join(" | "))
            });
            self.pending_errors.clear();
            return;
        }
        if ERROR_MARKERS.iter().any(|m| msg.contains(m)) {
            if self.pending_errors.len() < 8 {
                self.pending_errors.push(msg.chars().take(200).collect());
            }
            return;
        }
        if let Some(r) = msg.strip_prefix("Entering ") {
            self.role = match r.trim_end_matches('.').trim() {
                "MASTER state" => Some(SmState::Master),
                "STANDBY state" => Some(SmState::Standby),
                "DISCOVERING state" => Some(SmState::Discovering),
                "NOT-ACTIVE state" | "NOTACTIVE state" => Some(SmState::NotActive),
                _ => self.role,
            };
            return;
        }
        if self.version.is_none()
            && let Some(v) = msg.strip_prefix("OpenSM ")
            && v.starts_with(|c: char| c.is_ascii_digit())
        {
            self.version = Some(format!("OpenSM {v}"));
        }
    }

    /// Consumes text (whole lines; a partial last line is left for later).
    /// Returns the bytes consumed.
    pub fn feed(&mut self, text: &[u8]) -> usize {
        let Some(end) = text.iter().rposition(|b| *b == b'\n') else {
            return 0;
        };
        for l in text[..end].split(|b| *b == b'\n') {
            self.line(&String::from_utf8_lossy(l));
        }
        end + 1
    }
}

/// An incremental reader of one log file.
#[derive(Debug, Default)]
pub struct LogCursor {
    state: LogState,
}

impl LogCursor {
    /// Reads what was appended since the last call and returns the state.
    ///
    /// # Errors
    /// The log cannot be opened or read.
    pub fn read(&mut self, path: &Path) -> std::io::Result<&LogState> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        if len < self.state.offset {
            self.state = LogState::default();
        }
        f.seek(SeekFrom::Start(self.state.offset))?;
        let mut buf = Vec::new();
        f.take(len - self.state.offset).read_to_end(&mut buf)?;
        let used = self.state.feed(&buf);
        self.state.offset += used as u64;
        Ok(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sweeps_and_their_outcome() {
        let mut s = LogState::default();
        let text = "Nov 22 07:46:43 425321 [825E6740] 0x03 -> OpenSM 3.3.23\n\
                    Nov 22 07:46:43 439032 [7F5DF6C0] 0x80 -> Entering MASTER state\n\
                    Nov 22 07:46:43 441634 [7F5DF6C0] 0x02 -> SUBNET UP\n\
                    Nov 22 07:46:44 000001 [7F5DF6C0] 0x01 -> parse_part_conf: PARSE ERROR: line 3: bad PortGUID\n\
                    Nov 22 07:46:44 000002 [7F5DF6C0] 0x01 -> osm_prtn_make_partitions: Partition configuration in error; retrying with default config\n\
                    Nov 22 07:46:44 000003 [7F5DF6C0] 0x02 -> SUBNET UP\n\
                    Nov 22 07:46:44 0000";
        let used = s.feed(text.as_bytes());
        assert!(used < text.len(), "the partial line waits");
        assert_eq!(s.subnet_up, 2);
        assert_eq!(s.role, Some(SmState::Master));
        assert_eq!(s.version.as_deref(), Some("OpenSM 3.3.23"));
        match &s.last {
            Some(SweepOutcome::Errors(e)) => assert!(e.contains("PARSE ERROR"), "{e}"),
            other => panic!("{other:?}"),
        }
        s.line("x 0x02 -> SUBNET UP");
        assert_eq!(s.last, Some(SweepOutcome::Clean));
        assert_eq!(s.subnet_up, 3);
    }

    #[test]
    fn cursor_restarts_when_the_file_shrinks() {
        let d = tempfile::tempdir().expect("dir");
        let p = d.path().join("opensm.log");
        std::fs::write(&p, "a -> SUBNET UP\nb -> SUBNET UP\n").expect("write");
        let mut c = LogCursor::default();
        assert_eq!(c.read(&p).expect("read").subnet_up, 2);
        std::fs::write(&p, "a -> SUBNET UP\n").expect("write");
        assert_eq!(c.read(&p).expect("read").subnet_up, 1);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open");
        std::io::Write::write_all(&mut f, b"c -> SUBNET UP\n").expect("append");
        assert_eq!(c.read(&p).expect("read").subnet_up, 2);
    }
}
