//! The capture coordinator: turns run requests into jobs held in a durable
//! queue ([`queue`], Postgres for a cluster or SQLite embedded) and hands
//! them to workers under fenced leases.
//!
//! [`connect`] opens the queue a database URL names and applies its
//! migrations:
//!
//! ```no_run
//! # async fn example() -> Result<(), capture_coordinator::queue::QueueError> {
//! use capture_coordinator::queue::JobQueue;
//! let queue = capture_coordinator::connect("sqlite://state/queue.db?mode=rwc").await?;
//! let status = queue.reap_expired().await?;
//! # let _ = status;
//! # Ok(())
//! # }
//! ```

pub mod bench_query;
pub mod bench_queue;
pub mod cli;
pub mod client;
pub mod embedded;
pub mod metrics;
pub mod plan;
pub mod query;
pub mod queue;
pub mod server;
#[cfg(test)]
mod server_tests;
pub mod service;
pub mod soak;

pub use queue::{JobQueue, Queue, QueueError};

/// Opens the job queue of `database_url` (`postgres://...` or
/// `sqlite://PATH?mode=rwc`), applying the embedded migrations.
pub async fn connect(database_url: &str) -> Result<Queue, QueueError> {
    Queue::connect(database_url).await
}
