//! Kernel uevents: the kernel's own announcements that a device appeared,
//! went, changed, or was bound to or unbound from a driver — what the host
//! agent's continuous verification wakes up on (issue 12 item 4).
//!
//! The kernel multicasts one datagram per event on a `NETLINK_KOBJECT_UEVENT`
//! socket, group 1 (`lib/kobject_uevent.c`):
//!
//! ```text
//! change@/devices/pci0000:00/0000:00:01.0\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:00:01.0\0SUBSYSTEM=pci\0DRIVER=virtio-pci\0…\0SEQNUM=1933\0
//! ```
//!
//! a header `ACTION@DEVPATH`, then `KEY=VALUE` pairs, each NUL-terminated. The
//! environment is at most `UEVENT_BUFFER_SIZE` (2048) bytes and 64 variables.
//! udevd re-broadcasts processed events on group 2 in its own binary format,
//! starting `libudev\0`; those are not the kernel's and are skipped.
//!
//! [`parse`] treats a datagram as untrusted, bounded input ([`MAX_MESSAGE`],
//! [`MAX_VARS`]): a well-formed kernel message becomes a typed [`Uevent`],
//! anything else a [`UeventError`] naming what is wrong — never a panic (the
//! `uevent` fuzz target). [`UeventListener`] is the socket: it accepts only
//! datagrams whose sender is the kernel (netlink port id 0); a process that
//! may multicast on the group (root) cannot make the agent believe anything,
//! because an event only ever makes the agent re-read the host itself.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::OwnedFd;
use std::time::Duration;

/// The largest datagram accepted: the header (action, `@`, a device path of at
/// most [`MAX_DEVPATH`]) and the kernel's 2048-byte environment, with room.
pub const MAX_MESSAGE: usize = 8192;
/// The longest device path accepted (the kernel's `PATH_MAX`).
pub const MAX_DEVPATH: usize = 4096;
/// The most `KEY=VALUE` variables accepted (the kernel sends at most 64).
pub const MAX_VARS: usize = 64;
/// The multicast group the kernel sends uevents on.
pub const KERNEL_GROUP: u32 = 1;

/// What happened to the device (the kernel's `kobject_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UeventAction {
    /// `add`: the device appeared.
    Add,
    /// `remove`: it went.
    Remove,
    /// `change`: something about it changed (or `echo change > uevent`).
    Change,
    /// `move`: it was renamed or moved.
    Move,
    /// `online`.
    Online,
    /// `offline`.
    Offline,
    /// `bind`: a driver bound to it.
    Bind,
    /// `unbind`: its driver let go of it.
    Unbind,
}

impl UeventAction {
    /// The kernel's name for it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            UeventAction::Add => "add",
            UeventAction::Remove => "remove",
            UeventAction::Change => "change",
            UeventAction::Move => "move",
            UeventAction::Online => "online",
            UeventAction::Offline => "offline",
            UeventAction::Bind => "bind",
            UeventAction::Unbind => "unbind",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "add" => UeventAction::Add,
            "remove" => UeventAction::Remove,
            "change" => UeventAction::Change,
            "move" => UeventAction::Move,
            "online" => UeventAction::Online,
            "offline" => UeventAction::Offline,
            "bind" => UeventAction::Bind,
            "unbind" => UeventAction::Unbind,
            _ => return None,
        })
    }
}

impl fmt::Display for UeventAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One kernel uevent.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Uevent {
    /// What happened.
    pub action: UeventAction,
    /// The device's path under `/sys` (`/devices/pci0000:00/0000:00:01.0`).
    pub devpath: String,
    /// `SUBSYSTEM` (`pci`, `mdev`, `ap`, `infiniband`, `vfio`, …), if sent.
    pub subsystem: Option<String>,
    /// `DEVTYPE`, if sent.
    pub devtype: Option<String>,
    /// `DRIVER`, if sent (a bound device's `change`, a `bind`).
    pub driver: Option<String>,
    /// `SEQNUM`: the kernel's sequence number of the event.
    pub seqnum: Option<u64>,
    /// Every variable, as sent (including the ones above).
    pub vars: BTreeMap<String, String>,
}

/// The subsystems whose events can change what devfence verifies: PCI
/// functions and their drivers, mdevs and their parents, AP queues and cards
/// and the vfio_ap matrix device (bus `matrix`), IB devices and ports, VFIO
/// group and device nodes.
pub const RELEVANT_SUBSYSTEMS: &[&str] = &[
    "pci",
    "mdev",
    "mdev_bus",
    "ap",
    "matrix",
    "vfio_ap",
    "infiniband",
    "infiniband_verbs",
    "vfio",
    "vfio-dev",
    "iommu",
];

impl Uevent {
    /// Whether this event can change what devfence verifies: a device of a
    /// [relevant subsystem](RELEVANT_SUBSYSTEMS) under `/devices` added,
    /// removed, moved, bound, unbound or changed.
    #[must_use]
    pub fn is_relevant(&self) -> bool {
        let action = matches!(
            self.action,
            UeventAction::Add
                | UeventAction::Remove
                | UeventAction::Change
                | UeventAction::Move
                | UeventAction::Bind
                | UeventAction::Unbind
        );
        action
            && self.devpath.starts_with("/devices/")
            && self
                .subsystem
                .as_deref()
                .is_some_and(|s| RELEVANT_SUBSYSTEMS.contains(&s))
    }

    /// The variable `key`, if sent.
    #[must_use]
    pub fn var(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }
}

/// Why a datagram is not a kernel uevent devfence accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UeventError {
    /// udevd's re-broadcast (`libudev\0…`), not the kernel's: skipped.
    #[error("a udev message (\"libudev\" header), not the kernel's; skipped")]
    FromUdev,
    /// The sender is not the kernel (netlink port id `pid`, not 0).
    #[error("a uevent datagram from netlink port {pid}, not from the kernel (0); skipped")]
    NotFromKernel {
        /// The sender's netlink port id.
        pid: u32,
    },
    /// Larger than [`MAX_MESSAGE`].
    #[error(
        "a uevent of {len} bytes (the most accepted is {MAX_MESSAGE}). Hint: the kernel sends at most about 6 KiB; this did not come from it"
    )]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Empty.
    #[error("an empty uevent datagram")]
    Empty,
    /// The header is not `ACTION@DEVPATH`.
    #[error("the uevent header {header:?} is not ACTION@DEVPATH")]
    BadHeader {
        /// The header, cut at 64 characters.
        header: String,
    },
    /// An action the kernel does not send.
    #[error(
        "unknown uevent action {action:?}. Hint: the kernel sends add, remove, change, move, online, offline, bind, unbind"
    )]
    UnknownAction {
        /// The action, cut at 64 characters.
        action: String,
    },
    /// A device path that is not absolute, is too long, or climbs with `..`.
    #[error("the uevent device path {devpath:?} is not an absolute sysfs path without \"..\"")]
    BadDevpath {
        /// The path, cut at 64 characters.
        devpath: String,
    },
    /// A field is not UTF-8.
    #[error("uevent field {index} is not UTF-8")]
    NotUtf8 {
        /// The field's index (0: the header).
        index: usize,
    },
    /// A variable without `=` or with an empty name.
    #[error("uevent field {index} ({field:?}) is not KEY=VALUE")]
    BadVar {
        /// The field's index.
        index: usize,
        /// The field, cut at 64 characters.
        field: String,
    },
    /// More than [`MAX_VARS`] variables.
    #[error("a uevent with more than {MAX_VARS} variables")]
    TooManyVars,
    /// A variable sent twice.
    #[error("uevent variable {key} is sent twice")]
    DuplicateVar {
        /// The variable.
        key: String,
    },
    /// `ACTION=` or `DEVPATH=` disagrees with the header.
    #[error("uevent variable {key} = {value:?} disagrees with the header")]
    Inconsistent {
        /// `ACTION` or `DEVPATH`.
        key: &'static str,
        /// Its value, cut at 64 characters.
        value: String,
    },
    /// `SEQNUM` is not a number.
    #[error("uevent SEQNUM {value:?} is not a number")]
    BadSeqnum {
        /// Its value, cut at 64 characters.
        value: String,
    },
}

fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Parses one datagram of the kernel's uevent socket (module docs).
///
/// # Errors
/// [`UeventError::FromUdev`] for udevd's messages (to be skipped); any other
/// variant names what makes the datagram malformed.
pub fn parse(msg: &[u8]) -> Result<Uevent, UeventError> {
    if msg.len() > MAX_MESSAGE {
        return Err(UeventError::TooLarge { len: msg.len() });
    }
    if msg.starts_with(b"libudev\0") {
        return Err(UeventError::FromUdev);
    }
    // The last field ends in a NUL; one missing at the very end is tolerated.
    let body = msg.strip_suffix(b"\0").unwrap_or(msg);
    if body.is_empty() {
        return Err(UeventError::Empty);
    }
    let mut fields = body.split(|b| *b == 0).enumerate();
    let (_, header) = fields.next().ok_or(UeventError::Empty)?;
    let header = std::str::from_utf8(header).map_err(|_| UeventError::NotUtf8 { index: 0 })?;
    let (action, devpath) = header
        .split_once('@')
        .ok_or_else(|| UeventError::BadHeader {
            header: cut(header),
        })?;
    let action = UeventAction::from_name(action).ok_or_else(|| UeventError::UnknownAction {
        action: cut(action),
    })?;
    if !devpath.starts_with('/')
        || devpath.len() > MAX_DEVPATH
        || devpath.split('/').any(|c| c == "..")
    {
        return Err(UeventError::BadDevpath {
            devpath: cut(devpath),
        });
    }
    let mut vars = BTreeMap::new();
    for (index, f) in fields {
        if vars.len() == MAX_VARS {
            return Err(UeventError::TooManyVars);
        }
        let f = std::str::from_utf8(f).map_err(|_| UeventError::NotUtf8 { index })?;
        let Some((k, v)) = f.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(UeventError::BadVar {
                index,
                field: cut(f),
            });
        };
        if vars.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(UeventError::DuplicateVar { key: cut(k) });
        }
    }
    for (key, want) in [("ACTION", action.name()), ("DEVPATH", devpath)] {
        if let Some(v) = vars.get(key)
            && v != want
        {
            return Err(UeventError::Inconsistent { key, value: cut(v) });
        }
    }
    let seqnum = vars
        .get("SEQNUM")
        .map(|s| {
            s.parse::<u64>()
                .map_err(|_| UeventError::BadSeqnum { value: cut(s) })
        })
        .transpose()?;
    let get = |k: &str| vars.get(k).cloned();
    Ok(Uevent {
        action,
        devpath: devpath.to_owned(),
        subsystem: get("SUBSYSTEM"),
        devtype: get("DEVTYPE"),
        driver: get("DRIVER"),
        seqnum,
        vars,
    })
}

/// What one receive brought.
#[derive(Debug)]
pub enum Received {
    /// A kernel uevent.
    Event(Uevent),
    /// A datagram that is not a kernel uevent devfence accepts (udev's, not
    /// from the kernel, malformed): skipped, with why.
    Skipped(UeventError),
    /// The socket's buffer overflowed (`ENOBUFS`): events were lost. Whoever
    /// listens must assume anything may have changed.
    Overflow,
    /// Nothing arrived within the receive timeout.
    Timeout,
}

/// Why the uevent socket cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{what}. Hint: {hint}")]
pub struct ListenError {
    /// What failed.
    pub what: String,
    /// What to do.
    pub hint: &'static str,
    /// The errno.
    #[source]
    pub source: std::io::Error,
}

/// A `NETLINK_KOBJECT_UEVENT` socket subscribed to the kernel's group.
pub struct UeventListener {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl fmt::Debug for UeventListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UeventListener").finish_non_exhaustive()
    }
}

/// The receive buffer asked for: a burst of events (a PF creating 64 VFs
/// sends a few hundred) must not overflow it.
const RECV_BUFFER: usize = 4 << 20;

impl UeventListener {
    /// Opens the socket, binds it to the kernel's uevent group and sets a
    /// receive timeout of `timeout` (so that a listening thread can notice
    /// that it should stop).
    ///
    /// # Errors
    /// The socket cannot be made or bound (no netlink in this network
    /// namespace, a seccomp filter).
    pub fn open(timeout: Duration) -> Result<Self, ListenError> {
        use rustix::net::{
            AddressFamily, SocketFlags, SocketType, bind, netlink, socket_with, sockopt,
        };
        let err = |what: &str, e: rustix::io::Errno| ListenError {
            what: format!("Cannot listen for kernel uevents: {what}"),
            hint: "the agent needs a NETLINK_KOBJECT_UEVENT socket in the host's network namespace; it re-verifies at [agent] verify_interval meanwhile",
            source: std::io::Error::from_raw_os_error(e.raw_os_error()),
        };
        let fd = socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(netlink::KOBJECT_UEVENT),
        )
        .map_err(|e| err("socket", e))?;
        // A larger buffer than the default; the forced size needs
        // CAP_NET_ADMIN, else the capped one is taken.
        if sockopt::set_socket_recv_buffer_size_force(&fd, RECV_BUFFER).is_err() {
            let _ = sockopt::set_socket_recv_buffer_size(&fd, RECV_BUFFER);
        }
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(timeout))
            .map_err(|e| err("receive timeout", e))?;
        bind(&fd, &netlink::SocketAddrNetlink::new(0, KERNEL_GROUP))
            .map_err(|e| err("bind to the kernel's group", e))?;
        Ok(UeventListener {
            fd,
            buf: vec![0; MAX_MESSAGE + 1],
        })
    }

    /// Receives one datagram (waiting at most the timeout given to
    /// [`open`](Self::open)).
    ///
    /// # Errors
    /// The socket failed (other than a timeout, an interrupt or an overflow).
    pub fn recv(&mut self) -> std::io::Result<Received> {
        use rustix::io::Errno;
        use rustix::net::{RecvFlags, netlink::SocketAddrNetlink, recvfrom};
        let (_, len, from) = match recvfrom(&self.fd, &mut self.buf[..], RecvFlags::TRUNC) {
            Ok(r) => r,
            Err(Errno::AGAIN | Errno::INTR) => return Ok(Received::Timeout),
            Err(Errno::NOBUFS) => return Ok(Received::Overflow),
            Err(e) => return Err(std::io::Error::from_raw_os_error(e.raw_os_error())),
        };
        let pid = from
            .and_then(|a| SocketAddrNetlink::try_from(a).ok())
            .map_or(u32::MAX, |a| a.pid());
        if pid != 0 {
            return Ok(Received::Skipped(UeventError::NotFromKernel { pid }));
        }
        // With MSG_TRUNC the length is the datagram's, even beyond the buffer.
        if len > MAX_MESSAGE {
            return Ok(Received::Skipped(UeventError::TooLarge { len }));
        }
        let msg = self.buf.get(..len).unwrap_or(&[]);
        Ok(match parse(msg) {
            Ok(e) => Received::Event(e),
            Err(e) => Received::Skipped(e),
        })
    }
}

/// For tests of what consumes uevents (the agent's watcher): asks the running
/// kernel to send a synthetic `change` uevent for this machine's first PCI
/// function (`echo change > /sys/bus/pci/devices/<function>/uevent`, as
/// `udevadm trigger --action=change` does; root only). Returns the function.
///
/// # Errors
/// No PCI function; the write is refused.
#[doc(hidden)]
pub fn synthesize_pci_change() -> std::io::Result<String> {
    let dev = std::fs::read_dir("/sys/bus/pci/devices")?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .min()
        .ok_or_else(|| std::io::Error::other("no PCI function on this machine"))?;
    std::fs::write(format!("/sys/bus/pci/devices/{dev}/uevent"), "change")?;
    Ok(dev)
}

/// For the `uevent` fuzz target: [`parse`] on arbitrary bytes, and what it
/// returns checked against its bounds.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    if let Ok(e) = parse(data) {
        assert!(e.vars.len() <= MAX_VARS);
        assert!(e.devpath.starts_with('/') && e.devpath.len() <= MAX_DEVPATH);
        assert!(data.len() <= MAX_MESSAGE);
        let _ = e.is_relevant();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What this machine's kernel sent for `echo change >
    /// /sys/bus/pci/devices/0000:00:01.0/uevent` (Linux 6.18).
    const PCI_CHANGE: &[u8] = b"change@/devices/pci0000:00/0000:00:01.0\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:00:01.0\0SUBSYSTEM=pci\0SYNTH_UUID=0\0DRIVER=virtio-pci\0PCI_CLASS=FFFF00\0PCI_ID=1AF4:1045\0PCI_SUBSYS_ID=1AF4:1045\0PCI_SLOT_NAME=0000:00:01.0\0MODALIAS=pci:v00001AF4d00001045sv00001AF4sd00001045bcFFscFFi00\0SEQNUM=1933\0";

    #[test]
    fn a_real_pci_change_is_parsed_and_relevant() {
        let e = parse(PCI_CHANGE).expect("parse");
        assert_eq!(e.action, UeventAction::Change);
        assert_eq!(e.devpath, "/devices/pci0000:00/0000:00:01.0");
        assert_eq!(e.subsystem.as_deref(), Some("pci"));
        assert_eq!(e.driver.as_deref(), Some("virtio-pci"));
        assert_eq!(e.seqnum, Some(1933));
        assert_eq!(e.var("PCI_SLOT_NAME"), Some("0000:00:01.0"));
        assert!(e.is_relevant());
        // Without the trailing NUL too.
        assert_eq!(
            parse(&PCI_CHANGE[..PCI_CHANGE.len() - 1]).expect("parse"),
            e
        );
    }

    #[test]
    fn irrelevant_events_are_told_apart() {
        let net = parse(b"change@/devices/virtual/net/lo\0ACTION=change\0DEVPATH=/devices/virtual/net/lo\0SUBSYSTEM=net\0SEQNUM=1\0").expect("parse");
        assert!(!net.is_relevant());
        let module = parse(
            b"add@/module/vfio_pci\0ACTION=add\0DEVPATH=/module/vfio_pci\0SUBSYSTEM=module\0",
        )
        .expect("parse");
        assert!(!module.is_relevant());
        let online =
            parse(b"online@/devices/pci0000:00/0000:00:02.0\0SUBSYSTEM=pci\0").expect("parse");
        assert!(!online.is_relevant());
        let bind =
            parse(b"bind@/devices/pci0000:00/0000:00:02.0\0SUBSYSTEM=pci\0DRIVER=vfio-pci\0")
                .expect("parse");
        assert!(bind.is_relevant());
    }

    #[test]
    fn malformed_datagrams_are_clear_errors() {
        let big = vec![b'a'; MAX_MESSAGE + 1];
        for (msg, want) in [
            (&b"libudev\0\xfe\xed\xca\xfe"[..], UeventError::FromUdev),
            (b"", UeventError::Empty),
            (b"\0", UeventError::Empty),
            (
                b"change/devices/x\0",
                UeventError::BadHeader {
                    header: "change/devices/x".into(),
                },
            ),
            (
                b"explode@/devices/x\0",
                UeventError::UnknownAction {
                    action: "explode".into(),
                },
            ),
            (
                b"add@devices/x\0",
                UeventError::BadDevpath {
                    devpath: "devices/x".into(),
                },
            ),
            (
                b"add@/devices/../etc\0",
                UeventError::BadDevpath {
                    devpath: "/devices/../etc".into(),
                },
            ),
            (b"add@/devices/\xff\0", UeventError::NotUtf8 { index: 0 }),
            (
                b"add@/devices/x\0NOEQUALS\0",
                UeventError::BadVar {
                    index: 1,
                    field: "NOEQUALS".into(),
                },
            ),
            (
                b"add@/devices/x\0=v\0",
                UeventError::BadVar {
                    index: 1,
                    field: "=v".into(),
                },
            ),
            (
                b"add@/devices/x\0A=1\0\0",
                UeventError::BadVar {
                    index: 2,
                    field: String::new(),
                },
            ),
            (
                b"add@/devices/x\0A=1\0A=2\0",
                UeventError::DuplicateVar { key: "A".into() },
            ),
            (
                b"add@/devices/x\0ACTION=remove\0",
                UeventError::Inconsistent {
                    key: "ACTION",
                    value: "remove".into(),
                },
            ),
            (
                b"add@/devices/x\0DEVPATH=/devices/y\0",
                UeventError::Inconsistent {
                    key: "DEVPATH",
                    value: "/devices/y".into(),
                },
            ),
            (
                b"add@/devices/x\0SEQNUM=-1\0",
                UeventError::BadSeqnum { value: "-1".into() },
            ),
            (
                &big[..],
                UeventError::TooLarge {
                    len: MAX_MESSAGE + 1,
                },
            ),
        ] {
            assert_eq!(parse(msg), Err(want), "{:?}", String::from_utf8_lossy(msg));
        }
        let mut many = b"add@/devices/x".to_vec();
        for i in 0..=MAX_VARS {
            many.extend_from_slice(format!("\0K{i}=v").as_bytes());
        }
        assert_eq!(parse(&many), Err(UeventError::TooManyVars));
        let e = parse(b"explode@/x").expect_err("unknown");
        assert!(e.to_string().contains("Hint:"), "{e}");
    }

    /// Arbitrary bytes, and kernel-shaped messages with arbitrary fields:
    /// parsed or refused, never a panic, always within the bounds.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut seed = 0x6465_7666_656e_6365_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"add@/=\0change-bindAZ09.:\xff";
        for _ in 0..20_000 {
            let len = usize::try_from(next() % 96).unwrap_or(0);
            let mut m: Vec<u8> = (0..len)
                .map(|_| alphabet[usize::try_from(next()).unwrap_or(0) % alphabet.len()])
                .collect();
            if next() % 2 == 0 {
                let mut k = b"bind@/devices/p\0".to_vec();
                k.append(&mut m);
                m = k;
            }
            fuzz(&m);
        }
    }
}
