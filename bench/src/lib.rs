//! The benchmarks behind `biofeed bench`: [`gateway`] (the gateway against producing straight
//! into Kafka), [`consume`] (one consumer against ClickHouse's Kafka engine) and [`e2e`] (the
//! whole pipeline under sustained load from simulated devices, with the two others as peers).
//! Each prints, as its last line, one JSON object with its figures.
//!
//! Every run makes the stores it uses — a Postgres database, a ClickHouse database, topics,
//! named by a random id — and removes them however it ends ([`harness`]).
//!
//! Architecture invariants: not a production service — only `biofeed bench` uses it (and the
//! integration tests, [`consume::register_sessions`]); it works only in databases and topics of
//! its own, never in the configured ones; no production crate depends on it.

pub mod consume;
pub mod e2e;
pub mod export;
pub mod gateway;
mod harness;
