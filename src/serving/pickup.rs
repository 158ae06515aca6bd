//! Serving pickup: a running server installs every new publication of its pipelines' views,
//! whichever process published it (an in-process run, `lambda-ctl run` next to it, a worker).
//! The state DB is the only channel, so a poll every [`POLL`] is all it takes to serve a new
//! publish within a second. The same poll reads the pipeline's latest `verify` result.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::batch::load_partials;
use crate::lake::Lake;
use crate::speed::partials::BatchView;
use crate::speed::runtime::PipelineRuntime;
use crate::state::{PublicationId, State};

/// How often the current publications are read.
pub const POLL: Duration = Duration::from_millis(250);

/// What one pipeline's pickup has installed, per view.
pub struct Pickup {
    rt: Arc<PipelineRuntime>,
    db: State,
    lake: Lake,
    loaded: Vec<Option<PublicationId>>,
    /// Publications already reported as unusable (logged once, not every poll).
    refused: Vec<Option<PublicationId>>,
    /// Polls since the latest `verify` result was read.
    polls: u32,
}

/// The latest `verify` result is read every this many polls (it changes at most as often as
/// a workflow's `verify` task runs).
const VERIFY_EVERY: u32 = 4;

impl Pickup {
    pub fn new(rt: Arc<PipelineRuntime>, db: State, lake: Lake) -> Pickup {
        let n = rt.pipeline.views.len();
        Pickup {
            rt,
            db,
            lake,
            loaded: vec![None; n],
            refused: vec![None; n],
            polls: 0,
        }
    }

    /// Installs every view's current publication that is not installed yet. Errors are
    /// logged per view and retried at the next poll.
    pub async fn poll(&mut self) {
        let pipeline = self.rt.pipeline.name.clone();
        if self.polls.is_multiple_of(VERIFY_EVERY) {
            match self.db.verify_status(&pipeline).await {
                Ok(v) => *self.rt.verified.write() = v,
                Err(e) => {
                    tracing::warn!(%pipeline, error = %e, "cannot read the latest verify result");
                }
            }
        }
        self.polls = self.polls.wrapping_add(1);
        for v in 0..self.loaded.len() {
            let name = self.rt.pipeline.views[v].name.clone();
            let current = match self.db.current_publication(&pipeline, &name).await {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(%pipeline, view = %name, error = %e, "cannot read the current publication");
                    continue;
                }
            };
            if self.loaded[v] == Some(current.id) || self.refused[v] == Some(current.id) {
                continue;
            }
            if current.logic_hash != self.rt.plan.logic_hash(v) {
                // Computed by a different definition of the view than this server runs (the
                // spec changed): serving it would mix two logics. The speed layer keeps
                // answering until a run with this logic publishes.
                tracing::warn!(
                    %pipeline, view = %name, publication = current.id.0,
                    "published batch view was computed by other logic; not serving it (run `lambda-ctl run {pipeline}`)"
                );
                self.refused[v] = Some(current.id);
                continue;
            }
            let partials = match load_partials(&self.rt.plan, &self.lake, v, &current).await {
                Ok(df) => df,
                Err(e) => {
                    tracing::warn!(%pipeline, view = %name, publication = current.id.0, error = %format!("{e:#}"), "cannot load the published batch view");
                    continue;
                }
            };
            let batch = BatchView {
                run_id: current.run_id.to_string(),
                cutoff: current.cutoff.clone(),
                partials,
                published_at_ms: current.published_at.timestamp_millis(),
                horizon_ms: current.horizon_ms,
            };
            self.rt.publish(v, batch);
            self.loaded[v] = Some(current.id);
            tracing::info!(%pipeline, view = %name, publication = current.id.0, run = current.run_id.0, "serving batch view");
        }
    }

    /// Polls until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => self.poll().await,
            }
        }
    }
}
