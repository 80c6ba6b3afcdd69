//! The agent's client: how the CLI and the libvirt hook reach a running
//! agent, and the one decision of whether they do (issue 12 item 3).
//!
//! [`route`] decides, once per command, between the agent and the direct
//! path (the embedded use cases in this process):
//!
//! - `--direct` or `DEVFENCE_DIRECT=1`: direct, the agent not asked.
//! - The socket (`[agent] socket` under the host root, else
//!   `/run/devfence/devfence.sock` under it) does not exist: direct — or, with
//!   `--via-agent` / `DEVFENCE_AGENT=required`, an error.
//! - The socket answers a connect: through the agent.
//! - The socket exists but nothing answers (a dead agent): direct only when
//!   the agent's lock (`<socket>.lock`) is free — no agent process lives, so
//!   the CLI is the only writer — saying so on stderr; while the lock is held
//!   (an agent that lives but does not answer: starting, stopping, or hung)
//!   the command is refused with a hint, never run beside it.
//!
//! [`Client`] is an HTTP/1.1 client over the Unix socket: hyper's
//! `client::conn::http1` over a tokio `UnixStream`, on a current-thread
//! runtime of its own (the CLI has no other), one connection per request.
//! The request and response types are the application layer's
//! (`devfence-app`, `devfence-engine`), so the CLI renders one value whichever
//! path produced it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devfence_engine::engine::{Done, PlannedStep, Progress, Recovered};
use devfence_host::HostRoot;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How a command may reach the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Through the agent when it serves the host, else direct.
    Auto,
    /// Direct, whatever runs (`--direct`, `DEVFENCE_DIRECT=1`).
    Direct,
    /// Through the agent; none is an error (`--via-agent`,
    /// `DEVFENCE_AGENT=required`).
    Required,
}

impl Mode {
    /// The mode the flags and the environment ask for (flags first).
    ///
    /// # Errors
    /// Both flags, or an environment value devfence does not know.
    pub fn of(direct: bool, via_agent: bool) -> Result<Mode, ClientError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        match (direct, via_agent) {
            (true, true) => {
                return Err(ClientError::Usage(
                    "--direct and --via-agent contradict each other. Hint: give one".into(),
                ));
            }
            (true, false) => return Ok(Mode::Direct),
            (false, true) => return Ok(Mode::Required),
            (false, false) => {}
        }
        let direct = match env("DEVFENCE_DIRECT").as_deref() {
            None | Some("0") => false,
            Some("1") => true,
            Some(v) => {
                return Err(ClientError::Usage(format!(
                    "DEVFENCE_DIRECT={v:?} is not 0 or 1. Hint: DEVFENCE_DIRECT=1 forces the direct path"
                )));
            }
        };
        let required = match env("DEVFENCE_AGENT").as_deref() {
            None | Some("auto") => false,
            Some("required") => true,
            Some(v) => {
                return Err(ClientError::Usage(format!(
                    "DEVFENCE_AGENT={v:?} is not auto or required. Hint: DEVFENCE_AGENT=required makes a missing agent an error"
                )));
            }
        };
        match (direct, required) {
            (true, true) => Err(ClientError::Usage(
                "DEVFENCE_DIRECT=1 and DEVFENCE_AGENT=required contradict each other. Hint: unset one".into(),
            )),
            (true, false) => Ok(Mode::Direct),
            (false, true) => Ok(Mode::Required),
            (false, false) => Ok(Mode::Auto),
        }
    }
}

/// Why the agent could not answer a request (its own refusals are
/// [`ClientError::Api`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The flags or environment are contradictory or unknown.
    #[error("{0}")]
    Usage(String),
    /// `--via-agent` and no agent serves the host.
    #[error(
        "No devfence agent serves this host: {} does not exist. Hint: start it (systemctl start devfence, or devfence serve), or drop --via-agent / DEVFENCE_AGENT=required to act directly",
        socket.display()
    )]
    NoAgent {
        /// The socket looked for.
        socket: PathBuf,
    },
    /// The socket exists, nothing answers, and an agent process holds its lock.
    #[error(
        "The devfence agent at {} does not answer, but an agent process still holds its lock{}; devfence does not act beside it. Hint: wait for it to finish starting or stopping, or restart it (systemctl restart devfence); --direct acts without it once it is stopped",
        socket.display(),
        pid.as_deref().map_or(String::new(), |p| format!(" (pid {p})"))
    )]
    AgentNotAnswering {
        /// The socket.
        socket: PathBuf,
        /// The pid its lock names, if readable.
        pid: Option<String>,
    },
    /// The socket exists, nothing answers, and `--via-agent` was given.
    #[error(
        "The devfence agent at {} does not answer (no agent holds its lock: it is not running). Hint: start it (systemctl start devfence), or drop --via-agent to act directly",
        socket.display()
    )]
    AgentDead {
        /// The socket.
        socket: PathBuf,
    },
    /// The exchange with the agent failed.
    #[error("Cannot talk to the devfence agent at {}: {what}. Hint: check it runs (systemctl status devfence), or give --direct", socket.display())]
    Transport {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        what: String,
    },
    /// The agent answered with its typed error.
    #[error("{0}")]
    Api(RemoteError),
}

/// The agent's typed error body, as received.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, thiserror::Error)]
#[error("{}", self.text())]
pub struct RemoteError {
    /// The HTTP status.
    pub status: u16,
    /// The stable code (`refused`, `forbidden`, `gate_failed`, …).
    pub code: String,
    /// What happened.
    pub message: String,
    /// What to do.
    pub hint: Option<String>,
    /// The causes, outermost first.
    #[serde(default)]
    pub chain: Vec<String>,
    /// Whether a rule said no (the agent's judgement, as the direct path's).
    #[serde(default)]
    pub refusal: bool,
}

impl RemoteError {
    /// Whether a rule said no (the CLI's exit status 1): a refusal, a held
    /// device, a step or gate that failed (the device quarantined), a busy
    /// device. Authorization (403), bad input and faults are not.
    #[must_use]
    pub fn is_refusal(&self) -> bool {
        self.refusal
    }

    /// The message with its hint, as the direct path's error reads.
    #[must_use]
    pub fn text(&self) -> String {
        match &self.hint {
            None => self.message.clone(),
            Some(h) if self.message.ends_with('.') => format!("{} Hint: {h}", self.message),
            Some(h) => format!("{}. Hint: {h}", self.message),
        }
    }
}

/// Where the agent's socket is for `root` and `config`.
///
/// # Errors
/// The configuration cannot be read.
#[allow(clippy::result_large_err)] // the app's error, as every use case returns it
pub fn socket_of(
    root: &HostRoot,
    config: Option<&Path>,
) -> Result<PathBuf, devfence_app::AppError> {
    let cfg = devfence_app::config::Config::load(root, config)?;
    Ok(match &cfg.agent.socket {
        Some(s) => root.path(&s.to_string_lossy()),
        None => root.path(crate::DEFAULT_SOCKET),
    })
}

/// Which path a command takes.
pub enum Route {
    /// In this process. `notice`: why, when the agent was expected (a dead
    /// agent's socket), for stderr.
    Direct {
        /// Said on stderr.
        notice: Option<String>,
    },
    /// Through the agent.
    Agent(Client),
}

/// Decides the path for a command on `root` (see the module's docs).
///
/// # Errors
/// `--via-agent` and no agent; a dead agent whose lock is held; with
/// `--via-agent`, a configuration that cannot be read.
pub fn route(root: &HostRoot, config: Option<&Path>, mode: Mode) -> Result<Route, ClientError> {
    if mode == Mode::Direct {
        return Ok(Route::Direct { notice: None });
    }
    let socket = match socket_of(root, config) {
        Ok(s) => s,
        // The direct path reports the configuration's error itself.
        Err(_) if mode == Mode::Auto => return Ok(Route::Direct { notice: None }),
        Err(e) => {
            return Err(ClientError::Usage(format!(
                "Cannot tell where the agent's socket is: {e}"
            )));
        }
    };
    match std::fs::symlink_metadata(&socket) {
        Err(_) => {
            return if mode == Mode::Required {
                Err(ClientError::NoAgent { socket })
            } else {
                Ok(Route::Direct { notice: None })
            };
        }
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                // Not an agent's; `devfence serve` refuses such a path too.
                return if mode == Mode::Required {
                    Err(ClientError::NoAgent { socket })
                } else {
                    Ok(Route::Direct { notice: None })
                };
            }
        }
    }
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(_) => Ok(Route::Agent(Client::new(socket)?)),
        Err(_) => match lock_holder(&socket) {
            Some(pid) => Err(ClientError::AgentNotAnswering {
                socket,
                pid: (!pid.is_empty()).then_some(pid),
            }),
            None if mode == Mode::Required => Err(ClientError::AgentDead { socket }),
            None => Ok(Route::Direct {
                notice: Some(format!(
                    "the agent's socket {} does not answer and no agent holds its lock (it is not running): acting directly",
                    socket.display()
                )),
            }),
        },
    }
}

/// The pid (possibly empty) in the agent's lock file when a process holds
/// the lock, or when devfence cannot tell (fail closed); `None` when it is
/// free or absent.
fn lock_holder(socket: &Path) -> Option<String> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let lp = crate::socket::lock_path(socket);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&lp)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(_) => return Some(String::new()),
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Some(String::new());
    }
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // Free: released at once (the CLI never holds the agent's lock).
        Ok(l) => {
            drop(l);
            None
        }
        Err((f, _)) => {
            let mut pid = String::new();
            let _ = (&f).take(32).read_to_string(&mut pid);
            Some(pid.trim().to_owned())
        }
    }
}

/// How long one request may take (an operation is polled in several).
const REQUEST_DEADLINE: Duration = Duration::from_secs(600);

/// A client of the agent on one socket.
pub struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client of the agent at `socket`.
    ///
    /// # Errors
    /// The runtime cannot start.
    pub fn new(socket: PathBuf) -> Result<Client, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| ClientError::Transport {
                socket: socket.clone(),
                what: format!("cannot start the client's runtime: {e}"),
            })?;
        Ok(Client { socket, rt })
    }

    /// The socket.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request; the status and the body.
    ///
    /// # Errors
    /// The connection or the exchange fails.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), ClientError> {
        let t = |what: String| ClientError::Transport {
            socket: self.socket.clone(),
            what,
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "devfence")
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| t(format!("cannot build the request: {e}")))?;
        self.rt.block_on(async {
            let exchange = async {
                let stream = tokio::net::UnixStream::connect(&self.socket)
                    .await
                    .map_err(|e| t(format!("connect: {e}")))?;
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(|e| t(format!("handshake: {e}")))?;
                let conn = tokio::spawn(conn);
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| t(format!("request: {e}")))?;
                let status = resp.status().as_u16();
                let bytes = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| t(format!("reading the answer: {e}")))?
                    .to_bytes();
                conn.abort();
                Ok((status, bytes))
            };
            tokio::time::timeout(REQUEST_DEADLINE, exchange)
                .await
                .map_err(|_| t(format!("no answer within {REQUEST_DEADLINE:?}")))?
        })
    }

    /// A JSON request; a 2xx body as `T`, else the agent's typed error.
    ///
    /// # Errors
    /// The exchange fails; the agent refuses; the answer is not a `T`.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let (status, bytes) = self.request(method, path, "application/json", body)?;
        self.decode(status, &bytes)
    }

    fn decode<T: DeserializeOwned>(&self, status: u16, bytes: &[u8]) -> Result<T, ClientError> {
        if (200..300).contains(&status) {
            serde_json::from_slice(bytes).map_err(|e| ClientError::Transport {
                socket: self.socket.clone(),
                what: format!("the answer is not what this devfence expects ({e}); are the agent and the CLI the same version?"),
            })
        } else {
            Err(ClientError::Api(
                serde_json::from_slice::<RemoteError>(bytes).unwrap_or_else(|_| RemoteError {
                    status,
                    code: "unknown".into(),
                    message: format!(
                        "The agent answered {status}: {}",
                        String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
                    ),
                    hint: Some("see the agent's log (journalctl -u devfence)".into()),
                    chain: Vec::new(),
                    refusal: false,
                }),
            ))
        }
    }

    /// `POST /v1/operations`, polled to its end; `progress` is called with
    /// each engine event as it appears (a gate's waiting reads: the latest
    /// at each poll).
    ///
    /// # Errors
    /// The exchange fails; the agent refuses; the operation fails (its
    /// typed error).
    pub fn run_operation(
        &self,
        req: &devfence_app::lifecycle::Request,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Done, ClientError> {
        use devfence_app::lifecycle::Request as Op;
        let body = match req {
            Op::Assign { device, tenant, vm } => serde_json::json!({
                "kind": "assign", "device": device.to_string(), "tenant": tenant.to_string(), "vm": vm,
            }),
            Op::Handover { device, to, vm } => serde_json::json!({
                "kind": "handover", "device": device.to_string(), "tenant": to.to_string(), "vm": vm,
            }),
            Op::Release { device } => serde_json::json!({
                "kind": "release", "device": device.to_string(),
            }),
        };
        #[derive(serde::Deserialize)]
        struct Accepted {
            href: String,
        }
        #[derive(serde::Deserialize)]
        struct View {
            state: String,
            events: Vec<Progress>,
            waiting: Option<Progress>,
            result: Option<Done>,
            error: Option<RemoteError>,
        }
        let a: Accepted = self.call("POST", "/v1/operations", Some(&body))?;
        let mut seen = 0usize;
        let mut last_wait: Option<Progress> = None;
        let until = Instant::now() + REQUEST_DEADLINE;
        let mut pause = Duration::from_millis(2);
        loop {
            let v: View = self.call("GET", &a.href, None)?;
            for p in v.events.iter().skip(seen) {
                progress(p);
            }
            seen = v.events.len();
            if let Some(w) = v.waiting
                && last_wait.as_ref() != Some(&w)
            {
                progress(&w);
                last_wait = Some(w);
            }
            match (v.state.as_str(), v.result, v.error) {
                ("running", _, _) => {}
                (_, Some(done), _) => return Ok(done),
                (_, _, Some(e)) => return Err(ClientError::Api(e)),
                (s, None, None) => {
                    return Err(ClientError::Transport {
                        socket: self.socket.clone(),
                        what: format!("the operation ended {s} without a result or an error"),
                    });
                }
            }
            if Instant::now() > until {
                return Err(ClientError::Transport {
                    socket: self.socket.clone(),
                    what: format!(
                        "{} still runs after {REQUEST_DEADLINE:?}; it goes on in the agent (GET {})",
                        a.href, a.href
                    ),
                });
            }
            // Bounded polling, backing off to 50 ms.
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// `POST /v1/plan`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn plan(
        &self,
        req: &devfence_app::lifecycle::PlanRequest,
    ) -> Result<Vec<PlannedStep>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Plan {
            steps: Vec<PlannedStep>,
        }
        let body = serde_json::json!({
            "device": req.device.to_string(),
            "tenant": req.to.as_ref().map(ToString::to_string),
        });
        Ok(self.call::<Plan>("POST", "/v1/plan", Some(&body))?.steps)
    }

    /// `POST /v1/recover`: what recovery did, its progress events and the
    /// notices; `None` when there is no ledger (its path).
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn recover(&self) -> Result<RecoverAnswer, ClientError> {
        self.call("POST", "/v1/recover", Some(&serde_json::json!({})))
    }

    /// `POST /v1/hook/qemu` with the domain's XML.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn hook(
        &self,
        domain: &str,
        operation: &str,
        subop: &str,
        xml: Vec<u8>,
    ) -> Result<devfence_app::hook::Verdict, ClientError> {
        let path = format!(
            "/v1/hook/qemu?domain={}&operation={}&subop={}",
            escape(domain),
            escape(operation),
            escape(subop)
        );
        let (status, bytes) = self.request("POST", &path, "application/xml", xml)?;
        self.decode(status, &bytes)
    }

    /// `GET /v1/status`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn status(&self) -> Result<StatusAnswer, ClientError> {
        self.call("GET", "/v1/status", None)
    }

    /// `GET /v1/audit/verify`: the chain intact (its report and the head
    /// stored beside the ledger), or why not.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn audit_verify(&self) -> Result<VerifyAnswer, ClientError> {
        self.call("GET", "/v1/audit/verify", None)
    }

    /// `GET /v1/inventory`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn inventory(&self) -> Result<devfence_model::Inventory, ClientError> {
        self.call("GET", "/v1/inventory", None)
    }

    /// `GET /v1/tenants`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn tenants(&self) -> Result<Vec<devfence_model::Tenant>, ClientError> {
        self.call("GET", "/v1/tenants", None)
    }

    /// `GET /v1/audit?device=&tenant=`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn audit_show(
        &self,
        f: &devfence_engine::AuditFilter,
    ) -> Result<Vec<devfence_engine::AuditRecord>, ClientError> {
        let mut q = Vec::new();
        if let Some(d) = &f.device {
            q.push(format!("device={}", escape(&d.to_string())));
        }
        if let Some(t) = &f.tenant {
            q.push(format!("tenant={}", escape(&t.to_string())));
        }
        let path = if q.is_empty() {
            "/v1/audit".to_owned()
        } else {
            format!("/v1/audit?{}", q.join("&"))
        };
        self.call("GET", &path, None)
    }

    /// `GET /v1/check` (the host's tenancy; `--tenancy FILE` and `--fabric`
    /// are the direct path's).
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn check(&self) -> Result<CheckAnswer, ClientError> {
        self.call("GET", "/v1/check", None)
    }
}

/// What `POST /v1/recover` answers.
#[derive(Debug, serde::Deserialize)]
pub struct RecoverAnswer {
    /// The ledger's path.
    pub ledger: PathBuf,
    /// Whether there is a ledger (none: nothing was ever done here).
    pub ledger_present: bool,
    /// Each operation recovered.
    pub recovered: Vec<Recovered>,
    /// The engine's progress events, in order.
    pub events: Vec<Progress>,
    /// What opening the environment noticed.
    pub notices: Vec<String>,
}

/// What `GET /v1/audit/verify` answers.
#[derive(Debug, serde::Deserialize)]
pub struct VerifyAnswer {
    /// Whether the chain is intact.
    pub intact: bool,
    /// Its report, when intact.
    pub report: Option<devfence_engine::VerifyReport>,
    /// The head kept beside the ledger, when intact and there is one.
    pub stored_head: Option<devfence_engine::audit::StoredHead>,
    /// Why not, when broken.
    pub error: Option<String>,
}

/// What `GET /v1/status` answers.
#[derive(Debug, serde::Deserialize)]
pub struct StatusAnswer {
    /// The ledger's path.
    pub ledger: PathBuf,
    /// Every device of the ledger.
    pub devices: Vec<devfence_engine::store::DeviceRecord>,
    /// Operations begun and not finished.
    pub open_operations: Vec<devfence_engine::store::Operation>,
    /// The GUID pool, if set.
    pub guid_pool: Option<devfence_engine::GuidRange>,
    /// The SM.
    pub sm: SmAnswer,
    /// What opening noticed.
    #[serde(default)]
    pub notices: Vec<String>,
}

/// The SM part of `GET /v1/status`.
#[derive(Debug, serde::Deserialize)]
pub struct SmAnswer {
    /// Its backend.
    pub backend: String,
    /// Its health, when it answered.
    pub health: Option<devfence_fabric::Health>,
    /// Why it did not.
    pub error: Option<String>,
}

/// What `GET /v1/check` answers.
#[derive(Debug, serde::Deserialize)]
pub struct CheckAnswer {
    /// Every finding.
    pub findings: Vec<devfence_model::Finding>,
    /// Counts by severity.
    pub summary: devfence_app::check::Summary,
    /// Where the tenancy came from.
    pub tenancy: Option<PathBuf>,
    /// Whether it is the ledger.
    #[serde(default)]
    pub tenancy_from_ledger: bool,
    /// A tenancy file not read because there is a ledger.
    #[serde(default)]
    pub tenancy_file_unread: Option<PathBuf>,
    /// What opening noticed.
    #[serde(default)]
    pub notices: Vec<String>,
}

/// `s` %-escaped for a query value.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_through_the_agents_decoder() {
        for s in ["vm 1", "a&b=c", "ünï", "%41", "+"] {
            assert_eq!(crate::api::percent_decode(&escape(s)).expect("decodes"), s);
        }
    }

    #[test]
    fn a_remote_error_renders_its_hint_and_says_whether_a_rule_refused() {
        let e = RemoteError {
            status: 403,
            code: "forbidden".into(),
            message: "uid 5 may read but not act".into(),
            hint: Some("act as root".into()),
            chain: Vec::new(),
            refusal: false,
        };
        assert_eq!(
            e.to_string(),
            "uid 5 may read but not act. Hint: act as root"
        );
        assert!(!e.is_refusal());
        let e = RemoteError {
            message: "The device is held.".into(),
            refusal: true,
            ..e
        };
        assert_eq!(e.to_string(), "The device is held. Hint: act as root");
        assert!(e.is_refusal());
    }

    #[test]
    fn a_dead_agents_socket_goes_direct_only_when_its_lock_is_free() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("run/devfence/devfence.sock");
        std::fs::create_dir_all(sock.parent().expect("dir")).expect("mkdir");
        // A socket file nobody listens on: bound, then the listener dropped.
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
        let root = HostRoot::new(dir.path());
        match route(&root, None, Mode::Auto) {
            Ok(Route::Direct { notice: Some(n) }) => assert!(n.contains("acting directly"), "{n}"),
            _ => panic!("a dead agent without its lock: direct with a notice"),
        }
        assert!(matches!(
            route(&root, None, Mode::Required),
            Err(ClientError::AgentDead { .. })
        ));
        // Now a live process holds the lock, as a hung agent would.
        let lock = std::fs::File::create(crate::socket::lock_path(&sock)).expect("lock file");
        let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .expect("flock");
        let e = route(&root, None, Mode::Auto).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("does not answer") && e.contains("Hint:")),
            "{e:?}"
        );
        drop(held);
        assert!(matches!(
            route(&root, None, Mode::Direct),
            Ok(Route::Direct { notice: None })
        ));
    }
}
