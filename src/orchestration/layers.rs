//! The [`TaskRunner`] of a real project: `batch` tasks recompute views with the batch layer,
//! `compact` and `retention` maintain the archive ([`crate::batch::maintenance`]), `verify`
//! checks it ([`crate::batch::verify`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;

use super::fanout::Help;
use super::{TaskContext, TaskRunner};
use crate::batch::{self, Progress, maintenance, verify};
use crate::lake::Lake;
use crate::plan::Plan;
use crate::spec::{Project, Sample};
use crate::speed::runtime::PipelineRuntime;
use crate::state::State;

pub struct Layers {
    project: Arc<Project>,
    state: State,
    lake: Lake,
    /// Whether a scaled-out `batch` task's process works on its jobs (see [`Help`]).
    help: Help,
    /// The pipelines this process serves: its tasks compute the definitions they run (a
    /// promote may have switched one), never one they no longer serve.
    serving: BTreeMap<String, Arc<PipelineRuntime>>,
}

impl Layers {
    /// Layers whose scaled-out batch runs are helped by the process running them.
    pub fn new(project: Arc<Project>, state: State, lake: Lake) -> Layers {
        Layers {
            project,
            state,
            lake,
            help: Help::AfterAMoment,
            serving: BTreeMap::new(),
        }
    }

    /// Layers of a server: tasks of the pipelines in `serving` compute the definitions those
    /// run, and hold them while they do (a promote waits for a batch run, and the other way).
    pub fn serving(self, serving: BTreeMap<String, Arc<PipelineRuntime>>) -> Layers {
        Layers { serving, ..self }
    }

    /// Layers whose scaled-out batch runs' process helps with their jobs as `help` says
    /// ([`Help::No`] in a process that works the batch job queue already).
    pub fn helping(self, help: Help) -> Layers {
        Layers { help, ..self }
    }
}

impl TaskRunner for Layers {
    fn batch<'a>(
        &'a self,
        ctx: &'a TaskContext,
        pipeline: &'a str,
        views: Option<&'a [String]>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (_switching, plan) = self.definition(pipeline).await?;
            let log = ctx.log.clone();
            let mut progress = move |p: &Progress| {
                if let Progress::Started {
                    run_id,
                    segments,
                    rows,
                } = p
                {
                    log.line(format!(
                        "batch run {run_id} of {pipeline}: {segments} sealed segment(s), {rows} events"
                    ));
                } else if let Some(line) = p.published_line() {
                    log.line(line);
                }
            };
            let summary = super::fanout::recompute(
                &self.project,
                plan,
                &self.state,
                &self.lake,
                batch::Select {
                    views,
                    full: false,
                    lookups: None,
                    history: self.project.settings.serve.history,
                    candidate: false,
                },
                self.help,
                &mut progress,
            )
            .await?;
            ctx.log.line(format!(
                "batch run {} published {} view(s) in {:.2}s",
                summary.run_id,
                summary.views.len(),
                summary.elapsed.as_secs_f64()
            ));
            Ok(())
        })
    }

    fn compact<'a>(
        &'a self,
        ctx: &'a TaskContext,
        pipeline: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let spec = self.pipeline(pipeline)?;
            let log = ctx.log.clone();
            let done =
                maintenance::compact(&self.state, &self.lake, spec, &move |l| log.line(l)).await?;
            ctx.log.line(format!(
                "compacted {pipeline}: {} segment(s) merged into {}, {} range(s) raced, {} retired file(s) deleted",
                done.replaced, done.merged, done.raced, done.collected
            ));
            Ok(())
        })
    }

    fn retention<'a>(
        &'a self,
        ctx: &'a TaskContext,
        pipeline: &'a str,
        keep: Duration,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (_switching, plan) = self.definition(pipeline).await?;
            let log = ctx.log.clone();
            let done = maintenance::retention(
                &self.state,
                &self.lake,
                plan.pipeline(),
                keep,
                chrono::Utc::now(),
                &move |l| log.line(l),
            )
            .await?;
            ctx.log.line(format!(
                "retention of {pipeline}: {} segment(s), {} view version(s), {} dead-letter file(s) dropped; {} view(s) republished without {} partial row(s) of retired windows",
                done.segments_dropped, done.view_versions_dropped, done.dead_letter_files_dropped,
                done.views_trimmed, done.partial_rows_retired
            ));
            Ok(())
        })
    }

    fn verify<'a>(
        &'a self,
        ctx: &'a TaskContext,
        pipeline: &'a str,
        sample: Sample,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (_switching, plan) = self.definition(pipeline).await?;
            let report = verify::verify(plan, &self.state, &self.lake, sample).await?;
            verify::record(&self.state, pipeline, Some(ctx.run_id), &report).await?;
            ctx.log.line(format!(
                "verified {pipeline}: {} of {} sealed segment(s) ({sample}), {} events, {} view(s)",
                report.segments,
                report.sealed,
                report.events,
                report.views.len()
            ));
            let problems = report.problems();
            for p in &problems {
                ctx.log.line(p.clone());
            }
            match report.verdict() {
                None => Ok(()),
                Some(verdict) => Err(anyhow::anyhow!(
                    "verify of {pipeline} found {} problem(s): {} — {verdict}",
                    problems.len(),
                    problems.join("; ")
                )),
            }
        })
    }
}

impl Layers {
    /// The definition of pipeline `name` a task computes: the one this process serves (held
    /// against a promote until the guard drops), else the project's.
    async fn definition(
        &self,
        name: &str,
    ) -> anyhow::Result<(Option<tokio::sync::OwnedMutexGuard<()>>, Arc<Plan>)> {
        if let Some(rt) = self.serving.get(name) {
            let guard = rt.switching().lock_owned().await;
            return Ok((Some(guard), rt.plan()));
        }
        let spec = self.pipeline(name)?;
        let plan = Plan::compile(spec).with_context(|| format!("compiling pipeline `{name}`"))?;
        Ok((None, Arc::new(plan)))
    }

    fn pipeline(&self, name: &str) -> anyhow::Result<&crate::spec::Pipeline> {
        self.project
            .pipeline(name)
            .with_context(|| format!("pipeline `{name}` is not in this project"))
    }
}
