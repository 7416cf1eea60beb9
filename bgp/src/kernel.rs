//! Best routes into the kernel over rtnetlink.
//!
//! Routes carry Margay's BGP route protocol number ([`RTPROT_MARGAY_BGP`]),
//! which is how we know which routes are ours: nothing else is ever
//! changed or deleted. Writes are pipelined: a batch is sent as many
//! concurrent requests on one socket ([`CONCURRENCY`] in flight), so 100k
//! routes cost 100k messages but not 100k sequential round trips.

use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder, RouteNextHopBuilder};

use crate::packet::Prefix;
use crate::{Error, Result};

/// Route protocol number of routes Margay's BGP speaker installs.
pub const RTPROT_MARGAY_BGP: u8 = 77;
/// Requests in flight at once.
pub const CONCURRENCY: usize = 256;

/// One desired change: next hops to install (ECMP when several), or `None`
/// to remove the route.
pub type FibOp = (Prefix, Option<Vec<IpAddr>>);

/// A handle on the kernel routing table of the current network namespace.
#[derive(Debug, Clone)]
pub struct Fib {
    handle: Handle,
}

impl Fib {
    /// Opens a netlink socket in the calling thread's namespace.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::Netlink(e.to_string()))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    fn message(prefix: &Prefix, hops: &[IpAddr]) -> Result<RouteMessage> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(prefix.addr(), prefix.len())
            .map_err(|e| Error::Netlink(e.to_string()))?
            .protocol(RouteProtocol::Other(RTPROT_MARGAY_BGP))
            .scope(RouteScope::Universe)
            .kind(RouteType::Unicast);
        match hops {
            [] => {}
            [one] => {
                b = b.gateway(*one).map_err(|e| Error::Netlink(e.to_string()))?;
            }
            many => {
                let mut nhs = Vec::with_capacity(many.len());
                for h in many {
                    let nb = if h.is_ipv4() {
                        RouteNextHopBuilder::new_ipv4()
                    } else {
                        RouteNextHopBuilder::new_ipv6()
                    };
                    nhs.push(
                        nb.via(*h)
                            .map_err(|e| Error::Netlink(e.to_string()))?
                            .build(),
                    );
                }
                b = b.multipath(nhs);
            }
        }
        Ok(b.build())
    }

    /// Applies a batch; returns how many operations failed (each is logged).
    pub async fn apply(&self, batch: Vec<FibOp>) -> usize {
        let handle = &self.handle;
        futures::stream::iter(batch)
            .map(|(prefix, hops)| async move {
                let r = match &hops {
                    Some(h) => match Self::message(&prefix, h) {
                        Ok(m) => handle
                            .route()
                            .add(m)
                            .replace()
                            .execute()
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    None => match Self::message(&prefix, &[]) {
                        Ok(m) => match handle.route().del(m).execute().await {
                            // Already gone is what we wanted.
                            Err(rtnetlink::Error::NetlinkError(e))
                                if e.raw_code() == -libc::ESRCH =>
                            {
                                Ok(())
                            }
                            r => r.map_err(|e| e.to_string()),
                        },
                        Err(e) => Err(e.to_string()),
                    },
                };
                if let Err(e) = &r {
                    tracing::warn!(%prefix, ?hops, "kernel route update failed: {e}");
                }
                r.is_err()
            })
            .buffer_unordered(CONCURRENCY)
            .filter(|failed| futures::future::ready(*failed))
            .count()
            .await
    }

    /// Prefixes of the routes we own in the main table (both families).
    pub async fn list_own(&self) -> Result<Vec<Prefix>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let mut s = self.handle.route().get(msg).execute();
            while let Some(r) = s
                .try_next()
                .await
                .map_err(|e| Error::Netlink(e.to_string()))?
            {
                if r.header.protocol != RouteProtocol::Other(RTPROT_MARGAY_BGP) {
                    continue;
                }
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                    _ => None,
                });
                if let Some(p) =
                    dst.and_then(|a| Prefix::new(a, r.header.destination_prefix_length))
                {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }
}
