-- Nodes sharing pipelines' partitions through leases (SQLite). Kept in step with
-- migrations/postgres/0014_nodes_leases.sql. Times are epoch milliseconds of the writing node's
-- clock, never the database's.

-- One row per running node: where its peers reach it (`listen`), when it started and when it
-- last said it was alive. A node that stops heartbeating is gone; its leases expire.
CREATE TABLE nodes (
    name         TEXT    PRIMARY KEY,
    listen       TEXT    NOT NULL,
    started_ms   INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL
) STRICT;

-- Which node ingests and seals each pipeline partition. `node` NULL: released, free to take.
-- `epoch` grows by one at every takeover and is never reset: a seal names the epoch it holds
-- and is refused once another node has taken the partition (a fence), so two nodes never both
-- record segments of one partition.
CREATE TABLE leases (
    pipeline   TEXT    NOT NULL,
    partition  INTEGER NOT NULL,
    node       TEXT,
    epoch      INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (pipeline, partition)
) STRICT;

-- Where a broker source (Kafka) resumes a pipeline partition: the next offset of each source
-- partition, recorded in the same transaction as the sealed segment holding the messages
-- before it, so a node taking the partition over neither skips nor repeats any.
CREATE TABLE source_offsets (
    pipeline         TEXT    NOT NULL,
    partition        INTEGER NOT NULL,
    source_partition INTEGER NOT NULL,
    next_offset      INTEGER NOT NULL,
    PRIMARY KEY (pipeline, partition, source_partition)
) STRICT;
