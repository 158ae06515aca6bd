//! Serving pickup: a running server installs every new publication of its pipelines' views,
//! whichever process published it (an in-process run, `lambda-ctl run` next to it, a worker).
//! The state DB is the only channel, so a poll every [`POLL`] is all it takes to serve a new
//! publish within a second. The same poll reads the pipeline's latest `verify` result and its
//! restatement ledger's totals.
//!
//! Every install is recorded with the instant the server placed it ([`Install`]): what `as_of`
//! answers read to serve what was served then. The first poll records each view's start too —
//! with its publication, or with none (the speed layer alone) — and the logic it runs.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::batch::load_partials;
use crate::clock::now_ms;
use crate::lake::Lake;
use crate::plan::Plan;
use crate::speed::partials::{BatchView, Snapshot};
use crate::speed::runtime::PipelineRuntime;
use crate::state::{Cause, Install, LedgerEntry, Publication, PublicationId, RunId, State};

/// Publication `p` of view `v` as serving installs it: its partials, loaded from the lake.
pub async fn batch_view(
    plan: &Arc<Plan>,
    lake: &Lake,
    v: usize,
    p: &Publication,
) -> anyhow::Result<BatchView> {
    Ok(BatchView {
        publication: p.id,
        logic_hash: p.logic_hash.clone(),
        run_id: p.run_id.to_string(),
        cutoff: p.cutoff.clone(),
        partials: load_partials(plan, lake, v, p).await?,
        published_at_ms: p.published_at.timestamp_millis(),
        horizon_ms: p.horizon_ms,
    })
}

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
    /// The batch run of each installed publication.
    runs: Vec<Option<RunId>>,
    /// Restatement ledger entries of installed publications not recorded yet (retried every
    /// poll until the state DB takes them).
    unrecorded: Vec<LedgerEntry>,
    /// Installs not recorded yet (retried every poll until the state DB takes them).
    installs: Vec<Install>,
    /// Polls since the latest `verify` result was read.
    polls: u32,
    /// `serve.history` in milliseconds.
    history_ms: i64,
}

/// The latest `verify` result and the ledger's totals are read every this many polls (they
/// change at most as often as a workflow's `verify` task runs and a segment is sealed).
const VERIFY_EVERY: u32 = 4;
/// Installs older than `serve.history` are forgotten every this many polls (a minute).
const FORGET_EVERY: u32 = 240;

impl Pickup {
    pub fn new(rt: Arc<PipelineRuntime>, db: State, lake: Lake) -> Pickup {
        let n = rt.pipeline.views.len();
        Pickup {
            rt,
            db,
            lake,
            loaded: vec![None; n],
            refused: vec![None; n],
            runs: vec![None; n],
            unrecorded: Vec::new(),
            installs: Vec::new(),
            polls: 0,
            history_ms: i64::try_from(crate::spec::settings::DEFAULT_HISTORY.as_millis())
                .unwrap_or(i64::MAX),
        }
    }

    /// With `serve.history` of `history`: installs older than it are forgotten.
    pub fn with_history(mut self, history: Duration) -> Pickup {
        self.history_ms = i64::try_from(history.as_millis()).unwrap_or(i64::MAX);
        self
    }

    /// Installs every view's current publication that is not installed yet. Errors are
    /// logged per view and retried at the next poll.
    pub async fn poll(&mut self) {
        let pipeline = self.rt.pipeline.name.clone();
        let first = self.polls == 0;
        if self.polls.is_multiple_of(VERIFY_EVERY) {
            match self.db.verify_status(&pipeline).await {
                Ok(v) => *self.rt.verified.write() = v,
                Err(e) => {
                    tracing::warn!(%pipeline, error = %e, "cannot read the latest verify result");
                }
            }
            match self.db.ledger_totals(&pipeline, None, None).await {
                Ok(t) => *self.rt.restated.write() = t,
                Err(e) => {
                    tracing::warn!(%pipeline, error = %e, "cannot sum the restatement ledger");
                }
            }
        }
        if self.polls.is_multiple_of(FORGET_EVERY) {
            // Installs older than `serve.history` (but the one current then): no `as_of`
            // answer reads them, and GC may collect what they served.
            let before = now_ms()
                .saturating_sub(self.history_ms)
                .saturating_mul(1_000_000);
            if let Err(e) = self.db.forget_served_before(&pipeline, before).await {
                tracing::warn!(%pipeline, error = %e, "cannot forget installs older than serve.history");
            }
        }
        self.polls = self.polls.wrapping_add(1);
        let restated_by = if self.runs.iter().any(Option::is_some) {
            match self.db.restated_by(&pipeline).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%pipeline, error = %e, "cannot read the pipeline's restatements");
                    return;
                }
            }
        } else {
            None
        };
        // A promote may have added views (they run after the others).
        let views = self.rt.plan().pipeline().views.len();
        self.loaded.resize(views, None);
        self.refused.resize(views, None);
        self.runs.resize(views, None);
        for v in 0..self.loaded.len() {
            let plan = self.rt.plan();
            let name = plan.pipeline().views[v].name.clone();
            let current = match self.db.current_publication(&pipeline, &name).await {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(%pipeline, view = %name, error = %e, "cannot read the current publication");
                    continue;
                }
            };
            if self.loaded[v] != Some(current.id) && self.rt.installed(v) == Some(current.id) {
                // Installed by a promote.
                self.loaded[v] = Some(current.id);
                self.runs[v] = Some(current.run_id);
            }
            if self.loaded[v] == Some(current.id) || self.refused[v] == Some(current.id) {
                continue;
            }
            if current.logic_hash != plan.logic_hash(v) {
                // Computed by a different definition of the view than this server runs (the
                // spec changed): serving it would mix two logics. The speed layer keeps
                // answering until a run with this logic publishes.
                tracing::warn!(
                    %pipeline, view = %name, publication = current.id.0,
                    "published batch view was computed by another definition than this server runs; not serving it (`lambda-ctl promote {pipeline}` switches the server to the definition in pipelines/)"
                );
                self.refused[v] = Some(current.id);
                continue;
            }
            let batch = match batch_view(&plan, &self.lake, v, &current).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(%pipeline, view = %name, publication = current.id.0, error = %format!("{e:#}"), "cannot load the published batch view");
                    continue;
                }
            };
            // A publication of a run that restated history (refreshed lookups) replacing one
            // from before it changes rows already served: what it changed goes to the ledger.
            let restating = match (self.runs[v], restated_by) {
                (Some(old), Some(r)) => old < r && r <= current.run_id,
                _ => false,
            };
            let installed = if restating {
                self.rt.publish_between(v, batch).map(|(before, after)| {
                    let at = after.tick;
                    (at, Some((before, after)))
                })
            } else {
                self.rt.publish(v, batch).map(|at| (at, None))
            };
            let Some((at, restated)) = installed else {
                // A promote switched the definition since it was read: the next poll sees.
                continue;
            };
            if let Some((before, after)) = restated {
                match self.changed(v, &current, before, after).await {
                    Ok(entries) => self.unrecorded.extend(entries),
                    Err(e) => {
                        tracing::error!(%pipeline, view = %name, publication = current.id.0, error = %format!("{e:#}"), "cannot tell which rows the publication restated: it is served, but its rows are missing from the restatement ledger (a bug: report it with this error; the answers are unaffected)");
                    }
                }
            }
            self.installs.push(Install {
                pipeline: pipeline.clone(),
                view: name.clone(),
                at_ns: at.ns(),
                publication: Some(current.id),
                logic_hash: current.logic_hash.clone(),
            });
            self.loaded[v] = Some(current.id);
            self.runs[v] = Some(current.run_id);
            tracing::info!(%pipeline, view = %name, publication = current.id.0, run = current.run_id.0, "serving batch view");
        }
        if first {
            // What a view without a publication serves from the start: the speed layer alone,
            // by this server's logic.
            let plan = self.rt.plan();
            for v in (0..self.loaded.len()).filter(|v| self.loaded[*v].is_none()) {
                let at = self.rt.mark_served();
                self.installs.push(Install {
                    pipeline: pipeline.clone(),
                    view: plan.pipeline().views[v].name.clone(),
                    at_ns: at.ns(),
                    publication: None,
                    logic_hash: plan.logic_hash(v),
                });
            }
        }
        if !self.installs.is_empty() {
            match self.db.record_served(&self.installs).await {
                Ok(()) => self.installs.clear(),
                Err(e) => {
                    tracing::warn!(%pipeline, error = %e, installs = self.installs.len(), "cannot record what the views serve (for `as_of` answers); retrying");
                }
            }
        }
        if !self.unrecorded.is_empty() {
            match self.db.record_restated(&self.unrecorded).await {
                Ok(()) => self.unrecorded.clear(),
                Err(e) => {
                    tracing::warn!(%pipeline, error = %e, entries = self.unrecorded.len(), "cannot record restated rows in the ledger; retrying");
                }
            }
        }
    }

    /// The ledger entries of the rows publication `current` of view `v` changed, from the
    /// answers just before and after it was installed.
    async fn changed(
        &self,
        v: usize,
        current: &Publication,
        before: Snapshot,
        after: Snapshot,
    ) -> anyhow::Result<Vec<LedgerEntry>> {
        let horizon = |s: &Snapshot| s.batch.as_ref().and_then(|b| b.horizon_ms);
        let (hb, ha) = (horizon(&before), horizon(&after));
        // The plan the snapshots were taken with.
        let plan = after.plan.clone();
        let rows = tokio::task::spawn_blocking(move || {
            plan.changed(v, (&before.frames(), hb), (&after.frames(), ha))
        })
        .await??;
        let at = now_ms();
        let cause = Cause::Publication {
            run_id: current.run_id,
            publication: current.id,
        };
        let names = (current.pipeline.as_str(), current.view.as_str());
        Ok(rows
            .into_iter()
            .map(|r| LedgerEntry::of(names, cause, r, at))
            .collect())
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
