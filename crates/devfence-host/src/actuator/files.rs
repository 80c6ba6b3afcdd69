//! The files devfence itself writes under a host root at run time: the VF
//! token handed to a launcher and the side-load directory of admitted device
//! state. Both are reached through real directories only (`O_NOFOLLOW` from
//! the root down, [`HostRoot::create_fresh_file`], [`HostRoot::remove_file`]),
//! so a link planted in the runtime directory never makes devfence write or
//! remove anything outside the root.

use std::io::{self, Write as _};

use super::{KernelIo, VfToken};
use crate::root::HostRoot;

/// The biggest owner record of an admitted device-state payload (a device id).
const MAX_OWNER: u64 = 256;

const TOKEN_HINT: &str = "check the runtime directory (root-owned, on tmpfs, no symbolic links); the token was not delivered";

/// A file step that failed: what, where, the I/O error, what to do.
#[derive(Debug, thiserror::Error)]
pub enum FileStepError {
    /// An I/O call failed.
    #[error("cannot {what} {path}")]
    Io {
        /// The call (`create`, `chown`, `write`, `list`, `remove`).
        what: &'static str,
        /// The file, as it is on the machine (under the root).
        path: String,
        /// The error.
        #[source]
        source: io::Error,
        /// What the operator can do.
        hint: String,
    },
    /// The file is not what devfence wrote there.
    #[error("{path}: {why}")]
    Refused {
        /// The file, as it is on the machine.
        path: String,
        /// What is wrong with it.
        why: String,
        /// What the operator can do.
        hint: String,
    },
}

impl FileStepError {
    /// What the operator can do.
    #[must_use]
    pub fn hint(&self) -> &str {
        match self {
            FileStepError::Io { hint, .. } | FileStepError::Refused { hint, .. } => hint,
        }
    }

    /// The failure in one line, with its cause (the journal's reason).
    #[must_use]
    pub fn reason(&self) -> String {
        match self {
            FileStepError::Io { source, .. } => format!("{self}: {source}"),
            FileStepError::Refused { .. } => self.to_string(),
        }
    }

    #[must_use]
    fn with_hint(mut self, h: &str) -> Self {
        match &mut self {
            FileStepError::Io { hint, .. } | FileStepError::Refused { hint, .. } => {
                h.clone_into(hint);
            }
        }
        self
    }
}

fn io_err(
    root: &HostRoot,
    kpath: &str,
    what: &'static str,
    hint: &str,
) -> impl Fn(io::Error) -> FileStepError {
    let path = root.path(kpath).display().to_string();
    let hint = hint.to_owned();
    move |source| FileStepError::Io {
        what,
        path: path.clone(),
        source,
        hint: hint.clone(),
    }
}

/// Creates a fresh 0600 file at `kpath` under `root`, owned by `uid:gid`,
/// holding `contents`, synced: the default of [`KernelIo::create_private_file`].
///
/// # Errors
/// The step that failed with its I/O error.
pub fn create_private_file(
    root: &HostRoot,
    kpath: &str,
    contents: &[u8],
    uid: u32,
    gid: u32,
) -> Result<(), FileStepError> {
    let hint = "check the directory (root-owned, no symbolic links)";
    // Inside the root, through real directories only, never through a link.
    let mut f = root
        .create_fresh_file(kpath, 0o600)
        .map_err(io_err(root, kpath, "create", hint))?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
        .map_err(io_err(root, kpath, "chown", hint))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(io_err(root, kpath, "write", hint))
}

/// [`super::Actuator::deliver_token`] over `io`.
pub(crate) fn deliver_token<K: KernelIo + ?Sized>(
    io: &K,
    kpath: &str,
    token: &VfToken,
    uid: u32,
    gid: u32,
) -> Result<(), FileStepError> {
    let mut text = token.reveal_for_launcher();
    text.push('\n');
    let r = io.create_private_file(kpath, text.as_bytes(), uid, gid);
    // Overwrite the String's bytes in place before it is freed.
    let wiped = "0".repeat(text.len());
    text.replace_range(.., &wiped);
    drop(text);
    r.map_err(|e| e.with_hint(TOKEN_HINT))
}

/// [`super::Actuator::withdraw_token`] over `io`.
pub(crate) fn withdraw_token<K: KernelIo + ?Sized>(
    io: &K,
    kpath: &str,
) -> Result<bool, FileStepError> {
    // Through real directories inside the root only, never a link.
    io.remove_file(kpath).map_err(io_err(
        io.root(),
        kpath,
        "remove",
        "remove it by hand; the token in it is void once a new one is set",
    ))
}

/// [`super::Actuator::void_device_state`] over `io`.
pub(crate) fn void_device_state<K: KernelIo + ?Sized>(
    io: &K,
    dir: &str,
    device: &str,
) -> Result<u32, FileStepError> {
    let root = io.root();
    let entries = match root.list_dir(dir) {
        Ok(r) => r,
        Err(x) if x.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(x) => {
            return Err(io_err(
                root,
                dir,
                "list",
                "check the side-load directory (root-owned, 0700); admitted state of this device may still be there",
            )(x));
        }
    };
    let mut names: Vec<String> = entries
        .into_iter()
        .filter_map(|e| e.name.into_string().ok())
        .collect();
    names.sort();
    let mut voided = 0u32;
    for name in names {
        let Some(token) = name.strip_suffix(".owner") else {
            continue;
        };
        let owner = format!("{dir}/{name}");
        let bad = |why: String| {
            FileStepError::Refused {
            path: root.path(&owner).display().to_string(),
            why,
            hint: "remove the file by hand after checking whose state it records; devfence cannot tell whether it is this device's".into(),
        }
        };
        let meta = root
            .metadata(&owner, false)
            .map_err(|x| bad(x.to_string()))?;
        if !meta.is_file() || meta.len() > MAX_OWNER {
            return Err(bad("not a small regular file".into()));
        }
        let raw = root
            .read_file(&owner, MAX_OWNER)
            .map_err(|x| bad(x.to_string()))?;
        let text = String::from_utf8(raw).map_err(|_| bad("not UTF-8".into()))?;
        if text.trim_end_matches('\n') != device {
            continue;
        }
        let payload = format!("{dir}/{token}.state");
        for p in [&payload, &owner] {
            io.remove_file(p).map_err(io_err(
                root,
                p,
                "remove",
                "remove it by hand: it is the previous tenant's admitted device state",
            ))?;
        }
        voided += 1;
    }
    Ok(voided)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actuator::real::RealKernel;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn scratch() -> (tempfile::TempDir, RealKernel) {
        let t = tempfile::tempdir().expect("tempdir");
        let k = RealKernel::new(HostRoot::new(t.path()));
        (t, k)
    }

    fn me() -> (u32, u32) {
        let m = std::fs::metadata("/proc/self").expect("proc");
        (m.uid(), m.gid())
    }

    #[test]
    fn a_token_is_a_fresh_private_file_of_the_launcher() {
        let (t, k) = scratch();
        let (uid, gid) = me();
        let tok = VfToken::from_bytes([7; 16]);
        deliver_token(
            &k,
            "/run/devfence/tokens/0000:01:00.1.token",
            &tok,
            uid,
            gid,
        )
        .expect("deliver");
        let p = t.path().join("run/devfence/tokens/0000:01:00.1.token");
        let m = std::fs::metadata(&p).expect("meta");
        assert_eq!(m.permissions().mode() & 0o7777, 0o600);
        assert_eq!((m.uid(), m.gid()), (uid, gid));
        let text = std::fs::read_to_string(&p).expect("read");
        assert_eq!(text, format!("{}\n", tok.reveal_for_launcher()));
        // A link planted where the token goes is replaced, never followed.
        let outside = tempfile::tempdir().expect("outside");
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "victim").expect("victim");
        std::fs::remove_file(&p).expect("rm");
        std::os::unix::fs::symlink(&victim, &p).expect("link");
        deliver_token(
            &k,
            "/run/devfence/tokens/0000:01:00.1.token",
            &tok,
            uid,
            gid,
        )
        .expect("again");
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "victim");
        assert!(std::fs::symlink_metadata(&p).expect("meta").is_file());
        assert!(withdraw_token(&k, "/run/devfence/tokens/0000:01:00.1.token").expect("withdraw"));
        assert!(!p.exists());
        assert!(!withdraw_token(&k, "/run/devfence/tokens/0000:01:00.1.token").expect("again"));
    }

    #[test]
    fn a_linked_token_directory_is_never_written_or_removed_through() {
        let (t, k) = scratch();
        let (uid, gid) = me();
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("a.token"), "victim").expect("victim");
        std::fs::create_dir_all(t.path().join("run/devfence")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), t.path().join("run/devfence/tokens"))
            .expect("link");
        let tok = VfToken::from_bytes([1; 16]);
        let e =
            deliver_token(&k, "/run/devfence/tokens/b.token", &tok, uid, gid).expect_err("refused");
        assert!(
            e.reason()
                .contains("/run/devfence/tokens is a symbolic link"),
            "{}",
            e.reason()
        );
        assert_eq!(e.hint(), TOKEN_HINT);
        assert!(withdraw_token(&k, "/run/devfence/tokens/a.token").is_err());
        let names: Vec<_> = std::fs::read_dir(outside.path())
            .expect("list")
            .map(|e| e.expect("ent").file_name())
            .collect();
        assert_eq!(names, vec!["a.token"]);
    }

    #[test]
    fn only_the_devices_admitted_state_is_voided() {
        let (t, k) = scratch();
        let d = t.path().join("run/devfence/state");
        std::fs::create_dir_all(&d).expect("mkdir");
        for (tok, dev) in [
            ("t1", "0000:01:00.1"),
            ("t2", "0000:01:00.2"),
            ("t3", "0000:01:00.1"),
        ] {
            std::fs::write(d.join(format!("{tok}.state")), "payload").expect("state");
            std::fs::write(d.join(format!("{tok}.owner")), format!("{dev}\n")).expect("owner");
        }
        let n = void_device_state(&k, "/run/devfence/state", "0000:01:00.1").expect("void");
        assert_eq!(n, 2);
        let mut left: Vec<_> = std::fs::read_dir(&d)
            .expect("list")
            .map(|e| e.expect("ent").file_name().into_string().expect("utf8"))
            .collect();
        left.sort();
        assert_eq!(left, vec!["t2.owner", "t2.state"]);
        assert_eq!(
            void_device_state(&k, "/run/devfence/none", "x").expect("absent"),
            0
        );
        // An owner record that is not a small regular file is refused.
        std::fs::create_dir(d.join("t4.owner")).expect("dir");
        let e = void_device_state(&k, "/run/devfence/state", "0000:01:00.2").expect_err("refused");
        assert!(
            e.reason().ends_with("t4.owner: not a small regular file"),
            "{}",
            e.reason()
        );
    }
}
