//! The door: NDJSON/CSV bytes in — decoded by the plan, rejections to the dead-letter area,
//! duplicates within `dedupe_window` dropped, each event routed to its partition — and out
//! only once every accepted event is durable in its partition's write-ahead log, one log
//! record per event ([`super::record`]).

use std::collections::BTreeMap;
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
use crate::plan::{Decoded, Rejection};

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
    /// The door: NDJSON/CSV bytes in; returns after every accepted event is durable — in the
    /// partitions' logs, or with a `buffer`, in the broker ([`Forward`]).
    pub async fn ingest(&self, body: Bytes) -> anyhow::Result<IngestReport> {
        if let Some(forward) = self.forward.get() {
            return forward.forward(self, body).await;
        }
        self.ingest_into(body, None).await
    }

    /// A pipeline's `buffer` takes what the door accepts from now on ([`Self::ingest`]).
    pub fn forward_to(&self, forward: Arc<dyn Forward>) {
        let _ = self.forward.set(forward);
    }

    /// For a `buffer`: decodes `body` as the door does, writing the rejected lines to the
    /// dead-letter area; returns the report so far and, per accepted event, its key (the
    /// `partition_key` or `event_id` value), the pipeline partition it belongs to
    /// (`crc32(key) mod partitions`; without a key, the request's events go together to the
    /// next partition in turn) and its record as it came. Nothing is logged.
    pub async fn accept(&self, body: &Bytes) -> anyhow::Result<(IngestReport, Vec<Accepted>)> {
        let plan = self.plan();
        let b = body.clone();
        let decoded = tokio::task::spawn_blocking(move || plan.decode(&b)).await?;
        let mut report = IngestReport::default();
        if !decoded.rejected.is_empty() {
            self.reject(&decoded, &mut report).await?;
        }
        let keys = match self.pipeline.partition_column() {
            Some(column) => id_strings(&decoded.events, column)?,
            None => vec![None; decoded.events.height()],
        };
        let partitions = (self.pipeline.partitions as usize).max(1);
        let turn = self.next_lane.fetch_add(1, Ordering::Relaxed) % partitions;
        let records = keys
            .into_iter()
            .zip(&decoded.records)
            .map(|(key, r)| Accepted {
                partition: key.as_deref().map_or(turn, |k| partition_of(k, partitions)),
                key,
                record: body.slice(r.clone()),
            })
            .collect();
        Ok((report, records))
    }

    /// Dead-letters what a source refused before the door (each with its reason), counted
    /// as rejected events.
    pub async fn reject_records(&self, rejected: &[Rejection]) -> anyhow::Result<()> {
        if rejected.is_empty() {
            return Ok(());
        }
        self.dead_letter(rejected, now_ms()).await?;
        let n = rejected.len() as u64;
        self.counters.rejected.fetch_add(n, Ordering::Relaxed);
        self.counters
            .rejected_unsealed
            .fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Dead-letters the lines `decoded` rejected and counts them in `report`.
    async fn reject(&self, decoded: &Decoded, report: &mut IngestReport) -> anyhow::Result<()> {
        let arrival = now_ms();
        self.dead_letter(&decoded.rejected, arrival).await?;
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
        Ok(())
    }

    /// [`Self::ingest`], every event into the partition of index `lane` of
    /// [`PipelineRuntime::lanes`] when given (a broker source whose own partitions map to the
    /// pipeline's), instead of by its key.
    pub async fn ingest_into(
        &self,
        body: Bytes,
        lane: Option<usize>,
    ) -> anyhow::Result<IngestReport> {
        if let Some(node) = self.node() {
            let partition = lane.and_then(|i| self.lanes.get(i)).map(|l| l.partition);
            anyhow::ensure!(
                partition.is_some_and(|p| self.owns(p)),
                "node `{node}` does not run partition {partition:?} of pipeline `{}`",
                self.pipeline.name
            );
        }
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
            self.reject(&decoded, &mut report).await?;
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
        let mut ids: Option<Vec<Option<String>>> = None;
        if let (Some(d), Some(id_col)) = (&self.dedupe, &self.pipeline.event_id) {
            let mut all = id_strings(&events, id_col)?;
            let mut keep = Vec::with_capacity(all.len());
            let mut d = d.lock();
            for id in &all {
                keep.push(id.as_ref().is_none_or(|id| d.admit(id.as_bytes(), arrival)));
            }
            drop(d);
            let dups = keep.iter().filter(|k| !**k).count() as u64;
            if dups > 0 {
                let mask = BooleanChunked::from_slice("keep".into(), &keep);
                events = events.filter(&mask)?;
                let mut it = keep.iter();
                sources.retain(|_| *it.next().unwrap_or(&true));
                let mut it = keep.iter();
                all.retain(|_| *it.next().unwrap_or(&true));
                report.duplicates = dups;
                self.counters.duplicates.fetch_add(dups, Ordering::Relaxed);
            }
            ids = Some(all);
        }
        if events.height() == 0 {
            return Ok(report);
        }
        let records = sources
            .into_iter()
            .map(|r| encode_record(arrival, header, &body[r]));

        // To the partitions' logs, all at once; acknowledged once every one is durable.
        let lanes = match lane {
            Some(lane) if lane < self.lanes.len() => vec![lane; events.height()],
            Some(lane) => anyhow::bail!("no partition of index {lane} runs here"),
            None => self.route(&events, ids.as_deref())?,
        };
        let mut by_lane: BTreeMap<usize, (Vec<IdxSize>, Vec<Vec<u8>>)> = BTreeMap::new();
        for (row, (lane, record)) in lanes.iter().zip(records).enumerate() {
            let (rows, records) = by_lane.entry(*lane).or_default();
            rows.push(row as IdxSize);
            records.push(record);
        }
        let acked = Arc::new(OnceLock::new());
        let whole = by_lane.len() == 1;
        let mut appends = Vec::with_capacity(by_lane.len());
        for (lane, (rows, records)) in by_lane {
            let events = if whole {
                events.clone()
            } else {
                events.take(&IdxCa::from_vec("rows".into(), rows))?
            };
            let n = records.len() as u64;
            let batch = Batch {
                events,
                acked: Some(acked.clone()),
            };
            let log = &self.lanes[lane].log;
            appends.push(async move { (lane, n, log.append(records, batch).await) });
        }
        let mut failed = None;
        for (lane, n, appended) in futures::future::join_all(appends).await {
            match appended {
                Ok(range) => {
                    self.lanes[lane]
                        .logged_end
                        .fetch_max(range.end, Ordering::AcqRel);
                    report.accepted += n;
                }
                Err(e) => {
                    // Not durable: these ids may come again.
                    if let (Some(d), Some(ids)) = (&self.dedupe, &ids) {
                        let mut d = d.lock();
                        let lost = ids.iter().zip(&lanes).filter(|(_, l)| **l == lane);
                        lost.filter_map(|(id, _)| id.as_ref())
                            .for_each(|id| d.forget(id.as_bytes()));
                    }
                    failed.get_or_insert(e);
                }
            }
        }
        let _ = acked.set(Instant::now());
        self.counters
            .accepted
            .fetch_add(report.accepted, Ordering::Relaxed);
        match failed {
            // Those of other partitions are durable, and counted; a retry of the request
            // finds them as duplicates (with `event_id`).
            Some(e) => Err(e.into()),
            None => Ok(report),
        }
    }

    /// The lane of each of `events` (whose ids, if the pipeline has `event_id`, are `ids`):
    /// by the CRC-32 of its key (`partition_key`, by default `event_id`) among the
    /// `partitions` routed to; an event without one, or a pipeline without a key column,
    /// takes the request's lane — the next partition in turn.
    fn route(
        &self,
        events: &DataFrame,
        ids: Option<&[Option<String>]>,
    ) -> anyhow::Result<Vec<usize>> {
        let routed = (self.pipeline.partitions as usize)
            .min(self.lanes.len())
            .max(1);
        if routed == 1 {
            return Ok(vec![0; events.height()]);
        }
        let turn = self.next_lane.fetch_add(1, Ordering::Relaxed) % routed;
        let keys = match (&self.pipeline.partition_key, ids) {
            (Some(key), _) => id_strings(events, key)?,
            (None, Some(ids)) => ids.to_vec(),
            (None, None) => return Ok(vec![turn; events.height()]),
        };
        Ok(keys
            .iter()
            .map(|k| k.as_ref().map_or(turn, |k| partition_of(k, routed)))
            .collect())
    }

    async fn dead_letter(&self, rejected: &[Rejection], arrival: i64) -> anyhow::Result<()> {
        let mut body = String::new();
        for r in rejected {
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

/// An event a `buffer` takes ([`PipelineRuntime::accept`]).
pub struct Accepted {
    /// Its `partition_key` or `event_id` value.
    pub key: Option<String>,
    /// The pipeline partition it belongs to.
    pub partition: usize,
    /// Its record as it came.
    pub record: Bytes,
}

/// Where a pipeline's door sends what it accepts instead of its own logs: a `buffer` (a
/// broker the speed layer consumes). Implemented by the sources, which know the brokers.
pub trait Forward: Send + Sync {
    /// Takes `body` for `rt` (see [`PipelineRuntime::accept`]); returns once the broker has
    /// every accepted event.
    fn forward<'a>(
        &'a self,
        rt: &'a PipelineRuntime,
        body: Bytes,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<IngestReport>>;
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

/// The partition among `partitions` of an event whose key is `key`: the CRC-32 (IEEE) of its
/// UTF-8 bytes modulo `partitions`.
pub fn partition_of(key: &str, partitions: usize) -> usize {
    crc32fast::hash(key.as_bytes()) as usize % partitions
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
