//! [`UfmConfig`]: how devfence reaches UFM (`[fabric.ufm]` in
//! `/etc/devfence/devfence.toml`), the [`Credentials`] it logs in with, and the
//! [`Secret`] that keeps the password out of every `Debug`, `Display`, log line
//! and error message (docs/design.md §2.4).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::PartitionKey;

/// The environment variable that holds the UFM user by default.
pub const DEFAULT_USER_VAR: &str = "DEVFENCE_UFM_USER";
/// The environment variable that holds the UFM password by default.
pub const DEFAULT_PASSWORD_VAR: &str = "DEVFENCE_UFM_PASSWORD";

/// How devfence reaches NVIDIA UFM's REST API. Deserializes from TOML/JSON with
/// snake_case field names; unknown fields are refused (a misspelt
/// `insecure_skip_verify` must not pass silently). Every field but `url` has a
/// default.
///
/// ```toml
/// [fabric.ufm]
/// url = "https://ufm.example.net"           # https only; port 443 unless given
/// ca_file = "/etc/devfence/ufm-ca.pem"      # PEM CA(s) that sign UFM's certificate
/// credentials = { source = "file", path = "/etc/devfence/ufm.credentials" }
/// managed_pkeys = ["0x0001", "0x0002"]      # the tenants' partitions
/// timeout_ms = 10000
/// connect_timeout_ms = 5000
/// retries = 2
/// retry_backoff_ms = 250
/// ```
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UfmConfig {
    /// UFM's base URL, `https://host[:port]` (a path prefix is kept, for a UFM
    /// behind a reverse proxy). `http://` is refused: basic auth would cross the
    /// network in clear.
    pub url: String,
    /// PEM file with the CA certificate(s) that UFM's server certificate must
    /// chain to. When absent, the Mozilla root set built into devfence is used
    /// (a UFM with a self-signed certificate then fails: give its CA here).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Where the user and password come from (default: the environment,
    /// `DEVFENCE_UFM_USER` / `DEVFENCE_UFM_PASSWORD`).
    #[serde(default)]
    pub credentials: Credentials,
    /// Turns TLS certificate verification **off**. For a lab only: anyone on the
    /// path can then read the password and forge UFM's answers. Logged loudly on
    /// stderr once per process and shown in every `health()` note.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Time for one HTTP request, connect to last body byte (default 10 000 ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Time to establish the TCP+TLS connection (default 5 000 ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How many times a request is repeated after a retryable failure (HTTP 5xx,
    /// 408, 429, a timeout, a failed connection) before it fails; 4xx answers
    /// and TLS failures are never repeated (default 2, i.e. 3 attempts).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Pause before the first repetition; it doubles with each further one, up to
    /// 8 times this value (default 250 ms).
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// The partitions devfence manages at UFM. `RemoveAll` and `Replace` touch
    /// these and the partitions named in the batch being applied, never any
    /// other: not the default partition (which no [`PartitionKey`] can name) and
    /// not partitions that other tools manage on a shared UFM. List every
    /// tenant's partitions here.
    #[serde(default)]
    pub managed_pkeys: Vec<PartitionKey>,
    /// Lets a gate pass on UFM's *configured* view alone when no
    /// [`PortReader`](crate::PortReader) reads the ports' acknowledged tables.
    /// Default false: UFM reports what it was asked, not what the ports took, so
    /// without a port reader [`observe`](crate::SubnetManager::observe) never
    /// reports a clean sweep and no handover verifies. See `docs/fabric-ufm.md`.
    #[serde(default)]
    pub trust_configured_view: bool,
    /// `ip_over_ib` in the partitions devfence adds GUIDs to (default true).
    #[serde(default = "default_true")]
    pub ip_over_ib: bool,
}

/// The most repetitions `retries` may ask for.
pub const MAX_RETRIES: u32 = 5;
/// The longest first pause `retry_backoff_ms` may ask for (it doubles, up to 8×).
pub const MAX_RETRY_BACKOFF_MS: u64 = 5_000;
/// The longest `timeout_ms`.
pub const MAX_TIMEOUT_MS: u64 = 120_000;
/// The longest `connect_timeout_ms`.
pub const MAX_CONNECT_TIMEOUT_MS: u64 = 60_000;
/// The longest one UFM call may take with every retry ([`UfmConfig::worst_call_ms`]).
pub const MAX_CALL_MS: u64 = 180_000;
/// The largest CA file devfence reads (1 MiB: a bundle of hundreds of CAs).
pub const MAX_CA_FILE_BYTES: u64 = 1 << 20;
/// The largest credentials file devfence reads.
pub const MAX_CREDENTIALS_BYTES: u64 = 4096;

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_retries() -> u32 {
    2
}
fn default_retry_backoff_ms() -> u64 {
    250
}
fn default_true() -> bool {
    true
}

impl UfmConfig {
    /// A configuration for `url` with every other field at its default.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            credentials: Credentials::default(),
            insecure_skip_verify: false,
            timeout_ms: default_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            retries: default_retries(),
            retry_backoff_ms: default_retry_backoff_ms(),
            managed_pkeys: Vec::new(),
            trust_configured_view: false,
            ip_over_ib: true,
        }
    }

    /// `timeout_ms` as a duration.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// `connect_timeout_ms` as a duration.
    #[must_use]
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Checks what can be checked without reading a file or the network: the URL
    /// (`https://`, no `user:password@`, no query) and the bounds of the
    /// timeouts and retries, so that a bad configuration is refused when it is
    /// loaded — and without echoing a password written into the URL.
    ///
    /// # Errors
    /// [`UfmSetupError::Url`] or [`UfmSetupError::OutOfRange`].
    pub fn validate(&self) -> Result<(), UfmSetupError> {
        super::client::check_url(&self.url)?;
        let range = |field: &'static str, value: u64, min: u64, max: u64, hint: &'static str| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(UfmSetupError::OutOfRange {
                    field,
                    value,
                    min,
                    max,
                    hint,
                })
            }
        };
        range(
            "timeout_ms",
            self.timeout_ms,
            1,
            MAX_TIMEOUT_MS,
            "leave it out for the default (10000)",
        )?;
        range(
            "connect_timeout_ms",
            self.connect_timeout_ms,
            1,
            MAX_CONNECT_TIMEOUT_MS,
            "leave it out for the default (5000)",
        )?;
        range(
            "retries",
            u64::from(self.retries),
            0,
            u64::from(MAX_RETRIES),
            "every repetition waits longer; a UFM that fails this often needs an operator, not more retries (default 2)",
        )?;
        range(
            "retry_backoff_ms",
            self.retry_backoff_ms,
            0,
            MAX_RETRY_BACKOFF_MS,
            "the pause doubles with each repetition, up to 8 times this value (default 250)",
        )?;
        let worst = self.worst_call_ms();
        if worst > MAX_CALL_MS {
            return Err(UfmSetupError::TooSlow {
                worst_ms: worst,
                max_ms: MAX_CALL_MS,
            });
        }
        Ok(())
    }

    /// The longest one UFM call can take: every attempt timing out, plus the
    /// pauses between them.
    #[must_use]
    pub fn worst_call_ms(&self) -> u64 {
        let attempts = u64::from(self.retries) + 1;
        let pauses: u64 = (0..self.retries)
            .map(|i| self.retry_backoff_ms.saturating_mul(1 << i.min(3)))
            .fold(0, u64::saturating_add);
        attempts
            .saturating_mul(self.timeout_ms)
            .saturating_add(pauses)
    }
}

/// `url` as a message may show it: no `user:password@`, no query or fragment.
#[must_use]
pub fn shown_url(url: &str) -> String {
    let (head, tail) = match url.find(['?', '#']) {
        Some(i) => (&url[..i], "?<query removed>"),
        None => (url, ""),
    };
    let (scheme, rest) = match head.find("://") {
        Some(i) => (&head[..i + 3], &head[i + 3..]),
        None => ("", head),
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let authority = match authority.rfind('@') {
        Some(i) => format!("<userinfo removed>@{}", &authority[i + 1..]),
        None => authority.to_string(),
    };
    format!("{scheme}{authority}{path}{tail}")
}

/// Reads `path` if it is a regular file of at most `max` bytes (following
/// links, as an operator's `/etc/ssl/…` link is meant to be followed). Opened
/// without blocking, so a FIFO in its place does not hang devfence; a device
/// such as `/dev/zero` is refused before a byte is read.
pub(crate) fn read_regular_capped(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read as _;
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open it: {}", std::io::Error::from(e)))?;
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?;
    if !meta.is_file() {
        return Err("it is not a regular file (a device, FIFO, socket or directory)".into());
    }
    if meta.len() > max {
        return Err(format!(
            "it is {} bytes, more than the {max} devfence reads",
            meta.len()
        ));
    }
    let mut out = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if out.len() as u64 > max {
        return Err(format!("it grew past the {max} bytes devfence reads"));
    }
    Ok(out)
}

impl fmt::Debug for UfmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written out so that a secret added here later has to be thought about.
        f.debug_struct("UfmConfig")
            .field("url", &shown_url(&self.url))
            .field("ca_file", &self.ca_file)
            .field("credentials", &self.credentials)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("timeout_ms", &self.timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("retries", &self.retries)
            .field("retry_backoff_ms", &self.retry_backoff_ms)
            .field("managed_pkeys", &self.managed_pkeys)
            .field("trust_configured_view", &self.trust_configured_view)
            .field("ip_over_ib", &self.ip_over_ib)
            .finish()
    }
}

/// Where the UFM user and password come from. The configuration names only the
/// place; the values are read when the backend is built and kept as a [`Secret`].
///
/// ```toml
/// credentials = { source = "file", path = "/etc/devfence/ufm.credentials" }
/// credentials = { source = "env" }   # DEVFENCE_UFM_USER, DEVFENCE_UFM_PASSWORD
/// credentials = { source = "env", user_var = "UFM_USER", password_var = "UFM_PASS" }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum Credentials {
    /// A file whose first line is `user:password` (split at the first `:`; a
    /// trailing newline is ignored). It must not be readable or writable by
    /// others (mode `o-rwx`); group access is allowed for a service group.
    File {
        /// The file.
        path: PathBuf,
    },
    /// Two environment variables.
    Env {
        /// The variable with the user (default `DEVFENCE_UFM_USER`).
        #[serde(default = "default_user_var")]
        user_var: String,
        /// The variable with the password (default `DEVFENCE_UFM_PASSWORD`).
        #[serde(default = "default_password_var")]
        password_var: String,
    },
}

fn default_user_var() -> String {
    DEFAULT_USER_VAR.into()
}
fn default_password_var() -> String {
    DEFAULT_PASSWORD_VAR.into()
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials::Env {
            user_var: default_user_var(),
            password_var: default_password_var(),
        }
    }
}

/// A value that must never be shown: `Debug` and `Display` print `<redacted>`,
/// it does not serialize, and its bytes are overwritten when it is dropped (best
/// effort: copies made by the allocator or the OS are beyond reach).
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    #[must_use]
    pub fn new(value: String) -> Self {
        Self(value)
    }
    /// The value, for the one place that must send it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&bytes);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A UFM login read from its [`Credentials`] source.
#[derive(Debug)]
pub struct Login {
    /// The user (not secret: it appears in messages).
    pub user: String,
    /// The password.
    pub password: Secret,
}

/// Why a [`UfmSm`](crate::ufm::UfmSm) could not be built. Never carries a
/// password.
#[derive(Debug, thiserror::Error)]
pub enum UfmSetupError {
    /// The URL is not `https://host[:port][/prefix]`.
    #[error("UFM url {url:?} is not usable: {why}. Hint: write it as https://<ufm-host>[:port]")]
    Url {
        /// The URL as configured, as [`shown_url`] shows it (never a password).
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The CA file could not be read or holds no certificate.
    #[error(
        "UFM CA file {path}: {why}. Hint: give a PEM file with the CA certificate that signed UFM's server certificate"
    )]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// Both a CA file and `insecure_skip_verify` were given.
    #[error(
        "UFM ca_file and insecure_skip_verify = true are both set. Hint: remove insecure_skip_verify; with a CA file, verification works"
    )]
    Contradiction,
    /// The credentials could not be read.
    #[error("UFM credentials from {source_desc}: {why}. Hint: {hint}")]
    Credentials {
        /// Which source (a path or variable names, never a value).
        source_desc: String,
        /// What went wrong.
        why: String,
        /// What to do.
        hint: String,
    },
    /// A number is outside its bounds.
    #[error("UFM {field} = {value} is out of range. Hint: give {min} to {max}; {hint}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The least allowed.
        min: u64,
        /// The most allowed.
        max: u64,
        /// Why the bound, or the default.
        hint: &'static str,
    },
    /// Timeouts and retries that together let one call take too long.
    #[error(
        "UFM timeout_ms, retries and retry_backoff_ms let one call take up to {worst_ms} ms, more than {max_ms}. Hint: lower retries or timeout_ms; a command waits that long for an unreachable UFM"
    )]
    TooSlow {
        /// The worst case, in milliseconds.
        worst_ms: u64,
        /// The bound.
        max_ms: u64,
    },
    /// The HTTP client could not be set up.
    #[error("UFM client setup failed: {why}. Hint: {hint}")]
    Client {
        /// What went wrong.
        why: String,
        /// What to do.
        hint: String,
    },
}

impl Credentials {
    /// Reads the login from this source (the process environment for `Env`).
    ///
    /// # Errors
    /// [`UfmSetupError::Credentials`]: the file is missing, unreadable, readable by
    /// others, or not `user:password`; a variable is unset or empty.
    pub fn load(&self) -> Result<Login, UfmSetupError> {
        self.load_with(&|name| std::env::var(name).ok())
    }

    /// As [`load`](Self::load), with `env` standing for the process environment.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Login, UfmSetupError> {
        match self {
            Credentials::File { path } => load_file(path),
            Credentials::Env {
                user_var,
                password_var,
            } => {
                let desc = format!("environment variables {user_var} and {password_var}");
                let get = |var: &str| {
                    env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                        UfmSetupError::Credentials {
                            source_desc: desc.clone(),
                            why: format!("{var} is not set or empty"),
                            hint: format!(
                                "set {user_var} and {password_var} in devfence's environment, or use credentials = {{ source = \"file\", path = \"…\" }}"
                            ),
                        }
                    })
                };
                let user = get(user_var)?;
                let password = Secret::new(get(password_var)?);
                Ok(Login { user, password })
            }
        }
    }
}

fn load_file(path: &Path) -> Result<Login, UfmSetupError> {
    let fail = |why: String, hint: &str| UfmSetupError::Credentials {
        source_desc: format!("file {}", path.display()),
        why,
        hint: hint.into(),
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        fail(
            format!("cannot read it: {e}"),
            "create it with one line `user:password`, owned by devfence's user, mode 0600",
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o007 != 0 {
            return Err(fail(
                format!("it is accessible to others (mode {:04o})", mode & 0o7777),
                "chmod o-rwx the file (0600, or 0640 for a service group)",
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let bytes = read_regular_capped(path, MAX_CREDENTIALS_BYTES).map_err(|why| {
        fail(
            why,
            "give a regular file with one line `user:password` (check the file's owner and mode)",
        )
    })?;
    let text = Secret::new(String::from_utf8(bytes).map_err(|_| {
        fail(
            "it is not UTF-8 text".into(),
            "write one line `user:password`",
        )
    })?);
    let line = text.expose().lines().next().unwrap_or("");
    let line = line.strip_suffix('\r').unwrap_or(line);
    let Some((user, password)) = line.split_once(':') else {
        return Err(fail(
            "its first line is not `user:password`".into(),
            "write one line `user:password`",
        ));
    };
    if user.is_empty() || password.is_empty() {
        return Err(fail(
            "the user or the password is empty".into(),
            "write one line `user:password`",
        ));
    }
    Ok(Login {
        user: user.to_string(),
        password: Secret::new(password.to_string()),
    })
}

/// Encodes `bytes` as standard base64 (with padding), for the basic-auth header.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_shows() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(s.expose(), "hunter2");
        let l = Login {
            user: "admin".into(),
            password: Secret::new("hunter2".into()),
        };
        let d = format!("{l:?}");
        assert!(d.contains("admin") && !d.contains("hunter2"), "{d}");
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("admin:123456", "YWRtaW46MTIzNDU2"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
    }

    #[test]
    fn toml_example_deserializes_and_unknown_fields_are_refused() {
        let c: UfmConfig = toml::from_str(
            r#"
url = "https://ufm.example.net"
ca_file = "/etc/devfence/ufm-ca.pem"
credentials = { source = "file", path = "/etc/devfence/ufm.credentials" }
managed_pkeys = ["0x0001", "0x8002"]
timeout_ms = 10000
connect_timeout_ms = 5000
retries = 2
retry_backoff_ms = 250
"#,
        )
        .expect("example parses");
        assert_eq!(c.managed_pkeys.len(), 2);
        assert_eq!(c.managed_pkeys[1].base(), 2);
        assert!(!c.insecure_skip_verify && !c.trust_configured_view && c.ip_over_ib);
        assert_eq!(
            c.credentials,
            Credentials::File {
                path: "/etc/devfence/ufm.credentials".into()
            }
        );
        let d: UfmConfig = toml::from_str("url = \"https://u\"").expect("defaults");
        assert_eq!(d, UfmConfig::new("https://u"));
        assert_eq!(d.credentials, Credentials::default());
        let e: UfmConfig = toml::from_str(
            "url = \"https://u\"\ncredentials = { source = \"env\", user_var = \"U\" }",
        )
        .expect("env");
        assert_eq!(
            e.credentials,
            Credentials::Env {
                user_var: "U".into(),
                password_var: DEFAULT_PASSWORD_VAR.into()
            }
        );
        for bad in [
            "url = \"https://u\"\ninsecure_skip_verfy = true",
            "url = \"https://u\"\nmanaged_pkeys = [\"0x7fff\"]",
            "url = \"https://u\"\ncredentials = { source = \"file\" }",
            "url = \"https://u\"\ncredentials = { source = \"env\", password = \"x\" }",
        ] {
            assert!(toml::from_str::<UfmConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_credentials() {
        let env = |k: &str| match k {
            "DEVFENCE_UFM_USER" => Some("admin".to_string()),
            "DEVFENCE_UFM_PASSWORD" => Some("s3cret-pw".to_string()),
            _ => None,
        };
        let l = Credentials::default().load_with(&env).expect("loads");
        assert_eq!(l.user, "admin");
        assert_eq!(l.password.expose(), "s3cret-pw");
        let e = Credentials::Env {
            user_var: "DEVFENCE_UFM_USER".into(),
            password_var: "NOPE".into(),
        }
        .load_with(&env)
        .expect_err("unset");
        let s = e.to_string();
        assert!(s.contains("NOPE is not set") && s.contains("Hint:"), "{s}");
        assert!(!s.contains("s3cret-pw") && !format!("{e:?}").contains("s3cret-pw"));
    }

    /// issue 18 item 10: a URL with `user:password@` is refused when the
    /// configuration is loaded, and neither the error nor `Debug` shows the
    /// password — plain or percent-encoded.
    #[test]
    fn userinfo_in_the_url_is_refused_without_showing_the_password() {
        for url in [
            "https://admin:Hunter2-pw@ufm.example",
            "https://admin:Hunter2%2Dpw@ufm.example:8443/prefix",
            "https://Hunter2-pw@ufm.example",
            "https://admin:Hunter2-pw@ufm.example?token=Hunter2-pw#Hunter2-pw",
            "https://admin:Hunter2@pw@ufm.example",
        ] {
            let c = UfmConfig::new(url);
            let e = c.validate().expect_err(url);
            let shown = format!("{e}\n{e:?}\n{c:?}");
            assert!(!shown.contains("Hunter2"), "{url}: {shown}");
            assert!(e.to_string().contains("credentials"), "{e}");
            assert!(e.to_string().contains("Hint:"), "{e}");
            assert!(e.to_string().contains("ufm.example"), "{e}");
        }
        assert_eq!(
            shown_url("https://a:b@ufm/p?q=1"),
            "https://<userinfo removed>@ufm/p?<query removed>"
        );
        assert_eq!(shown_url("https://ufm:443/x"), "https://ufm:443/x");
        UfmConfig::new("https://ufm.example")
            .validate()
            .expect("plain url");
    }

    /// issue 18 item 12: `retries`, `retry_backoff_ms` and the timeouts have
    /// upper bounds (a huge `retries` hung `status`), refused with the field named.
    #[test]
    fn retries_backoff_and_timeouts_are_bounded() {
        let ok = UfmConfig::new("https://u");
        ok.validate().expect("defaults");
        type Set = fn(&mut UfmConfig);
        let cases: [(&str, Set); 6] = [
            ("retries = 6", |c| c.retries = MAX_RETRIES + 1),
            ("retries = 4294967295", |c| c.retries = u32::MAX),
            ("retry_backoff_ms = 5001", |c| c.retry_backoff_ms = 5001),
            ("timeout_ms = 0", |c| c.timeout_ms = 0),
            ("timeout_ms = 18446744073709551615", |c| {
                c.timeout_ms = u64::MAX
            }),
            ("connect_timeout_ms = 60001", |c| {
                c.connect_timeout_ms = 60_001
            }),
        ];
        for (want, set) in cases {
            let mut c = ok.clone();
            set(&mut c);
            let e = c.validate().expect_err(want);
            let s = e.to_string();
            assert!(s.contains(want) && s.contains("out of range"), "{s}");
            assert!(s.contains("Hint: give "), "{s}");
        }
        let mut edge = ok.clone();
        edge.retries = MAX_RETRIES;
        edge.retry_backoff_ms = MAX_RETRY_BACKOFF_MS;
        edge.validate().expect("the bounds themselves are allowed");
        assert_eq!(ok.worst_call_ms(), 3 * 10_000 + 250 + 500);
        // Each within its bound, together too slow.
        let mut slow = ok.clone();
        slow.retries = MAX_RETRIES;
        slow.timeout_ms = MAX_TIMEOUT_MS;
        let s = slow.validate().expect_err("too slow").to_string();
        assert!(s.contains("up to 725750 ms") && s.contains("Hint:"), "{s}");
    }

    /// issue 18 item 6: a file the UFM backend reads is read only if it is a
    /// regular file, and only up to a cap: `/dev/zero`, a FIFO (which would block
    /// an ordinary open) and an oversized file are refused at once.
    #[cfg(unix)]
    #[test]
    fn files_are_read_only_when_regular_and_small() {
        let dir = tempfile::tempdir().expect("tmp");
        let e = read_regular_capped(Path::new("/dev/zero"), 1024).expect_err("device");
        assert!(e.contains("not a regular file"), "{e}");
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .expect("mkfifo");
        let e = read_regular_capped(&fifo, 1024).expect_err("fifo");
        assert!(e.contains("not a regular file"), "{e}");
        let e = read_regular_capped(dir.path(), 1024).expect_err("dir");
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 2048]).expect("write");
        let e = read_regular_capped(&big, 1024).expect_err("big");
        assert!(e.contains("2048 bytes, more than the 1024"), "{e}");
        assert_eq!(read_regular_capped(&big, 2048).expect("fits").len(), 2048);
        // Through the credentials source too, with a hint.
        for p in [PathBuf::from("/dev/zero"), fifo] {
            let e = Credentials::File { path: p.clone() }.load();
            let s = e.expect_err("refused").to_string();
            assert!(
                s.contains("not a regular file") || s.contains("accessible to others"),
                "{}: {s}",
                p.display()
            );
        }
        let cred = dir.path().join("cred");
        std::fs::write(&cred, vec![b'a'; 8192]).expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let s = Credentials::File { path: cred }
            .load()
            .expect_err("big")
            .to_string();
        assert!(
            s.contains("more than the 4096") && s.contains("Hint:"),
            "{s}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn file_credentials_and_their_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("cred");
        let set = |text: &str, mode: u32| {
            std::fs::write(&p, text).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        let src = Credentials::File { path: p.clone() };
        set("admin:pa:ss\n", 0o600);
        let l = src.load().expect("loads");
        assert_eq!((l.user.as_str(), l.password.expose()), ("admin", "pa:ss"));
        set("admin:pa:ss\r\nignored\n", 0o640);
        assert_eq!(src.load().expect("group ok").password.expose(), "pa:ss");
        set("admin:topsecret\n", 0o644);
        let e = src.load().expect_err("world readable");
        let s = e.to_string();
        assert!(s.contains("accessible to others (mode 0644)"), "{s}");
        assert!(!s.contains("topsecret") && !format!("{e:?}").contains("topsecret"));
        for bad in ["adminonly\n", ":pw\n", "admin:\n", ""] {
            set(bad, 0o600);
            let e = src.load().expect_err(bad);
            assert!(e.to_string().contains("user:password"), "{bad}: {e}");
        }
        let missing = Credentials::File {
            path: dir.path().join("absent"),
        };
        assert!(
            missing
                .load()
                .expect_err("missing")
                .to_string()
                .contains("cannot read it")
        );
    }
}
