//! The dashboard: one page at `/` — pipelines, workflows with their recent runs, and a live
//! chart of any view — built from the same HTTP API a script would use. The assets are embedded
//! in the binary (no build step, no CDN, no request leaves the server's origin); the page sends
//! the bearer token it was given in the URL fragment (`#token=…`) or a prompt.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::app::App;

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

/// No inline script and nothing from elsewhere: a page that only talks to its own server.
const CSP: &str =
    "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'";

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX)))
        .route(
            "/dashboard/app.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route(
            "/dashboard/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE)),
        )
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
