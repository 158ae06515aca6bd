//! What every HTTP route shares: the [`App`] its handlers read, [`error`] (the JSON body of
//! every refusal), and the ONE middleware stack around all routes — authentication, the body
//! limit, the concurrency limit and body timeouts, the cross-origin guard and request logging.
//! Every route that answers without the bearer token is listed here, in [`open`]; any other
//! route requires it when `serve.token` is set.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::Semaphore;

use super::guard;
use super::metrics::Ops;
use super::query::Served;

/// What the HTTP handlers share.
pub struct App {
    /// The pipelines served, by name.
    pub pipelines: BTreeMap<String, Arc<Served>>,
    /// Bearer token required on every route but the [`open`] ones when set.
    pub token: Option<String>,
    pub max_body_bytes: usize,
    /// `/metrics`, the dashboard and what they need.
    pub ops: Ops,
}

/// `/healthz`: liveness, for load balancers and orchestrators (no token, no queue).
pub const HEALTHZ: &str = "/healthz";
/// `/metrics`: open to scrapers unless `serve.protect_metrics`.
pub const METRICS: &str = "/metrics";
/// The dashboard's page and assets: they hold no data; the page asks for the token itself.
pub const DASHBOARD: &[&str] = &["/", "/dashboard/app.js", "/dashboard/style.css"];

/// Whether the route `route` (its pattern, as routed) answers without the bearer token: the
/// one list of unauthenticated routes.
pub fn open(route: &str, protect_metrics: bool) -> bool {
    route == HEALTHZ || DASHBOARD.contains(&route) || (route == METRICS && !protect_metrics)
}

/// `routes` (every route of the server) behind the one middleware stack, outermost first:
/// request logging, the cross-origin guard, the concurrency limit and body timeouts, the body
/// limit (as JSON), and — on matched routes, so unknown paths stay 404 — authentication.
pub fn stack(app: Arc<App>, routes: Router<Arc<App>>) -> Router {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    routes
        .route(HEALTHZ, axum::routing::get(|| async { "ok\n" }))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth))
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
    if req.uri().path() == HEALTHZ {
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

/// A refusal or failure: `status` with `{"error": message}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// The bearer token on every route but the [`open`] ones (when `serve.token` is set). A route
/// without a known pattern is not open.
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let open = route.is_some_and(|r| open(r, app.ops.protect_metrics));
    if let Some(token) = app.token.as_ref().filter(|_| !open) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
    }

    /// Serves every route of a server with the token `t` (and `extra` as the workflow routes);
    /// returns its address and the handle that stops it.
    async fn server(
        protect_metrics: bool,
        extra: Router<Arc<App>>,
    ) -> (String, tokio_util::sync::CancellationToken) {
        let app = Arc::new(App {
            pipelines: BTreeMap::new(),
            token: Some("t".into()),
            max_body_bytes: 1024,
            ops: Ops::new(protect_metrics),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let router = crate::serving::router(app, extra);
        tokio::spawn(async move {
            crate::serving::server::serve(listener, router, stopped.cancelled_owned()).await
        });
        (format!("http://{addr}"), stop)
    }

    async fn status(url: &str, token: Option<&str>) -> u16 {
        let mut req = reqwest::Client::new().get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().status().as_u16()
    }

    #[tokio::test]
    async fn only_the_listed_routes_answer_without_the_token() {
        let workflows = Router::new().route("/v1/workflows", axum::routing::get(|| async { "[]" }));
        let (base, stop) = server(false, workflows).await;
        for open in [HEALTHZ, METRICS].iter().chain(DASHBOARD) {
            assert!(super::open(open, false), "{open}");
            assert_eq!(status(&format!("{base}{open}"), None).await, 200, "{open}");
        }
        // Every other route, whichever module supplies it, asks for the token.
        for closed in ["/v1/pipelines", "/v1/workflows"] {
            assert!(!super::open(closed, false), "{closed}");
            assert_eq!(
                status(&format!("{base}{closed}"), None).await,
                401,
                "{closed}"
            );
            assert_eq!(
                status(&format!("{base}{closed}"), Some("t")).await,
                200,
                "{closed}"
            );
        }
        // Unknown paths are not found, token or not.
        assert_eq!(status(&format!("{base}/nowhere"), None).await, 404);
        stop.cancel();

        let (base, stop) = server(true, Router::new()).await;
        assert!(!super::open(METRICS, true));
        assert_eq!(status(&format!("{base}{METRICS}"), None).await, 401);
        assert_eq!(status(&format!("{base}{METRICS}"), Some("t")).await, 200);
        assert_eq!(status(&format!("{base}{HEALTHZ}"), None).await, 200);
        stop.cancel();
    }
}
