//! Keys: the host's signing key and the keyring of source hosts it trusts.
//!
//! A host seals with its **host key** (ed25519, made from 32 bytes of the
//! operating system's randomness). Its private half never leaves the key file: no
//! `Debug`, `Display` or serialisation shows it, and the text of the key file is
//! wiped from memory once written.
//!
//! The **keyring** lists the public keys whose envelopes this host admits, each
//! bound to the host id it speaks for. Trusting a new key for a host that already
//! has one is a **rotation**: the old key is *retired*, not removed. A retired key
//! still vouches for envelopes created before it was retired, while they are
//! unexpired; since no envelope lives longer than [`MAX_TTL_MS`], a retired key is
//! spent [`MAX_TTL_MS`] after its retirement. Removing a key (a compromised one)
//! refuses its envelopes at once.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::format::{Header, MAX_TTL_MS, check_host_id, hex, unhex};

/// An ed25519 public key (32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Its fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> Fingerprint {
        let d = Sha256::digest(self.0);
        let mut f = [0u8; 16];
        f.copy_from_slice(&d[..16]);
        Fingerprint(f)
    }

    /// The key as the verifier needs it, if it is a valid, non-weak point.
    ///
    /// # Errors
    /// Why it is not usable.
    pub fn verifying_key(&self) -> Result<VerifyingKey, String> {
        let k = VerifyingKey::from_bytes(&self.0)
            .map_err(|_| "it is not a valid ed25519 public key".to_string())?;
        if k.is_weak() {
            return Err("it is a weak (small-order) ed25519 key".into());
        }
        Ok(k)
    }

    /// Verifies an ed25519 signature (strict) of `message` by this key.
    ///
    /// # Errors
    /// Why not: the key is unusable or the signature does not verify.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), String> {
        self.verifying_key()?
            .verify_strict(message, &ed25519_dalek::Signature::from_bytes(signature))
            .map_err(|_| "the signature does not verify".to_string())
    }
}

impl FromStr for PublicKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let k = unhex::<32>(s.trim()).map(PublicKey).ok_or_else(|| {
            format!(
                "{:?} is not a public key: expected 64 hex digits (`devfence keys show` on the source host)",
                s.chars().take(80).collect::<String>()
            )
        })?;
        k.verifying_key()
            .map_err(|e| format!("{s:?} is not a usable public key: {e}"))?;
        Ok(k)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A key's fingerprint: the first 16 bytes of the SHA-256 of the public key, in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 16]);

impl FromStr for Fingerprint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        unhex::<16>(s.trim()).map(Fingerprint).ok_or_else(|| {
            format!(
                "{:?} is not a key fingerprint: expected 32 hex digits (`devfence keys trust list`)",
                s.chars().take(80).collect::<String>()
            )
        })
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Errors of keys and key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The operating system gave no randomness.
    #[error(
        "Cannot get randomness for a new key: {0}. Hint: check /dev/urandom and the getrandom system call"
    )]
    Random(getrandom::Error),
    /// The host id is invalid.
    #[error("{0}. Hint: use the host's short name, e.g. --host-id hv01")]
    HostId(String),
    /// The key file does not parse.
    #[error(
        "The host key file is invalid at line {line}: {reason}. Hint: it is written by \
         `devfence keys init`; restore it from a backup, or run `devfence keys rotate` to make a new one"
    )]
    BadKeyFile {
        /// The line (1-based).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A public key line does not parse.
    #[error(
        "Invalid public key line: {0}. Hint: give the line `devfence keys show` prints on the \
         source host: devfence-ed25519 <64 hex digits> <host id>"
    )]
    BadPublicLine(String),
}

/// A wipe-on-drop string: the text of a key file.
pub struct SecretText(String);

impl SecretText {
    /// The text, to write to the key file.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for SecretText {
    fn drop(&mut self) {
        // Same length, ASCII only: overwritten in place, not reallocated.
        let zeros = "0".repeat(self.0.len());
        self.0.replace_range(.., &zeros);
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

/// The first line of a host key file.
pub const KEY_FILE_TAG: &str = "devfence-host-key-v1";
/// The first word of a public key line.
pub const PUBLIC_LINE_TAG: &str = "devfence-ed25519";

/// This host's signing key and the host id it signs as.
pub struct HostKey {
    host_id: String,
    signing: SigningKey,
    created_ms: u64,
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostKey")
            .field("host_id", &self.host_id)
            .field("public", &self.public())
            .field("created_ms", &self.created_ms)
            .finish_non_exhaustive()
    }
}

impl HostKey {
    /// A new key from 32 random bytes.
    ///
    /// # Errors
    /// An invalid host id, or no randomness.
    pub fn generate(host_id: &str, now_ms: u64) -> Result<HostKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(KeyError::Random)?;
        let k = HostKey::from_seed(host_id, seed, now_ms);
        seed.fill(0);
        k
    }

    /// The key with this seed (tests, and reading the key file).
    ///
    /// # Errors
    /// An invalid host id.
    pub fn from_seed(host_id: &str, seed: [u8; 32], created_ms: u64) -> Result<HostKey, KeyError> {
        check_host_id(host_id).map_err(KeyError::HostId)?;
        Ok(HostKey {
            host_id: host_id.to_owned(),
            signing: SigningKey::from_bytes(&seed),
            created_ms,
        })
    }

    /// The host id it signs as.
    #[must_use]
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// When it was made (ms since the epoch).
    #[must_use]
    pub fn created_ms(&self) -> u64 {
        self.created_ms
    }

    /// Its public key.
    #[must_use]
    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// Signs `message`.
    #[must_use]
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// The key file's text (contains the private key: write it 0600, then drop).
    #[must_use]
    pub fn to_file_text(&self) -> SecretText {
        let seed = SecretText(hex(self.signing.as_bytes()));
        SecretText(format!(
            "{KEY_FILE_TAG}\nhost {}\ncreated {}\nseed {}\n",
            self.host_id,
            self.created_ms,
            seed.expose()
        ))
    }

    /// Reads a key file's text.
    ///
    /// # Errors
    /// [`KeyError::BadKeyFile`] naming the line.
    pub fn from_file_text(text: &str) -> Result<HostKey, KeyError> {
        let bad = |line: usize, reason: &str| KeyError::BadKeyFile {
            line,
            reason: reason.to_owned(),
        };
        let lines: Vec<&str> = text.lines().collect();
        if lines.first() != Some(&KEY_FILE_TAG) {
            return Err(bad(1, "it does not start with devfence-host-key-v1"));
        }
        let field = |i: usize, name: &str| -> Result<&str, KeyError> {
            let l = lines
                .get(i)
                .ok_or_else(|| bad(i + 1, "the file ends early"))?;
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(' '))
                .ok_or_else(|| bad(i + 1, &format!("expected `{name} …`")))
        };
        let host = field(1, "host")?;
        let created: u64 = field(2, "created")?
            .parse()
            .map_err(|_| bad(3, "created is not a number of milliseconds"))?;
        let seed =
            unhex::<32>(field(3, "seed")?).ok_or_else(|| bad(4, "seed is not 64 hex digits"))?;
        if lines.len() > 4 {
            return Err(bad(5, "unexpected text after the seed"));
        }
        let k = HostKey::from_seed(host, seed, created).map_err(|e| match e {
            KeyError::HostId(r) => bad(2, &r),
            other => other,
        });
        // `seed` is a copy on the stack; clear it.
        let mut seed = seed;
        seed.fill(0);
        k
    }

    /// The public key line for other hosts' keyrings.
    #[must_use]
    pub fn public_line(&self) -> String {
        PublicLine {
            key: self.public(),
            host: self.host_id.clone(),
        }
        .to_string()
    }
}

/// `devfence-ed25519 <hex> <host id>`: how a public key travels to other hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicLine {
    /// The key.
    pub key: PublicKey,
    /// The host it speaks for.
    pub host: String,
}

impl fmt::Display for PublicLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_LINE_TAG} {} {}", self.key, self.host)
    }
}

impl FromStr for PublicLine {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bad = |r: String| KeyError::BadPublicLine(r);
        let mut words = s.split_whitespace();
        if words.next() != Some(PUBLIC_LINE_TAG) {
            return Err(bad(format!("it does not start with {PUBLIC_LINE_TAG}")));
        }
        let key: PublicKey = words
            .next()
            .ok_or_else(|| bad("the key is missing".into()))?
            .parse()
            .map_err(bad)?;
        let host = words
            .next()
            .ok_or_else(|| bad("the host id is missing".into()))?;
        check_host_id(host).map_err(bad)?;
        if words.next().is_some() {
            return Err(bad("unexpected words after the host id".into()));
        }
        Ok(PublicLine {
            key,
            host: host.to_owned(),
        })
    }
}

/// The keyring file's format version.
pub const KEYRING_FORMAT: u32 = 1;
/// The largest keyring file read.
pub const MAX_KEYRING: usize = 1024 * 1024;

/// One trusted key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// The host it speaks for.
    pub host: String,
    /// The key.
    pub key: PublicKey,
    /// Its fingerprint (checked against the key on reading).
    pub fingerprint: Fingerprint,
    /// When it was trusted (ms since the epoch).
    pub added_ms: u64,
    /// When a newer key of the same host retired it; it then vouches only for
    /// envelopes created before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_ms: Option<u64>,
}

impl TrustedKey {
    /// `active`, `retired`, or `spent` (retired long enough ago that no envelope
    /// it vouches for can still be unexpired).
    #[must_use]
    pub fn status(&self, now_ms: u64) -> &'static str {
        match self.retired_ms {
            None => "active",
            Some(r) if now_ms < r.saturating_add(MAX_TTL_MS) => "retired",
            Some(_) => "spent",
        }
    }
}

/// Errors of the keyring.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The file does not parse or is inconsistent.
    #[error(
        "The keyring is invalid: {0}. Hint: it is written by `devfence keys trust`; restore it \
         from a backup or re-add the source hosts' keys"
    )]
    Invalid(String),
    /// The key is trusted already.
    #[error(
        "Key {fingerprint} is trusted already, for host {host}. Hint: `devfence keys trust list` shows the keyring"
    )]
    AlreadyTrusted {
        /// The key.
        fingerprint: Fingerprint,
        /// Its host.
        host: String,
    },
    /// The key was retired; trusting it again would undo a rotation.
    #[error(
        "Key {fingerprint} of host {host} was retired by a rotation; it is not trusted again. \
         Hint: trust the host's current key (`devfence keys show` on {host})"
    )]
    Retired {
        /// The key.
        fingerprint: Fingerprint,
        /// Its host.
        host: String,
    },
    /// No such key.
    #[error(
        "No key with fingerprint {0} is in the keyring. Hint: `devfence keys trust list` shows the fingerprints"
    )]
    Unknown(Fingerprint),
    /// The key was removed from the keyring before (a compromised key is removed).
    #[error(
        "Key {fingerprint} of host {host} was removed from the keyring at {removed_ms} ms \
         (removal is how a compromised key is revoked), so it is not trusted again. Hint: trust \
         the host's new key; only if you are sure the key was never compromised, add it again \
         with --force"
    )]
    Removed {
        /// The key.
        fingerprint: Fingerprint,
        /// The host it spoke for.
        host: String,
        /// When it was removed (ms since the epoch).
        removed_ms: u64,
    },
}

/// A key removed from the keyring, remembered so it is not trusted again by
/// mistake.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovedKey {
    /// The host it spoke for.
    pub host: String,
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
    /// When it was removed (ms since the epoch).
    pub removed_ms: u64,
}

/// The keys whose envelopes this host admits.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keyring {
    /// [`KEYRING_FORMAT`].
    pub format: u32,
    /// The keys, in the order they were trusted.
    pub keys: Vec<TrustedKey>,
    /// Keys removed before (never trusted again without being forced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<RemovedKey>,
}

/// What [`Keyring::trust`] did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TrustChange {
    /// The key now trusted.
    pub added: Fingerprint,
    /// The host's previous key, now retired (a rotation).
    pub retired: Option<Fingerprint>,
}

impl Keyring {
    /// An empty keyring.
    #[must_use]
    pub fn new() -> Keyring {
        Keyring {
            format: KEYRING_FORMAT,
            keys: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// Reads a keyring file's text and checks it.
    ///
    /// # Errors
    /// [`KeyringError::Invalid`] saying what is wrong.
    pub fn parse(text: &str) -> Result<Keyring, KeyringError> {
        if text.len() > MAX_KEYRING {
            return Err(KeyringError::Invalid(format!(
                "it is {} bytes, more than {MAX_KEYRING}",
                text.len()
            )));
        }
        let k: Keyring =
            serde_json::from_str(text).map_err(|e| KeyringError::Invalid(e.to_string()))?;
        k.check()?;
        Ok(k)
    }

    /// The file's text.
    #[must_use]
    pub fn render(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    fn check(&self) -> Result<(), KeyringError> {
        if self.format != KEYRING_FORMAT {
            return Err(KeyringError::Invalid(format!(
                "format {} is not {KEYRING_FORMAT}",
                self.format
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let mut active = std::collections::HashSet::new();
        for k in &self.keys {
            check_host_id(&k.host).map_err(KeyringError::Invalid)?;
            if k.fingerprint != k.key.fingerprint() {
                return Err(KeyringError::Invalid(format!(
                    "the fingerprint {} of host {}'s key is not that key's ({})",
                    k.fingerprint,
                    k.host,
                    k.key.fingerprint()
                )));
            }
            if !seen.insert(k.key) {
                return Err(KeyringError::Invalid(format!(
                    "key {} is listed twice",
                    k.fingerprint
                )));
            }
            if k.retired_ms.is_none() && !active.insert(k.host.as_str()) {
                return Err(KeyringError::Invalid(format!(
                    "host {} has more than one active key",
                    k.host
                )));
            }
        }
        Ok(())
    }

    /// The entry for `key`.
    #[must_use]
    pub fn lookup(&self, key: &PublicKey) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.key == *key)
    }

    /// Trusts `key` for `host`. If the host has an active key, that key is retired
    /// now (a rotation).
    ///
    /// # Errors
    /// The key is trusted already or was retired.
    pub fn trust(
        &mut self,
        host: &str,
        key: PublicKey,
        now_ms: u64,
    ) -> Result<TrustChange, KeyringError> {
        self.trust_with(host, key, now_ms, false)
    }

    /// When `key` was removed from this keyring, if ever (the latest removal).
    #[must_use]
    pub fn removed_at(&self, key: &PublicKey) -> Option<&RemovedKey> {
        let f = key.fingerprint();
        self.removed.iter().rev().find(|r| r.fingerprint == f)
    }

    /// [`trust`](Self::trust), and with `allow_removed` also a key that was
    /// removed before (the caller warns loudly and audits it).
    ///
    /// # Errors
    /// As [`trust`](Self::trust), and [`KeyringError::Removed`] for a removed
    /// key without `allow_removed`.
    pub fn trust_with(
        &mut self,
        host: &str,
        key: PublicKey,
        now_ms: u64,
        allow_removed: bool,
    ) -> Result<TrustChange, KeyringError> {
        check_host_id(host).map_err(KeyringError::Invalid)?;
        if !allow_removed && let Some(r) = self.removed_at(&key) {
            return Err(KeyringError::Removed {
                fingerprint: r.fingerprint,
                host: r.host.clone(),
                removed_ms: r.removed_ms,
            });
        }
        key.verifying_key()
            .map_err(|e| KeyringError::Invalid(format!("key {}: {e}", key.fingerprint())))?;
        if let Some(k) = self.lookup(&key) {
            return Err(if k.retired_ms.is_some() {
                KeyringError::Retired {
                    fingerprint: k.fingerprint,
                    host: k.host.clone(),
                }
            } else {
                KeyringError::AlreadyTrusted {
                    fingerprint: k.fingerprint,
                    host: k.host.clone(),
                }
            });
        }
        let mut retired = None;
        for k in &mut self.keys {
            if k.host == host && k.retired_ms.is_none() {
                k.retired_ms = Some(now_ms);
                retired = Some(k.fingerprint);
            }
        }
        let fingerprint = key.fingerprint();
        self.keys.push(TrustedKey {
            host: host.to_owned(),
            key,
            fingerprint,
            added_ms: now_ms,
            retired_ms: None,
        });
        Ok(TrustChange {
            added: fingerprint,
            retired,
        })
    }

    /// Removes a key: its envelopes are refused from now on, whenever made.
    ///
    /// # Errors
    /// [`KeyringError::Unknown`].
    pub fn remove(&mut self, fingerprint: &Fingerprint) -> Result<TrustedKey, KeyringError> {
        self.remove_at(fingerprint, 0)
    }

    /// Removes a key and remembers it as removed at `now_ms`, so that trusting it
    /// again needs `allow_removed` ([`trust_with`](Self::trust_with)).
    ///
    /// # Errors
    /// [`KeyringError::Unknown`].
    pub fn remove_at(
        &mut self,
        fingerprint: &Fingerprint,
        now_ms: u64,
    ) -> Result<TrustedKey, KeyringError> {
        let i = self
            .keys
            .iter()
            .position(|k| k.fingerprint == *fingerprint)
            .ok_or(KeyringError::Unknown(*fingerprint))?;
        let k = self.keys.remove(i);
        self.removed.push(RemovedKey {
            host: k.host.clone(),
            fingerprint: k.fingerprint,
            removed_ms: now_ms,
        });
        Ok(k)
    }

    /// Whether `entry` vouches for an envelope with `header`: it speaks for the
    /// header's source host, and if retired, the envelope was created before.
    ///
    /// # Errors
    /// Why not, and a hint.
    pub fn vouches(entry: &TrustedKey, header: &Header) -> Result<(), (String, String)> {
        if entry.host != header.source_host {
            return Err((
                format!(
                    "key {} is trusted for host {}, but the envelope says it was sealed on {}",
                    entry.fingerprint, entry.host, header.source_host
                ),
                "a key vouches only for its own host's envelopes; trust the sealing host's key"
                    .into(),
            ));
        }
        if let Some(r) = entry.retired_ms
            && header.created_ms >= r
        {
            return Err((
                format!(
                    "key {} of host {} was retired at {r} ms, and the envelope was created at {} ms, after that",
                    entry.fingerprint, entry.host, header.created_ms
                ),
                format!(
                    "a retired key vouches only for envelopes made before its rotation; trust {}'s current key",
                    entry.host
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> HostKey {
        HostKey::from_seed("host1", [seed; 32], 5).expect("key")
    }

    #[test]
    fn key_file_round_trips_and_never_shows_the_seed() {
        let k = key(9);
        let text = k.to_file_text();
        let back = HostKey::from_file_text(text.expose()).expect("parse");
        assert_eq!(back.public(), k.public());
        assert_eq!(back.host_id(), "host1");
        assert_eq!(back.created_ms(), 5);
        let seed_hex = hex(&[9; 32]);
        assert!(text.expose().contains(&seed_hex));
        assert!(!format!("{k:?}").contains(&seed_hex));
        assert!(!format!("{text:?}").contains(&seed_hex));
        assert!(!k.public_line().contains(&seed_hex));
    }

    #[test]
    fn bad_key_files_name_the_line() {
        for (text, line) in [
            ("", 1),
            ("devfence-host-key-v1\n", 2),
            ("devfence-host-key-v1\nhost -x\ncreated 1\nseed 00\n", 4),
            ("devfence-host-key-v1\nhost h\ncreated x\nseed 00\n", 3),
            (
                &format!(
                    "devfence-host-key-v1\nhost -x\ncreated 1\nseed {}\n",
                    hex(&[1; 32])
                ),
                2,
            ),
            (
                &format!(
                    "devfence-host-key-v1\nhost h\ncreated 1\nseed {}\nmore\n",
                    hex(&[1; 32])
                ),
                5,
            ),
        ] {
            match HostKey::from_file_text(text) {
                Err(KeyError::BadKeyFile { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn public_line_round_trips() {
        let k = key(1);
        let line: PublicLine = k.public_line().parse().expect("line");
        assert_eq!(line.key, k.public());
        assert_eq!(line.host, "host1");
        assert!("ssh-ed25519 AAAA host".parse::<PublicLine>().is_err());
        assert!(
            format!("{PUBLIC_LINE_TAG} {} ", k.public())
                .parse::<PublicLine>()
                .is_err()
        );
        // Not a point on the curve.
        let mut bad = [0u8; 32];
        bad[0] = 2;
        bad[31] = 0x80;
        assert!(
            format!("{PUBLIC_LINE_TAG} {} h", hex(&bad))
                .parse::<PublicLine>()
                .is_err()
        );
    }

    #[test]
    fn rotation_retires_the_old_key_and_removal_forgets_it() {
        let mut ring = Keyring::new();
        let a = key(1).public();
        let b = key(2).public();
        let c = HostKey::from_seed("host2", [3; 32], 0).expect("k").public();
        ring.trust("host1", a, 100).expect("a");
        ring.trust("host2", c, 100).expect("c");
        assert!(matches!(
            ring.trust("host1", a, 150),
            Err(KeyringError::AlreadyTrusted { .. })
        ));
        let ch = ring.trust("host1", b, 200).expect("b");
        assert_eq!(ch.retired, Some(a.fingerprint()));
        assert_eq!(ring.lookup(&a).expect("a").retired_ms, Some(200));
        assert_eq!(ring.lookup(&c).expect("c").retired_ms, None);
        assert!(matches!(
            ring.trust("host1", a, 300),
            Err(KeyringError::Retired { .. })
        ));
        assert_eq!(
            ring.lookup(&a).expect("a").status(200 + MAX_TTL_MS - 1),
            "retired"
        );
        assert_eq!(
            ring.lookup(&a).expect("a").status(200 + MAX_TTL_MS),
            "spent"
        );
        let text = ring.render();
        assert_eq!(Keyring::parse(&text).expect("parse"), ring);
        ring.remove(&a.fingerprint()).expect("remove");
        assert!(ring.lookup(&a).is_none());
        assert!(matches!(
            ring.remove(&a.fingerprint()),
            Err(KeyringError::Unknown(_))
        ));
    }

    /// issue 18 item 12: a removed (compromised) key is remembered and not trusted
    /// again unless the caller allows it; the memory survives the file.
    #[test]
    fn a_removed_key_is_remembered_and_not_trusted_again_silently() {
        let mut ring = Keyring::new();
        let a = key(1).public();
        ring.trust("host1", a, 100).expect("a");
        ring.remove_at(&a.fingerprint(), 150).expect("remove");
        let mut ring = Keyring::parse(&ring.render()).expect("round trip");
        assert_eq!(ring.removed_at(&a).expect("remembered").removed_ms, 150);
        let e = ring.trust("host1", a, 200).expect_err("removed");
        assert!(
            matches!(
                e,
                KeyringError::Removed {
                    removed_ms: 150,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("--force"), "{e}");
        ring.trust_with("host1", a, 200, true).expect("forced");
        assert!(ring.lookup(&a).is_some());
        assert!(Keyring::parse(&ring.render()).is_ok());
    }

    #[test]
    fn inconsistent_keyrings_are_refused() {
        let mut ring = Keyring::new();
        ring.trust("host1", key(1).public(), 1).expect("t");
        let mut bad = ring.clone();
        bad.keys[0].fingerprint = key(2).public().fingerprint();
        assert!(Keyring::parse(&bad.render()).is_err());
        let mut bad = ring.clone();
        bad.keys.push(TrustedKey {
            host: "host1".into(),
            key: key(2).public(),
            fingerprint: key(2).public().fingerprint(),
            added_ms: 2,
            retired_ms: None,
        });
        assert!(
            Keyring::parse(&bad.render()).is_err(),
            "two active keys for one host"
        );
        let mut bad = ring.clone();
        bad.format = 2;
        assert!(Keyring::parse(&bad.render()).is_err());
        assert!(Keyring::parse("{").is_err());
        assert!(Keyring::parse(r#"{"format":1,"keys":[],"extra":1}"#).is_err());
        assert!(Keyring::parse(&" ".repeat(MAX_KEYRING + 1)).is_err());
    }
}
