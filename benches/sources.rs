//! Broker source throughput through the real binary: events/s from the broker into the speed
//! layer's partials. Per source: publish N events while no consumer runs, start `serve`, and
//! time from its "serving" line until the `total` view counts all N (every event durable in
//! the write-ahead log, de-duplicated by id, aggregated). MQTT brokers queue little for an
//! offline session (Mosquitto: 1000 by default) and drop beyond it, so MQTT is measured live
//! instead: `serve` runs first, events are published 500 at a time, each window waiting until
//! counted, and the clock covers publishing too.
//!
//! A source whose `LAMBDA_TEST_*` variable is unset is skipped. `cargo bench --bench sources`
//! (or `just bench`); figures from the dev profile are far below release ones.

use std::time::{Duration, Instant};

mod common;
use common::Serve;

const N: usize = 100_000;
const MQTT_N: usize = 10_000;
const MQTT_WINDOW: usize = 500;
const CHUNK: usize = 1_000;

fn event(i: usize) -> String {
    format!(
        "{{\"id\":\"e{i}\",\"ts\":{},\"device\":\"d{}\",\"value\":{}.5}}",
        1_763_719_200_000i64 + i as i64,
        i % 50,
        i % 1000
    )
}

fn pipeline(source: &str) -> String {
    format!(
        "name: bench\nsource:\n{source}schema:\n  id: string\n  ts: timestamp\n  device: string\n  value: float\nevent_time: ts\nevent_id: id\narchive:\n  segment_rows: 1000000\n  segment_age: 2s\nviews:\n  - name: total\n    window: all\n    metrics:\n      n: count()\n  - name: per_device\n    group_by: [device]\n    window: 1m\n    metrics:\n      n: count()\n      avg: avg(value)\n"
    )
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{nanos}")
}

fn serve(source_yaml: &str) -> Serve {
    Serve::start("bench", &pipeline(source_yaml), "error")
}

/// Waits until the `total` view counts `n`; returns the time since `from`.
async fn until_counted(s: &Serve, n: usize, from: Instant) -> Duration {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/views/bench/total", s.base);
    loop {
        let v: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        let got = v["rows"][0]["n"].as_u64().unwrap_or(0);
        assert!(got <= n as u64, "counted {got} of {n}");
        if got == n as u64 {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < Duration::from_secs(300),
            "only {got} of {n} after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Prints the throughput, and what `serve` spent per event (its CPU time since it started:
/// the source's own cost, apart from the broker's and the publisher's).
fn report(kind: &str, s: &Serve, n: usize, took: Duration, note: &str) {
    let cpu = s.cpu_seconds().map_or(String::new(), |cpu| {
        format!(
            "; serve {:.1} µs CPU/event = {:.0} events/s per core",
            cpu * 1e6 / n as f64,
            n as f64 / cpu
        )
    });
    println!(
        "{kind:<6} {n:>7} events in {:>7.2} s = {:>9.0} events/s{note}{cpu}",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
}

fn var(name: &str) -> Option<String> {
    let v = std::env::var(name).ok().filter(|v| !v.is_empty());
    if v.is_none() {
        println!("skipped: {name} is not set");
    }
    v
}

async fn nats(url: String) {
    let stream = unique("BENCH");
    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.>")],
        ..Default::default()
    })
    .await
    .unwrap();
    for chunk in (0..N).collect::<Vec<_>>().chunks(CHUNK) {
        let mut acks = Vec::with_capacity(chunk.len());
        for &i in chunk {
            acks.push(
                js.publish(format!("{stream}.d{}", i % 50), event(i).into())
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
    }
    let s = serve(&format!(
        "  type: nats\n  url: {url}\n  stream: {stream}\n  subject: \"{stream}.>\"\n"
    ));
    let took = until_counted(&s, N, s.started).await;
    report("nats", &s, N, took, "");
    drop(s);
    js.delete_stream(&stream).await.unwrap();
}

async fn redis(url: String) {
    let stream = unique("bench");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    for chunk in (0..N).collect::<Vec<_>>().chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("data")
                .arg(event(i))
                .ignore();
        }
        let () = pipe.query_async(&mut con).await.unwrap();
    }
    let s = serve(&format!(
        "  type: redis\n  url: {url}\n  stream: {stream}\n  group: bench\n"
    ));
    let took = until_counted(&s, N, s.started).await;
    report("redis", &s, N, took, "");
    drop(s);
    let _: u64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut con)
        .await
        .unwrap();
}

async fn amqp(url: String) {
    let queue = amqp_fill(&url).await;
    let s = serve(&format!(
        "  type: amqp\n  url: \"{url}\"\n  queue: {queue}\n  prefetch: 2000\n"
    ));
    let took = until_counted(&s, N, s.started).await;
    report("amqp", &s, N, took, "");
    drop(s);
    amqp_delete(&url, &queue).await;
}

#[cfg(feature = "servicebus")]
/// The `servicebus` source (AMQP 1.0) on RabbitMQ's AMQP 1.0 plugin, reading a queue filled
/// over 0-9-1 (the fastest way to pre-publish; the source's side is what is measured).
async fn servicebus(url: String, classic: String) {
    let queue = amqp_fill(&classic).await;
    let prefetch = std::env::var("SERVICEBUS_BENCH_PREFETCH").unwrap_or_else(|_| "2000".into());
    let s = serve(&format!(
        "  type: servicebus\n  url: \"{url}\"\n  queue: /amq/queue/{queue}\n  prefetch: {prefetch}\n"
    ));
    let took = until_counted(&s, N, s.started).await;
    report("servicebus", &s, N, took, " (AMQP 1.0)");
    drop(s);
    amqp_delete(&classic, &queue).await;
}

async fn amqp_delete(url: &str, queue: &str) {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// A new durable queue holding events `0..N`, each confirmed; returns its name.
async fn amqp_fill(url: &str) -> String {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    let queue = unique("bench");
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), durable, Default::default())
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for chunk in (0..N).collect::<Vec<_>>().chunks(CHUNK) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for &i in chunk {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        event(i).as_bytes(),
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
        }
        for c in confirms {
            c.await.unwrap();
        }
    }
    queue
}

async fn mqtt(url: String) {
    let topic = unique("bench");
    let u = url::Url::parse(&url).unwrap();
    let s = serve(&format!(
        "  type: mqtt\n  url: {url}\n  topic: \"{topic}/+\"\n  qos: 1\n  client_id: {topic}\n"
    ));
    // Give the source time to connect and subscribe before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut o = rumqttc::MqttOptions::new(
        unique("pub"),
        u.host_str().unwrap(),
        u.port().unwrap_or(1883),
    );
    o.set_inflight(1000);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, CHUNK);
    let start = Instant::now();
    let poller = tokio::spawn(async move {
        let mut acked = 0;
        while acked < MQTT_N {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                eventloop.poll().await.unwrap()
            {
                acked += 1;
            }
        }
    });
    // Closed loop, one window of MQTT_WINDOW at a time: the broker drops what exceeds a
    // subscriber's queue (Mosquitto: max_queued_messages), so an open-loop flood measures loss.
    for window in (0..MQTT_N).step_by(MQTT_WINDOW) {
        for i in window..(window + MQTT_WINDOW).min(MQTT_N) {
            client
                .publish(
                    format!("{topic}/d{}", i % 50),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    event(i),
                )
                .await
                .unwrap();
        }
        until_counted(&s, (window + MQTT_WINDOW).min(MQTT_N), start).await;
    }
    poller.await.unwrap();
    report(
        "mqtt",
        &s,
        MQTT_N,
        start.elapsed(),
        " (live, closed loop of 500: publishing included)",
    );
}

#[cfg(feature = "kafka")]
async fn kafka(url: String) {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = unique("bench");
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &url);
    let admin: AdminClient<DefaultClientContext> = config.create().unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let producer: FutureProducer = config
        .clone()
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for chunk in (0..N).collect::<Vec<_>>().chunks(CHUNK * 10) {
        let sends = chunk.iter().map(|&i| {
            let producer = &producer;
            let topic = &topic;
            async move {
                let payload = event(i);
                let key = format!("d{}", i % 50);
                producer
                    .send(
                        FutureRecord::to(topic).payload(&payload).key(&key),
                        Duration::from_secs(60),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .unwrap();
            }
        });
        futures::future::join_all(sends).await;
    }
    let s = serve(&format!(
        "  type: kafka\n  brokers: \"{url}\"\n  topic: {topic}\n  group: {topic}\n"
    ));
    let took = until_counted(&s, N, s.started).await;
    report("kafka", &s, N, took, "");
    drop(s);
    let _ = admin
        .delete_topics(&[topic.as_str()], &AdminOptions::new())
        .await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "broker → partials ({} profile; {N} pre-published events unless noted)",
        if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        }
    );
    rt.block_on(async {
        if let Some(url) = var("LAMBDA_TEST_NATS") {
            nats(url).await;
        }
        if let Some(url) = var("LAMBDA_TEST_REDIS") {
            redis(url).await;
        }
        if let Some(url) = var("LAMBDA_TEST_AMQP") {
            amqp(url.clone()).await;
            #[cfg(feature = "servicebus")]
            if let Some(sb) = var("LAMBDA_TEST_SERVICEBUS") {
                servicebus(sb, url).await;
            }
        }
        if let Some(url) = var("LAMBDA_TEST_MQTT") {
            mqtt(url).await;
        }
        #[cfg(feature = "kafka")]
        if let Some(url) = var("LAMBDA_TEST_KAFKA") {
            kafka(url).await;
        }
    });
}
