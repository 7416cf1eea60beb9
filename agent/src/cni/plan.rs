//! The CNI ADD as a plan (pure): from what is read first (the request,
//! its attachment, the addresses the reserve gave, whether policy is
//! enforced; the pools, for the MTU) to the steps the ADD takes, in
//! order: the endpoint the NetworkPolicy engine is told of before the
//! pod is wired (its rules made while it is) and waited for; the node's
//! IPv6 forwarding, for a pod with an IPv6 address; the pod's wiring;
//! then the CNI result. `CniService::add` reads the inputs and applies
//! the plan (the executor: I/O, rollback on failure).

use std::path::PathBuf;

use ipnetwork::IpNetwork;
use margay_api::ipam::{IPPool, PodRef};
use margay_ipam::model::validate_pools;
use margay_proto::cni;

use super::{Wired, alias};
use crate::dataplane::{self, GATEWAY_V4, HOST_MAC, PodSpec};
use crate::netpol::Endpoint;

/// What an ADD does once its inputs are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AddPlan {
    /// The attachment's handle and host interface.
    pub wired: Wired,
    /// Its Pod, as the runtime named it.
    pub pod: Option<PodRef>,
    /// The addresses the reserve gave.
    pub addrs: Vec<IpNetwork>,
    /// Step 1: told to the NetworkPolicy engine before the pod is wired
    /// (every attachment is a workload interface, its sources checked;
    /// one of a Pod gets its Pod's policies); the ADD answers once its
    /// rules are loaded (`None`: policy is not enforced).
    pub endpoint: Option<Endpoint>,
    /// Step 2: the node forwards IPv6 (the pod has an IPv6 address).
    pub forward_ipv6: bool,
    /// The pod's namespace (its path) and interface, from the request.
    netns: String,
    ifname: String,
}

impl AddPlan {
    /// The plan for request `r` wired as `wired`, its Pod `pod`, with
    /// addresses `addrs`; `policy`: whether NetworkPolicy is enforced.
    pub(super) fn new(
        r: &cni::CniRequest,
        wired: Wired,
        pod: Option<PodRef>,
        addrs: Vec<IpNetwork>,
        policy: bool,
    ) -> Self {
        let endpoint = policy.then(|| Endpoint {
            host_if: wired.host_if.clone(),
            pod: pod
                .as_ref()
                .filter(|p| !p.name.is_empty())
                .map(|p| margay_policy::PodKey::new(&p.namespace, &p.name)),
            ips: addrs.iter().map(IpNetwork::ip).collect(),
        });
        Self {
            forward_ipv6: addrs.iter().any(IpNetwork::is_ipv6),
            endpoint,
            wired,
            pod,
            addrs,
            netns: r.netns.clone(),
            ifname: r.ifname.clone(),
        }
    }

    /// Step 3: the pod's wiring, with MTU `mtu` ([`mtu`]).
    pub(super) fn spec(&self, mtu: u32) -> PodSpec {
        spec(
            &self.netns,
            &self.ifname,
            &self.wired,
            self.pod.as_ref(),
            self.addrs.clone(),
            mtu,
        )
    }

    /// The CNI result of the pod wired as `spec`, its side's MAC
    /// `pod_mac`: both interfaces, each address with its gateway, and a
    /// default route per family.
    pub(super) fn result(&self, spec: &PodSpec, pod_mac: String) -> cni::CniResult {
        let mut routes = Vec::new();
        let mut ips = Vec::new();
        for a in &self.addrs {
            let (gw, dst) = match a {
                IpNetwork::V4(_) => (GATEWAY_V4.to_string(), "0.0.0.0/0"),
                IpNetwork::V6(_) => (dataplane::GATEWAY_V6.to_string(), "::/0"),
            };
            ips.push(cni::IpConfig {
                address: a.to_string(),
                gateway: gw.clone(),
                interface: 1,
            });
            routes.push(cni::Route {
                dst: dst.to_string(),
                gw,
            });
        }
        cni::CniResult {
            interfaces: vec![
                cni::Interface {
                    name: spec.host_if.clone(),
                    mac: margay_api::stable::mac_string(&HOST_MAC),
                    sandbox: String::new(),
                    mtu: spec.mtu,
                },
                cni::Interface {
                    name: self.ifname.clone(),
                    mac: pod_mac,
                    sandbox: self.netns.clone(),
                    mtu: spec.mtu,
                },
            ],
            ips,
            routes,
        }
    }
}

/// What to wire for request `r` as `w`, with `addrs` and MTU `mtu` (ADD
/// and CHECK alike).
pub(super) fn pod_spec(r: &cni::CniRequest, w: &Wired, addrs: Vec<IpNetwork>, mtu: u32) -> PodSpec {
    let pod = super::pod_of(r);
    spec(&r.netns, &r.ifname, w, pod.as_ref(), addrs, mtu)
}

fn spec(
    netns: &str,
    ifname: &str,
    w: &Wired,
    pod: Option<&PodRef>,
    addrs: Vec<IpNetwork>,
    mtu: u32,
) -> PodSpec {
    PodSpec {
        netns: PathBuf::from(netns),
        ifname: ifname.to_string(),
        host_if: w.host_if.clone(),
        alias: alias::alias(&w.handle, &addrs, pod),
        owner: w.handle.clone(),
        addrs,
        mtu,
    }
}

/// The pod MTU when the request gives none: the agent's (`agent`) minus
/// the overhead of the encapsulation of the pools the addresses come
/// from (the smallest), or the agent's when no pools are known.
pub(super) fn mtu(agent: u32, pools: Option<&[IPPool]>, addrs: &[IpNetwork]) -> u32 {
    let Some(pools) = pools else {
        return agent;
    };
    let (valid, _) = validate_pools(pools);
    addrs
        .iter()
        .filter_map(|a| valid.iter().find(|p| p.cidr.contains(a.ip())))
        .map(|p| dataplane::pod_mtu(agent, p.encapsulation))
        .min()
        .unwrap_or(agent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn req(pod: Option<&str>) -> cni::CniRequest {
        cni::CniRequest {
            container_id: "c1".into(),
            netns: "/var/run/netns/p".into(),
            ifname: "eth0".into(),
            network: "k8s-pod-network".into(),
            pod: pod.map(|name| cni::PodRef {
                namespace: "x".into(),
                name: name.into(),
                uid: "u".into(),
            }),
            ..Default::default()
        }
    }

    fn wired() -> Wired {
        Wired {
            handle: "k8s-pod-network.c1.eth0".into(),
            host_if: "cali0123456789a".into(),
        }
    }

    #[test]
    fn a_dual_stack_pod_is_told_forwards_ipv6_and_answers_both_families() {
        let r = req(Some("a"));
        let addrs = vec![net("10.0.0.5/32"), net("fd00::5/128")];
        let plan = AddPlan::new(&r, wired(), super::super::pod_of(&r), addrs, true);
        assert!(plan.forward_ipv6);
        let ep = plan.endpoint.clone().unwrap();
        assert_eq!(ep.host_if, "cali0123456789a");
        assert_eq!(ep.pod, Some(margay_policy::PodKey::new("x", "a")));
        assert_eq!(
            ep.ips,
            [
                "10.0.0.5".parse::<std::net::IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let spec = plan.spec(1450);
        assert_eq!(spec, pod_spec(&r, &wired(), plan.addrs.clone(), 1450));
        assert_eq!(spec.owner, "k8s-pod-network.c1.eth0");
        let res = plan.result(&spec, "02:00:00:00:00:01".into());
        assert_eq!(res.interfaces.len(), 2);
        assert_eq!(res.interfaces[0].mac, "ee:ee:ee:ee:ee:ee");
        assert_eq!(res.interfaces[1].sandbox, "/var/run/netns/p");
        assert_eq!(res.interfaces[1].mtu, 1450);
        let gw: Vec<(&str, &str)> = res
            .routes
            .iter()
            .map(|r| (r.dst.as_str(), r.gw.as_str()))
            .collect();
        assert_eq!(
            gw,
            [
                ("0.0.0.0/0", "169.254.1.1"),
                ("::/0", "fe80::ecee:eeff:feee:eeee")
            ]
        );
        assert_eq!(res.ips[1].address, "fd00::5/128");
    }

    #[test]
    fn without_policy_nothing_is_told_and_a_nameless_pod_is_no_pod() {
        let r = req(None);
        let plan = AddPlan::new(&r, wired(), None, vec![net("10.0.0.5/32")], false);
        assert_eq!(plan.endpoint, None);
        assert!(!plan.forward_ipv6);
        let r = req(Some(""));
        let pod = super::super::pod_of(&r);
        let plan = AddPlan::new(&r, wired(), pod, vec![net("10.0.0.5/32")], true);
        assert_eq!(plan.endpoint.unwrap().pod, None);
    }

    #[test]
    fn the_mtu_is_the_agents_without_pools() {
        assert_eq!(mtu(1500, None, &[net("10.0.0.5/32")]), 1500);
        assert_eq!(mtu(1500, Some(&[]), &[net("10.0.0.5/32")]), 1500);
    }
}
