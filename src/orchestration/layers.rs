//! The [`TaskRunner`] of a real project: `batch` tasks recompute views with the batch layer.
//! `compact` and `retention` need lake operations this build does not have yet; such a task
//! fails with a message saying so (its dependants become `upstream_failed`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;

use super::{TaskContext, TaskRunner};
use crate::batch::Progress;
use crate::lake::Lake;
use crate::plan::Plan;
use crate::spec::Project;
use crate::state::State;

pub struct Layers {
    project: Arc<Project>,
    state: State,
    lake: Lake,
}

impl Layers {
    pub fn new(project: Arc<Project>, state: State, lake: Lake) -> Layers {
        Layers {
            project,
            state,
            lake,
        }
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
            let spec = self
                .project
                .pipeline(pipeline)
                .with_context(|| format!("pipeline `{pipeline}` is not in this project"))?;
            let plan =
                Plan::compile(spec).with_context(|| format!("compiling pipeline `{pipeline}`"))?;
            let log = ctx.log.clone();
            let mut progress = move |p: &Progress| {
                match p {
                Progress::Started {
                    run_id,
                    segments,
                    rows,
                } => log.line(format!(
                    "batch run {run_id} of {pipeline}: {segments} sealed segment(s), {rows} events"
                )),
                Progress::Published {
                    view,
                    mode,
                    segments,
                    rows,
                    partial_rows,
                } => log.line(format!(
                    "{view}: published ({}, {segments} segment(s), {rows} events, {partial_rows} groups)",
                    mode.as_str()
                )),
                Progress::Segments { .. } => {}
            }
            };
            let summary = super::fanout::recompute(
                &self.project,
                Arc::new(plan),
                &self.state,
                &self.lake,
                views,
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
        _: &'a TaskContext,
        pipeline: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            anyhow::bail!(
                "cannot compact `{pipeline}`: this lambda-ctl build has no archive compaction yet"
            )
        })
    }

    fn retention<'a>(
        &'a self,
        _: &'a TaskContext,
        pipeline: &'a str,
        _: Duration,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            anyhow::bail!(
                "cannot apply retention to `{pipeline}`: this lambda-ctl build has no archive retention yet"
            )
        })
    }
}
