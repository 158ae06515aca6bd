//! `lambda-ctl backfill WORKFLOW --from T --to T`: one run per schedule slot in the range,
//! executed by `serve` and `worker` processes as `max_active_runs` allows.

use std::path::Path;

use chrono::{DateTime, Utc};

use super::CliError;
use super::worker::{open, runtime, user_or_internal};
use crate::clock::now_ms;
use crate::serving::time::parse_time;

pub fn run(project_dir: &Path, workflow: &str, from: &str, to: &str) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let now = now_ms();
    let from = time(from, now)?;
    let to = time(to, now)?;
    runtime()?.block_on(async {
        let orchestrator = open(project).await?;
        let ids = orchestrator
            .backfill(workflow, from, to)
            .await
            .map_err(user_or_internal)?;
        match (ids.first(), ids.last()) {
            (Some(first), Some(last)) => println!(
                "queued {} run{} of {workflow} ({first}..={last}); `lambda-ctl serve` or `lambda-ctl worker` runs them",
                ids.len(),
                if ids.len() == 1 { "" } else { "s" }
            ),
            _ => println!(
                "every slot of {workflow} in the range already has a run (or none falls in it); nothing queued"
            ),
        }
        Ok(())
    })
}

fn time(text: &str, now_ms: i64) -> Result<DateTime<Utc>, CliError> {
    let ms = parse_time(text, now_ms).map_err(CliError::User)?;
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| CliError::User(format!("time `{text}` is out of range")))
}
