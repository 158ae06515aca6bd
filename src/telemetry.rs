//! What the process measures about itself, and the Prometheus text format it is read in:
//! [`Histogram`] and [`RateMeter`] are recorded by the speed layer, [`Exposition`] writes
//! `/metrics` (serving). Hand-written rather than a metrics crate: the format is a few lines of
//! text, and every figure already lives in counters the layers keep for `status`.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the ack→visible latency buckets: 1 ms … 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Upper bounds (seconds) of task duration buckets: 1 s … 6 h.
pub const DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

/// A cumulative histogram with fixed buckets, recorded without locks.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: Vec<AtomicU64>,
    /// Sum of observations in nanoseconds-of-a-second units (1e-9), so it stays an integer.
    sum_nanos: AtomicU64,
}

/// A point-in-time copy of a histogram, cumulative like the exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound, observations at or below it); ends with `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot::from_counts(
            self.bounds,
            self.counts.iter().map(|c| c.load(Ordering::Relaxed)),
            self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

impl HistogramSnapshot {
    /// From per-bucket (non-cumulative) counts, `bounds.len() + 1` of them (the last is +Inf).
    pub fn from_counts(
        bounds: &[f64],
        counts: impl IntoIterator<Item = u64>,
        sum: f64,
    ) -> HistogramSnapshot {
        let mut total = 0;
        let buckets = bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts)
            .map(|(b, c)| {
                total += c;
                (b, total)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum,
            count: total,
        }
    }

    /// Buckets `values` (seconds) into a snapshot.
    pub fn of_values(bounds: &[f64], values: impl IntoIterator<Item = f64>) -> HistogramSnapshot {
        let mut counts = vec![0u64; bounds.len() + 1];
        let mut sum = 0.0;
        for v in values {
            counts[bounds.partition_point(|b| *b < v)] += 1;
            sum += v;
        }
        HistogramSnapshot::from_counts(bounds, counts, sum)
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1); `None` without observations.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= rank)
            .map(|(b, _)| *b)
    }
}

/// Events per second over the last few seconds, from samples of a monotonic total.
pub struct RateMeter {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    pub fn new(window: Duration) -> RateMeter {
        RateMeter {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Records the total at `now`; samples older than the window (but the newest such one) go.
    pub fn record(&mut self, total: u64, now: Instant) {
        // Often enough for the window; at high load the aggregator loops far more often.
        if let Some((last, _)) = self.samples.back()
            && now.duration_since(*last) < self.window / 100
        {
            return;
        }
        self.samples.push_back((now, total));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= self.window)
        {
            self.samples.pop_front();
        }
    }

    /// The rate between the oldest and newest sample; 0 before two samples.
    pub fn per_second(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                n1.saturating_sub(*n0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// Prometheus text exposition format 0.0.4, written metric family by family.
#[derive(Default)]
pub struct Exposition {
    out: String,
    declared: BTreeSet<String>,
}

/// The content type of [`Exposition::finish`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// `# HELP` and `# TYPE` of a family, once, before its first sample.
    fn declare(&mut self, name: &str, kind: &str, help: &str) {
        if self.declared.insert(name.to_string()) {
            let help = help.replace('\\', "\\\\").replace('\n', "\\n");
            let _ = writeln!(self.out, "# HELP {name} {help}");
            let _ = writeln!(self.out, "# TYPE {name} {kind}");
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels);
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
    }

    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.declare(name, "counter", help);
        self.sample(name, labels, value);
    }

    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.declare(name, "gauge", help);
        self.sample(name, labels, value);
    }

    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
    ) {
        self.declare(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in &h.buckets {
            let le = format_value(*bound);
            let mut with_le = labels.to_vec();
            with_le.push(("le", le.as_str()));
            self.sample(&bucket, &with_le, *count as f64);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }

    /// Appends another page's families (which must not repeat one of this page's).
    pub fn append(mut self, other: Exposition) -> Exposition {
        self.out.push_str(&other.out);
        self.declared.extend(other.declared);
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

fn format_value(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_inf_bucket() {
        let h = Histogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(10));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(3));
        let s = h.snapshot();
        assert_eq!(
            s.buckets,
            vec![(0.01, 2), (0.1, 3), (f64::INFINITY, 4)],
            "10 ms falls into the le=0.01 bucket (upper bounds are inclusive)"
        );
        assert_eq!(s.count, 4);
        assert!((s.sum - 3.065).abs() < 1e-9);
        assert_eq!(s.quantile_bound(0.5), Some(0.01));
        assert_eq!(s.quantile_bound(0.99), Some(f64::INFINITY));
    }

    #[test]
    fn rate_over_the_window() {
        let mut r = RateMeter::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(r.per_second(), 0.0);
        r.record(0, t);
        r.record(500, t + Duration::from_secs(5));
        assert_eq!(r.per_second(), 100.0);
        // Old samples leave the window: the rate follows the recent slope.
        r.record(500, t + Duration::from_secs(20));
        r.record(500, t + Duration::from_secs(25));
        assert_eq!(r.per_second(), 0.0);
    }

    #[test]
    fn exposition_escapes_and_declares_once() {
        let mut e = Exposition::new();
        e.counter(
            "x_total",
            "help with \\ and\nnewline",
            &[("name", "a\"b\\c\nd")],
            3.0,
        );
        e.counter("x_total", "ignored", &[("name", "plain")], 1.5);
        e.histogram(
            "lat_seconds",
            "latency",
            &[],
            &HistogramSnapshot::of_values(&[1.0], [0.5, 2.0]),
        );
        assert_eq!(
            e.finish(),
            "# HELP x_total help with \\\\ and\\nnewline\n# TYPE x_total counter\n\
             x_total{name=\"a\\\"b\\\\c\\nd\"} 3\nx_total{name=\"plain\"} 1.5\n\
             # HELP lat_seconds latency\n# TYPE lat_seconds histogram\n\
             lat_seconds_bucket{le=\"1\"} 1\nlat_seconds_bucket{le=\"+Inf\"} 2\n\
             lat_seconds_sum 2.5\nlat_seconds_count 2\n"
        );
    }
}
