//! An in-memory [`Dataplane`] for unit tests, with failure injection
//! (felix's fake netlink is the model): a listing that fails, a write of
//! one route or blackhole that the "kernel" refuses, a VXLAN device that
//! cannot be made, a kernel without IPIP, the next pod ADD failing, a tunnel
//! filter that cannot be loaded.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use ipnetwork::IpNetwork;

use super::{
    Dataplane, Error, HostPod, LocalIpip, LocalVtep, PerTunnel, PodSpec, PodWiring, Remote,
    RemoteActual, Result, TunnelFilter, Via,
};

/// A failure the fake injects until it is cleared.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// Every listing fails (a refused netlink dump).
    Lists,
    /// Writing (or removing) the route to this remote block fails.
    RemoteRoute(IpNetwork),
    /// Writing (or removing) this blackhole fails.
    Blackhole(IpNetwork),
    /// The VXLAN device cannot be made.
    Vxlan,
    /// The kernel has no IPIP.
    Ipip,
    /// The tunnel filter cannot be loaded (`nft` refuses it).
    TunnelFilter,
}

/// The fake kernel's remote-block state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeRemote {
    /// Routes, neighbour and FDB entries.
    pub state: Remote,
    /// The VXLAN device, when it exists.
    pub vxlan: Option<LocalVtep>,
    /// `tunl0` (up, with Margay's address), when Margay brought it up.
    pub ipip: Option<LocalIpip>,
}

/// An in-memory dataplane.
#[derive(Debug, Clone, Default)]
pub struct FakeDataplane {
    /// host_if -> spec of the pods that exist.
    pub pods: Arc<Mutex<BTreeMap<String, PodSpec>>>,
    /// host_if -> index.
    pub indexes: Arc<Mutex<BTreeMap<String, u32>>>,
    /// Pod host routes: address -> index.
    pub pod_routes: Arc<Mutex<BTreeMap<IpAddr, u32>>>,
    /// Fail the next `add_pod` with this message.
    pub fail_next_add: Arc<Mutex<Option<String>>>,
    /// Blackhole routes.
    pub blackholes: Arc<Mutex<BTreeSet<IpNetwork>>>,
    /// Remote-block routes and the VXLAN device.
    pub remote: Arc<Mutex<FakeRemote>>,
    /// The host's addresses.
    pub host: Arc<Mutex<Vec<(String, IpNetwork)>>>,
    /// Injected failures.
    pub faults: Arc<Mutex<BTreeSet<Fault>>>,
    /// Remote-block writes carried out (sets and removals).
    pub remote_writes: Arc<Mutex<usize>>,
    /// Namespace paths [`Dataplane::pod_netns`] refuses.
    pub refused_netns: Arc<Mutex<BTreeSet<std::path::PathBuf>>>,
    /// `add_pod` waits while a test holds this.
    pub add_hold: Arc<tokio::sync::Mutex<()>>,
    /// The tunnel filter table, when it exists.
    pub tunnel_filter: Arc<Mutex<Option<TunnelFilter>>>,
    /// How many times the tunnel filter was loaded.
    pub filter_loads: Arc<Mutex<usize>>,
}

impl FakeDataplane {
    /// Injects `f` until [`FakeDataplane::clear`].
    pub fn inject(&self, f: Fault) {
        self.faults.lock().expect("faults").insert(f);
    }

    /// Removes every injected failure.
    pub fn clear(&self) {
        self.faults.lock().expect("faults").clear();
    }

    fn fails(&self, f: &Fault) -> Result<()> {
        if self.faults.lock().expect("faults").contains(f) {
            return Err(Error::Injected(format!("{f:?}")));
        }
        Ok(())
    }

    fn listing(&self) -> Result<()> {
        self.fails(&Fault::Lists)
    }

    fn remote_write(&self, net: IpNetwork) -> Result<std::sync::MutexGuard<'_, FakeRemote>> {
        self.fails(&Fault::RemoteRoute(net))?;
        *self.remote_writes.lock().expect("writes") += 1;
        Ok(self.remote.lock().expect("remote"))
    }

    /// The remote-block routes now.
    pub fn remote_routes(&self) -> BTreeMap<IpNetwork, Via> {
        self.remote.lock().expect("remote").state.routes.clone()
    }

    /// How the kernel would show the host side of the pod `s`.
    fn host_pod(&self, s: &PodSpec) -> HostPod {
        HostPod {
            host_if: s.host_if.clone(),
            index: self
                .indexes
                .lock()
                .expect("lock")
                .get(&s.host_if)
                .copied()
                .unwrap_or(0),
            alias: s.alias.clone(),
        }
    }
}

impl Dataplane for FakeDataplane {
    /// The path, checked.
    type Netns = std::path::PathBuf;

    async fn add_pod_in(&self, spec: &PodSpec, _: &std::path::PathBuf) -> Result<PodWiring> {
        drop(self.add_hold.lock().await);
        if let Some(msg) = self.fail_next_add.lock().expect("lock").take() {
            return Err(Error::Injected(msg));
        }
        if let Some(other) = self.pods.lock().expect("lock").get(&spec.host_if)
            && other.owner != spec.owner
        {
            return Err(Error::Taken {
                host_if: spec.host_if.clone(),
                owner: other.owner.clone(),
            });
        }
        let mut idx = self.indexes.lock().expect("lock");
        let next = idx.values().max().copied().unwrap_or(100) + 1;
        let index = *idx.entry(spec.host_if.clone()).or_insert(next);
        for a in &spec.addrs {
            self.pod_routes.lock().expect("lock").insert(a.ip(), index);
        }
        self.pods
            .lock()
            .expect("lock")
            .insert(spec.host_if.clone(), spec.clone());
        Ok(PodWiring {
            pod_mac: "02:00:00:00:00:01".into(),
        })
    }

    async fn del_pod(&self, host_if: &str) -> Result<()> {
        self.pods.lock().expect("lock").remove(host_if);
        if let Some(i) = self.indexes.lock().expect("lock").remove(host_if) {
            self.pod_routes.lock().expect("lock").retain(|_, o| *o != i);
        }
        Ok(())
    }

    async fn check_pod(&self, spec: &PodSpec) -> Result<()> {
        match self.pods.lock().expect("lock").get(&spec.host_if) {
            Some(s) if s.owner != spec.owner => Err(Error::Taken {
                host_if: spec.host_if.clone(),
                owner: s.owner.clone(),
            }),
            Some(s) if s == spec => Ok(()),
            Some(_) => Err(Error::Wrong("wiring differs".into())),
            None => Err(Error::Missing(spec.host_if.clone())),
        }
    }

    async fn list_pods(&self) -> Result<Vec<HostPod>> {
        self.listing()?;
        let pods = self.pods.lock().expect("lock").clone();
        Ok(pods.values().map(|s| self.host_pod(s)).collect())
    }

    async fn pod_link(&self, host_if: &str) -> Result<Option<HostPod>> {
        let spec = self.pods.lock().expect("lock").get(host_if).cloned();
        Ok(spec.map(|s| self.host_pod(&s)))
    }

    /// Any path that exists, except those in `refused_netns`.
    async fn forward_ipv6(&self) -> Result<()> {
        Ok(())
    }

    async fn pod_netns(&self, path: &std::path::Path) -> Result<std::path::PathBuf> {
        if self.refused_netns.lock().expect("lock").contains(path) {
            return Err(Error::NotPodNetns {
                path: path.display().to_string(),
                why: "refused by the test".into(),
            });
        }
        if !path.exists() {
            return Err(Error::Netns {
                path: path.display().to_string(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(path.to_path_buf())
    }

    async fn list_pod_routes(&self) -> Result<BTreeMap<IpAddr, u32>> {
        self.listing()?;
        Ok(self.pod_routes.lock().expect("lock").clone())
    }

    async fn set_pod_route(&self, ip: IpAddr, index: u32) -> Result<()> {
        self.pod_routes.lock().expect("lock").insert(ip, index);
        Ok(())
    }

    async fn del_pod_route(&self, ip: IpAddr) -> Result<()> {
        self.pod_routes.lock().expect("lock").remove(&ip);
        Ok(())
    }

    async fn list_blackholes(&self) -> Result<BTreeSet<IpNetwork>> {
        self.listing()?;
        Ok(self.blackholes.lock().expect("lock").clone())
    }

    async fn set_blackhole(&self, net: IpNetwork, present: bool) -> Result<()> {
        self.fails(&Fault::Blackhole(net))?;
        let mut b = self.blackholes.lock().expect("lock");
        if present {
            b.insert(net);
        } else {
            b.remove(&net);
        }
        Ok(())
    }

    async fn list_remote(&self) -> Result<RemoteActual> {
        self.listing()?;
        let r = self.remote.lock().expect("remote");
        Ok(RemoteActual {
            state: r.state.clone(),
            odd: BTreeSet::new(),
            devices: PerTunnel {
                vxlan: r.vxlan.is_some(),
                ipip: r.ipip.is_some(),
            },
        })
    }

    async fn set_remote_route(&self, net: IpNetwork, via: Via) -> Result<()> {
        let mut r = self.remote_write(net)?;
        if matches!(via, Via::Vxlan(_)) && r.vxlan.is_none() {
            return Err(Error::Unroutable(net, "the VXLAN device does not exist"));
        }
        if matches!(via, Via::Ipip(_)) && r.ipip.is_none() {
            return Err(Error::Unroutable(net, "tunl0 is not up"));
        }
        r.state.routes.insert(net, via);
        Ok(())
    }

    async fn del_remote_route(&self, net: IpNetwork) -> Result<()> {
        self.remote_write(net)?.state.routes.remove(&net);
        Ok(())
    }

    async fn ensure_vxlan(&self, local: &LocalVtep) -> Result<()> {
        self.fails(&Fault::Vxlan)?;
        self.remote.lock().expect("remote").vxlan = Some(*local);
        Ok(())
    }

    async fn del_vxlan(&self) -> Result<()> {
        let mut r = self.remote.lock().expect("remote");
        r.vxlan = None;
        r.state.neigh.clear();
        r.state.fdb.clear();
        r.state.routes.retain(|_, v| !matches!(v, Via::Vxlan(_)));
        Ok(())
    }

    async fn ensure_ipip(&self, local: &LocalIpip) -> Result<()> {
        if self.fails(&Fault::Ipip).is_err() {
            return Err(Error::IpipUnavailable(
                "kernel fake has no ipip module".into(),
            ));
        }
        self.remote.lock().expect("remote").ipip = Some(*local);
        Ok(())
    }

    async fn retire_ipip(&self, ip: Option<Ipv4Addr>) -> Result<()> {
        let mut r = self.remote.lock().expect("remote");
        if r.ipip.is_some_and(|l| Some(l.tunnel_ip) == ip) {
            // Down: the kernel drops the routes through it.
            r.ipip = None;
            r.state.routes.retain(|_, v| !matches!(v, Via::Ipip(_)));
        }
        Ok(())
    }

    async fn set_neigh(&self, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        self.remote
            .lock()
            .expect("remote")
            .state
            .neigh
            .insert(ip, mac);
        Ok(())
    }

    async fn del_neigh(&self, ip: Ipv4Addr) -> Result<()> {
        self.remote.lock().expect("remote").state.neigh.remove(&ip);
        Ok(())
    }

    async fn set_fdb(&self, mac: [u8; 6], node: Ipv4Addr) -> Result<()> {
        self.remote
            .lock()
            .expect("remote")
            .state
            .fdb
            .insert(mac, node);
        Ok(())
    }

    async fn del_fdb(&self, mac: [u8; 6]) -> Result<()> {
        self.remote.lock().expect("remote").state.fdb.remove(&mac);
        Ok(())
    }

    async fn tunnel_filter(&self) -> Result<Option<TunnelFilter>> {
        self.listing()?;
        Ok(self.tunnel_filter.lock().expect("filter").clone())
    }

    async fn load_tunnel_filter(&self, f: &TunnelFilter) -> Result<()> {
        self.fails(&Fault::TunnelFilter)?;
        *self.tunnel_filter.lock().expect("filter") = Some(f.clone());
        *self.filter_loads.lock().expect("loads") += 1;
        Ok(())
    }

    async fn host_addresses(&self) -> Result<Vec<(String, IpNetwork)>> {
        self.listing()?;
        Ok(self.host.lock().expect("host").clone())
    }
}
