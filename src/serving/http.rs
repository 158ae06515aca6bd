//! The HTTP API (SPEC.md): ingest, view queries, pipeline status, health, `/metrics` and the
//! dashboard. Names from URLs are looked up in the project, never spliced into paths or SQL.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::Semaphore;

use super::dashboard;
use super::format;
use super::guard;
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
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    Router::new()
        .merge(v1)
        .merge(scrape)
        .merge(dashboard::routes())
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(app.max_body_bytes))
        .layer(middleware::from_fn_with_state(app.clone(), too_large))
        .layer(middleware::from_fn_with_state(in_flight, limits))
        .layer(middleware::from_fn_with_state(app.clone(), refuse_foreign))
        .layer(middleware::from_fn(trace))
        .with_state(app)
}

/// Requests handled at once (bodies included); more wait up to [`QUEUE_WAIT`] for a turn.
pub const MAX_IN_FLIGHT: usize = 256;
/// How long a request waits for a turn before a 503.
const QUEUE_WAIT: Duration = Duration::from_secs(10);
/// A request body that sends nothing for this long is abandoned (408).
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A request body must have arrived this long after its request was let in (408).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(300);

/// Refuses what another origin's page could make a browser send (see [`guard`](super::guard)).
async fn refuse_foreign(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match guard::check(req.method(), req.headers(), app.token.is_some()) {
        Ok(()) => next.run(req).await,
        Err(message) => error(StatusCode::FORBIDDEN, message),
    }
}

/// At most [`MAX_IN_FLIGHT`] requests at once, and their bodies on time. `/healthz` skips
/// the queue: a busy server is alive.
async fn limits(State(in_flight): State<Arc<Semaphore>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let Ok(Ok(_turn)) = tokio::time::timeout(QUEUE_WAIT, in_flight.acquire_owned()).await else {
        let mut busy = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("server busy: {MAX_IN_FLIGHT} requests in progress; retry"),
        );
        busy.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return busy;
    };
    let late = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| Body::new(OnTime::new(body, late.clone())));
    let response = next.run(req).await;
    if late.load(Ordering::Relaxed) {
        let mut refused = error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received in time (nothing for {}s, or not all within {}s)",
                BODY_IDLE_TIMEOUT.as_secs(),
                BODY_TIMEOUT.as_secs()
            ),
        );
        refused.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return refused;
    }
    response
}

/// A request body that fails once it stalls for [`BODY_IDLE_TIMEOUT`] or is not complete
/// [`BODY_TIMEOUT`] after the request was let in; `late` records that it did.
struct OnTime {
    inner: Body,
    by: Pin<Box<tokio::time::Sleep>>,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    late: Arc<AtomicBool>,
}

impl OnTime {
    fn new(inner: Body, late: Arc<AtomicBool>) -> OnTime {
        OnTime {
            inner,
            by: Box::pin(tokio::time::sleep(BODY_TIMEOUT)),
            idle: None,
            late,
        }
    }
}

impl http_body::Body for OnTime {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.idle = None;
            return Poll::Ready(frame);
        }
        let idle = this
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(BODY_IDLE_TIMEOUT)));
        if idle.as_mut().poll(cx).is_ready() || this.by.as_mut().poll(cx).is_ready() {
            this.late.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new("request body timed out"))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
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
            .and_then(guard::bearer)
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

async fn ingest(State(app): State<Arc<App>>, Path(name): Path<String>, req: Request) -> Response {
    let rt = match runtime(&app, &name) {
        Ok(rt) => rt,
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
