//! Batch scale-out (DESIGN.md §4): when a view has many segments to scan, every view of the run
//! is computed as groups of segments, one [`GroupJob`] each (views scanning the same segments
//! share the jobs: a group's segments are read once for all of them), and one final
//! [`FinishJob`] merges and publishes. Any process working the queue (`lambda-ctl worker`,
//! `serve`, or the process that started the run) takes either kind: a group's partials are
//! computed with the same plan and written to the run's scratch prefix in the lake; the group
//! that completes the set queues the finish job, which merges every group's partials (the merge
//! is associative and commutative) with the published ones, writes each view and publishes it
//! with the usual compare-and-set, then ends the run. The run's own process only splits and
//! waits: if it dies, the run still publishes; if a run fails, it publishes nothing more.
//!
//! The jobs report to each other through the state DB: a group's row in `batch_groups` says a
//! worker took it, then that its partials are in the lake (or why it could not be computed);
//! counting the ended rows tells the group that completes the set — a few statements per
//! group, however many groups the run has — and the waiting run sees whether anything moves.
//! A worker killed mid-job leaves its group taken but not ended; the queue delivers the job
//! again to another worker (apalis notices the missing heartbeats), which writes the same
//! files. The finish job's description is `finish.json` in the scratch prefix, written before
//! any group is queued.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Range;
use std::sync::Arc;

use anyhow::Context;
use futures::future::BoxFuture;
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::run::Prepared;
use super::{Mode, Progress, ViewSummary, scan};
use crate::lake::{self, Lake, LakeError};
use crate::plan::Plan;
use crate::spec::BatchSettings;
use crate::speed::lookups::Lookups;
use crate::state::{Cutoff, GroupEnd, PublicationId, RunId, Segment, State, StateError};

/// One group of segments of one run, for one or more views.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupJob {
    pub pipeline: String,
    pub views: Vec<GroupView>,
    pub run_id: i64,
    /// Unique within the run: `0..of`.
    pub group: u32,
    /// How many groups the run has.
    pub of: u32,
    pub segments: Vec<GroupSegment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub name: String,
    /// The logic the run computes; a worker whose project compiles to another refuses the job.
    pub logic_hash: String,
}

/// The part of a [`Segment`] a group needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSegment {
    pub partition: u32,
    pub lo: u64,
    pub hi: u64,
    pub path: String,
    pub rows: u64,
    /// The lookup versions the segment recorded (absent from jobs queued before lookups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookups: Option<String>,
    /// The file's size and CRC-32 as the manifest recorded them, checked before the file is
    /// decoded (absent from jobs queued before they were carried: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
}

/// The last job of a scaled-out run: merge the groups' partials, publish every view, end the
/// run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishJob {
    pub pipeline: String,
    pub run_id: i64,
    pub cutoff: Cutoff,
    /// How many groups the run has.
    pub groups: u32,
    pub views: Vec<FinishView>,
}

impl GroupView {
    fn identity(&self) -> (&str, &str) {
        (&self.name, &self.logic_hash)
    }
}

/// What the finish job does for one view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishView {
    pub name: String,
    pub logic_hash: String,
    pub mode: Mode,
    /// The groups computing this view's new segments (empty: nothing new to scan).
    pub groups: Range<u32>,
    /// The run whose published partials an incremental run builds on.
    pub base_run: Option<i64>,
    /// The publication current when the run started (compare-and-set).
    pub replaces: Option<i64>,
    pub segments: usize,
    pub events: u64,
}

impl FinishView {
    fn identity(&self) -> (&str, &str) {
        (&self.name, &self.logic_hash)
    }
}

impl GroupJob {
    /// Where the group's partials of `view` appear when they are done.
    pub fn partials_path(&self, view: &str) -> String {
        partials_path(&self.pipeline, self.run_id, self.group, view)
    }

    fn segments(&self) -> Vec<Segment> {
        self.segments
            .iter()
            .map(|s| Segment {
                pipeline: self.pipeline.clone(),
                partition: s.partition,
                lo: s.lo,
                hi: s.hi,
                path: s.path.clone(),
                rows: s.rows,
                bytes: s.bytes.unwrap_or(0),
                dead_letters: 0,
                min_event_ms: None,
                max_event_ms: None,
                lookups: s.lookups.clone(),
                crc32: s.crc32,
            })
            .collect()
    }

    pub fn rows(&self) -> u64 {
        self.segments.iter().map(|s| s.rows).sum()
    }
}

fn group_stem(pipeline: &str, run_id: i64, group: u32) -> String {
    format!(
        "{}group-{group:06}",
        lake::run_scratch_prefix(pipeline, run_id)
    )
}

fn partials_path(pipeline: &str, run_id: i64, group: u32, view: &str) -> String {
    format!("{}/{view}.parquet", group_stem(pipeline, run_id, group))
}

fn finish_path(pipeline: &str, run_id: i64) -> String {
    format!("{}finish.json", lake::run_scratch_prefix(pipeline, run_id))
}

/// Hands jobs to whoever computes them (the job queue, in orchestration). Pushing a job that
/// is queued already must be a no-op: the finish job may be submitted more than once.
pub trait Fanout: Send + Sync {
    fn submit<'a>(&'a self, jobs: &'a [GroupJob]) -> BoxFuture<'a, anyhow::Result<()>>;
    fn finish<'a>(&'a self, job: &'a FinishJob) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// How a run scales out: the thresholds of `batch:` and who computes the groups.
#[derive(Clone, Copy)]
pub struct ScaleOut<'a> {
    pub settings: BatchSettings,
    pub fanout: &'a dyn Fanout,
    /// Notified when the run's jobs stall (see [`wait`]); `None`: never help.
    pub help: Option<&'a tokio::sync::Notify>,
}

/// Waits for a scaled-out run's finish job, reporting groups as they end; the views' summaries.
pub(super) async fn wait_for_finish(
    state: &State,
    scale: ScaleOut<'_>,
    finish: &FinishJob,
    jobs: &[GroupJob],
    prepared: Vec<Prepared>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> anyhow::Result<Vec<ViewSummary>> {
    let mut done = vec![(0usize, 0u64); finish.views.len()];
    let publications = wait(state, scale.fanout, finish, scale.help, |g| {
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
            candidate: false,
        };
        super::run::published(&mut *progress, &summary);
        out.push(summary);
    }
    Ok(out)
}

/// When some view has at least `scale_out_segments` segments to scan: splits every view into
/// group jobs (views scanning the same segments share them: each job computes all of them)
/// and describes the run's finish job. `None`: the run stays in this process.
pub(super) async fn fan_out(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    run_id: RunId,
    cutoff: &Cutoff,
    prepared: &[Prepared],
    scale: ScaleOut<'_>,
) -> anyhow::Result<Option<(FinishJob, Vec<GroupJob>)>> {
    let threshold = scale.settings.scale_out_segments;
    if threshold == 0 || prepared.iter().all(|p| p.todo.len() < threshold) {
        return Ok(None);
    }
    collect_stale(state, lake, &plan.pipeline().name, run_id.0).await;
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
        let bucket = split(
            plan,
            &views,
            run_id.0,
            todo,
            scale.settings.group_segments,
            &mut next_group,
        );
        super::log(
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
    let finish = FinishJob {
        pipeline: plan.pipeline().name.clone(),
        run_id: run_id.0,
        cutoff: cutoff.clone(),
        groups: next_group,
        views: prepared
            .iter()
            .zip(ranges)
            .map(|(p, groups)| FinishView {
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

/// Splits `segments` (position order) into groups of `size` segments, one job each computing
/// `views`; groups are numbered from `next_group` on. `of` is filled in by the caller once
/// every view is split.
pub fn split(
    plan: &Plan,
    views: &[usize],
    run_id: i64,
    segments: &[Segment],
    size: usize,
    next_group: &mut u32,
) -> Vec<GroupJob> {
    let views: Vec<GroupView> = views
        .iter()
        .map(|&v| GroupView {
            name: plan.pipeline().views[v].name.clone(),
            logic_hash: plan.logic_hash(v),
        })
        .collect();
    segments
        .chunks(size.max(1))
        .map(|chunk| GroupJob {
            pipeline: plan.pipeline().name.clone(),
            views: views.clone(),
            run_id,
            group: {
                *next_group += 1;
                *next_group - 1
            },
            of: 0,
            segments: chunk
                .iter()
                .map(|s| GroupSegment {
                    partition: s.partition,
                    lo: s.lo,
                    hi: s.hi,
                    path: s.path.clone(),
                    rows: s.rows,
                    lookups: s.lookups.clone(),
                    bytes: Some(s.bytes),
                    crc32: s.crc32,
                })
                .collect(),
        })
        .collect()
}

/// Queues a run's jobs: the finish job's description first (a group completing the set reads
/// it), then the groups.
pub async fn start(
    lake: &Lake,
    fanout: &dyn Fanout,
    finish: &FinishJob,
    jobs: &[GroupJob],
) -> anyhow::Result<()> {
    let description = serde_json::to_vec(finish).context("describing the finish job")?;
    lake.put(&finish_path(&finish.pipeline, finish.run_id), description)
        .await?;
    fanout.submit(jobs).await
}

/// What a worker does with a group job: computes the group's partials and writes them
/// (replacing those of an earlier delivery, which are identical), then records the group as
/// ended; an error is recorded instead, for the finish job to report, and returned for the
/// worker's log. Returns the finish job when this group completed the run's set (the caller
/// queues it).
pub async fn compute(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    worker: &str,
    job: &GroupJob,
) -> anyhow::Result<(Option<FinishJob>, anyhow::Result<()>)> {
    // The queue delivers at least once: a group done already (or a run finished and cleaned
    // up) is not computed again.
    let run_id = RunId(job.run_id);
    if state.batch_group_ended(run_id, job.group).await?
        || !lake.exists(&finish_path(&job.pipeline, job.run_id)).await?
    {
        tracing::info!(
            run = job.run_id,
            group = job.group,
            "batch group delivered again after it was done; skipped"
        );
        return Ok((None, Ok(())));
    }
    state.start_batch_group(run_id, job.group, worker).await?;
    let started = std::time::Instant::now();
    let result = compute_inner(plan, lake, job).await;
    let end = GroupEnd {
        worker: worker.to_string(),
        took: started.elapsed(),
        error: result.as_ref().err().map(|e| format!("{e:#}")),
    };
    Ok((record(state, lake, job, &end).await?, result))
}

/// What a worker does with a group job, logging how it went: computes it with `plan` (see
/// [`compute`]) or, when the worker has no plan for the job's pipeline, records why, for the
/// run to fail with. Returns the finish job when this group completed the run's set (the
/// caller queues it); an error means the outcome could not be recorded.
pub async fn work_group(
    plan: anyhow::Result<Arc<Plan>>,
    state: &State,
    lake: &Lake,
    worker: &str,
    job: &GroupJob,
) -> anyhow::Result<Option<FinishJob>> {
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => return refuse(state, lake, worker, job, &format!("{e:#}")).await,
    };
    info!(
        %worker, run = job.run_id, group = job.group,
        segments = job.segments.len(), "computing batch group"
    );
    let started = std::time::Instant::now();
    let (finish, outcome) = compute(&plan, state, lake, worker, job).await?;
    match outcome {
        Ok(()) => info!(
            %worker, run = job.run_id, group = job.group,
            segments = job.segments.len(), ms = started.elapsed().as_millis() as u64,
            "computed batch group"
        ),
        Err(e) => warn!(
            %worker, run = job.run_id, group = job.group,
            error = %format!("{e:#}"), "batch group failed"
        ),
    }
    Ok(finish)
}

/// Records a group's error when it cannot even be started (its pipeline is unknown here), and
/// returns the finish job if that completed the set.
async fn refuse(
    state: &State,
    lake: &Lake,
    worker: &str,
    job: &GroupJob,
    why: &str,
) -> anyhow::Result<Option<FinishJob>> {
    let end = GroupEnd {
        worker: worker.to_string(),
        took: std::time::Duration::ZERO,
        error: Some(why.to_string()),
    };
    record(state, lake, job, &end).await
}

/// Records how a group ended; the run's finish job when that completed the set.
async fn record(
    state: &State,
    lake: &Lake,
    job: &GroupJob,
    end: &GroupEnd,
) -> anyhow::Result<Option<FinishJob>> {
    let ended = state
        .end_batch_group(RunId(job.run_id), job.group, end)
        .await?;
    if ended < job.of {
        return Ok(None);
    }
    let (pipeline, run_id) = (&job.pipeline, job.run_id);
    let bytes = match lake.get(&finish_path(pipeline, run_id)).await {
        Ok(b) => b,
        // The finish job has run and cleaned up: this was a late second delivery.
        Err(LakeError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let finish = serde_json::from_slice(&bytes)
        .with_context(|| format!("reading {}", finish_path(pipeline, run_id)))?;
    Ok(Some(finish))
}

/// The views of `plan` a job names, checked against the job's logic.
fn views_of<'a>(
    plan: &Plan,
    pipeline: &str,
    views: impl Iterator<Item = (&'a str, &'a str)>,
) -> anyhow::Result<Vec<(usize, String)>> {
    let mut out = Vec::new();
    for (name, logic_hash) in views {
        let view = plan
            .pipeline()
            .views
            .iter()
            .position(|p| p.name == name)
            .with_context(|| {
                format!("pipeline `{pipeline}` of this worker's project has no view `{name}`")
            })?;
        anyhow::ensure!(
            plan.logic_hash(view) == logic_hash,
            "view `{name}` of this worker's project differs from the run's (logic {} here, {logic_hash} in the run): deploy the same project to every worker",
            plan.logic_hash(view),
        );
        out.push((view, name.to_string()));
    }
    Ok(out)
}

async fn compute_inner(plan: &Arc<Plan>, lake: &Lake, job: &GroupJob) -> anyhow::Result<()> {
    let views = views_of(plan, &job.pipeline, job.views.iter().map(|v| v.identity()))?;
    // Read once, computed for every view.
    let lookups = Lookups::reader(plan.pipeline(), lake);
    let segments = job.segments();
    let (indices, names): (Vec<usize>, Vec<String>) = views.into_iter().unzip();
    let scan = (segments.as_slice(), scan::CHUNK_EVENTS);
    let fresh = scan::scan_partials(plan, lake, &lookups, scan, &indices, |_| {}).await?;
    for ((view, name), mut partials) in indices.into_iter().zip(names).zip(fresh) {
        let mut bytes = Vec::new();
        plan.write_partials(view, &mut partials, &mut bytes)?;
        lake.put(&job.partials_path(&name), bytes).await?;
    }
    Ok(())
}

/// What a worker does with the finish job: unless the run has ended already (a second
/// delivery), publishes every view this run has not published yet and ends the run — failed,
/// publishing nothing more, when a group failed or a publish did. Returns an error only when
/// the outcome could not be recorded (the queue delivers the job again).
pub async fn finish(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    job: &FinishJob,
) -> anyhow::Result<()> {
    let run_id = RunId(job.run_id);
    let started = match state.run(run_id).await? {
        Some(run) if !run.state.is_finished() => run.started_at.unwrap_or(run.created_at),
        _ => {
            clean(lake, &job.pipeline, job.run_id).await;
            return Ok(());
        }
    };
    let groups = state.batch_groups(run_id).await?;
    super::log(state, run_id, &groups_line(&groups)).await;
    let result = publish_all(plan, state, lake, job, &groups).await;
    let took = (chrono::Utc::now() - started).to_std().unwrap_or_default();
    let ended = result
        .map(|()| job.views.len())
        .map_err(|e| format!("{e:#}"));
    match super::end_run(state, run_id, ended, took).await {
        // Ended meanwhile by an earlier delivery of this job.
        Ok(()) | Err(StateError::WrongState { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    clean(lake, &job.pipeline, job.run_id).await;
    Ok(())
}

async fn publish_all(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    job: &FinishJob,
    groups: &BTreeMap<u32, GroupEnd>,
) -> anyhow::Result<()> {
    let run_id = RunId(job.run_id);
    if let Some((group, why)) = groups
        .iter()
        .find_map(|(g, end)| Some((g, end.error.as_ref()?)))
    {
        anyhow::bail!("group-{group:06} failed: {why}");
    }
    let published: HashSet<String> = state
        .run_publications(run_id)
        .await?
        .into_iter()
        .map(|p| p.view)
        .collect();
    let views = views_of(plan, &job.pipeline, job.views.iter().map(|v| v.identity()))?;
    for (spec, (view, name)) in job.views.iter().zip(views) {
        if published.contains(&name) {
            continue;
        }
        let publication = async {
            let fresh = merge_groups(plan, lake, job, view, &name, spec.groups.clone()).await?;
            super::publish::publish_view(
                plan,
                state,
                lake,
                run_id,
                &job.cutoff,
                view,
                fresh,
                spec.base_run.map(RunId),
                (spec.replaces.map(PublicationId), false),
            )
            .await
        }
        .await
        .with_context(|| format!("view `{name}`"))?;
        let line =
            super::run::view_line(&name, spec.mode, spec.segments, spec.events, &publication);
        super::log(state, run_id, &line).await;
    }
    Ok(())
}

/// The run log's line on how the groups went: how many, on which workers, the slowest.
fn groups_line(groups: &BTreeMap<u32, GroupEnd>) -> String {
    let mut per_worker: BTreeMap<&str, usize> = BTreeMap::new();
    for end in groups.values() {
        *per_worker.entry(&end.worker).or_default() += 1;
    }
    let workers: Vec<String> = per_worker.iter().map(|(w, n)| format!("{w} {n}")).collect();
    let mut took: Vec<std::time::Duration> = groups.values().map(|e| e.took).collect();
    took.sort();
    let mut line = format!(
        "{} group(s) ended on {} worker(s) ({})",
        groups.len(),
        per_worker.len(),
        workers.join(", ")
    );
    if let Some((g, slowest)) = groups.iter().max_by_key(|(_, e)| e.took) {
        line.push_str(&format!(
            "; median {:.2}s, slowest group-{g:06} {:.2}s on {}",
            took[took.len() / 2].as_secs_f64(),
            slowest.took.as_secs_f64(),
            slowest.worker
        ));
    }
    line
}

/// The merged partials of `view` over the groups `groups` (none: no new segments).
async fn merge_groups(
    plan: &Arc<Plan>,
    lake: &Lake,
    job: &FinishJob,
    view: usize,
    name: &str,
    groups: Range<u32>,
) -> anyhow::Result<DataFrame> {
    use futures::{StreamExt, TryStreamExt};
    // Futures made up front: see `scan::open`.
    let reads: Vec<_> = groups
        .map(|g| {
            let path = partials_path(&job.pipeline, job.run_id, g, name);
            async move {
                let bytes = lake.get(&path).await?;
                plan.read_partials(view, &bytes)
                    .with_context(|| format!("reading {path}"))
            }
        })
        .collect();
    let parts: Vec<DataFrame> = futures::stream::iter(reads)
        .buffered(READ_AHEAD)
        .try_collect()
        .await?;
    let p = plan.clone();
    Ok(tokio::task::spawn_blocking(move || p.merge(view, parts))
        .await
        .context("merging group partials panicked")??)
}

/// Group partials read at once by the finish job.
const READ_AHEAD: usize = 8;

/// How long a scaled-out run's jobs may make no progress (no group taken or ended) before the
/// run's own process is asked to work on them: no worker is free, or none is running.
pub const HELP_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The run's own side of a scaled-out run: waits until the run has ended (the finish job ends
/// it, in whichever process), calling `on_group` as each group ends. Once every group has, it
/// queues the finish job too (a no-op when the last group did), in case that group's worker
/// died before it could. When nothing has moved for [`HELP_AFTER`] it notifies `help` (once),
/// whose waiter works on the jobs too. Returns the run's publications, or why it failed.
pub async fn wait(
    state: &State,
    fanout: &dyn Fanout,
    job: &FinishJob,
    help: Option<&tokio::sync::Notify>,
    mut on_group: impl FnMut(u32),
) -> anyhow::Result<Vec<crate::state::Publication>> {
    let run_id = RunId(job.run_id);
    let mut reported = BTreeSet::new();
    let mut queued = false;
    let (mut last, mut moved) = (None, std::time::Instant::now());
    let mut help = help;
    loop {
        let progress = state.batch_group_progress(run_id).await?;
        let seen = (progress.started, progress.ended.len());
        if last != Some(seen) {
            (last, moved) = (Some(seen), std::time::Instant::now());
        } else if moved.elapsed() >= HELP_AFTER
            && let Some(h) = help.take()
        {
            tracing::info!(
                run = job.run_id,
                "no batch job progress for a second; helping"
            );
            h.notify_one();
        }
        let ended = progress.ended;
        for g in ended.difference(&reported).copied().collect::<Vec<_>>() {
            reported.insert(g);
            on_group(g);
        }
        if !queued && ended.len() >= job.groups as usize {
            fanout.finish(job).await?;
            queued = true;
        }
        let run = state
            .run(run_id)
            .await?
            .with_context(|| format!("run {run_id} disappeared from the state DB"))?;
        match run.state {
            crate::state::RunState::Succeeded => {
                // Groups that ended and were cleaned up between two looks.
                for g in (0..job.groups).filter(|g| !reported.contains(g)) {
                    on_group(g);
                }
                return Ok(state.run_publications(run_id).await?);
            }
            s if s.is_finished() => anyhow::bail!(
                "{}",
                run.error
                    .unwrap_or_else(|| format!("the run ended {}", s.as_str()))
            ),
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// How often the run looks at its groups and its state.
const POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Deletes a run's scratch files (best effort: leftovers only cost space).
pub async fn clean(lake: &Lake, pipeline: &str, run_id: i64) {
    let dir = lake::run_scratch_prefix(pipeline, run_id);
    match lake.list(&dir).await {
        Ok(files) => {
            for f in files {
                if let Err(e) = lake.delete(&f.path).await {
                    tracing::warn!(path = %f.path, error = %e, "cannot delete group partials");
                }
            }
        }
        Err(e) => tracing::warn!(%dir, error = %e, "cannot list group partials"),
    }
}

/// Deletes the scratch files of `pipeline`'s runs other than `current` that can no longer use
/// them: finished runs (a run that failed mid-way leaves its groups' partials behind) and runs
/// "running" for longer than [`super::GRACE`] (killed). Failures are logged, never fatal.
pub async fn collect_stale(state: &crate::state::State, lake: &Lake, pipeline: &str, current: i64) {
    let prefix = lake::runs_prefix(pipeline);
    let files = match lake.list(&prefix).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(%pipeline, error = %e, "cannot list batch run scratch files");
            return;
        }
    };
    let mut verdicts: BTreeMap<i64, bool> = BTreeMap::new();
    for f in files {
        let Some(run) = super::gc::run_of(&f.path, &prefix) else {
            continue;
        };
        if run == current {
            continue;
        }
        let stale = match verdicts.get(&run) {
            Some(v) => *v,
            None => {
                let v = match super::gc::still_going(state, run).await {
                    Ok(going) => !going,
                    Err(e) => {
                        tracing::warn!(run, error = %e, "cannot read run; keeping its scratch files");
                        false
                    }
                };
                verdicts.insert(run, v);
                v
            }
        };
        if stale && let Err(e) = lake.delete(&f.path).await {
            tracing::warn!(path = %f.path, error = %e, "cannot delete stale group partials");
        }
    }
}
