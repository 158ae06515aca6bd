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

/// Writes `events` pseudo-random events in segments of `segment_rows` into partition 0 of
/// every pipeline of `pipelines` (the same bytes under each); the number of segments each.
pub async fn archive(
    lake: &Lake,
    state: &State,
    pipelines: &[String],
    events: usize,
    segment_rows: usize,
) -> anyhow::Result<usize> {
    let countries = ["DE", "US", "FR", "JP", "BR", "IN", "CN", "GB"];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let (mut lo, mut segments) = (0usize, 0usize);
    while lo < events {
        let n = segment_rows.min(events - lo);
        let (mut ts, mut user, mut country, mut page, mut amount) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ts.push(BASE_MS + (x % 86_400_000) as i64);
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
        let mut buf = Vec::new();
        ParquetWriter::new(&mut buf)
            .with_compression(ParquetCompression::Zstd(None))
            .finish(&mut df)?;
        let buf = bytes::Bytes::from(buf);
        let (from, to) = (lo as u64, (lo + n) as u64);
        for pipeline in pipelines {
            let path = lake::archive_path(pipeline, 0, from, to);
            lake.put(&path, buf.clone()).await?;
            state
                .seal_segment(&Segment {
                    pipeline: pipeline.clone(),
                    partition: 0,
                    lo: from,
                    hi: to,
                    path,
                    rows: n as u64,
                    bytes: buf.len() as u64,
                    dead_letters: 0,
                    min_event_ms: Some(BASE_MS),
                    max_event_ms: Some(BASE_MS + 86_400_000),
                    lookups: None,
                    crc32: Some(crc32fast::hash(&buf)),
                })
                .await?;
        }
        lo += n;
        segments += 1;
    }
    Ok(segments)
}
