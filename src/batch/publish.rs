//! A view's partials in the lake: written under the run that computed them, published in one
//! state transaction, and loaded back (by an incremental run, serving, maintenance).

use std::sync::Arc;

use anyhow::Context;
use polars::prelude::*;

use crate::lake::{self, Lake};
use crate::plan::Plan;
use crate::state::{Cutoff, NewPublication, Publication, PublicationId, RunId, State};

/// The partials file of a run that merged all of its view's partials into one (a full run,
/// or an incremental one that merged every file of its base). An incremental run that keeps
/// some of its base's files beside its own writes `partials-{run}.parquet`.
pub(crate) const PARTIALS_FILE: &str = "partials.parquet";

/// Most files one publication's partials are kept in. An incremental run copies its base's
/// files (a hard link, or the store's own copy: no bytes through this process) and writes only
/// the partials of its new segments beside them, merging the smallest of the base's files into
/// its own while each is at most twice what it merged so far: file sizes grow geometrically,
/// a run rewrites about as much as it computed (amortized: a logarithmic factor), and a base
/// many times larger is rewritten only once the new partials approach its size. Past this many
/// files, the smallest are merged whatever their size, which bounds what a reader merges.
const MAX_FILES: usize = 8;

/// Publishes a view's `fresh` partials — onto those published by `base_run` in an incremental
/// run (see [`MAX_FILES`]) — written under this run, if `replaces` is still current. Windows
/// the replaced version retired (its horizon, set by `retention`) stay retired: a full
/// recompute or late events never bring them back.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn publish_view(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    run_id: RunId,
    cutoff: &Cutoff,
    view: usize,
    fresh: DataFrame,
    base_run: Option<RunId>,
    (replaces, candidate): (Option<PublicationId>, bool),
) -> anyhow::Result<Publication> {
    let pipeline = plan.pipeline().name.clone();
    let name = plan.pipeline().views[view].name.clone();
    let current = match replaces {
        Some(id) => state
            .current_publication(&pipeline, &name)
            .await?
            .filter(|c| c.id == id),
        None => None,
    };
    let horizon_ms = current.as_ref().and_then(|c| c.horizon_ms);
    let prefix = lake::view_run_prefix(&pipeline, &name, run_id.0);
    let publication = |rows: u64| NewPublication {
        pipeline: pipeline.clone(),
        view: name.clone(),
        run_id,
        logic_hash: plan.logic_hash(view),
        cutoff: cutoff.clone(),
        rows,
        replaces,
        horizon_ms,
    };
    // The base's files, largest first, kept as they are; its record (the current publication)
    // gives their partial rows. A base that is no longer current (this publish will lose its
    // race) is merged whole, as anything unexpected is.
    let (mut kept, mut merge_in, mut base_rows) = (Vec::new(), Vec::new(), 0u64);
    if let Some(base) = base_run {
        let mut files = run_files(plan, lake, view, base)
            .await
            .with_context(|| format!("listing the publication of run {base}"))?;
        files.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.path.cmp(&b.path)));
        match current
            .as_ref()
            .filter(|c| c.run_id == base && c.logic_hash == plan.logic_hash(view))
        {
            Some(c) => (kept, base_rows) = (files, c.rows),
            None => merge_in = files,
        }
    }
    let p = plan.clone();
    // Every file of the base was trimmed at this horizon already (it is the current version's):
    // trimming what is new keeps retired windows retired, merged or not.
    let mut fresh = tokio::task::spawn_blocking(move || match horizon_ms {
        Some(h) => p.trim_partials(view, fresh, h),
        None => Ok(fresh),
    })
    .await
    .context("batch computation panicked")??;
    // Nothing new on top of the base: its files are the answer, byte for byte.
    if fresh.height() == 0 && merge_in.is_empty() && !kept.is_empty() {
        copy_files(lake, &kept, &prefix).await?;
        return record(state, &publication(base_rows), candidate).await;
    }
    let mut bytes = Vec::new();
    plan.write_partials(view, &mut fresh, &mut bytes)?;
    let mut rows = fresh.height() as u64;
    let sizes: Vec<u64> = kept.iter().map(|f| f.size).collect();
    merge_in.extend(kept.split_off(kept.len() - merged_with(&sizes, bytes.len() as u64)));
    if !merge_in.is_empty() {
        let mut parts = read_files(plan, lake, view, &merge_in).await?;
        let merged_rows: u64 = parts.iter().map(|d| d.height() as u64).sum();
        parts.push(fresh);
        let p = plan.clone();
        let mut merged = tokio::task::spawn_blocking(move || p.merge(view, parts))
            .await
            .context("batch computation panicked")??;
        bytes.clear();
        plan.write_partials(view, &mut merged, &mut bytes)?;
        rows = merged.height() as u64;
        base_rows = base_rows.saturating_sub(merged_rows);
    }
    copy_files(lake, &kept, &prefix).await?;
    let file = if kept.is_empty() {
        PARTIALS_FILE.to_string()
    } else {
        format!("partials-{}.parquet", run_id.0)
    };
    lake.put(&format!("{prefix}{file}"), bytes).await?;
    record(state, &publication(base_rows + rows), candidate).await
}

/// How many of the smallest of a base's files (`sizes`, largest first) an incremental run that
/// wrote `fresh` bytes merges into its own file (see [`MAX_FILES`]).
fn merged_with(sizes: &[u64], fresh: u64) -> usize {
    let (mut n, mut merged) = (0, fresh);
    for &size in sizes.iter().rev() {
        if sizes.len() - n < MAX_FILES && size > 2 * merged {
            break;
        }
        (n, merged) = (n + 1, merged + size);
    }
    n
}

/// Gives each of `files` (partials of an earlier run) its name under `prefix` too.
async fn copy_files(lake: &Lake, files: &[lake::ObjectInfo], prefix: &str) -> anyhow::Result<()> {
    for f in files {
        let name = f.path.rsplit('/').next().unwrap_or(&f.path);
        lake.copy(&f.path, &format!("{prefix}{name}")).await?;
    }
    Ok(())
}

/// Makes `new` current (compare-and-set from `new.replaces`), or with `candidate` records it
/// as its view's candidate beside the live version.
async fn record(
    state: &State,
    new: &NewPublication,
    candidate: bool,
) -> anyhow::Result<Publication> {
    Ok(if candidate {
        state.publish_candidate(new).await?
    } else {
        state.publish(new).await?
    })
}

/// The Parquet files of run `run_id`'s partials of `view` (at least one).
async fn run_files(
    plan: &Plan,
    lake: &Lake,
    view: usize,
    run_id: RunId,
) -> anyhow::Result<Vec<lake::ObjectInfo>> {
    let prefix = lake::view_run_prefix(
        &plan.pipeline().name,
        &plan.pipeline().views[view].name,
        run_id.0,
    );
    let files: Vec<_> = lake
        .list(&prefix)
        .await?
        .into_iter()
        .filter(|f| f.path.ends_with(".parquet"))
        .collect();
    anyhow::ensure!(!files.is_empty(), "no partials under {prefix}");
    Ok(files)
}

/// Reads a publication's partials (every Parquet file of its run directory), refusing files of
/// another format or logic.
pub async fn load_partials(
    plan: &Arc<Plan>,
    lake: &Lake,
    view: usize,
    publication: &Publication,
) -> anyhow::Result<DataFrame> {
    load_run_partials(plan, lake, view, publication.run_id)
        .await
        .with_context(|| format!("publication {}", publication.id))
}

/// The partials of `view` that run `run_id` wrote, its files merged.
async fn load_run_partials(
    plan: &Arc<Plan>,
    lake: &Lake,
    view: usize,
    run_id: RunId,
) -> anyhow::Result<DataFrame> {
    let files = run_files(plan, lake, view, run_id).await?;
    let mut parts = read_files(plan, lake, view, &files).await?;
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    let p = plan.clone();
    tokio::task::spawn_blocking(move || p.merge(view, parts))
        .await
        .context("merging partials panicked")?
        .map_err(Into::into)
}

/// The partials in `files` (of view `view`), each read and checked.
async fn read_files(
    plan: &Plan,
    lake: &Lake,
    view: usize,
    files: &[lake::ObjectInfo],
) -> anyhow::Result<Vec<DataFrame>> {
    let mut parts = Vec::with_capacity(files.len() + 1);
    for f in files {
        let bytes = lake.get(&f.path).await?;
        parts.push(
            plan.read_partials(view, &bytes)
                .with_context(|| format!("reading {}", f.path))?,
        );
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_merges_the_files_no_larger_than_twice_what_it_merged_and_keeps_at_most_eight() {
        // A base many times larger than what is new is kept; files of about its size merged.
        assert_eq!(merged_with(&[1_000_000], 1_000), 0);
        assert_eq!(merged_with(&[1_000_000, 1_500], 1_000), 1);
        assert_eq!(merged_with(&[1_000_000, 5_000, 1_500], 1_000), 2);
        assert_eq!(merged_with(&[1_000_000, 6_000, 1_500], 1_000), 1);
        assert_eq!(merged_with(&[3_000, 1_500], 1_000), 2);
        assert_eq!(merged_with(&[], 1_000), 0);
        // Eight files of sizes far apart: the smallest is merged though it is much larger, so
        // the run leaves eight, its own included.
        let sizes: Vec<u64> = (1..=8).rev().map(|k| 10u64.pow(k)).collect();
        assert_eq!(merged_with(&sizes, 1), 1);
        assert_eq!(merged_with(&sizes[1..], 1), 0);
    }
}
