//! `lambda-ctl init [DIR]`: scaffold a project — the repository's own example, so a new project
//! starts from something `serve` runs and the test suite checks.

use std::path::Path;

use anyhow::Context;

use super::CliError;

const LAMBDA_YAML: &str = "\
# lambda-ctl project settings. Every key is optional; without this file everything is embedded.
# state: sqlite://.lambda/state.db     # production: postgres://user@host/db
# lake: file://.lambda/lake            # s3://bucket/prefix, az://container/prefix, gs://bucket/prefix
# serve:
#   listen: 127.0.0.1:8080
#   token: ${LAMBDA_TOKEN:-}           # when set, /v1 calls need `Authorization: Bearer <token>`
# timezone: UTC                        # default for workflow schedules
";

const FILES: &[(&str, &str)] = &[
    ("lambda.yaml", LAMBDA_YAML),
    (
        "pipelines/clicks.yaml",
        include_str!("../../pipelines/clicks.yaml"),
    ),
    (
        "workflows/nightly.yaml",
        include_str!("../../workflows/nightly.yaml"),
    ),
    (
        "reference/pages.csv",
        include_str!("../../reference/pages.csv"),
    ),
    (".gitignore", ".lambda/\n"),
];

pub fn run(dir: &Path) -> Result<(), CliError> {
    let existing: Vec<&str> = FILES
        .iter()
        .map(|(f, _)| *f)
        .filter(|f| dir.join(f).exists())
        .collect();
    if !existing.is_empty() {
        return Err(CliError::User(format!(
            "{} already has {}; not overwriting (choose an empty directory)",
            dir.display(),
            existing.join(", ")
        )));
    }
    for (file, body) in FILES {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("created a lambda-ctl project in {}", dir.display());
    println!(
        "next: lambda-ctl validate --project {0} && lambda-ctl serve --project {0}",
        dir.display()
    );
    Ok(())
}
