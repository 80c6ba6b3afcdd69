//! Device-state envelopes end to end: two simulated `lab` hosts are two hosts of a
//! migration, each with its own root (sysfs, keys, ledger, state store). The real
//! binary seals on "host 1", and admits or refuses on "host 2". Envelopes that no
//! CLI command would make (expired, re-signed by another key) are made with
//! `devfence-seal` from host 1's own key file, as an attacker or a slow operator
//! would present them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use devfence_testsupport::{dv, ok, stderr, stdout, trust};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use devfence_seal::{Binding, Frame, Header, HostKey, Nonce, seal, sign_body};

const VM: &str = "4b1c5c52-9d4e-4f43-a0d6-1e0f2f3a4b5c";
const OTHER_VM: &str = "9f0e1d2c-3b4a-4596-8877-665544332211";
/// An igb VF (kind pci-vf) on both hosts.
const IGB_VF: &str = "0000:5e:10.0";
/// Another igb VF of the same PF.
const IGB_VF2: &str = "0000:5e:10.2";
/// An mlx5 VF (kind ib-vf).
const IB_VF: &str = "0000:3b:00.1";

fn scratch() -> tempfile::TempDir {
    devfence_testsupport::scratch("devfence-state-")
}

/// A simulated `lab` host named `id` with tenants acme and globex and a host key.
fn lab(tmp: &Path, id: &str) -> PathBuf {
    devfence_testsupport::keyed_host(tmp, id, "lab", 2)
}

fn assign(root: &Path, device: &str, tenant: &str, vm: Option<&str>) {
    let mut args = vec!["assign", device, "--tenant", tenant];
    if let Some(v) = vm {
        args.extend(["--vm", v]);
    }
    ok(&dv(root, &args));
}

/// Seals `state` for `device` and VM on `root`; returns the envelope's path.
fn seal_state(root: &Path, tmp: &Path, device: &str, vm: &str, state: &[u8]) -> PathBuf {
    let input = tmp.join("state.bin");
    fs::write(&input, state).unwrap();
    let o = dv(
        root,
        &[
            "state",
            "seal",
            "--device",
            device,
            "--vm",
            vm,
            "--in",
            input.to_str().unwrap(),
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["sealed"], true);
    PathBuf::from(v["path"].as_str().unwrap())
}

/// Admits on `root`; returns (exit code, JSON).
fn admit(root: &Path, envelope: &Path, device: &str, vm: &str) -> (i32, serde_json::Value) {
    let o = dv(
        root,
        &[
            "state",
            "admit",
            envelope.to_str().unwrap(),
            "--device",
            device,
            "--vm",
            vm,
            "--json",
        ],
    );
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "admit --json is not JSON ({e}): {}\n{}",
            stdout(&o),
            stderr(&o)
        )
    });
    (o.status.code().unwrap(), v)
}

/// Asserts a refusal at `check` whose reason contains `words`.
#[track_caller]
fn refused_at(res: &(i32, serde_json::Value), check: &str, words: &str) {
    let (code, v) = res;
    assert_eq!(*code, 1, "{v:#}");
    assert_eq!(v["admitted"], false, "{v:#}");
    assert_eq!(v["check"], check, "{v:#}");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains(words), "{reason:?} lacks {words:?}");
    assert!(!v["hint"].as_str().unwrap().is_empty(), "{v:#}");
}

fn audit(root: &Path) -> Vec<serde_json::Value> {
    let o = dv(root, &["audit", "show", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    v["items"].as_array().cloned().unwrap()
}

fn audit_intact(root: &Path) {
    ok(&dv(root, &["audit", "verify"]));
}

/// Two hosts with the igb VF assigned to acme on both; host 2 trusts host 1.
struct Pair {
    _tmp: tempfile::TempDir,
    tmp: PathBuf,
    h1: PathBuf,
    h2: PathBuf,
}

fn pair() -> Pair {
    let t = scratch();
    let tmp = t.path().to_path_buf();
    let h1 = lab(&tmp, "host1");
    let h2 = lab(&tmp, "host2");
    assign(&h1, IGB_VF, "acme", None);
    assign(&h2, IGB_VF, "acme", None);
    trust(&h1, &h2, &tmp);
    Pair {
        _tmp: t,
        tmp,
        h1,
        h2,
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn end_to_end_seal_on_host1_admit_on_host2_and_refuse_another_type() {
    let p = pair();
    assign(&p.h2, IB_VF, "acme", None);
    let state: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sealed = seal_state(&p.h1, &p.tmp, IGB_VF, VM, &state);
    assert!(sealed.starts_with(p.h1.join("var/lib/devfence/state")));
    assert_eq!(mode(&sealed), 0o600);
    assert_eq!(mode(sealed.parent().unwrap()), 0o700);
    // The envelope travels to host 2 as a plain file.
    let copy = p.tmp.join("in-transit.dfseal");
    fs::copy(&sealed, &copy).unwrap();

    // A device of another type (an IB VF of the same tenant): refused.
    refused_at(&admit(&p.h2, &copy, IB_VF, VM), "device", "of kind ib-vf");

    // A device of the same type and tenant: admitted.
    let (code, v) = admit(&p.h2, &copy, IGB_VF, VM);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["admitted"], true);
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["source_host"], "host1");
    let token = v["token"].as_str().unwrap();
    assert_eq!(token.len(), 64);
    let payload = PathBuf::from(v["payload"].as_str().unwrap());
    assert_eq!(
        payload,
        p.h2.join(format!("run/devfence/state/{token}.state"))
    );
    assert_eq!(
        fs::read(&payload).unwrap(),
        state,
        "the payload is the state"
    );
    assert_eq!(mode(&payload), 0o600);
    assert_eq!(mode(payload.parent().unwrap()), 0o700);
    let checks: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["result"], "passed", "{c}");
            c["check"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        checks,
        [
            "frame",
            "signature",
            "trusted-key",
            "format",
            "device",
            "tenant",
            "vm",
            "single-use",
            "expiry"
        ]
    );

    // Audit: the seal on host 1; the refusal and the admission on host 2. The
    // token itself is in no record, only its hash.
    let a1 = audit(&p.h1);
    let seal_rec = a1
        .iter()
        .find(|r| r["kind"] == "seal")
        .expect("seal record");
    assert_eq!(seal_rec["device"], IGB_VF);
    assert_eq!(seal_rec["tenant"], "acme");
    let a2 = audit(&p.h2);
    let refusal = a2
        .iter()
        .find(|r| r["kind"] == "refusal" && r["detail"]["action"] == "state-admit")
        .expect("refusal record");
    assert_eq!(refusal["detail"]["check"], "device");
    assert_eq!(refusal["device"], IB_VF);
    let adm = a2
        .iter()
        .find(|r| r["kind"] == "admit")
        .expect("admit record");
    assert_eq!(adm["detail"]["nonce"], seal_rec["detail"]["nonce"]);
    assert_eq!(adm["detail"]["envelope"], seal_rec["detail"]["envelope"]);
    let all = serde_json::to_string(&a2).unwrap();
    assert!(!all.contains(token), "the token leaked into the audit log");
    audit_intact(&p.h1);
    audit_intact(&p.h2);
}

#[test]
fn a_host_admits_its_own_envelope_by_id_from_its_state_store() {
    let t = scratch();
    let h1 = lab(t.path(), "host1");
    assign(&h1, IGB_VF, "acme", Some(VM));
    let sealed = seal_state(&h1, t.path(), IGB_VF, VM, b"local state");
    let id = sealed.file_stem().unwrap().to_str().unwrap().to_owned();
    let o = dv(
        &h1,
        &["state", "admit", &id, "--device", IGB_VF, "--vm", VM],
    );
    let text = ok(&o);
    assert!(text.contains(&format!("admitted envelope {id}")), "{text}");
    assert!(text.contains("token: "), "{text}");
}

#[test]
fn an_untrusted_source_is_refused_until_it_is_trusted() {
    let t = scratch();
    let h1 = lab(t.path(), "host1");
    let h2 = lab(t.path(), "host2");
    assign(&h1, IGB_VF, "acme", None);
    assign(&h2, IGB_VF, "acme", None);
    let env = seal_state(&h1, t.path(), IGB_VF, VM, b"s");
    refused_at(
        &admit(&h2, &env, IGB_VF, VM),
        "trusted-key",
        "not in this host's keyring (it says it was sealed on host1)",
    );
    trust(&h1, &h2, t.path());
    assert_eq!(admit(&h2, &env, IGB_VF, VM).0, 0);
}

#[test]
fn a_truncated_envelope_is_refused() {
    let p = pair();
    let env = seal_state(&p.h1, &p.tmp, IGB_VF, VM, &[1u8; 4000]);
    let b = fs::read(&env).unwrap();
    let cut = p.tmp.join("cut.dfseal");
    for n in [10, 200, b.len() - 1] {
        fs::write(&cut, &b[..n]).unwrap();
        refused_at(&admit(&p.h2, &cut, IGB_VF, VM), "frame", "truncated");
    }
    let recs = audit(&p.h2);
    let n = recs
        .iter()
        .filter(|r| r["kind"] == "refusal" && r["detail"]["check"] == "frame")
        .count();
    assert_eq!(n, 3, "every refusal is an audit record");
}

#[test]
fn an_oversized_envelope_is_refused_before_it_is_read() {
    let p = pair();
    let big = p.tmp.join("big.dfseal");
    // Sparse: the size check must refuse it from its metadata alone.
    let f = fs::File::create(&big).unwrap();
    f.set_len(devfence_seal::MAX_ENVELOPE + 1).unwrap();
    refused_at(&admit(&p.h2, &big, IGB_VF, VM), "frame", "more than the");
    // inspect says the same, exit 1.
    let o = dv(&p.h2, &["state", "inspect", big.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("admit would refuse it at check frame"));
}

#[test]
fn a_bit_flipped_envelope_is_refused() {
    let p = pair();
    let env = seal_state(&p.h1, &p.tmp, IGB_VF, VM, b"0123456789");
    let mut b = fs::read(&env).unwrap();
    // A bit of the header (the tenant's name is in there).
    b[40] ^= 0x04;
    let flipped = p.tmp.join("flipped.dfseal");
    fs::write(&flipped, &b).unwrap();
    refused_at(
        &admit(&p.h2, &flipped, IGB_VF, VM),
        "signature",
        "changed after it was sealed",
    );
    // The payload's last bit.
    let mut b = fs::read(&env).unwrap();
    let at = b.len() - 97;
    b[at] ^= 0x01;
    fs::write(&flipped, &b).unwrap();
    refused_at(
        &admit(&p.h2, &flipped, IGB_VF, VM),
        "signature",
        "signature",
    );
    // The unchanged envelope is still good.
    assert_eq!(admit(&p.h2, &env, IGB_VF, VM).0, 0);
}

#[test]
fn an_envelope_re_signed_by_an_untrusted_key_is_refused() {
    let p = pair();
    let env = seal_state(&p.h1, &p.tmp, IGB_VF, VM, b"state");
    let b = fs::read(&env).unwrap();
    // Mallory keeps every byte but signs with her own key, claiming host1.
    let mallory = HostKey::generate("host1", 0).unwrap();
    let forged = sign_body(&mallory, b[..b.len() - 96].to_vec());
    let f = p.tmp.join("forged.dfseal");
    fs::write(&f, forged).unwrap();
    refused_at(
        &admit(&p.h2, &f, IGB_VF, VM),
        "trusted-key",
        &mallory.public().fingerprint().to_string(),
    );
}

#[test]
fn a_replayed_envelope_is_refused() {
    let p = pair();
    assign(&p.h2, IGB_VF2, "acme", None);
    let env = seal_state(&p.h1, &p.tmp, IGB_VF, VM, b"state");
    assert_eq!(admit(&p.h2, &env, IGB_VF, VM).0, 0);
    refused_at(&admit(&p.h2, &env, IGB_VF, VM), "single-use", "replay");
    // Not to another device of the same kind either.
    refused_at(&admit(&p.h2, &env, IGB_VF2, VM), "single-use", IGB_VF);
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Host 1's key, read from its key file (as only root on host 1 can).
fn host1_key(h1: &Path) -> HostKey {
    let text = fs::read_to_string(h1.join("etc/devfence/keys/host.key")).unwrap();
    HostKey::from_file_text(&text).unwrap()
}

/// The binding of a sealed envelope, to make variants of it.
fn binding_of(env: &Path) -> Binding {
    let b = fs::read(env).unwrap();
    let h = Header::decode(Frame::parse(&b).unwrap().header()).unwrap();
    Binding {
        device: h.device,
        tenant: h.tenant,
        vm: h.vm,
        created_ms: h.created_ms,
        expires_ms: h.expires_ms,
        nonce: h.nonce,
    }
}

#[test]
fn an_expired_envelope_is_refused() {
    let p = pair();
    let env = seal_state(&p.h1, &p.tmp, IGB_VF, VM, b"state");
    let mut bind = binding_of(&env);
    // Sealed two hours ago with a one-hour validity, by host 1's real key.
    bind.created_ms -= 2 * 3_600_000;
    bind.expires_ms = bind.created_ms + 3_600_000;
    bind.nonce = Nonce::random().unwrap();
    let old = seal(&host1_key(&p.h1), bind, b"state").unwrap();
    let f = p.tmp.join("old.dfseal");
    fs::write(&f, old).unwrap();
    refused_at(&admit(&p.h2, &f, IGB_VF, VM), "expiry", "expired at");
}

#[test]
fn an_envelope_for_another_tenant_is_refused() {
    let t = scratch();
    let h1 = lab(t.path(), "host1");
    let h2 = lab(t.path(), "host2");
    assign(&h1, IGB_VF, "acme", None);
    assign(&h2, IGB_VF, "globex", None);
    trust(&h1, &h2, t.path());
    let env = seal_state(&h1, t.path(), IGB_VF, VM, b"acme's state");
    refused_at(
        &admit(&h2, &env, IGB_VF, VM),
        "tenant",
        "assigned to tenant globex",
    );
    // A free device (no tenant) is refused too.
    refused_at(
        &admit(&h2, &env, IGB_VF2, VM),
        "tenant",
        "held by no tenant",
    );
    assert!(
        !h2.join("run/devfence/state").exists()
            || fs::read_dir(h2.join("run/devfence/state"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn an_envelope_for_another_vm_is_refused() {
    let p = pair();
    let env = seal_state(&p.h1, &p.tmp, IGB_VF, VM, b"state");
    refused_at(&admit(&p.h2, &env, IGB_VF, OTHER_VM), "vm", OTHER_VM);
    // A device the ledger reserves for another VM.
    assign(&p.h2, IGB_VF2, "acme", Some(OTHER_VM));
    let mut bind = binding_of(&env);
    bind.nonce = Nonce::random().unwrap();
    let other = seal(&host1_key(&p.h1), bind, b"state").unwrap();
    let f = p.tmp.join("other.dfseal");
    fs::write(&f, other).unwrap();
    refused_at(
        &admit(&p.h2, &f, IGB_VF2, VM),
        "vm",
        "reserved in the ledger",
    );
}

#[test]
fn seal_refuses_a_device_no_tenant_holds_and_audits_it() {
    let t = scratch();
    let h1 = lab(t.path(), "host1");
    let input = t.path().join("s.bin");
    fs::write(&input, b"state").unwrap();
    let o = dv(
        &h1,
        &[
            "state",
            "seal",
            "--device",
            IGB_VF,
            "--vm",
            VM,
            "--in",
            input.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("held by no tenant"), "{}", stderr(&o));
    assert!(
        !h1.join("var/lib/devfence/state").exists()
            || fs::read_dir(h1.join("var/lib/devfence/state"))
                .unwrap()
                .next()
                .is_none(),
        "nothing sealed"
    );
    let recs = audit(&h1);
    assert!(
        recs.iter()
            .any(|r| r["kind"] == "refusal" && r["detail"]["action"] == "state-seal"),
        "{recs:?}"
    );
    // Bad input is a usage error (exit 2) naming what is wrong.
    let o = dv(
        &h1,
        &[
            "state", "seal", "--device", IGB_VF, "--vm", "web1", "--in", "x",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is not a VM UUID"), "{}", stderr(&o));
    let o = dv(
        &h1,
        &[
            "state", "seal", "--device", IGB_VF, "--vm", VM, "--in", "x", "--ttl", "9d",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("1s to 7d"), "{}", stderr(&o));
}

#[test]
fn rotation_keeps_envelopes_sealed_before_it_and_removal_refuses_them() {
    let p = pair();
    assign(&p.h2, IGB_VF2, "acme", None);
    let before = seal_state(&p.h1, &p.tmp, IGB_VF, VM, b"before");
    let old_key = host1_key(&p.h1);
    let old_fp = old_key.public().fingerprint().to_string();
    let o = dv(&p.h1, &["keys", "rotate", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["retired"], old_fp);
    let new_fp = v["fingerprint"].as_str().unwrap().to_owned();
    assert_ne!(new_fp, old_fp);
    // Host 1's own keyring: old retired, new active.
    let list: serde_json::Value =
        serde_json::from_str(&ok(&dv(&p.h1, &["keys", "trust", "list", "--json"]))).unwrap();
    let status = |fp: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["fingerprint"] == fp)
            .map(|k| k["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(status(&old_fp).as_deref(), Some("retired"));
    assert_eq!(status(&new_fp).as_deref(), Some("active"));

    // Host 2 learns the new key: the old one is retired there too.
    let o = dv(&p.h1, &["keys", "show"]);
    let f = p.tmp.join("host1-new.pub");
    fs::write(&f, stdout(&o)).unwrap();
    let out = ok(&dv(
        &p.h2,
        &["keys", "trust", "add", "--from", f.to_str().unwrap()],
    ));
    assert!(
        out.contains(&format!("retired host1's previous key {old_fp}")),
        "{out}"
    );
    let after = seal_state(&p.h1, &p.tmp, IGB_VF, VM, b"after");
    // The envelope sealed before the rotation is still admitted; so is the new one.
    assert_eq!(admit(&p.h2, &before, IGB_VF, VM).0, 0);
    assert_eq!(admit(&p.h2, &after, IGB_VF2, VM).0, 0);

    // The old key (a copy kept by a thief) cannot vouch for anything made after
    // its retirement.
    let mut bind = binding_of(&before);
    bind.created_ms = now_ms();
    bind.expires_ms = bind.created_ms + 3_600_000;
    bind.nonce = Nonce::random().unwrap();
    let late = p.tmp.join("late.dfseal");
    fs::write(&late, seal(&old_key, bind, b"late").unwrap()).unwrap();
    refused_at(
        &admit(&p.h2, &late, IGB_VF2, VM),
        "trusted-key",
        "was retired",
    );

    // Removing the old key refuses what it sealed, at once (the trusted-key check
    // comes before the single-use one).
    ok(&dv(&p.h2, &["keys", "trust", "remove", &old_fp]));
    refused_at(
        &admit(&p.h2, &before, IGB_VF, VM),
        "trusted-key",
        "not in this host's keyring",
    );
    audit_intact(&p.h2);
}

#[test]
fn keys_are_private_never_printed_and_init_twice_is_refused() {
    let t = scratch();
    let h1 = lab(t.path(), "host1");
    let dir = h1.join("etc/devfence/keys");
    assert_eq!(mode(&dir), 0o700);
    for f in ["host.key", "host.pub", "trusted.json"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let key_text = fs::read_to_string(dir.join("host.key")).unwrap();
    let seed = key_text
        .lines()
        .find_map(|l| l.strip_prefix("seed "))
        .unwrap()
        .to_owned();
    assert_eq!(seed.len(), 64);
    let mut printed = String::new();
    for args in [
        &["keys", "show"][..],
        &["keys", "show", "--json"],
        &["keys", "trust", "list"],
        &["keys", "trust", "list", "--json"],
        &["audit", "show", "--json"],
    ] {
        printed.push_str(&ok(&dv(&h1, args)));
    }
    assert!(!printed.contains(&seed), "the private key was printed");
    // A second init is refused, naming the way forward.
    let o = dv(&h1, &["keys", "init", "--host-id", "host1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("keys rotate"), "{}", stderr(&o));
    // A key file others can read is refused.
    fs::set_permissions(dir.join("host.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let o = dv(&h1, &["keys", "show"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    // Without a key, seal says how to make one.
    fs::remove_file(dir.join("host.key")).unwrap();
    let o = dv(&h1, &["keys", "show"]);
    assert!(stderr(&o).contains("devfence keys init"), "{}", stderr(&o));
}

#[test]
fn trust_add_and_remove_validate_their_input() {
    let t = scratch();
    let h = lab(t.path(), "host2");
    let bad = t.path().join("bad.pub");
    fs::write(&bad, "ssh-ed25519 AAAAC3 user@host\n").unwrap();
    let o = dv(
        &h,
        &["keys", "trust", "add", "--from", bad.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("devfence-ed25519"), "{}", stderr(&o));
    let o = dv(
        &h,
        &["keys", "trust", "add", "--key", "abcd", "--host", "host9"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("64 hex digits"), "{}", stderr(&o));
    let k = HostKey::generate("host9", 0).unwrap();
    ok(&dv(
        &h,
        &[
            "keys",
            "trust",
            "add",
            "--key",
            &k.public().to_string(),
            "--host",
            "host9",
        ],
    ));
    let o = dv(
        &h,
        &[
            "keys",
            "trust",
            "add",
            "--key",
            &k.public().to_string(),
            "--host",
            "host9",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("trusted already"), "{}", stderr(&o));
    let o = dv(
        &h,
        &[
            "keys",
            "trust",
            "remove",
            "00112233445566778899aabbccddeeff",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("No key with fingerprint"),
        "{}",
        stderr(&o)
    );
    let fp = k.public().fingerprint().to_string();
    ok(&dv(&h, &["keys", "trust", "remove", &fp]));
    let recs = audit(&h);
    let actions: Vec<&str> = recs
        .iter()
        .filter(|r| r["kind"] == "keys")
        .map(|r| r["detail"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["keys-init", "trust-add", "trust-remove"]);
}

#[test]
fn inspect_shows_the_header_and_the_decision_without_admitting() {
    let p = pair();
    let env = seal_state(&p.h1, &p.tmp, IGB_VF, VM, b"state");
    let o = dv(&p.h2, &["state", "inspect", env.to_str().unwrap()]);
    let text = ok(&o);
    for want in [
        "source host  host1",
        "tenant       acme",
        &format!("vm           {VM}"),
        "device       pci-vf 8086:10ca",
        "device       skipped",
        "every check that needs no destination passes",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    let o = dv(
        &p.h2,
        &[
            "state",
            "inspect",
            env.to_str().unwrap(),
            "--device",
            IGB_VF,
            "--vm",
            VM,
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["would_admit"], true);
    assert_eq!(v["header"]["tenant"], "acme");
    // Inspecting admitted nothing: admission still works, once.
    assert_eq!(admit(&p.h2, &env, IGB_VF, VM).0, 0);
    let o = dv(
        &p.h2,
        &[
            "state",
            "inspect",
            env.to_str().unwrap(),
            "--device",
            IGB_VF,
            "--vm",
            VM,
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("admit would refuse it at check single-use"));
    // --device needs --vm.
    let o = dv(
        &p.h2,
        &[
            "state",
            "inspect",
            env.to_str().unwrap(),
            "--device",
            IGB_VF,
        ],
    );
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn text_refusal_is_one_line_on_stderr_with_a_hint() {
    let p = pair();
    let env = seal_state(&p.h1, &p.tmp, IGB_VF, VM, b"state");
    let o = dv(
        &p.h2,
        &[
            "state",
            "admit",
            env.to_str().unwrap(),
            "--device",
            IGB_VF,
            "--vm",
            OTHER_VM,
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).is_empty());
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("refused at check vm") && e.contains("Hint:"),
        "{e}"
    );
}

#[test]
fn keys_init_takes_the_host_id_from_etc_hostname_or_asks_for_it() {
    let t = scratch();
    let root = t.path().join("h");
    ok(&dv(
        Path::new("/"),
        &[
            "sim",
            "generate",
            "--profile",
            "lab",
            "--out",
            root.to_str().unwrap(),
        ],
    ));
    let _ = fs::remove_file(root.join("etc/hostname"));
    let o = dv(&root, &["keys", "init"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--host-id"), "{}", stderr(&o));
    fs::write(root.join("etc/hostname"), "hv07.example.org\n").unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dv(&root, &["keys", "init", "--json"]))).unwrap();
    assert_eq!(v["host"], "hv07");
    assert!(v["public_line"].as_str().unwrap().ends_with(" hv07"));
}

/// issue 14 item 4: the nonce ledger is bounded without opening a replay. An
/// admitted envelope's nonce stays until the envelope expires; `audit prune`
/// then removes it (and the finished operations with the records), moving the
/// nonce horizon to now; the envelope, presented again, is still refused — at
/// single-use, as one that cannot be proven unused — and the chain verifies.
#[test]
fn an_expired_envelopes_nonce_is_pruned_and_the_envelope_stays_refused() {
    let p = pair();
    let env = seal_state(&p.h1, &p.tmp, IGB_VF, VM, b"state");
    let mut bind = binding_of(&env);
    // Valid for the next 8 s: long enough to be admitted on a loaded machine.
    bind.created_ms = now_ms() - 1_000;
    bind.expires_ms = bind.created_ms + 9_000;
    bind.nonce = Nonce::random().unwrap();
    let expires = bind.expires_ms;
    let short = seal(&host1_key(&p.h1), bind, b"state").unwrap();
    let f = p.tmp.join("short.dfseal");
    fs::write(&f, short).unwrap();
    let (code, v) = admit(&p.h2, &f, IGB_VF, VM);
    assert_eq!(code, 0, "{v:#}");
    // While it is valid, a prune keeps its nonce: a replay is a replay.
    let rep: serde_json::Value = serde_json::from_str(&ok(&dv(
        &p.h2,
        &["audit", "prune", "--keep", "1000", "--json"],
    )))
    .unwrap();
    assert_eq!(rep["nonces"], 0, "{rep:#}");
    refused_at(&admit(&p.h2, &f, IGB_VF, VM), "single-use", "replay");
    while now_ms() <= expires {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let rep: serde_json::Value = serde_json::from_str(&ok(&dv(
        &p.h2,
        &["audit", "prune", "--keep", "1", "--json"],
    )))
    .unwrap();
    assert_eq!(rep["nonces"], 1, "{rep:#}");
    assert!(
        rep["nonce_horizon_ms"].as_u64().unwrap() >= expires,
        "{rep:#}"
    );
    // The assign's operation finished long before the anchor record.
    assert!(rep["operations"].as_u64().unwrap() >= 1, "{rep:#}");
    assert!(rep["journal_rows"].as_u64().unwrap() >= 1, "{rep:#}");
    refused_at(&admit(&p.h2, &f, IGB_VF, VM), "single-use", "horizon");
    // Nothing the ledger needs went with them.
    let status: serde_json::Value =
        serde_json::from_str(&ok(&dv(&p.h2, &["status", "--json"]))).unwrap();
    assert!(status.to_string().contains(IGB_VF), "{status:#}");
    let human = ok(&dv(&p.h2, &["audit", "prune", "--keep", "1"]));
    assert!(human.contains("horizon"), "{human}");
    audit_intact(&p.h2);
    let events: Vec<_> = audit(&p.h2)
        .iter()
        .filter_map(|r| r["detail"]["event"].as_str().map(str::to_owned))
        .collect();
    assert!(events.iter().any(|e| e == "audit-pruned"), "{events:?}");
}
