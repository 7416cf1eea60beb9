//! Desired versus actual: the one diffing primitive Margay reconciles every
//! table with (kernel blackholes, pod routes, routes to remote blocks,
//! VXLAN neighbour and FDB entries, and the BGP speaker's Adj-RIB-Out).
//!
//! Modelled on felix's `deltatracker`: callers say what they want and what
//! they found; [`change`] decides one key, [`Delta::between`] a whole table,
//! and [`Delta::apply`] carries a delta out item by item, continuing past an
//! item that fails, so one refused write never stops the others. A failed
//! item is simply still different on the next pass, which retries it.
//!
//! Removal is a separate permission ([`Removals`]): a desired table that was
//! computed from an input that could not be read says `Forbidden`, and then
//! nothing is removed, only added or changed. "Could not read" never means
//! "nothing is wanted".

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

/// What one key needs so that the actual value becomes the desired one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<V> {
    /// Already right.
    Keep,
    /// Install (or overwrite with) this value.
    Set(V),
    /// Remove the key.
    Remove,
}

/// The per-key primitive: `want` is the desired value (`None`: not wanted),
/// `have` the actual one (`None`: absent).
pub fn change<V: PartialEq>(want: Option<V>, have: Option<&V>) -> Change<V> {
    match (want, have) {
        (Some(w), Some(h)) if w == *h => Change::Keep,
        (Some(w), _) => Change::Set(w),
        (None, Some(_)) => Change::Remove,
        (None, None) => Change::Keep,
    }
}

/// May a delta remove what is not desired?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removals {
    /// The desired table is complete: what it lacks goes.
    Allowed,
    /// The desired table was computed from an input that is Unknown (or
    /// stale): only add and change.
    Forbidden,
}

impl Removals {
    /// `Allowed` when `complete`.
    pub fn when(complete: bool) -> Self {
        if complete {
            Self::Allowed
        } else {
            Self::Forbidden
        }
    }
}

/// What a whole table needs: keys to set (with their desired values) and
/// keys to remove, each in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta<K, V> {
    /// Keys to install or overwrite.
    pub set: Vec<(K, V)>,
    /// Keys to remove.
    pub remove: Vec<K>,
}

impl<K, V> Default for Delta<K, V> {
    fn default() -> Self {
        Self {
            set: Vec::new(),
            remove: Vec::new(),
        }
    }
}

impl<K: Ord + Clone, V: PartialEq + Clone> Delta<K, V> {
    /// The difference between a desired and an actual table.
    pub fn between(want: &BTreeMap<K, V>, have: &BTreeMap<K, V>, removals: Removals) -> Self {
        let mut d = Self::default();
        for (k, w) in want {
            if let Change::Set(v) = change(Some(w), have.get(k).as_ref()) {
                d.set.push((k.clone(), v.clone()));
            }
        }
        if removals == Removals::Allowed {
            for k in have.keys() {
                if let Change::Remove = change::<&V>(want.get(k), have.get(k).as_ref()) {
                    d.remove.push(k.clone());
                }
            }
        }
        d
    }
}

impl<K: Ord + Clone> Delta<K, ()> {
    /// The difference between a desired and an actual set.
    pub fn between_sets(want: &BTreeSet<K>, have: &BTreeSet<K>, removals: Removals) -> Self {
        Self {
            set: want.difference(have).map(|k| (k.clone(), ())).collect(),
            remove: match removals {
                Removals::Allowed => have.difference(want).cloned().collect(),
                Removals::Forbidden => Vec::new(),
            },
        }
    }
}

impl<K, V> Delta<K, V> {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    /// Carries the delta out: removals first (so an entry moving to a new
    /// key never meets its old self), then sets; an item that fails is
    /// recorded and the rest go on.
    pub async fn apply<E, S, SF, R, RF>(self, mut set: S, mut remove: R) -> Report<K, E>
    where
        S: FnMut(K, V) -> SF,
        SF: Future<Output = Result<(), E>>,
        R: FnMut(K) -> RF,
        RF: Future<Output = Result<(), E>>,
        K: Clone,
    {
        let mut r = Report::default();
        for k in self.remove {
            match remove(k.clone()).await {
                Ok(()) => r.removed += 1,
                Err(error) => r.failed.push(Failure {
                    key: k,
                    op: Op::Remove,
                    error,
                }),
            }
        }
        for (k, v) in self.set {
            match set(k.clone(), v).await {
                Ok(()) => r.set += 1,
                Err(error) => r.failed.push(Failure {
                    key: k,
                    op: Op::Set,
                    error,
                }),
            }
        }
        r
    }
}

/// Which half of a delta an item belonged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// It was being installed.
    Set,
    /// It was being removed.
    Remove,
}

/// One item that could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure<K, E> {
    /// The key.
    pub key: K,
    /// What was tried.
    pub op: Op,
    /// Why it failed.
    pub error: E,
}

/// What [`Delta::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report<K, E> {
    /// Keys installed or overwritten.
    pub set: usize,
    /// Keys removed.
    pub removed: usize,
    /// Items that failed (tried again on the next pass).
    pub failed: Vec<Failure<K, E>>,
}

impl<K, E> Default for Report<K, E> {
    fn default() -> Self {
        Self {
            set: 0,
            removed: 0,
            failed: Vec::new(),
        }
    }
}

impl<K, E> Report<K, E> {
    /// Whether anything changed.
    pub fn changed(&self) -> usize {
        self.set + self.removed
    }

    /// Whether every item was carried out.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn one_key() {
        assert_eq!(change(Some(1), Some(&1)), Change::Keep);
        assert_eq!(change(Some(2), Some(&1)), Change::Set(2));
        assert_eq!(change(Some(2), None), Change::Set(2));
        assert_eq!(change::<u8>(None, Some(&1)), Change::Remove);
        assert_eq!(change::<u8>(None, None), Change::Keep);
    }

    #[test]
    fn tables_and_the_removal_permission() {
        let want: BTreeMap<u8, u8> = [(1, 1), (2, 2)].into();
        let have: BTreeMap<u8, u8> = [(2, 3), (4, 4)].into();
        let d = Delta::between(&want, &have, Removals::Allowed);
        assert_eq!(d.set, vec![(1, 1), (2, 2)]);
        assert_eq!(d.remove, vec![4]);
        let d = Delta::between(&want, &have, Removals::Forbidden);
        assert_eq!(d.set, vec![(1, 1), (2, 2)]);
        assert!(
            d.remove.is_empty(),
            "an incomplete desired table removes nothing"
        );
        assert!(Delta::between(&want, &want, Removals::Allowed).is_empty());
        let a: BTreeSet<u8> = [1, 2].into();
        let b: BTreeSet<u8> = [2, 3].into();
        let d = Delta::between_sets(&a, &b, Removals::Allowed);
        assert_eq!((d.set, d.remove), (vec![(1, ())], vec![3]));
        assert!(
            Delta::between_sets(&a, &b, Removals::Forbidden)
                .remove
                .is_empty()
        );
    }

    #[test]
    fn apply_goes_on_past_a_failure() {
        let want: BTreeMap<u8, u8> = [(1, 1), (2, 2), (3, 3)].into();
        let have: BTreeMap<u8, u8> = [(9, 9), (8, 8)].into();
        let done = RefCell::new(Vec::new());
        let d = Delta::between(&want, &have, Removals::Allowed);
        let r = futures::executor::block_on(d.apply(
            |k, _v| {
                let res = if k == 2 { Err("refused") } else { Ok(()) };
                if res.is_ok() {
                    done.borrow_mut().push(format!("set {k}"));
                }
                async move { res }
            },
            |k| {
                let res = if k == 8 { Err("busy") } else { Ok(()) };
                if res.is_ok() {
                    done.borrow_mut().push(format!("remove {k}"));
                }
                async move { res }
            },
        ));
        assert_eq!(r.set, 2);
        assert_eq!(r.removed, 1);
        assert_eq!(
            r.failed,
            vec![
                Failure {
                    key: 8,
                    op: Op::Remove,
                    error: "busy"
                },
                Failure {
                    key: 2,
                    op: Op::Set,
                    error: "refused"
                }
            ]
        );
        assert_eq!(*done.borrow(), ["remove 9", "set 1", "set 3"]);
        assert!(!r.ok());
        assert_eq!(r.changed(), 3);
    }
}
