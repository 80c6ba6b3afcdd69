//! Reading OpenSM's log for its progress: completed heavy sweeps (`SUBNET UP`) and
//! how each ended.
//!
//! OpenSM must run with `force_log_flush TRUE` (lines reach the file as they
//! happen) and the default `log_flags` (0x03: errors and info). The generation
//! devfence speaks of is the number of `SUBNET UP` lines seen; a sweep whose run
//! logged `PARSE ERROR`, `Partition configuration in error`, `Errors during
//! initialization` or a duplicated GUID (`ERR 0D01`) before its `SUBNET UP` ended
//! with errors — after a partitions parse error OpenSM has fallen back to the
//! default configuration, where every port is a full member of the default
//! partition.
//!
//! **Only OpenSM's own words count.** A line is read only if it has OpenSM's fixed
//! format — `Mon DD HH:MM:SS uuuuuu [THREAD] 0xLL -> message` — and a marker only
//! where OpenSM puts it: a whole message (`SUBNET UP`) or right after the logging
//! function's name (`parse_part_conf: PARSE ERROR…`). Free text a fabric node
//! supplies (its node description, logged when it joins or leaves) never starts a
//! message, so a node named `evil PARSE ERROR node` is not a parse error.
//!
//! **Incremental, bounded, persistent.** A [`LogCursor`] remembers the file
//! (device, inode, a fingerprint of its first bytes), the offset read so far and
//! the counts; it reads only what was appended, in chunks of [`CHUNK`] bytes, and
//! is kept next to the backend's state so a new process does not re-read the log
//! (a 300 MB log cost 300 MB and half a second per `status`). A first read, or a
//! backlog over [`MAX_CATCHUP`], starts near the end of the file.
//!
//! **Re-based, never reset.** When the log is rotated (Debian's logrotate: `mv`
//! then `SIGUSR1`), truncated (`log_max_size`), or rewritten by a restarted OpenSM
//! (`accum_log_file FALSE`), or OpenSM's process changed, the cursor starts on the
//! new file but keeps its counts: generations only grow, so a ticket or the memo's
//! "signalled at" from before stays comparable. Lines OpenSM wrote to the old file
//! after devfence last read it are not counted: a rotation costs at most those
//! sweeps, and a gate then waits for one more sweep — never passes early.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use crate::{SmState, SweepOutcome};

/// Bytes read per chunk (memory stays within about this much).
pub const CHUNK: usize = 1 << 20;
/// A backlog larger than this is skipped to its last [`CHUNK`] (counted as a
/// re-base: the sweeps in it are not counted, so gates wait rather than pass).
pub const MAX_CATCHUP: u64 = 64 << 20;
/// The longest line kept (longer ones are skipped).
const MAX_LINE: usize = 64 << 10;
/// Bytes of the file's head fingerprinted to recognise a rewritten file.
const HEAD: usize = 64;
/// Linux `O_NONBLOCK`: opening a FIFO put in the log's place must not hang.
const O_NONBLOCK: i32 = 0o4000;

/// Markers (after the function name) of a sweep that did not apply the
/// configuration as written.
pub const ERROR_MARKERS: [&str; 4] = [
    "PARSE ERROR",
    "Partition configuration in error",
    "Errors during initialization",
    "ERR 0D01",
];

/// One line of OpenSM's log split at its fixed format: `Mon DD HH:MM:SS uuuuuu
/// [THREAD] 0xLL -> message` (`osm_log.c`). `None` for anything else (the rest of
/// a multi-line message, a line another program wrote).
#[must_use]
pub fn split_line(l: &str) -> Option<(u8, &str)> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let b = l.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    if !MONTHS.iter().any(|m| l.starts_with(m))
        || !at(3, b' ')
        || !digits(4..6)
        || !at(6, b' ')
        || !(digits(7..9) && at(9, b':') && digits(10..12) && at(12, b':') && digits(13..15))
        || !at(15, b' ')
        || !digits(16..22)
        || !at(22, b' ')
        || !at(23, b'[')
    {
        return None;
    }
    let rest = l.get(24..)?;
    let (thread, rest) = rest.split_once("] 0x")?;
    if thread.is_empty() || thread.len() > 16 || !thread.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let (level, msg) = rest.split_at_checked(2)?;
    let level = u8::from_str_radix(level, 16).ok()?;
    let msg = msg.strip_prefix(" -> ")?;
    Some((level, msg.trim_end_matches(['\n', '\r'])))
}

/// `func: rest` where `func` is a C identifier (OpenSM's `OSM_LOG` prefix).
fn after_function(msg: &str) -> Option<&str> {
    let (func, rest) = msg.split_once(": ")?;
    let ident = !func.is_empty()
        && func.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && !func.starts_with(|c: char| c.is_ascii_digit());
    ident.then_some(rest)
}

/// The error marker a message starts with, if any.
fn error_marker(msg: &str) -> Option<&'static str> {
    let body = after_function(msg);
    ERROR_MARKERS.iter().copied().find(|m| {
        msg == *m
            || body.is_some_and(|b| {
                b.starts_with(m)
                    && (b.len() == m.len() || b[m.len()..].starts_with([':', ';', ' ']))
            })
    })
}

/// What the log says so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogState {
    /// Bytes of the current file consumed (whole lines only).
    pub offset: u64,
    /// `SUBNET UP` lines seen (across rotations and restarts: it only grows).
    pub subnet_up: u64,
    /// How the last completed sweep ended.
    pub last: Option<SweepOutcome>,
    /// Error lines since the last `SUBNET UP` (a sweep in progress or failed).
    pub pending_errors: Vec<String>,
    /// The last role the SM announced in its log (informational: the role
    /// devfence acts on is read from the SM, see `SaClient::sm_state`).
    pub role: Option<SmState>,
    /// The version banner (`OpenSM 3.3.23`).
    pub version: Option<String>,
}

impl LogState {
    /// Consumes one log line (ignored unless it has OpenSM's format).
    pub fn line(&mut self, l: &str) {
        let Some((_level, msg)) = split_line(l) else {
            return;
        };
        let msg = msg.trim_end();
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
        if error_marker(msg).is_some() {
            if self.pending_errors.len() < 8 {
                self.pending_errors.push(msg.chars().take(200).collect());
            }
            return;
        }
        if let Some(r) = msg.strip_prefix("Entering ") {
            self.role = match r {
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
            && v.len() < 32
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
            if l.len() <= MAX_LINE {
                self.line(&String::from_utf8_lossy(l));
            }
        }
        end + 1
    }

    /// A duplicated GUID is failing the sweeps (OpenSM loops on `ERR 0D01`
    /// without `SUBNET UP`).
    #[must_use]
    pub fn duplicate_guid(&self) -> Option<&str> {
        self.pending_errors
            .iter()
            .find(|e| error_marker(e) == Some("ERR 0D01"))
            .map(String::as_str)
    }
}

/// Which file the offset is into.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileId {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// The file's first bytes (hex), to recognise a file rewritten in place.
    pub head: String,
}

/// The SM process the log was last read for (PID and start time in clock ticks).
pub type SmProcess = (i32, u64);

/// An incremental, persistent reader of one log file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogCursor {
    /// What the log says.
    pub state: LogState,
    /// The file `state.offset` is into (`None`: never read).
    pub file: Option<FileId>,
    /// The OpenSM process seen at the last read.
    pub process: Option<SmProcess>,
    /// Why the cursor last started on a new file or process, and how often.
    pub rebases: u64,
    /// The last re-base's reason.
    pub rebase_reason: Option<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl LogCursor {
    /// A cursor whose counts start at `base` (e.g. the `SUBNET UP` count devfence
    /// last signalled at, when its cursor was lost).
    #[must_use]
    pub fn based_at(base: u64) -> Self {
        Self {
            state: LogState {
                subnet_up: base,
                ..LogState::default()
            },
            ..Self::default()
        }
    }

    fn rebase(&mut self, reason: String) {
        self.state.offset = 0;
        self.state.pending_errors.clear();
        self.state.role = None;
        self.rebases += 1;
        self.rebase_reason = Some(reason);
    }

    /// Reads what was appended since the last call and returns the state.
    /// `process` is OpenSM's current process (PID, start time), if it runs.
    ///
    /// # Errors
    /// The log cannot be opened or read, or is not a regular file.
    pub fn read(&mut self, path: &Path, process: Option<SmProcess>) -> std::io::Result<&LogState> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NONBLOCK)
            .open(path)?;
        let meta = f.metadata()?;
        if !meta.file_type().is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let len = meta.len();
        // The file's first bytes (fewer if it is shorter, or shrank meanwhile).
        let mut head = Vec::with_capacity(HEAD);
        (&mut f)
            .take(HEAD.min(usize::try_from(len).unwrap_or(HEAD)) as u64)
            .read_to_end(&mut head)?;
        let id = FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            head: hex(&head),
        };
        match &self.file {
            None => {
                // First read: start near the end (a long log is history).
                self.state.offset = len.saturating_sub(CHUNK as u64);
                self.file = Some(id.clone());
            }
            Some(old) if old.dev != id.dev || old.ino != id.ino => {
                self.rebase("the log file was replaced (rotated)".into());
            }
            Some(old) if len < self.state.offset => {
                let _ = old;
                self.rebase("the log file shrank (truncated, or OpenSM restarted)".into());
            }
            Some(old)
                if old.head != id.head
                    && !old.head.starts_with(&id.head)
                    && !id.head.starts_with(&old.head) =>
            {
                self.rebase("the log file was rewritten (OpenSM restarted)".into());
            }
            Some(_) => {}
        }
        self.file = Some(id);
        if let (Some(old), Some(now)) = (self.process, process)
            && old != now
        {
            // A new OpenSM: whatever it logs from here is a new run. Its log may
            // have been appended to (accum_log_file TRUE): keep the offset.
            self.state.pending_errors.clear();
            self.state.role = None;
            self.rebases += 1;
            self.rebase_reason = Some(format!("OpenSM restarted (PID {} → {})", old.0, now.0));
        }
        if process.is_some() {
            self.process = process;
        }
        if len - self.state.offset.min(len) > MAX_CATCHUP {
            self.state.offset = len - CHUNK as u64;
            self.state.pending_errors.clear();
            self.rebases += 1;
            self.rebase_reason = Some(format!(
                "a backlog of more than {MAX_CATCHUP} bytes of log was skipped"
            ));
        }
        // Read from the offset to the length seen above, one chunk at a time. A
        // start in the middle of a line (the first read of a long log) needs no
        // care: a piece of a line never has OpenSM's format at its start.
        f.seek(SeekFrom::Start(self.state.offset))?;
        let mut buf = vec![0u8; CHUNK];
        let mut pos = self.state.offset; // the file offset of buf[0]
        let mut have = 0usize;
        loop {
            let left = len.saturating_sub(pos + have as u64);
            let want = (buf.len() - have).min(usize::try_from(left).unwrap_or(usize::MAX));
            if want == 0 {
                break;
            }
            let n = f.read(&mut buf[have..have + want])?;
            if n == 0 {
                break;
            }
            have += n;
            let used = self.state.feed(&buf[..have]);
            if used == 0 && have == buf.len() {
                // One line longer than a chunk: drop it, unread.
                pos += have as u64;
                have = 0;
                continue;
            }
            pos += used as u64;
            buf.copy_within(used..have, 0);
            have -= used;
        }
        self.state.offset = pos;
        Ok(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(msg: &str) -> String {
        format!("Nov 22 07:46:43 441634 [7F5DF6C0] 0x02 -> {msg}\n")
    }

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
        s.line(&l("SUBNET UP"));
        assert_eq!(s.last, Some(SweepOutcome::Clean));
        assert_eq!(s.subnet_up, 3);
    }

    /// issue 17 item 6: markers count only in OpenSM's own format and place.
    #[test]
    fn free_text_from_the_fabric_is_not_a_marker() {
        let mut s = LogState::default();
        for line in [
            l(
                "drop_mgr_remove_port: Removed port with GUID:0x0002c90300f00101 LID range [4, 4] of node:evil PARSE ERROR node",
            ),
            l(
                "state_mgr_report_new_ports: Discovered new port with GUID:0x1 LID range [5,5] of node: SUBNET UP",
            ),
            l("x: y: PARSE ERROR"),
            "PARSE ERROR: line 1: bad PortGUID\n".into(),
            "SUBNET UP\n".into(),
            "Nov 22 07:46:43 441634 [zz] 0x02 -> SUBNET UP\n".into(),
            "Nov 22 07:46:43 4416 [7F5DF6C0] 0x02 -> SUBNET UP\n".into(),
            "garbage Nov 22 07:46:43 441634 [7F5DF6C0] 0x02 -> SUBNET UP\n".into(),
        ] {
            s.feed(line.as_bytes());
        }
        assert_eq!(s.subnet_up, 0, "{s:?}");
        assert!(s.pending_errors.is_empty(), "{s:?}");
        s.feed(l("parse_part_conf: PARSE ERROR: line 1: bad PortGUID").as_bytes());
        s.feed(l("Errors during initialization").as_bytes());
        s.feed(l("osm_ucast_mgr: ERR 0D01: Found duplicated node GUID.").as_bytes());
        assert_eq!(s.pending_errors.len(), 3, "{s:?}");
        assert!(s.duplicate_guid().is_some());
    }

    #[test]
    fn cursor_rebases_on_rotation_and_truncation_and_keeps_counting() {
        let d = tempfile::tempdir().expect("dir");
        let p = d.path().join("opensm.log");
        std::fs::write(&p, format!("{}{}", l("SUBNET UP"), l("SUBNET UP"))).expect("write");
        let mut c = LogCursor::default();
        assert_eq!(c.read(&p, None).expect("read").subnet_up, 2);
        // Truncated in place (log_max_size): counting goes on.
        std::fs::write(&p, l("SUBNET UP")).expect("write");
        assert_eq!(c.read(&p, None).expect("read").subnet_up, 3);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open");
        std::io::Write::write_all(&mut f, l("SUBNET UP").as_bytes()).expect("append");
        assert_eq!(c.read(&p, None).expect("read").subnet_up, 4);
        // Rotated (mv + a new file): counting goes on from the new file's start.
        std::fs::rename(&p, d.path().join("opensm.log.1")).expect("mv");
        std::fs::write(&p, l("SUBNET UP")).expect("write");
        assert_eq!(c.read(&p, None).expect("read").subnet_up, 5);
        assert_eq!(c.rebases, 2, "{c:?}");
        // Persisted and read back by another process: nothing read twice.
        let saved = serde_json::to_string(&c).expect("json");
        let mut c2: LogCursor = serde_json::from_str(&saved).expect("json");
        assert_eq!(c2.read(&p, None).expect("read").subnet_up, 5);
    }

    #[test]
    fn a_big_log_is_read_in_bounded_chunks_from_near_its_end() {
        let d = tempfile::tempdir().expect("dir");
        let p = d.path().join("opensm.log");
        let line = l("osm_something: a line of routine chatter");
        let mut text = line.repeat((3 * CHUNK) / line.len());
        text.push_str(&l("SUBNET UP"));
        std::fs::write(&p, &text).expect("write");
        let mut c = LogCursor::based_at(7);
        let s = c.read(&p, None).expect("read");
        assert_eq!(
            s.subnet_up, 8,
            "only the tail is read, counted from the base"
        );
        assert_eq!(s.offset, text.len() as u64);
        // A line longer than a chunk is skipped, not buffered.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open");
        std::io::Write::write_all(&mut f, "x".repeat(CHUNK + 10).as_bytes()).expect("append");
        std::io::Write::write_all(&mut f, format!("\n{}", l("SUBNET UP")).as_bytes())
            .expect("append");
        assert_eq!(c.read(&p, None).expect("read").subnet_up, 9);
    }

    #[test]
    fn a_fifo_in_place_of_the_log_is_refused_without_hanging() {
        let d = tempfile::tempdir().expect("dir");
        let p = d.path().join("opensm.log");
        let st = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .expect("mkfifo");
        assert!(st.success());
        let e = LogCursor::default().read(&p, None).expect_err("fifo");
        assert!(e.to_string().contains("regular"), "{e}");
    }
}
