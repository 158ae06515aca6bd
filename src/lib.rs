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
//! - [`speed`]: the write-ahead log, de-duplication at the door, micro-batches, the archiver.
//! - [`cli`]: the `lambda-ctl` command line, one file per subcommand.

pub mod cli;
pub mod plan;
pub mod spec;
pub mod speed;
