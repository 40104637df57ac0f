//! The HTTP face of biofeed: devices post points here, people read their data here.
//!
//! Owns the axum service: device ingest, sessions, the people-facing read API, the Kafka
//! publisher for `biofeed.points.v1`, health, metrics and the OpenAPI description. Filled in by
//! the ingest issue.
//!
//! Architecture invariants: the only crate that speaks HTTP (axum); it answers a device 2xx only
//! after Kafka acknowledged the frame; it decides no access by itself (it asks `accounts`) and
//! never writes to ClickHouse.
