//! Who may do what: the peer's credentials from the socket (`SO_PEERCRED`:
//! uid, gid, pid) and its supplementary groups, judged against `[agent]`'s
//! groups in a fixed order (root, then the admin group, then the reader
//! group). The decision is a pure function over the credentials so it is
//! tested with any credentials, not only the test's own.

use std::ffi::CString;

use serde::Serialize;

/// The peer of one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Peer {
    /// Its user id.
    pub uid: u32,
    /// Its (effective, primary) group id.
    pub gid: u32,
    /// Its process id, if the kernel gave one.
    pub pid: Option<i32>,
    /// Its supplementary groups (the group database's, for its user).
    #[serde(skip)]
    pub groups: Vec<u32>,
}

impl Peer {
    /// Whether the peer is in group `gid` (primary or supplementary).
    #[must_use]
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// The groups `[agent]` names, resolved to gids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Members may act (and read).
    pub admin_gid: Option<u32>,
    /// Members may read.
    pub reader_gid: Option<u32>,
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A GET: reading the host, the ledger, the audit chain, the metrics.
    Read,
    /// A POST: an operation, a plan.
    Act,
}

/// What the peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Root or a member of the admin group.
    Admin,
    /// A member of the reader group.
    Reader,
}

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The peer is in neither group.
    #[error(
        "uid {uid} (gid {gid}) may not use the devfence agent: it is neither root nor in the admin or reader group. Hint: add the user to the group [agent] reader_group names (to read) or admin_group (to act) in devfence.toml"
    )]
    Outsider {
        /// The peer's uid.
        uid: u32,
        /// The peer's gid.
        gid: u32,
    },
    /// A reader asked to act.
    #[error(
        "uid {uid} may read but not act: it is not root nor in the admin group. Hint: act as root or as a member of the group [agent] admin_group names in devfence.toml"
    )]
    ReaderMayNotAct {
        /// The peer's uid.
        uid: u32,
    },
}

/// The decision, in order: root acts; a member of the admin group acts; a
/// member of the reader group reads; anyone else is refused.
///
/// # Errors
/// [`Denied`] naming the peer and the group it would need.
pub fn authorize(peer: &Peer, policy: Policy, access: Access) -> Result<Role, Denied> {
    let role = if peer.uid == 0 || policy.admin_gid.is_some_and(|g| peer.in_group(g)) {
        Some(Role::Admin)
    } else if policy.reader_gid.is_some_and(|g| peer.in_group(g)) {
        Some(Role::Reader)
    } else {
        None
    };
    match (role, access) {
        (None, _) => Err(Denied::Outsider {
            uid: peer.uid,
            gid: peer.gid,
        }),
        (Some(Role::Reader), Access::Act) => Err(Denied::ReaderMayNotAct { uid: peer.uid }),
        (Some(r), _) => Ok(r),
    }
}

/// The supplementary groups of `uid`'s user from the group database
/// (`getgrouplist`), `gid` included; only `gid` when the uid has no user
/// entry. Blocking (NSS): call it off the async threads.
#[must_use]
pub fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    use nix::unistd::{Gid, Uid, User, getgrouplist};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return vec![gid];
    };
    let Ok(name) = CString::new(user.name) else {
        return vec![gid];
    };
    match getgrouplist(&name, Gid::from_raw(gid)) {
        Ok(gs) => gs.into_iter().map(Gid::as_raw).collect(),
        Err(_) => vec![gid],
    }
}

/// A group `[agent]` names, as a gid (a name is looked up in the group database).
///
/// # Errors
/// A name the group database does not know.
pub fn resolve_group(g: &devfence_app::config::GroupRef) -> Result<u32, String> {
    use devfence_app::config::GroupRef;
    match g {
        GroupRef::Gid(n) => Ok(*n),
        GroupRef::Name(n) => match nix::unistd::Group::from_name(n) {
            Ok(Some(gr)) => Ok(gr.gid.as_raw()),
            Ok(None) => Err(format!(
                "[agent] names the group {n:?}, which the group database does not know. Hint: create it (groupadd {n}) or give a numeric gid"
            )),
            Err(e) => Err(format!(
                "Cannot look up the group {n:?} that [agent] names: {e}. Hint: check the group database (nsswitch.conf), or give a numeric gid"
            )),
        },
    }
}

/// The policy `[agent]` names: its groups resolved (at start and at a
/// reload, the same way).
///
/// # Errors
/// A group the group database does not know.
pub fn policy_of(agent: &devfence_app::config::AgentConfig) -> Result<Policy, crate::AgentError> {
    let resolve = |g: &Option<devfence_app::config::GroupRef>| {
        g.as_ref()
            .map(resolve_group)
            .transpose()
            .map_err(crate::AgentError::Group)
    };
    Ok(Policy {
        admin_gid: resolve(&agent.admin_group)?,
        reader_gid: resolve(&agent.reader_group)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
            groups: groups.to_vec(),
        }
    }

    const P: Policy = Policy {
        admin_gid: Some(900),
        reader_gid: Some(901),
    };

    #[test]
    fn root_and_admins_act_readers_read_others_are_refused() {
        use Access::{Act, Read};
        assert_eq!(authorize(&peer(0, 0, &[]), P, Act), Ok(Role::Admin));
        assert_eq!(
            authorize(&peer(0, 0, &[]), Policy::default(), Act),
            Ok(Role::Admin)
        );
        assert_eq!(authorize(&peer(1000, 900, &[]), P, Act), Ok(Role::Admin));
        assert_eq!(
            authorize(&peer(1000, 100, &[5, 900]), P, Act),
            Ok(Role::Admin),
            "a supplementary group counts"
        );
        assert_eq!(authorize(&peer(1000, 901, &[]), P, Read), Ok(Role::Reader));
        assert_eq!(
            authorize(&peer(1000, 100, &[901]), P, Read),
            Ok(Role::Reader)
        );
        let e = authorize(&peer(1000, 901, &[]), P, Act).expect_err("a reader acts");
        assert_eq!(e, Denied::ReaderMayNotAct { uid: 1000 });
        assert!(e.to_string().contains("Hint:"), "{e}");
        for access in [Read, Act] {
            let e = authorize(&peer(1000, 100, &[5]), P, access).expect_err("outsider");
            assert_eq!(
                e,
                Denied::Outsider {
                    uid: 1000,
                    gid: 100
                }
            );
            let e = authorize(&peer(1000, 900, &[901]), Policy::default(), access)
                .expect_err("no groups configured: only root");
            assert!(matches!(e, Denied::Outsider { .. }), "{e}");
        }
    }

    #[test]
    fn groups_are_resolved_by_name_or_number() {
        use devfence_app::config::GroupRef;
        assert_eq!(resolve_group(&GroupRef::Gid(4242)), Ok(4242));
        assert_eq!(resolve_group(&GroupRef::Name("root".into())), Ok(0));
        let e =
            resolve_group(&GroupRef::Name("no-such-group-devfence".into())).expect_err("unknown");
        assert!(
            e.contains("no-such-group-devfence") && e.contains("Hint:"),
            "{e}"
        );
        assert!(groups_of(0, 0).contains(&0));
    }
}
