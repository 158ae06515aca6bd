//! The speed layer (DESIGN.md §3): durable ingest at the door, micro-batches through the plan
//! into partials per segment, the archiver, recovery; the runtime wires them per pipeline.

mod aggregator;
pub mod dedupe;
pub mod door;
pub mod log;
pub mod lookups;
pub mod nodes;
pub mod partials;
pub mod record;
pub mod recovery;
pub mod runtime;
pub mod status;
#[cfg(test)]
mod testing;
