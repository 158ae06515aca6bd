//! The batch layer (DESIGN.md §4): recompute a pipeline's views from its sealed segments in
//! the lake with the SAME compiled plan as the speed layer, write them as Parquet partials
//! under `views/{pipeline}/{view}/run={id}/`, and publish each in one state transaction.
//!
//! - The cutoff is every segment sealed when the run starts (checkpoints read first, then the
//!   manifest, so a segment sealed in between is left to the next run).
//! - Per view: if the current publication was computed by the same logic, the run is
//!   incremental (published partials ⊕ partials of the segments at or after the old cutoff);
//!   otherwise it recomputes from every segment. Either way serving switches only at publish.
//! - A run that fails or is killed publishes nothing more: what is published stays served.
//! - Versions that are no longer current are kept for [`GRACE`] after they were replaced, then
//!   their files are deleted.
//! - With [`ScaleOut`], a run with a view with many segments to scan is computed as groups by
//!   any number of workers and merged and published by a final job ([`scaleout`]); without it,
//!   or for small inputs, in this process.
//!
//! The run itself (cutoff, views, the in-process recompute) is [`run`]'s; writing, publishing
//! and loading a view's partials [`publish`]'s; deleting the files of replaced versions
//! [`gc`]'s; scale-out, from splitting a run into jobs to its finish job, [`scaleout`]'s.

pub mod gc;
pub mod maintenance;
pub mod publish;
pub mod run;
pub mod scaleout;
pub mod scan;
pub mod verify;

#[cfg(test)]
pub(crate) mod tests;

use std::time::Duration;

use crate::state::{Cutoff, Publication, RunId, StateError};

pub use publish::load_partials;
pub use run::{Select, recompute, recompute_scaled, sealed};
pub use scaleout::ScaleOut;

pub(crate) use publish::PARTIALS_FILE;
pub(crate) use run::{end_run, log};

/// How long a replaced view version stays in the lake (a server may still be loading it).
pub const GRACE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// `--views` named a view the pipeline does not have.
    #[error("pipeline `{pipeline}` has no view `{view}` (views: {known})")]
    UnknownView {
        pipeline: String,
        view: String,
        known: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// How a view was recomputed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// From every segment of the cutoff (first run, or the view's logic changed).
    Full,
    /// The published partials ⊕ the segments since their cutoff.
    Incremental,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Incremental => "incremental",
        }
    }
}

/// What a run tells its caller while it works.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The run exists (its id) and knows its cutoff.
    Started {
        run_id: RunId,
        segments: usize,
        rows: u64,
    },
    /// A view's input segments are read (`done` of `total`, `rows` events so far).
    Segments {
        view: String,
        done: usize,
        total: usize,
        rows: u64,
    },
    /// A view is published.
    Published {
        view: String,
        mode: Mode,
        segments: usize,
        rows: u64,
        partial_rows: u64,
        /// Recorded as the view's candidate version, not made current.
        candidate: bool,
    },
}

impl Progress {
    /// The line a published view is reported with (`run --wait`, a `batch` task's log):
    /// `VIEW: published (MODE, N segment(s), N events, N groups)`; None for other progress.
    pub fn published_line(&self) -> Option<String> {
        let Progress::Published {
            view,
            mode,
            segments,
            rows,
            partial_rows,
            candidate,
        } = self
        else {
            return None;
        };
        Some(format!(
            "{view}: {} ({}, {segments} segment(s), {rows} events, {partial_rows} groups)",
            if *candidate {
                "recorded as the candidate"
            } else {
                "published"
            },
            mode.as_str()
        ))
    }
}

#[derive(Debug, Clone)]
pub struct ViewSummary {
    pub view: String,
    pub mode: Mode,
    /// Segments scanned by this run (for an incremental run: only the new ones).
    pub segments: usize,
    pub events: u64,
    pub publication: Publication,
    /// Recorded as the view's candidate version (`run --candidate`), not made current.
    pub candidate: bool,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: RunId,
    pub cutoff: Cutoff,
    pub views: Vec<ViewSummary>,
    pub elapsed: Duration,
}
