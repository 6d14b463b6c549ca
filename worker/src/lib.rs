//! Executes partition tasks: take a semaphore lease, then in ONE warehouse transaction claim
//! the partition with its fencing token, merge the deduplicated source rows into the shadow,
//! run the partition checks and write the checkpoint. Retries transient failures with
//! exponential backoff and jitter; permanent failures stop the partition with the database's
//! message. The embedded mode and the distributed workers run this same code.
//!
//! The worker holds no state that survives it: everything it knows comes from the task and
//! the control store, and everything it does is committed or rolled back with the checkpoint.

pub mod context;
pub mod execute;

pub use context::{PartitionContext, shadow_facts};
pub mod distributed;

pub use execute::{
    ContextError, ContextSource, FixedContext, PartitionOutcome, PartitionReport, ReportSink,
    consume, run_partition, run_partition_until,
};
