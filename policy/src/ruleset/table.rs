//! The whole table as Margay wants it ([`Table`]): its sets, its chains,
//! the dispatch of each workload interface ([`Verdict`]), the names of
//! its fixed parts (the workload sets, the dispatch chains, the interface
//! sets), and its text as one `nft -f` transaction that replaces it.

use std::collections::{BTreeMap, BTreeSet};

use super::names::dir_prefix;
use super::{Element, Line, Set, SetKind, TABLE};
use crate::model::Direction;

/// Where an interface's packets are dispatched.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Its endpoint chain (shared by the endpoints that the same policies
    /// isolate).
    Jump(String),
    /// Dropped (a quarantined interface: its Pod cannot be read).
    Drop,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Jump(c) => write!(f, "jump {c}"),
            Self::Drop => f.write_str("drop"),
        }
    }
}

/// The whole table as Margay wants it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Named sets.
    pub sets: BTreeMap<String, Set>,
    /// Regular chains and their rules (the base chain is fixed).
    pub chains: BTreeMap<String, Vec<Line>>,
    /// Ingress dispatch as decided: interface → verdict (`jump
    /// ep-in/HASH`, or `drop` for a quarantined interface). In the kernel
    /// it is the interface's name in that verdict's set ([`iface_set`]),
    /// which `sets` holds; this map is not loaded itself.
    pub ingress: BTreeMap<String, Verdict>,
    /// Egress dispatch as decided: interface → verdict.
    pub egress: BTreeMap<String, Verdict>,
}

/// The prefix of every workload interface's name (Calico's, and the
/// agent's `cali` + hash of the attachment).
pub const WORKLOAD_PREFIX: &str = "cali";
/// The set of every workload interface Margay knows.
pub const IFACES_SET: &str = "ifaces";

/// The set of the workloads' own sources of one family.
pub fn source_set(v6: bool) -> &'static str {
    if v6 { "src/6" } else { "src/4" }
}

/// The dispatch chain of `dir` (the base chain jumps to both).
pub fn dispatch_chain(dir: Direction) -> String {
    format!("dispatch-{}", dir_prefix(dir))
}

/// The set of the interfaces dispatched to `verdict` in `dir`: an
/// endpoint chain's (`ep-in/HASH` → `if-in/HASH`), or the quarantined
/// ones (`if-in/drop`).
pub fn iface_set(dir: Direction, verdict: &Verdict) -> String {
    match verdict {
        Verdict::Jump(chain) => chain.replacen("ep-", "if-", 1),
        Verdict::Drop => format!("if-{}/drop", dir_prefix(dir)),
    }
}

fn elements(e: &BTreeSet<Element>) -> String {
    e.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Table {
    /// A table with nothing isolated: the dispatch chains and the
    /// quarantine sets, which are always there.
    pub fn new() -> Self {
        let mut t = Self::default();
        for (name, kind) in [
            (IFACES_SET, SetKind::Iface),
            (source_set(false), SetKind::IfaceAddr4),
            (source_set(true), SetKind::IfaceAddr6),
        ] {
            t.sets.insert(
                name.to_string(),
                Set {
                    kind,
                    elements: BTreeSet::new(),
                },
            );
        }
        for dir in [Direction::Ingress, Direction::Egress] {
            let drop = iface_set(dir, &Verdict::Drop);
            t.sets.insert(
                drop.clone(),
                Set {
                    kind: SetKind::Iface,
                    elements: BTreeSet::new(),
                },
            );
            t.chains.insert(
                dispatch_chain(dir),
                vec![Line::Quarantine { dir, set: drop }],
            );
        }
        t
    }

    /// One transaction that replaces the whole table (creating it first,
    /// so the delete never fails): atomic, and other tables untouched.
    pub fn script(&self) -> String {
        let mut s = format!("table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n");
        for (name, set) in &self.sets {
            s.push_str(&format!("  set {name} {{ {} ", set.kind.decl()));
            if !set.elements.is_empty() {
                s.push_str(&format!("elements = {{ {} }}; ", elements(&set.elements)));
            }
            s.push_str("}\n");
        }
        for name in self.chains.keys() {
            s.push_str(&format!("  chain {name} {{ }}\n"));
        }
        for (name, rules) in &self.chains {
            s.push_str(&format!("  chain {name} {{\n"));
            for r in rules {
                s.push_str(&format!("    {r}\n"));
            }
            s.push_str("  }\n");
        }
        let w = WORKLOAD_PREFIX;
        s.push_str(&format!(
            "  chain source {{\n    type filter hook prerouting priority raw; policy accept;\n    \
             iifname != \"{w}*\" accept\n    \
             iifname . ip saddr @{} accept\n    \
             iifname . ip6 saddr @{} accept\n    \
             ip6 saddr fe80::/10 accept\n    drop\n  }}\n",
            source_set(false),
            source_set(true)
        ));
        s.push_str(&format!(
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    \
             oifname \"{w}*\" oifname != @{IFACES_SET} drop\n    \
             ct state established,related accept\n    jump dispatch-out\n    \
             jump dispatch-in\n  }}\n}}\n"
        ));
        s
    }

    /// The script that removes the table (nothing of it left).
    pub fn remove_script() -> String {
        format!("table {TABLE}\ndelete table {TABLE}\n")
    }
}
