//! mlx5 IB VFs: administrative GUIDs set through rtnetlink (or the OFED `sriov/`
//! files), applied when the VF's driver next loads; and the IB device an mlx5 VF
//! gets on the host.

use devfence_model::Guid;

use super::K;
use super::num::strip_nl;
use super::pci::lowest_free;
use super::tree::{Kind, base, split};
use crate::actuator::{Errno, GuidKind};
use crate::sim::{guid_bytes_colon, guid_groups};

/// `xx:xx:xx:xx:xx:xx:xx:xx` (the OFED `sriov/<N>/{node,port}` form).
fn parse_colon_guid(v: &[u8]) -> Option<Guid> {
    let s = std::str::from_utf8(strip_nl(v)).ok()?;
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 8 {
        return None;
    }
    let mut g: u64 = 0;
    for p in parts {
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        g = (g << 8) | u64::from(u8::from_str_radix(p, 16).ok()?);
    }
    Some(Guid(g))
}

impl K<'_> {
    /// `ip link set <netdev> vf <vf> node_guid|port_guid <guid>`: `ENODEV` for an
    /// unknown netdev or VF index, `EOPNOTSUPP` for a netdev that is not an mlx5
    /// IPoIB PF. Stores the administrative GUID; it takes effect at the VF's next
    /// bind (or reset).
    pub(super) fn set_vf_guid(
        &mut self,
        netdev: &str,
        vf: u32,
        kind: GuidKind,
        guid: Guid,
    ) -> Result<(), Errno> {
        if netdev.is_empty() || netdev.len() > 15 || netdev.contains(['/', ' ']) {
            return Err(Errno::ENODEV);
        }
        let nd = self
            .t
            .link(&format!("/sys/class/net/{netdev}"))
            .ok_or(Errno::ENODEV)?;
        let (net, _) = split(&nd);
        let pf_dir = net.strip_suffix("/net").ok_or(Errno::EOPNOTSUPP)?;
        let pf = self.pci_at(pf_dir).ok_or(Errno::EOPNOTSUPP)?;
        if !self.t.is_dir(&format!("{pf_dir}/infiniband")) {
            return Err(Errno::EOPNOTSUPP);
        }
        if !self.vfs_of(pf_dir).iter().any(|(i, _, _)| *i == vf) {
            return Err(Errno::ENODEV);
        }
        let a = self.s.dm().admin_guids.entry((pf, vf)).or_default();
        match kind {
            GuidKind::Node => a.node = Some(guid),
            GuidKind::Port => a.port = Some(guid),
        }
        Ok(())
    }

    /// A write to an OFED `<pf>/sriov/<N>/{node,port,policy}` file, if `dir` is
    /// one. `node`/`port` set the administrative GUID (as rtnetlink does);
    /// `policy` takes `Down`, `Up` or `Follow`.
    pub(super) fn ofed_write(
        &mut self,
        dir: &str,
        name: &str,
        value: &[u8],
    ) -> Option<Result<(), Errno>> {
        let (sriov, idx) = split(dir);
        let pf_dir = sriov.strip_suffix("/sriov")?;
        let pf = self.pci_at(pf_dir)?;
        let idx: u32 = idx.parse().ok()?;
        Some(match name {
            "node" | "port" => match parse_colon_guid(value) {
                None => Err(Errno::EINVAL),
                Some(g) => {
                    let a = self.s.dm().admin_guids.entry((pf, idx)).or_default();
                    if name == "node" {
                        a.node = Some(g);
                    } else {
                        a.port = Some(g);
                    }
                    Ok(())
                }
            },
            "policy" => match strip_nl(value) {
                v @ (b"Down" | b"Up" | b"Follow") => {
                    let mut t = v.to_vec();
                    t.push(b'\n');
                    self.t.set(&format!("{dir}/policy"), t)
                }
                _ => Err(Errno::EINVAL),
            },
            _ => return None,
        })
    }

    /// The VF index of the VF at `vf_dir` under its PF.
    fn vf_index(&self, pf_dir: &str, vf_dir: &str) -> Option<u32> {
        self.vfs_of(pf_dir)
            .into_iter()
            .find(|(_, _, d)| d == vf_dir)
            .map(|(i, _, _)| i)
    }

    /// Makes a VF's administrative GUIDs operational: the PF's OFED
    /// `sriov/<N>/{node,port}` and, while the VF is on mlx5_core, its IB device's
    /// `node_guid` and port GUID (`gids/0`).
    pub(super) fn apply_admin_guids(&mut self, vf_dir: &str) -> Result<(), Errno> {
        let Some((pf, pf_dir)) = self.physfn_of(vf_dir) else {
            return Ok(());
        };
        let Some(idx) = self.vf_index(&pf_dir, vf_dir) else {
            return Ok(());
        };
        let Some(a) = self.s.d.admin_guids.get(&(pf, idx)).copied() else {
            return Ok(());
        };
        let s = format!("{pf_dir}/sriov/{idx}");
        for (g, f) in [(a.node, "node"), (a.port, "port")] {
            if let Some(g) = g
                && self.t.lexists(&format!("{s}/{f}"))
            {
                self.t
                    .set(&format!("{s}/{f}"), format!("{}\n", guid_bytes_colon(g)))?;
            }
        }
        if self.driver_of(vf_dir).as_deref() == Some("mlx5_core") {
            let ib = format!("{vf_dir}/infiniband");
            for dev in self.t.list(&ib) {
                let d = format!("{ib}/{dev}");
                if let Some(n) = a.node {
                    self.t
                        .set(&format!("{d}/node_guid"), format!("{}\n", guid_groups(n)))?;
                }
                if let Some(p) = a.port {
                    for port in self.t.list(&format!("{d}/ports")) {
                        self.t.set(
                            &format!("{d}/ports/{port}/gids/0"),
                            format!("fe80:0000:0000:0000:{}\n", guid_groups(p)),
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The IB device mlx5_ib creates for an mlx5 VF bound on the host (when its
    /// PF is an IB device): `mlx5_<N>` with port 1 as the PF's, its own LID unset,
    /// the GUIDs of the VF (administrative, else zero) and a P_Key table holding
    /// the default partition.
    pub(super) fn fresh_ib_device(&mut self, vf_dir: &str) -> Result<(), Errno> {
        let Some((pf, pf_dir)) = self.physfn_of(vf_dir) else {
            return Ok(());
        };
        let pf_ib = format!("{pf_dir}/infiniband");
        let Some(pf_dev) = self.t.list(&pf_ib).into_iter().next() else {
            return Ok(());
        };
        if self.t.is_dir(&format!("{vf_dir}/infiniband")) {
            return Ok(());
        }
        let a = self
            .vf_index(&pf_dir, vf_dir)
            .and_then(|i| self.s.d.admin_guids.get(&(pf, i)).copied())
            .unwrap_or_default();
        let n = lowest_free(
            self.t
                .list("/sys/class/infiniband")
                .iter()
                .filter_map(|n| n.strip_prefix("mlx5_").and_then(|x| x.parse().ok())),
        );
        let name = format!("mlx5_{n}");
        let d = format!("{vf_dir}/infiniband/{name}");
        let pfp = format!("{pf_ib}/{pf_dev}/ports/1");
        let copy = |f: &str, dflt: &str| {
            self.t
                .text(&format!("{pfp}/{f}"))
                .map_or_else(|| format!("{dflt}\n"), |v| format!("{v}\n"))
        };
        let node = a.node.unwrap_or(Guid(0));
        let port = a.port.unwrap_or(Guid(0));
        let files: [(String, String); 11] = [
            (format!("{d}/node_guid"), format!("{}\n", guid_groups(node))),
            (format!("{d}/node_type"), "1: CA\n".to_owned()),
            (
                format!("{d}/fw_ver"),
                self.t
                    .text(&format!("{pf_ib}/{pf_dev}/fw_ver"))
                    .map_or_else(String::new, |v| format!("{v}\n")),
            ),
            (format!("{d}/ports/1/state"), copy("state", "4: ACTIVE")),
            (
                format!("{d}/ports/1/phys_state"),
                copy("phys_state", "5: LinkUp"),
            ),
            (
                format!("{d}/ports/1/rate"),
                copy("rate", "200 Gb/sec (4X HDR)"),
            ),
            (format!("{d}/ports/1/lid"), "0x0\n".to_owned()),
            (format!("{d}/ports/1/sm_lid"), copy("sm_lid", "0x0")),
            (format!("{d}/ports/1/lid_mask_count"), "0\n".to_owned()),
            (format!("{d}/ports/1/link_layer"), "InfiniBand\n".to_owned()),
            (
                format!("{d}/ports/1/gids/0"),
                format!("fe80:0000:0000:0000:{}\n", guid_groups(port)),
            ),
        ];
        for (p, v) in files {
            self.t.put(&p, v.as_bytes(), 0o444)?;
        }
        let slots = self.t.list(&format!("{pfp}/pkeys")).len().max(1);
        for i in 0..slots {
            let v = if i == 0 { "0xffff\n" } else { "0x0000\n" };
            self.t
                .put(&format!("{d}/ports/1/pkeys/{i}"), v.as_bytes(), 0o444)?;
        }
        self.t.symlink(&format!("{d}/device"), vf_dir)?;
        self.t
            .symlink(&format!("/sys/class/infiniband/{name}"), &d)?;
        debug_assert_eq!(base(&d), name);
        Ok(())
    }
}

impl K<'_> {
    /// The port directory and port GUID of the P_Key slot `path`
    /// (`…/infiniband/<dev>/ports/<p>/pkeys/<i>`, links resolved), if `path` is
    /// an existing slot of a port whose `gids/0` carries a non-zero GUID.
    pub(super) fn pkey_slot_port(&self, path: &str) -> Option<(String, Guid)> {
        let p = self.t.resolve(path, true).ok()?;
        let (pkeys, slot) = split(&p);
        let (port, pk) = split(pkeys);
        let (ports, num) = split(port);
        let (dev_dir, ps) = split(ports);
        let (ib, dev) = split(dev_dir);
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if pk != "pkeys"
            || ps != "ports"
            || base(ib) != "infiniband"
            || dev.is_empty()
            || !digits(slot)
            || !digits(num)
            || self.t.kind(&p) != Some(Kind::File)
        {
            return None;
        }
        let guid = self.port_guid(port)?;
        Some((port.to_owned(), guid))
    }

    /// The non-zero port GUID in `<port>/gids/0`.
    fn port_guid(&self, port: &str) -> Option<Guid> {
        let gid = self.t.read(&format!("{port}/gids/0")).ok()?;
        crate::parse::gid_port_guid(&gid)
            .ok()
            .filter(|g| *g != Guid(0))
    }

    /// Writes the table the fabric programmed for `guid` into the port at
    /// `port`: slot *i* = `keys[i]`, `0x0000` past the keys; the slot count is
    /// kept (keys past the last slot are dropped). Nothing is written if the
    /// port's GUID is no longer `guid` (it changed while the fabric was asked).
    /// With `only`, just that slot (a read of one slot refreshes that slot: reading
    /// a whole table stays linear in its size).
    pub(super) fn program_pkey_table(
        &mut self,
        port: &str,
        guid: Guid,
        keys: &[u16],
        only: Option<usize>,
    ) -> Result<(), Errno> {
        if self.port_guid(port) != Some(guid) {
            return Ok(());
        }
        let dir = format!("{port}/pkeys");
        let names = match only {
            Some(i) => vec![i.to_string()],
            None => self.t.list(&dir),
        };
        for name in names {
            let Ok(i) = name.parse::<usize>() else {
                continue;
            };
            let f = format!("{dir}/{name}");
            if self.t.kind(&f) != Some(Kind::File) {
                continue;
            }
            let v = format!("0x{:04x}\n", keys.get(i).copied().unwrap_or(0));
            // `port` is resolved and `f` a file: read in place.
            if self.t.read_at(&f).ok().as_deref() != Some(v.as_bytes()) {
                self.t.set(&f, v)?;
            }
        }
        Ok(())
    }
}
