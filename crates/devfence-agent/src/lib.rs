//! devfence's host agent (`devfence serve`, issue 12): the application
//! layer's use cases served as HTTP/1.1 + JSON on a Unix socket, one agent
//! per host.
//!
//! An orchestrator (libvirt, Nova, KubeVirt) or a monitoring stack talks to
//! the agent instead of spawning a `devfence` process per question. The agent
//! holds no command logic of its own: each route calls the same
//! `devfence-app` function the CLI calls, on a blocking thread
//! (`tokio::task::spawn_blocking`), and renders its typed result as JSON.
//!
//! - [`socket`]: the socket (0660, the reader group's) and its lock (one agent).
//! - [`auth`]: who may do what, from the peer's `SO_PEERCRED` credentials.
//! - [`api`]: the routes, their JSON, the typed error body.
//! - [`ops`]: long operations (assign, handover, release) as resources to poll;
//!   a client that goes away does not cancel one.
//! - [`batch`]: IB VF operations arriving within `[agent] batch_window` run
//!   as one batch (one apply, one sweep at the SM; each its own gates).
//! - [`metrics`]: Prometheus text (`GET /metrics`).
//! - [`openapi`]: the OpenAPI document, generated from the handlers' types.
//! - [`notify`]: systemd readiness, reload, stop and watchdog (`sd_notify`).
//! - [`log`]: the `tracing` log, journald-friendly.
//! - [`export`]: the audit records streamed to a file or syslog.
//! - [`service`]: recovery before serving, `SIGHUP` reload.
//! - [`watch`]: continuous verification of every Ready and Active device (on
//!   kernel uevents and an interval), its findings (`GET /v1/findings`), and
//!   the live inventory `check` reads.
//!
//! Bad input and faults: bodies are capped ([`Limits::max_body`], 413
//! beyond), a request's headers must arrive within
//! [`Limits::header_timeout`] (a slow client is dropped, never waited for by
//! others), connections are capped ([`Limits::max_connections`]), malformed
//! JSON and wrong types are 400 naming the field. A panic in a use case is
//! caught by its blocking task and answered 500.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devfence_host::HostRoot;

pub mod api;
pub mod auth;
pub mod batch;
pub mod client;
pub mod controller;
pub mod events;
pub mod export;
pub mod fleet;
pub mod hook;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod ops;
pub mod recover;
pub mod service;
pub mod socket;
pub mod state;
pub mod watch;

/// An agent serving on a thread of its own (the demo's agent act, tests):
/// stopped — its operations in flight finished, its socket removed — by
/// [`Running::stop`], or when dropped.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), AgentError>>>,
    socket: PathBuf,
}

impl Running {
    /// The socket it serves.
    #[must_use]
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Stops it and waits for it to end.
    ///
    /// # Errors
    /// What the agent ended with; its thread panicked.
    pub fn stop(mut self) -> Result<(), AgentError> {
        self.end()
    }

    fn end(&mut self) -> Result<(), AgentError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(AgentError::Io {
                what: "The agent's thread panicked".into(),
                source: std::io::Error::other("panic"),
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

/// Binds an agent and serves it on a thread of its own until
/// [`Running::stop`]. No signal handlers, no `sd_notify`, no recovery at
/// start: that is [`service::serve`]'s, the service's entry point.
///
/// # Errors
/// As [`Agent::bind`]; the thread or its runtime cannot start.
pub fn spawn(opts: Options) -> Result<Running, AgentError> {
    let agent = Agent::bind(opts)?;
    let socket = agent.socket().to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("devfence-agent".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| AgentError::Io {
                    what: "Cannot start the agent's runtime".into(),
                    source: e,
                })?;
            rt.block_on(agent.run(async {
                let _ = rx.await;
            }))
        })
        .map_err(|e| AgentError::Io {
            what: "Cannot start the agent's thread".into(),
            source: e,
        })?;
    Ok(Running {
        stop: Some(tx),
        thread: Some(thread),
        socket,
    })
}

/// Where the socket is under the host root unless configured.
pub const DEFAULT_SOCKET: &str = "/run/devfence/devfence.sock";

/// Bounds on what one client may cost the agent.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The largest request body (bytes); more is 413.
    pub max_body: usize,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Finished operations kept for polling (the oldest go first).
    pub kept_operations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 64 << 10,
            header_timeout: Duration::from_secs(10),
            max_connections: 256,
            kept_operations: 1024,
        }
    }
}

/// What `devfence serve` was given.
#[derive(Clone, Debug)]
pub struct Options {
    /// The host root.
    pub root: HostRoot,
    /// `--ledger`.
    pub ledger: Option<PathBuf>,
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--socket`: overrides `[agent] socket` and the default.
    pub socket: Option<PathBuf>,
    /// The bounds.
    pub limits: Limits,
    /// `--log-level` (else `DEVFENCE_LOG`, else info).
    pub log_level: Option<String>,
}

/// Why the agent cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is refused.
    #[error(transparent)]
    App(Box<devfence_app::AppError>),
    /// Another agent holds the socket's lock.
    #[error(
        "Another devfence agent serves {} (pid {pid}). Hint: one agent runs per host; stop it first (systemctl stop devfence), or give another --socket",
        socket.display()
    )]
    AlreadyRunning {
        /// The socket.
        socket: PathBuf,
        /// The pid its lock file names.
        pid: String,
    },
    /// Something answers on the socket though no agent holds the lock.
    #[error(
        "Something answers on {} though no devfence agent holds its lock. Hint: find the process serving it (ss -xlp) and stop it, or give another --socket",
        socket.display()
    )]
    SocketInUse {
        /// The socket.
        socket: PathBuf,
    },
    /// The socket path is taken by a file that is not a socket.
    #[error(
        "{} is {kind}, not a socket; devfence does not remove it. Hint: move it away, or give another --socket",
        socket.display()
    )]
    NotASocket {
        /// The path.
        socket: PathBuf,
        /// What is there.
        kind: &'static str,
    },
    /// A group `[agent]` names cannot be resolved.
    #[error("{0}")]
    Group(String),
    /// An option or environment value is refused (the message names it and
    /// has a hint).
    #[error("{0}")]
    Invalid(String),
    /// An I/O step failed.
    #[error("{what}")]
    Io {
        /// What the agent was doing, naming the path.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl From<devfence_app::AppError> for AgentError {
    fn from(e: devfence_app::AppError) -> Self {
        AgentError::App(Box::new(e))
    }
}

/// A bound agent: the socket taken, not yet serving.
pub struct Agent {
    state: Arc<api::State>,
    listener: std::os::unix::net::UnixListener,
    metrics_tcp: Option<std::net::TcpListener>,
    guard: socket::SocketGuard,
    socket: PathBuf,
    /// What the configuration said at start (what a reload compares with).
    applied: service::Applied,
}

impl Agent {
    /// Reads the configuration, resolves its groups and binds the socket.
    ///
    /// # Errors
    /// The configuration; a group; the socket (see [`socket::bind`]).
    pub fn bind(opts: Options) -> Result<Agent, AgentError> {
        let cfg = devfence_app::config::Config::load(&opts.root, opts.config.as_deref())
            .map_err(devfence_app::AppError::from)?;
        let policy = auth::policy_of(&cfg.agent)?;
        let socket = service::socket_path(&opts, &cfg);
        let (listener, guard) = socket::bind(&socket, policy.reader_gid.or(policy.admin_gid))?;
        let metrics_tcp = match cfg.agent.metrics_tcp {
            Some(a) => {
                let l = std::net::TcpListener::bind(a).map_err(|e| AgentError::Io {
                    what: format!("Cannot listen for metrics on {a} ([agent] metrics_tcp)"),
                    source: e,
                })?;
                l.set_nonblocking(true).map_err(|e| AgentError::Io {
                    what: format!("Cannot listen for metrics on {a}"),
                    source: e,
                })?;
                Some(l)
            }
            None => None,
        };
        let applied = service::Applied {
            socket: socket.clone(),
            metrics_tcp: cfg.agent.metrics_tcp,
            group: policy.reader_gid.or(policy.admin_gid),
            export: export::Target::from_config(&opts.root, &cfg.agent),
        };
        let mut state = api::State::new(opts, policy);
        state.watch.set_interval(cfg.agent.verify_interval());
        state.batch = batch::Batcher::new(cfg.agent.batch_window());
        let state = Arc::new(state);
        state.set_config(cfg);
        Ok(Agent {
            state,
            listener,
            metrics_tcp,
            guard,
            socket,
            applied,
        })
    }

    /// The socket it serves.
    #[must_use]
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Serves until `shutdown` completes, then waits for the operations in
    /// flight to finish and removes the socket.
    ///
    /// # Errors
    /// The listener cannot be handed to the runtime.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let Agent {
            state,
            listener,
            metrics_tcp,
            guard,
            socket,
            applied: _,
        } = self;
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(|e| AgentError::Io {
                what: format!("Cannot serve {}", socket.display()),
                source: e,
            })?;
        if let Some(l) = metrics_tcp {
            let l = tokio::net::TcpListener::from_std(l).map_err(|e| AgentError::Io {
                what: "Cannot serve the metrics address".into(),
                source: e,
            })?;
            tokio::spawn(api::serve_metrics_tcp(Arc::clone(&state), l));
        }
        let source = watch::Source::for_root(&state.options().root);
        let watcher = watch::start(&state, source);
        api::serve(Arc::clone(&state), listener, shutdown).await;
        watcher.stop().await;
        state.stop.notify_waiters();
        state.ops.wait_idle().await;
        drop(guard);
        Ok(())
    }
}

/// `devfence serve`: binds, recovers, then serves until SIGTERM or SIGINT,
/// reloading on SIGHUP (see [`service`]).
///
/// The signal handlers are in place before the socket is bound: a SIGTERM
/// that arrives as soon as the socket answers stops the agent cleanly too.
///
/// # Errors
/// As [`Agent::bind`] and [`Agent::run`]; the log level; recovery; the
/// runtime or the signal handlers cannot start.
pub fn serve(opts: Options) -> Result<(), AgentError> {
    log::init(opts.log_level.as_deref()).map_err(AgentError::Invalid)?;
    service::serve(opts)
}
