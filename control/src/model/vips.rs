//! VIPs the control plane hands out itself, from a /16 that no network
//! routes: first at a hash of the service's name, so that a restarted
//! control plane (or another cluster's) usually gives the same, then kept
//! while the service lasts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::cluster::Key;

pub(super) struct VipPool {
    /// The /16 (its first two octets).
    prefix: [u8; 2],
    by_service: BTreeMap<Key, IpAddr>,
    in_use: BTreeSet<IpAddr>,
}

impl VipPool {
    pub(super) fn new(prefix: [u8; 2]) -> Self {
        VipPool {
            prefix,
            by_service: BTreeMap::new(),
            in_use: BTreeSet::new(),
        }
    }

    pub(super) fn get(&self, key: &Key) -> Option<IpAddr> {
        self.by_service.get(key).copied()
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.by_service.is_empty() && self.in_use.is_empty()
    }

    /// Frees `key`'s VIP, if it holds one.
    pub(super) fn release(&mut self, key: &Key) {
        if let Some(ip) = self.by_service.remove(key) {
            self.in_use.remove(&ip);
        }
    }

    /// `key`'s VIP: the one it holds, else a free one.
    pub(super) fn allocate(&mut self, key: &Key) -> Option<IpAddr> {
        if let Some(ip) = self.by_service.get(key) {
            return Some(*ip);
        }
        // FNV-1a: the same in every process and release.
        let mut hash: u32 = 0x811c_9dc5;
        for byte in format!("{}/{}", key.0, key.1).bytes() {
            hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
        let [a, b] = self.prefix;
        for probe in 0..65_534u32 {
            let n = (hash.wrapping_add(probe) % 65_534) + 1;
            let ip = IpAddr::from([a, b, (n >> 8) as u8, n as u8]);
            if self.in_use.insert(ip) {
                self.by_service.insert(key.clone(), ip);
                return Some(ip);
            }
        }
        tracing::warn!(service = %format!("{}/{}", key.0, key.1), "no VIP left to allocate in {a}.{b}.0.0/16");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_keeps_its_vip_and_a_collision_moves_to_the_next() {
        let key = |n: &str| ("demo".to_string(), n.to_string());
        let mut pool = VipPool::new([240, 241]);
        let echo = pool.allocate(&key("echo")).unwrap();
        assert_eq!(pool.allocate(&key("echo")), Some(echo));
        assert_eq!(pool.get(&key("echo")), Some(echo));
        // Another pool (another control plane) gives the same.
        let mut other = VipPool::new([240, 241]);
        assert_eq!(other.allocate(&key("echo")), Some(echo));
        // Taken already: the next one.
        other.in_use.remove(&echo);
        other.by_service.clear();
        other.in_use.insert(echo);
        let moved = other.allocate(&key("echo")).unwrap();
        assert_ne!(moved, echo);
        pool.release(&key("echo"));
        assert!(pool.is_empty());
        match echo {
            IpAddr::V4(v4) => assert_eq!(v4.octets()[..2], [240, 241]),
            IpAddr::V6(_) => panic!("{echo}"),
        }
    }
}
