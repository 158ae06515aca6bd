//! Times as users type them in `--from/--to`, `from=/to=` and `backfill`: RFC 3339
//! (`2026-11-21T10:00:00Z`), a date (`2026-11-21`, midnight UTC), epoch milliseconds, `now`,
//! or relative to now (`-1h`, `-30m`, `+1d`).

use chrono::{DateTime, NaiveDate, Utc};

/// Parses `text` as an instant for `as_of`: any form [`parse_time`] takes, RFC 3339 to the
/// nanosecond (an answer's `as_of.at`, which names the place within its millisecond too).
pub fn parse_instant(text: &str, now_ms: i64) -> Result<crate::clock::Tick, String> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(text.trim())
        && let Some(ns) = dt.timestamp_nanos_opt()
    {
        return Ok(crate::clock::Tick::from_ns(ns));
    }
    Ok(crate::clock::Tick {
        ms: parse_time(text, now_ms)?,
        n: 0,
    })
}

/// Parses `text` into epoch milliseconds (UTC), relative forms counted from `now_ms`.
pub fn parse_time(text: &str, now_ms: i64) -> Result<i64, String> {
    let ms = parse_unchecked(text, now_ms)?;
    // Beyond what a date can express (about ±262,000 years) a time is a typo or an overflow.
    match ms {
        Some(ms) if DateTime::<Utc>::from_timestamp_millis(ms).is_some() => Ok(ms),
        _ => Err(format!(
            "time `{text}` is out of range (at most ±262,000 years around 1970)"
        )),
    }
}

/// `Ok(None)`: well formed, but the arithmetic overflows.
fn parse_unchecked(text: &str, now_ms: i64) -> Result<Option<i64>, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "invalid time `{text}` (use RFC 3339 like 2026-11-21T10:00:00Z, a date, epoch ms, `now`, or relative like -1h)"
        )
    };
    if t == "now" {
        return Ok(Some(now_ms));
    }
    if let Some(rest) = t.strip_prefix('-').or_else(|| t.strip_prefix('+'))
        && rest.starts_with(|c: char| c.is_ascii_digit())
        && !rest.chars().all(|c| c.is_ascii_digit())
    {
        let d = crate::spec::duration::parse(rest).map_err(|_| bad())?;
        let Ok(ms) = i64::try_from(d.as_millis()) else {
            return Ok(None);
        };
        return Ok(if t.starts_with('-') {
            now_ms.checked_sub(ms)
        } else {
            now_ms.checked_add(ms)
        });
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Ok(Some(dt.timestamp_millis()));
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(Some(
            d.and_hms_opt(0, 0, 0)
                .ok_or_else(bad)?
                .and_utc()
                .timestamp_millis(),
        ));
    }
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(Some(ms));
    }
    // All digits but too many for an i64.
    let digits = t.strip_prefix('-').unwrap_or(t);
    if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
        return Ok(None);
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        for t in [
            "+9223372036854775807ms",
            "+106751991167d",
            "-106751991167d",
            "+300000000d",
            "9223372036854775807",
            "99999999999999999999",
            "-99999999999999999999",
        ] {
            let e = parse_time(t, NOW).unwrap_err();
            assert!(e.contains("out of range"), "{t}: {e}");
        }
        // The edges of what a date can hold still parse.
        let max = DateTime::<Utc>::MAX_UTC.timestamp_millis();
        assert_eq!(parse_time(&max.to_string(), NOW).unwrap(), max);
        assert_eq!(
            parse_time("+100000d", NOW).unwrap(),
            NOW + 100_000 * 86_400_000
        );
    }

    const NOW: i64 = 1_763_719_200_000; // 2025-11-21T10:00:00Z

    #[test]
    fn absolute_and_relative() {
        assert_eq!(parse_time("2025-11-21T10:00:00Z", 0).unwrap(), NOW);
        assert_eq!(parse_time("2025-11-21T11:00:00+01:00", 0).unwrap(), NOW);
        assert_eq!(parse_time("2025-11-21", 0).unwrap(), NOW - 10 * 3_600_000);
        assert_eq!(parse_time("-1h", NOW).unwrap(), NOW - 3_600_000);
        assert_eq!(parse_time("+30m", NOW).unwrap(), NOW + 1_800_000);
        assert_eq!(parse_time("now", NOW).unwrap(), NOW);
        assert_eq!(parse_time("-5", 0).unwrap(), -5);
        assert_eq!(parse_time(&NOW.to_string(), 0).unwrap(), NOW);
        assert!(parse_time("yesterday", NOW).is_err());
        assert!(parse_time("-1x", NOW).is_err());
        assert!(parse_time("", NOW).is_err());
        assert!(parse_time("-", NOW).is_err());
    }

    #[test]
    fn relative_times_beyond_i64_are_refused() {
        for t in [
            "+9223372036854775807ms",
            "+106751991167d",
            "-9223372036854775808ms",
        ] {
            let e = parse_time(t, NOW).unwrap_err();
            assert!(e.contains("out of range"), "{t}: {e}");
        }
        assert!(parse_time("+99999999999999999999999d", NOW).is_err());
    }
}
