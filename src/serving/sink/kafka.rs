//! The `kafka` sink: the view as a changelog topic. Each record's key is the row's identity,
//! `{"window_start": …, "<group key>": …}` (JSON, in the view's column order, the same bytes
//! for the same row every time, so the default partitioner puts every version of a row in one
//! partition and compaction keeps its latest); its value is the row as the HTTP API serves it
//! plus `as_of` (where the numbers came from); a row that vanished (sessions merged, windows
//! retired) gets a tombstone — a record with its key and no value. The latest record per key
//! of the topic is the view.
//!
//! Exactly once, by convergence: at start (and after a failed delivery) the sink reads the
//! topic from its beginning to its end and keeps the latest value per key — what the topic
//! holds — and then produces only what differs from the served answer. A delivery's records
//! are acknowledged by every in-sync replica (`acks=all`) with the idempotent producer (no
//! duplicate or reordering on retries) before the next delivery starts. A record that may or
//! may not have been written when a delivery failed is found by the read-back, so nothing is
//! written twice except a record whose acknowledgement was lost, which carries the same value.
//!
//! The topic is created if missing (one partition, `cleanup.policy=compact`); create it
//! yourself for more partitions. The read-back costs a scan of the topic: keep it compacted.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::rows::{Cell, Rows, Shape};
use super::{Delivery, Holding, SinkError, Target};
use crate::spec::KafkaSecurity;
use crate::spec::pipeline::AS_OF;

/// How long metadata and watermark requests may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a record may wait for the broker's acknowledgement (librdkafka retries within).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading the topic back may take before the attempt counts as failed.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(300);

pub struct KafkaTarget {
    topic: String,
    /// `PIPELINE.VIEW`, for the client id.
    view: String,
    shape: Shape,
    /// The connection settings shared by the producer, the reader and the admin client.
    config: ClientConfig,
    producer: Option<FutureProducer>,
}

impl KafkaTarget {
    pub fn new(
        brokers: &str,
        topic: &str,
        security: &KafkaSecurity,
        properties: &BTreeMap<String, String>,
        view: &str,
        shape: Shape,
    ) -> KafkaTarget {
        let mut config = ClientConfig::new();
        for (k, v) in properties {
            config.set(k, v);
        }
        config
            .set("bootstrap.servers", brokers)
            .set("client.id", format!("lambda-ctl-sink-{view}"))
            .set("security.protocol", security.protocol.as_str());
        if let Some(sasl) = &security.sasl {
            config
                .set("sasl.mechanism", &sasl.mechanism)
                .set("sasl.username", &sasl.username)
                .set("sasl.password", &sasl.password);
        }
        if let Some(ca) = &security.ssl_ca_location {
            config.set("ssl.ca.location", ca);
        }
        KafkaTarget {
            topic: topic.to_string(),
            view: view.to_string(),
            shape,
            config,
            producer: None,
        }
    }

    fn producer(&mut self) -> Result<FutureProducer, SinkError> {
        if let Some(p) = &self.producer {
            return Ok(p.clone());
        }
        let producer: FutureProducer = self
            .config
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .create()
            .map_err(|e| SinkError::Config(format!("creating the kafka producer: {e}")))?;
        self.producer = Some(producer.clone());
        Ok(producer)
    }

    /// Creates the topic (compacted, one partition) unless it exists.
    async fn ensure_topic(&self, producer: &FutureProducer) -> Result<(), SinkError> {
        let (client, topic) = (producer.clone(), self.topic.clone());
        let exists =
            tokio::task::spawn_blocking(move || {
                let md = client
                    .client()
                    .fetch_metadata(Some(&topic), METADATA_TIMEOUT)?;
                Ok::<_, KafkaError>(md.topics().iter().any(|t| {
                    t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                }))
            })
            .await
            .map_err(|e| anyhow::anyhow!("the metadata task failed: {e}"))?
            .map_err(|e| anyhow::anyhow!("reading the metadata of topic {}: {e}", self.topic))?;
        if exists {
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .create()
            .map_err(|e| SinkError::Config(format!("creating the kafka admin client: {e}")))?;
        let new = NewTopic::new(&self.topic, 1, TopicReplication::Fixed(1))
            .set("cleanup.policy", "compact");
        let opts = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
        let created = admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| anyhow::anyhow!("creating topic {}: {e}", self.topic))?;
        for r in created {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(SinkError::Failed(anyhow::anyhow!(
                        "creating topic {t}: {code} (create it yourself, compacted)"
                    )));
                }
            }
        }
        tracing::info!(topic = %self.topic, view = %self.view, "created the sink topic");
        Ok(())
    }

    /// The rows the topic holds: the latest record per key, tombstones removing theirs.
    async fn read_back(&self) -> Result<Rows, SinkError> {
        let mut config = self.config.clone();
        config
            .set("group.id", format!("lambda-ctl-sink-{}", self.view))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true");
        let topic = self.topic.clone();
        let latest = tokio::task::spawn_blocking(move || latest_per_key(&config, &topic))
            .await
            .map_err(|e| anyhow::anyhow!("the read-back task failed: {e}"))?
            .map_err(|e| anyhow::anyhow!("reading topic {} back: {e:#}", self.topic))?;
        let mut rows = Rows::new();
        let mut foreign = 0usize;
        for value in latest.into_values().flatten() {
            match self.parse(&value) {
                Some(row) => {
                    rows.insert(self.shape.key_of(&row), row);
                }
                None => foreign += 1,
            }
        }
        if foreign > 0 {
            tracing::warn!(topic = %self.topic, records = foreign, "records in the sink topic that are not rows of this view; ignored");
        }
        Ok(rows)
    }

    /// A row from a record value the sink wrote; `None` for anything else. Each value is
    /// read from its text, so floats come back exactly.
    fn parse(&self, value: &[u8]) -> Option<Vec<Cell>> {
        let obj: HashMap<String, Box<RawValue>> = serde_json::from_slice(value).ok()?;
        self.shape
            .columns
            .iter()
            .map(|(name, kind)| Cell::from_json_text(*kind, obj.get(name)?.get()))
            .collect()
    }

    /// The record key of the row identified by `key`: its key columns as a JSON object, in
    /// column order (written by hand so the bytes never depend on a map's ordering).
    fn key_bytes(&self, key: &[Cell]) -> String {
        let mut out = String::from("{");
        for (n, (name, cell)) in self.shape.key_names().zip(key).enumerate() {
            if n > 0 {
                out.push(',');
            }
            out.push_str(&Value::from(name).to_string());
            out.push(':');
            out.push_str(&cell.json().to_string());
        }
        out.push('}');
        out
    }

    fn value_bytes(&self, row: &[Cell], as_of: &Value) -> String {
        let mut obj = Map::new();
        for ((name, _), cell) in self.shape.columns.iter().zip(row) {
            obj.insert(name.clone(), cell.json());
        }
        obj.insert(AS_OF.to_string(), as_of.clone());
        Value::Object(obj).to_string()
    }
}

/// Reads every partition of `topic` from its start to its current end; the latest value per
/// key (`None`: a tombstone). The end is where the consumer reports the partition's end
/// (`enable.partition.eof`): the watermarks some Kafka-protocol brokers list (tansu 0.6) lag
/// behind what a fetch returns, and stopping at them would miss records.
fn latest_per_key(
    config: &ClientConfig,
    topic: &str,
) -> anyhow::Result<HashMap<Vec<u8>, Option<Vec<u8>>>> {
    let consumer: BaseConsumer = config.create()?;
    let md = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
    let mut open: Vec<i32> = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            open.push(p.id());
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    let mut latest = HashMap::new();
    if open.is_empty() {
        return Ok(latest);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + READ_BACK_TIMEOUT;
    while !open.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "partitions {open:?} not read to their end after {READ_BACK_TIMEOUT:?}"
        );
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => open.retain(|o| *o != p),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                if let Some(key) = m.key() {
                    latest.insert(key.to_vec(), m.payload().map(<[u8]>::to_vec));
                }
            }
        }
    }
    Ok(latest)
}

#[async_trait]
impl Target for KafkaTarget {
    async fn open(&mut self) -> Result<Holding, SinkError> {
        let producer = self.producer()?;
        self.ensure_topic(&producer).await?;
        Ok(Holding::Rows(self.read_back().await?))
    }

    async fn apply(&mut self, delivery: &Delivery<'_>) -> Result<(), SinkError> {
        let producer = self.producer()?;
        let as_of = serde_json::to_value(delivery.as_of)
            .map_err(|e| anyhow::anyhow!("encoding as_of: {e}"))?;
        let mut records: Vec<(String, Option<String>)> =
            Vec::with_capacity(delivery.diff.deletes.len() + delivery.diff.upserts.len());
        for key in &delivery.diff.deletes {
            records.push((self.key_bytes(key), None));
        }
        for row in &delivery.diff.upserts {
            let key = self.shape.key_of(row);
            records.push((self.key_bytes(&key), Some(self.value_bytes(row, &as_of))));
        }
        let topic = self.topic.as_str();
        let sends = records.iter().map(|(key, value)| {
            let producer = &producer;
            async move {
                let mut record: FutureRecord<'_, str, str> = FutureRecord::to(topic).key(key);
                if let Some(v) = value {
                    record = record.payload(v);
                }
                producer
                    .send(record, Timeout::After(DELIVERY_TIMEOUT))
                    .await
                    .map_err(|(e, _)| e)
            }
        });
        let results = futures::future::join_all(sends).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(SinkError::Failed(anyhow::anyhow!(
                "{failed} of {} records to topic {} not acknowledged: {e}",
                records.len(),
                self.topic
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::sink::rows::Kind;

    #[test]
    fn keys_are_the_same_bytes_for_the_same_row_and_values_read_back() {
        let shape = Shape {
            columns: vec![
                ("window_start".into(), Kind::Time),
                ("window_end".into(), Kind::Time),
                ("country".into(), Kind::Text),
                ("n".into(), Kind::Int),
                ("mean".into(), Kind::Float),
            ],
            key: vec![0, 2],
            all_time: false,
        };
        let t = KafkaTarget::new(
            "127.0.0.1:9092",
            "revenue",
            &KafkaSecurity::default(),
            &BTreeMap::new(),
            "orders.by_country",
            shape,
        );
        let row = vec![
            Cell::Time(1_763_719_200_000),
            Cell::Time(1_763_719_260_000),
            Cell::Text("DE".into()),
            Cell::Int(3),
            Cell::Float(0.1 + 0.2),
        ];
        let key = t.shape.key_of(&row);
        assert_eq!(
            t.key_bytes(&key),
            r#"{"window_start":"2025-11-21T10:00:00.000Z","country":"DE"}"#
        );
        let value = t.value_bytes(&row, &serde_json::json!({"batch_run": null}));
        assert_eq!(t.parse(value.as_bytes()), Some(row));
        assert_eq!(t.parse(b"{\"window_start\": 1}"), None);
        assert_eq!(t.parse(b"not json"), None);
    }
}
