//! The key index of a lookup table: key → slot (a `u32`), by open addressing over one array of
//! 8-byte entries, probed a group of events at a time.
//!
//! A 1M-row table is far larger than the CPU caches, so a probe costs memory misses: the entry,
//! then the key it is checked against. One event after another, each miss waits for the one
//! before. A group is probed in three passes instead — load every event's entry, load every
//! candidate's key, compare — so the loads of a pass are independent and the CPU has many of
//! them in flight at once.

use std::hash::BuildHasher;

use polars::prelude::PlSmallStr;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A free entry (no slot is `u32::MAX`: a table has fewer rows than that).
const EMPTY: u64 = u64::MAX;
/// Events probed together.
const GROUP: usize = 32;

/// A key type of an index: how a probe's key hashes and matches a stored one.
pub(super) trait Key {
    /// What events probe with (`&str` for a stored `PlSmallStr`).
    type Probe<'a>: Copy;
    fn probe(&self) -> Self::Probe<'_>;
    fn hash(k: Self::Probe<'_>, seed: u64) -> u64;
    fn matches(&self, k: Self::Probe<'_>) -> bool;
    /// Reads the stored key's first bytes (loads its cache line ahead of the comparison).
    fn touch(&self) -> u64;
}

impl Key for PlSmallStr {
    type Probe<'a> = &'a str;
    fn probe(&self) -> &str {
        self.as_str()
    }
    fn hash(k: &str, seed: u64) -> u64 {
        xxh3_64_with_seed(k.as_bytes(), seed)
    }
    fn matches(&self, k: &str) -> bool {
        self.as_str() == k
    }
    fn touch(&self) -> u64 {
        self.len() as u64
    }
}

impl Key for i64 {
    type Probe<'a> = i64;
    fn probe(&self) -> i64 {
        *self
    }
    fn hash(k: i64, seed: u64) -> u64 {
        xxh3_64_with_seed(&k.to_le_bytes(), seed)
    }
    fn matches(&self, k: i64) -> bool {
        *self == k
    }
    fn touch(&self) -> u64 {
        *self as u64
    }
}

/// Key → slot. Linear probing over a power-of-two array at most half full; each entry is the
/// key hash's upper 32 bits (a tag that rules out most mismatches without reading the key)
/// and the slot; the keys themselves are kept by slot.
#[derive(Debug)]
pub(super) struct KeyIndex<K> {
    /// Random per index, so no set of keys collides by construction.
    seed: u64,
    mask: usize,
    entries: Vec<u64>,
    keys: Vec<Option<K>>,
    len: usize,
}

impl<K: Key> KeyIndex<K> {
    /// An index for about `n` keys.
    pub(super) fn with_capacity(n: usize) -> Self {
        let seed =
            std::collections::hash_map::RandomState::new().hash_one(0x6b65_7969_6e64_6578_u64);
        let size = (n.max(8) * 2).next_power_of_two();
        KeyIndex {
            seed,
            mask: size - 1,
            entries: vec![EMPTY; size],
            keys: Vec::with_capacity(n),
            len: 0,
        }
    }

    fn entry(hash: u64, slot: u32) -> u64 {
        (hash >> 32) << 32 | u64::from(slot)
    }

    fn same_tag(entry: u64, hash: u64) -> bool {
        entry >> 32 == hash >> 32
    }

    /// The slot of `k`, inserting it as `slot` when it is not there: `(slot, inserted)`.
    pub(super) fn get_or_insert(&mut self, k: K, slot: u32) -> (u32, bool) {
        if let Some(found) = self.get(k.probe()) {
            return (found, false);
        }
        if (self.len + 1) * 2 > self.entries.len() {
            self.grow();
        }
        let hash = K::hash(k.probe(), self.seed);
        self.place(hash, slot);
        let i = slot as usize;
        if self.keys.len() <= i {
            self.keys.resize_with(i + 1, || None);
        }
        self.keys[i] = Some(k);
        self.len += 1;
        (slot, true)
    }

    fn place(&mut self, hash: u64, slot: u32) {
        let mut p = hash as usize & self.mask;
        while self.entries[p] != EMPTY {
            p = (p + 1) & self.mask;
        }
        self.entries[p] = Self::entry(hash, slot);
    }

    fn grow(&mut self) {
        self.entries = vec![EMPTY; self.entries.len() * 2];
        self.mask = self.entries.len() - 1;
        for slot in 0..self.keys.len() {
            if let Some(k) = &self.keys[slot] {
                let hash = K::hash(k.probe(), self.seed);
                self.place(hash, slot as u32);
            }
        }
    }

    /// The slot of `k`, if it is a key of the index.
    pub(super) fn get(&self, k: K::Probe<'_>) -> Option<u32> {
        let hash = K::hash(k, self.seed);
        let mut p = hash as usize & self.mask;
        loop {
            let e = self.entries[p];
            if e == EMPTY {
                return None;
            }
            if Self::same_tag(e, hash) && self.key(e as u32).is_some_and(|s| s.matches(k)) {
                return Some(e as u32);
            }
            p = (p + 1) & self.mask;
        }
    }

    fn key(&self, slot: u32) -> Option<&K> {
        self.keys.get(slot as usize).and_then(Option::as_ref)
    }

    /// The slot of each key (`None` for a null or unknown key), a group at a time (module docs).
    pub(super) fn get_all(&self, keys: &[Option<K::Probe<'_>>]) -> Vec<Option<u32>> {
        let mut out = Vec::with_capacity(keys.len());
        let mut touched = 0u64;
        for group in keys.chunks(GROUP) {
            let mut hashes = [0u64; GROUP];
            // 1. Every event's first entry.
            for (i, k) in group.iter().enumerate() {
                if let Some(k) = k {
                    hashes[i] = K::hash(*k, self.seed);
                    touched ^= self.entries[hashes[i] as usize & self.mask];
                }
            }
            // 2. The first entry with the event's tag: its key.
            let mut candidates = [u32::MAX; GROUP];
            for (i, k) in group.iter().enumerate() {
                if k.is_none() {
                    continue;
                }
                let mut p = hashes[i] as usize & self.mask;
                loop {
                    let e = self.entries[p];
                    if e == EMPTY {
                        break;
                    }
                    if Self::same_tag(e, hashes[i]) {
                        candidates[i] = e as u32;
                        touched ^= self.key(e as u32).map_or(0, K::touch);
                        break;
                    }
                    p = (p + 1) & self.mask;
                }
            }
            // 3. Compare; a tag shared by another key (rare) probes on from the start.
            for (i, k) in group.iter().enumerate() {
                out.push(match (k, candidates[i]) {
                    (None, _) | (_, u32::MAX) => None,
                    (Some(k), c) if self.key(c).is_some_and(|s| s.matches(*k)) => Some(c),
                    (Some(k), _) => self.get(*k),
                });
            }
        }
        // The loads above are for their cache lines; keep the compiler from dropping them.
        std::hint::black_box(touched);
        out
    }

    /// Every key with its slot.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&K, u32)> {
        self.keys
            .iter()
            .enumerate()
            .filter_map(|(slot, k)| Some((k.as_ref()?, slot as u32)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_probes_equal_single_ones_across_growth_and_shared_tags() {
        let mut index: KeyIndex<PlSmallStr> = KeyIndex::with_capacity(4);
        let n = 5_000u32;
        for row in 0..n {
            let (slot, inserted) = index.get_or_insert(format!("k{row}").into(), row * 2);
            assert!(inserted);
            assert_eq!(slot, row * 2);
        }
        assert_eq!(index.get_or_insert("k7".into(), 99_999), (14, false));
        let probes: Vec<String> = (0..2 * n)
            .map(|i| format!("k{}", i * 7 % (2 * n)))
            .collect();
        let keys: Vec<Option<&str>> = probes
            .iter()
            .enumerate()
            .map(|(i, s)| (i % 11 != 0).then_some(s.as_str()))
            .collect();
        let got = index.get_all(&keys);
        assert_eq!(got.len(), keys.len());
        for (k, slot) in keys.iter().zip(&got) {
            let want = k.and_then(|k| index.get(k));
            assert_eq!(*slot, want, "{k:?}");
            if let Some(k) = k {
                let row: u32 = k[1..].parse().unwrap();
                assert_eq!(want, (row < n).then_some(row * 2));
            }
        }
        assert_eq!(index.iter().count(), n as usize);

        // Another key's entry with this key's tag comes first (hashes whose upper 32 bits
        // agree): the tag matches, the key decides, the probe goes on.
        let mut ints: KeyIndex<i64> = KeyIndex::with_capacity(2);
        ints.get_or_insert(1, 0);
        ints.get_or_insert(2, 1);
        let (h1, h2) = (i64::hash(1, ints.seed), i64::hash(2, ints.seed));
        let home = h1 as usize & ints.mask;
        ints.entries.fill(EMPTY);
        ints.entries[home] = KeyIndex::<i64>::entry(h1, 1);
        ints.entries[(home + 1) & ints.mask] = KeyIndex::<i64>::entry(h1, 0);
        ints.place(h2, 1);
        assert_eq!(
            ints.get_all(&[Some(1), Some(2), Some(3)]),
            [Some(0), Some(1), None]
        );
    }
}
