//! The binary as users run it: exit codes and output of `init` and `validate`.

use crate::support::{fixtures, lambda_ctl, repo, stderr, stdout};

#[test]
fn validate_repository_exits_zero_with_a_summary() {
    let out = lambda_ctl(&["validate", "--project", repo().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("pipeline clicks: generator source"), "{text}");
    assert!(text.contains("workflow nightly: `0 2 * * *` UTC"), "{text}");
}

#[test]
fn validate_broken_project_lists_every_problem_and_exits_one() {
    let root = fixtures().join("broken/workflows_bad");
    let out = lambda_ctl(&["validate", "--project", root.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let located = err.lines().filter(|l| l.contains(".yaml:")).count();
    assert!(located >= 8, "{err}");
    assert!(err.trim_end().ends_with("problems found"), "{err}");
}

#[test]
fn init_scaffolds_a_valid_project_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("x");
    let out = lambda_ctl(&["init", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = lambda_ctl(&["validate", "--project", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let again = lambda_ctl(&["init", target.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("not overwriting"));
}

#[test]
fn bad_arguments_exit_one() {
    let out = lambda_ctl(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(1));
    let out = lambda_ctl(&["validate", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(1));
}

/// Times may start with `-` (relative): clap must not take `-10m` for a flag.
#[test]
fn query_takes_relative_times() {
    let dir = crate::orders::project();
    let server = crate::support::Server::start(dir.path());
    let d = dir.path().to_str().unwrap();
    for args in [
        &["--from", "-10m"][..],
        &["--from", "-1h", "--to", "-1m"],
        &["--to=-5m"],
    ] {
        let mut all = vec!["query", "orders.by_country", "--server", &server.base];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--project", d]);
        let o = lambda_ctl(&all);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).contains("0 rows"), "{}", stdout(&o));
    }
}

/// `run PIPELINE` without `--wait` prints the run id and returns while the run goes on in
/// the background; here its lake never answers, so the run is still running when `run` has
/// returned, and fails (recorded) once the lake hangs up.
#[test]
fn run_pipeline_without_wait_prints_the_id_and_returns() {
    use std::sync::{Arc, Mutex};
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hole.local_addr().unwrap().port();
    let held: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    std::thread::spawn({
        let held = held.clone();
        move || {
            for s in hole.incoming().map_while(Result::ok) {
                held.lock().unwrap().push(s);
            }
        }
    });
    let dir = crate::orders::project();
    std::fs::write(
        dir.path().join("lambda.yaml"),
        format!(
            "lake: s3://hole/lake\nlake_options:\n  endpoint: http://127.0.0.1:{port}\n  allow_http: \"true\"\n  skip_signature: \"true\"\n  region: us-east-1\n  max_retries: \"0\"\n"
        ),
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let started = std::time::Instant::now();
    let o = lambda_ctl(&["run", "orders", "--project", d]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "`run` waited for the run: {:?}",
        started.elapsed()
    );
    let id = stdout(&o).trim().to_string();
    assert!(id.parse::<i64>().is_ok(), "{}", stdout(&o));
    let logs = lambda_ctl(&["logs", &id, "--project", d]);
    assert!(
        stdout(&logs).starts_with(&format!("run {id} of orders (batch): running")),
        "{}{}",
        stdout(&logs),
        stderr(&logs)
    );

    // The lake hangs up: the background run fails and says so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        for s in held.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let logs = stdout(&lambda_ctl(&["logs", &id, "--project", d]));
        if logs.contains(": failed") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the background run did not end: {logs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // An argument the background run refuses is reported here, with exit 1.
    let o = lambda_ctl(&["run", "orders", "--views", "nope", "--project", d]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("has no view `nope`"), "{}", stderr(&o));
}

/// And with a lake that answers, the background run publishes.
#[test]
fn run_pipeline_without_wait_finishes_in_the_background() {
    let dir = crate::orders::project();
    let d = dir.path().to_str().unwrap();
    let o = lambda_ctl(&["run", "orders", "--project", d]);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let logs = stdout(&lambda_ctl(&["logs", &id, "--project", d]));
        if logs.contains(": succeeded") {
            break;
        }
        assert!(
            !logs.contains(": failed") && std::time::Instant::now() < deadline,
            "{logs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
