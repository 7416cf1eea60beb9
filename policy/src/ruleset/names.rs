//! The names of the chains made per policy, per rule and per endpoint:
//! readable where they fit, cut and hashed where they would not (every
//! legal Kubernetes name gives one the kernel takes), stable across runs.

use crate::model::{Direction, PolicyKey};

pub(super) fn dir_prefix(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    }
}

/// The longest policy chain name: the kernel takes names of up to 255
/// bytes, and a policy's rule chains add `/RULE/PEER` to it.
pub const MAX_CHAIN_NAME: usize = 200;

/// The chain of `policy` for `dir`: `in/NAMESPACE/NAME` (a namespace
/// has at most 63 characters, a name 253), or, when that is longer than
/// [`MAX_CHAIN_NAME`], the name cut and ended with `_` and a hash of the
/// whole: every legal name gives a name the kernel and `nft`'s parser
/// take (`_` is in nft's identifiers and in no Kubernetes name, so a cut
/// name is never another policy's full one), and a cut name can only
/// meet another policy of its own namespace.
pub fn policy_chain(dir: Direction, policy: &PolicyKey) -> String {
    let full = format!("{}/{}/{}", dir_prefix(dir), policy.namespace, policy.name);
    if full.len() <= MAX_CHAIN_NAME {
        return full;
    }
    let hash = format!("_{:016x}", fnv(&full));
    let mut keep = MAX_CHAIN_NAME - hash.len();
    while !full.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{hash}", &full[..keep])
}

/// The chain rule `rule` of a policy whose chain is `policy_chain` goes
/// on in when it has several peers and several ports.
pub(super) fn rule_chain(policy_chain: &str, rule: usize) -> String {
    format!("{policy_chain}/{rule}")
}

/// The chain of the excepts of peer `peer` of a rule (its chain
/// `rule_chain`).
pub(super) fn except_chain(rule_chain: &str, peer: usize) -> String {
    format!("{rule_chain}/{peer}")
}

/// An ipBlock with more excepts than this matches them in a chain of
/// its own (a rule of the kernel holds at most 128 expressions; each
/// except takes two or three).
pub const INLINE_EXCEPTS: usize = 8;

/// The endpoint chain for `dir` of the endpoints that `policies` (in
/// order) isolate, named by a hash of that list: every endpoint the same
/// policies isolate shares it, so a new pod is a set element, not a
/// chain. (A hash collision takes the next free `-N` suffix.)
pub fn endpoint_chain(dir: Direction, policies: &[PolicyKey]) -> String {
    let list: String = policies
        .iter()
        .map(|p| policy_chain(dir, p) + "\n")
        .collect();
    format!("ep-{}/{:016x}", dir_prefix(dir), fnv(&list))
}

/// FNV-1a, 64 bits, of `text`: stable across runs and builds.
pub(super) fn fnv(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
