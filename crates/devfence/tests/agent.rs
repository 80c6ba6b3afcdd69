//! The host agent end to end (issue 12): the real binary's `devfence serve`
//! on a simulated `lab` host (tenants added with the CLI), driven over its
//! Unix socket by a real HTTP client (hyper over a tokio `UnixStream`).
//! Waiting is bounded polling with deadlines; nothing asserts a duration.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devfence_testsupport::{add_tenants, devfence, dv, generate, ok, text};
use serde_json::{Value, json};

const IGB_VF: &str = "0000:5e:10.0";
const DEADLINE: Duration = Duration::from_secs(60);

/// A simulated lab host with tenants acme and globex, in a scratch directory
/// others may traverse (the tests connect as other users too).
fn host() -> (tempfile::TempDir, PathBuf) {
    let tmp = devfence_testsupport::scratch("devfence-agent-");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = tmp.path().join("lab");
    generate("lab", &root, &[]);
    add_tenants(&root, 2);
    (tmp, root)
}

/// A running `devfence serve`, stopped (SIGKILL) when dropped.
struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(root: &Path, socket: &Path, extra: &[&str]) -> Agent {
        let child = devfence()
            .arg("--root")
            .arg(root)
            .args(["serve", "--socket"])
            .arg(socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start devfence serve");
        let mut a = Agent {
            child,
            socket: socket.to_path_buf(),
        };
        devfence_testsupport::wait_serving(&mut a.child, socket, DEADLINE);
        a
    }

    fn get(&self, path: &str) -> (u16, Value) {
        request(&self.socket, "GET", path, None)
    }

    fn post(&self, path: &str, body: &[u8]) -> (u16, Value) {
        request(&self.socket, "POST", path, Some(body))
    }

    /// Polls the operation until it is no longer running.
    fn wait_op(&self, id: &str) -> Value {
        let until = Instant::now() + DEADLINE;
        loop {
            let (s, v) = self.get(&format!("/v1/operations/{id}"));
            assert_eq!(s, 200, "{v}");
            if v["state"] != "running" {
                return v;
            }
            assert!(Instant::now() < until, "{id} still running: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request over the Unix socket; the status and the body (JSON,
/// else the text as a JSON string).
fn request(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
    let (status, v) = devfence_testsupport::request(socket, method, path, body);
    conforms(method, path, status, &v);
    (status, v)
}

/// Every answer the agent gives in these tests is what its OpenAPI document
/// (generated from the handlers' types) says it is.
fn conforms(method: &str, path: &str, status: u16, v: &Value) {
    use devfence_agent::openapi;
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(openapi::document);
    let path = path.split('?').next().unwrap_or(path);
    let route = devfence_agent::api::route_of(method, path);
    let schema =
        openapi::answer_schema(doc, method, route, status).unwrap_or_else(|e| panic!("{e}: {v}"));
    if let Err(e) = openapi::validate(doc, &schema, v) {
        panic!("{method} {path} answered {status} off its documented schema: {e}\n{v}");
    }
}

/// A read, an assign through POST /v1/operations polled to success, its
/// audit records naming the actor, and the metrics after it.
#[test]
fn an_assign_through_the_agent_is_audited_with_its_actor_and_counted() {
    let (tmp, root) = host();
    let a = Agent::start(&root, &tmp.path().join("agent.sock"), &[]);
    let (s, t) = a.get("/v1/tenants");
    assert_eq!(s, 200, "{t}");
    let ids: Vec<&str> = t
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "globex"]);
    let (s, inv) = a.get("/v1/inventory");
    assert_eq!(s, 200);
    assert!(
        inv.to_string().contains(IGB_VF),
        "the inventory lists the VF"
    );

    let (s, plan) = a.post(
        "/v1/plan",
        json!({ "device": IGB_VF, "tenant": "acme" })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(s, 200, "{plan}");
    assert!(!plan["steps"].as_array().unwrap().is_empty(), "{plan}");

    let body = json!({ "kind": "assign", "device": IGB_VF, "tenant": "acme", "vm": "vm1" });
    let (s, started) = a.post("/v1/operations", body.to_string().as_bytes());
    assert_eq!(s, 202, "{started}");
    let id = started["id"].as_str().unwrap().to_owned();
    let done = a.wait_op(&id);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["state"]["state"], "ready", "{done}");
    let events = done["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "gate" && e["passed"] == true),
        "{done}"
    );
    assert!(events.iter().any(|e| e["event"] == "finished"), "{done}");
    assert_eq!(done["actor"]["uid"], json!(nix_uid()), "{done}");

    let (s, recs) = a.get(&format!("/v1/audit?device={}", IGB_VF.replace(':', "%3A")));
    assert_eq!(s, 200, "{recs}");
    let recs = recs.as_array().unwrap();
    assert!(!recs.is_empty());
    for r in recs {
        assert_eq!(r["detail"]["actor"]["uid"], json!(nix_uid()), "{r}");
        assert_eq!(r["detail"]["actor"]["via"], "agent", "{r}");
    }
    // The CLI sees what the agent did.
    let st = ok(&dv(&root, &["status", "--json"]));
    assert!(st.contains("\"ready\""), "{st}");
    let (s, v) = a.get("/v1/audit/verify");
    assert_eq!((s, &v["intact"]), (200, &json!(true)), "{v}");

    let (s, m) = a.get("/metrics");
    assert_eq!(s, 200);
    let m = m.as_str().unwrap();
    for line in [
        "devfence_operations_total{kind=\"assign\",outcome=\"succeeded\"} 1",
        "devfence_devices{state=\"ready\"} 1",
        "devfence_requests_total{route=\"/v1/operations\",status=\"202\"} 1",
        "devfence_gate_duration_seconds_count{gate=",
        "devfence_audit_records ",
    ] {
        assert!(m.contains(line), "{line} missing from:\n{m}");
    }
    assert!(!m.contains(IGB_VF), "no BDF as a label value:\n{m}");
    let records: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("devfence_audit_records "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(records >= recs.len() as u64, "{records} < {}", recs.len());
}

fn nix_uid() -> u32 {
    // The test's own uid, as the agent's peer credentials see it.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap()
}

/// Refusals and bad input: each a typed body with the right status.
#[test]
fn refusals_and_bad_input_have_typed_bodies() {
    let (tmp, root) = host();
    let a = Agent::start(&root, &tmp.path().join("agent.sock"), &[]);
    // Refused by the engine: an unknown tenant (the operation fails, typed).
    let body = json!({ "kind": "assign", "device": IGB_VF, "tenant": "nobody" });
    let (s, started) = a.post("/v1/operations", body.to_string().as_bytes());
    assert_eq!(s, 202, "{started}");
    let v = a.wait_op(started["id"].as_str().unwrap());
    assert_eq!(v["state"], "failed", "{v}");
    let e = &v["error"];
    assert_eq!(
        (e["status"].as_u64(), e["code"].as_str()),
        (Some(404), Some("unknown_tenant")),
        "{v}"
    );
    assert!(e["message"].as_str().unwrap().contains("nobody"), "{v}");
    assert!(e["hint"].is_string(), "{v}");
    assert!(e["chain"].is_array(), "{v}");

    // Refused by the engine: the device is held already (409, nothing changed).
    let assign = |tenant: &str| {
        let body = json!({ "kind": "assign", "device": IGB_VF, "tenant": tenant });
        let (s, started) = a.post("/v1/operations", body.to_string().as_bytes());
        assert_eq!(s, 202, "{started}");
        a.wait_op(started["id"].as_str().unwrap())
    };
    assert_eq!(assign("acme")["state"], "succeeded");
    let v = assign("globex");
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(
        (v["error"]["status"].as_u64(), v["error"]["code"].as_str()),
        (Some(409), Some("refused")),
        "{v}"
    );
    assert!(v["error"]["hint"].is_string(), "{v}");
    let (_, m) = a.get("/metrics");
    let m = m.as_str().unwrap();
    assert!(
        m.contains("devfence_operations_total{kind=\"assign\",outcome=\"refused\"} 2"),
        "{m}"
    );

    for (body, status, code, names) in [
        (
            b"{\"kind\": \"assign\",".to_vec(),
            400,
            "invalid_input",
            "not valid JSON",
        ),
        (b"[1,2]".to_vec(), 400, "invalid_input", "must be an object"),
        (
            json!({ "kind": "assign", "device": 5, "tenant": "acme" })
                .to_string()
                .into_bytes(),
            400,
            "invalid_input",
            "\"device\"",
        ),
        (
            json!({ "kind": "steal", "device": IGB_VF })
                .to_string()
                .into_bytes(),
            400,
            "invalid_input",
            "\"kind\"",
        ),
        (
            json!({ "kind": "assign", "device": IGB_VF })
                .to_string()
                .into_bytes(),
            400,
            "invalid_input",
            "\"tenant\"",
        ),
        (
            json!({ "kind": "assign", "device": "0000:zz", "tenant": "acme" })
                .to_string()
                .into_bytes(),
            400,
            "invalid_input",
            "\"device\"",
        ),
        (
            json!({ "kind": "release", "device": IGB_VF, "extra": 1 })
                .to_string()
                .into_bytes(),
            400,
            "invalid_input",
            "\"extra\"",
        ),
        (
            vec![b' '; 100 << 10],
            413,
            "body_too_large",
            "larger than 65536",
        ),
    ] {
        let (s, v) = a.post("/v1/operations", &body);
        assert_eq!(s, status, "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert_eq!(v["status"], status, "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(names),
            "{names}: {v}"
        );
        assert!(v["hint"].is_string(), "{v}");
    }
    let (s, v) = a.get("/v1/operations/op-999");
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("unknown_operation")),
        "{v}"
    );
    let (s, v) = a.get("/v1/nothing");
    assert_eq!((s, v["code"].as_str()), (404, Some("no_such_route")), "{v}");
    let (s, v) = a.get("/v1/operations");
    assert_eq!(
        (s, v["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{v}"
    );
    let (s, v) = a.get("/v1/audit?device=bogus");
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_input")), "{v}");
    // The agent still serves after all of it.
    assert_eq!(a.get("/v1/status").0, 200);
}

/// One agent per socket; a socket path taken by a file is refused and the
/// file kept; a dead agent's socket is replaced.
#[test]
fn a_second_agent_and_a_file_at_the_socket_path_are_refused() {
    let (tmp, root) = host();
    let sock = tmp.path().join("agent.sock");
    let a = Agent::start(&root, &sock, &[]);
    let o = dv(&root, &["serve", "--socket", sock.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let e = text(&o);
    assert!(
        e.contains("Another devfence agent serves") && e.contains(&format!("pid {}", a.child.id())),
        "{e}"
    );
    assert_eq!(a.get("/v1/status").0, 200, "the first agent still serves");

    let file = tmp.path().join("taken.sock");
    std::fs::write(&file, "not a socket").unwrap();
    let o = dv(&root, &["serve", "--socket", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("is a regular file, not a socket"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "not a socket",
        "never removed"
    );

    // A socket something else answers on (no agent's lock): refused, kept.
    let other = tmp.path().join("other.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
    let o = dv(&root, &["serve", "--socket", other.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("Something answers on"), "{}", text(&o));
    assert!(other.exists(), "never removed");

    let stale = tmp.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let b = Agent::start(&root, &stale, &[]);
    assert_eq!(
        b.get("/v1/status").0,
        200,
        "a dead agent's socket is replaced"
    );
}

/// A client that sends half its headers and stalls neither blocks another
/// client nor stays forever: it is dropped after the header timeout.
#[test]
fn a_slowloris_client_does_not_block_others() {
    let (tmp, root) = host();
    let a = Agent::start(
        &root,
        &tmp.path().join("agent.sock"),
        &["--header-timeout", "1"],
    );
    let mut slow = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let mut idle: Vec<_> = (0..50)
        .map(|_| std::os::unix::net::UnixStream::connect(&a.socket).unwrap())
        .collect();
    assert_eq!(a.get("/v1/status").0, 200, "another client is served");
    // The slow one is closed by the agent (EOF, perhaps after a 408).
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = Vec::new();
    let r = slow.read_to_end(&mut buf);
    assert!(r.is_ok(), "the slow connection was not closed: {r:?}");
    // So is a connection that never sent a byte (a thousand idle
    // connections cannot hold the agent's connection slots).
    let mut quiet = idle.pop().unwrap();
    quiet.set_read_timeout(Some(DEADLINE)).unwrap();
    let r = quiet.read_to_end(&mut buf);
    assert!(r.is_ok(), "the idle connection was not closed: {r:?}");
    idle.clear();
    assert_eq!(a.get("/v1/status").0, 200);
}

/// Who may do what, from the peer's credentials over the real socket:
/// a reader reads but may not act (403), an outsider gets 403. The clients
/// run as another user (this test's own binary, re-run with `setuid`) when
/// the tests run as root; otherwise the test's own user is the outsider.
#[test]
fn readers_read_and_outsiders_are_refused() {
    let (tmp, root) = host();
    std::fs::create_dir_all(root.join("etc/devfence")).unwrap();
    std::fs::write(
        root.join("etc/devfence/devfence.toml"),
        "[agent]\nreader_group = 4242\nadmin_group = 4343\n",
    )
    .unwrap();
    let a = Agent::start(&root, &tmp.path().join("agent.sock"), &[]);
    let mode = std::fs::metadata(&a.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    if nix_uid() != 0 {
        let (s, v) = a.get("/v1/status");
        assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
        return;
    }
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&a.socket).unwrap()),
        4242,
        "the socket is the reader group's"
    );
    let as_user = |uid: u32, gid: u32, method: &str, path: &str| -> (u16, Value) {
        let o = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "client_as_another_user",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                "DEVFENCE_AGENT_CLIENT",
                format!("{method} {path} {}", a.socket.display()),
            )
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("AGENT-ANSWER "))
            .unwrap_or_else(|| panic!("no answer: {out}\n{}", String::from_utf8_lossy(&o.stderr)));
        let (s, v) = line.split_once(' ').unwrap();
        (s.parse().unwrap(), serde_json::from_str(v).unwrap())
    };
    let (s, v) = as_user(65534, 4242, "GET", "/v1/status");
    assert_eq!(s, 200, "a reader reads: {v}");
    let (s, v) = as_user(65534, 4242, "POST", "/v1/plan");
    assert_eq!(
        (s, v["code"].as_str()),
        (403, Some("forbidden")),
        "a reader may not act: {v}"
    );
    assert!(v["message"].as_str().unwrap().contains("uid 65534"), "{v}");
    // An outsider who can reach the socket (a looser mode) is still refused.
    std::fs::set_permissions(&a.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (s, v) = as_user(65534, 65534, "GET", "/v1/status");
    assert_eq!(
        (s, v["code"].as_str()),
        (403, Some("forbidden")),
        "an outsider: {v}"
    );
    assert!(v["hint"].as_str().unwrap().contains("reader_group"), "{v}");
}

/// The client half of [`readers_read_and_outsiders_are_refused`]: run by that
/// test as another user with `DEVFENCE_AGENT_CLIENT="METHOD PATH SOCKET"`;
/// without it there is nothing to do.
#[test]
fn client_as_another_user() {
    let Ok(spec) = std::env::var("DEVFENCE_AGENT_CLIENT") else {
        return;
    };
    let mut p = spec.splitn(3, ' ');
    let (m, path, sock) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
    let body = (m == "POST").then_some(&b"{\"device\": \"0000:5e:10.0\"}"[..]);
    let (s, v) = request(Path::new(sock), m, path, body);
    println!("\nAGENT-ANSWER {s} {v}");
}

/// The device's state in `GET /v1/status`, if the ledger has it.
fn state_of(a: &Agent, device: &str) -> Option<String> {
    let (s, v) = a.get("/v1/status");
    assert_eq!(s, 200, "{v}");
    v["devices"].as_array().unwrap().iter().find_map(|d| {
        (d["device"] == device).then(|| d["state"]["state"].as_str().unwrap_or("").to_owned())
    })
}

/// A client that sends its request and goes away at once cancels nothing:
/// the operation runs to its end and is journalled.
#[test]
fn a_client_that_disconnects_does_not_cancel_its_operation() {
    let (tmp, root) = host();
    let a = Agent::start(&root, &tmp.path().join("agent.sock"), &[]);
    let body = json!({ "kind": "assign", "device": IGB_VF, "tenant": "globex" }).to_string();
    let mut s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
    write!(
        s,
        "POST /v1/operations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    let until = Instant::now() + DEADLINE;
    while state_of(&a, IGB_VF).as_deref() != Some("ready") {
        assert!(
            Instant::now() < until,
            "the operation did not finish: {:?}",
            state_of(&a, IGB_VF)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, ops) = a.get("/v1/operations/op-1");
    assert_eq!(ops["state"], "succeeded", "{ops}");
}

/// Connections beyond the cap are closed as they arrive (and counted); the
/// agent serves again once the idle ones are gone.
#[test]
fn connections_beyond_the_cap_are_closed() {
    let (tmp, root) = host();
    let a = Agent::start(
        &root,
        &tmp.path().join("agent.sock"),
        &["--max-connections", "3"],
    );
    let idle: Vec<_> = (0..3)
        .map(|_| std::os::unix::net::UnixStream::connect(&a.socket).unwrap())
        .collect();
    // Each idle connection holds a permit once the agent has accepted it; a
    // fourth is closed (EOF) — bounded polling until one is.
    let until = Instant::now() + DEADLINE;
    loop {
        let mut extra = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 1];
        if matches!(extra.read(&mut b), Ok(0)) {
            break;
        }
        assert!(
            Instant::now() < until,
            "a connection beyond the cap was kept"
        );
    }
    drop(idle);
    let until = Instant::now() + DEADLINE;
    let m = loop {
        // The permits come back as the agent sees the idle ones close. Until
        // then a probe is closed on arrival, and writing to it may fail with
        // EPIPE: that is "not yet", like an empty answer.
        if let Ok(mut probe) = std::os::unix::net::UnixStream::connect(&a.socket) {
            let sent =
                probe.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            if sent.is_ok() {
                let _ = probe.read_to_string(&mut out);
            }
            if out.starts_with("HTTP/1.1 200") {
                break out;
            }
        }
        assert!(Instant::now() < until, "the agent did not serve again");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(m.contains("devfence_connections_refused_total "), "{m}");
    assert!(!m.contains("devfence_connections_refused_total 0"), "{m}");
}

/// SIGTERM ends the agent cleanly: exit 0, the socket removed, its lock
/// released for the next agent.
#[test]
fn sigterm_stops_the_agent_and_removes_its_socket() {
    let (tmp, root) = host();
    let sock = tmp.path().join("agent.sock");
    let mut a = Agent::start(&root, &sock, &[]);
    // The shell's own kill: no procps needed.
    let k = Command::new("sh")
        .args(["-c", "kill -TERM \"$0\"", &a.child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let until = Instant::now() + DEADLINE;
    let st = loop {
        if let Some(st) = a.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < until, "the agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "{st}");
    assert!(!sock.exists(), "the socket is removed");
    let b = Agent::start(&root, &sock, &[]);
    assert_eq!(b.get("/v1/status").0, 200);
}

/// `[agent] metrics_tcp`: GET /metrics on a loopback address, and nothing else there.
#[test]
fn metrics_on_the_loopback_address() {
    let (tmp, root) = host();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all(root.join("etc/devfence")).unwrap();
    std::fs::write(
        root.join("etc/devfence/devfence.toml"),
        format!("[agent]\nmetrics_tcp = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let _a = Agent::start(&root, &tmp.path().join("agent.sock"), &[]);
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let m = get("/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(m.contains("devfence_devices{state=\"free\"}"), "{m}");
    let s = get("/v1/status");
    assert!(
        s.starts_with("HTTP/1.1 404") && s.contains("no_such_route"),
        "{s}"
    );
}

/// Operations on two devices run side by side, each to success, while reads
/// are served; two on one device: one wins, the other is refused (409).
#[test]
fn concurrent_operations() {
    const IGB_VF2: &str = "0000:5e:10.2";
    let (tmp, root) = host();
    let a = Agent::start(&root, &tmp.path().join("agent.sock"), &[]);
    let start = |device: &str, tenant: &str| {
        let body = json!({ "kind": "assign", "device": device, "tenant": tenant });
        let (s, v) = a.post("/v1/operations", body.to_string().as_bytes());
        assert_eq!(s, 202, "{v}");
        v["id"].as_str().unwrap().to_owned()
    };
    let (x, y) = (start(IGB_VF, "acme"), start(IGB_VF2, "globex"));
    assert_eq!(a.get("/v1/status").0, 200, "reads are served meanwhile");
    for id in [&x, &y] {
        let v = a.wait_op(id);
        assert_eq!(v["state"], "succeeded", "{v}");
    }
    // Both released at once: two operations, one device each.
    let rel = |device: &str| {
        let body = json!({ "kind": "release", "device": device });
        let (s, v) = a.post("/v1/operations", body.to_string().as_bytes());
        assert_eq!(s, 202, "{v}");
        v["id"].as_str().unwrap().to_owned()
    };
    let (p, q) = (rel(IGB_VF), rel(IGB_VF));
    let (vp, vq) = (a.wait_op(&p), a.wait_op(&q));
    let mut states = [vp["state"].as_str().unwrap(), vq["state"].as_str().unwrap()];
    states.sort_unstable();
    assert_eq!(states, ["failed", "succeeded"], "{vp}\n{vq}");
    let failed = if vp["state"] == "failed" { &vp } else { &vq };
    assert_eq!(failed["error"]["status"], 409, "{failed}");
    assert_eq!(state_of(&a, IGB_VF).as_deref(), Some("free"));
}
