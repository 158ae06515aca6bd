//! Shared helpers: paths into the repository, running the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// Runs `lambda-ctl ARGS` with a clean environment for project lookups.
pub fn lambda_ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
        .args(args)
        .env_remove("LAMBDA_PROJECT")
        .env("RUST_LOG", "warn")
        .output()
        .expect("the lambda-ctl binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Compares `actual` with the snapshot file; `UPDATE_SNAPSHOTS=1` rewrites it instead.
pub fn assert_snapshot(path: &Path, actual: &str) {
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(path, actual).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {} — run with UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        expected,
        actual,
        "snapshot {} differs (UPDATE_SNAPSHOTS=1 to accept)",
        path.display()
    );
}
