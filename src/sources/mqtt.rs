//! The `mqtt` source: QoS 1/2 subscription (wildcards allowed, e.g. `sensors/+/reading`, as
//! IoT Hub-style telemetry), with a persistent session (`clean_session = false` and a fixed
//! client id, `lambda-<pipeline>` unless `client_id` is set) so the broker queues messages
//! while `serve` is down and redelivers the ones never acknowledged.
//!
//! Acknowledgements are manual: the PUBACK of a message is sent only after the batch holding
//! it went through the door (durable in the write-ahead log). A crash in between makes the
//! broker redeliver it on reconnect; with `event_id` the copy is dropped at the door.
//!
//! The broker bounds how many unacknowledged messages are in flight to one client (Mosquitto:
//! `max_inflight_messages`, 20 by default) and how many it queues for an offline session
//! (`max_queued_messages`, 1000 by default: beyond it Mosquitto drops messages). Size both
//! for the expected traffic and downtime.
//!
//! Plain TCP only (`mqtt://` or `tcp://`); credentials come from the URL's user and password.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::broker::{self, Backoff, Body};
use crate::speed::runtime::PipelineRuntime;
use crate::state::redact;

/// Largest message accepted; a bigger one fails the connection (and is redelivered).
const MAX_PACKET: usize = 16 * 1024 * 1024;

pub struct MqttSource {
    rt: Arc<PipelineRuntime>,
    options: MqttOptions,
    topic: String,
    qos: QoS,
}

impl MqttSource {
    pub fn new(
        rt: Arc<PipelineRuntime>,
        url: &str,
        topic: &str,
        qos: u8,
        client_id: Option<&str>,
    ) -> anyhow::Result<Self> {
        let parsed =
            url::Url::parse(url).with_context(|| format!("invalid MQTT url `{}`", redact(url)))?;
        anyhow::ensure!(
            matches!(parsed.scheme(), "mqtt" | "tcp"),
            "MQTT url `{url}`: only mqtt:// (plain TCP) is supported, found `{}://`",
            parsed.scheme()
        );
        let host = parsed
            .host_str()
            .with_context(|| format!("MQTT url `{}` has no host", redact(url)))?;
        let client_id = client_id
            .map(str::to_string)
            .unwrap_or_else(|| format!("lambda-{}", rt.pipeline.name));
        let mut options = MqttOptions::new(client_id, host, parsed.port().unwrap_or(1883));
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if !parsed.username().is_empty() {
            options.set_credentials(parsed.username(), parsed.password().unwrap_or(""));
        }
        let qos = match qos {
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            other => anyhow::bail!("MQTT qos must be 1 or 2, found {other}"),
        };
        Ok(MqttSource {
            rt,
            options,
            topic: topic.to_string(),
            qos,
        })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let (client, eventloop) = AsyncClient::new(self.options.clone(), 4 * broker::MAX_BATCH);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(
            self.rt.clone(),
            client.clone(),
            eventloop,
            self.topic.clone(),
            self.qos,
            tx,
            shutdown.clone(),
        ));
        let mut publishes = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let meta = broker::meta_keys(&self.rt);
        while let Some(batch) =
            broker::next_batch(&mut publishes, broker::MAX_BATCH, &shutdown).await
        {
            let mut body = Body::new(self.rt.pipeline.format);
            for p in &batch {
                body.push_meta(&p.payload, &meta, |k| match k {
                    "topic" => serde_json::Value::from(p.topic.as_str()),
                    "qos" => serde_json::Value::from(p.qos as u8),
                    "retain" => serde_json::Value::from(p.retain),
                    _ => serde_json::Value::Null,
                });
            }
            if !broker::ingest_durably(&self.rt, "mqtt", body.into_bytes(), &shutdown).await {
                break;
            }
            for p in &batch {
                // Fails only when the event loop is gone (shutdown): the broker redelivers.
                if client.ack(p).await.is_err() {
                    break;
                }
            }
        }
        let _ = client.try_disconnect();
        let _ = driver.await;
    }
}

/// Polls the MQTT event loop (keep-alives, acks, reconnects) and forwards publishes.
async fn drive(
    rt: Arc<PipelineRuntime>,
    client: AsyncClient,
    mut eventloop: EventLoop,
    topic: String,
    qos: QoS,
    tx: mpsc::UnboundedSender<Publish>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = shutdown.cancelled() => return,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                tracing::info!(pipeline = %rt.pipeline.name, session_present = ack.session_present, "MQTT connected");
                // A present session keeps its subscription; subscribing again would make the
                // broker resend retained messages.
                if !ack.session_present
                    && let Err(e) = client.try_subscribe(topic.clone(), qos)
                {
                    tracing::warn!(pipeline = %rt.pipeline.name, error = %e, "MQTT subscribe request failed");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!(pipeline = %rt.pipeline.name, topic = %topic, "MQTT broker refused the subscription");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(pipeline = %rt.pipeline.name, source = "mqtt", error = %e, retry_in = ?backoff.delay(), "MQTT connection failed; reconnecting");
                if !backoff.wait(&shutdown).await {
                    return;
                }
            }
        }
    }
}
