//! `tunl0` on the real kernel, Calico's IPIP mode: the ipip module's
//! fallback device receives every IP-in-IP packet no other tunnel claims,
//! and sends through the next hop of the route that chose it, so routes
//! `block via <node> dev tunl0 onlink` (`super::routes`) are the whole
//! configuration. Margay brings it up with MTU underlay − 20 and puts this
//! node's tunnel address on it as a /32 (the source of what the node itself
//! sends through the tunnel). The device belongs to the kernel and is
//! never deleted; retiring IPIP removes Margay's address and brings it down
//! when no other address is left on it.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkFlags, LinkMessage};
use rtnetlink::{LinkIpIp, LinkUnspec};

use super::netlink::{Netlink, is_errno, nl};
use super::ownership::IPIP_DEV;
use super::{Error, LocalIpip, Result};

/// Where this kernel's ipip module would be, and why IPIP is missing, for
/// the Node condition: the kernel release and what `/lib/modules` holds.
fn why_no_ipip() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "(unknown release)".into());
    let dir = format!("/lib/modules/{release}");
    let module = ["", ".xz", ".zst", ".gz"]
        .iter()
        .map(|ext| format!("{dir}/kernel/net/ipv4/ipip.ko{ext}"))
        .find(|p| std::path::Path::new(p).exists());
    match module {
        Some(p) => format!(
            "kernel {release} has the ipip module ({p}) but it could not be loaded from here"
        ),
        None if std::path::Path::new(&dir).is_dir() => format!(
            "kernel {release} has no ipip module (CONFIG_NET_IPIP is not set: none in {dir}/kernel/net/ipv4)"
        ),
        None => format!(
            "kernel {release} has no ipip module loaded, and {dir} is not visible to the agent to tell whether it has one"
        ),
    }
}

impl Netlink {
    /// `tunl0`'s link message, when it exists.
    async fn tunl0(&self) -> Result<Option<LinkMessage>> {
        let mut links = self
            .host
            .link()
            .get()
            .match_name(IPIP_DEV.to_string())
            .execute();
        match links.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(nl(format!("look up {IPIP_DEV}"))(e)),
        }
    }

    /// `tunl0`'s index and whether it is up, when it exists.
    pub(super) async fn tunl0_state(&self) -> Result<Option<(u32, bool)>> {
        Ok(self
            .tunl0()
            .await?
            .map(|m| (m.header.index, m.header.flags.contains(LinkFlags::Up))))
    }

    /// `tunl0` as `l` says: made when missing (the kernel loads its ipip
    /// module for the request, which itself makes `tunl0` in every
    /// namespace), up, its MTU, the tunnel address.
    pub(super) async fn ipip_device(&self, l: &LocalIpip) -> Result<()> {
        let idx = match self.tunl0().await? {
            Some(m) => m.header.index,
            None => {
                match self
                    .host
                    .link()
                    .add(LinkIpIp::new(IPIP_DEV).build())
                    .execute()
                    .await
                {
                    // Made by us, or by the module the request loaded.
                    Ok(()) => {}
                    Err(e) if is_errno(&e, libc::EEXIST) => {}
                    Err(e) if is_errno(&e, libc::EOPNOTSUPP) => {
                        return Err(Error::IpipUnavailable(why_no_ipip()));
                    }
                    Err(e) => return Err(nl(format!("create {IPIP_DEV}"))(e)),
                }
                self.tunl0()
                    .await?
                    .ok_or_else(|| Error::Missing(IPIP_DEV.into()))?
                    .header
                    .index
            }
        };
        self.tunnel_up(IPIP_DEV, idx, Some(l.mtu), l.tunnel_ip)
            .await
    }

    /// `tunl0`'s IPv4 addresses, as the kernel lists them.
    async fn tunl0_addresses(&self, idx: u32) -> Result<Vec<(Ipv4Addr, AddressMessage)>> {
        let _dump = self.dumping().await;
        let mut list = self
            .host
            .address()
            .get()
            .set_link_index_filter(idx)
            .execute();
        let mut out = Vec::new();
        while let Some(m) = list
            .try_next()
            .await
            .map_err(nl(format!("list {IPIP_DEV}'s addresses")))?
        {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(v4))
                | AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
                _ => None,
            });
            if let Some(ip) = ip
                && m.header.index == idx
            {
                out.push((ip, m));
            }
        }
        Ok(out)
    }

    /// Removes `ip` from `tunl0`; brings `tunl0` down when no address is
    /// left on it. Nothing to do is success.
    pub(super) async fn retire_tunl0(&self, ip: Option<Ipv4Addr>) -> Result<()> {
        let Some((idx, up)) = self.tunl0_state().await? else {
            return Ok(());
        };
        let mut left = Vec::new();
        for (a, msg) in self.tunl0_addresses(idx).await? {
            if Some(a) != ip {
                left.push(a);
                continue;
            }
            match self.host.address().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(nl(format!("remove {a} from {IPIP_DEV}"))(e)),
            }
        }
        if up && left.is_empty() {
            self.host
                .link()
                .set(LinkUnspec::new_with_index(idx).down().build())
                .execute()
                .await
                .map_err(nl(format!("bring {IPIP_DEV} down")))?;
        }
        Ok(())
    }
}
