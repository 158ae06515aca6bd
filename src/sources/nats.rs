//! The `nats` source: a JetStream durable pull consumer (`consumer`, default
//! `lambda-<pipeline>`) on `stream`, filtered to `subject`. The stream is created (file storage,
//! subjects = [`subject`]) if it does not exist; an existing stream or consumer is used as
//! configured.
//!
//! Position = stream sequence, tracked by the server as the consumer's ack floor. The consumer
//! is created with `AckPolicy::All`: after a batch went through the door (durable in the
//! write-ahead log), acknowledging its highest-sequence message acknowledges the whole batch
//! in one message. An existing consumer with explicit acks gets one ack per message. A crash
//! before the ack makes the server redeliver after `ack_wait`/reconnect; with `event_id` those
//! copies are dropped at the door.
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
use tokio_util::sync::CancellationToken;

use super::broker::{self, Backoff, Body};
use crate::speed::runtime::PipelineRuntime;
use crate::state::redact;

/// Unacknowledged messages the server lets the consumer hold: several batches in flight.
const MAX_ACK_PENDING: i64 = 20_000;

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

    fn runtime(&self) -> &Arc<PipelineRuntime> {
        &self.rt
    }

    async fn session(
        &self,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
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
                    ack_policy: AckPolicy::All,
                    max_ack_pending: MAX_ACK_PENDING,
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("opening durable consumer `{}`", self.consumer))?;
        let ack_all = consumer.cached_info().config.ack_policy == AckPolicy::All;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(broker::MAX_BATCH)
            .messages()
            .await
            .context("starting the pull consumer")?;
        backoff.reset();
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

        while let Some(batch) = broker::next_batch(&mut messages, broker::MAX_BATCH, shutdown).await
        {
            let mut body = Body::new(self.rt.pipeline.format);
            let mut received = Vec::with_capacity(batch.len());
            let mut failure = None;
            for m in batch {
                match m {
                    Ok(m) => {
                        body.push(&m.payload);
                        received.push(m);
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if !broker::ingest_durably(&self.rt, "nats", body.into_bytes(), shutdown).await {
                return Ok(());
            }
            if ack_all {
                // The highest stream sequence covers every earlier one, redeliveries included.
                let last = received
                    .iter()
                    .max_by_key(|m| m.info().map(|i| i.stream_sequence).unwrap_or(0));
                if let Some(m) = last {
                    m.ack()
                        .await
                        .map_err(|e| anyhow::anyhow!("acknowledging a batch: {e}"))?;
                }
            } else {
                for m in &received {
                    m.ack()
                        .await
                        .map_err(|e| anyhow::anyhow!("acknowledging a message: {e}"))?;
                }
            }
            if let Some(e) = failure {
                return Err(anyhow::anyhow!("receiving from JetStream: {e}"));
            }
        }
        // Make the last acknowledgements reach the server before the connection drops.
        let _ = client.flush().await;
        Ok(())
    }
}
