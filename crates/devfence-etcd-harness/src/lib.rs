//! A real etcd cluster for devfence's fleet tests and benchmarks (a crate of
//! its own, so that it is not in the production library): **three members of
//! Debian's `etcd` on loopback**, each with its own data directory and free
//! ports, one cluster per test, killed and removed on drop.
//!
//! A member can be paused (`SIGSTOP`), resumed (`SIGCONT`), killed (`SIGKILL`)
//! and restarted from its data directory (it rejoins the cluster it was part
//! of). With [`Options::tls`] the members serve their clients over TLS with a CA
//! made here (rcgen), and ask for a client certificate signed by it; the client
//! side's files are in [`Tls`], beside a second, unrelated CA for the "wrong
//! CA is refused" test.
//!
//! Needs Debian's `etcd-server` and `etcd-client` (`testbed/etcd/setup.sh`).
//! Health is waited for with `etcdctl endpoint health` in a bounded poll; no
//! test's verdict depends on the pacing here.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set to keep the cluster's directory (logs, data) after the test.
pub const KEEP_ENV: &str = "DEVFENCE_KEEP_ETCD";

/// How long a start or a restart may take before it is an error.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Members (3 unless a test needs another count).
    pub members: usize,
    /// Serve clients over TLS with client certificates.
    pub tls: bool,
    /// etcd's `--max-txn-ops` (its default is 128).
    pub max_txn_ops: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            members: 3,
            tls: false,
            max_txn_ops: None,
        }
    }
}

/// The client side's TLS files (PEM), all inside the cluster's directory.
#[derive(Clone, Debug)]
pub struct Tls {
    /// The CA that signed the members' and the client's certificates.
    pub ca: PathBuf,
    /// The client certificate.
    pub cert: PathBuf,
    /// The client key.
    pub key: PathBuf,
    /// An unrelated CA: a client trusting only it must refuse the members.
    pub other_ca: PathBuf,
    /// A client certificate signed by the unrelated CA (the members refuse it).
    pub other_cert: PathBuf,
    /// Its key.
    pub other_key: PathBuf,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

/// A running cluster.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
    tls: Option<Tls>,
    server_tls: Option<(PathBuf, PathBuf)>,
    initial_cluster: String,
    token: String,
    max_txn_ops: Option<u32>,
}

fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    // Hold every listener until all are picked, so the ports differ.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| format!("cannot read a listener's port: {e}"))
        })
        .collect()
}

/// etcd and etcdctl on PATH, installed by `testbed/etcd/setup.sh` on the
/// first run when missing (like the fabric harness).
fn ensure_installed() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let have = |c: &str| {
            std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(c).is_file()))
        };
        if have("etcd") && have("etcdctl") {
            return Ok(());
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testbed/etcd/setup.sh");
        let st = Command::new("bash")
            .arg(&script)
            .status()
            .map_err(|e| format!("run {}: {e}", script.display()))?;
        if !st.success() || !have("etcd") {
            return Err(format!(
                "{} failed. Hint: apt-get install etcd-server etcd-client protobuf-compiler",
                script.display()
            ));
        }
        Ok(())
    })
    .clone()
}

fn ca(name: &str) -> Result<(rcgen::CertificateParams, rcgen::KeyPair, String), String> {
    let e = |e: rcgen::Error| format!("cannot make the test CA: {e}");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let key = rcgen::KeyPair::generate().map_err(e)?;
    let cert = params.self_signed(&key).map_err(e)?;
    Ok((params, key, cert.pem()))
}

fn leaf(
    issuer: &rcgen::Issuer<'_, &rcgen::KeyPair>,
    cn: &str,
    names: &[&str],
    usage: rcgen::ExtendedKeyUsagePurpose,
) -> Result<(String, String), String> {
    let e = |e: rcgen::Error| format!("cannot make a test certificate: {e}");
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|s| (*s).to_string()).collect::<Vec<_>>())
            .map_err(e)?;
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![usage];
    let key = rcgen::KeyPair::generate().map_err(e)?;
    let cert = p.signed_by(&key, issuer).map_err(e)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}

/// The CA, the members' server certificate, the client certificate, and an
/// unrelated CA with its own client certificate.
fn make_pki(dir: &Path) -> Result<(Tls, (PathBuf, PathBuf)), String> {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let (ca_params, ca_key, ca_pem) = ca("devfence test etcd CA")?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let (srv_cert, srv_key) = leaf(&issuer, "etcd", &["127.0.0.1", "localhost"], ServerAuth)?;
    let (cli_cert, cli_key) = leaf(&issuer, "devfence-host", &[], ClientAuth)?;
    let (o_params, o_key, o_pem) = ca("somebody else's CA")?;
    let o_issuer = rcgen::Issuer::from_params(&o_params, &o_key);
    let (o_cert, o_cli_key) = leaf(&o_issuer, "intruder", &[], ClientAuth)?;
    let p = |n: &str| dir.join(n);
    for (n, t) in [
        ("ca.pem", &ca_pem),
        ("server.pem", &srv_cert),
        ("server-key.pem", &srv_key),
        ("client.pem", &cli_cert),
        ("client-key.pem", &cli_key),
        ("other-ca.pem", &o_pem),
        ("other-client.pem", &o_cert),
        ("other-client-key.pem", &o_cli_key),
    ] {
        write(&p(n), t)?;
    }
    Ok((
        Tls {
            ca: p("ca.pem"),
            cert: p("client.pem"),
            key: p("client-key.pem"),
            other_ca: p("other-ca.pem"),
            other_cert: p("other-client.pem"),
            other_key: p("other-client-key.pem"),
        },
        (p("server.pem"), p("server-key.pem")),
    ))
}

impl EtcdCluster {
    /// Starts the cluster in a fresh directory; returns once every member
    /// reports healthy.
    ///
    /// # Errors
    /// etcd not installed, a member that dies or does not become healthy
    /// within [`START_DEADLINE`] (its log's tail is in the message).
    pub fn start(opts: &Options) -> Result<Self, String> {
        ensure_installed()?;
        let dir = tempfile::Builder::new()
            .prefix("devfence-etcd-")
            .tempdir()
            .map_err(|e| format!("cannot make the cluster's directory: {e}"))?
            .keep();
        let ports = free_ports(2 * opts.members)?;
        let members: Vec<Member> = (0..opts.members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.join(format!("m{i}.etcd")),
                log: dir.join(format!("m{i}.log")),
                child: None,
                stopped: false,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let (tls, server_tls) = if opts.tls {
            let (t, s) = make_pki(&dir)?;
            (Some(t), Some(s))
        } else {
            (None, None)
        };
        let mut c = Self {
            token: format!(
                "devfence-{}-{}",
                std::process::id(),
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            dir,
            members,
            tls,
            server_tls,
            initial_cluster,
            max_txn_ops: opts.max_txn_ops,
        };
        for i in 0..c.members.len() {
            c.spawn(i, "new")?;
        }
        c.wait_healthy(&(0..c.members.len()).collect::<Vec<_>>(), START_DEADLINE)?;
        Ok(c)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), String> {
        let scheme = self.scheme();
        let m = &self.members[i];
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .map_err(|e| format!("cannot open {}: {e}", m.log.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", m.log.display()))?;
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .env_remove("ETCD_UNSUPPORTED_ARCH");
        if let Some(n) = self.max_txn_ops {
            cmd.arg("--max-txn-ops").arg(n.to_string());
        }
        if let (Some(t), Some((cert, key))) = (&self.tls, &self.server_tls) {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start etcd {}: {e}", m.name))?;
        let m = &mut self.members[i];
        m.child = Some(child);
        m.stopped = false;
        Ok(())
    }

    /// The members' client URLs, in member order.
    #[must_use]
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    #[must_use]
    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[i].client_port
        )
    }

    /// The client's TLS files (a cluster started with [`Options::tls`]).
    #[must_use]
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// The cluster's directory (data, logs, certificates).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Member `i`'s process id, while it runs.
    #[must_use]
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    fn signal(&mut self, i: usize, sig: rustix::process::Signal) -> Result<(), String> {
        let m = &self.members[i];
        let child = m
            .child
            .as_ref()
            .ok_or_else(|| format!("etcd {} is not running", m.name))?;
        let pid = rustix::process::Pid::from_raw(child.id().cast_signed())
            .ok_or_else(|| format!("etcd {} has no pid", m.name))?;
        rustix::process::kill_process(pid, sig)
            .map_err(|e| format!("cannot signal etcd {}: {e}", m.name))
    }

    /// Pauses member `i` (`SIGSTOP`): it holds its sockets but answers nothing.
    ///
    /// # Errors
    /// The member is not running.
    pub fn pause(&mut self, i: usize) -> Result<(), String> {
        self.signal(i, rustix::process::Signal::STOP)?;
        self.members[i].stopped = true;
        Ok(())
    }

    /// Resumes member `i` (`SIGCONT`).
    ///
    /// # Errors
    /// The member is not running.
    pub fn resume(&mut self, i: usize) -> Result<(), String> {
        self.signal(i, rustix::process::Signal::CONT)?;
        self.members[i].stopped = false;
        Ok(())
    }

    /// Kills member `i` (`SIGKILL`) and reaps it; its data directory stays.
    ///
    /// # Errors
    /// The member is not running.
    pub fn kill(&mut self, i: usize) -> Result<(), String> {
        let m = &mut self.members[i];
        let mut child = m
            .child
            .take()
            .ok_or_else(|| format!("etcd {} is not running", m.name))?;
        let _ = child.kill();
        let _ = child.wait();
        m.stopped = false;
        Ok(())
    }

    /// Starts member `i` again from its data directory (after [`kill`](Self::kill))
    /// and waits until it reports healthy: it rejoined the cluster.
    ///
    /// # Errors
    /// It is still running, or does not become healthy in time.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        if self.members[i].child.is_some() {
            return Err(format!(
                "etcd {} is still running; kill it first",
                self.members[i].name
            ));
        }
        self.spawn(i, "existing")?;
        self.wait_healthy(&[i], START_DEADLINE)
    }

    /// Polls `etcdctl endpoint health` on `members` until each reports healthy,
    /// for at most `deadline`.
    ///
    /// # Errors
    /// A member exited, or the deadline passed (the log tails are in the message).
    pub fn wait_healthy(&mut self, members: &[usize], deadline: Duration) -> Result<(), String> {
        let end = Instant::now() + deadline;
        loop {
            for &i in members {
                let m = &mut self.members[i];
                if let Some(c) = m.child.as_mut()
                    && let Ok(Some(st)) = c.try_wait()
                {
                    m.child = None;
                    return Err(format!(
                        "etcd {} exited ({st}) while starting:\n{}",
                        m.name,
                        tail(&m.log)
                    ));
                }
            }
            let eps: Vec<String> = members.iter().map(|&i| self.endpoint(i)).collect();
            if self.etcdctl(&eps, &["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > end {
                let logs: String = members
                    .iter()
                    .map(|&i| {
                        format!(
                            "--- {}\n{}",
                            self.members[i].name,
                            tail(&self.members[i].log)
                        )
                    })
                    .collect();
                return Err(format!(
                    "etcd members {members:?} not healthy within {deadline:?}:\n{logs}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Member `i`'s raft term (`etcdctl endpoint status`), if it answers: it
    /// grows with every election.
    #[must_use]
    pub fn raft_term(&self, i: usize) -> Option<u64> {
        let out = self
            .etcdctl(&[self.endpoint(i)], &["endpoint", "status", "-w", "fields"])
            .ok()?;
        out.lines()
            .find(|l| l.trim_start().starts_with("\"RaftTerm\""))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().trim_end_matches(',').parse().ok())
    }

    /// The member that is the raft leader now, as each running member reports
    /// it (`etcdctl endpoint status`): `None` while they disagree or none leads.
    #[must_use]
    pub fn leader(&self) -> Option<usize> {
        let mut leader = None;
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() || self.members[i].stopped {
                continue;
            }
            let out = self
                .etcdctl(&[self.endpoint(i)], &["endpoint", "status", "-w", "fields"])
                .ok()?;
            let field = |name: &str| {
                out.lines()
                    .find(|l| l.trim_start().starts_with(&format!("\"{name}\"")))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|v| v.trim().to_string())
            };
            let (id, lead) = (field("MemberID")?, field("Leader")?);
            if id == lead {
                if leader.is_some() {
                    return None;
                }
                leader = Some(i);
            }
        }
        leader
    }

    /// Runs `etcdctl` against `endpoints` with the client's TLS files.
    ///
    /// # Errors
    /// etcdctl failed (its stderr is the message).
    pub fn etcdctl(&self, endpoints: &[String], args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["--dial-timeout=1s", "--command-timeout=2s"])
            .args(args)
            .stdin(Stdio::null());
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.cert.display()))
                .arg(format!("--key={}", t.key.display()));
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run etcdctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let start = text.len().saturating_sub(3000);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                // SIGKILL ends a stopped process too.
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::env::var_os(KEEP_ENV).is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("etcd cluster kept in {}", self.dir.display());
        }
    }
}
