//! The attribution alias: every pod host interface records whose it is in
//! its alias, `margay1 <handle> <addr>[,<addr>] [<namespace>/<name>/<uid>]`
//! (`?` in place of the pod when its names are too long for an alias:
//! IPAM's record of the handle names it),
//! set while the interface is built, before the ADD answers. It is the
//! node's durable journal of attributions: IPAM's writes happen behind the
//! ADD, and after a crash start-up reconciliation ([`super::reconcile`])
//! reads the kernel back through [`parse`]. The pod-route resync reads it
//! too (which addresses each interface carries).

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use margay_api::ipam::PodRef;

use crate::dataplane::HostPod;
use crate::dataplane::ownership::{ALIAS_TAG as TAG, alias_owner};

/// Longest alias the kernel keeps (IFALIASZ - 1).
const MAX_ALIAS: usize = 255;

/// What stands for a pod too long to record.
const CUT: &str = "?";

/// The alias recording `handle`'s addresses (and pod, when it fits; `?`
/// when it does not, so start-up knows there is a pod to look up).
pub fn alias(handle: &str, addrs: &[IpNetwork], pod: Option<&PodRef>) -> String {
    let ips: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    let base = format!("{TAG} {handle} {}", ips.join(","));
    match pod {
        Some(p) => {
            let full = format!("{base} {}/{}/{}", p.namespace, p.name, p.uid);
            if full.len() <= MAX_ALIAS {
                full
            } else {
                format!("{base} {CUT}")
            }
        }
        None => base,
    }
}

/// What an alias says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The host interface.
    pub host_if: String,
    /// The allocation handle.
    pub handle: String,
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
    /// The pod, when recorded.
    pub pod: Option<PodRef>,
    /// A pod was there but too long to record (look it up by handle).
    pub pod_cut: bool,
}

/// Parses a host interface's alias; `None` when it is not Margay's.
pub fn parse(p: &HostPod) -> Option<Attached> {
    let handle = alias_owner(&p.alias)?.to_string();
    // The tag and the handle, then the addresses and the pod.
    let mut it = p.alias.split(' ').skip(2);
    let addrs: Vec<IpAddr> = it
        .next()?
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let rest = it.next();
    let pod_cut = rest == Some(CUT);
    let pod = rest.and_then(|s| {
        let mut f = s.splitn(3, '/');
        Some(PodRef {
            namespace: f.next()?.to_string(),
            name: f.next()?.to_string(),
            uid: f.next()?.to_string(),
        })
    });
    if addrs.is_empty() {
        return None;
    }
    Some(Attached {
        host_if: p.host_if.clone(),
        handle,
        addrs,
        pod,
        pod_cut,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_round_trip_and_stay_short() {
        let p = PodRef {
            namespace: "default".into(),
            name: "web-0".into(),
            uid: "0c5d".into(),
        };
        let addrs: Vec<IpNetwork> = vec![
            "10.0.0.1/32".parse().unwrap(),
            "fd00::1/128".parse().unwrap(),
        ];
        let hp = HostPod {
            index: 0,
            host_if: "cali1".into(),
            alias: alias("abc.eth0", &addrs, Some(&p)),
        };
        let at = parse(&hp).unwrap();
        assert_eq!(at.handle, "abc.eth0");
        assert_eq!(at.addrs.len(), 2);
        assert_eq!(at.pod, Some(p));
        let long = PodRef {
            namespace: "n".repeat(63),
            name: "x".repeat(253),
            uid: "u".into(),
        };
        let a = alias(&"c".repeat(70), &addrs, Some(&long));
        assert!(a.len() <= MAX_ALIAS);
        assert!(
            parse(&HostPod {
                index: 0,
                host_if: "c".into(),
                alias: a
            })
            .unwrap()
            .pod_cut
        );
        assert!(
            parse(&HostPod {
                index: 0,
                host_if: "c".into(),
                alias: "calico thing".into()
            })
            .is_none()
        );
        assert!(
            parse(&HostPod {
                index: 0,
                host_if: "c".into(),
                alias: String::new()
            })
            .is_none()
        );
    }
}
