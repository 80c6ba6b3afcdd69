//! systemd's readiness protocol (`sd_notify(3)`), without libsystemd: one
//! datagram per state change to the socket `NOTIFY_SOCKET` names (a path,
//! or an abstract name written `@name`).
//!
//! The agent sends `READY=1` once it has recovered what a crash interrupted
//! and its socket is bound, `RELOADING=1` (with `MONOTONIC_USEC`) then
//! `READY=1` around a `SIGHUP` reload, `STOPPING=1` when asked to stop,
//! `STATUS=` lines saying what it does, and `WATCHDOG=1` at half of
//! `WATCHDOG_USEC` from a task on its runtime (see [`watchdog_interval`]).
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where the notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`: a path, or `@name` for an abstract socket. An
    /// unusable value is logged and ignored (the agent still serves).
    #[must_use]
    pub fn from_env() -> Notifier {
        let Some(v) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { target: None };
        };
        match Self::open(&v) {
            Ok(t) => Notifier { target: Some(t) },
            Err(e) => {
                tracing::warn!(
                    "NOTIFY_SOCKET={} cannot be used ({e}); systemd will not hear that the agent is ready",
                    v.to_string_lossy()
                );
                Notifier { target: None }
            }
        }
    }

    /// A notifier that sends nothing.
    #[must_use]
    pub fn none() -> Notifier {
        Notifier { target: None }
    }

    fn open(v: &std::ffi::OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
        use std::os::unix::ffi::OsStrExt;
        let b = v.as_bytes();
        let addr = match b.first() {
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&b[1..])?
            }
            Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(v))?,
            _ => {
                return Err(std::io::Error::other(
                    "neither an absolute path nor an abstract name (@name)",
                ));
            }
        };
        let sock = UnixDatagram::unbound()?;
        // A systemd that stopped reading must never block the agent.
        sock.set_nonblocking(true)?;
        Ok((sock, addr))
    }

    /// Whether systemd listens.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` lines). A failure is
    /// logged, never fatal.
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.target
            && let Err(e) = sock.send_to_addr(state.as_bytes(), addr)
        {
            tracing::warn!("cannot notify systemd ({}): {e}", state.replace('\n', " "));
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1` with the monotonic time systemd asks for.
    pub fn reloading(&self) {
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration",
            monotonic_usec()
        ));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={status}"));
    }

    /// `STATUS=…` alone.
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={status}"));
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }
}

/// `CLOCK_MONOTONIC` in microseconds (what `RELOADING=1` carries).
fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1000
    })
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when it is set
/// and `WATCHDOG_PID` is absent or this process.
#[must_use]
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_of(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_of(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(p) = pid
        && p.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let us: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(us / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_half_the_interval_and_ours_only() {
        let me = 4242;
        assert_eq!(
            watchdog_interval_of(Some("20000000"), None, me),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            watchdog_interval_of(Some("20000000"), Some("4242"), me),
            Some(Duration::from_secs(10))
        );
        assert_eq!(watchdog_interval_of(Some("20000000"), Some("1"), me), None);
        assert_eq!(watchdog_interval_of(None, None, me), None);
        assert_eq!(watchdog_interval_of(Some("0"), None, me), None);
        assert_eq!(watchdog_interval_of(Some("x"), None, me), None);
    }

    /// A path and an abstract name both reach a socket the test binds.
    #[test]
    fn notifies_a_path_and_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("notify");
        let rx = UnixDatagram::bind(&p).expect("bind");
        let n = Notifier {
            target: Some(Notifier::open(p.as_os_str()).expect("open")),
        };
        n.ready("serving");
        let mut buf = [0u8; 256];
        let k = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..k], b"READY=1\nSTATUS=serving");
        let name = format!("devfence-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).expect("addr"),
        )
        .expect("bind abstract");
        let n = Notifier {
            target: Some(Notifier::open(std::ffi::OsStr::new(&format!("@{name}"))).expect("open")),
        };
        n.stopping("bye");
        let k = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..k], b"STOPPING=1\nSTATUS=bye");
        assert!(Notifier::open(std::ffi::OsStr::new("relative")).is_err());
    }
}
