//! Blue/green view logic from outside: the YAML of a served pipeline is edited (`by_country`
//! from 1-minute to 2-minute windows); `run --candidate` computes that view beside the live
//! one while events stream in; the live answers never change definition, the candidate's
//! answer (`?version=candidate`) equals a from-scratch computation by the new definition over
//! every acknowledged event, `diff` accounts for every row of both, and `discard` forgets it.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::lambda::{kept, run_batch, wait_for_batch};
use crate::orders::{Ev, PIPELINE, close, events, get_view, ms, project, send, wait_for_count};
use crate::support::{Rng, Server, get_json, lambda_ctl, stderr, stdout};

fn ctl(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = args.to_vec();
    all.extend(["--project", dir.to_str().unwrap()]);
    lambda_ctl(&all)
}

/// Every row of `by_country` is a window of `minutes` minutes.
fn windows_of(answer: &Value, minutes: i64) {
    for r in answer["rows"].as_array().unwrap() {
        let (start, end) = (
            ms(&r["window_start"]).unwrap(),
            ms(&r["window_end"]).unwrap(),
        );
        assert_eq!(end - start, minutes * 60_000, "a mixed answer: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_is_computed_beside_the_live_view_compared_and_discarded() {
    let dir = project();
    let client = reqwest::Client::new();
    let mut rng = Rng(47);
    let evs = events(&mut rng, 600, 0);
    let server = Server::start(dir.path());
    let mut acked = send(&client, &server, &mut rng, &evs[..300]).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    let run = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run).await;

    // Nothing edited: nothing to compute.
    let out = ctl(dir.path(), &["run", "orders", "--candidate", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no candidate to compute"),
        "{}",
        stderr(&out)
    );

    // The edit: by_country in 2-minute windows. The server goes on with what it runs.
    let edited = PIPELINE.replacen("window: 1m", "window: 2m", 1);
    assert_ne!(edited, PIPELINE);
    std::fs::write(dir.path().join("pipelines/orders.yaml"), edited).unwrap();
    let candidate_run = {
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || ctl(&dir, &["run", "orders", "--candidate", "--wait"]))
    };
    // Ingest and queries go on meanwhile: every live answer is the live definition's.
    acked.extend(send(&client, &server, &mut rng, &evs[300..]).await);
    windows_of(&get_view(&client, &server, "by_country").await, 1);
    let out = candidate_run.await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("by_country: recorded as the candidate"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("overall"),
        "only the edited view: {}",
        stderr(&out)
    );
    wait_for_count(&client, &server, kept(&acked)).await;
    let live = get_view(&client, &server, "by_country").await;
    windows_of(&live, 1);
    assert_eq!(
        live["as_of"]["batch_run"],
        run.as_str(),
        "the live version stays current"
    );

    // The candidate's answer: the new definition over every acknowledged event.
    let url = server.url("/v1/views/orders/by_country?version=candidate");
    let candidate = get_json(&client, url).await;
    windows_of(&candidate, 2);
    let mut oracle: BTreeMap<(i64, String), (u64, f64)> = BTreeMap::new();
    for e in acked.iter().filter(|e: &&Ev| e.amount >= 0.0) {
        let w = oracle
            .entry((e.ts.div_euclid(120_000) * 120_000, e.country.clone()))
            .or_default();
        w.0 += 1;
        w.1 += e.amount;
    }
    let rows = candidate["rows"].as_array().unwrap();
    assert_eq!(rows.len(), oracle.len(), "candidate windows");
    for r in rows {
        let key = (
            ms(&r["window_start"]).unwrap(),
            r["country"].as_str().unwrap().to_string(),
        );
        let (n, total) = oracle[&key];
        assert_eq!(r["n"].as_u64(), Some(n), "{key:?}");
        assert!(close(r["total"].as_f64().unwrap(), total), "{key:?}");
    }
    assert_ne!(candidate["as_of"]["batch_run"], live["as_of"]["batch_run"]);
    // Filters apply as on the live version.
    let url = server.url("/v1/views/orders/by_country?version=candidate&country=DE");
    let de = get_json(&client, url).await;
    let want: Vec<&Value> = rows.iter().filter(|r| r["country"] == "DE").collect();
    assert_eq!(
        de["rows"].as_array().unwrap().iter().collect::<Vec<_>>(),
        want
    );

    // diff: every row of both answers is added, removed, changed or unchanged.
    let out = ctl(
        dir.path(),
        &[
            "diff",
            "orders.by_country",
            "--json",
            "--server",
            &server.base,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let d: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let count = |k: &str| d[k].as_u64().unwrap();
    let live_rows = live["rows"].as_array().unwrap().len() as u64;
    assert_eq!(
        count("added") + count("changed") + count("unchanged"),
        rows.len() as u64,
        "{d}"
    );
    assert_eq!(
        count("removed") + count("changed") + count("unchanged"),
        live_rows,
        "{d}"
    );
    // Odd minutes exist only in the live answer; every 2-minute row merges two windows.
    assert!(count("removed") > 0 && count("changed") > 0, "{d}");
    assert!(d["sample"]["changed"].as_array().unwrap().len() <= 5);
    let out = ctl(
        dir.path(),
        &["diff", "orders.by_country", "--server", &server.base],
    );
    assert!(
        stdout(&out).contains("removed,") || stdout(&out).contains("removed"),
        "{}",
        stdout(&out)
    );

    // status lists it, as JSON and in its table.
    let out = ctl(dir.path(), &["status", "--json", "--server", &server.base]);
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let views = status["pipelines"][0]["views"].as_array().unwrap();
    let pending: Vec<&str> = views
        .iter()
        .filter(|v| !v["candidate"].is_null())
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(pending, ["by_country"], "{status}");
    let by_country = views.iter().find(|v| v["name"] == "by_country").unwrap();
    assert_eq!(
        by_country["candidate"]["run"].to_string(),
        candidate["as_of"]["batch_run"].as_str().unwrap()
    );
    let out = ctl(dir.path(), &["status", "--server", &server.base]);
    assert!(stdout(&out).contains("CANDIDATES"), "{}", stdout(&out));

    // A view without a candidate, and after discard.
    let resp = client
        .get(server.url("/v1/views/orders/hop?version=candidate"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let out = ctl(dir.path(), &["discard", "orders"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("orders.by_country"),
        "{}",
        stdout(&out)
    );
    let resp = client
        .get(server.url("/v1/views/orders/by_country?version=candidate"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    windows_of(&get_view(&client, &server, "by_country").await, 1);
    let out = ctl(dir.path(), &["status", "--server", &server.base]);
    assert!(!stdout(&out).contains("CANDIDATES"), "{}", stdout(&out));
}
