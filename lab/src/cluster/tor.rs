//! The top-of-rack router: its configuration (every node of the fabric a
//! dynamic eBGP neighbor), the daemon started in the fabric's namespace,
//! and the BGPPeer that points the nodes at it.

use margay_api::bgp::{BGPPeer, BGPPeerSpec};
use margay_harness::bgpd::{Bird, Frr, Gobgp};
use margay_harness::topo::{FABRIC_GW_V4, Fabric};

use super::TOR_ASN;
use crate::Tor;

/// The router (held for its destructor).
#[derive(Debug)]
#[allow(dead_code)]
pub enum Router {
    /// BIRD.
    Bird(Bird),
    /// FRR.
    Frr(Frr),
    /// GoBGP.
    Gobgp(Gobgp),
}

/// The router's configuration: every node of the fabric (any of its
/// subnets) is a dynamic eBGP neighbor. BIRD accepts any external AS (the cluster's may change)
/// and waits 1-5 s after a session error instead of its default 60-300 s,
/// which after a cluster AS change would keep the nodes out for minutes.
/// BIRD runs BFD (100 ms × 3) with every node whose BGPPeer asks for it
/// (`bfd`); for the others it is advisory and changes nothing. `graceful`:
/// BIRD 2 takes a BFD session's end as a failure even when the node said
/// AdminDown (an agent stopping for an upgrade; RFC 5882 §3.2 says it is
/// none, BIRD 3 agrees), so it must restart gracefully then, keeping the
/// node's routes, instead of dropping them.
fn tor_config(tor: Tor) -> String {
    match tor {
        Tor::Bird => format!(
            "log stderr all;\nrouter id 10.99.0.254;\nprotocol device {{}}\n\
             protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; merge paths on; }}\n\
             protocol bfd {{ interface \"*\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }}; }}\n\
             protocol bgp nodes {{\n  local 10.99.0.254 as {TOR_ASN};\n  neighbor range 10.99.0.0/16 external;\n  direct;\n  error wait time 1, 5;\n  hold time 9; keepalive time 3;\n  bfd graceful;\n  ipv4 {{ import all; export all; }};\n}}\n"
        ),
        Tor::Frr => format!(
            "frr defaults traditional\nhostname tor\nrouter bgp {TOR_ASN}\n bgp router-id 10.99.0.254\n no bgp ebgp-requires-policy\n neighbor nodes peer-group\n neighbor nodes remote-as 64512\n neighbor nodes timers 3 9\n bgp listen range 10.99.0.0/16 peer-group nodes\n!\n"
        ),
        Tor::Gobgp => format!(
            "[global.config]\n  as = {TOR_ASN}\n  router-id = \"10.99.0.254\"\n\
             [[peer-groups]]\n  [peer-groups.config]\n    peer-group-name = \"nodes\"\n    peer-as = 64512\n\
             [[dynamic-neighbors]]\n  [dynamic-neighbors.config]\n    prefix = \"10.99.0.0/16\"\n    peer-group = \"nodes\"\n"
        ),
        Tor::None => String::new(),
    }
}

/// Starts router `tor` in the fabric's namespace (none for [`Tor::None`]).
pub(crate) fn start(fabric: &Fabric, tor: Tor) -> anyhow::Result<Option<Router>> {
    let ns = fabric.ns();
    let conf = tor_config(tor);
    Ok(match tor {
        Tor::None => None,
        Tor::Bird => Some(Router::Bird(Bird::start(ns, &conf)?)),
        Tor::Frr => Some(Router::Frr(Frr::start(ns, &conf, true)?)),
        Tor::Gobgp => Some(Router::Gobgp(Gobgp::start(ns, &conf)?)),
    })
}

/// The BGPPeer `tor`: every node peers with the router at the fabric's
/// gateway, in [`TOR_ASN`], with hold time `hold_time` (the default if none).
pub(crate) fn peer(hold_time: Option<u16>) -> BGPPeer {
    BGPPeer::new(
        "tor",
        BGPPeerSpec {
            peer_ip: Some(FABRIC_GW_V4.to_string()),
            as_number: Some(TOR_ASN),
            hold_time_seconds: hold_time,
            ..Default::default()
        },
    )
}
