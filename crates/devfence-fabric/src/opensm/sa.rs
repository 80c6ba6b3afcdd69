//! The SA client: GUID → LID by NodeRecord, then the port's P_Key table by
//! PKeyTableRecord, as MADs through libibumad.
//!
//! The SA's PKeyTableRecord is filled from the port's own answer to the SM's
//! Set(P_KeyTable), so it is what the port *acknowledged* — the view the three
//! handover questions need. Tables are returned as sets: OpenSM keeps old slots
//! (`keep_pkey_indexes`), so positions mean nothing.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devfence_model::{Guid, PKey};

use super::mad::{
    self, NODE_RECORD_LEN, NodeRecord, PKEY_RECORD_LEN, PKeyBlock, SA_CLASS, SA_CLASS_VERSION,
    SMINFO_RECORD_LEN, SaReply, SaRequest, SmInfoRecord,
};
use super::umad::{LIBRARY, Umad};
use crate::{FabricError, PortReader, Programmed, SmState};

const BACKEND: &str = "opensm";

/// How the SA client reaches the SA.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaConfig {
    /// The local CA to send from (`None`: the first one).
    pub ca: Option<String>,
    /// The port of that CA (0: the first active one).
    pub port: i32,
    /// The SM_Key: PKeyTableRecords are answered only to a trusted requester
    /// (OpenSM's default `sm_key` is 0x1).
    #[serde(with = "hex_u64")]
    pub sm_key: u64,
    /// Time for one SA answer, in milliseconds (libibumad retries within it).
    pub timeout_ms: u32,
    /// Retries libibumad makes per query.
    pub retries: u32,
}

impl Default for SaConfig {
    fn default() -> Self {
        Self {
            ca: None,
            port: 0,
            sm_key: 1,
            timeout_ms: 200,
            retries: 3,
        }
    }
}

mod hex_u64 {
    use serde::Deserialize as _;
    pub(super) fn serialize<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("0x{v:x}"))
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum N {
            Int(u64),
            Text(String),
        }
        match N::deserialize(d)? {
            N::Int(v) => Ok(v),
            N::Text(t) => {
                let h = t.trim().strip_prefix("0x").unwrap_or(t.trim());
                u64::from_str_radix(h, 16).map_err(|e| {
                    serde::de::Error::custom(format!("sm_key {t:?}: {e} (write it as 0x1)"))
                })
            }
        }
    }
}

struct Open {
    fd: i32,
    agent: i32,
    sm_lid: u32,
    sm_sl: u32,
    /// The local port's GUID (the SM on this host binds to it).
    port_guid: u64,
}

/// An SA client over libibumad. Opened lazily; one query at a time.
pub struct SaClient {
    cfg: SaConfig,
    umad: Mutex<Option<(Umad, Option<Open>)>>,
    tid: Mutex<u32>,
}

impl std::fmt::Debug for SaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaClient")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn unreachable(detail: impl Into<String>, hint: &str) -> FabricError {
    FabricError::Unreachable {
        backend: BACKEND.into(),
        detail: detail.into(),
        hint: hint.into(),
    }
}
fn malformed(detail: impl Into<String>) -> FabricError {
    FabricError::Malformed {
        backend: BACKEND.into(),
        detail: detail.into(),
        hint: "the SA answered something devfence cannot read; the gate stays closed — check the SM host and `saquery` by hand".into(),
    }
}

impl SaClient {
    /// A client; nothing is opened until the first query.
    #[must_use]
    pub fn new(cfg: SaConfig) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self {
            cfg,
            umad: Mutex::new(None),
            tid: Mutex::new(seed ^ std::process::id().rotate_left(16)),
        }
    }

    fn next_tid(&self) -> u32 {
        let mut t = self
            .tid
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *t = t.wrapping_add(1);
        *t
    }

    /// Sends one request and returns its decoded reply.
    ///
    /// # Errors
    /// libibumad missing, no port, no SM, a timeout, a reply that does not decode.
    pub fn query(&self, req: &SaRequest, record_len: usize) -> Result<SaReply, FabricError> {
        let mut g = self
            .umad
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if g.is_none() {
            let u = Umad::load().map_err(|e| {
                unreachable(e, &format!("install rdma-core's {LIBRARY} (Debian: libibumad3) on the host that verifies at the SA"))
            })?;
            *g = Some((u, None));
        }
        let Some((umad, open)) = g.as_mut() else {
            return Err(unreachable("libibumad is not loaded", "retry"));
        };
        if open.is_none() {
            let ca = self.cfg.ca.as_deref();
            let info = umad.port(ca, self.cfg.port).map_err(|e| {
                unreachable(e, "no InfiniBand port is visible (check `ibstat`; set [fabric.opensm.sa] ca/port)")
            })?;
            if info.sm_lid == 0 {
                return Err(unreachable(
                    format!(
                        "port {}/{} knows no SM (SM LID 0, port state {})",
                        info.ca_name, info.portnum, info.state
                    ),
                    "start OpenSM, or wait until the port is active",
                ));
            }
            let (fd, agent) = umad
                .open(ca, self.cfg.port, SA_CLASS, SA_CLASS_VERSION)
                .map_err(|e| {
                    unreachable(e, "run devfence as root (it opens /dev/infiniband/umad*)")
                })?;
            *open = Some(Open {
                fd,
                agent,
                sm_lid: info.sm_lid,
                sm_sl: info.sm_sl,
                port_guid: info.port_guid,
            });
        }
        let Some(o) = open.as_ref() else {
            return Err(unreachable("the port is not open", "retry"));
        };
        let tid = self.next_tid();
        let mut req = req.clone();
        req.tid = u64::from(tid);
        let mad = req.encode();
        let timeout = i32::try_from(self.cfg.timeout_ms).unwrap_or(i32::MAX);
        let retries = i32::try_from(self.cfg.retries).unwrap_or(0);
        umad.send(o.fd, o.agent, &mad, o.sm_lid, o.sm_sl, timeout, retries)
            .map_err(|e| unreachable(e, "check the port and the SM"))?;
        let budget = Duration::from_millis(
            u64::from(self.cfg.timeout_ms) * (u64::from(self.cfg.retries) + 1) + 100,
        );
        let deadline = Instant::now() + budget;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let (fd, agent) = (o.fd, o.agent);
                umad.close(fd, agent);
                *open = None; // the SM may have moved: look it up again next time
                return Err(FabricError::Timeout {
                    backend: BACKEND.into(),
                    op: "SA query".into(),
                    after: budget,
                    hint: "the SA did not answer: is OpenSM running and master (`sminfo`)?".into(),
                });
            }
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            let got = umad
                .recv(o.fd, 64 * mad::MAD_LEN, ms)
                .map_err(|e| unreachable(e, "check the port"))?;
            let Some((status, bytes)) = got else { continue };
            if status != 0 {
                // The send timed out inside the kernel (status ETIMEDOUT).
                let (fd, agent) = (o.fd, o.agent);
                umad.close(fd, agent);
                *open = None;
                return Err(FabricError::Timeout {
                    backend: BACKEND.into(),
                    op: "SA query".into(),
                    after: budget,
                    hint: format!(
                        "the SA did not answer (umad status {status}): is OpenSM running and master?"
                    ),
                });
            }
            let reply = SaReply::decode(&bytes, record_len).map_err(|e| malformed(e.0))?;
            if reply.tid & 0xffff_ffff != u64::from(tid) {
                continue; // a late answer to an earlier query
            }
            if reply.attr != req.attr {
                return Err(malformed(format!(
                    "asked for attribute 0x{:04x}, got 0x{:04x}",
                    req.attr, reply.attr
                )));
            }
            return Ok(reply);
        }
    }

    /// The local port's GUID (after a first query opened the port).
    fn local_port_guid(&self) -> Option<Guid> {
        let g = self
            .umad
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.as_ref()
            .and_then(|(_, o)| o.as_ref())
            .map(|o| Guid(o.port_guid))
    }

    /// A keyed query timed out: if the SA answers an untrusted one, it is alive
    /// and drops devfence's keyed MADs — OpenSM does that for a non-zero SM_Key
    /// that is not its own (ERR 1A04 in its log), silently.
    fn explain_timeout(&self, e: FabricError) -> FabricError {
        if !matches!(e, FabricError::Timeout { .. }) || self.cfg.sm_key == 0 {
            return e;
        }
        match self.query(&SaRequest::sm_info_records(0), SMINFO_RECORD_LEN) {
            Ok(_) => FabricError::Refused {
                backend: BACKEND.into(),
                detail: format!(
                    "the SA answers untrusted queries but drops devfence's queries with SM_Key 0x{:x}",
                    self.cfg.sm_key
                ),
                hint: "[fabric.sa] sm_key is not OpenSM's sm_key (OpenSM logs \"ERR 1A04: Non-Zero MAD SM_Key\" and ignores the MAD): set it to the sm_key in opensm.conf".into(),
            },
            Err(_) => e,
        }
    }

    /// The NodeRecord of the port with `guid`, if the SA knows it.
    ///
    /// # Errors
    /// As [`query`](Self::query); two ports claiming one GUID; a record for
    /// another GUID.
    pub fn node_of(&self, guid: Guid) -> Result<Option<NodeRecord>, FabricError> {
        let r = self.query(
            &SaRequest::node_by_port_guid(0, self.cfg.sm_key, guid),
            NODE_RECORD_LEN,
        )?;
        if r.status >> 8 == 3 {
            return Ok(None);
        }
        if r.status != 0 {
            return Err(refused(r.status, "NodeRecord"));
        }
        let recs: Vec<NodeRecord> = r
            .records
            .iter()
            .map(|b| NodeRecord::decode(b))
            .collect::<Result<_, _>>()
            .map_err(|e| malformed(e.0))?;
        the_port(guid, &recs)
    }

    /// The P_Key table of `lid`/`port` as a set, over `cap` slots.
    ///
    /// # Errors
    /// As [`query`](Self::query); an untrusted SM_Key.
    pub fn pkeys_of(&self, lid: u16, port: u8, cap: u16) -> Result<BTreeSet<PKey>, FabricError> {
        let blocks = cap.div_ceil(32).clamp(1, 64);
        let mut out = BTreeSet::new();
        for block in 0..blocks {
            let r = self.query(
                &SaRequest::pkey_table(0, self.cfg.sm_key, lid, port, block),
                PKEY_RECORD_LEN,
            )?;
            if r.status >> 8 == 3 {
                if block > 0 {
                    break; // fewer blocks than the capacity suggests
                }
                // The SA knows the port but holds no table for it (a port just
                // discovered, before the SM set its P_Keys): what the port has is
                // unknown — not empty. Fail closed, and let the gate read again.
                return Err(FabricError::Unreachable {
                    backend: BACKEND.into(),
                    detail: format!("the SA holds no P_Key table for LID {lid} port {port} yet"),
                    hint:
                        "the port was just discovered; the SM sets its table in the sweep under way"
                            .into(),
                });
            }
            if r.status != 0 {
                return Err(refused(r.status, "PKeyTableRecord"));
            }
            let Some(rec) = r.records.first() else {
                return Err(malformed("a PKeyTableRecord reply without a record"));
            };
            let b = PKeyBlock::decode(rec).map_err(|e| malformed(e.0))?;
            // OpenSM 3.3 writes the block number of its reply in host byte order
            // (a long-standing quirk); either order names the block asked for.
            if b.lid != lid || b.port != port || (b.block != block && b.block != block.swap_bytes())
            {
                return Err(malformed(format!(
                    "asked for LID {lid} port {port} block {block}, got LID {} port {} block {}",
                    b.lid, b.port, b.block
                )));
            }
            out.extend(b.pkeys());
        }
        Ok(out)
    }
}

fn refused(status: u16, what: &str) -> FabricError {
    let hint = if status >> 8 == 2 {
        "the SA refuses P_Key tables to an untrusted requester: set [fabric.opensm.sa] sm_key to OpenSM's sm_key (default 0x1)"
    } else {
        "check the SM (`sminfo`, the OpenSM log)"
    };
    FabricError::Refused {
        backend: BACKEND.into(),
        detail: format!("{what} query: {}", mad::status_text(status)),
        hint: hint.into(),
    }
}

/// A simulated host's VF P_Key tables as the SA reports them, for a simulated
/// kernel's port-table source (the kernel asks once per slot).
///
/// With `changes` — OpenSM's log — one SA read serves every slot until the log
/// grows: a port's table only changes when OpenSM works, and OpenSM logs whenever
/// it works. Without it every call reads the SA.
pub fn port_tables(
    reader: std::sync::Arc<dyn PortReader>,
    changes: Option<std::path::PathBuf>,
) -> impl Fn(Guid) -> Option<Vec<u16>> + Send + Sync + 'static {
    type Memo = std::collections::HashMap<Guid, (u64, Option<Vec<u16>>)>;
    let memo: Mutex<Memo> = Mutex::new(Memo::new());
    move |g: Guid| {
        let mark = changes
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len());
        let mut m = memo
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let (Some(len), Some((at, t))) = (mark, m.get(&g))
            && *at == len
        {
            return t.clone();
        }
        let t = match reader.read_port(g) {
            Ok(Programmed::Present { pkeys, .. }) => Some(pkeys.iter().map(|p| p.0).collect()),
            _ => None,
        };
        if let Some(len) = mark {
            m.insert(g, (len, t.clone()));
        }
        t
    }
}

impl PortReader for SaClient {
    fn read_port(&self, guid: Guid) -> Result<Programmed, FabricError> {
        self.read_port_keyed(guid)
            .map_err(|e| self.explain_timeout(e))
    }

    fn local_sm_state(&self) -> Result<Option<SmState>, FabricError> {
        self.sm_state()
    }
}

impl SaClient {
    fn read_port_keyed(&self, guid: Guid) -> Result<Programmed, FabricError> {
        let Some(n) = self.node_of(guid)? else {
            return Ok(Programmed::Absent);
        };
        // A CA's record names its own port; a switch's port 0 holds its table.
        let port = if n.node_type == 2 { 0 } else { n.local_port };
        let pkeys = self.pkeys_of(n.lid, port, n.partition_cap)?;
        // The table was read by LID: make sure the LID still belongs to the GUID
        // (the SM may have moved it between the two queries).
        match self.node_of(guid)? {
            Some(again) if again.lid == n.lid && again.local_port == n.local_port => {}
            again => {
                return Err(FabricError::Unreachable {
                    backend: BACKEND.into(),
                    detail: format!(
                        "port GUID {guid} moved while its table was read (LID {} → {:?})",
                        n.lid,
                        again.map(|a| a.lid)
                    ),
                    hint: "the SM is re-assigning LIDs; the gate reads again".into(),
                });
            }
        }
        Ok(Programmed::Present {
            lid: Some(n.lid),
            pkeys,
        })
    }

    /// The state of the SM on this host's port, from the SA's SMInfoRecords.
    ///
    /// # Errors
    /// As [`query`](Self::query); no SM on this host's port.
    pub fn sm_state(&self) -> Result<Option<SmState>, FabricError> {
        let r = self.query(&SaRequest::sm_info_records(0), SMINFO_RECORD_LEN)?;
        if r.status != 0 && r.status >> 8 != 3 {
            return Err(refused(r.status, "SMInfoRecord"));
        }
        let recs: Vec<SmInfoRecord> = r
            .records
            .iter()
            .map(|b| SmInfoRecord::decode(b))
            .collect::<Result<_, _>>()
            .map_err(|e| malformed(e.0))?;
        let Some(me) = self.local_port_guid() else {
            return Err(unreachable("the local port is not open", "retry"));
        };
        match recs.iter().find(|r| r.guid == me) {
            Some(r) => Ok(Some(match r.state {
                3 => SmState::Master,
                2 => SmState::Standby,
                1 => SmState::Discovering,
                0 => SmState::NotActive,
                _ => SmState::Unknown,
            })),
            None => Err(FabricError::Refused {
                backend: BACKEND.into(),
                detail: format!(
                    "the SA lists no SM on this host's port {me} (SMs: {:?})",
                    recs.iter().map(|r| (r.guid.to_string(), r.state)).collect::<Vec<_>>()
                ),
                hint: "the OpenSM devfence drives must run on this host's port ([fabric.sa] ca/port select it)".into(),
            }),
        }
    }
}

impl Drop for SaClient {
    fn drop(&mut self) {
        let g = self
            .umad
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((u, Some(o))) = g.as_ref() {
            u.close(o.fd, o.agent);
        }
    }
}

/// The one port with `guid` among the NodeRecords the SA returned for it.
///
/// # Errors
/// Records of other ports (malformed), a record with LID 0 (unknown: the SA knows
/// the port but has not given it a LID — never "absent", which would answer "in
/// none of the old tenant's partitions"), two ports claiming the GUID.
fn the_port(guid: Guid, recs: &[NodeRecord]) -> Result<Option<NodeRecord>, FabricError> {
    let mine: Vec<&NodeRecord> = recs.iter().filter(|n| n.port_guid == guid).collect();
    if mine.len() != recs.len() {
        return Err(malformed(format!(
            "asked for the port with GUID {guid}, the SA answered records of other ports"
        )));
    }
    match mine.as_slice() {
        [] => Ok(None),
        [one] if one.lid == 0 => Err(FabricError::Unreachable {
            backend: BACKEND.into(),
            detail: format!("the SA knows port GUID {guid} but holds LID 0 for it"),
            hint: "the port is being (re)configured; the gate reads again after the SM's sweep"
                .into(),
        }),
        [one] => Ok(Some(**one)),
        many => Err(FabricError::Refused {
            backend: BACKEND.into(),
            detail: format!(
                "{} ports claim GUID {guid} (LIDs {:?})",
                many.len(),
                many.iter().map(|n| n.lid).collect::<Vec<_>>()
            ),
            hint: "a duplicated port GUID breaks partition isolation: find the second port (`ibnetdiscover`) before handing anything over".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(guid: u64, lid: u16) -> NodeRecord {
        NodeRecord {
            lid,
            node_type: 1,
            node_guid: Guid(guid - 1),
            port_guid: Guid(guid),
            partition_cap: 64,
            local_port: 1,
        }
    }

    /// issue 17 item 8: a NodeRecord with LID 0 is unknown, never absent.
    #[test]
    fn a_port_with_lid_0_is_unknown_not_absent() {
        let g = Guid(0x0002_c903_00f0_0003);
        assert_eq!(the_port(g, &[]).expect("absent"), None);
        assert_eq!(
            the_port(g, &[rec(g.0, 7)]).expect("one").map(|r| r.lid),
            Some(7)
        );
        let e = the_port(g, &[rec(g.0, 0)]).expect_err("LID 0");
        assert!(matches!(e, FabricError::Unreachable { .. }), "{e}");
        assert!(e.is_retryable(), "{e}");
        let e = the_port(g, &[rec(g.0, 7), rec(g.0, 9)]).expect_err("two ports");
        assert!(e.to_string().contains("2 ports claim"), "{e}");
        let e = the_port(g, &[rec(g.0 + 2, 7)]).expect_err("another port");
        assert!(matches!(e, FabricError::Malformed { .. }), "{e}");
    }
}
