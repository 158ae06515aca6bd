//! The speed layer (DESIGN.md §3): durable ingest, micro-batches through the plan, partials
//! per segment, the archiver, recovery.

pub mod dedupe;
pub mod log;
pub mod partials;
pub mod runtime;
pub mod status;
