//! What the multi-process benches share: where the state DB and the lake live (PostgreSQL and
//! the S3 server when `LAMBDA_TEST_POSTGRES` / `LAMBDA_TEST_S3` are set, else SQLite and a local
//! directory), and "machines" — cgroups with a CPU quota — to start `lambda-ctl` in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

/// Where the state DB and the lake live.
pub struct Backends {
    pub name: String,
    pub state: String,
    pub lake: String,
    pub lake_options: BTreeMap<String, String>,
    /// A database created on `LAMBDA_TEST_POSTGRES`: (server URL, database name).
    database: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Backends {
    pub async fn create() -> anyhow::Result<Backends> {
        let dir = tempfile::tempdir()?;
        let tag = format!("lambda_bench_{}", std::process::id());
        let (state, database) = match std::env::var("LAMBDA_TEST_POSTGRES") {
            Ok(server) => {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&server)
                    .await
                    .with_context(|| format!("LAMBDA_TEST_POSTGRES={server}"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {tag}")))
                    .execute(&mut conn)
                    .await?;
                let mut url = url::Url::parse(&server)?;
                url.set_path(&tag);
                (url.to_string(), Some((server, tag.clone())))
            }
            Err(_) => (
                format!("sqlite://{}", dir.path().join("state.db").display()),
                None,
            ),
        };
        let (lake, lake_options) = match std::env::var("LAMBDA_TEST_S3") {
            Ok(endpoint) => {
                let endpoint = endpoint.trim_end_matches('/').to_string();
                let bucket = tag.replace('_', "-");
                let resp = reqwest::Client::new()
                    .put(format!("{endpoint}/{bucket}"))
                    .send()
                    .await
                    .with_context(|| format!("LAMBDA_TEST_S3={endpoint}"))?;
                ensure!(
                    resp.status().is_success(),
                    "creating bucket {bucket}: {}",
                    resp.status()
                );
                let options = [
                    ("endpoint", endpoint.as_str()),
                    ("region", "us-east-1"),
                    ("allow_http", "true"),
                    ("access_key_id", "test"),
                    ("secret_access_key", "test"),
                ];
                (
                    format!("s3://{bucket}/lake"),
                    options
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            }
            Err(_) => (
                format!("file://{}", dir.path().join("lake").display()),
                BTreeMap::new(),
            ),
        };
        let name = format!(
            "{} state, {} lake",
            if database.is_some() {
                "PostgreSQL"
            } else {
                "SQLite"
            },
            if lake_options.is_empty() {
                "local"
            } else {
                "S3"
            }
        );
        Ok(Backends {
            name,
            state,
            lake,
            lake_options,
            database,
            _dir: dir,
        })
    }

    /// Writes the project's lambda.yaml: these backends, then `more` (YAML).
    pub fn settings(&self, root: &Path, more: &str) -> anyhow::Result<()> {
        let mut yaml = format!("state: {}\nlake: {}\n", self.state, self.lake);
        if !self.lake_options.is_empty() {
            yaml.push_str("lake_options:\n");
            for (k, v) in &self.lake_options {
                yaml.push_str(&format!("  {k}: \"{v}\"\n"));
            }
        }
        yaml.push_str(more);
        Ok(std::fs::write(root.join("lambda.yaml"), yaml)?)
    }

    pub async fn drop(self) {
        if let Some((server, name)) = &self.database {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(server).await {
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await;
            }
        }
    }
}

/// A process group with a CPU quota (a cgroup), or the whole host.
pub struct Machine {
    /// The cgroup's directory, when confined.
    cgroup: Option<PathBuf>,
}

impl Machine {
    pub fn new(name: &str, cpus: Option<f64>) -> anyhow::Result<Machine> {
        let Some(cpus) = cpus else {
            return Ok(Machine { cgroup: None });
        };
        let name = format!("lambda-bench-{}-{name}", std::process::id());
        let period = 100_000u64;
        let quota = (cpus * period as f64).round() as u64;
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let made = if v2 {
            let dir = Path::new("/sys/fs/cgroup").join(&name);
            // The cpu controller must be on for the root's children (it usually is).
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu");
            std::fs::create_dir(&dir)
                .and_then(|()| std::fs::write(dir.join("cpu.max"), format!("{quota} {period}")))
                .map(|()| dir)
        } else {
            let dir = Path::new("/sys/fs/cgroup/cpu").join(&name);
            std::fs::create_dir(&dir)
                .and_then(|()| std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string()))
                .and_then(|()| std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()))
                .map(|()| dir)
        };
        match made {
            Ok(dir) => Ok(Machine { cgroup: Some(dir) }),
            Err(e) => bail!(
                "a CPU quota per machine needs a writable cgroup cpu controller (root): {e}; \
                 unset it to run every process on the whole host"
            ),
        }
    }

    /// `lambda-ctl ARGS… ROOT` started inside this machine.
    pub fn command(&self, args: &[&str], root: &Path) -> Command {
        let exe = env!("CARGO_BIN_EXE_lambda-ctl");
        let mut command = match &self.cgroup {
            // The shell joins the cgroup, then becomes lambda-ctl: every thread starts inside.
            Some(dir) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(r#"echo $$ > "$0" && exec "$@""#)
                    .arg(dir.join("cgroup.procs"))
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        command.args(args).arg(root);
        command
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(dir) = &self.cgroup {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The CPUs of each machine from the environment variable `name`: `None` when unset (every
/// process shares the host), else a positive number.
pub fn cpus_from_env(name: &str) -> anyhow::Result<Option<f64>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(
            v.parse::<f64>()
                .ok()
                .filter(|c| *c > 0.0)
                .with_context(|| format!("{name}={v}: not a positive number"))?,
        )),
        Err(_) => Ok(None),
    }
}
