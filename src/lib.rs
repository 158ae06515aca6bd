//! # lambda-ctl
//!
//! A lambda-architecture orchestrator: one YAML spec drives a speed layer (live streams →
//! windowed aggregates within milliseconds), a batch layer (recompute from the Parquet archive
//! with polars) and a serving layer that merges both into one exact answer.
//!
//! ```text
//!  spec ──► plan ──────────────┬──────────────────────┐
//!  (YAML)  (one polars plan)   ▼                      ▼
//!  sources ──► speed ──► lake: Parquet segments ──► batch ──► published view
//!               │          + state: manifest          │
//!               └── partials per segment ──► serving ◄─┘   orchestration: cron, DAGs
//! ```
//!
//! Modules, lowest first; dependencies only point down the list (`src/layers.rs` checks every
//! `crate::` path of every file against it, with no exception):
//! - [`spec`]: `lambda.yaml`, `pipelines/*.yaml`, `workflows/*.yaml` → validated types, with
//!   every problem reported as `FILE:LINE:COL: message`.
//! - [`plan`]: the one polars definition of decode → filter → derived columns → windows →
//!   mergeable partial aggregates, run by both layers; merge and finish of partials.
//! - [`lake`]: the object store (local directory, S3, Azure, GCS, memory), wrapped once; the
//!   archive, dead-letter and view layout.
//! - [`state`]: the state database (SQLite or PostgreSQL): archive manifest and checkpoints,
//!   published views and the segments they cover, runs, schedules. Every SQL statement lives
//!   there.
//! - [`speed`]: per pipeline, the runtime wiring the door (decode, dead letters,
//!   de-duplication, the write-ahead log and its records), the aggregator and archiver
//!   (micro-batches into partials per segment, sealing) and recovery; what the source reports
//!   about itself (lag).
//! - [`batch`]: recompute views from the sealed segments with the same plan, publish them
//!   atomically; verify the two engines agree; archive maintenance.
//! - [`sources`]: where events come from (generator, file, brokers: mqtt, amqp, redis, nats,
//!   kafka, servicebus; HTTP arrives through serving).
//! - [`serving`]: batch view ⊕ speed partials under one snapshot, with the answer cache beside
//!   the runtime it serves; pickup of new publications; the HTTP API behind one middleware
//!   stack (`serving::app`); the views' sinks (`serving::sink`: the served answer kept in
//!   PostgreSQL tables, Kafka topics and files).
//! - [`orchestration`]: workflows — cron slots in a time zone, DAGs of tasks with retries and
//!   timeouts, catch-up, backfill and `max_active_runs` — on the apalis queue in the state DB;
//!   the workflow routes of the HTTP API.
//! - [`cli`]: the `lambda-ctl` command line, one file per subcommand.
//!
//! Beside them, leaves that every layer may use and that import no module of the crate:
//! [`clock`] (now in epoch milliseconds, and how times are written), [`telemetry`]
//! (histograms, rates, the Prometheus text format: the speed layer records, serving exposes)
//! and [`fsync`] (local files that survive a crash: the log, the `file://` lake, the file
//! source). Tests add two: the fuzz harness (`src/fuzz.rs`; each target lives with the layer
//! it fuzzes) and the layer check itself.

pub mod batch;
pub mod cli;
pub mod clock;
pub mod fsync;
pub mod lake;
pub mod orchestration;
pub mod plan;
pub mod serving;
pub mod sources;
pub mod spec;
pub mod speed;
pub mod state;
pub mod telemetry;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod layers;
