//! The `margay` CNI plugin and `margay-agent run` against the real kernel
//! (node and pod namespaces on a fabric), a real kube-apiserver, and
//! Debian's libcni (through `cnitool`) as the caller.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kube::api::Api;
use margay_api::ipam::IPAMConfigurationSpec;
use margay_harness::kube::ApiServer;
use margay_harness::netns::Netns;
use margay_harness::process::Daemon;
use margay_harness::topo::{Fabric, Node};
use margay_harness::{names, paths, wait};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

/// A node running the agent, with a conflist for `cnitool`.
struct World {
    client: kube::Client,
    node: Node,
    agent: Daemon,
    socket: PathBuf,
    conflist: PathBuf,
    dir: tempfile::TempDir,
    _relay: margay_harness::kube::ApiRelay,
    _fabric: Fabric,
    api: ApiServer,
}

async fn world(chain: Vec<Value>) -> World {
    world_with(chain, &[]).await
}

/// A world whose agent gets `args` too.
async fn world_with(chain: Vec<Value>, args: &[&str]) -> World {
    let cfg = IPAMConfigurationSpec::default();
    let (api, client) = margay_tests::cluster(&["n1"], "10.244.0.0/24", 26, cfg).await;
    let fabric = Fabric::new().expect("fabric");
    let node = fabric.add_node("n1").expect("node");
    let dir = names::temp_dir("cni").expect("dir");
    let socket = dir.path().join("agent.sock");
    let relay = api
        .expose_in(&node.ns)
        .expect("apiserver in the node namespace");
    let mut cmd = margay_tests::agent_cmd(&node, "n1", &api, &socket).unwrap();
    cmd.args(args);
    let agent = margay_tests::start_agent(cmd, &socket, &dir.path().join("agent.log")).unwrap();
    let mut plugins = vec![json!({"type": "margay", "socket": socket, "mtu": 1400})];
    plugins.extend(chain);
    let conflist = dir.path().join("margay.conflist");
    std::fs::write(
        &conflist,
        json!({"cniVersion": "1.0.0", "name": "margay", "plugins": plugins}).to_string(),
    )
    .unwrap();
    World {
        client,
        node,
        agent,
        socket,
        conflist,
        dir,
        _relay: relay,
        _fabric: fabric,
        api,
    }
}

/// `margay-agent run` for node n1, inside its namespace; returns once
/// its socket is there.
fn start_agent(node: &Node, api: &ApiServer, socket: &Path, log: &Path) -> Daemon {
    let cmd = margay_tests::agent_cmd(node, "n1", api, socket).unwrap();
    margay_tests::start_agent(cmd, socket, log).unwrap()
}

fn cni_path() -> String {
    let margay = paths::workspace_bin("margay").unwrap();
    format!(
        "{}:{}",
        margay.parent().unwrap().display(),
        paths::cni_plugin_dir().display()
    )
}

impl World {
    /// `cnitool VERB` in the node namespace, as a runtime on the node.
    fn cnitool(&self, verb: &str, id: &str, netns: &Path, pod: &str) -> Result<String, String> {
        let out = margay_lab::cluster::cnitool_cmd(
            &self.node.ns,
            verb,
            &self.conflist,
            id,
            netns,
            &self.dir.path().join("cache"),
        )
        .unwrap()
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}"
            ),
        )
        .output()
        .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}\nagent log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.agent.log_tail(15)
            ))
        }
    }

    fn add(&self, id: &str, pod: &Netns, name: &str) -> String {
        let out = self.cnitool("add", id, &pod.path(), name).expect("ADD");
        let v: Value = serde_json::from_str(&out).expect("result JSON");
        let addr = v["ips"][0]["address"]
            .as_str()
            .expect("an address")
            .to_string();
        addr.trim_end_matches("/32").to_string()
    }

    /// Runs the plugin binary directly with `env` and `stdin`; returns
    /// (exit success, parsed stdout).
    fn plugin(&self, env: &[(&str, &str)], stdin: &str) -> (bool, Value) {
        let mut cmd = self.node.ns.cmd(paths::workspace_bin("margay").unwrap());
        cmd.env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // A plugin refusing its environment may answer and exit without
        // reading stdin: a broken pipe here is not the test's failure.
        let wrote = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        if let Err(e) = wrote {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let v = serde_json::from_str(&text).unwrap_or(Value::Null);
        (out.status.success(), v)
    }

    fn conf(&self, extra: Value) -> String {
        let mut c = json!({"cniVersion": "1.0.0", "name": "margay", "type": "margay", "socket": self.socket});
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        c.to_string()
    }

    /// Pod addresses in the datastore (spares, pre-assigned to the node,
    /// left out).
    async fn pod_allocations(&self) -> Vec<String> {
        let mut out: Vec<String> = margay_tests::allocations(&self.client)
            .await
            .into_iter()
            .filter(|(_, a)| !a.handle.starts_with("spare."))
            .map(|(ip, _)| ip)
            .collect();
        out.sort();
        out
    }

    /// The pod addresses once the agent's write-behind has settled on `n`
    /// of them (or what there is after 15 s).
    async fn allocations(&self, n: usize) -> Vec<String> {
        let every = Duration::from_millis(50);
        let mut p = wait::Poller::new("the allocations", Duration::from_secs(15), every);
        loop {
            let last = self.pod_allocations().await;
            if last.len() == n || p.next().await.is_err() {
                break last;
            }
        }
    }

    /// The pod addresses once they are exactly `want` (sorted), or what
    /// there is after 15 s.
    async fn settle_on(&self, mut want: Vec<String>) -> (Vec<String>, Vec<String>) {
        want.sort();
        let every = Duration::from_millis(50);
        let mut p = wait::Poller::new("the allocations", Duration::from_secs(15), every);
        loop {
            let last = self.pod_allocations().await;
            if last == want || p.next().await.is_err() {
                break (last, want);
            }
        }
    }

    /// The node's route to `prefix` (`ip FAMILY route show PREFIX`).
    fn host_route(&self, family: &str, prefix: &str) -> String {
        self.node.ns.ip(&[family, "route", "show", prefix]).unwrap()
    }

    fn cali_links(&self) -> String {
        let links = self.node.ns.ip(&["-o", "link", "show"]).unwrap();
        links
            .lines()
            .filter(|l| l.contains(": cali"))
            .map(str::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_addresses_reach_their_node_and_each_other_and_del_leaves_nothing() {
    // Drift is repaired by the resync (2 s here).
    let w = world_with(vec![], &["--resync-interval", "2"]).await;
    let p1 = Netns::create("pod").unwrap();
    let p2 = Netns::create("pod").unwrap();
    let a1 = w.add("c1", &p1, "web-1");
    let a2 = w.add("c2", &p2, "web-2");
    assert!(
        a1.starts_with("10.244.0.") && a2.starts_with("10.244.0."),
        "{a1} {a2}"
    );
    assert_ne!(a1, a2);

    // Calico-style wiring, seen from inside the pod and on the node.
    let addr = p1.ip(&["-4", "addr", "show", "eth0"]).unwrap();
    assert!(addr.contains(&format!("{a1}/32")), "{addr}");
    assert!(addr.contains("mtu 1400"), "{addr}");
    let routes = p1.ip(&["-4", "route", "show"]).unwrap();
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.1.1 dev eth0 scope link"),
        "{routes}"
    );
    let host = w.host_route("-4", &format!("{a1}/32"));
    assert!(
        host.contains("dev cali") && host.contains("proto 78") && host.contains("scope link"),
        "{host}"
    );
    let links = w.cali_links();
    assert!(links.contains("ee:ee:ee:ee:ee:ee"), "{links}");
    // The node's durable record of the attribution (what a restarted
    // agent reconciles IPAM from).
    assert!(
        links.contains(&format!(
            "alias margay1 margay/c1/eth0 {a1} default/web-1/uid-web-1"
        )),
        "{links}"
    );

    // The node's block: one blackhole route of Margay's protocol (pods'
    // /32s are more specific). A stale one of ours goes at the next pass;
    // a blackhole of another protocol is never touched.
    let last: u32 = a1.rsplit('.').next().unwrap().parse().unwrap();
    let block = format!("{}.{}/26", a1.rsplit_once('.').unwrap().0, last / 64 * 64);
    let ns = &w.node.ns;
    ns.ip(&[
        "route",
        "add",
        "blackhole",
        "10.244.252.0/26",
        "proto",
        "78",
    ])
    .unwrap();
    ns.ip(&[
        "route",
        "add",
        "blackhole",
        "10.250.0.0/26",
        "proto",
        "static",
    ])
    .unwrap();
    // Someone removes a pod's host route: the resync puts it back.
    ns.ip(&["route", "del", &format!("{a1}/32")]).unwrap();
    let p3 = Netns::create("pod").unwrap();
    let a3 = w.add("c3", &p3, "web-3");
    wait::until("pod route put back", T, POLL, || {
        let r = ns.ip(&["route", "show", &format!("{a1}/32")]).unwrap();
        Ok((r.contains("dev cali") && r.contains("proto 78")).then_some(()))
    })
    .unwrap();
    let bh =
        wait::until("block routes in step", T, POLL, || {
            let bh = ns.ip(&["route", "show", "type", "blackhole"]).unwrap();
            Ok((bh.contains(&format!("blackhole {block} proto 78"))
                && !bh.contains("10.244.252.0/26"))
            .then_some(bh))
        })
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", w.agent.log_tail(40)));
    assert!(bh.contains("blackhole 10.250.0.0/26 proto static"), "{bh}");
    assert_eq!(bh.lines().count(), 2, "{bh}");
    // An unused address of the block is dropped on the node, not routed on.
    let unused = format!("{}.{}", a1.rsplit_once('.').unwrap().0, last / 64 * 64 + 63);
    let get = ns
        .ip(&["route", "get", &unused])
        .unwrap_or_else(|e| e.to_string());
    assert!(!get.contains(" via "), "{get}");
    w.cnitool("del", "c3", &p3.path(), "web-3").expect("DEL");
    assert_ne!(a3, a1);

    // Traffic: pod -> its node, pod -> pod.
    p1.ping_ok(&w.node.v4.to_string()).unwrap();
    p1.ping_ok(&a2).unwrap();
    p2.ping_ok(&a1).unwrap();

    // ADD again for the same container: the same address.
    assert_eq!(w.add("c1", &p1, "web-1"), a1);
    assert_eq!(w.allocations(2).await.len(), 2);
    p1.ping_ok(&a2).unwrap();

    // CHECK passes while wired.
    w.cnitool("check", "c1", &p1.path(), "web-1")
        .expect("CHECK");

    // DEL: the host side, its route and the address go; DEL again is fine.
    w.cnitool("del", "c1", &p1.path(), "web-1").expect("DEL");
    w.cnitool("del", "c1", &p1.path(), "web-1")
        .expect("second DEL");
    let (got, want) = w.settle_on(vec![a2.clone()]).await;
    assert_eq!(got, want);
    let host = w.host_route("-4", &format!("{a1}/32"));
    assert!(host.trim().is_empty(), "{host}");
    assert_eq!(w.cali_links().lines().count(), 1);
    w.cnitool("del", "c2", &p2.path(), "web-2").expect("DEL");
    assert!(w.allocations(0).await.is_empty());
    assert!(w.cali_links().is_empty());
}

/// A CNI configuration directory under `dir` holding one conflist for
/// network `name`: margay on `socket`.
fn conf_dir(dir: &Path, name: &str, socket: &Path) -> PathBuf {
    let netd = dir.join("net.d");
    std::fs::create_dir_all(&netd).unwrap();
    std::fs::write(
        netd.join("10-margay.conflist"),
        json!({"cniVersion": "1.0.0", "name": name,
               "plugins": [{"type": "margay", "socket": socket}]})
        .to_string(),
    )
    .unwrap();
    netd
}

fn run(w: &World, env: &[(&str, String)], stdin: &str) -> (bool, Value) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    w.plugin(&env, stdin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_cni_code_and_leaves_nothing() {
    let mut w = world(vec![]).await;
    let pod = Netns::create("pod").unwrap();
    let netns = pod.path().display().to_string();
    let add_env = |ns: &str| -> Vec<(&str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", "bad1".into()),
            ("CNI_NETNS", ns.into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_PATH", "/usr/lib/cni".into()),
        ]
    };
    let code = |r: (bool, Value)| {
        assert!(!r.0, "expected a failure, got {}", r.1);
        assert!(
            r.1["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            r.1
        );
        r.1["code"].as_u64().unwrap_or(0)
    };
    let good = w.conf(json!({}));
    assert_eq!(code(run(&w, &add_env(&netns), "{garbage")), 6);
    assert_eq!(code(run(&w, &[("CNI_CONTAINERID", "x".into())], &good)), 4);
    let mut no_netns = add_env(&netns);
    no_netns.retain(|(k, _)| *k != "CNI_NETNS");
    assert_eq!(code(run(&w, &no_netns, &good)), 4);
    assert_eq!(
        code(run(
            &w,
            &add_env(&netns),
            &w.conf(json!({"cniVersion": "0.1.0"}))
        )),
        1
    );
    assert_eq!(
        code(run(
            &w,
            &add_env(&netns),
            &w.conf(json!({"frobnicate": true}))
        )),
        2
    );
    // The pod namespace does not exist: code 3, nothing allocated.
    assert_eq!(code(run(&w, &add_env("/run/netns/no-such-pod"), &good)), 3);
    assert!(w.allocations(0).await.is_empty());
    assert!(w.cali_links().is_empty());
    // VERSION and STATUS.
    let (ok, v) = run(&w, &[("CNI_COMMAND", "VERSION".into())], "{}");
    assert!(
        ok && v["supportedVersions"].as_array().unwrap().len() == 5,
        "{v}"
    );
    let (ok, v) = run(
        &w,
        &[("CNI_COMMAND", "STATUS".into())],
        &w.conf(json!({"cniVersion": "1.1.0"})),
    );
    assert!(ok, "STATUS: {v}");

    // A pod whose namespace vanished before DEL; DEL with an empty netns.
    let (ok, v) = run(&w, &add_env(&netns), &good);
    assert!(ok, "{v}");
    assert_eq!(w.allocations(1).await.len(), 1);
    drop(pod);
    let mut del = add_env("");
    del[0].1 = "DEL".into();
    let (ok, v) = run(&w, &del, &good);
    assert!(ok, "DEL after the netns went: {v}");
    assert!(w.allocations(0).await.is_empty());
    assert!(w.cali_links().is_empty());

    // Agent down: try again later (11), and STATUS says so too.
    w.agent.stop(Duration::from_secs(5));
    let pod = Netns::create("pod").unwrap();
    assert_eq!(
        code(run(&w, &add_env(&pod.path().display().to_string()), &good)),
        11
    );
    let r = run(
        &w,
        &[("CNI_COMMAND", "STATUS".into())],
        &w.conf(json!({"cniVersion": "1.1.0"})),
    );
    assert_eq!(code(r), 50, "STATUS with the agent down: not available");
}

/// The plugin's environment for `verb` on (container, ifname).
fn env_for(
    verb: &str,
    id: &str,
    ifname: &str,
    netns: &str,
    pod: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", verb.into()),
        ("CNI_CONTAINERID", id.into()),
        ("CNI_NETNS", netns.into()),
        ("CNI_IFNAME", ifname.into()),
        ("CNI_PATH", "/usr/lib/cni".into()),
        (
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID=uid-{id}"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_acts_on_its_own_attachment_only() {
    // The route conflict below is found by the resync (2 s here).
    let w = world_with(vec![], &["--resync-interval", "2"]).await;
    let good = w.conf(json!({}));
    let ok = |r: (bool, Value)| {
        assert!(
            r.0,
            "expected success, got {}\nagent log:\n{}",
            r.1,
            w.agent.log_tail(15)
        );
        r.1
    };
    let addr = |v: &Value| {
        v["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .to_string()
    };
    // Pod web-0 recreated: sandbox c2 added while c1 still awaits its DEL.
    let p1 = Netns::create("pod").unwrap();
    let p2 = Netns::create("pod").unwrap();
    let ns = |p: &Netns| p.path().display().to_string();
    // A call that must succeed: verb, container ID, interface, netns, pod.
    let call = |verb: &str, id: &str, ifname: &str, netns: &str, pod: &str| {
        ok(run(&w, &env_for(verb, id, ifname, netns, pod), &good))
    };
    call("ADD", "c1", "eth0", &ns(&p1), "web-0");
    let a2 = addr(&call("ADD", "c2", "eth0", &ns(&p2), "web-0"));
    call("DEL", "c1", "eth0", "", "web-0");
    call("CHECK", "c2", "eth0", &ns(&p2), "web-0");
    p2.ping_ok(&w.node.v4.to_string()).unwrap();
    let (got, want) = w.settle_on(vec![a2.clone()]).await;
    assert_eq!(got, want);

    // A second interface of the same container (as Multus adds).
    let b = addr(&call("ADD", "c2", "net1", &ns(&p2), "web-0"));
    assert_ne!(a2, b);
    call("CHECK", "c2", "eth0", &ns(&p2), "web-0");
    call("CHECK", "c2", "net1", &ns(&p2), "web-0");
    assert!(p2.ip(&["-o", "link", "show", "eth0"]).is_ok());

    // IDs whose handles collided before: a.b + c and a + b.c.
    let p3 = Netns::create("pod").unwrap();
    let x = addr(&call("ADD", "a.b", "c", &ns(&p3), "x"));
    let y = addr(&call("ADD", "a", "b.c", &ns(&p3), "y"));
    assert_ne!(x, y);
    let (got, want) = w
        .settle_on(vec![a2.clone(), b.clone(), x.clone(), y.clone()])
        .await;
    assert_eq!(got, want);
    // A DEL of an attachment that is not there touches nothing.
    call("DEL", "zz", "eth0", "", "web-0");
    assert_eq!(w.cali_links().lines().count(), 4, "{}", w.cali_links());

    // GC: without the list it removes nothing; another network's GC
    // removes nothing of ours; ours removes what is not listed.
    let gc = |name: &str, valid: Option<Value>| {
        let mut extra = json!({"cniVersion": "1.1.0", "name": name});
        if let Some(v) = valid {
            extra["cni.dev/valid-attachments"] = v;
        }
        run(
            &w,
            &[
                ("CNI_COMMAND", "GC".into()),
                ("CNI_PATH", "/usr/lib/cni".into()),
            ],
            &w.conf(extra),
        )
    };
    let (done, v) = gc("margay", None);
    assert!(!done && v["code"] == 7, "{v}");
    ok(gc("other-net", Some(json!([]))));
    assert_eq!(w.cali_links().lines().count(), 4, "{}", w.cali_links());
    ok(gc(
        "margay",
        Some(
            json!([{"containerID": "c2", "ifname": "eth0"}, {"containerID": "a.b", "ifname": "c"}]),
        ),
    ));
    let (got, want) = w.settle_on(vec![a2.clone(), x.clone()]).await;
    assert_eq!(got, want);
    assert_eq!(w.cali_links().lines().count(), 2, "{}", w.cali_links());
    call("CHECK", "c2", "eth0", &ns(&p2), "web-0");
    call("CHECK", "a.b", "c", &ns(&p3), "x");

    // Bad identities and namespaces: refused, nothing made.
    let routes = w.node.ns.ip(&["route", "show", "default"]).unwrap();
    let code = |r: (bool, Value)| {
        assert!(!r.0, "expected a failure, got {}", r.1);
        r.1["code"].as_u64().unwrap_or(0)
    };
    let file = w.dir.path().join("not-a-netns");
    std::fs::write(&file, "x").unwrap();
    for (netns, want) in [
        ("/proc/self/ns/net".to_string(), 4),
        (file.display().to_string(), 4),
        ("/proc/self/ns/mnt".to_string(), 4),
    ] {
        let got = code(run(&w, &env_for("ADD", "h1", "eth9", &netns, "h"), &good));
        assert_eq!(got, want, "ADD into {netns}");
    }
    assert_eq!(
        code(run(
            &w,
            &env_for("ADD", "-bad", "eth0", &ns(&p3), "h"),
            &good
        )),
        4
    );
    assert_eq!(
        code(run(
            &w,
            &env_for("ADD", "h1", "eth:0", &ns(&p3), "h"),
            &good
        )),
        4
    );
    let nameless = json!({"cniVersion": "1.0.0", "type": "margay", "socket": w.socket}).to_string();
    assert_eq!(
        code(run(
            &w,
            &env_for("ADD", "h1", "eth0", &ns(&p3), "h"),
            &nameless
        )),
        7
    );
    assert_eq!(w.node.ns.ip(&["route", "show", "default"]).unwrap(), routes);
    assert!(w.node.ns.ip(&["link", "show", "eth9"]).is_err());
    let (got, want) = w.settle_on(vec![a2.clone(), x]).await;
    assert_eq!(got, want);

    // A route of another protocol where Margay wants one (an operator's
    // static route to a pod address): reported, never replaced.
    let ns = &w.node.ns;
    let pod_route = format!("{a2}/32");
    ns.ip(&[
        "route", "replace", &pod_route, "dev", "lo", "proto", "static",
    ])
    .unwrap();
    let p4 = Netns::create("pod").unwrap();
    call("ADD", "poke", "eth0", &ns_path(&p4), "poke");
    wait::until("the conflict reported", T, POLL, || {
        Ok(w.agent.log_tail(80).contains("not Margay's").then_some(()))
    })
    .unwrap();
    let r = ns.ip(&["route", "show", &pod_route]).unwrap();
    assert!(r.contains("dev lo") && r.contains("proto static"), "{r}");
    // Once it is gone, Margay's comes back.
    ns.ip(&["route", "del", &pod_route, "proto", "static"])
        .unwrap();
    call("ADD", "poke", "eth1", &ns_path(&p4), "poke");
    wait::until("the pod route back", T, POLL, || {
        let r = ns.ip(&["route", "show", &pod_route]).unwrap();
        Ok((r.contains("dev cali") && r.contains("proto 78")).then_some(()))
    })
    .unwrap();
}

/// Spawns `cmd` with `input` written to its stdin (closed after it).
fn spawn_fed(cmd: &mut std::process::Command, input: &str) -> std::process::Child {
    let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    child
}

fn ns_path(p: &Netns) -> String {
    p.path().display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_whose_caller_is_killed_leaves_nothing() {
    // No spares: the ADD waits for the (frozen) datastore, and the plugin
    // is killed meanwhile.
    let w = world_with(vec![], &["--ipam-spares", "0"]).await;
    let pod = Netns::create("pod").unwrap();
    let good = w.conf(json!({}));
    w.api.freeze(true).unwrap();
    let env = env_for(
        "ADD",
        "k1",
        "eth0",
        &pod.path().display().to_string(),
        "killed",
    );
    let mut cmd = w.node.ns.cmd(paths::workspace_bin("margay").unwrap());
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = spawn_fed(&mut cmd, &good);
    // Not a wait: the ADD hangs on the frozen datastore for 2 s, then its
    // caller dies (nothing to observe; the outage window is the test).
    tokio::time::sleep(Duration::from_secs(2)).await;
    child.kill().unwrap();
    let _ = child.wait();
    w.api.freeze(false).unwrap();
    // The ADD finishes in the agent, sees nobody waiting, and is undone:
    // once the datastore has answered (the agent's pod routes show what
    // the kernel holds), neither an address nor an interface is left.
    wait::until("the cancelled ADD undone", T, POLL, || {
        Ok(w.agent
            .log_tail(200)
            .contains("the caller of an ADD went away before its answer")
            .then_some(()))
    })
    .unwrap();
    let log = || {
        w.agent
            .log_tail(60)
            .lines()
            .filter(|l| !l.contains("cert bypassed"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (got, _) = w.settle_on(vec![]).await;
    assert!(got.is_empty(), "address left held: {got:?}\n{}", log());
    assert!(w.cali_links().is_empty(), "{}\n{}", w.cali_links(), log());
    assert!(w.cali_links().is_empty(), "{}", w.cali_links());
    assert!(pod.ip(&["link", "show", "eth0"]).is_err());
    // The runtime's retry works from scratch.
    ok_add(&w, "k1", &pod);
}

fn ok_add(w: &World, id: &str, pod: &Netns) {
    let a = w.add(id, pod, "killed");
    assert!(!a.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_portmap_bandwidth_and_tuning_work_after_margay() {
    let w = world(vec![
        json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
        json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}}),
    ])
    .await;
    let pod = Netns::create("pod").unwrap();
    let port = 18000 + (std::process::id() % 1000) as u16;
    let caps = json!({
        "portMappings": [{"hostPort": port, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 1_000_000}
    });
    // The whole chain, as a runtime calls it (with the capabilities).
    let chain = |verb: &str| {
        let out = w
            .node
            .ns
            .cmd(paths::cnitool().unwrap())
            .args([verb, &w.conflist.display().to_string(), "chained"])
            .arg(pod.path())
            .env("CNI_PATH", cni_path())
            .env("CNI_CACHE_DIR", w.dir.path().join("cache"))
            .env("CAP_ARGS", caps.to_string())
            .output()
            .unwrap();
        margay_tests::assert_ran(&out, &format!("{verb}: "));
        out.stdout
    };
    let result: Value = serde_json::from_slice(&chain("add")).unwrap();
    let addr = result["ips"][0]["address"].as_str().unwrap().to_string();

    // tuning ran in the pod with margay's result as prevResult.
    assert_eq!(pod.sysctl_get("net.core.somaxconn").unwrap().trim(), "512");
    // bandwidth shaped the host side margay made.
    let host_if = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let tc = w
        .node
        .ns
        .exec("tc", &["qdisc", "show", "dev", &host_if])
        .unwrap();
    assert!(tc.contains("tbf"), "{tc}");
    // portmap: a host port on the node reaches the pod's server.
    let log = w.dir.path().join("server.log");
    let mut srv = pod.cmd(paths::system("socat").unwrap());
    srv.args(["TCP-LISTEN:80,fork,reuseaddr", "SYSTEM:echo margay-pod"]);
    let _server = Daemon::spawn("pod server", srv, &log).unwrap();
    let client = Netns::create("client").unwrap();
    margay_harness::netns::veth(&client, "eth0", &w.node.ns, "cl0").unwrap();
    client
        .ip(&["addr", "add", "192.168.77.2/24", "dev", "eth0"])
        .unwrap();
    client.ip(&["link", "set", "eth0", "up"]).unwrap();
    w.node
        .ns
        .ip(&["addr", "add", "192.168.77.1/24", "dev", "cl0"])
        .unwrap();
    w.node.ns.ip(&["link", "set", "cl0", "up"]).unwrap();
    let got = wait::until("host port answers", T, Duration::from_millis(300), || {
        let r = client.exec(
            "socat",
            &[
                "-T2",
                "-",
                &format!("TCP:192.168.77.1:{port},connect-timeout=2"),
            ],
        );
        Ok(r.ok().filter(|s| s.contains("margay-pod")))
    });
    assert!(
        got.is_ok(),
        "host port {port} -> {addr}:80 did not answer: {got:?}"
    );

    // DEL through the whole chain leaves nothing of margay's.
    chain("del");
    assert!(w.allocations(0).await.is_empty());
    assert!(w.cali_links().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_burst_then_runtime_retries_leave_exact_state() {
    let mut w = world(vec![]).await;
    let pods: Vec<Netns> = (0..16).map(|_| Netns::create("pod").unwrap()).collect();
    let env_for = |verb: &str, i: usize, ns: &Netns| -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), verb.into()),
            ("CNI_CONTAINERID".into(), format!("burst{i}")),
            ("CNI_NETNS".into(), ns.path().display().to_string()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_PATH".into(), "/usr/lib/cni".into()),
            (
                "CNI_ARGS".into(),
                format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=b{i}"),
            ),
        ]
    };
    let conf = w.conf(json!({}));
    // 16 ADDs at once; the agent is killed while they run.
    let outcomes: Vec<(bool, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let env = env_for("ADD", i, ns);
                let (w, conf) = (&w, &conf);
                s.spawn(move || {
                    let env: Vec<(&str, &str)> =
                        env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    w.plugin(&env, conf)
                })
            })
            .collect();
        // Not a wait: the agent dies 120 ms into the ADDs, mid-flight.
        std::thread::sleep(Duration::from_millis(120));
        w.agent.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    w.agent.kill9();
    let failed: Vec<usize> = (0..16).filter(|&i| !outcomes[i].0).collect();
    for &i in &failed {
        assert_eq!(
            outcomes[i].1["code"], 11,
            "a crash is 'try again': {}",
            outcomes[i].1
        );
    }
    // The agent comes back; the runtime DELs what failed (as kubelet does)
    // and retries those ADDs.
    let _ = std::fs::remove_file(&w.socket);
    w.agent = start_agent(&w.node, &w.api, &w.socket, &w.dir.path().join("agent2.log"));
    let run_env = |env: Vec<(String, String)>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        w.plugin(&env, &conf)
    };
    for &i in &failed {
        let (ok, v) = run_env(env_for("DEL", i, &pods[i]));
        assert!(ok, "DEL after crash: {v}");
    }
    let mut addrs = std::collections::BTreeSet::new();
    for (i, ns) in pods.iter().enumerate() {
        let (ok, v) = run_env(env_for("ADD", i, ns));
        assert!(ok, "ADD {i} after restart: {v}");
        let a = v["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .to_string();
        if outcomes[i].0 {
            let before = outcomes[i].1["ips"][0]["address"].as_str().unwrap();
            assert_eq!(
                before.trim_end_matches("/32"),
                a,
                "a retried ADD keeps its address"
            );
        }
        assert!(addrs.insert(a), "duplicate address");
    }
    eprintln!("{} of 16 ADDs were cut by the crash", failed.len());
    assert_eq!(w.allocations(16).await.len(), 16);
    assert_eq!(w.cali_links().lines().count(), 16);
    for a in &addrs {
        pods[0].ping_ok(a).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_outgoing_masquerades_to_outside_the_pools_and_owns_one_table() {
    use kube::api::{Patch, PatchParams};
    use margay_api::ipam::IPPool;
    use margay_harness::topo::FABRIC_GW_V4;

    let w = world(vec![]).await;
    let ns = &w.node.ns;
    // Someone else's table: must survive every rebuild.
    ns.exec("nft", &["add", "table", "inet", "operator"])
        .unwrap();
    let p1 = Netns::create("pod").unwrap();
    let p2 = Netns::create("pod").unwrap();
    let _a1 = w.add("c1", &p1, "nat-1");
    let a2 = w.add("c2", &p2, "nat-2");
    // The fabric router has no route to the pods: without NAT, no answer.
    let gw = FABRIC_GW_V4.to_string();
    assert!(!p1.ping(&gw), "reached {gw} without NAT");

    let pools: Api<IPPool> = Api::all(w.client.clone());
    let set_nat = |on: bool| {
        let pools = pools.clone();
        async move {
            pools
                .patch(
                    "default",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"natOutgoing": on}})),
                )
                .await
                .unwrap();
        }
    };
    set_nat(true).await;
    wait::until("pod reaches outside through NAT", T, POLL, || {
        Ok(p1.ping(&gw).then_some(()))
    })
    .unwrap();
    let table = ns
        .exec("nft", &["list", "table", "inet", "margay"])
        .unwrap();
    assert!(table.contains("masquerade"), "{table}");
    // Pod to pod stays un-NATed and works.
    p1.ping_ok(&a2).unwrap();

    set_nat(false).await;
    wait::until("table removed", T, POLL, || {
        Ok(ns
            .exec("nft", &["list", "table", "inet", "margay"])
            .is_err()
            .then_some(()))
    })
    .unwrap();
    assert!(
        !p1.ping(&gw),
        "still NATed after natOutgoing was turned off"
    );
    let all = ns.exec("nft", &["list", "tables"]).unwrap();
    assert!(all.contains("table inet operator"), "{all}");
    for (id, p, name) in [("c1", &p1, "nat-1"), ("c2", &p2, "nat-2")] {
        w.cnitool("del", id, &p.path(), name).expect("DEL");
    }
}

/// Podman 4.3 with its CNI backend, as an operator runs it: a container on
/// the `margay` network gets its address, reaches its node and another
/// pod, and `--rm` (CNI DEL) leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_with_the_cni_backend_runs_a_container_on_margay() {
    let w = world(vec![]).await;
    let d = w.dir.path();
    // A rootfs with busybox only: no image, no registry.
    let rootfs = d.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for sub in ["proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    for applet in ["sh", "ip", "ping"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let netd = conf_dir(d, "margay", &w.socket);
    let margay_dir = paths::workspace_bin("margay").unwrap();
    let conf = d.join("containers.conf");
    std::fs::write(
        &conf,
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"{}\"]\nnetwork_config_dir = \"{}\"\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\n\
             tmp_dir = \"{}\"\nstatic_dir = \"{}\"\n",
            margay_dir.parent().unwrap().display(),
            paths::cni_plugin_dir().display(),
            netd.display(),
            d.join("events.log").display(),
            d.join("podman-tmp").display(),
            d.join("podman-static").display(),
        ),
    )
    .unwrap();
    let other = Netns::create("pod").unwrap();
    let other_ip = w.add("c-other", &other, "other");
    let node_ip = w.node.v4.to_string();
    let script = format!(
        "ip -4 addr show eth0 && ip -4 route && ping -c1 -W2 {node_ip} && ping -c1 -W2 {other_ip}"
    );
    let out = w
        .node
        .ns
        .nsenter("podman")
        .env("CONTAINERS_CONF", &conf)
        .arg("--root")
        .arg(d.join("podman-root"))
        .arg("--runroot")
        .arg(d.join("podman-run"))
        .args([
            "--storage-driver",
            "vfs",
            "run",
            "--rm",
            "--network",
            "margay",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            "--rootfs",
        ])
        .arg(&rootfs)
        .args(["/bin/sh", "-c", &script])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "podman run failed:\n{text}\nagent log:\n{}",
        w.agent.log_tail(20)
    );
    assert!(text.contains("inet 10.244.0."), "{text}");
    assert!(text.contains("default via 169.254.1.1 dev eth0"), "{text}");
    // Both pings answered (the script stops at the first failure).
    assert_eq!(text.matches("1 packets received").count(), 2, "{text}");
    // --rm ran CNI DEL: only the other pod is left.
    assert_eq!(
        w.allocations(1).await.len(),
        1,
        "podman's address was not released"
    );
    assert_eq!(w.cali_links().lines().count(), 1, "{}", w.cali_links());
    w.cnitool("del", "c-other", &other.path(), "other")
        .expect("DEL");
}

/// Dual-stack: with an IPv4 and an IPv6 pool each pod gets a /32 and a
/// /128, an IPv6 default route via the host side's link-local address,
/// and pods reach each other over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_pods_get_both_families_and_reach_each_other() {
    let w = world(vec![]).await;
    margay_tests::add_pool(&w.client, "v6", "fd00:244::/120", Some(122)).await;
    let p1 = Netns::create("pod").unwrap();
    let p2 = Netns::create("pod").unwrap();
    // The agent caches pools for a few seconds: retry ADD until the new
    // pool is seen (a runtime would just create the next pod later).
    let v6_of = |id: &str, p: &Netns, name: &str| -> Option<String> {
        let out = w.cnitool("add", id, &p.path(), name).expect("ADD");
        let v: Value = serde_json::from_str(&out).unwrap();
        v["ips"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|ip| ip["address"].as_str())
            .find(|a| a.contains(':'))
            .map(|a| a.trim_end_matches("/128").to_string())
    };
    let b1 = wait::until("an IPv6 address", T, Duration::from_millis(500), || {
        let got = v6_of("d1", &p1, "dual-1");
        if got.is_none() {
            w.cnitool("del", "d1", &p1.path(), "dual-1").expect("DEL");
        }
        Ok(got)
    })
    .unwrap();
    let b2 = v6_of("d2", &p2, "dual-2").expect("IPv6 for the second pod");
    assert!(
        b1.starts_with("fd00:244::") && b2.starts_with("fd00:244::"),
        "{b1} {b2}"
    );
    // The agent turns IPv6 forwarding on for IPv6 pods.
    w.node
        .ns
        .sysctl("net.ipv6.conf.all.forwarding", "0")
        .unwrap();
    let p3 = Netns::create("pod").unwrap();
    assert!(v6_of("d3", &p3, "dual-3").is_some());
    w.cnitool("del", "d3", &p3.path(), "dual-3").expect("DEL");
    let addr = p1.ip(&["-6", "addr", "show", "eth0"]).unwrap();
    assert!(addr.contains(&format!("{b1}/128")), "{addr}");
    let routes = p1.ip(&["-6", "route", "show"]).unwrap();
    assert!(
        routes.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{routes}"
    );
    let host = w.host_route("-6", &format!("{b1}/128"));
    assert!(
        host.contains("dev cali") && host.contains("proto 78"),
        "{host}"
    );
    wait::until("pod to pod over IPv6", T, POLL, || {
        Ok(p1
            .exec("ping", &["-6", "-c1", "-W1", &b2])
            .is_ok()
            .then_some(()))
    })
    .unwrap();
    // And IPv4 still.
    let v4 = p2.ip(&["-4", "-o", "addr", "show", "eth0"]).unwrap();
    let a2 = v4
        .split_whitespace()
        .nth(3)
        .unwrap()
        .trim_end_matches("/32")
        .to_string();
    p1.ping_ok(&a2).unwrap();
    for (id, p, name) in [("d1", &p1, "dual-1"), ("d2", &p2, "dual-2")] {
        w.cnitool("del", id, &p.path(), name).expect("DEL");
    }
    assert!(w.allocations(0).await.is_empty());
}

/// Only root may call the agent: the socket is 0600, and even when its
/// mode is loosened the agent checks the caller's credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_root_callers_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let w = world(vec![]).await;
    let pod = Netns::create("pod").unwrap();
    let mode = std::fs::metadata(&w.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let call_as_nobody = || {
        let mut cmd = w.node.ns.cmd("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(paths::workspace_bin("margay").unwrap())
            .env_clear()
            .envs([
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "nobody1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/usr/lib/cni"),
            ])
            .env("CNI_NETNS", pod.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let out = spawn_fed(&mut cmd, &w.conf(json!({})))
            .wait_with_output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), v)
    };
    let (ok, v) = call_as_nobody();
    assert!(!ok, "{v}");
    assert_eq!(v["code"], 11, "{v}");
    assert!(
        v["details"]
            .as_str()
            .unwrap_or("")
            .contains("ermission denied"),
        "{v}"
    );
    // Loosened by mistake: the agent still refuses.
    std::fs::set_permissions(&w.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, v) = call_as_nobody();
    assert!(!ok, "{v}");
    assert_eq!(v["code"], 11, "{v}");
    wait::until("refusal logged", T, POLL, || {
        Ok(w.agent
            .log_tail(50)
            .contains("refused a non-root caller")
            .then_some(()))
    })
    .unwrap();
    assert!(w.allocations(0).await.is_empty());
    assert!(w.cali_links().is_empty());
}

/// An OCI image archive whose only layer is busybox-static, entrypoint
/// `sleep`: the sandbox ("pause") image, made offline.
fn pause_image(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join("layer");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let config = margay_lab::image::Config {
        entrypoint: ["/bin/busybox", "sleep", "1000000"]
            .map(String::from)
            .to_vec(),
        cmd: vec![],
    };
    let tarball = dir.join("pause.tar");
    margay_lab::image::archive(&root, name, &config, &tarball).unwrap();
    tarball
}

/// containerd 1.6 through its CRI API, as kubelet drives it: RunPodSandbox
/// (CNI ADD through `margay`), the pod reachable with its address recorded
/// for the pod, StopPodSandbox (DEL with prevResult), RemovePodSandbox
/// (DEL with an empty netns): nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_cri_sandboxes_run_on_margay() {
    use margay_tests::cri::runtime_service_client::RuntimeServiceClient;
    use margay_tests::cri::{
        PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest,
        RunPodSandboxRequest, StopPodSandboxRequest,
    };

    let w = world(vec![]).await;
    let d = w.dir.path().join("containerd");
    std::fs::create_dir_all(&d).unwrap();
    // containerd takes one plugin directory: margay, and the loopback
    // plugin containerd itself runs for every sandbox.
    let bin = d.join("cni-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(paths::workspace_bin("margay").unwrap(), bin.join("margay")).unwrap();
    std::fs::copy(
        paths::cni_plugin_dir().join("loopback"),
        bin.join("loopback"),
    )
    .unwrap();
    let netd = conf_dir(&d, "k8s-pod-network", &w.socket);
    let image = "docker.io/margay-test/pause:1";
    let sock = d.join("containerd.sock");
    let config = d.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{netd}"
    max_conf_num = 1
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = sock.display(),
            bin = bin.display(),
            netd = netd.display(),
        ),
    )
    .unwrap();
    let mut cmd = w.node.ns.nsenter("containerd");
    cmd.arg("--config").arg(&config);
    let containerd = Daemon::spawn("containerd", cmd, &d.join("containerd.log")).unwrap();
    wait::until("containerd socket", T, POLL, || {
        Ok(sock.exists().then_some(()))
    })
    .unwrap();
    let tarball = pause_image(&d, image);
    let out = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&sock)
        .args(["-n", "k8s.io", "images", "import"])
        .arg(&tarball)
        .output()
        .unwrap();
    margay_tests::assert_ran(&out, "ctr import: ");

    let path = sock.clone();
    let channel = tonic::transport::Endpoint::try_from("http://containerd")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap();
    let mut cri = RuntimeServiceClient::new(channel);
    let run = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "web-cri".into(),
                    uid: "uid-web-cri".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                hostname: "web-cri".into(),
                log_directory: d.join("logs").display().to_string(),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        })
        .await;
    let id = match run {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(e) => panic!(
            "RunPodSandbox: {e}\ncontainerd log:\n{}\nagent log:\n{}",
            containerd.log_tail(30),
            w.agent.log_tail(20)
        ),
    };
    let status = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    let ip = status.status.unwrap().network.unwrap().ip;
    assert!(ip.starts_with("10.244.0."), "pod IP {ip:?}");
    // The pod answers from its node, and IPAM recorded it for the pod.
    w.node.ns.ping_ok(&ip).unwrap();
    let recorded = wait::until_async("attribution written", POLL * 200, POLL, || async {
        let all = margay_tests::allocations(&w.client).await.into_iter();
        Ok(all
            .filter(|(a, r)| *a == ip && r.pod.is_some())
            .map(|(_, r)| r)
            .next())
    })
    .await
    .expect("attribution written");
    let pod = recorded.pod.unwrap();
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        ("default", "web-cri")
    );
    assert!(
        recorded.handle.contains(&format!("/{id}/")),
        "{} vs {id}",
        recorded.handle
    );

    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .unwrap();
    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
        .await
        .unwrap();
    assert!(w.allocations(0).await.is_empty(), "address not released");
    assert!(w.cali_links().is_empty(), "{}", w.cali_links());
    drop(cri);
    drop(containerd);
}

/// With spares ready, pods start while the control plane does not answer;
/// once it is back, the attributions are written behind. A burst of 6
/// starts before raised the spares above the floor of 8 (twice the
/// burst): 12 pods start with the API server frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_start_while_the_apiserver_is_frozen_and_ipam_catches_up() {
    const FROZEN: usize = 12;
    let w = world(vec![]).await;
    // The agent has listed what its policy engine needs: ADDs answered
    // (an agent that never listed Pods cannot tell which rules a pod
    // needs, and fails its ADDs; that is not what this test is about);
    // six of them at once, the burst the spares are sized by.
    let warm: Vec<Netns> = (0..6).map(|_| Netns::create("pod").unwrap()).collect();
    std::thread::scope(|s| {
        for (i, p) in warm.iter().enumerate() {
            let w = &w;
            s.spawn(move || w.add(&format!("warm{i}"), p, &format!("warm-{i}")));
        }
    });
    for (i, p) in warm.iter().enumerate() {
        w.cnitool("del", &format!("warm{i}"), &p.path(), &format!("warm-{i}"))
            .expect("DEL");
    }
    // Spares ready: pre-assigned addresses of n1 in the datastore.
    let spares = wait::until_async("the spares", POLL * 200, POLL, || async {
        let all = margay_tests::allocations(&w.client).await;
        let n = all
            .iter()
            .filter(|(_, a)| a.handle.starts_with("spare.n1."))
            .count();
        if n >= FROZEN {
            Ok(Some(n))
        } else {
            Err(format!("{n} spares").into())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(spares >= FROZEN, "only {spares} spares");
    w.api.freeze(true).unwrap();
    let pods: Vec<Netns> = (0..FROZEN).map(|_| Netns::create("pod").unwrap()).collect();
    let addrs: Vec<String> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| w.add(&format!("f{i}"), p, &format!("frozen-{i}")))
        .collect();
    w.api.freeze(false).unwrap();
    pods[0].ping_ok(&addrs[1]).unwrap();
    pods[1].ping_ok(&addrs[FROZEN - 1]).unwrap();
    // The datastore learns who holds them.
    let got = w.allocations(FROZEN).await;
    let mut want = addrs.clone();
    want.sort();
    assert_eq!(got, want);
    for (i, p) in pods.iter().enumerate() {
        w.cnitool("del", &format!("f{i}"), &p.path(), &format!("frozen-{i}"))
            .expect("DEL");
    }
    assert!(w.allocations(0).await.is_empty());
}

/// A kill at each step of an ADD or DEL: the agent, started with
/// `MARGAY_CRASH_AT=<point>:3`, SIGKILLs itself the third time a call of
/// a burst of six reaches that point (after IPAM handed out the address;
/// after the pod is wired and its alias records it; after the
/// attribution is queued; as the write-behind of an attribution or of a
/// release starts; after a DEL unwired the pod). Started again, with the
/// runtime retrying what failed (DEL then ADD, as the kubelet does): no
/// address is held twice, every pod's interface holds exactly what IPAM
/// says its handle holds, and deleting every pod leaves no address and
/// no interface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_at_each_step_of_add_and_del_loses_nothing_and_holds_nothing_twice() {
    const PODS: usize = 6;
    let mut w = world(vec![]).await;
    let points = [
        "add.taken",
        "add.wired",
        "add.committed",
        "write.rename",
        "del.unwired",
        "write.release",
    ];
    let conf = w.conf(json!({}));
    for (round, point) in points.iter().enumerate() {
        w.agent.kill9();
        let _ = std::fs::remove_file(&w.socket);
        let mut cmd = margay_tests::agent_cmd(&w.node, "n1", &w.api, &w.socket).unwrap();
        cmd.env(margay_task::crash::ENV, format!("{point}:3"));
        let log = w.dir.path().join(format!("agent-{point}.log"));
        w.agent = margay_tests::start_agent(cmd, &w.socket, &log).unwrap();
        let pods: Vec<Netns> = (0..PODS).map(|_| Netns::create("pod").unwrap()).collect();
        let env_for = |verb: &str, i: usize| -> Vec<(String, String)> {
            vec![
                ("CNI_COMMAND".into(), verb.into()),
                ("CNI_CONTAINERID".into(), format!("kill{round}-{i}")),
                ("CNI_NETNS".into(), pods[i].path().display().to_string()),
                ("CNI_IFNAME".into(), "eth0".into()),
                ("CNI_PATH".into(), "/usr/lib/cni".into()),
                (
                    "CNI_ARGS".into(),
                    format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=k{round}-{i}"),
                ),
            ]
        };
        let run = |w: &World, env: Vec<(String, String)>| {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            w.plugin(&env, &conf)
        };
        let deleting = point.starts_with("del.") || *point == "write.release";
        if deleting {
            for i in 0..PODS {
                let (ok, v) = run(&w, env_for("ADD", i));
                assert!(ok, "{point}: ADD {i}: {v}");
            }
        }
        let verb = if deleting { "DEL" } else { "ADD" };
        let outcomes: Vec<(bool, Value)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..PODS)
                .map(|i| {
                    let (env, w, run) = (env_for(verb, i), &w, &run);
                    s.spawn(move || run(w, env))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The agent killed itself at the point (write-behinds run just
        // after the calls: waited for).
        let mut p = wait::Poller::new(
            "the agent killed at its point",
            Duration::from_secs(20),
            Duration::from_millis(50),
        );
        while w.agent.is_running() {
            p.next()
                .await
                .unwrap_or_else(|e| panic!("{point}: {e}\n{}", w.agent.log_tail(20)));
        }
        let failed: Vec<usize> = (0..PODS).filter(|&i| !outcomes[i].0).collect();
        eprintln!("{point}: {} of {PODS} calls cut by the kill", failed.len());
        // Back up, and the runtime retries.
        let _ = std::fs::remove_file(&w.socket);
        let log = w.dir.path().join(format!("agent-{point}-after.log"));
        w.agent = start_agent(&w.node, &w.api, &w.socket, &log);
        if deleting {
            for i in 0..PODS {
                let (ok, v) = run(&w, env_for("DEL", i));
                assert!(ok, "{point}: DEL {i} retried: {v}");
            }
        } else {
            for &i in &failed {
                let (ok, v) = run(&w, env_for("DEL", i));
                assert!(ok, "{point}: DEL {i} after the kill: {v}");
            }
            let mut addrs = std::collections::BTreeSet::new();
            for i in 0..PODS {
                let (ok, v) = run(&w, env_for("ADD", i));
                assert!(ok, "{point}: ADD {i} retried: {v}");
                let a = v["ips"][0]["address"].as_str().unwrap().to_string();
                if outcomes[i].0 {
                    assert_eq!(
                        outcomes[i].1["ips"][0]["address"], a,
                        "{point}: a retried ADD keeps its address"
                    );
                }
                let has = pods[i].ip(&["-4", "addr", "show", "eth0"]).unwrap();
                assert!(
                    has.contains(&a),
                    "{point}: pod {i} has {has}, IPAM said {a}"
                );
                assert!(addrs.insert(a.clone()), "{point}: {a} held twice");
            }
            // IPAM holds exactly those, each under its pod's handle.
            let want: Vec<String> = addrs
                .iter()
                .map(|a| a.trim_end_matches("/32").to_string())
                .collect();
            let (got, want) = w.settle_on(want).await;
            assert_eq!(got, want, "{point}: IPAM against the pods");
            for (ip, a) in margay_tests::allocations(&w.client).await {
                if a.handle.starts_with("spare.") {
                    continue;
                }
                let i: usize = a
                    .handle
                    .split('/')
                    .nth(1)
                    .and_then(|c| c.strip_prefix(&format!("kill{round}-"))?.parse().ok())
                    .unwrap_or_else(|| panic!("{point}: {ip} held by {}", a.handle));
                let has = pods[i].ip(&["-4", "addr", "show", "eth0"]).unwrap();
                assert!(
                    has.contains(&format!("{ip}/32")),
                    "{point}: {ip} is {}'s, pod has {has}",
                    a.handle
                );
            }
            for i in 0..PODS {
                let (ok, v) = run(&w, env_for("DEL", i));
                assert!(ok, "{point}: DEL {i}: {v}");
            }
        }
        let left = w.allocations(0).await;
        assert!(left.is_empty(), "{point}: addresses left: {left:?}");
        assert!(w.cali_links().is_empty(), "{point}: {}", w.cali_links());
    }
}
