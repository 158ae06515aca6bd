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

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::broker::{self, Body};
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
            rt,
            url: url.to_string(),
            stream: stream.to_string(),
            subject: subject.to_string(),
            consumer: consumer.to_string(),
        }
    }
}

impl broker::Session for NatsSource {
    const KIND: &'static str = "nats";

    async fn session(&self, link: &broker::Link) -> anyhow::Result<()> {
        let shutdown = &link.shutdown;
        let client = async_nats::connect(self.url.as_str())
            .await
            .with_context(|| format!("connecting to NATS at {}", redact(&self.url)))?;
        let js = jetstream::new(client.clone());
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject.clone()],
                ..Default::default()
            })
            .await
            .with_context(|| format!("opening JetStream stream `{}`", self.stream))?;
        let consumer = stream
            .get_or_create_consumer(
                &self.consumer,
                pull::Config {
                    durable_name: Some(self.consumer.clone()),
                    filter_subject: self.subject.clone(),
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
        let (tx, mut rx) = mpsc::channel::<(JoinHandle<bool>, Vec<jetstream::Message>)>(IN_FLIGHT);
        let acker = tokio::spawn(async move {
            while let Some((ingest, received)) = rx.recv().await {
                if !ingest.await.context("a batch's ingest task failed")? {
                    return Ok(()); // shutdown: the rest stays unacknowledged
                }
                acknowledge(ack_all, &received).await?;
            }
            anyhow::Ok(())
        });
        let mut failure = None;
        let meta = broker::meta_keys(&self.rt);
        while let Some(batch) = broker::next_batch(&mut messages, BATCH, shutdown).await {
            let mut body = Body::new(self.rt.pipeline.format);
            let mut received = Vec::with_capacity(batch.len());
            for m in batch {
                match m {
                    Ok(m) => {
                        body.push_meta(&m.payload, &meta, |k| meta_value(&m, k));
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
                broker::ingest_durably(&rt, "nats", body.into_bytes(), &stop).await
            });
            // A closed channel means the acker stopped; its error is reported below.
            if tx.send((ingest, received)).await.is_err() || failure.is_some() {
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
