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

/// GET `url`, the answer as JSON (whatever its status: callers check the fields).
pub async fn get_json(client: &reqwest::Client, url: String) -> serde_json::Value {
    client
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// POSTs `body` as `content_type` to the events endpoint `url`; the answer, which must be 200.
pub async fn post_events(
    client: &reqwest::Client,
    url: String,
    content_type: &str,
    body: String,
) -> serde_json::Value {
    let r = client
        .post(&url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    assert_eq!(r.status(), 200, "POST {url}");
    r.json()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: not JSON: {e}"))
}

/// A `lambda-ctl serve` child process on a free port, killed (SIGKILL) on drop.
pub struct Server {
    pub child: std::process::Child,
    pub base: String,
}

impl Server {
    /// Starts `serve` on 127.0.0.1:0 for `project` and waits for its address line.
    pub fn start(project: &Path) -> Server {
        Server::spawn(project, &[], &[], std::process::Stdio::inherit())
    }

    /// Like `start`, with extra environment variables (for `${VAR}` in the project's YAML);
    /// only the Kafka tests (default feature `kafka`) use it.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub fn start_with_env(project: &Path, env: &[(&str, &str)]) -> Server {
        Server::spawn(project, &[], env, std::process::Stdio::inherit())
    }

    /// As [`Server::start`], as node `node` of a cluster (`serve --node`); only the Kafka
    /// tests (default feature `kafka`) use it.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub fn start_node(project: &Path, node: &str) -> Server {
        let args = ["--node", node];
        Server::spawn(project, &args, &[], std::process::Stdio::inherit())
    }

    /// As [`Server::start`], with debug logs (JSON lines) written to `log`.
    pub fn start_logging(project: &Path, log: &Path) -> Server {
        let file = std::fs::File::create(log).expect("create the log file");
        let args = ["--log-format", "json"];
        Server::spawn(project, &args, &[], file.into())
    }

    fn spawn(
        project: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: std::process::Stdio,
    ) -> Server {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
            .args(["serve", "--listen", "127.0.0.1:0", "--project"])
            .arg(project)
            .args(args)
            .env(
                "RUST_LOG",
                if args.contains(&"json") {
                    "debug"
                } else {
                    "warn"
                },
            )
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start lambda-ctl serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("lambda-ctl serving on ") {
                        break url.trim().to_string();
                    }
                }
                _ => {
                    let status = child.wait().expect("wait");
                    panic!("lambda-ctl serve exited before listening: {status}");
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET /metrics`, the exposition text.
    pub async fn metrics(&self, client: &reqwest::Client) -> String {
        let url = self.url("/metrics");
        client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// SIGTERM, then waits for the process to exit (its graceful shutdown).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        self.child.wait().expect("wait for serve")
    }

    /// SIGKILL: no shutdown path runs, as in a crash.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random numbers for generated test data (SplitMix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A TCP proxy on 127.0.0.1 in front of a broker, to cut a client's connections without
/// restarting the (shared) broker: `cut` closes every open connection and refuses new ones
/// for a while, then the proxy accepts again.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    inner: std::sync::Arc<ProxyInner>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyInner {
    /// Cancelled by `cut`: every connection opened before it closes.
    generation: parking_lot::Mutex<tokio_util::sync::CancellationToken>,
    refuse_until: parking_lot::Mutex<Option<tokio::time::Instant>>,
    accepted: std::sync::atomic::AtomicUsize,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `upstream` (`host:port`).
    /// Upstream connections are opened per client connection, so `upstream` may start later.
    pub async fn start(upstream: &str) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = upstream.to_string();
        let addr = listener.local_addr().unwrap();
        let inner = std::sync::Arc::new(ProxyInner {
            generation: parking_lot::Mutex::new(tokio_util::sync::CancellationToken::new()),
            refuse_until: parking_lot::Mutex::new(None),
            accepted: std::sync::atomic::AtomicUsize::new(0),
        });
        let state = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let refusing = state
                    .refuse_until
                    .lock()
                    .is_some_and(|t| tokio::time::Instant::now() < t);
                if refusing {
                    drop(client);
                    continue;
                }
                state.accepted.fetch_add(1, Ordering::Relaxed);
                let cut = state.generation.lock().clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Proxy { addr, inner, task }
    }

    /// Connections accepted (and forwarded) so far.
    pub fn accepted(&self) -> usize {
        self.inner
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes every open connection and refuses new ones for `refuse`.
    pub fn cut(&self, refuse: std::time::Duration) {
        *self.inner.refuse_until.lock() = Some(tokio::time::Instant::now() + refuse);
        let old = std::mem::take(&mut *self.inner.generation.lock());
        old.cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.inner.generation.lock().cancel();
    }
}

/// The value of the service variable `var` (a `LAMBDA_TEST_*` URL or path). Unset or empty:
/// `None` — the caller skips its test — except under CI (`CI` set), where every service is
/// provided and a missing one must fail the test, not let it pass without running.
pub fn service(var: &str) -> Option<String> {
    let value = std::env::var(var).ok().filter(|v| !v.is_empty());
    if value.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{var} is not set, and CI is: this service-backed test must run there (see .ci/run)"
        );
        eprintln!("skipping: {var} is not set (see the README's Development section)");
    }
    value
}

/// Polls `probe` every 20 ms until it answers `Some`, and returns that; panics with `what` once
/// `within` has passed.
pub async fn eventually<T, F, Fut>(what: &str, within: std::time::Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until `pipeline` of `server` holds no open segment (every event it absorbed is in a
/// sealed segment) and has sealed at least `at_least` segments; returns how many it sealed.
pub async fn wait_for_sealed(
    client: &reqwest::Client,
    server: &Server,
    pipeline: &str,
    at_least: u64,
) -> u64 {
    let what = format!("{pipeline}: open segment sealed, {at_least} segment(s) sealed");
    eventually(&what, std::time::Duration::from_secs(20), || async move {
        let all = get_json(client, server.url("/v1/pipelines")).await;
        let p = all["pipelines"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == pipeline)?
            .clone();
        let sealed = p["sealed_segments"].as_u64()?;
        (p["open_segment_rows"].as_u64() == Some(0) && sealed >= at_least).then_some(sealed)
    })
    .await
}
