//! Workflow schedules as users write them, on top of the `cron` crate.
//!
//! Users type crontab: 5 fields, `@hourly`/`@daily`/…, or 6 fields with a leading seconds field
//! (our extension). The `cron` crate wants a seconds field and numbers days of the week 1–7 from
//! Sunday, where crontab numbers them 0–7 from Sunday (0 and 7 both Sunday, 1 = Monday); both are
//! translated here so `1-5` keeps meaning Monday to Friday.

use std::fmt;
use std::str::FromStr;

#[derive(Clone)]
pub struct Schedule {
    /// As the user wrote it.
    pub expr: String,
    cron: cron::Schedule,
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
                fields[5] = crontab_weekdays(&fields[5])
                    .map_err(|e| format!("invalid schedule `{trimmed}`: {e}"))?;
                fields.join(" ")
            }
        };
        let cron = cron::Schedule::from_str(&six).map_err(|e| {
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
        })?;
        Ok(Schedule {
            expr: trimmed.to_string(),
            cron,
        })
    }

    /// The underlying `cron` schedule (with seconds, `cron`'s weekday numbering).
    pub fn cron(&self) -> &cron::Schedule {
        &self.cron
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
        s.cron()
            .after(&start)
            .take(n)
            .map(|t| t.weekday())
            .collect()
    }

    #[test]
    fn five_fields_and_macros() {
        let s = Schedule::parse("0 2 * * *").unwrap();
        let start = Utc.with_ymd_and_hms(2026, 11, 1, 3, 0, 0).unwrap();
        let next = s.cron().after(&start).next().unwrap();
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
