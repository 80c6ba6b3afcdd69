//! The HTTPS client of the UFM backend: one blocking `ureq` agent with rustls,
//! basic auth, a per-request timeout and bounded retries.
//!
//! What is repeated, and what is not:
//!
//! | outcome | repeated | error |
//! |---|---|---|
//! | 2xx | — | — (an HTML body is [`FabricError::Malformed`]) |
//! | 5xx, 408, 429 | yes, `retries` times | [`FabricError::Unreachable`] |
//! | timeout (connect or answer) | yes | [`FabricError::Timeout`] |
//! | connection refused/reset, DNS | yes | [`FabricError::Unreachable`] |
//! | TLS: untrusted certificate, handshake | no | [`FabricError::Unreachable`] |
//! | 401, 403 | no | [`FabricError::Refused`] ("check the credentials") |
//! | other 4xx, 3xx (redirects are not followed) | no | [`FabricError::Refused`] |
//! | body over 16 MiB, not HTTP | no | [`FabricError::Malformed`] |
//!
//! Both UFM calls devfence makes that change anything (add GUIDs to a P_Key,
//! remove GUIDs from one) are idempotent, so repeating a POST whose answer was
//! lost is safe.
//!
//! No error quotes an answer (a UFM or a proxy may echo a secret in an encoding
//! no redaction knows): a refused answer is described by its status, content
//! type and length. Every error also passes through [`Client::scrub`] before it
//! leaves: the password and the `Authorization` value are replaced by
//! `<redacted>` wherever anything else could carry them.

use std::sync::Arc;
use std::time::Duration;

use ureq::Agent;
use ureq::tls::{PemItem, RootCerts, TlsConfig, TlsProvider};

use super::config::{
    Login, MAX_CA_FILE_BYTES, Secret, UfmConfig, UfmSetupError, base64, read_regular_capped,
    shown_url,
};
use super::decode::{MAX_RESPONSE_BYTES, html, malformed};
use crate::FabricError;

const BACKEND: &str = "ufm";

/// One HTTP method devfence uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

/// A failed attempt: repeat it, or give up at once.
enum Attempt {
    Retry(FabricError),
    Final(FabricError),
}

pub(crate) struct Client {
    agent: Agent,
    base: String,
    user: String,
    auth: Secret,
    password: Secret,
    retries: u32,
    backoff: Duration,
    timeout: Duration,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("user", &self.user)
            .field("auth", &self.auth)
            .field("retries", &self.retries)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Checks `url` and returns it without a trailing `/`.
pub(crate) fn check_url(url: &str) -> Result<String, UfmSetupError> {
    let bad = |why: &str| UfmSetupError::Url {
        url: shown_url(url),
        why: why.to_string(),
    };
    let lower = url.to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &url["https://".len()..]
    } else if lower.starts_with("http://") {
        return Err(bad(
            "plain http would send the UFM password in clear; use https",
        ));
    } else {
        return Err(bad("it does not start with https://"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(bad(
            "it carries credentials (user:password@host); put them in the credentials source instead (the password is not shown here)",
        ));
    }
    if authority.is_empty() {
        return Err(bad("it names no host"));
    }
    if url.contains(['?', '#']) || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it holds a query, a fragment or blanks"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

fn load_roots(path: &std::path::Path) -> Result<RootCerts, UfmSetupError> {
    let fail = |why: String| UfmSetupError::CaFile {
        path: path.to_path_buf(),
        why,
    };
    let pem = read_regular_capped(path, MAX_CA_FILE_BYTES).map_err(fail)?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(fail(format!("it is not valid PEM: {e}"))),
        }
    }
    if certs.is_empty() {
        return Err(fail("it holds no CERTIFICATE block".into()));
    }
    // ureq skips certificates it cannot parse; refuse them here instead, so a
    // broken CA file is a setup error and not a mysterious "untrusted" later.
    let mut store = rustls::RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        store
            .add(rustls::pki_types::CertificateDer::from(c.der().to_vec()))
            .map_err(|e| fail(format!("certificate {} is not usable as a CA: {e}", i + 1)))?;
    }
    Ok(RootCerts::Specific(Arc::new(certs)))
}

impl Client {
    pub(crate) fn new(cfg: &UfmConfig, login: Login) -> Result<Self, UfmSetupError> {
        cfg.validate()?;
        let base = check_url(&cfg.url)?;
        if cfg.insecure_skip_verify && cfg.ca_file.is_some() {
            return Err(UfmSetupError::Contradiction);
        }
        let roots = match &cfg.ca_file {
            Some(p) => load_roots(p)?,
            None => RootCerts::WebPki,
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(roots)
            .disable_verification(cfg.insecure_skip_verify)
            .build();
        let timeout = cfg.timeout();
        let connect_timeout = cfg.connect_timeout();
        let config = Agent::config_builder()
            .tls_config(tls)
            .https_only(true)
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .proxy(None)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(connect_timeout))
            .user_agent(concat!("devfence/", env!("CARGO_PKG_VERSION")))
            .build();
        let header = base64(format!("{}:{}", login.user, login.password.expose()).as_bytes());
        Ok(Self {
            agent: Agent::new_with_config(config),
            base,
            auth: Secret::new(format!("Basic {header}")),
            user: login.user,
            password: login.password,
            retries: cfg.retries,
            backoff: Duration::from_millis(cfg.retry_backoff_ms),
            timeout,
            connect_timeout,
        })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`; the body of a 2xx answer.
    pub(crate) fn get(&self, path: &str) -> Result<Vec<u8>, FabricError> {
        self.call(Method::Get, path, &[])
    }

    /// `POST path` with a JSON body; the body of a 2xx answer.
    pub(crate) fn post(&self, path: &str, json: &[u8]) -> Result<Vec<u8>, FabricError> {
        self.call(Method::Post, path, json)
    }

    /// `DELETE path`; the body of a 2xx answer.
    pub(crate) fn delete(&self, path: &str) -> Result<Vec<u8>, FabricError> {
        self.call(Method::Delete, path, &[])
    }

    fn call(&self, method: Method, path: &str, body: &[u8]) -> Result<Vec<u8>, FabricError> {
        let op = format!("{} {path}", method.name());
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            match self.once(method, path, body, &op) {
                Ok(b) => return Ok(b),
                Err(Attempt::Final(e)) => return Err(self.scrub(e)),
                Err(Attempt::Retry(e)) => {
                    if attempt > self.retries {
                        return Err(self.scrub(exhausted(e, attempt)));
                    }
                    let factor = 1u32 << (attempt - 1).min(3);
                    std::thread::sleep(self.backoff.saturating_mul(factor));
                }
            }
        }
    }

    fn once(&self, method: Method, path: &str, body: &[u8], op: &str) -> Result<Vec<u8>, Attempt> {
        let url = format!("{}{path}", self.base);
        let sent = match method {
            Method::Get => self
                .agent
                .get(&url)
                .header("Authorization", self.auth.expose())
                .header("Accept", "application/json")
                .call(),
            Method::Post => self
                .agent
                .post(&url)
                .header("Authorization", self.auth.expose())
                .header("Accept", "application/json")
                .content_type("application/json")
                .send(body),
            Method::Delete => self
                .agent
                .delete(&url)
                .header("Authorization", self.auth.expose())
                .header("Accept", "application/json")
                .call(),
        };
        let mut resp = sent.map_err(|e| self.transport(op, e))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let location = header("location");
        if !(200..300).contains(&status) {
            // Never quoted (an answer may echo a secret in any encoding): its
            // content type and length are what the operator gets.
            let len = resp
                .body_mut()
                .with_config()
                .limit(MAX_QUOTED_LENGTH)
                .read_to_vec()
                .map_or_else(
                    |_| format!("more than {MAX_QUOTED_LENGTH} bytes"),
                    |b| format!("{} bytes", b.len()),
                );
            let said = format!("{}, {len}", shown_content_type(&content_type));
            return Err(self.status(op, status, location.as_deref(), &said));
        }
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES as u64)
            .read_to_vec()
            .map_err(|e| self.transport(op, e))?;
        let bytes = self.redact(bytes);
        if content_type.starts_with("text/html") {
            return Err(Attempt::Final(html(op, &bytes)));
        }
        Ok(bytes)
    }

    /// The secrets devfence sends, in every form an answer could echo them.
    fn secrets(&self) -> [&str; 3] {
        let auth = self.auth.expose();
        [
            auth,
            auth.strip_prefix("Basic ").unwrap_or(auth),
            self.password.expose(),
        ]
    }

    /// Replaces every secret in an answer by `<redacted>` before anything quotes it.
    fn redact(&self, body: Vec<u8>) -> Vec<u8> {
        let mut body = body;
        for secret in self.secrets() {
            body = replace_bytes(body, secret.as_bytes(), b"<redacted>");
        }
        body
    }

    fn status(&self, op: &str, status: u16, location: Option<&str>, said: &str) -> Attempt {
        let says = format!(" ({said}; the answer is not quoted)");
        let refused = |detail: String, hint: &str| {
            Attempt::Final(FabricError::Refused {
                backend: BACKEND.into(),
                detail,
                hint: hint.into(),
            })
        };
        match status {
            401 | 403 => refused(
                format!(
                    "{op} answered HTTP {status}: user {:?} was not let in{says}",
                    self.user
                ),
                "check the credentials file (or DEVFENCE_UFM_USER/DEVFENCE_UFM_PASSWORD) and that the UFM user may manage P_Keys",
            ),
            300..=399 => refused(
                format!(
                    "{op} answered HTTP {status}, a redirect to {:?}, which devfence does not follow",
                    location.map_or_else(|| "nowhere".to_string(), shown_location)
                ),
                "point `url` at the UFM REST API itself (a login page or proxy in between?)",
            ),
            404 | 405 => refused(
                format!("{op} answered HTTP {status}: no such UFM endpoint{says}"),
                "check `url` (https://<ufm-host>, no path unless UFM sits behind a proxy prefix) and that this UFM offers the /ufmRest P_Key API",
            ),
            408 | 429 | 500..=599 => Attempt::Retry(FabricError::Unreachable {
                backend: BACKEND.into(),
                detail: format!("{op} answered HTTP {status}{says}"),
                hint: "UFM is failing or overloaded; check its health and logs".into(),
            }),
            400..=499 => refused(
                format!("{op} answered HTTP {status}{says}"),
                "UFM refused the request; check that the partition exists and the GUIDs are valid in UFM",
            ),
            _ => Attempt::Final(malformed(
                format!("{op} answered HTTP {status}, which devfence does not expect{says}"),
                "check that `url` points at the UFM REST API",
            )),
        }
    }

    fn transport(&self, op: &str, e: ureq::Error) -> Attempt {
        let unreachable = |detail: String, hint: &str| FabricError::Unreachable {
            backend: BACKEND.into(),
            detail,
            hint: hint.into(),
        };
        let timeout = || FabricError::Timeout {
            backend: BACKEND.into(),
            op: op.to_string(),
            after: self.timeout,
            hint: format!(
                "UFM at {} did not answer in time (connect {:?}, whole request {:?}); check that it runs and is not overloaded, or raise timeout_ms",
                self.base, self.connect_timeout, self.timeout
            ),
        };
        if let Some(t) = tls_error(&e) {
            let (detail, hint) = match t {
                rustls::Error::InvalidCertificate(c) => (
                    format!("{op}: UFM's TLS certificate is not trusted ({c:?})"),
                    "set ca_file to the PEM of the CA that signed UFM's certificate, and check that the host in `url` is a name the certificate holds",
                ),
                other => (
                    format!("{op}: TLS handshake with {} failed ({other})", self.base),
                    "check that `url` is UFM's https endpoint and that UFM's TLS setup works (e.g. `openssl s_client`)",
                ),
            };
            return Attempt::Final(unreachable(detail, hint));
        }
        match e {
            ureq::Error::Timeout(_) => Attempt::Retry(timeout()),
            ureq::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                Attempt::Retry(timeout())
            }
            ureq::Error::Io(io) => Attempt::Retry(unreachable(
                format!("{op}: connection to {} failed ({io})", self.base),
                "check that UFM runs, the host and port in `url`, and the network path (firewall)",
            )),
            ureq::Error::HostNotFound => Attempt::Retry(unreachable(
                format!("{op}: the host of {} does not resolve", self.base),
                "check the host name in `url` and DNS",
            )),
            ureq::Error::ConnectionFailed => Attempt::Retry(unreachable(
                format!("{op}: connection to {} failed", self.base),
                "check that UFM runs, the host and port in `url`, and the network path (firewall)",
            )),
            ureq::Error::BodyExceedsLimit(n) => Attempt::Final(malformed(
                format!("{op}: the answer is larger than the {n} bytes devfence reads"),
                "check that `url` points at the UFM REST API",
            )),
            // Not quoted: a protocol error may carry bytes of the answer.
            ureq::Error::Protocol(_) => Attempt::Final(malformed(
                format!("{op}: the answer is not HTTP"),
                "check that `url` names UFM's https port",
            )),
            ureq::Error::LargeResponseHeader(n, max) => Attempt::Final(malformed(
                format!("{op}: the answer's header is too large ({n} > {max})"),
                "check that `url` points at the UFM REST API",
            )),
            other => Attempt::Final(unreachable(
                format!("{op}: {other}"),
                "check `url` and UFM's https endpoint",
            )),
        }
    }

    /// Replaces the password and the `Authorization` value wherever an error
    /// quotes them (an answer could echo what it was sent).
    pub(crate) fn scrub(&self, e: FabricError) -> FabricError {
        let clean = |s: String| -> String {
            let mut s = s;
            for secret in self.secrets() {
                if !secret.is_empty() && s.contains(secret) {
                    s = s.replace(secret, "<redacted>");
                }
            }
            s
        };
        match e {
            FabricError::Unreachable {
                backend,
                detail,
                hint,
            } => FabricError::Unreachable {
                backend,
                detail: clean(detail),
                hint: clean(hint),
            },
            FabricError::Refused {
                backend,
                detail,
                hint,
            } => FabricError::Refused {
                backend,
                detail: clean(detail),
                hint: clean(hint),
            },
            FabricError::Malformed {
                backend,
                detail,
                hint,
            } => FabricError::Malformed {
                backend,
                detail: clean(detail),
                hint: clean(hint),
            },
            FabricError::Timeout {
                backend,
                op,
                after,
                hint,
            } => FabricError::Timeout {
                backend,
                op: clean(op),
                after,
                hint: clean(hint),
            },
            other => other,
        }
    }
}

/// How much of a refused answer is read, to tell its length (never quoted).
const MAX_QUOTED_LENGTH: u64 = 64 << 10;

/// A content type as an error names it: a MIME type's characters only, short.
fn shown_content_type(ct: &str) -> String {
    let main = ct.split(';').next().unwrap_or("").trim();
    if main.is_empty() {
        return "no content type".into();
    }
    if main.len() > 64
        || !main
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/.+-_".contains(&b))
    {
        return "an unreadable content type".into();
    }
    format!("content type {main}")
}

/// A redirect target as an error names it: the path only (no query, no
/// userinfo, at most 80 characters of URL characters).
fn shown_location(l: &str) -> String {
    let l = l.split(['?', '#']).next().unwrap_or("");
    let l = match l.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit('@').next().unwrap_or("");
            format!("{scheme}://{host}{path}")
        }
        None => l.to_string(),
    };
    if l.len() > 80
        || !l
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/.:-_~[]".contains(&b))
    {
        return "an unreadable location".into();
    }
    l
}

/// `haystack` with every `needle` replaced by `with`.
fn replace_bytes(haystack: Vec<u8>, needle: &[u8], with: &[u8]) -> Vec<u8> {
    if needle.is_empty() || !haystack.windows(needle.len()).any(|w| w == needle) {
        return haystack;
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// Says how many attempts a retryable failure took.
fn exhausted(e: FabricError, attempts: u32) -> FabricError {
    let tail = if attempts == 1 {
        " (1 attempt: retries = 0)".to_string()
    } else {
        format!(" (gave up after {attempts} attempts)")
    };
    match e {
        FabricError::Unreachable {
            backend,
            detail,
            hint,
        } => FabricError::Unreachable {
            backend,
            detail: detail + &tail,
            hint,
        },
        FabricError::Timeout {
            backend,
            op,
            after,
            hint,
        } => FabricError::Timeout {
            backend,
            op: op + &tail,
            after,
            hint,
        },
        other => other,
    }
}

/// The rustls error inside a ureq error, if any.
fn tls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            check_url("https://ufm.example/").expect("ok"),
            "https://ufm.example"
        );
        assert_eq!(
            check_url("HTTPS://ufm:8443/prefix/").expect("ok"),
            "HTTPS://ufm:8443/prefix"
        );
        for (bad, why) in [
            ("http://ufm", "in clear"),
            ("ufm.example", "https://"),
            ("https://", "no host"),
            ("https:///x", "no host"),
            ("https://admin:pw@ufm", "carries credentials"),
            ("https://ufm/?a=1", "query"),
            ("https://ufm /", "blanks"),
        ] {
            let e = check_url(bad).expect_err(bad);
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(e.to_string().contains("Hint:"));
        }
    }

    #[test]
    fn replace_bytes_replaces_every_occurrence() {
        assert_eq!(
            replace_bytes(b"a-pw-b-pw".to_vec(), b"pw", b"<r>"),
            b"a-<r>-b-<r>"
        );
        assert_eq!(replace_bytes(b"abc".to_vec(), b"", b"x"), b"abc");
        assert_eq!(replace_bytes(b"abc".to_vec(), b"zz", b"x"), b"abc");
    }

    #[test]
    fn exhausted_names_the_attempts() {
        let e = exhausted(
            FabricError::Unreachable {
                backend: "ufm".into(),
                detail: "GET /x answered HTTP 503".into(),
                hint: "h".into(),
            },
            3,
        );
        assert!(e.to_string().contains("gave up after 3 attempts"), "{e}");
    }
}
