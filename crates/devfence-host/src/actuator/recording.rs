//! A [`KernelIo`] that records every change it is asked to make, in order.
//!
//! Two uses:
//!
//! * **Unit tests** ([`RecordingIo::new`]): reads are answered from a script —
//!   files, links, directories, nodes, read errors — and writes can fail with a
//!   given errno or change the script ([`RecordingIo::on_write`],
//!   [`RecordingIo::echo`]), so that multi-step read-backs can be scripted. The
//!   test then asserts on [`RecordingIo::ops`]: what would have been done, in order.
//! * **`--dry-run`** ([`RecordingIo::dry_run`]): reads pass through to another
//!   `KernelIo` (the real or simulated kernel); writes are recorded and **not**
//!   performed. [`KernelIo::is_dry_run`] is true, so the actuator skips its
//!   read-backs.
//!
//! Every mutating call is recorded — `write`, `chown`, `chmod`, `set_vf_guid`,
//! `open_pf` and the handle's `set_vf_token` — including calls that then fail
//! (the kernel saw them). A VF token is recorded as `<token>`, never its bytes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use devfence_model::{Bdf, Guid, IommuGroupId};

use super::{Errno, GuidKind, KernelIo, NodeMeta, PfHandle, VfToken};
use crate::root::HostRoot;

/// One mutating call, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// `write(path, value)`.
    Write {
        /// The kernel path.
        path: String,
        /// The bytes written.
        value: Vec<u8>,
    },
    /// `chown(path, uid, gid)`.
    Chown {
        /// The kernel path.
        path: String,
        /// New owner.
        uid: u32,
        /// New group.
        gid: u32,
    },
    /// `chmod(path, mode)`.
    Chmod {
        /// The kernel path.
        path: String,
        /// New permission bits.
        mode: u32,
    },
    /// An rtnetlink `RTM_SETLINK` setting a VF GUID.
    SetVfGuid {
        /// The PF's netdev.
        netdev: String,
        /// The VF index.
        vf: u32,
        /// Node or port GUID.
        kind: GuidKind,
        /// The GUID.
        guid: Guid,
    },
    /// Opening a PF through VFIO (group path).
    OpenPf {
        /// The PF.
        pf: Bdf,
        /// Its IOMMU group.
        group: IommuGroupId,
    },
    /// `VFIO_DEVICE_FEATURE` SET `PCI_VF_TOKEN` on an open PF. The token itself
    /// is never recorded.
    SetVfToken {
        /// The PF.
        pf: Bdf,
    },
    /// A private file created (a VF token handed to a launcher). Its contents
    /// are never recorded: only their length.
    CreateFile {
        /// The path under the root.
        path: String,
        /// How many bytes.
        len: usize,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// A file removed (a token withdrawn, admitted state voided).
    RemoveFile {
        /// The path under the root.
        path: String,
    },
}

impl IoOp {
    /// A write of `value` to `path` (for building expected lists in tests).
    #[must_use]
    pub fn write(path: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        IoOp::Write {
            path: path.into(),
            value: value.as_ref().to_vec(),
        }
    }
}

fn colon_guid(g: Guid) -> String {
    g.0.to_be_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoOp::Write { path, value } => {
                write!(f, "write {path} {:?}", String::from_utf8_lossy(value))
            }
            IoOp::Chown { path, uid, gid } => write!(f, "chown {uid}:{gid} {path}"),
            IoOp::Chmod { path, mode } => write!(f, "chmod {mode:04o} {path}"),
            IoOp::SetVfGuid {
                netdev,
                vf,
                kind,
                guid,
            } => {
                let k = match kind {
                    GuidKind::Node => "node_guid",
                    GuidKind::Port => "port_guid",
                };
                write!(
                    f,
                    "netlink: ip link set {netdev} vf {vf} {k} {}",
                    colon_guid(*guid)
                )
            }
            IoOp::OpenPf { pf, group } => write!(
                f,
                "vfio: open {pf} through /dev/vfio/{group} (container type1v2) and hold it"
            ),
            IoOp::SetVfToken { pf } => {
                write!(
                    f,
                    "vfio: set VF token of {pf} to <token> (VFIO_DEVICE_FEATURE SET PCI_VF_TOKEN)"
                )
            }
            IoOp::CreateFile {
                path,
                len,
                uid,
                gid,
            } => write!(f, "create {path} (0600, {uid}:{gid}, {len} bytes)"),
            IoOp::RemoveFile { path } => write!(f, "remove {path}"),
        }
    }
}

/// A scripted node.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    File(Vec<u8>),
    Link(String),
    Dir,
    Node(NodeMeta),
    Fail(Errno),
}

/// The scripted kernel state that reads are answered from. Write hooks receive
/// it to change what later reads see.
#[derive(Debug, Default)]
pub struct ScriptState {
    entries: BTreeMap<String, Entry>,
    write_faults: HashMap<String, Errno>,
    chown_faults: HashMap<String, Errno>,
    chmod_faults: HashMap<String, Errno>,
    guid_faults: HashMap<GuidKind, Errno>,
    open_pf_fault: Option<Errno>,
    token_fault: Option<Errno>,
}

impl ScriptState {
    /// Sets a file's contents.
    pub fn set_file(&mut self, path: &str, contents: impl AsRef<[u8]>) {
        self.entries
            .insert(path.to_string(), Entry::File(contents.as_ref().to_vec()));
    }
    /// Sets a symlink's target.
    pub fn set_link(&mut self, path: &str, target: &str) {
        self.entries
            .insert(path.to_string(), Entry::Link(target.to_string()));
    }
    /// Makes `path` an (empty) directory.
    pub fn set_dir(&mut self, path: &str) {
        self.entries.insert(path.to_string(), Entry::Dir);
    }
    /// Removes `path` and everything below it.
    pub fn remove(&mut self, path: &str) {
        let below = format!("{path}/");
        self.entries
            .retain(|k, _| k != path && !k.starts_with(&below));
    }
    /// Makes later writes to `path` fail with `errno` (`None`: succeed again).
    pub fn set_write_fault(&mut self, path: &str, errno: Option<Errno>) {
        match errno {
            Some(e) => self.write_faults.insert(path.to_string(), e),
            None => self.write_faults.remove(path),
        };
    }
    /// The contents of a scripted file.
    #[must_use]
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        match self.entries.get(path) {
            Some(Entry::File(b)) => Some(b),
            _ => None,
        }
    }

    fn exists(&self, path: &str) -> bool {
        if self.entries.contains_key(path) {
            return true;
        }
        let below = format!("{path}/");
        self.entries
            .range(below.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&below))
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, Errno> {
        match self.entries.get(path) {
            Some(Entry::File(b)) => Ok(b.clone()),
            Some(Entry::Fail(e)) => Err(*e),
            Some(Entry::Dir | Entry::Link(_)) => Err(Errno::EISDIR),
            Some(Entry::Node(_)) => Err(Errno::EINVAL),
            None if self.exists(path) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn read_link(&self, path: &str) -> Result<String, Errno> {
        match self.entries.get(path) {
            Some(Entry::Link(t)) => Ok(t.clone()),
            Some(Entry::Fail(e)) => Err(*e),
            Some(_) => Err(Errno::EINVAL),
            None if self.exists(path) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        }
    }

    fn list_dir(&self, path: &str) -> Result<Vec<String>, Errno> {
        if let Some(Entry::Fail(e)) = self.entries.get(path) {
            return Err(*e);
        }
        let below = format!("{path}/");
        let mut names: Vec<String> = self
            .entries
            .range(below.clone()..)
            .take_while(|(k, _)| k.starts_with(&below))
            .filter_map(|(k, _)| k[below.len()..].split('/').next().map(str::to_string))
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() && !matches!(self.entries.get(path), Some(Entry::Dir)) {
            return Err(Errno::ENOENT);
        }
        Ok(names)
    }

    fn stat(&self, path: &str) -> Result<NodeMeta, Errno> {
        match self.entries.get(path) {
            Some(Entry::Node(m)) => Ok(*m),
            Some(Entry::Fail(e)) => Err(*e),
            Some(_) => Ok(NodeMeta {
                uid: 0,
                gid: 0,
                mode: 0o644,
            }),
            None => Err(Errno::ENOENT),
        }
    }
}

/// What a write hook does: it sees the script and the value written, may change
/// the script, and may make the write fail.
pub type WriteHook = Box<dyn FnMut(&mut ScriptState, &[u8]) -> Result<(), Errno> + Send>;

struct Inner {
    state: ScriptState,
    hooks: Vec<(String, WriteHook)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The recording kernel (see the module documentation).
pub struct RecordingIo<'a> {
    inner_io: Option<&'a dyn KernelIo>,
    root: HostRoot,
    script: Mutex<Inner>,
    ops: Arc<Mutex<Vec<IoOp>>>,
}

impl fmt::Debug for RecordingIo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingIo")
            .field("dry_run", &self.inner_io.is_some())
            .field("ops", &*lock(&self.ops))
            .finish_non_exhaustive()
    }
}

impl Default for RecordingIo<'static> {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordingIo<'static> {
    /// A scripted kernel with nothing in it: every read is `ENOENT` until the
    /// builder methods add files, links and directories. Its root is a path that
    /// does not exist, so nothing on the machine is ever read by mistake.
    #[must_use]
    pub fn new() -> Self {
        Self {
            inner_io: None,
            root: HostRoot::new("/nonexistent/devfence-recording-io"),
            script: Mutex::new(Inner {
                state: ScriptState::default(),
                hooks: Vec::new(),
            }),
            ops: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl<'a> RecordingIo<'a> {
    /// `--dry-run` over `inner`: reads pass through to it, changes are recorded
    /// and not performed (writes succeed, `open_pf` gives a handle that records).
    #[must_use]
    pub fn dry_run(inner: &'a dyn KernelIo) -> Self {
        Self {
            inner_io: Some(inner),
            root: inner.root().clone(),
            script: Mutex::new(Inner {
                state: ScriptState::default(),
                hooks: Vec::new(),
            }),
            ops: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn state_mut(&mut self) -> &mut ScriptState {
        &mut self
            .script
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .state
    }

    /// Scripts a file.
    #[must_use]
    pub fn file(mut self, path: &str, contents: impl AsRef<[u8]>) -> Self {
        self.state_mut().set_file(path, contents);
        self
    }
    /// Scripts a symlink.
    #[must_use]
    pub fn link(mut self, path: &str, target: &str) -> Self {
        self.state_mut().set_link(path, target);
        self
    }
    /// Scripts a directory (one that has scripted entries below it exists anyway).
    #[must_use]
    pub fn dir(mut self, path: &str) -> Self {
        self.state_mut().set_dir(path);
        self
    }
    /// Scripts a device node with owner, group and mode (for `stat`).
    #[must_use]
    pub fn node(mut self, path: &str, uid: u32, gid: u32, mode: u32) -> Self {
        self.state_mut()
            .entries
            .insert(path.to_string(), Entry::Node(NodeMeta { uid, gid, mode }));
        self
    }
    /// Makes reads (and `read_link`, `stat`, `list_dir`) of `path` fail.
    #[must_use]
    pub fn fail_read(mut self, path: &str, errno: Errno) -> Self {
        self.state_mut()
            .entries
            .insert(path.to_string(), Entry::Fail(errno));
        self
    }
    /// Makes every write to `path` fail with `errno` (the write is still recorded).
    #[must_use]
    pub fn fail_write(mut self, path: &str, errno: Errno) -> Self {
        self.state_mut().set_write_fault(path, Some(errno));
        self
    }
    /// Makes `chown` of `path` fail.
    #[must_use]
    pub fn fail_chown(mut self, path: &str, errno: Errno) -> Self {
        self.state_mut()
            .chown_faults
            .insert(path.to_string(), errno);
        self
    }
    /// Makes `chmod` of `path` fail.
    #[must_use]
    pub fn fail_chmod(mut self, path: &str, errno: Errno) -> Self {
        self.state_mut()
            .chmod_faults
            .insert(path.to_string(), errno);
        self
    }
    /// Makes `set_vf_guid` of one kind fail.
    #[must_use]
    pub fn fail_set_vf_guid(mut self, kind: GuidKind, errno: Errno) -> Self {
        self.state_mut().guid_faults.insert(kind, errno);
        self
    }
    /// Makes `open_pf` fail.
    #[must_use]
    pub fn fail_open_pf(mut self, errno: Errno) -> Self {
        self.state_mut().open_pf_fault = Some(errno);
        self
    }
    /// Makes `set_vf_token` on handles opened afterwards fail.
    #[must_use]
    pub fn fail_set_vf_token(mut self, errno: Errno) -> Self {
        self.state_mut().token_fault = Some(errno);
        self
    }
    /// Runs `hook` on every successful-so-far write to `path` (after the
    /// `fail_write` check): it may change the script ("after writing X, file Y
    /// reads Z") or fail the write. Hooks run in the order they were added.
    #[must_use]
    pub fn on_write(
        mut self,
        path: &str,
        hook: impl FnMut(&mut ScriptState, &[u8]) -> Result<(), Errno> + Send + 'static,
    ) -> Self {
        self.script
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .hooks
            .push((path.to_string(), Box::new(hook)));
        self
    }
    /// Attribute semantics for `path`: after a write, it reads the value written
    /// with one trailing `\n` (like `sriov_numvfs`, `driver_override`).
    #[must_use]
    pub fn echo(self, path: &str) -> Self {
        let p = path.to_string();
        self.on_write(path, move |st, v| {
            let mut b = v.strip_suffix(b"\n").unwrap_or(v).to_vec();
            b.push(b'\n');
            st.set_file(&p, b);
            Ok(())
        })
    }
    /// After a write to `path`, file `then_path` reads `contents`.
    #[must_use]
    pub fn after_write(self, path: &str, then_path: &str, contents: impl AsRef<[u8]>) -> Self {
        let p = then_path.to_string();
        let c = contents.as_ref().to_vec();
        self.on_write(path, move |st, _| {
            st.set_file(&p, &c);
            Ok(())
        })
    }

    /// Every mutating call so far, in order.
    #[must_use]
    pub fn ops(&self) -> Vec<IoOp> {
        lock(&self.ops).clone()
    }
    /// The calls as display lines (`write /sys/... "vfio-pci"`).
    #[must_use]
    pub fn op_lines(&self) -> Vec<String> {
        lock(&self.ops).iter().map(ToString::to_string).collect()
    }
    /// Forgets the recorded calls.
    pub fn clear_ops(&self) {
        lock(&self.ops).clear();
    }
    /// Runs `f` on the scripted state (to inspect or change it between steps).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut ScriptState) -> R) -> R {
        f(&mut lock(&self.script).state)
    }

    fn record(&self, op: IoOp) {
        lock(&self.ops).push(op);
    }
}

/// The PF handle `open_pf` returns: records `set_vf_token`.
struct RecordedPf {
    pf: Bdf,
    fault: Option<Errno>,
    ops: Arc<Mutex<Vec<IoOp>>>,
}

impl PfHandle for RecordedPf {
    fn set_vf_token(&mut self, _token: &VfToken) -> Result<(), Errno> {
        lock(&self.ops).push(IoOp::SetVfToken { pf: self.pf });
        self.fault.map_or(Ok(()), Err)
    }
}

impl KernelIo for RecordingIo<'_> {
    fn root(&self) -> &HostRoot {
        &self.root
    }

    /// Recorded (never the contents); made only when scripted (a dry run
    /// creates nothing).
    fn create_private_file(
        &self,
        path: &str,
        contents: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), super::files::FileStepError> {
        self.record(IoOp::CreateFile {
            path: path.to_owned(),
            len: contents.len(),
            uid,
            gid,
        });
        if self.inner_io.is_some() {
            return Ok(());
        }
        super::files::create_private_file(&self.root, path, contents, uid, gid)
    }

    /// Recorded; removed only when scripted (a dry run removes nothing; it
    /// says whether the file is there).
    fn remove_file(&self, path: &str) -> std::io::Result<bool> {
        self.record(IoOp::RemoveFile {
            path: path.to_owned(),
        });
        match self.inner_io {
            Some(i) => Ok(i.exists(path)),
            None => self.root.remove_file(path),
        }
    }

    fn write(&self, path: &str, value: &[u8]) -> Result<(), Errno> {
        self.record(IoOp::write(path, value));
        if self.inner_io.is_some() {
            return Ok(());
        }
        let mut g = lock(&self.script);
        let Inner { state, hooks } = &mut *g;
        if let Some(e) = state.write_faults.get(path) {
            return Err(*e);
        }
        for (p, hook) in hooks.iter_mut() {
            if p == path {
                hook(state, value)?;
            }
        }
        Ok(())
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, Errno> {
        match self.inner_io {
            Some(i) => i.read(path),
            None => lock(&self.script).state.read(path),
        }
    }

    fn read_each(&self, dir: &str, names: &[String]) -> Vec<Result<Vec<u8>, Errno>> {
        match self.inner_io {
            Some(i) => i.read_each(dir, names),
            None => names
                .iter()
                .map(|n| {
                    if crate::actuator::is_one_component(n) {
                        self.read(&format!("{dir}/{n}"))
                    } else {
                        Err(Errno::EINVAL)
                    }
                })
                .collect(),
        }
    }

    fn read_link(&self, path: &str) -> Result<String, Errno> {
        match self.inner_io {
            Some(i) => i.read_link(path),
            None => lock(&self.script).state.read_link(path),
        }
    }

    fn exists(&self, path: &str) -> bool {
        match self.inner_io {
            Some(i) => i.exists(path),
            None => lock(&self.script).state.exists(path),
        }
    }

    fn chown(&self, path: &str, uid: u32, gid: u32) -> Result<(), Errno> {
        self.record(IoOp::Chown {
            path: path.to_string(),
            uid,
            gid,
        });
        if self.inner_io.is_some() {
            return Ok(());
        }
        let st = &mut lock(&self.script).state;
        if let Some(e) = st.chown_faults.get(path) {
            return Err(*e);
        }
        match st.entries.get_mut(path) {
            Some(Entry::Node(m)) => {
                m.uid = uid;
                m.gid = gid;
                Ok(())
            }
            Some(_) => Ok(()),
            None => Err(Errno::ENOENT),
        }
    }

    fn chmod(&self, path: &str, mode: u32) -> Result<(), Errno> {
        self.record(IoOp::Chmod {
            path: path.to_string(),
            mode,
        });
        if self.inner_io.is_some() {
            return Ok(());
        }
        let st = &mut lock(&self.script).state;
        if let Some(e) = st.chmod_faults.get(path) {
            return Err(*e);
        }
        match st.entries.get_mut(path) {
            Some(Entry::Node(m)) => {
                m.mode = mode & 0o7777;
                Ok(())
            }
            Some(_) => Ok(()),
            None => Err(Errno::ENOENT),
        }
    }

    fn set_vf_guid(
        &self,
        pf_netdev: &str,
        vf: u32,
        kind: GuidKind,
        guid: Guid,
    ) -> Result<(), Errno> {
        self.record(IoOp::SetVfGuid {
            netdev: pf_netdev.to_string(),
            vf,
            kind,
            guid,
        });
        if self.inner_io.is_some() {
            return Ok(());
        }
        lock(&self.script)
            .state
            .guid_faults
            .get(&kind)
            .map_or(Ok(()), |e| Err(*e))
    }

    fn open_pf(&self, pf: Bdf, group: IommuGroupId) -> Result<Box<dyn PfHandle>, Errno> {
        self.record(IoOp::OpenPf { pf, group });
        let (fault, token_fault) = if self.inner_io.is_some() {
            (None, None)
        } else {
            let st = &lock(&self.script).state;
            (st.open_pf_fault, st.token_fault)
        };
        if let Some(e) = fault {
            return Err(e);
        }
        Ok(Box::new(RecordedPf {
            pf,
            fault: token_fault,
            ops: Arc::clone(&self.ops),
        }))
    }

    fn list_dir(&self, path: &str) -> Result<Vec<String>, Errno> {
        match self.inner_io {
            Some(i) => i.list_dir(path),
            None => lock(&self.script).state.list_dir(path),
        }
    }

    fn stat(&self, path: &str) -> Result<NodeMeta, Errno> {
        match self.inner_io {
            Some(i) => i.stat(path),
            None => lock(&self.script).state.stat(path),
        }
    }

    fn is_dry_run(&self) -> bool {
        self.inner_io.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripted_reads_links_dirs_and_write_hooks() {
        let io = RecordingIo::new()
            .file("/sys/a/x", "1\n")
            .link("/sys/a/l", "../b")
            .dir("/sys/empty")
            .echo("/sys/a/x")
            .after_write("/sys/a/x", "/sys/a/y", "changed\n")
            .fail_write("/sys/a/bad", Errno::EBUSY);
        assert_eq!(io.read("/sys/a/x").unwrap(), b"1\n");
        assert_eq!(io.read_link("/sys/a/l").unwrap(), "../b");
        assert_eq!(io.read_link("/sys/a/x"), Err(Errno::EINVAL));
        assert_eq!(io.read("/sys/nope"), Err(Errno::ENOENT));
        assert!(io.exists("/sys/a") && io.exists("/sys/a/l") && !io.exists("/sys/b"));
        assert_eq!(io.list_dir("/sys/a").unwrap(), vec!["l", "x"]);
        assert_eq!(io.list_dir("/sys").unwrap(), vec!["a", "empty"]);
        assert!(io.list_dir("/sys/empty").unwrap().is_empty());
        assert_eq!(io.list_dir("/sys/none"), Err(Errno::ENOENT));
        io.write("/sys/a/x", b"5").unwrap();
        assert_eq!(io.read("/sys/a/x").unwrap(), b"5\n");
        assert_eq!(io.read("/sys/a/y").unwrap(), b"changed\n");
        assert_eq!(io.write("/sys/a/bad", b"1"), Err(Errno::EBUSY));
        assert_eq!(
            io.op_lines(),
            vec![r#"write /sys/a/x "5""#, r#"write /sys/a/bad "1""#]
        );
    }

    #[test]
    fn display_forms_and_token_redaction() {
        let pf: Bdf = "0000:3b:00.0".parse().unwrap();
        let io = RecordingIo::new().node("/dev/vfio/4", 0, 0, 0o600);
        io.chown("/dev/vfio/4", 107, 107).unwrap();
        io.chmod("/dev/vfio/4", 0o600).unwrap();
        assert_eq!(
            io.stat("/dev/vfio/4").unwrap(),
            NodeMeta {
                uid: 107,
                gid: 107,
                mode: 0o600
            }
        );
        io.set_vf_guid("ib0", 3, GuidKind::Node, Guid(0x0011_2233_4455_6677))
            .unwrap();
        let mut h = io.open_pf(pf, IommuGroupId(40)).unwrap();
        let t = VfToken::from_bytes([0x5a; 16]);
        h.set_vf_token(&t).unwrap();
        let lines = io.op_lines();
        assert_eq!(
            lines,
            vec![
                "chown 107:107 /dev/vfio/4",
                "chmod 0600 /dev/vfio/4",
                "netlink: ip link set ib0 vf 3 node_guid 00:11:22:33:44:55:66:77",
                "vfio: open 0000:3b:00.0 through /dev/vfio/40 (container type1v2) and hold it",
                "vfio: set VF token of 0000:3b:00.0 to <token> (VFIO_DEVICE_FEATURE SET PCI_VF_TOKEN)",
            ]
        );
        let all = format!("{lines:?}{:?}{io:?}", io.ops());
        assert!(!all.contains(&t.reveal_for_launcher()));
        assert!(!all.contains("5a5a"));
    }

    #[test]
    /// issue 11 item 1: a dry run records the files a step would create or
    /// remove (never a token's contents) and creates or removes none.
    fn dry_run_records_files_and_touches_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("run/devfence")).unwrap();
        std::fs::write(dir.path().join("run/devfence/old"), b"x").unwrap();
        let real = super::super::real::RealKernel::new(HostRoot::new(dir.path()));
        let io = RecordingIo::dry_run(&real);
        io.create_private_file("/run/devfence/token", b"secret-token", 107, 107)
            .unwrap();
        assert!(io.remove_file("/run/devfence/old").unwrap());
        assert!(!dir.path().join("run/devfence/token").exists());
        assert!(dir.path().join("run/devfence/old").exists());
        let lines = io.op_lines();
        assert_eq!(
            lines,
            [
                "create /run/devfence/token (0600, 107:107, 12 bytes)",
                "remove /run/devfence/old"
            ]
        );
        assert!(!lines.concat().contains("secret"));
    }

    #[test]
    fn dry_run_passes_reads_through_and_performs_no_write() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/x")).unwrap();
        std::fs::write(dir.path().join("sys/x/attr"), b"old\n").unwrap();
        let real = super::super::real::RealKernel::new(HostRoot::new(dir.path()));
        let io = RecordingIo::dry_run(&real);
        assert!(io.is_dry_run());
        io.write("/sys/x/attr", b"new").unwrap();
        io.write("/sys/x/missing", b"new").unwrap();
        assert_eq!(io.read("/sys/x/attr").unwrap(), b"old\n");
        assert_eq!(
            std::fs::read(dir.path().join("sys/x/attr")).unwrap(),
            b"old\n"
        );
        assert_eq!(io.list_dir("/sys/x").unwrap(), vec!["attr"]);
        assert_eq!(io.ops().len(), 2);
    }
}
