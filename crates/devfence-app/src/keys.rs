//! `devfence keys`: this host's signing key for device-state envelopes and the
//! keyring of source hosts whose envelopes it admits (docs/state-envelopes.md).
//! Every change is an audit record; the private key is never returned in a
//! form that prints it.

use std::path::{Path, PathBuf};

use devfence_engine::{AuditEvent, AuditKind, StoreExt};
use devfence_host::HostRoot;
use devfence_seal::keys::RemovedKey;
use devfence_seal::{Fingerprint, HostKey, PublicLine, TrustChange, TrustedKey};

use crate::error::{AppError, Result};
use crate::keystore::{
    HOST_KEY, HOST_PUB, KEYS_DIR, check_keys_dir, load_host_key, load_keyring, now_ms, private_dir,
    save_keyring, write_private,
};

macro_rules! bail {
    ($($t:tt)*) => { return Err(AppError::invalid(format!($($t)*))) };
}

fn audit(root: &HostRoot, ledger: Option<&Path>, detail: &serde_json::Value) -> Result<()> {
    let mut store = crate::env::open_store(root, ledger, true)?;
    store.atomically(|tx| {
        tx.audit(&AuditEvent {
            kind: AuditKind::Keys,
            device: None,
            tenant: None,
            detail: detail.clone(),
        })
    })?;
    Ok(())
}

fn default_host_id(root: &HostRoot) -> Result<String> {
    let p = root.path("/etc/hostname");
    if let Ok(b) = root.read_file("/etc/hostname", 4096)
        && let Ok(t) = String::from_utf8(b)
        && let Some(l) = t.lines().next()
    {
        let id = l.trim().split('.').next().unwrap_or("").to_owned();
        if !id.is_empty() {
            devfence_seal::format::check_host_id(&id).map_err(|e| {
                AppError::invalid(format!("{}: {e}. Hint: give --host-id ID", p.display()))
            })?;
            return Ok(id);
        }
    }
    bail!(
        "Cannot tell this host's id: {} does not name it. Hint: give --host-id ID",
        p.display()
    )
}

fn write_host_key(root: &HostRoot, key: &HostKey) -> Result<()> {
    check_keys_dir(root)?;
    private_dir(&root.path_in_root(KEYS_DIR)?)?;
    let text = key.to_file_text();
    write_private(&root.path_in_root(HOST_KEY)?, text.expose().as_bytes())?;
    drop(text);
    write_private(
        &root.path_in_root(HOST_PUB)?,
        format!("{}\n", key.public_line()).as_bytes(),
    )
}

/// A host key made by [`init`].
#[derive(Debug)]
pub struct KeyMade {
    /// The key (its private half is never printed by its `Debug` or `Display`).
    pub key: HostKey,
    /// The private key's file (0600).
    pub path: PathBuf,
    /// The public key line's file.
    pub public_path: PathBuf,
}

/// `keys init`: makes this host's signing key (named `host_id`, else the
/// host's name) and trusts it in the keyring.
///
/// # Errors
/// The host has a key already; no host id; the files cannot be written.
pub fn init(root: &HostRoot, ledger: Option<&Path>, host_id: Option<&str>) -> Result<KeyMade> {
    let path = root.path_in_root(HOST_KEY)?;
    if std::fs::symlink_metadata(&path).is_ok() {
        let existing = load_host_key(root)
            .map(|k| format!(" (fingerprint {})", k.public().fingerprint()))
            .unwrap_or_default();
        bail!(
            "This host has a signing key already{existing}: {}. Hint: `devfence keys rotate` \
             replaces it; `devfence keys show` prints it",
            path.display()
        );
    }
    let host_id = match host_id {
        Some(h) => h.to_owned(),
        None => default_host_id(root)?,
    };
    let now = now_ms();
    let key = HostKey::generate(&host_id, now)?;
    let mut ring = load_keyring(root)?;
    let change = ring.trust(&host_id, key.public(), now)?;
    write_host_key(root, &key)?;
    save_keyring(root, &ring)?;
    audit(
        root,
        ledger,
        &serde_json::json!({
            "action": "keys-init",
            "host": host_id,
            "fingerprint": change.added,
            "retired": change.retired,
        }),
    )?;
    Ok(KeyMade {
        key,
        path,
        public_path: root.path_in_root(HOST_PUB)?,
    })
}

/// A rotation by [`rotate`].
#[derive(Debug)]
pub struct Rotated {
    /// The key retired now.
    pub old: HostKey,
    /// The key that signs from now on.
    pub new: HostKey,
    /// When, in ms since the epoch.
    pub at_ms: u64,
}

/// `keys rotate`: a new host key; the old one stays trusted, retired, for the
/// envelopes it signed before now.
///
/// # Errors
/// No host key; the files cannot be written.
pub fn rotate(root: &HostRoot, ledger: Option<&Path>) -> Result<Rotated> {
    let old = load_host_key(root)?;
    let now = now_ms();
    let new = HostKey::generate(old.host_id(), now)?;
    let mut ring = load_keyring(root)?;
    let change = ring.trust(old.host_id(), new.public(), now)?;
    // The keyring first: a crash in between leaves the old key signing envelopes
    // this host refuses (fail closed), and `keys rotate` can simply run again.
    save_keyring(root, &ring)?;
    write_host_key(root, &new)?;
    audit(
        root,
        ledger,
        &serde_json::json!({
            "action": "keys-rotate",
            "host": old.host_id(),
            "fingerprint": change.added,
            "retired": old.public().fingerprint(),
        }),
    )?;
    Ok(Rotated {
        old,
        new,
        at_ms: now,
    })
}

/// What [`trust_add`] did.
#[derive(Debug)]
pub struct Trusted {
    /// The change to the keyring.
    pub change: TrustChange,
    /// When the key had been removed before (trusted again with `force`).
    pub was_removed: Option<RemovedKey>,
}

/// `keys trust add`: trusts `line`'s key for its host. A key removed before
/// (removal is how a compromised key is revoked) only with `force`; audited.
///
/// # Errors
/// A removed key without `force`; the keyring cannot be read or written.
pub fn trust_add(
    root: &HostRoot,
    ledger: Option<&Path>,
    line: &PublicLine,
    force: bool,
) -> Result<Trusted> {
    let mut ring = load_keyring(root)?;
    let was_removed = ring.removed_at(&line.key).cloned();
    let change = ring.trust_with(&line.host, line.key, now_ms(), force)?;
    save_keyring(root, &ring)?;
    audit(
        root,
        ledger,
        &serde_json::json!({
            "action": "trust-add",
            "host": line.host,
            "fingerprint": change.added,
            "retired": change.retired,
            "forced_after_removal_ms": was_removed.as_ref().map(|r| r.removed_ms),
        }),
    )?;
    Ok(Trusted {
        change,
        was_removed,
    })
}

/// `keys trust remove`: removes a key; its envelopes are refused from now on.
///
/// # Errors
/// An unknown key; the keyring cannot be read or written.
pub fn trust_remove(
    root: &HostRoot,
    ledger: Option<&Path>,
    fp: &Fingerprint,
) -> Result<TrustedKey> {
    let mut ring = load_keyring(root)?;
    let removed = ring.remove_at(fp, now_ms())?;
    save_keyring(root, &ring)?;
    audit(
        root,
        ledger,
        &serde_json::json!({ "action": "trust-remove", "host": removed.host, "fingerprint": fp }),
    )?;
    Ok(removed)
}
