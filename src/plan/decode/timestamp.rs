//! Event times: RFC 3339 (`2024-05-01T12:00:00.250Z`, `…+02:00`) or integer epoch
//! milliseconds, to epoch milliseconds UTC. Hand-written because it runs once per event; it is
//! checked against chrono's parser in the tests.

/// 0000-01-01T00:00:00Z: the earliest instant RFC 3339 can write.
const MIN_MS: i64 = -62_167_219_200_000;
/// 9999-12-31T23:59:59.999Z: the latest.
const MAX_MS: i64 = 253_402_300_799_999;

/// Whether epoch milliseconds fall in years 0000–9999. Event times outside are rejected, which
/// also keeps every window computation far from i64 overflow.
pub(crate) fn in_range(ms: i64) -> bool {
    (MIN_MS..=MAX_MS).contains(&ms)
}

/// Epoch milliseconds of an RFC 3339 timestamp or of a decimal integer string, in years
/// 0000–9999.
pub(crate) fn parse(s: &str) -> Option<i64> {
    let unsigned = s.strip_prefix('-').unwrap_or(s);
    let ms = if !unsigned.is_empty() && unsigned.bytes().all(|c| c.is_ascii_digit()) {
        s.parse().ok()
    } else {
        rfc3339(s.as_bytes())
    };
    ms.filter(|ms| in_range(*ms))
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let part = b.get(at..at + n)?;
    let mut v = 0i64;
    for c in part {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as i64;
    }
    Some(v)
}

fn rfc3339(b: &[u8]) -> Option<i64> {
    let year = digits(b, 0, 4)?;
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || b.get(13) != Some(&b':') {
        return None;
    }
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let hour = digits(b, 11, 2)?;
    let minute = digits(b, 14, 2)?;
    if b.get(16) != Some(&b':') {
        return None;
    }
    let second = digits(b, 17, 2)?;
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                millis = millis * 10 + (b[i] - b'0') as i64;
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_secs = match b.get(i) {
        Some(b'Z' | b'z') => {
            i += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            let h = digits(b, i + 1, 2)?;
            if b.get(i + 3) != Some(&b':') {
                return None;
            }
            let m = digits(b, i + 4, 2)?;
            if h > 23 || m > 59 {
                return None;
            }
            let secs = h * 3600 + m * 60;
            i += 6;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    if i != b.len() {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1000 + millis)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_instants() {
        assert_eq!(parse("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse("2024-05-01T12:34:56.789Z"), Some(1_714_566_896_789));
        assert_eq!(
            parse("2024-05-01T14:34:56.7+02:00"),
            Some(1_714_566_896_700)
        );
        assert_eq!(
            parse("2024-05-01 12:34:56.789123z"),
            Some(1_714_566_896_789)
        );
        assert_eq!(parse("1969-12-31T23:59:59.999Z"), Some(-1));
        assert_eq!(parse("1714566896789"), Some(1_714_566_896_789));
        assert_eq!(parse("-5"), Some(-5));
        assert_eq!(parse("0000-01-01T00:00:00Z"), Some(MIN_MS));
        assert_eq!(parse("9999-12-31T23:59:59.999Z"), Some(MAX_MS));
        assert_eq!(parse("253402300800000"), None);
        for bad in [
            "",
            "-",
            "yesterday",
            "2024-02-30T00:00:00Z",
            "2024-05-01T12:34:56",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:34:56.Z",
            "2024-05-01T12:34:56+0200",
            "2024-05-01T12:34:56Zjunk",
            "99999999999999999999",
            "0000-01-01T00:00:00+00:01",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn agrees_with_chrono(
            secs in -62_000_000_000i64..250_000_000_000,
            frac in prop::option::of(1u32..10),
            nanos in 0u32..1_000_000_000,
            offset_min in prop::option::of(-1439i32..1440),
        ) {
            let dt = chrono::DateTime::from_timestamp(secs, nanos).unwrap();
            let text = match offset_min {
                None => dt.format("%Y-%m-%dT%H:%M:%S").to_string(),
                Some(o) => {
                    let tz = chrono::FixedOffset::east_opt(o * 60).unwrap();
                    dt.with_timezone(&tz).format("%Y-%m-%dT%H:%M:%S").to_string()
                }
            };
            let frac_text = match frac {
                Some(n) => format!(".{:09}", nanos)[..=n as usize].to_string(),
                None => String::new(),
            };
            let zone = match offset_min {
                None => "Z".to_string(),
                Some(o) => format!("{}{:02}:{:02}", if o < 0 { '-' } else { '+' }, o.abs() / 60, o.abs() % 60),
            };
            let s = format!("{text}{frac_text}{zone}");
            let expected = chrono::DateTime::parse_from_rfc3339(&s).ok().map(|d| d.timestamp_millis());
            prop_assert_eq!(parse(&s), expected, "{}", s);
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse(&s);
        }
    }
}
