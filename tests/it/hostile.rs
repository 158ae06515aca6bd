//! What a server refuses from a web page on another origin, a DNS-rebinding page, a slow or
//! silent client, and times that overflow — through the real binary, over raw HTTP where the
//! exact bytes matter.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::orders::{NDJSON, project};
use crate::support::{Server, lambda_ctl, stderr, stdout};

const WORKFLOW: &str = "name: w\ntasks:\n  - name: t\n    command: [\"true\"]\n";

fn with_workflow(dir: &Path) {
    std::fs::create_dir_all(dir.join("workflows")).unwrap();
    std::fs::write(dir.join("workflows/w.yaml"), WORKFLOW).unwrap();
}

fn addr(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_string()
}

/// Sends `head` (request line and headers, without the blank line) and `body` on a new
/// connection with `Connection: close`; the answer's status and body.
fn send(addr: &str, head: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer to {head:?}: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

fn error_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| panic!("not a JSON error: {body:?}"))
}

const EVENT: &str = r#"{"id":"a1","ts":1763719200000,"user":"u","country":"DE","amount":1.0}"#;

#[test]
fn without_a_token_foreign_pages_cannot_post_or_read() {
    let dir = project();
    with_workflow(dir.path());
    let server = Server::start(dir.path());
    let a = addr(&server);
    let host = format!("Host: {a}");

    // CSRF: a page elsewhere starting a run (a form or `fetch` without a body).
    for extra in [
        "Origin: http://evil.example",
        "Origin: null",
        "Origin: http://127.0.0.1:1",
        "Sec-Fetch-Site: cross-site",
    ] {
        let (status, body) = send(
            &a,
            &format!("POST /v1/workflows/w/runs HTTP/1.1\r\n{host}\r\n{extra}"),
            "",
        );
        assert_eq!(status, 403, "{extra}: {body}");
        assert!(error_of(&body).contains("refused"), "{body}");
    }
    // ... or sending a body a form can send.
    let (status, body) = send(
        &a,
        &format!("POST /v1/workflows/w/runs HTTP/1.1\r\n{host}\r\nContent-Type: text/plain"),
        "x",
    );
    assert_eq!(status, 415, "{body}");
    for ct in [
        "Content-Type: application/x-www-form-urlencoded",
        "Content-Type: text/plain",
        "Content-Type: multipart/form-data; boundary=x",
        "X-No-Content-Type: 1",
    ] {
        let (status, body) = send(
            &a,
            &format!("POST /v1/pipelines/orders/events HTTP/1.1\r\n{host}\r\n{ct}"),
            EVENT,
        );
        assert_eq!(status, 415, "{ct}: {body}");
        assert!(error_of(&body).contains("application/x-ndjson"), "{body}");
    }
    // DNS rebinding: the page's own name as Host, for reads as well.
    for path in ["/v1/pipelines", "/metrics", "/"] {
        let (status, body) = send(
            &a,
            &format!("GET {path} HTTP/1.1\r\nHost: evil.example"),
            "",
        );
        assert_eq!(status, 403, "{path}: {body}");
        assert!(error_of(&body).contains("serve.token"), "{body}");
    }

    // What scripts, lambda-ctl and the dashboard send still works.
    let port = a.rsplit(':').next().unwrap();
    for h in [
        host.clone(),
        format!("Host: localhost:{port}"),
        format!("Host: [::1]:{port}"),
    ] {
        let (status, body) = send(&a, &format!("GET /v1/pipelines HTTP/1.1\r\n{h}"), "");
        assert_eq!(status, 200, "{h}: {body}");
    }
    let (status, body) = send(
        &a,
        &format!("POST /v1/workflows/w/runs HTTP/1.1\r\n{host}"),
        "",
    );
    assert_eq!(status, 201, "{body}");
    let same_origin = format!("Origin: http://{a}\r\nSec-Fetch-Site: same-origin");
    let (status, body) = send(
        &a,
        &format!("POST /v1/workflows/w/runs HTTP/1.1\r\n{host}\r\n{same_origin}"),
        "",
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = send(
        &a,
        &format!("POST /v1/workflows/w/runs HTTP/1.1\r\n{host}\r\nContent-Type: application/json"),
        "{}",
    );
    assert_eq!(status, 201, "{body}");
    for ct in ["application/x-ndjson", "application/json; charset=utf-8"] {
        let (status, body) = send(
            &a,
            &format!("POST /v1/pipelines/orders/events HTTP/1.1\r\n{host}\r\nContent-Type: {ct}"),
            EVENT,
        );
        assert_eq!(status, 200, "{ct}: {body}");
    }
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, format!("{EVENT}\n")).unwrap();
    let o = lambda_ctl(&[
        "ingest",
        "orders",
        file.to_str().unwrap(),
        "--server",
        &server.base,
        "--project",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("duplicates 1"), "{}", stdout(&o));
}

#[test]
fn with_a_token_any_host_and_the_bearer_scheme_in_any_case() {
    let dir = project();
    std::fs::write(dir.path().join("lambda.yaml"), "serve:\n  token: t0ken\n").unwrap();
    let server = Server::start(dir.path());
    let a = addr(&server);
    for auth in ["Bearer t0ken", "bearer t0ken", "BEARER  t0ken"] {
        let (status, body) = send(
            &a,
            &format!(
                "GET /v1/pipelines HTTP/1.1\r\nHost: lambda.internal:8080\r\nAuthorization: {auth}"
            ),
            "",
        );
        assert_eq!(status, 200, "{auth}: {body}");
    }
    // A foreign origin is refused even with the token.
    let (status, _) = send(
        &a,
        &format!(
            "POST /v1/pipelines/orders/events HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer t0ken\r\nOrigin: http://evil.example\r\nContent-Type: {NDJSON}"
        ),
        EVENT,
    );
    assert_eq!(status, 403);
}

#[test]
fn an_empty_token_is_an_error_and_an_unset_optional_one_means_none() {
    let dir = project();
    let d = dir.path().to_str().unwrap();
    for (yaml, message) in [
        (
            "serve:\n  token: \"\"\n",
            "lambda.yaml:2:10: `token` is empty",
        ),
        (
            "serve:\n  token: \"  \"\n",
            "lambda.yaml:2:10: `token` is empty",
        ),
        (
            "serve:\n  token: \" x\"\n",
            "`token` starts or ends with whitespace",
        ),
    ] {
        std::fs::write(dir.path().join("lambda.yaml"), yaml).unwrap();
        let o = lambda_ctl(&["validate", "--project", d]);
        assert_eq!(o.status.code(), Some(1), "{yaml}");
        assert!(stderr(&o).contains(message), "{yaml}: {}", stderr(&o));
    }
    std::fs::write(
        dir.path().join("lambda.yaml"),
        "serve:\n  token: ${LAMBDA_TEST_UNSET_TOKEN:-}\n",
    )
    .unwrap();
    let o = lambda_ctl(&["validate", "--project", d]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn serving_beyond_loopback_without_a_token_warns() {
    use std::io::BufRead;
    let dir = project();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
        .args(["serve", "--listen", "0.0.0.0:0", "--project"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let serving = out
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("serving on"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(serving, "serve did not start");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("listening beyond loopback without `serve.token`"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_times_that_overflow_are_refused() {
    let dir = project();
    let server = Server::start(dir.path());
    let client = reqwest::Client::new();
    for q in [
        "to=%2B9223372036854775807ms",
        "from=%2B106751991167d",
        "from=-106751991167d",
        "to=99999999999999999999",
    ] {
        let r = client
            .get(server.url(&format!("/v1/views/orders/by_country?{q}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
        let e: Value = r.json().await.unwrap();
        assert!(
            e["error"].as_str().unwrap().contains("out of range"),
            "{q}: {e}"
        );
    }
    let d = dir.path().to_str().unwrap();
    for (flag, t) in [("--from", "+106751991167d"), ("--to", "-106751991167d")] {
        let o = lambda_ctl(&[
            "query",
            "orders.by_country",
            flag,
            t,
            "--server",
            &server.base,
            "--project",
            d,
        ]);
        assert_eq!(o.status.code(), Some(1), "{t}: {}", stderr(&o));
        assert!(stderr(&o).contains("out of range"), "{}", stderr(&o));
    }
}

/// Opens a connection to `addr` and sends `bytes`.
fn open(addr: &str, bytes: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes.as_bytes()).unwrap();
    s
}

/// Whether the server closed `s` within `within` (EOF, or a reset), reading any answer.
fn closed_within(s: &mut TcpStream, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            // Reset by the server.
            Err(_) => return Some(String::from_utf8_lossy(&got).into_owned()),
        }
    }
}

/// Silent, half-sent and idle kept-alive connections are closed after the header timeout
/// (10 s); uploads that stall hold a request slot only until the body timeout (30 s); while
/// every slot (256) is held, other requests wait and get 503, but `/healthz` answers.
#[test]
fn silent_slow_and_idle_clients_are_cut_off() {
    let dir = project();
    // 256 refusals are logged: into a file, not the test output.
    let server = Server::start_logging(dir.path(), &dir.path().join("serve.log"));
    let a = addr(&server);
    let host = format!("Host: {a}");

    let stalled: Vec<TcpStream> = (0..256)
        .map(|_| {
            open(
                &a,
                &format!(
                    "POST /v1/pipelines/orders/events HTTP/1.1\r\n{host}\r\nContent-Type: {NDJSON}\r\nContent-Length: 1000\r\n\r\n{{\"id\":"
                ),
            )
        })
        .collect();
    let mut silent: Vec<TcpStream> = (0..100).map(|_| open(&a, "")).collect();
    let mut half: Vec<TcpStream> = (0..100)
        .map(|_| open(&a, &format!("GET /healthz HTTP/1.1\r\n{host}\r\nX-")))
        .collect();
    let mut idle = open(&a, &format!("GET /healthz HTTP/1.1\r\n{host}\r\n\r\n"));
    let started = Instant::now();

    // Every request slot is held by a stalled upload: /healthz still answers, the rest waits.
    std::thread::sleep(Duration::from_millis(500));
    let (status, _) = send(&a, &format!("GET /healthz HTTP/1.1\r\n{host}"), "");
    assert_eq!(status, 200);
    let (status, body) = send(&a, &format!("GET /v1/pipelines HTTP/1.1\r\n{host}"), "");
    assert_eq!(status, 503, "{body}");
    assert!(error_of(&body).contains("busy"), "{body}");

    let cut = Duration::from_secs(15);
    let answer = closed_within(&mut idle, cut).expect("an idle kept-alive connection is closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for s in silent.iter_mut().chain(half.iter_mut()) {
        let left = cut.saturating_sub(started.elapsed());
        assert!(
            closed_within(s, left).is_some(),
            "a connection without a complete request head is open after {cut:?}"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "closed too early"
    );

    let body_cut = Duration::from_secs(40);
    for mut s in stalled {
        let left = body_cut.saturating_sub(started.elapsed());
        let answer = closed_within(&mut s, left).expect("a stalled upload is cut off");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("not received in time"), "{answer}");
    }
    let (status, body) = send(&a, &format!("GET /v1/pipelines HTTP/1.1\r\n{host}"), "");
    assert_eq!(status, 200, "{body}");
}
