//! The conversions from the Kubernetes objects, against what the API
//! server takes and refuses.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;

use super::*;

fn policy(json: serde_json::Value) -> Result<Policy> {
    let mut v = serde_json::json!({
        "metadata": {"namespace": "x", "name": "p"},
    });
    v["spec"] = json;
    let p: net::NetworkPolicy = serde_json::from_value(v).unwrap();
    Policy::from_k8s(&p).map(|(_, p)| p)
}

#[test]
fn a_namespace_carries_its_name_label_on_every_api_version() {
    let ns = |labels: serde_json::Value| -> core::Namespace {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "labels": labels}
        }))
        .unwrap()
    };
    let (name, n) = Namespace::from_k8s(&ns(serde_json::json!({"team": "a"}))).unwrap();
    assert_eq!(name, "x");
    assert_eq!(n.labels.get(NAME_LABEL).map(String::as_str), Some("x"));
    assert_eq!(n.labels.get("team").map(String::as_str), Some("a"));
    // What the API server set stays as it is.
    let (_, n) = Namespace::from_k8s(&ns(serde_json::json!({NAME_LABEL: "x"}))).unwrap();
    assert_eq!(n.labels.len(), 1);
}

#[test]
fn policy_types_default_as_the_api_server_does() {
    let p = policy(serde_json::json!({"podSelector": {}})).unwrap();
    assert_eq!(p.ingress, Some(vec![]));
    assert_eq!(p.egress, None);
    let p = policy(serde_json::json!({"podSelector": {}, "egress": [{}]})).unwrap();
    assert!(p.ingress.is_some());
    assert_eq!(p.egress.as_ref().map(Vec::len), Some(1));
    let p = policy(serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"]})).unwrap();
    assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
}

#[test]
fn ports_and_peers() {
    let p = policy(serde_json::json!({
        "podSelector": {"matchLabels": {"a": "b"}},
        "ingress": [{
            "from": [
                {"podSelector": {}},
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                {"namespaceSelector": {}, "podSelector": {"matchLabels": {"c": "d"}}},
                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
            ],
            "ports": [
                {"port": 80},
                {"protocol": "UDP", "port": 1000, "endPort": 2000},
                {"protocol": "SCTP"},
                {"port": "http"},
                {"port": "81"},
            ]
        }]
    }))
    .unwrap();
    let r = &p.ingress.unwrap()[0];
    assert_eq!(
        r.ports.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["tcp/80", "udp/1000-2000", "sctp/*", "tcp/http", "tcp/81"]
    );
    assert_eq!(
        r.peers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "pods <all> (own namespace)",
            "pods <all> in namespaces ns=y",
            "pods c=d in namespaces <all>",
            "ipBlock 10.0.0.0/8 except 10.1.0.0/16",
        ]
    );
}

#[test]
fn what_the_api_server_refuses_is_refused() {
    for (spec, what) in [
        (
            serde_json::json!({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
            "protocol",
        ),
        (
            serde_json::json!({"ingress": [{"ports": [{"port": 0}]}]}),
            "port 0",
        ),
        (
            serde_json::json!({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
            "endPort below port",
        ),
        (
            serde_json::json!({"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
            "named with endPort",
        ),
        (
            serde_json::json!({"ingress": [{"ports": [{"endPort": 80}]}]}),
            "endPort alone",
        ),
        (
            serde_json::json!({"ingress": [{"from": [{}]}]}),
            "empty peer",
        ),
        (
            serde_json::json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
            "except outside",
        ),
        (
            serde_json::json!({"ingress": [{"from": [{"ipBlock": {"cidr": "nope"}}]}]}),
            "bad cidr",
        ),
        (
            serde_json::json!({"policyTypes": ["Sideways"]}),
            "policy type",
        ),
        (
            serde_json::json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "In without values",
        ),
    ] {
        let mut spec = spec;
        if spec.get("podSelector").is_none() {
            spec["podSelector"] = serde_json::json!({});
        }
        assert!(policy(spec).is_err(), "{what}");
    }
}

/// The ipBlock peer of a policy with `cidr` and `except`, as its
/// meaning (`CIDR` or `CIDR except E1,E2`), or why it is refused.
fn ip_block(cidr: &str, except: &[&str]) -> std::result::Result<String, Error> {
    let mut b = serde_json::json!({"cidr": cidr});
    if !except.is_empty() {
        b["except"] = serde_json::json!(except);
    }
    let p =
        policy(serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": b}]}]}))?;
    let peer = p.ingress.unwrap()[0].peers[0].to_string();
    Ok(peer.trim_start_matches("ipBlock ").to_string())
}

/// Every ipBlock text the API server accepts means what Kubernetes
/// means by it; what it refuses is refused, with its reason. The API
/// server's test is `k8s.io/utils/net.ParseCIDRSloppy` (through 1.32,
/// and for values stored before 1.33's strict validation), and an
/// except must be a strict subset by Go's `IPNet.Contains` and the
/// prefix lengths as written (crate::cidr).
#[test]
fn ip_blocks_read_as_the_api_server_reads_them() {
    use crate::cidr::CidrError::{Address, NoPrefix, Prefix};
    let bad = |field: &'static str, value: &str, why| {
        Err(Error::Cidr {
            field,
            value: value.into(),
            why,
        })
    };
    let outside = |cidr: &str, except: &str| {
        Err(Error::ExceptNotInCidr {
            cidr: cidr.into(),
            except: except.into(),
        })
    };
    let means = |s: &str| Ok(s.to_string());
    // Rows of one CIDR read as `meaning`, and rows whose expectation
    // repeats their input.
    let reads = |cidr: &'static str, meaning| (cidr, vec![], means(meaning));
    let refused = |cidr: &'static str, why| (cidr, vec![], bad("cidr", cidr, why));
    let not_in =
        |cidr: &'static str, except: Vec<&'static str>, which| (cidr, except, outside(cidr, which));
    let v4 = Prefix { max: 32 };
    let v6 = Prefix { max: 128 };
    let cases: Vec<(&str, Vec<&str>, std::result::Result<String, Error>)> = vec![
        // IPv4.
        reads("10.0.0.0/8", "10.0.0.0/8"),
        reads("0.0.0.0/0", "0.0.0.0/0"),
        reads("255.255.255.255/32", "255.255.255.255/32"),
        // Leading zeros are decimal (not octal: 010 is 10, not 8),
        // as many as written, in the prefix length too.
        reads("010.0.0.0/8", "10.0.0.0/8"),
        reads("010.001.002.003/32", "10.1.2.3/32"),
        reads("192.168.001.000/24", "192.168.1.0/24"),
        reads("0000000000172.016.0.0/12", "172.16.0.0/12"),
        reads("10.0.0.0/08", "10.0.0.0/8"),
        reads("10.0.0.0/0000032", "10.0.0.0/32"),
        reads("000.000.000.000/000", "0.0.0.0/0"),
        // Bits beyond the prefix are dropped.
        reads("10.0.0.1/8", "10.0.0.0/8"),
        reads("192.168.1.255/24", "192.168.1.0/24"),
        reads("010.255.255.255/9", "10.128.0.0/9"),
        // IPv6, any case, groups with leading zeros (any number).
        reads("2001:db8::/32", "2001:db8::/32"),
        reads("2001:DB8::1/32", "2001:db8::/32"),
        reads(
            "2001:0db8:0000:0000:0000:0000:0000:0001/128",
            "2001:db8::1/128",
        ),
        reads("2001:00000db8::/32", "2001:db8::/32"),
        reads("::/0", "::/0"),
        reads("::1/128", "::1/128"),
        reads("fe80::1/10", "fe80::/10"),
        reads("1:2:3:4:5:6:7::/112", "1:2:3:4:5:6:7:0/112"),
        reads("::2:3:4:5:6:7:8/128", "0:2:3:4:5:6:7:8/128"),
        reads("fd00::/0008", "fd00::/8"),
        // An IPv4 tail: in the last 32 bits, or anywhere after `::`.
        reads("64:ff9b::10.0.0.0/120", "64:ff9b::a00:0/120"),
        reads("::10.0.0.0/104", "::a00:0/104"),
        reads("1::10.0.0.0/112", "1::a00:0/112"),
        refused("1::10.0.0.0:0/112", Address),
        // IPv4-mapped IPv6 with the mapping in the prefix: the IPv4
        // network (prefix - 96), however the address is written.
        reads("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        reads("::ffff:10.1.2.3/104", "10.0.0.0/8"),
        reads("::FFFF:a00:0/104", "10.0.0.0/8"),
        reads("0:0:0:0:0:ffff:10.0.0.0/104", "10.0.0.0/8"),
        reads("0:0:0:0:000000:ffff:010.000.000.000/104", "10.0.0.0/8"),
        reads("::ffff:10.0.0.1/128", "10.0.0.1/32"),
        reads("::ffff:0.0.0.0/96", "0.0.0.0/0"),
        // ... and with it cut: IPv6.
        reads("::ffff:10.0.0.0/95", "::fffe:0:0/95"),
        reads("::ffff:10.0.0.0/80", "::/80"),
        // Refused by the API server.
        ("", vec![], Err(Error::Missing("ipBlock.cidr"))),
        refused("10.0.0.0", NoPrefix),
        refused("10.0.0.0/", v4),
        refused("10.0.0.0/33", v4),
        refused("10.0.0.0/-1", v4),
        refused("10.0.0.0/+8", v4),
        refused("10.0.0.0/8 ", v4),
        refused("10.0.0.0/8/8", v4),
        refused("10.0.0.0/255.0.0.0", v4),
        refused("::/129", v6),
        refused(" 10.0.0.0/8", Address),
        refused("10.0.0/8", Address),
        refused("10.0.0.0.0/8", Address),
        refused("10..0.0/8", Address),
        refused("256.0.0.0/8", Address),
        refused("0x0a.0.0.0/8", Address),
        refused("nope/8", Address),
        refused("1::2::3/64", Address),
        refused("1:2:3:4:5:6:7:8::/64", Address),
        refused("1:2:3:4:5:6:7:8:9/64", Address),
        refused("1:2:3:4:5:6:7/64", Address),
        refused(":1::/64", Address),
        refused("1::2:/64", Address),
        refused("12345::/16", Address),
        refused("fe80::1%eth0/64", Address),
        refused("[::1]/128", Address),
        refused("1:2:3:4:5:10.0.0.0/104", Address),
        refused("1::2:3:4:5:6:7:10.0.0.0/128", Address),
        refused("::ffff:10.0.0/104", Address),
        refused("::ffff:256.0.0.0/104", Address),
        // Excepts: CIDR text as above, each a strict subset of cidr.
        (
            "10.0.0.0/8",
            vec!["10.1.0.0/16"],
            means("10.0.0.0/8 except 10.1.0.0/16"),
        ),
        (
            "10.0.0.0/8",
            vec!["010.001.000.000/016"],
            means("10.0.0.0/8 except 10.1.0.0/16"),
        ),
        (
            "10.0.0.0/8",
            vec!["10.1.2.3/16"],
            means("10.0.0.0/8 except 10.1.0.0/16"),
        ),
        (
            "10.0.0.1/8",
            vec!["10.0.0.0/9", "10.0.0.0/10"],
            means("10.0.0.0/8 except 10.0.0.0/9,10.0.0.0/10"),
        ),
        (
            "2001:db8::/32",
            vec!["2001:db8:1::/48", "2001:DB8:1:2::/64"],
            means("2001:db8::/32 except 2001:db8:1::/48,2001:db8:1:2::/64"),
        ),
        (
            "10.0.0.0/8",
            vec!["::ffff:10.1.0.0/112"],
            means("10.0.0.0/8 except 10.1.0.0/16"),
        ),
        (
            "::ffff:10.0.0.0/104",
            vec!["::ffff:10.1.0.0/112"],
            means("10.0.0.0/8 except 10.1.0.0/16"),
        ),
        // The API server compares the lengths as written: IPv4 /8
        // against IPv4-mapped /104 (10.0.0.0/8 again) or /103 (a
        // wider 10.0.0.0/7) passes, and excepts the whole block.
        (
            "10.0.0.0/8",
            vec!["::ffff:10.0.0.0/104"],
            means("10.0.0.0/8 except 10.0.0.0/8"),
        ),
        (
            "10.0.0.0/8",
            vec!["::ffff:10.0.0.0/103"],
            means("10.0.0.0/8 except 10.0.0.0/8"),
        ),
        (
            "0.0.0.0/0",
            vec!["::ffff:0.0.0.0/96"],
            means("0.0.0.0/0 except 0.0.0.0/0"),
        ),
        not_in("10.0.0.0/8", vec!["11.0.0.0/16"], "11.0.0.0/16"),
        not_in("10.0.0.0/8", vec!["10.0.0.0/8"], "10.0.0.0/8"),
        not_in("10.0.0.0/8", vec!["10.0.0.0/7"], "10.0.0.0/7"),
        not_in(
            "10.0.0.0/8",
            vec!["10.1.0.0/16", "11.0.0.0/16"],
            "11.0.0.0/16",
        ),
        not_in(
            "10.0.0.0/8",
            vec!["::ffff:10.0.0.0/100"],
            "::ffff:10.0.0.0/100",
        ),
        not_in("::ffff:10.0.0.0/104", vec!["10.1.0.0/16"], "10.1.0.0/16"),
        not_in(
            "::ffff:10.0.0.0/104",
            vec!["::ffff:10.0.0.0/104"],
            "::ffff:10.0.0.0/104",
        ),
        not_in("0.0.0.0/0", vec!["::/1"], "::/1"),
        not_in("::/0", vec!["10.0.0.0/8"], "10.0.0.0/8"),
        not_in("::/0", vec!["::ffff:10.0.0.0/104"], "::ffff:10.0.0.0/104"),
        (
            "10.0.0.0/8",
            vec!["10.1.0.0"],
            bad("except", "10.1.0.0", NoPrefix),
        ),
        (
            "10.0.0.0/8",
            vec!["10.1.0.0/33"],
            bad("except", "10.1.0.0/33", v4),
        ),
        ("10.0.0.0/8", vec![""], bad("except", "", NoPrefix)),
    ];
    for (cidr, except, want) in cases {
        assert_eq!(
            ip_block(cidr, &except),
            want,
            "cidr {cidr:?} except {except:?}"
        );
    }
}

#[test]
fn pods_from_kubernetes() {
    let pod: core::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "x", "name": "a", "labels": {"pod": "a"}},
        "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [
            {"name": "serve-80", "containerPort": 80},
            {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
            {"containerPort": 81}
        ]}]},
        "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
    }))
    .unwrap();
    let (key, p) = Pod::from_k8s(&pod).unwrap();
    assert_eq!(key.to_string(), "x/a");
    assert_eq!(p.ips.len(), 2);
    assert_eq!(p.named_port("serve-80", Proto::Tcp), Some(80));
    assert_eq!(p.named_port("serve-80", Proto::Udp), None);
    assert_eq!(p.named_port("serve-80-udp", Proto::Udp), Some(80));
    let mut host = pod.clone();
    host.spec.as_mut().unwrap().host_network = Some(true);
    assert!(Pod::from_k8s(&host).is_none());
    let mut done = pod.clone();
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    assert!(Pod::from_k8s(&done).is_none());
    let mut pending = pod;
    pending.status.as_mut().unwrap().pod_ip = None;
    pending.status.as_mut().unwrap().pod_ips = None;
    assert!(Pod::from_k8s(&pending).is_none());
}
