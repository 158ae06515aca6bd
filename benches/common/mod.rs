//! What the benches share: a `lambda-ctl serve` child process on a project of one pipeline.

// Each bench binary compiles this module on its own and uses a part of it.
#![allow(dead_code)]

pub mod archive;
pub mod cluster;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

    /// The CPU time (user + system, seconds) `serve` has used so far; from Linux's
    /// `/proc/PID/stat` (None elsewhere).
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.child.id())
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

/// Ack → visible on the view `clicks.total` (`n: count()`) of `server`: 200 requests of
/// `body(i)` at 10 per second; after each is acknowledged (200), the view is polled until its
/// count includes the request's accepted events. First waits until the count reaches
/// `backlog` (events sent before). The latencies in ms, sorted; each includes one query
/// round trip.
pub async fn ack_to_visible(
    server: &Serve,
    backlog: u64,
    mut body: impl FnMut(usize) -> String,
) -> Vec<f64> {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/pipelines/clicks/events", server.base);
    let view = format!("{}/v1/views/clicks/total", server.base);
    let count = |http: reqwest::Client, view: String| async move {
        let v: serde_json::Value = http.get(&view).send().await.unwrap().json().await.unwrap();
        v["rows"][0]["n"].as_u64().unwrap_or(0)
    };
    let mut seen = count(http.clone(), view.clone()).await;
    while seen < backlog {
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = count(http.clone(), view.clone()).await;
    }
    let mut lat = Vec::new();
    for i in 0..200 {
        let r = http
            .post(&url)
            .header("content-type", "application/x-ndjson")
            .body(body(i))
            .send()
            .await
            .unwrap();
        let acked = Instant::now();
        let accepted = r.json::<serde_json::Value>().await.unwrap()["accepted"]
            .as_u64()
            .unwrap();
        let target = seen + accepted;
        loop {
            let n = count(http.clone(), view.clone()).await;
            if n >= target {
                seen = n;
                break;
            }
        }
        lat.push(acked.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lat.sort_by(f64::total_cmp);
    lat
}

/// The `q` quantile of `sorted` (nearest rank below).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

/// The CPU time (user + system, seconds) process `pid` has used so far; from Linux's
/// `/proc/PID/stat` (None elsewhere).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command: state is field 3, utime 14 and stime 15, in ticks of
    // 1/100 s (USER_HZ).
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3)?.parse::<f64>().ok();
    Some((ticks(14)? + ticks(15)?) / 100.0)
}
