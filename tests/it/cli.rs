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

    // A --project that is not a project: a message saying so, nothing created there.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    for project in [dir.path(), missing.as_path()] {
        let out = lambda_ctl(&["runs", "--project", project.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stderr(&out).contains("not a lambda-ctl project"),
            "{}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("lambda-ctl init"), "{}", stderr(&out));
    }
    assert!(!missing.exists() && !dir.path().join(".lambda").exists());
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

/// `lambda-ctl ARGS` with `RUST_LOG` as given (unset when `None`), nothing else from the
/// environment that changes logging.
fn lambda_ctl_logging(args: &[&str], rust_log: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-ctl"));
    cmd.args(args)
        .env_remove("LAMBDA_PROJECT")
        .env_remove("RUST_LOG");
    if let Some(level) = rust_log {
        cmd.env("RUST_LOG", level);
    }
    cmd.output().expect("the lambda-ctl binary runs")
}

/// One-shot commands answer without log lines; `-v`, `-vv` or `RUST_LOG` bring them back.
#[test]
fn one_shot_commands_log_only_when_asked() {
    const OPENED: &str = "opened state database";
    let dir = crate::orders::project();
    let d = dir.path().to_str().unwrap();
    for command in [
        &["status"][..],
        &["runs"],
        &["validate"],
        &["verify", "orders"],
    ] {
        let args: Vec<&str> = command.iter().copied().chain(["--project", d]).collect();
        let quiet = lambda_ctl_logging(&args, None);
        assert!(quiet.status.success(), "{command:?}: {}", stderr(&quiet));
        assert!(
            !stderr(&quiet).contains("INFO") && !stderr(&quiet).contains(OPENED),
            "{command:?} logged by default:\n{}",
            stderr(&quiet)
        );
    }
    let status = ["status", "--project", d];
    let verbose = lambda_ctl_logging(&[&status[..], &["-v"]].concat(), None);
    assert!(verbose.status.success(), "{}", stderr(&verbose));
    assert!(stderr(&verbose).contains(OPENED), "{}", stderr(&verbose));
    assert!(!stderr(&verbose).contains("DEBUG"), "{}", stderr(&verbose));
    let debug = lambda_ctl_logging(&[&["-vv"][..], &status].concat(), None);
    assert!(stderr(&debug).contains("DEBUG"), "{}", stderr(&debug));
    let env = lambda_ctl_logging(&status, Some("info"));
    assert!(env.status.success(), "{}", stderr(&env));
    assert!(stderr(&env).contains(OPENED), "{}", stderr(&env));
    // `RUST_LOG` wins over `-v`.
    let env = lambda_ctl_logging(&[&status[..], &["-v"]].concat(), Some("error"));
    assert!(!stderr(&env).contains(OPENED), "{}", stderr(&env));
}

/// `serve` keeps logging at info by default: what it does over hours is in its log.
#[test]
fn serve_logs_at_info_by_default() {
    use std::io::BufRead;
    let dir = crate::orders::project();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
        .args(["serve", "--listen", "127.0.0.1:0", "--project"])
        .arg(dir.path())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start lambda-ctl serve");
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let listening = stdout
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("lambda-ctl serving on "));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(listening, "serve did not listen: {}", stderr(&out));
    assert!(
        stderr(&out).contains("opened state database"),
        "{}",
        stderr(&out)
    );
}
