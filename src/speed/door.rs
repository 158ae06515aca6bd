//! The door: NDJSON/CSV bytes in — decoded by the plan, rejections to the dead-letter area,
//! duplicates within `dedupe_window` dropped — and out only once every accepted event is
//! durable in the write-ahead log, one log record per event ([`super::record`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use polars::prelude::*;
use serde::Serialize;

use super::record::encode_record;
use super::runtime::{Batch, PipelineRuntime};
use crate::clock::now_ms;
use crate::lake;
use crate::plan::Decoded;

/// What the door answers for one request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestReport {
    pub accepted: u64,
    pub rejected: u64,
    /// Dropped as already acknowledged within `dedupe_window` (not an error).
    pub duplicates: u64,
    pub errors: Vec<LineError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

impl PipelineRuntime {
    /// The door: NDJSON/CSV bytes in; returns after every accepted event is durable.
    pub async fn ingest(&self, body: Bytes) -> anyhow::Result<IngestReport> {
        let plan = self.plan();
        let decoded = if body.len() > 64 * 1024 {
            let b = body.clone();
            tokio::task::spawn_blocking(move || plan.decode(&b)).await?
        } else {
            plan.decode(&body)
        };
        let mut report = IngestReport::default();
        let arrival = now_ms();
        if !decoded.rejected.is_empty() {
            self.dead_letter(&decoded, arrival).await?;
            report.rejected = decoded.rejected.len() as u64;
            report.errors = decoded
                .rejected
                .iter()
                .map(|r| LineError {
                    line: r.line,
                    reason: r.reason.clone(),
                })
                .collect();
            self.counters
                .rejected
                .fetch_add(report.rejected, Ordering::Relaxed);
            self.counters
                .rejected_unsealed
                .fetch_add(report.rejected, Ordering::Relaxed);
        }
        let Decoded {
            mut events,
            records: mut sources,
            header,
            ..
        } = decoded;
        anyhow::ensure!(
            sources.len() == events.height(),
            "decoder returned {} events for {} records",
            events.height(),
            sources.len()
        );
        let header = header.and_then(|h| body.get(h));

        // De-duplicate at the door.
        let mut admitted_ids: Vec<Vec<u8>> = Vec::new();
        if let (Some(d), Some(id_col)) = (&self.dedupe, &self.pipeline.event_id) {
            let ids = id_strings(&events, id_col)?;
            let mut keep = Vec::with_capacity(ids.len());
            let mut d = d.lock();
            for id in &ids {
                let new = match id {
                    Some(id) => d.admit(id.as_bytes(), arrival),
                    None => true,
                };
                if new && let Some(id) = id {
                    admitted_ids.push(id.as_bytes().to_vec());
                }
                keep.push(new);
            }
            drop(d);
            let dups = keep.iter().filter(|k| !**k).count() as u64;
            if dups > 0 {
                let mask = BooleanChunked::from_slice("keep".into(), &keep);
                events = events.filter(&mask)?;
                let mut it = keep.iter();
                sources.retain(|_| *it.next().unwrap_or(&true));
                report.duplicates = dups;
                self.counters.duplicates.fetch_add(dups, Ordering::Relaxed);
            }
        }
        if events.height() == 0 {
            return Ok(report);
        }
        let records: Vec<Vec<u8>> = sources
            .into_iter()
            .map(|r| encode_record(arrival, header, &body[r]))
            .collect();
        let n = records.len() as u64;
        let acked = Arc::new(OnceLock::new());
        let appended = self
            .log
            .append(
                records,
                Batch {
                    events,
                    acked: Some(acked.clone()),
                },
            )
            .await;
        let range = match appended {
            Ok(range) => range,
            Err(e) => {
                if let Some(d) = &self.dedupe {
                    let mut d = d.lock();
                    admitted_ids.iter().for_each(|id| d.forget(id));
                }
                return Err(e.into());
            }
        };
        let _ = acked.set(Instant::now());
        self.logged_end.fetch_max(range.end, Ordering::AcqRel);
        report.accepted = n;
        self.counters.accepted.fetch_add(n, Ordering::Relaxed);
        Ok(report)
    }

    async fn dead_letter(&self, decoded: &Decoded, arrival: i64) -> anyhow::Result<()> {
        let mut body = String::new();
        for r in &decoded.rejected {
            let rec = serde_json::json!({"line": r.line, "reason": r.reason, "raw": r.raw, "received_at": crate::clock::format_ms(arrival)});
            body.push_str(&rec.to_string());
            body.push('\n');
        }
        let path = lake::dead_letter_path(&self.pipeline.name, arrival, &uuid_like());
        self.lake
            .put(&path, Bytes::from(body))
            .await
            .with_context(|| format!("writing dead letters to {path}"))?;
        Ok(())
    }
}

/// A unique-enough suffix for dead-letter files (time + counter + process id).
fn uuid_like() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The event ids of `events` as strings (`None` where an event has none).
pub(super) fn id_strings(events: &DataFrame, col: &str) -> anyhow::Result<Vec<Option<String>>> {
    let c = events.column(col)?.cast(&DataType::String)?;
    Ok(c.str()?.iter().map(|v| v.map(str::to_string)).collect())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::speed::testing::{Project, served, spec, wait_for};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn csv_records_spanning_lines_and_unterminated_quotes_are_logged_and_replayed() {
        let mut p = Project::new(&spec("csv", "1h")).await;
        let rt = p.start().await;
        let body = "ts,country,amount\n1700000000000,\"D\nE\",1.5\n1700000000001,US,2\n";
        let r = rt.ingest(Bytes::from(body)).await.unwrap();
        assert_eq!((r.accepted, r.rejected), (2, 0));
        // An unterminated quote rejects its own record; the rest of the request counts.
        let body = "\u{feff}amount,ts,country\n4,1700000000002,\"FR\n8,1700000000003,JP\r\n16,1700000000004,IT\n";
        let r = rt.ingest(Bytes::from(body)).await.unwrap();
        assert_eq!((r.accepted, r.rejected), (2, 1), "{r:?}");
        assert_eq!(r.errors[0].line, 2);
        assert_eq!(r.errors[0].reason, "unterminated quoted field");
        wait_for("absorbed", async || served(&rt).0 == 4).await;
        assert_eq!(served(&rt), (4, 27.5));
        // Replayed from the log after a restart: the same events.
        let rt = p.start().await;
        wait_for("replayed", async || served(&rt).0 == 4).await;
        assert_eq!(served(&rt), (4, 27.5));
        p.shutdown.cancel();
    }
}
