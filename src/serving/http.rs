//! The pipeline part of the HTTP API (SPEC.md): ingest, view queries, pipeline status and
//! `/metrics`. Names from URLs are looked up in the project, never spliced into paths or SQL.
//! What surrounds every route (authentication, limits) is in [`super::app`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::app::{App, METRICS, error};
use super::format;
use super::guard;
use super::metrics;
use super::promote::{PromoteError, Role};
use super::query::{QueryError, Served, ViewQuery};
use super::time::parse_time;
use super::{candidate, travel};
use crate::clock::{format_ms, now_ms};
use crate::spec::Source;
use crate::speed::runtime::PipelineRuntime;
use crate::state::Cause;
use crate::telemetry::CONTENT_TYPE;

/// The pipeline routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/pipelines", get(pipelines))
        .route("/v1/pipelines/{pipeline}/events", post(ingest))
        .route("/v1/pipelines/{pipeline}/promote", post(promote))
        .route("/v1/views/{pipeline}/{view}", get(view))
        .route(
            "/v1/views/{pipeline}/{view}/restatements",
            get(restatements),
        )
        .route(METRICS, get(metrics_page))
        .route(
            "/v1/internal/pipelines/{pipeline}/partitions/{partition}/open",
            get(open_segment),
        )
        .route(
            "/v1/internal/pipelines/{pipeline}/partitions/{partition}/logged",
            get(logged_events),
        )
        .route(
            "/v1/internal/pipelines/{pipeline}/promote",
            post(follow_promote),
        )
        .route("/v1/nodes", get(nodes))
}

/// The nodes (`serve --node`) on this server's state DB, each with the partitions it holds
/// the leases of; empty without nodes.
async fn nodes(State(app): State<Arc<App>>) -> Response {
    let Some(first) = app.pipelines.values().next() else {
        return axum::Json(json!({ "nodes": [] })).into_response();
    };
    let names = app.pipelines.keys().map(String::as_str);
    match crate::speed::nodes::overview(first.runtime.db(), names, now_ms()).await {
        Ok(list) => axum::Json(json!({ "nodes": list })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct Since {
    since: Option<u64>,
}

/// On a node: the open segment of a partition it runs, for the other nodes to mirror
/// (`speed::nodes`); 404 when it does not run it.
async fn open_segment(
    State(app): State<Arc<App>>,
    Path((name, partition)): Path<(String, u32)>,
    Query(since): Query<Since>,
) -> Response {
    let rt = match served(&app, &name) {
        Ok(s) => s.runtime.clone(),
        Err(resp) => return *resp,
    };
    let Some(open) = rt.open_segment(partition, since.since) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("partition {partition} of `{name}` does not run on this server"),
        );
    };
    match tokio::task::spawn_blocking(move || crate::speed::nodes::encode_open(open)).await {
        Ok(Ok(bytes)) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct FromPosition {
    from: u64,
}

/// `GET /v1/internal/pipelines/{pipeline}/partitions/{partition}/logged?from=N`: the events
/// this node's log holds of a partition it runs from position N on, with their positions and
/// arrival times (Parquet; 204 when none), for another node's `as_of` or candidate answer.
/// 409 when the log no longer holds N (sealed meanwhile: the asker reads the archive again);
/// 404 when this node does not run the partition.
async fn logged_events(
    State(app): State<Arc<App>>,
    Path((name, partition)): Path<(String, u32)>,
    Query(from): Query<FromPosition>,
) -> Response {
    let rt = match served(&app, &name) {
        Ok(s) => s.runtime.clone(),
        Err(resp) => return *resp,
    };
    if !rt.owns(partition) {
        return error(
            StatusCode::NOT_FOUND,
            format!("partition {partition} of `{name}` does not run on this server"),
        );
    }
    let read = tokio::task::spawn_blocking(move || {
        rt.logged(partition, from.from)?
            .map(crate::speed::nodes::encode_events)
            .transpose()
    });
    match read.await {
        Ok(Ok(Some(bytes))) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(Ok(None)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => error(StatusCode::CONFLICT, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn metrics_page(State(app): State<Arc<App>>) -> Response {
    let page = metrics::render(&app.pipelines, &app.ops).await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], page).into_response()
}

fn served(app: &App, name: &str) -> Result<Arc<Served>, Box<Response>> {
    app.pipelines.get(name).cloned().ok_or_else(|| {
        let known: Vec<&str> = app.pipelines.keys().map(String::as_str).collect();
        Box::new(error(
            StatusCode::NOT_FOUND,
            format!("unknown pipeline `{name}` (known: {})", known.join(", ")),
        ))
    })
}

async fn ingest(State(app): State<Arc<App>>, Path(name): Path<String>, req: Request) -> Response {
    let rt = match served(&app, &name) {
        Ok(s) => s.runtime.clone(),
        Err(e) => return *e,
    };
    // Checked before the body is read: a refused body is not waited for.
    if let Err(message) = guard::events_content_type(req.headers()) {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, message);
    }
    if !matches!(
        rt.pipeline.source,
        Source::Http | Source::Generator { .. } | Source::File { .. }
    ) {
        return error(
            StatusCode::CONFLICT,
            format!(
                "pipeline `{name}` reads from its {} source; publish events there",
                rt.pipeline.source.kind()
            ),
        );
    }
    let body = match Bytes::from_request(req, &()).await {
        Ok(body) => body,
        Err(rejection) => return rejection.into_response(),
    };
    // Run the ingest to completion even if the client goes away: once the log has the events
    // they are acknowledged to the aggregator.
    match tokio::spawn(async move { rt.ingest(body).await }).await {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(e)) => {
            tracing::error!(pipeline = %name, error = %format!("{e:#}"), "ingest failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("events not stored, retry: {e:#}"),
            )
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("ingest task failed: {e}"),
        ),
    }
}

/// `POST /v1/pipelines/{pipeline}/promote`: the definition of the pipeline's views in
/// pipelines/ becomes the one served ([`super::promote`]); 409 when there is nothing to
/// promote, a view lacks its candidate, or the change takes a restart.
async fn promote(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(message) = guard::trigger_content_type(&headers, body.is_empty()) {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, message);
    }
    let served = match served(&app, &name) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match super::promote::promote(&served, Role::Lead).await {
        Ok(mut promoted) => {
            if let Some(node) = served.runtime.node() {
                promoted.nodes =
                    super::promote::followers(&served, node, app.token.as_deref()).await;
            }
            axum::Json(promoted).into_response()
        }
        Err(e) => promote_error(e),
    }
}

/// `POST /v1/internal/pipelines/{pipeline}/promote` with the views' logic hashes by name:
/// another node promoted the pipeline to them; this one switches to the same definition
/// ([`Role::Follow`]).
async fn follow_promote(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    axum::Json(led): axum::Json<std::collections::BTreeMap<String, String>>,
) -> Response {
    let served = match served(&app, &name) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match super::promote::promote(&served, Role::Follow(led)).await {
        Ok(promoted) => axum::Json(promoted).into_response(),
        Err(e) => promote_error(e),
    }
}

fn promote_error(e: PromoteError) -> Response {
    match e {
        e @ PromoteError::Conflict(_) => error(StatusCode::CONFLICT, e.to_string()),
        e => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The index of view `view` of a served pipeline, or a 404 naming the views it has.
fn view_index(rt: &PipelineRuntime, view: &str) -> Result<usize, Box<Response>> {
    // The views it runs now (a promote may have added some).
    let plan = rt.plan();
    let views = &plan.pipeline().views;
    views.iter().position(|v| v.name == view).ok_or_else(|| {
        let known: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
        Box::new(error(
            StatusCode::NOT_FOUND,
            format!(
                "pipeline `{}` has no view `{view}` (views: {})",
                rt.pipeline.name,
                known.join(", ")
            ),
        ))
    })
}

/// Entries a ledger answer holds unless `limit` says otherwise, and at most.
const LEDGER_LIMIT: u64 = 1_000;
const LEDGER_MAX_LIMIT: u64 = 100_000;

/// `GET /v1/views/{pipeline}/{view}/restatements?from&to&limit`: the view's restatement
/// ledger — every window and group late events changed after it was served, recorded in
/// `[from, to)` — oldest first, with the totals of that range.
async fn restatements(
    State(app): State<Arc<App>>,
    Path((pipeline, view)): Path<(String, String)>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let served = match served(&app, &pipeline) {
        Ok(s) => s,
        Err(e) => return *e,
    };
    let rt = &served.runtime;
    if let Err(e) = view_index(rt, &view) {
        return *e;
    }
    let (mut from, mut to, mut limit) = (None, None, LEDGER_LIMIT);
    let now = now_ms();
    for (k, v) in &params {
        let parsed = match k.as_str() {
            "from" => parse_time(v, now).map(|t| from = Some(t)),
            "to" => parse_time(v, now).map(|t| to = Some(t)),
            "limit" => match v.parse::<u64>() {
                Ok(n) if (1..=LEDGER_MAX_LIMIT).contains(&n) => {
                    limit = n;
                    Ok(())
                }
                _ => Err(format!(
                    "invalid limit `{v}` (a whole number from 1 to {LEDGER_MAX_LIMIT})"
                )),
            },
            other => Err(format!(
                "unknown parameter `{other}` (restatements take from, to and limit)"
            )),
        };
        if let Err(m) = parsed {
            return error(StatusCode::BAD_REQUEST, m);
        }
    }
    let db = rt.db();
    // One more than asked tells whether the range holds more.
    let entries = db.ledger(&pipeline, &view, from, to, limit + 1).await;
    let totals = db.ledger_totals(&pipeline, from, to).await;
    let (mut entries, totals) = match (entries, totals) {
        (Ok(e), Ok(t)) => (e, t.get(&view).copied().unwrap_or_default()),
        (Err(e), _) | (_, Err(e)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot read the restatement ledger: {e}"),
            );
        }
    };
    let truncated = entries.len() as u64 > limit;
    entries.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let time = |ms: Option<i64>| ms.map(format_ms);
    let list: Vec<_> = entries
        .into_iter()
        .map(|e| {
            let mut entry = json!({
                "recorded_at": format_ms(e.recorded_at_ms),
                "cause": e.cause.as_str(),
                "window_start": e.window_start_ms.map(format_ms),
                "window_end": e.window_end_ms.map(format_ms),
                "key": e.key,
                "late_events": e.late_events,
                "max_lateness_ms": e.max_lateness_ms,
                "metrics": e.metrics,
            });
            entry[match e.cause {
                Cause::Late { .. } => "segment",
                Cause::Publication { .. } => "publication",
            }] = match e.cause {
                Cause::Late { partition, lo, hi } => {
                    json!({"partition": partition, "lo": lo, "hi": hi})
                }
                Cause::Publication {
                    run_id,
                    publication,
                } => json!({"run_id": run_id.0, "id": publication.0}),
            };
            entry
        })
        .collect();
    axum::Json(json!({
        "pipeline": pipeline,
        "view": view,
        "from": time(from),
        "to": time(to),
        "totals": {
            "late_events": totals.late_events,
            "restated_windows": totals.restated_windows,
            "max_lateness_ms": totals.max_lateness_ms,
        },
        "restatements": list,
        "truncated": truncated,
    }))
    .into_response()
}

async fn view(
    State(app): State<Arc<App>>,
    Path((pipeline, view)): Path<(String, String)>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let served = match served(&app, &pipeline) {
        Ok(s) => s,
        Err(e) => return *e,
    };
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
    let (q, wants_csv) = match ViewQuery::from_params(params, now_ms(), accept) {
        Ok(parsed) => parsed,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let answered = if q.candidate {
        // The candidate version (blue/green): by name, it may define a view the live one
        // does not have.
        if q.as_of.is_some() {
            let m = "as_of answers what was served; a candidate version was never served";
            return error(StatusCode::BAD_REQUEST, m);
        }
        Ok(candidate::answer(served, &view, &q).await)
    } else {
        let idx = match view_index(&served.runtime, &view) {
            Ok(i) => i,
            Err(e) => return *e,
        };
        match q.as_of {
            // An earlier instant's answer, computed again from what is kept.
            Some(at) => Ok(travel::answer_as_of(served, idx, &q, at).await),
            None => tokio::task::spawn_blocking(move || served.query(idx, &q)).await,
        }
    };
    let answer = match answered {
        Ok(Ok(a)) => {
            let served = &app.ops.served;
            served.record(&pipeline, &view, a.as_of.batch_rows, a.as_of.speed_rows);
            a
        }
        Ok(Err(QueryError::BadRequest(m))) => return error(StatusCode::BAD_REQUEST, m),
        Ok(Err(QueryError::Gone(m))) => return error(StatusCode::GONE, m),
        Ok(Err(QueryError::NotFound(m))) => return error(StatusCode::NOT_FOUND, m),
        Ok(Err(QueryError::Conflict(m))) => return error(StatusCode::CONFLICT, m),
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if wants_csv {
        (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            format::csv(&answer.columns, &answer.rows),
        )
            .into_response()
    } else {
        axum::Json(answer).into_response()
    }
}

/// Each partition the server runs: its log's durable end, what is absorbed, sealed and open.
fn partitions_json(rt: &PipelineRuntime) -> Vec<serde_json::Value> {
    let absorbed = rt.absorbed();
    let sealed = rt.sealed_end().borrow().clone();
    rt.lanes()
        .iter()
        .zip(sealed)
        .map(|(lane, sealed)| {
            json!({
                "partition": lane.partition,
                "logged_end": lane.logged_end(),
                "absorbed_end": absorbed.get(&lane.partition),
                "sealed_end": sealed,
                "open_segment_rows": lane.open_rows(),
                "routed": lane.partition < rt.pipeline.partitions,
                // On a node: whether it holds the partition's lease (else it serves what
                // other nodes sealed of it).
                "running": rt.owns(lane.partition),
            })
        })
        .collect()
}

async fn pipelines(State(app): State<Arc<App>>) -> Response {
    let list: Vec<_> = app
        .pipelines
        .values()
        .map(|s| {
            let rt = &s.runtime;
            let plan = rt.plan();
            let c = &rt.counters;
            let open_since = rt.open_since_ms();
            json!({
                "name": rt.pipeline.name,
                "source": rt.pipeline.source.kind(),
                "node": rt.node(),
                "views": plan.pipeline().views.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
                "accepted": c.accepted.load(Ordering::Relaxed),
                "rejected": c.rejected.load(Ordering::Relaxed),
                "duplicates": c.duplicates.load(Ordering::Relaxed),
                "filtered": c.filtered.load(Ordering::Relaxed),
                "open_segment_rows": rt.open_rows(),
                "open_segment_age_ms": open_since.map_or(0, |since| (now_ms() as u64).saturating_sub(since)),
                "partitions": partitions_json(rt),
                "sealed_segments": c.sealed_segments.load(Ordering::Relaxed),
                "speed_groups": rt.held().0,
                "ingest_rate": c.ingest_rate.lock().per_second(),
                "ack_to_visible_p99_s": c.ack_to_visible.snapshot().quantile_bound(0.99),
                "source_lag": rt.source_status.lag().map(|l| l.total()),
                "batch_cutoff_age_s": plan.pipeline().views.iter().enumerate()
                    .map(|(i, v)| (v.name.clone(), metrics::batch_cutoff_age_seconds(rt, i)))
                    .collect::<BTreeMap<_, _>>(),
                "lag": rt.source_status.lag_json(),
                "lookups": rt.lookups.json(),
                "verified": rt.verified.read().as_ref().map(|v| json!({
                    "ok": v.last.ok,
                    "at": format_ms(v.last.finished_at.timestamp_millis()),
                    "problems": v.last.problems.len(),
                    "last_success": v.last_success.map(|t| format_ms(t.timestamp_millis())),
                })),
                "restated": rt.restated.read().iter().map(|(view, t)| (view.clone(), json!({
                    "late_events": t.late_events,
                    "restated_windows": t.restated_windows,
                    "max_lateness_ms": t.max_lateness_ms,
                }))).collect::<BTreeMap<_, _>>(),
                "sinks": app.ops.sinks.iter()
                    .filter(|s| s.pipeline == rt.pipeline.name)
                    .map(|s| s.json())
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    axum::Json(json!({ "pipelines": list })).into_response()
}
