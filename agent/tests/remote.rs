//! Routes to remote blocks in the real kernel, two nodes on a fabric:
//! native routing and VXLAN (device, FDB, neighbours, on-link routes)
//! carry pings; a second apply changes nothing; an empty plan removes
//! exactly Margay's objects (the device once it is retired). IPIP on this
//! kernel: `tunl0` with its route where the kernel has IPIP, else the
//! clear error the Node condition carries (the full IPIP path is proven in
//! a VM, `tests/tests/ipip.rs`).

use std::net::Ipv4Addr;

use margay_agent::dataplane::{
    DevicePlan, Devices, Holds, LocalIpip, LocalVtep, Netlink, Remote, Via, sync,
};
use margay_agent::routing::encap::{RemoteBlock, Vtep, plan};
use margay_api::ipam::Encapsulation;
use margay_delta::Removals;
use margay_harness::netns::Netns;
use margay_harness::topo::Fabric;

/// Makes `dp`'s remote routes `want`; every item must succeed.
async fn apply_remote(dp: &Netlink, devices: Devices, want: &Remote, prune: bool) {
    let r = sync::remote(dp, &devices, want, &Holds::default(), Removals::when(prune))
        .await
        .unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
}

fn vxlan(d: DevicePlan<LocalVtep>) -> Devices {
    Devices {
        vxlan: d,
        ..Default::default()
    }
}

/// Runs `f` with a dataplane whose netlink socket lives in `ns`.
fn in_ns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce(Netlink) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> T {
    let file = std::fs::File::open(ns.path()).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let dp = Netlink::new().unwrap();
            f(dp).await
        })
    })
    .join()
    .unwrap()
}

const MAC_A: [u8; 6] = [0x66, 0x6d, 0x67, 0, 0, 1];
const MAC_B: [u8; 6] = [0x66, 0x6d, 0x67, 0, 0, 2];

fn vtep(mac: [u8; 6], ip: &str) -> Vtep {
    Vtep {
        mac,
        tunnel_ip: ip.parse().unwrap(),
    }
}

fn block(
    cidr: &str,
    node: &str,
    ip: Ipv4Addr,
    encap: Encapsulation,
    v: Option<Vtep>,
) -> RemoteBlock {
    RemoteBlock {
        cidr: cidr.parse().unwrap(),
        node: node.into(),
        node_ip: ip.into(),
        encap,
        vtep: v,
        ipip: None,
        pool_deleting: false,
    }
}

#[test]
fn native_and_vxlan_routes_carry_traffic_and_go_away_cleanly() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("a").unwrap();
    let b = fabric.add_node("b").unwrap();
    // "Pods" of b: addresses on its loopback.
    b.ns.ip(&["addr", "add", "10.244.1.1/32", "dev", "lo"])
        .unwrap();
    b.ns.ip(&["addr", "add", "10.244.2.1/32", "dev", "lo"])
        .unwrap();
    // Someone else's route on a: never touched.
    a.ns.ip(&[
        "route",
        "add",
        "10.250.0.0/24",
        "via",
        &fabric_gw(),
        "proto",
        "static",
    ])
    .unwrap();

    let (a_ip, b_ip) = (a.v4, b.v4);
    let local_a = LocalVtep {
        mac: MAC_A,
        tunnel_ip: "10.244.0.0".parse().unwrap(),
        underlay: a_ip,
        mtu: 1450,
    };
    let local_b = LocalVtep {
        mac: MAC_B,
        tunnel_ip: "10.244.1.0".parse().unwrap(),
        underlay: b_ip,
        mtu: 1450,
    };
    let routed_a = plan(
        &[
            block(
                "10.244.1.0/26",
                "b",
                b_ip,
                Encapsulation::Vxlan,
                Some(vtep(MAC_B, "10.244.1.0")),
            ),
            block("10.244.2.0/26", "b", b_ip, Encapsulation::None, None),
            block("10.244.3.0/26", "c", b_ip, Encapsulation::Ipip, None),
        ],
        None,
    );
    assert_eq!(routed_a.errors.len(), 1, "{:?}", routed_a.errors);
    assert!(routed_a.errors[0].to_string().contains("tunl0"));
    let want_a = routed_a.want;
    let want_b = plan(
        &[block(
            "10.244.0.0/26",
            "a",
            a_ip,
            Encapsulation::Vxlan,
            Some(vtep(MAC_A, "10.244.0.0")),
        )],
        None,
    )
    .want;
    let wa = want_a.clone();
    in_ns(&a.ns, move |dp| {
        Box::pin(async move {
            apply_remote(&dp, vxlan(DevicePlan::Want(local_a)), &wa, true).await;
            // Idempotent.
            apply_remote(&dp, vxlan(DevicePlan::Want(local_a)), &wa, true).await;
        })
    });
    in_ns(&b.ns, move |dp| {
        Box::pin(
            async move { apply_remote(&dp, vxlan(DevicePlan::Want(local_b)), &want_b, true).await },
        )
    });

    let link = a.ns.ip(&["-d", "link", "show", "margay.vxlan"]).unwrap();
    assert!(
        link.contains("vxlan id 4096") && link.contains("dstport 4789"),
        "{link}"
    );
    assert!(
        link.contains("nolearning") && link.contains("66:6d:67:00:00:01"),
        "{link}"
    );
    assert!(link.contains("mtu 1450"), "{link}");
    let routes = a.ns.ip(&["route", "show", "proto", "79"]).unwrap();
    assert!(
        routes.contains(&format!("10.244.2.0/26 via {b_ip} dev eth0")),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.1.0/26 via 10.244.1.0 dev margay.vxlan")
            && routes.contains("onlink"),
        "{routes}"
    );
    assert!(!routes.contains("10.244.3.0"), "{routes}");
    let fdb =
        a.ns.exec("bridge", &["fdb", "show", "dev", "margay.vxlan"])
            .unwrap();
    assert!(
        fdb.contains(&format!("66:6d:67:00:00:02 dst {b_ip}")),
        "{fdb}"
    );
    // Traffic: native, and through the tunnel (source: a's tunnel address).
    a.ns.ping_ok("10.244.2.1").unwrap();
    a.ns.ping_ok("10.244.1.1").unwrap();

    let nothing_wanted = |prune: bool| {
        in_ns(&a.ns, move |dp| {
            Box::pin(async move {
                let retire = vxlan(DevicePlan::Retire(None));
                apply_remote(&dp, retire, &Default::default(), prune).await;
            })
        })
    };
    // Without pruning (BGP still relearning after a restart) nothing goes.
    nothing_wanted(false);
    assert!(a.ns.ip(&["link", "show", "margay.vxlan"]).is_ok());
    a.ns.ping_ok("10.244.1.1").unwrap();
    a.ns.ping_ok("10.244.2.1").unwrap();

    // Nothing wanted any more: Margay's routes and device go, the rest stays.
    nothing_wanted(true);
    assert!(a.ns.ip(&["link", "show", "margay.vxlan"]).is_err());
    assert!(
        a.ns.ip(&["route", "show", "proto", "79"])
            .unwrap()
            .trim()
            .is_empty()
    );
    let rest = a.ns.ip(&["route", "show"]).unwrap();
    assert!(
        rest.contains("10.250.0.0/24") && rest.contains("proto static"),
        "{rest}"
    );
    assert!(!a.ns.ping("10.244.1.1"));
}

#[test]
fn ipip_where_the_kernel_has_it_and_a_clear_error_where_it_has_not() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("a").unwrap();
    let b = fabric.add_node("b").unwrap();
    // The kernel decides which half of this test applies.
    let has_ipip =
        a.ns.ip(&[
            "link",
            "add",
            "mgprobe0",
            "type",
            "ipip",
            "remote",
            "192.0.2.1",
        ])
        .is_ok();
    let _ = a.ns.ip(&["link", "del", "mgprobe0"]);
    let mut want = Remote::default();
    want.routes
        .insert("10.244.1.0/26".parse().unwrap(), Via::Ipip(b.v4));
    let local = LocalIpip {
        tunnel_ip: "10.244.0.1".parse().unwrap(),
        mtu: 1480,
    };
    let devices = Devices {
        ipip: DevicePlan::Want(local),
        ..Default::default()
    };
    let report = in_ns(&a.ns, move |dp| {
        Box::pin(async move {
            let r = sync::remote(&dp, &devices, &want, &Holds::default(), Removals::Allowed)
                .await
                .unwrap();
            (
                r.ready.ipip,
                r.failed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            )
        })
    });
    let routes = a.ns.ip(&["route", "show", "proto", "79"]).unwrap();
    if has_ipip {
        assert!(report.0 && report.1.is_empty(), "{report:?}");
        assert!(
            routes.contains(&format!("10.244.1.0/26 via {} dev tunl0", b.v4)),
            "{routes}"
        );
        let link = a.ns.ip(&["link", "show", "tunl0"]).unwrap();
        assert!(link.contains("mtu 1480") && link.contains("UP"), "{link}");
    } else {
        assert!(!report.0);
        let why = report.1.join("; ");
        assert!(
            why.contains("cannot do IPIP")
                && why.contains("kernel ")
                && why.contains("modprobe ipip")
                && why.contains("VXLAN or None"),
            "{why}"
        );
        assert!(routes.trim().is_empty(), "{routes}");
    }
}

fn fabric_gw() -> String {
    margay_harness::topo::FABRIC_GW_V4.to_string()
}
