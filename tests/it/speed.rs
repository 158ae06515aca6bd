//! The speed layer end to end through the real binary: POST events (out of order, days late,
//! redelivered, malformed, filtered), query every view, and compare with an independent oracle
//! ([`crate::orders`], plain loops). Then kill -9 at several points and check that every
//! acknowledged event is counted exactly once after a restart.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::orders::{Ev, check_views, events, post, project, send, wait_for_count};
use crate::support::{Rng, Server, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_exactly_and_survives_kill_9() {
    let dir = project();
    let client = reqwest::Client::new();
    let mut rng = Rng(7);
    let evs = events(&mut rng, 1500, 0);

    let server = Server::start(dir.path());
    let acked = send(&client, &server, &mut rng, &evs).await;
    let kept = acked.iter().filter(|e| e.amount >= 0.0).count() as u64;
    wait_for_count(&client, &server, kept).await;
    check_views(&client, &server, &acked).await;

    // Crash with sealed segments and an open one, restart: the same answer.
    server.kill9();
    let server = Server::start(dir.path());
    wait_for_count(&client, &server, kept).await;
    check_views(&client, &server, &acked).await;
    assert_dead_letters(dir.path());
}

/// Kill -9 while requests are in flight, at several points; unacknowledged requests are
/// retried after the restart (their ids de-duplicate whatever had become durable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_ingest_loses_and_doubles_nothing() {
    let dir = project();
    let client = reqwest::Client::new();
    let mut rng = Rng(99);
    let evs = events(&mut rng, 2400, 10_000);
    let mut acked: Vec<Ev> = Vec::new();
    let mut pending: Vec<Vec<Ev>> = Vec::new();
    let chunks: Vec<Vec<Ev>> = evs.chunks(100).map(<[Ev]>::to_vec).collect();
    let mut next = 0;
    for kill_after in [3usize, 9, 15] {
        let server = Server::start(dir.path());
        // Retry what was unacknowledged before the crash.
        for chunk in pending.drain(..) {
            let body: Vec<String> = chunk.iter().map(|e| e.line(&mut rng)).collect();
            let a = post(&client, &server, body.join("\n")).await;
            assert_eq!(
                a["accepted"].as_u64().unwrap() + a["duplicates"].as_u64().unwrap(),
                chunk.len() as u64
            );
            acked.extend(chunk);
        }
        // Four concurrent clients; kill while the last round is in flight.
        while next < kill_after.min(chunks.len()) {
            let round: Vec<Vec<Ev>> = chunks[next..(next + 4).min(chunks.len())].to_vec();
            next += round.len();
            let mut tasks = Vec::new();
            for chunk in round.clone() {
                let (client, url) = (client.clone(), server.url("/v1/pipelines/orders/events"));
                let body: Vec<String> = chunk.iter().map(|e| e.line(&mut rng)).collect();
                tasks.push(tokio::spawn(async move {
                    client
                        .post(url)
                        .header("content-type", crate::orders::NDJSON)
                        .body(body.join("\n"))
                        .send()
                        .await
                }));
            }
            if next >= kill_after {
                tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
                server.kill9();
                for (t, chunk) in tasks.into_iter().zip(round) {
                    match t.await.unwrap() {
                        Ok(r) if r.status().is_success() => acked.extend(chunk),
                        _ => pending.push(chunk),
                    }
                }
                break;
            }
            for (t, chunk) in tasks.into_iter().zip(round) {
                let r = t.await.unwrap().expect("request");
                assert!(r.status().is_success());
                acked.extend(chunk);
            }
        }
    }
    let server = Server::start(dir.path());
    for chunk in pending.drain(..) {
        let body: Vec<String> = chunk.iter().map(|e| e.line(&mut rng)).collect();
        post(&client, &server, body.join("\n")).await;
        acked.extend(chunk);
    }
    wait_for_count(
        &client,
        &server,
        acked.iter().filter(|e| e.amount >= 0.0).count() as u64,
    )
    .await;
    check_views(&client, &server, &acked).await;
}

fn assert_dead_letters(project: &Path) {
    let dl = project.join(".lambda/lake/dead_letters/orders");
    let mut n = 0;
    for entry in walk(&dl) {
        let text = std::fs::read_to_string(entry).unwrap();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert!(
                v["reason"].as_str().is_some_and(|r| !r.is_empty()) && v["raw"].is_string(),
                "{line}"
            );
            n += 1;
        }
    }
    assert!(n > 0, "no dead letters under {}", dl.display());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p))
            } else {
                out.push(p)
            }
        }
    }
    out
}

/// A project with one pipeline `p` (its `source:` block given) counting events by `all` view.
fn small_project(source: &str, format: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    let spec = format!(
        "name: p\nsource:\n{source}\nformat: {format}\nschema:\n  ts: timestamp\n  k: string\n  x: float\nevent_time: ts\narchive:\n  segment_rows: 1000000\n  segment_age: 1h\nviews:\n  - name: all\n    window: all\n    metrics:\n      n: count()\n      total: sum(x)\n"
    );
    std::fs::write(dir.path().join("pipelines/p.yaml"), spec).unwrap();
    dir
}

/// `(n, total)` of view `p.all`.
async fn counted(client: &reqwest::Client, server: &Server) -> (u64, f64) {
    let v = crate::support::get_json(client, server.url("/v1/views/p/all")).await;
    let row = &v["rows"][0];
    (
        row["n"].as_u64().unwrap_or(0),
        row["total"].as_f64().unwrap_or(0.0),
    )
}

async fn wait_counted(client: &reqwest::Client, server: &Server, n: u64, secs: u64) -> (u64, f64) {
    let start = std::time::Instant::now();
    loop {
        let got = counted(client, server).await;
        if got.0 == n {
            return got;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "counted {} of {n} events after {secs} s",
            got.0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs CSV `body`; the answer's `(accepted, rejected)`.
async fn post_csv(client: &reqwest::Client, url: String, body: String) -> (u64, u64) {
    let v = crate::support::post_events(client, url, "text/csv", body).await;
    (
        v["accepted"].as_u64().unwrap(),
        v["rejected"].as_u64().unwrap(),
    )
}

/// Concurrent CSV requests with different headers (some with a byte order mark) arrive in the
/// same milliseconds; after kill -9 each replays from the log exactly as the door decoded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_requests_of_one_millisecond_replay_apart_after_kill_9() {
    let dir = small_project("  type: http", "csv");
    let client = reqwest::Client::new();
    let server = Server::start(dir.path());
    let (mut n, mut total) = (0u64, 0.0f64);
    for round in 0..25u64 {
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            let x = (round * 8 + i) as f64;
            let ts = 1_763_719_200_000 + round * 8 + i;
            let (body, accepted) = match i % 4 {
                0 => (format!("ts,k,x\n{ts},a,{x}\n{ts},b,1\n"), 2),
                1 => (format!("\u{feff}x,ts,k\n{x},{ts},c\n"), 1),
                2 => (format!("k,x,ts\r\n\"c,d\",{x},{ts}\r\n"), 1),
                _ => (format!("\u{feff}x,k,ts\n{x},\"q\"\"uote\",{ts}\n"), 1),
            };
            n += accepted;
            total += x + if i % 4 == 0 { 1.0 } else { 0.0 };
            let (client, url) = (client.clone(), server.url("/v1/pipelines/p/events"));
            tasks.push(tokio::spawn(async move {
                assert_eq!(post_csv(&client, url, body).await, (accepted, 0));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    assert_eq!(wait_counted(&client, &server, n, 20).await, (n, total));
    // Nothing was sealed (segment_age 1h): the restart replays every request from the log.
    server.kill9();
    let server = Server::start(dir.path());
    assert_eq!(wait_counted(&client, &server, n, 20).await, (n, total));
}

/// A CSV record whose quoted field spans lines is one event; a quote never closed rejects its
/// own record, and the rest of the request counts — no 503 to retry forever. Both replay from
/// the log after kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_quoted_newlines_count_and_an_unterminated_quote_rejects_one_record() {
    let dir = small_project("  type: http", "csv");
    let client = reqwest::Client::new();
    let server = Server::start(dir.path());
    let url = || server.url("/v1/pipelines/p/events");
    let body = "ts,k,x\n1763719200000,\"two\nlines\",1\n1763719200001,b,2\n".to_string();
    assert_eq!(post_csv(&client, url(), body).await, (2, 0));
    let body = "x,ts,k\n4,1763719200002,\"open\n8,1763719200003,c\n16,1763719200004,d\n";
    assert_eq!(post_csv(&client, url(), body.to_string()).await, (2, 1));
    assert_eq!(wait_counted(&client, &server, 4, 20).await, (4, 27.0));
    server.kill9();
    let server = Server::start(dir.path());
    assert_eq!(wait_counted(&client, &server, 4, 20).await, (4, 27.0));
    let dead = walk(&dir.path().join(".lambda/lake/dead_letters/p"));
    let text = std::fs::read_to_string(&dead[0]).unwrap();
    assert!(text.contains("unterminated quoted field"), "{text}");
}

fn read_bytes_of(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar")
}

/// A followed file is tailed from its saved offset: polling it costs what is new, not the
/// whole file every 500 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_file_is_read_from_where_it_was_left() {
    let dir = small_project(
        "  type: file\n  path: data/*.ndjson\n  follow: true",
        "json",
    );
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let file = dir.path().join("data/events.ndjson");
    let lines = 200_000u64;
    let mut text = String::new();
    for i in 0..lines {
        text.push_str(&format!(
            "{{\"ts\": {}, \"k\": \"key-{}\", \"x\": 1, \"pad\": \"{}\"}}\n",
            1_763_719_200_000 + i,
            i % 100,
            "p".repeat(40)
        ));
    }
    std::fs::write(&file, &text).unwrap();
    let size = text.len() as u64;
    let client = reqwest::Client::new();
    let server = Server::start(dir.path());
    wait_counted(&client, &server, lines, 30).await;

    // Six polls of an unchanged file.
    let before = read_bytes_of(server.child.id());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let read = read_bytes_of(server.child.id()) - before;
    assert!(
        read < size / 4,
        "polling an unchanged {size}-byte file read {read} bytes in 3 s"
    );

    // Appended lines are picked up, and only they are read.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    writeln!(f, "{{\"ts\": 1763719100000, \"k\": \"late\", \"x\": 5}}").unwrap();
    drop(f);
    assert_eq!(
        wait_counted(&client, &server, lines + 1, 10).await,
        (lines + 1, lines as f64 + 5.0)
    );
}

/// Files read once (`follow: false`) whose pass fails are read again until they are read:
/// here the dead-letter area cannot be written at first, so the door refuses the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_file_pass_is_retried_not_skipped() {
    let dir = small_project("  type: file\n  path: data/*.ndjson", "json");
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(
        dir.path().join("data/events.ndjson"),
        "{\"ts\": 1763719200000, \"k\": \"a\", \"x\": 1}\nnot json\n{\"ts\": 1763719200001, \"k\": \"b\", \"x\": 2}\n",
    )
    .unwrap();
    // A file where the dead-letter directory goes.
    let lake = dir.path().join(".lambda/lake");
    std::fs::create_dir_all(&lake).unwrap();
    std::fs::write(lake.join("dead_letters"), "in the way").unwrap();
    let client = reqwest::Client::new();
    let log = dir.path().join("serve.log");
    let server = Server::start_logging(dir.path(), &log);
    eventually("a failed pass logged", Duration::from_secs(10), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("file source pass failed").then_some(())
    })
    .await;
    assert_eq!(counted(&client, &server).await.0, 0, "the pass failed");
    std::fs::remove_file(lake.join("dead_letters")).unwrap();
    assert_eq!(wait_counted(&client, &server, 2, 15).await, (2, 3.0));
    let dead = walk(&lake.join("dead_letters/p"));
    assert_eq!(dead.len(), 1, "{dead:?}");
}
