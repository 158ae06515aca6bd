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
//! - With [`ScaleOut`], a run with a view with many segments to scan is computed as groups by
//!   any number of workers and merged and published by a final job ([`groups`]); without it,
//!   or for small inputs, in this process.

pub mod groups;
pub mod maintenance;
pub mod scan;
pub mod verify;

#[cfg(test)]
pub(crate) mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use polars::prelude::*;

use crate::lake::{self, Lake};
use crate::plan::Plan;
use crate::spec::BatchSettings;
use crate::state::{
    Cutoff, NewPublication, Outcome, Publication, PublicationId, RunId, RunKind, Segment, State,
    StateError,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

impl Progress {
    /// The line a published view is reported with (`run --wait`, a `batch` task's log):
    /// `VIEW: published (MODE, N segment(s), N events, N groups)`; None for other progress.
    pub fn published_line(&self) -> Option<String> {
        let Progress::Published {
            view,
            mode,
            segments,
            rows,
            partial_rows,
        } = self
        else {
            return None;
        };
        Some(format!(
            "{view}: published ({}, {segments} segment(s), {rows} events, {partial_rows} groups)",
            mode.as_str()
        ))
    }
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
    /// Notified when the run's jobs stall (see [`groups::wait`]); `None`: never help.
    pub help: Option<&'a tokio::sync::Notify>,
}

/// [`recompute`]; when a view has at least `scale.settings.scale_out_segments` segments to scan,
/// every view is split into group jobs handed to `scale.fanout`, and the run's finish job (in
/// whichever process takes it) publishes and records the outcome: this process only waits.
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
    // Set once the outcome is for a scaled-out run's finish job to record.
    let mut handed_over = false;
    let result = run_views(
        &plan,
        state,
        lake,
        run_id,
        &selected,
        scale,
        started,
        &mut handed_over,
        progress,
    )
    .await;
    match &result {
        _ if handed_over => {}
        Ok(summary) => {
            let ended = Ok(summary.views.len());
            end_run(state, run_id, ended, summary.elapsed).await?;
        }
        Err(e) => {
            // The run's own error is the one to report; a state DB that also fails to record
            // it leaves the run `running`, which garbage collection treats as killed.
            let ended = Err(format!("{e:#}"));
            if let Err(e) = end_run(state, run_id, ended, started.elapsed()).await {
                tracing::warn!(run = run_id.0, error = %e, "cannot record the failed run");
            }
        }
    }
    result.map_err(BatchError::Other)
}

/// Logs how a run ended — `Ok(n)`: it published `n` views; `Err(why)` — and records it.
pub(crate) async fn end_run(
    state: &State,
    run_id: RunId,
    ended: Result<usize, String>,
    took: Duration,
) -> Result<(), StateError> {
    let (outcome, error) = match ended {
        Ok(views) => {
            let line = format!("succeeded: {views} view(s) in {:.2}s", took.as_secs_f64());
            log(state, run_id, &line).await;
            (Outcome::Succeeded, None)
        }
        Err(why) => {
            log(state, run_id, &format!("failed: {why}")).await;
            (Outcome::Failed, Some(why))
        }
    };
    state.finish_run(run_id, outcome, error.as_deref()).await?;
    Ok(())
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
pub(crate) async fn log(state: &State, run_id: RunId, line: &str) {
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
    handed_over: &mut bool,
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
    if let Some(scale) = scale
        && let Some((finish, jobs)) =
            fan_out(plan, state, lake, run_id, &cutoff, &prepared, scale).await?
    {
        groups::start(lake, scale.fanout, &finish, &jobs).await?;
        *handed_over = true;
        let line = format!(
            "queued the run's batch jobs: {} group(s); the last one queues the finish job, which publishes",
            jobs.len()
        );
        log(state, run_id, &line).await;
        let views = wait_for_finish(state, scale, &finish, &jobs, prepared, progress).await?;
        return Ok(RunSummary {
            run_id,
            cutoff,
            views,
            elapsed: started.elapsed(),
        });
    }
    let mut out = Vec::new();
    for prep in prepared {
        let name = prep.name.clone();
        let summary = recompute_view(plan, state, lake, run_id, &cutoff, prep, &mut *progress)
            .await
            .with_context(|| format!("view `{name}`"))?;
        log(
            state,
            run_id,
            &view_line(
                &name,
                summary.mode,
                summary.segments,
                summary.events,
                &summary.publication,
            ),
        )
        .await;
        published(&mut *progress, &summary);
        out.push(summary);
    }
    Ok(RunSummary {
        run_id,
        cutoff,
        views: out,
        elapsed: started.elapsed(),
    })
}

/// The run log's line for a published view.
pub(crate) fn view_line(
    name: &str,
    mode: Mode,
    segments: usize,
    events: u64,
    publication: &Publication,
) -> String {
    format!(
        "view {name}: {} over {segments} segment(s), {events} events → publication {} ({} partial rows)",
        mode.as_str(),
        publication.id,
        publication.rows
    )
}

fn published(progress: &mut (dyn FnMut(&Progress) + Send), summary: &ViewSummary) {
    progress(&Progress::Published {
        view: summary.view.clone(),
        mode: summary.mode,
        segments: summary.segments,
        rows: summary.events,
        partial_rows: summary.publication.rows,
    });
}

/// Waits for a scaled-out run's finish job, reporting groups as they end; the views' summaries.
async fn wait_for_finish(
    state: &State,
    scale: ScaleOut<'_>,
    finish: &groups::FinishJob,
    jobs: &[groups::GroupJob],
    prepared: Vec<Prepared>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> anyhow::Result<Vec<ViewSummary>> {
    let mut done = vec![(0usize, 0u64); finish.views.len()];
    let publications = groups::wait(state, scale.fanout, finish, scale.help, |g| {
        let Some(job) = jobs.get(g as usize) else {
            return;
        };
        for (view, (segments, rows)) in finish.views.iter().zip(done.iter_mut()) {
            if view.groups.contains(&g) {
                *segments += job.segments.len();
                *rows += job.rows();
                progress(&Progress::Segments {
                    view: view.name.clone(),
                    done: *segments,
                    total: view.segments,
                    rows: *rows,
                });
            }
        }
    })
    .await?;
    let mut out = Vec::with_capacity(prepared.len());
    for prep in prepared {
        let publication = publications
            .iter()
            .find(|p| p.view == prep.name)
            .cloned()
            .with_context(|| format!("the run succeeded without publishing `{}`", prep.name))?;
        let summary = ViewSummary {
            view: prep.name,
            mode: prep.mode,
            segments: prep.todo.len(),
            events: prep.todo.iter().map(|s| s.rows).sum(),
            publication,
        };
        published(&mut *progress, &summary);
        out.push(summary);
    }
    Ok(out)
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

/// When some view has at least `scale_out_segments` segments to scan: splits every view into
/// group jobs (views scanning the same segments share them: each job computes all of them)
/// and describes the run's finish job. `None`: the run stays in this process.
async fn fan_out(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    run_id: RunId,
    cutoff: &Cutoff,
    prepared: &[Prepared],
    scale: ScaleOut<'_>,
) -> anyhow::Result<Option<(groups::FinishJob, Vec<groups::GroupJob>)>> {
    let threshold = scale.settings.scale_out_segments;
    if threshold == 0 || prepared.iter().all(|p| p.todo.len() < threshold) {
        return Ok(None);
    }
    groups::collect_stale(state, lake, &plan.pipeline().name, run_id.0).await;
    // Views with the same segments to scan, by their first member.
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    for (i, p) in prepared.iter().enumerate() {
        match buckets.iter_mut().find(|b| prepared[b[0]].todo == p.todo) {
            Some(b) => b.push(i),
            None => buckets.push(vec![i]),
        }
    }
    let mut jobs = Vec::new();
    let mut ranges = vec![0..0; prepared.len()];
    let mut next_group = 0;
    for members in buckets {
        let views: Vec<usize> = members.iter().map(|&i| prepared[i].view).collect();
        let todo = &prepared[members[0]].todo;
        let first = next_group;
        let bucket = groups::split(
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
                bucket.len()
            ),
        )
        .await;
        for i in members {
            ranges[i] = first..next_group;
        }
        jobs.extend(bucket);
    }
    for job in &mut jobs {
        job.of = next_group;
    }
    let finish = groups::FinishJob {
        pipeline: plan.pipeline().name.clone(),
        run_id: run_id.0,
        cutoff: cutoff.clone(),
        groups: next_group,
        views: prepared
            .iter()
            .zip(ranges)
            .map(|(p, groups)| groups::FinishView {
                name: p.name.clone(),
                logic_hash: plan.logic_hash(p.view),
                mode: p.mode,
                groups,
                base_run: p.base.as_ref().map(|b| b.run_id.0),
                replaces: p.current.as_ref().map(|c| c.id.0),
                segments: p.todo.len(),
                events: p.todo.iter().map(|s| s.rows).sum(),
            })
            .collect(),
    };
    Ok(Some((finish, jobs)))
}

async fn recompute_view(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    run_id: RunId,
    cutoff: &Cutoff,
    prep: Prepared,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> anyhow::Result<ViewSummary> {
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
    let source = scan::open(lake, &todo, |s| {
        done += 1;
        rows += s.rows;
        progress(&Progress::Segments {
            view: name.clone(),
            done,
            total,
            rows,
        });
    })
    .await?;
    let p = plan.clone();
    let fresh = tokio::task::spawn_blocking(move || scan::view_partials(&p, view, &source))
        .await
        .context("batch computation panicked")??;
    let publication = publish_view(
        plan,
        state,
        lake,
        run_id,
        cutoff,
        view,
        fresh,
        base.map(|b| b.run_id),
        current.map(|c| c.id),
    )
    .await?;
    Ok(ViewSummary {
        view: name,
        mode,
        segments: total,
        events: todo.iter().map(|s| s.rows).sum(),
        publication,
    })
}

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
    replaces: Option<PublicationId>,
) -> anyhow::Result<Publication> {
    let pipeline = plan.pipeline().name.clone();
    let name = plan.pipeline().views[view].name.clone();
    let previous = match base_run {
        Some(base) => Some(
            load_run_partials(plan, lake, view, base)
                .await
                .with_context(|| format!("loading the publication of run {base}"))?,
        ),
        None => None,
    };
    let horizon_ms = match replaces {
        Some(id) => state
            .current_publication(&pipeline, &name)
            .await?
            .filter(|c| c.id == id)
            .and_then(|c| c.horizon_ms),
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
    let path = format!(
        "{}{PARTIALS_FILE}",
        lake::view_run_prefix(&pipeline, &name, run_id.0)
    );
    lake.put(&path, bytes).await?;
    Ok(state
        .publish(&NewPublication {
            pipeline,
            view: name,
            run_id,
            logic_hash: plan.logic_hash(view),
            cutoff: cutoff.clone(),
            rows: partial_rows,
            replaces,
            horizon_ms,
        })
        .await?)
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
