//! The agent as a service (issue 12 item 7): what happens between the
//! process's start and its end, around [`crate::Agent`]'s serving.
//!
//! 1. The log ([`crate::log`]) and the signal handlers (SIGTERM, SIGINT,
//!    SIGHUP) first.
//! 2. Bind: the configuration, its groups, the socket and its lock (one
//!    agent). The socket listens from here: a client that connects now
//!    waits in the backlog until step 4.
//! 3. Recover, under the lock, what a crash interrupted (every unfinished
//!    operation's device quarantined, scrubbed and verified, as `devfence
//!    recover` does): no request is answered by an agent whose ledger still
//!    has an interrupted operation. A recovery that fails stops the start
//!    (fail closed; systemd restarts it, the journal says why).
//! 4. Serve; `READY=1` to systemd; the watchdog task; the audit export.
//! 5. SIGHUP: reload `devfence.toml` ([`reload`]), and reopen the export.
//! 6. SIGTERM/SIGINT: `STOPPING=1`, stop accepting, let every operation in
//!    flight run to its end (each is journalled step by step, so even a
//!    SIGKILL after this leaves only what `recover` finishes), export what
//!    is left, remove the socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devfence_app::config::Config;
use devfence_engine::engine::{EngineConfig, Recovered};

use crate::export::{Exporter, Target};
use crate::notify::Notifier;
use crate::{AgentError, DEFAULT_SOCKET, Options, api, auth};

/// What the running agent applied from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The socket (changes need a restart).
    pub socket: PathBuf,
    /// The metrics address (changes need a restart).
    pub metrics_tcp: Option<SocketAddr>,
    /// The socket's group.
    pub group: Option<u32>,
    /// The audit export.
    pub export: Option<Target>,
}

/// The socket `opts` and `cfg` select.
#[must_use]
pub fn socket_path(opts: &Options, cfg: &Config) -> PathBuf {
    match (&opts.socket, &cfg.agent.socket) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => opts.root.path(&s.to_string_lossy()),
        (None, None) => opts.root.path(DEFAULT_SOCKET),
    }
}

/// One request's log line: method, route template (never the path: it may
/// name a device), status, the peer's uid, duration. Never a body.
pub fn log_request(method: &str, route: &str, status: u16, uid: Option<u32>, took: Duration) {
    let ms = took.as_secs_f64() * 1000.0;
    let uid = uid.map_or_else(|| "-".to_owned(), |u| u.to_string());
    if status >= 500 {
        tracing::warn!("request {method} {route} {status} uid={uid} {ms:.1}ms");
    } else {
        tracing::info!("request {method} {route} {status} uid={uid} {ms:.1}ms");
    }
}

/// Finishes what a crash interrupted, before the agent answers anyone.
/// Without a ledger there is nothing to recover.
///
/// # Errors
/// The environment cannot be opened; recovery fails.
pub fn recover(opts: &Options) -> Result<Vec<Recovered>, AgentError> {
    let path = devfence_app::env::ledger_path(&opts.root, opts.ledger.as_deref())?;
    if !devfence_app::env::ledger_present(&path) {
        return Ok(Vec::new());
    }
    // Only an unfinished operation needs the kernel and the SM opened.
    let open = {
        use devfence_engine::StoreExt;
        let mut store = devfence_app::env::open_store(&opts.root, opts.ledger.as_deref(), false)?;
        store
            .atomically(|tx| tx.open_operations())
            .map_err(devfence_app::AppError::from)?
    };
    if open.is_empty() {
        return Ok(Vec::new());
    }
    tracing::warn!(
        "{} operation(s) a crash interrupted: recovering before serving",
        open.len()
    );
    let cfg =
        Config::load(&opts.root, opts.config.as_deref()).map_err(devfence_app::AppError::from)?;
    let mut env = devfence_app::Env::open_with(&opts.root, opts.ledger.as_deref(), &cfg)?;
    for n in &env.notices {
        tracing::warn!("{n}");
    }
    let mut e = env.engine(EngineConfig::default());
    devfence_app::lifecycle::recover(&mut e).map_err(|e| devfence_app::AppError::from(e).into())
}

/// With `[fabric] backend = "fleet"`: registers the host in the fleet (its
/// session is kept for the agent's life) and re-writes the desired
/// memberships of its Ready and Active IB VFs from the ledger (a restarted
/// agent's lease is new: the old one's desired entries went with it).
///
/// # Errors
/// The configuration, etcd unreachable, the host's name held by a live
/// session past one lease TTL, the ledger.
pub fn join_fleet(opts: &Options) -> Result<(), AgentError> {
    let cfg =
        Config::load(&opts.root, opts.config.as_deref()).map_err(devfence_app::AppError::from)?;
    if cfg.fabric.backend != devfence_app::config::Backend::Fleet {
        return Ok(());
    }
    let h = devfence_app::fleet::register(&cfg)?;
    let path = devfence_app::env::ledger_path(&opts.root, opts.ledger.as_deref())?;
    let written = if path.exists() {
        let mut store = devfence_app::env::open_store(&opts.root, opts.ledger.as_deref(), false)?;
        // The tenants' partitions are claimed for them on the fabric (a
        // partition owned by another tenant is reported; the desired writes
        // naming it are then refused by their transaction).
        for e in h.claim_partitions(&mut store)? {
            tracing::error!("{e}");
        }
        h.rewrite_desired(&mut store)?
    } else {
        // No ledger yet: nothing to re-write.
        Vec::new()
    };
    tracing::info!(
        "registered host {} in the fleet (fabric {}); re-wrote the desired memberships of {} GUID(s)",
        h.sm.host(),
        h.fleet.store().fabric(),
        written.len()
    );
    Ok(())
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// What changed and now applies.
    pub applied: Vec<String>,
    /// What changed but applies only after a restart.
    pub restart_needed: Vec<String>,
}

/// Re-reads `devfence.toml` and applies what can change live — the groups
/// (the policy is swapped whole, and the socket's group follows), the audit
/// export target — after checking all of it: a file that does not parse, or
/// a group that does not resolve, is refused and nothing changes. The
/// socket path and the metrics address need a restart (reported, not
/// applied). The other sections (`[fabric]`, `[hook]`) apply to the
/// requests that open their environment after the reload.
///
/// # Errors
/// The configuration or a group is refused; nothing was changed.
pub fn reload(
    state: &api::State,
    exporter: &Exporter,
    applied: &mut Applied,
) -> Result<Reloaded, AgentError> {
    let opts = state.options();
    let cfg =
        Config::load(&opts.root, opts.config.as_deref()).map_err(devfence_app::AppError::from)?;
    let policy = auth::policy_of(&cfg.agent)?;
    let mut out = Reloaded::default();
    let socket = socket_path(opts, &cfg);
    if socket != applied.socket {
        out.restart_needed.push(format!(
            "the socket {} (serving {} until a restart)",
            socket.display(),
            applied.socket.display()
        ));
    }
    if cfg.agent.batch_window() != state.batch.window() {
        out.restart_needed.push(format!(
            "[agent] batch_window ({} ms until a restart)",
            state.batch.window().as_millis()
        ));
    }
    if cfg.agent.metrics_tcp != applied.metrics_tcp {
        out.restart_needed
            .push("[agent] metrics_tcp (the old address is served until a restart)".into());
    }
    // Everything checked: apply. The whole file first: requests open their
    // environment ([fabric], [hook]) with it from now on.
    state.set_config(cfg.clone());
    if policy != state.policy() {
        state.set_policy(policy);
        out.applied.push(format!(
            "the groups (admin gid {}, reader gid {})",
            policy.admin_gid.map_or("-".into(), |g| g.to_string()),
            policy.reader_gid.map_or("-".into(), |g| g.to_string())
        ));
    }
    let group = policy.reader_gid.or(policy.admin_gid);
    if group != applied.group
        && let Some(g) = group
    {
        match std::os::unix::fs::chown(&applied.socket, None, Some(g)) {
            Ok(()) => {
                applied.group = group;
                out.applied.push(format!("the socket's group ({g})"));
            }
            Err(e) => tracing::warn!(
                "reload: cannot give {} the group {g}: {e}",
                applied.socket.display()
            ),
        }
    }
    let interval = cfg.agent.verify_interval();
    if interval != state.watch.interval() {
        state.watch.set_interval(interval);
        out.applied.push(format!(
            "the re-verification interval ({} s)",
            interval.as_secs()
        ));
    }
    let target = Target::from_config(&opts.root, &cfg.agent);
    if target != applied.export {
        exporter.set_target(target.clone());
        out.applied.push(format!(
            "the audit export ({})",
            target.as_ref().map_or("none".into(), ToString::to_string)
        ));
        applied.export = target;
    }
    Ok(out)
}

/// The whole service: bind, recover, serve until SIGTERM or SIGINT.
///
/// # Errors
/// The agent cannot start (see [`crate::Agent::bind`]), recovery fails.
pub fn serve(opts: Options) -> Result<(), AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let notifier = Arc::new(Notifier::from_env());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| AgentError::Io {
            what: "Cannot start the agent's runtime".into(),
            source: e,
        })?;
    let (mut term, mut int, mut hup) = {
        let _in_runtime = rt.enter();
        let handler = |kind| {
            signal(kind).map_err(|e| AgentError::Io {
                what: "Cannot install the agent's signal handlers".into(),
                source: e,
            })
        };
        (
            handler(SignalKind::terminate())?,
            handler(SignalKind::interrupt())?,
            handler(SignalKind::hangup())?,
        )
    };
    if let Some(every) = crate::notify::watchdog_interval() {
        // Sent from a task on the runtime that serves (its workers run it
        // from now on, through recovery too): if the runtime stalls, the
        // pings stop and systemd restarts the agent.
        let n = Arc::clone(&notifier);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                n.watchdog();
            }
        });
    }
    let fail = |e: AgentError| {
        tracing::error!("{e}");
        notifier.status(&format!("cannot start: {e}"));
        e
    };
    let agent = crate::Agent::bind(opts).map_err(fail)?;
    let socket = agent.socket().to_path_buf();
    tracing::info!(
        "bound {}; recovering what a crash interrupted",
        socket.display()
    );
    // A host of a fleet registers its session first (recovery may need it).
    join_fleet(agent.state.options()).map_err(fail)?;
    notifier.status("recovering what a crash interrupted");
    let recovered = recover(agent.state.options()).map_err(fail)?;
    for r in &recovered {
        tracing::warn!(
            "recovered operation {} ({} of {}, interrupted after {}): {}{}",
            r.op,
            r.kind,
            r.device,
            r.last_step.as_deref().unwrap_or("its start"),
            r.state,
            r.problem
                .as_deref()
                .map_or(String::new(), |p| format!(" ({p})"))
        );
    }
    let mut applied = agent.applied.clone();
    let exporter = Arc::new(Exporter::start(
        agent.state.options().root.clone(),
        agent.state.options().ledger.clone(),
        applied.export.clone(),
    ));
    if let Some(t) = &applied.export {
        tracing::info!("exporting audit records to {t}");
    }
    let state = Arc::clone(&agent.state);
    let res = rt.block_on(async {
        {
            let (n, st, ex) = (Arc::clone(&notifier), Arc::clone(&state), Arc::clone(&exporter));
            let sock = socket.clone();
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    n.reloading();
                    tracing::info!("SIGHUP: reloading the configuration");
                    let (st2, ex2) = (Arc::clone(&st), Arc::clone(&ex));
                    let mut a = applied.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        let r = reload(&st2, &ex2, &mut a);
                        (r, a)
                    })
                    .await;
                    match r {
                        Ok((Ok(r), a)) => {
                            applied = a;
                            if r.applied.is_empty() {
                                tracing::info!("reload: nothing that applies live changed");
                            }
                            for x in &r.applied {
                                tracing::info!("reload: applied {x}");
                            }
                            for x in &r.restart_needed {
                                tracing::warn!("reload: {x} changed; it needs a restart (systemctl restart devfence)");
                            }
                        }
                        Ok((Err(e), _)) => tracing::error!(
                            "reload refused, the running configuration stays: {e}"
                        ),
                        Err(e) => tracing::error!("reload did not finish ({e}); the running configuration stays"),
                    }
                    // logrotate's postrotate sends SIGHUP: reopen the export.
                    ex.reopen();
                    n.ready(&format!("serving {}", sock.display()));
                }
            });
        }
        let (n, st) = (Arc::clone(&notifier), Arc::clone(&state));
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            let running = st.ops.running();
            tracing::info!(
                "stopping: no new requests; waiting for {running} operation(s) in flight to end"
            );
            n.stopping(&format!("stopping: {running} operation(s) in flight"));
        };
        tracing::info!("serving {}", socket.display());
        notifier.ready(&format!("serving {}", socket.display()));
        agent.run(shutdown).await
    });
    exporter.stop();
    match &res {
        Ok(()) => tracing::info!("stopped"),
        Err(e) => tracing::error!("{e}"),
    }
    res
}
