//! `.onion` names answered from a virtual address range, as C tor's automap does for Whonix
//! (`AutomapHostsOnResolve 1`, `VirtualAddrNetworkIPv4 10.192.0.0/10`, Whonix
//! `whonix-gw-firewall` and its torrc): a client that resolves an onion name gets an address
//! from the range, and a connection to that address is carried to the name. Each client qube
//! has its own map, so one cannot learn which onion names another looked up, and each map is
//! bounded: the address used least recently is the one given again.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

/// Whonix's `VirtualAddrNetworkIPv4`.
pub const VIRTUAL_NET: Ipv4Addr = Ipv4Addr::new(10, 192, 0, 0);
pub const VIRTUAL_PREFIX: u8 = 10;

/// Whether `a` is in the virtual range.
pub fn is_virtual(a: Ipv4Addr) -> bool {
    u32::from(a) >> (32 - VIRTUAL_PREFIX) == u32::from(VIRTUAL_NET) >> (32 - VIRTUAL_PREFIX)
}

/// Whether `name` is an onion service name (RFC 7686): `.onion`, with a label before it.
pub fn is_onion(name: &str) -> bool {
    name.strip_suffix(".onion").is_some_and(|h| !h.is_empty())
}

/// One client's onion names and their virtual addresses.
#[derive(Debug, Clone)]
pub struct OnionMap {
    by_name: HashMap<String, Ipv4Addr>,
    /// Address -> (name, last use); the use counter orders eviction.
    by_addr: HashMap<Ipv4Addr, (String, u64)>,
    by_use: BTreeMap<u64, Ipv4Addr>,
    clock: u64,
    next: u32,
    cap: usize,
}

impl OnionMap {
    /// A map of at most `cap` names, handing out addresses from an offset `seed` picks (so two
    /// clients' first addresses differ, as C tor picks at random).
    pub fn new(cap: usize, seed: u32) -> OnionMap {
        OnionMap {
            by_name: HashMap::new(),
            by_addr: HashMap::new(),
            by_use: BTreeMap::new(),
            clock: 0,
            next: seed,
            cap: cap.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    fn touch(&mut self, a: Ipv4Addr) {
        self.clock += 1;
        if let Some((_, used)) = self.by_addr.get_mut(&a) {
            self.by_use.remove(used);
            *used = self.clock;
            self.by_use.insert(self.clock, a);
        }
    }

    /// The address for `name` (lower-case), given now if it has none.
    pub fn address_for(&mut self, name: &str) -> Ipv4Addr {
        if let Some(&a) = self.by_name.get(name) {
            self.touch(a);
            return a;
        }
        if self.by_name.len() >= self.cap {
            if let Some((_, old)) = self.by_use.pop_first() {
                if let Some((n, _)) = self.by_addr.remove(&old) {
                    self.by_name.remove(&n);
                }
            }
        }
        let host_bits = 32 - u32::from(VIRTUAL_PREFIX);
        let size = 1u32 << host_bits;
        let a = loop {
            // Neither the network's nor its broadcast address.
            let off = self.next % (size - 2) + 1;
            self.next = self.next.wrapping_add(1);
            let a = Ipv4Addr::from(u32::from(VIRTUAL_NET) | off);
            if !self.by_addr.contains_key(&a) {
                break a;
            }
        };
        self.by_name.insert(name.to_string(), a);
        self.by_addr.insert(a, (name.to_string(), 0));
        self.touch(a);
        a
    }

    /// The name behind a virtual address, if this client was given it.
    pub fn name_of(&mut self, a: Ipv4Addr) -> Option<String> {
        let n = self.by_addr.get(&a).map(|(n, _)| n.clone())?;
        self.touch(a);
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuvwx.onion";
    const B: &str = "bbcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuvwx.onion";
    const C: &str = "cbcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuvwx.onion";

    #[test]
    fn names_get_stable_addresses_in_the_virtual_range_and_map_back() {
        assert!(is_onion(A) && !is_onion(".onion") && !is_onion("example.com"));
        let mut m = OnionMap::new(8, 0);
        let a = m.address_for(A);
        assert!(is_virtual(a), "{a}");
        assert_ne!(a, VIRTUAL_NET);
        assert_eq!(m.address_for(A), a, "the same name, the same address");
        let b = m.address_for(B);
        assert_ne!(a, b);
        assert_eq!(m.name_of(a).as_deref(), Some(A));
        assert_eq!(m.name_of(Ipv4Addr::new(10, 192, 9, 9)), None);
        assert!(!is_virtual(Ipv4Addr::new(10, 128, 0, 1)));
        assert!(is_virtual(Ipv4Addr::new(10, 255, 255, 254)));
        // The last address before the range's broadcast wraps to the first.
        let mut w = OnionMap::new(4, (1 << 22) - 3);
        assert_eq!(w.address_for(A), Ipv4Addr::new(10, 255, 255, 254));
        assert_eq!(w.address_for(B), Ipv4Addr::new(10, 192, 0, 1));
    }

    #[test]
    fn a_full_map_gives_back_the_address_used_least_recently() {
        let mut m = OnionMap::new(2, 0);
        let a = m.address_for(A);
        let b = m.address_for(B);
        assert_eq!(m.name_of(a).as_deref(), Some(A)); // A is now the more recent
        let c = m.address_for(C);
        assert_eq!(m.len(), 2);
        assert_eq!(m.name_of(b), None, "B was evicted");
        assert_eq!(m.name_of(a).as_deref(), Some(A));
        assert_eq!(m.name_of(c).as_deref(), Some(C));
    }
}
