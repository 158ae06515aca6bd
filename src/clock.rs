//! Time helpers every layer may use: the wall clock in epoch milliseconds, how a time is
//! written in answers, dead letters and logs, and the [`Stamps`] that order what a pipeline
//! serves in time (time travel). A leaf: it imports nothing from the crate.

use chrono::{DateTime, Utc};
use parking_lot::Mutex;

/// Now, in milliseconds since the Unix epoch (UTC).
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// RFC 3339 with milliseconds, UTC (`2026-11-21T10:00:00.000Z`).
pub fn format_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// RFC 3339 with nanoseconds, UTC (`2026-11-21T10:00:00.000000042Z`): the instant an answer
/// stands for ([`Tick::ns`]), exact enough to ask for the same answer again with `as_of`.
pub fn format_ns(ns: i64) -> String {
    DateTime::<Utc>::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// An instant of what a pipeline serves: everything logged before millisecond `ms`, and the
/// first `n` things that happened in it — events logged (in position order) and publications
/// installed. Written as one number, `ms × 10⁶ + n` nanoseconds ([`Tick::ns`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick {
    pub ms: i64,
    pub n: i64,
}

/// Things that can happen in one millisecond at most (the sub-millisecond digits of a tick).
const PER_MS: i64 = 1_000_000;

impl Tick {
    pub fn ns(self) -> i64 {
        self.ms
            .saturating_mul(PER_MS)
            .saturating_add(self.n.min(PER_MS - 1))
    }

    pub fn from_ns(ns: i64) -> Tick {
        Tick {
            ms: ns.div_euclid(PER_MS),
            n: ns.rem_euclid(PER_MS),
        }
    }

    /// This instant after `count` more events logged at millisecond `ms` (a request).
    pub fn after_events(self, ms: i64, count: i64) -> Tick {
        match ms.cmp(&self.ms) {
            std::cmp::Ordering::Equal => Tick {
                ms,
                n: self.n + count,
            },
            std::cmp::Ordering::Greater => Tick { ms, n: count },
            // Logged before this instant's millisecond: only records from before the log
            // stamped them (their arrival time is the door's, not in position order).
            std::cmp::Ordering::Less => self,
        }
    }
}

/// A pipeline's clock for what it serves. The write-ahead log of each of its partitions
/// stamps each request with it as it writes it — never earlier than the request before, in
/// any partition, so arrival times follow positions — and serving places each publication it
/// installs between the requests absorbed and those not absorbed yet ([`Stamps::install`]).
/// An answer is then exactly "the publications installed and the events logged up to its
/// [`Tick`]", which `as_of` computes again later. (With several partitions, each absorbs on
/// its own: an answer may hold one partition's events of a millisecond before another's of
/// an earlier one, so an instant is exact up to the events of those milliseconds.)
#[derive(Debug, Default)]
pub struct Stamps {
    inner: Mutex<Stamped>,
}

#[derive(Debug, Default)]
struct Stamped {
    /// The latest millisecond given.
    last_ms: i64,
    /// Per log (a partition's, by its index): end (exclusive) of the positions stamped.
    ends: Vec<u64>,
}

impl Stamped {
    fn end(&mut self, log: usize) -> &mut u64 {
        if self.ends.len() <= log {
            self.ends.resize(log + 1, 0);
        }
        &mut self.ends[log]
    }
}

impl Stamps {
    /// Starts over for logs whose next positions are `ends` (a restart): stamps are
    /// `at_least_ms` or later.
    pub fn restart(&self, at_least_ms: i64, ends: &[u64]) {
        let mut s = self.inner.lock();
        s.last_ms = s.last_ms.max(at_least_ms);
        s.ends = ends.to_vec();
    }

    /// The arrival time of the next request log `log` writes (`events` positions): now, or the
    /// previous request's when the wall clock is behind it.
    pub fn stamp(&self, log: usize, events: u64) -> i64 {
        let mut s = self.inner.lock();
        s.last_ms = now_ms().max(s.last_ms);
        *s.end(log) += events;
        s.last_ms
    }

    /// Log `log` could not write what was stamped beyond `end`: those positions are not taken.
    pub fn unstamp_to(&self, log: usize, end: u64) {
        *self.inner.lock().end(log) = end;
    }

    /// Where a publication installed now goes, the served state being at `served` with the
    /// positions below `absorbed[log]` of each log in it: when every stamped request is
    /// absorbed, now (and the next request is stamped no earlier); otherwise right after
    /// `served`, before the requests still on their way (stamped at `served.ms` or later, they
    /// come after it). The caller holds the served state's lock: nothing is absorbed meanwhile.
    pub fn install(&self, absorbed: &[u64], served: Tick) -> Tick {
        let mut s = self.inner.lock();
        let all = s
            .ends
            .iter()
            .enumerate()
            .all(|(log, end)| *end <= absorbed.get(log).copied().unwrap_or(0));
        if all {
            let ms = now_ms().max(s.last_ms).max(served.ms);
            s.last_ms = ms;
            if ms > served.ms {
                return Tick { ms, n: 1 };
            }
        }
        Tick {
            ms: served.ms,
            n: served.n + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_follow_positions_and_installs_go_between_absorbed_and_not() {
        let ahead = now_ms() + 60_000;
        let s = Stamps::default();
        s.restart(ahead, &[10]);
        // The wall clock is behind the last stamp: requests keep its millisecond.
        assert_eq!(s.stamp(0, 3), ahead);
        assert_eq!(s.stamp(0, 2), ahead);
        let served = Tick { ms: ahead, n: 3 };
        // Positions 13..15 are stamped but not absorbed: the install goes right after 3 events.
        assert_eq!(s.install(&[13], served), Tick { ms: ahead, n: 4 });
        // All absorbed: the install takes the next instant of the clock.
        let all = Tick { ms: ahead, n: 5 };
        assert_eq!(s.install(&[15], all), Tick { ms: ahead, n: 6 });
        // A second partition's log: its stamps follow the first's, and an install waits for
        // both to be absorbed before it takes the clock's next instant.
        assert_eq!(s.stamp(1, 4), ahead);
        assert_eq!(s.install(&[15, 0], all), Tick { ms: ahead, n: 6 });
        assert_eq!(s.install(&[15, 4], all), Tick { ms: ahead, n: 6 });
        let s = Stamps::default();
        let t = s.install(&[], Tick::default());
        assert!(t.ms >= now_ms() - 1000 && t.n == 1, "{t:?}");
        assert!(s.stamp(0, 1) >= t.ms);
        s.unstamp_to(0, 0);
        assert!(s.install(&[0], t) > t);
        // As one number and back.
        let t = Tick {
            ms: 1_763_719_200_000,
            n: 42,
        };
        assert_eq!(Tick::from_ns(t.ns()), t);
        assert_eq!(format_ns(t.ns()), "2025-11-21T10:00:00.000000042Z");
        assert_eq!(t.after_events(t.ms, 2), Tick { ms: t.ms, n: 44 });
        assert_eq!(t.after_events(t.ms + 1, 2), Tick { ms: t.ms + 1, n: 2 });
        assert_eq!(t.after_events(t.ms - 1, 2), t);
    }

    #[test]
    fn milliseconds_in_rfc_3339() {
        assert_eq!(format_ms(1_763_719_200_000), "2025-11-21T10:00:00.000Z");
        assert_eq!(format_ms(1_763_719_200_042), "2025-11-21T10:00:00.042Z");
        // Beyond what a date can hold: the number as is, not a panic.
        assert_eq!(format_ms(i64::MAX), i64::MAX.to_string());
        assert!(now_ms() > 1_763_719_200_000);
    }
}
