//! Subnet Administration (SA) MADs, encoded and decoded in Rust: the two queries
//! the OpenSM backend verifies with.
//!
//! - **NodeRecord GetTable filtered by PortGUID** (component mask bit 8): the
//!   GUID → LID lookup. Filtered at the SA, so it fits one MAD (simulated fabrics
//!   have no RMPP; a real one answers the same).
//! - **PKeyTableRecord Get** by LID, port and block: the port's P_Key table as the
//!   port acknowledged it to the SM.
//!
//! Layout (IBA vol. 1, 13.4 and 15.2): a 24-byte common MAD header, a 12-byte RMPP
//! header, the SA header (SM_Key u64 at 36, AttributeOffset u16 at 44 in 8-byte
//! words, ComponentMask u64 at 48), then the record(s) at byte 56. All fields are
//! big-endian. Every decoder here checks lengths before it reads and names what
//! does not fit; none panics (fuzzed: `fuzz/fuzz_targets/sa_mad.rs`).

use std::collections::BTreeSet;

use devfence_model::{Guid, PKey};

/// Bytes in one MAD.
pub const MAD_LEN: usize = 256;
/// Offset of the SA data (records).
pub const SA_DATA: usize = 56;
/// The SA management class.
pub const SA_CLASS: u8 = 0x03;
/// The SA class version.
pub const SA_CLASS_VERSION: u8 = 2;
/// Method Get.
pub const GET: u8 = 0x01;
/// Method GetTable.
pub const GET_TABLE: u8 = 0x12;
/// Attribute NodeRecord.
pub const ATTR_NODE_RECORD: u16 = 0x0011;
/// Attribute PKeyTableRecord.
pub const ATTR_PKEY_TABLE_RECORD: u16 = 0x0033;
/// Attribute SMInfoRecord.
pub const ATTR_SMINFO_RECORD: u16 = 0x0018;
/// Bytes in an SMInfoRecord: LID, reserved, SMInfo (GUID, SM_Key, ActCount,
/// Priority/SMState) — 25 bytes, padded to 32 in a table.
pub const SMINFO_RECORD_LEN: usize = 25;
/// Bytes in a NodeRecord: LID, reserved, NodeInfo (40), NodeDescription (64).
pub const NODE_RECORD_LEN: usize = 108;
/// Bytes in a PKeyTableRecord: LID, block, port, reserved (3), 32 P_Keys.
pub const PKEY_RECORD_LEN: usize = 72;

/// Why a reply does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MadError(pub String);

fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
}

/// An SA request to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaRequest {
    /// Method (Get, GetTable).
    pub method: u8,
    /// Transaction id (matched in the reply).
    pub tid: u64,
    /// Attribute.
    pub attr: u16,
    /// The SM_Key (trusted requests see PKeyTableRecords).
    pub sm_key: u64,
    /// Component mask.
    pub comp_mask: u64,
    /// The template record.
    pub record: Vec<u8>,
}

impl SaRequest {
    /// NodeRecord GetTable for the port with `guid`.
    #[must_use]
    pub fn node_by_port_guid(tid: u64, sm_key: u64, guid: Guid) -> Self {
        let mut record = vec![0u8; NODE_RECORD_LEN];
        record[24..32].copy_from_slice(&guid.0.to_be_bytes());
        Self {
            method: GET_TABLE,
            tid,
            attr: ATTR_NODE_RECORD,
            sm_key,
            comp_mask: 1 << 8,
            record,
        }
    }

    /// SMInfoRecord GetTable: every SM the SA knows, with its state. Sent with
    /// SM_Key 0: an untrusted requester is answered (the records' SM_Key zeroed),
    /// so the role is readable even when the configured `sm_key` is wrong.
    #[must_use]
    pub fn sm_info_records(tid: u64) -> Self {
        Self {
            method: GET_TABLE,
            tid,
            attr: ATTR_SMINFO_RECORD,
            sm_key: 0,
            comp_mask: 0,
            record: vec![0u8; SMINFO_RECORD_LEN],
        }
    }

    /// PKeyTableRecord Get for `lid`, `port`, `block`.
    #[must_use]
    pub fn pkey_table(tid: u64, sm_key: u64, lid: u16, port: u8, block: u16) -> Self {
        let mut record = vec![0u8; PKEY_RECORD_LEN];
        record[0..2].copy_from_slice(&lid.to_be_bytes());
        record[2..4].copy_from_slice(&block.to_be_bytes());
        record[4] = port;
        Self {
            method: GET,
            tid,
            attr: ATTR_PKEY_TABLE_RECORD,
            sm_key,
            comp_mask: 0b111,
            record,
        }
    }

    /// The 256-byte MAD.
    #[must_use]
    pub fn encode(&self) -> [u8; MAD_LEN] {
        let mut m = [0u8; MAD_LEN];
        m[0] = 1; // base version
        m[1] = SA_CLASS;
        m[2] = SA_CLASS_VERSION;
        m[3] = self.method;
        m[8..16].copy_from_slice(&self.tid.to_be_bytes());
        m[16..18].copy_from_slice(&self.attr.to_be_bytes());
        m[36..44].copy_from_slice(&self.sm_key.to_be_bytes());
        m[48..56].copy_from_slice(&self.comp_mask.to_be_bytes());
        let n = self.record.len().min(MAD_LEN - SA_DATA);
        m[SA_DATA..SA_DATA + n].copy_from_slice(&self.record[..n]);
        m
    }
}

/// A decoded SA reply: its header fields and the records it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaReply {
    /// Method (GetResp 0x81, GetTableResp 0x92).
    pub method: u8,
    /// MAD status (0 = success; SA codes in bits 8..15).
    pub status: u16,
    /// Transaction id.
    pub tid: u64,
    /// Attribute.
    pub attr: u16,
    /// The records (for a Get: one; for a GetTable: as many as the data holds).
    pub records: Vec<Vec<u8>>,
}

impl SaReply {
    /// Decodes `bytes` (one MAD, or an RMPP-reassembled reply: header + data).
    ///
    /// # Errors
    /// Too short, not an SA reply, an attribute offset that does not fit.
    pub fn decode(bytes: &[u8], record_len: usize) -> Result<Self, MadError> {
        if bytes.len() < SA_DATA {
            return Err(MadError(format!(
                "the reply is {} bytes, shorter than the 56-byte SA header",
                bytes.len()
            )));
        }
        if bytes[1] != SA_CLASS {
            return Err(MadError(format!(
                "the reply is of management class 0x{:02x}, not SA (0x03)",
                bytes[1]
            )));
        }
        let method = bytes[3];
        if method & 0x80 == 0 {
            return Err(MadError(format!("method 0x{method:02x} is not a response")));
        }
        let status = be16(bytes, 4).unwrap_or(0);
        let tid = be64(bytes, 8).unwrap_or(0);
        let attr = be16(bytes, 16).unwrap_or(0);
        let offset = usize::from(be16(bytes, 44).unwrap_or(0)) * 8;
        let data = &bytes[SA_DATA..];
        let mut records = Vec::new();
        if status == 0 {
            if method == 0x92 {
                // GetTableResp: AttributeOffset 0 means no records.
                if offset != 0 {
                    if offset < record_len {
                        return Err(MadError(format!(
                            "attribute offset {offset} is smaller than the {record_len}-byte record"
                        )));
                    }
                    let mut at = 0;
                    while at + record_len <= data.len() {
                        let rec = &data[at..at + record_len];
                        // The unused rest of a MAD is zero: stop at an all-zero record.
                        if rec.iter().all(|b| *b == 0) {
                            break;
                        }
                        records.push(rec.to_vec());
                        at += offset;
                    }
                }
            } else {
                let rec = data.get(..record_len).ok_or_else(|| {
                    MadError(format!(
                        "the reply holds {} data bytes, less than one {record_len}-byte record",
                        data.len()
                    ))
                })?;
                records.push(rec.to_vec());
            }
        }
        Ok(Self {
            method,
            status,
            tid,
            attr,
            records,
        })
    }
}

/// What a NodeRecord says about one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    /// The port's LID.
    pub lid: u16,
    /// Node type (1 CA, 2 switch, 3 router).
    pub node_type: u8,
    /// The node GUID.
    pub node_guid: Guid,
    /// The port GUID.
    pub port_guid: Guid,
    /// How many P_Keys the port's table holds.
    pub partition_cap: u16,
    /// The port number the record is for.
    pub local_port: u8,
}

impl NodeRecord {
    /// Decodes a 108-byte NodeRecord.
    ///
    /// # Errors
    /// A short record.
    pub fn decode(r: &[u8]) -> Result<Self, MadError> {
        if r.len() < 44 {
            return Err(MadError(format!(
                "a NodeRecord of {} bytes is too short",
                r.len()
            )));
        }
        let ni = &r[4..44];
        Ok(Self {
            lid: be16(r, 0).unwrap_or(0),
            node_type: ni[2],
            node_guid: Guid(be64(ni, 12).unwrap_or(0)),
            port_guid: Guid(be64(ni, 20).unwrap_or(0)),
            partition_cap: be16(ni, 28).unwrap_or(0),
            local_port: ni[36],
        })
    }
}

/// What an SMInfoRecord says about one SM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmInfoRecord {
    /// The SM's LID.
    pub lid: u16,
    /// The SM's port GUID.
    pub guid: Guid,
    /// Its priority (0..15).
    pub priority: u8,
    /// Its state: 0 not active, 1 discovering, 2 standby, 3 master.
    pub state: u8,
}

impl SmInfoRecord {
    /// Decodes a 25-byte SMInfoRecord.
    ///
    /// # Errors
    /// A short record.
    pub fn decode(r: &[u8]) -> Result<Self, MadError> {
        if r.len() < SMINFO_RECORD_LEN {
            return Err(MadError(format!(
                "an SMInfoRecord of {} bytes is too short",
                r.len()
            )));
        }
        Ok(Self {
            lid: be16(r, 0).unwrap_or(0),
            guid: Guid(be64(r, 4).unwrap_or(0)),
            priority: r[24] >> 4,
            state: r[24] & 0x0f,
        })
    }
}

/// What a PKeyTableRecord says: one block of 32 slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PKeyBlock {
    /// The LID.
    pub lid: u16,
    /// The block number.
    pub block: u16,
    /// The port.
    pub port: u8,
    /// The 32 slots as read (empty ones included).
    pub slots: Vec<u16>,
}

impl PKeyBlock {
    /// Decodes a 72-byte PKeyTableRecord.
    ///
    /// # Errors
    /// A short record.
    pub fn decode(r: &[u8]) -> Result<Self, MadError> {
        if r.len() < PKEY_RECORD_LEN {
            return Err(MadError(format!(
                "a PKeyTableRecord of {} bytes is too short",
                r.len()
            )));
        }
        let slots = (0..32).map(|i| be16(r, 8 + 2 * i).unwrap_or(0)).collect();
        Ok(Self {
            lid: be16(r, 0).unwrap_or(0),
            block: be16(r, 2).unwrap_or(0),
            port: r[4],
            slots,
        })
    }
    /// The block's P_Keys as a set, empty slots (base 0) left out.
    #[must_use]
    pub fn pkeys(&self) -> BTreeSet<PKey> {
        self.slots
            .iter()
            .filter(|p| **p & 0x7fff != 0)
            .map(|p| PKey(*p))
            .collect()
    }
}

/// Names an SA status for an operator.
#[must_use]
pub fn status_text(status: u16) -> String {
    let sa = (status >> 8) & 0xff;
    let what = match sa {
        1 => "the SA has no resources",
        2 => "the request is invalid (an untrusted SM_Key for a PKeyTableRecord?)",
        3 => "no such record",
        4 => "too many records",
        5 => "invalid GID",
        6 => "insufficient components",
        _ => match status & 0x1c {
            0x04 => "bad class version",
            0x08 => "method not supported",
            0x0c => "method/attribute not supported",
            0x1c => "invalid attribute field",
            _ => "unknown status",
        },
    };
    format!("MAD status 0x{status:04x}: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(method: u8, status: u16, tid: u64, offset_words: u16, data: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; MAD_LEN];
        m[0] = 1;
        m[1] = SA_CLASS;
        m[2] = 2;
        m[3] = method;
        m[4..6].copy_from_slice(&status.to_be_bytes());
        m[8..16].copy_from_slice(&tid.to_be_bytes());
        m[44..46].copy_from_slice(&offset_words.to_be_bytes());
        m[SA_DATA..SA_DATA + data.len()].copy_from_slice(data);
        m
    }

    #[test]
    fn requests_have_the_sa_layout() {
        let r = SaRequest::node_by_port_guid(7, 1, Guid(0x0002_c900_0000_2003)).encode();
        assert_eq!(&r[..4], &[1, 3, 2, GET_TABLE]);
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().expect("8")), 7);
        assert_eq!(u16::from_be_bytes([r[16], r[17]]), ATTR_NODE_RECORD);
        assert_eq!(u64::from_be_bytes(r[36..44].try_into().expect("8")), 1);
        assert_eq!(u64::from_be_bytes(r[48..56].try_into().expect("8")), 1 << 8);
        assert_eq!(
            u64::from_be_bytes(r[SA_DATA + 24..SA_DATA + 32].try_into().expect("8")),
            0x0002_c900_0000_2003
        );
        let p = SaRequest::pkey_table(9, 1, 3, 1, 0).encode();
        assert_eq!(&p[SA_DATA..SA_DATA + 5], &[0, 3, 0, 0, 1]);
    }

    #[test]
    fn decodes_node_and_pkey_records() {
        let mut nr = vec![0u8; NODE_RECORD_LEN];
        nr[0..2].copy_from_slice(&3u16.to_be_bytes());
        nr[4 + 2] = 1;
        nr[4 + 20..4 + 28].copy_from_slice(&0x0002_c900_0000_2003u64.to_be_bytes());
        nr[4 + 28..4 + 30].copy_from_slice(&64u16.to_be_bytes());
        nr[4 + 36] = 1;
        let r = SaReply::decode(&reply(0x92, 0, 5, 14, &nr), NODE_RECORD_LEN).expect("ok");
        assert_eq!(r.records.len(), 1);
        let n = NodeRecord::decode(&r.records[0]).expect("ok");
        assert_eq!(
            (n.lid, n.port_guid, n.partition_cap, n.local_port),
            (3, Guid(0x0002_c900_0000_2003), 64, 1)
        );
        // No records.
        let r = SaReply::decode(&reply(0x92, 0, 5, 0, &[]), NODE_RECORD_LEN).expect("ok");
        assert!(r.records.is_empty());
        let mut pr = vec![0u8; PKEY_RECORD_LEN];
        pr[0..2].copy_from_slice(&3u16.to_be_bytes());
        pr[4] = 1;
        pr[8..10].copy_from_slice(&0x7fffu16.to_be_bytes());
        pr[12..14].copy_from_slice(&0x8002u16.to_be_bytes());
        let r = SaReply::decode(&reply(0x81, 0, 6, 9, &pr), PKEY_RECORD_LEN).expect("ok");
        let b = PKeyBlock::decode(&r.records[0]).expect("ok");
        assert_eq!(b.pkeys(), BTreeSet::from([PKey(0x7fff), PKey(0x8002)]));
    }

    #[test]
    fn refuses_what_does_not_decode() {
        assert!(SaReply::decode(&[0u8; 10], 72).is_err());
        let mut m = reply(0x81, 0, 1, 9, &[]);
        m[1] = 0x81;
        assert!(SaReply::decode(&m, 72).unwrap_err().0.contains("class"));
        let m = reply(0x01, 0, 1, 9, &[]);
        assert!(
            SaReply::decode(&m, 72)
                .unwrap_err()
                .0
                .contains("not a response")
        );
        let m = reply(0x92, 0, 1, 2, &[1; 20]);
        assert!(SaReply::decode(&m, 108).unwrap_err().0.contains("offset"));
        assert!(SaReply::decode(&reply(0x81, 0, 1, 9, &[])[..100], 72).is_err());
        assert!(NodeRecord::decode(&[0; 10]).is_err());
        assert!(PKeyBlock::decode(&[0; 10]).is_err());
        let r = SaReply::decode(&reply(0x81, 0x0200, 1, 0, &[]), 72).expect("status is data");
        assert_eq!(r.status, 0x0200);
        assert!(status_text(0x0200).contains("untrusted"));
    }
}
