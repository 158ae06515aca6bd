//! The workflow part of the HTTP API (SPEC.md): trigger a run, read a run, list workflows
//! with their next fire time and recent runs. Served by `serve`, whose orchestrator runs the
//! scheduler and workers; workflow names from URLs are looked up in the project. Orchestration
//! sits above serving: it hands these routes to [`crate::serving::router`], which puts them
//! behind the one middleware stack (authentication included) of [`crate::serving::app`].

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{OrchestrationError, Orchestrator, RunStatus};
use crate::serving::app::error;
use crate::serving::guard;
use crate::state::{Run, RunId};

/// Recent runs listed per workflow by `GET /v1/workflows`.
const RECENT_RUNS: u32 = 10;

/// The routes, served by `orch`; the router they join gives them its own state.
pub fn routes<S>(orch: Orchestrator) -> Router<S> {
    Router::new()
        .route("/v1/workflows", get(list))
        .route("/v1/workflows/{workflow}/runs", post(trigger))
        .route("/v1/runs/{id}", get(run))
        .with_state(Arc::new(orch))
}

fn failure(e: OrchestrationError) -> Response {
    match e {
        OrchestrationError::UnknownWorkflow { .. } => error(StatusCode::NOT_FOUND, e.to_string()),
        e => {
            tracing::error!(error = %e, "workflow request failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

fn time(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_rfc3339()))
}

/// A run as the API shows it (without its log: `lambda-ctl logs`).
pub fn run_json(r: &Run) -> Value {
    json!({
        "id": r.id.0,
        "kind": r.kind.as_str(),
        "name": r.name,
        "state": r.state.as_str(),
        "scheduled_at": time(r.scheduled_at),
        "created_at": time(Some(r.created_at)),
        "started_at": time(r.started_at),
        "finished_at": time(r.finished_at),
        "error": r.error,
    })
}

fn status_json(s: &RunStatus) -> Value {
    let mut v = run_json(&s.run);
    v["tasks"] = s
        .tasks
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "state": t.state.map(|s| s.as_str()),
                "attempts": t.attempts,
                "error": t.error,
            })
        })
        .collect();
    v
}

async fn list(State(orch): State<Arc<Orchestrator>>) -> Response {
    let mut out = Vec::new();
    for wf in &orch.project().workflows {
        let next = match orch.next_fire(&wf.name).await {
            Ok(n) => n,
            Err(e) => return failure(e),
        };
        let runs = match orch.runs(Some(&wf.name), RECENT_RUNS).await {
            Ok(r) => r,
            Err(e) => return failure(e),
        };
        out.push(json!({
            "name": wf.name,
            "schedule": wf.schedule.as_ref().map(|s| s.expr.clone()),
            "timezone": wf.timezone.name(),
            "next_fire": time(next),
            "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
        }));
    }
    axum::Json(json!({ "workflows": out })).into_response()
}

async fn trigger(
    State(orch): State<Arc<Orchestrator>>,
    Path(workflow): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // No body, or JSON: what a page on another origin cannot send without asking first.
    if let Err(message) = guard::trigger_content_type(&headers, body.is_empty()) {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, message);
    }
    match orch.trigger(&workflow).await {
        Ok(id) => (StatusCode::CREATED, axum::Json(json!({ "run_id": id.0 }))).into_response(),
        Err(e) => failure(e),
    }
}

async fn run(State(orch): State<Arc<Orchestrator>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{id}` is not a run id (a number, as printed by `lambda-ctl run`)"),
        );
    };
    match orch.run_status(RunId(id)).await {
        Ok(Some(status)) => axum::Json(status_json(&status)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("run {id} does not exist")),
        Err(e) => failure(e),
    }
}
