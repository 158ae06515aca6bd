//! Batch scale-out (DESIGN.md §4): views with many segments to scan are split into groups of
//! segments, one [`GroupJob`] each (views scanning the same segments share the jobs: a group's
//! segments are read once for all of them). Any process working the queue (`lambda-ctl
//! worker`, or the process running the batch run itself) computes a group's partials with the
//! same plan and writes them to the run's scratch prefix in the lake; the run then merges every
//! group's partials (the merge is associative and commutative) with the published ones, writes
//! the view and publishes it with the usual compare-and-set — so a run that fails or is killed
//! still publishes nothing.
//!
//! The lake is also how a group reports back: its partials file appears atomically when it is
//! complete, and a group that cannot be computed leaves an error file instead. A worker killed
//! mid-job leaves neither; the queue delivers the job again to another worker (apalis notices the
//! missing heartbeats), which writes the same file.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::scan;
use crate::lake::{self, Lake, LakeError};
use crate::plan::Plan;
use crate::state::Segment;

/// How often the run looks for finished groups.
const POLL: Duration = Duration::from_millis(100);

/// One group of segments of one run, for one or more views.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupJob {
    pub pipeline: String,
    pub views: Vec<GroupView>,
    pub run_id: i64,
    /// Unique within the run.
    pub group: u32,
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
}

impl GroupJob {
    /// Where the group's partials of `view` appear when they are done.
    pub fn partials_path(&self, view: &str) -> String {
        format!(
            "{}group-{:06}/{view}.parquet",
            lake::run_scratch_prefix(&self.pipeline, self.run_id),
            self.group
        )
    }

    /// Where the reason appears when the group cannot be computed.
    pub fn error_path(&self) -> String {
        format!(
            "{}group-{:06}.error",
            lake::run_scratch_prefix(&self.pipeline, self.run_id),
            self.group
        )
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
                bytes: 0,
                dead_letters: 0,
                min_event_ms: None,
                max_event_ms: None,
            })
            .collect()
    }

    pub fn rows(&self) -> u64 {
        self.segments.iter().map(|s| s.rows).sum()
    }
}

/// Hands group jobs to whoever computes them (the job queue, in orchestration).
pub trait Fanout: Send + Sync {
    fn submit<'a>(&'a self, jobs: &'a [GroupJob]) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// Splits `segments` (position order) into groups of `size` segments, one job each computing
/// `views`; groups are numbered from `next_group` on.
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
            segments: chunk
                .iter()
                .map(|s| GroupSegment {
                    partition: s.partition,
                    lo: s.lo,
                    hi: s.hi,
                    path: s.path.clone(),
                    rows: s.rows,
                })
                .collect(),
        })
        .collect()
}

/// What a worker does with a job: computes the group's partials and writes them (replacing
/// those of an earlier delivery, which are identical). An error is recorded in the lake for the
/// run to report; it is returned too, for the worker's log.
pub async fn compute(plan: &Arc<Plan>, lake: &Lake, job: &GroupJob) -> anyhow::Result<()> {
    let result = compute_inner(plan, lake, job).await;
    if let Err(e) = &result {
        let msg = format!("{e:#}");
        if let Err(write) = lake.put(&job.error_path(), msg.into_bytes()).await {
            // The run cannot learn why; the job is delivered again by the queue.
            return Err(anyhow::Error::new(write).context(format!("{e:#}")));
        }
    }
    result
}

async fn compute_inner(plan: &Arc<Plan>, lake: &Lake, job: &GroupJob) -> anyhow::Result<()> {
    let mut views = Vec::with_capacity(job.views.len());
    for v in &job.views {
        let view = plan
            .pipeline()
            .views
            .iter()
            .position(|p| p.name == v.name)
            .with_context(|| {
                format!(
                    "pipeline `{}` of this worker's project has no view `{}`",
                    job.pipeline, v.name
                )
            })?;
        anyhow::ensure!(
            plan.logic_hash(view) == v.logic_hash,
            "view `{}` of this worker's project differs from the run's (logic {} here, {} in the run): deploy the same project to every worker",
            v.name,
            plan.logic_hash(view),
            v.logic_hash
        );
        views.push((view, v.name.clone()));
    }
    // Read once, computed for every view.
    let source = Arc::new(scan::open(lake, &job.segments(), |_| {}).await?);
    for (view, name) in views {
        let (p, src) = (plan.clone(), source.clone());
        let mut partials = tokio::task::spawn_blocking(move || scan::view_partials(&p, view, &src))
            .await
            .context("group computation panicked")??;
        let mut bytes = Vec::new();
        plan.write_partials(view, &mut partials, &mut bytes)?;
        lake.put(&job.partials_path(&name), bytes).await?;
    }
    Ok(())
}

/// Waits until every job's partials are in the lake and merges them; fails as soon as a group
/// reports an error. `on_group(job)` is called as each group completes.
pub async fn collect(
    plan: &Arc<Plan>,
    lake: &Lake,
    view: usize,
    jobs: &[GroupJob],
    mut on_group: impl FnMut(&GroupJob),
) -> anyhow::Result<DataFrame> {
    let Some(first) = jobs.first() else {
        anyhow::bail!("no groups to collect");
    };
    let name = &plan.pipeline().views[view].name;
    let dir = lake::run_scratch_prefix(&first.pipeline, first.run_id);
    let mut parts: BTreeMap<u32, DataFrame> = BTreeMap::new();
    while parts.len() < jobs.len() {
        let listed: HashSet<String> = lake.list(&dir).await?.into_iter().map(|o| o.path).collect();
        for job in jobs {
            if parts.contains_key(&job.group) {
                continue;
            }
            if listed.contains(&job.error_path()) {
                let why = lake.get(&job.error_path()).await?;
                anyhow::bail!(
                    "group {} ({} segment(s) from {}) failed: {}",
                    job.group,
                    job.segments.len(),
                    job.segments.first().map_or("", |s| s.path.as_str()),
                    String::from_utf8_lossy(&why)
                );
            }
            let path = job.partials_path(name);
            if listed.contains(&path) {
                let bytes = match lake.get(&path).await {
                    Ok(b) => b,
                    // Listed, then replaced by a re-delivery: read it next time.
                    Err(LakeError::NotFound { .. }) => continue,
                    Err(e) => return Err(e.into()),
                };
                let df = plan
                    .read_partials(view, &bytes)
                    .with_context(|| format!("reading {path}"))?;
                parts.insert(job.group, df);
                on_group(job);
            }
        }
        if parts.len() < jobs.len() {
            tokio::time::sleep(POLL).await;
        }
    }
    let p = plan.clone();
    let parts: Vec<DataFrame> = parts.into_values().collect();
    Ok(tokio::task::spawn_blocking(move || p.merge(view, parts))
        .await
        .context("merging group partials panicked")??)
}

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
    let prefix = format!("runs/{pipeline}/");
    let files = match lake.list(&prefix).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(%pipeline, error = %e, "cannot list batch run scratch files");
            return;
        }
    };
    let mut verdicts: BTreeMap<i64, bool> = BTreeMap::new();
    for f in files {
        let Some(run) = super::run_of(&f.path, &prefix) else {
            continue;
        };
        if run == current {
            continue;
        }
        let stale = match verdicts.get(&run) {
            Some(v) => *v,
            None => {
                let v = match super::still_going(state, run).await {
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
