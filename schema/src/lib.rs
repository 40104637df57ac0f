//! The biofeed data contract, shared by every other crate.
//!
//! Owns: the names of the Kafka topics, the Avro schemas of what travels on them (added with the
//! ingest issue), the validated newtypes (`SessionId`, `DataTypeName`, `Micros`, …) and the
//! ClickHouse row types.
//!
//! Architecture invariant: `schema` is the leaf of the workspace. It does no I/O and depends on
//! none of our other crates, so that the contract can be read, tested and reused on its own.

/// Kafka topic names, as created by `biofeed migrate` unless overridden in the settings.
pub mod topics {
    /// The topic devices' frames are published to: key = session id, value = Avro single-object
    /// encoded `SensorFrame`.
    pub const POINTS: &str = "biofeed.points.v1";
    /// Dead letters: the original bytes of frames that could not be decoded or stored, with
    /// headers saying why, where from and when.
    pub const POINTS_DLQ: &str = "biofeed.points.dlq";
}
