//! The `nats` source: a JetStream durable pull consumer (`consumer`, default
//! `lambda-<pipeline>`) on `stream`, filtered to `subject`. The stream is created (file storage,
//! subjects = [`subject`]) if it does not exist; an existing stream or consumer is used as
//! configured.
//!
//! Position = stream sequence, tracked by the server as the consumer's ack floor. The consumer
//! is created with `AckPolicy::Explicit`: after a batch went through the door (durable in the
//! write-ahead log), each of its messages is acknowledged. Not `AckPolicy::All`: after a crash
//! the server redelivers the dead process's unacknowledged messages only after `ack_wait`,
//! while newer ones arrive at once — acknowledging a newer sequence under `All` would
//! acknowledge the older, never-archived ones with it (seen: a kill -9 lost a batch). An
//! existing consumer with `AckPolicy::All` is used as configured, with a warning saying so.
//! A crash before the ack makes the server redeliver after `ack_wait`/reconnect; with
//! `event_id` those copies are dropped at the door.
//!
//! Lag: the consumer's `num_pending` (messages of the stream not yet delivered to it).
//!
//! Connection loss inside a session is handled by the client's own reconnects; failing to
//! connect at all, or a consumer stream error, ends the session and the source reconnects with
//! backoff.
//!
//! **Partitioned subjects** (`subject: clicks.{partition}`, see [`crate::spec::NATS_PARTITION`]):
//! pipeline partition K reads subject `clicks.K`; producers pick the partition (the `buffer`
//! publishes to `crc32(key) mod N`). One `serve` consumes `clicks.*` with the durable consumer
//! as above, each message into the partition its subject names, and notes each partition's
//! next stream sequence ([`crate::speed::runtime::Lane::note_offsets`]) so its seals record
//! where the archive ends (`source_offsets`). On nodes (`serve --node`) there is no durable
//! consumer: each partition whose lease the node holds has an ordered consumer on its subject
//! starting at the sequence recorded with the partition's last sealed segment — whichever node
//! sealed it — so the stream keeps the events until they are archived and nothing is
//! acknowledged (positions live in the state DB, as Kafka offsets do on nodes). Lag per
//! partition: the messages the consumer had still to deliver after its last one.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::AckPolicy, consumer::DeliverPolicy, consumer::pull};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::broker::{self, Body};
use crate::plan::Rejection;
use crate::spec::{nats_partition_of, nats_subject};
use crate::speed::runtime::PipelineRuntime;
use crate::state::redact;

/// Batches going through the door at once (their log appends share one fsync).
const IN_FLIGHT: usize = 4;
/// Messages per pull request and per batch through the door. At low rates batches stay small
/// (a batch waits at most `broker::LINGER` after its first message).
const BATCH: usize = 10_000;
/// Unacknowledged messages the server lets the consumer hold: the batches in flight, the one
/// being acknowledged and the one being received.
const MAX_ACK_PENDING: i64 = ((IN_FLIGHT + 2) * BATCH) as i64;

pub struct NatsSource {
    rt: Arc<PipelineRuntime>,
    url: String,
    stream: String,
    subject: String,
    consumer: String,
    /// The subject names the partition (`{partition}`).
    partitioned: bool,
    /// On a node: what the per-partition consumers share across sessions.
    owned: Arc<OwnedPartitions>,
}

/// On a node, the partitions' consumers' shared state.
struct OwnedPartitions {
    rt: Arc<PipelineRuntime>,
    subject: String,
    /// Per partition run here: the lease epoch it runs under and the next stream sequence to
    /// read, across sessions of this process (its log holds what came before).
    resume: Mutex<BTreeMap<u32, (u64, u64)>>,
    /// Each running partition's pending messages (its consumer's, after its last delivery).
    lag: Mutex<BTreeMap<u32, u64>>,
}

impl NatsSource {
    pub fn new(
        rt: Arc<PipelineRuntime>,
        url: &str,
        stream: &str,
        subject: &str,
        consumer: &str,
    ) -> Self {
        NatsSource {
            rt: rt.clone(),
            url: url.to_string(),
            stream: stream.to_string(),
            subject: subject.to_string(),
            consumer: consumer.to_string(),
            partitioned: nats_partition_of(subject, &nats_subject(subject, Some(0))).is_some(),
            owned: Arc::new(OwnedPartitions {
                rt,
                subject: subject.to_string(),
                resume: Mutex::new(BTreeMap::new()),
                lag: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Where a message of `subject` goes: `Ok(None)` by its key (the subject is not
    /// partitioned), `Ok(Some(k))` into partition k (the one it names), `Err(reason)` nowhere
    /// — it names no partition of the pipeline (nodes never read such a subject, so a single
    /// `serve` does not count it either: it is dead-lettered).
    fn partition_of(&self, subject: &str) -> Result<Option<u32>, String> {
        if !self.partitioned {
            return Ok(None);
        }
        let partitions = self.rt.pipeline.partitions.max(1);
        match nats_partition_of(&self.subject, subject) {
            Some(k) if k < partitions => Ok(Some(k)),
            _ => Err(format!(
                "subject `{subject}` names no partition of `{}` (0 to {})",
                self.subject,
                partitions - 1
            )),
        }
    }
}

/// Opens the stream, creating it (file storage, `subjects`) when it does not exist.
pub(super) async fn open_stream(
    js: &jetstream::Context,
    stream: &str,
    subjects: String,
) -> anyhow::Result<jetstream::stream::Stream> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: stream.to_string(),
        subjects: vec![subjects],
        ..Default::default()
    })
    .await
    .with_context(|| format!("opening JetStream stream `{stream}`"))
}

impl broker::Session for NatsSource {
    const KIND: &'static str = "nats";

    async fn session(&self, link: &broker::Link) -> anyhow::Result<()> {
        let shutdown = &link.shutdown;
        let client = async_nats::connect(self.url.as_str())
            .await
            .with_context(|| format!("connecting to NATS at {}", redact(&self.url)))?;
        let js = jetstream::new(client.clone());
        let every = nats_subject(&self.subject, None);
        let stream = open_stream(&js, &self.stream, every.clone()).await?;
        if self.rt.node().is_some() {
            return self.run_owned(&stream, link).await;
        }
        let consumer = stream
            .get_or_create_consumer(
                &self.consumer,
                pull::Config {
                    durable_name: Some(self.consumer.clone()),
                    filter_subject: every,
                    ack_policy: AckPolicy::Explicit,
                    max_ack_pending: MAX_ACK_PENDING,
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("opening durable consumer `{}`", self.consumer))?;
        let ack_all = consumer.cached_info().config.ack_policy == AckPolicy::All;
        if ack_all {
            tracing::warn!(pipeline = %self.rt.pipeline.name, consumer = %self.consumer, "the JetStream consumer acknowledges with AckPolicy::All: after a crash, a newer message's ack can acknowledge older redeliveries before they are archived; delete the consumer so it is created with explicit acks");
        }
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .messages()
            .await
            .context("starting the pull consumer")?;
        link.connected();
        tracing::info!(pipeline = %self.rt.pipeline.name, stream = %self.stream, consumer = %self.consumer, pending = consumer.cached_info().num_pending, "NATS connected");
        let _lag = broker::lag_probe(&self.rt, {
            let consumer = consumer.clone();
            move || {
                let consumer = consumer.clone();
                async move {
                    let info = consumer
                        .get_info()
                        .await
                        .context("reading the consumer's info")?;
                    Ok(BTreeMap::from([("pending".to_string(), info.num_pending)]))
                }
            }
        });

        // Two stages, in delivery order: this loop takes batches and starts them through the
        // door; the acker waits for each to be durable and acknowledges it. Up to IN_FLIGHT
        // batches are between the two, so their appends share the log's group commit.
        // Acknowledging in order matters: with AckPolicy::All an ack covers every lower
        // sequence, so no batch may be acknowledged before the ones delivered earlier.
        // A partitioned subject's batch also notes, per partition, the next stream sequence
        // once it is durable — in delivery order, so a note never covers an earlier batch
        // that is not in the log yet.
        type InFlight = (JoinHandle<bool>, Vec<jetstream::Message>, Notes);
        let (tx, mut rx) = mpsc::channel::<InFlight>(IN_FLIGHT);
        let rt = self.rt.clone();
        let acker = tokio::spawn(async move {
            while let Some((ingest, received, notes)) = rx.recv().await {
                if !ingest.await.context("a batch's ingest task failed")? {
                    return Ok(()); // shutdown: the rest stays unacknowledged
                }
                for (lane, next) in notes {
                    if let Some(l) = rt.lanes().get(lane) {
                        l.note_offsets(l.logged_end(), next);
                    }
                }
                acknowledge(ack_all, &received).await?;
            }
            anyhow::Ok(())
        });
        let mut failure = None;
        let meta = broker::meta_keys(&self.rt);
        // A partitioned subject: per partition, the next stream sequence its archive does not
        // hold. A message below it is archived already — a redelivery after a crash, or one
        // that nodes archived while they ran the pipeline — and is acknowledged, not counted.
        let mut archived: BTreeMap<u32, u64> = BTreeMap::new();
        if self.partitioned {
            for partition in self.rt.partitions() {
                let offsets = self
                    .rt
                    .db()
                    .source_offsets(&self.rt.pipeline.name, partition)
                    .await?;
                if let Some(n) = offsets.get(&i32::try_from(partition)?) {
                    archived.insert(partition, u64::try_from(*n).unwrap_or(0));
                }
            }
        }
        while let Some(batch) = broker::next_batch(&mut messages, BATCH, shutdown).await {
            let mut bodies: BTreeMap<Option<usize>, Body> = BTreeMap::new();
            let mut notes = Notes::new();
            let mut stray = Vec::new();
            let mut received = Vec::with_capacity(batch.len());
            for m in batch {
                match m {
                    Ok(m) => {
                        // A message without its sequence is never taken for archived.
                        let seq = m.info().ok().map(|i| i.stream_sequence);
                        let held = |k: &u32| archived.get(k).zip(seq).is_some_and(|(n, s)| s < *n);
                        match self.partition_of(&m.subject) {
                            Ok(Some(k)) if held(&k) => {}
                            Ok(partition) => {
                                let lane = partition.and_then(|k| self.rt.lane_index(k));
                                bodies
                                    .entry(lane)
                                    .or_insert_with(|| Body::new(self.rt.pipeline.format))
                                    .push_meta(&m.payload, &meta, |k| meta_value(&m, k));
                                if let (Some(lane), Some(k), Some(seq)) = (lane, partition, seq) {
                                    let next = notes.entry(lane).or_default();
                                    let next = next.entry(k as i32).or_default();
                                    *next = (*next).max(seq_after(seq));
                                }
                            }
                            Err(reason) => stray.push(Rejection {
                                line: 1,
                                reason,
                                raw: String::from_utf8_lossy(&m.payload).into_owned(),
                            }),
                        }
                        received.push(m);
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let (rt, stop) = (self.rt.clone(), shutdown.clone());
            let ingest = tokio::spawn(async move {
                if !broker::reject_durably(&rt, "nats", &stray, &stop).await {
                    return false;
                }
                for (lane, body) in bodies {
                    let bytes = body.into_bytes();
                    if !broker::ingest_durably_into(&rt, "nats", bytes, lane, &stop).await {
                        return false;
                    }
                }
                true
            });
            // A closed channel means the acker stopped; its error is reported below.
            if tx.send((ingest, received, notes)).await.is_err() || failure.is_some() {
                break;
            }
        }
        drop(tx);
        acker.await.context("the acknowledging task failed")??;
        if let Some(e) = failure {
            return Err(anyhow::anyhow!("receiving from JetStream: {e}"));
        }
        // Make the last acknowledgements reach the server before the connection drops.
        let _ = client.flush().await;
        Ok(())
    }
}

/// Per pipeline partition index: the next stream sequence of each partition (`source_offsets`'
/// source partition = the partition the subject names).
type Notes = BTreeMap<usize, BTreeMap<i32, i64>>;

/// The stream sequence after `seq`, as a recorded offset.
fn seq_after(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX).saturating_add(1)
}

impl NatsSource {
    /// On a node: runs an ordered consumer for each partition whose lease the node holds,
    /// started and stopped as leases come and go, until shutdown or a consumer fails.
    async fn run_owned(
        &self,
        stream: &jetstream::stream::Stream,
        link: &broker::Link,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.partitioned,
            "pipeline `{}`: on nodes a nats source needs `{}` in its subject (each partition its own subject), found `{}`",
            self.rt.pipeline.name,
            crate::spec::NATS_PARTITION,
            self.subject
        );
        link.connected();
        tracing::info!(pipeline = %self.rt.pipeline.name, stream = %self.stream, subject = %self.subject, "NATS connected (per-partition consumers)");
        let shutdown = &link.shutdown;
        let mut owned = self.rt.owned();
        owned.mark_changed();
        let (failed_tx, mut failed) = mpsc::unbounded_channel::<anyhow::Error>();
        let mut running: BTreeMap<u32, (u64, CancellationToken, JoinHandle<()>)> = BTreeMap::new();
        let result = loop {
            tokio::select! {
                changed = owned.changed() => {
                    if changed.is_err() {
                        break Ok(());
                    }
                    let now = owned.borrow_and_update().clone();
                    // Stop those given up or retaken under another lease.
                    let gone: Vec<u32> = running
                        .iter()
                        .filter(|(p, (epoch, ..))| now.get(p) != Some(epoch))
                        .map(|(p, _)| *p)
                        .collect();
                    for p in gone {
                        if let Some((_, stop, task)) = running.remove(&p) {
                            stop.cancel();
                            let _ = task.await;
                        }
                        self.owned.lag.lock().remove(&p);
                    }
                    for (partition, epoch) in now {
                        if running.contains_key(&partition) {
                            continue;
                        }
                        let stop = shutdown.child_token();
                        let task = tokio::spawn({
                            let (owned, stream, stop, failed) =
                                (self.owned.clone(), stream.clone(), stop.clone(), failed_tx.clone());
                            async move {
                                if let Err(e) = owned.run(&stream, partition, epoch, &stop).await {
                                    let _ = failed.send(e.context(format!("partition {partition}")));
                                }
                            }
                        });
                        running.insert(partition, (epoch, stop, task));
                    }
                }
                Some(e) = failed.recv() => break Err(e),
                _ = shutdown.cancelled() => break Ok(()),
            }
        };
        for (_, (_, stop, task)) in running {
            stop.cancel();
            let _ = task.await;
        }
        result
    }
}

impl OwnedPartitions {
    /// Reads partition `partition` (run here under lease epoch `epoch`) from its subject into
    /// its log until `stop`: from where this process left it under the same lease, else from
    /// the sequence recorded with its last sealed segment, else from the stream's start. After
    /// each batch is durable, its next sequence is noted for the seal to record.
    async fn run(
        &self,
        stream: &jetstream::stream::Stream,
        partition: u32,
        epoch: u64,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let rt = &self.rt;
        let lane = rt
            .lane_index(partition)
            .with_context(|| format!("no partition {partition}"))?;
        let key = i32::try_from(partition)?;
        let kept = self.resume.lock().get(&partition).copied();
        let next = match kept {
            Some((e, next)) if e == epoch => next,
            _ => {
                let recorded = rt
                    .db()
                    .source_offsets(&rt.pipeline.name, partition)
                    .await?
                    .get(&key)
                    .map_or(1, |n| u64::try_from(*n).unwrap_or(1));
                self.resume.lock().insert(partition, (epoch, recorded));
                recorded
            }
        };
        let subject = nats_subject(&self.subject, Some(partition));
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: if next <= 1 {
                    DeliverPolicy::All
                } else {
                    DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    }
                },
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating an ordered consumer on `{subject}`"))?;
        let mut messages = consumer
            .messages()
            .await
            .context("starting the ordered consumer")?;
        tracing::info!(pipeline = %rt.pipeline.name, partition, %subject, from_sequence = next, "NATS partition consumer started");
        let meta = broker::meta_keys(rt);
        while let Some(batch) = broker::next_batch(&mut messages, BATCH, stop).await {
            let mut body = Body::new(rt.pipeline.format);
            let mut last = None;
            let mut failure = None;
            for m in batch {
                match m {
                    Ok(m) => {
                        body.push_meta(&m.payload, &meta, |k| meta_value(&m, k));
                        if let Ok(info) = m.info() {
                            last = Some((info.stream_sequence, info.pending));
                        }
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if rt.owned().borrow().get(&partition) != Some(&epoch) {
                return Ok(()); // given up meanwhile: the next holder reads these
            }
            if !broker::ingest_durably_into(rt, "nats", body.into_bytes(), Some(lane), stop).await
                || rt.owned().borrow().get(&partition) != Some(&epoch)
            {
                return Ok(()); // stopped, or given up meanwhile: nothing to note
            }
            if let Some((seq, pending)) = last {
                let l = &rt.lanes()[lane];
                l.note_offsets(l.logged_end(), BTreeMap::from([(key, seq_after(seq))]));
                let mut resume = self.resume.lock();
                if resume.get(&partition).is_some_and(|(e, _)| *e == epoch) {
                    resume.insert(partition, (epoch, seq + 1));
                }
                drop(resume);
                let lag = {
                    let mut lag = self.lag.lock();
                    lag.insert(partition, pending);
                    lag.iter().map(|(p, n)| (p.to_string(), *n)).collect()
                };
                rt.source_status.set_lag(lag);
            }
            if let Some(e) = failure {
                return Err(anyhow::anyhow!("receiving from JetStream: {e}"));
            }
        }
        Ok(())
    }
}

/// Acknowledges a durable batch: each message, or under an existing consumer's
/// `AckPolicy::All` its highest stream sequence (which covers every earlier one).
async fn acknowledge(ack_all: bool, received: &[jetstream::Message]) -> anyhow::Result<()> {
    if ack_all {
        let last = received
            .iter()
            .max_by_key(|m| m.info().map(|i| i.stream_sequence).unwrap_or(0));
        if let Some(m) = last {
            m.ack()
                .await
                .map_err(|e| anyhow::anyhow!("acknowledging a batch: {e}"))?;
        }
    } else {
        for m in received {
            m.ack()
                .await
                .map_err(|e| anyhow::anyhow!("acknowledging a message: {e}"))?;
        }
    }
    Ok(())
}

/// An http pipeline's `buffer: {nats: …}`: the door's accepted events published to the
/// stream — the event with key k (its `partition_key` or `event_id`) on the subject of
/// partition `crc32(k) mod partitions` (without a key, a request's events go to the next
/// partition in turn) — acknowledged once JetStream has acknowledged every one (stored). The
/// pipeline consumes the stream as a nats source with that partitioned subject; duplicates are
/// dropped there, by `event_id`.
pub struct NatsBuffer {
    url: String,
    stream: String,
    subject: String,
    /// Connected, with the stream opened, on first use.
    js: tokio::sync::OnceCell<jetstream::Context>,
}

impl NatsBuffer {
    pub fn new(url: &str, stream: &str, subject: &str) -> Self {
        NatsBuffer {
            url: url.to_string(),
            stream: stream.to_string(),
            subject: subject.to_string(),
            js: tokio::sync::OnceCell::new(),
        }
    }

    async fn context(&self) -> anyhow::Result<&jetstream::Context> {
        self.js
            .get_or_try_init(|| async {
                let client = async_nats::connect(self.url.as_str())
                    .await
                    .with_context(|| format!("connecting to NATS at {}", redact(&self.url)))?;
                let js = jetstream::new(client);
                open_stream(&js, &self.stream, nats_subject(&self.subject, None)).await?;
                anyhow::Ok(js)
            })
            .await
    }
}

impl crate::speed::door::Forward for NatsBuffer {
    fn forward<'a>(
        &'a self,
        rt: &'a PipelineRuntime,
        body: bytes::Bytes,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<crate::speed::door::IngestReport>> {
        Box::pin(async move {
            let (mut report, records) = rt.accept(&body).await?;
            let js = self.context().await?;
            let failed = |e: &dyn std::fmt::Display| {
                anyhow::anyhow!("publishing to the buffer stream `{}`: {e}", self.stream)
            };
            // Published one after another (the client pipelines them), then every
            // acknowledgement awaited: not acknowledged, the client retries the request
            // (`event_id` drops what the stream did take).
            let mut acks = Vec::with_capacity(records.len());
            for a in &records {
                let subject = nats_subject(&self.subject, Some(a.partition as u32));
                let ack = js
                    .publish(subject, a.record.clone())
                    .await
                    .map_err(|e| failed(&e))?;
                acks.push(std::future::IntoFuture::into_future(ack));
            }
            for ack in futures::future::join_all(acks).await {
                ack.map_err(|e| failed(&e))?;
            }
            report.accepted = records.len() as u64;
            Ok(report)
        })
    }
}

/// One `meta.*` value of a JetStream message (`spec::NATS_META`).
fn meta_value(m: &async_nats::jetstream::Message, key: &str) -> serde_json::Value {
    use serde_json::Value as J;
    let info = m.info().ok();
    match key {
        "subject" => J::from(m.subject.as_str()),
        "stream_sequence" => info.map_or(J::Null, |i| J::from(i.stream_sequence)),
        "published" => info.map_or(J::Null, |i| {
            J::from((i.published.unix_timestamp_nanos() / 1_000_000) as i64)
        }),
        "delivered" => info.map_or(J::Null, |i| J::from(i.delivered)),
        _ => J::Null,
    }
}
