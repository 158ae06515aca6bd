//! Time travel from outside: every answer saved while events stream in — across a batch
//! publication, a kill -9 and a restart — is answered again, exactly, by `as_of=` the instant
//! it reports (`as_of.at`), over HTTP and by `lambda-ctl query --as-of`; an instant older than
//! `serve.history` is refused with 410, and one in the future is the live answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::lambda::{kept, run_batch, wait_for_batch};
use crate::orders::{Ev, close, events, project, send, wait_for_count};
use crate::support::{Rng, Server, lambda_ctl, stdout};

const VIEWS: [&str; 4] = ["by_country", "hop", "sessions", "overall"];

/// A saved answer: the view, its rows, the instant it reports.
struct Saved {
    view: &'static str,
    rows: Vec<Value>,
    at: String,
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

/// The same rows: equal keys and values, numbers within float rounding (an `as_of` answer
/// merges the same events' partials in another grouping).
pub fn same_rows(view: &str, at: &str, saved: &[Value], again: &[Value]) {
    assert_eq!(
        saved.len(),
        again.len(),
        "{view} as of {at}: {} rows saved, {} answered again\nsaved: {saved:?}\nagain: {again:?}",
        saved.len(),
        again.len()
    );
    for (s, a) in saved.iter().zip(again) {
        let (s, a) = (s.as_object().unwrap(), a.as_object().unwrap());
        assert_eq!(
            s.keys().collect::<Vec<_>>(),
            a.keys().collect::<Vec<_>>(),
            "{view} as of {at}"
        );
        for (k, v) in s {
            let same = match (v.as_f64(), a[k].as_f64()) {
                (Some(x), Some(y)) if !v.is_u64() => close(x, y),
                _ => *v == a[k],
            };
            assert!(same, "{view} as of {at}: {k} was {v}, now {}", a[k]);
        }
    }
}

/// Sends `evs` while another task saves the answers of every view as fast as it can; returns
/// the acknowledged events.
async fn send_while_saving(
    client: &reqwest::Client,
    server: &Server,
    rng: &mut Rng,
    evs: &[Ev],
    saved: &mut Vec<Saved>,
) -> Vec<Ev> {
    let done = Arc::new(AtomicBool::new(false));
    let saver = {
        let (client, base, done) = (client.clone(), server.base.clone(), done.clone());
        tokio::spawn(async move {
            let mut out = Vec::new();
            while !done.load(Ordering::Relaxed) {
                for view in VIEWS {
                    let url = format!("{base}/v1/views/orders/{view}");
                    let answer: Value = client.get(url).send().await.unwrap().json().await.unwrap();
                    out.push(Saved {
                        view,
                        rows: answer["rows"].as_array().unwrap().clone(),
                        at: answer["as_of"]["at"].as_str().unwrap().to_string(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            out
        })
    };
    let mut acked = Vec::new();
    for part in evs.chunks(25) {
        acked.extend(send(client, server, rng, part).await);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    done.store(true, Ordering::Relaxed);
    saved.extend(saver.await.unwrap());
    acked
}

pub async fn as_of(
    client: &reqwest::Client,
    server: &Server,
    view: &str,
    at: &str,
) -> (u16, Value) {
    let url = server.url(&format!("/v1/views/orders/{view}?as_of={}", urlencode(at)));
    let resp = client.get(url).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_saved_answer_is_answered_again_as_of_its_instant() {
    let dir = project();
    std::fs::write(dir.path().join("lambda.yaml"), "serve:\n  history: 1h\n").unwrap();
    let client = reqwest::Client::new();
    let mut rng = Rng(31);
    let mut saved = Vec::new();
    let evs = events(&mut rng, 900, 0);

    let server = Server::start(dir.path());
    let mut acked = send_while_saving(&client, &server, &mut rng, &evs[..300], &mut saved).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    // A batch publication replaces part of the speed layer's answer while events stream in.
    let (sent, run) = tokio::join!(
        send_while_saving(&client, &server, &mut rng, &evs[300..600], &mut saved),
        run_batch(dir.path())
    );
    acked.extend(sent);
    wait_for_batch(&client, &server, &run).await;
    acked.extend(send_while_saving(&client, &server, &mut rng, &evs[600..700], &mut saved).await);
    // kill -9 with events in the open segment; the restart replays them.
    server.kill9();
    let server = Server::start(dir.path());
    acked.extend(send_while_saving(&client, &server, &mut rng, &evs[700..], &mut saved).await);
    wait_for_count(&client, &server, kept(&acked)).await;

    let by_view = |v: &str| saved.iter().filter(|s| s.view == v).count();
    assert!(
        VIEWS.iter().all(|v| by_view(v) >= 10),
        "too few answers saved: {}",
        saved.len()
    );
    // Answers saved between any two others too: every fourth, and the first and last ones.
    let picked: Vec<&Saved> = saved
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 == 0 || *i + 4 >= saved.len())
        .map(|(_, s)| s)
        .collect();
    let (mut from_batch, mut without) = (0, 0);
    for s in &picked {
        let (status, again) = as_of(&client, &server, s.view, &s.at).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["as_of"]["at"], s.at.as_str(), "{}", again["as_of"]);
        same_rows(s.view, &s.at, &s.rows, again["rows"].as_array().unwrap());
        match again["as_of"]["batch_run"].as_str() {
            Some(r) => {
                assert_eq!(r, run, "{}", again["as_of"]);
                from_batch += 1;
            }
            None => without += 1,
        }
    }
    // Instants before the publication and after it were both answered again.
    assert!(from_batch > 0 && without > 0, "{from_batch} {without}");
    // The earliest answers counted fewer events than there are now.
    let first = &saved.iter().find(|s| s.view == "overall").unwrap().rows;
    let first_n = first.first().and_then(|r| r["n"].as_u64()).unwrap_or(0);
    assert!(first_n < kept(&acked), "{first_n}");

    // The CLI asks for the same instant.
    let last_overall = saved.iter().rev().find(|s| s.view == "overall").unwrap();
    let first_country = saved.iter().find(|s| s.view == "by_country").unwrap();
    for s in [last_overall, first_country] {
        let target = format!("orders.{}", s.view);
        let out = lambda_ctl(&[
            "query",
            &target,
            "--as-of",
            &s.at,
            "--format",
            "json",
            "--server",
            &server.base,
            "--project",
            dir.path().to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{out:?}");
        let answer: Value = serde_json::from_str(&stdout(&out)).unwrap();
        same_rows(s.view, &s.at, &s.rows, answer["rows"].as_array().unwrap());
    }

    // Beyond serve.history: refused, saying how far back answers go.
    let (status, answer) = as_of(&client, &server, "overall", "-2h").await;
    assert_eq!(status, 410, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("serve.history"),
        "{answer}"
    );
    // Ahead of now: the live answer, at the instant it stands for.
    let (status, live) = as_of(&client, &server, "overall", "+1h").await;
    assert_eq!(status, 200, "{live}");
    assert_eq!(live["rows"][0]["n"].as_u64(), Some(kept(&acked)), "{live}");
    assert!(live["as_of"]["at"].as_str().unwrap() < "3000", "{live}");
    // A malformed instant is the caller's mistake.
    let (status, answer) = as_of(&client, &server, "overall", "yesterday-ish").await;
    assert_eq!(status, 400, "{answer}");
}
