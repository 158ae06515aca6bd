//! Nodes and partition leases: several nodes share a pipeline's partitions, each partition
//! ingested and sealed by the one node holding its lease.
//!
//! A lease is a row per (pipeline, partition) naming its node, an expiry and an epoch. Times are
//! epoch milliseconds passed by the caller (the node's clock), not the database's: the same
//! figures on both backends, and tests choose their instants. A node renews its leases well
//! before they expire; a lease whose node stopped renewing (crashed, partitioned away) expires
//! and another node takes it, with the next epoch.
//!
//! Expiry alone cannot keep two nodes from sealing one partition: the old holder may still be
//! running (a long pause) when another takes over. So the epoch fences: a seal names the
//! [`Fence`] it holds and is recorded only while the lease is still held at that epoch, checked
//! in the seal's own transaction ([`State::seal_segment_fenced`]).

use std::collections::BTreeMap;

use super::{BeginWrite, State, StateError, db, from_db, to_db};

/// A node of the cluster, as it last said it was alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// Where its peers reach it.
    pub listen: String,
    /// When it first heartbeated (epoch ms).
    pub started_ms: i64,
    /// When it last heartbeated (epoch ms).
    pub heartbeat_ms: i64,
}

/// Who ingests one pipeline partition, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub pipeline: String,
    pub partition: u32,
    /// `None`: released (its node left or gave it up), free to take.
    pub node: Option<String>,
    /// Grows by one at every takeover; never reset.
    pub epoch: u64,
    /// Epoch ms after which another node may take it; 0 once released.
    pub expires_ms: i64,
}

/// What a node sealing a leased partition holds: its name and the lease's epoch when it took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub node: String,
    pub epoch: u64,
}

/// The fence of a seal, its transaction's first statement: a write that changes nothing but
/// matches only while `$3` still holds the lease of partition `$2` at epoch `$4`. Being a write
/// it takes the row lock on PostgreSQL (an acquire of this lease waits for the seal to commit,
/// and a seal waits for an acquire that committed first, then matches nothing) and SQLite's
/// write lock (module docs). Zero rows changed = fenced off.
pub(super) const FENCE: &str = "
    UPDATE leases SET node = node
    WHERE pipeline = $1 AND partition = $2 AND node = $3 AND epoch = $4";

/// Records where source partition `$3` resumes for pipeline partition `$2`. Never backwards: a
/// segment sealed with older offsets (a replay) must not make the next holder read messages
/// again that a later segment already holds.
pub(super) const RECORD_SOURCE_OFFSET: &str = "
    INSERT INTO source_offsets (pipeline, partition, source_partition, next_offset)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (pipeline, partition, source_partition) DO UPDATE
        SET next_offset = excluded.next_offset
        WHERE source_offsets.next_offset < excluded.next_offset";

/// Releases a lease: no node, expired. The epoch stays, so the next holder's is still greater
/// than any the lease had.
const RELEASE: &str = "
    UPDATE leases SET node = NULL, expires_ms = 0
    WHERE pipeline = $1 AND partition = $2 AND node = $3 AND epoch = $4";

#[derive(sqlx::FromRow)]
struct LeaseRow {
    pipeline: String,
    partition: i64,
    node: Option<String>,
    epoch: i64,
    expires_ms: i64,
}

impl LeaseRow {
    fn into_lease(self) -> Result<Lease, StateError> {
        Ok(Lease {
            pipeline: self.pipeline,
            partition: from_db("partition", self.partition)?,
            node: self.node,
            epoch: from_db("lease epoch", self.epoch)?,
            expires_ms: self.expires_ms,
        })
    }
}

impl State {
    /// Says node `name` is alive at `now_ms`, reachable at `listen`: registers it on its first
    /// call (`started_ms` = `now_ms`), later moves only its heartbeat and address.
    pub async fn heartbeat(&self, name: &str, listen: &str, now_ms: i64) -> Result<(), StateError> {
        const SQL: &str = "
            INSERT INTO nodes (name, listen, started_ms, heartbeat_ms) VALUES ($1, $2, $3, $3)
            ON CONFLICT (name) DO UPDATE
                SET listen = excluded.listen, heartbeat_ms = excluded.heartbeat_ms";
        on_pool!(self, |pool| sqlx::query(SQL)
            .bind(name)
            .bind(listen)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(db("node heartbeat"))
    }

    /// Every registered node, by name; whether it is alive is the caller's reading of
    /// `heartbeat_ms`.
    pub async fn nodes(&self) -> Result<Vec<Node>, StateError> {
        const SQL: &str = "SELECT name, listen, started_ms, heartbeat_ms FROM nodes ORDER BY name";
        let rows: Vec<(String, String, i64, i64)> =
            on_pool!(self, |pool| sqlx::query_as(SQL).fetch_all(pool).await)
                .map_err(db("list nodes"))?;
        Ok(rows
            .into_iter()
            .map(|(name, listen, started_ms, heartbeat_ms)| Node {
                name,
                listen,
                started_ms,
                heartbeat_ms,
            })
            .collect())
    }

    /// Node `name` leaves (a clean shutdown, after sealing what it ingested): forgets it and
    /// releases every lease it holds, in ONE transaction, so its partitions are taken over at
    /// once instead of when their leases expire.
    pub async fn leave(&self, name: &str) -> Result<(), StateError> {
        const FORGET: &str = "DELETE FROM nodes WHERE name = $1";
        const RELEASE_ALL: &str = "UPDATE leases SET node = NULL, expires_ms = 0 WHERE node = $1";
        on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await.map_err(db("node leaves"))?;
            sqlx::query(FORGET)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(db("node leaves: forget the node"))?;
            sqlx::query(RELEASE_ALL)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(db("node leaves: release its leases"))?;
            tx.commit().await.map_err(db("node leaves: commit"))
        })?;
        tracing::info!(node = %name, "node left; released its leases");
        Ok(())
    }

    /// Every lease of `pipeline`'s partitions, by partition (a partition never leased has none).
    pub async fn leases(&self, pipeline: &str) -> Result<Vec<Lease>, StateError> {
        const SQL: &str = "
            SELECT pipeline, partition, node, epoch, expires_ms FROM leases
            WHERE pipeline = $1 ORDER BY partition";
        let rows: Vec<LeaseRow> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .fetch_all(pool)
            .await)
        .map_err(db("list leases"))?;
        rows.into_iter().map(LeaseRow::into_lease).collect()
    }

    /// A `serve` without `--node` runs `pipeline` from now on: every lease no node holds at
    /// `now_ms` is marked taken back (no node, `expires_ms` −1; the epoch stays, so a node
    /// taking it later still fences every earlier holder). Returns the leases not taken back
    /// before: the partitions nodes ran since a single `serve` last did.
    pub async fn take_back_leases(
        &self,
        pipeline: &str,
        now_ms: i64,
    ) -> Result<Vec<Lease>, StateError> {
        const SQL: &str = "
            UPDATE leases SET node = NULL, expires_ms = -1
            WHERE pipeline = $1 AND expires_ms >= 0 AND (node IS NULL OR expires_ms < $2)";
        let before: Vec<Lease> = self
            .leases(pipeline)
            .await?
            .into_iter()
            .filter(|l| l.expires_ms >= 0)
            .collect();
        on_pool!(self, |pool| sqlx::query(SQL)
            .bind(pipeline)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(db("take leases back"))?;
        Ok(before)
    }

    /// Node `node` takes the lease of `partition` of `pipeline` until `expires_ms`, if it is
    /// free: never leased (epoch 1), released, or expired (`expires_ms < now_ms`; the epoch
    /// grows by one). Returns the new epoch, the [`Fence`] of the node's seals.
    ///
    /// `None`, changing nothing, while any node holds it unexpired — `node` itself included: a
    /// holder renews ([`State::renew_leases`]) instead, keeping its epoch and so its fence.
    ///
    /// One statement: two nodes taking one lease at the same moment serialise on its row (or
    /// its primary key when it has none yet), and the second finds it taken.
    pub async fn acquire_lease(
        &self,
        pipeline: &str,
        partition: u32,
        node: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<Option<u64>, StateError> {
        const SQL: &str = "
            INSERT INTO leases (pipeline, partition, node, epoch, expires_ms)
            VALUES ($1, $2, $3, 1, $5)
            ON CONFLICT (pipeline, partition) DO UPDATE
                SET node = excluded.node, epoch = leases.epoch + 1,
                    expires_ms = excluded.expires_ms
                WHERE leases.node IS NULL OR leases.expires_ms < $4
            RETURNING epoch";
        let epoch: Option<(i64,)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .bind(i64::from(partition))
            .bind(node)
            .bind(now_ms)
            .bind(expires_ms)
            .fetch_optional(pool)
            .await)
        .map_err(db("acquire lease"))?;
        let epoch = epoch.map(|(e,)| from_db("lease epoch", e)).transpose()?;
        if let Some(epoch) = epoch {
            tracing::info!(%pipeline, partition, %node, epoch, "acquired partition lease");
        }
        Ok(epoch)
    }

    /// Extends to `expires_ms` every lease of `held` (pipeline, partition, epoch) that `node`
    /// still holds at that epoch, in ONE transaction (a node renews all its leases at once,
    /// every few seconds). Returns the (pipeline, partition) of those it no longer holds:
    /// another node took them over or they were released. The node must stop ingesting those;
    /// its seals of them would be fenced off anyway.
    ///
    /// A lease that expired but that nobody took is renewed: no other node can have sealed
    /// anything of it meanwhile (that needs the next epoch).
    pub async fn renew_leases(
        &self,
        node: &str,
        held: &[(String, u32, u64)],
        expires_ms: i64,
    ) -> Result<Vec<(String, u32)>, StateError> {
        const SQL: &str = "
            UPDATE leases SET expires_ms = $5
            WHERE pipeline = $1 AND partition = $2 AND node = $3 AND epoch = $4";
        if held.is_empty() {
            return Ok(Vec::new());
        }
        // Row locks taken in one order by every renewal: two renewals never wait on each other
        // in a cycle (PostgreSQL).
        let mut held: Vec<_> = held.iter().collect();
        held.sort();
        let epochs = held
            .iter()
            .map(|(_, _, epoch)| to_db("lease epoch", *epoch))
            .collect::<Result<Vec<_>, _>>()?;
        let mut lost = Vec::new();
        on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await.map_err(db("renew leases"))?;
            for ((pipeline, partition, _), epoch) in held.iter().zip(&epochs) {
                let renewed = sqlx::query(SQL)
                    .bind(pipeline)
                    .bind(i64::from(*partition))
                    .bind(node)
                    .bind(*epoch)
                    .bind(expires_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("renew leases"))?
                    .rows_affected();
                if renewed == 0 {
                    lost.push((pipeline.clone(), *partition));
                }
            }
            tx.commit().await.map_err(db("renew leases: commit"))
        })?;
        for (pipeline, partition) in &lost {
            tracing::warn!(%pipeline, partition, %node, "partition lease lost: another node took it over");
        }
        Ok(lost)
    }

    /// Node `node` gives up its lease of `partition` of `pipeline` (held at `epoch`), after
    /// sealing what it ingested: another node may take it at once. `false` when it no longer
    /// held it (nothing changed).
    pub async fn release_lease(
        &self,
        pipeline: &str,
        partition: u32,
        node: &str,
        epoch: u64,
    ) -> Result<bool, StateError> {
        let epoch_db = to_db("lease epoch", epoch)?;
        let released = on_pool!(self, |pool| sqlx::query(RELEASE)
            .bind(pipeline)
            .bind(i64::from(partition))
            .bind(node)
            .bind(epoch_db)
            .execute(pool)
            .await
            .map(|done| done.rows_affected() > 0))
        .map_err(db("release lease"))?;
        if released {
            tracing::info!(%pipeline, partition, %node, epoch, "released partition lease");
        }
        Ok(released)
    }

    /// Where a broker source resumes `partition` of `pipeline`: the next offset of each source
    /// partition, as recorded with the last sealed segment ([`State::seal_segment_fenced`]);
    /// empty before the first.
    pub async fn source_offsets(
        &self,
        pipeline: &str,
        partition: u32,
    ) -> Result<BTreeMap<i32, i64>, StateError> {
        const SQL: &str = "
            SELECT source_partition, next_offset FROM source_offsets
            WHERE pipeline = $1 AND partition = $2";
        let rows: Vec<(i64, i64)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .bind(i64::from(partition))
            .fetch_all(pool)
            .await)
        .map_err(db("read source offsets"))?;
        rows.into_iter()
            .map(|(source, offset)| Ok((from_db("source partition", source)?, offset)))
            .collect()
    }
}
