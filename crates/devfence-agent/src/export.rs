//! The agent's audit export (`[agent] audit_export`): every audit record, as
//! the JSON line `devfence_app::audit::ExportLine` makes it, streamed to a
//! file or to syslog as it is appended to the chain.
//!
//! A thread reads the records after the last exported seq (every
//! [`POLL`], and at once when woken: after an operation, on `SIGHUP`, at
//! stop) and writes them; the seq of the last record written is kept beside
//! the ledger (`<ledger>.audit-export`, replaced atomically after each
//! write), so a restart exports what it missed and nothing twice. For a
//! file the seq of its last complete line counts too (a crash between the
//! write and the state's update repeats nothing). A record not written (the
//! file cannot be opened, syslog does not answer) is retried at the next
//! pass: none is skipped.
//!
//! logrotate: a file renamed or removed under the agent (another inode at
//! the path, or none) is noticed before each write and reopened; `SIGHUP`
//! reopens too (`copytruncate` is not needed).
//!
//! Syslog: RFC 5424 over the local datagram socket (`/dev/log` by default),
//! facility `authpriv` unless configured; severity info for a success,
//! notice for a refusal, warning for a failure; the message is the JSON
//! line. A line too large for one datagram is sent with its detail replaced
//! by a note (its hash then no longer checks; `devfence audit show` has it).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use devfence_app::audit::ExportLine;
use devfence_app::config::{AgentConfig, SYSLOG_FACILITIES};
use devfence_host::HostRoot;

use crate::ops::lock;

/// How often the exporter reads the ledger when nothing wakes it.
pub const POLL: Duration = Duration::from_millis(250);

/// Where records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Appended to a file.
    File(PathBuf),
    /// Sent to a local syslog datagram socket.
    Syslog {
        /// The socket.
        socket: PathBuf,
        /// The facility's code.
        facility: u8,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::File(p) => write!(f, "{}", p.display()),
            Target::Syslog { socket, facility } => {
                write!(f, "syslog {} (facility {facility})", socket.display())
            }
        }
    }
}

impl Target {
    /// The target `[agent]` names, its paths under `root`.
    #[must_use]
    pub fn from_config(root: &HostRoot, a: &AgentConfig) -> Option<Target> {
        let t = a.audit_export.as_deref()?;
        Some(if t == "syslog" {
            let facility = a
                .syslog_facility
                .as_deref()
                .and_then(|n| SYSLOG_FACILITIES.iter().find(|(k, _)| *k == n))
                .map_or(10, |(_, c)| *c);
            let socket = a
                .syslog_socket
                .as_deref()
                .map_or_else(|| "/dev/log".into(), |p| p.to_string_lossy().into_owned());
            Target::Syslog {
                socket: root.path(&socket),
                facility,
            }
        } else {
            Target::File(root.path(t))
        })
    }
}

/// The running exporter.
pub struct Exporter {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Shared {
    target: Mutex<Option<Target>>,
    reopen: AtomicBool,
    stop: AtomicBool,
    woken: Mutex<bool>,
    cv: Condvar,
    /// The last seq exported (0: none yet or not known yet).
    last: AtomicU64,
}

impl Exporter {
    /// Starts exporting the chain of `root`'s ledger (or `ledger`) to `target`
    /// (none: nothing is exported until a reload names one).
    #[must_use]
    pub fn start(root: HostRoot, ledger: Option<PathBuf>, target: Option<Target>) -> Exporter {
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            reopen: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            woken: Mutex::new(false),
            cv: Condvar::new(),
            last: AtomicU64::new(0),
        });
        let s2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("audit-export".into())
            .spawn(move || run(&s2, &root, ledger.as_deref()))
            .map_err(|e| tracing::error!("cannot start the audit export: {e}"))
            .ok();
        Exporter {
            shared,
            thread: Mutex::new(thread),
        }
    }

    /// The target now.
    #[must_use]
    pub fn target(&self) -> Option<Target> {
        lock(&self.shared.target).clone()
    }

    /// Exports to `t` from now on (a reload); reopens.
    pub fn set_target(&self, t: Option<Target>) {
        *lock(&self.shared.target) = t;
        self.reopen();
    }

    /// Reopens the file or socket at the next pass (`SIGHUP`), and wakes.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Reads the ledger now.
    pub fn wake(&self) {
        *lock(&self.shared.woken) = true;
        self.shared.cv.notify_all();
    }

    /// Exports what is left, then stops.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake();
    }
}

/// The state file beside the ledger.
fn state_path(ledger: &Path) -> PathBuf {
    let mut s = ledger.as_os_str().to_owned();
    s.push(".audit-export");
    PathBuf::from(s)
}

fn load_state(p: &Path) -> Option<u64> {
    let b = devfence_model::bounded::read_file(p, 4096).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    v.get("seq")?.as_u64()
}

fn save_state(p: &Path, seq: u64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = {
        let mut s = p.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{{\"seq\": {seq}}}")?;
    f.sync_data()?;
    std::fs::rename(&tmp, p)
}

enum Sink {
    File {
        path: PathBuf,
        file: std::fs::File,
        id: (u64, u64),
    },
    Syslog {
        sock: UnixDatagram,
        path: PathBuf,
        facility: u8,
        host: String,
    },
}

impl Sink {
    fn open(t: &Target) -> Result<Sink, String> {
        match t {
            Target::File(p) => {
                let file = devfence_app::audit::open_export(p).map_err(|e| e.to_string())?;
                let m = file.metadata().map_err(|e| e.to_string())?;
                Ok(Sink::File {
                    path: p.clone(),
                    file,
                    id: (m.dev(), m.ino()),
                })
            }
            Target::Syslog { socket, facility } => {
                let sock = UnixDatagram::unbound().map_err(|e| e.to_string())?;
                sock.set_write_timeout(Some(Duration::from_secs(1)))
                    .map_err(|e| e.to_string())?;
                let host = nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
                    .unwrap_or_else(|| "-".into());
                Ok(Sink::Syslog {
                    sock,
                    path: socket.clone(),
                    facility: *facility,
                    host,
                })
            }
        }
    }

    /// Whether the file was renamed or removed under us (logrotate).
    fn moved(&self) -> bool {
        match self {
            Sink::File { path, id, .. } => {
                std::fs::metadata(path).map_or(true, |m| (m.dev(), m.ino()) != *id)
            }
            Sink::Syslog { .. } => false,
        }
    }

    /// Writes `lines`; returns how many were written (all of them, or the
    /// ones before the first that failed) and the failure.
    fn write(&mut self, lines: &[ExportLine]) -> (usize, Option<String>) {
        match self {
            Sink::File { path, file, .. } => {
                let mut text = String::new();
                for l in lines {
                    text.push_str(&l.to_json());
                    text.push('\n');
                }
                match file
                    .write_all(text.as_bytes())
                    .and_then(|()| file.sync_data())
                {
                    Ok(()) => (lines.len(), None),
                    Err(e) => (0, Some(format!("cannot append to {}: {e}", path.display()))),
                }
            }
            Sink::Syslog {
                sock,
                path,
                facility,
                host,
            } => {
                for (i, l) in lines.iter().enumerate() {
                    let msg = syslog_message(*facility, host, l, false);
                    let r = match sock.send_to(msg.as_bytes(), &*path) {
                        Err(e) if e.raw_os_error() == Some(nix::libc::EMSGSIZE) => sock
                            .send_to(syslog_message(*facility, host, l, true).as_bytes(), &*path),
                        r => r,
                    };
                    if let Err(e) = r {
                        return (i, Some(format!("cannot send to {}: {e}", path.display())));
                    }
                }
                (lines.len(), None)
            }
        }
    }
}

/// One RFC 5424 message: `<PRI>1 TIMESTAMP HOST devfence PID audit - JSON`.
#[must_use]
pub fn syslog_message(facility: u8, host: &str, l: &ExportLine, omit_detail: bool) -> String {
    let severity = match l.outcome {
        "failed" => 4,
        "refused" => 5,
        _ => 6,
    };
    let json = if omit_detail {
        let mut short = l.clone();
        short.detail = serde_json::json!({
            "omitted": "too large for one syslog datagram; `devfence audit show` has it"
        });
        short.to_json()
    } else {
        l.to_json()
    };
    format!(
        "<{}>1 {} {host} devfence {} audit - {json}",
        u32::from(facility) * 8 + severity,
        l.time,
        std::process::id()
    )
}

fn run(sh: &Shared, root: &HostRoot, ledger: Option<&Path>) {
    let mut sink: Option<(Target, Sink)> = None;
    let mut store: Option<devfence_engine::SqliteStore> = None;
    let mut known = false;
    let mut warned = String::new();
    loop {
        let stopping = sh.stop.load(Ordering::SeqCst);
        match pass(sh, root, ledger, &mut sink, &mut store, &mut known) {
            // Once per distinct problem, not once per pass.
            Err(msg) if msg != warned => {
                tracing::warn!("audit export: {msg} (retried; no record is skipped)");
                warned = msg;
            }
            Err(_) => {}
            Ok(()) => warned.clear(),
        }
        if stopping {
            return;
        }
        let g = lock(&sh.woken);
        let (mut g, _) = sh
            .cv
            .wait_timeout_while(g, POLL, |w| !*w)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *g = false;
    }
}

fn pass(
    sh: &Shared,
    root: &HostRoot,
    ledger: Option<&Path>,
    sink: &mut Option<(Target, Sink)>,
    store: &mut Option<devfence_engine::SqliteStore>,
    known: &mut bool,
) -> Result<(), String> {
    let target = lock(&sh.target).clone();
    let Some(target) = target else {
        *sink = None;
        return Ok(());
    };
    let reopen = sh.reopen.swap(false, Ordering::SeqCst);
    if (reopen
        || sink
            .as_ref()
            .is_some_and(|(t, s)| *t != target || s.moved()))
        && let Some((t, _)) = sink.take()
    {
        tracing::info!("audit export: reopening {t}");
    }
    let path = devfence_app::env::ledger_path(root, ledger).map_err(|e| e.to_string())?;
    if store.is_none() {
        if !devfence_app::env::ledger_present(&path) {
            return Ok(()); // No ledger yet: nothing to export.
        }
        *store =
            Some(devfence_app::env::open_store(root, ledger, false).map_err(|e| e.to_string())?);
    }
    let Some(st) = store.as_mut() else {
        return Ok(());
    };
    let state = state_path(&path);
    if !*known {
        let mut last = load_state(&state).unwrap_or(0);
        if let Target::File(p) = &target
            && let Ok(Some(s)) = devfence_app::audit::last_exported_seq(p)
        {
            last = last.max(s);
        }
        sh.last.store(last, Ordering::SeqCst);
        *known = true;
        tracing::info!("audit export to {target}: after seq {last}");
    }
    loop {
        let after = sh.last.load(Ordering::SeqCst);
        let lines = devfence_app::audit::export_after(st, after).map_err(|e| e.to_string())?;
        if lines.is_empty() {
            return Ok(());
        }
        if after > 0 && lines[0].seq > after + 1 {
            // `audit prune` removed records before they were exported.
            tracing::warn!(
                "audit export: records {} to {} were pruned from the ledger before they were exported",
                after + 1,
                lines[0].seq - 1
            );
        }
        if sink.is_none() {
            *sink = Some((target.clone(), Sink::open(&target)?));
            // A file written before (by an earlier agent, or the target of
            // an earlier reload) already has the records up to its last line.
            if let Target::File(p) = &target
                && let Ok(Some(s)) = devfence_app::audit::last_exported_seq(p)
                && s > after
            {
                sh.last.store(s, Ordering::SeqCst);
                continue;
            }
        }
        let Some((_, s)) = sink.as_mut() else {
            return Ok(());
        };
        let (n, err) = s.write(&lines);
        if n > 0 {
            let seq = lines[n - 1].seq;
            sh.last.store(seq, Ordering::SeqCst);
            save_state(&state, seq)
                .map_err(|e| format!("cannot keep the exported seq in {}: {e}", state.display()))?;
        }
        if let Some(e) = err {
            *sink = None;
            return Err(e);
        }
        if lines.len() < devfence_app::audit::EXPORT_PAGE {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rfc5424_line() {
        let l = ExportLine {
            schema: 1,
            seq: 7,
            time: "2026-12-05T01:02:03.004Z".into(),
            at_ms: 0,
            actor: serde_json::json!({"via": "local"}),
            action: "refusal".into(),
            target: devfence_app::audit::Target {
                device: None,
                tenant: None,
            },
            outcome: "refused",
            kind: "refusal",
            detail: serde_json::json!({"refused": "x"}),
            prev_hash: String::new(),
            hash: String::new(),
        };
        let m = syslog_message(10, "host1", &l, false);
        // authpriv (10) * 8 + notice (5)
        assert!(
            m.starts_with("<85>1 2026-12-05T01:02:03.004Z host1 devfence "),
            "{m}"
        );
        assert!(m.ends_with(&format!(" audit - {}", l.to_json())), "{m}");
        assert!(syslog_message(10, "h", &l, true).contains("omitted"));
    }
}
