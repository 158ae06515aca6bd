//! A DDSketch-style log-bucket histogram for `approx_quantile`: every estimate is within 1 %
//! relative error of the exact value at rank ⌊q·(n−1)⌋, and two sketches merge exactly by
//! adding bucket counts.
//!
//! A value's bucket code is an `i32` whose order is the order of the values: 0 for
//! |x| < 1e-12 (and ±0), `k + OFFSET` for x > 0 with k = ⌈ln x / ln γ⌉, and the negation of
//! that for x < 0. The code is computed as a polars column, the view's group-by collects each
//! group's codes, and [`reduce_lists`] turns them into (bucket, count) lists.

use polars::prelude::*;

/// Relative accuracy.
pub(crate) const ALPHA: f64 = 0.01;
/// Magnitudes below this fall in the zero bucket (estimated as 0).
const MIN_MAGNITUDE: f64 = 1e-12;
/// Keeps codes of positive values ≥ 1: the smallest k is ⌈ln 1e-12 / ln γ⌉ = -1381.
const OFFSET: i32 = 2048;

fn gamma() -> f64 {
    (1.0 + ALPHA) / (1.0 - ALPHA)
}

/// The bucket code of `x`; `None` for NaN, which is not a value.
pub(crate) fn code(x: f64) -> Option<i32> {
    if x.is_nan() {
        return None;
    }
    let a = x.abs();
    if a < MIN_MAGNITUDE {
        return Some(0);
    }
    let k = (a.min(f64::MAX).ln() / gamma().ln()).ceil() as i32 + OFFSET;
    Some(if x < 0.0 { -k } else { k })
}

/// The value a bucket stands for: within ALPHA of every value in it.
pub(crate) fn value(code: i32) -> f64 {
    if code == 0 {
        return 0.0;
    }
    let g = gamma();
    let k = (code.unsigned_abs() as i32 - OFFSET) as f64;
    let v = 2.0 * g.powf(k) / (g + 1.0);
    if code < 0 { -v } else { v }
}

/// Bucket codes of a numeric column; null (and NaN) stay null.
pub(crate) fn codes(c: &Column) -> PolarsResult<Column> {
    let s = c.as_materialized_series();
    let name = s.name().clone();
    let out: Int32Chunked = match s.dtype() {
        DataType::Float64 => s.f64()?.iter().map(|v| v.and_then(code)).collect(),
        DataType::Int64 => s
            .i64()?
            .iter()
            .map(|v| v.and_then(|v| code(v as f64)))
            .collect(),
        other => polars_bail!(InvalidOperation: "approx_quantile of a {other} column"),
    };
    Ok(out.with_name(name).into_column())
}

/// Lists of raw bucket codes (one per event, nulls allowed) → sorted distinct buckets
/// (`counts: false`) or their counts (`counts: true`), aligned: the canonical partial form.
pub(crate) fn reduce_lists(c: &Column, counts: bool) -> PolarsResult<Column> {
    let lists = c.list()?;
    let (n, name) = (lists.len(), c.name().clone());
    let mut buckets =
        ListPrimitiveChunkedBuilder::<Int32Type>::new(name.clone(), n, n * 8, DataType::Int32);
    let mut tallies =
        ListPrimitiveChunkedBuilder::<UInt64Type>::new(name, n, n * 8, DataType::UInt64);
    let mut codes = Vec::new();
    let mut tally = Tally::default();
    for list in lists.amortized_iter() {
        codes.clear();
        if let Some(list) = list {
            codes.extend(list.as_ref().i32()?.iter().flatten());
        }
        let (keys, sums) = tally.count(&mut codes);
        if counts {
            tallies.append_slice(sums);
        } else {
            buckets.append_slice(keys);
        }
    }
    Ok(if counts {
        tallies.finish().into_column()
    } else {
        buckets.finish().into_column()
    })
}

/// Counts a group's bucket codes into sorted distinct codes and their counts. A group's codes
/// span a narrow range (a few hundred buckets cover values from 1 to 1e6), so a count per
/// code of the range does it in one pass; a sort where the range is wide for the group's size.
#[derive(Default)]
struct Tally {
    per_code: Vec<u64>,
    keys: Vec<i32>,
    sums: Vec<u64>,
}

impl Tally {
    fn count(&mut self, codes: &mut [i32]) -> (&[i32], &[u64]) {
        self.keys.clear();
        self.sums.clear();
        let (Some(&lo), Some(&hi)) = (codes.iter().min(), codes.iter().max()) else {
            return (&self.keys, &self.sums);
        };
        let range = (i64::from(hi) - i64::from(lo) + 1) as usize;
        if range <= 4 * codes.len() + 64 {
            self.per_code.clear();
            self.per_code.resize(range, 0);
            for &c in codes.iter() {
                self.per_code[(c - lo) as usize] += 1;
            }
            for (i, &n) in self.per_code.iter().enumerate() {
                if n > 0 {
                    self.keys.push(lo + i as i32);
                    self.sums.push(n);
                }
            }
        } else {
            codes.sort_unstable();
            for &code in codes.iter() {
                if self.keys.last() == Some(&code) {
                    if let Some(last) = self.sums.last_mut() {
                        *last += 1;
                    }
                } else {
                    self.keys.push(code);
                    self.sums.push(1);
                }
            }
        }
        (&self.keys, &self.sums)
    }
}

/// One group's histogram: `(code, count)` sorted by code, codes unique, counts > 0.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Histogram {
    pub buckets: Vec<(i32, u64)>,
}

impl Histogram {
    /// Adds `(code, count)` pairs in any order.
    pub fn insert_all(&mut self, mut pairs: Vec<(i32, u64)>) {
        pairs.sort_unstable_by_key(|p| p.0);
        pairs.dedup_by(|next, kept| {
            if next.0 == kept.0 {
                kept.1 += next.1;
                true
            } else {
                false
            }
        });
        pairs.retain(|p| p.1 > 0);
        self.merge_sorted(&pairs);
    }

    pub fn merge(&mut self, other: &Histogram) {
        self.merge_sorted(&other.buckets);
    }

    fn merge_sorted(&mut self, other: &[(i32, u64)]) {
        if other.is_empty() {
            return;
        }
        let a = &self.buckets;
        let mut out = Vec::with_capacity(a.len() + other.len());
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < other.len() {
            match a[i].0.cmp(&other[j].0) {
                std::cmp::Ordering::Less => {
                    out.push(a[i]);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push(other[j]);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    out.push((a[i].0, a[i].1.saturating_add(other[j].1)));
                    i += 1;
                    j += 1;
                }
            }
        }
        out.extend_from_slice(&a[i..]);
        out.extend_from_slice(&other[j..]);
        self.buckets = out;
    }

    /// The estimate of the value at rank ⌊q·(n−1)⌋ (0-based), or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.buckets.iter().fold(0u64, |n, b| n.saturating_add(b.1));
        if n == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (n - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        for &(code, count) in &self.buckets {
            seen = seen.saturating_add(count);
            if seen > rank {
                return Some(value(code));
            }
        }
        self.buckets.last().map(|b| value(b.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_within_alpha_of_its_bucket() {
        let mut x = 1e-11;
        while x < 1e300 {
            for v in [x, -x, x * 1.37] {
                let est = value(code(v).unwrap());
                assert!(
                    (est - v).abs() <= ALPHA * v.abs() * (1.0 + 1e-9),
                    "{v} → {est}"
                );
            }
            x *= 3.1;
        }
        assert_eq!(value(code(0.0).unwrap()), 0.0);
        assert_eq!(code(f64::NAN), None);
        assert!(code(f64::INFINITY).unwrap() > code(f64::MAX / 2.0).unwrap());
    }

    #[test]
    fn codes_are_ordered_like_values() {
        let xs = [-1e9, -3.5, -1.0, -1e-13, 0.0, 1e-13, 0.5, 1.0, 2.0, 1e12];
        let codes: Vec<i32> = xs.iter().map(|x| code(*x).unwrap()).collect();
        assert!(codes.windows(2).all(|w| w[0] <= w[1]), "{codes:?}");
    }

    #[test]
    fn quantiles_of_a_known_set() {
        let mut h = Histogram::default();
        h.insert_all((1..=1000).map(|i| (code(i as f64).unwrap(), 1)).collect());
        for (q, exact) in [(0.0, 1.0), (0.5, 500.0), (0.95, 950.0), (1.0, 1000.0)] {
            let est = h.quantile(q).unwrap();
            assert!(
                (est - exact).abs() <= ALPHA * exact * (1.0 + 1e-9),
                "q{q}: {est}"
            );
        }
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    proptest::proptest! {
        /// Both ways of counting (a count per code of a narrow range, a sort of a wide one)
        /// give the sorted distinct codes and how often each occurs.
        #[test]
        fn a_tally_counts_each_code(
            narrow in proptest::collection::vec(-40i32..40, 0..300),
            wide in proptest::collection::vec(-80_000i32..80_000, 0..40),
        ) {
            let mut tally = Tally::default();
            for codes in [narrow, wide] {
                let mut want = std::collections::BTreeMap::<i32, u64>::new();
                for &c in &codes {
                    *want.entry(c).or_default() += 1;
                }
                let (keys, sums) = tally.count(&mut codes.clone());
                let got: Vec<(i32, u64)> = keys.iter().copied().zip(sums.iter().copied()).collect();
                proptest::prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>());
            }
        }
    }
}
