//! Throw-away topologies: "nodes" as namespaces on a shared L2 fabric.
//!
//! ```text
//!   node ns (eth0 10.99.0.N/24, fd00:99::N/64, default via .254)
//!       │ veth
//!   fabric ns: bridge br0 (10.99.0.254/24, fd00:99::fe/64), forwarding on
//! ```
//! The fabric namespace doubles as the top-of-rack router: a BGP daemon run
//! there reaches every node directly. Addresses exist only inside these
//! namespaces, so parallel fabrics can reuse them.
//!
//! Nodes know each other's (and the router's) MAC addresses as permanent
//! neighbour entries instead of learning them by ARP: the kernel's
//! neighbour table is shared by all namespaces, its size limit
//! (`gc_thresh3`, 1024 by default) is a root-namespace sysctl we must not
//! change, and a 50-node fabric would otherwise overflow it. Permanent
//! entries do not count against that limit.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;

use crate::Result;
use crate::netns::{Netns, veth};

/// IPv4 prefix of every fabric.
pub const FABRIC_V4: &str = "10.99.0.0/24";
/// The fabric router's IPv4 address (the nodes' default gateway).
pub const FABRIC_GW_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 254);
/// The fabric router's IPv6 address.
pub const FABRIC_GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0xfe);
/// How many nodes one fabric holds: a node's index is the last octet of
/// its address in its subnet's /24 (`.254` is the router, `.250`-`.253`
/// stay free), whatever the subnet.
pub const MAX_NODES: u32 = 249;

/// A bridged L2 segment living in its own namespace.
#[derive(Debug)]
pub struct Fabric {
    ns: Netns,
    next: Mutex<u32>,
    /// (namespace name, IPv4, IPv6, MAC) of every node so far.
    members: Mutex<Vec<(String, Ipv4Addr, Ipv6Addr, String)>>,
    gw_mac: String,
}

/// A node: a namespace with one uplink (`eth0`) on a [`Fabric`].
#[derive(Debug)]
pub struct Node {
    /// The node's namespace.
    pub ns: Netns,
    /// Its index on the fabric (1-based, at most [`MAX_NODES`]; also the
    /// last address octet).
    pub index: u32,
    /// Its IPv4 address on the fabric.
    pub v4: Ipv4Addr,
    /// Its IPv6 address on the fabric.
    pub v6: Ipv6Addr,
}

impl Fabric {
    /// Creates the fabric namespace and its bridge.
    pub fn new() -> Result<Self> {
        let ns = Netns::create("fab")?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{FABRIC_GW_V4}/24"), "dev", "br0"])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{FABRIC_GW_V6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        // Pin the bridge's MAC: otherwise it follows its ports' lowest MAC
        // and the nodes' permanent entries for the router go stale.
        let gw_mac = mac_of(&ns, "br0")?;
        ns.ip(&["link", "set", "br0", "address", &gw_mac])?;
        Ok(Self {
            ns,
            next: Mutex::new(1),
            members: Mutex::new(Vec::new()),
            gw_mac,
        })
    }

    /// The fabric (router) namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Adds a node: a new namespace with `eth0` bridged onto the fabric, an
    /// address, a default route via the fabric router, forwarding on.
    pub fn add_node(&self, hint: &str) -> Result<Node> {
        self.add_node_in(hint, 0)
    }

    /// Adds a node in IPv4 subnet `subnet` of the fabric
    /// (`10.99.<subnet>.0/24`, the router at `.254` of it): nodes of
    /// different subnets share the segment but reach each other only
    /// through the router, as racks do through their routers. Subnet 0 is
    /// [`FABRIC_V4`].
    pub fn add_node_in(&self, hint: &str, subnet: u8) -> Result<Node> {
        assert!(subnet < 250, "at most 250 subnets");
        let gw = Ipv4Addr::new(10, 99, subnet, 254);
        if subnet > 0 {
            let have = self.ns.ip(&["-4", "addr", "show", "dev", "br0"])?;
            if !have.contains(&format!("{gw}/24")) {
                self.ns
                    .ip(&["addr", "add", &format!("{gw}/24"), "dev", "br0"])?;
            }
        }
        let index = {
            let mut n = self.next.lock().expect("fabric counter");
            let i = *n;
            if i > MAX_NODES {
                return Err(crate::Error::Other(format!(
                    "a fabric holds at most {MAX_NODES} nodes (the last octet of 10.99.S.N/24)"
                )));
            }
            *n += 1;
            i
        };
        let octet = u8::try_from(index).expect("index <= MAX_NODES");
        let ns = Netns::create(hint)?;
        let port = format!("p{index}");
        veth(&ns, "eth0", &self.ns, &port)?;
        self.ns.ip(&["link", "set", &port, "master", "br0"])?;
        let v4 = Ipv4Addr::new(10, 99, subnet, octet);
        let v6 = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, u16::from(octet));
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["route", "add", "default", "via", &gw.to_string()])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &FABRIC_GW_V6.to_string(),
        ])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        self.add_neighbours(&ns, v4, v6, gw)?;
        Ok(Node { ns, index, v4, v6 })
    }
}

fn mac_of(ns: &Netns, dev: &str) -> Result<String> {
    let out = ns.ip(&["-j", "link", "show", dev])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| crate::Error::Other(format!("ip -j link: {e}")))?;
    v[0]["address"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| crate::Error::Other(format!("no MAC for {dev}")))
}

fn neigh_lines(ip4: Ipv4Addr, ip6: Ipv6Addr, mac: &str) -> String {
    format!(
        "neigh replace {ip4} lladdr {mac} dev eth0 nud permanent\n\
         neigh replace {ip6} lladdr {mac} dev eth0 nud permanent\n"
    )
}

fn ip_batch(ns: &Netns, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["-n", ns.name(), "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(crate::Error::Other(format!(
            "ip -batch in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

impl Fabric {
    /// Permanent neighbour entries between a new node and every existing
    /// one, and towards the router.
    fn add_neighbours(&self, ns: &Netns, v4: Ipv4Addr, v6: Ipv6Addr, gw: Ipv4Addr) -> Result<()> {
        let mac = mac_of(ns, "eth0")?;
        let mut members = self.members.lock().expect("fabric members");
        let mut mine = neigh_lines(gw, FABRIC_GW_V6, &self.gw_mac);
        for (other_ns, o4, o6, omac) in members.iter() {
            mine.push_str(&neigh_lines(*o4, *o6, omac));
            ip_batch(&Netns::borrowed(other_ns), &neigh_lines(v4, v6, &mac))?;
        }
        ip_batch(ns, &mine)?;
        // The router learns nodes by ARP: at most one entry per node.
        members.push((ns.name().to_owned(), v4, v6, mac));
        Ok(())
    }
}

impl Node {
    /// Kernel IPv4 routes of this node (`ip -4 route show`, one per line).
    pub fn routes_v4(&self) -> Result<String> {
        self.ns.ip(&["-4", "route", "show"])
    }
}
