//! What a running source reports about itself, for `GET /v1/pipelines` (and `/metrics`).
//! It lives with the speed layer, which holds it for its pipeline: sources (above) write it,
//! serving (above) reads it.
//!
//! Every pipeline runtime holds one [`SourceStatus`] (`PipelineRuntime::source_status`). Broker
//! sources overwrite its lag from their own measurements; readers take a snapshot with
//! [`SourceStatus::lag`]. The API is deliberately plain (a map of non-negative integers) so
//! any exporter can read it without knowing the source kind.
//!
//! Lag = messages the broker holds for this pipeline that the source has not yet consumed:
//!
//! | source | keys                    | measured as                                   |
//! |--------|-------------------------|-----------------------------------------------|
//! | kafka  | partition number (`"0"`) | high watermark − consumed position            |
//! | nats   | `"pending"`             | the consumer's `num_pending`                   |
//! | redis  | `"pending"`, `"lag"`    | the group's pending entries (XPENDING); entries not yet delivered to the group (XINFO GROUPS `lag`) |
//! | amqp   | the queue name          | the queue's ready message count               |
//!
//! MQTT offers no way to measure it; HTTP, generator and file sources have none. Those never
//! report, and `lag` stays `None`.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use crate::clock::now_ms;

#[derive(Default)]
pub struct SourceStatus {
    /// The last measurement and when it was taken (Unix ms).
    lag: Mutex<Option<(BTreeMap<String, u64>, i64)>>,
}

/// A lag measurement: per key (see the module docs) and when it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag {
    pub by_key: BTreeMap<String, u64>,
    pub measured_at_ms: i64,
}

impl Lag {
    pub fn total(&self) -> u64 {
        self.by_key.values().sum()
    }
}

impl SourceStatus {
    /// Replaces the lag with a new measurement.
    pub fn set_lag(&self, by_key: BTreeMap<String, u64>) {
        *self.lag.lock() = Some((by_key, now_ms()));
    }

    /// The last measurement, or None if the source never measured one.
    pub fn lag(&self) -> Option<Lag> {
        self.lag.lock().as_ref().map(|(by_key, at)| Lag {
            by_key: by_key.clone(),
            measured_at_ms: *at,
        })
    }

    /// The last measurement as JSON: `{"<key>": n, ...}`, or null.
    pub fn lag_json(&self) -> serde_json::Value {
        match self.lag() {
            Some(l) => serde_json::json!(l.by_key),
            None => serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_none_until_measured_then_the_last_measurement() {
        let s = SourceStatus::default();
        assert_eq!(s.lag(), None);
        assert_eq!(s.lag_json(), serde_json::Value::Null);
        s.set_lag(BTreeMap::from([("0".to_string(), 5), ("1".to_string(), 7)]));
        s.set_lag(BTreeMap::from([("0".to_string(), 2), ("1".to_string(), 3)]));
        let lag = s.lag().unwrap();
        assert_eq!(lag.total(), 5);
        assert!(lag.measured_at_ms > 0);
        assert_eq!(s.lag_json(), serde_json::json!({"0": 2, "1": 3}));
    }
}
