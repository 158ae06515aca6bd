//! Archive maintenance, the `compact` and `retention` workflow tasks (SPEC.md "Workflow").
//!
//! Both change which segments the manifest lists, never what any answer is:
//!
//! - **Only segments every view's published batch already covers are touched** (below the
//!   lowest current cutoff of the pipeline's views, per partition). Incremental batch runs
//!   read only segments at or after a cutoff, and the speed layer serves only uncovered ones,
//!   so neither can see a merged or dropped segment. A pipeline with an unpublished view has
//!   nothing covered, hence nothing to maintain.
//! - **One manifest transaction per change** ([`State::replace_segments`],
//!   [`State::drop_segments`]): a compacted range is either the old segments or the merged
//!   one, never both or neither.
//! - **Files are retired, then deleted after [`GRACE`]**: a full recompute that listed the
//!   manifest before the change may still be reading them.
//!
//! Retention keeps segments sealed within the pipeline's `dedupe_window` (a restart rebuilds
//! the dedupe index from them), whatever their event times.
//!
//! Compaction merges runs of contiguous small segments (fewer rows than the pipeline's
//! `archive.segment_rows`, typically sealed by `segment_age` on a quiet stream) into segments
//! of up to `segment_rows` rows, keeping every row and column as archived. Retention drops
//! covered segments whose newest event is older than `keep`, the view versions published
//! before that which are not current, and dead letters that arrived before it.
//!
//! Retention also **retires served windows**: every windowed view's current version is
//! republished (a batch run of its own, same cutoff and logic) without the windows that ended
//! at or before `now - keep`, and with that instant as its horizon. Serving leaves windows
//! ending at or before the horizon out of the whole answer — the speed layer's partials (late
//! events) included — and every later version of the view carries the horizon forward, so a
//! full recompute over what is left of the archive never brings back a partial old window.
//! Windows that straddle the horizon stay whole. All-time views are not trimmed. `verify`
//! still compares the two engines over the same segments.

use std::io::Cursor;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use polars::prelude::*;

use super::GRACE;
use crate::lake::{self, Lake};
use crate::plan::Plan;
use crate::spec::{Pipeline, Window};
use crate::state::{
    Cutoff, NewPublication, RunId, RunKind, Segment, State, StateError, is_covered,
};

/// Most bytes of archived Parquet merged into one segment, whatever `segment_rows` says: the
/// merge holds the decoded rows in memory.
pub const MAX_MERGE_BYTES: u64 = 256 << 20;

/// What a `compact` task did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compacted {
    /// Segments replaced, and the merged segments that replaced them.
    pub replaced: usize,
    pub merged: usize,
    /// Ranges skipped because another process changed the archive meanwhile.
    pub raced: usize,
    /// Retired files deleted after their grace period.
    pub collected: usize,
}

/// What a `retention` task did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Retained {
    pub segments_dropped: usize,
    pub rows_dropped: u64,
    /// Views republished without their retired windows, and the partial rows left out.
    pub views_trimmed: usize,
    pub partial_rows_retired: u64,
    pub view_versions_dropped: usize,
    pub dead_letter_files_dropped: usize,
    pub collected: usize,
}

/// Groups of contiguous covered small segments worth merging (two or more each), in
/// position order.
pub fn plan_compaction(
    segments: &[Segment],
    cutoff: &Cutoff,
    target_rows: u64,
) -> Vec<Vec<Segment>> {
    let mut groups = Vec::new();
    let mut group: Vec<Segment> = Vec::new();
    let flush = |group: &mut Vec<Segment>, groups: &mut Vec<Vec<Segment>>| {
        if group.len() >= 2 {
            groups.push(std::mem::take(group));
        } else {
            group.clear();
        }
    };
    for s in segments {
        let small = s.rows < target_rows && s.bytes < MAX_MERGE_BYTES;
        if !small || !is_covered(cutoff, s) {
            flush(&mut group, &mut groups);
            continue;
        }
        let fits = group.last().is_some_and(|last| {
            last.partition == s.partition
                && last.hi == s.lo
                // One segment is enriched with one set of lookup versions.
                && last.lookups == s.lookups
                && group.iter().map(|g| g.rows).sum::<u64>() + s.rows <= target_rows
                && group.iter().map(|g| g.bytes).sum::<u64>() + s.bytes <= MAX_MERGE_BYTES
        });
        if !fits {
            flush(&mut group, &mut groups);
        }
        group.push(s.clone());
    }
    flush(&mut group, &mut groups);
    groups
}

/// The `compact` task: merges small covered segments of `pipeline`; `log` receives progress
/// lines for the task log.
pub async fn compact(
    state: &State,
    lake: &Lake,
    pipeline: &Pipeline,
    log: &(dyn Fn(String) + Send + Sync),
) -> anyhow::Result<Compacted> {
    let mut done = Compacted {
        collected: collect_retired(state, lake, &pipeline.name).await?,
        ..Compacted::default()
    };
    let Some(cutoff) = state.covered(pipeline).await? else {
        log(format!(
            "{}: a view has no published batch yet, so no segment is covered; nothing to compact",
            pipeline.name
        ));
        return Ok(done);
    };
    let segments = state.segments(&pipeline.name).await?;
    let groups = plan_compaction(&segments, &cutoff, pipeline.archive.segment_rows);
    if groups.is_empty() {
        log(format!(
            "{}: {} segment(s), none to merge",
            pipeline.name,
            segments.len()
        ));
        return Ok(done);
    }
    for group in groups {
        let merged = merge_group(lake, &group).await?;
        match state.replace_segments(&group, &merged).await {
            Ok(()) => {
                log(format!(
                    "{}: merged {} segments p={} [{}, {}) into one of {} rows ({} bytes)",
                    pipeline.name,
                    group.len(),
                    merged.partition,
                    merged.lo,
                    merged.hi,
                    merged.rows,
                    merged.bytes
                ));
                done.replaced += group.len();
                done.merged += 1;
            }
            Err(StateError::ArchiveRaced { .. }) => {
                // The merged file stays: another compactor may have recorded the very same
                // range at the very same path.
                log(format!(
                    "{}: p={} [{}, {}) changed meanwhile; left to the next run",
                    pipeline.name, merged.partition, merged.lo, merged.hi
                ));
                done.raced += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// Reads `group`, writes their rows as one segment, returns its manifest row.
async fn merge_group(lake: &Lake, group: &[Segment]) -> anyhow::Result<Segment> {
    let first = &group[0];
    let last = &group[group.len() - 1];
    let mut parts = Vec::with_capacity(group.len());
    for s in group {
        let bytes = lake
            .get(&s.path)
            .await
            .with_context(|| format!("reading segment {}", s.path))?;
        // A damaged segment is not copied into a merged one (which would record a checksum of
        // the damage): compaction stops, and `verify` names the segment.
        s.check_bytes(&bytes).map_err(anyhow::Error::msg)?;
        parts.push(bytes);
    }
    let expected: u64 = group.iter().map(|s| s.rows).sum();
    let bytes = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let mut merged: Option<DataFrame> = None;
        for bytes in parts {
            let df = ParquetReader::new(Cursor::new(bytes)).finish()?;
            match &mut merged {
                None => merged = Some(df),
                Some(m) => {
                    anyhow::Context::context(
                        m.vstack_mut(&df),
                        "segments of the range have different columns (the pipeline's schema changed); not merging them",
                    )?;
                }
            }
        }
        let mut merged = merged.context("no segment to merge")?;
        anyhow::ensure!(
            merged.height() as u64 == expected,
            "the segments hold {} rows but the manifest says {expected}",
            merged.height()
        );
        merged.rechunk_mut();
        let mut buf = Vec::new();
        ParquetWriter::new(&mut buf)
            .with_compression(ParquetCompression::Zstd(None))
            .finish(&mut merged)?;
        Ok(buf)
    })
    .await??;
    let path = lake::archive_path(&first.pipeline, first.partition, first.lo, last.hi);
    let size = bytes.len() as u64;
    let crc32 = crc32fast::hash(&bytes);
    lake.put(&path, Bytes::from(bytes))
        .await
        .with_context(|| format!("writing merged segment {path}"))?;
    Ok(Segment {
        pipeline: first.pipeline.clone(),
        partition: first.partition,
        lo: first.lo,
        hi: last.hi,
        path,
        rows: expected,
        bytes: size,
        dead_letters: group.iter().map(|s| s.dead_letters).sum(),
        min_event_ms: group.iter().filter_map(|s| s.min_event_ms).min(),
        max_event_ms: group.iter().filter_map(|s| s.max_event_ms).max(),
        // Every segment of a group recorded the same versions (`plan_compaction`).
        lookups: first.lookups.clone(),
        crc32: Some(crc32),
    })
}

/// The `retention` task at time `now`: drops what is older than `keep` and no longer needed.
pub async fn retention(
    state: &State,
    lake: &Lake,
    pipeline: &Pipeline,
    keep: Duration,
    now: DateTime<Utc>,
    log: &(dyn Fn(String) + Send + Sync),
) -> anyhow::Result<Retained> {
    let horizon =
        now - chrono::Duration::from_std(keep).context("the retention period is too long")?;
    let horizon_ms = horizon.timestamp_millis();
    let name = &pipeline.name;
    let mut done = Retained {
        collected: collect_retired_before(state, lake, name, now - GRACE).await?,
        ..Retained::default()
    };

    match state.covered(pipeline).await? {
        None => log(format!(
            "{name}: a view has no published batch yet, so every segment is still needed"
        )),
        Some(cutoff) => {
            // Restarts rebuild the dedupe index from segments sealed within the dedupe
            // window: those stay whatever their event times.
            let dedupe_since = now
                - chrono::Duration::from_std(pipeline.dedupe_window)
                    .unwrap_or(chrono::TimeDelta::MAX);
            let sealed_at = state.sealed_at(name).await?;
            let old: Vec<Segment> = state
                .segments(name)
                .await?
                .into_iter()
                .filter(|s| is_covered(&cutoff, s))
                // A segment of rejected events only has no event time: nothing needs it.
                .filter(|s| s.max_event_ms.is_none_or(|t| t < horizon_ms))
                .filter(|s| {
                    pipeline.event_id.is_none()
                        || sealed_at
                            .get(&(s.partition, s.lo))
                            .is_some_and(|at| *at < dedupe_since)
                })
                .collect();
            state.drop_segments(&old).await?;
            done.segments_dropped = old.len();
            done.rows_dropped = old.iter().map(|s| s.rows).sum();
            log(format!(
                "{name}: dropped {} archive segment(s) ({} events) with every event before {}",
                done.segments_dropped,
                done.rows_dropped,
                horizon.to_rfc3339()
            ));
        }
    }

    retire_windows(state, lake, pipeline, horizon_ms, &mut done, log).await?;

    for view in &pipeline.views {
        let runs = state
            .drop_publications_before(name, &view.name, horizon)
            .await?;
        for run in &runs {
            let prefix = lake::view_run_prefix(name, &view.name, run.0);
            for f in lake.list(&prefix).await? {
                lake.delete(&f.path).await?;
            }
        }
        done.view_versions_dropped += runs.len();
    }
    log(format!(
        "{name}: dropped {} view version(s) published before {}",
        done.view_versions_dropped,
        horizon.to_rfc3339()
    ));

    let prefix = lake::dead_letters_prefix(name);
    for f in lake.list(&prefix).await? {
        let arrival = f
            .path
            .strip_prefix(&prefix)
            .and_then(|rest| rest.get(..20))
            .and_then(|ms| ms.parse::<i64>().ok());
        if arrival.is_some_and(|ms| ms < horizon_ms) {
            lake.delete(&f.path).await?;
            done.dead_letter_files_dropped += 1;
        }
    }
    log(format!(
        "{name}: dropped {} dead-letter file(s) that arrived before {}",
        done.dead_letter_files_dropped,
        horizon.to_rfc3339()
    ));
    Ok(done)
}

/// Republishes every windowed view without the windows that ended at or before `horizon_ms`
/// (module docs), as one batch run; views already at that horizon are left alone.
async fn retire_windows(
    state: &State,
    lake: &Lake,
    pipeline: &Pipeline,
    horizon_ms: i64,
    done: &mut Retained,
    log: &(dyn Fn(String) + Send + Sync),
) -> anyhow::Result<()> {
    let plan = std::sync::Arc::new(Plan::compile(pipeline)?);
    let started = std::time::Instant::now();
    let mut run: Option<RunId> = None;
    let result = async {
        let restated = state.restated_by(&pipeline.name).await?;
        for (v, view) in pipeline.views.iter().enumerate() {
            if view.window == Window::All {
                continue;
            }
            // A batch run may publish meanwhile: start again from its version.
            for attempt in 1.. {
                let Some(current) = state.current_publication(&pipeline.name, &view.name).await?
                else {
                    break;
                };
                if current.horizon_ms.is_some_and(|h| h >= horizon_ms) {
                    break;
                }
                if current.logic_hash != plan.logic_hash(v) {
                    log(format!(
                        "{}.{}: the current version was computed by other logic; its windows are retired by the next batch run",
                        pipeline.name, view.name
                    ));
                    break;
                }
                // Republished under this run's id, partials computed before a restatement
                // of the lookup versions would pass for restated ones (batch::run).
                if restated.is_some_and(|r| current.run_id < r) {
                    log(format!(
                        "{}.{}: the current version predates the restatement of the lookup versions; its windows are retired by the next batch run, which recomputes it",
                        pipeline.name, view.name
                    ));
                    break;
                }
                let run_id = match run {
                    Some(r) => r,
                    None => {
                        let r = state
                            .create_run(RunKind::Batch, &pipeline.name, None)
                            .await?
                            .id;
                        state.start_run(r).await?;
                        super::log(
                            state,
                            r,
                            &format!("retention: retiring windows that ended at or before {horizon_ms} ms"),
                        )
                        .await;
                        run = Some(r);
                        r
                    }
                };
                let partials = super::load_partials(&plan, lake, v, &current).await?;
                let p = plan.clone();
                let (bytes, kept, retired) =
                    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                        let before = partials.height() as u64;
                        let mut kept = p.trim_partials(v, partials, horizon_ms)?;
                        let mut bytes = Vec::new();
                        p.write_partials(v, &mut kept, &mut bytes)?;
                        let rows = kept.height() as u64;
                        Ok((bytes, rows, before - rows))
                    })
                    .await??;
                let path = format!(
                    "{}{}",
                    lake::view_run_prefix(&pipeline.name, &view.name, run_id.0),
                    super::PARTIALS_FILE
                );
                lake.put(&path, bytes).await?;
                let published = state
                    .publish(&NewPublication {
                        pipeline: pipeline.name.clone(),
                        view: view.name.clone(),
                        run_id,
                        logic_hash: current.logic_hash.clone(),
                        cutoff: current.cutoff.clone(),
                        rows: kept,
                        replaces: Some(current.id),
                        horizon_ms: Some(horizon_ms),
                    })
                    .await;
                match published {
                    Ok(_) => {
                        log(format!(
                            "{}.{}: republished without {retired} partial row(s) of windows that ended by the horizon",
                            pipeline.name, view.name
                        ));
                        done.views_trimmed += 1;
                        done.partial_rows_retired += retired;
                        break;
                    }
                    Err(StateError::PublicationRaced { .. }) if attempt < 3 => continue,
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(r) = run {
        let ended = match &result {
            Ok(()) => Ok(done.views_trimmed),
            Err(e) => Err(format!("{e:#}")),
        };
        let recorded = super::end_run(state, r, ended, started.elapsed()).await;
        match (recorded, &result) {
            (Err(e), Ok(())) => return Err(e.into()),
            (Err(e), Err(_)) => {
                tracing::warn!(run = r.0, error = %e, "cannot record the failed retention run")
            }
            (Ok(()), _) => {}
        }
    }
    result
}

/// Deletes the files retired at least [`GRACE`] ago; returns how many.
pub async fn collect_retired(state: &State, lake: &Lake, pipeline: &str) -> anyhow::Result<usize> {
    collect_retired_before(state, lake, pipeline, Utc::now() - GRACE).await
}

/// Deletes the files of `pipeline` retired before `before`; returns how many.
pub async fn collect_retired_before(
    state: &State,
    lake: &Lake,
    pipeline: &str,
    before: DateTime<Utc>,
) -> anyhow::Result<usize> {
    let retired = state.retired_objects(pipeline, before).await?;
    for r in &retired {
        lake.delete(&r.path)
            .await
            .with_context(|| format!("deleting retired file {}", r.path))?;
        state.forget_retired(&r.path).await?;
    }
    Ok(retired.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(p: u32, lo: u64, hi: u64, rows: u64) -> Segment {
        Segment {
            pipeline: "clicks".into(),
            partition: p,
            lo,
            hi,
            path: lake::archive_path("clicks", p, lo, hi),
            rows,
            bytes: rows * 10,
            dead_letters: 0,
            min_event_ms: Some(0),
            max_event_ms: Some(1),
            lookups: None,
            crc32: None,
        }
    }

    fn ranges(groups: &[Vec<Segment>]) -> Vec<Vec<(u32, u64, u64)>> {
        groups
            .iter()
            .map(|g| g.iter().map(|s| (s.partition, s.lo, s.hi)).collect())
            .collect()
    }

    #[test]
    fn merges_contiguous_small_covered_segments_up_to_the_target() {
        let segments = vec![
            seg(0, 0, 10, 10),
            seg(0, 10, 20, 10),
            seg(0, 20, 30, 10),
            seg(0, 30, 40, 10),
            seg(0, 40, 50, 10),
        ];
        let cutoff = Cutoff::from([(0, 50)]);
        assert_eq!(
            ranges(&plan_compaction(&segments, &cutoff, 20)),
            vec![
                vec![(0, 0, 10), (0, 10, 20)],
                vec![(0, 20, 30), (0, 30, 40)]
            ]
        );
        assert_eq!(
            ranges(&plan_compaction(&segments, &cutoff, 1000))
                .concat()
                .len(),
            5
        );
    }

    #[test]
    fn never_touches_uncovered_full_or_other_partition_segments() {
        let segments = vec![
            seg(0, 0, 10, 10),
            seg(0, 10, 110, 100), // full: breaks the run
            seg(0, 110, 120, 10),
            seg(0, 120, 130, 10),
            seg(0, 130, 140, 10), // above the cutoff
            seg(1, 0, 5, 5),
            seg(1, 5, 9, 4),
        ];
        let cutoff = Cutoff::from([(0, 130), (1, 9)]);
        assert_eq!(
            ranges(&plan_compaction(&segments, &cutoff, 100)),
            vec![
                vec![(0, 110, 120), (0, 120, 130)],
                vec![(1, 0, 5), (1, 5, 9)]
            ]
        );
        // No cutoff for a partition: nothing of it is covered.
        let only_p0 = Cutoff::from([(0, 130)]);
        assert_eq!(
            ranges(&plan_compaction(&segments, &only_p0, 100)),
            vec![vec![(0, 110, 120), (0, 120, 130)]]
        );
    }

    #[test]
    fn a_gap_in_positions_is_never_merged_over() {
        let segments = vec![seg(0, 0, 10, 10), seg(0, 20, 30, 10)];
        let cutoff = Cutoff::from([(0, 30)]);
        assert!(plan_compaction(&segments, &cutoff, 100).is_empty());
    }
}
