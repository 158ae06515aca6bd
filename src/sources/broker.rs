//! What the broker sources share: reconnect backoff, grouping messages into one door body, and
//! the ingest-then-acknowledge discipline.
//!
//! Every broker source acknowledges upstream only after `PipelineRuntime::ingest` returned Ok,
//! i.e. after the accepted events are fsynced in the write-ahead log (rejected ones are in the
//! dead-letter area). A crash between that write and the acknowledgement makes the broker
//! redeliver those messages; a pipeline that declares `event_id` drops them at the door as
//! duplicates (within `dedupe_window`), so each event is counted exactly once. Without
//! `event_id` the guarantee is at-least-once.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::spec::Format;
use crate::speed::runtime::PipelineRuntime;

/// Most messages grouped into one `ingest` call: one fsync covers them all.
pub const MAX_BATCH: usize = 1000;
/// How long a batch waits for more messages after its first one arrived.
pub const LINGER: Duration = Duration::from_millis(5);

/// Reconnect and retry delays: from 100 ms, doubling up to 30 s, each lengthened at random by
/// up to as much again (jitter), so the sources of many processes do not retry in step.
const BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(30))
    .with_jitter()
    .without_max_times();

/// Exponential backoff ([`BACKOFF`]); reset after a successful connection.
pub struct Backoff {
    delays: <ExponentialBuilder as BackoffBuilder>::Backoff,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        let mut delays = BACKOFF.build();
        let next = delays.next().unwrap_or_default();
        Backoff { delays, next }
    }
}

impl Backoff {
    pub fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// The delay the next `wait` will sleep.
    pub fn delay(&self) -> Duration {
        self.next
    }

    /// Sleeps the current delay and moves on to the next; false when shutdown came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = self.delays.next().unwrap_or(delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.cancelled() => false,
        }
    }
}

/// A broker source as one connection at a time: [`run`] calls `session` until shutdown and
/// owns the reconnect policy, so every broker source behaves the same when a broker goes away.
pub trait Session {
    /// The source kind, for logs.
    const KIND: &'static str;

    /// One connection: connect, call `link.connected()` once connected, consume until the
    /// connection fails (Err), the broker ends it (Ok) or `link.shutdown` is cancelled.
    fn session(&self, link: &Link) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// What one [`Session::session`] gets from [`run`].
pub struct Link {
    pub shutdown: CancellationToken,
    connected: AtomicBool,
}

impl Link {
    /// The connection is up: the next reconnect starts over from the shortest backoff.
    pub fn connected(&self) {
        self.connected.store(true, Ordering::Relaxed);
    }
}

/// Runs `source` of `rt` until `shutdown`: each ended session is logged and followed by a
/// reconnect after an exponential backoff (reset by every successful connection).
pub async fn run<S: Session>(rt: Arc<PipelineRuntime>, source: S, shutdown: CancellationToken) {
    let mut backoff = Backoff::default();
    loop {
        let link = Link {
            shutdown: shutdown.clone(),
            connected: AtomicBool::new(false),
        };
        let result = source.session(&link).await;
        if shutdown.is_cancelled() {
            return;
        }
        if link.connected.load(Ordering::Relaxed) {
            backoff.reset();
        }
        log_session_end(&rt, S::KIND, &result, &backoff);
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}

/// How often [`lag_probe`] measures.
pub const LAG_EVERY: Duration = Duration::from_secs(5);

/// Measures the source's lag with `probe` now and every [`LAG_EVERY`], storing it in the
/// runtime's `SourceStatus`, until the returned guard is dropped (the session ended). A failed
/// measurement keeps the previous one.
pub fn lag_probe<F, Fut>(rt: &Arc<PipelineRuntime>, mut probe: F) -> DropGuard
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<BTreeMap<String, u64>>> + Send,
{
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    let rt = rt.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LAG_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            match probe().await {
                Ok(lag) => rt.source_status.set_lag(lag),
                Err(e) => {
                    tracing::debug!(pipeline = %rt.pipeline.name, error = %format!("{e:#}"), "could not measure the source's lag")
                }
            }
        }
    });
    guard
}

/// Logs why a broker session ended before the source reconnects.
fn log_session_end(
    rt: &PipelineRuntime,
    kind: &str,
    result: &anyhow::Result<()>,
    backoff: &Backoff,
) {
    match result {
        Ok(()) => {
            tracing::warn!(pipeline = %rt.pipeline.name, source = kind, retry_in = ?backoff.delay(), "broker connection ended; reconnecting")
        }
        Err(e) => {
            tracing::warn!(pipeline = %rt.pipeline.name, source = kind, error = %format!("{e:#}"), retry_in = ?backoff.delay(), "broker connection failed; reconnecting")
        }
    }
}

/// The `meta.*` keys the pipeline's schema reads (`from: meta.KEY`), sorted; empty when it
/// reads none, and then sources push payloads as they are.
pub fn meta_keys(rt: &PipelineRuntime) -> Vec<String> {
    let mut keys: Vec<String> = rt
        .pipeline
        .paths
        .values()
        .filter_map(|p| p.meta_key().map(String::from))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The members of one message's `$meta` object as JSON text: each key of `keys` with the
/// value `value` gives for it (null when the message does not carry it).
pub fn meta_json(keys: &[String], mut value: impl FnMut(&str) -> serde_json::Value) -> String {
    let mut out = String::new();
    for key in keys {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&serde_json::Value::from(key.as_str()).to_string());
        out.push(':');
        out.push_str(&value(key).to_string());
    }
    out
}

/// Message payloads joined into one door body. JSON payloads are NDJSON (one or more lines);
/// CSV payloads each carry their header line, which is kept from the first payload only (all
/// messages of one pipeline share the schema's header).
pub struct Body {
    csv: bool,
    buf: Vec<u8>,
    messages: usize,
}

impl Body {
    pub fn new(format: Format) -> Self {
        Body {
            csv: format == Format::Csv,
            buf: Vec::new(),
            messages: 0,
        }
    }

    pub fn push(&mut self, payload: &[u8]) {
        let mut payload = payload;
        if self.csv && self.messages > 0 {
            payload = match memchr::memchr(b'\n', payload) {
                Some(i) => &payload[i + 1..],
                None => &[],
            };
        }
        self.messages += 1;
        if payload.is_empty() {
            return;
        }
        self.buf.extend_from_slice(payload);
        if !payload.ends_with(b"\n") {
            self.buf.push(b'\n');
        }
    }

    /// `push`, or `push_with_meta` with the `$meta` members `keys` and `value` give when the
    /// pipeline reads any.
    pub fn push_meta(
        &mut self,
        payload: &[u8],
        keys: &[String],
        value: impl FnMut(&str) -> serde_json::Value,
    ) {
        if keys.is_empty() {
            self.push(payload);
        } else {
            self.push_with_meta(payload, &meta_json(keys, value));
        }
    }

    /// Like `push`, adding `meta` — the members of the `$meta` object, as JSON text like
    /// `"message_id":"m1","enqueued_time":1700000000000` — to every JSON object line of the
    /// payload (as its last member, so it wins over a `$meta` key the producer wrote). A line
    /// that is not an object is left as is: the door rejects it with its reason.
    pub fn push_with_meta(&mut self, payload: &[u8], meta: &str) {
        if self.csv {
            return self.push(payload);
        }
        self.messages += 1;
        for line in payload.split(|c| *c == b'\n') {
            let trimmed = line.trim_ascii();
            if trimmed.is_empty() {
                continue;
            }
            match (trimmed.first(), trimmed.split_last()) {
                (Some(b'{'), Some((b'}', head))) => {
                    self.buf.extend_from_slice(head);
                    if !head[1..].trim_ascii().is_empty() {
                        self.buf.push(b',');
                    }
                    self.buf.extend_from_slice(b"\"");
                    self.buf.extend_from_slice(crate::spec::META_KEY.as_bytes());
                    self.buf.extend_from_slice(b"\":{");
                    self.buf.extend_from_slice(meta.as_bytes());
                    self.buf.extend_from_slice(b"}}\n");
                }
                _ => {
                    self.buf.extend_from_slice(line);
                    self.buf.push(b'\n');
                }
            }
        }
    }

    pub fn messages(&self) -> usize {
        self.messages
    }

    pub fn into_bytes(self) -> Bytes {
        Bytes::from(self.buf)
    }
}

/// Sends `body` through the door until it is durable. A failing door (disk full, lake
/// unreachable for dead letters) is retried with backoff rather than acknowledged: the
/// messages stay unacknowledged upstream. Returns false if shutdown came first.
pub async fn ingest_durably(
    rt: &Arc<PipelineRuntime>,
    kind: &str,
    body: Bytes,
    shutdown: &CancellationToken,
) -> bool {
    ingest_durably_into(rt, kind, body, None, shutdown).await
}

/// [`ingest_durably`], every event into the pipeline partition of index `lane` when given
/// (instead of by its key). On a node, a batch for a partition it no longer runs is dropped
/// (true: the broker keeps it for the partition's next holder).
pub async fn ingest_durably_into(
    rt: &Arc<PipelineRuntime>,
    kind: &str,
    body: Bytes,
    lane: Option<usize>,
    shutdown: &CancellationToken,
) -> bool {
    if body.is_empty() {
        return true;
    }
    let mut backoff = Backoff::default();
    loop {
        // On a node, a partition given up meanwhile takes nothing more: the broker keeps its
        // events for the next holder.
        if let (Some(_), Some(l)) = (rt.node(), lane.and_then(|i| rt.lanes().get(i)))
            && !rt.owns(l.partition)
        {
            tracing::debug!(pipeline = %rt.pipeline.name, source = kind, partition = l.partition, "partition given up; its batch is left to the broker");
            return true;
        }
        match rt.ingest_into(body.clone(), lane).await {
            Ok(report) => {
                if report.rejected > 0 {
                    tracing::warn!(pipeline = %rt.pipeline.name, source = kind, rejected = report.rejected, "messages rejected into the dead-letter area");
                }
                return true;
            }
            Err(e) => {
                tracing::warn!(pipeline = %rt.pipeline.name, source = kind, error = %format!("{e:#}"), retry_in = ?backoff.delay(), "could not ingest a batch; retrying before acknowledging it");
                if !backoff.wait(shutdown).await {
                    return false;
                }
            }
        }
    }
}

/// Dead-letters `rejected` (what the source refused before the door) until that is durable,
/// retried with backoff like [`ingest_durably`]; false if shutdown came first.
pub async fn reject_durably(
    rt: &Arc<PipelineRuntime>,
    kind: &str,
    rejected: &[crate::plan::Rejection],
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::default();
    loop {
        match rt.reject_records(rejected).await {
            Ok(()) => {
                if !rejected.is_empty() {
                    tracing::warn!(pipeline = %rt.pipeline.name, source = kind, rejected = rejected.len(), "messages rejected into the dead-letter area");
                }
                return true;
            }
            Err(e) => {
                tracing::warn!(pipeline = %rt.pipeline.name, source = kind, error = %format!("{e:#}"), retry_in = ?backoff.delay(), "could not dead-letter a batch's rejected messages; retrying before acknowledging it");
                if !backoff.wait(shutdown).await {
                    return false;
                }
            }
        }
    }
}

/// The next batch from `stream`: waits for a first item (None at shutdown or end of stream),
/// then takes what else arrives within `LINGER`, up to `max` items.
pub async fn next_batch<S>(
    stream: &mut S,
    max: usize,
    shutdown: &CancellationToken,
) -> Option<Vec<S::Item>>
where
    S: Stream + Unpin,
{
    let first = tokio::select! {
        item = stream.next() => item?,
        _ = shutdown.cancelled() => return None,
    };
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + LINGER;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(item)) => batch.push(item),
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payloads_become_ndjson_lines() {
        let mut b = Body::new(Format::Json);
        b.push(b"{\"a\":1}");
        b.push(b"{\"a\":2}\n{\"a\":3}\n");
        b.push(b"");
        assert_eq!(b.messages(), 3);
        assert_eq!(
            &b.into_bytes()[..],
            b"{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n".as_slice()
        );
    }

    #[test]
    fn meta_goes_last_into_every_object_line() {
        let mut b = Body::new(Format::Json);
        b.push_with_meta(b"{\"a\":1}", "\"message_id\":\"m1\"");
        b.push_with_meta(b" { } \n{\"a\":2}\r\n", "\"message_id\":null");
        b.push_with_meta(b"not json\n[1]", "\"message_id\":\"m3\"");
        assert_eq!(b.messages(), 3);
        assert_eq!(
            std::str::from_utf8(&b.into_bytes()).unwrap(),
            "{\"a\":1,\"$meta\":{\"message_id\":\"m1\"}}\n\
             { \"$meta\":{\"message_id\":null}}\n\
             {\"a\":2,\"$meta\":{\"message_id\":null}}\n\
             not json\n[1]\n"
        );
    }

    #[test]
    fn csv_payloads_keep_one_header() {
        let mut b = Body::new(Format::Csv);
        b.push(b"id,v\n1,2");
        b.push(b"id,v\n3,4\n5,6\n");
        b.push(b"id,v");
        assert_eq!(&b.into_bytes()[..], b"id,v\n1,2\n3,4\n5,6\n".as_slice());
    }

    #[tokio::test]
    async fn batches_stop_at_max_and_at_linger() {
        let shutdown = CancellationToken::new();
        let mut s = futures::stream::iter(0..2500);
        assert_eq!(
            next_batch(&mut s, 1000, &shutdown).await.unwrap().len(),
            1000
        );
        assert_eq!(
            next_batch(&mut s, 1000, &shutdown).await.unwrap().len(),
            1000
        );
        assert_eq!(
            next_batch(&mut s, 1000, &shutdown).await.unwrap().len(),
            500
        );
        assert!(next_batch(&mut s, 1000, &shutdown).await.is_none());

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        tx.send(1).unwrap();
        let mut pending = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        // The sender stays open: the batch must close after LINGER with what it has.
        assert_eq!(
            next_batch(&mut pending, 1000, &shutdown).await,
            Some(vec![1])
        );
        shutdown.cancel();
        assert_eq!(next_batch(&mut pending, 1000, &shutdown).await, None);
        drop(tx);
    }

    #[tokio::test]
    async fn backoff_doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::default();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut seen = Vec::new();
        for _ in 0..14 {
            seen.push(b.delay());
            assert!(!b.wait(&shutdown).await, "cancelled: no sleep");
        }
        // Step i waits 100 ms · 2^i (at most 30 s), plus up to as much again.
        for (i, d) in seen.iter().enumerate() {
            let base = Duration::from_millis(100 << i).min(Duration::from_secs(30));
            assert!(
                base <= *d && *d < 2 * base,
                "step {i}: {d:?}, base {base:?}"
            );
        }
        b.reset();
        assert!(b.delay() < Duration::from_millis(200), "{:?}", b.delay());
    }
}
