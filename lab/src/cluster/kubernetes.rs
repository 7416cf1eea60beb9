//! `margay-lab up --kubernetes`: the lab with real Kubernetes nodes.
//!
//! A control plane on the fabric (etcd, kube-apiserver serving on the
//! router's address 10.99.0.254 with a CA of its own, kube-controller-
//! manager, kube-scheduler: [`ApiServer::start_in`]); per lab node a
//! containerd and a kubelet in the node's network namespace and a mount
//! namespace of its own ([`KubeletNode`]); the images built offline
//! ([`crate::image`]) and imported into each node. Margay is then installed
//! exactly as a user would: the `kubernetes-services-endpoint` ConfigMap
//! (no kube-proxy here: the agents reach the apiserver directly), then
//! `kubectl apply -f deploy/margay.yaml` or `helm install margay
//! charts/margay -n kube-system`; the DaemonSet's init container puts the
//! plugin and its conflist on each node, and from then on each kubelet,
//! through containerd, calls the plugin for every pod. The lab's pods are
//! a Deployment of `margay.dev/lab-pod` (and Pods pinned to a node for
//! `pod add`); the lab finds each one's network through its sandbox
//! process and names it for `ip netns` ([`Attached`]), so the route and
//! ping checks work as in the plain lab.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node as KubeNode, Pod as KubePod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use margay_api::bgp::BGPPeer;
use margay_api::ipam::IPPool;
use margay_harness::kube::ApiServer;
use margay_harness::kubelet::{KubeletNode, KubeletSpec};
use margay_harness::netns::Netns;
use margay_harness::topo::FABRIC_GW_V4;
use margay_harness::{names, paths};
use margay_ipam::k8s::list_items;

use crate::cluster::{Cluster, Ground, LabNode, Options, Pod, TOR_ASN, tor};
use crate::{Install, Tor, image};

/// The namespace Margay is installed in.
pub const NAMESPACE: &str = "kube-system";
/// The pool the manifest and chart create.
pub const POOL: &str = "default-ipv4";
/// Label on every lab pod (the Deployment's and the pinned ones).
pub const LAB_LABEL: &str = "margay.dev/lab";
/// The lab Deployment.
pub const DEPLOYMENT: &str = "lab-pod";

/// The repository (the manifest and the chart): where this binary was
/// built from.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A pod's network namespace named for `ip netns` (`ip netns attach`);
/// dropping it removes the name only (the pod keeps its namespace).
#[derive(Debug)]
pub struct Attached(String);

impl Attached {
    /// Names the network namespace of process `pid`.
    fn new(pid: u32) -> anyhow::Result<(Self, Netns)> {
        let name = names::unique("kpod");
        let out = Command::new("ip")
            .args(["netns", "attach", &name, &pid.to_string()])
            .output()?;
        if !out.status.success() {
            bail!(
                "ip netns attach {name} {pid}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((Self(name.clone()), Netns::borrowed(&name)))
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn kubectl(api: &ApiServer, args: &[&str]) -> anyhow::Result<String> {
    let out = api.kubectl()?.args(args).output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the cluster: control plane, nodes, Margay installed, the
/// DaemonSet ready on every node (pods come from [`deploy`]).
pub async fn start(opts: Options) -> anyhow::Result<Cluster> {
    let ground = Ground::new(&opts)?;
    let mut api = ApiServer::start_in(ground.fabric.ns(), FABRIC_GW_V4)
        .await
        .context("kube-apiserver")?;
    api.start_controllers().context("controllers")?;
    let client = api.client().await?;
    let images = build_images(&ground.work.path().join("images"))?;
    let mut nodes = Vec::new();
    for i in 1..=opts.nodes {
        let name = format!("node{i}");
        let node = ground.fabric.add_node_in(&name, opts.subnet_of(i))?;
        let spec = KubeletSpec {
            name: name.clone(),
            ip: node.v4,
            server: api.node_url(),
            pause_image: image::PAUSE_IMAGE.into(),
            images: images.clone(),
        };
        let kubelet = KubeletNode::start(&node.ns, &ground.work.path().join(&name), &spec)
            .with_context(|| format!("the kubelet of {name}"))?;
        let socket = kubelet
            .host_path("/run/margay/agent.sock")
            .context("the agent's socket")?;
        let conflist = kubelet
            .host_path("/etc/cni/net.d/10-margay.conflist")
            .context("the conflist")?;
        nodes.push(LabNode {
            kubelet: Some(kubelet),
            ..LabNode::new(name, node, socket, conflist)
        });
    }
    let c = Cluster::new(ground, api, client, nodes, opts);
    wait_nodes_registered(&c).await?;
    match c.opts.kubernetes {
        Some(Install::Ptp) => install_ptp(&c)?,
        Some(Install::Noop) => install_noop(&c)?,
        _ => {
            install(&c).await?;
            wait_daemonset(&c, Duration::from_secs(300)).await?;
        }
    }
    Ok(c)
}

/// The three images, built into `dir`.
fn build_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let bin = paths::workspace_bin("margay-agent")?;
    let bin_dir = bin.parent().context("the binaries' directory")?;
    let (m, l, p) = (
        dir.join("margay.tar"),
        dir.join("lab-pod.tar"),
        dir.join("pause.tar"),
    );
    image::margay(bin_dir, image::MARGAY_IMAGE, &m).context("Margay's image")?;
    image::lab_pod(&l)?;
    image::pause(&p)?;
    Ok(vec![p, l, m])
}

async fn wait_nodes_registered(c: &Cluster) -> anyhow::Result<()> {
    let api: Api<KubeNode> = Api::all(c.client.clone());
    let t = Instant::now();
    loop {
        let have = list_items(&api, &ListParams::default()).await?.len();
        if have == c.nodes.len() {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!(
                "{have} of {} kubelets registered; node1's kubelet log ends:\n{}",
                c.nodes.len(),
                first_kubelet_log(c)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The last 30 lines of node1's kubelet log, for an error.
fn first_kubelet_log(c: &Cluster) -> String {
    let log = c.nodes[0]
        .kubelet
        .as_ref()
        .map(|k| k.kubelet_log())
        .unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Installs Margay as docs/install.md says, with the lab's settings: the
/// pool's encapsulation and the ToR as a BGPPeer.
async fn install(c: &Cluster) -> anyhow::Result<()> {
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), NAMESPACE);
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kubernetes-services-endpoint"},
        "data": {
            "KUBERNETES_SERVICE_HOST": FABRIC_GW_V4.to_string(),
            "KUBERNETES_SERVICE_PORT": c.api.port().to_string(),
        }
    }))?;
    cms.create(&PostParams::default(), &cm).await?;
    let encap = c.opts.encap.pool();
    let encap_name = serde_json::to_value(encap)?
        .as_str()
        .unwrap_or("None")
        .to_string();
    match c.opts.kubernetes {
        Some(Install::Helm) => {
            let chart = repo().join("charts/margay");
            let out = Command::new(paths::helm()?)
                .arg("--kubeconfig")
                .arg(c.api.kubeconfig())
                .args(["install", "margay"])
                .arg(&chart)
                .args(["--namespace", NAMESPACE])
                // A list index replaces the whole list: the pool in full.
                .arg("--set")
                .arg(format!(
                    "ipPools[0].name={POOL},ipPools[0].cidr=10.244.0.0/16,ipPools[0].blockSize=26,\
                     ipPools[0].natOutgoing=true,ipPools[0].encapsulation={encap_name}"
                ))
                .args(helm_peer(c.opts.tor))
                .output()?;
            if !out.status.success() {
                bail!(
                    "helm install: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        _ => {
            // docs/install.md's steps: the CRDs, established, then the
            // rest (one apply of both fails: the custom resources' kinds
            // are not served yet).
            let crds = repo().join("deploy/crds").display().to_string();
            kubectl(&c.api, &["apply", "-f", &crds])?;
            kubectl(
                &c.api,
                &[
                    "wait",
                    "--for",
                    "condition=established",
                    "--timeout=60s",
                    "-f",
                    &crds,
                ],
            )?;
            let manifest = repo().join("deploy/margay.yaml");
            kubectl(&c.api, &["apply", "-f", &manifest.display().to_string()])?;
            if encap_name != "None" {
                let pools: Api<IPPool> = Api::all(c.client.clone());
                pools
                    .patch(
                        POOL,
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"spec": {"encapsulation": encap}})),
                    )
                    .await?;
            }
            if c.opts.tor != Tor::None {
                let peers: Api<BGPPeer> = Api::all(c.client.clone());
                peers
                    .create(&PostParams::default(), &tor::peer(None))
                    .await?;
            }
        }
    }
    Ok(())
}

/// Debian's reference plugins where the kubelets look for them.
const PTP_PLUGINS: &str = "/usr/lib/cni";

/// [`Install::Ptp`]: `ptp` + `host-local` on every node, node N's pods in
/// 10.244.N.0/24 (its index from 1), and on each node a route to every
/// other node's range through that node: a routed baseline without Margay.
fn install_ptp(c: &Cluster) -> anyhow::Result<()> {
    for (i, n) in c.nodes.iter().enumerate() {
        let Some(k) = &n.kubelet else { continue };
        let plugins =
            ["ptp", "host-local", "loopback"].map(|p| (Path::new(PTP_PLUGINS).join(p), p));
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "ptp",
            "plugins": [{
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": ptp_range(i)?}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                }
            }]
        });
        put_cni(k, &plugins, &conf)
            .context("ptp's plugins (Debian's containernetworking-plugins)")?;
        for (j, m) in c.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            n.node.ns.ip(&[
                "route",
                "replace",
                &ptp_range(j)?,
                "via",
                &m.node.v4.to_string(),
            ])?;
        }
    }
    Ok(())
}

/// [`Install::Noop`]: `cni-noop` (built beside margay-lab) on every node,
/// asked for made-up addresses.
fn install_noop(c: &Cluster) -> anyhow::Result<()> {
    let plugin = paths::workspace_bin("cni-noop")
        .context("cni-noop (cargo build -p margay-bench --bin cni-noop)")?;
    let conf = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "noop",
        "plugins": [{"type": "cni-noop", "fakeAddress": true}]
    });
    for k in c.nodes.iter().filter_map(|n| n.kubelet.as_ref()) {
        put_cni(k, &[(plugin.clone(), "cni-noop")], &conf)?;
    }
    Ok(())
}

/// The `plugins` (source, name) into the node of kubelet `k`'s
/// /opt/cni/bin and `conf` as its /etc/cni/net.d/10-NAME.conflist.
fn put_cni(
    k: &margay_harness::kubelet::KubeletNode,
    plugins: &[(PathBuf, &str)],
    conf: &serde_json::Value,
) -> anyhow::Result<()> {
    let bin = k
        .host_path("/opt/cni/bin")
        .context("the node's /opt/cni/bin")?;
    std::fs::create_dir_all(&bin)?;
    for (src, name) in plugins {
        std::fs::copy(src, bin.join(name))
            .with_context(|| format!("{} to {}", src.display(), bin.display()))?;
    }
    let dir = k
        .host_path("/etc/cni/net.d")
        .context("the node's /etc/cni/net.d")?;
    std::fs::create_dir_all(&dir)?;
    let name = conf["name"].as_str().context("the conflist's name")?;
    std::fs::write(
        dir.join(format!("10-{name}.conflist")),
        serde_json::to_vec_pretty(conf)?,
    )?;
    Ok(())
}

/// The pod range of the node at `index` (0-based) in [`Install::Ptp`]:
/// `10.244.<index + 1>.0/24`, so 255 nodes at most.
fn ptp_range(index: usize) -> anyhow::Result<String> {
    match u8::try_from(index + 1) {
        Ok(n) => Ok(format!("10.244.{n}.0/24")),
        Err(_) => bail!("--install ptp gives each node a /24 of 10.244.0.0/16: at most 255 nodes"),
    }
}

/// The chart values for the ToR peer.
fn helm_peer(tor: Tor) -> Vec<String> {
    if tor == Tor::None {
        return Vec::new();
    }
    vec![
        "--set".into(),
        format!(
            "bgp.peers[0].name=tor,bgp.peers[0].peerIP={FABRIC_GW_V4},bgp.peers[0].asNumber={TOR_ASN}"
        ),
    ]
}

/// Waits until the agent's DaemonSet is up to date and ready on every node.
pub async fn wait_daemonset(c: &Cluster, timeout: Duration) -> anyhow::Result<()> {
    let api: Api<DaemonSet> = Api::namespaced(c.client.clone(), NAMESPACE);
    let t = Instant::now();
    let want = i32::try_from(c.nodes.len())?;
    loop {
        if let Ok(ds) = api.get("margay-agent").await
            && let Some(st) = &ds.status
            && st.desired_number_scheduled == want
            && st.number_ready == want
            && st.updated_number_scheduled == Some(want)
            && st.observed_generation == ds.metadata.generation
        {
            return Ok(());
        }
        if t.elapsed() > timeout {
            let pods = kubectl(&c.api, &["-n", NAMESPACE, "get", "pods", "-o", "wide"])
                .unwrap_or_default();
            bail!(
                "the margay-agent DaemonSet is not ready on every node after {timeout:?}:\n{pods}\nnode1's kubelet log ends:\n{}",
                first_kubelet_log(c)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The lab pod Deployment: `replicas` of `margay.dev/lab-pod`, spread
/// over the nodes; returns once every replica runs with an address.
pub async fn deploy(c: &mut Cluster, replicas: usize) -> anyhow::Result<()> {
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": DEPLOYMENT},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": DEPLOYMENT}},
            "template": {
                "metadata": {"labels": {"app": DEPLOYMENT, LAB_LABEL: "pod"}},
                "spec": pod_spec(None),
            }
        }
    }))?;
    api.create(&PostParams::default(), &d).await?;
    wait_pods(c, replicas, Duration::from_secs(300)).await
}

fn pod_spec(node: Option<&str>) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "automountServiceAccountToken": false,
        "terminationGracePeriodSeconds": 1,
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app": DEPLOYMENT}}
        }],
        "containers": [{
            "name": "pod", "image": image::LAB_POD_IMAGE,
            "imagePullPolicy": "IfNotPresent",
        }]
    });
    if let Some(n) = node {
        spec["nodeName"] = n.into();
        spec.as_object_mut()
            .map(|o| o.remove("topologySpreadConstraints"));
    }
    spec
}

/// Waits until `want` lab pods run with addresses, then refreshes the
/// lab's pod list.
async fn wait_pods(c: &mut Cluster, want: usize, timeout: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        refresh_pods(c).await?;
        if c.pods.len() == want {
            return Ok(());
        }
        if t.elapsed() > timeout {
            let pods = kubectl(&c.api, &["get", "pods", "-A", "-o", "wide"]).unwrap_or_default();
            bail!(
                "{} of {want} lab pods running after {timeout:?}:\n{pods}",
                c.pods.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The lab's pod list from the API: every running pod labelled
/// [`LAB_LABEL`] with an address, its network found through its sandbox
/// on its node (named for `ip netns`, kept while the pod keeps it).
pub async fn refresh_pods(c: &mut Cluster) -> anyhow::Result<()> {
    let api: Api<KubePod> = Api::all(c.client.clone());
    let list = list_items(&api, &ListParams::default().labels(LAB_LABEL)).await?;
    let mut sandboxes = std::collections::BTreeMap::new();
    let mut old: Vec<Pod> = std::mem::take(&mut c.pods);
    let mut pods = Vec::new();
    for p in list {
        let (Some(name), Some(st), Some(spec)) = (p.metadata.name.clone(), &p.status, &p.spec)
        else {
            continue;
        };
        let (Some(ip), Some(node)) = (st.pod_ip.clone(), spec.node_name.clone()) else {
            continue;
        };
        if st.phase.as_deref() != Some("Running") || p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let uid = p.metadata.uid.clone().unwrap_or_default();
        if let Some(k) = old.iter().position(|o| o.id == uid && o.ip == ip) {
            pods.push(old.remove(k));
            continue;
        }
        let Some(n) = c.nodes.iter().find(|n| n.name == node) else {
            continue;
        };
        let Some(kubelet) = &n.kubelet else { continue };
        if !sandboxes.contains_key(&node) {
            sandboxes.insert(node.clone(), kubelet.sandboxes()?);
        }
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let Some(sb) = sandboxes[&node]
            .iter()
            .find(|s| s.name == name && s.namespace == ns)
        else {
            continue;
        };
        let (attached, netns) = Attached::new(sb.pid)?;
        pods.push(Pod {
            _server: None,
            namespace: ns.clone(),
            pod_name: name.clone(),
            name,
            node,
            ns: netns,
            ip,
            ip6: None,
            host_if: None,
            id: uid,
            _attached: Some(attached),
        });
    }
    pods.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
    c.pods = pods;
    Ok(())
}

/// `pod add NODE NAME`: a Pod pinned to NODE; its address once it runs.
pub async fn add_pod(
    c: &mut Cluster,
    node: &str,
    name: &str,
    o: &super::PodOpts,
) -> anyhow::Result<String> {
    c.node_index(node)?;
    let namespace = o.namespace.as_deref().unwrap_or("default");
    c.ensure_namespace(namespace).await?;
    let api: Api<KubePod> = Api::namespaced(c.client.clone(), namespace);
    let mut labels = o.labels.clone();
    labels.insert(LAB_LABEL.to_string(), "pod".to_string());
    let mut spec = pod_spec(Some(node));
    spec["containers"][0]["ports"] = serde_json::json!(super::container_ports(&o.serve));
    let pod: KubePod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }))?;
    api.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating Pod {namespace}/{name}"))?;
    let t = Instant::now();
    loop {
        refresh_pods(c).await?;
        if let Some(i) = c.pods.iter().position(|p| p.name == name) {
            // The listeners run in the pod's network namespace (the
            // image has no margay-lab; the network is what counts).
            let server = c.serve(&c.pods[i].ns, name, &o.serve)?;
            c.pods[i]._server = server;
            return Ok(c.pods[i].ip.clone());
        }
        if t.elapsed() > Duration::from_secs(120) {
            let d =
                kubectl(&c.api, &["describe", "pod", "-n", namespace, name]).unwrap_or_default();
            bail!("Pod {name} not running after 120 s:\n{d}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `pod del NAME`: deletes the Pod (its kubelet calls CNI DEL) and waits
/// until it is gone.
pub async fn del_pod(c: &mut Cluster, name: &str) -> anyhow::Result<()> {
    let namespace = c
        .pods
        .iter()
        .find(|p| p.name == name)
        .map_or_else(|| "default".to_string(), |p| p.namespace.clone());
    let api: Api<KubePod> = Api::namespaced(c.client.clone(), &namespace);
    api.delete(name, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting Pod {name}"))?;
    let t = Instant::now();
    while api.get_opt(name).await?.is_some() {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("Pod {name} still there after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    refresh_pods(c).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn ptp_ranges_end_at_255_nodes() {
        assert_eq!(super::ptp_range(0).unwrap(), "10.244.1.0/24");
        assert_eq!(super::ptp_range(254).unwrap(), "10.244.255.0/24");
        assert!(super::ptp_range(255).is_err());
    }
}
