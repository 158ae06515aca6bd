//! Blue/green answers: a view's candidate version (`lambda-ctl run PIPELINE --candidate`, the
//! edited YAML's definition computed beside the live one) ⊕ the events after its cutoff,
//! computed by the same edited definition — what the view will answer once that definition
//! serves. The server keeps answering with the live version; `?version=candidate` asks for
//! this one, `lambda-ctl diff` compares the two.

use std::sync::Arc;

use super::format::rows_json;
use super::query::{Answer, QueryError, Served, ViewQuery, check_filters};
use super::travel::{cut, logged_by, read_since, recompute};
use crate::batch::load_partials;
use crate::speed::lookups::Lookups;

/// The candidate version of view `view` (by name: a candidate may define a view the live
/// pipeline does not have) answering `q`.
pub async fn answer(served: Arc<Served>, view: &str, q: &ViewQuery) -> Result<Answer, QueryError> {
    let rt = served.runtime.clone();
    let pipeline = rt.pipeline.name.clone();
    let other = |e: anyhow::Error| QueryError::Other(format!("{e:#}"));
    let at = rt.tick();
    let candidate = rt
        .db()
        .candidate(&pipeline, view)
        .await
        .map_err(|e| other(e.into()))?
        .ok_or_else(|| {
            QueryError::NotFound(format!(
                "view `{pipeline}.{view}` has no candidate version (`lambda-ctl run {pipeline} --candidate` computes one)"
            ))
        })?;
    let root = served
        .root
        .clone()
        .ok_or_else(|| QueryError::Other("the server has no project directory".into()))?;
    let plan = super::promote::edited(root, pipeline.clone())
        .await
        .map_err(|e| QueryError::Other(e.to_string()))?
        .map_err(QueryError::Conflict)?;
    let plan = Arc::new(plan);
    let idx = plan
        .pipeline()
        .views
        .iter()
        .position(|v| v.name == view)
        .filter(|i| plan.logic_hash(*i) == candidate.publication.logic_hash)
        .ok_or_else(|| {
            QueryError::Conflict(format!(
                "view `{pipeline}.{view}` is no longer defined as when its candidate was computed (run {}); `lambda-ctl run {pipeline} --candidate` computes it again",
                candidate.publication.run_id
            ))
        })?;
    let v = plan.pipeline().views[idx].clone();
    check_filters(&v, q)?;

    let lake = rt.lake().clone();
    let publication = candidate.publication;
    let partials = load_partials(&plan, &lake, idx, &publication)
        .await
        .map_err(other)?;
    let cutoff = publication.cutoff.clone();
    // Each segment with the lookup versions it recorded, read as the candidate defines them.
    let lookups = Lookups::reader(plan.pipeline(), &lake);
    let read = read_since(&rt, served.token.as_deref(), &cutoff, i64::MAX, &lookups)
        .await
        .map_err(other)?;
    let stale = read.stale.clone();

    let q = q.clone();
    let horizon = publication.horizon_ms;
    let p = plan.clone();
    let (df, mut as_of) = tokio::task::spawn_blocking(move || {
        // Every event from the cutoff on (all were logged before `i64::MAX`).
        recompute(
            &p,
            idx,
            Some(partials),
            horizon,
            &read.frames,
            &q,
            |p, events| logged_by(events, cut(&cutoff, p), i64::MAX, 0, &mut 0),
        )
    })
    .await
    .map_err(|e| QueryError::Other(e.to_string()))??;
    as_of.describe(at, Some(&publication));
    as_of.stale = stale;
    served.with_verified(&mut as_of);
    Ok(Answer {
        columns: super::query::columns(&v),
        rows: rows_json(&df),
        as_of,
    })
}
