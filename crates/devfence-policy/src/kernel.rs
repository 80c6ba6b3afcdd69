//! The running kernel's version, where rules depend on it.

use std::fmt;

/// The leading `X.Y` of a kernel release such as `6.1.0-26-amd64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl KernelVersion {
    /// `X.Y`.
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Parses the leading `X.Y` of a release string; `None` when it has none.
    pub fn parse(release: &str) -> Option<Self> {
        let s = release.trim();
        let (major, rest) = s.split_once('.')?;
        let minor_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let minor = rest.get(..minor_len)?;
        let digits = |t: &str| -> Option<u32> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            t.parse().ok()
        };
        Some(Self::new(digits(major)?, digits(minor)?))
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_leading_major_minor() {
        let v = |s| KernelVersion::parse(s);
        assert_eq!(v("6.1.0-26-amd64"), Some(KernelVersion::new(6, 1)));
        assert_eq!(v("5.19-rc1"), Some(KernelVersion::new(5, 19)));
        assert_eq!(v("6.12.3+deb13-amd64\n"), Some(KernelVersion::new(6, 12)));
        assert_eq!(
            v("4.18.0-553.el8_10.x86_64"),
            Some(KernelVersion::new(4, 18))
        );
        for bad in [
            "",
            "6",
            "six.one",
            "6.",
            ".1",
            "+6.1",
            "6.x",
            "99999999999.1",
        ] {
            assert_eq!(v(bad), None, "{bad}");
        }
        assert!(KernelVersion::new(5, 18) < KernelVersion::new(5, 19));
        assert!(KernelVersion::new(6, 16) < KernelVersion::new(6, 17));
    }
}
