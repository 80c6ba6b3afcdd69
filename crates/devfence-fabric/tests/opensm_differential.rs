//! issue 17 item 5: "devfence accepts ⇒ OpenSM accepts, and reads the same
//! memberships", proven against the real OpenSM 3.3.23 on ibsim.
//!
//! A corpus of partitions files — generated (statements over the fabric's GUIDs and
//! keywords, flags, layouts, comments) and mutated (CR, NBSP and other Unicode
//! spaces, tabs, long lines near OpenSM's 4 KiB line buffer, odd separators,
//! dropped and doubled characters) — is parsed by devfence. Every file devfence
//! accepts is fed to ONE real OpenSM (write, SIGHUP, wait for the `SUBNET UP` of the
//! sweep the signal forced), and the test asserts that the sweep logged no
//! `PARSE ERROR` / `Partition configuration in error` and that every VF port's
//! P_Key table at the SA is exactly what devfence's parser predicted.
//!
//! The corpus is deterministic (a fixed seed; `DEVFENCE_DIFF_SEED` and
//! `DEVFENCE_DIFF_FILES` explore others). Its size and the OpenSM version are
//! recorded in docs/fabric-opensm.md.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use devfence_fabric::opensm::partitions::{self, PartitionsFile};
use devfence_fabric::opensm::{SaClient, SaConfig};
use devfence_fabric::{MembershipMap, PartitionKey, PortReader, Programmed};
use devfence_fabric_harness::{Fabric, FabricSpec, in_fabric};
use devfence_model::{Guid, Membership, PKey};

const BASE: Guid = Guid(0x0002_c903_00f0_0001);
/// The SM's own port (the harness's `smhost`).
const SM_PORT: Guid = Guid(0x0002_c900_0000_2001);
/// Files in the default corpus.
const FILES: usize = 600;
const SEED: u64 = 0x0de7_fe11_5eed_0017;

fn vf(i: u64) -> Guid {
    Guid(BASE.0 + 2 * i)
}

/// SplitMix64: a small deterministic generator (no crate needed for a corpus).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

/// Space around a token: mostly nothing or one space, sometimes tabs and runs.
fn ws(r: &mut Rng) -> &'static str {
    r.pick(&["", "", " ", " ", "  ", "\t", " \t ", "\t\t"])
}

/// One generated file: devfence's block (vf0 and vf1 in tenant partitions) and an
/// operator part over vf2, vf3, GUIDs not on the fabric and the keywords.
fn generate(r: &mut Rng) -> String {
    let mut map = MembershipMap::new();
    for (i, g) in [vf(0), vf(1)].into_iter().enumerate() {
        if r.chance(70) {
            let k =
                PartitionKey::new([0x8001, 0x8002][if r.chance(50) { i } else { 0 }]).expect("key");
            let m = if r.chance(80) {
                Membership::Full
            } else {
                Membership::Limited
            };
            map.insert(g, k, m).expect("insert");
        }
    }
    let block = partitions::render_block(&map);
    let guids = [
        vf(2).to_string(),
        vf(3).to_string(),
        "0x0002c90300f0ff01".into(),
        format!("0x{:x}", vf(3).0), // without leading zeros
        format!("0X{:016X}", vf(2).0),
    ];
    let keywords = ["ALL", "ALL_CAS", "ALL_SWITCHES", "SELF", "NONE"];
    let flags = [
        "ipoib",
        "mtu=4",
        "rate=3",
        "sl=0",
        "scope=2",
        "Q_Key=0x1",
        "TClass=0",
        "FlowLabel=0",
    ];
    let mut op = String::new();
    if r.chance(50) {
        op.push_str("# operator partitions\n");
    }
    let n = 1 + r.below(4);
    let mut used = BTreeSet::new();
    for s in 0..n {
        let mut base = 0x0100 + r.below(8) as u16;
        while !used.insert(base) {
            base += 1;
        }
        let pkey = if r.chance(70) { base | 0x8000 } else { base };
        let _ = write!(op, "{}op{s}{}={}0x{pkey:04x}", ws(r), ws(r), ws(r));
        for _ in 0..r.below(3) {
            let _ = write!(op, "{},{}{}", ws(r), ws(r), r.pick(&flags));
        }
        if r.chance(20) {
            let _ = write!(
                op,
                ",{}defmember={}",
                ws(r),
                r.pick(&["full", "limited", "both"])
            );
        }
        let _ = write!(op, "{}:", ws(r));
        // Sometimes none: `Name=0x8101 : ;` (an empty partition).
        let members = if r.chance(5) { 0 } else { 1 + r.below(4) };
        let mut named = BTreeSet::new();
        for m in 0..members {
            let who = if r.chance(75) {
                guids[r.below(guids.len())].clone()
            } else {
                (r.pick(&keywords)).to_owned()
            };
            if !named.insert(who.to_lowercase()) {
                continue;
            }
            if m > 0 {
                op.push(',');
                if r.chance(30) {
                    op.push('\n');
                }
            }
            let _ = write!(op, "{}{who}", ws(r));
            if r.chance(70) {
                let _ = write!(
                    op,
                    "{}={}{}",
                    ws(r),
                    ws(r),
                    r.pick(&["full", "limited", "both"])
                );
            }
        }
        let _ = write!(op, "{};", ws(r));
        if r.chance(20) {
            op.push_str(" # a comment, with ; and : and = inside");
        }
        if r.chance(80) {
            op.push('\n');
        } else {
            op.push(' ');
        }
    }
    if !op.ends_with('\n') {
        op.push('\n');
    }
    if r.chance(50) {
        format!("{op}{block}")
    } else {
        format!("{block}{op}")
    }
}

/// Characters OpenSM does not trim, and others an operator's editor leaves.
const ODD: [char; 14] = [
    '\r', '\u{a0}', '\u{2000}', '\u{2003}', '\u{2009}', '\u{200b}', '\u{202f}', '\u{3000}',
    '\u{feff}', '\u{0b}', '\u{0c}', '\u{85}', '\u{2028}', '\u{1680}',
];

fn char_boundary(t: &str, mut i: usize) -> usize {
    while !t.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// One mutation of `t`.
fn mutate(r: &mut Rng, t: &str) -> String {
    let at = char_boundary(t, r.below(t.len() + 1));
    let (a, b) = t.split_at(at);
    match r.below(12) {
        // CRLF line endings, on every line or one.
        0 => {
            if r.chance(50) {
                t.replace('\n', "\r\n")
            } else {
                let lines: Vec<&str> = t.split('\n').collect();
                let k = r.below(lines.len());
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        if i == k {
                            format!("{l}\r")
                        } else {
                            (*l).to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }
        // An odd character right after a GUID or keyword, or anywhere.
        1 | 2 => {
            let c = r.pick(&ODD);
            let spots: Vec<usize> = t
                .match_indices(['=', ',', ';', ':'])
                .map(|(i, _)| i)
                .collect();
            if spots.is_empty() || r.chance(30) {
                format!("{a}{c}{b}")
            } else {
                let i = r.pick(&spots);
                format!("{}{c}{}", &t[..i], &t[i..])
            }
        }
        // A tab for a space.
        3 => {
            let spaces: Vec<usize> = t.match_indices(' ').map(|(i, _)| i).collect();
            if spaces.is_empty() {
                format!("{a}\t{b}")
            } else {
                let i = r.pick(&spaces);
                format!("{}\t{}", &t[..i], &t[i + 1..])
            }
        }
        // A line padded to near OpenSM's 4 KiB buffer (3990..4100 bytes), with
        // spaces or with a comment.
        4 => {
            let lines: Vec<&str> = t.split('\n').collect();
            let k = r.below(lines.len());
            let target = 3990 + r.below(110);
            lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    if i != k || l.len() >= target {
                        return (*l).to_owned();
                    }
                    let pad = target - l.len();
                    if r.chance(50) {
                        format!("{}{l}", " ".repeat(pad))
                    } else {
                        format!("{l}#{}", "x".repeat(pad - 1))
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        // Odd separators.
        5 => {
            let sep = r.pick(&[";", ",", ":", "=", ", ,", ",,", ";;", ",;", "::", "=="]);
            format!("{a}{sep}{b}")
        }
        6 => t.replacen(" ;", r.pick(&[",;", " ;;", "; ;", ",\n;"]), 1),
        // A character dropped or doubled.
        7 => {
            let mut cs = b.chars();
            match cs.next() {
                Some(c) if r.chance(50) => format!("{a}{c}{c}{}", cs.as_str()),
                Some(_) => format!("{a}{}", cs.as_str()),
                None => t.to_owned(),
            }
        }
        // A comment marker in the middle of a statement.
        8 => format!("{a}#{b}"),
        // A keyword's case or a prefix of it (OpenSM matches prefixes).
        9 => t.replacen(
            r.pick(&["ALL", "full", "limited", "SELF", "ipoib", "mtu"]),
            r.pick(&["all", "AL", "ful", "lim", "SEL", "ipoi", "MTU", "f"]),
            1,
        ),
        // An empty line or a lone newline in the middle of a token.
        10 => format!("{a}\n{b}"),
        _ => format!("{a} {b}"),
    }
}

fn corpus(seed: u64, n: usize) -> Vec<String> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| {
            let mut t = generate(&mut r);
            if r.chance(60) {
                for _ in 0..1 + r.below(2) {
                    t = mutate(&mut r, &t);
                }
            }
            t
        })
        .collect()
}

/// The P_Keys devfence predicts OpenSM gives `g` (a CA port).
fn predicted(file: &PartitionsFile, g: Guid) -> BTreeSet<PKey> {
    file.opensm_pkeys_for(g)
}

fn log_since(f: &Fabric, off: usize) -> String {
    let all = std::fs::read(f.dir().join("opensm.log")).unwrap_or_default();
    String::from_utf8_lossy(&all[off.min(all.len())..]).into_owned()
}

/// Feeds `text` to OpenSM and returns the log of the sweep it forced.
fn feed(f: &Fabric, text: &str) -> String {
    let path = f.dir().join("partitions.conf");
    let tmp = f.dir().join("partitions.conf.tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
    let off = std::fs::metadata(f.dir().join("opensm.log"))
        .map(|m| usize::try_from(m.len()).unwrap_or(0))
        .unwrap_or(0);
    let before = f.subnet_up_count();
    f.hup().expect("HUP");
    f.wait_subnet_up(before, Duration::from_secs(10))
        .expect("the sweep the HUP forced");
    log_since(f, off)
}

#[test]
fn devfence_accepts_implies_opensm_accepts_the_same_memberships() {
    let mut spec = FabricSpec::vfs(4, BASE);
    spec.sweep_interval = 30;
    in_fabric(
        "devfence_accepts_implies_opensm_accepts_the_same_memberships",
        &spec,
        |f| {
            let seed = std::env::var("DEVFENCE_DIFF_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(SEED);
            let n = std::env::var("DEVFENCE_DIFF_FILES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(FILES);
            let sa = SaClient::new(SaConfig::default());
            let ports = [vf(0), vf(1), vf(2), vf(3)];
            let files = corpus(seed, n);
            let (mut accepted, mut refused) = (0usize, 0usize);
            let mut failures = Vec::new();
            let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
            for (i, text) in files.iter().enumerate() {
                let parsed = match partitions::parse(text)
                    .and_then(|p| p.ensure_defines_something().map(|()| p))
                {
                    Ok(p) => p,
                    Err(e) => {
                        refused += 1;
                        let what: String = e.what.chars().take(28).collect();
                        *refusals.entry(what).or_default() += 1;
                        continue;
                    }
                };
                accepted += 1;
                let log = feed(f, text);
                let errors: Vec<&str> = log
                    .lines()
                    .filter(|l| {
                        l.contains("PARSE ERROR") || l.contains("Partition configuration in error")
                    })
                    .collect();
                if !errors.is_empty() {
                    failures.push(format!(
                        "file {i}: devfence accepted it, OpenSM logged {errors:?}\n---\n{text:?}\n---"
                    ));
                    continue;
                }
                for g in ports {
                    let want = predicted(&parsed, g);
                    let got = match sa.read_port(g) {
                        Ok(Programmed::Present { pkeys, .. }) => pkeys,
                        other => {
                            failures.push(format!("file {i}: {g} at the SA: {other:?}"));
                            continue;
                        }
                    };
                    // The SM's own port aside, a CA port's table must be exactly
                    // what the parser predicted.
                    if g != SM_PORT && got != want {
                        failures.push(format!(
                            "file {i}: {g}: devfence predicted {want:?}, OpenSM programmed {got:?}\n---\n{text:?}\n---"
                        ));
                    }
                }
                if failures.len() > 5 {
                    break;
                }
            }
            let version = std::fs::read_to_string(f.dir().join("opensm.log"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.split_once("-> OpenSM ").map(|(_, v)| v.trim().to_owned()))
                .unwrap_or_default();
            println!(
                "differential corpus: {} files (seed {seed:#x}), {accepted} accepted and fed to OpenSM {version}, {refused} refused; refusals: {refusals:?}",
                files.len()
            );
            assert!(failures.is_empty(), "{}", failures.join("\n"));
            // The corpus must exercise both sides.
            assert!(accepted >= files.len() / 4, "only {accepted} accepted");
            assert!(refused >= files.len() / 10, "only {refused} refused");
        },
    );
}
