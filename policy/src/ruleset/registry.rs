//! What the compiler shares by definition and keeps while something uses
//! it: pod sets by what they hold ([`SetDef`]), endpoint chains by their
//! list of policies ([`Registry`], refcounted, named by a hash), and the
//! index that finds the pod sets a pod may be in ([`IndexKey`]).

use std::collections::{BTreeMap, BTreeSet};

use super::SetKind;
use super::names::fnv;
use crate::Proto;

/// What a pod set holds, which is also its identity: every rule that
/// needs the same set shares it (as Calico shares an IP set per
/// selector), so a pod's change is one element per distinct selector, not
/// one per rule that repeats it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum SetDef {
    /// Addresses of the pods `pods` selects in namespace `ns` (a peer
    /// without namespaceSelector: the policy's own) or in the namespaces
    /// `namespaces` selects.
    Peer {
        ns: Option<String>,
        namespaces: Option<crate::Selector>,
        pods: crate::Selector,
        v6: bool,
    },
    /// `address . proto . port` of the pods whose port `name` resolves
    /// (only local endpoints when `local`: an ingress rule's destination).
    Named {
        local: bool,
        proto: Proto,
        name: String,
        v6: bool,
    },
}

impl SetDef {
    pub(super) fn kind(&self) -> SetKind {
        match self {
            Self::Peer { v6: false, .. } => SetKind::Addr4,
            Self::Peer { v6: true, .. } => SetKind::Addr6,
            Self::Named { v6: false, .. } => SetKind::Named4,
            Self::Named { v6: true, .. } => SetKind::Named6,
        }
    }

    /// Its name: what it is, and a hash of its definition (`-N` added on
    /// a collision).
    pub(super) fn name(&self) -> String {
        let h = fnv(&format!("{self:?}"));
        match self {
            Self::Peer { v6, .. } => format!("peer/{h:016x}.p{}", if *v6 { 6 } else { 4 }),
            Self::Named { v6, .. } => format!("port/{h:016x}.n{}", if *v6 { 6 } else { 4 }),
        }
    }

    /// What a pod must have to be in it (a necessary condition).
    pub(super) fn index_key(&self) -> IndexKey {
        match self {
            Self::Peer {
                ns,
                namespaces,
                pods,
                ..
            } => {
                let n = match (ns, namespaces) {
                    (Some(ns), _) => NsPart::Name(ns.clone()),
                    (None, Some(sel)) => {
                        required(sel).map_or(NsPart::Any, |(k, v)| NsPart::Label(k, v))
                    }
                    (None, None) => NsPart::Any,
                };
                let p = required(pods).map_or(PodPart::Any, |(k, v)| PodPart::Label(k, v));
                IndexKey::Peer(n, p)
            }
            Self::Named { name, .. } => IndexKey::Port(name.clone()),
        }
    }
}

/// Objects of the table shared by definition and kept while something
/// uses them (endpoint chains by their list of policies, pod sets by
/// [`SetDef`]): each named by its definition's hash, a collision taking
/// the next free `-N` suffix.
#[derive(Debug, Clone)]
pub(super) struct Registry<D, U> {
    pub(super) by_name: BTreeMap<String, (D, BTreeSet<U>)>,
    by_def: BTreeMap<D, String>,
}

impl<D, U> Default for Registry<D, U> {
    fn default() -> Self {
        Self {
            by_name: BTreeMap::new(),
            by_def: BTreeMap::new(),
        }
    }
}

impl<D: Ord + Clone, U: Ord> Registry<D, U> {
    /// The name of `def`'s object, `user` recorded as using it; `true`
    /// when the object is new (named from `base`), to be made.
    pub(super) fn acquire(
        &mut self,
        def: D,
        base: impl FnOnce() -> String,
        user: U,
    ) -> (String, bool) {
        if let Some(name) = self.by_def.get(&def) {
            if let Some((_, users)) = self.by_name.get_mut(name) {
                users.insert(user);
            }
            return (name.clone(), false);
        }
        let base = base();
        let mut name = base.clone();
        for n in 1.. {
            if !self.by_name.contains_key(&name) {
                break;
            }
            name = format!("{base}-{n}");
        }
        self.by_def.insert(def.clone(), name.clone());
        self.by_name
            .insert(name.clone(), (def, [user].into_iter().collect()));
        (name, true)
    }

    /// `user` no longer uses object `name`; its definition if that was
    /// its last user (the object goes).
    pub(super) fn release(&mut self, name: &str, user: &U) -> Option<D> {
        let (_, users) = self.by_name.get_mut(name)?;
        users.remove(user);
        if !users.is_empty() {
            return None;
        }
        let (def, _) = self.by_name.remove(name)?;
        self.by_def.remove(&def);
        Some(def)
    }

    /// The definition of object `name`.
    pub(super) fn def(&self, name: &str) -> Option<&D> {
        self.by_name.get(name).map(|(d, _)| d)
    }
}

/// The namespace side of a pod set's index key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum NsPart {
    /// The pod's namespace is this one (a peer without
    /// namespaceSelector).
    Name(String),
    /// The pod's namespace has this label.
    Label(String, String),
    /// Any namespace.
    Any,
}

/// The pod side of a pod set's index key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum PodPart {
    /// The pod has this label.
    Label(String, String),
    /// Any pod.
    Any,
}

/// What a pod must have for a pod set to hold it: a necessary condition,
/// so a pod's change looks only at the sets its keys find.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum IndexKey {
    /// A pod peer's set: its namespace and one label it requires.
    Peer(NsPart, PodPart),
    /// A named port's set: pods with a port of this name.
    Port(String),
}

/// Shared pod sets by [`IndexKey`].
pub(super) type Index = BTreeMap<IndexKey, BTreeSet<String>>;

/// A label a selector requires (one of its matchLabels), if any.
fn required(sel: &crate::Selector) -> Option<(String, String)> {
    sel.match_labels
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.clone()))
}
