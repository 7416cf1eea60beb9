//! The upstream NetworkPolicy cases (kubernetes/kubernetes
//! test/e2e/network/netpol/network_policy.go: 42 over TCP, 3 over UDP and
//! 3 over SCTP), ported to the lab and run against the agents.
//!
//! As upstream: namespaces x, y and z, pods a, b and c in each (labelled
//! `pod: a` ...), every pod serving TCP and UDP on 80 and 81 with the named
//! container ports `serve-80-tcp` ...; each case names the pods its truth
//! table covers (upstream's own subsets), creates its policies through the
//! API server, and compares the expected table for a port and protocol
//! with what real probes between the pods observe, self-traffic ignored;
//! the probes repeat until the table matches or 45 s pass. The pods are
//! spread over two nodes, so most pairs cross nodes. Between cases every
//! policy is deleted, labels are restored, and full connectivity must come
//! back (deletion restores the default).
//!
//! Each expected table is also checked against margay-policy's
//! specification (`spec::decide` over the objects read back from the API):
//! upstream's expectations and our reading of the API docs must agree
//! before the kernel is asked.
//!
//! `policy_updates_under_traffic_keep_the_truth_table`: policies created,
//! updated and deleted and labels changed one step at a time while pods
//! ping each other; after each step every pair's verdicts equal the
//! specification's, and the pings no policy concerns never pause.
//!
//! The namespaces are not labelled by the test: the lab's API server
//! (1.20) does not set `kubernetes.io/metadata.name`, and Margay reads it
//! as set, as 1.21 and later do, so the cases using it pass on 1.20 too.
//!
//! SCTP: this host's kernel has no SCTP (CONFIG_IP_SCTP), so the three
//! SCTP cases run in a VM with Debian's stock kernel, where the test runs
//! itself (as tests/ipip.rs does); the two cases whose policies name SCTP
//! but probe TCP run here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace as KubeNamespace, Pod as KubePod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use margay_harness::{paths, wait};
use margay_lab::cluster::{Cluster, PodOpts};
use margay_policy::spec::{self, Connection};
use margay_policy::{Namespace, Pod, Policy, Proto, World};
use serde_json::{Value, json};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NAMES: [&str; 3] = ["a", "b", "c"];
/// The namespace name label.
const NS: &str = "kubernetes.io/metadata.name";
const TCP: Proto = Proto::Tcp;
const UDP: Proto = Proto::Udp;

/// A pod of the model, "x/a".
fn index(s: &str) -> usize {
    let (ns, name) = s.split_once('/').unwrap();
    let n = NAMESPACES.iter().position(|x| *x == ns).unwrap();
    let p = NAMES.iter().position(|x| *x == name).unwrap();
    3 * n + p
}

fn model_name(i: usize) -> String {
    format!("{}/{}", NAMESPACES[i / 3], NAMES[i % 3])
}

/// Whether pattern `pat` ("*", "x" or "x/a") covers pod `i`.
fn covers(pat: &str, i: usize) -> bool {
    pat == "*" || pat == NAMESPACES[i / 3] || pat == model_name(i)
}

/// Upstream's Reachability: the expected fate of every ordered pair of the
/// case's pods, changed by later expectations over earlier ones.
#[derive(Clone)]
struct Reach {
    pods: Vec<usize>,
    m: BTreeMap<(usize, usize), bool>,
}

impl Reach {
    fn all(pods: &[usize], ok: bool) -> Self {
        let m = pods
            .iter()
            .flat_map(|f| pods.iter().map(move |t| ((*f, *t), ok)))
            .collect();
        Self {
            pods: pods.to_vec(),
            m,
        }
    }

    /// Every pair from a pod `from` covers to a pod `to` covers.
    fn peer(&mut self, from: &str, to: &str, ok: bool) -> &mut Self {
        for ((f, t), v) in self.m.iter_mut() {
            if covers(from, *f) && covers(to, *t) {
                *v = ok;
            }
        }
        self
    }

    fn expect(&mut self, from: &str, to: &str, ok: bool) -> &mut Self {
        self.m.insert((index(from), index(to)), ok);
        self
    }

    fn all_ingress(&mut self, to: &str, ok: bool) -> &mut Self {
        self.peer("*", to, ok)
    }

    fn all_egress(&mut self, from: &str, ok: bool) -> &mut Self {
        self.peer(from, "*", ok)
    }

    /// The pairs that count (self-traffic is ignored, as upstream).
    fn pairs(&self) -> impl Iterator<Item = ((usize, usize), bool)> + '_ {
        self.m
            .iter()
            .filter(|((f, t), _)| f != t)
            .map(|(k, v)| (*k, *v))
    }

    /// Upstream's table: rows from, columns to, `.` reached, `X` not.
    fn table(&self, m: &BTreeMap<(usize, usize), bool>) -> String {
        let mut s = String::from("     ");
        for t in &self.pods {
            let _ = write!(s, " {}", model_name(*t));
        }
        s.push('\n');
        for f in &self.pods {
            let _ = write!(s, "{}", model_name(*f));
            for t in &self.pods {
                let c = match (f == t, m.get(&(*f, *t))) {
                    (true, _) => '-',
                    (_, Some(true)) => '.',
                    (_, Some(false)) => 'X',
                    (_, None) => '?',
                };
                let _ = write!(s, "   {c}");
            }
            s.push('\n');
        }
        s
    }
}

/// A NetworkPolicy as upstream's GenNetworkPolicyWithNameAndPod...:
/// `ingress`/`egress` given set that direction and its policyType.
fn policy(name: &str, selector: Value, ingress: Option<Value>, egress: Option<Value>) -> Value {
    let mut spec = json!({"podSelector": selector});
    let mut types = Vec::new();
    if let Some(i) = ingress {
        spec["ingress"] = i;
        types.push("Ingress");
    }
    if let Some(e) = egress {
        spec["egress"] = e;
        types.push("Egress");
    }
    spec["policyTypes"] = json!(types);
    json!({"metadata": {"name": name}, "spec": spec})
}

/// A policy `name` selecting the pods `a` with `ingress` rules only.
fn ingress_to_a(name: &str, ingress: Value) -> Value {
    policy(name, pod_is("a"), Some(ingress), None)
}

fn pod_is(name: &str) -> Value {
    json!({"matchLabels": {"pod": name}})
}

fn ns_is(ns: &str) -> Value {
    json!({"matchLabels": {NS: ns}})
}

fn ns_not_in(ns: &str) -> Value {
    json!({"matchExpressions": [{"key": NS, "operator": "NotIn", "values": [ns]}]})
}

/// The /4 holding `ip` (upstream's makeLargeCIDRForIP).
fn large_cidr(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        panic!("IPv4 lab")
    };
    let base = u32::from(v4) & 0xf000_0000;
    format!("{}/4", std::net::Ipv4Addr::from(base))
}

struct Env {
    c: Cluster,
    /// Addresses of the pods started, by model index.
    ips: BTreeMap<usize, IpAddr>,
    /// What every pod serves on 80 and 81 (and reset checks).
    protos: Vec<Proto>,
    lab: PathBuf,
    case: String,
    pods: Vec<usize>,
    cases: usize,
}

impl Env {
    fn lab_name(i: usize) -> String {
        model_name(i).replace('/', "-")
    }

    fn ip(&self, pod: &str) -> IpAddr {
        self.ips[&index(pod)]
    }

    /// Starts case `name` over `pods`, from a clean state.
    async fn case(&mut self, name: &str, pods: &[&str]) {
        self.reset().await;
        self.case = name.to_string();
        self.pods = pods.iter().map(|p| index(p)).collect();
        self.cases += 1;
        println!("case {}: {name}", self.cases);
    }

    fn reach(&self, ok: bool) -> Reach {
        Reach::all(&self.pods, ok)
    }

    fn policies(&self, ns: &str) -> Api<NetworkPolicy> {
        Api::namespaced(self.c.client.clone(), ns)
    }

    async fn create(&self, ns: &str, p: Value) {
        let p: NetworkPolicy = serde_json::from_value(p).unwrap();
        self.policies(ns)
            .create(&PostParams::default(), &p)
            .await
            .unwrap_or_else(|e| panic!("{}: creating a policy in {ns}: {e}", self.case));
    }

    /// Replaces the policy of the same name (upstream's UpdatePolicy).
    async fn update(&self, ns: &str, p: Value) {
        let mut p: NetworkPolicy = serde_json::from_value(p).unwrap();
        let api = self.policies(ns);
        let name = p.metadata.name.clone().unwrap();
        let old = api.get(&name).await.unwrap();
        p.metadata.resource_version = old.metadata.resource_version;
        api.replace(&name, &PostParams::default(), &p)
            .await
            .unwrap_or_else(|e| panic!("{}: updating {ns}/{name}: {e}", self.case));
    }

    async fn label_namespace(&self, ns: &str, key: &str, value: Option<&str>) {
        let api: Api<KubeNamespace> = Api::all(self.c.client.clone());
        let patch = json!({"metadata": {"labels": {key: value}}});
        api.patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Merges `labels` (a null value removes one) into pod "x/a"'s.
    async fn label_pod(&self, pod: &str, labels: Value) {
        let (ns, _) = pod.split_once('/').unwrap();
        let api: Api<KubePod> = Api::namespaced(self.c.client.clone(), ns);
        let patch = json!({"metadata": {"labels": labels}});
        api.patch(
            &Self::lab_name(index(pod)),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    }

    async fn delete_policies(&self) {
        for ns in NAMESPACES {
            self.policies(ns)
                .delete_collection(&DeleteParams::default(), &ListParams::default())
                .await
                .unwrap();
        }
    }

    /// No policies, the labels the pods and namespaces started with, and
    /// every pod reaching every other again.
    async fn reset(&mut self) {
        self.delete_policies().await;
        self.label_namespace("y", "ns2", None).await;
        self.label_namespace("y", "team", None).await;
        let started: Vec<usize> = self.ips.keys().copied().collect();
        for i in &started {
            self.label_pod(
                &model_name(*i),
                json!({"pod2": null, "target": null, "role": null}),
            )
            .await;
        }
        let was = std::mem::replace(&mut self.case, "reset".into());
        self.pods = started;
        let all = self.reach(true);
        for proto in self.protos.clone() {
            for port in [80, 81] {
                self.probe_until(port, proto, &all, &format!("after {was:?}"))
                    .await;
            }
        }
    }

    /// What the probes from every pod of the case to every other see.
    fn observe(&self, port: u16, proto: Proto) -> BTreeMap<(usize, usize), bool> {
        let children: Vec<_> = self
            .pods
            .iter()
            .map(|&f| {
                let to: Vec<usize> = self.pods.iter().copied().filter(|t| *t != f).collect();
                let name = Self::lab_name(f);
                let src = self.c.pods.iter().find(|p| p.name == name).unwrap();
                let child = src
                    .ns
                    .cmd(&self.lab)
                    .args(["netcheck", "probe", "--timeout-ms", "800"])
                    .args(
                        to.iter()
                            .map(|t| format!("{}:{port}/{}", self.ips[t], proto.name())),
                    )
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                (f, to, child)
            })
            .collect();
        let mut got = BTreeMap::new();
        for (f, to, child) in children {
            let out = child.wait_with_output().unwrap();
            let lines: Vec<_> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| l.ends_with(" ok"))
                .collect();
            assert_eq!(lines.len(), to.len(), "probe output from {}", model_name(f));
            for (t, ok) in to.into_iter().zip(lines) {
                got.insert((f, t), ok);
            }
        }
        got
    }

    async fn probe_until(&self, port: u16, proto: Proto, want: &Reach, what: &str) {
        let what = format!("{what}: {port}/{}", proto.name());
        let (t45, every) = (Duration::from_secs(45), Duration::from_millis(250));
        wait::until_async(&what, t45, every, || {
            let got = self.observe(port, proto);
            let wrong: Vec<String> = want
                .pairs()
                .filter(|(k, ok)| got.get(k) != Some(ok))
                .map(|((f, t), ok)| format!("{} -> {} expected {ok}", model_name(f), model_name(t)))
                .collect();
            let seen = if wrong.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!(
                    "still wrong: {wrong:?}\nexpected:\n{}observed:\n{}",
                    want.table(&want.m),
                    want.table(&got)
                )
                .into())
            };
            async move { seen }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The world as the API server holds it now.
    async fn world(&self) -> World {
        let mut w = World::default();
        for ns in NAMESPACES {
            let api: Api<KubeNamespace> = Api::all(self.c.client.clone());
            let (name, n) = Namespace::from_k8s(&api.get(ns).await.unwrap()).unwrap();
            w.namespaces.insert(name, n);
            let pods: Api<KubePod> = Api::namespaced(self.c.client.clone(), ns);
            for p in pods.list(&ListParams::default()).await.unwrap() {
                if let Some((k, v)) = Pod::from_k8s(&p) {
                    w.pods.insert(k, v);
                }
            }
            for p in self
                .policies(ns)
                .list(&ListParams::default())
                .await
                .unwrap()
            {
                let (k, v) = Policy::from_k8s(&p).unwrap();
                w.policies.insert(k, v);
            }
        }
        w
    }

    /// The table the specification gives over the API's objects now.
    async fn spec_table(&self, port: u16, proto: Proto) -> Reach {
        let w = self.world().await;
        let mut r = self.reach(true);
        for ((f, t), v) in r.m.iter_mut() {
            let c = Connection {
                src: self.ips[f],
                dst: self.ips[t],
                proto,
                port,
            };
            *v = f == t || spec::decide(&w, &c).allowed();
        }
        r
    }

    /// The kernel's verdicts over every pair of the case's pods agree with
    /// the specification's, on 80/tcp, 81/tcp and 80/udp.
    async fn validate_spec(&self) {
        for (port, proto) in [(80, TCP), (81, TCP), (80, UDP)] {
            let want = self.spec_table(port, proto).await;
            self.probe_until(port, proto, &want, &self.case).await;
        }
    }

    /// Runs a case of [`one_policy_cases`] or [`cidr_cases`].
    async fn one_policy(&mut self, c: OnePolicy) {
        self.case(c.name, c.pods).await;
        self.create("x", c.policy).await;
        for step in c.steps {
            match step {
                Step::Check(port, proto, want) => {
                    let mut r = self.reach(true);
                    want(&mut r);
                    self.validate(port, proto, &r).await;
                }
                Step::Create(ns, p) => self.create(ns, p).await,
                Step::Update(p) => self.update("x", p).await,
                Step::LabelNamespace(ns, key, value) => {
                    self.label_namespace(ns, key, Some(value)).await
                }
                Step::LabelPod(pod, labels) => self.label_pod(pod, labels).await,
                Step::DeletePolicies => self.delete_policies().await,
            }
        }
    }

    /// Upstream's ValidateOrFail, after checking that the specification
    /// agrees with the expected table.
    async fn validate(&self, port: u16, proto: Proto, want: &Reach) {
        let w = self.world().await;
        let mut from_spec = BTreeMap::new();
        for ((f, t), _) in want.pairs() {
            let c = Connection {
                src: self.ips[&f],
                dst: self.ips[&t],
                proto,
                port,
            };
            from_spec.insert((f, t), spec::decide(&w, &c).allowed());
        }
        let disagree: Vec<_> = want
            .pairs()
            .filter(|(k, ok)| from_spec.get(k) != Some(ok))
            .map(|((f, t), _)| format!("{} -> {}", model_name(f), model_name(t)))
            .collect();
        assert!(
            disagree.is_empty(),
            "{}: {port}/{}: the specification disagrees with the upstream case on {disagree:?}\nupstream:\n{}spec:\n{}",
            self.case,
            proto.name(),
            want.table(&want.m),
            want.table(&from_spec)
        );
        self.probe_until(port, proto, want, &self.case).await;
    }
}

/// A two-node lab with the model's `pods` serving `protos` on 80 and 81.
async fn start(pods: &[&str], protos: &[Proto]) -> Env {
    let mut c = margay_tests::two_node_lab().await;
    let serve: Vec<String> = protos
        .iter()
        .flat_map(|p| [80, 81].map(|port| format!("{}:{port}", p.name())))
        .collect();
    let mut ips = BTreeMap::new();
    for i in pods.iter().map(|p| index(p)) {
        let o = PodOpts {
            namespace: Some(NAMESPACES[i / 3].into()),
            labels: [("pod".to_string(), NAMES[i % 3].to_string())].into(),
            serve: serve.clone(),
            ..Default::default()
        };
        let node = if i % 2 == 0 { "node1" } else { "node2" };
        let name = Env::lab_name(i);
        c.add_pod_with(node, &name, &o).await.unwrap();
        let ip = c.pods.iter().find(|p| p.name == name).unwrap().ip.clone();
        ips.insert(i, ip.parse().unwrap());
    }
    Env {
        c,
        ips,
        protos: protos.to_vec(),
        lab: paths::workspace_bin("margay-lab").unwrap(),
        case: String::new(),
        pods: Vec::new(),
        cases: 0,
    }
}

/// One lab at a time in this binary (the VM's is heavy too).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const ALL_PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];

/// What a case does after creating its policy in x, one step at a time.
enum Step {
    /// The table on a port and protocol: full reachability changed by
    /// the function.
    Check(u16, Proto, fn(&mut Reach)),
    /// A policy created in a namespace.
    Create(&'static str, Value),
    /// The policy of the same name in x replaced.
    Update(Value),
    /// A namespace labelled.
    LabelNamespace(&'static str, &'static str, &'static str),
    /// A pod's labels merged with these.
    LabelPod(&'static str, Value),
    /// Every policy deleted.
    DeletePolicies,
}

fn check(port: u16, proto: Proto, want: fn(&mut Reach)) -> Step {
    Step::Check(port, proto, want)
}

/// Upstream's case of one policy created in x, then steps.
struct OnePolicy {
    name: &'static str,
    pods: &'static [&'static str],
    policy: Value,
    steps: Vec<Step>,
}

/// The tables the cases share, as changes to full reachability.
fn full(_: &mut Reach) {}

fn nothing_into_xa(r: &mut Reach) {
    r.all_ingress("x/a", false);
}

fn nothing_into_x(r: &mut Reach) {
    r.peer("*", "x", false);
}

fn nothing_out_of_x(r: &mut Reach) {
    r.peer("x", "*", false);
}

fn only_xb_into_xa(r: &mut Reach) {
    r.all_ingress("x/a", false).expect("x/b", "x/a", true);
}

fn only_y_into_xa(r: &mut Reach) {
    r.peer("x", "x/a", false).peer("z", "x/a", false);
}

fn xa_not_to_xb(r: &mut Reach) {
    r.expect("x/a", "x/b", false);
}

/// Upstream's TCP cases as a table, one case to a `one(name, pods,` line,
/// its policy and its steps below: the policy created in x, then tables
/// checked (full reachability as changed by a function) and policies or
/// labels changed. Upstream's order, those with changes after a first
/// check at the end; the ipBlock cases, which need the pods' addresses,
/// are [`cidr_cases`].
#[rustfmt::skip]
fn one_policy_cases() -> Vec<OnePolicy> {
    vec![
        one("should support a 'default-deny-ingress' policy", &["x/a", "x/b", "y/a", "y/b"],
            policy("deny-ingress", json!({}), Some(json!([])), None),
            vec![check(80, TCP, nothing_into_x)]),
        one("should support a 'default-deny-all' policy", &["x/a", "x/b", "y/a"],
            policy("deny-all", json!({}), Some(json!([])), Some(json!([]))),
            vec![check(80, TCP, |r| { r.peer("*", "x", false).peer("x", "*", false); })]),
        one("should enforce policy to allow traffic from pods within server namespace based on PodSelector", &["x/a", "x/b", "x/c", "y/a"],
            ingress_to_a("x-a-allows-x-b", json!([{"from": [{"podSelector": pod_is("b")}]}])),
            vec![check(80, TCP, only_xb_into_xa)]),
        one("should enforce policy to allow ingress traffic from pods in all namespaces", &["x/a", "x/b", "y/a", "z/a"],
            ingress_to_a("allow-from-another-ns", json!([{"from": [{"namespaceSelector": {"matchLabels": {}}}]}])),
            vec![check(80, TCP, full)]),
        one("should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector", &["x/a", "x/b", "y/a", "z/a"],
            ingress_to_a("allow-client-a-via-ns-selector", json!([{"from": [{"namespaceSelector": ns_is("y")}]}])),
            vec![check(80, TCP, only_y_into_xa)]),
        one("should enforce policy based on PodSelector with MatchExpressions", &["x/a", "x/b", "y/a"],
            ingress_to_a("x-a-allows-x-b", json!([{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}])),
            vec![check(80, TCP, only_xb_into_xa)]),
        one("should enforce policy based on NamespaceSelector with MatchExpressions", &["x/a", "x/b", "y/a", "z/a"],
            ingress_to_a("allow-ns-y-match-selector", json!([{"from": [{"namespaceSelector": {"matchExpressions": [{"key": NS, "operator": "In", "values": ["y"]}]}}]}])),
            vec![check(80, TCP, only_y_into_xa)]),
        one("should enforce policy based on PodSelector or NamespaceSelector", &["x/a", "x/b", "x/c", "y/a"],
            ingress_to_a("allow-ns-y-match-selector", json!([{"from": [{"namespaceSelector": ns_not_in("x")}, {"podSelector": pod_is("b")}]}])),
            vec![check(80, TCP, |r| { r.expect("x/a", "x/a", false).expect("x/c", "x/a", false); })]),
        one("should enforce policy based on PodSelector and NamespaceSelector", &["x/a", "x/b", "y/a", "y/b", "z/b"],
            ingress_to_a("allow-ns-y-podselector-and-nsselector", json!([{"from": [{"namespaceSelector": ns_not_in("x"), "podSelector": pod_is("b")}]}])),
            vec![check(80, TCP, |r| { r.all_ingress("x/a", false).expect("y/b", "x/a", true).expect("z/b", "x/a", true); })]),
        one("should enforce policy based on Multiple PodSelectors and NamespaceSelectors", &["x/a", "x/b", "y/a", "y/b", "y/c"],
            ingress_to_a("allow-ns-y-z-pod-b-c", json!([{"from": [{"namespaceSelector": ns_not_in("x"), "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}])),
            vec![check(80, TCP, |r| { r.peer("x", "x/a", false).expect("y/a", "x/a", false); })]),
        one("should enforce policy based on any PodSelectors", &["x/a", "x/b", "x/c"],
            ingress_to_a("allow-ns-x-pod-b-c", json!([{"from": [{"podSelector": pod_is("b")}, {"podSelector": pod_is("c")}]}])),
            vec![check(80, TCP, |r| { r.all_ingress("x/a", false).expect("x/b", "x/a", true).expect("x/c", "x/a", true); })]),
        one("should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", &["x/a", "x/b", "y/a", "y/b", "z/a"],
            ingress_to_a("allow-ns-y-pod-a-via-namespace-pod-selector", json!([{"from": [{"namespaceSelector": ns_is("y"), "podSelector": pod_is("a")}]}])),
            vec![check(80, TCP, |r| { r.all_ingress("x/a", false).expect("y/a", "x/a", true); })]),
        one("should support allow-all policy", &["x/a", "x/b", "y/a"],
            policy("allow-all", json!({}), Some(json!([{}])), None),
            vec![check(80, TCP, full), check(81, TCP, full)]),
        one("should allow ingress access on one named port", &["x/a", "x/b", "y/a"],
            policy("allow-all", json!({}), Some(json!([{"ports": [{"port": "serve-81-tcp"}]}])), None),
            vec![check(81, TCP, full), check(80, TCP, nothing_into_x)]),
        one("should allow ingress access from namespace on one named port", &["x/a", "x/b", "y/a", "z/a"],
            ingress_to_a("allow-client-a-via-ns-selector-80", json!([{"from": [{"namespaceSelector": ns_is("y")}], "ports": [{"port": "serve-80-tcp", "protocol": "TCP"}]}])),
            vec![check(80, TCP, only_y_into_xa), check(81, TCP, nothing_into_xa)]),
        one("should allow egress access on one named port", &["x/a", "y/a"],
            policy("allow-egress", json!({}), None, Some(json!([{"ports": [{"port": "serve-80-tcp"}]}]))),
            vec![check(80, TCP, full), check(81, TCP, nothing_out_of_x)]),
        one("should deny ingress from pods on other namespaces", &["x/a", "x/b", "y/a", "z/a"],
            policy("deny-empty-policy", json!({}), Some(json!([{"from": [{"podSelector": {"matchLabels": {}}}]}])), None),
            vec![check(80, TCP, |r| { r.peer("y", "x", false).peer("z", "x", false); })]),
        one("should deny egress from pods based on PodSelector", &["x/a", "x/b", "y/a"],
            policy("deny-egress-pod-a", pod_is("a"), None, Some(json!([]))),
            vec![check(80, TCP, |r| { r.all_egress("x/a", false); })]),
        one("should deny egress from all pods in a namespace", &["x/a", "x/b", "y/a"],
            policy("deny-egress-ns-x", json!({}), None, Some(json!([]))),
            vec![check(80, TCP, nothing_out_of_x)]),
        one("should work with Ingress, Egress specified together", &["x/a", "x/b", "x/c", "y/a"],
            policy("allow-client-a-via-pod-selector", pod_is("a"), Some(json!([{"from": [{"podSelector": pod_is("b")}]}])), Some(json!([{"ports": [{"port": 80}]}]))),
            vec![check(80, TCP, only_xb_into_xa), check(81, TCP, |r| { r.all_ingress("x/a", false).all_egress("x/a", false).expect("x/b", "x/a", true); })]),
        one("should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector", &["x/a", "y/a", "y/b"],
            policy("allow-to-ns-y-pod-a", pod_is("a"), None, Some(json!([{"to": [{"namespaceSelector": ns_is("y"), "podSelector": pod_is("a")}]}]))),
            vec![check(80, TCP, |r| { r.all_egress("x/a", false).expect("x/a", "y/a", true); })]),
        one("should enforce ingress policy allowing any port traffic to a server on a specific protocol", &["x/a", "y/a"],
            ingress_to_a("allow-ingress-by-proto", json!([{"ports": [{"protocol": "TCP"}]}])),
            vec![check(80, TCP, full), check(80, UDP, |r| { r.peer("*", "x/a", false); })]),
        one("should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP", &["x/a", "y/a"],
            ingress_to_a("allow-only-sctp-ingress-on-port-80", json!([{"ports": [{"port": 80, "protocol": "SCTP"}]}])),
            vec![check(81, TCP, nothing_into_xa)]),
        one("should not allow access by TCP when a policy specifies only UDP", &["x/a", "y/a"],
            ingress_to_a("allow-only-udp-ingress-on-port-81", json!([{"ports": [{"port": 81, "protocol": "UDP"}]}])),
            vec![check(81, TCP, nothing_into_xa)]),
        one("should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label", &["x/a", "x/b", "y/a", "z/a"],
            ingress_to_a("allow-client-a-via-ns-selector-for-immutable-ns-label", json!([{"from": [{"namespaceSelector": ns_is("y")}]}])),
            vec![check(80, TCP, only_y_into_xa)]),
        one("should enforce policy based on NamespaceSelector with MatchExpressions using default ns label", &["x/a", "x/b", "y/a", "z/a"],
            policy("allow-ns-y-match-selector-for-immutable-ns-label", pod_is("a"), None, Some(json!([{"to": [{"namespaceSelector": ns_not_in("y")}]}]))),
            vec![check(80, TCP, |r| { r.peer("x/a", "y", false); })]),
        one("should enforce policy to allow ingress traffic for a target", &["x/a", "x/b", "y/a"],
            policy("deny-all", json!({}), Some(json!([])), None),
            vec![Step::Create("x", ingress_to_a("allow-all-to-a", json!([{"from": [{"podSelector": {}, "namespaceSelector": {}}]}]))), check(80, TCP, |r| { r.all_ingress("x/a", true).all_ingress("x/b", false); })]),
        one("should enforce policy based on Ports", &["x/a", "x/b", "y/a", "y/b", "z/a"],
            port_from_y("allow-client-a-via-ns-selector", 81),
            vec![check(81, TCP, allow_from_y)]),
        one("should enforce multiple, stacked policies with overlapping podSelectors", &["x/a", "x/b", "y/a", "y/b", "z/a"],
            port_from_y("allow-client-a-via-ns-selector", 81),
            vec![check(81, TCP, allow_from_y), check(80, TCP, nothing_into_xa), Step::Create("x", port_from_y("allow-client-a-via-ns-selector-80", 80)), check(80, TCP, allow_from_y)]),
        one("should enforce updated policy", &["x/a", "y/a"],
            policy("allow-all-mutate-to-deny-all", json!({}), Some(json!([{}])), None),
            vec![check(81, TCP, full), Step::Update(policy("allow-all-mutate-to-deny-all", json!({}), Some(json!([])), None)), check(81, TCP, nothing_into_x)]),
        one("should allow ingress access from updated namespace", &["x/a", "y/a"],
            ingress_to_a("allow-client-a-via-ns-selector", json!([{"from": [{"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]}])),
            vec![check(80, TCP, nothing_into_xa), Step::LabelNamespace("y", "ns2", "updated"), check(80, TCP, |r| { r.all_ingress("x/a", false).peer("y", "*", true); })]),
        one("should allow ingress access from updated pod", &["x/a", "x/b"],
            ingress_to_a("allow-client-a-via-pod-selector", json!([{"from": [{"podSelector": {"matchLabels": {"pod": "b", "pod2": "updated"}}}]}])),
            vec![check(80, TCP, nothing_into_xa), Step::LabelPod("x/b", json!({"pod": "b", "pod2": "updated"})), check(80, TCP, only_xb_into_xa)]),
        one("should deny ingress access to updated pod", &["x/a", "y/a"],
            policy("deny-ingress-via-label-selector", json!({"matchLabels": {"target": "isolated"}}), Some(json!([])), None),
            vec![check(80, TCP, full), Step::LabelPod("x/a", json!({"target": "isolated"})), check(80, TCP, nothing_into_xa)]),
        one("should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)", &["x/a", "y/a", "y/b"],
            policy("allow-to-ns-y-pod-a", pod_is("a"), None, Some(json!([{"to": [{"namespaceSelector": ns_is("y"), "podSelector": pod_is("a")}]}]))),
            vec![Step::Create("y", ingress_to_a("allow-from-xa-on-ya-match-selector", from_xa())), Step::Create("y", policy("allow-from-xa-on-yb-match-selector", pod_is("b"), Some(from_xa()), None)), check(80, TCP, |r| { r.peer("x/a", "*", false).peer("*", "y/a", false).peer("x/a", "y/a", true).peer("*", "y/b", false); })]),
        one("should enforce multiple ingress policies with ingress allow-all policy taking precedence", &["x/a", "y/a"],
            policy("allow-ingress-port-80", json!({}), Some(json!([{"ports": [{"port": 80}]}])), None),
            vec![check(81, TCP, nothing_into_x), Step::Create("x", policy("allow-ingress", json!({}), Some(json!([{}])), None)), check(81, TCP, full)]),
        one("should enforce multiple egress policies with egress allow-all policy taking precedence", &["x/a", "y/a"],
            policy("allow-egress-port-80", json!({}), None, Some(json!([{"ports": [{"port": 80}]}]))),
            vec![check(81, TCP, nothing_out_of_x), Step::Create("x", policy("allow-egress", json!({}), None, Some(json!([{}])))), check(81, TCP, full)]),
        one("should stop enforcing policies after they are deleted", &["x/a", "y/a"],
            policy("deny-all", json!({}), Some(json!([])), Some(json!([]))),
            vec![check(80, TCP, |r| { r.peer("x", "*", false).peer("*", "x", false); }), Step::DeletePolicies, check(80, TCP, full)]),
        one("should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector", &["x/a", "x/b", "y/a"],
            policy("allow-egress-for-target", pod_is("a"), None, Some(json!([{}]))),
            vec![check(80, TCP, full), Step::Create("x", ingress_to_a("deny-ingress-via-label-selector", json!([]))), check(80, TCP, nothing_into_xa)]),
        one("should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP", &["x/a", "y/a"],
            policy("deny-ingress", json!({}), Some(json!([])), None),
            vec![Step::Create("x", ingress_to_a("allow-only-sctp-ingress-on-port-81", json!([{"ports": [{"port": 81, "protocol": "SCTP"}]}]))), check(81, TCP, nothing_into_x)]),
    ]
}

/// A case of [`one_policy_cases`]: `name` over `pods`, `policy` created in
/// x, then `steps`.
fn one(
    name: &'static str,
    pods: &'static [&'static str],
    policy: Value,
    steps: Vec<Step>,
) -> OnePolicy {
    OnePolicy {
        name,
        pods,
        policy,
        steps,
    }
}

/// The 'from y' rule of upstream's Ports cases: namespace y on TCP `port`.
fn port_from_y(name: &str, port: u16) -> Value {
    policy(
        name,
        pod_is("a"),
        Some(json!([{"from": [{"namespaceSelector": ns_is("y")}],
                     "ports": [{"port": port, "protocol": "TCP"}]}])),
        None,
    )
}

/// What [`port_from_y`] lets in: x/a from y only.
fn allow_from_y(r: &mut Reach) {
    r.peer("x", "x/a", false)
        .peer("y", "x/a", true)
        .peer("z", "x/a", false);
}

/// Peers of the client-side egress case: x/a only.
fn from_xa() -> Value {
    json!([{"from": [{"namespaceSelector": ns_is("x"), "podSelector": pod_is("a")}]}])
}

/// Upstream's ipBlock cases, over the addresses the pods got.
fn cidr_cases(e: &Env) -> Vec<OnePolicy> {
    let yb = format!("{}/32", e.ip("y/b"));
    let xb = format!("{}/32", e.ip("x/b"));
    let to_cidr = |block: Value| {
        policy(
            "allow-client-a-via-cidr-egress-rule",
            pod_is("a"),
            None,
            Some(json!([{"to": [{"ipBlock": block}]}])),
        )
    };
    let around_xb = to_cidr(json!({"cidr": large_cidr(e.ip("x/b")), "except": [xb]}));
    vec![
        one(
            "should allow egress access to server in CIDR block",
            &["x/a", "y/a", "y/b"],
            to_cidr(json!({"cidr": yb})),
            vec![check(80, TCP, |r| {
                r.all_egress("x/a", false).expect("x/a", "y/b", true);
            })],
        ),
        one(
            "should enforce except clause while egress access to server in CIDR block",
            &["x/a", "x/b", "x/c"],
            around_xb.clone(),
            vec![check(80, TCP, xa_not_to_xb)],
        ),
        one(
            "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
            &["x/a", "x/b", "x/c"],
            around_xb,
            vec![
                check(80, TCP, xa_not_to_xb),
                Step::Update(to_cidr(json!({"cidr": xb}))),
                check(80, TCP, |r| {
                    r.all_egress("x/a", false).expect("x/a", "x/b", true);
                }),
            ],
        ),
    ]
}

/// Upstream's "NetworkPolicy between server and client" (TCP) and "...
/// using UDP" cases, names as upstream words them: the tables of
/// [`one_policy_cases`] and [`cidr_cases`], then the UDP ones.
#[test]
fn the_upstream_networkpolicy_cases_pass() {
    let _one = serial();
    runtime().block_on(tcp_and_udp_cases());
}

async fn tcp_and_udp_cases() {
    let mut e = start(&ALL_PODS, &[TCP, UDP]).await;
    let t0 = Instant::now();
    for c in one_policy_cases() {
        e.one_policy(c).await;
    }
    for c in cidr_cases(&e) {
        e.one_policy(c).await;
    }

    // "NetworkPolicy between server and client using UDP".
    udp_or_sctp_cases(&mut e, UDP).await;

    e.reset().await;
    assert_eq!(e.cases, 45);
    println!("{} upstream cases passed in {:?}", e.cases, t0.elapsed());
}

/// Policies created, changed and deleted, pod and namespace labels
/// changed, while pods in namespace z ping each other every 20 ms: after
/// every step the kernel's verdicts on every pair of the nine pods are the
/// specification's, and the pings no policy concerns never stop (each
/// step is one nftables transaction; nothing is flushed and rebuilt).
#[test]
fn policy_updates_under_traffic_keep_the_truth_table() {
    let _one = serial();
    runtime().block_on(async {
        let mut e = start(&ALL_PODS, &[TCP, UDP]).await;
        e.case("updates under traffic", &ALL_PODS).await;
        let pingers: Vec<margay_tests::Pinger> = [("z/a", "z/b"), ("z/b", "z/c"), ("z/c", "z/a")]
            .iter()
            .map(|(f, t)| {
                let name = Env::lab_name(index(f));
                let src = e.c.pods.iter().find(|p| p.name == name).unwrap();
                margay_tests::Pinger::start(
                    src.ns.name(),
                    &e.ip(t).to_string(),
                    format!("{f} -> {t}"),
                )
            })
            .collect();
        let mut step = 0;
        let mut next = |what: &str| {
            step += 1;
            println!("step {step}: {what}");
        };

        next("deny ingress to namespace x");
        e.create("x", policy("x-ingress", json!({}), Some(json!([])), None))
            .await;
        e.validate_spec().await;

        next("allow namespace y in on tcp/80, unless role=blocked");
        e.update(
            "x",
            policy(
                "x-ingress",
                json!({}),
                Some(
                    json!([{"from": [{"namespaceSelector": ns_is("y"), "podSelector":
                    {"matchExpressions": [{"key": "role", "operator": "DoesNotExist"}]}}],
                    "ports": [{"port": 80, "protocol": "TCP"}]}]),
                ),
                None,
            ),
        )
        .await;
        e.validate_spec().await;

        next("label y/b role=blocked");
        e.label_pod("y/b", json!({"role": "blocked"})).await;
        e.validate_spec().await;

        next("x/a may only reach namespaces labelled team=red (none yet)");
        e.create(
            "x",
            policy(
                "x-a-egress",
                pod_is("a"),
                None,
                Some(json!([{"to": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}])),
            ),
        )
        .await;
        e.validate_spec().await;

        next("label namespace y team=red");
        e.label_namespace("y", "team", Some("red")).await;
        e.validate_spec().await;

        next("udp/80 into x/c from anyone, on top");
        e.create(
            "x",
            policy(
                "x-c-udp",
                pod_is("c"),
                Some(json!([{"ports": [{"port": 80, "protocol": "UDP"}]}])),
                None,
            ),
        )
        .await;
        e.validate_spec().await;

        next("delete x-ingress");
        e.policies("x")
            .delete("x-ingress", &DeleteParams::default())
            .await
            .unwrap();
        e.validate_spec().await;

        next("unlabel y/b and y, delete everything");
        e.label_pod("y/b", json!({"role": null})).await;
        e.label_namespace("y", "team", None).await;
        e.delete_policies().await;
        let all = e.reach(true);
        for (port, proto) in [(80, TCP), (81, TCP), (80, UDP)] {
            e.probe_until(port, proto, &all, "no policies").await;
        }

        for p in pingers {
            p.stop().assert_kept("policy updates", 50);
        }
    });
}

/// Upstream's "NetworkPolicy between server and client using SCTP", in a
/// VM with a stock Debian kernel (this host's has no SCTP): the test boots
/// it (`scripts/in-vm.sh`) and runs itself inside.
#[test]
fn the_upstream_sctp_cases_pass_in_a_vm() {
    let _one = serial();
    if margay_tests::in_vm() {
        let st = std::process::Command::new("modprobe").arg("sctp").status();
        assert!(matches!(st, Ok(s) if s.success()), "modprobe sctp: {st:?}");
        return runtime().block_on(async {
            let mut e = start(&["x/a", "x/b", "y/a", "y/b", "z/a"], &[Proto::Sctp]).await;
            let t0 = Instant::now();
            udp_or_sctp_cases(&mut e, Proto::Sctp).await;
            e.reset().await;
            println!(
                "{} upstream SCTP cases passed in {:?}",
                e.cases,
                t0.elapsed()
            );
        });
    }
    let text = margay_tests::rerun_in_vm("the_upstream_sctp_cases_pass_in_a_vm");
    assert!(text.contains("3 upstream SCTP cases passed"), "{text}");
}

/// Upstream's three cases run over UDP and again over SCTP.
async fn udp_or_sctp_cases(e: &mut Env, proto: Proto) {
    let name = proto.name().to_uppercase();
    e.case(
        &format!("{name}: should support a 'default-deny-ingress' policy"),
        &["x/a", "x/b", "y/a", "y/b"],
    )
    .await;
    e.create("x", policy("deny-all", json!({}), Some(json!([])), None))
        .await;
    let mut r = e.reach(true);
    r.peer("*", "x", false);
    e.validate(80, proto, &r).await;

    e.case(
        &format!("{name}: should enforce policy based on Ports"),
        &["x/a", "x/b", "y/a", "z/a"],
    )
    .await;
    e.create(
        "x",
        ingress_to_a(
            "allow-ingress-on-port-81-ns-x",
            json!([{"from": [{"namespaceSelector": ns_is("y")}],
                         "ports": [{"port": 81, "protocol": name}]}]),
        ),
    )
    .await;
    let mut r = e.reach(true);
    r.peer("x", "x/a", false).peer("z", "x/a", false);
    e.validate(81, proto, &r).await;

    e.case(
        &format!(
            "{name}: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector"
        ),
        &["x/a", "x/b", "y/a"],
    )
    .await;
    e.create(
        "x",
        ingress_to_a(
            "allow-ns-y-pod-a-via-namespace-pod-selector",
            json!([{"from": [{"namespaceSelector": ns_is("y"), "podSelector": pod_is("a")}]}]),
        ),
    )
    .await;
    let mut r = e.reach(true);
    r.all_ingress("x/a", false).expect("y/a", "x/a", true);
    e.validate(80, proto, &r).await;
}
