//! The libvirt hook's `prepare begin` through the host agent vs direct
//! (issue 12 item 3): the hook process's whole wall time — `fork`/`exec` of
//! the real `devfence hook qemu web1 prepare begin -`, the domain XML on its
//! stdin, until it exits — as libvirt sees it. Each run admits one
//! Ready VF (a domain reserved by its UUID); between runs, untimed, the
//! domain's `release end` and a direct assign make the VF Ready again.
//!
//! `cargo bench -p devfence --bench hook_agent` (runs: `DEVFENCE_BENCH_RUNS`,
//! default 200). Prints median, p90, p99, mean and max per path, and the
//! floor: the same process for a call devfence ignores (start, parse, exit).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_devfence");
const VF: &str = "0000:5e:10.0";
const UUID: &str = "8f2c6a1e-4b7d-4e0a-9c3f-2d1b5e6a7c80";

fn dv(root: &Path, args: &[&str]) {
    let o = Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("DEVFENCE_ROOT")
        .env_remove("DEVFENCE_LEDGER")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn xml() -> String {
    format!(
        "<domain type='kvm'><name>web1</name><uuid>{UUID}</uuid><devices>\
         <hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' \
         bus='0x5e' slot='0x10' function='0x0'/></source></hostdev></devices></domain>"
    )
}

/// One hook call; its wall time from spawn to exit.
fn hook(root: &Path, op: &str, subop: &str, xml: &str) -> Duration {
    let t = Instant::now();
    let mut c = Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(["hook", "qemu", "web1", op, subop, "-"])
        .env_remove("DEVFENCE_ROOT")
        .env_remove("DEVFENCE_LEDGER")
        .env_remove("DEVFENCE_DIRECT")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A call devfence ignores exits without reading: a broken pipe is fine.
    let _ = c.stdin.take().unwrap().write_all(xml.as_bytes());
    let o = c.wait_with_output().unwrap();
    let d = t.elapsed();
    assert!(
        o.status.success(),
        "hook {op} {subop}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    d
}

fn host(base: &Path, name: &str) -> PathBuf {
    let root = base.join(name);
    let o = Command::new(BIN)
        .args(["sim", "generate", "--profile", "lab", "--out"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(o.status.success());
    dv(
        &root,
        &[
            "tenant",
            "add",
            "acme",
            "--launcher",
            "107:107",
            "--partition",
            "0x8001",
        ],
    );
    root
}

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    println!(
        "{name:<14} runs {:>4}  median {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  mean {:>7.2} ms  max {:>7.2} ms",
        v.len(),
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(pct(0.99)),
        mean,
        ms(*v.last().unwrap())
    );
}

fn run(root: &Path, runs: usize) -> Vec<Duration> {
    let x = xml();
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        dv(
            root,
            &["--direct", "assign", VF, "--tenant", "acme", "--vm", UUID],
        );
        out.push(hook(root, "prepare", "begin", &x));
        // Untimed: the domain goes away, the VF is scrubbed to Free.
        let _ = Command::new(BIN)
            .arg("--root")
            .arg(root)
            .args(["--direct", "hook", "qemu", "web1", "release", "end", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(x.as_bytes())?;
                c.wait()
            });
    }
    out
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it once, short.
    let quick = std::env::args().all(|a| a != "--bench");
    let runs: usize = std::env::var("DEVFENCE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 3 } else { 200 });
    let tmp = tempfile::Builder::new()
        .prefix("devfence-hookbench-")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        })
        .unwrap();
    let direct = host(tmp.path(), "direct");
    let via = host(tmp.path(), "agent");
    let socket = via.join("run/devfence/devfence.sock");
    let mut agent = Command::new(BIN)
        .arg("--root")
        .arg(&via)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < until, "the agent did not serve");
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("hook `prepare begin` wall time (process start to exit), {runs} runs each");
    // Alternate the two in blocks so load changes hit both alike.
    let (mut d, mut a) = (Vec::new(), Vec::new());
    let block = runs.div_ceil(4).max(1);
    while d.len() < runs {
        let n = block.min(runs - d.len());
        d.extend(run(&direct, n));
        a.extend(run(&via, n));
    }
    stats("direct", d);
    stats("via agent", a);
    // The floor: a call devfence ignores (`migrate begin`) starts, parses its
    // arguments and exits without reading anything.
    let x = xml();
    let floor: Vec<Duration> = (0..runs)
        .map(|_| hook(&direct, "migrate", "begin", &x))
        .collect();
    stats("process floor", floor);
    let _ = agent.kill();
    let _ = agent.wait();
}
