//! Adversarial tests: containment (issue 18 items 6, 11, 12 host part, 14).
//!
//! Every read and write under a root stays inside it, no file devfence reads can
//! block it or grow it without limit, output cannot carry terminal control
//! sequences to the operator, and the simulated kernel is one kernel for every
//! process that drives it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::support::*;

/// Runs `cmd` to completion, polling for its exit up to a generous deadline; a
/// process still running then is killed and the test fails ("hung"). Bounded
/// polling only turns "did not finish" into a clear failure; no result depends
/// on timing.
fn finish_within(mut cmd: Command, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn devfence");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut b = Vec::new();
        out.read_to_end(&mut b).ok();
        b
    });
    let e = std::thread::spawn(move || {
        let mut b = Vec::new();
        err.read_to_end(&mut b).ok();
        b
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("{what} hung (still running after the deadline)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

fn cmd_on(root: &Path, args: &[&str]) -> Command {
    let mut c = devfence();
    c.arg("--root").arg(root).args(args);
    c
}

/// The directory a bus entry of `root` points at.
fn device_dir(root: &Path, bdf: &str) -> PathBuf {
    let link = root.join("sys/bus/pci/devices").join(bdf);
    std::fs::canonicalize(link).unwrap()
}

fn mkfifo(p: &Path) {
    let _ = std::fs::remove_file(p);
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success());
}

/// The tenant every test assigns to.
fn add_acme(root: &Path) {
    let o = on(
        root,
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
    assert!(o.status.success(), "tenant add: {}", stderr(&o));
}

/// issue 18 item 6: a link planted in place of a sysfs attribute (absolute, or
/// climbing out with `..`) is never followed out of the root — `inventory --json`
/// and `check` never print the outside file; the attribute is reported instead.
#[test]
fn a_linked_attribute_is_never_read_outside_the_root() {
    let (tmp, root) = host("lab");
    let secret = tmp.path().join("outside-secret");
    std::fs::write(&secret, "0x5ec7\n").unwrap();
    let dir = device_dir(&root, "0000:5e:10.0");
    std::fs::remove_file(dir.join("uevent")).unwrap();
    std::os::unix::fs::symlink(&secret, dir.join("uevent")).unwrap();
    std::fs::remove_file(dir.join("numa_node")).unwrap();
    std::os::unix::fs::symlink(
        format!(
            "{}{}",
            "../".repeat(40),
            secret.to_str().unwrap().trim_start_matches('/')
        ),
        dir.join("numa_node"),
    )
    .unwrap();
    for args in [
        &["inventory", "--json"][..],
        &["inventory"][..],
        &["check"][..],
        &["check", "--json"][..],
    ] {
        let o = on(&root, args);
        let all = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            !all.contains("5ec7"),
            "{args:?} read outside the root:\n{all}"
        );
    }
    let o = on(&root, &["check"]);
    assert!(
        stdout(&o).contains("symbolic link"),
        "the planted link is reported: {}",
        stdout(&o)
    );
}

/// issue 18 item 6: a `run/devfence/tokens` link out of the root makes `assign`
/// refuse to deliver the VF token (device quarantined) — nothing is written, and
/// nothing removed, outside the root.
#[test]
fn a_linked_token_directory_is_refused() {
    let (tmp, root) = host("lab");
    add_acme(&root);
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // A file the token withdrawal would remove through the link.
    std::fs::write(outside.join("0000:af:10.0.token"), "victim").unwrap();
    std::fs::create_dir_all(root.join("run/devfence")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("run/devfence/tokens")).unwrap();
    let o = on(&root, &["assign", "0000:af:10.0", "--tenant", "acme"]);
    assert!(
        !o.status.success(),
        "assign through a linked token directory"
    );
    assert!(
        stderr(&o).contains("/run/devfence/tokens is a symbolic link"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("Hint:"), "{}", stderr(&o));
    let names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["0000:af:10.0.token"], "wrote outside the root");
    assert_eq!(
        std::fs::read_to_string(outside.join("0000:af:10.0.token")).unwrap(),
        "victim"
    );
}

/// issue 18 item 6: a FIFO in place of an attribute of an unrelated device never
/// blocks `inventory`, `check` or `assign`: it is reported as a FIFO and the
/// assignment of another device goes through.
#[test]
fn a_fifo_attribute_never_hangs_any_command() {
    let (_tmp, root) = host("lab");
    add_acme(&root);
    mkfifo(&device_dir(&root, "0000:5e:10.2").join("uevent"));
    let o = finish_within(cmd_on(&root, &["inventory"]), "inventory");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = finish_within(cmd_on(&root, &["check"]), "check");
    assert!(stdout(&o).contains("FIFO"), "{}", stdout(&o));
    let o = finish_within(
        cmd_on(&root, &["assign", "0000:af:10.0", "--tenant", "acme"]),
        "assign",
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// issue 18 item 6: the files devfence reads itself — its configuration, a
/// tenancy file (`status` reads the configuration, `check` the tenancy) — are
/// regular files read with a cap: a FIFO, a device node or a
/// huge file is a clear error naming the path (exit 2), never a hang or an
/// unbounded read.
#[test]
fn config_and_tenancy_reads_are_bounded_and_never_block() {
    let (tmp, root) = host("lab");
    add_acme(&root);
    let etc = root.join("etc/devfence");
    std::fs::create_dir_all(&etc).unwrap();
    mkfifo(&etc.join("devfence.toml"));
    let o = finish_within(cmd_on(&root, &["status"]), "status with a FIFO config");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("FIFO"), "{}", stderr(&o));
    assert!(stderr(&o).contains("devfence.toml"), "{}", stderr(&o));
    std::fs::remove_file(etc.join("devfence.toml")).unwrap();

    let o = finish_within(
        cmd_on(&root, &["--config", "/dev/zero", "status"]),
        "status --config /dev/zero",
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("character device"), "{}", stderr(&o));

    let big = tmp.path().join("big.toml");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(64 << 20).unwrap();
    let o = finish_within(
        cmd_on(&root, &["--config", big.to_str().unwrap(), "status"]),
        "status with a huge config",
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("larger than"), "{}", stderr(&o));

    let fifo = tmp.path().join("tenancy.toml");
    mkfifo(&fifo);
    let o = finish_within(
        cmd_on(&root, &["check", "--tenancy", fifo.to_str().unwrap()]),
        "check --tenancy FIFO",
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("FIFO"), "{}", stderr(&o));
}

/// issue 18 item 6: the libvirt hook reads at most 4 MiB of domain XML from
/// standard input; an endless stream is refused with a clear error.
#[test]
fn the_hook_reads_a_bounded_domain_xml() {
    let (_tmp, root) = host("lab");
    let mut c = cmd_on(&root, &["hook", "qemu", "vm1", "prepare", "begin"]);
    c.stdin(std::fs::File::open("/dev/zero").unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let o = c.output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("larger than"), "{}", stderr(&o));
}

/// issue 18 item 14: the simulated kernel is one kernel for every process, as
/// the real one is: four `devfence assign` processes started together on four VFs
/// of one IB PF all succeed, round after round (each process used to keep its own
/// copy of what the kernel holds outside sysfs — the VFs' administrative GUIDs, the
/// subtrees a driver leaves behind — and about one assign in four failed at
/// guid-set). Six rounds of four: the old simulator passes them all about once in
/// a thousand runs.
#[test]
fn concurrent_assigns_on_one_simulated_host_all_succeed() {
    for round in 0..6 {
        let (_tmp, root) = host("lab");
        add_acme(&root);
        let children: Vec<_> = (1..=4)
            .map(|v| {
                let bdf = format!("0000:3b:00.{v}");
                let mut c = cmd_on(&root, &["assign", &bdf, "--tenant", "acme"]);
                c.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                (bdf, c.spawn().expect("spawn assign"))
            })
            .collect();
        for (bdf, child) in children {
            let o = child.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "round {round}: assign {bdf} failed: {}",
                stderr(&o)
            );
        }
        let o = on(&root, &["status", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let ready = stdout(&o).matches("\"state\": \"ready\"").count();
        assert_eq!(ready, 4, "round {round}: {}", stdout(&o));
    }
}

/// Writes `bytes` into the attribute `name` of the function `bdf`.
fn plant(root: &Path, bdf: &str, name: &str, bytes: &[u8]) {
    std::fs::write(device_dir(root, bdf).join(name), bytes).unwrap();
}

/// issue 18 item 11: terminal control sequences read from the host never reach
/// the operator's terminal: in every text output (and in errors) they are written
/// as `\u00XX`; JSON output stays valid and carries the value losslessly.
#[test]
fn control_sequences_from_the_host_never_reach_the_terminal() {
    let (_tmp, root) = host("lab");
    add_acme(&root);
    let o = on(&root, &["assign", "0000:3b:00.1", "--tenant", "acme"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A title write, a colour, a screen clear, a carriage return and a C1 CSI.
    plant(
        &root,
        "0000:5e:10.2",
        "uevent",
        b"PCI_CLASS=20000\nPCI_ID=\x1b]0;pwned\x07\x1b[31m8086:10CA\r\n",
    );
    plant(
        &root,
        "0000:5e:10.2",
        "driver_override",
        "vfio\u{9b}2J\x1b[2J-pci\n".as_bytes(),
    );
    for args in [
        &["inventory"][..],
        &["check"][..],
        &["status"][..],
        &["audit", "show"][..],
        &["tenant", "list"][..],
        &["assign", "0000:5e:10.2", "--tenant", "acme"][..],
    ] {
        let o = on(&root, args);
        for (what, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
            let s = String::from_utf8_lossy(bytes);
            assert!(
                !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t'),
                "{args:?} wrote a control character to {what}:\n{s:?}"
            );
        }
    }
    let o = on(&root, &["check"]);
    assert!(
        stdout(&o).contains("\\u001b]0;pwned\\u0007"),
        "{}",
        stdout(&o)
    );
    let o = on(&root, &["inventory", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            serde_json::Value::Object(m) => m.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    strings(&v, &mut all);
    assert!(
        all.iter().any(|s| s == "vfio\u{9b}2J\u{1b}[2J-pci"),
        "the JSON value is kept whole"
    );
}

/// issue 18 item 11: a command whose reader goes away (`devfence audit show
/// --json | head`) ends quietly: exit 0, nothing on standard error.
#[test]
fn a_closed_pipe_ends_quietly() {
    let (_tmp, root) = host("lab");
    add_acme(&root);
    for args in [
        &["audit", "show", "--json"][..],
        &["audit", "show"][..],
        &["inventory", "--json"][..],
    ] {
        let mut c = cmd_on(&root, args);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        // Close the reading end before the command has written anything.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{args:?}");
    }
}

/// issue 18 item 12 (host part): a garbage `iommu_group` link is reported as
/// malformed, naming the link and where it points — not as a missing group with
/// the advice to enable the IOMMU.
#[test]
fn a_garbage_iommu_group_link_is_malformed_not_missing() {
    let (_tmp, root) = host("lab");
    add_acme(&root);
    let link = device_dir(&root, "0000:5e:10.0").join("iommu_group");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("../../../../nowhere/garbage", &link).unwrap();
    let o = on(&root, &["assign", "0000:5e:10.0", "--tenant", "acme"]);
    assert_eq!(o.status.code(), Some(1), "refused (exit 1): {}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("malformed"), "{e}");
    assert!(e.contains("0000:5e:10.0/iommu_group"), "{e}");
    assert!(e.contains("nowhere/garbage"), "{e}");
    assert!(!e.contains("enable the IOMMU"), "{e}");
    let o = on(&root, &["check"]);
    assert!(
        stdout(&o).contains("malformed iommu_group link"),
        "{}",
        stdout(&o)
    );
}

/// issue 18 item 6: the default tenancy file under the root is found in the root:
/// a link from `etc/devfence/tenancy.toml` to a file outside is not followed out.
#[test]
fn a_linked_default_tenancy_is_not_read_outside_the_root() {
    let (tmp, root) = host("no-acs");
    let outside = tmp.path().join("outside-tenancy.toml");
    std::fs::write(
        &outside,
        "[[tenant]]\nid = \"outsider\"\nlauncher_uid = 4242\n",
    )
    .unwrap();
    let t = root.join("etc/devfence/tenancy.toml");
    std::fs::remove_file(&t).unwrap();
    std::os::unix::fs::symlink(&outside, &t).unwrap();
    let o = on(&root, &["check"]);
    let out = stdout(&o);
    assert!(out.contains("tenancy: none"), "{out}");
    let o = on(&root, &["check", "--json"]);
    assert!(!stdout(&o).contains("outsider"), "{}", stdout(&o));
}

/// issue 18 item 6: the hook's removal of delivered VF tokens (`started begin`)
/// never deletes through a linked `run/devfence/tokens`: the file outside stays.
#[test]
fn the_hook_never_removes_a_token_through_a_link() {
    let (tmp, root) = host("lab");
    add_acme(&root);
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("0000:af:10.0.token"), "victim").unwrap();
    std::fs::create_dir_all(root.join("run/devfence")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("run/devfence/tokens")).unwrap();
    let xml = "<domain type='kvm'><name>vm1</name>\
        <uuid>6f1e2c3a-1111-4222-8333-944455556666</uuid><devices>\
        <hostdev mode='subsystem' type='pci' managed='no'><source>\
        <address domain='0x0000' bus='0xaf' slot='0x10' function='0x0'/>\
        </source></hostdev></devices></domain>";
    let mut c = cmd_on(&root, &["hook", "qemu", "vm1", "started", "begin"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        // A hook that decides without the XML may exit before reading it
        // (libvirt ignores the closed pipe too).
        match child.stdin.take().unwrap().write_all(xml.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r.unwrap(),
        }
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        std::fs::read_to_string(outside.join("0000:af:10.0.token")).unwrap(),
        "victim",
        "removed outside the root: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
}

/// issue 18 item 6: the host key devfence writes under a root stays in the root:
/// an `etc/devfence` link to a directory outside is resolved under the root
/// (re-rooted), so the private key never lands outside it.
#[test]
fn keys_are_written_inside_the_root() {
    let (tmp, root) = host("lab");
    let outside = tmp.path().join("outside-etc");
    std::fs::create_dir_all(&outside).unwrap();
    let etc = root.join("etc/devfence");
    if etc.exists() {
        std::fs::remove_dir_all(&etc).unwrap();
    }
    std::os::unix::fs::symlink(&outside, &etc).unwrap();
    let o = on(&root, &["keys", "init", "--host-id", "hv01"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "keys were written outside the root"
    );
    let inside = root
        .join(outside.strip_prefix("/").unwrap())
        .join("keys/host.key");
    assert!(inside.is_file(), "the key is re-rooted under the root");
    let o = on(&root, &["keys", "show"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// issue 18 item 6: the ledger (and the simulated SM's state beside it) stays in the
/// root: a `var/lib/devfence` link to a directory outside is resolved under the root,
/// so `tenant add` never creates the ledger outside it.
#[test]
fn the_ledger_is_written_inside_the_root() {
    let (tmp, root) = host("lab");
    let outside = tmp.path().join("outside-lib");
    std::fs::create_dir_all(&outside).unwrap();
    let lib = root.join("var/lib/devfence");
    if lib.exists() {
        std::fs::remove_dir_all(&lib).unwrap();
    }
    std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&outside, &lib).unwrap();
    let o = on(
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
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "the ledger was written outside the root"
    );
    let inside = root
        .join(outside.strip_prefix("/").unwrap())
        .join("ledger.db");
    assert!(inside.is_file(), "the ledger is re-rooted under the root");
    let o = on(&root, &["tenant", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("acme"), "{}", stdout(&o));
}
