//! What the libvirt qemu hook needs from a domain: its passthrough devices, read
//! from the domain XML libvirt passes on stdin, and the decision whether it may
//! start.
//!
//! libvirt runs `/etc/libvirt/hooks/qemu DOMAIN OPERATION SUBOP` with the live
//! domain XML on stdin. [`parse_domain`] reads that document into a
//! [`DomainSpec`] — the name, the tenant named by devfence's metadata, and every
//! host device the domain would be given (`<hostdev>` PCI functions and mdevs,
//! `<interface type='hostdev'>` VFs). [`decide_prepare`] then admits the domain
//! only if every one of those devices is `Ready` for one tenant (and for this
//! domain, when the assignment named one); otherwise it returns a [`Refusal`]
//! whose one-line [`Display`](fmt::Display) libvirt shows to the user.
//!
//! Both functions are pure: no I/O, the ledger is reached through a closure, and
//! no input makes them panic (docs/design.md §2: fail closed; every refusal explains
//! itself).

use std::collections::HashMap;
use std::fmt;

use devfence_model::{Bdf, DeviceId, MdevUuid, TenantId};
use roxmltree::{Document, Node, ParsingOptions};

use crate::store::DeviceState;

/// The largest domain XML [`parse_domain`] reads (4 MiB); a real one is a few KiB.
pub const MAX_DOMAIN_XML: usize = 4 * 1024 * 1024;

/// The most XML nodes [`parse_domain`] builds; a real domain has a few hundred.
const MAX_NODES: u32 = 200_000;

/// The XML namespace of devfence's libvirt metadata:
/// `<metadata><devfence:tenant xmlns:devfence="https://devfence.dev/xmlns/libvirt/1" id="acme"/></metadata>`.
pub const DEVFENCE_XMLNS: &str = "https://devfence.dev/xmlns/libvirt/1";

/// The XML namespace of libvirt's QEMU passthrough elements (`<qemu:commandline>`,
/// `<qemu:override>`).
const QEMU_XMLNS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// The longest domain name accepted, in bytes.
const MAX_NAME: usize = 256;

/// A domain as devfence sees it: who it is and which host devices it would get.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct DomainSpec {
    /// The domain name (`<name>`), which the ledger records as the VM.
    pub name: String,
    /// The domain UUID (`<uuid>`), lower case, if the document has one.
    pub uuid: Option<String>,
    /// The tenant named by `<devfence:tenant id=…/>` in `<metadata>`, if any.
    pub tenant: Option<TenantId>,
    /// Every host device devfence manages that the domain would be given, in
    /// document order: `<hostdev type='pci'>` and `<interface type='hostdev'>`
    /// as [`DeviceId::Pci`], `<hostdev type='mdev'>` as [`DeviceId::Mdev`].
    pub hostdevs: Vec<DeviceId>,
    /// One line per passthrough devfence does not manage (USB, SCSI, SCSI host,
    /// `mode='capabilities'` host devices, raw QEMU arguments); the decision
    /// ignores them, the caller may log them.
    pub unsupported: Vec<String>,
}

/// Why a domain XML document could not be read. Each message names the problem
/// and ends with a hint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The document is larger than [`MAX_DOMAIN_XML`].
    #[error(
        "The domain XML is {size} bytes, more than the {limit} bytes devfence reads. \
         Hint: libvirt's domain XML is a few KiB; check what is piped into `devfence hook qemu`"
    )]
    TooLarge {
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The document is not well-formed XML (or has a DTD, or too many nodes).
    #[error(
        "The domain XML does not parse: {detail}. Hint: libvirt passes the complete domain XML \
         on stdin; check what is piped into `devfence hook qemu`"
    )]
    NotXml {
        /// What the XML parser said, with the position.
        detail: String,
    },
    /// The root element is not `<domain>`.
    #[error(
        "The XML document is {root}, not a libvirt <domain>. Hint: `devfence hook qemu` reads \
         the domain XML libvirt passes to its qemu hook (see `virsh dumpxml DOMAIN`)"
    )]
    NotADomain {
        /// The root element, as `<name>` or `<{namespace}name>`.
        root: String,
    },
    /// `<name>` is missing, empty, repeated, too long or has control characters.
    #[error(
        "The domain's <name> {problem}. Hint: libvirt names every domain with one <name> of \
         1 to 256 bytes without control characters"
    )]
    BadName {
        /// What is wrong with it.
        problem: String,
    },
    /// `<uuid>` is repeated or is not a UUID.
    #[error(
        "The domain's <uuid> {value:?} is invalid: {reason}. Hint: libvirt writes one <uuid> \
         as 8-4-4-4-12 hex digits, e.g. 8f2c6a1e-4b7d-4e0a-9c3f-2d1b5e6a7c80"
    )]
    BadUuid {
        /// The text found (cut to 80 characters).
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// devfence's tenant metadata is repeated, has no id or an invalid one.
    #[error(
        "The domain's devfence tenant metadata is invalid: {reason}. Hint: write it once inside \
         <metadata> as <devfence:tenant xmlns:devfence=\"https://devfence.dev/xmlns/libvirt/1\" \
         id=\"TENANT\"/> (e.g. with `virsh metadata`)"
    )]
    BadTenant {
        /// What is wrong.
        reason: String,
    },
    /// A host device element is malformed or of a kind devfence cannot judge.
    #[error("The domain's {at} {reason}. Hint: {hint}")]
    BadHostdev {
        /// Which element: `<hostdev> #2 (alias hostdev1)`.
        at: String,
        /// What is wrong.
        reason: String,
        /// What to do.
        hint: &'static str,
    },
    /// An attribute of a host PCI address does not parse or is out of range.
    #[error(
        "The domain's {at} has an invalid host PCI address: {attribute}={value:?} {reason}. \
         Hint: libvirt writes host PCI addresses as <address domain='0x0000' bus='0x3b' \
         slot='0x00' function='0x1'/> (hex with 0x, or decimal; bus <= 0xff, slot <= 0x1f, \
         function <= 7)"
    )]
    BadPciAddress {
        /// Which element: `<hostdev> #2 (alias hostdev1)`.
        at: String,
        /// The attribute (`domain`, `bus`, `slot` or `function`).
        attribute: &'static str,
        /// Its value (cut to 80 characters).
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The same host device is given to the domain twice.
    #[error(
        "The domain gives {device} to the guest twice, by its {first} and its {second}. \
         Hint: remove one of them; a host device can be passed through once"
    )]
    Duplicate {
        /// The device.
        device: DeviceId,
        /// The first element naming it.
        first: String,
        /// The second element naming it.
        second: String,
    },
}

/// The domain may start: every device devfence manages is `Ready` for `tenant`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Admission {
    /// The tenant every device is `Ready` for; `None` when the domain has no
    /// device devfence manages.
    pub tenant: Option<TenantId>,
    /// The devices admitted, in document order (empty when devfence has
    /// nothing to say about the domain).
    pub devices: Vec<DeviceId>,
}

/// The domain may not start. [`Display`](fmt::Display) is one line, as libvirt
/// shows it: `devfence refuses domain web1: 0000:3b:00.1 is Quarantined(…), not
/// Ready for acme. Hint: …`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Refusal {
    /// The domain refused.
    pub domain: String,
    /// The device that caused the refusal, if one did.
    pub device: Option<DeviceId>,
    /// Why, with a hint (may hold any text; [`Display`](fmt::Display) makes it
    /// one line).
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = format!("devfence refuses domain {}: {}", self.domain, self.reason);
        f.write_str(&one_line(&line))
    }
}

impl std::error::Error for Refusal {}

/// Replaces every control character and Unicode line or paragraph separator by
/// a space, so the text stays on one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// At most 80 characters of `s`, for error messages.
fn cut(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Reads a libvirt domain XML document (the live XML libvirt passes to its qemu
/// hook on stdin) into a [`DomainSpec`].
///
/// Only what libvirt itself would read counts: `<name>`, `<uuid>`, devfence's
/// `<metadata>` (matched by namespace URI [`DEVFENCE_XMLNS`], whatever its
/// prefix), and the `<hostdev>` and `<interface type='hostdev'>` children of
/// `<devices>`; a host device is read from its `<source><address>`, never from
/// the guest-side `<address>` next to it. PCI address attributes are read as
/// libvirt reads them (C `strtoul` base 0: `0x` hex, a leading `0` octal,
/// otherwise decimal; `domain` defaults to 0). Anything ambiguous — a repeated
/// `<name>`, a `<source>` with two addresses, an unknown host device type, the
/// same device twice — is an error, never a guess.
///
/// # Errors
/// A [`DomainError`] naming what is wrong, for a document larger than
/// [`MAX_DOMAIN_XML`], malformed XML (DTDs are refused), a root other than
/// `<domain>`, a missing or invalid `<name>`, an invalid `<uuid>` or tenant
/// metadata, a malformed host device, or a duplicate one.
pub fn parse_domain(xml: &str) -> Result<DomainSpec, DomainError> {
    if xml.len() > MAX_DOMAIN_XML {
        return Err(DomainError::TooLarge {
            size: xml.len(),
            limit: MAX_DOMAIN_XML,
        });
    }
    let options = ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..ParsingOptions::default()
    };
    let doc = Document::parse_with_options(xml, options).map_err(|e| DomainError::NotXml {
        detail: e.to_string(),
    })?;
    let root = doc.root_element();
    if !is_plain(root, "domain") {
        return Err(DomainError::NotADomain {
            root: element_label(root),
        });
    }

    let name = read_name(root)?;
    let uuid = read_uuid(root)?;
    let tenant = read_tenant(root)?;

    let mut found = Found::default();
    let mut hostdev_n = 0usize;
    let mut interface_n = 0usize;
    for devices in plain_children(root, "devices") {
        for el in devices.children().filter(Node::is_element) {
            if is_plain(el, "hostdev") {
                hostdev_n += 1;
                let at = locate("<hostdev>", hostdev_n, el);
                read_hostdev(el, &at, &mut found)?;
            } else if is_plain(el, "interface") {
                interface_n += 1;
                if el.attribute("type") == Some("hostdev") {
                    let at = locate("<interface type='hostdev'>", interface_n, el);
                    read_interface(el, &at, &mut found)?;
                } else if let Some(actual) = hostdev_actual(el, interface_n)? {
                    // A network-pool interface (`type='network'` on a hostdev
                    // network) whose allocated `<actual type='hostdev'>` is a VF:
                    // the guest gets that VF as surely as through a `<hostdev>`.
                    let t = cut(el.attribute("type").unwrap_or(""));
                    let at = locate(
                        &format!("<interface type='{t}'> <actual type='hostdev'>"),
                        interface_n,
                        el,
                    );
                    read_interface(actual, &at, &mut found)?;
                }
            }
        }
    }
    note_qemu_passthrough(root, &mut found.unsupported);

    Ok(DomainSpec {
        name,
        uuid,
        tenant,
        hostdevs: found.devices,
        unsupported: found.unsupported,
    })
}

/// The devices found so far in document order, and the element that named each.
#[derive(Default)]
struct Found {
    devices: Vec<DeviceId>,
    named_by: HashMap<DeviceId, String>,
    unsupported: Vec<String>,
}

impl Found {
    fn add(&mut self, device: DeviceId, at: &str) -> Result<(), DomainError> {
        if let Some(first) = self.named_by.get(&device) {
            return Err(DomainError::Duplicate {
                device,
                first: first.clone(),
                second: at.to_string(),
            });
        }
        self.named_by.insert(device, at.to_string());
        self.devices.push(device);
        Ok(())
    }
}

/// Whether `node` is the element `name` in no namespace, as libvirt's own
/// elements are.
fn is_plain(node: Node<'_, '_>, name: &str) -> bool {
    node.is_element() && node.tag_name().namespace().is_none() && node.tag_name().name() == name
}

/// The element children of `node` named `name` in no namespace.
fn plain_children<'a, 'input: 'a>(
    node: Node<'a, 'input>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'input>> + 'a {
    node.children().filter(move |c| is_plain(*c, name))
}

/// `<name>` or `<{namespace}name>`, for messages.
fn element_label(node: Node<'_, '_>) -> String {
    let t = node.tag_name();
    match t.namespace() {
        Some(ns) => format!("<{{{}}}{}>", cut(ns), cut(t.name())),
        None => format!("<{}>", cut(t.name())),
    }
}

/// All text inside `node`, as XPath `string()` gives it.
fn text_of(node: Node<'_, '_>) -> String {
    node.descendants()
        .filter(Node::is_text)
        .filter_map(|n| n.text())
        .collect()
}

/// `<hostdev> #2 (alias hostdev1)`: the element's position among its kind under
/// `<devices>` (counting from 1) and its libvirt alias, if any.
fn locate(kind: &str, n: usize, el: Node<'_, '_>) -> String {
    let alias = plain_children(el, "alias")
        .next()
        .and_then(|a| a.attribute("name"));
    match alias {
        Some(a) => format!("{kind} #{n} (alias {:?})", cut(a)),
        None => format!("{kind} #{n}"),
    }
}

fn read_name(root: Node<'_, '_>) -> Result<String, DomainError> {
    let bad = |problem: String| DomainError::BadName { problem };
    let mut names = plain_children(root, "name");
    let Some(el) = names.next() else {
        return Err(bad("is missing".to_string()));
    };
    if names.next().is_some() {
        return Err(bad("appears more than once".to_string()));
    }
    let name = text_of(el);
    if name.is_empty() {
        return Err(bad("is empty".to_string()));
    }
    if name.len() > MAX_NAME {
        return Err(bad(format!(
            "is {} bytes long, more than {MAX_NAME}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(bad(format!("{:?} has control characters", cut(&name))));
    }
    Ok(name)
}

fn read_uuid(root: Node<'_, '_>) -> Result<Option<String>, DomainError> {
    let mut uuids = plain_children(root, "uuid");
    let Some(el) = uuids.next() else {
        return Ok(None);
    };
    let text = text_of(el);
    if uuids.next().is_some() {
        return Err(DomainError::BadUuid {
            value: cut(&text),
            reason: "<uuid> appears more than once".to_string(),
        });
    }
    let uuid: MdevUuid =
        text.parse()
            .map_err(|e: devfence_model::ParseError| DomainError::BadUuid {
                value: cut(&text),
                reason: e.reason,
            })?;
    Ok(Some(uuid.to_string()))
}

fn read_tenant(root: Node<'_, '_>) -> Result<Option<TenantId>, DomainError> {
    let mut tenant = None;
    for metadata in plain_children(root, "metadata") {
        for el in metadata.children().filter(Node::is_element) {
            let t = el.tag_name();
            if t.namespace() != Some(DEVFENCE_XMLNS) || t.name() != "tenant" {
                continue;
            }
            if tenant.is_some() {
                return Err(DomainError::BadTenant {
                    reason: "<tenant> appears more than once".to_string(),
                });
            }
            let Some(id) = el.attribute("id") else {
                return Err(DomainError::BadTenant {
                    reason: "<tenant> has no id attribute".to_string(),
                });
            };
            let id: TenantId =
                id.parse()
                    .map_err(|e: devfence_model::ParseError| DomainError::BadTenant {
                        reason: e.to_string(),
                    })?;
            tenant = Some(id);
        }
    }
    Ok(tenant)
}

/// The one `<source><address>` of a host device element.
fn source_address<'a, 'input>(
    el: Node<'a, 'input>,
    at: &str,
) -> Result<Node<'a, 'input>, DomainError> {
    let bad = |reason: &str| DomainError::BadHostdev {
        at: at.to_string(),
        reason: reason.to_string(),
        hint: "libvirt names the host device in <source><address …/></source>; \
               check the domain with `virsh dumpxml`",
    };
    let mut sources = plain_children(el, "source");
    let source = sources.next().ok_or_else(|| bad("has no <source>"))?;
    if sources.next().is_some() {
        return Err(bad("has more than one <source>"));
    }
    let mut addresses = plain_children(source, "address");
    let address = addresses
        .next()
        .ok_or_else(|| bad("has no <address> in its <source>"))?;
    if addresses.next().is_some() {
        return Err(bad("has more than one <address> in its <source>"));
    }
    Ok(address)
}

fn read_hostdev(el: Node<'_, '_>, at: &str, found: &mut Found) -> Result<(), DomainError> {
    let mode = el.attribute("mode").unwrap_or("subsystem");
    let kind = el.attribute("type");
    match (mode, kind) {
        ("subsystem", Some("pci")) => {
            let bdf = pci_address(source_address(el, at)?, at)?;
            found.add(DeviceId::Pci(bdf), at)
        }
        ("subsystem", Some("mdev")) => {
            let address = source_address(el, at)?;
            let uuid = address
                .attribute("uuid")
                .ok_or_else(|| DomainError::BadHostdev {
                    at: at.to_string(),
                    reason: "has no uuid in its <source><address>".to_string(),
                    hint: "libvirt names an mdev as <source><address uuid='…'/></source>",
                })?;
            let uuid: MdevUuid =
                uuid.parse()
                    .map_err(|e: devfence_model::ParseError| DomainError::BadHostdev {
                        at: at.to_string(),
                        reason: format!("has an invalid mdev uuid {:?}: {}", e.input, e.reason),
                        hint: "give the UUID of the mdev as /sys/bus/mdev/devices/ lists it",
                    })?;
            found.add(DeviceId::Mdev(uuid), at)
        }
        ("subsystem", Some(t @ ("usb" | "scsi" | "scsi_host"))) => {
            found.unsupported.push(one_line(&format!(
                "{at}: mode='subsystem' type='{t}'{}, not managed by devfence",
                usb_detail(el)
            )));
            Ok(())
        }
        ("capabilities", t) => {
            found.unsupported.push(one_line(&format!(
                "{at}: mode='capabilities' type={:?}, not managed by devfence",
                cut(t.unwrap_or(""))
            )));
            Ok(())
        }
        ("subsystem", None) => Err(DomainError::BadHostdev {
            at: at.to_string(),
            reason: "has no type attribute".to_string(),
            hint: "libvirt writes <hostdev mode='subsystem' type='pci|mdev|usb|scsi|scsi_host'>",
        }),
        ("subsystem", Some(t)) => Err(DomainError::BadHostdev {
            at: at.to_string(),
            reason: format!("has type {:?}, which devfence does not know", cut(t)),
            hint: "devfence refuses what it cannot judge; it knows the types pci, mdev \
                   (both checked) and usb, scsi, scsi_host (not managed)",
        }),
        (m, _) => Err(DomainError::BadHostdev {
            at: at.to_string(),
            reason: format!("has mode {:?}, which devfence does not know", cut(m)),
            hint: "libvirt writes <hostdev mode='subsystem'> (or 'capabilities' for containers)",
        }),
    }
}

/// ` (vendor 0x1050 product 0x0407)` for a USB host device, empty otherwise.
fn usb_detail(el: Node<'_, '_>) -> String {
    let Some(source) = plain_children(el, "source").next() else {
        return String::new();
    };
    let id = |name| {
        plain_children(source, name)
            .next()
            .and_then(|n| n.attribute("id"))
    };
    match (id("vendor"), id("product")) {
        (Some(v), Some(p)) => format!(" (vendor {} product {})", cut(v), cut(p)),
        _ => String::new(),
    }
}

fn read_interface(el: Node<'_, '_>, at: &str, found: &mut Found) -> Result<(), DomainError> {
    let address = source_address(el, at)?;
    match address.attribute("type") {
        None | Some("pci") => {}
        Some(t) => {
            return Err(DomainError::BadHostdev {
                at: at.to_string(),
                reason: format!(
                    "has a <source><address type={:?}>, not a PCI address",
                    cut(t)
                ),
                hint: "an <interface type='hostdev'> passes a PCI VF: \
                       <source><address type='pci' domain= bus= slot= function=/></source>",
            });
        }
    }
    let bdf = pci_address(address, at)?;
    found.add(DeviceId::Pci(bdf), at)
}

/// The `<actual type='hostdev'>` of an interface of another type (libvirt writes
/// the device it allocated from a network pool there), if it has one. Two
/// `<actual>` elements are ambiguous and refused.
fn hostdev_actual<'a, 'input>(
    el: Node<'a, 'input>,
    n: usize,
) -> Result<Option<Node<'a, 'input>>, DomainError> {
    let mut actuals = plain_children(el, "actual");
    let Some(actual) = actuals.next() else {
        return Ok(None);
    };
    if actuals.next().is_some() {
        return Err(DomainError::BadHostdev {
            at: locate("<interface>", n, el),
            reason: "has more than one <actual>".to_string(),
            hint: "libvirt writes one <actual> for the device it allocated from a network; \
                   check the domain with `virsh dumpxml`",
        });
    }
    Ok((actual.attribute("type") == Some("hostdev")).then_some(actual))
}

/// The host PCI function an `<address domain= bus= slot= function=/>` names.
fn pci_address(address: Node<'_, '_>, at: &str) -> Result<Bdf, DomainError> {
    let field = |attribute: &'static str, max: u64, required: bool| -> Result<u64, DomainError> {
        let Some(value) = address.attribute(attribute) else {
            if required {
                return Err(DomainError::BadHostdev {
                    at: at.to_string(),
                    reason: format!("has no {attribute} attribute in its <source><address>"),
                    hint: "libvirt writes host PCI addresses as <address domain='0x0000' \
                           bus='0x3b' slot='0x00' function='0x1'/>",
                });
            }
            return Ok(0);
        };
        let bad = |reason: String| DomainError::BadPciAddress {
            at: at.to_string(),
            attribute,
            value: cut(value),
            reason,
        };
        let n = libvirt_uint(value).map_err(|r| bad(r.to_string()))?;
        if n > max {
            return Err(bad(format!("is out of range (must be <= {max:#x})")));
        }
        Ok(n)
    };
    let domain = field("domain", 0xffff, false)?;
    let bus = field("bus", 0xff, true)?;
    let slot = field("slot", 0x1f, true)?;
    let function = field("function", 7, true)?;
    // The ranges were checked above, so the conversions and `Bdf::new` succeed;
    // still, no input may panic.
    let part = |n: u64| u8::try_from(n).unwrap_or(u8::MAX);
    Bdf::new(
        u16::try_from(domain).unwrap_or(u16::MAX),
        part(bus),
        part(slot),
        part(function),
    )
    .ok_or_else(|| DomainError::BadPciAddress {
        at: at.to_string(),
        attribute: "slot",
        value: format!("{slot:#x}"),
        reason: "is out of range".to_string(),
    })
}

/// An unsigned number as libvirt reads an address attribute (C `strtoul` with
/// base 0): `0x`/`0X` and hex digits, a leading `0` and octal digits, or decimal
/// digits. Signs, spaces and empty strings are refused (libvirt never writes
/// them).
fn libvirt_uint(s: &str) -> Result<u64, &'static str> {
    let (digits, radix, what) =
        if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            (h, 16, "is not a hex number after 0x")
        } else if let Some(o) = s.strip_prefix('0')
            && !o.is_empty()
        {
            (
                o,
                8,
                "starts with 0 but is not octal (libvirt reads it as C does)",
            )
        } else {
            (s, 10, "is not a number (expected hex with 0x, or decimal)")
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(what);
    }
    u64::from_str_radix(digits, radix).map_err(|_| "is out of range")
}

/// Notes QEMU passthrough elements libvirt hands to QEMU unread: raw
/// `<qemu:commandline>` arguments and `<qemu:override>` device properties can
/// give the guest a host device devfence never sees.
fn note_qemu_passthrough(root: Node<'_, '_>, unsupported: &mut Vec<String>) {
    for el in root.children().filter(Node::is_element) {
        let t = el.tag_name();
        if t.namespace() != Some(QEMU_XMLNS) {
            continue;
        }
        match t.name() {
            "commandline" => {
                let args = el
                    .children()
                    .filter(|c| c.is_element() && c.tag_name().name() == "arg")
                    .count();
                unsupported.push(format!(
                    "<qemu:commandline> passes {args} raw QEMU argument(s), \
                     which devfence cannot check"
                ));
            }
            "override" => {
                let devices = el
                    .children()
                    .filter(|c| c.is_element() && c.tag_name().name() == "device")
                    .count();
                unsupported.push(format!(
                    "<qemu:override> changes QEMU properties of {devices} device(s), \
                     which devfence cannot check"
                ));
            }
            _ => {}
        }
    }
}

/// What the hook does with a domain that does not say whose it is: no
/// `<devfence:tenant>` metadata, and no device reserved for it (by name or UUID).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Unidentified {
    /// Refuse it (the default): any tenant's Ready device would otherwise pass
    /// into any domain an orchestrator put it in.
    #[default]
    Refuse,
    /// Admit it for the tenant its devices are Ready for, but only while the
    /// ledger knows at most one tenant (`[hook] allow_unidentified_single_tenant`).
    SingleTenant {
        /// How many tenants the ledger knows now.
        tenants: usize,
    },
}

/// Decides libvirt's `prepare begin` with the default policy (an unidentified
/// domain is refused); see [`decide_prepare_with`].
///
/// # Errors
/// A [`Refusal`] naming the first device that fails and why, with a hint.
pub fn decide_prepare(
    domain: &DomainSpec,
    state_of: &mut dyn FnMut(&DeviceId) -> Result<Option<DeviceState>, String>,
) -> Result<Admission, Refusal> {
    decide_prepare_with(domain, state_of, Unidentified::Refuse)
}

/// Whether a reservation `vm` names this domain: by its name, or by its UUID
/// (any case; device-state admission binds to the VM UUID).
#[must_use]
pub fn reserved_for(domain: &DomainSpec, vm: &str) -> bool {
    vm == domain.name
        || domain
            .uuid
            .as_deref()
            .is_some_and(|u| u.eq_ignore_ascii_case(vm))
}

/// Decides libvirt's `prepare begin`: may `domain` start?
///
/// `state_of` reads one device's ledger state (`Ok(None)`: devfence does not
/// manage it). The domain is admitted only if every device of
/// [`DomainSpec::hostdevs`] is `Ready { tenant, vm }` where the tenant is the
/// same for all of them, is the tenant the domain's metadata names (if it names
/// one), and `vm`, when the assignment named one, is this domain. The domain
/// must say whose it is: by its metadata, or by being the VM one of its devices
/// is reserved for; otherwise `unidentified` decides. Everything
/// else is refused — not managed, `Free`, `Preparing`, `Scrubbing`,
/// `Quarantined`, and `Active`/`Draining` even for this very domain (a device
/// serves one running domain at a time) — and so is a ledger that cannot be read
/// (fail closed). A domain with no managed device is admitted with no devices:
/// devfence has nothing to say about it; [`DomainSpec::unsupported`] plays no
/// part.
///
/// # Errors
/// A [`Refusal`] naming the first device that fails and why, with a hint.
pub fn decide_prepare_with(
    domain: &DomainSpec,
    state_of: &mut dyn FnMut(&DeviceId) -> Result<Option<DeviceState>, String>,
    unidentified: Unidentified,
) -> Result<Admission, Refusal> {
    let refuse = |device: &DeviceId, reason: String| Refusal {
        domain: domain.name.clone(),
        device: Some(*device),
        reason,
    };

    // Read every state first, so a refusal can name the tenant the domain is for.
    let mut states = Vec::with_capacity(domain.hostdevs.len());
    for device in &domain.hostdevs {
        match state_of(device) {
            Err(e) => {
                return Err(refuse(
                    device,
                    format!(
                        "cannot read the ledger state of {device}: {e}. Hint: devfence fails \
                         closed when it cannot verify a device; check the ledger with \
                         `devfence status` and start the domain again"
                    ),
                ));
            }
            Ok(None) => {
                return Err(refuse(
                    device,
                    format!(
                        "{device} is not managed by devfence. Hint: a passthrough device must be \
                         added to devfence and prepared for the domain's tenant before the domain \
                         may use it; `devfence status` lists the managed devices"
                    ),
                ));
            }
            Ok(Some(state)) => states.push((device, state)),
        }
    }

    // The tenant the domain is for: its metadata's, or that of its first Ready device.
    let first_ready = states.iter().find_map(|(d, s)| match s {
        DeviceState::Ready { tenant, .. } => Some((*d, tenant)),
        _ => None,
    });
    // Whose the domain is: its metadata's tenant, else the tenant of a device
    // reserved for it.
    let reserved_here = states.iter().find_map(|(d, s)| match s {
        DeviceState::Ready {
            tenant,
            vm: Some(v),
        } if reserved_for(domain, v) => Some((*d, tenant)),
        _ => None,
    });
    let identity = domain
        .tenant
        .as_ref()
        .or_else(|| reserved_here.map(|(_, t)| t));
    let expected = identity.or_else(|| first_ready.map(|(_, t)| t));
    let for_tenant = |t: Option<&TenantId>| t.map_or(String::new(), |t| format!(" for {t}"));

    for (device, state) in &states {
        match state {
            DeviceState::Ready { tenant, vm } => {
                if let Some(want) = &domain.tenant {
                    if tenant != want {
                        return Err(refuse(
                            device,
                            format!(
                                "{device} is Ready for {tenant}, but the domain's devfence \
                                 metadata names tenant {want}. Hint: a domain may only use \
                                 devices prepared for its own tenant; fix the <devfence:tenant> \
                                 metadata or prepare the device for {want}"
                            ),
                        ));
                    }
                } else if let Some((held, t)) = reserved_here
                    && tenant != t
                {
                    return Err(refuse(
                        device,
                        format!(
                            "{device} is Ready for {tenant}, but {held} is reserved for this \
                             domain by {t}. Hint: one domain may only hold devices of one \
                             tenant; give it devices prepared for {t}"
                        ),
                    ));
                } else if let Some((first, t)) = first_ready
                    && tenant != t
                {
                    return Err(refuse(
                        device,
                        format!(
                            "{device} is Ready for {tenant}, but {first} is Ready for {t}. \
                             Hint: one domain may only hold devices of one tenant; give it \
                             devices prepared for the same tenant"
                        ),
                    ));
                }
                // A reservation names the domain by its name (libvirt's hook) or by
                // its UUID (device-state admission binds to the VM UUID).
                if let Some(v) = vm
                    && !reserved_for(domain, v)
                {
                    return Err(refuse(
                        device,
                        format!(
                            "{device} is Ready for {tenant} but reserved for domain {v}, not {}. \
                             Hint: start {v} instead, or prepare the device for this domain",
                            domain.name
                        ),
                    ));
                }
            }
            DeviceState::Active { vm, .. } | DeviceState::Draining { vm, .. } => {
                return Err(refuse(
                    device,
                    format!(
                        "{device} is already in use by a running domain ({state}), not Ready{}. \
                         Hint: a device serves one domain at a time; once {vm} has stopped and \
                         the device is scrubbed, prepare it again",
                        for_tenant(expected)
                    ),
                ));
            }
            DeviceState::Quarantined { .. } => {
                return Err(refuse(
                    device,
                    format!(
                        "{device} is {state}, not Ready{}. Hint: a quarantined device is \
                         unusable until it is verified clean; `devfence status` shows why it \
                         was quarantined",
                        for_tenant(expected)
                    ),
                ));
            }
            DeviceState::Free | DeviceState::Preparing { .. } | DeviceState::Scrubbing => {
                return Err(refuse(
                    device,
                    format!(
                        "{device} is {state}, not Ready{}. Hint: only a device whose gates all \
                         passed for the tenant may be used; prepare it and start the domain once \
                         `devfence status` shows it Ready",
                        for_tenant(expected)
                    ),
                ));
            }
        }
    }

    if identity.is_none()
        && let Some((first, t)) = first_ready
    {
        let how = "Hint: name the domain's tenant in its metadata — <devfence:tenant \
                   xmlns:devfence=\"https://devfence.dev/xmlns/libvirt/1\" id=\"TENANT\"/> \
                   (`virsh metadata`) — or reserve the devices for this VM (`devfence assign \
                   DEVICE --tenant T --vm NAME|UUID`)";
        match unidentified {
            Unidentified::Refuse => {
                return Err(refuse(
                    first,
                    format!(
                        "the domain names no tenant and no device is reserved for it, so \
                         devfence cannot tell whether {t}'s devices belong in it. {how}; \
                         single-tenant hosts may set [hook] \
                         allow_unidentified_single_tenant = true"
                    ),
                ));
            }
            Unidentified::SingleTenant { tenants } if tenants > 1 => {
                return Err(refuse(
                    first,
                    format!(
                        "the domain names no tenant and no device is reserved for it, and \
                         [hook] allow_unidentified_single_tenant holds on a single-tenant host \
                         only: this ledger knows {tenants} tenants. {how}"
                    ),
                ));
            }
            Unidentified::SingleTenant { .. } => {}
        }
    }

    Ok(Admission {
        tenant: expected.filter(|_| !states.is_empty()).cloned(),
        devices: domain.hostdevs.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PCI_TWO_VFS: &str = include_str!("../tests/fixtures/domains/pci-two-vfs.xml");
    const MDEV_GPU: &str = include_str!("../tests/fixtures/domains/mdev-gpu.xml");
    const VFIO_AP: &str = include_str!("../tests/fixtures/domains/vfio-ap.xml");
    const INTERFACE_HOSTDEV: &str = include_str!("../tests/fixtures/domains/interface-hostdev.xml");
    const INTERFACE_NETWORK_POOL: &str =
        include_str!("../tests/fixtures/domains/interface-network-pool.xml");
    const NO_HOSTDEV: &str = include_str!("../tests/fixtures/domains/no-hostdev.xml");
    const USB_ONLY: &str = include_str!("../tests/fixtures/domains/usb-only.xml");
    const METADATA_TENANT: &str = include_str!("../tests/fixtures/domains/metadata-tenant.xml");
    const BAD_ADDRESS: &str = include_str!("../tests/fixtures/domains/bad-address.xml");
    const NOT_DOMAIN: &str = include_str!("../tests/fixtures/domains/not-domain.xml");
    const TRUNCATED: &str = include_str!("../tests/fixtures/domains/truncated.xml");

    const FIXTURES: [&str; 11] = [
        PCI_TWO_VFS,
        INTERFACE_NETWORK_POOL,
        MDEV_GPU,
        VFIO_AP,
        INTERFACE_HOSTDEV,
        NO_HOSTDEV,
        USB_ONLY,
        METADATA_TENANT,
        BAD_ADDRESS,
        NOT_DOMAIN,
        TRUNCATED,
    ];

    fn t(s: &str) -> TenantId {
        s.parse().expect("tenant id")
    }
    fn pci(s: &str) -> DeviceId {
        DeviceId::Pci(s.parse().expect("bdf"))
    }
    fn mdev(s: &str) -> DeviceId {
        DeviceId::Mdev(s.parse().expect("uuid"))
    }
    fn ready(tenant: &str, vm: Option<&str>) -> DeviceState {
        DeviceState::Ready {
            tenant: t(tenant),
            vm: vm.map(str::to_string),
        }
    }
    fn spec(name: &str, tenant: Option<&str>, hostdevs: &[DeviceId]) -> DomainSpec {
        DomainSpec {
            name: name.to_string(),
            uuid: None,
            tenant: tenant.map(t),
            hostdevs: hostdevs.to_vec(),
            unsupported: vec![],
        }
    }
    /// A minimal domain with `devices` inside `<devices>`.
    fn domain_with(devices: &str) -> String {
        format!("<domain type='kvm'><name>d1</name><devices>{devices}</devices></domain>")
    }
    fn pci_hostdev(attrs: &str) -> String {
        domain_with(&format!(
            "<hostdev mode='subsystem' type='pci' managed='yes'><source><address {attrs}/>\
             </source><alias name='hostdev0'/></hostdev>"
        ))
    }
    fn err(xml: &str) -> String {
        let e = parse_domain(xml).expect_err("must not parse");
        let msg = e.to_string();
        assert!(msg.contains("Hint: "), "no hint in {msg}");
        assert!(!msg.contains('\n'), "multi-line message {msg:?}");
        msg
    }
    /// Decides with a ledger given as a list; devices not in it are unmanaged.
    fn decide(
        domain: &DomainSpec,
        ledger: &[(DeviceId, DeviceState)],
    ) -> Result<Admission, Refusal> {
        decide_prepare(domain, &mut |d| {
            Ok(ledger.iter().find(|(x, _)| x == d).map(|(_, s)| s.clone()))
        })
    }

    // ---- fixtures --------------------------------------------------------------

    #[test]
    fn fixture_pci_two_vfs() {
        assert_eq!(
            parse_domain(PCI_TWO_VFS).unwrap(),
            DomainSpec {
                name: "web1".into(),
                uuid: Some("8f2c6a1e-4b7d-4e0a-9c3f-2d1b5e6a7c80".into()),
                tenant: None,
                // Not the guest-side 0000:06:00.0 and 0000:07:00.0 next to <source>.
                hostdevs: vec![pci("0000:3b:00.1"), pci("0000:3b:00.3")],
                unsupported: vec![],
            }
        );
    }

    #[test]
    fn fixture_mdev_gpu() {
        assert_eq!(
            parse_domain(MDEV_GPU).unwrap(),
            DomainSpec {
                name: "render-7".into(),
                uuid: Some("b71e0c94-2f5a-4d3e-8a61-c0d9e4f7a235".into()),
                tenant: Some(t("acme")),
                hostdevs: vec![
                    mdev("a1b2c3d4-0065-4000-8000-000000000001"),
                    mdev("a1b2c3d4-0065-4000-8000-000000000002"),
                ],
                unsupported: vec![],
            }
        );
    }

    #[test]
    fn fixture_vfio_ap() {
        assert_eq!(
            parse_domain(VFIO_AP).unwrap(),
            DomainSpec {
                name: "crypto1".into(),
                uuid: Some("5e8d2b6a-0c7f-4a19-93e4-7b1f0a6c2d58".into()),
                tenant: None,
                hostdevs: vec![mdev("0f6c1a7e-2b1d-4c3a-9a53-6a2f1c3e0a01")],
                unsupported: vec![],
            }
        );
    }

    #[test]
    fn fixture_interface_hostdev() {
        assert_eq!(
            parse_domain(INTERFACE_HOSTDEV).unwrap(),
            DomainSpec {
                name: "edge-fw".into(),
                uuid: Some("e4c1f7a9-58b2-4d06-a3e7-19f0b6c2d4e8".into()),
                tenant: None,
                hostdevs: vec![pci("0000:5e:10.0"), pci("0000:5e:10.2")],
                unsupported: vec![],
            }
        );
    }

    #[test]
    fn fixture_no_hostdev() {
        assert_eq!(
            parse_domain(NO_HOSTDEV).unwrap(),
            DomainSpec {
                name: "jump-host".into(),
                uuid: Some("1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d".into()),
                tenant: None,
                hostdevs: vec![],
                unsupported: vec![],
            }
        );
    }

    #[test]
    fn fixture_usb_only() {
        assert_eq!(
            parse_domain(USB_ONLY).unwrap(),
            DomainSpec {
                name: "lab-token".into(),
                uuid: Some("9c0e4b7a-3d2f-4e81-a6b5-f7d8c9e0a1b2".into()),
                tenant: None,
                hostdevs: vec![],
                unsupported: vec![
                    "<hostdev> #1 (alias \"hostdev0\"): mode='subsystem' type='usb' \
                     (vendor 0x1050 product 0x0407), not managed by devfence"
                        .into(),
                    "<hostdev> #2 (alias \"hostdev1\"): mode='subsystem' type='usb' \
                     (vendor 0x0403 product 0x6001), not managed by devfence"
                        .into(),
                ],
            }
        );
    }

    #[test]
    fn fixture_metadata_tenant_matched_by_namespace_not_prefix() {
        // The document holds a decoy `devfence:tenant` in another namespace, and
        // the real one under the prefix `fence`.
        assert_eq!(
            parse_domain(METADATA_TENANT).unwrap(),
            DomainSpec {
                name: "acme-db2".into(),
                uuid: Some("3d9a7f02-6c1e-4a8b-b5d4-91e0f2c3a6b7".into()),
                tenant: Some(t("acme")),
                hostdevs: vec![pci("0000:86:00.1")],
                unsupported: vec![],
            }
        );
    }

    #[test]
    fn fixture_bad_address_names_hostdev_and_attribute() {
        let e = parse_domain(BAD_ADDRESS).unwrap_err();
        assert_eq!(
            e,
            DomainError::BadPciAddress {
                at: "<hostdev> #2 (alias \"hostdev1\")".into(),
                attribute: "function",
                value: "0x9".into(),
                reason: "is out of range (must be <= 0x7)".into(),
            }
        );
        let msg = err(BAD_ADDRESS);
        assert!(
            msg.contains("<hostdev> #2") && msg.contains("function=\"0x9\""),
            "{msg}"
        );
    }

    #[test]
    fn fixture_not_domain() {
        assert_eq!(
            parse_domain(NOT_DOMAIN).unwrap_err(),
            DomainError::NotADomain {
                root: "<network>".into()
            }
        );
        assert!(err(NOT_DOMAIN).contains("<network>, not a libvirt <domain>"));
    }

    #[test]
    fn fixture_truncated() {
        assert!(matches!(
            parse_domain(TRUNCATED),
            Err(DomainError::NotXml { .. })
        ));
        assert!(err(TRUNCATED).starts_with("The domain XML does not parse: "));
    }

    #[test]
    fn spec_serializes_with_text_ids() {
        let json = serde_json::to_value(parse_domain(MDEV_GPU).unwrap()).unwrap();
        assert_eq!(json["tenant"], "acme");
        assert_eq!(json["hostdevs"][0], "a1b2c3d4-0065-4000-8000-000000000001");
    }

    // ---- parsing details -------------------------------------------------------

    #[test]
    fn pci_attributes_are_read_as_libvirt_reads_them() {
        let one = |attrs: &str| parse_domain(&pci_hostdev(attrs)).unwrap().hostdevs;
        let want = vec![pci("0000:3b:00.1")];
        assert_eq!(
            one("domain='0x0000' bus='0x3b' slot='0x00' function='0x1'"),
            want
        );
        assert_eq!(one("domain='0' bus='59' slot='0' function='1'"), want);
        assert_eq!(
            one("bus='0X3B' slot='0x0' function='1'"),
            want,
            "domain defaults to 0"
        );
        // strtoul base 0: a leading 0 is octal, as in libvirt.
        assert_eq!(one("bus='073' slot='00' function='01'"), want);
        assert_eq!(
            one("domain='0x10' bus='0xff' slot='0x1f' function='7'"),
            vec![pci("0010:ff:1f.7")]
        );
    }

    #[test]
    fn pci_attribute_errors_name_attribute_and_value() {
        for (attrs, attribute, value) in [
            ("bus='0x100' slot='0' function='0'", "bus", "0x100"),
            ("bus='0x3b' slot='0x20' function='0'", "slot", "0x20"),
            ("bus='0x3b' slot='32' function='0'", "slot", "32"),
            ("bus='0x3b' slot='0' function='8'", "function", "8"),
            (
                "domain='0x10000' bus='0' slot='0' function='0'",
                "domain",
                "0x10000",
            ),
            ("bus='0x3g' slot='0' function='0'", "bus", "0x3g"),
            ("bus='0x' slot='0' function='0'", "bus", "0x"),
            ("bus='' slot='0' function='0'", "bus", ""),
            ("bus='-1' slot='0' function='0'", "bus", "-1"),
            ("bus=' 3' slot='0' function='0'", "bus", " 3"),
            ("bus='09' slot='0' function='0'", "bus", "09"),
            ("bus='3b' slot='0' function='0'", "bus", "3b"),
            (
                "bus='99999999999999999999999' slot='0' function='0'",
                "bus",
                "99999999999999999999999",
            ),
        ] {
            match parse_domain(&pci_hostdev(attrs)) {
                Err(DomainError::BadPciAddress {
                    at,
                    attribute: a,
                    value: v,
                    ..
                }) => {
                    assert_eq!(at, "<hostdev> #1 (alias \"hostdev0\")", "{attrs}");
                    assert_eq!((a, v.as_str()), (attribute, value), "{attrs}");
                }
                other => panic!("{attrs}: {other:?}"),
            }
            assert!(err(&pci_hostdev(attrs)).contains(attribute));
        }
        // A required attribute missing.
        let msg = err(&pci_hostdev("domain='0' slot='0' function='0'"));
        assert!(msg.contains("has no bus attribute"), "{msg}");
    }

    #[test]
    fn hostdev_structure_errors() {
        for (devices, needle) in [
            ("<hostdev mode='subsystem' type='pci'/>", "has no <source>"),
            (
                "<hostdev mode='subsystem' type='pci'><source/></hostdev>",
                "has no <address> in its <source>",
            ),
            (
                "<hostdev mode='subsystem' type='pci'><source><address bus='1' slot='0' \
                 function='0'/><address bus='2' slot='0' function='0'/></source></hostdev>",
                "more than one <address>",
            ),
            (
                "<hostdev mode='subsystem' type='pci'><source><address bus='1' slot='0' \
                 function='0'/></source><source><address bus='2' slot='0' function='0'/>\
                 </source></hostdev>",
                "more than one <source>",
            ),
            (
                "<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address/>\
                 </source></hostdev>",
                "has no uuid",
            ),
            (
                "<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>\
                 <address uuid='a1b2c3d4006540008000000000000001'/></source></hostdev>",
                "invalid mdev uuid",
            ),
            ("<hostdev mode='subsystem'/>", "has no type attribute"),
            ("<hostdev mode='subsystem' type='vdpa'/>", "type \"vdpa\""),
            (
                "<hostdev mode='passthrough' type='pci'/>",
                "mode \"passthrough\"",
            ),
            (
                "<interface type='hostdev'><source><address type='usb' bus='1' device='2'/>\
                 </source></interface>",
                "not a PCI address",
            ),
            (
                "<interface type='hostdev'><source network='sriov-pool'/></interface>",
                "has no <address> in its <source>",
            ),
        ] {
            let msg = err(&domain_with(devices));
            assert!(msg.contains(needle), "{devices}: {msg}");
        }
    }

    #[test]
    fn mdev_of_any_model_is_read_by_uuid() {
        let xml = domain_with(
            "<hostdev mode='subsystem' type='mdev' model='vfio-ccw'><source>\
             <address uuid='A1B2C3D4-0065-4000-8000-000000000003'/></source></hostdev>",
        );
        assert_eq!(
            parse_domain(&xml).unwrap().hostdevs,
            vec![mdev("a1b2c3d4-0065-4000-8000-000000000003")]
        );
    }

    #[test]
    fn other_hostdev_kinds_are_unsupported_not_managed() {
        let xml = domain_with(
            "<hostdev mode='subsystem' type='scsi' managed='no'><source>\
             <adapter name='scsi_host2'/><address bus='0' target='0' unit='1'/></source>\
             <alias name='hostdev0'/></hostdev>\
             <hostdev mode='subsystem' type='scsi_host' managed='no'>\
             <source protocol='vhost' wwpn='naa.5123456789abcde0'/></hostdev>\
             <hostdev mode='capabilities' type='storage'><source><block>/dev/sdf1</block>\
             </source></hostdev>\
             <interface type='network'><source network='default'/></interface>",
        );
        let spec = parse_domain(&xml).unwrap();
        assert!(spec.hostdevs.is_empty());
        assert_eq!(
            spec.unsupported,
            vec![
                "<hostdev> #1 (alias \"hostdev0\"): mode='subsystem' type='scsi', not managed by devfence",
                "<hostdev> #2: mode='subsystem' type='scsi_host', not managed by devfence",
                "<hostdev> #3: mode='capabilities' type=\"storage\", not managed by devfence",
            ]
        );
    }

    #[test]
    fn hostdev_mode_defaults_to_subsystem_like_libvirt() {
        let xml = domain_with(
            "<hostdev type='pci'><source><address bus='0x3b' slot='0' function='2'/>\
             </source></hostdev>",
        );
        assert_eq!(
            parse_domain(&xml).unwrap().hostdevs,
            vec![pci("0000:3b:00.2")]
        );
    }

    #[test]
    fn duplicate_device_is_an_error_naming_both_elements() {
        let xml = domain_with(
            "<hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x5e' \
             slot='0x10' function='0x0'/></source><alias name='hostdev0'/></hostdev>\
             <interface type='network'/>\
             <interface type='hostdev'><source><address type='pci' bus='94' slot='16' \
             function='0'/></source><alias name='hostdev1'/></interface>",
        );
        assert_eq!(
            parse_domain(&xml).unwrap_err(),
            DomainError::Duplicate {
                device: pci("0000:5e:10.0"),
                first: "<hostdev> #1 (alias \"hostdev0\")".into(),
                second: "<interface type='hostdev'> #2 (alias \"hostdev1\")".into(),
            }
        );
        assert!(err(&xml).contains("0000:5e:10.0"));
    }

    #[test]
    fn only_hostdevs_under_devices_count() {
        let xml = "<domain><name>d1</name><metadata><app:x xmlns:app='urn:x'>\
             <hostdev mode='subsystem' type='pci'><source><address bus='1' slot='0' \
             function='0'/></source></hostdev></app:x></metadata>\
             <hostdev mode='subsystem' type='pci'><source><address bus='2' slot='0' \
             function='0'/></source></hostdev>\
             <devices><x:hostdev xmlns:x='urn:x' type='pci'/></devices></domain>";
        assert_eq!(parse_domain(xml).unwrap().hostdevs, vec![]);
    }

    #[test]
    fn hostdevs_of_every_devices_element_count() {
        let xml = "<domain><name>d1</name>\
             <devices><hostdev type='pci'><source><address bus='1' slot='0' function='0'/>\
             </source></hostdev></devices>\
             <devices><hostdev type='pci'><source><address bus='2' slot='0' function='0'/>\
             </source></hostdev></devices></domain>";
        assert_eq!(
            parse_domain(xml).unwrap().hostdevs,
            vec![pci("0000:01:00.0"), pci("0000:02:00.0")]
        );
    }

    #[test]
    fn name_errors() {
        for (xml, needle) in [
            ("<domain><uuid>x</uuid></domain>".to_string(), "is missing"),
            ("<domain><name></name></domain>".to_string(), "is empty"),
            (
                "<domain><name>a</name><name>b</name></domain>".to_string(),
                "more than once",
            ),
            (
                "<domain><name>web\n1</name></domain>".to_string(),
                "control characters",
            ),
            (
                "<domain><name>web&#9;1</name></domain>".to_string(),
                "control characters",
            ),
            (
                format!("<domain><name>{}</name></domain>", "a".repeat(257)),
                "257 bytes",
            ),
        ] {
            let msg = err(&xml);
            assert!(
                msg.contains("<name>") && msg.contains(needle),
                "{xml}: {msg}"
            );
        }
        // Text split by a comment still reads as one name, as XPath string() does.
        let spec = parse_domain("<domain><name>we<!-- x -->b1</name></domain>").unwrap();
        assert_eq!(spec.name, "web1");
        assert_eq!(
            parse_domain(&format!(
                "<domain><name>{}</name></domain>",
                "a".repeat(256)
            ))
            .unwrap()
            .name
            .len(),
            256
        );
    }

    #[test]
    fn uuid_and_tenant_errors() {
        let msg = err("<domain><name>d</name><uuid>not-a-uuid</uuid></domain>");
        assert!(msg.contains("<uuid> \"not-a-uuid\""), "{msg}");
        let ns = DEVFENCE_XMLNS;
        for (meta, needle) in [
            (format!("<d:tenant xmlns:d='{ns}'/>"), "no id attribute"),
            (
                format!("<d:tenant xmlns:d='{ns}' id='-bad'/>"),
                "Invalid tenant id",
            ),
            (
                format!("<d:tenant xmlns:d='{ns}' id='acme'/><e:tenant xmlns:e='{ns}' id='acme'/>"),
                "more than once",
            ),
        ] {
            let xml = format!("<domain><name>d</name><metadata>{meta}</metadata></domain>");
            let msg = err(&xml);
            assert!(
                msg.contains("tenant metadata") && msg.contains(needle),
                "{msg}"
            );
        }
        // The default namespace works too.
        let xml = format!(
            "<domain><name>d</name><metadata><tenant xmlns='{ns}' id='globex'/></metadata></domain>"
        );
        assert_eq!(parse_domain(&xml).unwrap().tenant, Some(t("globex")));
    }

    #[test]
    fn limits_and_dtd() {
        let big = format!(
            "<domain><name>d</name>{}</domain>",
            " ".repeat(MAX_DOMAIN_XML)
        );
        assert_eq!(
            parse_domain(&big).unwrap_err(),
            DomainError::TooLarge {
                size: big.len(),
                limit: MAX_DOMAIN_XML
            }
        );
        let lol = "<?xml version='1.0'?><!DOCTYPE domain [<!ENTITY a 'web1'>]>\
                   <domain><name>&a;</name></domain>";
        assert!(err(lol).contains("does not parse"));
        let many = format!("<domain><name>d</name>{}</domain>", "<x/>".repeat(250_000));
        assert!(matches!(
            parse_domain(&many),
            Err(DomainError::NotXml { .. })
        ));
        assert!(matches!(parse_domain(""), Err(DomainError::NotXml { .. })));
        let ns_root = "<domain xmlns='urn:other'><name>d</name></domain>";
        assert!(err(ns_root).contains("<{urn:other}domain>"));
    }

    #[test]
    fn qemu_passthrough_is_noted() {
        let xml = "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
             <name>d</name><qemu:commandline><qemu:arg value='-device'/>\
             <qemu:arg value='vfio-pci,host=0000:3b:00.2'/></qemu:commandline>\
             <qemu:override><qemu:device alias='hostdev0'/></qemu:override></domain>";
        let spec = parse_domain(xml).unwrap();
        assert!(spec.hostdevs.is_empty());
        assert_eq!(
            spec.unsupported,
            vec![
                "<qemu:commandline> passes 2 raw QEMU argument(s), which devfence cannot check",
                "<qemu:override> changes QEMU properties of 1 device(s), which devfence cannot check",
            ]
        );
    }

    #[test]
    fn every_error_message_has_a_hint_and_one_line() {
        for xml in [BAD_ADDRESS, NOT_DOMAIN, TRUNCATED] {
            err(xml);
        }
    }

    // ---- decide_prepare ---------------------------------------------------------

    fn web1() -> DomainSpec {
        parse_domain(PCI_TWO_VFS).unwrap()
    }
    const VF1: &str = "0000:3b:00.1";
    const VF3: &str = "0000:3b:00.3";

    #[test]
    fn all_ready_for_one_tenant_is_admitted() {
        let ledger = [
            (pci(VF1), ready("acme", None)),
            (pci(VF3), ready("acme", None)),
        ];
        let mut web1 = web1();
        web1.tenant = Some(t("acme"));
        assert_eq!(
            decide(&web1, &ledger),
            Ok(Admission {
                tenant: Some(t("acme")),
                devices: vec![pci(VF1), pci(VF3)],
            })
        );
        let gpu = parse_domain(MDEV_GPU).unwrap();
        let ledger = [
            (
                mdev("a1b2c3d4-0065-4000-8000-000000000001"),
                ready("acme", None),
            ),
            (
                mdev("a1b2c3d4-0065-4000-8000-000000000002"),
                ready("acme", Some("render-7")),
            ),
        ];
        assert_eq!(decide(&gpu, &ledger).unwrap().tenant, Some(t("acme")));
    }

    /// issue 18 item 13: a domain that names no tenant and holds no device
    /// reserved for it is refused by default, with a hint.
    #[test]
    fn unidentified_domain_is_refused_by_default() {
        let ledger = [
            (pci(VF1), ready("acme", None)),
            (pci(VF3), ready("acme", None)),
        ];
        let r = decide(&web1(), &ledger).unwrap_err();
        assert_eq!(r.device, Some(pci(VF1)));
        let line = r.to_string();
        assert!(
            line.contains("names no tenant") && line.contains("Hint: "),
            "{line}"
        );
        assert!(
            line.contains("devfence:tenant") && line.contains("--vm"),
            "{line}"
        );
        // One device reserved for this domain identifies it (and its tenant).
        let ledger = [
            (pci(VF1), ready("acme", None)),
            (pci(VF3), ready("acme", Some("web1"))),
        ];
        assert_eq!(decide(&web1(), &ledger).unwrap().tenant, Some(t("acme")));
        // ... and a device of another tenant next to it is refused.
        let ledger = [
            (pci(VF1), ready("globex", None)),
            (pci(VF3), ready("acme", Some("web1"))),
        ];
        let r = decide(&web1(), &ledger).unwrap_err();
        assert_eq!(r.device, Some(pci(VF1)));
        assert!(r.reason.contains("reserved for this domain by acme"), "{r}");
    }

    /// issue 18 item 13: the single-tenant switch admits an unidentified domain
    /// while the ledger knows one tenant, and only then.
    #[test]
    fn single_tenant_switch_holds_for_one_tenant_only() {
        let ledger = [
            (pci(VF1), ready("acme", None)),
            (pci(VF3), ready("acme", None)),
        ];
        let with = |tenants| {
            decide_prepare_with(
                &web1(),
                &mut |d| Ok(ledger.iter().find(|(x, _)| x == d).map(|(_, s)| s.clone())),
                Unidentified::SingleTenant { tenants },
            )
        };
        assert_eq!(with(1).unwrap().tenant, Some(t("acme")));
        let r = with(2).unwrap_err();
        assert!(r.reason.contains("single-tenant host only"), "{r}");
    }

    /// issue 18 item 9: a network-pool interface whose `<actual type='hostdev'>`
    /// names a VF counts like a `<hostdev>`; other `<actual>` types do not.
    #[test]
    fn fixture_interface_network_pool() {
        let spec = parse_domain(INTERFACE_NETWORK_POOL).unwrap();
        assert_eq!(spec.hostdevs, vec![pci("0000:5e:10.2")]);
        let two = domain_with(
            "<interface type='network'><actual type='hostdev'><source><address \
             domain='0' bus='0x5e' slot='0x10' function='0'/></source></actual>\
             <actual type='bridge'/></interface>",
        );
        assert!(err(&two).contains("more than one <actual>"));
        // The same VF as a <hostdev> and behind a pool interface is a duplicate.
        let dup = domain_with(
            "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0x5e' \
             slot='0x10' function='0'/></source></hostdev><interface type='network'>\
             <actual type='hostdev'><source><address domain='0' bus='0x5e' slot='0x10' \
             function='0'/></source></actual></interface>",
        );
        assert!(err(&dup).contains("twice"));
    }

    #[test]
    fn ready_reserved_for_this_domain_is_admitted() {
        let ledger = [
            (pci(VF1), ready("acme", Some("web1"))),
            (pci(VF3), ready("acme", Some("web1"))),
        ];
        assert!(decide(&web1(), &ledger).is_ok());
    }

    #[test]
    fn any_state_but_ready_is_refused_naming_the_device() {
        let q = DeviceState::Quarantined {
            reason: "scrub failed".into(),
        };
        for (state, needle) in [
            (
                DeviceState::Free,
                "0000:3b:00.3 is Free, not Ready for acme",
            ),
            (
                DeviceState::Preparing {
                    tenant: t("acme"),
                    vm: None,
                },
                "0000:3b:00.3 is Preparing(acme), not Ready for acme",
            ),
            (
                DeviceState::Scrubbing,
                "0000:3b:00.3 is Scrubbing, not Ready for acme",
            ),
            (
                q,
                "0000:3b:00.3 is Quarantined(scrub failed), not Ready for acme",
            ),
            (
                DeviceState::Active {
                    tenant: t("acme"),
                    vm: "web9".into(),
                },
                "0000:3b:00.3 is already in use by a running domain (Active(acme, web9))",
            ),
            (
                // Active for this very domain is refused too: only Ready passes.
                DeviceState::Active {
                    tenant: t("acme"),
                    vm: "web1".into(),
                },
                "already in use by a running domain (Active(acme, web1))",
            ),
            (
                DeviceState::Draining {
                    tenant: t("globex"),
                    vm: "db".into(),
                },
                "already in use by a running domain (Draining(globex, db))",
            ),
        ] {
            let ledger = [(pci(VF1), ready("acme", None)), (pci(VF3), state)];
            let r = decide(&web1(), &ledger).unwrap_err();
            assert_eq!(r.device, Some(pci(VF3)));
            let line = r.to_string();
            assert!(line.starts_with("devfence refuses domain web1: "), "{line}");
            assert!(line.contains(needle) && line.contains("Hint: "), "{line}");
        }
    }

    #[test]
    fn not_ready_without_a_known_tenant_says_not_ready() {
        let ledger = [
            (pci(VF1), DeviceState::Free),
            (pci(VF3), DeviceState::Scrubbing),
        ];
        let r = decide(&web1(), &ledger).unwrap_err();
        assert_eq!(r.device, Some(pci(VF1)));
        assert!(
            r.to_string()
                .contains("0000:3b:00.1 is Free, not Ready. Hint"),
            "{r}"
        );
    }

    #[test]
    fn mixed_tenants_are_refused() {
        let ledger = [
            (pci(VF1), ready("acme", None)),
            (pci(VF3), ready("globex", None)),
        ];
        let r = decide(&web1(), &ledger).unwrap_err();
        assert_eq!(r.device, Some(pci(VF3)));
        assert!(
            r.reason
                .contains("0000:3b:00.3 is Ready for globex, but 0000:3b:00.1 is Ready for acme"),
            "{r}"
        );
    }

    #[test]
    fn metadata_tenant_mismatch_is_refused() {
        let db = parse_domain(METADATA_TENANT).unwrap();
        let dev = pci("0000:86:00.1");
        let r = decide(&db, &[(dev, ready("globex", None))]).unwrap_err();
        assert_eq!(r.device, Some(dev));
        assert!(r.reason.contains("metadata names tenant acme"), "{r}");
        assert!(decide(&db, &[(dev, ready("acme", None))]).is_ok());
        // The metadata tenant is the one named in "not Ready for …".
        let r = decide(&db, &[(dev, DeviceState::Free)]).unwrap_err();
        assert!(r.reason.contains("not Ready for acme"), "{r}");
    }

    #[test]
    fn ready_reserved_for_this_domains_uuid_is_admitted() {
        let d = web1();
        let uuid = d.uuid.clone().expect("the fixture has a <uuid>");
        let ledger = [
            (pci(VF1), ready("acme", Some(&uuid.to_uppercase()))),
            (pci(VF3), ready("acme", Some("web1"))),
        ];
        assert!(decide(&d, &ledger).is_ok());
        let other = [(
            pci(VF1),
            ready("acme", Some("00000000-0000-4000-8000-000000000000")),
        )];
        assert!(
            decide(&d, &other).is_err(),
            "another UUID is another domain"
        );
    }

    #[test]
    fn ready_for_another_domain_is_refused() {
        let ledger = [
            (pci(VF1), ready("acme", Some("web1"))),
            (pci(VF3), ready("acme", Some("web2"))),
        ];
        let r = decide(&web1(), &ledger).unwrap_err();
        assert_eq!(r.device, Some(pci(VF3)));
        assert!(
            r.reason.contains("reserved for domain web2, not web1"),
            "{r}"
        );
    }

    #[test]
    fn ledger_error_is_refused_fail_closed() {
        let r = decide_prepare(&web1(), &mut |d| {
            if *d == pci(VF3) {
                Err("database is locked".to_string())
            } else {
                Ok(Some(ready("acme", None)))
            }
        })
        .unwrap_err();
        assert_eq!(r.device, Some(pci(VF3)));
        assert!(
            r.reason
                .contains("cannot read the ledger state of 0000:3b:00.3: database is locked")
        );
    }

    #[test]
    fn unmanaged_device_is_refused() {
        let r = decide(&web1(), &[(pci(VF1), ready("acme", None))]).unwrap_err();
        assert_eq!(r.device, Some(pci(VF3)));
        assert!(
            r.reason.contains("0000:3b:00.3 is not managed by devfence"),
            "{r}"
        );
    }

    #[test]
    fn no_managed_device_is_admitted_without_asking() {
        for xml in [NO_HOSTDEV, USB_ONLY] {
            let spec = parse_domain(xml).unwrap();
            let adm = decide_prepare(&spec, &mut |d| panic!("asked about {d}")).unwrap();
            assert_eq!(
                adm,
                Admission {
                    tenant: None,
                    devices: vec![]
                }
            );
        }
    }

    #[test]
    fn refusal_display_is_one_line() {
        let q = DeviceState::Quarantined {
            reason: "scrub failed:\nFLR timed out\r\n\u{2028}again\u{85}".into(),
        };
        let ledger = [(pci(VF1), q)];
        let r = decide(&spec("web1", Some("acme"), &[pci(VF1)]), &ledger).unwrap_err();
        let line = r.to_string();
        assert!(
            !line.contains(['\n', '\r', '\u{2028}', '\u{85}']),
            "{line:?}"
        );
        assert!(line.starts_with(
            "devfence refuses domain web1: 0000:3b:00.1 is Quarantined(scrub failed: FLR timed out"
        ));
        let r = decide_prepare(&web1(), &mut |_| Err("line one\nline two".into())).unwrap_err();
        assert!(!r.to_string().contains('\n'));
        let r = Refusal {
            domain: "evil\nname".into(),
            device: None,
            reason: "x\ty".into(),
        };
        assert_eq!(r.to_string(), "devfence refuses domain evil name: x y");
    }

    // ---- never panics -----------------------------------------------------------

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn parse_never_panics_on_arbitrary_strings(s in ".{0,400}") {
            let _ = parse_domain(&s);
        }

        #[test]
        fn parse_never_panics_on_xmlish_strings(
            s in "(<domain>|<name>|</name>|<devices>|<hostdev type='pci'>|<hostdev type='mdev'>|\
                   <source>|<address bus='0x3b' slot='0' function='1'/>|<address uuid='x'/>|\
                   </source>|</hostdev>|<interface type='hostdev'>|</devices>|</domain>|a|&amp;|\
                   &#0;|<!--|-->|<![CDATA[|]]>){0,40}"
        ) {
            let _ = parse_domain(&s);
        }

        #[test]
        fn parse_never_panics_on_mutated_fixtures(
            which in 0..FIXTURES.len(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..12),
        ) {
            let mut bytes = FIXTURES[which].as_bytes().to_vec();
            for (at, byte, op) in edits {
                if bytes.is_empty() {
                    bytes.push(byte);
                    continue;
                }
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = byte,
                    1 => { bytes.remove(i); }
                    _ => bytes.insert(i, byte),
                }
            }
            let s = String::from_utf8_lossy(&bytes);
            if let Ok(spec) = parse_domain(&s) {
                // Whatever parses is well-formed and decidable.
                prop_assert!(!spec.name.is_empty() && spec.name.len() <= MAX_NAME);
                let _ = decide_prepare(&spec, &mut |_| Ok(Some(DeviceState::Free)));
            }
        }
    }
}
