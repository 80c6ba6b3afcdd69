//! `devfence serve --role fabric-controller` as processes: two controllers of
//! one fabric on a real 3-member etcd cluster and a real OpenSM on ibsim (the
//! test re-runs itself under the umad2sim preload; the controllers inherit it
//! and reach the SA). SIGSTOP / SIGCONT / SIGTERM are real signals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devfence_etcd_harness::{EtcdCluster, Options};
use devfence_fabric_harness::{Fabric, FabricSpec, in_fabric};
use devfence_fleet::value::{DesiredRecord, Name};
use devfence_fleet::{Fleet, FleetSettings};
use devfence_model::{Guid, PKey, TenantId};

const BASE: Guid = Guid(0x0002_c903_00d0_0001);
const DEADLINE: Duration = Duration::from_secs(60);

fn devfence() -> Command {
    Command::new(env!("CARGO_BIN_EXE_devfence"))
}
fn vf(i: u64) -> Guid {
    Guid(BASE.0 + 2 * i)
}
fn name(s: &str) -> Name {
    s.parse().expect("name")
}
fn tenant(s: &str) -> TenantId {
    s.parse().expect("tenant")
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A controller process, killed when dropped.
struct Ctl {
    child: Child,
    log: PathBuf,
}

impl Ctl {
    fn start(config: &Path, log: PathBuf) -> Ctl {
        let err = std::fs::File::create(&log).expect("log file");
        let child = devfence()
            .arg("--config")
            .arg(config)
            .args(["serve", "--role", "fabric-controller", "--fabric", "ib0"])
            .env("DEVFENCE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start the controller");
        Ctl { child, log }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(st.success(), "kill -{sig}");
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// SIGTERM, then its exit status.
    fn stop(mut self) -> i32 {
        self.signal("TERM");
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < end, "did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(f: &Fabric, c: &EtcdCluster) -> String {
    let opensm = toml::to_string(&f.opensm_config())
        .expect("opensm section")
        .replace("[sa]", "[fabric.opensm.sa]");
    let endpoints: Vec<String> = c.endpoints().iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[fabric]\nbackend = \"opensm\"\n\n[fabric.opensm]\n{opensm}\n[fleet]\nbackend = \"etcd\"\nendpoints = [{}]\ninsecure_plaintext = true\nprefix = \"dft\"\nfabric = \"ib0\"\nlease_ttl_s = 4\nbatch_window_ms = 100\ntimeout_ms = 3000\n",
        endpoints.join(", ")
    )
}

fn leader(f: &Fleet) -> Option<(String, i64)> {
    f.block_on(f.store().read_leader())
        .expect("reads the leader")
        .map(|(r, t)| (r.controller.to_string(), t))
}

fn file_token(f: &Fabric) -> Option<u64> {
    let text = std::fs::read_to_string(f.dir().join("partitions.conf")).expect("read");
    devfence_fabric::opensm::fence::token_in(&text).expect("token")
}

fn published(f: &Fleet, h: &str, g: Guid, rev: i64) -> Option<u64> {
    f.observed(Some(&name(h)))
        .expect("lists observed")
        .into_iter()
        .find(|o| o.guid == g && o.record.desired_revision >= rev)
        .map(|o| o.record.generation)
}

/// Three controller processes: one leads and publishes three hosts'
/// memberships; SIGSTOP on the leader → a standby takes over after the lease
/// TTL and finishes; SIGCONT → the old leader stands by and applies nothing
/// (the file's token stays the new leader's); SIGTERM → exit 0 and another
/// takes over; SIGKILL on the leader right after a change → the last one
/// takes over and publishes it; SIGTERM on the last → no leader key.
#[test]
fn controller_processes_fail_over_and_the_resumed_one_stands_by() {
    in_fabric(
        "controller_processes_fail_over_and_the_resumed_one_stands_by",
        &FabricSpec::vfs(5, BASE),
        |fab| {
            let c = EtcdCluster::start(&Options::default()).expect("etcd cluster starts");
            let mut s = FleetSettings::plaintext(c.endpoints(), "dft", "ib0").expect("settings");
            s.lease_ttl = Duration::from_secs(4);
            let f = Fleet::connect(s).expect("connects");
            let dir = fab.dir().join("controllers");
            std::fs::create_dir_all(&dir).expect("dir");
            let cfg = dir.join("devfence.toml");
            std::fs::write(&cfg, config(fab, &c)).expect("config");

            let mut sessions = Vec::new();
            let mut revs = Vec::new();
            for (i, (h, t, p)) in [
                ("h0", "red", 0x10u16),
                ("h1", "blue", 0x20),
                ("h2", "green", 0x30),
            ]
            .into_iter()
            .enumerate()
            {
                f.claim_pkey(&tenant(t), PKey(p)).expect("P_Key");
                f.claim_guid(&name(h), vf(i as u64)).expect("GUID");
                let sess = f.register_host(&name(h)).expect("registers");
                let want = DesiredRecord::new(tenant(t), vec![PKey(0x8000 | p)]).expect("record");
                revs.push(f.set_desired(&sess, vf(i as u64), &want).expect("desired"));
                sessions.push(sess);
            }
            let one = Ctl::start(&cfg, dir.join("one.log"));
            let two = Ctl::start(&cfg, dir.join("two.log"));
            let three = Ctl::start(&cfg, dir.join("three.log"));
            for (i, h) in ["h0", "h1", "h2"].into_iter().enumerate() {
                wait_until("the memberships published", || {
                    published(&f, h, vf(i as u64), revs[i]).is_some()
                });
            }
            let (who, token1) = leader(&f).expect("a leader");
            let mut all = vec![one, two, three];
            let at = all
                .iter()
                .position(|c| who.ends_with(&format!("-{}", c.pid())))
                .expect("the leader is one of the three");
            let lead = all.remove(at);
            // The next to lead after `lead` is stopped is one of the other two.
            let (standby, third) = {
                let b = all.pop().expect("two left");
                let a = all.pop().expect("one left");
                (a, b)
            };
            assert_eq!(file_token(fab), u64::try_from(token1).ok());

            // The leader stops (SIGSTOP): after its lease expires the standby
            // leads, applies a new membership and publishes it.
            lead.signal("STOP");
            wait_until("a standby to lead", || {
                leader(&f).is_some_and(|(w, _)| !w.ends_with(&format!("-{}", lead.pid())))
            });
            let (who2, _) = leader(&f).expect("a leader");
            let (standby, third) = if who2.ends_with(&format!("-{}", standby.pid())) {
                (standby, third)
            } else {
                (third, standby)
            };
            let (_, token2) = leader(&f).expect("a leader");
            assert!(token2 > token1);
            f.claim_guid(&name("h0"), vf(3)).expect("GUID");
            let want = DesiredRecord::new(tenant("red"), vec![PKey(0x8010)]).expect("record");
            let rev3 = f.set_desired(&sessions[0], vf(3), &want).expect("desired");
            wait_until("the new leader published", || {
                published(&f, "h0", vf(3), rev3).is_some()
            });
            assert_eq!(file_token(fab), u64::try_from(token2).ok());

            // The old leader resumes: it finds its leadership gone and stands
            // by; nothing it does reaches the SM.
            lead.signal("CONT");
            wait_until("the resumed controller to stand by", || {
                lead.log().contains("standing by")
            });
            assert_eq!(file_token(fab), u64::try_from(token2).ok());
            assert!(leader(&f).is_some_and(|(w, _)| w.ends_with(&format!("-{}", standby.pid()))));

            // SIGTERM: a clean stop resigns; another takes over.
            let (log, stopped) = (standby.log(), standby.pid());
            assert_eq!(standby.stop(), 0, "exit status of a clean stop");
            assert!(log.contains("leading the fabric"), "{log}");
            wait_until("another to lead", || {
                leader(&f).is_some_and(|(w, _)| !w.ends_with(&format!("-{stopped}")))
            });
            let (who3, _) = leader(&f).expect("a leader");
            let (killed, last) = if who3.ends_with(&format!("-{}", lead.pid())) {
                (lead, third)
            } else {
                (third, lead)
            };

            // SIGKILL the leader right after a change arrives: the last one
            // takes over when its lease expires, and finishes.
            f.claim_guid(&name("h1"), vf(4)).expect("GUID");
            let want = DesiredRecord::new(tenant("blue"), vec![PKey(0x8020)]).expect("record");
            let rev4 = f.set_desired(&sessions[1], vf(4), &want).expect("desired");
            killed.signal("KILL");
            wait_until("the last one published", || {
                published(&f, "h1", vf(4), rev4).is_some()
            });
            assert!(leader(&f).is_some_and(|(w, _)| w.ends_with(&format!("-{}", last.pid()))));
            assert_eq!(last.stop(), 0, "exit status of a clean stop");
            assert!(leader(&f).is_none(), "the last controller resigned");
        },
    );
}

/// Bad invocations are refused with exit status 2 and a hint.
#[test]
fn the_controller_refuses_bad_invocations() {
    let dir = tempfile::tempdir().expect("dir");
    let cfg = dir.path().join("devfence.toml");
    std::fs::write(&cfg, "[fabric]\nbackend = \"opensm\"\n").expect("config");
    for (args, want) in [
        (
            vec!["serve", "--role", "fabric-controller"],
            "needs --fabric",
        ),
        (
            vec!["serve", "--role", "fabric-controller", "--fabric", "ib0"],
            "[fleet] section",
        ),
        (vec!["serve", "--fabric", "ib0"], "--role fabric-controller"),
        (
            vec!["serve", "--role", "fabric-controller", "--fabric", "a/b"],
            "--fabric",
        ),
    ] {
        let out = devfence()
            .arg("--config")
            .arg(&cfg)
            .args(&args)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(err.contains("Hint"), "{args:?}: {err}");
    }
}
