//! `[fleet]` in devfence.toml: where the fleet's shared facts live.
//!
//! ```toml
//! [fleet]
//! backend = "etcd"
//! endpoints = ["https://etcd1.example:2379", "https://etcd2.example:2379", "https://etcd3.example:2379"]
//! ca = "/etc/devfence/etcd-ca.pem"     # verifies the members (required for https)
//! cert = "/etc/devfence/etcd-client.pem"
//! key = "/etc/devfence/etcd-client-key.pem"
//! prefix = "devfence"
//! fabric = "ib0"
//! timeout_ms = 5000
//! lease_ttl_s = 15
//! ```
//!
//! TLS is verified by default: an `https://` endpoint needs `ca`. A plaintext
//! `http://` endpoint is accepted only with `insecure_plaintext = true`, and
//! even then only on a loopback host (a test cluster); anything else is refused.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::value::Name;

/// The only fleet backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FleetBackend {
    /// etcd v3 (3.4 or later).
    Etcd,
}

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "devfence";
/// The default deadline of one fleet operation, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// The default TTL of a host's lease, in seconds.
pub const DEFAULT_LEASE_TTL_S: u64 = 15;
/// The default batching window of the fabric controller, in milliseconds.
pub const DEFAULT_BATCH_WINDOW_MS: u64 = 50;
/// The longest batching window `[fleet] batch_window_ms` may give.
pub const MAX_BATCH_WINDOW_MS: u64 = 10_000;
/// The most endpoints `[fleet]` may list.
pub const MAX_ENDPOINTS: usize = 16;

/// `[fleet]`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// `"etcd"` (required).
    #[serde(default)]
    pub backend: Option<FleetBackend>,
    /// The members' client URLs.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The CA that signed the members' certificates (PEM).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The client certificate (PEM).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The client key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Accept `http://` endpoints on a loopback host (tests only).
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// The key prefix (default `devfence`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// This host's fabric (required).
    #[serde(default)]
    pub fabric: Option<String>,
    /// The deadline of one operation, in milliseconds (default 5000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The TTL of this host's lease, in seconds (default 15).
    #[serde(default)]
    pub lease_ttl_s: Option<u64>,
    /// The fabric controller's batching window, in milliseconds (default 50).
    #[serde(default)]
    pub batch_window_ms: Option<u64>,
    /// This host's name in the fleet (a host agent's; `[fabric] backend =
    /// "fleet"` needs it).
    #[serde(default)]
    pub host: Option<String>,
}

/// A checked `[fleet]`: what [`crate::Fleet::connect`] takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSettings {
    /// The members' client URLs (all `https://`, or all loopback `http://`).
    pub endpoints: Vec<String>,
    /// The TLS files; `None` for loopback plaintext.
    pub tls: Option<TlsFiles>,
    /// The key prefix.
    pub prefix: Name,
    /// The fabric.
    pub fabric: Name,
    /// The deadline of one operation.
    pub timeout: Duration,
    /// A host's lease TTL (and the fabric controller's).
    pub lease_ttl: Duration,
    /// How long the fabric controller waits after the first change it sees
    /// before it applies, to fold more into the same apply and sweep.
    pub batch_window: Duration,
}

/// The TLS files (paths only: the key's content is read when connecting and
/// never shown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA (PEM).
    pub ca: PathBuf,
    /// The client certificate and key (PEM), if the members ask for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl FleetSettings {
    /// Settings for loopback plaintext endpoints (tests), default timeouts.
    ///
    /// # Errors
    /// As [`FleetConfig::check`].
    pub fn plaintext(endpoints: Vec<String>, prefix: &str, fabric: &str) -> Result<Self, String> {
        FleetConfig {
            backend: Some(FleetBackend::Etcd),
            endpoints,
            insecure_plaintext: true,
            prefix: Some(prefix.into()),
            fabric: Some(fabric.into()),
            ..FleetConfig::default()
        }
        .check()
    }
}

/// Splits `scheme://host:port` into its parts; nothing else (no path, no
/// user info) is accepted.
fn split_endpoint(e: &str) -> Result<(&str, &str, u16), String> {
    let (scheme, rest) = e
        .split_once("://")
        .ok_or_else(|| format!("endpoint {e:?} has no scheme. Hint: write https://HOST:PORT"))?;
    if rest.contains(['/', '@', '?', '#']) {
        return Err(format!(
            "endpoint {e:?} has a path or user info. Hint: write only https://HOST:PORT"
        ));
    }
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r.split_once("]:").ok_or_else(|| {
            format!("endpoint {e:?} has no port. Hint: write https://[ADDR]:PORT")
        })?;
        (h, p)
    } else {
        rest.rsplit_once(':')
            .ok_or_else(|| format!("endpoint {e:?} has no port. Hint: write https://HOST:PORT"))?
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("endpoint {e:?} has no valid port (1-65535)"))?;
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b))
    {
        return Err(format!("endpoint {e:?} has no valid host"));
    }
    Ok((scheme, host, port))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
}

impl FleetConfig {
    /// Checks the section and resolves the defaults.
    ///
    /// # Errors
    /// The first value refused, with a hint (values are shown, except file
    /// contents: `[fleet]` holds paths, not secrets).
    pub fn check(&self) -> Result<FleetSettings, String> {
        if self.backend.is_none() {
            return Err(
                "backend is missing. Hint: backend = \"etcd\" (the only fleet backend)".into(),
            );
        }
        if let Some(h) = &self.host {
            h.parse::<Name>().map_err(|e| {
                format!(
                    "host {h:?}: {e}. Hint: a name of [A-Za-z0-9._-], as the fleet knows this host"
                )
            })?;
        }
        if self.endpoints.is_empty() {
            return Err(
                "endpoints is empty. Hint: list the etcd members' client URLs, e.g. endpoints = [\"https://etcd1:2379\"]"
                    .into(),
            );
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(format!(
                "endpoints lists {} URLs, more than {MAX_ENDPOINTS}",
                self.endpoints.len()
            ));
        }
        let mut plaintext = 0;
        for e in &self.endpoints {
            let (scheme, host, _) = split_endpoint(e)?;
            match scheme {
                "https" => {}
                "http" if !self.insecure_plaintext => {
                    return Err(format!(
                        "endpoint {e:?} is plaintext. Hint: use https:// with ca (and cert/key); plaintext is for a loopback test cluster only, with insecure_plaintext = true"
                    ));
                }
                "http" if !is_loopback(host) => {
                    return Err(format!(
                        "endpoint {e:?} is plaintext to a host that is not loopback: refused even with insecure_plaintext = true. Hint: use https:// with ca"
                    ));
                }
                "http" => plaintext += 1,
                _ => {
                    return Err(format!(
                        "endpoint {e:?} has the scheme {scheme:?}. Hint: https:// (or http:// on loopback with insecure_plaintext = true)"
                    ));
                }
            }
        }
        if plaintext != 0 && plaintext != self.endpoints.len() {
            return Err(
                "endpoints mix http:// and https://. Hint: use https:// for every member".into(),
            );
        }
        let tls = if plaintext == 0 {
            let ca = self.ca.clone().ok_or(
                "https endpoints need ca (the CA that signed the members' certificates). Hint: ca = \"/etc/devfence/etcd-ca.pem\"; TLS is never used unverified",
            )?;
            let identity = match (&self.cert, &self.key) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                (None, None) => None,
                _ => {
                    return Err(
                        "cert and key go together. Hint: give both (the client certificate and its key) or neither"
                            .into(),
                    );
                }
            };
            Some(TlsFiles { ca, identity })
        } else {
            if self.ca.is_some() || self.cert.is_some() || self.key.is_some() {
                return Err(
                    "ca, cert and key are for https:// endpoints, but the endpoints are http://. Hint: use https://"
                        .into(),
                );
            }
            None
        };
        let prefix: Name = self
            .prefix
            .as_deref()
            .unwrap_or(DEFAULT_PREFIX)
            .parse()
            .map_err(|e| format!("prefix: {e}"))?;
        let fabric: Name = self
            .fabric
            .as_deref()
            .ok_or("fabric is missing. Hint: name the fabric this host's ports are on, e.g. fabric = \"ib0\"")?
            .parse()
            .map_err(|e| format!("fabric: {e}"))?;
        let timeout_ms = self.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        if !(100..=60_000).contains(&timeout_ms) {
            return Err(format!(
                "timeout_ms = {timeout_ms} is out of range. Hint: give 100 to 60000 (the default is {DEFAULT_TIMEOUT_MS})"
            ));
        }
        let ttl = self.lease_ttl_s.unwrap_or(DEFAULT_LEASE_TTL_S);
        if !(2..=300).contains(&ttl) {
            return Err(format!(
                "lease_ttl_s = {ttl} is out of range. Hint: give 2 to 300 (the default is {DEFAULT_LEASE_TTL_S})"
            ));
        }
        let window = self.batch_window_ms.unwrap_or(DEFAULT_BATCH_WINDOW_MS);
        if window > MAX_BATCH_WINDOW_MS {
            return Err(format!(
                "batch_window_ms = {window} is out of range. Hint: give 0 to {MAX_BATCH_WINDOW_MS} (the default is {DEFAULT_BATCH_WINDOW_MS}); every change waits up to this long for others to share its sweep"
            ));
        }
        Ok(FleetSettings {
            endpoints: self.endpoints.clone(),
            tls,
            prefix,
            fabric,
            timeout: Duration::from_millis(timeout_ms),
            lease_ttl: Duration::from_secs(ttl),
            batch_window: Duration::from_millis(window),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoints: &[&str]) -> FleetConfig {
        FleetConfig {
            backend: Some(FleetBackend::Etcd),
            endpoints: endpoints.iter().map(|s| (*s).to_string()).collect(),
            ca: Some("/ca.pem".into()),
            fabric: Some("ib0".into()),
            ..FleetConfig::default()
        }
    }

    #[test]
    fn tls_is_verified_by_default_and_plaintext_only_on_loopback() {
        let s = cfg(&["https://etcd1:2379", "https://[fd00::1]:2379"])
            .check()
            .expect("https with a ca");
        assert_eq!(s.prefix.as_str(), "devfence");
        assert!(s.tls.is_some());
        let mut c = cfg(&["https://etcd1:2379"]);
        c.ca = None;
        assert!(c.check().expect_err("no ca").contains("need ca"));
        let mut c = cfg(&["http://127.0.0.1:2379"]);
        c.ca = None;
        assert!(
            c.check()
                .expect_err("plain")
                .contains("insecure_plaintext = true")
        );
        c.insecure_plaintext = true;
        assert!(c.check().expect("loopback plaintext").tls.is_none());
        let mut c = cfg(&["http://10.0.0.1:2379"]);
        c.ca = None;
        c.insecure_plaintext = true;
        assert!(
            c.check()
                .expect_err("remote plaintext")
                .contains("not loopback")
        );
        let mut c = cfg(&["https://e:2379"]);
        c.cert = Some("/c.pem".into());
        assert!(c.check().expect_err("cert alone").contains("go together"));
    }

    #[test]
    fn bad_values_are_named_with_a_hint() {
        for (c, want) in [
            (cfg(&["etcd1:2379"]), "no scheme"),
            (cfg(&["https://u:p@etcd1:2379"]), "user info"),
            (cfg(&["https://etcd1"]), "no port"),
            (cfg(&["https://etcd1:0"]), "valid port"),
            (cfg(&["ftp://etcd1:21"]), "scheme \"ftp\""),
            (cfg(&[]), "endpoints is empty"),
        ] {
            let e = c.check().expect_err(want);
            assert!(e.contains(want), "{e}");
        }
        let mut c = cfg(&["https://e:1"]);
        c.fabric = Some("a/b".into());
        assert!(c.check().expect_err("fabric").contains("fabric: "));
        c.fabric = None;
        assert!(
            c.check()
                .expect_err("no fabric")
                .contains("fabric is missing")
        );
        let mut c = cfg(&["https://e:1"]);
        c.timeout_ms = Some(0);
        assert!(c.check().expect_err("timeout").contains("timeout_ms = 0"));
        let mut c = cfg(&["https://e:1"]);
        assert_eq!(
            c.check().expect("default").batch_window,
            Duration::from_millis(DEFAULT_BATCH_WINDOW_MS)
        );
        c.batch_window_ms = Some(10_001);
        assert!(
            c.check()
                .expect_err("window")
                .contains("batch_window_ms = 10001")
        );
        let mut c = cfg(&["https://e:1"]);
        c.backend = None;
        assert!(
            c.check()
                .expect_err("backend")
                .contains("backend is missing")
        );
    }
}
