//! The coordinator: the `backfill` CLI and the run state machine (plan, shadow, barrier,
//! audits, publish, rollback, gc, status, serve, demo). Depends on the worker library for partition
//! execution and on the common vocabulary; nothing depends on it.

pub mod audit;
pub mod cli;
pub mod demo;
pub mod diff;
pub mod distributed;
pub mod hooks;
pub mod publish;
pub mod runner;
pub mod serve;
pub mod shadow;
pub mod status;
pub mod window;
