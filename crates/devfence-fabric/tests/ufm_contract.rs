//! Contract tests of the UFM backend ([`UfmSm`]) against a UFM-API server written
//! here: HTTPS (rustls, a CA made by rcgen at test time, verification on in the
//! client), basic auth, P_Key state with membership, and fault injection — 5xx,
//! slow answers, garbage JSON, HTML, 401, redirects, oversized answers, and a
//! UFM that answers 200 but does something else than it was asked.
//!
//! The port reader used here reads the *acknowledged* tables of the fake fabric,
//! which only change when a test calls [`FakeUfm::sweep`]: so a handover verifies
//! only once the ports are seen to hold what was asked.
//!
//! No test sleeps to wait for anything; only the server sleeps, to be slow.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devfence_fabric::ufm::{Credentials, UfmConfig, UfmSm};
use devfence_fabric::{
    Evidence, Expectation, FabricError, PartitionKey, PortReader, Programmed, Question,
    SubnetManager, SweepOutcome, View, verify, wait_verified,
};
use devfence_model::{Guid, Membership, PKey};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const USER: &str = "devfence-svc";
const PASSWORD: &str = "Pa55-w0rd-never-shown";
const OLD: Guid = Guid(0x0002_c903_000a_1b2c);
const NEW: Guid = Guid(0x0002_c903_000a_e001);
const BYSTANDER: Guid = Guid(0x0002_c903_000a_7777);
const A: u16 = 0x0001;
const B: u16 = 0x0002;
const FOREIGN: u16 = 0x0ff0;
const DEFAULT: u16 = 0x7fff;

fn pk(v: u16) -> PartitionKey {
    PartitionKey::new(v).expect("valid")
}

// ---------------------------------------------------------------------------
// PKI made at test time.

struct Pki {
    dir: tempfile::TempDir,
    server: Arc<rustls::ServerConfig>,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    credentials: PathBuf,
}

fn ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair, rcgen::Certificate) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    (params, key, cert)
}

fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tmp");
    let (ca_params, ca_key, ca_cert) = ca("devfence test UFM CA");
    let (_, _, other_cert) = ca("somebody else's CA");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("leaf");
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "fake-ufm");
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("signed");
    let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    let ca_file = dir.path().join("ufm-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
    let other_ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, other_cert.pem()).expect("write ca");
    let credentials = dir.path().join("ufm.credentials");
    write_private(&credentials, &format!("{USER}:{PASSWORD}\n"));
    Pki {
        dir,
        server: Arc::new(server),
        ca_file,
        other_ca_file,
        credentials,
    }
}

// ---------------------------------------------------------------------------
// The fake UFM.

/// What a rule makes the server do instead of (or before) answering normally.
#[derive(Clone, Debug)]
enum Fault {
    /// Answer this status, with a small body.
    Status(u16),
    /// This status and content type, with a body that echoes the Authorization
    /// header and the password.
    Echo(u16, &'static str),
    /// Sleep, then answer normally.
    Slow(Duration),
    /// Answer 200 with this content type and body.
    Body(&'static str, Vec<u8>),
    /// 302 to a login page.
    Redirect,
    /// This status and content type, with a body that echoes the password in
    /// one encoding.
    EchoAs(u16, &'static str, Form),
}

/// How an answer echoes the password.
#[derive(Clone, Copy, Debug)]
enum Form {
    Plain,
    UrlEncoded,
    JsonEscaped,
    Base64,
    Truncated,
}

const FORMS: [Form; 5] = [
    Form::Plain,
    Form::UrlEncoded,
    Form::JsonEscaped,
    Form::Base64,
    Form::Truncated,
];

/// The password as `form` writes it.
fn encoded(form: Form, password: &str) -> String {
    match form {
        Form::Plain => password.to_string(),
        Form::UrlEncoded => password
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect(),
        Form::JsonEscaped => {
            let j = serde_json::to_string(password).expect("json");
            j[1..j.len() - 1].to_string()
        }
        Form::Base64 => base64(password.as_bytes()),
        Form::Truncated => password[..password.len() * 2 / 3].to_string(),
    }
}

/// A body that echoes the password in `form`, in the places a UFM or a proxy
/// might: an error text, a JSON field, a GUID and a P_Key key.
fn echo_body(form: Form, password: &str) -> Vec<u8> {
    let e = encoded(form, password);
    let quoted = serde_json::to_string(&e).expect("json");
    format!(
        "{{\"error\": {quoted}, \"detail\": \"ufm-echo {e} failed\", \"0x0001\": {{\"guids\": [{{\"guid\": {quoted}, \"membership\": {quoted}}}]}}, {quoted}: {{}}}}"
    )
    .into_bytes()
}

#[derive(Clone, Debug)]
struct Rule {
    method: &'static str,
    path: &'static str,
    fault: Fault,
    times: u32,
}

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    body: String,
}

type Members = BTreeMap<u16, BTreeMap<u64, Membership>>;

#[derive(Default)]
struct State {
    /// UFM's configuration: P_Key base → GUID → membership.
    configured: Members,
    /// What the ports acknowledged (copied from `configured` by `sweep`).
    acked: Members,
    /// Ports on the fabric.
    attached: BTreeSet<u64>,
    rules: Vec<Rule>,
    /// Requests that passed authentication and reached the API.
    seen: Vec<Seen>,
    /// Every request that arrived (authenticated or not).
    arrived: u32,
    /// Adds are stored with the other membership than asked.
    lie_membership: bool,
    /// Removes answer 200 and do nothing.
    ignore_removes: bool,
    /// The UFM release this server plays (`ufm_release_version`); it serves the
    /// endpoints that release serves (see [`serves`]).
    version: String,
    /// The password the server expects (default [`PASSWORD`]).
    password: Option<String>,
}

/// The endpoints a UFM release serves, from UFM's REST API guides: the
/// `/ufmRest/resources/` P_Key GUID API (with `DELETE …/pkeys/{pkey}/guids/{guids}`)
/// from 6.9 on, `POST /ufmRest/resources/pkeys/add` (an empty partition) from
/// 6.15 on, and the deprecated `POST /ufmRest/actions/remove_guids_from_pkey` —
/// played here as gone from 7.0 on, so that a client still using it fails there.
#[derive(Clone, Copy, Debug)]
enum Endpoint {
    DeleteGuids,
    CreateEmpty,
    ActionsRemove,
}

fn serves(version: &str, e: Endpoint) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let v = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    match e {
        Endpoint::DeleteGuids => v >= (6, 9),
        Endpoint::CreateEmpty => v >= (6, 15),
        Endpoint::ActionsRemove => v < (7, 0),
    }
}

struct FakeUfm {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    pki: Pki,
}

fn lock(s: &Mutex<State>) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() {
                char::from(T[((n >> (18 - 6 * i)) & 63) as usize])
            } else {
                '='
            });
        }
    }
    out
}

struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(s: &mut impl Read) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

struct Answer {
    status: u16,
    content_type: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn json(status: u16, v: &serde_json::Value) -> Answer {
    Answer {
        status,
        content_type: "application/json",
        headers: Vec::new(),
        body: serde_json::to_vec(v).expect("json"),
    }
}

fn listing(m: &Members) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (p, members) in m {
        let guids: Vec<serde_json::Value> = members
            .iter()
            .map(|(g, mem)| {
                serde_json::json!({
                    // UFM's form: 16 hex digits, upper case, no separators.
                    "guid": format!("{g:016X}"),
                    "membership": match mem { Membership::Full => "full", Membership::Limited => "limited" },
                    "index0": true,
                })
            })
            .collect();
        out.insert(
            format!("0x{p:04x}"),
            serde_json::json!({"partition": format!("p{p}"), "ip_over_ib": true, "guids": guids}),
        );
    }
    serde_json::Value::Object(out)
}

fn parse_guid(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("guid from devfence")
}
fn parse_pkey(s: &str) -> u16 {
    u16::from_str_radix(s.trim_start_matches("0x"), 16).expect("pkey from devfence") & 0x7fff
}

fn handle(state: &Mutex<State>, req: &Request) -> Answer {
    let password = lock(state)
        .password
        .clone()
        .unwrap_or_else(|| PASSWORD.to_string());
    let expected = format!("Basic {}", base64(format!("{USER}:{password}").as_bytes()));
    let auth = req
        .headers
        .get("authorization")
        .cloned()
        .unwrap_or_default();
    let fault = {
        let mut s = lock(state);
        s.arrived += 1;
        let hit = s
            .rules
            .iter_mut()
            .find(|r| r.times > 0 && r.method == req.method && req.path.starts_with(r.path));
        hit.map(|r| {
            r.times -= 1;
            r.fault.clone()
        })
    };
    match fault {
        Some(Fault::Status(code)) => {
            return json(
                code,
                &serde_json::json!({"error": format!("injected {code}")}),
            );
        }
        Some(Fault::Echo(status, content_type)) => {
            return Answer {
                status,
                content_type,
                headers: Vec::new(),
                body: format!("denied: you sent {auth} which is {USER}:{password}").into_bytes(),
            };
        }
        Some(Fault::EchoAs(status, content_type, form)) => {
            return Answer {
                status,
                content_type,
                headers: Vec::new(),
                body: echo_body(form, &password),
            };
        }
        Some(Fault::Body(ct, body)) => {
            return Answer {
                status: 200,
                content_type: ct,
                headers: Vec::new(),
                body,
            };
        }
        Some(Fault::Redirect) => {
            return Answer {
                status: 302,
                content_type: "text/html",
                headers: vec![("Location".into(), "/login.html".into())],
                body: b"<html>moved</html>".to_vec(),
            };
        }
        Some(Fault::Slow(d)) => std::thread::sleep(d),
        None => {}
    }
    if auth != expected {
        return json(401, &serde_json::json!({"error": "unauthorized"}));
    }
    let mut s = lock(state);
    s.seen.push(Seen {
        method: req.method.clone(),
        path: req.path.clone(),
        body: String::from_utf8_lossy(&req.body).to_string(),
    });
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/ufmRest/app/ufm_version") => {
            json(200, &serde_json::json!({"ufm_release_version": s.version}))
        }
        ("GET", "/ufmRest/resources/pkeys/?guids_data=true") => json(200, &listing(&s.configured)),
        ("GET", "/ufmRest/resources/pkeys/last_updated") => json(
            200,
            &serde_json::json!({"last_updated": "2026-05-01 12:00:00"}),
        ),
        ("POST", "/ufmRest/resources/pkeys") => {
            let v: serde_json::Value =
                serde_json::from_slice(&req.body).expect("devfence sends JSON");
            let p = parse_pkey(v["pkey"].as_str().expect("pkey"));
            let mut m = match v["membership"].as_str().expect("membership") {
                "full" => Membership::Full,
                "limited" => Membership::Limited,
                other => panic!("membership {other}"),
            };
            if s.lie_membership {
                m = match m {
                    Membership::Full => Membership::Limited,
                    Membership::Limited => Membership::Full,
                };
            }
            let guids: Vec<u64> = v["guids"]
                .as_array()
                .expect("guids")
                .iter()
                .map(|g| parse_guid(g.as_str().expect("guid string")))
                .collect();
            let part = s.configured.entry(p).or_default();
            for g in guids {
                part.insert(g, m);
            }
            json(200, &serde_json::json!({}))
        }
        ("POST", "/ufmRest/resources/pkeys/add") if serves(&s.version, Endpoint::CreateEmpty) => {
            let v: serde_json::Value =
                serde_json::from_slice(&req.body).expect("devfence sends JSON");
            assert!(v.get("guids").is_none(), "pkeys/add takes no GUIDs: {v}");
            let p = parse_pkey(v["pkey"].as_str().expect("pkey"));
            s.configured.entry(p).or_default();
            json(200, &serde_json::json!({}))
        }
        ("DELETE", path)
            if serves(&s.version, Endpoint::DeleteGuids)
                && path.starts_with("/ufmRest/resources/pkeys/") =>
        {
            // DELETE /ufmRest/resources/pkeys/{pkey}/guids/{guid,guid,…}
            let rest = &path["/ufmRest/resources/pkeys/".len()..];
            let Some((pkey, guids)) = rest.split_once("/guids/") else {
                return json(404, &serde_json::json!({"error": "not found"}));
            };
            let p = parse_pkey(pkey);
            let guids: Vec<u64> = guids.split(',').map(parse_guid).collect();
            if !s.ignore_removes
                && let Some(part) = s.configured.get_mut(&p)
            {
                for g in guids {
                    part.remove(&g);
                }
            }
            json(200, &serde_json::json!({}))
        }
        ("POST", "/ufmRest/actions/remove_guids_from_pkey")
            if serves(&s.version, Endpoint::ActionsRemove) =>
        {
            let v: serde_json::Value =
                serde_json::from_slice(&req.body).expect("devfence sends JSON");
            let p = parse_pkey(v["pkey"].as_str().expect("pkey"));
            if !s.ignore_removes {
                let guids: Vec<u64> = v["guids"]
                    .as_array()
                    .expect("guids")
                    .iter()
                    .map(|g| parse_guid(g.as_str().expect("guid string")))
                    .collect();
                if let Some(part) = s.configured.get_mut(&p) {
                    for g in guids {
                        part.remove(&g);
                    }
                }
            }
            json(200, &serde_json::json!({}))
        }
        _ => json(404, &serde_json::json!({"error": "not found"})),
    }
}

fn serve(stream: TcpStream, cfg: Arc<rustls::ServerConfig>, state: &Mutex<State>) {
    let Ok(conn) = rustls::ServerConnection::new(cfg) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let Some(req) = read_request(&mut tls) else {
        return;
    };
    let a = handle(state, &req);
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        a.status,
        a.content_type,
        a.body.len()
    );
    for (k, v) in &a.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = tls.write_all(head.as_bytes());
    let _ = tls.write_all(&a.body);
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

impl FakeUfm {
    fn start() -> Self {
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            version: "6.19.0-fake".into(),
            ..State::default()
        }));
        let (cfg, st) = (pki.server.clone(), state.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (cfg, st) = (cfg.clone(), st.clone());
                std::thread::spawn(move || serve(stream, cfg, &st));
            }
        });
        Self { addr, state, pki }
    }

    /// A fabric where OLD is in A (full) and BYSTANDER in A and a foreign
    /// partition; every port also in the default partition, limited; acknowledged.
    fn with_tenant_a() -> Self {
        let f = Self::start();
        {
            let mut s = f.state();
            for g in [OLD, NEW, BYSTANDER] {
                s.attached.insert(g.0);
                s.configured
                    .entry(DEFAULT)
                    .or_default()
                    .insert(g.0, Membership::Limited);
            }
            s.configured
                .entry(A)
                .or_default()
                .insert(OLD.0, Membership::Full);
            s.configured
                .entry(A)
                .or_default()
                .insert(BYSTANDER.0, Membership::Full);
            s.configured
                .entry(FOREIGN)
                .or_default()
                .insert(BYSTANDER.0, Membership::Full);
            s.configured.entry(B).or_default();
        }
        f.sweep();
        f
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn config(&self) -> UfmConfig {
        let mut c = UfmConfig::new(self.url());
        c.ca_file = Some(self.pki.ca_file.clone());
        c.credentials = Credentials::File {
            path: self.pki.credentials.clone(),
        };
        c.timeout_ms = 5_000;
        c.connect_timeout_ms = 5_000;
        c.retries = 2;
        c.retry_backoff_ms = 1;
        c.managed_pkeys = vec![pk(A), pk(B)];
        c
    }

    fn sm_with(&self, cfg: UfmConfig) -> UfmSm {
        UfmSm::new(cfg)
            .expect("backend builds")
            .with_port_reader(FakePorts(self.state.clone()))
    }

    fn sm(&self) -> UfmSm {
        self.sm_with(self.config())
    }

    /// The ports take what UFM is configured with.
    fn sweep(&self) {
        let mut s = self.state();
        s.acked = s.configured.clone();
    }

    fn fault(&self, method: &'static str, path: &'static str, fault: Fault, times: u32) {
        self.state().rules.push(Rule {
            method,
            path,
            fault,
            times,
        });
    }

    fn seen(&self) -> Vec<Seen> {
        self.state().seen.clone()
    }

    /// Every change request that reached the API: method and path.
    fn changes(&self) -> Vec<(String, String)> {
        self.seen()
            .into_iter()
            .filter(|s| s.method != "GET")
            .map(|s| (s.method, s.path))
            .collect()
    }

    fn posts(&self) -> Vec<(String, serde_json::Value)> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "POST")
            .map(|s| (s.path, serde_json::from_str(&s.body).expect("json body")))
            .collect()
    }

    fn configured_of(&self, g: Guid) -> BTreeSet<PKey> {
        pkeys_of(&self.state().configured, g)
    }
}

fn pkeys_of(m: &Members, g: Guid) -> BTreeSet<PKey> {
    m.iter()
        .filter_map(|(p, members)| members.get(&g.0).map(|mem| PKey(*p).with_membership(*mem)))
        .collect()
}

/// Reads the ports' acknowledged tables of the fake fabric (what an SA client
/// would read).
struct FakePorts(Arc<Mutex<State>>);

impl PortReader for FakePorts {
    fn read_port(&self, guid: Guid) -> Result<Programmed, FabricError> {
        let s = lock(&self.0);
        if !s.attached.contains(&guid.0) {
            return Ok(Programmed::Absent);
        }
        Ok(Programmed::Present {
            lid: Some(7),
            pkeys: pkeys_of(&s.acked, guid),
        })
    }
}

fn handover(ticket: devfence_fabric::Ticket) -> Expectation {
    Expectation::handover(
        ticket,
        Some((OLD, &[pk(A)])),
        Some((NEW, &[(pk(B), Membership::Full)])),
    )
}

fn stage_handover(sm: &UfmSm) {
    sm.stage_remove_all(OLD).expect("stage");
    sm.stage_add(NEW, pk(B), Membership::Full).expect("stage");
}

fn malformed_detail(e: &FabricError) -> &str {
    match e {
        FabricError::Malformed { detail, .. } => detail,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_millis(300)
}

// ---------------------------------------------------------------------------
// The handover, end to end.

#[test]
fn handover_verifies_only_once_the_ports_acknowledge_it() {
    let f = FakeUfm::with_tenant_a();
    let sm = f.sm();
    let before = sm.observe(&[OLD, NEW]).expect("observe");
    stage_handover(&sm);
    let ticket = sm.apply().expect("apply");
    assert_eq!(
        sm.discard_staged(),
        0,
        "applied changes are no longer staged"
    );
    assert!(ticket.generation > before.status.generation);

    // UFM took it (configured), the ports have not: not verified, and the
    // evidence is the programmed view.
    let obs = sm.observe(&[OLD, NEW]).expect("observe");
    assert!(obs.status.generation >= ticket.generation);
    assert_eq!(obs.status.sweep, SweepOutcome::Clean);
    assert_eq!(
        obs.ports[&OLD].configured,
        Some(BTreeSet::from([PKey(DEFAULT)]))
    );
    assert_eq!(
        obs.ports[&NEW].configured,
        Some(BTreeSet::from([PKey(DEFAULT), PKey(0x8002)]))
    );
    let v = verify(&obs, &handover(ticket));
    assert_eq!(
        v.failed(),
        BTreeSet::from([Question::OldRevoked, Question::NewExact]),
        "{v:?}"
    );
    assert!(v.failures().iter().all(|x| matches!(
        x.evidence,
        Evidence::StillMember {
            view: View::Programmed,
            ..
        } | Evidence::Mismatch {
            view: View::Programmed,
            ..
        }
    )));
    let nv = wait_verified(&sm, &handover(ticket), soon()).expect_err("ports not swept");
    assert!(nv.polls >= 1);

    // The ports take it: verified from read-back alone.
    f.sweep();
    let proof = wait_verified(&sm, &handover(ticket), soon()).expect("verified");
    assert!(proof.seen >= ticket.generation);

    // What was sent: one removal from A (UFM's current API), one addition to B.
    assert_eq!(
        f.changes(),
        [
            (
                "DELETE".to_string(),
                "/ufmRest/resources/pkeys/0x0001/guids/0002c903000a1b2c".to_string()
            ),
            ("POST".to_string(), "/ufmRest/resources/pkeys".to_string()),
        ]
    );
    let posts = f.posts();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(
        posts[0].1,
        serde_json::json!({"pkey": "0x0002", "index0": true, "ip_over_ib": true,
                           "membership": "full", "guids": ["0002c903000ae001"]})
    );
    // The bystander kept A and its foreign partition; the default partition was
    // never touched.
    assert_eq!(
        f.configured_of(BYSTANDER),
        BTreeSet::from([PKey(0x8001), PKey(0x8ff0), PKey(DEFAULT)])
    );
}

#[test]
fn replace_and_remove_all_touch_only_managed_partitions() {
    let f = FakeUfm::with_tenant_a();
    let sm = f.sm();
    // The desired state names only NEW in B: every other member of the managed
    // partitions (A, B) goes; the default and the foreign partition stay.
    let mut want = devfence_fabric::MembershipMap::new();
    want.insert(NEW, pk(B), Membership::Limited)
        .expect("insert");
    sm.stage_desired(want).expect("stage");
    sm.apply().expect("apply");
    let posts = f.posts();
    assert!(
        posts
            .iter()
            .all(|(_, b)| b["pkey"] != "0x7fff" && b["pkey"] != "0x0ff0"),
        "{posts:?}"
    );
    assert_eq!(f.configured_of(OLD), BTreeSet::from([PKey(DEFAULT)]));
    assert_eq!(
        f.configured_of(BYSTANDER),
        BTreeSet::from([PKey(0x8ff0), PKey(DEFAULT)])
    );
    assert_eq!(
        f.configured_of(NEW),
        BTreeSet::from([PKey(0x0002), PKey(DEFAULT)])
    );
    // Membership change: a removal, then an addition with the new membership.
    sm.stage_add(NEW, pk(B), Membership::Full).expect("stage");
    sm.apply().expect("apply");
    let changes = f.changes();
    let tail: Vec<String> = changes[changes.len() - 2..]
        .iter()
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    assert_eq!(
        tail,
        [
            "DELETE /ufmRest/resources/pkeys/0x0002/guids/0002c903000ae001",
            "POST /ufmRest/resources/pkeys"
        ]
    );
    assert_eq!(
        f.configured_of(NEW),
        BTreeSet::from([PKey(0x8002), PKey(DEFAULT)])
    );
    // Nothing to change: nothing sent.
    let n = f.changes().len();
    sm.stage_add(NEW, pk(B), Membership::Full).expect("stage");
    sm.apply().expect("apply");
    assert_eq!(f.changes().len(), n);
}

#[test]
fn remove_all_without_managed_pkeys_is_refused() {
    let f = FakeUfm::with_tenant_a();
    let mut cfg = f.config();
    cfg.managed_pkeys.clear();
    let sm = f.sm_with(cfg);
    sm.stage_remove_all(OLD).expect("stage");
    let e = sm.apply().expect_err("refused");
    assert!(matches!(e, FabricError::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("managed_pkeys"), "{e}");
    assert_eq!(sm.discard_staged(), 1, "the change stays staged");
    assert!(f.changes().is_empty());
}

// ---------------------------------------------------------------------------
// Faults of the transport.

#[test]
fn server_errors_are_retried_up_to_the_bound() {
    let f = FakeUfm::with_tenant_a();
    let sm = f.sm(); // retries = 2: 3 attempts
    f.fault("GET", "/ufmRest/app/ufm_version", Fault::Status(503), 2);
    sm.observe(&[OLD]).expect("third attempt answers");
    assert_eq!(f.state().arrived, 4, "3 version attempts + 1 listing");

    let f = FakeUfm::with_tenant_a();
    let sm = f.sm();
    f.fault("GET", "/ufmRest/app/ufm_version", Fault::Status(502), 3);
    let e = sm.observe(&[OLD]).expect_err("bounded");
    assert!(matches!(e, FabricError::Unreachable { .. }), "{e:?}");
    let s = e.to_string();
    assert!(
        s.contains("HTTP 502") && s.contains("gave up after 3 attempts"),
        "{s}"
    );
    assert!(s.contains("Hint:"), "{s}");
    assert_eq!(f.state().arrived, 3, "no fourth attempt");
}

#[test]
fn client_errors_are_not_retried() {
    let f = FakeUfm::with_tenant_a();
    let sm = f.sm();
    f.fault("GET", "/ufmRest/resources/pkeys/", Fault::Status(404), 5);
    let e = sm.observe(&[OLD]).expect_err("404");
    assert!(matches!(e, FabricError::Refused { .. }), "{e:?}");
    assert!(!e.is_retryable());
    assert!(
        e.to_string().contains("HTTP 404") && e.to_string().contains("check `url`"),
        "{e}"
    );
    assert_eq!(f.state().arrived, 2, "version once, listing once");
}

#[test]
fn wrong_credentials_are_refused_and_the_password_is_never_shown() {
    // The real password, but UFM answers and echoes the header and the password
    // back: nothing of either may reach an error, whole or cut short.
    let auth = base64(format!("{USER}:{PASSWORD}").as_bytes());
    for (status, ct) in [
        (401, "text/plain"),
        (500, "text/plain"),
        (200, "text/html"),
        (200, "application/json"),
    ] {
        let f = FakeUfm::with_tenant_a();
        let sm = f.sm();
        f.fault(
            "GET",
            "/ufmRest/app/ufm_version",
            Fault::Echo(status, ct),
            10,
        );
        let e = sm.observe(&[OLD]).expect_err("echo");
        for shown in [
            e.to_string(),
            format!("{e:?}"),
            format!("{sm:?}"),
            format!("{:?}", f.config()),
        ] {
            assert!(!shown.contains(PASSWORD), "password shown: {shown}");
            assert!(!shown.contains(&auth[..8]), "auth header shown: {shown}");
        }
        if status == 401 {
            assert!(matches!(e, FabricError::Refused { .. }), "{e:?}");
            assert!(e.to_string().contains("HTTP 401"), "{e}");
            assert!(e.to_string().contains("check the credentials file"), "{e}");
            assert!(
                !e.to_string().contains("you sent"),
                "a 401 is not quoted: {e}"
            );
            assert_eq!(f.state().arrived, 1, "401 is not retried");
        } else {
            // Not quoted at all (issue 18 item 10), redacted or not.
            assert!(!e.to_string().contains("you sent"), "{e}");
        }
    }

    let f = FakeUfm::with_tenant_a();
    // A wrong password in the credentials file.
    let wrong = f.pki.dir.path().join("wrong.credentials");
    write_private(&wrong, &format!("{USER}:not-the-password\n"));
    let mut cfg = f.config();
    cfg.credentials = Credentials::File { path: wrong };
    let sm = f.sm_with(cfg);
    stage_handover(&sm);
    let e = sm.apply().expect_err("401");
    assert!(e.to_string().contains("HTTP 401"), "{e}");
    assert!(!format!("{e:?}{sm:?}").contains("not-the-password"));
    assert_eq!(sm.discard_staged(), 2, "the changes stay staged");
}

#[test]
fn a_slow_answer_times_out_instead_of_hanging() {
    let f = FakeUfm::with_tenant_a();
    let mut cfg = f.config();
    cfg.timeout_ms = 300;
    cfg.retries = 1;
    let sm = f.sm_with(cfg);
    f.fault(
        "GET",
        "/ufmRest/app/ufm_version",
        Fault::Slow(Duration::from_secs(5)),
        2,
    );
    let e = sm.observe(&[OLD]).expect_err("timeout");
    assert!(matches!(e, FabricError::Timeout { .. }), "{e:?}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("gave up after 2 attempts"), "{e}");
    // The gate gives up at its deadline with the timeout as evidence.
    f.fault(
        "GET",
        "/ufmRest/app/ufm_version",
        Fault::Slow(Duration::from_secs(5)),
        100,
    );
    let nv = wait_verified(
        &sm,
        &handover(devfence_fabric::Ticket {
            change: devfence_fabric::ChangeId(0),
            generation: devfence_fabric::Generation(0),
        }),
        Instant::now(),
    )
    .expect_err("never verified");
    assert!(nv.to_string().contains("timed out"), "{nv}");
}

#[test]
fn a_slow_apply_keeps_the_changes_staged_and_applies_them_later() {
    let f = FakeUfm::with_tenant_a();
    let mut cfg = f.config();
    cfg.timeout_ms = 300;
    cfg.retries = 0;
    let sm = f.sm_with(cfg);
    stage_handover(&sm);
    f.fault(
        "POST",
        "/ufmRest/resources/pkeys",
        Fault::Slow(Duration::from_secs(5)),
        1,
    );
    let e = sm.apply().expect_err("timeout");
    assert!(matches!(e, FabricError::Timeout { .. }), "{e:?}");
    // Half done (the removal went through); applying again finishes it.
    sm.apply().expect("second apply");
    assert_eq!(sm.discard_staged(), 0);
    assert_eq!(f.configured_of(OLD), BTreeSet::from([PKey(DEFAULT)]));
    assert_eq!(
        f.configured_of(NEW),
        BTreeSet::from([PKey(0x8002), PKey(DEFAULT)])
    );
}

#[test]
fn server_errors_beyond_the_bound_keep_the_changes_staged() {
    let f = FakeUfm::with_tenant_a();
    let sm = f.sm();
    stage_handover(&sm);
    f.fault("DELETE", "/ufmRest/resources/pkeys/", Fault::Status(500), 3);
    let e = sm.apply().expect_err("500");
    assert!(e.to_string().contains("HTTP 500"), "{e}");
    assert_eq!(
        f.configured_of(NEW),
        BTreeSet::from([PKey(DEFAULT)]),
        "nothing added"
    );
    let t = sm.apply().expect("then it works");
    f.sweep();
    assert!(verify(&sm.observe(&[OLD, NEW]).expect("observe"), &handover(t)).is_verified());
}

#[test]
fn redirects_are_not_followed() {
    let f = FakeUfm::with_tenant_a();
    let sm = f.sm();
    f.fault("GET", "/ufmRest/app/ufm_version", Fault::Redirect, 1);
    let e = sm.observe(&[OLD]).expect_err("redirect");
    let s = e.to_string();
    assert!(s.contains("HTTP 302") && s.contains("/login.html"), "{s}");
    assert_eq!(f.state().arrived, 1);
}

// ---------------------------------------------------------------------------
// Answers that do not decode: a clear error, the gate stays closed.

/// A handover whose effect is in place and acknowledged: only a bad answer can
/// now stop its gate.
fn applied_handover(f: &FakeUfm, sm: &UfmSm) -> devfence_fabric::Ticket {
    stage_handover(sm);
    let t = sm.apply().expect("apply before the fault");
    f.sweep();
    assert!(verify(&sm.observe(&[OLD, NEW]).expect("observe"), &handover(t)).is_verified());
    t
}

fn assert_gate_closed(sm: &UfmSm, t: devfence_fabric::Ticket) {
    let nv = wait_verified(sm, &handover(t), soon()).expect_err("gate closed");
    assert!(
        nv.failed().is_empty(),
        "an unreadable SM fails no question, it fails the read: {nv}"
    );
}

#[test]
fn garbage_json_closes_the_gate() {
    for body in [
        &b"{\"0x0001\": {\"guids\": [{\"guid\": \"zz\""[..],
        b"null",
        b"{\"0x0001\": 5}",
    ] {
        let f = FakeUfm::with_tenant_a();
        let sm = f.sm();
        f.fault(
            "GET",
            "/ufmRest/resources/pkeys/?",
            Fault::Body("application/json", body.to_vec()),
            1,
        );
        let e = sm.observe(&[OLD, NEW]).expect_err("garbage");
        assert!(
            malformed_detail(&e).contains("not the expected JSON"),
            "{e}"
        );
        assert!(e.to_string().contains("Hint:"));
        let t = applied_handover(&f, &sm);
        f.fault(
            "GET",
            "/ufmRest/resources/pkeys/?",
            Fault::Body("application/json", body.to_vec()),
            1_000,
        );
        assert_gate_closed(&sm, t);
    }
}

#[test]
fn a_bad_guid_is_named() {
    let f = FakeUfm::with_tenant_a();
    let sm = f.sm();
    f.fault(
        "GET",
        "/ufmRest/resources/pkeys/?",
        Fault::Body(
            "application/json",
            br#"{"0x0001": {"guids": [{"guid": "00:02:c9:03:00:0a:1b:2c", "membership": "full"}]}}"#.to_vec(),
        ),
        1,
    );
    let e = sm.observe(&[OLD]).expect_err("bad guid");
    assert!(
        malformed_detail(&e)
            .contains("P_Key 0x0001 guids[0].guid: a value of 23 characters is not a GUID"),
        "{e}"
    );
}

#[test]
fn html_answers_are_named_as_such() {
    // By content type, and by content under a JSON content type.
    for (ct, body) in [
        (
            "text/html; charset=utf-8",
            &b"{\"looks\": \"like json\"}"[..],
        ),
        (
            "application/json",
            b"<!DOCTYPE html><html><body>UFM login</body></html>",
        ),
    ] {
        let f = FakeUfm::with_tenant_a();
        let sm = f.sm();
        let t = applied_handover(&f, &sm);
        f.fault(
            "GET",
            "/ufmRest/app/ufm_version",
            Fault::Body(ct, body.to_vec()),
            1_000,
        );
        let e = sm.observe(&[OLD]).expect_err("html");
        assert!(
            malformed_detail(&e).contains("UFM answered HTML (a login page or proxy error?)"),
            "{e}"
        );
        assert!(sm.health().is_err());
        assert_gate_closed(&sm, t);
    }
}

#[test]
fn an_oversized_answer_is_refused() {
    let f = FakeUfm::with_tenant_a();
    let sm = f.sm();
    let mut body = b"{\"0x0001\": {\"partition\": \"".to_vec();
    body.resize(devfence_fabric::ufm::MAX_RESPONSE_BYTES + 1, b'x');
    f.fault(
        "GET",
        "/ufmRest/resources/pkeys/?",
        Fault::Body("application/json", body),
        1,
    );
    let e = sm.observe(&[OLD]).expect_err("too big");
    assert!(malformed_detail(&e).contains("larger than"), "{e}");
}

// ---------------------------------------------------------------------------
// A UFM that says yes and does something else: observe tells the truth,
// verify fails closed.

#[test]
fn membership_other_than_asked_fails_verification() {
    let f = FakeUfm::with_tenant_a();
    f.state().lie_membership = true;
    let sm = f.sm();
    stage_handover(&sm);
    let t = sm.apply().expect("UFM says 200");
    f.sweep();
    let obs = sm.observe(&[OLD, NEW]).expect("observe");
    assert_eq!(
        obs.ports[&NEW].configured,
        Some(BTreeSet::from([PKey(0x0002), PKey(DEFAULT)])),
        "observe reports what UFM holds, not what was asked"
    );
    let v = verify(&obs, &handover(t));
    assert_eq!(v.failed(), BTreeSet::from([Question::NewExact]), "{v:?}");
    let views: BTreeSet<String> = v
        .failures()
        .iter()
        .filter_map(|x| match &x.evidence {
            Evidence::Mismatch { view, missing, .. } => {
                assert_eq!(*missing, BTreeSet::from([PKey(0x8002)]));
                Some(view.to_string())
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        views,
        BTreeSet::from(["configured".into(), "programmed".into()])
    );
    assert!(wait_verified(&sm, &handover(t), soon()).is_err());
}

#[test]
fn an_ignored_removal_fails_verification() {
    let f = FakeUfm::with_tenant_a();
    f.state().ignore_removes = true;
    let sm = f.sm();
    stage_handover(&sm);
    let t = sm.apply().expect("UFM says 200");
    f.sweep();
    let v = verify(&sm.observe(&[OLD, NEW]).expect("observe"), &handover(t));
    assert_eq!(v.failed(), BTreeSet::from([Question::OldRevoked]), "{v:?}");
    assert!(v.failures().iter().any(|x| matches!(
        x.evidence,
        Evidence::StillMember {
            view: View::Configured,
            ..
        }
    )));
}

#[test]
fn a_configured_removal_of_a_port_that_left_still_counts() {
    // OLD left the fabric (absent: "in none" on the programmed side), but UFM
    // still lists it in A: it would come back with A. Not verified.
    let f = FakeUfm::with_tenant_a();
    f.state().ignore_removes = true;
    f.state().attached.remove(&OLD.0);
    let sm = f.sm();
    stage_handover(&sm);
    let t = sm.apply().expect("apply");
    f.sweep();
    let obs = sm.observe(&[OLD, NEW]).expect("observe");
    assert_eq!(obs.ports[&OLD].programmed, Programmed::Absent);
    let v = verify(&obs, &handover(t));
    assert_eq!(v.failed(), BTreeSet::from([Question::OldRevoked]), "{v:?}");
}

// ---------------------------------------------------------------------------
// TLS.

#[test]
fn an_untrusted_certificate_is_refused() {
    let f = FakeUfm::with_tenant_a();
    let mut cfg = f.config();
    cfg.ca_file = Some(f.pki.other_ca_file.clone());
    let sm = f.sm_with(cfg);
    let e = sm.observe(&[OLD]).expect_err("untrusted");
    let s = e.to_string();
    assert!(matches!(e, FabricError::Unreachable { .. }), "{e:?}");
    assert!(s.contains("TLS certificate is not trusted"), "{s}");
    assert!(s.contains("set ca_file"), "{s}");
    assert!(
        !s.contains("gave up after"),
        "a TLS failure is not retried: {s}"
    );
    // Mozilla's roots do not know the test CA either.
    let mut cfg = f.config();
    cfg.ca_file = None;
    let e = f.sm_with(cfg).health().expect_err("untrusted");
    assert!(e.to_string().contains("not trusted"), "{e}");
    let st = f.state();
    assert!(
        st.seen.is_empty() && st.arrived == 0,
        "no request got through"
    );
}

#[test]
fn the_insecure_opt_out_works_and_says_so() {
    let f = FakeUfm::with_tenant_a();
    let mut cfg = f.config();
    cfg.ca_file = None;
    cfg.insecure_skip_verify = true;
    let sm = f.sm_with(cfg.clone());
    let h = sm.health().expect("answers");
    assert!(
        h.notes
            .iter()
            .any(|n| n.contains("TLS certificate verification is OFF")),
        "{:?}",
        h.notes
    );
    assert_eq!(h.version.as_deref(), Some("6.19.0-fake"));
    sm.observe(&[OLD]).expect("observe");
    // With a CA file too: a contradiction, refused at setup.
    cfg.ca_file = Some(f.pki.ca_file.clone());
    let e = UfmSm::new(cfg).expect_err("contradiction");
    assert!(e.to_string().contains("insecure_skip_verify"), "{e}");
}

#[test]
fn setup_errors_are_clear() {
    let f = FakeUfm::start();
    let mut cfg = f.config();
    cfg.url = format!("http://{}", f.addr);
    assert!(
        UfmSm::new(cfg)
            .expect_err("http")
            .to_string()
            .contains("in clear")
    );
    let mut cfg = f.config();
    let junk = f.pki.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").expect("write");
    cfg.ca_file = Some(junk);
    assert!(
        UfmSm::new(cfg)
            .expect_err("junk ca")
            .to_string()
            .contains("no CERTIFICATE")
    );
    let mut cfg = f.config();
    cfg.credentials = Credentials::File {
        path: f.pki.dir.path().join("absent"),
    };
    assert!(
        UfmSm::new(cfg)
            .expect_err("no creds")
            .to_string()
            .contains("cannot read it")
    );
}

// ---------------------------------------------------------------------------
// The acknowledged-view policy.

#[test]
fn without_a_port_reader_nothing_verifies_unless_trusted() {
    let f = FakeUfm::with_tenant_a();
    let sm = UfmSm::new(f.config()).expect("builds"); // no port reader
    stage_handover(&sm);
    let t = sm.apply().expect("apply");
    let obs = sm.observe(&[OLD, NEW]).expect("observe");
    // The data is right, but it is only UFM's configured view.
    let v = verify(&obs, &handover(t));
    assert_eq!(v.failed(), BTreeSet::from([Question::SweepDone]), "{v:?}");
    assert!(
        v.failures()[0].to_string().contains("no port reader"),
        "{v:?}"
    );
    let h = sm.health().expect("health");
    assert!(!h.is_healthy());
    assert!(
        h.notes.iter().any(|n| n.contains("no port reader")),
        "{:?}",
        h.notes
    );

    let mut cfg = f.config();
    cfg.trust_configured_view = true;
    let trusted = UfmSm::new(cfg).expect("builds");
    let obs = trusted.observe(&[OLD, NEW]).expect("observe");
    assert!(matches!(
        obs.ports[&NEW].programmed,
        Programmed::Present { lid: None, .. }
    ));
    assert!(verify(&obs, &handover(t)).is_verified());
    let h = trusted.health().expect("health");
    assert!(h.is_healthy());
    assert!(
        h.notes
            .iter()
            .any(|n| n.contains("trust_configured_view = true")),
        "{:?}",
        h.notes
    );
}

#[test]
fn generations_order_reads_and_applies() {
    let f = FakeUfm::with_tenant_a();
    let sm = f.sm();
    let g0 = sm.observe(&[]).expect("observe").status.generation;
    let t1 = sm.apply().expect("empty apply still gives a ticket");
    let t2 = sm.apply().expect("again");
    assert!(g0 < t1.generation && t1.generation < t2.generation);
    assert!(t1.change != t2.change);
    let g3 = sm.observe(&[]).expect("observe").status.generation;
    assert!(g3 >= t2.generation);
    // A second backend (another process) also sees the ticket as reached.
    let other = f.sm();
    assert!(other.observe(&[]).expect("observe").status.generation >= t2.generation);
    assert!(f.changes().is_empty(), "an empty apply sends nothing");
}

#[test]
fn health_reports_version_reader_and_managed_pkeys() {
    let f = FakeUfm::with_tenant_a();
    let h = f.sm().health().expect("health");
    assert_eq!(h.backend, "ufm");
    assert!(h.is_healthy(), "{h:?}");
    let notes = h.notes.join("\n");
    assert!(notes.contains("acknowledged view"), "{notes}");
    assert!(
        notes.contains("last updated at UFM: 2026-05-01 12:00:00"),
        "{notes}"
    );
    assert!(notes.contains("managed P_Keys: 0x0001,0x0002"), "{notes}");
    assert!(!notes.contains(PASSWORD));
}

#[test]
fn a_failing_port_reader_fails_the_read() {
    struct Broken;
    impl PortReader for Broken {
        fn read_port(&self, guid: Guid) -> Result<Programmed, FabricError> {
            Err(FabricError::Unreachable {
                backend: "sa".into(),
                detail: format!("no answer for {guid}"),
                hint: "h".into(),
            })
        }
    }
    let f = FakeUfm::with_tenant_a();
    let sm = UfmSm::new(f.config())
        .expect("builds")
        .with_port_reader(Broken);
    let e = sm.observe(&[OLD]).expect_err("reader fails");
    assert!(e.to_string().contains("no answer for"), "{e}");
}

// ---------------------------------------------------------------------------
// The API of each UFM release (issue 17 item 9): the current `/ufmRest/resources/`
// calls where UFM has them, the deprecated action only where it lacks them.

fn ufm_of(version: &str) -> FakeUfm {
    let f = FakeUfm::with_tenant_a();
    f.state().version = version.to_string();
    f
}

fn change_lines(f: &FakeUfm) -> Vec<String> {
    f.changes()
        .into_iter()
        .map(|(m, p)| format!("{m} {p}"))
        .collect()
}

#[test]
fn each_ufm_release_gets_the_removal_call_it_serves() {
    for (version, removal) in [
        (
            "6.19.0-7",
            "DELETE /ufmRest/resources/pkeys/0x0001/guids/0002c903000a1b2c",
        ),
        (
            "6.9.0-3",
            "DELETE /ufmRest/resources/pkeys/0x0001/guids/0002c903000a1b2c",
        ),
        (
            "7.0.0-1",
            "DELETE /ufmRest/resources/pkeys/0x0001/guids/0002c903000a1b2c",
        ),
        ("6.8.1-2", "POST /ufmRest/actions/remove_guids_from_pkey"),
    ] {
        let f = ufm_of(version);
        let sm = f.sm();
        stage_handover(&sm);
        let t = sm.apply().expect(version);
        f.sweep();
        assert!(
            verify(&sm.observe(&[OLD, NEW]).expect("observe"), &handover(t)).is_verified(),
            "{version}"
        );
        let sent = change_lines(&f);
        assert_eq!(sent[0], removal, "{version}: {sent:?}");
        assert_eq!(sent.len(), 2, "{version}: {sent:?}");
        assert!(
            sent.iter()
                .all(|c| !c.contains("/ufmRest/actions/") || version.starts_with("6.8")),
            "{version}: the deprecated action only where the current API is missing: {sent:?}"
        );
    }
}

#[test]
fn many_guids_leave_one_partition_in_one_delete_each_batch() {
    let f = ufm_of("6.19.0-7");
    let many: Vec<u64> = (0..5).map(|i| 0x0002_c903_000b_0000 + i).collect();
    {
        let mut s = f.state();
        for g in &many {
            s.configured
                .entry(A)
                .or_default()
                .insert(*g, Membership::Full);
        }
    }
    let sm = f.sm();
    for g in &many {
        sm.stage_remove(Guid(*g), pk(A)).expect("stage");
    }
    sm.apply().expect("apply");
    let sent = change_lines(&f);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let list: Vec<String> = many.iter().map(|g| format!("{g:016x}")).collect();
    assert_eq!(
        sent[0],
        format!(
            "DELETE /ufmRest/resources/pkeys/0x0001/guids/{}",
            list.join(",")
        )
    );
    for g in many {
        assert!(f.configured_of(Guid(g)).is_empty());
    }
}

#[test]
fn a_managed_partition_missing_at_ufm_is_created_empty_where_ufm_can() {
    const C: u16 = 0x0003;
    for (version, creates) in [("6.19.0-7", true), ("6.12.0-5", false)] {
        let f = ufm_of(version);
        let mut cfg = f.config();
        cfg.managed_pkeys.push(pk(C));
        let sm = f.sm_with(cfg);
        stage_handover(&sm);
        sm.apply().expect(version);
        let sent = change_lines(&f);
        let created: Vec<&String> = sent.iter().filter(|c| c.ends_with("/pkeys/add")).collect();
        if creates {
            assert_eq!(created.len(), 1, "{version}: {sent:?}");
            let body = f
                .posts()
                .into_iter()
                .find(|(p, _)| p.ends_with("/pkeys/add"))
                .expect("add body")
                .1;
            assert_eq!(
                body,
                serde_json::json!({"pkey": "0x0003", "index0": false, "ip_over_ib": true})
            );
            assert_eq!(
                f.state().configured.get(&C).map(BTreeMap::len),
                Some(0),
                "{version}: UFM lists the empty partition"
            );
        } else {
            assert!(created.is_empty(), "{version}: {sent:?}");
            assert!(!f.state().configured.contains_key(&C));
        }
        // Partitions that exist, or that this apply fills, are never re-created.
        assert!(
            sent.iter().all(|c| !c.ends_with("/pkeys/add") || creates),
            "{sent:?}"
        );
        let n = f.changes().len();
        sm.apply().expect("an empty apply");
        assert_eq!(f.changes().len(), n, "an empty apply sends nothing");
    }
}

// ---------------------------------------------------------------------------
// Secrets (issue 18 item 10): an answer is never quoted in an error, so a UFM or
// a proxy that echoes the password — in any encoding — cannot put it there.

/// A password that reads differently in every encoding.
const ODD_PASSWORD: &str = "s3cr3t/\"pass\" w+rd&100%\\end";

#[test]
fn an_answer_echoing_the_password_in_any_encoding_is_never_quoted() {
    for form in FORMS {
        for (method, path, status, ct) in [
            ("GET", "/ufmRest/app/ufm_version", 500, "text/plain"),
            ("GET", "/ufmRest/app/ufm_version", 500, "application/json"),
            ("GET", "/ufmRest/app/ufm_version", 404, "application/json"),
            ("GET", "/ufmRest/app/ufm_version", 200, "application/json"),
            ("GET", "/ufmRest/app/ufm_version", 200, "text/html"),
            ("GET", "/ufmRest/resources/pkeys/?", 200, "application/json"),
            ("GET", "/ufmRest/resources/pkeys/?", 400, "text/plain"),
        ] {
            let f = FakeUfm::with_tenant_a();
            f.state().password = Some(ODD_PASSWORD.to_string());
            let creds = f.pki.dir.path().join("odd.credentials");
            write_private(&creds, &format!("{USER}:{ODD_PASSWORD}\n"));
            let mut cfg = f.config();
            cfg.credentials = Credentials::File { path: creds };
            cfg.retries = 0;
            let sm = f.sm_with(cfg);
            f.fault(method, path, Fault::EchoAs(status, ct, form), 10);
            let e = sm.observe(&[OLD]).expect_err("echo");
            let shown = format!("{e}\n{e:?}");
            for (what, secret) in FORMS
                .iter()
                .map(|f| (format!("{f:?}"), encoded(*f, ODD_PASSWORD)))
                .chain([(
                    "Authorization".to_string(),
                    base64(format!("{USER}:{ODD_PASSWORD}").as_bytes()),
                )])
            {
                assert!(
                    !shown.contains(&secret),
                    "{form:?} echo, {status} {ct} on {path}: the password ({what}) is shown: {shown}"
                );
            }
            assert!(!shown.contains("ufm-echo"), "the body is quoted: {shown}");
            if status != 200 {
                assert!(shown.contains(&format!("HTTP {status}")), "{shown}");
                assert!(shown.contains(ct), "the content type is named: {shown}");
                let len = echo_body(form, ODD_PASSWORD).len();
                assert!(
                    shown.contains(&format!("{len} bytes")),
                    "the length is named: {shown}"
                );
            }
            assert!(e.to_string().contains("Hint:"), "{e}");
        }
    }
}

/// issue 18 item 6: `ca_file = "/dev/zero"` made devfence grow to 23 GB. A CA
/// file is read only if it is a regular file, up to 1 MiB; a FIFO does not hang.
#[test]
fn a_ca_file_that_is_no_regular_file_or_too_large_is_refused() {
    let f = FakeUfm::start();
    let fifo = f.pki.dir.path().join("ca.fifo");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .expect("mkfifo");
    let big = f.pki.dir.path().join("big.pem");
    std::fs::write(&big, vec![b'A'; (1 << 20) + 1]).expect("write");
    for (ca, want) in [
        (PathBuf::from("/dev/zero"), "not a regular file"),
        (fifo, "not a regular file"),
        (f.pki.dir.path().to_path_buf(), "not a regular file"),
        (big, "more than the 1048576 devfence reads"),
    ] {
        let mut cfg = f.config();
        cfg.ca_file = Some(ca.clone());
        let e = UfmSm::new(cfg).expect_err("refused");
        let s = e.to_string();
        assert!(
            s.contains(want) && s.contains("Hint:"),
            "{}: {s}",
            ca.display()
        );
    }
}

/// issue 18 items 1 and 7 at UFM: a partition no tenant owns that holds a
/// tenant's port, and one that holds ports of two tenants, are error findings
/// from UFM's listing alone (ports' tables agree), naming UFM's configuration.
#[test]
fn posture_finds_foreign_and_shared_partitions_at_ufm() {
    use devfence_fabric::posture::{LedgerGuid, LedgerView, posture};
    let f = FakeUfm::with_tenant_a();
    {
        let mut s = f.state();
        // acme holds OLD (in A); globex holds NEW; 0x0500 is nobody's.
        s.configured
            .entry(B)
            .or_default()
            .insert(NEW.0, Membership::Full);
        for g in [OLD, NEW] {
            s.configured
                .entry(0x0500)
                .or_default()
                .insert(g.0, Membership::Limited);
        }
    }
    f.sweep();
    let sm = f.sm();
    let ledger = LedgerView {
        tenant_pkeys: [(A, "acme".to_string()), (B, "globex".to_string())]
            .into_iter()
            .collect(),
        guids: vec![
            LedgerGuid {
                guid: OLD,
                device: "0000:3b:00.1".into(),
                tenant: Some("acme".into()),
            },
            LedgerGuid {
                guid: NEW,
                device: "0000:3b:00.2".into(),
                tenant: Some("globex".into()),
            },
        ],
    };
    let observed = sm.observe(&[OLD, NEW]);
    let configured = sm.configured_members();
    let found = posture(
        "ufm",
        configured.as_ref().map(Option::as_deref),
        observed.as_ref(),
        &ledger,
    );
    let subjects: Vec<String> = found.iter().map(|x| x.subject.to_string()).collect();
    let rules: Vec<(&str, &str)> = found
        .iter()
        .zip(&subjects)
        .map(|(x, s)| (x.rule.as_str(), s.as_str()))
        .collect();
    assert!(
        rules.contains(&("FAB-SHARED-PARTITION", "0x0500")),
        "{rules:?}"
    );
    for g in [OLD, NEW] {
        let s = g.to_string();
        assert!(
            rules.contains(&("FAB-FOREIGN-PARTITION", s.as_str())),
            "{rules:?}"
        );
    }
    let shared = found
        .iter()
        .find(|x| x.rule == "FAB-SHARED-PARTITION")
        .expect("shared");
    assert!(
        shared.hint.contains("ufm:/ufmRest/resources/pkeys"),
        "{shared:?}"
    );
    // The bystander's foreign partition holds no tenant port: not reported.
    assert!(!rules.iter().any(|r| r.1 == "0x0ff0"), "{rules:?}");
}
