//! ClusterIP allocation from the service range.

use std::net::Ipv4Addr;

use super::*;

/// Hands out Service ClusterIPs from one IPv4 range, like the real
/// allocator: the first address is the network, the second is reserved for
/// the `kubernetes` service.
pub struct IpAllocator {
    base: u32,
    size: u32,
    next: u32,
    used: HashSet<u32>,
}

impl IpAllocator {
    pub fn new(cidr: &str) -> Result<Self, String> {
        let (addr, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{cidr:?}: expected a.b.c.d/prefix"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{cidr:?}: bad address"))?;
        let prefix: u32 = prefix
            .parse()
            .map_err(|_| format!("{cidr:?}: bad prefix"))?;
        if !(8..=28).contains(&prefix) {
            return Err(format!("{cidr:?}: prefix must be between 8 and 28"));
        }
        let size = 1u32 << (32 - prefix);
        Ok(IpAllocator {
            base: u32::from(addr) & !(size - 1),
            size,
            next: 2,
            used: HashSet::new(),
        })
    }

    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        // Skip the network address, .1 (kubernetes) and the broadcast address.
        let usable = self.size - 3;
        for _ in 0..usable {
            let offset = self.next;
            self.next = if self.next + 1 >= self.size - 1 {
                2
            } else {
                self.next + 1
            };
            if self.used.insert(offset) {
                return Some(Ipv4Addr::from(self.base + offset));
            }
        }
        None
    }

    pub fn reserve(&mut self, ip: Ipv4Addr) -> Result<(), String> {
        let raw = u32::from(ip);
        if raw < self.base || raw >= self.base + self.size {
            return Err(format!(
                "{ip}: provided IP is not in the valid range ({}/{})",
                Ipv4Addr::from(self.base),
                32 - self.size.trailing_zeros()
            ));
        }
        if !self.used.insert(raw - self.base) {
            return Err(format!("{ip}: provided IP is already allocated"));
        }
        Ok(())
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&u32::from(ip).wrapping_sub(self.base));
    }
}
