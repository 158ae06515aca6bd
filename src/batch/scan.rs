//! Reading archived segments for the batch layer: one lazy polars scan over exactly the
//! segments of a cutoff, so projection and predicate pushdown reach the Parquet reader — one
//! per set of lookup versions the segments recorded, each enriched with its own versions —
//! in chunks of at most [`CHUNK_EVENTS`] events, so memory does not grow with the archive.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use polars::prelude::*;

use crate::lake::Lake;
use crate::plan::{LookupSet, Plan};
use crate::speed::lookups::Lookups;
use crate::state::Segment;

/// Segments read for a view, in groups that recorded the same lookup versions, each with
/// those versions.
pub struct Parts(pub Vec<(Source, LookupSet)>);

impl Parts {
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|(s, _)| s.is_empty())
    }
}

/// [`open`] for segments that may have recorded different lookup versions: one source per
/// set of versions, with the versions loaded from the lake.
pub async fn open_parts(
    lake: &Lake,
    lookups: &Lookups,
    segments: &[Segment],
    mut on_segment: impl FnMut(&Segment),
) -> anyhow::Result<Parts> {
    let mut parts = Vec::new();
    for (key, group) in by_lookups(lookups, segments.iter().map(|s| (s, ()))) {
        let set = lookups
            .recorded(key)
            .await
            .context("loading the lookup versions the segments recorded")?;
        let group: Vec<Segment> = group.into_iter().map(|(s, ())| s.clone()).collect();
        parts.push((open(lake, &group, &mut on_segment).await?, set));
    }
    Ok(Parts(parts))
}

/// [`open_parts`] of segments decoded already (by a check of their bytes: the engines then
/// compute exactly what was checked).
pub async fn decoded_parts(
    lookups: &Lookups,
    decoded: Vec<(Segment, DataFrame)>,
) -> anyhow::Result<Parts> {
    let mut parts = Vec::new();
    for (key, group) in by_lookups(lookups, decoded.iter().map(|(s, df)| (s, df))) {
        let set = lookups
            .recorded(key)
            .await
            .context("loading the lookup versions the segments recorded")?;
        let frames = group.into_iter().map(|(_, df)| df.clone()).collect();
        parts.push((Source::Frames(frames), set));
    }
    Ok(Parts(parts))
}

/// Items of segments that recorded the same lookup versions (`None`: none, or the pipeline
/// has no lookups).
type Group<'a, T> = (Option<&'a str>, Vec<(&'a Segment, T)>);

/// Items of segments grouped by the lookup versions their segments recorded, in order of
/// first appearance (one group when the pipeline has no lookups, whatever they recorded).
fn by_lookups<'a, T>(
    lookups: &Lookups,
    items: impl Iterator<Item = (&'a Segment, T)>,
) -> Vec<Group<'a, T>> {
    let mut groups: Vec<Group<'a, T>> = Vec::new();
    for (s, item) in items {
        let key = if lookups.pipeline().lookups.is_empty() {
            None
        } else {
            s.lookups.as_deref()
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push((s, item)),
            None => groups.push((key, vec![(s, item)])),
        }
    }
    groups
}

/// Where the segments' bytes come from.
pub enum Source {
    /// A `file://` lake: polars scans the files itself (projection pushdown, no copies).
    Files(Vec<PathBuf>),
    /// Any other lake: the bytes, read through [`Lake`], decoded in memory.
    Frames(Vec<DataFrame>),
}

/// Segments of a remote lake fetched at once.
const FETCH_AHEAD: usize = 8;

/// Collects the segments' sources; `on_segment(rows)` is called after each one is located
/// or read, for progress.
pub async fn open(
    lake: &Lake,
    segments: &[Segment],
    mut on_segment: impl FnMut(&Segment),
) -> anyhow::Result<Source> {
    if let Some(files) = lake.local_files(segments.iter().map(|s| s.path.as_str()))? {
        for (s, path) in segments.iter().zip(&files) {
            anyhow::ensure!(
                path.is_file(),
                "sealed segment {} is missing from the lake ({})",
                s.path,
                path.display()
            );
            // Polars scans the file itself: its bytes are checked first.
            let (checked, file) = (s.clone(), path.clone());
            tokio::task::spawn_blocking(move || checked.check_file(&file))
                .await
                .context("checking a segment panicked")??;
            on_segment(s);
        }
        return Ok(Source::Files(files));
    }
    // Object stores answer each request after a round trip: several segments are fetched and
    // decoded at once, in position order.
    use futures::{StreamExt, TryStreamExt};
    // The futures are made up front (a stream mapping borrowed segments through a closure is
    // not provably `Send` for every lifetime); they run as `buffered` polls them.
    let fetches: Vec<_> = segments
        .iter()
        .map(|s| async move {
            let bytes = s.read(lake).await?;
            let df = tokio::task::spawn_blocking(move || {
                ParquetReader::new(std::io::Cursor::new(bytes)).finish()
            })
            .await
            .context("decoding a segment panicked")?
            .map_err(|e| anyhow::anyhow!("decoding segment {}: {e}", s.path))?;
            anyhow::Ok((s, df))
        })
        .collect();
    let mut fetched = futures::stream::iter(fetches).buffered(FETCH_AHEAD);
    let mut frames = Vec::with_capacity(segments.len());
    while let Some((s, df)) = fetched.try_next().await? {
        frames.push(df);
        on_segment(s);
    }
    Ok(Source::Frames(frames))
}

impl Source {
    pub fn is_empty(&self) -> bool {
        match self {
            Source::Files(f) => f.is_empty(),
            Source::Frames(f) => f.is_empty(),
        }
    }

    /// The events of every segment as one lazy frame (`None` when there are no segments).
    pub fn lazy(&self) -> PolarsResult<Option<LazyFrame>> {
        match self {
            Source::Files(files) if files.is_empty() => Ok(None),
            Source::Frames(frames) if frames.is_empty() => Ok(None),
            Source::Files(files) => {
                let paths = files
                    .iter()
                    .map(|p| PlRefPath::new(p.to_string_lossy().as_ref()))
                    .collect();
                let mut args = ScanArgsParquet {
                    // Segment paths are exact files; globbing a name could match others.
                    glob: false,
                    ..ScanArgsParquet::default()
                };
                // `p=0/` in the archive layout is not a column: the events carry their own.
                args.hive_options.enabled = Some(false);
                LazyFrame::scan_parquet_files(paths, args).map(Some)
            }
            Source::Frames(frames) => {
                let lfs: Vec<LazyFrame> = frames.iter().map(|f| f.clone().lazy()).collect();
                concat(lfs, UnionArgs::default()).map(Some)
            }
        }
    }
}

/// Events the batch layer reads and aggregates in one streaming query. Over more, a scan reads
/// its segments in chunks of about this many (a segment is never split), and each chunk's
/// partials are merged into the views' as it ends: memory is bounded by a chunk and the views'
/// groups, not by the archive (a remote lake's segments are fetched chunk by chunk too).
pub const CHUNK_EVENTS: u64 = 25_000_000;

/// Canonical partials of the views `views` (indices into the pipeline's views, in their order)
/// over `segments`, read from the lake in chunks of at most `chunk_events` events (at least one
/// segment each); `on_segment` as [`open_parts`]'s.
pub async fn scan_partials(
    plan: &Arc<Plan>,
    lake: &Lake,
    lookups: &Lookups,
    (segments, chunk_events): (&[Segment], u64),
    views: &[usize],
    mut on_segment: impl FnMut(&Segment),
) -> anyhow::Result<Vec<DataFrame>> {
    let chunks = chunks(segments, chunk_events);
    if chunks.len() <= 1 {
        let parts = open_parts(lake, lookups, segments, on_segment).await?;
        let (p, views) = (plan.clone(), views.to_vec());
        return tokio::task::spawn_blocking(move || views_partials(&p, &views, &parts))
            .await
            .context("batch computation panicked")?
            .map_err(Into::into);
    }
    let mut merged: Vec<_> = views.iter().map(|&v| plan.accumulator(v)).collect();
    for chunk in chunks {
        let parts = open_parts(lake, lookups, chunk, &mut on_segment).await?;
        let (p, views) = (plan.clone(), views.to_vec());
        merged = tokio::task::spawn_blocking(move || -> PolarsResult<_> {
            for (acc, frames) in merged.iter_mut().zip(scanned(&p, &views, &parts)?) {
                for f in &frames {
                    acc.absorb(f)?;
                }
            }
            Ok(merged)
        })
        .await
        .context("batch computation panicked")??;
    }
    tokio::task::spawn_blocking(move || {
        merged
            .iter()
            .map(|a| a.to_partials())
            .collect::<PolarsResult<Vec<_>>>()
    })
    .await
    .context("batch computation panicked")?
    .map_err(Into::into)
}

/// `segments` in runs of at most `events` events (a larger segment alone), in order.
fn chunks(segments: &[Segment], events: u64) -> Vec<&[Segment]> {
    let mut out = Vec::new();
    let (mut start, mut rows) = (0, 0u64);
    for (i, s) in segments.iter().enumerate() {
        if i > start && rows + s.rows > events {
            out.push(&segments[start..i]);
            (start, rows) = (i, 0);
        }
        rows += s.rows;
    }
    if start < segments.len() {
        out.push(&segments[start..]);
    }
    out
}

/// Canonical partials (one row per group) of view `view` over `parts`: the SAME plan as the
/// speed layer (`prepare` then `partials`, each part with its lookup versions), run by polars'
/// streaming engine.
pub fn view_partials(plan: &Plan, view: usize, parts: &Parts) -> PolarsResult<DataFrame> {
    Ok(views_partials(plan, &[view], parts)?.remove(0))
}

/// [`view_partials`] of several views (indices into the pipeline's views), in their order, in
/// one pass: each part's events are read and prepared once and every view's query is run on
/// them by one streaming query, with the columns and filters of all the views pushed down.
pub fn views_partials(plan: &Plan, views: &[usize], parts: &Parts) -> PolarsResult<Vec<DataFrame>> {
    views
        .iter()
        .zip(scanned(plan, views, parts)?)
        .map(|(&v, r)| plan.merge_scanned(v, r))
        .collect()
}

/// What the streaming queries of [`views_partials`] return, per view one frame per part.
fn scanned(plan: &Plan, views: &[usize], parts: &Parts) -> PolarsResult<Vec<Vec<DataFrame>>> {
    let mut raw: Vec<Vec<DataFrame>> = views.iter().map(|_| Vec::new()).collect();
    for (source, lookups) in &parts.0 {
        let Some(events) = source.lazy()? else {
            continue;
        };
        let prepared = plan.prepare(events, lookups)?;
        let frames = plan.partials_of(views, prepared, Engine::Streaming)?;
        for (r, f) in raw.iter_mut().zip(frames) {
            r.push(f);
        }
    }
    Ok(raw)
}

/// The speed layer's way over the same segments: partials per segment, merged by the
/// accumulator (what `verify` compares the scan with).
pub fn speed_partials(plan: &Plan, view: usize, parts: &Parts) -> PolarsResult<DataFrame> {
    let mut acc = plan.accumulator(view);
    for (source, lookups) in &parts.0 {
        let frames: Vec<DataFrame> = match source {
            Source::Frames(frames) => frames.clone(),
            Source::Files(files) => files
                .iter()
                .map(|p| {
                    let f = std::fs::File::open(p).map_err(|e| {
                        PolarsError::ComputeError(format!("opening {}: {e}", p.display()).into())
                    })?;
                    ParquetReader::new(f).finish()
                })
                .collect::<PolarsResult<_>>()?,
        };
        for events in frames {
            let part = plan
                .partials_masked(events, lookups)?
                .parts
                .swap_remove(view);
            acc.absorb(&part)?;
        }
    }
    acc.to_partials()
}
