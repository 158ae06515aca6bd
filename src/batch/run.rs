//! One batch run: its cutoff, the views it recomputes (full or incremental), and how it ends.
//! Without scale-out (or below its threshold) every view is computed here, in this process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::scaleout::{self, ScaleOut};
use super::{BatchError, Mode, Progress, RunSummary, ViewSummary, gc, publish, scan};
use crate::lake::Lake;
use crate::plan::{LookupSet, Plan};
use crate::speed::lookups::Lookups;
use crate::state::{Cutoff, Outcome, Publication, RunId, RunKind, Segment, State, StateError};

/// What a run recomputes: which views, and whether from every segment.
#[derive(Debug, Clone, Copy)]
pub struct Select<'a> {
    /// Only these views (every view when `None`).
    pub views: Option<&'a [String]>,
    /// From every sealed segment, even where the current publication was computed by the same
    /// logic and the run could build on it (`lambda-ctl run --full`).
    pub full: bool,
    /// `lambda-ctl run --refresh-lookups`: these versions (the lookups' current tables)
    /// become the recorded versions of every segment of the cutoff, and every view is
    /// recomputed from every segment with them — history restated with today's reference
    /// data. Without it, each segment is recomputed with the versions it recorded.
    pub lookups: Option<&'a LookupSet>,
    /// `serve.history`: view versions served within it stay (for `as_of` answers) when GC
    /// collects replaced ones.
    pub history: Duration,
    /// `run --candidate`: each view is recomputed from every segment and recorded as its
    /// candidate version beside the live one, which stays current (blue/green).
    pub candidate: bool,
}

impl Default for Select<'_> {
    fn default() -> Self {
        Select {
            views: None,
            full: false,
            lookups: None,
            history: crate::spec::settings::DEFAULT_HISTORY,
            candidate: false,
        }
    }
}

/// Recomputes the views `select` names of the plan's pipeline and publishes them; the run is
/// recorded in `runs` (kind batch) with its log and outcome.
pub async fn recompute(
    plan: Arc<Plan>,
    state: &State,
    lake: &Lake,
    select: Select<'_>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<RunSummary, BatchError> {
    recompute_scaled(plan, state, lake, select, None, progress).await
}

/// [`recompute`]; when a view has at least `scale.settings.scale_out_segments` segments to scan,
/// every view is split into group jobs handed to `scale.fanout`, and the run's finish job (in
/// whichever process takes it) publishes and records the outcome: this process only waits.
pub async fn recompute_scaled(
    plan: Arc<Plan>,
    state: &State,
    lake: &Lake,
    select: Select<'_>,
    scale: Option<ScaleOut<'_>>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<RunSummary, BatchError> {
    let pipeline = plan.pipeline().name.clone();
    let selected = select_views(&plan, select.views)?;
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
        (
            &selected,
            select.full || select.lookups.is_some() || select.candidate,
        ),
        (select.lookups, select.history, select.candidate),
        // A candidate run is one process's: its finish job would make the views current.
        scale.filter(|_| !select.candidate),
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
    (selected, full): (&[usize], bool),
    (restate, history, candidate): (Option<&LookupSet>, Duration, bool),
    scale: Option<ScaleOut<'_>>,
    started: Instant,
    handed_over: &mut bool,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> anyhow::Result<RunSummary> {
    let pipeline = plan.pipeline().name.clone();
    let (cutoff, mut segments) = sealed(state, &pipeline).await?;
    if let Some(set) = restate {
        let record = set.record();
        state
            .record_lookups(&pipeline, run_id, &segments, record.as_deref())
            .await?;
        for s in &mut segments {
            s.lookups = record.clone();
        }
        let versions: Vec<String> = set
            .tables()
            .iter()
            .map(|t| format!("{}={} ({} rows)", t.name(), t.version(), t.rows()))
            .collect();
        log(
            state,
            run_id,
            &format!(
                "--refresh-lookups: {} segment(s) now recorded with the current lookup versions {}; recomputing every view from every segment",
                segments.len(),
                if versions.is_empty() {
                    "(the pipeline has no lookups)".to_string()
                } else {
                    versions.join(", ")
                }
            ),
        )
        .await;
    }
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
    // Read after this run's own restatement, if any: a view it does not publish (`--views`,
    // or the run fails) is recomputed in full by the next run.
    let restated = state.restated_by(&pipeline).await?;
    let mut prepared = Vec::with_capacity(selected.len());
    for &v in selected {
        let name = &plan.pipeline().views[v].name;
        let prep = prepare_view(
            plan,
            state,
            lake,
            v,
            (&cutoff, full, restated, history),
            &segments,
        )
        .await
        .with_context(|| format!("view `{name}`"))?;
        if let (Some(r), Some(cur)) = (restated, &prep.current)
            && !full
            && cur.run_id < r
        {
            let line = format!(
                "view {name}: publication {} (run {}) predates run {}'s restatement of the lookup versions: recomputing from every segment",
                cur.id, cur.run_id.0, r.0
            );
            log(state, run_id, &line).await;
        }
        prepared.push(prep);
    }
    if let Some(scale) = scale
        && let Some((finish, jobs)) =
            scaleout::fan_out(plan, state, lake, run_id, &cutoff, &prepared, scale).await?
    {
        scaleout::start(lake, scale.fanout, &finish, &jobs).await?;
        *handed_over = true;
        let line = format!(
            "queued the run's batch jobs: {} group(s); the last one queues the finish job, which publishes",
            jobs.len()
        );
        log(state, run_id, &line).await;
        let views =
            scaleout::wait_for_finish(state, scale, &finish, &jobs, prepared, progress).await?;
        return Ok(RunSummary {
            run_id,
            cutoff,
            views,
            elapsed: started.elapsed(),
        });
    }
    // One reader for every view: each recorded version is indexed once per run.
    let lookups = Lookups::reader(plan.pipeline(), lake);
    // Views that scan the same segments (all of them, in a full run) share one scan.
    let mut scans: Vec<Vec<Prepared>> = Vec::new();
    for prep in prepared {
        match scans
            .iter_mut()
            .find(|g| same_segments(&g[0].todo, &prep.todo))
        {
            Some(g) => g.push(prep),
            None => scans.push(vec![prep]),
        }
    }
    let mut out = Vec::new();
    for group in scans {
        let names: Vec<&str> = group.iter().map(|p| p.name.as_str()).collect();
        let context = format!("view `{}`", names.join("`, `"));
        let fresh = scan_views(plan, lake, &lookups, &group, &mut *progress)
            .await
            .context(context)?;
        for (prep, fresh) in group.into_iter().zip(fresh) {
            let name = prep.name.clone();
            let summary = publish_fresh(plan, state, lake, run_id, &cutoff, prep, fresh, candidate)
                .await
                .with_context(|| format!("view `{name}`"))?;
            let mut line = view_line(
                &name,
                summary.mode,
                summary.segments,
                summary.events,
                &summary.publication,
            );
            if candidate {
                line.push_str(", the view's candidate (the live version stays current)");
            }
            log(state, run_id, &line).await;
            published(&mut *progress, &summary);
            out.push(summary);
        }
    }
    Ok(RunSummary {
        run_id,
        cutoff,
        views: out,
        elapsed: started.elapsed(),
    })
}

fn same_segments(a: &[Segment], b: &[Segment]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x.partition, x.lo, x.hi) == (y.partition, y.lo, y.hi))
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

pub(super) fn published(progress: &mut (dyn FnMut(&Progress) + Send), summary: &ViewSummary) {
    progress(&Progress::Published {
        view: summary.view.clone(),
        mode: summary.mode,
        segments: summary.segments,
        rows: summary.events,
        partial_rows: summary.publication.rows,
        candidate: summary.candidate,
    });
}

/// What a view's recompute starts from.
pub(super) struct Prepared {
    pub(super) view: usize,
    pub(super) name: String,
    pub(super) current: Option<Publication>,
    /// The publication an incremental run builds on.
    pub(super) base: Option<Publication>,
    pub(super) mode: Mode,
    /// The segments to scan.
    pub(super) todo: Vec<Segment>,
}

async fn prepare_view(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    view: usize,
    (cutoff, full, restated, history): (&Cutoff, bool, Option<RunId>, Duration),
    segments: &[Segment],
) -> anyhow::Result<Prepared> {
    let pipeline = plan.pipeline().name.clone();
    let name = plan.pipeline().views[view].name.clone();
    let current = state.current_publication(&pipeline, &name).await?;
    if let Some(cur) = &current {
        gc::collect_garbage(state, lake, &pipeline, &name, cur, history).await;
    }
    let hash = plan.logic_hash(view);
    // Incremental only on top of partials of the same logic, and never backwards (a cutoff
    // that went down would mean the manifest was reset: recompute); never when asked for full,
    // nor on partials computed before the segments' lookup versions were restated.
    let base = current
        .as_ref()
        .filter(|c| {
            !full
                && c.logic_hash == hash
                && restated.is_none_or(|r| c.run_id >= r)
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

/// Fresh partials of every view of `group` (views to scan the same segments), in one scan.
async fn scan_views(
    plan: &Arc<Plan>,
    lake: &Lake,
    lookups: &Lookups,
    group: &[Prepared],
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> anyhow::Result<Vec<polars::prelude::DataFrame>> {
    let todo = &group[0].todo;
    let total = todo.len();
    let (mut done, mut rows) = (0usize, 0u64);
    let views: Vec<usize> = group.iter().map(|prep| prep.view).collect();
    scan::scan_partials(
        plan,
        lake,
        lookups,
        (todo, scan::CHUNK_EVENTS),
        &views,
        |s| {
            done += 1;
            rows += s.rows;
            for prep in group {
                progress(&Progress::Segments {
                    view: prep.name.clone(),
                    done,
                    total,
                    rows,
                });
            }
        },
    )
    .await
}

/// Publishes a view's fresh partials (merged onto its base in an incremental run), or records
/// them as its `candidate`.
#[allow(clippy::too_many_arguments)]
async fn publish_fresh(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    run_id: RunId,
    cutoff: &Cutoff,
    prep: Prepared,
    fresh: polars::prelude::DataFrame,
    candidate: bool,
) -> anyhow::Result<ViewSummary> {
    let publication = publish::publish_view(
        plan,
        state,
        lake,
        run_id,
        cutoff,
        prep.view,
        fresh,
        prep.base.map(|b| b.run_id),
        (prep.current.map(|c| c.id), candidate),
    )
    .await?;
    Ok(ViewSummary {
        view: prep.name,
        mode: prep.mode,
        segments: prep.todo.len(),
        events: prep.todo.iter().map(|s| s.rows).sum(),
        publication,
        candidate,
    })
}
