//! The envelope format, byte by byte (`docs/state-envelopes.md` is the reference).
//!
//! ```text
//! offset      size  field
//! 0           8     magic 89 44 46 53 45 41 4c 0a ("\x89DFSEAL\n")
//! 8           2     format version, u16 big-endian: 1
//! 10          2     flags, u16: 0 (reserved; anything else is refused)
//! 12          4     header length H, u32: 1 ..= MAX_HEADER
//! 16          8     payload length P, u64: 0 ..= MAX_PAYLOAD
//! 24          H     header: fields tag u8 ‖ length u16 ‖ value, tags strictly ascending
//! 24+H        P     payload: the device state, opaque
//! 24+H+P      32    signer public key (ed25519)
//! 56+H+P      64    ed25519 signature over bytes 0 .. 56+H+P
//! ```
//!
//! The fixed prefix and the trailer are found without reading the header, so the
//! signature is checked before a byte of the header is interpreted. The signature
//! covers everything before it: prefix, header, payload and the signer key.
//!
//! Parsing is split in two: [`Frame::parse`] checks only sizes, magic, version,
//! flags and lengths (bounded, before anything else), and [`Header::decode`]
//! interprets the header once the signature is known good. Both return typed
//! errors naming what is wrong and a hint; neither panics on any input.

use std::fmt;
use std::str::FromStr;

use devfence_model::TenantId;
use sha2::{Digest, Sha256};

use crate::keys::{HostKey, PublicKey};

/// The first eight bytes of every envelope.
pub const MAGIC: [u8; 8] = *b"\x89DFSEAL\n";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the header: magic, version, flags, header length, payload length.
pub const PREFIX_LEN: usize = 24;
/// Bytes after the payload: signer public key and signature.
pub const TRAILER_LEN: usize = 32 + 64;
/// The largest header.
pub const MAX_HEADER: usize = 16 * 1024;
/// The largest payload (device state).
pub const MAX_PAYLOAD: u64 = 256 * 1024 * 1024;
/// The largest envelope: every limit at once.
pub const MAX_ENVELOPE: u64 =
    PREFIX_LEN as u64 + MAX_HEADER as u64 + MAX_PAYLOAD + TRAILER_LEN as u64;
/// The longest an envelope may stay valid: `expires - created`.
pub const MAX_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Why the frame (the bounded outer layer) of an envelope is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Larger than [`MAX_ENVELOPE`]; nothing was read.
    #[error(
        "The envelope is {size} bytes, more than the {max} an envelope may have. \
         Hint: this is not an envelope devfence sealed (device state is at most {MAX_PAYLOAD} bytes)"
    )]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Shorter than its frame says.
    #[error(
        "The envelope is truncated: it is {size} bytes, but {what} needs {need}. \
         Hint: copy the whole file again from the source host's state store"
    )]
    Truncated {
        /// Its size.
        size: u64,
        /// The bytes needed.
        need: u64,
        /// What needs them.
        what: &'static str,
    },
    /// Does not start with [`MAGIC`].
    #[error(
        "This is not a devfence state envelope: it does not start with the magic bytes \
         89 44 46 53 45 41 4c 0a. Hint: give the file `devfence state seal` wrote"
    )]
    BadMagic,
    /// A format version this build does not know.
    #[error(
        "The envelope has format version {found}; this devfence reads version {FORMAT_VERSION} only. \
         Hint: admit it with the devfence release that sealed it, or re-seal it on the source host"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// Reserved flag bits are set.
    #[error(
        "The envelope sets flags {found:#06x}; version {FORMAT_VERSION} defines none. \
         Hint: it was damaged or made by another program; re-seal it on the source host"
    )]
    ReservedFlags {
        /// The flags found.
        found: u16,
    },
    /// The header length is 0 or over [`MAX_HEADER`].
    #[error(
        "The envelope's header length {len} is out of range (1 to {MAX_HEADER}). \
         Hint: it was damaged or made by another program; re-seal it on the source host"
    )]
    HeaderLength {
        /// The length found.
        len: u32,
    },
    /// The payload length is over [`MAX_PAYLOAD`].
    #[error(
        "The envelope's payload length {len} is more than the {MAX_PAYLOAD} bytes device state may have. \
         Hint: it was damaged or made by another program; re-seal it on the source host"
    )]
    PayloadTooLarge {
        /// The length found.
        len: u64,
    },
    /// Bytes after the signature.
    #[error(
        "The envelope is {size} bytes, but its frame ends at {expected}: there are bytes after the signature. \
         Hint: it was damaged or appended to; copy the file again from the source host's state store"
    )]
    TrailingBytes {
        /// Its size.
        size: u64,
        /// Where the frame ends.
        expected: u64,
    },
}

/// Checks an envelope's size before anything is read or parsed.
///
/// # Errors
/// [`FrameError::TooLarge`] over [`MAX_ENVELOPE`].
pub fn check_size(size: u64) -> Result<(), FrameError> {
    if size > MAX_ENVELOPE {
        return Err(FrameError::TooLarge {
            size,
            max: MAX_ENVELOPE,
        });
    }
    Ok(())
}

/// The frame of an envelope: where its parts are. Nothing in the header has been
/// interpreted and nothing has been verified.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    bytes: &'a [u8],
    header_len: usize,
    payload_len: usize,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl<'a> Frame<'a> {
    /// Checks sizes, magic, version, flags and lengths, in that order.
    ///
    /// # Errors
    /// The first [`FrameError`] found.
    pub fn parse(bytes: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let size = bytes.len() as u64;
        check_size(size)?;
        let head = &bytes[..bytes.len().min(MAGIC.len())];
        if head != &MAGIC[..head.len()] {
            return Err(FrameError::BadMagic);
        }
        if bytes.len() < PREFIX_LEN {
            return Err(FrameError::Truncated {
                size,
                need: PREFIX_LEN as u64,
                what: "the fixed prefix (magic, version, flags, lengths)",
            });
        }
        let version = be_u16(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        let flags = be_u16(bytes, 10);
        if flags != 0 {
            return Err(FrameError::ReservedFlags { found: flags });
        }
        let h = be_u32(bytes, 12);
        if h == 0 || h as usize > MAX_HEADER {
            return Err(FrameError::HeaderLength { len: h });
        }
        let p = be_u64(bytes, 16);
        if p > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLarge { len: p });
        }
        // Bounded above by MAX_ENVELOPE, so no overflow.
        let expected = PREFIX_LEN as u64 + u64::from(h) + p + TRAILER_LEN as u64;
        if size < expected {
            return Err(FrameError::Truncated {
                size,
                need: expected,
                what: "its frame (prefix, header, payload, signer key and signature)",
            });
        }
        if size > expected {
            return Err(FrameError::TrailingBytes { size, expected });
        }
        Ok(Frame {
            bytes,
            header_len: h as usize,
            // p <= size, which fits in usize.
            payload_len: usize::try_from(p).unwrap_or(usize::MAX),
        })
    }

    /// The whole envelope.
    #[must_use]
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The header bytes (not interpreted).
    #[must_use]
    pub fn header(&self) -> &'a [u8] {
        &self.bytes[PREFIX_LEN..PREFIX_LEN + self.header_len]
    }

    /// The payload bytes.
    #[must_use]
    pub fn payload(&self) -> &'a [u8] {
        let at = PREFIX_LEN + self.header_len;
        &self.bytes[at..at + self.payload_len]
    }

    /// The payload length the frame declares.
    #[must_use]
    pub fn payload_len(&self) -> u64 {
        self.payload_len as u64
    }

    /// What the signature covers: everything before it.
    #[must_use]
    pub fn signed(&self) -> &'a [u8] {
        &self.bytes[..self.bytes.len() - 64]
    }

    /// Everything before the trailer: prefix, header and payload.
    #[must_use]
    pub fn body(&self) -> &'a [u8] {
        &self.bytes[..self.bytes.len() - TRAILER_LEN]
    }

    /// The signer's public key as embedded (not yet checked to be a valid key).
    #[must_use]
    pub fn signer(&self) -> PublicKey {
        let at = self.bytes.len() - TRAILER_LEN;
        let mut k = [0u8; 32];
        k.copy_from_slice(&self.bytes[at..at + 32]);
        PublicKey(k)
    }

    /// The signature bytes.
    #[must_use]
    pub fn signature(&self) -> [u8; 64] {
        let mut s = [0u8; 64];
        s.copy_from_slice(&self.bytes[self.bytes.len() - 64..]);
        s
    }
}

/// What kind of device a state image is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// A PCI function that is not a VF (a PF, or a function without SR-IOV).
    PciFunction,
    /// An SR-IOV VF of a PF that is not an InfiniBand device.
    PciVf,
    /// An SR-IOV VF of an InfiniBand (mlx5) PF.
    IbVf,
    /// A mediated device.
    Mdev,
}

impl DeviceKind {
    /// Every kind, by code.
    pub const ALL: [DeviceKind; 4] = [
        DeviceKind::PciFunction,
        DeviceKind::PciVf,
        DeviceKind::IbVf,
        DeviceKind::Mdev,
    ];

    /// The byte that encodes it.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            DeviceKind::PciFunction => 1,
            DeviceKind::PciVf => 2,
            DeviceKind::IbVf => 3,
            DeviceKind::Mdev => 4,
        }
    }

    /// The kind with code `c`.
    #[must_use]
    pub fn from_code(c: u8) -> Option<DeviceKind> {
        Self::ALL.into_iter().find(|k| k.code() == c)
    }

    /// Its name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::PciFunction => "pci-function",
            DeviceKind::PciVf => "pci-vf",
            DeviceKind::IbVf => "ib-vf",
            DeviceKind::Mdev => "mdev",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for DeviceKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The ids of a PCI function: vendor:device and subsystem vendor:device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PciIds {
    /// `vendor`.
    pub vendor: u16,
    /// `device`.
    pub device: u16,
    /// `subsystem_vendor`.
    pub subsystem_vendor: u16,
    /// `subsystem_device`.
    pub subsystem_device: u16,
}

impl fmt::Display for PciIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:04x} (subsystem {:04x}:{:04x})",
            self.vendor, self.device, self.subsystem_vendor, self.subsystem_device
        )
    }
}

/// What identifies the device model: PCI ids, or the mdev type and its API.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceIdentity {
    /// A PCI function's ids.
    Pci(PciIds),
    /// A mediated device's type.
    Mdev {
        /// The type id, e.g. `nvidia-63`.
        type_id: String,
        /// The type's `device_api`, e.g. `vfio-pci`.
        device_api: String,
    },
}

impl fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceIdentity::Pci(ids) => ids.fmt(f),
            DeviceIdentity::Mdev {
                type_id,
                device_api,
            } => write!(f, "type {type_id} (device_api {device_api})"),
        }
    }
}

/// What a state image is for: the kind and model of device, its driver and its
/// migration-compatibility string. Sealed on the source, compared on the
/// destination with the destination device as inventoried.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct DeviceDescriptor {
    /// The kind.
    pub kind: DeviceKind,
    /// The model.
    pub identity: DeviceIdentity,
    /// The driver bound to it (`vfio-pci`, a vendor variant such as
    /// `mlx5_vfio_pci`, or the mdev's driver).
    pub driver: String,
    /// The migration-compatibility string, where the device has one
    /// (see [`crate::device`]).
    pub compat: Option<String>,
}

impl fmt::Display for DeviceDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}, driver {}", self.kind, self.identity, self.driver)?;
        if let Some(c) = &self.compat {
            write!(f, ", compat {c:?}")?;
        }
        Ok(())
    }
}

/// A VM's UUID (libvirt's `<uuid>`, kept across migration), lowercase and
/// hyphenated.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmUuid(pub [u8; 16]);

impl FromStr for VmUuid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<devfence_model::MdevUuid>()
            .map(|u| VmUuid(u.0))
            .map_err(|_| {
                format!(
                    "{:?} is not a VM UUID: expected 8-4-4-4-12 hex digits as libvirt's <uuid> \
                     (`virsh domuuid DOMAIN`), e.g. 4b1c5c52-9d4e-4f43-a0d6-1e0f2f3a4b5c",
                    s.chars().take(80).collect::<String>()
                )
            })
    }
}

impl fmt::Display for VmUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        devfence_model::MdevUuid(self.0).fmt(f)
    }
}

impl fmt::Debug for VmUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmUuid({self})")
    }
}

impl serde::Serialize for VmUuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Lowercase hex of `b`.
#[must_use]
pub fn hex(b: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Parses exactly `N` bytes of hex (either case).
#[must_use]
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// The random, single-use identity of one envelope.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 16]);

impl Nonce {
    /// A fresh random nonce.
    ///
    /// # Errors
    /// When the operating system has no randomness to give.
    pub fn random() -> Result<Nonce, getrandom::Error> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b)?;
        Ok(Nonce(b))
    }
}

impl fmt::Display for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({self})")
    }
}

impl serde::Serialize for Nonce {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The digest of `data`.
    #[must_use]
    pub fn of(data: &[u8]) -> Sha256Digest {
        let mut out = [0u8; 32];
        out.copy_from_slice(&Sha256::digest(data));
        Sha256Digest(out)
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl serde::Serialize for Sha256Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The id of an envelope: the first 16 bytes of the SHA-256 of all its bytes, in
/// hex. Names its file in the state store.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnvelopeId(pub [u8; 16]);

impl EnvelopeId {
    /// The id of the envelope `bytes`.
    #[must_use]
    pub fn of(bytes: &[u8]) -> EnvelopeId {
        let d = Sha256::digest(bytes);
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        EnvelopeId(out)
    }
}

impl FromStr for EnvelopeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        unhex::<16>(s).map(EnvelopeId).ok_or_else(|| {
            format!(
                "{:?} is not an envelope id: expected 32 hex digits",
                s.chars().take(80).collect::<String>()
            )
        })
    }
}

impl fmt::Display for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvelopeId({self})")
    }
}

impl serde::Serialize for EnvelopeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The header: what the state is for, who made it, for whom, until when.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Header {
    /// The device it is for.
    pub device: DeviceDescriptor,
    /// The host that sealed it (its key's host id).
    pub source_host: String,
    /// The tenant whose VM the state is of.
    pub tenant: TenantId,
    /// The VM.
    pub vm: VmUuid,
    /// When it was sealed (ms since the Unix epoch).
    pub created_ms: u64,
    /// When it stops being admissible (ms since the Unix epoch).
    pub expires_ms: u64,
    /// Its single-use identity.
    pub nonce: Nonce,
    /// The payload's length.
    pub payload_len: u64,
    /// The payload's SHA-256.
    pub payload_sha256: Sha256Digest,
}

/// The header fields, by tag. Each appears at most once, in this order.
mod tag {
    pub const KIND: u8 = 0x01;
    pub const PCI_IDS: u8 = 0x02;
    pub const MDEV_TYPE: u8 = 0x03;
    pub const DEVICE_API: u8 = 0x04;
    pub const DRIVER: u8 = 0x05;
    pub const COMPAT: u8 = 0x06;
    pub const SOURCE_HOST: u8 = 0x07;
    pub const TENANT: u8 = 0x08;
    pub const VM: u8 = 0x09;
    pub const CREATED: u8 = 0x0a;
    pub const EXPIRES: u8 = 0x0b;
    pub const NONCE: u8 = 0x0c;
    pub const PAYLOAD_LEN: u8 = 0x0d;
    pub const PAYLOAD_SHA256: u8 = 0x0e;

    pub fn name(t: u8) -> &'static str {
        match t {
            KIND => "kind",
            PCI_IDS => "pci-ids",
            MDEV_TYPE => "mdev-type",
            DEVICE_API => "device-api",
            DRIVER => "driver",
            COMPAT => "compat",
            SOURCE_HOST => "source-host",
            TENANT => "tenant",
            VM => "vm",
            CREATED => "created",
            EXPIRES => "expires",
            NONCE => "nonce",
            PAYLOAD_LEN => "payload-length",
            PAYLOAD_SHA256 => "payload-sha256",
            _ => "unknown",
        }
    }
}

/// Why a header (or what it says about the payload) is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// A field's tag is not one of version 1.
    #[error(
        "The header has an unknown field (tag {tag:#04x}) at byte {offset}. \
         Hint: format version 1 defines tags 0x01 to 0x0e; re-seal with this devfence"
    )]
    UnknownField {
        /// The tag.
        tag: u8,
        /// Where in the header.
        offset: usize,
    },
    /// A field repeats or comes out of order.
    #[error(
        "The header's field {field} (tag {tag:#04x}) at byte {offset} repeats or is out of order. \
         Hint: each field appears once, in ascending tag order; re-seal with this devfence"
    )]
    FieldOrder {
        /// The field.
        field: &'static str,
        /// Its tag.
        tag: u8,
        /// Where in the header.
        offset: usize,
    },
    /// A field runs past the end of the header.
    #[error(
        "The header's field at byte {offset} runs past the end of the header. \
         Hint: the header is damaged; re-seal on the source host"
    )]
    FieldTruncated {
        /// Where in the header.
        offset: usize,
    },
    /// A field has the wrong length.
    #[error(
        "The header's field {field} is {len} bytes; it must be {expected}. \
         Hint: the header is damaged; re-seal on the source host"
    )]
    FieldLength {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// What it must be.
        expected: &'static str,
    },
    /// A required field is missing.
    #[error(
        "The header has no {field} field. Hint: an envelope for a {kind} carries it; re-seal with this devfence"
    )]
    MissingField {
        /// The field.
        field: &'static str,
        /// The kind of device that needs it.
        kind: &'static str,
    },
    /// A field that this kind of device must not carry.
    #[error(
        "The header carries {field}, which an envelope for a {kind} does not have. \
         Hint: the header contradicts itself; re-seal on the source host"
    )]
    UnexpectedField {
        /// The field.
        field: &'static str,
        /// The kind.
        kind: &'static str,
    },
    /// A text field is not acceptable text.
    #[error("The header's {field} {value:?} is invalid: {reason}. Hint: {hint}")]
    BadText {
        /// The field.
        field: &'static str,
        /// The value (lossy, cut to 80 characters).
        value: String,
        /// Why.
        reason: String,
        /// What to do.
        hint: &'static str,
    },
    /// The device kind code is unknown.
    #[error(
        "The header's device kind {code} is unknown (1 pci-function, 2 pci-vf, 3 ib-vf, 4 mdev). \
         Hint: re-seal with this devfence"
    )]
    BadKind {
        /// The code.
        code: u8,
    },
    /// `expires` is not after `created`, or too far after it.
    #[error(
        "The envelope is valid from {created_ms} to {expires_ms} (ms since the epoch): {reason}. \
         Hint: seal again with a --ttl of at most 7 days"
    )]
    BadValidity {
        /// Created.
        created_ms: u64,
        /// Expires.
        expires_ms: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The header's payload length differs from the frame's.
    #[error(
        "The header says the payload is {header} bytes, but the frame carries {frame}. \
         Hint: the envelope contradicts itself; re-seal on the source host"
    )]
    PayloadLength {
        /// What the header says.
        header: u64,
        /// What the frame carries.
        frame: u64,
    },
    /// The payload's SHA-256 differs from the header's.
    #[error(
        "The payload's SHA-256 is {actual}, but the header says {header}. \
         Hint: the envelope contradicts itself; re-seal on the source host"
    )]
    PayloadHash {
        /// What the header says.
        header: Sha256Digest,
        /// What the payload hashes to.
        actual: Sha256Digest,
    },
    /// The header would be larger than [`MAX_HEADER`] (when sealing).
    #[error(
        "The header would be {len} bytes, more than {MAX_HEADER}. Hint: shorten the compatibility string"
    )]
    HeaderTooLarge {
        /// Its length.
        len: usize,
    },
    /// The payload is larger than [`MAX_PAYLOAD`] (when sealing).
    #[error(
        "The device state is {len} bytes, more than the {MAX_PAYLOAD} an envelope may carry. \
         Hint: this state cannot be sealed; check the input file"
    )]
    PayloadTooLarge {
        /// Its length.
        len: u64,
    },
}

/// The rules for an identifier-like text field.
struct TextRule {
    max: usize,
    spaces: bool,
    hint: &'static str,
}

const ID_RULE: TextRule = TextRule {
    max: 64,
    spaces: false,
    hint: "it names a driver, type or host: printable ASCII without spaces",
};
const COMPAT_RULE: TextRule = TextRule {
    max: 256,
    spaces: true,
    hint: "a compatibility string is printable ASCII",
};

fn check_text(field: &'static str, v: &[u8], rule: &TextRule) -> Result<String, FormatError> {
    let bad = |reason: String| FormatError::BadText {
        field,
        value: String::from_utf8_lossy(v).chars().take(80).collect(),
        reason,
        hint: rule.hint,
    };
    if v.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if v.len() > rule.max {
        return Err(bad(format!("it is longer than {} bytes", rule.max)));
    }
    let ok = |b: u8| b.is_ascii_graphic() || (rule.spaces && b == b' ');
    if let Some(b) = v.iter().find(|&&b| !ok(b)) {
        return Err(bad(format!("it contains byte {b:#04x}")));
    }
    if rule.spaces && (v[0] == b' ' || v[v.len() - 1] == b' ') {
        return Err(bad("it starts or ends with a space".into()));
    }
    // All bytes are ASCII, so this cannot fail.
    Ok(String::from_utf8_lossy(v).into_owned())
}

/// Checks a host id: 1-64 characters of letters, digits, `.`, `_`, `-`, starting
/// with a letter or digit (a host name).
///
/// # Errors
/// Why it is not one.
pub fn check_host_id(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a host id: expected 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            s.chars().take(80).collect::<String>()
        ))
    }
}

fn fixed<const N: usize>(
    field: &'static str,
    v: &[u8],
    expected: &'static str,
) -> Result<[u8; N], FormatError> {
    <[u8; N]>::try_from(v).map_err(|_| FormatError::FieldLength {
        field,
        len: v.len(),
        expected,
    })
}

fn put(out: &mut Vec<u8>, t: u8, v: &[u8]) -> Result<(), FormatError> {
    let len = u16::try_from(v.len()).map_err(|_| FormatError::HeaderTooLarge { len: v.len() })?;
    out.push(t);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(v);
    Ok(())
}

impl Header {
    /// Encodes the header. Everything [`Header::decode`] would refuse is refused
    /// here too, so devfence never signs what it would not read.
    ///
    /// # Errors
    /// The [`FormatError`] decoding would give.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::with_capacity(256);
        put(&mut out, tag::KIND, &[self.device.kind.code()])?;
        match &self.device.identity {
            DeviceIdentity::Pci(ids) => {
                let mut v = Vec::with_capacity(8);
                for x in [
                    ids.vendor,
                    ids.device,
                    ids.subsystem_vendor,
                    ids.subsystem_device,
                ] {
                    v.extend_from_slice(&x.to_be_bytes());
                }
                put(&mut out, tag::PCI_IDS, &v)?;
            }
            DeviceIdentity::Mdev {
                type_id,
                device_api,
            } => {
                put(&mut out, tag::MDEV_TYPE, type_id.as_bytes())?;
                put(&mut out, tag::DEVICE_API, device_api.as_bytes())?;
            }
        }
        put(&mut out, tag::DRIVER, self.device.driver.as_bytes())?;
        if let Some(c) = &self.device.compat {
            put(&mut out, tag::COMPAT, c.as_bytes())?;
        }
        put(&mut out, tag::SOURCE_HOST, self.source_host.as_bytes())?;
        put(&mut out, tag::TENANT, self.tenant.as_str().as_bytes())?;
        put(&mut out, tag::VM, &self.vm.0)?;
        put(&mut out, tag::CREATED, &self.created_ms.to_be_bytes())?;
        put(&mut out, tag::EXPIRES, &self.expires_ms.to_be_bytes())?;
        put(&mut out, tag::NONCE, &self.nonce.0)?;
        put(&mut out, tag::PAYLOAD_LEN, &self.payload_len.to_be_bytes())?;
        put(&mut out, tag::PAYLOAD_SHA256, &self.payload_sha256.0)?;
        if out.len() > MAX_HEADER {
            return Err(FormatError::HeaderTooLarge { len: out.len() });
        }
        // The same checks as reading: never sign what would be refused.
        let back = Header::decode(&out)?;
        if &back != self {
            return Err(FormatError::BadText {
                field: "header",
                value: String::new(),
                reason: "it does not read back as written".into(),
                hint: "this is a bug in devfence; please report it",
            });
        }
        Ok(out)
    }

    /// Decodes and validates a header.
    ///
    /// # Errors
    /// The first [`FormatError`] found.
    pub fn decode(b: &[u8]) -> Result<Header, FormatError> {
        let mut fields: [Option<&[u8]>; 15] = [None; 15];
        let mut at = 0usize;
        let mut last = 0u8;
        while at < b.len() {
            if b.len() - at < 3 {
                return Err(FormatError::FieldTruncated { offset: at });
            }
            let t = b[at];
            let len = usize::from(be_u16(b, at + 1));
            if !(tag::KIND..=tag::PAYLOAD_SHA256).contains(&t) {
                return Err(FormatError::UnknownField { tag: t, offset: at });
            }
            if t <= last {
                return Err(FormatError::FieldOrder {
                    field: tag::name(t),
                    tag: t,
                    offset: at,
                });
            }
            let start = at + 3;
            if b.len() - start < len {
                return Err(FormatError::FieldTruncated { offset: at });
            }
            fields[usize::from(t)] = Some(&b[start..start + len]);
            last = t;
            at = start + len;
        }
        let get = |t: u8| fields[usize::from(t)];
        let kind_b = get(tag::KIND).ok_or(FormatError::MissingField {
            field: "kind",
            kind: "device",
        })?;
        let [code] = fixed::<1>("kind", kind_b, "1 byte")?;
        let kind = DeviceKind::from_code(code).ok_or(FormatError::BadKind { code })?;
        let need = |t: u8| {
            get(t).ok_or(FormatError::MissingField {
                field: tag::name(t),
                kind: kind.name(),
            })
        };
        let forbid = |t: u8| match get(t) {
            Some(_) => Err(FormatError::UnexpectedField {
                field: tag::name(t),
                kind: kind.name(),
            }),
            None => Ok(()),
        };
        let identity = if kind == DeviceKind::Mdev {
            forbid(tag::PCI_IDS)?;
            DeviceIdentity::Mdev {
                type_id: check_text("mdev-type", need(tag::MDEV_TYPE)?, &ID_RULE)?,
                device_api: check_text("device-api", need(tag::DEVICE_API)?, &ID_RULE)?,
            }
        } else {
            forbid(tag::MDEV_TYPE)?;
            forbid(tag::DEVICE_API)?;
            let v = fixed::<8>("pci-ids", need(tag::PCI_IDS)?, "8 bytes")?;
            DeviceIdentity::Pci(PciIds {
                vendor: be_u16(&v, 0),
                device: be_u16(&v, 2),
                subsystem_vendor: be_u16(&v, 4),
                subsystem_device: be_u16(&v, 6),
            })
        };
        let driver = check_text("driver", need(tag::DRIVER)?, &ID_RULE)?;
        let compat = get(tag::COMPAT)
            .map(|v| check_text("compat", v, &COMPAT_RULE))
            .transpose()?;
        let host_b = need(tag::SOURCE_HOST)?;
        let source_host = check_text("source-host", host_b, &ID_RULE)?;
        check_host_id(&source_host).map_err(|reason| FormatError::BadText {
            field: "source-host",
            value: source_host.clone(),
            reason,
            hint: "the source host id comes from its host key (`devfence keys init --host-id`)",
        })?;
        let tenant_s = check_text("tenant", need(tag::TENANT)?, &ID_RULE)?;
        let tenant: TenantId =
            tenant_s
                .parse()
                .map_err(|e: devfence_model::ParseError| FormatError::BadText {
                    field: "tenant",
                    value: tenant_s.clone(),
                    reason: e.reason,
                    hint: "a tenant id is what `devfence tenant add` accepts",
                })?;
        let vm = VmUuid(fixed::<16>("vm", need(tag::VM)?, "16 bytes (a UUID)")?);
        let created_ms = u64::from_be_bytes(fixed::<8>("created", need(tag::CREATED)?, "8 bytes")?);
        let expires_ms = u64::from_be_bytes(fixed::<8>("expires", need(tag::EXPIRES)?, "8 bytes")?);
        let nonce = Nonce(fixed::<16>("nonce", need(tag::NONCE)?, "16 bytes")?);
        let payload_len = u64::from_be_bytes(fixed::<8>(
            "payload-length",
            need(tag::PAYLOAD_LEN)?,
            "8 bytes",
        )?);
        let payload_sha256 = Sha256Digest(fixed::<32>(
            "payload-sha256",
            need(tag::PAYLOAD_SHA256)?,
            "32 bytes",
        )?);
        let validity = |reason| FormatError::BadValidity {
            created_ms,
            expires_ms,
            reason,
        };
        if expires_ms <= created_ms {
            return Err(validity("it expires before it is created"));
        }
        if expires_ms - created_ms > MAX_TTL_MS {
            return Err(validity(
                "that is longer than the 7 days an envelope may live",
            ));
        }
        if payload_len > MAX_PAYLOAD {
            return Err(FormatError::PayloadTooLarge { len: payload_len });
        }
        Ok(Header {
            device: DeviceDescriptor {
                kind,
                identity,
                driver,
                compat,
            },
            source_host,
            tenant,
            vm,
            created_ms,
            expires_ms,
            nonce,
            payload_len,
            payload_sha256,
        })
    }

    /// Checks that the payload is the one the header describes.
    ///
    /// # Errors
    /// [`FormatError::PayloadLength`] or [`FormatError::PayloadHash`].
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), FormatError> {
        if self.payload_len != payload.len() as u64 {
            return Err(FormatError::PayloadLength {
                header: self.payload_len,
                frame: payload.len() as u64,
            });
        }
        let actual = Sha256Digest::of(payload);
        if actual != self.payload_sha256 {
            return Err(FormatError::PayloadHash {
                header: self.payload_sha256,
                actual,
            });
        }
        Ok(())
    }
}

/// What the sealing host binds a state image to; the rest of the header (source
/// host, payload length and hash) comes from the key and the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The device it is for, as inventoried on the source.
    pub device: DeviceDescriptor,
    /// The tenant holding the device.
    pub tenant: TenantId,
    /// The VM.
    pub vm: VmUuid,
    /// Now (ms since the epoch).
    pub created_ms: u64,
    /// When it stops being admissible.
    pub expires_ms: u64,
    /// A fresh nonce.
    pub nonce: Nonce,
}

/// Seals `payload` for `binding` with `key`: the whole envelope.
///
/// # Errors
/// A [`FormatError`] if the header or payload would be refused on reading.
pub fn seal(key: &HostKey, binding: Binding, payload: &[u8]) -> Result<Vec<u8>, FormatError> {
    let payload_len = payload.len() as u64;
    if payload_len > MAX_PAYLOAD {
        return Err(FormatError::PayloadTooLarge { len: payload_len });
    }
    let header = Header {
        device: binding.device,
        source_host: key.host_id().to_owned(),
        tenant: binding.tenant,
        vm: binding.vm,
        created_ms: binding.created_ms,
        expires_ms: binding.expires_ms,
        nonce: binding.nonce,
        payload_len,
        payload_sha256: Sha256Digest::of(payload),
    };
    let h = header.encode()?;
    let mut body = Vec::with_capacity(PREFIX_LEN + h.len() + payload.len() + TRAILER_LEN);
    body.extend_from_slice(&MAGIC);
    body.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    body.extend_from_slice(&0u16.to_be_bytes());
    // h.len() <= MAX_HEADER, checked by encode.
    body.extend_from_slice(&u32::try_from(h.len()).unwrap_or(u32::MAX).to_be_bytes());
    body.extend_from_slice(&payload_len.to_be_bytes());
    body.extend_from_slice(&h);
    body.extend_from_slice(payload);
    Ok(sign_body(key, body))
}

/// Appends the signer key and the signature over `body ‖ key` to `body`: the
/// last step of [`seal`], public so tests and tools can re-sign a body.
#[must_use]
pub fn sign_body(key: &HostKey, mut body: Vec<u8>) -> Vec<u8> {
    body.extend_from_slice(&key.public().0);
    let sig = key.sign(&body);
    body.extend_from_slice(&sig);
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn header() -> Header {
        Header {
            device: DeviceDescriptor {
                kind: DeviceKind::IbVf,
                identity: DeviceIdentity::Pci(PciIds {
                    vendor: 0x15b3,
                    device: 0x101c,
                    subsystem_vendor: 0x15b3,
                    subsystem_device: 0x0061,
                }),
                driver: "vfio-pci".into(),
                compat: Some("pf 15b3:101b".into()),
            },
            source_host: "host1".into(),
            tenant: "acme".parse().expect("tenant"),
            vm: "4b1c5c52-9d4e-4f43-a0d6-1e0f2f3a4b5c".parse().expect("vm"),
            created_ms: 1_700_000_000_000,
            expires_ms: 1_700_003_600_000,
            nonce: Nonce([7; 16]),
            payload_len: 5,
            payload_sha256: Sha256Digest::of(b"state"),
        }
    }

    #[test]
    fn header_round_trips_and_is_canonical() {
        let h = header();
        let b = h.encode().expect("encode");
        assert_eq!(Header::decode(&b).expect("decode"), h);
        let mut m = h.clone();
        m.device = DeviceDescriptor {
            kind: DeviceKind::Mdev,
            identity: DeviceIdentity::Mdev {
                type_id: "nvidia-63".into(),
                device_api: "vfio-pci".into(),
            },
            driver: "vfio_mdev".into(),
            compat: Some("parent 10de:1eb8; type GRID T4-1B".into()),
        };
        let b = m.encode().expect("encode mdev");
        assert_eq!(Header::decode(&b).expect("decode"), m);
    }

    #[test]
    fn header_fields_are_strict() {
        let b = header().encode().expect("encode");
        // Unknown tag.
        let mut x = b.clone();
        x.extend_from_slice(&[0x0f, 0, 0]);
        assert!(matches!(
            Header::decode(&x),
            Err(FormatError::UnknownField { tag: 0x0f, .. })
        ));
        // A repeated field.
        let mut x = b.clone();
        x.extend_from_slice(&[0x0e, 0, 0]);
        assert!(matches!(
            Header::decode(&x),
            Err(FormatError::FieldOrder {
                field: "payload-sha256",
                ..
            })
        ));
        // Cut inside a field.
        assert!(matches!(
            Header::decode(&b[..b.len() - 1]),
            Err(FormatError::FieldTruncated { .. })
        ));
        // A missing field: drop the last one (payload-sha256, 3 + 32 bytes).
        assert!(matches!(
            Header::decode(&b[..b.len() - 35]),
            Err(FormatError::MissingField {
                field: "payload-sha256",
                ..
            })
        ));
        // An empty header.
        assert!(matches!(
            Header::decode(&[]),
            Err(FormatError::MissingField { field: "kind", .. })
        ));
    }

    #[test]
    fn header_contradictions_are_refused() {
        let mut h = header();
        h.device.kind = DeviceKind::Mdev;
        assert!(matches!(
            h.encode(),
            Err(FormatError::UnexpectedField {
                field: "pci-ids",
                ..
            })
        ));
        let mut h = header();
        h.expires_ms = h.created_ms;
        assert!(matches!(h.encode(), Err(FormatError::BadValidity { .. })));
        h.expires_ms = h.created_ms + MAX_TTL_MS + 1;
        assert!(matches!(h.encode(), Err(FormatError::BadValidity { .. })));
        let mut h = header();
        h.device.driver = "vfio pci".into();
        assert!(matches!(
            h.encode(),
            Err(FormatError::BadText {
                field: "driver",
                ..
            })
        ));
        let mut h = header();
        h.device.compat = Some(" padded".into());
        assert!(matches!(
            h.encode(),
            Err(FormatError::BadText {
                field: "compat",
                ..
            })
        ));
        let mut h = header();
        h.source_host = "-host".into();
        assert!(matches!(
            h.encode(),
            Err(FormatError::BadText {
                field: "source-host",
                ..
            })
        ));
    }

    #[test]
    fn payload_is_checked_against_the_header() {
        let h = header();
        assert!(h.check_payload(b"state").is_ok());
        assert!(matches!(
            h.check_payload(b"stat"),
            Err(FormatError::PayloadLength {
                header: 5,
                frame: 4
            })
        ));
        assert!(matches!(
            h.check_payload(b"STATE"),
            Err(FormatError::PayloadHash { .. })
        ));
    }

    fn sealed() -> (HostKey, Vec<u8>) {
        let key = HostKey::from_seed("host1", [3; 32], 0).expect("key");
        let h = header();
        let b = seal(
            &key,
            Binding {
                device: h.device,
                tenant: h.tenant,
                vm: h.vm,
                created_ms: h.created_ms,
                expires_ms: h.expires_ms,
                nonce: h.nonce,
            },
            b"state",
        )
        .expect("seal");
        (key, b)
    }

    #[test]
    fn frame_finds_every_part() {
        let (key, b) = sealed();
        let f = Frame::parse(&b).expect("frame");
        assert_eq!(f.payload(), b"state");
        assert_eq!(f.signer(), key.public());
        assert_eq!(Header::decode(f.header()).expect("header"), header());
        assert_eq!(f.signed().len(), b.len() - 64);
        assert_eq!(f.body().len(), b.len() - 96);
        assert_eq!(&b[..8], b"\x89DFSEAL\n");
    }

    #[test]
    fn frame_refusals_name_their_reason() {
        let (_k, b) = sealed();
        assert_eq!(
            Frame::parse(&[]).err(),
            Some(FrameError::Truncated {
                size: 0,
                need: 24,
                what: "the fixed prefix (magic, version, flags, lengths)"
            })
        );
        assert!(matches!(
            Frame::parse(&b[..5]),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            Frame::parse(&b[..b.len() - 1]),
            Err(FrameError::Truncated { .. })
        ));
        let mut x = b.clone();
        x.push(0);
        assert!(matches!(
            Frame::parse(&x),
            Err(FrameError::TrailingBytes { .. })
        ));
        let mut x = b.clone();
        x[0] = b'P';
        assert_eq!(Frame::parse(&x).err(), Some(FrameError::BadMagic));
        let mut x = b.clone();
        x[9] = 2;
        assert_eq!(
            Frame::parse(&x).err(),
            Some(FrameError::UnsupportedVersion { found: 2 })
        );
        let mut x = b.clone();
        x[11] = 1;
        assert_eq!(
            Frame::parse(&x).err(),
            Some(FrameError::ReservedFlags { found: 1 })
        );
        let mut x = b.clone();
        x[12..16].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            Frame::parse(&x).err(),
            Some(FrameError::HeaderLength { len: 0 })
        );
        let mut x = b.clone();
        x[12..16].copy_from_slice(&(MAX_HEADER as u32 + 1).to_be_bytes());
        assert!(matches!(
            Frame::parse(&x),
            Err(FrameError::HeaderLength { .. })
        ));
        let mut x = b.clone();
        x[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        assert!(matches!(
            Frame::parse(&x),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        let mut x = b;
        x[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            Frame::parse(&x),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            check_size(MAX_ENVELOPE + 1),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(check_size(MAX_ENVELOPE).is_ok());
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        // A buffer of zeros (not even the magic) larger than the limit: the size
        // check comes first, so the reason is its size, not its magic.
        let big = vec![0u8; usize::try_from(MAX_ENVELOPE).expect("usize") + 1];
        assert!(matches!(
            Frame::parse(&big),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn ids_and_hex_round_trip() {
        let id = EnvelopeId::of(b"x");
        assert_eq!(id.to_string().parse::<EnvelopeId>().expect("id"), id);
        assert!("xyz".parse::<EnvelopeId>().is_err());
        assert_eq!(unhex::<2>("aBcd"), Some([0xab, 0xcd]));
        assert_eq!(unhex::<2>("abc"), None);
        assert_eq!(unhex::<1>("g0"), None);
        let vm: VmUuid = "4B1C5C52-9D4E-4F43-A0D6-1E0F2F3A4B5C".parse().expect("vm");
        assert_eq!(vm.to_string(), "4b1c5c52-9d4e-4f43-a0d6-1e0f2f3a4b5c");
        assert!("web1".parse::<VmUuid>().is_err());
        assert!(check_host_id("host-1.lab").is_ok());
        assert!(check_host_id("").is_err());
        assert!(check_host_id("a b").is_err());
    }
}
