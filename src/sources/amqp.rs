//! The `amqp` source: one RabbitMQ (AMQP 0-9-1) queue consumed with manual acknowledgements
//! and a prefetch window (`prefetch`, default 1000), Service Bus-style queue-based load
//! levelling: producers enqueue at their own pace, the pipeline drains at its own.
//!
//! A batch of deliveries is acknowledged (one `basic.ack` with `multiple`) only after it went
//! through the door, so a crash leaves it unacknowledged and RabbitMQ requeues it; with
//! `event_id` the redelivered copies are dropped at the door.
//!
//! Lag: the queue's ready message count (published, not yet delivered to a consumer).
//!
//! The queue is used as it exists (a passive declare, so quorum or otherwise configured queues
//! keep their arguments); if it does not exist it is declared durable with no arguments.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

use super::broker::{self, Body};
use crate::speed::runtime::PipelineRuntime;

pub struct AmqpSource {
    rt: Arc<PipelineRuntime>,
    url: String,
    queue: String,
    prefetch: u16,
}

impl AmqpSource {
    pub fn new(rt: Arc<PipelineRuntime>, url: &str, queue: &str, prefetch: u16) -> Self {
        AmqpSource {
            rt,
            url: url.to_string(),
            queue: queue.to_string(),
            prefetch,
        }
    }
}

impl broker::Session for AmqpSource {
    const KIND: &'static str = "amqp";

    /// One connection: consume until it fails or shutdown.
    async fn session(&self, link: &broker::Link) -> anyhow::Result<()> {
        let shutdown = &link.shutdown;
        // Named so the connection is recognisable in the broker's connection list.
        let name = format!("lambda-ctl-{}", self.rt.pipeline.name);
        let properties = ConnectionProperties::default().with_connection_name(name.as_str().into());
        let conn = Connection::connect(&self.url, properties)
            .await
            .context("connecting to the AMQP broker")?;
        let channel = self.channel(&conn).await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .context("setting the prefetch window")?;
        let tag = format!("lambda-ctl-{}", self.rt.pipeline.name);
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming queue `{}`", self.queue))?;
        link.connected();
        tracing::info!(pipeline = %self.rt.pipeline.name, queue = %self.queue, prefetch = self.prefetch, "AMQP connected");
        // Its own channel: a failed passive declare closes the channel it ran on.
        let probe = conn
            .create_channel()
            .await
            .context("opening a channel to measure the queue")?;
        let _lag = broker::lag_probe(&self.rt, {
            let queue = self.queue.clone();
            move || {
                let (probe, queue) = (probe.clone(), queue.clone());
                async move {
                    let passive = QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    };
                    let q = probe
                        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                        .await
                        .context("reading the queue's message count")?;
                    Ok(BTreeMap::from([(queue, u64::from(q.message_count()))]))
                }
            }
        });
        let meta = broker::meta_keys(&self.rt);
        // A batch never needs more deliveries than the broker lets be unacknowledged.
        let max = broker::MAX_BATCH.min(usize::from(self.prefetch));
        let result = loop {
            let Some(batch) = broker::next_batch(&mut consumer, max, shutdown).await else {
                break if shutdown.is_cancelled() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("the broker cancelled the consumer"))
                };
            };
            let mut body = Body::new(self.rt.pipeline.format);
            let mut last_tag = None;
            let mut failure = None;
            for delivery in batch {
                match delivery {
                    Ok(d) => {
                        body.push_meta(&d.data, &meta, |k| meta_value(&d, k));
                        last_tag = Some(d.delivery_tag);
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if !broker::ingest_durably(&self.rt, "amqp", body.into_bytes(), shutdown).await {
                break Ok(());
            }
            if let Some(tag) = last_tag {
                channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await
                    .context("acknowledging a batch")?;
            }
            if let Some(e) = failure {
                break Err(e).context("receiving from the AMQP broker");
            }
        };
        let _ = conn.close(200, "lambda-ctl stopping".into()).await;
        result
    }
}

/// One `meta.*` value of a delivery (`spec::AMQP_META`).
fn meta_value(d: &lapin::message::Delivery, key: &str) -> serde_json::Value {
    use serde_json::Value as J;
    let text =
        |s: &Option<lapin::types::ShortString>| s.as_ref().map_or(J::Null, |s| J::from(s.as_str()));
    let p = &d.properties;
    match key {
        "message_id" => text(p.message_id()),
        "correlation_id" => text(p.correlation_id()),
        "content_type" => text(p.content_type()),
        "app_id" => text(p.app_id()),
        "timestamp" => p
            .timestamp()
            .map_or(J::Null, |s| J::from(s.saturating_mul(1000))),
        "exchange" => J::from(d.exchange.as_str()),
        "routing_key" => J::from(d.routing_key.as_str()),
        "redelivered" => J::from(d.redelivered),
        _ => J::Null,
    }
}

impl AmqpSource {
    /// A channel on which the queue is known to exist.
    async fn channel(&self, conn: &Connection) -> anyhow::Result<Channel> {
        let channel = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        if channel
            .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
            .await
            .is_ok()
        {
            return Ok(channel);
        }
        // A failed passive declare closes the channel (404): declare on a fresh one.
        let channel = conn.create_channel().await?;
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring queue `{}`", self.queue))?;
        tracing::info!(pipeline = %self.rt.pipeline.name, queue = %self.queue, "declared the AMQP queue (durable)");
        Ok(channel)
    }
}
