//! Inventory readers: what the kernel exposes under one host root, as an
//! [`Inventory`].
//!
//! The readers follow the kernel's layout (`reference/kernel-interfaces.md`
//! §1–§5): bus entries such as `/sys/bus/pci/devices/<BDF>` are symlinks into
//! `/sys/devices/...`, resolved lexically through [`HostRoot`]; attribute files are
//! parsed by [`crate::parse`]. Only an unusable root is fatal ([`HostError`]).
//! Anything else that cannot be read or parsed — a missing or malformed attribute,
//! a dangling link, a value that is not UTF-8 — becomes a [`ReadProblem`] naming
//! the kernel path and the value, and the rest of the host is still read. Files
//! that the kernel only sometimes provides (`sriov_*`, `physfn`, `vfio-dev`,
//! `reset`, a whole bus such as `/sys/bus/ap`) are simply absent from the
//! inventory when they are absent from the host.
//!
//! Cost: each device directory is listed once and the listing decides which
//! optional files are opened. A few optional files one level further down
//! (`vfio-dev/vfio<X>/dev`, OFED `sriov/<N>/*`, a card's `type`, a queue's
//! `status`, `guest_matrix`) are opened directly instead, because one failed
//! open costs less than listing their directory. AP queue drivers come from
//! listing `/sys/bus/ap/drivers/*` rather than one `readlink` per queue, and the
//! AP drivers' and devices' directories (65,536 entries each on the `scale`
//! profile) are streamed, without a string per entry, on two threads. A device's
//! directory is opened once (in the root) and its files and links are opened
//! relative to that descriptor ([`RootDir`]: one path component instead of the
//! whole kernel path, under the same rules); bus links are read relative to the
//! bus directory, and an IOMMU group's `devices` is listed without listing the
//! group's directory. The read buffer is reused. Large sets (PCI functions, IOMMU groups, VFIO nodes, mdevs, AP queue
//! states, IB devices) are read on up to [`std::thread::available_parallelism`]
//! threads; results, counters and problems are merged deterministically.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use devfence_model::{
    ApBus, ApCard, ApMatrixMdev, ApQueue, Apqn, Bdf, GroupMember, INVENTORY_SCHEMA, IbDevice,
    IbPort, Inventory, IommuGroup, IommuGroupId, Mdev, MdevParent, MdevType, MdevUuid, PKeySlot,
    PciFunction, ReadProblem, SriovPf, VfGuids, VfioDevRef, VfioNode, VfioNodeKind, VfioPciParams,
    VirtFn,
};

use crate::parse::{self, ParseResult};
pub use crate::root::HostError;
use crate::root::{Access, EntryKind, HostRoot, RootDir, resolve_target};

/// How much reading an inventory took, in syscall-level operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReadStats {
    /// Files opened to read a value (including opens that failed), plus the
    /// `stat` and `security.selinux` queries of `/dev/vfio` nodes.
    pub files_read: u64,
    /// Symlinks read (`readlink`).
    pub links_read: u64,
    /// Directories listed (`read_dir`).
    pub dirs_listed: u64,
    /// Attribute values recorded in the inventory: each value parsed from a file,
    /// each link basename, each name taken from a listing (group members, AP
    /// queue and card drivers) and each node's ownership.
    pub attributes: u64,
}

impl ReadStats {
    /// Adds another set of counters to this one.
    pub fn add(&mut self, o: &ReadStats) {
        self.files_read += o.files_read;
        self.links_read += o.links_read;
        self.dirs_listed += o.dirs_listed;
        self.attributes += o.attributes;
    }
    /// All reads together: files, links and directory listings.
    #[must_use]
    pub fn reads(&self) -> u64 {
        self.files_read + self.links_read + self.dirs_listed
    }
}

/// Reads the whole inventory of the host under `root`.
///
/// # Errors
/// Only when the root itself is unusable ([`HostError`]); everything else is
/// reported in [`Inventory::problems`].
pub fn read_inventory(root: &HostRoot) -> Result<Inventory, HostError> {
    read_inventory_with_stats(root).map(|(inv, _)| inv)
}

/// [`read_inventory`], also returning how many reads it took.
///
/// # Errors
/// As [`read_inventory`].
pub fn read_inventory_with_stats(root: &HostRoot) -> Result<(Inventory, ReadStats), HostError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_THREADS);
    read_with_threads(root, threads)
}

/// [`read_inventory_with_stats`] on at most `threads` threads.
fn read_with_threads(root: &HostRoot, threads: usize) -> Result<(Inventory, ReadStats), HostError> {
    root.check()?;
    let threads = threads.max(1);
    let mut r = Reader::new(root, threads);
    let mut inv = Inventory {
        schema: INVENTORY_SCHEMA,
        ..Inventory::default()
    };
    // The AP bus is read beside the rest: listing its (possibly huge) device and
    // driver directories is sequential work that would otherwise leave cores idle.
    let ap_job = || {
        let mut ar = Reader::new(root, threads);
        let ap = read_ap(&mut ar);
        (ap, ar.stats, ar.problems)
    };
    let (ap, ap_stats, ap_problems) = std::thread::scope(|s| {
        let handle = std::thread::Builder::new().spawn_scoped(s, ap_job).ok();
        inv.kernel_release = r.req_attr(None, "/proc/sys/kernel/osrelease", parse::one_line);
        inv.vfio_pci = read_vfio_pci(&mut r);
        inv.pci = read_pci(&mut r);
        inv.iommu_groups = read_groups(&mut r);
        for f in &mut inv.pci {
            check_group_link(
                &mut r,
                &f.bdf,
                &f.sysfs_path,
                &mut f.iommu_group,
                &inv.iommu_groups,
            );
        }
        inv.vfio_nodes = read_vfio_nodes(&mut r);
        inv.mdev_parents = read_mdev_parents(&mut r);
        inv.mdevs = read_mdevs(&mut r);
        for m in &mut inv.mdevs {
            check_group_link(
                &mut r,
                &m.uuid,
                &m.sysfs_path,
                &mut m.iommu_group,
                &inv.iommu_groups,
            );
        }
        inv.ib = read_ib(&mut r);
        match handle.map(std::thread::ScopedJoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            // The thread could not be started: read the AP bus here.
            None => ap_job(),
        }
    });
    inv.ap = ap;
    let Reader {
        mut problems,
        mut stats,
        ..
    } = r;
    stats.add(&ap_stats);
    problems.extend(ap_problems);
    problems.sort_by(|a, b| {
        (&a.path, &a.subject, &a.error, &a.value).cmp(&(&b.path, &b.subject, &b.error, &b.value))
    });
    inv.problems = problems;
    Ok((inv, stats))
}

/// At most this many reader threads.
const MAX_THREADS: usize = 8;
/// Fewer items than this per thread are read on the calling thread alone.
const MIN_ITEMS_PER_THREAD: usize = 32;
/// Items a thread claims at a time.
const BLOCK: usize = 16;
/// Larger attribute files are refused (sysfs values are at most a page).
const MAX_FILE: usize = 1 << 20;
/// Problem values are cut to this many characters.
const VALUE_MAX_CHARS: usize = 80;

/// A value as shown in a [`ReadProblem`]: one trailing newline removed, lossily
/// decoded, cut to [`VALUE_MAX_CHARS`] characters.
fn show(bytes: &[u8]) -> String {
    let b = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let s = String::from_utf8_lossy(b);
    if s.chars().count() > VALUE_MAX_CHARS {
        let mut t: String = s.chars().take(VALUE_MAX_CHARS - 1).collect();
        t.push('…');
        t
    } else {
        s.into_owned()
    }
}

fn show_str(s: &str) -> String {
    show(s.as_bytes())
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "missing".to_string(),
        _ if e.raw_os_error() == Some(40) => {
            "cannot read: a symbolic link where the kernel has a file (devfence does not follow it)"
                .to_string()
        }
        _ => format!("cannot read: {e}"),
    }
}

/// The last component of a link target.
fn basename(target: &str) -> &str {
    target
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
}

/// What a directory entry is (from the listing, without a `stat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Link,
    Other,
}

/// One directory entry.
#[derive(Debug)]
struct Entry {
    name: String,
    kind: Kind,
}

/// A directory listing sorted by name, for presence checks.
struct Listing(Vec<Entry>);

impl Listing {
    fn new(mut entries: Vec<Entry>) -> Self {
        entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Self(entries)
    }
    fn kind(&self, name: &str) -> Option<Kind> {
        self.0
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.0.get(i))
            .map(|e| e.kind)
    }
    fn has(&self, name: &str) -> bool {
        self.kind(name).is_some()
    }
}

/// One reading thread's state: the root, a reused buffer, counters and problems.
struct Reader<'r> {
    root: &'r HostRoot,
    threads: usize,
    /// Reused for the value of every file read.
    buf: Vec<u8>,
    stats: ReadStats,
    problems: Vec<ReadProblem>,
}

impl<'r> Reader<'r> {
    fn new(root: &'r HostRoot, threads: usize) -> Self {
        Self {
            root,
            threads,
            buf: vec![0; 4096],
            stats: ReadStats::default(),
            problems: Vec::new(),
        }
    }

    fn problem(
        &mut self,
        subject: Option<&str>,
        path: &str,
        value: Option<String>,
        error: impl Into<String>,
    ) {
        self.problems.push(ReadProblem {
            subject: subject.map(str::to_owned),
            path: path.to_owned(),
            value,
            error: error.into(),
        });
    }

    /// Reads the file at `kpath` into the buffer and returns its length.
    fn read(&mut self, kpath: &str) -> io::Result<usize> {
        self.stats.files_read += 1;
        // In the root, not following a link in the last component, non-blocking
        // and only a regular file (HostRoot::open): a FIFO or a link planted in
        // place of an attribute is a problem, never a hang or a read elsewhere.
        let f = self.root.open(kpath, Access::ReadNoFollow)?;
        self.fill(f)
    }

    /// Reads the file `name` of the directory `dir` into the buffer, as
    /// [`Reader::read`] does, opening it relative to the directory (one path
    /// component instead of the whole kernel path; same checks, [`RootDir`]).
    fn read_at(&mut self, dir: &RootDir<'_>, name: &str) -> io::Result<usize> {
        self.stats.files_read += 1;
        let f = dir.open(name, Access::ReadNoFollow)?;
        self.fill(f)
    }

    /// Reads an opened file into the buffer and returns its length.
    ///
    /// A read shorter than asked for is taken as the end of the file: sysfs and
    /// procfs produce an attribute's whole value in one read, and a regular file
    /// only reads short at its end. This saves the extra `read` that returns 0.
    fn fill(&mut self, mut f: std::fs::File) -> io::Result<usize> {
        let mut len = 0;
        loop {
            if len == self.buf.len() {
                if self.buf.len() >= MAX_FILE {
                    return Err(io::Error::other(format!(
                        "larger than {} KiB",
                        MAX_FILE >> 10
                    )));
                }
                let grown = self.buf.len().saturating_mul(2).max(4096);
                self.buf.resize(grown, 0);
            }
            let want = self.buf.len() - len;
            match f.read(self.buf.get_mut(len..).unwrap_or_default()) {
                Ok(0) => break,
                Ok(n) => {
                    len += n;
                    if n < want {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(len)
    }

    /// Reads and parses one attribute. `missing_ok`: an absent file is `None`
    /// without a problem.
    fn value<T>(
        &mut self,
        subject: Option<&str>,
        kpath: &str,
        missing_ok: bool,
        parse: impl FnOnce(&[u8]) -> ParseResult<T>,
    ) -> Option<T> {
        let read = self.read(kpath);
        self.parsed(subject, read, || kpath.to_owned(), missing_ok, parse)
    }

    /// [`Reader::value`] of the file `name` in `dir`; its kernel path is only
    /// spelled out for a problem.
    fn value_at<T>(
        &mut self,
        subject: Option<&str>,
        dir: &RootDir<'_>,
        name: &str,
        missing_ok: bool,
        parse: impl FnOnce(&[u8]) -> ParseResult<T>,
    ) -> Option<T> {
        let read = self.read_at(dir, name);
        self.parsed(subject, read, || dir.child_path(name), missing_ok, parse)
    }

    /// An attribute `name` of `dir` that may be absent.
    fn opt_attr_at<T>(
        &mut self,
        subject: Option<&str>,
        dir: &RootDir<'_>,
        name: &str,
        parse: impl FnOnce(&[u8]) -> ParseResult<T>,
    ) -> Option<T> {
        self.value_at(subject, dir, name, true, parse)
    }

    /// A required attribute `name` of `dir`: absence is a problem.
    fn req_attr_at<T>(
        &mut self,
        subject: Option<&str>,
        dir: &RootDir<'_>,
        name: &str,
        parse: impl FnOnce(&[u8]) -> ParseResult<T>,
    ) -> Option<T> {
        self.value_at(subject, dir, name, false, parse)
    }

    /// The value read into the buffer, parsed; a problem at `path()` when the
    /// read or the parse failed.
    fn parsed<T>(
        &mut self,
        subject: Option<&str>,
        read: io::Result<usize>,
        path: impl FnOnce() -> String,
        missing_ok: bool,
        parse: impl FnOnce(&[u8]) -> ParseResult<T>,
    ) -> Option<T> {
        match read {
            Ok(len) => {
                let bytes = self.buf.get(..len).unwrap_or_default();
                match parse(bytes) {
                    Ok(v) => {
                        self.stats.attributes += 1;
                        Some(v)
                    }
                    Err(reason) => {
                        let value = show(bytes);
                        self.problem(subject, &path(), Some(value), reason);
                        None
                    }
                }
            }
            Err(e) if missing_ok && e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                self.problem(subject, &path(), None, io_reason(&e));
                None
            }
        }
    }

    /// A required attribute: absence is a problem.
    fn req_attr<T>(
        &mut self,
        subject: Option<&str>,
        kpath: &str,
        parse: impl FnOnce(&[u8]) -> ParseResult<T>,
    ) -> Option<T> {
        self.value(subject, kpath, false, parse)
    }

    /// An attribute that may be absent.
    fn opt_attr<T>(
        &mut self,
        subject: Option<&str>,
        kpath: &str,
        parse: impl FnOnce(&[u8]) -> ParseResult<T>,
    ) -> Option<T> {
        self.value(subject, kpath, true, parse)
    }

    /// An attribute of a listed directory `dir`: read only when listed; when not
    /// listed, `None`, and a problem if `required`.
    fn listed_attr<T>(
        &mut self,
        l: &Listing,
        subject: Option<&str>,
        dir: &RootDir<'_>,
        name: &str,
        required: bool,
        parse: impl FnOnce(&[u8]) -> ParseResult<T>,
    ) -> Option<T> {
        if l.has(name) {
            self.value_at(subject, dir, name, !required, parse)
        } else {
            if required {
                self.problem(subject, &dir.child_path(name), None, "missing");
            }
            None
        }
    }

    /// Lists a directory. Entries whose names are not UTF-8 are reported and
    /// skipped.
    fn list(&mut self, subject: Option<&str>, kpath: &str) -> io::Result<Vec<Entry>> {
        self.list_in(subject, kpath).map(|(_, l)| l)
    }

    /// [`Reader::list`], also returning the opened directory, for opens relative
    /// to it.
    fn list_in(
        &mut self,
        subject: Option<&str>,
        kpath: &str,
    ) -> io::Result<(RootDir<'r>, Vec<Entry>)> {
        self.stats.dirs_listed += 1;
        let mut dir = self.root.open_dir(kpath)?;
        let entries = self.entries(subject, &mut dir)?;
        Ok((dir, entries))
    }

    /// The subdirectory `name` of `parent`, opened relative to it and listed.
    fn list_at<'p>(
        &mut self,
        subject: Option<&str>,
        parent: &RootDir<'p>,
        name: &str,
    ) -> io::Result<(RootDir<'p>, Vec<Entry>)> {
        self.stats.dirs_listed += 1;
        let mut dir = parent.open_dir(name)?;
        let entries = self.entries(subject, &mut dir)?;
        Ok((dir, entries))
    }

    /// The entries of an opened directory, in directory order.
    fn entries(&mut self, subject: Option<&str>, dir: &mut RootDir<'_>) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        self.each_entry(subject, dir, |_, name, kind| {
            out.push(Entry {
                name: name.to_owned(),
                kind,
            });
        })?;
        Ok(out)
    }

    /// Calls `f` for every entry of an opened directory whose name is UTF-8,
    /// without collecting them (for directories of tens of thousands of
    /// entries); a name that is not UTF-8 is a problem. An entry whose type the
    /// file system does not say is asked (without following) and comes last.
    fn each_entry(
        &mut self,
        subject: Option<&str>,
        dir: &mut RootDir<'_>,
        mut f: impl FnMut(&mut Self, &str, Kind),
    ) -> io::Result<()> {
        let mut unknown: Vec<String> = Vec::new();
        let mut bad: Vec<String> = Vec::new();
        dir.for_each_entry(|name, kind| match std::str::from_utf8(name) {
            Ok(n) => match kind {
                Some(EntryKind::Link) => f(self, n, Kind::Link),
                Some(EntryKind::Dir) => f(self, n, Kind::Dir),
                Some(EntryKind::File) => f(self, n, Kind::File),
                Some(EntryKind::Other) => f(self, n, Kind::Other),
                None => unknown.push(n.to_owned()),
            },
            Err(_) => bad.push(show(name)),
        })?;
        for n in unknown {
            // The file system does not say: ask (without following).
            let kind = match dir
                .open(&n, Access::PathNoFollow)
                .and_then(|h| h.metadata())
            {
                Ok(m) if m.file_type().is_symlink() => Kind::Link,
                Ok(m) if m.is_dir() => Kind::Dir,
                Ok(m) if m.is_file() => Kind::File,
                _ => Kind::Other,
            };
            f(self, &n, kind);
        }
        for shown in bad {
            self.problem(
                subject,
                &format!("{}/{shown}", dir.kernel_path()),
                Some(shown.clone()),
                "directory entry name is not valid UTF-8",
            );
        }
        Ok(())
    }

    /// A listing's result as an option: an absent directory is `None`, a problem
    /// when `required`; an unreadable one is a problem.
    fn listing<X>(
        &mut self,
        subject: Option<&str>,
        path: impl FnOnce() -> String,
        listed: io::Result<X>,
        required: bool,
    ) -> Option<X> {
        match listed {
            Ok(l) => Some(l),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if required {
                    self.problem(subject, &path(), None, "missing");
                }
                None
            }
            Err(e) => {
                self.problem(subject, &path(), None, format!("cannot list: {e}"));
                None
            }
        }
    }

    /// Lists a directory that may be absent: `None` when absent (no problem) or
    /// unreadable (a problem).
    fn list_opt(&mut self, subject: Option<&str>, kpath: &str) -> Option<Vec<Entry>> {
        let listed = self.list(subject, kpath);
        self.listing(subject, || kpath.to_owned(), listed, false)
    }

    /// Lists a directory that must exist: absence is a problem.
    fn list_req(&mut self, subject: Option<&str>, kpath: &str) -> Option<Vec<Entry>> {
        let listed = self.list(subject, kpath);
        self.listing(subject, || kpath.to_owned(), listed, true)
    }

    /// [`Reader::list_opt`], keeping the opened directory.
    fn list_opt_in(
        &mut self,
        subject: Option<&str>,
        kpath: &str,
    ) -> Option<(RootDir<'r>, Vec<Entry>)> {
        let listed = self.list_in(subject, kpath);
        self.listing(subject, || kpath.to_owned(), listed, false)
    }

    /// [`Reader::list_opt`] of the subdirectory `name` of `parent`.
    fn list_opt_at<'p>(
        &mut self,
        subject: Option<&str>,
        parent: &RootDir<'p>,
        name: &str,
    ) -> Option<(RootDir<'p>, Vec<Entry>)> {
        let listed = self.list_at(subject, parent, name);
        self.listing(subject, || parent.child_path(name), listed, false)
    }

    /// [`Reader::list_req`] of the subdirectory `name` of `parent`.
    fn list_req_at<'p>(
        &mut self,
        subject: Option<&str>,
        parent: &RootDir<'p>,
        name: &str,
    ) -> Option<(RootDir<'p>, Vec<Entry>)> {
        let listed = self.list_at(subject, parent, name);
        self.listing(subject, || parent.child_path(name), listed, true)
    }

    /// Lists the subdirectory `name` of `parent` entry by entry into `f`
    /// ([`Reader::each_entry`]): for directories of tens of thousands of entries.
    /// Returns whether the whole directory was listed; when not, a problem as
    /// [`Reader::list_opt_at`] / [`Reader::list_req_at`] (`required`) report it.
    fn stream_at(
        &mut self,
        subject: Option<&str>,
        parent: &RootDir<'_>,
        name: &str,
        required: bool,
        f: impl FnMut(&mut Self, &str, Kind),
    ) -> bool {
        self.stats.dirs_listed += 1;
        let listed = match parent.open_dir(name) {
            Ok(mut d) => self.each_entry(subject, &mut d, f),
            Err(e) => Err(e),
        };
        self.listing(subject, || parent.child_path(name), listed, required)
            .is_some()
    }

    /// The text of the symlink at `kpath`; a target that is not UTF-8 is an
    /// `InvalidData` error.
    fn link_target(&mut self, kpath: &str) -> io::Result<String> {
        self.stats.links_read += 1;
        let t = self.root.read_link_raw(kpath)?;
        t.into_string().map_err(|t| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "link target {:?} is not valid UTF-8",
                    show(t.as_encoded_bytes())
                ),
            )
        })
    }

    /// The basename of the link at `kpath`, parsed with `parse`. `missing_ok`:
    /// an absent link is `None` without a problem.
    fn link_value<T>(
        &mut self,
        subject: Option<&str>,
        kpath: &str,
        missing_ok: bool,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let target = self.link_target(kpath);
        self.link_parsed(subject, kpath, target, missing_ok, parse)
    }

    /// The link at `kpath`, read as `target`, parsed by its basename.
    fn link_parsed<T>(
        &mut self,
        subject: Option<&str>,
        kpath: &str,
        target: io::Result<String>,
        missing_ok: bool,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match target {
            // The basename of the resolved target: a link to an ancestor reads
            // like `../../../0000:3b:00.0` but may also be written `../..`.
            Ok(t) => match parse(basename(&resolve_target(kpath, &t))) {
                Ok(v) => {
                    self.stats.attributes += 1;
                    Some(v)
                }
                Err(reason) => {
                    self.problem(subject, kpath, Some(show_str(&t)), reason);
                    None
                }
            },
            Err(e) if missing_ok && e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                let reason = if e.kind() == io::ErrorKind::InvalidInput {
                    "not a symlink".to_string()
                } else {
                    io_reason(&e)
                };
                self.problem(subject, kpath, None, reason);
                None
            }
        }
    }

    /// Resolves a bus or class entry to the kernel path of the device directory:
    /// a symlink is resolved lexically, a directory is taken as it is. Returns
    /// the resolved path and the raw link text (if a link).
    fn device_dir(
        &mut self,
        subject: Option<&str>,
        kpath: &str,
        kind: Kind,
    ) -> Option<(String, Option<String>)> {
        match kind {
            Kind::Dir => Some((kpath.to_owned(), None)),
            _ => {
                let target = self.link_target(kpath);
                self.device_link(subject, kpath, target)
            }
        }
    }

    /// The device directory a bus or class link at `kpath` (read as `target`)
    /// points at, and the link's text.
    fn device_link(
        &mut self,
        subject: Option<&str>,
        kpath: &str,
        target: io::Result<String>,
    ) -> Option<(String, Option<String>)> {
        match target {
            Ok(t) => Some((resolve_target(kpath, &t), Some(t))),
            Err(e) => {
                let reason = if e.kind() == io::ErrorKind::InvalidInput {
                    "expected a symlink into /sys/devices".to_string()
                } else {
                    io_reason(&e)
                };
                self.problem(subject, kpath, None, reason);
                None
            }
        }
    }

    /// The text of the symlink `name` in `dir` (`readlinkat` relative to it);
    /// a target that is not UTF-8 is an `InvalidData` error.
    fn link_target_at(&mut self, dir: &RootDir<'_>, name: &str) -> io::Result<String> {
        self.stats.links_read += 1;
        let mut t = Vec::new();
        dir.read_link_into(name, &mut t)?;
        String::from_utf8(t).map_err(|t| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("link target {:?} is not valid UTF-8", show(t.as_bytes())),
            )
        })
    }

    /// [`Reader::link_value`] of the link `name` in `dir`.
    fn link_value_at<T>(
        &mut self,
        subject: Option<&str>,
        dir: &RootDir<'_>,
        name: &str,
        missing_ok: bool,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let target = self.link_target_at(dir, name);
        self.link_parsed(subject, &dir.child_path(name), target, missing_ok, parse)
    }

    /// [`Reader::device_dir`] of the entry `name` of the bus or class directory
    /// `bus` (its link read relative to it).
    fn device_dir_at(
        &mut self,
        subject: Option<&str>,
        bus: &RootDir<'_>,
        name: &str,
        kind: Kind,
    ) -> Option<(String, Option<String>)> {
        let kpath = bus.child_path(name);
        match kind {
            Kind::Dir => Some((kpath, None)),
            _ => {
                let target = self.link_target_at(bus, name);
                self.device_link(subject, &kpath, target)
            }
        }
    }

    /// Whether the file at `kpath` exists (following links).
    fn exists(&mut self, kpath: &str) -> bool {
        self.stats.files_read += 1;
        self.root.metadata(kpath, true).is_ok()
    }

    /// Maps `f` over `items` on up to `self.threads` threads. Results keep the
    /// order of `items`; counters and problems of the workers are added to
    /// this reader.
    fn par_map<T: Sync, R: Send>(
        &mut self,
        items: &[T],
        f: impl Fn(&mut Reader<'r>, &T) -> R + Sync,
    ) -> Vec<R> {
        let threads = self
            .threads
            .min(items.len().div_ceil(MIN_ITEMS_PER_THREAD))
            .max(1);
        if threads == 1 {
            return items.iter().map(|it| f(self, it)).collect();
        }
        let next = AtomicUsize::new(0);
        let root = self.root;
        let work = || {
            let mut r = Reader::new(root, 1);
            let mut out = Vec::new();
            loop {
                let start = next.fetch_add(BLOCK, Ordering::Relaxed);
                if start >= items.len() {
                    break;
                }
                let end = (start + BLOCK).min(items.len());
                for (i, it) in items.iter().enumerate().take(end).skip(start) {
                    out.push((i, f(&mut r, it)));
                }
            }
            (out, r.stats, r.problems)
        };
        let parts = std::thread::scope(|s| {
            let mut handles = Vec::new();
            for _ in 1..threads {
                // If a thread cannot be started, the others (and this one) do
                // its share.
                if let Ok(h) = std::thread::Builder::new().spawn_scoped(s, work) {
                    handles.push(h);
                }
            }
            let mut parts = vec![work()];
            for h in handles {
                match h.join() {
                    Ok(p) => parts.push(p),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            parts
        });
        let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
        for (out, stats, problems) in parts {
            self.stats.add(&stats);
            self.problems.extend(problems);
            for (i, v) in out {
                if let Some(slot) = slots.get_mut(i) {
                    *slot = Some(v);
                }
            }
        }
        slots.into_iter().flatten().collect()
    }
}

// ---------------------------------------------------------------------------
// vfio-pci module parameters

fn read_vfio_pci(r: &mut Reader<'_>) -> Option<VfioPciParams> {
    const DIR: &str = "/sys/module/vfio_pci/parameters";
    let (d, l) = r.list_opt_in(None, DIR)?;
    let l = Listing::new(l);
    Some(VfioPciParams {
        enable_sriov: r.listed_attr(&l, None, &d, "enable_sriov", false, parse::module_bool),
        disable_idle_d3: r.listed_attr(&l, None, &d, "disable_idle_d3", false, parse::module_bool),
    })
}

// ---------------------------------------------------------------------------
// PCI

const PCI_BUS: &str = "/sys/bus/pci/devices";

/// The entries of a bus directory whose names parse as `T` (a BDF, an mdev UUID),
/// sorted by it; a name that does not parse is a problem naming it. An absent bus
/// gives nothing. Also returns the bus directory, opened.
fn bus_entries<'r, T>(r: &mut Reader<'r>, bus: &str) -> Option<(RootDir<'r>, Vec<(T, Entry)>)>
where
    T: std::str::FromStr<Err = devfence_model::ParseError> + Ord + Copy,
{
    let (dir, entries) = r.list_opt_in(None, bus)?;
    let mut items = Vec::with_capacity(entries.len());
    for e in entries {
        match e.name.parse::<T>() {
            Ok(id) => items.push((id, e)),
            Err(err) => {
                let path = format!("{bus}/{}", e.name);
                r.problem(None, &path, Some(show_str(&e.name)), err.reason);
            }
        }
    }
    items.sort_unstable_by_key(|(id, _)| *id);
    Some((dir, items))
}

fn read_pci(r: &mut Reader<'_>) -> Vec<PciFunction> {
    let Some((bus, items)) = bus_entries::<Bdf>(r, PCI_BUS) else {
        return Vec::new();
    };
    r.par_map(&items, |r, (bdf, e)| read_function(r, &bus, *bdf, e))
        .into_iter()
        .flatten()
        .collect()
}

/// One PCI function: its bus link is read relative to the bus directory, its
/// device directory is opened once (in the root) and listed, and every
/// attribute and link in it is read relative to that directory.
fn read_function(
    r: &mut Reader<'_>,
    bus: &RootDir<'_>,
    bdf: Bdf,
    e: &Entry,
) -> Option<PciFunction> {
    let subject = bdf.to_string();
    let subj = Some(subject.as_str());
    let (dir, link) = r.device_dir_at(subj, bus, &e.name, e.kind)?;
    let (d, l) = match r.list_in(subj, &dir) {
        Ok((d, l)) => (d, Listing::new(l)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            r.problem(
                subj,
                &bus.child_path(&e.name),
                link,
                format!("dangling link: {dir} does not exist"),
            );
            return None;
        }
        Err(err) => {
            r.problem(subj, &dir, None, format!("cannot list: {err}"));
            return None;
        }
    };
    // The ids and the class in one read: `uevent` shows the same `pci_dev`
    // fields as `vendor`, `device`, `subsystem_*` and `class` (five opens).
    let id = r.listed_attr(&l, subj, &d, "uevent", true, parse::pci_uevent);
    if let Some(id) = id {
        // One file, four more values than the one it is counted as.
        r.stats.attributes += if id.subsystem.is_some() { 4 } else { 2 };
    }
    let vendor = id.map(|i| i.vendor);
    let device = id.map(|i| i.device);
    let subsystem_vendor = id.and_then(|i| i.subsystem.map(|s| s.0));
    let subsystem_device = id.and_then(|i| i.subsystem.map(|s| s.1));
    let class = id.map(|i| i.class);
    let driver_override = r
        .listed_attr(
            &l,
            subj,
            &d,
            "driver_override",
            false,
            parse::driver_override,
        )
        .flatten();
    let numa_node = r.listed_attr(&l, subj, &d, "numa_node", false, parse::decimal_i32);
    let reset_methods = r
        .listed_attr(&l, subj, &d, "reset_method", false, parse::reset_methods)
        .unwrap_or_default();
    let has_reset = l.has("reset");
    let driver = if l.has("driver") {
        r.link_value_at(subj, &d, "driver", true, name)
    } else {
        None
    };
    let iommu_group = if l.has("iommu_group") {
        group_link(r, subj, &d, "iommu_group", false)
    } else {
        None
    };
    let physfn = if l.has("physfn") {
        r.link_value_at(subj, &d, "physfn", true, bdf_name)
    } else {
        None
    };
    let sriov = if l.has("sriov_totalvfs") {
        Some(read_sriov(r, &l, subj, &d))
    } else {
        None
    };
    let vfio_dev = if l.kind("vfio-dev") == Some(Kind::Dir) {
        read_vfio_dev(r, subj, &d)
    } else {
        Vec::new()
    };
    Some(PciFunction {
        bdf,
        sysfs_path: dir,
        vendor,
        device,
        subsystem_vendor,
        subsystem_device,
        class,
        driver,
        driver_override,
        iommu_group,
        reset_methods,
        has_reset,
        numa_node,
        sriov,
        physfn,
        vfio_dev,
    })
}

/// A link basename as a name (any non-empty text).
fn name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("expected a link whose last component names the target".to_string())
    } else {
        Ok(s.to_owned())
    }
}

/// A device's `iommu_group` link: it must resolve to
/// `/sys/kernel/iommu_groups/<N>`. A link that points anywhere else is reported as
/// malformed, naming the link and where it points — the device's group is then
/// unknown, which is not the same as the IOMMU being off (no link at all). An
/// absent link is a problem only when `required`.
fn group_link(
    r: &mut Reader<'_>,
    subject: Option<&str>,
    dir: &RootDir<'_>,
    name: &str,
    required: bool,
) -> Option<IommuGroupId> {
    let target = r.link_target_at(dir, name);
    group_link_parsed(r, subject, &dir.child_path(name), target, required)
}

/// [`group_link`] of the link at the kernel path `link`, read as `target`.
fn group_link_parsed(
    r: &mut Reader<'_>,
    subject: Option<&str>,
    link: &str,
    target: io::Result<String>,
    required: bool,
) -> Option<IommuGroupId> {
    let t = match target {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if required {
                r.problem(subject, link, None, "missing");
            }
            return None;
        }
        Err(e) => {
            let reason = if e.kind() == io::ErrorKind::InvalidInput {
                "malformed iommu_group: not a symlink (the kernel links it to /sys/kernel/iommu_groups/<N>)".to_string()
            } else {
                io_reason(&e)
            };
            r.problem(subject, link, None, reason);
            return None;
        }
    };
    let resolved = resolve_target(link, &t);
    let id = resolved
        .strip_prefix(GROUPS)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|n| group_id(n).ok());
    match id {
        Some(id) => {
            r.stats.attributes += 1;
            Some(id)
        }
        None => {
            r.problem(
                subject,
                link,
                Some(show_str(&t)),
                format!(
                    "malformed iommu_group link: it points at {}, not at {GROUPS}/<N>, so the device's group is unknown (the IOMMU is not necessarily off)",
                    show_str(&resolved)
                ),
            );
            None
        }
    }
}

fn group_id(s: &str) -> Result<IommuGroupId, String> {
    s.parse::<IommuGroupId>()
        .map_err(|_| "expected a link to /sys/kernel/iommu_groups/<N>".to_string())
}

fn bdf_name(s: &str) -> Result<Bdf, String> {
    s.parse::<Bdf>()
        .map_err(|e| format!("expected a link to a PCI function: {}", e.reason))
}

/// The number N of a name `<prefix>N`.
fn numbered(name: &str, prefix: &str) -> Option<u32> {
    let n = name.strip_prefix(prefix)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

fn read_sriov(r: &mut Reader<'_>, l: &Listing, subj: Option<&str>, dir: &RootDir<'_>) -> SriovPf {
    let total_vfs = r.listed_attr(l, subj, dir, "sriov_totalvfs", true, parse::decimal_u32);
    let num_vfs = r.listed_attr(l, subj, dir, "sriov_numvfs", true, parse::decimal_u32);
    let mut vfs = Vec::new();
    for e in &l.0 {
        let Some(index) = numbered(&e.name, "virtfn") else {
            continue;
        };
        if let Some(bdf) = r.link_value_at(subj, dir, &e.name, false, bdf_name) {
            vfs.push(VirtFn { index, bdf });
        }
    }
    vfs.sort_unstable_by_key(|v| v.index);
    let vf_guids = if l.kind("sriov") == Some(Kind::Dir) {
        read_vf_guids(r, subj, dir)
    } else {
        Vec::new()
    };
    SriovPf {
        total_vfs,
        num_vfs,
        vfs,
        vf_guids,
    }
}

/// OFED's `sriov/<N>/{node,port,policy}`. The first VF's directory is listed to
/// learn whether this is an IB port (`node`, `port`, `policy`) or an Ethernet
/// one (none of them); the same files are then read for every VF, and a VF that
/// lacks one simply has no value for it.
fn read_vf_guids(r: &mut Reader<'_>, subj: Option<&str>, pf: &RootDir<'_>) -> Vec<VfGuids> {
    let Some((dir, entries)) = r.list_opt_at(subj, pf, "sriov") else {
        return Vec::new();
    };
    let mut indexes: Vec<u32> = entries
        .iter()
        .filter(|e| e.kind == Kind::Dir)
        .filter_map(|e| numbered(&e.name, ""))
        .collect();
    indexes.sort_unstable();
    let Some(first) = indexes.first() else {
        return Vec::new();
    };
    let Some((_, first_listing)) = r.list_opt_at(subj, &dir, &first.to_string()) else {
        return Vec::new();
    };
    let first_listing = Listing::new(first_listing);
    let (node, port, policy) = (
        first_listing.has("node"),
        first_listing.has("port"),
        first_listing.has("policy"),
    );
    if !(node || port || policy) {
        return Vec::new();
    }
    indexes
        .into_iter()
        .map(|index| VfGuids {
            index,
            node_guid: if node {
                r.opt_attr_at(subj, &dir, &format!("{index}/node"), parse::ofed_guid)
            } else {
                None
            },
            port_guid: if port {
                r.opt_attr_at(subj, &dir, &format!("{index}/port"), parse::ofed_guid)
            } else {
                None
            },
            policy: if policy {
                r.opt_attr_at(subj, &dir, &format!("{index}/policy"), parse::ofed_policy)
            } else {
                None
            },
        })
        .collect()
}

/// `vfio-dev/vfio<X>/` entries; `dev` exists only with cdev support, so it is
/// opened directly and its absence is not a problem (cheaper than listing every
/// `vfio<X>` directory).
fn read_vfio_dev(r: &mut Reader<'_>, subj: Option<&str>, dir: &RootDir<'_>) -> Vec<VfioDevRef> {
    let Some((base, mut entries)) = r.list_opt_at(subj, dir, "vfio-dev") else {
        return Vec::new();
    };
    entries.retain(|e| e.name.starts_with("vfio"));
    entries.sort_unstable_by(|a, b| natural(&a.name).cmp(&natural(&b.name)));
    entries
        .into_iter()
        .map(|e| {
            let dev = r.opt_attr_at(
                subj,
                &base,
                &format!("{}/dev", e.name),
                parse::vfio_dev_number,
            );
            VfioDevRef { name: e.name, dev }
        })
        .collect()
}

/// A sort key that orders `vfio2` before `vfio10`.
fn natural(name: &str) -> (&str, u64, &str) {
    let split = name
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_ascii_digit())
        .last()
        .map_or(name.len(), |(i, _)| i);
    let (head, digits) = name.split_at(split);
    (head, digits.parse().unwrap_or(0), digits)
}

// ---------------------------------------------------------------------------
// IOMMU groups

const GROUPS: &str = "/sys/kernel/iommu_groups";

fn read_groups(r: &mut Reader<'_>) -> Vec<IommuGroup> {
    let Some((groups, entries)) = r.list_opt_in(None, GROUPS) else {
        return Vec::new();
    };
    let mut items = Vec::with_capacity(entries.len());
    for e in entries {
        match e.name.parse::<IommuGroupId>() {
            Ok(id) => items.push((id, e.name)),
            Err(err) => {
                let path = format!("{GROUPS}/{}", e.name);
                r.problem(None, &path, Some(show_str(&e.name)), err.reason);
            }
        }
    }
    items.sort_unstable();
    r.par_map(&items, |r, (id, name)| read_group(r, &groups, *id, name))
}

/// One group. Its directory is not listed: `devices` is listed directly and the
/// optional `type` and `name` are opened directly (a failed open costs less
/// than a listing); when `devices` cannot be listed, the group is read by
/// listing its directory ([`read_group_listed`]), which tells a missing group
/// from a missing `devices`.
fn read_group(
    r: &mut Reader<'_>,
    groups: &RootDir<'_>,
    id: IommuGroupId,
    name: &str,
) -> IommuGroup {
    let devices = format!("{name}/devices");
    let Ok((_, members)) = r.list_at(None, groups, &devices) else {
        return read_group_listed(r, groups, id, name);
    };
    let mut members: Vec<String> = members.into_iter().map(|e| e.name).collect();
    members.sort_unstable();
    r.stats.attributes += members.len() as u64;
    IommuGroup {
        id,
        members: members.into_iter().map(GroupMember::from).collect(),
        group_type: r.opt_attr_at(None, groups, &format!("{name}/type"), parse::one_line),
        name: r.opt_attr_at(None, groups, &format!("{name}/name"), parse::one_line),
    }
}

fn read_group_listed(
    r: &mut Reader<'_>,
    groups: &RootDir<'_>,
    id: IommuGroupId,
    name: &str,
) -> IommuGroup {
    let mut g = IommuGroup {
        id,
        members: Vec::new(),
        group_type: None,
        name: None,
    };
    let Some((dir, l)) = r.list_req_at(None, groups, name) else {
        return g;
    };
    let l = Listing::new(l);
    if l.has("devices") {
        if let Some((_, members)) = r.list_req_at(None, &dir, "devices") {
            let mut names: Vec<String> = members.into_iter().map(|e| e.name).collect();
            names.sort_unstable();
            g.members = names.into_iter().map(GroupMember::from).collect();
            r.stats.attributes += g.members.len() as u64;
        }
    } else {
        r.problem(None, &dir.child_path("devices"), None, "missing");
    }
    g.group_type = r.listed_attr(&l, None, &dir, "type", false, parse::one_line);
    g.name = r.listed_attr(&l, None, &dir, "name", false, parse::one_line);
    g
}

/// A device's `iommu_group` link that names a group not found under
/// `/sys/kernel/iommu_groups` is checked: if its target does not exist, the link
/// is dangling, which is reported, and the device is left without a group.
fn check_group_link(
    r: &mut Reader<'_>,
    subject: &dyn std::fmt::Display,
    dir: &str,
    group: &mut Option<IommuGroupId>,
    groups: &[IommuGroup],
) {
    let Some(id) = *group else { return };
    if groups.binary_search_by_key(&id, |g| g.id).is_ok() {
        return;
    }
    let link = format!("{dir}/iommu_group");
    if let Ok(t) = r.link_target(&link) {
        let target = resolve_target(&link, &t);
        if !r.exists(&target) {
            let subject = subject.to_string();
            r.problem(
                Some(&subject),
                &link,
                Some(show_str(&t)),
                format!("dangling link: {target} does not exist"),
            );
            *group = None;
        }
    }
}

// ---------------------------------------------------------------------------
// /dev/vfio

const DEV_VFIO: &str = "/dev/vfio";

fn read_vfio_nodes(r: &mut Reader<'_>) -> Vec<VfioNode> {
    let Some((dev_vfio, entries)) = r.list_opt_in(None, DEV_VFIO) else {
        return Vec::new();
    };
    let mut items: Vec<(String, VfioNodeKind)> = Vec::new();
    for e in entries {
        let path = format!("{DEV_VFIO}/{}", e.name);
        if e.name == "vfio" {
            items.push((path, VfioNodeKind::Container));
        } else if e.name == "devices" {
            if let Some(devs) = r.list_opt(None, &path) {
                for d in devs {
                    items.push((format!("{path}/{}", d.name), VfioNodeKind::Device(d.name)));
                }
            }
        } else if let Some(n) = e.name.strip_prefix("noiommu-") {
            if let Ok(id) = n.parse::<IommuGroupId>() {
                items.push((path, VfioNodeKind::NoIommuGroup(id)));
            }
        } else if let Ok(id) = e.name.parse::<IommuGroupId>() {
            items.push((path, VfioNodeKind::Group(id)));
        }
    }
    items.sort_by(|a, b| node_key(&a.1).cmp(&node_key(&b.1)));
    r.par_map(&items, |r, (path, kind)| {
        read_node(r, &dev_vfio, path, kind)
    })
    .into_iter()
    .flatten()
    .collect()
}

fn node_key(k: &VfioNodeKind) -> (u8, u32, (&str, u64, &str)) {
    match k {
        VfioNodeKind::Container => (0, 0, ("", 0, "")),
        VfioNodeKind::Group(id) => (1, id.0, ("", 0, "")),
        VfioNodeKind::NoIommuGroup(id) => (2, id.0, ("", 0, "")),
        VfioNodeKind::Device(name) => (3, 0, natural(name)),
    }
}

/// One node under `/dev/vfio` (`dev_vfio`), `path` its kernel path.
fn read_node(
    r: &mut Reader<'_>,
    dev_vfio: &RootDir<'_>,
    path: &str,
    kind: &VfioNodeKind,
) -> Option<VfioNode> {
    r.stats.files_read += 1;
    // A handle on the node itself, found relative to /dev/vfio (a link is
    // followed in the root only, RootDir::open): its metadata and label are read
    // through the handle.
    let opened = match path
        .strip_prefix(DEV_VFIO)
        .and_then(|p| p.strip_prefix('/'))
    {
        Some(rel) => dev_vfio.open(rel, Access::Path),
        None => r.root.open(path, Access::Path),
    };
    let node = match opened {
        Ok(f) => f,
        Err(e) => {
            r.problem(None, path, None, io_reason(&e));
            return None;
        }
    };
    let meta = match node.metadata() {
        Ok(m) => m,
        Err(e) => {
            r.problem(None, path, None, io_reason(&e));
            return None;
        }
    };
    r.stats.attributes += 1;
    r.stats.files_read += 1;
    let by_handle = format!("/proc/self/fd/{}", node.as_raw_fd());
    let selinux_label = match xattr::get_deref(&by_handle, "security.selinux") {
        Ok(Some(v)) => match parse::selinux_label(&v) {
            Ok(label) => {
                r.stats.attributes += 1;
                Some(label)
            }
            Err(reason) => {
                r.problem(
                    None,
                    &format!("{path} (security.selinux)"),
                    Some(show(v.strip_suffix(&[0]).unwrap_or(&v))),
                    reason,
                );
                None
            }
        },
        Ok(None) => None,
        Err(e) if e.kind() == io::ErrorKind::Unsupported || e.raw_os_error() == Some(95) => None,
        Err(e) => {
            r.problem(
                None,
                &format!("{path} (security.selinux)"),
                None,
                io_reason(&e),
            );
            None
        }
    };
    Some(VfioNode {
        path: path.to_owned(),
        kind: kind.clone(),
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
        selinux_label,
    })
}

// ---------------------------------------------------------------------------
// mdev

const MDEV_CLASS: &str = "/sys/class/mdev_bus";
const MDEV_BUS: &str = "/sys/bus/mdev/devices";

fn read_mdev_parents(r: &mut Reader<'_>) -> Vec<MdevParent> {
    let Some(mut entries) = r.list_opt(None, MDEV_CLASS) else {
        return Vec::new();
    };
    entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let subj = Some(e.name.as_str());
        let class_path = format!("{MDEV_CLASS}/{}", e.name);
        let Some((dir, _)) = r.device_dir(subj, &class_path, e.kind) else {
            continue;
        };
        let types_dir = format!("{dir}/mdev_supported_types");
        let mut types = Vec::new();
        if let Some(mut ts) = r.list_req(subj, &types_dir) {
            ts.sort_unstable_by(|a, b| a.name.cmp(&b.name));
            for t in ts {
                let td = format!("{types_dir}/{}", t.name);
                types.push(MdevType {
                    name: r.req_attr(subj, &format!("{td}/name"), parse::one_line),
                    device_api: r.req_attr(subj, &format!("{td}/device_api"), parse::one_line),
                    available_instances: r.req_attr(
                        subj,
                        &format!("{td}/available_instances"),
                        parse::decimal_u32,
                    ),
                    id: t.name,
                });
            }
        }
        out.push(MdevParent {
            name: e.name,
            sysfs_path: dir,
            types,
        });
    }
    out
}

fn read_mdevs(r: &mut Reader<'_>) -> Vec<Mdev> {
    let Some((bus, items)) = bus_entries::<MdevUuid>(r, MDEV_BUS) else {
        return Vec::new();
    };
    r.par_map(&items, |r, (uuid, e)| read_mdev(r, &bus, *uuid, e))
        .into_iter()
        .flatten()
        .collect()
}

/// One mdev. Its three links are read directly (no listing): `mdev_type` and
/// `iommu_group` always exist, `driver` only while bound.
/// The device directory is opened once and the links are read relative to it;
/// a directory that cannot be opened is read by kernel paths
/// ([`read_mdev_by_path`]), which tells a dangling bus link from the rest.
fn read_mdev(r: &mut Reader<'_>, bus: &RootDir<'_>, uuid: MdevUuid, e: &Entry) -> Option<Mdev> {
    let subject = uuid.to_string();
    let subj = Some(subject.as_str());
    let (dir, link) = r.device_dir_at(subj, bus, &e.name, e.kind)?;
    let Ok(d) = r.root.open_dir(&dir) else {
        return read_mdev_by_path(r, uuid, subj, &bus.child_path(&e.name), dir, link);
    };
    let type_path = d.child_path("mdev_type");
    let type_id = match r.link_target_at(&d, "mdev_type") {
        Ok(t) => match name(basename(&resolve_target(&type_path, &t))) {
            Ok(v) => {
                r.stats.attributes += 1;
                Some(v)
            }
            Err(reason) => {
                r.problem(subj, &type_path, Some(show_str(&t)), reason);
                None
            }
        },
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            r.problem(subj, &type_path, None, "missing");
            None
        }
        Err(err) => {
            r.problem(subj, &type_path, None, io_reason(&err));
            None
        }
    };
    let iommu_group = group_link(r, subj, &d, "iommu_group", true);
    let driver = r.link_value_at(subj, &d, "driver", true, name);
    Some(mdev(uuid, dir, type_id, iommu_group, driver))
}

fn mdev(
    uuid: MdevUuid,
    dir: String,
    type_id: Option<String>,
    iommu_group: Option<IommuGroupId>,
    driver: Option<String>,
) -> Mdev {
    let parent = {
        let mut parts = dir.rsplit('/');
        parts.next();
        parts.next().unwrap_or("").to_owned()
    };
    Mdev {
        uuid,
        parent,
        sysfs_path: dir,
        type_id,
        iommu_group,
        driver,
    }
}

/// [`read_mdev`] by kernel paths, for a device directory that could not be
/// opened: a dangling bus link, or something else where the directory belongs.
fn read_mdev_by_path(
    r: &mut Reader<'_>,
    uuid: MdevUuid,
    subj: Option<&str>,
    bus_path: &str,
    dir: String,
    link: Option<String>,
) -> Option<Mdev> {
    let type_path = format!("{dir}/mdev_type");
    let type_id = match r.link_target(&type_path) {
        Ok(t) => match name(basename(&resolve_target(&type_path, &t))) {
            Ok(v) => {
                r.stats.attributes += 1;
                Some(v)
            }
            Err(reason) => {
                r.problem(subj, &type_path, Some(show_str(&t)), reason);
                None
            }
        },
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            if !r.exists(&dir) {
                r.problem(
                    subj,
                    bus_path,
                    link,
                    format!("dangling link: {dir} does not exist"),
                );
                return None;
            }
            r.problem(subj, &type_path, None, "missing");
            None
        }
        Err(err) => {
            r.problem(subj, &type_path, None, io_reason(&err));
            None
        }
    };
    let group_path = format!("{dir}/iommu_group");
    let target = r.link_target(&group_path);
    let iommu_group = group_link_parsed(r, subj, &group_path, target, true);
    let driver = r.link_value(subj, &format!("{dir}/driver"), true, name);
    Some(mdev(uuid, dir, type_id, iommu_group, driver))
}

// ---------------------------------------------------------------------------
// s390 AP

const AP: &str = "/sys/bus/ap";
const AP_DRIVERS: &str = "/sys/bus/ap/drivers";
const MATRIX: &str = "/sys/devices/vfio_ap/matrix";

/// `cardXX`, XX two lowercase hex digits.
fn card_id(name: &str) -> Option<u8> {
    let h = name.strip_prefix("card")?;
    (h.len() == 2
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| u8::from_str_radix(h, 16).ok())
    .flatten()
}

/// `XX.YYYY` as the kernel names queues (lowercase hex).
fn queue_id(name: &str) -> Option<Apqn> {
    if name.len() != 7 || name.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    name.parse().ok()
}

fn apqn_index(q: Apqn) -> usize {
    usize::from(q.adapter) << 8 | usize::from(q.domain)
}

fn read_ap(r: &mut Reader<'_>) -> Option<ApBus> {
    let (ap, l) = r.list_opt_in(None, AP)?;
    let l = Listing::new(l);
    let apmask = r.listed_attr(&l, None, &ap, "apmask", true, parse::ap_mask);
    let aqmask = r.listed_attr(&l, None, &ap, "aqmask", true, parse::ap_mask);

    // The drivers' directories and the devices directory (each up to 65,536
    // entries) are listed side by side.
    let root = r.root;
    let threads = r.threads;
    let drivers_job = |r: &mut Reader<'_>| ap_drivers(r, &ap);
    let ((driver_names, queue_driver, card_driver), devices_dir, cards_and_queues) =
        std::thread::scope(|s| {
            let handle = (threads > 1)
                .then(|| {
                    std::thread::Builder::new()
                        .spawn_scoped(s, || {
                            let mut dr = Reader::new(root, 1);
                            let d = drivers_job(&mut dr);
                            (d, dr.stats, dr.problems)
                        })
                        .ok()
                })
                .flatten();
            let (devices_dir, card_entries, queues) = ap_devices(r, &ap);
            let drivers = match handle.map(std::thread::ScopedJoinHandle::join) {
                Some(Ok((d, stats, problems))) => {
                    r.stats.add(&stats);
                    r.problems.extend(problems);
                    d
                }
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                None => drivers_job(r),
            };
            (drivers, devices_dir, (card_entries, queues))
        });
    let (card_entries, mut queues) = cards_and_queues;
    let driver_of = |slot: Option<&u16>| -> Option<String> {
        slot.and_then(|&i| driver_names.get(usize::from(i)))
            .cloned()
    };

    let mut cards = Vec::new();
    if let Some(devices_dir) = devices_dir {
        queues.sort_unstable();
        for (adapter, e) in card_entries {
            let subject = e.name.clone();
            let subj = Some(subject.as_str());
            let Some((dir, _)) = r.device_dir_at(subj, &devices_dir, &e.name, e.kind) else {
                continue;
            };
            let hwtype = r.req_attr(subj, &format!("{dir}/hwtype"), parse::decimal_u32);
            let card_type = r.opt_attr(subj, &format!("{dir}/type"), parse::one_line);
            let driver = driver_of(card_driver.get(usize::from(adapter)));
            if driver.is_some() {
                r.stats.attributes += 1;
            }
            cards.push(ApCard {
                adapter,
                hwtype,
                card_type,
                driver,
            });
        }
    }

    let queues: Vec<ApQueue> = queues
        .into_iter()
        .map(|apqn| ApQueue {
            apqn,
            driver: driver_of(queue_driver.get(apqn_index(apqn))),
        })
        .collect();
    r.stats.attributes += queues.iter().filter(|q| q.driver.is_some()).count() as u64;

    let matrix_mdevs = read_matrix_mdevs(r);
    Some(ApBus {
        apmask,
        aqmask,
        cards,
        queues,
        matrix_mdevs,
    })
}

/// The driver of every AP queue and card, from the drivers' directories: the
/// drivers' names, and for each APQN index and each card the index of its
/// driver's name (`u16::MAX`: none).
fn ap_drivers(r: &mut Reader<'_>, ap: &RootDir<'_>) -> (Vec<String>, Vec<u16>, Vec<u16>) {
    // Drivers of cards and queues, from the drivers' directories: one listing per
    // driver instead of one readlink per device.
    let mut driver_names: Vec<String> = Vec::new();
    let mut queue_driver: Vec<u16> = vec![u16::MAX; 1 << 16];
    let mut card_driver: Vec<u16> = vec![u16::MAX; 256];
    if let Some((drivers_dir, mut drivers)) = r.list_opt_at(None, ap, "drivers") {
        drivers.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        for d in drivers {
            if d.kind != Kind::Dir {
                continue;
            }
            let idx = u16::try_from(driver_names.len()).unwrap_or(u16::MAX - 1);
            // Streamed: a driver may have every one of the 65,536 queues bound.
            let listed = r.stream_at(None, &drivers_dir, &d.name, false, |r, b, _| {
                let slot = if let Some(q) = queue_id(b) {
                    queue_driver.get_mut(apqn_index(q))
                } else if let Some(c) = card_id(b) {
                    card_driver.get_mut(usize::from(c))
                } else {
                    None
                };
                if let Some(slot) = slot {
                    if *slot != u16::MAX {
                        let other = driver_names
                            .get(usize::from(*slot))
                            .cloned()
                            .unwrap_or_default();
                        r.problem(
                            Some(b),
                            &format!("{AP_DRIVERS}/{}/{b}", d.name),
                            None,
                            format!("bound to two drivers: {other} and {}", d.name),
                        );
                    }
                    *slot = idx;
                }
            });
            if !listed {
                // A listing that failed part way binds nothing to this driver.
                for slot in queue_driver.iter_mut().chain(card_driver.iter_mut()) {
                    if *slot == idx {
                        *slot = u16::MAX;
                    }
                }
                continue;
            }
            driver_names.push(d.name);
        }
    }
    (driver_names, queue_driver, card_driver)
}

/// `/sys/bus/ap/devices`, listed: the directory (when listed), its cards in
/// order, and its queues.
fn ap_devices<'p>(
    r: &mut Reader<'_>,
    ap: &RootDir<'p>,
) -> (Option<RootDir<'p>>, Vec<(u8, Entry)>, Vec<Apqn>) {
    let mut queues: Vec<Apqn> = Vec::new();
    let mut card_entries = Vec::new();
    r.stats.dirs_listed += 1;
    let listed = match ap.open_dir("devices") {
        // Streamed: 65,536 queues and 256 cards.
        Ok(mut d) => r
            .each_entry(None, &mut d, |_, name, kind| {
                if let Some(c) = card_id(name) {
                    card_entries.push((
                        c,
                        Entry {
                            name: name.to_owned(),
                            kind,
                        },
                    ));
                } else if let Some(q) = queue_id(name) {
                    queues.push(q);
                }
            })
            .map(|()| d),
        Err(e) => Err(e),
    };
    let devices_dir = r.listing(None, || ap.child_path("devices"), listed, true);
    if devices_dir.is_none() {
        // A listing that failed part way lists nothing.
        card_entries.clear();
        queues.clear();
    }
    card_entries.sort_unstable_by_key(|(c, _)| *c);
    (devices_dir, card_entries, queues)
}

fn read_matrix_mdevs(r: &mut Reader<'_>) -> Vec<ApMatrixMdev> {
    let Some(entries) = r.list_opt(None, MATRIX) else {
        return Vec::new();
    };
    let mut uuids: Vec<(MdevUuid, String)> = entries
        .into_iter()
        .filter(|e| e.kind != Kind::File)
        .filter_map(|e| e.name.parse::<MdevUuid>().ok().map(|u| (u, e.name)))
        .collect();
    uuids.sort_unstable();
    uuids
        .into_iter()
        .map(|(uuid, name)| {
            let subject = uuid.to_string();
            let subj = Some(subject.as_str());
            let dir = format!("{MATRIX}/{name}");
            ApMatrixMdev {
                uuid,
                matrix: r.req_attr(subj, &format!("{dir}/matrix"), parse::ap_matrix),
                guest_matrix: r.opt_attr(subj, &format!("{dir}/guest_matrix"), parse::ap_matrix),
                control_domains: r
                    .req_attr(
                        subj,
                        &format!("{dir}/control_domains"),
                        parse::control_domains,
                    )
                    .unwrap_or_default(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// InfiniBand

const IB_CLASS: &str = "/sys/class/infiniband";

fn read_ib(r: &mut Reader<'_>) -> Vec<IbDevice> {
    let Some(mut entries) = r.list_opt(None, IB_CLASS) else {
        return Vec::new();
    };
    entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    r.par_map(&entries, read_ib_device)
        .into_iter()
        .flatten()
        .collect()
}

fn read_ib_device(r: &mut Reader<'_>, e: &Entry) -> Option<IbDevice> {
    let subj = Some(e.name.as_str());
    let class_path = format!("{IB_CLASS}/{}", e.name);
    let (dir, _) = r.device_dir(subj, &class_path, e.kind)?;
    let node_guid = r.req_attr(subj, &format!("{dir}/node_guid"), parse::ib_node_guid);
    let node_type = r.req_attr(subj, &format!("{dir}/node_type"), parse::ib_node_type);
    let pci = r.link_value(subj, &format!("{dir}/device"), true, bdf_name);
    let ports_dir = format!("{dir}/ports");
    let mut ports = Vec::new();
    if let Some(entries) = r.list_req(subj, &ports_dir) {
        let mut nums: Vec<(u32, String)> = entries
            .into_iter()
            .filter_map(|p| numbered(&p.name, "").map(|n| (n, p.name)))
            .collect();
        nums.sort_unstable();
        for (port, pname) in nums {
            let pd = format!("{ports_dir}/{pname}");
            ports.push(IbPort {
                port,
                state: r.req_attr(subj, &format!("{pd}/state"), parse::ib_port_state),
                lid: r.req_attr(subj, &format!("{pd}/lid"), parse::lid),
                sm_lid: r.req_attr(subj, &format!("{pd}/sm_lid"), parse::lid),
                link_layer: r.req_attr(subj, &format!("{pd}/link_layer"), parse::one_line),
                port_guid: r.req_attr(subj, &format!("{pd}/gids/0"), parse::gid_port_guid),
                pkeys: read_pkeys(r, subj, &format!("{pd}/pkeys")),
            });
        }
    }
    Some(IbDevice {
        name: e.name.clone(),
        node_guid,
        node_type,
        pci,
        ports,
    })
}

/// The slots of a port's `pkeys` directory, by index: the names that are a
/// number, in numeric order (the one reading of a P_Key table, shared by the
/// inventory and the engine's read-back).
pub(crate) fn pkey_slot_names(names: impl IntoIterator<Item = String>) -> Vec<(u32, String)> {
    let mut slots: Vec<(u32, String)> = names
        .into_iter()
        .filter_map(|n| numbered(&n, "").map(|i| (i, n)))
        .collect();
    slots.sort_unstable();
    slots
}

fn read_pkeys(r: &mut Reader<'_>, subj: Option<&str>, dir: &str) -> Vec<PKeySlot> {
    let Some((d, entries)) = r.list_opt_in(subj, dir) else {
        return Vec::new();
    };
    pkey_slot_names(entries.into_iter().map(|e| e.name))
        .into_iter()
        .filter_map(|(index, n)| {
            r.req_attr_at(subj, &d, &n, parse::pkey)
                .filter(|p| !p.is_empty_slot())
                .map(|pkey| PKeySlot { index, pkey })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfence_model::{ApMask, Guid, PKey};
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// A host tree built by hand in a temporary directory, with the kernel's
    /// relative symlink layout.
    struct Tree {
        dir: tempfile::TempDir,
    }

    /// The relative link text from the symlink at `link` to `to` (kernel paths),
    /// as the kernel writes it (`../../../devices/...`).
    fn rel(link: &str, to: &str) -> String {
        let from: Vec<&str> = link.split('/').filter(|c| !c.is_empty()).collect();
        let from = &from[..from.len() - 1];
        let to: Vec<&str> = to.split('/').filter(|c| !c.is_empty()).collect();
        let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
        let mut parts = vec![".."; from.len() - common];
        parts.extend(&to[common..]);
        parts.join("/")
    }

    impl Tree {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn root(&self) -> HostRoot {
            HostRoot::new(self.dir.path())
        }
        fn real(&self, kpath: &str) -> std::path::PathBuf {
            self.dir.path().join(kpath.trim_start_matches('/'))
        }
        fn file(&self, kpath: &str, content: impl AsRef<[u8]>) {
            let p = self.real(kpath);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        fn mkdir(&self, kpath: &str) {
            fs::create_dir_all(self.real(kpath)).unwrap();
        }
        /// A symlink with literal link text.
        fn raw_link(&self, kpath: &str, text: &str) {
            let p = self.real(kpath);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            symlink(text, p).unwrap();
        }
        /// A relative symlink from `kpath` to the kernel path `to`.
        fn link(&self, kpath: &str, to: &str) {
            self.raw_link(kpath, &rel(kpath, to));
        }
        fn mode(&self, kpath: &str, mode: u32) {
            fs::set_permissions(self.real(kpath), fs::Permissions::from_mode(mode)).unwrap();
        }
        /// A PCI function at `dir` (under /sys/devices) with the standard files.
        fn pci(&self, dir: &str, vendor: &str, device: &str, class: &str) {
            let bdf = dir.rsplit('/').next().unwrap();
            self.link(&format!("/sys/bus/pci/devices/{bdf}"), dir);
            let hex = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            self.file(
                &format!("{dir}/uevent"),
                format!(
                    "PCI_CLASS={:04X}\nPCI_ID={:04X}:{:04X}\nPCI_SUBSYS_ID=15B3:0007\nPCI_SLOT_NAME={bdf}\n",
                    hex(class),
                    hex(vendor),
                    hex(device)
                ),
            );
            self.file(&format!("{dir}/vendor"), format!("{vendor}\n"));
            self.file(&format!("{dir}/device"), format!("{device}\n"));
            self.file(&format!("{dir}/class"), format!("{class}\n"));
            self.file(&format!("{dir}/subsystem_vendor"), "0x15b3\n");
            self.file(&format!("{dir}/subsystem_device"), "0x0007\n");
            self.file(&format!("{dir}/numa_node"), "0\n");
        }
        fn driver(&self, dir: &str, bus: &str, drv: &str) {
            let bdf = dir.rsplit('/').next().unwrap();
            self.mkdir(&format!("/sys/bus/{bus}/drivers/{drv}"));
            self.link(
                &format!("{dir}/driver"),
                &format!("/sys/bus/{bus}/drivers/{drv}"),
            );
            self.link(&format!("/sys/bus/{bus}/drivers/{drv}/{bdf}"), dir);
        }
        /// Puts the device at `dir` into group `n`.
        fn group(&self, dir: &str, n: u32) {
            let name = dir.rsplit('/').next().unwrap();
            let g = format!("/sys/kernel/iommu_groups/{n}");
            self.file(&format!("{g}/type"), "DMA\n");
            self.link(&format!("{g}/devices/{name}"), dir);
            self.link(&format!("{dir}/iommu_group"), &g);
        }
    }

    const PF: &str = "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0";
    const VF1: &str = "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.1";
    const VF2: &str = "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.2";
    const GPU: &str = "/sys/devices/pci0000:00/0000:00:02.0";
    const MDEV: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    const APMDEV: &str = "4b0818b6-0e5b-4a8d-9a2e-26b9a1f1c2d3";

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    /// The host of reference Appendix A plus an mdev, AP and IB.
    fn full_host() -> Tree {
        let t = Tree::new();
        t.file("/proc/sys/kernel/osrelease", "6.1.0-26-amd64\n");
        t.file("/sys/module/vfio_pci/parameters/enable_sriov", "Y\n");
        t.file("/sys/module/vfio_pci/parameters/disable_idle_d3", "N\n");

        // The PF, with the literal link text of Appendix A.
        t.raw_link(
            "/sys/bus/pci/devices/0000:3b:00.0",
            "../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0",
        );
        for (f, v) in [
            (
                "uevent",
                "DRIVER=mlx5_core\nPCI_CLASS=20700\nPCI_ID=15B3:101D\nPCI_SUBSYS_ID=15B3:0016\nPCI_SLOT_NAME=0000:3b:00.0\nMODALIAS=pci:v000015B3d0000101Dsv000015B3sd00000016bc02sc07i00\n",
            ),
            ("vendor", "0x15b3\n"),
            ("device", "0x101d\n"),
            ("class", "0x020700\n"),
            ("subsystem_vendor", "0x15b3\n"),
            ("subsystem_device", "0x0016\n"),
            ("numa_node", "0\n"),
            ("driver_override", "(null)\n"),
            ("sriov_totalvfs", "16\n"),
            ("sriov_numvfs", "2\n"),
            ("sriov_drivers_autoprobe", "0\n"),
            ("sriov_vf_device", "101e\n"),
            ("reset", ""),
            ("reset_method", "flr bus\n"),
        ] {
            t.file(&format!("{PF}/{f}"), v);
        }
        t.mode(&format!("{PF}/reset"), 0o200);
        t.raw_link(
            &format!("{PF}/driver"),
            "../../../../bus/pci/drivers/mlx5_core",
        );
        t.mkdir("/sys/bus/pci/drivers/mlx5_core");
        t.group(PF, 40);
        t.raw_link(&format!("{PF}/virtfn0"), "../0000:3b:00.1");
        t.raw_link(&format!("{PF}/virtfn1"), "../0000:3b:00.2");
        // OFED per-VF GUIDs.
        t.file(&format!("{PF}/sriov/0/node"), "11:22:33:44:55:66:77:88\n");
        t.file(&format!("{PF}/sriov/0/port"), "11:22:33:44:55:66:77:89\n");
        t.file(&format!("{PF}/sriov/0/policy"), "Follow\n");
        t.file(&format!("{PF}/sriov/1/node"), "00:00:00:00:00:00:00:00\n");
        t.file(&format!("{PF}/sriov/1/port"), "00:00:00:00:00:00:00:00\n");
        t.file(&format!("{PF}/sriov/1/policy"), "Down\n");

        for (vf, g) in [(VF1, 41), (VF2, 42)] {
            t.pci(vf, "0x15b3", "0x101e", "0x020700");
            t.raw_link(&format!("{vf}/physfn"), "../0000:3b:00.0");
            t.file(&format!("{vf}/driver_override"), "vfio-pci\n");
            t.file(&format!("{vf}/reset_method"), "flr\n");
            t.file(&format!("{vf}/reset"), "");
            t.driver(vf, "pci", "vfio-pci");
            t.group(vf, g);
        }
        t.file(&format!("{VF1}/vfio-dev/vfio3/dev"), "511:3\n");
        t.file(
            "/sys/kernel/iommu_groups/41/reserved_regions",
            "0x00000000fee00000 0x00000000feefffff msi\n",
        );

        // /dev/vfio.
        t.file("/dev/vfio/vfio", "");
        t.mode("/dev/vfio/vfio", 0o666);
        t.file("/dev/vfio/41", "");
        t.mode("/dev/vfio/41", 0o600);
        t.file("/dev/vfio/42", "");
        t.mode("/dev/vfio/42", 0o660);
        t.file("/dev/vfio/noiommu-7", "");
        t.file("/dev/vfio/devices/vfio3", "");
        t.mode("/dev/vfio/devices/vfio3", 0o600);

        // An mdev parent (a GPU) with one type and one instance.
        t.pci(GPU, "0x8086", "0x3e92", "0x030000");
        t.driver(GPU, "pci", "i915");
        t.group(GPU, 0);
        t.link("/sys/class/mdev_bus/0000:00:02.0", GPU);
        let ty = format!("{GPU}/mdev_supported_types/i915-GVTg_V5_4");
        t.file(&format!("{ty}/name"), "GVTg_V5_4\n");
        t.file(&format!("{ty}/device_api"), "vfio-pci\n");
        t.file(&format!("{ty}/available_instances"), "1\n");
        let inst = format!("{GPU}/{MDEV}");
        t.link(&format!("/sys/bus/mdev/devices/{MDEV}"), &inst);
        t.link(&format!("{inst}/mdev_type"), &ty);
        t.group(&inst, 43);
        t.file("/sys/kernel/iommu_groups/43/name", "vfio-noiommu\n");
        t.driver(&inst, "mdev", "vfio_mdev");

        // s390 AP: one card, two queues, one matrix mdev.
        t.file("/sys/bus/ap/apmask", format!("0x{}\n", "0".repeat(64)));
        t.file("/sys/bus/ap/aqmask", format!("0x0008{}\n", "0".repeat(60)));
        let card = "/sys/devices/ap/card05";
        t.link("/sys/bus/ap/devices/card05", card);
        t.file(&format!("{card}/hwtype"), "13\n");
        t.file(&format!("{card}/type"), "CEX7C\n");
        t.link("/sys/bus/ap/drivers/cex4card/card05", card);
        for (q, drv) in [("05.0004", "vfio_ap"), ("05.0012", "cex4queue")] {
            let qd = format!("{card}/{q}");
            t.mkdir(&qd);
            t.link(&format!("/sys/bus/ap/devices/{q}"), &qd);
            t.link(&format!("/sys/bus/ap/drivers/{drv}/{q}"), &qd);
            t.link(
                &format!("{qd}/driver"),
                &format!("/sys/bus/ap/drivers/{drv}"),
            );
        }
        t.file(&format!("{card}/05.0004/status"), "in use\n");
        t.file("/sys/bus/ap/drivers/vfio_ap/bind", "");
        let m = format!("/sys/devices/vfio_ap/matrix/{APMDEV}");
        t.file(&format!("{m}/matrix"), "05.0004\n05.0005\n");
        t.file(&format!("{m}/guest_matrix"), "05.0004\n");
        t.file(&format!("{m}/control_domains"), "0004\n");
        t.file(
            "/sys/devices/vfio_ap/matrix/mdev_supported_types/vfio_ap-passthrough/name",
            "VFIO AP Passthrough Device\n",
        );

        // InfiniBand on the PF.
        let ib = format!("{PF}/infiniband/mlx5_0");
        t.link("/sys/class/infiniband/mlx5_0", &ib);
        t.file(&format!("{ib}/node_guid"), "0002:c903:00a1:b2c0\n");
        t.file(&format!("{ib}/node_type"), "1: CA\n");
        t.link(&format!("{ib}/device"), PF);
        let p = format!("{ib}/ports/1");
        t.file(&format!("{p}/state"), "4: ACTIVE\n");
        t.file(&format!("{p}/lid"), "0x1a\n");
        t.file(&format!("{p}/sm_lid"), "0x1\n");
        t.file(&format!("{p}/link_layer"), "InfiniBand\n");
        t.file(
            &format!("{p}/gids/0"),
            "fe80:0000:0000:0000:0002:c903:00a1:b2c3\n",
        );
        t.file(&format!("{p}/pkeys/0"), "0xffff\n");
        t.file(&format!("{p}/pkeys/1"), "0x0000\n");
        t.file(&format!("{p}/pkeys/2"), "0x8001\n");
        t.file(&format!("{p}/pkeys/10"), "0x0002\n");
        t
    }

    #[test]
    fn reads_a_realistic_host() {
        let t = full_host();
        let (inv, stats) = read_inventory_with_stats(&t.root()).unwrap();
        assert_eq!(inv.problems, vec![], "unexpected problems");
        assert_eq!(inv.schema, INVENTORY_SCHEMA);
        assert_eq!(inv.kernel_release.as_deref(), Some("6.1.0-26-amd64"));
        assert_eq!(
            inv.vfio_pci,
            Some(VfioPciParams {
                enable_sriov: Some(true),
                disable_idle_d3: Some(false)
            })
        );

        // PCI, sorted by BDF.
        let bdfs: Vec<String> = inv.pci.iter().map(|p| p.bdf.to_string()).collect();
        assert_eq!(
            bdfs,
            [
                "0000:00:02.0",
                "0000:3b:00.0",
                "0000:3b:00.1",
                "0000:3b:00.2"
            ]
        );
        let pf = inv.pci_function(bdf("0000:3b:00.0")).unwrap();
        assert_eq!(pf.sysfs_path, PF);
        assert_eq!((pf.vendor, pf.device), (Some(0x15b3), Some(0x101d)));
        assert_eq!(
            (pf.subsystem_vendor, pf.subsystem_device),
            (Some(0x15b3), Some(0x0016))
        );
        assert_eq!(pf.class, Some(0x020700));
        assert_eq!(pf.driver.as_deref(), Some("mlx5_core"));
        assert_eq!(pf.driver_override, None, "(null) means unset");
        assert_eq!(pf.iommu_group, Some(IommuGroupId(40)));
        assert_eq!(pf.reset_methods, vec!["flr", "bus"]);
        assert!(pf.has_reset);
        assert_eq!(pf.numa_node, Some(0));
        assert_eq!(pf.physfn, None);
        let sriov = pf.sriov.as_ref().unwrap();
        assert_eq!((sriov.total_vfs, sriov.num_vfs), (Some(16), Some(2)));
        assert_eq!(
            sriov.vfs,
            vec![
                VirtFn {
                    index: 0,
                    bdf: bdf("0000:3b:00.1")
                },
                VirtFn {
                    index: 1,
                    bdf: bdf("0000:3b:00.2")
                }
            ]
        );
        assert_eq!(
            sriov.vf_guids,
            vec![
                VfGuids {
                    index: 0,
                    node_guid: Some(Guid(0x1122_3344_5566_7788)),
                    port_guid: Some(Guid(0x1122_3344_5566_7789)),
                    policy: Some("Follow".into())
                },
                VfGuids {
                    index: 1,
                    node_guid: Some(Guid(0)),
                    port_guid: Some(Guid(0)),
                    policy: Some("Down".into())
                }
            ]
        );

        let vf = inv.pci_function(bdf("0000:3b:00.1")).unwrap();
        assert_eq!(vf.sysfs_path, VF1);
        assert_eq!(vf.physfn, Some(bdf("0000:3b:00.0")));
        assert_eq!(vf.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(vf.driver_override.as_deref(), Some("vfio-pci"));
        assert_eq!(vf.iommu_group, Some(IommuGroupId(41)));
        assert!(vf.sriov.is_none());
        assert_eq!(
            vf.vfio_dev,
            vec![VfioDevRef {
                name: "vfio3".into(),
                dev: Some("511:3".into())
            }]
        );
        let vf2 = inv.pci_function(bdf("0000:3b:00.2")).unwrap();
        assert!(vf2.vfio_dev.is_empty());
        assert_eq!(vf2.subsystem_device, Some(0x0007));
        let gpu = inv.pci_function(bdf("0000:00:02.0")).unwrap();
        assert!(!gpu.has_reset && gpu.reset_methods.is_empty());
        assert_eq!(gpu.driver_override, None);

        // Groups, sorted by id.
        let ids: Vec<u32> = inv.iommu_groups.iter().map(|g| g.id.0).collect();
        assert_eq!(ids, [0, 40, 41, 42, 43]);
        let g41 = inv.group(IommuGroupId(41)).unwrap();
        assert_eq!(g41.members, vec!["0000:3b:00.1"]);
        assert_eq!(g41.group_type.as_deref(), Some("DMA"));
        assert_eq!(g41.name, None);
        let g43 = inv.group(IommuGroupId(43)).unwrap();
        assert_eq!(g43.members, vec![MDEV]);
        assert_eq!(g43.name.as_deref(), Some("vfio-noiommu"));

        // VFIO nodes with ownership.
        let me = fs::metadata(t.dir.path()).unwrap();
        let kinds: Vec<(&str, &VfioNodeKind, u32)> = inv
            .vfio_nodes
            .iter()
            .map(|n| (n.path.as_str(), &n.kind, n.mode))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("/dev/vfio/vfio", &VfioNodeKind::Container, 0o666),
                (
                    "/dev/vfio/41",
                    &VfioNodeKind::Group(IommuGroupId(41)),
                    0o600
                ),
                (
                    "/dev/vfio/42",
                    &VfioNodeKind::Group(IommuGroupId(42)),
                    0o660
                ),
                (
                    "/dev/vfio/noiommu-7",
                    &VfioNodeKind::NoIommuGroup(IommuGroupId(7)),
                    kinds[3].2
                ),
                (
                    "/dev/vfio/devices/vfio3",
                    &VfioNodeKind::Device("vfio3".into()),
                    0o600
                ),
            ]
        );
        assert!(
            inv.vfio_nodes
                .iter()
                .all(|n| n.uid == me.uid() && n.gid == me.gid())
        );

        // mdev.
        assert_eq!(inv.mdev_parents.len(), 1);
        let parent = &inv.mdev_parents[0];
        assert_eq!(parent.name, "0000:00:02.0");
        assert_eq!(parent.sysfs_path, GPU);
        assert_eq!(
            parent.types,
            vec![MdevType {
                id: "i915-GVTg_V5_4".into(),
                name: Some("GVTg_V5_4".into()),
                device_api: Some("vfio-pci".into()),
                available_instances: Some(1)
            }]
        );
        let uuid: MdevUuid = MDEV.parse().unwrap();
        let m = inv.mdev(uuid).unwrap();
        assert_eq!(m.parent, "0000:00:02.0");
        assert_eq!(m.sysfs_path, format!("{GPU}/{MDEV}"));
        assert_eq!(m.type_id.as_deref(), Some("i915-GVTg_V5_4"));
        assert_eq!(m.iommu_group, Some(IommuGroupId(43)));
        assert_eq!(m.driver.as_deref(), Some("vfio_mdev"));

        // AP.
        let ap = inv.ap.as_ref().unwrap();
        assert_eq!(ap.apmask, Some(ApMask::NONE));
        let aq = ap.aqmask.unwrap();
        assert_eq!(aq.iter().collect::<Vec<_>>(), vec![12]);
        assert_eq!(
            ap.cards,
            vec![ApCard {
                adapter: 5,
                hwtype: Some(13),
                card_type: Some("CEX7C".into()),
                driver: Some("cex4card".into())
            }]
        );
        let q: Vec<(String, Option<&str>)> = ap
            .queues
            .iter()
            .map(|q| (q.apqn.to_string(), q.driver.as_deref()))
            .collect();
        assert_eq!(
            q,
            vec![
                ("05.0004".into(), Some("vfio_ap")),
                ("05.0012".into(), Some("cex4queue"))
            ]
        );
        assert_eq!(ap.matrix_mdevs.len(), 1);
        let mm = &ap.matrix_mdevs[0];
        assert_eq!(mm.uuid.to_string(), APMDEV);
        let matrix = mm.matrix.as_ref().unwrap();
        assert_eq!((&matrix.adapters, &matrix.domains), (&vec![5], &vec![4, 5]));
        assert_eq!(mm.guest_matrix.as_ref().unwrap().domains, vec![4]);
        assert_eq!(mm.control_domains, vec![4]);

        // InfiniBand.
        assert_eq!(inv.ib.len(), 1);
        let ib = &inv.ib[0];
        assert_eq!(ib.name, "mlx5_0");
        assert_eq!(ib.node_guid, Some(Guid(0x0002_c903_00a1_b2c0)));
        assert_eq!(ib.node_type.as_deref(), Some("1: CA"));
        assert_eq!(ib.pci, Some(bdf("0000:3b:00.0")));
        let port = &ib.ports[0];
        assert_eq!(port.port, 1);
        assert_eq!(port.state.as_deref(), Some("4: ACTIVE"));
        assert_eq!((port.lid, port.sm_lid), (Some(0x1a), Some(1)));
        assert_eq!(port.link_layer.as_deref(), Some("InfiniBand"));
        assert_eq!(port.port_guid, Some(Guid(0x0002_c903_00a1_b2c3)));
        assert_eq!(
            port.pkeys,
            vec![
                PKeySlot {
                    index: 0,
                    pkey: PKey(0xffff)
                },
                PKeySlot {
                    index: 2,
                    pkey: PKey(0x8001)
                },
                PKeySlot {
                    index: 10,
                    pkey: PKey(0x0002)
                }
            ]
        );

        // Reads stay close to one per attribute, and no optional file was probed
        // on the PCI side (the PF's driver_override, reset... come from listings).
        assert!(stats.attributes >= 80, "{stats:?}");
        assert!(stats.reads() <= stats.attributes * 2, "{stats:?}");
        assert!(stats.links_read > 0 && stats.dirs_listed > 0, "{stats:?}");
    }

    #[test]
    fn selinux_labels_are_read_where_set() {
        let t = full_host();
        let label = b"system_u:object_r:vfio_device_t:s0\0";
        // Setting a security.* attribute needs privileges (and a file system that
        // keeps it); where that is refused there is nothing to read back.
        if xattr::set(t.real("/dev/vfio/41"), "security.selinux", label).is_err() {
            eprintln!("security.selinux cannot be set here; label reading not exercised");
            return;
        }
        xattr::set(t.real("/dev/vfio/42"), "security.selinux", b"bad\xff\0").unwrap();
        let inv = read_inventory(&t.root()).unwrap();
        let node = |p: &str| inv.vfio_nodes.iter().find(|n| n.path == p).unwrap();
        assert_eq!(
            node("/dev/vfio/41").selinux_label.as_deref(),
            Some("system_u:object_r:vfio_device_t:s0")
        );
        assert_eq!(node("/dev/vfio/42").selinux_label, None);
        assert_eq!(node("/dev/vfio/vfio").selinux_label, None);
        let p = problem(&inv, "/dev/vfio/42 (security.selinux)");
        assert!(p.error.contains("UTF-8"), "{p:?}");
        assert_eq!(p.value.as_deref(), Some("bad\u{fffd}"));
    }

    #[test]
    fn absent_optional_parts_are_not_problems() {
        let t = Tree::new();
        t.file("/proc/sys/kernel/osrelease", "6.12.9\n");
        let dir = "/sys/devices/pci0000:00/0000:00:1f.0";
        t.pci(dir, "0x8086", "0x1234", "0x060100");
        let (inv, stats) = read_inventory_with_stats(&t.root()).unwrap();
        assert_eq!(inv.problems, vec![]);
        assert_eq!(inv.pci.len(), 1);
        let f = &inv.pci[0];
        assert_eq!(
            (
                f.driver.as_deref(),
                f.iommu_group,
                f.sriov.as_ref(),
                f.physfn
            ),
            (None, None, None, None)
        );
        assert!(!f.has_reset && f.reset_methods.is_empty() && f.vfio_dev.is_empty());
        assert_eq!(inv.vfio_pci, None);
        assert_eq!(inv.ap, None);
        assert!(inv.iommu_groups.is_empty() && inv.vfio_nodes.is_empty());
        assert!(inv.mdevs.is_empty() && inv.mdev_parents.is_empty() && inv.ib.is_empty());
        // 1 osrelease + the function's uevent (its ids and class) and numa_node;
        // every probe of an absent bus is one listing.
        assert_eq!(stats.files_read, 3, "{stats:?}");
        assert_eq!(
            (
                f.vendor,
                f.device,
                f.subsystem_vendor,
                f.subsystem_device,
                f.class
            ),
            (
                Some(0x8086),
                Some(0x1234),
                Some(0x15b3),
                Some(0x0007),
                Some(0x060100)
            )
        );
        assert_eq!(stats.links_read, 1, "{stats:?}");
    }

    fn problem<'a>(inv: &'a Inventory, path: &str) -> &'a ReadProblem {
        inv.problems
            .iter()
            .find(|p| p.path == path)
            .unwrap_or_else(|| panic!("no problem for {path}: {:#?}", inv.problems))
    }

    #[test]
    fn bad_input_becomes_problems_and_the_rest_is_read() {
        let t = full_host();
        // A malformed vendor id in the PF's uevent.
        t.file(
            &format!("{PF}/uevent"),
            "PCI_CLASS=20700\nPCI_ID=15B:101D\nPCI_SUBSYS_ID=15B3:0016\n",
        );
        // A non-UTF-8 driver_override on a VF.
        t.file(&format!("{VF1}/driver_override"), b"vfio\xff-pci\n");
        // A dangling iommu_group link on the other VF.
        fs::remove_file(t.real(&format!("{VF2}/iommu_group"))).unwrap();
        t.raw_link(
            &format!("{VF2}/iommu_group"),
            "../../../../kernel/iommu_groups/99",
        );
        // A mask of the wrong length.
        t.file("/sys/bus/ap/aqmask", format!("0x{}\n", "f".repeat(63)));
        // A bus link whose target does not exist.
        t.link(
            "/sys/bus/pci/devices/0000:af:00.0",
            "/sys/devices/pci0000:ae/0000:af:00.0",
        );
        // A function without a class.
        let odd = "/sys/devices/pci0000:00/0000:00:1f.0";
        t.pci(odd, "0x8086", "0x1234", "0x060100");
        t.file(
            &format!("{odd}/uevent"),
            "PCI_ID=8086:1234\nPCI_SLOT_NAME=0000:00:1f.0\n",
        );
        // A bus entry that is not a BDF.
        t.link("/sys/bus/pci/devices/bogus", odd);
        // A malformed P_Key slot and matrix.
        let p = format!("{PF}/infiniband/mlx5_0/ports/1");
        t.file(&format!("{p}/pkeys/3"), "0x80011\n");
        t.file(
            &format!("/sys/devices/vfio_ap/matrix/{APMDEV}/matrix"),
            "05.0100\n",
        );

        let inv = read_inventory(&t.root()).unwrap();

        let p1 = problem(&inv, &format!("{PF}/uevent"));
        assert_eq!(p1.subject.as_deref(), Some("0000:3b:00.0"));
        assert!(
            p1.value.as_deref().unwrap().contains("PCI_ID=15B:101D"),
            "{p1:?}"
        );
        assert!(p1.error.contains("PCI_ID: expected %04X:%04X"), "{p1:?}");
        let pf = inv.pci_function(bdf("0000:3b:00.0")).unwrap();
        // The file is taken whole or not at all: no id of it is believed.
        assert_eq!((pf.vendor, pf.device, pf.class), (None, None, None));
        assert_eq!(pf.subsystem_vendor, None);
        assert_eq!(
            pf.driver.as_deref(),
            Some("mlx5_core"),
            "the rest of the PF is read"
        );
        assert_eq!(pf.sriov.as_ref().unwrap().vfs.len(), 2);

        let p2 = problem(&inv, &format!("{VF1}/driver_override"));
        assert_eq!(p2.value.as_deref(), Some("vfio\u{fffd}-pci"));
        assert!(p2.error.contains("UTF-8"), "{p2:?}");
        let vf1 = inv.pci_function(bdf("0000:3b:00.1")).unwrap();
        assert_eq!(vf1.driver_override, None);
        assert_eq!(vf1.driver.as_deref(), Some("vfio-pci"));

        let p3 = problem(&inv, &format!("{VF2}/iommu_group"));
        assert_eq!(p3.subject.as_deref(), Some("0000:3b:00.2"));
        assert_eq!(
            p3.value.as_deref(),
            Some("../../../../kernel/iommu_groups/99")
        );
        assert!(
            p3.error
                .contains("dangling link: /sys/kernel/iommu_groups/99 does not exist"),
            "{p3:?}"
        );
        let vf2 = inv.pci_function(bdf("0000:3b:00.2")).unwrap();
        assert_eq!(vf2.iommu_group, None);
        assert_eq!(vf2.driver.as_deref(), Some("vfio-pci"));

        let p4 = problem(&inv, "/sys/bus/ap/aqmask");
        assert_eq!(
            p4.value.as_deref(),
            Some(format!("0x{}", "f".repeat(63)).as_str())
        );
        assert!(p4.error.contains("found 63 characters"), "{p4:?}");
        let ap = inv.ap.as_ref().unwrap();
        assert_eq!(ap.aqmask, None);
        assert_eq!(ap.apmask, Some(ApMask::NONE));
        assert_eq!(ap.queues.len(), 2);

        let p5 = problem(&inv, "/sys/bus/pci/devices/0000:af:00.0");
        assert_eq!(
            p5.value.as_deref(),
            Some("../../../devices/pci0000:ae/0000:af:00.0")
        );
        assert!(p5.error.contains("does not exist"), "{p5:?}");
        assert!(inv.pci_function(bdf("0000:af:00.0")).is_none());

        let p6 = problem(&inv, &format!("{odd}/uevent"));
        assert!(p6.error.contains("no PCI_CLASS line"), "{p6:?}");
        let f = inv.pci_function(bdf("0000:00:1f.0")).unwrap();
        assert_eq!((f.class, f.vendor), (None, None));
        assert_eq!(f.numa_node, Some(0), "the rest of the function is read");

        let p7 = problem(&inv, "/sys/bus/pci/devices/bogus");
        assert_eq!(p7.value.as_deref(), Some("bogus"));

        let p8 = problem(&inv, &format!("{p}/pkeys/3"));
        assert_eq!(p8.subject.as_deref(), Some("mlx5_0"));
        assert_eq!(p8.value.as_deref(), Some("0x80011"));
        assert_eq!(inv.ib[0].ports[0].pkeys.len(), 3);

        let p9 = problem(
            &inv,
            &format!("/sys/devices/vfio_ap/matrix/{APMDEV}/matrix"),
        );
        assert_eq!(p9.value.as_deref(), Some("05.0100"));
        assert!(p9.error.contains("00ff"), "{p9:?}");
        assert_eq!(ap.matrix_mdevs[0].matrix, None);
        assert_eq!(ap.matrix_mdevs[0].control_domains, vec![4]);

        assert_eq!(inv.problems.len(), 9, "{:#?}", inv.problems);
        // Problems are sorted by path.
        let paths: Vec<&str> = inv.problems.iter().map(|p| p.path.as_str()).collect();
        let mut sorted = paths.clone();
        sorted.sort_unstable();
        assert_eq!(paths, sorted);
        // Everything else is still there.
        assert_eq!(inv.kernel_release.as_deref(), Some("6.1.0-26-amd64"));
        assert_eq!(inv.mdevs.len(), 1);
        assert_eq!(inv.iommu_groups.len(), 5);
    }

    #[test]
    fn long_values_are_cut_and_dangling_mdev_links_reported() {
        let t = Tree::new();
        t.file(
            "/proc/sys/kernel/osrelease",
            format!("{}\nmore\n", "x".repeat(300)),
        );
        t.link(
            &format!("/sys/bus/mdev/devices/{MDEV}"),
            &format!("{GPU}/{MDEV}"),
        );
        let inv = read_inventory(&t.root()).unwrap();
        let p = problem(&inv, "/proc/sys/kernel/osrelease");
        let v = p.value.as_deref().unwrap();
        assert_eq!(v.chars().count(), 80);
        assert!(v.ends_with('…'));
        let p = problem(&inv, &format!("/sys/bus/mdev/devices/{MDEV}"));
        assert_eq!(p.subject.as_deref(), Some(MDEV));
        assert!(p.error.contains("does not exist"), "{p:?}");
        assert!(inv.mdevs.is_empty());
    }

    #[test]
    fn a_missing_root_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-host");
        let e = read_inventory(&HostRoot::new(&missing)).unwrap_err();
        assert!(matches!(e, HostError::RootMissing { .. }));
        let msg = e.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("Hint:"), "{msg}");
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(matches!(
            read_inventory(&HostRoot::new(&file)),
            Err(HostError::RootNotDirectory { .. })
        ));
    }

    #[test]
    fn threads_do_not_change_the_result() {
        let t = Tree::new();
        t.file("/proc/sys/kernel/osrelease", "6.1.0\n");
        let pf = "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0";
        t.pci(pf, "0x8086", "0x10c9", "0x020000");
        t.file(&format!("{pf}/sriov_totalvfs"), "255\n");
        t.file(&format!("{pf}/sriov_numvfs"), "200\n");
        for i in 0..200u32 {
            let (dev, func) = ((i + 1) / 8, (i + 1) % 8);
            let vf = format!("/sys/devices/pci0000:00/0000:00:01.0/0000:01:{dev:02x}.{func}");
            t.pci(&vf, "0x8086", "0x10ca", "0x020000");
            t.link(&format!("{pf}/virtfn{i}"), &vf);
            t.link(&format!("{vf}/physfn"), pf);
            t.group(&vf, 100 + i);
            t.driver(
                &vf,
                "pci",
                if i.is_multiple_of(2) {
                    "vfio-pci"
                } else {
                    "igbvf"
                },
            );
            t.file(&format!("/dev/vfio/{}", 100 + i), "");
            if i % 50 == 7 {
                t.file(&format!("{vf}/numa_node"), "zero\n");
            }
        }
        let (one, s1) = read_with_threads(&t.root(), 1).unwrap();
        let (four, s4) = read_with_threads(&t.root(), 4).unwrap();
        assert_eq!(one, four);
        assert_eq!(s1, s4);
        assert_eq!(one.pci.len(), 201);
        assert_eq!(one.iommu_groups.len(), 200);
        assert_eq!(one.vfio_nodes.len(), 200);
        assert_eq!(one.problems.len(), 4, "{:#?}", one.problems);
        let vfs = &one.pci[0].sriov.as_ref().unwrap().vfs;
        assert_eq!(vfs.len(), 200);
        assert!(vfs.windows(2).all(|w| w[0].index + 1 == w[1].index));
        assert_eq!(vfs[199].bdf, bdf("0000:01:19.0"));
        assert!(one.pci.windows(2).all(|w| w[0].bdf < w[1].bdf));
    }

    #[test]
    fn natural_order_and_basenames() {
        let mut v = vec!["vfio10", "vfio2", "vfio1", "x"];
        v.sort_by_key(|n| natural(n));
        assert_eq!(v, ["vfio1", "vfio2", "vfio10", "x"]);
        assert_eq!(basename("../../bus/pci/drivers/vfio-pci"), "vfio-pci");
        assert_eq!(basename("a/b/"), "b");
        assert_eq!(basename(""), "");
        assert_eq!(card_id("card0a"), Some(10));
        assert_eq!(card_id("card0A"), None);
        assert_eq!(queue_id("05.0012").map(|q| q.domain), Some(0x12));
        assert_eq!(queue_id("05.00AB"), None);
    }
    /// issue 18 item 6: a link planted in place of an attribute, or a directory
    /// link leading out of the fixture, is never followed out of the root: the
    /// outside file's contents appear nowhere in the inventory.
    #[test]
    fn links_never_lead_out_of_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        fs::write(&secret, "0xdead\n").unwrap();
        fs::create_dir_all(outside.path().join("dir")).unwrap();
        fs::write(outside.path().join("dir/vendor"), "0xbeef\n").unwrap();
        let t = full_host();
        // An attribute that is an absolute link to a file outside the root.
        fs::remove_file(t.real(&format!("{PF}/uevent"))).unwrap();
        t.raw_link(&format!("{PF}/uevent"), secret.to_str().unwrap());
        // A relative link climbing out of the root.
        fs::remove_file(t.real(&format!("{VF1}/uevent"))).unwrap();
        let up = "../".repeat(20);
        t.raw_link(
            &format!("{VF1}/uevent"),
            &format!("{up}{}", secret.to_str().unwrap().trim_start_matches('/')),
        );
        // A bus entry whose target is a directory outside the root.
        t.raw_link(
            "/sys/bus/pci/devices/0000:99:00.0",
            outside.path().join("dir").to_str().unwrap(),
        );
        let inv = read_inventory(&t.root()).unwrap();
        let json = serde_json::to_string(&inv).unwrap();
        assert!(!json.contains("dead"), "read outside the root: {json}");
        assert!(!json.contains("beef"), "read outside the root: {json}");
        let p = inv
            .problems
            .iter()
            .find(|p| p.path == format!("{PF}/uevent"))
            .expect("the linked uevent is a problem");
        assert!(p.error.contains("symbolic link"), "{p:?}");
        assert!(
            inv.problems
                .iter()
                .any(|p| p.path == format!("{VF1}/uevent")),
            "{:?}",
            inv.problems
        );
    }

    /// issue 18 item 6: a FIFO in place of an attribute is a problem at once —
    /// the reader never opens it blocking — and a huge attribute is refused at
    /// the cap.
    #[test]
    fn a_fifo_or_a_huge_file_is_a_problem_not_a_hang() {
        let t = full_host();
        fs::remove_file(t.real(&format!("{VF2}/uevent"))).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            t.real(&format!("{VF2}/uevent")),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let f = fs::File::create(t.real(&format!("{VF1}/uevent"))).unwrap();
        f.set_len(MAX_FILE as u64 + 1).unwrap();
        let inv = read_inventory(&t.root()).unwrap();
        let fifo = inv
            .problems
            .iter()
            .find(|p| p.path == format!("{VF2}/uevent"))
            .expect("the FIFO is a problem");
        assert!(fifo.error.contains("FIFO"), "{fifo:?}");
        let big = inv
            .problems
            .iter()
            .find(|p| p.path == format!("{VF1}/uevent"))
            .expect("the huge file is a problem");
        assert!(big.error.contains("larger than"), "{big:?}");
    }
    /// issue 18 item 12: an `iommu_group` link that points anywhere but
    /// `/sys/kernel/iommu_groups/<N>` — even at a directory named like a group —
    /// is a malformed link naming its target, and the device has no group.
    #[test]
    fn a_group_link_elsewhere_is_malformed() {
        let t = full_host();
        fs::remove_file(t.real(&format!("{VF1}/iommu_group"))).unwrap();
        t.raw_link(&format!("{VF1}/iommu_group"), "../../../../tmp/41");
        let inv = read_inventory(&t.root()).unwrap();
        let f = inv.pci_function("0000:3b:00.1".parse().unwrap()).unwrap();
        assert_eq!(f.iommu_group, None);
        let p = inv
            .problems
            .iter()
            .find(|p| p.path == format!("{VF1}/iommu_group"))
            .expect("a problem");
        assert!(p.error.contains("malformed"), "{p:?}");
        assert!(p.error.contains("/sys/tmp/41"), "{p:?}");
        assert_eq!(p.value.as_deref(), Some("../../../../tmp/41"));
    }
}
