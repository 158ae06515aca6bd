//! Sources: where events come from. One file per source kind.

pub mod generator;
