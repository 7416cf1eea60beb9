//! A policy's chains: one per direction with its rules' lines (one per
//! (peer, port) when a rule has one of either, else one per port jumping
//! to the rule's chain of one per peer), and the chains of long except
//! lists.

use super::{Compiled, Compiler};
use crate::model::{Direction, Peer, PolicyKey, PortMatch, Rule};
use crate::ruleset::names::{INLINE_EXCEPTS, except_chain, policy_chain, rule_chain};
use crate::ruleset::registry::SetDef;
use crate::ruleset::{Field, L4Match, Line, PeerMatch};

impl Compiler {
    /// Drops what was compiled for `key` and compiles it again if it
    /// exists and selects a local endpoint. The shared sets it still uses
    /// stay as they are (no refill).
    pub(super) fn recompile_policy(&mut self, key: &PolicyKey) {
        let old = self.compiled.remove(key).unwrap_or_default();
        for dir in [Direction::Ingress, Direction::Egress] {
            self.drop_chain(&policy_chain(dir, key));
        }
        for c in &old.chains {
            self.drop_chain(c);
        }
        let mut compiled = Compiled::default();
        let wanted = self.selects_local(key);
        if wanted {
            let policy = self.world.policies[key].clone();
            for dir in [Direction::Ingress, Direction::Egress] {
                let Some(rules) = policy.rules(dir) else {
                    continue;
                };
                let chain = policy_chain(dir, key);
                let mut lines = Vec::new();
                for (i, r) in rules.iter().enumerate() {
                    lines.extend(self.rule_lines(dir, key, &chain, i, r, &mut compiled));
                }
                self.put_chain(chain, lines);
            }
        }
        for name in old.sets.difference(&compiled.sets) {
            self.release_set(name, key);
        }
        if wanted {
            self.compiled.insert(key.clone(), compiled);
        }
    }

    /// The lines rule `index` of policy `key` puts in its chain `chain`
    /// (its shared sets used, its own chains made, both recorded in
    /// `compiled`): one per (peer, port) when it has one peer or one port,
    /// else one per port jumping to the rule's chain, which has one per
    /// peer: never peers × ports lines.
    fn rule_lines(
        &mut self,
        dir: Direction,
        key: &PolicyKey,
        chain: &str,
        index: usize,
        r: &Rule,
        compiled: &mut Compiled,
    ) -> Vec<Line> {
        let field = match dir {
            Direction::Ingress => Field::Saddr,
            Direction::Egress => Field::Daddr,
        };
        // Peer matches (None: anyone).
        let mut peers: Vec<Option<PeerMatch>> = Vec::new();
        if r.peers.is_empty() {
            peers.push(None);
        }
        for p in &r.peers {
            let Peer::Pods { namespaces, pods } = p else {
                continue;
            };
            for v6 in [false, true] {
                let def = SetDef::Peer {
                    ns: namespaces.is_none().then(|| key.namespace.to_string()),
                    namespaces: namespaces.clone(),
                    pods: pods.clone(),
                    v6,
                };
                let set = self.use_set(def, key);
                compiled.sets.insert(set.clone());
                let m = Some(PeerMatch::Set { v6, field, set });
                if !peers.contains(&m) {
                    peers.push(m);
                }
            }
        }
        // ipBlocks as prefix matches in the rule, not interval sets: they
        // change only with their policy (which rewrites its chain anyway),
        // and nft reads back every interval set's elements before any
        // element update, which made each pod change cost the whole
        // table's blocks.
        for p in &r.peers {
            if let Peer::Block { cidr, except } = p {
                peers.push(Some(PeerMatch::Block {
                    field,
                    cidr: *cidr,
                    except: except.clone(),
                }));
            }
        }
        // Port matches (None: every port of every protocol).
        let mut ports: Vec<Option<L4Match>> = Vec::new();
        if r.ports.is_empty() {
            ports.push(None);
        }
        for p in &r.ports {
            match p {
                PortMatch::All { proto } => ports.push(Some(L4Match::Proto(*proto))),
                PortMatch::Range { proto, first, last } => ports.push(Some(L4Match::Ports {
                    proto: *proto,
                    first: *first,
                    last: *last,
                })),
                PortMatch::Named { proto, name } => {
                    for v6 in [false, true] {
                        let def = SetDef::Named {
                            local: dir == Direction::Ingress,
                            proto: *proto,
                            name: name.clone(),
                            v6,
                        };
                        let set = self.use_set(def, key);
                        compiled.sets.insert(set.clone());
                        ports.push(Some(L4Match::Named { v6, set }));
                    }
                }
            }
        }
        let rule_chain = rule_chain(chain, index);
        // An ipBlock with many excepts: the block in the line, the
        // excepts in a chain of their own that returns on each and
        // allows the rest.
        let mut excepts: Vec<Option<String>> = Vec::with_capacity(peers.len());
        for (j, peer) in peers.iter_mut().enumerate() {
            let Some(PeerMatch::Block { field, except, .. }) = peer else {
                excepts.push(None);
                continue;
            };
            if except.len() <= INLINE_EXCEPTS {
                excepts.push(None);
                continue;
            }
            let name = except_chain(&rule_chain, j);
            let mut lines: Vec<Line> = std::mem::take(except)
                .into_iter()
                .map(|e| Line::ReturnIf {
                    peer: PeerMatch::Block {
                        field: *field,
                        cidr: e,
                        except: Vec::new(),
                    },
                })
                .collect();
            lines.push(Line::Allow {
                peer: None,
                port: None,
            });
            self.put_chain(name.clone(), lines);
            compiled.chains.insert(name.clone());
            excepts.push(Some(name));
        }
        let line = |peer: &Option<PeerMatch>, port: &Option<L4Match>, x: &Option<String>| match x {
            Some(chain) => Line::JumpIf {
                peer: peer.clone(),
                port: port.clone(),
                chain: chain.clone(),
            },
            None => Line::Allow {
                peer: peer.clone(),
                port: port.clone(),
            },
        };
        let mut lines = Vec::new();
        if peers.len() > 1 && ports.len() > 1 {
            // Ports here, peers in the rule's chain.
            let peer_lines = peers
                .iter()
                .zip(&excepts)
                .map(|(p, x)| line(p, &None, x))
                .collect();
            self.put_chain(rule_chain.clone(), peer_lines);
            compiled.chains.insert(rule_chain.clone());
            for port in &ports {
                lines.push(Line::JumpIf {
                    peer: None,
                    port: port.clone(),
                    chain: rule_chain.clone(),
                });
            }
            return lines;
        }
        for (peer, x) in peers.iter().zip(&excepts) {
            for port in &ports {
                let pf = peer.as_ref().map(PeerMatch::v6);
                let qf = port.as_ref().and_then(L4Match::v6);
                if let (Some(a), Some(b)) = (pf, qf)
                    && a != b
                {
                    continue;
                }
                lines.push(line(peer, port, x));
            }
        }
        lines
    }
}
