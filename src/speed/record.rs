//! The write-ahead log's records: how the door writes one event (with its request's arrival
//! time and, for CSV, header), how replay reads them back into events, and the archive columns
//! that carry an event's log position and arrival time.

use std::ops::Range;

use anyhow::Context;
use polars::prelude::*;

use crate::plan::Plan;

/// Archive columns added to the schema's: the event's position and arrival time.
pub const OFFSET_COLUMN: &str = "_offset";
pub const ARRIVAL_COLUMN: &str = "_arrival";

/// The event-time range (epoch ms, as the column casts to integers) of a segment's events in
/// `col`, as its manifest row records it: `None`s when there is no non-null time.
pub fn time_range(df: &DataFrame, col: &str) -> PolarsResult<(Option<i64>, Option<i64>)> {
    let c = df.column(col)?.cast(&DataType::Int64)?;
    let ca = c.i64()?;
    Ok((ca.min(), ca.max()))
}

/// Log record (version 2): `!arrival_ms` as i64 LE — negative, which tells it from a version 1
/// record, whose arrival time comes first as is —, a flags byte ([`HAS_HEADER`]), then for CSV
/// the length (u32 LE) and bytes of the request's header, then the event's record as the door
/// decoded it, line break included. Each record replays on its own: requests that arrived in the same millisecond,
/// with different headers, a byte order mark or records spanning lines, decode as they did.
pub(super) fn encode_record(arrival_ms: i64, header: Option<&[u8]>, record: &[u8]) -> Vec<u8> {
    let header_len = header.map_or(0, |h| 4 + h.len());
    let mut r = Vec::with_capacity(9 + header_len + record.len());
    r.extend_from_slice(&(!arrival_ms).to_le_bytes());
    match header {
        Some(h) => {
            r.push(HAS_HEADER);
            // A header beyond 4 GiB cannot have passed the door's body limit.
            r.extend_from_slice(&u32::try_from(h.len()).unwrap_or(u32::MAX).to_le_bytes());
            r.extend_from_slice(h);
        }
        None => r.push(0),
    }
    r.extend_from_slice(record);
    r
}

/// Flag of a version 2 log record: a CSV header precedes the record.
const HAS_HEADER: u8 = 1;

/// Sets a version 2 record's arrival time: the log's writer stamps each request as it writes
/// it ([`super::log::Stamper`]), so arrival times follow positions.
pub(super) fn stamp_record(record: &mut [u8], arrival_ms: i64) {
    record[..8].copy_from_slice(&(!arrival_ms).to_le_bytes());
}

/// A log record, parsed.
#[derive(PartialEq)]
enum LogRecord<'a> {
    /// Version 1 (before requests were kept apart): the event's line, for CSV prefixed with
    /// the header and a newline.
    V1 { arrival: i64, line: &'a [u8] },
    V2 {
        arrival: i64,
        header: Option<&'a [u8]>,
        record: &'a [u8],
    },
}

impl<'a> LogRecord<'a> {
    fn parse(offset: u64, bytes: &'a [u8]) -> anyhow::Result<LogRecord<'a>> {
        let bad = || anyhow::anyhow!("write-ahead log record {offset} is malformed");
        let head: [u8; 8] = bytes
            .get(..8)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(bad)?;
        let stamp = i64::from_le_bytes(head);
        if stamp >= 0 {
            return Ok(LogRecord::V1 {
                arrival: stamp,
                line: &bytes[8..],
            });
        }
        let flags = *bytes.get(8).ok_or_else(bad)?;
        let (header, rest) = if flags & HAS_HEADER != 0 {
            let len: [u8; 4] = bytes
                .get(9..13)
                .and_then(|l| l.try_into().ok())
                .ok_or_else(bad)?;
            let end = 13 + u32::from_le_bytes(len) as usize;
            (Some(bytes.get(13..end).ok_or_else(bad)?), &bytes[end..])
        } else {
            (None, &bytes[9..])
        };
        Ok(LogRecord::V2 {
            arrival: !stamp,
            header,
            record: rest,
        })
    }

    fn arrival(&self) -> i64 {
        match self {
            LogRecord::V1 { arrival, .. } | LogRecord::V2 { arrival, .. } => *arrival,
        }
    }

    /// Whether `other` decodes in one body with `self` (as the next record).
    fn joins(&self, other: &LogRecord) -> bool {
        match (self, other) {
            (LogRecord::V1 { arrival: a, .. }, LogRecord::V1 { arrival: b, .. }) => a == b,
            (
                LogRecord::V2 {
                    arrival: a,
                    header: h,
                    ..
                },
                LogRecord::V2 {
                    arrival: b,
                    header: g,
                    ..
                },
            ) => a == b && h == g,
            _ => false,
        }
    }
}

/// Decodes replayed log records back into events (with their original arrival times).
pub(super) fn decode_records(plan: &Plan, records: &[(u64, Vec<u8>)]) -> anyhow::Result<DataFrame> {
    let csv = plan.pipeline().format == crate::spec::Format::Csv;
    let parsed: Vec<LogRecord> = records
        .iter()
        .map(|(offset, bytes)| LogRecord::parse(*offset, bytes))
        .collect::<anyhow::Result<_>>()?;
    let mut frames = Vec::new();
    // Runs of records that decode together: one body per run.
    let mut i = 0;
    while i < parsed.len() {
        let mut j = i + 1;
        while j < parsed.len() && parsed[i].joins(&parsed[j]) {
            j += 1;
        }
        let mut body = Vec::new();
        for (k, rec) in parsed[i..j].iter().enumerate() {
            match rec {
                LogRecord::V2 { header, record, .. } => {
                    if let (0, Some(h)) = (k, header) {
                        body.extend_from_slice(h);
                        body.push(b'\n');
                    }
                    // With its own line break (which the last one of a request may lack).
                    body.extend_from_slice(record);
                    if !record.ends_with(b"\n") {
                        body.push(b'\n');
                    }
                    continue;
                }
                // Version 1 records of one arrival time came from one request (as far as
                // that version knew); each CSV record carries its header: keep the first.
                LogRecord::V1 { line, .. } if csv && k > 0 => {
                    let data = line.splitn(2, |b| *b == b'\n').nth(1).unwrap_or_default();
                    body.extend_from_slice(data);
                }
                LogRecord::V1 { line, .. } => body.extend_from_slice(line),
            }
            body.push(b'\n');
        }
        let decoded = plan.decode_logged(&body);
        anyhow::ensure!(
            decoded.rejected.is_empty() && decoded.events.height() == j - i,
            "write-ahead log records {}..{} no longer decode ({} rejected); was the pipeline schema changed?",
            records[i].0,
            records[j - 1].0 + 1,
            decoded.rejected.len()
        );
        frames.push(with_positions(
            decoded.events,
            records[i].0..records[j - 1].0 + 1,
            parsed[i].arrival(),
        )?);
        i = j;
    }
    // Positions are re-added by the aggregator.
    Ok(concat_frames(frames)?.drop_many([OFFSET_COLUMN]))
}

/// `events` at the log positions `range`, with their arrival time (replayed events keep the
/// one they were logged with), in the archive's column order.
pub(super) fn with_positions(
    mut events: DataFrame,
    range: Range<u64>,
    arrival_ms: i64,
) -> anyhow::Result<DataFrame> {
    let n = events.height();
    anyhow::ensure!(
        n as u64 == range.end - range.start,
        "{} events for positions {range:?}",
        n
    );
    let offsets: Vec<i64> = (range.start..range.end).map(|o| o as i64).collect();
    events.with_column(Column::new(OFFSET_COLUMN.into(), offsets))?;
    // Replayed events keep the arrival time they were logged with.
    if events.column(ARRIVAL_COLUMN).is_err() {
        let arrival = Column::new(ARRIVAL_COLUMN.into(), vec![arrival_ms; n])
            .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?;
        events.with_column(arrival)?;
    }
    // One column order for fresh and replayed events, so their frames stack into a segment.
    let mut order: Vec<PlSmallStr> = events
        .get_column_names()
        .into_iter()
        .filter(|c| c.as_str() != OFFSET_COLUMN && c.as_str() != ARRIVAL_COLUMN)
        .cloned()
        .collect();
    order.extend([OFFSET_COLUMN.into(), ARRIVAL_COLUMN.into()]);
    Ok(events.select(order)?)
}

/// The frames stacked into one.
pub(super) fn concat_frames(frames: Vec<DataFrame>) -> anyhow::Result<DataFrame> {
    let mut it = frames.into_iter();
    let mut out = it.next().context("no events")?;
    for f in it {
        out.vstack_mut_owned(f)?;
    }
    out.rechunk_mut();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speed::testing::{Project, spec};

    /// The log records the door writes for `body`.
    fn door_records(plan: &Plan, arrival: i64, body: &[u8]) -> Vec<Vec<u8>> {
        let d = plan.decode(body);
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
        let header = d.header.clone().map(|h| &body[h]);
        d.records
            .iter()
            .map(|r| encode_record(arrival, header, &body[r.clone()]))
            .collect()
    }

    fn replay(plan: &Plan, records: Vec<Vec<u8>>) -> DataFrame {
        let records: Vec<(u64, Vec<u8>)> = records
            .into_iter()
            .enumerate()
            .map(|(i, r)| (i as u64, r))
            .collect();
        decode_records(plan, &records).unwrap()
    }

    #[tokio::test]
    async fn requests_of_one_millisecond_replay_as_each_was_decoded() {
        let csv = Project::new(&spec("csv", "1h")).await;
        let arrival = 1_700_000_000_000;
        // Two requests, one millisecond, different headers; the second with a byte order mark.
        let a = "ts,country,amount\n1,DE,1.5\n2,\"U\nS\",2\n";
        let b = "\u{feff}amount,ts,country\n4,3,FR\r\r\n8,4,JP";
        let mut records = door_records(&csv.plan, arrival, a.as_bytes());
        records.extend(door_records(&csv.plan, arrival, b.as_bytes()));
        let events = replay(&csv.plan, records);
        let amounts: Vec<Option<f64>> = events
            .column("amount")
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(amounts, [Some(1.5), Some(2.0), Some(4.0), Some(8.0)]);
        let countries: Vec<Option<&str>> = events
            .column("country")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .collect();
        // Exactly as the door read them: a value spanning lines, a carriage return kept.
        assert_eq!(
            countries,
            [Some("DE"), Some("U\nS"), Some("FR\r"), Some("JP")]
        );

        let json = Project::new(&spec("json", "1h")).await;
        let a = "{\"ts\": 1, \"country\": \"DE\", \"amount\": 1}\n";
        let b = "\u{feff}{\"ts\": 2, \"country\": \"US\", \"amount\": 2}\n";
        let mut records = door_records(&json.plan, arrival, a.as_bytes());
        records.extend(door_records(&json.plan, arrival, b.as_bytes()));
        assert_eq!(replay(&json.plan, records).height(), 2);
    }

    #[tokio::test]
    async fn version_1_log_records_still_replay() {
        let p = Project::new(&spec("csv", "1h")).await;
        let v1 = |arrival: i64, line: &str| {
            let mut r = arrival.to_le_bytes().to_vec();
            r.extend_from_slice(line.as_bytes());
            r
        };
        let records = vec![
            v1(5, "ts,country,amount\n1,DE,1"),
            v1(5, "ts,country,amount\n2,US,2"),
            v1(6, "amount,ts,country\n4,3,FR"),
        ];
        let events = replay(&p.plan, records);
        let amounts: Vec<Option<f64>> = events
            .column("amount")
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(amounts, [Some(1.0), Some(2.0), Some(4.0)]);
        let arrivals = events
            .column(ARRIVAL_COLUMN)
            .unwrap()
            .cast(&DataType::Int64)
            .unwrap();
        let arrivals: Vec<Option<i64>> = arrivals.i64().unwrap().iter().collect();
        assert_eq!(arrivals, [Some(5), Some(5), Some(6)]);
    }
}
