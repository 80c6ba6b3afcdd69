//! The kernel's number and flag parsers, as sysfs `store` methods call them.

use crate::actuator::Errno;

/// `_parse_integer_fixup_radix` for base 0: `0x` + a hex digit → 16, a leading
/// `0` → 8, else 10. Returns the base and how many bytes the prefix takes.
fn radix(s: &[u8]) -> (u32, usize) {
    if s.first() == Some(&b'0') {
        if s.get(1).is_some_and(|c| c.eq_ignore_ascii_case(&b'x'))
            && s.get(2).is_some_and(u8::is_ascii_hexdigit)
        {
            (16, 2)
        } else {
            (8, 0)
        }
    } else {
        (10, 0)
    }
}

/// Parses digits of `base` from the start of `s`: (value, digits used, overflowed).
fn digits(s: &[u8], base: u32) -> (u64, usize, bool) {
    let mut v: u64 = 0;
    let mut over = false;
    let mut n = 0;
    for &c in s {
        let Some(d) = char::from(c).to_digit(16).filter(|d| *d < base) else {
            break;
        };
        match v
            .checked_mul(u64::from(base))
            .and_then(|x| x.checked_add(u64::from(d)))
        {
            Some(x) => v = x,
            None => over = true,
        }
        n += 1;
    }
    (v, n, over)
}

/// `kstrtoull(s, 0)`: an optional `+`, a base-0 number, one optional trailing
/// newline. `EINVAL` for anything else, `ERANGE` on overflow.
pub(super) fn kstrtoull(s: &[u8]) -> Result<u64, Errno> {
    let s = s.strip_prefix(b"+").unwrap_or(s);
    let (base, skip) = radix(s);
    let (v, n, over) = digits(&s[skip..], base);
    if over {
        return Err(Errno::ERANGE);
    }
    if n == 0 {
        return Err(Errno::EINVAL);
    }
    let rest = &s[skip + n..];
    if rest.is_empty() || rest == b"\n" {
        Ok(v)
    } else {
        Err(Errno::EINVAL)
    }
}

/// `kstrtou16(s, 0)`.
pub(super) fn kstrtou16(s: &[u8]) -> Result<u16, Errno> {
    u16::try_from(kstrtoull(s)?).map_err(|_| Errno::ERANGE)
}

/// `kstrtoint(s, 0)` (an optional leading `-`).
pub(super) fn kstrtoint(s: &[u8]) -> Result<i32, Errno> {
    if let Some(rest) = s.strip_prefix(b"-") {
        let v = kstrtoull(rest)?;
        let v = i64::try_from(v).map_err(|_| Errno::ERANGE)?;
        i32::try_from(-v).map_err(|_| Errno::ERANGE)
    } else {
        i32::try_from(kstrtoull(s)?).map_err(|_| Errno::ERANGE)
    }
}

/// `kstrtobool`: looks at the first one or two characters only
/// (`y Y t T 1` / `n N f F 0` / `on` / `off`).
pub(super) fn kstrtobool(s: &[u8]) -> Result<bool, Errno> {
    match s.first() {
        Some(b'y' | b'Y' | b't' | b'T' | b'1') => Ok(true),
        Some(b'n' | b'N' | b'f' | b'F' | b'0') => Ok(false),
        Some(b'o' | b'O') => match s.get(1) {
            Some(b'n' | b'N') => Ok(true),
            Some(b'f' | b'F') => Ok(false),
            _ => Err(Errno::EINVAL),
        },
        _ => Err(Errno::EINVAL),
    }
}

/// `simple_strtoul(s, &end, 0)`: (value, bytes used including the prefix);
/// `None` when no digit was parsed. Overflow saturates (the caller range-checks).
pub(super) fn simple_strtoul(s: &[u8]) -> Option<(u64, usize)> {
    let (base, skip) = radix(s);
    let (v, n, over) = digits(&s[skip..], base);
    if n == 0 {
        return None;
    }
    Some((if over { u64::MAX } else { v }, skip + n))
}

/// The value of a write with one trailing newline removed, as `sysfs_streq`
/// compares it.
pub(super) fn strip_nl(v: &[u8]) -> &[u8] {
    v.strip_suffix(b"\n").unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kstrto_like_the_kernel() {
        assert_eq!(kstrtoull(b"12\n"), Ok(12));
        assert_eq!(kstrtoull(b"+0x1f"), Ok(31));
        assert_eq!(kstrtoull(b"010"), Ok(8));
        assert_eq!(kstrtoull(b"0"), Ok(0));
        assert_eq!(kstrtoull(b"0x"), Err(Errno::EINVAL));
        assert_eq!(kstrtoull(b""), Err(Errno::EINVAL));
        assert_eq!(kstrtoull(b"\n"), Err(Errno::EINVAL));
        assert_eq!(kstrtoull(b"1 "), Err(Errno::EINVAL));
        assert_eq!(kstrtoull(b"-1"), Err(Errno::EINVAL));
        assert_eq!(kstrtoull(b"09"), Err(Errno::EINVAL));
        assert_eq!(kstrtoull(b"99999999999999999999999"), Err(Errno::ERANGE));
        assert_eq!(kstrtou16(b"65536"), Err(Errno::ERANGE));
        assert_eq!(kstrtou16(b"65535"), Ok(65535));
        assert_eq!(kstrtoint(b"-1\n"), Ok(-1));
        assert_eq!(kstrtobool(b"Yes"), Ok(true));
        assert_eq!(kstrtobool(b"off"), Ok(false));
        assert_eq!(kstrtobool(b"x"), Err(Errno::EINVAL));
        assert_eq!(kstrtobool(b""), Err(Errno::EINVAL));
        assert_eq!(simple_strtoul(b"0x47,"), Some((0x47, 4)));
        assert_eq!(simple_strtoul(b"017-"), Some((15, 3)));
        assert_eq!(simple_strtoul(b"0x,"), Some((0, 1)));
        assert_eq!(simple_strtoul(b",1"), None);
    }
}
