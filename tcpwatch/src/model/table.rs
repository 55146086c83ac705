//! A map with a hard cap on its entries: when full, the entry inserted
//! longest ago is evicted and counted. It keeps tcpwatch's memory bounded
//! whatever a SYN flood or a million idle connections do. [`Tracking`]
//! is how full such a table got, for the exit summaries.

use std::collections::VecDeque;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::model::FastMap;

/// How full a socket table got, for the exit summaries: it shows that
/// `--max-sockets` held, and that nothing was left behind in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracking {
    pub evicted: u64,
    /// Dropped once the kernel no longer had them: their close was lost.
    pub stale: u64,
    /// Most sockets tracked at once.
    pub peak: usize,
    /// `--max-sockets`.
    pub limit: usize,
    pub at_exit: usize,
}

#[derive(Debug)]
pub struct BoundedMap<K, V> {
    cap: usize,
    entries: FastMap<K, (V, u64)>,
    /// Keys in insertion order with the generation they were inserted with;
    /// a key removed or re-inserted since leaves a stale pair here, skipped
    /// on eviction and dropped on compaction.
    order: VecDeque<(K, u64)>,
    next_gen: u64,
    evicted: u64,
    /// Most entries held at once.
    peak: usize,
}

impl<K: Eq + Hash + Clone, V> BoundedMap<K, V> {
    /// `cap` is clamped to at least 1.
    pub fn new(cap: usize) -> Self {
        BoundedMap {
            cap: cap.max(1),
            entries: FastMap::default(),
            order: VecDeque::new(),
            next_gen: 0,
            evicted: 0,
            peak: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Entries evicted to stay under the cap, since creation.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Most entries held at once, since creation (never above the cap).
    pub fn peak(&self) -> usize {
        self.peak
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        self.entries.get(k).map(|(v, _)| v)
    }

    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.entries.get_mut(k).map(|(v, _)| v)
    }

    pub fn contains_key(&self, k: &K) -> bool {
        self.entries.contains_key(k)
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        self.entries.remove(k).map(|(v, _)| v)
    }

    /// Inserts or replaces; a replaced entry counts as new (it moves to the
    /// back of the eviction order). Returns what was evicted to make room.
    pub fn insert(&mut self, k: K, v: V) -> Option<(K, V)> {
        let gen = self.next_gen;
        self.next_gen += 1;
        self.entries.insert(k.clone(), (v, gen));
        self.order.push_back((k, gen));
        let evicted = if self.entries.len() > self.cap {
            self.evict_oldest()
        } else {
            None
        };
        self.peak = self.peak.max(self.entries.len());
        if self.order.len() > 2 * self.cap + 1024 {
            self.compact();
        }
        evicted
    }

    fn evict_oldest(&mut self) -> Option<(K, V)> {
        while let Some((k, gen)) = self.order.pop_front() {
            if self.entries.get(&k).is_some_and(|(_, g)| *g == gen) {
                let (v, _) = self.entries.remove(&k)?;
                self.evicted += 1;
                return Some((k, v));
            }
        }
        None
    }

    fn compact(&mut self) {
        let entries = &self.entries;
        self.order
            .retain(|(k, gen)| entries.get(k).is_some_and(|(_, g)| g == gen));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, (v, _))| (k, v))
    }

    /// Entries with a mark that changes whenever the entry is inserted
    /// again: [`Self::remove_if_unchanged`] takes it.
    pub fn iter_marked(&self) -> impl Iterator<Item = (&K, &V, u64)> {
        self.entries.iter().map(|(k, (v, gen))| (k, v, *gen))
    }

    /// Removes the entry if it was not inserted again since `mark` was
    /// read.
    pub fn remove_if_unchanged(&mut self, k: &K, mark: u64) -> Option<V> {
        match self.entries.get(k) {
            Some((_, gen)) if *gen == mark => self.remove(k),
            _ => None,
        }
    }

    /// Removes and returns every entry.
    pub fn drain(&mut self) -> Vec<(K, V)> {
        self.order.clear();
        self.entries.drain().map(|(k, (v, _))| (k, v)).collect()
    }

    /// Removes entries `keep` rejects.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.entries.retain(|k, (v, _)| keep(k, v));
    }
}

/// Sockets evicted from a table while open, until they are seen closed
/// (or their address is reused): the rest of such a socket's life is of a
/// socket whose start was forgotten, and must not pass for a socket older
/// than the trace. Under a flood more sockets can be evicted and still
/// open than the table holds, so this remembers at least 65,536 (8-byte
/// keys: at most about 4 MB), forgetting the oldest first.
#[derive(Debug)]
pub struct EvictedKeys(BoundedMap<u64, ()>);

impl EvictedKeys {
    pub fn new(max_sockets: usize) -> Self {
        EvictedKeys(BoundedMap::new(max_sockets.max(1 << 16)))
    }

    pub fn insert(&mut self, key: u64) {
        self.0.insert(key, ());
    }

    // Empty nearly always (nothing is evicted below --max-sockets): a
    // check of its length spares hashing the key for every open and close.
    pub fn contains(&self, key: u64) -> bool {
        !self.0.is_empty() && self.0.contains_key(&key)
    }

    pub fn remove(&mut self, key: u64) {
        if !self.0.is_empty() {
            self.0.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_first_and_counts() {
        let mut m = BoundedMap::new(2);
        assert!(m.insert(1, "a").is_none());
        assert!(m.insert(2, "b").is_none());
        assert_eq!(m.insert(3, "c"), Some((1, "a")));
        assert_eq!(m.evicted(), 1);
        assert_eq!(m.len(), 2);
        assert_eq!(m.peak(), 2, "the peak is taken after the eviction");
        assert!(m.get(&1).is_none());
        assert_eq!(m.get(&3), Some(&"c"));
    }

    #[test]
    fn removed_and_reinserted_keys_do_not_confuse_eviction() {
        let mut m = BoundedMap::new(2);
        m.insert(1, 1);
        m.insert(2, 2);
        m.remove(&1);
        m.insert(1, 10); // now newest
        assert_eq!(m.insert(3, 3), Some((2, 2)));
        assert_eq!(m.get(&1), Some(&10));
    }

    #[test]
    fn order_queue_stays_bounded_under_churn() {
        let mut m = BoundedMap::new(10);
        for i in 0..100_000u64 {
            m.insert(i % 7, i);
            if i % 3 == 0 {
                m.remove(&(i % 7));
            }
        }
        assert!(m.order.len() <= 2 * 10 + 1024 + 1);
        assert!(m.len() <= 10);
    }
}
