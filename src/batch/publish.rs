//! A view's partials in the lake: written under the run that computed them, published in one
//! state transaction, and loaded back (by an incremental run, serving, maintenance).

use std::sync::Arc;

use anyhow::Context;
use polars::prelude::*;

use crate::lake::{self, Lake};
use crate::plan::Plan;
use crate::state::{Cutoff, NewPublication, Publication, PublicationId, RunId, State};

/// Name of the one partials file a run writes per view.
pub(crate) const PARTIALS_FILE: &str = "partials.parquet";

/// Merges a view's `fresh` partials with those published by `base_run` (an incremental run),
/// writes them under this run and publishes them if `replaces` is still current. Windows the
/// replaced version retired (its horizon, set by `retention`) stay retired: a full recompute
/// or late events never bring them back.
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
    let path = format!(
        "{}{PARTIALS_FILE}",
        lake::view_run_prefix(&pipeline, &name, run_id.0)
    );
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
    // Nothing new on top of an untrimmed base (an incremental run with no new events): the
    // base's file is the answer, byte for byte; copied (a hard link on a local lake, the
    // store's own copy on others), not decoded, merged and re-encoded.
    // The base is the current publication (its record gives the rows and the logic).
    if fresh.height() == 0
        && horizon_ms.is_none()
        && let Some(base) = current
            .as_ref()
            .filter(|c| Some(c.run_id) == base_run && c.logic_hash == plan.logic_hash(view))
        && let Some(file) = single_file(plan, lake, view, base.run_id).await?
    {
        lake.copy(&file, &path).await?;
        return record(state, &publication(base.rows), candidate).await;
    }
    let previous = match base_run {
        Some(base) => Some(
            load_run_partials(plan, lake, view, base)
                .await
                .with_context(|| format!("loading the publication of run {base}"))?,
        ),
        None => None,
    };
    let p = plan.clone();
    let mut partials = tokio::task::spawn_blocking(move || -> PolarsResult<DataFrame> {
        let merged = match previous {
            Some(old) => p.merge(view, vec![old, fresh])?,
            None => fresh,
        };
        match horizon_ms {
            Some(h) => p.trim_partials(view, merged, h),
            None => Ok(merged),
        }
    })
    .await
    .context("batch computation panicked")??;

    let partial_rows = partials.height() as u64;
    let mut bytes = Vec::new();
    plan.write_partials(view, &mut partials, &mut bytes)?;
    lake.put(&path, bytes).await?;
    record(state, &publication(partial_rows), candidate).await
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

/// The path of run `run_id`'s partials of `view` when they are one Parquet file (what a run
/// writes); None otherwise.
async fn single_file(
    plan: &Plan,
    lake: &Lake,
    view: usize,
    run_id: RunId,
) -> anyhow::Result<Option<String>> {
    let prefix = lake::view_run_prefix(
        &plan.pipeline().name,
        &plan.pipeline().views[view].name,
        run_id.0,
    );
    let files = lake.list(&prefix).await?;
    Ok(match files.as_slice() {
        [file] if file.path.ends_with(".parquet") => Some(file.path.clone()),
        _ => None,
    })
}

/// Reads a publication's partials (every Parquet file of its run directory), refusing files of
/// another format or logic.
pub async fn load_partials(
    plan: &Plan,
    lake: &Lake,
    view: usize,
    publication: &Publication,
) -> anyhow::Result<DataFrame> {
    load_run_partials(plan, lake, view, publication.run_id)
        .await
        .with_context(|| format!("publication {}", publication.id))
}

/// The partials of `view` that run `run_id` wrote.
async fn load_run_partials(
    plan: &Plan,
    lake: &Lake,
    view: usize,
    run_id: RunId,
) -> anyhow::Result<DataFrame> {
    let pipeline = &plan.pipeline().name;
    let prefix = lake::view_run_prefix(pipeline, &plan.pipeline().views[view].name, run_id.0);
    let files = lake.list(&prefix).await?;
    anyhow::ensure!(!files.is_empty(), "no partials under {prefix}");
    let mut parts = Vec::new();
    for f in files.iter().filter(|f| f.path.ends_with(".parquet")) {
        let bytes = lake.get(&f.path).await?;
        parts.push(
            plan.read_partials(view, &bytes)
                .with_context(|| format!("reading {}", f.path))?,
        );
    }
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Ok(plan.merge(view, parts)?)
}
