//! A real fabric for devfence's tests and benchmarks (a crate of its own, so
//! that it is not in the production library): ibsim (the InfiniBand simulator) plus a
//! real OpenSM under the `libumad2sim` preload, one per test, torn down on drop.
//! The shell twin of this harness is `testbed/fabric/run-fabric.sh`.
//!
//! Topology: the SM's own HCA, one switch, and **one single-port HCA node per VF**
//! (neither ibsim nor upstream OpenSM models mlx5 vports; a VF's vport is, to the
//! SM, a port with its own GUID, LID and P_Key table — exactly such a node). A
//! node's port GUID is its node GUID + 1, so a VF with port GUID `G` is declared
//! with `caguid=G-1`. Rotating a VF's GUID is what a VF reset with a fresh GUID
//! looks like to the fabric: `Unlink`, `Guid "node" G-1`, `ReLink` on the ibsim
//! console (the port leaves, and comes back as a new port with a new LID).
//!
//! A process that queries the SA must itself run under the preload (the
//! preload is read at exec): [`in_fabric`] starts the fabric, re-runs the calling
//! test under `LD_PRELOAD` in the fabric's directory, and the re-run
//! [`attach`](Fabric::attach)es to it.
//!
//! Needs Debian's `ibsim-utils` (ibsim, libumad2sim0) and `opensm`. Waiting here
//! paces start-up and console replies with deadlines; no gate depends on it.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devfence_model::Guid;

use devfence_fabric::OpenSmConfig;
use devfence_fabric::opensm::SaConfig;

/// Where Debian puts the preload library.
pub const UMAD2SIM: &str = "/usr/lib/x86_64-linux-gnu/umad2sim/libumad2sim.so";
/// Environment variable naming the fabric directory in a re-run test.
pub const FABRIC_DIR_ENV: &str = "DEVFENCE_FABRIC_DIR";
/// Set to keep fabric directories (logs) after the test.
pub const KEEP_ENV: &str = "DEVFENCE_KEEP_FABRIC";

/// The fabric to build.
#[derive(Clone, Debug)]
pub struct FabricSpec {
    /// The VF ports: ibsim node name and port GUID.
    pub ports: Vec<(String, Guid)>,
    /// Spare nodes declared but not linked (hot-plugged later with `link`).
    pub spares: Vec<(String, Guid)>,
    /// The initial partitions file.
    pub partitions: String,
    /// OpenSM's `sweep_interval` in seconds (light sweeps).
    pub sweep_interval: u32,
}

impl FabricSpec {
    /// `n` VF ports named `vf0`… with port GUIDs `base`, `base+2`, … (a gap of
    /// one, so no node GUID equals another port's GUID).
    #[must_use]
    pub fn vfs(n: usize, base: Guid) -> Self {
        Self {
            ports: (0..n)
                .map(|i| (format!("vf{i}"), Guid(base.0 + 2 * i as u64)))
                .collect(),
            spares: Vec::new(),
            partitions: devfence_fabric::opensm::partitions::render_block(
                &devfence_fabric::MembershipMap::new(),
            ),
            sweep_interval: 10,
        }
    }

    fn net(&self) -> String {
        // Up to LEAF ports hang off one switch `sw1`; a larger fabric is a two-level
        // tree: `sw1` with the SM host and one uplink per leaf switch `leafN`, each
        // leaf with up to LEAF VF nodes.
        const LEAF: usize = 128;
        let mut s = String::new();
        let n = self.ports.len() + self.spares.len();
        let tree = self.ports.len() > LEAF;
        let at = |i: usize| -> (String, usize) {
            if tree {
                (format!("leaf{}", i / LEAF), i % LEAF + 2)
            } else {
                ("sw1".to_string(), i + 2)
            }
        };
        let _ = writeln!(
            s,
            "switchguid=0x0002c90000001000\ncaguid=0x0002c90000002000\n"
        );
        let _ = writeln!(s, "Hca\t1 \"smhost\"\n[1]\t\"sw1\"[1]\n");
        if tree {
            let leaves = self.ports.len().div_ceil(LEAF);
            let _ = writeln!(s, "Switch\t{} \"sw1\"", leaves + 1);
            let _ = writeln!(s, "[1]\t\"smhost\"[1]");
            for j in 0..leaves {
                let _ = writeln!(s, "[{}]\t\"leaf{j}\"[1]", j + 2);
            }
            s.push('\n');
            for j in 0..leaves {
                let first = j * LEAF;
                let last = (first + LEAF).min(self.ports.len());
                let _ = writeln!(s, "Switch\t{} \"leaf{j}\"", last - first + 1);
                let _ = writeln!(s, "[1]\t\"sw1\"[{}]", j + 2);
                for (i, (name, _)) in self.ports.iter().enumerate().take(last).skip(first) {
                    let _ = writeln!(s, "[{}]\t\"{name}\"[1]", at(i).1);
                }
                s.push('\n');
            }
        } else {
            let _ = writeln!(s, "Switch\t{} \"sw1\"", (n + 1).max(2));
            let _ = writeln!(s, "[1]\t\"smhost\"[1]");
            for (i, (name, _)) in self.ports.iter().enumerate() {
                let _ = writeln!(s, "[{}]\t\"{name}\"[1]", i + 2);
            }
            s.push('\n');
        }
        for (i, (name, g)) in self.ports.iter().enumerate() {
            let (sw, port) = at(i);
            let _ = writeln!(
                s,
                "caguid=0x{:016x}\nHca\t1 \"{name}\"\n[1]\t\"{sw}\"[{port}]\n",
                g.0 - 1,
            );
        }
        for (name, g) in &self.spares {
            let _ = writeln!(s, "caguid=0x{:016x}\nHca\t1 \"{name}\"\n", g.0 - 1);
        }
        s
    }
}

/// A running (or attached) fabric.
#[derive(Debug)]
pub struct Fabric {
    dir: PathBuf,
    sock: String,
    fifo: File,
    ibsim: Option<Child>,
    opensm: Option<Child>,
    owned: bool,
}

fn wait_for(
    what: &str,
    deadline: Duration,
    mut ok: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let end = Instant::now() + deadline;
    loop {
        if ok()? {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("timed out waiting for {what}"));
        }
        // ibsim answers a console command in well under 0.5 ms: a 0.5 ms pause
        // was most of a VF reset's three commands (the benches measured it).
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn io(what: &str, e: &std::io::Error) -> String {
    format!("{what}: {e}")
}

/// Lines `key value` in OpenSM's config template replaced by `value`.
fn set_conf(text: &str, key: &str, value: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut seen = false;
    for l in text.lines() {
        if l.split_whitespace().next() == Some(key) {
            let _ = writeln!(out, "{key} {value}");
            seen = true;
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !seen {
        let _ = writeln!(out, "{key} {value}");
    }
    out
}

impl Fabric {
    /// Starts ibsim and OpenSM for `spec` in a fresh directory; returns once
    /// OpenSM logged its first `SUBNET UP`.
    ///
    /// # Errors
    /// A missing tool, a process that dies, a start that does not finish in 20 s.
    pub fn start(spec: &FabricSpec) -> Result<Self, String> {
        ensure_installed()?;
        let dir = std::env::temp_dir().join(format!(
            "devfence-fabric-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(dir.join("cache"))
            .map_err(|e| io("create the fabric directory", &e))?;
        let sock = format!("dfab{:x}", rand_u64());
        std::fs::write(dir.join("sockname"), &sock).map_err(|e| io("write sockname", &e))?;
        std::fs::write(dir.join("net"), spec.net()).map_err(|e| io("write net", &e))?;
        std::fs::write(dir.join("partitions.conf"), &spec.partitions)
            .map_err(|e| io("write partitions.conf", &e))?;
        let fifo_path = dir.join("ibsim.in");
        let st = Command::new("mkfifo")
            .arg(&fifo_path)
            .status()
            .map_err(|e| io("mkfifo", &e))?;
        if !st.success() {
            return Err("mkfifo failed".into());
        }
        let fifo = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo_path)
            .map_err(|e| io("open the console FIFO", &e))?;
        let console_in = fifo.try_clone().map_err(|e| io("dup the FIFO", &e))?;
        let log = File::create(dir.join("ibsim.log")).map_err(|e| io("create ibsim.log", &e))?;
        let log2 = log.try_clone().map_err(|e| io("dup ibsim.log", &e))?;
        let ibsim = Command::new("ibsim")
            .args(["-s", "net"])
            .current_dir(&dir)
            .env("IBSIM_SOCKNAME", &sock)
            .stdin(Stdio::from(console_in))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| io("start ibsim (apt-get install ibsim-utils)", &e))?;
        let mut me = Self {
            dir: dir.clone(),
            sock,
            fifo,
            ibsim: Some(ibsim),
            opensm: None,
            owned: true,
        };
        let ibsim_log = dir.join("ibsim.log");
        wait_for("ibsim to be ready", Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(&ibsim_log)
                .unwrap_or_default()
                .contains("Network simulator ready"))
        })?;
        // OpenSM's configuration: its own template, with our paths.
        let st = Command::new("opensm")
            .arg("-c")
            .arg(dir.join("opensm.conf.template"))
            .current_dir(&dir)
            .env("OSM_CACHE_DIR", dir.join("cache"))
            .env("OSM_TMP_DIR", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| io("run opensm -c (apt-get install opensm)", &e))?;
        let _ = st;
        let mut conf = std::fs::read_to_string(dir.join("opensm.conf.template"))
            .map_err(|e| io("read the OpenSM template", &e))?;
        let d = dir.display().to_string();
        for (k, v) in [
            ("partition_config_file", format!("{d}/partitions.conf")),
            ("log_file", format!("{d}/opensm.log")),
            ("accum_log_file", "FALSE".into()),
            ("force_log_flush", "TRUE".into()),
            ("log_flags", "0x03".into()),
            ("dump_files_dir", d.clone()),
            ("sweep_interval", spec.sweep_interval.to_string()),
            ("console", "off".into()),
        ] {
            conf = set_conf(&conf, k, &v);
        }
        std::fs::write(dir.join("opensm.conf"), conf).map_err(|e| io("write opensm.conf", &e))?;
        let out =
            File::create(dir.join("opensm.stdout")).map_err(|e| io("create opensm.stdout", &e))?;
        let out2 = out.try_clone().map_err(|e| io("dup", &e))?;
        let opensm = Command::new("opensm")
            .arg("-F")
            .arg(dir.join("opensm.conf"))
            .current_dir(&dir)
            .env("IBSIM_SOCKNAME", &me.sock)
            .env("OSM_CACHE_DIR", dir.join("cache"))
            .env("OSM_TMP_DIR", &dir)
            .env("LD_PRELOAD", UMAD2SIM)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(out2))
            .spawn()
            .map_err(|e| io("start opensm", &e))?;
        std::fs::write(dir.join("opensm.pid"), opensm.id().to_string())
            .map_err(|e| io("write opensm.pid", &e))?;
        me.opensm = Some(opensm);
        me.wait_subnet_up(0, Duration::from_secs(20))?;
        Ok(me)
    }

    /// Attaches to the fabric in `dir` (started by another process).
    ///
    /// # Errors
    /// The directory does not hold a fabric.
    pub fn attach(dir: &Path) -> Result<Self, String> {
        let sock =
            std::fs::read_to_string(dir.join("sockname")).map_err(|e| io("read sockname", &e))?;
        let fifo = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("ibsim.in"))
            .map_err(|e| io("open the console FIFO", &e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            sock: sock.trim().to_owned(),
            fifo,
            ibsim: None,
            opensm: None,
            owned: false,
        })
    }

    /// The fabric's directory (logs, partitions file, cache).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The environment a process needs to reach this fabric's SA.
    #[must_use]
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        vec![
            ("LD_PRELOAD".into(), UMAD2SIM.into()),
            ("IBSIM_SOCKNAME".into(), self.sock.clone().into()),
            (FABRIC_DIR_ENV.into(), self.dir.clone().into_os_string()),
        ]
    }

    /// The OpenSM backend configuration for this fabric.
    #[must_use]
    pub fn opensm_config(&self) -> OpenSmConfig {
        OpenSmConfig {
            partitions_file: self.dir.join("partitions.conf"),
            log_file: self.dir.join("opensm.log"),
            pid_file: Some(self.dir.join("opensm.pid")),
            sa: SaConfig::default(),
            ..OpenSmConfig::default()
        }
    }

    /// OpenSM's PID.
    ///
    /// # Errors
    /// The PID file is missing.
    pub fn opensm_pid(&self) -> Result<i32, String> {
        std::fs::read_to_string(self.dir.join("opensm.pid"))
            .map_err(|e| io("read opensm.pid", &e))?
            .trim()
            .parse()
            .map_err(|e| format!("opensm.pid: {e}"))
    }

    /// `SUBNET UP` lines in OpenSM's log so far.
    #[must_use]
    pub fn subnet_up_count(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("opensm.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.ends_with("-> SUBNET UP"))
            .count() as u64
    }

    /// Waits until the log holds more than `after` `SUBNET UP` lines.
    ///
    /// # Errors
    /// Timeout.
    pub fn wait_subnet_up(&self, after: u64, deadline: Duration) -> Result<(), String> {
        wait_for("SUBNET UP", deadline, || Ok(self.subnet_up_count() > after)).map_err(|e| {
            let tail = std::fs::read_to_string(self.dir.join("opensm.log")).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(8).collect();
            format!("{e}; opensm.log ends: {tail:?}")
        })
    }

    /// Sends one ibsim console command and returns its output.
    ///
    /// # Errors
    /// The console does not answer within 5 s.
    pub fn console(&self, cmd: &str) -> Result<String, String> {
        let log = self.dir.join("ibsim.log");
        let off = std::fs::metadata(&log)
            .map_err(|e| io("stat ibsim.log", &e))?
            .len();
        let mut f = &self.fifo;
        f.write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| io("write the console", &e))?;
        let mut out = String::new();
        wait_for(
            &format!("ibsim to run {cmd:?}"),
            Duration::from_secs(5),
            || {
                let all = std::fs::read(&log).map_err(|e| io("read ibsim.log", &e))?;
                let off = usize::try_from(off).unwrap_or(0).min(all.len());
                out = String::from_utf8_lossy(&all[off..]).into_owned();
                Ok(out.contains("sim> "))
            },
        )?;
        Ok(out.replace("sim> ", ""))
    }

    /// Gives the VF `node` a new port GUID the way a VF reset does: the port
    /// leaves the fabric, changes GUID, and comes back (OpenSM sweeps on the traps).
    ///
    /// # Errors
    /// The console fails.
    pub fn rotate(&self, node: &str, port_guid: Guid) -> Result<(), String> {
        self.console(&format!("Unlink \"{node}\""))?;
        self.console(&format!("Guid \"{node}\" 0x{:016x}", port_guid.0 - 1))?;
        self.console(&format!("ReLink \"{node}\""))?;
        Ok(())
    }

    /// Stops OpenSM (SIGSTOP): it answers nothing and sweeps nothing.
    ///
    /// # Errors
    /// The signal cannot be sent.
    pub fn freeze(&self) -> Result<(), String> {
        self.signal(rustix::process::Signal::STOP)?;
        self.wait_state(|c| c == 'T' || c == 't')
    }

    /// Continues a frozen OpenSM (SIGCONT).
    ///
    /// # Errors
    /// The signal cannot be sent.
    pub fn thaw(&self) -> Result<(), String> {
        self.signal(rustix::process::Signal::CONT)?;
        self.wait_state(|c| c != 'T' && c != 't')
    }

    /// Waits until OpenSM's /proc state letter satisfies `ok` (a signal's effect
    /// is not synchronous with `kill`).
    fn wait_state(&self, ok: impl Fn(char) -> bool) -> Result<(), String> {
        let pid = self.opensm_pid()?;
        wait_for("OpenSM's process state", Duration::from_secs(5), || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_err(|e| io("read /proc", &e))?;
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            Ok(state.is_some_and(&ok))
        })
    }

    /// Restarts OpenSM as `systemctl restart opensm` would: SIGTERM, wait until it
    /// has exited, start it again with the same configuration (its log is
    /// rewritten: `accum_log_file FALSE`); returns once it logged `SUBNET UP`.
    /// The new process's PID goes to `opensm.pid`; the fabric's owner kills it
    /// on drop.
    ///
    /// # Errors
    /// The old process does not exit in 10 s, the new one does not come up.
    pub fn restart_opensm(&self) -> Result<(), String> {
        let pid = self.opensm_pid()?;
        let first_line = |dir: &Path| {
            std::fs::read_to_string(dir.join("opensm.log"))
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        };
        let old_first = first_line(&self.dir);
        self.signal(rustix::process::Signal::TERM)?;
        wait_for("OpenSM to exit", Duration::from_secs(10), || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            Ok(state.is_none_or(|c| c == 'Z' || c == 'X'))
        })?;
        let dir = &self.dir;
        let out = OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join("opensm.stdout"))
            .map_err(|e| io("open opensm.stdout", &e))?;
        let out2 = out.try_clone().map_err(|e| io("dup", &e))?;
        let child = Command::new("opensm")
            .arg("-F")
            .arg(dir.join("opensm.conf"))
            .current_dir(dir)
            .env("IBSIM_SOCKNAME", &self.sock)
            .env("OSM_CACHE_DIR", dir.join("cache"))
            .env("OSM_TMP_DIR", dir)
            .env("LD_PRELOAD", UMAD2SIM)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(out2))
            .spawn()
            .map_err(|e| io("start opensm", &e))?;
        let new_pid = child.id();
        // The child is reaped by whoever owns the fabric (it kills the PID in
        // opensm.pid on drop); this handle is let go.
        drop(child);
        std::fs::write(dir.join("opensm.pid"), new_pid.to_string())
            .map_err(|e| io("write opensm.pid", &e))?;
        wait_for(
            "the new OpenSM's SUBNET UP",
            Duration::from_secs(20),
            || {
                let log = std::fs::read_to_string(dir.join("opensm.log")).unwrap_or_default();
                Ok(
                    first_line(dir) != old_first
                        && log.lines().any(|l| l.ends_with("-> SUBNET UP")),
                )
            },
        )
    }

    /// Asks OpenSM to reopen its log (SIGUSR1), as Debian's logrotate does after
    /// moving it away.
    ///
    /// # Errors
    /// The signal cannot be sent.
    pub fn signal_usr1(&self) -> Result<(), String> {
        self.signal(rustix::process::Signal::USR1)
    }

    /// Asks OpenSM for a heavy sweep (SIGHUP), as an operator would.
    ///
    /// # Errors
    /// The signal cannot be sent.
    pub fn hup(&self) -> Result<(), String> {
        self.signal(rustix::process::Signal::HUP)
    }

    fn signal(&self, s: rustix::process::Signal) -> Result<(), String> {
        let pid = self.opensm_pid()?;
        let p = rustix::process::Pid::from_raw(pid).ok_or("bad PID")?;
        rustix::process::kill_process(p, s).map_err(|e| format!("signal OpenSM: {e}"))
    }
}

/// Installs ibsim and OpenSM through `testbed/fabric/setup.sh` when they are
/// missing (as the real-kernel testbed installs QEMU on first use), once per
/// process.
fn ensure_installed() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let have = |c: &str| {
            std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(c).is_file()))
        };
        if Path::new(UMAD2SIM).exists() && have("ibsim") && have("opensm") {
            return Ok(());
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testbed/fabric/setup.sh");
        let st = Command::new("bash")
            .arg(&script)
            .status()
            .map_err(|e| format!("run {}: {e}", script.display()))?;
        if !st.success() {
            return Err(format!(
                "{} failed: install ibsim-utils and opensm (apt-get install ibsim-utils opensm infiniband-diags libibumad-dev)",
                script.display()
            ));
        }
        Ok(())
    })
    .clone()
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // Only for a socket name; the clock is the fallback.
    if getrandom::fill(&mut b).is_err() {
        return u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

impl Drop for Fabric {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // An OpenSM restarted by a test (`restart_opensm`) is not our child
        // handle: kill it by the PID it recorded, if it is not the one we hold.
        if let Ok(pid) = self.opensm_pid()
            && self
                .opensm
                .as_ref()
                .is_some_and(|c| i64::from(c.id()) != i64::from(pid))
            && let Some(p) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
        for c in [self.opensm.as_mut(), self.ibsim.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os(KEEP_ENV).is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `body` with a fabric built from `spec`, in a process under the preload.
///
/// Called from a test named `test` (its full path as libtest prints it, e.g.
/// `handover_on_opensm`): the first call starts the fabric and re-runs exactly this
/// test with the preload, in the fabric's directory; the re-run sees
/// [`FABRIC_DIR_ENV`], attaches, and runs `body`. The outer call fails (panics,
/// as tests do) if the re-run fails, with its output.
///
/// # Panics
/// When the fabric cannot start or the re-run fails.
pub fn in_fabric(test: &str, spec: &FabricSpec, body: impl FnOnce(&Fabric)) {
    if let Some(dir) = std::env::var_os(FABRIC_DIR_ENV) {
        let f = Fabric::attach(Path::new(&dir)).unwrap_or_else(|e| panic!("attach: {e}"));
        body(&f);
        return;
    }
    let f = Fabric::start(spec).unwrap_or_else(|e| panic!("start the fabric: {e}"));
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let out = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .envs(f.env())
        .current_dir(f.dir())
        .output()
        .unwrap_or_else(|e| panic!("re-run {test}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{test} under the fabric failed ({}):\n{text}",
        out.status
    );
    assert!(
        text.contains("1 passed"),
        "{test} did not run under the fabric (wrong test name?):\n{text}"
    );
}
