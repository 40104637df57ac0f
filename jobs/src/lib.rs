//! The job runner: rollups, session metrics, purge of failed sessions, erasure, failed jobs.
//!
//! Owns the Postgres table `failed_jobs` and the job leases, and the ClickHouse rollup and
//! metrics tables. Filled in by the jobs issue.
//!
//! Architecture invariants: claims work with `FOR UPDATE SKIP LOCKED` so that any number of
//! runners can run side by side; never speaks HTTP and never consumes Kafka.
