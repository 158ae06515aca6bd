//! Time helpers every layer may use: the wall clock in epoch milliseconds, and how a time is
//! written in answers, dead letters and logs. A leaf: it imports nothing from the crate.

use chrono::{DateTime, Utc};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_in_rfc_3339() {
        assert_eq!(format_ms(1_763_719_200_000), "2025-11-21T10:00:00.000Z");
        assert_eq!(format_ms(1_763_719_200_042), "2025-11-21T10:00:00.042Z");
        // Beyond what a date can hold: the number as is, not a panic.
        assert_eq!(format_ms(i64::MAX), i64::MAX.to_string());
        assert!(now_ms() > 1_763_719_200_000);
    }
}
