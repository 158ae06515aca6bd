//! Blue/green view logic from outside: the YAML of a served pipeline is edited (`by_country`
//! from 1-minute to 2-minute windows); `run --candidate` computes that view beside the live
//! one while events stream in; the live answers never change definition, the candidate's
//! answer (`?version=candidate`) equals a from-scratch computation by the new definition over
//! every acknowledged event, `diff` accounts for every row of both, and `discard` forgets it.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::lambda::{kept, run_batch, wait_for_batch};
use crate::maintenance::{assert_succeeded, run_workflow};
use crate::orders::{Ev, PIPELINE, close, events, get_view, ms, project, send, wait_for_count};
use crate::support::{Rng, Server, get_json, lambda_ctl, stderr, stdout};
use crate::travel::{as_of, same_rows};

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

/// The minutes of `answer`'s windows (`by_country`): every row's alike, or it is a mixed
/// answer; `None` without rows.
fn window_minutes(answer: &Value) -> Option<i64> {
    let rows = answer["rows"].as_array().unwrap();
    let minutes =
        |r: &Value| (ms(&r["window_end"]).unwrap() - ms(&r["window_start"]).unwrap()) / 60_000;
    let first = minutes(rows.first()?);
    for r in rows {
        assert_eq!(minutes(r), first, "a mixed answer: {r}");
    }
    Some(first)
}

/// `by_country` in windows of `minutes` equals a from-scratch computation over `acked`.
fn equals_oracle(answer: &Value, acked: &[Ev], minutes: i64) {
    let size = minutes * 60_000;
    let mut oracle: BTreeMap<(i64, String), (u64, f64)> = BTreeMap::new();
    for e in acked.iter().filter(|e| e.amount >= 0.0) {
        let w = oracle
            .entry((e.ts.div_euclid(size) * size, e.country.clone()))
            .or_default();
        w.0 += 1;
        w.1 += e.amount;
    }
    let rows = answer["rows"].as_array().unwrap();
    assert_eq!(rows.len(), oracle.len(), "windows of {minutes} minutes");
    for r in rows {
        let key = (
            ms(&r["window_start"]).unwrap(),
            r["country"].as_str().unwrap().to_string(),
        );
        assert_eq!(ms(&r["window_end"]).unwrap() - key.0, size, "{r}");
        let (n, total) = oracle[&key];
        assert_eq!(r["n"].as_u64(), Some(n), "{key:?}");
        assert!(close(r["total"].as_f64().unwrap(), total), "{key:?}");
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
    equals_oracle(&candidate, &acked, 2);
    let rows = candidate["rows"].as_array().unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_switches_the_served_definition_under_ingest_without_a_mixed_answer() {
    let dir = project();
    std::fs::create_dir_all(dir.path().join("workflows")).unwrap();
    std::fs::write(
        dir.path().join("workflows/recompute.yaml"),
        "name: recompute\ntasks:\n  - name: recompute\n    batch: orders\n",
    )
    .unwrap();
    let client = reqwest::Client::new();
    let mut rng = Rng(53);
    let evs = events(&mut rng, 1200, 0);
    let server = Server::start(dir.path());
    let mut acked = send(&client, &server, &mut rng, &evs[..300]).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    let run = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run).await;
    let promote = |dir: &Path, base: &str| ctl(dir, &["promote", "orders", "--server", base]);

    // Nothing edited: nothing to promote.
    let out = promote(dir.path(), &server.base);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nothing to promote"),
        "{}",
        stderr(&out)
    );

    // Edited — by_country in 2-minute windows, and a view added first in the file — without a
    // candidate of the edit: refused, naming the view and what to run.
    let edited = PIPELINE.replacen("window: 1m", "window: 2m", 1).replacen(
        "views:\n",
        "views:\n  - name: per_user\n    group_by: [user]\n    window: all\n    metrics:\n      n: count()\n",
        1,
    );
    std::fs::write(dir.path().join("pipelines/orders.yaml"), &edited).unwrap();
    let out = promote(dir.path(), &server.base);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("by_country") && stderr(&out).contains("--candidate"),
        "{}",
        stderr(&out)
    );
    // A change the server cannot make in place (a view removed) is refused too.
    let renamed = edited.replacen("name: hop", "name: hopping", 1);
    std::fs::write(dir.path().join("pipelines/orders.yaml"), &renamed).unwrap();
    let out = promote(dir.path(), &server.base);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("restart") || stderr(&out).contains("start it again"),
        "{}",
        stderr(&out)
    );
    std::fs::write(dir.path().join("pipelines/orders.yaml"), &edited).unwrap();

    let out = ctl(dir.path(), &["run", "orders", "--candidate", "--wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    acked.extend(send(&client, &server, &mut rng, &evs[300..600]).await);
    wait_for_count(&client, &server, kept(&acked)).await;
    let saved = get_view(&client, &server, "by_country").await;

    // The promote runs in its own process while events stream in and the view is queried:
    // every answer is of one definition, and once the new one answers the old never does.
    let promoting = {
        let (dir, base) = (dir.path().to_path_buf(), server.base.clone());
        tokio::task::spawn_blocking(move || promote(&dir, &base))
    };
    let mut seen = Vec::new();
    let mut next = 600;
    while !promoting.is_finished() || next < 900 {
        if next < 900 {
            let end = next + 25;
            acked.extend(send(&client, &server, &mut rng, &evs[next..end]).await);
            next = end;
        }
        if let Some(m) = window_minutes(&get_view(&client, &server, "by_country").await) {
            seen.push(m);
        }
        if next >= 900 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let out = promoting.await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("orders.by_country: promoted its candidate (run"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("the server runs the definition in pipelines/ from"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("orders.per_user: promoted its candidate (run"),
        "{}",
        stdout(&out)
    );
    assert!(
        !stdout(&out).contains("orders.hop"),
        "only the edited views: {}",
        stdout(&out)
    );
    let first_new = seen.iter().position(|m| *m == 2).unwrap_or(seen.len());
    assert!(seen[..first_new].iter().all(|m| *m == 1), "{seen:?}");
    assert!(
        seen[first_new..].iter().all(|m| *m == 2),
        "the old definition after the new: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&2), "{seen:?}");

    // The ledger has the rows the switch changed, as a publication's: each window and group
    // before (1-minute) and after (2-minute); both answers counted the same events.
    let url = server.url("/v1/views/orders/by_country/restatements?limit=100000");
    let ledger = get_json(&client, url).await;
    let switched: Vec<&Value> = ledger["restatements"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cause"] == "publication")
        .collect();
    assert!(!switched.is_empty(), "{ledger}");
    let delta: f64 = switched
        .iter()
        .map(|e| e["metrics"]["n"]["delta"].as_f64().unwrap())
        .sum();
    assert_eq!(delta, 0.0, "{ledger}");

    // What the old definition served is answered again as of its instant: the server
    // recorded the definition it ran.
    let at = saved["as_of"]["at"].as_str().unwrap();
    let (status, again) = as_of(&client, &server, "by_country", at).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(window_minutes(&again), Some(1), "{}", again["as_of"]);
    same_rows(
        "by_country",
        at,
        saved["rows"].as_array().unwrap(),
        again["rows"].as_array().unwrap(),
    );

    // The new definition over every acknowledged event, the other views as they were.
    wait_for_count(&client, &server, kept(&acked)).await;
    equals_oracle(&get_view(&client, &server, "by_country").await, &acked, 2);
    check_others(&client, &server, &acked).await;
    per_user(&client, &server, &acked).await;
    let out = ctl(dir.path(), &["status", "--server", &server.base]);
    assert!(!stdout(&out).contains("CANDIDATES"), "{}", stdout(&out));
    let out = promote(dir.path(), &server.base);
    assert!(
        stderr(&out).contains("nothing to promote"),
        "{}",
        stderr(&out)
    );

    // The server's own workflow runs compute the definition it runs now, building on the
    // promoted version: the view is served from their publication.
    let promoted = get_view(&client, &server, "by_country").await["as_of"]["batch_run"].clone();
    acked.extend(send(&client, &server, &mut rng, &evs[next..next + 100]).await);
    next += 100;
    wait_for_count(&client, &server, kept(&acked)).await;
    assert_succeeded(&run_workflow(&client, &server, "recompute").await);
    let start = std::time::Instant::now();
    let answer = loop {
        let answer = get_view(&client, &server, "by_country").await;
        if answer["as_of"]["batch_run"] != promoted {
            break answer;
        }
        assert!(
            start.elapsed().as_secs() < 5,
            "the workflow's publication is not served: {}",
            answer["as_of"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    equals_oracle(&answer, &acked, 2);
    // And so does a run in another process, from pipelines/.
    let run = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run).await;
    equals_oracle(&get_view(&client, &server, "by_country").await, &acked, 2);

    // A restart runs it too.
    drop(server);
    let server = Server::start(dir.path());
    acked.extend(send(&client, &server, &mut rng, &evs[next..]).await);
    wait_for_count(&client, &server, kept(&acked)).await;
    equals_oracle(&get_view(&client, &server, "by_country").await, &acked, 2);
    check_others(&client, &server, &acked).await;
    per_user(&client, &server, &acked).await;
}

/// The view the promote added counts each user's kept events.
async fn per_user(client: &reqwest::Client, server: &Server, acked: &[Ev]) {
    let mut oracle: BTreeMap<String, u64> = BTreeMap::new();
    for e in acked.iter().filter(|e| e.amount >= 0.0) {
        *oracle.entry(e.user.clone()).or_default() += 1;
    }
    let answer = get_view(client, server, "per_user").await;
    let got: BTreeMap<String, u64> = answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap().to_string(),
                r["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, oracle, "{}", answer["as_of"]);
}

/// `overall` counts every kept event (the views the promote left alone still answer).
async fn check_others(client: &reqwest::Client, server: &Server, acked: &[Ev]) {
    let overall = get_view(client, server, "overall").await;
    assert_eq!(
        overall["rows"][0]["n"].as_u64(),
        Some(kept(acked)),
        "{overall}"
    );
}
