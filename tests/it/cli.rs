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
