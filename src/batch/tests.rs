//! Batch runs in-process on a `memory://` lake (the bytes-through-`Lake` path) and SQLite:
//! full, incremental, full again when the logic changes, and a failed run that publishes
//! nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use polars::prelude::*;

use super::*;
use crate::lake::{self, Lake};
use crate::plan::Plan;
use crate::state::{Outcome, RunKind, RunState, Segment, State};

pub(crate) const SPEC: &str = r#"
name: orders
source:
  type: http
schema:
  ts: timestamp
  country: string
  amount: float
event_time: ts
filter: "amount >= 0"
views:
  - name: by_country
    group_by: [country]
    window: all
    metrics:
      n: count()
      total: sum(amount)
"#;

fn plan(spec: &str) -> Arc<Plan> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    std::fs::write(dir.path().join("pipelines/orders.yaml"), spec).unwrap();
    let project = crate::spec::load(dir.path()).expect("valid spec");
    Arc::new(Plan::compile(project.pipeline("orders").unwrap()).unwrap())
}

/// A SQLite state DB in a temporary directory (kept while the guard lives) and a `memory://`
/// lake.
async fn open() -> (tempfile::TempDir, State, Lake) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let state = State::open(&url).await.unwrap();
    let lake = Lake::open("memory://", &BTreeMap::new()).unwrap();
    (dir, state, lake)
}

/// Events `[lo, lo + n)` as the speed layer archives them, the i-th at `T0 + i` ms.
fn segment_frame(lo: u64, rows: &[(&str, f64)]) -> DataFrame {
    let timed: Vec<(i64, &str, f64)> = (0..)
        .zip(rows)
        .map(|(i, &(country, amount))| (T0 + i, country, amount))
        .collect();
    timed_frame(lo, &timed)
}

/// The event time of the first event of [`segment_frame`].
const T0: i64 = 1_700_000_000_000;

/// Events `[lo, lo + n)` with their event times (ms), as the speed layer archives them.
fn timed_frame(lo: u64, rows: &[(i64, &str, f64)]) -> DataFrame {
    let hi = lo + rows.len() as u64;
    let mut df = df!(
        "ts" => rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        "country" => rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        "amount" => rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        "_offset" => (lo as i64..hi as i64).collect::<Vec<_>>(),
    )
    .unwrap();
    let ts = df
        .column("ts")
        .unwrap()
        .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))
        .unwrap();
    df.with_column(ts).unwrap();
    df
}

/// Archives `[lo, lo + n)` as a segment, as the speed layer does.
pub(crate) async fn seal(state: &State, lake: &Lake, lo: u64, rows: &[(&str, f64)]) {
    seal_frame(state, lake, lo, segment_frame(lo, rows)).await;
}

/// Archives the events of `df` (from [`timed_frame`]) as the segment starting at `lo`.
async fn seal_frame(state: &State, lake: &Lake, lo: u64, mut df: DataFrame) {
    let hi = lo + df.height() as u64;
    let times = df.column("ts").unwrap().cast(&DataType::Int64).unwrap();
    let times = times.i64().unwrap();
    let (min_event_ms, max_event_ms) = (times.min(), times.max());
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf).finish(&mut df).unwrap();
    let path = lake::archive_path("orders", 0, lo, hi);
    let (size, crc32) = (buf.len() as u64, crc32fast::hash(&buf));
    lake.put(&path, buf).await.unwrap();
    state
        .seal_segment(&Segment {
            pipeline: "orders".into(),
            partition: 0,
            lo,
            hi,
            path,
            rows: hi - lo,
            bytes: size,
            dead_letters: 0,
            min_event_ms,
            max_event_ms,
            lookups: None,
            crc32: Some(crc32),
        })
        .await
        .unwrap();
}

/// The served rows of the current publication: (country, n, total).
pub(crate) async fn served(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
) -> Vec<(String, u64, f64)> {
    let p = state
        .current_publication("orders", "by_country")
        .await
        .unwrap()
        .expect("published");
    let df = plan
        .finish(0, load_partials(plan, lake, 0, &p).await.unwrap())
        .unwrap();
    let c = df.column("country").unwrap().str().unwrap().clone();
    let n = df.column("n").unwrap().i64().unwrap().clone();
    let t = df.column("total").unwrap().f64().unwrap().clone();
    (0..df.height())
        .map(|i| {
            (
                c.get(i).unwrap().to_string(),
                n.get(i).unwrap() as u64,
                t.get(i).unwrap(),
            )
        })
        .collect()
}

async fn run(plan: &Arc<Plan>, state: &State, lake: &Lake) -> Result<RunSummary, BatchError> {
    let mut seen = Vec::new();
    let r = recompute(
        plan.clone(),
        state,
        lake,
        Select::default(),
        &mut |p: &Progress| seen.push(p.clone()),
    )
    .await;
    if r.is_ok() {
        assert!(matches!(seen.first(), Some(Progress::Started { .. })));
        assert!(matches!(seen.last(), Some(Progress::Published { .. })));
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_then_full_on_new_logic_and_failures_publish_nothing() {
    let (_dir, state, lake) = open().await;
    let v1 = plan(SPEC);

    seal(&state, &lake, 0, &[("DE", 1.0), ("US", 2.0), ("DE", -1.0)]).await;
    let r = run(&v1, &state, &lake).await.unwrap();
    assert_eq!(r.views[0].mode, Mode::Full);
    assert_eq!(r.cutoff, BTreeMap::from([(0, 3)]));
    assert_eq!(
        served(&v1, &state, &lake).await,
        vec![("DE".into(), 1, 1.0), ("US".into(), 1, 2.0)]
    );

    seal(&state, &lake, 3, &[("DE", 5.0), ("FR", 7.0)]).await;
    let r = run(&v1, &state, &lake).await.unwrap();
    assert_eq!(r.views[0].mode, Mode::Incremental);
    assert_eq!(r.views[0].segments, 1, "only the new segment is scanned");
    assert_eq!(
        served(&v1, &state, &lake).await,
        vec![
            ("DE".into(), 2, 6.0),
            ("FR".into(), 1, 7.0),
            ("US".into(), 1, 2.0)
        ]
    );
    let recorded = state.run(r.run_id).await.unwrap().unwrap();
    assert_eq!(recorded.state, RunState::Succeeded);
    assert!(recorded.log.contains("incremental"), "{}", recorded.log);

    // `--full`: the same logic, recomputed from every segment, to the same answer.
    let before = served(&v1, &state, &lake).await;
    let full = Select {
        full: true,
        ..Select::default()
    };
    let r = recompute(v1.clone(), &state, &lake, full, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(r.views[0].mode, Mode::Full);
    assert_eq!(r.views[0].segments, 2, "every sealed segment is scanned");
    assert_eq!(served(&v1, &state, &lake).await, before);

    // A fixed filter is a new logic: everything is recomputed.
    let v2 = plan(&SPEC.replace("amount >= 0", "amount >= 2"));
    let r = run_ok(&v2, &state, &lake).await;
    assert_eq!(r.views[0].mode, Mode::Full);
    assert_eq!(
        served(&v2, &state, &lake).await,
        vec![
            ("DE".into(), 1, 5.0),
            ("FR".into(), 1, 7.0),
            ("US".into(), 1, 2.0)
        ]
    );

    // A lost segment fails the run; the served version stays.
    let before = state
        .current_publication("orders", "by_country")
        .await
        .unwrap();
    seal(&state, &lake, 5, &[("JP", 1.0)]).await;
    lake.delete(&lake::archive_path("orders", 0, 5, 6))
        .await
        .unwrap();
    let v3 = plan(&SPEC.replace("amount >= 0", "amount >= 3"));
    let err = run(&v3, &state, &lake).await.unwrap_err();
    assert!(err.to_string().contains("by_country"), "{err}");
    let after = state
        .current_publication("orders", "by_country")
        .await
        .unwrap();
    assert_eq!(before, after);
    let last = state.runs(Some("orders"), 1).await.unwrap();
    assert_eq!(last[0].state, RunState::Failed);

    // An unknown view is refused before any run is recorded.
    let err = recompute(
        v1.clone(),
        &state,
        &lake,
        Select {
            views: Some(&["nope".into()]),
            ..Select::default()
        },
        &mut |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, BatchError::UnknownView { .. }), "{err}");
    assert_eq!(state.runs(Some("orders"), 10).await.unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restatement_that_published_nothing_is_recomputed_by_the_next_run() {
    let (_dir, state, lake) = open().await;
    let v1 = plan(SPEC);
    seal(&state, &lake, 0, &[("DE", 1.0), ("US", 2.0)]).await;
    run_ok(&v1, &state, &lake).await;
    seal(&state, &lake, 2, &[("DE", 5.0)]).await;
    assert_eq!(state.restated_by("orders").await.unwrap(), None);

    // `run --refresh-lookups` recorded new versions for every segment, then died before it
    // published (killed, the lake down): the publication holds the old enrichment.
    let (_, segments) = sealed(&state, "orders").await.unwrap();
    let refresh = state
        .create_run(RunKind::Batch, "orders", None)
        .await
        .unwrap();
    state.start_run(refresh.id).await.unwrap();
    state
        .record_lookups("orders", refresh.id, &segments, Some(r#"{"stores":"v2"}"#))
        .await
        .unwrap();
    state
        .finish_run(refresh.id, Outcome::Failed, Some("killed"))
        .await
        .unwrap();
    assert_eq!(state.restated_by("orders").await.unwrap(), Some(refresh.id));
    let recorded = state.segments("orders").await.unwrap();
    assert!(
        recorded
            .iter()
            .all(|s| s.lookups.as_deref() == Some(r#"{"stores":"v2"}"#))
    );

    // The next run of any kind builds on nothing computed before the restatement: it
    // recomputes every segment (with the versions they now record) and says why.
    let r = run_ok(&v1, &state, &lake).await;
    assert_eq!(r.views[0].mode, Mode::Full);
    assert_eq!(r.views[0].segments, 2);
    let log = state.run(r.run_id).await.unwrap().unwrap().log;
    assert!(log.contains("restatement"), "{log}");
    assert_eq!(
        served(&v1, &state, &lake).await,
        vec![("DE".into(), 2, 6.0), ("US".into(), 1, 2.0)]
    );
    // Published after the restatement, the view is a base again.
    seal(&state, &lake, 3, &[("FR", 3.0)]).await;
    let r = run_ok(&v1, &state, &lake).await;
    assert_eq!(r.views[0].mode, Mode::Incremental);
    assert_eq!(r.views[0].segments, 1);
}

async fn run_ok(plan: &Arc<Plan>, state: &State, lake: &Lake) -> RunSummary {
    run(plan, state, lake).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_against_a_store_that_stays_down_fails_cleanly_and_publishes_nothing() {
    let (_dir, state, up) = open().await;
    let v1 = plan(SPEC);
    seal(&state, &up, 0, &[("DE", 1.0), ("US", 2.0)]).await;
    run_ok(&v1, &state, &up).await;
    let before = state
        .current_publication("orders", "by_country")
        .await
        .unwrap();

    // The same lake, now on an S3 endpoint nothing answers (a port bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options: BTreeMap<String, String> = [
        ("endpoint", format!("http://127.0.0.1:{port}")),
        ("allow_http", "true".into()),
        ("region", "us-east-1".into()),
        ("access_key_id", "test".into()),
        ("secret_access_key", "test".into()),
        ("max_retries", "2".into()),
        ("retry_timeout", "5s".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let down = Lake::open("s3://lake/prefix", &options).unwrap();
    seal(&state, &up, 2, &[("FR", 3.0)]).await;
    let started = Instant::now();
    let err = run(
        &plan(&SPEC.replace("amount >= 0", "amount >= 1")),
        &state,
        &down,
    )
    .await
    .unwrap_err();
    let text = format!("{err}");
    assert!(
        text.contains("by_country") && text.contains("archive/orders/"),
        "the error names the view and the object: {text}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "bounded retries"
    );
    let after = state
        .current_publication("orders", "by_country")
        .await
        .unwrap();
    assert_eq!(before, after, "nothing published");
    let last = &state.runs(Some("orders"), 1).await.unwrap()[0];
    assert_eq!(last.state, RunState::Failed);
    assert!(
        last.error
            .as_deref()
            .is_some_and(|e| e.contains("lake get")),
        "{:?}",
        last.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_group_partials_of_failed_runs_are_collected_and_live_ones_kept() {
    let (_dir, state, lake) = open().await;
    let failed = state
        .create_run(RunKind::Batch, "orders", None)
        .await
        .unwrap()
        .id;
    state.start_run(failed).await.unwrap();
    state
        .finish_run(failed, Outcome::Failed, Some("killed"))
        .await
        .unwrap();
    let running = state
        .create_run(RunKind::Batch, "orders", None)
        .await
        .unwrap()
        .id;
    state.start_run(running).await.unwrap();
    let current = state
        .create_run(RunKind::Batch, "orders", None)
        .await
        .unwrap()
        .id;
    for run in [failed, running, current] {
        let path = format!(
            "{}group-000000/v.parquet",
            lake::run_scratch_prefix("orders", run.0)
        );
        lake.put(&path, b"x".to_vec()).await.unwrap();
    }
    lake.put("runs/other/run=1/group-000000/v.parquet", b"x".to_vec())
        .await
        .unwrap();
    scaleout::collect_stale(&state, &lake, "orders", current.0).await;
    let left: Vec<String> = lake
        .list("runs/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .collect();
    assert_eq!(
        left,
        vec![
            format!(
                "{}group-000000/v.parquet",
                lake::run_scratch_prefix("orders", running.0)
            ),
            format!(
                "{}group-000000/v.parquet",
                lake::run_scratch_prefix("orders", current.0)
            ),
            "runs/other/run=1/group-000000/v.parquet".to_string(),
        ]
    );
}

/// A queue in memory: jobs are recorded, and [`work_off`] does them as a worker would.
#[derive(Default)]
struct Recorded {
    groups: parking_lot::Mutex<Vec<scaleout::GroupJob>>,
    finishes: parking_lot::Mutex<Vec<scaleout::FinishJob>>,
    keys: parking_lot::Mutex<std::collections::HashSet<i64>>,
}

impl scaleout::Fanout for Recorded {
    fn submit<'a>(
        &'a self,
        jobs: &'a [scaleout::GroupJob],
    ) -> futures::future::BoxFuture<'a, anyhow::Result<()>> {
        self.groups.lock().extend(jobs.iter().cloned());
        Box::pin(async { Ok(()) })
    }

    fn finish<'a>(
        &'a self,
        job: &'a scaleout::FinishJob,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<()>> {
        // Queued twice (by the last group and by the waiting run): one job, as apalis' key
        // makes it (a key queued before, done or not, is not queued again).
        if self.keys.lock().insert(job.run_id) {
            self.finishes.lock().push(job.clone());
        }
        Box::pin(async { Ok(()) })
    }
}

/// Does the recorded groups, newest first, then the finish job the last one queues.
async fn work_off(plan: &Arc<Plan>, state: &State, lake: &Lake, queue: &Recorded) {
    use scaleout::Fanout;
    loop {
        let group = queue.groups.lock().pop();
        if let Some(job) = group {
            // A group's own failure is recorded for the finish job, which reports it.
            let (finish, _) = scaleout::compute(plan, state, lake, "test", &job)
                .await
                .unwrap();
            if let Some(finish) = finish {
                queue.finish(&finish).await.unwrap();
            }
            continue;
        }
        let finish = queue.finishes.lock().pop();
        if let Some(job) = finish {
            scaleout::finish(plan, state, lake, &job).await.unwrap();
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn scale(queue: &Recorded) -> ScaleOut<'_> {
    ScaleOut {
        settings: crate::spec::BatchSettings {
            scale_out_segments: 2,
            group_segments: 2,
        },
        fanout: queue,
        help: None,
    }
}

/// A scaled-out run, its jobs done by [`work_off`] meanwhile.
async fn scaled_run(
    plan: &Arc<Plan>,
    state: &State,
    lake: &Lake,
    queue: &Recorded,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<RunSummary, BatchError> {
    let run = recompute_scaled(
        plan.clone(),
        state,
        lake,
        Select::default(),
        Some(scale(queue)),
        progress,
    );
    let (summary, ()) = tokio::join!(run, work_off(plan, state, lake, queue));
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_out_run_is_published_by_its_finish_job_even_when_its_process_dies() {
    let (_dir, state, lake) = open().await;
    let plan = plan(SPEC);
    let rows = [
        ("DE", 1.0),
        ("US", 2.0),
        ("DE", 4.0),
        ("FR", -1.0),
        ("FR", 8.0),
    ];
    for (i, r) in rows.iter().enumerate() {
        seal(&state, &lake, i as u64, &[*r]).await;
    }

    // The run's process waits while a worker does its 3 groups and the finish job.
    let queue = Recorded::default();
    let mut seen = Vec::new();
    let summary = scaled_run(&plan, &state, &lake, &queue, &mut |p: &Progress| {
        seen.push(p.clone())
    })
    .await
    .unwrap();
    assert_eq!(summary.views[0].mode, Mode::Full);
    assert_eq!(summary.views[0].segments, 5);
    let reported = |seen: &[Progress]| {
        seen.iter()
            .filter_map(|p| match p {
                Progress::Segments { done, total, .. } => Some((*done, *total)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(reported(&seen).last(), Some(&(5, 5)), "{seen:?}");
    assert!(matches!(seen.last(), Some(Progress::Published { .. })));
    let expected = vec![
        ("DE".to_string(), 2, 5.0),
        ("FR".to_string(), 1, 8.0),
        ("US".to_string(), 1, 2.0),
    ];
    assert_eq!(served(&plan, &state, &lake).await, expected);
    let run = state.run(summary.run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Succeeded);
    assert!(run.log.contains("3 group job(s)"), "{}", run.log);
    // Where the groups ran and how long the slowest took.
    assert!(
        run.log
            .contains("3 group(s) ended on 1 worker(s) (test 3); median "),
        "{}",
        run.log
    );
    assert!(run.log.contains("on test"), "{}", run.log);
    let scratch = lake.list("runs/").await.unwrap();
    assert!(scratch.is_empty(), "scratch files left: {scratch:?}");

    // Three more segments; the run's process dies once its jobs are queued. A worker still
    // publishes the incremental result and ends the run.
    for (i, r) in [("JP", 3.0), ("DE", 1.0), ("US", 0.5)].iter().enumerate() {
        seal(&state, &lake, 5 + i as u64, &[*r]).await;
    }
    {
        let mut quiet = |_: &Progress| {};
        let run = recompute_scaled(
            plan.clone(),
            &state,
            &lake,
            Select::default(),
            Some(scale(&queue)),
            &mut quiet,
        );
        tokio::pin!(run);
        while queue.groups.lock().is_empty() {
            tokio::select! {
                r = &mut run => panic!("the run ended before its workers did anything: {r:?}"),
                () = tokio::time::sleep(std::time::Duration::from_millis(2)) => {}
            }
        }
    }
    let orphan = state.runs(Some("orders"), 1).await.unwrap().remove(0);
    assert_eq!(orphan.state, RunState::Running);
    work_off(&plan, &state, &lake, &queue).await;
    let orphan = state.run(orphan.id).await.unwrap().unwrap();
    assert_eq!(orphan.state, RunState::Succeeded, "{}", orphan.log);
    assert!(
        orphan.log.contains("incremental over 3 segment(s)"),
        "{}",
        orphan.log
    );
    assert_eq!(
        served(&plan, &state, &lake).await,
        vec![
            ("DE".to_string(), 3, 6.0),
            ("FR".to_string(), 1, 8.0),
            ("JP".to_string(), 1, 3.0),
            ("US".to_string(), 2, 2.5),
        ]
    );

    // A group that cannot be computed fails the run in its finish job; nothing is published.
    let before = state
        .current_publication("orders", "by_country")
        .await
        .unwrap();
    for (i, r) in [("JP", 1.0), ("DE", 2.0)].iter().enumerate() {
        seal(&state, &lake, 8 + i as u64, &[*r]).await;
    }
    lake.delete(&lake::archive_path("orders", 0, 9, 10))
        .await
        .unwrap();
    let failed = scaled_run(&plan, &state, &lake, &queue, &mut |_| {}).await;
    let err = failed.unwrap_err().to_string();
    assert!(err.contains("group-000000 failed"), "{err}");
    assert_eq!(
        state
            .current_publication("orders", "by_country")
            .await
            .unwrap(),
        before
    );
    let last = state.runs(Some("orders"), 1).await.unwrap().remove(0);
    assert_eq!(last.state, RunState::Failed);
    assert!(
        last.log.contains("failed: group-000000 failed"),
        "{}",
        last.log
    );
}

/// `verify` checks each segment's file against its manifest row — a damaged or swapped file is
/// named, and the engines compare the intact rest — checks a random sample when asked, and its
/// recorded results read back as the latest one and the last success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_damaged_segments_checks_samples_and_records_results() {
    use crate::spec::Sample;
    let (_dir, state, lake) = open().await;
    let plan = plan(SPEC);
    for lo in [0, 3, 6, 9] {
        seal(&state, &lake, lo, &[("DE", 1.0), ("US", 2.0), ("FR", -1.0)]).await;
    }
    let all = verify::verify(plan.clone(), &state, &lake, Sample::All)
        .await
        .unwrap();
    assert!(all.ok(), "{:?}", all.problems());
    assert_eq!((all.segments, all.sealed, all.events), (4, 4, 12));
    assert_eq!(all.views[0].rows, 2);
    let passed = verify::record(&state, "orders", None, &all).await.unwrap();

    let some = verify::verify(plan.clone(), &state, &lake, Sample::Segments(2))
        .await
        .unwrap();
    assert_eq!((some.segments, some.sealed, some.events), (2, 4, 6));
    let share = verify::verify(plan.clone(), &state, &lake, Sample::Percent(10.0))
        .await
        .unwrap();
    assert_eq!(share.segments, 1, "at least one segment");

    // One file damaged in place (same size), one replaced by another segment's file.
    let segments = state.segments("orders").await.unwrap();
    let mut bytes = lake.get(&segments[1].path).await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    lake.put(&segments[1].path, bytes).await.unwrap();
    let other = lake.get(&segments[0].path).await.unwrap();
    lake.put(&segments[3].path, other).await.unwrap();
    let found = verify::verify(plan.clone(), &state, &lake, Sample::All)
        .await
        .unwrap();
    assert!(!found.ok());
    assert_eq!(found.damaged.len(), 2, "{:?}", found.damaged);
    assert!(
        found.damaged[0].contains(&segments[1].path) && found.damaged[0].contains("checksum"),
        "{:?}",
        found.damaged
    );
    assert!(
        found.damaged[1].contains(&segments[3].path),
        "{:?}",
        found.damaged
    );
    // The engines compared the two intact segments, and agree on them.
    assert!(found.views.iter().all(|v| v.differences.is_empty()));
    assert_eq!(found.problems(), found.damaged);
    assert!(
        found.verdict().unwrap().contains("restore those files"),
        "{:?}",
        found.verdict()
    );
    assert_eq!(all.verdict(), None);
    let failed = verify::record(&state, "orders", Some(RunId(7)), &found)
        .await
        .unwrap();

    // A file gone from the lake is named as missing.
    lake.delete(&segments[2].path).await.unwrap();
    let missing = verify::verify(plan.clone(), &state, &lake, Sample::All)
        .await
        .unwrap();
    assert!(
        missing.damaged[1].contains(&segments[2].path) && missing.damaged[1].contains("missing"),
        "{:?}",
        missing.damaged
    );

    // Without a recorded checksum (a segment sealed before it was kept), the positions tell a
    // swapped file.
    let mut unchecked = segments[3].clone();
    unchecked.crc32 = None;
    let bytes = lake.get(&unchecked.path).await.unwrap();
    let problem = verify::check_events(&unchecked, bytes, "ts").unwrap_err();
    assert!(problem.contains("position 0 where 9 belongs"), "{problem}");

    let status = state.verify_status("orders").await.unwrap().unwrap();
    assert_eq!(status.last, failed);
    assert_eq!(status.last_success, Some(passed.finished_at));
    assert_eq!(state.verify_statuses().await.unwrap().len(), 1);
    assert!(state.verify_status("other").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_segment_fails_the_run_by_name_and_is_never_decoded() {
    // In memory (the bytes are decoded by lambda-ctl) and in a directory (polars scans the
    // files itself).
    let (dir, state, memory) = open().await;
    damaged_segment_fails_the_run(&state, &memory).await;
    let url = format!("sqlite://{}", dir.path().join("files.db").display());
    let state = State::open(&url).await.unwrap();
    let files = format!("file://{}", dir.path().join("lake").display());
    let files = Lake::open(&files, &BTreeMap::new()).unwrap();
    damaged_segment_fails_the_run(&state, &files).await;
}

async fn damaged_segment_fails_the_run(state: &State, lake: &Lake) {
    let plan = plan(SPEC);
    for lo in [0, 3] {
        seal(state, lake, lo, &[("DE", 1.0), ("US", 2.0), ("FR", -1.0)]).await;
    }
    // A bit flipped mid-file, the size unchanged: a parquet reader would trust it.
    let segments = state.segments("orders").await.unwrap();
    let mut bytes = lake.get(&segments[1].path).await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    lake.put(&segments[1].path, bytes).await.unwrap();
    let e = run(&plan, state, lake).await.unwrap_err();
    let message = format!("{e:#}");
    assert!(
        message.contains(&segments[1].path) && message.contains("checksum"),
        "{message}"
    );
    assert!(
        message.contains("restore the file from a copy of the lake"),
        "{message}"
    );
    assert!(
        state
            .current_publication("orders", "by_country")
            .await
            .unwrap()
            .is_none(),
        "nothing published"
    );
    let err = segments[1].read(lake).await.unwrap_err();
    assert!(format!("{err:#}").contains("checksum"), "{err:#}");
    // Scaled out: the group job carries the size and checksum, and fails the run by name.
    let queue = Recorded::default();
    let e = scaled_run(&plan, state, lake, &queue, &mut |_| {})
        .await
        .unwrap_err();
    let message = format!("{e:#}");
    assert!(
        message.contains(&segments[1].path) && message.contains("checksum"),
        "{message}"
    );
}

/// A view that reads no column at all (an all-time `count()` of an unfiltered pipeline) counts
/// every event of a Parquet scan, as one over events in memory does.
#[test]
fn a_view_reading_no_column_counts_every_scanned_event() {
    let spec = SPEC
        .replace("filter: \"amount >= 0\"\n", "")
        .replace("    group_by: [country]\n", "")
        .replace("      total: sum(amount)\n", "");
    let plan = plan(&spec);
    let dir = tempfile::tempdir().unwrap();
    let mut df = segment_frame(0, &[("NL", 1.0), ("DE", -2.0), ("NL", 3.0)]);
    let path = dir.path().join("segment.parquet");
    ParquetWriter::new(std::fs::File::create(&path).unwrap())
        .finish(&mut df)
        .unwrap();
    for source in [
        scan::Source::Files(vec![path]),
        scan::Source::Frames(vec![df]),
    ] {
        let parts = scan::Parts(vec![(source, crate::plan::LookupSet::none())]);
        let out = plan
            .finish(0, scan::view_partials(&plan, 0, &parts).unwrap())
            .unwrap();
        assert_eq!(
            out.column("n").unwrap().i64().unwrap().get(0),
            Some(3),
            "{out}"
        );
    }
}

/// An incremental run writes the partials of its new segments beside its base's files rather
/// than rewriting the view: what it writes follows the new segments, the number of files stays
/// bounded, and the answer is a from-scratch computation's after every run — late events into
/// old windows included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_run_writes_its_new_partials_beside_the_base_and_answers_the_same() {
    const MINUTE: i64 = 60_000;
    let spec = SPEC
        .replace("window: all", "window: 1m")
        .replace(
            "      total: sum(amount)",
            "      total: sum(amount)\n      amounts: approx_count_distinct(amount)\n      median: approx_quantile(amount, 0.5)",
        );
    let plan = plan(&spec);
    let (_dir, state, lake) = open().await;
    let countries = ["DE", "US", "FR", "JP", "BR"];
    let event = |i: i64, minute: i64| {
        let at = T0 - T0 % MINUTE + minute * MINUTE + (i * 7_919) % MINUTE;
        (at, countries[(i % 5) as usize], (i % 9_973) as f64 / 2.0)
    };
    // A day's base: 240 minutes × 5 countries.
    let base: Vec<_> = (0..60_000).map(|i| event(i, i % 240)).collect();
    let mut frames = vec![timed_frame(0, &base)];
    seal_frame(&state, &lake, 0, frames[0].clone()).await;
    let files_of = |run: RunId| {
        let lake = lake.clone();
        async move {
            let prefix = lake::view_run_prefix("orders", "by_country", run.0);
            lake.list(&prefix).await.unwrap()
        }
    };
    let full = run_ok(&plan, &state, &lake).await;
    assert_eq!(full.views[0].mode, Mode::Full);
    let base_file = files_of(full.run_id).await;
    assert_eq!(base_file.len(), 1);
    assert!(base_file[0].path.ends_with(PARTIALS_FILE), "{base_file:?}");
    let mut lo = base.len() as u64;
    for step in 0..24i64 {
        // Live events of the next two minutes, and two late ones into the base's minutes.
        let mut events: Vec<_> = (0..40)
            .map(|i| event(i + step, 240 + 2 * step + i % 2))
            .collect();
        events.push(event(step, step % 7));
        events.push(event(step + 1, 100 + step));
        let df = timed_frame(lo, &events);
        seal_frame(&state, &lake, lo, df.clone()).await;
        frames.push(df);
        lo += events.len() as u64;

        let r = run_ok(&plan, &state, &lake).await;
        assert_eq!(r.views[0].mode, Mode::Incremental);
        let publication = &r.views[0].publication;
        let files = files_of(r.run_id).await;
        let mut rows = 0;
        for f in &files {
            rows += plan
                .read_partials(0, &lake.get(&f.path).await.unwrap())
                .unwrap()
                .height() as u64;
        }
        assert_eq!(publication.rows, rows, "step {step}: rows of its files");
        // The base's file, many times larger than what a run adds, is kept as it was by every
        // run; what they add is merged into one small file beside it.
        assert_eq!(files.len(), 2, "step {step}: {files:?}");
        assert!(
            files
                .iter()
                .any(|f| f.path.ends_with(PARTIALS_FILE) && f.size == base_file[0].size),
            "step {step}: {files:?}"
        );
        if step == 0 {
            // The first run wrote the partials of its 42 events: 2 new minutes × 5 countries
            // and 2 late groups.
            let own = files
                .iter()
                .find(|f| {
                    f.path
                        .ends_with(&format!("partials-{}.parquet", r.run_id.0))
                })
                .expect("the run's own file");
            let own = plan
                .read_partials(0, &lake.get(&own.path).await.unwrap())
                .unwrap();
            assert_eq!(own.height(), 12, "{own}");
        }

        let served = plan
            .finish(
                0,
                load_partials(&plan, &lake, 0, publication).await.unwrap(),
            )
            .unwrap();
        let parts = scan::Parts(vec![(
            scan::Source::Frames(frames.clone()),
            crate::plan::LookupSet::none(),
        )]);
        let scratch = plan
            .finish(0, scan::view_partials(&plan, 0, &parts).unwrap())
            .unwrap();
        assert!(
            served.equals_missing(&scratch),
            "step {step}: served\n{served}\nfrom scratch\n{scratch}"
        );
    }
}

/// A scan read in chunks of segments — each chunk's partials merged as it ends, what bounds a
/// large run's memory — computes what one scan of every segment does, whatever the chunk size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_in_chunks_computes_what_one_scan_does() {
    let spec = format!(
        "{SPEC}  - name: per_minute\n    group_by: [country]\n    window: 1m\n    metrics:\n      n: count()\n      amounts: approx_count_distinct(amount)\n      median: approx_quantile(amount, 0.5)\n      sd: stddev(amount)\n"
    );
    let plan = plan(&spec);
    let (_dir, state, lake) = open().await;
    let countries = ["DE", "US", "FR"];
    let mut lo = 0;
    for seg in 0..7u64 {
        let rows: Vec<_> = (0..30 + seg as i64 * 11)
            .map(|i| {
                let at = T0 + ((i * 7_919 + seg as i64 * 104_729) % 600_000);
                (
                    at,
                    countries[(i % 3) as usize],
                    ((i * 31) % 53) as f64 / 4.0 - 1.0,
                )
            })
            .collect();
        seal_frame(&state, &lake, lo, timed_frame(lo, &rows)).await;
        lo += rows.len() as u64;
    }
    let (_, segments) = sealed(&state, "orders").await.unwrap();
    let lookups = crate::speed::lookups::Lookups::reader(plan.pipeline(), &lake);
    let views = [0, 1];
    let mut answers = Vec::new();
    for chunk in [u64::MAX, 1, 70, 150] {
        let mut seen = 0;
        let partials =
            scan::scan_partials(&plan, &lake, &lookups, (&segments, chunk), &views, |_| {
                seen += 1
            })
            .await
            .unwrap();
        assert_eq!(
            seen,
            segments.len(),
            "chunks of {chunk}: every segment read once"
        );
        let finished: Vec<DataFrame> = views
            .iter()
            .zip(partials)
            .map(|(&v, p)| plan.finish(v, p).unwrap())
            .collect();
        answers.push((chunk, finished));
    }
    let (_, one) = &answers[0];
    assert!(one[1].height() > 20, "{}", one[1]);
    for (chunk, finished) in &answers[1..] {
        for (a, b) in one.iter().zip(finished) {
            // stddev's states are floating-point sums: merged in another grouping, they may
            // differ in the last bits; every other column is exact.
            let (a, b) = (
                a.drop("sd").unwrap_or(a.clone()),
                b.drop("sd").unwrap_or(b.clone()),
            );
            assert!(
                a.equals_missing(&b),
                "chunks of {chunk}:\n{b}\none scan:\n{a}"
            );
        }
        let (sa, sb) = (
            one[1].column("sd").unwrap(),
            finished[1].column("sd").unwrap(),
        );
        for (x, y) in sa.f64().unwrap().iter().zip(sb.f64().unwrap().iter()) {
            let (x, y) = (x.unwrap_or(0.0), y.unwrap_or(0.0));
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "sd {x} vs {y}");
        }
    }
}
