//! Parsing of the identifiers operators type: a device (a PCI address, an mdev
//! UUID, an APQN) and a PCI address. A PCI address may omit its domain
//! (`3b:00.1`, as lspci prints it and libvirt accepts): domain 0000 is meant.

use std::borrow::Cow;

use anyhow::{Result, anyhow};
use devfence_model::{Bdf, DeviceId};

/// `bus:slot.function` without a domain gets domain `0000`; anything else is
/// left as typed (and parsed strictly).
fn with_domain(s: &str) -> Cow<'_, str> {
    let b = s.as_bytes();
    let short = b.len() == 7
        && b[2] == b':'
        && b[5] == b'.'
        && [0, 1, 3, 4].iter().all(|&i| b[i].is_ascii_hexdigit())
        && (b'0'..=b'7').contains(&b[6]);
    if short {
        Cow::Owned(format!("0000:{s}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// A device as typed on the command line.
pub fn device(s: &str) -> Result<DeviceId> {
    with_domain(s)
        .parse::<DeviceId>()
        .map_err(|e| anyhow!("{e}"))
}

/// A PCI address as typed on the command line.
pub fn bdf(s: &str) -> Result<Bdf> {
    with_domain(s)
        .parse::<Bdf>()
        .map_err(|e| anyhow!("{e}. Hint: `devfence inventory` lists the host's PCI functions"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// issue 15 item 4: the short form lspci prints is the same device.
    #[test]
    fn a_short_pci_address_means_domain_0000() {
        assert_eq!(device("3b:00.1").ok(), device("0000:3b:00.1").ok());
        assert_eq!(bdf("5e:10.0").ok(), bdf("0000:5e:10.0").ok());
        assert!(device("0000:3b:00.1").is_ok());
        for bad in ["3b:00.8", "3b:0.1", "g3:00.1", "3b-00.1", "3b:00.1 "] {
            assert!(bdf(bad).is_err(), "{bad}");
        }
    }
}
