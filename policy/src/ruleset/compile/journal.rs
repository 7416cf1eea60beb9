//! What the change under way touched ([`Journal`]: the old values of the
//! sets and chains it changed), the table's writes that record it, and
//! the [`Delta`] worked out from it at the end of the change: a change
//! costs what it touches, never the whole table.

use std::collections::{BTreeMap, BTreeSet};

use super::Compiler;
use crate::model::Direction;
use crate::ruleset::{
    Delta, Element, Line, Set, SetKind, Table, Verdict, dispatch_chain, iface_set,
};

/// The old values of what a change touched (`None`: it did not exist),
/// so its delta is computed over those keys only: a change costs what it
/// touches, not the size of the table.
#[derive(Debug, Clone, Default)]
pub(super) struct Journal {
    sets: BTreeMap<String, SetWas>,
    chains: BTreeMap<String, Option<Vec<Line>>>,
}

/// What a set was before the change under way.
#[derive(Debug, Clone)]
enum SetWas {
    /// All of it (`None`: it did not exist).
    Whole(Option<Set>),
    /// Only elements changed so far: those added and those removed since
    /// (a pod's change touches a few elements of large sets).
    Elements {
        kind: SetKind,
        added: BTreeSet<Element>,
        removed: BTreeSet<Element>,
    },
}

impl Compiler {
    /// The delta of the change just made: the touched keys, old against
    /// new.
    pub(super) fn finish(&mut self) -> Delta {
        self.redispatch();
        let j = std::mem::take(&mut self.journal);
        let mut old = Table::default();
        let mut new = Table::default();
        for (name, was) in j.sets {
            match was {
                SetWas::Whole(was) => {
                    if let Some(set) = was {
                        old.sets.insert(name.clone(), set);
                    }
                    if let Some(set) = self.table.sets.get(&name) {
                        new.sets.insert(name, set.clone());
                    }
                }
                // Both sides hold only what changed: the delta is the
                // same as between the whole sets.
                SetWas::Elements {
                    kind,
                    added,
                    removed,
                } => {
                    old.sets.insert(
                        name.clone(),
                        Set {
                            kind,
                            elements: removed,
                        },
                    );
                    new.sets.insert(
                        name,
                        Set {
                            kind,
                            elements: added,
                        },
                    );
                }
            }
        }
        for (name, was) in j.chains {
            if let Some(rules) = was {
                old.chains.insert(name.clone(), rules);
            }
            if let Some(rules) = self.table.chains.get(&name) {
                new.chains.insert(name, rules.clone());
            }
        }
        old.delta(&new)
    }

    fn touch_set(&mut self, name: &str) {
        let was = match self.journal.sets.get(name) {
            Some(SetWas::Whole(_)) => return,
            None => self.table.sets.get(name).cloned(),
            Some(SetWas::Elements { added, removed, .. }) => {
                self.table.sets.get(name).cloned().map(|mut set| {
                    set.elements.retain(|e| !added.contains(e));
                    set.elements.extend(removed.iter().cloned());
                    set
                })
            }
        };
        self.journal
            .sets
            .insert(name.to_string(), SetWas::Whole(was));
    }

    /// Removes `remove` from set `name` and adds `add`, journaling the
    /// elements only.
    pub(super) fn change_elements(
        &mut self,
        name: &str,
        remove: &BTreeSet<Element>,
        add: BTreeSet<Element>,
    ) {
        let Some(set) = self.table.sets.get_mut(name) else {
            return;
        };
        let j = self
            .journal
            .sets
            .entry(name.to_string())
            .or_insert_with(|| SetWas::Elements {
                kind: set.kind,
                added: BTreeSet::new(),
                removed: BTreeSet::new(),
            });
        let mut log = match j {
            SetWas::Whole(_) => None,
            SetWas::Elements { added, removed, .. } => Some((added, removed)),
        };
        for e in remove {
            if set.elements.remove(e)
                && let Some((added, removed)) = log.as_mut()
                && !added.remove(e)
            {
                removed.insert(e.clone());
            }
        }
        for e in add {
            if !set.elements.contains(&e) {
                set.elements.insert(e.clone());
                if let Some((added, removed)) = log.as_mut()
                    && !removed.remove(&e)
                {
                    added.insert(e);
                }
            }
        }
    }

    pub(super) fn put_set(&mut self, name: String, set: Set) {
        self.touch_set(&name);
        self.table.sets.insert(name, set);
    }

    pub(super) fn drop_set(&mut self, name: &str) {
        self.touch_set(name);
        self.table.sets.remove(name);
    }

    fn touch_chain(&mut self, name: &str) {
        if !self.journal.chains.contains_key(name) {
            let was = self.table.chains.get(name).cloned();
            self.journal.chains.insert(name.to_string(), was);
        }
    }

    pub(super) fn put_chain(&mut self, name: String, rules: Vec<Line>) {
        self.touch_chain(&name);
        self.table.chains.insert(name, rules);
    }

    pub(super) fn drop_chain(&mut self, name: &str) {
        self.touch_chain(name);
        self.table.chains.remove(name);
    }

    pub(super) fn map(&self, dir: Direction) -> &BTreeMap<String, Verdict> {
        match dir {
            Direction::Ingress => &self.table.ingress,
            Direction::Egress => &self.table.egress,
        }
    }

    fn map_mut(&mut self, dir: Direction) -> &mut BTreeMap<String, Verdict> {
        match dir {
            Direction::Ingress => &mut self.table.ingress,
            Direction::Egress => &mut self.table.egress,
        }
    }

    /// Dispatches `ifname` to `verdict` in `dir`: its name moved to that
    /// verdict's interface set (which exists: the quarantine's always, an
    /// endpoint chain's with the chain).
    pub(super) fn put_map(&mut self, dir: Direction, ifname: &str, verdict: Verdict) {
        let name = BTreeSet::from([Element::Iface(ifname.to_string())]);
        let set = iface_set(dir, &verdict);
        if let Some(old) = self.map_mut(dir).insert(ifname.to_string(), verdict)
            && iface_set(dir, &old) != set
        {
            self.change_elements(&iface_set(dir, &old), &name, BTreeSet::new());
        }
        self.change_elements(&set, &BTreeSet::new(), name);
    }

    /// `ifname` no longer dispatched in `dir`.
    pub(super) fn drop_map(&mut self, dir: Direction, ifname: &str) {
        if let Some(old) = self.map_mut(dir).remove(ifname) {
            let name = BTreeSet::from([Element::Iface(ifname.to_string())]);
            self.change_elements(&iface_set(dir, &old), &name, BTreeSet::new());
        }
    }

    /// Writes the dispatch chains whose endpoint chains came or went
    /// during the change again (once per change, however many came or
    /// went): the quarantine, then one line per endpoint chain.
    pub(super) fn redispatch(&mut self) {
        for dir in std::mem::take(&mut self.stale_dispatch) {
            self.write_dispatch(dir);
        }
    }

    fn write_dispatch(&mut self, dir: Direction) {
        let mut lines = vec![Line::Quarantine {
            dir,
            set: iface_set(dir, &Verdict::Drop),
        }];
        lines.extend(
            self.ep_chains
                .by_name
                .iter()
                .filter(|(_, ((d, _), _))| *d == dir)
                .map(|(chain, _)| Line::Dispatch {
                    dir,
                    set: iface_set(dir, &Verdict::Jump(chain.clone())),
                    chain: chain.clone(),
                }),
        );
        self.put_chain(dispatch_chain(dir), lines);
    }
}
