//! A map keyed by prefix, stored compactly: IPv4 keys take 8 bytes, not
//! the 20 of a generic `IpAddr` key. At 100k+ routes the RIB's footprint is
//! mostly this map, so the layout matters.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::packet::Prefix;

type V4 = (u32, u8);
type V6 = ([u8; 16], u8);

/// A `HashMap<Prefix, V>` with one table per address family.
#[derive(Debug, Clone)]
pub struct PrefixMap<V> {
    v4: HashMap<V4, V>,
    v6: HashMap<V6, V>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        Self {
            v4: HashMap::new(),
            v6: HashMap::new(),
        }
    }
}

fn v4_prefix(k: &V4) -> Prefix {
    Prefix::new(IpAddr::V4(Ipv4Addr::from(k.0)), k.1).expect("stored prefixes are valid")
}

fn v6_prefix(k: &V6) -> Prefix {
    Prefix::new(IpAddr::V6(Ipv6Addr::from(k.0)), k.1).expect("stored prefixes are valid")
}

enum Key {
    V4(V4),
    V6(V6),
}

fn key(p: &Prefix) -> Key {
    match p.addr() {
        IpAddr::V4(a) => Key::V4((u32::from(a), p.len())),
        IpAddr::V6(a) => Key::V6((a.octets(), p.len())),
    }
}

impl<V> PrefixMap<V> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value for `p`.
    pub fn get(&self, p: &Prefix) -> Option<&V> {
        match key(p) {
            Key::V4(k) => self.v4.get(&k),
            Key::V6(k) => self.v6.get(&k),
        }
    }

    /// The value for `p`, mutably.
    pub fn get_mut(&mut self, p: &Prefix) -> Option<&mut V> {
        match key(p) {
            Key::V4(k) => self.v4.get_mut(&k),
            Key::V6(k) => self.v6.get_mut(&k),
        }
    }

    /// Inserts, returning the old value.
    pub fn insert(&mut self, p: Prefix, v: V) -> Option<V> {
        match key(&p) {
            Key::V4(k) => self.v4.insert(k, v),
            Key::V6(k) => self.v6.insert(k, v),
        }
    }

    /// Removes, returning the value.
    pub fn remove(&mut self, p: &Prefix) -> Option<V> {
        match key(p) {
            Key::V4(k) => self.v4.remove(&k),
            Key::V6(k) => self.v6.remove(&k),
        }
    }

    /// The value for `p`, inserted with `V::default()` if absent.
    pub fn get_or_default(&mut self, p: Prefix) -> &mut V
    where
        V: Default,
    {
        match key(&p) {
            Key::V4(k) => match self.v4.entry(k) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(V::default()),
            },
            Key::V6(k) => match self.v6.entry(k) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(V::default()),
            },
        }
    }

    /// All entries (IPv4 first, unordered within a family).
    pub fn iter(&self) -> impl Iterator<Item = (Prefix, &V)> + '_ {
        self.v4
            .iter()
            .map(|(k, v)| (v4_prefix(k), v))
            .chain(self.v6.iter().map(|(k, v)| (v6_prefix(k), v)))
    }

    /// All values, mutably.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> + '_ {
        self.v4.values_mut().chain(self.v6.values_mut())
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.v4.clear();
        self.v6.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_round_trip() {
        let mut m = PrefixMap::default();
        let a: Prefix = "10.1.0.0/16".parse().unwrap();
        let b: Prefix = "fd00::/64".parse().unwrap();
        m.insert(a, 1);
        *m.get_or_default(b) += 2;
        assert_eq!(m.get(&a), Some(&1));
        assert_eq!(m.get(&b), Some(&2));
        let mut all: Vec<_> = m.iter().map(|(p, v)| (p.to_string(), *v)).collect();
        all.sort();
        assert_eq!(
            all,
            vec![("10.1.0.0/16".into(), 1), ("fd00::/64".into(), 2)]
        );
        assert_eq!(m.remove(&a), Some(1));
        assert_eq!(m.len(), 1);
    }
}
