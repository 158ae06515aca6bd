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
//!   on any node holds every partition's archived events.
//!
//! Fresh events of the partitions other nodes run reach a node's answers through its
//! [`Mirror`]: every [`MIRROR_EVERY`] it asks each partition's owner for its open segment's
//! partials (`GET /v1/internal/pipelines/{pipeline}/partitions/{partition}/open`, with the
//! server's token; answered only when it changed) and installs them in place of the ones
//! before, once the segments sealed before them are absorbed — so every answer holds, per
//! partition, a contiguous run of positions from the start, named in `as_of.positions`.
//! While a partition moves, its last mirrored open segment stays until the next owner's
//! replaces it (that owner reads those events from the broker again, at the same positions);
//! answers name such partitions in `as_of.stale` ([`STALE_AFTER`]).
//!
//! **Why nothing is lost or counted twice when a partition moves**: a partition's events
//! come from a broker that keeps them (Kafka; JetStream, a subject per partition), and its
//! offsets (stream sequences) are recorded with each sealed segment in the seal's transaction
//! (`source_offsets`). A node taking a partition over
//! starts at the partition's checkpoint, with an empty log, and the broker resumes at the
//! offsets recorded with the last segment: exactly the events not archived. A node that lost
//! its lease without knowing it cannot record anything more: every seal carries the lease's
//! epoch and is refused on a stale one (DESIGN.md §8), and its files go to paths of its own
//! epoch ([`crate::lake::leased_archive_path`]). HTTP runs on nodes through a Kafka or
//! JetStream `buffer` (the door publishes, the partition consumes). Sources whose events are
//! acknowledged when they are logged (plain HTTP, MQTT, AMQP, NATS without a partitioned
//! subject, Redis, files) cannot run on nodes: a node's loss would lose what its log held.
//!
//! A promote on one node has the others follow (`serving::promote::followers`); a switch drops
//! the open segments mirrored by the old definition. `as_of` and candidate answers, which read
//! events rather than partials, read other nodes' open segments from their logs
//! ([`fetch_logged`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::runtime::{OpenSegment, PipelineRuntime};
use crate::clock::now_ms;
use crate::state::{Fence, State};

/// How often a node records that it lives and renews its leases.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a lease lasts without renewal: a dead node's partitions move after this (plus up
/// to a [`HEARTBEAT`]); a node not heard of for as long counts as gone.
pub const LEASE: Duration = Duration::from_secs(6);
/// How often a node asks the owners of the partitions it does not run for their open
/// segments (see the module docs): the freshness of those partitions in its answers.
pub const MIRROR_EVERY: Duration = Duration::from_millis(200);
/// A partition whose owner has not answered the mirror for this long is named in answers'
/// `as_of.stale`.
pub const STALE_AFTER: Duration = Duration::from_secs(1);
/// How long a node waits for an owner's open segment.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a graceful hand-over may take at shutdown before the process stops anyway.
pub const HANDOVER: Duration = Duration::from_secs(20);

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether `node` counts as alive at `now_ms`: heard of within a lease.
pub fn alive(node: &crate::state::Node, now_ms: i64) -> bool {
    node.heartbeat_ms > now_ms - ms(LEASE)
}

/// Whether `lease` is held at `now_ms`: by a node, unexpired.
pub fn held(lease: &crate::state::Lease, now_ms: i64) -> bool {
    lease.node.is_some() && lease.expires_ms >= now_ms
}

/// A node as `status`, `GET /v1/nodes` and the dashboard show it.
#[derive(Debug, Serialize)]
pub struct NodeView {
    pub name: String,
    pub listen: String,
    pub alive: bool,
    pub heartbeat_age_ms: i64,
    /// `PIPELINE/p=K` of every partition whose lease it holds.
    pub partitions: Vec<String>,
}

/// Every node on `db`, with the partitions of `pipelines` whose leases it holds at `now_ms`.
pub async fn overview(
    db: &State,
    pipelines: impl IntoIterator<Item = &str>,
    now_ms: i64,
) -> Result<Vec<NodeView>, crate::state::StateError> {
    let mut leases = Vec::new();
    for p in pipelines {
        leases.extend(db.leases(p).await?);
    }
    Ok(db
        .nodes()
        .await?
        .into_iter()
        .map(|n| NodeView {
            alive: alive(&n, now_ms),
            heartbeat_age_ms: (now_ms - n.heartbeat_ms).max(0),
            partitions: leases
                .iter()
                .filter(|l| held(l, now_ms) && l.node.as_deref() == Some(n.name.as_str()))
                .map(|l| format!("{}/p={}", l.pipeline, l.partition))
                .collect(),
            name: n.name,
            listen: n.listen,
        })
        .collect())
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
        // A node of this name before this process (killed, restarted) holds nothing any
        // more: its leases go now rather than when they expire. Names are unique per node.
        if let Err(e) = self.db.leave(&self.node).await {
            tracing::warn!(node = %self.node, error = %e, "releasing the leases of this node's previous run failed; they expire");
        }
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
            .filter(|n| alive(n, now) || n.name == self.node)
            .count()
            .max(1);
        for rt in self.pipelines.clone() {
            self.balance(&rt, live).await?;
            // Between steps that may take long (reading segments): no lease lapses meanwhile.
            self.renew(now_ms()).await;
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
            .filter(|l| held(l, now))
            .map(|l| l.partition)
            .collect();
        let free = (0..rt.pipeline.partitions).filter(|p| !taken.contains(p) && !mine.contains(p));
        for partition in free.take(share - mine.len()) {
            self.renew(now_ms()).await;
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

    use crate::clock::now_ms;
    use crate::speed::testing::{Project, events, partitioned_spec, served, total, wait_for};
    use crate::state::Fence;

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

    /// b's mirror of a's open segment, as it travels between them.
    async fn mirror(
        a: &super::PipelineRuntime,
        b: &super::PipelineRuntime,
        since: Option<u64>,
    ) -> Option<u64> {
        let open = a.open_segment(0, since).expect("a runs partition 0");
        let version = open.version;
        let bytes = super::encode_open(open).unwrap();
        let open = super::decode_open(&bytes).unwrap();
        if open.unchanged {
            return None;
        }
        assert!(b.mirror(open).await.unwrap());
        Some(version)
    }

    /// A `serve` without --node refuses a pipeline while a node runs one of its partitions.
    /// Once the nodes stopped, its own log of before is stale: one the nodes archived past
    /// starts over, one holding events past the archive's end is refused until deleted — never
    /// replayed beside what the nodes archived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_serve_takes_a_pipeline_back_from_nodes_only_when_safe() {
        let mut p = Project::new(&partitioned_spec(2, "event_id: id", "1h")).await;
        let single = p.start().await;
        single.ingest_into(events(0..10), Some(0)).await.unwrap();
        single.ingest_into(events(100..130), Some(1)).await.unwrap();
        // Node a runs both partitions (the broker delivering their events again).
        let (a, _stop_a) = p.start_node("a").await;
        let fences = [
            lease(&p, 0, "a", 60_000).await,
            lease(&p, 1, "a", 60_000).await,
        ];
        for (k, fence) in fences.iter().enumerate() {
            a.take(k as u32, fence.clone()).await.unwrap();
        }
        let Err(err) = p.try_start().await else {
            panic!("refused beside a node")
        };
        assert!(
            format!("{err:#}").contains("node `a` runs its partition 0"),
            "{err:#}"
        );
        let (a, _stop_a) = p.start_node("a").await;
        for (k, fence) in fences.iter().enumerate() {
            a.take(k as u32, fence.clone()).await.unwrap();
        }
        a.ingest_into(events(0..20), Some(0)).await.unwrap();
        a.ingest_into(events(100..105), Some(1)).await.unwrap();
        wait_for("absorbed on a", async || served(&a).0 == 25).await;
        for (k, fence) in fences.iter().enumerate() {
            a.give_up(k as u32, true).await.unwrap();
            assert!(
                p.db.release_lease("orders", k as u32, "a", fence.epoch)
                    .await
                    .unwrap()
            );
        }
        // Partition 1's old log ends at 30, past the nodes' 5: refused, until deleted.
        let Err(err) = p.try_start().await else {
            panic!("a log past the archive")
        };
        assert!(format!("{err:#}").contains("partition 1"), "{err:#}");
        std::fs::remove_dir_all(p.dir.path().join("log/orders/p=1")).unwrap();
        // Partition 0's old log (10) is behind the nodes' 20: it starts over, nothing twice.
        let single = p.start().await;
        assert_eq!(served(&single), (25, total(0..20) + total(100..105)));
        assert!(
            p.db.leases("orders")
                .await
                .unwrap()
                .iter()
                .all(|l| l.expires_ms == -1)
        );
        // Taken back: a restart with events past the archive replays them as usual.
        single.ingest_into(events(200..203), Some(0)).await.unwrap();
        let single = p.start().await;
        wait_for("replayed", async || served(&single).0 == 28).await;
        p.shutdown.cancel();
    }

    /// A node answers another node's fresh events through its mirror of their open segment,
    /// asked again only when it changed, and replaced by the sealed segment once there: the
    /// events count once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_segments_mirror_to_other_nodes_until_sealed() {
        let p = Project::new(&partitioned_spec(2, "event_id: id", "1h")).await;
        let (a, _stop_a) = p.start_node("a").await;
        let (b, _stop_b) = p.start_node("b").await;
        let fence = lease(&p, 0, "a", 60_000).await;
        let epoch = fence.epoch;
        let refused = a.ingest_into(events(0..10), Some(0)).await;
        assert!(refused.is_err(), "a node logs only partitions it runs");
        a.take(0, fence).await.unwrap();
        a.ingest_into(events(0..10), Some(0)).await.unwrap();
        wait_for("absorbed on a", async || served(&a).0 == 10).await;
        let v = mirror(&a, &b, None).await.expect("changed");
        assert_eq!(served(&b), (10, total(0..10)));
        assert_eq!(b.snapshot(0).positions.get(&0), Some(&10));
        assert_eq!(b.stale_partitions(), [0, 1], "never mirrored: stale");
        b.note_mirrored(0);
        assert_eq!(b.stale_partitions(), [1]);
        assert!(a.stale_partitions().contains(&1) && !a.stale_partitions().contains(&0));
        assert_eq!(
            mirror(&a, &b, Some(v)).await,
            None,
            "unchanged: nothing sent"
        );
        a.ingest_into(events(10..15), Some(0)).await.unwrap();
        wait_for("absorbed on a", async || served(&a).0 == 15).await;
        mirror(&a, &b, Some(v)).await.expect("changed");
        assert_eq!(served(&b), (15, total(0..15)), "replaced, not added");
        // b takes partition 1 and holds nothing open in it: a mirrors that too.
        let fence = lease(&p, 1, "b", 60_000).await;
        b.take(1, fence).await.unwrap();
        let empty = b.open_segment(1, None).unwrap();
        assert_eq!((empty.rows, empty.lo), (0, 0));
        let empty = super::decode_open(&super::encode_open(empty).unwrap()).unwrap();
        assert!(
            a.mirror(empty).await.unwrap(),
            "an empty open segment mirrors"
        );
        a.give_up(0, true).await.unwrap();
        assert!(a.open_segment(0, None).is_none(), "a no longer runs it");
        p.db.release_lease("orders", 0, "a", epoch).await.unwrap();
        b.catch_up().await.unwrap();
        assert_eq!(
            served(&b),
            (15, total(0..15)),
            "the sealed segment in place of the mirror"
        );
    }

    /// A partition handed over between two nodes: sealed by the first (under its lease's
    /// epoch, offsets and all), absorbed by the second, which goes on at the checkpoint. A node
    /// whose lease was taken meanwhile records nothing, and forgets the ids it held, so the
    /// events count once, where they are archived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_moves_between_nodes_without_loss_or_double_count() {
        let p = Project::new(&partitioned_spec(2, "event_id: id", "1h")).await;
        let (a, _stop_a) = p.start_node("a").await;
        let (b, _stop_b) = p.start_node("b").await;
        assert_eq!(a.partitions(), [0, 1]);
        assert!(
            !a.owns(0) && !a.owns(1),
            "a node runs nothing before its leases"
        );

        let fence = lease(&p, 0, "a", 60_000).await;
        let first = fence.epoch;
        // A batch run of the server's workflows holds `switching` for its whole run: taking
        // a partition (or catching up) does not wait for it.
        let batch_run = a.switching().lock_owned().await;
        let took = tokio::time::timeout(std::time::Duration::from_secs(5), a.take(0, fence));
        took.await.expect("not blocked by a batch run").unwrap();
        let caught_up = tokio::time::timeout(std::time::Duration::from_secs(5), a.catch_up());
        caught_up
            .await
            .expect("not blocked by a batch run")
            .unwrap();
        drop(batch_run);
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
        // Sealed at hand-over once absorbed (what is only in the log is given up to the broker).
        wait_for("absorbed on a", async || served(&a).0 == 15).await;
        a.give_up(1, true).await.unwrap();
        b.give_up(0, true).await.unwrap();
        a.catch_up().await.unwrap();
        b.catch_up().await.unwrap();
        let all = (20, total(0..15) + total(100..105));
        assert_eq!(served(&a), all);
        assert_eq!(served(&b), all);
    }
}

/// The path of the internal endpoint answering a partition's open segment.
pub fn open_segment_path(pipeline: &str, partition: u32) -> String {
    format!("/v1/internal/pipelines/{pipeline}/partitions/{partition}/open")
}

/// The head of an open segment on the wire: one JSON line, then per view an 8-byte
/// little-endian length and that many bytes of Parquet (0: no partials).
#[derive(Serialize, Deserialize)]
struct Head {
    partition: u32,
    version: u64,
    unchanged: bool,
    lo: u64,
    hi: u64,
    rows: u64,
    logic: Vec<String>,
}

/// An open segment for the wire, each view's partial frames merged into one (polars work:
/// run it on the blocking pool).
pub fn encode_open(open: OpenSegment) -> anyhow::Result<Vec<u8>> {
    let head = Head {
        partition: open.partition,
        version: open.version,
        unchanged: open.unchanged,
        lo: open.lo,
        hi: open.hi,
        rows: open.rows,
        logic: open.logic,
    };
    let mut out = serde_json::to_vec(&head)?;
    out.push(b'\n');
    if head.unchanged {
        return Ok(out);
    }
    for (view, frames) in open.views.into_iter().enumerate() {
        if frames.is_empty() {
            out.extend_from_slice(&0u64.to_le_bytes());
            continue;
        }
        let plan = open
            .plan
            .as_ref()
            .context("an open segment without its plan")?;
        let mut merged = plan.merge(view, frames)?;
        let mut buf = Vec::new();
        ParquetWriter::new(&mut buf)
            .with_compression(ParquetCompression::Uncompressed)
            .finish(&mut merged)?;
        out.extend_from_slice(&(buf.len() as u64).to_le_bytes());
        out.extend_from_slice(&buf);
    }
    Ok(out)
}

/// [`encode_open`]'s bytes read back (blocking).
pub fn decode_open(bytes: &[u8]) -> anyhow::Result<OpenSegment> {
    let newline = bytes
        .iter()
        .position(|b| *b == b'\n')
        .context("an open segment without its head")?;
    let head: Head = serde_json::from_slice(&bytes[..newline]).context("an open segment's head")?;
    let mut rest = &bytes[newline + 1..];
    let mut views = Vec::new();
    while !rest.is_empty() {
        anyhow::ensure!(rest.len() >= 8, "an open segment cut short");
        let (len, tail) = rest.split_at(8);
        let len = usize::try_from(u64::from_le_bytes(len.try_into()?))?;
        anyhow::ensure!(tail.len() >= len, "an open segment cut short");
        let (frame, tail) = tail.split_at(len);
        views.push(if len == 0 {
            Vec::new()
        } else {
            vec![ParquetReader::new(Cursor::new(frame)).finish()?]
        });
        rest = tail;
    }
    anyhow::ensure!(
        head.unchanged || views.len() == head.logic.len(),
        "an open segment with {} views for {} definitions",
        views.len(),
        head.logic.len()
    );
    Ok(OpenSegment {
        partition: head.partition,
        version: head.version,
        unchanged: head.unchanged,
        lo: head.lo,
        hi: head.hi,
        rows: head.rows,
        logic: head.logic,
        views,
        plan: None,
    })
}

/// Who runs each partition of `rt`'s pipeline that this node does not: partition → (the
/// owner's address, its lease's epoch). Partitions no live lease holds are absent.
pub async fn owners(
    db: &State,
    rt: &PipelineRuntime,
) -> anyhow::Result<BTreeMap<u32, (String, u64)>> {
    let now = crate::clock::now_ms();
    let nodes: BTreeMap<String, String> = db
        .nodes()
        .await?
        .into_iter()
        .map(|n| (n.name, n.listen))
        .collect();
    let me = rt.node().unwrap_or_default();
    Ok(db
        .leases(&rt.pipeline.name)
        .await?
        .into_iter()
        .filter(|l| held(l, now))
        .filter_map(|l| {
            let node = l.node.filter(|n| n != me)?;
            Some((l.partition, (nodes.get(&node)?.clone(), l.epoch)))
        })
        .collect())
}

/// The path of the internal endpoint answering the events a node's log holds of a partition
/// it runs, from a position on (`?from=N`): what an `as_of` answer on another node reads.
pub fn logged_path(pipeline: &str, partition: u32) -> String {
    format!("/v1/internal/pipelines/{pipeline}/partitions/{partition}/logged")
}

/// Events (with their arrival times) as Parquet for the wire (blocking).
pub fn encode_events(mut events: DataFrame) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf)
        .with_compression(ParquetCompression::Uncompressed)
        .finish(&mut events)?;
    Ok(buf)
}

/// Why [`fetch_logged`] got nothing.
#[derive(Debug, thiserror::Error)]
pub enum FetchLogged {
    /// The owner's log no longer holds `from` (it sealed meanwhile): read the archive again.
    #[error("the owner sealed those events meanwhile")]
    Sealed,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Asks the node at `listen` (with `token`) for the events its log holds of `partition` of
/// `pipeline` from position `from` on; `None` when it holds none.
pub async fn fetch_logged(
    client: &reqwest::Client,
    listen: &str,
    token: Option<&str>,
    pipeline: &str,
    partition: u32,
    from: u64,
) -> Result<Option<DataFrame>, FetchLogged> {
    let url = format!("{listen}{}", logged_path(pipeline, partition));
    let mut req = client
        .get(&url)
        .query(&[("from", from)])
        .timeout(MIRROR_TIMEOUT);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.map_err(anyhow::Error::from)?;
    match resp.status() {
        reqwest::StatusCode::NO_CONTENT => return Ok(None),
        reqwest::StatusCode::CONFLICT => return Err(FetchLogged::Sealed),
        _ => {}
    }
    let bytes = resp
        .error_for_status()
        .map_err(anyhow::Error::from)?
        .bytes()
        .await
        .map_err(anyhow::Error::from)?;
    let events =
        tokio::task::spawn_blocking(move || ParquetReader::new(Cursor::new(bytes)).finish())
            .await
            .map_err(anyhow::Error::from)?
            .map_err(anyhow::Error::from)?;
    Ok(Some(events))
}

/// A node's mirror of the open segments other nodes run of one pipeline (see the module
/// docs).
pub struct Mirror {
    rt: Arc<PipelineRuntime>,
    db: State,
    token: Option<String>,
    client: reqwest::Client,
    /// Per partition: who it was asked of (address and lease epoch) and the version it
    /// answered last.
    seen: BTreeMap<u32, (String, u64, u64)>,
    /// The definition `seen` was installed under: after a switch (a promote) every open
    /// segment is asked for whole again.
    plan: Option<Arc<crate::plan::Plan>>,
}

impl Mirror {
    pub fn new(rt: Arc<PipelineRuntime>, db: State, token: Option<String>) -> Self {
        Mirror {
            rt,
            db,
            token,
            client: reqwest::Client::new(),
            seen: BTreeMap::new(),
            plan: None,
        }
    }

    /// Mirrors until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut owners = BTreeMap::new();
        let mut refreshed = None::<tokio::time::Instant>;
        loop {
            if refreshed.is_none_or(|at| at.elapsed() >= HEARTBEAT) {
                match self.owners().await {
                    Ok(o) => owners = o,
                    Err(e) => {
                        tracing::warn!(pipeline = %self.rt.pipeline.name, error = %format!("{e:#}"), "reading the partitions' owners failed")
                    }
                }
                refreshed = Some(tokio::time::Instant::now());
            }
            let plan = self.rt.plan();
            if !self.plan.as_ref().is_some_and(|p| Arc::ptr_eq(p, &plan)) {
                self.seen.clear();
                self.plan = Some(plan);
            }
            for (&partition, (listen, epoch)) in &owners {
                if self.rt.owns(partition) {
                    continue;
                }
                if let Err(e) = self.mirror(partition, listen, *epoch).await {
                    tracing::debug!(pipeline = %self.rt.pipeline.name, partition, owner = %listen, error = %format!("{e:#}"), "mirroring an open segment failed; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(MIRROR_EVERY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The partitions other live nodes hold the leases of: their addresses and epochs.
    async fn owners(&self) -> anyhow::Result<BTreeMap<u32, (String, u64)>> {
        owners(&self.db, &self.rt).await
    }

    /// Asks `listen` (holding the lease at `epoch`) for `partition`'s open segment and
    /// installs it when it changed.
    async fn mirror(&mut self, partition: u32, listen: &str, epoch: u64) -> anyhow::Result<()> {
        let since = self
            .seen
            .get(&partition)
            .filter(|(at, e, _)| at == listen && *e == epoch)
            .map(|(_, _, v)| *v);
        let url = format!(
            "{listen}{}",
            open_segment_path(&self.rt.pipeline.name, partition)
        );
        let mut req = self.client.get(&url).timeout(MIRROR_TIMEOUT);
        if let Some(v) = since {
            req = req.query(&[("since", v)]);
        }
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await?.error_for_status()?;
        let bytes = resp.bytes().await?;
        let open = tokio::task::spawn_blocking(move || decode_open(&bytes)).await??;
        if open.unchanged {
            self.rt.note_mirrored(partition);
            return Ok(());
        }
        let version = open.version;
        if self.rt.mirror(open).await? {
            self.rt.note_mirrored(partition);
            self.seen
                .insert(partition, (listen.to_string(), epoch, version));
        }
        Ok(())
    }
}
