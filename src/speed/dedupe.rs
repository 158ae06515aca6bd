//! `event_id` de-duplication at the door (DESIGN.md §3): an event whose id was acknowledged
//! within `dedupe_window` of arrival time is dropped before it is logged, archived or aggregated,
//! so the archive is duplicate-free and neither layer de-duplicates again.
//!
//! Ids are kept as 128-bit hashes (collision odds ~1e-20 at a billion ids) with their arrival
//! time; memory is bounded by the ids of one window. After a restart the index is rebuilt from
//! the arrival times stored with each event (log records and archived segments).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_128;

pub struct Dedupe {
    window_ms: i64,
    /// id hash → arrival time (ms) of its acknowledged occurrence.
    seen: HashMap<u128, i64>,
    /// Arrival order, to expire ids that left the window.
    order: VecDeque<(i64, u128)>,
}

impl Dedupe {
    pub fn new(window: Duration) -> Self {
        Dedupe {
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `id` as arriving at `now_ms`; false when it was already seen within the window.
    pub fn admit(&mut self, id: &[u8], now_ms: i64) -> bool {
        self.expire(now_ms);
        let h = xxh3_128(id);
        if self.seen.contains_key(&h) {
            return false;
        }
        self.seen.insert(h, now_ms);
        self.order.push_back((now_ms, h));
        true
    }

    /// Undoes `admit` for an event whose append failed (it was never acknowledged).
    pub fn forget(&mut self, id: &[u8]) {
        self.seen.remove(&xxh3_128(id));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn expire(&mut self, now_ms: i64) {
        let horizon = now_ms.saturating_sub(self.window_ms);
        while let Some(&(t, h)) = self.order.front() {
            if t > horizon {
                break;
            }
            self.order.pop_front();
            // Only drop the entry if it still belongs to this occurrence (a forgotten and
            // re-admitted id has a newer time).
            if self.seen.get(&h) == Some(&t) {
                self.seen.remove(&h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_repeats_within_the_window_only() {
        let mut d = Dedupe::new(Duration::from_secs(10));
        assert!(d.admit(b"a", 0));
        assert!(!d.admit(b"a", 5_000));
        assert!(d.admit(b"b", 5_000));
        assert!(d.admit(b"a", 10_001), "a left the window");
        assert!(!d.admit(b"b", 10_001));
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn forget_readmits() {
        let mut d = Dedupe::new(Duration::from_secs(10));
        assert!(d.admit(b"x", 0));
        d.forget(b"x");
        assert!(d.admit(b"x", 1));
        assert!(!d.admit(b"x", 2));
    }

    #[test]
    fn memory_is_bounded_by_the_window() {
        let mut d = Dedupe::new(Duration::from_millis(100));
        for i in 0..10_000i64 {
            d.admit(&i.to_le_bytes(), i);
        }
        assert!(d.len() <= 101, "{}", d.len());
    }
}
