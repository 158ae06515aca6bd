//! Scale-out runs end to end on a real job queue (SQLite) and a memory lake: who computes
//! the groups when no worker, or a permanent one, is there.

use std::sync::Arc;

use super::{Groups, Help};
use crate::batch::scaleout;
use crate::batch::tests::{SPEC, seal, served};
use crate::lake::Lake;
use crate::plan::Plan;
use crate::spec::Project;
use crate::state::State;

/// A project of `orders` scaling out every run over groups of one segment, on SQLite (the
/// real job queue) and a memory lake, with three sealed segments.
async fn scaling_project(dir: &std::path::Path) -> (Arc<Project>, State, Lake) {
    std::fs::create_dir_all(dir.join("pipelines")).unwrap();
    std::fs::write(dir.join("pipelines/orders.yaml"), SPEC).unwrap();
    std::fs::write(
        dir.join("lambda.yaml"),
        "state: sqlite://state.db\nlake: memory://\nbatch:\n  scale_out_segments: 1\n  group_segments: 1\n",
    )
    .unwrap();
    let project = Arc::new(crate::spec::load(dir).expect("valid project"));
    let state = State::open(&project.settings.state).await.unwrap();
    let lake = Lake::open(&project.settings.lake, &project.settings.lake_options).unwrap();
    for (i, r) in [("DE", 1.0), ("FR", 2.0), ("DE", 3.0)].iter().enumerate() {
        seal(&state, &lake, i as u64, &[*r]).await;
    }
    (project, state, lake)
}

/// `fanout::recompute` of `orders`; asserts the answer and returns the run's log.
async fn scaled_recompute(
    project: &Arc<Project>,
    state: &State,
    lake: &Lake,
    help: Help,
) -> String {
    let plan = Arc::new(Plan::compile(project.pipeline("orders").unwrap()).unwrap());
    let summary = super::recompute(
        project,
        plan.clone(),
        state,
        lake,
        Default::default(),
        help,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        served(&plan, state, lake).await,
        vec![("DE".to_string(), 2, 4.0), ("FR".to_string(), 1, 2.0)]
    );
    state.run(summary.run_id).await.unwrap().unwrap().log
}

/// `lambda-ctl run` with no worker anywhere: its jobs stall, and the run's own process
/// computes them and the finish job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_without_workers_works_on_its_jobs_once_they_stall() {
    let dir = tempfile::tempdir().unwrap();
    let (project, state, lake) = scaling_project(dir.path()).await;
    let log = scaled_recompute(&project, &state, &lake, Help::AfterAMoment).await;
    let me = format!("lambda-ctl-run:{}", std::process::id());
    assert!(
        log.contains(&format!("3 group(s) ended on 1 worker(s) ({me} 3)")),
        "{log}"
    );
}

/// A `batch` task in a process that works the batch job queue already (`serve`, `lambda-ctl
/// worker`) starts no helper of its own: that process's worker computes every group and the
/// finish job, however long it takes to come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_beside_a_batch_worker_leaves_its_jobs_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let (project, state, lake) = scaling_project(dir.path()).await;
    // The worker starts late: a helper, had the run started one, would take the jobs first.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let groups = Groups::open(&state).await.unwrap();
    let working = tokio::spawn({
        let (project, state, lake, shutdown) = (
            project.clone(),
            state.clone(),
            lake.clone(),
            shutdown.clone(),
        );
        async move {
            tokio::time::sleep(scaleout::HELP_AFTER * 2).await;
            let work = groups.work(project, state, lake, "permanent".into(), 1, shutdown);
            work.await.unwrap();
        }
    });
    let log = scaled_recompute(&project, &state, &lake, Help::No).await;
    shutdown.cancel();
    working.await.unwrap();
    assert!(
        log.contains("3 group(s) ended on 1 worker(s) (permanent 3)"),
        "{log}"
    );
}
