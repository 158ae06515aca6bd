//! Time for everything in orchestration that depends on it (schedule slots, retry back-off,
//! task timeouts), behind one trait so tests can run DST changes, missed slots and timeouts on a
//! [`ManualClock`] without sleeping.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::watch;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;

    /// Completes once [`Clock::now`] is at or after `at`.
    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'static, ()>;

    /// Whether this clock is the wall clock. The job queue delays a retry by wall time; for
    /// any other clock it pushes at once and the worker waits on this clock instead.
    fn is_wall_clock(&self) -> bool {
        true
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        let at = self.now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        self.sleep_until(at)
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            // Re-check after waking: a wall clock adjusted meanwhile must not make a timer fire
            // early.
            loop {
                let left = at - Utc::now();
                let Ok(left) = left.to_std() else { return };
                if left.is_zero() {
                    return;
                }
                tokio::time::sleep(left).await;
            }
        })
    }
}

/// A clock that only moves when told to; sleepers wake as soon as it passes their deadline.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
    /// Bumped on every move, so sleepers re-check their deadline.
    moved: watch::Sender<u64>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: Arc::new(Mutex::new(start)),
            moved: watch::Sender::new(0),
        }
    }

    /// Moves the clock to `at` (never backwards).
    pub fn set(&self, at: DateTime<Utc>) {
        {
            let mut now = self.now.lock();
            if at > *now {
                *now = at;
            }
        }
        self.moved.send_modify(|n| *n += 1);
    }

    pub fn advance(&self, d: Duration) {
        let at = self.now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        self.set(at);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock()
    }

    fn is_wall_clock(&self) -> bool {
        false
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let now = self.now.clone();
        let mut moved = self.moved.subscribe();
        Box::pin(async move {
            loop {
                if *now.lock() >= at {
                    return;
                }
                if moved.changed().await.is_err() {
                    // The clock is gone: it can never reach `at`.
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[tokio::test]
    async fn manual_sleepers_wake_when_the_clock_passes_their_deadline() {
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
        let sleeper = tokio::spawn(clock.sleep(Duration::from_secs(60)));
        clock.advance(Duration::from_secs(30));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(30));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woke")
            .expect("sleeper ran");
    }

    #[test]
    fn manual_clock_never_goes_backwards() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let clock = ManualClock::new(t0);
        clock.set(t0 - chrono::Duration::hours(1));
        assert_eq!(clock.now(), t0);
    }
}
