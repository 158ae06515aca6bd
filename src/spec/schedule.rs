//! Workflow schedules as users write them, on top of the `cron` crate.
//!
//! Users type crontab: 5 fields, `@hourly`/`@daily`/…, or 6 fields with a leading seconds field
//! (our extension). The `cron` crate wants a seconds field and numbers days of the week 1–7 from
//! Sunday, where crontab numbers them 0–7 from Sunday (0 and 7 both Sunday, 1 = Monday); both are
//! translated here so `1-5` keeps meaning Monday to Friday.
//!
//! Days follow crontab (Vixie cron) too: when both day-of-month and day-of-week are restricted
//! (neither field starts with `*`), a day matches if EITHER matches — `0 0 13 * 5` fires on
//! every 13th and on every Friday. When either starts with `*` (`*`, `*/2`), both must match.
//! The `cron` crate always requires both, so such a schedule is kept as two: one with each day
//! field, fired at the union of their times.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

#[derive(Clone)]
pub struct Schedule {
    /// As the user wrote it.
    pub expr: String,
    cron: cron::Schedule,
    /// When both day fields are restricted: `cron` keeps the day-of-month field (any weekday)
    /// and this one the day-of-week field (any day of the month).
    or_weekdays: Option<cron::Schedule>,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.expr)
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr
    }
}

impl Schedule {
    pub fn parse(expr: &str) -> Result<Schedule, String> {
        let trimmed = expr.trim();
        let macro_form = match trimmed {
            "@yearly" | "@annually" => Some("0 0 0 1 1 *"),
            "@monthly" => Some("0 0 0 1 * *"),
            "@weekly" => Some("0 0 0 * * SUN"),
            "@daily" | "@midnight" => Some("0 0 0 * * *"),
            "@hourly" => Some("0 0 * * * *"),
            _ => None,
        };
        let mut either_day = None;
        let six = match macro_form {
            Some(m) => m.to_string(),
            None if trimmed.starts_with('@') => {
                return Err(format!(
                    "unknown schedule `{trimmed}` (use a 5-field crontab like `0 2 * * *`, or @hourly, @daily, @weekly, @monthly, @yearly)"
                ));
            }
            None => {
                let fields: Vec<&str> = trimmed.split_whitespace().collect();
                let mut fields: Vec<String> = match fields.len() {
                    5 => std::iter::once("0")
                        .chain(fields)
                        .map(str::to_string)
                        .collect(),
                    6 => fields.into_iter().map(str::to_string).collect(),
                    n => {
                        return Err(format!(
                            "invalid schedule `{trimmed}`: expected 5 fields (minute hour day-of-month month day-of-week), found {n}"
                        ));
                    }
                };
                let restricted = |f: &str| !f.starts_with(['*', '?']);
                let both_days = restricted(&fields[3]) && restricted(&fields[5]);
                fields[5] = crontab_weekdays(&fields[5])
                    .map_err(|e| format!("invalid schedule `{trimmed}`: {e}"))?;
                if both_days {
                    let mut by_month_day = fields.clone();
                    by_month_day[5] = "*".into();
                    let mut by_weekday = fields.clone();
                    by_weekday[3] = "*".into();
                    either_day = Some((by_month_day.join(" "), by_weekday.join(" ")));
                }
                fields.join(" ")
            }
        };
        let parse = |six: &str| {
            cron::Schedule::from_str(six).map_err(|e| {
                // The crate's message quotes the translated expression with a caret; keep its reason.
                let text = e.to_string();
                let reason = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or(&text)
                    .trim()
                    .to_string();
                format!(
                    "invalid schedule `{trimmed}`: {}",
                    out_of_range(&reason).unwrap_or(reason)
                )
            })
        };
        // Checked as written (both day fields at once) so errors read the same either way.
        let cron = parse(&six)?;
        let (cron, or_weekdays) = match either_day {
            Some((by_month_day, by_weekday)) => (parse(&by_month_day)?, Some(parse(&by_weekday)?)),
            None => (cron, None),
        };
        Ok(Schedule {
            expr: trimmed.to_string(),
            cron,
            or_weekdays,
        })
    }

    /// The times the schedule fires strictly after `after`, in order, reading the
    /// `DateTime<Utc>` as wall-clock time (callers place it in a time zone).
    pub fn after(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let mut a = self.cron.after(&after).peekable();
        let mut b = self
            .or_weekdays
            .as_ref()
            .map(|c| c.after(&after).peekable());
        std::iter::from_fn(move || {
            let Some(b) = b.as_mut() else {
                return a.next();
            };
            match (a.peek().copied(), b.peek().copied()) {
                (Some(x), Some(y)) if x < y => a.next(),
                (Some(x), Some(y)) if y < x => b.next(),
                // The same time from both: once.
                (Some(_), Some(_)) => {
                    b.next();
                    a.next()
                }
                (Some(_), None) => a.next(),
                (None, _) => b.next(),
            }
        })
    }

    /// Whether the schedule fires at `t` (wall-clock time, as in [`Schedule::after`]).
    pub fn includes(&self, t: DateTime<Utc>) -> bool {
        self.cron.includes(t) || self.or_weekdays.as_ref().is_some_and(|c| c.includes(t))
    }
}

/// The crate says "Hours must be less than 23. ('25' specified.)" where it means "at most 23".
fn out_of_range(reason: &str) -> Option<String> {
    let (unit, rest) = reason.split_once(" must be less than ")?;
    let (max, rest) = rest.split_once(". ('")?;
    let value = rest.strip_suffix("' specified.)")?;
    Some(format!(
        "{} `{value}` is out of range (at most {max})",
        unit.to_lowercase()
    ))
}

/// Rewrites crontab weekday numbers (0–7, Sunday = 0 or 7) into explicit `cron`-crate ordinals
/// (1–7, Sunday = 1). Names (`MON-FRI`) mean the same in both and pass through.
fn crontab_weekdays(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" || !field.chars().any(|c| c.is_ascii_digit()) {
        return Ok(field.to_string());
    }
    let mut days = [false; 7];
    for part in field.split(',') {
        let (base, step) = match part.split_once('/') {
            Some((b, s)) => (
                b,
                s.parse::<u32>()
                    .map_err(|_| format!("bad step in `{part}`"))?,
            ),
            None => (part, 1),
        };
        if step == 0 {
            return Err(format!("step 0 in `{part}`"));
        }
        let (lo, hi) = match base {
            "*" | "?" => (0, 6),
            _ => match base.split_once('-') {
                Some((a, b)) => (weekday(a)?, weekday(b)?),
                None => {
                    let d = weekday(base)?;
                    (d, if step > 1 { 7 } else { d })
                }
            },
        };
        if lo > hi {
            return Err(format!("range `{base}` goes backwards"));
        }
        for d in (lo..=hi).step_by(step as usize) {
            days[(d % 7) as usize] = true;
        }
    }
    let ordinals: Vec<String> = (0..7)
        .filter(|&d| days[d])
        .map(|d| (d + 1).to_string())
        .collect();
    Ok(ordinals.join(","))
}

fn weekday(s: &str) -> Result<u32, String> {
    const NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    if let Ok(n) = s.parse::<u32>() {
        return if n <= 7 {
            Ok(n)
        } else {
            Err(format!("day of week `{n}` is out of range 0-7"))
        };
    }
    let lower = s.to_ascii_lowercase();
    NAMES
        .iter()
        .position(|n| lower.starts_with(n))
        .map(|p| p as u32)
        .ok_or_else(|| format!("unknown day of week `{s}`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Utc, Weekday};

    fn next_days(expr: &str, n: usize) -> Vec<Weekday> {
        let s = Schedule::parse(expr).unwrap();
        let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(); // a Sunday
        s.after(start).take(n).map(|t| t.weekday()).collect()
    }

    #[test]
    fn five_fields_and_macros() {
        let s = Schedule::parse("0 2 * * *").unwrap();
        let start = Utc.with_ymd_and_hms(2026, 11, 1, 3, 0, 0).unwrap();
        let next = s.after(start).next().unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2026, 11, 2, 2, 0, 0).unwrap());
        for m in ["@hourly", "@daily", "@weekly", "@monthly", "@yearly"] {
            Schedule::parse(m).unwrap();
        }
        Schedule::parse("*/2 * * * * *").unwrap();
    }

    #[test]
    fn weekdays_follow_crontab() {
        use Weekday::*;
        assert_eq!(next_days("0 9 * * 1-5", 5), vec![Mon, Tue, Wed, Thu, Fri]);
        assert_eq!(next_days("0 9 * * 0", 2), vec![Sun, Sun]);
        assert_eq!(next_days("0 9 * * 7", 1), vec![Sun]);
        assert_eq!(next_days("0 9 * * 5-7", 3), vec![Sun, Fri, Sat]);
        assert_eq!(next_days("0 9 * * MON-FRI", 2), vec![Mon, Tue]);
        assert_eq!(next_days("0 9 * * */3", 3), vec![Sun, Wed, Sat]);
    }

    #[test]
    fn both_day_fields_restricted_means_either_day() {
        // Every 13th and every Friday, as crontab reads it (not only Fridays the 13th).
        let s = Schedule::parse("0 0 13 * 5").unwrap();
        let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let days: Vec<(u32, Weekday)> = s
            .after(start)
            .take(6)
            .map(|t| (t.day(), t.weekday()))
            .collect();
        use Weekday::*;
        assert_eq!(
            days,
            vec![
                (6, Fri),
                (13, Fri),
                (20, Fri),
                (27, Fri),
                (4, Fri),
                (11, Fri)
            ]
        );
        let s = Schedule::parse("30 6 1,15 * MON").unwrap();
        let fires: Vec<DateTime<Utc>> = s.after(start).take(4).collect();
        assert_eq!(
            fires,
            [1, 2, 9, 15].map(|d| Utc.with_ymd_and_hms(2026, 11, d, 6, 30, 0).unwrap())
        );
        assert!(s.includes(Utc.with_ymd_and_hms(2026, 11, 15, 6, 30, 0).unwrap()));
        assert!(s.includes(Utc.with_ymd_and_hms(2026, 11, 23, 6, 30, 0).unwrap()));
        assert!(!s.includes(Utc.with_ymd_and_hms(2026, 11, 24, 6, 30, 0).unwrap()));
        // A day both ways fires once.
        let s = Schedule::parse("0 0 2 * 1").unwrap(); // 2026-11-02 is a Monday
        let fires: Vec<DateTime<Utc>> = s.after(start).take(2).collect();
        assert_eq!(
            fires[0],
            Utc.with_ymd_and_hms(2026, 11, 2, 0, 0, 0).unwrap()
        );
        assert_eq!(
            fires[1],
            Utc.with_ymd_and_hms(2026, 11, 9, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn a_star_day_field_keeps_both_required() {
        use Weekday::*;
        // Vixie cron: a field starting with `*` is unrestricted, so the other one decides…
        assert_eq!(next_days("0 9 * * 1", 2), vec![Mon, Mon]);
        let firsts: Vec<u32> = Schedule::parse("0 9 1 * *")
            .unwrap()
            .after(Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap())
            .take(3)
            .map(|t| t.day())
            .collect();
        assert_eq!(firsts, vec![1, 1, 1]);
        // …and `*/2` counts as `*`: odd days that are also Mondays.
        let s = Schedule::parse("0 0 */2 * 1").unwrap();
        let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        for t in s.after(start).take(10) {
            assert_eq!(t.weekday(), Mon, "{t}");
            assert_eq!(t.day() % 2, 1, "{t}");
        }
    }

    proptest::proptest! {
        /// Against a day-by-day reading of crontab's rule: with both day fields lists, each
        /// day at midnight fires iff its day of month or its day of week is listed.
        #[test]
        fn restricted_day_fields_fire_on_the_union(
            month_days in proptest::collection::btree_set(1u32..=31, 1..4),
            week_days in proptest::collection::btree_set(0u32..=7, 1..3),
            start_day in 0i64..3650,
        ) {
            let list = |s: &std::collections::BTreeSet<u32>| {
                s.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            };
            let expr = format!("0 0 {} * {}", list(&month_days), list(&week_days));
            let s = Schedule::parse(&expr).unwrap();
            let start = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap()
                + chrono::Duration::days(start_day);
            let end = start + chrono::Duration::days(120);
            let fired: Vec<DateTime<Utc>> = s.after(start).take_while(|t| *t <= end).collect();
            let expected: Vec<DateTime<Utc>> = (1..=120)
                .map(|d| start + chrono::Duration::days(d))
                .filter(|t| {
                    let dow = t.weekday().num_days_from_sunday();
                    month_days.contains(&t.day())
                        || week_days.contains(&dow)
                        || (dow == 0 && week_days.contains(&7))
                })
                .collect();
            proptest::prop_assert_eq!(&fired, &expected, "{}", expr);
            for t in &fired {
                proptest::prop_assert!(s.includes(*t));
            }
        }
    }

    #[test]
    fn rejects_bad_expressions() {
        for bad in [
            "0 2 * *",
            "61 * * * *",
            "@fortnightly",
            "0 0 * * 8",
            "x y z a b",
            "0 0 32 * *",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }
}
