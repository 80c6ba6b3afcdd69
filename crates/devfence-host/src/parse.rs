//! Pure parsers of sysfs, procfs and device-node attribute values.
//!
//! Each function takes the raw bytes of one file, exactly as read, and returns the
//! value or a short reason that names the format the kernel uses (see
//! `reference/kernel-interfaces.md`). They never panic on any input — they are
//! fuzzed through [`fuzz_all`] — and they do no I/O.
//!
//! Conventions: the bytes must be UTF-8; exactly one trailing `\n` is stripped when
//! present (the kernel ends every `show` with one); nothing else is trimmed, so
//! `" 0x15b3"` is refused just as the kernel would never print it.

use devfence_model::{ApMask, ApMatrix, Guid, PKey};

/// The result of a parser: the value, or a short reason naming the expected format.
pub type ParseResult<T> = Result<T, String>;

/// The bytes as UTF-8 with one trailing `\n` removed; the error names `expected`.
fn line<'a>(b: &'a [u8], expected: &str) -> ParseResult<&'a str> {
    let s = std::str::from_utf8(b).map_err(|e| {
        format!(
            "not valid UTF-8 (bad byte at offset {}); expected {expected}",
            e.valid_up_to()
        )
    })?;
    Ok(s.strip_suffix('\n').unwrap_or(s))
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_dec(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `s` as exactly `digits` hex digits (at most 16).
fn hex_exact(s: &str, digits: usize) -> Option<u64> {
    if s.len() != digits || digits > 16 || !is_hex(s) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// `0x` and exactly `digits` hex digits.
fn prefixed_hex(b: &[u8], digits: usize, expected: &str) -> ParseResult<u64> {
    let s = line(b, expected)?;
    s.strip_prefix("0x")
        .and_then(|h| hex_exact(h, digits))
        .ok_or_else(|| format!("expected {expected}"))
}

/// Any UTF-8 text, one trailing `\n` removed (may be empty).
///
/// # Errors
/// The bytes are not UTF-8.
pub fn text(b: &[u8]) -> ParseResult<String> {
    line(b, "text").map(str::to_owned)
}

/// One non-empty line of text (`%s\n`), e.g. `DMA`, `vfio-pci`, `6.1.0-26-amd64`.
///
/// # Errors
/// Not UTF-8, empty, or more than one line.
pub fn one_line(b: &[u8]) -> ParseResult<String> {
    const E: &str = "one non-empty line of text (%s\\n)";
    let s = line(b, E)?;
    if s.is_empty() || s.contains('\n') {
        return Err(format!("expected {E}"));
    }
    Ok(s.to_owned())
}

/// A 16-bit id, `0x%04x` (`vendor`, `device`, `subsystem_*`), e.g. `0x15b3`.
///
/// # Errors
/// Anything but `0x` and 4 hex digits.
pub fn hex_u16(b: &[u8]) -> ParseResult<u16> {
    prefixed_hex(b, 4, "0x and 4 hex digits (0x%04x), e.g. 0x15b3").map(|v| v as u16)
}

/// A PCI class, `0x%06x` (base, sub, prog-if), e.g. `0x020700`.
///
/// # Errors
/// Anything but `0x` and 6 hex digits.
pub fn hex_class(b: &[u8]) -> ParseResult<u32> {
    prefixed_hex(b, 6, "0x and 6 hex digits (0x%06x), e.g. 0x020700").map(|v| v as u32)
}

/// A PCI function's identity as its `uevent` file shows it: one read for the five
/// values that `vendor`, `device`, `subsystem_vendor`, `subsystem_device` and
/// `class` hold, from the same `struct pci_dev` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIdentity {
    /// `PCI_ID`'s first half (`vendor`).
    pub vendor: u16,
    /// `PCI_ID`'s second half (`device`).
    pub device: u16,
    /// `PCI_SUBSYS_ID`: subsystem vendor and device, when the file has it.
    pub subsystem: Option<(u16, u16)>,
    /// `PCI_CLASS`: base class, subclass and programming interface (`class`).
    pub class: u32,
}

/// A PCI device's `uevent` file: `KEY=VALUE` lines, each ended by `\n`, as the
/// driver core's `uevent_show` prints the environment that `dev_uevent` and the
/// PCI bus's `pci_uevent` (`drivers/pci/pci-driver.c`) build:
///
/// ```text
/// DRIVER=mlx5_core
/// PCI_CLASS=20700
/// PCI_ID=15B3:101D
/// PCI_SUBSYS_ID=15B3:0016
/// PCI_SLOT_NAME=0000:3b:00.0
/// MODALIAS=pci:v000015B3d0000101Dsv000015B3sd00000016bc02sc07i00
/// ```
///
/// `PCI_CLASS` is `%04X` of the 24-bit class (4 to 6 hex digits), `PCI_ID` and
/// `PCI_SUBSYS_ID` are `%04X:%04X`. Other keys are skipped; the file is taken
/// whole or not at all — a line that is not `KEY=VALUE`, a key given twice, or a
/// missing `PCI_ID` or `PCI_CLASS` refuses it.
///
/// # Errors
/// Not UTF-8, a malformed line or value, a repeated key, or a missing
/// `PCI_ID`/`PCI_CLASS`; the reason names the key.
pub fn pci_uevent(b: &[u8]) -> ParseResult<PciIdentity> {
    const E: &str =
        "KEY=VALUE lines with PCI_CLASS=%04X and PCI_ID=%04X:%04X (the kernel's pci_uevent)";
    let body = line(b, E)?;
    let mut class = None;
    let mut id = None;
    let mut subsys = None;
    for (n, entry) in (1..).zip(body.split('\n')) {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(format!("line {n} is not KEY=VALUE; expected {E}"));
        };
        if key.is_empty()
            || !key
                .bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
        {
            return Err(format!(
                "line {n}: the key is not of [A-Z0-9_]; expected {E}"
            ));
        }
        let slot = match key {
            "PCI_CLASS" => {
                let digits = value.len();
                let v = hex_exact(value, digits)
                    .filter(|_| (4..=6).contains(&digits))
                    .ok_or_else(|| {
                        "PCI_CLASS: expected 4 to 6 hex digits (%04X), e.g. 20700".to_string()
                    })?;
                set_once(&mut class, v as u32, key)?;
                continue;
            }
            "PCI_ID" => &mut id,
            "PCI_SUBSYS_ID" => &mut subsys,
            _ => continue,
        };
        let pair = value
            .split_once(':')
            .and_then(|(a, b)| Some((hex_exact(a, 4)? as u16, hex_exact(b, 4)? as u16)))
            .ok_or_else(|| format!("{key}: expected %04X:%04X, e.g. 15B3:101D"))?;
        set_once(slot, pair, key)?;
    }
    let (vendor, device) = id.ok_or_else(|| format!("no PCI_ID line; expected {E}"))?;
    let class = class.ok_or_else(|| format!("no PCI_CLASS line; expected {E}"))?;
    Ok(PciIdentity {
        vendor,
        device,
        subsystem: subsys,
        class,
    })
}

/// Stores `v` in an empty `slot`; a second value for `key` is an error.
fn set_once<T>(slot: &mut Option<T>, v: T, key: &str) -> ParseResult<()> {
    if slot.is_some() {
        return Err(format!(
            "{key} appears more than once; the kernel prints it once"
        ));
    }
    *slot = Some(v);
    Ok(())
}

/// `driver_override`: a driver name, or `None` when unset (`(null)`, or empty).
///
/// # Errors
/// Not UTF-8, more than one line, or containing whitespace.
pub fn driver_override(b: &[u8]) -> ParseResult<Option<String>> {
    const E: &str = "a driver name or (null)";
    let s = line(b, E)?;
    if s.is_empty() || s == "(null)" {
        return Ok(None);
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!("expected {E}, without whitespace"));
    }
    Ok(Some(s.to_owned()))
}

/// `reset_method`: method names separated by single spaces, in priority order
/// (`flr bus`); empty when no method is enabled.
///
/// # Errors
/// Not UTF-8, or a name that is empty or not of `[A-Za-z0-9_-]`.
pub fn reset_methods(b: &[u8]) -> ParseResult<Vec<String>> {
    const E: &str = "reset method names separated by single spaces, e.g. \"flr bus\"";
    let s = line(b, E)?;
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(' ')
        .map(|m| {
            if !m.is_empty()
                && m.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
            {
                Ok(m.to_owned())
            } else {
                Err(format!("expected {E}"))
            }
        })
        .collect()
}

/// A signed decimal, `%d` (`numa_node`, `-1` when unknown).
///
/// # Errors
/// Not an optionally negative decimal that fits an `i32`.
pub fn decimal_i32(b: &[u8]) -> ParseResult<i32> {
    const E: &str = "a decimal integer (%d), e.g. 0 or -1";
    let s = line(b, E)?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if !is_dec(digits) {
        return Err(format!("expected {E}"));
    }
    s.parse::<i32>()
        .map_err(|_| format!("expected {E} within 32 bits"))
}

/// An unsigned decimal, `%u` (`sriov_totalvfs`, `available_instances`, `hwtype`).
///
/// # Errors
/// Not a decimal that fits a `u32`.
pub fn decimal_u32(b: &[u8]) -> ParseResult<u32> {
    const E: &str = "an unsigned decimal integer (%u), e.g. 16";
    let s = line(b, E)?;
    if !is_dec(s) {
        return Err(format!("expected {E}"));
    }
    s.parse::<u32>()
        .map_err(|_| format!("expected {E} within 32 bits"))
}

/// A module bool parameter: `Y`/`N` (or `1`/`0`).
///
/// # Errors
/// Anything else.
pub fn module_bool(b: &[u8]) -> ParseResult<bool> {
    const E: &str = "Y or N";
    match line(b, E)? {
        "Y" | "1" => Ok(true),
        "N" | "0" => Ok(false),
        _ => Err(format!("expected {E}")),
    }
}

/// Splits `s` on `:` into exactly `groups` groups of exactly `width` hex digits
/// and concatenates their values.
fn hex_groups(s: &str, groups: usize, width: usize) -> Option<Vec<u64>> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != groups {
        return None;
    }
    parts.into_iter().map(|p| hex_exact(p, width)).collect()
}

fn combine(values: &[u64], bits: u32) -> u64 {
    values.iter().fold(0u64, |acc, v| (acc << bits) | v)
}

/// An IB `node_guid`/`sys_image_guid`, `%04x:%04x:%04x:%04x`.
///
/// # Errors
/// Anything but four groups of 4 hex digits.
pub fn ib_node_guid(b: &[u8]) -> ParseResult<Guid> {
    const E: &str = "four groups of 4 hex digits (%04x:%04x:%04x:%04x)";
    let s = line(b, E)?;
    hex_groups(s, 4, 4)
        .map(|v| Guid(combine(&v, 16)))
        .ok_or_else(|| format!("expected {E}"))
}

/// The port GUID from `gids/0`: a GID in uncompressed `%pI6` form (8 groups of 4
/// hex digits); the GUID is its low 64 bits.
///
/// # Errors
/// Anything but eight groups of 4 hex digits.
pub fn gid_port_guid(b: &[u8]) -> ParseResult<Guid> {
    const E: &str =
        "a GID as 8 groups of 4 hex digits, e.g. fe80:0000:0000:0000:0002:c903:00a1:b2c3";
    let s = line(b, E)?;
    hex_groups(s, 8, 4)
        .map(|v| Guid(combine(&v[4..], 16)))
        .ok_or_else(|| format!("expected {E}"))
}

/// An OFED `sriov/<N>/{node,port}` GUID, `xx:xx:xx:xx:xx:xx:xx:xx`.
///
/// # Errors
/// Anything but eight groups of 2 hex digits.
pub fn ofed_guid(b: &[u8]) -> ParseResult<Guid> {
    const E: &str = "8 colon-separated hex bytes (xx:xx:xx:xx:xx:xx:xx:xx)";
    let s = line(b, E)?;
    hex_groups(s, 8, 2)
        .map(|v| Guid(combine(&v, 8)))
        .ok_or_else(|| format!("expected {E}"))
}

/// An OFED `sriov/<N>/policy`: `Down`, `Up` or `Follow`.
///
/// # Errors
/// Anything else.
pub fn ofed_policy(b: &[u8]) -> ParseResult<String> {
    const E: &str = "Down, Up or Follow";
    match line(b, E)? {
        s @ ("Down" | "Up" | "Follow") => Ok(s.to_owned()),
        _ => Err(format!("expected {E}")),
    }
}

/// A P_Key table slot, `pkeys/<i>`: `0x%04x`.
///
/// # Errors
/// Anything but `0x` and 4 hex digits.
pub fn pkey(b: &[u8]) -> ParseResult<PKey> {
    prefixed_hex(b, 4, "0x and 4 hex digits (0x%04x), e.g. 0xffff").map(|v| PKey(v as u16))
}

/// A LID (`lid`, `sm_lid`): `0x%x`, 1 to 4 hex digits.
///
/// # Errors
/// Anything but `0x` and 1 to 4 hex digits.
pub fn lid(b: &[u8]) -> ParseResult<u16> {
    const E: &str = "0x and 1 to 4 hex digits (0x%x), e.g. 0x1a";
    let s = line(b, E)?;
    s.strip_prefix("0x")
        .filter(|h| h.len() <= 4)
        .and_then(|h| hex_exact(h, h.len()))
        .map(|v| v as u16)
        .ok_or_else(|| format!("expected {E}"))
}

/// Text of the form `%d: %s`, e.g. `4: ACTIVE`, `1: CA`; returned as it is.
fn numbered_name(b: &[u8], expected: &str) -> ParseResult<String> {
    let s = line(b, expected)?;
    match s.split_once(": ") {
        Some((n, name)) if is_dec(n) && !name.is_empty() && !name.contains('\n') => {
            Ok(s.to_owned())
        }
        _ => Err(format!("expected {expected}")),
    }
}

/// An IB port `state`: `%d: %s`, e.g. `4: ACTIVE`.
///
/// # Errors
/// Not of the form `<number>: <name>`.
pub fn ib_port_state(b: &[u8]) -> ParseResult<String> {
    numbered_name(b, "a numbered state (%d: %s), e.g. 4: ACTIVE")
}

/// An IB device `node_type`: `%u: %s`, e.g. `1: CA`.
///
/// # Errors
/// Not of the form `<number>: <name>`.
pub fn ib_node_type(b: &[u8]) -> ParseResult<String> {
    numbered_name(b, "a numbered node type (%u: %s), e.g. 1: CA")
}

/// `apmask`/`aqmask`: `0x` and exactly 64 hex digits (256 bits, bit 0 leftmost).
///
/// # Errors
/// A missing `0x`, a non-hex digit, or a length other than 64 digits (named).
pub fn ap_mask(b: &[u8]) -> ParseResult<ApMask> {
    const E: &str = "0x and 64 hex digits (256 bits)";
    let s = line(b, E)?;
    let h = s
        .strip_prefix("0x")
        .ok_or_else(|| format!("expected {E}; the value does not start with 0x"))?;
    if h.len() != 64 {
        return Err(format!(
            "expected {E}, found {} characters after 0x",
            h.len()
        ));
    }
    if !is_hex(h) {
        return Err(format!(
            "expected {E}; found a character that is not a hex digit"
        ));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = h.get(2 * i..2 * i + 2).unwrap_or("");
        *o = u8::from_str_radix(pair, 16).map_err(|_| format!("expected {E}"))?;
    }
    Ok(ApMask(out))
}

/// A domain (APQI) written with 4 hex digits, at most `0x00ff`.
fn ap_domain(s: &str) -> Option<u8> {
    hex_exact(s, 4).and_then(|v| u8::try_from(v).ok())
}

/// An adapter (APID) written with 2 hex digits.
fn ap_adapter(s: &str) -> Option<u8> {
    hex_exact(s, 2).map(|v| v as u8)
}

/// A 256-bit set, for sorting and deduplicating ids.
#[derive(Default)]
struct IdSet([u64; 4]);

impl IdSet {
    fn insert(&mut self, n: u8) {
        self.0[usize::from(n >> 6)] |= 1 << (n & 63);
    }
    fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
    fn to_vec(&self) -> Vec<u8> {
        (0..=255u8)
            .filter(|&n| self.0[usize::from(n >> 6)] & (1 << (n & 63)) != 0)
            .collect()
    }
}

/// A vfio_ap `matrix`/`guest_matrix`: one `%02lx.%04lx` line per APQN (the cross
/// product of the assigned adapters and domains), or `%02lx.` lines when only
/// adapters are assigned, or `.%04lx` lines when only domains are, or nothing.
/// Adapters and domains come back sorted and deduplicated.
///
/// # Errors
/// A line of another form, a domain above `0x00ff`, a mix of the three line
/// forms, or full APQN lines that are not a complete cross product.
pub fn ap_matrix(b: &[u8]) -> ParseResult<ApMatrix> {
    const E: &str = "lines AA.DDDD (or AA. / .DDDD) in hex, domain at most 00ff";
    let body = line(b, E)?;
    let mut adapters = IdSet::default();
    let mut domains = IdSet::default();
    if body.is_empty() {
        return Ok(ApMatrix::default());
    }
    // Which of the three line forms were seen: full, adapter-only, domain-only.
    let mut forms = [false; 3];
    let mut seen = [0u64; 1024];
    let mut distinct = 0usize;
    for (n, l) in body.split('\n').enumerate() {
        let bad = || {
            format!(
                "line {}: {:?}: expected {E}",
                n + 1,
                l.chars().take(20).collect::<String>()
            )
        };
        let (a, d) = l.split_once('.').ok_or_else(bad)?;
        match (a.is_empty(), d.is_empty()) {
            (false, false) => {
                let (a, d) = ap_adapter(a).zip(ap_domain(d)).ok_or_else(bad)?;
                forms[0] = true;
                adapters.insert(a);
                domains.insert(d);
                let i = usize::from(a) << 8 | usize::from(d);
                if seen[i >> 6] & (1 << (i & 63)) == 0 {
                    seen[i >> 6] |= 1 << (i & 63);
                    distinct += 1;
                }
            }
            (false, true) => {
                adapters.insert(ap_adapter(a).ok_or_else(bad)?);
                forms[1] = true;
            }
            (true, false) => {
                domains.insert(ap_domain(d).ok_or_else(bad)?);
                forms[2] = true;
            }
            (true, true) => return Err(bad()),
        }
    }
    if forms.iter().filter(|f| **f).count() > 1 {
        return Err(format!(
            "expected {E}; the value mixes full APQN lines with adapter-only or domain-only lines"
        ));
    }
    if forms[0] && distinct != adapters.len() * domains.len() {
        return Err(format!(
            "expected every adapter crossed with every domain; {distinct} APQNs for {} adapters and {} domains",
            adapters.len(),
            domains.len()
        ));
    }
    Ok(ApMatrix {
        adapters: adapters.to_vec(),
        domains: domains.to_vec(),
    })
}

/// A vfio_ap `control_domains`: one `%04lx` line per control domain (at most
/// `0x00ff`), returned sorted and deduplicated.
///
/// # Errors
/// A line that is not 4 hex digits at most `00ff`.
pub fn control_domains(b: &[u8]) -> ParseResult<Vec<u8>> {
    const E: &str = "one domain per line as 4 hex digits (%04lx), at most 00ff";
    let s = std::str::from_utf8(b).map_err(|e| {
        format!(
            "not valid UTF-8 (bad byte at offset {}); expected {E}",
            e.valid_up_to()
        )
    })?;
    let body = s.strip_suffix('\n').unwrap_or(s);
    let mut set = IdSet::default();
    if body.is_empty() {
        return Ok(Vec::new());
    }
    for (n, l) in body.split('\n').enumerate() {
        let d = ap_domain(l).ok_or_else(|| {
            format!(
                "line {}: {:?}: expected {E}",
                n + 1,
                l.chars().take(20).collect::<String>()
            )
        })?;
        set.insert(d);
    }
    Ok(set.to_vec())
}

/// A `vfio-dev/vfio<X>/dev` device number, `major:minor` in decimal; returned in
/// that form (`511:3`).
///
/// # Errors
/// Not two decimal numbers separated by `:`.
pub fn vfio_dev_number(b: &[u8]) -> ParseResult<String> {
    const E: &str = "major:minor in decimal, e.g. 511:3";
    let s = line(b, E)?;
    match s.split_once(':') {
        Some((ma, mi)) if is_dec(ma) && is_dec(mi) => {
            let ma: u32 = ma.parse().map_err(|_| format!("expected {E}"))?;
            let mi: u32 = mi.parse().map_err(|_| format!("expected {E}"))?;
            Ok(format!("{ma}:{mi}"))
        }
        _ => Err(format!("expected {E}")),
    }
}

/// A `security.selinux` extended attribute: UTF-8, one trailing NUL removed.
///
/// # Errors
/// Not UTF-8 or empty.
pub fn selinux_label(b: &[u8]) -> ParseResult<String> {
    const E: &str = "an SELinux context, e.g. system_u:object_r:vfio_device_t:s0";
    let b = b.strip_suffix(&[0]).unwrap_or(b);
    let s = std::str::from_utf8(b).map_err(|e| {
        format!(
            "not valid UTF-8 (bad byte at offset {}); expected {E}",
            e.valid_up_to()
        )
    })?;
    if s.is_empty() {
        return Err(format!("expected {E}"));
    }
    Ok(s.to_owned())
}

/// Runs every parser on `data` and ignores the results: the body of the fuzz
/// target (every parser must return, never panic).
pub fn fuzz_all(data: &[u8]) {
    let _ = text(data);
    let _ = one_line(data);
    let _ = hex_u16(data);
    let _ = hex_class(data);
    let _ = pci_uevent(data);
    let _ = driver_override(data);
    let _ = reset_methods(data);
    let _ = decimal_i32(data);
    let _ = decimal_u32(data);
    let _ = module_bool(data);
    let _ = ib_node_guid(data);
    let _ = gid_port_guid(data);
    let _ = ofed_guid(data);
    let _ = ofed_policy(data);
    let _ = pkey(data);
    let _ = lid(data);
    let _ = ib_port_state(data);
    let _ = ib_node_type(data);
    let _ = ap_mask(data);
    let _ = ap_matrix(data);
    let _ = control_domains(data);
    let _ = vfio_dev_number(data);
    let _ = selinux_label(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a real 6.x kernel shows for a bound VF (`cat .../uevent`), and the
    /// ways a file that is not the kernel's is refused whole.
    #[test]
    fn pci_uevent_reads_the_identity_or_refuses_the_file() {
        let real = b"DRIVER=mlx5_core\nPCI_CLASS=20700\nPCI_ID=15B3:101E\nPCI_SUBSYS_ID=15B3:0016\nPCI_SLOT_NAME=0000:3b:00.1\nMODALIAS=pci:v000015B3d0000101Esv000015B3sd00000016bc02sc07i00\n";
        assert_eq!(
            pci_uevent(real).unwrap(),
            PciIdentity {
                vendor: 0x15b3,
                device: 0x101e,
                subsystem: Some((0x15b3, 0x0016)),
                class: 0x020700,
            }
        );
        // Six digits of class, lower case, no subsystem, no trailing newline.
        let v = pci_uevent(b"PCI_CLASS=c0330\nPCI_ID=8086:a0ed").unwrap();
        assert_eq!((v.class, v.vendor, v.subsystem), (0x0c0330, 0x8086, None));
        assert_eq!(
            pci_uevent(b"PCI_CLASS=0000\nPCI_ID=0000:0000\n")
                .unwrap()
                .class,
            0
        );
        for (bad, says) in [
            (&b"PCI_ID=15B3:101E\n"[..], "no PCI_CLASS"),
            (b"PCI_CLASS=20700\n", "no PCI_ID"),
            (
                b"PCI_CLASS=20700\nPCI_ID=15B:101E\n",
                "PCI_ID: expected %04X:%04X",
            ),
            (b"PCI_CLASS=20700\nPCI_ID=15B3101E\n", "PCI_ID: expected"),
            (b"PCI_CLASS=20700\nPCI_ID=15B3:101E:0\n", "PCI_ID: expected"),
            (
                b"PCI_CLASS=2070000\nPCI_ID=15B3:101E\n",
                "PCI_CLASS: expected 4 to 6",
            ),
            (
                b"PCI_CLASS=207\nPCI_ID=15B3:101E\n",
                "PCI_CLASS: expected 4 to 6",
            ),
            (
                b"PCI_CLASS=+2070\nPCI_ID=15B3:101E\n",
                "PCI_CLASS: expected",
            ),
            (
                b"PCI_CLASS=20700\nPCI_ID=15B3:101E\nPCI_ID=15B3:101D\n",
                "PCI_ID appears more than once",
            ),
            (
                b"PCI_CLASS=20700\nPCI_CLASS=20700\nPCI_ID=15B3:101E\n",
                "PCI_CLASS appears more than once",
            ),
            (
                b"PCI_CLASS=20700\n\nPCI_ID=15B3:101E\n",
                "line 2 is not KEY=VALUE",
            ),
            (
                b"PCI_CLASS=20700\nPCI_ID=15B3:101E\n\n",
                "line 3 is not KEY=VALUE",
            ),
            (b"pci_class=20700\nPCI_ID=15B3:101E\n", "line 1: the key"),
            (
                b"=x\nPCI_CLASS=20700\nPCI_ID=15B3:101E\n",
                "line 1: the key",
            ),
            (
                b"PCI_CLASS=20700\r\nPCI_ID=15B3:101E\n",
                "PCI_CLASS: expected",
            ),
            (b"PCI_CLASS=20700\nPCI_ID=15B3:\xff01E\n", "UTF-8"),
            (b"", "line 1 is not KEY=VALUE"),
        ] {
            let e = pci_uevent(bad).unwrap_err();
            assert!(e.contains(says), "{:?}: {e}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn text_strips_exactly_one_newline() {
        assert_eq!(text(b"abc\n").unwrap(), "abc");
        assert_eq!(text(b"abc\n\n").unwrap(), "abc\n");
        assert_eq!(text(b"abc").unwrap(), "abc");
        assert_eq!(text(b"").unwrap(), "");
        let e = text(b"a\xffb\n").unwrap_err();
        assert!(e.contains("UTF-8") && e.contains("offset 1"), "{e}");
        assert_eq!(one_line(b"DMA\n").unwrap(), "DMA");
        assert_eq!(one_line(b"in use\n").unwrap(), "in use");
        assert!(one_line(b"\n").is_err());
        assert!(one_line(b"a\nb\n").is_err());
    }

    #[test]
    fn hex_ids() {
        assert_eq!(hex_u16(b"0x15b3\n").unwrap(), 0x15b3);
        assert_eq!(hex_u16(b"0xFFFF\n").unwrap(), 0xffff);
        for bad in [
            &b"15b3\n"[..],
            b"0x15b\n",
            b"0x15b3a\n",
            b"0x15g3\n",
            b" 0x15b3\n",
            b"0x+5b3\n",
            b"",
            b"\xff\xfe",
        ] {
            let e = hex_u16(bad).unwrap_err();
            assert!(e.contains("0x%04x"), "{bad:?}: {e}");
        }
        assert_eq!(hex_class(b"0x020700\n").unwrap(), 0x020700);
        assert!(hex_class(b"0x0207\n").unwrap_err().contains("0x%06x"));
        assert!(hex_class(b"0x02070000\n").is_err());
    }

    #[test]
    fn driver_override_null_is_unset() {
        assert_eq!(driver_override(b"(null)\n").unwrap(), None);
        assert_eq!(driver_override(b"\n").unwrap(), None);
        assert_eq!(driver_override(b"").unwrap(), None);
        assert_eq!(
            driver_override(b"vfio-pci\n").unwrap().as_deref(),
            Some("vfio-pci")
        );
        assert!(driver_override(b"vfio pci\n").is_err());
        assert!(driver_override(b"\xc3\x28\n").is_err());
    }

    #[test]
    fn reset_method_lists() {
        assert_eq!(reset_methods(b"flr bus\n").unwrap(), vec!["flr", "bus"]);
        assert_eq!(
            reset_methods(b"device_specific\n").unwrap(),
            vec!["device_specific"]
        );
        assert!(reset_methods(b"\n").unwrap().is_empty());
        assert!(reset_methods(b"").unwrap().is_empty());
        assert!(reset_methods(b"flr  bus\n").is_err());
        assert!(reset_methods(b"flr bus \n").is_err());
        assert!(reset_methods(b"fl/r\n").is_err());
    }

    #[test]
    fn decimals_and_bools() {
        assert_eq!(decimal_i32(b"-1\n").unwrap(), -1);
        assert_eq!(decimal_i32(b"0\n").unwrap(), 0);
        assert_eq!(decimal_i32(b"-2147483648\n").unwrap(), i32::MIN);
        for bad in [
            &b"+1\n"[..],
            b"-\n",
            b"1.0\n",
            b"\n",
            b"2147483648\n",
            b" 1\n",
        ] {
            assert!(decimal_i32(bad).is_err(), "{bad:?}");
        }
        assert_eq!(decimal_u32(b"16\n").unwrap(), 16);
        assert_eq!(decimal_u32(b"4294967295").unwrap(), u32::MAX);
        for bad in [&b"-1\n"[..], b"+1\n", b"0x10\n", b"4294967296\n", b""] {
            let e = decimal_u32(bad).unwrap_err();
            assert!(e.contains("%u"), "{bad:?}: {e}");
        }
        assert!(module_bool(b"Y\n").unwrap());
        assert!(!module_bool(b"N\n").unwrap());
        assert!(module_bool(b"1\n").unwrap());
        assert!(!module_bool(b"0").unwrap());
        assert!(module_bool(b"y\n").unwrap_err().contains("Y or N"));
        assert!(module_bool(b"YES\n").is_err());
    }

    #[test]
    fn guids() {
        let want = Guid(0x0002_c903_00a1_b2c3);
        assert_eq!(ib_node_guid(b"0002:c903:00a1:b2c3\n").unwrap(), want);
        assert!(ib_node_guid(b"0002:c903:00a1\n").is_err());
        assert!(ib_node_guid(b"0002:c903:00a1:b2c34\n").is_err());
        assert!(ib_node_guid(b"00:02:c9:03:00:a1:b2:c3\n").is_err());
        assert_eq!(
            gid_port_guid(b"fe80:0000:0000:0000:0002:c903:00a1:b2c3\n").unwrap(),
            want
        );
        assert_eq!(
            gid_port_guid(b"0000:0000:0000:0000:0000:0000:0000:0000\n").unwrap(),
            Guid(0)
        );
        assert!(gid_port_guid(b"fe80::2:c903:a1:b2c3\n").is_err());
        assert!(gid_port_guid(b"fe80:0000:0000:0000:0002:c903:00a1\n").is_err());
        assert_eq!(ofed_guid(b"00:02:c9:03:00:a1:b2:c3\n").unwrap(), want);
        assert!(ofed_guid(b"00:02:c9:03:00:a1:b2\n").is_err());
        assert!(ofed_guid(b"0:02:c9:03:00:a1:b2:c3\n").is_err());
        assert!(
            ofed_guid(b"0002:c903:00a1:b2c3\n")
                .unwrap_err()
                .contains("xx:xx")
        );
        assert_eq!(ofed_policy(b"Follow\n").unwrap(), "Follow");
        assert!(ofed_policy(b"follow\n").is_err());
    }

    #[test]
    fn pkeys_lids_states() {
        assert_eq!(pkey(b"0xffff\n").unwrap(), PKey(0xffff));
        assert_eq!(pkey(b"0x0000\n").unwrap(), PKey(0));
        assert!(pkey(b"0xffff1\n").is_err());
        assert!(pkey(b"ffff\n").is_err());
        assert_eq!(lid(b"0x1a\n").unwrap(), 0x1a);
        assert_eq!(lid(b"0x0\n").unwrap(), 0);
        assert_eq!(lid(b"0xbfff\n").unwrap(), 0xbfff);
        assert!(lid(b"0x\n").is_err());
        assert!(lid(b"0x10000\n").is_err());
        assert!(lid(b"26\n").is_err());
        assert_eq!(ib_port_state(b"4: ACTIVE\n").unwrap(), "4: ACTIVE");
        assert!(ib_port_state(b"ACTIVE\n").is_err());
        assert!(ib_port_state(b"4:ACTIVE\n").is_err());
        assert!(ib_port_state(b"x: ACTIVE\n").is_err());
        assert_eq!(ib_node_type(b"1: CA\n").unwrap(), "1: CA");
        assert!(ib_node_type(b"1: \n").is_err());
    }

    #[test]
    fn ap_masks() {
        let text_ok = format!("0x41{}\n", "0".repeat(62));
        let m = ap_mask(text_ok.as_bytes()).unwrap();
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![1, 7]);
        let all = format!("0x{}\n", "f".repeat(64));
        assert_eq!(ap_mask(all.as_bytes()).unwrap(), ApMask::ALL);
        let short = format!("0x{}\n", "f".repeat(63));
        let e = ap_mask(short.as_bytes()).unwrap_err();
        assert!(e.contains("found 63 characters"), "{e}");
        let long = format!("0x{}\n", "f".repeat(65));
        assert!(ap_mask(long.as_bytes()).unwrap_err().contains("65"));
        let nohex = format!("0x{}g\n", "f".repeat(63));
        assert!(ap_mask(nohex.as_bytes()).unwrap_err().contains("hex digit"));
        let nox = "f".repeat(66);
        assert!(ap_mask(nox.as_bytes()).unwrap_err().contains("0x"));
        // Multi-byte characters must not make slicing panic.
        let wide = format!("0x{}\n", "é".repeat(32));
        assert!(ap_mask(wide.as_bytes()).is_err());
    }

    #[test]
    fn ap_matrices() {
        let m = ap_matrix(b"05.0004\n05.0012\n06.0004\n06.0012\n").unwrap();
        assert_eq!(m.adapters, vec![5, 6]);
        assert_eq!(m.domains, vec![4, 0x12]);
        // Unsorted and duplicated lines are accepted and normalised.
        let m = ap_matrix(b"06.0012\n05.0004\n06.0004\n05.0012\n05.0004\n").unwrap();
        assert_eq!((m.adapters, m.domains), (vec![5, 6], vec![4, 0x12]));
        let m = ap_matrix(b"07.\n03.\n").unwrap();
        assert_eq!((m.adapters, m.domains), (vec![3, 7], vec![]));
        let m = ap_matrix(b".00ff\n.0001\n").unwrap();
        assert_eq!((m.adapters, m.domains), (vec![], vec![1, 0xff]));
        assert_eq!(ap_matrix(b"").unwrap(), ApMatrix::default());
        assert_eq!(ap_matrix(b"\n").unwrap(), ApMatrix::default());
        let e = ap_matrix(b"05.0100\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("00ff"), "{e}");
        assert!(ap_matrix(b"5.0004\n").is_err());
        assert!(ap_matrix(b"05.004\n").is_err());
        assert!(ap_matrix(b"05.0004\n\n05.0005\n").is_err());
        assert!(ap_matrix(b".\n").is_err());
        assert!(ap_matrix(b"05\n").is_err());
        assert!(ap_matrix(b"05.\n.0004\n").unwrap_err().contains("mixes"));
        let e = ap_matrix(b"05.0004\n06.0005\n").unwrap_err();
        assert!(e.contains("2 APQNs for 2 adapters and 2 domains"), "{e}");
        assert!(ap_matrix(b"05.0004\xff\n").is_err());
    }

    #[test]
    fn control_domain_lists() {
        assert_eq!(
            control_domains(b"0012\n0004\n0004\n").unwrap(),
            vec![4, 0x12]
        );
        assert!(control_domains(b"").unwrap().is_empty());
        assert!(control_domains(b"0100\n").is_err());
        assert!(control_domains(b"12\n").is_err());
        assert!(control_domains(b"0012\n\n").is_err());
    }

    #[test]
    fn vfio_dev_numbers_and_labels() {
        assert_eq!(vfio_dev_number(b"511:3\n").unwrap(), "511:3");
        for bad in [
            &b"511\n"[..],
            b"511:\n",
            b":3\n",
            b"511:3:1\n",
            b"0x1ff:3\n",
            b"99999999999:1\n",
        ] {
            assert!(vfio_dev_number(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            selinux_label(b"system_u:object_r:vfio_device_t:s0\0").unwrap(),
            "system_u:object_r:vfio_device_t:s0"
        );
        assert_eq!(selinux_label(b"x").unwrap(), "x");
        assert!(selinux_label(b"\0").is_err());
        assert!(selinux_label(b"\xff\0").is_err());
    }

    #[test]
    fn fuzz_all_survives_odd_inputs() {
        let mut inputs: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0xff; 100],
            b"\n\n\n".to_vec(),
            b"0x".to_vec(),
            b":::::::".to_vec(),
            b".".to_vec(),
            "é:é:é:é".as_bytes().to_vec(),
            format!("0x{}", "é".repeat(40)).into_bytes(),
        ];
        let mut big = Vec::new();
        for a in 0..=255u32 {
            big.extend_from_slice(format!("{a:02x}.00{a:02x}\n").as_bytes());
        }
        inputs.push(big);
        for i in &inputs {
            fuzz_all(i);
        }
    }
}
