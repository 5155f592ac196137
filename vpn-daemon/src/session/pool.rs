//! The client address pool: one /32 (and optionally one IPv6 address) per
//! session.
//!
//! A user prefers, in order: the address they had last time (while it is
//! free), then the address their name hashes to, then the next free one.
//! The hash makes a user's address stable across daemon restarts too.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

/// Addresses handed to one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

#[derive(Debug)]
pub struct Pool {
    net: Ipv4Net,
    v6: Option<Ipv6Net>,
    /// Offsets from the network address that clients may get.
    first: u32,
    count: u32,
    used: HashSet<u32>,
    last_by_user: HashMap<String, u32>,
}

impl Pool {
    /// A pool over `net`, keeping the network address, the first host (the
    /// gateway) and the broadcast address out.
    pub fn new(net: Ipv4Net, v6: Option<Ipv6Net>) -> Self {
        let size = 1u32 << (32 - net.prefix_len());
        Pool {
            net,
            v6,
            first: 2,
            count: size - 3,
            used: HashSet::new(),
            last_by_user: HashMap::new(),
        }
    }

    /// Number of client addresses.
    pub fn capacity(&self) -> u32 {
        self.count
    }

    fn lease_at(&self, off: u32) -> Lease {
        let v4 = Ipv4Addr::from(u32::from(self.net.network()) + off);
        let v6 = self
            .v6
            .map(|n| Ipv6Addr::from(u128::from(n.network()) + u128::from(off)));
        Lease { v4, v6 }
    }

    fn offset_of(&self, a: Ipv4Addr) -> Option<u32> {
        let off = u32::from(a).checked_sub(u32::from(self.net.network()))?;
        (off >= self.first && off < self.first + self.count).then_some(off)
    }

    /// Allocates `wanted` (an address the authentication server assigned)
    /// when it is a free client address of the pool, else as
    /// [`Pool::allocate`] does.
    pub fn allocate_wanted(&mut self, user: &str, wanted: Option<Ipv4Addr>) -> Option<Lease> {
        if let Some(off) = wanted
            .and_then(|a| self.offset_of(a))
            .filter(|o| !self.used.contains(o))
        {
            self.used.insert(off);
            return Some(self.lease_at(off));
        }
        self.allocate(user)
    }

    /// Takes exactly `a` (a restored session's address) when it is a free
    /// client address of the pool.
    pub fn reserve(&mut self, a: Ipv4Addr) -> Option<Lease> {
        let off = self.offset_of(a).filter(|o| !self.used.contains(o))?;
        self.used.insert(off);
        Some(self.lease_at(off))
    }

    /// Allocates an address for `user`, or `None` when the pool is full.
    pub fn allocate(&mut self, user: &str) -> Option<Lease> {
        let preferred = self.last_by_user.get(user).copied();
        let off = preferred.filter(|o| !self.used.contains(o)).or_else(|| {
            let h = Sha256::digest(user.as_bytes());
            let start = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % self.count;
            (0..self.count)
                .map(|i| self.first + (start + i) % self.count)
                .find(|o| !self.used.contains(o))
        })?;
        self.used.insert(off);
        self.last_by_user.insert(user.to_owned(), off);
        Some(self.lease_at(off))
    }

    /// Returns an address to the pool.
    pub fn release(&mut self, a: Ipv4Addr) {
        if let Some(off) = self.offset_of(a) {
            self.used.remove(&off);
        }
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool::new(
            "198.19.0.0/29".parse().unwrap(),
            Some("fd00:1::/64".parse().unwrap()),
        )
    }

    #[test]
    fn excludes_network_gateway_and_broadcast() {
        let mut p = pool();
        assert_eq!(p.capacity(), 5);
        let mut got: Vec<_> = (0..5)
            .map(|i| p.allocate(&format!("u{i}")).unwrap().v4)
            .collect();
        got.sort();
        let want: Vec<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(198, 19, 0, h)).collect();
        assert_eq!(got, want);
        assert!(p.allocate("one-too-many").is_none());
    }

    #[test]
    fn same_user_gets_same_address_while_free() {
        let mut p = pool();
        let a = p.allocate("alice").unwrap();
        p.release(a.v4);
        let b = p.allocate("bob").unwrap();
        p.release(b.v4);
        assert_eq!(p.allocate("alice").unwrap(), a);
    }

    #[test]
    fn address_is_stable_across_restarts() {
        let a = pool().allocate("alice").unwrap();
        assert_eq!(pool().allocate("alice").unwrap(), a);
    }

    #[test]
    fn taken_preferred_address_falls_back() {
        let mut p = pool();
        let a = p.allocate("alice").unwrap();
        let a2 = p.allocate("alice").unwrap();
        assert_ne!(a.v4, a2.v4);
        assert_eq!(p.in_use(), 2);
    }

    #[test]
    fn ipv6_uses_same_offset() {
        let mut p = pool();
        let l = p.allocate("alice").unwrap();
        let off = u32::from(l.v4) - u32::from(Ipv4Addr::new(198, 19, 0, 0));
        assert_eq!(
            l.v6.unwrap(),
            Ipv6Addr::from(u128::from("fd00:1::".parse::<Ipv6Addr>().unwrap()) + off as u128)
        );
    }

    #[test]
    fn release_of_foreign_address_is_ignored() {
        let mut p = pool();
        p.allocate("alice").unwrap();
        p.release(Ipv4Addr::new(198, 18, 0, 9));
        assert_eq!(p.in_use(), 1);
    }
}
