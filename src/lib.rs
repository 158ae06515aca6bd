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
//! Modules, lowest first; dependencies only point down the list:
//! - [`spec`]: `lambda.yaml`, `pipelines/*.yaml`, `workflows/*.yaml` → validated types, with
//!   every problem reported as `FILE:LINE:COL: message`.
//! - [`plan`]: the one polars definition of decode → filter → derived columns → windows →
//!   mergeable partial aggregates, run by both layers; merge and finish of partials.
//! - [`lake`]: the object store (local directory, S3, Azure, GCS, memory), wrapped once; the
//!   archive, dead-letter and view layout.
//! - [`state`]: the state database (SQLite or PostgreSQL): archive manifest and checkpoints,
//!   published views, runs, schedules. Every SQL statement lives there.
//! - [`speed`]: the write-ahead log, de-duplication at the door, micro-batches into partials
//!   per segment, the archiver, recovery.
//! - [`batch`]: recompute views from the sealed segments with the same plan, publish them
//!   atomically; verify the two engines agree; serving's pickup of new publications.
//! - [`sources`]: where events come from (generator, file, brokers: mqtt, amqp, redis, nats,
//!   kafka; HTTP arrives through serving), and what each reports about itself (lag).
//! - [`serving`]: batch view ⊕ speed partials under one snapshot; the HTTP API.
//! - [`orchestration`]: workflows — cron slots in a time zone, DAGs of tasks with retries and
//!   timeouts, catch-up, backfill and `max_active_runs` — on the apalis queue in the state DB.
//! - [`cli`]: the `lambda-ctl` command line, one file per subcommand.
//!
//! Beside them, [`telemetry`] (histograms, rates, the Prometheus text format) is used by the
//! speed layer to record and by serving to expose, and [`fsync`] (local files that survive a
//! crash) by the log, the `file://` lake and the file source.

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
