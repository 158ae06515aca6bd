//! Garbage collection of view versions: the files of a version replaced at least [`GRACE`]
//! ago, unless a run still going may publish them, an `as_of` answer may read them (a
//! server recorded installing it, within `serve.history`), or it is the view's candidate.

use super::GRACE;
use crate::lake::{self, Lake};
use crate::state::{Publication, RunId, State, StateError};

/// Deletes the files of view versions replaced at least [`GRACE`] ago: every version but the
/// current one was replaced no later than the current one was published. Runs still going
/// (not finished, started within the grace period) keep their files. Failures are logged, never fatal.
pub(super) async fn collect_garbage(
    state: &State,
    lake: &Lake,
    pipeline: &str,
    view: &str,
    current: &Publication,
    history: std::time::Duration,
) {
    let age = chrono::Utc::now() - current.published_at;
    if age.to_std().is_ok_and(|a| a < GRACE) || age < chrono::TimeDelta::zero() {
        return;
    }
    let prefix = lake::view_prefix(pipeline, view);
    // Versions served within `serve.history`: `as_of` answers read them.
    let since =
        chrono::Utc::now() - chrono::TimeDelta::from_std(history).unwrap_or(chrono::TimeDelta::MAX);
    let since_ns = since.timestamp_nanos_opt().unwrap_or(i64::MIN);
    let served = match state.served_runs(pipeline, view, since_ns).await {
        Ok(mut runs) => {
            // And the view's candidate version (blue/green), until promoted or discarded.
            match state.candidate(pipeline, view).await {
                Ok(c) => runs.extend(c.map(|c| c.publication.run_id.0)),
                Err(e) => {
                    tracing::warn!(%pipeline, %view, error = %e, "cannot read the view's candidate; keeping every version");
                    return;
                }
            }
            runs
        }
        Err(e) => {
            tracing::warn!(%pipeline, %view, error = %e, "cannot read which view versions were served; keeping them all");
            return;
        }
    };
    let files = match lake.list(&prefix).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(%pipeline, %view, error = %e, "cannot list old view versions");
            return;
        }
    };
    for f in files {
        let Some(run) = run_of(&f.path, &prefix) else {
            continue;
        };
        if run == current.run_id.0 || served.contains(&run) {
            continue;
        }
        // A run still going may publish these files.
        match still_going(state, run).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(run, error = %e, "cannot read run; keeping its view files");
                continue;
            }
        }
        match lake.delete(&f.path).await {
            Ok(()) => tracing::info!(path = %f.path, "collected old view version"),
            Err(e) => tracing::warn!(path = %f.path, error = %e, "cannot delete old view file"),
        }
    }
}

/// The run of a lake path `{prefix}run={id}/…`.
pub(crate) fn run_of(path: &str, prefix: &str) -> Option<i64> {
    path.strip_prefix(prefix)?
        .strip_prefix("run=")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// Whether run `id` may still write to the lake: it has not finished and started less than
/// [`GRACE`] ago (one "running" for longer was killed and never will).
pub(crate) async fn still_going(state: &State, id: i64) -> Result<bool, StateError> {
    Ok(state.run(RunId(id)).await?.is_some_and(|r| {
        !r.state.is_finished()
            && (chrono::Utc::now() - r.created_at)
                .to_std()
                .is_ok_and(|a| a < GRACE)
    }))
}
