//! A sorted sequence kept in shared chunks, so that the next snapshot is
//! a small edit of the last one rather than a copy.
//!
//! A snapshot of 10,000 workloads held its indexes in sorted slices, and
//! each xDS update rebuilt them: sorting again and cloning (then dropping)
//! a pointer per workload, 1-2 ms per update. Here a sequence is a list of
//! chunks of at most `2 * CHUNK` entries, each behind an `Arc`. A clone
//! copies the list of chunk pointers; an insertion or removal copies the
//! one chunk it changes. Lookups are two binary searches, and the entries
//! stay as compact as in a slice (no per-entry node).

use std::cmp::Ordering;
use std::sync::Arc;

/// Entries per chunk when built; a chunk is split past twice this.
const CHUNK: usize = 128;

#[derive(Debug)]
pub struct Chunked<T> {
    chunks: Vec<Arc<[T]>>,
    len: usize,
}

impl<T> Clone for Chunked<T> {
    fn clone(&self) -> Self {
        Chunked {
            chunks: self.chunks.clone(),
            len: self.len,
        }
    }
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T: Clone> Chunked<T> {
    /// From entries already in order.
    pub fn from_sorted(entries: Vec<T>) -> Self {
        let len = entries.len();
        let chunks = entries.chunks(CHUNK).map(Arc::from).collect();
        Chunked { chunks, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }

    /// The chunk an entry that `order` (an entry against the one wanted)
    /// places would be in: the last whose first entry is not greater.
    fn chunk_for(&self, order: &impl Fn(&T) -> Ordering) -> usize {
        self.chunks
            .partition_point(|chunk| order(&chunk[0]) != Ordering::Greater)
            .saturating_sub(1)
    }

    /// An entry equal to the one wanted.
    pub fn find(&self, order: impl Fn(&T) -> Ordering) -> Option<&T> {
        let chunk = self.chunks.get(self.chunk_for(&order))?;
        chunk.binary_search_by(&order).ok().map(|at| &chunk[at])
    }

    /// The last of the entries equal to the one wanted.
    pub fn last_equal(&self, order: impl Fn(&T) -> Ordering) -> Option<&T> {
        // The last chunk whose first entry is not greater holds it, if any.
        let chunk = self.chunks.get(self.chunk_for(&order))?;
        let end = chunk.partition_point(|entry| order(entry) != Ordering::Greater);
        let last = chunk.get(end.checked_sub(1)?)?;
        (order(last) == Ordering::Equal).then_some(last)
    }

    /// Inserts `entry` in order, after any equal entries.
    pub fn insert(&mut self, entry: T, order: impl Fn(&T) -> Ordering) {
        if self.chunks.is_empty() {
            self.chunks.push(Arc::from(vec![entry]));
            self.len = 1;
            return;
        }
        let at = self.chunk_for(&order);
        let mut entries = self.chunks[at].to_vec();
        let position = entries.partition_point(|e| order(e) != Ordering::Greater);
        entries.insert(position, entry);
        self.len += 1;
        if entries.len() > 2 * CHUNK {
            let tail = entries.split_off(entries.len() / 2);
            self.chunks[at] = Arc::from(entries);
            self.chunks.insert(at + 1, Arc::from(tail));
        } else {
            self.chunks[at] = Arc::from(entries);
        }
    }

    /// Removes one entry equal to the one wanted, and gives it back.
    pub fn remove(&mut self, order: impl Fn(&T) -> Ordering) -> Option<T> {
        let at = self.chunk_for(&order);
        let chunk = self.chunks.get(at)?;
        let position = chunk.binary_search_by(&order).ok()?;
        let mut entries = chunk.to_vec();
        let removed = entries.remove(position);
        self.len -= 1;
        if entries.is_empty() {
            self.chunks.remove(at);
        } else {
            self.chunks[at] = Arc::from(entries);
        }
        Some(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random edits answer as a sorted Vec given the same edits does,
    /// across chunk splits and emptied chunks, and a clone taken before
    /// the edits is left as it was.
    #[test]
    fn edits_answer_as_a_sorted_vec_and_leave_clones_alone() {
        let mut model: Vec<(u32, u32)> = (0..1000).map(|n| (n * 3, n)).collect();
        let mut chunked = Chunked::from_sorted(model.clone());
        let before = chunked.clone();
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for step in 0..5000u32 {
            let key = next() % 3500;
            if next() % 3 == 0 {
                let found = model.iter().position(|e| e.0 == key);
                let removed = chunked.remove(|e| e.0.cmp(&key));
                assert_eq!(removed, found.map(|at| model[at]));
                if let Some(at) = found {
                    model.remove(at);
                }
            } else {
                // Keys are unique, as every index's are: a key present is
                // replaced.
                if let Some(at) = model.iter().position(|e| e.0 == key) {
                    model.remove(at);
                    assert!(chunked.remove(|e| e.0.cmp(&key)).is_some());
                }
                let entry = (key, step);
                let at = model.partition_point(|e| e.0 <= key);
                model.insert(at, entry);
                chunked.insert(entry, |e| e.0.cmp(&key));
            }
        }
        assert_eq!(chunked.len(), model.len());
        assert_eq!(chunked.iter().copied().collect::<Vec<_>>(), model);
        assert!(
            chunked
                .chunks
                .iter()
                .all(|c| !c.is_empty() && c.len() <= 2 * CHUNK)
        );
        for key in 0..3500 {
            let last = model.iter().rev().find(|e| e.0 == key);
            assert_eq!(chunked.last_equal(|e| e.0.cmp(&key)), last, "{key}");
            assert_eq!(
                chunked.find(|e| e.0.cmp(&key)).is_some(),
                last.is_some(),
                "{key}"
            );
        }
        assert_eq!(before.len(), 1000);
        assert!(
            before
                .iter()
                .enumerate()
                .all(|(n, e)| *e == (n as u32 * 3, n as u32))
        );
        let empty: Chunked<(u32, u32)> = Chunked::default();
        assert!(
            empty.find(|e| e.0.cmp(&1)).is_none() && empty.last_equal(|e| e.0.cmp(&1)).is_none()
        );
    }
}
