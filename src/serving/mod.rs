//! The serving layer (DESIGN.md §5): merge the published batch view with the speed partials
//! of the segments it does not cover, finish, filter, and answer over HTTP and the CLI.

pub mod dashboard;
pub mod format;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod query;
pub mod server;
pub mod time;
pub mod workflows;
