//! `verify`: what the archive holds is what was sealed, and the two engines agree on it.
//!
//! - **The archive**: each checked segment's file has the size and CRC-32 its manifest row
//!   recorded, decodes, holds exactly one event per position of `[lo, hi)` in order, and its
//!   event times lie in the recorded range. A damaged or swapped file is named.
//! - **The engines**: the batch engine scans the intact segments at once; the speed engine
//!   computes partials per segment and merges them with the accumulator, as a server does. Any
//!   difference is a bug in one of them. Both compute the events the checks decoded (held in
//!   memory meanwhile), never the files again: one damaged after its check is not read.
//!
//! A check reads every sealed segment or a random [`Sample`] of them (a workflow's `verify`
//! task on a large archive); its result is recorded in the state DB ([`record`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use polars::prelude::*;

use super::scan;
use crate::lake::{Lake, LakeError};
use crate::plan::Plan;
use crate::spec::Sample;
use crate::speed::lookups::Lookups;
use crate::speed::record::{OFFSET_COLUMN, time_range};
use crate::state::{RunId, Segment, State, Verification};

/// Relative tolerance for floating-point results: the engines sum in different orders.
const REL_TOL: f64 = 1e-9;

/// Segments read and checked at once.
const READ_AHEAD: usize = 4;

/// The outcome for one view.
#[derive(Debug, Clone)]
pub struct ViewCheck {
    pub view: String,
    pub rows: usize,
    /// Human-readable differences; empty when the engines agree.
    pub differences: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub started_at: DateTime<Utc>,
    /// Sealed segments checked (of `sealed`), and their events.
    pub segments: usize,
    pub sealed: usize,
    pub events: u64,
    /// Segments whose file is not what was sealed, one line each; the engines compared the
    /// others.
    pub damaged: Vec<String>,
    pub views: Vec<ViewCheck>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.damaged.is_empty() && self.views.iter().all(|v| v.differences.is_empty())
    }

    /// What the problems mean and what to do about them; `None` when there are none.
    pub fn verdict(&self) -> Option<String> {
        let mut out = Vec::new();
        if !self.damaged.is_empty() {
            out.push(format!(
                "{} archived segment(s) are not what was sealed: restore those files from a copy of the lake, then verify again (a batch run that reads them would compute from damaged events)",
                self.damaged.len()
            ));
        }
        if self.views.iter().any(|v| !v.differences.is_empty()) {
            out.push(
                "the batch and speed engines disagree: a bug in lambda-ctl; please report it with this output"
                    .to_string(),
            );
        }
        (!out.is_empty()).then(|| out.join("; "))
    }

    /// Every problem found, one line each: damaged segments, then the engines' differences.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.damaged.clone();
        for v in &self.views {
            out.extend(
                v.differences
                    .iter()
                    .map(|d| format!("view {}: engines differ: {d}", v.view)),
            );
        }
        out
    }
}

/// Checks `sample` of the plan's pipeline's sealed segments: their files, then every view
/// over the intact ones in both engines. Problems found are in the report; `Err` means the
/// check itself could not run (state DB unreachable, the plan failed).
pub async fn verify(
    plan: Arc<Plan>,
    state: &State,
    lake: &Lake,
    sample: Sample,
) -> anyhow::Result<Report> {
    let started_at = Utc::now();
    let pipeline = plan.pipeline().name.clone();
    let (_, sealed) = super::sealed(state, &pipeline).await?;
    let chosen = pick(
        &sealed,
        sample,
        started_at.timestamp_nanos_opt().unwrap_or(0) as u64,
    );
    let time = plan.pipeline().event_time.clone();
    let checks: Vec<_> = chosen
        .iter()
        .map(|s| check_segment(lake, s, &time))
        .collect();
    let found: Vec<Result<DataFrame, String>> = futures::stream::iter(checks)
        .buffered(READ_AHEAD)
        .try_collect()
        .await?;
    let mut intact = Vec::with_capacity(chosen.len());
    let mut damaged = Vec::new();
    for (s, checked) in chosen.iter().zip(found) {
        match checked {
            Err(p) => damaged.push(p),
            Ok(events) => intact.push((s.clone(), events)),
        }
    }
    let events = chosen.iter().map(|s| s.rows).sum();
    let lookups = Lookups::reader(plan.pipeline(), lake);
    // The engines compute the events the checks decoded: a file damaged since it was read is
    // never handed to a reader that trusts it.
    let source = scan::decoded_parts(&lookups, intact).await?;
    let views = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<ViewCheck>> {
        let mut out = Vec::new();
        for v in 0..plan.pipeline().views.len() {
            let batch = plan.finish(v, scan::view_partials(&plan, v, &source)?)?;
            let speed = plan.finish(v, scan::speed_partials(&plan, v, &source)?)?;
            out.push(ViewCheck {
                view: plan.pipeline().views[v].name.clone(),
                rows: batch.height(),
                differences: compare(&batch, &speed),
            });
        }
        Ok(out)
    })
    .await??;
    Ok(Report {
        started_at,
        segments: chosen.len(),
        sealed: sealed.len(),
        events,
        damaged,
        views,
    })
}

/// Records `report` as `pipeline`'s latest check (by workflow run `run_id`, if any).
pub async fn record(
    state: &State,
    pipeline: &str,
    run_id: Option<RunId>,
    report: &Report,
) -> anyhow::Result<Verification> {
    Ok(state
        .record_verification(
            pipeline,
            run_id,
            report.segments as u64,
            report.events,
            &report.problems(),
            report.started_at,
        )
        .await?)
}

/// `sample` of `sealed`, in manifest order; a random choice seeded by `seed`.
fn pick(sealed: &[Segment], sample: Sample, seed: u64) -> Vec<Segment> {
    let want = sample.of(sealed.len());
    if want == sealed.len() {
        return sealed.to_vec();
    }
    // A partial Fisher–Yates shuffle of the indices (splitmix64), then manifest order again.
    let mut idx: Vec<usize> = (0..sealed.len()).collect();
    let mut state = seed;
    for i in 0..want {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let j = i + (z % (sealed.len() - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut chosen = idx[..want].to_vec();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| sealed[i].clone()).collect()
}

/// What is wrong with segment `s`'s file, if anything: `Some(problem)` when it cannot be read,
/// is not the bytes sealed, does not decode, or its events are not the positions and times
/// its manifest row records. `Err` only when the check itself could not run.
async fn check_segment(
    lake: &Lake,
    s: &Segment,
    time: &str,
) -> anyhow::Result<Result<DataFrame, String>> {
    let bytes = match lake.get(&s.path).await {
        Ok(b) => b,
        Err(LakeError::NotFound { .. }) => {
            return Ok(Err(format!("segment {} is missing from the lake", s.path)));
        }
        // A store that does not answer says nothing about the segment: the check fails (a
        // task retries it) instead of recording a damage that may not be there.
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading segment {}", s.path))),
    };
    if let Err(p) = s.check_bytes(&bytes) {
        return Ok(Err(p));
    }
    let (s, time) = (s.clone(), time.to_string());
    Ok(tokio::task::spawn_blocking(move || check_events(&s, bytes, &time)).await?)
}

/// The decoded file, if it holds the events of `s`'s manifest row; what is wrong, if not.
pub(crate) fn check_events(
    s: &Segment,
    bytes: bytes::Bytes,
    time: &str,
) -> Result<DataFrame, String> {
    let path = &s.path;
    let df = ParquetReader::new(std::io::Cursor::new(bytes))
        .finish()
        .map_err(|e| format!("segment {path} does not decode: {e}"))?;
    if df.height() as u64 != s.rows {
        return Err(format!(
            "segment {path} holds {} events, its manifest row {}",
            df.height(),
            s.rows
        ));
    }
    let offsets = df
        .column(OFFSET_COLUMN)
        .and_then(|c| c.cast(&DataType::Int64))
        .map_err(|e| format!("segment {path} has no positions: {e}"))?;
    let offsets = offsets.i64().map_err(|e| format!("segment {path}: {e}"))?;
    for (i, o) in offsets.iter().enumerate() {
        let want = s.lo + i as u64;
        if o != i64::try_from(want).ok() {
            return Err(format!(
                "segment {path} holds position {} where {want} belongs (positions {}..{})",
                o.map_or("null".to_string(), |o| o.to_string()),
                s.lo,
                s.hi
            ));
        }
    }
    let (min, max) =
        time_range(&df, time).map_err(|e| format!("segment {path} has no event times: {e}"))?;
    if (min, max) != (s.min_event_ms, s.max_event_ms) {
        return Err(format!(
            "segment {path} holds event times {min:?}..{max:?} (ms), its manifest row {:?}..{:?}",
            s.min_event_ms, s.max_event_ms
        ));
    }
    Ok(df)
}

/// Differences between two finished frames (batch, speed), at most a few per column.
pub fn compare(batch: &DataFrame, speed: &DataFrame) -> Vec<String> {
    const MAX_PER_COLUMN: usize = 5;
    let mut out = Vec::new();
    if batch.height() != speed.height() {
        out.push(format!(
            "batch has {} rows, speed has {}",
            batch.height(),
            speed.height()
        ));
        return out;
    }
    if batch.schema() != speed.schema() {
        out.push(format!(
            "schemas differ: batch {:?}, speed {:?}",
            batch.schema(),
            speed.schema()
        ));
        return out;
    }
    for (b, s) in batch.columns().iter().zip(speed.columns()) {
        let name = b.name().to_string();
        let mut found = 0;
        let floats = b.dtype().is_float();
        let (bs, ss) = (b.as_materialized_series(), s.as_materialized_series());
        if floats {
            let (Ok(bf), Ok(sf)) = (bs.cast(&DataType::Float64), ss.cast(&DataType::Float64))
            else {
                out.push(format!("column `{name}`: cannot compare"));
                continue;
            };
            let (Ok(bf), Ok(sf)) = (bf.f64(), sf.f64()) else {
                out.push(format!("column `{name}`: cannot compare"));
                continue;
            };
            for (i, (x, y)) in bf.iter().zip(sf.iter()).enumerate() {
                let same = match (x, y) {
                    (None, None) => true,
                    (Some(x), Some(y)) => {
                        (x.is_nan() && y.is_nan())
                            || (x - y).abs() <= REL_TOL * x.abs().max(y.abs()).max(1.0)
                    }
                    _ => false,
                };
                if !same {
                    found += 1;
                    if found <= MAX_PER_COLUMN {
                        out.push(format!("row {i}, `{name}`: batch {x:?}, speed {y:?}"));
                    }
                }
            }
        } else {
            for i in 0..bs.len() {
                let (x, y) = (bs.get(i), ss.get(i));
                let same = match (&x, &y) {
                    (Ok(x), Ok(y)) => x == y,
                    _ => false,
                };
                if !same {
                    found += 1;
                    if found <= MAX_PER_COLUMN {
                        out.push(format!(
                            "row {i}, `{name}`: batch {}, speed {}",
                            x.map(|v| v.to_string()).unwrap_or_default(),
                            y.map(|v| v.to_string()).unwrap_or_default()
                        ));
                    }
                }
            }
        }
        if found > MAX_PER_COLUMN {
            out.push(format!(
                "… and {} more differences in `{name}`",
                found - MAX_PER_COLUMN
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_tolerates_rounding_and_reports_real_differences() {
        let a = df!("k" => ["a", "b"], "x" => [1.0, 2.0]).unwrap();
        let b = df!("k" => ["a", "b"], "x" => [1.0 + 1e-13, 2.0]).unwrap();
        assert!(compare(&a, &b).is_empty());
        let c = df!("k" => ["a", "c"], "x" => [1.0, 2.5]).unwrap();
        let d = compare(&a, &c);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("`k`") && d[1].contains("`x`"), "{d:?}");
        let e = df!("k" => ["a"], "x" => [1.0]).unwrap();
        assert_eq!(compare(&a, &e).len(), 1);
    }
}
