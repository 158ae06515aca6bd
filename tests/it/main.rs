//! The one integration-test binary (polars links once). Each module drives one part of the
//! system as a user would.

mod bluegreen;
mod brokers;
mod cli;
mod commands;
mod hostile;
mod lakes;
mod lambda;
mod ledger;
mod lookups;
mod maintenance;
mod ops;
mod orchestration;
mod orders;
mod projects;
mod readme;
mod scaleout;
mod sinks;
mod spec_diagnostics;
mod speed;
mod sql;
mod state;
mod support;
mod travel;
