//! The lake on every backend CI runs: a local directory always, the S3 server when
//! `LAMBDA_TEST_S3` is set (an endpoint URL, e.g. moto's `http://127.0.0.1:5000`) and Azurite
//! when `LAMBDA_TEST_AZURE` is set (its blob endpoint, `http://127.0.0.1:10000/devstoreaccount1`).
//! Each test gets its own bucket or container; a set variable whose server is unreachable fails
//! the test. [`TestLake`] is shared with the lambda and scale-out tests, which run unchanged on
//! every lake.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use lambda_ctl::lake::{self, Lake, LakeError, ObjectInfo};
use object_store::ObjectStoreExt as _;

use crate::support::service;

/// Azurite's well-known development account.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// One lake to run a test on; its bucket or directory lives as long as the value.
pub struct TestLake {
    pub name: &'static str,
    pub url: String,
    pub options: BTreeMap<String, String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestLake {
    pub fn file() -> TestLake {
        let dir = tempfile::tempdir().unwrap();
        TestLake {
            name: "file",
            url: format!("file://{}", dir.path().join("lake").display()),
            options: BTreeMap::new(),
            _dir: Some(dir),
        }
    }

    /// A fresh bucket on the S3 server of `LAMBDA_TEST_S3`, if set (see [`service`]).
    pub async fn s3() -> Option<TestLake> {
        let endpoint = service("LAMBDA_TEST_S3")?;
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let bucket = unique("lake");
        let resp = reqwest::Client::new()
            .put(format!("{endpoint}/{bucket}"))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("LAMBDA_TEST_S3={endpoint} is set but the server is unreachable: {e}")
            });
        assert!(
            resp.status().is_success(),
            "creating bucket {bucket}: {}",
            resp.status()
        );
        Some(TestLake {
            name: "s3",
            url: format!("s3://{bucket}/team/lake"),
            options: s3_options(&endpoint),
            _dir: None,
        })
    }

    /// A fresh container on the Azurite of `LAMBDA_TEST_AZURE`, if set (see [`service`]).
    pub async fn azure() -> Option<TestLake> {
        let endpoint = service("LAMBDA_TEST_AZURE")?;
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let container = unique("lake");
        create_container(&endpoint, &container).await;
        Some(TestLake {
            name: "azure",
            url: format!("az://{container}/lake"),
            options: azure_options(&endpoint),
            _dir: None,
        })
    }

    /// Every lake this machine can test: file, then S3 and Azure when configured.
    pub async fn all() -> Vec<TestLake> {
        let mut out = vec![TestLake::file()];
        out.extend(TestLake::s3().await);
        out.extend(TestLake::azure().await);
        out
    }

    pub fn open(&self) -> Lake {
        Lake::open(&self.url, &self.options).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// The `lake:` and `lake_options:` lines of a lambda.yaml using this lake.
    pub fn yaml(&self) -> String {
        let mut out = format!("lake: {}\n", self.url);
        if !self.options.is_empty() {
            out.push_str("lake_options:\n");
            for (k, v) in &self.options {
                out.push_str(&format!("  {k}: \"{v}\"\n"));
            }
        }
        out
    }
}

fn unique(prefix: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = chrono::Utc::now().timestamp_subsec_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn s3_options(endpoint: &str) -> BTreeMap<String, String> {
    options(&[
        ("endpoint", endpoint),
        ("region", "us-east-1"),
        ("allow_http", "true"),
        ("access_key_id", "test"),
        ("secret_access_key", "test"),
        ("max_retries", "2"),
    ])
}

/// Azurite addressed as an ordinary account at an explicit endpoint (object_store's
/// `use_emulator` reads the endpoint from the process environment instead).
pub fn azure_options(endpoint: &str) -> BTreeMap<String, String> {
    options(&[
        ("account_name", AZURITE_ACCOUNT),
        ("access_key", AZURITE_KEY),
        ("endpoint", endpoint),
        ("allow_http", "true"),
        ("max_retries", "2"),
    ])
}

/// Creates a blob container (object_store cannot): one `PUT ?restype=container`, signed with
/// the account key (Shared Key authorization).
async fn create_container(endpoint: &str, container: &str) {
    let url = url::Url::parse(&format!("{endpoint}/{container}?restype=container")).unwrap();
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let version = "2021-08-06";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}{}\nrestype:container",
        url.path()
    );
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &STANDARD.decode(AZURITE_KEY).unwrap(),
    );
    let signature = STANDARD.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let resp = reqwest::Client::new()
        .put(url)
        .header("x-ms-date", date)
        .header("x-ms-version", version)
        .header("content-length", "0")
        .header(
            "authorization",
            format!("SharedKey {AZURITE_ACCOUNT}:{signature}"),
        )
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!("LAMBDA_TEST_AZURE={endpoint} is set but Azurite is unreachable: {e}")
        });
    let status = resp.status();
    assert!(
        status.is_success(),
        "creating container {container}: {status} {}",
        resp.text().await.unwrap_or_default()
    );
}

/// The behaviour every backend must show.
async fn round_trip(lake: &Lake) {
    let seg = lake::archive_path("clicks", 0, 0, 10);
    assert!(!lake.exists(&seg).await.expect("head"));
    assert!(matches!(
        lake.get(&seg).await,
        Err(LakeError::NotFound { .. })
    ));

    lake.put(&seg, b"first".to_vec()).await.expect("put");
    assert!(lake.exists(&seg).await.expect("head"));
    assert_eq!(lake.get(&seg).await.expect("get"), Bytes::from("first"));
    lake.put(&seg, b"second".to_vec()).await.expect("overwrite");
    assert_eq!(lake.get(&seg).await.expect("get"), Bytes::from("second"));

    // Create-if-absent is a compare-and-swap: exactly one of two racing writers wins.
    let once = lake::dead_letter_path("clicks", 1_700_000_000_000, "a");
    let (a, b) = tokio::join!(
        lake.put_if_absent(&once, b"a".to_vec()),
        lake.put_if_absent(&once, b"b".to_vec())
    );
    let (a, b) = (a.expect("create a"), b.expect("create b"));
    assert!(a ^ b, "exactly one writer creates the object ({a}, {b})");
    let winner = if a { "a" } else { "b" };
    assert!(
        !lake
            .put_if_absent(&once, b"c".to_vec())
            .await
            .expect("exists")
    );
    assert_eq!(lake.get(&once).await.expect("get"), Bytes::from(winner));

    lake.put(
        &lake::archive_path("clicks", 1, 0, 5),
        Bytes::from_static(b"12345"),
    )
    .await
    .expect("put");
    lake.put(
        &lake::archive_path("clicks2", 0, 0, 5),
        Bytes::from_static(b"x"),
    )
    .await
    .expect("put");
    let listed = lake
        .list(&lake::archive_prefix("clicks"))
        .await
        .expect("list");
    assert_eq!(
        listed,
        vec![
            ObjectInfo {
                path: seg.clone(),
                size: 6
            },
            ObjectInfo {
                path: lake::archive_path("clicks", 1, 0, 5),
                size: 5
            },
        ],
        "a prefix is a directory: clicks2 is not under clicks"
    );
    assert_eq!(lake.list("").await.expect("list all").len(), 4);
    assert!(lake.list("nothing/here/").await.expect("list").is_empty());

    // A copy is a second name for the bytes (a no-op batch run publishes its base's file so),
    // and stays when the first name is deleted.
    let copy = format!(
        "{}partials.parquet",
        lake::view_run_prefix("clicks", "v", 9)
    );
    lake.copy(&seg, &copy).await.expect("copy");
    lake.delete(&seg).await.expect("delete");
    assert!(!lake.exists(&seg).await.expect("head"));
    assert_eq!(lake.get(&copy).await.expect("get the copy").len(), 6);
    lake.delete(&copy).await.expect("delete the copy");
    lake.delete(&seg)
        .await
        .expect("deleting a missing object succeeds");

    // Larger than one 5 MiB part, written in pieces that do not align with parts.
    let big: Vec<u8> = (0..12_000_000u32).map(|i| (i % 251) as u8).collect();
    let path = format!(
        "{}part-0.parquet",
        lake::view_run_prefix("clicks", "page_views", 7)
    );
    let mut upload = lake.put_multipart(&path).await.expect("start upload");
    for chunk in big.chunks(1_000_003) {
        upload.write(chunk).await.expect("write");
    }
    assert!(
        !lake.exists(&path).await.expect("head"),
        "not visible before finish"
    );
    upload.finish().await.expect("finish");
    assert_eq!(
        lake.get(&path).await.expect("get"),
        Bytes::from(big.clone())
    );

    // A plain put of a large object (a big segment or view) goes multipart too.
    assert!(big.len() > lake::MULTIPART_THRESHOLD);
    let seg_big = lake::archive_path("clicks", 2, 0, 1_000_000);
    lake.put(&seg_big, big.clone()).await.expect("large put");
    assert_eq!(lake.get(&seg_big).await.expect("get"), Bytes::from(big));

    let aborted = "views/clicks/page_views/run=8/part-0.parquet";
    let mut upload = lake.put_multipart(aborted).await.expect("start upload");
    upload.write(b"partial").await.expect("write");
    upload.abort().await.expect("abort");
    assert!(!lake.exists(aborted).await.expect("head"));

    for bad in ["a//b", "a/../b"] {
        let err = lake.put(bad, Bytes::new()).await.expect_err("invalid path");
        assert!(matches!(err, LakeError::InvalidPath { .. }), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_behaves_the_same_on_every_backend() {
    let memory = Lake::open("memory://", &BTreeMap::new()).expect("opens");
    round_trip(&memory).await;
    let mut names = Vec::new();
    for test in TestLake::all().await {
        let lake = test.open();
        round_trip(&lake).await;
        assert_eq!(lake.root_url(), format!("{}/", test.url));
        names.push(test.name);
    }
    eprintln!("lake behaviour checked on memory, {}", names.join(", "));
}

#[tokio::test]
async fn file_lake_writes_real_files_under_its_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("project/.lambda/lake");
    let lake = Lake::open(&format!("file://{}", root.display()), &BTreeMap::new())
        .expect("opens and creates the directory");
    assert!(root.is_dir());
    round_trip(&lake).await;

    let seg = lake::archive_path("clicks", 1, 0, 5);
    let on_disk = root.join(&seg);
    assert_eq!(std::fs::read(&on_disk).expect("file exists"), b"12345");
    let url = url::Url::parse(&lake.url(&seg)).expect("a valid URL");
    assert_eq!(url.to_file_path().expect("a file URL"), on_disk);

    // The store handed to other layers is rooted at the lake, like every lake path.
    let meta = lake
        .store()
        .head(&object_store::path::Path::from(seg.as_str()))
        .await
        .expect("rooted store");
    assert_eq!(meta.size, 5);

    lake.delete(&seg).await.expect("delete");
    assert!(
        !root.join("archive/clicks/p=1").exists(),
        "deleting the last object removes its empty directory"
    );
}

/// A port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_store_that_stays_down_fails_each_operation_after_bounded_retries() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let mut s3 = s3_options(&endpoint);
    s3.insert("max_retries".into(), "2".into());
    s3.insert("retry_timeout".into(), "5s".into());
    let mut az = azure_options(&format!("{endpoint}/{AZURITE_ACCOUNT}"));
    az.insert("retry_timeout".into(), "5s".into());
    for (url, opts) in [("s3://down/lake", s3), ("az://down/lake", az)] {
        let lake = Lake::open(url, &opts).expect("opening contacts no server");
        let started = std::time::Instant::now();
        let err = lake
            .put("views/v/run=1/partials.parquet", b"x".to_vec())
            .await
            .expect_err("the store is down");
        assert!(matches!(err, LakeError::Store { op: "put", .. }), "{err}");
        let text = format!("{err}");
        assert!(text.contains("views/v/run=1/partials.parquet"), "{text}");
        let err = lake.list("archive/").await.expect_err("down");
        assert!(matches!(err, LakeError::Store { op: "list", .. }), "{err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{url}: retries are bounded ({:?})",
            started.elapsed()
        );
    }
}

/// A TCP proxy in front of `upstream` that answers the first `fail` connections with HTTP 503
/// (as an overloaded store does) and forwards every later one; returns its URL and the count
/// of connections it refused.
async fn flaky_proxy(upstream: &str, fail: usize) -> (String, std::sync::Arc<AtomicU32>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let refused = std::sync::Arc::new(AtomicU32::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            if (count.load(Ordering::SeqCst) as usize) < fail {
                count.fetch_add(1, Ordering::SeqCst);
                let mut head = [0u8; 1024];
                let _ = client.read(&mut head).await;
                let _ = client
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (url, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_store_errors_are_retried_with_backoff() {
    let Some(s3) = TestLake::s3().await else {
        return;
    };
    let endpoint = std::env::var("LAMBDA_TEST_S3").expect("set: the lake above is on it");
    let bucket_url = s3.url.clone();

    // Two refusals, three retries allowed: the writes succeed.
    let (proxy, refused) = flaky_proxy(&endpoint, 2).await;
    let mut options = s3_options(&proxy);
    options.insert("max_retries".into(), "3".into());
    let lake = Lake::open(&bucket_url, &options).unwrap();
    let started = std::time::Instant::now();
    lake.put("views/v/run=1/partials.parquet", b"ok".to_vec())
        .await
        .expect("retried past the 503s");
    assert_eq!(refused.load(Ordering::SeqCst), 2);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(100),
        "retries back off ({:?})",
        started.elapsed()
    );
    assert_eq!(
        s3.open()
            .get("views/v/run=1/partials.parquet")
            .await
            .unwrap(),
        Bytes::from("ok")
    );

    // More refusals than retries: the operation fails, saying why.
    let (proxy, refused) = flaky_proxy(&endpoint, 100).await;
    let lake = Lake::open(&bucket_url, &s3_options(&proxy)).unwrap();
    let err = lake
        .put("views/v/run=2/partials.parquet", b"no".to_vec())
        .await
        .expect_err("the store stays down");
    assert_eq!(refused.load(Ordering::SeqCst), 3, "1 try + max_retries 2");
    assert!(format!("{err:?}").contains("503"), "{err:?}");
    assert!(
        !s3.open()
            .exists("views/v/run=2/partials.parquet")
            .await
            .unwrap()
    );
}
