//! What the other nodes' pods share, one copy of each: label sets,
//! namespace and node names, lists of named ports; copies no pod holds
//! any more swept when a set has doubled.

use std::sync::Arc;

use margay_policy::Labels;
use margay_policy::model::NamedPort;

/// Label sets shared by the remote pods labelled alike (most of a
/// cluster's pods share theirs with their replicas, so a pod costs a
/// pointer, not a map), namespace and node names, and lists of named
/// ports.
#[derive(Debug, Default)]
pub(super) struct Interned {
    sets: std::collections::HashSet<Arc<Labels>>,
    names: std::collections::HashSet<Arc<str>>,
    ports: std::collections::HashSet<Arc<[NamedPort]>>,
    /// The sizes after the last sweeps: sets (names, port lists) no pod
    /// holds any more are swept when their number has doubled.
    swept: (usize, usize, usize),
}

/// The one shared copy of `v` in `set`, swept of copies only it holds
/// when it has doubled since the last sweep (`swept`).
fn intern<T: ?Sized + Eq + std::hash::Hash>(
    set: &mut std::collections::HashSet<Arc<T>>,
    swept: &mut usize,
    v: &T,
    make: impl FnOnce(&T) -> Arc<T>,
) -> Arc<T> {
    if let Some(l) = set.get(v) {
        return l.clone();
    }
    if set.len() >= 2 * (*swept).max(1024) {
        set.retain(|l| Arc::strong_count(l) > 1);
        *swept = set.len();
    }
    let l = make(v);
    set.insert(l.clone());
    l
}

impl Interned {
    /// The one shared copy of `labels`.
    pub(super) fn labels(&mut self, labels: &Labels) -> Arc<Labels> {
        intern(&mut self.sets, &mut self.swept.0, labels, |l| {
            Arc::new(l.clone())
        })
    }

    /// The one shared copy of named ports `ports`.
    pub(super) fn ports(&mut self, ports: &[NamedPort]) -> Arc<[NamedPort]> {
        intern(&mut self.ports, &mut self.swept.2, ports, |p| Arc::from(p))
    }

    /// The one shared copy of namespace or node name `name`.
    pub(super) fn name(&mut self, name: &str) -> Arc<str> {
        intern(&mut self.names, &mut self.swept.1, name, |n| Arc::from(n))
    }
}
