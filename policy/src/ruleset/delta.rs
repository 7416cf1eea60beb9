//! A change to the table ([`Delta`]): the sets, elements and chains
//! that differ, whether worked out between two whole tables
//! ([`Table::delta`]) or over what one change touched (the compiler's
//! journal), and its commands ([`Op`]) in an order the kernel accepts in
//! one transaction.

use std::collections::BTreeSet;

use super::{Batch, Element, ElementOp, Line, Op, Set, Table};

/// The changes between two tables, in an order the kernel accepts in one
/// transaction: what is referenced exists before what references it, and
/// goes after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub(super) new_sets: Vec<(String, Set)>,
    /// Sets whose type changed: deleted, then created again.
    pub(super) late_sets: Vec<(String, Set)>,
    pub(super) new_chains: Vec<String>,
    pub(super) add_elements: Vec<(String, BTreeSet<Element>)>,
    pub(super) rewrite: Vec<(String, Vec<Line>)>,
    pub(super) del_elements: Vec<(String, BTreeSet<Element>)>,
    pub(super) del_chains: Vec<String>,
    pub(super) del_sets: Vec<String>,
}

/// How many elements the per-set element lists hold together.
fn element_count(sets: &[(String, BTreeSet<Element>)]) -> usize {
    sets.iter().map(|(_, e)| e.len()).sum()
}

impl Delta {
    /// Its commands, in an order the kernel accepts in one transaction:
    /// what is referenced exists before what references it, and goes
    /// after it.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        let elements = |op, set: &str, e: &BTreeSet<Element>| Op::Elements {
            op,
            set: set.to_string(),
            elements: e.iter().cloned().collect(),
        };
        let set_decl = |ops: &mut Vec<Op>, name: &str, set: &Set| {
            ops.push(Op::AddSet {
                name: name.to_string(),
                kind: set.kind,
            });
            if !set.elements.is_empty() {
                ops.push(elements(ElementOp::Add, name, &set.elements));
            }
        };
        for (name, set) in &self.new_sets {
            set_decl(&mut ops, name, set);
        }
        for name in &self.new_chains {
            ops.push(Op::AddChain(name.clone()));
        }
        for (name, e) in &self.add_elements {
            ops.push(elements(ElementOp::Add, name, e));
        }
        let rules = |ops: &mut Vec<Op>, name: &str, lines: &[Line]| {
            ops.extend(lines.iter().map(|l| Op::AddRule {
                chain: name.to_string(),
                line: l.clone(),
            }));
        };
        // With a set to renew, the chains are refilled after it is. A new
        // chain has nothing to flush.
        for (name, lines) in &self.rewrite {
            if !self.new_chains.contains(name) {
                ops.push(Op::FlushChain(name.clone()));
            }
            if self.late_sets.is_empty() {
                rules(&mut ops, name, lines);
            }
        }
        for (name, e) in &self.del_elements {
            ops.push(elements(ElementOp::Delete, name, e));
        }
        for name in &self.del_chains {
            ops.push(Op::FlushChain(name.clone()));
        }
        for name in &self.del_chains {
            ops.push(Op::DeleteChain(name.clone()));
        }
        for name in &self.del_sets {
            ops.push(Op::DeleteSet(name.clone()));
        }
        if !self.late_sets.is_empty() {
            for (name, set) in &self.late_sets {
                set_decl(&mut ops, name, set);
            }
            for (name, lines) in &self.rewrite {
                rules(&mut ops, name, lines);
            }
        }
        ops
    }

    /// Its element changes, if that is all it changes.
    #[cfg(test)]
    pub(crate) fn element_ops(&self) -> Option<Vec<(ElementOp, String, Vec<Element>)>> {
        self.ops()
            .into_iter()
            .map(|op| match op {
                Op::Elements { op, set, elements } => Some((op, set, elements)),
                _ => None,
            })
            .collect()
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// How many objects it touches (set elements, chains):
    /// what an update costs.
    pub fn size(&self) -> usize {
        self.new_sets
            .iter()
            .chain(&self.late_sets)
            .map(|(_, s)| 1 + s.elements.len())
            .sum::<usize>()
            + self.new_chains.len()
            + element_count(&self.add_elements)
            + self.rewrite.len()
            + element_count(&self.del_elements)
            + self.del_chains.len()
            + self.del_sets.len()
    }

    /// One `nft -f` transaction.
    pub fn script(&self) -> String {
        let mut b = Batch::default();
        b.extend(self);
        b.script()
    }
}

impl Table {
    /// The changes that take `self` to `new`.
    pub fn delta(&self, new: &Table) -> Delta {
        let mut d = Delta::default();
        for (name, set) in &new.sets {
            match self.sets.get(name) {
                None => d.new_sets.push((name.clone(), set.clone())),
                Some(old) if old.kind != set.kind => {
                    // Names carry their kind (p4, b6, ...): cannot happen,
                    // but a set of another type would need a new name.
                    d.del_sets.push(name.clone());
                    d.late_sets.push((name.clone(), set.clone()));
                }
                Some(old) => {
                    let add: BTreeSet<Element> =
                        set.elements.difference(&old.elements).cloned().collect();
                    let del: BTreeSet<Element> =
                        old.elements.difference(&set.elements).cloned().collect();
                    if !add.is_empty() {
                        d.add_elements.push((name.clone(), add));
                    }
                    if !del.is_empty() {
                        d.del_elements.push((name.clone(), del));
                    }
                }
            }
        }
        for name in self.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
            d.del_sets.push(name.clone());
        }
        for (name, rules) in &new.chains {
            match self.chains.get(name) {
                None => {
                    d.new_chains.push(name.clone());
                    d.rewrite.push((name.clone(), rules.clone()));
                }
                Some(old) if old != rules => d.rewrite.push((name.clone(), rules.clone())),
                Some(_) => {}
            }
        }
        for name in self.chains.keys().filter(|n| !new.chains.contains_key(*n)) {
            d.del_chains.push(name.clone());
        }
        d
    }
}

impl Batch {
    /// Appends `d`'s commands.
    pub fn extend(&mut self, d: &Delta) {
        self.ops.extend(d.ops());
    }
}
