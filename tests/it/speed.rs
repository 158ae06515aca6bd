//! The speed layer end to end through the real binary: POST events (out of order, days late,
//! redelivered, malformed, filtered), query every view, and compare with an independent oracle
//! ([`crate::orders`], plain loops). Then kill -9 at several points and check that every
//! acknowledged event is counted exactly once after a restart.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::orders::{Ev, check_views, events, post, project, send, wait_for_count};
use crate::support::{Rng, Server};

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
