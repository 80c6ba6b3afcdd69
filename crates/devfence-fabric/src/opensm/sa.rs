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

#[derive(Clone, Copy)]
struct Open {
    fd: i32,
    agent: i32,
    sm_lid: u32,
    sm_sl: u32,
    /// The local port's GUID (the SM on this host binds to it).
    port_guid: u64,
}

/// The most SA queries [`SaClient::query_many`] keeps outstanding at once.
pub const PIPELINE: usize = 16;

/// An SA client over libibumad. Opened lazily; one call at a time, each
/// call's queries pipelined.
pub struct SaClient {
    cfg: SaConfig,
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

/// The process's one umad port for the SA: libibumad (loaded and initialised
/// once), and the port opened with its SA agent, with the CA and port number
/// it was opened for. Every [`SaClient`] of the process exchanges through it,
/// one exchange at a time, its queries matched by transaction ids that are
/// unique in the process ([`next_tid`]).
///
/// One port per process, not one per client: the agent builds a client per
/// request beside its re-verification's, and clients with ports of their own
/// on several threads at once read each other's replies and crashed the
/// process in libc under ibsim's umad shim (seen in CI; reproduced by
/// `opensm_fabric::sa_clients_on_several_threads_at_once_all_answer`). One
/// exchange at a time costs only concurrency the SA does not offer either: a
/// client pipelines its own queries.
struct Shared {
    open: Option<((Option<String>, i32), Open)>,
}

static SHARED: Mutex<Shared> = Mutex::new(Shared { open: None });

/// libibumad, loaded once per process (under [`SHARED`]). A failed load is not
/// kept: the next query tries again (rdma-core installed meanwhile).
static UMAD: std::sync::OnceLock<Umad> = std::sync::OnceLock::new();

/// The process's transaction ids: one counter, seeded from the clock and the
/// pid, so two clients never send the same id on the shared port.
fn next_tid() -> u32 {
    static TID: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    TID.get_or_init(|| {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        std::sync::atomic::AtomicU32::new(seed ^ std::process::id().rotate_left(16))
    })
    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    .wrapping_add(1)
}

fn shared_umad() -> Result<&'static Umad, String> {
    if let Some(u) = UMAD.get() {
        return Ok(u);
    }
    let u = Umad::load()?;
    Ok(UMAD.get_or_init(|| u))
}

impl SaClient {
    /// A client; nothing is opened until the first query.
    #[must_use]
    pub fn new(cfg: SaConfig) -> Self {
        Self { cfg }
    }

    /// Sends one request and returns its decoded reply.
    ///
    /// # Errors
    /// libibumad missing, no port, no SM, a timeout, a reply that does not decode.
    pub fn query(&self, req: &SaRequest, record_len: usize) -> Result<SaReply, FabricError> {
        let mut r = self.query_many(std::slice::from_ref(req), record_len)?;
        r.pop()
            .ok_or_else(|| malformed("no reply to the one query sent"))
    }

    /// Sends `reqs` pipelined — up to [`PIPELINE`] outstanding on the one umad
    /// agent, each with its own transaction id — and returns their replies in
    /// the order asked. The SA answers MADs concurrently, so N queries cost
    /// about one round trip per [`PIPELINE`] instead of N.
    ///
    /// Every reply is matched to its request by transaction id and checked to
    /// be of the attribute asked; a late answer to an earlier call is dropped.
    /// The time budget of one query applies between two replies: a batch fails
    /// (whole — its caller reads again) when the SA stops answering.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub fn query_many(
        &self,
        reqs: &[SaRequest],
        record_len: usize,
    ) -> Result<Vec<SaReply>, FabricError> {
        // One exchange at a time through the process's one port (SHARED).
        let mut g = SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let umad = shared_umad().map_err(|e| {
            unreachable(e, &format!("install rdma-core's {LIBRARY} (Debian: libibumad3) on the host that verifies at the SA"))
        })?;
        let want = (self.cfg.ca.clone(), self.cfg.port);
        let open = &mut g.open;
        if let Some((k, o)) = open.as_ref()
            && *k != want
        {
            // Another client asked through another port: this one's is opened.
            umad.close(o.fd, o.agent);
            *open = None;
        }
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
            *open = Some((
                want,
                Open {
                    fd,
                    agent,
                    sm_lid: info.sm_lid,
                    sm_sl: info.sm_sl,
                    port_guid: info.port_guid,
                },
            ));
        }
        let Some((_, o)) = open.as_ref() else {
            return Err(unreachable("the port is not open", "retry"));
        };
        let o = *o;
        let timeout = i32::try_from(self.cfg.timeout_ms).unwrap_or(i32::MAX);
        let retries = i32::try_from(self.cfg.retries).unwrap_or(0);
        let budget = Duration::from_millis(
            u64::from(self.cfg.timeout_ms) * (u64::from(self.cfg.retries) + 1) + 100,
        );
        let mut replies: Vec<Option<SaReply>> = vec![None; reqs.len()];
        let mut asked: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
        let (mut next, mut pending, mut done) = (0usize, 0usize, 0usize);
        let mut deadline = Instant::now() + budget;
        while done < reqs.len() {
            while next < reqs.len() && pending < PIPELINE {
                let tid = next_tid();
                let mut req = reqs[next].clone();
                req.tid = u64::from(tid);
                umad.send(
                    o.fd,
                    o.agent,
                    &req.encode(),
                    o.sm_lid,
                    o.sm_sl,
                    timeout,
                    retries,
                )
                .map_err(|e| unreachable(e, "check the port and the SM"))?;
                asked.insert(tid, next);
                next += 1;
                pending += 1;
            }
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
                // A send timed out inside the kernel (status ETIMEDOUT).
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
            // The transaction id (the low half of MAD header bytes 8..16,
            // which is all devfence sets) before the body: a
            // late answer to an earlier query, of another attribute, is
            // dropped, not taken for a malformed answer to this one.
            let Some(tid) = bytes
                .get(12..16)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
            else {
                return Err(malformed(format!("a MAD of {} bytes", bytes.len())));
            };
            let Some(&i) = asked.get(&tid) else {
                continue; // a late answer to an earlier query
            };
            let reply = SaReply::decode(&bytes, record_len).map_err(|e| malformed(e.0))?;
            if replies[i].is_some() {
                continue; // a duplicate (a retry answered twice)
            }
            if reply.attr != reqs[i].attr {
                return Err(malformed(format!(
                    "asked for attribute 0x{:04x}, got 0x{:04x}",
                    reqs[i].attr, reply.attr
                )));
            }
            replies[i] = Some(reply);
            pending -= 1;
            done += 1;
            deadline = Instant::now() + budget;
        }
        Ok(replies.into_iter().flatten().collect())
    }

    /// The local port's GUID (after a first query opened the port).
    fn local_port_guid(&self) -> Option<Guid> {
        let g = SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let want = (self.cfg.ca.clone(), self.cfg.port);
        g.open
            .as_ref()
            .filter(|(k, _)| *k == want)
            .map(|(_, o)| Guid(o.port_guid))
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
        node_reply(guid, &r)
    }

    /// [`node_of`](Self::node_of) for every GUID, the queries pipelined.
    ///
    /// # Errors
    /// As [`node_of`](Self::node_of), for any of them.
    pub fn nodes_of(&self, guids: &[Guid]) -> Result<Vec<Option<NodeRecord>>, FabricError> {
        let reqs: Vec<SaRequest> = guids
            .iter()
            .map(|g| SaRequest::node_by_port_guid(0, self.cfg.sm_key, *g))
            .collect();
        let replies = self.query_many(&reqs, NODE_RECORD_LEN)?;
        guids
            .iter()
            .zip(&replies)
            .map(|(g, r)| node_reply(*g, r))
            .collect()
    }

    /// The P_Key table of `lid`/`port` as a set, over `cap` slots.
    ///
    /// # Errors
    /// As [`query`](Self::query); an untrusted SM_Key.
    pub fn pkeys_of(&self, lid: u16, port: u8, cap: u16) -> Result<BTreeSet<PKey>, FabricError> {
        let mut out = BTreeSet::new();
        for block in 0..blocks_of(cap) {
            let r = self.query(
                &SaRequest::pkey_table(0, self.cfg.sm_key, lid, port, block),
                PKEY_RECORD_LEN,
            )?;
            match pkey_reply(&r, lid, port, block)? {
                Some(b) => out.extend(b.pkeys()),
                None => break,
            }
        }
        Ok(out)
    }

    /// What [`read_port`](PortReader::read_port) reads, for many ports at
    /// once: every port's NodeRecord, then every block of every table, then
    /// the NodeRecords again (a LID that moved between is an error, as for
    /// one port) — three pipelined rounds instead of three-plus queries per
    /// port one after another.
    ///
    /// # Errors
    /// As [`read_port`](PortReader::read_port), for any of them.
    pub fn read_ports_pipelined(&self, guids: &[Guid]) -> Result<Vec<Programmed>, FabricError> {
        let first = self.nodes_of(guids)?;
        let mut reqs = Vec::new();
        let mut asked = Vec::new();
        for (i, n) in first.iter().enumerate() {
            let Some(n) = n else { continue };
            let port = table_port(n);
            for block in 0..blocks_of(n.partition_cap) {
                reqs.push(SaRequest::pkey_table(
                    0,
                    self.cfg.sm_key,
                    n.lid,
                    port,
                    block,
                ));
                asked.push((i, n.lid, port, block));
            }
        }
        let replies = self.query_many(&reqs, PKEY_RECORD_LEN)?;
        let mut tables: Vec<BTreeSet<PKey>> = vec![BTreeSet::new(); guids.len()];
        let mut ended = vec![false; guids.len()];
        for ((i, lid, port, block), r) in asked.into_iter().zip(&replies) {
            if ended[i] {
                continue;
            }
            match pkey_reply(r, lid, port, block)? {
                Some(b) => tables[i].extend(b.pkeys()),
                None => ended[i] = true,
            }
        }
        let again = self.nodes_of(guids)?;
        let mut out = Vec::with_capacity(guids.len());
        for (((g, n), a), pkeys) in guids.iter().zip(first).zip(again).zip(tables) {
            out.push(match n {
                None => Programmed::Absent,
                Some(n) => {
                    same_place(*g, &n, a.as_ref())?;
                    Programmed::Present {
                        lid: Some(n.lid),
                        pkeys,
                    }
                }
            });
        }
        Ok(out)
    }
}

/// The table blocks of a port with `cap` P_Key slots (32 per block).
fn blocks_of(cap: u16) -> u16 {
    cap.div_ceil(32).clamp(1, 64)
}

/// The port whose table a NodeRecord's port holds: a CA's record names its own
/// port; a switch's port 0 holds its table.
fn table_port(n: &NodeRecord) -> u8 {
    if n.node_type == 2 { 0 } else { n.local_port }
}

/// The port a NodeRecord query for `guid` answered.
fn node_reply(guid: Guid, r: &SaReply) -> Result<Option<NodeRecord>, FabricError> {
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

/// One block of `lid`/`port`'s table from its PKeyTableRecord reply; `None`
/// past the last block.
fn pkey_reply(
    r: &SaReply,
    lid: u16,
    port: u8,
    block: u16,
) -> Result<Option<PKeyBlock>, FabricError> {
    if r.status >> 8 == 3 {
        if block > 0 {
            return Ok(None); // fewer blocks than the capacity suggests
        }
        // The SA knows the port but holds no table for it (a port just
        // discovered, before the SM set its P_Keys): what the port has is
        // unknown — not empty. Fail closed, and let the gate read again.
        return Err(FabricError::Unreachable {
            backend: BACKEND.into(),
            detail: format!("the SA holds no P_Key table for LID {lid} port {port} yet"),
            hint: "the port was just discovered; the SM sets its table in the sweep under way"
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
    if b.lid != lid || b.port != port || (b.block != block && b.block != block.swap_bytes()) {
        return Err(malformed(format!(
            "asked for LID {lid} port {port} block {block}, got LID {} port {} block {}",
            b.lid, b.port, b.block
        )));
    }
    Ok(Some(b))
}

/// The table was read by LID: the LID must still belong to the GUID (the SM
/// may have moved it between the queries).
fn same_place(guid: Guid, n: &NodeRecord, again: Option<&NodeRecord>) -> Result<(), FabricError> {
    match again {
        Some(a) if a.lid == n.lid && a.local_port == n.local_port => Ok(()),
        again => Err(FabricError::Unreachable {
            backend: BACKEND.into(),
            detail: format!(
                "port GUID {guid} moved while its table was read (LID {} → {:?})",
                n.lid,
                again.map(|a| a.lid)
            ),
            hint: "the SM is re-assigning LIDs; the gate reads again".into(),
        }),
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

    fn read_ports(&self, guids: &[Guid]) -> Result<Vec<Programmed>, FabricError> {
        self.read_ports_pipelined(guids)
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
        let pkeys = self.pkeys_of(n.lid, table_port(&n), n.partition_cap)?;
        same_place(guid, &n, self.node_of(guid)?.as_ref())?;
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
