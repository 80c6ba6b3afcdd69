//! One rtnetlink request: set an IB VF's node or port GUID on the PF's netdev,
//! exactly as `ip link set <netdev> vf <N> node_guid|port_guid <guid>` does.
//!
//! The message is built and the acknowledgement parsed by pure functions
//! ([`set_vf_guid_request`], [`parse_ack`]) so that the bytes can be checked
//! without a kernel; [`set_vf_guid`] sends it on a `NETLINK_ROUTE` socket.
//!
//! Numbers (checked against `linux/if_link.h`, `linux/rtnetlink.h` and
//! `linux/netlink.h` of linux-libc-dev 6.1): `RTM_SETLINK` = 19, `NLMSG_ERROR` = 2,
//! `NLM_F_REQUEST` = 1, `NLM_F_ACK` = 4, `IFLA_VFINFO_LIST` = 22, `IFLA_VF_INFO` = 1,
//! `IFLA_VF_IB_NODE_GUID` = 10, `IFLA_VF_IB_PORT_GUID` = 11,
//! `struct ifla_vf_guid { __u32 vf; __u64 guid; }` = 16 bytes (guid at offset 8,
//! host byte order), `struct nlmsghdr` = 16 bytes, `struct ifinfomsg` = 16 bytes.

use std::time::Duration;

use devfence_model::Guid;

use super::{Errno, GuidKind};

/// `RTM_SETLINK`.
pub const RTM_SETLINK: u16 = 19;
/// `NLMSG_ERROR`: the type of an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 4;
/// `IFLA_VFINFO_LIST` (nested list of `IFLA_VF_INFO`).
pub const IFLA_VFINFO_LIST: u16 = 22;
/// `IFLA_VF_INFO` (nested VF attributes).
pub const IFLA_VF_INFO: u16 = 1;
/// `IFLA_VF_IB_NODE_GUID`.
pub const IFLA_VF_IB_NODE_GUID: u16 = 10;
/// `IFLA_VF_IB_PORT_GUID`.
pub const IFLA_VF_IB_PORT_GUID: u16 = 11;
/// `sizeof(struct nlmsghdr)`.
pub const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct ifinfomsg)`.
pub const IFINFOMSG_LEN: usize = 16;
/// `sizeof(struct nlattr)`.
pub const NLA_HDRLEN: usize = 4;
/// `sizeof(struct ifla_vf_guid)`.
pub const IFLA_VF_GUID_LEN: usize = 16;

/// The attribute type for a GUID kind.
#[must_use]
pub fn guid_attr(kind: GuidKind) -> u16 {
    match kind {
        GuidKind::Node => IFLA_VF_IB_NODE_GUID,
        GuidKind::Port => IFLA_VF_IB_PORT_GUID,
    }
}

/// The `RTM_SETLINK` request (with `NLM_F_REQUEST | NLM_F_ACK`) that sets VF
/// `vf`'s node or port GUID on the netdev with index `ifindex`:
///
/// ```text
/// nlmsghdr { len 60, type RTM_SETLINK, flags REQUEST|ACK, seq, pid 0 }
/// ifinfomsg { family AF_UNSPEC, type 0, index ifindex, flags 0, change 0 }
/// IFLA_VFINFO_LIST (len 28)
///   IFLA_VF_INFO (len 24)
///     IFLA_VF_IB_{NODE,PORT}_GUID (len 20): ifla_vf_guid { vf, pad, guid }
/// ```
///
/// The nests carry no `NLA_F_NESTED` flag, like iproute2's `addattr_nest`.
#[must_use]
pub fn set_vf_guid_request(seq: u32, ifindex: i32, vf: u32, kind: GuidKind, guid: Guid) -> Vec<u8> {
    let guid_attr_len = NLA_HDRLEN + IFLA_VF_GUID_LEN;
    let info_len = NLA_HDRLEN + guid_attr_len;
    let list_len = NLA_HDRLEN + info_len;
    let total = NLMSG_HDRLEN + IFINFOMSG_LEN + list_len;
    let mut m = Vec::with_capacity(total);
    // struct nlmsghdr
    m.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_ne_bytes());
    m.extend_from_slice(&RTM_SETLINK.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifinfomsg
    m.push(0); // ifi_family = AF_UNSPEC
    m.push(0); // pad
    m.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // ifi_flags
    m.extend_from_slice(&0u32.to_ne_bytes()); // ifi_change
    // the attributes
    let mut attr = |len: usize, ty: u16| {
        m.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
    };
    attr(list_len, IFLA_VFINFO_LIST);
    attr(info_len, IFLA_VF_INFO);
    attr(guid_attr_len, guid_attr(kind));
    // struct ifla_vf_guid { __u32 vf; (4 bytes padding) __u64 guid; }
    m.extend_from_slice(&vf.to_ne_bytes());
    m.extend_from_slice(&[0; 4]);
    m.extend_from_slice(&guid.0.to_ne_bytes());
    m
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_ne_bytes)
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
}
fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(i32::from_ne_bytes)
}

/// Looks for the acknowledgement of request `seq` in one received datagram.
///
/// Returns `None` when the datagram holds no message for `seq` (keep
/// receiving), `Some(Ok(()))` for an `NLMSG_ERROR` with error 0, and
/// `Some(Err(errno))` for a negative error, or `EPROTO` for a malformed datagram.
#[must_use]
pub fn parse_ack(buf: &[u8], seq: u32) -> Option<Result<(), Errno>> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let (Some(len), Some(ty), Some(mseq)) =
            (u32_at(buf, off), u16_at(buf, off + 4), u32_at(buf, off + 8))
        else {
            return Some(Err(Errno::EPROTO));
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Some(Err(Errno::EPROTO));
        }
        if mseq == seq {
            match ty {
                NLMSG_ERROR => {
                    return Some(match i32_at(buf, off + NLMSG_HDRLEN) {
                        None => Err(Errno::EPROTO),
                        Some(0) => Ok(()),
                        Some(e) if e < 0 => Err(Errno(e.saturating_neg())),
                        Some(_) => Err(Errno::EPROTO),
                    });
                }
                NLMSG_DONE => return Some(Ok(())),
                _ => {}
            }
        }
        // NLMSG_ALIGN(len)
        off += (len + 3) & !3;
    }
    if off < buf.len() {
        return Some(Err(Errno::EPROTO));
    }
    None
}

/// Sends the request of [`set_vf_guid_request`] to the kernel and waits (at most
/// 5 s) for its acknowledgement.
///
/// # Errors
/// The errno of the socket calls, the kernel's answer (`EOPNOTSUPP` when the
/// netdev cannot set VF GUIDs, `EINVAL`, `EPERM` …), `EAGAIN` on timeout,
/// `EPROTO` for a malformed answer.
pub fn set_vf_guid(ifindex: i32, vf: u32, kind: GuidKind, guid: Guid) -> Result<(), Errno> {
    use rustix::net::{
        AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink, recv, sendto,
        socket_with, sockopt,
    };
    let ern = |e: rustix::io::Errno| Errno(e.raw_os_error());
    // Protocol `None` is 0 = NETLINK_ROUTE.
    let fd = socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(ern)?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_secs(5)))
        .map_err(ern)?;
    let seq = std::process::id() ^ 0x6466_6e63;
    let msg = set_vf_guid_request(seq, ifindex, vf, kind, guid);
    let n = sendto(
        &fd,
        &msg,
        SendFlags::empty(),
        &netlink::SocketAddrNetlink::new(0, 0),
    )
    .map_err(ern)?;
    if n != msg.len() {
        return Err(Errno::EIO);
    }
    let mut buf = vec![0u8; 16384];
    for _ in 0..64 {
        let (n, _) = recv(&fd, &mut buf[..], RecvFlags::empty()).map_err(ern)?;
        let got = buf.get(..n).unwrap_or(&[]);
        if let Some(r) = parse_ack(got, seq) {
            return r;
        }
    }
    Err(Errno::EPROTO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_for_a_known_input() {
        let g = Guid(0x1122_3344_5566_7788);
        let m = set_vf_guid_request(7, 5, 3, GuidKind::Port, g);
        assert_eq!(m.len(), 60);
        let mut want = Vec::new();
        want.extend_from_slice(&60u32.to_ne_bytes());
        want.extend_from_slice(&19u16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[0, 0, 0, 0]);
        want.extend_from_slice(&5i32.to_ne_bytes());
        want.extend_from_slice(&[0; 8]);
        want.extend_from_slice(&28u16.to_ne_bytes());
        want.extend_from_slice(&22u16.to_ne_bytes());
        want.extend_from_slice(&24u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(&20u16.to_ne_bytes());
        want.extend_from_slice(&11u16.to_ne_bytes());
        want.extend_from_slice(&3u32.to_ne_bytes());
        want.extend_from_slice(&[0; 4]);
        want.extend_from_slice(&0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(m, want);
        let node = set_vf_guid_request(7, 5, 3, GuidKind::Node, g);
        assert_eq!(u16_at(&node, 42), Some(10), "node GUID attribute type");
        assert_eq!(guid_attr(GuidKind::Node), 10);
    }

    fn ack(seq: u32, error: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&1234u32.to_ne_bytes());
        m.extend_from_slice(&error.to_ne_bytes());
        m.extend_from_slice(&[0; 16]); // the echoed request header
        m
    }

    #[test]
    fn ack_parsing() {
        assert_eq!(parse_ack(&ack(9, 0), 9), Some(Ok(())));
        assert_eq!(parse_ack(&ack(9, -95), 9), Some(Err(Errno::EOPNOTSUPP)));
        assert_eq!(parse_ack(&ack(9, -1), 9), Some(Err(Errno::EPERM)));
        // Another request's answer: keep waiting.
        assert_eq!(parse_ack(&ack(8, -1), 9), None);
        // Two messages in one datagram, ours second.
        let mut two = ack(8, 0);
        two.extend_from_slice(&ack(9, -22));
        assert_eq!(parse_ack(&two, 9), Some(Err(Errno::EINVAL)));
        // Truncated or inconsistent lengths.
        assert_eq!(parse_ack(&ack(9, 0)[..20], 9), Some(Err(Errno::EPROTO)));
        let mut bad = ack(9, 0);
        bad[0] = 200;
        assert_eq!(parse_ack(&bad, 9), Some(Err(Errno::EPROTO)));
        assert_eq!(parse_ack(&[], 9), None);
        assert_eq!(parse_ack(&ack(9, 0)[..10], 9), Some(Err(Errno::EPROTO)));
    }
}
