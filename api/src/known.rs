//! Knowledge of an input and the reason it is not current: [`Known`] (an
//! input current, last known, or not known at all) and [`Why`] (typed, so
//! a reader matches a reason, e.g. [`Why::Forbidden`], instead of
//! searching its text). Only the types: who reads the API and turns its
//! errors into a [`Why`] is `margay_ipam::k8s`.

use std::fmt;

/// One input of a decision: current, last known, or not known at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known<T> {
    /// Read and current: decisions may add and remove.
    Fresh(T),
    /// The last value read; the source cannot be read now (why): decisions
    /// may add from it, never remove because of it.
    Stale(T, Why),
    /// Never read (why): nothing is decided from it.
    Unknown(Why),
}

impl<T> Known<T> {
    /// The value, fresh or stale.
    pub fn value(&self) -> Option<&T> {
        match self {
            Known::Fresh(v) | Known::Stale(v, _) => Some(v),
            Known::Unknown(_) => None,
        }
    }

    /// Whether it is current.
    pub fn is_fresh(&self) -> bool {
        matches!(self, Known::Fresh(_))
    }

    /// Why it is not current.
    pub fn why(&self) -> Option<&Why> {
        match self {
            Known::Fresh(_) => None,
            Known::Stale(_, w) | Known::Unknown(w) => Some(w),
        }
    }

    /// The same knowledge of another value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Known<U> {
        match self {
            Known::Fresh(v) => Known::Fresh(f(v)),
            Known::Stale(v, w) => Known::Stale(f(v), w),
            Known::Unknown(w) => Known::Unknown(w),
        }
    }

    /// By reference.
    pub fn as_ref(&self) -> Known<&T> {
        match self {
            Known::Fresh(v) => Known::Fresh(v),
            Known::Stale(v, w) => Known::Stale(v, w.clone()),
            Known::Unknown(w) => Known::Unknown(w.clone()),
        }
    }

    /// A failed read: the last value becomes stale (or stays unknown).
    pub fn failed(self, why: Why) -> Self {
        match self {
            Known::Fresh(v) | Known::Stale(v, _) => Known::Stale(v, why),
            Known::Unknown(_) => Known::Unknown(why),
        }
    }
}

/// The request that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A list (a page of one).
    List,
    /// A watch.
    Watch,
    /// A read by name.
    Get,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::List => "list",
            Op::Watch => "watch",
            Op::Get => "get",
        })
    }
}

/// Why an input is not current ([`Known::Stale`]) or not known
/// ([`Known::Unknown`]). A reason that wraps another (a watch broken
/// because of a refusal) keeps it: [`Why::cause`] is the innermost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// Nothing read yet (of `what`, when said).
    NotRead(Option<&'static str>),
    /// The first list of `what` has not completed (the last attempt's
    /// failure, if one failed).
    NotListed {
        /// What is listed.
        what: &'static str,
        /// Why the last attempt failed.
        last: Option<Box<Why>>,
    },
    /// The watch of `what` fails, for `secs` seconds now.
    Broken {
        /// What is watched.
        what: &'static str,
        /// Since how long.
        secs: u64,
        /// Why (the latest failure).
        cause: Box<Why>,
    },
    /// The API refused for want of permission (HTTP 403).
    Forbidden {
        /// The request (when said).
        op: Option<Op>,
        /// The API's error, as it said it.
        error: String,
    },
    /// The API refused with another status.
    Refused {
        /// The request (when said).
        op: Option<Op>,
        /// The HTTP status.
        code: u16,
        /// The API's error, as it said it.
        error: String,
    },
    /// An answer that could not be read.
    Decode {
        /// The request (when said).
        op: Option<Op>,
        /// What the decoder said.
        error: String,
    },
    /// The request failed on the way (connection refused or lost, TLS, ...).
    Failed {
        /// The request (when said).
        op: Option<Op>,
        /// What the client said.
        error: String,
    },
    /// The API no longer has the resourceVersion (410 Gone): listed again.
    Gone {
        /// The version refused.
        version: String,
        /// What the API said.
        error: String,
    },
    /// An open watch said nothing for `secs` seconds.
    Silent {
        /// How long.
        secs: u64,
    },
    /// The watch ended before it was accepted.
    EndedEarly,
    /// No answer within the deadline.
    NoAnswer,
    /// The API does not answer this agent's heartbeat (its last error):
    /// every watched input counts as stale.
    ApiQuiet(String),
    /// RBAC forbids reading a Secret by name.
    SecretForbidden {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API's error.
        error: String,
    },
    /// A Secret could not be read.
    Secret {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        cause: Box<Why>,
    },
    /// The IPAM store watches no pools.
    NoPools,
    /// A local read failed: `what` ("this host's addresses"), the error.
    Local {
        /// What was read ("list this host's addresses").
        what: &'static str,
        /// The error.
        error: String,
    },
}

impl Why {
    /// The innermost reason (what a reason that wraps another is about).
    pub fn cause(&self) -> &Why {
        match self {
            Why::NotListed { last: Some(w), .. }
            | Why::Broken { cause: w, .. }
            | Why::Secret { cause: w, .. } => w.cause(),
            w => w,
        }
    }
}

/// `op: error`, or `error` alone.
fn op_error(f: &mut fmt::Formatter<'_>, op: &Option<Op>, error: &str) -> fmt::Result {
    match op {
        Some(op) => write!(f, "{op}: {error}"),
        None => f.write_str(error),
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::NotRead(None) => f.write_str("not read yet"),
            Why::NotRead(Some(what)) => write!(f, "{what} not read yet"),
            Why::NotListed { what, last: None } => write!(f, "{what} not listed yet"),
            Why::NotListed {
                what,
                last: Some(e),
            } => write!(f, "{what} not listed yet: {e}"),
            Why::Broken { what, secs, cause } => {
                write!(f, "cannot watch {what} for {secs}s: {cause}")
            }
            Why::Forbidden { op, error }
            | Why::Refused { op, error, .. }
            | Why::Decode { op, error }
            | Why::Failed { op, error } => op_error(f, op, error),
            Why::Gone { version, error } => write!(
                f,
                "the API no longer has resourceVersion {version}, listing again: {error}"
            ),
            Why::Silent { secs } => write!(f, "no word on the watch for {secs}s"),
            Why::EndedEarly => f.write_str("the watch ended before it was accepted"),
            Why::NoAnswer => f.write_str("no answer"),
            Why::ApiQuiet(e) => write!(f, "the Kubernetes API does not answer ({e})"),
            Why::SecretForbidden {
                namespace,
                name,
                error,
            } => write!(
                f,
                "RBAC forbids reading Secret {namespace}/{name}: list it in the chart's bgp.passwordSecrets (a Role rule with resourceNames) ({error})"
            ),
            Why::Secret {
                namespace,
                name,
                cause,
            } => write!(f, "cannot read Secret {namespace}/{name}: {cause}"),
            Why::NoPools => f.write_str("the IPAM store watches no pools"),
            Why::Local { what, error } => write!(f, "cannot {what}: {error}"),
        }
    }
}

impl std::error::Error for Why {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knowledge_degrades_and_maps() {
        let k = Known::Fresh(vec![1, 2]);
        assert!(k.is_fresh() && k.why().is_none());
        let s = k.clone().failed(Why::NoAnswer);
        assert_eq!(s.value(), Some(&vec![1, 2]));
        assert!(!s.is_fresh());
        assert_eq!(s.why(), Some(&Why::NoAnswer));
        assert_eq!(s.map(|v| v.len()), Known::Stale(2, Why::NoAnswer));
        let u: Known<u8> = Known::Unknown(Why::NotRead(None));
        assert_eq!(
            u.clone().failed(Why::EndedEarly),
            Known::Unknown(Why::EndedEarly)
        );
        assert_eq!(u.value(), None);
    }

    #[test]
    fn a_wrapped_reason_keeps_its_cause() {
        let forbidden = Why::Forbidden {
            op: Some(Op::List),
            error: "secrets is forbidden".into(),
        };
        let w = Why::NotListed {
            what: "a BGP password Secret",
            last: Some(Box::new(forbidden.clone())),
        };
        assert_eq!(w.cause(), &forbidden);
        assert_eq!(
            w.to_string(),
            "a BGP password Secret not listed yet: list: secrets is forbidden"
        );
        let w = Why::Broken {
            what: "Nodes",
            secs: 3,
            cause: Box::new(Why::Silent { secs: 320 }),
        };
        assert_eq!(w.cause(), &Why::Silent { secs: 320 });
        assert_eq!(
            w.to_string(),
            "cannot watch Nodes for 3s: no word on the watch for 320s"
        );
    }
}
