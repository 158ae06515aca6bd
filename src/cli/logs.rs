//! `lambda-ctl logs RUN_ID`: the run's log, then every task attempt's output.

use std::path::Path;

use super::CliError;
use super::worker::{open, runtime, user_or_internal};
use crate::state::RunId;

pub fn run(project_dir: &Path, run_id: i64) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    runtime()?.block_on(async {
        let orchestrator = open(project).await?;
        let logs = orchestrator
            .logs(RunId(run_id))
            .await
            .map_err(user_or_internal)?
            .ok_or_else(|| {
                CliError::User(format!(
                    "run {run_id} does not exist (see `lambda-ctl runs`)"
                ))
            })?;
        let run = &logs.run;
        println!(
            "run {} of {} ({}): {}",
            run.id, run.name, run.kind, run.state
        );
        if let Some(e) = &run.error {
            println!("error: {e}");
        }
        print!("{}", run.log);
        for a in &logs.attempts {
            println!();
            println!("== {} attempt {}: {}", a.task, a.attempt, a.state);
            if let Some(e) = &a.error {
                println!("error: {e}");
            }
            print!("{}", a.log);
        }
        Ok(())
    })
}
