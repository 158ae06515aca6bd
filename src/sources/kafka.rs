//! The `kafka` source: a consumer group (`group`, default `lambda-<pipeline>`) on `topic`, for
//! Kafka and Kafka-protocol brokers — Azure Event Hubs' Kafka endpoint (`security_protocol:
//! SASL_SSL`, SASL `PLAIN`, username `$ConnectionString`), Redpanda, tansu.
//!
//! Why rdkafka (librdkafka) and not rskafka: the source needs consumer groups (partitions
//! shared and rebalanced between `serve` instances, committed offsets kept by the broker) and
//! full control over when offsets are committed; rdkafka has both, plus the SASL/TLS variants
//! Event Hubs needs. rskafka has no consumer groups (and is no longer used by its main user).
//! librdkafka is built from the bundled sources with make; the cost is behind the `kafka`
//! cargo feature (on by default).
//!
//! Positions: each message's (partition, offset). Offsets are committed only after the
//! segment holding the message is sealed — durable in the write-ahead log is not enough, so a
//! committed offset always points at archived data. The mapping goes through the runtime's
//! log positions: Kafka partition k goes to the pipeline's partition k mod `partitions`; after a
//! batch went through the door, the source notes, per pipeline partition, the end of its log
//! (`PipelineRuntime::logged_end`) with the next offset of each of its Kafka partitions; a
//! separate committer commits those offsets once that partition's sealed end
//! (`PipelineRuntime::sealed_end`) reaches the mark. Consequently commits trail the data by up to `archive.segment_age`.
//!
//! After a crash, the group resumes at the committed offsets and the broker redelivers what
//! came after the last sealed segment; those events are already in the log (replayed at
//! start), and a pipeline with `event_id` drops the copies at the door. Within one process,
//! a reconnect or rebalance that redelivers offsets already ingested is skipped by position,
//! with or without `event_id`.
//!
//! On nodes (`serve --node`, see `speed::nodes`) the source does not join the group's
//! rebalancing: it `assign`s itself the Kafka partitions of the pipeline partitions whose
//! leases its node holds, each newly taken one at the offsets recorded with that partition's
//! last sealed segment (`source_offsets`, written in the seal's transaction) — exactly where
//! the archive ends, whichever node sealed it. Every batch's offsets are noted with the
//! partition's log position ([`crate::speed::runtime::Lane::note_offsets`]) for that.
//!
//! librdkafka reconnects to brokers by itself, keeping its fetch positions (consumer errors such
//! as "all brokers down" are logged, not acted on); a session ends (and is rebuilt with
//! backoff) only when the consumer cannot be created, the topic's metadata cannot be fetched,
//! or the consumer reports a fatal error.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use parking_lot::Mutex;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::broker::{self, Body};
use crate::spec::KafkaSecurity;
use crate::speed::runtime::PipelineRuntime;

/// How long fetching metadata or watermarks may take before the broker counts as unreachable.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the last commit of a session may delay its end.
const FINAL_COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct KafkaSource {
    rt: Arc<PipelineRuntime>,
    config: ClientConfig,
    brokers: String,
    topic: String,
    group: String,
    /// Next offset to ingest per partition, across sessions of this process: a redelivery
    /// below it (after a reconnect or rebalance) is already durable and is skipped.
    ingested: Mutex<HashMap<i32, i64>>,
    /// On a node: the Kafka partitions assigned now (messages of others still arriving are
    /// dropped: their pipeline partition is not run here any more).
    assigned: Mutex<BTreeSet<i32>>,
}

impl KafkaSource {
    pub fn new(
        rt: Arc<PipelineRuntime>,
        brokers: &str,
        topic: &str,
        group: &str,
        security: &KafkaSecurity,
        properties: &BTreeMap<String, String>,
    ) -> Self {
        let config = client_config(&rt.pipeline.name, brokers, group, security, properties);
        KafkaSource {
            rt,
            config,
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            group: group.to_string(),
            ingested: Mutex::new(HashMap::new()),
            assigned: Mutex::new(BTreeSet::new()),
        }
    }

    /// Messages of `batch` not yet ingested by this process, and the batch's next offset per
    /// partition.
    fn fresh<'a>(&self, batch: &'a [Received]) -> (Vec<&'a Received>, BTreeMap<i32, i64>) {
        let ingested = self.ingested.lock();
        let mut fresh = Vec::with_capacity(batch.len());
        let mut next = BTreeMap::new();
        for m in batch {
            let (partition, offset, _) = *m;
            if offset >= ingested.get(&partition).copied().unwrap_or(0) {
                fresh.push(m);
            }
            let n = next.entry(partition).or_insert(0);
            *n = (*n).max(offset + 1);
        }
        (fresh, next)
    }
}

/// A received message: partition, offset, payload.
type Received = (i32, i64, Option<Vec<u8>>);

// A function, not a closure: it must be general over the message's lifetime for the session
// future to be `Send`.
fn owned(r: KafkaResult<BorrowedMessage<'_>>) -> KafkaResult<Received> {
    r.map(|m| (m.partition(), m.offset(), m.payload().map(<[u8]>::to_vec)))
}

/// The librdkafka settings: ours first (offsets are stored and committed by the source only),
/// then the pipeline's `properties` (which may not override ours; the spec checks that).
fn client_config(
    pipeline: &str,
    brokers: &str,
    group: &str,
    security: &KafkaSecurity,
    properties: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("client.id", format!("lambda-ctl-{pipeline}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A new group reads the topic from its start, as the other sources do.
        .set("auto.offset.reset", "earliest");
    secured(&mut c, security, properties);
    c
}

/// Adds `security` to a client's settings, then the pipeline's `properties`.
fn secured(c: &mut ClientConfig, security: &KafkaSecurity, properties: &BTreeMap<String, String>) {
    c.set("security.protocol", security.protocol.as_str());
    if let Some(sasl) = &security.sasl {
        c.set("sasl.mechanism", &sasl.mechanism)
            .set("sasl.username", &sasl.username)
            .set("sasl.password", &sasl.password);
    }
    if let Some(ca) = &security.ssl_ca_location {
        c.set("ssl.ca.location", ca);
    }
    for (k, v) in properties {
        c.set(k, v);
    }
}

impl broker::Session for KafkaSource {
    const KIND: &'static str = "kafka";

    async fn session(&self, link: &broker::Link) -> anyhow::Result<()> {
        let shutdown = &link.shutdown;
        let consumer: Arc<StreamConsumer> = Arc::new(
            self.config
                .create()
                .context("creating the Kafka consumer (check `properties`)")?,
        );
        // librdkafka connects lazily and retries forever: ask for the topic's metadata so an
        // unreachable broker, failed authentication or missing topic ends the session visibly.
        let partitions = {
            let (c, topic) = (consumer.clone(), self.topic.clone());
            tokio::task::spawn_blocking(move || {
                c.fetch_metadata(Some(&topic), METADATA_TIMEOUT).map(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic)
                        .map(|t| (t.partitions().len(), t.error()))
                })
            })
            .await?
            .with_context(|| {
                format!(
                    "fetching metadata of topic `{}` from {}",
                    self.topic, self.brokers
                )
            })?
        };
        let kafka_partitions = match partitions {
            Some((n, None)) if n > 0 => n,
            _ => anyhow::bail!(
                "topic `{}` does not exist on {} (create it, or enable auto-creation on the broker)",
                self.topic,
                self.brokers
            ),
        };
        let wanted = self.rt.pipeline.partitions as usize;
        anyhow::ensure!(
            self.rt.pipeline.buffer.is_none() || kafka_partitions >= wanted,
            "the buffer topic `{}` has {kafka_partitions} partitions; the pipeline's {wanted} partitions need at least as many",
            self.topic
        );
        if self.rt.node().is_none() {
            consumer
                .subscribe(&[self.topic.as_str()])
                .with_context(|| format!("subscribing to topic `{}`", self.topic))?;
        }
        link.connected();
        tracing::info!(pipeline = %self.rt.pipeline.name, topic = %self.topic, group = %self.group, "Kafka connected");

        let (marks, pending) = mpsc::unbounded_channel();
        let committer = tokio::spawn(commit_sealed(
            self.rt.clone(),
            consumer.clone(),
            self.topic.clone(),
            pending,
        ));
        let result = self
            .consume(&consumer, kafka_partitions, &marks, shutdown)
            .await;
        drop(marks);
        // The committer makes its last commit (of what is sealed) before the consumer closes.
        let _ = committer.await;
        result
    }
}

impl KafkaSource {
    async fn consume(
        &self,
        consumer: &StreamConsumer,
        kafka_partitions: usize,
        marks: &mpsc::UnboundedSender<Mark>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut stream = consumer.stream().map(owned);
        let meta = broker::meta_keys(&self.rt);
        // On a node: the pipeline partitions run here (with their leases' epochs), and those
        // the consumer is assigned the Kafka partitions of.
        let on_node = self.rt.node().is_some();
        let mut owned_now = self.rt.owned();
        let mut assigned_lanes = BTreeMap::new();
        if on_node {
            owned_now.mark_changed();
        }
        loop {
            let batch = tokio::select! {
                batch = broker::next_batch(&mut stream, broker::MAX_BATCH, shutdown) => match batch {
                    Some(batch) => batch,
                    None => break,
                },
                changed = owned_now.changed(), if on_node => {
                    if changed.is_err() {
                        break;
                    }
                    let now = owned_now.borrow_and_update().clone();
                    // A batch being gathered is dropped: every assignment sets each Kafka
                    // partition's offset explicitly, so it is fetched again.
                    self.assign(consumer, kafka_partitions, &assigned_lanes, &now).await?;
                    assigned_lanes = now;
                    continue;
                }
            };
            let mut received = Vec::with_capacity(batch.len());
            let mut failure = None;
            for m in batch {
                match m {
                    Ok(m) => received.push(m),
                    // Fatal: this consumer instance cannot go on; a new session starts over.
                    Err(e @ KafkaError::MessageConsumptionFatal(_)) => failure = Some(e),
                    // Everything else (a broker connection lost, all brokers down for a
                    // while) librdkafka recovers from by itself, keeping its positions.
                    Err(e) => {
                        tracing::warn!(pipeline = %self.rt.pipeline.name, source = "kafka", error = %e, "Kafka consumer error; librdkafka retries")
                    }
                }
            }
            if on_node {
                let assigned = self.assigned.lock();
                received.retain(|m| assigned.contains(&m.0));
            }
            let (fresh, next) = self.fresh(&received);
            // Kafka partition k goes whole to the pipeline's partition k mod N: the producer
            // partitioned by key already, and each pipeline partition's offsets commit once
            // its own segments are sealed.
            let lanes = (self.rt.pipeline.partitions as usize).max(1);
            let lane_of = |p: i32| usize::try_from(p).unwrap_or(0) % lanes;
            let mut bodies: BTreeMap<usize, Body> = BTreeMap::new();
            for (partition, offset, payload) in fresh {
                let body = bodies
                    .entry(lane_of(*partition))
                    .or_insert_with(|| Body::new(self.rt.pipeline.format));
                body.push_meta(payload.as_deref().unwrap_or_default(), &meta, |k| match k {
                    "topic" => serde_json::Value::from(self.topic.as_str()),
                    "partition" => serde_json::Value::from(*partition),
                    "offset" => serde_json::Value::from(*offset),
                    _ => serde_json::Value::Null,
                });
            }
            for (lane, body) in bodies {
                let bytes = body.into_bytes();
                if !broker::ingest_durably_into(&self.rt, "kafka", bytes, Some(lane), shutdown)
                    .await
                {
                    return Ok(());
                }
            }
            {
                let mut ingested = self.ingested.lock();
                for (p, n) in &next {
                    let e = ingested.entry(*p).or_insert(0);
                    *e = (*e).max(*n);
                }
            }
            // Per pipeline partition: its Kafka partitions' next offsets, committed once its
            // log is sealed up to where it ends now (every message above went in before).
            let ends = self.rt.logged_end();
            let mut by_lane: BTreeMap<usize, BTreeMap<i32, i64>> = BTreeMap::new();
            for (p, n) in next {
                by_lane.entry(lane_of(p)).or_default().insert(p, n);
            }
            for (lane, next) in by_lane {
                let logged_end = ends.get(lane).copied().unwrap_or(0);
                if let Some(l) = self.rt.lanes().get(lane) {
                    l.note_offsets(logged_end, next.clone());
                }
                let _ = marks.send(Mark {
                    lane,
                    epoch: assigned_lanes.get(&(lane as u32)).copied(),
                    logged_end,
                    next,
                });
            }
            if let Some(e) = failure {
                return Err(e).context("receiving from Kafka");
            }
        }
        Ok(())
    }
}

impl KafkaSource {
    /// On a node: assigns the consumer the Kafka partitions of the pipeline partitions
    /// `owned` (with their leases' epochs; `before` were assigned so far) — Kafka partition k
    /// belongs to pipeline partition k mod `partitions`. Those still held at the same epoch go
    /// on where this process is; newly taken ones start at the offsets recorded with their
    /// partition's last sealed segment (else the group's committed offset — a pipeline that
    /// ran on a single `serve` before — else the topic's start).
    async fn assign(
        &self,
        consumer: &StreamConsumer,
        kafka_partitions: usize,
        before: &BTreeMap<u32, u64>,
        owned: &BTreeMap<u32, u64>,
    ) -> anyhow::Result<()> {
        let lanes = (self.rt.pipeline.partitions as usize).max(1);
        let mut tpl = TopicPartitionList::new();
        let mut next = BTreeSet::new();
        let mut resumed = BTreeMap::new();
        for (partition, epoch) in owned {
            let kept = before.get(partition) == Some(epoch);
            let stored = self
                .rt
                .db()
                .source_offsets(&self.rt.pipeline.name, *partition)
                .await?;
            for k in (0..kafka_partitions).filter(|k| k % lanes == *partition as usize) {
                let k = i32::try_from(k)?;
                next.insert(k);
                let mut ingested = self.ingested.lock();
                if !kept {
                    // From the archive's end on, even what this process took before (its
                    // partition's log started over).
                    match stored.get(&k) {
                        Some(n) => ingested.insert(k, *n),
                        None => ingested.remove(&k),
                    };
                    resumed.insert(k, stored.get(&k).copied().unwrap_or(0));
                }
                // Without a recorded offset, the group's committed one: where a single `serve`
                // (which commits only what it sealed) left it; without either, the start.
                let offset = ingested
                    .get(&k)
                    .map_or(Offset::Stored, |n| Offset::Offset(*n));
                tpl.add_partition_offset(&self.topic, k, offset)?;
            }
        }
        *self.assigned.lock() = next.clone();
        consumer
            .assign(&tpl)
            .context("assigning Kafka partitions")?;
        tracing::info!(pipeline = %self.rt.pipeline.name, partitions = ?next, resumed = ?resumed, "Kafka partitions assigned");
        Ok(())
    }
}

/// A batch of the Kafka partitions of pipeline partition `lane` that went through the door:
/// its next offset per Kafka partition may be committed once that partition's log is sealed
/// up to `logged_end`.
struct Mark {
    lane: usize,
    /// On a node: the epoch of the lease the partition was run under (its positions start
    /// over when it moves; a mark of another epoch is never committed).
    epoch: Option<u64>,
    logged_end: u64,
    next: BTreeMap<i32, i64>,
}

/// Commits offsets of batches whose log positions are sealed, and measures the lag, until the
/// session drops its sender; then makes a last, synchronous commit.
async fn commit_sealed(
    rt: Arc<PipelineRuntime>,
    consumer: Arc<StreamConsumer>,
    topic: String,
    mut marks: mpsc::UnboundedReceiver<Mark>,
) {
    let mut sealed = rt.sealed_end();
    let mut waiting: VecDeque<Mark> = VecDeque::new();
    // Sealed but not yet committed (a failed commit is retried with later ones).
    let mut ready: BTreeMap<i32, i64> = BTreeMap::new();
    let mut lag_tick = tokio::time::interval(broker::LAG_EVERY);
    loop {
        tokio::select! {
            m = marks.recv() => match m {
                Some(m) => waiting.push_back(m),
                None => break,
            },
            changed = sealed.changed() => if changed.is_err() { break },
            _ = lag_tick.tick() => {
                let (c, t) = (consumer.clone(), topic.clone());
                if let Ok(Ok(lag)) = tokio::task::spawn_blocking(move || measure_lag(&c, &t)).await {
                    rt.source_status.set_lag(lag);
                }
            }
        }
        forget_moved(&rt, &mut waiting);
        take_sealed(&mut waiting, &sealed.borrow_and_update(), &mut ready);
        commit(&rt, &consumer, &topic, &mut ready, CommitMode::Async);
    }
    let sealed_end = sealed.borrow().clone();
    forget_moved(&rt, &mut waiting);
    take_sealed(&mut waiting, &sealed_end, &mut ready);
    // Bounded, so an unreachable broker cannot hold up shutdown; what is not committed is
    // redelivered and dropped by `event_id`.
    let c = consumer.clone();
    let last = tokio::task::spawn_blocking(move || {
        commit(&rt, &c, &topic, &mut ready, CommitMode::Sync);
    });
    let _ = tokio::time::timeout(FINAL_COMMIT_TIMEOUT, last).await;
}

/// On a node: drops the marks of partitions no longer run under the lease they were taken
/// under (their positions were given up; the next holder commits its own).
fn forget_moved(rt: &PipelineRuntime, waiting: &mut VecDeque<Mark>) {
    if rt.node().is_none() {
        return;
    }
    let owned = rt.owned();
    let owned = owned.borrow();
    waiting.retain(|m| m.epoch.is_some() && owned.get(&(m.lane as u32)) == m.epoch.as_ref());
}

/// Moves the offsets of marks whose partition log is sealed up to them (`sealed_end`, per
/// pipeline partition) into `ready`. A Kafka partition belongs to one pipeline partition,
/// whose marks are sealed in order: taking any sealed mark never skips an earlier one.
fn take_sealed(waiting: &mut VecDeque<Mark>, sealed_end: &[u64], ready: &mut BTreeMap<i32, i64>) {
    waiting.retain(|m| {
        if sealed_end.get(m.lane).is_none_or(|s| *s < m.logged_end) {
            return true;
        }
        for (p, n) in &m.next {
            let e = ready.entry(*p).or_insert(*n);
            *e = (*e).max(*n);
        }
        false
    });
}

fn commit(
    rt: &PipelineRuntime,
    consumer: &StreamConsumer,
    topic: &str,
    ready: &mut BTreeMap<i32, i64>,
    mode: CommitMode,
) {
    if ready.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, n) in ready.iter() {
        if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::Offset(*n)) {
            tracing::warn!(pipeline = %rt.pipeline.name, partition = p, error = %e, "invalid offset to commit");
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => {
            tracing::debug!(pipeline = %rt.pipeline.name, offsets = ?ready, "committed sealed Kafka offsets");
            ready.clear();
        }
        // Retried with the next commit (e.g. during a rebalance).
        Err(e) => {
            tracing::warn!(pipeline = %rt.pipeline.name, error = %e, "committing Kafka offsets failed; will retry")
        }
    }
}

/// High watermark − consumed position, per assigned partition (blocking: run off the runtime).
fn measure_lag(consumer: &StreamConsumer, topic: &str) -> KafkaResult<BTreeMap<String, u64>> {
    let positions = consumer.position()?;
    let mut lag = BTreeMap::new();
    for e in consumer.assignment()?.elements_for_topic(topic) {
        let p = e.partition();
        let (low, high) = consumer.fetch_watermarks(topic, p, METADATA_TIMEOUT)?;
        let at = match positions.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(n)) => n,
            // Nothing consumed yet from this partition: all of it is behind.
            _ => low,
        };
        lag.insert(p.to_string(), u64::try_from(high - at).unwrap_or(0));
    }
    Ok(lag)
}

/// An http pipeline's `buffer: {kafka: …}`: the door's accepted events published to the
/// topic — event with key k (its `partition_key` or `event_id`) to Kafka partition
/// `crc32(k) mod partitions`, which the pipeline consumes as its partition of that number
/// (without a key, a request's events go to the next partition in turn) — acknowledged once
/// the broker has them all (`acks=all`, idempotent producer). The pipeline consumes the topic
/// as a kafka source; duplicates are dropped there, by `event_id`.
pub struct KafkaBuffer {
    producer: rdkafka::producer::FutureProducer,
    topic: String,
}

/// How long a publish to the buffer may take before the request fails.
const BUFFER_TIMEOUT: Duration = Duration::from_secs(30);

impl KafkaBuffer {
    pub fn new(
        rt: &PipelineRuntime,
        brokers: &str,
        topic: &str,
        security: &KafkaSecurity,
        properties: &BTreeMap<String, String>,
    ) -> anyhow::Result<Self> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers)
            .set(
                "client.id",
                format!("lambda-ctl-{}-buffer", rt.pipeline.name),
            )
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", BUFFER_TIMEOUT.as_millis().to_string());
        secured(&mut c, security, properties);
        let producer = c
            .create()
            .context("creating the Kafka producer of the buffer (check `properties`)")?;
        Ok(KafkaBuffer {
            producer,
            topic: topic.to_string(),
        })
    }
}

impl crate::speed::door::Forward for KafkaBuffer {
    fn forward<'a>(
        &'a self,
        rt: &'a PipelineRuntime,
        body: bytes::Bytes,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<crate::speed::door::IngestReport>> {
        Box::pin(async move {
            let (mut report, records) = rt.accept(&body).await?;
            let sends = records.iter().map(|a| {
                let mut message = rdkafka::producer::FutureRecord::<str, [u8]>::to(&self.topic)
                    .partition(i32::try_from(a.partition).unwrap_or(0))
                    .payload(&a.record[..]);
                if let Some(k) = a.key.as_deref() {
                    message = message.key(k);
                }
                self.producer.send(message, BUFFER_TIMEOUT)
            });
            for sent in futures::future::join_all(sends).await {
                // Not acknowledged: the client retries the request (`event_id` drops what the
                // broker did take).
                sent.map_err(|(e, _)| e)
                    .with_context(|| format!("publishing to the buffer topic `{}`", self.topic))?;
            }
            report.accepted = records.len() as u64;
            Ok(report)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{KafkaProtocol, KafkaSasl};

    #[test]
    fn marks_become_ready_only_when_sealed() {
        let mark = |lane, logged_end, next: &[(i32, i64)]| Mark {
            lane,
            epoch: None,
            logged_end,
            next: next.iter().copied().collect(),
        };
        let mut waiting = VecDeque::from([
            mark(0, 10, &[(0, 5), (2, 7)]),
            mark(1, 4, &[(1, 3)]),
            mark(0, 20, &[(0, 9)]),
        ]);
        let mut ready = BTreeMap::new();
        take_sealed(&mut waiting, &[9, 3], &mut ready);
        assert!(ready.is_empty(), "no partition sealed up to its mark");
        // Pipeline partition 1 sealed: its Kafka partition commits, whatever 0 does.
        take_sealed(&mut waiting, &[9, 4], &mut ready);
        assert_eq!(ready, BTreeMap::from([(1, 3)]));
        take_sealed(&mut waiting, &[10, 4], &mut ready);
        assert_eq!(ready, BTreeMap::from([(0, 5), (1, 3), (2, 7)]));
        take_sealed(&mut waiting, &[25, 9], &mut ready);
        assert_eq!(ready, BTreeMap::from([(0, 9), (1, 3), (2, 7)]));
        assert!(waiting.is_empty());
    }

    #[test]
    fn event_hubs_settings_reach_librdkafka() {
        let security = KafkaSecurity {
            protocol: KafkaProtocol::SaslSsl,
            sasl: Some(KafkaSasl {
                mechanism: "PLAIN".into(),
                username: "$ConnectionString".into(),
                password: "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKey=k".into(),
            }),
            ssl_ca_location: None,
        };
        let props = BTreeMap::from([("session.timeout.ms".to_string(), "30000".to_string())]);
        let c = client_config(
            "clicks",
            "ns.servicebus.windows.net:9093",
            "g",
            &security,
            &props,
        );
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(c.get("sasl.username"), Some("$ConnectionString"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("session.timeout.ms"), Some("30000"));
        assert_eq!(
            c.get("bootstrap.servers"),
            Some("ns.servicebus.windows.net:9093")
        );
    }
}
