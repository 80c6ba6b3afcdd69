//! `devfence fleet …`: the fleet's shared facts in etcd as one fabric sees
//! them (docs/fleet.md): status, the GUID pool, and the operator's revoke of
//! a lost host's orphaned memberships. Parses, calls `devfence_app::fleet`
//! (here, or through the host agent when it runs) and renders.

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use clap::{Args, Subcommand};
use devfence_app::fleet::{
    FleetStatus, GuidPoolStatus, MembershipState, MembershipStatus, RevokeOutcome, RevokeTarget,
};
use devfence_host::HostRoot;

use crate::Exit;
use crate::table::Table;

/// `devfence fleet …`.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Show the fabric as the fleet store (etcd, `[fleet]`) holds it.
    ///
    /// Read at one etcd revision: the fabric controller that leads (its name,
    /// lease and fencing token, or that none leads), the controller's last
    /// batch (SM sweep generation, the desired revision it applied, what it
    /// had pending), every host with its lease and the seconds it has left,
    /// and per host each port's desired membership against what the
    /// controller observed at the SM: in sync, pending (not yet observed at
    /// the desired revision), mismatch (observed with other P_Keys), releasing
    /// (released by a live host, still at the SM), or orphaned (the host's
    /// lease expired; the SM still holds it). Orphaned memberships are never
    /// removed on their own — a partitioned host may still run VMs on them —
    /// only by `devfence fleet revoke`. Revoke requests not yet carried out
    /// are listed too.
    ///
    /// Goes through the host agent when it runs (GET /v1/fleet/status). Exit
    /// 0 when the store answered; 2 when `[fleet]` is missing or etcd does not
    /// answer (fail closed: the error lists the endpoints).
    ///
    /// Examples:
    ///
    ///   devfence fleet status
    ///
    ///   devfence fleet status --json | jq '.counts.orphaned'
    Status {
        /// Print JSON (docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Show the fabric's GUID pool in the fleet store.
    ///
    /// The range (configured once per fabric), the next GUID never yet
    /// offered, how many GUIDs are allocated and retired (released GUIDs are
    /// retired, never reissued) in all and per host, pool GUIDs claimed
    /// outside the range, and whether the global GUID index (a GUID belongs
    /// to one fabric) agrees with the pool. A lost host's GUIDs stay
    /// allocated to it. Read at one etcd revision; through the host agent
    /// when it runs (GET /v1/fleet/guid-pool). The per-host ledger's own
    /// range is `devfence guid-pool`.
    ///
    /// Examples:
    ///
    ///   devfence fleet guid-pool
    ///
    ///   devfence fleet guid-pool --json | jq '.index.consistent'
    GuidPool {
        /// Print JSON (docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Ask the fabric controller to remove a lost host's orphaned
    /// memberships from the SM (admin).
    ///
    /// Writes a revoke request (`/P/F/revoke/HOST/GUID`, with who asked) for
    /// one GUID or for every orphaned membership of HOST; the controller
    /// takes the GUID out of the SM's partitions, verifies it, and deletes
    /// the request. Refused (exit 1) while HOST's lease holds — a live host
    /// releases its memberships itself — and for a GUID the controller
    /// observed nothing of. Only do this once the host is known to be down
    /// or fenced: a partitioned host may still run VMs on those memberships.
    /// The GUIDs stay allocated to HOST in the pool: never reissued. The
    /// request, or its refusal, is recorded in this host's audit chain with
    /// who asked (`devfence audit show`).
    ///
    /// Through the host agent when it runs (POST /v1/fleet/revoke, admin
    /// group). Exit 0 when the requests were written; 1 refused by a rule;
    /// 2 bad input, no `[fleet]`, or etcd unreachable.
    ///
    /// Examples:
    ///
    ///   devfence fleet revoke --host hv07 --guid 0x0002c90300000012
    ///
    ///   devfence fleet revoke --host hv07 --all
    Revoke(RevokeArgs),
}

/// `devfence fleet revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The lost host (its name in the fleet, as `fleet status` lists it).
    #[arg(long, value_name = "HOST")]
    pub host: String,
    /// The port GUID of one orphaned membership (0x + 16 hex digits).
    #[arg(
        long,
        value_name = "GUID",
        conflicts_with = "all",
        required_unless_present = "all"
    )]
    pub guid: Option<String>,
    /// Every orphaned membership of the host.
    #[arg(long)]
    pub all: bool,
    /// Print JSON (docs/json.md).
    #[arg(long)]
    pub json: bool,
}

/// Runs `devfence fleet …`.
pub fn run(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &FleetCommand,
    out: &mut dyn Write,
) -> Result<Exit> {
    match c {
        FleetCommand::Status { json } => {
            let s: FleetStatus = match crate::via::agent(root, ledger)? {
                Some(a) => a
                    .call("GET", "/v1/fleet/status", None)
                    .map_err(crate::via::error)?,
                None => {
                    let f = connect(root, "devfence fleet status")?;
                    devfence_app::fleet::status(&f)?
                }
            };
            if *json {
                crate::jsonout::emit(out, &s)?;
            } else {
                render_status(&s, out)?;
            }
        }
        FleetCommand::GuidPool { json } => {
            let p: GuidPoolStatus = match crate::via::agent(root, ledger)? {
                Some(a) => a
                    .call("GET", "/v1/fleet/guid-pool", None)
                    .map_err(crate::via::error)?,
                None => {
                    let f = connect(root, "devfence fleet guid-pool")?;
                    devfence_app::fleet::guid_pool(&f)?
                }
            };
            if *json {
                crate::jsonout::emit(out, &p)?;
            } else {
                render_pool(&p, out)?;
            }
        }
        FleetCommand::Revoke(a) => {
            let r = revoke(root, ledger, a).map_err(crate::refusal_if_rule)?;
            if a.json {
                crate::jsonout::emit(out, &r)?;
            } else {
                render_revoke(&r, out)?;
            }
        }
    }
    Ok(Exit::Ok)
}

fn connect(root: &HostRoot, what: &str) -> Result<devfence_app::fleet::Fleet> {
    let config = devfence_app::config::Config::load(root, crate::config::explicit())
        .map_err(devfence_app::AppError::from)?;
    Ok(devfence_app::fleet::connect(&config, what)?)
}

fn revoke(root: &HostRoot, ledger: Option<&Path>, a: &RevokeArgs) -> Result<RevokeOutcome> {
    // Checked here first: a malformed name or GUID is a usage error (exit 2)
    // whichever way the request goes.
    let host = devfence_app::fleet::parse_host(&a.host)?;
    let target = match &a.guid {
        Some(g) => RevokeTarget::Guid(devfence_app::fleet::parse_guid(g)?),
        None => RevokeTarget::All,
    };
    if let Some(agent) = crate::via::agent(root, ledger)? {
        let body = match target {
            RevokeTarget::Guid(g) => serde_json::json!({ "host": host, "guid": g }),
            RevokeTarget::All => serde_json::json!({ "host": host, "all": true }),
        };
        return agent
            .call("POST", "/v1/fleet/revoke", Some(&body))
            .map_err(crate::via::error);
    }
    let f = connect(root, "devfence fleet revoke")?;
    // The ledger before etcd is asked (connecting does not ask it): a
    // request this host cannot record is not sent.
    let mut store = devfence_app::env::open_store(root, ledger, true)?;
    let actor = devfence_app::Actor {
        uid: own_uid(),
        gid: 0,
        pid: i32::try_from(std::process::id()).ok(),
        via: "cli",
    };
    Ok(devfence_app::fleet::revoke(
        &mut store, &f, &host, target, &actor,
    )?)
}

/// This process's user id (the owner of /proc/self), for the revoke record.
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

fn pkeys(p: Option<&Vec<devfence_model::PKey>>) -> String {
    match p {
        None => String::new(),
        Some(v) if v.is_empty() => "none".into(),
        Some(v) => v
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn state_name(s: MembershipState) -> &'static str {
    match s {
        MembershipState::InSync => "in sync",
        MembershipState::Pending => "pending",
        MembershipState::Mismatch => "mismatch",
        MembershipState::Releasing => "releasing",
        MembershipState::Orphaned => "orphaned",
    }
}

fn render_status(s: &FleetStatus, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "Fabric {} (etcd revision {})", s.fabric, s.revision)?;
    match &s.leader {
        Some(l) => writeln!(
            out,
            "Leader: {} (lease {:x}, fencing token {}, {})",
            l.controller,
            l.lease,
            l.fencing_token,
            l.ttl_left_s
                .map_or_else(|| "lease not found".to_owned(), |t| format!("{t}s left"))
        )?,
        None => writeln!(
            out,
            "Leader: none — no fabric controller leads; nothing is applied to the SM until one does"
        )?,
    }
    match &s.controller {
        Some(c) => writeln!(
            out,
            "Last batch: generation {}, desired revision {} applied, {} pending, at {} (by {}{})",
            c.generation,
            c.applied_revision,
            c.pending,
            c.time,
            c.controller,
            if c.by_leader {
                ", the leader"
            } else {
                ", not the leader"
            }
        )?,
        None => writeln!(out, "Last batch: none published yet")?,
    }
    writeln!(out)?;
    let mut t = Table::new(&[
        "HOST",
        "LEASE",
        "TTL",
        "IN SYNC",
        "PENDING",
        "MISMATCH",
        "RELEASING",
        "ORPHANED",
    ]);
    for h in &s.hosts {
        let n = |st: MembershipState| {
            h.memberships
                .iter()
                .filter(|m| m.state == st)
                .count()
                .to_string()
        };
        t.row(vec![
            h.host.to_string(),
            h.lease
                .map_or_else(|| "lost".to_owned(), |l| format!("{l:x}")),
            h.ttl_left_s.map_or_else(String::new, |t| format!("{t}s")),
            n(MembershipState::InSync),
            n(MembershipState::Pending),
            n(MembershipState::Mismatch),
            n(MembershipState::Releasing),
            n(MembershipState::Orphaned),
        ]);
    }
    if s.hosts.is_empty() {
        writeln!(out, "No host is registered on this fabric.")?;
    } else {
        t.write(out)?;
    }
    let not_in_sync: Vec<(&devfence_app::fleet::Name, &MembershipStatus)> = s
        .hosts
        .iter()
        .flat_map(|h| h.memberships.iter().map(move |m| (&h.host, m)))
        .filter(|(_, m)| m.state != MembershipState::InSync)
        .collect();
    if !not_in_sync.is_empty() {
        writeln!(out, "\nNot in sync:")?;
        let mut t = Table::new(&[
            "HOST", "GUID", "STATE", "TENANT", "DESIRED", "OBSERVED", "REVOKE",
        ]);
        for (h, m) in not_in_sync {
            t.row(vec![
                h.to_string(),
                m.guid.to_string(),
                state_name(m.state).to_owned(),
                m.tenant
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                pkeys(m.desired.as_ref()),
                pkeys(m.observed.as_ref()),
                if m.revoke_requested {
                    "requested".into()
                } else {
                    String::new()
                },
            ]);
        }
        t.write(out)?;
    }
    let c = &s.counts;
    writeln!(
        out,
        "\n{} host(s) live, {} lost; {} in sync, {} pending, {} mismatch, {} releasing, {} orphaned; {} revoke request(s)",
        c.hosts_live,
        c.hosts_lost,
        c.in_sync,
        c.pending,
        c.mismatch,
        c.releasing,
        c.orphaned,
        c.revokes
    )?;
    if c.orphaned > c.revokes {
        writeln!(
            out,
            "Hint: orphaned memberships stay at the SM until revoked; once a lost host is known to be down, `devfence fleet revoke --host HOST --all`"
        )?;
    }
    Ok(())
}

fn render_pool(p: &GuidPoolStatus, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "Fabric {} (etcd revision {})", p.fabric, p.revision)?;
    match &p.range {
        Some(r) => writeln!(
            out,
            "Range: {}..{} ({} GUIDs); next never offered: {}; never offered: {}",
            r.first,
            r.last,
            r.size,
            p.next
                .map_or_else(|| r.first.to_string(), |g| g.to_string()),
            p.never_offered.unwrap_or(r.size)
        )?,
        None => writeln!(
            out,
            "Range: not configured. Hint: a fabric's range is configured once for the fleet"
        )?,
    }
    writeln!(
        out,
        "Allocated: {}; retired: {} (never reissued); outside the range: {}",
        p.allocated, p.retired, p.outside_range
    )?;
    if !p.hosts.is_empty() {
        let mut t = Table::new(&["HOST", "ALLOCATED", "RETIRED"]);
        for h in &p.hosts {
            t.row(vec![
                h.host.to_string(),
                h.allocated.to_string(),
                h.retired.to_string(),
            ]);
        }
        t.write(out)?;
    }
    let i = &p.index;
    if i.consistent {
        writeln!(
            out,
            "Global GUID index: consistent ({} GUIDs checked)",
            i.checked
        )?;
    } else {
        writeln!(
            out,
            "Global GUID index: {} problem(s) in {} GUIDs checked",
            i.problems, i.checked
        )?;
        for g in &i.missing {
            writeln!(out, "  {g}: in the pool, not in the global index")?;
        }
        for e in &i.on_other_fabric {
            writeln!(
                out,
                "  {}: in the pool, indexed to fabric {}",
                e.guid, e.fabric
            )?;
        }
        for g in &i.without_pool_record {
            writeln!(out, "  {g}: indexed to this fabric, not in its pool")?;
        }
        writeln!(
            out,
            "Hint: another writer or a damaged store; inspect the keys with etcdctl (docs/fleet.md, key layout)"
        )?;
    }
    Ok(())
}

fn render_revoke(r: &RevokeOutcome, out: &mut dyn Write) -> Result<()> {
    for g in &r.requested {
        writeln!(
            out,
            "Revoke requested: {g} of lost host {} on fabric {} (by {})",
            r.host, r.fabric, r.by
        )?;
    }
    for g in &r.already_requested {
        writeln!(out, "Already requested: {g} of lost host {}", r.host)?;
    }
    writeln!(
        out,
        "The fabric controller removes them from the SM and deletes each request once verified; `devfence fleet status` shows what is left. The GUIDs stay allocated to {} (never reissued).",
        r.host
    )?;
    Ok(())
}
