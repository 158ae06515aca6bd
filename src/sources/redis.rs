//! The `redis` source: a Redis Streams consumer group (`XREADGROUP`), created with
//! `MKSTREAM` from the start of the stream if missing. Entries are acknowledged (`XACK`) only
//! after their batch went through the door.
//!
//! Pending entries — delivered but never acknowledged — are reclaimed: at every (re)connect
//! this consumer first re-reads its own pending list (a crash between the durable write and
//! `XACK` leaves entries there), and every 30 s it `XAUTOCLAIM`s entries another consumer of
//! the group left idle for over a minute. With `event_id`, entries that were already durable
//! are dropped at the door, so each event counts once.
//!
//! The consumer name is `consumer`, or `lambda-<pipeline>`: it must stay the same across
//! restarts for the pending list to be found again.
//!
//! A pending entry deleted from the stream (trimmed) before it was acknowledged is
//! acknowledged without ingesting anything.
//!
//! Lag: the group's pending entries and, on Redis 7+, the entries not yet delivered to the
//! group (`XINFO GROUPS`).
//!
//! An entry's payload is its `data` field; an entry with a single field uses that field's
//! value; otherwise its fields become one JSON object (values as strings).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use ::redis::{AsyncConnectionConfig, Value};
use anyhow::Context;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::broker::{self, Body};
use crate::speed::runtime::PipelineRuntime;
use crate::state::redact;

/// How long one `XREADGROUP` blocks waiting for new entries.
const BLOCK: Duration = Duration::from_secs(1);
/// Entries of other consumers idle this long are taken over.
const CLAIM_IDLE: Duration = Duration::from_secs(60);
const CLAIM_EVERY: Duration = Duration::from_secs(30);

pub struct RedisSource {
    rt: Arc<PipelineRuntime>,
    client: ::redis::Client,
    stream: String,
    group: String,
    consumer: String,
}

impl RedisSource {
    pub fn new(
        rt: Arc<PipelineRuntime>,
        url: &str,
        stream: &str,
        group: &str,
        consumer: Option<&str>,
    ) -> anyhow::Result<Self> {
        let client = ::redis::Client::open(url)
            .with_context(|| format!("invalid Redis url `{}`", redact(url)))?;
        let consumer = consumer
            .map(str::to_string)
            .unwrap_or_else(|| format!("lambda-{}", rt.pipeline.name));
        Ok(RedisSource {
            rt,
            client,
            stream: stream.to_string(),
            group: group.to_string(),
            consumer,
        })
    }
}

impl broker::Session for RedisSource {
    const KIND: &'static str = "redis";

    async fn session(&self, link: &broker::Link) -> anyhow::Result<()> {
        let shutdown = &link.shutdown;
        // The response timeout must outlast a blocking XREADGROUP.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(BLOCK + Duration::from_secs(10)));
        let mut con = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .context("connecting to Redis")?;
        // Named after the consumer so an operator can find (or kill) it in CLIENT LIST; a
        // name Redis refuses (spaces) only loses that convenience.
        let named: ::redis::RedisResult<()> = ::redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&self.consumer)
            .query_async(&mut con)
            .await;
        if let Err(e) = named {
            tracing::debug!(consumer = %self.consumer, error = %e, "Redis refused the connection name");
        }
        self.create_group(&mut con).await?;
        link.connected();
        tracing::info!(pipeline = %self.rt.pipeline.name, stream = %self.stream, group = %self.group, consumer = %self.consumer, "Redis connected");
        let _lag = broker::lag_probe(&self.rt, {
            let (con, stream, group) = (con.clone(), self.stream.clone(), self.group.clone());
            move || group_lag(con.clone(), stream.clone(), group.clone())
        });

        // Our own pending entries first: delivered before a crash, maybe never made durable.
        loop {
            let entries = self.read(&mut con, "0", None).await?;
            if entries.is_empty() {
                break;
            }
            if !self.ingest_and_ack(&mut con, entries, shutdown).await? {
                return Ok(());
            }
        }

        let mut next_claim = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            if tokio::time::Instant::now() >= next_claim {
                self.claim_idle(&mut con, shutdown).await?;
                next_claim = tokio::time::Instant::now() + CLAIM_EVERY;
            }
            let read = self.read(&mut con, ">", Some(BLOCK));
            let entries = tokio::select! {
                r = read => r?,
                _ = shutdown.cancelled() => return Ok(()),
            };
            if !self.ingest_and_ack(&mut con, entries, shutdown).await? {
                return Ok(());
            }
        }
        Ok(())
    }
}

impl RedisSource {
    async fn create_group(&self, con: &mut MultiplexedConnection) -> anyhow::Result<()> {
        let created: ::redis::RedisResult<()> = ::redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(con)
            .await;
        match created {
            Ok(()) => {
                tracing::info!(pipeline = %self.rt.pipeline.name, stream = %self.stream, group = %self.group, "created the Redis consumer group");
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e).context("creating the consumer group"),
        }
    }

    /// `XREADGROUP` from `id` (`0`: our pending entries, `>`: new entries).
    async fn read(
        &self,
        con: &mut MultiplexedConnection,
        id: &str,
        block: Option<Duration>,
    ) -> anyhow::Result<Vec<StreamId>> {
        let mut cmd = ::redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(broker::MAX_BATCH);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(id);
        let reply: Option<StreamReadReply> = cmd
            .query_async(con)
            .await
            .context("reading the stream (XREADGROUP)")?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect())
    }

    /// Takes over entries other consumers of the group left unacknowledged for too long.
    async fn claim_idle(
        &self,
        con: &mut MultiplexedConnection,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut start = "0-0".to_string();
        loop {
            let reply: StreamAutoClaimReply = ::redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(CLAIM_IDLE.as_millis() as u64)
                .arg(&start)
                .arg("COUNT")
                .arg(broker::MAX_BATCH)
                .query_async(con)
                .await
                .context("claiming idle pending entries (XAUTOCLAIM)")?;
            if !reply.claimed.is_empty() {
                tracing::info!(pipeline = %self.rt.pipeline.name, entries = reply.claimed.len(), "claimed idle pending entries of another consumer");
            }
            if !self.ingest_and_ack(con, reply.claimed, shutdown).await? {
                return Ok(());
            }
            if reply.next_stream_id == "0-0" {
                return Ok(());
            }
            start = reply.next_stream_id;
        }
    }

    /// Door first, then `XACK`. False when shutdown interrupted the door.
    async fn ingest_and_ack(
        &self,
        con: &mut MultiplexedConnection,
        entries: Vec<StreamId>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        if entries.is_empty() {
            return Ok(true);
        }
        let mut body = Body::new(self.rt.pipeline.format);
        // A pending entry trimmed or deleted from the stream comes back without fields:
        // nothing to ingest, but it is acknowledged so it leaves the pending list.
        let meta = broker::meta_keys(&self.rt);
        for e in entries.iter().filter(|e| !e.map.is_empty()) {
            body.push_meta(&payload(e), &meta, |k| match k {
                "stream" => serde_json::Value::from(self.stream.as_str()),
                "id" => serde_json::Value::from(e.id.as_str()),
                // An entry id is `MILLISECONDS-SEQUENCE`.
                "timestamp" => {
                    e.id.split_once('-')
                        .and_then(|(ms, _)| ms.parse::<i64>().ok())
                        .map_or(serde_json::Value::Null, serde_json::Value::from)
                }
                _ => serde_json::Value::Null,
            });
        }
        if !broker::ingest_durably(&self.rt, "redis", body.into_bytes(), shutdown).await {
            return Ok(false);
        }
        let mut ack = ::redis::cmd("XACK");
        ack.arg(&self.stream).arg(&self.group);
        for e in &entries {
            ack.arg(&e.id);
        }
        let _: u64 = ack
            .query_async(con)
            .await
            .context("acknowledging entries (XACK)")?;
        Ok(true)
    }
}

/// The group's `pending` (delivered, not acknowledged) and `lag` (not yet delivered) entries,
/// from `XINFO GROUPS` (`lag` needs Redis 7; older servers report only `pending`).
async fn group_lag(
    mut con: MultiplexedConnection,
    stream: String,
    group: String,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let groups: Vec<HashMap<String, Value>> = ::redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&stream)
        .query_async(&mut con)
        .await
        .context("reading the consumer group's info (XINFO GROUPS)")?;
    let info = groups
        .iter()
        .find(|g| {
            g.get("name")
                .and_then(|v| ::redis::from_redis_value_ref::<String>(v).ok())
                .is_some_and(|n| n == group)
        })
        .with_context(|| format!("consumer group `{group}` not found on stream `{stream}`"))?;
    let mut lag = BTreeMap::new();
    for key in ["pending", "lag"] {
        if let Some(n) = info
            .get(key)
            .and_then(|v| ::redis::from_redis_value_ref::<u64>(v).ok())
        {
            lag.insert(key.to_string(), n);
        }
    }
    Ok(lag)
}

/// The bytes an entry contributes to the door (see the module docs).
fn payload(entry: &StreamId) -> Bytes {
    fn bytes(v: &Value) -> Option<Bytes> {
        match v {
            Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
            Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
            _ => None,
        }
    }
    if let Some(b) = entry.map.get("data").and_then(bytes) {
        return b;
    }
    if entry.map.len() == 1
        && let Some(b) = entry.map.values().next().and_then(bytes)
    {
        return b;
    }
    let object: serde_json::Map<String, serde_json::Value> = entry
        .map
        .iter()
        .filter_map(|(k, v)| {
            bytes(v).map(|b| {
                (
                    k.clone(),
                    serde_json::Value::String(String::from_utf8_lossy(&b).into_owned()),
                )
            })
        })
        .collect();
    Bytes::from(serde_json::Value::Object(object).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields
                .iter()
                .map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec())))
                .collect::<HashMap<_, _>>(),
            ..StreamId::default()
        }
    }

    #[test]
    fn payload_prefers_data_then_a_single_field_then_all_fields() {
        assert_eq!(
            &payload(&entry(&[("data", "{\"a\":1}"), ("other", "x")]))[..],
            b"{\"a\":1}"
        );
        assert_eq!(&payload(&entry(&[("json", "{\"b\":2}")]))[..], b"{\"b\":2}");
        let v: serde_json::Value =
            serde_json::from_slice(&payload(&entry(&[("id", "e1"), ("n", "3")]))).unwrap();
        assert_eq!(v, serde_json::json!({"id": "e1", "n": "3"}));
    }
}
