//! Device-state envelopes: how migration state crosses from one host to another
//! without ever being trusted on the tenant's word (docs/design.md L3).
//!
//! Live migration restores opaque, vendor-defined device state into a kernel
//! driver and the device's firmware. That state can carry emulation state and the
//! very parameters of isolation, so a stream the tenant supplies must never
//! reach a device. devfence is the delivery path instead: the **source** host
//! seals the state it read from the device into an [`envelope`](format) — bound to
//! the kind and model of device, its driver and compatibility string, the tenant,
//! the VM, a validity window and a random single-use nonce, and signed with the
//! host's ed25519 key ([`keys`]). The **destination** host admits it only if
//! every check of [`admit`] passes, in a fixed order — signature, trusted source
//! key, format, device compatibility with the destination device as inventoried
//! ([`device`]), tenant, VM, single use, expiry — and refuses it with the first
//! failing reason otherwise.
//!
//! This crate is pure: it formats, signs, verifies and decides. Where keys,
//! envelopes and admitted payloads live on disk, the nonce ledger and the audit
//! records are the CLI's and the engine's (`docs/state-envelopes.md`).

pub mod admit;
pub mod device;
pub mod format;
pub mod keys;

pub use admit::{
    Check, CheckOutcome, Context, Destination, Evaluation, NonceUse, Refusal, evaluate, utc,
};
pub use device::{DescribeError, compare, describe};
pub use format::{
    Binding, DeviceDescriptor, DeviceIdentity, DeviceKind, EnvelopeId, FormatError, Frame,
    FrameError, Header, MAX_ENVELOPE, MAX_PAYLOAD, MAX_TTL_MS, Nonce, PciIds, Sha256Digest, VmUuid,
    check_size, seal, sign_body,
};
pub use keys::{
    Fingerprint, HostKey, KeyError, Keyring, KeyringError, PublicKey, PublicLine, SecretText,
    TrustChange, TrustedKey,
};

/// The fuzz target's body (`fuzz/fuzz_targets/envelope.rs`): never a panic, and
/// the properties below hold, for any input.
///
/// - `data` as an envelope: evaluated against a keyring that trusts a fixed key
///   and a fixed destination; whatever it is, it is admitted only if it carries
///   a valid signature of that key.
/// - `data` as a header: a header that decodes encodes back to exactly `data`
///   (the encoding is canonical).
/// - `data` as a mutation: a valid envelope with the bits of `data` XORed into
///   it at a position `data` chooses is refused unless nothing changed.
///
/// # Panics
/// When a property does not hold (that is what the fuzzer looks for).
pub fn fuzz_envelope(data: &[u8]) {
    let key = HostKey::from_seed("fuzz-host", [0x5a; 32], 0).expect("fixed key");
    let mut ring = Keyring::new();
    ring.trust("fuzz-host", key.public(), 0).expect("trust");
    let now = 1_800_000_000_000u64;
    let vm: VmUuid = "4b1c5c52-9d4e-4f43-a0d6-1e0f2f3a4b5c".parse().expect("vm");
    let device = DeviceDescriptor {
        kind: DeviceKind::PciVf,
        identity: DeviceIdentity::Pci(PciIds {
            vendor: 0x8086,
            device: 0x10ca,
            subsystem_vendor: 0x8086,
            subsystem_device: 0xa03c,
        }),
        driver: "vfio-pci".into(),
        compat: Some("pf 8086:10c9".into()),
    };
    let dest = Destination {
        device: "0000:5e:10.0".parse().expect("device"),
        descriptor: Ok(device.clone()),
        holder: Some("acme".parse().expect("tenant")),
        ready: true,
        state: "Ready(acme)".into(),
        reserved_vm: None,
        vm,
    };
    let evaluate_with = |bytes: &[u8]| -> bool {
        let mut lookup = |_: &Nonce| Ok(None);
        let mut ctx = Context {
            keyring: &ring,
            now_ms: now,
            destination: Some(&dest),
            nonce_use: &mut lookup,
            nonce_horizon_ms: None,
        };
        let ev = evaluate(bytes, &mut ctx);
        let admitted = ev.admissible();
        assert_eq!(admitted, ev.refusal().is_none());
        let _ = ev.refusal().map(ToString::to_string);
        admitted
    };

    // 1. As an envelope.
    if evaluate_with(data) {
        let f = Frame::parse(data).expect("an admitted envelope has a frame");
        assert_eq!(f.signer(), key.public(), "admitted under another key");
    }

    // 2. As a header: canonical.
    if let Ok(h) = Header::decode(data) {
        let back = h.encode().expect("a decoded header encodes");
        assert_eq!(back, data, "the header encoding is not canonical");
    }

    // 3. As a mutation of a valid envelope.
    if data.len() >= 3 {
        let payload = &data[3..data.len().min(64)];
        let good = seal(
            &key,
            Binding {
                device,
                tenant: "acme".parse().expect("tenant"),
                vm,
                created_ms: now - 1,
                expires_ms: now + 1000,
                nonce: Nonce([1; 16]),
            },
            payload,
        )
        .expect("seal");
        assert!(evaluate_with(&good), "a fresh envelope is admitted");
        let at = usize::from(u16::from_be_bytes([data[0], data[1]])) % good.len();
        let mut bad = good.clone();
        bad[at] ^= data[2];
        assert_eq!(
            evaluate_with(&bad),
            data[2] == 0,
            "a mutated envelope was admitted"
        );
    }
}

#[cfg(test)]
mod tests {
    /// The checked-in fuzz seed `admitted.dfseal` is an envelope the fuzz body's
    /// keyring and destination admit, so the fuzzer starts from the accepting
    /// path; if the format changes, regenerate the seeds.
    #[test]
    fn the_admitted_fuzz_seed_is_admitted() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds/envelope/admitted.dfseal");
        let b = std::fs::read(&path).expect("seed");
        let key = crate::HostKey::from_seed("fuzz-host", [0x5a; 32], 0).expect("key");
        let f = crate::Frame::parse(&b).expect("frame");
        assert_eq!(f.signer(), key.public());
        let h = crate::Header::decode(f.header()).expect("header");
        assert!(h.created_ms < 1_800_000_000_000 && 1_800_000_000_000 < h.expires_ms);
        h.check_payload(f.payload()).expect("payload");
        super::fuzz_envelope(&b);
    }

    #[test]
    fn fuzz_body_holds_on_simple_inputs() {
        for d in [
            &b""[..],
            b"\x89DFSEAL\n",
            b"\x00\x10\x01abc",
            b"\xff\xff\x80",
            b"\x00\x00\x00",
        ] {
            super::fuzz_envelope(d);
        }
    }
}
