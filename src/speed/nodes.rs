//! Nodes (`serve --node NAME`): several `serve` processes on one PostgreSQL state and one
//! object-store lake share each pipeline's partitions through leases in the state DB — no
//! consensus or replication of our own: the broker keeps the events, the lake the segments,
//! PostgreSQL who runs what.
//!
//! Every [`HEARTBEAT`] a node's keeper
//! - records that the node lives (`nodes`), and renews its leases for [`LEASE`]; a lease it
//!   finds taken (it was too slow, or the state DB was unreachable for a whole lease) is
//!   given up at once, without sealing — another node runs that partition now;
//! - aims at a fair share of every pipeline's partitions: `ceil(partitions / live nodes)`.
//!   Below it, it takes free or expired leases (a dead node's, within [`LEASE`] +
//!   [`HEARTBEAT`]); above it (a node joined), it hands partitions over gracefully: sources
//!   stop feeding them, the open segment is sealed, then the lease is released;
//! - absorbs the segments other nodes sealed ([`PipelineRuntime::catch_up`]), so an answer
//!   on any node holds every partition's archived events, and its own partitions' fresh ones.
//!
//! **Why nothing is lost or counted twice when a partition moves**: a partition's events
//! come from a broker that keeps them (Kafka), and its offsets are recorded with each sealed
//! segment in the seal's transaction (`source_offsets`). A node taking a partition over
//! starts at the partition's checkpoint, with an empty log, and the broker resumes at the
//! offsets recorded with the last segment: exactly the events not archived. A node that lost
//! its lease without knowing it cannot record anything more: every seal carries the lease's
//! epoch and is refused on a stale one (DESIGN.md §8), and its files go to paths of its own
//! epoch ([`crate::lake::leased_archive_path`]). Sources whose events are acknowledged when
//! they are logged (HTTP, MQTT, AMQP, NATS, Redis, files) cannot run on nodes yet: a node's
//! loss would lose what its log held.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::runtime::PipelineRuntime;
use crate::clock::now_ms;
use crate::state::{Fence, State};

/// How often a node records that it lives and renews its leases.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a lease lasts without renewal: a dead node's partitions move after this (plus up
/// to a [`HEARTBEAT`]); a node not heard of for as long counts as gone.
pub const LEASE: Duration = Duration::from_secs(6);
/// How long a graceful hand-over may take at shutdown before the process stops anyway.
pub const HANDOVER: Duration = Duration::from_secs(20);

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A node's keeper of leases (see the module docs).
pub struct Keeper {
    node: String,
    listen: String,
    db: State,
    pipelines: Vec<Arc<PipelineRuntime>>,
    /// Leases held, by pipeline and partition: their epochs.
    held: BTreeMap<(String, u32), u64>,
    /// When the leases were last renewed (epoch ms).
    renewed_ms: i64,
}

impl Keeper {
    pub fn new(node: &str, listen: &str, db: State, pipelines: Vec<Arc<PipelineRuntime>>) -> Self {
        Keeper {
            node: node.to_string(),
            listen: listen.to_string(),
            db,
            pipelines,
            held: BTreeMap::new(),
            renewed_ms: now_ms(),
        }
    }

    /// Keeps the node's leases until `stop`; then hands every partition over (sealed) and
    /// leaves.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            if let Err(e) = self.round().await {
                tracing::warn!(node = %self.node, error = %format!("{e:#}"), "keeping the node's leases failed; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(HEARTBEAT) => {}
                _ = stop.cancelled() => break,
            }
        }
        self.leave().await;
    }

    /// One heartbeat: renew, give up what was lost, take or hand over toward a fair share,
    /// catch up with what other nodes sealed.
    pub async fn round(&mut self) -> anyhow::Result<()> {
        let now = now_ms();
        self.renew(now).await;
        self.db.heartbeat(&self.node, &self.listen, now).await?;
        let live = self
            .db
            .nodes()
            .await?
            .iter()
            .filter(|n| n.heartbeat_ms > now - ms(LEASE) || n.name == self.node)
            .count()
            .max(1);
        for rt in self.pipelines.clone() {
            self.balance(&rt, live).await?;
            if let Err(e) = rt.catch_up().await {
                tracing::warn!(pipeline = %rt.pipeline.name, error = %format!("{e:#}"), "absorbing segments other nodes sealed failed; retrying");
            }
        }
        Ok(())
    }

    /// Renews the leases held; gives up those lost — or all, when they could not be renewed
    /// for a whole lease (another node may run them by now).
    async fn renew(&mut self, now: i64) {
        let held: Vec<(String, u32, u64)> = self
            .held
            .iter()
            .map(|((p, k), e)| (p.clone(), *k, *e))
            .collect();
        let lost = match self
            .db
            .renew_leases(&self.node, &held, now + ms(LEASE))
            .await
        {
            Ok(lost) => {
                self.renewed_ms = now;
                lost
            }
            Err(e) if now - self.renewed_ms >= ms(LEASE) => {
                tracing::error!(node = %self.node, error = %e, "leases not renewed for a whole lease; giving every partition up");
                held.iter().map(|(p, k, _)| (p.clone(), *k)).collect()
            }
            Err(e) => {
                tracing::warn!(node = %self.node, error = %e, "renewing leases failed; retrying");
                Vec::new()
            }
        };
        for (pipeline, partition) in lost {
            self.held.remove(&(pipeline.clone(), partition));
            if let Some(rt) = self.runtime(&pipeline) {
                tracing::warn!(node = %self.node, pipeline = %pipeline, partition, "lease lost to another node; giving the partition up");
                if let Err(e) = rt.give_up(partition, false).await {
                    tracing::error!(pipeline = %pipeline, partition, error = %format!("{e:#}"), "giving the partition up failed");
                }
            }
        }
    }

    /// Takes free leases of `rt`'s pipeline up to the node's fair share, or hands over those
    /// beyond it.
    async fn balance(&mut self, rt: &Arc<PipelineRuntime>, live: usize) -> anyhow::Result<()> {
        let name = rt.pipeline.name.clone();
        let partitions = rt.pipeline.partitions as usize;
        let share = partitions.div_ceil(live);
        let mine: Vec<u32> = self
            .held
            .keys()
            .filter(|(p, _)| *p == name)
            .map(|(_, k)| *k)
            .collect();
        if mine.len() > share {
            for &partition in mine.iter().rev().take(mine.len() - share) {
                self.hand_over(rt, partition).await;
            }
            return Ok(());
        }
        if mine.len() == share {
            return Ok(());
        }
        let now = now_ms();
        let taken: BTreeSet<u32> = self
            .db
            .leases(&name)
            .await?
            .into_iter()
            .filter(|l| l.node.is_some() && l.expires_ms >= now)
            .map(|l| l.partition)
            .collect();
        let free = (0..rt.pipeline.partitions).filter(|p| !taken.contains(p) && !mine.contains(p));
        for partition in free.take(share - mine.len()) {
            let now = now_ms();
            let Some(epoch) = self
                .db
                .acquire_lease(&name, partition, &self.node, now, now + ms(LEASE))
                .await?
            else {
                continue;
            };
            let fence = Fence {
                node: self.node.clone(),
                epoch,
            };
            match rt.take(partition, fence).await {
                Ok(()) => {
                    tracing::info!(node = %self.node, pipeline = %name, partition, epoch, "took the partition");
                    self.held.insert((name.clone(), partition), epoch);
                }
                Err(e) => {
                    tracing::error!(node = %self.node, pipeline = %name, partition, error = %format!("{e:#}"), "taking the partition failed; releasing its lease");
                    let _ = self
                        .db
                        .release_lease(&name, partition, &self.node, epoch)
                        .await;
                }
            }
        }
        Ok(())
    }

    /// Gracefully: sources stop, the open segment is sealed, then the lease is released.
    async fn hand_over(&mut self, rt: &PipelineRuntime, partition: u32) {
        let name = rt.pipeline.name.clone();
        let Some(epoch) = self.held.remove(&(name.clone(), partition)) else {
            return;
        };
        if let Err(e) = rt.give_up(partition, true).await {
            tracing::warn!(pipeline = %name, partition, error = %format!("{e:#}"), "handing the partition over failed");
        }
        match self
            .db
            .release_lease(&name, partition, &self.node, epoch)
            .await
        {
            Ok(_) => {
                tracing::info!(node = %self.node, pipeline = %name, partition, "handed the partition over")
            }
            // It expires instead.
            Err(e) => {
                tracing::warn!(pipeline = %name, partition, error = %e, "releasing the lease failed; it expires")
            }
        }
    }

    /// At shutdown: every partition handed over, then the node's row gone.
    async fn leave(&mut self) {
        let held: Vec<(String, u32)> = self.held.keys().cloned().collect();
        for (pipeline, partition) in held {
            if let Some(rt) = self.runtime(&pipeline) {
                self.hand_over(&rt, partition).await;
            }
        }
        if let Err(e) = self.db.leave(&self.node).await {
            tracing::warn!(node = %self.node, error = %e, "leaving failed; the node's row expires");
        }
    }

    fn runtime(&self, pipeline: &str) -> Option<Arc<PipelineRuntime>> {
        self.pipelines
            .iter()
            .find(|rt| rt.pipeline.name == pipeline)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::clock::now_ms;
    use crate::speed::testing::{Project, served, wait_for};
    use crate::state::Fence;

    const SPEC: &str = r#"
name: orders
source: {type: http}
schema:
  id: string
  ts: timestamp
  country: string
  amount: float
event_time: ts
event_id: id
partitions: 2
archive: {segment_age: 1h}
views:
  - name: overall
    window: all
    metrics:
      n: count()
      total: sum(amount)
"#;

    /// Events `ids` (amount = the id's number), one NDJSON request.
    fn events(ids: std::ops::Range<u32>) -> Bytes {
        let lines: Vec<String> = ids
            .map(|i| {
                format!(r#"{{"id": "e{i}", "ts": 1700000000000, "country": "DE", "amount": {i}}}"#)
            })
            .collect();
        Bytes::from(lines.join("\n"))
    }

    fn total(ids: std::ops::Range<u32>) -> f64 {
        ids.map(f64::from).sum()
    }

    async fn lease(p: &Project, partition: u32, node: &str, lasts_ms: i64) -> Fence {
        let now = now_ms();
        let epoch =
            p.db.acquire_lease("orders", partition, node, now, now + lasts_ms)
                .await
                .unwrap()
                .expect("the lease is free");
        Fence {
            node: node.to_string(),
            epoch,
        }
    }

    /// A partition handed over between two nodes: sealed by the first (under its lease's
    /// epoch, offsets and all), absorbed by the second, which goes on at the checkpoint. A node
    /// whose lease was taken meanwhile records nothing, and forgets the ids it held, so the
    /// events count once, where they are archived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_moves_between_nodes_without_loss_or_double_count() {
        let p = Project::new(SPEC).await;
        let (a, _stop_a) = p.start_node("a").await;
        let (b, _stop_b) = p.start_node("b").await;
        assert_eq!(a.partitions(), [0, 1]);
        assert!(
            !a.owns(0) && !a.owns(1),
            "a node runs nothing before its leases"
        );

        let fence = lease(&p, 0, "a", 60_000).await;
        let first = fence.epoch;
        a.take(0, fence).await.unwrap();
        assert!(a.owns(0));
        a.ingest_into(events(0..10), Some(0)).await.unwrap();
        a.lanes()[0].note_offsets(10, [(4, 41)].into());
        wait_for("absorbed on a", async || served(&a).0 == 10).await;
        b.catch_up().await.unwrap();
        assert_eq!(served(&b).0, 0, "nothing sealed yet");

        // Graceful hand-over: sealed under the lease, at a path of its epoch, with the offsets.
        a.give_up(0, true).await.unwrap();
        assert!(!a.owns(0));
        assert_eq!(p.db.checkpoint("orders", 0).await.unwrap(), Some(10));
        let segments = p.db.segments("orders").await.unwrap();
        assert!(
            segments[0].path.ends_with(&format!(".e{first}.parquet")),
            "{}",
            segments[0].path
        );
        assert_eq!(
            p.db.source_offsets("orders", 0).await.unwrap(),
            [(4, 41)].into()
        );
        assert_eq!(
            served(&a),
            (10, total(0..10)),
            "a still answers what it sealed"
        );
        assert!(p.db.release_lease("orders", 0, "a", first).await.unwrap());
        b.catch_up().await.unwrap();
        assert_eq!(served(&b), (10, total(0..10)));

        // b goes on at the checkpoint.
        let fence = lease(&p, 0, "b", 60_000).await;
        assert!(fence.epoch > first);
        b.take(0, fence).await.unwrap();
        let r = b.ingest_into(events(5..15), Some(0)).await.unwrap();
        assert_eq!(
            (r.accepted, r.duplicates),
            (5, 5),
            "the ids a sealed are known to b"
        );
        wait_for("absorbed on b", async || served(&b).0 == 15).await;

        // a takes partition 1 on a lease that expires at once; b takes it over; a's seal is
        // refused and it drops (and forgets) what it held.
        let fence = lease(&p, 1, "a", 0).await;
        a.take(1, fence).await.unwrap();
        a.ingest_into(events(100..105), Some(1)).await.unwrap();
        wait_for("absorbed on a", async || served(&a).0 == 15).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let taken = lease(&p, 1, "b", 60_000).await;
        b.take(1, taken.clone()).await.unwrap();
        a.give_up(1, true).await.unwrap();
        assert_eq!(p.db.checkpoint("orders", 1).await.unwrap(), None);
        assert_eq!(
            served(&a),
            (10, total(0..10)),
            "a dropped what it could not seal"
        );
        b.give_up(1, true).await.unwrap();
        assert!(
            p.db.release_lease("orders", 1, "b", taken.epoch)
                .await
                .unwrap()
        );
        let fence = lease(&p, 1, "a", 60_000).await;
        a.take(1, fence).await.unwrap();
        let r = a.ingest_into(events(100..105), Some(1)).await.unwrap();
        assert_eq!(r.accepted, 5, "a forgot the ids it dropped");
        a.give_up(1, true).await.unwrap();
        b.give_up(0, true).await.unwrap();
        a.catch_up().await.unwrap();
        b.catch_up().await.unwrap();
        let all = (20, total(0..15) + total(100..105));
        assert_eq!(served(&a), all);
        assert_eq!(served(&b), all);
    }
}
