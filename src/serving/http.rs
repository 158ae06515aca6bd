//! The HTTP API (SPEC.md): ingest, view queries, pipeline status, health, `/metrics` and the
//! dashboard. Names from URLs are looked up in the project, never spliced into paths or SQL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::dashboard;
use super::format;
use super::metrics::{self, Ops};
use super::query::{self, QueryError, ViewQuery};
use super::time::now_ms;
use crate::orchestration::Orchestrator;
use crate::spec::Source;
use crate::speed::runtime::PipelineRuntime;
use crate::telemetry::CONTENT_TYPE;

/// What the HTTP handlers share.
pub struct App {
    pub runtimes: BTreeMap<String, Arc<PipelineRuntime>>,
    /// Bearer token required on /v1 routes when set.
    pub token: Option<String>,
    pub max_body_bytes: usize,
    /// The scheduler and workers of this process, for the workflow routes.
    pub orchestrator: Option<Orchestrator>,
    /// `/metrics`, the dashboard and what they need.
    pub ops: Ops,
}

pub fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/pipelines", get(pipelines))
        .route("/v1/pipelines/{pipeline}/events", post(ingest))
        .route("/v1/views/{pipeline}/{view}", get(view))
        .merge(super::workflows::routes())
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    let scrape = Router::new()
        .route("/metrics", get(metrics_page))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth_metrics));
    Router::new()
        .merge(v1)
        .merge(scrape)
        .merge(dashboard::routes())
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(app.max_body_bytes))
        .layer(middleware::from_fn_with_state(app.clone(), too_large))
        .layer(middleware::from_fn(trace))
        .with_state(app)
}

/// One line per request: refusals at warn, failures at error, the rest (and 404s) at debug.
/// No query strings (they may carry filter values) and never the Authorization header.
async fn trace(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    match status {
        500.. => tracing::error!(%method, %path, status, micros, "request failed"),
        // Unknown paths (a browser's favicon) are not worth a warning.
        404 => tracing::debug!(%method, %path, status, micros, "request refused"),
        400..=499 => tracing::warn!(%method, %path, status, micros, "request refused"),
        _ => tracing::debug!(%method, %path, status, micros, "request"),
    }
    response
}

/// The body limit's rejection as JSON that names the limit and the setting.
async fn too_large(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "request body larger than {} bytes (serve.max_body_bytes); split it into smaller requests",
            app.max_body_bytes
        ),
    )
}

async fn auth_metrics(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if app.ops.protect_metrics {
        auth(State(app), req, next).await
    } else {
        next.run(req).await
    }
}

async fn metrics_page(State(app): State<Arc<App>>) -> Response {
    let page = metrics::render(&app.runtimes, &app.ops).await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], page).into_response()
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            let mut refused = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (send `Authorization: Bearer <token>`)",
            );
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return refused;
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so response time does not leak the token prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

fn runtime(app: &App, name: &str) -> Result<Arc<PipelineRuntime>, Box<Response>> {
    app.runtimes.get(name).cloned().ok_or_else(|| {
        let known: Vec<&str> = app.runtimes.keys().map(String::as_str).collect();
        Box::new(error(
            StatusCode::NOT_FOUND,
            format!("unknown pipeline `{name}` (known: {})", known.join(", ")),
        ))
    })
}

async fn ingest(State(app): State<Arc<App>>, Path(name): Path<String>, body: Bytes) -> Response {
    let rt = match runtime(&app, &name) {
        Ok(rt) => rt,
        Err(e) => return *e,
    };
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

async fn view(
    State(app): State<Arc<App>>,
    Path((pipeline, view)): Path<(String, String)>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let rt = match runtime(&app, &pipeline) {
        Ok(rt) => rt,
        Err(e) => return *e,
    };
    let Some(idx) = rt.pipeline.views.iter().position(|v| v.name == view) else {
        let known: Vec<&str> = rt.pipeline.views.iter().map(|v| v.name.as_str()).collect();
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "pipeline `{pipeline}` has no view `{view}` (views: {})",
                known.join(", ")
            ),
        );
    };
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
    let (q, wants_csv) = match ViewQuery::from_params(params, now_ms(), accept) {
        Ok(parsed) => parsed,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let answer = match tokio::task::spawn_blocking(move || query::query(&rt, idx, &q)).await {
        Ok(Ok(a)) => {
            let served = &app.ops.served;
            served.record(&pipeline, &view, a.as_of.batch_rows, a.as_of.speed_rows);
            a
        }
        Ok(Err(QueryError::BadRequest(m))) => return error(StatusCode::BAD_REQUEST, m),
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

async fn pipelines(State(app): State<Arc<App>>) -> Response {
    let list: Vec<_> = app
        .runtimes
        .values()
        .map(|rt| {
            let c = &rt.counters;
            let open_since = c.open_since_ms.load(Ordering::Relaxed);
            json!({
                "name": rt.pipeline.name,
                "source": rt.pipeline.source.kind(),
                "views": rt.pipeline.views.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
                "accepted": c.accepted.load(Ordering::Relaxed),
                "rejected": c.rejected.load(Ordering::Relaxed),
                "duplicates": c.duplicates.load(Ordering::Relaxed),
                "filtered": c.filtered.load(Ordering::Relaxed),
                "open_segment_rows": c.open_rows.load(Ordering::Relaxed),
                "open_segment_age_ms": if open_since == 0 { 0 } else { (now_ms() as u64).saturating_sub(open_since) },
                "sealed_segments": c.sealed_segments.load(Ordering::Relaxed),
                "speed_groups": rt.state.read().groups(),
                "ingest_rate": c.ingest_rate.lock().per_second(),
                "ack_to_visible_p99_s": c.ack_to_visible.snapshot().quantile_bound(0.99),
                "source_lag": rt.source_status.lag().map(|l| l.total()),
                "batch_cutoff_age_s": rt.pipeline.views.iter().enumerate()
                    .map(|(i, v)| (v.name.clone(), metrics::batch_cutoff_age_seconds(rt, i)))
                    .collect::<BTreeMap<_, _>>(),
                "lag": rt.source_status.lag_json(),
            })
        })
        .collect();
    axum::Json(json!({ "pipelines": list })).into_response()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
    }
}
