//! devfence's qemu hook called by a real libvirtd (Debian 12's libvirt 9.0 with
//! QEMU 10), as docs/libvirt-hook.md describes it: `virsh start` of a domain
//! runs `/etc/libvirt/hooks/qemu`, which is `devfence hook qemu`.
//!
//! The harness starts its own libvirtd, as the OpenSM tests start their own
//! OpenSM: `testbed/libvirt/setup.sh` installs it when it is missing (never a
//! skip), and the daemon runs in a private mount namespace where libvirt's
//! directories (`/etc/libvirt` with the hook, `/run/libvirt`, `/var/lib/libvirt`,
//! `/var/log/libvirt`, `/var/cache/libvirt`) are this test's own: nothing of the
//! machine's libvirt is read or changed, and two runs cannot meet. virsh talks
//! to it through its socket (`qemu:///system?socket=…`).
//!
//! What devfence sees is a simulated host (`--root`, the `lab` profile): this
//! machine has no IOMMU and no such VFs, so the hook script passes `--root`,
//! and libvirt, which reads the real `/sys`, fails the start of an admitted
//! domain itself ("host doesn't support passthrough of host PCI devices") —
//! which is the case the test needs for what a failed start does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const VF_ACME: &str = "0000:5e:10.0";
const VF_GLOBEX: &str = "0000:5e:10.2";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Installs libvirtd, virsh and the QEMU driver through
/// `testbed/libvirt/setup.sh` when one of them is missing.
fn ensure_installed() {
    let have = |c: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(c).is_file()))
            || Path::new("/usr/sbin").join(c).is_file()
    };
    let driver =
        Path::new("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so");
    if have("libvirtd") && have("virsh") && driver.exists() && have("unshare") {
        return;
    }
    let script = workspace().join("testbed/libvirt/setup.sh");
    let st = Command::new("bash")
        .arg(&script)
        .status()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        st.success(),
        "{} failed ({st}): it installs libvirt-daemon, libvirt-daemon-driver-qemu and libvirt-clients as root",
        script.display()
    );
}

/// One libvirtd of this test, in its own mount namespace.
struct Libvirtd {
    dir: PathBuf,
    daemon: Child,
}

impl Libvirtd {
    /// Starts libvirtd with `hook` as its qemu hook and waits (bounded) until
    /// virsh gets an answer.
    fn start(dir: &Path, hook: &str) -> Self {
        for d in ["etc/hooks", "run", "lib", "log/qemu", "cache"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        // QEMU's output to a file: no virtlogd to start and stop. QEMU as
        // root: libvirt probes QEMU's capabilities as root, where /dev/kvm
        // (0600 root here) answers, and then finds KVM "not available" to
        // its default user libvirt-qemu, throws the capabilities away and
        // probes again at every define (50 s each under TCG). No domain
        // of this test runs guest code: libvirt fails each start first.
        fs::write(
            dir.join("etc/qemu.conf"),
            "stdio_handler = \"file\"\nuser = \"root\"\ngroup = \"root\"\n",
        )
        .unwrap();
        fs::write(dir.join("etc/libvirtd.conf"), "").unwrap();
        let h = dir.join("etc/hooks/qemu");
        fs::write(&h, hook).unwrap();
        fs::set_permissions(&h, fs::Permissions::from_mode(0o755)).unwrap();
        // The QEMU capabilities libvirt probes at its first define (tens of
        // seconds under TCG) are kept between runs; libvirt checks them
        // against the QEMU binary and itself.
        let cache = workspace().join("target/libvirt-test-cache");
        fs::create_dir_all(&cache).unwrap();
        let mut script = String::from("set -e\n");
        for (own, theirs) in [
            (dir.join("etc"), "/etc/libvirt"),
            (dir.join("run"), "/run/libvirt"),
            (dir.join("lib"), "/var/lib/libvirt"),
            (dir.join("log"), "/var/log/libvirt"),
            (cache.clone(), "/var/cache/libvirt"),
        ] {
            script.push_str(&format!(
                "mkdir -p {theirs}\nmount --bind '{}' {theirs}\n",
                own.display()
            ));
        }
        // `exec`: unshare (without --fork) and sh become libvirtd, so the
        // child we hold is the daemon itself.
        script.push_str("exec libvirtd\n");
        fs::write(dir.join("start.sh"), script).unwrap();
        let log = fs::File::create(dir.join("libvirtd.out")).unwrap();
        let daemon = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh"])
            .arg(dir.join("start.sh"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start libvirtd under unshare");
        let mut me = Self {
            dir: dir.to_path_buf(),
            daemon,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = me.daemon.try_wait() {
                panic!("libvirtd exited ({st}):\n{}", me.log());
            }
            if dir.join("run/libvirt-sock").exists() && me.virsh(&["version"]).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer within 60 s:\n{}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("libvirtd.out")).unwrap_or_default()
    }

    fn virsh(&self, args: &[&str]) -> Output {
        let uri = format!(
            "qemu:///system?socket={}",
            self.dir.join("run/libvirt-sock").display()
        );
        Command::new("virsh")
            .args(["-q", "-c", &uri])
            .args(args)
            .output()
            .expect("run virsh")
    }

    fn define(&self, xml: &str) {
        let f = self.dir.join("domain.xml");
        fs::write(&f, xml).unwrap();
        let t = Instant::now();
        let o = self.virsh(&["define", f.to_str().unwrap()]);
        println!("virsh define: {:.1}s", t.elapsed().as_secs_f64());
        assert!(o.status.success(), "virsh define: {}", text(&o));
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// A TCG domain with one `<hostdev>` per BDF, saying it is `tenant`'s (its
/// UUID follows from its name: a second define of the name replaces it).
fn domain(name: &str, tenant: &str, bdfs: &[&str]) -> String {
    let n = name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)));
    let uuid = format!("6d3f0e2a-0000-4000-8000-{:012x}", n & 0xffff_ffff_ffff);
    let mut hostdevs = String::new();
    for b in bdfs {
        let (bus, rest) = b[5..].split_once(':').unwrap();
        let (slot, func) = rest.split_once('.').unwrap();
        hostdevs.push_str(&format!(
            "    <hostdev mode='subsystem' type='pci' managed='yes'>\n      \
             <source><address domain='0x0000' bus='0x{bus}' slot='0x{slot}' function='0x{func}'/></source>\n    \
             </hostdev>\n"
        ));
    }
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  <memory unit='MiB'>64</memory>\n  <vcpu>1</vcpu>\n  \
         <os><type arch='x86_64' machine='q35'>hvm</type></os>\n  <metadata>\n    \
         <devfence:tenant xmlns:devfence=\"https://devfence.dev/xmlns/libvirt/1\" id=\"{tenant}\"/>\n  </metadata>\n  \
         <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n{hostdevs}    <memballoon model='none'/>\n  \
         </devices>\n</domain>\n"
    )
}

struct Host {
    root: PathBuf,
}

impl Host {
    fn devfence(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_devfence"))
            .env_remove("DEVFENCE_ROOT")
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .output()
            .expect("run devfence")
    }
    fn ok(&self, args: &[&str]) {
        let o = self.devfence(args);
        assert!(o.status.success(), "devfence {args:?}: {}", text(&o));
    }
    /// The device's state as `status --json` has it: `ready acme web1`.
    fn state(&self, dev: &str) -> String {
        let o = self.devfence(&["status", "--json"]);
        assert!(o.status.success(), "status: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let d = v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == dev)
            .unwrap_or_else(|| panic!("{dev} not in status: {v}"));
        let s = &d["state"];
        ["state", "tenant", "vm"]
            .iter()
            .filter_map(|k| s[k].as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
    fn audit(&self, dev: &str) -> String {
        let o = self.devfence(&["audit", "show", "--device", dev]);
        assert!(o.status.success(), "audit show: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

fn hook_calls(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("hook-calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Refusal, a refused second device, and admission followed by a start that
/// libvirt itself fails, all through `virsh start` of a real libvirtd.
#[test]
fn real_libvirtd_runs_the_hook_refuses_admits_and_releases_after_a_failed_start() {
    ensure_installed();
    let tmp = tempfile::Builder::new()
        .prefix("devfence-libvirt-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let host = Host {
        root: dir.join("host"),
    };
    let o = Command::new(env!("CARGO_BIN_EXE_devfence"))
        .env_remove("DEVFENCE_ROOT")
        .args(["sim", "generate", "--profile", "lab", "--out"])
        .arg(&host.root)
        .output()
        .unwrap();
    assert!(o.status.success(), "sim generate: {}", text(&o));
    host.ok(&[
        "tenant",
        "add",
        "acme",
        "--launcher",
        "107:107",
        "--partition",
        "0x8001",
    ]);
    host.ok(&[
        "tenant",
        "add",
        "globex",
        "--launcher",
        "108:108",
        "--partition",
        "0x8002",
    ]);
    host.ok(&["assign", VF_ACME, "--tenant", "acme", "--vm", "web1"]);
    host.ok(&["assign", VF_GLOBEX, "--tenant", "globex"]);

    // The hook as docs/libvirt-hook.md installs it, with the simulated host's
    // root, and a line per call so the test sees what libvirt called.
    let hook = format!(
        "#!/bin/sh\necho \"$*\" >> '{calls}'\nexec '{bin}' --root '{root}' hook qemu \"$@\"\n",
        calls = dir.join("hook-calls.log").display(),
        bin = env!("CARGO_BIN_EXE_devfence"),
        root = host.root.display(),
    );
    let t = Instant::now();
    let lv = Libvirtd::start(&dir.join("libvirt"), &hook);
    println!("libvirtd answered after {:.1}s", t.elapsed().as_secs_f64());

    // 1. acme's domain names globex's VF: refused, with devfence's message.
    lv.define(&domain("intruder", "acme", &[VF_GLOBEX]));
    let o = lv.virsh(&["start", "intruder"]);
    let out = text(&o);
    println!("virsh start intruder:\n{out}");
    assert!(!o.status.success(), "intruder started:\n{out}");
    assert!(
        out.contains("Hook script execution failed") && out.contains(VF_GLOBEX),
        "libvirt did not report devfence's refusal naming {VF_GLOBEX}:\n{out}"
    );
    assert_eq!(host.state(VF_GLOBEX), "ready globex");
    assert_eq!(
        hook_calls(dir).first().map(String::as_str),
        Some("intruder prepare begin -"),
        "libvirt's first hook call"
    );

    // 2. web1 names its own VF and globex's: refused as a whole; its own VF
    //    stays Ready (nothing Active), and so does globex's.
    lv.define(&domain("web1", "acme", &[VF_ACME, VF_GLOBEX]));
    let o = lv.virsh(&["start", "web1"]);
    let out = text(&o);
    println!("virsh start web1 (two devices):\n{out}");
    assert!(!o.status.success(), "web1 started with globex's VF:\n{out}");
    assert!(
        out.contains("Hook script execution failed") && out.contains(VF_GLOBEX),
        "libvirt did not report devfence's refusal naming {VF_GLOBEX}:\n{out}"
    );
    assert_eq!(host.state(VF_ACME), "ready acme web1");
    assert_eq!(host.state(VF_GLOBEX), "ready globex");
    assert!(
        !host.audit(VF_ACME).contains("vm-start"),
        "{VF_ACME} went Active for a refused domain:\n{}",
        host.audit(VF_ACME)
    );

    // 3. web1 with its own VF only: admitted (Active), then libvirt fails the
    //    start itself (no IOMMU here) and calls `stopped end` and `release
    //    end`: devfence drains and scrubs the device to Free.
    let before = hook_calls(dir).len();
    lv.define(&domain("web1", "acme", &[VF_ACME]));
    let o = lv.virsh(&["start", "web1"]);
    let out = text(&o);
    println!("virsh start web1:\n{out}");
    assert!(
        !o.status.success(),
        "web1 started on a host without IOMMU?\n{out}"
    );
    assert!(
        !out.contains("Hook script execution failed"),
        "the hook refused web1:\n{out}"
    );
    let calls = hook_calls(dir)[before..].to_vec();
    println!("hook calls for the failed start: {calls:?}");
    let pos = |c: &str| calls.iter().position(|x| x == c);
    let (prepare, stopped, release) = (
        pos("web1 prepare begin -"),
        pos("web1 stopped end -"),
        pos("web1 release end -"),
    );
    assert!(
        prepare.is_some() && prepare < stopped && stopped < release,
        "libvirt's hook calls: {calls:?}"
    );
    let audit = host.audit(VF_ACME);
    assert!(
        audit.contains("\"step\":\"vm-start\"") && audit.contains("\"to\":\"Active(acme, web1"),
        "{VF_ACME} was not admitted (Active):\n{audit}"
    );
    assert!(
        audit.contains("\"from\":\"Scrubbing\",\"to\":\"Free\""),
        "{VF_ACME} was not scrubbed to Free:\n{audit}"
    );
    assert_eq!(host.state(VF_ACME), "free");
    assert_eq!(host.state(VF_GLOBEX), "ready globex");
    let o = host.devfence(&["audit", "verify"]);
    assert!(o.status.success(), "audit verify: {}", text(&o));
    drop(lv);
}
