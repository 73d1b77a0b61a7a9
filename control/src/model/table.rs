//! The versioned table xDS reads: one resource type's current encoded
//! resources, and a log ordered by the version each last changed at, with
//! tombstones for removals, so "everything since version v" is a range
//! scan.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use bytes::Bytes;

/// One resource type's current resources and change log.
pub struct Table {
    /// The type URL its resources carry in their `Any`.
    type_url: &'static str,
    entries: HashMap<String, Entry>,
    /// Each resource's last change, with its encoded `Resource` (`None`
    /// for a removal), so that a pass over the log reads what it sends
    /// without looking each name up.
    log: BTreeMap<(u64, String), Option<Bytes>>,
    tombstones: usize,
    /// Changes at or below this version may have been forgotten (compacted
    /// tombstones): a proxy that last saw an older version must resync.
    floor: u64,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub version: u64,
    /// The encoded resource, or `None` once removed.
    pub body: Option<Bytes>,
    /// The body's version as proxies see it (`resource_version`), worked
    /// out once here rather than for each proxy it is sent to.
    pub body_version: String,
    /// The xDS `Resource` (name, version, body in an `Any`) encoded once
    /// for every proxy it is sent to; `body` shares its bytes. Empty once
    /// removed.
    pub resource: Bytes,
}

/// A resource's version as proxies see it: a hash of its content, so that
/// it means the same thing to every control plane process. A counter would
/// restart with the process, and a proxy reconnecting to the new one could
/// hold different content under a version that now names something else.
pub fn resource_version(body: &[u8]) -> String {
    use std::hash::Hasher;
    // Fixed keys: the same content hashes the same in every process.
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(body);
    format!("{:016x}", hasher.finish())
}

/// How many removals to remember for proxies that reconnect or lag.
const TOMBSTONE_LIMIT: usize = 100_000;

impl Table {
    /// An empty table of resources of `type_url`.
    pub fn new(type_url: &'static str) -> Self {
        Table {
            type_url,
            entries: HashMap::new(),
            log: BTreeMap::new(),
            tombstones: 0,
            floor: 0,
        }
    }

    /// Records a resource's new body (or removal) at `version`. Returns
    /// whether anything changed.
    pub fn upsert(&mut self, name: &str, body: Option<Bytes>, version: u64) -> bool {
        match self.entries.get(name) {
            Some(entry) if entry.body == body => return false,
            None if body.is_none() => return false,
            _ => {}
        }
        if let Some(old) = self.entries.get(name) {
            self.log.remove(&(old.version, name.to_string()));
            if old.body.is_none() {
                self.tombstones -= 1;
            }
        }
        if body.is_none() {
            self.tombstones += 1;
        }
        let body_version = body.as_deref().map(resource_version).unwrap_or_default();
        let (body, resource) = match body {
            Some(body) => {
                let resource = weft_xds_proto::encoded::encode_resource(
                    name,
                    &body_version,
                    self.type_url,
                    &body,
                );
                (
                    Some(resource.slice(resource.len() - body.len()..)),
                    resource,
                )
            }
            None => (None, Bytes::new()),
        };
        self.log.insert(
            (version, name.to_string()),
            body.is_some().then(|| resource.clone()),
        );
        self.entries.insert(
            name.to_string(),
            Entry {
                version,
                body,
                body_version,
                resource,
            },
        );
        if self.tombstones > TOMBSTONE_LIMIT {
            self.compact();
        }
        true
    }

    fn compact(&mut self) {
        let excess = self.tombstones - TOMBSTONE_LIMIT / 2;
        let oldest: Vec<(u64, String)> = self
            .log
            .iter()
            .filter(|(_, resource)| resource.is_none())
            .take(excess)
            .map(|(key, _)| key.clone())
            .collect();
        for (version, name) in oldest {
            self.log.remove(&(version, name.clone()));
            self.entries.remove(&name);
            self.tombstones -= 1;
            self.floor = self.floor.max(version);
        }
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Every resource or removal with a version above `since`.
    pub fn changed_since(&self, since: u64) -> impl Iterator<Item = (&String, &Entry)> {
        self.log
            .range((since + 1, String::new())..)
            .filter_map(|((_, name), _)| self.entries.get_key_value(name))
    }

    /// Log entries from `start` on, in version order: each name with its
    /// encoded `Resource`, or `None` where it was removed.
    pub fn log_from(
        &self,
        start: Bound<(u64, String)>,
    ) -> impl Iterator<Item = (u64, &String, Option<&Bytes>)> {
        self.log
            .range((start, Bound::Unbounded))
            .map(|((version, name), resource)| (*version, name, resource.as_ref()))
    }

    /// Every live resource.
    pub fn live(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter().filter(|(_, e)| e.body.is_some())
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    pub fn len(&self) -> usize {
        self.entries.len() - self.tombstones
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_compact_tombstones_and_raise_the_floor() {
        let mut table = Table::new("t");
        for i in 0..(TOMBSTONE_LIMIT + 10) {
            let name = format!("w{i}");
            table.upsert(&name, Some(Bytes::from_static(b"x")), 1);
            table.upsert(&name, None, 2 + i as u64);
        }
        assert!(table.floor() > 0);
        assert!(table.tombstones <= TOMBSTONE_LIMIT);
        assert!(table.is_empty());
    }
}
