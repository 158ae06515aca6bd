//! Workflows end to end: schedules across DST changes and outages, DAGs with retries,
//! timeouts and upstream failures, `max_active_runs`, backfill — in process with a manual clock
//! (no sleeping through schedules), on SQLite and again on PostgreSQL state when
//! `LAMBDA_TEST_POSTGRES` is set ([`on_both`]) — and three `lambda-ctl` processes sharing one
//! PostgreSQL state (skipped when unset).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::TempDatabase;
use chrono::{DateTime, TimeZone, Utc};
use futures::future::BoxFuture;
use lambda_ctl::orchestration::{
    Clock, ManualClock, Options, Orchestrator, TaskContext, TaskRunner,
};
use lambda_ctl::state::{Run, RunId, RunState, State};
use tokio_util::sync::CancellationToken;

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

tokio::task_local! {
    /// The state DB of the projects a test makes (default: a SQLite file in the project).
    static STATE: String;
}

/// Runs `test` on SQLite state, then on a fresh PostgreSQL database when
/// `LAMBDA_TEST_POSTGRES` is set.
async fn on_both<F, Fut>(test: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    test().await;
    let Some(server) = crate::support::service("LAMBDA_TEST_POSTGRES") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    STATE.scope(db.url.clone(), test()).await;
    db.drop().await;
}

/// A project in a temp directory with one workflow, its state in a SQLite file there (or the
/// database [`on_both`] says).
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(workflow_yaml: &str) -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("workflows")).unwrap();
        let state = STATE
            .try_with(String::clone)
            .unwrap_or_else(|_| "sqlite://.lambda/state.db".into());
        std::fs::write(
            dir.path().join("lambda.yaml"),
            format!("state: {state}\nlake: memory://\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("workflows/wf.yaml"), workflow_yaml).unwrap();
        Project { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn load(&self) -> lambda_ctl::spec::Project {
        lambda_ctl::spec::load(self.path()).unwrap_or_else(|e| panic!("invalid test project:\n{e}"))
    }
}

/// Stands in for the batch layer: logs what it is asked to do; `batch` of a pipeline named
/// `broken` fails.
struct FakeLayers;

impl TaskRunner for FakeLayers {
    fn batch<'a>(
        &'a self,
        ctx: &'a TaskContext,
        pipeline: &'a str,
        _: Option<&'a [String]>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            ctx.log.line(format!("recomputing {pipeline}"));
            anyhow::ensure!(pipeline != "broken", "pipeline {pipeline} is broken");
            Ok(())
        })
    }

    fn compact<'a>(&'a self, _: &'a TaskContext, _: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn retention<'a>(
        &'a self,
        _: &'a TaskContext,
        _: &'a str,
        _: Duration,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn verify<'a>(
        &'a self,
        _: &'a TaskContext,
        _: &'a str,
        _: lambda_ctl::spec::Sample,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// The harness's manual clock, which also knows who sleeps on it: every `sleep_until` asked
/// (the scheduler ends each pass with one) and, per sleeper still waiting, its deadline and the
/// latest time it saw. Tests wait on those — "the scheduler finished a pass", "the worker waits
/// for the retry's back-off" — instead of sleeping for longer than they hope those take.
#[derive(Clone)]
struct TestClock {
    manual: ManualClock,
    moved: Arc<tokio::sync::watch::Sender<u64>>,
    sleepers: Arc<parking_lot::Mutex<Sleepers>>,
}

#[derive(Default)]
struct Sleepers {
    /// How many `sleep_until` calls were made.
    asked: usize,
    next_id: u64,
    /// Per waiting sleeper: (its deadline, the latest clock time it saw).
    waiting: std::collections::BTreeMap<u64, (DateTime<Utc>, DateTime<Utc>)>,
}

/// Takes a finished or dropped sleeper off the list.
struct Waiting(Arc<parking_lot::Mutex<Sleepers>>, u64);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.lock().waiting.remove(&self.1);
    }
}

impl TestClock {
    fn new(manual: ManualClock) -> TestClock {
        TestClock {
            manual,
            moved: Arc::new(tokio::sync::watch::Sender::new(0)),
            sleepers: Arc::default(),
        }
    }

    fn set(&self, at: DateTime<Utc>) {
        self.manual.set(at);
        self.moved.send_modify(|n| *n += 1);
    }

    fn advance(&self, d: Duration) {
        self.set(self.now() + chrono::Duration::from_std(d).unwrap());
    }

    fn asked(&self) -> usize {
        self.sleepers.lock().asked
    }

    /// Waits (real time) until `sleep_until` was asked `n` times in all.
    async fn until_asked(&self, n: usize) {
        crate::support::eventually(
            &format!("{n} sleeps asked of the clock"),
            Duration::from_secs(20),
            || async move { (self.asked() >= n).then_some(()) },
        )
        .await
    }

    /// Waits until the scheduler finished its first pass (it recorded its baseline).
    async fn scheduler_started(&self) {
        self.until_asked(1).await
    }

    /// Waits until the scheduler finished a whole pass begun after this call: two more ends of
    /// a pass (the first may end one that began before).
    async fn scheduler_settled(&self) {
        self.until_asked(self.asked() + 2).await
    }

    /// Waits until a sleeper waits for `until` and has seen the clock's current time: what
    /// sleeps until then has looked at the clock since its last move and still waits.
    async fn sleeping_until(&self, until: DateTime<Utc>) {
        let now = self.now();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let waiting = {
                let s = self.sleepers.lock();
                if s.waiting
                    .values()
                    .any(|&(u, seen)| u == until && seen >= now)
                {
                    return;
                }
                format!("{} asked, waiting (until, saw): {:?}", s.asked, s.waiting)
            };
            // What the sleepers were doing says which side of the race was late.
            assert!(
                Instant::now() < deadline,
                "not within 20s: a sleeper waiting for {until} that saw {now}; {waiting}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        self.manual.now()
    }

    fn is_wall_clock(&self) -> bool {
        false
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let clock = self.clone();
        let mut moved = self.moved.subscribe();
        let id = {
            let mut s = self.sleepers.lock();
            s.asked += 1;
            s.next_id += 1;
            let id = s.next_id;
            s.waiting.insert(id, (at, self.now()));
            id
        };
        let waiting = Waiting(self.sleepers.clone(), id);
        Box::pin(async move {
            let _waiting = waiting;
            loop {
                moved.mark_unchanged();
                let now = clock.now();
                if now >= at {
                    return;
                }
                if let Some(w) = clock.sleepers.lock().waiting.get_mut(&id) {
                    w.1 = now;
                }
                if moved.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}

/// An orchestrator of `project` on a manual clock, running per `options` until dropped.
struct Harness {
    orchestrator: Orchestrator,
    state: State,
    clock: TestClock,
    shutdown: CancellationToken,
    running: Option<lambda_ctl::orchestration::Running>,
}

impl Harness {
    async fn start(project: &Project, clock: ManualClock, options: Options) -> Harness {
        let clock = TestClock::new(clock);
        let spec = project.load();
        let state = State::open(&spec.settings.state)
            .await
            .expect("state opens");
        let orchestrator = Orchestrator::open(Arc::new(spec), state.clone(), Arc::new(FakeLayers))
            .await
            .expect("orchestrator opens")
            .with_clock(Arc::new(clock.clone()));
        let shutdown = CancellationToken::new();
        let running = Some(orchestrator.start(&options, shutdown.clone()));
        Harness {
            orchestrator,
            state,
            clock,
            shutdown,
            running,
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(r) = self.running.take() {
            r.join().await;
        }
        self.state.close().await;
    }

    /// All runs of the workflow, oldest first.
    async fn runs(&self) -> Vec<Run> {
        let mut runs = self.state.runs(Some("wf"), 100_000).await.expect("runs");
        runs.reverse();
        runs
    }

    async fn slots(&self) -> Vec<DateTime<Utc>> {
        self.runs()
            .await
            .into_iter()
            .map(|r| r.scheduled_at.expect("a scheduled run has a slot"))
            .collect()
    }

    /// Waits (real time) until the workflow has `n` runs.
    async fn until_runs(&self, n: usize) -> Vec<Run> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let runs = self.runs().await;
            if runs.len() >= n {
                return runs;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} runs, have {}: {:?}",
                runs.len(),
                runs.iter().map(|r| r.scheduled_at).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (real time) until run `id` finished.
    async fn finished(&self, id: RunId) -> Run {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let run = self
                .state
                .run(id)
                .await
                .expect("read run")
                .expect("run exists");
            if run.state.is_finished() {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} did not finish: {run:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Moves the clock to `at`, waits for `expect` runs and one more whole scheduler pass
    /// (in which nothing more may appear), and returns the slots.
    async fn slots_at(&self, at: DateTime<Utc>, expect: usize) -> Vec<DateTime<Utc>> {
        self.clock.set(at);
        self.until_runs(expect).await;
        self.clock.scheduler_settled().await;
        self.slots().await
    }
}

fn scheduler_only() -> Options {
    Options {
        scheduler: true,
        concurrency: 0,
    }
}

fn workers_only() -> Options {
    Options {
        scheduler: false,
        concurrency: 8,
    }
}

async fn dst_case(
    tz: &str,
    expr: &str,
    start: DateTime<Utc>,
    steps: &[(DateTime<Utc>, &[DateTime<Utc>])],
) {
    let project = Project::new(&format!(
        "name: wf\nschedule: \"{expr}\"\ntimezone: {tz}\ncatchup: true\nmax_active_runs: 1\ntasks:\n  - name: t\n    command: [\"true\"]\n"
    ));
    let h = Harness::start(&project, ManualClock::new(start), scheduler_only()).await;
    // Let the scheduler record its baseline at `start`.
    h.clock.scheduler_started().await;
    for (at, expected) in steps {
        let got = h.slots_at(*at, expected.len()).await;
        assert_eq!(&got, expected, "{tz} `{expr}` at clock {at}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn berlin_spring_forward_runs_the_missing_slot_once_at_the_change() {
    on_both(|| async {
        // 2026-03-29 02:00 CET → 03:00 CEST (01:00 UTC): 02:30 does not exist that day.
        let change = utc(2026, 3, 29, 1, 0);
        dst_case(
            "Europe/Berlin",
            "30 2 * * *",
            utc(2026, 3, 28, 12, 0),
            &[
                (change - chrono::Duration::seconds(1), &[]),
                (change, &[change]),
                (utc(2026, 3, 29, 23, 0), &[change]),
                (utc(2026, 3, 30, 0, 30), &[change, utc(2026, 3, 30, 0, 30)]),
            ],
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn berlin_fall_back_runs_the_repeated_slot_once() {
    on_both(|| async {
        // 2026-10-25 03:00 CEST → 02:00 CET: 02:30 is at 00:30 UTC and again at 01:30 UTC.
        let first = utc(2026, 10, 25, 0, 30);
        dst_case(
            "Europe/Berlin",
            "30 2 * * *",
            utc(2026, 10, 24, 12, 0),
            &[
                (first, &[first]),
                (utc(2026, 10, 25, 1, 30), &[first]),
                (utc(2026, 10, 25, 12, 0), &[first]),
                (utc(2026, 10, 26, 1, 30), &[first, utc(2026, 10, 26, 1, 30)]),
            ],
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_york_spring_forward_runs_the_missing_slot_once_at_the_change() {
    on_both(|| async {
        // 2026-03-08 02:00 EST → 03:00 EDT (07:00 UTC).
        let change = utc(2026, 3, 8, 7, 0);
        dst_case(
            "America/New_York",
            "30 2 * * *",
            utc(2026, 3, 7, 12, 0),
            &[
                (change - chrono::Duration::seconds(1), &[]),
                (change, &[change]),
                (utc(2026, 3, 9, 6, 30), &[change, utc(2026, 3, 9, 6, 30)]),
            ],
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_york_fall_back_runs_the_repeated_slot_once() {
    on_both(|| async {
        // 2026-11-01 02:00 EDT → 01:00 EST: 01:30 is at 05:30 UTC and again at 06:30 UTC.
        let first = utc(2026, 11, 1, 5, 30);
        dst_case(
            "America/New_York",
            "30 1 * * *",
            utc(2026, 10, 31, 12, 0),
            &[
                (first, &[first]),
                (utc(2026, 11, 1, 6, 30), &[first]),
                (utc(2026, 11, 2, 6, 30), &[first, utc(2026, 11, 2, 6, 30)]),
            ],
        )
        .await;
    })
    .await;
}

async fn outage(catchup: bool) -> Vec<DateTime<Utc>> {
    let project = Project::new(&format!(
        "name: wf\nschedule: \"0 * * * *\"\ntimezone: UTC\ncatchup: {catchup}\nmax_active_runs: 1\ntasks:\n  - name: t\n    command: [\"true\"]\n"
    ));
    let t0 = utc(2026, 5, 1, 0, 30);
    let clock = ManualClock::new(t0);
    let h = Harness::start(&project, clock.clone(), scheduler_only()).await;
    h.clock.scheduler_started().await;
    assert_eq!(
        h.slots_at(utc(2026, 5, 1, 1, 0), 1).await,
        vec![utc(2026, 5, 1, 1, 0)]
    );
    h.stop().await;

    // Three days and a quarter hour down; then a new process on the same state.
    clock.set(utc(2026, 5, 4, 1, 15));
    let h = Harness::start(&project, clock, scheduler_only()).await;
    let expected = if catchup { 1 + 72 } else { 2 };
    h.until_runs(expected).await;
    h.clock.scheduler_settled().await;
    let slots = h.slots().await;
    h.stop().await;
    slots
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catchup_runs_every_missed_slot_in_order_after_an_outage() {
    on_both(|| async {
        let slots = outage(true).await;
        let expected: Vec<DateTime<Utc>> = (0..73)
            .map(|h| utc(2026, 5, 1, 1, 0) + chrono::Duration::hours(h))
            .collect();
        assert_eq!(slots, expected);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_catchup_only_the_latest_missed_slot_runs_after_an_outage() {
    on_both(|| async {
        let slots = outage(false).await;
        assert_eq!(slots, vec![utc(2026, 5, 1, 1, 0), utc(2026, 5, 4, 1, 0)]);
    })
    .await;
}

/// The largest number of runs whose [started, finished] intervals overlap.
fn max_overlap(runs: &[Run]) -> usize {
    let mut edges: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for r in runs {
        edges.push((r.started_at.expect("started"), 1));
        edges.push((r.finished_at.expect("finished"), -1));
    }
    // At equal times, an end before a start: touching intervals do not overlap.
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_active_runs_bounds_concurrent_runs() {
    on_both(|| async {
        let project = Project::new(
            "name: wf\nmax_active_runs: 2\ntasks:\n  - name: a\n    command: [\"sleep\", \"0.4\"]\n  - name: b\n    command: [\"sleep\", \"0.2\"]\n    needs: [a]\n",
        );
        let h = Harness::start(
            &project,
            ManualClock::new(utc(2026, 1, 1, 0, 0)),
            workers_only(),
        )
        .await;
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(h.orchestrator.trigger("wf").await.expect("trigger"));
        }
        let mut runs = Vec::new();
        for id in &ids {
            let run = h.finished(*id).await;
            assert_eq!(run.state, RunState::Succeeded, "{run:?}");
            runs.push(run);
        }
        assert_eq!(max_overlap(&runs), 2, "{runs:#?}");
        // Admitted oldest first: each time slots free, the oldest waiting runs start. Two runs
        // admitted together are started by two workers, which record their start in either
        // order, so the order is checked by the set of the first 2 and the first 4 to start.
        let mut by_start = runs.clone();
        by_start.sort_by_key(|r| r.started_at);
        let started: Vec<RunId> = by_start.iter().map(|r| r.id).collect();
        for k in [2, 4, 5] {
            let mut first = started[..k].to_vec();
            first.sort();
            assert_eq!(first, ids[..k], "the first {k} runs to start: {runs:#?}");
        }
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_makes_one_run_per_slot_within_max_active_runs() {
    on_both(|| async {
        let project = Project::new(
            "name: wf\nschedule: \"0 6 * * *\"\ntimezone: Europe/Berlin\nmax_active_runs: 1\ntasks:\n  - name: t\n    command: [\"sh\", \"-c\", \"echo slot=$LAMBDA_SCHEDULED_AT; sleep 0.1\"]\n",
        );
        let h = Harness::start(
            &project,
            ManualClock::new(utc(2026, 6, 1, 0, 0)),
            workers_only(),
        )
        .await;
        let ids = h
            .orchestrator
            .backfill("wf", utc(2026, 3, 27, 0, 0), utc(2026, 3, 31, 4, 0))
            .await
            .expect("backfill");
        assert_eq!(ids.len(), 5);
        let mut runs = Vec::new();
        for id in &ids {
            runs.push(h.finished(*id).await);
        }
        // 06:00 in Berlin: CET (05:00 UTC) before the change on the 29th, CEST (04:00 UTC) after.
        let slots: Vec<DateTime<Utc>> = runs.iter().map(|r| r.scheduled_at.unwrap()).collect();
        assert_eq!(
            slots,
            vec![
                utc(2026, 3, 27, 5, 0),
                utc(2026, 3, 28, 5, 0),
                utc(2026, 3, 29, 4, 0),
                utc(2026, 3, 30, 4, 0),
                utc(2026, 3, 31, 4, 0),
            ]
        );
        assert!(
            runs.iter().all(|r| r.state == RunState::Succeeded),
            "{runs:#?}"
        );
        assert_eq!(max_overlap(&runs), 1);
        let logs = h.orchestrator.logs(ids[2]).await.unwrap().unwrap();
        assert!(
            logs.attempts[0].log.contains("slot=2026-03-29T04:00:00Z"),
            "{}",
            logs.attempts[0].log
        );

        // Backfilling a wider range again only adds the slots without a run.
        let again = h
            .orchestrator
            .backfill("wf", utc(2026, 3, 26, 0, 0), utc(2026, 3, 31, 4, 0))
            .await
            .expect("second backfill");
        assert_eq!(again.len(), 1, "only 2026-03-26 had no run");
        let run = h.finished(again[0]).await;
        assert_eq!(run.scheduled_at, Some(utc(2026, 3, 26, 5, 0)));

        let err = h
            .orchestrator
            .backfill("wf", utc(2026, 3, 31, 0, 0), utc(2026, 3, 1, 0, 0))
            .await
            .expect_err("reversed range");
        assert!(err.to_string().contains("is after"), "{err}");
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_attempt_is_retried_after_its_backoff_then_succeeds() {
    on_both(|| async {
        let project = Project::new(
            "name: wf\ntasks:\n  - name: flaky\n    command: [\"sh\", \"-c\", \"if [ -e tried ]; then echo second try; else touch tried; echo first try; exit 3; fi\"]\n    retries: 2\n    retry_delay: 10m\n  - name: after\n    command: [\"true\"]\n    needs: [flaky]\n",
        );
        let t0 = utc(2026, 1, 1, 0, 0);
        let h = Harness::start(&project, ManualClock::new(t0), workers_only()).await;
        let id = h.orchestrator.trigger("wf").await.expect("trigger");

        // The first attempt fails; the retry waits for its back-off on the (manual) clock.
        let deadline = Instant::now() + Duration::from_secs(20);
        let retry = loop {
            let attempts = h.state.task_attempts(id).await.unwrap();
            if let Some(a) = attempts.iter().find(|a| a.attempt == 2) {
                break a.clone();
            }
            assert!(Instant::now() < deadline, "no retry queued: {attempts:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let first = &h.state.task_attempts(id).await.unwrap()[0];
        assert_eq!(first.state, RunState::Failed);
        assert!(
            first.error.as_deref().unwrap().contains("status 3"),
            "{first:?}"
        );
        assert_eq!(retry.scheduled_at, Some(t0 + chrono::Duration::minutes(10)));
        // A worker holds the retry, waiting on the clock for its back-off.
        h.clock
            .sleeping_until(t0 + chrono::Duration::minutes(10))
            .await;
        assert_eq!(
            h.state.task_attempts(id).await.unwrap()[1].state,
            RunState::Queued
        );

        h.clock.advance(Duration::from_secs(11 * 60));
        let run = h.finished(id).await;
        assert_eq!(run.state, RunState::Succeeded, "{run:?}");
        let status = h.orchestrator.run_status(id).await.unwrap().unwrap();
        let flaky = &status.tasks[0];
        assert_eq!(
            (flaky.state, flaky.attempts),
            (Some(RunState::Succeeded), 2)
        );
        let logs = h.orchestrator.logs(id).await.unwrap().unwrap();
        assert!(logs.attempts[0].log.contains("first try"));
        assert!(logs.attempts[1].log.contains("second try"));
        assert!(logs.run.log.contains("attempt 2 of 3"), "{}", logs.run.log);
        h.stop().await;
    })
    .await;
}

/// Whether process `pid` is gone (or a zombie nobody reaped: it runs no code any more).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_kills_the_command_and_everything_it_started() {
    on_both(|| async {
        let project = Project::new(
            "name: wf\ntasks:\n  - name: slow\n    command: [\"sh\", \"-c\", \"sleep 300 & echo $! > child.pid; echo $$ > shell.pid; wait\"]\n    timeout: 1h\n  - name: after\n    command: [\"true\"]\n    needs: [slow]\n",
        );
        let t0 = utc(2026, 1, 1, 0, 0);
        let h = Harness::start(&project, ManualClock::new(t0), workers_only()).await;
        let id = h.orchestrator.trigger("wf").await.expect("trigger");
        let read_pid = |name: &str| -> Option<u32> {
            std::fs::read_to_string(project.path().join(name))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let (shell, child) = loop {
            if let (Some(s), Some(c)) = (read_pid("shell.pid"), read_pid("child.pid")) {
                break (s, c);
            }
            assert!(Instant::now() < deadline, "the command did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!dead(shell) && !dead(child));
        h.clock.advance(Duration::from_secs(59 * 60));
        // The timeout saw 00:59 and waits on for 01:00.
        h.clock.sleeping_until(t0 + chrono::Duration::hours(1)).await;
        assert!(!dead(child), "killed before its timeout");
        h.clock.advance(Duration::from_secs(2 * 60));
        let run = h.finished(id).await;
        assert_eq!(run.state, RunState::Failed);
        let status = h.orchestrator.run_status(id).await.unwrap().unwrap();
        assert_eq!(status.tasks[0].state, Some(RunState::Failed));
        assert!(
            status.tasks[0]
                .error
                .as_deref()
                .unwrap()
                .contains("timed out after 1h"),
            "{status:?}"
        );
        assert_eq!(status.tasks[1].state, Some(RunState::UpstreamFailed));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(dead(shell) && dead(child)) {
            assert!(
                Instant::now() < deadline,
                "the process tree survived its timeout"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_task_fails_its_dependants_as_upstream_failed() {
    on_both(|| async {
        let project = Project::new(
            "name: wf\ntasks:\n  - name: extract\n    command: [\"sh\", \"-c\", \"echo boom >&2; exit 1\"]\n  - name: transform\n    command: [\"true\"]\n    needs: [extract]\n  - name: load\n    command: [\"true\"]\n    needs: [transform]\n  - name: side\n    command: [\"sh\", \"-c\", \"echo run $LAMBDA_RUN_ID of $LAMBDA_WORKFLOW\"]\n  - name: report\n    command: [\"true\"]\n    needs: [side, load]\n",
        );
        let h = Harness::start(
            &project,
            ManualClock::new(utc(2026, 1, 1, 0, 0)),
            workers_only(),
        )
        .await;
        let id = h.orchestrator.trigger("wf").await.expect("trigger");
        let run = h.finished(id).await;
        assert_eq!(run.state, RunState::Failed);
        assert!(
            run.error
                .as_deref()
                .unwrap()
                .contains("task `extract` failed"),
            "{run:?}"
        );
        let status = h.orchestrator.run_status(id).await.unwrap().unwrap();
        let states: Vec<(&str, Option<RunState>)> = status
            .tasks
            .iter()
            .map(|t| (t.name.as_str(), t.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("extract", Some(RunState::Failed)),
                ("transform", Some(RunState::UpstreamFailed)),
                ("load", Some(RunState::UpstreamFailed)),
                ("side", Some(RunState::Succeeded)),
                ("report", Some(RunState::UpstreamFailed)),
            ]
        );
        assert_eq!(
            status.tasks[1].error.as_deref(),
            Some("upstream task `extract` failed")
        );
        let logs = h.orchestrator.logs(id).await.unwrap().unwrap();
        let extract = logs.attempts.iter().find(|a| a.task == "extract").unwrap();
        assert!(extract.log.contains("boom"), "{}", extract.log);
        let side = logs.attempts.iter().find(|a| a.task == "side").unwrap();
        assert!(
            side.log.contains(&format!("run {id} of wf")),
            "{}",
            side.log
        );
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn layer_tasks_go_through_the_task_runner() {
    on_both(|| async {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("workflows")).unwrap();
        std::fs::create_dir_all(root.join("pipelines")).unwrap();
        std::fs::write(
            root.join("lambda.yaml"),
            "state: sqlite://.lambda/state.db\nlake: memory://\n",
        )
        .unwrap();
        std::fs::copy(
            crate::support::repo().join("pipelines/clicks.yaml"),
            root.join("pipelines/clicks.yaml"),
        )
        .unwrap();
        std::fs::copy(
            crate::support::repo().join("workflows/nightly.yaml"),
            root.join("workflows/nightly.yaml"),
        )
        .unwrap();
        let spec = lambda_ctl::spec::load(root).expect("valid");
        let state = State::open(&spec.settings.state).await.unwrap();
        let orchestrator = Orchestrator::open(Arc::new(spec), state.clone(), Arc::new(FakeLayers))
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let running = orchestrator.start(&workers_only(), shutdown.clone());
        let id = orchestrator.trigger("nightly").await.unwrap();
        let status = orchestrator
            .wait(id, |_| {}, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(status.run.state, RunState::Succeeded, "{status:?}");
        let logs = orchestrator.logs(id).await.unwrap().unwrap();
        assert!(logs.attempts[0].log.contains("recomputing clicks"));
        shutdown.cancel();
        running.join().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Three processes on PostgreSQL.

/// A `lambda-ctl` child process whose stderr lines are collected; SIGKILLed on drop.
pub struct Process {
    child: std::process::Child,
    stderr: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl Process {
    pub fn start(project: &Path, args: &[&str]) -> Process {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
            .args(args)
            .arg("--project")
            .arg(project)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start lambda-ctl");
        let stderr = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().push(line);
            }
        });
        Process { child, stderr }
    }

    /// Sends `signal` (e.g. STOP, CONT) to the process.
    pub fn signal(&self, signal: rustix::process::Signal) {
        if let Ok(pid) = i32::try_from(self.child.id())
            && let Some(pid) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().clone()
    }

    pub fn logged(&self, text: &str) -> bool {
        self.stderr.lock().iter().any(|l| l.contains(text))
    }

    pub fn wait_for(&mut self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.logged(text) {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "lambda-ctl exited ({status}):\n{}",
                    self.stderr.lock().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `{text}` in the log:\n{}",
                self.stderr.lock().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id())
            && let Some(pid) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill9();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

const ACTIVE: &str = "this process is now the active scheduler";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_on_postgres_run_every_slot_once_and_hand_over_scheduling() {
    let Some(server) = crate::support::service("LAMBDA_TEST_POSTGRES") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let root: PathBuf = dir.path().to_path_buf();
    std::fs::create_dir_all(root.join("workflows")).unwrap();
    std::fs::write(
        root.join("lambda.yaml"),
        format!("state: {}\nlake: memory://\n", db.url),
    )
    .unwrap();
    // Every 2 seconds; each attempt appends one line, so a doubly executed attempt shows.
    std::fs::write(
        root.join("workflows/wf.yaml"),
        "name: wf\nschedule: \"*/2 * * * * *\"\ntimezone: UTC\ncatchup: true\nmax_active_runs: 16\ntasks:\n  - name: stamp\n    command: [\"sh\", \"-c\", \"echo \\\"$LAMBDA_RUN_ID $LAMBDA_SCHEDULED_AT $$\\\" >> stamps.txt\"]\n",
    )
    .unwrap();

    // Two `serve` processes (scheduler + workers + HTTP API) and one `worker`.
    const SERVE: &[&str] = &["serve", "--listen", "127.0.0.1:0"];
    let mut a = Process::start(&root, SERVE);
    a.wait_for(ACTIVE, Duration::from_secs(60));
    let mut b = Process::start(&root, SERVE);
    let mut c = Process::start(&root, &["worker"]);
    b.wait_for("serving", Duration::from_secs(60));
    c.wait_for("worker started", Duration::from_secs(60));

    // The scheduled slots so far, oldest first.
    let state = State::open(&db.url).await.unwrap();
    let slots_after = |n: usize, after: DateTime<Utc>| {
        let state = state.clone();
        async move {
            let what = format!("{n} runs, the last one for a slot after {after}");
            crate::support::eventually(&what, Duration::from_secs(90), || {
                let state = state.clone();
                async move {
                    let runs = state.runs(Some("wf"), 100_000).await.unwrap();
                    let last = runs.first()?.scheduled_at?;
                    (runs.len() >= n && last > after).then_some(())
                }
            })
            .await
        }
    };
    // Ten slots scheduled by `a`; then `b` takes over, and schedules ten more.
    slots_after(10, Utc::now()).await;
    assert!(!b.logged(ACTIVE), "two active schedulers");
    let killed_at = Utc::now();
    let kill = Instant::now();
    a.kill9();
    b.wait_for(ACTIVE, Duration::from_secs(10));
    let handover = kill.elapsed();
    slots_after(20, killed_at + chrono::Duration::seconds(20)).await;
    b.terminate();
    c.terminate();

    let mut runs = state.runs(Some("wf"), 100_000).await.unwrap();
    runs.reverse();
    let slots: Vec<DateTime<Utc>> = runs.iter().map(|r| r.scheduled_at.unwrap()).collect();
    assert!(slots.len() >= 20, "too few runs: {}", slots.len());
    // Every slot from the first to the last exactly once, across the takeover.
    for pair in slots.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::Duration::seconds(2),
            "slots {slots:?}"
        );
    }
    assert!(
        slots[0] < killed_at && *slots.last().unwrap() > killed_at + chrono::Duration::seconds(10)
    );
    // No slot waited long for its run, even around the takeover (a run is created when its
    // slot falls due, or caught up right after the takeover).
    let late: Vec<&Run> = runs
        .iter()
        .filter(|r| r.created_at - r.scheduled_at.unwrap() > chrono::Duration::seconds(8))
        .collect();
    assert!(late.is_empty(), "runs created late: {late:#?}");

    // No attempt executed twice: one line per (run, attempt) that ran.
    let stamps = std::fs::read_to_string(root.join("stamps.txt")).unwrap_or_default();
    let mut seen = BTreeSet::new();
    for line in stamps.lines() {
        let run = line.split_whitespace().next().unwrap().to_string();
        assert!(
            seen.insert(run.clone()),
            "run {run} executed twice:\n{stamps}"
        );
    }
    let mut attempts_run = 0;
    for r in &runs {
        let attempts = state.task_attempts(r.id).await.unwrap();
        assert!(attempts.len() <= 1, "run {} retried: {attempts:#?}", r.id);
        attempts_run += attempts
            .iter()
            .filter(|a| a.state == RunState::Succeeded)
            .count();
    }
    assert!(attempts_run <= seen.len());
    // Almost every run finished (one in flight on the killed process may be lost; runs of the
    // last seconds may still be waiting when the processes stopped).
    let succeeded = runs
        .iter()
        .filter(|r| r.state == RunState::Succeeded)
        .count();
    assert!(
        succeeded + 5 >= runs.len(),
        "{succeeded} of {} runs succeeded",
        runs.len()
    );
    eprintln!(
        "{} slots, {} succeeded, scheduling handed over {:?} after the kill",
        runs.len(),
        succeeded,
        handover
    );
    state.close().await;
    db.drop().await;
}

#[test]
fn the_cli_runs_a_workflow_and_shows_its_history_and_logs() {
    use crate::support::{lambda_ctl, stderr, stdout};
    let project = Project::new(
        "name: wf\ntasks:\n  - name: greet\n    command: [\"sh\", \"-c\", \"echo hello from $LAMBDA_WORKFLOW\"]\n  - name: check\n    command: [\"sh\", \"-c\", \"test -e ok || { echo missing ok >&2; exit 4; }\"]\n    needs: [greet]\n",
    );
    let dir = project.path().to_str().unwrap();

    let failed = lambda_ctl(&["run", "wf", "--wait", "--project", dir]);
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    // stdout carries only the run id; progress goes to stderr.
    assert_eq!(stdout(&failed), "1\n");
    assert!(
        stderr(&failed).contains("task check: failed"),
        "{}",
        stderr(&failed)
    );
    assert!(
        stderr(&failed).contains("run 1 failed: task `check` failed"),
        "{}",
        stderr(&failed)
    );

    std::fs::write(project.path().join("ok"), "").unwrap();
    let ok = lambda_ctl(&["run", "wf", "--wait", "--project", dir]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stderr(&ok).contains("run 2: succeeded"), "{}", stderr(&ok));

    let runs = lambda_ctl(&["runs", "wf", "--project", dir]);
    assert!(runs.status.success(), "{}", stderr(&runs));
    let table = stdout(&runs);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("ID  NAME  STATE"), "{table}");
    assert!(
        rows[1].starts_with("2   wf    succeeded  manual"),
        "{table}"
    );
    assert!(
        rows[2].starts_with("1   wf    failed     manual"),
        "{table}"
    );

    let logs = lambda_ctl(&["logs", "1", "--project", dir]);
    assert!(logs.status.success(), "{}", stderr(&logs));
    let text = stdout(&logs);
    assert!(text.contains("hello from wf"), "{text}");
    assert!(text.contains("missing ok"), "{text}");
    assert!(text.contains("== check attempt 1: failed"), "{text}");

    let missing = lambda_ctl(&["logs", "7", "--project", dir]);
    assert_eq!(missing.status.code(), Some(1));
    let unscheduled = lambda_ctl(&[
        "backfill",
        "wf",
        "--from",
        "-2d",
        "--to",
        "now",
        "--project",
        dir,
    ]);
    assert_eq!(unscheduled.status.code(), Some(1));
    assert!(
        stderr(&unscheduled).contains("has no schedule"),
        "{}",
        stderr(&unscheduled)
    );
    let unknown = lambda_ctl(&["run", "fw", "--project", dir]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("did you mean `wf`"),
        "{}",
        stderr(&unknown)
    );
}

#[test]
fn an_attempt_whose_worker_died_is_failed_as_lost_and_retried_elsewhere() {
    use crate::support::{lambda_ctl, stderr, stdout};
    let project = Project::new(
        "name: wf\ntasks:\n  - name: long\n    command: [\"sh\", \"-c\", \"if [ -e started ]; then echo second attempt; else echo $$ > started; exec sleep 300; fi\"]\n    retries: 1\n    retry_delay: 1s\n",
    );
    let dir = project.path();
    let triggered = lambda_ctl(&["run", "wf", "--project", dir.to_str().unwrap()]);
    assert!(triggered.status.success(), "{}", stderr(&triggered));
    assert_eq!(stdout(&triggered).trim(), "1");

    let mut first = Process::start(dir, &["worker"]);
    let started = dir.join("started");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the first attempt did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The worker dies mid-attempt; its command (own process group) is left running.
    first.kill9();
    let orphan: u32 = std::fs::read_to_string(&started)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let mut second = Process::start(dir, &["worker", "--schedule"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let spec = project.load();
    let run = rt.block_on(async {
        let state = State::open(&spec.settings.state).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        let run = loop {
            let run = state.run(RunId(1)).await.unwrap().unwrap();
            if run.state.is_finished() {
                break run;
            }
            assert!(
                Instant::now() < deadline,
                "the run did not recover: {run:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let attempts = state.task_attempts(RunId(1)).await.unwrap();
        state.close().await;
        (run, attempts)
    });
    second.terminate();
    if let Some(pid) = i32::try_from(orphan)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    let (run, attempts) = run;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}\n{attempts:#?}");
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(attempts[0].state, RunState::Failed);
    assert!(
        attempts[0].error.as_deref().unwrap().starts_with("lost:"),
        "{attempts:#?}"
    );
    assert!(attempts[1].log.contains("second attempt"), "{attempts:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_task_recomputes_the_pipeline_with_the_batch_layer() {
    use lambda_ctl::lake::Lake;
    use lambda_ctl::orchestration::layers::Layers;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("workflows")).unwrap();
    std::fs::create_dir_all(root.join("pipelines")).unwrap();
    std::fs::write(
        root.join("lambda.yaml"),
        "state: sqlite://.lambda/state.db\nlake: memory://\n",
    )
    .unwrap();
    std::fs::copy(
        crate::support::repo().join("pipelines/clicks.yaml"),
        root.join("pipelines/clicks.yaml"),
    )
    .unwrap();
    std::fs::write(
        root.join("workflows/wf.yaml"),
        "name: wf\ntasks:\n  - name: recompute\n    batch: clicks\n  - name: compact\n    compact: clicks\n    needs: [recompute]\n",
    )
    .unwrap();
    let spec = Arc::new(lambda_ctl::spec::load(root).expect("valid"));
    let state = State::open(&spec.settings.state).await.unwrap();
    let lake = Lake::open(&spec.settings.lake, &spec.settings.lake_options).unwrap();
    let layers = Arc::new(Layers::new(spec.clone(), state.clone(), lake));
    let orchestrator = Orchestrator::open(spec, state.clone(), layers)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = orchestrator.start(&workers_only(), shutdown.clone());
    let id = orchestrator.trigger("wf").await.unwrap();
    let status = orchestrator
        .wait(id, |_| {}, &CancellationToken::new())
        .await
        .unwrap();
    shutdown.cancel();
    running.join().await;
    assert_eq!(
        status.tasks[0].state,
        Some(RunState::Succeeded),
        "{status:?}"
    );
    // The batch layer recorded its own run (kind batch) for the pipeline.
    let batch_runs = state.runs(Some("clicks"), 10).await.unwrap();
    assert_eq!(batch_runs.len(), 1);
    assert_eq!(batch_runs[0].state, RunState::Succeeded);
    let logs = orchestrator.logs(id).await.unwrap().unwrap();
    assert!(
        logs.attempts[0]
            .log
            .contains(&format!("batch run {} of clicks", batch_runs[0].id)),
        "{}",
        logs.attempts[0].log
    );
    // Nothing sealed yet: compaction has nothing to merge, and says so.
    assert_eq!(status.run.state, RunState::Succeeded, "{status:?}");
    assert_eq!(status.tasks[1].state, Some(RunState::Succeeded));
    assert!(
        logs.attempts[1]
            .log
            .contains("compacted clicks: 0 segment(s)"),
        "{}",
        logs.attempts[1].log
    );
    state.close().await;
}
