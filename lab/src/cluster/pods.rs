//! Lab pods: a network namespace wired through the real `margay` plugin
//! (`cnitool` as a runtime on the node calls it), the Pod object and its
//! status written as a kubelet would, its listeners; another sandbox of a
//! Pod; CNI DEL. On real kubelets ([`super::kubernetes`]) Pods are made
//! through the API instead.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Pod as KubePod, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use margay_harness::netns::Netns;
use margay_harness::paths;
use margay_harness::process::Daemon;

use super::{Cluster, LabNode, create_unless_there, json, kubernetes};

/// A pod: a namespace wired by the `margay` plugin.
#[derive(Debug)]
pub struct Pod {
    /// Its listeners (`--serve`), stopped before its namespace goes.
    pub(crate) _server: Option<Daemon>,
    /// Pod name (unique in the lab, whatever its namespace).
    pub name: String,
    /// Its Kubernetes Pod's name: `name`, except for another sandbox of a
    /// Pod ([`Cluster::add_sandbox`]).
    pub pod_name: String,
    /// Its Kubernetes namespace.
    pub namespace: String,
    /// Its node.
    pub node: String,
    /// Its network namespace.
    pub ns: Netns,
    /// Its IPv4 address.
    pub ip: String,
    /// Its IPv6 address ([`super::Options::pool6_cidr`]).
    pub ip6: Option<String>,
    /// Its interface on the node (`cali…`), as the CNI result names it
    /// (unknown for a Pod of `--kubernetes`).
    pub host_if: Option<String>,
    /// The container ID the runtime used.
    pub id: String,
    /// A Pod's sandbox network, named for `ip netns` (`--kubernetes`).
    pub(crate) _attached: Option<kubernetes::Attached>,
}

/// What a lab pod is made with beyond its node and name.
#[derive(Debug, Clone, Default)]
pub struct PodOpts {
    /// Its namespace (`default` if none), created if new.
    pub namespace: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Listeners it runs (`tcp:80`, `udp:80`), also its named container
    /// ports `serve-80-tcp`, ...
    pub serve: Vec<String>,
    /// Its CNI ADD uses a container ID of 64 hex digits, as containerd
    /// and CRI-O make them, instead of the readable `lab-<name>` (on
    /// real kubelets the runtime's IDs are used anyway).
    pub runtime_id: bool,
}

/// A container ID as runtimes make them: 64 hex digits, unique per pod
/// name.
pub fn runtime_container_id(name: &str) -> String {
    (0..4)
        .map(|k| {
            format!(
                "{:016x}",
                margay_api::stable::fnv1a(format!("{k}/{name}").as_bytes())
            )
        })
        .collect()
}

/// `cnitool VERB CONFLIST ID NETNS` in `node`, as a runtime on that node
/// calls plugins: the workspace's `margay` and Debian's reference plugins on
/// `CNI_PATH`, results cached in `cache`. Callers add `CNI_ARGS`.
pub fn cnitool_cmd(
    node: &Netns,
    verb: &str,
    conflist: &Path,
    id: &str,
    netns: &Path,
    cache: &Path,
) -> anyhow::Result<Command> {
    let margay = paths::workspace_bin("margay")?;
    let mut cmd = node.cmd(paths::cnitool()?);
    cmd.args([verb, &conflist.display().to_string(), id])
        .arg(netns)
        .env(
            "CNI_PATH",
            format!(
                "{}:{}",
                margay.parent().unwrap_or(Path::new("/")).display(),
                paths::cni_plugin_dir().display()
            ),
        )
        .env("CNI_CACHE_DIR", cache);
    Ok(cmd)
}

/// What a pod's CNI ADD result says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Added {
    /// Its IPv4 address.
    ip: String,
    /// Its IPv6 address, if a pool of that family gave one.
    ip6: Option<String>,
    /// The node's side of its interface (the one with no sandbox).
    host_if: Option<String>,
}

impl Added {
    fn parse(result: &str) -> anyhow::Result<Self> {
        let v: serde_json::Value = serde_json::from_str(result)?;
        let addrs: Vec<&str> = v["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str())
            .map(|a| a.split('/').next().unwrap_or(a))
            .collect();
        let host_if = v["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
            .and_then(|i| i["name"].as_str())
            .map(str::to_string);
        Ok(Self {
            ip: addrs
                .iter()
                .find(|a| !a.contains(':'))
                .context("no IPv4 address in the CNI result")?
                .to_string(),
            ip6: addrs
                .iter()
                .find(|a| a.contains(':'))
                .map(ToString::to_string),
            host_if,
        })
    }
}

/// The container ports of a pod serving `serve` (`tcp:80`): named
/// `serve-80-tcp`, as NetworkPolicy named ports refer to them.
pub(crate) fn container_ports(serve: &[String]) -> Vec<serde_json::Value> {
    serve
        .iter()
        .map(|l| {
            let (proto, port) = l.split_once(':').unwrap_or(("tcp", l));
            serde_json::json!({
                "name": format!("serve-{port}-{proto}"),
                "containerPort": port.parse::<u16>().unwrap_or(0),
                "protocol": proto.to_ascii_uppercase(),
            })
        })
        .collect()
}

impl Cluster {
    fn cnitool(
        &self,
        n: &LabNode,
        verb: &str,
        id: &str,
        netns: &Path,
        (namespace, pod): (&str, &str),
        uid: &str,
    ) -> anyhow::Result<String> {
        let out = cnitool_cmd(
            &n.node.ns,
            verb,
            &n.conflist,
            id,
            netns,
            &self.work.path().join(format!("cni-cache-{}", n.name)),
        )?
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID={uid}"
            ),
        )
        .output()?;
        if !out.status.success() {
            bail!(
                "CNI {verb} of {pod} on {}: {}{}",
                n.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates pod `name` on node `node` in namespace `default`: see
    /// [`Cluster::add_pod_with`].
    pub async fn add_pod(&mut self, node: &str, name: &str) -> anyhow::Result<String> {
        self.add_pod_with(node, name, &PodOpts::default()).await
    }

    /// Creates pod `name` on node `node`: its namespace if new, the Pod
    /// object (labels, its listeners as named container ports), a network
    /// namespace, CNI ADD through the real plugin, the Pod's status written
    /// as a kubelet would (so every node's policy sees its address), and
    /// its listeners started. Returns its address.
    pub async fn add_pod_with(
        &mut self,
        node: &str,
        name: &str,
        o: &PodOpts,
    ) -> anyhow::Result<String> {
        if self.opts.kubernetes.is_some() {
            return kubernetes::add_pod(self, node, name, o).await;
        }
        if self.pods.iter().any(|p| p.name == name) {
            bail!("a pod named {name:?} exists already");
        }
        let i = self.node_index(node)?;
        let namespace = o.namespace.as_deref().unwrap_or("default").to_string();
        self.ensure_namespace(&namespace).await?;
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), &namespace);
        let ports = container_ports(&o.serve);
        let obj = api
            .create(
                &PostParams::default(),
                &json(serde_json::json!({
                    "metadata": {"name": name, "labels": o.labels},
                    "spec": {"nodeName": node, "automountServiceAccountToken": false,
                             "containers": [{"name": "c", "image": "busybox", "ports": ports}]}
                }))?,
            )
            .await
            .with_context(|| format!("creating Pod {namespace}/{name}"))?;
        let uid = obj.metadata.uid.unwrap_or_default();
        let mut pod = match self.wire(i, name, (&namespace, name), &uid, o.runtime_id) {
            Ok(p) => p,
            Err(e) => {
                let _ = api.delete(name, &DeleteParams::default()).await;
                return Err(e);
            }
        };
        // What the kubelet would write: the other nodes learn the
        // addresses.
        let ips: Vec<&String> = std::iter::once(&pod.ip).chain(pod.ip6.as_ref()).collect();
        let pod_ips: Vec<serde_json::Value> =
            ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "status": {"phase": "Running", "podIP": pod.ip, "podIPs": pod_ips}
            })),
        )
        .await
        .with_context(|| format!("writing Pod {namespace}/{name}'s status"))?;
        pod._server = self.serve(&pod.ns, name, &o.serve)?;
        let ip = pod.ip.clone();
        self.pods.push(pod);
        Ok(ip)
    }

    /// Another sandbox of lab pod `of`'s Pod, as a runtime makes one when
    /// it recreates a pod's sandbox: a network namespace of its own, wired
    /// on `of`'s node by CNI ADD with a container ID of its own (`lab-NAME`)
    /// and the same Pod (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID), its
    /// listeners `serve` started. It is lab pod `name`: a second attachment
    /// of the Pod, with addresses of its own (the Pod's status still names
    /// the first). [`Cluster::del_pod`] of it DELs this attachment only and
    /// leaves the Pod. Plain lab only. Returns its IPv4 address.
    pub async fn add_sandbox(
        &mut self,
        of: &str,
        name: &str,
        serve: &[String],
    ) -> anyhow::Result<String> {
        if self.opts.kubernetes.is_some() {
            bail!("another sandbox of a Pod is for the plain lab only");
        }
        if self.pods.iter().any(|p| p.name == name) {
            bail!("a pod named {name:?} exists already");
        }
        let first = self
            .pods
            .iter()
            .find(|p| p.name == of)
            .with_context(|| format!("no pod named {of:?}"))?;
        let (node, namespace, pod_name) = (
            first.node.clone(),
            first.namespace.clone(),
            first.pod_name.clone(),
        );
        let i = self.node_index(&node)?;
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), &namespace);
        let uid = api
            .get(&pod_name)
            .await
            .with_context(|| format!("reading Pod {namespace}/{pod_name}"))?
            .metadata
            .uid
            .unwrap_or_default();
        let mut pod = self.wire(i, name, (&namespace, &pod_name), &uid, false)?;
        pod._server = self.serve(&pod.ns, name, serve)?;
        let ip = pod.ip.clone();
        self.pods.push(pod);
        Ok(ip)
    }

    /// Lab pod `name`: a network namespace wired on node `i` by CNI ADD
    /// (container ID `lab-NAME`) as an attachment of Pod `namespace/pod`,
    /// its addresses and interface as the result says (no listeners yet).
    fn wire(
        &self,
        i: usize,
        name: &str,
        (namespace, pod): (&str, &str),
        uid: &str,
        runtime_id: bool,
    ) -> anyhow::Result<Pod> {
        // Pod names may be 253 characters: the network namespace's name,
        // a file name, keeps a prefix (the harness makes it unique).
        let hint: String = name.chars().take(40).collect();
        let ns = Netns::create(&format!("pod-{hint}"))?;
        let id = if runtime_id {
            runtime_container_id(name)
        } else {
            format!("lab-{name}")
        };
        let out = self.cnitool(
            &self.nodes[i],
            "add",
            &id,
            &ns.path(),
            (namespace, pod),
            uid,
        )?;
        let added = Added::parse(&out)?;
        Ok(Pod {
            _server: None,
            name: name.to_string(),
            pod_name: pod.to_string(),
            namespace: namespace.to_string(),
            node: self.nodes[i].name.clone(),
            ns,
            ip: added.ip,
            ip6: added.ip6,
            host_if: added.host_if,
            id,
            _attached: None,
        })
    }

    /// Starts pod `name`'s listeners (`--serve`) in its namespace `ns`.
    pub(crate) fn serve(
        &self,
        ns: &Netns,
        name: &str,
        serve: &[String],
    ) -> anyhow::Result<Option<Daemon>> {
        if serve.is_empty() {
            return Ok(None);
        }
        let mut cmd = ns.cmd(paths::workspace_bin("margay-lab")?);
        cmd.args(["netcheck", "serve", &serve.join(",")]);
        // A file name holds 255 bytes; a pod name may be 253 characters.
        let log = if name.len() <= 100 {
            format!("serve-{name}.log")
        } else {
            format!("serve-{}.log", ns.name())
        };
        let log = self.work.path().join(log);
        Ok(Some(Daemon::spawn("netcheck", cmd, &log)?))
    }

    /// Creates namespace `name` unless it exists.
    pub async fn ensure_namespace(&self, name: &str) -> anyhow::Result<()> {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        if api.get_opt(name).await?.is_none() {
            let ns = json(serde_json::json!({"metadata": {"name": name}}))?;
            create_unless_there(&api, &ns)
                .await
                .with_context(|| format!("creating namespace {name}"))?;
        }
        // No controller-manager in the plain lab makes its `default`
        // ServiceAccount, which admission wants for every Pod.
        if self.opts.kubernetes.is_none() {
            let sa: Api<ServiceAccount> = Api::namespaced(self.client.clone(), name);
            if sa.get_opt("default").await?.is_none() {
                let obj = json(serde_json::json!({"metadata": {"name": "default"}}))?;
                create_unless_there(&sa, &obj)
                    .await
                    .context("creating ServiceAccount default")?;
            }
        }
        Ok(())
    }

    /// CNI DEL of pod `name`, then its namespace goes, and its Pod object
    /// unless another sandbox of it is left ([`Cluster::add_sandbox`]).
    pub async fn del_pod(&mut self, name: &str) -> anyhow::Result<()> {
        if self.opts.kubernetes.is_some() {
            return kubernetes::del_pod(self, name).await;
        }
        let k = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod named {name:?}"))?;
        let i = self.node_index(&self.pods[k].node)?;
        let p = &self.pods[k];
        self.cnitool(
            &self.nodes[i],
            "del",
            &p.id,
            &p.ns.path(),
            (&p.namespace, &p.pod_name),
            "",
        )?;
        let p = self.pods.remove(k);
        if self
            .pods
            .iter()
            .any(|q| q.namespace == p.namespace && q.pod_name == p.pod_name)
        {
            // Another sandbox of its Pod is still there.
            return Ok(());
        }
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), &p.namespace);
        // No kubelet finishes a graceful delete here: force it.
        let _ = api
            .delete(&p.pod_name, &DeleteParams::default().grace_period(0))
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Added;

    #[test]
    fn a_cni_result_gives_both_families_and_the_host_interface() {
        let dual = r#"{"cniVersion":"1.0.0",
            "interfaces":[{"name":"cali0123456789a","mac":"ee:ee:ee:ee:ee:ee"},
                          {"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/run/netns/p"}],
            "ips":[{"address":"10.244.0.5/32","gateway":"169.254.1.1","interface":1},
                   {"address":"fd00:244::5/128","gateway":"fe80::ecee:eeff:feee:eeee","interface":1}]}"#;
        assert_eq!(
            Added::parse(dual).unwrap(),
            Added {
                ip: "10.244.0.5".into(),
                ip6: Some("fd00:244::5".into()),
                host_if: Some("cali0123456789a".into()),
            }
        );
        let v6_only = r#"{"ips":[{"address":"fd00:244::5/128"}]}"#;
        assert!(Added::parse(v6_only).is_err());
    }
}
