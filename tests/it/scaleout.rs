//! Batch scale-out (DESIGN.md §4) through the real binary: `orders` and its twin `mirror`
//! receive the same events; `mirror` is recomputed in one process, `orders` split into group
//! jobs computed by 3 `lambda-ctl worker` processes (and the run's own process). Both serve
//! the same answer, equal to the oracle — also when a worker is SIGKILLed while it holds a
//! group (on PostgreSQL and an object store), whose job the queue then delivers to another
//! worker. On PostgreSQL state and the S3
//! server when `LAMBDA_TEST_POSTGRES` / `LAMBDA_TEST_S3` are set (SQLite and a local lake
//! otherwise). `LAMBDA_SCALEOUT_EVENTS`, `LAMBDA_SCALEOUT_SEGMENT_ROWS` and
//! `LAMBDA_SCALEOUT_GROUP` (segments per group) size the input; the timings are printed.
//! `LAMBDA_SCALEOUT_PIN=1` stands in for one-core machines on a small host: the single-process
//! run gets CPU 0; in the scaled-out run the run's process and one worker share CPU 0, the
//! server and the other two workers CPU 1 (`taskset`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lakes::TestLake;
use crate::orchestration::Process;
use crate::orders::{Ev, PIPELINE, check_views, close, events, send, wait_for_count};
use crate::state::TempDatabase;
use crate::support::{Rng, Server, wait_for_sealed};

const VIEWS: [&str; 4] = ["by_country", "hop", "sessions", "overall"];

fn write_settings(dir: &Path, base: &str, scale_out: usize, group: usize) {
    std::fs::write(
        dir.join("lambda.yaml"),
        format!("{base}batch:\n  scale_out_segments: {scale_out}\n  group_segments: {group}\n"),
    )
    .unwrap();
}

/// The CPU a process is pinned to under `LAMBDA_SCALEOUT_PIN`.
fn cpu(n: u32) -> Option<u32> {
    std::env::var_os("LAMBDA_SCALEOUT_PIN").map(|_| n)
}

/// Pins every thread of `pid` to `cpu`.
fn pin(pid: u32, cpu: Option<u32>) {
    if let Some(cpu) = cpu {
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run taskset")
            .success();
        assert!(ok, "taskset failed for {pid}");
    }
}

/// `lambda-ctl run PIPELINE --wait`; the run id, how long it took and its stderr.
async fn run(project: &Path, pipeline: &str) -> (String, Duration, String) {
    run_on(project, pipeline, None).await
}

/// [`run`], on CPU `cpu` if given.
async fn run_on(project: &Path, pipeline: &str, cpu: Option<u32>) -> (String, Duration, String) {
    let project: PathBuf = project.to_path_buf();
    let pipeline = pipeline.to_string();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut command = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string(), env!("CARGO_BIN_EXE_lambda-ctl")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_lambda-ctl")),
        };
        let out = command
            .args(["run", &pipeline, "--wait", "--project"])
            .arg(&project)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run lambda-ctl run");
        let took = started.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "lambda-ctl run {pipeline} failed: {}\n{stdout}\n{stderr}",
            out.status
        );
        let id = stdout.lines().next().unwrap_or_default().trim().to_string();
        (id, took, stderr)
    })
    .await
    .unwrap()
}

async fn view(client: &reqwest::Client, server: &Server, pipeline: &str, view: &str) -> Value {
    let resp = client
        .get(server.url(&format!("/v1/views/{pipeline}/{view}")))
        .send()
        .await
        .expect("GET view");
    assert!(resp.status().is_success(), "GET answered {}", resp.status());
    resp.json().await.unwrap()
}

/// Waits until `pipeline`'s views are all served from batch run `id`.
async fn wait_for_run(client: &reqwest::Client, server: &Server, pipeline: &str, id: &str) {
    wait_for_run_within(client, server, pipeline, id, Duration::from_secs(5)).await
}

async fn wait_for_run_within(
    client: &reqwest::Client,
    server: &Server,
    pipeline: &str,
    id: &str,
    within: Duration,
) {
    let start = Instant::now();
    for v in VIEWS {
        while view(client, server, pipeline, v).await["as_of"]["batch_run"].as_str() != Some(id) {
            assert!(
                start.elapsed() < within,
                "{pipeline}.{v} not served from run {id}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Equal up to float rounding (merge order differs between the two computations).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => close(x.as_f64().unwrap(), y.as_f64().unwrap()),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

async fn assert_same_answers(client: &reqwest::Client, server: &Server) {
    for v in VIEWS {
        let a = view(client, server, "orders", v).await;
        let b = view(client, server, "mirror", v).await;
        assert!(
            same(&a["rows"], &b["rows"]),
            "{v}: scaled-out and single-process answers differ:\n{}\n{}",
            a["rows"],
            b["rows"]
        );
    }
}

/// Sends the acknowledged events of `orders` to `mirror` too.
async fn mirror(client: &reqwest::Client, server: &Server, rng: &mut Rng, acked: &[Ev]) {
    for chunk in acked.chunks(500) {
        let body: String = chunk.iter().map(|e| e.line(rng) + "\n").collect();
        let resp = client
            .post(server.url("/v1/pipelines/mirror/events"))
            .header("content-type", crate::orders::NDJSON)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
    }
}

async fn wait_for_mirror(client: &reqwest::Client, server: &Server, n: u64) {
    let start = Instant::now();
    loop {
        let v = view(client, server, "mirror", "overall").await;
        if v["rows"].get(0).and_then(|r| r["n"].as_u64()) == Some(n) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "mirror: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until both pipelines sealed every event they absorbed.
async fn sealed(client: &reqwest::Client, server: &Server) {
    for pipeline in ["orders", "mirror"] {
        wait_for_sealed(client, server, pipeline, 1).await;
    }
}

async fn scale_out(state_url: Option<String>, lake: TestLake) {
    let n: usize = std::env::var("LAMBDA_SCALEOUT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6000);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("pipelines")).unwrap();
    let segment_rows = std::env::var("LAMBDA_SCALEOUT_SEGMENT_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((n / 40).max(100));
    let spec = PIPELINE.replace(
        "segment_rows: 300",
        &format!("segment_rows: {segment_rows}"),
    );
    std::fs::write(root.join("pipelines/orders.yaml"), &spec).unwrap();
    std::fs::write(
        root.join("pipelines/mirror.yaml"),
        spec.replace("name: orders", "name: mirror"),
    )
    .unwrap();
    let mut base = lake.yaml();
    if let Some(url) = &state_url {
        base.push_str(&format!("state: {url}\n"));
    }
    write_settings(root, &base, 0, 1);

    let client = reqwest::Client::new();
    let mut rng = Rng(7);
    let evs = events(&mut rng, n, 0);
    let (first, second) = (n * 3 / 4, n * 7 / 8);
    // The server computes groups too (it runs workers): its log tells whether it took one.
    let serve_log = root.join("serve.log");
    let server = Server::start_logging(root, &serve_log);
    let mut acked = send(&client, &server, &mut rng, &evs[..first]).await;
    mirror(&client, &server, &mut rng, &acked).await;
    let kept = |acked: &[Ev]| acked.iter().filter(|e| e.amount >= 0.0).count() as u64;
    wait_for_count(&client, &server, kept(&acked)).await;
    wait_for_mirror(&client, &server, kept(&acked)).await;
    // Every event sealed into a segment (segment_age: 1s).
    sealed(&client, &server).await;

    // One process.
    let (single, single_took, _) = run_on(root, "mirror", cpu(0)).await;
    // 3 workers; the run splits every view into groups of 4 segments.
    let mut workers: Vec<Process> = (0..3)
        .map(|_| Process::start(root, &["worker", "--concurrency", "1"]))
        .collect();
    for (i, w) in workers.iter_mut().enumerate() {
        w.wait_for("worker started", Duration::from_secs(30));
        pin(w.pid(), cpu(u32::from(i > 0)));
    }
    pin(server.child.id(), cpu(1));
    let group: usize = std::env::var("LAMBDA_SCALEOUT_GROUP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    write_settings(root, &base, 2, group);
    let (scaled, scaled_took, log) = run_on(root, "orders", cpu(0)).await;
    eprintln!(
        "scale-out ({} lake, {} state, {n} events): single process {:.2}s, 3 workers {:.2}s",
        lake.name,
        if state_url.is_some() {
            "postgres"
        } else {
            "sqlite"
        },
        single_took.as_secs_f64(),
        scaled_took.as_secs_f64()
    );
    assert!(log.contains("sealed segment(s)"), "{log}");
    // A process took a group when it logged starting one: "computed" comes after the group's
    // end is recorded, so the run may be over before a worker has written it.
    let serve_busy = std::fs::read_to_string(&serve_log)
        .unwrap_or_default()
        .contains("computing batch group");
    let busy = workers
        .iter()
        .filter(|w| w.logged("computing batch group"))
        .count()
        + usize::from(serve_busy);
    assert!(
        busy >= 2,
        "the groups were spread over the processes ({busy} busy, the server {}):\n{}",
        if serve_busy { "among them" } else { "not" },
        workers
            .iter()
            .map(|w| w.stderr_lines().join("\n"))
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    wait_for_run(&client, &server, "mirror", &single).await;
    wait_for_run(&client, &server, "orders", &scaled).await;
    check_views(&client, &server, &acked).await;
    assert_same_answers(&client, &server).await;
    // More, then an incremental run during which a worker dies holding a group.
    let more = send(&client, &server, &mut rng, &evs[first..second]).await;
    mirror(&client, &server, &mut rng, &more).await;
    acked.extend(more);
    wait_for_count(&client, &server, kept(&acked)).await;
    wait_for_mirror(&client, &server, kept(&acked)).await;
    sealed(&client, &server).await;
    write_settings(root, &base, 2, 1);
    let running = tokio::spawn({
        let root = root.to_path_buf();
        async move { run(&root, "orders").await }
    });
    // The kill needs the production shape: on a local lake a group takes a few milliseconds
    // (too short to be caught in the act), and on SQLite the workers poll so slowly that the
    // run's own process may take every group first.
    if lake.name != "file" && state_url.is_some() {
        let holding = |w: &Process| {
            let lines = w.stderr_lines();
            let count = |text: &str| lines.iter().filter(|l| l.contains(text)).count();
            count("computing batch group") > count("computed batch group")
        };
        // Freeze a worker seen computing a group; if it really is mid-group once its log is
        // drained, that is the one to kill, else let it go on.
        let victim = 'search: loop {
            for (i, w) in workers.iter().enumerate() {
                if holding(w) {
                    w.signal(rustix::process::Signal::STOP);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if holding(w) {
                        break 'search i;
                    }
                    w.signal(rustix::process::Signal::CONT);
                }
            }
            assert!(
                !running.is_finished(),
                "the run ended before a worker could be caught holding a group"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        workers[victim].kill9();
        let lines = workers[victim].stderr_lines();
        let count = |text: &str| lines.iter().filter(|l| l.contains(text)).count();
        assert!(
            count("computing batch group") > count("computed batch group"),
            "the killed worker was holding a group"
        );
    }
    let (last, _, _) = running.await.unwrap();
    // The first run's scratch files are gone: deleted by its finish job, or — written by a
    // second delivery of a group after that — by the next scaled-out run.
    let scratch = lake
        .open()
        .list(&lambda_ctl::lake::run_scratch_prefix(
            "orders",
            scaled.parse().unwrap(),
        ))
        .await
        .unwrap();
    assert!(
        scratch.is_empty(),
        "{scratch:?}\n{}",
        workers
            .iter()
            .flat_map(|w| w.stderr_lines())
            .filter(|l| l.contains("batch"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let (single, _, _) = run(root, "mirror").await;
    wait_for_run(&client, &server, "orders", &last).await;
    wait_for_run(&client, &server, "mirror", &single).await;
    check_views(&client, &server, &acked).await;
    assert_same_answers(&client, &server).await;

    // The rest, then a run whose own process dies as soon as its jobs are queued: the workers
    // compute the groups, and the finish job — taken by a worker or the server — publishes.
    let more = send(&client, &server, &mut rng, &evs[second..]).await;
    mirror(&client, &server, &mut rng, &more).await;
    acked.extend(more);
    wait_for_count(&client, &server, kept(&acked)).await;
    wait_for_mirror(&client, &server, kept(&acked)).await;
    sealed(&client, &server).await;
    let orphan = tokio::task::spawn_blocking({
        let root = root.to_path_buf();
        move || {
            let mut run = Process::start(&root, &["run", "orders", "--wait"]);
            run.wait_for("queued the run's batch jobs", Duration::from_secs(30));
            run.kill9();
            let lines = run.stderr_lines();
            assert!(
                !lines.iter().any(|l| l.contains("computing batch group")),
                "the run's process computed nothing itself:\n{}",
                lines.join("\n")
            );
            lines
                .iter()
                .find_map(|l| {
                    let id = l.strip_prefix("run ")?.split(':').next()?;
                    id.parse::<i64>().ok().map(|i| i.to_string())
                })
                .expect("the run printed its id")
        }
    })
    .await
    .unwrap();
    wait_for_run_within(&client, &server, "orders", &orphan, Duration::from_secs(60)).await;
    let (single, _, _) = run(root, "mirror").await;
    wait_for_run(&client, &server, "mirror", &single).await;
    check_views(&client, &server, &acked).await;
    assert_same_answers(&client, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_compute_the_same_answer_as_one_process_even_when_one_dies() {
    let lake = match TestLake::s3().await {
        Some(l) => l,
        None => TestLake::file(),
    };
    let db = match crate::support::service("LAMBDA_TEST_POSTGRES") {
        Some(server) => Some(TempDatabase::create(&server).await),
        None => None,
    };
    let url = db.as_ref().map(|d| d.url.clone());
    let outcome = tokio::spawn(scale_out(url, lake)).await;
    if let Some(db) = db {
        db.drop().await;
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
