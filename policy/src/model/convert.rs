//! The world's types from the Kubernetes objects, with the API's
//! defaults applied and its refusals kept: pods (their addresses and
//! named ports), namespaces (their name label), NetworkPolicies (their
//! policyTypes, rules, ipBlocks and ports).

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    Key, NAME_LABEL, NamedPort, Namespace, Peer, Pod, PodKey, Policy, PolicyKey, PortMatch, Proto,
    Rule,
};
use crate::cidr::Cidr;
use crate::selector::Selector;
use crate::{Error, Result};

impl Pod {
    /// From the Kubernetes object; `None` for a pod that has no part in
    /// policy (host network, no address yet, finished).
    pub fn from_k8s(p: &core::Pod) -> Option<(PodKey, Self)> {
        Self::from_k8s_unaddressed(p).filter(|(_, pod)| !pod.ips.is_empty())
    }

    /// As [`Pod::from_k8s`], but a pod with no address yet is kept (with
    /// none): the agent must know a pod's labels before the kubelet
    /// reports its address, to enforce from its first packet.
    pub fn from_k8s_unaddressed(p: &core::Pod) -> Option<(PodKey, Self)> {
        let key = Key::new(
            p.metadata.namespace.as_deref()?,
            p.metadata.name.as_deref()?,
        );
        let spec = p.spec.as_ref()?;
        if spec.host_network == Some(true) {
            return None;
        }
        let st = p.status.as_ref();
        if matches!(
            st.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return None;
        }
        let mut ips: Vec<IpAddr> = st
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|a| a.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = st
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|s| s.parse().ok())
        {
            ips.push(ip);
        }
        let ports = named_ports(spec);
        Some((
            key,
            Self {
                labels: std::sync::Arc::new(p.metadata.labels.clone().unwrap_or_default()),
                ips,
                node: spec.node_name.as_deref().map(Arc::from),
                ports: ports.into(),
            },
        ))
    }
}

/// The named ports of a pod's containers.
pub fn named_ports(spec: &core::PodSpec) -> Vec<NamedPort> {
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone()?,
                proto: Proto::from_k8s(p.protocol.as_deref()).ok()?,
                port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect()
}

impl Namespace {
    /// From the Kubernetes object, with [`NAME_LABEL`] set to its name
    /// when the API server did not (before 1.21), so that a policy naming
    /// a namespace by it means the same on every version.
    pub fn from_k8s(n: &core::Namespace) -> Option<(String, Self)> {
        let name = n.metadata.name.clone()?;
        let mut labels = n.metadata.labels.clone().unwrap_or_default();
        labels
            .entry(NAME_LABEL.to_string())
            .or_insert_with(|| name.clone());
        Some((name, Self { labels }))
    }
}

impl Policy {
    /// From the Kubernetes object. policyTypes default as the API server
    /// defaults them: Ingress, plus Egress when there are egress rules.
    pub fn from_k8s(p: &net::NetworkPolicy) -> Result<(PolicyKey, Self)> {
        let key = Key::new(
            p.metadata
                .namespace
                .as_deref()
                .ok_or(Error::Missing("metadata.namespace"))?,
            p.metadata
                .name
                .as_deref()
                .ok_or(Error::Missing("metadata.name"))?,
        );
        let spec = p.spec.as_ref().ok_or(Error::Missing("spec"))?;
        let selector = spec
            .pod_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()?
            .unwrap_or_default();
        let (mut ing, mut eg) = (false, false);
        match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                for t in types {
                    match t.as_str() {
                        "Ingress" => ing = true,
                        "Egress" => eg = true,
                        other => return Err(Error::PolicyType(other.into())),
                    }
                }
            }
            _ => {
                ing = true;
                eg = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
            }
        }
        let ingress = rules(ing, spec.ingress.as_ref(), |r| {
            rule(r.from.as_deref(), r.ports.as_deref())
        })?;
        let egress = rules(eg, spec.egress.as_ref(), |r| {
            rule(r.to.as_deref(), r.ports.as_deref())
        })?;
        Ok((
            key,
            Self {
                selector,
                ingress,
                egress,
            },
        ))
    }
}

/// A direction's rules (`list`, each read by `rule_of`), when the policy
/// isolates in it (`on`).
fn rules<R>(
    on: bool,
    list: Option<&Vec<R>>,
    rule_of: impl Fn(&R) -> Result<Rule>,
) -> Result<Option<Vec<Rule>>> {
    on.then(|| list.into_iter().flatten().map(rule_of).collect())
        .transpose()
}

fn rule(
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
) -> Result<Rule> {
    let mut out = Rule {
        peers: Vec::new(),
        ports: Vec::new(),
    };
    for p in peers.unwrap_or_default() {
        out.peers.push(peer(p)?);
    }
    for p in ports.unwrap_or_default() {
        out.ports.push(port(p)?);
    }
    Ok(out)
}

/// An ipBlock as the API server takes it ([`crate::cidr`]): `cidr` and
/// each `except` CIDR text it accepts, each except a strict subset of
/// `cidr` by its test. Each except is kept as what it removes from the
/// block (within `cidr`).
fn ip_block(b: &net::IPBlock) -> Result<Peer> {
    if b.cidr.is_empty() {
        return Err(Error::Missing("ipBlock.cidr"));
    }
    let read = |field, value: &String| {
        Cidr::parse(value).map_err(|why| Error::Cidr {
            field,
            value: value.clone(),
            why,
        })
    };
    let cidr = read("cidr", &b.cidr)?;
    let mut except = Vec::new();
    for e in b.except.iter().flatten() {
        let x = read("except", e)?;
        if !cidr.admits_except(&x) {
            return Err(Error::ExceptNotInCidr {
                cidr: b.cidr.clone(),
                except: e.clone(),
            });
        }
        except.push(cidr.clamp(&x));
    }
    Ok(Peer::Block {
        cidr: cidr.net,
        except,
    })
}

fn peer(p: &net::NetworkPolicyPeer) -> Result<Peer> {
    if let Some(b) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err(Error::IpBlockWithSelectors);
        }
        return ip_block(b);
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        return Err(Error::Missing("podSelector, namespaceSelector or ipBlock"));
    }
    Ok(Peer::Pods {
        namespaces: p
            .namespace_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()?,
        pods: p
            .pod_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()?
            .unwrap_or_default(),
    })
}

fn port(p: &net::NetworkPolicyPort) -> Result<PortMatch> {
    let proto = Proto::from_k8s(p.protocol.as_deref())?;
    match (&p.port, p.end_port) {
        (None, None) => Ok(PortMatch::All { proto }),
        (None, Some(_)) => Err(Error::Port("endPort without port".into())),
        (Some(IntOrString::String(name)), None) => match name.parse::<i32>() {
            // A number written as a string is that number (as kube-proxy
            // and the upstream implementations read it).
            Ok(n) => range(proto, n, n),
            Err(_) if name.is_empty() => Err(Error::Port("an empty port name".into())),
            Err(_) => Ok(PortMatch::Named {
                proto,
                name: name.clone(),
            }),
        },
        (Some(IntOrString::String(name)), Some(_)) => {
            Err(Error::Port(format!("endPort with the named port {name:?}")))
        }
        (Some(IntOrString::Int(n)), end) => range(proto, *n, end.unwrap_or(*n)),
    }
}

fn range(proto: Proto, first: i32, last: i32) -> Result<PortMatch> {
    let ok = |n: i32| u16::try_from(n).ok().filter(|n| *n > 0);
    match (ok(first), ok(last)) {
        (Some(first), Some(last)) if last >= first => Ok(PortMatch::Range { proto, first, last }),
        _ => Err(Error::Port(format!(
            "{first}..{last} is not a range within 1-65535"
        ))),
    }
}
