//! Loading and validating the tenancy file (`devfence check --tenancy FILE`).
//!
//! The file is TOML and maps onto [`Tenancy`]: `[[tenant]]`, `[[assignment]]`,
//! `[[userspace_pf]]` and `[[non_isolating_parent]]` tables. Syntax and type errors
//! keep the `toml` crate's line/column rendering. After a successful parse the
//! declaration is validated as a whole; every validation error names the file, the
//! entry (`assignment[2]`, indices from 0 as in the TOML arrays, with its line), the
//! offending value and a `Hint: …`.
//!
//! Two strictnesses (issue 18 items 1 and 2). [`load_tenancy`] refuses a
//! declaration that puts two tenants on one isolation domain: one P_Key (the 15-bit
//! partition, in any membership) or one launcher uid given to two tenants, or a
//! tenant partition in the default partition (0x7fff). `devfence check` reads the
//! file with [`load_tenancy_to_check`] instead, which leaves exactly those to the
//! rules that report them (`TENANCY-PKEY-SHARED`, `TENANCY-LAUNCHER-SHARED`,
//! `IB-DEFAULT-PKEY-FULL`), so they appear as error findings next to every other
//! finding. Both refuse a uid or gid the kernel cannot store (4294967295).

use devfence_model::bounded::ReadFileError;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use devfence_model::{Bdf, DeviceId, Inventory, Tenancy};

/// The largest tenancy file devfence reads (bytes). A tenancy for a host with
/// tens of thousands of devices stays well below it.
pub const MAX_TENANCY_BYTES: u64 = 16 * 1024 * 1024;

/// Where in the tenancy file an entry is: `assignment[2] (line 14)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The table array and index, e.g. `assignment[2]` (indices count from 0).
    pub name: String,
    /// The 1-based line the entry starts on, when known.
    pub line: Option<usize>,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{} (line {l})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Why a tenancy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    /// The file could not be opened or read.
    #[error("Cannot read tenancy file {path}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_TENANCY_BYTES`].
    #[error(
        "Tenancy file {path} is larger than {limit} bytes. Hint: is this really a tenancy file?"
    )]
    TooLarge {
        /// The file.
        path: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// The file is not UTF-8 text.
    #[error(
        "Tenancy file {path} is not UTF-8 (invalid byte at offset {offset}). Hint: save it as UTF-8 text"
    )]
    NotUtf8 {
        /// The file.
        path: String,
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// TOML syntax or type error; `message` is the `toml` crate's rendering with line
    /// and column.
    #[error("Invalid tenancy file {origin}: {message}")]
    Syntax {
        /// The file.
        origin: String,
        /// The rendered parse error (`TOML parse error at line L, column C …`).
        message: String,
    },
    /// The file parses but does not hold together.
    #[error("{0}")]
    Invalid(Box<Invalid>),
}

/// A tenancy declaration that parses but does not hold together: which file,
/// which entry, which value, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The file (the `origin` given to [`parse_tenancy`]).
    pub origin: String,
    /// The offending entry.
    pub entry: Entry,
    /// The offending value (tenant id, device, GUID, P_Key, parent name).
    pub value: String,
    /// What is wrong.
    pub problem: Problem,
}

/// What is wrong with a tenancy entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Two `[[tenant]]` entries with one id; `first` is the first of them.
    DuplicateTenant {
        /// The first entry with that id.
        first: Entry,
    },
    /// An entry names a tenant no `[[tenant]]` declares.
    UnknownTenant,
    /// The same device in two entries of one table array.
    DuplicateDevice {
        /// The first entry with that device.
        first: Entry,
    },
    /// A PF assigned to one tenant while another holds its PF custody.
    CustodyConflict {
        /// The tenant of the assignment.
        tenant: String,
        /// The `userspace_pf` entry.
        custody: Entry,
        /// The tenant of the `userspace_pf` entry.
        custodian: String,
    },
    /// A `[[userspace_pf]]` naming something other than a PCI function.
    NotPci,
    /// An assignment naming GUID zero or all ones.
    ReservedGuid,
    /// A partition P_Key whose base is 0 (an empty table slot).
    EmptyPkey,
    /// An empty `non_isolating_parent` name.
    EmptyParent,
    /// A P_Key (any membership) another tenant has.
    SharedPkey {
        /// The tenant that has it first.
        holder: String,
        /// Its partition entry.
        first: Entry,
    },
    /// A launcher uid another tenant has.
    SharedLauncher {
        /// The tenant that has it first.
        holder: String,
        /// Its entry.
        first: Entry,
    },
    /// A tenant partition in the default partition.
    DefaultPkey,
    /// A uid or gid the kernel cannot store ((uid_t)-1).
    UnstorableId {
        /// `launcher_uid` or `launcher_gid`.
        field: &'static str,
    },
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Invalid {
            origin,
            entry,
            value,
            problem,
        } = self;
        match problem {
            Problem::DuplicateTenant { first } => write!(
                f,
                "Duplicate tenant id {value:?} in {origin}, {entry}; first declared in {first}. \
                 Hint: give every [[tenant]] its own id"
            ),
            Problem::UnknownTenant => write!(
                f,
                "Unknown tenant {value:?} in {origin}, {entry}. Hint: declare it in a [[tenant]] \
                 table (id = {value:?}) or fix the name"
            ),
            Problem::DuplicateDevice { first } => write!(
                f,
                "Device {value} is declared twice in {origin}, {entry}; first in {first}. Hint: \
                 a device belongs to one tenant at a time; remove one of the entries"
            ),
            Problem::CustodyConflict {
                tenant,
                custody,
                custodian,
            } => write!(
                f,
                "PF {value} in {origin}, {entry} is assigned to tenant {tenant:?} but {custody} \
                 gives its custody to {custodian:?}. Hint: a user-space PF and the PF itself \
                 belong to the same tenant"
            ),
            Problem::NotPci => write!(
                f,
                "Device {value} in {origin}, {entry} is not a PCI function. Hint: name a \
                 user-space PF by its BDF, e.g. \"0000:3b:00.0\""
            ),
            Problem::ReservedGuid => write!(
                f,
                "Reserved GUID {value} in {origin}, {entry}. Hint: zero and all-ones GUIDs name \
                 no port; use the VF's port GUID"
            ),
            Problem::EmptyPkey => write!(
                f,
                "P_Key {value} in {origin}, {entry} names no partition. Hint: use the \
                 partition's P_Key, e.g. \"0x8001\"; 0x0000 is an empty slot"
            ),
            Problem::EmptyParent => write!(
                f,
                "Empty parent name in {origin}, {entry}. Hint: name the mdev parent as in \
                 /sys/class/mdev_bus, e.g. \"0000:af:00.0\""
            ),
            Problem::SharedPkey { holder, first } => write!(
                f,
                "P_Key {value} in {origin}, {entry} is tenant {holder:?}'s already ({first}), in \
                 some membership. Hint: a partition belongs to one tenant (rule \
                 TENANCY-PKEY-SHARED); give this tenant a P_Key of its own"
            ),
            Problem::SharedLauncher { holder, first } => write!(
                f,
                "Launcher uid {value} in {origin}, {entry} is tenant {holder:?}'s already \
                 ({first}). Hint: the launcher uid owns the tenant's /dev/vfio nodes (rule \
                 TENANCY-LAUNCHER-SHARED); run each tenant's QEMU as a uid of its own"
            ),
            Problem::DefaultPkey => write!(
                f,
                "P_Key {value} in {origin}, {entry} is the default partition, which every port \
                 has. Hint: devfence keeps tenant ports limited members of it; give the tenant \
                 a P_Key of its own, e.g. \"0x8001\""
            ),
            Problem::UnstorableId { field } => write!(
                f,
                "{field} {value} in {origin}, {entry} is (uid_t)-1, which the kernel cannot \
                 store. Hint: give the uid/gid the tenant's QEMU runs as"
            ),
        }
    }
}

impl std::error::Error for Invalid {}

/// Parses and validates a tenancy declaration. `origin` names the source in error
/// messages (usually the file path).
///
/// # Errors
/// [`TenancyError::Syntax`] for TOML syntax and type errors (unknown keys, a
/// device that is not a BDF/UUID/APQN/GUID, …), and one of the validation variants
/// for a declaration that parses but does not hold together.
pub fn parse_tenancy(text: &str, origin: &str) -> Result<Tenancy, TenancyError> {
    parse(text, origin, true)
}

/// Parses and validates a tenancy declaration for `devfence check`: like
/// [`parse_tenancy`], but a P_Key or launcher uid two tenants share and a tenant
/// partition in the default partition are left to the rules that report them.
///
/// # Errors
/// As [`parse_tenancy`], less those three.
pub fn parse_tenancy_to_check(text: &str, origin: &str) -> Result<Tenancy, TenancyError> {
    parse(text, origin, false)
}

fn parse(text: &str, origin: &str, strict: bool) -> Result<Tenancy, TenancyError> {
    let tenancy: Tenancy = toml::from_str(text).map_err(|e| TenancyError::Syntax {
        origin: origin.to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let lines = EntryLines::new(text);
    validate(&tenancy, origin, &lines, strict)?;
    Ok(tenancy)
}

/// Reads, parses and validates a tenancy file.
///
/// # Errors
/// [`TenancyError::Read`], [`TenancyError::TooLarge`] or [`TenancyError::NotUtf8`]
/// when the file cannot be had as text, else as [`parse_tenancy`].
pub fn load_tenancy(path: &Path) -> Result<Tenancy, TenancyError> {
    read_text(path).and_then(|(text, shown)| parse_tenancy(&text, &shown))
}

/// Reads a tenancy file for `devfence check` ([`parse_tenancy_to_check`]).
///
/// # Errors
/// As [`load_tenancy`], less what the rules report.
pub fn load_tenancy_to_check(path: &Path) -> Result<Tenancy, TenancyError> {
    read_text(path).and_then(|(text, shown)| parse_tenancy_to_check(&text, &shown))
}

fn read_text(path: &Path) -> Result<(String, String), TenancyError> {
    let shown = path.display().to_string();
    let read_err = |source| TenancyError::Read {
        path: shown.clone(),
        source,
    };
    // Non-blocking, a regular file only, capped (devfence_model::bounded).
    let bytes = match devfence_model::bounded::read_file(path, MAX_TENANCY_BYTES) {
        Ok(b) => b,
        Err(ReadFileError::TooLarge { .. }) => {
            return Err(TenancyError::TooLarge {
                path: shown,
                limit: MAX_TENANCY_BYTES,
            });
        }
        Err(e) => return Err(read_err(e.into_io())),
    };
    let text = String::from_utf8(bytes).map_err(|e| TenancyError::NotUtf8 {
        path: shown.clone(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    Ok((text, shown))
}

/// Fuzz entry point: parses arbitrary bytes as a tenancy file and, when that
/// succeeds, runs every rule against an empty inventory. Must never panic.
pub fn fuzz_tenancy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_tenancy_to_check(text, "fuzz.toml") {
        Ok(t) => {
            let findings = crate::check(&Inventory::default(), &t);
            for f in &findings {
                let _ = f.to_string();
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Start lines of the entries of each table array, from a second, span-keeping
/// parse. Missing when that parse fails (it does not after the first succeeded).
struct EntryLines {
    tables: HashMap<&'static str, Vec<usize>>,
    partitions: Vec<Vec<usize>>,
}

#[derive(serde::Deserialize)]
struct SpannedTenant {
    #[serde(default)]
    partitions: Vec<toml::Spanned<serde::de::IgnoredAny>>,
}

#[derive(serde::Deserialize)]
struct SpannedDoc {
    #[serde(default)]
    tenant: Vec<toml::Spanned<SpannedTenant>>,
    #[serde(default)]
    assignment: Vec<toml::Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    userspace_pf: Vec<toml::Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    non_isolating_parent: Vec<toml::Spanned<serde::de::IgnoredAny>>,
}

impl EntryLines {
    fn new(text: &str) -> Self {
        let line_starts: Vec<usize> = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        let line_of = |offset: usize| -> usize { line_starts.partition_point(|&s| s <= offset) };
        let mut tables = HashMap::new();
        let mut partitions = Vec::new();
        if let Ok(doc) = toml::from_str::<SpannedDoc>(text) {
            let starts = |v: &[toml::Spanned<serde::de::IgnoredAny>]| -> Vec<usize> {
                v.iter().map(|s| line_of(s.span().start)).collect()
            };
            tables.insert(
                "tenant",
                doc.tenant.iter().map(|s| line_of(s.span().start)).collect(),
            );
            partitions = doc
                .tenant
                .iter()
                .map(|t| starts(&t.get_ref().partitions))
                .collect();
            tables.insert("assignment", starts(&doc.assignment));
            tables.insert("userspace_pf", starts(&doc.userspace_pf));
            tables.insert("non_isolating_parent", starts(&doc.non_isolating_parent));
        }
        Self { tables, partitions }
    }

    fn entry(&self, table: &'static str, i: usize) -> Entry {
        Entry {
            name: format!("{table}[{i}]"),
            line: self.tables.get(table).and_then(|v| v.get(i)).copied(),
        }
    }

    fn partition(&self, tenant: usize, j: usize) -> Entry {
        Entry {
            name: format!("tenant[{tenant}].partitions[{j}]"),
            line: self.partitions.get(tenant).and_then(|v| v.get(j)).copied(),
        }
    }
}

fn validate(
    t: &Tenancy,
    origin: &str,
    lines: &EntryLines,
    strict: bool,
) -> Result<(), TenancyError> {
    let bad = |entry: Entry, value: String, problem: Problem| {
        Err(TenancyError::Invalid(Box::new(Invalid {
            origin: origin.to_string(),
            entry,
            value,
            problem,
        })))
    };
    let mut tenants: HashMap<&str, usize> = HashMap::new();
    let mut uids: HashMap<u32, (usize, &str)> = HashMap::new();
    let mut pkeys: HashMap<u16, (usize, usize, &str)> = HashMap::new();
    for (i, tenant) in t.tenants.iter().enumerate() {
        if let Some(&first) = tenants.get(tenant.id.as_str()) {
            return bad(
                lines.entry("tenant", i),
                tenant.id.to_string(),
                Problem::DuplicateTenant {
                    first: lines.entry("tenant", first),
                },
            );
        }
        tenants.insert(tenant.id.as_str(), i);
        for (field, id) in [
            ("launcher_uid", tenant.launcher_uid),
            ("launcher_gid", tenant.launcher_gid),
        ] {
            if id == Some(u32::MAX) {
                return bad(
                    lines.entry("tenant", i),
                    u32::MAX.to_string(),
                    Problem::UnstorableId { field },
                );
            }
        }
        if strict && let Some(uid) = tenant.launcher_uid {
            if let Some(&(k, holder)) = uids.get(&uid) {
                return bad(
                    lines.entry("tenant", i),
                    uid.to_string(),
                    Problem::SharedLauncher {
                        holder: holder.to_string(),
                        first: lines.entry("tenant", k),
                    },
                );
            }
            uids.insert(uid, (i, tenant.id.as_str()));
        }
        for (j, p) in tenant.partitions.iter().enumerate() {
            if p.pkey.is_empty_slot() {
                return bad(
                    lines.partition(i, j),
                    p.pkey.to_string(),
                    Problem::EmptyPkey,
                );
            }
            if !strict {
                continue;
            }
            if p.pkey.is_default() {
                return bad(
                    lines.partition(i, j),
                    p.pkey.to_string(),
                    Problem::DefaultPkey,
                );
            }
            match pkeys.get(&p.pkey.base()) {
                Some(&(k, l, holder)) if holder != tenant.id.as_str() => {
                    return bad(
                        lines.partition(i, j),
                        p.pkey.to_string(),
                        Problem::SharedPkey {
                            holder: holder.to_string(),
                            first: lines.partition(k, l),
                        },
                    );
                }
                Some(_) => {}
                None => {
                    pkeys.insert(p.pkey.base(), (i, j, tenant.id.as_str()));
                }
            }
        }
    }

    let mut assigned: HashMap<DeviceId, usize> = HashMap::new();
    for (i, a) in t.assignments.iter().enumerate() {
        if !tenants.contains_key(a.tenant.as_str()) {
            return bad(
                lines.entry("assignment", i),
                a.tenant.to_string(),
                Problem::UnknownTenant,
            );
        }
        if let DeviceId::IbGuid(g) = a.device
            && g.is_reserved()
        {
            return bad(
                lines.entry("assignment", i),
                g.to_string(),
                Problem::ReservedGuid,
            );
        }
        if let Some(&first) = assigned.get(&a.device) {
            return bad(
                lines.entry("assignment", i),
                a.device.to_string(),
                Problem::DuplicateDevice {
                    first: lines.entry("assignment", first),
                },
            );
        }
        assigned.insert(a.device, i);
    }

    let mut custody: HashMap<Bdf, usize> = HashMap::new();
    for (k, u) in t.userspace_pfs.iter().enumerate() {
        if !tenants.contains_key(u.tenant.as_str()) {
            return bad(
                lines.entry("userspace_pf", k),
                u.tenant.to_string(),
                Problem::UnknownTenant,
            );
        }
        let DeviceId::Pci(bdf) = u.device else {
            return bad(
                lines.entry("userspace_pf", k),
                u.device.to_string(),
                Problem::NotPci,
            );
        };
        if let Some(&first) = custody.get(&bdf) {
            return bad(
                lines.entry("userspace_pf", k),
                bdf.to_string(),
                Problem::DuplicateDevice {
                    first: lines.entry("userspace_pf", first),
                },
            );
        }
        custody.insert(bdf, k);
        if let Some(a) = assigned
            .get(&DeviceId::Pci(bdf))
            .and_then(|&i| t.assignments.get(i).map(|a| (i, a)))
            && a.1.tenant != u.tenant
        {
            return bad(
                lines.entry("assignment", a.0),
                bdf.to_string(),
                Problem::CustodyConflict {
                    tenant: a.1.tenant.to_string(),
                    custody: lines.entry("userspace_pf", k),
                    custodian: u.tenant.to_string(),
                },
            );
        }
    }

    for (k, p) in t.non_isolating_parents.iter().enumerate() {
        if p.device.trim().is_empty() {
            return bad(
                lines.entry("non_isolating_parent", k),
                p.device.clone(),
                Problem::EmptyParent,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[tenant]]
id = "acme"
launcher_uid = 107
partitions = [{ pkey = "0x8001", membership = "full" }]

[[tenant]]
id = "globex"
partitions = [{ pkey = "0x7fff", membership = "full" }]

[[assignment]]
device = "0000:3b:00.2"
tenant = "acme"

[[assignment]]
device = "05.0012"
tenant = "globex"

[[assignment]]
device = "0x0002c90300a1b2c3"
tenant = "acme"

[[userspace_pf]]
device = "0000:3b:00.0"
tenant = "acme"

[[non_isolating_parent]]
device = "0000:af:00.0"
"#;

    fn err(text: &str) -> String {
        parse_tenancy(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn parses_the_documented_example() {
        let t = parse_tenancy_to_check(GOOD, "t.toml").unwrap();
        assert_eq!(t.tenants.len(), 2);
        assert_eq!(t.assignments.len(), 3);
        assert!(matches!(t.assignments[1].device, DeviceId::Apqn(_)));
        assert!(matches!(t.assignments[2].device, DeviceId::IbGuid(_)));
        assert_eq!(t.userspace_pfs.len(), 1);
        assert_eq!(t.non_isolating_parents[0].device, "0000:af:00.0");
        // The default P_Key is accepted for `check`; a rule reports it. Loading
        // for any other use refuses it.
        assert!(t.tenants[1].partitions[0].pkey.is_default());
        assert!(
            err(GOOD).contains("is the default partition"),
            "{}",
            err(GOOD)
        );
        assert_eq!(parse_tenancy("", "t.toml").unwrap(), Tenancy::default());
    }

    #[test]
    fn duplicate_tenant() {
        let e = err("[[tenant]]\nid = \"acme\"\n\n[[tenant]]\nid = \"acme\"\n");
        assert_eq!(
            e,
            "Duplicate tenant id \"acme\" in t.toml, tenant[1] (line 4); first declared in \
             tenant[0] (line 1). Hint: give every [[tenant]] its own id"
        );
        let TenancyError::Invalid(inv) = parse_tenancy(
            "[[tenant]]\nid = \"acme\"\n[[tenant]]\nid = \"acme\"\n",
            "t.toml",
        )
        .unwrap_err() else {
            panic!("not a validation error");
        };
        assert_eq!(inv.entry.name, "tenant[1]");
        assert_eq!(inv.entry.line, Some(3));
        assert_eq!(inv.value, "acme");
        assert!(matches!(inv.problem, Problem::DuplicateTenant { .. }));
    }

    #[test]
    fn unknown_tenant_in_assignment_and_userspace_pf() {
        let e = err(
            "[[tenant]]\nid = \"acme\"\n[[assignment]]\ndevice = \"0000:3b:00.2\"\ntenant = \"acme\"\n\
             [[assignment]]\ndevice = \"0000:3b:00.3\"\ntenant = \"initech\"\n",
        );
        assert_eq!(
            e,
            "Unknown tenant \"initech\" in t.toml, assignment[1] (line 6). Hint: declare it in \
             a [[tenant]] table (id = \"initech\") or fix the name"
        );
        let e = err("[[userspace_pf]]\ndevice = \"0000:3b:00.0\"\ntenant = \"acme\"\n");
        assert!(
            e.starts_with("Unknown tenant \"acme\" in t.toml, userspace_pf[0] (line 1)."),
            "{e}"
        );
    }

    #[test]
    fn device_assigned_twice() {
        let e = err("[[tenant]]\nid = \"a\"\n[[tenant]]\nid = \"b\"\n\
             [[assignment]]\ndevice = \"0000:3b:00.2\"\ntenant = \"a\"\n\
             [[assignment]]\ndevice = \"0000:3B:00.2\"\ntenant = \"b\"\n");
        assert_eq!(
            e,
            "Device 0000:3b:00.2 is declared twice in t.toml, assignment[1] (line 8); first \
             in assignment[0] (line 5). Hint: a device belongs to one tenant at a time; remove \
             one of the entries"
        );
        let e = err("[[tenant]]\nid = \"a\"\n\
             [[userspace_pf]]\ndevice = \"0000:3b:00.0\"\ntenant = \"a\"\n\
             [[userspace_pf]]\ndevice = \"0000:3b:00.0\"\ntenant = \"a\"\n");
        assert!(
            e.contains("userspace_pf[1] (line 6); first in userspace_pf[0]"),
            "{e}"
        );
    }

    #[test]
    fn other_validation_errors() {
        let e =
            err("[[tenant]]\nid = \"a\"\n[[userspace_pf]]\ndevice = \"05.0012\"\ntenant = \"a\"\n");
        assert_eq!(
            e,
            "Device 05.0012 in t.toml, userspace_pf[0] (line 3) is not a PCI function. Hint: \
             name a user-space PF by its BDF, e.g. \"0000:3b:00.0\""
        );
        let e = err("[[tenant]]\nid = \"a\"\n[[assignment]]\ndevice = \"0x0\"\ntenant = \"a\"\n");
        assert_eq!(
            e,
            "Reserved GUID 0x0000000000000000 in t.toml, assignment[0] (line 3). Hint: zero and \
             all-ones GUIDs name no port; use the VF's port GUID"
        );
        let e = err(
            "[[tenant]]\nid = \"a\"\npartitions = [\n { pkey = \"0x8001\", membership = \"full\" },\n \
             { pkey = \"0x8000\", membership = \"full\" },\n]\n",
        );
        assert_eq!(
            e,
            "P_Key 0x8000 in t.toml, tenant[0].partitions[1] (line 5) names no partition. Hint: \
             use the partition's P_Key, e.g. \"0x8001\"; 0x0000 is an empty slot"
        );
        let e = err("[[tenant]]\nid = \"a\"\n[[tenant]]\nid = \"b\"\n\
             [[assignment]]\ndevice = \"0000:3b:00.0\"\ntenant = \"b\"\n\
             [[userspace_pf]]\ndevice = \"0000:3b:00.0\"\ntenant = \"a\"\n");
        assert_eq!(
            e,
            "PF 0000:3b:00.0 in t.toml, assignment[0] (line 5) is assigned to tenant \"b\" but \
             userspace_pf[0] (line 8) gives its custody to \"a\". Hint: a user-space PF and the \
             PF itself belong to the same tenant"
        );
        let e = err("[[non_isolating_parent]]\ndevice = \" \"\n");
        assert_eq!(
            e,
            "Empty parent name in t.toml, non_isolating_parent[0] (line 1). Hint: name the mdev \
             parent as in /sys/class/mdev_bus, e.g. \"0000:af:00.0\""
        );
    }

    #[test]
    fn syntax_errors_keep_line_and_column() {
        let e = err("[[assignment]]\ndevice = \"0000:3b:00.x\"\ntenant = \"a\"\n");
        assert!(
            e.starts_with("Invalid tenancy file t.toml: TOML parse error at line 2, column 10"),
            "{e}"
        );
        assert!(e.contains("Invalid device \"0000:3b:00.x\""), "{e}");
        let e = err("[[tenant]]\nid = \"a\"\nlauncher = 5\n");
        assert!(e.contains("line 3, column 1") && e.contains("unknown field `launcher`"));
        let e = err("[[tenant]]\nid = \"-a\"\n");
        assert!(e.contains("Invalid tenant id"), "{e}");
        let e = err("[[tenant]\n");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn load_errors() {
        let dir = std::env::temp_dir().join(format!("devfence-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.toml");
        let e = load_tenancy(&missing).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Cannot read tenancy file {}", missing.display())
        );
        assert!(std::error::Error::source(&e).is_some());

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, b"[[tenant]]\nid = \"a\xff\"\n").unwrap();
        let e = load_tenancy(&bad).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "Tenancy file {} is not UTF-8 (invalid byte at offset 18). Hint: save it as UTF-8 text",
                bad.display()
            )
        );

        let big = dir.join("big.toml");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_TENANCY_BYTES + 1)
            .unwrap();
        let e = load_tenancy(&big).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "Tenancy file {} is larger than 16777216 bytes. Hint: is this really a tenancy file?",
                big.display()
            )
        );

        let good = dir.join("good.toml");
        std::fs::write(&good, GOOD).unwrap();
        let t = load_tenancy_to_check(&good).unwrap();
        assert_eq!(t.assignments.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fuzz_entry_survives_odd_input() {
        for input in [
            &b""[..],
            b"\xff\xfe",
            b"a = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            b"[[assignment]]\ndevice = \"0x1\"\ntenant = \"x\"\n",
            GOOD.as_bytes(),
        ] {
            fuzz_tenancy(input);
        }
        let deep = format!("a = {}", "[".repeat(100_000));
        fuzz_tenancy(deep.as_bytes());
    }

    /// issue 18 items 1 and 2: a P_Key (any membership) and a launcher uid belong to
    /// one tenant; a file giving one to two tenants is refused when loaded (and left
    /// to the rules when loaded for `check`); (uid_t)-1 is refused by both.
    #[test]
    fn shared_pkeys_and_launchers_are_refused_when_loaded() {
        let pk = "[[tenant]]\nid = \"acme\"\npartitions = [{ pkey = \"0x8001\", membership = \"full\" }]\n\
                  [[tenant]]\nid = \"mallory\"\npartitions = [{ pkey = \"0x0001\", membership = \"limited\" }]\n";
        let e = err(pk);
        assert!(
            e.starts_with("P_Key 0x0001 in t.toml, tenant[1].partitions[0]")
                && e.contains("\"acme\"'s already"),
            "{e}"
        );
        assert!(
            e.contains("TENANCY-PKEY-SHARED") && e.contains("Hint:"),
            "{e}"
        );
        assert!(parse_tenancy_to_check(pk, "t.toml").is_ok());
        let uid = "[[tenant]]\nid = \"acme\"\nlauncher_uid = 107\n[[tenant]]\nid = \"mallory\"\nlauncher_uid = 107\n";
        let e = err(uid);
        assert!(
            e.starts_with("Launcher uid 107 in t.toml, tenant[1] (line 4) is tenant \"acme\"'s"),
            "{e}"
        );
        assert!(parse_tenancy_to_check(uid, "t.toml").is_ok());
        for max in ["launcher_uid = 4294967295", "launcher_gid = 4294967295"] {
            let text = format!("[[tenant]]\nid = \"acme\"\n{max}\n");
            assert!(err(&text).contains("4294967295"), "{max}");
            assert!(parse_tenancy_to_check(&text, "t.toml").is_err(), "{max}");
        }
    }
}
