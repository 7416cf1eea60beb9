//! The VXLAN device on the real kernel ([`VXLAN_DEV`]: VNI [`VXLAN_VNI`],
//! UDP [`VXLAN_PORT`], learning off, the node's underlay address as the
//! outer source) and its entries: per remote node a permanent neighbour
//! entry (its tunnel address → its VTEP MAC) and an FDB entry (that MAC →
//! its node address). Only entries on Margay's device are ever listed or
//! removed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};

use super::netlink::{Netlink, nl};
use super::ownership::{VXLAN_DEV, VXLAN_PORT, VXLAN_VNI};
use super::{Error, LocalVtep, Result};

/// One entry on the device: (is an FDB entry, MAC, address, the message).
type Entry = (bool, [u8; 6], Ipv4Addr, NeighbourMessage);

impl Netlink {
    /// The device's index, or an error naming what is missing.
    async fn vxlan_index(&self) -> Result<u32> {
        Self::link_index(&self.host, VXLAN_DEV)
            .await?
            .map(|(i, _)| i)
            .ok_or_else(|| Error::Missing(VXLAN_DEV.into()))
    }

    /// The VXLAN device, made or kept, up, with its address; its index.
    pub(super) async fn vxlan_device(&self, l: &LocalVtep) -> Result<u32> {
        let idx = match Self::link_index(&self.host, VXLAN_DEV).await? {
            Some((idx, _)) => idx,
            None => {
                let msg = rtnetlink::LinkVxlan::new(VXLAN_DEV, VXLAN_VNI)
                    .port(VXLAN_PORT)
                    .local(l.underlay)
                    .learning(false)
                    .mtu(l.mtu)
                    .address(l.mac.to_vec())
                    .build();
                self.host
                    .link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(nl(format!("create {VXLAN_DEV}")))?;
                self.vxlan_index().await?
            }
        };
        self.tunnel_up(VXLAN_DEV, idx, None, l.tunnel_ip).await?;
        Ok(idx)
    }

    async fn entries(&self, vx: u32) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let _dump = self.dumping().await;
        let mut list = self.host.neighbours().get().execute();
        while let Some(m) = list.try_next().await.map_err(nl("list neighbours"))? {
            if m.header.ifindex != vx {
                continue;
            }
            let (mut ip, mut mac) = (None, None);
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(*v4),
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        mac = <[u8; 6]>::try_from(l.as_slice()).ok();
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.push((m.header.family == AddressFamily::Bridge, mac, ip, m));
            }
        }
        Ok(out)
    }

    /// The device's neighbour entries (address → MAC) and FDB entries (MAC
    /// → node address).
    pub(super) async fn vxlan_entries(
        &self,
        vx: u32,
    ) -> Result<(BTreeMap<Ipv4Addr, [u8; 6]>, BTreeMap<[u8; 6], Ipv4Addr>)> {
        let (mut neigh, mut fdb) = (BTreeMap::new(), BTreeMap::new());
        for (is_fdb, mac, ip, _) in self.entries(vx).await? {
            if is_fdb {
                fdb.insert(mac, ip);
            } else {
                neigh.insert(ip, mac);
            }
        }
        Ok((neigh, fdb))
    }

    pub(super) async fn put_neigh(&self, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        let vx = self.vxlan_index().await?;
        self.host
            .neighbours()
            .add(vx, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("neighbour {ip} on {VXLAN_DEV}")))
    }

    pub(super) async fn put_fdb(&self, mac: [u8; 6], node: Ipv4Addr) -> Result<()> {
        let vx = self.vxlan_index().await?;
        self.host
            .neighbours()
            .add_bridge(vx, &mac)
            .destination(IpAddr::V4(node))
            .flags(NeighbourFlags::Own)
            .replace()
            .execute()
            .await
            .map_err(nl(format!(
                "fdb {} -> {node}",
                margay_api::stable::mac_string(&mac)
            )))
    }

    /// Deletes the device's entries that `pick` selects (as the kernel
    /// listed them, so the delete names exactly those).
    async fn delete_entries(&self, what: String, pick: impl Fn(&Entry) -> bool) -> Result<()> {
        let Some((vx, _)) = Self::link_index(&self.host, VXLAN_DEV).await? else {
            return Ok(());
        };
        for e in self.entries(vx).await?.into_iter().filter(|e| pick(e)) {
            self.host
                .neighbours()
                .del(e.3)
                .execute()
                .await
                .map_err(nl(what.clone()))?;
        }
        Ok(())
    }

    pub(super) async fn delete_neigh(&self, ip: Ipv4Addr) -> Result<()> {
        self.delete_entries(format!("delete neighbour {ip} on {VXLAN_DEV}"), |e| {
            !e.0 && e.2 == ip
        })
        .await
    }

    pub(super) async fn delete_fdb(&self, mac: [u8; 6]) -> Result<()> {
        let m = margay_api::stable::mac_string(&mac);
        self.delete_entries(format!("delete fdb {m} on {VXLAN_DEV}"), |e| {
            e.0 && e.1 == mac
        })
        .await
    }
}
