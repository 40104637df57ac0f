//! Kafka to ClickHouse: the writer that turns frames into `points` rows.
//!
//! Owns the consume loop on `biofeed.points.v1`, batching, offset commits, the dead-letter topic
//! `biofeed.points.dlq` and replay. Filled in by the consumers issue.
//!
//! Architecture invariants: the only crate that consumes Kafka; it commits an offset only after
//! ClickHouse acknowledged the rows of that offset, and never touches Postgres tables other than
//! reading the erasure list.
