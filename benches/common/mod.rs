//! What the benches share: a `lambda-ctl serve` child process on a project of one pipeline.

// Each bench binary compiles this module on its own and uses a part of it.
#![allow(dead_code)]

pub mod archive;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// `lambda-ctl serve` on 127.0.0.1:0, killed on drop (with its project directory).
pub struct Serve {
    child: Child,
    /// `http://ADDR` it serves on.
    pub base: String,
    /// `postgres://ADDR` of `serve.sql`, when `lambda.yaml` sets it.
    pub sql: Option<String>,
    /// When it printed its address line.
    pub started: Instant,
    dir: tempfile::TempDir,
}

impl Serve {
    /// Writes `pipelines/{name}.yaml` into a fresh project and starts `serve` on it with
    /// `RUST_LOG=rust_log`; returns once it listens.
    pub fn start(name: &str, pipeline_yaml: &str, rust_log: &str) -> Serve {
        Serve::start_with(name, pipeline_yaml, None, rust_log)
    }

    /// [`Serve::start`] with `lambda.yaml` (e.g. to turn `serve.sql` on).
    pub fn start_with(
        name: &str,
        pipeline_yaml: &str,
        lambda_yaml: Option<&str>,
        rust_log: &str,
    ) -> Serve {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(settings) = lambda_yaml {
            std::fs::write(dir.path().join("lambda.yaml"), settings).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        std::fs::write(
            dir.path().join(format!("pipelines/{name}.yaml")),
            pipeline_yaml,
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
            .args(["serve", "--listen", "127.0.0.1:0", "--project"])
            .arg(dir.path())
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lambda-ctl serve");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut sql = None;
        let base = loop {
            let line = lines.next().expect("serve exited").unwrap();
            if let Some(url) = line.strip_prefix("lambda-ctl SQL on ") {
                sql = Some(url.trim().to_string());
            }
            if let Some(url) = line.strip_prefix("lambda-ctl serving on ") {
                break url.to_string();
            }
        };
        let started = Instant::now();
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Serve {
            child,
            base,
            sql,
            started,
            dir,
        }
    }

    /// The project directory.
    pub fn project(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
