//! The agent's socket and its lock: one agent per socket.
//!
//! Beside the socket sits `<socket>.lock`, held with `flock` for the agent's
//! life and holding its pid. A second agent fails to take the lock and is
//! refused naming the first one's pid. With the lock held, a socket file at the
//! path is a dead agent's (replaced) unless something answers on it (refused:
//! another program serves there); any other kind of file is refused and never
//! removed.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::AgentError;

/// The lock an agent holds while it serves; dropping it releases the lock
/// and removes the socket.
#[derive(Debug)]
pub struct SocketGuard {
    socket: PathBuf,
    _lock: Flock<File>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        // Only a socket, and only while the lock is still held (drop order).
        if std::fs::symlink_metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// The lock file of `socket`.
#[must_use]
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Binds `socket` (mode 0660, group `group` when given) after taking its lock.
///
/// # Errors
/// Another agent holds the lock; something answers on the socket; a file
/// that is not a socket is at the path; the directory or socket cannot be made.
pub fn bind(
    socket: &Path,
    group: Option<u32>,
) -> Result<(std::os::unix::net::UnixListener, SocketGuard), AgentError> {
    let io = |what: &str, path: &Path, source| AgentError::Io {
        what: format!("{what} {}", path.display()),
        source,
    };
    if let Some(dir) = socket.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| io("Cannot create the socket's directory", dir, e))?;
    }
    let lp = lock_path(socket);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        // Non-blocking and a regular file only: a FIFO put at the lock's path
        // must be an error, not a read that hangs the agent's start.
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&lp)
        .map_err(|e| io("Cannot open the agent's lock file", &lp, e))?;
    match file.metadata() {
        Ok(m) if m.file_type().is_file() => {}
        Ok(m) => {
            return Err(io(
                &format!(
                    "The agent's lock file is {}, not a regular file; devfence does not remove it. Hint: move it away:",
                    kind_of(&m.file_type())
                ),
                &lp,
                std::io::Error::other("not a regular file"),
            ));
        }
        Err(e) => return Err(io("Cannot inspect the agent's lock file", &lp, e)),
    }
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut f, _)) => {
            let mut pid = String::new();
            let _ = (&mut f).take(32).read_to_string(&mut pid);
            return Err(AgentError::AlreadyRunning {
                socket: socket.to_path_buf(),
                pid: pid.trim().to_owned(),
            });
        }
    };
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| writeln!(lock, "{}", std::process::id()))
        .map_err(|e| io("Cannot write the agent's pid to", &lp, e))?;
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Err(AgentError::SocketInUse {
                    socket: socket.to_path_buf(),
                });
            }
            // A dead agent's socket: ours to replace (we hold the lock).
            std::fs::remove_file(socket)
                .map_err(|e| io("Cannot remove the stale socket", socket, e))?;
        }
        Ok(m) => {
            return Err(AgentError::NotASocket {
                socket: socket.to_path_buf(),
                kind: kind_of(&m.file_type()),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("Cannot inspect", socket, e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .map_err(|e| io("Cannot bind the socket", socket, e))?;
    let guard = SocketGuard {
        socket: socket.to_path_buf(),
        _lock: lock,
    };
    if let Some(g) = group {
        std::os::unix::fs::chown(socket, None, Some(g))
            .map_err(|e| io("Cannot give the socket its group:", socket, e))?;
    }
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| io("Cannot set the socket's mode (0660):", socket, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io("Cannot make the socket non-blocking:", socket, e))?;
    Ok((listener, guard))
}

fn kind_of(t: &std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else {
        "a device or other special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO at the lock's path is refused at once (never read, never
    /// removed): the agent's start does not hang on it.
    #[test]
    fn a_fifo_at_the_lock_path_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("devfence.sock");
        nix::unistd::mkfifo(
            &lock_path(&sock),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo");
        let e = bind(&sock, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("a FIFO, not a regular file") && e.contains("Hint:"),
            "{e}"
        );
        assert!(lock_path(&sock).exists(), "left where it was");
        assert!(!sock.exists(), "no socket bound");
    }
}
