//! What the `devfence` binary's end-to-end tests share (issue 11 item 5): run
//! the real binary on a simulated host, read what it printed, make scratch
//! directories and simulated hosts with tenants and keys.
//!
//! Tests only: every helper panics with the command's exit status and output
//! when something it needs fails, so a failing test says why.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc,
    clippy::must_use_candidate
)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `devfence` binary cargo built for this package's integration tests
/// (`target/<profile>/devfence`, beside the test's own `deps/` directory).
#[must_use]
pub fn bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("the test binary's directory");
    dir.join("devfence")
}

/// The real binary, with no root or ledger taken from the environment.
#[must_use]
pub fn devfence() -> Command {
    let mut c = Command::new(bin());
    c.env_remove("DEVFENCE_ROOT").env_remove("DEVFENCE_LEDGER");
    c
}

/// Runs the binary with `args`.
#[must_use]
pub fn run(args: &[&str]) -> Output {
    devfence().args(args).output().expect("run devfence")
}

/// Runs the binary on the host at `root` (`--root root` first).
#[must_use]
pub fn dv(root: &Path, args: &[&str]) -> Output {
    devfence()
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run devfence")
}

/// Standard output as text.
#[must_use]
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as text.
#[must_use]
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The exit status and both outputs, for an assertion's message.
#[must_use]
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

/// Standard output of a command that must have succeeded.
#[track_caller]
pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    stdout(o)
}

/// Everything a command that must have been refused (exit 1) printed.
#[track_caller]
pub fn refused(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "{}", text(o));
    text(o)
}

/// Standard output parsed as JSON.
#[track_caller]
#[must_use]
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

/// A scratch directory: `$TMPDIR` when set, else `/dev/shm` (sysfs is in
/// memory, and so are the fixtures), else the system's temporary directory.
#[must_use]
pub fn scratch(prefix: &str) -> tempfile::TempDir {
    let base = match std::env::var_os("TMPDIR") {
        Some(t) => PathBuf::from(t),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .unwrap()
}

/// Generates a simulated host of `profile` at `root` (`extra`: more
/// `sim generate` options).
#[track_caller]
pub fn generate(profile: &str, root: &Path, extra: &[&str]) {
    let mut args = vec![
        "sim",
        "generate",
        "--profile",
        profile,
        "--out",
        root.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "generate {profile}: {}", text(&o));
}

/// The tenants the tests use: id, launcher uid:gid, partition.
pub const TENANTS: [(&str, &str, &str); 3] = [
    ("acme", "107:107", "0x8001"),
    ("globex", "108:108", "0x8002"),
    ("initech", "109:109", "0x8003"),
];

/// Adds the first `n` of [`TENANTS`] to the host's ledger.
#[track_caller]
pub fn add_tenants(root: &Path, n: usize) {
    for (t, uid, pkey) in TENANTS.iter().take(n) {
        ok(&dv(
            root,
            &["tenant", "add", t, "--launcher", uid, "--partition", pkey],
        ));
    }
}

/// A simulated host of `profile` at `tmp/id` with the first `tenants` of
/// [`TENANTS`] and a host key named `id`.
#[track_caller]
#[must_use]
pub fn keyed_host(tmp: &Path, id: &str, profile: &str, tenants: usize) -> PathBuf {
    let root = tmp.join(id);
    generate(profile, &root, &[]);
    add_tenants(&root, tenants);
    ok(&dv(&root, &["keys", "init", "--host-id", id]));
    root
}

/// Host `h2` trusts host `h1`'s key (its public line, through a file in `tmp`).
#[track_caller]
pub fn trust(h1: &Path, h2: &Path, tmp: &Path) {
    let line = ok(&dv(h1, &["keys", "show"]));
    let f = tmp.join(format!("{}.pub", h1.file_name().unwrap().to_string_lossy()));
    fs::write(&f, line).unwrap();
    ok(&dv(
        h2,
        &["keys", "trust", "add", "--from", f.to_str().unwrap()],
    ));
}

/// Reads the agent's event stream (`GET /v1/events{query}` on `socket`, JSON
/// lines) until `enough` says so or the stream ends, within `deadline`; the
/// status and the events read (for a status other than 200, its error body
/// last).
///
/// # Panics
/// The exchange fails, a line is not JSON, or the deadline passes first.
pub fn events(
    socket: &std::path::Path,
    query: &str,
    deadline: std::time::Duration,
    enough: impl Fn(&[serde_json::Value]) -> bool,
) -> (u16, Vec<serde_json::Value>) {
    use http_body_util::BodyExt;
    use serde_json::Value;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri(format!("/v1/events{query}"))
            .header("host", "devfence")
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        let read = async {
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.expect("frame").into_data() {
                    buf.extend_from_slice(&d);
                }
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    out.push(serde_json::from_slice::<Value>(&line).expect("a JSON line"));
                }
                if status != 200 || enough(&out) {
                    break;
                }
            }
            if status != 200 {
                out.push(serde_json::from_slice(&buf).unwrap_or(Value::Null));
            }
        };
        tokio::time::timeout(deadline, read)
            .await
            .expect("the events came within the deadline");
        (status, out)
    })
}

/// Waits (bounded) until something serves `socket`, the agent `child` having
/// been started to serve it. From then on a thread drains the agent's piped
/// stderr into this test's captured output (shown when the test fails): the
/// agent logs a line per request, and a pipe nobody reads fills after ~64 KiB
/// and blocks the agent's next log write, its runtime worker with it.
///
/// # Panics
/// The agent exits first (its stderr in the message), or `deadline` passes.
pub fn wait_serving(
    child: &mut std::process::Child,
    socket: &std::path::Path,
    deadline: std::time::Duration,
) {
    use std::io::Read;
    let until = std::time::Instant::now() + deadline;
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(st) = child.try_wait().expect("the agent's status") {
            let mut e = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut e);
            }
            panic!("the agent exited ({st}) before serving: {e}");
        }
        assert!(
            std::time::Instant::now() < until,
            "the agent did not serve {} within {deadline:?}",
            socket.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut r = std::io::BufReader::new(err);
            let mut line = Vec::new();
            while matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                eprint!("agent: {}", String::from_utf8_lossy(&line));
                line.clear();
            }
        });
    }
}

/// One HTTP/1.1 request over the agent's Unix socket; the status and the
/// body (JSON, else the text as a JSON string).
///
/// # Panics
/// The exchange fails.
pub fn request(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "devfence")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                body.unwrap_or_default().to_vec(),
            )))
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
        (status, v)
    })
}
