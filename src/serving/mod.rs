//! The serving layer (DESIGN.md §5): merge the published batch view with the speed partials
//! of the segments it does not cover, finish, filter, and answer over HTTP, the CLI and SQL
//! (the PostgreSQL wire protocol); follow new publications (pickup); deliver views to their
//! sinks (PostgreSQL tables, Kafka topics, files).

pub mod app;
pub mod candidate;
pub mod dashboard;
pub mod format;
#[cfg(test)]
mod fuzz;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod pickup;
pub mod promote;
pub mod query;
pub mod server;
pub mod sink;
pub mod sql;
pub mod time;
pub mod travel;

use std::sync::Arc;

use axum::Router;

use app::App;

/// Every route of the server — the pipelines' (ingest, views, status, `/metrics`), the
/// dashboard, `/healthz` and the `workflows` routes orchestration supplies — behind the one
/// middleware stack of [`app::stack`].
pub fn router(app: Arc<App>, workflows: Router<Arc<App>>) -> Router {
    let routes = http::routes().merge(dashboard::routes()).merge(workflows);
    app::stack(app, routes)
}
