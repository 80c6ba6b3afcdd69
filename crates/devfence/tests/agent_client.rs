//! The CLI and the libvirt hook through the host agent (issue 12 item 3): the
//! same commands on two identical simulated `lab` hosts, one served by a real
//! `devfence serve` at its default socket (the CLI goes through it), one
//! without (the CLI acts directly), print the same (human and `--json`) and
//! exit the same. The agent's own audit records (`actor.via = "agent"`) prove
//! which path each took. Waiting is bounded polling with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use devfence_testsupport::{add_tenants, devfence, dv, generate, text};
use serde_json::Value;

const IGB_VF: &str = "0000:5e:10.0";
const IGB_VF2: &str = "0000:5e:10.2";
const UUID: &str = "8f2c6a1e-4b7d-4e0a-9c3f-2d1b5e6a7c80";
const DEADLINE: Duration = Duration::from_secs(60);

/// A lab host with tenants acme and globex under `tmp/name`.
fn host(tmp: &Path, name: &str) -> PathBuf {
    let root = tmp.join(name);
    generate("lab", &root, &[]);
    add_tenants(&root, 2);
    root
}

fn scratch() -> tempfile::TempDir {
    let tmp = devfence_testsupport::scratch("devfence-client-");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

/// A running `devfence serve` at the host's default socket, killed when dropped.
struct Agent {
    child: Child,
}

impl Agent {
    fn start(root: &Path) -> Agent {
        let socket = root.join("run/devfence/devfence.sock");
        let child = devfence()
            .arg("--root")
            .arg(root)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start devfence serve");
        let mut a = Agent { child };
        devfence_testsupport::wait_serving(&mut a.child, &socket, DEADLINE);
        a
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Output with the host's root named `<ROOT>` and every duration (`12 ms`,
/// `"elapsed_ms": 12`) as `N`: the rest must be byte for byte the same.
fn normal(s: &str, root: &Path) -> String {
    let s = s.replace(&root.display().to_string(), "<ROOT>");
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let j = (i..b.len())
                .find(|&j| !b[j].is_ascii_digit())
                .unwrap_or(b.len());
            let after = &s[j..];
            let before = out.trim_end_matches([' ', '"', ':']);
            if after.starts_with(" ms") || before.ends_with("_ms") || before.ends_with("\"ms") {
                out.push('N');
            } else {
                out.push_str(&s[i..j]);
            }
            i = j;
        } else {
            let c = s[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    // Durations are right-aligned in their brackets: `[   N ms]`.
    while out.contains("[ ") {
        out = out.replace("[ ", "[");
    }
    out
}

/// What a command printed and how it exited, normalized.
fn seen(o: &Output, root: &Path) -> (Option<i32>, String, String) {
    (
        o.status.code(),
        normal(&String::from_utf8_lossy(&o.stdout), root),
        normal(&String::from_utf8_lossy(&o.stderr), root),
    )
}

/// Runs `args` on both hosts and asserts they print and exit the same.
fn same(agent_root: &Path, direct_root: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let a = seen(&dv(agent_root, args), agent_root);
    let d = seen(&dv(direct_root, args), direct_root);
    assert_eq!(
        a, d,
        "{args:?} differs through the agent (left) and direct (right)"
    );
    a
}

/// Calls the hook as libvirt does, the domain XML on stdin.
fn hook(root: &Path, pre: &[&str], name: &str, op: &str, subop: &str, xml: &str) -> Output {
    let mut child = devfence()
        .arg("--root")
        .arg(root)
        .args(pre)
        .args(["hook", "qemu", name, op, subop, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A hook that decides without the XML (an operation it ignores) may exit
    // before reading it: the write then meets a closed pipe, as libvirt's would.
    match child.stdin.take().unwrap().write_all(xml.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.unwrap(),
    }
    child.wait_with_output().unwrap()
}

fn hostdev(bdf: &str) -> String {
    let (dom, rest) = bdf.split_at(4);
    format!(
        "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x{dom}' \
         bus='0x{}' slot='0x{}' function='0x{}'/></source></hostdev>",
        &rest[1..3],
        &rest[4..6],
        &rest[7..8]
    )
}

fn domain(name: &str, uuid: Option<&str>, tenant: Option<&str>, devices: &str) -> String {
    let uuid = uuid.map_or(String::new(), |u| format!("<uuid>{u}</uuid>"));
    let meta = tenant.map_or(String::new(), |t| {
        format!(
            "<metadata><devfence:tenant xmlns:devfence='https://devfence.dev/xmlns/libvirt/1' \
             id='{t}'/></metadata>"
        )
    });
    format!(
        "<domain type='kvm'><name>{name}</name>{uuid}{meta}<devices>{devices}</devices></domain>"
    )
}

/// The audit records of `dev` as JSON (read directly: the ledger is the truth).
fn audit(root: &Path, dev: &str) -> Vec<Value> {
    let o = dv(
        root,
        &["--direct", "audit", "show", "--device", dev, "--json"],
    );
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice::<Value>(&o.stdout).unwrap()["items"]
        .as_array()
        .unwrap()
        .clone()
}

fn via_agent(records: &[Value]) -> usize {
    records
        .iter()
        .filter(|r| r["detail"]["actor"]["via"] == "agent")
        .count()
}

fn device_state(root: &Path, dev: &str) -> String {
    let o = dv(root, &["--direct", "status", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == dev)
        .map(|d| d["state"]["state"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Plan, assign, handover, release (human and `--json`), a refusal, an
/// unknown tenant, check and recover: the same output and exit status
/// through the agent as direct; the agent host's records say the agent did it.
#[test]
fn the_same_commands_print_the_same_through_the_agent_and_direct() {
    let tmp = scratch();
    let (ra, rd) = (host(tmp.path(), "a"), host(tmp.path(), "d"));
    let _agent = Agent::start(&ra);
    let steps: [&[&str]; 18] = [
        &["plan", IGB_VF, "--to", "acme"],
        &["plan", IGB_VF, "--to", "acme", "--json"],
        &["assign", IGB_VF, "--tenant", "acme", "--vm", "vm1"],
        &["handover", IGB_VF, "--to", "globex", "--dry-run"],
        &["handover", IGB_VF, "--to", "globex", "--json"],
        &["release", IGB_VF],
        &["release", IGB_VF],
        &["release", IGB_VF, "--json"],
        &["assign", IGB_VF2, "--tenant", "nobody"],
        &["assign", IGB_VF2, "--tenant", "acme", "--json"],
        &["check"],
        &["check", "--json"],
        &["recover"],
        &["recover", "--json"],
        &["tenant", "list"],
        &["tenant", "list", "--json"],
        &["status"],
        &["status", "--json"],
    ];
    let mut exits = Vec::new();
    for args in steps {
        exits.push(same(&ra, &rd, args).0);
    }
    assert_eq!(
        exits,
        [0, 0, 0, 0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]
            .map(Some)
            .to_vec(),
        "exit statuses"
    );
    let (a, d) = (audit(&ra, IGB_VF), audit(&rd, IGB_VF));
    assert!(
        via_agent(&a) > 0,
        "the agent host's CLI went through the agent"
    );
    assert_eq!(via_agent(&d), 0, "the other acted directly");
    assert_eq!(a.len(), d.len(), "the same records either way");
    // The reads, on the one host, through the agent and with --direct (the
    // records themselves differ between the hosts: the agent's name it).
    for args in [
        &["audit", "show", "--device", IGB_VF2][..],
        &["audit", "show", "--tenant", "globex", "--json"],
        &["audit", "show", "--device", "0000:5e:1f.0"],
        &["check", "--json"],
        &["plan", IGB_VF2, "--json"],
        &["tenant", "list"],
        &["status", "--json"],
        &["audit", "verify"],
        &["audit", "verify", "--json"],
        &["inventory"],
        &["inventory", "--json"],
    ] {
        let via = seen(&dv(&ra, args), &ra);
        let mut direct_args = vec!["--direct"];
        direct_args.extend_from_slice(args);
        let direct = seen(&dv(&ra, &direct_args), &ra);
        assert_eq!(via, direct, "{args:?} through the agent and --direct");
        assert_eq!(via.0, Some(0), "{args:?}: {via:?}");
    }
}

/// The hook's `prepare begin` through the agent admits and refuses exactly
/// as direct, with the same side effect (the device Active) and the same
/// one line for libvirt; `release end` returns the device.
#[test]
fn the_hooks_prepare_begin_decides_the_same_through_the_agent() {
    let tmp = scratch();
    let (ra, rd) = (host(tmp.path(), "a"), host(tmp.path(), "d"));
    let _agent = Agent::start(&ra);
    for r in [&ra, &rd] {
        assert!(
            dv(
                r,
                &[
                    "--direct", "assign", IGB_VF, "--tenant", "acme", "--vm", UUID
                ]
            )
            .status
            .success()
        );
        assert!(
            dv(r, &["--direct", "assign", IGB_VF2, "--tenant", "globex"])
                .status
                .success()
        );
    }
    let admitted = domain("web1", Some(UUID), None, &hostdev(IGB_VF));
    let foreign = domain("web2", None, Some("acme"), &hostdev(IGB_VF2));
    let unrelated = domain("web3", None, None, "");
    for (name, op, sub, xml) in [
        ("web2", "prepare", "begin", &foreign),
        ("web1", "prepare", "begin", &admitted),
        ("web3", "prepare", "begin", &unrelated),
        ("web1", "migrate", "begin", &admitted),
        ("web1", "started", "begin", &admitted),
    ] {
        let a = seen(&hook(&ra, &[], name, op, sub, xml), &ra);
        let d = seen(&hook(&rd, &[], name, op, sub, xml), &rd);
        assert_eq!(a, d, "hook {name} {op} {sub}");
        if name == "web2" {
            assert_eq!(a.0, Some(1), "a foreign tenant's device is refused: {a:?}");
            assert_eq!(a.2.trim_end().lines().count(), 1, "one line: {a:?}");
        } else {
            assert_eq!(a.0, Some(0), "{name} {op} {sub}: {a:?}");
        }
    }
    assert_eq!(device_state(&ra, IGB_VF), "active");
    assert_eq!(device_state(&rd, IGB_VF), "active");
    let (_, ev) = events(&ra.join("run/devfence/devfence.sock"), "?since=0", |v| {
        v.iter().any(|e| e["type"] == "device_state")
    });
    assert!(
        ev.iter().any(|e| e["type"] == "hook_decision"
            && e["domain"] == "web2"
            && e["decision"] == "refused"),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| e["type"] == "device_state"
            && e["device"] == IGB_VF
            && e["state"] == "active"),
        "{ev:?}"
    );
    assert!(
        via_agent(&audit(&ra, IGB_VF)) > 0,
        "prepare begin went through the agent"
    );
    let a = seen(&hook(&ra, &[], "web1", "release", "end", &admitted), &ra);
    let d = seen(&hook(&rd, &[], "web1", "release", "end", &admitted), &rd);
    assert_eq!(a, d, "release end");
    assert_eq!(device_state(&ra, IGB_VF), device_state(&rd, IGB_VF));
    assert_ne!(device_state(&ra, IGB_VF), "active");
}

/// `--direct` and `DEVFENCE_DIRECT=1` bypass a running agent; `--via-agent`
/// on a host without one is a usage error naming the socket with a hint.
#[test]
fn direct_bypasses_a_running_agent_and_via_agent_requires_one() {
    let tmp = scratch();
    let ra = host(tmp.path(), "a");
    let _agent = Agent::start(&ra);
    let o = dv(&ra, &["--direct", "assign", IGB_VF, "--tenant", "acme"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(via_agent(&audit(&ra, IGB_VF)), 0, "--direct acted itself");
    let o = devfence()
        .arg("--root")
        .arg(&ra)
        .args(["release", IGB_VF])
        .env("DEVFENCE_DIRECT", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        via_agent(&audit(&ra, IGB_VF)),
        0,
        "DEVFENCE_DIRECT=1 acted itself"
    );
    let o = dv(&ra, &["assign", IGB_VF, "--tenant", "acme"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        via_agent(&audit(&ra, IGB_VF)) > 0,
        "without it, the agent acts"
    );

    let rd = host(tmp.path(), "d");
    let o = dv(&rd, &["--via-agent", "check"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("No devfence agent serves this host") && e.contains("Hint:"),
        "{e}"
    );
    let o = dv(&ra, &["--direct", "--via-agent", "check"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // A command the agent does not serve is not silently run directly.
    let o = dv(&ra, &["--via-agent", "keys", "show"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not served by the host agent"),
        "{}",
        text(&o)
    );
}

/// A dead agent's socket (the process gone, its lock free): the CLI says so
/// and acts directly; with `--via-agent` it refuses.
#[test]
fn a_dead_agents_socket_falls_back_to_direct_saying_so() {
    let tmp = scratch();
    let ra = host(tmp.path(), "a");
    let mut agent = Agent::start(&ra);
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    assert!(
        ra.join("run/devfence/devfence.sock").exists(),
        "SIGKILL leaves the socket"
    );
    let o = dv(&ra, &["assign", IGB_VF, "--tenant", "acme"]);
    assert!(o.status.success(), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("does not answer") && e.contains("acting directly"),
        "{e}"
    );
    let o = dv(&ra, &["--via-agent", "release", IGB_VF]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(device_state(&ra, IGB_VF), "ready", "nothing done");
}

/// A member of the reader group acting through the agent gets its 403 as a
/// clear error (the message naming the uid, the hint) and exit 2; reading
/// works.
#[test]
fn a_reader_acting_through_the_agent_gets_a_clear_403() {
    if std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap()
        != 0
    {
        eprintln!("needs root to run the CLI as another user; the agent tests cover 403 bodies");
        return;
    }
    let tmp = scratch();
    let ra = host(tmp.path(), "a");
    std::fs::write(
        ra.join("etc/devfence/devfence.toml"),
        "[agent]\nreader_group = 4242\nadmin_group = 4343\n",
    )
    .unwrap();
    let _agent = Agent::start(&ra);
    let as_reader = |args: &[&str]| {
        devfence()
            .arg("--root")
            .arg(&ra)
            .args(args)
            .uid(65534)
            .gid(4242)
            .output()
            .unwrap()
    };
    let o = as_reader(&["assign", IGB_VF, "--tenant", "acme"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.starts_with("devfence: error: uid 65534 may read but not act") && e.contains("Hint:"),
        "{e}"
    );
    assert_ne!(device_state(&ra, IGB_VF), "ready", "nothing done");
    let o = as_reader(&["check", "--json"]);
    assert!(o.status.success(), "a reader reads: {}", text(&o));
}

// ---------------------------------------------------------------------------
// The routes behind them (item 2): recover, the hook, the event stream.

/// Reads `GET /v1/events?QUERY` until `enough` says so (or the stream ends);
/// the status and the events (one JSON object per line).
fn events(socket: &Path, query: &str, enough: impl Fn(&[Value]) -> bool) -> (u16, Vec<Value>) {
    devfence_testsupport::events(socket, query, DEADLINE, enough)
}

/// An assign through the agent is streamed as operation_started, its steps
/// and gates, operation_finished and the device's new state, in id order; a
/// client resuming with `since` gets only what followed; a live subscriber
/// sees the next operation; a bad `since` is a 400 with a hint.
#[test]
fn the_event_stream_tells_an_orchestrator_what_changed_and_resumes() {
    let tmp = scratch();
    let ra = host(tmp.path(), "a");
    let _agent = Agent::start(&ra);
    let socket = ra.join("run/devfence/devfence.sock");
    let o = dv(&ra, &["assign", IGB_VF, "--tenant", "acme"]);
    assert!(o.status.success(), "{}", text(&o));
    let has = |t: &'static str| move |v: &[Value]| v.iter().any(|e| e["type"] == t);
    let (s, all) = events(&socket, "?since=0", has("device_state"));
    assert_eq!(s, 200);
    let types: Vec<&str> = all.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"operation_started"), "{types:?}");
    assert!(types.contains(&"operation_gate"), "{types:?}");
    let fin = all
        .iter()
        .find(|e| e["type"] == "operation_finished")
        .unwrap();
    assert_eq!(fin["outcome"], "succeeded", "{fin}");
    let dev = all.iter().find(|e| e["type"] == "device_state").unwrap();
    assert_eq!(
        (dev["device"].as_str(), dev["state"].as_str()),
        (Some(IGB_VF), Some("ready"))
    );
    let ids: Vec<u64> = all.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "ids in order: {ids:?}"
    );

    // Resuming after the finish: only the device's state follows.
    let after = fin["id"].as_u64().unwrap();
    let (_, rest) = events(&socket, &format!("?since={after}"), has("device_state"));
    assert_eq!(rest[0]["id"].as_u64(), Some(after + 1), "{rest:?}");
    assert_eq!(rest[0]["type"], "device_state");

    // Live: a subscriber from the last id sees the release as it happens.
    let last = *ids.last().unwrap();
    let sock2 = socket.clone();
    let watcher = std::thread::spawn(move || {
        events(&sock2, &format!("?since={last}"), |v| {
            v.iter()
                .any(|e| e["type"] == "device_state" && e["state"] == "free")
        })
    });
    let o = dv(&ra, &["release", IGB_VF]);
    assert!(o.status.success(), "{}", text(&o));
    let (_, live) = watcher.join().unwrap();
    assert!(
        live.iter().all(|e| e["id"].as_u64().unwrap() > last),
        "{live:?}"
    );
    assert!(
        live.iter()
            .any(|e| e["type"] == "operation_started" && e["kind"] == "release"),
        "{live:?}"
    );

    let (s, e) = events(&socket, "?since=yesterday", |_| true);
    assert_eq!(s, 400, "{e:?}");
    let body = e.last().unwrap();
    assert_eq!(body["code"], "invalid_input", "{body}");
    assert!(body["hint"].as_str().is_some(), "{body}");
}

/// An operation a crashed process left open while the agent runs (an agent
/// that starts recovers first, before it serves): `devfence recover` through
/// the agent (`POST /v1/recover`) prints what direct recovery prints, and the
/// device is left the same; the event stream says what recovery did.
#[test]
fn recover_through_the_agent_finishes_what_a_crash_left_as_direct_does() {
    let tmp = scratch();
    let (ra, rd) = (host(tmp.path(), "a"), host(tmp.path(), "d"));
    let _agent = Agent::start(&ra);
    for r in [&ra, &rd] {
        let o = devfence()
            .arg("--root")
            .arg(r)
            .args(["--direct", "assign", IGB_VF, "--tenant", "acme"])
            .env("DEVFENCE_FAILPOINT", "assign:bind-vfio:acted")
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "the failpoint crashed it: {}",
            text(&o)
        );
    }
    let (code, out, _) = same(&ra, &rd, &["recover"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("recovered op-"), "{out}");
    assert_eq!(device_state(&ra, IGB_VF), device_state(&rd, IGB_VF));
    same(&ra, &rd, &["recover", "--json"]);
    let socket = ra.join("run/devfence/devfence.sock");
    let (_, ev) = events(&socket, "?since=0", |v| {
        v.iter().any(|e| e["type"] == "device_state")
    });
    assert!(
        ev.iter()
            .any(|e| e["type"] == "operation_finished" && e["operation"].is_null()),
        "{ev:?}"
    );
}

/// One request with a raw body over the socket; the status and the JSON.
fn post_bytes(socket: &Path, path: &str, body: Vec<u8>) -> (u16, Value) {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method("POST")
            .uri(path)
            .header("host", "devfence")
            .header("content-type", "application/octet-stream")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    })
}

/// A sealed envelope posted to the destination host's agent: inspect
/// answers what `state inspect --json` prints for the file (but its path),
/// admit admits it once and refuses the replay at the nonce check, each as
/// `state admit --json` would; bad queries are 400 with a hint.
#[test]
fn state_envelopes_are_inspected_and_admitted_through_the_agent() {
    let tmp = scratch();
    let h1 = devfence_testsupport::keyed_host(tmp.path(), "host1", "lab", 2);
    let h2 = devfence_testsupport::keyed_host(tmp.path(), "host2", "lab", 2);
    for h in [&h1, &h2] {
        let o = dv(h, &["assign", IGB_VF, "--tenant", "acme"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    devfence_testsupport::trust(&h1, &h2, tmp.path());
    let input = tmp.path().join("state.bin");
    std::fs::write(&input, b"device state bytes").unwrap();
    let o = dv(
        &h1,
        &[
            "state",
            "seal",
            "--device",
            IGB_VF,
            "--vm",
            UUID,
            "--in",
            input.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let sealed: Value = serde_json::from_slice(&o.stdout).unwrap();
    let envelope = PathBuf::from(sealed["path"].as_str().unwrap());
    let bytes = std::fs::read(&envelope).unwrap();

    let _agent = Agent::start(&h2);
    let socket = h2.join("run/devfence/devfence.sock");
    let q = format!("?device={}&vm={UUID}", IGB_VF.replace(':', "%3A"));
    let (s, mut via) = post_bytes(&socket, &format!("/v1/state/inspect{q}"), bytes.clone());
    assert_eq!(s, 200, "{via}");
    assert_eq!(via["would_admit"], true, "{via}");
    let o = dv(
        &h2,
        &[
            "state",
            "inspect",
            envelope.to_str().unwrap(),
            "--device",
            IGB_VF,
            "--vm",
            UUID,
            "--json",
        ],
    );
    let mut direct: Value = serde_json::from_slice(&o.stdout).unwrap();
    via["path"] = Value::Null;
    direct["path"] = Value::Null;
    // The CLI's JSON documents carry their schema version.
    direct.as_object_mut().unwrap().remove("schema");
    assert_eq!(via, direct, "inspect through the agent and direct");

    let (s, a) = post_bytes(&socket, &format!("/v1/state/admit{q}"), bytes.clone());
    assert_eq!((s, &a["admitted"]), (200, &Value::Bool(true)), "{a}");
    assert!(a["token"].as_str().is_some_and(|t| !t.is_empty()), "{a}");
    let (s, again) = post_bytes(&socket, &format!("/v1/state/admit{q}"), bytes);
    assert_eq!(
        (s, &again["admitted"]),
        (200, &Value::Bool(false)),
        "{again}"
    );
    assert_eq!(
        again["check"], "single-use",
        "the replay is refused: {again}"
    );
    let recs = audit(&h2, IGB_VF);
    let admits: Vec<&Value> = recs
        .iter()
        .filter(|r| r["detail"]["action"] == "state-admit")
        .collect();
    assert_eq!(
        admits.len(),
        2,
        "the admission and the refused replay: {recs:?}"
    );
    assert!(
        admits
            .iter()
            .all(|r| r["detail"]["actor"]["via"] == "agent"),
        "each names the agent's peer: {admits:?}"
    );

    for bad in [
        "/v1/state/admit",
        "/v1/state/admit?device=0000%3A5e%3A10.0",
        "/v1/state/inspect?vm=x&device=y",
    ] {
        let (s, e) = post_bytes(&socket, bad, b"x".to_vec());
        assert_eq!(
            (s, e["code"].as_str()),
            (400, Some("invalid_input")),
            "{bad}: {e}"
        );
        assert!(e["hint"].as_str().is_some(), "{e}");
    }
}
