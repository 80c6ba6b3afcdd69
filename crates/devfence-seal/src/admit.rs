//! The admission decision: whether an envelope's state may enter a destination
//! device, and if not, the first reason why.
//!
//! The checks run in this order; the first that fails is the refusal, and the
//! rest are not reached:
//!
//! | # | check | refused when |
//! |---|---|---|
//! | 0 | `frame` | over the size limit, truncated, not an envelope, an unknown version, reserved flags, lengths out of range, trailing bytes |
//! | 1 | `signature` | the embedded signer key is not a valid ed25519 key, or the signature over everything before it does not verify under that key |
//! | 2 | `trusted-key` | the signer key is not in this host's keyring; or it is, but for another host than the header names, or it was retired before the envelope was created |
//! | 3 | `format` | the header does not decode (unknown or repeated fields, bad lengths, bad text, contradictions), or the payload is not the one it describes |
//! | 4 | `device` | the destination device is not of the same kind and model, on the same driver, with the same compatibility string (or cannot be read) |
//! | 5 | `tenant` | the destination device is not assigned to the envelope's tenant, or is but not yet `Ready`/`Active` (its gates have not all passed) |
//! | 6 | `vm` | the admission is for another VM, or the ledger reserves the device for another VM |
//! | 7 | `single-use` | the envelope's nonce was admitted before (a replay), or the nonce ledger cannot be read, or the envelope expired at or before the ledger's nonce horizon (its nonce may have been pruned) |
//! | 8 | `expiry` | the envelope has expired, or was made more than [`MAX_CLOCK_SKEW_MS`] in this host's future |
//!
//! `frame` is the bounded parsing needed to find the signature: it interprets no
//! header byte. The signature is checked with the key embedded in the envelope,
//! so "the bytes were changed" (`signature`) and "the bytes are intact but their
//! signer is not trusted here" (`trusted-key`) are told apart. Step 2 reads the
//! header only when the key is in the keyring, and only to check the key's host
//! binding and retirement; a header that does not decode is `format`'s refusal.

use std::fmt;

use devfence_model::{DeviceId, TenantId};
use ed25519_dalek::Signature;

use crate::device::{DescribeError, compare};
use crate::format::{EnvelopeId, Frame, Header, Nonce, VmUuid};
use crate::keys::{Keyring, PublicKey, TrustedKey};

/// How far in this host's future an envelope's creation time may be.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// One check of the admission, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// Size, magic, version, flags, lengths.
    Frame,
    /// The signature under the embedded key.
    Signature,
    /// The key is in the keyring and vouches for this envelope.
    TrustedKey,
    /// The header decodes and describes the payload.
    Format,
    /// The destination device is compatible.
    Device,
    /// The destination device is the envelope tenant's.
    Tenant,
    /// The admission is for the envelope's VM.
    Vm,
    /// The envelope was never admitted before.
    SingleUse,
    /// The envelope is within its validity.
    Expiry,
}

impl Check {
    /// Every check, in order.
    pub const ALL: [Check; 9] = [
        Check::Frame,
        Check::Signature,
        Check::TrustedKey,
        Check::Format,
        Check::Device,
        Check::Tenant,
        Check::Vm,
        Check::SingleUse,
        Check::Expiry,
    ];

    /// Its name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Check::Frame => "frame",
            Check::Signature => "signature",
            Check::TrustedKey => "trusted-key",
            Check::Format => "format",
            Check::Device => "device",
            Check::Tenant => "tenant",
            Check::Vm => "vm",
            Check::SingleUse => "single-use",
            Check::Expiry => "expiry",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an envelope is refused.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    /// The check that failed.
    pub check: Check,
    /// What is wrong.
    pub reason: String,
    /// What to do.
    pub hint: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refused at check {}: {}. Hint: {}",
            self.check, self.reason, self.hint
        )
    }
}

impl Refusal {
    fn new(check: Check, reason: impl Into<String>, hint: impl Into<String>) -> Refusal {
        Refusal {
            check,
            reason: reason.into(),
            hint: hint.into(),
        }
    }

    /// From an error whose message is `Reason. Hint: hint`.
    fn from_error(check: Check, e: &dyn fmt::Display) -> Refusal {
        let s = e.to_string();
        match s.split_once(". Hint: ") {
            Some((r, h)) => Refusal::new(check, r, h.trim_end_matches('.')),
            None => Refusal::new(check, s, "see docs/state-envelopes.md"),
        }
    }
}

/// A previous admission of a nonce, from the nonce ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonceUse {
    /// When (ms since the epoch).
    pub admitted_ms: i64,
    /// To which device.
    pub device: String,
    /// For which VM.
    pub vm: String,
}

/// The destination of an admission: the device as inventoried and as the ledger
/// holds it, and the VM the state is for.
#[derive(Clone, Debug)]
pub struct Destination {
    /// The device.
    pub device: DeviceId,
    /// It as the inventory shows it, or why it cannot be described.
    pub descriptor: Result<crate::format::DeviceDescriptor, DescribeError>,
    /// The tenant the ledger gives it to, if any.
    pub holder: Option<TenantId>,
    /// Whether every gate passed for the holder (`Ready` or `Active`): only
    /// such a device takes state.
    pub ready: bool,
    /// Its ledger state as text (`Ready(acme)`, `Free`, `not managed by devfence`).
    pub state: String,
    /// The VM the ledger reserves it for, if any.
    pub reserved_vm: Option<String>,
    /// The VM the admission is for.
    pub vm: VmUuid,
}

/// What the decision reads besides the envelope.
pub struct Context<'a> {
    /// The trusted keys.
    pub keyring: &'a Keyring,
    /// Now (ms since the epoch).
    pub now_ms: u64,
    /// The destination; `None` when only inspecting (device, tenant and VM are
    /// then not checked).
    pub destination: Option<&'a Destination>,
    /// Looks a nonce up in the nonce ledger.
    pub nonce_use: &'a mut dyn FnMut(&Nonce) -> Result<Option<NonceUse>, String>,
    /// The nonce ledger's horizon (ms since the epoch), if it has one: the
    /// nonces of envelopes that expired at or before it may have been pruned,
    /// so such an envelope whose nonce is not found cannot be proven unused.
    pub nonce_horizon_ms: Option<u64>,
}

/// The result of one check.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum CheckOutcome {
    /// It passed; what it saw.
    Passed {
        /// What was found.
        detail: String,
    },
    /// It failed: the refusal.
    Failed(Refusal),
    /// An earlier check failed.
    NotReached,
    /// It needs a destination, and none was given.
    NotChecked {
        /// Why.
        detail: String,
    },
}

/// Every check's outcome, and what was learnt of the envelope on the way.
#[derive(Clone, Debug)]
pub struct Evaluation<'a> {
    /// The envelope's size.
    pub size: u64,
    /// Its id.
    pub id: EnvelopeId,
    /// Its frame, if it parsed.
    pub frame: Option<Frame<'a>>,
    /// The embedded signer key, if the frame parsed.
    pub signer: Option<PublicKey>,
    /// The keyring's entry for the signer, if any.
    pub signer_entry: Option<TrustedKey>,
    /// The header, once the signature verified and it decoded.
    pub header: Option<Header>,
    /// Each check in order.
    pub checks: Vec<(Check, CheckOutcome)>,
}

impl<'a> Evaluation<'a> {
    /// The refusal, if a check failed.
    #[must_use]
    pub fn refusal(&self) -> Option<&Refusal> {
        self.checks.iter().find_map(|(_, o)| match o {
            CheckOutcome::Failed(r) => Some(r),
            _ => None,
        })
    }

    /// Whether every check ran and passed.
    #[must_use]
    pub fn admissible(&self) -> bool {
        self.checks.len() == Check::ALL.len()
            && self
                .checks
                .iter()
                .all(|(_, o)| matches!(o, CheckOutcome::Passed { .. }))
    }

    /// The payload, if admissible.
    #[must_use]
    pub fn payload(&self) -> Option<&'a [u8]> {
        if self.admissible() {
            self.frame.map(|f| f.payload())
        } else {
            None
        }
    }

    fn pass(&mut self, check: Check, detail: impl Into<String>) {
        self.checks.push((
            check,
            CheckOutcome::Passed {
                detail: detail.into(),
            },
        ));
    }

    fn fail(mut self, r: Refusal) -> Self {
        let check = r.check;
        self.checks.push((check, CheckOutcome::Failed(r)));
        for c in Check::ALL.iter().skip_while(|c| **c != check).skip(1) {
            self.checks.push((*c, CheckOutcome::NotReached));
        }
        self
    }
}

/// `2026-05-17T10:00:00Z` for `ms` since the epoch.
#[must_use]
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Runs every check on `bytes`, in order, stopping at the first failure.
pub fn evaluate<'a>(bytes: &'a [u8], ctx: &mut Context<'_>) -> Evaluation<'a> {
    let mut ev = Evaluation {
        size: bytes.len() as u64,
        id: EnvelopeId::of(bytes),
        frame: None,
        signer: None,
        signer_entry: None,
        header: None,
        checks: Vec::with_capacity(Check::ALL.len()),
    };

    // 0. frame
    let frame = match Frame::parse(bytes) {
        Ok(f) => f,
        Err(e) => return ev.fail(Refusal::from_error(Check::Frame, &e)),
    };
    ev.frame = Some(frame);
    ev.pass(
        Check::Frame,
        format!(
            "format version 1, {} bytes: header {}, payload {}",
            bytes.len(),
            frame.header().len(),
            frame.payload().len()
        ),
    );

    // 1. signature, under the embedded key
    let signer = frame.signer();
    ev.signer = Some(signer);
    let fp = signer.fingerprint();
    let vk = match signer.verifying_key() {
        Ok(k) => k,
        Err(e) => {
            return ev.fail(Refusal::new(
                Check::Signature,
                format!("the embedded signer key {fp} is unusable: {e}"),
                "the envelope was damaged or forged; copy it again from the source host's state store",
            ));
        }
    };
    let sig = Signature::from_bytes(&frame.signature());
    if vk.verify_strict(frame.signed(), &sig).is_err() {
        return ev.fail(Refusal::new(
            Check::Signature,
            format!(
                "the signature does not verify under the embedded key {fp}: the envelope was changed after it was sealed, or damaged"
            ),
            "never edit an envelope; copy it again from the source host's state store, or seal the state again",
        ));
    }
    ev.pass(Check::Signature, format!("valid, by key {fp}"));

    // 2. trusted source key (reads the header only to check the entry's binding)
    let header = Header::decode(frame.header());
    let Some(entry) = ctx.keyring.lookup(&signer).cloned() else {
        let claimed = header.as_ref().map_or(String::new(), |h| {
            format!(" (it says it was sealed on {})", h.source_host)
        });
        return ev.fail(Refusal::new(
            Check::TrustedKey,
            format!(
                "the envelope is signed by key {fp}, which is not in this host's keyring{claimed}"
            ),
            "if the sealing host is a trusted source, add its key: `devfence keys show` there, \
             `devfence keys trust add` here",
        ));
    };
    ev.signer_entry = Some(entry.clone());
    if let Ok(h) = &header
        && let Err((reason, hint)) = Keyring::vouches(&entry, h)
    {
        return ev.fail(Refusal::new(Check::TrustedKey, reason, hint));
    }
    ev.pass(
        Check::TrustedKey,
        match entry.retired_ms {
            None => format!("key {fp} of host {} (active)", entry.host),
            Some(r) => format!("key {fp} of host {} (retired {})", entry.host, utc(r)),
        },
    );

    // 3. format
    let header = match header {
        Ok(h) => h,
        Err(e) => return ev.fail(Refusal::from_error(Check::Format, &e)),
    };
    if let Err(e) = header.check_payload(frame.payload()) {
        ev.header = Some(header);
        return ev.fail(Refusal::from_error(Check::Format, &e));
    }
    ev.header = Some(header.clone());
    ev.pass(
        Check::Format,
        format!(
            "header decodes; payload {} bytes, SHA-256 {}",
            header.payload_len, header.payload_sha256
        ),
    );

    // 4.-6. device, tenant, VM
    match ctx.destination {
        None => {
            for c in [Check::Device, Check::Tenant, Check::Vm] {
                ev.checks.push((
                    c,
                    CheckOutcome::NotChecked {
                        detail: "no destination given (--device and --vm)".into(),
                    },
                ));
            }
        }
        Some(dest) => {
            let descriptor = match &dest.descriptor {
                Ok(d) => d,
                Err(e) => {
                    return ev.fail(Refusal::new(
                        Check::Device,
                        format!("the destination {}: {}", e.device, e.reason),
                        e.hint.clone(),
                    ));
                }
            };
            if let Err(why) = compare(&header.device, descriptor) {
                return ev.fail(Refusal::new(
                    Check::Device,
                    format!("{} cannot take this state: {why}", dest.device),
                    "state enters only a device of the same kind and model, on the same driver; \
                     admit it to such a device",
                ));
            }
            ev.pass(Check::Device, format!("{} is a {descriptor}", dest.device));

            match &dest.holder {
                None => {
                    return ev.fail(Refusal::new(
                        Check::Tenant,
                        format!(
                            "{} is {}, held by no tenant; the envelope is for tenant {}",
                            dest.device, dest.state, header.tenant
                        ),
                        format!(
                            "assign it to {} first (`devfence assign {} --tenant {}`)",
                            header.tenant, dest.device, header.tenant
                        ),
                    ));
                }
                Some(t) if *t != header.tenant => {
                    return ev.fail(Refusal::new(
                        Check::Tenant,
                        format!(
                            "{} is assigned to tenant {t} ({}), but the envelope is for tenant {}",
                            dest.device, dest.state, header.tenant
                        ),
                        "one tenant's state never enters another tenant's device; admit it to a \
                         device of the envelope's tenant",
                    ));
                }
                Some(_) if !dest.ready => {
                    return ev.fail(Refusal::new(
                        Check::Tenant,
                        format!(
                            "{} is {}, not Ready or Active for tenant {}: its gates have not all passed",
                            dest.device, dest.state, header.tenant
                        ),
                        "state enters only a device verified for its tenant; admit it once \
                         `devfence status` shows the device Ready",
                    ));
                }
                Some(t) => ev.pass(
                    Check::Tenant,
                    format!("{} is {} (tenant {t})", dest.device, dest.state),
                ),
            }

            if dest.vm != header.vm {
                return ev.fail(Refusal::new(
                    Check::Vm,
                    format!(
                        "the envelope is for VM {}, but this admission is for VM {}",
                        header.vm, dest.vm
                    ),
                    "state enters only the VM it was saved from; admit it with --vm set to that VM's UUID",
                ));
            }
            if let Some(r) = &dest.reserved_vm {
                match r.parse::<VmUuid>() {
                    Ok(u) if u == header.vm => {}
                    Ok(u) => {
                        return ev.fail(Refusal::new(
                            Check::Vm,
                            format!(
                                "{} is reserved in the ledger for VM {u}, not for the envelope's VM {}",
                                dest.device, header.vm
                            ),
                            "state enters only the VM it was saved from; admit it to a device reserved for that VM",
                        ));
                    }
                    Err(_) => {
                        return ev.fail(Refusal::new(
                            Check::Vm,
                            format!(
                                "{} is reserved in the ledger for VM {r:?}, a name that cannot be matched to the envelope's VM UUID {}",
                                dest.device, header.vm
                            ),
                            format!(
                                "reserve the device by the VM's UUID (`devfence assign {} --tenant {} --vm {}`), or for the tenant alone",
                                dest.device, header.tenant, header.vm
                            ),
                        ));
                    }
                }
            }
            ev.pass(Check::Vm, format!("VM {}", header.vm));
        }
    }

    // 7. single use
    match (ctx.nonce_use)(&header.nonce) {
        Err(e) => {
            return ev.fail(Refusal::new(
                Check::SingleUse,
                format!("the nonce ledger cannot be read: {e}"),
                "devfence fails closed when it cannot prove an envelope is unused; check the ledger",
            ));
        }
        Ok(Some(u)) => {
            let at = u64::try_from(u.admitted_ms).map_or_else(|_| u.admitted_ms.to_string(), utc);
            return ev.fail(Refusal::new(
                Check::SingleUse,
                format!(
                    "replay: this envelope (nonce {}) was already admitted at {at} to {} for VM {}",
                    header.nonce, u.device, u.vm
                ),
                "an envelope is admitted once; seal the state again on the source host",
            ));
        }
        Ok(None) => match ctx.nonce_horizon_ms {
            Some(h) if header.expires_ms <= h => {
                return ev.fail(Refusal::new(
                    Check::SingleUse,
                    format!(
                        "the envelope (nonce {}) expired at {}, at or before the nonce ledger's horizon {}: the nonces of such envelopes are pruned, so it cannot be proven never admitted",
                        header.nonce,
                        utc(header.expires_ms),
                        utc(h)
                    ),
                    "seal the state again on the source host, and admit it before its --ttl runs out",
                ));
            }
            _ => ev.pass(
                Check::SingleUse,
                format!("nonce {} never admitted", header.nonce),
            ),
        },
    }

    // 8. expiry
    if ctx.now_ms >= header.expires_ms {
        return ev.fail(Refusal::new(
            Check::Expiry,
            format!(
                "the envelope expired at {} (it is now {})",
                utc(header.expires_ms),
                utc(ctx.now_ms)
            ),
            "seal the state again on the source host, and admit it before its --ttl runs out",
        ));
    }
    if header.created_ms > ctx.now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return ev.fail(Refusal::new(
            Check::Expiry,
            format!(
                "the envelope was created at {}, more than 5 minutes in this host's future (it is now {})",
                utc(header.created_ms),
                utc(ctx.now_ms)
            ),
            "the clocks of the two hosts disagree; synchronise them (NTP) and seal again",
        ));
    }
    ev.pass(
        Check::Expiry,
        format!("valid until {}", utc(header.expires_ms)),
    );
    ev
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{
        Binding, DeviceDescriptor, DeviceIdentity, DeviceKind, PciIds, seal, sign_body,
    };
    use crate::keys::HostKey;

    const NOW: u64 = 1_800_000_000_000;
    const VM: &str = "4b1c5c52-9d4e-4f43-a0d6-1e0f2f3a4b5c";
    const OTHER_VM: &str = "00000000-0000-4000-8000-000000000001";

    fn ib_vf() -> DeviceDescriptor {
        DeviceDescriptor {
            kind: DeviceKind::IbVf,
            identity: DeviceIdentity::Pci(PciIds {
                vendor: 0x15b3,
                device: 0x101c,
                subsystem_vendor: 0x15b3,
                subsystem_device: 0x0061,
            }),
            driver: "vfio-pci".into(),
            compat: Some("pf 15b3:101b".into()),
        }
    }

    fn igb_vf() -> DeviceDescriptor {
        DeviceDescriptor {
            kind: DeviceKind::PciVf,
            identity: DeviceIdentity::Pci(PciIds {
                vendor: 0x8086,
                device: 0x10ca,
                subsystem_vendor: 0x8086,
                subsystem_device: 0xa03c,
            }),
            driver: "vfio-pci".into(),
            compat: Some("pf 8086:10c9".into()),
        }
    }

    fn host1() -> HostKey {
        HostKey::from_seed("host1", [1; 32], 0).expect("key")
    }

    fn binding() -> Binding {
        Binding {
            device: ib_vf(),
            tenant: "acme".parse().expect("t"),
            vm: VM.parse().expect("vm"),
            created_ms: NOW - 1000,
            expires_ms: NOW + 3_600_000,
            nonce: Nonce([9; 16]),
        }
    }

    fn envelope() -> Vec<u8> {
        seal(&host1(), binding(), b"opaque vendor state").expect("seal")
    }

    fn keyring() -> Keyring {
        let mut k = Keyring::new();
        k.trust("host1", host1().public(), 0).expect("trust");
        k
    }

    fn dest() -> Destination {
        Destination {
            device: "0000:3b:00.1".parse().expect("d"),
            descriptor: Ok(ib_vf()),
            holder: Some("acme".parse().expect("t")),
            ready: true,
            state: "Ready(acme)".into(),
            reserved_vm: None,
            vm: VM.parse().expect("vm"),
        }
    }

    fn run<'a>(
        bytes: &'a [u8],
        ring: &Keyring,
        dest: Option<&Destination>,
        used: Option<NonceUse>,
        now: u64,
    ) -> Evaluation<'a> {
        let mut lookup = move |_: &Nonce| Ok(used.clone());
        let mut ctx = Context {
            keyring: ring,
            now_ms: now,
            destination: dest,
            nonce_use: &mut lookup,
            nonce_horizon_ms: None,
        };
        evaluate(bytes, &mut ctx)
    }

    fn refused(
        bytes: &[u8],
        ring: &Keyring,
        d: &Destination,
        used: Option<NonceUse>,
        now: u64,
    ) -> Refusal {
        let ev = run(bytes, ring, Some(d), used, now);
        assert!(!ev.admissible());
        assert!(ev.payload().is_none());
        let r = ev.refusal().cloned().expect("a refusal");
        // Everything after the failing check is not reached.
        let i = ev
            .checks
            .iter()
            .position(|(c, _)| *c == r.check)
            .expect("check");
        assert!(
            ev.checks[i + 1..]
                .iter()
                .all(|(_, o)| *o == CheckOutcome::NotReached)
        );
        assert_eq!(ev.checks.len(), Check::ALL.len());
        r
    }

    #[test]
    fn a_good_envelope_is_admitted() {
        let b = envelope();
        let ev = run(&b, &keyring(), Some(&dest()), None, NOW);
        assert!(ev.admissible(), "{:?}", ev.checks);
        assert_eq!(ev.payload(), Some(&b"opaque vendor state"[..]));
        assert_eq!(ev.header.as_ref().expect("h").source_host, "host1");
        let order: Vec<Check> = ev.checks.iter().map(|(c, _)| *c).collect();
        assert_eq!(order, Check::ALL);
    }

    #[test]
    fn truncated_is_refused_at_frame() {
        let b = envelope();
        for cut in [0, 10, 30, b.len() / 2, b.len() - 1] {
            let r = refused(&b[..cut], &keyring(), &dest(), None, NOW);
            assert_eq!(r.check, Check::Frame, "cut at {cut}: {r}");
            assert!(r.reason.contains("truncated"), "{r}");
        }
    }

    #[test]
    fn oversized_is_refused_at_frame() {
        let mut b = envelope();
        // Declares a payload over the limit.
        b[16..24].copy_from_slice(&(crate::format::MAX_PAYLOAD + 1).to_be_bytes());
        let r = refused(&b, &keyring(), &dest(), None, NOW);
        assert_eq!(r.check, Check::Frame);
        assert!(r.reason.contains("more than"), "{r}");
    }

    #[test]
    fn unknown_version_is_refused_at_frame() {
        let mut b = envelope();
        b[8..10].copy_from_slice(&2u16.to_be_bytes());
        let r = refused(&b, &keyring(), &dest(), None, NOW);
        assert_eq!(r.check, Check::Frame);
        assert!(r.reason.contains("format version 2"), "{r}");
    }

    #[test]
    fn bit_flipped_is_refused() {
        let b = envelope();
        let header_at = crate::format::PREFIX_LEN + 5;
        for at in [header_at, b.len() - 100, b.len() - 90, b.len() - 1] {
            let mut x = b.clone();
            x[at] ^= 0x10;
            let r = refused(&x, &keyring(), &dest(), None, NOW);
            assert_eq!(r.check, Check::Signature, "flip at {at}: {r}");
        }
        let mut x = b.clone();
        x[header_at] ^= 0x10;
        let r = refused(&x, &keyring(), &dest(), None, NOW);
        assert!(r.reason.contains("changed after it was sealed"), "{r}");
    }

    #[test]
    fn resigned_by_an_untrusted_key_is_refused_at_trusted_key() {
        let b = envelope();
        let mallory = HostKey::from_seed("host1", [66; 32], 0).expect("k");
        let x = sign_body(&mallory, b[..b.len() - 96].to_vec());
        let r = refused(&x, &keyring(), &dest(), None, NOW);
        assert_eq!(r.check, Check::TrustedKey, "{r}");
        assert!(r.reason.contains("not in this host's keyring"), "{r}");
        assert!(
            r.reason
                .contains(&mallory.public().fingerprint().to_string()),
            "{r}"
        );
    }

    #[test]
    fn a_trusted_key_of_another_host_does_not_vouch() {
        // host2's key is trusted, but it signs an envelope claiming host1.
        let host2 = HostKey::from_seed("host2", [2; 32], 0).expect("k");
        let mut ring = keyring();
        ring.trust("host2", host2.public(), 0).expect("trust");
        let b = envelope();
        let x = sign_body(&host2, b[..b.len() - 96].to_vec());
        let r = refused(&x, &ring, &dest(), None, NOW);
        assert_eq!(r.check, Check::TrustedKey);
        assert!(r.reason.contains("trusted for host host2"), "{r}");
    }

    #[test]
    fn rotation_keeps_older_envelopes_and_refuses_newer_ones_by_the_old_key() {
        let b = envelope(); // created NOW - 1000 by host1's first key
        let mut ring = keyring();
        let new = HostKey::from_seed("host1", [11; 32], 0).expect("k");
        // Rotated after the envelope was created: still admitted.
        ring.trust("host1", new.public(), NOW - 500)
            .expect("rotate");
        assert!(run(&b, &ring, Some(&dest()), None, NOW).admissible());
        // An envelope the old key makes after its retirement: refused.
        let mut late = binding();
        late.created_ms = NOW - 100;
        let x = seal(&host1(), late.clone(), b"s").expect("seal");
        let r = refused(&x, &ring, &dest(), None, NOW);
        assert_eq!(r.check, Check::TrustedKey);
        assert!(r.reason.contains("was retired"), "{r}");
        // The new key's envelopes are admitted.
        let y = seal(&new, late, b"s").expect("seal");
        assert!(run(&y, &ring, Some(&dest()), None, NOW).admissible());
        // Removing the old key refuses even its older envelopes.
        ring.remove(&host1().public().fingerprint())
            .expect("remove");
        assert_eq!(
            refused(&b, &ring, &dest(), None, NOW).check,
            Check::TrustedKey
        );
    }

    #[test]
    fn a_signed_but_malformed_header_is_refused_at_format() {
        // A trusted key signs a body whose header has an unknown field.
        let b = envelope();
        let f = Frame::parse(&b).expect("frame");
        let mut h = f.header().to_vec();
        h.extend_from_slice(&[0x0f, 0, 0]);
        let mut body = b[..crate::format::PREFIX_LEN].to_vec();
        body[12..16].copy_from_slice(&u32::try_from(h.len()).expect("len").to_be_bytes());
        body.extend_from_slice(&h);
        body.extend_from_slice(f.payload());
        let x = sign_body(&host1(), body);
        let r = refused(&x, &keyring(), &dest(), None, NOW);
        assert_eq!(r.check, Check::Format, "{r}");
        assert!(r.reason.contains("unknown field"), "{r}");
    }

    #[test]
    fn another_device_type_is_refused_at_device() {
        let mut d = dest();
        d.device = "0000:5e:10.0".parse().expect("d");
        d.descriptor = Ok(igb_vf());
        let r = refused(&envelope(), &keyring(), &d, None, NOW);
        assert_eq!(r.check, Check::Device);
        assert!(
            r.reason.contains("of kind ib-vf") && r.reason.contains("of kind pci-vf"),
            "{r}"
        );
        // Same kind and ids, other driver.
        let mut d = dest();
        let mut other = ib_vf();
        other.driver = "mlx5_vfio_pci".into();
        d.descriptor = Ok(other);
        let r = refused(&envelope(), &keyring(), &d, None, NOW);
        assert_eq!(r.check, Check::Device);
        assert!(r.reason.contains("mlx5_vfio_pci"), "{r}");
    }

    #[test]
    fn another_tenant_is_refused_at_tenant() {
        let mut d = dest();
        d.holder = Some("globex".parse().expect("t"));
        d.state = "Ready(globex)".into();
        let r = refused(&envelope(), &keyring(), &d, None, NOW);
        assert_eq!(r.check, Check::Tenant);
        assert!(
            r.reason.contains("assigned to tenant globex") && r.reason.contains("for tenant acme"),
            "{r}"
        );
        d.holder = None;
        d.ready = false;
        d.state = "Free".into();
        let r = refused(&envelope(), &keyring(), &d, None, NOW);
        assert_eq!(r.check, Check::Tenant);
        assert!(r.reason.contains("held by no tenant"), "{r}");
        // The right tenant, but its gates have not all passed.
        let mut d = dest();
        d.ready = false;
        d.state = "Preparing(acme)".into();
        let r = refused(&envelope(), &keyring(), &d, None, NOW);
        assert_eq!(r.check, Check::Tenant);
        assert!(r.reason.contains("not Ready or Active"), "{r}");
    }

    #[test]
    fn another_vm_is_refused_at_vm() {
        let mut d = dest();
        d.vm = OTHER_VM.parse().expect("vm");
        let r = refused(&envelope(), &keyring(), &d, None, NOW);
        assert_eq!(r.check, Check::Vm);
        assert!(r.reason.contains(OTHER_VM), "{r}");
        let mut d = dest();
        d.reserved_vm = Some(OTHER_VM.into());
        let r = refused(&envelope(), &keyring(), &d, None, NOW);
        assert_eq!(r.check, Check::Vm);
        assert!(r.reason.contains("reserved in the ledger"), "{r}");
        d.reserved_vm = Some("web1".into());
        let r = refused(&envelope(), &keyring(), &d, None, NOW);
        assert_eq!(r.check, Check::Vm);
        assert!(r.hint.contains("--vm"), "{r}");
        d.reserved_vm = Some(VM.to_uppercase());
        assert!(run(&envelope(), &keyring(), Some(&d), None, NOW).admissible());
    }

    #[test]
    fn replay_is_refused_at_single_use() {
        let used = NonceUse {
            admitted_ms: i64::try_from(NOW - 10).expect("ms"),
            device: "0000:3b:00.1".into(),
            vm: VM.into(),
        };
        let r = refused(&envelope(), &keyring(), &dest(), Some(used), NOW);
        assert_eq!(r.check, Check::SingleUse);
        assert!(r.reason.starts_with("replay:"), "{r}");
    }

    #[test]
    fn an_envelope_behind_the_nonce_horizon_is_refused_as_unprovable() {
        // Its nonce is not found, but nonces of envelopes that expired by the
        // horizon were pruned: even with the clock set back to when it was
        // valid, it is refused at single-use.
        let (b, ring, d) = (envelope(), keyring(), dest());
        let refusal = |horizon: u64| {
            let mut lookup = |_: &Nonce| Ok(None);
            let mut ctx = Context {
                keyring: &ring,
                now_ms: NOW,
                destination: Some(&d),
                nonce_use: &mut lookup,
                nonce_horizon_ms: Some(horizon),
            };
            evaluate(&b, &mut ctx).refusal().cloned()
        };
        let expires = NOW + 3_600_000;
        for horizon in [expires, expires + 1] {
            let r = refusal(horizon).expect("refused");
            assert_eq!(r.check, Check::SingleUse, "{r}");
            assert!(r.reason.contains("horizon"), "{r}");
        }
        // A horizon before its expiry does not stand in its way.
        assert_eq!(refusal(expires - 1), None);
    }

    #[test]
    fn expired_is_refused_at_expiry() {
        let b = envelope();
        let r = refused(&b, &keyring(), &dest(), None, NOW + 3_600_000);
        assert_eq!(r.check, Check::Expiry);
        assert!(r.reason.contains("expired at"), "{r}");
        // From the future, beyond the clock skew allowance.
        let r = refused(
            &b,
            &keyring(),
            &dest(),
            None,
            NOW - 1000 - MAX_CLOCK_SKEW_MS - 1,
        );
        assert_eq!(r.check, Check::Expiry);
        assert!(r.reason.contains("future"), "{r}");
    }

    #[test]
    fn the_first_failing_check_wins() {
        // Wrong tenant, wrong VM, replayed and expired: the tenant is named.
        let mut d = dest();
        d.holder = Some("globex".parse().expect("t"));
        d.vm = OTHER_VM.parse().expect("vm");
        let used = NonceUse {
            admitted_ms: 0,
            device: "x".into(),
            vm: "y".into(),
        };
        let r = refused(&envelope(), &keyring(), &d, Some(used), NOW + 10_000_000);
        assert_eq!(r.check, Check::Tenant);
        // An untrusted key and a bad device: the key is named.
        let mut d = dest();
        d.descriptor = Ok(igb_vf());
        assert_eq!(
            refused(&envelope(), &Keyring::new(), &d, None, NOW).check,
            Check::TrustedKey
        );
    }

    #[test]
    fn inspecting_without_a_destination_skips_only_the_destination_checks() {
        let b = envelope();
        let ev = run(&b, &keyring(), None, None, NOW);
        assert!(ev.refusal().is_none());
        assert!(!ev.admissible(), "not admissible without a destination");
        assert!(ev.payload().is_none());
        let skipped: Vec<Check> = ev
            .checks
            .iter()
            .filter(|(_, o)| matches!(o, CheckOutcome::NotChecked { .. }))
            .map(|(c, _)| *c)
            .collect();
        assert_eq!(skipped, [Check::Device, Check::Tenant, Check::Vm]);
    }

    #[test]
    fn a_nonce_ledger_error_fails_closed() {
        let b = envelope();
        let ring = keyring();
        let d = dest();
        let mut lookup = |_: &Nonce| Err("disk I/O error".to_string());
        let mut ctx = Context {
            keyring: &ring,
            now_ms: NOW,
            destination: Some(&d),
            nonce_use: &mut lookup,
            nonce_horizon_ms: None,
        };
        let ev = evaluate(&b, &mut ctx);
        let r = ev.refusal().expect("refused");
        assert_eq!(r.check, Check::SingleUse);
        assert!(r.reason.contains("disk I/O error"));
    }

    #[test]
    fn utc_formats_the_epoch_and_leap_days() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_800_000_000_000), "2027-01-15T08:00:00Z");
    }

    mod prop {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Flipping any single bit of a valid envelope makes admission refuse it.
            #[test]
            fn any_single_bit_flip_is_refused(bit in 0usize..(8 * 4096)) {
                let b = envelope();
                let bit = bit % (8 * b.len());
                let mut x = b.clone();
                x[bit / 8] ^= 1 << (bit % 8);
                let ev = run(&x, &keyring(), Some(&dest()), None, NOW);
                prop_assert!(!ev.admissible(), "bit {} flipped was admitted", bit);
                let r = ev.refusal().expect("refusal");
                // Only the frame and the signature can catch a flip: nothing else is
                // reached for a changed envelope.
                prop_assert!(
                    matches!(r.check, Check::Frame | Check::Signature),
                    "bit {}: refused at {}: {}", bit, r.check, r
                );
            }
        }

        #[test]
        fn every_bit_flip_of_one_envelope_is_refused() {
            // Exhaustive over one envelope, on top of the random cases above.
            let b = envelope();
            let ring = keyring();
            let d = dest();
            for bit in 0..8 * b.len() {
                let mut x = b.clone();
                x[bit / 8] ^= 1 << (bit % 8);
                let mut lookup = |_: &Nonce| Ok(None);
                let mut ctx = Context {
                    keyring: &ring,
                    now_ms: NOW,
                    destination: Some(&d),
                    nonce_use: &mut lookup,
                    nonce_horizon_ms: None,
                };
                assert!(!evaluate(&x, &mut ctx).admissible(), "bit {bit}");
            }
        }
    }
}
