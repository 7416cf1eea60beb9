//! Random worlds for the differential tests and the benchmarks: namespaces,
//! pods and policies drawn from a small vocabulary (so selectors hit), from
//! a seed (a failure is reproducible from its seed), and shrinking of a
//! failing world to a minimal one.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{Key, NamedPort, Namespace, Peer, Pod, Policy, PortMatch, Rule};
use crate::selector::{Op, Requirement, Selector};
use crate::{Proto, World};

/// xorshift64*: small, fast, reproducible; not for anything secret.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// From a seed (0 is moved off the fixed point).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % (n.max(1) as u64)).unwrap_or(0)
    }

    /// True with probability `p` percent.
    pub fn chance(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Namespaces of the generated worlds.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const KEYS: [&str; 3] = ["app", "tier", "env"];
const VALUES: [&str; 3] = ["a", "b", "c"];
/// Named ports every generated pod may have (name, protocol, number).
pub const NAMED: [(&str, Proto, u16); 3] = [
    ("serve-80-tcp", Proto::Tcp, 80),
    ("serve-81-tcp", Proto::Tcp, 81),
    ("serve-80-udp", Proto::Udp, 80),
];

fn labels(rng: &mut Rng) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    for k in KEYS {
        if rng.chance(50) {
            l.insert(k.to_string(), rng.pick(&VALUES).to_string());
        }
    }
    l
}

fn selector(rng: &mut Rng) -> Selector {
    let mut s = Selector::everything();
    if rng.chance(30) {
        return s;
    }
    if rng.chance(70) {
        s.match_labels
            .insert(rng.pick(&KEYS).to_string(), rng.pick(&VALUES).to_string());
    }
    if rng.chance(40) {
        let vals = || -> std::collections::BTreeSet<String> {
            VALUES.iter().take(2).map(|v| v.to_string()).collect()
        };
        let op = match rng.below(4) {
            0 => Op::In(vals()),
            1 => Op::NotIn(vals()),
            2 => Op::Exists,
            _ => Op::DoesNotExist,
        };
        s.expressions.push(Requirement {
            key: rng.pick(&KEYS).to_string(),
            op,
        });
    }
    s
}

fn peer(rng: &mut Rng, pod_net: u8) -> Peer {
    match rng.below(4) {
        0 => Peer::Pods {
            namespaces: None,
            pods: selector(rng),
        },
        1 => Peer::Pods {
            namespaces: Some(selector(rng)),
            pods: Selector::everything(),
        },
        2 => Peer::Pods {
            namespaces: Some(selector(rng)),
            pods: selector(rng),
        },
        // An ipBlock over the pods' addresses (v4 or v6, the same shape:
        // a /24../27 of the last octet, maybe one /30 excepted, or many
        // single addresses).
        _ => {
            let v6 = rng.chance(50);
            let net = |len: usize, last: usize| {
                let text = if v6 {
                    format!("{}/{}", ip6(pod_net, last), 96 + len)
                } else {
                    format!("10.{pod_net}.0.{last}/{len}")
                };
                text.parse().unwrap_or_else(|_| unreachable!())
            };
            let cidr = net(24 + rng.below(4), 0);
            let mut except = Vec::new();
            if rng.chance(50) {
                except.push(net(30, 4 * rng.below(8)));
            } else if rng.chance(20) {
                // More excepts than a rule line holds: a chain of them.
                // (more than ruleset::INLINE_EXCEPTS, 8)
                for _ in 0..9 + rng.below(4) {
                    let x = net(32, rng.below(64));
                    if !except.contains(&x) {
                        except.push(x);
                    }
                }
            }
            Peer::Block { cidr, except }
        }
    }
}

fn port(rng: &mut Rng) -> PortMatch {
    let proto = *rng.pick(&[Proto::Tcp, Proto::Tcp, Proto::Udp]);
    match rng.below(4) {
        0 => PortMatch::All { proto },
        1 => {
            let p = 80 + u16::try_from(rng.below(2)).unwrap_or(0);
            PortMatch::Range {
                proto,
                first: p,
                last: p,
            }
        }
        2 => PortMatch::Range {
            proto,
            first: 79,
            last: 80 + u16::try_from(rng.below(2)).unwrap_or(0),
        },
        _ => {
            let (name, proto, _) = *rng.pick(&NAMED);
            PortMatch::Named {
                proto,
                name: name.into(),
            }
        }
    }
}

fn rules(rng: &mut Rng, pod_net: u8) -> Vec<Rule> {
    (0..rng.below(3))
        .map(|_| Rule {
            peers: (0..rng.below(3)).map(|_| peer(rng, pod_net)).collect(),
            ports: (0..rng.below(3)).map(|_| port(rng)).collect(),
        })
        .collect()
}

/// A random policy in one of [`NAMESPACES`]; pods live in 10.`pod_net`.0.0/24.
pub fn policy(rng: &mut Rng, pod_net: u8) -> Policy {
    let (ing, eg) = match rng.below(3) {
        0 => (true, false),
        1 => (false, true),
        _ => (true, true),
    };
    Policy {
        selector: selector(rng),
        ingress: ing.then(|| rules(rng, pod_net)),
        egress: eg.then(|| rules(rng, pod_net)),
    }
}

/// A pod's IPv6 address, `fd00::POD_NET:HOST` (`host` may be beyond a
/// pod's: the blocks' bases).
pub fn ip6(pod_net: u8, host: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0,
        0,
        0,
        0,
        0,
        u16::from(pod_net),
        u16::try_from(host).unwrap_or(0),
    )
}

/// A random dual-stack pod: 10.`pod_net`.0.`host` and [`ip6`].
pub fn pod(rng: &mut Rng, pod_net: u8, host: u8) -> Pod {
    Pod {
        labels: labels(rng).into(),
        ips: vec![
            IpAddr::V4(Ipv4Addr::new(10, pod_net, 0, host)),
            IpAddr::V6(ip6(pod_net, usize::from(host))),
        ],
        node: None,
        ports: NAMED
            .iter()
            .filter(|_| rng.chance(70))
            .map(|(n, proto, port)| NamedPort {
                name: (*n).into(),
                proto: *proto,
                port: *port,
            })
            .collect(),
    }
}

/// A random world: the three namespaces with random labels, `pods`
/// dual-stack pods (10.`pod_net`.0.1 and fd00::`pod_net`:1 ...), `policies`
/// policies.
pub fn world(rng: &mut Rng, pod_net: u8, pods: u8, policies: usize) -> World {
    let mut w = World::default();
    for ns in NAMESPACES {
        w.namespaces.insert(
            ns.into(),
            Namespace {
                labels: labels(rng),
            },
        );
    }
    for i in 1..=pods {
        let ns = rng.pick(&NAMESPACES);
        w.pods
            .insert(Key::new(ns, &format!("p{i}")), pod(rng, pod_net, i));
    }
    for i in 0..policies {
        let ns = rng.pick(&NAMESPACES);
        w.policies
            .insert(Key::new(ns, &format!("np{i}")), policy(rng, pod_net));
    }
    w
}

/// A copy of `w` with `edit` applied to the ingress (`ingress`) or egress
/// rules of the policy `k` (which has rules for that direction).
fn edit_rules(w: &World, k: &Key, ingress: bool, edit: impl FnOnce(&mut Vec<Rule>)) -> World {
    let mut s = w.clone();
    let q = s.policies.get_mut(k).unwrap_or_else(|| unreachable!());
    if let Some(r) = if ingress {
        &mut q.ingress
    } else {
        &mut q.egress
    } {
        edit(r);
    }
    s
}

/// Smaller versions of `w`, one step each: a policy, rule, peer, port,
/// selector requirement or label removed.
pub fn shrink_steps(w: &World) -> Vec<World> {
    let mut out = Vec::new();
    for k in w.policies.keys() {
        let mut s = w.clone();
        s.policies.remove(k);
        out.push(s);
    }
    for (k, p) in &w.policies {
        for dir in [true, false] {
            let rules = if dir { &p.ingress } else { &p.egress };
            let Some(rules) = rules else { continue };
            for (i, rule) in rules.iter().enumerate() {
                out.push(edit_rules(w, k, dir, |r| {
                    r.remove(i);
                }));
                for j in 0..rule.peers.len() {
                    out.push(edit_rules(w, k, dir, |r| {
                        r[i].peers.remove(j);
                    }));
                }
                for j in 0..rule.ports.len() {
                    out.push(edit_rules(w, k, dir, |r| {
                        r[i].ports.remove(j);
                    }));
                }
            }
        }
        if !p.selector.is_everything() {
            let mut s = w.clone();
            if let Some(q) = s.policies.get_mut(k) {
                q.selector = Selector::everything();
            }
            out.push(s);
        }
    }
    for (k, p) in &w.pods {
        for l in p.labels.keys() {
            let mut s = w.clone();
            if let Some(q) = s.pods.get_mut(k) {
                std::sync::Arc::make_mut(&mut q.labels).remove(l);
            }
            out.push(s);
        }
    }
    out
}

/// Shrinks `w` while `fails` holds, one step at a time, to a world none
/// of whose one-step shrinks fails.
pub fn shrink(mut w: World, mut fails: impl FnMut(&World) -> bool) -> World {
    'outer: loop {
        for s in shrink_steps(&w) {
            if fails(&s) {
                w = s;
                continue 'outer;
            }
        }
        return w;
    }
}
