//! OpenSM's partition configuration (`partitions.conf`): a parser of the same
//! grammar OpenSM 3.3 reads (`osm_prtn_config.c`), and the renderer of the block
//! devfence owns in it.
//!
//! **Why devfence parses before it applies.** A partitions file OpenSM cannot
//! parse does not stop OpenSM: it logs `PARSE ERROR`, falls back to the default
//! configuration — every port a *full* member of the default partition — and
//! still logs `SUBNET UP`. Tenant isolation is gone and the fabric looks healthy.
//! So devfence parses every file it is about to write with this parser, and the
//! parser is *stricter* than OpenSM: whatever OpenSM would reject (or accept only
//! with a warning, or read differently from how it looks) is refused here with the
//! line and a hint.
//!
//! ## The grammar (as OpenSM reads it)
//!
//! ```text
//! # comment to end of line
//! Name[=PKey][,flag[=value]]... : member[,member]... ;
//! member = (PortGUID | ALL | ALL_CAS | ALL_SWITCHES | ALL_ROUTERS | SELF | NONE)[=full|limited|both]
//!        | mgid=<IPv6 multicast address>[,flag=value]...   (consumes the rest of the line)
//! flag   = ipoib | mtu | rate | scope | Q_Key | TClass | sl | FlowLabel | defmember
//! ```
//!
//! A statement may span lines (members continue on the next line until `;`).
//! Where devfence is stricter than OpenSM:
//! - OpenSM reads lines with a 4 KiB buffer and silently splits longer ones (a GUID
//!   cut in two becomes another GUID or a parse error): lines over
//!   [`MAX_LINE`] bytes are refused. The renderer writes one member per line.
//! - OpenSM matches keywords and flags by *prefix* (`A` means `ALL`) and turns an
//!   unknown port flag into `limited`: only the exact words are accepted.
//! - OpenSM truncates a P_Key above `0xffff` to 16 bits: refused.
//! - OpenSM ignores unknown partition flags with a warning: refused.
//! - A partition without an explicit P_Key, a P_Key whose base is `0x0000`, the same
//!   P_Key base or name twice, and a statement never closed by `;`: refused.
//! - GUIDs are `0x` and 1–16 hex digits (OpenSM's `strtoull(…, 0)` would read a
//!   leading `0` as octal).
//!
//! ## The block devfence owns
//!
//! Between the lines [`BEGIN_MARK`] and [`END_MARK`] devfence renders the default
//! partition (every port limited, the SM's own port full) and one partition per
//! managed P_Key with its members, one per line. Everything outside the block is the
//! operator's and is kept byte for byte; an operator statement that names the
//! default partition or a P_Key devfence manages is refused as a conflict.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fmt::Write as _;
use std::net::Ipv6Addr;

use devfence_model::{Guid, Membership, PKey};

use crate::{MembershipMap, PartitionKey};

/// First line of the block devfence owns.
pub const BEGIN_MARK: &str = "# devfence: begin managed partitions";
/// Last line of the block devfence owns.
pub const END_MARK: &str = "# devfence: end managed partitions";
/// The longest line devfence accepts (OpenSM's line buffer is 4095 bytes).
pub const MAX_LINE: usize = 4000;
/// The largest file devfence reads (checked before parsing).
pub const MAX_FILE: usize = 8 << 20;

/// Why a partitions file was refused: the line, what is wrong, and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}. Hint: {hint}")]
pub struct PartitionsError {
    /// 1-based line number (0: the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub what: String,
    /// What to do.
    pub hint: String,
}

fn err(line: usize, what: impl Into<String>, hint: impl Into<String>) -> PartitionsError {
    PartitionsError {
        line,
        what: what.into(),
        hint: hint.into(),
    }
}

/// A port's membership as written in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortMembership {
    /// `=full`.
    Full,
    /// `=limited` (also OpenSM's default without `defmember`).
    Limited,
    /// `=both` (full *and* limited where `allow_both_pkeys` is set; full otherwise).
    Both,
}

impl PortMembership {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "full" => Some(Self::Full),
            "limited" => Some(Self::Limited),
            "both" => Some(Self::Both),
            _ => None,
        }
    }
    /// The P_Keys a port with this membership of base `base` holds.
    fn pkeys(self, base: u16) -> Vec<PKey> {
        match self {
            Self::Full => vec![PKey(base | 0x8000)],
            Self::Limited => vec![PKey(base)],
            Self::Both => vec![PKey(base | 0x8000), PKey(base)],
        }
    }
}

impl fmt::Display for PortMembership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Limited => "limited",
            Self::Both => "both",
        })
    }
}

/// Who a member entry names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "guid")]
pub enum Who {
    /// Every port.
    All,
    /// Every channel adapter port.
    AllCas,
    /// Every switch port.
    AllSwitches,
    /// Every router port.
    AllRouters,
    /// The SM's own port.
    SelfPort,
    /// Nobody (an explicit empty list).
    None,
    /// One port GUID.
    Guid(Guid),
}

/// One member entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    /// Who.
    pub who: Who,
    /// The membership written with it, if any (else the partition's `defmember`).
    pub membership: Option<PortMembership>,
    /// The line it is on.
    pub line: usize,
}

/// One partition statement.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Statement {
    /// The line the statement starts on.
    pub line: usize,
    /// The partition name.
    pub name: String,
    /// The P_Key as written (membership bit as written).
    pub pkey: u16,
    /// Flags as written (`ipoib`, `mtu=4`, …).
    pub flags: Vec<(String, Option<String>)>,
    /// Members in order.
    pub members: Vec<Member>,
    /// Multicast groups (`mgid=…`) as written.
    pub mgroups: Vec<String>,
    /// True when the statement is inside devfence's block.
    pub managed: bool,
}

impl Statement {
    /// The P_Key base (membership bit clear).
    #[must_use]
    pub fn base(&self) -> u16 {
        self.pkey & 0x7fff
    }
    /// The membership a member without its own flag gets.
    #[must_use]
    pub fn default_membership(&self) -> PortMembership {
        self.flags
            .iter()
            .find(|(f, _)| f == "defmember")
            .and_then(|(_, v)| v.as_deref().and_then(PortMembership::parse))
            .unwrap_or(PortMembership::Limited)
    }
    /// The membership of `m`, resolved against `defmember`.
    #[must_use]
    pub fn membership_of(&self, m: &Member) -> PortMembership {
        m.membership.unwrap_or_else(|| self.default_membership())
    }
}

/// A parsed partitions file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PartitionsFile {
    /// Every statement, in order.
    pub statements: Vec<Statement>,
    /// The lines (1-based, inclusive) of devfence's block, if the file has one.
    pub managed_lines: Option<(usize, usize)>,
}

const FLAGS: [&str; 9] = [
    "ipoib",
    "mtu",
    "rate",
    "scope",
    "Q_Key",
    "TClass",
    "sl",
    "FlowLabel",
    "defmember",
];

/// `strtoul(s, &end, 0)` that must consume everything: `0x` hex, leading `0`
/// octal, decimal.
fn c_number(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(h, 16).ok();
    }
    if s.len() > 1 && s.starts_with('0') {
        return u64::from_str_radix(&s[1..], 8).ok();
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_guid(s: &str, line: usize) -> Result<Guid, PartitionsError> {
    let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"));
    let ok =
        hex.filter(|h| !h.is_empty() && h.len() <= 16 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    let Some(h) = ok else {
        return Err(err(
            line,
            format!("bad PortGUID {:?}", cut(s)),
            "write a port GUID as 0x and up to 16 hex digits (e.g. 0x0002c90300a1b2c3), \
             or one of ALL, ALL_CAS, ALL_SWITCHES, ALL_ROUTERS, SELF, NONE",
        ));
    };
    let g = u64::from_str_radix(h, 16)
        .map_err(|e| err(line, format!("bad PortGUID {s:?}: {e}"), "check the GUID"))?;
    if g == 0 {
        return Err(err(
            line,
            "bad PortGUID 0x0 (OpenSM refuses a zero GUID)",
            "remove the entry",
        ));
    }
    Ok(Guid(g))
}

fn cut(s: &str) -> String {
    s.chars().take(60).collect()
}

fn parse_member(tok: &str, line: usize) -> Result<Member, PartitionsError> {
    let (name, flag) = match tok.split_once('=') {
        Some((n, f)) => (n.trim(), Some(f.trim())),
        None => (tok.trim(), None),
    };
    let who = match name {
        "ALL" => Who::All,
        "ALL_CAS" => Who::AllCas,
        "ALL_SWITCHES" => Who::AllSwitches,
        "ALL_ROUTERS" => Who::AllRouters,
        "SELF" => Who::SelfPort,
        "NONE" => Who::None,
        _ => Who::Guid(parse_guid(name, line)?),
    };
    let membership = match flag {
        None => None,
        Some(f) => Some(PortMembership::parse(f).ok_or_else(|| {
            err(
                line,
                format!("unknown port membership {:?} for {name}", cut(f)),
                "write full, limited or both (OpenSM would silently read anything else as limited)",
            )
        })?),
    };
    Ok(Member {
        who,
        membership,
        line,
    })
}

fn parse_flag(tok: &str, line: usize) -> Result<(String, Option<String>), PartitionsError> {
    let (name, val) = match tok.split_once('=') {
        Some((n, v)) => (n.trim(), Some(v.trim().to_owned())),
        None => (tok.trim(), None),
    };
    if !FLAGS.contains(&name) {
        return Err(err(
            line,
            format!("unknown partition flag {:?}", cut(name)),
            format!(
                "use one of {} (OpenSM ignores unknown flags with only a warning; \
                 devfence does not rewrite a file whose meaning it cannot be sure of)",
                FLAGS.join(", ")
            ),
        ));
    }
    match (name, val.as_deref()) {
        ("ipoib", None) => {}
        ("ipoib", Some(_)) => {
            return Err(err(line, "flag ipoib takes no value", "write just ipoib"));
        }
        ("defmember", Some("full" | "limited" | "both")) => {}
        ("defmember", _) => {
            return Err(err(
                line,
                "flag defmember needs full, limited or both",
                "e.g. defmember=full",
            ));
        }
        (_, Some(v)) if c_number(v).is_some() => {}
        (n, _) => {
            return Err(err(
                line,
                format!("flag {n} needs a numeric value"),
                format!("e.g. {n}=4 (OpenSM skips an invalid value with only a warning)"),
            ));
        }
    }
    Ok((name.to_owned(), val))
}

/// A statement being read (its header is parsed; members may continue).
struct Open {
    stmt: Statement,
    /// The members so far end with a ',' (another member must follow).
    trailing_comma: bool,
}

fn parse_header(h: &str, line: usize) -> Result<Statement, PartitionsError> {
    let mut parts = h.split(',');
    let first = parts.next().unwrap_or("").trim();
    let (name, id) = match first.split_once('=') {
        Some((n, i)) => (n.trim(), Some(i.trim())),
        None => (first, None),
    };
    let (name, id) = match id {
        None if name.starts_with(|c: char| c.is_ascii_digit()) => ("", Some(name)),
        _ => (name, id),
    };
    if name.is_empty() {
        return Err(err(
            line,
            "partition without a name",
            "write Name=0xPKEY : members ; (a name keeps the P_Key readable in logs)",
        ));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err(
            line,
            format!("partition name {:?} has whitespace", cut(name)),
            "use letters, digits, _ . -",
        ));
    }
    let Some(id) = id else {
        return Err(err(
            line,
            format!("partition {name} has no P_Key"),
            "give every partition an explicit P_Key, e.g. Name=0x8001",
        ));
    };
    let pkey = c_number(id).ok_or_else(|| {
        err(
            line,
            format!("bad P_Key {:?} for partition {name}", cut(id)),
            "write the P_Key as 0x and 4 hex digits, e.g. 0x8001",
        )
    })?;
    let pkey = u16::try_from(pkey).map_err(|_| {
        err(
            line,
            format!("P_Key {id} of partition {name} is wider than 16 bits"),
            "OpenSM would silently cut it to 16 bits; write the intended 16-bit P_Key",
        )
    })?;
    if pkey & 0x7fff == 0 {
        return Err(err(
            line,
            format!("P_Key {id} of partition {name} has base 0x0000 (an empty slot)"),
            "pick a P_Key in 0x0001..0x7ffe",
        ));
    }
    let mut flags = Vec::new();
    for f in parts {
        if f.trim().is_empty() {
            return Err(err(line, "empty partition flag", "remove the extra comma"));
        }
        flags.push(parse_flag(f, line)?);
    }
    Ok(Statement {
        line,
        name: name.to_owned(),
        pkey,
        flags,
        members: Vec::new(),
        mgroups: Vec::new(),
        managed: false,
    })
}

/// Reads members from `seg` into `stmt`.
///
/// OpenSM 3.3.23 logs `PARSE ERROR` for an empty member — `0x1,,0x2`, a ',' right
/// before ';' (`0x1, ;`) or a statement whose line ends with ',' closed by a line
/// holding only ';' (found by the differential test against the real OpenSM) —
/// so every ',' must be followed by a member. `trailing` carries "the members so
/// far end with a ','" across segments and lines.
fn parse_members(
    stmt: &mut Statement,
    seg: &str,
    line: usize,
    trailing: &mut bool,
) -> Result<(), PartitionsError> {
    let mut rest = seg;
    let mut first = true;
    loop {
        let (tok, next) = match rest.split_once(',') {
            Some((t, n)) => (t, Some(n)),
            None => (rest, None),
        };
        let t = tok.trim();
        if t.split_once('=').map(|(n, _)| n.trim()) == Some("mgid") || t == "mgid" {
            // mgid consumes the rest of the line (its own flags follow).
            let whole = rest.trim();
            let spec = whole.split_once('=').map_or("", |(_, v)| v);
            let addr = spec.split(',').next().unwrap_or("").trim();
            let ok = addr
                .parse::<Ipv6Addr>()
                .ok()
                .is_some_and(|a| a.octets()[0] == 0xff);
            if !ok {
                return Err(err(
                    line,
                    format!("mgid {:?} is not an IPv6 multicast address", cut(addr)),
                    "write e.g. mgid=ff12:401b::0707 (OpenSM logs PARSE ERROR for it)",
                ));
            }
            for f in spec.split(',').skip(1) {
                let (n, v) = parse_flag(f, line)?;
                if n == "ipoib" || n == "defmember" {
                    return Err(err(
                        line,
                        format!("flag {n} is not a multicast group flag"),
                        "move it to the partition header",
                    ));
                }
                let _ = v;
            }
            stmt.mgroups.push(whole.to_owned());
            *trailing = false;
            return Ok(());
        }
        if t.is_empty() {
            if next.is_some() && (*trailing || !first) {
                return Err(err(
                    line,
                    format!(
                        "an empty member in partition {} (two ',' with nothing between)",
                        stmt.name
                    ),
                    "remove the extra ',' (OpenSM logs PARSE ERROR for an empty member and falls back to everyone-full)",
                ));
            }
            if next.is_some() && first && stmt.members.is_empty() && stmt.mgroups.is_empty() {
                return Err(err(
                    line,
                    format!("partition {}'s member list starts with ','", stmt.name),
                    "remove the ',' after ':'",
                ));
            }
            if next.is_none() && !first {
                *trailing = true;
            }
            if next.is_some() {
                *trailing = true;
            }
        } else {
            stmt.members.push(parse_member(t, line)?);
            *trailing = false;
        }
        first = false;
        match next {
            Some(n) => rest = n,
            None => return Ok(()),
        }
    }
}

/// The name of a character devfence refuses, for the error.
fn char_name(c: char) -> &'static str {
    match c {
        '\r' => "CARRIAGE RETURN: a CRLF (Windows) line ending",
        '\u{a0}' => "NO-BREAK SPACE",
        '\u{feff}' => "BYTE ORDER MARK / ZERO WIDTH NO-BREAK SPACE",
        '\u{200b}' => "ZERO WIDTH SPACE",
        '\u{0b}' => "VERTICAL TAB",
        '\u{0c}' => "FORM FEED",
        '\u{85}' => "NEXT LINE",
        '\u{2028}' => "LINE SEPARATOR",
        '\u{2029}' => "PARAGRAPH SEPARATOR",
        '\u{1680}' | '\u{2000}'..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}' => {
            "a Unicode space"
        }
        c if c.is_control() => "a control character",
        c if c.is_whitespace() => "a Unicode space",
        _ => "a non-ASCII character",
    }
}

/// OpenSM trims only space, tab and newline around a token (`parse_name_token`,
/// `STRIP_HEAD_SPACES` in `osm_prtn_config.c`); any other byte is part of the
/// token: `0x1\r` or `0x1<NBSP>` is a bad PortGUID to OpenSM, which then falls
/// back to everyone-full. Rust's `trim()` strips CR and Unicode spaces, so the
/// parser below would read such a token as the GUID. Refuse them up front:
/// outside a comment only printable ASCII, space and tab; inside a comment
/// (OpenSM stops reading at `#`) anything but a control character.
fn check_chars(raw: &str, line: usize) -> Result<(), PartitionsError> {
    let mut comment = false;
    for (i, c) in raw.chars().enumerate() {
        if c == '#' {
            comment = true;
        }
        let ok = c == ' '
            || c == '\t'
            || if comment {
                !c.is_control()
            } else {
                c.is_ascii_graphic()
            };
        if !ok {
            let hint = if c == '\r' {
                "OpenSM trims only space, tab and newline: it reads the CR as part of the last token. Convert the file to Unix line endings (dos2unix)"
            } else if comment {
                "remove the control character from the comment"
            } else {
                "OpenSM trims only space, tab and newline and reads any other character as part of the token (a GUID followed by it is a bad PortGUID, and OpenSM then makes every port a full member of the default partition): replace it with a plain space or remove it"
            };
            return Err(err(
                line,
                format!(
                    "column {}: U+{:04X} ({}) {}",
                    i + 1,
                    u32::from(c),
                    char_name(c),
                    if comment {
                        "in a comment"
                    } else {
                        "outside a comment"
                    }
                ),
                hint,
            ));
        }
    }
    Ok(())
}

/// Parses a whole partitions file.
///
/// # Errors
/// The first line OpenSM would reject, read differently from how it looks, or
/// only warn about; a file over [`MAX_FILE`]; a misplaced or doubled devfence
/// block; the same P_Key base or name twice.
pub fn parse(text: &str) -> Result<PartitionsFile, PartitionsError> {
    if text.len() > MAX_FILE {
        return Err(err(
            0,
            format!(
                "the file is {} bytes, over the {MAX_FILE}-byte limit",
                text.len()
            ),
            "is this a partitions file?",
        ));
    }
    let mut statements = Vec::new();
    let mut open: Option<Open> = None;
    let mut begin: Option<usize> = None;
    let mut end: Option<usize> = None;
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        if raw.len() > MAX_LINE {
            return Err(err(
                line,
                format!("the line is {} bytes long", raw.len()),
                format!(
                    "OpenSM reads lines in 4 KiB pieces and would split it; keep lines under {MAX_LINE} bytes (one member per line)"
                ),
            ));
        }
        check_chars(raw, line)?;
        let trimmed = raw.trim();
        if trimmed == BEGIN_MARK || trimmed.starts_with(&format!("{BEGIN_MARK} ")) {
            if begin.is_some() {
                return Err(err(
                    line,
                    "a second devfence block begins",
                    "keep one block; remove the duplicate",
                ));
            }
            if open.is_some() {
                return Err(err(
                    line,
                    "devfence's block begins inside an unfinished statement",
                    "close the statement above with ';'",
                ));
            }
            begin = Some(line);
            continue;
        }
        if trimmed == END_MARK || trimmed.starts_with(&format!("{END_MARK} ")) {
            if begin.is_none() || end.is_some() {
                return Err(err(
                    line,
                    "devfence's block ends where none began",
                    "remove the stray end line",
                ));
            }
            if open.is_some() {
                return Err(err(
                    line,
                    "devfence's block ends inside an unfinished statement",
                    "close the statement with ';'",
                ));
            }
            end = Some(line);
            continue;
        }
        let managed = begin.is_some() && end.is_none();
        let body = raw.split('#').next().unwrap_or("");
        let mut rest = body;
        loop {
            let (seg, closed) = match rest.split_once(';') {
                Some((s, r)) => {
                    rest = r;
                    (s, true)
                }
                None => (rest, false),
            };
            match open.as_mut() {
                Some(o) if closed && seg.trim().is_empty() => {
                    return Err(err(
                        line,
                        format!(
                            "partition {} is closed by a ';' with no member before it on its line",
                            o.stmt.name
                        ),
                        "put the ';' right after the last member, on its line (OpenSM 3.3 logs PARSE ERROR \"no partition definition found\" for a lone ';' and falls back to everyone-full)",
                    ));
                }
                Some(o) => parse_members(&mut o.stmt, seg, line, &mut o.trailing_comma)?,
                None => {
                    if seg.trim().is_empty() {
                        if closed {
                            return Err(err(
                                line,
                                "';' with no partition before it",
                                "remove the stray ';'",
                            ));
                        }
                        break;
                    }
                    let Some((h, m)) = seg.split_once(':') else {
                        return Err(err(
                            line,
                            "no partition definition found (no ':')",
                            "write Name=0xPKEY : members ;",
                        ));
                    };
                    let mut stmt = parse_header(h, line)?;
                    stmt.managed = managed;
                    let mut trailing_comma = false;
                    parse_members(&mut stmt, m, line, &mut trailing_comma)?;
                    open = Some(Open {
                        stmt,
                        trailing_comma,
                    });
                }
            }
            if closed {
                if let Some(o) = open.take() {
                    if o.trailing_comma {
                        return Err(err(
                            line,
                            format!("partition {} ends with ',' before ';'", o.stmt.name),
                            "remove the last ',' (OpenSM logs PARSE ERROR for the empty member and falls back to everyone-full)",
                        ));
                    }
                    statements.push(o.stmt);
                }
            } else {
                break;
            }
        }
    }
    if let Some(o) = open {
        return Err(err(
            o.stmt.line,
            format!("partition {} never ends with ';'", o.stmt.name),
            "end the statement with ';'",
        ));
    }
    if begin.is_some() && end.is_none() {
        return Err(err(
            begin.unwrap_or(0),
            "devfence's block never ends",
            format!("add the line {END_MARK:?}"),
        ));
    }
    let mut by_base: BTreeMap<u16, &Statement> = BTreeMap::new();
    let mut by_name: BTreeMap<&str, &Statement> = BTreeMap::new();
    for s in &statements {
        if let Some(prev) = by_base.insert(s.base(), s) {
            let owner = |x: &Statement| {
                if x.managed {
                    "devfence's block"
                } else {
                    "the operator's part"
                }
            };
            return Err(err(
                s.line,
                format!(
                    "P_Key base 0x{:04x} ({}) is also defined on line {} ({}, in {})",
                    s.base(),
                    s.name,
                    prev.line,
                    prev.name,
                    owner(prev)
                ),
                if s.managed || prev.managed {
                    "devfence owns the default partition and the tenants' P_Keys; remove the operator's entry for it or give it another P_Key"
                } else {
                    "define each partition once"
                },
            ));
        }
        if let Some(prev) = by_name.insert(s.name.as_str(), s) {
            return Err(err(
                s.line,
                format!(
                    "partition name {} is also used on line {}",
                    s.name, prev.line
                ),
                "give each partition its own name",
            ));
        }
    }
    check_members(&statements)?;
    Ok(PartitionsFile {
        statements,
        managed_lines: begin.zip(end),
    })
}

/// One GUID twice in one partition with different memberships is refused (the
/// UFM decoder's rule: a reader cannot tell which one the SM applies), and an
/// operator statement naming a GUID devfence's block holds is a conflict.
fn check_members(statements: &[Statement]) -> Result<(), PartitionsError> {
    let mut managed: BTreeMap<Guid, (usize, &str)> = BTreeMap::new();
    for s in statements
        .iter()
        .filter(|s| s.managed && s.base() != PKey::DEFAULT_BASE)
    {
        for m in &s.members {
            if let Who::Guid(g) = m.who {
                managed.entry(g).or_insert((m.line, s.name.as_str()));
            }
        }
    }
    for s in statements {
        let mut seen: BTreeMap<Guid, (PortMembership, usize)> = BTreeMap::new();
        for m in &s.members {
            let Who::Guid(g) = m.who else { continue };
            let mem = s.membership_of(m);
            if let Some((prev, line)) = seen.insert(g, (mem, m.line))
                && prev != mem
            {
                let rank = |x: PortMembership| match x {
                    PortMembership::Full => 0,
                    PortMembership::Limited => 1,
                    PortMembership::Both => 2,
                };
                let (a, b) = if rank(prev) <= rank(mem) {
                    (prev, mem)
                } else {
                    (mem, prev)
                };
                return Err(err(
                    m.line,
                    format!(
                        "GUID {g} is listed in partition {} (P_Key 0x{:04x}) as both {a} and {b} (lines {line} and {}): conflicting memberships",
                        s.name,
                        s.base(),
                        m.line
                    ),
                    "list each port once per partition with the membership you mean (OpenSM applies only one of them; UFM refuses the same)",
                ));
            }
            if !s.managed
                && let Some((line, name)) = managed.get(&g)
            {
                return Err(err(
                    m.line,
                    format!(
                        "the operator's partition {} names GUID {g}, which devfence manages (devfence's block, partition {name}, line {line})",
                        s.name
                    ),
                    "devfence owns the partitions of the ports it hands to tenants; remove the GUID from the operator's line (a port devfence issued must be in its tenant's partitions only)",
                ));
            }
        }
    }
    Ok(())
}

impl PartitionsFile {
    /// Refuses a file that defines no partition at all: OpenSM 3.3 treats it as a
    /// configuration error and falls back to the default configuration, where
    /// every port is a full member of the default partition (seen on ibsim).
    ///
    /// # Errors
    /// No statement.
    pub fn ensure_defines_something(&self) -> Result<(), PartitionsError> {
        if self.statements.is_empty() {
            return Err(err(
                0,
                "the file defines no partition (OpenSM then falls back to the default configuration: every port a full member of the default partition)",
                "keep at least the default partition; devfence's block always renders it",
            ));
        }
        Ok(())
    }

    /// The membership devfence manages, read from its block (the default
    /// partition aside).
    ///
    /// # Errors
    /// A managed statement that devfence would not have written: a keyword member,
    /// `both`, a multicast group.
    pub fn managed(&self) -> Result<MembershipMap, PartitionsError> {
        let mut map = MembershipMap::new();
        for s in self.statements.iter().filter(|s| s.managed) {
            if s.base() == PKey::DEFAULT_BASE {
                continue;
            }
            let key = PartitionKey::new(s.pkey)
                .map_err(|e| err(s.line, e.to_string(), "remove the entry"))?;
            for m in &s.members {
                let Who::Guid(g) = m.who else {
                    return Err(err(
                        m.line,
                        format!("devfence's block names {:?} in {}", m.who, s.name),
                        "devfence writes port GUIDs only; remove the block and let devfence render it again",
                    ));
                };
                let mem = match s.membership_of(m) {
                    PortMembership::Full => Membership::Full,
                    PortMembership::Limited => Membership::Limited,
                    PortMembership::Both => {
                        return Err(err(
                            m.line,
                            "devfence's block holds 'both'",
                            "let devfence render the block again",
                        ));
                    }
                };
                map.insert(g, key, mem)
                    .map_err(|e| err(m.line, e.to_string(), "remove the entry"))?;
            }
        }
        Ok(map)
    }

    /// The P_Key bases the operator's part defines.
    #[must_use]
    pub fn operator_bases(&self) -> BTreeSet<u16> {
        self.statements
            .iter()
            .filter(|s| !s.managed)
            .map(Statement::base)
            .collect()
    }

    /// The P_Keys (with membership bit) the file configures for a channel-adapter
    /// port with `guid`: its explicit entries plus `ALL`/`ALL_CAS` entries.
    #[must_use]
    pub fn configured_for(&self, guid: Guid) -> BTreeSet<PKey> {
        let mut out = BTreeSet::new();
        for s in &self.statements {
            for m in &s.members {
                let hit = match m.who {
                    Who::Guid(g) => g == guid,
                    Who::All | Who::AllCas => true,
                    _ => false,
                };
                if hit {
                    out.extend(s.membership_of(m).pkeys(s.base()));
                }
            }
        }
        out
    }

    /// The P_Keys OpenSM 3.3 (with its default `allow_both_pkeys FALSE`) gives a
    /// channel-adapter port with `guid` from this file: within a partition the
    /// **last** entry that names the port (its GUID, `ALL` or `ALL_CAS`) decides
    /// its membership (`osm_prtn_add_port` moves the port between the full and
    /// the limited table), and `both` means full. [`configured_for`]
    /// (Self::configured_for) is the conservative union of every entry, which the
    /// gates use; this is the exact prediction the differential test holds
    /// OpenSM to.
    ///
    /// OpenSM builds its default partition (`0x7fff`, every port limited, its own
    /// port full) *before* it reads the file, and a `Default=0x7fff` statement adds
    /// to it: every port is at least a limited member of the default partition,
    /// whatever the file says (seen on the real OpenSM by the differential test).
    #[must_use]
    pub fn opensm_pkeys_for(&self, guid: Guid) -> BTreeSet<PKey> {
        let mut out = BTreeSet::new();
        if !self
            .statements
            .iter()
            .any(|s| s.base() == PKey::DEFAULT_BASE && s.members.iter().any(|m| names(m, guid)))
        {
            out.insert(PKey(PKey::DEFAULT_BASE));
        }
        for s in &self.statements {
            let last = s.members.iter().rfind(|m| names(m, guid));
            if let Some(m) = last {
                out.insert(match s.membership_of(m) {
                    PortMembership::Limited => PKey(s.base()),
                    PortMembership::Full | PortMembership::Both => PKey(s.base() | 0x8000),
                });
            }
        }
        out
    }

    /// Every port GUID named explicitly, with the P_Keys it is given.
    #[must_use]
    pub fn explicit_guids(&self) -> BTreeMap<Guid, BTreeSet<PKey>> {
        let mut out: BTreeMap<Guid, BTreeSet<PKey>> = BTreeMap::new();
        for s in &self.statements {
            for m in &s.members {
                if let Who::Guid(g) = m.who {
                    out.entry(g)
                        .or_default()
                        .extend(s.membership_of(m).pkeys(s.base()));
                }
            }
        }
        out
    }
}

/// True when `m` names the channel-adapter port `guid` (its GUID, `ALL`, `ALL_CAS`).
fn names(m: &Member, guid: Guid) -> bool {
    match m.who {
        Who::Guid(g) => g == guid,
        Who::All | Who::AllCas => true,
        _ => false,
    }
}

/// Renders devfence's block for `map`: the default partition (every port limited,
/// the SM's own port full) and one partition per P_Key with members, one member
/// per line, sorted.
#[must_use]
pub fn render_block(map: &MembershipMap) -> String {
    let mut by_key: BTreeMap<PartitionKey, Vec<(Guid, Membership)>> = BTreeMap::new();
    for (g, k, m) in map.iter() {
        by_key.entry(k).or_default().push((g, m));
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{BEGIN_MARK} (written by devfence: edits inside are overwritten)"
    );
    s.push_str("Default=0x7fff, ipoib :\n    ALL=limited,\n    SELF=full ;\n");
    for (k, members) in by_key {
        let _ = writeln!(s, "devfence_{:04x}=0x{:04x} :", k.base(), k.base() | 0x8000);
        let n = members.len();
        for (i, (g, m)) in members.into_iter().enumerate() {
            let mem = match m {
                Membership::Full => "full",
                Membership::Limited => "limited",
            };
            let end = if i + 1 == n { " ;" } else { "," };
            let _ = writeln!(s, "    {g}={mem}{end}");
        }
    }
    let _ = writeln!(s, "{END_MARK}");
    s
}

/// The file with devfence's block replaced by `block` (or appended, if the file
/// has none), the operator's lines kept byte for byte.
#[must_use]
pub fn with_block(text: &str, parsed: &PartitionsFile, block: &str) -> String {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out = String::with_capacity(text.len() + block.len());
    match parsed.managed_lines {
        Some((b, e)) => {
            for l in &lines[..b - 1] {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str(block);
            let tail = &lines[e..];
            let tail_text = tail.join("\n");
            out.push_str(&tail_text);
            if !out.ends_with('\n') {
                out.push('\n');
            }
        }
        None => {
            out.push_str(text);
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(block);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: u16) -> PartitionKey {
        PartitionKey::new(p).expect("valid")
    }

    #[test]
    fn parses_the_recipe_file() {
        let f = parse(
            "# Default partition\nDefault=0x7fff, ipoib : ALL=limited, 0x0002c90000002001=full ;\n\
             tenantA=0x8001 : 0x0002c90000002003=full ;\ntenantB=0x8002 : 0x0002c90000002005=full ;\n",
        )
        .expect("parses");
        assert_eq!(f.statements.len(), 3);
        assert_eq!(f.statements[1].pkey, 0x8001);
        assert_eq!(
            f.configured_for(Guid(0x2c90000002003)),
            BTreeSet::from([PKey(0x7fff), PKey(0x8001)])
        );
        assert!(f.managed_lines.is_none());
    }

    #[test]
    fn refuses_what_opensm_would_reject_or_misread() {
        for (text, needle) in [
            ("A=0x8001 : 0xZZZZ=full ;", "bad PortGUID"),
            ("A=0x8001 : 0002c90000002003 ;", "bad PortGUID"),
            ("A=0x8001 : 0x0 ;", "zero GUID"),
            ("A=0x8001 : AL=full ;", "bad PortGUID"),
            ("A=0x8001 : 0x1=fu ;", "unknown port membership"),
            ("A=0x18001 : 0x1 ;", "wider than 16 bits"),
            ("A : 0x1 ;", "no P_Key"),
            ("A=0x8000 : 0x1 ;", "base 0x0000"),
            ("A=0x8001, color=red : 0x1 ;", "unknown partition flag"),
            ("A=0x8001, mtu=big : 0x1 ;", "numeric value"),
            ("A=0x8001 0x1 ;", "no partition definition"),
            ("A=0x8001 : 0x1", "never ends"),
            ("A=0x8001 : 0x1 ;\nB=0x0001 : 0x2 ;", "also defined"),
            ("A=0x8001 : 0x1 ;\nA=0x8002 : 0x2 ;", "name A is also used"),
            ("A=0x8001 : mgid=fe80::1 ;", "not an IPv6 multicast"),
            (";", "stray"),
            // Found by the differential test against the real OpenSM 3.3.23.
            ("A=0x8001 : 0x1,,0x2 ;", "empty member"),
            ("A=0x8001 : 0x1, ;", "ends with ','"),
            ("A=0x8001 :\n 0x1,\n ;", "no member before it"),
            ("A=0x8001 :\n 0x1\n ;", "no member before it"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.to_string().contains(needle), "{text}: {e}");
            assert!(e.to_string().contains("Hint:"), "{e}");
        }
        let long = format!("A=0x8001 : {} ;", vec!["0x1=full"; 600].join(","));
        assert!(parse(&long).expect_err("long").what.contains("bytes long"));
    }

    /// issue 17 item 5: OpenSM trims space, tab and newline only; a CR (a CRLF
    /// line), a no-break space or any other Unicode space is part of the token to
    /// OpenSM (a GUID `0x1\u{a0}` is a bad PortGUID, the whole file falls back to
    /// everyone-full), so devfence refuses it, naming line and column.
    #[test]
    fn refuses_whitespace_opensm_does_not_trim() {
        for (text, line, col) in [
            ("A=0x8001 : 0x1=full ;\r\n", 1, 22),
            ("A=0x8001 :\n 0x1\u{a0}=full ;\n", 2, 5),
            ("A=0x8001 : 0x1=full\u{2003};\n", 1, 20),
            ("A=0x8001\u{3000}: 0x1 ;", 1, 9),
            ("\u{feff}A=0x8001 : 0x1 ;", 1, 1),
            ("A=0x8001 : 0x1\u{0b}=full ;", 1, 15),
            ("A=0x8001 : 0x1 ; # comment\r\n", 1, 27),
        ] {
            let e = parse(text).expect_err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(
                e.to_string().contains(&format!("column {col}")),
                "{text:?}: {e}"
            );
            assert!(e.to_string().contains("U+"), "{text:?}: {e}");
            assert!(e.to_string().contains("Hint:"), "{e}");
        }
        // Unicode in a comment is the operator's business: OpenSM stops at '#'.
        parse("A=0x8001 : 0x1 ; # caf\u{e9} \u{a0} ok\n\t B=0x8002 :\t0x3 ;\n").expect("ok");
    }

    #[test]
    fn statements_span_lines_and_share_lines() {
        let f = parse("A=0x8001 :\n  0x1=full,\n  0x2 ; B=0x8002 : ALL ;\n").expect("ok");
        assert_eq!(f.statements.len(), 2);
        assert_eq!(f.statements[0].members.len(), 2);
        assert_eq!(f.statements[0].members[1].line, 3);
        assert_eq!(
            f.statements[0].membership_of(&f.statements[0].members[1]),
            PortMembership::Limited
        );
        let f = parse("A=0x8001, defmember=full : 0x1 ;").expect("ok");
        assert_eq!(f.configured_for(Guid(1)), BTreeSet::from([PKey(0x8001)]));
    }

    #[test]
    fn block_round_trips_and_keeps_the_operator_part() {
        let operator = "# operator\nstorage=0x8100, ipoib : 0x0002c90000009001=full ; # keep me\n";
        let mut map = MembershipMap::new();
        map.insert(Guid(0x0002_c903_00f0_0001), key(0x8001), Membership::Full)
            .expect("ok");
        map.insert(
            Guid(0x0002_c903_00f0_0002),
            key(0x8001),
            Membership::Limited,
        )
        .expect("ok");
        map.insert(Guid(0x0002_c903_00f0_0003), key(0x8002), Membership::Full)
            .expect("ok");
        let p = parse(operator).expect("ok");
        let text = with_block(operator, &p, &render_block(&map));
        assert!(text.starts_with(operator), "{text}");
        let back = parse(&text).expect("rendered text parses");
        assert_eq!(back.managed().expect("managed"), map);
        assert_eq!(back.operator_bases(), BTreeSet::from([0x0100]));
        // Replace the block: the operator part stays byte for byte, also after it.
        let with_tail = format!("{text}# tail comment\n");
        let p2 = parse(&with_tail).expect("ok");
        let text2 = with_block(&with_tail, &p2, &render_block(&MembershipMap::new()));
        assert!(text2.starts_with(operator));
        assert!(text2.ends_with("# tail comment\n"), "{text2}");
        assert!(parse(&text2).expect("ok").managed().expect("ok").is_empty());
        // The default partition: every port limited, the SM full.
        let d = &back
            .statements
            .iter()
            .find(|s| s.base() == 0x7fff)
            .expect("default");
        assert!(d.managed);
        assert_eq!(
            back.configured_for(Guid(0x0002_c903_00f0_0003)),
            BTreeSet::from([PKey(0x7fff), PKey(0x8002)])
        );
    }

    #[test]
    fn operator_entry_for_a_managed_pkey_is_a_conflict() {
        let mut map = MembershipMap::new();
        map.insert(Guid(5), key(0x8001), Membership::Full)
            .expect("ok");
        let operator = "mine=0x8001 : 0x9=full ;\n";
        let p = parse(operator).expect("ok");
        let e = parse(&with_block(operator, &p, &render_block(&map))).expect_err("conflict");
        assert!(e.to_string().contains("devfence owns"), "{e}");
        let operator = "Default=0x7fff : ALL=full ;\n";
        let p = parse(operator).expect("ok");
        let e = parse(&with_block(operator, &p, &render_block(&map))).expect_err("conflict");
        assert!(e.to_string().contains("0x7fff"), "{e}");
    }

    /// issue 18 item 7: an operator statement naming a GUID devfence's block
    /// holds is a conflict (docs/fabric-opensm.md): refused, naming both lines.
    #[test]
    fn operator_line_naming_a_managed_guid_is_a_conflict() {
        let mut map = MembershipMap::new();
        map.insert(Guid(0x0002_c903_00f0_0001), key(0x8002), Membership::Full)
            .expect("ok");
        let operator = "mine=0x8001 : 0x0002c90300f00001=full ;\n";
        let p = parse(operator).expect("ok alone");
        let e = parse(&with_block(operator, &p, &render_block(&map))).expect_err("conflict");
        let s = e.to_string();
        assert_eq!(e.line, 1, "{s}");
        assert!(
            s.contains("0x0002c90300f00001") && s.contains("devfence"),
            "{s}"
        );
        assert!(s.contains("line 7"), "names devfence's line: {s}");
        // The same GUID in devfence's block only, or another GUID in the
        // operator's part: fine.
        let operator = "mine=0x8001 : 0x0002c90300f00003=full ;\n";
        let p = parse(operator).expect("ok");
        parse(&with_block(operator, &p, &render_block(&map))).expect("no conflict");
    }

    /// issue 18 item 7: one GUID twice in one partition with different
    /// memberships is refused, as the UFM decoder refuses it (one rule for both);
    /// the same membership twice merges.
    #[test]
    fn one_guid_full_and_limited_in_one_partition_is_refused() {
        for text in [
            "A=0x8001 : 0x1=full, 0x1=limited ;",
            "A=0x8001 :\n 0x1=full,\n 0x1 ;",
            "A=0x8001, defmember=full : 0x1, 0x1=both ;",
        ] {
            let e = parse(text).expect_err(text);
            let s = e.to_string();
            assert!(
                s.contains("0x0000000000000001") && s.contains("both full and limited")
                    || s.contains("memberships"),
                "{text}: {s}"
            );
            assert!(s.contains("Hint:"), "{s}");
        }
        let f = parse("A=0x8001 : 0x1=full, 0x1=full ;").expect("same membership merges");
        assert_eq!(f.configured_for(Guid(1)), BTreeSet::from([PKey(0x8001)]));
    }

    #[test]
    fn big_batches_render_one_member_per_line() {
        let mut map = MembershipMap::new();
        for i in 1..=500u64 {
            map.insert(
                Guid(0x0002_c903_00f0_0000 + i),
                key(0x8001),
                Membership::Full,
            )
            .expect("ok");
        }
        let text = render_block(&map);
        assert!(text.lines().all(|l| l.len() < 100));
        assert_eq!(parse(&text).expect("ok").managed().expect("ok"), map);
    }
}
