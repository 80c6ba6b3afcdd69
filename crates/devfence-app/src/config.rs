//! `/etc/devfence/devfence.toml`: which fabric backend devfence drives.
//!
//! Read from `--config FILE`, else `<root>/etc/devfence/devfence.toml` when it
//! exists; without either the default holds: the simulated SM on a simulated host,
//! none on the real host (IB VF handovers are then refused with a hint to
//! configure one).
//!
//! ```toml
//! [fabric]
//! backend = "opensm"          # "sim", "opensm", "ufm" or "none"
//!
//! [fabric.opensm]
//! partitions_file = "/etc/opensm/partitions.conf"
//! log_file = "/var/log/opensm.log"
//! pid_file = "/run/opensm.pid"  # optional: else the one process named opensm
//! # partitions_mode = "ufm-user-ext" # OpenSM managed by UFM (docs/fabric-opensm.md)
//! # ufm_merge_command = ["/opt/ufm/scripts/sync_partitions_conf.sh"]
//! [fabric.opensm.sa]
//! sm_key = "0x1"               # OpenSM's sm_key: the SA answers P_Key tables only to it
//! timeout_ms = 200
//!
//! [fabric.ufm]
//! url = "https://ufm.example:443"
//! ca_file = "/etc/devfence/ufm-ca.pem"
//! credentials = { source = "file", path = "/etc/devfence/ufm.credentials" }
//! managed_pkeys = ["0x0001", "0x0002"]
//!
//! [agent]                      # `devfence serve` (docs/agent.md)
//! socket = "/run/devfence/devfence.sock"
//! admin_group = "devfence-admin" # a group name or a numeric gid: may act
//! reader_group = "devfence"      # may read; the socket's group
//! metrics_tcp = "127.0.0.1:9464" # optional: GET /metrics on loopback TCP
//! audit_export = "/var/log/devfence/audit.jsonl" # or "syslog"
//! verify_interval = 60           # seconds between re-verifications (1..=86400)
//! batch_window = 20              # ms to collect IB VF operations into one sweep
//!
//! [fleet]                      # shared facts in etcd (docs/fleet.md)
//! backend = "etcd"
//! endpoints = ["https://etcd1:2379", "https://etcd2:2379", "https://etcd3:2379"]
//! ca = "/etc/devfence/etcd-ca.pem"
//! cert = "/etc/devfence/etcd-client.pem"
//! key = "/etc/devfence/etcd-client-key.pem"
//! fabric = "ib0"
//! ```
//!
//! Unknown keys are refused (a misspelt key silently ignored would mean a
//! backend other than the one the operator thinks). Every key is documented
//! once, in [`KEYS`]; the man page devfence.toml(5) is generated from it and a
//! test fails when a key the parser accepts is missing there.

use std::path::{Path, PathBuf};

use devfence_fabric::opensm::SaConfig;
use devfence_fabric::{OpenSmConfig, UfmConfig};
use devfence_host::HostRoot;
use devfence_model::bounded::{self, ReadFileError};

/// Where the configuration lives under a host root.
pub const CONFIG_PATH: &str = "/etc/devfence/devfence.toml";

/// The most devfence reads of a configuration file.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The fabric backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The default: the simulated SM on a simulated host, none on the real one.
    #[default]
    Auto,
    /// The simulated SM (simulated hosts only).
    Sim,
    /// OpenSM on this host: partitions file + SIGHUP, verified at the SA.
    Opensm,
    /// NVIDIA UFM over its REST API.
    Ufm,
    /// No SM: IB VF handovers are refused.
    None,
    /// A host of a fleet: desired memberships in etcd for the fabric
    /// controller, gates on its observed entries **and** the SA (needs
    /// `[fleet]` with `host`; docs/fleet.md).
    Fleet,
}

/// `[fabric]`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FabricConfig {
    /// Which backend.
    #[serde(default)]
    pub backend: Backend,
    /// `[fabric.opensm]`.
    #[serde(default)]
    pub opensm: Option<OpenSmConfig>,
    /// `[fabric.ufm]`.
    #[serde(default)]
    pub ufm: Option<UfmConfig>,
    /// `[fabric.sa]`: how to reach the SA (both backends verify there).
    #[serde(default)]
    pub sa: Option<SaConfig>,
}

/// `[hook]`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Admit a domain that names no tenant and holds no device reserved for it,
    /// for the tenant its devices are Ready for — only while the ledger knows at
    /// most one tenant. Default false: such a domain is refused.
    #[serde(default)]
    pub allow_unidentified_single_tenant: bool,
}

/// A group named in `[agent]`: by name (looked up in the group database when
/// the agent starts) or by number.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum GroupRef {
    /// A numeric gid.
    Gid(u32),
    /// A group name.
    Name(String),
}

/// `[agent]`: the host agent (`devfence serve`, docs/agent.md).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The Unix socket (a path on the host; default
    /// `/run/devfence/devfence.sock` under the host root).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Members may act (POST); root always may.
    #[serde(default)]
    pub admin_group: Option<GroupRef>,
    /// Members may read (GET); the socket's group.
    #[serde(default)]
    pub reader_group: Option<GroupRef>,
    /// A loopback address (`127.0.0.1:9464`, `[::1]:9464`) serving only
    /// `GET /metrics`, for a Prometheus scraper.
    #[serde(default)]
    pub metrics_tcp: Option<std::net::SocketAddr>,
    /// Where the agent streams every audit record as a JSON line: a file (a
    /// host path, appended to) or `"syslog"` (RFC 5424 to `syslog_socket`).
    #[serde(default)]
    pub audit_export: Option<String>,
    /// The local syslog datagram socket for `audit_export = "syslog"`.
    #[serde(default)]
    pub syslog_socket: Option<PathBuf>,
    /// The syslog facility of exported records (default `authpriv`).
    #[serde(default)]
    pub syslog_facility: Option<String>,
    /// Seconds between two re-verifications of every Ready and Active device
    /// (continuous verification; kernel uevents trigger one sooner). Default
    /// [`DEFAULT_VERIFY_INTERVAL`], at least [`MIN_VERIFY_INTERVAL`].
    #[serde(default)]
    pub verify_interval: Option<u64>,
    /// Milliseconds during which assign/handover/release requests for IB VFs
    /// are collected into one batch (one apply, one sweep at the SM); `0`
    /// runs each alone. Default [`DEFAULT_BATCH_WINDOW_MS`].
    #[serde(default)]
    pub batch_window: Option<u64>,
    /// Seconds a gate of an operation run by the agent waits for the SM (and the
    /// fleet's controller) to show the change before it fails closed and the
    /// device is quarantined. Default [`DEFAULT_GATE_TIMEOUT_S`].
    #[serde(default)]
    pub gate_timeout: Option<u64>,
}

/// `[agent] gate_timeout` unless configured, in seconds (the CLI's
/// `--gate-timeout` default too).
pub const DEFAULT_GATE_TIMEOUT_S: u64 = 10;
/// The range of `[agent] gate_timeout`, in seconds.
pub const GATE_TIMEOUT_RANGE_S: std::ops::RangeInclusive<u64> = 1..=600;

/// `[agent] batch_window` unless configured, in milliseconds.
pub const DEFAULT_BATCH_WINDOW_MS: u64 = 20;

/// The longest `[agent] batch_window` accepted, in milliseconds.
pub const MAX_BATCH_WINDOW_MS: u64 = 10_000;

impl AgentConfig {
    /// The batch window (zero: batching off).
    #[must_use]
    pub fn batch_window(&self) -> std::time::Duration {
        // Bounded by the parser; bounded again for a value built in code.
        std::time::Duration::from_millis(
            self.batch_window
                .unwrap_or(DEFAULT_BATCH_WINDOW_MS)
                .min(MAX_BATCH_WINDOW_MS),
        )
    }

    /// How long an agent-run operation's gate waits for the SM to show its change.
    #[must_use]
    pub fn gate_timeout(&self) -> std::time::Duration {
        // Bounded by the parser; bounded again for a value built in code.
        std::time::Duration::from_secs(
            self.gate_timeout
                .unwrap_or(DEFAULT_GATE_TIMEOUT_S)
                .clamp(*GATE_TIMEOUT_RANGE_S.start(), *GATE_TIMEOUT_RANGE_S.end()),
        )
    }
}

/// `[agent] verify_interval` unless configured (seconds).
pub const DEFAULT_VERIFY_INTERVAL: u64 = 60;
/// The shortest `[agent] verify_interval` accepted (seconds).
pub const MIN_VERIFY_INTERVAL: u64 = 1;
/// The longest `[agent] verify_interval` accepted (seconds: one day).
pub const MAX_VERIFY_INTERVAL: u64 = 86_400;

impl AgentConfig {
    /// The re-verification interval: configured, else the default.
    #[must_use]
    pub fn verify_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.verify_interval.unwrap_or(DEFAULT_VERIFY_INTERVAL))
    }
}

/// The syslog facilities `[agent] syslog_facility` may name, with their codes.
pub const SYSLOG_FACILITIES: &[(&str, u8)] = &[
    ("auth", 4),
    ("authpriv", 10),
    ("daemon", 3),
    ("user", 1),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// One key of `devfence.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// Its dotted path, e.g. `fabric.opensm.log_file`.
    pub name: &'static str,
    /// Its default, as written in the file (`-`: none).
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
}

const fn key(name: &'static str, default: &'static str, doc: &'static str) -> Key {
    Key { name, default, doc }
}

/// Every key of `devfence.toml`, in the order of the file: the one place they
/// are documented (devfence.toml(5) is generated from it).
pub const KEYS: &[Key] = &[
    key(
        "fabric.backend",
        "\"auto\"",
        "The subnet manager devfence drives: \"opensm\" (partitions file + SIGHUP, verified at the SA), \"ufm\" (NVIDIA UFM's REST API), \"fleet\" (a host of a fleet: desired memberships in etcd for the fabric controller, every gate verified at the SA too; needs [fleet] with host, and the host agent), \"sim\" (the simulated SM; simulated hosts only), \"none\" (IB VF handovers refused), \"auto\" (sim on a simulated host, none on a real one).",
    ),
    key(
        "fabric.opensm.partitions_file",
        "\"/etc/opensm/partitions.conf\"",
        "OpenSM's partition_config_file; devfence owns one marked block of it and keeps the operator's part byte for byte.",
    ),
    key(
        "fabric.opensm.log_file",
        "\"/var/log/opensm.log\"",
        "OpenSM's log_file (OpenSM must run with force_log_flush TRUE): devfence reads sweep outcomes from it.",
    ),
    key(
        "fabric.opensm.pid_file",
        "-",
        "A file holding OpenSM's PID; without one, devfence signals the one process named opensm.",
    ),
    key(
        "fabric.opensm.partitions_mode",
        "\"direct\"",
        "Where devfence writes its block: \"direct\" (into partitions_file, then SIGHUP), \"ufm-user-ext\" (OpenSM managed by NVIDIA UFM, which regenerates partitions_file on every model change: devfence writes UFM's partitions.conf.user_ext and runs ufm_merge_command; the default partition is UFM's), or \"auto\" (ufm-user-ext when the extension file exists or partitions_file is under /opt/ufm/, else direct). devfence status names the mode in use and why.",
    ),
    key(
        "fabric.opensm.ufm_user_ext_file",
        "-",
        "UFM's extension file (ufm-user-ext mode). Default: conf/partitions.conf.user_ext when partitions_file is conf/opensm/partitions.conf (UFM's layout), else partitions_file + \".user_ext\". A regular file, never a symlink; the operator's lines in it are kept.",
    ),
    key(
        "fabric.opensm.ufm_merge_command",
        "-",
        "The command that has UFM merge the extension file into partitions_file (argv list, run without a shell, absolute program path), e.g. [\"/opt/ufm/scripts/sync_partitions_conf.sh\"]. Required in ufm-user-ext mode. A non-zero exit, a timeout or a merged file without devfence's block rolls the extension file back (the change stays staged). Never put a secret in it: argv is readable by every local user.",
    ),
    key(
        "fabric.opensm.ufm_merge_timeout_ms",
        "60000",
        "How long ufm_merge_command may run before it and its process group are killed (1 to 600000).",
    ),
    key(
        "fabric.opensm.sa.ca",
        "-",
        "The local HCA to send SA queries from (default: the first one).",
    ),
    key(
        "fabric.opensm.sa.port",
        "0",
        "The port of that HCA (0: the first active one).",
    ),
    key(
        "fabric.opensm.sa.sm_key",
        "\"0x1\"",
        "The SM_Key: the SA answers P_Key tables only to a trusted requester (OpenSM's default sm_key is 0x1).",
    ),
    key(
        "fabric.opensm.sa.timeout_ms",
        "200",
        "Time for one SA answer in milliseconds (1 to 10000).",
    ),
    key(
        "fabric.opensm.sa.retries",
        "3",
        "Retries per SA query (0 to 10; timeout_ms x (retries + 1) at most 20000 ms).",
    ),
    key(
        "fabric.sa",
        "-",
        "How to reach the SA for either backend (the same keys as fabric.opensm.sa; it wins over that section). The UFM backend reads the ports' acknowledged P_Key tables there.",
    ),
    key(
        "fabric.ufm.url",
        "-",
        "UFM's base URL, https://host[:port][/prefix]; http:// and credentials in the URL are refused.",
    ),
    key(
        "fabric.ufm.ca_file",
        "-",
        "PEM file with the CA certificate(s) UFM's certificate must chain to (default: the built-in Mozilla roots).",
    ),
    key(
        "fabric.ufm.credentials",
        "{ source = \"env\" }",
        "Where the user and password come from: { source = \"file\", path = \"FILE\" } (first line user:password, mode o-rwx) or { source = \"env\", user_var = \"DEVFENCE_UFM_USER\", password_var = \"DEVFENCE_UFM_PASSWORD\" }. Never logged.",
    ),
    key(
        "fabric.ufm.insecure_skip_verify",
        "false",
        "Turns TLS certificate verification off (a lab only: anyone on the path can read the password and forge UFM's answers); warned about loudly.",
    ),
    key(
        "fabric.ufm.timeout_ms",
        "10000",
        "Time for one HTTP request, connect to last byte (at most 120000).",
    ),
    key(
        "fabric.ufm.connect_timeout_ms",
        "5000",
        "Time to establish the TCP and TLS connection (at most 60000).",
    ),
    key(
        "fabric.ufm.retries",
        "2",
        "Repetitions after a retryable failure (HTTP 5xx, 408, 429, a timeout); 4xx and TLS failures are never repeated (at most 5).",
    ),
    key(
        "fabric.ufm.retry_backoff_ms",
        "250",
        "Pause before the first repetition, doubling up to 8 times this (at most 5000).",
    ),
    key(
        "fabric.ufm.managed_pkeys",
        "[]",
        "The partitions devfence manages at UFM (empty: its tenants' partitions); no other partition is touched.",
    ),
    key(
        "fabric.ufm.trust_configured_view",
        "false",
        "Let a gate pass on UFM's configured view alone when no SA reads the ports' tables (not recommended: UFM reports what it was asked, not what the ports took).",
    ),
    key(
        "fabric.ufm.ip_over_ib",
        "true",
        "ip_over_ib in the partitions devfence adds GUIDs to.",
    ),
    key(
        "agent.socket",
        "\"/run/devfence/devfence.sock\"",
        "The host agent's Unix socket (devfence serve; a path on the host, under the host root by default). Mode 0660, group agent.reader_group.",
    ),
    key(
        "agent.admin_group",
        "-",
        "A group (name or gid) whose members may act through the agent (POST); root always may.",
    ),
    key(
        "agent.reader_group",
        "-",
        "A group (name or gid) whose members may read through the agent (GET); the socket's group.",
    ),
    key(
        "agent.metrics_tcp",
        "-",
        "A loopback address (127.0.0.1:9464) serving only GET /metrics for a Prometheus scraper; other addresses are refused.",
    ),
    key(
        "agent.audit_export",
        "-",
        "Where the agent streams every audit record as a JSON line (docs/json.md, Audit export): a file (a host path under the root, appended to, reopened when logrotate moves it or on SIGHUP) or \"syslog\" (RFC 5424 to agent.syslog_socket). The last exported seq is kept beside the ledger: a restart exports what it missed, once.",
    ),
    key(
        "agent.syslog_socket",
        "\"/dev/log\"",
        "The local syslog datagram socket for audit_export = \"syslog\" (a host path under the root).",
    ),
    key(
        "agent.syslog_facility",
        "\"authpriv\"",
        "The syslog facility of exported audit records: auth, authpriv, daemon, user or local0 to local7.",
    ),
    key(
        "agent.verify_interval",
        "60",
        "Seconds between two re-verifications of every Ready and Active device by the agent (1 to 86400); relevant kernel uevents trigger one sooner on the real host. A drifted Ready device is quarantined, an Active one reported (GET /v1/findings).",
    ),
    key(
        "fleet.backend",
        "-",
        "\"etcd\": the fleet's shared facts (GUID pool, P_Key ownership, desired and observed memberships) live in etcd (docs/fleet.md). Required in a [fleet] section.",
    ),
    key(
        "fleet.endpoints",
        "-",
        "The etcd members' client URLs, https://HOST:PORT (at most 16). http:// only with fleet.insecure_plaintext on a loopback host.",
    ),
    key(
        "fleet.ca",
        "-",
        "The CA (PEM) that signed the etcd members' certificates; required for https endpoints (TLS is always verified).",
    ),
    key(
        "fleet.cert",
        "-",
        "The client certificate (PEM) presented to etcd; with fleet.key.",
    ),
    key(
        "fleet.key",
        "-",
        "The client certificate's key (PEM); with fleet.cert. Read when connecting, never shown.",
    ),
    key(
        "fleet.insecure_plaintext",
        "false",
        "Accept http:// endpoints, and only on a loopback host (a test cluster); refused for any other host.",
    ),
    key(
        "fleet.prefix",
        "\"devfence\"",
        "The etcd key prefix: keys are /PREFIX/FABRIC/...",
    ),
    key(
        "fleet.fabric",
        "-",
        "The fabric this host's ports are on; GUIDs and P_Keys are scoped per fabric. Required.",
    ),
    key(
        "fleet.timeout_ms",
        "5000",
        "The deadline of one fleet operation (100-60000); past it the operation fails closed.",
    ),
    key(
        "fleet.lease_ttl_s",
        "15",
        "The TTL of this host's etcd lease (2-300 s); its desired memberships go when it expires.",
    ),
    key(
        "fleet.batch_window_ms",
        "50",
        "The fabric controller's batching window (0-10000 ms): after the first desired change it sees, it waits this long and folds every host's changes into one apply and one SM sweep (docs/fleet.md).",
    ),
    key(
        "fleet.host",
        "-",
        "This host's name in the fleet (a name: [A-Za-z0-9._-]); required with [fabric] backend = \"fleet\". The host agent registers it under its lease at start.",
    ),
    key(
        "agent.batch_window",
        "20",
        "Milliseconds (0 to 10000) during which the agent collects assign/handover/release requests for IB VFs into one batch: one apply and one sweep at the SM, each device still verified by its own gates. 0 runs each request alone.",
    ),
    key(
        "agent.gate_timeout",
        "10",
        "Seconds (1 to 600) a gate of an operation the agent runs waits for the SM (and, in a fleet, the fabric controller) to show the change before it fails closed and quarantines the device. A large fabric whose SM sweeps slowly needs more.",
    ),
    key(
        "hook.allow_unidentified_single_tenant",
        "false",
        "Admit a domain that names no tenant and holds no device reserved for it, for the tenant its devices are Ready for, only while the ledger knows at most one tenant.",
    ),
];

/// devfence.toml(5): the configuration file's man page, in roff, from [`KEYS`].
#[must_use]
pub fn man_page() -> String {
    fn esc(s: &str) -> String {
        s.replace('\\', "\\e").replace('-', "\\-")
    }
    let mut m = String::from(
        ".TH DEVFENCE.TOML 5 \"\" \"devfence\" \"File formats\"\n\
         .SH NAME\ndevfence.toml \\- which subnet manager devfence drives, and how its libvirt hook decides\n\
         .SH SYNOPSIS\n/etc/devfence/devfence.toml under the host root, or \\fB\\-\\-config\\fR \\fIFILE\\fR\n\
         .SH DESCRIPTION\nA TOML file. Without one the defaults hold: the simulated SM on a simulated host, \
         none on a real host (IB VF handovers are then refused with a hint to configure one). \
         Unknown keys are refused, naming the file and line; a value is never echoed in an error \
         (it may be a secret). The file is read only if it is a regular file of at most 1 MiB.\n\
         .SH KEYS\n",
    );
    for k in KEYS {
        m.push_str(&format!(
            ".TP\n\\fB{}\\fR (default: {})\n{}\n",
            esc(k.name),
            esc(k.default),
            esc(k.doc)
        ));
    }
    m.push_str(".SH SEE ALSO\ndevfence(1)\n");
    m
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file names a key, value or combination devfence refuses; the
    /// message names the file, the line or section, and a hint.
    #[error("{0}")]
    Invalid(String),
    /// The file cannot be read.
    #[error("Cannot read the configuration {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ReadFileError,
    },
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[fabric]`.
    #[serde(default)]
    pub fabric: FabricConfig,
    /// `[hook]`: the libvirt hook (docs/libvirt-hook.md).
    #[serde(default)]
    pub hook: HookConfig,
    /// `[agent]`: the host agent (docs/agent.md).
    #[serde(default)]
    pub agent: AgentConfig,
    /// `[fleet]`: the fleet's shared facts in etcd (docs/fleet.md).
    #[serde(default)]
    pub fleet: Option<devfence_fleet::FleetConfig>,
    /// Where it was read from (`None`: the defaults).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Config {
    /// Parses `text` (read from `path`).
    ///
    /// # Errors
    /// A TOML error or an inconsistent backend choice, naming the file.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut c: Config = toml::from_str(text).map_err(|e| {
            // The message and the line, never the line's text: it may hold a
            // secret (a password written into a URL).
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            ConfigError::Invalid(format!(
                "{}{}: {}. Hint: see `man devfence` (CONFIGURATION) for the keys",
                path.display(),
                line.map(|l| format!(" line {l}")).unwrap_or_default(),
                without_quoted_strings(e.message().trim_end())
            ))
        })?;
        c.source = Some(path.to_path_buf());
        if let Some(u) = &c.fabric.ufm {
            u.validate().map_err(|e| {
                ConfigError::Invalid(format!("{}: [fabric.ufm] {e}", path.display()))
            })?;
        }
        if let Some(o) = &c.fabric.opensm {
            o.validate().map_err(|e| {
                ConfigError::Invalid(format!("{}: [fabric.opensm] {e}", path.display()))
            })?;
        }
        for (section, sa) in [
            ("[fabric.sa]", c.fabric.sa.as_ref()),
            (
                "[fabric.opensm.sa]",
                c.fabric.opensm.as_ref().map(|o| &o.sa),
            ),
        ] {
            if let Some(sa) = sa {
                check_sa(sa).map_err(|e| {
                    ConfigError::Invalid(format!("{}: {section} {e}", path.display()))
                })?;
            }
        }
        if let Some(a) = c.agent.metrics_tcp
            && !a.ip().is_loopback()
        {
            return Err(ConfigError::Invalid(format!(
                "{}: [agent] metrics_tcp = \"{a}\" is not a loopback address. Hint: the metrics \
                 carry no secrets but are served without authorization: give 127.0.0.1:PORT or \
                 [::1]:PORT and let a local scraper or proxy reach it",
                path.display()
            )));
        }
        if let Some(i) = c.agent.verify_interval
            && !(MIN_VERIFY_INTERVAL..=MAX_VERIFY_INTERVAL).contains(&i)
        {
            return Err(ConfigError::Invalid(format!(
                "{}: [agent] verify_interval = {i} is out of range. Hint: give seconds from \
                 {MIN_VERIFY_INTERVAL} to {MAX_VERIFY_INTERVAL} (default {DEFAULT_VERIFY_INTERVAL})",
                path.display()
            )));
        }
        if let Some(w) = c.agent.batch_window
            && w > MAX_BATCH_WINDOW_MS
        {
            return Err(ConfigError::Invalid(format!(
                "{}: [agent] batch_window = {w} is longer than {MAX_BATCH_WINDOW_MS} ms. Hint:                  the window delays every IB VF operation by up to its length; a few tens of                  milliseconds collect concurrent requests (0 turns batching off)",
                path.display()
            )));
        }
        if let Some(t) = c.agent.gate_timeout
            && !GATE_TIMEOUT_RANGE_S.contains(&t)
        {
            return Err(ConfigError::Invalid(format!(
                "{}: [agent] gate_timeout = {t} is out of range. Hint: give seconds from {} to {} \
                 (default {DEFAULT_GATE_TIMEOUT_S}); a large fabric whose SM sweeps slowly needs more",
                path.display(),
                GATE_TIMEOUT_RANGE_S.start(),
                GATE_TIMEOUT_RANGE_S.end()
            )));
        }
        if let Some(GroupRef::Name(n)) = c
            .agent
            .admin_group
            .as_ref()
            .or(c.agent.reader_group.as_ref())
            && n.trim().is_empty()
        {
            return Err(ConfigError::Invalid(format!(
                "{}: [agent] a group is named by an empty string. Hint: give a group name or a numeric gid",
                path.display()
            )));
        }
        if let Some(f) = &c.agent.syslog_facility
            && !SYSLOG_FACILITIES.iter().any(|(n, _)| n == f)
        {
            return Err(ConfigError::Invalid(format!(
                "{}: [agent] syslog_facility is not a facility devfence knows. Hint: give one of {}",
                path.display(),
                SYSLOG_FACILITIES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if let Some(t) = &c.agent.audit_export
            && t != "syslog"
            && !t.starts_with('/')
        {
            return Err(ConfigError::Invalid(format!(
                "{}: [agent] audit_export must be an absolute path or \"syslog\". Hint: e.g. \"/var/log/devfence/audit.jsonl\"",
                path.display()
            )));
        }
        if let Some(f) = &c.fleet {
            f.check()
                .map_err(|e| ConfigError::Invalid(format!("{}: [fleet] {e}", path.display())))?;
        }
        match c.fabric.backend {
            Backend::Fleet if c.fleet.as_ref().and_then(|f| f.host.as_ref()).is_none() => {
                return Err(ConfigError::Invalid(format!(
                    "{}: [fabric] backend = \"fleet\" needs a [fleet] section with host. Hint: name this host as the fleet knows it, e.g. host = \"hv01\"",
                    path.display()
                )));
            }
            Backend::Ufm if c.fabric.ufm.is_none() => {
                return Err(ConfigError::Invalid(format!(
                    "{}: [fabric] backend = \"ufm\" but there is no [fabric.ufm] section. Hint: give at least its url",
                    path.display()
                )));
            }
            _ => {}
        }
        Ok(c)
    }

    /// Loads `explicit`, else `<root>/etc/devfence/devfence.toml` if present, else
    /// the defaults.
    ///
    /// # Errors
    /// An explicit file that cannot be read; any file that does not parse.
    pub fn load(root: &HostRoot, explicit: Option<&Path>) -> Result<Self> {
        let (path, must) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (root.path(CONFIG_PATH), false),
        };
        // Bounded, non-blocking, a regular file only; the default file is found
        // inside the root.
        let read = match explicit {
            Some(p) => bounded::read_file(p, MAX_CONFIG_BYTES),
            None => root.read_file(CONFIG_PATH, MAX_CONFIG_BYTES),
        };
        let text = read.and_then(|b| {
            String::from_utf8(b).map_err(|e| ReadFileError::Read {
                path: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
                ),
            })
        });
        match text {
            Ok(t) => Self::parse(&t, &path),
            Err(e) if !must && e.is_not_found() => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// How to reach the SA: `[fabric.sa]`, else `[fabric.opensm.sa]`, else the
    /// defaults (the UFM backend reads acknowledged port tables there too).
    #[must_use]
    pub fn sa(&self) -> SaConfig {
        self.fabric
            .sa
            .clone()
            .or_else(|| self.fabric.opensm.as_ref().map(|o| o.sa.clone()))
            .unwrap_or_default()
    }

    /// The OpenSM section, or its defaults.
    #[must_use]
    pub fn opensm(&self) -> OpenSmConfig {
        self.fabric.opensm.clone().unwrap_or_default()
    }
}

/// The most retries `[fabric.sa]` may ask libibumad for, per query.
pub const MAX_SA_RETRIES: u32 = 10;
/// The longest SA answer time `[fabric.sa]` may give, in milliseconds.
pub const MAX_SA_TIMEOUT_MS: u32 = 10_000;
/// The longest one SA query may take with every retry, in milliseconds.
pub const MAX_SA_QUERY_MS: u64 = 20_000;

/// The SA client's bounds: a huge `retries` or `timeout_ms` made `status` hang
/// for minutes per port (issue 18 item 12).
fn check_sa(sa: &SaConfig) -> Result<(), String> {
    if sa.retries > MAX_SA_RETRIES {
        return Err(format!(
            "retries = {} is out of range. Hint: give 0 to {MAX_SA_RETRIES} (libibumad repeats each query that often; the default is 3)",
            sa.retries
        ));
    }
    if sa.timeout_ms == 0 || sa.timeout_ms > MAX_SA_TIMEOUT_MS {
        return Err(format!(
            "timeout_ms = {} is out of range. Hint: give 1 to {MAX_SA_TIMEOUT_MS} (one SA answer; the default is 200)",
            sa.timeout_ms
        ));
    }
    let worst = u64::from(sa.timeout_ms) * (u64::from(sa.retries) + 1);
    if worst > MAX_SA_QUERY_MS {
        return Err(format!(
            "timeout_ms = {} with retries = {} lets one SA query take {worst} ms, more than {MAX_SA_QUERY_MS}. Hint: lower one of them; `status` and every gate read wait that long per port when the SA does not answer",
            sa.timeout_ms, sa.retries
        ));
    }
    Ok(())
}

/// `msg` with every `"…"` part (escapes included) replaced by `"…"`: a parser's
/// message may quote a value of the file, which may be a secret.
fn without_quoted_strings(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut chars = msg.chars();
    while let Some(c) = chars.next() {
        if c == '"' {
            let mut escaped = false;
            for d in chars.by_ref() {
                match d {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => break,
                    _ => escaped = false,
                }
            }
            out.push_str("\"…\"");
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error and its causes, as the CLI prints them.
    fn chain(e: &ConfigError) -> String {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(c) = src {
            s.push_str(&format!(": {c}"));
            src = c.source();
        }
        s
    }

    #[test]
    fn parses_each_backend_and_refuses_unknown_keys() {
        let p = Path::new("devfence.toml");
        let c = Config::parse(
            "[fabric]\nbackend = \"opensm\"\n[fabric.opensm]\npartitions_file = \"/x/p.conf\"\nlog_file = \"/x/o.log\"\n[fabric.opensm.sa]\nsm_key = \"0x1\"\n",
            p,
        )
        .expect("parses");
        assert_eq!(c.fabric.backend, Backend::Opensm);
        assert_eq!(c.opensm().partitions_file, PathBuf::from("/x/p.conf"));
        assert_eq!(c.opensm().sa.sm_key, 1);
        assert_eq!(
            Config::parse("", p).expect("empty").fabric.backend,
            Backend::Auto
        );
        let e = Config::parse("[fabric]\nbackend = \"opnsm\"\n", p).expect_err("typo");
        assert!(e.to_string().contains("devfence.toml"), "{e}");
        let e = Config::parse("[fabric]\nbackend = \"opensm\"\npartitons = 1\n", p)
            .expect_err("unknown key");
        assert!(e.to_string().contains("partitons"), "{e}");
        let e = Config::parse("[fabric]\nbackend = \"ufm\"\n", p).expect_err("no section");
        assert!(e.to_string().contains("[fabric.ufm]"), "{e}");
        let e = Config::parse("[fabric.opensm.sa]\nsm_key = \"zz\"\n", p).expect_err("bad key");
        assert!(e.to_string().contains("sm_key"), "{e}");
    }

    /// issue 12: `[agent]` is parsed (groups by name or number), its unknown
    /// keys are refused, and a non-loopback metrics address is refused.
    #[test]
    fn the_agent_section() {
        let p = Path::new("devfence.toml");
        let c = Config::parse(
            "[agent]\nsocket = \"/run/x.sock\"\nadmin_group = \"wheel\"\nreader_group = 4242\nmetrics_tcp = \"127.0.0.1:9464\"\n",
            p,
        )
        .expect("parses");
        assert_eq!(c.agent.socket, Some(PathBuf::from("/run/x.sock")));
        assert_eq!(c.agent.admin_group, Some(GroupRef::Name("wheel".into())));
        assert_eq!(c.agent.reader_group, Some(GroupRef::Gid(4242)));
        assert_eq!(
            Config::parse("", p).expect("empty").agent,
            AgentConfig::default()
        );
        let e = Config::parse("[agent]\nsokcet = \"/x\"\n", p).expect_err("unknown key");
        assert!(e.to_string().contains("sokcet"), "{e}");
        let e = Config::parse("[agent]\nmetrics_tcp = \"0.0.0.0:9464\"\n", p)
            .expect_err("not loopback");
        assert!(
            e.to_string().contains("not a loopback address") && e.to_string().contains("Hint:"),
            "{e}"
        );
        let c = Config::parse("[agent]\nverify_interval = 5\n", p).expect("interval");
        assert_eq!(c.agent.verify_interval(), std::time::Duration::from_secs(5));
        assert_eq!(
            AgentConfig::default().verify_interval(),
            std::time::Duration::from_secs(60)
        );
        for bad in ["0", "86401", "-1", "\"60\""] {
            let e = Config::parse(&format!("[agent]\nverify_interval = {bad}\n"), p)
                .expect_err("out of range");
            assert!(e.to_string().contains("Hint:"), "{bad}: {e}");
        }
        // issue 12 item 5: the batch window, 20 ms unless set, 0 off, bounded.
        assert_eq!(
            AgentConfig::default().batch_window(),
            std::time::Duration::from_millis(20)
        );
        let c = Config::parse("[agent]\nbatch_window = 0\n", p).expect("parses");
        assert!(c.agent.batch_window().is_zero());
        let e = Config::parse("[agent]\nbatch_window = 60000\n", p).expect_err("too long");
        assert!(
            e.to_string().contains("batch_window") && e.to_string().contains("Hint:"),
            "{e}"
        );
        let e = Config::parse("[agent]\nbatch_window = -1\n", p).expect_err("negative");
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = Config::parse("[agent]\nadmin_group = \"\"\n", p).expect_err("empty name");
        assert!(e.to_string().contains("empty"), "{e}");
        let c = Config::parse(
            "[agent]\naudit_export = \"/var/log/devfence/audit.jsonl\"\nsyslog_facility = \"local3\"\n",
            p,
        )
        .expect("export");
        assert_eq!(
            c.agent.audit_export.as_deref(),
            Some("/var/log/devfence/audit.jsonl")
        );
        for bad in [
            "[agent]\naudit_export = \"audit.jsonl\"\n",
            "[agent]\nsyslog_facility = \"kern\"\n",
        ] {
            let e = Config::parse(bad, p).expect_err(bad);
            assert!(e.to_string().contains("Hint:"), "{e}");
        }
    }

    /// issue 18 item 10: a password in the UFM URL is refused when the
    /// configuration loads, and no error shows it — not the URL check's, not the
    /// TOML parser's (which would quote the line).
    #[test]
    fn a_password_in_the_ufm_url_is_refused_and_never_shown() {
        let p = Path::new("/etc/devfence/devfence.toml");
        for text in [
            "[fabric]\nbackend = \"ufm\"\n[fabric.ufm]\nurl = \"https://admin:Hunter2-pw@ufm.example\"\n",
            "[fabric.ufm]\nurl = \"https://admin:Hunter2%2Dpw@ufm.example/x\"\n",
            "[fabric.ufm]\nurl = \"https://admin:Hunter2-pw@ufm.example\"\nretries = \"x\"\n",
            "[fabric.ufm]\nurl = \"https://admin:Hunter2-pw@ufm.example\n",
            "[fabric.ufm]\nurl = 5\ncredentials = \"Hunter2-pw\"\n",
        ] {
            let e = Config::parse(text, p).expect_err(text);
            let s = format!("{}\n{e:?}", chain(&e));
            assert!(!s.contains("Hunter2"), "{text}: {s}");
            assert!(s.contains("devfence.toml") && s.contains("Hint:"), "{s}");
        }
        let e = Config::parse(
            "[fabric.ufm]\nurl = \"https://admin:Hunter2-pw@ufm.example\"\n",
            p,
        )
        .expect_err("userinfo");
        assert!(e.to_string().contains("carries credentials"), "{e}");
    }

    /// issue 18 item 12: `retries`, `retry_backoff_ms` and the SA's `retries` and
    /// `timeout_ms` have upper bounds, refused at load with the key named.
    #[test]
    fn retries_and_timeouts_have_bounds() {
        let p = Path::new("devfence.toml");
        for (text, want) in [
            (
                "[fabric.ufm]\nurl = \"https://u\"\nretries = 1000\n",
                "retries = 1000",
            ),
            (
                "[fabric.ufm]\nurl = \"https://u\"\nretry_backoff_ms = 3600000\n",
                "retry_backoff_ms = 3600000",
            ),
            (
                "[fabric.sa]\nretries = 1000\n",
                "[fabric.sa] retries = 1000",
            ),
            ("[fabric.sa]\ntimeout_ms = 600000\n", "timeout_ms = 600000"),
            (
                "[fabric.opensm.sa]\nretries = 4294967295\n",
                "[fabric.opensm.sa] retries = 4294967295",
            ),
            ("[fabric.sa]\ntimeout_ms = 0\n", "timeout_ms = 0"),
        ] {
            let e = Config::parse(text, p).expect_err(text);
            let s = e.to_string();
            assert!(
                s.contains(want) && s.contains("out of range") && s.contains("Hint:"),
                "{text}: {s}"
            );
        }
        Config::parse(
            "[fabric.ufm]\nurl = \"https://u\"\nretries = 5\nretry_backoff_ms = 5000\n[fabric.sa]\nretries = 10\ntimeout_ms = 1000\n",
            p,
        )
        .expect("the bounds themselves");
        let e = Config::parse("[fabric.sa]\nretries = 10\ntimeout_ms = 10000\n", p)
            .expect_err("together too slow");
        assert!(e.to_string().contains("110000 ms"), "{e}");
    }

    /// `[agent] gate_timeout`: 1 to 600 seconds; out of range refused naming
    /// the key with a hint; the default is 10 s.
    #[test]
    fn the_agents_gate_timeout_is_bounded() {
        let p = Path::new("t.toml");
        let c = Config::parse("[agent]\ngate_timeout = 90\n", p).expect("parses");
        assert_eq!(c.agent.gate_timeout(), std::time::Duration::from_secs(90));
        let c = Config::parse("[agent]\n", p).expect("parses");
        assert_eq!(c.agent.gate_timeout(), std::time::Duration::from_secs(10));
        for bad in ["0", "601"] {
            let e = Config::parse(&format!("[agent]\ngate_timeout = {bad}\n"), p)
                .expect_err("out of range");
            let s = e.to_string();
            assert!(
                s.contains("[agent] gate_timeout") && s.contains("Hint"),
                "{s}"
            );
        }
    }

    /// issue 15 item 2: every key the parser accepts is documented in KEYS
    /// (the one place devfence.toml(5) is generated from), and every key
    /// documented is one the parser accepts.
    #[test]
    fn every_key_is_documented_once_in_keys() {
        let text = "[fabric]\nbackend = \"opensm\"\n[fabric.opensm]\npid_file = \"/run/o.pid\"\npartitions_mode = \"auto\"\nufm_user_ext_file = \"/opt/ufm/files/conf/partitions.conf.user_ext\"\nufm_merge_command = [\"/opt/ufm/scripts/sync_partitions_conf.sh\"]\nufm_merge_timeout_ms = 30000\n[fabric.opensm.sa]\nca = \"mlx5_0\"\n[fabric.sa]\nca = \"mlx5_0\"\n[fabric.ufm]\nurl = \"https://u\"\nca_file = \"/c.pem\"\nmanaged_pkeys = [\"0x0001\"]\n[hook]\n[agent]\nsocket = \"/run/d.sock\"\nadmin_group = \"wheel\"\nreader_group = 5\nmetrics_tcp = \"127.0.0.1:9464\"\naudit_export = \"syslog\"\nsyslog_socket = \"/dev/log\"\nsyslog_facility = \"local3\"\nverify_interval = 30\nbatch_window = 20\ngate_timeout = 30\n[fleet]\nbackend = \"etcd\"\nendpoints = [\"https://e1:2379\"]\nca = \"/ca.pem\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"\nprefix = \"df\"\nfabric = \"ib0\"\ntimeout_ms = 5000\nlease_ttl_s = 15\nbatch_window_ms = 50\nhost = \"hv01\"\n";
        let c = Config::parse(text, Path::new("t.toml")).expect("parses");
        let v = toml::Value::try_from(&c).expect("serializes");
        fn leaves(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, x) in t {
                        let p = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        leaves(&p, x, out);
                    }
                }
                _ => out.push(prefix.to_owned()),
            }
        }
        let mut paths = Vec::new();
        leaves("", &v, &mut paths);
        let documented = |p: &str| {
            KEYS.iter()
                .any(|k| p == k.name || p.starts_with(&format!("{}.", k.name)))
        };
        for p in &paths {
            assert!(documented(p), "{p} is accepted but not in KEYS");
        }
        for k in KEYS {
            assert!(
                paths
                    .iter()
                    .any(|p| p == k.name || p.starts_with(&format!("{}.", k.name))),
                "{} is in KEYS but the parser has no such key",
                k.name
            );
        }
        let man = man_page();
        assert!(man.contains("fabric.opensm.log_file") || man.contains("fabric.opensm.log_file"));
        assert!(man.starts_with(".TH DEVFENCE.TOML 5"), "{man}");
    }

    /// issue 13 item 4: the UFM keys of `[fabric.opensm]` are checked when the
    /// file is read; a bad value is refused naming the file, the key and a hint.
    #[test]
    fn the_opensm_partitions_mode_keys() {
        let p = Path::new("/etc/devfence/devfence.toml");
        let ok = "[fabric]\nbackend = \"opensm\"\n[fabric.opensm]\npartitions_file = \"/opt/ufm/files/conf/opensm/partitions.conf\"\npartitions_mode = \"ufm-user-ext\"\nufm_merge_command = [\"/opt/ufm/scripts/sync_partitions_conf.sh\"]\n";
        let c = Config::parse(ok, p).expect("parses");
        assert_eq!(
            c.opensm().partitions_mode,
            devfence_fabric::opensm::PartitionsMode::UfmUserExt
        );
        assert_eq!(
            c.opensm().user_ext_path(),
            PathBuf::from("/opt/ufm/files/conf/partitions.conf.user_ext")
        );
        assert_eq!(
            Config::parse("", p)
                .expect("empty")
                .opensm()
                .partitions_mode,
            devfence_fabric::opensm::PartitionsMode::Direct
        );
        for (text, want) in [
            (
                "[fabric.opensm]\npartitions_mode = \"ufm\"\n",
                "partitions_mode",
            ),
            (
                "[fabric.opensm]\npartitions_mode = \"ufm-user-ext\"\n",
                "needs ufm_merge_command",
            ),
            (
                "[fabric.opensm]\npartitions_mode = \"auto\"\nufm_merge_command = []\n",
                "ufm_merge_command is empty",
            ),
            (
                "[fabric.opensm]\npartitions_mode = \"auto\"\nufm_merge_command = [\"sync.sh\"]\n",
                "not an absolute path",
            ),
            (
                "[fabric.opensm]\npartitions_mode = \"auto\"\nufm_merge_command = \"/bin/sync.sh\"\n",
                "line 3",
            ),
            (
                "[fabric.opensm]\npartitions_mode = \"auto\"\nufm_merge_timeout_ms = 0\n",
                "ufm_merge_timeout_ms = 0",
            ),
            (
                "[fabric.opensm]\npartitions_mode = \"auto\"\nufm_user_ext_file = \"ext\"\n",
                "ufm_user_ext_file",
            ),
            (
                "[fabric.opensm]\nufm_merge_command = [\"/bin/sync.sh\"]\n",
                "partitions_mode is \"direct\"",
            ),
        ] {
            let e = Config::parse(text, p).expect_err(want);
            let m = chain(&e);
            assert!(
                m.contains(want) && m.contains("devfence.toml"),
                "{text}: {m}"
            );
            assert!(m.contains("Hint"), "{m}");
        }
    }

    /// issue 13: `[fleet]` is checked when the file is read: TLS verified by
    /// default, plaintext only on loopback with insecure_plaintext, bad
    /// values named with the file and a hint.
    #[test]
    fn the_fleet_section() {
        let p = Path::new("/etc/devfence/devfence.toml");
        let ok = "[fleet]\nbackend = \"etcd\"\nendpoints = [\"https://etcd1:2379\"]\nca = \"/ca.pem\"\nfabric = \"ib0\"\n";
        let c = Config::parse(ok, p).expect("parses");
        assert_eq!(c.fleet.expect("fleet").fabric.as_deref(), Some("ib0"));
        for (text, want) in [
            (
                "[fleet]\nbackend = \"etcd\"\nendpoints = [\"http://10.1.1.1:2379\"]\nfabric = \"ib0\"\n",
                "insecure_plaintext = true",
            ),
            (
                "[fleet]\nbackend = \"etcd\"\nendpoints = [\"http://10.1.1.1:2379\"]\ninsecure_plaintext = true\nfabric = \"ib0\"\n",
                "not loopback",
            ),
            (
                "[fleet]\nbackend = \"etcd\"\nendpoints = [\"https://e:2379\"]\nfabric = \"ib0\"\n",
                "need ca",
            ),
            (
                "[fleet]\nendpoints = [\"https://e:2379\"]\n",
                "backend is missing",
            ),
            ("[fleet]\nbackend = \"zookeeper\"\n", "line 2"),
            ("[fleet]\nbackend = \"etcd\"\nendpionts = []\n", "line 3"),
            // issue 13 item 3: the fleet backend needs the host's name, and a name.
            (
                "[fabric]\nbackend = \"fleet\"\n[fleet]\nbackend = \"etcd\"\nendpoints = [\"https://e:2379\"]\nca = \"/ca.pem\"\nfabric = \"ib0\"\n",
                "needs a [fleet] section with host",
            ),
            (
                "[fabric]\nbackend = \"fleet\"\n",
                "needs a [fleet] section with host",
            ),
            (
                "[fleet]\nbackend = \"etcd\"\nendpoints = [\"https://e:2379\"]\nca = \"/ca.pem\"\nfabric = \"ib0\"\nhost = \"a/b\"\n",
                "host \"a/b\"",
            ),
        ] {
            let e = Config::parse(text, p).expect_err(want);
            let m = chain(&e);
            assert!(m.contains(want) && m.contains("devfence.toml"), "{m}");
            assert!(m.contains("Hint"), "{m}");
        }
        let c = Config::parse(
            "[fleet]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\ninsecure_plaintext = true\nfabric = \"ib0\"\n",
            p,
        )
        .expect("loopback plaintext");
        assert!(c.fleet.is_some());
    }

    /// issue 18 item 6: the configuration is read only if it is a regular file,
    /// and only up to 1 MiB (a FIFO does not hang, a device is not read).
    #[test]
    fn the_configuration_file_is_bounded() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = HostRoot::new(dir.path());
        for p in [PathBuf::from("/dev/zero"), dir.path().to_path_buf()] {
            let e = Config::load(&root, Some(&p)).expect_err("not regular");
            assert!(chain(&e).contains("not a regular file"), "{}", chain(&e));
        }
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; (1 << 20) + 1]).expect("write");
        let e = Config::load(&root, Some(&big)).expect_err("big");
        assert!(chain(&e).contains("larger than 1048576"), "{}", chain(&e));
    }
}
