//! The state database, driven through its public API. Every behaviour runs twice: on a SQLite
//! file in a temp directory, and on a fresh PostgreSQL database created on the server named by
//! `LAMBDA_TEST_POSTGRES` (skipped when unset, failed when unset under CI; a set but unreachable
//! server fails the test).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use lambda_ctl::state::{
    Cause, Fence, GroupEnd, Install, Lease, LedgerEntry, LedgerTotals, NewPublication, Node,
    Outcome, PublicationId, RunId, RunKind, RunState, Segment, State, StateError,
};
use sqlx::Connection;

/// Generates `mod NAME { fn sqlite(); fn postgres(); }` running `async fn NAME(url)`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::on_sqlite(super::$name).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::on_postgres(super::$name).await
            }
        }
    )*};
}

on_both_backends!(
    sealing_records_the_segment_and_advances_the_checkpoint,
    sealing_refuses_gaps_overlaps_and_empty_ranges,
    concurrent_seals_of_one_range_record_it_once,
    state_survives_reopening,
    publishing_switches_the_current_version,
    concurrent_first_publishes_let_one_win,
    runs_follow_their_lifecycle,
    concurrent_starts_of_one_run_let_one_worker_win,
    batch_groups_end_once_and_are_counted_per_run,
    task_attempts_number_their_retries,
    schedule_slots_are_claimed_once,
    compaction_swaps_segments_in_one_transaction,
    retention_drops_segments_and_old_view_versions,
    operator_figures_count_runs_and_time_attempts,
    the_ledger_records_with_its_segment_and_each_publication_row_once,
    installs_say_what_a_view_served_when,
    leases_go_to_one_node_at_a_time,
    lease_renewal_reports_the_leases_a_node_lost,
    seals_fenced_by_a_lost_lease_record_nothing,
    leaving_releases_a_nodes_leases,
);

async fn on_sqlite<F, Fut>(behaviour: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    // A directory that does not exist yet: opening creates it.
    let url = format!("sqlite://{}", dir.path().join("nested/state.db").display());
    behaviour(url).await;
}

async fn on_postgres<F, Fut>(behaviour: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(server) = crate::support::service("LAMBDA_TEST_POSTGRES") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    // Run the behaviour as a task so the database is dropped even when it panics.
    let outcome = tokio::spawn(behaviour(db.url.clone())).await;
    db.drop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A database of its own on the test server, for one test (the lambda test uses it too).
pub struct TempDatabase {
    server: String,
    name: String,
    pub url: String,
}

impl TempDatabase {
    pub async fn create(server: &str) -> TempDatabase {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let name = format!(
            "lambda_test_{}_{}_{}",
            std::process::id(),
            nanos,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = sqlx::PgConnection::connect(server)
            .await
            .unwrap_or_else(|e| {
                panic!("LAMBDA_TEST_POSTGRES={server} is set but the server is unreachable: {e}")
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let mut url = url::Url::parse(server).expect("LAMBDA_TEST_POSTGRES is a URL");
        url.set_path(&name);
        TempDatabase {
            server: server.to_string(),
            name,
            url: url.to_string(),
        }
    }

    pub async fn drop(self) {
        let mut conn = sqlx::PgConnection::connect(&self.server)
            .await
            .expect("reconnect to drop the test database");
        // FORCE: pools of the behaviour may still be closing their connections.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .expect("drop test database");
    }
}

async fn open(url: &str) -> State {
    State::open(url).await.expect("open state")
}

fn segment(partition: u32, lo: u64, hi: u64) -> Segment {
    Segment {
        pipeline: "clicks".into(),
        partition,
        lo,
        hi,
        path: lambda_ctl::lake::archive_path("clicks", partition, lo, hi),
        rows: hi.saturating_sub(lo),
        bytes: 1000 + lo,
        dead_letters: 0,
        min_event_ms: Some(1_700_000_000_000 + lo as i64),
        max_event_ms: Some(1_700_000_000_000 + hi as i64),
        lookups: None,
        crc32: None,
    }
}

fn ts(secs: i64, nanos: u32) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, nanos).single().expect("valid time")
}

async fn sealing_records_the_segment_and_advances_the_checkpoint(url: String) {
    let state = open(&url).await;
    assert_eq!(state.checkpoint("clicks", 0).await.unwrap(), None);
    assert!(state.segments("clicks").await.unwrap().is_empty());
    assert_eq!(state.dead_letters("clicks").await.unwrap(), 0);

    let first = Segment {
        dead_letters: 2,
        ..segment(0, 0, 10)
    };
    // A partition's first segment may start anywhere (a Kafka topic after retention).
    let other_partition = segment(1, 100, 150);
    let second = Segment {
        dead_letters: 5,
        ..segment(0, 10, 25)
    };
    for s in [&first, &other_partition, &second] {
        state.seal_segment(s).await.expect("seal");
    }
    state
        .seal_segment(&Segment {
            pipeline: "orders".into(),
            ..segment(0, 0, 3)
        })
        .await
        .expect("another pipeline has its own checkpoints");

    assert_eq!(
        state.segments("clicks").await.unwrap(),
        vec![first, second, other_partition],
        "by partition, then position"
    );
    assert_eq!(state.checkpoint("clicks", 0).await.unwrap(), Some(25));
    assert_eq!(state.checkpoint("clicks", 1).await.unwrap(), Some(150));
    assert_eq!(state.checkpoint("clicks", 2).await.unwrap(), None);
    assert_eq!(
        state.checkpoints("clicks").await.unwrap(),
        BTreeMap::from([(0, 25), (1, 150)])
    );
    assert_eq!(state.dead_letters("clicks").await.unwrap(), 7);
    assert_eq!(state.dead_letters("orders").await.unwrap(), 0);
}

async fn sealing_refuses_gaps_overlaps_and_empty_ranges(url: String) {
    let state = open(&url).await;
    state.seal_segment(&segment(0, 0, 10)).await.expect("seal");

    for (lo, hi) in [(0, 10), (5, 20), (11, 20)] {
        let attempt = Segment {
            dead_letters: 3,
            ..segment(0, lo, hi)
        };
        match state.seal_segment(&attempt).await {
            Err(StateError::NotContiguous {
                lo: l, checkpoint, ..
            }) => {
                assert_eq!((l, checkpoint), (lo, 10));
            }
            other => panic!("[{lo}, {hi}) after [0, 10): {other:?}"),
        }
    }
    for (lo, hi) in [(10, 10), (12, 11)] {
        let err = state
            .seal_segment(&segment(0, lo, hi))
            .await
            .expect_err("empty or reversed");
        assert!(matches!(err, StateError::EmptySegment { .. }), "{err}");
    }
    // A segment missing rows (or holding extra ones) would archive a range with events lost
    // or doubled, and let the log below it go.
    for rows in [0, 9, 11] {
        let err = state
            .seal_segment(&Segment {
                rows,
                ..segment(0, 10, 20)
            })
            .await
            .expect_err("rows != hi - lo");
        assert!(
            matches!(err, StateError::IncompleteSegment { rows: r, .. } if r == rows),
            "{err}"
        );
    }
    let err = state
        .seal_segment(&segment(0, 10, u64::MAX))
        .await
        .expect_err("beyond BIGINT");
    assert!(matches!(err, StateError::OutOfRange { .. }), "{err}");

    // Nothing of the refused seals was recorded.
    assert_eq!(
        state.segments("clicks").await.unwrap(),
        vec![segment(0, 0, 10)]
    );
    assert_eq!(state.checkpoint("clicks", 0).await.unwrap(), Some(10));
    assert_eq!(state.dead_letters("clicks").await.unwrap(), 0);
    state
        .seal_segment(&segment(0, 10, 20))
        .await
        .expect("the next range still seals");
}

async fn concurrent_seals_of_one_range_record_it_once(url: String) {
    let state = open(&url).await;
    let mut tasks = Vec::new();
    for i in 0..8u32 {
        let state = state.clone();
        // Half race for the same range of partition 0; the others seal their own partition.
        let s = if i % 2 == 0 {
            segment(0, 0, 10)
        } else {
            segment(i, 0, 10)
        };
        tasks.push(tokio::spawn(
            async move { (i, state.seal_segment(&s).await) },
        ));
    }
    let mut sealed_partition_0 = 0;
    for task in tasks {
        let (i, result) = task.await.expect("task");
        match (i % 2, result) {
            (0, Ok(())) => sealed_partition_0 += 1,
            (0, Err(StateError::NotContiguous { checkpoint: 10, .. })) => {}
            (_, Ok(())) => {}
            (_, other) => panic!("seal {i}: {other:?}"),
        }
    }
    assert_eq!(sealed_partition_0, 1);
    assert_eq!(state.segments("clicks").await.unwrap().len(), 5);
}

async fn state_survives_reopening(url: String) {
    let state = open(&url).await;
    state.seal_segment(&segment(0, 0, 10)).await.expect("seal");
    let run = state
        .create_run(RunKind::Batch, "clicks", None)
        .await
        .expect("run");
    state.close().await;

    // Opening again runs the (already applied) migrations and keeps the data.
    let state = open(&url).await;
    assert_eq!(state.checkpoint("clicks", 0).await.unwrap(), Some(10));
    assert_eq!(state.run(run.id).await.unwrap(), Some(run.clone()));
    let next = state
        .create_run(RunKind::Batch, "clicks", None)
        .await
        .expect("run");
    assert!(next.id > run.id);
}

async fn publishing_switches_the_current_version(url: String) {
    let state = open(&url).await;
    let run = state
        .create_run(RunKind::Batch, "clicks", None)
        .await
        .unwrap();
    assert_eq!(
        state
            .current_publication("clicks", "page_views")
            .await
            .unwrap(),
        None
    );
    let new = |cutoff: &[(u32, u64)], replaces| NewPublication {
        pipeline: "clicks".into(),
        view: "page_views".into(),
        run_id: run.id,
        logic_hash: "3f2a".into(),
        cutoff: cutoff.iter().copied().collect(),
        rows: 42,
        replaces,
        horizon_ms: None,
    };

    let first = state.publish(&new(&[(0, 10)], None)).await.expect("first");
    assert_eq!(
        state
            .current_publication("clicks", "page_views")
            .await
            .unwrap(),
        Some(first.clone())
    );
    let second = state
        .publish(&new(&[(0, 25), (1, 150)], Some(first.id)))
        .await
        .expect("replaces the first");
    let current = state
        .current_publication("clicks", "page_views")
        .await
        .unwrap()
        .expect("current");
    assert_eq!(current, second);
    assert_eq!(current.cutoff, BTreeMap::from([(0, 25), (1, 150)]));
    assert_eq!(current.run_id, run.id);

    // A run that started from the first version, or from none, lost the race.
    for stale in [Some(first.id), None, Some(PublicationId(second.id.0 + 100))] {
        match state.publish(&new(&[(0, 99)], stale)).await {
            Err(StateError::PublicationRaced {
                expected, found, ..
            }) => {
                assert_eq!(found, second.id.to_string());
                assert_eq!(
                    expected,
                    stale.map_or("none".to_string(), |p| p.to_string())
                );
            }
            other => panic!("stale publish from {stale:?}: {other:?}"),
        }
    }
    assert_eq!(
        state
            .current_publication("clicks", "page_views")
            .await
            .unwrap(),
        Some(second.clone())
    );

    // A retention horizon is kept with its version.
    let trimmed = state
        .publish(&NewPublication {
            horizon_ms: Some(1_700_000_000_000),
            ..new(&[(0, 25), (1, 150)], Some(second.id))
        })
        .await
        .expect("a retention version");
    let current = state
        .current_publication("clicks", "page_views")
        .await
        .unwrap()
        .expect("current");
    assert_eq!(current, trimmed);
    assert_eq!(current.horizon_ms, Some(1_700_000_000_000));
    assert_eq!(second.horizon_ms, None);

    // Views are independent; a publication must come from a run.
    state
        .publish(&NewPublication {
            view: "sessions".into(),
            ..new(&[], None)
        })
        .await
        .expect("another view");
    let err = state
        .publish(&NewPublication {
            run_id: RunId(run.id.0 + 1000),
            view: "other".into(),
            ..new(&[], None)
        })
        .await
        .expect_err("unknown run");
    assert!(matches!(err, StateError::Db { .. }), "{err}");
    assert_eq!(
        state.current_publication("clicks", "other").await.unwrap(),
        None
    );
}

async fn concurrent_first_publishes_let_one_win(url: String) {
    let state = open(&url).await;
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            let run = state
                .create_run(RunKind::Batch, "clicks", None)
                .await
                .expect("run");
            state
                .publish(&NewPublication {
                    pipeline: "clicks".into(),
                    view: "page_views".into(),
                    run_id: run.id,
                    logic_hash: "h".into(),
                    cutoff: BTreeMap::from([(0, i)]),
                    rows: i,
                    replaces: None,
                    horizon_ms: None,
                })
                .await
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.expect("task") {
            Ok(p) => winners.push(p),
            Err(StateError::PublicationRaced { .. }) => {}
            Err(e) => panic!("publish: {e}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(
        state
            .current_publication("clicks", "page_views")
            .await
            .unwrap(),
        Some(winners.remove(0))
    );
}

async fn runs_follow_their_lifecycle(url: String) {
    let state = open(&url).await;
    let slot = ts(1_790_000_000, 0);
    let run = state
        .create_run(RunKind::Workflow, "nightly", Some(slot))
        .await
        .unwrap();
    assert_eq!(
        (run.kind, run.name.as_str(), run.state),
        (RunKind::Workflow, "nightly", RunState::Queued)
    );
    assert_eq!(run.scheduled_at, Some(slot));
    assert_eq!((run.started_at, run.finished_at), (None, None));

    let started = state.start_run(run.id).await.expect("start");
    assert_eq!(started.state, RunState::Running);
    assert!(started.started_at.is_some());
    state
        .append_run_log(run.id, "scanning 3 segments\n")
        .await
        .unwrap();
    state.append_run_log(run.id, "done\n").await.unwrap();
    let failed = state
        .finish_run(run.id, Outcome::Failed, Some("task recompute timed out"))
        .await
        .expect("finish");
    assert_eq!(failed.state, RunState::Failed);
    assert!(failed.state.is_finished());
    assert_eq!(failed.error.as_deref(), Some("task recompute timed out"));
    assert_eq!(failed.log, "scanning 3 segments\ndone\n");
    assert!(failed.finished_at >= failed.started_at);
    assert_eq!(state.run(run.id).await.unwrap(), Some(failed));

    for err in [
        state
            .start_run(run.id)
            .await
            .expect_err("start a finished run"),
        state
            .finish_run(run.id, Outcome::Succeeded, None)
            .await
            .expect_err("finish twice"),
    ] {
        assert!(
            matches!(
                err,
                StateError::WrongState {
                    state: RunState::Failed,
                    ..
                }
            ),
            "{err}"
        );
    }
    let missing = RunId(run.id.0 + 1000);
    assert_eq!(state.run(missing).await.unwrap(), None);
    for err in [
        state.start_run(missing).await.expect_err("unknown"),
        state
            .finish_run(missing, Outcome::Cancelled, None)
            .await
            .expect_err("unknown"),
        state
            .append_run_log(missing, "x")
            .await
            .expect_err("unknown"),
    ] {
        assert!(
            matches!(err, StateError::RunNotFound(id) if id == missing),
            "{err}"
        );
    }

    // A queued run can be cancelled without starting.
    let batch = state
        .create_run(RunKind::Batch, "clicks", None)
        .await
        .unwrap();
    let cancelled = state
        .finish_run(batch.id, Outcome::Cancelled, None)
        .await
        .unwrap();
    assert_eq!(
        (cancelled.state, cancelled.started_at),
        (RunState::Cancelled, None)
    );
    let third = state
        .create_run(RunKind::Workflow, "nightly", None)
        .await
        .unwrap();

    let ids = |runs: Vec<lambda_ctl::state::Run>| runs.iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(state.runs(Some("nightly"), 10).await.unwrap()),
        vec![third.id, run.id],
        "newest first"
    );
    assert_eq!(
        ids(state.runs(None, 2).await.unwrap()),
        vec![third.id, batch.id]
    );
}

async fn batch_groups_end_once_and_are_counted_per_run(url: String) {
    let state = open(&url).await;
    let run = state
        .create_run(RunKind::Batch, "clicks", None)
        .await
        .unwrap();
    let other = state
        .create_run(RunKind::Batch, "clicks", None)
        .await
        .unwrap();
    let end = |worker: &str, ms: u64, error: Option<&str>| GroupEnd {
        worker: worker.to_string(),
        took: Duration::from_millis(ms),
        error: error.map(str::to_string),
    };
    assert!(!state.batch_group_ended(run.id, 0).await.unwrap());
    // Taken, not ended: counted as started only; a second delivery's start changes nothing.
    state.start_batch_group(run.id, 0, "w0").await.unwrap();
    state.start_batch_group(run.id, 0, "w9").await.unwrap();
    assert!(!state.batch_group_ended(run.id, 0).await.unwrap());
    assert!(state.batch_groups(run.id).await.unwrap().is_empty());
    let progress = state.batch_group_progress(run.id).await.unwrap();
    assert_eq!((progress.started, progress.ended.len()), (1, 0));
    let first = end("w0", 5, None);
    assert_eq!(state.end_batch_group(other.id, 0, &first).await.unwrap(), 1);
    // Groups ending at once: each counts once, and the last to count sees the set complete
    // (two may: queueing the finish job twice is a no-op).
    let mut tasks = Vec::new();
    for g in 0..6u32 {
        let state = state.clone();
        let e = end(
            &format!("w{}", g % 2),
            100 + u64::from(g),
            (g == 4).then_some("segment missing"),
        );
        tasks.push(tokio::spawn(async move {
            state.end_batch_group(run.id, g, &e).await.unwrap()
        }));
    }
    let mut counts = Vec::new();
    for task in tasks {
        counts.push(task.await.unwrap());
    }
    counts.sort();
    assert_eq!(counts.last(), Some(&6), "{counts:?}");
    assert!(counts.iter().all(|c| (1..=6).contains(c)), "{counts:?}");
    // A second delivery of a group keeps the first outcome.
    let again = end("w9", 1, None);
    assert_eq!(state.end_batch_group(run.id, 4, &again).await.unwrap(), 6);
    assert!(state.batch_group_ended(run.id, 0).await.unwrap());
    let groups = state.batch_groups(run.id).await.unwrap();
    assert_eq!(groups.len(), 6);
    assert_eq!(groups[&4], end("w0", 104, Some("segment missing")));
    assert_eq!(groups[&5], end("w1", 105, None));
    assert!(
        groups
            .iter()
            .filter(|(g, _)| **g != 4)
            .all(|(_, e)| e.error.is_none())
    );
    assert_eq!(state.batch_groups(other.id).await.unwrap()[&0], first);
    let progress = state.batch_group_progress(run.id).await.unwrap();
    assert_eq!(progress.started, 6);
    assert_eq!(progress.ended, (0..6).collect());
}

async fn concurrent_starts_of_one_run_let_one_worker_win(url: String) {
    let state = open(&url).await;
    let run = state
        .create_run(RunKind::Batch, "clicks", None)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let state = state.clone();
        tasks.push(tokio::spawn(async move { state.start_run(run.id).await }));
    }
    let mut started = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => started += 1,
            Err(StateError::WrongState {
                state: RunState::Running,
                ..
            }) => {}
            Err(e) => panic!("start: {e}"),
        }
    }
    assert_eq!(started, 1);
}

async fn task_attempts_number_their_retries(url: String) {
    let state = open(&url).await;
    let run = state
        .create_run(RunKind::Workflow, "nightly", None)
        .await
        .unwrap();
    let first = state
        .create_task_attempt(run.id, "recompute", None)
        .await
        .expect("attempt");
    assert_eq!((first.attempt, first.state), (1, RunState::Queued));
    let running = state.start_task_attempt(first.id).await.expect("start");
    assert_eq!(running.state, RunState::Running);
    state
        .append_task_log(first.id, "out of memory\n")
        .await
        .unwrap();
    let failed = state
        .finish_task_attempt(first.id, Outcome::Failed, Some("exit status 137"))
        .await
        .expect("finish");
    assert_eq!(failed.error.as_deref(), Some("exit status 137"));
    assert_eq!(failed.log, "out of memory\n");

    let retry_at = ts(1_790_000_030, 123_456_000);
    let retry = state
        .create_task_attempt(run.id, "recompute", Some(retry_at))
        .await
        .expect("retry");
    assert_eq!(retry.attempt, 2);
    assert_eq!(retry.scheduled_at, Some(retry_at));
    let other = state
        .create_task_attempt(run.id, "compact", None)
        .await
        .expect("other task");
    assert_eq!(other.attempt, 1);
    let succeeded = state
        .finish_task_attempt(retry.id, Outcome::Succeeded, None)
        .await
        .expect("finish queued");
    assert_eq!(succeeded.state, RunState::Succeeded);

    let listed = state.task_attempts(run.id).await.unwrap();
    assert_eq!(listed, vec![failed, succeeded, other]);
    assert!(
        state
            .task_attempts(RunId(run.id.0 + 1000))
            .await
            .unwrap()
            .is_empty()
    );

    let err = state
        .finish_task_attempt(retry.id, Outcome::Failed, None)
        .await
        .expect_err("finish twice");
    assert!(
        matches!(
            err,
            StateError::WrongState {
                state: RunState::Succeeded,
                ..
            }
        ),
        "{err}"
    );
    let missing_run = RunId(run.id.0 + 1000);
    let err = state
        .create_task_attempt(missing_run, "recompute", None)
        .await
        .expect_err("unknown run");
    assert!(
        matches!(err, StateError::RunNotFound(id) if id == missing_run),
        "{err}"
    );
    let missing = lambda_ctl::state::AttemptId(retry.id.0 + 1000);
    for err in [
        state
            .start_task_attempt(missing)
            .await
            .expect_err("unknown"),
        state
            .append_task_log(missing, "x")
            .await
            .expect_err("unknown"),
    ] {
        assert!(
            matches!(err, StateError::AttemptNotFound(id) if id == missing),
            "{err}"
        );
    }
}

async fn schedule_slots_are_claimed_once(url: String) {
    let state = open(&url).await;
    assert_eq!(state.last_slot("nightly").await.unwrap(), None);
    // Sub-microsecond digits are dropped on both backends alike.
    let t1 = ts(1_790_000_000, 500_000_999);
    let t1_stored = ts(1_790_000_000, 500_000_000);
    let t2 = ts(1_790_086_400, 0);

    let run = state
        .claim_slot("nightly", None, t1)
        .await
        .unwrap()
        .expect("first slot");
    assert_eq!(
        (run.kind, run.name.as_str(), run.state, run.scheduled_at),
        (
            RunKind::Workflow,
            "nightly",
            RunState::Queued,
            Some(t1_stored)
        )
    );
    assert_eq!(state.last_slot("nightly").await.unwrap(), Some(t1_stored));

    // A second scheduler that saw no slot, or an older one, claims nothing.
    assert_eq!(state.claim_slot("nightly", None, t1).await.unwrap(), None);
    assert_eq!(
        state
            .claim_slot("nightly", Some(ts(1_700_000_000, 0)), t2)
            .await
            .unwrap(),
        None
    );
    let next = state
        .claim_slot("nightly", Some(t1), t2)
        .await
        .unwrap()
        .expect("next slot, from the value with its original precision");
    assert_eq!(next.scheduled_at, Some(t2));
    assert_eq!(state.last_slot("nightly").await.unwrap(), Some(t2));

    // Racing schedulers on the same slot create one run.
    let t3 = ts(1_790_172_800, 0);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            state.claim_slot("nightly", Some(t2), t3).await
        }));
    }
    let mut claimed = 0;
    for task in tasks {
        if task.await.expect("task").expect("claim").is_some() {
            claimed += 1;
        }
    }
    assert_eq!(claimed, 1);

    // A schedule seen for the first time starts from a baseline with nanoseconds (the wall
    // clock's): its first slot is claimed from the baseline as read back.
    let baseline = ts(1_790_000_000, 123_456_789);
    state.init_schedule("weekly", baseline).await.unwrap();
    let last = state.last_slot("weekly").await.unwrap();
    assert_eq!(last, Some(ts(1_790_000_000, 123_456_000)));
    let first = state
        .claim_slot("weekly", last, ts(1_790_003_600, 0))
        .await
        .unwrap();
    assert!(
        first.is_some(),
        "the first slot after the baseline is claimed"
    );

    let runs = state.runs(Some("nightly"), 100).await.unwrap();
    assert_eq!(
        runs.iter().map(|r| r.scheduled_at).collect::<Vec<_>>(),
        vec![Some(t3), Some(t2), Some(t1_stored)]
    );
    assert_eq!(state.last_slot("hourly").await.unwrap(), None);
}

async fn compaction_swaps_segments_in_one_transaction(url: String) {
    let state = open(&url).await;
    let old = [segment(0, 0, 10), segment(0, 10, 25), segment(0, 25, 40)];
    for s in &old {
        state.seal_segment(s).await.unwrap();
    }
    state.seal_segment(&segment(0, 40, 50)).await.unwrap();
    let merged = Segment {
        path: lambda_ctl::lake::archive_path("clicks", 0, 0, 40),
        rows: 40,
        bytes: 3100,
        min_event_ms: old[0].min_event_ms,
        max_event_ms: old[2].max_event_ms,
        lookups: None,
        crc32: Some(0xdead_beef),
        ..segment(0, 0, 40)
    };

    // A range that is not exactly the union of the old segments changes nothing.
    let wrong = Segment {
        hi: 39,
        ..merged.clone()
    };
    assert!(state.replace_segments(&old, &wrong).await.is_err());
    assert_eq!(state.segments("clicks").await.unwrap().len(), 4);

    state.replace_segments(&old, &merged).await.expect("swap");
    let now: Vec<(u64, u64)> = state
        .segments("clicks")
        .await
        .unwrap()
        .iter()
        .map(|s| (s.lo, s.hi))
        .collect();
    assert_eq!(now, vec![(0, 40), (40, 50)]);
    // The merged file's manifest row reads back as recorded, checksum included.
    assert_eq!(state.segments("clicks").await.unwrap()[0], merged);
    // Positions never move: the checkpoint stays where sealing left it.
    assert_eq!(state.checkpoint("clicks", 0).await.unwrap(), Some(50));

    // The same swap again (another compactor that read the old manifest) changes nothing.
    let raced = state.replace_segments(&old, &merged).await.unwrap_err();
    assert!(matches!(raced, StateError::ArchiveRaced { .. }), "{raced}");
    assert_eq!(state.segments("clicks").await.unwrap().len(), 2);

    // The old files are retired, not deleted: listed only once their grace period passed.
    let later = Utc::now() + chrono::Duration::seconds(5);
    let retired = state.retired_objects("clicks", later).await.unwrap();
    let mut paths: Vec<&str> = retired.iter().map(|r| r.path.as_str()).collect();
    paths.sort_unstable();
    let mut expected: Vec<&str> = old.iter().map(|s| s.path.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(paths, expected);
    assert!(retired.iter().all(|r| r.reason == "compacted"));
    let earlier = Utc::now() - chrono::Duration::seconds(60);
    assert!(
        state
            .retired_objects("clicks", earlier)
            .await
            .unwrap()
            .is_empty()
    );
    state.forget_retired(&old[0].path).await.unwrap();
    assert_eq!(
        state.retired_objects("clicks", later).await.unwrap().len(),
        2
    );
}

async fn retention_drops_segments_and_old_view_versions(url: String) {
    let state = open(&url).await;
    let segs = [segment(0, 0, 10), segment(0, 10, 20)];
    for s in &segs {
        state.seal_segment(s).await.unwrap();
    }
    state.drop_segments(&segs[..1]).await.unwrap();
    assert_eq!(
        state.segments("clicks").await.unwrap(),
        vec![segs[1].clone()]
    );
    // Dropping a segment already gone changes nothing, not even the others of the call.
    let err = state.drop_segments(&segs).await.unwrap_err();
    assert!(matches!(err, StateError::ArchiveRaced { .. }), "{err}");
    assert_eq!(state.segments("clicks").await.unwrap().len(), 1);
    let later = Utc::now() + chrono::Duration::seconds(5);
    let retired = state.retired_objects("clicks", later).await.unwrap();
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].reason, "retention");

    // Three versions of a view by three runs; retention keeps the current one.
    let mut previous = None;
    let mut runs = Vec::new();
    for i in 0..3u64 {
        let run = state
            .create_run(RunKind::Batch, "clicks", None)
            .await
            .unwrap();
        runs.push(run.id);
        let p = state
            .publish(&NewPublication {
                pipeline: "clicks".into(),
                view: "page_views".into(),
                run_id: run.id,
                logic_hash: "h".into(),
                cutoff: BTreeMap::from([(0, 10 * (i + 1))]),
                rows: i,
                replaces: previous,
                horizon_ms: None,
            })
            .await
            .unwrap();
        previous = Some(p.id);
    }
    let earlier = Utc::now() - chrono::Duration::seconds(60);
    assert!(
        state
            .drop_publications_before("clicks", "page_views", earlier)
            .await
            .unwrap()
            .is_empty()
    );
    let dropped = state
        .drop_publications_before("clicks", "page_views", later)
        .await
        .unwrap();
    assert_eq!(dropped, runs[..2].to_vec());
    let current = state
        .current_publication("clicks", "page_views")
        .await
        .unwrap()
        .expect("the current version stays");
    assert_eq!(current.run_id, runs[2]);
}

/// `status` and `/metrics` read runs by state and every workflow attempt with its times.
async fn operator_figures_count_runs_and_time_attempts(url: String) {
    let state = open(&url).await;
    assert!(state.run_counts().await.unwrap().is_empty());
    let a = state
        .create_run(RunKind::Workflow, "nightly", None)
        .await
        .unwrap();
    state
        .create_run(RunKind::Workflow, "nightly", None)
        .await
        .unwrap();
    state
        .create_run(RunKind::Batch, "clicks", None)
        .await
        .unwrap();
    state.start_run(a.id).await.unwrap();
    state
        .finish_run(a.id, Outcome::Failed, Some("boom"))
        .await
        .unwrap();
    let first = state
        .create_task_attempt(a.id, "recompute", None)
        .await
        .unwrap();
    state.start_task_attempt(first.id).await.unwrap();
    state
        .finish_task_attempt(first.id, Outcome::Failed, None)
        .await
        .unwrap();
    let retry = state
        .create_task_attempt(a.id, "recompute", None)
        .await
        .unwrap();

    let counts: Vec<(RunKind, String, RunState, u64)> = state
        .run_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.kind, c.name, c.state, c.count))
        .collect();
    assert_eq!(
        counts,
        vec![
            (RunKind::Batch, "clicks".into(), RunState::Queued, 1),
            (RunKind::Workflow, "nightly".into(), RunState::Failed, 1),
            (RunKind::Workflow, "nightly".into(), RunState::Queued, 1),
        ]
    );
    let figures = state.attempt_figures().await.unwrap();
    assert_eq!(figures.len(), 2);
    assert_eq!(
        (
            figures[0].workflow.as_str(),
            figures[0].task.as_str(),
            figures[0].attempt
        ),
        ("nightly", "recompute", 1)
    );
    assert_eq!(figures[0].state, RunState::Failed);
    let took = figures[0]
        .duration_seconds()
        .expect("a finished attempt has a duration");
    assert!((0.0..60.0).contains(&took), "{took}");
    assert_eq!(
        (figures[1].attempt, figures[1].state),
        (retry.attempt, RunState::Queued)
    );
    assert_eq!(figures[1].duration_seconds(), None);
}

fn entry(view: &str, cause: Cause, start: Option<i64>, late: u64, at: i64) -> LedgerEntry {
    let object = |v: serde_json::Value| v.as_object().unwrap().clone();
    LedgerEntry {
        pipeline: "clicks".into(),
        view: view.into(),
        cause,
        window_start_ms: start,
        window_end_ms: start.map(|s| s + 60_000),
        key: object(serde_json::json!({"page": "/a"})),
        late_events: late,
        max_lateness_ms: 1_000 * late as i64,
        metrics: object(
            serde_json::json!({"n": {"before": 1, "after": 1 + late, "delta": late as f64}}),
        ),
        recorded_at_ms: at,
    }
}

async fn the_ledger_records_with_its_segment_and_each_publication_row_once(url: String) {
    let state = open(&url).await;
    let late = |lo, hi| Cause::Late {
        partition: 0,
        lo,
        hi,
    };
    let first = [
        entry("by_page", late(0, 10), Some(0), 2, 1_000),
        entry("by_page", late(0, 10), Some(60_000), 1, 1_000),
    ];
    state
        .seal_segment_restating(&segment(0, 0, 10), &first)
        .await
        .unwrap();
    // A seal that is refused records none of its entries.
    let refused = [entry("by_page", late(5, 20), Some(0), 9, 1_500)];
    assert!(
        state
            .seal_segment_restating(&segment(0, 5, 20), &refused)
            .await
            .is_err()
    );
    let second = [entry("other", late(10, 20), Some(0), 3, 2_000)];
    state
        .seal_segment_restating(&segment(0, 10, 20), &second)
        .await
        .unwrap();
    // A publication's rows: recorded once however often (two servers switching to it).
    let publication = Cause::Publication {
        run_id: RunId(7),
        publication: PublicationId(3),
    };
    let rows = [
        entry("by_page", publication, Some(0), 0, 3_000),
        entry("by_page", publication, None, 0, 3_000),
    ];
    state.record_restated(&rows).await.unwrap();
    state.record_restated(&rows).await.unwrap();

    let all = state
        .ledger("clicks", "by_page", None, None, 100)
        .await
        .unwrap();
    let mut want = first.to_vec();
    want.extend(rows.iter().cloned());
    assert_eq!(all, want);
    assert_eq!(
        state
            .ledger("clicks", "by_page", Some(1_000), Some(3_000), 100)
            .await
            .unwrap(),
        first.to_vec(),
        "[from, to)"
    );
    assert_eq!(
        state
            .ledger("clicks", "by_page", None, None, 1)
            .await
            .unwrap(),
        first[..1].to_vec()
    );
    let totals = state.ledger_totals("clicks", None, None).await.unwrap();
    assert_eq!(
        totals,
        BTreeMap::from([
            (
                "by_page".to_string(),
                LedgerTotals {
                    late_events: 3,
                    restated_windows: 4,
                    max_lateness_ms: 2_000
                }
            ),
            (
                "other".to_string(),
                LedgerTotals {
                    late_events: 3,
                    restated_windows: 1,
                    max_lateness_ms: 3_000
                }
            ),
        ])
    );
    let since = state
        .ledger_totals("clicks", Some(2_000), None)
        .await
        .unwrap();
    assert_eq!(since["by_page"].restated_windows, 2);
    assert!(
        state
            .ledger_totals("orders", None, None)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A write that reads first (the ledger checks what a publication already recorded) waits
/// for another writer on SQLite instead of failing: a deferred transaction whose snapshot went
/// stale while it waited failed at once with "database is locked" (CI saw a promote lose
/// its restated rows this way while a seal committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_that_reads_first_waits_for_another_writer_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    let state = open(&format!("sqlite://{}", path.display())).await;
    let mut other = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let rows = [entry(
        "by_page",
        Cause::Publication {
            run_id: RunId(1),
            publication: PublicationId(1),
        },
        Some(0),
        0,
        1_000,
    )];
    let recording = {
        let state = state.clone();
        tokio::spawn(async move { state.record_restated(&rows).await })
    };
    // The recording waits for the lock; the other writer commits a change meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("CREATE TABLE another_writer (x INTEGER)")
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    recording
        .await
        .unwrap()
        .expect("the restated rows are recorded after the other writer commits");
    assert_eq!(
        state
            .ledger("clicks", "by_page", None, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn installs_say_what_a_view_served_when(url: String) {
    let state = open(&url).await;
    let run = state
        .create_run(RunKind::Batch, "clicks", None)
        .await
        .unwrap();
    let publication = state
        .publish(&NewPublication {
            pipeline: "clicks".into(),
            view: "by_page".into(),
            run_id: run.id,
            logic_hash: "h1".into(),
            cutoff: BTreeMap::from([(0, 40)]),
            rows: 5,
            replaces: None,
            horizon_ms: None,
        })
        .await
        .unwrap();
    let install = |view: &str, at_ns, publication| Install {
        pipeline: "clicks".into(),
        view: view.into(),
        at_ns,
        publication,
        logic_hash: "h1".into(),
    };
    let ms = 1_764_000_000_000_i64 * 1_000_000;
    let rows = [
        install("by_page", ms + 1, None),
        install("other", ms + 2, None),
        install("by_page", ms + 7, Some(publication.id)),
        install("by_page", ms + 3_000_000_001, None),
    ];
    state.record_served(&rows).await.unwrap();
    // Recorded again (a retry after a lost reply): nothing changes.
    state.record_served(&rows[2..3]).await.unwrap();

    assert_eq!(
        state.served_at("clicks", "by_page", ms).await.unwrap(),
        None
    );
    let (at, found) = state
        .served_at("clicks", "by_page", ms + 6)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((at, found), (rows[0].clone(), None));
    let (at, found) = state
        .served_at("clicks", "by_page", ms + 7)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(at, rows[2]);
    assert_eq!(found, Some(publication.clone()));
    // Installs of every view take places in their millisecond.
    assert_eq!(
        state.installs_between("clicks", ms, ms + 7).await.unwrap(),
        3
    );
    assert_eq!(
        state.installs_between("clicks", ms, ms + 2).await.unwrap(),
        2
    );
    // What GC keeps: versions served since an instant, the one current then included.
    let runs = |since| state.served_runs("clicks", "by_page", since);
    assert_eq!(runs(ms).await.unwrap(), [run.id.0]);
    assert_eq!(runs(ms + 10).await.unwrap(), [run.id.0]);
    assert_eq!(runs(ms + 3_000_000_002).await.unwrap(), Vec::<i64>::new());

    // Forgetting before an instant keeps each view's install current then.
    let forgotten = state
        .forget_served_before("clicks", ms + 1_000_000_000)
        .await
        .unwrap();
    assert_eq!(forgotten, 1, "the first by_page install");
    let (at, _) = state
        .served_at("clicks", "by_page", ms + 8)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(at, rows[2]);
    assert!(
        state
            .served_at("clicks", "other", ms + 8)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(runs(ms).await.unwrap(), [run.id.0]);
}

fn lease(pipeline: &str, partition: u32, node: Option<&str>, epoch: u64, expires_ms: i64) -> Lease {
    Lease {
        pipeline: pipeline.into(),
        partition,
        node: node.map(Into::into),
        epoch,
        expires_ms,
    }
}

async fn leases_go_to_one_node_at_a_time(url: String) {
    let state = open(&url).await;
    let p = "leased";
    assert!(state.leases(p).await.unwrap().is_empty());
    assert_eq!(
        state.acquire_lease(p, 0, "a", 1_000, 11_000).await.unwrap(),
        Some(1),
        "a partition never leased"
    );
    // Held unexpired: neither another node nor the holder itself (it renews instead) takes it.
    assert_eq!(
        state.acquire_lease(p, 0, "b", 5_000, 15_000).await.unwrap(),
        None
    );
    assert_eq!(
        state.acquire_lease(p, 0, "a", 5_000, 15_000).await.unwrap(),
        None
    );
    assert_eq!(
        state
            .acquire_lease(p, 0, "b", 11_000, 21_000)
            .await
            .unwrap(),
        None,
        "expired is strictly after its expiry"
    );
    assert_eq!(
        state.leases(p).await.unwrap(),
        [lease(p, 0, Some("a"), 1, 11_000)]
    );
    assert_eq!(
        state
            .acquire_lease(p, 0, "b", 11_001, 21_001)
            .await
            .unwrap(),
        Some(2),
        "expired: taken over with the next epoch"
    );
    assert_eq!(
        state
            .acquire_lease(p, 1, "a", 11_001, 21_001)
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        state.leases(p).await.unwrap(),
        [
            lease(p, 0, Some("b"), 2, 21_001),
            lease(p, 1, Some("a"), 1, 21_001)
        ]
    );
    assert!(state.leases("other").await.unwrap().is_empty());

    // Nodes racing for one free lease: exactly one gets it.
    let racers = (0..8).map(|i| {
        let state = state.clone();
        tokio::spawn(async move {
            state
                .acquire_lease("raced", 0, &format!("n{i}"), 1_000, 11_000)
                .await
                .unwrap()
        })
    });
    let mut won = Vec::new();
    for r in racers {
        won.extend(r.await.unwrap());
    }
    assert_eq!(won, [1]);
    // And again once it expired: one takes it, with epoch 2.
    let racers = (0..8).map(|i| {
        let state = state.clone();
        tokio::spawn(async move {
            state
                .acquire_lease("raced", 0, &format!("m{i}"), 20_000, 30_000)
                .await
                .unwrap()
        })
    });
    let mut won = Vec::new();
    for r in racers {
        won.extend(r.await.unwrap());
    }
    assert_eq!(won, [2]);
}

async fn lease_renewal_reports_the_leases_a_node_lost(url: String) {
    let state = open(&url).await;
    let p = "renewed";
    for partition in 0..3 {
        assert_eq!(
            state
                .acquire_lease(p, partition, "a", 0, 10_000)
                .await
                .unwrap(),
            Some(1)
        );
    }
    // b takes partition 1 over after a missed its renewal; partition 2 expired unnoticed.
    assert_eq!(
        state
            .acquire_lease(p, 1, "b", 10_001, 20_000)
            .await
            .unwrap(),
        Some(2)
    );
    let held = [
        (p.to_string(), 0, 1),
        (p.to_string(), 1, 1),
        (p.to_string(), 2, 1),
    ];
    assert_eq!(
        state.renew_leases("a", &held, 30_000).await.unwrap(),
        [(p.to_string(), 1)]
    );
    assert!(
        state
            .renew_leases("a", &[], 30_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        state.leases(p).await.unwrap(),
        [
            lease(p, 0, Some("a"), 1, 30_000),
            lease(p, 1, Some("b"), 2, 20_000),
            lease(p, 2, Some("a"), 1, 30_000),
        ],
        "renewing an expired lease nobody took keeps it"
    );
    // A renewal naming an old epoch renews nothing.
    assert_eq!(
        state
            .renew_leases("b", &[(p.to_string(), 1, 1)], 40_000)
            .await
            .unwrap(),
        [(p.to_string(), 1)]
    );

    // Released: free at once, with its epoch kept; released again or by another, nothing.
    assert!(state.release_lease(p, 0, "a", 1).await.unwrap());
    assert!(!state.release_lease(p, 0, "a", 1).await.unwrap());
    assert!(!state.release_lease(p, 1, "a", 1).await.unwrap());
    assert!(!state.release_lease(p, 1, "b", 1).await.unwrap());
    assert_eq!(state.leases(p).await.unwrap()[0], lease(p, 0, None, 1, 0));
    assert_eq!(
        state.renew_leases("a", &held[..1], 40_000).await.unwrap(),
        [(p.to_string(), 0)],
        "a released lease is lost"
    );
    assert_eq!(
        state
            .acquire_lease(p, 0, "b", 12_000, 22_000)
            .await
            .unwrap(),
        Some(2)
    );
}

async fn seals_fenced_by_a_lost_lease_record_nothing(url: String) {
    let state = open(&url).await;
    let p = "fenced";
    let seg = |lo, hi| Segment {
        pipeline: p.into(),
        path: lambda_ctl::lake::archive_path(p, 0, lo, hi),
        ..segment(0, lo, hi)
    };
    let fence = |node: &str, epoch| Fence {
        node: node.into(),
        epoch,
    };
    assert!(state.source_offsets(p, 0).await.unwrap().is_empty());
    let err = state
        .seal_segment_fenced(&seg(0, 10), &[], Some(&fence("a", 1)), &BTreeMap::new())
        .await
        .expect_err("a partition never leased");
    assert!(matches!(err, StateError::Fenced { .. }), "{err}");
    assert_eq!(state.checkpoint(p, 0).await.unwrap(), None);

    assert_eq!(
        state.acquire_lease(p, 0, "a", 0, 10_000).await.unwrap(),
        Some(1)
    );
    state
        .seal_segment_fenced(
            &seg(0, 10),
            &[],
            Some(&fence("a", 1)),
            &BTreeMap::from([(0, 100), (1, 50)]),
        )
        .await
        .expect("sealed by the holder");
    assert_eq!(
        state.source_offsets(p, 0).await.unwrap(),
        BTreeMap::from([(0, 100), (1, 50)])
    );

    // a pauses past its lease's expiry; b takes the partition over.
    assert_eq!(
        state
            .acquire_lease(p, 0, "b", 10_001, 20_000)
            .await
            .unwrap(),
        Some(2)
    );
    let restated = [LedgerEntry {
        pipeline: p.into(),
        ..entry(
            "by_page",
            Cause::Late {
                partition: 0,
                lo: 10,
                hi: 20,
            },
            Some(0),
            1,
            1_000,
        )
    }];
    let err = state
        .seal_segment_fenced(
            &Segment {
                dead_letters: 3,
                ..seg(10, 20)
            },
            &restated,
            Some(&fence("a", 1)),
            &BTreeMap::from([(0, 300), (2, 7)]),
        )
        .await
        .expect_err("the old holder is fenced off");
    match &err {
        StateError::Fenced {
            pipeline,
            partition,
            node,
            epoch,
        } => assert_eq!(
            (pipeline.as_str(), *partition, node.as_str(), *epoch),
            (p, 0, "a", 1)
        ),
        other => panic!("expected Fenced, got {other}"),
    }
    assert!(
        err.to_string().contains("no longer leased to node a"),
        "{err}"
    );
    // Nothing of the refused seal was recorded.
    assert_eq!(state.checkpoint(p, 0).await.unwrap(), Some(10));
    assert_eq!(state.segments(p).await.unwrap(), [seg(0, 10)]);
    assert_eq!(state.dead_letters(p).await.unwrap(), 0);
    assert!(
        state
            .ledger(p, "by_page", None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        state.source_offsets(p, 0).await.unwrap(),
        BTreeMap::from([(0, 100), (1, 50)])
    );
    // Nor does the old holder's lease come back by it.
    assert_eq!(
        state.leases(p).await.unwrap(),
        [lease(p, 0, Some("b"), 2, 20_000)]
    );

    // The new holder seals on from the checkpoint; an offset never moves backwards.
    state
        .seal_segment_fenced(
            &seg(10, 20),
            &[],
            Some(&fence("b", 2)),
            &BTreeMap::from([(0, 200), (1, 40)]),
        )
        .await
        .expect("sealed by the new holder");
    assert_eq!(state.checkpoint(p, 0).await.unwrap(), Some(20));
    assert_eq!(
        state.source_offsets(p, 0).await.unwrap(),
        BTreeMap::from([(0, 200), (1, 50)])
    );
    assert!(state.source_offsets(p, 1).await.unwrap().is_empty());
    // Unfenced seals (one process, no leases) are unchanged.
    state.seal_segment(&seg(20, 30)).await.unwrap();
    assert_eq!(state.checkpoint(p, 0).await.unwrap(), Some(30));
}

async fn leaving_releases_a_nodes_leases(url: String) {
    let state = open(&url).await;
    let p = "left";
    assert!(state.nodes().await.unwrap().is_empty());
    state.heartbeat("b", "10.0.0.2:7000", 1_100).await.unwrap();
    state.heartbeat("a", "10.0.0.1:7000", 1_000).await.unwrap();
    state.heartbeat("a", "10.0.0.1:7001", 2_000).await.unwrap();
    let node = |name: &str, listen: &str, started_ms, heartbeat_ms| Node {
        name: name.into(),
        listen: listen.into(),
        started_ms,
        heartbeat_ms,
    };
    assert_eq!(
        state.nodes().await.unwrap(),
        [
            node("a", "10.0.0.1:7001", 1_000, 2_000),
            node("b", "10.0.0.2:7000", 1_100, 1_100),
        ]
    );

    for partition in 0..2 {
        assert_eq!(
            state
                .acquire_lease(p, partition, "a", 2_000, 12_000)
                .await
                .unwrap(),
            Some(1)
        );
    }
    assert_eq!(
        state.acquire_lease(p, 2, "b", 2_000, 12_000).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        state
            .acquire_lease("other", 0, "a", 2_000, 12_000)
            .await
            .unwrap(),
        Some(1)
    );
    state.leave("a").await.unwrap();
    assert_eq!(
        state.nodes().await.unwrap(),
        [node("b", "10.0.0.2:7000", 1_100, 1_100)]
    );
    assert_eq!(
        state.leases(p).await.unwrap(),
        [
            lease(p, 0, None, 1, 0),
            lease(p, 1, None, 1, 0),
            lease(p, 2, Some("b"), 1, 12_000),
        ]
    );
    assert_eq!(
        state.leases("other").await.unwrap(),
        [lease("other", 0, None, 1, 0)]
    );
    // Released leases are taken at once, not when they would have expired.
    assert_eq!(
        state.acquire_lease(p, 0, "b", 2_500, 12_500).await.unwrap(),
        Some(2)
    );
    // Leaving twice, or a node never seen, changes nothing.
    state.leave("a").await.unwrap();
    state.leave("z").await.unwrap();
    assert_eq!(state.nodes().await.unwrap().len(), 1);

    // A `serve` without --node takes back what no node holds: b's unexpired leases are left
    // as they are; partition 1 is marked taken back, its epoch kept, free to take.
    let back = state.take_back_leases(p, 3_000).await.unwrap();
    assert_eq!(back.len(), 3, "each lease not taken back before: {back:?}");
    assert_eq!(
        state.leases(p).await.unwrap(),
        [
            lease(p, 0, Some("b"), 2, 12_500),
            lease(p, 1, None, 1, -1),
            lease(p, 2, Some("b"), 1, 12_000),
        ]
    );
    assert!(state.release_lease(p, 0, "b", 2).await.unwrap());
    let back = state.take_back_leases(p, 3_000).await.unwrap();
    assert_eq!(back.len(), 2, "partitions 0 and 2 since: {back:?}");
    let back = state.take_back_leases(p, 3_000).await.unwrap();
    assert_eq!(back.len(), 1, "partition 2, still held: {back:?}");
    assert_eq!(
        state.acquire_lease(p, 1, "c", 3_000, 13_000).await.unwrap(),
        Some(2),
        "the epoch goes on"
    );
}
