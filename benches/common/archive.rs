//! Archived events for the batch benches, written as the speed layer seals them: Parquet
//! segments in the lake and their rows in the state DB's segment manifest. Every event has
//! `ts`, `user`, `country`, `page` and `amount`; a spec reads the columns it declares (the
//! scans project the rest away).

use lambda_ctl::lake::{self, Lake};
use lambda_ctl::state::{Segment, State};
use polars::prelude::*;

/// The benches' pipeline (`name: bench`): three views over one day of events.
pub const SPEC: &str = r#"
name: bench
source:
  type: http
schema:
  ts: timestamp
  user: string
  country: string
  amount: float
event_time: ts
filter: "amount >= 0"
views:
  - name: per_minute
    group_by: [country]
    window: 1m
    metrics:
      n: count()
      total: sum(amount)
  - name: per_country
    group_by: [country]
    window: all
    metrics:
      n: count()
      lo: min(amount)
      hi: max(amount)
  - name: per_user
    group_by: [user]
    window: all
    metrics:
      n: count()
      mean: avg(amount)
"#;

const BASE_MS: i64 = 1_763_719_200_000;

/// Writes `events` pseudo-random events of one day in segments of `segment_rows` into
/// partition 0 of every pipeline of `pipelines` (the same bytes under each); the number of
/// segments each. Every segment holds events from all of the day (a backfill, the worst case
/// for a group-by that keeps the groups it saw last at hand), or with `arrival` the day's next
/// slice, as the speed layer seals events arriving in time.
pub async fn archive(
    lake: &Lake,
    state: &State,
    pipelines: &[String],
    (events, segment_rows): (usize, usize),
    arrival: bool,
) -> anyhow::Result<usize> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let (mut lo, mut segments) = (0usize, 0usize);
    let slice = DAY_MS / events.div_ceil(segment_rows).max(1) as i64;
    while lo < events {
        let n = segment_rows.min(events - lo);
        let (from, span) = match arrival {
            true => (BASE_MS + segments as i64 * slice, slice),
            false => (BASE_MS, DAY_MS),
        };
        let df = events_frame(&mut x, lo, n, (from, span))?;
        seal(lake, state, pipelines, lo as u64, df, (from, from + span)).await?;
        lo += n;
        segments += 1;
    }
    Ok(segments)
}

/// Seals one more segment of `events` live events into partition 0 of `pipeline`, after
/// everything archived: their event times in the `span_ms` after the latest event archived,
/// as the speed layer seals what arrives now.
pub async fn append_live(
    lake: &Lake,
    state: &State,
    pipeline: &str,
    events: usize,
    span_ms: i64,
) -> anyhow::Result<()> {
    let segments = state.segments(pipeline).await?;
    let lo = segments.iter().map(|s| s.hi).max().unwrap_or(0);
    let from = segments
        .iter()
        .filter_map(|s| s.max_event_ms)
        .max()
        .unwrap_or(BASE_MS);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ lo;
    let df = events_frame(&mut x, lo as usize, events, (from, span_ms))?;
    let names = [pipeline.to_string()];
    seal(lake, state, &names, lo, df, (from, from + span_ms)).await
}

const DAY_MS: i64 = 86_400_000;

/// `n` pseudo-random events (offsets from `lo`), their event times in `[from, from + span)`.
fn events_frame(
    x: &mut u64,
    lo: usize,
    n: usize,
    (from, span): (i64, i64),
) -> anyhow::Result<DataFrame> {
    let countries = ["DE", "US", "FR", "JP", "BR", "IN", "CN", "GB"];
    let (mut ts, mut user, mut country, mut page, mut amount) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for _ in 0..n {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        let x = *x;
        ts.push(from + (x % span as u64) as i64);
        user.push(format!("u{}", (x >> 20) % 100_000));
        country.push(countries[((x >> 40) % 8) as usize]);
        // 100 pages, skewed as real traffic is: /p0 gets a tenth of the views, /p99 few.
        let r = (x >> 44) % 1000;
        page.push(format!("/p{}", r * r / 10_000));
        amount.push(((x >> 8) % 100_000) as f64 / 100.0 - 10.0);
    }
    let offsets: Vec<i64> = (lo as i64..(lo + n) as i64).collect();
    let mut df = df!("ts" => ts, "user" => user, "country" => country,
        "page" => page, "amount" => amount, "_offset" => offsets)?;
    let t = df
        .column("ts")?
        .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?;
    df.with_column(t)?;
    Ok(df)
}

/// Writes `df` as the segment at `lo` of each of `pipelines` and records it sealed.
async fn seal(
    lake: &Lake,
    state: &State,
    pipelines: &[String],
    lo: u64,
    mut df: DataFrame,
    (min_ms, max_ms): (i64, i64),
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf)
        .with_compression(ParquetCompression::Zstd(None))
        .finish(&mut df)?;
    let buf = bytes::Bytes::from(buf);
    let (rows, hi) = (df.height() as u64, lo + df.height() as u64);
    for pipeline in pipelines {
        let path = lake::archive_path(pipeline, 0, lo, hi);
        lake.put(&path, buf.clone()).await?;
        state
            .seal_segment(&Segment {
                pipeline: pipeline.clone(),
                partition: 0,
                lo,
                hi,
                path,
                rows,
                bytes: buf.len() as u64,
                dead_letters: 0,
                min_event_ms: Some(min_ms),
                max_event_ms: Some(max_ms),
                lookups: None,
                crc32: Some(crc32fast::hash(&buf)),
            })
            .await?;
    }
    Ok(())
}
