//! `devfence serve --role fabric-controller --fabric NAME`: the fabric
//! controller of one fabric ([`devfence_fleet::controller`], docs/fleet.md)
//! as a service.
//!
//! It serves no socket: its state is in etcd (`/P/F/leader`,
//! `/P/F/controller/status`, the observed memberships), read by `devfence
//! fleet status` on any host. It logs through [`crate::log`] (journald-friendly),
//! tells systemd when it is ready, and on SIGTERM or SIGINT finishes the round
//! in flight and **resigns**: its lease is revoked, the leader key goes with
//! it, and a standby takes over at once instead of after the lease TTL.

use std::path::PathBuf;
use std::sync::Arc;

use devfence_app::config::{Backend, Config};
use devfence_fabric::opensm::SaClient;
use devfence_fabric::{OpenSmSm, SubnetManager, UfmSm};
use devfence_fleet::value::Name;
use devfence_fleet::{Controller, ControllerConfig, FleetStore};
use devfence_host::HostRoot;

/// What `devfence serve --role fabric-controller` was given.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// The host root (where `devfence.toml` is found).
    pub root: HostRoot,
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--fabric`: the fabric it leads.
    pub fabric: String,
    /// `--log-level`.
    pub log_level: Option<String>,
}

/// Why the controller cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerServeError {
    /// A refused option or configuration (the message names it, with a hint).
    #[error("{0}")]
    Invalid(String),
    /// The configuration file.
    #[error(transparent)]
    Config(#[from] devfence_app::config::ConfigError),
    /// The UFM backend cannot be set up.
    #[error("The fabric controller cannot set up its UFM backend")]
    Ufm(#[source] devfence_fabric::ufm::UfmSetupError),
    /// The fleet store.
    #[error(transparent)]
    Fleet(#[from] devfence_fleet::FleetError),
    /// The controller ended with an error.
    #[error(transparent)]
    Controller(#[from] devfence_fleet::ControllerError),
    /// An I/O step (runtime, signal handlers).
    #[error("{what}")]
    Io {
        /// What it was doing.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The controller's name in the leader key: the host name and the process id
/// (two controllers on one host stay apart), cut to a valid [`Name`].
fn own_name() -> Result<Name, ControllerServeError> {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "controller".into());
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(50)
        .collect();
    format!("{clean}-{}", std::process::id())
        .parse()
        .or_else(|_| format!("controller-{}", std::process::id()).parse())
        .map_err(|e| ControllerServeError::Invalid(format!("the controller's name: {e}")))
}

/// The SM backend `[fabric]` selects: OpenSM on this (the SM) host, or UFM.
fn open_sm(cfg: &Config) -> Result<Arc<dyn SubnetManager>, ControllerServeError> {
    let sa = Arc::new(SaClient::new(cfg.sa()));
    match cfg.fabric.backend {
        Backend::Opensm => Ok(Arc::new(OpenSmSm::with_port_reader(
            cfg.opensm(),
            Box::new(sa),
        ))),
        Backend::Ufm => {
            let Some(u) = cfg.fabric.ufm.clone() else {
                return Err(ControllerServeError::Invalid(
                    "[fabric] backend = \"ufm\" needs a [fabric.ufm] section. Hint: give at least its url".into(),
                ));
            };
            if u.managed_pkeys.is_empty() {
                return Err(ControllerServeError::Invalid(
                    "the fabric controller on UFM needs [fabric.ufm] managed_pkeys (the partitions devfence manages). Hint: list the tenants' P_Keys".into(),
                ));
            }
            let sm = UfmSm::new(u).map_err(ControllerServeError::Ufm)?;
            Ok(Arc::new(sm.with_port_reader(sa)))
        }
        other => Err(ControllerServeError::Invalid(format!(
            "the fabric controller drives a real subnet manager, but [fabric] backend is {other:?}. Hint: set backend = \"opensm\" (on the SM host) or \"ufm\" in devfence.toml"
        ))),
    }
}

/// Runs the fabric controller until SIGTERM or SIGINT; then resigns.
///
/// # Errors
/// No `[fleet]` section, a bad `--fabric`, an SM backend that is not a real
/// one, the runtime or the signal handlers cannot start, etcd refuses it.
pub fn serve(opts: &ControllerOptions) -> Result<(), ControllerServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    crate::log::init(opts.log_level.as_deref()).map_err(ControllerServeError::Invalid)?;
    let fabric: Name = opts
        .fabric
        .parse()
        .map_err(|e| ControllerServeError::Invalid(format!("--fabric: {e}")))?;
    let cfg = Config::load(&opts.root, opts.config.as_deref())?;
    let Some(fleet) = &cfg.fleet else {
        return Err(ControllerServeError::Invalid(
            "the fabric controller needs a [fleet] section (the etcd cluster it is elected through). Hint: see docs/fleet.md".into(),
        ));
    };
    let mut settings = fleet
        .check()
        .map_err(|e| ControllerServeError::Invalid(format!("[fleet] {e}")))?;
    settings.fabric = fabric;
    let sm = open_sm(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ControllerServeError::Io {
            what: "Cannot start the controller's runtime".into(),
            source: e,
        })?;
    let notifier = crate::notify::Notifier::from_env();
    rt.block_on(async move {
        let handler = |kind| {
            signal(kind).map_err(|e| ControllerServeError::Io {
                what: "Cannot install the controller's signal handlers".into(),
                source: e,
            })
        };
        let (mut term, mut int) = (
            handler(SignalKind::terminate())?,
            handler(SignalKind::interrupt())?,
        );
        let store = FleetStore::connect(settings.clone()).await?;
        let name = own_name()?;
        let ctl = Controller::new(store, sm, ControllerConfig::new(name.clone(), &settings));
        let (stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("stopping: finishing the round in flight, then resigning");
            let _ = stop.send(true);
        });
        tracing::info!(controller = %name, fabric = %settings.fabric, "fabric controller started; campaigning");
        notifier.ready("campaigning for the fabric's leadership");
        let r = ctl.run(rx).await;
        notifier.stopping("resigned");
        tracing::info!(controller = %name, "fabric controller stopped");
        r.map_err(ControllerServeError::from)
    })
}
