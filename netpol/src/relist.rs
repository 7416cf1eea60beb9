//! A kind the compiler's world holds whole (Namespaces, NetworkPolicies)
//! through its watch, written once: a (re)list gathered, then compared
//! with what was known when it completes (what it no longer has is
//! deleted then, not before); an object applied or deleted.

use std::collections::BTreeMap;

use super::{Engine, Event};

/// A relist complete with `new`: the keys `held` has that it no longer
/// has (deleted now, not before), in order. Every kind's relist, Pods'
/// and slices' too, is this diff.
pub(super) fn gone<'a, K: Ord + Clone + 'a, V>(
    held: impl IntoIterator<Item = &'a K>,
    new: &BTreeMap<K, V>,
) -> Vec<K> {
    let mut gone: Vec<K> = held
        .into_iter()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    gone.sort();
    gone
}

/// A relist under way of one kind: what it has shown so far (`None`:
/// none under way).
#[derive(Debug)]
pub(super) struct Relist<K, V>(Option<BTreeMap<K, V>>);

impl<K, V> Default for Relist<K, V> {
    fn default() -> Self {
        Self(None)
    }
}

/// A kind of object the compiler's world holds whole, as the engine
/// keeps it.
pub(super) trait Whole {
    /// The Kubernetes object.
    type Object;
    /// Its key in the world.
    type Key: Ord + Clone;
    /// What the world holds of it.
    type Value;
    /// Its relist under way.
    fn relist(e: &mut Engine) -> &mut Relist<Self::Key, Self::Value>;
    /// What the world holds of the kind.
    fn world(e: &Engine) -> &BTreeMap<Self::Key, Self::Value>;
    /// The object converted (and what the conversion says recorded).
    fn convert(e: &mut Engine, o: &Self::Object) -> Option<(Self::Key, Self::Value)>;
    /// A deleted object's key.
    fn key(o: &Self::Object) -> Option<Self::Key>;
    /// The world holds `v` for `k` from now on (`None`: it is gone).
    fn set(e: &mut Engine, k: &Self::Key, v: Option<Self::Value>);
    /// The kind has been listed.
    fn listed(e: &mut Engine);
}

impl Engine {
    /// A watch event of kind `W`.
    pub(super) fn whole_event<W: Whole>(&mut self, ev: Event<W::Object>) {
        match ev {
            Event::Init => W::relist(self).0 = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                if let Some((k, v)) = W::convert(self, &o)
                    && let Some(r) = W::relist(self).0.as_mut()
                {
                    r.insert(k, v);
                }
            }
            Event::InitDone => {
                let new = W::relist(self).0.take().unwrap_or_default();
                for k in gone(W::world(self).keys(), &new) {
                    W::set(self, &k, None);
                }
                for (k, v) in new {
                    W::set(self, &k, Some(v));
                }
                W::listed(self);
                self.resolve_restored();
            }
            Event::Apply(o) => {
                if let Some((k, v)) = W::convert(self, &o) {
                    W::set(self, &k, Some(v));
                }
            }
            Event::Delete(o) => {
                if let Some(k) = W::key(&o) {
                    W::set(self, &k, None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gone_is_what_the_relist_no_longer_has_in_order() {
        let held = ["c", "a", "b", "d"];
        let new = [("b", 1), ("e", 2)].into();
        assert_eq!(super::gone(&held, &new), ["a", "c", "d"]);
    }
}
