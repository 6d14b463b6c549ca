//! The vocabulary of backfill, shared by the worker and the coordinator: the spec and its
//! validation, the partition planner, identifiers and quoting, the warehouse engines, the
//! control store, and the capability traits (`TaskQueue`, `Semaphore`) with their in-memory
//! implementations. Nothing here knows about the CLI.

pub mod broker;
pub mod config;
pub mod control;
pub mod engine;
pub mod envelope;
pub mod error;
pub mod ident;
pub mod monitoring;
pub mod plan;
pub mod queue;
pub mod redis_semaphore;
pub mod semaphore;
pub mod spec;
pub mod sql;
pub mod telemetry;
pub mod warehouse;

pub use error::{BackfillError, Retry};

/// Version of the tool recorded on every run, so an operator can tell which code wrote a shadow.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");
