//! Schedule slots: the instants a cron schedule fires in a time zone.
//!
//! A schedule names wall-clock times ("02:30 every day"), so slots are enumerated in local
//! time and then placed on the time line:
//! - a local time that does not exist (the hour skipped when clocks spring forward) fires once,
//!   at the first valid instant after the gap — the moment of the change;
//! - a local time that exists twice (the hour repeated when clocks fall back) fires once, at
//!   its first occurrence.
//!
//! Slots are therefore strictly increasing instants, and "the slots after instant T" is well
//! defined — which is all the scheduler needs to resume from the last slot in the state DB.

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::spec::schedule::Schedule;

/// The slots of `schedule` in `tz` strictly after `after`, in order.
pub fn after<'a>(
    schedule: &'a Schedule,
    tz: Tz,
    after: DateTime<Utc>,
) -> impl Iterator<Item = DateTime<Utc>> + 'a {
    // Enumerate local wall-clock times by running the schedule on a zone without transitions:
    // a naive local time written as if it were UTC.
    let local_after = after.with_timezone(&tz).naive_local();
    let mut last = after;
    // The local time of `after` may lie in a repeated hour's second pass, where the first
    // occurrence of the next wall-clock slot is already in the past: start from its first
    // pass and drop everything not after `after`.
    let start = match tz.from_local_datetime(&local_after) {
        LocalResult::Ambiguous(..) => local_after - chrono::Duration::hours(3),
        _ => local_after,
    };
    schedule
        .after(start.and_utc())
        .map(move |wall| place(tz, wall.naive_utc()))
        .filter(move |&instant| {
            if instant > last {
                last = instant;
                true
            } else {
                false
            }
        })
}

/// The next slot strictly after `after`.
pub fn next(schedule: &Schedule, tz: Tz, after_: DateTime<Utc>) -> Option<DateTime<Utc>> {
    after(schedule, tz, after_).next()
}

/// The slots in `(from, to]`, oldest first.
pub fn between(
    schedule: &Schedule,
    tz: Tz,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> impl Iterator<Item = DateTime<Utc>> + '_ {
    after(schedule, tz, from).take_while(move |&s| s <= to)
}

/// The latest slot in `(from, to]`, if any, without walking every slot of a long outage when
/// the schedule is dense: it searches backwards from `to` in growing windows.
pub fn latest_between(
    schedule: &Schedule,
    tz: Tz,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let mut window = chrono::Duration::hours(1);
    loop {
        let lo = (to - window).max(from);
        if let Some(latest) = between(schedule, tz, lo, to).last() {
            return Some(latest);
        }
        if lo == from {
            return None;
        }
        window = window * 4;
    }
}

/// The instant of a local wall-clock time in `tz`.
fn place(tz: Tz, wall: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
        LocalResult::None => gap_end(tz, wall),
    }
}

/// The first instant after the transition that skipped `wall`. Zone offsets are whole
/// seconds, so the transition lies between `wall` read with the offset after the gap (too
/// early) and with the offset before it (too late); search the instant where the offset
/// changes.
fn gap_end(tz: Tz, wall: NaiveDateTime) -> DateTime<Utc> {
    use chrono::Offset;
    let offset_at = |t: DateTime<Utc>| {
        tz.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
    };
    // A gap is never longer than a day; the offsets a day around `wall` bracket it.
    let before = offset_at((wall - chrono::Duration::days(1)).and_utc());
    let after = offset_at((wall + chrono::Duration::days(1)).and_utc());
    let mut lo = (wall - chrono::Duration::seconds(i64::from(after))).and_utc();
    let mut hi = (wall - chrono::Duration::seconds(i64::from(before))).and_utc();
    if lo > hi {
        std::mem::swap(&mut lo, &mut hi);
    }
    // Invariant: offset_at(lo) == before, offset_at(hi) == after.
    while hi - lo > chrono::Duration::seconds(1) {
        let mid = lo + (hi - lo) / 2;
        if offset_at(mid) == after {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if offset_at(lo) == after { lo } else { hi }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn slots(expr: &str, tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let s = Schedule::parse(expr).unwrap();
        between(&s, tz, from, to).collect()
    }

    #[test]
    fn berlin_spring_forward_runs_the_skipped_slot_once_at_the_change() {
        // 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC); 02:30 does not exist.
        let got = slots(
            "30 2 * * *",
            chrono_tz::Europe::Berlin,
            utc(2026, 3, 27, 12, 0),
            utc(2026, 3, 31, 12, 0),
        );
        assert_eq!(
            got,
            vec![
                utc(2026, 3, 28, 1, 30),
                utc(2026, 3, 29, 1, 0),
                utc(2026, 3, 30, 0, 30),
                utc(2026, 3, 31, 0, 30)
            ]
        );
    }

    #[test]
    fn skipped_and_real_slots_at_the_change_fire_once() {
        // Every 30 minutes: 02:00 and 02:30 are skipped, 03:00 exists; all three are 01:00 UTC.
        let got = slots(
            "*/30 * * * *",
            chrono_tz::Europe::Berlin,
            utc(2026, 3, 29, 0, 0),
            utc(2026, 3, 29, 1, 45),
        );
        assert_eq!(
            got,
            vec![
                utc(2026, 3, 29, 0, 30),
                utc(2026, 3, 29, 1, 0),
                utc(2026, 3, 29, 1, 30)
            ]
        );
    }

    #[test]
    fn new_york_fall_back_runs_the_repeated_slot_once() {
        // 2026-11-01: 02:00 EDT becomes 01:00 EST; 01:30 happens twice (05:30 and 06:30 UTC).
        let got = slots(
            "30 1 * * *",
            chrono_tz::America::New_York,
            utc(2026, 10, 31, 0, 0),
            utc(2026, 11, 2, 12, 0),
        );
        assert_eq!(
            got,
            vec![
                utc(2026, 10, 31, 5, 30),
                utc(2026, 11, 1, 5, 30),
                utc(2026, 11, 2, 6, 30)
            ]
        );
    }

    #[test]
    fn resuming_inside_the_repeated_hour_does_not_repeat_a_slot() {
        // Last slot 01:30 EDT (05:30 UTC); the scheduler resumes at 01:45 EST (06:45 UTC),
        // in the hour's second pass. The next slot is the next day's.
        let s = Schedule::parse("30 1 * * *").unwrap();
        let tz = chrono_tz::America::New_York;
        assert_eq!(
            next(&s, tz, utc(2026, 11, 1, 5, 30)),
            Some(utc(2026, 11, 2, 6, 30))
        );
        assert_eq!(
            next(&s, tz, utc(2026, 11, 1, 6, 45)),
            Some(utc(2026, 11, 2, 6, 30))
        );
    }

    #[test]
    fn latest_between_finds_the_last_slot_of_a_long_outage() {
        let s = Schedule::parse("*/2 * * * * *").unwrap();
        let from = utc(2026, 5, 1, 0, 0);
        let to = utc(2026, 5, 4, 0, 0) + chrono::Duration::seconds(1);
        assert_eq!(
            latest_between(&s, Tz::UTC, from, to),
            Some(utc(2026, 5, 4, 0, 0))
        );
        assert_eq!(latest_between(&s, Tz::UTC, from, from), None);
        let monthly = Schedule::parse("@monthly").unwrap();
        assert_eq!(
            latest_between(
                &monthly,
                Tz::UTC,
                utc(2025, 1, 15, 0, 0),
                utc(2026, 5, 4, 0, 0)
            ),
            Some(utc(2026, 5, 1, 0, 0))
        );
    }

    mod properties {
        use super::super::*;
        use chrono::{Offset, TimeZone};
        use proptest::prelude::*;

        const ZONES: [Tz; 5] = [
            chrono_tz::Europe::Berlin,
            chrono_tz::America::New_York,
            // DST moves clocks by 30 minutes here.
            chrono_tz::Australia::Lord_Howe,
            chrono_tz::Asia::Kolkata,
            chrono_tz::UTC,
        ];
        const EXPRS: [&str; 6] = [
            "30 2 * * *",
            "*/15 * * * *",
            "0 * * * *",
            "45 1 * * 0",
            "*/7 1-3 * * *",
            "0 30 2 * * *",
        ];

        fn offset(tz: Tz, t: DateTime<Utc>) -> i32 {
            tz.offset_from_utc_datetime(&t.naive_utc())
                .fix()
                .local_minus_utc()
        }

        proptest! {
            #[test]
            fn slots_increase_and_each_wall_time_fires_once(
                zone in 0..ZONES.len(),
                expr in 0..EXPRS.len(),
                start in 1_735_689_600i64..1_830_297_600i64,
            ) {
                let (tz, schedule) = (ZONES[zone], Schedule::parse(EXPRS[expr]).unwrap());
                let from = DateTime::from_timestamp(start, 0).unwrap();
                let slots: Vec<DateTime<Utc>> = after(&schedule, tz, from).take(300).collect();
                prop_assert!(slots.first().is_none_or(|&s| s > from));
                for pair in slots.windows(2) {
                    prop_assert!(pair[0] < pair[1]);
                }
                let mut walls = std::collections::BTreeSet::new();
                for &slot in &slots {
                    let wall = slot.with_timezone(&tz).naive_local();
                    prop_assert!(walls.insert(wall), "wall time {wall} fired twice");
                    // A slot is a scheduled wall time, or the instant a gap ended (standing in
                    // for a skipped wall time).
                    let scheduled = schedule.includes(wall.and_utc());
                    let gap_end = offset(tz, slot - chrono::Duration::seconds(1)) < offset(tz, slot);
                    prop_assert!(scheduled || gap_end, "{slot} ({wall} local) is no slot");
                }
            }
        }
    }
}
