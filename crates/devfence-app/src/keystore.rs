//! This host's signing key and the keyring of trusted source hosts, as files:
//! where they live under the host root and how they are read and written.
//!
//! Everything lives in root-only places: directories are made `0700`, files
//! `0600`, written to a temporary file, synced and renamed into place. The
//! private key is never printed, logged or audited.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use devfence_host::HostRoot;
use devfence_seal::{HostKey, Keyring};

use crate::error::{AppError, Result, StepContext};

macro_rules! bail {
    ($($t:tt)*) => { return Err(AppError::invalid(format!($($t)*))) };
}

/// The directory of the host key and the keyring.
pub const KEYS_DIR: &str = "/etc/devfence/keys";
/// The host key (private): `devfence keys init`.
pub const HOST_KEY: &str = "/etc/devfence/keys/host.key";
/// The host's public key line, for other hosts' keyrings.
pub const HOST_PUB: &str = "/etc/devfence/keys/host.pub";
/// The keyring of trusted source hosts.
pub const KEYRING: &str = "/etc/devfence/keys/trusted.json";

/// Now, in ms since the epoch.
pub fn now_ms() -> u64 {
    u64::try_from(devfence_engine::store::now_ms()).unwrap_or(0)
}

/// Makes `dir` (and its parents) and gives `dir` itself mode 0700. Refused if it
/// is not a directory.
pub fn private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).step(|| {
            format!(
                "Cannot create {}. Hint: run devfence as root",
                parent.display()
            )
        })?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(AppError::step(
                format!(
                    "Cannot create {}. Hint: run devfence as root",
                    dir.display()
                ),
                e,
            ));
        }
    }
    let meta = std::fs::symlink_metadata(dir).step(|| format!("Cannot read {}", dir.display()))?;
    if !meta.is_dir() {
        bail!(
            "{} is not a directory. Hint: devfence keeps keys and state in root-only directories; move it aside",
            dir.display()
        );
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .step(|| format!("Cannot make {} private (0700)", dir.display()))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a 0600 temporary file beside it, synced,
/// renamed over `path`, and the directory synced.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path)?;
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(AppError::step(
            format!(
                "Cannot write {}. Hint: check the disk and that devfence runs as root",
                path.display()
            ),
            e,
        ));
    }
    Ok(())
}

/// A fresh temporary name beside `path`.
pub fn temp_beside(path: &Path) -> Result<PathBuf> {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r)
        .map_err(|e| AppError::invalid(format!("Cannot get randomness: {e}")))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(path.with_file_name(format!(".{name}.{}.tmp", devfence_seal::format::hex(&r))))
}

/// Syncs the directory holding `path`, so a rename in it is durable.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(d) => std::fs::File::open(d)?.sync_all(),
        None => Ok(()),
    }
}

/// Reads a private file: a regular file no one else may read or write, at most
/// `max` bytes. `Ok(None)` if it does not exist.
pub fn read_private(path: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AppError::step(format!("Cannot read {}", path.display()), e)),
    };
    if !meta.is_file() {
        bail!(
            "{} is not a regular file. Hint: devfence writes it itself; move it aside",
            path.display()
        );
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} has mode {mode:04o}: others may read or change it. Hint: it must be 0600 \
             (`chmod 600 {}`); if others could read a private key, rotate it",
            path.display(),
            path.display()
        );
    }
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::metadata(dir)
        && d.uid() != meta.uid()
    {
        bail!(
            "{} is owned by uid {}, but its directory by uid {}. Hint: devfence's keys and \
             state are root-owned; restore them from a backup",
            path.display(),
            meta.uid(),
            d.uid()
        );
    }
    if meta.len() > max {
        bail!(
            "{} is {} bytes, more than {max}. Hint: it is not a file devfence wrote",
            path.display(),
            meta.len()
        );
    }
    // Non-blocking, a regular file only (checked again on the open file), capped.
    let b = devfence_model::bounded::read_file(path, max)?;
    Ok(Some(b))
}

/// Refuses a keys directory others may enter, read or write (it must be 0700:
/// whoever can write it can replace the keyring or the host key).
pub fn check_keys_dir(root: &HostRoot) -> Result<()> {
    let dir = root.path_in_root(KEYS_DIR)?;
    let meta = match std::fs::symlink_metadata(&dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(AppError::step(format!("Cannot read {}", dir.display()), e)),
    };
    if !meta.is_dir() {
        bail!(
            "{} is not a directory. Hint: devfence keeps its keys in a root-only directory; move it aside",
            dir.display()
        );
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!(
            "The keys directory {} has mode {mode:04o}: others may enter it{}. Hint: it must be \
             0700 (`chmod 700 {}`); if others could write it, check the keyring and the host key \
             against a backup first, and rotate the key if others could read it",
            dir.display(),
            if mode & 0o022 != 0 {
                " and replace the host key or the keyring"
            } else {
                ""
            },
            dir.display()
        );
    }
    Ok(())
}

/// Loads the host key.
pub fn load_host_key(root: &HostRoot) -> Result<HostKey> {
    check_keys_dir(root)?;
    let path = root.path_in_root(HOST_KEY)?;
    let Some(mut b) = read_private(&path, 4096)? else {
        bail!(
            "This host has no signing key ({} is missing). Hint: make one with `devfence keys init`",
            path.display()
        );
    };
    let k = std::str::from_utf8(&b)
        .map_err(|_| AppError::invalid(format!("{} is not text", path.display())))
        .and_then(|t| {
            HostKey::from_file_text(t)
                .map_err(|e| AppError::invalid(format!("{}: {e}", path.display())))
        });
    b.fill(0);
    k
}

/// Loads the keyring (empty if there is none yet).
pub fn load_keyring(root: &HostRoot) -> Result<Keyring> {
    check_keys_dir(root)?;
    let path = root.path_in_root(KEYRING)?;
    match read_private(&path, devfence_seal::keys::MAX_KEYRING as u64)? {
        None => Ok(Keyring::new()),
        Some(b) => {
            let t = std::str::from_utf8(&b)
                .map_err(|_| AppError::invalid(format!("{} is not text", path.display())))?;
            Keyring::parse(t).map_err(|e| AppError::invalid(format!("{}: {e}", path.display())))
        }
    }
}

/// Writes the keyring (atomically, 0600, in the 0700 keys directory).
pub fn save_keyring(root: &HostRoot, ring: &Keyring) -> Result<()> {
    check_keys_dir(root)?;
    private_dir(&root.path_in_root(KEYS_DIR)?)?;
    write_private(&root.path_in_root(KEYRING)?, ring.render().as_bytes())
}
