//! The host agent as a service (issue 12 items 7 and 8), end to end: a real
//! `devfence serve` on a simulated host, systemd's notification socket
//! played by a datagram socket the test binds, signals sent as systemd
//! would, the log read from the agent's standard error, the audit export
//! read from its file or syslog socket. Waiting is bounded polling with
//! deadlines; nothing asserts a duration.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devfence_testsupport::{add_tenants, devfence, dv, generate, ok};
use serde_json::{Value, json};

const IGB_VF: &str = "0000:5e:10.0";
const IB_VF: &str = "0000:3b:00.3";
const DEADLINE: Duration = Duration::from_secs(60);

fn host(profile: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = devfence_testsupport::scratch("devfence-svc-");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = tmp.path().join("h");
    generate(profile, &root, &[]);
    add_tenants(&root, 2);
    (tmp, root)
}

/// systemd's side of `sd_notify`: a datagram socket at a path.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// Waits for a message with the line `line`; returns the messages
    /// received up to and including it.
    fn wait_for(&mut self, line: &str) -> Vec<String> {
        let until = Instant::now() + DEADLINE;
        let mut got = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(m.clone());
                got.push(m.clone());
                if m.lines().any(|l| l == line) {
                    return got;
                }
            }
            assert!(
                Instant::now() < until,
                "no {line} from the agent; got {:?}",
                self.seen
            );
        }
    }
}

/// A running `devfence serve` with its standard error collected.
struct Agent {
    child: Child,
    socket: PathBuf,
    log: Arc<Mutex<String>>,
    /// The thread that copies stderr into `log`; done at the pipe's end.
    reader: std::thread::JoinHandle<()>,
}

impl Agent {
    fn spawn(root: &Path, socket: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut cmd = devfence();
        cmd.arg("--root")
            .arg(root)
            .args(["serve", "--socket"])
            .arg(socket)
            .args(extra)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("DEVFENCE_FAILPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start devfence serve");
        let log = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let l2 = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                l2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Agent {
            child,
            socket: socket.to_path_buf(),
            log,
            reader,
        }
    }

    /// Started and answering (polls until a status answers).
    fn start(root: &Path, socket: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut a = Agent::spawn(root, socket, extra, env);
        let until = Instant::now() + DEADLINE;
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Some(st) = a.child.try_wait().unwrap() {
                panic!("the agent exited ({st}): {}", a.log());
            }
            assert!(Instant::now() < until, "not serving: {}", a.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        a
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_log(&self, needle: &str) -> String {
        let until = Instant::now() + DEADLINE;
        loop {
            let l = self.log();
            if l.contains(needle) {
                return l;
            }
            assert!(Instant::now() < until, "no {needle:?} in the log:\n{l}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn get(&self, path: &str) -> (u16, Value) {
        request(&self.socket, "GET", path, None)
    }

    fn op(&self, body: &Value) -> Value {
        let (s, v) = request(
            &self.socket,
            "POST",
            "/v1/operations",
            Some(body.to_string().as_bytes()),
        );
        assert_eq!(s, 202, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let until = Instant::now() + DEADLINE;
        loop {
            let (_, v) = self.get(&format!("/v1/operations/{id}"));
            if v["state"] != "running" {
                return v;
            }
            assert!(Instant::now() < until, "{id} still running: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let k = Command::new("sh")
            .args([
                "-c",
                &format!("kill -{sig} \"$0\""),
                &self.child.id().to_string(),
            ])
            .status()
            .unwrap();
        assert!(k.success());
    }

    /// SIGTERM, then the exit status, once the log holds everything the
    /// agent wrote (its last lines can still be in the pipe when it has
    /// exited: CI saw "stopped" missing from a log read right after the exit).
    fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                while !self.reader.is_finished() {
                    assert!(Instant::now() < until, "the agent's stderr did not end");
                    std::thread::sleep(Duration::from_millis(5));
                }
                return st;
            }
            assert!(Instant::now() < until, "the agent did not stop on SIGTERM");
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

/// One request over the agent's socket (devfence-testsupport).
fn request(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
    devfence_testsupport::request(socket, method, path, body)
}

/// The seqs of the complete lines of an export file.
fn seqs_in(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// The newest seq of the chain, as the CLI reads it.
fn head_seq(root: &Path) -> u64 {
    let v = devfence_testsupport::json(&dv(root, &["audit", "head", "--json"]));
    v["head"]["seq"].as_u64().unwrap_or(0)
}

/// Polls until the union of `files` holds seqs 1..=head (returns them in
/// file order).
fn wait_exported(root: &Path, files: &[&Path]) -> Vec<u64> {
    let want = head_seq(root);
    let until = Instant::now() + DEADLINE;
    loop {
        let all: Vec<u64> = files.iter().flat_map(|f| seqs_in(f)).collect();
        if all.last() == Some(&want) {
            return all;
        }
        assert!(
            Instant::now() < until,
            "exported {all:?}, the chain is at {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// READY=1 comes after recovery and the socket bound (a status answers as
/// soon as it is received), WATCHDOG=1 at half WATCHDOG_USEC, STATUS lines,
/// STOPPING=1 on SIGTERM, and an exit 0.
#[test]
fn readiness_watchdog_and_stopping_are_notified() {
    let (tmp, root) = host("lab");
    let mut n = NotifySocket::bind(tmp.path());
    let mut a = Agent::spawn(
        &root,
        &tmp.path().join("agent.sock"),
        &[],
        &[
            ("NOTIFY_SOCKET", n.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let before: Vec<String> = n
        .wait_for("READY=1")
        .into_iter()
        .filter(|m| m != "WATCHDOG=1")
        .collect();
    assert!(
        before[0].contains("STATUS=recovering"),
        "recovery is announced before READY: {before:?}"
    );
    // Ready means served: the first request after READY=1 is answered.
    let (s, v) = a.get("/v1/status");
    assert_eq!(s, 200, "{v}");
    assert!(
        before.last().unwrap().contains("STATUS=serving"),
        "{before:?}"
    );
    n.wait_for("WATCHDOG=1");
    n.wait_for("WATCHDOG=1");
    a.signal("TERM");
    let stopping = n.wait_for("STOPPING=1");
    assert!(
        stopping.last().unwrap().contains("STATUS=stopping"),
        "{stopping:?}"
    );
    assert!(a.stop().success(), "{}", a.log());
    let log = a.log();
    assert!(log.contains("serving") && log.contains("stopped"), "{log}");
    assert!(!log.contains('\u{1b}'), "no colours: {log}");
}

/// `NOTIFY_SOCKET` may name an abstract socket (`@name`), as systemd's
/// does in some setups.
#[test]
fn an_abstract_notify_socket() {
    use std::os::linux::net::SocketAddrExt;
    let (tmp, root) = host("lab");
    let name = format!("devfence-svc-test-{}", std::process::id());
    let sock = UnixDatagram::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap(),
    )
    .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut n = NotifySocket {
        sock,
        path: PathBuf::new(),
        seen: Vec::new(),
    };
    let mut a = Agent::spawn(
        &root,
        &tmp.path().join("agent.sock"),
        &[],
        &[("NOTIFY_SOCKET", &format!("@{name}"))],
    );
    n.wait_for("READY=1");
    a.signal("TERM");
    n.wait_for("STOPPING=1");
    assert!(a.stop().success(), "{}", a.log());
}

/// A restart recovers what a crash interrupted before it serves: an IB VF
/// handover killed after the new GUID was set (the CLI aborts at the
/// failpoint), then the agent: its first status has no open operation, the
/// audit log and the agent's log show the recovery.
#[test]
fn a_restart_recovers_before_it_serves() {
    let (tmp, root) = host("lab");
    ok(&dv(&root, &["assign", IB_VF, "--tenant", "acme"]));
    let crashed = devfence()
        .arg("--root")
        .arg(&root)
        .args(["handover", IB_VF, "--to", "globex"])
        .env("DEVFENCE_FAILPOINT", "handover:guid-set:acted")
        .output()
        .unwrap();
    assert!(!crashed.status.success(), "the failpoint aborts");
    let st = devfence_testsupport::json(&dv(&root, &["status", "--json"]));
    assert_eq!(
        st["open_operations"].as_array().map(Vec::len),
        Some(1),
        "the crash left the handover open: {st}"
    );
    let mut n = NotifySocket::bind(tmp.path());
    let a = Agent::spawn(
        &root,
        &tmp.path().join("agent.sock"),
        &[],
        &[("NOTIFY_SOCKET", n.path.to_str().unwrap())],
    );
    n.wait_for("READY=1");
    let (s, v) = a.get("/v1/status");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["open_operations"], json!([]), "{v}");
    let dev = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == IB_VF)
        .unwrap();
    assert!(
        matches!(dev["state"]["state"].as_str(), Some("free" | "quarantined")),
        "{dev}"
    );
    let (_, audit) = a.get(&format!("/v1/audit?device={}", IB_VF.replace(':', "%3A")));
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["kind"] == "recovery"),
        "{audit}"
    );
    assert!(a.log().contains("recovered operation"), "{}", a.log());
}

/// SIGTERM lets the operation in flight run to its end: the agent exits 0
/// after it, and the ledger has no open operation. (Repeated on fresh hosts
/// until the signal found the operation still running, at most 5 times.)
#[test]
fn sigterm_finishes_the_operation_in_flight() {
    for _ in 0..5 {
        let (tmp, root) = host("lab");
        let mut a = Agent::start(&root, &tmp.path().join("agent.sock"), &[], &[]);
        let body = json!({ "kind": "assign", "device": IB_VF, "tenant": "acme" }).to_string();
        let (s, v) = request(&a.socket, "POST", "/v1/operations", Some(body.as_bytes()));
        assert_eq!(s, 202, "{v}");
        let st = a.stop();
        assert!(st.success(), "{st}: {}", a.log());
        let log = a.log();
        let status = devfence_testsupport::json(&dv(&root, &["status", "--json"]));
        assert_eq!(status["open_operations"], json!([]), "{status}\n{log}");
        let dev = status["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == IB_VF)
            .cloned();
        if log.contains("waiting for 1 operation(s) in flight") {
            assert_eq!(
                dev.map(|d| d["state"]["state"].clone()),
                Some(json!("ready")),
                "the operation in flight ran to its end\n{log}"
            );
            return;
        }
    }
    panic!("the operation always ended before SIGTERM arrived");
}

/// SIGHUP applies what can change live (the socket's group, the audit
/// export's target), reports what needs a restart (the metrics address), and
/// refuses a file that does not parse or names an unknown group: nothing of
/// it is applied.
#[test]
fn sighup_reloads_live_keys_and_refuses_a_bad_file() {
    let (tmp, root) = host("lab");
    let cfg = tmp.path().join("devfence.toml");
    let a_file = root.join("var/log/devfence/a.jsonl");
    let b_file = root.join("var/log/devfence/b.jsonl");
    std::fs::write(
        &cfg,
        "[agent]\nreader_group = 4242\naudit_export = \"/var/log/devfence/a.jsonl\"\n",
    )
    .unwrap();
    let sock = tmp.path().join("agent.sock");
    let mut n = NotifySocket::bind(tmp.path());
    let a = Agent::spawn(
        &root,
        &sock,
        &["--config", cfg.to_str().unwrap()],
        &[("NOTIFY_SOCKET", n.path.to_str().unwrap())],
    );
    n.wait_for("READY=1");
    assert_eq!(std::fs::metadata(&sock).unwrap().gid(), 4242);
    let v = a.op(&json!({ "kind": "assign", "device": IGB_VF, "tenant": "acme" }));
    assert_eq!(v["state"], "succeeded", "{v}");
    let first = wait_exported(&root, &[&a_file]);

    std::fs::write(
        &cfg,
        "[agent]\nreader_group = 4343\naudit_export = \"/var/log/devfence/b.jsonl\"\nmetrics_tcp = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    a.signal("HUP");
    let r = n.wait_for("READY=1");
    assert!(
        r.iter()
            .any(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC=")),
        "{r:?}"
    );
    let log = a.wait_log("needs a restart");
    assert!(log.contains("applied the audit export"), "{log}");
    assert_eq!(std::fs::metadata(&sock).unwrap().gid(), 4343, "{log}");
    let v = a.op(&json!({ "kind": "release", "device": IGB_VF }));
    assert_eq!(v["state"], "succeeded", "{v}");
    let all = wait_exported(&root, &[&a_file, &b_file]);
    assert_eq!(seqs_in(&a_file), first, "nothing more to the old target");
    assert_eq!(
        all,
        (1..=head_seq(&root)).collect::<Vec<_>>(),
        "each record once"
    );

    for bad in [
        "[agent]\nreader_group = 4444\naudit_export = \"/var/log/devfence/c.jsonl\"\nbogus = 1\n",
        "[agent]\nreader_group = 4444\nadmin_group = \"no-such-group-devfence\"\naudit_export = \"/var/log/devfence/c.jsonl\"\n",
    ] {
        std::fs::write(&cfg, bad).unwrap();
        let before = a.log().matches("reload refused").count();
        a.signal("HUP");
        n.wait_for("READY=1");
        let until = Instant::now() + DEADLINE;
        while a.log().matches("reload refused").count() == before {
            assert!(Instant::now() < until, "{}", a.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(std::fs::metadata(&sock).unwrap().gid(), 4343, "{bad}");
        // Requests go on with the running configuration, not the file.
        let (s, v) = a.get("/v1/status");
        assert_eq!(s, 200, "{bad}: {v}");
    }
    assert!(a.log().contains("no-such-group-devfence"), "{}", a.log());
    assert!(a.log().contains("bogus"), "{}", a.log());
    // The running configuration still exports to b.
    std::fs::write(
        &cfg,
        "[agent]\nreader_group = 4343\naudit_export = \"/var/log/devfence/b.jsonl\"\n",
    )
    .unwrap();
    let v = a.op(&json!({ "kind": "assign", "device": IGB_VF, "tenant": "globex" }));
    assert_eq!(v["state"], "succeeded", "{v}");
    wait_exported(&root, &[&a_file, &b_file]);
    assert!(!root.join("var/log/devfence/c.jsonl").exists());
}

/// The export file: every record once, in order; logrotate's rename is
/// noticed (a new file at the path); records appended while the agent was
/// stopped are exported at its next start, none twice.
#[test]
fn the_export_survives_logrotate_and_restarts() {
    let (tmp, root) = host("lab");
    let cfg = tmp.path().join("devfence.toml");
    std::fs::write(
        &cfg,
        "[agent]\naudit_export = \"/var/log/devfence/audit.jsonl\"\n",
    )
    .unwrap();
    let file = root.join("var/log/devfence/audit.jsonl");
    let rotated = root.join("var/log/devfence/audit.jsonl.1");
    let sock = tmp.path().join("agent.sock");
    let args = ["--config", cfg.to_str().unwrap()];
    let mut a = Agent::start(&root, &sock, &args, &[]);
    let v = a.op(&json!({ "kind": "assign", "device": IGB_VF, "tenant": "acme" }));
    assert_eq!(v["state"], "succeeded", "{v}");
    wait_exported(&root, &[&file]);
    for l in std::fs::read_to_string(&file).unwrap().lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        for k in [
            "time", "actor", "action", "target", "outcome", "seq", "hash",
        ] {
            assert!(v.get(k).is_some(), "{k}: {v}");
        }
    }
    let before = seqs_in(&file);
    std::fs::rename(&file, &rotated).unwrap();
    let v = a.op(&json!({ "kind": "release", "device": IGB_VF }));
    assert_eq!(v["state"], "succeeded", "{v}");
    let all = wait_exported(&root, &[&rotated, &file]);
    assert_eq!(all, (1..=head_seq(&root)).collect::<Vec<_>>());
    assert_eq!(
        seqs_in(&rotated),
        before,
        "nothing more into the rotated file"
    );
    assert_eq!(
        seqs_in(&file).first(),
        Some(&(before.last().unwrap() + 1)),
        "a new file at the path, from the next record on"
    );
    assert!(a.stop().success(), "{}", a.log());
    // Rotated again while no agent runs (the new file starts empty), and
    // records written meanwhile: the next agent goes on from the seq it kept.
    let rotated2 = root.join("var/log/devfence/audit.jsonl.2");
    std::fs::rename(&file, &rotated2).unwrap();
    let c = cfg.to_str().unwrap();
    ok(&dv(
        &root,
        &["--config", c, "assign", IGB_VF, "--tenant", "globex"],
    ));
    let _b = Agent::start(&root, &sock, &args, &[]);
    let all = wait_exported(&root, &[&rotated, &rotated2, &file]);
    assert_eq!(
        all,
        (1..=head_seq(&root)).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
}

/// `audit_export = "syslog"`: RFC 5424 datagrams to the configured socket,
/// facility authpriv, one per record, the JSON line as the message.
#[test]
fn the_export_to_syslog() {
    let (tmp, root) = host("lab");
    let cfg = tmp.path().join("devfence.toml");
    std::fs::write(
        &cfg,
        "[agent]\naudit_export = \"syslog\"\nsyslog_socket = \"/run/test-log\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("run")).unwrap();
    let log = UnixDatagram::bind(root.join("run/test-log")).unwrap();
    log.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let a = Agent::start(
        &root,
        &tmp.path().join("agent.sock"),
        &["--config", cfg.to_str().unwrap()],
        &[],
    );
    let v = a.op(&json!({ "kind": "assign", "device": IGB_VF, "tenant": "acme" }));
    assert_eq!(v["state"], "succeeded", "{v}");
    let want = head_seq(&root);
    let mut got = Vec::new();
    let until = Instant::now() + DEADLINE;
    while got.last() != Some(&want) {
        let mut buf = vec![0u8; 1 << 16];
        if let Ok(n) = log.recv(&mut buf) {
            let m = String::from_utf8(buf[..n].to_vec()).unwrap();
            let (head, json) = m.split_once(" audit - ").unwrap();
            let pri: u32 = head[1..head.find('>').unwrap()].parse().unwrap();
            assert_eq!(pri / 8, 10, "authpriv: {m}");
            assert!(head.contains(">1 ") && head.contains(" devfence "), "{m}");
            let v: Value = serde_json::from_str(json).unwrap();
            if v["outcome"] == "succeeded" {
                assert_eq!(pri % 8, 6, "{m}");
            }
            got.push(v["seq"].as_u64().unwrap());
        }
        assert!(Instant::now() < until, "{got:?} of {want}: {}", a.log());
    }
    assert_eq!(got, (1..=want).collect::<Vec<_>>());
}

/// The log: one line per request (route template, status, uid, duration),
/// never a secret: an operation that hands a VF token over, logged at the
/// most verbose level, and the token appears nowhere in the log.
#[test]
fn requests_are_logged_and_the_vf_token_never_is() {
    let (tmp, root) = host("userspace-pf");
    let cfg = tmp.path().join("devfence.toml");
    std::fs::write(
        &cfg,
        "[agent]\naudit_export = \"/var/log/devfence/audit.jsonl\"\n",
    )
    .unwrap();
    let a = Agent::start(
        &root,
        &tmp.path().join("agent.sock"),
        &["--config", cfg.to_str().unwrap()],
        &[("DEVFENCE_LOG", "trace")],
    );
    let v = a.op(&json!({ "kind": "assign", "device": "0000:af:10.2", "tenant": "acme" }));
    assert_eq!(v["state"], "succeeded", "{v}");
    let tf = v["result"]["token_file"]
        .as_str()
        .expect("a token was handed over");
    let token = std::fs::read_to_string(root.join(tf.trim_start_matches('/'))).unwrap();
    let token = token.trim();
    assert!(token.len() >= 16, "{token:?}");
    let log = a.wait_log("request GET /v1/operations/{id} 200 uid=");
    assert!(
        log.contains("request POST /v1/operations 202 uid="),
        "{log}"
    );
    assert!(log.contains("ms\n"), "{log}");
    assert!(!log.contains(token), "the VF token is in the log:\n{log}");
    let export = root.join("var/log/devfence/audit.jsonl");
    wait_exported(&root, &[&export]);
    let lines = std::fs::read_to_string(&export).unwrap();
    assert!(
        lines.contains("token-set"),
        "the token's steps are exported"
    );
    assert!(
        !lines.contains(token),
        "the VF token is in the audit export"
    );
    assert!(
        !log.contains("0000:af:10.2"),
        "paths with ids are not logged as such: {log}"
    );
    // journald: the priority prefix, no timestamp.
    let b = Agent::start(
        &root,
        &tmp.path().join("b.sock"),
        &["--log-level", "debug"],
        &[("JOURNAL_STREAM", "8:1234")],
    );
    let log = b.wait_log("serving");
    let first = log.lines().next().unwrap();
    assert!(first.starts_with("<6> INFO "), "{first}");
    let bad = devfence()
        .arg("--root")
        .arg(&root)
        .args(["serve", "--log-level", "loud", "--socket"])
        .arg(tmp.path().join("c.sock"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("Hint:"));
}
