//! Pod veths on the real kernel: the pair created with its peer directly
//! in the pod's namespace (no move afterwards), both sides wired
//! concurrently, rolled back on any failure; removal by the host side
//! (its peer and routes go with it); CHECK of what the pod side holds.
//! A pod namespace is opened and checked once ([`super::netns`], through
//! `Dataplane::pod_netns`) and that file wired into; an interface in the
//! way is replaced only when it is this attachment's. Node-wide settings
//! are not a pod's: the node's IPv6 forwarding is `Dataplane::forward_ipv6`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use super::netlink::{Netlink, is_errno, nl, sysctl};
use super::netns::pod_netns;
use super::ownership;
use super::routes::host_route;
use super::{Error, GATEWAY_V4, GATEWAY_V6, HOST_MAC, PodSpec, PodWiring, Result};

/// The pod's default route via `gw` (of its own family) out of `idx`.
fn default_via(gw: IpAddr, idx: u32) -> RouteMessage {
    let any = match gw {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(any, 0)
        .and_then(|b| b.gateway(gw))
        .expect("a default route and its gateway of one family")
        .output_interface(idx)
        .protocol(RouteProtocol::Boot)
        .build()
}

impl Netlink {
    /// The host side: sysctls, up, and the alias (from here on the kernel
    /// records whose interface, and addresses, this is); its index.
    async fn wire_host(&self, spec: &PodSpec) -> Result<u32> {
        let (host_idx, _) = Self::link_index(&self.host, &spec.host_if)
            .await?
            .ok_or_else(|| Error::Missing(format!("{} after its creation", spec.host_if)))?;
        let v6 = spec.addrs.iter().any(IpNetwork::is_ipv6);
        sysctl(&format!("net/ipv4/conf/{}/proxy_arp", spec.host_if), "1")?;
        sysctl(&format!("net/ipv4/neigh/{}/proxy_delay", spec.host_if), "0")?;
        // Strict reverse-path filtering (as Calico sets it): a packet must
        // come in where its source is routed. The policy table's source
        // check is what holds every attachment to its own addresses (and
        // covers IPv6, which has no rp_filter); this is the kernel's own
        // line of defence where the all/ setting does not loosen it.
        sysctl(&format!("net/ipv4/conf/{}/rp_filter", spec.host_if), "1")?;
        if v6 {
            // (The node's own IPv6 forwarding is not the pod's to set:
            // `Dataplane::forward_ipv6`.)
            sysctl(&format!("net/ipv6/conf/{}/disable_ipv6", spec.host_if), "0")?;
        }
        let mut up = LinkUnspec::new_with_index(host_idx).up().build();
        up.attributes
            .push(LinkAttribute::IfAlias(spec.alias.clone()));
        self.host
            .link()
            .set(up)
            .execute()
            .await
            .map_err(nl(format!("bring up {}", spec.host_if)))?;
        Ok(host_idx)
    }

    /// The pod side: up, addresses, gateway and default routes; its MAC.
    async fn wire_pod(spec: &PodSpec, netns: &std::fs::File) -> Result<Vec<u8>> {
        let (pod, _driver) = Self::handle_in(netns, &spec.netns).await?;
        let (pod_idx, pod_mac) = Self::link_index(&pod, &spec.ifname)
            .await?
            .ok_or_else(|| Error::Missing(format!("{} in the pod namespace", spec.ifname)))?;
        pod.link()
            .set(LinkUnspec::new_with_index(pod_idx).up().build())
            .execute()
            .await
            .map_err(nl("bring up the pod interface"))?;
        for a in &spec.addrs {
            pod.address()
                .add(pod_idx, a.ip(), a.prefix())
                .replace()
                .execute()
                .await
                .map_err(nl(format!("add {a} in the pod")))?;
            let routes = match a.ip() {
                IpAddr::V4(_) => vec![
                    (
                        "gateway route in the pod",
                        RouteMessageBuilder::<Ipv4Addr>::new()
                            .destination_prefix(GATEWAY_V4, 32)
                            .output_interface(pod_idx)
                            .scope(RouteScope::Link)
                            .protocol(RouteProtocol::Boot)
                            .build(),
                    ),
                    (
                        "default route in the pod",
                        default_via(IpAddr::V4(GATEWAY_V4), pod_idx),
                    ),
                ],
                IpAddr::V6(_) => vec![(
                    "IPv6 default route in the pod",
                    default_via(IpAddr::V6(GATEWAY_V6), pod_idx),
                )],
            };
            for (what, r) in routes {
                pod.route()
                    .add(r)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl(what))?;
            }
        }
        Ok(pod_mac)
    }

    async fn build(&self, spec: &PodSpec, netns: &std::fs::File) -> Result<PodWiring> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.ifname.clone())
            .mtu(spec.mtu)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(spec.host_if.clone())
            .mtu(spec.mtu)
            .address(HOST_MAC.to_vec())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.host
            .link()
            .add(veth)
            .execute()
            .await
            .map_err(nl(format!(
                "create veth {} / {}",
                spec.host_if, spec.ifname
            )))?;
        // The two sides are independent from here: wire them concurrently
        // (each step is a netlink round trip; the kernel serialises what it
        // must).
        let (host_idx, pod_mac) =
            futures::try_join!(self.wire_host(spec), Self::wire_pod(spec, netns))?;
        // Host routes to the pod.
        for a in &spec.addrs {
            self.put(host_route(a.ip(), host_idx), format!("host route to {a}"))
                .await?;
        }
        Ok(PodWiring {
            pod_mac: margay_api::stable::mac_string(&pod_mac),
        })
    }

    /// Wires the pod into `netns` (opened and checked from `spec.netns`
    /// by [`super::netns`], once).
    pub(super) async fn add_pod_links(
        &self,
        spec: &PodSpec,
        netns: &std::fs::File,
    ) -> Result<PodWiring> {
        // A retried ADD starts from scratch: an old pair in the way (the
        // create says it exists) goes first, then the create is retried;
        // but only when it is this attachment's (its alias records it, or
        // records nothing: an ADD that died before writing it).
        let res = match self.build(spec, netns).await {
            Err(Error::Netlink { ref source, .. }) if is_errno(source, libc::EEXIST) => {
                let owner = self
                    .host_pod(&spec.host_if)
                    .await?
                    .and_then(|p| ownership::alias_owner(&p.alias).map(str::to_string));
                if let Some(owner) = owner.filter(|o| *o != spec.owner) {
                    // Not ours: nothing of it is touched, not even by the
                    // roll-back below.
                    return Err(Error::Taken {
                        host_if: spec.host_if.clone(),
                        owner,
                    });
                }
                self.del_link(&spec.host_if).await?;
                self.build(spec, netns).await
            }
            r => r,
        };
        if res.is_err() {
            // Roll back: deleting the host side deletes the peer and every
            // route through it.
            if let Err(e2) = self.del_link(&spec.host_if).await {
                tracing::warn!(host_if = %spec.host_if, "rollback failed: {e2}");
            }
        }
        res
    }

    /// Deletes a link by name; success when it is already gone.
    pub(super) async fn del_link(&self, name: &str) -> Result<()> {
        let Some((idx, _)) = Self::link_index(&self.host, name).await? else {
            return Ok(());
        };
        match self.host.link().del(idx).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            Err(e) => Err(nl(format!("delete {name}"))(e)),
        }
    }

    pub(super) async fn check_pod_links(&self, spec: &PodSpec) -> Result<()> {
        let Some(host) = self.host_pod(&spec.host_if).await? else {
            return Err(Error::Missing(format!("host interface {}", spec.host_if)));
        };
        match ownership::alias_owner(&host.alias) {
            Some(o) if o == spec.owner => {}
            other => {
                return Err(Error::Taken {
                    host_if: spec.host_if.clone(),
                    owner: other.unwrap_or("nobody (no Margay alias)").to_string(),
                });
            }
        }
        let netns = pod_netns(&spec.netns)?;
        let (pod, _driver) = Self::handle_in(&netns, &spec.netns).await?;
        let Some((idx, _)) = Self::link_index(&pod, &spec.ifname).await? else {
            return Err(Error::Missing(format!(
                "{} in {}",
                spec.ifname,
                spec.netns.display()
            )));
        };
        let mut have = Vec::new();
        let mut addrs = pod.address().get().set_link_index_filter(idx).execute();
        while let Some(msg) = addrs.try_next().await.map_err(nl("list pod addresses"))? {
            for a in msg.attributes {
                if let rtnetlink::packet_route::address::AddressAttribute::Address(ip) = a {
                    have.push(ip);
                }
            }
        }
        for a in &spec.addrs {
            if !have.contains(&a.ip()) {
                return Err(Error::Wrong(format!("{} lacks {a}", spec.ifname)));
            }
        }
        Ok(())
    }
}
