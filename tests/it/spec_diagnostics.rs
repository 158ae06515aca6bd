//! Every broken-spec fixture under tests/fixtures/broken/CASE is a project; its diagnostics are
//! snapshot-tested in CASE/expected.txt, and each line must be `FILE:LINE:COL: message`.

use std::path::Path;

use lambda_ctl::spec;

use crate::support::{assert_snapshot, fixtures};

fn diagnostics(case: &str) -> String {
    let root = fixtures().join("broken").join(case);
    let env = |name: &str| (name == "HOME").then(|| "/root".to_string());
    let errors = spec::load_with_env(&root, &env).expect_err("a broken fixture must not validate");
    let prefix = format!("{}/", root.display());
    let mut out = String::new();
    for d in &errors.0 {
        let line = d.to_string().replacen(&prefix, "", 1);
        let mut parts = line.splitn(4, ':');
        let (file, l, c) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        assert!(
            file.ends_with(".yaml") && l.parse::<usize>().is_ok() && c.parse::<usize>().is_ok(),
            "not FILE:LINE:COL: {line}"
        );
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn check(case: &str) {
    let actual = diagnostics(case);
    assert_snapshot(
        &fixtures().join("broken").join(case).join("expected.txt"),
        &actual,
    );
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { check(stringify!($name)); })*

        #[test]
        fn every_fixture_has_a_test() {
            let known = [$(stringify!($name)),*];
            for entry in std::fs::read_dir(fixtures().join("broken")).unwrap() {
                let name = entry.unwrap().file_name().into_string().unwrap();
                assert!(known.contains(&name.as_str()), "fixture {name} has no test case");
            }
        }
    };
}

cases!(
    unknown_key,
    wrong_type,
    bad_name,
    duplicate_name,
    unknown_source_type,
    missing_source_field,
    unknown_schema_type,
    event_time,
    event_id_unknown,
    bad_sql,
    aggregates,
    windows,
    workflows_bad,
    syntax,
    kafka_security,
    alias_bomb,
    servicebus,
    json_paths,
    serve_sql,
    sinks,
    lookups,
    partitions,
    buffer,
);

#[test]
fn problems_are_reported_all_at_once_and_sorted() {
    let out = diagnostics("workflows_bad");
    let files: Vec<&str> = out.lines().map(|l| l.split(':').next().unwrap()).collect();
    assert!(
        files.iter().any(|f| f.ends_with("cron.yaml"))
            && files.iter().any(|f| f.ends_with("cycle.yaml"))
    );
    let mut sorted = files.clone();
    sorted.sort();
    assert_eq!(files, sorted);
}

#[test]
fn fixture_paths_exist() {
    assert!(Path::new(&fixtures().join("broken")).is_dir());
}
