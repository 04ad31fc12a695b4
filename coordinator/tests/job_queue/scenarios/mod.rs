//! The trait-level job queue scenarios: each takes any `JobQueue` (built
//! with `fast_retry_policy`) and is run against every backend by
//! `job_queue_test_suite!` in main.rs.

mod leases;
mod runs;

pub(crate) use leases::*;
pub(crate) use runs::*;
