//! The batch layer (DESIGN.md §4): recompute a pipeline's views from its sealed segments in
//! the lake with the SAME compiled plan as the speed layer, write them as Parquet partials
//! under `views/{pipeline}/{view}/run={id}/`, and publish each in one state transaction.
//!
//! - The cutoff is every segment sealed when the run starts (checkpoints read first, then the
//!   manifest, so a segment sealed in between is left to the next run).
//! - Per view: if the current publication was computed by the same logic, the run is
//!   incremental (published partials ⊕ partials of the segments at or after the old cutoff);
//!   otherwise it recomputes from every segment. Either way serving switches only at publish.
//! - A run that fails or is killed publishes nothing more: what is published stays served.
//! - Versions that are no longer current are kept for [`GRACE`] after they were replaced, then
//!   their files are deleted.
//! - With [`ScaleOut`], a view with many segments to scan is computed as groups by any number
//!   of workers ([`groups`]) and merged here; without it, or for small inputs, in this process.

pub mod groups;
pub mod maintenance;
pub mod pickup;
pub mod scan;
pub mod verify;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use polars::prelude::*;

use crate::lake::{self, Lake};
use crate::plan::Plan;
use crate::spec::BatchSettings;
use crate::state::{
    Cutoff, NewPublication, Outcome, Publication, RunId, RunKind, Segment, State, StateError,
};

/// How long a replaced view version stays in the lake (a server may still be loading it).
pub const GRACE: Duration = Duration::from_secs(3600);

/// Name of the one partials file a run writes per view.
const PARTIALS_FILE: &str = "partials.parquet";

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// `--views` named a view the pipeline does not have.
    #[error("pipeline `{pipeline}` has no view `{view}` (views: {known})")]
    UnknownView {
        pipeline: String,
        view: String,
        known: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// How a view was recomputed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From every segment of the cutoff (first run, or the view's logic changed).
    Full,
    /// The published partials ⊕ the segments since their cutoff.
    Incremental,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Incremental => "incremental",
        }
    }
}

/// What a run tells its caller while it works.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The run exists (its id) and knows its cutoff.
    Started {
        run_id: RunId,
        segments: usize,
        rows: u64,
    },
    /// A view's input segments are read (`done` of `total`, `rows` events so far).
    Segments {
        view: String,
        done: usize,
        total: usize,
        rows: u64,
    },
    /// A view is published.
    Published {
        view: String,
        mode: Mode,
        segments: usize,
        rows: u64,
        partial_rows: u64,
    },
}

#[derive(Debug, Clone)]
pub struct ViewSummary {
    pub view: String,
    pub mode: Mode,
    /// Segments scanned by this run (for an incremental run: only the new ones).
    pub segments: usize,
    pub events: u64,
    pub publication: Publication,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: RunId,
    pub cutoff: Cutoff,
    pub views: Vec<ViewSummary>,
    pub elapsed: Duration,
}

/// Recomputes `views` (all when `None`) of the plan's pipeline and publishes them; the run is
/// recorded in `runs` (kind batch) with its log and outcome.
pub async fn recompute(
    plan: Arc<Plan>,
    state: &State,
    lake: &Lake,
    views: Option<&[String]>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<RunSummary, BatchError> {
    recompute_scaled(plan, state, lake, views, None, progress).await
}

/// How a run scales out: the thresholds of `batch:` and who computes the groups.
#[derive(Clone, Copy)]
pub struct ScaleOut<'a> {
    pub settings: BatchSettings,
    pub fanout: &'a dyn groups::Fanout,
}

/// [`recompute`], splitting views with at least `scale.settings.scale_out_segments` segments to
/// scan into group jobs handed to `scale.fanout`.
pub async fn recompute_scaled(
    plan: Arc<Plan>,
    state: &State,
    lake: &Lake,
    views: Option<&[String]>,
    scale: Option<ScaleOut<'_>>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<RunSummary, BatchError> {
    let pipeline = plan.pipeline().name.clone();
    let selected = select_views(&plan, views)?;
    let run = state.create_run(RunKind::Batch, &pipeline, None).await?;
    let run_id = run.id;
    state.start_run(run_id).await?;
    let started = Instant::now();
    let result = run_views(
        &plan, state, lake, run_id, &selected, scale, started, progress,
    )
    .await;
    match &result {
        Ok(summary) => {
            log(
                state,
                run_id,
                &format!(
                    "succeeded: {} view(s) in {:.2}s",
                    summary.views.len(),
                    summary.elapsed.as_secs_f64()
                ),
            )
            .await;
            state.finish_run(run_id, Outcome::Succeeded, None).await?;
        }
        Err(e) => {
            let msg = format!("{e:#}");
            log(state, run_id, &format!("failed: {msg}")).await;
            // The run's own error is the one to report; a state DB that also fails to record
            // it leaves the run `running`, which garbage collection treats as killed.
            if let Err(e) = state.finish_run(run_id, Outcome::Failed, Some(&msg)).await {
                tracing::warn!(run = run_id.0, error = %e, "cannot record the failed run");
            }
        }
    }
    result.map_err(BatchError::Other)
}

fn select_views(plan: &Plan, views: Option<&[String]>) -> Result<Vec<usize>, BatchError> {
    let all = &plan.pipeline().views;
    let Some(names) = views else {
        return Ok((0..all.len()).collect());
    };
    let mut out = Vec::new();
    for name in names {
        match all.iter().position(|v| &v.name == name) {
            Some(i) if !out.contains(&i) => out.push(i),
            Some(_) => {}
            None => {
                return Err(BatchError::UnknownView {
                    pipeline: plan.pipeline().name.clone(),
                    view: name.clone(),
                    known: all
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
    }
    Ok(out)
}

/// Appends a line to the run's log; a log that cannot be written does not fail the run.
async fn log(state: &State, run_id: RunId, line: &str) {
    tracing::info!(run = run_id.0, "{line}");
    if let Err(e) = state.append_run_log(run_id, &format!("{line}\n")).await {
        tracing::warn!(run = run_id.0, error = %e, "cannot append to the run log");
    }
}

/// The cutoff (every partition's checkpoint) and the sealed segments below it.
pub async fn sealed(state: &State, pipeline: &str) -> Result<(Cutoff, Vec<Segment>), StateError> {
    // Checkpoints first: a segment sealed after this read is above the cutoff and ignored.
    let cutoff = state.checkpoints(pipeline).await?;
    let segments = state
        .segments(pipeline)
        .await?
        .into_iter()
        .filter(|s| cutoff.get(&s.partition).is_some_and(|c| s.hi <= *c))
        .collect();
    Ok((cutoff, segments))
}

#[allow(clippy::too_many_arguments)]
async fn run_views(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    run_id: RunId,
    selected: &[usize],
    scale: Option<ScaleOut<'_>>,
    started: Instant,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> anyhow::Result<RunSummary> {
    let pipeline = plan.pipeline().name.clone();
    let (cutoff, segments) = sealed(state, &pipeline).await?;
    let total_rows: u64 = segments.iter().map(|s| s.rows).sum();
    progress(&Progress::Started {
        run_id,
        segments: segments.len(),
        rows: total_rows,
    });
    log(
        state,
        run_id,
        &format!(
            "cutoff {} ({} segments, {total_rows} events)",
            serde_json::to_string(&cutoff).unwrap_or_default(),
            segments.len()
        ),
    )
    .await;
    let mut prepared = Vec::with_capacity(selected.len());
    for &v in selected {
        let name = &plan.pipeline().views[v].name;
        prepared.push(
            prepare_view(plan, state, lake, v, &cutoff, &segments)
                .await
                .with_context(|| format!("view `{name}`"))?,
        );
    }
    let jobs = match scale {
        Some(scale) => fan_out(plan, state, lake, run_id, &prepared, scale).await?,
        None => vec![None; prepared.len()],
    };
    let scaled_out = jobs.iter().any(Option::is_some);
    let mut out = Vec::new();
    for (prep, jobs) in prepared.into_iter().zip(jobs) {
        let name = prep.name.clone();
        let summary = recompute_view(
            plan,
            state,
            lake,
            run_id,
            &cutoff,
            prep,
            jobs,
            &mut *progress,
        )
        .await
        .with_context(|| format!("view `{name}`"))?;
        log(
            state,
            run_id,
            &format!(
                "view {name}: {} over {} segment(s), {} events → publication {} ({} partial rows)",
                summary.mode.as_str(),
                summary.segments,
                summary.events,
                summary.publication.id,
                summary.publication.rows
            ),
        )
        .await;
        progress(&Progress::Published {
            view: name,
            mode: summary.mode,
            segments: summary.segments,
            rows: summary.events,
            partial_rows: summary.publication.rows,
        });
        out.push(summary);
    }
    if scaled_out {
        groups::clean(lake, &pipeline, run_id.0).await;
    }
    Ok(RunSummary {
        run_id,
        cutoff,
        views: out,
        elapsed: started.elapsed(),
    })
}

/// What a view's recompute starts from.
struct Prepared {
    view: usize,
    name: String,
    current: Option<Publication>,
    /// The publication an incremental run builds on.
    base: Option<Publication>,
    mode: Mode,
    /// The segments to scan.
    todo: Vec<Segment>,
}

async fn prepare_view(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    view: usize,
    cutoff: &Cutoff,
    segments: &[Segment],
) -> anyhow::Result<Prepared> {
    let pipeline = plan.pipeline().name.clone();
    let name = plan.pipeline().views[view].name.clone();
    let current = state.current_publication(&pipeline, &name).await?;
    if let Some(cur) = &current {
        collect_garbage(state, lake, &pipeline, &name, cur).await;
    }
    let hash = plan.logic_hash(view);
    // Incremental only on top of partials of the same logic, and never backwards (a cutoff
    // that went down would mean the manifest was reset: recompute).
    let base = current
        .as_ref()
        .filter(|c| {
            c.logic_hash == hash
                && c.cutoff
                    .iter()
                    .all(|(p, pos)| cutoff.get(p).is_some_and(|now| now >= pos))
        })
        .cloned();
    let (mode, todo): (Mode, Vec<Segment>) = match &base {
        Some(b) => (
            Mode::Incremental,
            segments
                .iter()
                .filter(|s| s.lo >= b.cutoff.get(&s.partition).copied().unwrap_or(0))
                .cloned()
                .collect(),
        ),
        None => (Mode::Full, segments.to_vec()),
    };
    Ok(Prepared {
        view,
        name,
        current,
        base,
        mode,
        todo,
    })
}

/// Splits the views with enough segments to scan into group jobs and submits them all at once;
/// views scanning the same segments share their jobs (each job computes all of them). Returns
/// each view's jobs (`None`: computed in this process).
async fn fan_out(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    run_id: RunId,
    prepared: &[Prepared],
    scale: ScaleOut<'_>,
) -> anyhow::Result<Vec<Option<Vec<groups::GroupJob>>>> {
    let threshold = scale.settings.scale_out_segments;
    let mut out = vec![None; prepared.len()];
    if threshold == 0 {
        return Ok(out);
    }
    groups::collect_stale(state, lake, &plan.pipeline().name, run_id.0).await;
    // Views with the same segments to scan, by their first member.
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    for (i, p) in prepared.iter().enumerate() {
        if p.todo.len() < threshold {
            continue;
        }
        match buckets.iter_mut().find(|b| prepared[b[0]].todo == p.todo) {
            Some(b) => b.push(i),
            None => buckets.push(vec![i]),
        }
    }
    let mut next_group = 0;
    for members in buckets {
        let views: Vec<usize> = members.iter().map(|&i| prepared[i].view).collect();
        let todo = &prepared[members[0]].todo;
        let jobs = groups::split(
            plan,
            &views,
            run_id.0,
            todo,
            scale.settings.group_segments,
            &mut next_group,
        );
        log(
            state,
            run_id,
            &format!(
                "views {}: {} segment(s) split into {} group job(s)",
                members
                    .iter()
                    .map(|&i| prepared[i].name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                todo.len(),
                jobs.len()
            ),
        )
        .await;
        scale.fanout.submit(&jobs).await?;
        for i in members {
            out[i] = Some(jobs.clone());
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn recompute_view(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    run_id: RunId,
    cutoff: &Cutoff,
    prep: Prepared,
    jobs: Option<Vec<groups::GroupJob>>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> anyhow::Result<ViewSummary> {
    let pipeline = plan.pipeline().name.clone();
    let Prepared {
        view,
        name,
        current,
        base,
        mode,
        todo,
    } = prep;
    let total = todo.len();
    let (mut done, mut rows) = (0usize, 0u64);
    let mut report = |segments: usize, events: u64| {
        done += segments;
        rows += events;
        progress(&Progress::Segments {
            view: name.clone(),
            done,
            total,
            rows,
        });
    };
    let fresh = match &jobs {
        Some(jobs) => {
            groups::collect(plan, lake, view, jobs, |job| {
                report(job.segments.len(), job.rows())
            })
            .await?
        }
        None => {
            let source = scan::open(lake, &todo, |s| report(1, s.rows)).await?;
            let p = plan.clone();
            tokio::task::spawn_blocking(move || scan::view_partials(&p, view, &source))
                .await
                .context("batch computation panicked")??
        }
    };
    let previous = match &base {
        Some(b) => Some(
            load_partials(plan, lake, view, b)
                .await
                .with_context(|| format!("loading publication {} (run {})", b.id, b.run_id))?,
        ),
        None => None,
    };
    let p = plan.clone();
    let mut partials = tokio::task::spawn_blocking(move || -> PolarsResult<DataFrame> {
        match previous {
            Some(old) => p.merge(view, vec![old, fresh]),
            None => Ok(fresh),
        }
    })
    .await
    .context("batch computation panicked")??;

    let partial_rows = partials.height() as u64;
    let mut bytes = Vec::new();
    plan.write_partials(view, &mut partials, &mut bytes)?;
    let path = format!(
        "{}{PARTIALS_FILE}",
        lake::view_run_prefix(&pipeline, &name, run_id.0)
    );
    lake.put(&path, bytes).await?;
    let publication = state
        .publish(&NewPublication {
            pipeline: pipeline.clone(),
            view: name.clone(),
            run_id,
            logic_hash: plan.logic_hash(view),
            cutoff: cutoff.clone(),
            rows: partial_rows,
            replaces: current.as_ref().map(|c| c.id),
        })
        .await?;
    Ok(ViewSummary {
        view: name,
        mode,
        segments: total,
        events: todo.iter().map(|s| s.rows).sum(),
        publication,
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
    let prefix = lake::view_run_prefix(
        &publication.pipeline,
        &publication.view,
        publication.run_id.0,
    );
    let files = lake.list(&prefix).await?;
    anyhow::ensure!(
        !files.is_empty(),
        "no partials under {prefix} for publication {}",
        publication.id
    );
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

/// Deletes the files of view versions replaced at least [`GRACE`] ago: every version but the
/// current one was replaced no later than the current one was published. Runs still going
/// (not finished, started within the grace period) keep their files. Failures are logged, never fatal.
async fn collect_garbage(
    state: &State,
    lake: &Lake,
    pipeline: &str,
    view: &str,
    current: &Publication,
) {
    let age = chrono::Utc::now() - current.published_at;
    if age.to_std().is_ok_and(|a| a < GRACE) || age < chrono::TimeDelta::zero() {
        return;
    }
    let prefix = lake::view_prefix(pipeline, view);
    let files = match lake.list(&prefix).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(%pipeline, %view, error = %e, "cannot list old view versions");
            return;
        }
    };
    for f in files {
        let Some(run) = run_of(&f.path, &prefix) else {
            continue;
        };
        if run == current.run_id.0 {
            continue;
        }
        // A run still going may publish these files.
        match still_going(state, run).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(run, error = %e, "cannot read run; keeping its view files");
                continue;
            }
        }
        match lake.delete(&f.path).await {
            Ok(()) => tracing::info!(path = %f.path, "collected old view version"),
            Err(e) => tracing::warn!(path = %f.path, error = %e, "cannot delete old view file"),
        }
    }
}

/// The run of a lake path `{prefix}run={id}/…`.
pub(crate) fn run_of(path: &str, prefix: &str) -> Option<i64> {
    path.strip_prefix(prefix)?
        .strip_prefix("run=")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// Whether run `id` may still write to the lake: it has not finished and started less than
/// [`GRACE`] ago (one "running" for longer was killed and never will).
pub(crate) async fn still_going(state: &State, id: i64) -> Result<bool, StateError> {
    Ok(state.run(RunId(id)).await?.is_some_and(|r| {
        !r.state.is_finished()
            && (chrono::Utc::now() - r.created_at)
                .to_std()
                .is_ok_and(|a| a < GRACE)
    }))
}
