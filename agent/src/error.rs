//! The agent's one error type, the data plane's errors among its variants.
//! The other crates keep their own (IPAM's, the speaker's, the policy
//! compiler's) and this wraps them; at its edges it becomes a CNI code
//! (`cni`), a Node condition (`routing`) or an exit code (`run`).

/// What can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file, socket or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The Kubernetes API refused or did not answer.
    #[error("{what}: {source}")]
    Kube {
        /// What was asked.
        what: String,
        /// The client's error.
        source: Box<kube::Error>,
    },
    /// The Kubernetes API did not answer in time (a frozen or overloaded
    /// apiserver); the request may or may not have been applied.
    #[error("{what}: the Kubernetes API did not answer within {secs}s")]
    NoAnswer {
        /// What was asked.
        what: String,
        /// How long we waited.
        secs: u64,
    },
    /// The API answered a write with an error (it is up): a conflict,
    /// RBAC, no such namespace.
    #[error("{message}")]
    Refused {
        /// The HTTP status (409: another writer won the compare-and-swap).
        code: u16,
        /// The API's message.
        message: String,
    },
    /// The API did not answer a write (unreachable, timed out, 5xx): what
    /// the client said.
    #[error("{0}")]
    Unanswered(String),
    /// The client configuration (kubeconfig, in-cluster) is unusable.
    #[error("Kubernetes client configuration: {0}")]
    ClientConfig(String),
    /// IPAM.
    #[error(transparent)]
    Ipam(#[from] margay_ipam::Error),
    /// A NetworkPolicy question (`margayctl policy`) the world cannot
    /// answer, or a port that does not parse.
    #[error(transparent)]
    Policy(#[from] margay_policy::Error),
    /// The embedded BGP speaker.
    #[error("BGP speaker: {0}")]
    Bgp(#[from] margay_bgp::Error),
    /// The CNI gRPC server.
    #[error("CNI server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// A flag or setting the agent cannot use.
    #[error("{0}")]
    Config(String),
    /// An ADD waited for the NetworkPolicy engine, which is not running.
    #[error("the policy engine is not running")]
    PolicyEngineNotRunning,
    /// An ADD waited for the NetworkPolicy engine, which stopped.
    #[error("the policy engine stopped")]
    PolicyEngineStopped,
    /// The rules of a workload interface that is no Pod's were not
    /// programmed in time.
    #[error("the rules for {host_if} not in place after {secs}s")]
    RulesNotInPlace {
        /// The interface.
        host_if: String,
        /// How long the ADD waited.
        secs: u64,
    },
    /// A Pod's NetworkPolicy rules were not programmed in time.
    #[error("NetworkPolicy rules for {pod} not in place after {secs}s: {why}")]
    PodRulesNotInPlace {
        /// The Pod (`namespace/name`).
        pod: String,
        /// How long the ADD waited.
        secs: u64,
        /// What the engine still waits for.
        why: RulesWait,
    },
    /// One of the agent's tasks ended, which it never should.
    #[error("the {0} task ended unexpectedly")]
    TaskEnded(&'static str),
    /// One of the agent's tasks panicked.
    #[error("the {task} task panicked: {why}")]
    TaskPanicked {
        /// Which task.
        task: &'static str,
        /// The panic's message.
        why: String,
    },
    // The kernel (the data plane).
    /// The pod's network namespace cannot be opened.
    #[error("network namespace {path}: {source}")]
    Netns {
        /// The path given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was asked.
        what: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// A netlink socket could not be opened.
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    /// Entering a network namespace failed.
    #[error("entering the pod's network namespace: {0}")]
    Setns(nix::Error),
    /// A sysctl could not be written.
    #[error("sysctl {key}={value}: {source}")]
    Sysctl {
        /// The key under /proc/sys.
        key: String,
        /// The value.
        value: String,
        /// Why.
        source: std::io::Error,
    },
    /// A link Margay just made or expects is not there.
    #[error("{0} is missing")]
    Missing(String),
    /// The pod's wiring is not what it should be (CHECK).
    #[error("{0}")]
    Wrong(String),
    /// A route that cannot be expressed (e.g. VXLAN without the device).
    #[error("route to {0} cannot be expressed: {1}")]
    Unroutable(ipnetwork::IpNetwork, &'static str),
    /// `nft` is missing or refused Margay's table.
    #[error("nftables: {0}")]
    Nft(String),
    /// A policy batch over netlink failed (`margay-nftnl`): not
    /// encodable, refused by the kernel, or the socket failed.
    #[error(transparent)]
    Nftnl(#[from] margay_nftnl::Error),
    /// Injected by the fake dataplane.
    #[error("injected: {0}")]
    Injected(String),
    /// The path given as the pod's namespace is not one a pod may use.
    #[error("{path} is not a pod's network namespace: {why}")]
    NotPodNetns {
        /// The path given.
        path: String,
        /// Why (not a namespace; the node's own).
        why: String,
    },
    /// The kernel cannot do IPIP here.
    #[error(
        "this node cannot do IPIP: {0}; load the ipip module on the host (modprobe ipip) or use encapsulation VXLAN or None for this pool"
    )]
    IpipUnavailable(String),
    /// A route of another protocol holds the destination: left as it is.
    #[error(
        "{what}: the kernel has a route of protocol {proto} there (not Margay's): left as it is"
    )]
    Foreign {
        /// The route Margay wanted.
        what: String,
        /// The other route's protocol.
        proto: u8,
    },
    /// The host interface's name is held by another attachment's
    /// interface (left as it is).
    #[error("host interface {host_if} belongs to {owner}, not to this attachment")]
    Taken {
        /// The name.
        host_if: String,
        /// Whose it is (its alias's handle).
        owner: String,
    },
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// Another writer won: a compare-and-swap lost, or a create raced.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Refused { code: 409, .. })
    }

    /// A Kubernetes API error with what was asked.
    pub fn kube(what: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

/// What a Pod's NetworkPolicy rules still wait for (the engine's status
/// when an ADD gave up on them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesWait {
    /// Kinds the API has not listed yet.
    #[error("the API has not listed {}", .0.join(", "))]
    NotListed(Vec<String>),
    /// The last load of the node's rules failed (its error).
    #[error("loading the rules failed: {0}")]
    LoadFailed(String),
    /// The node's rules are not current.
    #[error("the node's rules are not current")]
    NotCurrent,
    /// The Pod was not seen, or its rules not loaded.
    #[error("Pod {0} not seen in the API, or its rules not loaded")]
    PodNotSeen(String),
}

/// The agent's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
