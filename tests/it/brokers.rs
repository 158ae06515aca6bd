//! Broker sources against the real brokers named by `LAMBDA_TEST_MQTT`, `LAMBDA_TEST_AMQP`,
//! `LAMBDA_TEST_SERVICEBUS` (RabbitMQ's AMQP 1.0 plugin), `LAMBDA_TEST_REDIS`, `LAMBDA_TEST_NATS`
//! and `LAMBDA_TEST_KAFKA` (a test whose variable is unset prints a skip note, or fails under
//! CI; one whose broker is unreachable fails). Per source: events
//! published while `serve` is down are all counted once it starts; then `serve` is killed with
//! SIGKILL mid-stream, more events are published, and after a restart every event is counted
//! exactly once (redeliveries of events already durable are dropped by `event_id`). And per
//! source, a TCP proxy between `serve` and the broker cuts every connection mid-stream and
//! refuses new ones for a second: the source reconnects and every event counts once.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Proxy, Server, service};

/// Events published before the first start, and in total.
const FIRST: usize = 300;
const TOTAL: usize = 800;

enum Broker {
    Mqtt {
        url: String,
        topic: String,
    },
    Amqp {
        url: String,
        queue: String,
    },
    /// AMQP 1.0 (RabbitMQ's `rabbitmq_amqp1_0` plugin); the queue is declared over 0-9-1.
    #[cfg_attr(not(feature = "servicebus"), allow(dead_code))]
    ServiceBus {
        url: String,
        queue: String,
    },
    Redis {
        url: String,
        stream: String,
    },
    Nats {
        url: String,
        stream: String,
    },
    /// `url` is the bootstrap `host:port`; the topic has `KAFKA_PARTITIONS` partitions.
    #[cfg(feature = "kafka")]
    Kafka {
        url: String,
        topic: String,
    },
}

/// A name no earlier run used, so runs never see each other's messages or sessions.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{}x{nanos}", std::process::id())
}

fn event(i: usize) -> String {
    serde_json::json!({
        "id": format!("e{i}"),
        "ts": 1_763_719_200_000i64 + i as i64 * 1000,
        "device": format!("d{}", i % 5),
        "value": i as f64,
    })
    .to_string()
}

impl Broker {
    /// The broker's address as `host:port` (what a proxy forwards to).
    fn host_port(&self) -> String {
        let url = match self {
            Broker::Mqtt { url, .. }
            | Broker::Amqp { url, .. }
            | Broker::ServiceBus { url, .. }
            | Broker::Redis { url, .. }
            | Broker::Nats { url, .. } => url.clone(),
            #[cfg(feature = "kafka")]
            Broker::Kafka { url, .. } => return url.clone(),
        };
        let u = url::Url::parse(&url).unwrap();
        format!(
            "{}:{}",
            u.host_str().unwrap(),
            u.port_or_known_default().unwrap_or(0)
        )
    }

    /// The same broker reached through `proxy` (for the source only; tests publish directly).
    fn via(&self, proxy: &Proxy) -> Broker {
        let through = |url: &str| {
            let mut u = url::Url::parse(url).unwrap();
            u.set_host(Some("127.0.0.1")).unwrap();
            u.set_port(Some(proxy.addr.port())).unwrap();
            u.to_string()
        };
        match self {
            Broker::Mqtt { url, topic } => Broker::Mqtt {
                url: through(url),
                topic: topic.clone(),
            },
            Broker::Amqp { url, queue } => Broker::Amqp {
                url: through(url),
                queue: queue.clone(),
            },
            Broker::ServiceBus { url, queue } => Broker::ServiceBus {
                url: through(url),
                queue: queue.clone(),
            },
            Broker::Redis { url, stream } => Broker::Redis {
                url: through(url),
                stream: stream.clone(),
            },
            Broker::Nats { url, stream } => Broker::Nats {
                url: through(url),
                stream: stream.clone(),
            },
            #[cfg(feature = "kafka")]
            Broker::Kafka { topic, .. } => Broker::Kafka {
                url: proxy.addr.to_string(),
                topic: topic.clone(),
            },
        }
    }

    /// Pipeline keys besides `source` this broker's tests need.
    fn pipeline_yaml(&self) -> &'static str {
        match self {
            // Offsets are committed when segments seal: seal often so commits happen in the test.
            #[cfg(feature = "kafka")]
            Broker::Kafka { .. } => "archive:\n  segment_age: 1s\n",
            _ => "",
        }
    }

    fn source_yaml(&self) -> String {
        match self {
            #[cfg(feature = "kafka")]
            Broker::Kafka { url, topic } => format!(
                "  type: kafka\n  brokers: \"{url}\"\n  topic: {topic}\n  group: {topic}\n  properties:\n    session.timeout.ms: \"6000\"\n    heartbeat.interval.ms: \"1000\"\n"
            ),
            Broker::Mqtt { url, topic } => format!(
                "  type: mqtt\n  url: {url}\n  topic: \"{topic}/+/reading\"\n  qos: 1\n  client_id: {topic}\n"
            ),
            Broker::Amqp { url, queue } => {
                format!("  type: amqp\n  url: \"{url}\"\n  queue: {queue}\n  prefetch: 200\n")
            }
            Broker::ServiceBus { url, queue } => format!(
                "  type: servicebus\n  url: \"{url}\"\n  queue: /amq/queue/{queue}\n  prefetch: 200\n"
            ),
            Broker::Redis { url, stream } => {
                format!(
                    "  type: redis\n  url: {url}\n  stream: {stream}\n  group: lambda\n  consumer: {stream}\n"
                )
            }
            Broker::Nats { url, stream } => format!(
                "  type: nats\n  url: {url}\n  stream: {stream}\n  subject: \"{stream}.>\"\n"
            ),
        }
    }

    /// What must exist before events are published for the source to receive them.
    async fn prepare(&self) {
        match self {
            #[cfg(feature = "kafka")]
            Broker::Kafka { url, topic } => kafka::create_topic(url, topic).await,
            // A persistent session subscribed under the pipeline's client id: the broker
            // queues what is published while `serve` is down.
            Broker::Mqtt { url, topic } => {
                let (client, mut eventloop) = mqtt_client(url, topic, false);
                client
                    .subscribe(format!("{topic}/+/reading"), rumqttc::QoS::AtLeastOnce)
                    .await
                    .unwrap();
                loop {
                    match eventloop.poll().await.expect("MQTT broker reachable") {
                        rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => break,
                        _ => continue,
                    }
                }
                client.disconnect().await.unwrap();
                while eventloop.poll().await.is_ok() {}
            }
            Broker::Amqp { url, queue } | Broker::ServiceBus { url, queue } => {
                let (_conn, channel) = amqp_channel(url, queue).await;
                drop(channel);
            }
            Broker::Redis { url, .. } => {
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut con = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("Redis reachable");
                let _: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
            }
            Broker::Nats { url, stream } => {
                let js = async_nats::jetstream::new(
                    async_nats::connect(url.as_str())
                        .await
                        .expect("NATS reachable"),
                );
                js.get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: stream.clone(),
                    subjects: vec![format!("{stream}.>")],
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }
    }

    /// Deletes what the run left on the shared broker (stream, queue, persistent session).
    async fn remove(&self) {
        match self {
            #[cfg(feature = "kafka")]
            Broker::Kafka { url, topic } => kafka::delete_topic(url, topic).await,
            Broker::Mqtt { url, topic } => {
                // Connecting with a clean session under the same id discards the stored one.
                let (client, mut eventloop) = mqtt_client(url, topic, true);
                loop {
                    if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) =
                        eventloop.poll().await.unwrap()
                    {
                        break;
                    }
                }
                client.disconnect().await.unwrap();
                while eventloop.poll().await.is_ok() {}
            }
            Broker::Amqp { url, queue } | Broker::ServiceBus { url, queue } => {
                let (_conn, channel) = amqp_channel(url, queue).await;
                channel
                    .queue_delete(
                        queue.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await
                    .unwrap();
            }
            Broker::Redis { url, stream } => {
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut con = client.get_multiplexed_async_connection().await.unwrap();
                let _: u64 = redis::cmd("DEL")
                    .arg(stream)
                    .query_async(&mut con)
                    .await
                    .unwrap();
            }
            Broker::Nats { url, stream } => {
                let js =
                    async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
                js.delete_stream(stream).await.unwrap();
            }
        }
    }

    /// Publishes events `range`, each confirmed by the broker before this returns.
    async fn publish(&self, range: std::ops::Range<usize>) {
        match self {
            #[cfg(feature = "kafka")]
            Broker::Kafka { url, topic } => kafka::publish(url, topic, range).await,
            Broker::Mqtt { url, topic } => {
                let (client, mut eventloop) = mqtt_client(url, &unique("pub"), true);
                let n = range.len();
                let poller = tokio::spawn(async move {
                    let mut acked = 0;
                    while acked < n {
                        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                            eventloop.poll().await.expect("MQTT broker reachable")
                        {
                            acked += 1;
                        }
                    }
                    eventloop
                });
                for i in range {
                    client
                        .publish(
                            format!("{topic}/d{}/reading", i % 5),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            event(i),
                        )
                        .await
                        .unwrap();
                }
                let mut eventloop = poller.await.unwrap();
                client.disconnect().await.unwrap();
                while eventloop.poll().await.is_ok() {}
            }
            Broker::Amqp { url, queue } => {
                let (_conn, channel) = amqp_channel(url, queue).await;
                channel
                    .confirm_select(lapin::options::ConfirmSelectOptions::default())
                    .await
                    .unwrap();
                let mut confirms = Vec::new();
                for i in range {
                    confirms.push(
                        channel
                            .basic_publish(
                                "".into(),
                                queue.as_str().into(),
                                lapin::options::BasicPublishOptions::default(),
                                event(i).as_bytes(),
                                lapin::BasicProperties::default().with_delivery_mode(2),
                            )
                            .await
                            .unwrap(),
                    );
                }
                for c in confirms {
                    assert!(c.await.unwrap().is_ack(), "RabbitMQ confirmed the publish");
                }
            }
            #[cfg(feature = "servicebus")]
            Broker::ServiceBus { url, queue } => {
                let messages = range.map(|i| (format!("e{i}"), event(i))).collect();
                amqp10_publish(url, queue, messages).await;
            }
            #[cfg(not(feature = "servicebus"))]
            Broker::ServiceBus { .. } => unreachable!("built without the servicebus feature"),
            Broker::Redis { url, stream } => {
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut con = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("Redis reachable");
                for i in range {
                    let _: String = redis::cmd("XADD")
                        .arg(stream)
                        .arg("*")
                        .arg("data")
                        .arg(event(i))
                        .query_async(&mut con)
                        .await
                        .unwrap();
                }
            }
            Broker::Nats { url, stream } => {
                let js = async_nats::jetstream::new(
                    async_nats::connect(url.as_str())
                        .await
                        .expect("NATS reachable"),
                );
                let mut acks = Vec::new();
                for i in range {
                    acks.push(
                        js.publish(format!("{stream}.d{}", i % 5), event(i).into())
                            .await
                            .unwrap(),
                    );
                }
                for a in acks {
                    a.await.unwrap();
                }
            }
        }
    }
}

fn mqtt_client(url: &str, id: &str, clean: bool) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let u = url::Url::parse(url).unwrap();
    let mut o = rumqttc::MqttOptions::new(id, u.host_str().unwrap(), u.port().unwrap_or(1883));
    o.set_clean_session(clean);
    rumqttc::AsyncClient::new(o, 1000)
}

async fn amqp_channel(url: &str, queue: &str) -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable");
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, channel)
}

#[cfg(feature = "servicebus")]
/// Publishes `(message-id, body)` pairs over AMQP 1.0 to the existing queue `queue`, each
/// accepted by the broker before this returns.
async fn amqp10_publish(url: &str, queue: &str, messages: Vec<(String, String)>) {
    use fe2o3_amqp::types::messaging::{Data, Message, Properties};
    use fe2o3_amqp::types::primitives::Binary;
    let within = Duration::from_secs(30);
    let mut conn = tokio::time::timeout(within, fe2o3_amqp::Connection::open(unique("pub"), url))
        .await
        .expect("the AMQP 1.0 broker opens a connection within 30 s")
        .expect("AMQP 1.0 broker reachable (is rabbitmq_amqp1_0 enabled?)");
    let mut session = tokio::time::timeout(within, fe2o3_amqp::Session::begin(&mut conn))
        .await
        .expect("the AMQP 1.0 broker begins a session within 30 s")
        .unwrap();
    let attach = fe2o3_amqp::Sender::attach(
        &mut session,
        unique("sender"),
        format!("/amq/queue/{queue}"),
    );
    let mut sender = tokio::time::timeout(within, attach)
        .await
        .expect("the AMQP 1.0 broker attaches a sender within 30 s")
        .unwrap();
    for (id, body) in messages {
        let message = Message::builder()
            .properties(Properties::builder().message_id(id).build())
            .data(Data(Binary::from(body.into_bytes())))
            .build();
        tokio::time::timeout(within, sender.send(message))
            .await
            .expect("the AMQP 1.0 broker settles a message within 30 s")
            .unwrap()
            .accepted_or("not accepted")
            .unwrap();
    }
    // Every message is accepted above; RabbitMQ 3.10 answers a closing detach in a way the
    // client calls an illegal state, and at times not at all (the client then waits forever
    // on a connection the broker has closed), so the teardown is best effort and bounded.
    let bounded = Duration::from_secs(2);
    let _ = tokio::time::timeout(bounded, sender.close()).await;
    let _ = tokio::time::timeout(bounded, session.end()).await;
    let _ = tokio::time::timeout(bounded, conn.close()).await;
}

fn project(broker: &Broker) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    // Every broker adds a metadata column `m` it always carries (counted by `with_meta`).
    // AMQP 1.0: no `event_id`, so the message-id is the one (the default), here read as `m`;
    // RabbitMQ sets no enqueued time, so `enqueued` is null.
    let (id, meta) = match broker {
        Broker::ServiceBus { .. } => (
            "",
            "  m: {type: string, from: meta.message_id}\n  enqueued: {type: timestamp, from: meta.enqueued_time}\n",
        ),
        Broker::Mqtt { .. } => ("event_id: id\n", "  m: {type: string, from: meta.topic}\n"),
        Broker::Amqp { .. } => (
            "event_id: id\n",
            "  m: {type: string, from: meta.routing_key}\n",
        ),
        Broker::Redis { .. } => (
            "event_id: id\n",
            "  m: {type: timestamp, from: meta.timestamp}\n",
        ),
        Broker::Nats { .. } => (
            "event_id: id\n",
            "  m: {type: int, from: meta.stream_sequence}\n",
        ),
        #[cfg(feature = "kafka")]
        Broker::Kafka { .. } => ("event_id: id\n", "  m: {type: int, from: meta.offset}\n"),
    };
    let yaml = format!(
        "name: readings\n{}source:\n{}schema:\n  id: string\n  ts: timestamp\n  device: string\n  value: float\n{meta}event_time: ts\n{id}views:\n  - name: overall\n    window: all\n    metrics:\n      n: count()\n      total: sum(value)\n      with_meta: count(m)\n",
        broker.pipeline_yaml(),
        broker.source_yaml()
    );
    std::fs::write(dir.path().join("pipelines/readings.yaml"), yaml).unwrap();
    dir
}

/// `(count, sum of values)` of the `overall` view; every counted event carries its metadata.
async fn counted(client: &reqwest::Client, server: &Server) -> (u64, f64) {
    let resp = client
        .get(server.url("/v1/views/readings/overall"))
        .send()
        .await
        .expect("GET view");
    assert!(resp.status().is_success(), "GET answered {}", resp.status());
    let v: Value = resp.json().await.unwrap();
    let row = v["rows"].get(0);
    let n = row.and_then(|r| r["n"].as_u64()).unwrap_or(0);
    let with_meta = row.and_then(|r| r["with_meta"].as_u64()).unwrap_or(0);
    assert_eq!(with_meta, n, "every event has its broker metadata column");
    (
        row.and_then(|r| r["n"].as_u64()).unwrap_or(0),
        row.and_then(|r| r["total"].as_f64()).unwrap_or(0.0),
    )
}

/// Waits until the view counts exactly events `0..n`, and fails on any over-count.
async fn wait_for_exactly(client: &reqwest::Client, server: &Server, n: usize) {
    let start = Instant::now();
    loop {
        let (got, total) = counted(client, server).await;
        assert!(
            got <= n as u64,
            "counted {got} events, only {n} were published"
        );
        if got == n as u64 {
            let expected = (n * (n - 1) / 2) as f64;
            assert_eq!(total, expected, "every event counted once: sum of values");
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {got} of {n} published events counted after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Once everything is consumed, `GET /v1/pipelines` reports the source's lag as 0 under the
/// source's keys (MQTT has no lag to report: null).
async fn lag_drains(client: &reqwest::Client, server: &Server, broker: &Broker) {
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
        let lag = &v["pipelines"][0]["lag"];
        if let Broker::Mqtt { .. } | Broker::ServiceBus { .. } = broker {
            assert!(lag.is_null(), "MQTT and AMQP 1.0 report no lag, got {lag}");
            return;
        }
        let keys: Vec<&str> = match broker {
            Broker::Nats { .. } => vec!["pending"],
            Broker::Redis { .. } => vec!["pending"],
            Broker::Amqp { queue, .. } => vec![queue.as_str()],
            #[cfg(feature = "kafka")]
            Broker::Kafka { .. } => vec!["0", "1"],
            Broker::Mqtt { .. } | Broker::ServiceBus { .. } => unreachable!("returned above"),
        };
        let drained = lag.as_object().is_some_and(|m| {
            keys.iter().all(|k| m.contains_key(*k)) && m.values().all(|n| n.as_u64() == Some(0))
        });
        if drained {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "lag not reported as drained after 20 s: {lag}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn exactly_once_across_kill9(broker: Broker) {
    let (_dir, server, broker) = exactly_once_across_kill9_in(broker, 1).await;
    server.kill9();
    broker.remove().await;
}

/// [`exactly_once_across_kill9`] with the pipeline's speed layer in `partitions` partitions;
/// returns the project, the server (running, every event counted) and the broker, for further
/// checks.
async fn exactly_once_across_kill9_in(
    broker: Broker,
    partitions: u32,
) -> (tempfile::TempDir, Server, std::sync::Arc<Broker>) {
    let dir = project(&broker);
    if partitions > 1 {
        let file = dir.path().join("pipelines/readings.yaml");
        let yaml = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{yaml}partitions: {partitions}\n")).unwrap();
    }
    let root: &Path = dir.path();
    let client = reqwest::Client::new();
    broker.prepare().await;

    // Published while no consumer runs: all of it must arrive.
    broker.publish(0..FIRST).await;
    let server = Server::start(root);
    wait_for_exactly(&client, &server, FIRST).await;

    // Publish the rest in chunks while `serve` consumes; crash it part-way through.
    let broker = std::sync::Arc::new(broker);
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move {
            for start in (FIRST..TOTAL).step_by(50) {
                broker.publish(start..(start + 50).min(TOTAL)).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let started = Instant::now();
    let at_kill = loop {
        let (got, _) = counted(&client, &server).await;
        if got as usize > FIRST + 100 || publisher.is_finished() {
            break got;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no progress after the first batch"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    server.kill9();
    eprintln!("killed serve with {at_kill} of {TOTAL} events counted");
    publisher.await.unwrap();

    let server = Server::start(root);
    wait_for_exactly(&client, &server, TOTAL).await;
    // Late redeliveries must not raise the count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_for_exactly(&client, &server, TOTAL).await;
    lag_drains(&client, &server, &broker).await;
    (dir, server, broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_counts_every_event_once_across_kill9() {
    let Some(url) = service("LAMBDA_TEST_MQTT") else {
        return;
    };
    exactly_once_across_kill9(Broker::Mqtt {
        url,
        topic: unique("lt"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_counts_every_event_once_across_kill9() {
    let Some(url) = service("LAMBDA_TEST_AMQP") else {
        return;
    };
    exactly_once_across_kill9(Broker::Amqp {
        url,
        queue: unique("lt"),
    })
    .await;
}

#[cfg(feature = "servicebus")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_counts_every_event_once_across_kill9() {
    let Some(url) = service("LAMBDA_TEST_SERVICEBUS") else {
        return;
    };
    exactly_once_across_kill9(Broker::ServiceBus {
        url,
        queue: unique("lt"),
    })
    .await;
}

/// Malformed messages among good ones over AMQP 1.0: each is dead-lettered with its reason and
/// accepted (the queue drains), and every good event still counts once.
#[cfg(feature = "servicebus")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_dead_letters_malformed_messages_and_accepts_them() {
    let Some(url) = service("LAMBDA_TEST_SERVICEBUS") else {
        return;
    };
    let queue = unique("lt");
    let broker = Broker::ServiceBus {
        url: url.clone(),
        queue: queue.clone(),
    };
    let dir = project(&broker);
    broker.prepare().await;
    let mut messages: Vec<(String, String)> = Vec::new();
    for i in 0..100 {
        messages.push((format!("e{i}"), event(i)));
        if i % 25 == 0 {
            messages.push((format!("bad{i}"), format!("not json {i}")));
            messages.push((
                format!("late{i}"),
                format!("{{\"id\":\"x{i}\",\"device\":\"d\"}}"),
            ));
        }
    }
    // A redelivered copy (same message-id) of an event already sent.
    messages.push(("e7".into(), event(7)));
    amqp10_publish(&url, &queue, messages).await;
    let client = reqwest::Client::new();
    let server = Server::start(dir.path());
    wait_for_exactly(&client, &server, 100).await;
    let started = Instant::now();
    loop {
        let v = crate::support::get_json(&client, server.url("/v1/pipelines")).await;
        let p = &v["pipelines"][0];
        if p["rejected"].as_u64() == Some(8) {
            assert_eq!(p["duplicates"].as_u64(), Some(1), "{p}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "8 malformed messages dead-lettered: {p}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every message, good or not, was accepted: nothing is left in the queue.
    let started = Instant::now();
    loop {
        let (_conn, channel) = amqp_channel(&url, &queue).await;
        let q = channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        if q.message_count() == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} messages still in the queue",
            q.message_count()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.kill9();
    broker.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counts_every_event_once_across_kill9() {
    let Some(url) = service("LAMBDA_TEST_REDIS") else {
        return;
    };
    exactly_once_across_kill9(Broker::Redis {
        url,
        stream: unique("lt"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_counts_every_event_once_across_kill9() {
    let Some(url) = service("LAMBDA_TEST_NATS") else {
        return;
    };
    exactly_once_across_kill9(Broker::Nats {
        url,
        stream: unique("LT"),
    })
    .await;
}

/// A proxy between `serve` and the broker cuts every connection once events flow, refuses new
/// ones for a second, then forwards again: the source reconnects (through the proxy, which
/// counts it) and every event — before, during and after the cut — counts exactly once.
async fn exactly_once_across_connection_cut(broker: Broker, proxy: Proxy) {
    let source = broker.via(&proxy);
    let dir = project(&source);
    let client = reqwest::Client::new();
    broker.prepare().await;
    broker.publish(0..FIRST).await;
    let server = Server::start(dir.path());
    wait_for_exactly(&client, &server, FIRST).await;

    let broker = std::sync::Arc::new(broker);
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move {
            for start in (FIRST..TOTAL).step_by(50) {
                broker.publish(start..(start + 50).min(TOTAL)).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let started = Instant::now();
    loop {
        let (got, _) = counted(&client, &server).await;
        if got as usize > FIRST + 100 || publisher.is_finished() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no progress after the first batch"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = proxy.accepted();
    proxy.cut(Duration::from_secs(1));
    publisher.await.unwrap();
    wait_for_exactly(&client, &server, TOTAL).await;
    assert!(
        proxy.accepted() > before,
        "the source reconnected through the proxy after the cut"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_for_exactly(&client, &server, TOTAL).await;
    server.kill9();
    broker.remove().await;
}

/// The connection-cut test for the broker at `$var`, reached through a proxy of its own.
async fn connection_cut(var: &str, broker: impl FnOnce(String) -> Broker) {
    let Some(url) = service(var) else {
        return;
    };
    let broker = broker(url);
    let proxy = Proxy::start(&broker.host_port()).await;
    exactly_once_across_connection_cut(broker, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_reconnects_after_a_connection_cut() {
    connection_cut("LAMBDA_TEST_MQTT", |url| Broker::Mqtt {
        url,
        topic: unique("lt"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_reconnects_after_a_connection_cut() {
    connection_cut("LAMBDA_TEST_AMQP", |url| Broker::Amqp {
        url,
        queue: unique("lt"),
    })
    .await;
}

/// Also stands in for a broker restart: restarting the shared RabbitMQ would break the other
/// broker tests running beside it, and to the source both are the same event (the connection
/// drops, new ones are refused for a while, unsettled deliveries come again).
#[cfg(feature = "servicebus")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_reconnects_after_a_connection_cut() {
    connection_cut("LAMBDA_TEST_SERVICEBUS", |url| Broker::ServiceBus {
        url,
        queue: unique("lt"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reconnects_after_a_connection_cut() {
    connection_cut("LAMBDA_TEST_REDIS", |url| Broker::Redis {
        url,
        stream: unique("lt"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_reconnects_after_a_connection_cut() {
    connection_cut("LAMBDA_TEST_NATS", |url| Broker::Nats {
        url,
        stream: unique("LT"),
    })
    .await;
}

#[cfg(feature = "kafka")]
mod kafka;
