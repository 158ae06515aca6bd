//! The `kafka` source against a Kafka-protocol broker (`LAMBDA_TEST_KAFKA`, `host:port`; CI
//! runs tansu). The connection-cut test starts its own tansu (`LAMBDA_TEST_TANSU`, the path
//! of the binary) so the broker can advertise the proxy's address: Kafka clients connect to
//! the advertised address, not the bootstrap one.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

use super::{
    Broker, FIRST, TOTAL, event, exactly_once_across_connection_cut, exactly_once_across_kill9,
    exactly_once_across_kill9_in, project, unique, wait_for_exactly,
};
use crate::support::{Proxy, Server, get_json, repo, service};

/// Partitions of every test topic: events spread over them by device.
pub const KAFKA_PARTITIONS: i32 = 2;

fn config(url: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", url);
    c
}

pub async fn create_topic(url: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = config(url).create().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let created = admin
            .create_topics(
                &[NewTopic::new(
                    topic,
                    KAFKA_PARTITIONS,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await;
        match created.as_deref() {
            Ok([Ok(_)]) => return,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "creating topic {topic} on {url}: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

pub async fn delete_topic(url: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = config(url).create().unwrap();
    // Best effort: the test topics are unique, a leftover costs nothing but space.
    let _ = admin.delete_topics(&[topic], &AdminOptions::new()).await;
}

pub async fn publish(url: &str, topic: &str, range: std::ops::Range<usize>) {
    produce(url, topic, range.map(|i| (format!("d{}", i % 5), event(i)))).await;
}

/// Produces `(key, payload)` records, each confirmed by the broker before this returns.
async fn produce(url: &str, topic: &str, records: impl Iterator<Item = (String, String)>) {
    let producer: FutureProducer = config(url)
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
    let sends = records.map(|(key, payload)| {
        let producer = &producer;
        async move {
            producer
                .send(
                    FutureRecord::to(topic).payload(&payload).key(&key),
                    Duration::from_secs(60),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("the broker confirmed the publish");
        }
    });
    futures::future::join_all(sends).await;
}

/// Offsets the group `group` committed on `topic`, summed over partitions.
fn committed(url: &str, group: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = config(url).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..KAFKA_PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(n) => n,
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_counts_every_event_once_across_kill9() {
    let Some(url) = service("LAMBDA_TEST_KAFKA") else {
        return;
    };
    exactly_once_across_kill9(Broker::Kafka {
        url,
        topic: unique("lt"),
    })
    .await;
}

/// In two pipeline partitions, each Kafka partition feeds its own (k mod 2): both archive
/// segments, and each commits its Kafka partition's offsets once its own segments are sealed —
/// every message's offset is committed in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_partitions_feed_pipeline_partitions_and_commit_each_when_sealed() {
    let Some(url) = service("LAMBDA_TEST_KAFKA") else {
        return;
    };
    let topic = unique("lt");
    let broker = Broker::Kafka {
        url: url.clone(),
        topic: topic.clone(),
    };
    let (_dir, server, broker) = exactly_once_across_kill9_in(broker, 2).await;
    let client = reqwest::Client::new();
    let start = Instant::now();
    loop {
        let v = get_json(&client, server.url("/v1/pipelines")).await;
        let parts = v["pipelines"][0]["partitions"].as_array().unwrap().clone();
        assert_eq!(parts.len(), 2, "{parts:?}");
        let sealed: Vec<u64> = parts
            .iter()
            .map(|p| p["sealed_end"].as_u64().unwrap())
            .collect();
        let committed = {
            let (url, topic) = (url.clone(), topic.clone());
            tokio::task::spawn_blocking(move || committed(&url, &topic, &topic))
                .await
                .unwrap()
        };
        if sealed.iter().all(|s| *s > 0) && committed == TOTAL as i64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "after 30 s: {committed} of {TOTAL} offsets committed, sealed {sealed:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    server.kill9();
    broker.remove().await;
}

/// A tansu broker of this test's own, advertising `advertised` (`host:port`).
struct Tansu(Child);

impl Tansu {
    fn start(bin: &str, listen: u16, advertised: &str) -> Tansu {
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{listen}"),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting tansu ({bin}): {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {listen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Tansu(child)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_reconnects_after_a_connection_cut() {
    let Some(bin) = service("LAMBDA_TEST_TANSU") else {
        return;
    };
    let listen = free_port();
    let proxy = Proxy::start(&format!("127.0.0.1:{listen}")).await;
    let _tansu = Tansu::start(&bin, listen, &proxy.addr.to_string());
    // Bootstrapping at the broker itself still leads every client to the advertised proxy.
    let broker = Broker::Kafka {
        url: format!("127.0.0.1:{listen}"),
        topic: unique("lt"),
    };
    exactly_once_across_connection_cut(broker, proxy).await;
}

/// The group's committed offsets never run ahead of the sealed segments: with an open segment
/// that will not seal (1 h), exactly the sealed events are committed; the lag reaches 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_commits_only_offsets_of_sealed_segments() {
    let Some(url) = service("LAMBDA_TEST_KAFKA") else {
        return;
    };
    let topic = unique("lt");
    let broker = Broker::Kafka {
        url: url.clone(),
        topic: topic.clone(),
    };
    let dir = project(&broker);
    let yaml_path = dir.path().join("pipelines/readings.yaml");
    let yaml = std::fs::read_to_string(&yaml_path).unwrap().replace(
        "archive:\n  segment_age: 1s\n",
        "archive:\n  segment_rows: 100\n  segment_age: 1h\n",
    );
    std::fs::write(&yaml_path, yaml).unwrap();
    let client = reqwest::Client::new();
    broker.prepare().await;

    // One batch of FIRST (>= segment_rows) seals; the 50 after it stay in the open segment.
    broker.publish(0..FIRST).await;
    let server = Server::start(dir.path());
    wait_for_exactly(&client, &server, FIRST).await;
    broker.publish(FIRST..FIRST + 50).await;
    wait_for_exactly(&client, &server, FIRST + 50).await;

    let status = |v: &Value| v["pipelines"][0].clone();
    let start = Instant::now();
    loop {
        let v: Value = client
            .get(server.url("/v1/pipelines"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let p = status(&v);
        let open = p["open_segment_rows"].as_u64().unwrap();
        let sealed = (FIRST + 50) as i64 - open as i64;
        let committed = {
            let (url, topic) = (url.clone(), topic.clone());
            tokio::task::spawn_blocking(move || committed(&url, &topic, &topic))
                .await
                .unwrap()
        };
        assert!(
            committed <= sealed,
            "committed {committed} offsets but only {sealed} events are sealed"
        );
        // Measured every 5 s, per assigned partition; empty before the first assignment.
        let lag = p["lag"].as_object().cloned().unwrap_or_default();
        let behind: u64 = lag.values().filter_map(Value::as_u64).sum();
        if open > 0
            && committed == sealed
            && sealed > 0
            && lag.len() == KAFKA_PARTITIONS as usize
            && behind == 0
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "after 30 s: {committed} committed, {sealed} sealed, {open} open, lag {}",
            p["lag"]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    server.kill9();
    broker.remove().await;
}

/// examples/clickstream-kafka runs as shipped against the test broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickstream_kafka_example_counts_published_clicks() {
    let Some(url) = service("LAMBDA_TEST_KAFKA") else {
        return;
    };
    let topic = unique("clicks");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("examples/clickstream-kafka"), dir.path());
    create_topic(&url, &topic).await;

    const COUNTRIES: [&str; 3] = ["DE", "FR", "US"];
    let n = 500;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let clicks = (0..n).map(|i| {
        let click = serde_json::json!({
            "click_id": format!("c{i}"),
            "ts": now_ms - 1000 + i as i64,
            "session_id": format!("s{}", i % 40),
            "user_id": format!("u{}", i % 25),
            "page": format!("/products/{}", i % 7),
            "referrer": "https://search.example/",
            "country": COUNTRIES[i % 3],
            "latency_ms": 20.0 + (i % 50) as f64,
        });
        (format!("s{}", i % 40), click.to_string())
    });
    produce(&url, &topic, clicks).await;

    let server = Server::start_with_env(
        dir.path(),
        // A group of its own: a killed run's member would hold up the group's next rebalance.
        &[
            ("KAFKA_BROKERS", url.as_str()),
            ("CLICKS_TOPIC", &topic),
            ("CLICKS_GROUP", &topic),
        ],
    );
    let client = reqwest::Client::new();
    let start = Instant::now();
    loop {
        let v: Value = client
            .get(server.url("/v1/views/clicks/per_country"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let rows = v["rows"].as_array().unwrap();
        let total: u64 = rows.iter().filter_map(|r| r["clicks"].as_u64()).sum();
        assert!(total <= n as u64, "counted {total} of {n} clicks");
        if total == n as u64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{total} of {n} clicks counted after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.kill9();
    delete_topic(&url, &topic).await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Creates `topic` with `partitions` partitions.
async fn create_topic_with(url: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = config(url).create().unwrap();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let created = admin
        .create_topics(
            &[new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await;
    assert!(
        matches!(created.as_deref(), Ok([Ok(_)])),
        "creating topic {topic} on {url}: {created:?}"
    );
}

/// Events `range` published to the JetStream stream `stream`, event i on subject
/// `{stream}.{i mod 3}` (the pipeline partition it belongs to), with a copy of every tenth one
/// (same subject) and a malformed message.
async fn publish_nats_with_copies(url: &str, stream: &str, range: std::ops::Range<usize>) {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: stream.to_string(),
        subjects: vec![format!("{stream}.*")],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut acks = Vec::new();
    let messages = range
        .clone()
        .chain(range.clone().step_by(10))
        .map(|i| (i % 3, event(i)))
        .chain(std::iter::once((range.start % 3, "not json".to_string())));
    for (partition, payload) in messages {
        let ack = js
            .publish(format!("{stream}.{partition}"), payload.into())
            .await
            .unwrap();
        acks.push(ack);
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Events `range` keyed by their id (spread over every Kafka partition), with a copy of every
/// tenth one (same key: the same partition, after its first copy) and a malformed message.
async fn publish_with_copies(url: &str, topic: &str, range: std::ops::Range<usize>) {
    let mut records: Vec<(String, String)> =
        range.clone().map(|i| (format!("e{i}"), event(i))).collect();
    produce(url, topic, records.drain(..)).await;
    let copies = range
        .clone()
        .step_by(10)
        .map(|i| (format!("e{i}"), event(i)));
    let bad = std::iter::once((
        format!("bad{}", range.start),
        format!("not json {}", range.start),
    ));
    produce(url, topic, copies.chain(bad)).await;
}

/// `(count, sum of values)` of `pipeline`'s `overall` view on `server`.
async fn overall(client: &reqwest::Client, server: &Server, pipeline: &str) -> (u64, f64) {
    let v = get_json(client, server.url(&format!("/v1/views/{pipeline}/overall"))).await;
    let row = &v["rows"][0];
    (
        row["n"].as_u64().unwrap_or(0),
        row["total"].as_f64().unwrap_or(0.0),
    )
}

/// Waits until every server in `servers` answers exactly events `0..n` of `pipeline` — no
/// more, ever.
async fn all_answer_exactly(
    client: &reqwest::Client,
    servers: &[&Server],
    pipeline: &str,
    n: usize,
    within: Duration,
) {
    let expected = (n * (n - 1) / 2) as f64;
    let start = Instant::now();
    for server in servers {
        loop {
            let (got, total) = overall(client, server, pipeline).await;
            assert!(
                got <= n as u64,
                "{}: {pipeline} counted {got} events, only {n} were published",
                server.url("")
            );
            if got == n as u64 {
                assert_eq!(
                    total,
                    expected,
                    "{}: {pipeline}: every event counted once",
                    server.url("")
                );
                break;
            }
            assert!(
                start.elapsed() < within,
                "{}: {pipeline}: only {got} of {n} events counted after {within:?}",
                server.url("")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Events `range` POSTed to `server`'s buffered http pipeline `pipeline`, with a copy of every
/// tenth one and a malformed line: each request acknowledged once the broker has it.
async fn post_events(
    client: &reqwest::Client,
    server: &Server,
    pipeline: &str,
    range: std::ops::Range<usize>,
) {
    for chunk in range.collect::<Vec<_>>().chunks(50) {
        let mut lines: Vec<String> = chunk.iter().map(|i| event(*i)).collect();
        lines.extend(chunk.iter().step_by(10).map(|i| event(*i)));
        lines.push("not json".to_string());
        let resp = client
            .post(server.url(&format!("/v1/pipelines/{pipeline}/events")))
            .header("content-type", "application/x-ndjson")
            .body(lines.join("\n"))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "POST: {}", resp.status());
        let report: Value = resp.json().await.unwrap();
        assert_eq!(report["rejected"], 1, "{report}");
        assert_eq!(report["accepted"], lines.len() as u64 - 1, "{report}");
    }
}

/// The partitions of `readings` that `server` runs (holds the lease of).
async fn running(client: &reqwest::Client, server: &Server) -> Vec<u64> {
    let v = get_json(client, server.url("/v1/pipelines")).await;
    let readings = v["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "readings")
        .unwrap()
        .clone();
    readings["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["running"].as_bool() == Some(true))
        .map(|p| p["partition"].as_u64().unwrap())
        .collect()
}

/// A pipeline of the node test: `name`, `source` (its YAML lines), the events' schema keyed by
/// `id`, 3 partitions, segments sealed at `segment_rows` events (else when handed over), the
/// `overall` view (count, sum) and `more_views` (YAML list items).
fn node_pipeline(name: &str, source: &str, segment_rows: Option<u32>, more_views: &str) -> String {
    let rows = segment_rows
        .map(|n| format!("  segment_rows: {n}\n"))
        .unwrap_or_default();
    format!(
        "name: {name}\n{source}schema:\n  id: string\n  ts: timestamp\n  device: string\n  value: float\nevent_time: ts\nevent_id: id\npartitions: 3\narchive:\n  segment_age: 1h\n{rows}views:\n  - name: overall\n    window: all\n    metrics:\n      n: count()\n      total: sum(value)\n{more_views}"
    )
}

/// Three `serve --node` processes on one state DB (PostgreSQL when `LAMBDA_TEST_POSTGRES` is
/// set) and one lake (the S3 server when `LAMBDA_TEST_S3` is set) share a pipeline's three
/// partitions, fed by six Kafka partitions, with copies and malformed messages among the
/// events; an http pipeline buffered in Kafka; with `LAMBDA_TEST_NATS`, the same on JetStream
/// (a nats source whose subject names the partition, an http pipeline buffered in a stream).
/// Segments are sealed by size (40 events) or when a partition is handed over
/// (`segment_age: 1h`), so a node's answers hold the others' fresh events through its mirror
/// of their open segments. Two nodes split the partitions; one is killed with -9 mid-stream and its
/// partitions move to the other and to a node that joins; a batch run publishes in the
/// middle. Every surviving node then answers exactly the events published — none lost, none
/// counted twice — and the partitions are each run by exactly one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_nodes_share_partitions_and_take_over_a_killed_one() {
    let Some(url) = service("LAMBDA_TEST_KAFKA") else {
        return;
    };
    let db = match service("LAMBDA_TEST_POSTGRES") {
        Some(server) => Some(crate::state::TempDatabase::create(&server).await),
        None => None,
    };
    let lake = match crate::lakes::TestLake::s3().await {
        Some(lake) => lake,
        None => crate::lakes::TestLake::file(),
    };
    let topic = unique("lt");
    create_topic_with(&url, &topic, 6).await;
    let buffer = unique("lt");
    create_topic_with(&url, &buffer, 3).await;
    // The JetStream leg (when `LAMBDA_TEST_NATS` is set) beside the Kafka one: `sensors`, a nats
    // source whose subject names the partition, and `taps`, an http pipeline buffered in a
    // stream.
    let nats = service("LAMBDA_TEST_NATS");
    let (sensors, taps) = (unique("ns"), unique("nt"));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let state = db
        .as_ref()
        .map(|d| format!("state: {}\n", d.url))
        .unwrap_or_default();
    std::fs::write(root.join("lambda.yaml"), format!("{state}{}", lake.yaml())).unwrap();
    std::fs::create_dir_all(root.join("pipelines")).unwrap();
    let write = |name: &str, yaml: String| {
        std::fs::write(root.join(format!("pipelines/{name}.yaml")), yaml).unwrap()
    };
    let devices = "  - name: devices\n    group_by: [device]\n    window: 1m\n    metrics:\n      n: count()\n      users: approx_count_distinct(id)\n";
    let kafka = format!(
        "source:\n  type: kafka\n  brokers: \"{url}\"\n  topic: {topic}\n  group: {topic}\n"
    );
    write(
        "readings",
        node_pipeline("readings", &kafka, Some(40), devices),
    );
    // HTTP ingest on nodes: through a Kafka buffer.
    let buffered = format!(
        "source: {{type: http}}\nbuffer:\n  kafka: {{brokers: \"{url}\", topic: {buffer}}}\n"
    );
    write("clicks", node_pipeline("clicks", &buffered, None, ""));
    if let Some(nats) = &nats {
        let source = format!(
            "source:\n  type: nats\n  url: {nats}\n  stream: {sensors}\n  subject: \"{sensors}.{{partition}}\"\n"
        );
        write("sensors", node_pipeline("sensors", &source, Some(40), ""));
        let buffered = format!(
            "source: {{type: http}}\nbuffer:\n  nats: {{url: \"{nats}\", stream: {taps}}}\n"
        );
        write("taps", node_pipeline("taps", &buffered, None, ""));
    }
    let client = reqwest::Client::new();
    // The JetStream leg's events `range` of `sensors`, when it runs.
    let publish_sensors = async |range: std::ops::Range<usize>| {
        if let Some(nats) = &nats {
            publish_nats_with_copies(nats, &sensors, range).await;
        }
    };
    // Events `range` of `taps` posted to `server`, when the JetStream leg runs.
    let post_taps = async |server: &Server, range: std::ops::Range<usize>| {
        if nats.is_some() {
            post_events(&client, server, "taps", range).await;
        }
    };
    // Every server answers events `0..n` of the JetStream leg's `pipeline`, when it runs.
    let nats_answers = async |servers: &[&Server], pipeline: &str, n: usize, within: Duration| {
        if nats.is_some() {
            all_answer_exactly(&client, servers, pipeline, n, within).await;
        }
    };

    // First on one `serve` (no nodes), which consumes and commits what it sealed; its
    // successors, nodes, go on from there without reading the topic twice.
    publish_with_copies(&url, &topic, 0..200).await;
    publish_sensors(0..200).await;
    if let Some(nats) = &nats {
        // On a subject naming no partition: dead-lettered by the single `serve`, never read by
        // nodes — counted by neither.
        let js = async_nats::jetstream::new(async_nats::connect(nats.as_str()).await.unwrap());
        let stray = js.publish(format!("{sensors}.7"), event(9999).into());
        stray.await.unwrap().await.unwrap();
    }
    let single = Server::start(root);
    all_answer_exactly(
        &client,
        &[&single],
        "readings",
        200,
        Duration::from_secs(60),
    )
    .await;
    nats_answers(&[&single], "sensors", 200, Duration::from_secs(60)).await;
    assert!(single.terminate().success());
    publish_with_copies(&url, &topic, 200..300).await;
    publish_sensors(200..300).await;
    let a = Server::start_node(root, "a");
    let b = Server::start_node(root, "b");
    post_events(&client, &a, "clicks", 0..150).await;
    post_events(&client, &b, "clicks", 150..300).await;
    post_taps(&a, 0..150).await;
    post_taps(&b, 150..300).await;
    all_answer_exactly(&client, &[&a, &b], "readings", 300, Duration::from_secs(60)).await;
    nats_answers(&[&a, &b], "sensors", 300, Duration::from_secs(60)).await;
    nats_answers(&[&a, &b], "taps", 300, Duration::from_secs(30)).await;
    // The first node took every partition; once the second is seen, it hands one over.
    let started = Instant::now();
    loop {
        let (on_a, on_b) = (running(&client, &a).await, running(&client, &b).await);
        if on_a.len() + on_b.len() == 3 && !on_a.is_empty() && !on_b.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a runs {on_a:?}, b runs {on_b:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    all_answer_exactly(&client, &[&a, &b], "readings", 300, Duration::from_secs(30)).await;
    // The nodes went on where the single `serve` committed (it sealed segments of 40) or
    // recorded the stream sequence with its seals: they did not read its 200 events again
    // (those would be dropped as duplicates by the hundred).
    for pipeline in ["readings", "sensors"]
        .into_iter()
        .take(1 + nats.is_some() as usize)
    {
        let mut duplicates = 0;
        for server in [&a, &b] {
            let v = get_json(&client, server.url("/v1/pipelines")).await;
            let found = v["pipelines"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == pipeline);
            duplicates += found.unwrap()["duplicates"].as_u64().unwrap();
        }
        assert!(
            duplicates < 100,
            "the nodes read the single serve's {pipeline} events again: {duplicates} duplicates"
        );
    }

    const TOTAL: usize = 1500;
    let publisher = {
        let (url, topic) = (url.clone(), topic.clone());
        let (nats, sensors) = (nats.clone(), sensors.clone());
        tokio::spawn(async move {
            for start in (300..TOTAL).step_by(50) {
                publish_with_copies(&url, &topic, start..start + 50).await;
                if let Some(nats) = &nats {
                    publish_nats_with_copies(nats, &sensors, start..start + 50).await;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let started = Instant::now();
    loop {
        if overall(&client, &a, "readings").await.0 > 500 || publisher.is_finished() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill9();
    let killed = Instant::now();
    // Until its partitions move, b's answers name them stale (their owner does not answer).
    let stale = async |server: &Server| {
        let v = get_json(&client, server.url("/v1/views/readings/overall")).await;
        v["as_of"]["stale"].as_array().cloned().unwrap_or_default()
    };
    while stale(&b).await.is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "no stale partition on b after the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = Server::start_node(root, "c");
    // A batch run publishes while partitions move.
    let run = {
        let root = root.to_path_buf();
        tokio::task::spawn_blocking(move || {
            crate::support::lambda_ctl(&[
                "run",
                "readings",
                "--wait",
                "--project",
                root.to_str().unwrap(),
            ])
        })
    };
    post_events(&client, &b, "clicks", 300..450).await;
    post_events(&client, &c, "clicks", 450..600).await;
    post_taps(&b, 300..450).await;
    post_taps(&c, 450..600).await;
    publisher.await.unwrap();
    let out = run.await.unwrap();
    assert!(
        out.status.success(),
        "batch run: {}",
        crate::support::stdout(&out)
    );

    all_answer_exactly(
        &client,
        &[&b, &c],
        "readings",
        TOTAL,
        Duration::from_secs(90),
    )
    .await;
    nats_answers(&[&b, &c], "sensors", TOTAL, Duration::from_secs(60)).await;
    eprintln!(
        "every event counted once on b and c {:?} after the kill",
        killed.elapsed()
    );
    for server in [&b, &c] {
        let start = Instant::now();
        while !stale(server).await.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "stale partitions remain"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    all_answer_exactly(&client, &[&b, &c], "clicks", 600, Duration::from_secs(30)).await;
    nats_answers(&[&b, &c], "taps", 600, Duration::from_secs(30)).await;
    // Each partition run by exactly one live node.
    let (on_b, on_c) = (running(&client, &b).await, running(&client, &c).await);
    let mut all: Vec<u64> = on_b.iter().chain(&on_c).copied().collect();
    all.sort_unstable();
    assert_eq!(all, [0, 1, 2], "b runs {on_b:?}, c runs {on_c:?}");
    // Grouped views too: both nodes give the same answer, which counts every event.
    let devices = |s: &Server| get_json(&client, s.url("/v1/views/readings/devices"));
    let (vb, vc) = (devices(&b).await, devices(&c).await);
    assert_eq!(vb["rows"], vc["rows"]);
    let n: u64 = vb["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["n"].as_u64().unwrap())
        .sum();
    assert_eq!(n, TOTAL as u64);
    // `GET /v1/nodes` on any node lists the nodes, the live ones alive.
    let v = get_json(&client, b.url("/v1/nodes")).await;
    let alive: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["alive"] == true)
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert!(alive.contains(&"b") && alive.contains(&"c"), "{v}");
    // `status` lists the nodes and the partitions each holds.
    let out =
        crate::support::lambda_ctl(&["status", "--json", "--project", root.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    let mut held: Vec<String> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["name"] == "b" || n["name"] == "c")
        .flat_map(|n| n["partitions"].as_array().unwrap().clone())
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    held.sort();
    let mut pipelines = vec!["clicks", "readings"];
    if nats.is_some() {
        pipelines.extend(["sensors", "taps"]);
    }
    let every: Vec<String> = pipelines
        .iter()
        .flat_map(|p| (0..3).map(move |k| format!("{p}/p={k}")))
        .collect();
    assert_eq!(held, every, "{}", v["nodes"]);
    // A promote on b has c follow: a view added to `readings` is answered on both, by one
    // definition (so each still takes the other's open segments: nothing stale).
    let yaml = std::fs::read_to_string(root.join("pipelines/readings.yaml")).unwrap();
    let added = "  - name: per_device\n    group_by: [device]\n    window: all\n    metrics:\n      n: count()\n";
    std::fs::write(
        root.join("pipelines/readings.yaml"),
        format!("{yaml}{added}"),
    )
    .unwrap();
    let resp = client
        .post(b.url("/v1/pipelines/readings/promote"))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "promote: {}", resp.status());
    let promoted: Value = resp.json().await.unwrap();
    assert_eq!(
        promoted["nodes"],
        serde_json::json!({"c": "switched"}),
        "{promoted}"
    );
    // The open segments mirrored by the old definition are dropped at the switch (their
    // partitions stale meanwhile) and mirrored again by the new one.
    let per_device = |s: &Server| get_json(&client, s.url("/v1/views/readings/per_device"));
    let counted = |v: &Value| -> u64 {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["n"].as_u64().unwrap())
            .sum()
    };
    let started = Instant::now();
    let (vb, vc) = loop {
        let (vb, vc) = (per_device(&b).await, per_device(&c).await);
        for v in [&vb, &vc] {
            assert!(
                counted(v) == TOTAL as u64 || v["as_of"]["stale"].is_array(),
                "fewer events yet no stale partition named: {v}"
            );
        }
        if counted(&vb) == TOTAL as u64 && counted(&vc) == TOTAL as u64 {
            break (vb, vc);
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{vb} {vc}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(vb["rows"], vc["rows"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for server in [&b, &c] {
        assert!(stale(server).await.is_empty(), "stale after the promote");
    }
    // Time travel on a node, after more events came: each node answers as of the other's
    // instant (not an answer it cached) what was counted then — the events still in the open
    // segments of the partitions the other node runs read from that node's log.
    let publish_counted = |range: std::ops::Range<usize>| {
        let (client, url, topic, nodes) = (&client, &url, &topic, [&b, &c]);
        async move {
            publish_with_copies(url, topic, range.clone()).await;
            all_answer_exactly(
                client,
                &nodes,
                "readings",
                range.end,
                Duration::from_secs(30),
            )
            .await;
        }
    };
    publish_counted(TOTAL..TOTAL + 10).await;
    let mut before = Vec::new();
    for server in [&b, &c] {
        let live = get_json(&client, server.url("/v1/views/readings/overall")).await;
        assert_eq!(live["rows"][0]["n"].as_u64(), Some(TOTAL as u64 + 10));
        before.push((live["as_of"]["at"].as_str().unwrap().to_string(), live));
    }
    publish_counted(TOTAL + 10..TOTAL + 20).await;
    for (server, (at, live)) in [&c, &b].into_iter().zip(&before) {
        let then: Value = client
            .get(server.url("/v1/views/readings/overall"))
            .query(&[("as_of", at.as_str())])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            then["rows"],
            live["rows"],
            "as_of={at} on {}: {then}",
            server.url("")
        );
        assert!(then["as_of"]["stale"].is_null(), "{then}");
    }
    // b stops gracefully: it seals its partitions and hands them over; c runs everything and
    // still answers exactly every event (resumed from the offsets sealed with b's segments).
    let stopped = Instant::now();
    assert!(b.terminate().success(), "serve exits 0 on SIGTERM");
    publish_with_copies(&url, &topic, TOTAL..TOTAL + 100).await;
    publish_sensors(TOTAL..TOTAL + 100).await;
    all_answer_exactly(
        &client,
        &[&c],
        "readings",
        TOTAL + 100,
        Duration::from_secs(30),
    )
    .await;
    nats_answers(&[&c], "sensors", TOTAL + 100, Duration::from_secs(30)).await;
    let started = Instant::now();
    while running(&client, &c).await != [0, 1, 2] {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "c took b's partitions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("b handed over in {:?}", stopped.elapsed());
    drop(c);
    if let Some(db) = db {
        db.drop().await;
    }
}
